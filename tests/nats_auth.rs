//! Switchyard against nats-servers that enforce who may do what: an account whose
//! users hold only the permissions docs/CONFIG.md lists (user and password, NKey),
//! a token, TLS with a client certificate checked against a configured server name;
//! a user without them is refused; no secret reaches the log.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{FunctionServer, NatsServer, Reply, Switchyard, WAIT, random_name};

/// The permissions docs/CONFIG.md ("NATS permissions") gives Switchyard's user, for
/// subject prefix `prefix`.
fn permissions(prefix: &str) -> String {
    format!(
        r#"{{
        publish: {{ allow: ["{prefix}.>", "$JS.API.>", "$JS.ACK.>", "$KV.>"] }}
        subscribe: {{ allow: ["_INBOX.>"] }}
      }}"#
    )
}

/// A configuration for `prefix` on `url` with `nats_fields` added to `[nats]`, an
/// HTTP source with a deduplicating hook, and a trigger to `function` that dead-
/// letters what it answers 422 to.
fn config(url: &str, prefix: &str, nats_fields: &str, function: &str) -> String {
    let mut text = common::base_config_prefixed(url, prefix, 0, 0).replacen(
        "\n[admin]",
        &format!("{nats_fields}\n\n[admin]"),
        1,
    );
    text.push_str(&format!(
        r#"
[[sources.hooks]]
name = "plain"
event_type = "com.example.plain"
id_header = "Idempotency-Key"

[[functions]]
type = "http"
name = "fn"
url = "{function}"

[[triggers]]
name = "main"
function = "fn"
"#
    ));
    text
}

fn nats_with(directory: &Path, text: &str) -> NatsServer {
    let path = directory.join("nats.conf");
    std::fs::write(&path, text).unwrap();
    NatsServer::start_with(&["--config", path.to_str().unwrap()])
}

async fn hook(switchyard: &Switchyard, key: &str, body: &'static str) -> reqwest::StatusCode {
    reqwest::Client::new()
        .post(switchyard.url("/hooks/plain"))
        .header("idempotency-key", key)
        .body(body)
        .send()
        .await
        .unwrap()
        .status()
}

/// Events in, through the function, a dead letter out, a redelivery dropped: the
/// streams, consumers and KV buckets all work under the permissions given.
async fn exercise(switchyard: &Switchyard, function: &FunctionServer) {
    assert_eq!(hook(switchyard, "k-1", "ok").await, 202);
    assert_eq!(hook(switchyard, "k-2", "poison").await, 202);
    assert_eq!(hook(switchyard, "k-1", "ok").await, 202);
    let received = function.wait_for(2, WAIT).await;
    assert_eq!(received.len(), 2);
    let bus = switchyard.bus().await;
    let dead = common::wait_for_dead_letters(&bus, "main", 1, WAIT).await;
    assert_eq!(dead[0].dead_letter.event.id, "k-2");
}

fn function_behaviour(received: &common::Received, _: usize) -> Reply {
    if &received.body[..] == b"poison" {
        Reply::status(422)
    } else {
        Reply::ok()
    }
}

#[tokio::test]
async fn users_with_the_documented_permissions_work_and_others_are_refused() {
    let directory = tempfile::tempdir().unwrap();
    let prefix = random_name("p");
    let seed = nkeys::KeyPair::new_user();
    let nats = nats_with(
        directory.path(),
        &format!(
            r#"
accounts {{
  SWITCHYARD {{
    jetstream: enabled
    users: [
      {{ user: switchyard, password: "pass-w0rd-secret", permissions: {perms} }}
      {{ nkey: {public}, permissions: {perms} }}
      {{ user: producer, password: "producer-pass", permissions: {{ publish: {{ allow: ["$JS.API.>"] }}, subscribe: {{ allow: ["_INBOX.>"] }} }} }}
    ]
  }}
}}
"#,
            perms = permissions(&prefix),
            public = seed.public_key(),
        ),
    );
    let function = FunctionServer::start(function_behaviour).await;

    // User and password, the password from a file.
    std::fs::write(directory.path().join("password"), "pass-w0rd-secret\n").unwrap();
    let text = config(
        &nats.url(),
        &prefix,
        &format!(
            "user = \"switchyard\"\npassword_file = \"{}\"",
            directory.path().join("password").display()
        ),
        &function.url,
    );
    let switchyard = Switchyard::start(text).await;
    exercise(&switchyard, &function).await;
    switchyard.stop().await;

    // NKey, the seed from the environment.
    let function = FunctionServer::start(function_behaviour).await;
    // SAFETY: no other thread of this test reads the environment meanwhile.
    unsafe { std::env::set_var("SWITCHYARD_TEST_NKEY_SEED", seed.seed().unwrap()) };
    let prefix_nkey = prefix.clone();
    let text = config(
        &nats.url(),
        &prefix_nkey,
        "nkey_seed = \"${SWITCHYARD_TEST_NKEY_SEED}\"",
        &function.url,
    );
    let switchyard = Switchyard::start(text).await;
    // A fresh hook key: the previous run's dedup entries are in the same buckets.
    assert_eq!(hook(&switchyard, "nkey-1", "ok").await, 202);
    let received = function.wait_for(1, WAIT).await;
    assert_eq!(received[0].id(), "nkey-1");
    switchyard.stop().await;

    // A user without publish rights on the prefix cannot store events: the server
    // enforces the permissions (so the runs above held no more than those given).
    let text = config(
        &nats.url(),
        &prefix,
        "user = \"producer\"\npassword = \"producer-pass\"",
        &function.url,
    );
    let parsed =
        switchyard::config::parse(Path::new("t.toml"), &text, &|name| std::env::var(name).ok())
            .unwrap();
    let bus = switchyard_bus::Bus::connect(&parsed.nats).await.unwrap();
    use switchyard_event::EventSink as _;
    let published = bus
        .publish_all(vec![switchyard_event::Event::new(
            "refused-1",
            "/tests",
            "com.example.plain",
        )])
        .await;
    assert!(published.is_err(), "{published:?}");
}

#[tokio::test]
async fn a_token_from_a_file_authenticates() {
    let directory = tempfile::tempdir().unwrap();
    let nats = nats_with(
        directory.path(),
        "authorization { token: \"t0ken-secret-value\" }\n",
    );
    std::fs::write(directory.path().join("token"), "t0ken-secret-value\n").unwrap();
    let function = FunctionServer::start(function_behaviour).await;
    let prefix = random_name("p");
    let text = config(
        &nats.url(),
        &prefix,
        &format!(
            "token_file = \"{}\"",
            directory.path().join("token").display()
        ),
        &function.url,
    );
    let switchyard = Switchyard::start(text).await;
    exercise(&switchyard, &function).await;
    switchyard.stop().await;
}

#[tokio::test]
async fn tls_with_a_client_certificate_and_a_server_name() {
    let directory = tempfile::tempdir().unwrap();
    let dir = directory.path();
    let ca = common::authority();
    std::fs::write(dir.join("ca.pem"), ca.cert.pem()).unwrap();
    common::issue_files(&ca, dir, "server", "nats.test");
    common::issue_files(&ca, dir, "client", "switchyard.test");
    let nats = nats_with(
        dir,
        &format!(
            "tls {{\n  cert_file: \"{d}/server.pem\"\n  key_file: \"{d}/server-key.pem\"\n  ca_file: \"{d}/ca.pem\"\n  verify: true\n}}\n",
            d = dir.display()
        ),
    );
    let function = FunctionServer::start(function_behaviour).await;
    let prefix = random_name("p");
    // Reached by IP address, the certificate names nats.test.
    let url = format!("tls://127.0.0.1:{}", nats.port);
    let tls = format!(
        "tls = {{ ca_file = \"{d}/ca.pem\", cert_file = \"{d}/client.pem\", key_file = \"{d}/client-key.pem\", server_name = \"nats.test\" }}",
        d = dir.display()
    );
    let switchyard = Switchyard::start(config(&url, &prefix, &tls, &function.url)).await;
    exercise(&switchyard, &function).await;
    switchyard.stop().await;

    // Without the server name the certificate does not match 127.0.0.1; without a
    // client certificate the server refuses the client.
    for fields in [
        format!(
            "tls = {{ ca_file = \"{d}/ca.pem\", cert_file = \"{d}/client.pem\", key_file = \"{d}/client-key.pem\" }}",
            d = dir.display()
        ),
        format!(
            "tls = {{ ca_file = \"{d}/ca.pem\", server_name = \"nats.test\" }}",
            d = dir.display()
        ),
    ] {
        let parsed = switchyard::config::parse(
            Path::new("t.toml"),
            &config(&url, &prefix, &fields, &function.url),
            &|name| std::env::var(name).ok(),
        )
        .unwrap();
        // The bus's first connection reports its failure (Switchyard itself keeps
        // trying, not ready meanwhile).
        let connected = switchyard_bus::Bus::connect(&parsed.nats).await;
        assert!(connected.is_err(), "{fields}");
        let error = connected.err().unwrap().to_string();
        assert!(!error.contains("-key.pem\""), "{error}");
    }
}

/// A `switchyard run` process whose log (stderr) is kept in a file, with `RUST_LOG`
/// set or removed; killed on drop.
struct LoggedProcess {
    child: std::process::Child,
    log: std::path::PathBuf,
    ready: std::path::PathBuf,
    _directory: tempfile::TempDir,
}

impl LoggedProcess {
    fn start(config_text: &str, rust_log: Option<&str>) -> LoggedProcess {
        let directory = tempfile::tempdir().unwrap();
        let config_path = directory.path().join("switchyard.toml");
        std::fs::write(&config_path, config_text).unwrap();
        let log = directory.path().join("log");
        let ready = directory.path().join("ready.json");
        // One open file for both, so neither writes over the other.
        let file = std::fs::File::create(&log).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_switchyard"));
        command
            .args(["run", "--config"])
            .arg(&config_path)
            .arg("--ready-file")
            .arg(&ready)
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        match rust_log {
            Some(filter) => command.env("RUST_LOG", filter),
            None => command.env_remove("RUST_LOG"),
        };
        LoggedProcess {
            child: command.spawn().unwrap(),
            log,
            ready,
            _directory: directory,
        }
    }

    /// What it wrote to stdout and stderr so far.
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }

    /// Its ready file, once written.
    async fn wait_ready(&mut self) -> serde_json::Value {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(text) = std::fs::read_to_string(&self.ready)
                && let Ok(report) = serde_json::from_str(&text)
            {
                return report;
            }
            assert!(
                self.child.try_wait().unwrap().is_none(),
                "switchyard exited:\n{}",
                self.log()
            );
            assert!(
                Instant::now() < deadline,
                "switchyard did not become ready:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops it (SIGTERM) and returns its whole log.
    async fn stop(mut self) -> String {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let deadline = Instant::now() + WAIT;
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "switchyard did not stop");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.log()
    }
}

impl Drop for LoggedProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A nats-server whose account SWITCHYARD (JetStream, the documented permissions
/// for `prefix`) has user `switchyard` with `password`.
fn nats_with_user(directory: &Path, prefix: &str, password: &str) -> NatsServer {
    nats_with(
        directory,
        &format!(
            "accounts {{ SWITCHYARD {{ jetstream: enabled, users: [ {{ user: switchyard, password: \"{password}\", permissions: {} }} ] }} }}\n",
            permissions(prefix)
        ),
    )
}

/// `text` logging at `level`.
fn at_level(text: &str, level: &str) -> String {
    text.replace(
        "level = \"${SWITCHYARD_TEST_LOG:-error}\"",
        &format!("level = \"{level}\""),
    )
}

/// Secrets given in the configuration do not reach the log, even at debug level.
#[tokio::test]
async fn secrets_never_reach_the_log() {
    let directory = tempfile::tempdir().unwrap();
    let prefix = random_name("p");
    let nats = nats_with_user(directory.path(), &prefix, "pass-w0rd-secret");
    let function = FunctionServer::start(function_behaviour).await;
    let text = at_level(
        &config(
            &nats.url(),
            &prefix,
            "user = \"switchyard\"\npassword = \"pass-w0rd-secret\"",
            &function.url,
        ),
        "debug",
    )
    .replace(
        "[[sources.hooks]]",
        "bearer_token = \"source-token-secret\"\n\n[[sources.hooks]]",
    );
    let mut process = LoggedProcess::start(&text, None);
    let report = process.wait_ready().await;
    let http = report["sources"]["http"].as_str().unwrap();
    let client = reqwest::Client::new();
    for token in ["source-token-secret", "wrong-token"] {
        client
            .post(format!("http://{http}/hooks/plain"))
            .bearer_auth(token)
            .header("idempotency-key", format!("log-{}", token.len()))
            .body("ok")
            .send()
            .await
            .unwrap();
    }
    function.wait_for(1, WAIT).await;
    let log = process.stop().await;
    assert!(
        log.contains("connected to nats"),
        "the log was written: {log}"
    );
    for secret in ["pass-w0rd-secret", "source-token-secret"] {
        assert!(!log.contains(secret), "`{secret}` in the log:\n{log}");
    }
}

/// Credentials in `nats.url` (`nats://user:password@host`) reach the server but not
/// the log, at debug level from the configuration and at trace level from
/// `RUST_LOG` (which overrides it), libraries' own lines included.
#[tokio::test]
async fn credentials_in_the_url_never_reach_the_log() {
    let directory = tempfile::tempdir().unwrap();
    let prefix = random_name("p");
    // A `/` the URL must percent-encode: neither spelling may be printed.
    let password = "url-pass/w0rd-secret";
    let nats = nats_with_user(directory.path(), &prefix, password);
    let url = format!(
        "nats://switchyard:{}@127.0.0.1:{}",
        password.replace('/', "%2F"),
        nats.port
    );
    for (level, rust_log) in [("debug", None), ("info", Some("trace"))] {
        let function = FunctionServer::start(function_behaviour).await;
        let text = at_level(&config(&url, &prefix, "", &function.url), level);
        let mut process = LoggedProcess::start(&text, rust_log);
        let report = process.wait_ready().await;
        let http = report["sources"]["http"].as_str().unwrap();
        let key = format!("url-{level}");
        let accepted = reqwest::Client::new()
            .post(format!("http://{http}/hooks/plain"))
            .header("idempotency-key", &key)
            .body("ok")
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(accepted, 202);
        assert_eq!(function.wait_for(1, WAIT).await[0].id(), key);
        let log = process.stop().await;
        // The client's own debug lines were written (they name the server).
        assert!(
            log.contains("connected to nats") && log.contains("attempting connection"),
            "{level}, RUST_LOG={rust_log:?}: the log was written: {log}"
        );
        for secret in ["url-pass", "w0rd-secret"] {
            assert!(
                !log.contains(secret),
                "{level}, RUST_LOG={rust_log:?}: `{secret}` in the log:\n{log}"
            );
        }
    }
}

/// A wrong password: `/readyz` and the log say the server refused the credentials
/// and what it said, not that NATS is unreachable, and print no password.
#[tokio::test]
async fn refused_credentials_are_reported_as_such() {
    let directory = tempfile::tempdir().unwrap();
    let prefix = random_name("p");
    let nats = nats_with_user(directory.path(), &prefix, "right-pass-secret");
    let function = FunctionServer::start(function_behaviour).await;
    let text = at_level(
        &config(
            &nats.url(),
            &prefix,
            "user = \"switchyard\"\npassword = \"wrong-pass-secret\"",
            &function.url,
        ),
        "info",
    )
    .replace("[log]\n", "[log]\nformat = \"json\"\n");
    let process = LoggedProcess::start(&text, None);
    // Never ready, so no ready file: the admin address is in the log.
    let deadline = Instant::now() + WAIT;
    let admin = loop {
        let found = process.log().lines().find_map(|line| {
            let line: serde_json::Value = serde_json::from_str(line).ok()?;
            Some(line.get("admin")?.as_str()?.to_owned())
        });
        if let Some(admin) = found {
            break admin;
        }
        assert!(
            Instant::now() < deadline,
            "no admin address in the log:\n{}",
            process.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let client = reqwest::Client::new();
    let (status, body) = loop {
        let response = client
            .get(format!("http://{admin}/readyz"))
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body = response.text().await.unwrap();
        if body.contains("refused") || Instant::now() > deadline {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        body,
        "not ready: nats refused the credentials: authorization violation\n"
    );
    let log = loop {
        let log = process.log();
        if log.contains("nats refused the credentials") || Instant::now() > deadline {
            break log;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let line = log
        .lines()
        .find(|line| line.contains("nats refused the credentials"))
        .unwrap_or_else(|| panic!("no line saying the credentials were refused:\n{log}"));
    assert!(line.contains("authorization violation"), "{line}");
    assert!(!log.contains("nats unreachable"), "{log}");
    let log = process.stop().await;
    for secret in ["wrong-pass-secret", "right-pass-secret"] {
        assert!(!log.contains(secret), "`{secret}` in the log:\n{log}");
        assert!(!body.contains(secret), "{body}");
    }
}

/// A NATS JWT (`header.claims.signature`, base64url without padding, Ed25519 by the
/// issuer's NKey), as `nsc` writes them.
fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    use base64::Engine as _;
    let encode = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let header = encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let claims = serde_json::json!({
        "jti": uuid::Uuid::new_v4().simple().to_string().to_uppercase(),
        "iat": time::OffsetDateTime::now_utc().unix_timestamp(),
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let body = format!("{header}.{}", encode(claims.to_string().as_bytes()));
    let signature = issuer.sign(body.as_bytes()).unwrap();
    format!("{body}.{}", encode(&signature))
}

/// Decentralised authentication: an operator, an account with JetStream and a user
/// whose JWT carries the documented permissions, given to Switchyard as a `.creds`
/// file.
#[tokio::test]
async fn a_creds_file_authenticates_against_an_operator_mode_server() {
    let directory = tempfile::tempdir().unwrap();
    let prefix = random_name("p");
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    let operator_jwt = jwt(
        &operator,
        &operator.public_key(),
        "OP",
        serde_json::json!({"type": "operator", "version": 2}),
    );
    let unlimited = serde_json::json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1,
        "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
    });
    let account_jwt = jwt(
        &operator,
        &account.public_key(),
        "SWITCHYARD",
        serde_json::json!({"limits": unlimited, "type": "account", "version": 2}),
    );
    let user_jwt = jwt(
        &account,
        &user.public_key(),
        "switchyard",
        serde_json::json!({
            "pub": {"allow": [format!("{prefix}.>"), "$JS.API.>", "$JS.ACK.>", "$KV.>"]},
            "sub": {"allow": ["_INBOX.>"]},
            "subs": -1, "data": -1, "payload": -1,
            "type": "user", "version": 2,
        }),
    );
    // JetStream in operator mode needs a system account.
    let system = nkeys::KeyPair::new_account();
    let system_jwt = jwt(
        &operator,
        &system.public_key(),
        "SYS",
        serde_json::json!({"type": "account", "version": 2}),
    );
    let server_config = format!(
        "operator: {operator_jwt}\nsystem_account: {sys}\nresolver: MEMORY\nresolver_preload: {{\n  {sys}: {system_jwt}\n  {}: {account_jwt}\n}}\n",
        account.public_key(),
        sys = system.public_key(),
    );
    let nats = nats_with(directory.path(), &server_config);
    let creds = directory.path().join("switchyard.creds");
    std::fs::write(
        &creds,
        format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n-----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            user.seed().unwrap()
        ),
    )
    .unwrap();
    let function = FunctionServer::start(function_behaviour).await;
    let text = config(
        &nats.url(),
        &prefix,
        &format!("creds_file = \"{}\"", creds.display()),
        &function.url,
    );
    let switchyard = Switchyard::start(text).await;
    exercise(&switchyard, &function).await;
    switchyard.stop().await;
}
