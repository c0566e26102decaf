//! The HTTP source: CloudEvents over HTTP and plain webhooks into the bus.
//!
//! `POST /v1/events` takes the CloudEvents HTTP binding in binary, structured and
//! batch modes; `POST /hooks/{name}` takes any body for a configured webhook. The
//! answer is `202` with the event ids only after the bus acknowledged every event of
//! the request, so a sender that saw `202` can forget the event and a sender that saw
//! anything else knows Switchyard does not own it (and may resend: ids are
//! deduplicated). A batch is validated whole before anything is published.

pub mod config;
pub mod listener;
pub mod signature;

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde_json::json;
use switchyard_connector_s3::sns::{SnsError, SnsVerifier};
use switchyard_event::telemetry::{self, SpanKind};
use switchyard_event::timestamp::now_rfc3339;
use switchyard_event::{
    DedupHorizon, Event, EventSink, PublishError, parse_batch, parse_structured,
};

pub use config::{
    CorsConfig, HookConfig, HookFormat, HttpSourceConfig, RouteConfig, SignatureConfig,
    SignatureEncoding,
};
use signature::{AuthError, check_bearer, check_signature};

/// Labels of the HTTP source's counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: String,
}

/// Counters of every HTTP source in the process.
#[derive(Clone, Default)]
pub struct HttpSourceMetrics {
    pub events_received: Family<SourceLabels, Counter>,
    pub events_published: Family<SourceLabels, Counter>,
    pub requests_rejected: Family<SourceLabels, Counter>,
}

impl HttpSourceMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "events_received",
            "events received by a source",
            self.events_received.clone(),
        );
        registry.register(
            "events_published",
            "events a source published and the bus acknowledged",
            self.events_published.clone(),
        );
        registry.register(
            "requests_rejected",
            "requests a source refused (malformed, unauthenticated, too large, bus unavailable)",
            self.requests_rejected.clone(),
        );
    }
}

pub use switchyard_event::ReservedSources;

struct SourceState {
    config: HttpSourceConfig,
    /// Raw hooks keep their request on the event (`keep_request`).
    keep_requests: bool,
    reserved: Arc<ReservedSources>,
    /// Delivery ids remembered past the duplicate window, by hook name.
    horizons: HashMap<String, Arc<dyn DedupHorizon>>,
    hooks: HashMap<String, HookConfig>,
    /// SNS verification of `format = "s3"` hooks, by hook name.
    sns: HashMap<String, SnsVerifier>,
    sink: Arc<dyn EventSink>,
    metrics: HttpSourceMetrics,
    labels: SourceLabels,
}

/// An HTTP source: its router served on the listener bound at start (bound once, so
/// its address never changes across restarts), run and supervised by the binary.
pub struct HttpSource {
    name: String,
    /// Taken out (closed) at shutdown, so new connections are refused at once while
    /// the requests in flight finish.
    listener: Arc<std::sync::Mutex<Option<std::net::TcpListener>>>,
    router: Router,
    limits: listener::ListenerLimits,
    tls: Option<listener::TlsFiles>,
    /// Stops the [`not_ready`] server answering on the listener until the source runs.
    interim: tokio_util::sync::CancellationToken,
}

/// Serves `listener` with `503 not ready` (and `Retry-After`) until `until` is
/// cancelled: from the moment the port is bound until the source runs (the bus
/// connected and set up), a client gets a fast answer instead of waiting unanswered.
pub fn not_ready(
    listener: tokio::net::TcpListener,
    limits: listener::ListenerLimits,
    tls: Option<listener::TlsFiles>,
    until: tokio_util::sync::CancellationToken,
) {
    let router = Router::new().fallback(|| async {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            axum::Json(json!({ "error": "not ready: connecting to the event bus" })),
        )
    });
    tokio::spawn(async move {
        if let Err(error) = listener::serve(
            listener,
            router,
            &limits,
            tls.as_ref(),
            until.cancelled_owned(),
        )
        .await
        {
            tracing::warn!(%error, "the not-ready answers stopped");
        }
    });
}

impl HttpSource {
    /// `listener` must be in non-blocking mode (as `tokio::net::TcpListener::into_std`
    /// leaves it).
    pub fn new(
        name: String,
        listener: std::net::TcpListener,
        router: Router,
        limits: listener::ListenerLimits,
        tls: Option<listener::TlsFiles>,
        interim: tokio_util::sync::CancellationToken,
    ) -> Self {
        HttpSource {
            name,
            listener: Arc::new(std::sync::Mutex::new(Some(listener))),
            router,
            limits,
            tls,
            interim,
        }
    }
}

#[async_trait::async_trait]
impl switchyard_event::Source for HttpSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        "http"
    }

    /// Serves until `shutdown`, then lets requests in flight finish (each answers
    /// only once its events are stored). Fails when the listener fails.
    async fn run(
        &self,
        health: &dyn switchyard_event::SourceHealth,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Result<(), String> {
        let listener = self
            .listener
            .lock()
            .expect("listener lock")
            .as_ref()
            .ok_or_else(|| "the listener was closed at shutdown".to_owned())?
            .try_clone()
            .and_then(tokio::net::TcpListener::from_std)
            .map_err(|error| format!("listener: {error}"))?;
        // The source answers from now on: the interim `503`s stop.
        self.interim.cancel();
        health.up();
        let original = self.listener.clone();
        listener::serve(
            listener,
            self.router.clone(),
            &self.limits,
            self.tls.as_ref(),
            async move {
                shutdown.cancelled().await;
                // The server drops its copy; the socket closes once this one goes too.
                drop(original.lock().expect("listener lock").take());
            },
        )
        .await
        .map_err(|error| format!("serving failed: {error}"))
    }
}

/// Builds the router of one HTTP source; `routes` (its function URLs, built by the
/// caller, without a fallback) are served beside `/v1/events` and `/hooks/{name}`.
/// With `keep_requests`, raw hooks keep their request on the event (for `lambda`
/// functions given AWS-shaped payloads).
pub fn router(
    config: HttpSourceConfig,
    sink: Arc<dyn EventSink>,
    metrics: HttpSourceMetrics,
    reserved: Arc<ReservedSources>,
    horizons: HashMap<String, Arc<dyn DedupHorizon>>,
    routes: Router,
    keep_requests: bool,
) -> Router {
    let hooks = config
        .hooks
        .iter()
        .map(|hook| (hook.name.clone(), hook.clone()))
        .collect();
    let labels = SourceLabels {
        source: config.name.clone(),
    };
    // Only `format = "s3"` hooks fetch SNS certificates: the client (and its TLS root
    // store) exists only when one is configured.
    let s3_hooks: Vec<&HookConfig> = config
        .hooks
        .iter()
        .filter(|hook| hook.format == HookFormat::S3)
        .collect();
    let client = (!s3_hooks.is_empty()).then(|| {
        reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            // A trusted certificate URL must not lead anywhere else.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("an HTTP client with rustls builds")
    });
    let sns = s3_hooks
        .into_iter()
        .filter_map(|hook| Some((hook, client.clone()?)))
        .map(|(hook, client)| {
            (
                hook.name.clone(),
                SnsVerifier::new(
                    hook.sns_topics.clone(),
                    hook.sns_trusted_urls.clone(),
                    client,
                ),
            )
        })
        .collect();
    let state = Arc::new(SourceState {
        config,
        keep_requests,
        reserved,
        horizons,
        hooks,
        sns,
        sink,
        metrics,
        labels,
    });
    let events_endpoint = state.config.events_endpoint;
    let mut router = Router::new();
    if events_endpoint {
        router = router.route("/v1/events", post(post_events));
    }
    router
        .route("/hooks/{name}", post(post_hook))
        .with_state(state.clone())
        .merge(routes)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
}

/// A refusal, answered as `{"error": "..."}` with its status.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(error: AuthError) -> Self {
        let status = match error {
            AuthError::Missing(_) => StatusCode::UNAUTHORIZED,
            AuthError::Invalid(_) => StatusCode::FORBIDDEN,
        };
        ApiError::new(status, error.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response =
            (self.status, axum::Json(json!({ "error": self.message }))).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        response
    }
}

/// The router's own refusals answer in JSON like every other error.
async fn not_found(uri: axum::http::Uri) -> Response {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "no such endpoint `{}`: events go to POST /v1/events, webhooks to POST /hooks/<name>",
            shorten(uri.path())
        ),
    )
    .into_response()
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    let mut response = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "`{method}` is not allowed on `{}`: use POST",
            shorten(uri.path())
        ),
    )
    .into_response();
    response
        .headers_mut()
        .insert(header::ALLOW, header::HeaderValue::from_static("POST"));
    response
}

async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body exceeds the limit of {limit} bytes"),
        )),
        Err(error) if is_body_timeout(error.as_ref()) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "the request body was not received within the listener's body_timeout",
        )),
        Err(error) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("reading the request body failed: {error}"),
        )),
    }
}

/// Whether a body read failed because the listener's `body_timeout` passed.
pub fn is_body_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if error.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        cause = error.source();
    }
    false
}

fn content_type(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
}

fn media_type_is(content_type: Option<&str>, expected: &str) -> bool {
    content_type
        .and_then(|value| value.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case(expected))
}

/// Copies W3C trace context from the request onto the event (the CloudEvents
/// distributed-tracing extension) unless the event already carries its own.
fn carry_trace_context(headers: &HeaderMap, event: &mut Event) {
    for name in ["traceparent", "tracestate"] {
        if event.extensions.contains_key(name) {
            continue;
        }
        if let Some(value) = headers.get(name).and_then(|value| value.to_str().ok()) {
            event.extensions.insert(name.to_owned(), value.to_owned());
        }
    }
}

async fn post_events(
    State(state): State<Arc<SourceState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match accept_events(&state, &headers, body).await {
        Ok(response) => response,
        Err(error) => refuse(&state, None, error),
    }
}

/// Counts and logs a refused request, and answers it.
fn refuse(state: &SourceState, hook: Option<&str>, error: ApiError) -> Response {
    state
        .metrics
        .requests_rejected
        .get_or_create(&state.labels)
        .inc();
    tracing::debug!(
        source = %state.config.name,
        hook = hook.unwrap_or(""),
        status = error.status.as_u16(),
        error = %error.message,
        "request refused"
    );
    error.into_response()
}

async fn accept_events(
    state: &SourceState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let tokens = state.config.tokens();
    if !tokens.is_empty() {
        check_bearer(headers, &tokens)?;
    }
    let body = read_body(body, state.config.max_body_bytes).await?;
    let content_type = content_type(headers);
    let mut events = if media_type_is(content_type, "application/cloudevents-batch+json") {
        parse_batch(&body).map_err(|error| {
            ApiError::new(StatusCode::BAD_REQUEST, format!("invalid batch: {error}"))
        })?
    } else if media_type_is(content_type, "application/cloudevents+json") {
        vec![parse_structured(&body).map_err(|error| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("invalid structured event: {error}"),
            )
        })?]
    } else if headers.contains_key("ce-specversion") {
        let mut pairs = Vec::new();
        for (name, value) in headers {
            let Ok(text) = value.to_str() else {
                if name.as_str().starts_with("ce-") {
                    return Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        format!(
                            "header `{name}` is not visible ASCII; percent-encode attribute values"
                        ),
                    ));
                }
                continue;
            };
            pairs.push((name.as_str(), text));
        }
        vec![Event::from_binary(pairs, body).map_err(|error| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("invalid binary-mode event: {error}"),
            )
        })?]
    } else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "not a cloudevent: send `ce-` headers (binary mode), `content-type: application/cloudevents+json` or `application/cloudevents-batch+json`",
        ));
    };
    for (index, event) in events.iter_mut().enumerate() {
        if let Some(owner) = state.reserved.owner(&event.source) {
            let which =
                if index > 0 || media_type_is(content_type, "application/cloudevents-batch+json") {
                    format!("event {index} of the batch: ")
                } else {
                    String::new()
                };
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "{which}source `{}` belongs to {owner}: events with it are accepted only through it",
                    shorten(&event.source)
                ),
            ));
        }
        carry_trace_context(headers, event);
    }
    publish(state, events).await
}

/// A source cut short for an error message.
fn shorten(text: &str) -> String {
    let mut end = text.len().min(200);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    if end < text.len() {
        format!("{}...", &text[..end])
    } else {
        text.to_owned()
    }
}

/// What a raw hook keeps of its request besides the body, for handlers that want
/// it as an HTTP request (an API Gateway payload with `payload = "aws"`).
struct RequestMeta {
    path: String,
    query: Option<String>,
    client_ip: Option<std::net::IpAddr>,
}

async fn post_hook(
    State(state): State<Arc<SourceState>>,
    Path(name): Path<String>,
    request: axum::extract::Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let meta = RequestMeta {
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        client_ip: parts
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|axum::extract::ConnectInfo(address)| address.ip()),
    };
    let headers = parts.headers;
    match accept_hook(&state, &name, &headers, body, &meta).await {
        Ok(response) => response,
        Err(error) => refuse(&state, Some(&name), error),
    }
}

async fn accept_hook(
    state: &SourceState,
    name: &str,
    headers: &HeaderMap,
    body: Body,
    meta: &RequestMeta,
) -> Result<Response, ApiError> {
    let hook = state.hooks.get(name).ok_or_else(|| {
        ApiError::new(StatusCode::NOT_FOUND, format!("no webhook named `{name}`"))
    })?;
    // A hook's own token(s), signature or SNS signatures; a hook with none takes the
    // source's tokens.
    let tokens = if hook.authenticates_itself() {
        hook.tokens()
    } else {
        state.config.tokens()
    };
    if !tokens.is_empty() {
        check_bearer(headers, &tokens)?;
    }
    let body = read_body(body, state.config.max_body_bytes).await?;
    if let Some(signature) = &hook.signature {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        check_signature(signature, headers, &body, now)?;
    }
    if hook.format == HookFormat::S3 {
        return accept_notification(state, hook, headers, body).await;
    }
    let header_value = |name: &Option<String>| -> Result<Option<String>, ApiError> {
        let Some(name) = name else { return Ok(None) };
        match headers.get(name.as_str()) {
            None => Ok(None),
            Some(value) => match value.to_str() {
                Ok(text) if !text.trim().is_empty() => Ok(Some(text.trim().to_owned())),
                Ok(_) => Ok(None),
                Err(_) => Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("header `{name}` is not visible ASCII"),
                )),
            },
        }
    };
    let id = header_value(&hook.id_header)?.unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let source = hook
        .event_source
        .clone()
        .unwrap_or_else(|| format!("/hooks/{}", hook.name));
    let mut event = Event::new(id, source, hook.event_type.clone().unwrap_or_default());
    event.subject = header_value(&hook.subject_header)?;
    event.time = Some(now_rfc3339());
    event.datacontenttype = content_type(headers)
        .filter(|value| !value.is_empty())
        .map(str::to_owned);
    event.data = body;
    carry_trace_context(headers, &mut event);
    if state.keep_requests {
        keep_request(headers, meta, hook, &mut event);
    }
    event.validate().map_err(|error| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("invalid webhook request: {error}"),
        )
    })?;
    let Some(horizon) = state.horizons.get(&hook.name) else {
        return publish(state, vec![event]).await;
    };
    // The id header is not signed: a captured request replayed with a fresh id would
    // pass. So what the signature covers is remembered too, and seen again within
    // the horizon it is dropped as a replay: GitHub's body (its deliveries' bodies
    // differ), or an HMAC's `<timestamp>.<body>` (a resend signs a new timestamp). An
    // HMAC over the body alone is not: a generic provider may send the same body
    // twice on purpose (CONFIG.md says what that scheme cannot stop).
    let signed_message = match &hook.signature {
        Some(SignatureConfig::Github { .. }) => Some(event.data.to_vec()),
        Some(SignatureConfig::Hmac {
            timestamp_header: Some(name),
            ..
        }) => headers
            .get(name.as_str())
            .and_then(|value| value.to_str().ok())
            .map(|timestamp| [timestamp.trim().as_bytes(), b".", &event.data].concat()),
        _ => None,
    };
    let body_seen = signed_message.map(|message| {
        use sha2::Digest as _;
        Event::new(
            format!("sha256:{}", hex::encode(sha2::Sha256::digest(&message))),
            event.source.clone(),
            "dev.switchyard.hook.signed",
        )
    });
    let seen = match &body_seen {
        Some(body) => match (horizon.seen(&event).await, horizon.seen(body).await) {
            (Ok(id), Ok(body)) => Ok(id || body),
            (Err(error), _) | (_, Err(error)) => Err(error),
        },
        None => horizon.seen(&event).await,
    };
    match seen {
        Ok(true) => {
            tracing::debug!(source = %state.config.name, hook = %hook.name, event_id = %event.id, "redelivery within the dedup horizon dropped");
            return Ok((
                StatusCode::ACCEPTED,
                axum::Json(json!({ "accepted": [{ "id": event.id, "duplicate": true }] })),
            )
                .into_response());
        }
        Ok(false) => {}
        // The events stream's duplicate window still applies.
        Err(error) => {
            tracing::warn!(source = %state.config.name, hook = %hook.name, %error, stage = "dedup", "reading the dedup horizon failed")
        }
    }
    let remembered = Event::new(event.id.clone(), event.source.clone(), event.ty.clone());
    let response = publish(state, vec![event]).await?;
    for remembered in std::iter::once(&remembered).chain(&body_seen) {
        if let Err(error) = horizon.remember(remembered).await {
            tracing::warn!(source = %state.config.name, hook = %hook.name, %error, stage = "dedup", "recording a delivery failed; a late redelivery may be delivered again");
        }
    }
    Ok(response)
}

/// Headers never kept on a hook's event: credentials (the bus is no place for them).
const UNKEPT_HEADERS: [&str; 3] = ["authorization", "proxy-authorization", "cookie"];

/// Most bytes of request headers a hook's event keeps (as JSON): more is not kept.
pub const MAX_KEPT_HEADER_BYTES: usize = 16 * 1024;

/// Keeps the request's path, query, client address and headers (without
/// credentials and cookies; repeated ones joined by commas, as API Gateway does) in
/// the extensions `httppath`, `httpquery`, `httpsourceip` and `httpheaders` (a JSON
/// object), so a `lambda` function with `payload = "aws"` gets the request as API
/// Gateway's payload format 2.0. The `id_header` and `subject_header` are not copied
/// (they are the event's id and subject; `httpidheader` and `httpsubjectheader` name
/// them); headers over [`MAX_KEPT_HEADER_BYTES`] in all are not kept at all
/// (`httpheaders` is then absent and `httpheadersdropped` says how large they were).
fn keep_request(headers: &HeaderMap, meta: &RequestMeta, hook: &HookConfig, event: &mut Event) {
    let mut kept = serde_json::Map::new();
    let is = |name: &axum::http::HeaderName, configured: &Option<String>| {
        configured
            .as_deref()
            .is_some_and(|configured| name.as_str().eq_ignore_ascii_case(configured))
    };
    for (name, value) in headers {
        if UNKEPT_HEADERS.contains(&name.as_str())
            || is(name, &hook.id_header)
            || is(name, &hook.subject_header)
        {
            continue;
        }
        let value = String::from_utf8_lossy(value.as_bytes());
        match kept.get_mut(name.as_str()) {
            Some(serde_json::Value::String(joined)) => {
                joined.push(',');
                joined.push_str(&value);
            }
            _ => {
                kept.insert(name.as_str().to_owned(), value.into_owned().into());
            }
        }
    }
    let extensions = &mut event.extensions;
    extensions.insert("httppath".to_owned(), meta.path.clone());
    if let Some(query) = meta.query.as_ref().filter(|query| !query.is_empty()) {
        extensions.insert("httpquery".to_owned(), query.clone());
    }
    if let Some(ip) = meta.client_ip {
        extensions.insert("httpsourceip".to_owned(), ip.to_string());
    }
    if let Some(name) = hook
        .id_header
        .as_ref()
        .filter(|name| headers.contains_key(name.as_str()))
    {
        extensions.insert("httpidheader".to_owned(), name.to_ascii_lowercase());
    }
    if let Some(name) = hook
        .subject_header
        .as_ref()
        .filter(|name| headers.contains_key(name.as_str()))
    {
        extensions.insert("httpsubjectheader".to_owned(), name.to_ascii_lowercase());
    }
    let kept = serde_json::Value::Object(kept).to_string();
    if kept.len() > MAX_KEPT_HEADER_BYTES {
        extensions.insert("httpheadersdropped".to_owned(), kept.len().to_string());
    } else {
        extensions.insert("httpheaders".to_owned(), kept);
    }
}

/// An S3 event notification: one event per record, all published or none answered
/// `202`. A store's test message is answered `200` with nothing accepted.
async fn accept_notification(
    state: &SourceState,
    hook: &HookConfig,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let mut body = body;
    let verifier = &state.sns[&hook.name];
    if headers
        .get("x-amz-sns-rawdelivery")
        .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"true"))
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "SNS raw message delivery carries no signature and is not accepted: turn raw delivery off for this subscription",
        ));
    }
    let sns = headers.contains_key("x-amz-sns-message-type")
        || switchyard_connector_s3::sns::looks_like_sns(&body);
    if sns && !verifier.accepts_sns() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "SNS message refused: hook `{}` has no sns_topics (the topic ARNs to accept)",
                hook.name
            ),
        ));
    }
    if !sns && verifier.accepts_sns() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "hook `{}` takes only signed SNS messages from its sns_topics",
                hook.name
            ),
        ));
    }
    if sns {
        let message = verifier.verify(&body).await.map_err(|error| match error {
            SnsError::Json(_) | SnsError::Kind(_) | SnsError::Version(_) => ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("invalid SNS message: {error}"),
            ),
            SnsError::Certificate(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot verify the SNS message yet: {error}"),
            ),
            _ => ApiError::new(
                StatusCode::FORBIDDEN,
                format!("SNS message refused: {error}"),
            ),
        })?;
        match message.kind.as_str() {
            "SubscriptionConfirmation" => {
                verifier
                    .confirm(&message)
                    .await
                    .map_err(|error| ApiError::new(StatusCode::BAD_GATEWAY, error.to_string()))?;
                tracing::info!(source = %state.config.name, hook = %hook.name, topic = %message.topic_arn, "SNS subscription confirmed");
                return Ok((
                    StatusCode::OK,
                    axum::Json(json!({ "confirmed": message.topic_arn })),
                )
                    .into_response());
            }
            "UnsubscribeConfirmation" => {
                tracing::warn!(source = %state.config.name, hook = %hook.name, topic = %message.topic_arn, "SNS subscription removed");
                return Ok((StatusCode::OK, axum::Json(json!({ "accepted": [] }))).into_response());
            }
            _ => body = Bytes::from(message.message),
        }
    }
    let mut events = switchyard_connector_s3::object_events_with(&body, hook.key_encoding)
        .map_err(|error| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("invalid S3 event notification: {error}"),
            )
        })?;
    if events.is_empty() {
        tracing::info!(source = %state.config.name, hook = %hook.name, "notification without object records (a store's test message) received");
        return Ok((StatusCode::OK, axum::Json(json!({ "accepted": [] }))).into_response());
    }
    for event in &mut events {
        carry_trace_context(headers, event);
    }
    publish(state, events).await
}

async fn publish(state: &SourceState, mut events: Vec<Event>) -> Result<Response, ApiError> {
    let count = events.len() as u64;
    state
        .metrics
        .events_received
        .get_or_create(&state.labels)
        .inc_by(count);
    // Each event's ingest span, a child of the trace context it came with; its
    // `traceparent` becomes the span's (see switchyard_event::telemetry).
    let mut spans = telemetry::start_ingests(&mut events, SpanKind::Server, &state.config.name);
    // All or none: a batch (or a notification with several records) is one atomic
    // batch on the bus.
    let published = state.sink.publish_atomically(events).await;
    if let Err(error) = &published {
        for span in &mut spans {
            span.fail(error.to_string());
        }
    }
    drop(spans);
    let receipts = published.map_err(|error| match error {
        PublishError::Unavailable(reason) => {
            tracing::warn!(source = %state.config.name, error = %reason, stage = "publish", "event bus unavailable");
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("event bus unavailable, retry later: {reason}"))
        }
        PublishError::TooLarge(reason) => ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, reason),
        PublishError::Rejected(reason) => {
            tracing::warn!(source = %state.config.name, error = %reason, stage = "publish", "event bus rejected the publish");
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, format!("event bus rejected the event: {reason}"))
        }
    })?;
    state
        .metrics
        .events_published
        .get_or_create(&state.labels)
        .inc_by(count);
    let accepted: Vec<_> = receipts
        .iter()
        .map(|receipt| json!({ "id": receipt.event_id, "duplicate": receipt.duplicate }))
        .collect();
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(json!({ "accepted": accepted })),
    )
        .into_response())
}
