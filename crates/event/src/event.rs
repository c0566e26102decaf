use std::collections::BTreeMap;

use bytes::Bytes;

/// The only CloudEvents version Switchyard accepts.
pub const SPEC_VERSION: &str = "1.0";

/// Attribute names defined by the CloudEvents core specification; an extension may
/// not reuse them.
/// The CloudEvents 1.0 context attributes an extension may not be named after.
pub const CORE_ATTRIBUTES: [&str; 8] = [
    "id",
    "source",
    "specversion",
    "type",
    "subject",
    "time",
    "datacontenttype",
    "dataschema",
];

/// A CloudEvents 1.0 event: context attributes plus opaque data bytes.
///
/// Extension values are carried as strings, which is how every binary-mode binding
/// (HTTP, NATS, Kafka) represents them on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub id: String,
    pub source: String,
    pub ty: String,
    pub subject: Option<String>,
    /// RFC 3339 timestamp, kept exactly as received.
    pub time: Option<String>,
    pub datacontenttype: Option<String>,
    pub dataschema: Option<String>,
    pub extensions: BTreeMap<String, String>,
    pub data: Bytes,
}

/// Why an event is not a valid CloudEvent. Always permanent: resending the same
/// bytes cannot succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("missing required attribute `{0}`")]
    MissingAttribute(&'static str),
    #[error("attribute `{name}` is invalid: {reason}")]
    InvalidAttribute { name: String, reason: String },
    #[error("unsupported specversion `{0}`, only `1.0` is accepted")]
    UnsupportedSpecVersion(String),
    #[error(
        "extension name `{0}` is invalid: names are 1 to 20 lowercase letters a-z or digits 0-9 and may not reuse a core attribute name"
    )]
    InvalidExtensionName(String),
}

impl Event {
    /// A new event with the required attributes and no data.
    pub fn new(id: impl Into<String>, source: impl Into<String>, ty: impl Into<String>) -> Self {
        Event {
            id: id.into(),
            source: source.into(),
            ty: ty.into(),
            subject: None,
            time: None,
            datacontenttype: None,
            dataschema: None,
            extensions: BTreeMap::new(),
            data: Bytes::new(),
        }
    }

    /// Checks every rule of the CloudEvents 1.0 core specification that can be
    /// checked without looking at the data.
    pub fn validate(&self) -> Result<(), EventError> {
        if self.id.is_empty() {
            return Err(EventError::MissingAttribute("id"));
        }
        if self.source.is_empty() {
            return Err(EventError::MissingAttribute("source"));
        }
        if self.ty.is_empty() {
            return Err(EventError::MissingAttribute("type"));
        }
        for (name, value) in [("subject", &self.subject), ("dataschema", &self.dataschema)] {
            if value.as_deref() == Some("") {
                return Err(EventError::InvalidAttribute {
                    name: name.to_owned(),
                    reason: "must not be empty when present".to_owned(),
                });
            }
        }
        if let Some(content_type) = &self.datacontenttype
            && (content_type.is_empty()
                || content_type
                    .bytes()
                    .any(|byte| !(0x20..0x7f).contains(&byte)))
        {
            // It travels as a plain `content-type` header (not percent-encoded), so
            // it must be one: media types are printable ASCII (RFC 6838).
            return Err(EventError::InvalidAttribute {
                name: "datacontenttype".to_owned(),
                reason: "must be a non-empty media type of printable ASCII characters".to_owned(),
            });
        }
        if let Some(time) = &self.time {
            time::OffsetDateTime::parse(time, &time::format_description::well_known::Rfc3339)
                .map_err(|error| EventError::InvalidAttribute {
                    name: "time".to_owned(),
                    reason: format!("`{time}` is not an RFC 3339 timestamp ({error})"),
                })?;
        }
        for name in self.extensions.keys() {
            if !is_valid_extension_name(name) {
                return Err(EventError::InvalidExtensionName(name.clone()));
            }
        }
        Ok(())
    }

    /// Reads an attribute (core or extension) by its CloudEvents name, as a filter
    /// sees it.
    pub fn attribute(&self, name: &str) -> Option<&str> {
        match name {
            "id" => Some(&self.id),
            "source" => Some(&self.source),
            "specversion" => Some(SPEC_VERSION),
            "type" => Some(&self.ty),
            "subject" => self.subject.as_deref(),
            "time" => self.time.as_deref(),
            "datacontenttype" => self.datacontenttype.as_deref(),
            "dataschema" => self.dataschema.as_deref(),
            other => self.extensions.get(other).map(String::as_str),
        }
    }

    /// Sets an attribute (core or extension) by its CloudEvents name. `specversion`
    /// is checked, not stored.
    pub fn set_attribute(&mut self, name: &str, value: String) -> Result<(), EventError> {
        match name {
            "id" => self.id = value,
            "source" => self.source = value,
            "specversion" => {
                if value != SPEC_VERSION {
                    return Err(EventError::UnsupportedSpecVersion(value));
                }
            }
            "type" => self.ty = value,
            "subject" => self.subject = Some(value),
            "time" => self.time = Some(value),
            "datacontenttype" => self.datacontenttype = Some(value),
            "dataschema" => self.dataschema = Some(value),
            other => {
                if !is_valid_extension_name(other) {
                    return Err(EventError::InvalidExtensionName(other.to_owned()));
                }
                self.extensions.insert(other.to_owned(), value);
            }
        }
        Ok(())
    }
}

/// CloudEvents attribute naming: lowercase a-z and 0-9. The specification recommends
/// at most 20 characters; Switchyard enforces it so names fit every binding.
pub fn is_valid_extension_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 20
        && name
            .bytes()
            .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit())
        && !CORE_ATTRIBUTES.contains(&name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_names_the_broken_attribute() {
        let mut event = Event::new("1", "/s", "t");
        assert_eq!(event.validate(), Ok(()));
        event.time = Some("yesterday".into());
        let error = event.validate().unwrap_err();
        assert!(error.to_string().contains("`time`"), "{error}");
        event.time = Some("2024-01-02T03:04:05.123Z".into());
        assert_eq!(event.validate(), Ok(()));
        event.id.clear();
        assert_eq!(event.validate(), Err(EventError::MissingAttribute("id")));
    }

    #[test]
    fn extension_names_follow_the_spec() {
        assert!(is_valid_extension_name("traceparent"));
        assert!(is_valid_extension_name("partitionkey"));
        assert!(!is_valid_extension_name("Trace"));
        assert!(!is_valid_extension_name("trace_parent"));
        assert!(!is_valid_extension_name("aaaaaaaaaaaaaaaaaaaaa"));
        assert!(!is_valid_extension_name("source"));
        let mut event = Event::new("1", "/s", "t");
        assert!(event.set_attribute("Bad-Name", "x".into()).is_err());
        assert!(event.set_attribute("specversion", "0.3".into()).is_err());
    }
}
