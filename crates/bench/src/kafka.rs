//! (e) Kafka -> function: records already in a topic, consumed by
//! - a bare rdkafka consume loop (poll and count, auto-commit): the consume rate;
//! - a bare rdkafka bridge: consume and POST each record to the no-op function, 64 in
//!   flight, the loop anyone would write by hand;
//! - Switchyard: Kafka source -> JetStream -> trigger -> the same function, one record
//!   per invocation, then batched (100 per invocation);
//!
//! each in its own consumer group over the same records, in one run. Then the latency
//! from the record's timestamp to the function at 1,000 records/s.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::StreamExt;
use switchyard_connector_kafka::rdkafka::ClientConfig;
use switchyard_connector_kafka::rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use switchyard_connector_kafka::rdkafka::message::Message;
use switchyard_connector_kafka::rdkafka::producer::{FutureProducer, FutureRecord};
use switchyard_testkit::KafkaBroker;

use crate::{
    Nats, NoopFunction, PAYLOAD, client, config_header, free_port, milliseconds, percentile,
};

fn consumer_config(broker: &KafkaBroker, group: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", broker.bootstrap())
        .set("group.id", group)
        .set("auto.offset.reset", "earliest");
    config
}

async fn produce(producer: &FutureProducer, topic: &str, range: std::ops::Range<usize>) {
    let sends = range.map(|index| {
        let key = format!("k{}", index % 64);
        async move {
            producer
                .send(
                    FutureRecord::to(topic).key(&key).payload(PAYLOAD),
                    Duration::from_secs(60),
                )
                .await
                .map_err(|(error, _)| error)
                .expect("producing a record");
        }
    });
    futures::future::join_all(sends).await;
}

fn config_text(
    nats: &Nats,
    broker: &KafkaBroker,
    topic: &str,
    group: &str,
    function: &str,
    batch: bool,
    start: &str,
) -> String {
    let prefix = format!("bench{}", group.replace('-', ""));
    config_header(&nats.url(), &prefix, free_port())
        + &format!(
            r#"[[sources]]
type = "kafka"
name = "bench"
brokers = "{brokers}"
topics = ["{topic}"]
group_id = "{group}"
start = "{start}"
[[functions]]
type = "http"
name = "noop"
url = "{function}"
max_concurrency = 64
concurrency_scope = "process"
[[triggers]]
name = "bench"
function = "noop"
max_concurrency = {concurrency}
{batch}
"#,
            brokers = broker.bootstrap(),
            concurrency = if batch { 8 } else { 64 },
            batch = if batch {
                "batch = { max_events = 100, window = \"20ms\" }"
            } else {
                ""
            },
        )
}

async fn run_switchyard(
    text: &str,
    function: &NoopFunction,
    count: usize,
) -> anyhow::Result<Duration> {
    let config = switchyard::config::parse(Path::new("bench.toml"), text, &|_| None)
        .map_err(|errors| anyhow::anyhow!("{errors}"))?;
    function.count.store(0, Ordering::SeqCst);
    let running = switchyard::start(config).await?;
    // From the first record on: joining the group is not part of the rate.
    while function.count.load(Ordering::Relaxed) == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let started = Instant::now();
    let first = function.count.load(Ordering::Relaxed) as usize;
    while (function.count.load(Ordering::Relaxed) as usize) < count {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = started
        .elapsed()
        .mul_f64(count as f64 / (count - first).max(1) as f64);
    running.stop().await?;
    Ok(elapsed)
}

pub async fn bench_kafka(nats: &Nats, count: usize) -> anyhow::Result<()> {
    let broker = tokio::task::spawn_blocking(KafkaBroker::start).await?;
    let topic = "bench-orders";
    broker.create_topic(topic, 4);
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("linger.ms", "5")
        .create()?;
    let mut produced = 0;
    while produced < count {
        let next = (produced + 10_000).min(count);
        produce(&producer, topic, produced..next).await;
        produced = next;
    }
    let function = NoopFunction::start(true).await;
    let rate = |elapsed: Duration| count as f64 / elapsed.as_secs_f64();

    // Bare consume: poll and count.
    let bare_consume = {
        let consumer: BaseConsumer = consumer_config(&broker, "bare-consume").create()?;
        consumer.subscribe(&[topic])?;
        tokio::task::spawn_blocking(move || {
            let mut started = None;
            let mut seen = 0;
            while seen < count {
                if let Some(Ok(_)) = consumer.poll(Duration::from_millis(100)) {
                    started.get_or_insert_with(Instant::now);
                    seen += 1;
                }
            }
            // From the first record on, as for every loop here.
            started
                .map_or(Duration::ZERO, |started| started.elapsed())
                .mul_f64(count as f64 / (count - 1).max(1) as f64)
        })
        .await?
    };

    // Bare bridge: consume and POST each record, 64 in flight.
    let bare_bridge = {
        let consumer: StreamConsumer = consumer_config(&broker, "bare-bridge").create()?;
        consumer.subscribe(&[topic])?;
        function.count.store(0, Ordering::SeqCst);
        let http = client();
        let url = function.url();
        let started = std::sync::OnceLock::new();
        consumer
            .stream()
            .take(count)
            .map(|message| {
                started.get_or_init(Instant::now);
                let message = message.expect("consuming").detach();
                let request = http
                    .post(&url)
                    .header("ce-specversion", "1.0")
                    .header(
                        "ce-id",
                        format!(
                            "{}-{}-{}",
                            message.topic(),
                            message.partition(),
                            message.offset()
                        ),
                    )
                    .header("ce-source", "/bench")
                    .header("ce-type", "com.example.bench.order")
                    .header("content-type", "application/json")
                    .body(message.payload().unwrap_or_default().to_vec());
                async move {
                    let _ = request
                        .send()
                        .await
                        .expect("calling the function")
                        .bytes()
                        .await;
                }
            })
            .buffer_unordered(64)
            .for_each(|()| async {})
            .await;
        started
            .get()
            .map_or(Duration::ZERO, |started| started.elapsed())
            .mul_f64(count as f64 / (count - 1).max(1) as f64)
    };

    // The source alone: records persisted to JetStream, no trigger.
    let source_only = {
        let text = config_text(
            nats,
            &broker,
            topic,
            "sy-source",
            "http://127.0.0.1:9/",
            false,
            "earliest",
        );
        let text = &text[..text
            .find("[[functions]]")
            .expect("the config has functions")];
        let config = switchyard::config::parse(Path::new("bench.toml"), text, &|_| None)
            .map_err(|errors| anyhow::anyhow!("{errors}"))?;
        let bus = switchyard_bus::Bus::connect(&config.nats).await?;
        let running = switchyard::start(config).await?;
        let stored = || async {
            match bus.jetstream().get_stream(bus.events_stream()).await {
                Ok(mut stream) => stream.info().await.map_or(0, |info| info.state.messages),
                Err(_) => 0,
            }
        };
        while stored().await == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let started = Instant::now();
        let first = stored().await as usize;
        while (stored().await as usize) < count {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let elapsed = started
            .elapsed()
            .mul_f64(count as f64 / (count - first).max(1) as f64);
        running.stop().await?;
        elapsed
    };

    let url = function.url();
    let single = run_switchyard(
        &config_text(nats, &broker, topic, "sy-single", &url, false, "earliest"),
        &function,
        count,
    )
    .await?;
    let batched = run_switchyard(
        &config_text(nats, &broker, topic, "sy-batch", &url, true, "earliest"),
        &function,
        count,
    )
    .await?;

    println!(
        "### (e) Kafka -> function ({count} records of {} bytes in 4 partitions, no-op function)\n",
        PAYLOAD.len()
    );
    println!("| loop | records/s | vs bare consume | vs bare bridge |\n|---|---|---|---|");
    for (name, elapsed) in [
        ("bare rdkafka consume loop (poll, count)", bare_consume),
        (
            "bare rdkafka bridge (consume, POST each, 64 in flight)",
            bare_bridge,
        ),
        (
            "switchyard Kafka source alone (records persisted in JetStream)",
            source_only,
        ),
        ("switchyard, one record per invocation", single),
        ("switchyard, batches of up to 100", batched),
    ] {
        println!(
            "| {name} | {:.0} | {:.1}% | {:.0}% |",
            rate(elapsed),
            100.0 * rate(elapsed) / rate(bare_consume),
            100.0 * rate(elapsed) / rate(bare_bridge)
        );
    }

    // Latency at 1,000 records/s: record timestamp (set by the producer) to arrival.
    let config = switchyard::config::parse(
        Path::new("bench.toml"),
        &config_text(nats, &broker, topic, "sy-latency", &url, false, "latest"),
        &|_| None,
    )
    .map_err(|errors| anyhow::anyhow!("{errors}"))?;
    let running = switchyard::start(config).await?;
    tokio::time::sleep(Duration::from_secs(3)).await; // the group joins and starts at the end
    function.lags.lock().unwrap().clear();
    let seconds = 5;
    let mut ticker = tokio::time::interval(Duration::from_millis(10));
    for tick in 0..seconds * 100 {
        ticker.tick().await;
        let start = count + tick * 10;
        produce(&producer, topic, start..start + 10).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    running.stop().await?;
    let mut lags = function.lags.lock().unwrap().clone();
    lags.sort();
    println!(
        "\nlatency, record timestamp -> function, 1,000 records/s for {seconds} s ({} records): p50 {} ms, p99 {} ms, max {} ms\n",
        lags.len(),
        milliseconds(percentile(&lags, 0.5)),
        milliseconds(percentile(&lags, 0.99)),
        milliseconds(lags.last().copied().unwrap_or_default()),
    );
    println!("target: switchyard one-per-invocation >= 50% of the bare consume rate\n");
    Ok(())
}
