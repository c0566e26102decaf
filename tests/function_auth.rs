//! Switchyard calling `http` functions the way a locked-down function wants: over
//! `https://` with a private CA and a client certificate the function requires, with
//! a Standard Webhooks signature the official library verifies, or with a token.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};

use common::{NatsServer, Switchyard, WAIT, base_config, installed, test_functions};

/// What the function saw of one call.
#[derive(Clone, Debug)]
struct Call {
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

/// A function at `https://` (served by rustls, requiring a client certificate
/// issued by `client_ca`) that records its calls and answers 200.
async fn https_function(
    directory: &Path,
    client_ca: Option<&Path>,
) -> (std::net::SocketAddr, Arc<Mutex<Vec<Call>>>) {
    let calls: Arc<Mutex<Vec<Call>>> = Arc::default();
    let recorded = calls.clone();
    let router = axum::Router::new().fallback(
        move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
            let recorded = recorded.clone();
            async move {
                recorded.lock().unwrap().push(Call {
                    headers: headers
                        .iter()
                        .map(|(name, value)| {
                            (
                                name.as_str().to_owned(),
                                value.to_str().unwrap_or_default().to_owned(),
                            )
                        })
                        .collect(),
                    body: body.to_vec(),
                });
                "ok"
            }
        },
    );
    let tls = switchyard_connector_http::listener::TlsFiles {
        cert_file: directory.join("function.pem"),
        key_file: directory.join("function-key.pem"),
        client_ca_file: client_ca.map(Path::to_path_buf),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        switchyard_connector_http::listener::serve(
            listener,
            router,
            &Default::default(),
            Some(&tls),
            std::future::pending(),
        )
        .await
        .unwrap();
    });
    (address, calls)
}

/// A certificate authority, its certificate written to `{name}.pem`.
fn authority(directory: &Path, name: &str) -> rcgen::CertifiedKey {
    let ca = common::authority();
    std::fs::write(directory.join(format!("{name}.pem")), ca.cert.pem()).unwrap();
    ca
}

async fn wait_for_calls(calls: &Mutex<Vec<Call>>, count: usize) -> Vec<Call> {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let seen = calls.lock().unwrap().clone();
        if seen.len() >= count {
            return seen;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} calls, expected {count}",
            seen.len()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Runs tests/functions/python/verify_webhook.py (the Standard Webhooks library).
fn verified(secret: &str, call: &Call) -> Result<(), String> {
    use base64::Engine as _;
    use std::io::Write as _;
    let mut child = std::process::Command::new(installed("SWITCHYARD_WEBHOOK_PYTHON"))
        .arg(test_functions().join("python/verify_webhook.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let request = serde_json::json!({
        "secret": secret,
        "headers": call.headers.iter().cloned().collect::<std::collections::HashMap<_, _>>(),
        "body": base64::engine::general_purpose::STANDARD.encode(&call.body),
    });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(request.to_string().as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    if output.status.success() && said == "verified" {
        Ok(())
    } else {
        Err(said)
    }
}

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

#[tokio::test]
async fn an_https_function_with_a_client_certificate_verifies_signed_calls() {
    let directory = tempfile::tempdir().unwrap();
    let dir = directory.path();
    let server_ca = authority(dir, "server-ca");
    let client_ca = authority(dir, "client-ca");
    common::issue_files(&server_ca, dir, "function", "localhost");
    common::issue_files(&client_ca, dir, "switchyard", "switchyard.test");
    let (address, calls) = https_function(dir, Some(&dir.join("client-ca.pem"))).await;
    let nats = NatsServer::start();
    let mut text = base_config(&nats.url(), 0, 0);
    text.push_str(&format!(
        r#"
[[functions]]
type = "http"
name = "fn"
url = "https://localhost:{port}/events"
tls = {{ ca_file = "{d}/server-ca.pem", cert_file = "{d}/switchyard.pem", key_file = "{d}/switchyard-key.pem" }}
auth = {{ scheme = "hmac", secret = "{SECRET}" }}

[[triggers]]
name = "main"
function = "fn"

[[triggers]]
name = "batched"
function = "fn"
filter = {{ type = {{ exact = "com.example.batched" }} }}
batch = {{ max_events = 2, window = "50ms" }}
"#,
        port = address.port(),
        d = dir.display()
    ));
    let switchyard = Switchyard::start(text).await;
    let status = common::post_event(
        &switchyard.url("/v1/events"),
        "signed-1",
        "com.example.one",
        "{\"n\":1}",
    )
    .await
    .status();
    assert_eq!(status, 202);
    for id in ["b-1", "b-2"] {
        let status = common::post_event(
            &switchyard.url("/v1/events"),
            id,
            "com.example.batched",
            "{}",
        )
        .await
        .status();
        assert_eq!(status, 202);
    }
    // signed-1 to `main`; b-1 and b-2 to `main` one by one and to `batched` together.
    let seen = wait_for_calls(&calls, 4).await;
    for call in &seen {
        verified(SECRET, call).unwrap_or_else(|why| panic!("{why}: {call:?}"));
    }
    // A changed body no longer verifies: the check above is a real one.
    let mut tampered = seen[0].clone();
    tampered.body.push(b' ');
    assert!(verified(SECRET, &tampered).is_err());
    let signed = seen
        .iter()
        .find(|call| {
            call.headers
                .iter()
                .any(|(name, value)| name == "ce-id" && value == "signed-1")
        })
        .expect("signed-1 delivered");
    assert!(
        signed
            .headers
            .iter()
            .any(|(name, value)| name == "webhook-id" && value == "signed-1")
    );
    switchyard.stop().await;
}

#[tokio::test]
async fn without_the_client_certificate_the_function_is_not_reached() {
    let directory = tempfile::tempdir().unwrap();
    let dir = directory.path();
    let server_ca = authority(dir, "server-ca");
    authority(dir, "client-ca");
    common::issue_files(&server_ca, dir, "function", "localhost");
    let (address, calls) = https_function(dir, Some(&dir.join("client-ca.pem"))).await;
    let nats = NatsServer::start();
    let mut text = base_config(&nats.url(), 0, 0);
    text.push_str(&format!(
        r#"
[[functions]]
type = "http"
name = "fn"
url = "https://localhost:{port}/"
tls = {{ ca_file = "{d}/server-ca.pem" }}
auth = {{ scheme = "bearer", token = "function-token" }}

[[triggers]]
name = "main"
function = "fn"
retry = {{ attempts = 1 }}
"#,
        port = address.port(),
        d = dir.display()
    ));
    let switchyard = Switchyard::start(text).await;
    common::post_event(&switchyard.url("/v1/events"), "x-1", "com.example.x", "{}").await;
    let bus = switchyard.bus().await;
    let dead = common::wait_for_dead_letters(&bus, "main", 1, WAIT).await;
    let error = dead[0].dead_letter.last_error.clone();
    assert!(error.contains("CertificateRequired"), "{error}");
    assert!(calls.lock().unwrap().is_empty());
    switchyard.stop().await;
}

#[tokio::test]
async fn a_token_goes_in_the_header_asked_for() {
    let function = common::FunctionServer::start(|_, _| common::Reply::ok()).await;
    let nats = NatsServer::start();
    let mut text = base_config(&nats.url(), 0, 0);
    text.push_str(&format!(
        r#"
[[functions]]
type = "http"
name = "fn"
url = "{}"
auth = {{ scheme = "header", header = "X-Api-Key", token = "key-123" }}

[[triggers]]
name = "main"
function = "fn"
"#,
        function.url
    ));
    let switchyard = Switchyard::start(text).await;
    common::post_event(&switchyard.url("/v1/events"), "k-1", "com.example.k", "{}").await;
    let received = function.wait_for(1, WAIT).await;
    assert_eq!(received[0].header("x-api-key"), Some("key-123"));
    switchyard.stop().await;
}
