//! (f) Object store -> function, against a real S3-compatible server (versitygw, as in
//! the tests), in one run:
//! - notifications: `count` uploads (32 in flight) with the store's webhook pointed at
//!   Switchyard's `format = "s3"` hook, timed from the first upload to the last
//!   function call, beside the bare upload rate (the same uploads, no notifications):
//!   an upload cannot be noticed faster than it is made;
//! - polling: `poll_count` objects already in a bucket, timed from Switchyard's start to
//!   the last function call, beside a bare ListObjectsV2 loop over the same bucket (the
//!   listing rate) and a bare "list and POST each object to the function, 64 in flight"
//!   loop (what anyone would write by hand, without state or durability).

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::StreamExt;
use switchyard_testkit::object_store::{Notifications, ObjectStore};

use crate::{Nats, NoopFunction, client, config_header, free_port};

/// An HTTP source with a `format = "s3"` hook at `/hooks/s3`, `extra` (stores, a poll
/// source), and one trigger to the no-op function.
fn config_text(
    nats: &Nats,
    admin_port: u16,
    http_port: u16,
    function: &str,
    name: &str,
    extra: &str,
) -> String {
    config_header(&nats.url(), &format!("bench{name}"), admin_port)
        + &format!(
            r#"[[sources]]
type = "http"
name = "http"
listen = "127.0.0.1:{http_port}"
[[sources.hooks]]
name = "s3"
format = "s3"
key_encoding = "none"
{extra}
[[functions]]
type = "http"
name = "noop"
url = "{function}"
max_concurrency = 64
concurrency_scope = "process"
[[triggers]]
name = "bench"
function = "noop"
max_concurrency = 64
"#
        )
}

async fn start(text: &str) -> anyhow::Result<switchyard::Running> {
    let config = switchyard::config::parse(Path::new("bench.toml"), text, &|_| None)
        .map_err(|errors| anyhow::anyhow!("{errors}"))?;
    switchyard::start(config).await
}

async fn upload(client: &aws_sdk_s3::Client, bucket: &str, range: std::ops::Range<usize>) {
    futures::stream::iter(range)
        .for_each_concurrent(32, |index| {
            let client = client.clone();
            let bucket = bucket.to_owned();
            async move {
                client
                    .put_object()
                    .bucket(&bucket)
                    .key(format!("in/{index:06}.json"))
                    .body(crate::PAYLOAD.as_bytes().to_vec().into())
                    .send()
                    .await
                    .expect("uploading");
            }
        })
        .await;
}

async fn wait_count(function: &NoopFunction, count: usize, limit: Duration) -> Option<Instant> {
    let deadline = Instant::now() + limit;
    while (function.count.load(Ordering::Relaxed) as usize) < count {
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Some(Instant::now())
}

pub async fn bench_objects(nats: &Nats, count: usize, poll_count: usize) -> anyhow::Result<()> {
    let function = NoopFunction::start(false).await;
    let rate = |count: usize, elapsed: Duration| count as f64 / elapsed.as_secs_f64();
    println!(
        "### (f) object store -> function (versitygw, {count} notified uploads, {poll_count} polled objects)\n"
    );

    // Bare uploads: the same uploads to a store without notifications.
    let bare_upload = {
        let store = ObjectStore::start(Notifications::None);
        let client = store.client().await;
        client.create_bucket().bucket("bare").send().await?;
        let started = Instant::now();
        upload(&client, "bare", 0..count).await;
        started.elapsed()
    };

    // Bare notifications: the store's webhook pointed at a do-nothing receiver (200,
    // count): the store's own cost of notifying.
    let bare_notified = {
        let receiver = NoopFunction::start(false).await;
        let store = ObjectStore::start(Notifications::Webhook(receiver.url()));
        let client = store.client().await;
        client.create_bucket().bucket("barenotified").send().await?;
        receiver.count.store(0, Ordering::SeqCst);
        let started = Instant::now();
        upload(&client, "barenotified", 0..count).await;
        let done = wait_count(&receiver, count, Duration::from_secs(60)).await;
        done.map(|done| done - started)
    };

    // Notifications: upload -> store webhook -> hook -> JetStream -> trigger -> function.
    let notified = {
        let http_port = free_port();
        let text = config_text(nats, free_port(), http_port, &function.url(), "notify", "");
        let running = start(&text).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let store = ObjectStore::start(Notifications::Webhook(format!(
            "http://127.0.0.1:{http_port}/hooks/s3"
        )));
        let client = store.client().await;
        client.create_bucket().bucket("notified").send().await?;
        function.count.store(0, Ordering::SeqCst);
        let started = Instant::now();
        upload(&client, "notified", 0..count).await;
        let uploaded = started.elapsed();
        let done = wait_count(&function, count, Duration::from_secs(60)).await;
        let delivered = function.count.load(Ordering::Relaxed);
        running.stop().await?;
        (uploaded, done.map(|done| done - started), delivered)
    };

    // The hook alone: notification bodies (one record each, as versitygw sends them)
    // POSTed straight to the hook, 64 in flight; what Switchyard takes when the store
    // is not the limit.
    let hook_direct = {
        let http_port = free_port();
        let text = config_text(nats, free_port(), http_port, &function.url(), "hook", "");
        let running = start(&text).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        function.count.store(0, Ordering::SeqCst);
        let http = client();
        let url = format!("http://127.0.0.1:{http_port}/hooks/s3");
        let started = Instant::now();
        futures::stream::iter(0..count)
            .map(|index| {
                let body = format!(
                    r#"{{"Records":[{{"eventVersion":"2.2","eventSource":"aws:s3","awsRegion":"us-east-1","eventTime":"2026-11-27T10:00:00Z","eventName":"s3:ObjectCreated:Put","s3":{{"s3SchemaVersion":"1.0","configurationId":"webhook-global","bucket":{{"name":"direct","arn":"arn:aws:s3:::direct"}},"object":{{"key":"in/{index:06}.json","size":142,"eTag":"e{index}","sequencer":"{index}"}}}}}}]}}"#
                );
                let request = http.post(&url).header("content-type", "application/json").body(body);
                async move {
                    let response = request.send().await.expect("posting to the hook");
                    let status = response.status();
                    assert_eq!(status, 202, "{}", response.text().await.unwrap_or_default());
                }
            })
            .buffer_unordered(64)
            .for_each(|()| async {})
            .await;
        let done = wait_count(&function, count, Duration::from_secs(60)).await;
        running.stop().await?;
        done.map(|done| done - started)
    };

    // Polling: objects already in the bucket.
    let store = ObjectStore::start(Notifications::None);
    let s3 = store.client().await;
    s3.create_bucket().bucket("polled").send().await?;
    upload(&s3, "polled", 0..poll_count).await;

    let bare_list = {
        let started = Instant::now();
        let mut pages = s3
            .list_objects_v2()
            .bucket("polled")
            .into_paginator()
            .send();
        let mut listed = 0;
        while let Some(page) = pages.next().await {
            listed += page?.contents().len();
        }
        anyhow::ensure!(listed == poll_count, "listed {listed} of {poll_count}");
        started.elapsed()
    };

    let bare_bridge = {
        function.count.store(0, Ordering::SeqCst);
        let http = client();
        let url = function.url();
        let started = Instant::now();
        let mut pages = s3
            .list_objects_v2()
            .bucket("polled")
            .into_paginator()
            .send();
        let mut objects = Vec::new();
        while let Some(page) = pages.next().await {
            for object in page?.contents() {
                objects.push((
                    object.key().unwrap_or_default().to_owned(),
                    object.e_tag().unwrap_or_default().to_owned(),
                ));
            }
            // POST this page's objects, 64 in flight, before the next page.
            futures::stream::iter(objects.drain(..))
                .map(|(key, etag)| {
                    let request = http
                        .post(&url)
                        .header("ce-specversion", "1.0")
                        .header("ce-id", format!("polled/{key}@{etag}"))
                        .header("ce-source", "aws:s3.us-east-1.polled")
                        .header("ce-type", "com.amazonaws.s3.ObjectCreated:Put")
                        .header("content-type", "application/json")
                        .body(format!("{{\"object\":{{\"key\":\"{key}\"}}}}"));
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
        }
        started.elapsed()
    };

    let polled = {
        let extra = format!(
            "{}\n[[sources]]\ntype = \"s3\"\nname = \"poll\"\nstore = \"bench\"\nbuckets = [\"polled\"]\ninterval = \"1s\"\n",
            store.config_table("bench")
        );
        let text = config_text(
            nats,
            free_port(),
            free_port(),
            &function.url(),
            "poll",
            &extra,
        );
        function.count.store(0, Ordering::SeqCst);
        let started = Instant::now();
        let running = start(&text).await?;
        let done = wait_count(&function, poll_count, Duration::from_secs(300)).await;
        let elapsed = done.map(|done| done - started);
        running.stop().await?;
        elapsed
    };

    println!("| path | objects/s | vs baseline |\n|---|---|---|");
    let bare_upload_rate = rate(count, bare_upload);
    println!(
        "| bare uploads (32 in flight, no notifications) | {bare_upload_rate:.0} | baseline |"
    );
    let (uploaded, notified_done, delivered) = notified;
    match bare_notified {
        Some(elapsed) => println!(
            "| uploads notified to a do-nothing receiver (first upload to last notification) | {:.0} | {:.0}% |",
            rate(count, elapsed),
            100.0 * rate(count, elapsed) / bare_upload_rate
        ),
        None => println!("| uploads notified to a do-nothing receiver | not all within 60 s | - |"),
    }
    println!(
        "| uploads notified to Switchyard (upload time only) | {:.0} | {:.0}% |",
        rate(count, uploaded),
        100.0 * rate(count, uploaded) / bare_upload_rate
    );
    match notified_done {
        Some(elapsed) => println!(
            "| notified and delivered (first upload to last call) | {:.0} | {:.0}% |",
            rate(count, elapsed),
            100.0 * rate(count, elapsed) / bare_upload_rate
        ),
        None => {
            println!("| notified and delivered | only {delivered} of {count} within 60 s | - |")
        }
    }
    if let Some(elapsed) = hook_direct {
        println!(
            "| notification bodies POSTed to the hook (64 in flight), delivered | {:.0} | {:.0}x |",
            rate(count, elapsed),
            rate(count, elapsed) / bare_upload_rate
        );
    }
    let bare_list_rate = rate(poll_count, bare_list);
    println!("| bare ListObjectsV2 (1,000 per page) | {bare_list_rate:.0} | baseline |");
    let bridge_rate = rate(poll_count, bare_bridge);
    println!(
        "| bare list-and-POST loop (64 in flight, no state) | {bridge_rate:.0} | {:.0}% of listing |",
        100.0 * bridge_rate / bare_list_rate
    );
    match polled {
        Some(elapsed) => println!(
            "| polled and delivered (start to last call) | {:.0} | {:.0}% of listing, {:.0}% of the bare loop |\n",
            rate(poll_count, elapsed),
            100.0 * rate(poll_count, elapsed) / bare_list_rate,
            100.0 * rate(poll_count, elapsed) / bridge_rate
        ),
        None => println!("| polled and delivered | not all within 300 s | - |\n"),
    }
    Ok(())
}

/// Peak resident memory of the real `switchyard` binary while it polls buckets of
/// growing size (first scan: every object is new), from `/proc/<pid>/status` VmHWM.
/// Bounded memory means the peak does not grow with the bucket.
pub async fn bench_poll_memory(
    nats: &Nats,
    binary: &std::path::Path,
    sizes: &[usize],
) -> anyhow::Result<()> {
    let function = NoopFunction::start(false).await;
    let store = ObjectStore::start(Notifications::None);
    let s3 = store.client().await;
    println!(
        "| objects in the bucket | delivered in | peak RSS (VmHWM) of the switchyard process |\n|---|---|---|"
    );
    for (index, &size) in sizes.iter().enumerate() {
        let bucket = format!("memory{index}");
        s3.create_bucket().bucket(&bucket).send().await?;
        upload(&s3, &bucket, 0..size).await;
        let admin = free_port();
        let extra = format!(
            "{}\n[[sources]]\ntype = \"s3\"\nname = \"poll\"\nstore = \"bench\"\nbuckets = [\"{bucket}\"]\ninterval = \"5s\"\n",
            store.config_table("bench")
        );
        let text = config_text(
            nats,
            admin,
            free_port(),
            &function.url(),
            &format!("mem{index}"),
            &extra,
        );
        let directory = tempfile::tempdir()?;
        let path = directory.path().join("bench.toml");
        std::fs::write(&path, text)?;
        function.count.store(0, Ordering::SeqCst);
        let started = Instant::now();
        let mut child = std::process::Command::new(binary)
            .args(["run", "--config"])
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let done = wait_count(&function, size, Duration::from_secs(600)).await;
        let peak = std::fs::read_to_string(format!("/proc/{}/status", child.id()))
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find(|line| line.starts_with("VmHWM:"))
                    .and_then(|line| line.split_whitespace().nth(1))
                    .and_then(|value| value.parse::<u64>().ok())
            })
            .unwrap_or(0);
        let _ = child.kill();
        let _ = child.wait();
        match done {
            Some(done) => println!(
                "| {size} | {:.1} s | {:.1} MiB |",
                (done - started).as_secs_f64(),
                peak as f64 / 1024.0
            ),
            None => println!(
                "| {size} | not all within 600 s | {:.1} MiB |",
                peak as f64 / 1024.0
            ),
        }
    }
    println!();
    Ok(())
}
