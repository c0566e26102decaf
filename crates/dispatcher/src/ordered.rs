//! Ordered triggers (`ordering = "key"`): events that share a `partitionkey` are
//! delivered one at a time, in the order the bus stored them; different keys run in
//! parallel up to the trigger's `max_concurrency`.
//!
//! The key space is split into the trigger's `partitions`: every event's subject
//! carries its key bucket (see the bus's subject scheme), and partition `i` is a
//! durable consumer over the buckets `b` with `b % partitions == i`. Each partition
//! consumer has a pinned priority group, so JetStream hands it to one dispatcher
//! process at a time and moves it to another when that process stops pulling; the
//! partitions spread over the processes.
//!
//! Inside the process that holds a partition, events wait in one queue per key,
//! sorted by stream sequence, unacknowledged (with progress acks). Only a key's head
//! is invoked. A failed head is retried in place after its backoff: it stays
//! unacknowledged at the head, so the key's later events wait behind it while other
//! keys keep flowing; once it is delivered or dead-lettered the key moves on.
//!
//! Taking a partition over: the previous holder may still hold events (it is finishing,
//! or it died and JetStream will redeliver them after `ack_wait`). The new holder
//! queues what it receives but invokes nothing until the consumer's acknowledgement-
//! pending count is all its own, so a redelivered earlier event is never passed by a
//! later one of the same key.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt as _, StreamExt};
use switchyard_bus::async_nats::jetstream::{self, AckKind, consumer::pull};
use switchyard_event::decode_header_value;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tokio_util::time::DelayQueue;

use crate::consumers::open_consumer;
use crate::invoke::{InFlight, handle, keep_in_progress};
use crate::members::Members;
use crate::permits::acquire_permits;
use crate::settle::{InPlace, Settled};
use crate::{PULL_EXPIRES, Shared, TriggerRuntime, consumer_backoff, log_failure};

/// How soon the head of a key is tried again after its invocation panicked.
const PANIC_RETRY: Duration = Duration::from_secs(1);

/// The priority group every process pulls a partition consumer with.
pub const OWNER_GROUP: &str = "owner";
/// How long a partition stays with a process that stopped pulling.
pub const OWNER_TIMEOUT: Duration = Duration::from_secs(10);

/// An event held by its key's queue.
struct Held {
    message: jetstream::Message,
    sequence: u64,
    in_place: InPlace,
}

/// The ordering key of a message: its `partitionkey`, else its id.
fn key_of(message: &jetstream::Message) -> String {
    let header = |name: &str| {
        message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(name))
            .map(|value| decode_header_value(name, value.as_str()).unwrap_or_default())
    };
    header("ce-partitionkey")
        .map(|key| format!("k:{key}"))
        .or_else(|| header("ce-id").map(|id| format!("i:{id}")))
        .unwrap_or_default()
}

/// Runs one partition of an ordered trigger until `shutdown`: holds it while this
/// process is its preferred member, and lets it go when another one is.
pub(crate) async fn partition_loop(
    trigger: Arc<TriggerRuntime>,
    shared: Arc<Shared>,
    index: usize,
    members: Members,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    abandon: CancellationToken,
) {
    let mut live = members.live.clone();
    // Decide once the members are known (or after a few seconds without), and a
    // heartbeat later, so processes started together see each other before taking
    // partitions rather than handing them over right after.
    let _ = tokio::time::timeout(
        crate::members::HEARTBEAT * 3,
        live.wait_for(Option::is_some),
    )
    .await;
    tokio::select! {
        () = tokio::time::sleep(crate::members::HEARTBEAT + crate::members::HEARTBEAT / 2) => {}
        () = shutdown.cancelled() => return,
    }
    loop {
        while !members.prefers_me(&trigger.config.name, index) {
            tokio::select! {
                changed = live.changed() => if changed.is_err() { return },
                () = shutdown.cancelled() => return,
            }
        }
        hold_partition(
            &trigger, &shared, index, &members, &tracker, &shutdown, &abandon,
        )
        .await;
        // Superseded: this form no longer pulls (a reload here starts new loops).
        if shutdown.is_cancelled() || trigger.superseded.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
    }
}

/// Consumes one partition until `shutdown` or until another member is preferred.
async fn hold_partition(
    trigger: &Arc<TriggerRuntime>,
    shared: &Arc<Shared>,
    index: usize,
    members: &Members,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
    abandon: &CancellationToken,
) {
    let mut live = members.live.clone();
    let mut live_open = true;
    let config: pull::Config = trigger.partition_configs[index].clone();
    let name = config.durable_name.clone().unwrap_or_default();
    let Some(consumer) = open_consumer(trigger, &config, shutdown).await else {
        return;
    };
    let every = (trigger.config.ack_wait / 3).max(Duration::from_millis(100));
    let mut queues: HashMap<String, VecDeque<Held>> = HashMap::new();
    let mut ready: VecDeque<String> = VecDeque::new();
    // The key of each running invocation, with its event's sequence.
    let mut running: HashMap<String, u64> = HashMap::new();
    let mut waiting: DelayQueue<String> = DelayQueue::new();
    // Each finished invocation names its key and the stream sequence of the event it
    // handled: a redelivered copy of an earlier event can be queued before it meanwhile.
    let mut invocations: JoinSet<(String, u64, Settled, InPlace)> = JoinSet::new();
    let mut held: usize = 0;
    // Nothing is invoked until events held by an earlier holder are settled.
    let mut settled_handover = false;
    let mut owner_pin: Option<String> = None;
    let mut progress = tokio::time::interval(every);
    let mut handover_check = tokio::time::interval(Duration::from_millis(250));
    let mut failures = consumer_backoff();
    'consuming: loop {
        if failures.failing() && !failures.pause(shutdown.cancelled()).await {
            break;
        }
        let stream = consumer
            .stream()
            .group(OWNER_GROUP)
            .max_messages_per_batch(64)
            .expires(PULL_EXPIRES * 5)
            .heartbeat(PULL_EXPIRES * 2)
            .messages()
            .await;
        let mut messages = match stream {
            Ok(messages) => messages,
            Err(error) => {
                failures.failed();
                log_failure(trigger, &failures, "ordered pull", &error);
                continue;
            }
        };
        loop {
            // Superseded by a newer form of the trigger in another process (an
            // invocation found an event this form does not take): give the partition
            // up; what waits here is handed back.
            if trigger.superseded.load(std::sync::atomic::Ordering::SeqCst) {
                break 'consuming;
            }
            let can_start = settled_handover && !ready.is_empty();
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break 'consuming,
                Some(finished) = invocations.join_next(), if !invocations.is_empty() => {
                    let Ok((key, sequence, settled, in_place)) = finished else { continue };
                    running.remove(&key);
                    let queue = queues.get_mut(&key).expect("a running key has a queue");
                    let position = queue.iter().position(|held| held.sequence == sequence);
                    match settled {
                        Settled::Done => {
                            if let Some(position) = position {
                                queue.remove(position);
                                held -= 1;
                            }
                            if queue.is_empty() {
                                queues.remove(&key);
                            } else {
                                ready.push_back(key);
                            }
                        }
                        Settled::RetryIn(delay) => {
                            if let Some(position) = position {
                                queue[position].in_place = in_place;
                            }
                            waiting.insert(key, delay);
                        }
                    }
                }
                Some(expired) = std::future::poll_fn(|context| waiting.poll_expired(context)), if !waiting.is_empty() => {
                    ready.push_back(expired.into_inner());
                }
                changed = live.changed(), if live_open => {
                    if changed.is_err() {
                        live_open = false;
                    } else if !members.prefers_me(&trigger.config.name, index) {
                        break 'consuming;
                    }
                }
                permits = acquire_permits(trigger, shared, true), if can_start => {
                    let Some(key) = ready.pop_front() else { continue };
                    let Some(head) = queues.get(&key).and_then(VecDeque::front) else { continue };
                    let (message, mut in_place) = (head.message.clone(), head.in_place.clone());
                    let sequence = head.sequence;
                    running.insert(key.clone(), sequence);
                    let (trigger, shared) = (trigger.clone(), shared.clone());
                    let (shutdown, abandon) = (shutdown.clone(), abandon.clone());
                    let (panicked_key, in_place_before) = (key.clone(), in_place.clone());
                    let trigger_name = trigger.config.name.clone();
                    let invocation = async move {
                        let _permits = permits;
                        let _in_flight = InFlight::start(&trigger);
                        let settled = tokio::select! {
                            settled = handle(&trigger, &shared, &message, &abandon, Some(&mut in_place)) => settled,
                            () = keep_in_progress(&message, every) => Settled::Done,
                        };
                        if settled != Settled::Done && shutdown.is_cancelled() {
                            // Nobody waits for this answer any more: hand it back,
                            // its in-place attempts recorded for the next holder.
                            crate::settle::hand_back_in_place(&trigger, &shared, &message, &in_place).await;
                        }
                        (key, sequence, settled, in_place)
                    };
                    invocations.spawn(tracker.track_future(async move {
                        // A panic must not leave its key marked running forever (its
                        // later events would never run): the head is tried again.
                        match std::panic::AssertUnwindSafe(invocation).catch_unwind().await {
                            Ok(finished) => finished,
                            Err(_) => {
                                // Counted as a failed attempt: an event that always
                                // panics ends in the dead-letter stream.
                                tracing::error!(trigger = %trigger_name, key = %panicked_key, stage = "dispatch", "an invocation panicked; its event is tried again");
                                let mut in_place = in_place_before;
                                in_place.attempts += 1;
                                if in_place.first_attempt_at.is_none() {
                                    in_place.first_attempt_at =
                                        Some(switchyard_event::timestamp::now_rfc3339());
                                }
                                in_place.last_failure = Some(switchyard_event::Failure::new(
                                    None,
                                    "the invocation panicked",
                                ));
                                (panicked_key, sequence, Settled::RetryIn(PANIC_RETRY), in_place)
                            }
                        }
                    }));
                }
                message = messages.next() => {
                    let message = match message {
                        Some(Ok(message)) => message,
                        Some(Err(error)) => {
                            failures.failed();
                            log_failure(trigger, &failures, "ordered receive", &error);
                            continue 'consuming;
                        }
                        None => {
                            failures.failed();
                            continue 'consuming;
                        }
                    };
                    failures.succeeded();
                    let Ok(info) = message.info() else {
                        // Without its stream sequence it cannot be queued in order:
                        // hand it back rather than drop it.
                        let _ = message
                            .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                            .await;
                        continue;
                    };
                    let sequence = info.stream_sequence;
                    let pin = message
                        .headers
                        .as_ref()
                        .and_then(|headers| headers.get("Nats-Pin-Id"))
                        .map(|value| value.as_str().to_owned());
                    if pin.is_some() && pin != owner_pin {
                        // (Re)gained the partition: wait out an earlier holder again.
                        owner_pin = pin;
                        settled_handover = false;
                    }
                    let key = key_of(&message);
                    let queue = queues.entry(key.clone()).or_default();
                    match queue.binary_search_by_key(&sequence, |held| held.sequence) {
                        // A redelivery of an event already held: keep the newer handle.
                        Ok(position) => queue[position].message = message,
                        Err(position) => {
                            let was_empty = queue.is_empty();
                            queue.insert(position, Held { message, sequence, in_place: InPlace::default() });
                            held += 1;
                            if was_empty {
                                ready.push_back(key);
                            }
                        }
                    }
                }
                _ = handover_check.tick(), if !settled_handover => {
                    if let Ok(info) = consumer.get_info().await
                        && info.num_ack_pending <= held
                    {
                        settled_handover = true;
                    }
                }
                _ = progress.tick() => {
                    for queue in queues.values() {
                        for event in queue.iter() {
                            let _ = event.message.ack_with(AckKind::Progress).await;
                        }
                    }
                }
            }
        }
    }
    // Shutting down: hand back what waits, let what runs finish (or be abandoned),
    // then give the partition up so another process takes it at once.
    let mut handed_back = 0;
    for (key, queue) in &queues {
        for event in queue {
            if running.get(key) == Some(&event.sequence) {
                continue;
            }
            crate::settle::hand_back_in_place(trigger, shared, &event.message, &event.in_place)
                .await;
            handed_back += 1;
        }
    }
    if shutdown.is_cancelled() {
        // The dispatcher's shutdown grace bounds what still runs (the tasks are
        // tracked); they hand their event back themselves if it is not settled.
        invocations.detach_all();
    } else {
        while let Some(finished) = invocations.join_next().await {
            if let Ok((key, sequence, Settled::RetryIn(_), in_place)) = finished
                && let Some(head) = queues
                    .get(&key)
                    .and_then(|queue| queue.iter().find(|held| held.sequence == sequence))
            {
                crate::settle::hand_back_in_place(trigger, shared, &head.message, &in_place).await;
                handed_back += 1;
            }
        }
    }
    if let Err(error) = trigger.stream.unpin_consumer(&name, OWNER_GROUP).await {
        tracing::debug!(trigger = %trigger.config.name, consumer = %name, %error, "unpinning the partition failed; it moves after the owner timeout");
    }
    tracing::debug!(trigger = %trigger.config.name, consumer = %name, handed_back, "ordered partition released");
}
