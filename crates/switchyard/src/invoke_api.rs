//! AWS Lambda's Invoke API (`POST /2015-03-31/functions/{name}/invocations`, API
//! version 2015-03-31) for `lambda` functions, so existing callers (boto3, the AWS
//! CLI, any AWS SDK pointed at `--endpoint-url`) invoke them unchanged.
//!
//! `RequestResponse` (the default) runs the handler with the request body as its
//! event and answers with what it returned, as Lambda does: `200` with the response;
//! `200` with `X-Amz-Function-Error: Unhandled` and the error document when the handler
//! raised, timed out, crashed or could not start. `DryRun` answers `204` for a known
//! function. A synchronous call takes a permit of the function's `max_concurrency`
//! (the budget its triggers use: in this process, and across processes with the
//! default `concurrency_scope = "cluster"`), waiting at most `max_wait`, then
//! answers `429 TooManyRequestsException` with `Retry-After`; it is not stored on the
//! bus. `X-Amz-Log-Type: Tail` returns the invocation's log (its last 4 KB, base64)
//! in `X-Amz-Log-Result`. `Event` invocations are stored on the bus (answered `202`
//! once JetStream acknowledged them) and delivered by the function's
//! `invoke-<name>` trigger with its asynchronous retry settings and dead letter, the
//! payload as given and the same request id on every attempt. Payloads must be JSON,
//! as Lambda's. With `credentials`, every request must be signed (AWS Signature
//! Version 4) with one of their access keys, as AWS's clients sign for Lambda;
//! without, signatures are not checked and the listener is for loopback unless
//! `insecure` says otherwise.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use switchyard_bus::Bus;
use switchyard_event::{Event, PublishError};
use switchyard_workers::Called;

use crate::calls::{CallKind, SyncFunction};

/// Largest synchronous payload, as Lambda's (6 MB).
pub const MAX_PAYLOAD_BYTES: usize = 6 * 1024 * 1024;

/// The functions, and the bus `Event` invocations are stored on.
struct Callable {
    /// `lambda` functions, by name.
    functions: HashMap<String, Arc<SyncFunction>>,
    bus: Bus,
}

#[derive(Clone)]
pub struct InvokeApiState {
    callable: Arc<std::sync::RwLock<Option<Arc<Callable>>>>,
    pub(crate) region: String,
    max_wait: Duration,
    /// The access keys requests must be signed with (SigV4); none: not checked.
    pub(crate) keys: crate::sigv4::Keys,
    /// The control plane's view of functions, once the bus is set up.
    pub(crate) control: Arc<std::sync::OnceLock<Arc<crate::live::ApiFunctions>>>,
    /// Whether the listener serves HTTPS (function URLs say so).
    pub(crate) https: bool,
}

impl InvokeApiState {
    pub fn new(region: String, max_wait: Duration, keys: crate::sigv4::Keys) -> Self {
        InvokeApiState {
            callable: Arc::default(),
            region,
            max_wait,
            keys,
            control: Arc::default(),
            https: false,
        }
    }

    /// The listener serves HTTPS.
    pub fn with_https(mut self, https: bool) -> Self {
        self.https = https;
        self
    }

    /// Serves the control plane (CreateFunction, GetFunction, ...) from now on.
    pub(crate) fn set_control(&self, api: Arc<crate::live::ApiFunctions>) {
        let _ = self.control.set(api);
    }

    /// Makes the functions callable (once the dispatcher built them and their
    /// `invoke-<name>` triggers' consumers exist); each call replaces the set, so a
    /// reload adds, changes and removes what is callable.
    /// `invoke-<name>` triggers' consumers exist).
    pub fn set_functions(&self, functions: &HashMap<String, Arc<SyncFunction>>, bus: Bus) {
        let functions = functions
            .iter()
            .filter(|(_, function)| matches!(function.kind, CallKind::Lambda(_)))
            .map(|(name, function)| (name.clone(), function.clone()))
            .collect();
        *self.callable.write().expect("callable lock") =
            Some(Arc::new(Callable { functions, bus }));
    }
}

pub fn router(state: InvokeApiState) -> Router {
    Router::new()
        .route("/2015-03-31/functions/{name}/invocations", post(invoke))
        .route("/lambda-url/{name}", any(serve_function_url))
        .route("/lambda-url/{name}/", any(serve_function_url))
        .route("/lambda-url/{name}/{*rest}", any(serve_function_url))
        .merge(crate::control_api::routes())
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// An error as the Lambda API renders it: the type in `x-amzn-ErrorType` and the body.
pub(crate) fn api_error(status: StatusCode, error_type: &str, message: &str) -> Response {
    let body = serde_json::json!({ "Type": "User", "message": message });
    let mut response = (status, axum::Json(body)).into_response();
    if let Ok(value) = HeaderValue::from_str(error_type) {
        response.headers_mut().insert("x-amzn-errortype", value);
    }
    response
}

/// The function name of `FunctionName`: a name, `name:qualifier`, or an ARN
/// (`arn:aws:lambda:<region>:<account>:function:<name>[:<qualifier>]`).
pub(crate) fn function_name(given: &str) -> &str {
    match given.strip_prefix("arn:") {
        Some(arn) => arn.split(':').nth(5).unwrap_or_default(),
        None => given.split(':').next().unwrap_or_default(),
    }
}

async fn invoke(
    State(state): State<InvokeApiState>,
    Path(name): Path<String>,
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // What can be refused before the body is read, is.
    if !state.keys.is_empty()
        && let Err(refusal) = state
            .keys
            .precheck(&headers, time::OffsetDateTime::now_utc())
    {
        return api_error(StatusCode::FORBIDDEN, refusal.error_type, &refusal.message);
    }
    if headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<usize>().ok())
        .is_some_and(|length| length > MAX_PAYLOAD_BYTES)
    {
        return api_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestTooLargeException",
            &format!(
                "Request must be smaller than {MAX_PAYLOAD_BYTES} bytes for the InvokeFunction operation"
            ),
        );
    }
    let payload = match http_body_util::BodyExt::collect(http_body_util::Limited::new(
        body,
        MAX_PAYLOAD_BYTES,
    ))
    .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => {
            return api_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestTooLargeException",
                &format!(
                    "Request must be smaller than {MAX_PAYLOAD_BYTES} bytes for the InvokeFunction operation"
                ),
            );
        }
        Err(error) => {
            return api_error(
                StatusCode::BAD_REQUEST,
                "InvalidRequestContentException",
                &format!("the request body could not be read: {error}"),
            );
        }
    };
    // Signed by a known access key, when keys are configured: before anything else
    // is said about the request (not even whether the function exists).
    if !state.keys.is_empty()
        && let Err(refusal) = state.keys.verify(
            &method,
            &uri,
            &headers,
            &payload,
            time::OffsetDateTime::now_utc(),
        )
    {
        return api_error(StatusCode::FORBIDDEN, refusal.error_type, &refusal.message);
    }
    let callable = state.callable.read().expect("callable lock").clone();
    let Some(Callable { functions, bus }) = callable.as_deref() else {
        return api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceException",
            "switchyard is starting",
        );
    };
    let given = name;
    let name = function_name(&given);
    // The version asked for: `?Qualifier=`, or the `:qualifier` of the name or ARN.
    let query_qualifier = axum::extract::Query::<HashMap<String, String>>::try_from_uri(&uri)
        .ok()
        .and_then(|query| query.0.get("Qualifier").cloned());
    let name_qualifier = crate::control_api::qualifier_of(&given, None);
    if let (Some(query), Some(named)) = (&query_qualifier, name_qualifier)
        && query != named
    {
        return api_error(
            StatusCode::BAD_REQUEST,
            "InvalidParameterValueException",
            "The derived qualifier from the function name does not match the specified qualifier.",
        );
    }
    let qualifier = query_qualifier.as_deref().or(name_qualifier);
    let arn = match qualifier {
        Some(qualifier) => format!(
            "{}:{qualifier}",
            switchyard_workers::runtime_api::function_arn(&state.region, name)
        ),
        None => switchyard_workers::runtime_api::function_arn(&state.region, name),
    };
    let not_found = || {
        api_error(
            StatusCode::NOT_FOUND,
            "ResourceNotFoundException",
            &format!("Function not found: {arn}"),
        )
    };
    // A version or alias of a function the control plane stored: the instance set
    // the reconciler runs for that version (`name:N`).
    let (internal, executed_version) = match qualifier {
        None | Some("$LATEST") => (name.to_owned(), "$LATEST".to_owned()),
        Some(_) => match state
            .control
            .get()
            .and_then(|control| control.resolve(name, qualifier))
        {
            Some(resolved) => resolved,
            None => return not_found(),
        },
    };
    let Some(target) = functions.get(&internal) else {
        return not_found();
    };
    let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
    let asynchronous = match header("x-amz-invocation-type").unwrap_or("RequestResponse") {
        "RequestResponse" => false,
        "Event" => true,
        "DryRun" => return StatusCode::NO_CONTENT.into_response(),
        other => {
            return api_error(
                StatusCode::BAD_REQUEST,
                "InvalidParameterValueException",
                &format!(
                    "invalid X-Amz-Invocation-Type `{other}`: RequestResponse, Event or DryRun"
                ),
            );
        }
    };
    // Lambda takes JSON only (an empty payload too).
    if !payload.is_empty()
        && let Err(error) = serde_json::from_slice::<serde::de::IgnoredAny>(&payload)
    {
        return api_error(
            StatusCode::BAD_REQUEST,
            "InvalidRequestContentException",
            &format!("Could not parse request body into json: {error}"),
        );
    }
    let request_id = uuid::Uuid::new_v4().to_string();
    if asynchronous {
        if executed_version != "$LATEST" {
            return api_error(
                StatusCode::BAD_REQUEST,
                "InvalidParameterValueException",
                "switchyard runs Event invocations of $LATEST only: invoke a version or alias with RequestResponse",
            );
        }
        return store_invocation(bus, name, request_id, payload).await;
    }
    // Lambda passes the client context (base64 JSON) to the runtime decoded.
    let client_context = header("x-amz-client-context").and_then(|encoded| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .ok()
            .and_then(|decoded| String::from_utf8(decoded).ok())
    });
    // The function's budget, shared with its triggers (in this process, then across
    // processes): a bounded wait, then Lambda's throttling answer.
    let Some(budget) = target.take_budget(state.max_wait).await else {
        let mut response = api_error(
            StatusCode::TOO_MANY_REQUESTS,
            "TooManyRequestsException",
            "Rate Exceeded.",
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return response;
    };
    let CallKind::Lambda(function) = &target.kind else {
        unreachable!("only lambda functions are listed")
    };
    let tail = header("x-amz-log-type") == Some("Tail");
    // In a task of its own, holding the budget: a caller that goes away does not
    // abandon the invocation midway (its instance would be retired).
    let (function, id, timeout) = (function.clone(), request_id.clone(), target.timeout);
    let call = tokio::spawn(async move {
        let called = function
            .call(id, payload, client_context, timeout, tail)
            .await;
        drop(budget);
        called
    });
    let Ok((called, log)) = call.await else {
        return api_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "ServiceException",
            "the invocation failed inside switchyard",
        );
    };
    let (body, content_type, function_error) = match called {
        Called::Response { body, content_type } => (body, content_type, false),
        Called::FunctionError { body, .. } => (body, Some("application/json".to_owned()), true),
        Called::Failed {
            error_type,
            message,
        } => (
            Bytes::from(
                serde_json::to_vec(&serde_json::json!({
                    "errorMessage": message,
                    "errorType": error_type,
                }))
                .expect("json serializes"),
            ),
            Some("application/json".to_owned()),
            true,
        ),
    };
    let mut response = (StatusCode::OK, body).into_response();
    let response_headers = response.headers_mut();
    response_headers.insert(
        header::CONTENT_TYPE,
        content_type
            .and_then(|value| HeaderValue::from_str(&value).ok())
            .unwrap_or_else(|| HeaderValue::from_static("application/json")),
    );
    response_headers.insert(
        "x-amz-executed-version",
        HeaderValue::from_str(&executed_version).expect("a version is a header value"),
    );
    insert_request_id(response_headers, &request_id);
    if function_error {
        response_headers.insert(
            "x-amz-function-error",
            HeaderValue::from_static("Unhandled"),
        );
    }
    if let Some(log) = log {
        // The last 4 KB of the invocation's log, base64, as Lambda returns it.
        use base64::Engine as _;
        let mut start = log.len().saturating_sub(4096);
        while !log.is_char_boundary(start) {
            start += 1;
        }
        if let Ok(value) = HeaderValue::from_str(
            &base64::engine::general_purpose::STANDARD.encode(&log.as_bytes()[start..]),
        ) {
            response_headers.insert("x-amz-log-result", value);
        }
    }
    response
}

fn insert_request_id(headers: &mut HeaderMap, request_id: &str) {
    if let Ok(value) = HeaderValue::from_str(request_id) {
        headers.insert("x-amzn-requestid", value);
    }
}

/// An `Event` invocation: stored on the bus as a CloudEvent for the function's
/// `invoke-<name>` trigger, which delivers it with the function's asynchronous retry
/// settings and dead letter; `202` once JetStream acknowledged it.
async fn store_invocation(bus: &Bus, name: &str, request_id: String, payload: Bytes) -> Response {
    let mut event = Event::new(
        request_id.clone(),
        switchyard_workers::aws::invoke_source(name),
        switchyard_workers::aws::INVOKE_TYPE,
    );
    event.time = Some(switchyard_event::timestamp::now_rfc3339());
    event.datacontenttype = Some("application/json".to_owned());
    event.data = payload;
    let _span = switchyard_event::telemetry::start_ingest(
        &mut event,
        format!("invoke-api {name}"),
        switchyard_event::telemetry::SpanKind::Server,
        "invoke_api",
    );
    match bus.publish_events(std::slice::from_ref(&event)).await {
        Ok(_) => {
            let mut response = StatusCode::ACCEPTED.into_response();
            insert_request_id(response.headers_mut(), &request_id);
            response
        }
        Err(PublishError::TooLarge(message)) => api_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestTooLargeException",
            &format!("the Event invocation cannot be stored: {message}"),
        ),
        Err(error) => {
            tracing::warn!(function = %name, %error, "an Event invocation could not be stored");
            let mut response = api_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceException",
                &format!("the Event invocation could not be stored: {error}"),
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            response
        }
    }
}

/// A function URL of a function defined through the control plane:
/// `/lambda-url/<name>/<path>` answers with the function, which sees `/<path>` as
/// the request's path (Lambda's payload format 2.0, as a function URL sends it);
/// `AuthType: AWS_IAM` needs the request signed with an `[invoke_api]` credential
/// (when any are configured), `NONE` serves anyone; CORS preflights are answered
/// before authentication, as browsers send them without credentials.
async fn serve_function_url(
    State(state): State<InvokeApiState>,
    Path(params): Path<HashMap<String, String>>,
    request: axum::extract::Request,
) -> Response {
    let name = params.get("name").cloned().unwrap_or_default();
    let config = state
        .control
        .get()
        .and_then(|control| control.urls.read().expect("api lock").get(&name).cloned());
    let Some(config) = config else {
        return crate::routes::refusal(
            StatusCode::NOT_FOUND,
            &format!("no function URL /lambda-url/{name}/"),
        );
    };
    // The path after the URL as the client sent it (still percent-encoded, as a
    // function URL's `rawPath` is); `.` and `..` segments are refused, as routes do.
    let path = match request
        .uri()
        .path()
        .strip_prefix(&format!("/lambda-url/{name}"))
    {
        Some("") | None => "/".to_owned(),
        Some(rest) => rest.to_owned(),
    };
    if crate::routes::has_dot_segment(&path) {
        return crate::routes::refusal(
            StatusCode::BAD_REQUEST,
            "the path holds a `.` or `..` segment",
        );
    }
    let inner = tower::service_fn(move |request: axum::extract::Request| {
        let (state, name, path, auth_type) = (
            state.clone(),
            name.clone(),
            path.clone(),
            config.auth_type.clone(),
        );
        async move {
            Ok::<_, std::convert::Infallible>(
                function_url_call(state, name, path, auth_type == "AWS_IAM", request).await,
            )
        }
    });
    let answered = match &config.cors {
        Some(cors) => {
            tower::ServiceExt::oneshot(
                tower::Layer::layer(&crate::routes::cors_layer(&cors.to_config()), inner),
                request,
            )
            .await
        }
        None => tower::ServiceExt::oneshot(inner, request)
            .await
            .map(IntoResponse::into_response),
    };
    match answered {
        Ok(response) => response.into_response(),
        Err(never) => match never {},
    }
}

async fn function_url_call(
    state: InvokeApiState,
    name: String,
    path: String,
    signed: bool,
    request: axum::extract::Request,
) -> Response {
    let (parts, body) = request.into_parts();
    if signed
        && !state.keys.is_empty()
        && let Err(refusal) = state
            .keys
            .precheck(&parts.headers, time::OffsetDateTime::now_utc())
    {
        return crate::routes::refusal(StatusCode::FORBIDDEN, &refusal.message);
    }
    let body = match http_body_util::BodyExt::collect(http_body_util::Limited::new(
        body,
        MAX_PAYLOAD_BYTES,
    ))
    .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => {
            return crate::routes::refusal(
                StatusCode::PAYLOAD_TOO_LARGE,
                "Request Entity Too Large",
            );
        }
        Err(_) => {
            return crate::routes::refusal(
                StatusCode::BAD_REQUEST,
                "the request body could not be read",
            );
        }
    };
    if signed
        && !state.keys.is_empty()
        && let Err(refusal) = state.keys.verify(
            &parts.method,
            &parts.uri,
            &parts.headers,
            &body,
            time::OffsetDateTime::now_utc(),
        )
    {
        return crate::routes::refusal(StatusCode::FORBIDDEN, &refusal.message);
    }
    let function = state
        .callable
        .read()
        .expect("callable lock")
        .as_ref()
        .and_then(|callable| callable.functions.get(&name).cloned());
    let Some(target) = function else {
        return crate::routes::refusal(
            StatusCode::NOT_FOUND,
            &format!("no function URL /lambda-url/{name}/"),
        );
    };
    let CallKind::Lambda(function) = &target.kind else {
        unreachable!("only lambda functions are listed")
    };
    let client_ip = parts
        .extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|axum::extract::ConnectInfo(address)| address.ip().to_string())
        .unwrap_or_default();
    let request_id = uuid::Uuid::new_v4().to_string();
    let protocol = format!("{:?}", parts.version);
    let event = switchyard_workers::aws::http_api_request(&switchyard_workers::aws::HttpRequest {
        method: parts.method.as_str(),
        path: &path,
        query: parts.uri.query().unwrap_or_default(),
        headers: &parts.headers,
        body: &body,
        protocol: &protocol,
        source_ip: client_ip,
        request_id: &request_id,
        api_id: &name,
        account_id: switchyard_workers::runtime_api::ACCOUNT_ID,
        time: time::OffsetDateTime::now_utc(),
    });
    let event = Bytes::from(serde_json::to_vec(&event).expect("json"));
    if event.len() > MAX_PAYLOAD_BYTES {
        return crate::routes::refusal(StatusCode::PAYLOAD_TOO_LARGE, "Request Entity Too Large");
    }
    let Some(budget) = target.take_budget(state.max_wait).await else {
        let mut response =
            crate::routes::refusal(StatusCode::TOO_MANY_REQUESTS, "Too Many Requests");
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return response;
    };
    // In a task of its own, holding the budget: a caller that goes away does not
    // abandon the invocation midway.
    let (function, id, timeout) = (function.clone(), request_id.clone(), target.timeout);
    let call = tokio::spawn(async move {
        let (called, _) = function.call(id, event, None, timeout, false).await;
        drop(budget);
        called
    });
    let mut response = match call.await {
        Ok(called) => crate::routes::lambda_response("function-url", &name, called),
        Err(_) => {
            crate::routes::refusal(StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error")
        }
    };
    insert_request_id(response.headers_mut(), &request_id);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_names_are_read_from_names_qualifiers_and_arns() {
        assert_eq!(function_name("thumbs"), "thumbs");
        assert_eq!(function_name("thumbs:$LATEST"), "thumbs");
        assert_eq!(
            function_name("arn:aws:lambda:us-east-1:000000000000:function:thumbs"),
            "thumbs"
        );
        assert_eq!(
            function_name("arn:aws:lambda:us-east-1:000000000000:function:thumbs:prod"),
            "thumbs"
        );
    }
}
