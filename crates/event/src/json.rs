//! The CloudEvents JSON format: structured mode (`application/cloudevents+json`) and
//! batch mode (`application/cloudevents-batch+json`).
//!
//! Parsing borrows the request body: the `data` member is sliced out of the original
//! bytes, never re-serialized, so a JSON payload reaches the function exactly as it
//! was sent.

use std::collections::BTreeMap;

use base64::Engine as _;
use bytes::Bytes;
use serde_json::value::RawValue;

use crate::event::{Event, EventError, SPEC_VERSION};

/// Why a structured or batch body is not acceptable. Permanent.
#[derive(Debug, thiserror::Error)]
pub enum StructuredError {
    #[error("body is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("event {index}: {source}")]
    InBatch {
        index: usize,
        #[source]
        source: Box<StructuredError>,
    },
    #[error("{0}")]
    Event(#[from] EventError),
    #[error("attribute `{0}` must be a JSON string")]
    NotAString(String),
    #[error("extension `{0}` must be a string, number or boolean")]
    BadExtensionValue(String),
    #[error("`data_base64` is not valid base64: {0}")]
    Base64(base64::DecodeError),
    #[error("an event may carry `data` or `data_base64`, not both")]
    BothDataMembers,
    #[error("batch is empty")]
    EmptyBatch,
}

/// Parses one structured-mode event out of `body`.
pub fn parse_structured(body: &Bytes) -> Result<Event, StructuredError> {
    let members: BTreeMap<&str, &RawValue> = serde_json::from_slice(body)?;
    event_from_members(body, members)
}

/// Parses a batch-mode body: a JSON array of structured events. Every event is
/// validated before any is returned, so a batch is accepted whole or not at all.
pub fn parse_batch(body: &Bytes) -> Result<Vec<Event>, StructuredError> {
    let items: Vec<&RawValue> = serde_json::from_slice(body)?;
    if items.is_empty() {
        return Err(StructuredError::EmptyBatch);
    }
    items
        .into_iter()
        .enumerate()
        .map(|(index, item)| {
            serde_json::from_str::<BTreeMap<&str, &RawValue>>(item.get())
                .map_err(StructuredError::from)
                .and_then(|members| event_from_members(body, members))
                .map_err(|source| StructuredError::InBatch {
                    index,
                    source: Box::new(source),
                })
        })
        .collect()
}

/// `application/json`, `text/json` or any `+json` media type, parameters ignored.
pub fn is_json_content_type(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || essence == "text/json" || essence.ends_with("+json")
}

fn string_member(name: &str, raw: &RawValue) -> Result<String, StructuredError> {
    serde_json::from_str::<String>(raw.get())
        .map_err(|_| StructuredError::NotAString(name.to_owned()))
}

fn event_from_members(
    body: &Bytes,
    members: BTreeMap<&str, &RawValue>,
) -> Result<Event, StructuredError> {
    let mut event = Event::new(String::new(), String::new(), String::new());
    let mut data: Option<&RawValue> = None;
    let mut data_base64: Option<&RawValue> = None;
    let mut specversion_seen = false;
    for (name, raw) in members {
        match name {
            "data" => data = Some(raw),
            "data_base64" => data_base64 = Some(raw),
            "specversion" => {
                specversion_seen = true;
                let value = string_member(name, raw)?;
                if value != SPEC_VERSION {
                    return Err(EventError::UnsupportedSpecVersion(value).into());
                }
            }
            "id" | "source" | "type" | "subject" | "time" | "datacontenttype" | "dataschema" => {
                event.set_attribute(name, string_member(name, raw)?)?;
            }
            extension => {
                let value: serde_json::Value = serde_json::from_str(raw.get())?;
                let text = match value {
                    serde_json::Value::String(text) => text,
                    serde_json::Value::Bool(flag) => flag.to_string(),
                    serde_json::Value::Number(number) => number.to_string(),
                    serde_json::Value::Null => continue,
                    _ => return Err(StructuredError::BadExtensionValue(extension.to_owned())),
                };
                event.set_attribute(extension, text)?;
            }
        }
    }
    if !specversion_seen {
        return Err(EventError::MissingAttribute("specversion").into());
    }
    event.data = match (data, data_base64) {
        (Some(_), Some(_)) => return Err(StructuredError::BothDataMembers),
        (None, Some(raw)) => {
            let text = string_member("data_base64", raw)?;
            Bytes::from(
                base64::engine::general_purpose::STANDARD
                    .decode(text)
                    .map_err(StructuredError::Base64)?,
            )
        }
        (Some(raw), None) => {
            let json_data = event
                .datacontenttype
                .as_deref()
                .is_none_or(is_json_content_type);
            if event.datacontenttype.is_none() {
                // The JSON format says absent datacontenttype means application/json;
                // binary mode downstream must say so explicitly.
                event.datacontenttype = Some("application/json".to_owned());
            }
            if !json_data && raw.get().starts_with('"') {
                Bytes::from(string_member("data", raw)?)
            } else {
                body.slice_ref(raw.get().as_bytes())
            }
        }
        (None, None) => Bytes::new(),
    };
    event.validate()?;
    Ok(event)
}

/// Serializes an event in the JSON format (structured mode). JSON data is embedded as
/// is, UTF-8 text as a string, anything else as `data_base64`.
pub fn to_structured_json(event: &Event) -> Vec<u8> {
    let mut object = serde_json::Map::new();
    object.insert("specversion".into(), SPEC_VERSION.into());
    object.insert("id".into(), event.id.clone().into());
    object.insert("source".into(), event.source.clone().into());
    object.insert("type".into(), event.ty.clone().into());
    for (name, value) in [
        ("subject", &event.subject),
        ("time", &event.time),
        ("datacontenttype", &event.datacontenttype),
        ("dataschema", &event.dataschema),
    ] {
        if let Some(value) = value {
            object.insert(name.into(), value.clone().into());
        }
    }
    for (name, value) in &event.extensions {
        object.insert(name.clone(), value.clone().into());
    }
    if !event.data.is_empty() {
        let json_type = event
            .datacontenttype
            .as_deref()
            .is_none_or(is_json_content_type);
        let parsed = if json_type {
            serde_json::from_slice::<serde_json::Value>(&event.data).ok()
        } else {
            None
        };
        match (parsed, std::str::from_utf8(&event.data)) {
            (Some(value), _) => {
                object.insert("data".into(), value);
            }
            (None, Ok(text)) if !json_type => {
                object.insert("data".into(), text.into());
            }
            _ => {
                object.insert(
                    "data_base64".into(),
                    base64::engine::general_purpose::STANDARD
                        .encode(&event.data)
                        .into(),
                );
            }
        }
    }
    serde_json::to_vec(&object).expect("a JSON map always serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_data_is_sliced_from_the_body_untouched() {
        let body = Bytes::from_static(
            br#"{"specversion":"1.0","id":"1","source":"/s","type":"t","data":{"b": 1,  "a":[1.50,2]}}"#,
        );
        let event = parse_structured(&body).unwrap();
        assert_eq!(&event.data[..], br#"{"b": 1,  "a":[1.50,2]}"#);
        assert_eq!(event.datacontenttype.as_deref(), Some("application/json"));
    }

    #[test]
    fn text_and_base64_data() {
        let body = Bytes::from_static(
            br#"{"specversion":"1.0","id":"1","source":"/s","type":"t","datacontenttype":"text/plain","data":"hi \"there\"","ext1":5}"#,
        );
        let event = parse_structured(&body).unwrap();
        assert_eq!(&event.data[..], b"hi \"there\"");
        assert_eq!(event.extensions["ext1"], "5");
        let body = Bytes::from_static(
            br#"{"specversion":"1.0","id":"1","source":"/s","type":"t","data_base64":"AP8="}"#,
        );
        assert_eq!(&parse_structured(&body).unwrap().data[..], b"\x00\xff");
    }

    #[test]
    fn batch_errors_name_the_event() {
        let body = Bytes::from_static(
            br#"[{"specversion":"1.0","id":"1","source":"/s","type":"t"},{"specversion":"1.0","id":"2","type":"t"}]"#,
        );
        let error = parse_batch(&body).unwrap_err().to_string();
        assert_eq!(error, "event 1: missing required attribute `source`");
        assert!(matches!(
            parse_batch(&Bytes::from_static(b"[]")),
            Err(StructuredError::EmptyBatch)
        ));
    }

    #[test]
    fn structured_round_trip() {
        let mut event = Event::new("1", "/s", "t");
        event.datacontenttype = Some("application/octet-stream".into());
        event.data = Bytes::from_static(b"\x00\x01");
        event.extensions.insert("partitionkey".into(), "k".into());
        let json = Bytes::from(to_structured_json(&event));
        assert_eq!(parse_structured(&json).unwrap(), event);
    }
}
