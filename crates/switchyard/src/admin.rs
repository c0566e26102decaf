//! The admin listener: `/healthz` (the process is up), `/readyz` (connected to NATS
//! and the streams exist), `/metrics` (Prometheus text format) and `/v1/triggers`
//! (a read-only JSON view of each trigger with its lag and in-flight count).

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

#[derive(Clone)]
pub struct AdminState {
    registry: Arc<Registry>,
    ready: Arc<AtomicBool>,
    running: Arc<OnceLock<(DispatcherView, Bus)>>,
}

impl AdminState {
    pub fn new(registry: Arc<Registry>, ready: Arc<AtomicBool>) -> Self {
        AdminState {
            registry,
            ready,
            running: Arc::new(OnceLock::new()),
        }
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
        .with_state(state)
}

async fn readyz(State(state): State<AdminState>) -> Response {
    let connected = state
        .running
        .get()
        .is_some_and(|(_, bus)| bus.is_connected());
    if state.ready.load(Ordering::SeqCst) && connected {
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
