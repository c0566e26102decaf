//! Checking AWS Signature Version 4 on requests to the Invoke API, so AWS's own
//! clients (boto3, the AWS CLI, any SDK) authenticate with an access key Switchyard
//! knows, as they would with Lambda.
//!
//! The signature is recomputed from the request as the client described it (its
//! `SignedHeaders`, its scope's date, region and service) with the secret of the
//! access key it names, and compared in constant time. AWS's `aws-sigv4` crate
//! signs outgoing requests and chooses which headers to sign itself; verifying needs
//! exactly the client's list, so the canonical request is rebuilt here (the
//! algorithm is AWS's, documented in "Create a canonical request for Signature
//! Version 4").

use std::collections::HashMap;

use axum::http::{HeaderMap, Method, Uri};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// How far a request's `X-Amz-Date` may be from now (AWS's limit).
const MAX_SKEW: time::Duration = time::Duration::minutes(15);

/// Why a request was refused, in the words (`x-amzn-ErrorType`) AWS uses.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub error_type: &'static str,
    pub message: String,
}

fn refuse(error_type: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        error_type,
        message: message.into(),
    }
}

/// The access keys requests may be signed with (access key id to secret), for one
/// service (`lambda`).
#[derive(Clone)]
pub struct Keys {
    keys: HashMap<String, String>,
    service: &'static str,
}

impl Keys {
    pub fn new(keys: impl IntoIterator<Item = (String, String)>) -> Self {
        Keys {
            keys: keys.into_iter().collect(),
            service: "lambda",
        }
    }

    /// For signatures scoped to another service (AWS's published examples).
    pub fn for_service(mut self, service: &'static str) -> Self {
        self.service = service;
        self
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// What can be checked before the body is read (the `Authorization` header, the
    /// key, the time, what is signed): refusing here spares reading a body for a
    /// request that cannot be served.
    pub fn precheck(&self, headers: &HeaderMap, now: time::OffsetDateTime) -> Result<(), Refusal> {
        self.parse(headers, now).map(|_| ())
    }

    /// Checks the request's signature; `now` is the current time.
    pub fn verify(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: &[u8],
        now: time::OffsetDateTime,
    ) -> Result<(), Refusal> {
        let signed = self.parse(headers, now)?;
        let mut canonical_headers = String::new();
        for name in &signed.headers {
            let values: Vec<String> = headers
                .get_all(*name)
                .iter()
                .map(|value| {
                    String::from_utf8_lossy(value.as_bytes())
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .collect();
            canonical_headers.push_str(name);
            canonical_headers.push(':');
            canonical_headers.push_str(&values.join(","));
            canonical_headers.push('\n');
        }
        let payload_hash = hex::encode(Sha256::digest(body));
        if let Some(given) = headers
            .get("x-amz-content-sha256")
            .and_then(|value| value.to_str().ok())
            && given != payload_hash
        {
            return Err(refuse(
                "InvalidSignatureException",
                "X-Amz-Content-Sha256 does not match the body",
            ));
        }
        let canonical_request = format!(
            "{method}\n{path}\n{query}\n{canonical_headers}\n{signed_headers}\n{payload_hash}",
            path = canonical_path(uri.path()),
            query = canonical_query(uri.query().unwrap_or_default()),
            signed_headers = signed.headers.join(";"),
        );
        let string_to_sign = format!(
            "AWS4-HMAC-SHA256\n{}\n{}\n{}",
            signed.amz_date,
            signed.scope,
            hex::encode(Sha256::digest(canonical_request.as_bytes()))
        );
        let mut key = hmac(
            format!("AWS4{}", signed.secret).as_bytes(),
            signed.date.as_bytes(),
        );
        for part in [signed.region, signed.service, "aws4_request"] {
            key = hmac(&key, part.as_bytes());
        }
        let expected = hex::encode(hmac(&key, string_to_sign.as_bytes()));
        if bool::from(expected.as_bytes().ct_eq(signed.signature.as_bytes())) {
            Ok(())
        } else {
            Err(refuse(
                "InvalidSignatureException",
                "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method.",
            ))
        }
    }

    fn parse<'a>(
        &'a self,
        headers: &'a HeaderMap,
        now: time::OffsetDateTime,
    ) -> Result<Signed<'a>, Refusal> {
        let authorization = headers
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .ok_or_else(|| {
                refuse(
                    "MissingAuthenticationTokenException",
                    "Missing Authentication Token: sign the request with Signature Version 4",
                )
            })?;
        let fields = authorization
            .strip_prefix("AWS4-HMAC-SHA256 ")
            .ok_or_else(|| {
                refuse(
                    "IncompleteSignatureException",
                    "the Authorization header is not AWS4-HMAC-SHA256",
                )
            })?;
        let mut credential = None;
        let mut signed_headers = None;
        let mut signature = None;
        for field in fields.split(',') {
            let field = field.trim();
            if let Some(value) = field.strip_prefix("Credential=") {
                credential = Some(value);
            } else if let Some(value) = field.strip_prefix("SignedHeaders=") {
                signed_headers = Some(value);
            } else if let Some(value) = field.strip_prefix("Signature=") {
                signature = Some(value);
            }
        }
        let (Some(credential), Some(signed_headers), Some(signature)) =
            (credential, signed_headers, signature)
        else {
            return Err(refuse(
                "IncompleteSignatureException",
                "the Authorization header needs Credential, SignedHeaders and Signature",
            ));
        };
        // `<access key id>/<date>/<region>/<service>/aws4_request`
        let (access_key, scope) = credential.split_once('/').unwrap_or((credential, ""));
        let parts: Vec<&str> = scope.split('/').collect();
        let [date, region, service, "aws4_request"] = parts[..] else {
            return Err(refuse(
                "IncompleteSignatureException",
                format!(
                    "the credential scope `{scope}` is not <date>/<region>/<service>/aws4_request"
                ),
            ));
        };
        if service != self.service {
            return Err(refuse(
                "InvalidSignatureException",
                format!(
                    "the signature is scoped to service `{service}`, not `{}`",
                    self.service
                ),
            ));
        }
        let Some(secret) = self.keys.get(access_key) else {
            return Err(refuse(
                "UnrecognizedClientException",
                "The security token included in the request is invalid.",
            ));
        };
        if headers.contains_key("x-amz-security-token") {
            return Err(refuse(
                "UnrecognizedClientException",
                "session credentials (X-Amz-Security-Token) are not accepted: sign with one of invoke_api.credentials",
            ));
        }
        if headers
            .get("x-amz-content-sha256")
            .is_some_and(|value| value.as_bytes().starts_with(b"UNSIGNED-PAYLOAD"))
        {
            return Err(refuse(
                "InvalidSignatureException",
                "an unsigned payload is not accepted: sign the body",
            ));
        }
        let amz_date = headers
            .get("x-amz-date")
            .and_then(|value| value.to_str().ok())
            .ok_or_else(|| refuse("IncompleteSignatureException", "X-Amz-Date is missing"))?;
        let signed_at = parse_amz_date(amz_date).ok_or_else(|| {
            refuse(
                "IncompleteSignatureException",
                format!("X-Amz-Date `{amz_date}` is not <yyyymmdd>T<hhmmss>Z"),
            )
        })?;
        if (now - signed_at).abs() > MAX_SKEW {
            return Err(refuse(
                "InvalidSignatureException",
                "Signature expired: the request's X-Amz-Date is more than 15 minutes from now",
            ));
        }
        if amz_date.get(..8) != Some(date) {
            return Err(refuse(
                "InvalidSignatureException",
                "the credential scope's date is not the request's",
            ));
        }
        let names: Vec<&str> = signed_headers.split(';').collect();
        // What the request says must be what was signed: the host, the time and
        // every `x-amz-*` header (the invocation type, the log type, the client
        // context).
        for required in ["host", "x-amz-date"] {
            if !names.contains(&required) {
                return Err(refuse(
                    "InvalidSignatureException",
                    format!("the signature does not cover the `{required}` header"),
                ));
            }
        }
        if let Some(unsigned) = headers.keys().find(|name| {
            name.as_str().starts_with("x-amz-")
                && name.as_str() != "x-amz-content-sha256"
                && !names.contains(&name.as_str())
        }) {
            return Err(refuse(
                "InvalidSignatureException",
                format!("the signature does not cover the `{unsigned}` header"),
            ));
        }
        Ok(Signed {
            secret,
            scope,
            date,
            region,
            service,
            headers: names,
            signature,
            amz_date,
        })
    }
}

/// What a request's `Authorization` header and time say, once checked.
struct Signed<'a> {
    secret: &'a str,
    scope: &'a str,
    date: &'a str,
    region: &'a str,
    service: &'a str,
    headers: Vec<&'a str>,
    signature: &'a str,
    amz_date: &'a str,
}

/// `20150830T123600Z` as a time.
fn parse_amz_date(text: &str) -> Option<time::OffsetDateTime> {
    let bytes = text.as_bytes();
    if bytes.len() != 16 || bytes[8] != b'T' || bytes[15] != b'Z' {
        return None;
    }
    let number = |range: std::ops::Range<usize>| text.get(range)?.parse::<u32>().ok();
    let date = time::Date::from_calendar_date(
        number(0..4)? as i32,
        time::Month::try_from(number(4..6)? as u8).ok()?,
        number(6..8)? as u8,
    )
    .ok()?;
    let clock = time::Time::from_hms(
        number(9..11)? as u8,
        number(11..13)? as u8,
        number(13..15)? as u8,
    )
    .ok()?;
    Some(time::PrimitiveDateTime::new(date, clock).assume_utc())
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("hmac takes keys of any length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// URI-encodes as SigV4 does: unreserved characters kept, everything else `%XX`.
fn uri_encode(text: &str, keep_slash: bool) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                encoded.push(byte as char)
            }
            b'/' if keep_slash => encoded.push('/'),
            _ => encoded.push_str(&format!("%{byte:02X}")),
        }
    }
    encoded
}

/// The canonical URI of services other than S3: the path as sent, encoded again.
fn canonical_path(path: &str) -> String {
    if path.is_empty() {
        "/".to_owned()
    } else {
        uri_encode(path, true)
    }
}

/// The canonical query string: parameters decoded, encoded, sorted.
fn canonical_query(query: &str) -> String {
    let mut pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |text: &str| {
                percent_encoding::percent_decode_str(text)
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (
                uri_encode(&decode(name), false),
                uri_encode(&decode(value), false),
            )
        })
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(name, value)| format!("{name}={value}"))
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// AWS's documented example ("GET https://iam.amazonaws.com/?Action=ListUsers
    /// &Version=2010-05-08", key AKIDEXAMPLE), whose signature is published.
    #[test]
    fn the_documented_example_verifies_and_a_changed_request_does_not() {
        let keys = Keys::new([(
            "AKIDEXAMPLE".to_owned(),
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".to_owned(),
        )])
        .for_service("iam");
        let mut headers = HeaderMap::new();
        headers.insert("host", "iam.amazonaws.com".parse().unwrap());
        headers.insert(
            "content-type",
            "application/x-www-form-urlencoded; charset=utf-8"
                .parse()
                .unwrap(),
        );
        headers.insert("x-amz-date", "20150830T123600Z".parse().unwrap());
        headers.insert("authorization", "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/iam/aws4_request, SignedHeaders=content-type;host;x-amz-date, Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7".parse().unwrap());
        let uri: Uri = "/?Action=ListUsers&Version=2010-05-08".parse().unwrap();
        let at = parse_amz_date("20150830T124000Z").unwrap();
        assert_eq!(keys.verify(&Method::GET, &uri, &headers, b"", at), Ok(()));
        let other: Uri = "/?Action=DeleteUsers&Version=2010-05-08".parse().unwrap();
        assert_eq!(
            keys.verify(&Method::GET, &other, &headers, b"", at)
                .unwrap_err()
                .error_type,
            "InvalidSignatureException"
        );
        let late = parse_amz_date("20150830T130000Z").unwrap();
        assert!(
            keys.verify(&Method::GET, &uri, &headers, b"", late)
                .is_err()
        );
        // Scoped to another service than the one served.
        let lambda = Keys::new([(
            "AKIDEXAMPLE".to_owned(),
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".to_owned(),
        )]);
        assert!(
            lambda
                .verify(&Method::GET, &uri, &headers, b"", at)
                .is_err()
        );
        // An x-amz- header outside the signature.
        let mut added = headers.clone();
        added.insert("x-amz-log-type", "Tail".parse().unwrap());
        assert!(keys.verify(&Method::GET, &uri, &added, b"", at).is_err());
        let unknown = Keys::new([("OTHER".to_owned(), "x".to_owned())]).for_service("iam");
        assert_eq!(
            unknown
                .verify(&Method::GET, &uri, &headers, b"", at)
                .unwrap_err()
                .error_type,
            "UnrecognizedClientException"
        );
    }
}
