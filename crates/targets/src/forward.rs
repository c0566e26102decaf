//! Forwarding one HTTP request to a function as it came (a function URL in front of
//! an `http` or `process` function): the method, path, query, headers and body
//! unchanged, except what belongs to one connection only (hop-by-hop headers, RFC 9110
//! section 7.6.1) and what a proxy adds (`X-Forwarded-For`, `-Proto`, `-Host`).

use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

/// Most of a forwarded answer's body read (Lambda's synchronous response limit).
pub const MAX_FORWARDED_ANSWER_BYTES: usize = 6 * 1024 * 1024;

/// One request to forward.
pub struct Forward<'a> {
    pub method: reqwest::Method,
    /// The request's path and query, as received (`/api/orders?id=1`).
    pub path_and_query: &'a str,
    pub headers: &'a HeaderMap,
    pub body: Bytes,
    /// The client's address, appended to `X-Forwarded-For`.
    pub client_ip: Option<std::net::IpAddr>,
    /// Headers not forwarded besides the hop-by-hop ones (an `Authorization` that was
    /// Switchyard's own bearer token).
    pub withheld: &'a [HeaderName],
    /// Credentials Switchyard presents to the function, with the call's id.
    pub auth: Option<(&'a crate::auth::FunctionAuth, &'a str)>,
}

/// The function's answer.
#[derive(Debug)]
pub struct Forwarded {
    pub status: reqwest::StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Why no answer came back.
#[derive(Debug, PartialEq, Eq)]
pub enum ForwardError {
    /// No answer within the timeout.
    TimedOut,
    /// The connection failed or broke before a whole answer.
    Unreachable(String),
    /// The answer's body is larger than [`MAX_FORWARDED_ANSWER_BYTES`].
    TooLarge,
}

/// The hop-by-hop headers: never forwarded (RFC 9110 section 7.6.1), with any the
/// `Connection` header names.
fn hop_by_hop(headers: &HeaderMap) -> Vec<HeaderName> {
    let mut names: Vec<HeaderName> = [
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ]
    .into_iter()
    .map(HeaderName::from_static)
    .collect();
    for value in headers.get_all(reqwest::header::CONNECTION) {
        if let Ok(value) = value.to_str() {
            names.extend(
                value
                    .split(',')
                    .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok()),
            );
        }
    }
    names
}

/// Copies `headers` without the hop-by-hop ones, `skip` and `Host`/`Content-Length`
/// (the client sets them for the new message).
pub fn end_to_end(headers: &HeaderMap, skip: &[HeaderName]) -> HeaderMap {
    let hop = hop_by_hop(headers);
    let mut copied = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        if hop.contains(name)
            || skip.contains(name)
            || name == reqwest::header::HOST
            || name == reqwest::header::CONTENT_LENGTH
        {
            continue;
        }
        copied.append(name.clone(), value.clone());
    }
    copied
}

/// Sends `request` to the server at `base` (its scheme, host and port; its path is
/// not used: the request's own is) and reads the answer, within `timeout`.
pub async fn forward(
    client: &reqwest::Client,
    base: &reqwest::Url,
    request: Forward<'_>,
    timeout: Duration,
) -> Result<Forwarded, ForwardError> {
    let mut url = base.clone();
    let (path, query) = match request.path_and_query.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (request.path_and_query, None),
    };
    url.set_path(path);
    url.set_query(query);
    let mut headers = end_to_end(request.headers, request.withheld);
    if let Some(ip) = request.client_ip {
        let forwarded_for = match request
            .headers
            .get("x-forwarded-for")
            .and_then(|value| value.to_str().ok())
        {
            Some(earlier) => format!("{earlier}, {ip}"),
            None => ip.to_string(),
        };
        if let Ok(value) = HeaderValue::from_str(&forwarded_for) {
            headers.insert("x-forwarded-for", value);
        }
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    if let Some(host) = request.headers.get(reqwest::header::HOST) {
        headers.insert("x-forwarded-host", host.clone());
    }
    if let Some((auth, id)) = request.auth {
        for (name, value) in auth.headers_now(id, &request.body) {
            headers.insert(name, value);
        }
    }
    let head = request.method == reqwest::Method::HEAD;
    let exchange = async {
        let mut response = client
            .request(request.method, url)
            .headers(headers)
            .body(request.body)
            .send()
            .await
            .map_err(|error| ForwardError::Unreachable(crate::error_chain(&error)))?;
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|error| ForwardError::Unreachable(crate::error_chain(&error)))?
        {
            if body.len() + chunk.len() > MAX_FORWARDED_ANSWER_BYTES {
                return Err(ForwardError::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        let mut headers = end_to_end(response.headers(), &[]);
        // An answer without a body still says how long the body would be.
        if (head || response.status() == reqwest::StatusCode::NOT_MODIFIED)
            && let Some(length) = response.headers().get(reqwest::header::CONTENT_LENGTH)
        {
            headers.insert(reqwest::header::CONTENT_LENGTH, length.clone());
        }
        Ok(Forwarded {
            status: response.status(),
            headers,
            body: Bytes::from(body),
        })
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or(Err(ForwardError::TimedOut))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_not_forwarded() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-session"),
        );
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("x-session", HeaderValue::from_static("abc"));
        headers.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        headers.insert("host", HeaderValue::from_static("example.com"));
        headers.insert("authorization", HeaderValue::from_static("Bearer t"));
        headers.append("x-multi", HeaderValue::from_static("1"));
        headers.append("x-multi", HeaderValue::from_static("2"));
        let copied = end_to_end(&headers, &[reqwest::header::AUTHORIZATION]);
        let names: Vec<&str> = copied.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["x-multi"]);
        assert_eq!(copied.get_all("x-multi").iter().count(), 2);
    }
}
