//! Invoking a function for one delivery: the permits it still needs, progress while
//! it runs, enrichment, the call bounded by its timeout, and publishing the
//! function's reply. What happens with the outcome is [`crate::settle`]'s.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use switchyard_bus::async_nats::jetstream::{self, AckKind};
use switchyard_event::telemetry::{self, KeyValue, SpanKind, TraceSpan};
use switchyard_event::timestamp::rfc3339;
use switchyard_event::{Event, Failure, Outcome, PublishError};
use tokio_util::sync::CancellationToken;

use crate::delivery::prepare;
use crate::metrics::TriggerOnlyLabels;
use crate::permits::{Permits, acquire_shared_permits};
use crate::settle::{InPlace, Settled, hand_back};
use crate::{Shared, TriggerRuntime};

pub(crate) struct InFlight<'a> {
    trigger: &'a TriggerRuntime,
}

impl<'a> InFlight<'a> {
    pub(crate) fn start(trigger: &'a TriggerRuntime) -> Self {
        trigger.in_flight.fetch_add(1, Ordering::Relaxed);
        trigger.metrics.in_flight.inc();
        InFlight { trigger }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.trigger.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.trigger.metrics.in_flight.dec();
    }
}

/// Sends progress for `message` every `every` until dropped, so JetStream does not
/// redeliver an event that is still being handled.
pub(crate) async fn keep_in_progress(message: &jetstream::Message, every: Duration) {
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        ticker.tick().await;
        let _ = message.ack_with(AckKind::Progress).await;
    }
}

pub(crate) async fn handle_message(
    trigger: Arc<TriggerRuntime>,
    shared: Arc<Shared>,
    message: jetstream::Message,
    permits: Permits,
    shutdown: CancellationToken,
    abandon: CancellationToken,
) {
    let mut permits = permits;
    let _in_flight = InFlight::start(&trigger);
    let every = (trigger.config.ack_wait / 3).max(Duration::from_millis(100));
    if permits.trigger.is_none() {
        // An event of the direct consumer: take the trigger's permit now, asking the
        // main pull loop for one it holds idle if none is free.
        if let Ok(taken) = trigger.permits.clone().try_acquire_owned() {
            permits.trigger = Some(taken);
        } else {
            trigger.permit_wanted.notify_one();
        }
    }
    if permits.trigger.is_none() {
        tokio::select! {
            taken = Box::pin(trigger.permits.clone().acquire_owned()) => permits.trigger = Some(taken.expect("never closed")),
            () = keep_in_progress(&message, every) => {}
            () = shutdown.cancelled() => {
                Box::pin(hand_back(&trigger, &shared, &message, None)).await;
                return;
            }
        }
    }
    if permits.shared.is_none() {
        // The event of an idle trigger's pull: take the shared permits now.
        tokio::select! {
            taken = Box::pin(acquire_shared_permits(&trigger, &shared)) => permits.shared = Some(taken),
            () = keep_in_progress(&message, every) => {}
            () = shutdown.cancelled() => {
                // Not started yet: hand it back at once for another process.
                Box::pin(hand_back(&trigger, &shared, &message, None)).await;
                return;
            }
        }
    }
    let _permits = permits;
    tokio::select! {
        _ = handle(&trigger, &shared, &message, &abandon, None) => {}
        () = keep_in_progress(&message, every) => {}
    }
}

/// Invokes `invocation` bounded by `timeout` (plus a second, should a target ignore
/// its own timeout); `None` when abandoned at shutdown.
pub(crate) async fn bounded<T>(
    invocation: impl std::future::Future<Output = T>,
    timeout: Duration,
    timed_out: impl FnOnce(Failure) -> T,
    abandon: &CancellationToken,
) -> Option<T> {
    let guard = tokio::time::sleep(timeout + Duration::from_secs(1));
    tokio::select! {
        outcome = invocation => Some(outcome),
        () = guard => Some(timed_out(Failure::new(
            None,
            format!("invocation timed out after {}ms", timeout.as_millis()),
        ))),
        () = abandon.cancelled() => None,
    }
}

pub(crate) async fn handle(
    trigger: &TriggerRuntime,
    shared: &Shared,
    message: &jetstream::Message,
    abandon: &CancellationToken,
    in_place: Option<&mut InPlace>,
) -> Settled {
    let Some((handling, event)) = prepare(trigger, shared, message, in_place.as_deref()).await
    else {
        return Settled::Done;
    };
    let timeout = trigger.config.timeout.unwrap_or(trigger.function.timeout);
    // The attempt's span (a child of the event's trace context) and the invocation's
    // (the attempt's child, whose context the function gets): nothing while traces
    // are off.
    let (mut attempt_span, mut invoke_span) = if telemetry::enabled() {
        start_spans(trigger, &event, handling.delivery.attempt)
    } else {
        (TraceSpan::none(), TraceSpan::none())
    };
    let traced = invoke_span
        .traceparent()
        .map(|traceparent| with_traceparent(&event, traceparent));
    let called = traced.as_ref().unwrap_or(&event);
    // Capacity first (a function whose instances Switchyard runs may cold-start one):
    // waiting for it is not an attempt, and the event stays unacknowledged meanwhile.
    let reserved = if trigger.target().reserves() {
        tokio::select! {
            reserved = trigger.target().reserve() => reserved,
            () = abandon.cancelled() => {
                // Not called: handed back with only what earlier attempts did recorded.
                Box::pin(handling.hand_back_recorded(None, None, None, None)).await;
                return Settled::Done;
            }
        }
    } else {
        Ok(None)
    };
    trigger.metrics.dispatched.inc();
    tracing::debug!(event_id = %event.id, trigger = %trigger.config.name, function = %trigger.function.name, attempt = handling.delivery.attempt, "invoking function");
    let attempt_started_at = time::OffsetDateTime::now_utc();
    let started = Instant::now();
    let invocation = async {
        let reservation = match reserved {
            Ok(reservation) => reservation,
            Err(failure) => {
                return Outcome::RetryLater {
                    not_before: None,
                    failure,
                };
            }
        };
        match &trigger.destinations.enricher {
            None => {
                trigger
                    .target()
                    .invoke_reserved(reservation, called, timeout)
                    .await
            }
            Some(enricher) => {
                let mut enriched = called.clone();
                if let Err(failure) = enricher.enrich(&mut enriched).await {
                    return Outcome::RetryLater {
                        not_before: None,
                        failure,
                    };
                }
                trigger
                    .target()
                    .invoke_reserved(reservation, &enriched, timeout)
                    .await
            }
        }
    };
    handling.invoking();
    let Some(outcome) = bounded(
        invocation,
        timeout,
        |failure| Outcome::RetryLater {
            not_before: None,
            failure,
        },
        abandon,
    )
    .await
    else {
        // Called, outcome unknown: recorded as an attempt.
        let failure = Failure::new(None, "invocation abandoned at shutdown (grace period over)");
        invoke_span.fail(failure.error.clone());
        attempt_span.set(|| vec![KeyValue::new("switchyard.outcome", "abandoned")]);
        attempt_span.fail(failure.error.clone());
        Box::pin(handling.hand_back_recorded(
            None,
            Some(&failure),
            Some(&rfc3339(attempt_started_at)),
            None,
        ))
        .await;
        return Settled::Done;
    };
    trigger
        .metrics
        .duration
        .observe(started.elapsed().as_secs_f64());
    let outcome = match outcome {
        Outcome::Delivered {
            reply: Some(reply), ..
        } if trigger.config.publish_replies => {
            // Boxed here and on the other rare paths: the future of every event's
            // task stays small (spawning moves and allocates all of it).
            match Box::pin(shared.bus.publish_events(std::slice::from_ref(&reply))).await {
                Ok(receipts) => {
                    if receipts.first().is_some_and(|receipt| receipt.duplicate) {
                        // The stream already holds an event with this source and id
                        // (a function reusing ids, or this reply published before a
                        // crash): not stored again. Counted, not silent.
                        shared
                            .metrics
                            .replies_deduplicated
                            .get_or_create(&TriggerOnlyLabels {
                                trigger: trigger.config.name.clone(),
                            })
                            .inc();
                        tracing::warn!(event_id = %event.id, trigger = %trigger.config.name, reply_id = %reply.id, reply_source = %reply.source, "the function's reply has the source and id of an event already stored; not stored again");
                    }
                    Outcome::Delivered {
                        reply: Some(reply),
                        answer: None,
                    }
                }
                Err(PublishError::Unavailable(error)) => Outcome::RetryLater {
                    not_before: None,
                    failure: Failure::new(
                        None,
                        format!("publishing the function's reply failed: {error}"),
                    ),
                },
                Err(error) => Outcome::Rejected {
                    failure: Failure::new(
                        None,
                        format!("the function's reply cannot be published: {error}"),
                    ),
                },
            }
        }
        other => other,
    };
    if attempt_span.is_recording() {
        end_spans(
            trigger,
            handling.delivery.attempt,
            &outcome,
            attempt_span,
            invoke_span,
        );
    }
    handling
        .settle(event, outcome, attempt_started_at, in_place)
        .await
}

/// The spans of one delivery attempt: the attempt (a child of the event's
/// `traceparent`, or a new trace) and its invocation.
fn start_spans(trigger: &TriggerRuntime, event: &Event, attempt: u64) -> (TraceSpan, TraceSpan) {
    let attempt_span = attempt_span(trigger, event, attempt);
    let invoke_span = TraceSpan::start(
        format!("invoke {}", trigger.function.name),
        SpanKind::Client,
        attempt_span.context(),
        || {
            vec![
                KeyValue::new("faas.invoked_name", trigger.function.name.clone()),
                KeyValue::new("switchyard.attempt", attempt as i64),
            ]
        },
    );
    (attempt_span, invoke_span)
}

/// The span of one delivery attempt of `event`, a child of its `traceparent`.
pub(crate) fn attempt_span(trigger: &TriggerRuntime, event: &Event, attempt: u64) -> TraceSpan {
    TraceSpan::start(
        format!("deliver {}", trigger.config.name),
        SpanKind::Consumer,
        telemetry::event_context(event).as_ref(),
        || {
            vec![
                KeyValue::new("switchyard.trigger", trigger.config.name.clone()),
                KeyValue::new("switchyard.function", trigger.function.name.clone()),
                KeyValue::new("switchyard.attempt", attempt as i64),
                KeyValue::new("cloudevents.event_id", telemetry::attribute(&event.id)),
                KeyValue::new(
                    "cloudevents.event_source",
                    telemetry::attribute(&event.source),
                ),
                KeyValue::new("cloudevents.event_type", telemetry::attribute(&event.ty)),
            ]
        },
    )
}

/// Ends an attempt's spans with what came of it: `delivered`, `retry`, or
/// `dead_letter` (out of attempts, or rejected).
fn end_spans(
    trigger: &TriggerRuntime,
    attempt: u64,
    outcome: &Outcome,
    attempt_span: TraceSpan,
    mut invoke_span: TraceSpan,
) {
    if let Some(failure) = outcome_failure(outcome) {
        invoke_span.set(|| {
            failure.status.map_or_else(Vec::new, |status| {
                vec![KeyValue::new(
                    "http.response.status_code",
                    i64::from(status),
                )]
            })
        });
        invoke_span.fail(failure.error.clone());
    }
    invoke_span.end();
    end_attempt_span(trigger, attempt, outcome, attempt_span);
}

fn outcome_failure(outcome: &Outcome) -> Option<&Failure> {
    match outcome {
        Outcome::Delivered { .. } => None,
        Outcome::RetryLater { failure, .. } | Outcome::Rejected { failure } => Some(failure),
    }
}

/// Ends an attempt's span with its outcome (see [`end_spans`]).
pub(crate) fn end_attempt_span(
    trigger: &TriggerRuntime,
    attempt: u64,
    outcome: &Outcome,
    mut span: TraceSpan,
) {
    let (label, reason) = match outcome {
        Outcome::Delivered { .. } => ("delivered", None),
        Outcome::RetryLater { .. } if attempt >= trigger.config.retry.max_attempts() => (
            "dead_letter",
            Some(switchyard_bus::dead_letter::REASON_ATTEMPTS_EXHAUSTED),
        ),
        Outcome::RetryLater { .. } => ("retry", None),
        Outcome::Rejected { .. } => (
            "dead_letter",
            Some(switchyard_bus::dead_letter::REASON_REJECTED),
        ),
    };
    if let Some(failure) = outcome_failure(outcome) {
        span.fail(failure.error.clone());
    }
    span.set(|| {
        let mut attributes = vec![KeyValue::new("switchyard.outcome", label)];
        if let Some(reason) = reason {
            attributes.push(KeyValue::new("switchyard.dead_letter.reason", reason));
        }
        attributes
    });
    span.end();
}

/// A copy of `event` carrying `traceparent` (the invocation's context).
fn with_traceparent(event: &Event, traceparent: String) -> Event {
    let mut traced = event.clone();
    traced
        .extensions
        .insert("traceparent".to_owned(), traceparent);
    traced
}
