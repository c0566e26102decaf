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
}
