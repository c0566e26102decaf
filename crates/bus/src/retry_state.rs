//! What travels with an event between attempts: how many were made, when the first
//! one was, how the last one failed, when the event was first stored, and when the next
//! attempt is due. Carried as `Switchyard-*` headers on the retry and direct copies of
//! the event, so no attempt state lives in a process's memory or in a side store.

use async_nats::HeaderMap;
use switchyard_event::{decode_header_value, encode_header_value};

const HEADER_ATTEMPTS: &str = "Switchyard-Attempts";
const HEADER_RETRY_AT: &str = "Switchyard-Retry-At";
const HEADER_FIRST_ATTEMPT: &str = "Switchyard-First-Attempt";
const HEADER_RECEIVED: &str = "Switchyard-Received";
const HEADER_LAST_STATUS: &str = "Switchyard-Last-Status";
const HEADER_LAST_ERROR: &str = "Switchyard-Last-Error";
const HEADER_EVENT_SEQUENCE: &str = "Switchyard-Event-Sequence";

/// Attempt history of an event on one trigger. Times are RFC 3339, except
/// `retry_at_unix_ms`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetryState {
    /// Attempts already made.
    pub attempts: u64,
    pub first_attempt_at: Option<String>,
    /// When the bus first stored the event (what `max_age` counts from).
    pub received_at: Option<String>,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    /// Sequence of the event's first copy in the events stream.
    pub event_sequence: Option<u64>,
    /// When the next attempt is due, in unix milliseconds.
    pub retry_at_unix_ms: Option<i64>,
}

impl RetryState {
    pub fn from_headers(headers: Option<&HeaderMap>) -> RetryState {
        let Some(headers) = headers else {
            return RetryState::default();
        };
        let text = |name: &str| headers.get(name).map(|value| value.as_str().to_owned());
        RetryState {
            attempts: text(HEADER_ATTEMPTS)
                .and_then(|value| value.parse().ok())
                .unwrap_or(0),
            first_attempt_at: text(HEADER_FIRST_ATTEMPT),
            received_at: text(HEADER_RECEIVED),
            last_status: text(HEADER_LAST_STATUS).and_then(|value| value.parse().ok()),
            last_error: text(HEADER_LAST_ERROR)
                .and_then(|value| decode_header_value(HEADER_LAST_ERROR, &value).ok()),
            event_sequence: text(HEADER_EVENT_SEQUENCE).and_then(|value| value.parse().ok()),
            retry_at_unix_ms: text(HEADER_RETRY_AT).and_then(|value| value.parse().ok()),
        }
    }

    /// Adds this state to `headers` (an event's binary-mode headers).
    pub fn write_headers(&self, headers: &mut HeaderMap) {
        headers.insert(HEADER_ATTEMPTS, self.attempts.to_string());
        if let Some(first) = &self.first_attempt_at {
            headers.insert(HEADER_FIRST_ATTEMPT, first.as_str());
        }
        if let Some(received) = &self.received_at {
            headers.insert(HEADER_RECEIVED, received.as_str());
        }
        if let Some(status) = self.last_status {
            headers.insert(HEADER_LAST_STATUS, status.to_string());
        }
        if let Some(error) = &self.last_error {
            headers.insert(HEADER_LAST_ERROR, encode_header_value(error).as_ref());
        }
        if let Some(sequence) = self.event_sequence {
            headers.insert(HEADER_EVENT_SEQUENCE, sequence.to_string());
        }
        if let Some(retry_at) = self.retry_at_unix_ms {
            headers.insert(HEADER_RETRY_AT, retry_at.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_through_headers() {
        let state = RetryState {
            attempts: 3,
            first_attempt_at: Some("2024-01-01T00:00:00Z".into()),
            received_at: Some("2023-12-31T23:59:59Z".into()),
            last_status: Some(503),
            last_error: Some("function answered 503: try \"later\"\n".into()),
            event_sequence: Some(42),
            retry_at_unix_ms: Some(1_700_000_000_000),
        };
        let mut headers = HeaderMap::new();
        state.write_headers(&mut headers);
        assert_eq!(RetryState::from_headers(Some(&headers)), state);
        assert_eq!(RetryState::from_headers(None), RetryState::default());
    }
}
