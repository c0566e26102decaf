//! A Kafka record as a CloudEvent.
//!
//! - A record in the CloudEvents Kafka binding keeps its attributes: binary mode
//!   (`ce_` headers, `content-type` as `datacontenttype`) or structured mode
//!   (`content-type: application/cloudevents+json`).
//! - Any other record becomes the data of an event whose `id` is
//!   `<topic>-<partition>-<offset>` (a re-read after a crash is dropped by the bus's
//!   duplicate window), `source` is `kafka://<cluster>/<topic>`, `type` is the
//!   topic's configured type, `time` is the record timestamp, and every header is an
//!   extension.
//! - In both cases the record key is the `partitionkey` extension (unless the event
//!   already carries one) and, for plain records, the `subject`.
//!
//! Header names become extension names by the CloudEvents rules: lowercased, only
//! `a-z` and `0-9` kept, at most 20 characters; a name that is then empty or a core
//! attribute is prefixed with `kafka`. Values and keys that are not UTF-8 are written
//! in standard base64.

use base64::Engine as _;
use bytes::Bytes;
use switchyard_event::{
    CORE_ATTRIBUTES, Event, EventError, StructuredError, parse_structured, timestamp,
};

use crate::config::KafkaSourceConfig;

/// Where a record was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coordinates<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
}

impl Coordinates<'_> {
    /// The id of a plain record's event.
    pub fn event_id(&self) -> String {
        format!("{}-{}-{}", self.topic, self.partition, self.offset)
    }
}

/// What the connector reads from a record.
#[derive(Debug, Clone)]
pub struct Record<'a> {
    pub at: Coordinates<'a>,
    pub key: Option<&'a [u8]>,
    /// Headers in order; a later header of the same name wins.
    pub headers: Vec<(&'a str, Option<&'a [u8]>)>,
    /// Milliseconds since the epoch (create or log-append time).
    pub timestamp: Option<i64>,
    /// `CREATE_TIME` or `LOG_APPEND_TIME`, as AWS names them.
    pub timestamp_type: Option<&'static str>,
    pub payload: Option<&'a [u8]>,
}

/// Why a record could not become an event.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("record carries CloudEvents headers that are not a valid event: {0}")]
    Binary(EventError),
    #[error("record is a structured CloudEvent that is not valid: {0}")]
    Structured(StructuredError),
    #[error("{0}")]
    Event(#[from] EventError),
    #[error("record is not a valid S3 event notification: {0}")]
    Notification(switchyard_connector_s3::NotificationError),
}

/// The extension name a Kafka header travels under.
pub fn extension_name(header: &str) -> String {
    let mut name: String = header
        .chars()
        .filter_map(|character| {
            let lower = character.to_ascii_lowercase();
            (lower.is_ascii_lowercase() || lower.is_ascii_digit()).then_some(lower)
        })
        .collect();
    // `data` and `data_base64` are taken in the JSON format too.
    if name.is_empty()
        || CORE_ATTRIBUTES.contains(&name.as_str())
        || ["data", "database64"].contains(&name.as_str())
    {
        name.insert_str(0, "kafka");
    }
    name.truncate(20);
    name
}

fn text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_owned(),
        Err(_) => base64::engine::general_purpose::STANDARD.encode(bytes),
    }
}

fn header<'a>(record: &Record<'a>, name: &str) -> Option<&'a [u8]> {
    record
        .headers
        .iter()
        .rev()
        .find(|(header, _)| header.eq_ignore_ascii_case(name))
        .and_then(|(_, value)| *value)
}

/// Turns a record into its events: one, or with `format = "s3"` one per object record
/// of the notification it carries.
pub fn to_events(
    config: &KafkaSourceConfig,
    record: &Record<'_>,
) -> Result<Vec<Event>, RecordError> {
    match config.format {
        switchyard_connector_s3::MessageFormat::Cloudevents => Ok(vec![to_event(config, record)?]),
        switchyard_connector_s3::MessageFormat::S3 => switchyard_connector_s3::object_events_with(
            record.payload.unwrap_or_default(),
            config.key_encoding,
        )
        .map_err(RecordError::Notification),
    }
}

/// Turns a record into an event; see the module documentation.
pub fn to_event(config: &KafkaSourceConfig, record: &Record<'_>) -> Result<Event, RecordError> {
    let payload = Bytes::copy_from_slice(record.payload.unwrap_or_default());
    let content_type = header(record, "content-type").map(text);
    let mut event = if config.plain {
        plain_event(config, record, payload, content_type)
    } else if record
        .headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("ce_specversion"))
    {
        binary_event(record, payload, content_type).map_err(RecordError::Binary)?
    } else if content_type
        .as_deref()
        .is_some_and(|value| value.starts_with("application/cloudevents+json"))
    {
        parse_structured(&payload).map_err(RecordError::Structured)?
    } else {
        plain_event(config, record, payload, content_type)
    };
    if let Some(key) = record.key
        && !event.extensions.contains_key("partitionkey")
    {
        event
            .extensions
            .insert("partitionkey".to_owned(), text(key));
    }
    // The sources of Lambda event source mappings are theirs alone.
    if !config.plain && event.source.starts_with(MAPPING_SOURCE_PREFIX) {
        return Err(RecordError::Binary(EventError::InvalidAttribute {
            name: "source".to_owned(),
            reason: format!("`{MAPPING_SOURCE_PREFIX}...` is reserved for event source mappings"),
        }));
    }
    event.validate()?;
    Ok(event)
}

/// What the `source` of every event of a Lambda event source mapping starts with.
pub const MAPPING_SOURCE_PREFIX: &str = "kafka://esm-";

fn binary_event(
    record: &Record<'_>,
    payload: Bytes,
    content_type: Option<String>,
) -> Result<Event, EventError> {
    let mut event = Event::new(String::new(), String::new(), String::new());
    event.data = payload;
    event.datacontenttype = content_type;
    for (name, value) in &record.headers {
        let Some(attribute) = name
            .get(..3)
            .filter(|prefix| prefix.eq_ignore_ascii_case("ce_"))
            .map(|_| name[3..].to_ascii_lowercase())
        else {
            continue;
        };
        let value = std::str::from_utf8(value.unwrap_or_default()).map_err(|_| {
            EventError::InvalidAttribute {
                name: attribute.clone(),
                reason: "header value is not valid UTF-8".to_owned(),
            }
        })?;
        event.set_attribute(&attribute, value.to_owned())?;
    }
    Ok(event)
}

/// The event a record that is not a valid CloudEvent is dead-lettered as: the record
/// as a plain record, its bytes untouched.
pub fn fallback_event(config: &KafkaSourceConfig, record: &Record<'_>) -> Event {
    let payload = Bytes::copy_from_slice(record.payload.unwrap_or_default());
    let content_type = header(record, "content-type").map(text);
    let mut event = plain_event(config, record, payload, content_type);
    if let Some(key) = record.key {
        event
            .extensions
            .insert("partitionkey".to_owned(), text(key));
    }
    event
}

fn plain_event(
    config: &KafkaSourceConfig,
    record: &Record<'_>,
    payload: Bytes,
    content_type: Option<String>,
) -> Event {
    let mut event = Event::new(
        record.at.event_id(),
        config.event_source(record.at.topic),
        config.event_type(record.at.topic),
    );
    event.data = payload;
    event.datacontenttype = content_type;
    event.subject = record
        .key
        .and_then(|key| std::str::from_utf8(key).ok())
        .map(str::to_owned);
    event.time = record
        .timestamp
        .and_then(|millis| {
            time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(millis) * 1_000_000).ok()
        })
        .map(timestamp::rfc3339);
    for (name, value) in &record.headers {
        if name.eq_ignore_ascii_case("content-type") {
            continue;
        }
        event
            .extensions
            .insert(extension_name(name), value.map(text).unwrap_or_default());
    }
    if config.keep_records {
        event.extensions.insert(
            RECORD_EXTENSION.to_owned(),
            record_extension(config, record),
        );
    }
    event
}

/// The extension of a plain record's event that keeps the record exactly (its
/// coordinates, timestamp and type, key and headers as bytes, the brokers it came
/// from), so a `lambda` function with `payload = "aws"` gets it as Lambda's
/// self-managed Kafka event; written when the source's `keep_records` is set. It wins
/// over a header whose extension name is the same.
pub const RECORD_EXTENSION: &str = "kafkarecord";

fn record_extension(config: &KafkaSourceConfig, record: &Record<'_>) -> String {
    let encode = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    serde_json::json!({
        "bootstrapServers": config.brokers,
        "topic": record.at.topic,
        "partition": record.at.partition,
        "offset": record.at.offset,
        "timestamp": record.timestamp,
        "timestampType": record.timestamp_type,
        "key": record.key.map(encode),
        "headers": record
            .headers
            .iter()
            .map(|(name, value)| serde_json::json!([name, value.map(encode)]))
            .collect::<Vec<_>>(),
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> KafkaSourceConfig {
        serde_json::from_value(serde_json::json!({
            "name": "orders",
            "brokers": "127.0.0.1:9092",
            "topics": ["orders"],
            "cluster": "main",
            "types": { "orders": "com.example.order" },
        }))
        .unwrap()
    }

    fn record<'a>(headers: Vec<(&'a str, Option<&'a [u8]>)>, payload: &'a [u8]) -> Record<'a> {
        Record {
            at: Coordinates {
                topic: "orders",
                partition: 2,
                offset: 41,
            },
            key: Some(b"customer-7"),
            headers,
            timestamp: Some(1_700_000_000_123),
            timestamp_type: Some("CREATE_TIME"),
            payload: Some(payload),
        }
    }

    #[test]
    fn a_plain_record_is_kept_whole_only_when_asked() {
        let produced = record(
            vec![
                ("h", Some(&[1u8, 2][..])),
                ("h", Some(b"x")),
                ("none", None),
            ],
            b"v",
        );
        let event = to_event(&config(), &produced).unwrap();
        assert_eq!(event.extensions.get(RECORD_EXTENSION), None);
        let mut keeping = config();
        keeping.keep_records = true;
        let event = to_event(&keeping, &produced).unwrap();
        let kept: serde_json::Value =
            serde_json::from_str(&event.extensions[RECORD_EXTENSION]).unwrap();
        assert_eq!(
            kept,
            serde_json::json!({
                "bootstrapServers": "127.0.0.1:9092",
                "topic": "orders",
                "partition": 2,
                "offset": 41,
                "timestamp": 1_700_000_000_123_i64,
                "timestampType": "CREATE_TIME",
                "key": "Y3VzdG9tZXItNw==",
                "headers": [["h", "AQI="], ["h", "eA=="], ["none", null]],
            })
        );
    }

    #[test]
    fn a_plain_record_becomes_an_event_with_its_coordinates() {
        let event = to_event(
            &config(),
            &record(
                vec![
                    ("X-Trace-Id", Some(b"abc")),
                    ("type", Some(b"shadow")),
                    ("content-type", Some(b"application/json")),
                    ("bin", Some(&[0xff, 0x00])),
                    ("empty", None),
                ],
                b"{\"n\":1}",
            ),
        )
        .unwrap();
        assert_eq!(event.id, "orders-2-41");
        assert_eq!(event.source, "kafka://main/orders");
        assert_eq!(event.ty, "com.example.order");
        assert_eq!(event.subject.as_deref(), Some("customer-7"));
        assert_eq!(event.time.as_deref(), Some("2023-11-14T22:13:20.123Z"));
        assert_eq!(event.datacontenttype.as_deref(), Some("application/json"));
        assert_eq!(&event.data[..], b"{\"n\":1}");
        assert_eq!(event.attribute("partitionkey"), Some("customer-7"));
        assert_eq!(event.attribute("xtraceid"), Some("abc"));
        assert_eq!(event.attribute("kafkatype"), Some("shadow"));
        assert_eq!(event.attribute("bin"), Some("/wA="));
        assert_eq!(event.attribute("empty"), Some(""));
    }

    #[test]
    fn a_mapping_source_takes_every_record_as_plain_and_others_cannot_claim_its_source() {
        let headers = vec![
            ("ce_specversion", Some(&b"1.0"[..])),
            ("ce_id", Some(&b"e-1"[..])),
            ("ce_source", Some(&b"kafka://esm-other/orders"[..])),
            ("ce_type", Some(&b"order.created"[..])),
        ];
        let mut mapping = config();
        mapping.plain = true;
        let event = to_event(&mapping, &record(headers.clone(), b"{}")).unwrap();
        assert_eq!(event.source, "kafka://main/orders");
        assert_eq!(event.id, "orders-2-41");
        let error = to_event(&config(), &record(headers, b"{}")).unwrap_err();
        assert!(error.to_string().contains("reserved"), "{error}");
    }

    #[test]
    fn a_binary_cloudevent_keeps_its_attributes() {
        let event = to_event(
            &config(),
            &record(
                vec![
                    ("ce_specversion", Some(b"1.0")),
                    ("ce_id", Some(b"e-1")),
                    ("ce_source", Some(b"/shop")),
                    ("ce_type", Some(b"order.created")),
                    ("ce_tenant", Some(b"acme")),
                    ("content-type", Some(b"text/plain")),
                ],
                b"hello",
            ),
        )
        .unwrap();
        assert_eq!((event.id.as_str(), event.source.as_str()), ("e-1", "/shop"));
        assert_eq!(event.ty, "order.created");
        assert_eq!(event.attribute("tenant"), Some("acme"));
        assert_eq!(event.attribute("partitionkey"), Some("customer-7"));
        assert_eq!(event.datacontenttype.as_deref(), Some("text/plain"));
        assert_eq!(event.subject, None);
    }

    #[test]
    fn a_structured_cloudevent_keeps_its_attributes() {
        let body = br#"{"specversion":"1.0","id":"s-1","source":"/s","type":"t","partitionkey":"own","data":{"a":1}}"#;
        let event = to_event(
            &config(),
            &record(
                vec![(
                    "content-type",
                    Some(b"application/cloudevents+json; charset=utf-8"),
                )],
                body,
            ),
        )
        .unwrap();
        assert_eq!(event.id, "s-1");
        assert_eq!(event.attribute("partitionkey"), Some("own"));
        assert_eq!(&event.data[..], b"{\"a\":1}");
    }

    #[test]
    fn a_broken_cloudevent_says_what_is_wrong() {
        let error = to_event(
            &config(),
            &record(
                vec![("ce_specversion", Some(b"1.0")), ("ce_id", Some(b"x"))],
                b"",
            ),
        )
        .unwrap_err();
        assert!(error.to_string().contains("source"), "{error}");
        let error = to_event(
            &config(),
            &record(
                vec![("content-type", Some(b"application/cloudevents+json"))],
                b"{not json",
            ),
        )
        .unwrap_err();
        assert!(error.to_string().contains("not valid JSON"), "{error}");
    }

    #[test]
    fn header_names_follow_the_cloudevents_rules() {
        assert_eq!(extension_name("X-Request-ID"), "xrequestid");
        assert_eq!(extension_name("id"), "kafkaid");
        assert_eq!(extension_name("---"), "kafka");
        assert_eq!(
            extension_name("a-very-long-header-name-indeed"),
            "averylongheadernamei"
        );
    }
}
