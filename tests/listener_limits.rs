//! The limits every HTTP door has, tried with raw sockets against a real Switchyard
//! and nats-server: stalled headers and bodies are cut off, requests over
//! `max_requests` get 503, a client over its rate gets 429, and shutdown is never
//! held by a stalled client; a normal client is served meanwhile.

mod common;

use std::time::{Duration, Instant};

use common::{NatsServer, Switchyard, WAIT, base_config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HOOK: &str = "\n[[sources.hooks]]\nname = \"plain\"\nevent_type = \"com.example.plain\"\n";

/// Switchyard with a hook and these `limits` on its HTTP source.
async fn start(limits: &str) -> (NatsServer, Switchyard) {
    let nats = NatsServer::start();
    let mut text = base_config(&nats.url(), 0, 0);
    text.push_str(&format!("limits = {{ {limits} }}\n"));
    text.push_str(HOOK);
    text.push_str("\n[[functions]]\ntype = \"log\"\nname = \"print\"\n");
    let switchyard = Switchyard::start(text).await;
    (nats, switchyard)
}

async fn post_hook(switchyard: &Switchyard) -> reqwest::Response {
    reqwest::Client::new()
        .post(switchyard.url("/hooks/plain"))
        .body("{}")
        .send()
        .await
        .unwrap()
}

/// Reads until the server closes the connection (bounded by `WAIT`): what it sent.
async fn read_until_closed(stream: &mut TcpStream) -> String {
    let mut received = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut received))
        .await
        .expect("the server closed the connection")
        .ok();
    String::from_utf8_lossy(&received).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_stalling_its_headers_or_body_is_cut_off_while_others_are_served() {
    let (_nats, switchyard) = start(r#"header_timeout = "300ms", body_timeout = "300ms""#).await;
    // Half a request line, then nothing: closed once header_timeout passes.
    let mut headers = TcpStream::connect(switchyard.http).await.unwrap();
    headers
        .write_all(b"POST /hooks/plain HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    // Whole headers, half the body, then nothing: 408 once body_timeout passes.
    let mut body = TcpStream::connect(switchyard.http).await.unwrap();
    body.write_all(b"POST /hooks/plain HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\n{\"a\"")
        .await
        .unwrap();
    // Meanwhile a normal client is served.
    assert_eq!(post_hook(&switchyard).await.status(), 202);
    let answered = read_until_closed(&mut headers).await;
    assert!(
        answered.is_empty() || answered.starts_with("HTTP/1.1 408"),
        "{answered}"
    );
    let answered = read_until_closed(&mut body).await;
    assert!(answered.starts_with("HTTP/1.1 408"), "{answered}");
    assert!(answered.contains("body_timeout"), "{answered}");
    switchyard.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_max_requests_get_503_at_once() {
    let (_nats, switchyard) = start(r#"max_requests = 1, body_timeout = "60s""#).await;
    // One request in progress (its body not all sent)...
    let mut held = TcpStream::connect(switchyard.http).await.unwrap();
    held.write_all(b"POST /hooks/plain HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{")
        .await
        .unwrap();
    // ...so the next is refused until it ends.
    let deadline = Instant::now() + WAIT;
    let refused = loop {
        let response = post_hook(&switchyard).await;
        if response.status() == 503 {
            break response;
        }
        // The held request may not have reached the handler yet.
        assert_eq!(response.status(), 202);
        assert!(Instant::now() < deadline, "never refused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(refused.headers()["retry-after"], "1");
    held.write_all(b"}").await.unwrap();
    let mut answer = [0u8; 12];
    held.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"HTTP/1.1 202");
    assert_eq!(post_hook(&switchyard).await.status(), 202);
    switchyard.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_its_rate_gets_429_with_retry_after() {
    let (_nats, switchyard) = start("rate_limit = { per_second = 1, burst = 2 }").await;
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..10 {
        let response = post_hook(&switchyard).await;
        if response.status() == 429 {
            retry_after = response
                .headers()
                .get("retry-after")
                .map(|value| value.to_str().unwrap().to_owned());
        }
        statuses.push(response.status().as_u16());
    }
    assert_eq!(&statuses[..2], [202, 202], "{statuses:?}");
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(
        retry_after.is_some_and(|seconds| seconds.parse::<u64>().is_ok()),
        "{statuses:?}"
    );
    switchyard.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_not_held_by_a_stalled_client() {
    let (_nats, switchyard) =
        start(r#"header_timeout = "60s", body_timeout = "60s", shutdown_timeout = "300ms""#).await;
    let mut stalled = TcpStream::connect(switchyard.http).await.unwrap();
    stalled
        .write_all(b"POST /hooks/plain HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{")
        .await
        .unwrap();
    // Stops (bounded by WAIT, far beyond the shutdown timeout) though the client
    // never finishes its request.
    tokio::time::timeout(WAIT, switchyard.stop())
        .await
        .expect("shutdown was held by a stalled client");
}

/// From the moment its port is bound until the bus is set up, an HTTP source answers
/// at once with `503 not ready` and `Retry-After` (a NATS "server" that never speaks
/// keeps Switchyard connecting), rather than leaving requests unanswered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_the_bus_is_ready_requests_get_a_fast_503() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("nats://{}", silent.local_addr().unwrap());
    let mut text = base_config(&url, 0, 0);
    text.push_str(HOOK);
    let config = switchyard::config::parse(std::path::Path::new("t.toml"), &text, &|name| {
        std::env::var(name).ok()
    })
    .unwrap();
    let running = switchyard::start(config).await.unwrap();
    let http = running.sources["http"];
    let response = reqwest::Client::builder()
        .timeout(WAIT)
        .build()
        .unwrap()
        .post(format!("http://{http}/hooks/plain"))
        .body("{}")
        .send()
        .await
        .expect("answered, not left waiting");
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    assert!(response.text().await.unwrap().contains("not ready"));
    running.stop().await.unwrap();
    drop(silent);
}
