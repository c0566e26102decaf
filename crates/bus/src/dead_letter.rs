//! Dead letters: an event that a trigger gave up on, stored unchanged in the
//! dead-letter stream with why and how it failed.
//!
//! The event keeps its `ce-` headers and payload byte for byte; the record adds
//! `Switchyard-Dlq-*` headers. The dead letter's `Nats-Msg-Id` is derived from the
//! trigger and the event's sequence in the events stream, so publishing it twice
//! (a crash between the dead-letter publish and the termination of the original)
//! stores it once.

use async_nats::HeaderMap;
use bytes::Bytes;
use switchyard_event::{Event, EventError, decode_header_value, encode_header_value};

use crate::limits::{self, MAX_HEADER_BYTES, header_block_bytes};
use crate::{event_from_message, event_headers};

/// Longest error text a dead letter keeps.
pub const MAX_ERROR_BYTES: usize = 1024;

/// How a dead letter's event is stored when its headers would not fit:
/// `structured` = the whole event as structured JSON in the body (the `ce-` headers
/// are cut short, for listing only); `Switchyard-Dlq-Data-Dropped` says the data was
/// left out (its size) when even that did not fit.
const HEADER_STORED_AS: &str = "Switchyard-Dlq-Stored-As";
const HEADER_DATA_DROPPED: &str = "Switchyard-Dlq-Data-Dropped";
/// The longest attribute value kept in a cut-short header.
const CUT_ATTRIBUTE_BYTES: usize = 256;

/// Why an event was dead-lettered.
pub const REASON_ATTEMPTS_EXHAUSTED: &str = "attempts_exhausted";
pub const REASON_REJECTED: &str = "rejected";
pub const REASON_MAX_AGE_EXCEEDED: &str = "max_age_exceeded";
pub const REASON_MALFORMED: &str = "malformed";
/// Delivered `retry.max_unfinished` times with no outcome: every process that took it
/// died or hung before the invocation ended.
pub const REASON_UNPROCESSABLE: &str = "unprocessable";

const HEADER_REASON: &str = "Switchyard-Dlq-Reason";
const HEADER_TRIGGER: &str = "Switchyard-Dlq-Trigger";
const HEADER_FUNCTION: &str = "Switchyard-Dlq-Function";
const HEADER_ATTEMPTS: &str = "Switchyard-Dlq-Attempts";
const HEADER_LAST_STATUS: &str = "Switchyard-Dlq-Last-Status";
const HEADER_LAST_ERROR: &str = "Switchyard-Dlq-Last-Error";
const HEADER_FIRST_ATTEMPT: &str = "Switchyard-Dlq-First-Attempt";
const HEADER_LAST_ATTEMPT: &str = "Switchyard-Dlq-Last-Attempt";
const HEADER_RECEIVED: &str = "Switchyard-Dlq-Received";
const HEADER_EVENT_SEQUENCE: &str = "Switchyard-Dlq-Event-Sequence";

/// One dead letter: the event and the record of its failure. Times are RFC 3339.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub event: Event,
    pub reason: String,
    pub trigger: String,
    pub function: String,
    pub attempts: u64,
    pub last_status: Option<u16>,
    pub last_error: String,
    /// When the first attempt was made, when it is known.
    pub first_attempt_at: Option<String>,
    pub last_attempt_at: String,
    /// When the bus stored the event.
    pub received_at: String,
    /// The event's sequence in the events stream.
    pub event_sequence: u64,
}

impl DeadLetter {
    pub fn message_id(&self) -> String {
        format!(
            "dlq {} {}",
            encode_header_value(&self.trigger),
            self.event_sequence
        )
    }

    /// The `Switchyard-Dlq-*` headers of the record (values percent-encoded where
    /// free text), and the `Nats-Msg-Id`.
    pub fn record_headers(&self) -> Vec<(String, String)> {
        let mut headers = vec![
            (HEADER_REASON.to_owned(), self.reason.clone()),
            (
                HEADER_TRIGGER.to_owned(),
                encode_header_value(&self.trigger).into_owned(),
            ),
            (
                HEADER_FUNCTION.to_owned(),
                encode_header_value(&self.function).into_owned(),
            ),
            (HEADER_ATTEMPTS.to_owned(), self.attempts.to_string()),
        ];
        if let Some(status) = self.last_status {
            headers.push((HEADER_LAST_STATUS.to_owned(), status.to_string()));
        }
        headers.push((
            HEADER_LAST_ERROR.to_owned(),
            encode_header_value(&limits::shorten(&self.last_error, MAX_ERROR_BYTES)).into_owned(),
        ));
        if let Some(first) = &self.first_attempt_at {
            headers.push((HEADER_FIRST_ATTEMPT.to_owned(), first.clone()));
        }
        headers.push((HEADER_LAST_ATTEMPT.to_owned(), self.last_attempt_at.clone()));
        headers.push((HEADER_RECEIVED.to_owned(), self.received_at.clone()));
        headers.push((
            HEADER_EVENT_SEQUENCE.to_owned(),
            self.event_sequence.to_string(),
        ));
        headers.push(("Nats-Msg-Id".to_owned(), self.message_id()));
        headers
    }

    pub fn to_message(&self) -> (HeaderMap, Bytes) {
        let mut headers = event_headers(&self.event, &self.message_id());
        for (name, value) in self.record_headers() {
            headers.insert(name.as_str(), value.as_str());
        }
        (headers, self.event.data.clone())
    }

    /// The message of this dead letter, fitted under JetStream's header limit and
    /// `max_payload`, so it can always be stored: the event's headers and payload as
    /// they are when they fit; otherwise the whole event as structured JSON in the
    /// body with its `ce-` headers cut short; and if even that is too large, without
    /// its data (`Switchyard-Dlq-Data-Dropped` gives its size).
    pub fn to_message_within(&self, max_payload: usize) -> (HeaderMap, Bytes) {
        self.to_message_with_id_within(&self.message_id(), max_payload)
    }

    /// [`DeadLetter::to_message_within`] with `message_id` as its `Nats-Msg-Id` (a
    /// source's dead letter is identified by its input, not by a stream sequence),
    /// counted in what must fit.
    pub fn to_message_with_id_within(
        &self,
        message_id: &str,
        max_payload: usize,
    ) -> (HeaderMap, Bytes) {
        let (mut headers, payload) = self.to_message();
        headers.insert("Nats-Msg-Id", message_id);
        let header_bytes = header_block_bytes(&headers);
        if header_bytes <= MAX_HEADER_BYTES && header_bytes + payload.len() <= max_payload {
            return (headers, payload);
        }
        let mut headers = HeaderMap::new();
        for (name, value) in self.event.binary_headers() {
            headers.insert(name.as_ref(), cut_encoded(&value, CUT_ATTRIBUTE_BYTES));
        }
        for (name, value) in self.record_headers() {
            headers.insert(name.as_str(), value.as_str());
        }
        headers.insert("Nats-Msg-Id", message_id);
        headers.insert(HEADER_STORED_AS, "structured");
        let mut body = switchyard_event::to_structured_json(&self.event);
        if header_block_bytes(&headers) + body.len() > max_payload {
            let mut without_data = self.event.clone();
            without_data.data = Bytes::new();
            headers.insert(HEADER_DATA_DROPPED, self.event.data.len().to_string());
            body = switchyard_event::to_structured_json(&without_data);
            if header_block_bytes(&headers) + body.len() > max_payload {
                // Attributes alone over the payload limit: keep the cut-short headers.
                body = Vec::new();
            }
        }
        (headers, Bytes::from(body))
    }

    pub fn from_message(
        headers: Option<&HeaderMap>,
        payload: Bytes,
    ) -> Result<DeadLetter, EventError> {
        let structured = headers
            .and_then(|headers| headers.get(HEADER_STORED_AS))
            .is_some_and(|value| value.as_str() == "structured")
            && !payload.is_empty();
        let event = if structured {
            switchyard_event::parse_structured(&payload).map_err(|error| {
                EventError::InvalidAttribute {
                    name: "data".to_owned(),
                    reason: format!("stored structured event unreadable: {error}"),
                }
            })?
        } else {
            let mut event = event_from_message(headers, payload)?;
            if structured {
                event.data = Bytes::new();
            }
            event
        };
        Ok(Self::with_record(headers, event))
    }

    /// A dead letter whose message is not a CloudEvent (reason `malformed`: what a
    /// trigger's consumer received was not one): its record from the headers, and
    /// as event a placeholder (`id` = `malformed`, `type` =
    /// `dev.switchyard.malformed`) carrying the payload as it was stored.
    pub fn malformed_from_message(headers: Option<&HeaderMap>, payload: Bytes) -> DeadLetter {
        let mut event = Event::new(
            "malformed",
            "switchyard:malformed",
            "dev.switchyard.malformed",
        );
        // Shown as text when it is text, base64 otherwise.
        event.datacontenttype = Some(if std::str::from_utf8(&payload).is_ok() {
            "text/plain; charset=utf-8".to_owned()
        } else {
            "application/octet-stream".to_owned()
        });
        event.data = payload;
        Self::with_record(headers, event)
    }

    fn with_record(headers: Option<&HeaderMap>, event: Event) -> DeadLetter {
        let text = |name: &str| -> Option<String> {
            headers
                .and_then(|headers| headers.get(name))
                .map(|value| value.as_str().to_owned())
        };
        let decoded = |name: &str| -> String {
            text(name)
                .and_then(|value| decode_header_value(name, &value).ok())
                .unwrap_or_default()
        };
        DeadLetter {
            event,
            reason: text(HEADER_REASON).unwrap_or_default(),
            trigger: decoded(HEADER_TRIGGER),
            function: decoded(HEADER_FUNCTION),
            attempts: text(HEADER_ATTEMPTS)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            last_status: text(HEADER_LAST_STATUS).and_then(|v| v.parse().ok()),
            last_error: decoded(HEADER_LAST_ERROR),
            first_attempt_at: text(HEADER_FIRST_ATTEMPT),
            last_attempt_at: text(HEADER_LAST_ATTEMPT).unwrap_or_default(),
            received_at: text(HEADER_RECEIVED).unwrap_or_default(),
            event_sequence: text(HEADER_EVENT_SEQUENCE)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        }
    }
}

/// A percent-encoded value cut to at most `limit` bytes, never inside a `%XX`.
fn cut_encoded(value: &str, limit: usize) -> String {
    if value.len() <= limit {
        return value.to_owned();
    }
    let mut end = limit;
    if let Some(percent) = value[end.saturating_sub(2)..end].find('%') {
        end = end - 2 + percent;
    }
    value[..end].to_owned()
}
