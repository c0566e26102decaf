//! Batched triggers against a real nats-server: events arrive as one JSON array per
//! invocation; a partial failure (`batchItemFailures`) retries only the failed events,
//! an error without one retries the whole batch.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    FunctionServer, NatsServer, Received, Reply, Switchyard, WAIT, base_config, post_event,
    wait_for_dead_letters,
};

fn batched(function: &FunctionServer) -> String {
    format!(
        r#"
[[functions]]
type = "http"
name = "fn"
url = "{}"

[[triggers]]
name = "batched"
function = "fn"
max_concurrency = 2
batch = {{ max_events = 10, window = "500ms" }}
retry = {{ policy = "fixed", initial = "100ms", attempts = 3 }}
"#,
        function.url
    )
}

/// The event ids of one batch invocation.
fn ids(call: &Received) -> Vec<String> {
    assert_eq!(
        call.header("content-type"),
        Some("application/cloudevents-batch+json")
    );
    let events: Vec<serde_json::Value> = serde_json::from_slice(&call.body).unwrap();
    events
        .iter()
        .map(|event| event["id"].as_str().unwrap().to_owned())
        .collect()
}

/// How often each id was part of an invocation.
fn attempts(function: &FunctionServer) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for call in function.received() {
        for id in ids(&call) {
            *counts.entry(id).or_insert(0) += 1;
        }
    }
    counts
}

async fn wait_attempts(
    function: &FunctionServer,
    done: impl Fn(&HashMap<String, usize>) -> bool,
) -> HashMap<String, usize> {
    let deadline = Instant::now() + WAIT;
    loop {
        let counts = attempts(function);
        if done(&counts) {
            return counts;
        }
        assert!(Instant::now() < deadline, "batches incomplete: {counts:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_partial_failure_retries_only_the_failed_events() {
    let nats = NatsServer::start();
    // e3 and e7 fail on their first attempt; e5 always fails.
    let seen: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let function = FunctionServer::start({
        let seen = seen.clone();
        move |received, _| {
            let mut seen = seen.lock().unwrap();
            let mut failed = Vec::new();
            for id in ids(received) {
                let count = seen.entry(id.clone()).or_insert(0);
                *count += 1;
                if id == "e5" || ((id == "e3" || id == "e7") && *count == 1) {
                    failed.push(format!("{{\"itemIdentifier\":\"{id}\"}}"));
                }
            }
            let body = format!("{{\"batchItemFailures\":[{}]}}", failed.join(","));
            Reply::ok().with_body(body)
        }
    })
    .await;
    let mut text = base_config(&nats.url(), 0, 0);
    text.push_str(&batched(&function));
    let switchyard = Switchyard::start(text).await;
    for number in 0..10 {
        let response = post_event(
            &switchyard.url("/v1/events"),
            &format!("e{number}"),
            "com.example.item",
            "x",
        )
        .await;
        assert_eq!(response.status(), 202);
    }

    let bus = switchyard.bus().await;
    let dead = wait_for_dead_letters(&bus, "batched", 1, WAIT).await;
    assert_eq!(dead[0].dead_letter.event.id, "e5");
    assert_eq!(dead[0].dead_letter.attempts, 3);
    assert!(dead[0].dead_letter.last_error.contains("batchItemFailures"));
    let counts = wait_attempts(&function, |counts| counts.len() == 10).await;
    for (id, count) in &counts {
        let expected = match id.as_str() {
            "e5" => 3,
            "e3" | "e7" => 2,
            _ => 1,
        };
        assert_eq!(
            *count, expected,
            "{id} was in {count} invocations: {counts:?}"
        );
    }
    // The ten events went out in few invocations, not one each.
    let first_round = function.received().len() - 3;
    assert!(
        first_round <= 3,
        "{first_round} invocations for the first 10 events"
    );
    assert_eq!(
        switchyard::dlq::list(&bus, "batched").await.unwrap().len(),
        1
    );
    switchyard.stop().await;
}

#[tokio::test]
async fn an_error_without_failures_retries_the_whole_batch() {
    let nats = NatsServer::start();
    let calls = Arc::new(Mutex::new(0));
    let function = FunctionServer::start({
        let calls = calls.clone();
        move |_, _| {
            let mut calls = calls.lock().unwrap();
            *calls += 1;
            if *calls == 1 {
                Reply::status(500)
            } else {
                Reply::ok()
            }
        }
    })
    .await;
    let mut text = base_config(&nats.url(), 0, 0);
    text.push_str(&batched(&function).replace("max_concurrency = 2", "max_concurrency = 1"));
    let switchyard = Switchyard::start(text).await;
    for number in 0..4 {
        post_event(
            &switchyard.url("/v1/events"),
            &format!("w{number}"),
            "com.example.item",
            "x",
        )
        .await;
    }
    let counts = wait_attempts(&function, |counts| {
        let received = function.received();
        !received.is_empty() && counts.values().sum::<usize>() >= 4 + ids(&received[0]).len()
    })
    .await;
    let first = ids(&function.received()[0]);
    for id in &first {
        assert_eq!(
            counts[id], 2,
            "{id}: the failed batch's events are each retried once: {counts:?}"
        );
    }
    for (id, count) in &counts {
        if !first.contains(id) {
            assert_eq!(*count, 1, "{id} was not in the failed batch: {counts:?}");
        }
    }
    switchyard.stop().await;
}

/// Lambda's rules for a 2xx answer: one that is not JSON, or names a failure with a
/// misspelt key, a null or an unknown `itemIdentifier`, fails the WHOLE batch (every
/// event comes back), never acknowledges it.
#[tokio::test]
async fn a_malformed_success_answer_fails_the_whole_batch() {
    let nats = NatsServer::start();
    let bad_answers = [
        "OK",
        r#"{"batchItemFailures":[{"itemIdentifer":"m0"}]}"#,
        r#"{"batchItemFailures":[{"itemIdentifier":null}]}"#,
        r#"{"batchItemFailures":[{"itemIdentifier":"not-in-the-batch"}]}"#,
    ];
    let calls = Arc::new(Mutex::new(0usize));
    let function = FunctionServer::start({
        move |_, _| {
            let mut calls = calls.lock().unwrap();
            *calls += 1;
            match bad_answers.get(*calls - 1) {
                Some(answer) => Reply::ok().with_body(*answer),
                None => Reply::ok().with_body("{}"),
            }
        }
    })
    .await;
    let mut text = base_config(&nats.url(), 0, 0);
    text.push_str(
        &batched(&function)
            .replace("max_concurrency = 2", "max_concurrency = 1")
            .replace("attempts = 3", "attempts = 10"),
    );
    let switchyard = Switchyard::start(text).await;
    for number in 0..3 {
        post_event(
            &switchyard.url("/v1/events"),
            &format!("m{number}"),
            "com.example.item",
            "x",
        )
        .await;
    }
    // Each bad answer sends every event it held back; an event ends when a `{}`
    // answers a batch it is in. Without Lambda's rules the bad answers acknowledge
    // their events and the counts never reach `failed + 1`.
    let held_by_bad_answers = || {
        let mut held = HashMap::new();
        for call in function.received().iter().take(bad_answers.len()) {
            for id in ids(call) {
                *held.entry(id).or_insert(0usize) += 1;
            }
        }
        held
    };
    let counts = wait_attempts(&function, |counts| {
        let held = held_by_bad_answers();
        function.received().len() > bad_answers.len()
            && counts.len() == 3
            && counts
                .iter()
                .all(|(id, count)| *count == held.get(id).copied().unwrap_or(0) + 1)
    })
    .await;
    // Four refused batches, each with at least one event that came back.
    assert!(
        counts.values().sum::<usize>() >= 3 + bad_answers.len(),
        "{counts:?}"
    );
    let bus = switchyard.bus().await;
    assert!(
        switchyard::dlq::list(&bus, "batched")
            .await
            .unwrap()
            .is_empty()
    );
    switchyard.stop().await;
}
