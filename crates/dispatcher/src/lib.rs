//! The dispatcher: delivers events from the bus to functions through triggers.
//!
//! Each trigger is a durable JetStream pull consumer over the events stream, so every
//! dispatcher process running the same configuration shares its work and JetStream's
//! `max_ack_pending` (set to the trigger's `max_concurrency`) bounds it across all of
//! them. Within a process, a trigger pulls only after taking a permit from its own
//! budget, its function's adaptive budget and the global budget, so a slow function
//! leaves events in JetStream. A failed event waits out its retry delay on a second
//! consumer per trigger (a NAK with delay there), so waiting retries never occupy the
//! trigger's concurrency. The delivery contract is in `design.md` beside this crate:
//! every event is acknowledged only after its function accepted it, after its retry
//! copy was stored, or after its dead letter was stored; nothing pending lives only in
//! this process's memory.
//!
//! Where things are: `config` (trigger and dispatcher settings), `consumers` (consumer
//! names, creating them without losing position, orphans), `permits` (what an
//! invocation holds), `pulling` (the pull protocol), `delivery` (attempt accounting
//! across deliveries), `retries` (the retry consumer), `batch` and `ordered` (the two
//! other delivery modes), and here: the `Dispatcher` itself, preparing, invoking and
//! settling one delivery.

pub mod batch;
pub mod config;
pub mod consumers;
pub mod delivery;
pub mod filter;
pub mod limit;
pub mod members;
pub mod metrics;
pub mod ordered;
mod permits;
mod pulling;
mod retries;
pub mod retry;
pub mod slots;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use serde::Serialize;
use switchyard_bus::async_nats::HeaderMap;
use switchyard_bus::async_nats::jetstream::{self, AckKind, consumer::pull};
use switchyard_bus::dead_letter::{
    DeadLetter, REASON_ATTEMPTS_EXHAUSTED, REASON_MALFORMED, REASON_MAX_AGE_EXCEEDED,
    REASON_REJECTED, REASON_UNPROCESSABLE,
};
use switchyard_bus::{Bus, BusError, RetryState, event_from_message, event_headers};
use switchyard_event::timestamp::{now_rfc3339, parse_rfc3339, rfc3339};
use switchyard_event::{Event, Failure, FunctionAnswer, Outcome, PublishError, Target};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use batch::BatchSettings;
pub use config::{
    DestinationConfig, Destinations, DispatcherConfig, EnrichConfig, OrderingMode, StartPosition,
    TriggerConfig,
};
pub use consumers::ConsumerRole;
pub use filter::{Filter, Matcher};
pub use limit::{AdaptiveLimit, AdaptivePermit};
pub use metrics::DispatcherMetrics;
use permits::{Permits, acquire_permits, acquire_shared_permits};
use pulling::pull_loop;
use retries::retry_loop;
pub use retry::{BackoffKind, RetryPolicy};
pub use slots::FunctionSlots;

use metrics::{DeadLetterLabels, FunctionLabels, TriggerLabels, TriggerOnlyLabels};

/// A function the dispatcher can invoke.
pub struct FunctionRuntime {
    pub name: String,
    pub target: Arc<dyn Target>,
    pub timeout: Duration,
    /// One budget shared by every trigger that targets this function, in this
    /// process; shrinks while the function is overloaded.
    pub limit: Arc<AdaptiveLimit>,
    /// When set, the function's `max_concurrency` also holds across every dispatcher
    /// process, through slots leased from JetStream ([`slots`]).
    pub cluster_slots: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error("{0}")]
    InvalidTriggerName(String),
    #[error("trigger `{trigger}` targets unknown function `{function}`")]
    UnknownFunction { trigger: String, function: String },
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// What the admin endpoint shows of a trigger.
#[derive(Debug, Clone, Serialize)]
pub struct TriggerStatus {
    pub name: String,
    pub function: String,
    pub max_concurrency: usize,
    pub in_flight: i64,
    /// Events the trigger's consumer has not delivered yet.
    pub lag: u64,
    /// Failed events waiting for their retry.
    pub retrying: u64,
    pub function_concurrency_limit: usize,
}

/// Metric handles of one trigger, resolved once.
struct TriggerMetrics {
    dispatched: Counter,
    succeeded: Counter,
    retried: Counter,
    rejected: Counter,
    filtered: Counter,
    in_flight: Gauge,
    duration: Histogram,
    function_limit: Gauge,
}

struct TriggerRuntime {
    config: TriggerConfig,
    destinations: Destinations,
    function: Arc<FunctionRuntime>,
    slots: Option<Arc<FunctionSlots>>,
    permits: Arc<Semaphore>,
    /// A direct-consumer event waits for one of `permits`: the main pull loop gives
    /// back one it holds for a pull that has not brought an event yet.
    permit_wanted: tokio::sync::Notify,
    stream: jetstream::stream::Stream,
    /// Where each of its consumers had got to, to recreate one that disappeared.
    positions: Arc<consumers::Positions>,
    consumer_config: pull::Config,
    /// Due retries and replayed dead letters, for this trigger only.
    direct_consumer_config: pull::Config,
    retry_consumer_config: pull::Config,
    /// With `ordering = "key"`: one consumer per key partition.
    partition_configs: Vec<pull::Config>,
    direct_subject: String,
    retry_subject: String,
    metrics: TriggerMetrics,
    in_flight: AtomicI64,
    lag: AtomicU64,
    retrying: AtomicU64,
}

struct Shared {
    bus: Bus,
    metrics: DispatcherMetrics,
    global: Arc<Semaphore>,
    /// What deliveries that ended without an ack or a term left for the next one.
    records: delivery::DeliveryRecords,
}

/// A running set of triggers.
pub struct Dispatcher {
    /// Consumers of triggers no longer configured that still held events at start.
    orphaned: Arc<Vec<consumers::OrphanedConsumer>>,
    shared: Arc<Shared>,
    triggers: Vec<Arc<TriggerRuntime>>,
    slots: Vec<Arc<FunctionSlots>>,
    config: DispatcherConfig,
}

/// Read-only view of a dispatcher, for the admin endpoint.
#[derive(Clone)]
pub struct DispatcherView {
    triggers: Vec<Arc<TriggerRuntime>>,
    orphaned: Arc<Vec<consumers::OrphanedConsumer>>,
}

impl DispatcherView {
    /// Consumers of triggers no longer in the configuration that held events when
    /// this process started.
    pub fn orphaned(&self) -> &[consumers::OrphanedConsumer] {
        &self.orphaned
    }

    pub fn triggers(&self) -> Vec<TriggerStatus> {
        self.triggers
            .iter()
            .map(|trigger| TriggerStatus {
                name: trigger.config.name.clone(),
                function: trigger.function.name.clone(),
                max_concurrency: trigger.config.max_concurrency,
                in_flight: trigger.in_flight.load(Ordering::Relaxed),
                lag: trigger.lag.load(Ordering::Relaxed),
                retrying: trigger.retrying.load(Ordering::Relaxed),
                function_concurrency_limit: trigger.function.limit.limit(),
            })
            .collect()
    }
}

/// The durable consumer name of a trigger.
pub fn consumer_name(trigger: &str) -> String {
    ConsumerRole::Main.name(trigger)
}

/// How long a pull waits for events. Short, so an idle trigger soon gives back the
/// shared permits it took for its pull.
const PULL_EXPIRES: Duration = Duration::from_secs(1);

/// Retries that may wait at once per trigger; more wait in the stream until room frees.
const MAX_WAITING_RETRIES: i64 = 100_000;

/// Events one partition of an ordered trigger holds at most (unacknowledged, queued
/// behind their key's head).
const ORDERED_BUFFER: i64 = 512;

use switchyard_bus::dead_letter::MAX_ERROR_BYTES;
use switchyard_bus::limits::shorten as truncate;

impl Dispatcher {
    /// Creates (or updates) every trigger's durable consumers.
    pub async fn new(
        bus: Bus,
        config: DispatcherConfig,
        triggers: Vec<TriggerConfig>,
        functions: HashMap<String, Arc<FunctionRuntime>>,
        mut destinations: HashMap<String, Destinations>,
        metrics: DispatcherMetrics,
    ) -> Result<Dispatcher, DispatchError> {
        let stream = bus
            .jetstream()
            .get_stream(bus.events_stream())
            .await
            .map_err(|error| BusError::operation("open events stream", error))?;
        // Which life of the events stream positions and delivery records belong to.
        let stream_epoch = stream.cached_info().created.unix_timestamp_nanos();
        let positions = Arc::new(consumers::Positions::open(&bus, stream_epoch).await?);
        let mut slots_by_function: HashMap<String, Arc<FunctionSlots>> = HashMap::new();
        for function in functions.values() {
            if let Some(count) = function.cluster_slots {
                let slots = FunctionSlots::open(&bus, &function.name, count.max(1)).await?;
                slots_by_function.insert(function.name.clone(), slots);
            }
        }
        let mut runtimes = Vec::with_capacity(triggers.len());
        for trigger in triggers {
            if let Some(problem) = consumers::trigger_name_problem(&trigger.name) {
                return Err(DispatchError::InvalidTriggerName(problem));
            }
            let function = functions.get(&trigger.function).cloned().ok_or_else(|| {
                DispatchError::UnknownFunction {
                    trigger: trigger.name.clone(),
                    function: trigger.function.clone(),
                }
            })?;
            let subjects = bus.subjects();
            let hints = trigger.filter.subject_hints();
            let direct_subject = subjects.direct(&trigger.name);
            let retry_subject = subjects.retry(&trigger.name);
            let consumer_config = pull::Config {
                durable_name: Some(ConsumerRole::Main.name(&trigger.name)),
                description: Some(format!(
                    "switchyard trigger `{}` -> `{}`",
                    trigger.name, trigger.function
                )),
                // One filter subject: JetStream serves a consumer with several
                // (`filter_subjects`) through a much slower path, 3-4x the server's
                // CPU per event when events carry many subjects. Due retries and
                // replays come through the trigger's direct consumer instead.
                filter_subject: subjects.event_filter(
                    None,
                    hints.source_exact,
                    hints.type_exact,
                    hints.type_prefix,
                ),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: trigger.ack_wait,
                max_deliver: -1,
                // Events in flight: one per invocation, or a batch's worth.
                max_ack_pending: (trigger.max_concurrency
                    * trigger
                        .batch
                        .as_ref()
                        .map_or(1, |batch| batch.max_events.max(1)))
                    as i64,
                // One pull request per free permit can be waiting at worst.
                max_waiting: (trigger.max_concurrency as i64 + 64).max(512),
                deliver_policy: match trigger.start {
                    StartPosition::New => jetstream::consumer::DeliverPolicy::New,
                    StartPosition::All => jetstream::consumer::DeliverPolicy::All,
                },
                ..Default::default()
            };
            let retry_consumer_config = pull::Config {
                durable_name: Some(ConsumerRole::Retry.name(&trigger.name)),
                description: Some(format!(
                    "switchyard trigger `{}`: events waiting to be retried",
                    trigger.name
                )),
                filter_subject: retry_subject.clone(),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                max_deliver: -1,
                max_ack_pending: MAX_WAITING_RETRIES,
                deliver_policy: jetstream::consumer::DeliverPolicy::All,
                ..Default::default()
            };
            let direct_consumer_config = pull::Config {
                durable_name: Some(ConsumerRole::Direct.name(&trigger.name)),
                description: Some(format!(
                    "switchyard trigger `{}`: due retries and replays",
                    trigger.name
                )),
                filter_subject: direct_subject.clone(),
                deliver_policy: jetstream::consumer::DeliverPolicy::New,
                ..consumer_config.clone()
            };
            // An ordered trigger reads new events through its key partitions instead.
            if trigger.ordering != OrderingMode::Key {
                consumers::ensure(&stream, &consumer_config, &positions).await?;
            }
            consumers::ensure(&stream, &direct_consumer_config, &positions).await?;
            consumers::ensure(&stream, &retry_consumer_config, &positions).await?;
            let mut partition_configs = Vec::new();
            if trigger.ordering == OrderingMode::Key {
                let partitions = trigger.partitions.clamp(1, switchyard_bus::KEY_BUCKETS);
                for index in 0..partitions {
                    let config = pull::Config {
                        durable_name: Some(
                            ConsumerRole::Partition {
                                index,
                                of: partitions,
                            }
                            .name(&trigger.name),
                        ),
                        description: Some(format!(
                            "switchyard trigger `{}`: key partition {index} of {partitions}",
                            trigger.name
                        )),
                        filter_subjects: (0..switchyard_bus::KEY_BUCKETS)
                            .filter(|bucket| bucket % partitions == index)
                            .map(|bucket| {
                                subjects.event_filter(
                                    Some(bucket),
                                    hints.source_exact,
                                    hints.type_exact,
                                    hints.type_prefix,
                                )
                            })
                            .collect(),
                        ack_policy: jetstream::consumer::AckPolicy::Explicit,
                        ack_wait: trigger.ack_wait,
                        max_deliver: -1,
                        max_ack_pending: ORDERED_BUFFER,
                        deliver_policy: consumer_config.deliver_policy,
                        priority_groups: vec![ordered::OWNER_GROUP.to_owned()],
                        priority_policy: jetstream::consumer::PriorityPolicy::PinnedClient,
                        priority_timeout: ordered::OWNER_TIMEOUT,
                        ..Default::default()
                    };
                    consumers::ensure(&stream, &config, &positions).await?;
                    partition_configs.push(config);
                }
            }
            let labels = TriggerLabels {
                trigger: trigger.name.clone(),
                function: function.name.clone(),
            };
            let function_limit = metrics
                .function_concurrency_limit
                .get_or_create(&FunctionLabels {
                    function: function.name.clone(),
                })
                .clone();
            function_limit.set(function.limit.limit() as i64);
            let trigger_metrics = TriggerMetrics {
                dispatched: metrics.events_dispatched.get_or_create(&labels).clone(),
                succeeded: metrics.dispatch_succeeded.get_or_create(&labels).clone(),
                retried: metrics.dispatch_retried.get_or_create(&labels).clone(),
                rejected: metrics.dispatch_rejected.get_or_create(&labels).clone(),
                filtered: metrics.events_filtered.get_or_create(&labels).clone(),
                in_flight: metrics.events_in_flight.get_or_create(&labels).clone(),
                duration: metrics
                    .invocation_duration_seconds
                    .get_or_create(&labels)
                    .clone(),
                function_limit,
            };
            runtimes.push(Arc::new(TriggerRuntime {
                destinations: destinations.remove(&trigger.name).unwrap_or_default(),
                metrics: trigger_metrics,
                permits: Arc::new(Semaphore::new(trigger.max_concurrency.max(1))),
                permit_wanted: tokio::sync::Notify::new(),
                slots: slots_by_function.get(&function.name).cloned(),
                config: trigger,
                function,
                stream: stream.clone(),
                positions: positions.clone(),
                consumer_config,
                direct_consumer_config,
                retry_consumer_config,
                partition_configs,
                direct_subject,
                retry_subject,
                in_flight: AtomicI64::new(0),
                lag: AtomicU64::new(0),
                retrying: AtomicU64::new(0),
            }));
        }
        let configured: std::collections::HashSet<&str> = runtimes
            .iter()
            .map(|trigger| trigger.config.name.as_str())
            .collect();
        let orphaned = consumers::orphaned(&stream, &configured).await;
        for orphan in &orphaned {
            tracing::warn!(
                consumer = %orphan.consumer, trigger = %orphan.trigger, pending = orphan.pending, ack_pending = orphan.ack_pending,
                "a trigger no longer in the configuration still holds events: they will not be delivered; `switchyard dlq drain --trigger {}` moves them to its dead letters",
                orphan.trigger
            );
        }
        Ok(Dispatcher {
            orphaned: Arc::new(orphaned),
            shared: Arc::new(Shared {
                records: delivery::DeliveryRecords::open(&bus, stream_epoch).await?,
                bus,
                metrics,
                global: Arc::new(Semaphore::new(config.max_concurrency.max(1))),
            }),
            triggers: runtimes,
            slots: slots_by_function.into_values().collect(),
            config,
        })
    }

    pub fn view(&self) -> DispatcherView {
        DispatcherView {
            triggers: self.triggers.clone(),
            orphaned: self.orphaned.clone(),
        }
    }

    /// Runs every trigger until `shutdown` is cancelled, then stops pulling, lets
    /// in-flight invocations finish within the shutdown grace, and hands the rest back
    /// to JetStream (NAK) so another process takes them at once.
    pub async fn run(self, shutdown: CancellationToken) {
        let tracker = TaskTracker::new();
        let abandon = CancellationToken::new();
        // Slots outlive the in-flight invocations that hold them.
        let slots_shutdown = CancellationToken::new();
        let mut slot_tasks = Vec::new();
        for slots in &self.slots {
            slot_tasks.push(tokio::spawn(
                slots.clone().lease_loop(slots_shutdown.clone()),
            ));
            slot_tasks.push(tokio::spawn(slots.clone().maintain(slots_shutdown.clone())));
        }
        let mut loops = Vec::new();
        let members_shutdown = CancellationToken::new();
        let members = self
            .triggers
            .iter()
            .any(|trigger| !trigger.partition_configs.is_empty())
            .then(|| members::start(self.shared.bus.clone(), members_shutdown.clone()));
        for trigger in &self.triggers {
            let mut consumers = vec![trigger.direct_consumer_config.clone()];
            if trigger.partition_configs.is_empty() {
                consumers.push(trigger.consumer_config.clone());
            }
            for config in consumers {
                if trigger.config.batch.is_some() {
                    loops.push(tokio::spawn(batch::batch_loop(
                        trigger.clone(),
                        self.shared.clone(),
                        config,
                        tracker.clone(),
                        shutdown.clone(),
                        abandon.clone(),
                    )));
                } else {
                    loops.push(tokio::spawn(pull_loop(
                        trigger.clone(),
                        self.shared.clone(),
                        config,
                        tracker.clone(),
                        shutdown.clone(),
                        abandon.clone(),
                    )));
                }
            }
            for index in 0..trigger.partition_configs.len() {
                let (members, _) = members.as_ref().expect("started for ordered triggers");
                loops.push(tokio::spawn(ordered::partition_loop(
                    trigger.clone(),
                    self.shared.clone(),
                    index,
                    members.clone(),
                    tracker.clone(),
                    shutdown.clone(),
                    abandon.clone(),
                )));
            }
            loops.push(tokio::spawn(retry_loop(
                trigger.clone(),
                self.shared.clone(),
                shutdown.clone(),
            )));
            loops.push(tokio::spawn(lag_loop(
                trigger.clone(),
                self.shared.clone(),
                shutdown.clone(),
            )));
        }
        shutdown.cancelled().await;
        for pull in loops {
            let _ = pull.await;
        }
        tracker.close();
        let in_flight = tracker.len();
        if in_flight > 0 {
            tracing::info!(
                in_flight,
                grace_ms = self.config.shutdown_grace.as_millis() as u64,
                "waiting for in-flight invocations"
            );
        }
        if tokio::time::timeout(self.config.shutdown_grace, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                abandoned = tracker.len(),
                "shutdown grace over, handing in-flight events back to jetstream"
            );
            abandon.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
        }
        // Leaving the members only now: partitions were released above.
        members_shutdown.cancel();
        if let Some((_, task)) = members {
            let _ = task.await;
        }
        slots_shutdown.cancel();
        for task in slot_tasks {
            let _ = task.await;
        }
        // Only now that nothing can lease or use a slot: give them all back, so other
        // processes need not wait out the lease timeout.
        for slots in &self.slots {
            slots.return_all().await;
        }
    }
}

/// Sleeps for a backoff that grows with consecutive failures; false if shut down.
async fn pause_after_failure(failures: u32, shutdown: &CancellationToken) -> bool {
    let pause = Duration::from_millis(100 * u64::from(failures.min(50)));
    tokio::select! {
        () = tokio::time::sleep(pause) => true,
        () = shutdown.cancelled() => false,
    }
}

fn log_failure(
    trigger: &TriggerRuntime,
    failures: u32,
    stage: &'static str,
    error: &dyn std::fmt::Display,
) {
    // Once, then at powers of two: a long outage is visible without flooding the log.
    if failures == 1 || failures.is_power_of_two() {
        tracing::warn!(trigger = %trigger.config.name, %error, failures, stage, "trigger consumer failing, retrying");
    }
}

/// Creates (or re-creates) a consumer, retrying until it works or shutdown.
async fn open_consumer(
    trigger: &TriggerRuntime,
    config: &pull::Config,
    shutdown: &CancellationToken,
) -> Option<jetstream::consumer::Consumer<pull::Config>> {
    let mut failures = 0;
    loop {
        match consumers::ensure(&trigger.stream, config, &trigger.positions).await {
            Ok(consumer) => return Some(consumer),
            Err(error) => {
                failures += 1;
                log_failure(trigger, failures, "create consumer", &error);
                if !pause_after_failure(failures, shutdown).await {
                    return None;
                }
            }
        }
    }
}

/// After consecutive failures: waits a growing pause and, from the third failure on,
/// creates the consumer again (it may have been deleted or lost with a server; creating
/// it is idempotent). False when shut down meanwhile.
async fn recover(
    trigger: &TriggerRuntime,
    config: &pull::Config,
    failures: u32,
    shutdown: &CancellationToken,
    consumer: &mut jetstream::consumer::Consumer<pull::Config>,
) -> bool {
    if !pause_after_failure(failures, shutdown).await {
        return false;
    }
    if failures >= 3 {
        match open_consumer(trigger, config, shutdown).await {
            Some(recreated) => *consumer = recreated,
            None => return false,
        }
    }
    true
}

/// Every 5 seconds: the trigger's lag and waiting retries (for `/v1/triggers` and
/// `/metrics`), and the ack floor of each of its consumers, recorded when it moved
/// (see [`consumers::Positions`]).
async fn lag_loop(trigger: Arc<TriggerRuntime>, shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(Duration::from_secs(5));
    let main_name = ConsumerRole::Main.name(&trigger.config.name);
    let retry_name = ConsumerRole::Retry.name(&trigger.config.name);
    let mut names = vec![
        main_name.clone(),
        ConsumerRole::Direct.name(&trigger.config.name),
        retry_name.clone(),
    ];
    names.extend(
        trigger
            .partition_configs
            .iter()
            .filter_map(|config| config.durable_name.clone()),
    );
    let mut recorded: HashMap<String, u64> = HashMap::new();
    let gauge = shared
        .metrics
        .consumer_lag
        .get_or_create(&TriggerOnlyLabels {
            trigger: trigger.config.name.clone(),
        })
        .clone();
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = shutdown.cancelled() => return,
        }
        for name in &names {
            let info = tokio::select! {
                info = trigger.stream.get_consumer::<pull::Config>(name) => info,
                () = shutdown.cancelled() => return,
            };
            let Ok(consumer) = info else { continue };
            let info = consumer.cached_info();
            if *name == main_name {
                trigger.lag.store(info.num_pending, Ordering::Relaxed);
                gauge.set(info.num_pending as i64);
            } else if *name == retry_name {
                trigger.retrying.store(
                    info.num_pending + info.num_ack_pending as u64,
                    Ordering::Relaxed,
                );
            }
            let ack_floor = info.ack_floor.stream_sequence;
            if ack_floor > 0 && recorded.get(name) != Some(&ack_floor) {
                match trigger.positions.record(name, ack_floor).await {
                    Ok(()) => {
                        recorded.insert(name.clone(), ack_floor);
                    }
                    Err(error) => {
                        tracing::debug!(consumer = %name, %error, "recording a consumer position failed");
                    }
                }
            }
        }
    }
}

/// Hands a delivery back to JetStream (NAK) without the function having been called
/// for it, recorded first so the next delivery does not count it as an attempt (see
/// [`delivery`]). If the record cannot be written the delivery still goes back; the
/// next one then counts it as unfinished.
async fn hand_back(
    trigger: &TriggerRuntime,
    shared: &Shared,
    message: &jetstream::Message,
    delay: Option<Duration>,
) {
    if let Ok(info) = message.info()
        && let Err(error) = shared
            .records
            .end_delivery(&trigger.config.name, info.stream_sequence, |_| {})
            .await
    {
        tracing::warn!(trigger = %trigger.config.name, sequence = info.stream_sequence, %error, stage = "hand_back", "recording a hand-back failed; the next delivery counts it as unfinished");
    }
    let _ = message.ack_with(AckKind::Nak(delay)).await;
}

/// Hands back a copy an ordered trigger held, with the attempts it made in place
/// during this delivery recorded, so a partition's next holder continues the count.
async fn hand_back_in_place(
    trigger: &TriggerRuntime,
    shared: &Shared,
    message: &jetstream::Message,
    in_place: &InPlace,
) {
    if in_place.attempts == 0 {
        return hand_back(trigger, shared, message, None).await;
    }
    if let Ok(info) = message.info()
        && let Err(error) = shared
            .records
            .end_delivery(&trigger.config.name, info.stream_sequence, |record| {
                record.attempts += in_place.attempts;
                if record.first_attempt_at.is_none() {
                    record
                        .first_attempt_at
                        .clone_from(&in_place.first_attempt_at);
                }
                if let Some(failure) = &in_place.last_failure {
                    record.last_status = failure.status;
                    record.last_error = Some(truncate(&failure.error, MAX_ERROR_BYTES));
                }
            })
            .await
    {
        tracing::warn!(trigger = %trigger.config.name, sequence = info.stream_sequence, %error, stage = "hand_back", "recording in-place attempts failed; the next holder counts this delivery as unfinished");
    }
    let _ = message.ack_with(AckKind::Nak(None)).await;
}

struct InFlight<'a> {
    trigger: &'a TriggerRuntime,
}

impl<'a> InFlight<'a> {
    fn start(trigger: &'a TriggerRuntime) -> Self {
        trigger.in_flight.fetch_add(1, Ordering::Relaxed);
        trigger.metrics.in_flight.inc();
        InFlight { trigger }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.trigger.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.trigger.metrics.in_flight.dec();
    }
}

/// Everything known about one delivery of an event to a trigger.
struct Delivery {
    /// 1-based number of this attempt, over every copy of the event.
    attempt: u64,
    /// Sequence of this copy (original, or a due retry) in the events stream.
    sequence: u64,
    /// Sequence of the original event.
    event_sequence: u64,
    received_at: time::OffsetDateTime,
    state: RetryState,
    /// Earlier deliveries of this copy that ended with no outcome and no record (the
    /// process died or hung): not attempts, but bounded by `retry.max_unfinished`.
    unfinished: u64,
    /// A dead letter an earlier delivery settled but could not store: its reason.
    pending_dead_letter: Option<String>,
    /// Attempts made in place during this very delivery (ordered triggers).
    in_place_attempts: u64,
}

impl Delivery {
    fn last_failure(&self) -> Option<Failure> {
        let error = self.state.last_error.clone()?;
        Some(Failure::new(self.state.last_status, error))
    }
}

/// Sends progress for `message` every `every` until dropped, so JetStream does not
/// redeliver an event that is still being handled.
async fn keep_in_progress(message: &jetstream::Message, every: Duration) {
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        ticker.tick().await;
        let _ = message.ack_with(AckKind::Progress).await;
    }
}

async fn handle_message(
    trigger: Arc<TriggerRuntime>,
    shared: Arc<Shared>,
    message: jetstream::Message,
    permits: Permits,
    shutdown: CancellationToken,
    abandon: CancellationToken,
) {
    let mut permits = permits;
    let _in_flight = InFlight::start(&trigger);
    let every = (trigger.config.ack_wait / 3).max(Duration::from_millis(100));
    if permits.trigger.is_none() {
        // An event of the direct consumer: take the trigger's permit now, asking the
        // main pull loop for one it holds idle if none is free.
        if let Ok(taken) = trigger.permits.clone().try_acquire_owned() {
            permits.trigger = Some(taken);
        } else {
            trigger.permit_wanted.notify_one();
        }
    }
    if permits.trigger.is_none() {
        tokio::select! {
            taken = trigger.permits.clone().acquire_owned() => permits.trigger = Some(taken.expect("never closed")),
            () = keep_in_progress(&message, every) => {}
            () = shutdown.cancelled() => {
                hand_back(&trigger, &shared, &message, None).await;
                return;
            }
        }
    }
    if permits.shared.is_none() {
        // The event of an idle trigger's pull: take the shared permits now.
        tokio::select! {
            taken = acquire_shared_permits(&trigger, &shared) => permits.shared = Some(taken),
            () = keep_in_progress(&message, every) => {}
            () = shutdown.cancelled() => {
                // Not started yet: hand it back at once for another process.
                hand_back(&trigger, &shared, &message, None).await;
                return;
            }
        }
    }
    let _permits = permits;
    tokio::select! {
        _ = handle(&trigger, &shared, &message, &abandon, None) => {}
        () = keep_in_progress(&message, every) => {}
    }
}

/// How a handled delivery ended, for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settled {
    /// Acknowledged, retried through the retry subject, dead-lettered or handed back.
    Done,
    /// Only with in-place retries (ordered triggers): the event is still held,
    /// unacknowledged; invoke it again after this delay.
    RetryIn(Duration),
}

/// The attempt history of an event retried in place (held by an ordered trigger,
/// never acknowledged in between), which its headers cannot carry.
#[derive(Debug, Default, Clone)]
struct InPlace {
    attempts: u64,
    first_attempt_at: Option<String>,
    last_failure: Option<Failure>,
}

/// Reads what is known of a delivery and settles, without invoking, what must not be
/// invoked: a malformed message, an event the filter refuses, an event out of attempts
/// or past its max age. Returns the event to invoke otherwise.
async fn prepare<'a>(
    trigger: &'a TriggerRuntime,
    shared: &'a Shared,
    message: &'a jetstream::Message,
    in_place: Option<&InPlace>,
) -> Option<(Handling<'a>, Event)> {
    let delivery = match message.info() {
        Ok(info) => {
            let mut state = RetryState::from_headers(message.headers.as_ref());
            let delivered = info.delivered.max(1) as u64;
            // Only a redelivered copy can have a record: the first delivery reads
            // nothing.
            // Whether earlier deliveries are known: without the record (it could not
            // be read) none of them is taken for an unfinished one.
            let mut record_known = true;
            let record = if delivered > 1 {
                shared
                    .records
                    .read(&trigger.config.name, info.stream_sequence)
                    .await
                    .unwrap_or_else(|error| {
                        tracing::warn!(trigger = %trigger.config.name, sequence = info.stream_sequence, %error, stage = "dispatch", "reading the delivery record failed; attempts may be undercounted");
                        record_known = false;
                        delivery::DeliveryRecord::default()
                    })
            } else {
                delivery::DeliveryRecord::default()
            };
            if state.first_attempt_at.is_none() {
                state.first_attempt_at.clone_from(&record.first_attempt_at);
            }
            if record.last_error.is_some() {
                state.last_status = record.last_status;
                state.last_error.clone_from(&record.last_error);
            }
            let mut earlier = record.attempts;
            let mut in_place_attempts = 0;
            if let Some(held) = in_place {
                in_place_attempts = held.attempts;
                earlier += held.attempts;
                if held.first_attempt_at.is_some() {
                    state.first_attempt_at.clone_from(&held.first_attempt_at);
                }
                if let Some(failure) = &held.last_failure {
                    state.last_status = failure.status;
                    state.last_error = Some(failure.error.clone());
                }
            }
            Delivery {
                // Invocations on record (the copy's headers, this copy's delivery
                // record, in-place retries) plus this one: hand-backs never count.
                attempt: state.attempts + earlier + 1,
                // Ordered triggers hold queued events delivered but not invoked: a
                // crash ends those deliveries too, so they are not counted there.
                unfinished: if record_known && in_place.is_none() {
                    (delivered - 1).saturating_sub(record.ended)
                } else {
                    0
                },
                pending_dead_letter: record.dead_letter,
                in_place_attempts,
                sequence: info.stream_sequence,
                event_sequence: state.event_sequence.unwrap_or(info.stream_sequence),
                received_at: state
                    .received_at
                    .as_deref()
                    .and_then(parse_rfc3339)
                    .unwrap_or(info.published),
                state,
            }
        }
        Err(error) => {
            tracing::error!(trigger = %trigger.config.name, %error, stage = "dispatch", "message without jetstream metadata, handing back");
            let _ = message
                .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                .await;
            return None;
        }
    };
    let handling = Handling {
        trigger,
        shared,
        message,
        delivery,
        invoked: std::sync::atomic::AtomicBool::new(false),
        confirm_acks: in_place.is_some(),
    };
    let delivery = &handling.delivery;
    let event = match event_from_message(message.headers.as_ref(), message.payload.clone()) {
        Ok(event) => event,
        Err(error) => {
            let failure = Failure::new(None, format!("not a valid cloudevent: {error}"));
            handling.dead_letter_raw(&failure).await;
            return None;
        }
    };
    let direct = message.subject.as_str() == trigger.direct_subject;
    if !direct && !trigger.config.filter.matches(&event) {
        trigger.metrics.filtered.inc();
        let _ = message.ack().await;
        return None;
    }
    let policy = &trigger.config.retry;
    if let Some(reason) = &delivery.pending_dead_letter {
        // An earlier delivery settled it as a dead letter but could not store it (or
        // publish it to `on_failure`): store it now, without invoking again.
        let failure = delivery
            .last_failure()
            .unwrap_or_else(|| Failure::new(None, "dead-lettered by an earlier delivery"));
        let reason = reason.clone();
        let attempts = delivery.attempt - 1;
        handling
            .dead_letter(event, &reason, attempts, &failure, None)
            .await;
        return None;
    }
    if delivery.unfinished >= u64::from(policy.max_unfinished.max(1)) {
        // A poison event: every process that took it died or hung before an outcome.
        let failure = Failure::new(
            None,
            format!(
                "delivered {} times without an outcome: the process handling it stopped or hung each time{}",
                delivery.unfinished,
                delivery
                    .last_failure()
                    .map(|failure| format!(" (last recorded failure: {})", failure.error))
                    .unwrap_or_default()
            ),
        );
        let attempts = delivery.attempt - 1;
        handling
            .dead_letter(event, REASON_UNPROCESSABLE, attempts, &failure, None)
            .await;
        return None;
    }
    // Only when an earlier attempt's failure is on record.
    if delivery.attempt > policy.max_attempts() && delivery.state.last_error.is_some() {
        // Only reachable when an earlier delivery could not settle the event (its
        // dead letter or retry could not be stored): settle it now, without invoking.
        let failure = delivery
            .last_failure()
            .unwrap_or_else(|| Failure::new(None, "attempts exhausted"));
        let attempts = delivery.attempt - 1;
        handling
            .dead_letter(event, REASON_ATTEMPTS_EXHAUSTED, attempts, &failure, None)
            .await;
        return None;
    }
    if let Some(max_age) = policy.max_age {
        let age =
            (time::OffsetDateTime::now_utc() - delivery.received_at).max(time::Duration::ZERO);
        if age > max_age {
            let failure = delivery.last_failure().unwrap_or_else(|| {
                Failure::new(
                    None,
                    format!(
                        "event is {}s old, older than max_age {}s",
                        age.whole_seconds(),
                        max_age.as_secs()
                    ),
                )
            });
            let attempts = delivery.attempt - 1;
            handling
                .dead_letter(event, REASON_MAX_AGE_EXCEEDED, attempts, &failure, None)
                .await;
            return None;
        }
    }
    Some((handling, event))
}

/// Invokes `invocation` bounded by `timeout` (plus a second, should a target ignore
/// its own timeout); `None` when abandoned at shutdown.
async fn bounded<T>(
    invocation: impl std::future::Future<Output = T>,
    timeout: Duration,
    timed_out: impl FnOnce(Failure) -> T,
    abandon: &CancellationToken,
) -> Option<T> {
    let guard = tokio::time::sleep(timeout + Duration::from_secs(1));
    tokio::select! {
        outcome = invocation => Some(outcome),
        () = guard => Some(timed_out(Failure::new(
            None,
            format!("invocation timed out after {}ms", timeout.as_millis()),
        ))),
        () = abandon.cancelled() => None,
    }
}

async fn handle(
    trigger: &TriggerRuntime,
    shared: &Shared,
    message: &jetstream::Message,
    abandon: &CancellationToken,
    in_place: Option<&mut InPlace>,
) -> Settled {
    let Some((handling, event)) = prepare(trigger, shared, message, in_place.as_deref()).await
    else {
        return Settled::Done;
    };
    let timeout = trigger.config.timeout.unwrap_or(trigger.function.timeout);
    trigger.metrics.dispatched.inc();
    tracing::debug!(event_id = %event.id, trigger = %trigger.config.name, function = %trigger.function.name, attempt = handling.delivery.attempt, "invoking function");
    let attempt_started_at = time::OffsetDateTime::now_utc();
    let started = Instant::now();
    let invocation = async {
        match &trigger.destinations.enricher {
            None => trigger.function.target.invoke(&event, timeout).await,
            Some(enricher) => {
                let mut enriched = event.clone();
                if let Err(failure) = enricher.enrich(&mut enriched).await {
                    return Outcome::RetryLater {
                        not_before: None,
                        failure,
                    };
                }
                trigger.function.target.invoke(&enriched, timeout).await
            }
        }
    };
    handling.invoking();
    let Some(outcome) = bounded(
        invocation,
        timeout,
        |failure| Outcome::RetryLater {
            not_before: None,
            failure,
        },
        abandon,
    )
    .await
    else {
        // Called, outcome unknown: recorded as an attempt.
        let failure = Failure::new(None, "invocation abandoned at shutdown (grace period over)");
        handling
            .hand_back_recorded(
                None,
                Some(&failure),
                Some(&rfc3339(attempt_started_at)),
                None,
            )
            .await;
        return Settled::Done;
    };
    trigger
        .metrics
        .duration
        .observe(started.elapsed().as_secs_f64());
    let outcome = match outcome {
        Outcome::Delivered {
            reply: Some(reply), ..
        } if trigger.config.publish_replies => {
            match shared
                .bus
                .publish_events(std::slice::from_ref(&reply))
                .await
            {
                Ok(receipts) => {
                    if receipts.first().is_some_and(|receipt| receipt.duplicate) {
                        // The stream already holds an event with this source and id
                        // (a function reusing ids, or this reply published before a
                        // crash): not stored again. Counted, not silent.
                        shared
                            .metrics
                            .replies_deduplicated
                            .get_or_create(&TriggerOnlyLabels {
                                trigger: trigger.config.name.clone(),
                            })
                            .inc();
                        tracing::warn!(event_id = %event.id, trigger = %trigger.config.name, reply_id = %reply.id, reply_source = %reply.source, "the function's reply has the source and id of an event already stored; not stored again");
                    }
                    Outcome::Delivered {
                        reply: Some(reply),
                        answer: None,
                    }
                }
                Err(PublishError::Unavailable(error)) => Outcome::RetryLater {
                    not_before: None,
                    failure: Failure::new(
                        None,
                        format!("publishing the function's reply failed: {error}"),
                    ),
                },
                Err(error) => Outcome::Rejected {
                    failure: Failure::new(
                        None,
                        format!("the function's reply cannot be published: {error}"),
                    ),
                },
            }
        }
        other => other,
    };
    handling
        .settle(event, outcome, attempt_started_at, in_place)
        .await
}

/// One delivery being handled: what every step that settles it needs.
struct Handling<'a> {
    trigger: &'a TriggerRuntime,
    shared: &'a Shared,
    message: &'a jetstream::Message,
    delivery: Delivery,
    /// Whether this delivery called the function (set just before the call).
    invoked: std::sync::atomic::AtomicBool,
    /// Acks and terms wait for the server's confirmation (ordered triggers: the next
    /// event of the key starts only once this one is surely settled).
    confirm_acks: bool,
}

impl Handling<'_> {
    /// Acknowledges (or terminates) this copy. With `confirm_acks`, waits for the
    /// server's confirmation, trying three times; false if it never came.
    async fn acknowledge(&self, kind: AckKind) -> bool {
        if !self.confirm_acks {
            return match self.message.ack_with(kind).await {
                Ok(()) => true,
                Err(error) => {
                    tracing::warn!(trigger = %self.trigger.config.name, %error, stage = "ack", "acknowledging failed; the event may be delivered again");
                    false
                }
            };
        }
        for attempt in 1..=3u64 {
            match self.message.double_ack_with(kind).await {
                Ok(()) => return true,
                Err(error) => {
                    tracing::warn!(trigger = %self.trigger.config.name, %error, attempt, stage = "ack", "the server did not confirm an acknowledgement");
                    tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                }
            }
        }
        false
    }

    /// Marks that this delivery calls the function.
    fn invoking(&self) {
        self.invoked.store(true, Ordering::Relaxed);
    }

    /// Hands this copy back to JetStream with `delay`, recording first what this
    /// delivery did (see [`delivery`]): an invocation when it made one, with `failure`
    /// and `first_attempt_at`, and a dead letter's reason when its outcome was one.
    async fn hand_back_recorded(
        &self,
        delay: Option<Duration>,
        failure: Option<&Failure>,
        first_attempt_at: Option<&str>,
        dead_letter: Option<&str>,
    ) {
        let attempts =
            self.delivery.in_place_attempts + u64::from(self.invoked.load(Ordering::Relaxed));
        let recorded = self
            .shared
            .records
            .end_delivery(
                &self.trigger.config.name,
                self.delivery.sequence,
                |record| {
                    record.attempts += attempts;
                    if record.first_attempt_at.is_none() {
                        record.first_attempt_at = first_attempt_at.map(str::to_owned);
                    }
                    if let Some(failure) = failure {
                        record.last_status = failure.status;
                        record.last_error = Some(truncate(&failure.error, MAX_ERROR_BYTES));
                    }
                    if let Some(reason) = dead_letter {
                        record.dead_letter = Some(reason.to_owned());
                    }
                },
            )
            .await;
        if let Err(error) = recorded {
            tracing::warn!(trigger = %self.trigger.config.name, sequence = self.delivery.sequence, %error, stage = "hand_back", "recording the delivery failed; the next delivery counts it as unfinished");
        }
        let _ = self.message.ack_with(AckKind::Nak(delay)).await;
    }

    /// Settles an attempt by its outcome: acknowledge, retry (through the retry
    /// subject, or in place when `in_place` is given), or dead-letter.
    async fn settle(
        &self,
        event: Event,
        outcome: Outcome,
        attempt_started_at: time::OffsetDateTime,
        in_place: Option<&mut InPlace>,
    ) -> Settled {
        let (trigger, shared, delivery) = (self.trigger, self.shared, &self.delivery);
        let policy = &trigger.config.retry;
        let first_attempt_at = delivery
            .state
            .first_attempt_at
            .clone()
            .unwrap_or_else(|| rfc3339(attempt_started_at));
        let outcome = match (outcome, &trigger.destinations.on_success) {
            (Outcome::Delivered { reply, answer }, Some(destination)) => {
                let record =
                    reply.map_or_else(|| self.result_event(&event, answer), |reply| *reply);
                let id = vec![(
                    "Nats-Msg-Id".to_owned(),
                    format!("result {} {}", trigger.config.name, delivery.sequence),
                )];
                match destination.publish(&record, &id).await {
                    Ok(()) => Outcome::delivered(),
                    // Like a failed invocation: retried, so the function may run again.
                    Err(error) => Outcome::RetryLater {
                        not_before: None,
                        failure: Failure::new(
                            None,
                            format!(
                                "publishing the result to {} failed: {error}",
                                destination.describe()
                            ),
                        ),
                    },
                }
            }
            (outcome, _) => outcome,
        };
        match outcome {
            Outcome::Delivered { .. } => {
                trigger.function.limit.record_success();
                trigger.metrics.succeeded.inc();
                if !self.acknowledge(AckKind::Ack).await && in_place.is_some() {
                    // Not surely acknowledged: the key's next event must not start
                    // (this one could come back after it). Held and tried again: at
                    // least once, in order.
                    return Settled::RetryIn(Duration::from_secs(1));
                }
            }
            Outcome::RetryLater {
                not_before,
                failure,
            } => {
                if failure.overloaded {
                    trigger.function.limit.decrease();
                }
                trigger
                    .metrics
                    .function_limit
                    .set(trigger.function.limit.limit() as i64);
                if delivery.attempt >= policy.max_attempts() {
                    let attempts = delivery.attempt;
                    self.dead_letter(
                        event,
                        REASON_ATTEMPTS_EXHAUSTED,
                        attempts,
                        &failure,
                        Some(first_attempt_at),
                    )
                    .await;
                    return Settled::Done;
                }
                // A retry copy lives in the events stream: a wait longer than the
                // stream keeps messages (a huge Retry-After) would let the stream
                // delete it.
                let longest_wait = shared.bus.events_max_age() / 2;
                let mut delay = policy
                    .delay(delivery.attempt)
                    .max(not_before.unwrap_or_default())
                    .min(longest_wait);
                if let Some(max_age) = policy.max_age {
                    // Come back no later than when the event expires, to dead-letter
                    // it then.
                    let remaining = (delivery.received_at + max_age
                        - time::OffsetDateTime::now_utc())
                    .max(time::Duration::ZERO);
                    delay = delay.min(
                        Duration::try_from(remaining).unwrap_or_default()
                            + Duration::from_millis(10),
                    );
                }
                trigger.metrics.retried.inc();
                tracing::info!(
                    event_id = %event.id, trigger = %trigger.config.name, function = %trigger.function.name,
                    attempt = delivery.attempt, status = failure.status, error = %failure.error, delay_ms = delay.as_millis() as u64,
                    "invocation failed, retrying later"
                );
                if let Some(held) = in_place {
                    // Held in place: the key's later events wait behind it.
                    held.attempts += 1;
                    held.first_attempt_at = Some(first_attempt_at);
                    held.last_failure = Some(failure);
                    return Settled::RetryIn(delay);
                }
                self.schedule_retry(&event, &failure, first_attempt_at, delay)
                    .await;
            }
            Outcome::Rejected { failure } => {
                trigger.metrics.rejected.inc();
                let attempts = delivery.attempt;
                self.dead_letter(
                    event,
                    REASON_REJECTED,
                    attempts,
                    &failure,
                    Some(first_attempt_at),
                )
                .await;
            }
        }
        Settled::Done
    }

    /// The success record of a function that did not answer with a CloudEvent: its
    /// answer (possibly empty) as the data of a `dev.switchyard.function.result` event
    /// that names the event it answered.
    fn result_event(&self, event: &Event, answer: Option<Box<FunctionAnswer>>) -> Event {
        let mut result = Event::new(
            event.id.clone(),
            format!("/switchyard/triggers/{}", self.trigger.config.name),
            "dev.switchyard.function.result",
        );
        result.subject.clone_from(&event.subject);
        result.time = Some(now_rfc3339());
        if let Some(answer) = answer {
            result.data = answer.body;
            result.datacontenttype = answer.content_type;
        }
        result
            .extensions
            .insert("originsource".to_owned(), event.source.clone());
        result
            .extensions
            .insert("origintype".to_owned(), event.ty.clone());
        if let Some(key) = event.extensions.get("partitionkey") {
            result
                .extensions
                .insert("partitionkey".to_owned(), key.clone());
        }
        result
    }

    /// Stores a copy of the event with its attempt history on the trigger's retry
    /// subject, due after `delay`, then acknowledges this copy. If the copy cannot be
    /// stored, this copy is NAKed with the delay instead, so the event stays in
    /// JetStream either way.
    async fn schedule_retry(
        &self,
        event: &Event,
        failure: &Failure,
        first_attempt_at: String,
        delay: Duration,
    ) {
        let (trigger, delivery) = (self.trigger, &self.delivery);
        let due = time::OffsetDateTime::now_utc() + delay;
        let state = RetryState {
            attempts: delivery.attempt,
            first_attempt_at: Some(first_attempt_at),
            received_at: Some(rfc3339(delivery.received_at)),
            last_status: failure.status,
            last_error: Some(truncate(&failure.error, MAX_ERROR_BYTES)),
            event_sequence: Some(delivery.event_sequence),
            retry_at_unix_ms: Some((due.unix_timestamp_nanos() / 1_000_000) as i64),
        };
        let mut headers: HeaderMap = event_headers(
            event,
            &format!("retry {} {}", trigger.config.name, delivery.sequence),
        );
        state.write_headers(&mut headers);
        let stored = self
            .shared
            .bus
            .store(trigger.retry_subject.clone(), headers, event.data.clone())
            .await;
        match stored {
            Ok(_) => {
                if let Err(error) = self.message.ack().await {
                    tracing::warn!(event_id = %event.id, %error, stage = "ack", "acknowledging a scheduled retry failed; the event may be attempted again");
                }
            }
            Err(error) => {
                tracing::warn!(event_id = %event.id, trigger = %trigger.config.name, %error, stage = "retry", "storing the retry failed, holding the event on the trigger instead");
                let first_attempt_at = state.first_attempt_at.as_deref();
                self.hand_back_recorded(Some(delay), Some(failure), first_attempt_at, None)
                    .await;
            }
        }
    }

    /// Stores the event in the dead-letter stream, then terminates it on the trigger's
    /// consumer. `first_attempt_at` defaults to the one on record.
    async fn dead_letter(
        &self,
        event: Event,
        reason: &str,
        attempts: u64,
        failure: &Failure,
        first_attempt_at: Option<String>,
    ) {
        let (trigger, delivery) = (self.trigger, &self.delivery);
        let event_id = event.id.clone();
        let dead_letter = DeadLetter {
            event,
            reason: reason.to_owned(),
            trigger: trigger.config.name.clone(),
            function: trigger.function.name.clone(),
            attempts,
            last_status: failure.status,
            last_error: truncate(&failure.error, MAX_ERROR_BYTES),
            first_attempt_at: first_attempt_at.or_else(|| delivery.state.first_attempt_at.clone()),
            last_attempt_at: now_rfc3339(),
            received_at: rfc3339(delivery.received_at),
            event_sequence: delivery.sequence,
        };
        let (headers, payload) = dead_letter.to_message_within(self.shared.bus.max_payload());
        if !self
            .store_dead_letter(headers, payload, Some(&dead_letter))
            .await
        {
            return;
        }
        self.shared
            .metrics
            .events_dead_lettered
            .get_or_create(&DeadLetterLabels {
                trigger: trigger.config.name.clone(),
                function: trigger.function.name.clone(),
                reason: reason.to_owned(),
            })
            .inc();
        tracing::warn!(
            event_id = %event_id, trigger = %trigger.config.name, function = %trigger.function.name,
            attempt = delivery.attempt, reason, status = failure.status, error = %failure.error,
            "event dead-lettered"
        );
    }

    /// Dead-letters a message that is not a valid CloudEvent, headers and payload as
    /// they were (less NATS control headers), with the reason.
    async fn dead_letter_raw(&self, failure: &Failure) {
        let (trigger, sequence) = (self.trigger, self.delivery.sequence);
        let mut headers = HeaderMap::new();
        if let Some(original) = &self.message.headers {
            for (name, values) in original.iter() {
                let name_text = std::str::from_utf8(name.as_ref()).unwrap_or_default();
                if name_text.to_ascii_lowercase().starts_with("nats-") {
                    continue;
                }
                for value in values {
                    headers.append(name.clone(), value.clone());
                }
            }
        }
        headers.insert(
            "Nats-Msg-Id",
            format!("dlq {} {sequence}", trigger.config.name),
        );
        headers.insert("Switchyard-Dlq-Reason", REASON_MALFORMED);
        headers.insert("Switchyard-Dlq-Trigger", trigger.config.name.as_str());
        headers.insert("Switchyard-Dlq-Function", trigger.function.name.as_str());
        headers.insert(
            "Switchyard-Dlq-Last-Error",
            switchyard_event::encode_header_value(&truncate(&failure.error, MAX_ERROR_BYTES))
                .as_ref(),
        );
        headers.insert("Switchyard-Dlq-Event-Sequence", sequence.to_string());
        let mut payload = self.message.payload.clone();
        if switchyard_bus::limits::header_block_bytes(&headers) + payload.len()
            > self.shared.bus.max_payload()
            || switchyard_bus::limits::check_message("", &headers).is_err()
        {
            // The original headers do not fit beside the record: keep the record and
            // the payload (cut to what fits), say what was left out.
            let dropped = self
                .message
                .headers
                .as_ref()
                .map_or(0, |headers| headers.len());
            let mut record = HeaderMap::new();
            for name in [
                "Nats-Msg-Id",
                "Switchyard-Dlq-Reason",
                "Switchyard-Dlq-Trigger",
                "Switchyard-Dlq-Function",
                "Switchyard-Dlq-Last-Error",
                "Switchyard-Dlq-Event-Sequence",
            ] {
                if let Some(value) = headers.get(name) {
                    record.insert(name, value.clone());
                }
            }
            record.insert("Switchyard-Dlq-Headers-Dropped", dropped.to_string());
            let room = self
                .shared
                .bus
                .max_payload()
                .saturating_sub(switchyard_bus::limits::header_block_bytes(&record));
            payload.truncate(room);
            headers = record;
        }
        if self.store_dead_letter(headers, payload, None).await {
            tracing::error!(trigger = %trigger.config.name, sequence, error = %failure.error, "malformed message dead-lettered");
        }
    }

    /// Stores a dead letter, then terminates this copy. If the store fails, the copy is
    /// handed back instead, so the event is always in one of the two streams. True when
    /// stored.
    async fn store_dead_letter(
        &self,
        headers: HeaderMap,
        payload: bytes::Bytes,
        record: Option<&DeadLetter>,
    ) -> bool {
        let subject = self
            .shared
            .bus
            .subjects()
            .dead_letter(&self.trigger.config.name);
        match self.shared.bus.store(subject, headers, payload).await {
            Ok(_) => {
                if let (Some(destination), Some(record)) =
                    (&self.trigger.destinations.on_failure, record)
                    && let Err(error) = destination
                        .publish(&record.event, &record.record_headers())
                        .await
                {
                    // Stored, but not yet where it should also go: hand the event
                    // back with its outcome recorded; the next delivery dead-letters
                    // it again without invoking (the stored copy is deduplicated)
                    // and publishes again.
                    tracing::error!(trigger = %self.trigger.config.name, destination = %destination.describe(), %error, stage = "dead_letter", "publishing the dead letter to its destination failed, retrying");
                    self.hand_back_dead_letter(record).await;
                    return false;
                }
                if !self.acknowledge(AckKind::Term).await
                    && self.confirm_acks
                    && let Some(record) = record
                {
                    // If it comes back, it is dead-lettered again without invoking.
                    self.hand_back_dead_letter(record).await;
                }
                true
            }
            Err(error) => {
                tracing::error!(trigger = %self.trigger.config.name, %error, stage = "dead_letter", "storing the dead letter failed, handing the event back");
                match record {
                    Some(record) => self.hand_back_dead_letter(record).await,
                    // A malformed message: the next delivery dead-letters it again.
                    None => {
                        self.hand_back_recorded(Some(Duration::from_secs(5)), None, None, None)
                            .await;
                    }
                }
                false
            }
        }
    }

    /// Hands the copy back with its dead letter recorded, so the next delivery stores
    /// (and publishes) it without calling the function again.
    async fn hand_back_dead_letter(&self, record: &DeadLetter) {
        let failure = Failure::new(record.last_status, record.last_error.clone());
        self.hand_back_recorded(
            Some(Duration::from_secs(5)),
            Some(&failure),
            record.first_attempt_at.as_deref(),
            Some(&record.reason),
        )
        .await;
    }
}
