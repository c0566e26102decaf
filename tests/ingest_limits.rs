//! What nats-server would refuse is refused at the door, with the limit named, and
//! never reaches the server: one request must not be able to close the NATS
//! connection every other request shares, nor get `503 retry later` for something no
//! retry can fix. What is accepted can be delivered and dead-lettered. Sources that
//! belong to a webhook cannot be forged on `/v1/events`.

mod common;

use std::time::Duration;

use common::{
    FunctionServer, NatsServer, Reply, Switchyard, base_config, binary_event, wait_for_dead_letters,
};
use hmac::Mac;

const WAIT: Duration = Duration::from_secs(20);

fn config(nats: &NatsServer, function: &FunctionServer, source_extra: &str) -> String {
    let mut text = base_config(&nats.url(), 0, 0);
    text = text.replace("max_body_bytes = 4096", "max_body_bytes = 1048576");
    text.push_str(source_extra);
    text.push_str(&format!(
        "\n[[functions]]\ntype = \"http\"\nname = \"fn\"\nurl = \"{}\"\ntimeout = \"5s\"\n\n[[triggers]]\nname = \"main\"\nfunction = \"fn\"\nretry = {{ attempts = 2, initial = \"100ms\" }}\n",
        function.url
    ));
    text
}

async fn error_of(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: serde_json::Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    (
        status,
        body["error"].as_str().unwrap_or_default().to_owned(),
    )
}

/// Long `type`s sent in binary, structured and batch mode while ordinary events flow:
/// each is refused with 413 naming the subject limit; every ordinary event is
/// accepted (no 503) and delivered; the NATS connection is never lost.
#[tokio::test]
async fn an_attack_of_long_types_does_not_touch_other_requests() {
    let nats = NatsServer::start();
    let function = FunctionServer::start(|_, _| Reply::ok()).await;
    let switchyard = Switchyard::start(config(&nats, &function, "")).await;
    let client = reqwest::Client::new();
    let long_type = "t".repeat(5_000);
    let long_source = format!("/{}", "s".repeat(5_000));
    let url = switchyard.url("/v1/events");

    let attacker = {
        let (client, url, long_type, long_source) = (
            client.clone(),
            url.clone(),
            long_type.clone(),
            long_source.clone(),
        );
        tokio::spawn(async move {
            let mut refusals = Vec::new();
            for round in 0..30 {
                let binary = client
                    .post(&url)
                    .header("ce-specversion", "1.0")
                    .header("ce-id", format!("long-{round}"))
                    .header("ce-source", "/attacker")
                    .header("ce-type", long_type.as_str())
                    .body("x")
                    .send()
                    .await
                    .unwrap();
                refusals.push(error_of(binary).await);
                let structured = client
                    .post(&url)
                    .header("content-type", "application/cloudevents+json")
                    .body(
                        serde_json::json!({"specversion": "1.0", "id": format!("s-{round}"), "source": long_source, "type": "t"})
                            .to_string(),
                    )
                    .send()
                    .await
                    .unwrap();
                refusals.push(error_of(structured).await);
                let batch = client
                    .post(&url)
                    .header("content-type", "application/cloudevents-batch+json")
                    .body(
                        serde_json::json!([
                            {"specversion": "1.0", "id": format!("b-{round}"), "source": "/ok", "type": "t"},
                            {"specversion": "1.0", "id": format!("c-{round}"), "source": "/ok", "type": long_type},
                        ])
                        .to_string(),
                    )
                    .send()
                    .await
                    .unwrap();
                refusals.push(error_of(batch).await);
            }
            refusals
        })
    };
    let mut ordinary = Vec::new();
    for index in 0..120 {
        let response = binary_event(&client, &url, &format!("ok-{index}"), "com.example.ok", "x")
            .send()
            .await
            .unwrap();
        ordinary.push(response.status().as_u16());
    }
    let refusals = attacker.await.unwrap();
    assert!(
        ordinary.iter().all(|status| *status == 202),
        "ordinary events: {ordinary:?}"
    );
    assert_eq!(refusals.len(), 90);
    for (status, message) in &refusals {
        assert_eq!(*status, 413, "{message}");
        assert!(
            message.contains("over the limit of 3840 bytes")
                && message.contains("max_control_line"),
            "{message}"
        );
    }
    assert!(
        refusals[2].1.starts_with("event 1 of the batch"),
        "{}",
        refusals[2].1
    );
    function.wait_for(120, WAIT).await;
    assert_eq!(
        switchyard.metric("switchyard_nats_disconnections").await,
        0.0
    );
    // The first event of a refused batch was not stored either.
    assert_eq!(function.calls_for("b-0"), 0);
    assert_eq!(function.received().len(), 120);
    switchyard.stop().await;
}

/// An attribute or webhook id over JetStream's 64 KiB header limit is a 413 naming
/// that limit (not a 503 a client would retry forever). One just under the event
/// limit is accepted, and when its function rejects it the dead letter is stored:
/// one call, one dead letter.
#[tokio::test]
async fn header_limits_are_refused_at_the_door_and_dead_letters_fit() {
    let nats = NatsServer::start();
    let function = FunctionServer::start(|received, _| {
        if received.id() == "big-but-fits" {
            Reply::status(400)
        } else {
            Reply::ok()
        }
    })
    .await;
    let hooks = "\n[[sources.hooks]]\nname = \"plain\"\nevent_type = \"com.example.plain\"\nid_header = \"Idempotency-Key\"\nbearer_token = \"let-me-in\"\n";
    let switchyard = Switchyard::start(config(&nats, &function, hooks)).await;
    let client = reqwest::Client::new();
    let url = switchyard.url("/v1/events");

    let huge = "s".repeat(64 * 1024);
    let response = client
        .post(&url)
        .header("ce-specversion", "1.0")
        .header("ce-id", "huge-subject")
        .header("ce-source", "/tests")
        .header("ce-type", "com.example")
        .header("ce-subject", huge.as_str())
        .body("x")
        .send()
        .await
        .unwrap();
    let (status, message) = error_of(response).await;
    assert_eq!(status, 413, "{message}");
    assert!(
        message.contains("JetStream's 64 KiB header limit") && message.contains("`subject`"),
        "{message}"
    );

    let response = client
        .post(switchyard.url("/hooks/plain"))
        .header("authorization", "Bearer let-me-in")
        .header("idempotency-key", huge.as_str())
        .body("{}")
        .send()
        .await
        .unwrap();
    let (status, message) = error_of(response).await;
    assert_eq!(status, 413, "{message}");
    assert!(message.contains("`id`"), "{message}");

    // Just under the event limit (56 KiB of header block): accepted, rejected by the
    // function, dead-lettered once.
    let fits = "f".repeat(56 * 1024 - 400);
    let response = client
        .post(&url)
        .header("ce-specversion", "1.0")
        .header("ce-id", "big-but-fits")
        .header("ce-source", "/tests")
        .header("ce-type", "com.example")
        .header("ce-subject", fits.as_str())
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
    let bus = switchyard.bus().await;
    let dead = wait_for_dead_letters(&bus, "main", 1, WAIT).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].dead_letter.event.id, "big-but-fits");
    assert_eq!(
        dead[0].dead_letter.event.subject.as_deref(),
        Some(fits.as_str())
    );
    assert_eq!(dead[0].dead_letter.reason, "rejected");
    assert_eq!(function.calls_for("big-but-fits"), 1);
    assert_eq!(
        switchyard.metric("switchyard_nats_disconnections").await,
        0.0
    );
    switchyard.stop().await;
}

/// Every kind of attribute with awkward characters (control characters, quotes,
/// percent signs, non-ASCII) is either refused at ingest with 400 or delivered on
/// the first attempt: never accepted and then dead-lettered without a call.
#[tokio::test]
async fn every_accepted_attribute_can_be_delivered() {
    let nats = NatsServer::start();
    let function = FunctionServer::start(|_, _| Reply::ok()).await;
    let switchyard = Switchyard::start(config(&nats, &function, "")).await;
    let client = reqwest::Client::new();
    let url = switchyard.url("/v1/events");
    let awkward = "a\u{1}b\"c%d é\u{7f}";
    let encoded =
        percent_encoding::utf8_percent_encode(awkward, percent_encoding::NON_ALPHANUMERIC)
            .to_string();
    let attributes = [
        "id",
        "source",
        "type",
        "subject",
        "dataschema",
        "traceparent",
        "tracestate",
        "partitionkey",
        "myextension",
    ];
    for attribute in attributes {
        let mut headers = vec![
            ("ce-specversion", "1.0".to_owned()),
            ("ce-id", format!("kind-{attribute}")),
            ("ce-source", "/tests".to_owned()),
            ("ce-type", "com.example".to_owned()),
        ];
        headers.retain(|(name, _)| *name != format!("ce-{attribute}"));
        let name = format!("ce-{attribute}");
        let mut request = client.post(&url).body("x");
        for (header, value) in &headers {
            request = request.header(*header, value.as_str());
        }
        let response = request
            .header(name.as_str(), encoded.as_str())
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            202,
            "{attribute}: {}",
            response.text().await.unwrap()
        );
    }
    // A media type travels as a plain header: one that cannot be is refused.
    let response = client
        .post(&url)
        .header("content-type", "application/cloudevents+json")
        .body(
            serde_json::json!({"specversion": "1.0", "id": "ct", "source": "/tests", "type": "t", "datacontenttype": "text/plain\u{1}"})
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    let (status, message) = error_of(response).await;
    assert_eq!(status, 400, "{message}");
    assert!(message.contains("datacontenttype"), "{message}");

    let received = function.wait_for(attributes.len(), WAIT).await;
    assert_eq!(received.len(), attributes.len());
    for call in &received {
        assert_eq!(function.calls_for(call.id()), 1, "{}", call.id());
    }
    let decoded = |value: &str| {
        percent_encoding::percent_decode_str(value)
            .decode_utf8()
            .unwrap()
            .into_owned()
    };
    let traced = received
        .iter()
        .find(|call| call.header("ce-traceparent").is_some())
        .unwrap();
    assert_eq!(decoded(traced.header("ce-traceparent").unwrap()), awkward);
    // Not a header value: only the encoded copy travels.
    assert_eq!(traced.header("traceparent"), None);
    let bus = switchyard.bus().await;
    assert!(
        switchyard::dlq::list(&bus, "main")
            .await
            .unwrap()
            .is_empty()
    );
    switchyard.stop().await;
}

fn github_signature(body: &str) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"gh-secret").unwrap();
    mac.update(body.as_bytes());
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The README's setup: a signed GitHub hook and a trigger on its source. An
/// unauthenticated `POST /v1/events` claiming the hook's source (first with the id of
/// a delivery still to come) is refused, so the later, validly signed delivery is
/// not taken for a duplicate and the function gets the real body.
#[tokio::test]
async fn a_hooks_source_cannot_be_forged_on_v1_events() {
    let nats = NatsServer::start();
    let function = FunctionServer::start(|_, _| Reply::ok()).await;
    let hooks = "\n[[sources.hooks]]\nname = \"github\"\nevent_type = \"com.github.event\"\nid_header = \"X-GitHub-Delivery\"\nsignature = { scheme = \"github\", secret = \"gh-secret\" }\n";
    let text = config(&nats, &function, hooks).replace(
        "name = \"main\"\nfunction = \"fn\"\n",
        "name = \"main\"\nfunction = \"fn\"\nfilter = { source = { exact = \"/hooks/github\" } }\n",
    );
    assert!(text.contains("filter = { source"));
    let switchyard = Switchyard::start(text).await;
    let client = reqwest::Client::new();
    let delivery = "72d3162e-cc78-11e3-81ab-4c9367dc0958";

    let forged = client
        .post(switchyard.url("/v1/events"))
        .header("ce-specversion", "1.0")
        .header("ce-id", delivery)
        .header("ce-source", "/hooks/github")
        .header("ce-type", "com.github.event")
        .body("{\"forged\":true}")
        .send()
        .await
        .unwrap();
    let (status, message) = error_of(forged).await;
    assert_eq!(status, 403, "{message}");
    assert!(message.contains("belongs to webhook `github`"), "{message}");
    let forged_batch = client
        .post(switchyard.url("/v1/events"))
        .header("content-type", "application/cloudevents-batch+json")
        .body(
            serde_json::json!([{"specversion": "1.0", "id": "x", "source": "/hooks/github", "type": "com.github.event"}])
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(forged_batch.status(), 403);

    let body = r#"{"ref":"refs/heads/main"}"#;
    let genuine = client
        .post(switchyard.url("/hooks/github"))
        .header("content-type", "application/json")
        .header("x-github-delivery", delivery)
        .header("x-hub-signature-256", github_signature(body))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(genuine.status(), 202);
    let answer: serde_json::Value =
        serde_json::from_slice(&genuine.bytes().await.unwrap()).unwrap();
    assert_eq!(answer["accepted"][0]["duplicate"], false, "{answer}");
    let received = function.wait_for(1, WAIT).await;
    assert_eq!(received[0].id(), delivery);
    assert_eq!(&received[0].body[..], body.as_bytes());
    // Events with other sources are still welcome.
    let other = binary_event(&client, &switchyard.url("/v1/events"), "o-1", "t", "x")
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 202);
    switchyard.stop().await;
}

/// The router's own 404 and 405 answer in JSON with a message, like every other
/// refusal.
#[tokio::test]
async fn unknown_paths_and_methods_get_a_json_error() {
    let nats = NatsServer::start();
    let function = FunctionServer::start(|_, _| Reply::ok()).await;
    let switchyard = Switchyard::start(config(&nats, &function, "")).await;
    let client = reqwest::Client::new();
    let (status, message) = error_of(
        client
            .post(switchyard.url("/v2/events"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 404);
    assert!(message.contains("POST /v1/events"), "{message}");
    let response = client
        .get(switchyard.url("/v1/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["allow"], "POST");
    let (status, message) = error_of(response).await;
    assert_eq!(status, 405);
    assert!(message.contains("`GET` is not allowed"), "{message}");
    switchyard.stop().await;
}

fn batch_body(ids: &[&str], data: &str) -> String {
    serde_json::Value::Array(
        ids.iter()
            .map(|id| {
                serde_json::json!({"specversion": "1.0", "id": id, "source": "/batch", "type": "com.example.t", "data": data})
            })
            .collect(),
    )
    .to_string()
}

/// A batch is stored all or none (one JetStream atomic batch): when the events
/// stream has room for only part of it, nothing is stored and the sender gets 503;
/// a resend of a batch that was partly or wholly stored stores the missing events and
/// reports the others as duplicates; an id twice in one batch is stored once.
#[tokio::test]
async fn a_batch_is_stored_all_or_none_and_a_resend_completes_it() {
    let nats = NatsServer::start();
    let function = FunctionServer::start(|_, _| Reply::ok()).await;
    // Room for about four of these events, not ten.
    let text = config(&nats, &function, "").replace(
        "duplicate_window = \"1m\"",
        "duplicate_window = \"1m\", max_bytes = 3000",
    );
    let switchyard = Switchyard::start(text).await;
    let client = reqwest::Client::new();
    let post = |body: String| {
        client
            .post(switchyard.url("/v1/events"))
            .header("content-type", "application/cloudevents-batch+json")
            .body(body)
            .send()
    };
    let ten: Vec<String> = (0..10).map(|index| format!("big-{index}")).collect();
    let ten: Vec<&str> = ten.iter().map(String::as_str).collect();
    let response = post(batch_body(&ten, &"x".repeat(400))).await.unwrap();
    assert_eq!(response.status(), 503, "{}", response.text().await.unwrap());
    let bus = switchyard.bus().await;
    let mut stream = bus
        .jetstream()
        .get_stream(bus.events_stream())
        .await
        .unwrap();
    assert_eq!(
        stream.info().await.unwrap().state.messages,
        0,
        "no part of the refused batch was stored"
    );

    let accepted = |response: reqwest::Response| async move {
        assert_eq!(response.status(), 202);
        let answer: serde_json::Value =
            serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        answer["accepted"]
            .as_array()
            .unwrap()
            .iter()
            .map(|entry| {
                (
                    entry["id"].as_str().unwrap().to_owned(),
                    entry["duplicate"].as_bool().unwrap(),
                )
            })
            .collect::<Vec<_>>()
    };
    let first = accepted(post(batch_body(&["a", "b"], "1")).await.unwrap()).await;
    assert_eq!(first, [("a".to_owned(), false), ("b".to_owned(), false)]);
    let resend = accepted(post(batch_body(&["a", "b", "c"], "1")).await.unwrap()).await;
    assert_eq!(
        resend,
        [
            ("a".to_owned(), true),
            ("b".to_owned(), true),
            ("c".to_owned(), false)
        ]
    );
    let twice = accepted(post(batch_body(&["d", "d"], "1")).await.unwrap()).await;
    assert_eq!(twice, [("d".to_owned(), false), ("d".to_owned(), true)]);
    let received = function.wait_for(4, WAIT).await;
    let mut ids: Vec<_> = received.iter().map(|call| call.id().to_owned()).collect();
    ids.sort();
    assert_eq!(ids, ["a", "b", "c", "d"]);
    assert_eq!(stream.info().await.unwrap().state.messages, 4);
    switchyard.stop().await;
}
