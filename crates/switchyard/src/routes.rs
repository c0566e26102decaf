//! Function URLs: `[[sources.routes]]` of an HTTP source answer requests under a path
//! with a function, synchronously.
//!
//! A `lambda` function gets the request as API Gateway's payload format 2.0 (what
//! Lambda's function URLs send) and its answer is read by the function URL rules; a
//! `process` or `http` function gets the request forwarded as it came. The call takes
//! a place in the function's `max_concurrency`, the budget its triggers use, waiting
//! at most the route's `max_wait`, then answers `429` with `Retry-After` (Lambda's
//! throttling). A timeout answers `504`; a function error, a crash or an answer that
//! cannot be read `502`, with the error type in `x-amzn-ErrorType` (as API Gateway
//! does). Calls are not stored on the bus; with `record`, each request and response
//! is published afterwards as a CloudEvent for audit.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use switchyard_bus::Bus;
use switchyard_connector_http::signature::{AuthError, check_bearer, check_signature};
use switchyard_connector_http::{CorsConfig, HttpSourceConfig, RouteConfig};
use switchyard_event::{Event, PublishError};
use switchyard_targets::forward::{Forward, ForwardError, Forwarded};
use switchyard_workers::Called;
use switchyard_workers::aws::{HttpRequest, http_api_request, http_api_response};
use tower_http::cors::{AllowHeaders, AllowMethods, AllowOrigin, CorsLayer, ExposeHeaders};

use crate::calls::{CallKind, SyncFunction};

/// Largest event a `lambda` function takes synchronously (Lambda's 6 MB).
const MAX_LAMBDA_PAYLOAD: usize = 6 * 1024 * 1024;

/// The CloudEvent type of a recorded call (`record = true`).
pub const RECORD_TYPE: &str = "dev.switchyard.route.call";

/// The source of the recorded calls of an HTTP source's routes.
pub fn record_source(source: &str) -> String {
    format!("{RECORD_SOURCE_PREFIX}{source}")
}

/// What every [`record_source`] starts with.
pub const RECORD_SOURCE_PREFIX: &str = "/routes/";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub source: String,
    pub function: String,
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RecordLabels {
    pub source: String,
}

/// Counters of every route in the process.
#[derive(Clone, Default)]
pub struct RouteMetrics {
    pub requests: Family<RouteLabels, Counter>,
    pub records_failed: Family<RecordLabels, Counter>,
}

impl RouteMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "route_requests",
            "requests answered by function URLs (routes), by status code",
            self.requests.clone(),
        );
        registry.register(
            "route_records_failed",
            "calls of routes with `record = true` whose record could not be stored",
            self.records_failed.clone(),
        );
    }
}

/// One route, ready to serve.
struct Route {
    config: RouteConfig,
    methods: Vec<Method>,
    function: Arc<SyncFunction>,
}

/// The routes sharing one path (told apart by method).
struct RouteGroup {
    source: String,
    max_body_bytes: usize,
    routes: Vec<Route>,
    bus: Bus,
    region: String,
    metrics: RouteMetrics,
}

/// The path a route's `path` is served at: no trailing `/` (but `/` itself).
pub fn normalized(path: &str) -> &str {
    match path.trim_end_matches('/') {
        "" => "/",
        trimmed => trimmed,
    }
}

/// The router of an HTTP source's routes (no fallback: the source's own answers
/// what no route takes). Every function a route names must be in `functions`.
pub fn router(
    source: &HttpSourceConfig,
    functions: &std::collections::HashMap<String, Arc<SyncFunction>>,
    bus: &Bus,
    region: &str,
    metrics: &RouteMetrics,
) -> anyhow::Result<Router> {
    let mut groups: BTreeMap<&str, Vec<Route>> = BTreeMap::new();
    for route in &source.routes {
        let function = functions.get(&route.function).cloned().ok_or_else(|| {
            anyhow::anyhow!(
                "route `{}`: function `{}` cannot be called synchronously",
                route.path,
                route.function
            )
        })?;
        let methods = route
            .methods
            .iter()
            .map(|method| Method::from_bytes(method.to_ascii_uppercase().as_bytes()))
            .collect::<Result<_, _>>()?;
        groups
            .entry(normalized(&route.path))
            .or_default()
            .push(Route {
                config: route.clone(),
                methods,
                function,
            });
    }
    let mut router = Router::new();
    for (path, routes) in groups {
        let cors = routes.first().and_then(|route| route.config.cors.clone());
        let group = Arc::new(RouteGroup {
            source: source.name.clone(),
            max_body_bytes: source.max_body_bytes,
            routes,
            bus: bus.clone(),
            region: region.to_owned(),
            metrics: metrics.clone(),
        });
        let mut handler = any(serve).with_state(group);
        if let Some(cors) = &cors {
            handler = handler.layer(cors_layer(cors));
        }
        let under = if path == "/" {
            "/{*rest}".to_owned()
        } else {
            format!("{path}/{{*rest}}")
        };
        router = router.route(path, handler.clone()).route(&under, handler);
    }
    Ok(router)
}

/// A function URL's CORS settings as tower-http's layer: it answers preflight
/// requests itself (before authentication, as browsers send them without
/// credentials) and adds the headers to every answer.
pub(crate) fn cors_layer(cors: &CorsConfig) -> CorsLayer {
    let any = |values: &[String]| values.iter().any(|value| value == "*");
    let values = |values: &[String]| -> Vec<HeaderValue> {
        values
            .iter()
            .filter_map(|value| HeaderValue::from_str(value).ok())
            .collect()
    };
    let names = |values: &[String]| -> Vec<HeaderName> {
        values
            .iter()
            .filter_map(|value| HeaderName::from_bytes(value.as_bytes()).ok())
            .collect()
    };
    let mut layer = CorsLayer::new()
        .allow_origin(if any(&cors.allow_origins) {
            AllowOrigin::any()
        } else {
            AllowOrigin::list(values(&cors.allow_origins))
        })
        .allow_methods(if any(&cors.allow_methods) {
            AllowMethods::any()
        } else {
            AllowMethods::list(cors.allow_methods.iter().filter_map(|method| {
                Method::from_bytes(method.to_ascii_uppercase().as_bytes()).ok()
            }))
        })
        .allow_headers(if any(&cors.allow_headers) {
            AllowHeaders::any()
        } else {
            AllowHeaders::list(names(&cors.allow_headers))
        })
        .expose_headers(if any(&cors.expose_headers) {
            ExposeHeaders::any()
        } else {
            ExposeHeaders::list(names(&cors.expose_headers))
        })
        .allow_credentials(cors.allow_credentials);
    if let Some(max_age) = cors.max_age {
        layer = layer.max_age(max_age);
    }
    layer
}

/// An answer of the route itself (not the function's), as API Gateway words them:
/// `{"message": ...}`.
pub(crate) fn refusal(status: StatusCode, message: &str) -> Response {
    (
        status,
        axum::Json(serde_json::json!({ "message": message })),
    )
        .into_response()
}

/// A function that failed: `502`, or `504` for a timeout, the error type in
/// `x-amzn-ErrorType`.
fn function_failed(error_type: &str) -> Response {
    let mut response = if error_type == "Sandbox.Timedout" {
        refusal(StatusCode::GATEWAY_TIMEOUT, "Endpoint request timed out")
    } else {
        refusal(StatusCode::BAD_GATEWAY, "Internal Server Error")
    };
    if let Ok(value) = HeaderValue::from_str(error_type) {
        response.headers_mut().insert("x-amzn-errortype", value);
    }
    response
}

/// Whether `route` takes `method` (a route taking `GET` takes `HEAD` too).
fn takes(route: &Route, method: &Method) -> bool {
    route.methods.is_empty()
        || route.methods.contains(method)
        || (method == Method::HEAD && route.methods.contains(&Method::GET))
}

/// Whether a path holds a `.` or `..` segment (also percent-encoded): such a path
/// would leave the route's prefix once normalised, so it is refused.
pub(crate) fn has_dot_segment(path: &str) -> bool {
    path.split('/').any(|segment| {
        let decoded = percent_encoding::percent_decode_str(segment).decode_utf8_lossy();
        decoded == "." || decoded == ".."
    })
}

async fn serve(State(group): State<Arc<RouteGroup>>, request: Request) -> Response {
    let started = Instant::now();
    let (parts, body) = request.into_parts();
    let Some(index) = group
        .routes
        .iter()
        .position(|route| takes(route, &parts.method))
    else {
        let allowed: Vec<&str> = group
            .routes
            .iter()
            .flat_map(|route| route.methods.iter().map(Method::as_str))
            .collect();
        let mut response = refusal(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed");
        if let Ok(value) = HeaderValue::from_str(&allowed.join(", ")) {
            response.headers_mut().insert(header::ALLOW, value);
        }
        count(&group, &group.routes[0], &response);
        return response;
    };
    let route = &group.routes[index];
    let response = if has_dot_segment(parts.uri.path()) {
        refusal(
            StatusCode::BAD_REQUEST,
            "the path holds a `.` or `..` segment",
        )
    } else {
        call(&group, index, parts, body).await
    };
    count(&group, route, &response);
    tracing::debug!(source = %group.source, function = %route.function.name, status = response.status().as_u16(), elapsed_ms = started.elapsed().as_millis() as u64, "route answered");
    response
}

fn count(group: &RouteGroup, route: &Route, response: &Response) {
    group
        .metrics
        .requests
        .get_or_create(&RouteLabels {
            source: group.source.clone(),
            function: route.function.name.clone(),
            code: response.status().as_u16(),
        })
        .inc();
}

fn auth_refusal(error: AuthError) -> Response {
    match error {
        AuthError::Missing(_) => refusal(StatusCode::UNAUTHORIZED, &error.to_string()),
        AuthError::Invalid(_) => refusal(StatusCode::FORBIDDEN, &error.to_string()),
    }
}

/// Authenticates and reads the request, then runs the call in a task of its own:
/// a client that goes away does not abandon the function midway (its instance
/// would be retired, and the next caller would pay a cold start).
async fn call(
    group: &Arc<RouteGroup>,
    index: usize,
    parts: axum::http::request::Parts,
    body: Body,
) -> Response {
    let route = &group.routes[index];
    let tokens = route.config.tokens();
    if !tokens.is_empty()
        && let Err(error) = check_bearer(&parts.headers, &tokens)
    {
        return auth_refusal(error);
    }
    let body = match Limited::new(body, group.max_body_bytes).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => {
            return refusal(StatusCode::PAYLOAD_TOO_LARGE, "Request Entity Too Large");
        }
        Err(_) => {
            return refusal(
                StatusCode::BAD_REQUEST,
                "the request body could not be read",
            );
        }
    };
    if let Some(signature) = &route.config.signature {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        if let Err(error) = check_signature(signature, &parts.headers, &body, now) {
            return auth_refusal(error);
        }
    }
    let group = group.clone();
    match tokio::spawn(async move { answer(&group, index, parts, body).await }).await {
        Ok(response) => response,
        Err(error) => {
            tracing::error!(%error, "a route call panicked");
            refusal(StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error")
        }
    }
}

/// Headers never put on the bus by `record = true`: credentials and cookies.
const UNRECORDED_HEADERS: [&str; 4] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
];

async fn answer(
    group: &RouteGroup,
    index: usize,
    parts: axum::http::request::Parts,
    body: Bytes,
) -> Response {
    let route = &group.routes[index];
    // Switchyard's own bearer token is not the function's to see.
    let withheld: &[HeaderName] = if !route.config.tokens().is_empty() {
        &[header::AUTHORIZATION]
    } else {
        &[]
    };
    let client_ip = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(address)| address.ip());
    let request_id = uuid::Uuid::new_v4().to_string();
    let time = time::OffsetDateTime::now_utc();
    let mut headers = parts.headers.clone();
    for name in withheld {
        headers.remove(name);
    }
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or("/", |path_and_query| path_and_query.as_str());
    let protocol = format!("{:?}", parts.version);
    let aws_request = HttpRequest {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query().unwrap_or_default(),
        headers: &headers,
        body: &body,
        protocol: &protocol,
        source_ip: client_ip.map(|ip| ip.to_string()).unwrap_or_default(),
        request_id: &request_id,
        api_id: &group.source,
        account_id: switchyard_workers::runtime_api::ACCOUNT_ID,
        time,
    };
    let Some(budget) = route.function.take_budget(route.config.max_wait).await else {
        let mut response = refusal(StatusCode::TOO_MANY_REQUESTS, "Too Many Requests");
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return response;
    };
    let timeout = route.function.timeout;
    let auth = match &route.function.kind {
        CallKind::Http(target) => target.auth().map(|auth| (auth, request_id.as_str())),
        _ => None,
    };
    let forward = || Forward {
        method: parts.method.clone(),
        path_and_query,
        headers: &parts.headers,
        body: body.clone(),
        client_ip,
        withheld,
        auth,
    };
    let mut response = match &route.function.kind {
        CallKind::Lambda(function) => {
            // Rendered once a place is held: requests waiting for one hold only
            // their body.
            let event = serde_json::to_vec(&http_api_request(&aws_request)).expect("json");
            if event.len() > MAX_LAMBDA_PAYLOAD {
                return refusal(StatusCode::PAYLOAD_TOO_LARGE, "Request Entity Too Large");
            }
            let (called, _) = function
                .call(request_id.clone(), Bytes::from(event), None, timeout, false)
                .await;
            lambda_response(&group.source, &route.function.name, called)
        }
        CallKind::Process(function) => match function.forward(forward(), timeout).await {
            Ok(forwarded) => forwarded_response(forwarded),
            Err(failure) => {
                tracing::warn!(source = %group.source, function = %route.function.name, error_type = %failure.error_type, error = %failure.message, "route call failed");
                function_failed(&failure.error_type)
            }
        },
        CallKind::Http(target) => {
            match switchyard_targets::forward::forward(
                target.client(),
                target.url(),
                forward(),
                timeout,
            )
            .await
            {
                Ok(forwarded) => forwarded_response(forwarded),
                Err(error) => {
                    tracing::warn!(source = %group.source, function = %route.function.name, error = ?error, "route call failed");
                    function_failed(match error {
                        ForwardError::TimedOut => "Sandbox.Timedout",
                        ForwardError::TooLarge => "Function.ResponseSizeTooLarge",
                        ForwardError::Unreachable(_) => "Function.Unreachable",
                    })
                }
            }
        }
    };
    drop(budget);
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-amzn-requestid", value);
    }
    if route.config.record {
        return record(group, route, &aws_request, response).await;
    }
    response
}

/// A `lambda` function's outcome as the HTTP answer (`source` and `function` name
/// it in the log).
pub(crate) fn lambda_response(source: &str, function: &str, called: Called) -> Response {
    match called {
        Called::Response { body, .. } => match http_api_response(&body) {
            Ok(answer) => {
                let mut response = (
                    StatusCode::from_u16(answer.status).unwrap_or(StatusCode::OK),
                    answer.body,
                )
                    .into_response();
                let headers = response.headers_mut();
                for (name, value) in &answer.headers {
                    match (
                        HeaderName::from_bytes(name.as_bytes()),
                        HeaderValue::from_str(value),
                    ) {
                        // The body's length and framing are the server's to set.
                        (Ok(name), Ok(_))
                            if name == header::CONTENT_LENGTH
                                || name == header::TRANSFER_ENCODING
                                || name == header::CONNECTION
                                || name == header::UPGRADE => {}
                        (Ok(name), Ok(value)) => {
                            headers.insert(name, value);
                        }
                        _ => {
                            tracing::warn!(%source, %function, header = %name, "the function answered a header that is not valid HTTP; left out");
                        }
                    }
                }
                for cookie in &answer.cookies {
                    if let Ok(value) = HeaderValue::from_str(cookie) {
                        headers.append(header::SET_COOKIE, value);
                    }
                }
                response
            }
            Err(reason) => {
                tracing::warn!(%source, %function, %reason, "the function's answer is not a function URL response");
                function_failed("Function.InvalidResponse")
            }
        },
        Called::FunctionError {
            error_type,
            message,
            ..
        }
        | Called::Failed {
            error_type,
            message,
        } => {
            tracing::warn!(%source, %function, %error_type, error = %message, "route call failed");
            function_failed(&error_type)
        }
    }
}

fn forwarded_response(forwarded: Forwarded) -> Response {
    let mut response = (forwarded.status, forwarded.body).into_response();
    *response.headers_mut() = forwarded.headers;
    response
}

/// Publishes the call as a CloudEvent (`record = true`): the request in payload
/// format 2.0 and the response in its 2.0 shape. The answer waits for the record
/// to be stored, so a caller that got it knows the record exists (unless the
/// `route_records_failed` counter says otherwise); a record too large for the bus
/// drops the bodies (`truncated: true`).
async fn record(
    group: &RouteGroup,
    route: &Route,
    request: &HttpRequest<'_>,
    response: Response,
) -> Response {
    let (parts, body) = response.into_parts();
    let body = match BodyExt::collect(body).await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let mut headers = serde_json::Map::new();
    for (name, value) in &parts.headers {
        if UNRECORDED_HEADERS.contains(&name.as_str()) {
            continue;
        }
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        match headers.get_mut(name.as_str()) {
            Some(serde_json::Value::String(joined)) => {
                joined.push(',');
                joined.push_str(&value);
            }
            _ => {
                headers.insert(name.as_str().to_owned(), value.into());
            }
        }
    }
    let (response_body, base64) = match std::str::from_utf8(&body) {
        Ok(text) => (text.to_owned(), false),
        Err(_) => (
            base64::engine::general_purpose::STANDARD.encode(&body),
            true,
        ),
    };
    // Credentials and cookies are not recorded.
    let mut recorded_headers = request.headers.clone();
    for name in UNRECORDED_HEADERS {
        recorded_headers.remove(name);
    }
    let recorded = HttpRequest {
        headers: &recorded_headers,
        ..request.clone()
    };
    let mut data = serde_json::json!({
        "function": route.function.name,
        "region": group.region,
        "request": http_api_request(&recorded),
        "response": {
            "statusCode": parts.status.as_u16(),
            "headers": headers,
            "body": response_body,
            "isBase64Encoded": base64,
        },
    });
    let mut event = Event::new(
        request.request_id,
        record_source(&group.source),
        RECORD_TYPE,
    );
    event.subject = Some(request.path.to_owned());
    event.time = Some(switchyard_event::timestamp::rfc3339(request.time));
    event.datacontenttype = Some("application/json".to_owned());
    event.data = Bytes::from(serde_json::to_vec(&data).expect("json"));
    if group.bus.check_event(&event).is_err() {
        data["request"]["body"] = serde_json::Value::Null;
        data["response"]["body"] = serde_json::Value::Null;
        data["truncated"] = true.into();
        event.data = Bytes::from(serde_json::to_vec(&data).expect("json"));
    }
    let stored = tokio::time::timeout(
        Duration::from_secs(5),
        group.bus.publish_events(std::slice::from_ref(&event)),
    )
    .await;
    if !matches!(stored, Ok(Ok(_))) {
        let error = match stored {
            Ok(Err(error)) => error.to_string(),
            _ => PublishError::Unavailable("no acknowledgement within 5s".to_owned()).to_string(),
        };
        group
            .metrics
            .records_failed
            .get_or_create(&RecordLabels {
                source: group.source.clone(),
            })
            .inc();
        tracing::warn!(source = %group.source, function = %route.function.name, request_id = %request.request_id, %error, "the call's record could not be stored");
    }
    Response::from_parts(parts, Body::from(body))
}
