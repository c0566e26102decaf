//! What a connector publishes into: an [`EventSink`] that answers only once the
//! events are durably stored, so the connector can acknowledge its upstream.

use async_trait::async_trait;

use crate::Event;

/// Proof that an event was persisted by the bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishReceipt {
    pub event_id: String,
    /// Stream sequence of the stored copy.
    pub sequence: u64,
    /// The bus already held an event with this id within its duplicate window.
    pub duplicate: bool,
}

/// Why a publish did not complete. `Unavailable` is retryable by the sender (nothing
/// was acknowledged, and re-publishing the same ids is deduplicated); `Rejected` and
/// `TooLarge` are permanent.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("event bus unavailable: {0}")]
    Unavailable(String),
    #[error("event bus rejected the publish: {0}")]
    Rejected(String),
    /// The event is larger than the bus accepts; permanent.
    #[error("{0}")]
    TooLarge(String),
}

/// A durable destination for events.
#[async_trait]
pub trait EventSink: Send + Sync + 'static {
    /// Publishes every event and returns once all of them are persisted, in order.
    /// On error, some events may have been stored: re-publishing is safe because ids
    /// are deduplicated.
    async fn publish_all(&self, events: Vec<Event>) -> Result<Vec<PublishReceipt>, PublishError>;

    /// Publishes every event or none: on error nothing of this call was stored. Events
    /// stored by an earlier call (a resend) are reported as duplicates and the others
    /// stored. By default the same as [`EventSink::publish_all`].
    async fn publish_atomically(
        &self,
        events: Vec<Event>,
    ) -> Result<Vec<PublishReceipt>, PublishError> {
        self.publish_all(events).await
    }
}

/// Remembers which events a source stored, by `source` and `id`, for longer than the
/// events stream's duplicate window (a webhook's delivery id redelivered by hand an
/// hour later is still a duplicate).
#[async_trait]
pub trait DedupHorizon: Send + Sync + 'static {
    /// Whether an event with this `source` and `id` was stored within the horizon.
    async fn seen(&self, event: &Event) -> Result<bool, String>;
    /// Remembers that this event was stored.
    async fn remember(&self, event: &Event) -> Result<(), String>;
}

/// Where a trigger also publishes its results (`on_success`) or its dead letters
/// (`on_failure`): a NATS subject or a Kafka topic.
#[async_trait]
pub trait Destination: Send + Sync + 'static {
    /// For logs and errors, e.g. `kafka topic orders-done`.
    fn describe(&self) -> String;

    /// Publishes `event` in binary mode, with `headers` beside its attributes (a dead
    /// letter's record; `Nats-Msg-Id` for NATS deduplication). `Ok` once the
    /// destination acknowledged it, where it acknowledges.
    async fn publish(&self, event: &Event, headers: &[(String, String)]) -> Result<(), String>;
}

/// A client property (librdkafka, ...) as a configuration file spells it: text, an
/// integer or a boolean, passed on as text.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(untagged)]
pub enum PropertyValue {
    Text(String),
    Integer(i64),
    Boolean(bool),
}

impl std::fmt::Display for PropertyValue {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PropertyValue::Text(text) => formatter.write_str(text),
            PropertyValue::Integer(number) => write!(formatter, "{number}"),
            PropertyValue::Boolean(flag) => write!(formatter, "{flag}"),
        }
    }
}
