//! How Switchyard reaches an object store: `[stores.<name>]` in the config, shared by
//! poll sources and by triggers that enrich object events.

use secrecy::{ExposeSecret as _, SecretString};
use serde::Deserialize;

/// An S3-compatible object store.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// The store's URL (`http://127.0.0.1:9000` for a MinIO); AWS's endpoint for
    /// `region` when absent.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Region to sign requests for, and of the events' `source`.
    #[serde(default = "default_region")]
    pub region: String,
    /// Path-style addressing (`<endpoint>/<bucket>/<key>`); the default when an
    /// endpoint is set, since most S3-compatible stores need it.
    #[serde(default)]
    pub path_style: Option<bool>,
    /// Static credentials; without them, the standard AWS chain (environment,
    /// profile, web identity, container and instance credentials).
    #[serde(default)]
    pub access_key_id: Option<String>,
    #[serde(default)]
    pub secret_access_key: Option<SecretString>,
    #[serde(default)]
    pub session_token: Option<SecretString>,
    /// The `eventSource` this store's notifications carry: `aws:s3` (AWS, and most
    /// S3-compatible stores) or `minio:s3` (MinIO). Polls use it, so an object that a
    /// notification and a poll both notice has one `source` and one id.
    #[serde(default = "default_event_source")]
    pub event_source: String,
    /// The `awsRegion` this store's notifications carry; `region` by default (MinIO
    /// sends an empty one unless its site region is set: then write `""`).
    #[serde(default)]
    pub event_region: Option<String>,
}

fn default_region() -> String {
    "us-east-1".to_owned()
}

fn default_event_source() -> String {
    "aws:s3".to_owned()
}

impl StoreConfig {
    /// Mistakes `validate` reports, as (field, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        if self.access_key_id.is_some() != self.secret_access_key.is_some() {
            problems.push((
                "access_key_id",
                "set both access_key_id and secret_access_key, or neither (then the standard AWS chain is used)".to_owned(),
            ));
        }
        if let Some(endpoint) = &self.endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            problems.push((
                "endpoint",
                format!("`{endpoint}` is not a URL like http://127.0.0.1:9000"),
            ));
        }
        if self.event_source.is_empty() {
            problems.push(("event_source", "must not be empty".to_owned()));
        }
        problems
    }

    /// The `awsRegion` part of the events' `source`.
    pub fn event_region(&self) -> &str {
        self.event_region.as_deref().unwrap_or(&self.region)
    }

    /// A client for this store. TLS is rustls with ring; requests time out after 30 s
    /// (listing pages and HEADs are small) and the SDK's standard retries apply.
    #[cfg(feature = "store")]
    pub async fn client(&self) -> aws_sdk_s3::Client {
        use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region, timeout::TimeoutConfig};
        use aws_smithy_http_client::tls;
        use std::time::Duration;
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http)
            .region(Region::new(self.region.clone()))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_attempt_timeout(Duration::from_secs(30))
                    .build(),
            );
        if let (Some(key), Some(secret)) = (&self.access_key_id, &self.secret_access_key) {
            loader = loader.credentials_provider(Credentials::new(
                key,
                secret.expose_secret(),
                self.session_token
                    .as_ref()
                    .map(|token| token.expose_secret().to_owned()),
                None,
                "switchyard-config",
            ));
        }
        let shared = loader.load().await;
        let mut builder = aws_sdk_s3::config::Builder::from(&shared);
        if let Some(endpoint) = &self.endpoint {
            builder = builder.endpoint_url(endpoint);
        }
        builder = builder.force_path_style(self.path_style.unwrap_or(self.endpoint.is_some()));
        aws_sdk_s3::Client::from_conf(builder.build())
    }
}
