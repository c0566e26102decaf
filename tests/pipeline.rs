//! End to end, in one process: HTTP ingest -> NATS JetStream (a real nats-server) ->
//! dispatcher -> a real HTTP function server.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cloudevents::binding::http::{
    Builder as SdkBuilder, Serializer as SdkSerializer, to_event as sdk_to_event,
};
use cloudevents::message::BinaryDeserializer as _;
use cloudevents::{AttributesReader, EventBuilder, EventBuilderV10};
use common::{
    FunctionServer, NatsServer, Received, Reply, Switchyard, base_config, binary_event, post_event,
};
use hmac::Mac;

const WAIT: Duration = Duration::from_secs(20);

fn function_section(name: &str, url: &str, max_concurrency: usize) -> String {
    format!(
        "\n[[functions]]\ntype = \"http\"\nname = \"{name}\"\nurl = \"{url}\"\ntimeout = \"5s\"\nmax_concurrency = {max_concurrency}\n"
    )
}

fn trigger_section(name: &str, function: &str, extra: &str) -> String {
    format!("\n[[triggers]]\nname = \"{name}\"\nfunction = \"{function}\"\n{extra}\n")
}

async fn start(
    function: &FunctionServer,
    hooks: &str,
    trigger_extra: &str,
) -> (NatsServer, Switchyard) {
    let nats = NatsServer::start();
    let mut text = base_config(&nats.url(), 0, 0);
    text.push_str(hooks);
    text.push_str(&function_section("fn", &function.url, 64));
    text.push_str(&trigger_section("main", "fn", trigger_extra));
    let switchyard = Switchyard::start(text).await;
    (nats, switchyard)
}

/// Collects the SDK's binary-mode HTTP rendering of an event.
#[derive(Default)]
struct Collected {
    headers: Vec<(String, http::HeaderValue)>,
}

impl SdkBuilder<(Vec<(String, http::HeaderValue)>, Vec<u8>)> for Collected {
    fn header(&mut self, key: &str, value: http::HeaderValue) {
        self.headers.push((key.to_owned(), value));
    }
    fn body(
        &mut self,
        bytes: Vec<u8>,
    ) -> cloudevents::message::Result<(Vec<(String, http::HeaderValue)>, Vec<u8>)> {
        Ok((std::mem::take(&mut self.headers), bytes))
    }
    fn finish(
        &mut self,
    ) -> cloudevents::message::Result<(Vec<(String, http::HeaderValue)>, Vec<u8>)> {
        self.body(Vec::new())
    }
}

fn sdk_event_from(received: &Received) -> cloudevents::Event {
    sdk_to_event(&received.headers, received.body.to_vec())
        .expect("the function received a valid cloudevent")
}

#[tokio::test]
async fn cloudevents_modes_reach_the_function_as_the_sdk_sent_them() {
    let function = FunctionServer::start(|_, _| Reply::ok()).await;
    let (_nats, switchyard) = start(&function, "", "").await;
    let client = reqwest::Client::new();

    // Binary mode, rendered by the official SDK.
    let binary = EventBuilderV10::new()
        .id("sdk-binary-1")
        .source("https://example.com/sdk")
        .ty("com.example.sdk.binary")
        .subject("orders/42")
        .time("2024-05-06T07:08:09Z")
        .extension("partitionkey", "customer-7")
        .extension(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .data("application/octet-stream", vec![0u8, 159, 146, 150, 255])
        .build()
        .unwrap();
    let (headers, body) = binary
        .clone()
        .deserialize_binary(SdkSerializer::new(Collected::default()))
        .unwrap();
    let mut request = client.post(switchyard.url("/v1/events")).body(body);
    for (name, value) in headers {
        request = request.header(name, value);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());

    // Structured mode, serialized by the official SDK, with JSON data.
    let structured = EventBuilderV10::new()
        .id("sdk-structured-1")
        .source("/sdk/structured")
        .ty("com.example.sdk.structured")
        .data(
            "application/json",
            serde_json::json!({"amount": 12.5, "items": ["a", "b"]}),
        )
        .build()
        .unwrap();
    let response = client
        .post(switchyard.url("/v1/events"))
        .header("content-type", "application/cloudevents+json")
        .body(serde_json::to_vec(&structured).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);

    // Batch mode: two events accepted in one request.
    let batch = serde_json::json!([
        {"specversion": "1.0", "id": "batch-1", "source": "/batch", "type": "com.example.batch", "datacontenttype": "text/plain", "data": "first"},
        {"specversion": "1.0", "id": "batch-2", "source": "/batch", "type": "com.example.batch", "data_base64": "AAEC"}
    ]);
    let response = client
        .post(switchyard.url("/v1/events"))
        .header("content-type", "application/cloudevents-batch+json")
        .body(batch.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let accepted: serde_json::Value =
        serde_json::from_str(&response.text().await.unwrap()).unwrap();
    assert_eq!(accepted["accepted"].as_array().unwrap().len(), 2);

    let received = function.wait_for(4, WAIT).await;
    let by_id = |id: &str| {
        received
            .iter()
            .find(|call| call.id() == id)
            .unwrap_or_else(|| panic!("{id} not delivered"))
    };

    let delivered_binary = sdk_event_from(by_id("sdk-binary-1"));
    assert_eq!(
        delivered_binary, binary,
        "binary-mode event changed on the way"
    );
    assert_eq!(&by_id("sdk-binary-1").body[..], &[0u8, 159, 146, 150, 255]);
    assert_eq!(
        by_id("sdk-binary-1").header("traceparent"),
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        "trace context is carried to the function"
    );

    // The SDK reads binary-mode data as bytes, so compare attributes and the exact
    // bytes of the JSON `data` member the SDK serialized.
    let delivered_structured = sdk_event_from(by_id("sdk-structured-1"));
    let mut expected_structured = structured.clone();
    let sent_json = serde_json::to_string(&structured).unwrap();
    let data_start = sent_json.find("\"data\":").unwrap() + "\"data\":".len();
    let sent_data = &sent_json[data_start..sent_json.len() - 1];
    expected_structured.set_data("application/json", sent_data.as_bytes().to_vec());
    assert_eq!(
        delivered_structured, expected_structured,
        "structured-mode event changed on the way"
    );
    assert_eq!(&by_id("sdk-structured-1").body[..], sent_data.as_bytes());

    let first = by_id("batch-1");
    assert_eq!(&first.body[..], b"first");
    assert_eq!(first.header("content-type"), Some("text/plain"));
    assert_eq!(&by_id("batch-2").body[..], &[0u8, 1, 2]);
    assert_eq!(
        sdk_event_from(by_id("batch-2")).source().to_string(),
        "/batch"
    );
    switchyard.stop().await;
}

const HOOKS: &str = r#"
[[sources.hooks]]
name = "github"
event_type = "com.github.event"
id_header = "X-GitHub-Delivery"
subject_header = "X-GitHub-Event"
signature = { scheme = "github", secret = "gh-secret" }

[[sources.hooks]]
name = "stamped"
event_type = "com.example.stamped"
signature = { scheme = "hmac", secret = "k2", header = "X-Signature", prefix = "v1=", timestamp_header = "X-Timestamp", tolerance = "5m" }

[[sources.hooks]]
name = "plain"
event_type = "com.example.plain"
id_header = "Idempotency-Key"
bearer_token = "let-me-in"
"#;

fn hmac_hex(secret: &str, message: &[u8]) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(message);
    hex::encode(mac.finalize().into_bytes())
}

#[tokio::test]
async fn webhooks_are_authenticated_and_delivered_with_their_bytes() {
    let function = FunctionServer::start(|_, _| Reply::ok()).await;
    let (_nats, switchyard) = start(&function, HOOKS, "").await;
    let client = reqwest::Client::new();
    let body = r#"{"ref":"refs/heads/main","zen":"Keep it logically awesome."}"#;

    // GitHub signature: good, wrong, missing.
    let good = client
        .post(switchyard.url("/hooks/github"))
        .header("content-type", "application/json")
        .header("x-github-delivery", "72d3162e-cc78-11e3-81ab-4c9367dc0958")
        .header("x-github-event", "push")
        .header(
            "x-hub-signature-256",
            format!("sha256={}", hmac_hex("gh-secret", body.as_bytes())),
        )
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(good.status(), 202);
    let wrong = client
        .post(switchyard.url("/hooks/github"))
        .header(
            "x-hub-signature-256",
            format!("sha256={}", hmac_hex("other", body.as_bytes())),
        )
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 403);
    assert!(
        wrong
            .text()
            .await
            .unwrap()
            .contains("signature does not match the body")
    );
    let missing = client
        .post(switchyard.url("/hooks/github"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 401);
    assert!(
        missing
            .text()
            .await
            .unwrap()
            .contains("x-hub-signature-256")
    );

    // Timestamped HMAC: fresh passes, stale is refused as a replay.
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let signed = |timestamp: i64| {
        format!(
            "v1={}",
            hmac_hex("k2", format!("{timestamp}.{body}").as_bytes())
        )
    };
    let fresh = client
        .post(switchyard.url("/hooks/stamped"))
        .header("x-timestamp", now.to_string())
        .header("x-signature", signed(now))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(fresh.status(), 202);
    let stale_time = now - 3600;
    let stale = client
        .post(switchyard.url("/hooks/stamped"))
        .header("x-timestamp", stale_time.to_string())
        .header("x-signature", signed(stale_time))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(stale.status(), 403);
    assert!(
        stale
            .text()
            .await
            .unwrap()
            .contains("outside the 300s tolerance")
    );

    // Bearer token.
    let unauthorized = client
        .post(switchyard.url("/hooks/plain"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized.status(), 401);
    let forbidden = client
        .post(switchyard.url("/hooks/plain"))
        .bearer_auth("wrong")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(forbidden.status(), 403);
    let unknown = client
        .post(switchyard.url("/hooks/nope"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);

    let received = function.wait_for(2, WAIT).await;
    let github = received
        .iter()
        .find(|call| call.header("ce-type") == Some("com.github.event"))
        .unwrap();
    assert_eq!(github.id(), "72d3162e-cc78-11e3-81ab-4c9367dc0958");
    assert_eq!(github.header("ce-source"), Some("/hooks/github"));
    assert_eq!(github.header("ce-subject"), Some("push"));
    assert_eq!(github.header("content-type"), Some("application/json"));
    assert_eq!(
        github.header("ce-traceparent"),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    assert_eq!(&github.body[..], body.as_bytes());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        function.received().len(),
        2,
        "only the two authenticated requests are delivered"
    );
    switchyard.stop().await;
}

#[tokio::test]
async fn malformed_and_oversize_requests_get_a_clear_error() {
    let function = FunctionServer::start(|_, _| Reply::ok()).await;
    let (_nats, switchyard) = start(&function, "", "").await;
    let client = reqwest::Client::new();
    let post = |content_type: &'static str, body: String| {
        client
            .post(switchyard.url("/v1/events"))
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let cases = [
        ("application/cloudevents+json", "{not json".to_owned(), "body is not valid JSON"),
        (
            "application/cloudevents+json",
            r#"{"specversion":"1.0","id":"1","type":"t"}"#.to_owned(),
            "missing required attribute `source`",
        ),
        (
            "application/cloudevents+json",
            r#"{"specversion":"0.3","id":"1","source":"/s","type":"t"}"#.to_owned(),
            "unsupported specversion `0.3`",
        ),
        (
            "application/cloudevents+json",
            r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","time":"yesterday"}"#.to_owned(),
            "attribute `time` is invalid",
        ),
        (
            "application/cloudevents-batch+json",
            r#"[{"specversion":"1.0","id":"ok-1","source":"/s","type":"t"},{"specversion":"1.0","id":"2","source":"/s"}]"#.to_owned(),
            "event 1: missing required attribute `type`",
        ),
        ("text/plain", "hello".to_owned(), "not a cloudevent"),
        ("application/cloudevents+json", "x".repeat(5000), "exceeds the limit of 4096 bytes"),
    ];
    for (content_type, body, expected) in cases {
        let response = post(content_type, body).await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        let expected_status = if expected.starts_with("exceeds") {
            413
        } else {
            400
        };
        assert_eq!(status, expected_status, "{text}");
        let error: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(
            error["error"].as_str().unwrap().contains(expected),
            "`{text}` should say `{expected}`"
        );
    }
    let bad_extension = binary_event(&client, &switchyard.url("/v1/events"), "x", "t", "b")
        .header("ce-Bad_Name", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(bad_extension.status(), 400);
    assert!(
        bad_extension
            .text()
            .await
            .unwrap()
            .contains("extension name `bad_name` is invalid")
    );

    // Nothing of a refused batch was published: the valid first event never arrives.
    let good = post_event(&switchyard.url("/v1/events"), "after", "t", "b").await;
    assert_eq!(good.status(), 202);
    function.wait_for(1, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ids: Vec<_> = function
        .received()
        .iter()
        .map(|call| call.id().to_owned())
        .collect();
    assert_eq!(ids, ["after"]);
    switchyard.stop().await;
}

#[tokio::test]
async fn the_same_event_or_delivery_id_twice_is_delivered_once() {
    let function = FunctionServer::start(|_, _| Reply::ok()).await;
    let hooks = "\n[[sources.hooks]]\nname = \"idem\"\nevent_type = \"com.example.idem\"\nid_header = \"Idempotency-Key\"\n";
    let (_nats, switchyard) = start(&function, hooks, "").await;
    let client = reqwest::Client::new();
    for _ in 0..2 {
        let response = post_event(&switchyard.url("/v1/events"), "same-id", "t", "once").await;
        assert_eq!(response.status(), 202);
    }
    let mut duplicates = Vec::new();
    for _ in 0..2 {
        let response = client
            .post(switchyard.url("/hooks/idem"))
            .header("idempotency-key", "provider-delivery-9")
            .body("payload")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        let body: serde_json::Value =
            serde_json::from_str(&response.text().await.unwrap()).unwrap();
        duplicates.push(body["accepted"][0]["duplicate"].as_bool().unwrap());
    }
    assert_eq!(
        duplicates,
        [false, true],
        "the second delivery is reported as a duplicate"
    );
    // Same id from another source is a different event (CloudEvents: source + id).
    let other_source = client
        .post(switchyard.url("/v1/events"))
        .header("ce-specversion", "1.0")
        .header("ce-id", "same-id")
        .header("ce-source", "/another-source")
        .header("ce-type", "t")
        .body("other")
        .send()
        .await
        .unwrap();
    assert_eq!(other_source.status(), 202);
    function.wait_for(3, WAIT).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(function.calls_for("same-id"), 2, "once per source");
    assert_eq!(function.calls_for("provider-delivery-9"), 1);
    assert_eq!(function.received().len(), 3);
    switchyard.stop().await;
}

#[tokio::test]
async fn a_failing_function_is_retried_until_it_succeeds() {
    let function = FunctionServer::start(|_, call| {
        if call < 3 {
            Reply::status(500)
        } else {
            Reply::ok()
        }
    })
    .await;
    let retry = r#"retry = { policy = "fixed", initial = "100ms", attempts = 5, jitter = false }"#;
    let (_nats, switchyard) = start(&function, "", retry).await;
    post_event(&switchyard.url("/v1/events"), "flaky", "t", "x").await;
    function.wait_for(3, WAIT).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        function.calls_for("flaky"),
        3,
        "two failures, then success, then nothing more"
    );
    let dead = switchyard::dlq::list(&switchyard.bus().await, "main")
        .await
        .unwrap();
    assert!(dead.is_empty());
    switchyard.stop().await;
}

#[tokio::test]
async fn exhausted_retries_and_rejections_end_in_the_dead_letter_stream() {
    let function = FunctionServer::start(|received, _| match received.id() {
        "always-500" => Reply::status(500),
        "bad-request" => Reply::status(422),
        "says-reject" => Reply::ok().with_header("switchyard-outcome", "reject"),
        _ => Reply::ok(),
    })
    .await;
    let retry =
        r#"retry = { policy = "exponential", initial = "50ms", max = "200ms", attempts = 3 }"#;
    let (_nats, switchyard) = start(&function, "", retry).await;
    for id in ["always-500", "bad-request", "says-reject"] {
        post_event(&switchyard.url("/v1/events"), id, "t", "payload-bytes").await;
    }
    function.wait_for(5, WAIT).await;
    let bus = switchyard.bus().await;
    let dead = common::wait_for_dead_letters(&bus, "main", 3, WAIT).await;
    assert_eq!(dead.len(), 3);
    let find = |id: &str| {
        &dead
            .iter()
            .find(|entry| entry.dead_letter.event.id == id)
            .unwrap()
            .dead_letter
    };
    let exhausted = find("always-500");
    assert_eq!(exhausted.reason, "attempts_exhausted");
    assert_eq!(exhausted.attempts, 3);
    assert_eq!(exhausted.last_status, Some(500));
    assert_eq!(exhausted.trigger, "main");
    assert_eq!(exhausted.function, "fn");
    assert!(
        exhausted.first_attempt_at.is_some(),
        "first attempt time recorded"
    );
    assert!(exhausted.first_attempt_at.as_deref().unwrap() <= exhausted.last_attempt_at.as_str());
    assert_eq!(
        &exhausted.event.data[..],
        b"payload-bytes",
        "the event is kept unchanged"
    );
    let rejected = find("bad-request");
    assert_eq!(
        (
            rejected.reason.as_str(),
            rejected.attempts,
            rejected.last_status
        ),
        ("rejected", 1, Some(422))
    );
    let asked = find("says-reject");
    assert_eq!((asked.reason.as_str(), asked.attempts), ("rejected", 1));
    assert!(asked.last_error.contains("asked to reject"));
    assert_eq!(function.calls_for("always-500"), 3);
    assert_eq!(function.calls_for("bad-request"), 1, "a 4xx is not retried");
    switchyard.stop().await;
}

#[tokio::test]
async fn retry_after_is_honoured_and_max_age_dead_letters() {
    let function = FunctionServer::start(|received, call| match (received.id(), call) {
        ("busy", 1) => Reply::status(503).with_header("retry-after", "2"),
        ("busy", _) => Reply::ok(),
        _ => Reply::status(500),
    })
    .await;
    let nats = NatsServer::start();
    let mut text = base_config(&nats.url(), 0, 0);
    text.push_str(&function_section("fn", &function.url, 64));
    text.push_str(&trigger_section(
        "patient",
        "fn",
        "filter = { type = { exact = \"busy\" } }\nretry = { policy = \"fixed\", initial = \"100ms\", attempts = 5, jitter = false }",
    ));
    text.push_str(&trigger_section(
        "hasty",
        "fn",
        "filter = { type = { exact = \"old\" } }\nretry = { policy = \"fixed\", initial = \"100ms\", attempts = 1000, max_age = \"1s\", jitter = false }",
    ));
    let switchyard = Switchyard::start(text).await;
    post_event(&switchyard.url("/v1/events"), "busy", "busy", "x").await;
    post_event(&switchyard.url("/v1/events"), "too-old", "old", "x").await;
    let bus = switchyard.bus().await;
    let deadline = std::time::Instant::now() + WAIT;
    while function.calls_for("busy") < 2
        || switchyard::dlq::list(&bus, "hasty")
            .await
            .unwrap()
            .is_empty()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "busy event not retried or old event not dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let calls: Vec<_> = function
        .received()
        .into_iter()
        .filter(|call| call.id() == "busy")
        .collect();
    let gap = calls[1].at.duration_since(calls[0].at);
    assert!(
        gap >= Duration::from_millis(1900),
        "Retry-After: 2 was not honoured, retried after {gap:?}"
    );
    let dead = switchyard::dlq::list(&bus, "hasty").await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].dead_letter.event.id, "too-old");
    assert_eq!(dead[0].dead_letter.reason, "max_age_exceeded");
    assert!(dead[0].dead_letter.attempts >= 2);
    assert_eq!(dead[0].dead_letter.last_status, Some(500));
    assert!(
        switchyard::dlq::list(&bus, "patient")
            .await
            .unwrap()
            .is_empty()
    );
    switchyard.stop().await;
}

#[tokio::test]
async fn trigger_concurrency_is_reached_and_never_exceeded() {
    let function =
        FunctionServer::start(|_, _| Reply::ok().after(Duration::from_millis(150))).await;
    let (_nats, switchyard) = start(&function, "", "max_concurrency = 3").await;
    for index in 0..24 {
        let response = post_event(
            &switchyard.url("/v1/events"),
            &format!("c{index}"),
            "t",
            "x",
        )
        .await;
        assert_eq!(response.status(), 202);
    }
    function.wait_for(24, WAIT).await;
    assert_eq!(
        function.peak(),
        3,
        "peak concurrency must equal the trigger's max_concurrency"
    );
    switchyard.stop().await;
}

#[tokio::test]
async fn function_concurrency_is_shared_by_its_triggers() {
    let function =
        FunctionServer::start(|_, _| Reply::ok().after(Duration::from_millis(150))).await;
    let nats = NatsServer::start();
    let mut text = base_config(&nats.url(), 0, 0);
    text.push_str(&function_section("shared", &function.url, 2));
    text.push_str(&trigger_section(
        "orders",
        "shared",
        "max_concurrency = 8\nfilter = { type = { prefix = \"com.example.orders.\" } }",
    ));
    text.push_str(&trigger_section(
        "refunds",
        "shared",
        "max_concurrency = 8\nfilter = { type = { exact = \"com.example.refunds.created\" } }",
    ));
    let switchyard = Switchyard::start(text).await;
    for index in 0..10 {
        for ty in [
            "com.example.orders.created",
            "com.example.refunds.created",
            "com.example.other",
        ] {
            post_event(
                &switchyard.url("/v1/events"),
                &format!("{ty}-{index}"),
                ty,
                "x",
            )
            .await;
        }
    }
    let received = function.wait_for(20, WAIT).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        function.received().len(),
        20,
        "events no trigger matches are not delivered"
    );
    assert!(
        received
            .iter()
            .all(|call| call.header("ce-type") != Some("com.example.other"))
    );
    assert_eq!(
        function.peak(),
        2,
        "two triggers together stay within the function's limit"
    );
    switchyard.stop().await;
}

#[tokio::test]
async fn nats_unreachable_answers_503_never_202() {
    let function = FunctionServer::start(|_, _| Reply::ok()).await;
    let (mut nats, switchyard) = start(&function, "", "").await;
    let client = reqwest::Client::new();
    let response = post_event(&switchyard.url("/v1/events"), "before", "t", "x").await;
    assert_eq!(response.status(), 202);
    function.wait_for(1, WAIT).await;
    nats.stop();
    for index in 0..3 {
        let response = post_event(
            &switchyard.url("/v1/events"),
            &format!("during-{index}"),
            "t",
            "x",
        )
        .await;
        assert_eq!(response.status(), 503);
        assert!(response.headers().contains_key("retry-after"));
        let text = response.text().await.unwrap();
        assert!(text.contains("event bus unavailable"), "{text}");
    }
    let readiness = client
        .get(format!("http://{}/readyz", switchyard.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(readiness.status(), 503);
    switchyard.stop().await;
}

#[tokio::test]
async fn dead_letters_can_be_replayed_and_purged() {
    let accept = Arc::new(AtomicBool::new(false));
    let gate = accept.clone();
    let function = FunctionServer::start(move |_, _| {
        if gate.load(Ordering::SeqCst) {
            Reply::ok()
        } else {
            Reply::status(400)
        }
    })
    .await;
    let (_nats, switchyard) = start(&function, "", "").await;
    for id in ["r1", "r2"] {
        post_event(&switchyard.url("/v1/events"), id, "t", "keep-me").await;
    }
    let bus = switchyard.bus().await;
    let dead = common::wait_for_dead_letters(&bus, "main", 2, WAIT).await;
    accept.store(true, Ordering::SeqCst);
    let first: Vec<_> = dead
        .iter()
        .filter(|entry| entry.dead_letter.event.id == "r1")
        .cloned()
        .collect();
    assert_eq!(
        switchyard::dlq::replay(&bus, "main", &first).await.unwrap(),
        1
    );
    let received = function.wait_for(3, WAIT).await;
    let replayed = received.last().unwrap();
    assert_eq!(
        replayed.id(),
        "r1",
        "the replay is not swallowed by the duplicate window"
    );
    assert_eq!(&replayed.body[..], b"keep-me");
    let after = switchyard::dlq::list(&bus, "main").await.unwrap();
    let record = after
        .iter()
        .find(|entry| entry.dead_letter.event.id == "r1")
        .unwrap();
    assert_eq!(
        record.replays.as_ref().map(|replays| replays.count),
        Some(1),
        "the dead letter records its replay"
    );
    let untouched = after
        .iter()
        .find(|entry| entry.dead_letter.event.id == "r2")
        .unwrap();
    assert!(untouched.replays.is_none());

    let removed = switchyard::dlq::purge(&bus, "main", Some(&[untouched.sequence]))
        .await
        .unwrap();
    assert_eq!(removed, 1);
    assert_eq!(switchyard::dlq::list(&bus, "main").await.unwrap().len(), 1);
    let removed = switchyard::dlq::purge(&bus, "main", None).await.unwrap();
    assert_eq!(removed, 1);
    assert!(
        switchyard::dlq::list(&bus, "main")
            .await
            .unwrap()
            .is_empty()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        function.calls_for("r2"),
        1,
        "only the replayed dead letter was delivered again"
    );
    switchyard.stop().await;
}

#[tokio::test]
async fn events_waiting_for_a_retry_do_not_hold_the_trigger() {
    let function = FunctionServer::start(|received, _| {
        if received.id().starts_with("later") {
            Reply::status(503).with_header("retry-after", "60")
        } else {
            Reply::ok()
        }
    })
    .await;
    let (_nats, switchyard) = start(&function, "", "max_concurrency = 2").await;
    for id in ["later-1", "later-2"] {
        post_event(&switchyard.url("/v1/events"), id, "t", "x").await;
    }
    let deadline = std::time::Instant::now() + WAIT;
    while function.calls_for("later-1") + function.calls_for("later-2") < 2 {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Both of the trigger's two slots had an event that now waits 60s for its retry;
    // new events must still flow at once.
    for index in 0..6 {
        post_event(
            &switchyard.url("/v1/events"),
            &format!("now-{index}"),
            "t",
            "x",
        )
        .await;
    }
    function.wait_for(8, Duration::from_secs(10)).await;
    assert_eq!(
        function.calls_for("later-1"),
        1,
        "the retry waits for its Retry-After"
    );
    let triggers: serde_json::Value = switchyard.admin_json("/v1/triggers").await;
    assert_eq!(triggers["triggers"][0]["name"], "main");
    switchyard.stop().await;
}

#[tokio::test]
async fn an_event_over_the_bus_limit_is_refused_with_413() {
    let function = FunctionServer::start(|_, _| Reply::ok()).await;
    let nats = NatsServer::start();
    let mut text =
        base_config(&nats.url(), 0, 0).replace("max_body_bytes = 4096", "max_body_bytes = 4194304");
    text.push_str(&function_section("fn", &function.url, 8));
    text.push_str(&trigger_section("main", "fn", ""));
    let switchyard = Switchyard::start(text).await;
    let client = reqwest::Client::new();
    let large = "x".repeat(1024 * 1024 - 4096);
    let response = client
        .post(switchyard.url("/v1/events"))
        .header("ce-specversion", "1.0")
        .header("ce-id", "huge")
        .header("ce-source", "/tests")
        .header("ce-type", "t")
        .body(large)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    let text = response.text().await.unwrap();
    assert!(text.contains("over the bus limit"), "{text}");
    // Just under the limit passes, and can still be dead-lettered if it fails.
    let fits = "y".repeat(1024 * 1024 - 16 * 1024);
    let response = binary_event(&client, &switchyard.url("/v1/events"), "fits", "t", "")
        .body(fits.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let received = function.wait_for(1, WAIT).await;
    assert_eq!(received[0].body.len(), fits.len());
    switchyard.stop().await;
}

#[tokio::test]
async fn a_function_reply_is_published_and_reaches_the_next_trigger() {
    let first = FunctionServer::start(|received, _| {
        Reply::ok()
            .with_header("ce-specversion", "1.0")
            .with_header("ce-id", format!("reply-to-{}", received.id()))
            .with_header("ce-source", "/functions/first")
            .with_header("ce-type", "com.example.step2")
            .with_header("content-type", "application/json")
            .with_body("{\"step\":2}")
    })
    .await;
    let second = FunctionServer::start(|_, _| Reply::ok()).await;
    let nats = NatsServer::start();
    let mut text = base_config(&nats.url(), 0, 0);
    text.push_str(&function_section("first", &first.url, 8));
    text.push_str(&function_section("second", &second.url, 8));
    text.push_str(&trigger_section(
        "step1",
        "first",
        "publish_replies = true\nfilter = { type = { exact = \"com.example.step1\" } }",
    ));
    text.push_str(&trigger_section(
        "step2",
        "second",
        "filter = { type = { exact = \"com.example.step2\" } }",
    ));
    let switchyard = Switchyard::start(text).await;
    post_event(
        &switchyard.url("/v1/events"),
        "chain-1",
        "com.example.step1",
        "start",
    )
    .await;
    let received = second.wait_for(1, WAIT).await;
    assert_eq!(received[0].id(), "reply-to-chain-1");
    assert_eq!(received[0].header("ce-source"), Some("/functions/first"));
    assert_eq!(&received[0].body[..], b"{\"step\":2}");
    assert_eq!(
        first.received().len(),
        1,
        "the reply does not loop back to the first trigger"
    );
    switchyard.stop().await;
}

#[tokio::test]
async fn an_overloaded_function_gets_less_concurrency_then_recovers() {
    let function = FunctionServer::start(|received, call| {
        if received.id().starts_with("push") && call == 1 {
            Reply::status(429)
        } else {
            Reply::ok()
        }
    })
    .await;
    let nats = NatsServer::start();
    let mut text = base_config(&nats.url(), 0, 0);
    text.push_str(&function_section("fn", &function.url, 8));
    text.push_str(&trigger_section(
        "main",
        "fn",
        "retry = { policy = \"fixed\", initial = \"50ms\", attempts = 5 }",
    ));
    let switchyard = Switchyard::start(text).await;
    let client = reqwest::Client::new();
    let limit = || async {
        let body = client
            .get(format!("http://{}/v1/triggers", switchyard.admin))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let view: serde_json::Value = serde_json::from_str(&body).unwrap();
        view["triggers"][0]["function_concurrency_limit"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(limit().await, 8);
    post_event(&switchyard.url("/v1/events"), "push-0", "t", "x").await;
    function.wait_for(2, WAIT).await;
    assert_eq!(limit().await, 4, "a 429 halves the function's concurrency");
    for index in 0..40 {
        post_event(
            &switchyard.url("/v1/events"),
            &format!("ok-{index}"),
            "t",
            "x",
        )
        .await;
    }
    function.wait_for(42, WAIT).await;
    assert_eq!(
        limit().await,
        8,
        "successes bring it back to the configured maximum"
    );
    switchyard.stop().await;
}

#[tokio::test]
async fn idle_triggers_leave_their_function_budget_to_busy_ones() {
    let function =
        FunctionServer::start(|_, _| Reply::ok().after(Duration::from_millis(150))).await;
    let nats = NatsServer::start();
    let mut text = base_config(&nats.url(), 0, 0);
    text.push_str(&function_section("shared", &function.url, 2));
    for name in ["quiet-1", "quiet-2", "quiet-3"] {
        text.push_str(&trigger_section(
            name,
            "shared",
            &format!("filter = {{ type = {{ exact = \"{name}\" }} }}"),
        ));
    }
    text.push_str(&trigger_section(
        "busy",
        "shared",
        "max_concurrency = 8\nfilter = { type = { exact = \"busy\" } }",
    ));
    let switchyard = Switchyard::start(text).await;
    for index in 0..12 {
        post_event(
            &switchyard.url("/v1/events"),
            &format!("b{index}"),
            "busy",
            "x",
        )
        .await;
    }
    function.wait_for(12, WAIT).await;
    assert_eq!(
        function.peak(),
        2,
        "three idle triggers must not hold the function's two slots"
    );
    // And a quiet trigger still gets its event promptly.
    post_event(&switchyard.url("/v1/events"), "q1", "quiet-2", "x").await;
    function.wait_for(13, Duration::from_secs(5)).await;
    switchyard.stop().await;
}

#[tokio::test]
async fn streams_are_created_then_updated_to_match_the_configuration() {
    let function = FunctionServer::start(|_, _| Reply::ok()).await;
    let nats = NatsServer::start();
    let mut text = base_config(&nats.url(), 0, 0);
    text.push_str(&function_section("fn", &function.url, 4));
    text.push_str(&trigger_section("main", "fn", ""));
    let first = Switchyard::start(text.clone()).await;
    let bus = first.bus().await;
    let mut stream = bus
        .jetstream()
        .get_stream(bus.events_stream())
        .await
        .unwrap();
    let info = stream.info().await.unwrap().clone();
    assert_eq!(info.config.duplicate_window, Duration::from_secs(60));
    assert_eq!(info.config.max_age, Duration::from_secs(7 * 24 * 3600));
    assert_eq!(
        info.config.discard,
        switchyard_bus::async_nats::jetstream::stream::DiscardPolicy::New
    );
    first.stop().await;

    // Same streams, new settings: updated in place, events kept.
    let changed = text.replace(
        "duplicate_window = \"1m\"",
        "duplicate_window = \"45s\", max_age = \"2d\"",
    );
    assert_ne!(changed, text);
    let second = Switchyard::start(changed).await;
    let response = post_event(&second.url("/v1/events"), "after-update", "t", "x").await;
    assert_eq!(response.status(), 202);
    function.wait_for(1, WAIT).await;
    let info = stream.info().await.unwrap().clone();
    assert_eq!(info.config.duplicate_window, Duration::from_secs(45));
    assert_eq!(info.config.max_age, Duration::from_secs(2 * 24 * 3600));
    second.stop().await;
}

#[tokio::test]
async fn a_retry_never_waits_longer_than_the_stream_keeps_it() {
    // Retry-After asks for 10 minutes, but the events stream keeps messages 4 s: the
    // retry copy must come back before the stream would delete it.
    let function = FunctionServer::start(|_, call| {
        if call == 1 {
            Reply::status(503).with_header("retry-after", "600")
        } else {
            Reply::ok()
        }
    })
    .await;
    let nats = NatsServer::start();
    let mut text = base_config(&nats.url(), 0, 0).replace(
        "duplicate_window = \"1m\"",
        "duplicate_window = \"2s\", max_age = \"4s\"",
    );
    text.push_str(&function_section("fn", &function.url, 4));
    // ack_wait shorter than the duplicate window, as validate requires.
    text.push_str(&trigger_section("main", "fn", "ack_wait = \"1s\""));
    let switchyard = Switchyard::start(text).await;
    let response = post_event(&switchyard.url("/v1/events"), "patient", "t", "x").await;
    assert_eq!(response.status(), 202);
    function.wait_for(2, WAIT).await;
    assert_eq!(function.calls_for("patient"), 2);
    switchyard.stop().await;
}

/// A webhook delivery id is remembered past the events stream's duplicate window (the
/// dedup horizon, 24 h by default for hooks with `id_header`): a redelivery after the
/// window is answered as a duplicate and not delivered again. A hook with
/// `dedup_horizon = "0s"` relies on the window only.
#[tokio::test]
async fn a_hook_delivery_id_is_remembered_past_the_duplicate_window() {
    let function = FunctionServer::start(|_, _| Reply::ok()).await;
    let hooks = "\n[[sources.hooks]]\nname = \"orders\"\nevent_type = \"com.example.order\"\nid_header = \"Idempotency-Key\"\n\n[[sources.hooks]]\nname = \"window\"\nevent_type = \"com.example.order\"\nid_header = \"Idempotency-Key\"\ndedup_horizon = \"0s\"\n";
    let nats = NatsServer::start();
    // A 2 s window (a trigger's ack_wait must be shorter: 1 s).
    let mut text = base_config(&nats.url(), 0, 0)
        .replace("duplicate_window = \"1m\"", "duplicate_window = \"2s\"");
    text.push_str(hooks);
    text.push_str(&function_section("fn", &function.url, 8));
    text.push_str(&trigger_section("main", "fn", "ack_wait = \"1s\""));
    let switchyard = Switchyard::start(text).await;
    let client = reqwest::Client::new();
    let post = |hook: &str| {
        client
            .post(switchyard.url(&format!("/hooks/{hook}")))
            .header("idempotency-key", "order-17")
            .body("{}")
            .send()
    };
    let duplicate = |response: reqwest::Response| async move {
        assert_eq!(response.status(), 202);
        let answer: serde_json::Value =
            serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        answer["accepted"][0]["duplicate"].as_bool().unwrap()
    };
    assert!(!duplicate(post("orders").await.unwrap()).await);
    assert!(!duplicate(post("window").await.unwrap()).await);
    function.wait_for(2, WAIT).await;
    // Past the 2 s duplicate window (time passing, not waiting for anything).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        duplicate(post("orders").await.unwrap()).await,
        "remembered by the horizon"
    );
    assert!(
        !duplicate(post("window").await.unwrap()).await,
        "without a horizon the window has passed"
    );
    function.wait_for(3, WAIT).await;
    let sources: Vec<_> = function
        .received()
        .iter()
        .map(|call| call.header("ce-source").unwrap().to_owned())
        .collect();
    assert_eq!(
        sources
            .iter()
            .filter(|source| *source == "/hooks/orders")
            .count(),
        1,
        "{sources:?}"
    );
    assert_eq!(
        sources
            .iter()
            .filter(|source| *source == "/hooks/window")
            .count(),
        2,
        "{sources:?}"
    );
    switchyard.stop().await;
}
