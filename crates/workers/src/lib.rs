//! Function workers: functions whose instances Switchyard runs itself, on this
//! machine, with no container engine.
//!
//! A [`ManagedFunction`] is a [`switchyard_event::Target`] backed by a pool of
//! instances of one command. No instance runs until an invocation needs one (scale
//! from zero); an invocation that finds no idle instance starts one when the function
//! is under its instance limit (a cold start) and takes it the moment it is ready;
//! instances idle longer than `idle_timeout` are stopped (scale to zero), down to
//! `min_instances`. Concurrent cold starts are capped per function and in total
//! ([`Workers`]). The dispatcher reserves an instance before an attempt counts
//! ([`switchyard_event::Target::reserve`]), so an event waiting for one stays
//! unacknowledged in JetStream, never in a queue in this process.
//!
//! Kinds: `lambda`, a command speaking the AWS Lambda Runtime API
//! ([`runtime_api`], served to each instance on its own loopback port); `process`, a
//! command serving HTTP on `$PORT`. `design.md` beside this crate states the
//! lifecycle and what is promised.

pub mod guard;
pub mod logs;
pub mod process;
pub mod recent;
pub mod runtime_api;

pub mod aws;

mod cgroup;
mod lambda;
mod metrics;
mod pool;
mod web;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use lambda::Called;
pub use metrics::{FunctionLabels, WorkerMetrics};
pub use pool::ManagedFunction;
pub use web::CallFailure;

/// What kind of program a function's instances run.
#[derive(Debug, Clone)]
pub enum Kind {
    /// Speaks the AWS Lambda Runtime API; `handler` is Lambda's handler setting.
    Lambda { handler: String },
    /// Serves HTTP on `$PORT`: events are POSTed to `path` in CloudEvents binary mode;
    /// ready once `GET readiness_path` answers 2xx (without one: once the port
    /// accepts connections).
    Process {
        path: String,
        readiness_path: Option<String>,
    },
}

impl Kind {
    fn name(&self) -> &'static str {
        match self {
            Kind::Lambda { .. } => "lambda",
            Kind::Process { .. } => "process",
        }
    }
}

/// One managed function, as configured.
#[derive(Debug, Clone)]
pub struct FunctionSpec {
    pub name: String,
    pub kind: Kind,
    /// The program and its arguments.
    pub command: Vec<String>,
    /// The working directory (Lambda's task root).
    pub directory: PathBuf,
    /// The function's own environment (on top of what its kind sets).
    pub environment: Vec<(String, String)>,
    /// Per-invocation deadline.
    pub timeout: Duration,
    /// How long an instance may take to become ready.
    pub init_timeout: Duration,
    /// An instance idle this long is stopped.
    pub idle_timeout: Duration,
    /// Memory of an instance, in MB (told to the instance; a limit where cgroups are
    /// available).
    pub memory_mb: u32,
    /// Instances kept running even when idle.
    pub min_instances: usize,
    /// Most instances at once.
    pub max_instances: usize,
    /// Invocations one instance takes at once.
    pub instance_concurrency: usize,
    /// Most instances of this function starting at once.
    pub max_cold_starts: usize,
}

/// Settings shared by every managed function of the process.
#[derive(Debug, Clone)]
pub struct WorkersSettings {
    /// The AWS region instances are told they run in.
    pub region: String,
    /// Most instances starting at once, over every function.
    pub max_cold_starts: usize,
    /// How long a stopping instance gets between SIGTERM and SIGKILL.
    pub stop_grace: Duration,
    /// Whether instances get cgroup limits when the host allows them; without, they
    /// are process groups only.
    pub cgroups: bool,
}

impl Default for WorkersSettings {
    fn default() -> Self {
        WorkersSettings {
            region: "us-east-1".to_owned(),
            max_cold_starts: 16,
            stop_grace: Duration::from_secs(2),
            cgroups: true,
        }
    }
}

/// What every pool shares.
pub(crate) struct Shared {
    pub(crate) settings: WorkersSettings,
    pub(crate) cold_starts: Arc<Semaphore>,
    pub(crate) owner: String,
    pub(crate) shutdown: CancellationToken,
    pub(crate) tasks: TaskTracker,
    pub(crate) metrics: WorkerMetrics,
    /// Reaches `process` instances.
    pub(crate) http: reqwest::Client,
    /// Where instances get their resource limits (or why they get none).
    pub(crate) cgroups: cgroup::Cgroups,
    /// Where function log lines go besides Switchyard's log, once set.
    pub(crate) logs: std::sync::OnceLock<Arc<dyn logs::LogSink>>,
}

/// The managed functions of this process.
pub struct Workers {
    shared: Arc<Shared>,
    functions: Mutex<Vec<ManagedFunction>>,
    /// Replaced or removed functions whose instances are still finishing.
    retired: Mutex<Vec<ManagedFunction>>,
    /// Definitions added so far, by function name.
    generations: Mutex<std::collections::HashMap<String, u64>>,
}

impl Workers {
    /// Sets up the workers; first kills what a Switchyard process that died without
    /// stopping its instances left behind.
    pub fn new(settings: WorkersSettings, metrics: WorkerMetrics) -> Self {
        let reaped = process::reap_orphans();
        if reaped > 0 {
            tracing::warn!(
                processes = reaped,
                "killed function instances left behind by a switchyard process that is gone"
            );
        }
        let owner = process::owner_mark();
        let cgroups = if settings.cgroups {
            cgroup::Cgroups::detect(&owner, process::owner_alive)
        } else {
            cgroup::Cgroups::off("isolation = \"process-group\" in the configuration")
        };
        if cgroups.limited() {
            tracing::info!(isolation = %cgroups.description, "function instances get memory, process and cpu limits");
        } else {
            tracing::warn!(isolation = %cgroups.description, "function instances run without resource limits");
        }
        Workers {
            shared: Arc::new(Shared {
                cold_starts: Arc::new(Semaphore::new(settings.max_cold_starts.max(1))),
                settings,
                owner,
                shutdown: CancellationToken::new(),
                tasks: TaskTracker::new(),
                metrics,
                http: switchyard_targets::http_client(),
                cgroups,
                logs: std::sync::OnceLock::new(),
            }),
            functions: Mutex::new(Vec::new()),
            retired: Mutex::new(Vec::new()),
            generations: Mutex::default(),
        }
    }

    /// Sends every function log line (instances' output, and `START` / `END` /
    /// `REPORT` around each Lambda invocation) to `sink` too, from the next instance
    /// started on. Set once; later calls change nothing.
    pub fn set_log_sink(&self, sink: Arc<dyn logs::LogSink>) {
        let _ = self.shared.logs.set(sink);
    }

    /// Adds a function; its warm floor (`min_instances`) starts now.
    pub fn add(&self, spec: FunctionSpec) -> ManagedFunction {
        let generation = {
            let mut generations = self.generations.lock().expect("functions lock");
            let generation = generations.entry(spec.name.clone()).or_default();
            *generation += 1;
            *generation
        };
        let function = ManagedFunction::new(spec, self.shared.clone(), generation);
        self.functions
            .lock()
            .expect("functions lock")
            .push(function.clone());
        function
    }

    /// Retires `function` (replaced by a new definition, or removed): it leaves
    /// `/v1/functions` now; invocations already on their way are still served, its
    /// idle instances stop now and busy ones once their invocations end.
    pub fn retire(&self, function: &ManagedFunction) {
        self.functions
            .lock()
            .expect("functions lock")
            .retain(|kept| !kept.same(function));
        function.retire();
        let mut retired = self.retired.lock().expect("functions lock");
        retired.retain(|kept| !kept.drained());
        retired.push(function.clone());
    }

    /// The working directories of every function, and of retired ones whose
    /// instances still run.
    pub fn directories_in_use(&self) -> Vec<PathBuf> {
        let mut retired = self.retired.lock().expect("functions lock");
        retired.retain(|function| !function.drained());
        self.functions
            .lock()
            .expect("functions lock")
            .iter()
            .chain(retired.iter())
            .map(|function| function.pool.spec.directory.clone())
            .collect()
    }

    /// Instances of retired functions still running (finishing what they hold).
    pub fn retired_instances(&self) -> usize {
        self.retired
            .lock()
            .expect("functions lock")
            .iter()
            .map(|function| {
                let counts = function.counts();
                counts.starting + counts.idle + counts.busy
            })
            .sum()
    }

    /// How instances are isolated here (cgroup version and controllers, or why none).
    pub fn isolation(&self) -> &str {
        &self.shared.cgroups.description
    }

    /// The last invocations of function `name` in this process, newest first; none
    /// when this process runs no managed function of that name.
    pub fn invocations(&self, name: &str) -> Option<Vec<recent::Invocation>> {
        self.functions
            .lock()
            .expect("functions lock")
            .iter()
            .find(|function| function.pool.spec.name == name)
            .map(|function| function.pool.recent.newest_first())
    }

    /// What `/v1/functions` shows.
    pub fn status(&self) -> Vec<FunctionStatus> {
        self.functions
            .lock()
            .expect("functions lock")
            .iter()
            .map(ManagedFunction::status)
            .collect()
    }

    /// Stops every instance (SIGTERM, grace, SIGKILL) and waits for them and their
    /// cgroups' removal, then removes this process's cgroup directories; call after the
    /// dispatcher stopped.
    pub async fn shutdown(&self) {
        self.shared.shutdown.cancel();
        let mut functions: Vec<ManagedFunction> =
            self.functions.lock().expect("functions lock").clone();
        functions.extend(self.retired.lock().expect("functions lock").iter().cloned());
        futures::future::join_all(functions.iter().map(ManagedFunction::stop_all)).await;
        self.shared.tasks.close();
        // Each instance's exit watcher (which removes its cgroups) is one of them.
        self.shared.tasks.wait().await;
        self.shared.cgroups.remove_owner();
    }
}

/// A managed function's state, for `/v1/functions` and `switchyard functions`.
#[derive(Debug, Clone, Serialize)]
pub struct FunctionStatus {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub instances: InstanceCounts,
    /// Instances started since Switchyard started (each a cold start).
    pub cold_starts: u64,
    /// Invocations finished in this process since it started, and how many of them
    /// did not succeed.
    pub invocations: u64,
    pub errors: u64,
    /// Durations of the last invocations (at most [`recent::KEPT`]); none before
    /// the first.
    pub recent_duration_ms: Option<recent::Durations>,
    pub init_failures: u64,
    /// The last init failure, while the function is failing to start.
    pub last_init_error: Option<InitError>,
    pub limits: Limits,
    /// How instances are isolated: `cgroup v2 (...)`, `cgroup v1 (...)`, or
    /// `process-group (...)` with the reason there are no limits.
    pub isolation: String,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct InstanceCounts {
    pub starting: usize,
    pub idle: usize,
    pub busy: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Limits {
    pub max_instances: usize,
    pub min_instances: usize,
    pub instance_concurrency: usize,
    pub memory_mb: u32,
    pub timeout_ms: u64,
    pub init_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    pub max_cold_starts: usize,
}

/// Why an instance failed to start.
#[derive(Debug, Clone, Serialize)]
pub struct InitError {
    pub error_type: String,
    pub message: String,
    /// RFC 3339.
    pub at: String,
    /// Failed starts in a row.
    pub failures: u32,
    /// No start is tried before this (RFC 3339); attempts fail with this error meanwhile.
    pub retry_at: Option<String>,
}
