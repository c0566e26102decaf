//! The AMQP source against a real RabbitMQ node (Debian's rabbitmq-server, started by
//! the testkit) and a real nats-server, with messages published by pika: deliveries
//! become events once and are acknowledged, the CloudEvents binary mode keeps its
//! attributes, the source reconnects after the broker restarts, a Lambda handler
//! reads Lambda's RabbitMQ event with Powertools, what cannot be stored is
//! dead-lettered, and nothing is lost while Switchyard is killed (SIGKILL) three
//! times during 5,000 messages.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{FunctionServer, NatsServer, Process, Reply, installed, random_name};
use nix::sys::signal::Signal;
use switchyard_testkit::queues::RabbitServer;

const WAIT: Duration = Duration::from_secs(90);

/// Runs tests/functions/amqp_client.py with pika; returns its stdout lines.
fn amqp_client(server: &RabbitServer, arguments: &[&str]) -> Vec<String> {
    let output = Command::new(installed("SWITCHYARD_QUEUE_PYTHON"))
        .arg(common::test_functions().join("amqp_client.py"))
        .arg(server.port.to_string())
        .args(arguments)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "amqp_client.py {arguments:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

fn amqp_source(name: &str, server: &RabbitServer, queue: &str) -> String {
    format!(
        r#"
[[sources]]
type = "amqp"
name = "{name}"
url = "{url}"
queue = "{queue}"
prefetch = 100
"#,
        url = server.url(),
    )
}

async fn bus_of(file: &Path) -> switchyard_bus::Bus {
    let config = switchyard::config::load(file).unwrap();
    switchyard_bus::Bus::connect(&config.nats).await.unwrap()
}

/// Plain deliveries become events once (and are acknowledged: the queue is empty
/// once Switchyard stopped), binary-mode CloudEvents keep their attributes, bodies
/// marked as structured CloudEvents that are not are dead-lettered under the source,
/// and the source reconnects when the broker restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_become_events_once_through_a_broker_restart() {
    let nats = NatsServer::start();
    let mut server = RabbitServer::start();
    let queue = random_name("jobs");
    let function = FunctionServer::start(|_, _| Reply::ok()).await;
    let prefix = random_name("amqp");
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
max_concurrency = 8
"#,
        source = amqp_source("jobs", &server, &queue),
        function = function.url,
    );
    std::fs::write(&file, common::queue_test_config(&nats, &prefix, &rest)).unwrap();
    let mut process = Process::start(&file, &[]);
    process.wait_ready().await;

    amqp_client(&server, &["publish", &queue, "150", "--prefix", "a"]);
    amqp_client(
        &server,
        &["publish", &queue, "20", "--prefix", "b", "--binary-mode"],
    );
    amqp_client(
        &server,
        &["publish", &queue, "3", "--prefix", "garbage", "--garbage"],
    );
    let first: Vec<String> = (0..150)
        .map(|number| format!("a-{number}"))
        .chain((0..20).map(|number| format!("b-{number}")))
        .collect();
    common::wait_bodies(&function, &first, WAIT).await;
    let bus = bus_of(&file).await;
    let dead = common::wait_for_dead_letters(&bus, "source:jobs", 3, WAIT).await;
    for entry in &dead {
        assert_eq!(entry.dead_letter.reason, "malformed", "{entry:?}");
    }
    // Binary mode: the CloudEvents attributes travelled as application properties.
    let binary = function
        .received()
        .into_iter()
        .find(|call| call.body.starts_with(b"b-"))
        .unwrap();
    assert_eq!(binary.header("ce-type"), Some("com.example.binary"));
    assert_eq!(binary.header("ce-source"), Some("/producers/pika"));
    assert!(binary.header("ce-id").unwrap().starts_with("ce-b-"));
    let plain = function
        .received()
        .into_iter()
        .find(|call| call.body.starts_with(b"a-"))
        .unwrap();
    assert_eq!(plain.header("ce-type"), Some("dev.switchyard.amqp.message"));
    assert_eq!(plain.header("content-type"), Some("text/plain"));

    // The broker restarts (its durable queue and persistent messages kept): the
    // source reconnects and goes on.
    server.restart();
    amqp_client(&server, &["publish", &queue, "100", "--prefix", "c"]);
    let second: Vec<String> = (0..100).map(|number| format!("c-{number}")).collect();
    common::wait_bodies(&function, &second, WAIT).await;

    // Stopped gracefully: everything stored was acknowledged.
    process.signal(Signal::SIGTERM);
    assert!(process.wait_exit().await);
    let ready: usize = amqp_client(&server, &["depth", &queue])[0].parse().unwrap();
    assert_eq!(ready, 0, "messages left in the queue");
    let counts = common::body_counts(&function);
    for body in first.iter().chain(&second) {
        assert_eq!(counts[body], 1, "{body} delivered more than once");
    }
}

/// The source declares its queue and binds it to an exchange with a routing key
/// pattern: what the exchange routes there arrives, what it does not never does;
/// bodies that are not UTF-8 arrive byte for byte with their content type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_queue_bound_to_an_exchange_and_bodies_that_are_not_text() {
    let nats = NatsServer::start();
    let server = RabbitServer::start();
    let queue = random_name("orders");
    let exchange = random_name("events");
    amqp_client(&server, &["exchange", &exchange]);
    let function = FunctionServer::start(|_, _| Reply::ok()).await;
    let prefix = random_name("amqp");
    let directory = tempfile::tempdir().unwrap();
    let file = directory.path().join("switchyard.toml");
    let rest = format!(
        r#"
[[sources]]
type = "amqp"
name = "orders"
url = "{url}"
queue = "{queue}"
exchange = "{exchange}"
routing_keys = ["order.*"]

[[functions]]
type = "http"
name = "f"
url = "{function}"

[[triggers]]
name = "all"
function = "f"
"#,
        url = server.url(),
        function = function.url,
    );
    std::fs::write(&file, common::queue_test_config(&nats, &prefix, &rest)).unwrap();
    let process = Process::start(&file, &[]);
    process.wait_ready().await;
    common::wait_source_running(&process, "orders").await;

    let via = |routing_key: &str, more: &[&str]| {
        let mut arguments = vec![
            "publish",
            &queue,
            "5",
            "--exchange",
            &exchange,
            "--routing-key",
            routing_key,
        ];
        arguments.extend_from_slice(more);
        amqp_client(&server, &arguments);
    };
    // Not routed to the queue: published first, so had they been routed they would
    // be there before the others.
    via("invoice.paid", &["--prefix", "invoice"]);
    via("order.created", &["--prefix", "order"]);
    via("order.raw", &["--prefix", "raw", "--raw-body"]);
    let bodies: Vec<String> = (0..5).map(|number| format!("order-{number}")).collect();
    common::wait_bodies(&function, &bodies, WAIT).await;
    let deadline = Instant::now() + WAIT;
    let raw: Vec<Vec<u8>> = (0..5)
        .map(|number| [&b"\xff\xfe"[..], format!("raw-{number}").as_bytes()].concat())
        .collect();
    loop {
        let received = function.received();
        if raw
            .iter()
            .all(|body| received.iter().any(|call| call.body[..] == body[..]))
        {
            let call = received
                .iter()
                .find(|call| call.body[..] == raw[0][..])
                .unwrap();
            assert_eq!(
                call.header("content-type"),
                Some("application/octet-stream")
            );
            break;
        }
        assert!(Instant::now() < deadline, "raw bodies not delivered intact");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let received = function.received();
    assert_eq!(received.len(), 10, "only the routed messages arrive");
    assert!(
        !received
            .iter()
            .any(|call| call.body.starts_with(b"invoice"))
    );
}

/// With `payload = "aws"` and batches, a Lambda handler reads Lambda's RabbitMQ event
/// with Powertools' RabbitMQEvent; a delivery whose AMQP fields exceed the bus's
/// header limit once kept is dead-lettered under the source as too large.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lambda_handler_reads_lambdas_rabbitmq_event() {
    let nats = NatsServer::start();
    let server = RabbitServer::start();
    let queue = random_name("lambda");
    let prefix = random_name("amqp");
    let directory = tempfile::tempdir().unwrap();
    let seen = directory.path().join("seen.jsonl");
    let file = directory.path().join("switchyard.toml");
    let rest = format!(
        r#"{source}
[[functions]]
type = "lambda"
name = "shapes"
command = ["{python}", "-m", "awslambdaric", "shapes.rabbitmq"]
handler = "shapes.rabbitmq"
directory = "{handlers}"
timeout = "20s"
environment = {{ SEEN_FILE = "{seen}" }}

[[triggers]]
name = "on-message"
function = "shapes"
payload = "aws"
batch = {{ max_events = 10, window = "300ms" }}
"#,
        source = amqp_source("rabbit", &server, &queue),
        python = installed("SWITCHYARD_LAMBDA_PYTHON"),
        handlers = common::test_functions().join("python").display(),
        seen = seen.display(),
    );
    std::fs::write(&file, common::queue_test_config(&nats, &prefix, &rest)).unwrap();
    let process = Process::start(&file, &[]);
    process.wait_ready().await;

    amqp_client(&server, &["publish", &queue, "12", "--prefix", "m"]);
    amqp_client(
        &server,
        &[
            "publish",
            &queue,
            "1",
            "--prefix",
            "huge",
            "--header-bytes",
            "70000",
        ],
    );
    let bus = bus_of(&file).await;
    let too_large = common::wait_for_dead_letters(&bus, "source:rabbit", 1, WAIT).await;
    assert_eq!(
        too_large[0].dead_letter.reason, "too_large",
        "{too_large:?}"
    );
    let deadline = Instant::now() + WAIT;
    let lines: Vec<serde_json::Value> = loop {
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&seen)
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        if lines.len() >= 12 {
            break lines;
        }
        assert!(Instant::now() < deadline, "the handler saw {lines:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut datas: Vec<&str> = lines
        .iter()
        .map(|line| line["data"].as_str().unwrap())
        .collect();
    datas.sort_unstable();
    let mut expected: Vec<String> = (0..12).map(|number| format!("m-{number}")).collect();
    expected.sort_unstable();
    assert_eq!(datas, expected);
    for line in &lines {
        assert_eq!(line["event_source"], "aws:rmq", "{line}");
        assert!(
            line["event_source_arn"]
                .as_str()
                .unwrap()
                .starts_with("arn:aws:mq:"),
            "{line}"
        );
        assert_eq!(line["queue"], format!("{queue}::/"), "{line}");
        assert_eq!(line["content_type"], "text/plain", "{line}");
        assert_eq!(line["message_id"], line["data"], "{line}");
        assert_eq!(line["delivery_mode"], 2, "{line}");
        assert_eq!(line["redelivered"], false, "{line}");
        assert_eq!(
            line["body_size"],
            line["data"].as_str().unwrap().len(),
            "{line}"
        );
        assert_eq!(
            line["headers"]["tenant"]["bytes"],
            serde_json::json!(b"acme".to_vec()),
            "{line}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|line| line["batch_size"].as_u64().unwrap() > 1),
        "no batch held more than one message"
    );
}

/// 5,000 messages published by pika while Switchyard is killed (SIGKILL) three times
/// and started again: every message is delivered (the broker requeues what a killed
/// process held unacknowledged; message ids let the duplicate window drop what was
/// stored before); duplicate deliveries are counted and reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_while_switchyard_is_killed_three_times() {
    let nats = NatsServer::start();
    let server = RabbitServer::start();
    let queue = random_name("kill");
    let function = FunctionServer::start(|_, _| Reply::ok()).await;
    let prefix = random_name("amqp");
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
        source = amqp_source("kills", &server, &queue),
        function = function.url,
    );
    std::fs::write(&file, common::queue_test_config(&nats, &prefix, &rest)).unwrap();
    let mut process = Process::start(&file, &[]);
    process.wait_ready().await;

    let mut producer = Command::new(installed("SWITCHYARD_QUEUE_PYTHON"))
        .arg(common::test_functions().join("amqp_client.py"))
        .arg(server.port.to_string())
        .args(["publish", &queue, "5000", "--prefix", "k"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let bodies: Vec<String> = (0..5000).map(|number| format!("k-{number}")).collect();
    for kill in 1..=3 {
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
    assert!(producer.wait().unwrap().success(), "the producer failed");
    common::wait_bodies(&function, &bodies, WAIT).await;
    let counts = common::body_counts(&function);
    let duplicates: usize = counts.values().map(|count| count - 1).sum();
    eprintln!(
        "amqp kills: 5000 messages, {} delivered, {duplicates} duplicate deliveries",
        counts.len()
    );
    assert_eq!(counts.len(), 5000);
}
