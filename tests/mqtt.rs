//! The MQTT source against a real mosquitto broker (Debian's, started by the
//! testkit) and a real nats-server, with messages published by paho-mqtt: wildcard
//! subscriptions with a username and password, structured CloudEvents kept, what
//! cannot be stored dead-lettered, messages published while Switchyard is down
//! delivered when it returns (persistent session), and nothing lost while Switchyard
//! is killed (SIGKILL) three times during 5,000 messages.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{FunctionServer, NatsServer, Process, Reply, installed, random_name};
use nix::sys::signal::Signal;
use switchyard_testkit::queues::MosquittoServer;

const WAIT: Duration = Duration::from_secs(90);

/// Runs tests/functions/mqtt_client.py with paho-mqtt.
fn mqtt_client(server: &MosquittoServer, arguments: &[&str]) {
    let output = Command::new(installed("SWITCHYARD_QUEUE_PYTHON"))
        .arg(common::test_functions().join("mqtt_client.py"))
        .arg(server.port.to_string())
        .args(arguments)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "mqtt_client.py {arguments:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

async fn bus_of(file: &Path) -> switchyard_bus::Bus {
    let text = std::fs::read_to_string(file).unwrap();
    let config = switchyard::config::parse(file, &text, &|name| match name {
        "MQTT_TEST_PASSWORD" => Some("mqtt-secret".to_owned()),
        _ => std::env::var(name).ok(),
    })
    .unwrap();
    switchyard_bus::Bus::connect(&config.nats).await.unwrap()
}

fn function_and_trigger(function: &FunctionServer) -> String {
    format!(
        r#"
[[functions]]
type = "http"
name = "f"
url = "{url}"

[[triggers]]
name = "all"
function = "f"
max_concurrency = 16
"#,
        url = function.url
    )
}

/// Wildcard subscriptions with a username and a password (from the environment):
/// messages on matching topics become events with the topic as subject, others are
/// not received, structured CloudEvents keep their attributes, a JSON object with a
/// `specversion` that is no CloudEvent and a payload over the bus's limit are
/// dead-lettered under the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribed_topics_become_events_and_bad_messages_are_dead_lettered() {
    let nats = NatsServer::start();
    let server = MosquittoServer::start_with_password();
    let function = FunctionServer::start(|_, _| Reply::ok()).await;
    let prefix = random_name("mqtt");
    let directory = tempfile::tempdir().unwrap();
    let file = directory.path().join("switchyard.toml");
    let rest = format!(
        r#"
[[sources]]
type = "mqtt"
name = "sensors"
url = "{url}"
topics = ["sensors/+/temperature", "alerts/#"]
username = "switchyard"
password = "${{MQTT_TEST_PASSWORD}}"
{function}"#,
        url = server.url(),
        function = function_and_trigger(&function),
    );
    std::fs::write(&file, common::queue_test_config(&nats, &prefix, &rest)).unwrap();
    let process = Process::start(&file, &[("MQTT_TEST_PASSWORD", "mqtt-secret".to_owned())]);
    process.wait_ready().await;
    common::wait_source_running(&process, "sensors").await;

    let auth = ["--user", "producer", "--password", "producer"];
    let publish = |topic: &str, count: &str, more: &[&str]| {
        let mut arguments = vec!["publish", topic, count];
        arguments.extend_from_slice(more);
        arguments.extend_from_slice(&auth);
        mqtt_client(&server, &arguments);
    };
    publish("sensors/kitchen/temperature", "100", &["--prefix", "t"]);
    publish("alerts/fire/floor-1", "50", &["--prefix", "a"]);
    publish("sensors/kitchen/humidity", "20", &["--prefix", "h"]);
    publish(
        "alerts/structured",
        "10",
        &["--prefix", "s", "--structured"],
    );
    publish("alerts/garbage", "3", &["--prefix", "g", "--garbage"]);
    // Over nats-server's 1 MiB max_payload.
    publish(
        "alerts/huge",
        "1",
        &["--prefix", "huge", "--bytes", "1500000"],
    );
    let bodies: Vec<String> = (0..100)
        .map(|number| format!("t-{number}"))
        .chain((0..50).map(|number| format!("a-{number}")))
        .chain((0..10).map(|number| format!("s-{number}")))
        .collect();
    common::wait_bodies(&function, &bodies, WAIT).await;
    let bus = bus_of(&file).await;
    let dead = common::wait_for_dead_letters(&bus, "source:sensors", 4, WAIT).await;
    let mut reasons: Vec<&str> = dead
        .iter()
        .map(|entry| entry.dead_letter.reason.as_str())
        .collect();
    reasons.sort_unstable();
    assert_eq!(
        reasons,
        ["malformed", "malformed", "malformed", "too_large"],
        "{dead:?}"
    );

    let received = function.received();
    let temperature = received
        .iter()
        .find(|call| call.body.starts_with(b"t-"))
        .unwrap();
    assert_eq!(
        temperature.header("ce-subject"),
        Some("sensors/kitchen/temperature")
    );
    assert_eq!(
        temperature.header("ce-type"),
        Some("dev.switchyard.mqtt.message")
    );
    assert_eq!(
        temperature.header("ce-source"),
        Some(format!("mqtt://127.0.0.1:{}", server.port).as_str())
    );
    let structured = received
        .iter()
        .find(|call| call.body.starts_with(b"s-"))
        .unwrap();
    assert_eq!(structured.header("ce-type"), Some("com.example.structured"));
    assert_eq!(structured.header("ce-source"), Some("/producers/paho"));
    assert!(structured.header("ce-id").unwrap().starts_with("ce-s-"));
    // Not subscribed: never received.
    assert!(!received.iter().any(|call| call.body.starts_with(b"h-")));
    let counts = common::body_counts(&function);
    for body in &bodies {
        assert_eq!(counts[body], 1, "{body} delivered more than once");
    }
}

/// The session persists: messages published while Switchyard is stopped arrive when
/// it starts again (and a broker restart in between loses none of them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_published_while_switchyard_is_down_arrive_when_it_returns() {
    let nats = NatsServer::start();
    let mut server = MosquittoServer::start();
    let function = FunctionServer::start(|_, _| Reply::ok()).await;
    let prefix = random_name("mqtt");
    let directory = tempfile::tempdir().unwrap();
    let file = directory.path().join("switchyard.toml");
    let rest = format!(
        r#"
[[sources]]
type = "mqtt"
name = "session"
url = "{url}"
topics = ["jobs/#"]
{function}"#,
        url = server.url(),
        function = function_and_trigger(&function),
    );
    std::fs::write(&file, common::queue_test_config(&nats, &prefix, &rest)).unwrap();
    let mut process = Process::start(&file, &[]);
    process.wait_ready().await;
    common::wait_source_running(&process, "session").await;
    process.signal(Signal::SIGTERM);
    assert!(process.wait_exit().await);

    mqtt_client(&server, &["publish", "jobs/a", "500", "--prefix", "d"]);
    // Saved every second: published before the restart, kept through it.
    server.restart();
    let process = Process::start(&file, &[]);
    process.wait_ready().await;
    let bodies: Vec<String> = (0..500).map(|number| format!("d-{number}")).collect();
    common::wait_bodies(&function, &bodies, WAIT).await;
    let counts = common::body_counts(&function);
    for body in &bodies {
        assert_eq!(counts[body], 1, "{body} delivered more than once");
    }
}

/// 5,000 messages published by paho while Switchyard is killed (SIGKILL) three times
/// and started again: every message is delivered (the broker keeps what was not
/// acknowledged for the session); duplicate deliveries (messages delivered again
/// after a kill, before their PUBACK: MQTT 3.1.1 has no id to drop them by) are
/// counted and reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_while_switchyard_is_killed_three_times() {
    let nats = NatsServer::start();
    let server = MosquittoServer::start();
    let function = FunctionServer::start(|_, _| Reply::ok()).await;
    let prefix = random_name("mqtt");
    let directory = tempfile::tempdir().unwrap();
    let file = directory.path().join("switchyard.toml");
    let rest = format!(
        r#"
[[sources]]
type = "mqtt"
name = "kills"
url = "{url}"
topics = ["load/#"]
{function}"#,
        url = server.url(),
        function = function_and_trigger(&function),
    );
    std::fs::write(&file, common::queue_test_config(&nats, &prefix, &rest)).unwrap();
    let mut process = Process::start(&file, &[]);
    process.wait_ready().await;
    common::wait_source_running(&process, "kills").await;

    let mut producer = Command::new(installed("SWITCHYARD_QUEUE_PYTHON"))
        .arg(common::test_functions().join("mqtt_client.py"))
        .arg(server.port.to_string())
        .args(["publish", "load/x", "5000", "--prefix", "k"])
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
        "mqtt kills: 5000 messages, {} delivered, {duplicates} duplicate deliveries",
        counts.len()
    );
    assert_eq!(counts.len(), 5000);
}

/// Waits until source `name` failed at least once; its `/v1/sources` entry.
async fn wait_failed(process: &Process, name: &str) -> serde_json::Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let body = reqwest::get(format!("http://{}/v1/sources", process.admin()))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let sources: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let source = sources["sources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|source| source["name"] == name)
            .cloned()
            .unwrap_or_default();
        if source["last_error"].is_string() {
            return source;
        }
        assert!(Instant::now() < deadline, "source {name}: {source}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// TLS to a broker that requires client certificates: the broker's certificate is
/// checked against a private CA and a configured name, Switchyard presents its own,
/// and messages flow. Beside it, sources without a client certificate, trusting
/// another CA, expecting another name, or with a wrong password fail with their
/// reason (and are retried) without stopping the first; the password is in no
/// error and in no log line, even with every library at trace level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificates_works_and_refusals_are_reported() {
    const WRONG_PASSWORD: &str = "not-the-secret-7731";
    let certs = tempfile::tempdir().unwrap();
    let authority = common::authority();
    std::fs::write(certs.path().join("ca.pem"), authority.cert.pem()).unwrap();
    common::issue_files(&authority, certs.path(), "server", "mqtt.test");
    common::issue_files(&authority, certs.path(), "client", "switchyard.client");
    std::fs::write(
        certs.path().join("stranger.pem"),
        common::authority().cert.pem(),
    )
    .unwrap();
    let nats = NatsServer::start();
    let server = MosquittoServer::start_tls(certs.path());
    let guarded = MosquittoServer::start_with_password();
    let function = FunctionServer::start(|_, _| Reply::ok()).await;
    let prefix = random_name("mqtt");
    let directory = tempfile::tempdir().unwrap();
    let file = directory.path().join("switchyard.toml");
    let tls_url = format!("mqtts://127.0.0.1:{}", server.tls_port.unwrap());
    let dir = certs.path().display();
    let rest = format!(
        r#"
[[sources]]
type = "mqtt"
name = "secure"
url = "{tls_url}"
topics = ["secure/#"]
tls = {{ ca_file = "{dir}/ca.pem", cert_file = "{dir}/client.pem", key_file = "{dir}/client-key.pem", server_name = "mqtt.test" }}

[[sources]]
type = "mqtt"
name = "no-certificate"
url = "{tls_url}"
topics = ["secure/#"]
tls = {{ ca_file = "{dir}/ca.pem", server_name = "mqtt.test" }}

[[sources]]
type = "mqtt"
name = "other-ca"
url = "{tls_url}"
topics = ["secure/#"]
tls = {{ ca_file = "{dir}/stranger.pem", cert_file = "{dir}/client.pem", key_file = "{dir}/client-key.pem", server_name = "mqtt.test" }}

[[sources]]
type = "mqtt"
name = "other-name"
url = "{tls_url}"
topics = ["secure/#"]
tls = {{ ca_file = "{dir}/ca.pem", cert_file = "{dir}/client.pem", key_file = "{dir}/client-key.pem", server_name = "elsewhere.test" }}

[[sources]]
type = "mqtt"
name = "wrong-password"
url = "{guarded_url}"
topics = ["secure/#"]
username = "switchyard"
password = "${{MQTT_WRONG_PASSWORD}}"
{function}"#,
        guarded_url = guarded.url(),
        function = function_and_trigger(&function),
    );
    std::fs::write(&file, common::queue_test_config(&nats, &prefix, &rest)).unwrap();
    let log = directory.path().join("switchyard.log");
    let process = Process::start_logged(
        &file,
        &[
            ("MQTT_WRONG_PASSWORD", WRONG_PASSWORD.to_owned()),
            ("SWITCHYARD_TEST_LOG", "trace".to_owned()),
        ],
        &log,
    );
    process.wait_ready().await;
    common::wait_source_running(&process, "secure").await;

    // Published on the broker's plain listener, received over TLS.
    mqtt_client(
        &server,
        &["publish", "secure/readings", "20", "--prefix", "tls"],
    );
    let bodies: Vec<String> = (0..20).map(|number| format!("tls-{number}")).collect();
    common::wait_bodies(&function, &bodies, WAIT).await;
    assert_eq!(
        function.received()[0].header("ce-source"),
        Some(tls_url.as_str())
    );

    let mut errors = Vec::new();
    for name in ["no-certificate", "other-ca", "other-name", "wrong-password"] {
        let source = wait_failed(&process, name).await;
        assert_ne!(source["state"], "running", "{source}");
        errors.push(source["last_error"].as_str().unwrap().to_owned());
    }
    let all = errors.join("\n");
    assert!(
        errors[0].contains(&tls_url) && errors[0].contains("CertificateRequired"),
        "no client certificate: {all}"
    );
    // The stranger CA has the same name as the real one: its signature is wrong.
    assert!(
        errors[1].contains("invalid peer certificate"),
        "another CA: {all}"
    );
    assert!(
        errors[2].contains("not valid for name \"elsewhere.test\""),
        "another name: {all}"
    );
    assert!(
        errors[3].contains("refused") && errors[3].contains("NotAuthorized"),
        "wrong password: {all}"
    );
    assert!(!all.contains(WRONG_PASSWORD), "{all}");
    let counts = common::body_counts(&function);
    for body in &bodies {
        assert_eq!(counts[body], 1, "{body} delivered more than once");
    }
    drop(process);
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("wrong-password") && logged.contains("TRACE"),
        "the log holds the sources' failures, at trace level"
    );
    assert!(
        !logged.contains(WRONG_PASSWORD),
        "the password reached the log"
    );
}

/// MQTT 5 (`protocol = "5"`), published by paho as MQTT 5: binary-mode CloudEvents
/// (attributes as User Properties, Content Type as `datacontenttype`) keep their
/// attributes, plain messages keep their Content Type, binary-mode events without
/// an id, events claiming a schedule's source (forged firings) and a payload over
/// the bus's limit are dead-lettered (the broker sends it: Switchyard's maximum
/// packet size is MQTT's), and the session outlives the
/// connection (a session expiry is set): what is published while Switchyard is
/// stopped arrives when it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_5_binary_mode_events_and_a_persistent_session() {
    let nats = NatsServer::start();
    let server = MosquittoServer::start();
    let function = FunctionServer::start(|_, _| Reply::ok()).await;
    let prefix = random_name("mqtt");
    let directory = tempfile::tempdir().unwrap();
    let file = directory.path().join("switchyard.toml");
    let rest = format!(
        r#"
[[sources]]
type = "mqtt"
name = "five"
url = "{url}"
protocol = "5"
topics = ["v5/#"]

[[sources]]
type = "schedule"
name = "nightly"
expression = "cron(0 3 * * ? *)"
{function}"#,
        url = server.url(),
        function = function_and_trigger(&function),
    );
    std::fs::write(&file, common::queue_test_config(&nats, &prefix, &rest)).unwrap();
    let mut process = Process::start(&file, &[]);
    process.wait_ready().await;
    common::wait_source_running(&process, "five").await;

    let publish = |topic: &str, count: &str, more: &[&str]| {
        let mut arguments = vec!["publish", topic, count, "--v5"];
        arguments.extend_from_slice(more);
        mqtt_client(&server, &arguments);
    };
    publish("v5/binary", "20", &["--prefix", "b", "--binary-ce"]);
    publish(
        "v5/plain",
        "10",
        &["--prefix", "p", "--content-type", "application/json"],
    );
    publish("v5/garbage", "3", &["--prefix", "g", "--binary-garbage"]);
    publish("v5/huge", "1", &["--prefix", "huge", "--bytes", "1500000"]);
    publish(
        "v5/forged",
        "2",
        &[
            "--prefix",
            "forged",
            "--binary-ce",
            "--ce-source",
            "/schedules/nightly",
        ],
    );
    let bodies: Vec<String> = (0..20)
        .map(|number| format!("b-{number}"))
        .chain((0..10).map(|number| format!("p-{number}")))
        .collect();
    common::wait_bodies(&function, &bodies, WAIT).await;
    let bus = bus_of(&file).await;
    let dead = common::wait_for_dead_letters(&bus, "source:five", 6, WAIT).await;
    let mut reasons: Vec<&str> = dead
        .iter()
        .map(|entry| entry.dead_letter.reason.as_str())
        .collect();
    reasons.sort_unstable();
    assert_eq!(
        reasons,
        [
            "malformed",
            "malformed",
            "malformed",
            "reserved_source",
            "reserved_source",
            "too_large"
        ],
        "{dead:?}"
    );
    let received = function.received();
    let binary = received
        .iter()
        .find(|call| &call.body[..] == b"b-7")
        .expect("b-7 delivered");
    assert_eq!(binary.header("ce-id"), Some("ce-b-7"));
    assert_eq!(binary.header("ce-type"), Some("com.example.binary"));
    assert_eq!(binary.header("ce-source"), Some("/producers/paho"));
    assert_eq!(binary.header("ce-sensorid"), Some("s1"));
    assert_eq!(binary.header("content-type"), Some("text/plain"));
    let plain = received
        .iter()
        .find(|call| &call.body[..] == b"p-3")
        .expect("p-3 delivered");
    assert_eq!(plain.header("ce-subject"), Some("v5/plain"));
    assert_eq!(plain.header("content-type"), Some("application/json"));

    // Stopped, the session stays: messages published meanwhile wait for it.
    process.signal(Signal::SIGTERM);
    assert!(process.wait_exit().await);
    publish("v5/later", "200", &["--prefix", "later"]);
    let process = Process::start(&file, &[]);
    process.wait_ready().await;
    let later: Vec<String> = (0..200).map(|number| format!("later-{number}")).collect();
    common::wait_bodies(&function, &later, WAIT).await;
    let counts = common::body_counts(&function);
    for body in bodies.iter().chain(&later) {
        assert_eq!(counts[body], 1, "{body} delivered more than once");
    }
}
