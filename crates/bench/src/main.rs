//! `switchyard-bench`: Switchyard beside bare baselines, in one run on one machine.
//!
//! (a) ingest: `POST /v1/events` to PubAck, Switchyard vs a bare hyper server that
//!     publishes the same events and awaits the PubAck;
//! (b) dispatch to a no-op HTTP function, vs a bare JetStream pull+ack loop, a bare
//!     HTTP client hitting the same function and a bare JetStream -> HTTP bridge, with
//!     batching and the latency on a live stream (see `dispatch.rs`);
//! (c) end-to-end latency from POST to the function at a fixed 1,000 events/s, with the
//!     real `switchyard` binary as its own process;
//! (d) that process's RSS at idle and under the load of (c);
//! (e) Kafka -> function beside bare rdkafka loops (see `kafka.rs`), with `--kafka`;
//! (j) SQS, RabbitMQ and MQTT -> function beside bare client-to-HTTP bridges (see
//! `queues.rs`), with `--queues-only` alone;
//! (f) object store -> function (see `objects.rs`);
//! (g) managed lambda functions: cold start beside a bare start, warm invocations
//!     beside AWS's Runtime Interface Emulator, idle memory (see `functions.rs`);
//! (h) synchronous invocation through the Lambda Invoke API beside the emulator's
//!     invoke endpoint, at 1, 8 and 64 callers (`--invoke-only`);
//! (k) traces off vs on at 10% and 100% sampling, ingest and dispatch (see
//!     `telemetry.rs`; `--telemetry-only`);
//! (l) a quiet function's calls beside one printing 10,000 lines/s (see `logs.rs`;
//!     `--logs-only`).
//!
//! Everything runs on 127.0.0.1 against a real nats-server with file storage. Run it
//! with `scripts/bench.sh`; the method is in docs/BENCHMARKS.md.

mod deploy;
mod dispatch;
mod functions;
mod kafka;
mod logs;
mod objects;
mod queues;
mod telemetry;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use switchyard_bus::async_nats::jetstream;

const PAYLOAD: &str = r#"{"order":{"id":"A-1042","amount":129.95,"currency":"EUR","items":[{"sku":"tea-01","qty":3},{"sku":"mug-07","qty":1}]},"customer":"c-77"}"#;

use switchyard_testkit::free_port;

/// The nats-server of the run (file storage, random port), from the project's
/// install (`SWITCHYARD_NATS_SERVER`, set by scripts/bench.sh).
type Nats = switchyard_testkit::NatsServer;

/// The `[nats]` (streams named after `prefix`, so runs do not meet), `[admin]` and
/// `[log]` sections every bench configuration starts with.
fn config_header(nats_url: &str, prefix: &str, admin_port: u16) -> String {
    format!(
        r#"
[nats]
url = "{nats_url}"
subject_prefix = "{prefix}"
events_stream = {{ name = "{upper}_EVENTS" }}
dead_letter_stream = {{ name = "{upper}_DLQ" }}
[admin]
listen = "127.0.0.1:{admin_port}"
[log]
level = "error"
"#,
        upper = prefix.to_uppercase()
    )
}

fn config_text(
    nats_url: &str,
    prefix: &str,
    http_port: u16,
    admin_port: u16,
    function_url: Option<&str>,
    start_all: bool,
) -> String {
    let mut text = config_header(nats_url, prefix, admin_port);
    text.push_str(&format!(
        r#"[[sources]]
type = "http"
name = "http"
listen = "127.0.0.1:{http_port}"
"#
    ));
    if let Some(url) = function_url {
        text.push_str(&format!(
            "[[functions]]\ntype = \"http\"\nname = \"noop\"\nurl = \"{url}\"\nmax_concurrency = 64\nconcurrency_scope = \"{scope}\"\n[[triggers]]\nname = \"bench\"\nfunction = \"noop\"\nmax_concurrency = 64\nstart = \"{}\"\n",
            if start_all { "all" } else { "new" },
            scope = if std::env::args().any(|argument| argument == "--process-scope") { "process" } else { "cluster" }
        ));
    }
    text
}

async fn wait_ready(admin: SocketAddr) {
    let client = reqwest::Client::new();
    loop {
        if let Ok(response) = client.get(format!("http://{admin}/readyz")).send().await
            && response.status() == 200
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A no-op function: answers 200 at once, counts calls, and (when asked) records when
/// each event id arrived.
#[derive(Clone)]
struct NoopFunction {
    address: SocketAddr,
    count: Arc<AtomicU64>,
    arrivals: Arc<Mutex<HashMap<String, Instant>>>,
    /// With `record`: how long after its `time` attribute each event arrived.
    lags: Arc<Mutex<Vec<Duration>>>,
}

impl NoopFunction {
    async fn start(record: bool) -> NoopFunction {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let function = NoopFunction {
            address: listener.local_addr().unwrap(),
            count: Arc::new(AtomicU64::new(0)),
            arrivals: Arc::new(Mutex::new(HashMap::new())),
            lags: Arc::new(Mutex::new(Vec::new())),
        };
        let state = function.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let state = state.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                        let state = state.clone();
                        async move {
                            if record
                                && let Some(id) = request
                                    .headers()
                                    .get("ce-id")
                                    .and_then(|value| value.to_str().ok())
                            {
                                state
                                    .arrivals
                                    .lock()
                                    .unwrap()
                                    .insert(id.to_owned(), Instant::now());
                            }
                            if record
                                && let Some(time) = request
                                    .headers()
                                    .get("ce-time")
                                    .and_then(|value| value.to_str().ok())
                                    .and_then(|value| {
                                        time::OffsetDateTime::parse(
                                            value,
                                            &time::format_description::well_known::Rfc3339,
                                        )
                                        .ok()
                                    })
                            {
                                let lag = time::OffsetDateTime::now_utc() - time;
                                state
                                    .lags
                                    .lock()
                                    .unwrap()
                                    .push(Duration::try_from(lag).unwrap_or_default());
                            }
                            let batch =
                                request.headers().get("content-type").is_some_and(|value| {
                                    value
                                        .as_bytes()
                                        .starts_with(b"application/cloudevents-batch+json")
                                });
                            let body = request.into_body().collect().await;
                            // A batch counts its events.
                            let events = match body {
                                Ok(body) if batch => {
                                    serde_json::from_slice::<Vec<&serde_json::value::RawValue>>(
                                        &body.to_bytes(),
                                    )
                                    .map_or(1, |events| events.len() as u64)
                                }
                                _ => 1,
                            };
                            state.count.fetch_add(events, Ordering::Relaxed);
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        function
    }

    fn url(&self) -> String {
        format!("http://{}/", self.address)
    }
}

/// A bare hyper server that publishes each binary-mode request to JetStream and
/// answers 202 after the PubAck: the floor Switchyard's ingest is compared with.
async fn start_bare_ingest(context: jetstream::Context, subject: String) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let context = context.clone();
            let subject = subject.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                    let context = context.clone();
                    let subject = subject.clone();
                    async move {
                        let mut headers = switchyard_bus::async_nats::HeaderMap::new();
                        for (name, value) in request.headers() {
                            if name.as_str().starts_with("ce-") || name == "content-type" {
                                headers.insert(name.as_str(), value.to_str().unwrap_or_default());
                            }
                        }
                        let id = headers
                            .get("ce-id")
                            .map(|value| value.as_str().to_owned())
                            .unwrap_or_default();
                        headers.insert("Nats-Msg-Id", id.as_str());
                        let body = request
                            .into_body()
                            .collect()
                            .await
                            .map(|body| body.to_bytes())
                            .unwrap_or_default();
                        let status =
                            match context.publish_with_headers(subject, headers, body).await {
                                Ok(ack) => match ack.await {
                                    Ok(_) => 202,
                                    Err(_) => 503,
                                },
                                Err(_) => 503,
                            };
                        let mut response =
                            Response::new(Full::new(Bytes::from(format!("{{\"id\":\"{id}\"}}"))));
                        *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    address
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(usize::MAX)
        .tcp_nodelay(true)
        .build()
        .unwrap()
}

fn binary_request(client: &reqwest::Client, url: &str, id: &str) -> reqwest::RequestBuilder {
    client
        .post(url)
        .header("ce-specversion", "1.0")
        .header("ce-id", id)
        .header("ce-source", "/bench")
        .header("ce-type", "com.example.bench.order")
        .header("content-type", "application/json")
        .body(PAYLOAD)
}

/// Sends `count` events from `concurrency` connections; returns the elapsed time and
/// each request's latency.
async fn drive(
    url: &str,
    count: usize,
    concurrency: usize,
    id_prefix: &str,
) -> (Duration, Vec<Duration>) {
    let client = client();
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let client = client.clone();
        let next = next.clone();
        let url = url.to_owned();
        let id_prefix = id_prefix.to_owned();
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed) as usize;
                if index >= count {
                    return latencies;
                }
                let sent = Instant::now();
                let response = binary_request(&client, &url, &format!("{id_prefix}-{index}"))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 202);
                let _ = response.bytes().await;
                latencies.push(sent.elapsed());
            }
        }));
    }
    let mut latencies = Vec::with_capacity(count);
    for worker in workers {
        latencies.extend(worker.await.unwrap());
    }
    (started.elapsed(), latencies)
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * fraction).round() as usize]
}

fn milliseconds(duration: Duration) -> String {
    format!("{:.2}", duration.as_secs_f64() * 1000.0)
}

struct Throughput {
    rate: f64,
    p50: Duration,
    p99: Duration,
}

fn summarize(count: usize, elapsed: Duration, mut latencies: Vec<Duration>) -> Throughput {
    latencies.sort_unstable();
    Throughput {
        rate: count as f64 / elapsed.as_secs_f64(),
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
    }
}

async fn bench_ingest(
    nats: &Nats,
    count: usize,
    concurrency: usize,
    rounds: usize,
) -> anyhow::Result<()> {
    let prefix = "benchingest";
    let (http_port, admin_port) = (free_port(), free_port());
    let text = config_text(&nats.url(), prefix, http_port, admin_port, None, false);
    let config = switchyard::config::parse(Path::new("bench.toml"), &text, &|_| None)
        .map_err(|errors| anyhow::anyhow!("{errors}"))?;
    let running = switchyard::start(config).await?;
    wait_ready(running.admin.unwrap()).await;
    let switchyard_url = format!("http://127.0.0.1:{http_port}/v1/events");

    let client = switchyard_bus::async_nats::connect(nats.url()).await?;
    let context = jetstream::ContextBuilder::new()
        .max_ack_inflight(1024)
        .backpressure_on_inflight(true)
        .build(client);
    let bare = start_bare_ingest(
        context,
        format!("{prefix}.events.bare.com.example.bench.order"),
    )
    .await;
    let bare_url = format!("http://{bare}/");

    drive(&switchyard_url, 2000, concurrency, "warm-sy").await;
    drive(&bare_url, 2000, concurrency, "warm-bare").await;
    // Rounds alternate the two servers; the best round of each counts.
    let contenders = [
        ("switchyard", &switchyard_url, "sy"),
        ("bare hyper", &bare_url, "bare"),
    ];
    let mut best: [Option<Throughput>; 2] = [None, None];
    for round in 0..rounds {
        for (index, (label, url, id_prefix)) in contenders.iter().enumerate() {
            let (elapsed, latencies) =
                drive(url, count, concurrency, &format!("{id_prefix}-{round}")).await;
            let result = summarize(count, elapsed, latencies);
            println!(
                "  round {round}: {label} {:.0}/s p50 {} ms p99 {} ms",
                result.rate,
                milliseconds(result.p50),
                milliseconds(result.p99)
            );
            if best[index]
                .as_ref()
                .is_none_or(|best| result.rate > best.rate)
            {
                best[index] = Some(result);
            }
        }
    }
    let [best_switchyard, best_bare] = best;
    let (sy, bare) = (best_switchyard.unwrap(), best_bare.unwrap());
    println!(
        "\n### (a) ingest: POST /v1/events to PubAck ({count} events, {concurrency} connections, best of {rounds})\n"
    );
    println!("| server | events/s | p50 ms | p99 ms |\n|---|---|---|---|");
    println!(
        "| switchyard HTTP source | {:.0} | {} | {} |",
        sy.rate,
        milliseconds(sy.p50),
        milliseconds(sy.p99)
    );
    println!(
        "| bare hyper + publish + PubAck | {:.0} | {} | {} |",
        bare.rate,
        milliseconds(bare.p50),
        milliseconds(bare.p99)
    );
    println!(
        "\nratio: {:.0}% of the bare server (target >= 80%)\n",
        100.0 * sy.rate / bare.rate
    );
    running.stop().await?;
    Ok(())
}

/// CPU time (user + system) a process has used so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    let per_second = 100; // USER_HZ on Linux
    Duration::from_millis(ticks * 1000 / per_second)
}

/// CPU used by this process and the nats-server together.
fn cpu_both(nats: &Nats) -> Duration {
    cpu_time(std::process::id()) + nats.pid().map_or(Duration::ZERO, cpu_time)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmRSS:"))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|value| value.parse().ok())
        })
        .unwrap_or(0)
}

async fn bench_latency_and_memory(
    nats: &Nats,
    binary: &Path,
    rate: u64,
    seconds: u64,
) -> anyhow::Result<()> {
    let prefix = "benchlatency";
    let function = NoopFunction::start(true).await;
    let (http_port, admin_port) = (free_port(), free_port());
    let text = config_text(
        &nats.url(),
        prefix,
        http_port,
        admin_port,
        Some(&function.url()),
        false,
    );
    let directory = tempfile::tempdir()?;
    let config_path = directory.path().join("bench.toml");
    std::fs::write(&config_path, text)?;
    let mut child = Command::new(binary)
        .arg("run")
        .arg("--config")
        .arg(&config_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let pid = child.id();
    wait_ready(format!("127.0.0.1:{admin_port}").parse()?).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_rss = rss_kib(pid);

    let peak_rss = Arc::new(AtomicU64::new(idle_rss));
    let sampling = {
        let peak_rss = peak_rss.clone();
        tokio::spawn(async move {
            loop {
                peak_rss.fetch_max(rss_kib(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let client = client();
    let url = format!("http://127.0.0.1:{http_port}/v1/events");
    for index in 0..200 {
        let _ = binary_request(&client, &url, &format!("warm-{index}"))
            .send()
            .await;
    }
    let total = rate * seconds;
    let sent_at = Arc::new(Mutex::new(HashMap::with_capacity(total as usize)));
    let mut ticker = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut requests = Vec::with_capacity(total as usize);
    let started = Instant::now();
    for index in 0..total {
        ticker.tick().await;
        let client = client.clone();
        let url = url.clone();
        let sent_at = sent_at.clone();
        requests.push(tokio::spawn(async move {
            let id = format!("l-{index}");
            sent_at.lock().unwrap().insert(id.clone(), Instant::now());
            let response = binary_request(&client, &url, &id).send().await.unwrap();
            assert_eq!(response.status(), 202);
        }));
    }
    let offered = total as f64 / started.elapsed().as_secs_f64();
    for request in requests {
        request.await?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while function
        .arrivals
        .lock()
        .unwrap()
        .keys()
        .filter(|id| id.starts_with("l-"))
        .count()
        < total as usize
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "not every event reached the function"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sampling.abort();
    let arrivals = function.arrivals.lock().unwrap();
    let sent_at = sent_at.lock().unwrap();
    let mut latencies: Vec<Duration> = sent_at
        .iter()
        .map(|(id, sent)| arrivals[id].saturating_duration_since(*sent))
        .collect();
    latencies.sort_unstable();
    println!(
        "### (c) end-to-end latency, POST -> function, {total} events at {rate}/s (offered {offered:.0}/s), switchyard as its own process\n"
    );
    println!("| p50 ms | p90 ms | p99 ms | max ms |\n|---|---|---|---|");
    println!(
        "| {} | {} | {} | {} |",
        milliseconds(percentile(&latencies, 0.5)),
        milliseconds(percentile(&latencies, 0.9)),
        milliseconds(percentile(&latencies, 0.99)),
        milliseconds(*latencies.last().unwrap())
    );
    println!("\ntarget: p99 < 10 ms\n");
    println!("### (d) resident memory of the switchyard process (VmRSS)\n");
    println!("| idle | peak under (c) |\n|---|---|");
    println!(
        "| {:.1} MiB | {:.1} MiB |",
        idle_rss as f64 / 1024.0,
        peak_rss.load(Ordering::Relaxed) as f64 / 1024.0
    );
    println!("\ntarget: idle < 30 MB\n");
    let _ = child.kill();
    let _ = child.wait();
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let arguments: Vec<String> = std::env::args().collect();
    let quick = arguments.iter().any(|argument| argument == "--quick");
    let binary: PathBuf = std::env::current_exe()?.with_file_name("switchyard");
    // Two workers, the machine's cores; the load generators share them, as they would
    // on a 2-core host.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(
            std::env::var("SWITCHYARD_BENCH_WORKERS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(2),
        )
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let nats = Nats::start();
        let (count, rounds) = if quick { (2_000, 1) } else { (20_000, 3) };
        if arguments
            .iter()
            .any(|argument| argument == "--objects-only")
        {
            let (notified, polled) = if quick { (500, 2_000) } else { (2_000, 20_000) };
            objects::bench_objects(&nats, notified, polled).await?;
            return Ok(());
        }
        if arguments.iter().any(|argument| argument == "--poll-memory") {
            let sizes: &[usize] = if quick {
                &[1_000, 10_000]
            } else {
                &[10_000, 100_000]
            };
            objects::bench_poll_memory(&nats, &binary, sizes).await?;
            return Ok(());
        }
        if arguments
            .iter()
            .any(|argument| argument == "--functions-only")
        {
            functions::bench_functions(&nats, &binary, quick).await?;
            functions::bench_sync_invoke(&nats, &binary, quick).await?;
            return Ok(());
        }
        if arguments.iter().any(|argument| argument == "--deploy-only") {
            deploy::bench_deploy(&nats, &binary, quick).await?;
            return Ok(());
        }
        if arguments.iter().any(|argument| argument == "--invoke-only") {
            functions::bench_sync_invoke(&nats, &binary, quick).await?;
            return Ok(());
        }
        if arguments.iter().any(|argument| argument == "--queues-only") {
            let (sqs, others) = if quick {
                (1_000, 2_000)
            } else {
                (5_000, 20_000)
            };
            queues::bench_queues(&nats, sqs, others).await?;
            return Ok(());
        }
        if arguments
            .iter()
            .any(|argument| argument == "--telemetry-only")
        {
            // Five rounds: the dispatch rates of one process vary by a fifth
            // between rounds on two shared cores.
            telemetry::bench_telemetry(&nats, &binary, count, if quick { 1 } else { 5 }).await?;
            return Ok(());
        }
        if arguments.iter().any(|argument| argument == "--logs-only") {
            logs::bench_logs(&nats, &binary, quick).await?;
            return Ok(());
        }
        if arguments.iter().any(|argument| argument == "--kafka-only") {
            kafka::bench_kafka(&nats, if quick { 5_000 } else { 100_000 }).await?;
            return Ok(());
        }
        if arguments
            .iter()
            .any(|argument| argument == "--dispatch-only")
        {
            // For profiling one part alone.
            dispatch::bench_dispatch(&nats, 50_000).await?;
            return Ok(());
        }
        println!(
            "## run: {} cores, nats-server file storage on 127.0.0.1\n",
            std::thread::available_parallelism().map_or(0, |cores| cores.get())
        );
        bench_ingest(&nats, count, 64, rounds).await?;
        dispatch::bench_dispatch(&nats, count).await?;
        bench_latency_and_memory(&nats, &binary, 1000, if quick { 2 } else { 10 }).await?;
        kafka::bench_kafka(&nats, if quick { 5_000 } else { 100_000 }).await?;
        let (notified, polled) = if quick { (500, 2_000) } else { (2_000, 20_000) };
        objects::bench_objects(&nats, notified, polled).await?;
        let (sqs, others) = if quick {
            (1_000, 2_000)
        } else {
            (5_000, 20_000)
        };
        queues::bench_queues(&nats, sqs, others).await?;
        functions::bench_functions(&nats, &binary, quick).await?;
        functions::bench_sync_invoke(&nats, &binary, quick).await?;
        deploy::bench_deploy(&nats, &binary, quick).await?;
        telemetry::bench_telemetry(&nats, &binary, count, if quick { 1 } else { 5 }).await?;
        logs::bench_logs(&nats, &binary, quick).await?;
        Ok(())
    })
}
