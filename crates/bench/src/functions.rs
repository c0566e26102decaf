//! (g) Managed `lambda` functions, with the official runtime clients:
//!
//! - cold start: from the event being POSTed to Switchyard (scaled to zero) to the
//!   handler being entered, beside the bare start of the same command with the same
//!   client against a Runtime API that already holds the event (spawn to handler
//!   entered); the difference is the platform's own overhead. Handlers report when
//!   they were entered (`entered_us`, wall clock, same machine).
//! - warm invocations of the Rust handler: invoked directly through Switchyard's
//!   worker pool (the dispatcher's call, without the bus) with N instances, beside the
//!   same binary under AWS's Runtime Interface Emulator invoked directly over HTTP
//!   (one instance, one invocation at a time);
//! - idle memory: the `switchyard` process with 20 scaled-to-zero functions beside
//!   none.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use futures::StreamExt;
use switchyard_event::{Event, Target};
use switchyard_workers::runtime_api::{
    Answer, InstanceIdentity, Invocation, RuntimeApi, function_arn, instance_environment,
};

use crate::{Nats, config_header, free_port, milliseconds, percentile, rss_kib, wait_ready};

/// A handler and the command that runs it.
pub(crate) struct Handler {
    pub(crate) name: &'static str,
    command: Vec<String>,
    directory: PathBuf,
    handler: &'static str,
}

fn tests_functions() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/functions")
}

fn installed(variable: &str) -> anyhow::Result<String> {
    let path = std::env::var(variable)
        .with_context(|| format!("{variable} is not set: run scripts/bench.sh"))?;
    anyhow::ensure!(
        Path::new(&path).exists(),
        "{path} ({variable}) does not exist: run scripts/bench.sh"
    );
    Ok(path)
}

pub(crate) fn handlers() -> anyhow::Result<Vec<Handler>> {
    Ok(vec![
        Handler {
            name: "rust (lambda_runtime)",
            command: vec![installed("SWITCHYARD_LAMBDA_RUST")?],
            directory: tests_functions(),
            handler: "bootstrap",
        },
        Handler {
            name: "python (awslambdaric)",
            command: vec![
                installed("SWITCHYARD_LAMBDA_PYTHON")?,
                "-m".to_owned(),
                "awslambdaric".to_owned(),
                "app.handler".to_owned(),
            ],
            directory: tests_functions().join("python"),
            handler: "app.handler",
        },
        Handler {
            name: "node (aws-lambda-ric)",
            command: vec![
                "node".to_owned(),
                installed("SWITCHYARD_LAMBDA_NODE_RIC")?,
                "index.handler".to_owned(),
            ],
            directory: tests_functions().join("node"),
            handler: "index.handler",
        },
    ])
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_micros() as u64)
}

fn bench_event(id: &str) -> Event {
    let mut event = Event::new(id, "/bench", "dev.switchyard.bench");
    event.datacontenttype = Some("application/json".to_owned());
    event.data = bytes::Bytes::from_static(br#"{"action":"echo","order":42}"#);
    event
}

/// When the handler was entered, from its answer.
fn entered_us(answer: &[u8]) -> anyhow::Result<u64> {
    let answer: serde_json::Value = serde_json::from_slice(answer)?;
    answer["entered_us"]
        .as_u64()
        .with_context(|| format!("no entered_us in {answer}"))
}

/// Spawn to handler entered: the command started by hand against a Runtime API that
/// already holds the event.
pub(crate) async fn bare_start(handler: &Handler) -> anyhow::Result<Duration> {
    let api = RuntimeApi::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?.to_string();
    let router = api.router();
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    let answer = api
        .invoke(Invocation {
            request_id: uuid::Uuid::new_v4().to_string(),
            event: bytes::Bytes::from(switchyard_event::to_structured_json(&bench_event("bare"))),
            deadline_ms: (now_us() / 1000) + 60_000,
            function_arn: function_arn("us-east-1", "bare"),
            trace_id: None,
            client_context: None,
            cognito_identity: None,
        })
        .map_err(anyhow::Error::msg)?;
    let task_root = handler.directory.to_string_lossy();
    let mut environment = instance_environment(
        &InstanceIdentity {
            function: "bare",
            handler: handler.handler,
            task_root: &task_root,
            memory_mb: 3538,
            region: "us-east-1",
            runtime_api: &address,
            instance: "bare-1",
        },
        &[],
    );
    environment.push(("PATH".to_owned(), std::env::var("PATH").unwrap_or_default()));
    let started = now_us();
    let mut child = Command::new(&handler.command[0])
        .args(&handler.command[1..])
        .current_dir(&handler.directory)
        .env_clear()
        .envs(environment)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let answer = tokio::time::timeout(Duration::from_secs(30), answer).await??;
    let _ = child.kill();
    let _ = child.wait();
    server.abort();
    let Answer::Response { body, .. } = answer else {
        anyhow::bail!("the bare handler did not answer: {answer:?}");
    };
    Ok(Duration::from_micros(
        entered_us(&body)?.saturating_sub(started),
    ))
}

/// What `isolation = "auto"` gives on this host, as the workers say it.
fn isolation_here() -> String {
    let workers = switchyard_workers::Workers::new(
        switchyard_workers::WorkersSettings::default(),
        switchyard_workers::WorkerMetrics::default(),
    );
    workers.isolation().to_owned()
}

/// `(median, min)` of samples.
fn median_and_min(samples: &mut [Duration]) -> (Duration, Duration) {
    samples.sort_unstable();
    (samples[samples.len() / 2], samples[0])
}

/// Instances of a function, from `/v1/functions`.
async fn instances(client: &reqwest::Client, admin: std::net::SocketAddr) -> anyhow::Result<u64> {
    let status: serde_json::Value = serde_json::from_slice(
        &client
            .get(format!("http://{admin}/v1/functions"))
            .send()
            .await?
            .bytes()
            .await?,
    )?;
    let counts = &status["functions"][0]["instances"];
    Ok(["starting", "idle", "busy"]
        .iter()
        .map(|state| counts[state].as_u64().unwrap_or(0))
        .sum())
}

/// POST to handler entered, each time from zero instances, through the `switchyard`
/// process.
async fn platform_cold_starts(
    nats: &Nats,
    binary: &Path,
    handler: &Handler,
    rounds: usize,
    isolation: &str,
) -> anyhow::Result<Vec<Duration>> {
    let prefix = format!(
        "benchcold{}",
        uuid::Uuid::new_v4()
            .simple()
            .to_string()
            .get(..6)
            .unwrap_or("x")
    );
    let (http_port, admin_port) = (free_port(), free_port());
    let results = format!("{prefix}.results");
    let command = handler
        .command
        .iter()
        .map(|part| format!("{part:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut text = config_header(&nats.url(), &prefix, admin_port);
    text.push_str(&format!(
        r#"[workers]
isolation = "{isolation}"

[[sources]]
type = "http"
name = "http"
listen = "127.0.0.1:{http_port}"

[[functions]]
type = "lambda"
name = "cold"
command = [{command}]
handler = "{handler_name}"
directory = {directory:?}
memory = 3538
idle_timeout = "50ms"
timeout = "30s"

[[triggers]]
name = "cold"
function = "cold"
on_success = {{ type = "nats", subject = "{results}" }}
"#,
        handler_name = handler.handler,
        directory = handler.directory.display().to_string(),
    ));
    let directory = tempfile::tempdir()?;
    let config = directory.path().join("cold.toml");
    std::fs::write(&config, text)?;
    let mut child = Command::new(binary)
        .args(["run", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let admin: std::net::SocketAddr = format!("127.0.0.1:{admin_port}").parse()?;
    wait_ready(admin).await;
    let client = reqwest::Client::new();
    let nats_client = switchyard_bus::async_nats::connect(nats.url()).await?;
    let mut answers = nats_client.subscribe(results).await?;
    let mut samples = Vec::new();
    // One more than asked: the first warms the page cache and the connections.
    for round in 0..=rounds {
        let deadline = Instant::now() + Duration::from_secs(30);
        while instances(&client, admin).await? > 0 {
            anyhow::ensure!(Instant::now() < deadline, "instances did not stop");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let sent = now_us();
        let response = crate::binary_request(
            &client,
            &format!("http://127.0.0.1:{http_port}/v1/events"),
            &format!("cold-{round}"),
        )
        .send()
        .await?;
        anyhow::ensure!(
            response.status() == 202,
            "POST answered {}",
            response.status()
        );
        let message = tokio::time::timeout(Duration::from_secs(30), answers.next())
            .await
            .context("no answer")?
            .context("subscription closed")?;
        if round > 0 {
            samples.push(Duration::from_micros(
                entered_us(&message.payload)?.saturating_sub(sent),
            ));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    Ok(samples)
}

/// Latencies and throughput of `count` invocations, `concurrency` at a time.
struct Warm {
    latencies: Vec<Duration>,
    per_second: f64,
}

impl Warm {
    fn row(&mut self, name: &str) -> String {
        self.latencies.sort_unstable();
        format!(
            "| {name} | {:.0} | {} | {} |",
            self.per_second,
            milliseconds(percentile(&self.latencies, 0.5)),
            milliseconds(percentile(&self.latencies, 0.99))
        )
    }
}

/// aws-lambda-rie running `binary`, once its first invocation (which starts the
/// runtime) answered: the process and its invoke URL.
async fn start_rie(binary: &str) -> anyhow::Result<(std::process::Child, String)> {
    start_rie_command(&[binary.to_owned()], &tests_functions()).await
}

/// aws-lambda-rie running `command` in `directory` (as Lambda's images run a
/// runtime), once its first invocation answered: the process and its invoke URL.
async fn start_rie_command(
    command: &[String],
    directory: &Path,
) -> anyhow::Result<(std::process::Child, String)> {
    let rie = installed("SWITCHYARD_LAMBDA_RIE")?;
    let (front, runtime) = (free_port(), free_port());
    let child = Command::new(rie)
        .arg("--runtime-interface-emulator-address")
        .arg(format!("127.0.0.1:{front}"))
        .arg("--runtime-api-address")
        .arg(format!("127.0.0.1:{runtime}"))
        .args(command)
        .current_dir(directory)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let url = format!("http://127.0.0.1:{front}/2015-03-31/functions/function/invocations");
    let body = switchyard_event::to_structured_json(&bench_event("rie"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_load(&url, &body, 1, 1).await.1.is_empty() {
        anyhow::ensure!(Instant::now() < deadline, "aws-lambda-rie did not answer");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((child, url))
}

/// The Rust handler under aws-lambda-rie, invoked over HTTP one at a time.
async fn rie_warm(binary: &str, count: usize) -> anyhow::Result<Warm> {
    let (mut child, url) = start_rie(binary).await?;
    let client = reqwest::Client::new();
    let body = switchyard_event::to_structured_json(&bench_event("rie"));
    let mut latencies = Vec::with_capacity(count);
    let started = Instant::now();
    for _ in 0..count {
        let sent = Instant::now();
        let response = client.post(&url).body(body.clone()).send().await?;
        anyhow::ensure!(
            response.status().is_success(),
            "rie answered {}",
            response.status()
        );
        let answer = response.bytes().await?;
        anyhow::ensure!(!answer.is_empty());
        latencies.push(sent.elapsed());
    }
    let per_second = count as f64 / started.elapsed().as_secs_f64();
    let _ = child.kill();
    let _ = child.wait();
    Ok(Warm {
        latencies,
        per_second,
    })
}

/// The Rust handler through Switchyard's worker pool with `instances` instances.
async fn pool_warm(binary: &str, instances: usize, count: usize) -> anyhow::Result<Warm> {
    let workers = switchyard_workers::Workers::new(
        switchyard_workers::WorkersSettings::default(),
        switchyard_workers::WorkerMetrics::default(),
    );
    let function = Arc::new(workers.add(switchyard_workers::FunctionSpec {
        name: format!("warm{instances}"),
        kind: switchyard_workers::Kind::Lambda {
            handler: "bootstrap".to_owned(),
        },
        command: vec![binary.to_owned()],
        directory: tests_functions(),
        environment: Vec::new(),
        timeout: Duration::from_secs(30),
        init_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(600),
        memory_mb: 3538,
        min_instances: 0,
        max_instances: instances,
        instance_concurrency: 1,
        max_cold_starts: instances,
    }));
    let event = bench_event("pool");
    // Warm: every instance started.
    let warmups: Vec<_> = (0..instances)
        .map(|_| {
            let function = function.clone();
            let event = event.clone();
            tokio::spawn(async move { function.invoke(&event, Duration::from_secs(30)).await })
        })
        .collect();
    for warmup in warmups {
        let outcome = warmup.await?;
        anyhow::ensure!(
            matches!(outcome, switchyard_event::Outcome::Delivered { .. }),
            "warm-up failed: {outcome:?}"
        );
    }
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let runners: Vec<_> = (0..instances)
        .map(|_| {
            let function = function.clone();
            let event = event.clone();
            let next = next.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while next.fetch_add(1, Ordering::Relaxed) < count {
                    let sent = Instant::now();
                    let outcome = function.invoke(&event, Duration::from_secs(30)).await;
                    assert!(
                        matches!(outcome, switchyard_event::Outcome::Delivered { .. }),
                        "{outcome:?}"
                    );
                    latencies.push(sent.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(count);
    for runner in runners {
        latencies.extend(runner.await?);
    }
    let per_second = count as f64 / started.elapsed().as_secs_f64();
    workers.shutdown().await;
    Ok(Warm {
        latencies,
        per_second,
    })
}

/// VmRSS of a `switchyard` process with `functions` scaled-to-zero `lambda`
/// functions (each with a trigger), or as many `http` functions, after it is ready
/// and settled.
async fn idle_rss(
    nats: &Nats,
    binary: &Path,
    functions: usize,
    lambda: bool,
) -> anyhow::Result<u64> {
    let prefix = format!(
        "benchidle{}",
        uuid::Uuid::new_v4()
            .simple()
            .to_string()
            .get(..6)
            .unwrap_or("x")
    );
    let admin_port = free_port();
    let mut text = config_header(&nats.url(), &prefix, admin_port);
    let rust = installed("SWITCHYARD_LAMBDA_RUST")?;
    for index in 0..functions {
        if lambda {
            text.push_str(&format!(
                "[[functions]]\ntype = \"lambda\"\nname = \"f{index}\"\ncommand = [{rust:?}]\nhandler = \"bootstrap\"\n"
            ));
        } else {
            text.push_str(&format!(
                "[[functions]]\ntype = \"http\"\nname = \"f{index}\"\nurl = \"http://127.0.0.1:9/\"\n"
            ));
        }
        text.push_str(&format!(
            "[[triggers]]\nname = \"t{index}\"\nfunction = \"f{index}\"\n"
        ));
    }
    let directory = tempfile::tempdir()?;
    let config = directory.path().join("idle.toml");
    std::fs::write(&config, text)?;
    let mut child = Command::new(binary)
        .args(["run", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    wait_ready(format!("127.0.0.1:{admin_port}").parse()?).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss = rss_kib(child.id());
    let _ = child.kill();
    let _ = child.wait();
    Ok(rss)
}

pub(crate) async fn bench_functions(nats: &Nats, binary: &Path, quick: bool) -> anyhow::Result<()> {
    let rounds = if quick { 3 } else { 10 };
    println!("### (g) managed lambda functions\n");
    println!(
        "Cold start, {rounds} rounds each (median, min), memory = 3538 MB (2 vCPU quota where cgroups apply); `auto` on this host: {}:\n",
        isolation_here()
    );
    println!(
        "| handler | isolation | bare start ms | through switchyard ms | added ms (median) |\n|---|---|---|---|---|"
    );
    for (index, handler) in handlers()?.into_iter().enumerate() {
        let _ = bare_start(&handler).await?;
        let mut bare = Vec::new();
        for _ in 0..rounds {
            bare.push(bare_start(&handler).await?);
        }
        let (bare_median, bare_min) = median_and_min(&mut bare);
        // The Rust handler both ways: the host's cgroups (if any) and process groups
        // alone, which tells the kernel's share (moving a process into a cgroup) from
        // Switchyard's own.
        let isolations: &[&str] = if index == 0 {
            &["auto", "process-group"]
        } else {
            &["auto"]
        };
        for isolation in isolations {
            let mut platform =
                platform_cold_starts(nats, binary, &handler, rounds, isolation).await?;
            let (platform_median, platform_min) = median_and_min(&mut platform);
            println!(
                "| {} | {isolation} | {} ({}) | {} ({}) | {:.2} |",
                handler.name,
                milliseconds(bare_median),
                milliseconds(bare_min),
                milliseconds(platform_median),
                milliseconds(platform_min),
                (platform_median.as_secs_f64() - bare_median.as_secs_f64()) * 1000.0
            );
        }
    }
    println!("\ntarget: < 10 ms added for the Rust handler\n");

    let count = if quick { 1_000 } else { 10_000 };
    let rust = installed("SWITCHYARD_LAMBDA_RUST")?;
    println!("Warm invocations of the Rust handler, {count} each:\n");
    println!("| path | invocations/s | p50 ms | p99 ms |\n|---|---|---|---|");
    let mut rie = rie_warm(&rust, count).await?;
    println!(
        "{}",
        rie.row("aws-lambda-rie, 1 instance (its limit), HTTP invoke")
    );
    let mut ratios = Vec::new();
    for instances in [1, 2, 4] {
        let mut pool = pool_warm(&rust, instances, count).await?;
        println!(
            "{}",
            pool.row(&format!("switchyard pool, {instances} instance(s)"))
        );
        ratios.push((
            instances,
            pool.per_second / rie.per_second,
            percentile(&pool.latencies, 0.5).as_secs_f64()
                / percentile(&rie.latencies, 0.5).as_secs_f64(),
        ));
    }
    for (instances, throughput, latency) in ratios {
        println!(
            "\n{instances} instance(s): throughput {throughput:.2}x the emulator's, p50 latency {latency:.2}x"
        );
    }
    println!(
        "\ntarget: per-invocation latency within 1.5x of the emulator's; throughput ahead of it at N > 1\n"
    );

    let none = idle_rss(nats, binary, 0, false).await?;
    let http = idle_rss(nats, binary, 20, false).await?;
    let lambda = idle_rss(nats, binary, 20, true).await?;
    println!("Idle resident memory (VmRSS) of the switchyard process:\n");
    println!("| configuration | MiB |\n|---|---|");
    println!("| no functions | {:.1} |", none as f64 / 1024.0);
    println!(
        "| 20 http functions, 20 triggers | {:.1} |",
        http as f64 / 1024.0
    );
    println!(
        "| 20 lambda functions scaled to zero, 20 triggers | {:.1} |",
        lambda as f64 / 1024.0
    );
    println!(
        "\n20 lambda functions: {:+.1} MiB beside none, {:+.1} MiB beside 20 http functions (target: within 5 MiB of none)\n",
        (lambda as f64 - none as f64) / 1024.0,
        (lambda as f64 - http as f64) / 1024.0
    );
    Ok(())
}

/// `count` POSTs of `body` to `url` from `concurrency` callers: successes per
/// second, each success's latency, how many failed, and the first failure.
async fn http_load(
    url: &str,
    body: &[u8],
    concurrency: usize,
    count: usize,
) -> (f64, Vec<Duration>, usize, Option<String>) {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()
        .expect("client");
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let callers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, next) = (client.clone(), next.clone());
            let (url, body) = (url.to_owned(), body.to_vec());
            tokio::spawn(async move {
                let (mut latencies, mut failed, mut first) = (Vec::new(), 0usize, None);
                while next.fetch_add(1, Ordering::Relaxed) < count {
                    let sent = Instant::now();
                    let answered = client.post(&url).body(body.clone()).send().await;
                    let problem = match answered {
                        Ok(response) => {
                            let status = response.status();
                            let function_error =
                                response.headers().contains_key("x-amz-function-error");
                            let answer = response.bytes().await.unwrap_or_default();
                            (!status.is_success() || function_error).then(|| {
                                format!(
                                    "{status}: {}",
                                    String::from_utf8_lossy(&answer[..answer.len().min(200)])
                                )
                            })
                        }
                        Err(error) => Some(error.to_string()),
                    };
                    match problem {
                        None => latencies.push(sent.elapsed()),
                        Some(problem) => {
                            failed += 1;
                            first.get_or_insert(problem);
                        }
                    }
                }
                (latencies, failed, first)
            })
        })
        .collect();
    let (mut latencies, mut failed, mut first) = (Vec::with_capacity(count), 0, None);
    for caller in callers {
        let (more, failures, problem) = caller.await.expect("caller");
        latencies.extend(more);
        failed += failures;
        if first.is_none() {
            first = problem;
        }
    }
    let per_second = latencies.len() as f64 / started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    (per_second, latencies, failed, first)
}

/// A bare HTTP server answering every request with a small JSON: the `http`
/// function of (h), called directly and through a function URL.
async fn start_echo_server() -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let router = axum::Router::new().fallback(|body: bytes::Bytes| async move {
        (
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            format!("{{\"echoed\":{}}}", body.len()),
        )
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    Ok(format!("http://{address}"))
}

/// (h) Synchronous invocation of the Rust and Python handlers through Switchyard's
/// Invoke API and a function URL (the `switchyard` binary, up to 64 and 16
/// instances) beside the same handlers under aws-lambda-rie's own invoke endpoint;
/// and an `http` function called directly beside through a function URL; at 1, 8
/// and 64 concurrent callers.
pub(crate) async fn bench_sync_invoke(
    nats: &Nats,
    binary: &Path,
    quick: bool,
) -> anyhow::Result<()> {
    let count = if quick { 1_000 } else { 5_000 };
    let rust = installed("SWITCHYARD_LAMBDA_RUST")?;
    let python = installed("SWITCHYARD_LAMBDA_PYTHON")?;
    let python_command = vec![
        python.clone(),
        "-m".to_owned(),
        "awslambdaric".to_owned(),
        "app.handler".to_owned(),
    ];
    let python_directory = tests_functions().join("python");
    let body = switchyard_event::to_structured_json(&bench_event("sync"));
    let echo = start_echo_server().await?;
    // Switchyard with the Invoke API, the handlers as lambda functions, and routes.
    let prefix = format!(
        "benchsync{}",
        uuid::Uuid::new_v4()
            .simple()
            .to_string()
            .get(..6)
            .unwrap_or("x")
    );
    let (invoke_port, http_port, admin_port) = (free_port(), free_port(), free_port());
    let mut text = config_header(&nats.url(), &prefix, admin_port);
    text.push_str(&format!(
        r#"
[invoke_api]
listen = "127.0.0.1:{invoke_port}"
max_wait = "10s"

[[sources]]
type = "http"
name = "http"
listen = "127.0.0.1:{http_port}"
max_body_bytes = 65536
routes = [
  {{ path = "/rust", function = "rust", max_wait = "10s" }},
  {{ path = "/python", function = "python", max_wait = "10s" }},
  {{ path = "/direct", function = "direct", max_wait = "10s" }},
]

[[functions]]
type = "lambda"
name = "rust"
command = [{rust:?}]
handler = "bootstrap"
memory = 3538
max_concurrency = 64
max_cold_starts = 16
timeout = "30s"
idle_timeout = "10m"

[[functions]]
type = "lambda"
name = "python"
command = {python_command:?}
handler = "app.handler"
directory = {python_directory:?}
memory = 1769
max_concurrency = 16
max_cold_starts = 16
timeout = "30s"
idle_timeout = "10m"

[[functions]]
type = "http"
name = "direct"
url = "{echo}"
max_concurrency = 64
"#,
        python_directory = python_directory.display().to_string(),
    ));
    let directory = tempfile::tempdir()?;
    let config = directory.path().join("sync.toml");
    std::fs::write(&config, text)?;
    let mut child = Command::new(binary)
        .args(["run", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    wait_ready(format!("127.0.0.1:{admin_port}").parse()?).await;
    let invoke = |function: &str| {
        format!("http://127.0.0.1:{invoke_port}/2015-03-31/functions/{function}/invocations")
    };
    let route = |path: &str| format!("http://127.0.0.1:{http_port}{path}");
    println!("### (h) synchronous invocation, {count} calls per row\n");
    println!(
        "| handler | callers | path | invocations/s | p50 ms | p99 ms | failed |\n|---|---|---|---|---|---|---|"
    );
    let handlers: [(&str, Vec<String>, PathBuf, &str, usize); 2] = [
        ("rust", vec![rust.clone()], tests_functions(), "rust", 64),
        ("python", python_command, python_directory, "python", 16),
    ];
    for (name, command, directory, function, instances) in handlers {
        let (mut emulator, rie_url) = start_rie_command(&command, &directory).await?;
        // Warm: every instance started, through both doors.
        for url in [invoke(function), route(&format!("/{function}"))] {
            let (_, warmed, failed, first) = http_load(&url, &body, instances, 2_000).await;
            anyhow::ensure!(
                failed == 0 && !warmed.is_empty(),
                "warm-up of {url} failed ({failed} failures, first: {first:?})"
            );
        }
        for callers in [1, 8, 64] {
            for (path, url) in [
                (
                    "aws-lambda-rie invoke endpoint (1 instance)".to_owned(),
                    rie_url.clone(),
                ),
                (
                    format!("switchyard Invoke API (up to {instances} instances)"),
                    invoke(function),
                ),
                (
                    format!("switchyard function URL (up to {instances} instances)"),
                    route(&format!("/{function}")),
                ),
            ] {
                let (per_second, latencies, failed, first) =
                    http_load(&url, &body, callers, count).await;
                println!(
                    "| {name} | {callers} | {path} | {per_second:.0} | {} | {} | {failed}{} |",
                    milliseconds(percentile(&latencies, 0.5)),
                    milliseconds(percentile(&latencies, 0.99)),
                    first.map_or_else(String::new, |first| format!(" (first: {first})")),
                );
            }
        }
        let _ = emulator.kill();
        let _ = emulator.wait();
    }
    // An `http` function: called directly, and through a function URL.
    for callers in [1, 8, 64] {
        for (path, url) in [
            ("http function called directly", format!("{echo}/direct")),
            ("http function through a function URL", route("/direct")),
        ] {
            let (per_second, latencies, failed, first) =
                http_load(&url, &body, callers, count).await;
            println!(
                "| http (bare axum) | {callers} | {path} | {per_second:.0} | {} | {} | {failed}{} |",
                milliseconds(percentile(&latencies, 0.5)),
                milliseconds(percentile(&latencies, 0.99)),
                first.map_or_else(String::new, |first| format!(" (first: {first})")),
            );
        }
    }
    println!(
        "\ntarget: added p50 < 1 ms warm (1 caller), throughput ahead of the emulator at 8+ callers. (aws-lambda-rie runs one invocation at a time; overlapping invokes make it panic, `ReserveFailed: AlreadyReserved` then a nil pointer dereference, after which every call fails: its 1-caller rate is its ceiling.)\n"
    );
    let _ = child.kill();
    let _ = child.wait();
    Ok(())
}
