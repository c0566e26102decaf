//! `payload = "aws"`: handlers written for AWS Lambda get each event as AWS would send
//! it, checked with AWS's own parsers (Powertools for AWS Lambda, in
//! tests/functions/python/shapes.py): S3 notifications for uploads to a real
//! S3-compatible store, the self-managed Kafka event for records of a real broker
//! (with Lambda's partial batch response), API Gateway's payload format 2.0 for
//! webhooks. Real nats-server, awslambdaric.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use aws_sdk_s3::primitives::ByteStream;
use base64::Engine as _;
use common::{NatsServer, Switchyard, base_config, installed, random_name, wait_for_dead_letters};
use switchyard_testkit::object_store::{Notifications, ObjectStore};

const WAIT: Duration = Duration::from_secs(60);

/// A `lambda` function running `shapes.<handler>`, writing what it read to `seen`.
fn shapes_function(name: &str, handler: &str, seen: &Path) -> String {
    format!(
        r#"
[[functions]]
type = "lambda"
name = "{name}"
command = ["{python}", "-m", "awslambdaric", "shapes.{handler}"]
handler = "shapes.{handler}"
directory = "{directory}"
timeout = "20s"
environment = {{ SEEN_FILE = "{seen}" }}
"#,
        python = installed("SWITCHYARD_LAMBDA_PYTHON"),
        directory = common::test_functions().join("python").display(),
        seen = seen.display(),
    )
}

/// The lines the handler wrote, once there are at least `count`.
async fn seen_lines(seen: &Path, count: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(seen)
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        if lines.len() >= count {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "the handler saw {} records, expected {count}: {lines:?}",
            lines.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Keys AWS would URL-encode in a notification: spaces, `+`, non-ASCII, `/`.
const KEYS: [&str; 3] = ["dir/a b+c ü.jpg", "plain.txt", "100% sure?.txt"];

/// Uploads each of [`KEYS`] (its own name as its bytes); returns their ETags without
/// quotes.
async fn upload_keys(client: &aws_sdk_s3::Client, bucket: &str) -> Vec<String> {
    let mut etags = Vec::new();
    for key in KEYS {
        let output = client
            .put_object()
            .bucket(bucket)
            .key(key)
            .body(ByteStream::from(key.as_bytes().to_vec()))
            .send()
            .await
            .unwrap();
        etags.push(output.e_tag().unwrap().trim_matches('"').to_owned());
    }
    etags
}

/// Each of [`KEYS`] reached the handler once, one record per event, as AWS writes
/// it (the ETag bare).
async fn assert_each_upload_seen_once(seen: &Path, bucket: &str, etags: &[String]) {
    let lines = seen_lines(seen, KEYS.len()).await;
    for (key, etag) in KEYS.iter().zip(etags) {
        let line = lines
            .iter()
            .find(|line| line["key"] == *key)
            .unwrap_or_else(|| panic!("no record for `{key}` in {lines:?}"));
        assert_eq!(line["bucket"], bucket);
        assert_eq!(line["size"], key.len());
        assert_eq!(line["etag"], etag.as_str());
        assert_eq!(line["event_name"], "ObjectCreated:Put");
        assert_eq!(line["event_source"], "aws:s3");
        assert_eq!(line["records_in_event"], 1);
    }
    assert_eq!(lines.len(), KEYS.len(), "each upload once: {lines:?}");
}

/// The trigger of the S3 tests: `payload = "aws"` to the `shapes.s3` handler.
fn s3_trigger(function: &str, seen: &Path) -> String {
    format!(
        r#"{function_config}
[[triggers]]
name = "objects"
function = "{function}"
payload = "aws"
filter = {{ type = {{ prefix = "com.amazonaws.s3." }} }}
"#,
        function_config = shapes_function(function, "s3", seen),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_reach_an_s3_handler_as_s3_notification_records() {
    let nats = NatsServer::start();
    let store = ObjectStore::start(Notifications::None);
    let client = store.client().await;
    let bucket = random_name("bkt");
    client.create_bucket().bucket(&bucket).send().await.unwrap();
    let directory = tempfile::tempdir().unwrap();
    let seen = directory.path().join("seen.jsonl");
    let function = random_name("s3fn");
    let mut text = base_config(&nats.url(), 0, 0);
    text.push_str(&format!(
        r#"
{store}
[[sources]]
type = "s3"
name = "poll"
store = "test"
buckets = ["{bucket}"]
interval = "300ms"
{trigger}"#,
        store = store.config_table("test"),
        trigger = s3_trigger(&function, &seen),
    ));
    let switchyard = Switchyard::start(text).await;
    let etags = upload_keys(&client, &bucket).await;
    assert_each_upload_seen_once(&seen, &bucket, &etags).await;
    switchyard.stop().await;
}

/// The same uploads noticed by the store's webhook rather than a poll reach the
/// handler in the same shape: versitygw writes the ETag in quotes, AWS bare.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notified_uploads_reach_an_s3_handler_with_the_etag_bare() {
    let nats = NatsServer::start();
    let directory = tempfile::tempdir().unwrap();
    let seen = directory.path().join("seen.jsonl");
    let function = random_name("s3fn");
    let mut text =
        base_config(&nats.url(), 0, 0).replace("max_body_bytes = 4096", "max_body_bytes = 65536");
    text.push_str("\n[[sources.hooks]]\nname = \"s3\"\nformat = \"s3\"\nkey_encoding = \"none\"\n");
    text.push_str(&s3_trigger(&function, &seen));
    let switchyard = Switchyard::start(text).await;
    // The store sends a test notification when it starts: the hook must be up.
    let store = ObjectStore::start(Notifications::Webhook(switchyard.url("/hooks/s3")));
    let client = store.client().await;
    let bucket = random_name("bkt");
    client.create_bucket().bucket(&bucket).send().await.unwrap();
    let etags = upload_keys(&client, &bucket).await;
    assert_each_upload_seen_once(&seen, &bucket, &etags).await;
    switchyard.stop().await;
}

#[cfg(feature = "kafka")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_records_reach_a_kafka_handler_as_the_self_managed_kafka_event() {
    use switchyard_connector_kafka::rdkafka::ClientConfig;
    use switchyard_connector_kafka::rdkafka::message::{Header, OwnedHeaders};
    use switchyard_connector_kafka::rdkafka::producer::{FutureProducer, FutureRecord};
    use switchyard_testkit::KafkaBroker;

    let nats = NatsServer::start();
    let broker = KafkaBroker::start();
    let topic = random_name("orders");
    broker.create_topic(&topic, 1);
    let directory = tempfile::tempdir().unwrap();
    let seen = directory.path().join("seen.jsonl");
    let function = random_name("kfn");
    let mut text = base_config(&nats.url(), 0, 0);
    text.push_str(&format!(
        r#"
[[sources]]
type = "kafka"
name = "orders"
brokers = "{brokers}"
topics = ["{topic}"]
start = "earliest"
cluster = "test"
properties = {{ "session.timeout.ms" = 6000, "heartbeat.interval.ms" = 500, "auto.commit.interval.ms" = 200, "topic.metadata.refresh.interval.ms" = 1000 }}
{function_config}
[[triggers]]
name = "records"
function = "{function}"
payload = "aws"
batch = {{ max_events = 10, window = "1s" }}
retry = {{ policy = "fixed", initial = "100ms", attempts = 2, jitter = false }}
"#,
        brokers = broker.bootstrap(),
        function_config = shapes_function(&function, "kafka", &seen),
    ));
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("message.timeout.ms", "120000")
        .create()
        .unwrap();
    // A binary key and value, a repeated header, a record that fails, one without a
    // key.
    let binary_key: &[u8] = &[0xff, 0x00, 0x01];
    let binary_value: &[u8] = &[0x00, 0x9f, 0x92, 0x96, 0xff];
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: "trace",
            value: Some(&[1u8, 2][..]),
        })
        .insert(Header {
            key: "trace",
            value: Some(&[3u8][..]),
        })
        .insert(Header {
            key: "kind",
            value: Some("binary"),
        });
    /// Key, value, headers.
    type Produced<'a> = (Option<&'a [u8]>, &'a [u8], Option<OwnedHeaders>);
    let records: Vec<Produced> = vec![
        (Some(binary_key), binary_value, Some(headers)),
        (Some(b"k2"), b"fail", None),
        (None, b"{\"order\": 3}", None),
    ];
    for (key, value, headers) in &records {
        let mut record = FutureRecord::<[u8], [u8]>::to(&topic).payload(value);
        if let Some(key) = key {
            record = record.key(key);
        }
        if let Some(headers) = headers {
            record = record.headers(headers.clone());
        }
        producer
            .send(record, Duration::from_secs(60))
            .await
            .map_err(|(error, _)| error)
            .unwrap();
    }
    // Every record is in the topic before Switchyard starts: they come as one batch.
    let switchyard = Switchyard::start(text).await;
    // The failing record is retried alone (partial batch response) and then
    // dead-lettered; the others were delivered in the first batch.
    let dead = wait_for_dead_letters(&switchyard.bus().await, "records", 1, WAIT).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].dead_letter.event.id, format!("{topic}-0-1"));
    assert_eq!(dead[0].dead_letter.attempts, 2);
    let lines = seen_lines(&seen, 4).await;
    let encode = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let at = |offset: i64| -> Vec<&serde_json::Value> {
        lines
            .iter()
            .filter(|line| line["offset"] == offset)
            .collect()
    };
    assert_eq!(at(0).len(), 1, "{lines:?}");
    assert_eq!(at(1).len(), 2, "the failing record, twice: {lines:?}");
    assert_eq!(at(2).len(), 1, "{lines:?}");
    let first = at(0)[0];
    assert_eq!(first["batch_size"], 3);
    assert_eq!(at(2)[0]["batch_size"], 3);
    assert_eq!(
        at(1)[1]["batch_size"],
        1,
        "the retry holds the failed record only"
    );
    assert_eq!(first["topic"], topic.as_str());
    assert_eq!(first["partition"], 0);
    assert_eq!(first["timestamp_type"], "CREATE_TIME");
    assert_eq!(first["key"], encode(binary_key));
    assert_eq!(first["value"], encode(binary_value));
    assert_eq!(
        first["headers"],
        serde_json::json!([
            ["trace", encode(&[1, 2])],
            ["trace", encode(&[3])],
            ["kind", encode(b"binary")]
        ])
    );
    assert_eq!(at(2)[0]["key"], serde_json::Value::Null);
    assert_eq!(at(2)[0]["value"], encode(b"{\"order\": 3}"));
    switchyard.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_reaches_a_handler_as_an_api_gateway_request() {
    let nats = NatsServer::start();
    let directory = tempfile::tempdir().unwrap();
    let seen = directory.path().join("seen.jsonl");
    let function = random_name("hookfn");
    let mut text = base_config(&nats.url(), 0, 0);
    text.push_str(&format!(
        r#"
[[sources.hooks]]
name = "orders"
event_type = "com.example.order"
id_header = "Idempotency-Key"
bearer_token = "hook-token"
{function_config}
[[triggers]]
name = "orders"
function = "{function}"
payload = "aws"
"#,
        function_config = shapes_function(&function, "hook", &seen),
    ));
    let switchyard = Switchyard::start(text).await;
    let response = reqwest::Client::new()
        .post(switchyard.url("/hooks/orders?source=shop&tag=a&tag=b"))
        .bearer_auth("hook-token")
        .header("content-type", "application/json")
        .header("idempotency-key", "order-77")
        .header("x-repeated", "one")
        .header("x-repeated", "two")
        .body(r#"{"order": 77}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let lines = seen_lines(&seen, 1).await;
    let line = &lines[0];
    assert_eq!(line["method"], "POST");
    assert_eq!(line["raw_path"], "/hooks/orders");
    assert_eq!(line["raw_query_string"], "source=shop&tag=a&tag=b");
    assert_eq!(
        line["query"],
        serde_json::json!({"source": "shop", "tag": "a,b"})
    );
    assert_eq!(line["headers"]["x-repeated"], "one,two");
    assert_eq!(line["headers"]["content-type"], "application/json");
    // The id header is the event's id, given back as the header.
    assert_eq!(line["headers"]["idempotency-key"], "order-77");
    // The hook's credentials never reach the bus, nor the handler.
    assert_eq!(line["headers"].get("authorization"), None, "{line}");
    assert_eq!(line["body"], r#"{"order": 77}"#);
    assert_eq!(line["is_base64_encoded"], false);
    assert_eq!(line["source_ip"], "127.0.0.1");
    assert_eq!(line["request_id"], "order-77");
    switchyard.stop().await;
}
