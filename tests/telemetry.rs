//! Traces over OTLP, read back from a real backend (Jaeger v2, its in-memory store and
//! query API): one webhook whose Lambda handler (awslambdaric) fails once and then
//! answers is one trace — the ingest span under the caller's `traceparent`, the store
//! span, one delivery span per attempt with its outcome, each attempt's invocation,
//! the cold start under the first — and the handler's `_X_AMZN_TRACE_ID` names the
//! trace and its invocation span, as Lambda passes it. Sampling: a ratio of 0 records
//! no new trace but keeps a caller's sampled one.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{FunctionServer, NatsServer, Process, Reply};
use switchyard_testkit::jaeger::JaegerServer;

const WAIT: Duration = Duration::from_secs(90);

/// A span as Jaeger's query API shows it.
#[derive(Debug, Clone)]
struct Span {
    id: String,
    name: String,
    parent: Option<String>,
    /// The spans this one is linked to (OTLP links, Jaeger's FOLLOWS_FROM).
    links: Vec<String>,
    tags: HashMap<String, serde_json::Value>,
    service: String,
}

impl Span {
    fn tag(&self, key: &str) -> Option<&serde_json::Value> {
        self.tags.get(key)
    }

    fn text(&self, key: &str) -> &str {
        self.tag(key).and_then(|value| value.as_str()).unwrap_or("")
    }
}

/// The stored spans of `trace_id` (empty while Jaeger has none).
async fn spans(jaeger: &JaegerServer, trace_id: &str) -> Vec<Span> {
    let response = reqwest::get(jaeger.trace_url(trace_id)).await.unwrap();
    if response.status() == 404 {
        return Vec::new();
    }
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    let Some(trace) = body["data"].as_array().and_then(|traces| traces.first()) else {
        return Vec::new();
    };
    let processes = &trace["processes"];
    trace["spans"]
        .as_array()
        .unwrap()
        .iter()
        .map(|span| {
            assert_eq!(span["traceID"].as_str().unwrap(), trace_id);
            Span {
                id: span["spanID"].as_str().unwrap().to_owned(),
                name: span["operationName"].as_str().unwrap().to_owned(),
                parent: span["references"].as_array().and_then(|references| {
                    references
                        .iter()
                        .find(|reference| reference["refType"] == "CHILD_OF")
                        .map(|reference| reference["spanID"].as_str().unwrap().to_owned())
                }),
                links: span["references"]
                    .as_array()
                    .map(|references| {
                        references
                            .iter()
                            .filter(|reference| reference["refType"] == "FOLLOWS_FROM")
                            .map(|reference| reference["spanID"].as_str().unwrap().to_owned())
                            .collect()
                    })
                    .unwrap_or_default(),
                tags: span["tags"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|tag| {
                        (
                            tag["key"].as_str().unwrap().to_owned(),
                            tag["value"].clone(),
                        )
                    })
                    .collect(),
                service: processes[span["processID"].as_str().unwrap()]["serviceName"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            }
        })
        .collect()
}

/// Waits until trace `trace_id` holds `wanted` spans.
async fn wait_spans(jaeger: &JaegerServer, trace_id: &str, wanted: usize) -> Vec<Span> {
    let deadline = Instant::now() + WAIT;
    loop {
        let found = spans(jaeger, trace_id).await;
        if found.len() >= wanted {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "trace {trace_id}: {} of {wanted} spans stored: {found:#?}",
            found.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The function's stored log lines.
async fn log_lines(process: &Process, function: &str) -> Vec<serde_json::Value> {
    let response = reqwest::get(format!(
        "http://{}/v1/functions/{function}/logs?since=10m",
        process.admin()
    ))
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    response
        .text()
        .await
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// The messages of the function's stored log lines.
async fn log_messages(process: &Process, function: &str) -> Vec<String> {
    log_lines(process, function)
        .await
        .iter()
        .map(|line| line["message"].as_str().unwrap().to_owned())
        .collect()
}

/// Waits until the function has logged `wanted` REPORT lines; its messages.
async fn wait_reports(process: &Process, function: &str, wanted: usize) -> Vec<String> {
    let deadline = Instant::now() + WAIT;
    loop {
        let messages = log_messages(process, function).await;
        let reports = messages
            .iter()
            .filter(|message| message.starts_with("REPORT "))
            .count();
        if reports >= wanted {
            return messages;
        }
        assert!(
            Instant::now() < deadline,
            "{reports} of {wanted} invocations logged: {messages:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A configuration with the webhook `jobs` feeding the Lambda function `traced`
/// (retried after 100 ms), exporting traces to `jaeger` at `ratio`.
fn config(nats: &NatsServer, jaeger: &JaegerServer, ratio: f64) -> String {
    let mut text = common::base_config(&nats.url(), 0, 0);
    text.push_str(&format!(
        r#"
[[sources.hooks]]
name = "jobs"
event_type = "com.example.job"
id_header = "Idempotency-Key"

{traced}

[[triggers]]
name = "jobs"
function = "traced"
retry = {{ initial = "100ms", max = "100ms", attempts = 3 }}

[telemetry]
otlp_endpoint = "{endpoint}"
sampling_ratio = {ratio:?}
service_name = "switchyard-test"
"#,
        traced = common::python_lambda("traced", ""),
        endpoint = jaeger.otlp_endpoint(),
    ));
    text
}

async fn post_job(
    process: &Process,
    id: &str,
    marker: &std::path::Path,
    traceparent: Option<&str>,
) {
    let mut request = reqwest::Client::new()
        .post(process.url("/hooks/jobs"))
        .header("content-type", "application/json")
        .header("idempotency-key", id)
        .body(
            serde_json::json!({"action": "fail_once", "marker": marker.to_str().unwrap()})
                .to_string(),
        );
    if let Some(traceparent) = traceparent {
        request = request.header("traceparent", traceparent);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 202);
}

/// `bytes` random bytes as lowercase hex.
fn random_hex(bytes: usize) -> String {
    let mut hex = String::new();
    while hex.len() < bytes * 2 {
        hex.push_str(&uuid::Uuid::new_v4().simple().to_string());
    }
    hex.truncate(bytes * 2);
    hex
}

/// The X-Ray header (`Root=1-xxxxxxxx-yyyy...;Parent=...;Sampled=N`) as (trace id,
/// parent span id, sampled).
fn xray(header: &str) -> (String, String, String) {
    let fields: HashMap<&str, &str> = header
        .split(';')
        .filter_map(|field| field.split_once('='))
        .collect();
    let root = fields["Root"];
    let mut parts = root.split('-');
    assert_eq!(parts.next(), Some("1"), "{header}");
    let trace_id = format!("{}{}", parts.next().unwrap(), parts.next().unwrap());
    (
        trace_id,
        fields["Parent"].to_owned(),
        fields["Sampled"].to_owned(),
    )
}

/// The `_X_AMZN_TRACE_ID` values the handler printed, in order.
fn printed_traces(messages: &[String]) -> Vec<String> {
    messages
        .iter()
        .filter_map(|message| message.trim_end().strip_prefix("trace "))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_lambda_invocation_is_one_trace_from_the_webhook_to_the_handler() {
    let jaeger = JaegerServer::start();
    let nats = NatsServer::start();
    let directory = tempfile::tempdir().unwrap();
    let file = directory.path().join("switchyard.toml");
    std::fs::write(&file, config(&nats, &jaeger, 1.0)).unwrap();
    let process = Process::start(&file, &[]);
    process.wait_ready().await;

    // The caller's own trace: Switchyard's spans join it.
    let trace_id = random_hex(16);
    let caller_span = random_hex(8);
    let marker = directory.path().join("failed-once");
    post_job(
        &process,
        "job-1",
        &marker,
        Some(&format!("00-{trace_id}-{caller_span}-01")),
    )
    .await;

    let messages = wait_reports(&process, "traced", 2).await;
    // ingest, store, 2 x (deliver, invoke), init.
    let spans = wait_spans(&jaeger, &trace_id, 7).await;
    assert_eq!(spans.len(), 7, "{spans:#?}");
    assert!(spans.iter().all(|span| span.service == "switchyard-test"));
    let named =
        |name: &str| -> Vec<&Span> { spans.iter().filter(|span| span.name == name).collect() };

    let ingest = named("ingest http");
    assert_eq!(ingest.len(), 1, "{spans:#?}");
    let ingest = ingest[0];
    assert_eq!(ingest.parent.as_deref(), Some(caller_span.as_str()));
    assert_eq!(ingest.text("span.kind"), "server");
    assert_eq!(ingest.text("cloudevents.event_id"), "job-1");
    assert_eq!(ingest.text("cloudevents.event_source"), "/hooks/jobs");

    let store = named("store");
    assert_eq!(store.len(), 1, "{spans:#?}");
    assert_eq!(store[0].parent.as_deref(), Some(ingest.id.as_str()));
    assert_eq!(store[0].text("span.kind"), "producer");
    assert_eq!(
        store[0].tag("switchyard.duplicate"),
        Some(&serde_json::json!(false))
    );

    let mut attempts = named("deliver jobs");
    attempts.sort_by_key(|span| span.tag("switchyard.attempt").and_then(|n| n.as_i64()));
    assert_eq!(attempts.len(), 2, "{spans:#?}");
    for (number, (span, outcome)) in attempts.iter().zip(["retry", "delivered"]).enumerate() {
        assert_eq!(
            span.parent.as_deref(),
            Some(ingest.id.as_str()),
            "{span:#?}"
        );
        assert_eq!(
            span.tag("switchyard.attempt"),
            Some(&serde_json::json!(number + 1))
        );
        assert_eq!(span.text("switchyard.outcome"), outcome, "{span:#?}");
        assert_eq!(span.text("switchyard.trigger"), "jobs");
        assert_eq!(span.text("switchyard.function"), "traced");
    }
    assert_eq!(
        attempts[0].text("otel.status_code"),
        "ERROR",
        "{:#?}",
        attempts[0]
    );
    assert!(
        attempts[1]
            .tag("otel.status_code")
            .is_none_or(|code| code != "ERROR")
    );

    let invocations = named("invoke traced");
    assert_eq!(invocations.len(), 2, "{spans:#?}");
    let invocation_of = |attempt: &Span| -> &Span {
        invocations
            .iter()
            .find(|span| span.parent.as_deref() == Some(attempt.id.as_str()))
            .unwrap_or_else(|| panic!("no invocation under {attempt:#?}: {spans:#?}"))
    };
    let (first, second) = (invocation_of(attempts[0]), invocation_of(attempts[1]));
    assert_eq!(first.text("span.kind"), "client");
    assert_eq!(first.text("otel.status_code"), "ERROR");

    let init = named("init traced");
    assert_eq!(init.len(), 1, "{spans:#?}");
    assert_eq!(init[0].parent.as_deref(), Some(first.id.as_str()));
    assert_eq!(
        init[0].tag("faas.coldstart"),
        Some(&serde_json::json!(true))
    );

    // The handler saw each invocation's span as Lambda passes it.
    let printed = printed_traces(&messages);
    assert_eq!(printed.len(), 2, "{messages:#?}");
    for (header, invocation) in printed.iter().zip([first, second]) {
        let (root, parent, sampled) = xray(header);
        assert_eq!(root, trace_id, "{header}");
        assert_eq!(parent, invocation.id, "{header}");
        assert_eq!(sampled, "1", "{header}");
    }
    // The first invocation of the new instance reports its init, as Lambda does (the
    // REPORT lines are matched by request id: they may be stored in either order).
    let lines = log_lines(&process, "traced").await;
    let request_of_trace: Vec<&str> = lines
        .iter()
        .filter(|line| line["message"].as_str().unwrap().starts_with("trace "))
        .map(|line| line["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(request_of_trace.len(), 2, "{lines:#?}");
    let report_of = |request_id: &str| -> String {
        lines
            .iter()
            .map(|line| line["message"].as_str().unwrap())
            .find(|message| message.starts_with(&format!("REPORT RequestId: {request_id}\t")))
            .unwrap_or_else(|| panic!("no REPORT of {request_id}: {lines:#?}"))
            .to_owned()
    };
    let (first_report, second_report) = (
        report_of(request_of_trace[0]),
        report_of(request_of_trace[1]),
    );
    assert!(first_report.contains("\tInit Duration: "), "{first_report}");
    assert!(!second_report.contains("Init Duration"), "{second_report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_sampling_ratio_records_no_new_trace_but_keeps_a_sampled_callers() {
    let jaeger = JaegerServer::start();
    let nats = NatsServer::start();
    let directory = tempfile::tempdir().unwrap();
    let file = directory.path().join("switchyard.toml");
    std::fs::write(&file, config(&nats, &jaeger, 0.0)).unwrap();
    let process = Process::start(&file, &[]);
    process.wait_ready().await;

    // No trace context: a new trace, not sampled. The handler still gets its ids.
    let unsampled_marker = directory.path().join("unsampled");
    post_job(&process, "job-unsampled", &unsampled_marker, None).await;
    let messages = wait_reports(&process, "traced", 2).await;
    let printed = printed_traces(&messages);
    assert_eq!(printed.len(), 2, "{messages:#?}");
    let (unsampled_trace, _, sampled) = xray(&printed[0]);
    assert_eq!(sampled, "0", "{printed:?}");
    // Both attempts belong to the same (unrecorded) trace.
    assert_eq!(xray(&printed[1]).0, unsampled_trace);

    // A caller's sampled trace is recorded whatever the ratio.
    let trace_id = random_hex(16);
    let marker = directory.path().join("sampled");
    post_job(
        &process,
        "job-sampled",
        &marker,
        Some(&format!("00-{trace_id}-{}-01", random_hex(8))),
    )
    .await;
    let sampled = wait_spans(&jaeger, &trace_id, 6).await;
    assert!(
        sampled.iter().any(|span| span.name == "ingest http"),
        "{sampled:#?}"
    );
    // The unsampled trace's spans ended before the sampled one's began; none was
    // exported.
    assert!(
        spans(&jaeger, &unsampled_trace).await.is_empty(),
        "an unsampled trace was stored"
    );
}

/// POSTs a binary-mode event to `/v1/events` with `traceparent`.
async fn post_event(process: &Process, id: &str, ty: &str, traceparent: &str) {
    let response = reqwest::Client::new()
        .post(process.url("/v1/events"))
        .header("ce-specversion", "1.0")
        .header("ce-id", id)
        .header("ce-source", "/orders")
        .header("ce-type", ty)
        .header("traceparent", traceparent)
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_functions_get_the_invocations_traceparent_dead_letters_and_batches_are_traced() {
    let jaeger = JaegerServer::start();
    let nats = NatsServer::start();
    // Always fails: out of attempts after two, dead-lettered.
    let failing = FunctionServer::start(|_, _| Reply::status(500)).await;
    let batched = FunctionServer::start(|_, _| Reply::ok()).await;
    let directory = tempfile::tempdir().unwrap();
    let file = directory.path().join("switchyard.toml");
    let mut text = common::base_config(&nats.url(), 0, 0);
    text.push_str(&format!(
        r#"
[[functions]]
type = "http"
name = "failing"
url = "{failing}"

[[functions]]
type = "http"
name = "batched"
url = "{batched}"

[[triggers]]
name = "poison"
function = "failing"
filter = {{ type = {{ exact = "com.example.poison" }} }}
retry = {{ initial = "100ms", max = "100ms", attempts = 2 }}

[[triggers]]
name = "orders"
function = "batched"
filter = {{ type = {{ exact = "com.example.order" }} }}
batch = {{ max_events = 3, window = "10s" }}

[telemetry]
otlp_endpoint = "{endpoint}"
"#,
        failing = failing.url,
        batched = batched.url,
        endpoint = jaeger.otlp_endpoint(),
    ));
    std::fs::write(&file, text).unwrap();
    let process = Process::start(&file, &[]);
    process.wait_ready().await;

    // A poison event: two failed attempts, then a dead letter.
    let trace_id = random_hex(16);
    post_event(
        &process,
        "poison-1",
        "com.example.poison",
        &format!("00-{trace_id}-{}-01", random_hex(8)),
    )
    .await;
    let calls = failing.wait_for(2, WAIT).await;
    // ingest, store, 2 x (deliver, invoke).
    let spans = wait_spans(&jaeger, &trace_id, 6).await;
    let mut attempts: Vec<&Span> = spans
        .iter()
        .filter(|span| span.name == "deliver poison")
        .collect();
    attempts.sort_by_key(|span| span.tag("switchyard.attempt").and_then(|n| n.as_i64()));
    assert_eq!(attempts.len(), 2, "{spans:#?}");
    assert_eq!(attempts[0].text("switchyard.outcome"), "retry");
    assert_eq!(attempts[1].text("switchyard.outcome"), "dead_letter");
    assert_eq!(
        attempts[1].text("switchyard.dead_letter.reason"),
        "attempts_exhausted"
    );
    // Each call carried its invocation span as `traceparent`.
    for (call, attempt) in calls.iter().zip(&attempts) {
        let invocation = spans
            .iter()
            .find(|span| {
                span.name == "invoke failing" && span.parent.as_deref() == Some(attempt.id.as_str())
            })
            .unwrap_or_else(|| panic!("no invocation under {attempt:#?}"));
        assert_eq!(
            invocation.tag("http.response.status_code"),
            Some(&serde_json::json!(500))
        );
        let expected = format!("00-{trace_id}-{}-01", invocation.id);
        assert_eq!(call.header("traceparent"), Some(expected.as_str()));
        assert_eq!(call.header("ce-traceparent"), Some(expected.as_str()));
    }

    // A batch of three events of three traces: each event's attempt in its own trace,
    // one invocation linked to all three.
    let traces: Vec<String> = (0..3).map(|_| random_hex(16)).collect();
    for (index, trace) in traces.iter().enumerate() {
        post_event(
            &process,
            &format!("order-{index}"),
            "com.example.order",
            &format!("00-{trace}-{}-01", random_hex(8)),
        )
        .await;
    }
    let batches = batched.wait_for(1, WAIT).await;
    let batch: Vec<serde_json::Value> = serde_json::from_slice(&batches[0].body).unwrap();
    assert_eq!(batch.len(), 3, "{batch:?}");
    let mut attempt_ids = Vec::new();
    let mut invocations = Vec::new();
    for trace in &traces {
        // ingest, store, deliver (and in one of them the invocation).
        let spans = wait_spans(&jaeger, trace, 3).await;
        let attempt = spans
            .iter()
            .find(|span| span.name == "deliver orders")
            .unwrap_or_else(|| panic!("no attempt: {spans:#?}"));
        assert_eq!(attempt.text("switchyard.outcome"), "delivered");
        attempt_ids.push(attempt.id.clone());
        invocations.extend(
            spans
                .into_iter()
                .filter(|span| span.name == "invoke batched"),
        );
    }
    // The invocation span ends before the attempts, so it is stored by now.
    assert_eq!(invocations.len(), 1, "{invocations:#?}");
    let invocation = &invocations[0];
    assert_eq!(
        invocation.tag("switchyard.batch_size"),
        Some(&serde_json::json!(3))
    );
    let mut related: Vec<String> = invocation.links.clone();
    related.extend(invocation.parent.clone());
    related.sort();
    attempt_ids.sort();
    assert_eq!(related, attempt_ids, "{invocation:#?}");
}
