//! How Switchyard serves each of its HTTP doors (HTTP sources with their webhooks
//! and function URLs, the Lambda Invoke API, the admin listener): hyper's HTTP/1
//! server with a timer, so a client that is slow or stalls is cut off, and tower's
//! layers for the rest.
//!
//! - `header_timeout`: from the moment a connection waits for a request (it opened,
//!   or its previous answer was sent) until the request's headers are in; past it the
//!   connection is closed. This bounds slow-header clients and idle keep-alive
//!   connections alike (hyper's header read timeout).
//! - `body_timeout`: reading a request's body (tower-http's request body timeout).
//! - `max_connections`: connections open at once; further ones wait in the kernel's
//!   accept queue until one closes.
//! - `max_requests`: requests being handled at once; more are answered `503` with
//!   `Retry-After` at once (tower's load shedding over a concurrency limit).
//! - `rate_limit`: per client address, requests per second with a burst (governor,
//!   through tower_governor); more are answered `429` with `Retry-After`.
//! - At shutdown the listener closes, connections finish what they are answering
//!   within `shutdown_timeout`, and are then abandoned: a stalled client never holds
//!   shutdown longer.
//! - `tls`: HTTPS with rustls (TLS 1.2 and 1.3, the ring provider) from a PEM
//!   certificate chain and key, read again when either file changes (checked every
//!   few seconds; a pair that does not load is logged and the one in use is kept).
//!   The handshake must complete within `header_timeout`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use tokio::sync::Semaphore;
use tower::ServiceBuilder;

/// The limits of one HTTP listener, as configured.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenerLimits {
    /// Longest wait for a request's headers (and longest idle keep-alive).
    #[serde(default = "default_header_timeout", with = "humantime_serde")]
    pub header_timeout: Duration,
    /// Longest read of a request's body.
    #[serde(default = "default_body_timeout", with = "humantime_serde")]
    pub body_timeout: Duration,
    /// Connections open at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Requests handled at once; more get `503`.
    #[serde(default = "default_max_requests")]
    pub max_requests: usize,
    /// Per client address: sustained requests per second and burst; none by default.
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    /// How long connections may take to finish at shutdown.
    #[serde(default = "default_shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

/// A per-client rate limit: `per_second` sustained, `burst` at once.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub per_second: u32,
    #[serde(default = "default_burst")]
    pub burst: u32,
}

fn default_header_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_body_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_max_connections() -> usize {
    1024
}
fn default_max_requests() -> usize {
    512
}
fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_burst() -> u32 {
    50
}

impl Default for ListenerLimits {
    fn default() -> Self {
        ListenerLimits {
            header_timeout: default_header_timeout(),
            body_timeout: default_body_timeout(),
            max_connections: default_max_connections(),
            max_requests: default_max_requests(),
            rate_limit: None,
            shutdown_timeout: default_shutdown_timeout(),
        }
    }
}

impl ListenerLimits {
    /// What is wrong with these limits, as `(field, message)`.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        for (field, value) in [
            ("header_timeout", self.header_timeout),
            ("body_timeout", self.body_timeout),
            ("shutdown_timeout", self.shutdown_timeout),
        ] {
            if value.is_zero() {
                problems.push((field, "must be longer than 0s".to_owned()));
            }
        }
        for (field, value) in [
            ("max_connections", self.max_connections),
            ("max_requests", self.max_requests),
        ] {
            if value == 0 {
                problems.push((field, "must be at least 1".to_owned()));
            }
        }
        if let Some(rate) = self.rate_limit
            && (rate.per_second == 0 || rate.burst == 0)
        {
            problems.push((
                "rate_limit",
                "`per_second` and `burst` must be at least 1".to_owned(),
            ));
        }
        problems
    }
}

/// HTTPS for a listener: PEM files, relative to the configuration file.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert_file: std::path::PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: std::path::PathBuf,
    /// Mutual TLS: clients must present a certificate issued by one of these CAs
    /// (PEM); such a listener counts as authenticated. Read at start.
    #[serde(default)]
    pub client_ca_file: Option<std::path::PathBuf>,
}

/// How often the certificate files are checked for changes.
const TLS_RELOAD_EVERY: Duration = Duration::from_secs(2);

use tokio_rustls::rustls;

fn crypto() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsFiles {
    /// The certificate and key, checked to belong together.
    pub fn load(&self) -> Result<Arc<rustls::sign::CertifiedKey>, String> {
        use rustls_pki_types::pem::PemObject as _;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&self.cert_file)
            .and_then(|certificates| certificates.collect::<Result<_, _>>())
            .map_err(|error| format!("cert_file `{}`: {error}", self.cert_file.display()))?;
        if chain.is_empty() {
            return Err(format!(
                "cert_file `{}` holds no certificate",
                self.cert_file.display()
            ));
        }
        let key = PrivateKeyDer::from_pem_file(&self.key_file)
            .map_err(|error| format!("key_file `{}`: {error}", self.key_file.display()))?;
        rustls::sign::CertifiedKey::from_der(chain, key, &crypto())
            .map(Arc::new)
            .map_err(|error| format!("the certificate and key do not make a pair: {error}"))
    }

    /// Whether the files load: the pair, and the client CAs when set.
    pub fn check(&self) -> Result<(), String> {
        self.load()?;
        self.client_roots()?;
        Ok(())
    }

    /// The client CAs of mutual TLS, when configured.
    pub fn client_roots(&self) -> Result<Option<rustls::RootCertStore>, String> {
        use rustls_pki_types::CertificateDer;
        use rustls_pki_types::pem::PemObject as _;
        let Some(path) = &self.client_ca_file else {
            return Ok(None);
        };
        let mut roots = rustls::RootCertStore::empty();
        let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .and_then(|certificates| certificates.collect::<Result<_, _>>())
            .map_err(|error| format!("client_ca_file `{}`: {error}", path.display()))?;
        for certificate in certificates {
            roots
                .add(certificate)
                .map_err(|error| format!("client_ca_file `{}`: {error}", path.display()))?;
        }
        if roots.is_empty() {
            return Err(format!(
                "client_ca_file `{}` holds no certificate",
                path.display()
            ));
        }
        Ok(Some(roots))
    }

    fn modified(&self) -> Option<(std::time::SystemTime, std::time::SystemTime)> {
        let modified = |path: &std::path::Path| {
            std::fs::metadata(path)
                .and_then(|meta| meta.modified())
                .ok()
        };
        Some((modified(&self.cert_file)?, modified(&self.key_file)?))
    }

    /// A TLS acceptor serving the files' certificate, reloaded when they change
    /// (for as long as the acceptor is in use).
    pub fn acceptor(&self) -> Result<tokio_rustls::TlsAcceptor, String> {
        let resolver = Arc::new(Reloading {
            current: std::sync::RwLock::new(self.load()?),
        });
        let builder = rustls::ServerConfig::builder_with_provider(crypto())
            .with_safe_default_protocol_versions()
            .map_err(|error| error.to_string())?;
        let builder = match self.client_roots()? {
            None => builder.with_no_client_auth(),
            Some(roots) => builder.with_client_cert_verifier(
                rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    crypto(),
                )
                .build()
                .map_err(|error| format!("client_ca_file: {error}"))?,
            ),
        };
        let mut config = builder.with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let files = self.clone();
        let watched = Arc::downgrade(&resolver);
        tokio::spawn(async move {
            let mut seen = files.modified();
            loop {
                tokio::time::sleep(TLS_RELOAD_EVERY).await;
                let Some(resolver) = watched.upgrade() else {
                    break;
                };
                let now = files.modified();
                if now == seen {
                    continue;
                }
                match files.load() {
                    Ok(key) => {
                        *resolver.current.write().expect("certificate lock") = key;
                        seen = now;
                        tracing::info!(cert_file = %files.cert_file.display(), "tls certificate reloaded");
                    }
                    Err(error) => {
                        // Half-written files, say: tried again at the next change.
                        seen = now;
                        tracing::error!(%error, "tls certificate not reloaded; the previous one is still served");
                    }
                }
            }
        });
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }
}

/// Serves the certificate loaded last.
#[derive(Debug)]
struct Reloading {
    current: std::sync::RwLock<Arc<rustls::sign::CertifiedKey>>,
}

impl rustls::server::ResolvesServerCert for Reloading {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.current.read().expect("certificate lock").clone())
    }
}

/// `503` for a request over `max_requests`.
async fn overloaded(_: tower::BoxError) -> Response {
    let mut response = (
        StatusCode::SERVICE_UNAVAILABLE,
        axum::Json(serde_json::json!({ "error": "too many requests in progress: retry" })),
    )
        .into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

/// `router` with the listener's request limits: the body timeout, the cap on
/// requests in progress, the per-client rate limit.
fn limited(router: Router, limits: &ListenerLimits) -> Router {
    let mut router = router.layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
        limits.body_timeout,
    ));
    if let Some(rate) = limits.rate_limit {
        let mut builder = tower_governor::governor::GovernorConfigBuilder::default();
        builder
            .period(Duration::from_secs(1) / rate.per_second.max(1))
            .burst_size(rate.burst.max(1));
        let config = Arc::new(builder.finish().expect("validated: non-zero rate"));
        // The limiter keeps a state per client address: forget idle ones.
        let limiter = config.limiter().clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(60));
            loop {
                every.tick().await;
                if Arc::strong_count(&limiter) == 1 {
                    break;
                }
                limiter.retain_recent();
            }
        });
        router = router.layer(
            tower_governor::GovernorLayer::new(config).error_handler(|error| {
                let mut response = error.into_response().map(axum::body::Body::from);
                if response.status() == StatusCode::TOO_MANY_REQUESTS {
                    *response.body_mut() = axum::body::Body::from(
                        serde_json::json!({ "error": "rate limit exceeded: retry later" })
                            .to_string(),
                    );
                    response.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    );
                }
                response
            }),
        );
    }
    router.layer(
        ServiceBuilder::new()
            .layer(axum::error_handling::HandleErrorLayer::new(overloaded))
            .load_shed()
            .concurrency_limit(limits.max_requests),
    )
}

/// Serves `router` on `listener` with `limits` (over TLS with `tls`) until
/// `shutdown` completes; then closes the listener and gives connections
/// `shutdown_timeout` to finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: &ListenerLimits,
    tls: Option<&TlsFiles>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let acceptor = tls
        .map(TlsFiles::acceptor)
        .transpose()
        .map_err(std::io::Error::other)?;
    let router = limited(router, limits);
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => permit.expect("never closed"),
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = ServiceBuilder::new()
            .layer(tower_http::add_extension::AddExtensionLayer::new(
                ConnectInfo::<SocketAddr>(peer),
            ))
            .service(router.clone());
        let service = hyper_util::service::TowerToHyperService::new(service);
        match &acceptor {
            None => {
                let connection =
                    graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
                tokio::spawn(async move {
                    let _ = connection.await;
                    drop(permit);
                });
            }
            Some(acceptor) => {
                // The handshake, bounded like a request's headers; then HTTP/1 over it.
                let (acceptor, builder, header_timeout) =
                    (acceptor.clone(), builder.clone(), limits.header_timeout);
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let Ok(Ok(stream)) =
                        tokio::time::timeout(header_timeout, acceptor.accept(stream)).await
                    else {
                        return;
                    };
                    let connection =
                        watcher.watch(builder.serve_connection(TokioIo::new(stream), service));
                    let _ = connection.await;
                    drop(permit);
                });
            }
        }
    }
    drop(listener);
    if tokio::time::timeout(limits.shutdown_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            timeout_ms = limits.shutdown_timeout.as_millis() as u64,
            "connections still open after the shutdown timeout were abandoned"
        );
    }
    Ok(())
}
