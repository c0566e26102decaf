//! Amazon SNS HTTP(S) subscriptions: S3 notifications that reach Switchyard through
//! an SNS topic arrive wrapped in an SNS message, signed by SNS.
//!
//! Every SNS message is verified before anything in it is believed: its
//! `SigningCertURL` must be an HTTPS URL on `sns.<region>.amazonaws.com` (or one of
//! the configured prefixes, for a private SNS-compatible service or a test), the
//! certificate is fetched (and cached), and the RSA signature over the message's
//! canonical string is checked: SHA1 for `SignatureVersion` 1, SHA256 for 2, as
//! <https://docs.aws.amazon.com/sns/latest/dg/sns-verify-signature-of-message.html>
//! describes. Then:
//!
//! - `SubscriptionConfirmation`: the subscription is confirmed by fetching its
//!   `SubscribeURL` (same URL rule);
//! - `Notification`: its `Message` is the S3 notification;
//! - `UnsubscribeConfirmation`: logged, nothing else.
//!
//! The certificate's public key is read with `x509-cert` and the signature checked with
//! `ring` (already in the build for TLS).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use serde::Deserialize;
use x509_cert::der::{Decode, DecodePem};

/// An SNS message as SNS POSTs it (`x-amz-sns-message-type` header, JSON body).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct SnsMessage {
    #[serde(rename = "Type")]
    pub kind: String,
    pub message_id: String,
    pub topic_arn: String,
    #[serde(default)]
    pub subject: Option<String>,
    pub message: String,
    pub timestamp: String,
    pub signature_version: String,
    pub signature: String,
    #[serde(rename = "SigningCertURL")]
    pub signing_cert_url: String,
    #[serde(rename = "SubscribeURL", default)]
    pub subscribe_url: Option<String>,
    #[serde(default)]
    pub token: Option<String>,
}

/// Why an SNS message was refused.
#[derive(Debug, thiserror::Error)]
pub enum SnsError {
    #[error("not an SNS message: {0}")]
    Json(#[from] serde_json::Error),
    #[error("topic `{0}` is not one of this hook's sns_topics")]
    Topic(String),
    #[error("{0} `{1}` is not trusted: it must be https://sns.<region>.amazonaws.com/...")]
    UntrustedUrl(&'static str, String),
    #[error("fetching the signing certificate failed: {0}")]
    Certificate(String),
    #[error("unsupported SignatureVersion `{0}` (1 and 2 are)")]
    Version(String),
    #[error("the signature does not match the message")]
    Signature,
    #[error("unknown SNS message type `{0}`")]
    Kind(String),
    #[error("confirming the subscription failed: {0}")]
    Confirm(String),
}

/// Checks and confirms SNS messages for one hook; caches signing certificates.
pub struct SnsVerifier {
    topics: Vec<String>,
    url_prefixes: Vec<String>,
    client: reqwest::Client,
    /// Certificate URL -> the RSA public key (DER `RSAPublicKey`) and when it was last
    /// used; the least recently used goes when [`MAX_KEYS`] are kept.
    keys: Mutex<HashMap<String, (Vec<u8>, Instant)>>,
    fetches: Mutex<Fetches>,
}

/// How long a certificate URL that could not be fetched or read is not tried again:
/// shorter than SNS's retry interval (20 s by default), so a passing network failure
/// does not outlast SNS's retries.
pub const FAILED_FETCH_RETRY: Duration = Duration::from_secs(15);
/// Failed certificate fetches per minute at most, per hook: a sender cannot make
/// Switchyard fetch made-up URLs on every request. Fetches that succeed are cached and
/// not counted (SNS signs with one certificate for months).
pub const FAILED_FETCHES_PER_MINUTE: usize = 10;
/// Signing keys kept per hook.
pub const MAX_KEYS: usize = 64;

/// Recent failed certificate fetches and the URLs that failed.
#[derive(Default)]
struct Fetches {
    recent_failures: VecDeque<Instant>,
    failed: HashMap<String, (Instant, String)>,
}

impl Fetches {
    /// Whether `url` may be fetched now; counts the fetch if so.
    fn allow(&mut self, url: &str, now: Instant) -> Result<(), String> {
        if let Some((at, reason)) = self.failed.get(url) {
            let since = now.duration_since(*at);
            if since < FAILED_FETCH_RETRY {
                return Err(format!(
                    "fetching it failed {}s ago ({reason}); tried again {}s after that",
                    since.as_secs(),
                    FAILED_FETCH_RETRY.as_secs()
                ));
            }
        }
        while self
            .recent_failures
            .front()
            .is_some_and(|at| now.duration_since(*at) >= Duration::from_secs(60))
        {
            self.recent_failures.pop_front();
        }
        if self.recent_failures.len() >= FAILED_FETCHES_PER_MINUTE {
            return Err(format!(
                "{FAILED_FETCHES_PER_MINUTE} certificate fetches failed in the last minute; no new one until it passes"
            ));
        }
        Ok(())
    }

    fn failed(&mut self, url: &str, reason: &str, now: Instant) {
        self.recent_failures.push_back(now);
        if self.failed.len() >= 256 {
            self.failed
                .retain(|_, (at, _)| now.duration_since(*at) < FAILED_FETCH_RETRY);
            if self.failed.len() >= 256 {
                self.failed.clear();
            }
        }
        self.failed.insert(url.to_owned(), (now, reason.to_owned()));
    }
}

/// Whether `url` is under `prefix`: same scheme, host and port, and a path that
/// starts with the prefix's path (compared parsed, so `https://sns.example.com` does
/// not admit `https://sns.example.com.evil.net/` or `https://sns.example.com@evil/`).
fn under_prefix(url: &str, prefix: &str) -> bool {
    let (Ok(url), Ok(prefix)) = (reqwest::Url::parse(url), reqwest::Url::parse(prefix)) else {
        return false;
    };
    url.scheme() == prefix.scheme()
        && url.host_str() == prefix.host_str()
        && url.port_or_known_default() == prefix.port_or_known_default()
        && url.username().is_empty()
        && url.path().starts_with(prefix.path())
}

/// Whether a body looks like an SNS message (whatever its headers say).
pub fn looks_like_sns(body: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Probe {
        #[serde(rename = "Type")]
        kind: Option<String>,
        #[serde(rename = "TopicArn")]
        topic: Option<String>,
    }
    serde_json::from_slice::<Probe>(body)
        .is_ok_and(|probe| probe.kind.is_some() && probe.topic.is_some())
}

/// Whether `url` is an SNS endpoint: `https://sns.<region>.amazonaws.com[.cn]/...`.
fn is_aws_sns_url(url: &str) -> bool {
    let Ok(url) = reqwest::Url::parse(url) else {
        return false;
    };
    let Some(host) = url.host_str() else {
        return false;
    };
    let region = host
        .strip_prefix("sns.")
        .and_then(|rest| {
            rest.strip_suffix(".amazonaws.com")
                .or_else(|| rest.strip_suffix(".amazonaws.com.cn"))
        })
        .unwrap_or_default();
    url.scheme() == "https"
        && url.port().is_none()
        && !region.is_empty()
        && region.chars().all(|character| {
            character.is_ascii_lowercase() || character.is_ascii_digit() || character == '-'
        })
}

/// Whether an AWS `SigningCertURL` has the shape SNS gives it:
/// `/SimpleNotificationService-<hex>.pem`, no query.
fn is_aws_certificate_path(url: &str) -> bool {
    let Ok(url) = reqwest::Url::parse(url) else {
        return false;
    };
    url.query().is_none()
        && url
            .path()
            .strip_prefix("/SimpleNotificationService-")
            .and_then(|rest| rest.strip_suffix(".pem"))
            .is_some_and(|hex| !hex.is_empty() && hex.chars().all(|c| c.is_ascii_hexdigit()))
}

impl SnsVerifier {
    /// `topics`: accepted topic ARNs (SNS messages are refused when empty: any AWS
    /// account could otherwise subscribe its own topic, and its messages would be
    /// validly signed). `url_prefixes`: URLs trusted for certificates and subscription
    /// confirmation instead of AWS's.
    pub fn new(
        topics: Vec<String>,
        url_prefixes: Vec<String>,
        client: reqwest::Client,
    ) -> SnsVerifier {
        SnsVerifier {
            topics,
            url_prefixes,
            client,
            keys: Mutex::new(HashMap::new()),
            fetches: Mutex::new(Fetches::default()),
        }
    }

    fn trusted(&self, url: &str) -> bool {
        if self.url_prefixes.is_empty() {
            is_aws_sns_url(url)
        } else {
            self.url_prefixes
                .iter()
                .any(|prefix| under_prefix(url, prefix))
        }
    }

    /// Whether this hook accepts SNS at all: only for the topics it names.
    pub fn accepts_sns(&self) -> bool {
        !self.topics.is_empty()
    }

    /// Parses and verifies an SNS message.
    pub async fn verify(&self, body: &[u8]) -> Result<SnsMessage, SnsError> {
        let message: SnsMessage = serde_json::from_slice(body)?;
        if !self.topics.contains(&message.topic_arn) {
            return Err(SnsError::Topic(message.topic_arn));
        }
        if !self.trusted(&message.signing_cert_url)
            || (self.url_prefixes.is_empty() && !is_aws_certificate_path(&message.signing_cert_url))
        {
            return Err(SnsError::UntrustedUrl(
                "SigningCertURL",
                message.signing_cert_url,
            ));
        }
        let algorithm: &'static dyn ring::signature::VerificationAlgorithm =
            match message.signature_version.as_str() {
                "1" => &ring::signature::RSA_PKCS1_2048_8192_SHA1_FOR_LEGACY_USE_ONLY,
                "2" => &ring::signature::RSA_PKCS1_2048_8192_SHA256,
                other => return Err(SnsError::Version(other.to_owned())),
            };
        let signature = base64::engine::general_purpose::STANDARD
            .decode(message.signature.trim())
            .map_err(|_| SnsError::Signature)?;
        let key = self.public_key(&message.signing_cert_url).await?;
        ring::signature::UnparsedPublicKey::new(algorithm, &key)
            .verify(string_to_sign(&message)?.as_bytes(), &signature)
            .map_err(|_| SnsError::Signature)?;
        Ok(message)
    }

    async fn public_key(&self, url: &str) -> Result<Vec<u8>, SnsError> {
        if let Some((key, used)) = self.keys.lock().expect("key cache").get_mut(url) {
            *used = Instant::now();
            return Ok(key.clone());
        }
        self.fetches
            .lock()
            .expect("fetches")
            .allow(url, Instant::now())
            .map_err(|reason| SnsError::Certificate(format!("`{url}`: {reason}")))?;
        let fetched = async {
            let response = self
                .client
                .get(url)
                .send()
                .await
                .and_then(reqwest::Response::error_for_status)
                .map_err(|error| error.to_string())?;
            let pem = response.bytes().await.map_err(|error| error.to_string())?;
            rsa_public_key(&pem)
        }
        .await;
        let key = match fetched {
            Ok(key) => key,
            Err(reason) => {
                self.fetches
                    .lock()
                    .expect("fetches")
                    .failed(url, &reason, Instant::now());
                return Err(SnsError::Certificate(reason));
            }
        };
        let mut keys = self.keys.lock().expect("key cache");
        if keys.len() >= MAX_KEYS
            && let Some(oldest) = keys
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(url, _)| url.clone())
        {
            keys.remove(&oldest);
        }
        keys.insert(url.to_owned(), (key.clone(), Instant::now()));
        Ok(key)
    }

    /// Confirms a verified `SubscriptionConfirmation` by fetching its `SubscribeURL`.
    pub async fn confirm(&self, message: &SnsMessage) -> Result<(), SnsError> {
        let url = message
            .subscribe_url
            .as_deref()
            .ok_or_else(|| SnsError::Confirm("the message has no SubscribeURL".to_owned()))?;
        if !self.trusted(url) {
            return Err(SnsError::UntrustedUrl("SubscribeURL", url.to_owned()));
        }
        self.client
            .get(url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map(|_| ())
            .map_err(|error| SnsError::Confirm(error.to_string()))
    }
}

/// The RSA public key (DER `RSAPublicKey`, what ring takes) of a PEM certificate.
pub fn rsa_public_key(pem: &[u8]) -> Result<Vec<u8>, String> {
    let certificate = x509_cert::Certificate::from_pem(pem)
        .or_else(|_| x509_cert::Certificate::from_der(pem))
        .map_err(|error| format!("not an X.509 certificate: {error}"))?;
    let key = &certificate
        .tbs_certificate
        .subject_public_key_info
        .subject_public_key;
    key.as_bytes()
        .map(<[u8]>::to_vec)
        .ok_or_else(|| "the certificate's public key is not a whole number of bytes".to_owned())
}

/// The canonical string SNS signs, per message type.
pub fn string_to_sign(message: &SnsMessage) -> Result<String, SnsError> {
    let mut text = String::new();
    let mut field = |name: &str, value: &str| {
        text.push_str(name);
        text.push('\n');
        text.push_str(value);
        text.push('\n');
    };
    match message.kind.as_str() {
        "Notification" => {
            field("Message", &message.message);
            field("MessageId", &message.message_id);
            if let Some(subject) = &message.subject {
                field("Subject", subject);
            }
            field("Timestamp", &message.timestamp);
            field("TopicArn", &message.topic_arn);
            field("Type", &message.kind);
        }
        "SubscriptionConfirmation" | "UnsubscribeConfirmation" => {
            field("Message", &message.message);
            field("MessageId", &message.message_id);
            field(
                "SubscribeURL",
                message.subscribe_url.as_deref().unwrap_or_default(),
            );
            field("Timestamp", &message.timestamp);
            field("Token", message.token.as_deref().unwrap_or_default());
            field("TopicArn", &message.topic_arn);
            field("Type", &message.kind);
        }
        other => return Err(SnsError::Kind(other.to_owned())),
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_fetches_are_bounded_and_failures_remembered() {
        let mut fetches = Fetches::default();
        let start = Instant::now();
        assert!(fetches.allow("https://a/1.pem", start).is_ok());
        fetches.failed("https://a/1.pem", "404 Not Found", start);
        // A failed URL is not fetched again for a while, then it is.
        let refused = fetches
            .allow("https://a/1.pem", start + Duration::from_secs(10))
            .unwrap_err();
        assert!(refused.contains("404 Not Found"), "{refused}");
        // Failures of other URLs: at most FAILED_FETCHES_PER_MINUTE in any minute,
        // then no new URL is fetched until the minute passes.
        for index in 2..=FAILED_FETCHES_PER_MINUTE {
            let url = format!("https://a/{index}.pem");
            assert!(fetches.allow(&url, start).is_ok());
            fetches.failed(&url, "404", start);
        }
        let refused = fetches
            .allow("https://a/new.pem", start + Duration::from_secs(59))
            .unwrap_err();
        assert!(refused.contains("in the last minute"), "{refused}");
        assert!(
            fetches
                .allow("https://a/new.pem", start + Duration::from_secs(60))
                .is_ok()
        );
        assert!(
            fetches
                .allow("https://a/1.pem", start + FAILED_FETCH_RETRY)
                .is_ok()
        );
    }

    #[test]
    fn aws_certificate_urls_have_sns_shape() {
        assert!(is_aws_certificate_path(
            "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-9c6465fa7f48f5cacd23014631ec1136.pem"
        ));
        for url in [
            "https://sns.us-east-1.amazonaws.com/x.pem",
            "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-zz.pem",
            "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-ab.pem?x=1",
            "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-.pem",
        ] {
            assert!(!is_aws_certificate_path(url), "{url}");
        }
    }

    #[test]
    fn only_https_sns_endpoints_are_trusted_by_default() {
        assert!(is_aws_sns_url(
            "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-abc.pem"
        ));
        assert!(is_aws_sns_url(
            "https://sns.cn-north-1.amazonaws.com.cn/x.pem"
        ));
        assert!(!is_aws_sns_url("http://sns.us-east-1.amazonaws.com/x.pem"));
        assert!(!is_aws_sns_url(
            "https://sns.us-east-1.amazonaws.com.evil.example/x.pem"
        ));
        assert!(!is_aws_sns_url(
            "https://evil.example/sns.us-east-1.amazonaws.com/x.pem"
        ));
        assert!(!is_aws_sns_url("https://sns..amazonaws.com/x.pem"));
        assert!(!is_aws_sns_url(
            "https://sns.us-east-1.amazonaws.com:8443/x.pem"
        ));
    }

    #[test]
    fn configured_prefixes_are_compared_parsed() {
        let prefix = "https://sns.example.com/certs/";
        assert!(under_prefix("https://sns.example.com/certs/a.pem", prefix));
        assert!(!under_prefix(
            "https://sns.example.com.evil.net/certs/a.pem",
            prefix
        ));
        assert!(!under_prefix(
            "https://sns.example.com@evil.net/certs/a.pem",
            prefix
        ));
        assert!(!under_prefix("http://sns.example.com/certs/a.pem", prefix));
        assert!(!under_prefix(
            "https://sns.example.com:8443/certs/a.pem",
            prefix
        ));
        assert!(!under_prefix("https://sns.example.com/other/a.pem", prefix));
        assert!(looks_like_sns(
            br#"{"Type":"Notification","TopicArn":"arn:x","Message":"{}"}"#
        ));
        assert!(!looks_like_sns(br#"{"Records":[]}"#));
    }

    #[test]
    fn the_canonical_strings_follow_the_documented_order() {
        let message = SnsMessage {
            kind: "Notification".to_owned(),
            message_id: "m1".to_owned(),
            topic_arn: "arn:aws:sns:us-east-1:1:t".to_owned(),
            subject: None,
            message: "hello".to_owned(),
            timestamp: "2026-11-27T10:00:00.000Z".to_owned(),
            signature_version: "1".to_owned(),
            signature: String::new(),
            signing_cert_url: String::new(),
            subscribe_url: None,
            token: None,
        };
        assert_eq!(
            string_to_sign(&message).unwrap(),
            "Message\nhello\nMessageId\nm1\nTimestamp\n2026-11-27T10:00:00.000Z\nTopicArn\narn:aws:sns:us-east-1:1:t\nType\nNotification\n"
        );
        let confirmation = SnsMessage {
            kind: "SubscriptionConfirmation".to_owned(),
            subscribe_url: Some(
                "https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription".to_owned(),
            ),
            token: Some("tok".to_owned()),
            ..message
        };
        assert_eq!(
            string_to_sign(&confirmation).unwrap(),
            "Message\nhello\nMessageId\nm1\nSubscribeURL\nhttps://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription\nTimestamp\n2026-11-27T10:00:00.000Z\nToken\ntok\nTopicArn\narn:aws:sns:us-east-1:1:t\nType\nSubscriptionConfirmation\n"
        );
    }
}
