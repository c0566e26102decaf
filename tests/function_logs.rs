//! Function logs in the logs stream: what a Lambda handler (awslambdaric) prints and
//! the START / END / REPORT lines around each invocation, read back through
//! `GET /v1/functions/{name}/logs` (all, one invocation, following) and
//! `switchyard logs`.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{NatsServer, Process};

const WAIT: Duration = Duration::from_secs(60);

/// The stored lines, as `GET /v1/functions/hello/logs` answers `query`.
async fn logs(process: &Process, query: &str) -> Vec<serde_json::Value> {
    let response = reqwest::get(admin(process, &format!("/v1/functions/hello/logs?{query}")))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/x-ndjson");
    response
        .text()
        .await
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

fn admin(process: &Process, path: &str) -> String {
    format!("http://{}{path}", process.admin())
}

fn messages(lines: &[serde_json::Value]) -> Vec<String> {
    lines
        .iter()
        .map(|line| line["message"].as_str().unwrap().to_owned())
        .collect()
}

async fn post_job(process: &Process, id: &str) {
    let response = reqwest::Client::new()
        .post(process.url("/hooks/jobs"))
        .header("content-type", "application/json")
        .header("idempotency-key", id)
        .body(r#"{"action":"echo"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
}

/// Waits until the stored lines hold `wanted` REPORT lines.
async fn wait_reports(process: &Process, wanted: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let lines = logs(process, "since=10m").await;
        let reports = messages(&lines)
            .iter()
            .filter(|message| message.starts_with("REPORT RequestId: "))
            .count();
        if reports >= wanted {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "{reports} of {wanted} invocations logged: {lines:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_handler_prints_and_lambdas_report_lines_are_stored_and_read_back() {
    let nats = NatsServer::start();
    let directory = tempfile::tempdir().unwrap();
    let file = directory.path().join("switchyard.toml");
    let mut text = common::base_config(&nats.url(), 0, 0);
    text.push_str(&format!(
        r#"
[[sources.hooks]]
name = "jobs"
event_type = "com.example.job"
id_header = "Idempotency-Key"

{hello}

[[triggers]]
name = "jobs"
function = "hello"
"#,
        hello = common::python_lambda("hello", "memory = 256"),
    ));
    std::fs::write(&file, text).unwrap();
    let process = Process::start(&file, &[]);
    process.wait_ready().await;

    // Following from now: what comes next arrives on the open answer.
    let mut followed = reqwest::get(admin(
        &process,
        "/v1/functions/hello/logs?since=1s&follow=true",
    ))
    .await
    .unwrap();
    assert_eq!(followed.status(), 200);

    for id in ["job-1", "job-2", "job-3"] {
        post_job(&process, id).await;
    }
    let lines = wait_reports(&process, 3).await;
    let all = messages(&lines);
    for id in ["job-1", "job-2", "job-3"] {
        assert!(
            all.iter()
                .any(|message| message == &format!("echoing {id}")),
            "{id} printed: {all:?}"
        );
    }
    // Each invocation: START, what it printed, END, REPORT, tagged with its request
    // id, in that order.
    let printed = lines
        .iter()
        .find(|line| line["message"] == "echoing job-2")
        .unwrap();
    assert_eq!(printed["function"], "hello");
    assert_eq!(printed["stream"], "stdout");
    assert!(printed["instance"].as_str().unwrap().starts_with("hello-"));
    let request_id = printed["request_id"].as_str().unwrap().to_owned();
    let one = logs(&process, &format!("since=10m&request_id={request_id}")).await;
    let one = messages(&one);
    assert_eq!(one.len(), 4, "{one:?}");
    assert_eq!(
        one[0],
        format!("START RequestId: {request_id} Version: $LATEST")
    );
    assert_eq!(one[1], "echoing job-2");
    assert_eq!(one[2], format!("END RequestId: {request_id}"));
    assert!(
        one[3].starts_with(&format!("REPORT RequestId: {request_id}\tDuration: "))
            && one[3].contains("\tBilled Duration: ")
            && one[3].contains("\tMemory Size: 256 MB\tMax Memory Used: "),
        "{}",
        one[3]
    );
    // What the instance has used at most: a python runtime takes some MB, never
    // more than the machine has.
    let used: u64 = one[3]
        .split("Max Memory Used: ")
        .nth(1)
        .and_then(|rest| rest.split(" MB").next())
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("{}", one[3]));
    assert!((1..64 * 1024).contains(&used), "{}", one[3]);

    // The process's own record of the invocations, newest first: the same request
    // ids, each a success, one cold start among them.
    let invocations: serde_json::Value = serde_json::from_str(
        &reqwest::get(admin(&process, "/v1/functions/hello/invocations"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    let invocations = invocations["invocations"].as_array().unwrap();
    assert_eq!(invocations.len(), 3, "{invocations:?}");
    assert!(
        invocations
            .iter()
            .all(|invocation| invocation["status"] == "success"
                && invocation["instance"]
                    .as_str()
                    .unwrap()
                    .starts_with("hello-")
                && invocation["duration_ms"].as_f64().unwrap() > 0.0
                && invocation.get("trace_id").is_none()),
        "{invocations:?}"
    );
    assert!(
        invocations
            .iter()
            .any(|invocation| invocation["request_id"] == request_id.as_str()),
        "{invocations:?}"
    );
    let functions: serde_json::Value = serde_json::from_str(
        &reqwest::get(admin(&process, "/v1/functions"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    let hello = &functions["functions"][0];
    assert_eq!(
        (&hello["invocations"], &hello["errors"]),
        (&3.into(), &0.into())
    );
    // The first invocation waited for an instance's init; none waited for more
    // inits than were made.
    let waited = invocations
        .iter()
        .filter(|invocation| invocation.get("init_duration_ms").is_some())
        .count() as u64;
    assert!(
        (1..=hello["cold_starts"].as_u64().unwrap()).contains(&waited),
        "{invocations:?}"
    );
    assert!(hello["recent_duration_ms"]["p50"].as_f64().unwrap() > 0.0);
    assert_eq!(
        reqwest::get(admin(&process, "/v1/functions/nothing/invocations"))
            .await
            .unwrap()
            .status(),
        404
    );

    // The open answer got the lines as they were stored.
    let mut received = String::new();
    let deadline = Instant::now() + WAIT;
    while !received.contains("echoing job-3") {
        let chunk = tokio::time::timeout_at(deadline.into(), followed.chunk())
            .await
            .expect("followed lines")
            .unwrap()
            .expect("the answer goes on");
        received.push_str(&String::from_utf8_lossy(&chunk));
    }

    // The command line reads the same stream.
    let output = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args([
            "logs",
            "hello",
            "--request-id",
            &request_id,
            "--json",
            "--config",
        ])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let printed: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(messages(&printed), one);

    // A name that cannot be a function's is refused, not searched.
    let refused = reqwest::get(admin(&process, "/v1/functions/a.b/logs"))
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
}

/// A function printing as fast as it can (60,000 lines of about 130 bytes) beside a
/// quiet one: every invocation of the quiet one answers and every line it printed
/// is stored, the logs stream stays within its `max_bytes` by dropping its oldest
/// lines, and the noisy function's lines are counted (stored, and left out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_noisy_function_does_not_push_out_the_lines_of_a_quiet_one() {
    const MAX_BYTES: u64 = 4 * 1024 * 1024;
    let nats = NatsServer::start();
    let directory = tempfile::tempdir().unwrap();
    let file = directory.path().join("switchyard.toml");
    let text = common::base_config(&nats.url(), 0, 0).replacen(
        "\n[admin]",
        &format!("logs_stream = {{ max_bytes = {MAX_BYTES} }}\n\n[admin]"),
        1,
    );
    assert!(text.contains("logs_stream"));
    let mut text = text;
    text.push_str(&format!(
        r#"
[[sources.hooks]]
name = "jobs"
event_type = "com.example.job"
id_header = "Idempotency-Key"

[[sources.hooks]]
name = "noise"
event_type = "com.example.noise"
id_header = "Idempotency-Key"

{hello}

{noisy}

[[triggers]]
name = "jobs"
function = "hello"
filter = {{ type = {{ exact = "com.example.job" }} }}

[[triggers]]
name = "noise"
function = "noisy"
filter = {{ type = {{ exact = "com.example.noise" }} }}
"#,
        hello = common::python_lambda("hello", ""),
        noisy = common::python_lambda("noisy", "timeout = \"60s\""),
    ));
    std::fs::write(&file, text).unwrap();
    // Switchyard's own log, at level info: it carries every line functions print.
    let own_log = directory.path().join("switchyard.log");
    let process = Process::start_logged(
        &file,
        &[("SWITCHYARD_TEST_LOG", "info".to_owned())],
        &own_log,
    );
    process.wait_ready().await;

    let client = reqwest::Client::new();
    for id in ["noise-1", "noise-2", "noise-3"] {
        let response = client
            .post(process.url("/hooks/noise"))
            .header("content-type", "application/json")
            .header("idempotency-key", id)
            .body(r#"{"action":"spam","lines":20000}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
    }
    let jobs: Vec<String> = (0..10).map(|number| format!("job-{number}")).collect();
    for id in &jobs {
        post_job(&process, id).await;
    }
    let lines = wait_reports(&process, jobs.len()).await;
    let printed = messages(&lines);
    for id in &jobs {
        assert!(
            printed.contains(&format!("echoing {id}")),
            "{id}'s line was not stored: {printed:?}"
        );
    }

    // The noisy invocations end (their REPORT lines are not held to its share).
    let deadline = Instant::now() + WAIT;
    loop {
        let response = reqwest::get(admin(&process, "/v1/functions/noisy/logs?since=10m"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if response.matches("REPORT RequestId: ").count() >= 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the noisy invocations did not end"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let metrics = admin(&process, "/metrics");
    let stored = common::metric_at(
        &metrics,
        "switchyard_function_log_lines_total{function=\"noisy\"}",
    )
    .await;
    let dropped = common::metric_at(
        &metrics,
        "switchyard_function_log_lines_dropped_total{function=\"noisy\"}",
    )
    .await;
    // 60,000 printed lines and 9 of Lambda's.
    assert!(
        stored + dropped >= 60_009.0,
        "stored {stored} + dropped {dropped}"
    );
    // The stream kept within its limit, dropping its oldest lines.
    let bus = {
        let config = switchyard::config::load(&file).unwrap();
        switchyard_bus::Bus::connect(&config.nats).await.unwrap()
    };
    let mut stream = bus.jetstream().get_stream(bus.logs_stream()).await.unwrap();
    let state = stream.info().await.unwrap().state.clone();
    assert!(state.bytes <= MAX_BYTES, "{} bytes stored", state.bytes);
    // Each stored line takes more than 150 bytes (its JSON): more than the limit's
    // worth stored means the oldest went.
    if stored * 150.0 > MAX_BYTES as f64 {
        assert!(
            state.first_sequence > 1,
            "nothing was dropped to keep within the limit: {state:?}"
        );
    }

    // Switchyard's own log lost nothing: every line both functions printed (also
    // those left out of the stream), and its own lines (instances ready, the lines
    // left out counted).
    drop(process);
    let own = std::fs::read_to_string(&own_log).unwrap();
    // Each printed line `spam <id> <number> xxx...` once.
    let mut noisy_lines = std::collections::HashSet::new();
    for line in own.lines() {
        if let Some(rest) = line.split("spam noise-").nth(1) {
            let mut words = rest.split(' ');
            let (id, number) = (words.next().unwrap(), words.next().unwrap());
            assert!(
                noisy_lines.insert(format!("noise-{id} {number}")),
                "logged twice: {line}"
            );
        }
    }
    for id in ["noise-1", "noise-2", "noise-3"] {
        for number in 0..20_000 {
            let line = format!("{id} {number}");
            assert!(
                noisy_lines.contains(&line),
                "`spam {line}` is not in switchyard's log"
            );
        }
    }
    assert_eq!(noisy_lines.len(), 60_000);
    for id in &jobs {
        assert!(own.contains(&format!("echoing {id}")), "{id}");
    }
    for function in ["hello", "noisy"] {
        assert!(
            own.lines()
                .any(|line| line.contains("instance ready") && line.contains(function)),
            "no `instance ready` of {function} in switchyard's log"
        );
    }
    if dropped > 0.0 {
        assert!(
            own.contains("function log lines are printed faster than the logs stream stores them")
        );
    }
}

/// Lines are stored in NATS, not on the host that ran the function: a second
/// Switchyard process that runs no function reads what the first one's instances
/// printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_reads_the_lines_another_hosts_functions_printed() {
    let nats = NatsServer::start();
    let prefix = common::random_name("t");
    let directory = tempfile::tempdir().unwrap();
    let runner_file = directory.path().join("runner.toml");
    let mut runner = common::base_config_prefixed(&nats.url(), &prefix, 0, 0);
    runner.push_str(&format!(
        r#"
[[sources.hooks]]
name = "jobs"
event_type = "com.example.job"
id_header = "Idempotency-Key"

{hello}

[[triggers]]
name = "jobs"
function = "hello"
"#,
        hello = common::python_lambda("hello", ""),
    ));
    std::fs::write(&runner_file, runner).unwrap();
    let reader_file = directory.path().join("reader.toml");
    std::fs::write(
        &reader_file,
        common::base_config_prefixed(&nats.url(), &prefix, 0, 0),
    )
    .unwrap();
    let running = Process::start(&runner_file, &[]);
    running.wait_ready().await;
    let reading = Process::start(&reader_file, &[]);
    reading.wait_ready().await;

    for id in ["job-a", "job-b"] {
        post_job(&running, id).await;
    }
    // Read through the process that runs nothing.
    let lines = wait_reports(&reading, 2).await;
    let printed = messages(&lines);
    for id in ["job-a", "job-b"] {
        assert!(printed.contains(&format!("echoing {id}")), "{printed:?}");
    }
    let request_ids: std::collections::HashSet<&str> = lines
        .iter()
        .filter_map(|line| line["request_id"].as_str())
        .collect();
    assert_eq!(request_ids.len(), 2, "{lines:?}");
}
