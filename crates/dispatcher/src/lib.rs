//! The dispatcher: delivers events from the bus to functions through triggers.
//!
//! Each trigger is a durable JetStream pull consumer over the events stream, so every
//! dispatcher process running the same configuration shares its work and JetStream's
//! `max_ack_pending` (set to the trigger's `max_concurrency`) bounds it across all of
//! them. Within a process, a trigger pulls only after taking a permit from its own
//! budget, its function's adaptive budget and the global budget, so a slow function
//! leaves events in JetStream. The delivery contract is in `design.md` beside this
//! crate: every event is acknowledged only after its function accepted it, or after
//! it was stored in the dead-letter stream; retries wait in JetStream (NAK with
//! delay), so nothing pending lives only in this process's memory.

pub mod filter;
pub mod limit;
pub mod metrics;
pub mod retry;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use switchyard_bus::async_nats::jetstream::{self, AckKind, consumer::pull, kv};
use switchyard_bus::dead_letter::{
    DeadLetter, REASON_ATTEMPTS_EXHAUSTED, REASON_MALFORMED, REASON_MAX_AGE_EXCEEDED,
    REASON_REJECTED,
};
use switchyard_bus::{Bus, BusError, event_from_message};
use switchyard_event::{Event, Failure, Outcome, Target};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use filter::{Filter, Matcher};
pub use limit::{AdaptiveLimit, AdaptivePermit};
pub use metrics::DispatcherMetrics;
pub use retry::{BackoffKind, RetryPolicy};

use metrics::{DeadLetterLabels, FunctionLabels, TriggerLabels, TriggerOnlyLabels};

/// Process-wide dispatcher settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DispatcherConfig {
    /// Invocations in flight at once in this process, over every trigger.
    #[serde(default = "default_global_concurrency")]
    pub max_concurrency: usize,
    /// On SIGTERM/SIGINT, how long in-flight invocations may run before they are
    /// abandoned and their events handed back to JetStream.
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        DispatcherConfig {
            max_concurrency: default_global_concurrency(),
            shutdown_grace: default_shutdown_grace(),
        }
    }
}

fn default_global_concurrency() -> usize {
    1024
}
fn default_shutdown_grace() -> Duration {
    Duration::from_secs(30)
}

/// Where a new trigger starts reading the events stream.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum StartPosition {
    /// Events stored after the trigger was first created.
    #[default]
    New,
    /// Every event the stream still holds.
    All,
}

/// A trigger: events matching `filter` go to `function`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerConfig {
    /// Unique name (letters, digits, `-`, `_`); names the durable consumer.
    pub name: String,
    /// The function events are delivered to.
    pub function: String,
    /// Which events this trigger takes; all of them when absent.
    #[serde(default)]
    pub filter: Filter,
    /// Invocations in flight at once for this trigger, across every dispatcher
    /// process.
    #[serde(default = "default_trigger_concurrency")]
    pub max_concurrency: usize,
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Per-invocation timeout; the function's timeout when absent.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// How long JetStream waits for an outcome before redelivering (a crashed
    /// dispatcher's events come back after this). Long invocations send progress
    /// every third of it.
    #[serde(default = "default_ack_wait", with = "humantime_serde")]
    pub ack_wait: Duration,
    /// Publish a CloudEvent the function answers with back onto the bus.
    #[serde(default)]
    pub publish_replies: bool,
    #[serde(default)]
    pub start: StartPosition,
}

fn default_trigger_concurrency() -> usize {
    16
}
fn default_ack_wait() -> Duration {
    Duration::from_secs(30)
}

/// A function the dispatcher can invoke.
pub struct FunctionRuntime {
    pub name: String,
    pub target: Arc<dyn Target>,
    pub timeout: Duration,
    /// One budget shared by every trigger that targets this function, in this
    /// process.
    pub limit: Arc<AdaptiveLimit>,
}

#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
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
    pub function_concurrency_limit: usize,
}

struct TriggerRuntime {
    config: TriggerConfig,
    function: Arc<FunctionRuntime>,
    permits: Arc<Semaphore>,
    consumer: jetstream::consumer::Consumer<pull::Config>,
    replay_subject: String,
    labels: TriggerLabels,
    in_flight: AtomicI64,
    lag: AtomicU64,
}

struct Shared {
    bus: Bus,
    attempts: kv::Store,
    metrics: DispatcherMetrics,
    global: Arc<Semaphore>,
}

/// A running set of triggers.
pub struct Dispatcher {
    shared: Arc<Shared>,
    triggers: Vec<Arc<TriggerRuntime>>,
    config: DispatcherConfig,
}

/// Read-only view of a dispatcher, for the admin endpoint.
#[derive(Clone)]
pub struct DispatcherView {
    triggers: Vec<Arc<TriggerRuntime>>,
}

impl DispatcherView {
    pub fn triggers(&self) -> Vec<TriggerStatus> {
        self.triggers
            .iter()
            .map(|trigger| TriggerStatus {
                name: trigger.config.name.clone(),
                function: trigger.function.name.clone(),
                max_concurrency: trigger.config.max_concurrency,
                in_flight: trigger.in_flight.load(Ordering::Relaxed),
                lag: trigger.lag.load(Ordering::Relaxed),
                function_concurrency_limit: trigger.function.limit.limit(),
            })
            .collect()
    }
}

/// Name of the key-value bucket that remembers when a retried event was first
/// attempted (written only on the failure path).
pub const ATTEMPTS_BUCKET: &str = "SWITCHYARD_ATTEMPTS";

/// The durable consumer name of a trigger.
pub fn consumer_name(trigger: &str) -> String {
    format!("switchyard-{trigger}")
}

const PULL_EXPIRES: Duration = Duration::from_secs(5);

fn now_rfc3339() -> String {
    format_time(time::OffsetDateTime::now_utc())
}

fn format_time(at: time::OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

impl Dispatcher {
    /// Creates (or updates) every trigger's durable consumer.
    pub async fn new(
        bus: Bus,
        config: DispatcherConfig,
        triggers: Vec<TriggerConfig>,
        functions: HashMap<String, Arc<FunctionRuntime>>,
        metrics: DispatcherMetrics,
    ) -> Result<Dispatcher, DispatchError> {
        let stream = bus
            .jetstream()
            .get_stream(bus.events_stream())
            .await
            .map_err(|error| BusError::operation("open events stream", error))?;
        let attempts = bus
            .jetstream()
            .create_or_update_key_value(kv::Config {
                bucket: ATTEMPTS_BUCKET.to_owned(),
                description: "first attempt time of events being retried".to_owned(),
                history: 1,
                max_age: Duration::from_secs(30 * 24 * 3600),
                ..Default::default()
            })
            .await
            .map_err(|error| BusError::operation("create attempts bucket", error))?;
        let mut runtimes = Vec::with_capacity(triggers.len());
        for trigger in triggers {
            let function = functions.get(&trigger.function).cloned().ok_or_else(|| {
                DispatchError::UnknownFunction {
                    trigger: trigger.name.clone(),
                    function: trigger.function.clone(),
                }
            })?;
            let subjects = bus.subjects();
            let hints = trigger.filter.subject_hints();
            let replay_subject = subjects.replay(&trigger.name);
            let consumer_config = pull::Config {
                durable_name: Some(consumer_name(&trigger.name)),
                description: Some(format!(
                    "switchyard trigger `{}` -> `{}`",
                    trigger.name, trigger.function
                )),
                filter_subjects: vec![
                    subjects.event_filter(hints.source_exact, hints.type_exact, hints.type_prefix),
                    replay_subject.clone(),
                ],
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: trigger.ack_wait,
                max_deliver: -1,
                max_ack_pending: trigger.max_concurrency as i64,
                deliver_policy: match trigger.start {
                    StartPosition::New => jetstream::consumer::DeliverPolicy::New,
                    StartPosition::All => jetstream::consumer::DeliverPolicy::All,
                },
                ..Default::default()
            };
            let consumer = stream
                .create_consumer(consumer_config)
                .await
                .map_err(|error| BusError::Operation {
                    stage: "create trigger consumer",
                    reason: format!("trigger `{}`: {error}", trigger.name),
                })?;
            metrics
                .function_concurrency_limit
                .get_or_create(&FunctionLabels {
                    function: function.name.clone(),
                })
                .set(function.limit.limit() as i64);
            runtimes.push(Arc::new(TriggerRuntime {
                labels: TriggerLabels {
                    trigger: trigger.name.clone(),
                    function: function.name.clone(),
                },
                permits: Arc::new(Semaphore::new(trigger.max_concurrency.max(1))),
                config: trigger,
                function,
                consumer,
                replay_subject,
                in_flight: AtomicI64::new(0),
                lag: AtomicU64::new(0),
            }));
        }
        Ok(Dispatcher {
            shared: Arc::new(Shared {
                bus,
                attempts,
                metrics,
                global: Arc::new(Semaphore::new(config.max_concurrency.max(1))),
            }),
            triggers: runtimes,
            config,
        })
    }

    pub fn view(&self) -> DispatcherView {
        DispatcherView {
            triggers: self.triggers.clone(),
        }
    }

    /// Runs every trigger until `shutdown` is cancelled, then stops pulling, lets
    /// in-flight invocations finish within the shutdown grace, and hands the rest back
    /// to JetStream (NAK) so another process takes them at once.
    pub async fn run(self, shutdown: CancellationToken) {
        let tracker = TaskTracker::new();
        let abandon = CancellationToken::new();
        let mut loops = Vec::new();
        for trigger in &self.triggers {
            loops.push(tokio::spawn(pull_loop(
                trigger.clone(),
                self.shared.clone(),
                tracker.clone(),
                shutdown.clone(),
                abandon.clone(),
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
            tracker.wait().await;
        }
    }
}

/// The permits one invocation holds; released on drop.
struct Permits {
    _trigger: OwnedSemaphorePermit,
    _function: AdaptivePermit,
    _global: OwnedSemaphorePermit,
}

async fn acquire_permits(trigger: &TriggerRuntime, shared: &Shared) -> Permits {
    let trigger_permit = trigger
        .permits
        .clone()
        .acquire_owned()
        .await
        .expect("never closed");
    let function_permit = trigger.function.limit.acquire().await;
    let global_permit = shared
        .global
        .clone()
        .acquire_owned()
        .await
        .expect("never closed");
    Permits {
        _trigger: trigger_permit,
        _function: function_permit,
        _global: global_permit,
    }
}

fn try_acquire_permits(trigger: &TriggerRuntime, shared: &Shared) -> Option<Permits> {
    let trigger_permit = trigger.permits.clone().try_acquire_owned().ok()?;
    let function_permit = trigger.function.limit.try_acquire()?;
    let global_permit = shared.global.clone().try_acquire_owned().ok()?;
    Some(Permits {
        _trigger: trigger_permit,
        _function: function_permit,
        _global: global_permit,
    })
}

async fn pull_loop(
    trigger: Arc<TriggerRuntime>,
    shared: Arc<Shared>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    abandon: CancellationToken,
) {
    let mut failures: u32 = 0;
    'pulling: loop {
        let first = tokio::select! {
            permits = acquire_permits(&trigger, &shared) => permits,
            () = shutdown.cancelled() => break 'pulling,
        };
        let mut permits = vec![first];
        while permits.len() < trigger.config.max_concurrency.max(1) {
            match try_acquire_permits(&trigger, &shared) {
                Some(more) => permits.push(more),
                None => break,
            }
        }
        let request = trigger
            .consumer
            .batch()
            .max_messages(permits.len())
            .expires(PULL_EXPIRES)
            .messages();
        let batch = tokio::select! {
            batch = request => batch,
            () = shutdown.cancelled() => break 'pulling,
        };
        let mut batch = match batch {
            Ok(batch) => batch,
            Err(error) => {
                failures += 1;
                if failures == 1 || failures.is_power_of_two() {
                    tracing::warn!(trigger = %trigger.config.name, %error, failures, stage = "pull", "pulling events failed, retrying");
                }
                drop(permits);
                let pause = Duration::from_millis(100 * u64::from(failures.min(50)));
                tokio::select! {
                    () = tokio::time::sleep(pause) => continue 'pulling,
                    () = shutdown.cancelled() => break 'pulling,
                }
            }
        };
        loop {
            let next = tokio::select! {
                next = batch.next() => next,
                () = shutdown.cancelled() => {
                    // Events already sent to us are handed back at once rather than
                    // left to wait out their ack wait.
                    let drain = async {
                        while let Some(Ok(message)) = batch.next().await {
                            let _ = message.ack_with(AckKind::Nak(None)).await;
                        }
                    };
                    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
                    break 'pulling;
                }
            };
            match next {
                None => break,
                Some(Ok(message)) => {
                    failures = 0;
                    let permit = permits
                        .pop()
                        .expect("the batch never exceeds the permits taken");
                    tracker.spawn(handle_message(
                        trigger.clone(),
                        shared.clone(),
                        message,
                        permit,
                        abandon.clone(),
                    ));
                }
                Some(Err(error)) => {
                    failures += 1;
                    if failures == 1 || failures.is_power_of_two() {
                        tracing::warn!(trigger = %trigger.config.name, %error, failures, stage = "pull", "receiving events failed");
                    }
                    break;
                }
            }
        }
    }
}

async fn lag_loop(trigger: Arc<TriggerRuntime>, shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let info = tokio::select! {
            info = trigger.consumer.get_info() => info,
            () = shutdown.cancelled() => return,
        };
        if let Ok(info) = info {
            trigger.lag.store(info.num_pending, Ordering::Relaxed);
            shared
                .metrics
                .consumer_lag
                .get_or_create(&TriggerOnlyLabels {
                    trigger: trigger.config.name.clone(),
                })
                .set(info.num_pending as i64);
        }
    }
}

struct InFlight<'a> {
    trigger: &'a TriggerRuntime,
    shared: &'a Shared,
}

impl<'a> InFlight<'a> {
    fn start(trigger: &'a TriggerRuntime, shared: &'a Shared) -> Self {
        trigger.in_flight.fetch_add(1, Ordering::Relaxed);
        shared
            .metrics
            .events_in_flight
            .get_or_create(&trigger.labels)
            .inc();
        InFlight { trigger, shared }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.trigger.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.shared
            .metrics
            .events_in_flight
            .get_or_create(&self.trigger.labels)
            .dec();
    }
}

/// Facts about one delivery of a message.
struct Delivery {
    attempt: u64,
    sequence: u64,
    received_at: time::OffsetDateTime,
}

async fn handle_message(
    trigger: Arc<TriggerRuntime>,
    shared: Arc<Shared>,
    message: jetstream::Message,
    permits: Permits,
    abandon: CancellationToken,
) {
    let _permits = permits;
    let _in_flight = InFlight::start(&trigger, &shared);
    let delivery = match message.info() {
        Ok(info) => Delivery {
            attempt: info.delivered.max(1) as u64,
            sequence: info.stream_sequence,
            received_at: info.published,
        },
        Err(error) => {
            tracing::error!(trigger = %trigger.config.name, %error, stage = "dispatch", "message without jetstream metadata, handing back");
            let _ = message
                .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                .await;
            return;
        }
    };
    let event = match event_from_message(message.headers.as_ref(), message.payload.clone()) {
        Ok(event) => event,
        Err(error) => {
            let failure = Failure::new(None, format!("not a valid cloudevent: {error}"));
            dead_letter_raw(&trigger, &shared, &message, &delivery, &failure).await;
            return;
        }
    };
    let replayed = message.subject.as_str() == trigger.replay_subject;
    if !replayed && !trigger.config.filter.matches(&event) {
        shared
            .metrics
            .events_filtered
            .get_or_create(&trigger.labels)
            .inc();
        let _ = message.ack().await;
        return;
    }
    let policy = &trigger.config.retry;
    let now = time::OffsetDateTime::now_utc();
    if let Some(max_age) = policy.max_age {
        let age = (now - delivery.received_at).max(time::Duration::ZERO);
        if age > max_age && delivery.attempt > 1 {
            let failure = Failure::new(
                None,
                format!(
                    "event is {}s old, older than max_age {}s",
                    age.whole_seconds(),
                    max_age.as_secs()
                ),
            );
            let failure = last_failure(&shared, &trigger, &delivery)
                .await
                .unwrap_or(failure);
            dead_letter(
                &trigger,
                &shared,
                &message,
                event,
                &delivery,
                REASON_MAX_AGE_EXCEEDED,
                &failure,
            )
            .await;
            return;
        }
    }
    let timeout = trigger.config.timeout.unwrap_or(trigger.function.timeout);
    shared
        .metrics
        .events_dispatched
        .get_or_create(&trigger.labels)
        .inc();
    let span_attempt = delivery.attempt;
    tracing::debug!(event_id = %event.id, trigger = %trigger.config.name, function = %trigger.function.name, attempt = span_attempt, "invoking function");
    let started = Instant::now();
    let outcome = {
        let invocation = trigger.function.target.invoke(&event, timeout);
        tokio::pin!(invocation);
        let progress_every = (trigger.config.ack_wait / 3).max(Duration::from_millis(100));
        let mut progress =
            tokio::time::interval_at(tokio::time::Instant::now() + progress_every, progress_every);
        // The guard timeout only fires if a target ignores its own timeout.
        let hard_deadline = tokio::time::sleep(timeout + Duration::from_secs(1));
        tokio::pin!(hard_deadline);
        loop {
            tokio::select! {
                outcome = &mut invocation => break outcome,
                _ = progress.tick() => {
                    let _ = message.ack_with(AckKind::Progress).await;
                }
                () = &mut hard_deadline => {
                    break Outcome::RetryLater {
                        not_before: None,
                        failure: Failure::new(None, format!("invocation timed out after {}ms", timeout.as_millis())),
                    };
                }
                () = abandon.cancelled() => {
                    let _ = message.ack_with(AckKind::Nak(None)).await;
                    return;
                }
            }
        }
    };
    shared
        .metrics
        .invocation_duration_seconds
        .get_or_create(&trigger.labels)
        .observe(started.elapsed().as_secs_f64());
    match outcome {
        Outcome::Delivered { reply } => {
            trigger.function.limit.record_success();
            if trigger.config.publish_replies
                && let Some(reply) = reply
                && let Err(error) = publish_reply(&shared, &reply).await
            {
                // The function's answer must not be lost: try the whole event again.
                tracing::warn!(event_id = %event.id, trigger = %trigger.config.name, %error, stage = "publish", "publishing the function's reply failed, retrying the event");
                let _ = message
                    .ack_with(AckKind::Nak(Some(policy.delay(delivery.attempt))))
                    .await;
                return;
            }
            shared
                .metrics
                .dispatch_succeeded
                .get_or_create(&trigger.labels)
                .inc();
            if let Err(error) = message.ack().await {
                tracing::warn!(event_id = %event.id, trigger = %trigger.config.name, %error, stage = "ack", "acknowledging failed; the event may be delivered again");
            }
            if delivery.attempt > 1 {
                let _ = shared
                    .attempts
                    .delete(attempts_key(&trigger.config.name, delivery.sequence))
                    .await;
            }
        }
        Outcome::RetryLater {
            not_before,
            failure,
        } => {
            if failure.overloaded {
                trigger.function.limit.decrease();
            }
            shared
                .metrics
                .function_concurrency_limit
                .get_or_create(&FunctionLabels {
                    function: trigger.function.name.clone(),
                })
                .set(trigger.function.limit.limit() as i64);
            if delivery.attempt >= policy.max_attempts() {
                remember_failure(&shared, &trigger, &delivery, &failure, started).await;
                dead_letter(
                    &trigger,
                    &shared,
                    &message,
                    event,
                    &delivery,
                    REASON_ATTEMPTS_EXHAUSTED,
                    &failure,
                )
                .await;
                return;
            }
            let mut delay = policy
                .delay(delivery.attempt)
                .max(not_before.unwrap_or_default());
            if let Some(max_age) = policy.max_age {
                // Come back no later than when the event expires, to dead-letter it then.
                let remaining = (delivery.received_at + max_age - time::OffsetDateTime::now_utc())
                    .max(time::Duration::ZERO);
                delay = delay.min(
                    Duration::try_from(remaining).unwrap_or_default() + Duration::from_millis(10),
                );
            }
            remember_failure(&shared, &trigger, &delivery, &failure, started).await;
            shared
                .metrics
                .dispatch_retried
                .get_or_create(&trigger.labels)
                .inc();
            tracing::info!(
                event_id = %event.id, trigger = %trigger.config.name, function = %trigger.function.name,
                attempt = delivery.attempt, status = failure.status, error = %failure.error, delay_ms = delay.as_millis() as u64,
                "invocation failed, retrying later"
            );
            if let Err(error) = message.ack_with(AckKind::Nak(Some(delay))).await {
                tracing::warn!(event_id = %event.id, trigger = %trigger.config.name, %error, stage = "ack", "nak failed; jetstream redelivers after the ack wait");
            }
        }
        Outcome::Rejected { failure } => {
            shared
                .metrics
                .dispatch_rejected
                .get_or_create(&trigger.labels)
                .inc();
            if delivery.attempt == 1 {
                remember_failure(&shared, &trigger, &delivery, &failure, started).await;
            }
            dead_letter(
                &trigger,
                &shared,
                &message,
                event,
                &delivery,
                REASON_REJECTED,
                &failure,
            )
            .await;
        }
    }
}

async fn publish_reply(shared: &Shared, reply: &Event) -> Result<(), String> {
    let ack = shared
        .bus
        .send_event(reply)
        .await
        .map_err(|error| error.to_string())?;
    ack.await.map_err(|error| error.to_string())?;
    Ok(())
}

fn attempts_key(trigger: &str, sequence: u64) -> String {
    format!("{trigger}.{sequence}")
}

/// What the attempts bucket keeps of a retried event: when it was first attempted
/// and how its latest attempt failed.
#[derive(Serialize, Deserialize)]
struct AttemptRecord {
    first_attempt_at: String,
    last_status: Option<u16>,
    last_error: String,
}

async fn remember_failure(
    shared: &Shared,
    trigger: &TriggerRuntime,
    delivery: &Delivery,
    failure: &Failure,
    started: Instant,
) {
    let key = attempts_key(&trigger.config.name, delivery.sequence);
    let first_attempt_at = match read_attempt(shared, &key).await {
        Some(record) => record.first_attempt_at,
        None => format_time(time::OffsetDateTime::now_utc() - started.elapsed()),
    };
    let record = AttemptRecord {
        first_attempt_at,
        last_status: failure.status,
        last_error: failure.error.clone(),
    };
    let value = serde_json::to_vec(&record).expect("the record serializes");
    if let Err(error) = shared.attempts.put(key, value.into()).await {
        tracing::debug!(%error, "recording the attempt failed; the dead letter will lack its first attempt time");
    }
}

async fn read_attempt(shared: &Shared, key: &str) -> Option<AttemptRecord> {
    let value = shared.attempts.get(key).await.ok()??;
    serde_json::from_slice(&value).ok()
}

async fn last_failure(
    shared: &Shared,
    trigger: &TriggerRuntime,
    delivery: &Delivery,
) -> Option<Failure> {
    let record = read_attempt(
        shared,
        &attempts_key(&trigger.config.name, delivery.sequence),
    )
    .await?;
    Some(Failure::new(record.last_status, record.last_error))
}

/// Stores the event in the dead-letter stream, then terminates it on the trigger's
/// consumer. If the dead-letter publish fails, the event is handed back instead, so it
/// is always in one of the two streams.
async fn dead_letter(
    trigger: &TriggerRuntime,
    shared: &Shared,
    message: &jetstream::Message,
    event: Event,
    delivery: &Delivery,
    reason: &str,
    failure: &Failure,
) {
    let key = attempts_key(&trigger.config.name, delivery.sequence);
    let record = read_attempt(shared, &key).await;
    let event_id = event.id.clone();
    let dead_letter = DeadLetter {
        event,
        reason: reason.to_owned(),
        trigger: trigger.config.name.clone(),
        function: trigger.function.name.clone(),
        attempts: if reason == REASON_MAX_AGE_EXCEEDED {
            delivery.attempt - 1
        } else {
            delivery.attempt
        },
        last_status: failure.status,
        last_error: failure.error.clone(),
        first_attempt_at: record.map(|record| record.first_attempt_at),
        last_attempt_at: now_rfc3339(),
        received_at: format_time(delivery.received_at),
        event_sequence: delivery.sequence,
    };
    let (headers, payload) = dead_letter.to_message();
    let subject = shared.bus.subjects().dead_letter(&trigger.config.name);
    let stored = match shared.bus.send(subject, headers, payload).await {
        Ok(ack) => ack.await.map(|_| ()).map_err(|error| error.to_string()),
        Err(error) => Err(error.to_string()),
    };
    match stored {
        Ok(()) => {
            shared
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
            if let Err(error) = message.ack_with(AckKind::Term).await {
                tracing::warn!(event_id = %event_id, %error, stage = "ack", "terminating a dead-lettered event failed; it may be dead-lettered again (deduplicated)");
            }
            let _ = shared.attempts.delete(key).await;
        }
        Err(error) => {
            tracing::error!(event_id = %event_id, trigger = %trigger.config.name, %error, stage = "dead_letter", "storing the dead letter failed, handing the event back");
            let _ = message
                .ack_with(AckKind::Nak(Some(Duration::from_secs(5))))
                .await;
        }
    }
}

/// Dead-letters a message that is not a valid CloudEvent, headers and payload as they
/// were, with the reason.
async fn dead_letter_raw(
    trigger: &TriggerRuntime,
    shared: &Shared,
    message: &jetstream::Message,
    delivery: &Delivery,
    failure: &Failure,
) {
    let mut headers = message.headers.clone().unwrap_or_default();
    headers.insert(
        "Nats-Msg-Id",
        format!("dlq {} {}", trigger.config.name, delivery.sequence),
    );
    headers.insert("Switchyard-Dlq-Reason", REASON_MALFORMED);
    headers.insert("Switchyard-Dlq-Trigger", trigger.config.name.as_str());
    headers.insert("Switchyard-Dlq-Function", trigger.function.name.as_str());
    headers.insert(
        "Switchyard-Dlq-Last-Error",
        switchyard_event::encode_header_value(&failure.error).as_ref(),
    );
    headers.insert(
        "Switchyard-Dlq-Event-Sequence",
        delivery.sequence.to_string(),
    );
    let subject = shared.bus.subjects().dead_letter(&trigger.config.name);
    let stored = match shared
        .bus
        .send(subject, headers, message.payload.clone())
        .await
    {
        Ok(ack) => ack.await.is_ok(),
        Err(_) => false,
    };
    if stored {
        tracing::error!(trigger = %trigger.config.name, sequence = delivery.sequence, error = %failure.error, "malformed message dead-lettered");
        let _ = message.ack_with(AckKind::Term).await;
    } else {
        let _ = message
            .ack_with(AckKind::Nak(Some(Duration::from_secs(5))))
            .await;
    }
}
