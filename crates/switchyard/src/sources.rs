//! Runs every configured source and supervises it: a source that fails (returns an
//! error, stops by itself, or panics) is marked failed and run again after a pause
//! that grows with consecutive failures (1 s doubling to 30 s; a source that had been
//! up for a minute starts over at 1 s). Each source's state is shown by `/v1/sources`
//! and counted in `/readyz`: the process is ready only while every source is up.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;
use switchyard_event::backoff::Backoff;
use switchyard_event::timestamp::now_rfc3339;
use switchyard_event::{Source, SourceHealth};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A source up this long before it failed starts its backoff over.
const STABLE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceState {
    /// Started (or restarted), not up yet.
    Starting,
    /// Up: subscribed, consuming or listening.
    Running,
    /// Failed; run again after a pause.
    Failed,
    /// Stopped at shutdown.
    Stopped,
}

/// What `/v1/sources` shows of one source.
#[derive(Debug, Clone, Serialize)]
pub struct SourceStatus {
    pub name: String,
    pub kind: &'static str,
    pub state: SourceState,
    /// Since when it is in this state (RFC 3339).
    pub since: String,
    /// Times it failed and was run again.
    pub restarts: u64,
    /// Why it failed last, if it ever did.
    pub last_error: Option<String>,
    /// Where an HTTP source listens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: String,
    kind: String,
}

/// Metrics of the supervised sources.
#[derive(Clone, Default)]
pub struct SourceMetrics {
    up: Family<SourceLabels, Gauge>,
    restarts: Family<SourceLabels, Counter>,
}

impl SourceMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "source_up",
            "1 while the source is up (subscribed, consuming or listening), 0 while starting or failed",
            self.up.clone(),
        );
        registry.register(
            "source_restarts",
            "times a source failed and was run again",
            self.restarts.clone(),
        );
    }
}

/// The live status of one supervised source; also what the source reports to.
pub struct SourceCell {
    status: Mutex<SourceStatus>,
    up: Gauge,
    up_since: Mutex<Option<Instant>>,
}

impl SourceCell {
    fn set(&self, state: SourceState) {
        let mut status = self.status.lock().expect("source status lock");
        if status.state != state {
            status.state = state;
            status.since = now_rfc3339();
        }
        self.up.set(i64::from(state == SourceState::Running));
    }

    /// Records where the source listens, for `/v1/sources`.
    pub fn set_address(&self, address: std::net::SocketAddr) {
        self.status.lock().expect("source status lock").address = Some(address.to_string());
    }

    pub fn status(&self) -> SourceStatus {
        self.status.lock().expect("source status lock").clone()
    }
}

impl SourceHealth for SourceCell {
    fn up(&self) {
        *self.up_since.lock().expect("source up lock") = Some(Instant::now());
        self.set(SourceState::Running);
    }
}

/// Starts `source` under supervision until `shutdown`; the task ends once the
/// source returned after shutdown.
pub fn supervise(
    source: Arc<dyn Source>,
    metrics: &SourceMetrics,
    shutdown: CancellationToken,
) -> (Arc<SourceCell>, JoinHandle<()>) {
    let labels = SourceLabels {
        source: source.name().to_owned(),
        kind: source.kind().to_owned(),
    };
    let cell = Arc::new(SourceCell {
        status: Mutex::new(SourceStatus {
            name: source.name().to_owned(),
            kind: source.kind(),
            state: SourceState::Starting,
            since: now_rfc3339(),
            restarts: 0,
            last_error: None,
            address: None,
        }),
        up: metrics.up.get_or_create(&labels).clone(),
        up_since: Mutex::new(None),
    });
    let restarts = metrics.restarts.get_or_create(&labels).clone();
    let task = tokio::spawn({
        let cell = cell.clone();
        async move {
            let mut failures = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
            loop {
                cell.set(SourceState::Starting);
                *cell.up_since.lock().expect("source up lock") = None;
                // Its own task, so a panic is an outcome like an error.
                let run = tokio::spawn({
                    let (source, cell, shutdown) = (source.clone(), cell.clone(), shutdown.clone());
                    async move { source.run(&*cell, shutdown).await }
                });
                let outcome = match run.await {
                    Ok(outcome) => outcome,
                    Err(error) => Err(format!("panicked: {error}")),
                };
                if shutdown.is_cancelled() {
                    if let Err(error) = outcome {
                        tracing::warn!(source = %source.name(), %error, "source failed while stopping");
                    }
                    cell.set(SourceState::Stopped);
                    return;
                }
                let error = outcome
                    .err()
                    .unwrap_or_else(|| "stopped by itself".to_owned());
                let up_for = cell
                    .up_since
                    .lock()
                    .expect("source up lock")
                    .map(|since| since.elapsed());
                if up_for.is_some_and(|up_for| up_for >= STABLE) {
                    failures.succeeded();
                }
                failures.failed();
                restarts.inc();
                {
                    let mut status = cell.status.lock().expect("source status lock");
                    status.restarts += 1;
                    status.last_error = Some(error.clone());
                }
                cell.set(SourceState::Failed);
                if failures.worth_logging() {
                    tracing::error!(source = %source.name(), kind = source.kind(), %error, failures = failures.failures(), retry_in = ?failures.delay(), "source failed; running it again after a pause");
                }
                if !failures.pause(shutdown.cancelled()).await {
                    cell.set(SourceState::Stopped);
                    return;
                }
            }
        }
    });
    (cell, task)
}
