//! The SQS source against a real SQS-compatible server (ElasticMQ, started by the
//! testkit) and a real nats-server, with messages produced by boto3: messages become
//! events once and leave the queue, a FIFO queue's groups keep their order, a Lambda
//! handler reads Lambda's SQS event with Powertools (and its partial batch response
//! works), what cannot be stored is dead-lettered, and nothing is lost while
//! Switchyard is killed (SIGKILL) three times during 5,000 messages.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{FunctionServer, NatsServer, Process, Reply, installed, random_name};
use nix::sys::signal::Signal;
use switchyard_testkit::queues::SqsServer;

const WAIT: Duration = Duration::from_secs(90);

/// Runs tests/functions/sqs_client.py with boto3; returns its stdout lines.
fn sqs_client(server: &SqsServer, arguments: &[&str]) -> Vec<String> {
    let output = Command::new(installed("SWITCHYARD_AWS_PYTHON"))
        .arg(common::test_functions().join("sqs_client.py"))
        .arg(server.endpoint())
        .args(arguments)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "sqs_client.py {arguments:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

fn sqs_source(name: &str, url: &str) -> String {
    format!(
        r#"
[[sources]]
type = "sqs"
name = "{name}"
queue_url = "{url}"
access_key_id = "test"
secret_access_key = "test"
wait_time = "2s"
receivers = 2
"#
    )
}

/// Waits until the queue holds nothing (visible or in flight).
async fn wait_empty(server: &SqsServer, url: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let depth: usize = sqs_client(server, &["depth", url])[0].parse().unwrap();
        if depth == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{depth} messages left in {url}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn bus_of(file: &Path) -> switchyard_bus::Bus {
    let config = switchyard::config::load(file).unwrap();
    switchyard_bus::Bus::connect(&config.nats).await.unwrap()
}

/// Plain messages become events once and leave the queue; a FIFO queue's groups are
/// delivered in order by an ordered trigger; bodies marked as structured CloudEvents
/// that are not are dead-lettered under `source:<name>`, and leave the queue too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_become_events_once_fifo_groups_keep_order_and_bad_ones_are_dead_lettered() {
    let nats = NatsServer::start();
    let server = SqsServer::start();
    let plain = sqs_client(&server, &["create", &random_name("plain")])[0].clone();
    let fifo = sqs_client(&server, &["create", &random_name("ordered"), "--fifo"])[0].clone();
    let function = FunctionServer::start(|_, _| Reply::ok()).await;
    let ordered = FunctionServer::start(|_, _| Reply::ok()).await;
    let prefix = random_name("sqs");
    let directory = tempfile::tempdir().unwrap();
    let file = directory.path().join("switchyard.toml");
    // Plain messages have no partition key: the plain trigger takes what has none.
    let rest = format!(
        r#"{plain_source}{fifo_source}
[[functions]]
type = "http"
name = "f"
url = "{function}"

[[functions]]
type = "http"
name = "g"
url = "{ordered}"

[[triggers]]
name = "plain"
function = "f"
filter = {{ not = {{ partitionkey = {{ prefix = "g" }} }} }}

[[triggers]]
name = "groups"
function = "g"
ordering = "key"
max_concurrency = 4
filter = {{ partitionkey = {{ prefix = "g" }} }}
"#,
        plain_source = sqs_source("plain", &plain),
        fifo_source = sqs_source("fifo", &fifo),
        function = function.url,
        ordered = ordered.url,
    );
    std::fs::write(&file, common::queue_test_config(&nats, &prefix, &rest)).unwrap();
    let process = Process::start(&file, &[]);
    process.wait_ready().await;

    sqs_client(&server, &["send", &plain, "250", "--prefix", "p"]);
    sqs_client(
        &server,
        &["send", &fifo, "60", "--prefix", "o", "--groups", "3"],
    );
    sqs_client(
        &server,
        &[
            "send",
            &plain,
            "3",
            "--prefix",
            "garbage",
            "--cloudevent-garbage",
        ],
    );
    let plain_bodies: Vec<String> = (0..250).map(|number| format!("p-{number}")).collect();
    let fifo_bodies: Vec<String> = (0..60).map(|number| format!("o-{number}")).collect();
    common::wait_bodies(&function, &plain_bodies, WAIT).await;
    common::wait_bodies(&ordered, &fifo_bodies, WAIT).await;
    let bus = bus_of(&file).await;
    let dead = common::wait_for_dead_letters(&bus, "source:plain", 3, WAIT).await;
    for entry in &dead {
        assert_eq!(entry.dead_letter.reason, "malformed", "{entry:?}");
        assert!(
            String::from_utf8_lossy(&entry.dead_letter.event.data).starts_with("garbage-"),
            "{entry:?}"
        );
    }
    wait_empty(&server, &plain).await;
    wait_empty(&server, &fifo).await;

    let counts = common::body_counts(&function);
    for body in &plain_bodies {
        assert_eq!(counts[body], 1, "{body} delivered more than once");
    }
    // Each group's messages in the order they were sent.
    let mut groups: HashMap<String, Vec<usize>> = HashMap::new();
    for call in ordered.received() {
        let body = String::from_utf8_lossy(&call.body).into_owned();
        let number: usize = body.trim_start_matches("o-").parse().unwrap();
        groups
            .entry(format!("g{}", number % 3))
            .or_default()
            .push(number);
    }
    assert_eq!(groups.len(), 3);
    for (group, numbers) in &groups {
        let mut sorted = numbers.clone();
        sorted.sort_unstable();
        assert_eq!(numbers, &sorted, "group {group} out of order");
        assert_eq!(numbers.len(), 20, "group {group}: {numbers:?}");
    }
}

/// With `payload = "aws"` and batches, a Lambda handler reads Lambda's SQS event with
/// Powertools' batch processor: every record's fields, and a record it fails
/// (`batchItemFailures`) is retried alone and dead-lettered once its attempts are
/// spent. A message whose SQS fields exceed the bus's header limit is dead-lettered
/// under the source as too large.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lambda_handler_reads_lambdas_sqs_event_and_reports_item_failures() {
    let nats = NatsServer::start();
    let server = SqsServer::start();
    let queue_name = random_name("lambda");
    let queue = sqs_client(&server, &["create", &queue_name])[0].clone();
    let prefix = random_name("sqs");
    let directory = tempfile::tempdir().unwrap();
    let seen = directory.path().join("seen.jsonl");
    let file = directory.path().join("switchyard.toml");
    let rest = format!(
        r#"{source}
[[functions]]
type = "lambda"
name = "shapes"
command = ["{python}", "-m", "awslambdaric", "shapes.sqs"]
handler = "shapes.sqs"
directory = "{handlers}"
timeout = "20s"
environment = {{ SEEN_FILE = "{seen}" }}

[[triggers]]
name = "on-message"
function = "shapes"
payload = "aws"
batch = {{ max_events = 10, window = "300ms" }}
retry = {{ policy = "fixed", initial = "100ms", attempts = 2 }}
"#,
        source = sqs_source("orders", &queue),
        python = installed("SWITCHYARD_LAMBDA_PYTHON"),
        handlers = common::test_functions().join("python").display(),
        seen = seen.display(),
    );
    std::fs::write(&file, common::queue_test_config(&nats, &prefix, &rest)).unwrap();
    let process = Process::start(&file, &[]);
    process.wait_ready().await;

    let ids = sqs_client(&server, &["send", &queue, "19", "--prefix", "m"]);
    sqs_client(&server, &["send", &queue, "1", "--prefix", "m-poison"]);
    // Ten attributes of 7,000 bytes: 70 kB of SQS fields, over JetStream's 64 KiB
    // header limit once kept on the event.
    sqs_client(
        &server,
        &[
            "send",
            &queue,
            "1",
            "--prefix",
            "huge",
            "--attributes",
            "9",
            "--attribute-bytes",
            "7500",
        ],
    );

    let deadline = Instant::now() + WAIT;
    loop {
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&seen)
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        let bodies: std::collections::HashSet<&str> = lines
            .iter()
            .filter_map(|line| line["body"].as_str())
            .collect();
        if (0..19).all(|number| bodies.contains(format!("m-{number}").as_str())) {
            break;
        }
        assert!(Instant::now() < deadline, "the handler saw {lines:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let bus = bus_of(&file).await;
    let poisoned = common::wait_for_dead_letters(&bus, "on-message", 1, WAIT).await;
    assert_eq!(poisoned[0].dead_letter.reason, "attempts_exhausted");
    assert_eq!(&poisoned[0].dead_letter.event.data[..], b"m-poison-0");
    let too_large = common::wait_for_dead_letters(&bus, "source:orders", 1, WAIT).await;
    assert_eq!(
        too_large[0].dead_letter.reason, "too_large",
        "{too_large:?}"
    );
    // Read again: the poisoned message's second attempt came after the first read.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&seen)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    for line in &lines {
        let body = line["body"].as_str().unwrap();
        assert_eq!(line["event_source"], "aws:sqs", "{line}");
        assert_eq!(
            line["event_source_arn"],
            format!("arn:aws:sqs:us-east-1:000000000000:{queue_name}"),
            "{line}"
        );
        assert_eq!(line["aws_region"], "us-east-1", "{line}");
        assert_eq!(line["content_type"], "text/plain", "{line}");
        assert_eq!(line["receive_count"], "1", "{line}");
        assert!(
            line["sent_timestamp"]
                .as_str()
                .unwrap()
                .parse::<u64>()
                .unwrap()
                > 0,
            "{line}"
        );
        assert!(
            !line["receipt_handle"].as_str().unwrap().is_empty(),
            "{line}"
        );
        if let Some(number) = body
            .strip_prefix("m-")
            .and_then(|number| number.parse::<usize>().ok())
        {
            assert_eq!(line["message_id"], ids[number], "{line}");
        }
    }
    // Every good message once; the poisoned one in its first batch and once more
    // alone (attempts = 2).
    let mut seen_counts: HashMap<&str, usize> = HashMap::new();
    for line in &lines {
        *seen_counts
            .entry(line["body"].as_str().unwrap())
            .or_default() += 1;
    }
    for number in 0..19 {
        assert_eq!(
            seen_counts[format!("m-{number}").as_str()],
            1,
            "{seen_counts:?}"
        );
    }
    assert_eq!(seen_counts["m-poison-0"], 2, "{seen_counts:?}");
    assert!(
        lines
            .iter()
            .any(|line| line["batch_size"].as_u64().unwrap() > 1),
        "no batch held more than one record"
    );
    wait_empty(&server, &queue).await;
}

/// 5,000 messages produced by boto3 while Switchyard is killed (SIGKILL) three times
/// and started again: every message is delivered; duplicates (messages received
/// again after a kill, before they were deleted, beyond what the duplicate window
/// drops, or delivered twice by a dispatcher killed mid-call) are counted and
/// reported, and the queue ends empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_while_switchyard_is_killed_three_times() {
    let nats = NatsServer::start();
    let server = SqsServer::start();
    let queue = sqs_client(
        &server,
        &["create", &random_name("kill"), "--visibility", "5"],
    )[0]
    .clone();
    let function = FunctionServer::start(|_, _| Reply::ok()).await;
    let prefix = random_name("sqs");
    let directory = tempfile::tempdir().unwrap();
    let file = directory.path().join("switchyard.toml");
    let rest = format!(
        r#"{source}
[[functions]]
type = "http"
name = "f"
url = "{function}"

[[triggers]]
name = "all"
function = "f"
max_concurrency = 16
"#,
        source = sqs_source("kills", &queue),
        function = function.url,
    );
    std::fs::write(&file, common::queue_test_config(&nats, &prefix, &rest)).unwrap();
    let mut process = Process::start(&file, &[]);
    process.wait_ready().await;

    // The producer runs beside the kills.
    let producer = Command::new(installed("SWITCHYARD_AWS_PYTHON"))
        .arg(common::test_functions().join("sqs_client.py"))
        .arg(server.endpoint())
        .args(["send", &queue, "5000", "--prefix", "k"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let bodies: Vec<String> = (0..5000).map(|number| format!("k-{number}")).collect();
    for kill in 1..=3 {
        // Once more messages have arrived since the last start.
        let deadline = Instant::now() + WAIT;
        let before = function.received().len();
        while function.received().len() < before + 300 {
            assert!(Instant::now() < deadline, "no progress before kill {kill}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        process.signal(Signal::SIGKILL);
        let _ = process.wait_exit().await;
        process = Process::start(&file, &[]);
        process.wait_ready().await;
    }
    let mut producer = producer;
    assert!(producer.wait().unwrap().success(), "the producer failed");
    common::wait_bodies(&function, &bodies, WAIT).await;
    wait_empty(&server, &queue).await;
    let counts = common::body_counts(&function);
    let duplicates: usize = counts.values().map(|count| count - 1).sum();
    eprintln!(
        "sqs kills: 5000 messages, {} delivered, {duplicates} duplicate deliveries",
        counts.len()
    );
    assert_eq!(counts.len(), 5000);
}

/// While NATS is away, the messages a receiver holds stay invisible past their
/// queue's visibility timeout (2 s) because the source extends it: no other receiver
/// gets them, and SQS counts them in flight. When NATS returns they are stored,
/// delivered once and deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn visibility_is_extended_while_nats_is_away() {
    let mut nats = NatsServer::start();
    let server = SqsServer::start();
    let queue = sqs_client(
        &server,
        &["create", &random_name("away"), "--visibility", "2"],
    )[0]
    .clone();
    let function = FunctionServer::start(|_, _| Reply::ok()).await;
    let prefix = random_name("sqs");
    let upper = prefix.to_uppercase();
    let directory = tempfile::tempdir().unwrap();
    let file = directory.path().join("switchyard.toml");
    // File storage: the stream outlives the NATS restart.
    let text = format!(
        r#"[nats]
url = "{nats}"
subject_prefix = "{prefix}"
events_stream = {{ name = "{upper}_EVENTS" }}
dead_letter_stream = {{ name = "{upper}_DLQ" }}

[admin]
listen = "127.0.0.1:0"

[log]
level = "warn,switchyard_connector_sqs=debug"
{source}
[[functions]]
type = "http"
name = "f"
url = "{function}"

[[triggers]]
name = "all"
function = "f"
"#,
        nats = nats.url(),
        source = sqs_source("away", &queue),
        function = function.url,
    );
    std::fs::write(&file, text).unwrap();
    let log = directory.path().join("switchyard.log");
    let process = Process::start_logged(&file, &[], &log);
    process.wait_ready().await;

    nats.stop();
    let bodies: Vec<String> = (0..20).map(|number| format!("away-{number}")).collect();
    sqs_client(&server, &["send", &queue, "20", "--prefix", "away"]);
    // The receivers hold what they received (the others stay in the queue, visible:
    // every receiver is busy storing). Once one extended, count what is visible;
    // ten extensions later (each receiver extends every half timeout, so more than
    // a whole timeout has passed) none of the held messages came back.
    let extensions = |at_least: usize| {
        let (log, process) = (&log, &process);
        async move {
            let deadline = Instant::now() + WAIT;
            loop {
                let logged = std::fs::read_to_string(log).unwrap_or_default();
                let count = logged.matches("visibility extended").count();
                if count >= at_least {
                    return count;
                }
                process.assert_running();
                assert!(
                    Instant::now() < deadline,
                    "no visibility extended while NATS is away:\n{logged}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let first = extensions(1).await;
    let visible = || -> usize {
        sqs_client(&server, &["visible", &queue])[0]
            .parse()
            .unwrap()
    };
    let held = 20 - visible();
    assert!(held > 0, "no message received");
    extensions(first + 10).await;
    assert_eq!(
        20 - visible(),
        held,
        "held messages came back to the queue while being stored"
    );
    let depth: usize = sqs_client(&server, &["depth", &queue])[0].parse().unwrap();
    assert_eq!(depth, 20);

    nats.restart();
    common::wait_bodies(&function, &bodies, WAIT).await;
    wait_empty(&server, &queue).await;
    let counts = common::body_counts(&function);
    for body in &bodies {
        assert_eq!(counts[body], 1, "{body} delivered more than once");
    }
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        !logged.contains("extending the visibility of some messages failed"),
        "{logged}"
    );
}
