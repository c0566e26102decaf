//! Schedules (`type = "schedule"`) against a real nats-server: every scheduled time
//! fires once across the processes of a cluster while they are killed and restarted,
//! times missed while the whole cluster was down fire after it returns (`catch_up =
//! "all"`), a Lambda handler reads a firing with Powertools' EventBridge parser, and
//! `switchyard schedules` / `GET /v1/schedules` list the next times.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::{NatsServer, Process, installed, random_name, run_cli};
use nix::sys::signal::Signal;
use switchyard_bus::async_nats;

const WAIT: Duration = Duration::from_secs(60);
const ADMIN_TOKEN: &str = "schedules-test-admin-token";

fn config(nats: &NatsServer, prefix: &str, schedule: &str, extra: &str) -> String {
    let upper = prefix.to_uppercase();
    format!(
        r#"[nats]
url = "{nats}"
subject_prefix = "{prefix}"
events_stream = {{ name = "{upper}_EVENTS", storage = "memory" }}
dead_letter_stream = {{ name = "{upper}_DLQ", storage = "memory" }}

[admin]
listen = "127.0.0.1:0"
bearer_token = "{ADMIN_TOKEN}"

[log]
level = "${{SWITCHYARD_TEST_LOG:-warn}}"

[[sources]]
type = "schedule"
name = "tick"
{schedule}
{extra}"#,
        nats = nats.url(),
    )
}

/// Every firing of schedule `tick` the events stream holds: scheduled time -> how
/// many times it is stored.
async fn stored_firings(nats: &NatsServer, prefix: &str) -> BTreeMap<DateTime<Utc>, usize> {
    let client = async_nats::connect(nats.url()).await.unwrap();
    let jetstream = async_nats::jetstream::new(client);
    let mut stream = jetstream
        .get_stream(format!("{}_EVENTS", prefix.to_uppercase()))
        .await
        .unwrap();
    let info = stream.info().await.unwrap().state.clone();
    let mut firings = BTreeMap::new();
    for sequence in info.first_sequence..=info.last_sequence {
        let Ok(message) = stream.get_raw_message(sequence).await else {
            continue;
        };
        let header = |name: &str| {
            message
                .headers
                .get(name)
                .map(|value| value.as_str().to_owned())
        };
        if header("ce-source").as_deref() != Some("/schedules/tick") {
            continue;
        }
        let id = header("ce-id").unwrap();
        let time = DateTime::parse_from_rfc3339(&id)
            .unwrap()
            .with_timezone(&Utc);
        *firings.entry(time).or_insert(0) += 1;
    }
    firings
}

/// Waits until the stream holds a firing at or after `time`.
async fn wait_fired_through(nats: &NatsServer, prefix: &str, time: DateTime<Utc>) {
    let deadline = Instant::now() + WAIT;
    loop {
        let firings = stored_firings(nats, prefix).await;
        if firings.keys().next_back().is_some_and(|last| *last >= time) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no firing at or after {time}; last {:?}",
            firings.keys().next_back()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `rate(1 second)` with three processes; one is killed (SIGKILL) and restarted
/// twice, then all three are killed together and stay down longer than a time counts
/// as late, and one comes back: every second from the first firing to the last is
/// stored exactly once, the seconds of the outage included (`catch_up = "all"`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_second_fires_once_across_three_processes_killed_and_restarted() {
    let nats = NatsServer::start();
    let prefix = random_name("sch");
    let directory = tempfile::tempdir().unwrap();
    let file = directory.path().join("switchyard.toml");
    // A short duplicate window (the stream's default is 2 minutes, longer than the
    // test): a second fired again more than 3 s later would be stored twice, so only
    // the schedule's own bookkeeping (the KV bucket) keeps it once.
    let text = config(
        &nats,
        &prefix,
        "expression = \"rate(1 second)\"\ncatch_up = \"all\"",
        "",
    )
    .replacen(
        "storage = \"memory\" }",
        "storage = \"memory\", duplicate_window = \"3s\" }",
        1,
    );
    assert!(text.contains("duplicate_window = \"3s\""));
    std::fs::write(&file, text).unwrap();
    let mut processes: Vec<Process> = (0..3).map(|_| Process::start(&file, &[])).collect();
    for process in &processes {
        process.wait_ready().await;
    }
    let started = Utc::now();
    // The second process is killed twice, each time once a few more seconds fired,
    // and started again.
    for seconds in [4, 8] {
        wait_fired_through(&nats, &prefix, started + chrono::Duration::seconds(seconds)).await;
        processes[1].signal(Signal::SIGKILL);
        let _ = processes[1].wait_exit().await;
        processes[1] = Process::start(&file, &[]);
        processes[1].wait_ready().await;
    }
    wait_fired_through(&nats, &prefix, started + chrono::Duration::seconds(12)).await;
    // The whole cluster down, longer than MISSED_AFTER (10 s): what was due meanwhile
    // is missed, and catch_up = "all" fires it when a process returns. The pause
    // makes the outage; nothing waits on it.
    for process in &mut processes {
        process.signal(Signal::SIGKILL);
        let _ = process.wait_exit().await;
    }
    let down_at = Utc::now();
    tokio::time::sleep(Duration::from_secs(12)).await;
    let back = Process::start(&file, &[]);
    back.wait_ready().await;
    let back_at = Utc::now();
    wait_fired_through(&nats, &prefix, back_at + chrono::Duration::seconds(2)).await;
    drop(back);

    let firings = stored_firings(&nats, &prefix).await;
    let first = *firings.keys().next().unwrap();
    let last = *firings.keys().next_back().unwrap();
    let mut missing = Vec::new();
    let mut time = first;
    while time <= last {
        if !firings.contains_key(&time) {
            missing.push(time);
        }
        time += chrono::Duration::seconds(1);
    }
    assert!(missing.is_empty(), "seconds never fired: {missing:?}");
    let twice: Vec<_> = firings.iter().filter(|(_, count)| **count > 1).collect();
    assert!(twice.is_empty(), "seconds fired more than once: {twice:?}");
    assert!(
        first <= started + chrono::Duration::seconds(1),
        "the first firing {first} came long after the start {started}"
    );
    // The outage's seconds were fired by the process that came back.
    assert!(
        firings
            .keys()
            .any(|time| *time > down_at + chrono::Duration::seconds(2)
                && *time < back_at - chrono::Duration::seconds(2)),
        "nothing fired for the outage {down_at}..{back_at}"
    );
}

/// A firing reaches a Lambda handler as EventBridge's "Scheduled Event" (read with
/// Powertools' EventBridgeEvent), its `input` as the detail; `/v1/schedules` and
/// `switchyard schedules` show what fired and what fires next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_firing_reaches_a_lambda_handler_as_eventbridges_scheduled_event() {
    let nats = NatsServer::start();
    let prefix = random_name("sch");
    let directory = tempfile::tempdir().unwrap();
    let seen = directory.path().join("seen.jsonl");
    let function = format!(
        r#"
[[functions]]
type = "lambda"
name = "shapes"
command = ["{python}", "-m", "awslambdaric", "shapes.scheduled"]
handler = "shapes.scheduled"
directory = "{handlers}"
timeout = "20s"
environment = {{ SEEN_FILE = "{seen}" }}

[[triggers]]
name = "on-tick"
function = "shapes"
payload = "aws"
"#,
        python = installed("SWITCHYARD_LAMBDA_PYTHON"),
        handlers = common::test_functions().join("python").display(),
        seen = seen.display(),
    );
    let file = directory.path().join("switchyard.toml");
    std::fs::write(
        &file,
        config(
            &nats,
            &prefix,
            "expression = \"rate(1 second)\"\ninput = { job = \"cleanup\", keep = 3 }",
            &function,
        ),
    )
    .unwrap();
    let process = Process::start(&file, &[]);
    process.wait_ready().await;
    let lines = seen_lines(&seen, 2).await;
    for line in &lines {
        assert_eq!(line["detail_type"], "Scheduled Event", "{line}");
        assert_eq!(line["source"], "aws.events", "{line}");
        assert_eq!(line["version"], "0", "{line}");
        assert_eq!(line["account"], "000000000000", "{line}");
        assert_eq!(
            line["resources"],
            serde_json::json!(["arn:aws:events:us-east-1:000000000000:rule/tick"]),
            "{line}"
        );
        assert_eq!(
            line["detail"],
            serde_json::json!({"job": "cleanup", "keep": 3}),
            "{line}"
        );
        let time = line["time"].as_str().unwrap();
        assert!(
            DateTime::parse_from_rfc3339(time).is_ok() && time.ends_with('Z'),
            "{line}"
        );
        assert_eq!(line["id"].as_str().unwrap().len(), 36, "a UUID: {line}");
    }
    assert_ne!(lines[0]["time"], lines[1]["time"]);

    // What fired and what comes next, from the running process and from the CLI.
    let body = reqwest::Client::new()
        .get(format!("http://{}/v1/schedules", process.admin()))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let tick = &status["schedules"][0];
    assert_eq!(tick["name"], "tick", "{status}");
    assert_eq!(tick["expression"], "rate(1 second)", "{status}");
    let fired_through = DateTime::parse_from_rfc3339(tick["fired_through"].as_str().unwrap())
        .unwrap()
        .with_timezone(&Utc);
    let next: Vec<DateTime<Utc>> = tick["next"]
        .as_array()
        .unwrap()
        .iter()
        .map(|time| {
            DateTime::parse_from_rfc3339(time.as_str().unwrap())
                .unwrap()
                .with_timezone(&Utc)
        })
        .collect();
    assert_eq!(next.len(), 5, "{status}");
    assert!(next[0] > fired_through, "{status}");
    assert_eq!(next[1] - next[0], chrono::Duration::seconds(1), "{status}");
    let (ok, output) = run_cli(&file, &["schedules"]);
    assert!(ok, "{output}");
    assert!(
        output.contains("tick") && output.contains("rate(1 second)"),
        "{output}"
    );
}

/// The lines the handler wrote, once there are at least `count`.
async fn seen_lines(seen: &Path, count: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(seen)
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        if lines.len() >= count {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "the handler saw {} firings, expected {count}",
            lines.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
