//! Shared harness of the end-to-end tests: a real `nats-server` per test, a real HTTP
//! function server that records what it receives, and Switchyard started from a real
//! configuration text.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

#[allow(unused_imports)]
pub use switchyard_testkit::{NatsServer, free_port};

pub const WAIT: Duration = Duration::from_secs(30);

/// The path a tool installed by scripts/install-deps.sh is at, from its variable
/// (set by scripts/env.sh).
pub fn installed(variable: &str) -> String {
    let path = std::env::var(variable).unwrap_or_else(|_| {
        panic!("{variable} is not set: run the tests through scripts/test.sh (it installs it)")
    });
    assert!(
        Path::new(&path).exists(),
        "{path} does not exist: run scripts/install-deps.sh"
    );
    path
}

/// tests/functions: the handlers and servers the tests run as functions.
pub fn test_functions() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/functions")
}

/// A `[[functions]]` table: the Lambda function `name` running the Python test
/// handlers (tests/functions/python/app.py) under awslambdaric, with `extra` lines.
#[allow(dead_code)]
pub fn python_lambda(name: &str, extra: &str) -> String {
    format!(
        "\n[[functions]]\ntype = \"lambda\"\nname = \"{name}\"\ncommand = [\"{python}\", \"-m\", \"awslambdaric\", \"app.handler\"]\nhandler = \"app.handler\"\ndirectory = \"{handlers}\"\n{extra}\n",
        python = installed("SWITCHYARD_LAMBDA_PYTHON"),
        handlers = test_functions().join("python").display(),
    )
}

/// A `switchyard run` process, killed on drop. It binds the ports its configuration
/// names (port 0: any free one) and reports them in its `--ready-file` once ready, so
/// no port is chosen here and freed before the process takes it.
pub struct Process {
    child: Mutex<Option<Child>>,
    ready_file: PathBuf,
    _directory: tempfile::TempDir,
    bound: std::sync::OnceLock<Bound>,
}

/// What a process reported in its ready file.
#[derive(Debug, Clone)]
pub struct Bound {
    pub admin: SocketAddr,
    pub sources: HashMap<String, SocketAddr>,
    /// Lambda's Invoke API, when the configuration turns it on.
    pub invoke_api: Option<SocketAddr>,
}

impl Process {
    pub fn start(config: &Path, env: &[(&str, String)]) -> Process {
        Self::start_inner(config, env, None)
    }

    /// [`Process::start`], its stdout and stderr written to `log` (for tests that
    /// read what it logged).
    pub fn start_logged(config: &Path, env: &[(&str, String)], log: &Path) -> Process {
        Self::start_inner(config, env, Some(log))
    }

    fn start_inner(config: &Path, env: &[(&str, String)], log: Option<&Path>) -> Process {
        let directory = tempfile::tempdir().unwrap();
        let ready_file = directory.path().join("ready.json");
        let mut command = Command::new(env!("CARGO_BIN_EXE_switchyard"));
        command
            .arg("run")
            .arg("--config")
            .arg(config)
            .arg("--ready-file")
            .arg(&ready_file)
            .stdout(Stdio::null());
        if let Some(log) = log {
            let file = std::fs::File::create(log).unwrap();
            command
                .stdout(file.try_clone().unwrap())
                .stderr(Stdio::from(file));
        } else if std::env::var_os("SWITCHYARD_TEST_LOG").is_none() {
            command.stderr(Stdio::null());
        }
        for (name, value) in env {
            command.env(name, value);
        }
        Process {
            child: Mutex::new(Some(command.spawn().expect("starting switchyard"))),
            ready_file,
            _directory: directory,
            bound: std::sync::OnceLock::new(),
        }
    }

    /// Waits until this process wrote its ready file (it is connected, its consumers
    /// exist, its listeners are bound); panics if it exits first or takes too long.
    pub async fn wait_ready(&self) -> &Bound {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(bound) = self.bound.get() {
                return bound;
            }
            if let Ok(text) = std::fs::read_to_string(&self.ready_file) {
                let report: serde_json::Value = serde_json::from_str(&text)
                    .unwrap_or_else(|error| panic!("ready file `{text}`: {error}"));
                let pid = self.child.lock().unwrap().as_ref().map(Child::id);
                assert_eq!(report["pid"].as_u64(), pid.map(u64::from), "{text}");
                let address = |value: &serde_json::Value| -> SocketAddr {
                    value.as_str().unwrap().parse().unwrap()
                };
                let bound = Bound {
                    invoke_api: report["invoke_api"]
                        .as_str()
                        .map(|text| text.parse().unwrap()),
                    admin: address(&report["admin"]),
                    sources: report["sources"]
                        .as_object()
                        .unwrap()
                        .iter()
                        .map(|(name, value)| (name.clone(), address(value)))
                        .collect(),
                };
                return self.bound.get_or_init(|| bound);
            }
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "switchyard process did not become ready"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Panics if the process has exited.
    pub fn assert_running(&self) {
        if let Some(child) = self.child.lock().unwrap().as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            panic!("switchyard process exited: {status}");
        }
    }

    /// The admin listener's address (after [`Process::wait_ready`]).
    pub fn admin(&self) -> SocketAddr {
        self.bound.get().expect("wait_ready first").admin
    }

    /// The address of HTTP source `name` (after [`Process::wait_ready`]).
    pub fn source(&self, name: &str) -> SocketAddr {
        self.bound.get().expect("wait_ready first").sources[name]
    }

    /// A URL on the `http` source.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.source("http"))
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap().as_ref().unwrap().id()
    }

    /// Its resident memory, in KiB (`VmRSS` of /proc/<pid>/status).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status")
    }

    pub fn signal(&self, signal: Signal) {
        let pid = self.child.lock().unwrap().as_ref().unwrap().id();
        kill(Pid::from_raw(pid as i32), signal).unwrap();
    }

    /// Waits for the process to exit and returns whether it succeeded.
    pub async fn wait_exit(&mut self) -> bool {
        let mut child = self.child.lock().unwrap().take().unwrap();
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.success();
            }
            assert!(Instant::now() < deadline, "switchyard did not exit");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn metric(&self, name: &str) -> u64 {
        metric_at(&format!("http://{}/metrics", self.admin()), name).await as u64
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `switchyard <arguments> --config <config>`; returns success and its output
/// (stdout, then stderr).
pub fn run_cli(config: &Path, arguments: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(arguments)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).to_string()
            + &String::from_utf8_lossy(&output.stderr),
    )
}

pub fn write_config(directory: &Path, text: &str) -> PathBuf {
    let path = directory.join("switchyard.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// One request a function received.
#[derive(Clone, Debug)]
pub struct Received {
    pub headers: HeaderMap,
    pub body: Bytes,
    pub at: Instant,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }

    pub fn id(&self) -> &str {
        self.header("ce-id").unwrap_or_default()
    }
}

/// How a function answers one call.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub delay: Duration,
    pub body: Bytes,
    /// Crash: the connection is dropped without an answer.
    pub abort: bool,
}

impl Reply {
    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            delay: Duration::ZERO,
            body: Bytes::new(),
            abort: false,
        }
    }

    /// No answer at all: the connection is dropped, as when a function crashes.
    pub fn abort(mut self) -> Reply {
        self.abort = true;
        self
    }

    pub fn ok() -> Reply {
        Reply::status(200)
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Reply {
        self.headers.push((name, value.into()));
        self
    }

    pub fn with_body(mut self, body: impl Into<Bytes>) -> Reply {
        self.body = body.into();
        self
    }

    pub fn after(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }
}

/// Decides the reply from the request and how many times this event id was seen
/// (1 for the first call).
pub type Behaviour = Arc<dyn Fn(&Received, usize) -> Reply + Send + Sync>;

struct FunctionState {
    received: Mutex<Vec<Received>>,
    calls_by_id: Mutex<HashMap<String, usize>>,
    in_flight: AtomicUsize,
    peak: AtomicUsize,
    behaviour: Mutex<Behaviour>,
    /// A call delayed longer counts as in flight only this long (its caller gave up
    /// on it at its timeout).
    counted_for: Mutex<Option<Duration>>,
}

/// A real HTTP function server that records every call, its concurrency and peak.
#[derive(Clone)]
pub struct FunctionServer {
    pub url: String,
    state: Arc<FunctionState>,
}

struct InFlightGuard(Arc<FunctionState>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn handle(
    State(state): State<Arc<FunctionState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    let mut guard = Some(InFlightGuard(state.clone()));
    state.peak.fetch_max(now, Ordering::SeqCst);
    let received = Received {
        headers,
        body,
        at: Instant::now(),
    };
    let calls = {
        let mut calls = state.calls_by_id.lock().unwrap();
        let count = calls.entry(received.id().to_owned()).or_default();
        *count += 1;
        *count
    };
    let behaviour = state.behaviour.lock().unwrap().clone();
    let reply = behaviour(&received, calls);
    let counted_for = *state.counted_for.lock().unwrap();
    match counted_for {
        Some(limit) if reply.delay > limit => {
            tokio::time::sleep(limit).await;
            drop(guard.take());
            tokio::time::sleep(reply.delay - limit).await;
        }
        _ if !reply.delay.is_zero() => tokio::time::sleep(reply.delay).await,
        _ => {}
    }
    state.received.lock().unwrap().push(received);
    if reply.abort {
        // Unwinds the connection's task: the socket is closed without an answer.
        std::panic::resume_unwind(Box::new("the function crashed"));
    }
    let mut response = (StatusCode::from_u16(reply.status).unwrap(), reply.body).into_response();
    for (name, value) in reply.headers {
        response.headers_mut().insert(name, value.parse().unwrap());
    }
    response
}

impl FunctionServer {
    pub async fn start(
        behaviour: impl Fn(&Received, usize) -> Reply + Send + Sync + 'static,
    ) -> FunctionServer {
        let state = Arc::new(FunctionState {
            received: Mutex::new(Vec::new()),
            calls_by_id: Mutex::new(HashMap::new()),
            in_flight: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            behaviour: Mutex::new(Arc::new(behaviour)),
            counted_for: Mutex::new(None),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let router = axum::Router::new()
            .route("/", axum::routing::post(handle))
            .with_state(state.clone());
        tokio::spawn(async move {
            axum::serve(listener, router).await.unwrap();
        });
        FunctionServer {
            url: format!("http://{address}/"),
            state,
        }
    }

    /// Counts a call delayed longer than `limit` as in flight for `limit` only: the
    /// caller gave up on it at its timeout (a little over `limit`), and its slot is
    /// free for another call while this server still sleeps on the abandoned one.
    pub fn count_in_flight_for(&self, limit: Duration) {
        *self.state.counted_for.lock().unwrap() = Some(limit);
    }

    pub fn set_behaviour(
        &self,
        behaviour: impl Fn(&Received, usize) -> Reply + Send + Sync + 'static,
    ) {
        *self.state.behaviour.lock().unwrap() = Arc::new(behaviour);
    }

    /// Completed calls, in completion order.
    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    pub fn calls_for(&self, id: &str) -> usize {
        self.state
            .calls_by_id
            .lock()
            .unwrap()
            .get(id)
            .copied()
            .unwrap_or(0)
    }

    pub fn peak(&self) -> usize {
        self.state.peak.load(Ordering::SeqCst)
    }

    /// Waits until `count` calls completed, or panics after `timeout`.
    pub async fn wait_for(&self, count: usize, timeout: Duration) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let received = self.received();
            if received.len() >= count {
                return received;
            }
            assert!(
                Instant::now() < deadline,
                "function received {} calls, expected {count} within {timeout:?}",
                received.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Waits until `trigger` has at least `count` dead letters, or panics after `timeout`.
pub async fn wait_for_dead_letters(
    bus: &switchyard_bus::Bus,
    trigger: &str,
    count: usize,
    timeout: Duration,
) -> Vec<switchyard::dlq::Entry> {
    let deadline = Instant::now() + timeout;
    loop {
        let dead = switchyard::dlq::list(bus, trigger).await.unwrap();
        if dead.len() >= count {
            return dead;
        }
        assert!(
            Instant::now() < deadline,
            "trigger `{trigger}` has {} dead letters, expected {count} within {timeout:?}",
            dead.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A random lowercase name, to keep streams and subjects apart.
pub fn random_name(prefix: &str) -> String {
    format!(
        "{prefix}{}",
        uuid::Uuid::new_v4().simple().to_string().get(..10).unwrap()
    )
}

/// The `[nats]`, `[admin]` and HTTP source sections for a test; `extra_source` is
/// appended inside the `[[sources]]` table (hooks, bearer token, ...).
pub fn base_config(nats_url: &str, http_port: u16, admin_port: u16) -> String {
    base_config_prefixed(nats_url, &random_name("t"), http_port, admin_port)
}

/// [`base_config`] with the subject prefix given (streams are named after it).
pub fn base_config_prefixed(
    nats_url: &str,
    prefix: &str,
    http_port: u16,
    admin_port: u16,
) -> String {
    format!(
        r#"
[nats]
url = "{nats_url}"
subject_prefix = "{prefix}"
publish_timeout = "2s"
events_stream = {{ name = "{upper}_EVENTS", storage = "memory", duplicate_window = "1m" }}
dead_letter_stream = {{ name = "{upper}_DLQ", storage = "memory" }}

[admin]
listen = "127.0.0.1:{admin_port}"

[log]
level = "${{SWITCHYARD_TEST_LOG:-error}}"

[dispatcher]
shutdown_grace = "2s"

[[sources]]
type = "http"
name = "http"
listen = "127.0.0.1:{http_port}"
max_body_bytes = 4096
"#,
        upper = prefix.to_uppercase()
    )
}

/// The sum of a metric's samples (every label set) at a `/metrics` URL.
pub async fn metric_at(url: &str, name: &str) -> f64 {
    let text = reqwest::get(url).await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|line| line.starts_with(name))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Switchyard started in this process from configuration text.
pub struct Switchyard {
    pub running: Option<switchyard::Running>,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    /// Lambda's Invoke API, when the configuration turns it on.
    pub invoke_api: Option<SocketAddr>,
    pub config_text: String,
}

impl Switchyard {
    pub async fn start(config_text: String) -> Switchyard {
        let switchyard = Self::start_set_up(config_text).await;
        switchyard.wait_ready().await;
        switchyard
    }

    /// Starts and waits until it is set up (connected, streams and consumers
    /// created, sources started), not until `/readyz` answers 200: for a source that
    /// is meant to fail.
    pub async fn start_set_up(config_text: String) -> Switchyard {
        let config = switchyard::config::parse(Path::new("test.toml"), &config_text, &|name| {
            std::env::var(name).ok()
        })
        .unwrap_or_else(|errors| panic!("test config invalid:\n{errors}\n{config_text}"));
        switchyard::init_logging(&config.log);
        // Function instances guarded as the binary guards them (this test process
        // cannot be a guard itself).
        switchyard_workers::guard::set_program(env!("CARGO_BIN_EXE_switchyard"));
        let running = switchyard::start(config).await.unwrap();
        let http = running.sources["http"];
        let admin = running.admin.unwrap();
        let invoke_api = running.invoke_api;
        let switchyard = Switchyard {
            running: Some(running),
            http,
            admin,
            invoke_api,
            config_text,
        };
        let set_up = tokio::time::timeout(
            Duration::from_secs(15),
            switchyard.running.as_ref().expect("running").wait_ready(),
        )
        .await;
        assert_eq!(set_up, Ok(true), "switchyard was not set up");
        switchyard
    }

    pub async fn wait_ready(&self) {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(response) = client
                .get(format!("http://{}/readyz", self.admin))
                .send()
                .await
                && response.status() == 200
            {
                return;
            }
            assert!(Instant::now() < deadline, "switchyard did not become ready");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// The JSON an admin endpoint (`/v1/triggers`, `/v1/sources`) answers.
    pub async fn admin_json(&self, path: &str) -> serde_json::Value {
        let body = reqwest::get(self.admin_url(path))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        serde_json::from_slice(&body).unwrap()
    }

    /// The sum of a metric's samples on this instance's `/metrics`.
    pub async fn metric(&self, name: &str) -> f64 {
        metric_at(&self.admin_url("/metrics"), name).await
    }

    pub async fn bus(&self) -> switchyard_bus::Bus {
        let config =
            switchyard::config::parse(Path::new("test.toml"), &self.config_text, &|name| {
                std::env::var(name).ok()
            })
            .unwrap();
        switchyard_bus::Bus::connect(&config.nats).await.unwrap()
    }

    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.stop().await.unwrap();
        }
    }
}

impl Drop for Switchyard {
    fn drop(&mut self) {
        // A test that panicked before `stop`: stop the sources, so the runtime's
        // shutdown does not wait forever on a Kafka consumer thread.
        if let Some(running) = &self.running {
            running.shutdown.cancel();
        }
    }
}

/// POSTs one binary-mode CloudEvent to `url` (an HTTP source's `/v1/events`) from a
/// shared client.
pub async fn post_event(url: &str, id: &str, ty: &str, body: &'static str) -> reqwest::Response {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    let client = CLIENT.get_or_init(reqwest::Client::new);
    binary_event(client, url, id, ty, body)
        .send()
        .await
        .expect("posting an event")
}

/// A binary-mode CloudEvents POST.
pub fn binary_event(
    client: &reqwest::Client,
    url: &str,
    id: &str,
    ty: &str,
    body: &'static str,
) -> reqwest::RequestBuilder {
    client
        .post(url)
        .header("ce-specversion", "1.0")
        .header("ce-id", id)
        .header("ce-source", "/tests")
        .header("ce-type", ty)
        .header("content-type", "text/plain")
        .body(body)
}

/// A certificate authority, made with rcgen.
pub fn authority() -> rcgen::CertifiedKey {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::new()).unwrap();
    // Subjects differ from the certificates it issues (OpenSSL takes a certificate
    // whose subject is its issuer's for self-signed).
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Switchyard test CA");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).unwrap();
    rcgen::CertifiedKey {
        cert,
        key_pair: key,
    }
}

/// A certificate for `dns_name` issued by `ca`: its PEM and its key's PEM.
pub fn issue(ca: &rcgen::CertifiedKey, dns_name: &str) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![dns_name.to_owned()]).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, dns_name);
    let cert = params.signed_by(&key, &ca.cert, &ca.key_pair).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// [`issue`], written to `{name}.pem` and `{name}-key.pem` in `directory`.
pub fn issue_files(ca: &rcgen::CertifiedKey, directory: &Path, name: &str, dns_name: &str) {
    let (cert, key) = issue(ca, dns_name);
    std::fs::write(directory.join(format!("{name}.pem")), cert).unwrap();
    std::fs::write(directory.join(format!("{name}-key.pem")), key).unwrap();
}

/// Waits until source `name` of `process` runs (`/v1/sources` says so: connected,
/// subscribed or consuming).
pub async fn wait_source_running(process: &Process, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
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
        if source["state"] == "running" {
            return;
        }
        assert!(Instant::now() < deadline, "source {name}: {source}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The configuration head of the queue-source tests (SQS, RabbitMQ, MQTT): memory
/// streams named after `prefix`, an admin listener on any port, then `rest`.
pub fn queue_test_config(nats: &NatsServer, prefix: &str, rest: &str) -> String {
    let upper = prefix.to_uppercase();
    format!(
        r#"[nats]
url = "{nats}"
subject_prefix = "{prefix}"
events_stream = {{ name = "{upper}_EVENTS", storage = "memory" }}
dead_letter_stream = {{ name = "{upper}_DLQ", storage = "memory" }}

[admin]
listen = "127.0.0.1:0"

[log]
level = "${{SWITCHYARD_TEST_LOG:-warn}}"
{rest}"#,
        nats = nats.url(),
    )
}

/// How many times the function got each body (trailing whitespace, the padding of
/// large test messages, left out).
pub fn body_counts(function: &FunctionServer) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for call in function.received() {
        *counts
            .entry(String::from_utf8_lossy(&call.body).trim_end().to_owned())
            .or_insert(0) += 1;
    }
    counts
}

/// Waits until the function got every one of `bodies` at least once; panics after
/// `wait`.
pub async fn wait_bodies(function: &FunctionServer, bodies: &[String], wait: Duration) {
    let deadline = Instant::now() + wait;
    loop {
        let counts = body_counts(function);
        let missing = bodies
            .iter()
            .filter(|body| !counts.contains_key(*body))
            .count();
        if missing == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} of {} messages not delivered",
            bodies.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
