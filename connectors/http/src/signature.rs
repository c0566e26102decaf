//! Webhook authentication: bearer tokens and HMAC-SHA256 signatures, compared in
//! constant time.

use axum::http::HeaderMap;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret as _, SecretString};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::config::{SignatureConfig, SignatureEncoding};

/// Why a request was not authenticated. `Missing` answers 401, the rest 403.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing {0}")]
    Missing(String),
    #[error("{0}")]
    Invalid(String),
}

/// Checks `Authorization: Bearer <token>` against every accepted token (each
/// compared in constant time, all of them compared).
pub fn check_bearer(headers: &HeaderMap, accepted: &[&SecretString]) -> Result<(), AuthError> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .ok_or_else(|| AuthError::Missing("authorization header with a bearer token".to_owned()))?;
    // The scheme name is case-insensitive (RFC 9110 section 11.1): `bearer x` too.
    let token = value
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim_start_matches(' '))
        .ok_or_else(|| {
            AuthError::Invalid("authorization header is not a bearer token".to_owned())
        })?;
    let matched = accepted.iter().fold(false, |matched, expected| {
        matched | bool::from(token.as_bytes().ct_eq(expected.expose_secret().as_bytes()))
    });
    if matched {
        Ok(())
    } else {
        Err(AuthError::Invalid("bearer token is not valid".to_owned()))
    }
}

fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Result<&'a str, AuthError> {
    headers
        .get(name)
        .and_then(|value| value.to_str().ok())
        .ok_or_else(|| AuthError::Missing(format!("signature header `{name}`")))
}

fn mac(secret: &SecretString) -> Hmac<Sha256> {
    Hmac::<Sha256>::new_from_slice(secret.expose_secret().as_bytes())
        .expect("hmac accepts keys of any length")
}

/// Checks a request's signature. `now_unix` is the current time in unix seconds.
pub fn check_signature(
    config: &SignatureConfig,
    headers: &HeaderMap,
    body: &[u8],
    now_unix: i64,
) -> Result<(), AuthError> {
    match config {
        SignatureConfig::Github { secret } => {
            let value = header_text(headers, "x-hub-signature-256")?;
            let hex_digest = value.strip_prefix("sha256=").ok_or_else(|| {
                AuthError::Invalid("x-hub-signature-256 must start with `sha256=`".to_owned())
            })?;
            let expected = hex::decode(hex_digest)
                .map_err(|_| AuthError::Invalid("x-hub-signature-256 is not hex".to_owned()))?;
            let mut mac = mac(secret);
            mac.update(body);
            mac.verify_slice(&expected)
                .map_err(|_| AuthError::Invalid("signature does not match the body".to_owned()))
        }
        SignatureConfig::Hmac {
            secret,
            header,
            prefix,
            encoding,
            timestamp_header,
            tolerance,
        } => {
            let value = header_text(headers, header)?;
            let encoded = match prefix {
                Some(prefix) => value.strip_prefix(prefix.as_str()).ok_or_else(|| {
                    AuthError::Invalid(format!("`{header}` must start with `{prefix}`"))
                })?,
                None => value,
            };
            let expected = match encoding {
                SignatureEncoding::Hex => hex::decode(encoded).ok(),
                SignatureEncoding::Base64 => base64::engine::general_purpose::STANDARD
                    .decode(encoded)
                    .ok(),
            }
            .ok_or_else(|| {
                AuthError::Invalid(format!("`{header}` is not valid {encoding:?}").to_lowercase())
            })?;
            let mut mac = mac(secret);
            if let Some(timestamp_header) = timestamp_header {
                let timestamp_text = headers
                    .get(timestamp_header.as_str())
                    .and_then(|value| value.to_str().ok())
                    .ok_or_else(|| {
                        AuthError::Missing(format!("timestamp header `{timestamp_header}`"))
                    })?;
                let timestamp: i64 = timestamp_text.trim().parse().map_err(|_| {
                    AuthError::Invalid(format!(
                        "`{timestamp_header}` is not a unix timestamp in seconds"
                    ))
                })?;
                let skew = now_unix.abs_diff(timestamp);
                if skew > tolerance.as_secs() {
                    return Err(AuthError::Invalid(format!(
                        "timestamp is {skew}s away from now, outside the {}s tolerance",
                        tolerance.as_secs()
                    )));
                }
                mac.update(timestamp_text.trim().as_bytes());
                mac.update(b".");
            }
            mac.update(body);
            mac.verify_slice(&expected)
                .map_err(|_| AuthError::Invalid("signature does not match the body".to_owned()))
        }
    }
}

/// Computes a hex HMAC-SHA256, as a sender would.
#[cfg(test)]
fn hmac_sha256_hex(secret: &str, message: &[u8]) -> String {
    let mut mac = mac(&SecretString::from(secret));
    mac.update(message);
    hex::encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn headers(pairs: &[(&'static str, String)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().unwrap());
        }
        map
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        let accepted = SecretString::from("t0k");
        for value in ["Bearer t0k", "bearer t0k", "BEARER t0k", "Bearer  t0k"] {
            assert_eq!(
                check_bearer(
                    &headers(&[("authorization", value.to_owned())]),
                    &[&accepted]
                ),
                Ok(()),
                "{value}"
            );
        }
        for value in ["Basic t0k", "Bearert0k", "Bearer other"] {
            assert!(
                check_bearer(
                    &headers(&[("authorization", value.to_owned())]),
                    &[&accepted]
                )
                .is_err(),
                "{value}"
            );
        }
    }

    #[test]
    fn any_of_several_tokens_is_accepted() {
        let old = SecretString::from("old-token");
        let new = SecretString::from("new-token");
        for token in ["old-token", "new-token"] {
            let request = headers(&[("authorization", format!("Bearer {token}"))]);
            assert_eq!(check_bearer(&request, &[&old, &new]), Ok(()), "{token}");
        }
        let request = headers(&[("authorization", "Bearer other".to_owned())]);
        assert!(check_bearer(&request, &[&old, &new]).is_err());
        // No accepted token: nothing passes.
        let request = headers(&[("authorization", "Bearer ".to_owned())]);
        assert!(check_bearer(&request, &[]).is_err());
    }

    #[test]
    fn github_signature() {
        let config = SignatureConfig::Github {
            secret: "s3cret".into(),
        };
        let body = b"{\"zen\":\"hi\"}";
        let good = format!("sha256={}", hmac_sha256_hex("s3cret", body));
        assert_eq!(
            check_signature(
                &config,
                &headers(&[("x-hub-signature-256", good.clone())]),
                body,
                0
            ),
            Ok(())
        );
        assert!(matches!(
            check_signature(
                &config,
                &headers(&[("x-hub-signature-256", good)]),
                b"tampered",
                0
            ),
            Err(AuthError::Invalid(_))
        ));
        assert!(matches!(
            check_signature(&config, &HeaderMap::new(), body, 0),
            Err(AuthError::Missing(_))
        ));
    }

    #[test]
    fn timestamped_signature_refuses_stale_requests() {
        let config = SignatureConfig::Hmac {
            secret: "k".into(),
            header: "x-signature".into(),
            prefix: Some("v1=".into()),
            encoding: SignatureEncoding::Hex,
            timestamp_header: Some("x-timestamp".into()),
            tolerance: Duration::from_secs(300),
        };
        let body = b"payload";
        let signed = |ts: i64| {
            format!(
                "v1={}",
                hmac_sha256_hex("k", format!("{ts}.payload").as_bytes())
            )
        };
        let now = 1_700_000_000;
        let fresh = headers(&[
            ("x-signature", signed(now - 10)),
            ("x-timestamp", (now - 10).to_string()),
        ]);
        assert_eq!(check_signature(&config, &fresh, body, now), Ok(()));
        let stale = headers(&[
            ("x-signature", signed(now - 301)),
            ("x-timestamp", (now - 301).to_string()),
        ]);
        let error = check_signature(&config, &stale, body, now).unwrap_err();
        assert!(
            error.to_string().contains("outside the 300s tolerance"),
            "{error}"
        );
        // A valid signature for another timestamp does not pass with a fresh timestamp.
        let swapped = headers(&[
            ("x-signature", signed(now - 400)),
            ("x-timestamp", now.to_string()),
        ]);
        assert!(check_signature(&config, &swapped, body, now).is_err());
    }
}
