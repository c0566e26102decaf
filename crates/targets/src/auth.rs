//! Credentials Switchyard presents to an `http` function, so the function can tell
//! its calls came from Switchyard: a bearer token, a token in a header of the
//! function's choosing, or an HMAC signature by the Standard Webhooks scheme
//! (<https://www.standardwebhooks.com/>), which libraries in many languages verify.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use reqwest::header::{HeaderName, HeaderValue};
use secrecy::{ExposeSecret as _, SecretString};
use serde::Deserialize;
use sha2::Sha256;

/// How calls to a function are authenticated.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "scheme", rename_all = "lowercase", deny_unknown_fields)]
pub enum FunctionAuth {
    /// `Authorization: Bearer <token>`.
    Bearer { token: SecretString },
    /// `<header>: <token>` (an API key header such as `X-Api-Key`).
    Header { header: String, token: SecretString },
    /// Standard Webhooks: `webhook-id`, `webhook-timestamp` (unix seconds) and
    /// `webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`,
    /// keyed with the base64 after `whsec_` in `secret`.
    Hmac { secret: SecretString },
}

impl FunctionAuth {
    /// What is wrong with the settings: `(field, message)`.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        match self {
            FunctionAuth::Bearer { token } | FunctionAuth::Header { token, .. } => {
                let token = token.expose_secret();
                if token.trim().is_empty() {
                    problems.push(("token", "must not be empty".to_owned()));
                } else if HeaderValue::from_str(token).is_err() {
                    problems.push(("token", "holds characters a header cannot carry".to_owned()));
                }
            }
            FunctionAuth::Hmac { secret } => {
                if let Err(problem) = key(secret) {
                    problems.push(("secret", problem));
                }
            }
        }
        if let FunctionAuth::Header { header, .. } = self
            && HeaderName::from_bytes(header.as_bytes()).is_err()
        {
            problems.push(("header", format!("`{header}` is not a header name")));
        }
        problems
    }

    /// The headers of one call whose message id is `id` and body `body`, at
    /// `now_unix` (seconds). Values are marked sensitive, so they are not logged.
    pub fn headers(&self, id: &str, body: &[u8], now_unix: i64) -> Vec<(HeaderName, HeaderValue)> {
        let sensitive = |text: &str| {
            let mut value = HeaderValue::from_str(text).ok()?;
            value.set_sensitive(true);
            Some(value)
        };
        match self {
            FunctionAuth::Bearer { token } => {
                sensitive(&format!("Bearer {}", token.expose_secret()))
                    .map(|value| vec![(reqwest::header::AUTHORIZATION, value)])
                    .unwrap_or_default()
            }
            FunctionAuth::Header { header, token } => {
                match (
                    HeaderName::from_bytes(header.as_bytes()),
                    sensitive(token.expose_secret()),
                ) {
                    (Ok(name), Some(value)) => vec![(name, value)],
                    _ => Vec::new(),
                }
            }
            FunctionAuth::Hmac { secret } => {
                let Ok(key) = key(secret) else {
                    return Vec::new();
                };
                // A header value cannot hold every id: the id is sent as it is when
                // it can be, else as its percent-encoding (signed as sent).
                let id = if HeaderValue::from_str(id).is_ok() && !id.is_empty() {
                    id.to_owned()
                } else {
                    percent_encoding::utf8_percent_encode(id, percent_encoding::NON_ALPHANUMERIC)
                        .to_string()
                };
                let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("any key length");
                mac.update(format!("{id}.{now_unix}.").as_bytes());
                mac.update(body);
                let signature =
                    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
                let mut headers = Vec::new();
                for (name, value) in [
                    ("webhook-id", id),
                    ("webhook-timestamp", now_unix.to_string()),
                    ("webhook-signature", format!("v1,{signature}")),
                ] {
                    if let Ok(value) = HeaderValue::from_str(&value) {
                        headers.push((HeaderName::from_static(name), value));
                    }
                }
                headers
            }
        }
    }

    /// [`FunctionAuth::headers`] now.
    pub fn headers_now(&self, id: &str, body: &[u8]) -> Vec<(HeaderName, HeaderValue)> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_secs() as i64);
        self.headers(id, body, now)
    }
}

/// The HMAC key of a `whsec_<base64>` secret.
fn key(secret: &SecretString) -> Result<Vec<u8>, String> {
    let text = secret.expose_secret().trim();
    let encoded = text.strip_prefix("whsec_").ok_or_else(|| {
        "must be `whsec_` and base64 (Standard Webhooks' form), e.g. whsec_$(openssl rand -base64 32)".to_owned()
    })?;
    let key = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| "the part after `whsec_` is not base64".to_owned())?;
    if key.len() < 24 {
        return Err(format!(
            "the key is {} bytes; use at least 24 (openssl rand -base64 32)",
            key.len()
        ));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks specification's test vectors: this
    /// secret, id, timestamp and body give this signature.
    #[test]
    fn signs_as_standard_webhooks_does() {
        let auth = FunctionAuth::Hmac {
            secret: SecretString::from("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
        };
        let headers = auth.headers(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            br#"{"test": 2432232314}"#,
            1614265330,
        );
        let value = |name: &str| {
            headers
                .iter()
                .find(|(header, _)| header == name)
                .map(|(_, value)| value.to_str().unwrap().to_owned())
        };
        assert_eq!(
            value("webhook-id").as_deref(),
            Some("msg_p5jXN8AQM9LWM0D4loKWxJek")
        );
        assert_eq!(value("webhook-timestamp").as_deref(), Some("1614265330"));
        assert_eq!(
            value("webhook-signature").as_deref(),
            Some("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=")
        );
    }

    #[test]
    fn bad_settings_are_reported() {
        let short = FunctionAuth::Hmac {
            secret: SecretString::from("whsec_c2hvcnQ="),
        };
        assert!(short.problems()[0].1.contains("at least 24"));
        let plain = FunctionAuth::Hmac {
            secret: SecretString::from("not-whsec"),
        };
        assert!(plain.problems()[0].1.contains("whsec_"));
        let header = FunctionAuth::Header {
            header: "bad header".to_owned(),
            token: SecretString::from(""),
        };
        let problems = header.problems();
        assert_eq!(problems.len(), 2, "{problems:?}");
    }

    #[test]
    fn header_values_are_sensitive() {
        let auth = FunctionAuth::Bearer {
            token: SecretString::from("t0k"),
        };
        let headers = auth.headers("id", b"", 0);
        assert!(headers[0].1.is_sensitive());
        assert!(!format!("{auth:?}").contains("t0k"));
    }
}
