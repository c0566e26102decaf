//! What the dispatcher sees of a function: a [`Target`] that takes one event and
//! answers with one [`Outcome`].
//!
//! The outcome vocabulary is the same end to end: `Delivered` acknowledges the event
//! on the bus, `RetryLater` hands it back with a delay held by the bus, `Rejected`
//! dead-letters it at once.

use std::time::Duration;

use async_trait::async_trait;

use crate::Event;

/// The result of one invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The function processed the event. `reply` is a CloudEvent it answered with,
    /// when it answered with one; `answer` is any other non-empty answer it gave.
    Delivered {
        reply: Option<Box<Event>>,
        answer: Option<Box<FunctionAnswer>>,
    },
    /// A transient failure: try again, no sooner than `not_before` when the function
    /// said so (`Retry-After`).
    RetryLater {
        not_before: Option<Duration>,
        failure: Failure,
    },
    /// A permanent failure: retrying the same event cannot succeed.
    Rejected { failure: Failure },
}

/// A function's answer that is not a CloudEvent: its body and content type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionAnswer {
    pub body: bytes::Bytes,
    pub content_type: Option<String>,
}

impl Outcome {
    /// Delivered, with nothing to pass on.
    pub fn delivered() -> Outcome {
        Outcome::Delivered {
            reply: None,
            answer: None,
        }
    }
}

/// What went wrong in one invocation, as recorded on a dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// HTTP status of the function's answer, when there was one.
    pub status: Option<u16>,
    /// Lowercase, human-readable cause.
    pub error: String,
    /// The function asked for less load (429 or 503): shrink its concurrency.
    pub overloaded: bool,
}

impl Failure {
    pub fn new(status: Option<u16>, error: impl Into<String>) -> Self {
        Failure {
            status,
            error: error.into(),
            overloaded: false,
        }
    }
}

/// The result of one invocation with a batch of events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchOutcome {
    /// The same outcome for every event of the batch.
    All(Outcome),
    /// The function handled the batch and named the events that failed (by id); the
    /// others are delivered.
    Partial { failed: Vec<String> },
}

/// Adds to an event what a trigger asked for (an object's presigned URL, metadata,
/// content, ...) just before its function sees it. Nothing it adds is stored: retries
/// and dead letters carry the event as it was accepted.
#[async_trait]
pub trait Enricher: Send + Sync + 'static {
    /// Enriches `event` in place; an error fails this attempt (retried per the
    /// trigger's policy).
    async fn enrich(&self, event: &mut Event) -> Result<(), Failure>;
}

/// Capacity a function set aside for one invocation (for a function whose instances
/// Switchyard runs: a ready instance), from [`Target::reserve`]. Dropping it unused
/// gives the capacity back.
pub struct Reservation(Box<dyn std::any::Any + Send>);

impl Reservation {
    pub fn new<T: std::any::Any + Send>(held: T) -> Self {
        Reservation(Box::new(held))
    }

    /// What the target put in, if it is a `T`.
    pub fn into_inner<T: std::any::Any + Send>(self) -> Option<T> {
        self.0.downcast::<T>().ok().map(|held| *held)
    }
}

/// A function that events are delivered to.
#[async_trait]
pub trait Target: Send + Sync + 'static {
    /// Invokes the function once with `event`; `timeout` bounds the whole call.
    async fn invoke(&self, event: &Event, timeout: Duration) -> Outcome;

    /// Whether [`Target::reserve`] can wait or fail (targets that run their own
    /// instances); the dispatcher skips it otherwise.
    fn reserves(&self) -> bool {
        false
    }

    /// Waits until the function can start an invocation at once. Targets that run
    /// their own instances wait here for a ready one (starting one when none is
    /// idle); the dispatcher waits before the attempt counts, with the event still
    /// unacknowledged on the bus. An error means the function cannot start (its init
    /// failed): the attempt fails with it. By default there is nothing to wait for.
    async fn reserve(&self) -> Result<Option<Reservation>, Failure> {
        Ok(None)
    }

    /// Invokes the function once with `event` on what [`Target::reserve`] set aside.
    async fn invoke_reserved(
        &self,
        reservation: Option<Reservation>,
        event: &Event,
        timeout: Duration,
    ) -> Outcome {
        drop(reservation);
        self.invoke(event, timeout).await
    }

    /// Invokes the function once with a batch. By default, one invocation per event,
    /// one after the other, and the failed ones reported.
    async fn invoke_batch(&self, events: &[Event], timeout: Duration) -> BatchOutcome {
        let mut failed = Vec::new();
        for event in events {
            if !matches!(self.invoke(event, timeout).await, Outcome::Delivered { .. }) {
                failed.push(event.id.clone());
            }
        }
        BatchOutcome::Partial { failed }
    }
}
