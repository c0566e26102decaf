//! The admin listener: `/healthz` (the process is up), `/readyz` (connected to NATS,
//! the streams exist, every source is up), `/metrics` (Prometheus text format),
//! `/v1/triggers` (a read-only JSON view of each trigger with its lag and in-flight
//! count), `/v1/sources` (each source's state, restarts and last error) and
//! `/v1/functions` (each managed function's instances, cold starts, last init error
//! and limits).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;
use switchyard_bus::Bus;
use switchyard_dispatcher::DispatcherView;

use crate::sources::{SourceCell, SourceState, SourceStatus};

#[derive(Clone)]
pub struct AdminState {
    registry: Arc<Registry>,
    ready: Arc<AtomicBool>,
    running: Arc<OnceLock<(DispatcherView, Bus)>>,
    sources: Arc<OnceLock<Vec<Arc<SourceCell>>>>,
    workers: Option<Arc<switchyard_workers::Workers>>,
}

impl AdminState {
    pub fn new(
        registry: Arc<Registry>,
        ready: Arc<AtomicBool>,
        workers: Option<Arc<switchyard_workers::Workers>>,
    ) -> Self {
        AdminState {
            registry,
            ready,
            workers,
            running: Arc::new(OnceLock::new()),
            sources: Arc::new(OnceLock::new()),
        }
    }

    pub fn set_sources(&self, sources: Vec<Arc<SourceCell>>) {
        let _ = self.sources.set(sources);
    }

    fn source_statuses(&self) -> Vec<SourceStatus> {
        self.sources
            .get()
            .map(|cells| cells.iter().map(|cell| cell.status()).collect())
            .unwrap_or_default()
    }

    pub fn set_dispatcher(&self, view: DispatcherView, bus: Bus) {
        let _ = self.running.set((view, bus));
    }
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/triggers", get(triggers))
        .route("/v1/sources", get(sources))
        .route("/v1/functions", get(functions))
        .with_state(state)
}

/// Managed functions (`lambda`): instances by state, cold starts, the last init error
/// and limits. Functions Switchyard does not run (`http`, `log`) are not listed.
async fn functions(State(state): State<AdminState>) -> Response {
    let functions = state
        .workers
        .as_ref()
        .map(|workers| workers.status())
        .unwrap_or_default();
    axum::Json(serde_json::json!({ "functions": functions })).into_response()
}

async fn readyz(State(state): State<AdminState>) -> Response {
    let connected = state
        .running
        .get()
        .is_some_and(|(_, bus)| bus.is_connected());
    let down: Vec<String> = state
        .source_statuses()
        .into_iter()
        .filter(|status| status.state != SourceState::Running)
        .map(|status| match status.last_error {
            Some(error) if status.state == SourceState::Failed => {
                format!("source `{}` failed: {error}", status.name)
            }
            _ => format!("source `{}` is starting", status.name),
        })
        .collect();
    if state.ready.load(Ordering::SeqCst) && connected && !down.is_empty() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", down.join("; ")),
        )
            .into_response()
    } else if state.ready.load(Ordering::SeqCst) && connected {
        (StatusCode::OK, "ready\n").into_response()
    } else if !connected && state.ready.load(Ordering::SeqCst) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: disconnected from nats\n",
        )
            .into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: connecting to nats and setting up streams\n",
        )
            .into_response()
    }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let mut text = String::new();
    if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &state.registry) {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics failed: {error}\n"),
        )
            .into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn triggers(State(state): State<AdminState>) -> Response {
    let (triggers, orphaned) = state
        .running
        .get()
        .map(|(view, _)| (view.triggers(), view.orphaned().to_vec()))
        .unwrap_or_default();
    axum::Json(serde_json::json!({
        "triggers": triggers,
        // Triggers no longer configured whose consumers still held events at start:
        // `switchyard dlq drain --trigger <name>` moves them to its dead letters.
        "orphaned_consumers": orphaned,
    }))
    .into_response()
}

async fn sources(State(state): State<AdminState>) -> Response {
    axum::Json(serde_json::json!({ "sources": state.source_statuses() })).into_response()
}
