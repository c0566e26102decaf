//! The instances of one managed function: admission (an idle instance, or a cold
//! start), leases, scaling down, and stopping.
//!
//! Every decision is taken under the pool's one lock, and an instance leaves routing
//! (the `instances` map) under that lock before it is signalled, so an instance with
//! an invocation in flight is never picked for scale-down, and one picked for
//! scale-down never gets an invocation. Starting instances are counted but not
//! routable until ready.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use switchyard_event::backoff::Backoff;
use switchyard_event::telemetry::{self, KeyValue, SpanContext, SpanKind, TraceSpan};
use switchyard_event::timestamp::now_rfc3339;
use switchyard_event::{Event, Failure, Outcome, Reservation, Target};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::task::AbortOnDropHandle;

use crate::metrics::{FunctionLabels, InstanceStateLabels};
use crate::process::InstanceProcess;
use crate::runtime_api::RuntimeApi;
use crate::{FunctionSpec, FunctionStatus, InitError, InstanceCounts, Limits, Shared};

/// A running instance.
pub(crate) struct Instance {
    pub(crate) label: String,
    pub(crate) process: InstanceProcess,
    pub(crate) endpoint: Endpoint,
    /// The instance's init, until its first invocation takes it (REPORT's Init
    /// Duration and the cold start's span).
    pub(crate) cold: Mutex<Option<ColdStart>>,
}

/// When an instance's init began and how long it took.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ColdStart {
    pub(crate) started: std::time::SystemTime,
    pub(crate) init: Duration,
}

impl Pool {
    /// The init of `instance` if this is its first invocation, traced as a span
    /// (`init <function>`) under `trace`, the invocation's context, when given.
    pub(crate) fn cold_start(
        &self,
        instance: &Instance,
        trace: Option<&SpanContext>,
    ) -> Option<ColdStart> {
        let cold = instance.cold.lock().expect("cold lock").take()?;
        if let Some(parent) = trace {
            let span = TraceSpan::start_at(
                format!("init {}", self.spec.name),
                SpanKind::Internal,
                Some(parent),
                Some(cold.started),
                || {
                    vec![
                        KeyValue::new("faas.coldstart", true),
                        KeyValue::new("faas.name", self.spec.name.clone()),
                        KeyValue::new("faas.instance", instance.label.clone()),
                    ]
                },
            );
            span.end_at(cold.started + cold.init);
        }
        Some(cold)
    }
}

/// How invocations reach an instance.
pub(crate) enum Endpoint {
    Lambda {
        api: RuntimeApi,
        /// Serves the instance's Runtime API; stops with the instance.
        _server: AbortOnDropHandle<()>,
    },
    Http {
        target: switchyard_targets::HttpTarget,
    },
}

/// Why an instance could not start, in Lambda's words where Lambda has them.
#[derive(Debug, Clone)]
pub(crate) struct StartFailure {
    pub(crate) error_type: String,
    pub(crate) message: String,
    /// The instance's last output: logged, not shown on `/v1/functions` or dead
    /// letters (it may hold anything the function printed).
    pub(crate) output: Option<String>,
}

/// A managed function: the dispatcher's [`Target`] for it.
#[derive(Clone)]
pub struct ManagedFunction {
    pub(crate) pool: Arc<Pool>,
}

pub(crate) struct Pool {
    pub(crate) spec: FunctionSpec,
    pub(crate) shared: Arc<Shared>,
    /// The ARN invocations name.
    pub(crate) arn: String,
    state: Mutex<State>,
    /// Something changed: an instance became ready or free, a start failed.
    changed: Notify,
    /// This function's cold-start cap.
    starts: Arc<Semaphore>,
    pub(crate) labels: FunctionLabels,
    /// How many definitions of this function's name this process has run, this one
    /// included: instance labels (and cgroups) of a replaced definition never clash
    /// with its successor's.
    generation: u64,
    /// The last invocations and counts, for the console.
    pub(crate) recent: crate::recent::Recent,
}

struct State {
    /// Ready instances (routable), by id.
    instances: BTreeMap<u64, Slot>,
    next_id: u64,
    /// Invocations waiting for an instance.
    waiting: usize,
    /// Instances starting (not routable yet).
    starting: usize,
    init: InitHealth,
    cold_starts: u64,
    init_failures: u64,
    closed: bool,
    /// Retired (replaced or removed): no warm floor, every instance stops as soon as
    /// it has nothing in flight, and the pool closes once none is left.
    draining: bool,
}

struct Slot {
    instance: Arc<Instance>,
    in_flight: usize,
    idle_since: Instant,
    /// Takes no new invocation; stopped once those in flight end.
    retiring: bool,
}

/// Failed starts in a row, and when the next may be tried.
struct InitHealth {
    backoff: Backoff,
    last: Option<(StartFailure, String)>,
    retry_at: Option<(Instant, String)>,
}

impl State {
    fn counts(&self) -> InstanceCounts {
        let busy = self
            .instances
            .values()
            .filter(|slot| slot.in_flight > 0 || slot.retiring)
            .count();
        InstanceCounts {
            starting: self.starting,
            idle: self.instances.len() - busy,
            busy,
        }
    }
}

/// An instance reserved for one invocation. Dropping it frees the instance; marked
/// `retire`, the instance takes no new invocation and is stopped once it has none in
/// flight.
pub(crate) struct Lease {
    pool: Arc<Pool>,
    id: u64,
    pub(crate) instance: Arc<Instance>,
    pub(crate) retire: bool,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut state = self.pool.state.lock().expect("pool lock");
        let mut retired = None;
        if !self.retire && state.init.backoff.failing() {
            state.init.backoff.succeeded();
        }
        let draining = state.draining;
        if let Some(slot) = state.instances.get_mut(&self.id) {
            slot.in_flight -= 1;
            slot.idle_since = Instant::now();
            slot.retiring |= self.retire || draining;
            if slot.retiring && slot.in_flight == 0 {
                retired = state.instances.remove(&self.id);
            }
        }
        self.pool.publish_counts(&state);
        drop(state);
        self.pool.changed.notify_waiters();
        if let Some(slot) = retired {
            self.pool.stop_instance(slot.instance);
        }
    }
}

/// Counts an invocation as waiting for an instance until dropped.
struct Waiting<'a>(&'a Pool);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.state.lock().expect("pool lock").waiting -= 1;
    }
}

impl ManagedFunction {
    pub(crate) fn new(spec: FunctionSpec, shared: Arc<Shared>, generation: u64) -> Self {
        let labels = FunctionLabels {
            function: spec.name.clone(),
        };
        let pool = Arc::new(Pool {
            arn: crate::runtime_api::function_arn(&shared.settings.region, &spec.name),
            starts: Arc::new(Semaphore::new(spec.max_cold_starts.max(1))),
            recent: crate::recent::Recent::default(),
            state: Mutex::new(State {
                instances: BTreeMap::new(),
                next_id: 1,
                waiting: 0,
                starting: 0,
                init: InitHealth {
                    backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(60)),
                    last: None,
                    retry_at: None,
                },
                cold_starts: 0,
                init_failures: 0,
                closed: false,
                draining: false,
            }),
            changed: Notify::new(),
            spec,
            shared,
            labels,
            generation,
        });
        {
            let state = pool.state.lock().expect("pool lock");
            pool.publish_counts(&state);
        }
        let function = ManagedFunction { pool };
        let pool = function.pool.clone();
        function
            .pool
            .shared
            .tasks
            .spawn(async move { pool.keep_in_shape().await });
        function
    }

    pub fn name(&self) -> &str {
        &self.pool.spec.name
    }

    /// Whether both are the same function (not merely of the same name).
    pub fn same(&self, other: &ManagedFunction) -> bool {
        Arc::ptr_eq(&self.pool, &other.pool)
    }

    /// Its instances now, by state.
    pub fn counts(&self) -> InstanceCounts {
        self.pool.state.lock().expect("pool lock").counts()
    }

    /// The process ids of its instances (the command each started), for tests and
    /// the admin view.
    pub fn instance_pids(&self) -> Vec<u32> {
        self.pool
            .state
            .lock()
            .expect("pool lock")
            .instances
            .values()
            .map(|slot| slot.instance.process.pid() as u32)
            .collect()
    }

    pub(crate) fn status(&self) -> FunctionStatus {
        let pool = &self.pool;
        let state = pool.state.lock().expect("pool lock");
        let last_init_error = state.init.last.as_ref().map(|(failure, at)| InitError {
            error_type: failure.error_type.clone(),
            message: failure.message.clone(),
            at: at.clone(),
            failures: state.init.backoff.failures(),
            retry_at: state.init.retry_at.as_ref().map(|(_, at)| at.clone()),
        });
        let spec = &pool.spec;
        let (invocations, errors, durations) = pool.recent.summary();
        FunctionStatus {
            name: spec.name.clone(),
            kind: spec.kind.name(),
            instances: state.counts(),
            cold_starts: state.cold_starts,
            invocations,
            errors,
            recent_duration_ms: durations,
            init_failures: state.init_failures,
            last_init_error,
            limits: Limits {
                max_instances: spec.max_instances,
                min_instances: spec.min_instances,
                instance_concurrency: spec.instance_concurrency,
                memory_mb: spec.memory_mb,
                timeout_ms: spec.timeout.as_millis() as u64,
                init_timeout_ms: spec.init_timeout.as_millis() as u64,
                idle_timeout_ms: spec.idle_timeout.as_millis() as u64,
                max_cold_starts: spec.max_cold_starts,
            },
            isolation: pool.shared.cgroups.description.clone(),
        }
    }

    /// Retires the function (replaced by a new definition, or removed): invocations
    /// already on their way are still served, idle instances stop now, busy ones once
    /// what they hold is done, and no warm floor is kept.
    pub(crate) fn retire(&self) {
        let pool = &self.pool;
        let idle: Vec<Arc<Instance>> = {
            let mut state = pool.state.lock().expect("pool lock");
            state.draining = true;
            let idle: Vec<u64> = state
                .instances
                .iter()
                .filter(|(_, slot)| slot.in_flight == 0)
                .map(|(id, _)| *id)
                .collect();
            for slot in state.instances.values_mut() {
                slot.retiring = true;
            }
            idle.into_iter()
                .filter_map(|id| state.instances.remove(&id))
                .map(|slot| slot.instance)
                .collect()
        };
        for instance in idle {
            tracing::info!(function = %pool.spec.name, instance = %instance.label, "stopping instance of a retired function");
            pool.stop_instance(instance);
        }
    }

    /// Whether a retired function has stopped all its instances.
    pub(crate) fn drained(&self) -> bool {
        let state = self.pool.state.lock().expect("pool lock");
        state.closed || (state.draining && state.instances.is_empty() && state.starting == 0)
    }

    /// Stops every instance: out of routing first, then SIGTERM, grace, SIGKILL.
    pub(crate) async fn stop_all(&self) {
        let pool = &self.pool;
        let instances: Vec<Arc<Instance>> = {
            let mut state = pool.state.lock().expect("pool lock");
            state.closed = true;
            let instances = std::mem::take(&mut state.instances);
            pool.publish_counts(&state);
            instances.into_values().map(|slot| slot.instance).collect()
        };
        pool.changed.notify_waiters();
        let grace = pool.shared.settings.stop_grace;
        futures::future::join_all(
            instances
                .iter()
                .map(|instance| instance.process.stop(grace)),
        )
        .await;
    }
}

impl Pool {
    fn publish_counts(&self, state: &State) {
        // The function's replacement owns its gauges now.
        if state.draining {
            return;
        }
        let counts = state.counts();
        for (name, value) in [
            ("starting", counts.starting),
            ("idle", counts.idle),
            ("busy", counts.busy),
        ] {
            self.shared
                .metrics
                .function_instances
                .get_or_create(&InstanceStateLabels {
                    function: self.spec.name.clone(),
                    state: name.to_owned(),
                })
                .set(value as i64);
        }
    }

    /// Whether a waiting invocation should start an instance: more invocations wait
    /// than starting instances will take, and the function is under its limit.
    /// Starts pause after a failure; then, while the last start failed, one start at
    /// a time probes whether it works again.
    fn start_needed(&self, state: &State) -> bool {
        !state.closed
            && !Self::starts_paused(state)
            && state.waiting > state.starting * self.spec.instance_concurrency.max(1)
            && state.instances.len() + state.starting < self.spec.max_instances
            && !(state.init.backoff.failing() && state.starting > 0)
    }

    /// Whether starts pause after a failure (until `retry_at`), whatever runs.
    fn starts_paused(state: &State) -> bool {
        state
            .init
            .retry_at
            .as_ref()
            .is_some_and(|(retry_at, _)| Instant::now() < *retry_at)
    }

    /// The init failure an attempt fails with at once: starts pause and no instance
    /// runs (with instances running, an invocation waits for one of them).
    fn failing_fast(state: &State) -> Option<StartFailure> {
        if !state.instances.is_empty() || !Self::starts_paused(state) {
            return None;
        }
        let (failure, _) = state.init.last.as_ref()?;
        Some(failure.clone())
    }

    /// Waits for an instance with room for one more invocation, cold-starting one
    /// when none has room.
    async fn acquire(self: &Arc<Self>) -> Result<Lease, StartFailure> {
        let mut waiting: Option<Waiting<'_>> = None;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let start = {
                let mut state = self.state.lock().expect("pool lock");
                if state.closed {
                    drop(state);
                    return Err(StartFailure {
                        error_type: "Runtime.Stopping".to_owned(),
                        message: "the function is stopping".to_owned(),
                        output: None,
                    });
                }
                let limit = self.spec.instance_concurrency.max(1);
                // The most recently freed instance first: the others go idle and are
                // stopped after `idle_timeout`. Among busy ones with room, the fullest.
                let picked = state
                    .instances
                    .iter()
                    .filter(|(_, slot)| slot.in_flight < limit && !slot.retiring)
                    .max_by_key(|(_, slot)| (slot.in_flight, slot.idle_since))
                    .map(|(id, _)| *id);
                if let Some(id) = picked {
                    let slot = state.instances.get_mut(&id).expect("picked");
                    slot.in_flight += 1;
                    let instance = slot.instance.clone();
                    self.publish_counts(&state);
                    drop(state);
                    drop(waiting);
                    return Ok(Lease {
                        pool: self.clone(),
                        id,
                        instance,
                        retire: false,
                    });
                }
                if let Some(failure) = Self::failing_fast(&state) {
                    drop(state);
                    return Err(failure);
                }
                if waiting.is_none() {
                    state.waiting += 1;
                    waiting = Some(Waiting(self));
                }
                let pause_ends = Self::starts_paused(&state)
                    .then(|| state.init.retry_at.as_ref().map(|(at, _)| *at))
                    .flatten();
                (self.start_needed(&state), pause_ends)
            };
            let (start, pause_ends) = start;
            if !start {
                // Wait for a change, or for the pause on starts to end (instances
                // are all busy: a start may be needed then).
                match pause_ends {
                    Some(at) => {
                        tokio::select! {
                            () = &mut changed => {}
                            () = tokio::time::sleep_until(at.into()) => {}
                        }
                    }
                    None => changed.await,
                }
                continue;
            }
            // Under the cold-start caps: wait for a place, unless something changes
            // first (an instance freed, a start failed) that makes this start moot.
            tokio::select! {
                permits = self.start_permits() => {
                    let mut state = self.state.lock().expect("pool lock");
                    if self.start_needed(&state) {
                        state.starting += 1;
                        self.publish_counts(&state);
                        drop(state);
                        self.spawn_start(permits);
                    }
                }
                () = &mut changed => {}
            }
        }
    }

    /// A place under this function's and the process's cold-start caps.
    async fn start_permits(&self) -> (OwnedSemaphorePermit, OwnedSemaphorePermit) {
        let own = self
            .starts
            .clone()
            .acquire_owned()
            .await
            .expect("never closed");
        let all = self
            .shared
            .cold_starts
            .clone()
            .acquire_owned()
            .await
            .expect("never closed");
        (own, all)
    }

    /// Starts one instance (already counted in `starting`), holding `permits` until
    /// it is ready or failed.
    fn spawn_start(self: &Arc<Self>, permits: (OwnedSemaphorePermit, OwnedSemaphorePermit)) {
        let pool = self.clone();
        self.shared.tasks.spawn(async move {
            let id = {
                let mut state = pool.state.lock().expect("pool lock");
                state.next_id += 1;
                state.cold_starts += 1;
                state.next_id - 1
            };
            pool.shared
                .metrics
                .function_cold_starts
                .get_or_create(&pool.labels)
                .inc();
            let label = if pool.generation <= 1 {
                format!("{}-{id}", pool.spec.name)
            } else {
                format!("{}-v{}-{id}", pool.spec.name, pool.generation)
            };
            let started = Instant::now();
            let wall_started = std::time::SystemTime::now();
            let result = tokio::select! {
                result = pool.start_instance(&label) => result,
                () = pool.shared.shutdown.cancelled() => Err(StartFailure {
                    error_type: "Runtime.Stopping".to_owned(),
                    message: "switchyard is stopping".to_owned(),
                    output: None,
                }),
            };
            drop(permits);
            match result {
                Ok(instance) => {
                    pool.shared
                        .metrics
                        .function_init_duration_seconds
                        .get_or_create(&pool.labels)
                        .observe(started.elapsed().as_secs_f64());
                    tracing::info!(function = %pool.spec.name, instance = %label, pid = instance.process.pid(), init_ms = started.elapsed().as_millis() as u64, "instance ready");
                    // A cold start only when an invocation waits for it; an instance
                    // started for the warm floor (`min_instances`) is provisioned,
                    // and its first invocation reports no init, as on Lambda.
                    if pool.state.lock().expect("pool lock").waiting > 0 {
                        *instance.cold.lock().expect("cold lock") = Some(ColdStart {
                            started: wall_started,
                            init: started.elapsed(),
                        });
                    }
                    let instance = Arc::new(instance);
                    let closed = {
                        let mut state = pool.state.lock().expect("pool lock");
                        state.starting -= 1;
                        // Ready is not yet healthy: the failure count (and so the
                        // next pause) goes back to zero only once an instance has
                        // answered an invocation, so a function that dies soon
                        // after init is not restarted every second.
                        state.init.last = None;
                        state.init.retry_at = None;
                        if !state.closed {
                            state.instances.insert(
                                id,
                                Slot {
                                    instance: instance.clone(),
                                    in_flight: 0,
                                    idle_since: Instant::now(),
                                    retiring: false,
                                },
                            );
                        }
                        pool.publish_counts(&state);
                        state.closed
                    };
                    pool.changed.notify_waiters();
                    if closed {
                        instance
                            .process
                            .stop(pool.shared.settings.stop_grace)
                            .await;
                        return;
                    }
                    pool.watch(id, instance).await;
                }
                Err(failure) => {
                    {
                        let mut state = pool.state.lock().expect("pool lock");
                        state.starting -= 1;
                        pool.publish_counts(&state);
                    }
                    if pool.shared.shutdown.is_cancelled() {
                        // Abandoned at shutdown: not the function's failure.
                        pool.changed.notify_waiters();
                        return;
                    }
                    pool.start_failed(&label, &failure);
                }
            }
        });
    }

    /// Records a failed start (or an instance that died idle): attempts fail with it
    /// while starts pause, and the pause grows with failures in a row.
    fn start_failed(&self, label: &str, failure: &StartFailure) {
        self.shared
            .metrics
            .function_init_failures
            .get_or_create(&self.labels)
            .inc();
        let delay = {
            let mut state = self.state.lock().expect("pool lock");
            state.init_failures += 1;
            // Starts of one wave that fail together count once: the pause grows
            // with failed probes, not with the wave's size.
            if state
                .init
                .retry_at
                .as_ref()
                .is_none_or(|(at, _)| Instant::now() >= *at)
            {
                state.init.backoff.failed();
            }
            let delay = state.init.backoff.delay();
            state.init.last = Some((failure.clone(), now_rfc3339()));
            state.init.retry_at = Some((
                Instant::now() + delay,
                switchyard_event::timestamp::rfc3339(
                    time::OffsetDateTime::now_utc()
                        + time::Duration::try_from(delay).unwrap_or_default(),
                ),
            ));
            self.publish_counts(&state);
            delay
        };
        tracing::warn!(function = %self.spec.name, instance = %label, error_type = %failure.error_type, error = %failure.message, output = failure.output.as_deref().unwrap_or(""), next_start_in_ms = delay.as_millis() as u64, "instance failed; when no instance runs, invocations fail with this error until the next start");
        self.changed.notify_waiters();
    }

    /// Starts the function's program and waits until it is ready, within
    /// `init_timeout`.
    async fn start_instance(&self, label: &str) -> Result<Instance, StartFailure> {
        match &self.spec.kind {
            crate::Kind::Lambda { handler } => crate::lambda::start(self, label, handler).await,
            crate::Kind::Process {
                path,
                readiness_path,
            } => crate::web::start(self, label, path, readiness_path.as_deref()).await,
        }
    }

    /// Records how long an invocation took from `started`.
    fn observe_invocation(&self, started: Instant) {
        self.shared
            .metrics
            .function_invocation_duration_seconds
            .get_or_create(&self.labels)
            .observe(started.elapsed().as_secs_f64());
    }

    /// Starts the function's command for instance `label` with `environment`, in
    /// cgroups of its own where the host allows.
    pub(crate) async fn spawn_instance(
        &self,
        label: &str,
        environment: &[(String, String)],
    ) -> Result<InstanceProcess, StartFailure> {
        let spec = &self.spec;
        let (program, args) = spec
            .command
            .split_first()
            .expect("validated: a command has a program");
        let cgroup = self
            .shared
            .cgroups
            .create(
                label,
                crate::cgroup::Limits {
                    memory_mb: spec.memory_mb,
                },
            )
            .map_err(|error| StartFailure {
                error_type: "Runtime.StartFailed".to_owned(),
                message: format!("creating the instance's cgroup failed: {error}"),
                output: None,
            })?;
        InstanceProcess::spawn(
            &crate::process::Launch {
                program,
                args,
                directory: &spec.directory,
                environment,
                function: &spec.name,
                instance: label,
                logs: self.shared.logs.get().cloned(),
            },
            cgroup,
            &self.shared.tasks,
        )
        .await
        .map_err(|error| StartFailure {
            error_type: "Runtime.InvalidEntrypoint".to_owned(),
            message: format!("starting `{program}` failed: {error}"),
            output: None,
        })
    }

    /// Until the instance's process ends: then takes it out of routing.
    async fn watch(&self, id: u64, instance: Arc<Instance>) {
        let exit = instance.process.exited().await;
        let removed = {
            let mut state = self.state.lock().expect("pool lock");
            let removed = state
                .instances
                .get(&id)
                .is_some_and(|slot| Arc::ptr_eq(&slot.instance, &instance))
                .then(|| state.instances.remove(&id));
            self.publish_counts(&state);
            removed.flatten()
        };
        self.changed.notify_waiters();
        if let Some(slot) = removed
            && slot.in_flight == 0
        {
            // Not stopped by us (stopping takes it out of routing first), not in an
            // invocation (that one reports it): a crash, counted like a failed start
            // so a function that dies when idle (and its warm floor) is not restarted
            // in a loop.
            self.start_failed(
                &instance.label,
                &StartFailure {
                    error_type: "Runtime.ExitError".to_owned(),
                    message: format!("the instance exited while idle: {exit}"),
                    output: Some(instance.process.tail()),
                },
            );
        }
    }

    /// Stops an instance that has left routing.
    pub(crate) fn stop_instance(self: &Arc<Self>, instance: Arc<Instance>) {
        let grace = self.shared.settings.stop_grace;
        self.shared
            .tasks
            .spawn(async move { instance.process.stop(grace).await });
    }

    /// Stops instances idle past `idle_timeout` (down to `min_instances`) and keeps
    /// the warm floor started, until shutdown.
    async fn keep_in_shape(self: Arc<Self>) {
        let every =
            (self.spec.idle_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = self.shared.shutdown.cancelled() => return,
            }
            let (idle, floor_missing) = {
                let mut state = self.state.lock().expect("pool lock");
                if state.closed {
                    return;
                }
                if state.draining
                    && state.instances.is_empty()
                    && state.starting == 0
                    && state.waiting == 0
                {
                    state.closed = true;
                    return;
                }
                let (floor, idle_timeout) = if state.draining {
                    (0, Duration::ZERO)
                } else {
                    (self.spec.min_instances, self.spec.idle_timeout)
                };
                let mut removable = state.instances.len().saturating_sub(floor);
                let expired: Vec<u64> = state
                    .instances
                    .iter()
                    .filter(|(_, slot)| {
                        slot.in_flight == 0 && slot.idle_since.elapsed() >= idle_timeout
                    })
                    .map(|(id, _)| *id)
                    .collect();
                let mut idle = Vec::new();
                for id in expired {
                    if removable == 0 {
                        break;
                    }
                    removable -= 1;
                    if let Some(slot) = state.instances.remove(&id) {
                        idle.push(slot.instance);
                    }
                }
                self.publish_counts(&state);
                let missing = floor.saturating_sub(state.instances.len() + state.starting);
                let missing = if Self::starts_paused(&state) {
                    0
                } else {
                    missing
                };
                state.starting += missing;
                (idle, missing)
            };
            for instance in idle {
                tracing::info!(function = %self.spec.name, instance = %instance.label, "stopping idle instance");
                self.stop_instance(instance);
            }
            for _ in 0..floor_missing {
                let pool = self.clone();
                self.shared.tasks.spawn(async move {
                    tokio::select! {
                        permits = pool.start_permits() => pool.spawn_start(permits),
                        () = pool.shared.shutdown.cancelled() => {
                            pool.state.lock().expect("pool lock").starting -= 1;
                        }
                    }
                });
            }
        }
    }
}

/// The failure an attempt gets when the function cannot start.
pub(crate) fn init_failure(failure: &StartFailure) -> Failure {
    Failure::new(None, format!("{}: {}", failure.error_type, failure.message))
}

impl ManagedFunction {
    /// Whether the function's instances speak the Lambda Runtime API (and so take a
    /// raw payload, as Lambda's Invoke API passes it).
    pub fn is_lambda(&self) -> bool {
        matches!(self.pool.spec.kind, crate::Kind::Lambda { .. })
    }

    /// One invocation with `payload` as the event, as Lambda's Invoke API
    /// (`RequestResponse`) runs it: on an idle instance or a cold-started one. The
    /// caller holds the function's concurrency permit. Only for `lambda` functions.
    pub async fn call(
        &self,
        request_id: String,
        payload: bytes::Bytes,
        client_context: Option<String>,
        timeout: Duration,
        log: bool,
    ) -> (crate::lambda::Called, Option<String>) {
        assert!(self.is_lambda(), "call is for lambda functions");
        match self.pool.acquire().await {
            Ok(lease) => {
                let started = Instant::now();
                let called = crate::lambda::call(
                    &self.pool,
                    lease,
                    Some(request_id),
                    payload,
                    client_context,
                    timeout,
                    log,
                    None,
                )
                .await;
                self.pool.observe_invocation(started);
                called
            }
            Err(failure) => (
                crate::lambda::Called::Failed {
                    error_type: failure.error_type,
                    message: failure.message,
                },
                None,
            ),
        }
    }
}

impl ManagedFunction {
    /// Whether instances serve HTTP (`process` functions): requests can be forwarded.
    pub fn is_process(&self) -> bool {
        matches!(self.pool.spec.kind, crate::Kind::Process { .. })
    }

    /// Forwards one HTTP request to an instance (an idle one or a cold-started one)
    /// and returns its answer. The caller holds the function's concurrency permit.
    /// Only for `process` functions.
    pub async fn forward(
        &self,
        request: switchyard_targets::forward::Forward<'_>,
        timeout: Duration,
    ) -> Result<switchyard_targets::forward::Forwarded, crate::web::CallFailure> {
        assert!(self.is_process(), "forward is for process functions");
        let lease = self
            .pool
            .acquire()
            .await
            .map_err(|failure| crate::web::CallFailure {
                error_type: failure.error_type,
                message: failure.message,
            })?;
        let started = Instant::now();
        // A forwarded request is untraced: it only uses up the instance's cold start.
        self.pool.cold_start(&lease.instance, None);
        let answer = crate::web::forward(&self.pool, lease, request, timeout).await;
        self.pool.observe_invocation(started);
        answer
    }
}

#[async_trait]
impl Target for ManagedFunction {
    async fn invoke(&self, event: &Event, timeout: Duration) -> Outcome {
        // Without a reservation, an instance is acquired for the call.
        self.invoke_reserved(None, event, timeout).await
    }

    fn reserves(&self) -> bool {
        true
    }

    async fn reserve(&self) -> Result<Option<Reservation>, Failure> {
        self.pool
            .acquire()
            .await
            .map(|lease| Some(Reservation::new(lease)))
            .map_err(|failure| init_failure(&failure))
    }

    async fn invoke_reserved(
        &self,
        reservation: Option<Reservation>,
        event: &Event,
        timeout: Duration,
    ) -> Outcome {
        self.invoke_rendered(reservation, event, timeout, |event| {
            bytes::Bytes::from(switchyard_event::to_structured_json(event))
        })
        .await
    }
}

impl ManagedFunction {
    /// One invocation of `event` on what [`Target::reserve`] set aside; a `lambda`
    /// instance gets `render(event)` as its payload, a `process` instance the event
    /// in binary mode.
    pub(crate) async fn invoke_rendered(
        &self,
        reservation: Option<Reservation>,
        event: &Event,
        timeout: Duration,
        render: impl FnOnce(&Event) -> bytes::Bytes,
    ) -> Outcome {
        let lease = match reservation.and_then(Reservation::into_inner::<Lease>) {
            Some(lease) => lease,
            None => match self.pool.acquire().await {
                Ok(lease) => lease,
                Err(failure) => {
                    return Outcome::RetryLater {
                        not_before: None,
                        failure: init_failure(&failure),
                    };
                }
            },
        };
        let started = Instant::now();
        let outcome = match &lease.instance.endpoint {
            Endpoint::Lambda { .. } => {
                crate::lambda::invoke(
                    &self.pool,
                    lease,
                    crate::aws::request_id(event),
                    render(event),
                    timeout,
                    telemetry::enabled()
                        .then(|| telemetry::event_context(event))
                        .flatten(),
                )
                .await
            }
            Endpoint::Http { .. } => crate::web::invoke(&self.pool, lease, event, timeout).await,
        };
        self.pool.observe_invocation(started);
        outcome
    }
}
