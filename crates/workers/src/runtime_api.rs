//! The AWS Lambda Runtime API (version 2018-06-01) served to one function instance,
//! as AWS's Runtime Interface Emulator serves it: the same routes, headers, status
//! codes and error bodies (see docs/notes/lambda-runtime-api.md for the behaviour
//! read from the emulator's source). The instance's runtime client (awslambdaric,
//! aws-lambda-ric, the Rust `lambda_runtime`) asks `GET .../invocation/next` for work
//! and answers on `.../invocation/{id}/response` or `.../{id}/error`.
//!
//! One invocation at a time (classic Lambda). [`RuntimeApi::invoke`] hands an
//! invocation to the instance and returns a receiver for its [`Answer`]; the answer
//! arrives as soon as the runtime posts it. Deviations from the emulator, each for the
//! caller's sake: the answer is passed on when it is posted, not when the runtime next
//! asks for work; an error body over the size limit gets 413 like a response (the
//! emulator drops the connection and lets the invocation time out).

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http_body_util::{BodyExt, Limited};
use tokio::sync::{Notify, oneshot};

/// Largest response or error body, as Lambda's (6 MiB + 100 bytes).
pub const MAX_PAYLOAD_BYTES: usize = 6 * 1024 * 1024 + 100;

/// An invocation handed to the instance.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub request_id: String,
    pub event: Bytes,
    /// When the invocation times out, as Unix epoch milliseconds.
    pub deadline_ms: u64,
    pub function_arn: String,
    pub trace_id: Option<String>,
    pub client_context: Option<String>,
    pub cognito_identity: Option<String>,
}

/// What the runtime answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Response {
        body: Bytes,
        content_type: Option<String>,
    },
    /// A reported error: `error_type` normalised as Lambda does
    /// ([`normalise_error_type`]), the body as posted (usually
    /// `{"errorMessage": ..., "errorType": ...}`).
    Error {
        error_type: String,
        body: Bytes,
        content_type: Option<String>,
    },
    /// The response body was over [`MAX_PAYLOAD_BYTES`]
    /// (`Function.ResponseSizeTooLarge`).
    TooLarge,
}

/// The instance already has an invocation, or failed its init.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvokeError {
    #[error("the instance is busy with another invocation")]
    Busy,
    #[error("the instance failed its init: {error_type}")]
    InitFailed { error_type: String, body: Bytes },
}

/// Where the runtime is, by the emulator's state names (they appear in error messages).
#[derive(Debug)]
enum Phase {
    /// Started; init not over (no `/next` yet).
    Started,
    /// Waiting in `/next`, or between invocations.
    Ready,
    /// Handling `current`.
    Running,
    /// Answered `current`; the next `/next` moves on.
    ResponseSent,
    /// Reported an init error.
    InitError,
}

impl Phase {
    fn name(&self) -> &'static str {
        match self {
            Phase::Started => "Started",
            Phase::Ready => "Ready",
            Phase::Running => "Running",
            Phase::ResponseSent => "RuntimeResponseSentState",
            Phase::InitError => "InitError",
        }
    }
}

struct Current {
    invocation: Invocation,
    answer: Option<oneshot::Sender<Answer>>,
}

struct Inner {
    phase: Phase,
    /// Handed over by `invoke`, not yet taken by `/next`.
    pending: Option<Current>,
    /// Taken by `/next`: the invocation the runtime works on (or answered last).
    current: Option<Current>,
    init_error: Option<(String, Bytes)>,
    /// Multi-concurrency only: invocations handed over, not yet taken, and those
    /// taken and not answered yet, by request id.
    queued: std::collections::VecDeque<Current>,
    running: std::collections::HashMap<String, Current>,
}

/// The Runtime API of one instance.
#[derive(Clone)]
pub struct RuntimeApi {
    inner: Arc<Mutex<Inner>>,
    /// An invocation was handed over, or an init error reported.
    changed: Arc<Notify>,
    /// Invocations at once: 1 is classic Lambda (the emulator's state machine); more
    /// is Lambda's multi-concurrency (`AWS_LAMBDA_MAX_CONCURRENCY`), where each
    /// `/next` takes another invocation and answers name theirs by id.
    concurrency: usize,
}

impl Default for RuntimeApi {
    fn default() -> Self {
        RuntimeApi::with_concurrency(1)
    }
}

impl RuntimeApi {
    pub fn new() -> Self {
        RuntimeApi::default()
    }

    /// A Runtime API taking up to `concurrency` invocations at once.
    pub fn with_concurrency(concurrency: usize) -> Self {
        RuntimeApi {
            inner: Arc::new(Mutex::new(Inner {
                phase: Phase::Started,
                pending: None,
                current: None,
                init_error: None,
                queued: std::collections::VecDeque::new(),
                running: std::collections::HashMap::new(),
            })),
            changed: Arc::new(Notify::new()),
            concurrency: concurrency.max(1),
        }
    }

    fn multi(&self) -> bool {
        self.concurrency > 1
    }

    /// Hands `invocation` to the instance; its answer arrives on the receiver (which
    /// closes without one if the instance goes away).
    pub fn invoke(&self, invocation: Invocation) -> Result<oneshot::Receiver<Answer>, InvokeError> {
        let mut inner = self.inner.lock().expect("runtime api lock");
        if let Some((error_type, body)) = &inner.init_error {
            return Err(InvokeError::InitFailed {
                error_type: error_type.clone(),
                body: body.clone(),
            });
        }
        let (sender, receiver) = oneshot::channel();
        let handed = Current {
            invocation,
            answer: Some(sender),
        };
        if self.multi() {
            if inner.queued.len() + inner.running.len() >= self.concurrency {
                return Err(InvokeError::Busy);
            }
            inner.queued.push_back(handed);
        } else {
            let busy = inner.pending.is_some()
                || (matches!(inner.phase, Phase::Running)
                    && inner
                        .current
                        .as_ref()
                        .is_some_and(|current| current.answer.is_some()));
            if busy {
                return Err(InvokeError::Busy);
            }
            inner.pending = Some(handed);
        }
        drop(inner);
        self.changed.notify_waiters();
        Ok(receiver)
    }

    /// The init error the runtime reported, if any.
    pub fn init_error(&self) -> Option<(String, Bytes)> {
        self.inner
            .lock()
            .expect("runtime api lock")
            .init_error
            .clone()
    }

    /// Whether the runtime finished its init (asked for work at least once).
    pub fn initialised(&self) -> bool {
        !matches!(
            self.inner.lock().expect("runtime api lock").phase,
            Phase::Started | Phase::InitError
        )
    }

    /// Waits until an init error is reported or the runtime asks for work.
    pub async fn wait_init(&self) -> Result<(), (String, Bytes)> {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(error) = self.init_error() {
                return Err(error);
            }
            if self.initialised() {
                return Ok(());
            }
            changed.await;
        }
    }

    /// The routes under `/2018-06-01`.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/2018-06-01/runtime/invocation/next", get(next))
            .route(
                "/2018-06-01/runtime/invocation/{id}/response",
                post(response),
            )
            .route("/2018-06-01/runtime/invocation/{id}/error", post(error))
            .route("/2018-06-01/runtime/init/error", post(init_error))
            .route("/ping", get(|| async { "pong" }))
            .with_state(self.clone())
    }
}

/// A JSON body as the emulator renders it (`json.Encoder`: a trailing newline).
fn json(status: StatusCode, value: serde_json::Value) -> Response {
    let mut body = serde_json::to_vec(&value).expect("json serializes");
    body.push(b'\n');
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn accepted() -> Response {
    json(StatusCode::ACCEPTED, serde_json::json!({ "status": "OK" }))
}

fn error_body(status: StatusCode, error_type: &str, message: &str) -> Response {
    json(
        status,
        serde_json::json!({ "errorMessage": message, "errorType": error_type }),
    )
}

fn invalid_request_id() -> Response {
    error_body(
        StatusCode::BAD_REQUEST,
        "InvalidRequestID",
        "Invalid request ID",
    )
}

fn invalid_transition(from: &str, to: &str) -> Response {
    error_body(
        StatusCode::FORBIDDEN,
        "InvalidStateTransition",
        &format!(
            "State transition from {from} to {to} failed for runtime. Error: State transition is not allowed"
        ),
    )
}

fn too_large() -> Response {
    error_body(
        StatusCode::PAYLOAD_TOO_LARGE,
        "RequestEntityTooLarge",
        &format!("Exceeded maximum allowed payload size ({MAX_PAYLOAD_BYTES} bytes)."),
    )
}

/// An event handed to the runtime, with the headers the clients read.
fn event_response(invocation: &Invocation) -> Response {
    let mut response = Response::new(Body::from(invocation.event.clone()));
    let headers = response.headers_mut();
    let mut set = |name: &'static str, value: &str| {
        if let Ok(value) = HeaderValue::from_str(value)
            && !value.is_empty()
        {
            headers.insert(name, value);
        }
    };
    set("lambda-runtime-aws-request-id", &invocation.request_id);
    set(
        "lambda-runtime-deadline-ms",
        &invocation.deadline_ms.to_string(),
    );
    set(
        "lambda-runtime-invoked-function-arn",
        &invocation.function_arn,
    );
    if let Some(trace) = &invocation.trace_id {
        set("lambda-runtime-trace-id", trace);
    }
    if let Some(context) = &invocation.client_context {
        set("lambda-runtime-client-context", context);
    }
    if let Some(identity) = &invocation.cognito_identity {
        set("lambda-runtime-cognito-identity", identity);
    }
    set("content-type", "application/json");
    response
}

async fn next(State(api): State<RuntimeApi>) -> Response {
    if api.multi() {
        wait_for_next(&api, next_of_many).await
    } else {
        wait_for_next(&api, next_of_one).await
    }
}

/// Looks (under the lock) for what `/next` answers, until `step` has a response.
/// `step` also says whether this call ended init (the runtime's first `/next`):
/// whoever waits for that goes on, and this call looks again.
async fn wait_for_next(
    api: &RuntimeApi,
    step: impl Fn(&mut Inner) -> (Option<Response>, bool),
) -> Response {
    loop {
        let changed = api.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let (response, init_over) = step(&mut api.inner.lock().expect("runtime api lock"));
        if let Some(response) = response {
            return response;
        }
        if init_over {
            // This wakes our own wait too: look again with a fresh one.
            api.changed.notify_waiters();
            continue;
        }
        changed.await;
    }
}

/// Classic `/next`: the invocation handed over, or the same one again when asked
/// twice before answering (as the emulator does).
fn next_of_one(inner: &mut Inner) -> (Option<Response>, bool) {
    let mut init_over = false;
    match inner.phase {
        Phase::InitError => return (Some(invalid_transition("InitError", "Ready")), false),
        Phase::Running => {
            if let Some(current) = &inner.current {
                return (Some(event_response(&current.invocation)), false);
            }
        }
        Phase::Started => {
            inner.phase = Phase::Ready;
            init_over = true;
        }
        Phase::Ready | Phase::ResponseSent => inner.phase = Phase::Ready,
    }
    if let Some(pending) = inner.pending.take() {
        let response = event_response(&pending.invocation);
        inner.current = Some(pending);
        inner.phase = Phase::Running;
        return (Some(response), init_over);
    }
    (None, init_over)
}

/// `/next` with multi-concurrency: each call takes the next invocation handed over
/// (several runtime workers ask at once).
fn next_of_many(inner: &mut Inner) -> (Option<Response>, bool) {
    let mut init_over = false;
    match inner.phase {
        Phase::InitError => return (Some(invalid_transition("InitError", "Ready")), false),
        Phase::Started => {
            inner.phase = Phase::Ready;
            init_over = true;
        }
        _ => {}
    }
    // Skips invocations whose caller has given up.
    while inner.queued.front().is_some_and(|queued| {
        queued
            .answer
            .as_ref()
            .is_none_or(|answer| answer.is_closed())
    }) {
        inner.queued.pop_front();
    }
    if let Some(taken) = inner.queued.pop_front() {
        let response = event_response(&taken.invocation);
        inner
            .running
            .insert(taken.invocation.request_id.clone(), taken);
        return (Some(response), init_over);
    }
    (None, init_over)
}

/// Reads a body of at most [`MAX_PAYLOAD_BYTES`]; `None` when larger.
async fn read_limited(body: Body) -> Result<Option<Bytes>, Box<Response>> {
    Ok(read_limited_with_trailers(body)
        .await?
        .map(|(body, _)| body))
}

/// Reads a body of at most [`MAX_PAYLOAD_BYTES`] and its trailers; `None` when larger.
async fn read_limited_with_trailers(
    body: Body,
) -> Result<Option<(Bytes, Option<HeaderMap>)>, Box<Response>> {
    match Limited::new(body, MAX_PAYLOAD_BYTES).collect().await {
        Ok(collected) => {
            let trailers = collected.trailers().cloned();
            Ok(Some((collected.to_bytes(), trailers)))
        }
        Err(error) if error.is::<http_body_util::LengthLimitError>() => Ok(None),
        Err(error) => Err(Box::new(error_body(
            StatusCode::BAD_REQUEST,
            "TruncatedHTTPRequest",
            &format!("HTTP request detected as truncated: {error}"),
        ))),
    }
}

/// Takes the answer channel of invocation `id`, or the response to send instead.
fn take_answer(
    api: &RuntimeApi,
    id: &str,
    to: &str,
) -> Result<oneshot::Sender<Answer>, Box<Response>> {
    let mut inner = api.inner.lock().expect("runtime api lock");
    if api.multi() {
        // As the emulator's multi-concurrency mode: an id not running (unknown, or
        // answered already) is 400.
        return inner
            .running
            .remove(id)
            .and_then(|mut taken| taken.answer.take())
            .ok_or_else(|| Box::new(invalid_request_id()));
    }
    let matches = inner
        .current
        .as_ref()
        .is_some_and(|current| !id.is_empty() && current.invocation.request_id == id);
    if !matches {
        return Err(Box::new(invalid_request_id()));
    }
    if !matches!(inner.phase, Phase::Running) {
        let from = inner.phase.name();
        return Err(Box::new(invalid_transition(from, to)));
    }
    let answer = inner
        .current
        .as_mut()
        .and_then(|current| current.answer.take());
    inner.phase = Phase::ResponseSent;
    answer.ok_or_else(|| Box::new(invalid_transition("RuntimeResponseSentState", to)))
}

fn content_type(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
}

async fn response(
    State(api): State<RuntimeApi>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Some(mode) = headers.get("lambda-runtime-function-response-mode")
        && mode.as_bytes() != b"streaming"
    {
        return error_body(
            StatusCode::BAD_REQUEST,
            "InvalidFunctionResponseMode",
            "Invalid function response mode",
        );
    }
    let answer = match take_answer(&api, &id, "InvocationResponse") {
        Ok(answer) => answer,
        Err(response) => return *response,
    };
    match read_limited_with_trailers(body).await {
        Ok(Some((body, trailers))) => {
            // A streamed response that failed midway says so in its trailers
            // (`Lambda-Runtime-Function-Error-Type`, and the error body base64 in
            // `Lambda-Runtime-Function-Error-Body`): a failed invocation, not a
            // response.
            let failed_type = trailers.as_ref().and_then(|trailers| {
                trailers
                    .get("lambda-runtime-function-error-type")
                    .and_then(|value| value.to_str().ok())
                    .map(normalise_error_type)
            });
            if let Some(error_type) = failed_type {
                use base64::Engine as _;
                let error_body = trailers
                    .as_ref()
                    .and_then(|trailers| trailers.get("lambda-runtime-function-error-body"))
                    .and_then(|value| {
                        base64::engine::general_purpose::STANDARD
                            .decode(value.as_bytes())
                            .ok()
                    })
                    .map(Bytes::from)
                    .unwrap_or_default();
                let _ = answer.send(Answer::Error {
                    error_type,
                    body: error_body,
                    content_type: None,
                });
                return accepted();
            }
            let _ = answer.send(Answer::Response {
                body,
                content_type: content_type(&headers),
            });
            accepted()
        }
        Ok(None) => {
            let _ = answer.send(Answer::TooLarge);
            too_large()
        }
        Err(response) => {
            let _ = answer.send(Answer::Error {
                error_type: "Runtime.TruncatedResponse".to_owned(),
                body: Bytes::new(),
                content_type: None,
            });
            *response
        }
    }
}

async fn error(
    State(api): State<RuntimeApi>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let answer = match take_answer(&api, &id, "InvocationErrorResponse") {
        Ok(answer) => answer,
        Err(response) => return *response,
    };
    let error_type = normalise_error_type(
        headers
            .get("lambda-runtime-function-error-type")
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default(),
    );
    match read_limited(body).await {
        Ok(Some(body)) => {
            let _ = answer.send(Answer::Error {
                error_type,
                body,
                content_type: content_type(&headers),
            });
            accepted()
        }
        Ok(None) => {
            let _ = answer.send(Answer::Error {
                error_type,
                body: Bytes::new(),
                content_type: None,
            });
            too_large()
        }
        // The error could not be read whole: still a failed invocation.
        Err(response) => {
            let _ = answer.send(Answer::Error {
                error_type,
                body: Bytes::new(),
                content_type: None,
            });
            *response
        }
    }
}

async fn init_error(State(api): State<RuntimeApi>, headers: HeaderMap, body: Body) -> Response {
    {
        let inner = api.inner.lock().expect("runtime api lock");
        if !matches!(inner.phase, Phase::Started) {
            return invalid_transition(inner.phase.name(), "InitError");
        }
    }
    let error_type = normalise_error_type(
        headers
            .get("lambda-runtime-function-error-type")
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default(),
    );
    let body = match read_limited(body).await {
        Ok(body) => body.unwrap_or_default(),
        Err(response) => return *response,
    };
    {
        let mut inner = api.inner.lock().expect("runtime api lock");
        inner.phase = Phase::InitError;
        inner.init_error = Some((error_type, body));
        // An invocation handed over meanwhile gets no answer: its receiver closes.
        inner.pending = None;
    }
    api.changed.notify_waiters();
    accepted()
}

/// Lambda's rule for reported error types: a value containing `Runtime.<Name>` or
/// `Function.<Name>` (a capital, then letters) is kept; another starting `Function.`
/// becomes `Function.Unknown`; anything else `Runtime.Unknown`.
pub fn normalise_error_type(value: &str) -> String {
    let well_formed = ["Runtime.", "Function."].iter().any(|prefix| {
        value.match_indices(prefix).any(|(at, _)| {
            let rest = &value.as_bytes()[at + prefix.len()..];
            rest.first().is_some_and(u8::is_ascii_uppercase)
                && rest.get(1).is_some_and(u8::is_ascii_alphabetic)
        })
    });
    if well_formed {
        value.to_owned()
    } else if value.starts_with("Function.") {
        "Function.Unknown".to_owned()
    } else {
        "Runtime.Unknown".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Request;
    use tower::ServiceExt;

    fn invocation(id: &str) -> Invocation {
        Invocation {
            request_id: id.to_owned(),
            event: Bytes::from_static(b"{\"hello\":1}"),
            deadline_ms: 1_700_000_000_000,
            function_arn: "arn:aws:lambda:us-east-1:000000000000:function:f".to_owned(),
            trace_id: None,
            client_context: None,
            cognito_identity: None,
        }
    }

    async fn call(api: &RuntimeApi, method: &str, path: &str, body: Vec<u8>) -> Response {
        call_with(api, method, path, &[], body).await
    }

    async fn call_with(
        api: &RuntimeApi,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Response {
        let mut request = Request::builder().method(method).uri(path);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        api.router()
            .oneshot(request.body(Body::from(body)).unwrap())
            .await
            .unwrap()
    }

    async fn text(response: Response) -> String {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    const NEXT: &str = "/2018-06-01/runtime/invocation/next";

    #[tokio::test]
    async fn an_invocation_goes_out_on_next_and_its_answer_comes_back() {
        let api = RuntimeApi::new();
        let answer = api.invoke(invocation("r-1")).unwrap();
        let next = call(&api, "GET", NEXT, vec![]).await;
        assert_eq!(next.status(), 200);
        let headers = next.headers().clone();
        assert_eq!(headers["lambda-runtime-aws-request-id"], "r-1");
        assert_eq!(headers["lambda-runtime-deadline-ms"], "1700000000000");
        assert_eq!(
            headers["lambda-runtime-invoked-function-arn"],
            "arn:aws:lambda:us-east-1:000000000000:function:f"
        );
        assert!(headers.get("lambda-runtime-trace-id").is_none());
        assert_eq!(text(next).await, "{\"hello\":1}");
        assert!(api.initialised());
        // Asked again before answering: the same event.
        let again = call(&api, "GET", NEXT, vec![]).await;
        assert_eq!(again.headers()["lambda-runtime-aws-request-id"], "r-1");
        // A wrong id: 400; the right one: 202 and the answer.
        let wrong = call(
            &api,
            "POST",
            "/2018-06-01/runtime/invocation/r-2/response",
            vec![],
        )
        .await;
        assert_eq!(wrong.status(), 400);
        assert_eq!(
            text(wrong).await,
            "{\"errorMessage\":\"Invalid request ID\",\"errorType\":\"InvalidRequestID\"}\n"
        );
        let posted = call_with(
            &api,
            "POST",
            "/2018-06-01/runtime/invocation/r-1/response",
            &[("content-type", "text/plain")],
            b"done".to_vec(),
        )
        .await;
        assert_eq!(posted.status(), 202);
        assert_eq!(text(posted).await, "{\"status\":\"OK\"}\n");
        assert_eq!(
            answer.await.unwrap(),
            Answer::Response {
                body: Bytes::from_static(b"done"),
                content_type: Some("text/plain".to_owned())
            }
        );
        // A second answer for the same invocation: 403 with the emulator's message.
        for endpoint in ["response", "error"] {
            let repeated = call(
                &api,
                "POST",
                &format!("/2018-06-01/runtime/invocation/r-1/{endpoint}"),
                vec![],
            )
            .await;
            assert_eq!(repeated.status(), 403);
            assert!(
                text(repeated)
                    .await
                    .contains("State transition from RuntimeResponseSentState to Invocation"),
            );
        }
    }

    #[tokio::test]
    async fn a_streamed_response_that_failed_in_its_trailers_is_an_error() {
        use http_body_util::StreamBody;
        use hyper::body::Frame;
        let api = RuntimeApi::new();
        let answer = api.invoke(invocation("r-s")).unwrap();
        assert_eq!(call(&api, "GET", NEXT, vec![]).await.status(), 200);
        let mut trailers = HeaderMap::new();
        trailers.insert(
            "lambda-runtime-function-error-type",
            HeaderValue::from_static("Function.StreamBroke"),
        );
        // base64 of {"errorMessage":"lost it"}
        trailers.insert(
            "lambda-runtime-function-error-body",
            HeaderValue::from_static("eyJlcnJvck1lc3NhZ2UiOiJsb3N0IGl0In0="),
        );
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
            Ok(Frame::data(Bytes::from_static(b"partial"))),
            Ok(Frame::trailers(trailers)),
        ];
        let request = Request::builder()
            .method("POST")
            .uri("/2018-06-01/runtime/invocation/r-s/response")
            .header("lambda-runtime-function-response-mode", "streaming")
            .body(Body::new(StreamBody::new(futures::stream::iter(frames))))
            .unwrap();
        let posted = api.router().oneshot(request).await.unwrap();
        assert_eq!(posted.status(), 202);
        assert_eq!(
            answer.await.unwrap(),
            Answer::Error {
                error_type: "Function.StreamBroke".to_owned(),
                body: Bytes::from_static(br#"{"errorMessage":"lost it"}"#),
                content_type: None,
            }
        );
    }

    #[tokio::test]
    async fn with_multi_concurrency_each_next_takes_another_invocation() {
        let api = RuntimeApi::with_concurrency(2);
        let first = api.invoke(invocation("m-1")).unwrap();
        let second = api.invoke(invocation("m-2")).unwrap();
        assert_eq!(
            api.invoke(invocation("m-3")).unwrap_err(),
            InvokeError::Busy
        );
        let one = call(&api, "GET", NEXT, vec![]).await;
        let two = call(&api, "GET", NEXT, vec![]).await;
        assert_eq!(one.headers()["lambda-runtime-aws-request-id"], "m-1");
        assert_eq!(two.headers()["lambda-runtime-aws-request-id"], "m-2");
        // Answered out of order, each by its id.
        let answer = |id: &str, body: &'static [u8]| {
            let path = format!("/2018-06-01/runtime/invocation/{id}/response");
            let api = api.clone();
            async move { call(&api, "POST", &path, body.to_vec()).await }
        };
        assert_eq!(answer("m-2", b"two").await.status(), 202);
        assert_eq!(answer("m-1", b"one").await.status(), 202);
        // Answered twice, or never handed out: 400.
        assert_eq!(answer("m-1", b"again").await.status(), 400);
        assert_eq!(answer("m-9", b"who").await.status(), 400);
        assert_eq!(
            second.await.unwrap(),
            Answer::Response {
                body: Bytes::from_static(b"two"),
                content_type: None
            }
        );
        assert_eq!(
            first.await.unwrap(),
            Answer::Response {
                body: Bytes::from_static(b"one"),
                content_type: None
            }
        );
        // Room again.
        assert!(api.invoke(invocation("m-3")).is_ok());
    }

    #[tokio::test]
    async fn next_waits_for_an_invocation() {
        let api = RuntimeApi::new();
        let waiting = tokio::spawn({
            let api = api.clone();
            async move { call(&api, "GET", NEXT, vec![]).await }
        });
        api.wait_init().await.unwrap();
        // The instance is idle in `/next`: an answer for nothing is refused.
        let early = call(
            &api,
            "POST",
            "/2018-06-01/runtime/invocation/x/response",
            vec![],
        )
        .await;
        assert_eq!(early.status(), 400);
        let answer = api.invoke(invocation("r-9")).unwrap();
        assert_eq!(
            api.invoke(invocation("r-10")).unwrap_err(),
            InvokeError::Busy
        );
        let next = waiting.await.unwrap();
        assert_eq!(next.headers()["lambda-runtime-aws-request-id"], "r-9");
        let failed = call_with(
            &api,
            "POST",
            "/2018-06-01/runtime/invocation/r-9/error",
            &[("lambda-runtime-function-error-type", "Runtime.HandlerError")],
            b"{\"errorMessage\":\"boom\",\"errorType\":\"ValueError\"}".to_vec(),
        )
        .await;
        assert_eq!(failed.status(), 202);
        match answer.await.unwrap() {
            Answer::Error {
                error_type, body, ..
            } => {
                assert_eq!(error_type, "Runtime.HandlerError");
                assert!(String::from_utf8_lossy(&body).contains("boom"));
            }
            other => panic!("{other:?}"),
        }
        // Free again once answered.
        assert!(api.invoke(invocation("r-11")).is_ok());
    }

    #[tokio::test]
    async fn oversize_answers_and_bad_response_modes_are_refused() {
        let api = RuntimeApi::new();
        let answer = api.invoke(invocation("big")).unwrap();
        call(&api, "GET", NEXT, vec![]).await;
        let mode = call_with(
            &api,
            "POST",
            "/2018-06-01/runtime/invocation/big/response",
            &[("lambda-runtime-function-response-mode", "buffered")],
            vec![],
        )
        .await;
        assert_eq!(mode.status(), 400);
        assert!(text(mode).await.contains("InvalidFunctionResponseMode"));
        let big = call(
            &api,
            "POST",
            "/2018-06-01/runtime/invocation/big/response",
            vec![b'x'; MAX_PAYLOAD_BYTES + 1],
        )
        .await;
        assert_eq!(big.status(), 413);
        assert!(text(big).await.contains("6291556 bytes"));
        assert_eq!(answer.await.unwrap(), Answer::TooLarge);
        // Exactly the limit is accepted.
        let answer = api.invoke(invocation("edge")).unwrap();
        call(&api, "GET", NEXT, vec![]).await;
        let edge = call(
            &api,
            "POST",
            "/2018-06-01/runtime/invocation/edge/response",
            vec![b'x'; MAX_PAYLOAD_BYTES],
        )
        .await;
        assert_eq!(edge.status(), 202);
        assert!(
            matches!(answer.await.unwrap(), Answer::Response { body, .. } if body.len() == MAX_PAYLOAD_BYTES)
        );
    }

    #[tokio::test]
    async fn an_init_error_fails_invocations_and_later_nexts() {
        let api = RuntimeApi::new();
        let failed = call_with(
            &api,
            "POST",
            "/2018-06-01/runtime/init/error",
            &[(
                "lambda-runtime-function-error-type",
                "Runtime.ImportModuleError",
            )],
            b"{\"errorMessage\":\"No module named app\"}".to_vec(),
        )
        .await;
        assert_eq!(failed.status(), 202);
        let (error_type, _) = api.wait_init().await.unwrap_err();
        assert_eq!(error_type, "Runtime.ImportModuleError");
        assert!(matches!(
            api.invoke(invocation("r")),
            Err(InvokeError::InitFailed { .. })
        ));
        let next = call(&api, "GET", NEXT, vec![]).await;
        assert_eq!(next.status(), 403);
        assert!(text(next).await.contains("from InitError to Ready"));
        // After init, an init error is a refused transition.
        let api = RuntimeApi::new();
        let _answer = api.invoke(invocation("r")).unwrap();
        call(&api, "GET", NEXT, vec![]).await;
        let late = call(&api, "POST", "/2018-06-01/runtime/init/error", vec![]).await;
        assert_eq!(late.status(), 403);
        assert!(text(late).await.contains("from Running to InitError"));
    }

    #[test]
    fn error_types_are_normalised_as_lambda_does() {
        for (given, kept) in [
            ("Runtime.HandlerError", "Runtime.HandlerError"),
            ("Function.MyError", "Function.MyError"),
            ("x Runtime.ExitError y", "x Runtime.ExitError y"),
            ("Function.lower", "Function.Unknown"),
            ("Function.", "Function.Unknown"),
            ("unhandled", "Runtime.Unknown"),
            ("Error", "Runtime.Unknown"),
            ("", "Runtime.Unknown"),
            ("Runtime.A", "Runtime.Unknown"),
        ] {
            assert_eq!(normalise_error_type(given), kept, "{given}");
        }
    }
}

/// What a managed Lambda instance is told about its function.
#[derive(Debug, Clone)]
pub struct InstanceIdentity<'a> {
    pub function: &'a str,
    pub handler: &'a str,
    /// The function's directory (Lambda's task root).
    pub task_root: &'a str,
    pub memory_mb: u32,
    pub region: &'a str,
    /// Where this instance's Runtime API listens (`host:port`).
    pub runtime_api: &'a str,
    /// Tells the instance's log stream apart from the others'.
    pub instance: &'a str,
}

/// The ARN an instance's invocations name: Lambda's shape, account `000000000000`
/// (there is no AWS account behind it).
pub fn function_arn(region: &str, function: &str) -> String {
    format!("arn:aws:lambda:{region}:{ACCOUNT_ID}:function:{function}")
}

/// The AWS account id Switchyard's ARNs and events name.
pub const ACCOUNT_ID: &str = "000000000000";

/// The environment Lambda gives a function's runtime, for one instance: what the
/// official runtime clients read (the Rust `lambda_runtime` panics without the
/// function name, version and memory size) and what handlers commonly rely on.
/// `user` (the function's configured environment) is applied last, except for the
/// names Lambda reserves: `_HANDLER`, `AWS_LAMBDA_RUNTIME_API`, `LAMBDA_TASK_ROOT` and
/// the `AWS_LAMBDA_FUNCTION_*` ones, which the user cannot change.
pub fn instance_environment(
    identity: &InstanceIdentity<'_>,
    user: &[(String, String)],
) -> Vec<(String, String)> {
    // A published version runs as `name:N`.
    let (function, version) = identity
        .function
        .split_once(':')
        .unwrap_or((identity.function, "$LATEST"));
    let mut environment: Vec<(String, String)> = [
        ("AWS_LAMBDA_RUNTIME_API", identity.runtime_api.to_owned()),
        ("_HANDLER", identity.handler.to_owned()),
        ("LAMBDA_TASK_ROOT", identity.task_root.to_owned()),
        ("AWS_LAMBDA_FUNCTION_NAME", function.to_owned()),
        ("AWS_LAMBDA_FUNCTION_VERSION", version.to_owned()),
        (
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
            identity.memory_mb.to_string(),
        ),
        ("AWS_LAMBDA_INITIALIZATION_TYPE", "on-demand".to_owned()),
        (
            "AWS_LAMBDA_LOG_GROUP_NAME",
            format!("/aws/lambda/{function}"),
        ),
        (
            "AWS_LAMBDA_LOG_STREAM_NAME",
            format!("{version}/{}", identity.instance),
        ),
        ("AWS_REGION", identity.region.to_owned()),
        ("AWS_DEFAULT_REGION", identity.region.to_owned()),
        ("TZ", ":UTC".to_owned()),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_owned(), value))
    .collect();
    const RESERVED: [&str; 6] = [
        "_HANDLER",
        "AWS_LAMBDA_RUNTIME_API",
        "LAMBDA_TASK_ROOT",
        "AWS_LAMBDA_FUNCTION_NAME",
        "AWS_LAMBDA_FUNCTION_VERSION",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
    ];
    for (name, value) in user {
        if RESERVED.contains(&name.as_str()) {
            continue;
        }
        match environment.iter_mut().find(|(known, _)| known == name) {
            Some(entry) => entry.1.clone_from(value),
            None => environment.push((name.clone(), value.clone())),
        }
    }
    environment
}

#[cfg(test)]
mod environment_tests {
    use super::*;

    #[test]
    fn a_published_version_runs_under_its_functions_name_and_its_number() {
        let identity = InstanceIdentity {
            function: "thumbnails:3",
            handler: "app.handler",
            task_root: "/srv/thumbnails",
            memory_mb: 256,
            region: "eu-west-1",
            runtime_api: "127.0.0.1:40123",
            instance: "i-3",
        };
        let environment = instance_environment(&identity, &[]);
        let get = |name: &str| {
            environment
                .iter()
                .find(|(known, _)| known == name)
                .map(|(_, value)| value.as_str())
        };
        assert_eq!(get("AWS_LAMBDA_FUNCTION_NAME"), Some("thumbnails"));
        assert_eq!(get("AWS_LAMBDA_FUNCTION_VERSION"), Some("3"));
        assert_eq!(
            get("AWS_LAMBDA_LOG_GROUP_NAME"),
            Some("/aws/lambda/thumbnails")
        );
        assert_eq!(get("AWS_LAMBDA_LOG_STREAM_NAME"), Some("3/i-3"));
    }

    #[test]
    fn an_instance_gets_what_the_runtime_clients_read_and_reserved_names_stay() {
        let identity = InstanceIdentity {
            function: "thumbnails",
            handler: "app.handler",
            task_root: "/srv/thumbnails",
            memory_mb: 256,
            region: "eu-west-1",
            runtime_api: "127.0.0.1:40123",
            instance: "i-3",
        };
        let user = vec![
            ("AWS_LAMBDA_FUNCTION_NAME".to_owned(), "spoofed".to_owned()),
            ("AWS_REGION".to_owned(), "us-east-2".to_owned()),
            ("BUCKET".to_owned(), "images".to_owned()),
        ];
        let environment = instance_environment(&identity, &user);
        let get = |name: &str| {
            environment
                .iter()
                .find(|(known, _)| known == name)
                .map(|(_, value)| value.as_str())
        };
        assert_eq!(get("AWS_LAMBDA_RUNTIME_API"), Some("127.0.0.1:40123"));
        assert_eq!(get("_HANDLER"), Some("app.handler"));
        assert_eq!(get("LAMBDA_TASK_ROOT"), Some("/srv/thumbnails"));
        assert_eq!(get("AWS_LAMBDA_FUNCTION_NAME"), Some("thumbnails"));
        assert_eq!(get("AWS_LAMBDA_FUNCTION_VERSION"), Some("$LATEST"));
        // The Rust client parses it as a number.
        assert_eq!(get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE"), Some("256"));
        assert_eq!(
            get("AWS_LAMBDA_LOG_GROUP_NAME"),
            Some("/aws/lambda/thumbnails")
        );
        assert_eq!(get("AWS_LAMBDA_LOG_STREAM_NAME"), Some("$LATEST/i-3"));
        // The user's own settings win, except for reserved names.
        assert_eq!(get("AWS_REGION"), Some("us-east-2"));
        assert_eq!(get("BUCKET"), Some("images"));
        assert_eq!(
            environment
                .iter()
                .filter(|(name, _)| name == "AWS_LAMBDA_FUNCTION_NAME")
                .count(),
            1
        );
        assert_eq!(
            function_arn("eu-west-1", "thumbnails"),
            "arn:aws:lambda:eu-west-1:000000000000:function:thumbnails"
        );
    }
}
