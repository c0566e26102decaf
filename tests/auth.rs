//! Authentication at every door that takes events or commands: several bearer
//! tokens on an HTTP source (rotation), tokens read from files, hooks without their
//! own authentication guarded by the source's tokens, mutual TLS, and the admin
//! listener's token in front of everything but the probes, with the dead-letter
//! endpoints (list, show, replay, purge) behind it.

mod common;

use std::time::{Duration, Instant};

use common::{FunctionServer, NatsServer, Reply, Switchyard, WAIT, base_config};

async fn post(
    client: &reqwest::Client,
    url: &str,
    token: Option<&str>,
) -> (reqwest::StatusCode, String) {
    let mut request = client
        .post(url)
        .header("ce-specversion", "1.0")
        .header("ce-id", uuid::Uuid::new_v4().to_string())
        .header("ce-type", "com.example.auth")
        .header("ce-source", "/tests/auth")
        .header("content-type", "application/json")
        .body("{}");
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    (response.status(), response.text().await.unwrap())
}

#[tokio::test]
async fn tokens_rotate_come_from_files_and_guard_hooks_without_their_own() {
    let directory = tempfile::tempdir().unwrap();
    let tokens_file = directory.path().join("tokens");
    // A mounted secret: one token per line, a trailing line break.
    std::fs::write(&tokens_file, "rotated-in\n\nfrom-file\n").unwrap();
    let nats = NatsServer::start();
    let mut text = base_config(&nats.url(), 0, 0);
    text.push_str(&format!(
        r#"bearer_token = "old-token"
bearer_tokens_file = "{tokens}"

[[sources.hooks]]
name = "plain"
event_type = "com.example.plain"

[[sources.hooks]]
name = "own"
event_type = "com.example.own"
bearer_token = "hook-token"
"#,
        tokens = tokens_file.display()
    ));
    let switchyard = Switchyard::start(text).await;
    let client = reqwest::Client::new();
    let events = switchyard.url("/v1/events");
    for token in ["old-token", "rotated-in", "from-file"] {
        let (status, body) = post(&client, &events, Some(token)).await;
        assert_eq!(status, 202, "{token}: {body}");
    }
    let (status, body) = post(&client, &events, Some("hook-token")).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("bearer token is not valid"), "{body}");
    let (status, body) = post(&client, &events, None).await;
    assert_eq!(status, 401, "{body}");

    // A hook without authentication of its own takes the source's tokens.
    let plain = switchyard.url("/hooks/plain");
    assert_eq!(post(&client, &plain, None).await.0, 401);
    assert_eq!(post(&client, &plain, Some("from-file")).await.0, 202);
    // A hook with its own token takes only its own.
    let own = switchyard.url("/hooks/own");
    assert_eq!(post(&client, &own, Some("old-token")).await.0, 403);
    assert_eq!(post(&client, &own, Some("hook-token")).await.0, 202);
    assert_eq!(
        switchyard.metric("switchyard_events_published_total").await,
        5.0
    );
    switchyard.stop().await;
}

/// A certificate authority and a certificate it issued, as PEM.
struct Issued {
    ca: String,
    cert: String,
    key: String,
}

fn issued(ca: &rcgen::CertifiedKey, name: &str) -> Issued {
    let (cert, key) = common::issue(ca, name);
    Issued {
        ca: ca.cert.pem(),
        cert,
        key,
    }
}

#[tokio::test]
async fn a_listener_with_client_certificates_lets_only_their_holders_in() {
    const NAME: &str = "switchyard.test";
    let directory = tempfile::tempdir().unwrap();
    let server_ca = common::authority();
    let client_ca = common::authority();
    let server = issued(&server_ca, NAME);
    let trusted = issued(&client_ca, "client.example");
    let stranger = issued(&common::authority(), "client.example");
    for (name, text) in [
        ("cert.pem", &server.cert),
        ("key.pem", &server.key),
        ("clients.pem", &trusted.ca),
    ] {
        std::fs::write(directory.path().join(name), text).unwrap();
    }
    let nats = NatsServer::start();
    // (Off loopback, such a listener needs no token: see config_errors.)
    let mut text = base_config(&nats.url(), 0, 0);
    text.push_str(&format!(
        "tls = {{ cert_file = \"{dir}/cert.pem\", key_file = \"{dir}/key.pem\", client_ca_file = \"{dir}/clients.pem\" }}\n",
        dir = directory.path().display()
    ));
    let switchyard = Switchyard::start(text).await;
    let address = switchyard.http;
    let client = |identity: Option<&Issued>| {
        let mut builder = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(server.ca.as_bytes()).unwrap())
            .resolve(NAME, address);
        if let Some(issued) = identity {
            builder = builder.identity(
                reqwest::Identity::from_pem(format!("{}{}", issued.cert, issued.key).as_bytes())
                    .unwrap(),
            );
        }
        builder.build().unwrap()
    };
    let url = format!("https://{NAME}:{}/v1/events", address.port());
    let (status, body) = post(&client(Some(&trusted)), &url, None).await;
    assert_eq!(status, 202, "{body}");
    for (who, identity) in [("no certificate", None), ("another CA's", Some(&stranger))] {
        let refused = client(identity)
            .post(&url)
            .header("ce-specversion", "1.0")
            .header("ce-id", "x")
            .header("ce-type", "t")
            .header("ce-source", "/s")
            .body("{}")
            .send()
            .await;
        assert!(refused.is_err(), "{who}: {refused:?}");
    }
    assert_eq!(
        switchyard.metric("switchyard_events_published_total").await,
        1.0
    );
    switchyard.stop().await;
}

#[tokio::test]
async fn the_admin_token_guards_all_but_the_probes_and_serves_dead_letters() {
    let nats = NatsServer::start();
    let function = FunctionServer::start(|_, _| Reply::status(422)).await;
    let mut text = base_config(&nats.url(), 0, 0).replace(
        "[admin]\n",
        "[admin]\nbearer_tokens = [\"admin-old\", \"admin-new\"]\n",
    );
    text.push_str(&format!(
        "\n[[functions]]\ntype = \"http\"\nname = \"fn\"\nurl = \"{}\"\n\n[[triggers]]\nname = \"main\"\nfunction = \"fn\"\n",
        function.url
    ));
    let switchyard = Switchyard::start(text).await;
    let client = reqwest::Client::new();
    let get = |path: &str, token: Option<&str>| {
        let mut request = client.get(switchyard.admin_url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    assert_eq!(get("/healthz", None).await.unwrap().status(), 200);
    assert_eq!(get("/readyz", None).await.unwrap().status(), 200);
    for path in ["/metrics", "/v1/triggers", "/v1/dead-letters/main"] {
        let refused = get(path, None).await.unwrap();
        assert_eq!(refused.status(), 401, "{path}");
        assert_eq!(refused.headers()["www-authenticate"], "Bearer");
        assert_eq!(get(path, Some("wrong")).await.unwrap().status(), 403);
    }
    assert_eq!(
        get("/metrics", Some("admin-new")).await.unwrap().status(),
        200
    );

    let http = reqwest::Client::new();
    for _ in 0..3 {
        assert_eq!(
            post(&http, &switchyard.url("/v1/events"), None).await.0,
            202
        );
    }
    let json = |response: reqwest::Response| async move {
        let status = response.status();
        let body: serde_json::Value =
            serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        (status, body)
    };
    let deadline = Instant::now() + WAIT;
    let listed = loop {
        let (status, body) = json(
            get("/v1/dead-letters/main", Some("admin-old"))
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        if body["dead_letters"].as_array().unwrap().len() == 3 {
            break body;
        }
        assert!(Instant::now() < deadline, "dead letters: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(listed["next_after"], serde_json::Value::Null);
    let sequences: Vec<u64> = listed["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry["sequence"].as_u64().unwrap())
        .collect();
    assert!(
        listed["dead_letters"]
            .as_array()
            .unwrap()
            .iter()
            .all(|entry| entry["reason"] == "rejected" && entry["last_status"] == 422)
    );

    // Pages.
    let (_, page) = json(
        get("/v1/dead-letters/main?limit=2", Some("admin-old"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(page["dead_letters"].as_array().unwrap().len(), 2);
    assert_eq!(page["next_after"], sequences[1]);
    let (_, rest) = json(
        get(
            &format!("/v1/dead-letters/main?limit=2&after={}", sequences[1]),
            Some("admin-old"),
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(rest["dead_letters"][0]["sequence"], sequences[2]);
    assert_eq!(rest["next_after"], serde_json::Value::Null);

    // One dead letter; another trigger's sequence is not found.
    let (status, shown) = json(
        get(
            &format!("/v1/dead-letters/main/{}", sequences[0]),
            Some("admin-old"),
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(shown["event"]["type"], "com.example.auth");
    let (status, _) = json(
        get(
            &format!("/v1/dead-letters/other/{}", sequences[0]),
            Some("admin-old"),
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(status, 404);

    let command = |path: &str, body: &str| {
        client
            .post(switchyard.admin_url(path))
            .bearer_auth("admin-new")
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
    };
    // Nothing selected, an unknown trigger: refused with a reason.
    let (status, body) = json(command("/v1/dead-letters/main/replay", "{}").await.unwrap()).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = json(
        command("/v1/dead-letters/gone/replay", r#"{"all": true}"#)
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 409, "{body}");

    // Replay one, now that the function accepts it.
    function.set_behaviour(|_, _| Reply::ok());
    let first_id = shown["event"]["id"].as_str().unwrap().to_owned();
    let (status, body) = json(
        command(
            "/v1/dead-letters/main/replay",
            &format!(r#"{{"sequences": [{}]}}"#, sequences[0]),
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!((status.as_u16(), &body["replayed"]), (200, &1.into()));
    let received = function.wait_for(4, WAIT).await;
    assert_eq!(received.last().unwrap().id(), first_id);

    // Purge the rest.
    let (status, body) = json(
        command("/v1/dead-letters/main/purge", r#"{"all": true}"#)
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status.as_u16(), &body["purged"]),
        (200, &3.into()),
        "{body}"
    );
    let (_, after) = json(
        get("/v1/dead-letters/main", Some("admin-old"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(after["dead_letters"], serde_json::json!([]));
    switchyard.stop().await;
}

#[tokio::test]
async fn without_an_admin_token_the_dead_letter_endpoints_are_off() {
    let nats = NatsServer::start();
    let switchyard = Switchyard::start(base_config(&nats.url(), 0, 0)).await;
    let response = reqwest::get(switchyard.admin_url("/v1/dead-letters/main"))
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    assert!(
        response
            .text()
            .await
            .unwrap()
            .contains("only with admin.bearer_token set")
    );
    // The rest stays open on loopback, as before.
    assert_eq!(
        reqwest::get(switchyard.admin_url("/metrics"))
            .await
            .unwrap()
            .status(),
        200
    );
    switchyard.stop().await;
}

/// GitHub's signature covers the body only, and `X-GitHub-Delivery` is not signed:
/// a captured request replayed with a fresh delivery id is still dropped within the
/// dedup horizon, because the signed body is remembered too.
#[tokio::test]
async fn a_replayed_signed_body_is_dropped_whatever_its_delivery_id() {
    use hmac::Mac as _;
    let nats = NatsServer::start();
    let function = FunctionServer::start(|_, _| Reply::ok()).await;
    let mut text = base_config(&nats.url(), 0, 0);
    text.push_str(&format!(
        r#"
[[sources.hooks]]
name = "github"
event_type = "com.github.event"
id_header = "X-GitHub-Delivery"
signature = {{ scheme = "github", secret = "gh-secret" }}

[[sources.hooks]]
name = "stamped"
event_type = "com.example.stamped"
id_header = "Idempotency-Key"
signature = {{ scheme = "hmac", secret = "k2", header = "X-Signature", prefix = "v1=", timestamp_header = "X-Timestamp", tolerance = "5m" }}

[[functions]]
type = "http"
name = "fn"
url = "{}"

[[triggers]]
name = "main"
function = "fn"
"#,
        function.url
    ));
    let switchyard = Switchyard::start(text).await;
    let send = |body: &'static str, delivery: &'static str| {
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"gh-secret").unwrap();
        mac.update(body.as_bytes());
        let signature = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        let url = switchyard.url("/hooks/github");
        async move {
            let response = reqwest::Client::new()
                .post(url)
                .header("x-github-delivery", delivery)
                .header("x-hub-signature-256", signature)
                .body(body)
                .send()
                .await
                .unwrap();
            let status = response.status();
            (status, response.text().await.unwrap())
        }
    };
    let (status, body) = send(r#"{"action":"opened","number":1}"#, "delivery-1").await;
    assert_eq!(status, 202, "{body}");
    assert!(body.contains("\"duplicate\":false"), "{body}");
    // The captured request, replayed with a new delivery id: dropped.
    let (status, body) = send(r#"{"action":"opened","number":1}"#, "forged-2").await;
    assert_eq!(status, 202, "{body}");
    assert!(body.contains("\"duplicate\":true"), "{body}");
    // Another delivery with its own body goes through.
    let (status, body) = send(r#"{"action":"closed","number":1}"#, "delivery-3").await;
    assert!(
        status == 202 && body.contains("\"duplicate\":false"),
        "{body}"
    );
    // A timestamped HMAC: within the tolerance, the same signed timestamp and body
    // with a fresh id is a replay; the same body signed at another time is not.
    let stamped = |timestamp: i64, key: &'static str| {
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"k2").unwrap();
        mac.update(format!("{timestamp}.{{\"n\":1}}").as_bytes());
        let signature = format!("v1={}", hex::encode(mac.finalize().into_bytes()));
        let url = switchyard.url("/hooks/stamped");
        async move {
            let response = reqwest::Client::new()
                .post(url)
                .header("idempotency-key", key)
                .header("x-timestamp", timestamp.to_string())
                .header("x-signature", signature)
                .body("{\"n\":1}")
                .send()
                .await
                .unwrap();
            let status = response.status();
            (status, response.text().await.unwrap())
        }
    };
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let (status, body) = stamped(now, "s-1").await;
    assert!(
        status == 202 && body.contains("\"duplicate\":false"),
        "{body}"
    );
    let (status, body) = stamped(now, "s-forged").await;
    assert!(
        status == 202 && body.contains("\"duplicate\":true"),
        "{body}"
    );
    let (status, body) = stamped(now - 1, "s-2").await;
    assert!(
        status == 202 && body.contains("\"duplicate\":false"),
        "{body}"
    );

    let received = function.wait_for(4, WAIT).await;
    let ids: Vec<&str> = received.iter().map(|call| call.id()).collect();
    assert_eq!(ids.len(), 4, "{ids:?}");
    for id in ["delivery-1", "delivery-3", "s-1", "s-2"] {
        assert!(ids.contains(&id), "{ids:?}");
    }
    switchyard.stop().await;
}
