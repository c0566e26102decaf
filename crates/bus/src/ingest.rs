//! Storing what a queue source received (SQS messages, AMQP deliveries, MQTT
//! publishes) before it acknowledges them upstream: the events in the order they
//! came, retried while the bus is unavailable; an input that can never be stored
//! (not a valid event, larger than the bus takes, claiming another door's `source`)
//! dead-lettered under `source:<name>` with why. Only once [`store_inputs`] returns `Some` may the
//! source acknowledge (delete, ack) the inputs: each is then stored or a dead
//! letter.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use switchyard_event::backoff::Backoff;
use switchyard_event::telemetry;
use switchyard_event::{Event, PublishError, ReservedSources};
use tokio_util::sync::CancellationToken;

use crate::Bus;

/// One input a source received.
#[derive(Debug, Clone)]
pub enum Input {
    /// The events it became, stored in order.
    Events(Vec<Event>),
    /// It cannot become an event: `event` keeps what could be read of it, for its
    /// dead letter (`reason`: `malformed`, `too_large`, `reserved_source`).
    Invalid {
        event: Box<Event>,
        reason: &'static str,
        error: String,
    },
}

/// The reserved event sources of the running configuration, replaced on every
/// reload.
pub type SharedReserved = Arc<RwLock<Arc<ReservedSources>>>;

/// Who a source is, to tell its own events from forged ones: an event whose
/// `source` belongs to another door (a webhook, a schedule, another queue source)
/// is dead-lettered as `reserved_source` instead of stored, so nobody who can write
/// to a queue can forge another door's event or spend its id first.
#[derive(Clone, Default)]
pub struct Claims {
    reserved: SharedReserved,
    /// How the reserved sources name this source (e.g. "sqs source `orders`").
    owner: String,
}

impl Claims {
    pub fn new(reserved: SharedReserved, owner: impl Into<String>) -> Claims {
        Claims {
            reserved,
            owner: owner.into(),
        }
    }

    /// Why `event` may not be stored by this source, if it may not.
    fn refusal(&self, event: &Event) -> Option<String> {
        let reserved = self.reserved.read().expect("reserved sources lock").clone();
        reserved
            .other_owner(&event.source, &self.owner)
            .map(|owner| {
                format!(
                    "the event's source `{}` belongs to {owner}; only it produces events with that source",
                    event.source
                )
            })
    }
}

/// What [`store_inputs`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    /// Events stored (a duplicate of one stored before counts too).
    pub events: usize,
    /// Inputs stored as dead letters.
    pub dead_lettered: usize,
}

/// The pause between tries while the bus is unavailable: 200 ms, doubling up to 6.4 s.
fn bus_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(200), Duration::from_millis(6400))
}

/// Stores `inputs` for source `source`: their events in order, the invalid ones and
/// any event larger than the bus takes as dead letters. Retries while the bus is
/// unavailable; `None` when `abandoned` fired first (then nothing may be
/// acknowledged upstream: what was stored is deduplicated when it comes again).
pub async fn store_inputs(
    bus: &Bus,
    source: &str,
    claims: &Claims,
    inputs: Vec<Input>,
    abandoned: &CancellationToken,
) -> Option<Stored> {
    let mut events = Vec::new();
    let mut invalid = Vec::new();
    // Each stored event's ingest span (see switchyard_event::telemetry), ended when
    // this returns.
    let mut spans = Vec::new();
    for input in inputs {
        match input {
            Input::Events(more) => {
                for mut event in more {
                    match claims.refusal(&event) {
                        None => {
                            if telemetry::enabled() {
                                spans.push(telemetry::start_ingest(
                                    &mut event,
                                    format!("ingest {source}"),
                                    telemetry::SpanKind::Consumer,
                                    source,
                                ));
                            }
                            events.push(event);
                        }
                        Some(error) => invalid.push((event, "reserved_source", error)),
                    }
                }
            }
            Input::Invalid {
                event,
                reason,
                error,
            } => invalid.push((*event, reason, error)),
        }
    }
    let mut stored = Stored::default();
    if !events.is_empty() {
        match publish_retrying(bus, source, &events, abandoned).await? {
            Ok(()) => stored.events = events.len(),
            Err(_) => {
                // One of them cannot be stored: one by one, in order, to find it.
                for event in events {
                    match publish_retrying(bus, source, std::slice::from_ref(&event), abandoned)
                        .await?
                    {
                        Ok(()) => stored.events += 1,
                        Err((reason, error)) => invalid.push((event, reason, error)),
                    }
                }
            }
        }
    }
    for (event, reason, error) in invalid {
        dead_letter(bus, source, event, reason, &error, abandoned).await?;
        stored.dead_lettered += 1;
    }
    drop(spans);
    Some(stored)
}

/// Publishes `events` in order, retrying while the bus is unavailable: `Ok` once
/// stored, `Err` with the dead-letter reason and why when one can never be (too
/// large, refused by the stream), `None` when abandoned.
async fn publish_retrying(
    bus: &Bus,
    source: &str,
    events: &[Event],
    abandoned: &CancellationToken,
) -> Option<Result<(), (&'static str, String)>> {
    let mut failures = bus_backoff();
    loop {
        match bus.publish_events(events).await {
            Ok(_) => {
                if failures.failing() {
                    tracing::info!(source, "storing events works again");
                }
                return Some(Ok(()));
            }
            Err(PublishError::TooLarge(error)) => return Some(Err(("too_large", error))),
            Err(PublishError::Rejected(error)) => return Some(Err(("rejected", error))),
            Err(error) => {
                if failures.failed() {
                    tracing::warn!(source, %error, failures = failures.failures(), "storing events failed; trying again");
                }
                if !failures.pause(abandoned.cancelled()).await {
                    return None;
                }
            }
        }
    }
}

/// Stores one input as a dead letter of `source:<source>`, retrying while the bus is
/// unavailable. A dead letter that is itself too large is logged and skipped (the
/// dead letter keeps what fits, so this is a bus with a tiny max_payload).
async fn dead_letter(
    bus: &Bus,
    source: &str,
    event: Event,
    reason: &str,
    error: &str,
    abandoned: &CancellationToken,
) -> Option<()> {
    tracing::error!(source, event_id = %event.id, reason, %error, "input cannot become an event; dead-lettered");
    let mut failures = bus_backoff();
    loop {
        match bus
            .dead_letter_input(source, event.clone(), reason, error)
            .await
        {
            Ok(()) => return Some(()),
            Err(PublishError::TooLarge(failure)) if !event.extensions.is_empty() => {
                // Its attributes do not fit even cut short: the dead letter keeps the
                // core attributes and the data, and says what it dropped.
                tracing::warn!(source, event_id = %event.id, error = %failure, "the dead letter of an input is too large with its extension attributes; storing it without them");
                let dropped = event.extensions.len();
                let mut stripped = event.clone();
                stripped.extensions.clear();
                let error = format!(
                    "{error} (its {dropped} extension attributes were dropped to fit the dead letter)"
                );
                return Box::pin(dead_letter(
                    bus, source, stripped, reason, &error, abandoned,
                ))
                .await;
            }
            Err(PublishError::TooLarge(failure)) => {
                tracing::error!(source, event_id = %event.id, error = %failure, "the dead letter of an input is itself too large; input skipped");
                return Some(());
            }
            Err(failure) => {
                if failures.failed() {
                    tracing::warn!(source, error = %failure, "storing a dead letter failed; trying again");
                }
                if !failures.pause(abandoned.cancelled()).await {
                    return None;
                }
            }
        }
    }
}
