//! What a `lambda` function receives from a trigger with `payload = "aws"`: the
//! event as AWS would have sent it, so handlers written for AWS run unchanged.
//!
//! An Invoke API `Event` invocation (type [`INVOKE_TYPE`]) is its payload, as given.
//! Anything else is the structured CloudEvent, as with `payload = "cloudevent"`.
//!
//! Function URLs use [`http_api_request`] and [`http_api_response`]: API Gateway's
//! HTTP API payload format 2.0, which Lambda's function URLs use too. The shapes are
//! written out here (a few dozen fields) rather than taken from a crate of Rust
//! handler types; the tests check them with AWS's own Powertools parsers.

use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use bytes::Bytes;
use serde_json::{Map, Value, json};
use switchyard_event::{Event, Failure, Outcome, Reservation, Target, to_structured_json};

use crate::ManagedFunction;

/// The CloudEvent type of an Invoke API `Event` invocation stored on the bus: its
/// data is the payload, its source [`invoke_source`].
pub const INVOKE_TYPE: &str = "dev.switchyard.function.invoke";

/// The source of the Invoke API's `Event` invocations of `function`.
pub fn invoke_source(function: &str) -> String {
    format!("{INVOKE_SOURCE_PREFIX}{function}")
}

/// What every [`invoke_source`] starts with.
pub const INVOKE_SOURCE_PREFIX: &str = "/functions/";

/// The request id the handler sees for `event`: an Invoke API `Event` invocation
/// keeps the one its caller was given, on every attempt (as Lambda's do); other
/// events get a new one per attempt.
pub fn request_id(event: &Event) -> Option<String> {
    (event.ty == INVOKE_TYPE).then(|| event.id.clone())
}

/// The payload AWS would have sent for `event`.
pub fn render(event: &Event) -> Bytes {
    if event.ty == INVOKE_TYPE {
        return event.data.clone();
    }
    Bytes::from(to_structured_json(event))
}

/// One HTTP request, as a function URL hands it to a `lambda` function.
pub struct HttpRequest<'a> {
    pub method: &'a str,
    /// The path as received (still percent-encoded).
    pub path: &'a str,
    /// The query as received, without `?` (empty when none).
    pub query: &'a str,
    pub headers: &'a reqwest::header::HeaderMap,
    pub body: &'a [u8],
    /// `HTTP/1.1`, `HTTP/2.0`, ...
    pub protocol: &'a str,
    pub source_ip: String,
    /// `requestContext.requestId`.
    pub request_id: &'a str,
    /// `requestContext.apiId`.
    pub api_id: &'a str,
    pub account_id: &'a str,
    pub time: time::OffsetDateTime,
}

/// Whether a body of this content type is passed as text (else base64), as API
/// Gateway decides: text types, JSON, XML, JavaScript, forms, YAML, GraphQL.
fn is_text(content_type: Option<&str>) -> bool {
    let Some(content_type) = content_type else {
        return false;
    };
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence.starts_with("text/")
        || essence.ends_with("+json")
        || essence.ends_with("+xml")
        || matches!(
            essence.as_str(),
            "application/json"
                | "application/javascript"
                | "application/xml"
                | "application/x-www-form-urlencoded"
                | "application/yaml"
                | "application/x-yaml"
                | "application/graphql"
        )
}

/// The request as API Gateway's payload format 2.0 (`version`, `routeKey`, `rawPath`,
/// `rawQueryString`, `cookies`, lower-case `headers` with repeated ones joined by
/// commas, `queryStringParameters` likewise, `requestContext`, `body`,
/// `isBase64Encoded`).
pub fn http_api_request(request: &HttpRequest<'_>) -> Value {
    let mut headers: Map<String, Value> = Map::new();
    let mut cookies: Vec<Value> = Vec::new();
    for (name, value) in request.headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        if name == reqwest::header::COOKIE {
            cookies.extend(
                value
                    .split(';')
                    .map(str::trim)
                    .filter(|cookie| !cookie.is_empty())
                    .map(|cookie| Value::from(cookie.to_owned())),
            );
            continue;
        }
        match headers.get_mut(name.as_str()) {
            Some(Value::String(joined)) => {
                joined.push(',');
                joined.push_str(&value);
            }
            _ => {
                headers.insert(name.as_str().to_owned(), Value::from(value.into_owned()));
            }
        }
    }
    let mut parameters: Map<String, Value> = Map::new();
    for (name, value) in form_urlencoded::parse(request.query.as_bytes()) {
        match parameters.get_mut(name.as_ref()) {
            Some(Value::String(joined)) => {
                joined.push(',');
                joined.push_str(&value);
            }
            _ => {
                parameters.insert(name.into_owned(), Value::from(value.into_owned()));
            }
        }
    }
    let header = |name: &str| {
        request
            .headers
            .get(name)
            .and_then(|value| value.to_str().ok())
    };
    let domain = header("host")
        .map(|host| host.rsplit_once(':').map_or(host, |(name, _)| name))
        .unwrap_or("localhost");
    let at = request.time.to_offset(time::UtcOffset::UTC);
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let time = format!(
        "{:02}/{}/{}:{:02}:{:02}:{:02} +0000",
        at.day(),
        MONTHS[usize::from(u8::from(at.month())) - 1],
        at.year(),
        at.hour(),
        at.minute(),
        at.second()
    );
    let mut event = json!({
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": request.path,
        "rawQueryString": request.query,
        "headers": headers,
        "requestContext": {
            "accountId": request.account_id,
            "apiId": request.api_id,
            "domainName": domain,
            "domainPrefix": domain.split('.').next().unwrap_or(domain),
            "http": {
                "method": request.method,
                "path": request.path,
                "protocol": request.protocol,
                "sourceIp": request.source_ip,
                "userAgent": header("user-agent").unwrap_or_default(),
            },
            "requestId": request.request_id,
            "routeKey": "$default",
            "stage": "$default",
            "time": time,
            "timeEpoch": (request.time.unix_timestamp_nanos() / 1_000_000) as i64,
        },
        "isBase64Encoded": false,
    });
    if !cookies.is_empty() {
        event["cookies"] = Value::from(cookies);
    }
    if !parameters.is_empty() {
        event["queryStringParameters"] = Value::from(parameters);
    }
    if !request.body.is_empty() {
        match std::str::from_utf8(request.body) {
            Ok(text) if is_text(header("content-type")) => event["body"] = Value::from(text),
            _ => {
                event["body"] =
                    Value::from(base64::engine::general_purpose::STANDARD.encode(request.body));
                event["isBase64Encoded"] = Value::from(true);
            }
        }
    }
    event
}

/// An HTTP response read from a handler's answer by the function URL rules.
#[derive(Debug, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub cookies: Vec<String>,
    pub body: Bytes,
}

/// Reads a handler's answer as a function URL does: an object with `statusCode` is
/// the response (`headers`, `cookies` each a `set-cookie`, `body`, base64 when
/// `isBase64Encoded`); any other valid JSON is a `200` with that JSON as the body and
/// `content-type: application/json`. Anything else is an error (API Gateway's
/// malformed-response `502`).
pub fn http_api_response(answer: &[u8]) -> Result<HttpResponse, String> {
    let value: Value = serde_json::from_slice(answer)
        .map_err(|error| format!("the function's answer is not JSON: {error}"))?;
    let Some(object) = value
        .as_object()
        .filter(|object| object.contains_key("statusCode"))
    else {
        return Ok(HttpResponse {
            status: 200,
            headers: vec![("content-type".to_owned(), "application/json".to_owned())],
            cookies: Vec::new(),
            body: Bytes::copy_from_slice(answer),
        });
    };
    let status = object["statusCode"]
        .as_u64()
        .or_else(|| {
            object["statusCode"]
                .as_str()
                .and_then(|text| text.parse().ok())
        })
        .filter(|status| (100..=599).contains(status))
        .ok_or_else(|| {
            format!(
                "`statusCode` {} is not an HTTP status",
                object["statusCode"]
            )
        })? as u16;
    let scalar = |value: &Value| match value {
        Value::String(text) => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        Value::Bool(flag) => Some(flag.to_string()),
        _ => None,
    };
    let mut headers = Vec::new();
    match object.get("headers") {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            for (name, value) in map {
                let value =
                    scalar(value).ok_or_else(|| format!("header `{name}` is not a string"))?;
                headers.push((name.clone(), value));
            }
        }
        Some(_) => return Err("`headers` is not an object".to_owned()),
    }
    let cookies = match object.get("cookies") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| {
                item.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| "a cookie is not a string".to_owned())
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err("`cookies` is not a list".to_owned()),
    };
    let base64 = match object.get("isBase64Encoded") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(flag)) => *flag,
        Some(_) => return Err("`isBase64Encoded` is not a boolean".to_owned()),
    };
    let body = match object.get("body") {
        None | Some(Value::Null) => Bytes::new(),
        Some(Value::String(text)) if base64 => Bytes::from(
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|error| format!("`body` is not valid base64: {error}"))?,
        ),
        Some(Value::String(text)) => Bytes::from(text.clone()),
        Some(other) => Bytes::from(other.to_string()),
    };
    Ok(HttpResponse {
        status,
        headers,
        cookies,
        body,
    })
}

/// A `lambda` function as a trigger with `payload = "aws"` calls it: the same
/// instances and budget, AWS-shaped payloads.
pub struct AwsPayloads {
    function: ManagedFunction,
}

impl ManagedFunction {
    /// This function, called with AWS-shaped payloads.
    pub fn aws_payloads(&self) -> AwsPayloads {
        AwsPayloads {
            function: self.clone(),
        }
    }
}

#[async_trait]
impl Target for AwsPayloads {
    async fn invoke(&self, event: &Event, timeout: Duration) -> Outcome {
        let reservation = match self.reserve().await {
            Ok(reservation) => reservation,
            Err(failure) => {
                return Outcome::RetryLater {
                    not_before: None,
                    failure,
                };
            }
        };
        self.invoke_reserved(reservation, event, timeout).await
    }

    fn reserves(&self) -> bool {
        true
    }

    async fn reserve(&self) -> Result<Option<Reservation>, Failure> {
        self.function.reserve().await
    }

    async fn invoke_reserved(
        &self,
        reservation: Option<Reservation>,
        event: &Event,
        timeout: Duration,
    ) -> Outcome {
        self.function
            .invoke_rendered(reservation, event, timeout, render)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_becomes_payload_format_2() {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("host", "api.example.com:8080".parse().unwrap());
        headers.insert("content-type", "application/json".parse().unwrap());
        headers.append("x-multi", "a".parse().unwrap());
        headers.append("x-multi", "b".parse().unwrap());
        headers.insert("cookie", "a=1; b=2".parse().unwrap());
        let request = HttpRequest {
            method: "POST",
            path: "/api/x%20y",
            query: "p=1&p=2&q=a+b%21",
            headers: &headers,
            body: b"{\"k\": 1}",
            protocol: "HTTP/1.1",
            source_ip: "127.0.0.1".to_owned(),
            request_id: "r-1",
            api_id: "web",
            account_id: "000000000000",
            time: time::OffsetDateTime::from_unix_timestamp_nanos(1_584_039_838_390_000_000)
                .unwrap(),
        };
        let event = http_api_request(&request);
        assert_eq!(event["rawPath"], "/api/x%20y");
        assert_eq!(event["headers"]["x-multi"], "a,b");
        assert_eq!(event["headers"].get("cookie"), None);
        assert_eq!(event["cookies"], json!(["a=1", "b=2"]));
        assert_eq!(
            event["queryStringParameters"],
            json!({"p": "1,2", "q": "a b!"})
        );
        assert_eq!(event["requestContext"]["domainName"], "api.example.com");
        assert_eq!(event["requestContext"]["domainPrefix"], "api");
        assert_eq!(
            event["requestContext"]["time"],
            "12/Mar/2020:19:03:58 +0000"
        );
        assert_eq!(event["requestContext"]["timeEpoch"], 1584039838390_i64);
        assert_eq!(event["body"], "{\"k\": 1}");
        assert_eq!(event["isBase64Encoded"], false);
        let binary = HttpRequest {
            body: &[0xff, 0x00],
            ..request
        };
        let event = http_api_request(&binary);
        assert_eq!(event["body"], "/wA=");
        assert_eq!(event["isBase64Encoded"], true);
    }

    #[test]
    fn answers_are_read_by_the_function_url_rules() {
        let inferred = http_api_response(b"{\"message\": \"hi\"}").unwrap();
        assert_eq!(inferred.status, 200);
        assert_eq!(inferred.body, Bytes::from_static(b"{\"message\": \"hi\"}"));
        let string = http_api_response(b"\"Hello, world!\"").unwrap();
        assert_eq!(string.body, Bytes::from_static(b"\"Hello, world!\""));
        let custom = http_api_response(
            br#"{"statusCode": 201, "headers": {"X-A": "1", "X-N": 2}, "cookies": ["c=1; Max-Age=60"], "body": "aGk=", "isBase64Encoded": true}"#,
        )
        .unwrap();
        assert_eq!(custom.status, 201);
        assert_eq!(
            custom.headers,
            [
                ("X-A".to_owned(), "1".to_owned()),
                ("X-N".to_owned(), "2".to_owned())
            ]
        );
        assert_eq!(custom.cookies, ["c=1; Max-Age=60"]);
        assert_eq!(custom.body, Bytes::from_static(b"hi"));
        assert!(http_api_response(b"not json").is_err());
        assert!(http_api_response(br#"{"statusCode": 42}"#).is_err());
        assert!(
            http_api_response(br#"{"statusCode": 200, "body": "%%", "isBase64Encoded": true}"#)
                .is_err()
        );
    }

    #[test]
    fn an_invoke_api_event_is_its_payload_and_anything_else_a_structured_cloudevent() {
        let mut invoked = Event::new("1", invoke_source("thumbs"), INVOKE_TYPE);
        invoked.data = Bytes::from_static(b"{\"key\": [1, 2]}");
        assert_eq!(render(&invoked), invoked.data);
        let mut other = Event::new("2", "/hooks/github", "com.github.push");
        other.data = Bytes::from_static(b"{\"ref\":\"main\"}");
        let rendered: serde_json::Value = serde_json::from_slice(&render(&other)).unwrap();
        assert_eq!(rendered["type"], "com.github.push");
        assert_eq!(rendered["data"]["ref"], "main");
    }
}
