//! The `switchyard` commands operators use, run as processes: `send`, `dlq list`,
//! `dlq show`, `dlq replay`, `dlq purge`; and `/metrics` of a running process.

mod common;

use std::time::{Duration, Instant};

use common::{FunctionServer, NatsServer, Reply, Switchyard, base_config};

const WAIT: Duration = Duration::from_secs(20);

use common::run_cli as switchyard;

#[tokio::test]
async fn send_and_dead_letter_commands_work_against_a_live_bus() {
    let nats = NatsServer::start();
    let function = FunctionServer::start(|received, _| {
        if received.header("ce-type") == Some("com.example.poison") {
            Reply::status(422)
        } else {
            Reply::ok()
        }
    })
    .await;
    let mut text = base_config(&nats.url(), 0, 0);
    text.push_str(&format!(
        "\n[[functions]]\ntype = \"http\"\nname = \"fn\"\nurl = \"{}\"\n\n[[triggers]]\nname = \"main\"\nfunction = \"fn\"\n",
        function.url
    ));
    let directory = tempfile::tempdir().unwrap();
    let config = directory.path().join("switchyard.toml");
    std::fs::write(&config, &text).unwrap();
    let running = Switchyard::start(text).await;

    let (ok, output) = switchyard(
        &config,
        &[
            "send",
            "--type",
            "com.example.test",
            "--id",
            "cli-1",
            "--data",
            "{\"n\":1}",
        ],
    );
    assert!(ok, "{output}");
    assert!(output.contains("published event cli-1"), "{output}");
    let (ok, output) = switchyard(
        &config,
        &["send", "--type", "com.example.test", "--data", "not json"],
    );
    assert!(
        !ok && output.contains("--data is not valid JSON"),
        "{output}"
    );
    let (ok, output) = switchyard(
        &config,
        &["send", "--type", "com.example.test", "--id", "cli-1"],
    );
    assert!(
        ok && output.contains("duplicate"),
        "the same id again is reported as a duplicate: {output}"
    );
    let received = function.wait_for(1, WAIT).await;
    assert_eq!(received[0].id(), "cli-1");
    assert_eq!(&received[0].body[..], b"{\"n\":1}");

    for id in ["bad-1", "bad-2"] {
        let (ok, output) = switchyard(
            &config,
            &[
                "send",
                "--type",
                "com.example.poison",
                "--id",
                id,
                "--data",
                "poison",
                "--content-type",
                "text/plain",
            ],
        );
        assert!(ok, "{output}");
    }
    let deadline = Instant::now() + WAIT;
    let listing = loop {
        let (ok, output) = switchyard(&config, &["dlq", "list", "--trigger", "main", "--json"]);
        assert!(ok, "{output}");
        if output.lines().count() == 2 {
            break output;
        }
        assert!(
            Instant::now() < deadline,
            "dead letters did not appear: {output}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let entries: Vec<serde_json::Value> = listing
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert!(
        entries
            .iter()
            .all(|entry| entry["reason"] == "rejected" && entry["last_status"] == 422)
    );
    let first = entries
        .iter()
        .find(|entry| entry["event"]["id"] == "bad-1")
        .unwrap();
    let sequence = first["sequence"].as_u64().unwrap().to_string();

    let (ok, output) = switchyard(&config, &["dlq", "list", "--trigger", "main"]);
    assert!(
        ok && output.contains("2 dead letters for trigger `main`")
            && output.contains("function answered 422"),
        "{output}"
    );
    let (ok, output) = switchyard(&config, &["dlq", "show", "--trigger", "main", &sequence]);
    assert!(ok, "{output}");
    let shown: serde_json::Value = serde_json::from_str(&output).unwrap();
    assert_eq!(shown["event"]["id"], "bad-1");
    assert_eq!(shown["event"]["data"], "poison");
    assert_eq!(shown["attempts"], 1);

    function.set_behaviour(|_, _| Reply::ok());
    let (ok, output) = switchyard(&config, &["dlq", "replay", "--trigger", "main", &sequence]);
    assert!(ok && output.contains("replayed 1 dead letters"), "{output}");
    let deadline = Instant::now() + WAIT;
    while function
        .received()
        .iter()
        .filter(|call| call.id() == "bad-1")
        .count()
        < 1
    {
        assert!(Instant::now() < deadline, "the replay was not delivered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, output) = switchyard(&config, &["dlq", "list", "--trigger", "main", "--json"]);
    let replayed: Vec<serde_json::Value> = output
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let record = replayed
        .iter()
        .find(|entry| entry["event"]["id"] == "bad-1")
        .unwrap();
    assert_eq!(record["replays"]["count"], 1);

    let (ok, output) = switchyard(&config, &["dlq", "purge", "--trigger", "main", "--all"]);
    assert!(ok && output.contains("purged 2 dead letters"), "{output}");
    let (ok, output) = switchyard(&config, &["dlq", "list", "--trigger", "main", "--json"]);
    assert!(ok && output.trim().is_empty(), "{output}");
    let (ok, output) = switchyard(&config, &["dlq", "show", "--trigger", "main", &sequence]);
    assert!(
        !ok && output.contains(&format!("no dead letter with sequence {sequence}")),
        "{output}"
    );

    // The running process counted all of it (the function answers before the
    // dispatcher counts, so give it a moment).
    let expected = [
        "switchyard_dispatch_succeeded_total{trigger=\"main\",function=\"fn\"} 2",
        "switchyard_dispatch_rejected_total{trigger=\"main\",function=\"fn\"} 2",
        "switchyard_events_dead_lettered_total{trigger=\"main\",function=\"fn\",reason=\"rejected\"} 2",
        "switchyard_invocation_duration_seconds_count{trigger=\"main\",function=\"fn\"} 4",
        "switchyard_events_in_flight{trigger=\"main\",function=\"fn\"} 0",
    ];
    let deadline = Instant::now() + WAIT;
    loop {
        let metrics = reqwest::get(format!("http://{}/metrics", running.admin))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let missing: Vec<_> = expected
            .iter()
            .filter(|line| !metrics.contains(**line))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "missing {missing:?} in\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    running.stop().await;
}

#[tokio::test]
async fn a_function_that_times_out_is_retried_then_dead_lettered() {
    let nats = NatsServer::start();
    let function = FunctionServer::start(|_, _| Reply::ok().after(Duration::from_secs(5))).await;
    let mut text = base_config(&nats.url(), 0, 0);
    text.push_str(&format!(
        "\n[[functions]]\ntype = \"http\"\nname = \"fn\"\nurl = \"{}\"\n\n[[triggers]]\nname = \"main\"\nfunction = \"fn\"\ntimeout = \"200ms\"\nretry = {{ policy = \"fixed\", initial = \"50ms\", attempts = 2 }}\n",
        function.url
    ));
    let running = Switchyard::start(text).await;
    common::post_event(&running.url("/v1/events"), "slow-1", "t", "x").await;
    let bus = running.bus().await;
    let dead = common::wait_for_dead_letters(&bus, "main", 1, WAIT).await;
    let dead_letter = &dead[0].dead_letter;
    assert_eq!(dead_letter.reason, "attempts_exhausted");
    assert_eq!(dead_letter.attempts, 2);
    assert_eq!(dead_letter.last_status, None);
    assert!(
        dead_letter.last_error.contains("timed out after 200ms"),
        "{}",
        dead_letter.last_error
    );
    assert_eq!(function.calls_for("slow-1"), 2);
    running.stop().await;
}

/// `dlq replay` does what it says: a source's dead letters (inputs that could not be
/// stored) go back through the events stream to the triggers that match them; a
/// trigger no longer in the configuration is refused by name; a dead letter that is
/// not a CloudEvent is listed and shown, and refused for replay.
#[tokio::test]
async fn replay_of_source_dead_letters_removed_triggers_and_malformed_ones() {
    let nats = NatsServer::start();
    let function = FunctionServer::start(|_, _| Reply::ok()).await;
    let mut text = base_config(&nats.url(), 0, 0);
    text.push_str(&format!(
        "\n[[functions]]\ntype = \"http\"\nname = \"fn\"\nurl = \"{}\"\n\n[[triggers]]\nname = \"main\"\nfunction = \"fn\"\n",
        function.url
    ));
    let directory = tempfile::tempdir().unwrap();
    let config = directory.path().join("switchyard.toml");
    std::fs::write(&config, &text).unwrap();
    let running = Switchyard::start(text).await;
    let bus = running.bus().await;

    // What a source does with an input it could not store.
    let mut record =
        switchyard_event::Event::new("rec-1", "kafka://main/orders", "com.example.order");
    record.data = bytes::Bytes::from_static(b"{\"order\":1}");
    bus.dead_letter_input("orders", record, "rejected", "the stream refused it")
        .await
        .unwrap();
    let (ok, output) = switchyard(&config, &["dlq", "list", "--trigger", "source:orders"]);
    assert!(ok && output.contains("rec-1"), "{output}");
    let (ok, output) = switchyard(
        &config,
        &["dlq", "replay", "--trigger", "source:orders", "--all"],
    );
    assert!(ok && output.contains("replayed 1 dead letters"), "{output}");
    let received = function.wait_for(1, WAIT).await;
    assert_eq!(received[0].id(), "rec-1");
    assert_eq!(&received[0].body[..], b"{\"order\":1}");

    // A trigger that was removed from the configuration.
    let gone = switchyard_bus::DeadLetter {
        event: switchyard_event::Event::new("old-1", "/tests", "t"),
        reason: "rejected".to_owned(),
        trigger: "gone".to_owned(),
        function: "fn".to_owned(),
        attempts: 1,
        last_status: Some(400),
        last_error: "no".to_owned(),
        first_attempt_at: None,
        last_attempt_at: "2026-01-01T00:00:00Z".to_owned(),
        received_at: "2026-01-01T00:00:00Z".to_owned(),
        event_sequence: 1,
    };
    let (headers, payload) = gone.to_message();
    bus.store(bus.subjects().dead_letter("gone"), headers, payload)
        .await
        .unwrap();
    let (ok, output) = switchyard(&config, &["dlq", "list", "--trigger", "gone"]);
    assert!(ok && output.contains("old-1"), "{output}");
    let (ok, output) = switchyard(&config, &["dlq", "replay", "--trigger", "gone", "--all"]);
    assert!(
        !ok && output.contains("trigger `gone` is not in"),
        "{output}"
    );

    // A malformed dead letter: listed, shown, not replayed.
    let mut headers = switchyard_bus::async_nats::HeaderMap::new();
    headers.insert("Switchyard-Dlq-Reason", "malformed");
    headers.insert("Switchyard-Dlq-Trigger", "main");
    headers.insert("X-Original", "kept");
    bus.store(
        bus.subjects().dead_letter("main"),
        headers,
        bytes::Bytes::from_static(b"not an event"),
    )
    .await
    .unwrap();
    let (ok, output) = switchyard(&config, &["dlq", "list", "--trigger", "main", "--json"]);
    assert!(ok, "{output}");
    let entry: serde_json::Value = serde_json::from_str(output.lines().next().unwrap()).unwrap();
    assert_eq!(entry["reason"], "malformed");
    assert_eq!(entry["event"]["data"], "not an event");
    assert!(
        entry["malformed_headers"]
            .to_string()
            .contains("X-Original"),
        "{entry}"
    );
    let sequence = entry["sequence"].as_u64().unwrap().to_string();
    let (ok, output) = switchyard(&config, &["dlq", "show", "--trigger", "main", &sequence]);
    assert!(ok && output.contains("not an event"), "{output}");
    let (ok, output) = switchyard(&config, &["dlq", "replay", "--trigger", "main", &sequence]);
    assert!(!ok && output.contains("is not a CloudEvent"), "{output}");
    running.stop().await;
}
