//! Binary content mode: attributes as `ce-` headers, data as the message body.
//!
//! The same encoding serves the HTTP binding and the NATS binding (NATS headers follow
//! HTTP's rules). Header values are percent-encoded as the HTTP binding requires
//! (space, `"`, `%` and anything outside printable ASCII), so any attribute value
//! survives any hop byte for byte.

use std::borrow::Cow;

use bytes::Bytes;
use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};

use crate::event::{Event, EventError, SPEC_VERSION};

/// The characters the CloudEvents HTTP binding requires to be percent-encoded, beside
/// every non-ASCII byte (which `utf8_percent_encode` always encodes).
const HEADER_VALUE_ESCAPES: &AsciiSet = &CONTROLS.add(b' ').add(b'"').add(b'%');

/// One header of a binary-mode message: its name and its encoded value.
pub type BinaryHeaders<'a> = Vec<(Cow<'static, str>, Cow<'a, str>)>;

/// Encodes a string attribute value for a `ce-` header.
pub fn encode_header_value(value: &str) -> Cow<'_, str> {
    utf8_percent_encode(value, HEADER_VALUE_ESCAPES).into()
}

/// Decodes a `ce-` header value; invalid UTF-8 after decoding is an error.
pub fn decode_header_value(name: &str, value: &str) -> Result<String, EventError> {
    percent_decode_str(value)
        .decode_utf8()
        .map(Cow::into_owned)
        .map_err(|_| EventError::InvalidAttribute {
            name: name.to_owned(),
            reason: "percent-encoded value is not valid UTF-8".to_owned(),
        })
}

impl Event {
    /// The headers of this event in binary content mode: `ce-specversion`, `ce-id`,
    /// ..., one `ce-<name>` per extension, and `content-type` for `datacontenttype`.
    pub fn binary_headers(&self) -> BinaryHeaders<'_> {
        let mut headers: BinaryHeaders<'_> = Vec::with_capacity(6 + self.extensions.len());
        headers.push((Cow::Borrowed("ce-specversion"), Cow::Borrowed(SPEC_VERSION)));
        headers.push((Cow::Borrowed("ce-id"), encode_header_value(&self.id)));
        headers.push((
            Cow::Borrowed("ce-source"),
            encode_header_value(&self.source),
        ));
        headers.push((Cow::Borrowed("ce-type"), encode_header_value(&self.ty)));
        let optional = [
            ("ce-subject", &self.subject),
            ("ce-time", &self.time),
            ("ce-dataschema", &self.dataschema),
        ];
        for (name, value) in optional {
            if let Some(value) = value {
                headers.push((Cow::Borrowed(name), encode_header_value(value)));
            }
        }
        if let Some(content_type) = &self.datacontenttype {
            headers.push((Cow::Borrowed("content-type"), Cow::Borrowed(content_type)));
        }
        for (name, value) in &self.extensions {
            headers.push((Cow::Owned(format!("ce-{name}")), encode_header_value(value)));
        }
        headers
    }

    /// Builds an event from binary-mode headers and a body. Header names are matched
    /// case-insensitively; headers without the `ce-` prefix (other than
    /// `content-type`) are ignored. The result is validated.
    pub fn from_binary<'a>(
        headers: impl IntoIterator<Item = (&'a str, &'a str)>,
        data: Bytes,
    ) -> Result<Event, EventError> {
        let mut event = Event::new(String::new(), String::new(), String::new());
        let mut specversion_seen = false;
        for (name, value) in headers {
            if name.eq_ignore_ascii_case("content-type") {
                event.datacontenttype = Some(value.to_owned());
                continue;
            }
            let Some(prefix) = name.get(..3) else {
                continue;
            };
            if !prefix.eq_ignore_ascii_case("ce-") {
                continue;
            }
            let attribute = name[3..].to_ascii_lowercase();
            let value = decode_header_value(&attribute, value)?;
            if attribute == "specversion" {
                specversion_seen = true;
            }
            event.set_attribute(&attribute, value)?;
        }
        if !specversion_seen {
            return Err(EventError::MissingAttribute("specversion"));
        }
        event.data = data;
        event.validate()?;
        Ok(event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_awkward_values() {
        let mut event = Event::new("id 1", "/hooks/ünïcode", "com.example.a\"b%c");
        event.subject = Some("red flower.jpg".into());
        event.time = Some("2024-01-01T00:00:00Z".into());
        event.datacontenttype = Some("text/plain; charset=utf-8".into());
        event
            .extensions
            .insert("traceparent".into(), "00-abc-def-01".into());
        event.data = Bytes::from_static(b"\x00\xffbinary");
        let headers = event.binary_headers();
        for (name, value) in &headers {
            if name != "content-type" {
                assert!(
                    value.bytes().all(|byte| (0x21..0x7f).contains(&byte)),
                    "{name}: {value}"
                );
            }
        }
        let decoded = Event::from_binary(
            headers
                .iter()
                .map(|(name, value)| (name.as_ref(), value.as_ref())),
            event.data.clone(),
        )
        .unwrap();
        assert_eq!(decoded, event);
    }

    #[test]
    fn missing_specversion_is_named() {
        let error = Event::from_binary(
            [("ce-id", "1"), ("ce-source", "/s"), ("ce-type", "t")],
            Bytes::new(),
        )
        .unwrap_err();
        assert_eq!(error, EventError::MissingAttribute("specversion"));
    }
}
