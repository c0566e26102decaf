//! (b) dispatch: stored events -> a no-op HTTP function, Switchyard's dispatcher beside
//! bare loops doing the same work, in one run.
//!
//! Throughput over `count` events stored first: a bare JetStream pull + ack loop, a
//! bare HTTP client, a bare JetStream -> HTTP bridge (the loop one would write by hand:
//! durable pull consumer fetching in batches, each event POSTed in binary mode with 64
//! in flight, acked after its 2xx; no filter, no retries, no permits), Switchyard with
//! one event per invocation and Switchyard batching (up to 100 events per call, 8
//! calls in flight). Then the latency of the bridge and of the dispatcher on a live
//! stream: events published at a fixed rate, from just before the publish to the
//! function's receipt.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use switchyard_bus::async_nats::jetstream::{self, consumer::DeliverPolicy, consumer::pull};
use switchyard_event::{Event, EventSink};

use crate::{
    Nats, NoopFunction, PAYLOAD, client, config_header, cpu_both, milliseconds, percentile,
};

/// Events in flight in every contender.
const CONCURRENCY: usize = 64;

fn config(nats: &Nats, prefix: &str, function: &NoopFunction, trigger: &str) -> String {
    let mut text = config_header(&nats.url(), prefix, 0);
    let scope = if std::env::args().any(|argument| argument == "--process-scope") {
        "process"
    } else {
        "cluster"
    };
    text.push_str(&format!(
        "[[functions]]\ntype = \"http\"\nname = \"noop\"\nurl = \"{url}\"\nmax_concurrency = {CONCURRENCY}\nconcurrency_scope = \"{scope}\"\n[[triggers]]\nfunction = \"noop\"\n{trigger}\n",
        url = function.url(),
    ));
    text
}

fn event(id: String) -> Event {
    let mut event = Event::new(id, "/bench", "com.example.bench.order");
    event.datacontenttype = Some("application/json".into());
    event.data = Bytes::from_static(PAYLOAD.as_bytes());
    event
}

/// The bare bridge: pulls from `consumer` in batches and POSTs each event (its
/// CloudEvents headers as they are stored) with `CONCURRENCY` in flight, acking each
/// after a 2xx. Runs until aborted.
async fn bridge(consumer: jetstream::consumer::PullConsumer, url: String) {
    let client = client();
    let in_flight = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(CONCURRENCY)
        .messages()
        .await
        .expect("bridge consumer");
    while let Some(message) = messages.next().await {
        let Ok(message) = message else { continue };
        let permit = in_flight.clone().acquire_owned().await.expect("open");
        let (client, url) = (client.clone(), url.clone());
        tokio::spawn(async move {
            let mut request = client.post(&url);
            if let Some(headers) = &message.headers {
                for (name, values) in headers.iter() {
                    let name: &str = name.as_ref();
                    if name.starts_with("ce-") || name.eq_ignore_ascii_case("content-type") {
                        for value in values {
                            request = request.header(name, value.as_str());
                        }
                    }
                }
            }
            let answered = request.body(message.payload.clone()).send().await;
            if let Ok(response) = answered
                && response.status().is_success()
            {
                let _ = response.bytes().await;
                let _ = message.ack().await;
            }
            drop(permit);
        });
    }
}

/// Waits until the function counted `count` events; returns when it counted the
/// first.
async fn until_counted(function: &NoopFunction, count: usize) -> Instant {
    let mut first = None;
    loop {
        let counted = function.count.load(Ordering::Relaxed) as usize;
        if counted > 0 && first.is_none() {
            first = Some(Instant::now());
        }
        if counted >= count {
            return first.unwrap_or_else(Instant::now);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

struct Row {
    name: &'static str,
    rate: f64,
    cpu_per_event: f64,
    /// Of which nats-server's.
    nats_cpu_per_event: f64,
    /// From the start of the work to the first event's arrival at the function.
    first_after: Option<Duration>,
}

/// Runs `work` (which returns when the first event arrived, if it knows) and returns
/// its throughput over `count` events, from that first arrival to the end (so a
/// process's start-up is not counted), and its CPU per event over the whole work
/// (this process plus nats-server).
async fn measure(
    nats: &Nats,
    name: &'static str,
    count: usize,
    work: impl Future<Output = Option<Instant>>,
) -> Row {
    let nats_cpu = || nats.pid().map_or(Duration::ZERO, crate::cpu_time);
    let (cpu_before, nats_before) = (cpu_both(nats), nats_cpu());
    let started = Instant::now();
    let first = work.await;
    let ended = Instant::now();
    let cpu = cpu_both(nats) - cpu_before;
    let nats_used = nats_cpu() - nats_before;
    Row {
        name,
        rate: count as f64 / (ended - first.unwrap_or(started)).as_secs_f64(),
        cpu_per_event: cpu.as_secs_f64() * 1e6 / count as f64,
        nats_cpu_per_event: nats_used.as_secs_f64() * 1e6 / count as f64,
        first_after: first.map(|first| first - started),
    }
}

/// Publishes `count` events at `rate` per second (each publish its own task, so a
/// slow PubAck does not slow the pace) and returns the latency of each from just
/// before its publish to the function's receipt.
async fn live_latency(
    bus: &switchyard_bus::Bus,
    function: &NoopFunction,
    prefix: &str,
    count: usize,
    rate: u64,
) -> Vec<Duration> {
    let sent: Arc<std::sync::Mutex<HashMap<String, Instant>>> = Arc::default();
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    for index in 0..count {
        ticker.tick().await;
        let id = format!("{prefix}-{index}");
        sent.lock().unwrap().insert(id.clone(), Instant::now());
        let bus = bus.clone();
        tokio::spawn(async move { bus.publish_all(vec![event(id)]).await });
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let arrived = function
            .arrivals
            .lock()
            .unwrap()
            .keys()
            .filter(|id| id.starts_with(prefix))
            .count();
        if arrived >= count || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let sent = sent.lock().unwrap();
    let arrivals = function.arrivals.lock().unwrap();
    let mut latencies: Vec<Duration> = sent
        .iter()
        .filter_map(|(id, at)| arrivals.get(id).map(|arrived| *arrived - *at))
        .collect();
    latencies.sort_unstable();
    latencies
}

pub async fn bench_dispatch(nats: &Nats, count: usize) -> anyhow::Result<()> {
    let prefix = "benchdispatch";
    let function = NoopFunction::start(true).await;
    let single = config(
        nats,
        prefix,
        &function,
        &format!("name = \"single\"\nmax_concurrency = {CONCURRENCY}\nstart = \"all\""),
    );
    let batched = config(
        nats,
        prefix,
        &function,
        "name = \"batched\"\nmax_concurrency = 8\nstart = \"all\"\nbatch = { max_events = 100, window = \"20ms\" }",
    );
    let parse = |text: &str| {
        switchyard::config::parse(Path::new("bench.toml"), text, &|_| None)
            .map_err(|errors| anyhow::anyhow!("{errors}"))
    };
    let (single_text, single, batched) = (single.clone(), parse(&single)?, parse(&batched)?);

    // Store the events first, so every contender reads the same stored events.
    let bus = switchyard_bus::Bus::connect(&single.nats).await?;
    bus.ensure_streams().await?;
    let mut index = 0;
    while index < count {
        let chunk: Vec<Event> = (index..(index + 1000).min(count))
            .map(|index| event(format!("d-{index}")))
            .collect();
        index += chunk.len();
        bus.publish_all(chunk).await?;
    }
    let stream = bus.jetstream().get_stream(bus.events_stream()).await?;
    let only_switchyard = std::env::args().any(|argument| argument == "--switchyard-only");
    let mut rows = Vec::new();

    if !only_switchyard {
        // Bare JetStream: pull and ack every event.
        let consumer = stream
            .create_consumer(pull::Config {
                durable_name: Some("bare-pull".into()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                max_ack_pending: 10_000,
                ..Default::default()
            })
            .await?;
        rows.push(
            measure(nats, "bare JetStream pull + ack", count, async {
                let mut received = 0;
                while received < count {
                    let mut batch = consumer
                        .fetch()
                        .max_messages(256)
                        .messages()
                        .await
                        .expect("fetch");
                    while let Some(message) = batch.next().await {
                        message.expect("message").ack().await.expect("ack");
                        received += 1;
                    }
                }
                None
            })
            .await,
        );

        // Bare HTTP client: POST the same event to the function, 64 at a time.
        let client = client();
        rows.push(
            measure(nats, "bare HTTP client -> function", count, async {
                let next = Arc::new(AtomicU64::new(0));
                let mut workers = Vec::new();
                for _ in 0..CONCURRENCY {
                    let (client, next, url) = (client.clone(), next.clone(), function.url());
                    workers.push(tokio::spawn(async move {
                        while (next.fetch_add(1, Ordering::Relaxed) as usize) < count {
                            let response = crate::binary_request(&client, &url, "bare")
                                .send()
                                .await
                                .unwrap();
                            let _ = response.bytes().await;
                        }
                    }));
                }
                for worker in workers {
                    worker.await.unwrap();
                }
                None
            })
            .await,
        );

        // The bare bridge over its own durable consumer.
        function.count.store(0, Ordering::SeqCst);
        let consumer = stream
            .create_consumer(pull::Config {
                durable_name: Some("bare-bridge".into()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                max_ack_pending: CONCURRENCY as i64,
                ..Default::default()
            })
            .await?;
        rows.push(
            measure(nats, "bare JetStream -> HTTP bridge", count, async {
                let running = tokio::spawn(bridge(consumer, function.url()));
                let first = until_counted(&function, count).await;
                running.abort();
                Some(first)
            })
            .await,
        );
    }

    for (name, config) in [
        ("Switchyard, one event per invocation", single),
        ("Switchyard, batches of up to 100", batched),
    ] {
        function.count.store(0, Ordering::SeqCst);
        rows.push(
            measure(nats, name, count, async {
                let running = switchyard::start(config).await.expect("start");
                let first = until_counted(&function, count).await;
                let ended = Instant::now();
                running.stop().await.expect("stop");
                // Stopping is not counted either.
                Some(first + (Instant::now() - ended))
            })
            .await,
        );
    }

    println!(
        "### (b) dispatch to a no-op HTTP function ({count} stored events, {CONCURRENCY} in flight)\n"
    );
    println!(
        "| loop | events/s | vs bridge | CPU µs per event (bench process + nats-server) | of which nats-server | first event after ms |\n|---|---|---|---|---|---|"
    );
    let bridge_rate = rows
        .iter()
        .find(|row| row.name == "bare JetStream -> HTTP bridge")
        .map(|row| row.rate);
    for row in &rows {
        let versus = bridge_rate.map_or(String::from("-"), |bridge| {
            format!("{:.0}%", 100.0 * row.rate / bridge)
        });
        println!(
            "| {} | {:.0} | {versus} | {:.1} | {:.1} | {} |",
            row.name,
            row.rate,
            row.cpu_per_event,
            row.nats_cpu_per_event,
            row.first_after.map_or(String::from("-"), milliseconds)
        );
    }

    // Latency on a live stream, 1,000 events/s for 3 s.
    let (live, rate) = (3_000, 1_000);
    println!("\nlatency, {live} events published at {rate}/s, publish -> function:\n");
    println!("| loop | p50 ms | p99 ms | max ms |\n|---|---|---|---|");
    let running = switchyard::start(parse(&single_text)?).await?;
    let mut ready = running.ready.clone();
    let _ = ready.wait_for(|ready| *ready).await;
    let latencies = live_latency(&bus, &function, "lat-s", live, rate).await;
    running.stop().await?;
    let print = |name: &str, latencies: &[Duration]| {
        println!(
            "| {name} | {} | {} | {} |",
            milliseconds(percentile(latencies, 0.50)),
            milliseconds(percentile(latencies, 0.99)),
            milliseconds(latencies.last().copied().unwrap_or_default()),
        );
        if latencies.len() < live {
            println!("({} of {live} arrived)", latencies.len());
        }
    };
    print("Switchyard, one event per invocation", &latencies);
    if !only_switchyard {
        let consumer = stream
            .create_consumer(pull::Config {
                durable_name: Some("bare-bridge-live".into()),
                deliver_policy: DeliverPolicy::New,
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                max_ack_pending: CONCURRENCY as i64,
                ..Default::default()
            })
            .await?;
        let running = tokio::spawn(bridge(consumer, function.url()));
        let latencies = live_latency(&bus, &function, "lat-b", live, rate).await;
        running.abort();
        print("bare JetStream -> HTTP bridge", &latencies);
    }
    println!();
    Ok(())
}
