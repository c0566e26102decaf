//! The admin listener: `/healthz` (the process is up), `/readyz` (connected to NATS,
//! the events stream answers, every source is up), `/metrics` (Prometheus text format),
//! `/v1/triggers` (a read-only JSON view of each trigger with its lag and in-flight
//! count), `/v1/sources` (each source's state, restarts and last error) and
//! `/v1/functions` (each managed function's instances, cold starts, invocations,
//! durations, last init error and limits), `/v1/functions/{name}/invocations` (its
//! last invocations here), `/v1/functions/{name}/logs` (its stored log lines),
//! `/v1/console` (what the web console needs), the web console itself at
//! `/console/` (public page; its data comes from the guarded API), `/v1/schedules` (each schedule's last firing and next ones), and with a bearer token the dead letters: `GET
//! /v1/dead-letters/{trigger}` (a page), `GET /v1/dead-letters/{trigger}/{sequence}`,
//! `POST /v1/dead-letters/{trigger}/replay` and `POST
//! /v1/dead-letters/{trigger}/purge`, so operators need no NATS credentials.
//!
//! With `bearer_token` set, every endpoint but `/healthz` and `/readyz` (the
//! orchestrator's probes) requires it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prometheus_client::registry::Registry;
use secrecy::SecretString;
use serde::Deserialize;
use serde_json::json;
use switchyard_bus::Bus;
use switchyard_dispatcher::DispatcherView;

use crate::sources::{SourceCell, SourceState, SourceStatus};

#[derive(Clone)]
pub struct AdminState {
    registry: Arc<Registry>,
    ready: Arc<AtomicBool>,
    running: Arc<OnceLock<(DispatcherView, Bus)>>,
    sources: Arc<std::sync::RwLock<Vec<Arc<SourceCell>>>>,
    /// The schedules configured now (replaced at every reload).
    schedules:
        Arc<std::sync::RwLock<Vec<switchyard_connector_schedule::source::ScheduleSourceConfig>>>,
    /// Made when the first managed function is.
    workers: Arc<OnceLock<Arc<switchyard_workers::Workers>>>,
    /// The state this process runs.
    revision: Arc<std::sync::RwLock<crate::live::Revision>>,
    /// Where `POST /v1/reload` asks the running process to re-read its file.
    reloads: Option<tokio::sync::mpsc::Sender<crate::ReloadRequest>>,
    tokens: Arc<Vec<SecretString>>,
    /// The last check that the events stream answers (it has a leader), and when:
    /// `/readyz` asks NATS at most once a second, however often it is asked.
    stream_check: Arc<tokio::sync::Mutex<Option<StreamCheck>>>,
    /// Why the last attempt to connect to NATS failed, when the server said why
    /// (refused credentials): `/readyz` tells it; no secret is in it.
    connect_problem: Arc<std::sync::Mutex<Option<String>>>,
    /// What `/v1/console` tells the web console.
    console: Arc<crate::console::ConsoleInfo>,
}

/// When the events stream was last asked for, and what it answered.
type StreamCheck = (std::time::Instant, Result<(), String>);

impl AdminState {
    pub fn new(
        registry: Arc<Registry>,
        ready: Arc<AtomicBool>,
        workers: Arc<OnceLock<Arc<switchyard_workers::Workers>>>,
        revision: Arc<std::sync::RwLock<crate::live::Revision>>,
        reloads: Option<tokio::sync::mpsc::Sender<crate::ReloadRequest>>,
    ) -> Self {
        AdminState {
            registry,
            ready,
            workers,
            revision,
            reloads,
            running: Arc::new(OnceLock::new()),
            sources: Arc::default(),
            schedules: Arc::default(),
            tokens: Arc::new(Vec::new()),
            stream_check: Arc::default(),
            connect_problem: Arc::default(),
            console: Arc::default(),
        }
    }

    /// What the web console is told of this process (the dead-letter flag follows
    /// the tokens).
    pub fn with_console(mut self, info: crate::console::ConsoleInfo) -> Self {
        self.console = Arc::new(info);
        self
    }

    /// What `/readyz` says while connecting: why the server refused, or none.
    pub fn set_connect_problem(&self, problem: Option<String>) {
        *self.connect_problem.lock().expect("not poisoned") = problem;
    }

    /// Whether the events stream answers now (checked at most once a second).
    async fn events_stream_answers(&self, bus: &Bus) -> Result<(), String> {
        let mut check = self.stream_check.lock().await;
        if let Some((at, result)) = &*check
            && at.elapsed() < std::time::Duration::from_secs(1)
        {
            return result.clone();
        }
        let stream = bus.events_stream().to_owned();
        let result = match tokio::time::timeout(
            std::time::Duration::from_secs(2),
            bus.jetstream().get_stream(&stream),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => {
                // The cause is logged, not told to unauthenticated callers.
                tracing::warn!(%error, stream = %stream, "readiness: the events stream does not answer");
                Err("the events stream does not answer".to_owned())
            }
            Err(_) => Err("the events stream did not answer within 2s".to_owned()),
        };
        *check = Some((std::time::Instant::now(), result.clone()));
        result
    }

    /// The tokens the endpoints but the probes require; none leaves them open and
    /// the dead-letter endpoints off.
    pub fn with_tokens(mut self, tokens: Vec<SecretString>) -> Self {
        self.tokens = Arc::new(tokens);
        self
    }

    /// The sources running now (replaced at every reload).
    pub fn set_sources(&self, sources: Vec<Arc<SourceCell>>) {
        *self.sources.write().expect("sources lock") = sources;
    }

    /// The schedules configured now.
    pub fn set_schedules(
        &self,
        schedules: Vec<switchyard_connector_schedule::source::ScheduleSourceConfig>,
    ) {
        *self.schedules.write().expect("schedules lock") = schedules;
    }

    fn source_statuses(&self) -> Vec<SourceStatus> {
        self.sources
            .read()
            .expect("sources lock")
            .iter()
            .map(|cell| cell.status())
            .collect()
    }

    fn revision(&self) -> crate::live::Revision {
        self.revision.read().expect("revision lock").clone()
    }

    pub fn set_dispatcher(&self, view: DispatcherView, bus: Bus) {
        let _ = self.running.set((view, bus));
    }
}

pub fn router(state: AdminState) -> Router {
    let guarded = Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/triggers", get(triggers))
        .route("/v1/sources", get(sources))
        .route("/v1/functions", get(functions))
        .route("/v1/schedules", get(schedules))
        .route("/v1/functions/{name}/logs", get(function_logs))
        .route("/v1/functions/{name}/invocations", get(invocations))
        .route("/v1/console", get(console_info))
        .route("/v1/reload", post(reload))
        .route("/v1/dead-letters/{trigger}", get(dead_letters))
        .route("/v1/dead-letters/{trigger}/{sequence}", get(dead_letter))
        .route("/v1/dead-letters/{trigger}/replay", post(replay))
        .route("/v1/dead-letters/{trigger}/purge", post(purge))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authenticate,
        ));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .merge(crate::console::router())
        .merge(guarded)
        .with_state(state)
}

/// A refused admin request, answered as `{"error": "..."}`.
struct Refusal(StatusCode, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (self.0, axum::Json(json!({ "error": self.1 }))).into_response()
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Refusal {
    Refusal(status, message.into())
}

fn error_response(status: StatusCode, message: impl Into<String>) -> Response {
    error(status, message).into_response()
}

/// Requires one of the admin tokens, when there are any.
async fn authenticate(
    State(state): State<AdminState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if !state.tokens.is_empty() {
        let tokens: Vec<&SecretString> = state.tokens.iter().collect();
        if let Err(refusal) =
            switchyard_connector_http::signature::check_bearer(request.headers(), &tokens)
        {
            let status = match refusal {
                switchyard_connector_http::signature::AuthError::Missing(_) => {
                    StatusCode::UNAUTHORIZED
                }
                _ => StatusCode::FORBIDDEN,
            };
            return (
                status,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                axum::Json(json!({ "error": refusal.to_string() })),
            )
                .into_response();
        }
    }
    next.run(request).await
}

/// The bus, once connected, for the dead-letter endpoints; they need an admin token.
fn dead_letter_bus(state: &AdminState) -> Result<(Bus, Vec<String>), Refusal> {
    if state.tokens.is_empty() {
        return Err(error(
            StatusCode::FORBIDDEN,
            "the dead-letter endpoints are served only with admin.bearer_token set",
        ));
    }
    let (view, bus) = state
        .running
        .get()
        .ok_or_else(|| error(StatusCode::SERVICE_UNAVAILABLE, "not connected to nats yet"))?;
    let triggers = view
        .triggers()
        .into_iter()
        .map(|trigger| trigger.name)
        .collect();
    Ok((bus.clone(), triggers))
}

#[derive(Deserialize)]
struct Page {
    /// Only dead letters after this sequence.
    #[serde(default)]
    after: u64,
    /// At most this many (100 by default, at most 1000).
    #[serde(default = "default_page")]
    limit: u64,
}

fn default_page() -> u64 {
    100
}

async fn dead_letters(
    State(state): State<AdminState>,
    Path(trigger): Path<String>,
    Query(page): Query<Page>,
) -> Response {
    let (bus, _) = match dead_letter_bus(&state) {
        Ok(found) => found,
        Err(refusal) => return refusal.into_response(),
    };
    let limit = page.limit.clamp(1, 1000);
    match crate::dlq::list_page(&bus, &trigger, page.after, limit).await {
        Ok(entries) => {
            let next = (entries.len() as u64 == limit)
                .then(|| entries.last().map(|entry| entry.sequence))
                .flatten();
            axum::Json(json!({
                "trigger": trigger,
                "dead_letters": entries.iter().map(crate::dlq::entry_json).collect::<Vec<_>>(),
                // Pass as `after` for the next page; null on the last.
                "next_after": next,
            }))
            .into_response()
        }
        Err(problem) => error_response(StatusCode::BAD_GATEWAY, format!("{problem:#}")),
    }
}

async fn dead_letter(
    State(state): State<AdminState>,
    Path((trigger, sequence)): Path<(String, u64)>,
) -> Response {
    let (bus, _) = match dead_letter_bus(&state) {
        Ok(found) => found,
        Err(refusal) => return refusal.into_response(),
    };
    match crate::dlq::show(&bus, &trigger, sequence).await {
        Ok(entry) => axum::Json(crate::dlq::entry_json(&entry)).into_response(),
        Err(problem) => error_response(StatusCode::NOT_FOUND, format!("{problem:#}")),
    }
}

/// Which dead letters an operation takes: `{"sequences": [..]}` or `{"all": true}`
/// (with replay, optionally only those of one `reason`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Selection {
    #[serde(default)]
    sequences: Vec<u64>,
    #[serde(default)]
    all: bool,
    #[serde(default)]
    reason: Option<String>,
}

impl Selection {
    fn problem(&self) -> Option<&'static str> {
        match (self.all, self.sequences.is_empty()) {
            (false, true) => Some("name the dead letters by `sequences`, or pass `\"all\": true`"),
            (true, false) => Some("pass `sequences` or `\"all\": true`, not both"),
            _ => None,
        }
    }
}

fn selection(body: &[u8]) -> Result<Selection, Refusal> {
    let selection: Selection = serde_json::from_slice(body).map_err(|problem| {
        error(
            StatusCode::BAD_REQUEST,
            format!("the body must be {{\"sequences\": [..]}} or {{\"all\": true}}: {problem}"),
        )
    })?;
    match selection.problem() {
        Some(problem) => Err(error(StatusCode::BAD_REQUEST, problem)),
        None => Ok(selection),
    }
}

async fn replay(
    State(state): State<AdminState>,
    Path(trigger): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let (bus, triggers) = match dead_letter_bus(&state) {
        Ok(found) => found,
        Err(refusal) => return refusal.into_response(),
    };
    let selection = match selection(&body) {
        Ok(found) => found,
        Err(refusal) => return refusal.into_response(),
    };
    if !trigger.starts_with("source:") && !triggers.contains(&trigger) {
        return error_response(
            StatusCode::CONFLICT,
            format!(
                "trigger `{trigger}` is not configured: replaying would send its dead letters to a subject no consumer reads (list or purge them instead)"
            ),
        );
    }
    let entries = if selection.all {
        match crate::dlq::list(&bus, &trigger).await {
            Ok(entries) => entries
                .into_iter()
                .filter(|entry| {
                    selection
                        .reason
                        .as_ref()
                        .is_none_or(|reason| &entry.dead_letter.reason == reason)
                })
                .collect(),
            Err(problem) => return error_response(StatusCode::BAD_GATEWAY, format!("{problem:#}")),
        }
    } else {
        let mut entries = Vec::new();
        for &sequence in &selection.sequences {
            match crate::dlq::show(&bus, &trigger, sequence).await {
                Ok(entry) => entries.push(entry),
                Err(problem) => {
                    return error_response(StatusCode::NOT_FOUND, format!("{problem:#}"));
                }
            }
        }
        entries
    };
    if let Some(entry) = entries
        .iter()
        .find(|entry| entry.malformed_headers.is_some() || entry.incomplete.is_some())
    {
        return error_response(
            StatusCode::CONFLICT,
            format!(
                "dead letter {} cannot be replayed as it was (not a whole CloudEvent); show it, fix it and send it again",
                entry.sequence
            ),
        );
    }
    match crate::dlq::replay(&bus, &trigger, &entries).await {
        Ok(replayed) => axum::Json(json!({ "replayed": replayed })).into_response(),
        Err(problem) => error_response(StatusCode::BAD_GATEWAY, format!("{problem:#}")),
    }
}

async fn purge(
    State(state): State<AdminState>,
    Path(trigger): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let (bus, _) = match dead_letter_bus(&state) {
        Ok(found) => found,
        Err(refusal) => return refusal.into_response(),
    };
    let selection = match selection(&body) {
        Ok(found) => found,
        Err(refusal) => return refusal.into_response(),
    };
    if selection.reason.is_some() {
        return error_response(
            StatusCode::BAD_REQUEST,
            "`reason` selects dead letters to replay only",
        );
    }
    let sequences = (!selection.all).then_some(selection.sequences.as_slice());
    if let Some(sequences) = sequences {
        for &sequence in sequences {
            if let Err(problem) = crate::dlq::show(&bus, &trigger, sequence).await {
                return error_response(StatusCode::NOT_FOUND, format!("{problem:#}"));
            }
        }
    }
    match crate::dlq::purge(&bus, &trigger, sequences).await {
        Ok(purged) => axum::Json(json!({ "purged": purged })).into_response(),
        Err(problem) => error_response(StatusCode::BAD_GATEWAY, format!("{problem:#}")),
    }
}

/// Managed functions (`lambda`): instances by state, cold starts, the last init error
/// and limits. Functions Switchyard does not run (`http`, `log`) are not listed.
async fn functions(State(state): State<AdminState>) -> Response {
    let functions = state
        .workers
        .get()
        .map(|workers| workers.status())
        .unwrap_or_default();
    axum::Json(serde_json::json!({
        "revision": state.revision(),
        "functions": functions,
    }))
    .into_response()
}

/// The last invocations of a managed function in this process, newest first
/// (`404` when this process runs no managed function of that name).
async fn invocations(State(state): State<AdminState>, Path(name): Path<String>) -> Response {
    match state
        .workers
        .get()
        .and_then(|workers| workers.invocations(&name))
    {
        Some(invocations) => axum::Json(json!({
            "function": name,
            "invocations": invocations,
        }))
        .into_response(),
        None => error_response(
            StatusCode::NOT_FOUND,
            format!("this process runs no managed function `{name}`"),
        ),
    }
}

/// What the web console needs to know of this process.
async fn console_info(State(state): State<AdminState>) -> Response {
    let mut info = (*state.console).clone();
    info.dead_letters = !state.tokens.is_empty();
    axum::Json(info).into_response()
}

/// Re-reads the configuration file and applies what changed: `200` with what
/// changed (or `unchanged`), `422` with the located mistakes when the file is
/// refused (nothing changed then), `500` when part of it could not be applied.
async fn reload(State(state): State<AdminState>) -> Response {
    let Some(reloads) = &state.reloads else {
        return error_response(
            StatusCode::CONFLICT,
            "this process was not started from a configuration file",
        );
    };
    let (reply, answer) = tokio::sync::oneshot::channel();
    if reloads.send(crate::ReloadRequest { reply }).await.is_err() {
        return error_response(StatusCode::SERVICE_UNAVAILABLE, "switchyard is stopping");
    }
    match answer.await {
        Ok(outcome) => {
            let status = match outcome.result {
                "applied" | "unchanged" => StatusCode::OK,
                "refused" => StatusCode::UNPROCESSABLE_ENTITY,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            (status, axum::Json(outcome)).into_response()
        }
        Err(_) => error_response(StatusCode::SERVICE_UNAVAILABLE, "switchyard is stopping"),
    }
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
        // Connected is not enough: with its stream leaderless (a cluster electing
        // one) or its server hung, publishes fail; a balancer should send elsewhere.
        let bus = &state.running.get().expect("connected implies running").1;
        match state.events_stream_answers(bus).await {
            Ok(()) => (StatusCode::OK, "ready\n").into_response(),
            Err(problem) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {problem}\n"),
            )
                .into_response(),
        }
    } else if !connected && state.ready.load(Ordering::SeqCst) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: disconnected from nats\n",
        )
            .into_response()
    } else if let Some(problem) = state.connect_problem.lock().expect("not poisoned").clone() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {problem}\n"),
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
        .map(|(view, _)| (view.triggers(), view.orphaned()))
        .unwrap_or_default();
    axum::Json(serde_json::json!({
        "revision": state.revision(),
        "triggers": triggers,
        // Triggers no longer configured whose consumers still held events at start:
        // `switchyard dlq drain --trigger <name>` moves them to its dead letters.
        "orphaned_consumers": orphaned,
    }))
    .into_response()
}

/// Each schedule with the newest time it fired across the cluster and its next
/// firing times.
async fn schedules(State(state): State<AdminState>) -> Response {
    let Some((_, bus)) = state.running.get() else {
        return Refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "not connected to nats yet".to_owned(),
        )
        .into_response();
    };
    let configs = state.schedules.read().expect("schedules lock").clone();
    let statuses = switchyard_connector_schedule::source::statuses(bus, &configs).await;
    axum::Json(serde_json::json!({
        "revision": state.revision(),
        "schedules": statuses,
    }))
    .into_response()
}

#[derive(Debug, Deserialize)]
struct LogsParams {
    /// How far back, as `10m`, `2h` (default `10m`).
    since: Option<String>,
    /// From this time on (RFC 3339), instead of `since`: an invocation's `started`.
    start: Option<String>,
    request_id: Option<String>,
    #[serde(default)]
    follow: bool,
}

/// A function's stored log lines as JSON lines (`application/x-ndjson`), oldest
/// first; with `follow=true` the answer goes on with new lines.
async fn function_logs(
    State(state): State<AdminState>,
    Path(name): Path<String>,
    Query(params): Query<LogsParams>,
) -> Response {
    use futures::StreamExt as _;
    let Some((_, bus)) = state.running.get() else {
        return Refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "not connected to nats yet".to_owned(),
        )
        .into_response();
    };
    if !crate::function_logs::valid_function_name(&name) {
        return Refusal(
            StatusCode::BAD_REQUEST,
            format!("`{name}` is not a function name"),
        )
        .into_response();
    }
    let start = match params.start.as_deref().map(|start| {
        time::OffsetDateTime::parse(start, &time::format_description::well_known::Rfc3339)
    }) {
        None => None,
        Some(Ok(start)) => Some(start),
        Some(Err(error)) => {
            return Refusal(
                StatusCode::BAD_REQUEST,
                format!("start: {error} (write it as RFC 3339, 2026-12-06T10:00:00Z)"),
            )
            .into_response();
        }
    };
    let since = match params.since.as_deref().map(humantime::parse_duration) {
        None => std::time::Duration::from_secs(600),
        Some(Ok(since)) => since,
        Some(Err(error)) => {
            return Refusal(
                StatusCode::BAD_REQUEST,
                format!("since: {error} (write it as 10m, 2h, 1d)"),
            )
            .into_response();
        }
    };
    let query = crate::function_logs::LogQuery {
        since,
        start,
        request_id: params.request_id,
        follow: params.follow,
    };
    match crate::function_logs::read(bus, &name, query).await {
        Ok(lines) => {
            let body = lines.map(|line| {
                let mut text = serde_json::to_vec(&line).unwrap_or_default();
                text.push(b'\n');
                Ok::<_, std::convert::Infallible>(bytes::Bytes::from(text))
            });
            (
                [(header::CONTENT_TYPE, "application/x-ndjson")],
                axum::body::Body::from_stream(body),
            )
                .into_response()
        }
        Err(error) => Refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("reading the logs stream failed: {error}"),
        )
        .into_response(),
    }
}

async fn sources(State(state): State<AdminState>) -> Response {
    axum::Json(serde_json::json!({
        "revision": state.revision(),
        "sources": state.source_statuses(),
    }))
    .into_response()
}
