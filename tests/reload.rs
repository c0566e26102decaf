//! Reloading the configuration of a running `switchyard run` process while events
//! flow from a webhook and a Kafka topic (real nats-server, real Kafka broker, Lambda
//! handlers run by AWS's awslambdaric): a trigger added, another removed, a
//! function's memory and concurrency changed, a route added, through
//! `switchyard reload` and SIGHUP; a broken edit and a change that needs a restart
//! refused with what is wrong. Nothing accepted is lost or delivered twice, and the
//! warm instance of the function that did not change keeps running.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{FunctionServer, NatsServer, Process, Reply, random_name, run_cli, test_functions};
use nix::sys::signal::Signal;
use switchyard_connector_kafka::rdkafka::ClientConfig;
use switchyard_connector_kafka::rdkafka::producer::{FutureProducer, FutureRecord};
use switchyard_testkit::KafkaBroker;

const WAIT: Duration = Duration::from_secs(60);
const ADMIN_TOKEN: &str = "reload-test-admin-token";

/// The event's key (`h-<n>` from the webhook, `k-<n>` from Kafka) in what the
/// function received: the hook's JSON string, or the record's bytes.
fn key_of(body: &[u8]) -> String {
    String::from_utf8_lossy(body).trim_matches('"').to_owned()
}

/// Every tenth event is refused by the function (422): it ends as a dead letter.
fn refused(key: &str) -> bool {
    key.rsplit('-')
        .next()
        .and_then(|number| number.parse::<u64>().ok())
        .is_some_and(|number| number % 10 == 7)
}

struct Setup<'a> {
    nats: &'a NatsServer,
    prefix: &'a str,
    brokers: String,
    topic: &'a str,
    main: &'a FunctionServer,
    retired: &'a FunctionServer,
    added: &'a FunctionServer,
    directory: &'a Path,
}

/// The configuration, in its first version (`second = false`) or with the changes
/// the test reloads: trigger `added` in, trigger `retired` out, `resized` with more
/// memory and concurrency, a route to `steady`.
fn config(setup: &Setup<'_>, second: bool, extra_trigger_line: &str) -> String {
    let python = common::installed("SWITCHYARD_LAMBDA_PYTHON");
    let handlers = test_functions().join("python");
    let upper = setup.prefix.to_uppercase();
    let (memory, concurrency) = if second { (256, 4) } else { (128, 2) };
    let steady_route = if second {
        "\n[[sources.routes]]\npath = \"/steady\"\nfunction = \"steady\"\n"
    } else {
        ""
    };
    let retired_trigger = if second {
        String::new()
    } else {
        "\n[[triggers]]\nname = \"retired\"\nfunction = \"retired\"\n".to_owned()
    };
    let added_trigger = if second {
        format!("\n[[triggers]]\nname = \"added\"\nfunction = \"added\"\n{extra_trigger_line}\n")
    } else {
        String::new()
    };
    format!(
        r#"[nats]
url = "{nats}"
subject_prefix = "{prefix}"
publish_timeout = "2s"
events_stream = {{ name = "{upper}_EVENTS", storage = "memory", duplicate_window = "1m" }}
dead_letter_stream = {{ name = "{upper}_DLQ", storage = "memory" }}

[admin]
listen = "127.0.0.1:0"
bearer_token = "{ADMIN_TOKEN}"

[log]
level = "${{SWITCHYARD_TEST_LOG:-warn}}"

[dispatcher]
shutdown_grace = "2s"

[[sources]]
type = "http"
name = "http"
listen = "127.0.0.1:0"

[[sources.hooks]]
name = "orders"
event_type = "com.example.order"
id_header = "Idempotency-Key"

[[sources.routes]]
path = "/resized"
function = "resized"
{steady_route}
[[sources]]
type = "kafka"
name = "kafka"
brokers = "{brokers}"
topics = ["{topic}"]
start = "earliest"
cluster = "test"
properties = {{ "session.timeout.ms" = 6000, "heartbeat.interval.ms" = 500, "auto.commit.interval.ms" = 200, "topic.metadata.refresh.interval.ms" = 1000 }}

[[functions]]
type = "http"
name = "main"
url = "{main}"
max_concurrency = 16

[[functions]]
type = "http"
name = "retired"
url = "{retired}"

[[functions]]
type = "http"
name = "added"
url = "{added}"

[[functions]]
type = "lambda"
name = "steady"
command = ["{python}", "-m", "awslambdaric", "app.handler"]
handler = "app.handler"
directory = "{handlers}"
min_instances = 1
environment = {{ STARTS_FILE = "{steady_starts}" }}

[[functions]]
type = "lambda"
name = "resized"
command = ["{python}", "-m", "awslambdaric", "app.handler"]
handler = "app.handler"
directory = "{handlers}"
memory = {memory}
max_concurrency = {concurrency}

[[triggers]]
name = "main"
function = "main"
max_concurrency = 16
retry = {{ policy = "fixed", initial = "100ms", attempts = 3, jitter = false }}
{retired_trigger}{added_trigger}"#,
        nats = setup.nats.url(),
        prefix = setup.prefix,
        brokers = setup.brokers,
        topic = setup.topic,
        main = setup.main.url,
        retired = setup.retired.url,
        added = setup.added.url,
        handlers = handlers.display(),
        steady_starts = setup.directory.join("steady-starts").display(),
    )
}

/// What the ingest accepted (202 from the hook, acknowledged by the Kafka broker),
/// each with whether it was accepted after the reload had returned.
#[derive(Default)]
struct Accepted {
    keys: Vec<(String, bool)>,
}

async fn admin_json(process: &Process, path: &str) -> serde_json::Value {
    reqwest::Client::new()
        .get(format!("http://{}{path}", process.admin()))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .map(|body| serde_json::from_slice(&body).unwrap())
        .unwrap()
}

async fn post_reload(process: &Process) -> (u16, serde_json::Value) {
    let response = reqwest::Client::new()
        .post(format!("http://{}/v1/reload", process.admin()))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body = response.bytes().await.unwrap();
    (status, serde_json::from_slice(&body).unwrap())
}

/// GETs a function URL of the `http` source; the handler answers with its pid and
/// memory.
async fn call_route(process: &Process, path: &str) -> (u16, serde_json::Value) {
    let response = reqwest::get(process.url(path)).await.unwrap();
    let status = response.status().as_u16();
    let body = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body)),
    )
}

fn pid_alive(pid: u64) -> bool {
    // A zombie is not running: /proc/<pid>/stat's state is `Z`.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit(')').next().map(|rest| rest.trim().to_owned()))
        .is_some_and(|rest| !rest.starts_with('Z'))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reload_while_events_flow_changes_what_it_says_and_loses_nothing() {
    let nats = NatsServer::start();
    let broker = KafkaBroker::start();
    let topic = random_name("orders");
    broker.create_topic(&topic, 2);
    let prefix = random_name("r");
    let main = FunctionServer::start(|received, _| {
        if refused(&key_of(&received.body)) {
            Reply::status(422)
        } else {
            Reply::ok()
        }
    })
    .await;
    let retired = FunctionServer::start(|_, _| Reply::ok()).await;
    let added = FunctionServer::start(|_, _| Reply::ok()).await;
    let directory = tempfile::tempdir().unwrap();
    let setup = Setup {
        nats: &nats,
        prefix: &prefix,
        brokers: broker.bootstrap(),
        topic: &topic,
        main: &main,
        retired: &retired,
        added: &added,
        directory: directory.path(),
    };
    let file = directory.path().join("switchyard.toml");
    std::fs::write(&file, config(&setup, false, "")).unwrap();
    let process = Process::start(&file, &[]);
    process.wait_ready().await;

    // Before: revision 1, `resized` at 128 MB, no route to `steady`.
    let functions = admin_json(&process, "/v1/functions").await;
    assert_eq!(functions["revision"]["number"], 1, "{functions}");
    let (status, before) = call_route(&process, "/resized").await;
    assert_eq!(status, 200, "{before}");
    assert_eq!(
        before["memory"].to_string().trim_matches('"'),
        "128",
        "{before}"
    );
    let old_resized_pid = before["pid"].as_u64().unwrap();
    let (status, _) = call_route(&process, "/steady").await;
    assert_eq!(status, 404, "no route to steady yet");
    // The warm instance of `steady` (min_instances = 1).
    let steady_starts = directory.path().join("steady-starts");
    let deadline = Instant::now() + WAIT;
    while std::fs::read_to_string(&steady_starts)
        .unwrap_or_default()
        .lines()
        .count()
        < 1
    {
        assert!(
            Instant::now() < deadline,
            "steady's warm instance did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let steady_pid: u64 = std::fs::read_to_string(&steady_starts)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .parse()
        .unwrap();

    // Events flow: the webhook and the Kafka topic, until told to stop.
    let accepted = Arc::new(Mutex::new(Accepted::default()));
    let reloaded = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = tokio_util::sync::CancellationToken::new();
    let hook_url = process.url("/hooks/orders");
    let hook_ingest = tokio::spawn({
        let (accepted, reloaded, stop) = (accepted.clone(), reloaded.clone(), stop.clone());
        async move {
            let client = reqwest::Client::new();
            let mut number = 0u64;
            while !stop.is_cancelled() {
                let key = format!("h-{number}");
                // Read before sending: an event counts as after the reload only if
                // the reload had returned before it was sent.
                let after = reloaded.load(std::sync::atomic::Ordering::SeqCst);
                let response = client
                    .post(&hook_url)
                    .header("content-type", "application/json")
                    .header("idempotency-key", &key)
                    .body(format!("\"{key}\""))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 202, "posting {key}");
                accepted.lock().unwrap().keys.push((key, after));
                number += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            number
        }
    });
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("message.timeout.ms", "120000")
        .create()
        .unwrap();
    let kafka_ingest = tokio::spawn({
        let (accepted, reloaded, stop, topic) = (
            accepted.clone(),
            reloaded.clone(),
            stop.clone(),
            topic.clone(),
        );
        async move {
            let mut number = 0u64;
            while !stop.is_cancelled() {
                let key = format!("k-{number}");
                let after = reloaded.load(std::sync::atomic::Ordering::SeqCst);
                producer
                    .send(
                        FutureRecord::to(&topic).key(&key).payload(&key),
                        Duration::from_secs(120),
                    )
                    .await
                    .map_err(|(error, _)| error)
                    .unwrap();
                accepted.lock().unwrap().keys.push((key, after));
                number += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            number
        }
    });
    main.wait_for(40, WAIT).await;
    assert!(
        !retired.received().is_empty() || retired.wait_for(1, WAIT).await.len() == 1,
        "the trigger to be removed delivers before the reload"
    );

    // The second version, through `switchyard reload` (the configuration's admin
    // address is port 0, so the CLI is told where the process listens).
    std::fs::write(&file, config(&setup, true, "")).unwrap();
    let admin = process.admin().to_string();
    let (ok, output) = tokio::task::spawn_blocking({
        let file = file.clone();
        move || run_cli(&file, &["reload", "--admin", &admin])
    })
    .await
    .unwrap();
    reloaded.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(ok, "switchyard reload failed:\n{output}");
    for change in [
        "trigger `retired` removed",
        "trigger `added` added",
        "function `resized` changed",
        "source `http`: routes and hooks changed",
        "reloaded: revision 2",
    ] {
        assert!(output.contains(change), "`{change}` not in:\n{output}");
    }
    assert!(
        !output.contains("function `steady`"),
        "steady did not change:\n{output}"
    );
    for path in ["/v1/functions", "/v1/triggers", "/v1/sources"] {
        let view = admin_json(&process, path).await;
        assert_eq!(view["revision"]["number"], 2, "{path}: {view}");
    }
    let triggers = admin_json(&process, "/v1/triggers").await;
    let names: HashSet<&str> = triggers["triggers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|trigger| trigger["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, HashSet::from(["main", "added"]), "{triggers}");
    let functions = admin_json(&process, "/v1/functions").await;
    let resized = functions["functions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|function| function["name"] == "resized")
        .unwrap_or_else(|| panic!("{functions}"));
    assert_eq!(resized["limits"]["memory_mb"], 256, "{functions}");
    assert_eq!(resized["limits"]["max_instances"], 4, "{functions}");
    // New invocations reach a new instance with the new memory; the old one stops.
    let (status, after) = call_route(&process, "/resized").await;
    assert_eq!(status, 200, "{after}");
    assert_eq!(
        after["memory"].to_string().trim_matches('"'),
        "256",
        "{after}"
    );
    assert_ne!(after["pid"].as_u64().unwrap(), old_resized_pid);
    let deadline = Instant::now() + WAIT;
    while pid_alive(old_resized_pid) {
        assert!(
            Instant::now() < deadline,
            "the replaced instance {old_resized_pid} still runs"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The new route answers, from steady's warm instance: same pid, no new start.
    let (status, steady) = call_route(&process, "/steady").await;
    assert_eq!(status, 200, "{steady}");
    assert_eq!(steady["pid"].as_u64(), Some(steady_pid), "{steady}");
    assert_eq!(
        std::fs::read_to_string(&steady_starts)
            .unwrap()
            .lines()
            .count(),
        1,
        "steady was not restarted"
    );

    // A broken edit: refused with its line, by the CLI and by the process; the
    // running state stays.
    let broken = config(&setup, true, "max_concurrency = \"lots\"");
    let broken_line = broken
        .lines()
        .position(|line| line.contains("\"lots\""))
        .unwrap()
        + 1;
    std::fs::write(&file, &broken).unwrap();
    let (ok, output) = tokio::task::spawn_blocking({
        let file = file.clone();
        move || run_cli(&file, &["reload"])
    })
    .await
    .unwrap();
    assert!(!ok, "a broken file must not reload:\n{output}");
    assert!(
        output.contains(&format!("switchyard.toml:{broken_line}")),
        "the CLI names the line {broken_line}:\n{output}"
    );
    let (status, refusal) = post_reload(&process).await;
    assert_eq!(status, 422, "{refusal}");
    assert_eq!(refusal["result"], "refused", "{refusal}");
    assert_eq!(refusal["revision"]["number"], 2, "{refusal}");
    let errors = refusal["errors"].to_string();
    assert!(
        errors.contains(&format!("switchyard.toml:{broken_line}"))
            && errors.contains("max_concurrency"),
        "the process names the line and field: {refusal}"
    );
    // A change that needs a restart: refused by name, nothing else applied.
    let needs_restart = config(&setup, true, "max_concurrency = 3")
        .replace("shutdown_grace = \"2s\"", "shutdown_grace = \"3s\"");
    std::fs::write(&file, &needs_restart).unwrap();
    let (status, refusal) = post_reload(&process).await;
    assert_eq!(status, 422, "{refusal}");
    assert!(
        refusal["errors"]
            .to_string()
            .contains("`[dispatcher]` changed"),
        "{refusal}"
    );
    let triggers = admin_json(&process, "/v1/triggers").await;
    let added_trigger = triggers["triggers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|trigger| trigger["name"] == "added")
        .unwrap();
    let added_concurrency_before = added_trigger["max_concurrency"].clone();

    // SIGHUP applies a valid edit.
    std::fs::write(&file, config(&setup, true, "max_concurrency = 3")).unwrap();
    process.signal(Signal::SIGHUP);
    let deadline = Instant::now() + WAIT;
    loop {
        let triggers = admin_json(&process, "/v1/triggers").await;
        if triggers["revision"]["number"] == 3 {
            let added_trigger = triggers["triggers"]
                .as_array()
                .unwrap()
                .iter()
                .find(|trigger| trigger["name"] == "added")
                .unwrap()
                .clone();
            assert_eq!(added_trigger["max_concurrency"], 3, "{triggers}");
            assert_ne!(added_concurrency_before, 3);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not reload: {triggers}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = reqwest::Client::new()
        .get(format!("http://{}/metrics", process.admin()))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (result, count) in [("applied", 2), ("refused", 2)] {
        let line = format!("switchyard_config_reloads_total{{result=\"{result}\"}} {count}");
        assert!(metrics.contains(&line), "`{line}` not in the metrics");
    }

    // Stop the ingest and let everything settle.
    main.wait_for(main.received().len() + 40, WAIT).await;
    stop.cancel();
    let hook_count = hook_ingest.await.unwrap();
    let kafka_count = kafka_ingest.await.unwrap();
    assert!(hook_count > 0 && kafka_count > 0);
    let accepted = std::mem::take(&mut accepted.lock().unwrap().keys);
    let accepted_keys: HashSet<String> = accepted.iter().map(|(key, _)| key.clone()).collect();
    assert_eq!(accepted_keys.len(), accepted.len());
    let deadline = Instant::now() + WAIT;
    loop {
        let received: HashSet<String> = main
            .received()
            .iter()
            .map(|call| key_of(&call.body))
            .collect();
        if accepted_keys.is_subset(&received) {
            break;
        }
        let missing: Vec<&String> = accepted_keys.difference(&received).take(10).collect();
        assert!(
            Instant::now() < deadline,
            "trigger main never delivered {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // accepted = delivered + dead-lettered, each called once.
    let mut calls: HashMap<String, usize> = HashMap::new();
    for call in main.received() {
        *calls.entry(key_of(&call.body)).or_default() += 1;
    }
    let repeated: Vec<(&String, &usize)> = calls.iter().filter(|(_, count)| **count > 1).collect();
    assert!(
        repeated.is_empty(),
        "delivered more than once: {repeated:?}"
    );
    assert_eq!(
        calls.len(),
        accepted_keys.len(),
        "no event the ingest did not send"
    );
    let expected_dead: HashSet<String> = accepted_keys
        .iter()
        .filter(|key| refused(key))
        .cloned()
        .collect();
    let mut dead = HashSet::new();
    let mut after = 0u64;
    loop {
        let page = admin_json(
            &process,
            &format!("/v1/dead-letters/main?after={after}&limit=1000"),
        )
        .await;
        for entry in page["dead_letters"].as_array().unwrap() {
            let event = &entry["event"];
            let data = match (event["data"].as_str(), event["data_base64"].as_str()) {
                (Some(text), _) => text.as_bytes().to_vec(),
                (None, Some(encoded)) => {
                    use base64::Engine as _;
                    base64::engine::general_purpose::STANDARD
                        .decode(encoded)
                        .unwrap()
                }
                _ => event["data"].to_string().into_bytes(),
            };
            dead.insert(key_of(&data));
        }
        match page["next_after"].as_u64() {
            Some(next) => after = next,
            None => break,
        }
    }
    assert_eq!(dead, expected_dead, "dead letters of trigger main");

    // The removed trigger took nothing accepted after the reload; the added one
    // delivered every such event once.
    let retired_keys: HashSet<String> = retired
        .received()
        .iter()
        .map(|call| key_of(&call.body))
        .collect();
    let after_reload: HashSet<String> = accepted
        .iter()
        .filter(|(_, after)| *after)
        .map(|(key, _)| key.clone())
        .collect();
    assert!(!after_reload.is_empty());
    let leaked: Vec<&String> = retired_keys.intersection(&after_reload).collect();
    assert!(
        leaked.is_empty(),
        "the removed trigger delivered {leaked:?}"
    );
    let deadline = Instant::now() + WAIT;
    loop {
        let mut added_calls: HashMap<String, usize> = HashMap::new();
        for call in added.received() {
            *added_calls.entry(key_of(&call.body)).or_default() += 1;
        }
        let got: HashSet<String> = added_calls.keys().cloned().collect();
        if after_reload.is_subset(&got) {
            let repeated: Vec<_> = added_calls
                .iter()
                .filter(|(_, count)| **count > 1)
                .collect();
            assert!(
                repeated.is_empty(),
                "the added trigger repeated {repeated:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the added trigger missed {:?}",
            after_reload.difference(&got).take(10).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Steady's warm instance lived through all of it.
    assert!(
        pid_alive(steady_pid),
        "steady's instance {steady_pid} was stopped"
    );
}

/// Two processes run one trigger; one reloads it with a filter on another event
/// type while the other still runs the old filter: events of the new type, which
/// the old filter does not take, are all delivered once (the process not reloaded
/// hands them back instead of settling them as filtered out, and stops pulling).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_changed_in_one_process_loses_nothing_to_a_process_not_reloaded_yet() {
    filter_change_in_one_process("", false).await;
}

/// The same for a batched trigger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batched_triggers_filter_changed_in_one_process_loses_nothing() {
    filter_change_in_one_process(r#"batch = { max_events = 5, window = "200ms" }"#, false).await;
}

/// The same for an ordered trigger. Its partitions are spread over the processes
/// and one process holds each: the partitions of the process not reloaded yet wait
/// for its reload (their events are kept, not handed back in a loop), so the test
/// reloads it too before counting, as a rolling reload does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordered_triggers_filter_changed_in_one_process_loses_nothing() {
    filter_change_in_one_process(r#"ordering = "key""#, true).await;
}

/// Starts two processes with trigger `typed` (plus `extra` lines) filtering one
/// event type, reloads the first with a filter on another type, sends 40 events of
/// the new type through both, reloads the second too when `reload_second`, and
/// checks every event is delivered exactly once.
async fn filter_change_in_one_process(extra: &str, reload_second: bool) {
    let nats = NatsServer::start();
    let function = FunctionServer::start(|_, _| Reply::ok()).await;
    let prefix = random_name("f");
    let upper = prefix.to_uppercase();
    let directory = tempfile::tempdir().unwrap();
    let text = |ty: &str| {
        format!(
            r#"[nats]
url = "{nats}"
subject_prefix = "{prefix}"
events_stream = {{ name = "{upper}_EVENTS", storage = "memory", duplicate_window = "1m" }}
dead_letter_stream = {{ name = "{upper}_DLQ", storage = "memory" }}

[admin]
listen = "127.0.0.1:0"
bearer_token = "{ADMIN_TOKEN}"

[log]
level = "${{SWITCHYARD_TEST_LOG:-warn}}"

[[sources]]
type = "http"
name = "http"
listen = "127.0.0.1:0"

[[functions]]
type = "http"
name = "f"
url = "{url}"

[[triggers]]
name = "typed"
function = "f"
max_concurrency = 8
filter = {{ type = {{ exact = "{ty}" }} }}
{extra}
"#,
            nats = nats.url(),
            url = function.url,
        )
    };
    let files: Vec<_> = ["a", "b"]
        .iter()
        .map(|name| {
            let file = directory.path().join(format!("{name}.toml"));
            std::fs::write(&file, text("com.example.old")).unwrap();
            file
        })
        .collect();
    let a = Process::start(&files[0], &[]);
    let b = Process::start(&files[1], &[]);
    a.wait_ready().await;
    b.wait_ready().await;
    // How often each event was part of a call (a batched call carries several).
    let counts = || {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for call in function.received() {
            if call.header("content-type") == Some("application/cloudevents-batch+json") {
                let events: Vec<serde_json::Value> = serde_json::from_slice(&call.body).unwrap();
                for event in events {
                    *counts
                        .entry(event["id"].as_str().unwrap().to_owned())
                        .or_default() += 1;
                }
            } else {
                *counts.entry(call.id().to_owned()).or_default() += 1;
            }
        }
        counts
    };
    let all_delivered = |ids: &[String], what: &str, deadline: Instant| {
        let counts = counts();
        if ids.iter().all(|id| counts.contains_key(id)) {
            return true;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} {what} delivered",
            ids.iter().filter(|id| counts.contains_key(*id)).count(),
            ids.len()
        );
        false
    };
    // Old-type events first, so both processes pull (an ordered trigger's partitions
    // are taken a moment after start, each by one process).
    let old: Vec<String> = (0..40).map(|number| format!("old-{number}")).collect();
    for (index, id) in old.iter().enumerate() {
        let door = if index % 2 == 0 { &a } else { &b };
        let response =
            common::post_event(&door.url("/v1/events"), id, "com.example.old", "x").await;
        assert_eq!(response.status(), 202);
    }
    let deadline = Instant::now() + WAIT;
    while !all_delivered(&old, "events of the old type", deadline) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    std::fs::write(&files[0], text("com.example.new")).unwrap();
    let (status, outcome) = post_reload(&a).await;
    assert_eq!(status, 200, "{outcome}");
    assert_eq!(outcome["result"], "applied", "{outcome}");

    // Events of the new type, through both processes' doors; B still runs the old
    // filter on the consumers A changed.
    let ids: Vec<String> = (0..40).map(|number| format!("new-{number}")).collect();
    for (index, id) in ids.iter().enumerate() {
        let door = if index % 2 == 0 { &a } else { &b };
        let response =
            common::post_event(&door.url("/v1/events"), id, "com.example.new", "x").await;
        assert_eq!(response.status(), 202);
    }
    if reload_second {
        // Until B reports the trigger superseded (it met one of the new events on a
        // partition it holds) or everything arrived through A's partitions.
        let deadline = Instant::now() + WAIT;
        loop {
            let body = reqwest::Client::new()
                .get(format!("http://{}/v1/triggers", b.admin()))
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            let triggers: serde_json::Value = serde_json::from_slice(&body).unwrap();
            if triggers["triggers"][0]["superseded"] == true
                || all_delivered(&ids, "events of the new type", deadline)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        std::fs::write(&files[1], text("com.example.new")).unwrap();
        let (status, outcome) = post_reload(&b).await;
        assert_eq!(status, 200, "{outcome}");
        assert_eq!(outcome["result"], "applied", "{outcome}");
    }
    let deadline = Instant::now() + WAIT;
    while !all_delivered(&ids, "events of the new type", deadline) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let counts = counts();
    for id in old.iter().chain(&ids) {
        assert_eq!(counts[id], 1, "{id} delivered more than once");
    }
}
