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
//! names, creating them without losing position, lag and positions, orphans),
//! `permits` (what an invocation holds), `pulling` (the pull protocol), `delivery`
//! (attempt accounting across deliveries, and preparing one: filter, attempts, max
//! age), `invoke` (the call), `settle` (ack, retry copy, dead letter, destinations,
//! hand-backs), `retries` (the retry consumer), `batch` and `ordered` (the two other
//! delivery modes). Here: the public API, the `Dispatcher` that starts and stops all
//! of it, and the runtime state its modules share.

pub mod batch;
pub mod config;
pub mod consumers;
pub mod delivery;
pub mod filter;
mod invoke;
pub mod limit;
pub mod members;
pub mod metrics;
pub mod ordered;
mod permits;
mod pulling;
mod retries;
pub mod retry;
mod settle;
pub mod slots;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use serde::Serialize;
use switchyard_bus::async_nats::jetstream::{self, consumer::pull};
use switchyard_bus::{Bus, BusError};
use switchyard_event::Target;
use switchyard_event::backoff::Backoff;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use batch::BatchSettings;
pub use config::{
    DestinationConfig, Destinations, DispatcherConfig, EnrichConfig, OrderingMode, PayloadFormat,
    StartPosition, TriggerConfig,
};
pub use consumers::ConsumerRole;
pub use filter::{Filter, Matcher};
pub use limit::{AdaptiveLimit, AdaptivePermit};
pub use metrics::DispatcherMetrics;
use pulling::pull_loop;
use retries::retry_loop;
pub use retry::{BackoffKind, RetryPolicy};
pub use slots::{FunctionSlots, SlotPermit};

use metrics::{FunctionLabels, TriggerLabels};

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
    /// Another process changed this trigger's consumers to a newer form of it: this
    /// process has stopped pulling its events until it is reloaded with that form.
    pub superseded: bool,
    /// Since this process started (its `switchyard_events_dispatched_total`,
    /// `_dispatch_succeeded_total`, `_dispatch_retried_total` and
    /// `_dispatch_rejected_total`): attempts made, delivered, failed and retried,
    /// failed for good.
    pub dispatched: u64,
    pub succeeded: u64,
    pub retried: u64,
    pub rejected: u64,
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
    /// Another process changed this trigger's consumers to a newer form of it (its
    /// reload is ahead of this one's): this process stops pulling its events, which
    /// it could only hand back, until it runs the new form too.
    superseded: std::sync::atomic::AtomicBool,
}

/// Whether NATS subject `subject` matches `filter` (`*` one token, `>` the rest);
/// an empty filter matches everything.
fn subject_matches(filter: &str, subject: &str) -> bool {
    if filter.is_empty() {
        return true;
    }
    let mut tokens = subject.split('.');
    for part in filter.split('.') {
        match (part, tokens.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (part, Some(token)) if part == token => {}
            _ => return false,
        }
    }
    tokens.next().is_none()
}

impl TriggerRuntime {
    /// Whether an event stored on `subject` is one this trigger's consumers, as
    /// this process made them, deliver. One they do not was delivered by consumers
    /// another process changed (its reload is ahead of this one's).
    fn expects(&self, subject: &str) -> bool {
        let configs = std::iter::once(&self.consumer_config)
            .chain(&self.partition_configs)
            .chain([&self.retry_consumer_config, &self.direct_consumer_config]);
        configs.into_iter().any(|config| {
            (config.filter_subjects.is_empty() && subject_matches(&config.filter_subject, subject))
                || config
                    .filter_subjects
                    .iter()
                    .any(|filter| subject_matches(filter, subject))
        })
    }

    /// The function as this trigger calls it.
    fn target(&self) -> &Arc<dyn switchyard_event::Target> {
        self.destinations
            .target
            .as_ref()
            .unwrap_or(&self.function.target)
    }
}

struct Shared {
    bus: Bus,
    metrics: DispatcherMetrics,
    global: Arc<Semaphore>,
    /// What deliveries that ended without an ack or a term left for the next one.
    records: delivery::DeliveryRecords,
}

/// A set of triggers whose consumers exist, not running yet ([`Dispatcher::start`]).
pub struct Dispatcher {
    /// Consumers of triggers no longer configured that still held events at start.
    orphaned: Vec<consumers::OrphanedConsumer>,
    shared: Arc<Shared>,
    triggers: Vec<Arc<TriggerRuntime>>,
    slots: HashMap<String, Arc<FunctionSlots>>,
    config: DispatcherConfig,
    stream: jetstream::stream::Stream,
    positions: Arc<consumers::Positions>,
}

/// Read-only view of a dispatcher, for the admin endpoint; follows triggers added
/// and removed while it runs.
#[derive(Clone)]
pub struct DispatcherView {
    triggers: Arc<std::sync::RwLock<Vec<Arc<TriggerRuntime>>>>,
    orphaned: Arc<std::sync::RwLock<Vec<consumers::OrphanedConsumer>>>,
}

impl DispatcherView {
    /// Consumers of triggers no longer in the configuration that held events when
    /// this process started or last changed its triggers.
    pub fn orphaned(&self) -> Vec<consumers::OrphanedConsumer> {
        self.orphaned.read().expect("orphan view lock").clone()
    }

    pub fn triggers(&self) -> Vec<TriggerStatus> {
        self.triggers
            .read()
            .expect("trigger view lock")
            .iter()
            .map(|trigger| TriggerStatus {
                name: trigger.config.name.clone(),
                function: trigger.function.name.clone(),
                max_concurrency: trigger.config.max_concurrency,
                in_flight: trigger.in_flight.load(Ordering::Relaxed),
                lag: trigger.lag.load(Ordering::Relaxed),
                retrying: trigger.retrying.load(Ordering::Relaxed),
                function_concurrency_limit: trigger.function.limit.limit(),
                superseded: trigger.superseded.load(Ordering::Relaxed),
                dispatched: trigger.metrics.dispatched.get(),
                succeeded: trigger.metrics.succeeded.get(),
                retried: trigger.metrics.retried.get(),
                rejected: trigger.metrics.rejected.get(),
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

/// What a trigger is made of.
struct TriggerParts {
    trigger: TriggerConfig,
    function: Arc<FunctionRuntime>,
    destinations: Destinations,
    slots: Option<Arc<FunctionSlots>>,
}

/// Creates (or updates, keeping its position) a trigger's durable consumers and
/// builds its runtime state.
async fn build_trigger(
    bus: &Bus,
    metrics: &DispatcherMetrics,
    stream: &jetstream::stream::Stream,
    positions: &Arc<consumers::Positions>,
    parts: TriggerParts,
) -> Result<Arc<TriggerRuntime>, DispatchError> {
    let TriggerParts {
        trigger,
        function,
        destinations,
        slots,
    } = parts;
    if let Some(problem) = consumers::trigger_name_problem(&trigger.name) {
        return Err(DispatchError::InvalidTriggerName(problem));
    }
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
                .map_or(1, |batch| batch.max_events.max(1))) as i64,
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
        consumers::ensure(stream, &consumer_config, positions).await?;
    }
    consumers::ensure(stream, &direct_consumer_config, positions).await?;
    consumers::ensure(stream, &retry_consumer_config, positions).await?;
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
            consumers::ensure(stream, &config, positions).await?;
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
    Ok(Arc::new(TriggerRuntime {
        destinations,
        metrics: trigger_metrics,
        permits: Arc::new(Semaphore::new(trigger.max_concurrency.max(1))),
        permit_wanted: tokio::sync::Notify::new(),
        slots,
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
        superseded: std::sync::atomic::AtomicBool::new(false),
    }))
}

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
            let function = functions.get(&trigger.function).cloned().ok_or_else(|| {
                DispatchError::UnknownFunction {
                    trigger: trigger.name.clone(),
                    function: trigger.function.clone(),
                }
            })?;
            let destinations = destinations.remove(&trigger.name).unwrap_or_default();
            let slots = slots_by_function.get(&function.name).cloned();
            runtimes.push(
                build_trigger(
                    &bus,
                    &metrics,
                    &stream,
                    &positions,
                    TriggerParts {
                        trigger,
                        function,
                        destinations,
                        slots,
                    },
                )
                .await?,
            );
        }
        let configured: std::collections::HashSet<&str> = runtimes
            .iter()
            .map(|trigger| trigger.config.name.as_str())
            .collect();
        let orphaned = consumers::orphaned(&stream, &configured).await;
        warn_orphaned(&orphaned);
        Ok(Dispatcher {
            orphaned,
            shared: Arc::new(Shared {
                records: delivery::DeliveryRecords::open(&bus, stream_epoch).await?,
                bus,
                metrics,
                global: Arc::new(Semaphore::new(config.max_concurrency.max(1))),
            }),
            triggers: runtimes,
            slots: slots_by_function,
            config,
            stream,
            positions,
        })
    }

    /// A dispatcher with no trigger yet: they are added once it runs
    /// ([`RunningDispatcher::upsert`]), and [`RunningDispatcher::check_orphans`]
    /// then tells which consumers belong to none.
    pub async fn empty(
        bus: Bus,
        config: DispatcherConfig,
        metrics: DispatcherMetrics,
    ) -> Result<Dispatcher, DispatchError> {
        let stream = bus
            .jetstream()
            .get_stream(bus.events_stream())
            .await
            .map_err(|error| BusError::operation("open events stream", error))?;
        let stream_epoch = stream.cached_info().created.unix_timestamp_nanos();
        let positions = Arc::new(consumers::Positions::open(&bus, stream_epoch).await?);
        Ok(Dispatcher {
            orphaned: Vec::new(),
            shared: Arc::new(Shared {
                records: delivery::DeliveryRecords::open(&bus, stream_epoch).await?,
                bus,
                metrics,
                global: Arc::new(Semaphore::new(config.max_concurrency.max(1))),
            }),
            triggers: Vec::new(),
            slots: HashMap::new(),
            config,
            stream,
            positions,
        })
    }

    /// The cluster-wide slots of `function` (with `concurrency_scope = "cluster"`),
    /// for callers outside the triggers that share its budget (synchronous calls).
    pub fn function_slots(&self, function: &str) -> Option<Arc<FunctionSlots>> {
        self.slots.get(function).cloned()
    }

    /// Runs every trigger until `shutdown` is cancelled, then stops as
    /// [`RunningDispatcher::stop`] does.
    pub async fn run(self, shutdown: CancellationToken) {
        let running = self.start();
        shutdown.cancelled().await;
        running.stop().await;
    }

    /// Starts pulling for every trigger; triggers can then be added, changed and
    /// removed while it runs.
    pub fn start(self) -> RunningDispatcher {
        let view = Arc::new(std::sync::RwLock::new(Vec::new()));
        let running = RunningDispatcher {
            inner: Arc::new(RunningInner {
                shared: self.shared,
                config: self.config,
                stream: self.stream,
                positions: self.positions,
                tracker: TaskTracker::new(),
                shutdown: CancellationToken::new(),
                abandon: CancellationToken::new(),
                slots_shutdown: CancellationToken::new(),
                members_shutdown: CancellationToken::new(),
                state: std::sync::Mutex::new(RunState::default()),
                view: DispatcherView {
                    triggers: view,
                    orphaned: Arc::new(std::sync::RwLock::new(self.orphaned)),
                },
            }),
        };
        for (_, slots) in self.slots {
            running.inner.adopt_slots(slots);
        }
        for trigger in self.triggers {
            running.inner.launch(trigger);
        }
        running
    }
}

/// A trigger's loops, stopped together when it is removed or replaced.
struct LaunchedTrigger {
    runtime: Arc<TriggerRuntime>,
    stop: CancellationToken,
    loops: Vec<tokio::task::JoinHandle<()>>,
}

#[derive(Default)]
struct RunState {
    /// By trigger name, in the order they were added.
    triggers: Vec<(String, LaunchedTrigger)>,
    slots: HashMap<String, Arc<FunctionSlots>>,
    slot_tasks: Vec<tokio::task::JoinHandle<()>>,
    members: Option<(members::Members, tokio::task::JoinHandle<()>)>,
}

struct RunningInner {
    shared: Arc<Shared>,
    config: DispatcherConfig,
    stream: jetstream::stream::Stream,
    positions: Arc<consumers::Positions>,
    /// Every invocation in flight, of every trigger (removed ones' included).
    tracker: TaskTracker,
    /// Parent of every trigger's own stop token.
    shutdown: CancellationToken,
    abandon: CancellationToken,
    slots_shutdown: CancellationToken,
    members_shutdown: CancellationToken,
    state: std::sync::Mutex<RunState>,
    view: DispatcherView,
}

/// A running dispatcher: triggers can be added, changed and removed while events
/// flow, and it stops by draining ([`RunningDispatcher::stop`]).
pub struct RunningDispatcher {
    inner: Arc<RunningInner>,
}

impl RunningInner {
    fn adopt_slots(&self, slots: Arc<FunctionSlots>) {
        let mut state = self.state.lock().expect("dispatcher state lock");
        state.slot_tasks.push(tokio::spawn(
            slots.clone().lease_loop(self.slots_shutdown.clone()),
        ));
        state.slot_tasks.push(tokio::spawn(
            slots.clone().maintain(self.slots_shutdown.clone()),
        ));
        state.slots.insert(slots.function().to_owned(), slots);
    }

    /// Spawns a trigger's loops, under a stop token of its own.
    fn launch(&self, trigger: Arc<TriggerRuntime>) {
        let stop = self.shutdown.child_token();
        let mut loops = Vec::new();
        let mut state = self.state.lock().expect("dispatcher state lock");
        let members = if trigger.partition_configs.is_empty() {
            None
        } else {
            let (members, _) = state.members.get_or_insert_with(|| {
                members::start(self.shared.bus.clone(), self.members_shutdown.clone())
            });
            Some(members.clone())
        };
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
                    self.tracker.clone(),
                    stop.clone(),
                    self.abandon.clone(),
                )));
            } else {
                loops.push(tokio::spawn(pull_loop(
                    trigger.clone(),
                    self.shared.clone(),
                    config,
                    self.tracker.clone(),
                    stop.clone(),
                    self.abandon.clone(),
                )));
            }
        }
        for index in 0..trigger.partition_configs.len() {
            let members = members.clone().expect("started for ordered triggers");
            loops.push(tokio::spawn(ordered::partition_loop(
                trigger.clone(),
                self.shared.clone(),
                index,
                members,
                self.tracker.clone(),
                stop.clone(),
                self.abandon.clone(),
            )));
        }
        loops.push(tokio::spawn(retry_loop(
            trigger.clone(),
            self.shared.clone(),
            stop.clone(),
        )));
        loops.push(tokio::spawn(consumers::lag_loop(
            trigger.clone(),
            self.shared.clone(),
            stop.clone(),
        )));
        let name = trigger.config.name.clone();
        let launched = LaunchedTrigger {
            runtime: trigger,
            stop,
            loops,
        };
        match state
            .triggers
            .iter_mut()
            .find(|(existing, _)| *existing == name)
        {
            Some((_, slot)) => *slot = launched,
            None => state.triggers.push((name, launched)),
        }
        *self.view.triggers.write().expect("trigger view lock") = state
            .triggers
            .iter()
            .map(|(_, launched)| launched.runtime.clone())
            .collect();
    }

    /// Takes a trigger out: stops its loops (nothing new is pulled; what a loop held
    /// but had not started is handed back to JetStream) and returns them to await.
    /// Invocations in flight go on and settle as usual.
    fn take_out(&self, name: &str) -> Option<LaunchedTrigger> {
        let mut state = self.state.lock().expect("dispatcher state lock");
        let index = state
            .triggers
            .iter()
            .position(|(existing, _)| existing == name)?;
        let (_, launched) = state.triggers.remove(index);
        launched.stop.cancel();
        *self.view.triggers.write().expect("trigger view lock") = state
            .triggers
            .iter()
            .map(|(_, launched)| launched.runtime.clone())
            .collect();
        Some(launched)
    }
}

impl RunningDispatcher {
    pub fn view(&self) -> DispatcherView {
        self.inner.view.clone()
    }

    /// Finds the consumers of triggers not running here that still hold events,
    /// says so in the log and shows them in the view.
    pub async fn check_orphans(&self) {
        let names = self.trigger_names();
        let configured: std::collections::HashSet<&str> =
            names.iter().map(String::as_str).collect();
        let orphaned = consumers::orphaned(&self.inner.stream, &configured).await;
        warn_orphaned(&orphaned);
        *self.inner.view.orphaned.write().expect("orphan view lock") = orphaned;
    }

    /// The names of the running triggers.
    pub fn trigger_names(&self) -> Vec<String> {
        self.inner
            .state
            .lock()
            .expect("dispatcher state lock")
            .triggers
            .iter()
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// The cluster-wide slots of `function`, opening them when the function has
    /// `cluster_slots` and none are open yet. Slots already open keep their count
    /// (a changed count applies at the next start).
    pub async fn function_slots(
        &self,
        function: &FunctionRuntime,
    ) -> Result<Option<Arc<FunctionSlots>>, DispatchError> {
        let Some(count) = function.cluster_slots else {
            return Ok(None);
        };
        if let Some(slots) = self
            .inner
            .state
            .lock()
            .expect("dispatcher state lock")
            .slots
            .get(&function.name)
        {
            return Ok(Some(slots.clone()));
        }
        let slots =
            FunctionSlots::open(&self.inner.shared.bus, &function.name, count.max(1)).await?;
        self.inner.adopt_slots(slots.clone());
        Ok(Some(slots))
    }

    /// Adds a trigger, or replaces the one of the same name: its consumers are
    /// created or updated in place (keeping their positions) before the old loops
    /// stop, so a failure leaves the running trigger as it was. The old loops stop
    /// pulling and hand back what they had not started; its invocations in flight
    /// finish and settle; the new loops pull from the same durable consumers, so no
    /// event is delivered twice because of the change.
    pub async fn upsert(
        &self,
        trigger: TriggerConfig,
        function: Arc<FunctionRuntime>,
        destinations: Destinations,
    ) -> Result<(), DispatchError> {
        let slots = self.function_slots(&function).await?;
        // The old loops stop before the consumers change: a loop still applying
        // the old filters to what the changed consumers deliver would settle events
        // the new trigger wants as filtered out. Events arriving meanwhile wait in
        // the stream.
        let previous = match self.inner.take_out(&trigger.name) {
            Some(old) => {
                for task in old.loops {
                    let _ = task.await;
                }
                Some(old.runtime)
            }
            None => None,
        };
        match build_trigger(
            &self.inner.shared.bus,
            &self.inner.shared.metrics,
            &self.inner.stream,
            &self.inner.positions,
            TriggerParts {
                trigger,
                function,
                destinations,
                slots,
            },
        )
        .await
        {
            Ok(runtime) => {
                self.inner.launch(runtime);
                Ok(())
            }
            Err(error) => {
                // The trigger goes on as it was.
                if let Some(previous) = previous {
                    self.inner.launch(previous);
                }
                Err(error)
            }
        }
    }

    /// Removes a trigger: it stops pulling, its invocations in flight finish and
    /// settle. Its durable consumers stay (with their positions), so adding it back
    /// later continues where it stopped.
    pub async fn remove(&self, name: &str) {
        if let Some(old) = self.inner.take_out(name) {
            for task in old.loops {
                let _ = task.await;
            }
        }
    }

    /// Stops pulling for every trigger, lets in-flight invocations finish within the
    /// shutdown grace, and hands the rest back to JetStream (NAK) so another process
    /// takes them at once.
    pub async fn stop(self) {
        let inner = self.inner;
        inner.shutdown.cancel();
        let (loops, members, slot_tasks, slots) = {
            let mut state = inner.state.lock().expect("dispatcher state lock");
            let loops: Vec<_> = state
                .triggers
                .drain(..)
                .flat_map(|(_, launched)| launched.loops)
                .collect();
            (
                loops,
                state.members.take(),
                std::mem::take(&mut state.slot_tasks),
                state.slots.values().cloned().collect::<Vec<_>>(),
            )
        };
        // Every step is bounded: with NATS unreachable a step waiting on it could wait
        // forever, and a stop must end (what is not acknowledged comes back after
        // `ack_wait`).
        stopping(
            "the pull loops",
            inner.config.shutdown_grace,
            futures::future::join_all(loops),
        )
        .await;
        let tracker = &inner.tracker;
        tracker.close();
        let in_flight = tracker.len();
        if in_flight > 0 {
            tracing::info!(
                in_flight,
                grace_ms = inner.config.shutdown_grace.as_millis() as u64,
                "waiting for in-flight invocations"
            );
        }
        if tokio::time::timeout(inner.config.shutdown_grace, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                abandoned = tracker.len(),
                "shutdown grace over, handing in-flight events back to jetstream"
            );
            inner.abandon.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
        }
        // Leaving the members only now: partitions were released above.
        inner.members_shutdown.cancel();
        if let Some((_, task)) = members {
            stopping("leaving the members", STOP_STEP, task).await;
        }
        inner.slots_shutdown.cancel();
        stopping(
            "the slot tasks",
            STOP_STEP,
            futures::future::join_all(slot_tasks),
        )
        .await;
        // Only now that nothing can lease or use a slot: give them all back, so other
        // processes need not wait out the lease timeout.
        stopping("returning the slots", STOP_STEP, async {
            for slots in &slots {
                slots.return_all().await;
            }
        })
        .await;
    }
}

/// How long a step of stopping that talks to NATS may take after the grace period.
const STOP_STEP: Duration = Duration::from_secs(10);

/// Waits for `step` of a stop at most `limit`; says so when it gave up.
async fn stopping<T>(what: &str, limit: Duration, step: impl std::future::Future<Output = T>) {
    if tokio::time::timeout(limit, step).await.is_err() {
        tracing::warn!(
            step = what,
            limit_ms = limit.as_millis() as u64,
            "stopping the dispatcher: a step did not end in time (is nats reachable?); going on, unacknowledged events come back after ack_wait"
        );
    }
}

fn warn_orphaned(orphaned: &[consumers::OrphanedConsumer]) {
    for orphan in orphaned {
        if orphan.trigger.starts_with("esm-") {
            // A Lambda event source mapping's trigger: disabled (its events wait for
            // it to be enabled again) or deleted.
            tracing::info!(
                consumer = %orphan.consumer, trigger = %orphan.trigger, pending = orphan.pending,
                "a disabled or deleted event source mapping's trigger holds events: enabling the mapping delivers them; for a deleted one `switchyard dlq drain --trigger {}` moves them to its dead letters",
                orphan.trigger
            );
            continue;
        }
        tracing::warn!(
            consumer = %orphan.consumer, trigger = %orphan.trigger, pending = orphan.pending, ack_pending = orphan.ack_pending,
            "a trigger no longer in the configuration still holds events: they will not be delivered; `switchyard dlq drain --trigger {}` moves them to its dead letters",
            orphan.trigger
        );
    }
}

/// The pause between tries of a failing consumer operation (a pull, a subscription,
/// creating a consumer): 100 ms, doubling up to 5 s.
fn consumer_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(100), Duration::from_secs(5))
}

fn log_failure(
    trigger: &TriggerRuntime,
    failures: &Backoff,
    stage: &'static str,
    error: &dyn std::fmt::Display,
) {
    if failures.worth_logging() {
        tracing::warn!(trigger = %trigger.config.name, %error, failures = failures.failures(), stage, "trigger consumer failing, retrying");
    }
}

#[cfg(test)]
mod subject_tests {
    use super::subject_matches;

    #[test]
    fn subjects_match_filters_as_nats_does() {
        assert!(subject_matches("", "a.b"));
        assert!(subject_matches("a.b", "a.b"));
        assert!(!subject_matches("a.b", "a.c"));
        assert!(subject_matches("a.*.c", "a.x.c"));
        assert!(!subject_matches("a.*.c", "a.x.y.c"));
        assert!(subject_matches("a.>", "a.x.y"));
        assert!(!subject_matches("a.>", "a"));
        assert!(!subject_matches("a.b", "a.b.c"));
        assert!(!subject_matches("a.b.c", "a.b"));
    }
}
