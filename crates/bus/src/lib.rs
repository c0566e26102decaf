//! Switchyard's event bus on NATS JetStream.
//!
//! Owns the connection, the two streams (events and dead letters), the subject scheme
//! ([`subject`]) and the mapping between [`Event`]s and NATS messages: CloudEvents
//! NATS binding in binary content mode, attributes as `ce-` headers, data as the
//! untouched payload. Every publish carries a `Nats-Msg-Id` derived from the event's
//! `source` and `id` (the pair CloudEvents makes unique), so JetStream's duplicate
//! window drops re-publishes. A publish is reported only after the stream's PubAck;
//! many publishes are in flight at once, bounded by `max_publishes_in_flight`.

pub mod dead_letter;
pub mod horizon;
pub mod ingest;
pub mod limits;
pub mod retry_state;
pub mod subject;
pub mod tls;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishAckFuture, stream};
use async_nats::{HeaderMap, connection::State};
use async_trait::async_trait;
use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use secrecy::{ExposeSecret as _, SecretString};
use serde::Deserialize;
use switchyard_event::{
    Event, EventError, EventSink, PublishError, PublishReceipt, encode_header_value,
};

pub use async_nats;
pub use dead_letter::DeadLetter;
pub use retry_state::RetryState;
pub use subject::{KEY_BUCKETS, Subjects, key_bucket};

/// What happened to the NATS connection: `switchyard_nats_disconnections_total` and
/// `switchyard_nats_messages_dropped_total`.
#[derive(Debug, Clone, Default)]
pub struct ConnectionMetrics {
    /// Times the connection was lost (a server that closed it, a network failure);
    /// the client reconnects on its own.
    pub disconnections: Counter,
    /// Messages the client dropped because a subscription's buffer was full.
    pub messages_dropped: Counter,
}

/// How Switchyard reaches NATS and lays out its streams. Its `Debug` redacts the
/// URL's credentials; secrets print as `[REDACTED]`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BusConfig {
    /// NATS server URL(s), comma-separated for a cluster. `tls://` requires TLS.
    #[serde(default = "default_url")]
    pub url: String,
    /// User name, with `password`.
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub password: Option<SecretString>,
    /// Token authentication.
    #[serde(default)]
    pub token: Option<SecretString>,
    /// NKey authentication: the user's seed (`SU...`).
    #[serde(default)]
    pub nkey_seed: Option<SecretString>,
    /// Decentralised JWT authentication: a `.creds` file (user JWT and NKey seed).
    #[serde(default)]
    pub creds_file: Option<std::path::PathBuf>,
    /// TLS to the servers.
    #[serde(default)]
    pub tls: Option<NatsTls>,
    /// First token of every subject Switchyard uses.
    #[serde(default = "default_subject_prefix")]
    pub subject_prefix: String,
    /// Publishes awaiting their PubAck at once, per process.
    #[serde(default = "default_max_publishes_in_flight")]
    pub max_publishes_in_flight: usize,
    /// How long to wait for a PubAck before reporting the bus unavailable.
    #[serde(default = "default_publish_timeout", with = "humantime_serde")]
    pub publish_timeout: Duration,
    /// The stream every event is stored in.
    #[serde(default)]
    pub events_stream: StreamSettings,
    /// The stream dead letters are stored in.
    #[serde(default)]
    pub dead_letter_stream: StreamSettings,
    /// The stream function log lines are stored in (oldest dropped past its limits).
    #[serde(default)]
    pub logs_stream: StreamSettings,
}

/// TLS to the NATS servers.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsTls {
    /// CAs that issued the servers' certificates (PEM); the system's when unset.
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
    /// Client certificate chain (PEM), with `key_file`: for servers that verify
    /// clients (`verify` / `verify_and_map`).
    #[serde(default)]
    pub cert_file: Option<std::path::PathBuf>,
    #[serde(default)]
    pub key_file: Option<std::path::PathBuf>,
    /// The name the servers' certificates are checked against, when it is not the
    /// host of the URL (servers reached by IP address or through a proxy).
    #[serde(default)]
    pub server_name: Option<String>,
    /// Start TLS before the server's INFO (`handshake_first` on the server).
    #[serde(default)]
    pub handshake_first: bool,
}

impl std::fmt::Debug for BusConfig {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("BusConfig")
            .field("url", &redact_url(&self.url))
            .field("user", &self.user)
            .field("password", &self.password)
            .field("token", &self.token)
            .field("nkey_seed", &self.nkey_seed)
            .field("creds_file", &self.creds_file)
            .field("tls", &self.tls)
            .field("subject_prefix", &self.subject_prefix)
            .field("events_stream", &self.events_stream)
            .field("dead_letter_stream", &self.dead_letter_stream)
            .finish_non_exhaustive()
    }
}

impl BusConfig {
    /// What is wrong with the credentials and TLS settings: `(field, message)`.
    pub fn auth_problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        let kinds = [
            self.user.is_some() || self.password.is_some(),
            self.token.is_some(),
            self.nkey_seed.is_some(),
            self.creds_file.is_some(),
        ];
        if kinds.iter().filter(|&&kind| kind).count() > 1 {
            problems.push((
                "user",
                "choose one way to authenticate: user and password, token, nkey_seed or creds_file"
                    .to_owned(),
            ));
        }
        match (&self.user, &self.password) {
            (Some(_), None) => {
                problems.push(("user", "needs `password` (or `password_file`)".to_owned()))
            }
            (None, Some(_)) => problems.push(("password", "needs `user`".to_owned())),
            _ => {}
        }
        let url_credentials = self.url.split(',').any(|url| {
            let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
            rest.split('/').next().unwrap_or_default().contains('@')
        });
        if url_credentials && kinds.iter().any(|&kind| kind) {
            problems.push((
                "url",
                "holds credentials (`user:password@`) and so do the fields: keep one".to_owned(),
            ));
        }
        for (field, secret) in [
            ("password", &self.password),
            ("token", &self.token),
            ("nkey_seed", &self.nkey_seed),
        ] {
            if secret
                .as_ref()
                .is_some_and(|secret| secret.expose_secret().trim().is_empty())
            {
                problems.push((field, "must not be empty".to_owned()));
            }
        }
        if let Some(seed) = &self.nkey_seed
            && !seed.expose_secret().trim().is_empty()
            && !seed.expose_secret().trim().starts_with("SU")
        {
            problems.push((
                "nkey_seed",
                "is not a user seed (it starts with `SU`)".to_owned(),
            ));
        }
        if let Some(path) = &self.creds_file
            && let Err(error) = std::fs::metadata(path)
        {
            problems.push(("creds_file", format!("`{}`: {error}", path.display())));
        }
        if let Some(tls) = &self.tls {
            for problem in tls::problems(
                tls.ca_file.as_deref(),
                tls.cert_file.as_deref(),
                tls.key_file.as_deref(),
                tls.server_name.as_deref(),
            ) {
                problems.push(("tls", problem));
            }
        }
        problems
    }

    /// Makes relative file paths relative to `base` (the configuration's directory).
    pub fn files_relative_to(&mut self, base: &std::path::Path) {
        let join = |path: &mut Option<std::path::PathBuf>| {
            if let Some(path) = path {
                *path = base.join(&*path);
            }
        };
        join(&mut self.creds_file);
        if let Some(tls) = &mut self.tls {
            join(&mut tls.ca_file);
            join(&mut tls.cert_file);
            join(&mut tls.key_file);
        }
    }
}

/// A rustls client configuration checking the servers against `server_name`.
fn tls_with_server_name(
    tls: &NatsTls,
    server_name: &str,
) -> Result<tokio_rustls::rustls::ClientConfig, String> {
    tls::client_config(
        tls.ca_file.as_deref(),
        tls.cert_file.as_deref(),
        tls.key_file.as_deref(),
        Some(server_name),
    )
}

impl Default for BusConfig {
    fn default() -> Self {
        BusConfig {
            url: default_url(),
            user: None,
            password: None,
            token: None,
            nkey_seed: None,
            creds_file: None,
            tls: None,
            subject_prefix: default_subject_prefix(),
            max_publishes_in_flight: default_max_publishes_in_flight(),
            publish_timeout: default_publish_timeout(),
            events_stream: StreamSettings::default(),
            dead_letter_stream: StreamSettings::default(),
            logs_stream: StreamSettings::default(),
        }
    }
}

fn default_url() -> String {
    "nats://127.0.0.1:4222".to_owned()
}
fn default_subject_prefix() -> String {
    "switchyard".to_owned()
}
fn default_max_publishes_in_flight() -> usize {
    1024
}
fn default_publish_timeout() -> Duration {
    Duration::from_secs(5)
}

/// Settings of one stream. Unset values take the stream's default: names
/// `SWITCHYARD_EVENTS` / `SWITCHYARD_DLQ`, file storage, 1 replica, max age 7 days
/// for events and 30 days for dead letters, unlimited bytes, a 2 minute duplicate
/// window.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamSettings {
    pub name: Option<String>,
    pub storage: Option<Storage>,
    pub replicas: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    pub max_age: Option<Duration>,
    pub max_bytes: Option<i64>,
    #[serde(default, with = "humantime_serde")]
    pub duplicate_window: Option<Duration>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Storage {
    File,
    Memory,
}

impl StreamSettings {
    fn to_stream_config(
        &self,
        default_name: &str,
        default_max_age: Duration,
        subjects: Vec<String>,
    ) -> stream::Config {
        stream::Config {
            name: self.name.clone().unwrap_or_else(|| default_name.to_owned()),
            subjects,
            storage: match self.storage.unwrap_or(Storage::File) {
                Storage::File => stream::StorageType::File,
                Storage::Memory => stream::StorageType::Memory,
            },
            num_replicas: self.replicas.unwrap_or(1),
            max_age: self.max_age.unwrap_or(default_max_age),
            max_bytes: self.max_bytes.unwrap_or(-1),
            duplicate_window: self.duplicate_window.unwrap_or(Duration::from_secs(120)),
            retention: stream::RetentionPolicy::Limits,
            // HTTP batches and multi-record notifications are stored all or none.
            allow_atomic_publish: true,
            // A full stream refuses new events (the sender sees 503) rather than
            // evicting stored ones nobody has consumed yet.
            discard: stream::DiscardPolicy::New,
            ..Default::default()
        }
    }
}

/// NATS URLs without their credentials (`nats://user:secret@host` -> `nats://***@host`),
/// for logs and messages.
pub fn redact_url(urls: &str) -> String {
    urls.split(',')
        .map(|url| match (url.find("://"), url.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                format!("{}***{}", &url[..scheme + 3], &url[at..])
            }
            (None, Some(at)) => format!("***{}", &url[at..]),
            _ => url.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The servers of a `nats.url`: one URL, or several separated by commas.
pub fn server_addresses(urls: &str) -> Result<Vec<async_nats::ServerAddr>, String> {
    let servers = urls
        .split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(|url| {
            url.parse::<async_nats::ServerAddr>()
                .map_err(|error| format!("`{}` is not a NATS server URL: {error}", redact_url(url)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if servers.is_empty() {
        return Err("no NATS server URL given".to_owned());
    }
    Ok(servers)
}

/// A server address without the `user:password@` or `token@` of its URL.
fn without_credentials(server: async_nats::ServerAddr) -> async_nats::ServerAddr {
    if !server.has_user_pass() {
        return server;
    }
    let mut url = server.clone().into_inner();
    // Both fail only for URLs that cannot have credentials, which these had.
    let _ = url.set_username("");
    let _ = url.set_password(None);
    async_nats::ServerAddr::from_url(url).unwrap_or(server)
}

/// A failure talking to NATS, with the stage it happened in.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("connect to nats at `{url}` failed: {reason}")]
    Connect { url: String, reason: String },
    /// The server answered and refused the credentials (`reason` is what it said,
    /// `authorization violation`): retrying helps only once the credentials or the
    /// server's accounts change. Neither field holds a secret.
    #[error("nats at `{url}` refused the credentials: {reason}")]
    CredentialsRefused { url: String, reason: String },
    #[error("set up stream `{stream}` failed: {reason}")]
    StreamSetup { stream: String, reason: String },
    #[error("{stage} failed: {reason}")]
    Operation { stage: &'static str, reason: String },
    /// The configuration asks for something the server cannot apply to what exists;
    /// retrying cannot help.
    #[error("{0}")]
    Config(String),
}

impl BusError {
    pub fn operation(stage: &'static str, error: impl std::fmt::Display) -> Self {
        BusError::Operation {
            stage,
            reason: error.to_string(),
        }
    }
}

/// A connection to NATS with Switchyard's streams.
#[derive(Clone)]
pub struct Bus {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    subjects: Subjects,
    events_stream: String,
    dead_letter_stream: String,
    logs_stream: String,
    config: BusConfig,
    /// Bounds publishes awaiting their PubAck. A batch takes its permits all at once,
    /// so concurrent batches can never hold part of the budget each and wait on each
    /// other.
    in_flight: Arc<tokio::sync::Semaphore>,
    /// Whether the events stream takes atomic batches (nats-server 2.12+ kept
    /// `allow_atomic`), as found when the streams were set up.
    atomic_batches: Arc<std::sync::atomic::AtomicBool>,
}

/// Room kept under the server's max payload for the headers a dead letter adds, so an
/// accepted event can always be dead-lettered.
pub const DEAD_LETTER_HEADROOM: usize = 8 * 1024;

const DEFAULT_EVENTS_STREAM: &str = "SWITCHYARD_EVENTS";
const DEFAULT_EVENTS_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
const DEFAULT_DEAD_LETTER_STREAM: &str = "SWITCHYARD_DLQ";
const DEFAULT_LOGS_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
const DEFAULT_LOGS_MAX_BYTES: i64 = 1 << 30;

impl Bus {
    /// Connects to NATS. The client keeps reconnecting on its own afterwards; while it
    /// is disconnected, publishes fail fast with [`PublishError::Unavailable`].
    pub async fn connect(config: &BusConfig) -> Result<Bus, BusError> {
        Bus::connect_counting(config, ConnectionMetrics::default()).await
    }

    /// [`Bus::connect`], counting what happens to the connection in `metrics`.
    pub async fn connect_counting(
        config: &BusConfig,
        metrics: ConnectionMetrics,
    ) -> Result<Bus, BusError> {
        // `url` may list several servers of a cluster, comma-separated: the client
        // connects to one and fails over to the others.
        let servers = server_addresses(&config.url).map_err(|reason| BusError::Connect {
            url: redact_url(&config.url),
            reason,
        })?;
        // async-nats does not read credentials from the URLs: a `user:password@` or
        // `token@` in `nats.url` is passed on here, and the URLs handed to the client
        // carry none (it prints them in its own debug lines).
        let mut options = async_nats::ConnectOptions::new();
        if let Some(server) = servers.iter().find(|server| server.has_user_pass()) {
            let decode = |text: &str| {
                percent_encoding::percent_decode_str(text)
                    .decode_utf8_lossy()
                    .into_owned()
            };
            let user = decode(server.username().unwrap_or_default());
            options = match server.password() {
                Some(password) => options.user_and_password(user, decode(password)),
                None => options.token(user),
            };
        }
        let servers = servers
            .into_iter()
            .map(without_credentials)
            .collect::<Vec<_>>();
        let connect_error = |reason: String| BusError::Connect {
            url: redact_url(&config.url),
            reason,
        };
        if let (Some(user), Some(password)) = (&config.user, &config.password) {
            options = options.user_and_password(user.clone(), password.expose_secret().to_owned());
        }
        if let Some(token) = &config.token {
            options = options.token(token.expose_secret().trim().to_owned());
        }
        if let Some(seed) = &config.nkey_seed {
            options = options.nkey(seed.expose_secret().trim().to_owned());
        }
        if let Some(path) = &config.creds_file {
            options = options.credentials_file(path).await.map_err(|error| {
                connect_error(format!("creds_file `{}`: {error}", path.display()))
            })?;
        }
        if let Some(tls) = &config.tls {
            options = options.require_tls(true);
            if tls.handshake_first {
                options = options.tls_first();
            }
            match &tls.server_name {
                Some(server_name) => {
                    options = options.tls_client_config(
                        tls_with_server_name(tls, server_name).map_err(connect_error)?,
                    );
                }
                None => {
                    if let Some(ca_file) = &tls.ca_file {
                        options = options.add_root_certificates(ca_file.clone());
                    }
                    if let (Some(cert_file), Some(key_file)) = (&tls.cert_file, &tls.key_file) {
                        options =
                            options.add_client_certificate(cert_file.clone(), key_file.clone());
                    }
                }
            }
        }
        let client = options
            .name("switchyard")
            .event_callback(move |event| {
                let metrics = metrics.clone();
                async move {
                    match event {
                        async_nats::Event::Disconnected => {
                            metrics.disconnections.inc();
                            tracing::warn!(stage = "connection", "disconnected from nats, reconnecting");
                        }
                        async_nats::Event::SlowConsumer(subscription) => {
                            // One event per message the client dropped because a
                            // subscription's buffer was full (at least: events can be
                            // dropped too). Core NATS messages are lost then;
                            // JetStream ones are redelivered after their ack wait.
                            let dropped = metrics.messages_dropped.inc() + 1;
                            if switchyard_event::backoff::worth_logging(dropped) {
                                tracing::warn!(stage = "receive", subscription, dropped, "a subscription's buffer was full: the nats client dropped messages");
                            }
                        }
                        async_nats::Event::Connected => {
                            tracing::info!(stage = "connection", "connected to nats");
                        }
                        async_nats::Event::ServerError(error) => {
                            tracing::warn!(stage = "connection", %error, "nats server reported an error");
                        }
                        _ => {}
                    }
                }
            })
            .connection_timeout(Duration::from_secs(5))
            .connect(servers.as_slice())
            .await
            .map_err(|error| match error.kind() {
                // The kind's words (the server's `-ERR`), not a source that could
                // quote more.
                async_nats::ConnectErrorKind::AuthorizationViolation => {
                    BusError::CredentialsRefused {
                        url: redact_url(&config.url),
                        reason: error.kind().to_string(),
                    }
                }
                _ => BusError::Connect {
                    url: redact_url(&config.url),
                    reason: error.to_string(),
                },
            })?;
        let in_flight = config.max_publishes_in_flight.max(1);
        // async-nats' own bound sits above ours, which leaves room for the dispatcher's
        // single publishes (dead letters, retries, replies) and never blocks a batch
        // half-way.
        let jetstream = jetstream::ContextBuilder::new()
            .timeout(config.publish_timeout)
            .ack_timeout(config.publish_timeout)
            .max_ack_inflight(in_flight * 2 + 64)
            .backpressure_on_inflight(true)
            .build(client.clone());
        Ok(Bus {
            client,
            jetstream,
            subjects: Subjects::new(config.subject_prefix.clone()),
            events_stream: config
                .events_stream
                .name
                .clone()
                .unwrap_or_else(|| DEFAULT_EVENTS_STREAM.to_owned()),
            dead_letter_stream: config
                .dead_letter_stream
                .name
                .clone()
                .unwrap_or_else(|| DEFAULT_DEAD_LETTER_STREAM.to_owned()),
            logs_stream: config.logs_stream.name.clone().unwrap_or_else(|| {
                // One per subject prefix (one cluster), like the subjects it takes.
                let prefix: String = config
                    .subject_prefix
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() {
                            c.to_ascii_uppercase()
                        } else {
                            '_'
                        }
                    })
                    .collect();
                format!("{prefix}_LOGS")
            }),
            config: config.clone(),
            in_flight: Arc::new(tokio::sync::Semaphore::new(in_flight)),
            atomic_batches: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        })
    }

    /// What the configuration changes in existing streams that JetStream cannot
    /// change (a stream's storage), each naming the field, the old and the new value
    /// and what to do. Empty when the streams do not exist yet or nothing conflicts.
    pub async fn stream_conflicts(&self) -> Result<Vec<String>, BusError> {
        let mut conflicts = Vec::new();
        for (field, settings, name) in [
            (
                "events_stream",
                &self.config.events_stream,
                self.events_stream.as_str(),
            ),
            (
                "dead_letter_stream",
                &self.config.dead_letter_stream,
                self.dead_letter_stream.as_str(),
            ),
        ] {
            // Missing (not created yet), or unreadable: creating it reports the rest.
            let Ok(stream) = self.jetstream.get_stream(name).await else {
                continue;
            };
            let info = stream.cached_info();
            let existing = match info.config.storage {
                stream::StorageType::File => "file",
                stream::StorageType::Memory => "memory",
            };
            let wanted = match settings.storage.unwrap_or(Storage::File) {
                Storage::File => "file",
                Storage::Memory => "memory",
            };
            if existing != wanted {
                conflicts.push(format!(
                    "nats.{field}.storage: stream `{name}` is stored in `{existing}`, the configuration says `{wanted}`, and JetStream cannot change a stream's storage: keep `storage = \"{existing}\"`, or move to a new stream (a new `{field}.name`) once this one is drained"
                ));
            }
        }
        Ok(conflicts)
    }

    /// Creates the events and dead-letter streams, or updates them to match the
    /// configuration. Idempotent; safe to run from every process at start. A change
    /// the server cannot apply is [`BusError::Config`], naming the field.
    pub async fn ensure_streams(&self) -> Result<(), BusError> {
        let conflicts = self.stream_conflicts().await?;
        if !conflicts.is_empty() {
            return Err(BusError::Config(conflicts.join("\n")));
        }
        let events = self.config.events_stream.to_stream_config(
            DEFAULT_EVENTS_STREAM,
            DEFAULT_EVENTS_MAX_AGE,
            vec![
                self.subjects.all_events(),
                self.subjects.all_direct(),
                self.subjects.all_retries(),
            ],
        );
        let dead_letters = self.config.dead_letter_stream.to_stream_config(
            DEFAULT_DEAD_LETTER_STREAM,
            Duration::from_secs(30 * 24 * 3600),
            vec![self.subjects.all_dead_letters()],
        );
        let mut logs = self.config.logs_stream.to_stream_config(
            &self.logs_stream,
            DEFAULT_LOGS_MAX_AGE,
            vec![self.subjects.all_logs()],
        );
        // Log lines are not events: the oldest make room, none is refused.
        logs.discard = stream::DiscardPolicy::Old;
        logs.allow_atomic_publish = false;
        logs.max_bytes = self
            .config
            .logs_stream
            .max_bytes
            .unwrap_or(DEFAULT_LOGS_MAX_BYTES);
        logs.num_replicas = self
            .config
            .logs_stream
            .replicas
            .unwrap_or_else(|| self.replicas());
        for config in [events, dead_letters, logs] {
            let name = config.name.clone();
            let replicas = config.num_replicas;
            let created = self
                .jetstream
                .create_or_update_stream(config)
                .await
                .map_err(|error| {
                    let text = error.to_string();
                    // More replicas than the server (or cluster) has: no retry helps
                    // until the configuration or the cluster changes. (Insufficient
                    // resources while peers restart is retried like other failures.)
                    if text.contains("replicas") {
                        let field = if name == self.events_stream {
                            "events_stream"
                        } else if name == self.logs_stream {
                            "logs_stream"
                        } else {
                            "dead_letter_stream"
                        };
                        BusError::Config(format!(
                            "nats.{field}.replicas: stream `{name}` cannot have {replicas} replicas on this server or cluster ({text}): use at most as many replicas as there are JetStream servers"
                        ))
                    } else {
                        BusError::StreamSetup {
                            stream: name.clone(),
                            reason: text,
                        }
                    }
                })?;
            if name == self.events_stream {
                // A server before 2.12 ignores `allow_atomic` (and the batch headers):
                // only a stream that kept it takes atomic batches.
                self.atomic_batches.store(
                    created.config.allow_atomic_publish,
                    std::sync::atomic::Ordering::Relaxed,
                );
            }
        }
        Ok(())
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.jetstream
    }

    /// The stream function log lines are stored in.
    pub fn logs_stream(&self) -> &str {
        &self.logs_stream
    }

    pub fn subjects(&self) -> &Subjects {
        &self.subjects
    }

    /// How long the events stream keeps a message (event, retry copy) before it is
    /// removed, delivered or not.
    pub fn events_max_age(&self) -> Duration {
        self.config
            .events_stream
            .max_age
            .filter(|age| !age.is_zero())
            .unwrap_or(DEFAULT_EVENTS_MAX_AGE)
    }

    /// Replicas of the events stream; state kept next to it (KV buckets) uses as many.
    pub fn replicas(&self) -> usize {
        self.config.events_stream.replicas.unwrap_or(1)
    }

    /// How long the events stream remembers an event's id to drop a second copy.
    pub fn duplicate_window(&self) -> Duration {
        self.config
            .events_stream
            .duplicate_window
            .unwrap_or(Duration::from_secs(120))
    }

    pub fn events_stream(&self) -> &str {
        &self.events_stream
    }

    pub fn dead_letter_stream(&self) -> &str {
        &self.dead_letter_stream
    }

    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    /// The server's `max_payload`: the largest message (headers and payload) it takes.
    pub fn max_payload(&self) -> usize {
        self.client.max_payload()
    }

    /// The largest event payload plus headers this bus accepts: the server's max
    /// payload less the room a dead letter needs.
    pub fn max_event_bytes(&self) -> usize {
        // An atomic read, unlike `server_info()`, which clones the whole server info:
        // this runs for every event.
        self.client
            .max_payload()
            .saturating_sub(DEAD_LETTER_HEADROOM)
    }

    /// The subject and headers `event` is published with, or why it cannot be: its
    /// subject longer than nats-server reads, its attributes over the header limit
    /// less the room its retry and dead-letter records need, or payload plus headers
    /// over [`Bus::max_event_bytes`]. Every refusal names the limit.
    fn prepare_event(
        &self,
        event: &Event,
        subject: String,
        message_id: &str,
    ) -> Result<(String, HeaderMap), PublishError> {
        let id = limits::shorten(&event.id, 64);
        if subject.len() > limits::MAX_SUBJECT_BYTES {
            return Err(PublishError::TooLarge(format!(
                "event `{id}`: its `source` and `type` make a subject of {} bytes, over the limit of {} bytes (nats-server's 4 KiB max_control_line less the rest of the publish command); shorten `source` or `type`",
                subject.len(),
                limits::MAX_SUBJECT_BYTES
            )));
        }
        let headers = event_headers(event, message_id);
        let header_bytes = limits::header_block_bytes(&headers);
        if header_bytes > limits::MAX_EVENT_HEADER_BYTES {
            let largest = event
                .binary_headers()
                .into_iter()
                .max_by_key(|(_, value)| value.len())
                .map(|(name, value)| {
                    format!(
                        "; the largest is `{}` ({} bytes encoded)",
                        name.trim_start_matches("ce-"),
                        value.len()
                    )
                })
                .unwrap_or_default();
            return Err(PublishError::TooLarge(format!(
                "event `{id}`: its attributes take {header_bytes} bytes as headers, over the limit of {} bytes (JetStream's 64 KiB header limit less {} bytes kept for retry and dead-letter records){largest}",
                limits::MAX_EVENT_HEADER_BYTES,
                limits::RECORD_HEADER_ROOM
            )));
        }
        let size = event.data.len() + header_bytes;
        let limit = self.max_event_bytes();
        if limit > 0 && size > limit {
            return Err(PublishError::TooLarge(format!(
                "event `{id}` is {size} bytes with its attributes, over the bus limit of {limit} bytes (the nats server's max_payload less {DEAD_LETTER_HEADROOM} bytes kept for dead-letter records)"
            )));
        }
        Ok((subject, headers))
    }

    /// The subject an event is stored on in the events stream.
    fn event_subject(&self, event: &Event) -> String {
        // Events without a key share bucket 0: spreading them would multiply the
        // subjects the stream tracks (and JetStream's work per message) for nothing.
        let bucket = event
            .extensions
            .get("partitionkey")
            .map_or(0, |key| subject::key_bucket(key));
        self.subjects.event(bucket, &event.source, &event.ty)
    }

    /// The newest event the events stream holds with this `source` and `ty` and no
    /// partition key (all such events share one subject), if it still holds one.
    pub async fn last_event(&self, source: &str, ty: &str) -> Result<Option<Event>, BusError> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind;
        let stream = self
            .jetstream
            .get_stream(self.events_stream())
            .await
            .map_err(|error| BusError::operation("open the events stream", error))?;
        let subject = self.subjects.event(0, source, ty);
        match stream.get_last_raw_message_by_subject(&subject).await {
            Ok(message) => event_from_message(Some(&message.headers), message.payload)
                .map(Some)
                .map_err(|error| BusError::operation("read the last event of a subject", error)),
            Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(error) => Err(BusError::operation(
                "read the last event of a subject",
                error,
            )),
        }
    }

    /// Why `event` cannot be stored, if it cannot (see [`Bus::send_event`]); nothing is
    /// sent.
    pub fn check_event(&self, event: &Event) -> Result<(), PublishError> {
        self.prepare_event(event, self.event_subject(event), &message_id(event))
            .map(|_| ())
    }

    /// Sends one event and returns the future of its PubAck.
    pub async fn send_event(&self, event: &Event) -> Result<PublishAckFuture, PublishError> {
        let (subject, headers) =
            self.prepare_event(event, self.event_subject(event), &message_id(event))?;
        self.send(subject, headers, event.data.clone()).await
    }

    /// Sends `event` to the events stream (every trigger that matches it) with
    /// `message_id` instead of the one derived from its source and id, so it is not
    /// taken for a duplicate of itself (used by the replay of a source's dead letter).
    pub async fn send_event_as(
        &self,
        event: &Event,
        message_id: &str,
    ) -> Result<PublishAckFuture, PublishError> {
        let (subject, headers) =
            self.prepare_event(event, self.event_subject(event), message_id)?;
        self.send(subject, headers, event.data.clone()).await
    }

    /// Sends `event` to one trigger only, bypassing the duplicate window with a fresh
    /// message id (used by dead-letter replay).
    pub async fn send_direct(
        &self,
        trigger: &str,
        event: &Event,
        message_id: &str,
    ) -> Result<PublishAckFuture, PublishError> {
        let (subject, headers) =
            self.prepare_event(event, self.subjects.direct(trigger), message_id)?;
        self.send(subject, headers, event.data.clone()).await
    }

    /// Sends one message. A subject or header block nats-server would not take is
    /// refused here, never sent: an over-long subject would make the server close the
    /// connection every request of the process shares.
    pub async fn send(
        &self,
        subject: String,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<PublishAckFuture, PublishError> {
        limits::check_message(&subject, &headers).map_err(PublishError::TooLarge)?;
        if !self.is_connected() {
            return Err(PublishError::Unavailable(
                "not connected to nats".to_owned(),
            ));
        }
        self.jetstream
            .publish_with_headers(subject, headers, payload)
            .await
            .map_err(classify_publish_error)
    }
}

impl Bus {
    /// Publishes and waits for the PubAck: the message is stored when this returns
    /// `Ok`.
    pub async fn store(
        &self,
        subject: String,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<jetstream::publish::PublishAck, PublishError> {
        self.send(subject, headers, payload)
            .await?
            .await
            .map_err(classify_publish_error)
    }
}

impl Bus {
    /// Stores an input that a source could not turn into a storable event (not a
    /// valid CloudEvent, or larger than the bus accepts) as a dead letter of
    /// `source:<name>`, with why, so it is listed by `switchyard dlq list
    /// source:<name>` instead of being dropped. Storing it twice keeps one copy.
    pub async fn dead_letter_input(
        &self,
        source_name: &str,
        event: Event,
        reason: &str,
        error: &str,
    ) -> Result<(), PublishError> {
        let trigger = format!("source:{source_name}");
        let now = switchyard_event::timestamp::now_rfc3339();
        let dead_letter = DeadLetter {
            event,
            reason: reason.to_owned(),
            trigger: trigger.clone(),
            function: String::new(),
            attempts: 0,
            last_status: None,
            last_error: error.to_owned(),
            first_attempt_at: None,
            last_attempt_at: now.clone(),
            received_at: now,
            event_sequence: 0,
        };
        let id = bounded_message_id(format!(
            "dlq {} {}",
            encode_header_value(&trigger),
            message_id(&dead_letter.event)
        ));
        let (headers, payload) = dead_letter.to_message_with_id_within(&id, self.max_payload());
        self.store(self.subjects.dead_letter(&trigger), headers, payload)
            .await
            .map(|_| ())
    }
}

/// A NATS subject as a trigger's destination. Published through JetStream (and
/// acknowledged) when a stream captures the subject, with core NATS otherwise (at most
/// once). Which of the two is looked up, not guessed from a publish: a JetStream
/// publish to a subject no stream captures but a core subscriber listens on reaches
/// the subscriber and then times out waiting for an ack that never comes, which would
/// fail (and re-run) an invocation whose result was delivered.
pub struct NatsDestination {
    bus: Bus,
    subject: String,
    /// Whether a stream captures the subject, and when that was looked up.
    captured: std::sync::Mutex<Option<(bool, std::time::Instant)>>,
}

/// How long a lookup of the stream capturing a destination subject is trusted.
const CAPTURE_LOOKUP_TTL: Duration = Duration::from_secs(30);

impl NatsDestination {
    pub fn new(bus: Bus, subject: impl Into<String>) -> NatsDestination {
        NatsDestination {
            bus,
            subject: subject.into(),
            captured: std::sync::Mutex::new(None),
        }
    }

    /// Whether a JetStream stream captures the subject (looked up at most every
    /// [`CAPTURE_LOOKUP_TTL`]).
    async fn captured(&self) -> Result<bool, String> {
        if let Some((captured, at)) = *self.captured.lock().expect("capture lock")
            && at.elapsed() < CAPTURE_LOOKUP_TTL
        {
            return Ok(captured);
        }
        let captured = match self
            .bus
            .jetstream
            .stream_by_subject(self.subject.clone())
            .await
        {
            Ok(_) => true,
            Err(error)
                if error.kind() == jetstream::context::GetStreamByNameErrorKind::NotFound =>
            {
                false
            }
            Err(error) => {
                return Err(format!(
                    "looking up the stream of the subject failed: {error}"
                ));
            }
        };
        *self.captured.lock().expect("capture lock") = Some((captured, std::time::Instant::now()));
        Ok(captured)
    }

    async fn publish_core(&self, headers: HeaderMap, event: &Event) -> Result<(), String> {
        self.bus
            .client
            .publish_with_headers(self.subject.clone(), headers, event.data.clone())
            .await
            .map_err(|error| error.to_string())?;
        self.bus
            .client
            .flush()
            .await
            .map_err(|error| error.to_string())
    }
}

#[async_trait]
impl switchyard_event::Destination for NatsDestination {
    fn describe(&self) -> String {
        format!("nats subject {}", self.subject)
    }

    async fn publish(&self, event: &Event, extra: &[(String, String)]) -> Result<(), String> {
        let mut headers = HeaderMap::new();
        for (name, value) in event.binary_headers() {
            headers.insert(name.as_ref(), value.as_ref());
        }
        for (name, value) in extra {
            headers.insert(name.as_str(), value.as_str());
        }
        if !self.captured().await? {
            return self.publish_core(headers, event).await;
        }
        let published = self
            .bus
            .jetstream
            .publish_with_headers(self.subject.clone(), headers.clone(), event.data.clone())
            .await;
        let acknowledged = match published {
            Ok(ack) => ack.await,
            Err(error) => Err(error),
        };
        match acknowledged {
            Ok(_) => Ok(()),
            Err(error) if error.kind() == jetstream::context::PublishErrorKind::StreamNotFound => {
                // The stream went away since the lookup.
                *self.captured.lock().expect("capture lock") = None;
                self.publish_core(headers, event).await
            }
            Err(error) => Err(error.to_string()),
        }
    }
}

fn classify_publish_error(error: jetstream::context::PublishError) -> PublishError {
    use jetstream::context::PublishErrorKind;
    use jetstream::{Error as ApiError, ErrorCode};
    // JetStream's own refusals: a header block over its limit can never be stored, so
    // it must not read as "unavailable, retry later".
    let api_error = std::error::Error::source(&error)
        .and_then(|source| source.downcast_ref::<ApiError>())
        .map(ApiError::error_code);
    if api_error == Some(ErrorCode::STREAM_HEADER_EXCEEDS_MAXIMUM) {
        return PublishError::TooLarge(error.to_string());
    }
    match error.kind() {
        PublishErrorKind::MaxPayloadExceeded => PublishError::TooLarge(error.to_string()),
        PublishErrorKind::StreamNotFound
        | PublishErrorKind::TimedOut
        | PublishErrorKind::BrokenPipe
        | PublishErrorKind::MaxAckPending
        | PublishErrorKind::Other => PublishError::Unavailable(error.to_string()),
        _ => PublishError::Rejected(error.to_string()),
    }
}

/// The `Nats-Msg-Id` of an event: its `source` and `id`, each percent-encoded, joined
/// by a space. CloudEvents only promises `source` + `id` to be unique, so the id alone
/// would let two sources' events with the same id shadow each other.
pub fn message_id(event: &Event) -> String {
    format!(
        "{} {}",
        encode_header_value(&event.source),
        encode_header_value(&event.id)
    )
}

/// A message id kept short: one over 512 bytes (an input with a huge `id` or
/// `source`, dead-lettered for that) is replaced by its SHA-256, so it still
/// deduplicates and never fills the header block.
fn bounded_message_id(id: String) -> String {
    use sha2::Digest;
    if id.len() <= 512 {
        return id;
    }
    format!(
        "sha256 {}",
        hex::encode(sha2::Sha256::digest(id.as_bytes()))
    )
}

/// The NATS headers of an event in binary content mode, plus `Nats-Msg-Id`.
pub fn event_headers(event: &Event, message_id: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in event.binary_headers() {
        headers.insert(name.as_ref(), value.as_ref());
    }
    headers.insert("Nats-Msg-Id", message_id);
    headers
}

/// Reads an event back from a NATS message's headers and payload.
pub fn event_from_message(
    headers: Option<&HeaderMap>,
    payload: Bytes,
) -> Result<Event, EventError> {
    let empty = HeaderMap::new();
    let headers = headers.unwrap_or(&empty);
    Event::from_binary(
        headers.iter().filter_map(|(name, values)| {
            let name = std::str::from_utf8(name.as_ref()).ok()?;
            values.last().map(|value| (name, value.as_str()))
        }),
        payload,
    )
}

/// The store span of each event that carries a `traceparent` (a child of it): the
/// time until its PubAck.
fn store_spans(bus: &Bus, events: &[Event]) -> Vec<switchyard_event::telemetry::TraceSpan> {
    use switchyard_event::telemetry::{KeyValue, SpanKind, TraceSpan, event_context};
    events
        .iter()
        .map(|event| {
            // An event with no trace context had no ingest span: no trace of its own.
            let Some(parent) = event_context(event) else {
                return TraceSpan::none();
            };
            TraceSpan::start("store", SpanKind::Producer, Some(&parent), || {
                vec![
                    KeyValue::new("messaging.system", "nats"),
                    KeyValue::new("messaging.destination.name", bus.event_subject(event)),
                    KeyValue::new("messaging.message.id", message_id(event)),
                    KeyValue::new("switchyard.stream", bus.events_stream().to_owned()),
                ]
            })
        })
        .collect()
}

fn end_store_spans(
    spans: &mut [switchyard_event::telemetry::TraceSpan],
    result: &Result<Vec<PublishReceipt>, PublishError>,
) {
    use switchyard_event::telemetry::KeyValue;
    match result {
        Ok(receipts) => {
            for (span, receipt) in spans.iter_mut().zip(receipts) {
                span.set(|| {
                    vec![
                        KeyValue::new("switchyard.sequence", receipt.sequence as i64),
                        KeyValue::new("switchyard.duplicate", receipt.duplicate),
                    ]
                });
            }
        }
        Err(error) => {
            for span in spans.iter_mut() {
                span.fail(error.to_string());
            }
        }
    }
}

/// Events of one batch sent before their PubAcks are awaited.
const PUBLISH_CHUNK: usize = 256;

#[async_trait]
impl EventSink for Bus {
    async fn publish_all(&self, events: Vec<Event>) -> Result<Vec<PublishReceipt>, PublishError> {
        self.publish_events(&events).await
    }

    async fn publish_atomically(
        &self,
        events: Vec<Event>,
    ) -> Result<Vec<PublishReceipt>, PublishError> {
        self.publish_events_atomically(&events).await
    }
}

/// Most events one atomic batch may hold (nats-server's limit for atomic batches).
pub const MAX_ATOMIC_BATCH: usize = 1000;

/// How an atomic batch publish failed.
enum AtomicFailure {
    /// Some event of the batch is already stored (a resend): nothing was stored.
    Duplicate,
    /// The server or the stream does not take atomic batches.
    Unsupported(String),
    Failed(PublishError),
}

impl Bus {
    /// Publishes `events` as one JetStream atomic batch (nats-server 2.12+, the
    /// events stream has `allow_atomic`): every event is stored, or none is. An event
    /// that appears twice in `events` is stored once (the later copy is reported as
    /// a duplicate). When some event was already stored by an earlier request (a
    /// resend after a 503), JetStream refuses the whole batch; then each event is
    /// published on its own, so the stored ones are reported as duplicates and the
    /// rest stored: the resend completes what the first attempt may have stored.
    pub async fn publish_events_atomically(
        &self,
        events: &[Event],
    ) -> Result<Vec<PublishReceipt>, PublishError> {
        if events.len() < 2 {
            return self.publish_events(events).await;
        }
        if !switchyard_event::telemetry::enabled() {
            return self.publish_atomically_untraced(events).await;
        }
        let mut spans = store_spans(self, events);
        let result = self.publish_atomically_untraced(events).await;
        end_store_spans(&mut spans, &result);
        result
    }

    async fn publish_atomically_untraced(
        &self,
        events: &[Event],
    ) -> Result<Vec<PublishReceipt>, PublishError> {
        let mut first_of: std::collections::HashMap<String, usize> =
            std::collections::HashMap::new();
        let mut unique = Vec::with_capacity(events.len());
        let mut repeats = Vec::new();
        for (index, event) in events.iter().enumerate() {
            let id = message_id(event);
            let message = self
                .prepare_event(event, self.event_subject(event), &id)
                .map_err(|error| match error {
                    PublishError::TooLarge(reason) => {
                        PublishError::TooLarge(format!("event {index} of the batch: {reason}"))
                    }
                    other => other,
                })?;
            match first_of.get(&id) {
                Some(first) => repeats.push((index, *first)),
                None => {
                    first_of.insert(id, index);
                    unique.push((index, message));
                }
            }
        }
        if unique.len() > MAX_ATOMIC_BATCH {
            return Err(PublishError::TooLarge(format!(
                "a batch holds at most {MAX_ATOMIC_BATCH} events (JetStream's atomic batch limit); this one has {}",
                unique.len()
            )));
        }
        let attempt = if self
            .atomic_batches
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            self.publish_atomic_batch(&unique, events).await
        } else {
            Err(AtomicFailure::Unsupported(
                "the events stream has no allow_atomic (nats-server before 2.12, or streams not set up by this process)".to_owned(),
            ))
        };
        let stored = match attempt {
            Ok(receipts) => receipts,
            Err(AtomicFailure::Failed(error)) => return Err(error),
            // Stored one by one: duplicates reported, the rest stored.
            Err(failure @ (AtomicFailure::Duplicate | AtomicFailure::Unsupported(_))) => {
                if let AtomicFailure::Unsupported(reason) = failure {
                    static WARNED: std::sync::Once = std::sync::Once::new();
                    WARNED.call_once(|| {
                        tracing::warn!(%reason, stage = "publish", "the events stream takes no atomic batches (nats-server 2.12+ with allow_atomic); batches are published event by event");
                    });
                }
                let singles: Vec<Event> = unique
                    .iter()
                    .map(|(index, _)| events[*index].clone())
                    .collect();
                self.publish_untraced(&singles)
                    .await?
                    .into_iter()
                    .zip(unique.iter().map(|(index, _)| *index))
                    .map(|(receipt, index)| (index, receipt))
                    .collect()
            }
        };
        let mut receipts: Vec<Option<PublishReceipt>> = vec![None; events.len()];
        for (index, receipt) in stored {
            receipts[index] = Some(receipt);
        }
        for (index, first) in repeats {
            let sequence = receipts[first]
                .as_ref()
                .map_or(0, |receipt| receipt.sequence);
            receipts[index] = Some(PublishReceipt {
                event_id: events[index].id.clone(),
                sequence,
                duplicate: true,
            });
        }
        Ok(receipts.into_iter().flatten().collect())
    }

    /// One atomic batch: every message but the last sent without a reply, the last
    /// with the commit marker; its PubAck (or error) speaks for the whole batch.
    async fn publish_atomic_batch(
        &self,
        messages: &[(usize, (String, HeaderMap))],
        events: &[Event],
    ) -> Result<Vec<(usize, PublishReceipt)>, AtomicFailure> {
        if !self.is_connected() {
            return Err(AtomicFailure::Failed(PublishError::Unavailable(
                "not connected to nats".to_owned(),
            )));
        }
        let batch_id = uuid_like_batch_id();
        let last = messages.len();
        let publishing = async {
            let _permit = self.in_flight.acquire().await.map_err(|_| {
                AtomicFailure::Failed(PublishError::Unavailable("bus closed".to_owned()))
            })?;
            let mut commit = None;
            for (position, (index, (subject, headers))) in messages.iter().enumerate() {
                let mut headers = headers.clone();
                headers.insert("Nats-Batch-Id", batch_id.as_str());
                headers.insert("Nats-Batch-Sequence", (position + 1).to_string());
                let payload = events[*index].data.clone();
                if position + 1 == last {
                    headers.insert("Nats-Batch-Commit", "1");
                    commit = Some(
                        self.jetstream
                            .publish_with_headers(subject.clone(), headers, payload)
                            .await
                            .map_err(|error| {
                                AtomicFailure::Failed(classify_publish_error(error))
                            })?,
                    );
                } else {
                    self.client
                        .publish_with_headers(subject.clone(), headers, payload)
                        .await
                        .map_err(|error| {
                            AtomicFailure::Failed(PublishError::Unavailable(error.to_string()))
                        })?;
                }
            }
            let ack = commit.expect("a batch has a last message").await;
            Ok::<_, AtomicFailure>(ack)
        };
        let ack = tokio::time::timeout(self.config.publish_timeout * 2, publishing)
            .await
            .map_err(|_| {
                AtomicFailure::Failed(PublishError::Unavailable(
                    "timed out waiting for the event bus".to_owned(),
                ))
            })??;
        match ack {
            Ok(ack) => {
                let Some(first) = (ack.sequence + 1).checked_sub(messages.len() as u64) else {
                    return Err(AtomicFailure::Failed(PublishError::Unavailable(format!(
                        "unexpected acknowledgement of an atomic batch of {}: sequence {}",
                        messages.len(),
                        ack.sequence
                    ))));
                };
                Ok(messages
                    .iter()
                    .enumerate()
                    .map(|(position, (index, _))| {
                        (
                            *index,
                            PublishReceipt {
                                event_id: events[*index].id.clone(),
                                sequence: first + position as u64,
                                duplicate: false,
                            },
                        )
                    })
                    .collect())
            }
            Err(error) => {
                use jetstream::{Error as ApiError, ErrorCode};
                let code = std::error::Error::source(&error)
                    .and_then(|source| source.downcast_ref::<ApiError>())
                    .map(ApiError::error_code);
                match code {
                    Some(ErrorCode::ATOMIC_PUBLISH_CONTAINS_DUPLICATE_MESSAGE) => {
                        Err(AtomicFailure::Duplicate)
                    }
                    Some(ErrorCode::ATOMIC_PUBLISH_DISABLED) => {
                        Err(AtomicFailure::Unsupported(error.to_string()))
                    }
                    _ => Err(AtomicFailure::Failed(classify_publish_error(error))),
                }
            }
        }
    }
}

/// A batch id: unique per process and call (`Nats-Batch-Id` takes up to 64 characters).
fn uuid_like_batch_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos());
    format!(
        "sy{}-{nanos:x}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

impl Bus {
    /// [`EventSink::publish_all`] on borrowed events, so a caller that may have to
    /// publish them again keeps them without a copy.
    pub async fn publish_events(
        &self,
        events: &[Event],
    ) -> Result<Vec<PublishReceipt>, PublishError> {
        if !switchyard_event::telemetry::enabled() {
            return self.publish_untraced(events).await;
        }
        let mut spans = store_spans(self, events);
        let result = self.publish_untraced(events).await;
        end_store_spans(&mut spans, &result);
        result
    }

    /// [`Bus::publish_events`] without store spans (its caller has them).
    async fn publish_untraced(
        &self,
        events: &[Event],
    ) -> Result<Vec<PublishReceipt>, PublishError> {
        // Every event is checked before any is sent: one that cannot be stored refuses
        // the batch, never a part of it.
        let mut prepared = Vec::with_capacity(events.len());
        for (index, event) in events.iter().enumerate() {
            let message = self
                .prepare_event(event, self.event_subject(event), &message_id(event))
                .map_err(|error| match error {
                    PublishError::TooLarge(reason) if events.len() > 1 => {
                        PublishError::TooLarge(format!("event {index} of the batch: {reason}"))
                    }
                    other => other,
                })?;
            prepared.push(message);
        }
        let mut prepared = prepared.into_iter();
        let mut receipts = Vec::with_capacity(events.len());
        let chunk_size = PUBLISH_CHUNK.min(self.config.max_publishes_in_flight.max(1));
        for chunk in events.chunks(chunk_size) {
            let messages: Vec<_> = prepared.by_ref().take(chunk.len()).collect();
            let publishing = async {
                let _permits = self
                    .in_flight
                    .acquire_many(chunk.len() as u32)
                    .await
                    .map_err(|_| PublishError::Unavailable("bus closed".to_owned()))?;
                let mut pending = Vec::with_capacity(chunk.len());
                for ((subject, headers), event) in messages.into_iter().zip(chunk) {
                    pending.push(self.send(subject, headers, event.data.clone()).await?);
                }
                let mut stored = Vec::with_capacity(chunk.len());
                for (event, ack) in chunk.iter().zip(pending) {
                    let ack = ack.await.map_err(classify_publish_error)?;
                    stored.push(PublishReceipt {
                        event_id: event.id.clone(),
                        sequence: ack.sequence,
                        duplicate: ack.duplicate,
                    });
                }
                Ok::<_, PublishError>(stored)
            };
            // Waiting for room counts against the publish timeout too: a sender is
            // never left hanging.
            let stored = tokio::time::timeout(self.config.publish_timeout * 2, publishing)
                .await
                .map_err(|_| {
                    PublishError::Unavailable("timed out waiting for the event bus".to_owned())
                })??;
            receipts.extend(stored);
        }
        Ok(receipts)
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_url_may_list_the_servers_of_a_cluster() {
        let servers =
            server_addresses("nats://n1:4222, nats://n2:4222,nats://user:secret@n3:4222").unwrap();
        assert_eq!(servers.len(), 3);
        assert_eq!(server_addresses("nats://127.0.0.1:4222").unwrap().len(), 1);
        assert!(server_addresses(" , ").is_err());
        let error = server_addresses("nats://a:1,http://user:secret@b:x").unwrap_err();
        assert!(!error.contains("secret"), "{error}");
    }

    use super::*;

    #[test]
    fn the_addresses_given_to_the_client_carry_no_credentials() {
        for url in [
            "nats://switchyard:pass-w0rd@127.0.0.1:4222",
            "tls://t0ken@nats.example.com:4222",
            "nats://127.0.0.1:4222",
        ] {
            let server = server_addresses(url).unwrap().remove(0);
            let bare = without_credentials(server.clone());
            assert!(!bare.has_user_pass(), "{url}");
            let printed = format!("{bare:?} {}", bare.as_url_str());
            assert!(!printed.contains("pass-w0rd"), "{printed}");
            assert!(!printed.contains("t0ken"), "{printed}");
            assert!(!printed.contains('@'), "{printed}");
            assert_eq!(bare.host(), server.host());
            assert_eq!(bare.port(), server.port());
            assert_eq!(bare.tls_required(), server.tls_required());
        }
    }

    #[test]
    fn credentials_are_left_out_of_printed_urls() {
        assert_eq!(
            redact_url("nats://user:secret@n1:4222,nats://n2:4222,tls://token@n3"),
            "nats://***@n1:4222,nats://n2:4222,tls://***@n3"
        );
    }
}
