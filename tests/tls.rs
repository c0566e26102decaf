//! HTTPS on an HTTP source: served with the configured certificate, which is read
//! again when its files change; files that do not load are a configuration error.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{NatsServer, Switchyard, WAIT, base_config};

const NAME: &str = "switchyard.test";

/// A self-signed certificate for [`NAME`]: its PEM and its key's PEM.
fn certificate() -> (String, String) {
    let certified = rcgen::generate_simple_self_signed(vec![NAME.to_owned()]).unwrap();
    (certified.cert.pem(), certified.key_pair.serialize_pem())
}

/// Writes the pair the way a certificate manager replaces it: new files renamed
/// over the old ones.
fn install(directory: &Path, (cert, key): &(String, String)) {
    for (name, text) in [("key.pem", key), ("cert.pem", cert)] {
        let staged = directory.join(format!("{name}.new"));
        std::fs::write(&staged, text).unwrap();
        std::fs::rename(&staged, directory.join(name)).unwrap();
    }
}

/// A client that trusts only `cert` and reaches [`NAME`] at `address`.
fn client(cert: &str, address: std::net::SocketAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(cert.as_bytes()).unwrap())
        .resolve(NAME, address)
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

async fn post(client: &reqwest::Client, port: u16) -> reqwest::Result<reqwest::StatusCode> {
    client
        .post(format!("https://{NAME}:{port}/hooks/plain"))
        .body("{}")
        .send()
        .await
        .map(|response| response.status())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_source_serves_https_and_picks_up_a_renewed_certificate() {
    let directory = tempfile::tempdir().unwrap();
    let first = certificate();
    install(directory.path(), &first);
    let nats = NatsServer::start();
    let mut text = base_config(&nats.url(), 0, 0);
    text.push_str(&format!(
        "tls = {{ cert_file = \"{dir}/cert.pem\", key_file = \"{dir}/key.pem\" }}\n\n[[sources.hooks]]\nname = \"plain\"\nevent_type = \"com.example.plain\"\n",
        dir = directory.path().display()
    ));
    let switchyard = Switchyard::start(text).await;
    let port = switchyard.http.port();
    let trusts_first = client(&first.0, switchyard.http);
    assert_eq!(post(&trusts_first, port).await.unwrap(), 202);
    // Plain HTTP is not spoken on a TLS listener.
    assert!(
        reqwest::Client::new()
            .post(format!("http://127.0.0.1:{port}/hooks/plain"))
            .body("{}")
            .send()
            .await
            .map(|response| response.status() != 202)
            .unwrap_or(true)
    );

    // Renewed: new connections get the new certificate, without a restart.
    let second = certificate();
    install(directory.path(), &second);
    let trusts_second = client(&second.0, switchyard.http);
    let deadline = Instant::now() + WAIT;
    while post(&trusts_second, port).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the renewed certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(post(&trusts_second, port).await.unwrap(), 202);
    // (A new client: an old one may resume its earlier TLS session, as TLS allows.)
    assert!(
        post(&client(&first.0, switchyard.http), port)
            .await
            .is_err()
    );

    // Broken files: the certificate in use is kept.
    std::fs::write(directory.path().join("cert.pem"), "not a certificate").unwrap();
    let (ok, output) = common::run_cli(
        &common::write_config(
            directory.path(),
            "[[sources]]\ntype = \"http\"\nname = \"web\"\ntls = { cert_file = \"cert.pem\", key_file = \"missing.pem\" }\n",
        ),
        &["validate"],
    );
    assert!(!ok);
    assert!(output.contains("field `tls`"), "{output}");
    assert_eq!(post(&trusts_second, port).await.unwrap(), 202);
    switchyard.stop().await;
}
