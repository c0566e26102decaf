//! The Kafka source against a real Apache Kafka broker (KRaft) and a real nats-server:
//! records reach the function intact; a connector killed mid-stream, a second
//! connector in the group, and a broker restart lose nothing.
//!
//! Tests in this file run one at a time (each starts its own broker; two JVMs at once
//! on two cores only slow both down).

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    FunctionServer, NatsServer, Process, Reply, Switchyard, base_config, random_name,
    wait_for_dead_letters, write_config,
};
use nix::sys::signal::Signal;
use switchyard_connector_kafka::rdkafka::ClientConfig;
use switchyard_connector_kafka::rdkafka::message::{Header, OwnedHeaders};
use switchyard_connector_kafka::rdkafka::producer::{FutureProducer, FutureRecord};
use switchyard_testkit::KafkaBroker;

const WAIT: Duration = Duration::from_secs(60);

static ONE_BROKER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn producer(broker: &KafkaBroker) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("message.timeout.ms", "120000")
        .set("linger.ms", "5")
        .create()
        .expect("creating a kafka producer")
}

/// Produces `count` records `<prefix>-<n>` keyed `key-<n % 7>`, all acknowledged by
/// the broker before this returns.
async fn produce_numbered(
    producer: &FutureProducer,
    topic: &str,
    prefix: &str,
    range: std::ops::Range<usize>,
) {
    let sends = range.map(|number| {
        let payload = format!("{prefix}-{number}");
        let key = format!("key-{}", number % 7);
        async move {
            producer
                .send(
                    FutureRecord::to(topic).key(&key).payload(&payload),
                    Duration::from_secs(120),
                )
                .await
                .map_err(|(error, _)| error)
                .expect("producing a record");
        }
    });
    futures::future::join_all(sends).await;
}

/// The config of a Kafka source `orders` on `topic` (from the earliest offset), a
/// function and a trigger; `admin`/`http` ports as given.
fn config(
    nats: &NatsServer,
    broker: &KafkaBroker,
    function: &FunctionServer,
    topic: &str,
    http: u16,
    admin: u16,
) -> String {
    let mut text = base_config(&nats.url(), http, admin);
    text.push_str(&format!(
        r#"
[[sources]]
type = "kafka"
name = "orders"
brokers = "{brokers}"
topics = ["{topic}"]
start = "earliest"
cluster = "test"
types = {{ "{topic}" = "com.example.order" }}
properties = {{ "session.timeout.ms" = 6000, "heartbeat.interval.ms" = 500, "auto.commit.interval.ms" = 200, "topic.metadata.refresh.interval.ms" = 1000 }}

[[functions]]
type = "http"
name = "fn"
url = "{url}"
max_concurrency = 32

[[triggers]]
name = "main"
function = "fn"
max_concurrency = 32
"#,
        brokers = broker.bootstrap(),
        url = function.url,
    ));
    text
}

/// Distinct record payloads the function received, and how many calls repeated one.
fn delivered(function: &FunctionServer) -> (HashSet<String>, usize) {
    let received = function.received();
    let distinct: HashSet<String> = received
        .iter()
        .map(|call| String::from_utf8_lossy(&call.body).into_owned())
        .collect();
    let repeats = received.len() - distinct.len();
    (distinct, repeats)
}

async fn wait_delivered(function: &FunctionServer, expected: usize, timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    loop {
        let (distinct, repeats) = delivered(function);
        if distinct.len() >= expected {
            return repeats;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {expected} records delivered within {timeout:?}",
            distinct.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How many messages the events stream holds: a record persisted twice would count
/// twice.
async fn events_stored(config_text: &str) -> u64 {
    let config = switchyard::config::parse(Path::new("t.toml"), config_text, &|name| {
        std::env::var(name).ok()
    })
    .unwrap();
    let bus = switchyard_bus::Bus::connect(&config.nats).await.unwrap();
    let mut stream = bus
        .jetstream()
        .get_stream(bus.events_stream())
        .await
        .unwrap();
    stream.info().await.unwrap().state.messages
}

/// The group's committed offset per partition, read with a consumer that does not
/// join the group.
fn committed(broker: &KafkaBroker, group: &str, topic: &str, partitions: i32) -> HashMap<i32, i64> {
    try_committed(broker, group, topic, partitions).expect("reading committed offsets")
}

/// [`committed`], `None` while the broker cannot answer (its group coordinator is
/// still loading).
fn try_committed(
    broker: &KafkaBroker,
    group: &str,
    topic: &str,
    partitions: i32,
) -> Option<HashMap<i32, i64>> {
    use switchyard_connector_kafka::rdkafka::consumer::{BaseConsumer, Consumer};
    use switchyard_connector_kafka::rdkafka::{Offset, TopicPartitionList};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("group.id", group)
        .create()
        .unwrap();
    let mut list = TopicPartitionList::new();
    for partition in 0..partitions {
        list.add_partition(topic, partition);
    }
    let offsets = consumer
        .committed_offsets(list, Duration::from_secs(10))
        .ok()?;
    Some(
        offsets
            .elements()
            .iter()
            .map(|element| {
                let offset = match element.offset() {
                    Offset::Offset(offset) => offset,
                    _ => -1,
                };
                (element.partition(), offset)
            })
            .collect(),
    )
}

#[tokio::test]
async fn records_reach_the_function_with_key_headers_and_bytes_intact() {
    let _serial = ONE_BROKER_AT_A_TIME.lock().await;
    let nats = NatsServer::start();
    let broker = KafkaBroker::start();
    let topic = random_name("orders");
    broker.create_topic(&topic, 3);
    let function = FunctionServer::start(|_, _| Reply::ok()).await;
    let switchyard = Switchyard::start(config(&nats, &broker, &function, &topic, 0, 0)).await;
    let producer = producer(&broker);

    const BINARY: &[u8] = b"\x00\xff\x10{\x80";
    let send = |key: Option<&'static str>, headers: OwnedHeaders, payload: &'static [u8]| {
        let producer = producer.clone();
        let topic = topic.clone();
        async move {
            let mut record = FutureRecord::<str, [u8]>::to(&topic)
                .payload(payload)
                .headers(headers);
            if let Some(key) = key {
                record = record.key(key);
            }
            producer
                .send(record, Duration::from_secs(30))
                .await
                .map_err(|(error, _)| error)
                .unwrap()
        }
    };
    let plain = send(
        Some("user-1"),
        OwnedHeaders::new()
            .insert(Header {
                key: "X-Trace-Id",
                value: Some("abc 123"),
            })
            .insert(Header {
                key: "raw",
                value: Some(&[0xff, 0xfe][..]),
            }),
        BINARY,
    )
    .await;
    send(
        Some("user-2"),
        OwnedHeaders::new()
            .insert(Header {
                key: "ce_specversion",
                value: Some("1.0"),
            })
            .insert(Header {
                key: "ce_id",
                value: Some("order-77"),
            })
            .insert(Header {
                key: "ce_source",
                value: Some("/shop"),
            })
            .insert(Header {
                key: "ce_type",
                value: Some("com.example.native"),
            })
            .insert(Header {
                key: "content-type",
                value: Some("application/json"),
            }),
        b"{\"total\":12}",
    )
    .await;
    send(
        None,
        OwnedHeaders::new().insert(Header {
            key: "content-type",
            value: Some("application/cloudevents+json"),
        }),
        br#"{"specversion":"1.0","id":"s-1","source":"/structured","type":"com.example.structured","data":{"ok":true}}"#,
    )
    .await;
    // CloudEvents headers without a source: not a valid event; dead-lettered, with why.
    send(
        Some("user-3"),
        OwnedHeaders::new()
            .insert(Header {
                key: "ce_specversion",
                value: Some("1.0"),
            })
            .insert(Header {
                key: "ce_id",
                value: Some("broken"),
            })
            .insert(Header {
                key: "ce_type",
                value: Some("t"),
            }),
        b"kept",
    )
    .await;

    let received = function.wait_for(3, WAIT).await;
    let by_type = |ty: &str| {
        received
            .iter()
            .find(|call| call.header("ce-type") == Some(ty))
            .unwrap_or_else(|| panic!("no event of type {ty}"))
    };
    let (partition, offset) = (plain.partition, plain.offset);
    let plain = by_type("com.example.order");
    assert_eq!(plain.id(), format!("{topic}-{partition}-{offset}"));
    assert_eq!(
        plain.header("ce-source"),
        Some(format!("kafka://test/{topic}").as_str())
    );
    assert_eq!(plain.header("ce-partitionkey"), Some("user-1"));
    assert_eq!(plain.header("ce-subject"), Some("user-1"));
    assert_eq!(plain.header("ce-xtraceid"), Some("abc%20123"));
    assert_eq!(plain.header("ce-raw"), Some("//4="));
    assert!(
        plain
            .header("ce-time")
            .is_some_and(|time| time.starts_with("20"))
    );
    assert_eq!(&plain.body[..], BINARY);

    let native = by_type("com.example.native");
    assert_eq!(native.id(), "order-77");
    assert_eq!(native.header("ce-source"), Some("/shop"));
    assert_eq!(native.header("ce-partitionkey"), Some("user-2"));
    assert_eq!(native.header("content-type"), Some("application/json"));
    assert_eq!(&native.body[..], b"{\"total\":12}");

    let structured = by_type("com.example.structured");
    assert_eq!(structured.id(), "s-1");
    assert_eq!(&structured.body[..], b"{\"ok\":true}");

    let bus = switchyard.bus().await;
    let dead = wait_for_dead_letters(&bus, "source:orders", 1, WAIT).await;
    assert_eq!(dead[0].dead_letter.reason, "malformed");
    assert!(
        dead[0].dead_letter.last_error.contains("source"),
        "{}",
        dead[0].dead_letter.last_error
    );
    assert_eq!(&dead[0].dead_letter.event.data[..], b"kept");
    assert_eq!(
        dead[0].dead_letter.event.attribute("partitionkey"),
        Some("user-3")
    );

    // Every record is persisted or dead-lettered, so the committed offsets reach the
    // end of every partition.
    let deadline = Instant::now() + WAIT;
    loop {
        let offsets = committed(&broker, "switchyard-orders", &topic, 3);
        if offsets.values().map(|offset| (*offset).max(0)).sum::<i64>() == 4 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "committed offsets stuck at {offsets:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    switchyard.stop().await;
}

#[tokio::test]
async fn a_connector_killed_mid_stream_loses_nothing() {
    let _serial = ONE_BROKER_AT_A_TIME.lock().await;
    let nats = NatsServer::start();
    let broker = KafkaBroker::start();
    let topic = random_name("stream");
    broker.create_topic(&topic, 3);
    let function = FunctionServer::start(|_, _| Reply::ok()).await;
    let text = config(&nats, &broker, &function, &topic, 0, 0);
    let directory = tempfile::tempdir().unwrap();
    let path = write_config(directory.path(), &text);
    let producer = producer(&broker);
    const TOTAL: usize = 3000;

    let mut process = Process::start(&path, &[]);
    process.wait_ready().await;
    // Produce steadily while the connector runs, and kill it mid-stream.
    let producing = {
        let (producer, topic) = (producer.clone(), topic.clone());
        tokio::spawn(async move {
            for chunk in 0..30 {
                produce_numbered(&producer, &topic, "r", chunk * 100..(chunk + 1) * 100).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let deadline = Instant::now() + WAIT;
    while delivered(&function).0.len() < 600 {
        assert!(Instant::now() < deadline, "the connector did not get going");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let read_before_kill = process.metric("switchyard_kafka_records_read_total").await;
    process.signal(Signal::SIGKILL);
    assert!(!process.wait_exit().await);
    let delivered_at_kill = delivered(&function).0.len();
    producing.await.unwrap();
    assert!(
        delivered_at_kill < TOTAL,
        "the kill came after the stream ended"
    );

    let process = Process::start(&path, &[]);
    process.wait_ready().await;
    let repeats = wait_delivered(&function, TOTAL, WAIT).await;
    let stored = events_stored(&text).await;
    eprintln!(
        "SIGKILL mid-stream: {TOTAL} records, {read_before_kill} read and {delivered_at_kill} delivered before the kill; \
         after restart all {TOTAL} delivered; events stored {stored} (a record persisted twice would be more); \
         function calls repeating a record: {repeats}"
    );
    assert_eq!(stored, TOTAL as u64, "a re-read record was persisted twice");
    let (distinct, _) = delivered(&function);
    for number in 0..TOTAL {
        assert!(
            distinct.contains(&format!("r-{number}")),
            "record r-{number} lost"
        );
    }
}

#[tokio::test]
async fn two_connectors_split_the_partitions_and_one_takes_over() {
    let _serial = ONE_BROKER_AT_A_TIME.lock().await;
    let nats = NatsServer::start();
    let broker = KafkaBroker::start();
    let topic = random_name("shared");
    broker.create_topic(&topic, 4);
    let function = FunctionServer::start(|_, _| Reply::ok()).await;
    let text = config(&nats, &broker, &function, &topic, 0, 0);
    let directory = tempfile::tempdir().unwrap();
    let path = write_config(directory.path(), &text);
    let start = || Process::start(&path, &[]);
    let (mut a, b) = (start(), start());
    a.wait_ready().await;
    b.wait_ready().await;
    let producer = producer(&broker);

    // Both members get partitions: each reads some of the records.
    let deadline = Instant::now() + WAIT;
    let mut produced = 0;
    loop {
        produce_numbered(&producer, &topic, "s", produced..produced + 200).await;
        produced += 200;
        wait_delivered(&function, produced, WAIT).await;
        let read_a = a.metric("switchyard_kafka_records_read_total").await;
        let read_b = b.metric("switchyard_kafka_records_read_total").await;
        if read_a > 0 && read_b > 0 {
            eprintln!("split: a read {read_a}, b read {read_b} of {produced}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "one connector never got partitions (a {read_a}, b {read_b})"
        );
    }

    // A dies; B takes its partitions over after the session timeout.
    let b_before = b.metric("switchyard_kafka_records_read_total").await;
    a.signal(Signal::SIGKILL);
    assert!(!a.wait_exit().await);
    produce_numbered(&producer, &topic, "s", produced..produced + 400).await;
    produced += 400;
    let repeats = wait_delivered(&function, produced, WAIT).await;
    let b_after = b.metric("switchyard_kafka_records_read_total").await;
    eprintln!(
        "takeover: b read {} more; function calls repeating a record: {repeats}",
        b_after - b_before
    );
    assert!(
        b_after - b_before >= 400,
        "b read {} records after a died",
        b_after - b_before
    );
    assert_eq!(events_stored(&text).await, produced as u64);
}

#[tokio::test]
async fn the_broker_restarted_mid_stream_loses_nothing() {
    let _serial = ONE_BROKER_AT_A_TIME.lock().await;
    let nats = NatsServer::start();
    let mut broker = KafkaBroker::start();
    let topic = random_name("restart");
    broker.create_topic(&topic, 2);
    let function = FunctionServer::start(|_, _| Reply::ok()).await;
    let text = config(&nats, &broker, &function, &topic, 0, 0);
    let switchyard = Switchyard::start(text.clone()).await;

    let first = producer(&broker);
    produce_numbered(&first, &topic, "b", 0..500).await;
    wait_delivered(&function, 500, WAIT).await;
    drop(first);
    broker.stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    broker.restart();
    let second = producer(&broker);
    produce_numbered(&second, &topic, "b", 500..1000).await;
    let repeats = wait_delivered(&function, 1000, WAIT).await;
    eprintln!(
        "broker restart: 1000 records delivered; function calls repeating a record: {repeats}"
    );
    assert_eq!(events_stored(&text).await, 1000);
    switchyard.stop().await;
}

/// Reads `count` records from `topic` (from the start), off the runtime's threads.
async fn read_topic(
    broker: &KafkaBroker,
    topic: &str,
    count: usize,
) -> Vec<switchyard_connector_kafka::rdkafka::message::OwnedMessage> {
    use switchyard_connector_kafka::rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("group.id", random_name("reader"))
        .set("auto.offset.reset", "earliest")
        .set("topic.metadata.refresh.interval.ms", "500")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + WAIT;
        let mut records = Vec::new();
        while records.len() < count {
            assert!(
                Instant::now() < deadline,
                "{} of {count} records on the topic",
                records.len()
            );
            if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
                records.push(message.detach());
            }
        }
        records
    })
    .await
    .unwrap()
}

fn header_of<'a>(
    record: &'a switchyard_connector_kafka::rdkafka::message::OwnedMessage,
    name: &str,
) -> Option<&'a str> {
    use switchyard_connector_kafka::rdkafka::Message;
    use switchyard_connector_kafka::rdkafka::message::Headers;
    let headers = record.headers()?;
    headers
        .iter()
        .find(|header| header.key == name)
        .and_then(|header| std::str::from_utf8(header.value?).ok())
}

#[tokio::test]
async fn results_and_dead_letters_land_on_kafka_topics() {
    use switchyard_connector_kafka::rdkafka::Message;
    let _serial = ONE_BROKER_AT_A_TIME.lock().await;
    let nats = NatsServer::start();
    let broker = KafkaBroker::start();
    let (input, results, failures) = (
        random_name("in"),
        random_name("results"),
        random_name("failures"),
    );
    for topic in [&input, &results, &failures] {
        broker.create_topic(topic, 1);
    }
    // `bad` records are rejected (dead-lettered at once); `reply` answers with a
    // CloudEvent; the others answer with a JSON body.
    let function = FunctionServer::start(|received, _| match &received.body[..] {
        b"bad" => Reply::status(422).with_body("cannot use this"),
        b"reply" => Reply::ok()
            .with_header("ce-specversion", "1.0")
            .with_header("ce-id", "reply-1")
            .with_header("ce-source", "/fn")
            .with_header("ce-type", "com.example.answer")
            .with_body("answered"),
        _ => Reply::ok()
            .with_header("content-type", "application/json")
            .with_body("{\"ok\":true}"),
    })
    .await;
    // The trigger is the configuration's last table: its destinations go at the end.
    let text = config(&nats, &broker, &function, &input, 0, 0)
        + &format!(
            "on_success = {{ type = \"kafka\", brokers = \"{b}\", topic = \"{results}\" }}\non_failure = {{ type = \"kafka\", brokers = \"{b}\", topic = \"{failures}\" }}\n",
            b = broker.bootstrap()
        );
    let switchyard = Switchyard::start(text).await;
    let producer = producer(&broker);
    for (key, payload) in [("a", "good"), ("b", "bad"), ("c", "reply")] {
        producer
            .send(
                FutureRecord::to(&input).key(key).payload(payload),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(error, _)| error)
            .unwrap();
    }

    let records = read_topic(&broker, &results, 2).await;
    let result = records
        .iter()
        .find(|record| header_of(record, "ce_type") == Some("dev.switchyard.function.result"))
        .expect("the result of the JSON answer");
    assert_eq!(
        header_of(result, "ce_id"),
        Some(format!("{input}-0-0").as_str())
    );
    assert_eq!(
        header_of(result, "ce_source"),
        Some("/switchyard/triggers/main")
    );
    assert_eq!(
        header_of(result, "ce_originsource"),
        Some(format!("kafka://test/{input}").as_str())
    );
    assert_eq!(header_of(result, "content-type"), Some("application/json"));
    assert_eq!(result.payload(), Some(&b"{\"ok\":true}"[..]));
    assert_eq!(result.key(), Some(&b"a"[..]));
    let reply = records
        .iter()
        .find(|record| header_of(record, "ce_type") == Some("com.example.answer"))
        .expect("the CloudEvent reply");
    assert_eq!(header_of(reply, "ce_id"), Some("reply-1"));
    assert_eq!(reply.payload(), Some(&b"answered"[..]));

    let dead = read_topic(&broker, &failures, 1).await;
    assert_eq!(
        header_of(&dead[0], "ce_id"),
        Some(format!("{input}-0-1").as_str())
    );
    assert_eq!(
        header_of(&dead[0], "Switchyard-Dlq-Reason"),
        Some("rejected")
    );
    assert_eq!(
        header_of(&dead[0], "Switchyard-Dlq-Last-Status"),
        Some("422")
    );
    assert_eq!(dead[0].payload(), Some(&b"bad"[..]));
    assert_eq!(dead[0].key(), Some(&b"b"[..]));
    // The dead letter is in the dead-letter stream too.
    let bus = switchyard.bus().await;
    assert_eq!(wait_for_dead_letters(&bus, "main", 1, WAIT).await.len(), 1);
    switchyard.stop().await;
}

#[tokio::test]
async fn nats_down_mid_stream_holds_the_records_and_loses_nothing() {
    let _serial = ONE_BROKER_AT_A_TIME.lock().await;
    let mut nats = NatsServer::start();
    let broker = KafkaBroker::start();
    let topic = random_name("outage");
    broker.create_topic(&topic, 2);
    let function = FunctionServer::start(|_, _| Reply::ok()).await;
    // File storage, so the events stream outlives the nats-server restart; a small
    // in-flight bound, so the source fills up, waits, then pauses its partitions.
    let text = config(&nats, &broker, &function, &topic, 0, 0)
        .replace("storage = \"memory\"", "storage = \"file\"")
        .replace(
            "start = \"earliest\"",
            "start = \"earliest\"\nmax_in_flight = 50",
        );
    let switchyard = Switchyard::start(text.clone()).await;
    let producer = producer(&broker);
    produce_numbered(&producer, &topic, "n", 0..300).await;
    wait_delivered(&function, 300, WAIT).await;

    nats.stop();
    produce_numbered(&producer, &topic, "n", 300..600).await;
    // Longer than the source waits before pausing its partitions.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let delivered_while_down = delivered(&function).0.len();
    // Backpressure held: the partitions are paused, with at most the bound read ahead,
    // plus the one record each 100 ms wait may take before the pause (2 s).
    let metrics = reqwest::get(switchyard.admin_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let gauge = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|line| line.starts_with(name))
            .and_then(|line| line.rsplit(' ').next()?.parse().ok())
            .unwrap_or(-1.0)
    };
    assert_eq!(gauge("switchyard_kafka_paused{"), 1.0, "{metrics}");
    let in_flight = gauge("switchyard_kafka_records_in_flight{");
    assert!(
        (50.0..=71.0).contains(&in_flight),
        "{in_flight} records in flight"
    );
    nats.restart();
    let repeats = wait_delivered(&function, 600, WAIT).await;
    eprintln!(
        "nats outage: {delivered_while_down} of 600 delivered while nats was down, all 600 after; function calls repeating a record: {repeats}"
    );
    assert_eq!(
        delivered_while_down, 300,
        "nothing can be delivered while nats is down"
    );
    assert_eq!(events_stored(&text).await, 600);
    switchyard.stop().await;
}

#[tokio::test]
async fn s3_notifications_on_a_kafka_topic_become_object_events() {
    use switchyard_testkit::object_store::{Notifications, ObjectStore};
    let _serial = ONE_BROKER_AT_A_TIME.lock().await;
    let nats = NatsServer::start();
    let broker = KafkaBroker::start();
    let topic = random_name("bucketevents");
    broker.create_topic(&topic, 2);
    // The store produces its notifications to the topic (versitygw's Kafka target).
    let store = ObjectStore::start(Notifications::Kafka {
        brokers: broker.bootstrap(),
        topic: topic.clone(),
    });
    let function = FunctionServer::start(|_, _| Reply::ok()).await;
    let mut text = base_config(&nats.url(), 0, 0);
    text.push_str(&format!(
        r#"
[[sources]]
type = "kafka"
name = "bucket"
brokers = "{brokers}"
topics = ["{topic}"]
start = "earliest"
format = "s3"
key_encoding = "none"

[[functions]]
type = "http"
name = "fn"
url = "{url}"

[[triggers]]
name = "main"
function = "fn"
"#,
        brokers = broker.bootstrap(),
        url = function.url,
    ));
    let switchyard = Switchyard::start(text).await;
    let client = store.client().await;
    let bucket = random_name("bkt");
    client.create_bucket().bucket(&bucket).send().await.unwrap();
    for key in ["in/a b.txt", "in/c+d.txt"] {
        client
            .put_object()
            .bucket(&bucket)
            .key(key)
            .body(key.as_bytes().to_vec().into())
            .send()
            .await
            .unwrap();
    }
    // A record on the topic that is not a notification is dead-lettered, not skipped.
    producer(&broker)
        .send(
            FutureRecord::<(), _>::to(&topic).payload("{\"Records\": 5}"),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(error, _)| error)
        .unwrap();

    let received = function.wait_for(2, WAIT).await;
    let mut subjects: Vec<String> = received
        .iter()
        .map(|call| {
            percent_encoding::percent_decode_str(call.header("ce-subject").unwrap())
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect();
    subjects.sort();
    assert_eq!(subjects, ["in/a b.txt", "in/c+d.txt"]);
    for call in &received {
        assert_eq!(
            call.header("ce-type"),
            Some("com.amazonaws.s3.ObjectCreated:Put")
        );
        assert_eq!(call.header("ce-s3bucket"), Some(bucket.as_str()));
    }
    let bus = switchyard.bus().await;
    let letters = wait_for_dead_letters(&bus, "source:bucket", 1, WAIT).await;
    assert_eq!(letters[0].dead_letter.reason, "malformed");
    assert!(
        letters[0]
            .dead_letter
            .last_error
            .contains("not a valid S3 event notification"),
        "{}",
        letters[0].dead_letter.last_error
    );
    switchyard.stop().await;
}

/// `start = "latest"`: a new group starts at the end of the topic (records written
/// before it are not read), and a partition added to the topic later is read from its
/// first record (records written to it before the group noticed it are not skipped).
#[tokio::test]
async fn a_new_group_starts_at_the_end_and_a_new_partition_at_its_start() {
    let _serial = ONE_BROKER_AT_A_TIME.lock().await;
    let nats = NatsServer::start();
    let broker = KafkaBroker::start();
    let topic = random_name("grow");
    broker.create_topic(&topic, 1);
    let function = FunctionServer::start(|_, _| Reply::ok()).await;
    let producer = producer(&broker);
    produce_numbered(&producer, &topic, "before", 0..5).await;
    let text = config(&nats, &broker, &function, &topic, 0, 0)
        .replace("start = \"earliest\"", "start = \"latest\"");
    let switchyard = Switchyard::start(text).await;
    // The group has started once its start position is committed.
    let deadline = Instant::now() + WAIT;
    while try_committed(&broker, "switchyard-orders", &topic, 1)
        .and_then(|offsets| offsets.get(&0).copied())
        != Some(5)
    {
        assert!(
            Instant::now() < deadline,
            "the new group never committed its start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    produce_numbered(&producer, &topic, "after", 0..5).await;
    wait_delivered(&function, 5, WAIT).await;

    let (altered, output) = switchyard_testkit::kafka_tool(
        "org.apache.kafka.tools.TopicCommand",
        &[
            "--bootstrap-server",
            &broker.bootstrap(),
            "--alter",
            "--topic",
            &topic,
            "--partitions",
            "2",
        ],
    );
    assert!(altered, "adding a partition failed:\n{output}");
    // A new producer: it reads the topic's metadata afresh, with the new partition.
    let producer = self::producer(&broker);
    for number in 0..5 {
        let payload = format!("new-partition-{number}");
        producer
            .send(
                FutureRecord::<(), _>::to(&topic)
                    .partition(1)
                    .payload(&payload),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    wait_delivered(&function, 10, WAIT).await;
    let (distinct, _) = delivered(&function);
    assert!(
        distinct
            .iter()
            .all(|payload| !payload.starts_with("before")),
        "records before the group started were read: {distinct:?}"
    );
    for number in 0..5 {
        assert!(distinct.contains(&format!("new-partition-{number}")));
    }
    switchyard.stop().await;
}
