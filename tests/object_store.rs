//! The object-store connector against a real S3-compatible store (versitygw, see
//! docs/TESTING.md) and a real nats-server: uploads by a real S3 client (aws-sdk-s3)
//! reach the function through the store's bucket notifications (webhook, NATS) and
//! through polling; one object is one event whichever path noticed it.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use common::{
    FunctionServer, NatsServer, Process, Received, Reply, Switchyard, base_config, free_port,
    random_name, write_config,
};
use futures::StreamExt;
use serde_json::Value;
use switchyard_testkit::object_store::{self, Notifications, ObjectStore};

const WAIT: Duration = Duration::from_secs(30);

async fn client(store: &ObjectStore) -> aws_sdk_s3::Client {
    store.client().await
}

async fn create_bucket(client: &aws_sdk_s3::Client) -> String {
    let bucket = random_name("bkt");
    client.create_bucket().bucket(&bucket).send().await.unwrap();
    bucket
}

/// Uploads `body` under `key`; returns the ETag without quotes.
async fn put(client: &aws_sdk_s3::Client, bucket: &str, key: &str, body: Vec<u8>) -> String {
    let output = client
        .put_object()
        .bucket(bucket)
        .key(key)
        .body(ByteStream::from(body))
        .send()
        .await
        .unwrap_or_else(|error| {
            panic!(
                "put {key}: {}",
                aws_sdk_s3::error::DisplayErrorContext(&error)
            )
        });
    output.e_tag().unwrap().trim_matches('"').to_owned()
}

/// A header a function received, percent-decoded (the HTTP binding encodes non-ASCII).
fn decoded(received: &Received, name: &str) -> Option<String> {
    received.header(name).map(|value| {
        percent_encoding::percent_decode_str(value)
            .decode_utf8_lossy()
            .into_owned()
    })
}

/// Calls per object key, by `ce-subject`.
fn calls_by_key(function: &FunctionServer) -> HashMap<String, Vec<Received>> {
    let mut calls: HashMap<String, Vec<Received>> = HashMap::new();
    for received in function.received() {
        calls
            .entry(decoded(&received, "ce-subject").unwrap_or_default())
            .or_default()
            .push(received);
    }
    calls
}

fn function_config(function: &FunctionServer) -> String {
    format!(
        "\n[[functions]]\ntype = \"http\"\nname = \"fn\"\nurl = \"{}\"\nmax_concurrency = 64\n\n[[triggers]]\nname = \"objects\"\nfunction = \"fn\"\nfilter = {{ type = {{ prefix = \"com.amazonaws.s3.\" }} }}\n",
        function.url
    )
}

/// The base config with a `format = "s3"` hook at `/hooks/s3` on the HTTP source.
fn hook_config(nats: &NatsServer, http_port: u16) -> String {
    let mut text = base_config(&nats.url(), http_port, 0)
        .replace("max_body_bytes = 4096", "max_body_bytes = 65536");
    text.push_str("\n[[sources.hooks]]\nname = \"s3\"\nformat = \"s3\"\nkey_encoding = \"none\"\n");
    text
}

fn poll_source(store: &ObjectStore, bucket: &str, extra: &str) -> String {
    let interval = if extra.contains("interval") {
        ""
    } else {
        "interval = \"500ms\"\n"
    };
    format!(
        "{}\n[[sources]]\ntype = \"s3\"\nname = \"poll\"\nstore = \"test\"\nbuckets = [\"{bucket}\"]\n{interval}{extra}\n",
        store.config_table("test")
    )
}

/// Waits for `more` complete poll scans after now (so every object uploaded before
/// has been seen by at least one whole scan when `more` >= 2).
async fn wait_scans(switchyard: &Switchyard, more: f64) {
    let scans = switchyard.metric("switchyard_s3_poll_scans_total").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while switchyard.metric("switchyard_s3_poll_scans_total").await < scans + more {
        assert!(Instant::now() < deadline, "the poller stopped scanning");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A bucket in a store without notifications, a nats-server and a function: what
/// every polling test starts from.
struct Polled {
    nats: NatsServer,
    function: FunctionServer,
    store: ObjectStore,
    client: aws_sdk_s3::Client,
    bucket: String,
}

impl Polled {
    async fn start() -> Polled {
        let nats = NatsServer::start();
        let function = FunctionServer::start(|_, _| Reply::ok()).await;
        let store = ObjectStore::start(Notifications::None);
        let client = client(&store).await;
        let bucket = create_bucket(&client).await;
        Polled {
            nats,
            function,
            store,
            client,
            bucket,
        }
    }

    async fn put_keys(&self, keys: &[&str]) {
        for key in keys {
            put(&self.client, &self.bucket, key, key.as_bytes().to_vec()).await;
        }
    }

    /// A config polling the bucket (every 500 ms unless `extra` sets an interval) into
    /// the function.
    fn config(&self, extra: &str) -> String {
        self.config_at(0, extra)
    }

    /// [`Polled::config`] with the admin listener on `admin`.
    fn config_at(&self, admin: u16, extra: &str) -> String {
        let mut text = base_config(&self.nats.url(), 0, admin);
        text.push_str(&poll_source(&self.store, &self.bucket, extra));
        text.push_str(&function_config(&self.function));
        text
    }
}

/// Waits until `condition` holds or panics with `what`.
async fn until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn uploads_reach_the_function_through_the_stores_webhook() {
    let nats = NatsServer::start();
    let function = FunctionServer::start(|_, _| Reply::ok()).await;
    let mut text = hook_config(&nats, 0);
    text.push_str(&function_config(&function));
    let switchyard = Switchyard::start(text).await;
    // The store sends a test notification when it starts: the hook must be up.
    let store = ObjectStore::start(Notifications::Webhook(switchyard.url("/hooks/s3")));
    let client = client(&store).await;
    let bucket = create_bucket(&client).await;

    let keys = [
        "plain.txt",
        "with space.txt",
        "red+flower.jpg",
        "日本/写真 (1)+é.png",
    ];
    let mut etags = HashMap::new();
    for (index, key) in keys.iter().enumerate() {
        let body = vec![b'x'; 10 + index];
        etags.insert(
            key.to_string(),
            (put(&client, &bucket, key, body).await, 10 + index),
        );
    }
    // A multipart upload: two parts of 5 MiB and a bit.
    let key = "big/multi part.bin";
    let upload = client
        .create_multipart_upload()
        .bucket(&bucket)
        .key(key)
        .send()
        .await
        .unwrap();
    let upload_id = upload.upload_id().unwrap();
    let mut parts = Vec::new();
    for (number, size) in [(1, 5 * 1024 * 1024), (2, 1024)] {
        let part = client
            .upload_part()
            .bucket(&bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(number)
            .body(ByteStream::from(vec![b'm'; size]))
            .send()
            .await
            .unwrap();
        parts.push(
            CompletedPart::builder()
                .part_number(number)
                .e_tag(part.e_tag().unwrap())
                .build(),
        );
    }
    let completed = client
        .complete_multipart_upload()
        .bucket(&bucket)
        .key(key)
        .upload_id(upload_id)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .set_parts(Some(parts))
                .build(),
        )
        .send()
        .await
        .unwrap();
    etags.insert(
        key.to_owned(),
        (
            completed.e_tag().unwrap().trim_matches('"').to_owned(),
            5 * 1024 * 1024 + 1024,
        ),
    );

    function.wait_for(keys.len() + 1, WAIT).await;
    let calls = calls_by_key(&function);
    for (key, (etag, size)) in &etags {
        let received = calls
            .get(key)
            .unwrap_or_else(|| panic!("no call for `{key}`; got {:?}", calls.keys()));
        assert_eq!(received.len(), 1, "{key}");
        let received = &received[0];
        assert!(
            received
                .header("ce-type")
                .unwrap()
                .starts_with("com.amazonaws.s3.ObjectCreated:"),
            "{:?}",
            received.header("ce-type")
        );
        assert_eq!(
            received.header("ce-source").unwrap(),
            format!("aws:s3.{}.{bucket}", object_store::REGION)
        );
        assert_eq!(
            decoded(received, "ce-s3bucket").as_deref(),
            Some(bucket.as_str())
        );
        assert_eq!(decoded(received, "ce-s3key").as_deref(), Some(key.as_str()));
        assert_eq!(
            decoded(received, "ce-s3etag").as_deref(),
            Some(etag.as_str())
        );
        if key.starts_with("big/") {
            // versitygw 1.8.0 leaves the size out of its CompleteMultipartUpload
            // notifications (s3api/controllers/object-post.go sets no ObjectSize), so
            // the record says 0; AWS and MinIO send it. The type says what it was.
            assert_eq!(
                received.header("ce-type"),
                Some("com.amazonaws.s3.ObjectCreated:CompleteMultipartUpload")
            );
            assert!(etag.ends_with("-2"), "{etag}");
        } else {
            assert_eq!(
                received.header("ce-s3size"),
                Some(size.to_string().as_str())
            );
        }
        assert_eq!(
            decoded(received, "ce-id"),
            Some(format!("{bucket}/{key}@{etag}"))
        );
        let data: Value = serde_json::from_slice(&received.body).unwrap();
        assert_eq!(data["object"]["key"], key.as_str(), "{data}");
        assert_eq!(data["bucket"]["name"], bucket.as_str());
        // versitygw writes the ETag in quotes; stored bare, as a poll stores it.
        assert_eq!(data["object"]["eTag"], etag.as_str(), "{data}");
    }
    switchyard.stop().await;
}

#[tokio::test]
async fn uploads_reach_the_function_through_nats_notifications() {
    let nats = NatsServer::start();
    let function = FunctionServer::start(|_, _| Reply::ok()).await;
    let subject = random_name("bucketevents");
    let mut text = base_config(&nats.url(), 0, 0);
    text.push_str(&format!(
        "\n[[sources]]\ntype = \"nats\"\nname = \"store-events\"\nsubjects = [\"{subject}\"]\nformat = \"s3\"\nkey_encoding = \"none\"\n"
    ));
    text.push_str(&function_config(&function));
    let switchyard = Switchyard::start(text).await;
    let store = ObjectStore::start(Notifications::Nats {
        url: nats.url(),
        subject: subject.clone(),
    });
    let client = client(&store).await;
    let bucket = create_bucket(&client).await;
    let etag = put(&client, &bucket, "report 2026.csv", b"a,b\n1,2\n".to_vec()).await;

    let received = function.wait_for(1, WAIT).await;
    assert_eq!(
        decoded(&received[0], "ce-subject").as_deref(),
        Some("report 2026.csv")
    );
    assert_eq!(decoded(&received[0], "ce-s3etag").as_ref(), Some(&etag));
    assert_eq!(received[0].header("ce-s3size"), Some("8"));
    let data: Value = serde_json::from_slice(&received[0].body).unwrap();
    assert_eq!(data["object"]["eTag"], etag.as_str(), "{data}");
    switchyard.stop().await;
}

#[tokio::test]
async fn a_malformed_notification_is_refused_with_the_reason_and_a_test_message_accepted() {
    let nats = NatsServer::start();
    let function = FunctionServer::start(|_, _| Reply::ok()).await;
    let mut text = hook_config(&nats, 0);
    text.push_str(&function_config(&function));
    let switchyard = Switchyard::start(text).await;
    let client = reqwest::Client::new();
    let url = switchyard.url("/hooks/s3");
    let post = |body: &'static str| client.post(&url).body(body).send();

    let response = post("{\"Records\": [").await.unwrap();
    assert_eq!(response.status(), 400);
    let message = response.text().await.unwrap();
    assert!(
        message.contains("invalid S3 event notification"),
        "{message}"
    );

    // One good record and one without `s3`: nothing of it is accepted.
    let response = post(
        r#"{"Records":[{"eventName":"ObjectCreated:Put","eventSource":"aws:s3","awsRegion":"us-east-1",
        "s3":{"bucket":{"name":"b1"},"object":{"key":"good.txt","size":1,"eTag":"e1"}}},
        {"eventName":"ObjectCreated:Put"}]}"#,
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 400);
    let message = response.text().await.unwrap();
    assert!(
        message.contains("record 1: missing field `s3`"),
        "{message}"
    );

    let response = post(r#"{"Service":"Amazon S3","Event":"s3:TestEvent","Bucket":"b1"}"#)
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    // The same good record alone is accepted and delivered: the refused body left
    // nothing behind (the function sees exactly one call).
    let response = post(
        r#"{"Records":[{"eventName":"ObjectCreated:Put","eventSource":"aws:s3","awsRegion":"us-east-1",
        "s3":{"bucket":{"name":"b1"},"object":{"key":"good.txt","size":1,"eTag":"e1"}}}]}"#,
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 202);
    function.wait_for(1, WAIT).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(function.received().len(), 1);
    switchyard.stop().await;
}

#[tokio::test]
async fn the_poller_resumes_after_a_restart_and_emits_each_object_once() {
    let setup = Polled::start().await;
    let (function, client, bucket) = (&setup.function, &setup.client, &setup.bucket);
    let mut etags = HashMap::new();
    for index in 0..3 {
        let key = format!("in/{index}.txt");
        etags.insert(
            key.clone(),
            put(client, bucket, &key, vec![b'a'; index + 1]).await,
        );
    }
    let text = setup.config("page_size = 2");
    let switchyard = Switchyard::start(text.clone()).await;
    function.wait_for(3, WAIT).await;
    switchyard.stop().await;

    // While Switchyard is stopped: five new objects, one changed, two untouched.
    for index in 3..8 {
        let key = format!("in/{index}.txt");
        etags.insert(
            key.clone(),
            put(client, bucket, &key, vec![b'b'; index + 1]).await,
        );
    }
    let changed = "in/1.txt";
    let new_etag = put(client, bucket, changed, b"changed".to_vec()).await;
    assert_ne!(etags[changed], new_etag);

    let switchyard = Switchyard::start(text).await;
    function.wait_for(3 + 6, WAIT).await;
    // Several more scans pass; none re-emits anything.
    wait_scans(&switchyard, 3.0).await;
    let calls = calls_by_key(function);
    assert_eq!(function.received().len(), 9, "{:?}", calls.keys());
    for index in 0..8 {
        let key = format!("in/{index}.txt");
        let expected = if key == changed { 2 } else { 1 };
        assert_eq!(calls[&key].len(), expected, "{key}");
    }
    let etags_seen: Vec<_> = calls[changed]
        .iter()
        .map(|received| decoded(received, "ce-s3etag").unwrap())
        .collect();
    assert_eq!(etags_seen, vec![etags[changed].clone(), new_etag]);
    switchyard.stop().await;
}

#[tokio::test]
async fn a_notification_and_a_poll_of_the_same_upload_deliver_it_once() {
    let nats = NatsServer::start();
    let function = FunctionServer::start(|_, _| Reply::ok()).await;
    let http_port = free_port();
    // The poller starts before the bucket exists (it retries); the hook must be up
    // before the store starts (the store tests it then).
    let bucket = random_name("bkt");
    let mut text = hook_config(&nats, http_port);
    text.push_str(&function_config(&function));
    let store = ObjectStore::start_later(Notifications::Webhook(format!(
        "http://127.0.0.1:{http_port}/hooks/s3"
    )));
    text.push_str(&poll_source(&store, &bucket, ""));
    let switchyard = Switchyard::start(text).await;
    let store = store.run();
    let client = client(&store).await;
    client.create_bucket().bucket(&bucket).send().await.unwrap();

    let keys: Vec<String> = (0..20)
        .map(|index| format!("both/{index:02}.dat"))
        .collect();
    for key in &keys {
        put(&client, &bucket, key, key.as_bytes().to_vec()).await;
    }
    function.wait_for(keys.len(), WAIT).await;
    // Both paths have noticed every object: the hook at once, the poller within a
    // scan; wait for two more complete scans after the uploads.
    wait_scans(&switchyard, 2.0).await;
    let polled = switchyard.metric("switchyard_s3_poll_events_total").await;
    assert!(polled >= keys.len() as f64, "the poller emitted {polled}");
    let calls = calls_by_key(&function);
    for key in &keys {
        assert_eq!(calls.get(key).map(Vec::len), Some(1), "{key}");
    }
    assert_eq!(function.received().len(), keys.len());
    switchyard.stop().await;
}

#[tokio::test]
async fn ten_thousand_objects_are_listed_in_bounded_memory_and_only_changes_are_events() {
    let setup = Polled::start().await;
    let (function, client, bucket) = (&setup.function, &setup.client, &setup.bucket);
    const OBJECTS: usize = 10_000;
    futures::stream::iter(0..OBJECTS)
        .for_each_concurrent(32, |index| {
            let client = client.clone();
            let bucket = bucket.clone();
            async move {
                put(
                    &client,
                    &bucket,
                    &format!("many/{index:05}"),
                    index.to_string().into_bytes(),
                )
                .await;
            }
        })
        .await;
    let text = setup.config("interval = \"1s\"\ndeletions = true");
    let switchyard = Switchyard::start(text).await;
    function.wait_for(OBJECTS, Duration::from_secs(120)).await;
    let held = switchyard
        .metric("switchyard_s3_poll_objects_held_max")
        .await;
    assert!(
        held > 0.0 && held <= 2000.0,
        "one scan held {held} objects at once (a page is 1000)"
    );

    // One changed, one deleted, the rest untouched: two events.
    let changed = "many/04321";
    let etag = put(client, bucket, changed, b"new bytes".to_vec()).await;
    client
        .delete_object()
        .bucket(bucket)
        .key("many/00007")
        .send()
        .await
        .unwrap();
    function.wait_for(OBJECTS + 2, WAIT).await;
    wait_scans(&switchyard, 2.0).await;
    let received = function.received();
    assert_eq!(received.len(), OBJECTS + 2);
    let tail: Vec<(String, String)> = received[OBJECTS..]
        .iter()
        .map(|received| {
            (
                received.header("ce-type").unwrap().to_owned(),
                decoded(received, "ce-subject").unwrap(),
            )
        })
        .collect();
    assert!(
        tail.contains(&(
            "com.amazonaws.s3.ObjectCreated:Put".to_owned(),
            changed.to_owned()
        )),
        "{tail:?}"
    );
    assert!(
        tail.contains(&(
            "com.amazonaws.s3.ObjectRemoved:Delete".to_owned(),
            "many/00007".to_owned()
        )),
        "{tail:?}"
    );
    let changed_call = received[OBJECTS..]
        .iter()
        .find(|received| decoded(received, "ce-subject").as_deref() == Some(changed))
        .unwrap();
    assert_eq!(decoded(changed_call, "ce-s3etag"), Some(etag));
    let held = switchyard
        .metric("switchyard_s3_poll_objects_held_max")
        .await;
    assert!(held <= 2000.0, "a rescan held {held} objects at once");
    switchyard.stop().await;
}

#[tokio::test]
async fn the_poller_retries_while_the_store_is_down_and_catches_up() {
    let mut setup = Polled::start().await;
    let (function, client, bucket) = (
        setup.function.clone(),
        setup.client.clone(),
        setup.bucket.clone(),
    );
    put(&client, &bucket, "before.txt", b"1".to_vec()).await;
    let text = setup.config("");
    let switchyard = Switchyard::start(text).await;
    function.wait_for(1, WAIT).await;

    setup.store.stop();
    let deadline = Instant::now() + WAIT;
    while switchyard.metric("switchyard_s3_poll_errors_total").await < 2.0 {
        assert!(
            Instant::now() < deadline,
            "no failed scan reported while the store is down"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    setup.store.restart();
    for key in ["after-1.txt", "after-2.txt"] {
        put(&client, &bucket, key, key.as_bytes().to_vec()).await;
    }
    function.wait_for(3, WAIT).await;
    let calls = calls_by_key(&function);
    for key in ["before.txt", "after-1.txt", "after-2.txt"] {
        assert_eq!(calls.get(key).map(Vec::len), Some(1), "{key}");
    }
    until("nothing else", || function.received().len() == 3).await;
    switchyard.stop().await;
}

#[tokio::test]
async fn a_trigger_enriches_object_events_with_a_presigned_url_metadata_tags_and_content() {
    let setup = Polled::start().await;
    let (function, client, bucket) = (&setup.function, &setup.client, &setup.bucket);
    let small = b"small enough to inline".to_vec();
    client
        .put_object()
        .bucket(bucket)
        .key("docs/small note.txt")
        .content_type("text/plain")
        .metadata("owner", "alice")
        .tagging("team=vision&stage=raw")
        .body(ByteStream::from(small.clone()))
        .send()
        .await
        .unwrap();
    let large = vec![b'L'; 4096];
    put(client, bucket, "docs/large.bin", large.clone()).await;

    let mut text = setup.config("");
    text.push_str(&format!("enrich = {{ store = \"test\", buckets = [\"{bucket}\"], presign = \"5m\", metadata = true, tags = true, content_max_bytes = 1024 }}\n"));
    let switchyard = Switchyard::start(text).await;
    function.wait_for(2, WAIT).await;
    // An object event naming another bucket (anyone who can post events can write
    // one) is delivered unenriched: the store is not read for it.
    let response = reqwest::Client::new()
        .post(switchyard.url("/v1/events"))
        .header("ce-specversion", "1.0")
        .header("ce-id", "forged-1")
        .header("ce-source", "aws:s3.us-east-1.private")
        .header("ce-type", "com.amazonaws.s3.ObjectCreated:Put")
        .header("ce-subject", "secrets.txt")
        .header("ce-s3bucket", "private")
        .header("ce-s3key", "secrets.txt")
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    function.wait_for(3, WAIT).await;
    let calls = calls_by_key(function);
    let forged = &calls["secrets.txt"][0];
    assert_eq!(forged.header("ce-s3url"), None);
    assert_eq!(
        decoded(forged, "ce-s3enrichment").as_deref(),
        Some("bucket not in this trigger's enrich.buckets")
    );

    let note = &calls["docs/small note.txt"][0];
    let data: Value = serde_json::from_slice(&note.body).unwrap();
    let object = &data["object"];
    assert_eq!(object["key"], "docs/small note.txt", "{data}");
    assert_eq!(object["contentType"], "text/plain", "{data}");
    assert_eq!(object["metadata"]["owner"], "alice", "{data}");
    assert_eq!(object["tags"]["team"], "vision", "{data}");
    assert_eq!(object["tags"]["stage"], "raw", "{data}");
    assert_eq!(object["contentEncoding"], "base64");
    use base64::Engine;
    let inline = base64::engine::general_purpose::STANDARD
        .decode(object["content"].as_str().unwrap())
        .unwrap();
    assert_eq!(inline, small);
    // The presigned URL works without credentials.
    let url = decoded(note, "ce-s3url").expect("a presigned url");
    let fetched = reqwest::get(&url).await.unwrap();
    assert_eq!(fetched.status(), 200, "{url}");
    assert_eq!(fetched.bytes().await.unwrap().to_vec(), small);

    let big = &calls["docs/large.bin"][0];
    let data: Value = serde_json::from_slice(&big.body).unwrap();
    assert!(
        data["object"]["content"].is_null(),
        "over the limit: {data}"
    );
    assert_eq!(data["object"]["size"], 4096);
    let url = decoded(big, "ce-s3url").expect("a presigned url");
    assert_eq!(
        reqwest::get(&url)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .len(),
        4096
    );

    // What was stored is the event as accepted: enrichment is per invocation.
    let bus = switchyard.bus().await;
    let mut stream = bus
        .jetstream()
        .get_stream(bus.events_stream())
        .await
        .unwrap();
    let first = stream.info().await.unwrap().state.first_sequence;
    let stored = stream.get_raw_message(first).await.unwrap();
    let stored_data: Value = serde_json::from_slice(&stored.payload).unwrap();
    assert!(stored_data["object"]["metadata"].is_null(), "{stored_data}");
    switchyard.stop().await;
}

/// A signing key and certificate made by openssl, and a server for the certificate and
/// the subscription confirmation URL (SNS stands in for itself on loopback).
struct SnsFixture {
    directory: tempfile::TempDir,
    base: String,
    confirmations: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Requests for anything but the certificate and the confirmation (404s).
    misses: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl SnsFixture {
    async fn start() -> SnsFixture {
        let directory = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=sns.test",
            ])
            .arg("-keyout")
            .arg(directory.path().join("key.pem"))
            .arg("-out")
            .arg(directory.path().join("cert.pem"))
            .stderr(std::process::Stdio::null())
            .status()
            .expect("running openssl");
        assert!(status.success());
        let certificate = std::fs::read(directory.path().join("cert.pem")).unwrap();
        let confirmations = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = confirmations.clone();
        let misses = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let missed = misses.clone();
        let router = axum::Router::new()
            .route(
                "/cert.pem",
                axum::routing::get(move || {
                    let certificate = certificate.clone();
                    async move { certificate }
                }),
            )
            .route(
                "/confirm",
                axum::routing::get(move || {
                    counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    async { "<ConfirmSubscriptionResponse/>" }
                }),
            )
            .fallback(move || {
                missed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async { (axum::http::StatusCode::NOT_FOUND, "no such certificate") }
            });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}/", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        SnsFixture {
            directory,
            base,
            confirmations,
            misses,
        }
    }

    /// Base64 RSA signature of `text` with SHA1 (`SignatureVersion` 1) or SHA256 (2).
    fn sign(&self, text: &str, version: u8) -> String {
        let input = self.directory.path().join("input");
        std::fs::write(&input, text).unwrap();
        let digest = if version == 1 { "-sha1" } else { "-sha256" };
        let output = std::process::Command::new("openssl")
            .args(["dgst", digest, "-sign"])
            .arg(self.directory.path().join("key.pem"))
            .arg(&input)
            .output()
            .unwrap();
        assert!(output.status.success());
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(output.stdout)
    }
}

const TOPIC: &str = "arn:aws:sns:us-east-1:123456789012:uploads";

#[tokio::test]
async fn sns_subscriptions_are_confirmed_and_signed_notifications_delivered_after_verification() {
    let nats = NatsServer::start();
    let function = FunctionServer::start(|_, _| Reply::ok()).await;
    let sns = SnsFixture::start().await;
    let mut text = hook_config(&nats, 0).replace("key_encoding = \"none\"\n", "");
    text.push_str(&format!(
        "sns_topics = [\"{TOPIC}\"]\nsns_trusted_urls = [\"{}\"]\n",
        sns.base
    ));
    text.push_str(&function_config(&function));
    let switchyard = Switchyard::start(text).await;
    let client = reqwest::Client::new();
    let post = |kind: &'static str, body: Value| {
        client
            .post(switchyard.url("/hooks/s3"))
            .header("x-amz-sns-message-type", kind)
            .header("content-type", "text/plain; charset=UTF-8")
            .body(body.to_string())
            .send()
    };
    let cert_url = format!("{}cert.pem", sns.base);

    // The subscription handshake: verified (SHA1), then confirmed.
    let subscribe_url = format!("{}confirm?Token=tok-1", sns.base);
    let timestamp = "2026-11-27T10:00:00.000Z";
    let canonical = format!(
        "Message\nYou have chosen to subscribe.\nMessageId\nm-1\nSubscribeURL\n{subscribe_url}\nTimestamp\n{timestamp}\nToken\ntok-1\nTopicArn\n{TOPIC}\nType\nSubscriptionConfirmation\n"
    );
    let confirmation = serde_json::json!({
        "Type": "SubscriptionConfirmation", "MessageId": "m-1", "Token": "tok-1", "TopicArn": TOPIC,
        "Message": "You have chosen to subscribe.", "SubscribeURL": subscribe_url,
        "Timestamp": timestamp, "SignatureVersion": "1", "Signature": sns.sign(&canonical, 1),
        "SigningCertURL": cert_url,
    });
    let response = post("SubscriptionConfirmation", confirmation.clone())
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{:?}", response.text().await);
    assert_eq!(
        sns.confirmations.load(std::sync::atomic::Ordering::SeqCst),
        1
    );

    // A notification carrying an S3 record (AWS encodes the key), signed with SHA256.
    let s3 = serde_json::json!({"Records":[{"eventVersion":"2.1","eventSource":"aws:s3","awsRegion":"us-east-1",
        "eventTime":"2026-11-27T10:00:01.000Z","eventName":"ObjectCreated:Put",
        "s3":{"s3SchemaVersion":"1.0","bucket":{"name":"photos","arn":"arn:aws:s3:::photos"},
              "object":{"key":"red+flower.jpg","size":7,"eTag":"abc123","sequencer":"01"}}}]})
    .to_string();
    let canonical = format!(
        "Message\n{s3}\nMessageId\nm-2\nSubject\nAmazon S3 Notification\nTimestamp\n{timestamp}\nTopicArn\n{TOPIC}\nType\nNotification\n"
    );
    let notification = serde_json::json!({
        "Type": "Notification", "MessageId": "m-2", "TopicArn": TOPIC, "Subject": "Amazon S3 Notification",
        "Message": s3, "Timestamp": timestamp, "SignatureVersion": "2",
        "Signature": sns.sign(&canonical, 2), "SigningCertURL": cert_url,
    });
    // Tampered: the message changed after signing.
    let mut tampered = notification.clone();
    tampered["Message"] = Value::String(s3.replace("red+flower", "evil"));
    let response = post("Notification", tampered).await.unwrap();
    assert_eq!(response.status(), 403);
    let message = response.text().await.unwrap();
    assert!(message.contains("signature does not match"), "{message}");
    // A certificate from anywhere else is not fetched.
    let mut elsewhere = notification.clone();
    elsewhere["SigningCertURL"] = Value::String("https://sns.example.com/cert.pem".to_owned());
    let response = post("Notification", elsewhere).await.unwrap();
    assert_eq!(response.status(), 403);
    assert!(response.text().await.unwrap().contains("SigningCertURL"));
    // A certificate that cannot be fetched: 503 (SNS retries), and the failure is
    // remembered, so a sender cannot make Switchyard fetch on every request.
    let mut missing = notification.clone();
    missing["SigningCertURL"] = Value::String(format!("{}missing.pem", sns.base));
    for _ in 0..3 {
        let response = post("Notification", missing.clone()).await.unwrap();
        assert_eq!(response.status(), 503);
    }
    assert_eq!(sns.misses.load(std::sync::atomic::Ordering::SeqCst), 1);
    // Another topic is refused.
    let mut other_topic = notification.clone();
    other_topic["TopicArn"] = Value::String("arn:aws:sns:us-east-1:123456789012:other".to_owned());
    let response = post("Notification", other_topic).await.unwrap();
    assert_eq!(response.status(), 403);

    // With sns_topics set, only signed SNS messages: a plain notification body (no
    // SNS headers) is refused, and so is SNS raw delivery (unsigned).
    let response = client
        .post(switchyard.url("/hooks/s3"))
        .body(s3.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    assert!(
        response
            .text()
            .await
            .unwrap()
            .contains("only signed SNS messages")
    );
    let response = client
        .post(switchyard.url("/hooks/s3"))
        .header("x-amz-sns-message-type", "Notification")
        .header("x-amz-sns-rawdelivery", "true")
        .body(s3.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert!(
        response
            .text()
            .await
            .unwrap()
            .contains("raw message delivery")
    );

    let response = post("Notification", notification).await.unwrap();
    assert_eq!(response.status(), 202, "{:?}", response.text().await);
    let received = function.wait_for(1, WAIT).await;
    assert_eq!(
        decoded(&received[0], "ce-subject").as_deref(),
        Some("red flower.jpg")
    );
    assert_eq!(
        decoded(&received[0], "ce-id").as_deref(),
        Some("photos/red flower.jpg@abc123")
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        function.received().len(),
        1,
        "only the verified notification is delivered"
    );
    switchyard.stop().await;
}

#[tokio::test]
async fn a_start_after_listing_emits_only_keys_after_its_cursor_across_restarts() {
    let setup = Polled::start().await;
    let (function, client, bucket) = (&setup.function, &setup.client, &setup.bucket);
    for key in ["logs/2026-11-27T10.log", "logs/2026-11-27T11.log"] {
        put(client, bucket, key, b"x".to_vec()).await;
    }
    let text = setup.config("listing = \"start_after\"\nprefix = \"logs/\"");
    let switchyard = Switchyard::start(text.clone()).await;
    function.wait_for(2, WAIT).await;
    switchyard.stop().await;

    // While stopped: a new key after the cursor, and a rewrite of an old one (before
    // the cursor: this listing mode does not see it, as documented).
    put(client, bucket, "logs/2026-11-27T12.log", b"x".to_vec()).await;
    put(
        client,
        bucket,
        "logs/2026-11-27T10.log",
        b"rewritten".to_vec(),
    )
    .await;
    put(client, bucket, "other/ignored.log", b"x".to_vec()).await;
    let switchyard = Switchyard::start(text).await;
    function.wait_for(3, WAIT).await;
    wait_scans(&switchyard, 2.0).await;
    let mut keys: Vec<String> = function
        .received()
        .iter()
        .map(|received| decoded(received, "ce-subject").unwrap())
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "logs/2026-11-27T10.log",
            "logs/2026-11-27T11.log",
            "logs/2026-11-27T12.log"
        ]
    );
    switchyard.stop().await;
}

#[tokio::test]
async fn one_process_polls_a_bucket_at_a_time_and_another_takes_over_when_it_stops() {
    let setup = Polled::start().await;
    let (function, client, bucket) = (&setup.function, &setup.client, &setup.bucket);
    for index in 0..20 {
        put(client, bucket, &format!("a/{index:02}"), b"1".to_vec()).await;
    }
    // Two instances of one configuration (the same streams and poll state), apart only
    // in their listeners.
    let text = setup.config("");
    let first = Switchyard::start(text.clone()).await;
    function.wait_for(20, WAIT).await;
    // Port 0: each binds its own listeners.
    let second = Switchyard::start(text.clone()).await;
    wait_scans(&first, 3.0).await;
    assert_eq!(
        second.metric("switchyard_s3_poll_scans_total").await,
        0.0,
        "the second process scanned while the first held the bucket"
    );
    first.stop().await;
    // The first handed the bucket over at shutdown: the second polls it now.
    for index in 20..30 {
        put(client, bucket, &format!("a/{index:02}"), b"1".to_vec()).await;
    }
    function.wait_for(30, WAIT).await;
    wait_scans(&second, 2.0).await;
    let calls = calls_by_key(function);
    assert_eq!(function.received().len(), 30, "{:?}", calls.keys());
    assert!(calls.values().all(|calls| calls.len() == 1));
    second.stop().await;
}

#[tokio::test]
async fn the_real_binary_polls_with_credentials_from_the_standard_aws_chain() {
    let setup = Polled::start().await;
    setup.put_keys(&["chain/1.txt", "chain/2.txt"]).await;
    // A store without credentials in the config: the binary takes them from the
    // environment (the first link of the standard AWS chain).
    let text = setup.config_at(0, "").replace(
        &format!(
            "access_key_id = \"{}\"\nsecret_access_key = \"{}\"\n",
            object_store::ACCESS_KEY,
            object_store::SECRET_KEY
        ),
        "",
    );
    assert!(!text.contains("secret_access_key"), "{text}");
    let directory = tempfile::tempdir().unwrap();
    let config = write_config(directory.path(), &text);
    let process = Process::start(
        &config,
        &[
            ("AWS_ACCESS_KEY_ID", object_store::ACCESS_KEY.to_owned()),
            ("AWS_SECRET_ACCESS_KEY", object_store::SECRET_KEY.to_owned()),
            ("AWS_CONFIG_FILE", "/nonexistent".to_owned()),
            ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent".to_owned()),
        ],
    );
    process.wait_ready().await;
    setup.function.wait_for(2, WAIT).await;
    let calls = calls_by_key(&setup.function);
    assert_eq!(calls.len(), 2, "{:?}", calls.keys());
    assert!(calls.contains_key("chain/1.txt") && calls.contains_key("chain/2.txt"));
}

#[tokio::test]
async fn a_lost_manifest_is_logged_and_the_poller_starts_over_instead_of_stalling() {
    let setup = Polled::start().await;
    let keys: Vec<String> = (0..5).map(|index| format!("m/{index}")).collect();
    for key in &keys {
        put(&setup.client, &setup.bucket, key, b"1".to_vec()).await;
    }
    let text = setup.config("");
    let switchyard = Switchyard::start(text).await;
    setup.function.wait_for(5, WAIT).await;
    wait_scans(&switchyard, 1.0).await;
    // Lose the manifest: purge every chunk of the poll state.
    let bus = switchyard.bus().await;
    let state = bus
        .jetstream()
        .get_key_value(format!("{}_S3_POLL", bus.events_stream()))
        .await
        .unwrap();
    let mut names = state.keys().await.unwrap();
    let mut purged = 0;
    while let Some(Ok(name)) = names.next().await {
        if name.contains(".m") && name.contains(".c") {
            state.purge(&name).await.unwrap();
            purged += 1;
        }
    }
    assert!(purged > 0, "no manifest chunk found to purge");
    // The poller notices, starts from an empty manifest, and keeps polling: a new
    // object arrives; the old ones are emitted again with their ids and dropped by
    // the duplicate window, so each key is still delivered once.
    put(&setup.client, &setup.bucket, "m/new", b"2".to_vec()).await;
    setup.function.wait_for(6, WAIT).await;
    wait_scans(&switchyard, 2.0).await;
    assert!(switchyard.metric("switchyard_s3_poll_errors_total").await >= 1.0);
    let calls = calls_by_key(&setup.function);
    assert_eq!(setup.function.received().len(), 6, "{:?}", calls.keys());
    assert!(calls.values().all(|calls| calls.len() == 1));
    switchyard.stop().await;
}
