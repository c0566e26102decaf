//! Managed `lambda` functions end to end, against a real nats-server and AWS's own
//! Python runtime interface client (awslambdaric, installed by
//! scripts/install-deps.sh): handlers written for Lambda, run unchanged, started on
//! demand, scaled with load and to zero, killed on timeouts, retried after crashes.
//! Function processes are counted in the process table (`/proc`), by the function
//! name Lambda's environment gives them.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{NatsServer, Switchyard, WAIT, base_config, random_name, wait_for_dead_letters};
use futures::StreamExt;
use switchyard_bus::async_nats;

/// The Python that has awslambdaric (set by scripts/env.sh).
fn lambda_python() -> String {
    let python = std::env::var("SWITCHYARD_LAMBDA_PYTHON").unwrap_or_else(|_| {
        panic!("SWITCHYARD_LAMBDA_PYTHON is not set: run the tests through scripts/test.sh (it installs awslambdaric)")
    });
    assert!(
        Path::new(&python).exists(),
        "{python} does not exist: run scripts/install-deps.sh"
    );
    python
}

/// The test handlers' directory.
fn handlers() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/functions/python")
}

/// Processes whose environment names `function` as their Lambda function (its
/// instances and anything they started).
fn function_processes(function: &str) -> Vec<i32> {
    let needle = format!("AWS_LAMBDA_FUNCTION_NAME={function}");
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(environment) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        // A zombie's environment reads empty: it is not running.
        if environment
            .split(|byte| *byte == 0)
            .any(|variable| variable == needle.as_bytes())
        {
            found.push(pid);
        }
    }
    found
}

/// Waits (bounded) until `function` has no process left.
async fn wait_no_processes(function: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let left = function_processes(function);
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "function `{function}` still has processes {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The pids in a starts file (one line per instance started).
fn starts(file: &Path) -> Vec<String> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A `lambda` function section running `module.handler` of the test handlers.
fn lambda_function(name: &str, module: &str, extra: &str, starts_file: &Path) -> String {
    format!(
        r#"
[[functions]]
type = "lambda"
name = "{name}"
command = ["{python}", "-m", "awslambdaric", "{module}.handler"]
handler = "{module}.handler"
directory = "{directory}"
environment = {{ STARTS_FILE = "{starts}" }}
{extra}
"#,
        python = lambda_python(),
        directory = handlers().display(),
        starts = starts_file.display(),
    )
}

/// A webhook the tests post to: its JSON body is the event's data.
const HOOK: &str = r#"
[[sources.hooks]]
name = "jobs"
event_type = "com.example.job"
id_header = "Idempotency-Key"
"#;

async fn post_job(switchyard: &Switchyard, id: &str, body: serde_json::Value) {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    let response = CLIENT
        .get_or_init(reqwest::Client::new)
        .post(switchyard.url("/hooks/jobs"))
        .header("content-type", "application/json")
        .header("idempotency-key", id)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202, "posting job {id}");
}

/// A runtime client and the test handler written for it.
struct Runtime {
    name: &'static str,
    /// The `[[functions]]` lines that run the handler: command, handler, directory.
    function: String,
    /// The dead letter's error when the handler raises with value `x`.
    raised: &'static str,
}

fn python_runtime() -> Runtime {
    Runtime {
        name: "python",
        function: format!(
            "command = [\"{}\", \"-m\", \"awslambdaric\", \"app.handler\"]\nhandler = \"app.handler\"\ndirectory = \"{}\"",
            lambda_python(),
            handlers().display()
        ),
        raised: "ValueError: bad input: x",
    }
}

fn node_runtime() -> Runtime {
    let ric = std::env::var("SWITCHYARD_LAMBDA_NODE_RIC").unwrap_or_else(|_| {
        panic!("SWITCHYARD_LAMBDA_NODE_RIC is not set: run the tests through scripts/test.sh (it installs aws-lambda-ric)")
    });
    assert!(
        Path::new(&ric).exists(),
        "{ric} does not exist: run scripts/install-deps.sh"
    );
    Runtime {
        name: "node",
        function: format!(
            "command = [\"node\", \"{ric}\", \"index.handler\"]\nhandler = \"index.handler\"\ndirectory = \"{}\"",
            handlers().join("../node").display()
        ),
        raised: "TypeError: bad input: x",
    }
}

fn rust_runtime() -> Runtime {
    let binary = std::env::var("SWITCHYARD_LAMBDA_RUST").unwrap_or_else(|_| {
        panic!("SWITCHYARD_LAMBDA_RUST is not set: run the tests through scripts/test.sh (it builds examples/lambda-rust)")
    });
    assert!(
        Path::new(&binary).exists(),
        "{binary} does not exist: run scripts/test.sh"
    );
    Runtime {
        name: "rust",
        function: format!("command = [\"{binary}\"]\nhandler = \"bootstrap\""),
        raised: "BadInput: bad input: x",
    }
}

/// The handler answers a webhook's event, its answer reaches `on_success`, and when
/// it raises, the dead letter carries its error type and message after the
/// configured attempts; from zero processes and back to zero.
async fn handler_round_trip(runtime: Runtime) {
    let Fixture {
        nats,
        directory: _directory,
        starts_file,
        function,
        results,
        answers: mut result_messages,
        _client,
        ..
    } = Fixture::new(runtime.name).await;
    let mut text = base_config(&nats.url(), 0, 0);
    text.push_str(HOOK);
    text.push_str(&format!(
        r#"
[[functions]]
type = "lambda"
name = "{function}"
{runtime}
environment = {{ STARTS_FILE = "{starts}" }}
memory = 256
idle_timeout = "1s"
timeout = "10s"

[[triggers]]
name = "main"
function = "{function}"
retry = {{ policy = "fixed", initial = "50ms", attempts = 2, jitter = false }}
on_success = {{ type = "nats", subject = "{results}" }}
"#,
        runtime = runtime.function,
        starts = starts_file.display(),
    ));
    let switchyard = Switchyard::start(text).await;
    // Scaled to zero before the first event: no process at all.
    assert!(function_processes(&function).is_empty());
    let status = switchyard.admin_json("/v1/functions").await;
    assert_eq!(status["functions"][0]["name"], function.as_str());
    assert_eq!(status["functions"][0]["type"], "lambda");
    assert_eq!(status["functions"][0]["cold_starts"], 0);

    post_job(
        &switchyard,
        "job-1",
        serde_json::json!({"action": "echo", "order": 42}),
    )
    .await;
    let result = tokio::time::timeout(WAIT, result_messages.next())
        .await
        .expect("the handler's answer reached on_success")
        .unwrap();
    let headers = result.headers.unwrap();
    assert_eq!(headers.get("ce-id").unwrap().as_str(), "job-1");
    let answer: serde_json::Value = serde_json::from_slice(&result.payload).unwrap();
    assert_eq!(answer["echo"]["order"], 42, "{answer}");
    assert_eq!(answer["event_id"], "job-1");
    // What Lambda's context gives the handler, from the environment and headers.
    assert_eq!(answer["function"], function.as_str());
    assert_eq!(answer["memory"].to_string().trim_matches('"'), "256");
    assert_eq!(
        answer["arn"],
        format!("arn:aws:lambda:us-east-1:000000000000:function:{function}").as_str()
    );
    assert_eq!(
        starts(&starts_file).len(),
        1,
        "one cold start for one event"
    );

    // A handler that raises: a failed attempt each time, then the dead letter with
    // the runtime's error type and message.
    post_job(
        &switchyard,
        "job-2",
        serde_json::json!({"action": "raise", "value": "x"}),
    )
    .await;
    let bus = switchyard.bus().await;
    let dead = wait_for_dead_letters(&bus, "main", 1, WAIT).await;
    assert_eq!(dead[0].dead_letter.event.id, "job-2");
    assert_eq!(dead[0].dead_letter.attempts, 2);
    assert_eq!(dead[0].dead_letter.last_error, runtime.raised);

    let status = switchyard.admin_json("/v1/functions").await;
    assert!(status["functions"][0]["cold_starts"].as_u64().unwrap() >= 1);
    assert_eq!(status["functions"][0]["limits"]["memory_mb"], 256);
    // Idle past idle_timeout: scaled back to zero.
    wait_no_processes(&function, WAIT).await;
    switchyard.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_handler_on_awslambdaric_answers_a_webhook_and_its_errors_reach_the_dead_letter() {
    handler_round_trip(python_runtime()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_handler_on_aws_lambda_ric_answers_a_webhook_and_its_errors_reach_the_dead_letter() {
    handler_round_trip(node_runtime()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_handler_on_lambda_runtime_answers_a_webhook_and_its_errors_reach_the_dead_letter() {
    handler_round_trip(rust_runtime()).await;
}

/// What every test starts with: a nats-server, a directory (with the file the
/// handlers append their starts to), a function name, and a subscription to the
/// subject its trigger publishes answers to.
struct Fixture {
    nats: NatsServer,
    directory: tempfile::TempDir,
    starts_file: PathBuf,
    function: String,
    results: String,
    answers: async_nats::Subscriber,
    _client: async_nats::Client,
}

impl Fixture {
    async fn new(prefix: &str) -> Fixture {
        let nats = NatsServer::start();
        let directory = tempfile::tempdir().unwrap();
        let results = random_name("results");
        let client = async_nats::connect(nats.url()).await.unwrap();
        let answers = client.subscribe(results.clone()).await.unwrap();
        Fixture {
            starts_file: directory.path().join("starts"),
            function: random_name(prefix),
            nats,
            directory,
            results,
            answers,
            _client: client,
        }
    }
}

/// Collects answers on `results` until `count` distinct events answered (bounded).
async fn collect_results(
    results: &mut async_nats::Subscriber,
    count: usize,
) -> std::collections::HashMap<String, serde_json::Value> {
    let mut answers = std::collections::HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while answers.len() < count {
        let message = tokio::time::timeout_at(deadline, results.next())
            .await
            .unwrap_or_else(|_| panic!("{} of {count} answers arrived", answers.len()))
            .unwrap();
        let id = message
            .headers
            .as_ref()
            .unwrap()
            .get("ce-id")
            .unwrap()
            .to_string();
        answers.insert(id, serde_json::from_slice(&message.payload).unwrap());
    }
    answers
}

/// Configuration with one lambda function and a trigger publishing its answers to
/// `results`.
fn config_with(
    nats: &NatsServer,
    function: &str,
    module: &str,
    function_extra: &str,
    trigger_extra: &str,
    starts_file: &Path,
    results: &str,
) -> String {
    let mut text = base_config(&nats.url(), 0, 0);
    text.push_str(HOOK);
    text.push_str(&lambda_function(
        function,
        module,
        function_extra,
        starts_file,
    ));
    text.push_str(&format!(
        r#"
[[triggers]]
name = "main"
function = "{function}"
on_success = {{ type = "nats", subject = "{results}" }}
{trigger_extra}
"#
    ));
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_scale_up_to_max_concurrency_with_load_and_back_to_zero() {
    let Fixture {
        nats,
        directory: _directory,
        starts_file,
        function,
        results,
        mut answers,
        _client,
        ..
    } = Fixture::new("scale").await;
    let text = config_with(
        &nats,
        &function,
        "app",
        "max_concurrency = 8\nidle_timeout = \"2s\"\ntimeout = \"20s\"",
        "max_concurrency = 32",
        &starts_file,
        &results,
    );
    let switchyard = Switchyard::start(text).await;
    assert!(function_processes(&function).is_empty());

    // The process table, sampled while the load runs: never more than 8.
    let sampling = tokio_util::sync::CancellationToken::new();
    let sampler = {
        let function = function.clone();
        let stop = sampling.clone();
        tokio::spawn(async move {
            let mut peak = 0;
            while !stop.is_cancelled() {
                peak = peak.max(function_processes(&function).len());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            peak
        })
    };
    for index in 0..100 {
        post_job(
            &switchyard,
            &format!("slow-{index}"),
            serde_json::json!({"action": "sleep", "seconds": 0.2}),
        )
        .await;
    }
    let answered = collect_results(&mut answers, 100).await;
    sampling.cancel();
    let peak = sampler.await.unwrap();
    assert_eq!(answered.len(), 100);
    let pids: std::collections::HashSet<String> = answered
        .values()
        .map(|answer| answer["pid"].to_string())
        .collect();
    // Exactly 8 instances started, and they served every event.
    assert_eq!(starts(&starts_file).len(), 8, "{:?}", starts(&starts_file));
    assert_eq!(pids.len(), 8);
    assert!(peak <= 8, "{peak} function processes at once");
    let status = switchyard.admin_json("/v1/functions").await;
    assert_eq!(status["functions"][0]["cold_starts"], 8);
    wait_no_processes(&function, WAIT).await;
    let status = switchyard.admin_json("/v1/functions").await;
    assert_eq!(status["functions"][0]["instances"]["idle"], 0);
    assert_eq!(status["functions"][0]["instances"]["busy"], 0);
    switchyard.stop().await;
}

/// Whether process `pid` is gone (or a zombie nobody reaped yet: not running).
fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_instance_dies_with_its_children_and_the_retry_gets_a_fresh_one() {
    let Fixture {
        nats,
        directory,
        starts_file,
        function,
        results,
        mut answers,
        _client,
        ..
    } = Fixture::new("hang").await;
    let marker = directory.path().join("hung");
    let text = config_with(
        &nats,
        &function,
        "app",
        "timeout = \"1s\"",
        r#"retry = { policy = "fixed", initial = "50ms", attempts = 3, jitter = false }"#,
        &starts_file,
        &results,
    );
    let switchyard = Switchyard::start(text).await;
    post_job(
        &switchyard,
        "hangs",
        serde_json::json!({"action": "hang_once", "marker": marker}),
    )
    .await;
    let answered = collect_results(&mut answers, 1).await;
    assert_eq!(answered["hangs"]["recovered"], true);
    // Two instances: the one killed at the deadline, and a fresh one for the retry.
    let started = starts(&starts_file);
    assert_eq!(started.len(), 2, "{started:?}");
    assert_ne!(answered["hangs"]["pid"].to_string(), started[0]);
    // The child the first instance started died with it (its process group).
    let child: i32 = std::fs::read_to_string(&marker)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while !gone(child) {
        assert!(
            Instant::now() < deadline,
            "child {child} outlived its instance"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(gone(started[0].parse().unwrap()));
    assert_eq!(
        switchyard
            .metric("switchyard_function_timeouts_total")
            .await,
        1.0
    );
    switchyard.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_that_exits_mid_invocation_is_retried_on_a_fresh_instance() {
    let Fixture {
        nats,
        directory,
        starts_file,
        function,
        results,
        mut answers,
        _client,
        ..
    } = Fixture::new("exit").await;
    let marker = directory.path().join("exited");
    let text = config_with(
        &nats,
        &function,
        "app",
        "",
        r#"retry = { policy = "fixed", initial = "50ms", attempts = 3, jitter = false }"#,
        &starts_file,
        &results,
    );
    let switchyard = Switchyard::start(text).await;
    post_job(
        &switchyard,
        "exits",
        serde_json::json!({"action": "exit_once", "marker": marker}),
    )
    .await;
    let answered = collect_results(&mut answers, 1).await;
    assert_eq!(answered["exits"]["survived"], true);
    assert_eq!(starts(&starts_file).len(), 2);
    assert_eq!(
        switchyard.metric("switchyard_function_crashes_total").await,
        1.0
    );
    switchyard.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_init_error_fails_attempts_without_a_cold_start_storm() {
    let Fixture {
        nats,
        directory: _directory,
        starts_file,
        function,
        results,
        _client,
        ..
    } = Fixture::new("broken").await;
    let text = config_with(
        &nats,
        &function,
        "broken",
        "max_cold_starts = 2",
        r#"retry = { policy = "fixed", initial = "50ms", attempts = 3, jitter = false }"#,
        &starts_file,
        &results,
    );
    let switchyard = Switchyard::start(text).await;
    let began = Instant::now();
    for index in 0..5 {
        post_job(
            &switchyard,
            &format!("doomed-{index}"),
            serde_json::json!({}),
        )
        .await;
    }
    let bus = switchyard.bus().await;
    let dead = wait_for_dead_letters(&bus, "main", 5, WAIT).await;
    for entry in &dead {
        assert_eq!(entry.dead_letter.attempts, 3);
        assert!(
            entry
                .dead_letter
                .last_error
                .contains("missing configuration: DATABASE_URL is not set"),
            "{}",
            entry.dead_letter.last_error
        );
    }
    // 15 failed attempts, but not 15 starts: the first wave (at most
    // max_cold_starts = 2), then one probe at a time after pauses of 1s, 2s, 4s...
    // (less up to a fifth of jitter). So within T seconds, at most 2 + (probes due by
    // then: 0.8 * (2^k - 1) <= T) + 1.
    let elapsed = began.elapsed().as_secs_f64();
    let probes = (elapsed / 0.8 + 1.0).log2().floor() as usize;
    let started = starts(&starts_file).len();
    assert!(
        started >= 1 && started <= 2 + probes + 1,
        "{started} starts for 15 attempts in {elapsed:.1}s"
    );
    let status = switchyard.admin_json("/v1/functions").await;
    let error = &status["functions"][0]["last_init_error"];
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("DATABASE_URL is not set"),
        "{status}"
    );
    assert!(status["functions"][0]["init_failures"].as_u64().unwrap() >= 1);
    // The CLI shows it too.
    let (ok, table) = common::run_cli(
        Path::new("/nonexistent.toml"),
        &["functions", "--admin", &switchyard.admin.to_string()],
    );
    assert!(ok, "{table}");
    assert!(table.contains(&function), "{table}");
    assert!(table.contains("failing to start"), "{table}");
    assert!(table.contains("DATABASE_URL is not set"), "{table}");
    wait_no_processes(&function, WAIT).await;
    switchyard.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_do_not_outlive_a_killed_switchyard_and_every_event_is_delivered() {
    use nix::sys::signal::Signal;
    let Fixture {
        nats,
        directory,
        starts_file,
        function,
        results,
        mut answers,
        _client,
        ..
    } = Fixture::new("killed").await;
    let marker = directory.path().join("child");
    let text = config_with(
        &nats,
        &function,
        "app",
        "max_concurrency = 4\ntimeout = \"20s\"",
        "ack_wait = \"2s\"",
        &starts_file,
        &results,
    );
    let config = common::write_config(directory.path(), &text);
    let first = common::Process::start(&config, &[]);
    first.wait_ready().await;
    let client_http = reqwest::Client::new();
    let post = |id: String, body: serde_json::Value, url: String| {
        let client = client_http.clone();
        async move {
            let response = client
                .post(url)
                .header("content-type", "application/json")
                .header("idempotency-key", &id)
                .body(body.to_string())
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 202, "posting {id}");
        }
    };
    post(
        "spawner".to_owned(),
        serde_json::json!({"action": "spawn_then_sleep", "marker": marker, "seconds": 1.0}),
        first.url("/hooks/jobs"),
    )
    .await;
    for index in 0..9 {
        post(
            format!("work-{index}"),
            serde_json::json!({"action": "sleep", "seconds": 1.0}),
            first.url("/hooks/jobs"),
        )
        .await;
    }
    // Instances at work, one of them with a child of its own.
    let deadline = Instant::now() + WAIT;
    while !marker.exists() || function_processes(&function).len() < 2 {
        assert!(Instant::now() < deadline, "no instance started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let child: i32 = loop {
        if let Ok(pid) = std::fs::read_to_string(&marker)
            && let Ok(pid) = pid.trim().parse()
        {
            break pid;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut first = first;
    first.signal(Signal::SIGKILL);
    first.wait_exit().await;
    // The instances die with Switchyard (parent-death signal)... (The child may be
    // gone already: any Switchyard starting on the machine, another test's
    // included, reaps it.)
    let deadline = Instant::now() + WAIT;
    while !function_processes(&function)
        .iter()
        .all(|pid| *pid == child)
    {
        assert!(
            Instant::now() < deadline,
            "left after the kill: {:?} (child {child})",
            function_processes(&function)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ...and what they forked is reaped by the next Switchyard to start (at the
    // latest).
    let second = common::Process::start(&config, &[]);
    second.wait_ready().await;
    let deadline = Instant::now() + WAIT;
    while !gone(child) {
        assert!(
            Instant::now() < deadline,
            "orphan {child} not reaped on restart"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Every event delivered (those in flight at the kill, again).
    let answered = collect_results(&mut answers, 10).await;
    assert!(answered.contains_key("spawner"));
    for index in 0..9 {
        assert!(answered.contains_key(&format!("work-{index}")));
    }
    drop(second);
    wait_no_processes(&function, WAIT).await;
}

/// A process a test watches: its pid and start time, which tell it from a later
/// process that reuses the pid.
#[derive(Debug, Clone, Copy)]
struct Watched {
    pid: i32,
    start: u64,
}

/// State (field 3) and start time (field 22) of `/proc/<pid>/stat`.
fn state_and_start(pid: i32) -> Option<(String, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count from its end.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    Some((fields.first()?.to_string(), fields.get(19)?.parse().ok()?))
}

impl Watched {
    /// Process `pid`, if it runs.
    fn new(pid: i32) -> Option<Watched> {
        let watched = state_and_start(pid).map(|(_, start)| Watched { pid, start })?;
        watched.running().then_some(watched)
    }

    /// The same process, still running (a zombie has ended).
    fn running(&self) -> bool {
        state_and_start(self.pid)
            .is_some_and(|(state, start)| start == self.start && state != "Z" && state != "X")
    }
}

/// SIGKILLs whatever of its processes still runs when dropped: a failed test leaves
/// no `sleep 600` behind.
struct KillOnDrop(Vec<Watched>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for process in &self.0 {
            if process.running() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(process.pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// The cgroup directories of `function`'s instances in every cgroup hierarchy mounted
/// (`<mount>/switchyard/<owner>/<function>-<n>`).
fn instance_cgroups(function: &str) -> Vec<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let prefix = format!("{function}-");
    let mut found = Vec::new();
    for line in mounts.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 3 || !matches!(fields[2], "cgroup" | "cgroup2") {
            continue;
        }
        let Ok(owners) = std::fs::read_dir(Path::new(fields[1]).join("switchyard")) else {
            continue;
        };
        for owner in owners.flatten() {
            let Ok(instances) = std::fs::read_dir(owner.path()) else {
                continue;
            };
            found.extend(
                instances
                    .flatten()
                    .filter(|instance| instance.file_name().to_string_lossy().starts_with(&prefix))
                    .map(|instance| instance.path()),
            );
        }
    }
    found
}

/// What `/v1/functions` of a `switchyard run` process says its instances' isolation is.
async fn isolation_of(switchyard: &common::Process) -> String {
    let body = reqwest::get(format!("http://{}/v1/functions", switchyard.admin()))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&body).unwrap();
    status["functions"][0]["isolation"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Runs a `switchyard run` process (`workers` added to its configuration) whose
/// instance starts `sleep 600` children every way a program can (`spawn_family`: in
/// its process group, in a session of their own, double-forked, most without the
/// owner mark), SIGKILLs that process while the invocation runs, and waits (at most
/// 10 s, no other Switchyard started) until the instance and every child are gone,
/// and so are the instance's cgroups. Returns the isolation that was in effect.
async fn a_killed_switchyard_takes_everything_its_instance_started(workers: &str) -> String {
    use nix::sys::signal::Signal;
    let Fixture {
        nats,
        directory,
        starts_file,
        function,
        results,
        _client,
        ..
    } = Fixture::new("family").await;
    let pids_file = directory.path().join("pids");
    let mut text = config_with(
        &nats,
        &function,
        "app",
        "timeout = \"600s\"",
        "",
        &starts_file,
        &results,
    );
    text.push_str(workers);
    let config = common::write_config(directory.path(), &text);
    let mut switchyard = common::Process::start(&config, &[]);
    switchyard.wait_ready().await;
    let response = reqwest::Client::new()
        .post(switchyard.url("/hooks/jobs"))
        .header("content-type", "application/json")
        .header("idempotency-key", "family")
        .body(
            serde_json::json!({"action": "spawn_family", "pids": pids_file, "seconds": 600})
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let deadline = Instant::now() + WAIT;
    let pids: Vec<i32> = loop {
        if let Ok(text) = std::fs::read_to_string(&pids_file) {
            break text.lines().map(|line| line.parse().unwrap()).collect();
        }
        assert!(
            Instant::now() < deadline,
            "the handler did not write its children's pids"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // The instance and its four children, all running now.
    assert_eq!(pids.len(), 5, "{pids:?}");
    let family = KillOnDrop(
        pids.iter()
            .map(|pid| {
                Watched::new(*pid).unwrap_or_else(|| panic!("{pid} of {pids:?} is not running"))
            })
            .collect(),
    );
    // The children are the sleeps (a double-forking shell names its child before the
    // child has exec'd `sleep`).
    let deadline = Instant::now() + WAIT;
    while let Some(child) = pids[1..].iter().find(|child| {
        std::fs::read_to_string(format!("/proc/{child}/comm"))
            .is_ok_and(|command| command.trim() != "sleep")
    }) {
        assert!(Instant::now() < deadline, "child {child} is not a sleep");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(family.0.iter().all(Watched::running), "{pids:?}");
    let isolation = isolation_of(&switchyard).await;
    let cgroups = instance_cgroups(&function);
    assert_eq!(
        cgroups.is_empty(),
        isolation.starts_with("process-group"),
        "{isolation}: {cgroups:?}"
    );

    switchyard.signal(Signal::SIGKILL);
    assert!(!switchyard.wait_exit().await);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<i32> = family
            .0
            .iter()
            .filter(|process| process.running())
            .map(|process| process.pid)
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{left:?} of {pids:?} (the instance, then its children) still running 10 s after switchyard was killed ({isolation})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Some(left) = cgroups.iter().find(|cgroup| cgroup.exists()) {
        assert!(
            Instant::now() < deadline,
            "{} left 10 s after switchyard was killed",
            left.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    isolation
}

/// Process groups only first: there, nothing but the instance's guard can find the
/// children that left its group without the owner mark (not even a next start), so
/// this fails without the guard whatever else runs on the machine. Then with the
/// host's cgroups, where another Switchyard starting meanwhile could also kill them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_an_instance_started_dies_with_a_killed_switchyard_without_waiting_for_a_next_start() {
    let isolation = a_killed_switchyard_takes_everything_its_instance_started(
        "\n[workers]\nisolation = \"process-group\"\n",
    )
    .await;
    assert!(isolation.starts_with("process-group"), "{isolation}");
    let isolation = a_killed_switchyard_takes_everything_its_instance_started("").await;
    println!("isolation: {isolation}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cleanly_stopped_switchyard_leaves_no_cgroup_directory_behind() {
    use nix::sys::signal::Signal;
    let Fixture {
        nats,
        directory,
        starts_file,
        function,
        results,
        _client,
        ..
    } = Fixture::new("tidy").await;
    let text = config_with(
        &nats,
        &function,
        "app",
        "min_instances = 1",
        "",
        &starts_file,
        &results,
    );
    let config = common::write_config(directory.path(), &text);
    let mut switchyard = common::Process::start(&config, &[]);
    switchyard.wait_ready().await;
    // The warm instance runs (its cgroups were made before it started).
    let deadline = Instant::now() + WAIT;
    while starts(&starts_file).is_empty() {
        assert!(Instant::now() < deadline, "the warm instance did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let isolation = isolation_of(&switchyard).await;
    let owners: Vec<PathBuf> = instance_cgroups(&function)
        .iter()
        .filter_map(|cgroup| cgroup.parent().map(Path::to_owned))
        .collect();
    switchyard.signal(Signal::SIGTERM);
    assert!(switchyard.wait_exit().await, "a clean exit on SIGTERM");
    wait_no_processes(&function, WAIT).await;
    if isolation.starts_with("process-group") {
        println!("no cgroup directories to check: {isolation}");
        return;
    }
    assert!(
        !owners.is_empty(),
        "{isolation}: no cgroup of the instance found"
    );
    for owner in &owners {
        assert!(
            !owner.exists(),
            "{} is left after a clean stop",
            owner.display()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_function_scales_from_zero_waits_for_readiness_and_keeps_instance_concurrency() {
    let Fixture {
        nats,
        directory,
        starts_file,
        function,
        results,
        mut answers,
        _client,
        ..
    } = Fixture::new("web").await;
    let early_file = directory.path().join("early");
    let mut text = base_config(&nats.url(), 0, 0);
    text.push_str(HOOK);
    text.push_str(&format!(
        r#"
[[functions]]
type = "process"
name = "{function}"
command = ["python3", "server.py"]
directory = "{directory}"
environment = {{ STARTS_FILE = "{starts}", EARLY_FILE = "{early}" }}
readiness_path = "/healthz"
instance_concurrency = 3
max_concurrency = 6
idle_timeout = "1s"

[[triggers]]
name = "main"
function = "{function}"
max_concurrency = 32
on_success = {{ type = "nats", subject = "{results}" }}
"#,
        directory = handlers().display(),
        starts = starts_file.display(),
        early = early_file.display(),
    ));
    let switchyard = Switchyard::start(text).await;
    // Before any event: no process (the server's environment does not carry Lambda's
    // variables; it names itself in SWITCHYARD_FUNCTION).
    let processes = || {
        let needle = format!("SWITCHYARD_FUNCTION={function}");
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|entry| {
                std::fs::read(entry.path().join("environ")).is_ok_and(|environment| {
                    environment
                        .split(|byte| *byte == 0)
                        .any(|variable| variable == needle.as_bytes())
                })
            })
            .count()
    };
    assert_eq!(processes(), 0);
    for index in 0..30 {
        post_job(
            &switchyard,
            &format!("req-{index}"),
            serde_json::json!({"seconds": 0.2}),
        )
        .await;
    }
    let answered = collect_results(&mut answers, 30).await;
    // No event reached an instance before its readiness check passed.
    assert_eq!(std::fs::read_to_string(&early_file).unwrap_or_default(), "");
    // At most 6 / 3 = 2 instances, each with at most 3 requests at once.
    let started = starts(&starts_file);
    assert!((1..=2).contains(&started.len()), "{started:?}");
    let most = answered
        .values()
        .map(|answer| answer["concurrent"].as_u64().unwrap())
        .max()
        .unwrap();
    assert!(most <= 3, "an instance handled {most} requests at once");
    // Idle again: back to zero.
    let deadline = Instant::now() + WAIT;
    while processes() > 0 {
        assert!(Instant::now() < deadline, "process instances left running");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    switchyard.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_over_its_memory_is_killed_and_reported_out_of_memory() {
    let Fixture {
        nats,
        directory: _directory,
        starts_file,
        function,
        results,
        _client,
        ..
    } = Fixture::new("oom").await;
    let text = config_with(
        &nats,
        &function,
        "app",
        "memory = 128\ntimeout = \"60s\"",
        r#"retry = { policy = "fixed", initial = "50ms", attempts = 2, jitter = false }"#,
        &starts_file,
        &results,
    );
    let switchyard = Switchyard::start(text).await;
    let status = switchyard.admin_json("/v1/functions").await;
    let isolation = status["functions"][0]["isolation"]
        .as_str()
        .unwrap()
        .to_owned();
    if isolation.starts_with("process-group") {
        println!("skipped: this host gives instances no memory limit ({isolation})");
        switchyard.stop().await;
        return;
    }
    post_job(
        &switchyard,
        "greedy",
        serde_json::json!({"action": "allocate", "mb": 400}),
    )
    .await;
    let bus = switchyard.bus().await;
    let dead = wait_for_dead_letters(&bus, "main", 1, Duration::from_secs(120)).await;
    assert_eq!(dead[0].dead_letter.attempts, 2);
    assert!(
        dead[0]
            .dead_letter
            .last_error
            .starts_with("Runtime.OutOfMemory: "),
        "{}",
        dead[0].dead_letter.last_error
    );
    assert_eq!(
        switchyard
            .metric("switchyard_function_oom_kills_total")
            .await,
        2.0
    );
    // A handler within its memory still runs on a fresh instance.
    switchyard.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_down_never_stops_an_instance_with_an_invocation_in_flight() {
    let Fixture {
        nats,
        directory: _directory,
        starts_file,
        function,
        results,
        mut answers,
        _client,
        ..
    } = Fixture::new("busy").await;
    // Invocations ten times longer than the idle timeout, and the reaper looking
    // every 50ms.
    let text = config_with(
        &nats,
        &function,
        "app",
        "max_concurrency = 4\nidle_timeout = \"100ms\"\ntimeout = \"20s\"",
        "",
        &starts_file,
        &results,
    );
    let switchyard = Switchyard::start(text).await;
    for index in 0..12 {
        post_job(
            &switchyard,
            &format!("long-{index}"),
            serde_json::json!({"action": "sleep", "seconds": 1.0}),
        )
        .await;
    }
    let answered = collect_results(&mut answers, 12).await;
    assert_eq!(answered.len(), 12);
    // Not one invocation failed: no instance was stopped under one.
    assert_eq!(switchyard.metric("switchyard_dispatch_retried").await, 0.0);
    assert_eq!(
        switchyard.metric("switchyard_function_crashes_total").await,
        0.0
    );
    assert_eq!(
        switchyard
            .metric("switchyard_function_timeouts_total")
            .await,
        0.0
    );
    wait_no_processes(&function, WAIT).await;
    switchyard.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_instance_takes_several_invocations_with_lambda_multi_concurrency() {
    let nats = NatsServer::start();
    let directory = tempfile::tempdir().unwrap();
    let starts_file = directory.path().join("starts");
    let meeting = directory.path().join("meeting");
    std::fs::create_dir(&meeting).unwrap();
    let function = random_name("multi");
    let results = random_name("results");
    let client = async_nats::connect(nats.url()).await.unwrap();
    let mut answers = client.subscribe(results.clone()).await.unwrap();
    // Two invocations at once, on at most one instance: awslambdaric forks two
    // workers (AWS_LAMBDA_MAX_CONCURRENCY=2), each asking for its own event.
    let text = config_with(
        &nats,
        &function,
        "app",
        "instance_concurrency = 2\nmax_concurrency = 2\ntimeout = \"60s\"",
        "",
        &starts_file,
        &results,
    );
    let switchyard = Switchyard::start(text).await;
    for index in 0..2 {
        post_job(
            &switchyard,
            &format!("meet-{index}"),
            serde_json::json!({"action": "meet", "dir": meeting, "count": 2}),
        )
        .await;
    }
    let answered = collect_results(&mut answers, 2).await;
    // Both were in the handler at once (the one alone would have waited 30s and
    // answered 1), in two workers of one instance.
    for answer in answered.values() {
        assert_eq!(answer["met"], 2, "{answer}");
    }
    let pids: std::collections::HashSet<String> = answered
        .values()
        .map(|answer| answer["pid"].to_string())
        .collect();
    assert_eq!(pids.len(), 2);
    let status = switchyard.admin_json("/v1/functions").await;
    assert_eq!(status["functions"][0]["cold_starts"], 1, "{status}");
    assert_eq!(status["functions"][0]["limits"]["max_instances"], 1);
    switchyard.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_init_past_init_timeout_is_a_timed_out_start() {
    let Fixture {
        nats,
        directory: _directory,
        starts_file,
        function,
        results,
        _client,
        ..
    } = Fixture::new("slow").await;
    let text = config_with(
        &nats,
        &function,
        "slow",
        "init_timeout = \"1s\"",
        r#"retry = { policy = "fixed", initial = "50ms", attempts = 1, jitter = false }"#,
        &starts_file,
        &results,
    );
    let switchyard = Switchyard::start(text).await;
    post_job(&switchyard, "waits", serde_json::json!({})).await;
    let bus = switchyard.bus().await;
    let dead = wait_for_dead_letters(&bus, "main", 1, WAIT).await;
    assert!(
        dead[0]
            .dead_letter
            .last_error
            .starts_with("Sandbox.Timedout: init did not finish within 1.00 seconds"),
        "{}",
        dead[0].dead_letter.last_error
    );
    // The instance that never got ready was killed.
    wait_no_processes(&function, WAIT).await;
    switchyard.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_instances_keeps_a_warm_floor_with_its_limits_applied() {
    let nats = NatsServer::start();
    let directory = tempfile::tempdir().unwrap();
    let starts_file = directory.path().join("starts");
    let meeting = directory.path().join("meeting");
    std::fs::create_dir(&meeting).unwrap();
    let function = random_name("warm");
    let results = random_name("results");
    let client = async_nats::connect(nats.url()).await.unwrap();
    let mut answers = client.subscribe(results.clone()).await.unwrap();
    let text = config_with(
        &nats,
        &function,
        "app",
        "min_instances = 1\nmax_concurrency = 2\nidle_timeout = \"200ms\"\ntimeout = \"60s\"",
        "",
        &starts_file,
        &results,
    );
    let switchyard = Switchyard::start(text).await;
    // Started before any event.
    let instances = |status: &serde_json::Value| {
        let counts = &status["functions"][0]["instances"];
        counts["idle"].as_u64().unwrap() + counts["busy"].as_u64().unwrap()
    };
    let deadline = Instant::now() + WAIT;
    while instances(&switchyard.admin_json("/v1/functions").await) < 1 {
        assert!(Instant::now() < deadline, "the warm instance did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(starts(&starts_file).len(), 1);
    let status = switchyard.admin_json("/v1/functions").await;
    let isolation = status["functions"][0]["isolation"].as_str().unwrap();
    if isolation.starts_with("cgroup v1") {
        // The kernel's files of the running instance hold its limits: 128 MB,
        // Lambda's 1,024 processes, 128/1769 of a CPU.
        let owner_directory = |controller: &str| {
            std::fs::read_dir(format!("/sys/fs/cgroup/{controller}/switchyard"))
                .unwrap()
                .flatten()
                .map(|entry| entry.path().join(format!("{function}-1")))
                .find(|path| path.exists())
                .unwrap_or_else(|| panic!("no {controller} cgroup for {function}-1"))
        };
        let read = |controller: &str, file: &str| {
            std::fs::read_to_string(owner_directory(controller).join(file))
                .unwrap()
                .trim()
                .to_owned()
        };
        assert_eq!(read("memory", "memory.limit_in_bytes"), "134217728");
        assert_eq!(read("pids", "pids.max"), "1024");
        assert_eq!(read("cpu", "cpu.cfs_quota_us"), "7235");
    } else {
        println!("cgroup files not checked: {isolation}");
    }
    // Two invocations at once need a second instance, which goes when idle...
    for index in 0..2 {
        post_job(
            &switchyard,
            &format!("pair-{index}"),
            serde_json::json!({"action": "meet", "dir": meeting, "count": 2}),
        )
        .await;
    }
    let answered = collect_results(&mut answers, 2).await;
    assert!(answered.values().all(|answer| answer["met"] == 2));
    let deadline = Instant::now() + WAIT;
    while function_processes(&function).len() != 1 {
        assert!(Instant::now() < deadline, "not back to the floor");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ...and the floor stays, idle, well past idle_timeout (letting time pass is
    // the point here: nothing must happen).
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(function_processes(&function).len(), 1);
    assert_eq!(instances(&switchyard.admin_json("/v1/functions").await), 1);
    switchyard.stop().await;
    wait_no_processes(&function, WAIT).await;
}
