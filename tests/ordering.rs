//! Ordered triggers (`ordering = "key"`) against a real nats-server: per-key order
//! under retries, a poison key dead-lettered without stalling the other keys, and the
//! order kept when several dispatcher processes share the trigger and one dies.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{
    FunctionServer, NatsServer, Process, Received, Reply, Switchyard, WAIT, base_config,
    binary_event, wait_for_dead_letters, write_config,
};
use nix::sys::signal::Signal;

const KEYS: usize = 6;
const PER_KEY: usize = 15;

fn ordered_trigger(function: &FunctionServer, partitions: u32) -> String {
    format!(
        r#"
[[functions]]
type = "http"
name = "fn"
url = "{}"
max_concurrency = 16

[[triggers]]
name = "ordered"
function = "fn"
ordering = "key"
partitions = {partitions}
max_concurrency = 8
ack_wait = "2s"
retry = {{ policy = "fixed", initial = "100ms", attempts = 3 }}
"#,
        function.url
    )
}

/// Key and sequence number of a call: ids are `<key>-<n>`.
fn key_and_number(call: &Received) -> (String, usize) {
    let id = call.id();
    let (key, number) = id.rsplit_once('-').unwrap();
    (key.to_owned(), number.parse().unwrap())
}

/// Posts `<key>-<n>` for n in `numbers` and every key, interleaved, each stored
/// before the next is sent, so the stream holds them in this order.
async fn post_keyed(url: &str, keys: &[String], numbers: std::ops::Range<usize>) {
    let client = reqwest::Client::new();
    for number in numbers {
        for key in keys {
            let response = binary_event(
                &client,
                url,
                &format!("{key}-{number}"),
                "com.example.step",
                "x",
            )
            .header("ce-partitionkey", key.as_str())
            .send()
            .await
            .unwrap();
            assert_eq!(response.status(), 202);
        }
    }
}

/// Checks that each key's calls came in order: a number is called again only while it
/// is retried (or redelivered), and never after a later one.
fn assert_in_order(calls: &[Received]) -> HashMap<String, Vec<usize>> {
    let mut by_key: HashMap<String, Vec<usize>> = HashMap::new();
    for call in calls {
        let (key, number) = key_and_number(call);
        by_key.entry(key).or_default().push(number);
    }
    for (key, numbers) in &by_key {
        assert!(
            numbers.windows(2).all(|pair| pair[0] <= pair[1]),
            "key {key} was called out of order: {numbers:?}"
        );
    }
    by_key
}

#[tokio::test]
async fn order_by_key_holds_under_retries_and_a_poison_key_does_not_stall_the_others() {
    let nats = NatsServer::start();
    // Every third event fails on its first attempt; the poison key always fails and
    // asks for a second between attempts, so it retries for a while.
    let function = FunctionServer::start(|received, call| {
        let (key, number) = key_and_number(received);
        if key == "poison" {
            Reply::status(500).with_header("retry-after", "1")
        } else if number % 3 == 0 && call == 1 {
            Reply::status(500)
        } else {
            Reply::ok().after(Duration::from_millis(5))
        }
    })
    .await;
    let mut text = base_config(&nats.url(), 0, 0);
    text.push_str(&ordered_trigger(&function, 4));
    let switchyard = Switchyard::start(text).await;
    let url = switchyard.url("/v1/events");

    post_keyed(&url, &["poison".to_owned()], 0..3).await;
    let keys: Vec<String> = (0..KEYS).map(|key| format!("k{key}")).collect();
    post_keyed(&url, &keys, 0..PER_KEY).await;

    // Every other key is done while the poison key is still being retried.
    let deadline = Instant::now() + WAIT;
    while function
        .received()
        .iter()
        .filter(|call| !call.id().starts_with("poison"))
        .count()
        < KEYS * PER_KEY + KEYS * PER_KEY.div_ceil(3)
    {
        assert!(Instant::now() < deadline, "the other keys stalled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let bus = switchyard.bus().await;
    let dead_before = switchyard::dlq::list(&bus, "ordered").await.unwrap().len();
    assert!(
        dead_before < 3,
        "the other keys finished only after the poison key was dead-lettered"
    );

    // The poison key's events end in the dead letters, in order, each after 3 attempts.
    let dead = wait_for_dead_letters(&bus, "ordered", 3, WAIT).await;
    let dead_ids: Vec<&str> = dead
        .iter()
        .map(|entry| entry.dead_letter.event.id.as_str())
        .collect();
    assert_eq!(dead_ids, ["poison-0", "poison-1", "poison-2"]);
    assert!(dead.iter().all(|entry| entry.dead_letter.attempts == 3));

    let calls = function.received();
    let by_key = assert_in_order(&calls);
    assert_eq!(by_key["poison"], [0, 0, 0, 1, 1, 1, 2, 2, 2]);
    for key in &keys {
        let expected: Vec<usize> = (0..PER_KEY)
            .flat_map(|number| {
                if number % 3 == 0 {
                    vec![number, number]
                } else {
                    vec![number]
                }
            })
            .collect();
        assert_eq!(by_key[key], expected, "key {key}");
    }
    // Different keys did run in parallel.
    assert!(function.peak() > 1, "keys never overlapped");
    switchyard.stop().await;
}

#[tokio::test]
async fn two_processes_share_the_key_partitions_and_keep_the_order_when_one_dies() {
    let nats = NatsServer::start();
    let function = FunctionServer::start(|_, _| Reply::ok().after(Duration::from_millis(20))).await;
    let directory = tempfile::tempdir().unwrap();
    let mut text = base_config(&nats.url(), 0, 0);
    // 16 partitions over two members: all on one by chance is 2 in 65,536.
    text.push_str(&ordered_trigger(&function, 16));
    let path = write_config(directory.path(), &text);
    let (mut a, b) = (Process::start(&path, &[]), Process::start(&path, &[]));
    a.wait_ready().await;
    b.wait_ready().await;
    let keys: Vec<String> = (0..16).map(|key| format!("key{key}")).collect();
    let url_b = b.url("/v1/events");

    // The partitions spread once both processes see each other (one heartbeat a
    // second): post rounds until both have delivered some.
    let deadline = Instant::now() + WAIT;
    let mut posted = 0;
    loop {
        post_keyed(&url_b, &keys, posted..posted + 5).await;
        posted += 5;
        while function.received().len() < 16 * posted {
            assert!(
                Instant::now() < deadline,
                "{} of {} delivered",
                function.received().len(),
                16 * posted
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let dispatched_a = a.metric("switchyard_events_dispatched_total").await;
        let dispatched_b = b.metric("switchyard_events_dispatched_total").await;
        if dispatched_a > 0 && dispatched_b > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the partitions never spread over both processes (a {dispatched_a}, b {dispatched_b})"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // A dies mid-stream; B takes its partitions and keeps every key in order.
    let posting = tokio::spawn({
        let (url, keys) = (url_b.clone(), keys.clone());
        async move { post_keyed(&url, &keys, posted..posted + 20).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.signal(Signal::SIGKILL);
    assert!(!a.wait_exit().await);
    posting.await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let calls = function.received();
        let by_key = assert_in_order(&calls);
        let complete = keys.iter().all(|key| {
            by_key.get(key).is_some_and(|numbers| {
                numbers.last() == Some(&(posted + 19)) && {
                    let mut distinct = numbers.clone();
                    distinct.dedup();
                    distinct == (0..posted + 20).collect::<Vec<_>>()
                }
            })
        });
        if complete {
            let repeats = calls.len() - 16 * (posted + 20);
            eprintln!(
                "after the kill: every key complete and in order; calls repeating an event: {repeats}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "keys incomplete after the takeover"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
