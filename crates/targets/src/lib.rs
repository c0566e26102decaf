//! Function targets: where the dispatcher delivers events.
//!
//! [`HttpTarget`] POSTs each event in CloudEvents binary mode over a pooled keep-alive
//! client and turns the answer into an [`Outcome`] in exactly one place,
//! [`classify_response`], which is the function contract:
//!
//! | answer | outcome |
//! |---|---|
//! | `Switchyard-Outcome: retry` / `reject` header | as the header says (with `Retry-After` for retry) |
//! | 2xx | delivered (a CloudEvent in the answer is the reply) |
//! | 429, 503 | retry after `Retry-After` when given, and shrink the function's concurrency |
//! | 408, other 5xx, timeout, connection error | retry per the trigger's policy |
//! | other 4xx, 3xx | rejected: dead-lettered at once |
//!
//! [`LogTarget`] prints events, for debugging and the quick start.

pub mod auth;
pub mod forward;

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use switchyard_event::{
    BatchOutcome, Event, Failure, FunctionAnswer, Outcome, Target, parse_structured,
    to_structured_json,
};

/// Header a function may set to decide the outcome explicitly.
pub const OUTCOME_HEADER: &str = "switchyard-outcome";

/// Most of a function's answer kept for replies and error messages.
const MAX_ANSWER_BYTES: usize = 4 * 1024 * 1024;

/// One HTTP client for every HTTP function of the process: a pool of keep-alive
/// connections per host.
pub fn http_client() -> reqwest::Client {
    client_builder()
        // For http:// functions: no TLS root store to load and keep in memory.
        .tls_built_in_root_certs(false)
        .build()
        .expect("the http client configuration is valid")
}

fn client_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .pool_max_idle_per_host(usize::MAX)
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
        .redirect(reqwest::redirect::Policy::none())
}

/// TLS to an `https://` function.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionTls {
    /// CAs that issued the function's certificate (PEM); the system's and Mozilla's
    /// when unset.
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
    /// A client certificate chain (PEM) presented to the function, with `key_file`.
    #[serde(default)]
    pub cert_file: Option<std::path::PathBuf>,
    #[serde(default)]
    pub key_file: Option<std::path::PathBuf>,
}

impl FunctionTls {
    /// A client for `https://` functions with these settings, or why not.
    pub fn client(&self) -> Result<reqwest::Client, String> {
        let mut builder = client_builder().https_only(true);
        if let Some(path) = &self.ca_file {
            let pem = std::fs::read(path)
                .map_err(|error| format!("ca_file `{}`: {error}", path.display()))?;
            let certificates = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|error| format!("ca_file `{}`: {error}", path.display()))?;
            if certificates.is_empty() {
                return Err(format!("ca_file `{}` holds no certificate", path.display()));
            }
            builder = builder.tls_built_in_root_certs(false);
            for certificate in certificates {
                builder = builder.add_root_certificate(certificate);
            }
        }
        match (&self.cert_file, &self.key_file) {
            (Some(cert_file), Some(key_file)) => {
                let mut pem = std::fs::read(cert_file)
                    .map_err(|error| format!("cert_file `{}`: {error}", cert_file.display()))?;
                pem.push(b'\n');
                pem.extend(
                    std::fs::read(key_file)
                        .map_err(|error| format!("key_file `{}`: {error}", key_file.display()))?,
                );
                let identity = reqwest::Identity::from_pem(&pem)
                    .map_err(|error| format!("cert_file and key_file: {error}"))?;
                builder = builder.identity(identity);
            }
            (None, None) => {}
            _ => return Err("`cert_file` and `key_file` go together".to_owned()),
        }
        builder.build().map_err(|error| error.to_string())
    }

    /// Makes relative paths relative to `base`.
    pub fn files_relative_to(&mut self, base: &std::path::Path) {
        for path in [&mut self.ca_file, &mut self.cert_file, &mut self.key_file]
            .into_iter()
            .flatten()
        {
            *path = base.join(&*path);
        }
    }
}

/// An HTTP function at a URL.
pub struct HttpTarget {
    client: reqwest::Client,
    url: reqwest::Url,
    function: String,
    auth: Option<auth::FunctionAuth>,
}

impl HttpTarget {
    pub fn new(function: impl Into<String>, url: reqwest::Url, client: reqwest::Client) -> Self {
        HttpTarget {
            client,
            url,
            function: function.into(),
            auth: None,
        }
    }

    /// Presents `auth` on every call.
    pub fn with_auth(mut self, auth: Option<auth::FunctionAuth>) -> Self {
        self.auth = auth;
        self
    }

    /// The credentials it presents, if any.
    pub fn auth(&self) -> Option<&auth::FunctionAuth> {
        self.auth.as_ref()
    }

    /// Where events are POSTed.
    pub fn url(&self) -> &reqwest::Url {
        &self.url
    }

    /// The client it sends with.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }
}

/// What a 2xx answer to a batch says, by AWS Lambda's rules for partial batch
/// responses (`{"batchItemFailures":[{"itemIdentifier":"<id>"}]}`):
/// - every event delivered: an empty body, `null`, an object without
///   `batchItemFailures`, or with it `null` or `[]`;
/// - only the listed events failed: a list of `{"itemIdentifier": "<id>"}` naming
///   events of the batch;
/// - the WHOLE batch failed (retried), never acknowledged: a body that could not be
///   read, is not JSON, is JSON but not an object; `batchItemFailures` that is not a
///   list, or misspelt (`BatchItemFailures`, `batchItemFailure`); an item that is not
///   an object, has another key (`itemIdentifer`), or a null, empty, non-string or
///   unknown `itemIdentifier`.
pub fn classify_batch_answer(
    events: &[Event],
    status: u16,
    body: Result<&[u8], &str>,
) -> BatchOutcome {
    classify_batch_answer_with(status, body, &|identifier| {
        event_id_identifier(events, identifier)
    })
}

/// An `itemIdentifier` that is the id of an event of the batch.
pub fn event_id_identifier(
    events: &[Event],
    identifier: &serde_json::Value,
) -> Result<String, String> {
    use serde_json::Value;
    let id = match identifier {
        Value::String(id) if !id.is_empty() => id.clone(),
        Value::String(_) => return Err("is empty".to_owned()),
        Value::Null => return Err("is null or missing".to_owned()),
        _ => return Err("is not a string".to_owned()),
    };
    if !events.iter().any(|event| event.id == id) {
        return Err(format!(
            "names id `{}`, which was not in the batch",
            short_id(&id)
        ));
    }
    Ok(id)
}

/// [`classify_batch_answer`] with `identify` telling which event an
/// `itemIdentifier` names (its id), or why it names none (which fails the whole
/// batch).
pub fn classify_batch_answer_with(
    status: u16,
    body: Result<&[u8], &str>,
    identify: &dyn Fn(&serde_json::Value) -> Result<String, String>,
) -> BatchOutcome {
    match batch_failures(body, identify) {
        Ok(failed) if failed.is_empty() => BatchOutcome::All(Outcome::delivered()),
        Ok(failed) => BatchOutcome::Partial { failed },
        Err(reason) => BatchOutcome::All(Outcome::RetryLater {
            not_before: None,
            failure: Failure::new(Some(status), format!("the whole batch failed: {reason}")),
        }),
    }
}

/// The ids a batch answer reports failed, or why the answer fails the whole batch.
fn batch_failures(
    body: Result<&[u8], &str>,
    identify: &dyn Fn(&serde_json::Value) -> Result<String, String>,
) -> Result<Vec<String>, String> {
    use serde_json::Value;
    let body = body.map_err(|error| format!("the answer could not be read: {error}"))?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    let answer: Value = serde_json::from_slice(body)
        .map_err(|error| format!("the answer is not valid JSON ({error}); answer nothing, `{{}}` or {{\"batchItemFailures\": [...]}}"))?;
    let object = match answer {
        Value::Null => return Ok(Vec::new()),
        Value::Object(object) => object,
        _ => return Err("the answer is JSON but not an object".to_owned()),
    };
    let mut items = None;
    for (key, value) in object {
        if key == "batchItemFailures" {
            items = Some(value);
        } else if key.eq_ignore_ascii_case("batchItemFailures")
            || key.eq_ignore_ascii_case("batchItemFailure")
        {
            return Err(format!(
                "misspelt key `{key}`: the key is `batchItemFailures`"
            ));
        }
    }
    let items = match items {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(_) => return Err("`batchItemFailures` is not a list".to_owned()),
    };
    let mut failed = Vec::with_capacity(items.len());
    for (index, item) in items.into_iter().enumerate() {
        let Value::Object(item) = item else {
            return Err(format!("batchItemFailures[{index}] is not an object"));
        };
        if let Some(other) = item.keys().find(|key| *key != "itemIdentifier") {
            return Err(format!(
                "batchItemFailures[{index}] has the key `{other}`; the key is `itemIdentifier`"
            ));
        }
        let id = identify(item.get("itemIdentifier").unwrap_or(&Value::Null))
            .map_err(|reason| format!("batchItemFailures[{index}].itemIdentifier {reason}"))?;
        failed.push(id);
    }
    Ok(failed)
}

/// An id cut short for an error message.
fn short_id(id: &str) -> String {
    let mut end = id.len().min(128);
    while !id.is_char_boundary(end) {
        end -= 1;
    }
    id[..end].to_owned()
}

impl HttpTarget {
    /// Sends a request and classifies the answer; the body is returned with a
    /// delivered outcome.
    async fn call(
        &self,
        request: reqwest::RequestBuilder,
        timeout: Duration,
    ) -> (Outcome, reqwest::header::HeaderMap, Result<Bytes, String>) {
        let mut response = match request.send().await {
            Ok(response) => response,
            Err(error) => {
                let cause = if error.is_timeout() {
                    format!("invocation timed out after {}ms", timeout.as_millis())
                } else if error.is_connect() {
                    format!(
                        "connecting to function `{}` failed: {}",
                        self.function,
                        error_chain(&error)
                    )
                } else {
                    format!(
                        "calling function `{}` failed: {}",
                        self.function,
                        error_chain(&error)
                    )
                };
                let outcome = Outcome::RetryLater {
                    not_before: None,
                    failure: Failure::new(None, cause),
                };
                return (
                    outcome,
                    reqwest::header::HeaderMap::new(),
                    Err("no answer".to_owned()),
                );
            }
        };
        let status = response.status().as_u16();
        // Taken, not cloned: the body is read without them.
        let headers = std::mem::take(response.headers_mut());
        let body = read_limited(response).await;
        let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
        let answer = Answer {
            status,
            outcome_header: header(OUTCOME_HEADER),
            retry_after: header("retry-after"),
            body: body.as_ref().map(|bytes| &bytes[..]).unwrap_or_default(),
        };
        let outcome = classify_response(&answer);
        (outcome, headers, body)
    }
}

#[async_trait]
impl Target for HttpTarget {
    async fn invoke(&self, event: &Event, timeout: Duration) -> Outcome {
        let mut request = self.client.post(self.url.clone()).timeout(timeout);
        for (name, value) in event.binary_headers() {
            request = request.header(name.as_ref(), value.as_ref());
        }
        // W3C trace context also goes as the plain headers tracers read, when its
        // value can be one (printable ASCII); it always travels percent-encoded in
        // `ce-traceparent` / `ce-tracestate`, so an odd value never fails the call.
        for name in ["traceparent", "tracestate"] {
            if let Some(value) = event.extensions.get(name)
                && value.bytes().all(|byte| (0x20..0x7f).contains(&byte))
            {
                request = request.header(name, value.as_str());
            }
        }
        if let Some(auth) = &self.auth {
            for (name, value) in auth.headers_now(&event.id, &event.data) {
                request = request.header(name, value);
            }
        }
        let (mut outcome, headers, body) =
            self.call(request.body(event.data.clone()), timeout).await;
        if let Outcome::Delivered { reply, answer } = &mut outcome
            && let Ok(body) = body
        {
            *reply = reply_event(&headers, &body).map(Box::new);
            if reply.is_none() && !body.is_empty() {
                *answer = Some(Box::new(FunctionAnswer {
                    body,
                    content_type: headers
                        .get(reqwest::header::CONTENT_TYPE)
                        .and_then(|value| value.to_str().ok())
                        .map(str::to_owned),
                }));
            }
        }
        outcome
    }

    /// One POST of a JSON array of structured events
    /// (`application/cloudevents-batch+json`).
    async fn invoke_batch(&self, events: &[Event], timeout: Duration) -> BatchOutcome {
        let mut body = Vec::with_capacity(
            events
                .iter()
                .map(|event| event.data.len() + 256)
                .sum::<usize>()
                + 2,
        );
        body.push(b'[');
        for (index, event) in events.iter().enumerate() {
            if index > 0 {
                body.push(b',');
            }
            body.extend_from_slice(&to_structured_json(event));
        }
        body.push(b']');
        let mut request = self
            .client
            .post(self.url.clone())
            .timeout(timeout)
            .header("content-type", "application/cloudevents-batch+json");
        if let Some(auth) = &self.auth {
            // One message id per batch: its first event's, with the count.
            let id = format!(
                "{}+{}",
                events.first().map_or("", |event| event.id.as_str()),
                events.len()
            );
            for (name, value) in auth.headers_now(&id, &body) {
                request = request.header(name, value);
            }
        }
        let request = request.body(body);
        let (outcome, headers, body) = self.call(request, timeout).await;
        drop(headers);
        match outcome {
            // A delivered outcome is a 2xx.
            Outcome::Delivered { .. } => classify_batch_answer(
                events,
                200,
                body.as_ref()
                    .map(|bytes| &bytes[..])
                    .map_err(String::as_str),
            ),
            other => BatchOutcome::All(other),
        }
    }
}

/// An error with its causes, as one line.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

async fn read_limited(mut response: reqwest::Response) -> Result<Bytes, String> {
    let mut collected = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if collected.len() + chunk.len() > MAX_ANSWER_BYTES {
                    return Err("answer body too large".to_owned());
                }
                collected.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(Bytes::from(collected)),
            Err(error) => return Err(error.to_string()),
        }
    }
}

/// A CloudEvent in the function's answer, in binary or structured mode.
fn reply_event(headers: &reqwest::header::HeaderMap, body: &Bytes) -> Option<Event> {
    let content_type = headers
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    let result = if headers.contains_key("ce-specversion") {
        Event::from_binary(
            headers
                .iter()
                .filter_map(|(name, value)| Some((name.as_str(), value.to_str().ok()?))),
            body.clone(),
        )
        .map_err(|error| error.to_string())
    } else if content_type.starts_with("application/cloudevents+json") {
        parse_structured(body).map_err(|error| error.to_string())
    } else {
        return None;
    };
    match result {
        Ok(event) => Some(event),
        Err(error) => {
            tracing::warn!(%error, "function answered with an invalid cloudevent, reply ignored");
            None
        }
    }
}

/// The parts of a function's answer that decide the outcome.
pub struct Answer<'a> {
    pub status: u16,
    pub outcome_header: Option<&'a str>,
    pub retry_after: Option<&'a str>,
    pub body: &'a [u8],
}

/// The function contract: maps an answer to an outcome. The one place that decides
/// what is retried and what is dead-lettered.
pub fn classify_response(answer: &Answer<'_>) -> Outcome {
    let status = answer.status;
    let retry_after = answer.retry_after.and_then(parse_retry_after);
    let detail = || {
        let text = String::from_utf8_lossy(&answer.body[..answer.body.len().min(256)]);
        let text = text.trim();
        if text.is_empty() {
            format!("function answered {status}")
        } else {
            format!("function answered {status}: {text}")
        }
    };
    match answer
        .outcome_header
        .map(|value| value.trim().to_ascii_lowercase())
    {
        Some(value) if value == "retry" => {
            return Outcome::RetryLater {
                not_before: retry_after,
                failure: Failure::new(Some(status), format!("{} (asked to retry)", detail())),
            };
        }
        Some(value) if value == "reject" => {
            return Outcome::Rejected {
                failure: Failure::new(Some(status), format!("{} (asked to reject)", detail())),
            };
        }
        _ => {}
    }
    match status {
        200..=299 => Outcome::delivered(),
        429 | 503 => Outcome::RetryLater {
            not_before: retry_after,
            failure: Failure {
                overloaded: true,
                ..Failure::new(Some(status), detail())
            },
        },
        408 | 500..=599 => Outcome::RetryLater {
            not_before: retry_after,
            failure: Failure::new(Some(status), detail()),
        },
        _ => Outcome::Rejected {
            failure: Failure::new(Some(status), detail()),
        },
    }
}

/// `Retry-After` as delay-seconds or an HTTP date.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(
        date.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// Prints every event it receives; always delivers.
pub struct LogTarget {
    function: String,
}

impl LogTarget {
    pub fn new(function: impl Into<String>) -> Self {
        LogTarget {
            function: function.into(),
        }
    }
}

#[async_trait]
impl Target for LogTarget {
    async fn invoke(&self, event: &Event, _timeout: Duration) -> Outcome {
        let shown = &event.data[..event.data.len().min(1024)];
        tracing::info!(
            target: "switchyard::log",
            function = %self.function,
            event_id = %event.id,
            event_source = %event.source,
            event_type = %event.ty,
            subject = event.subject.as_deref().unwrap_or(""),
            datacontenttype = event.datacontenttype.as_deref().unwrap_or(""),
            extensions = ?event.extensions,
            data = %String::from_utf8_lossy(shown),
            data_bytes = event.data.len(),
            "event received"
        );
        Outcome::delivered()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16) -> Answer<'static> {
        Answer {
            status,
            outcome_header: None,
            retry_after: None,
            body: b"",
        }
    }

    #[test]
    fn the_function_contract() {
        assert!(matches!(
            classify_response(&answer(204)),
            Outcome::Delivered { .. }
        ));
        for status in [408, 500, 502, 504] {
            assert!(
                matches!(classify_response(&answer(status)), Outcome::RetryLater { not_before: None, ref failure } if !failure.overloaded),
                "{status}"
            );
        }
        for status in [400, 401, 404, 422, 301] {
            assert!(
                matches!(classify_response(&answer(status)), Outcome::Rejected { .. }),
                "{status}"
            );
        }
        let overloaded = Answer {
            retry_after: Some("7"),
            ..answer(429)
        };
        match classify_response(&overloaded) {
            Outcome::RetryLater {
                not_before,
                failure,
            } => {
                assert_eq!(not_before, Some(Duration::from_secs(7)));
                assert!(failure.overloaded);
                assert_eq!(failure.status, Some(429));
            }
            other => panic!("{other:?}"),
        }
        let explicit_reject = Answer {
            outcome_header: Some("Reject"),
            ..answer(200)
        };
        assert!(matches!(
            classify_response(&explicit_reject),
            Outcome::Rejected { .. }
        ));
        let explicit_retry = Answer {
            outcome_header: Some("retry"),
            ..answer(400)
        };
        assert!(matches!(
            classify_response(&explicit_retry),
            Outcome::RetryLater { .. }
        ));
    }

    #[test]
    fn partial_batch_answers_follow_lambdas_rules() {
        let events = [Event::new("a", "/s", "t"), Event::new("b", "/s", "t")];
        let classify = |body: &[u8]| classify_batch_answer(&events, 200, Ok(body));
        for body in [
            &b""[..],
            b"  ",
            b"null",
            b"{}",
            br#"{"batchItemFailures":null}"#,
            br#"{"batchItemFailures":[]}"#,
            br#"{"processed":2}"#,
        ] {
            assert_eq!(
                classify(body),
                BatchOutcome::All(Outcome::delivered()),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        assert_eq!(
            classify(br#"{"batchItemFailures":[{"itemIdentifier":"b"}]}"#),
            BatchOutcome::Partial {
                failed: vec!["b".to_owned()]
            }
        );
        for (body, reason) in [
            (
                &br#"{"batchItemFailures":[{"itemIdentifier":"zz"}]}"#[..],
                "`zz`",
            ),
            (b"OK", "not valid JSON"),
            (
                br#"{"batchItemFailures":[{"itemIdentifier":"a"}"#,
                "not valid JSON",
            ),
            (b"[]", "not an object"),
            (br#"{"batchItemFailures":{}}"#, "not a list"),
            (
                br#"{"BatchItemFailures":[{"itemIdentifier":"a"}]}"#,
                "misspelt key",
            ),
            (
                br#"{"batchItemFailure":[{"itemIdentifier":"a"}]}"#,
                "misspelt key",
            ),
            (
                br#"{"batchItemFailures":[{"itemIdentifer":"a"}]}"#,
                "`itemIdentifer`",
            ),
            (
                br#"{"batchItemFailures":[{"itemIdentifier":null}]}"#,
                "null",
            ),
            (br#"{"batchItemFailures":[{"itemIdentifier":""}]}"#, "empty"),
            (
                br#"{"batchItemFailures":[{"itemIdentifier":7}]}"#,
                "not a string",
            ),
            (br#"{"batchItemFailures":["a"]}"#, "not an object"),
        ] {
            match classify(body) {
                BatchOutcome::All(Outcome::RetryLater { failure, .. }) => assert!(
                    failure.error.contains("the whole batch failed")
                        && failure.error.contains(reason),
                    "{}: {}",
                    String::from_utf8_lossy(body),
                    failure.error
                ),
                other => panic!("{}: {other:?}", String::from_utf8_lossy(body)),
            }
        }
        assert!(matches!(
            classify_batch_answer(&events, 200, Err("answer body too large")),
            BatchOutcome::All(Outcome::RetryLater { failure, .. }) if failure.error.contains("could not be read")
        ));
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after(" 120 "), Some(Duration::from_secs(120)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }
}
