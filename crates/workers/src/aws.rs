//! What a `lambda` function receives from a trigger with `payload = "aws"`: the
//! event as AWS would have sent it, so handlers written for AWS run unchanged.
//!
//! An Invoke API `Event` invocation (type [`INVOKE_TYPE`]) is its payload, as given;
//! an object event of the S3 connector an S3 notification (`{"Records": [...]}`); a
//! webhook's request API Gateway's payload format 2.0; a schedule's firing
//! EventBridge's "Scheduled Event"; an SQS message Lambda's SQS event; an AMQP
//! delivery Lambda's Amazon MQ for RabbitMQ event. Anything else is the
//! structured CloudEvent, as with `payload = "cloudevent"`.
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
use switchyard_event::{
    BatchOutcome, Event, Failure, Outcome, Reservation, Target, to_structured_json,
};

use crate::{Called, ManagedFunction};

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
    (event.ty == INVOKE_TYPE && event.source.starts_with(INVOKE_SOURCE_PREFIX))
        .then(|| event.id.clone())
}

/// Where an event came from, as far as its AWS shape goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// An Invoke API `Event` invocation.
    Invoke,
    /// An object event of the S3 connector (a notification or a poll).
    S3,
    /// A webhook's request (it kept its path in `httppath`, its headers in
    /// `httpheaders`).
    Hook,
    /// A plain Kafka record (it kept itself in `kafkarecord`).
    Kafka,
    /// A schedule's firing.
    Schedule,
    /// An SQS message (it kept its SQS fields in `sqsmessage`).
    Sqs,
    /// An AMQP delivery (it kept its AMQP fields in `amqpmessage`).
    Amqp,
    /// Anything else: the structured CloudEvent.
    Other,
}

fn origin(event: &Event) -> Origin {
    if event.ty == INVOKE_TYPE {
        Origin::Invoke
    } else if event.ty.starts_with("com.amazonaws.s3.") && event.extensions.contains_key("s3bucket")
    {
        Origin::S3
    } else if event.extensions.contains_key(KAFKA_RECORD) {
        Origin::Kafka
    } else if event.extensions.contains_key(SQS_MESSAGE) {
        Origin::Sqs
    } else if event.extensions.contains_key(AMQP_MESSAGE) {
        Origin::Amqp
    } else if event.extensions.contains_key("httppath") {
        Origin::Hook
    } else if event
        .source
        .starts_with(switchyard_event::SCHEDULE_SOURCE_PREFIX)
    {
        Origin::Schedule
    } else {
        Origin::Other
    }
}

/// The payload AWS would have sent for `event`.
pub fn render(event: &Event) -> Bytes {
    match origin(event) {
        Origin::Invoke => event.data.clone(),
        Origin::S3 => json_bytes(&json!({ "Records": [s3_record(event)] })),
        Origin::Hook => json_bytes(&hook_request(event)),
        Origin::Kafka => json_bytes(&kafka_event(std::slice::from_ref(event))),
        Origin::Schedule => json_bytes(&scheduled_event(event)),
        Origin::Sqs => json_bytes(&json!({ "Records": [sqs_record(event)] })),
        Origin::Amqp => json_bytes(&rabbitmq_event(std::slice::from_ref(event))),
        Origin::Other => Bytes::from(to_structured_json(event)),
    }
}

/// EventBridge's "Scheduled Event" for a schedule's firing, as a rule with a
/// schedule expression sends it to Lambda: `time` is the scheduled time, `resources`
/// names the schedule as a rule ARN (account `000000000000`, region `us-east-1`),
/// `detail` is the schedule's `input` (a JSON text as its value, other text as a
/// string), `{}` without one; `id` is a UUID derived from the firing, the same on
/// every attempt.
fn scheduled_event(event: &Event) -> Value {
    let name = event
        .source
        .strip_prefix(switchyard_event::SCHEDULE_SOURCE_PREFIX)
        .unwrap_or_default();
    let detail = if event.data.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(&event.data)
            .unwrap_or_else(|_| Value::from(String::from_utf8_lossy(&event.data).into_owned()))
    };
    let id = uuid::Uuid::new_v5(
        &uuid::Uuid::NAMESPACE_URL,
        format!("{}#{}", event.source, event.id).as_bytes(),
    );
    let account = crate::runtime_api::ACCOUNT_ID;
    json!({
        "version": "0",
        "id": id.to_string(),
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": account,
        "time": event.time.as_deref().unwrap_or(event.id.as_str()),
        "region": "us-east-1",
        "resources": [format!("arn:aws:events:us-east-1:{account}:rule/{name}")],
        "detail": detail,
    })
}

/// The extension an SQS message's event keeps the message's SQS fields in (written
/// by the SQS connector).
const SQS_MESSAGE: &str = "sqsmessage";

/// Lambda's SQS event record for an SQS message's event: the kept SQS fields
/// (`messageId`, `receiptHandle`, `attributes`, `messageAttributes`, `md5OfBody`,
/// `eventSource`, `eventSourceARN`, `awsRegion`) with the event's data as `body`.
fn sqs_record(event: &Event) -> Value {
    let mut record: Value = event
        .extensions
        .get(SQS_MESSAGE)
        .and_then(|kept| serde_json::from_str(kept).ok())
        .unwrap_or_else(|| json!({}));
    if let Value::Object(fields) = &mut record {
        fields.insert(
            "body".to_owned(),
            Value::from(String::from_utf8_lossy(&event.data).into_owned()),
        );
        // `md5OfMessageAttributes` is in Lambda's record only when there are some.
        if fields
            .get("md5OfMessageAttributes")
            .is_some_and(Value::is_null)
        {
            fields.remove("md5OfMessageAttributes");
        }
    }
    record
}

/// The extension an AMQP delivery's event keeps the delivery's AMQP fields in
/// (written by the AMQP connector).
const AMQP_MESSAGE: &str = "amqpmessage";

/// Lambda's event for Amazon MQ for RabbitMQ: `eventSource` `aws:rmq`,
/// `eventSourceArn` (a broker ARN naming the source, account `000000000000`), and the
/// messages by `<queue>::<vhost>`, each with its `basicProperties` (as Lambda writes
/// them: string headers as `{"bytes": [...]}`, the `timestamp` as `Jan 1, 1970,
/// 12:33:41 AM`), `redelivered` and the data in base64.
fn rabbitmq_event(events: &[Event]) -> Value {
    let mut by_queue: Map<String, Value> = Map::new();
    let mut source = String::new();
    for event in events {
        let kept: Value = event
            .extensions
            .get(AMQP_MESSAGE)
            .and_then(|kept| serde_json::from_str(kept).ok())
            .unwrap_or_default();
        if source.is_empty() {
            source = kept["source"].as_str().unwrap_or_default().to_owned();
        }
        let mut properties = kept["basicProperties"].clone();
        if let Some(seconds) = properties["timestamp"].as_i64()
            && let Ok(at) = time::OffsetDateTime::from_unix_timestamp(seconds)
        {
            let format = time::macros::format_description!(
                "[month repr:short] [day padding:none], [year], [hour repr:12 padding:none]:[minute]:[second] [period]"
            );
            properties["timestamp"] = at.format(format).map(Value::from).unwrap_or(Value::Null);
        }
        let message = json!({
            "basicProperties": properties,
            "redelivered": kept["redelivered"].as_bool().unwrap_or(false),
            "data": base64::engine::general_purpose::STANDARD.encode(&event.data),
        });
        let key = format!(
            "{}::{}",
            kept["queue"].as_str().unwrap_or_default(),
            kept["vhost"].as_str().unwrap_or("/")
        );
        match by_queue
            .entry(key)
            .or_insert_with(|| Value::Array(Vec::new()))
        {
            Value::Array(list) => list.push(message),
            _ => unreachable!("inserted as a list"),
        }
    }
    json!({
        "eventSource": "aws:rmq",
        "eventSourceArn": format!(
            "arn:aws:mq:us-east-1:{}:broker:{source}:b-switchyard-{source}",
            crate::runtime_api::ACCOUNT_ID
        ),
        "rmqMessagesByQueue": by_queue,
    })
}

/// The event an SQS `itemIdentifier` (a message id) names: its own id, or the one
/// of the event whose SQS message had that id (a structured CloudEvent's keeps its
/// own id).
fn sqs_identifier(events: &[Event], identifier: &Value) -> Result<String, String> {
    if let Some(message_id) = identifier.as_str()
        && let Some(event) = events.iter().find(|event| {
            event
                .extensions
                .get(SQS_MESSAGE)
                .and_then(|kept| serde_json::from_str::<Value>(kept).ok())
                .is_some_and(|kept| kept["messageId"] == message_id)
        })
    {
        return Ok(event.id.clone());
    }
    switchyard_targets::event_id_identifier(events, identifier)
}

/// The extension a plain Kafka record's event keeps the record in (written by the
/// Kafka connector).
const KAFKA_RECORD: &str = "kafkarecord";

/// Lambda's self-managed Kafka event for Kafka events (`eventSource`
/// `SelfManagedKafka`, `bootstrapServers`, `records` by `<topic>-<partition>` in
/// order, key and value in base64, headers as arrays of byte values).
fn kafka_event(events: &[Event]) -> Value {
    let mut records: Map<String, Value> = Map::new();
    let mut bootstrap = String::new();
    for event in events {
        let kept: Value = event
            .extensions
            .get(KAFKA_RECORD)
            .and_then(|kept| serde_json::from_str(kept).ok())
            .unwrap_or_default();
        if bootstrap.is_empty() {
            bootstrap = kept["bootstrapServers"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
        }
        let topic = kept["topic"].as_str().unwrap_or_default();
        let partition = kept["partition"].as_i64().unwrap_or_default();
        let headers: Vec<Value> = kept["headers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|pair| {
                let name = pair[0].as_str()?;
                let bytes = match pair[1].as_str() {
                    Some(encoded) => base64::engine::general_purpose::STANDARD
                        .decode(encoded)
                        .ok()?,
                    None => Vec::new(),
                };
                Some(json!({ name: bytes }))
            })
            .collect();
        let mut record = json!({
            "topic": topic,
            "partition": partition,
            "offset": kept["offset"],
            "timestamp": kept["timestamp"],
            "timestampType": kept["timestampType"].as_str().unwrap_or("CREATE_TIME"),
            "value": base64::engine::general_purpose::STANDARD.encode(&event.data),
            "headers": headers,
        });
        if let Some(key) = kept["key"].as_str() {
            record["key"] = Value::from(key);
        }
        match records
            .entry(format!("{topic}-{partition}"))
            .or_insert_with(|| Value::Array(Vec::new()))
        {
            Value::Array(list) => list.push(record),
            _ => unreachable!("inserted as a list"),
        }
    }
    json!({
        "eventSource": "SelfManagedKafka",
        "bootstrapServers": bootstrap,
        "records": records,
    })
}

/// The event a Kafka `itemIdentifier` (`{"partition": "<topic>-<partition>",
/// "offset": <offset>}`, as Powertools' batch processor writes it) names.
fn kafka_identifier(events: &[Event], identifier: &Value) -> Result<String, String> {
    let (Some(partition), Some(offset)) = (
        identifier["partition"].as_str(),
        identifier["offset"].as_i64(),
    ) else {
        return Err(
            "is not {\"partition\": \"<topic>-<partition>\", \"offset\": <offset>}".to_owned(),
        );
    };
    events
        .iter()
        .find(|event| {
            let kept: Value = event
                .extensions
                .get(KAFKA_RECORD)
                .and_then(|kept| serde_json::from_str(kept).ok())
                .unwrap_or_default();
            kept["offset"].as_i64() == Some(offset)
                && kept["topic"]
                    .as_str()
                    .zip(kept["partition"].as_i64())
                    .is_some_and(|(topic, number)| format!("{topic}-{number}") == partition)
        })
        .map(|event| event.id.clone())
        .ok_or_else(|| format!("names {partition} offset {offset}, which was not in the batch"))
}

/// The payload AWS would have sent for a batch: S3 object events as one
/// `{"Records": [...]}`, Kafka records as one self-managed Kafka event; anything
/// else as a JSON array of structured CloudEvents.
pub fn render_batch(events: &[Event]) -> Bytes {
    if !events.is_empty() && events.iter().all(|event| origin(event) == Origin::S3) {
        let records: Vec<Value> = events.iter().map(s3_record).collect();
        return json_bytes(&json!({ "Records": records }));
    }
    if !events.is_empty() && events.iter().all(|event| origin(event) == Origin::Kafka) {
        return json_bytes(&kafka_event(events));
    }
    if !events.is_empty() && events.iter().all(|event| origin(event) == Origin::Amqp) {
        return json_bytes(&rabbitmq_event(events));
    }
    if !events.is_empty() && events.iter().all(|event| origin(event) == Origin::Sqs) {
        let records: Vec<Value> = events.iter().map(sqs_record).collect();
        return json_bytes(&json!({ "Records": records }));
    }
    let mut array = Vec::with_capacity(events.iter().map(|event| event.data.len() + 256).sum());
    array.push(b'[');
    for (index, event) in events.iter().enumerate() {
        if index > 0 {
            array.push(b',');
        }
        array.extend_from_slice(&to_structured_json(event));
    }
    array.push(b']');
    Bytes::from(array)
}

fn json_bytes(value: &Value) -> Bytes {
    Bytes::from(serde_json::to_vec(value).expect("a JSON value serializes"))
}

/// An object key as S3 notifications write it: URL-encoded, a space as `+` (`red
/// flower.jpg` is `red+flower.jpg`), `/` kept.
pub fn s3_encode_key(key: &str) -> String {
    key.split('/')
        .map(|segment| form_urlencoded::byte_serialize(segment.as_bytes()).collect::<String>())
        .collect::<Vec<_>>()
        .join("/")
}

/// An S3 event notification record (event version 2.1) for an object event of the
/// S3 connector: its `s3` member is the event's data with the key URL-encoded again;
/// `eventSource`, `awsRegion`, `eventName` and `eventTime` come from the event's
/// source, type and time. What the connector does not keep (`userIdentity`,
/// `requestParameters`, `responseElements`) is present with empty values (the source
/// address `0.0.0.0`, so parsers that check it as an address accept it).
fn s3_record(event: &Event) -> Value {
    let bucket = event.extensions.get("s3bucket").map_or("", String::as_str);
    // `{eventSource}.{awsRegion}.{bucket}`: the event source has no dot.
    let (event_source, rest) = event.source.split_once('.').unwrap_or(("aws:s3", ""));
    let region = rest
        .strip_suffix(bucket)
        .and_then(|region| region.strip_suffix('.'))
        .unwrap_or_default();
    // The data is the record's `s3` member as the connector stored it; built afresh
    // here, field by field, so data of another shape (an event posted by a client
    // under an S3 type) cannot make this fail.
    let data: Value = serde_json::from_slice(&event.data).unwrap_or_default();
    let text = |value: &Value| value.as_str().map(str::to_owned);
    let mut object = Map::new();
    object.insert(
        "key".to_owned(),
        Value::from(s3_encode_key(
            event
                .extensions
                .get("s3key")
                .map(String::as_str)
                .or_else(|| data["object"]["key"].as_str())
                .unwrap_or_default(),
        )),
    );
    let size = data["object"]["size"].as_u64().or_else(|| {
        event
            .extensions
            .get("s3size")
            .and_then(|size| size.parse().ok())
    });
    if let Some(size) = size {
        object.insert("size".to_owned(), Value::from(size));
    }
    for (name, extension) in [
        ("eTag", "s3etag"),
        ("versionId", "s3versionid"),
        ("sequencer", "s3sequencer"),
    ] {
        if let Some(mut value) =
            text(&data["object"][name]).or_else(|| event.extensions.get(extension).cloned())
        {
            // AWS writes the ETag bare; the S3 connector stores it so, but an event
            // stored by an older version (or posted by a client) may keep quotes.
            if name == "eTag" {
                value = value
                    .trim()
                    .trim_start_matches("W/")
                    .trim_matches('"')
                    .to_owned();
            }
            object.insert(name.to_owned(), Value::from(value));
        }
    }
    let bucket_name = text(&data["bucket"]["name"]).unwrap_or_else(|| bucket.to_owned());
    let mut bucket_member = json!({
        "name": bucket_name,
        "arn": text(&data["bucket"]["arn"]).unwrap_or_else(|| format!("arn:aws:s3:::{bucket_name}")),
    });
    if let Some(owner) = text(&data["bucket"]["ownerIdentity"]["principalId"]) {
        bucket_member["ownerIdentity"] = json!({ "principalId": owner });
    }
    let s3 = json!({
        "s3SchemaVersion": text(&data["s3SchemaVersion"]).unwrap_or_else(|| "1.0".to_owned()),
        "configurationId": text(&data["configurationId"]).unwrap_or_default(),
        "bucket": bucket_member,
        "object": object,
    });
    json!({
        "eventVersion": "2.1",
        "eventSource": event_source,
        "awsRegion": region,
        "eventTime": event.time.as_deref().unwrap_or_default(),
        "eventName": event.ty.strip_prefix("com.amazonaws.s3.").unwrap_or(&event.ty),
        "userIdentity": { "principalId": "" },
        "requestParameters": { "sourceIPAddress": "0.0.0.0" },
        "responseElements": { "x-amz-request-id": "", "x-amz-id-2": "" },
        "s3": s3,
    })
}

/// One HTTP request, as a function URL hands it to a `lambda` function.
#[derive(Clone)]
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

/// A webhook's event as the request API Gateway's HTTP API would have passed on
/// (payload format 2.0): its path, query, client address and headers as the hook
/// kept them, the body as data; the event id is `requestContext.requestId`.
fn hook_request(event: &Event) -> Value {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(Ok(Value::Object(kept))) = event
        .extensions
        .get("httpheaders")
        .map(|kept| serde_json::from_str::<Value>(kept))
    {
        for (name, value) in kept {
            if let (Ok(name), Some(Ok(value))) = (
                reqwest::header::HeaderName::from_bytes(name.as_bytes()),
                value.as_str().map(reqwest::header::HeaderValue::from_str),
            ) {
                headers.insert(name, value);
            }
        }
    }
    // The id and subject headers are the event's id and subject.
    for (extension, value) in [
        ("httpidheader", Some(&event.id)),
        ("httpsubjectheader", event.subject.as_ref()),
    ] {
        if let (Some(name), Some(value)) = (event.extensions.get(extension), value)
            && let (Ok(name), Ok(value)) = (
                reqwest::header::HeaderName::from_bytes(name.as_bytes()),
                reqwest::header::HeaderValue::from_str(value),
            )
        {
            headers.insert(name, value);
        }
    }
    let time = event
        .time
        .as_deref()
        .and_then(|time| {
            time::OffsetDateTime::parse(time, &time::format_description::well_known::Rfc3339).ok()
        })
        .unwrap_or_else(time::OffsetDateTime::now_utc);
    let path = event.extensions.get("httppath").map_or("/", String::as_str);
    http_api_request(&HttpRequest {
        method: "POST",
        path,
        query: event.extensions.get("httpquery").map_or("", String::as_str),
        headers: &headers,
        body: &event.data,
        protocol: "HTTP/1.1",
        source_ip: event
            .extensions
            .get("httpsourceip")
            .cloned()
            .unwrap_or_default(),
        request_id: &event.id,
        api_id: "hooks",
        account_id: crate::runtime_api::ACCOUNT_ID,
        time,
    })
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
        .filter(|status| (200..=599).contains(status))
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
        // Without a reservation, an instance is acquired for the call.
        self.invoke_reserved(None, event, timeout).await
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

    /// One invocation with the whole batch ([`render_batch`]); the answer is read by
    /// Lambda's partial batch response rules (`batchItemFailures` naming events by
    /// id, or Kafka records by `{"partition", "offset"}`; a malformed answer fails
    /// the whole batch), a function error fails it whole.
    async fn invoke_batch(&self, events: &[Event], timeout: Duration) -> BatchOutcome {
        let request_id = uuid::Uuid::new_v4().to_string();
        let (called, _) = self
            .function
            .call(request_id, render_batch(events), None, timeout, false)
            .await;
        match called {
            // AWS ignores what an S3-triggered handler returns: any answer delivers,
            // unless it names failures.
            Called::Response { body, .. }
                if events.iter().all(|event| origin(event) == Origin::S3)
                    && serde_json::from_slice::<Value>(&body)
                        .ok()
                        .and_then(|answer| answer.get("batchItemFailures").cloned())
                        .is_none() =>
            {
                BatchOutcome::All(Outcome::delivered())
            }
            Called::Response { body, .. } => {
                switchyard_targets::classify_batch_answer_with(200, Ok(&body), &|identifier| {
                    match identifier {
                        Value::Object(_) => kafka_identifier(events, identifier),
                        _ => sqs_identifier(events, identifier),
                    }
                })
            }
            failed => BatchOutcome::All(failed.into_outcome()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_object_events_become_notification_records() {
        let mut event = Event::new(
            "images/a b+c.jpg@abc",
            "minio:s3.eu-west-1.my.bucket",
            "com.amazonaws.s3.ObjectCreated:Put",
        );
        event.time = Some("2026-12-02T08:00:00.000Z".to_owned());
        event
            .extensions
            .insert("s3bucket".into(), "my.bucket".into());
        event
            .extensions
            .insert("s3key".into(), "dir/a b+c ü.jpg".into());
        event.data = Bytes::from_static(
            br#"{"s3SchemaVersion":"1.0","configurationId":"c","bucket":{"name":"my.bucket","arn":"arn:aws:s3:::my.bucket"},"object":{"key":"dir/a b+c \u00fc.jpg","size":3,"eTag":"abc"}}"#,
        );
        let rendered: Value = serde_json::from_slice(&render(&event)).unwrap();
        let record = &rendered["Records"][0];
        assert_eq!(record["eventVersion"], "2.1");
        assert_eq!(record["eventSource"], "minio:s3");
        assert_eq!(record["awsRegion"], "eu-west-1");
        assert_eq!(record["eventName"], "ObjectCreated:Put");
        assert_eq!(record["eventTime"], "2026-12-02T08:00:00.000Z");
        assert_eq!(record["s3"]["bucket"]["name"], "my.bucket");
        assert_eq!(record["s3"]["object"]["key"], "dir/a+b%2Bc+%C3%BC.jpg");
        assert_eq!(record["s3"]["object"]["size"], 3);
        assert_eq!(record["s3"]["object"]["eTag"], "abc");
        let batch: Value = serde_json::from_slice(&render_batch(&[event.clone(), event])).unwrap();
        assert_eq!(batch["Records"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn a_quoted_etag_is_rendered_bare_as_aws_writes_it() {
        let mut event = Event::new(
            "b/k@abc",
            "aws:s3.us-east-1.b",
            "com.amazonaws.s3.ObjectCreated:Put",
        );
        event.extensions.insert("s3bucket".into(), "b".into());
        event.extensions.insert("s3key".into(), "k".into());
        event.data = Bytes::from_static(br#"{"object":{"key":"k","eTag":"\"abc\""}}"#);
        let rendered: Value = serde_json::from_slice(&render(&event)).unwrap();
        assert_eq!(rendered["Records"][0]["s3"]["object"]["eTag"], "abc");
    }

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
