use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;

/// An HTTP source: the CloudEvents endpoint `POST /v1/events` and the webhooks
/// `POST /hooks/{name}` on one listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSourceConfig {
    /// Name of the source, used in metrics and logs.
    pub name: String,
    /// Address to listen on, e.g. `0.0.0.0:8080`.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Largest request body accepted, in bytes; larger requests get `413`.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// When set, `POST /v1/events` (and every hook without authentication of its
    /// own) requires `Authorization: Bearer <token>`.
    #[serde(default)]
    pub bearer_token: Option<SecretString>,
    /// Several tokens, any of which is accepted (to rotate one without downtime).
    #[serde(default)]
    pub bearer_tokens: Vec<SecretString>,
    /// Accept events from the network without authentication: needed for a
    /// listener off loopback whose `/v1/events` or hooks have neither a token, a
    /// signature nor client certificates (`tls.client_ca_file`).
    #[serde(default)]
    pub insecure: bool,
    /// Serve `POST /v1/events` (the CloudEvents endpoint); `false` leaves only the
    /// hooks and routes.
    #[serde(default = "yes")]
    pub events_endpoint: bool,
    /// Plain webhooks, each at `POST /hooks/{name}`.
    #[serde(default)]
    pub hooks: Vec<HookConfig>,
    /// Function URLs: requests under a path answered synchronously by a function.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Timeouts, connection and request caps, per-client rate limit.
    #[serde(default)]
    pub limits: crate::listener::ListenerLimits,
    /// HTTPS: `{ cert_file, key_file }` (PEM), reloaded when they change.
    #[serde(default)]
    pub tls: Option<crate::listener::TlsFiles>,
}

/// A function URL: requests whose path is `path` or under it (and whose method is one
/// of `methods`) are answered by `function`, synchronously. Not stored on the bus
/// (unless `record`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Path prefix, e.g. `/api/orders` (takes `/api/orders` and `/api/orders/...`);
    /// `/` takes every path the source does not serve itself.
    pub path: String,
    /// The function answering.
    pub function: String,
    /// HTTP methods taken (any when empty); others get `405`.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Requests must carry `Authorization: Bearer <token>`.
    #[serde(default)]
    pub bearer_token: Option<SecretString>,
    /// Several tokens, any of which is accepted (rotation).
    #[serde(default)]
    pub bearer_tokens: Vec<SecretString>,
    /// Requests must carry a valid HMAC-SHA256 signature (as hooks').
    #[serde(default)]
    pub signature: Option<SignatureConfig>,
    /// No authentication, on purpose (a function URL with `AuthType: NONE`): needed
    /// for a route without `bearer_token` or `signature` on a listener that is not
    /// loopback-only.
    #[serde(default)]
    pub public: bool,
    /// Cross-origin settings, as a function URL's.
    #[serde(default)]
    pub cors: Option<CorsConfig>,
    /// How long a request waits for a place in the function's `max_concurrency`
    /// before it is answered `429` with `Retry-After`.
    #[serde(default = "default_route_max_wait", with = "humantime_serde")]
    pub max_wait: Duration,
    /// Also publish each request and its response as a CloudEvent (type
    /// `dev.switchyard.route.call`), for audit.
    #[serde(default)]
    pub record: bool,
}

fn default_route_max_wait() -> Duration {
    Duration::from_secs(1)
}

/// A function URL's CORS settings (`AllowOrigins`, `AllowMethods`, `AllowHeaders`,
/// `ExposeHeaders`, `MaxAge`, `AllowCredentials`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CorsConfig {
    /// Origins allowed (`https://example.com`), or `["*"]`.
    #[serde(default)]
    pub allow_origins: Vec<String>,
    /// Methods allowed, or `["*"]`.
    #[serde(default)]
    pub allow_methods: Vec<String>,
    /// Request headers allowed, or `["*"]`.
    #[serde(default)]
    pub allow_headers: Vec<String>,
    /// Response headers the browser may read.
    #[serde(default)]
    pub expose_headers: Vec<String>,
    /// How long a browser may cache a preflight answer.
    #[serde(default, with = "humantime_serde")]
    pub max_age: Option<Duration>,
    /// Whether cookies and credentials are allowed.
    #[serde(default)]
    pub allow_credentials: bool,
}

fn yes() -> bool {
    true
}

/// Every token of a `bearer_token` and `bearer_tokens` pair.
pub fn tokens<'a>(
    one: &'a Option<SecretString>,
    many: &'a [SecretString],
) -> Vec<&'a SecretString> {
    one.iter().chain(many).collect()
}

impl HttpSourceConfig {
    /// The tokens `/v1/events` accepts (and hooks without their own authentication).
    pub fn tokens(&self) -> Vec<&SecretString> {
        tokens(&self.bearer_token, &self.bearer_tokens)
    }
}

impl HookConfig {
    /// The hook's own tokens.
    pub fn tokens(&self) -> Vec<&SecretString> {
        tokens(&self.bearer_token, &self.bearer_tokens)
    }

    /// Whether the hook authenticates its requests itself: its own tokens, a
    /// signature, or SNS's signatures (an `s3` hook with `sns_topics` takes only
    /// signed SNS messages). A hook that does not takes the source's tokens.
    pub fn authenticates_itself(&self) -> bool {
        !self.tokens().is_empty()
            || self.signature.is_some()
            || (self.format == HookFormat::S3 && !self.sns_topics.is_empty())
    }
}

impl RouteConfig {
    /// The route's tokens.
    pub fn tokens(&self) -> Vec<&SecretString> {
        tokens(&self.bearer_token, &self.bearer_tokens)
    }
}

impl SignatureConfig {
    /// Whether the signature covers a timestamp (so an old request is refused).
    pub fn timestamped(&self) -> bool {
        matches!(
            self,
            SignatureConfig::Hmac {
                timestamp_header: Some(_),
                ..
            }
        )
    }

    /// How old a signed timestamp may be, when the signature covers one.
    pub fn tolerance(&self) -> Option<Duration> {
        match self {
            SignatureConfig::Hmac {
                timestamp_header: Some(_),
                tolerance,
                ..
            } => Some(*tolerance),
            _ => None,
        }
    }

    /// The shared secret.
    pub fn secret(&self) -> &SecretString {
        match self {
            SignatureConfig::Github { secret } | SignatureConfig::Hmac { secret, .. } => secret,
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:8080".to_owned()
}

fn default_max_body_bytes() -> usize {
    1024 * 1024
}

/// The dedup horizon of a hook with `id_header` when none is configured.
pub const DEFAULT_HOOK_DEDUP_HORIZON: std::time::Duration =
    std::time::Duration::from_secs(24 * 3600);

impl HookConfig {
    /// How long this hook remembers delivery ids, when it does: only a raw hook with
    /// `id_header` (others generate ids, or take object ids from the store).
    pub fn dedup_horizon(&self) -> Option<std::time::Duration> {
        if self.id_header.is_none() || self.format != HookFormat::Raw {
            return None;
        }
        match self.dedup_horizon {
            Some(horizon) if horizon.is_zero() => None,
            Some(horizon) => Some(horizon),
            None => Some(DEFAULT_HOOK_DEDUP_HORIZON),
        }
    }
}

/// One webhook: any body becomes the data of an event with a fixed type and source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookConfig {
    /// The path segment: the hook is served at `/hooks/{name}`.
    pub name: String,
    /// What the body is: `raw` (default) makes it the data of one event; `s3` reads
    /// it as an S3/MinIO event notification (MinIO's webhook target, or an SNS HTTP
    /// subscription) and makes one event per object record.
    #[serde(default)]
    pub format: HookFormat,
    /// With `format = "s3"`: how the store writes keys in its notifications, `url`
    /// (AWS, MinIO: `red+flower.jpg` is `red flower.jpg`) or `none` (versitygw).
    #[serde(default)]
    pub key_encoding: switchyard_connector_s3::KeyEncoding,

    /// With `format = "s3"`: SNS topics (ARNs) whose messages are accepted; any topic
    /// when empty. SNS messages are always signature-checked.
    #[serde(default)]
    pub sns_topics: Vec<String>,
    /// URL prefixes trusted for SNS signing certificates and subscription
    /// confirmation instead of `https://sns.<region>.amazonaws.com/` (a private
    /// SNS-compatible service, or a test).
    #[serde(default)]
    pub sns_trusted_urls: Vec<String>,
    /// CloudEvents `type` of the events this hook produces (required for `raw`).
    #[serde(default)]
    pub event_type: Option<String>,
    /// CloudEvents `source`; defaults to `/hooks/{name}`.
    #[serde(default)]
    pub event_source: Option<String>,
    /// Header carrying the provider's delivery id (`X-GitHub-Delivery`,
    /// `Idempotency-Key`, ...). When present it becomes the event id, so a
    /// redelivery is deduplicated; otherwise an id is generated.
    #[serde(default)]
    pub id_header: Option<String>,
    /// How long a delivery id is remembered to drop a redelivery (a provider's
    /// retry, a redelivery done by hand an hour later): 24 h by default when
    /// `id_header` is set, `"0s"` to rely only on the events stream's duplicate window.
    #[serde(default, with = "humantime_serde")]
    pub dedup_horizon: Option<std::time::Duration>,
    /// Header whose value becomes the CloudEvents `subject` (e.g. `X-GitHub-Event`).
    #[serde(default)]
    pub subject_header: Option<String>,
    /// When set, requests must carry `Authorization: Bearer <token>`.
    #[serde(default)]
    pub bearer_token: Option<SecretString>,
    /// Several tokens, any of which is accepted (rotation).
    #[serde(default)]
    pub bearer_tokens: Vec<SecretString>,
    /// When set, requests must carry a valid HMAC-SHA256 signature.
    #[serde(default)]
    pub signature: Option<SignatureConfig>,
}

/// What a webhook's body is.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum HookFormat {
    #[default]
    Raw,
    S3,
}

/// How a webhook's signature is checked.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "scheme", rename_all = "lowercase", deny_unknown_fields)]
pub enum SignatureConfig {
    /// GitHub: `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the body>`.
    Github { secret: SecretString },
    /// Any provider: `header` carries the HMAC-SHA256 (after an optional `prefix`,
    /// hex or base64). With `timestamp_header`, the signed message is
    /// `{timestamp}.{body}` (unix seconds) and a timestamp further than `tolerance`
    /// from now is refused, which stops replays.
    Hmac {
        secret: SecretString,
        header: String,
        #[serde(default)]
        prefix: Option<String>,
        #[serde(default)]
        encoding: SignatureEncoding,
        #[serde(default)]
        timestamp_header: Option<String>,
        #[serde(default = "default_tolerance", with = "humantime_serde")]
        tolerance: Duration,
    },
}

fn default_tolerance() -> Duration {
    Duration::from_secs(300)
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SignatureEncoding {
    #[default]
    Hex,
    Base64,
}
