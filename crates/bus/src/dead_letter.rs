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

use crate::{event_from_message, event_headers};

/// Why an event was dead-lettered.
pub const REASON_ATTEMPTS_EXHAUSTED: &str = "attempts_exhausted";
pub const REASON_REJECTED: &str = "rejected";
pub const REASON_MAX_AGE_EXCEEDED: &str = "max_age_exceeded";
pub const REASON_MALFORMED: &str = "malformed";

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
            encode_header_value(&self.last_error).into_owned(),
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

    pub fn from_message(
        headers: Option<&HeaderMap>,
        payload: Bytes,
    ) -> Result<DeadLetter, EventError> {
        let event = event_from_message(headers, payload)?;
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
        Ok(DeadLetter {
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
        })
    }
}
