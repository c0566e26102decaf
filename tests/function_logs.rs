//! Function logs in the logs stream: what a Lambda handler (awslambdaric) prints and
//! the START / END / REPORT lines around each invocation, read back through
//! `GET /v1/functions/{name}/logs` (all, one invocation, following) and
//! `switchyard logs`.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{NatsServer, Process, installed};

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

[[functions]]
type = "lambda"
name = "hello"
command = ["{python}", "-m", "awslambdaric", "app.handler"]
handler = "app.handler"
directory = "{handlers}"
memory = 256

[[triggers]]
name = "jobs"
function = "hello"
"#,
        python = installed("SWITCHYARD_LAMBDA_PYTHON"),
        handlers = common::test_functions().join("python").display(),
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
            && one[3].ends_with("\tMemory Size: 256 MB\t"),
        "{}",
        one[3]
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
