//! (k) The cost of traces: the `switchyard` binary as three processes side by side,
//! traces off, on at 10% sampling and on at 100%, exporting over OTLP/HTTP to a sink
//! in this process that takes every export and answers 200 (a backend doing nothing,
//! so what is measured is Switchyard's side: spans, sampling, encoding, sending).
//!
//! - ingest: `POST /v1/events` to PubAck from 64 connections, rounds alternating the
//!   three processes (each round starting with another), best round of each (as (a));
//! - dispatch: events stored first (by the same process, so they carry its ingest
//!   spans' `traceparent`), then a trigger started from the first stored event to a
//!   no-op HTTP function, 64 in flight: rate between the first and the last arrival;
//!   rounds alternate the three, best of each;
//! - the CPU time (user + system) the `switchyard` process spent per event, the lowest
//!   of the rounds: steadier than rates on a shared 2-core machine;
//! - off: what a disabled span site costs (the only code traces add while off), timed
//!   over 10 million calls in this process, where no tracer is installed.

use std::convert::Infallible;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

use crate::{Nats, NoopFunction, config_header, cpu_time, drive, free_port, summarize, wait_ready};

/// An OTLP/HTTP sink: counts export requests and their bytes, answers 200.
#[derive(Clone, Default)]
struct Sink {
    requests: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
}

impl Sink {
    async fn start(&self) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let sink = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let sink = sink.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                        let sink = sink.clone();
                        async move {
                            let body = request.into_body().collect().await;
                            let length = body.map_or(0, |body| body.to_bytes().len());
                            sink.requests.fetch_add(1, Ordering::Relaxed);
                            sink.bytes.fetch_add(length as u64, Ordering::Relaxed);
                            let mut response = Response::new(Full::new(Bytes::new()));
                            response.headers_mut().insert(
                                "content-type",
                                hyper::header::HeaderValue::from_static("application/x-protobuf"),
                            );
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
}

/// One way of running: its label and sampling ratio (`None`: traces off).
const VARIANTS: [(&str, Option<f64>); 3] = [
    ("traces off", None),
    ("traces on, 10% sampled", Some(0.1)),
    ("traces on, 100% sampled", Some(1.0)),
];

/// A `switchyard` process of one variant.
struct Running {
    child: Child,
    http_port: u16,
    _directory: tempfile::TempDir,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start(
    binary: &Path,
    nats: &Nats,
    prefix: &str,
    ratio: Option<f64>,
    sink: std::net::SocketAddr,
    function: Option<&str>,
) -> anyhow::Result<Running> {
    let (http_port, admin_port) = (free_port(), free_port());
    let mut text = config_header(&nats.url(), prefix, admin_port);
    text.push_str(&format!(
        "[[sources]]\ntype = \"http\"\nname = \"http\"\nlisten = \"127.0.0.1:{http_port}\"\n"
    ));
    if let Some(url) = function {
        text.push_str(&format!(
            "[[functions]]\ntype = \"http\"\nname = \"noop\"\nurl = \"{url}\"\nmax_concurrency = 64\n[[triggers]]\nname = \"bench\"\nfunction = \"noop\"\nmax_concurrency = 64\nstart = \"all\"\n"
        ));
    }
    if let Some(ratio) = ratio {
        text.push_str(&format!(
            "[telemetry]\notlp_endpoint = \"http://{sink}\"\nsampling_ratio = {ratio:?}\n"
        ));
    }
    let directory = tempfile::tempdir()?;
    let config_path = directory.path().join("bench.toml");
    std::fs::write(&config_path, text)?;
    let child = Command::new(binary)
        .arg("run")
        .arg("--config")
        .arg(&config_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let running = Running {
        child,
        http_port,
        _directory: directory,
    };
    wait_ready(format!("127.0.0.1:{admin_port}").parse()?).await;
    Ok(running)
}

/// The time one disabled span site takes (no tracer installed in this process).
fn off_cost() -> Duration {
    use switchyard_event::telemetry::{SpanKind, start_ingest};
    let mut event = switchyard_event::Event::new("1", "/bench", "com.example.bench");
    let calls = 10_000_000u32;
    let started = Instant::now();
    for _ in 0..calls {
        let span = start_ingest(
            std::hint::black_box(&mut event),
            "ingest",
            SpanKind::Server,
            "http",
        );
        std::hint::black_box(&span);
    }
    started.elapsed() / calls
}

/// The span work of one event at 10% sampling (ingest, store, attempt and
/// invocation spans, and the `traceparent` each hands on), with the SDK and the OTLP
/// exporter installed in this process, sending to `sink`: its time per event.
async fn on_cost(sink: std::net::SocketAddr) -> anyhow::Result<Duration> {
    use switchyard_event::telemetry::{KeyValue, SpanKind, TraceSpan, event_context, start_ingest};
    let config = switchyard::telemetry::TelemetryConfig {
        otlp_endpoint: Some(format!("http://{sink}")),
        sampling_ratio: 0.1,
        ..Default::default()
    };
    let telemetry = switchyard::telemetry::start(&config)?.context("traces are on")?;
    let events = 200_000u32;
    // On a thread of its own (the exporter's runs beside it, as in the binary).
    let took = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        for index in 0..events {
            let mut event =
                switchyard_event::Event::new(index.to_string(), "/bench", "com.example.bench");
            let ingest = start_ingest(&mut event, "ingest http", SpanKind::Server, "http");
            let store = TraceSpan::start(
                "store",
                SpanKind::Producer,
                event_context(&event).as_ref(),
                || vec![KeyValue::new("messaging.system", "nats")],
            );
            drop(store);
            drop(ingest);
            let attempt = TraceSpan::start(
                "deliver bench",
                SpanKind::Consumer,
                event_context(&event).as_ref(),
                || vec![KeyValue::new("switchyard.attempt", 1)],
            );
            let invoke =
                TraceSpan::start("invoke noop", SpanKind::Client, attempt.context(), || {
                    vec![KeyValue::new("faas.invoked_name", "noop")]
                });
            let mut called = event.clone();
            if let Some(traceparent) = invoke.traceparent() {
                called
                    .extensions
                    .insert("traceparent".to_owned(), traceparent);
            }
            std::hint::black_box(&called);
            drop(invoke);
            drop(attempt);
        }
        started.elapsed() / events
    })
    .await?;
    telemetry.shutdown().await;
    Ok(took)
}

pub(crate) async fn bench_telemetry(
    nats: &Nats,
    binary: &Path,
    count: usize,
    rounds: usize,
) -> anyhow::Result<()> {
    let sinks: Vec<Sink> = VARIANTS.iter().map(|_| Sink::default()).collect();
    let mut addresses = Vec::new();
    for sink in &sinks {
        addresses.push(sink.start().await);
    }

    // Ingest: the three processes side by side, rounds alternating.
    let mut ingest = Vec::new();
    for (index, (_, ratio)) in VARIANTS.iter().enumerate() {
        ingest.push(
            start(
                binary,
                nats,
                &format!("benchtelingest{index}"),
                *ratio,
                addresses[index],
                None,
            )
            .await?,
        );
    }
    for (index, running) in ingest.iter().enumerate() {
        let url = format!("http://127.0.0.1:{}/v1/events", running.http_port);
        drive(&url, 2000, 64, &format!("warm-{index}")).await;
    }
    let mut best_ingest = vec![0f64; VARIANTS.len()];
    let mut ingest_cpu = vec![Duration::MAX; VARIANTS.len()];
    // Each round starts with another variant, so no variant always runs first.
    let order = |round: usize| (0..VARIANTS.len()).map(move |step| (round + step) % VARIANTS.len());
    for round in 0..rounds {
        for index in order(round) {
            let running = &ingest[index];
            let url = format!("http://127.0.0.1:{}/v1/events", running.http_port);
            let cpu_before = cpu_time(running.child.id());
            let (elapsed, latencies) = drive(&url, count, 64, &format!("r{round}")).await;
            let cpu = cpu_time(running.child.id()) - cpu_before;
            let result = summarize(count, elapsed, latencies);
            println!(
                "  ingest round {round}: {} {:.0}/s, {:.1} us CPU per event",
                VARIANTS[index].0,
                result.rate,
                cpu.as_secs_f64() * 1e6 / count as f64
            );
            best_ingest[index] = best_ingest[index].max(result.rate);
            ingest_cpu[index] = ingest_cpu[index].min(cpu);
        }
    }
    drop(ingest);

    // Dispatch: per round and variant, events stored first, then delivered.
    let mut best_dispatch = vec![0f64; VARIANTS.len()];
    let mut dispatch_cpu = vec![Duration::MAX; VARIANTS.len()];
    for round in 0..rounds {
        for index in order(round) {
            let (label, ratio) = &VARIANTS[index];
            let prefix = format!("benchteldispatch{round}x{index}");
            {
                let storing = start(binary, nats, &prefix, *ratio, addresses[index], None).await?;
                let url = format!("http://127.0.0.1:{}/v1/events", storing.http_port);
                drive(&url, count, 64, "d").await;
            }
            let function = NoopFunction::start(true).await;
            let delivering = start(
                binary,
                nats,
                &prefix,
                *ratio,
                addresses[index],
                Some(&function.url()),
            )
            .await?;
            let cpu_before = cpu_time(delivering.child.id());
            let deadline = Instant::now() + Duration::from_secs(120);
            while function.arrivals.lock().unwrap().len() < count {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "not every event reached the function"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let cpu = cpu_time(delivering.child.id()) - cpu_before;
            let arrivals = function.arrivals.lock().unwrap();
            let first = arrivals.values().min().copied().unwrap();
            let last = arrivals.values().max().copied().unwrap();
            let rate = (count - 1) as f64 / last.duration_since(first).as_secs_f64();
            println!(
                "  dispatch round {round}: {label} {rate:.0}/s, {:.1} us CPU per event",
                cpu.as_secs_f64() * 1e6 / count as f64
            );
            best_dispatch[index] = best_dispatch[index].max(rate);
            dispatch_cpu[index] = dispatch_cpu[index].min(cpu);
        }
    }

    let off = off_cost();
    let on = on_cost(addresses[1]).await?;
    println!(
        "\n### (k) traces: off vs on, {count} events, 64 connections / 64 in flight, best of {rounds}, exporting to a sink that takes everything\n"
    );
    println!(
        "| variant | ingest events/s | vs off | ingest CPU us/event | vs off | dispatch events/s | vs off | dispatch CPU us/event | vs off | exports | MB exported |\n|---|---|---|---|---|---|---|---|---|---|---|"
    );
    let per_event = |cpu: Duration| cpu.as_secs_f64() * 1e6 / count as f64;
    for (index, (label, _)) in VARIANTS.iter().enumerate() {
        println!(
            "| {label} | {:.0} | {:.0}% | {:.1} | {:.0}% | {:.0} | {:.0}% | {:.1} | {:.0}% | {} | {:.1} |",
            best_ingest[index],
            100.0 * best_ingest[index] / best_ingest[0],
            per_event(ingest_cpu[index]),
            100.0 * per_event(ingest_cpu[index]) / per_event(ingest_cpu[0]),
            best_dispatch[index],
            100.0 * best_dispatch[index] / best_dispatch[0],
            per_event(dispatch_cpu[index]),
            100.0 * per_event(dispatch_cpu[index]) / per_event(dispatch_cpu[0]),
            sinks[index].requests.load(Ordering::Relaxed),
            sinks[index].bytes.load(Ordering::Relaxed) as f64 / 1e6,
        );
    }
    println!(
        "\noff: a disabled span site takes {:.2} ns (10 million calls); an event passes 5 of them (ingest, store, deliver, invoke, cold start)\n\non at 10%: the span work of one event (ingest, store, attempt, invocation, their traceparents) takes {:.2} us on one thread (200,000 events, the SDK and OTLP exporter in this process), beside the {:.1} us of CPU an event costs the process with traces off (ingest + dispatch above): {:.1}%\n\ntarget: off costs nothing measurable; on at 10% costs < 10%\n",
        off.as_secs_f64() * 1e9,
        on.as_secs_f64() * 1e6,
        per_event(ingest_cpu[0]) + per_event(dispatch_cpu[0]),
        100.0 * on.as_secs_f64() * 1e6 / (per_event(ingest_cpu[0]) + per_event(dispatch_cpu[0])),
    );
    Ok(())
}
