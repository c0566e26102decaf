//! Cluster-wide concurrency slots of a function, held in JetStream.
//!
//! A function with `max_concurrency = N` owns N slot messages on
//! `<prefix>.slots.<function>.<N>.<i>` (a stream keeping one message per subject, so
//! however many processes create them there are exactly N), read through one durable
//! consumer per function. A process leases a slot by receiving its message and holds
//! it unacknowledged; it gives it back with a NAK, which makes it available to every
//! other process at once. So at most N invocations of the function run across all
//! dispatcher processes.
//!
//! Leases are cached: a slot freed by an invocation is kept for the next one and only
//! returned after it has been idle for [`IDLE_RETURN`], so steady load costs no extra
//! messages per event. Held leases are kept alive with progress acks; a process that
//! dies loses its leases after the consumer's ack wait ([`LEASE_TIMEOUT`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use switchyard_bus::async_nats::jetstream::{self, AckKind, consumer::pull, stream};
use switchyard_bus::{Bus, BusError, subject::escape_token};
use switchyard_event::backoff::Backoff;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// A slot idle this long goes back to the cluster.
pub const IDLE_RETURN: Duration = Duration::from_millis(200);
/// A dead process's slots come back after this.
pub const LEASE_TIMEOUT: Duration = Duration::from_secs(10);

struct Leases {
    /// Every slot this process holds, free or in use, by stream sequence.
    held: HashMap<u64, Arc<jetstream::Message>>,
    /// Held slots not in use, with when they were freed.
    free: Vec<(u64, Instant)>,
}

/// The slots of one function, as seen by this process.
pub struct FunctionSlots {
    function: String,
    stream: jetstream::stream::Stream,
    consumer_config: pull::Config,
    consumer: jetstream::consumer::Consumer<pull::Config>,
    leases: Mutex<Leases>,
    /// Acquirers waiting for a slot; the lease loop asks the cluster for this many.
    wanted: AtomicUsize,
    demand: Notify,
    available: Notify,
    /// Another process is waiting for a slot: give slots back as soon as they are
    /// free instead of caching them, so the processes share the function.
    contended: AtomicBool,
    /// The lease loop has a pull request waiting on the server.
    pulling: AtomicBool,
}

/// Counts an acquirer as waiting until it returns or is cancelled.
struct Wanting<'a>(&'a FunctionSlots);

impl Drop for Wanting<'_> {
    fn drop(&mut self) {
        self.0.wanted.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One leased slot; returned to this process's cache on drop.
pub struct SlotPermit {
    sequence: u64,
    slots: Arc<FunctionSlots>,
}

impl Drop for SlotPermit {
    fn drop(&mut self) {
        let mut leases = self.slots.leases.lock().expect("slot lock");
        if self.slots.contended.load(Ordering::Relaxed) {
            if let Some(lease) = leases.held.remove(&self.sequence) {
                tokio::spawn(async move {
                    let _ = lease.ack_with(AckKind::Nak(None)).await;
                });
            }
        } else if leases.held.contains_key(&self.sequence) {
            leases.free.push((self.sequence, Instant::now()));
            drop(leases);
            self.slots.available.notify_waiters();
        }
    }
}

/// The stream holding every function's slots, beside the events stream.
pub fn slots_stream_name(bus: &Bus) -> String {
    format!("{}_SLOTS", bus.events_stream())
}

impl FunctionSlots {
    /// Creates the function's N slots (idempotent) and its slot consumer.
    pub async fn open(
        bus: &Bus,
        function: &str,
        count: usize,
    ) -> Result<Arc<FunctionSlots>, BusError> {
        let prefix = bus.subjects().prefix().to_owned();
        let stream = bus
            .jetstream()
            .create_or_update_stream(stream::Config {
                name: slots_stream_name(bus),
                subjects: vec![format!("{prefix}.slots.>")],
                max_messages_per_subject: 1,
                discard: stream::DiscardPolicy::New,
                discard_new_per_subject: true,
                storage: stream::StorageType::File,
                // As many copies as the events stream: losing a node must not stall
                // every cluster-scoped function.
                num_replicas: bus.replicas(),
                ..Default::default()
            })
            .await
            .map_err(|error| BusError::operation("create slots stream", error))?;
        let stream = bus
            .jetstream()
            .get_stream(stream.config.name)
            .await
            .map_err(|error| BusError::operation("open slots stream", error))?;
        let base = format!("{prefix}.slots.{}.{count}", escape_token(function));
        let mut pending = Vec::with_capacity(count);
        for index in 0..count {
            // A slot that exists already refuses the publish: exactly one per subject.
            if let Ok(ack) = bus
                .jetstream()
                .publish(format!("{base}.{index}"), "".into())
                .await
            {
                pending.push(ack);
            }
        }
        for ack in pending {
            let _ = ack.await;
        }
        let consumer_config = pull::Config {
            durable_name: Some(format!(
                "switchyard-slots-{}-{count}",
                escape_token(function).replace('%', "_")
            )),
            description: Some(format!("concurrency slots of function `{function}`")),
            filter_subject: format!("{base}.*"),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: LEASE_TIMEOUT,
            max_deliver: -1,
            max_ack_pending: count as i64,
            ..Default::default()
        };
        let consumer = stream
            .create_consumer(consumer_config.clone())
            .await
            .map_err(|error| BusError::operation("create slots consumer", error))?;
        Ok(Arc::new(FunctionSlots {
            function: function.to_owned(),
            stream,
            consumer_config,
            consumer,
            leases: Mutex::new(Leases {
                held: HashMap::new(),
                free: Vec::new(),
            }),
            wanted: AtomicUsize::new(0),
            demand: Notify::new(),
            available: Notify::new(),
            contended: AtomicBool::new(false),
            pulling: AtomicBool::new(false),
        }))
    }

    /// Takes a cached slot without waiting.
    /// The function these slots belong to.
    pub fn function(&self) -> &str {
        &self.function
    }

    pub fn try_acquire(self: &Arc<Self>) -> Option<SlotPermit> {
        self.take_free()
    }

    fn take_free(self: &Arc<Self>) -> Option<SlotPermit> {
        let mut leases = self.leases.lock().expect("slot lock");
        let (sequence, _) = leases.free.pop()?;
        Some(SlotPermit {
            sequence,
            slots: self.clone(),
        })
    }

    /// Takes a slot: a cached one, or a new lease from the cluster, waiting until one
    /// is free somewhere. Cancel-safe: leases are received by [`Self::lease_loop`], never
    /// by the waiting task, so a cancelled wait cannot lose a slot.
    pub async fn acquire(self: &Arc<Self>) -> SlotPermit {
        self.wanted.fetch_add(1, Ordering::SeqCst);
        let _wanting = Wanting(self);
        loop {
            let notified = self.available.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(permit) = self.take_free() {
                return permit;
            }
            self.demand.notify_one();
            notified.await;
        }
    }

    /// Leases slots from the cluster while acquirers wait, until `shutdown`.
    pub async fn lease_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let mut failures = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let mut consumer = self.consumer.clone();
        loop {
            if self.wanted.load(Ordering::SeqCst) == 0 {
                tokio::select! {
                    () = self.demand.notified() => {}
                    () = shutdown.cancelled() => return,
                }
                continue;
            }
            if failures.failing() {
                if !failures.pause(shutdown.cancelled()).await {
                    return;
                }
                if failures.failures() >= 3 {
                    // The consumer may have been deleted or lost with a server.
                    if let Ok(recreated) = self
                        .stream
                        .create_consumer(self.consumer_config.clone())
                        .await
                    {
                        consumer = recreated;
                    }
                }
            }
            let wanted = self.wanted.load(Ordering::SeqCst).max(1);
            let request = consumer
                .batch()
                .max_messages(wanted)
                .expires(Duration::from_millis(500))
                .messages();
            self.pulling.store(true, Ordering::SeqCst);
            let mut batch = tokio::select! {
                batch = request => match batch {
                    Ok(batch) => batch,
                    Err(error) => {
                        if failures.failed() {
                            tracing::warn!(function = %self.function, %error, stage = "lease slot", "leasing concurrency slots failed");
                        }
                        self.pulling.store(false, Ordering::SeqCst);
                        continue;
                    }
                },
                () = shutdown.cancelled() => return,
            };
            // Not raced with shutdown: a slot delivered to this pull must be recorded,
            // so it can be given back.
            while let Some(message) = batch.next().await {
                let message = match message {
                    Ok(message) => message,
                    Err(error) => {
                        if failures.failed() {
                            tracing::warn!(function = %self.function, %error, stage = "lease slot", "leasing concurrency slots failed");
                        }
                        break;
                    }
                };
                let Ok(sequence) = message.info().map(|info| info.stream_sequence) else {
                    continue;
                };
                failures.succeeded();
                {
                    let mut leases = self.leases.lock().expect("slot lock");
                    leases.held.insert(sequence, Arc::new(message));
                    leases.free.push((sequence, Instant::now()));
                }
                self.available.notify_waiters();
            }
            // The pull has ended on the server (fulfilled or expired).
            self.pulling.store(false, Ordering::SeqCst);
        }
    }

    /// Returns slots idle longer than [`IDLE_RETURN`] and keeps the others alive,
    /// until `shutdown`. [`Self::return_all`] gives the rest back afterwards.
    pub async fn maintain(self: Arc<Self>, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(IDLE_RETURN / 2);
        let mut last_renewal = Instant::now();
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = shutdown.cancelled() => break,
            }
            // Pull requests waiting on the slots beyond our own mean another process
            // wants one. Only worth asking while this process holds slots.
            let holding = !self.leases.lock().expect("slot lock").held.is_empty();
            if holding {
                let info = tokio::select! {
                    info = self.consumer.get_info() => info,
                    () = shutdown.cancelled() => break,
                };
                if let Ok(info) = info {
                    let ours = usize::from(self.pulling.load(Ordering::SeqCst));
                    self.contended
                        .store(info.num_waiting > ours, Ordering::Relaxed);
                }
            } else {
                self.contended.store(false, Ordering::Relaxed);
            }
            let contended = self.contended.load(Ordering::Relaxed);
            let (returned, renew) = {
                let mut leases = self.leases.lock().expect("slot lock");
                let now = Instant::now();
                let (idle, busy): (Vec<_>, Vec<_>) = leases
                    .free
                    .drain(..)
                    .partition(|(_, freed)| contended || now.duration_since(*freed) >= IDLE_RETURN);
                leases.free = busy;
                let returned: Vec<_> = idle
                    .into_iter()
                    .filter_map(|(sequence, _)| leases.held.remove(&sequence))
                    .collect();
                let renew = if last_renewal.elapsed() >= LEASE_TIMEOUT / 3 {
                    last_renewal = Instant::now();
                    leases.held.values().cloned().collect()
                } else {
                    Vec::new()
                };
                (returned, renew)
            };
            for lease in returned {
                let _ = lease.ack_with(AckKind::Nak(None)).await;
            }
            for lease in renew {
                let _ = lease.ack_with(AckKind::Progress).await;
            }
        }
    }

    /// Gives every slot back to the cluster. Called once leasing and invocations have
    /// stopped.
    pub async fn return_all(&self) {
        let all: Vec<_> = {
            let mut leases = self.leases.lock().expect("slot lock");
            leases.free.clear();
            leases.held.drain().map(|(_, lease)| lease).collect()
        };
        for lease in all {
            let _ = lease.ack_with(AckKind::Nak(None)).await;
        }
    }
}
