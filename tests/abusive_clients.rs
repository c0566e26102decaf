//! The HTTP source of a real `switchyard run` process under abusive clients: 500
//! slow-loris connections, 10,000 tiny requests, oversized headers; meanwhile a
//! normal client still gets its 202s within its own timeout, and the process's
//! resident memory stays bounded.

mod common;

use std::time::Duration;

use common::{NatsServer, Process, base_config, write_config};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A normal client: its events are accepted within its timeout.
async fn normal_client_is_served(url: &str, label: &str) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();
    for index in 0..5 {
        let response = common::binary_event(
            &client,
            url,
            &format!("{label}-{index}"),
            "com.example.normal",
            "{}",
        )
        .send()
        .await
        .unwrap_or_else(|error| panic!("{label}: the normal client was not served: {error}"));
        assert_eq!(response.status(), 202, "{label}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abusive_clients_do_not_starve_a_normal_one_and_memory_stays_bounded() {
    let nats = NatsServer::start();
    let directory = tempfile::tempdir().unwrap();
    let mut text = base_config(&nats.url(), 0, 0);
    text.push_str("limits = { header_timeout = \"2s\", body_timeout = \"2s\" }\n");
    let config = write_config(directory.path(), &text);
    let process = Process::start(&config, &[]);
    process.wait_ready().await;
    let address = process.source("http");
    let url = process.url("/v1/events");
    normal_client_is_served(&url, "warm-up").await;
    let baseline = process.rss_kib();

    // 500 slow-loris connections: a request line, then a header byte now and then.
    let mut lorises = Vec::new();
    for _ in 0..500 {
        lorises.push(tokio::spawn(async move {
            // Refused at once (over max_connections) or cut off later: either way
            // the connection does not stay.
            let Ok(mut stream) = tokio::net::TcpStream::connect(address).await else {
                return true;
            };
            let _ = stream
                .write_all(b"POST /v1/events HTTP/1.1\r\nHost: x\r\n")
                .await;
            for _ in 0..60 {
                tokio::time::sleep(Duration::from_millis(250)).await;
                if stream.write_all(b"X").await.is_err() {
                    return true;
                }
            }
            false
        }));
    }
    // While they hang on, a normal client is served.
    normal_client_is_served(&url, "during-slowloris").await;
    // Each was cut off by header_timeout (2 s) well before its 15 s of dribbling.
    let mut cut = 0;
    for loris in lorises {
        cut += usize::from(loris.await.unwrap());
    }
    assert_eq!(cut, 500, "slow-loris connections cut off");

    // 10,000 tiny requests over 50 keep-alive connections: each is answered (202,
    // or a refusal), none hangs.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(50)
        .build()
        .unwrap();
    let mut workers = Vec::new();
    for worker in 0..50 {
        let client = client.clone();
        let url = url.clone();
        workers.push(tokio::spawn(async move {
            let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
            for index in 0..200 {
                let status = common::binary_event(
                    &client,
                    &url,
                    &format!("tiny-{worker}-{index}"),
                    "com.example.tiny",
                    "1",
                )
                .send()
                .await
                .expect("every tiny request is answered")
                .status()
                .as_u16();
                *statuses.entry(status).or_default() += 1;
            }
            statuses
        }));
    }
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for worker in workers {
        for (status, count) in worker.await.unwrap() {
            *statuses.entry(status).or_default() += count;
        }
    }
    println!("10,000 tiny requests: {statuses:?}");
    assert_eq!(statuses.values().sum::<usize>(), 10_000, "{statuses:?}");
    assert!(
        statuses
            .keys()
            .all(|status| [202, 429, 503].contains(status)),
        "{statuses:?}"
    );
    assert!(
        statuses.get(&202).copied().unwrap_or_default() > 0,
        "{statuses:?}"
    );

    // Oversized headers: refused at the door (431) or the connection closed.
    for size in [64 * 1024, 1024 * 1024] {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let header = format!(
            "POST /v1/events HTTP/1.1\r\nHost: x\r\nce-specversion: 1.0\r\nce-id: big\r\nce-source: /s\r\nce-type: t\r\nce-big: {}\r\ncontent-length: 2\r\n\r\n{{}}",
            "a".repeat(size)
        );
        let _ = stream.write_all(header.as_bytes()).await;
        let mut answer = Vec::new();
        let _ =
            tokio::time::timeout(Duration::from_secs(15), stream.read_to_end(&mut answer)).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.is_empty()
                || answer.starts_with("HTTP/1.1 431")
                || answer.starts_with("HTTP/1.1 413")
                || answer.starts_with("HTTP/1.1 400"),
            "a {size}-byte header: {}",
            answer.lines().next().unwrap_or_default()
        );
    }
    normal_client_is_served(&url, "after").await;

    // Memory: what the abuse left is bounded (the events accepted are on the bus,
    // not in the process).
    let after = process.rss_kib();
    println!("rss: {baseline} KiB before, {after} KiB after the abuse");
    assert!(
        after < baseline + 64 * 1024,
        "resident memory grew from {baseline} KiB to {after} KiB"
    );
}
