//! Batched triggers (`batch = { max_events, max_bytes, window }`): one invocation
//! carries up to `max_events` events (and `max_bytes`), or what arrived within
//! `window` of asking, as a JSON array of CloudEvents.
//!
//! A batch is one pull request of that size and expiry, taken while holding one of the
//! trigger's permits (so `max_concurrency` counts batches in flight). Every event of it
//! is settled on its own, as a single event would be: the function may name the ones
//! that failed (`{"batchItemFailures":[{"itemIdentifier":"<id>"}]}`), and only those
//! are retried (through the trigger's retry subject, so they come back in a later
//! batch) or dead-lettered when out of attempts; the others are acknowledged. An
//! answer that fails the whole batch settles every event with that outcome.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Deserialize;
use switchyard_bus::async_nats::jetstream::{self, AckKind};
use switchyard_event::telemetry::{self, KeyValue, SpanKind, TraceSpan};
use switchyard_event::{BatchOutcome, Event, Failure, Outcome};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::consumers::{open_consumer, recover};
use crate::delivery::prepare;
use crate::invoke::{InFlight, attempt_span, bounded, end_attempt_span};
use crate::permits::acquire_shared_permits;
use crate::{Shared, TriggerRuntime, consumer_backoff, log_failure};

/// How a trigger batches.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BatchSettings {
    /// Events per invocation, at most.
    #[serde(default = "default_max_events")]
    pub max_events: usize,
    /// Bytes of event messages per invocation, at most.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: usize,
    /// How long a batch waits to fill up.
    #[serde(default = "default_window", with = "humantime_serde")]
    pub window: Duration,
}

fn default_max_events() -> usize {
    10
}
fn default_max_bytes() -> usize {
    1024 * 1024
}
fn default_window() -> Duration {
    Duration::from_secs(1)
}

/// Sends progress for every message until dropped.
async fn keep_all_in_progress(messages: &[jetstream::Message], every: Duration) {
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        ticker.tick().await;
        for message in messages {
            let _ = message.ack_with(AckKind::Progress).await;
        }
    }
}

/// Hands every message of a batch back unattempted (recorded, see [`crate::delivery`]).
async fn hand_back_all(trigger: &TriggerRuntime, shared: &Shared, messages: &[jetstream::Message]) {
    for message in messages {
        crate::settle::hand_back(trigger, shared, message, None).await;
    }
}

/// The pull loop of a batched trigger.
pub(crate) async fn batch_loop(
    trigger: Arc<TriggerRuntime>,
    shared: Arc<Shared>,
    consumer_config: jetstream::consumer::pull::Config,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    abandon: CancellationToken,
) {
    let settings = trigger
        .config
        .batch
        .clone()
        .expect("batch_loop runs for batched triggers");
    let config = &consumer_config;
    let direct = config.filter_subject == trigger.direct_subject;
    let Some(mut consumer) = open_consumer(&trigger, config, &shutdown).await else {
        return;
    };
    let mut failures = consumer_backoff();
    'pulling: loop {
        // Superseded by a newer form of the trigger in another process: its events
        // are that process's now (a reload here starts new loops).
        if !direct && trigger.superseded.load(std::sync::atomic::Ordering::SeqCst) {
            break;
        }
        if failures.failing()
            && !recover(&trigger, config, &failures, &shutdown, &mut consumer).await
        {
            break;
        }
        // Only the trigger's own permit while waiting for events; the shared ones
        // (function, process, cluster slot) are taken once a batch is in hand. The
        // direct consumer (due retries, replays) waits holding nothing.
        let permit = if direct {
            None
        } else {
            tokio::select! {
                permit = trigger.permits.clone().acquire_owned() => Some(permit.expect("never closed")),
                () = shutdown.cancelled() => break,
            }
        };
        let request = consumer
            .batch()
            .max_messages(settings.max_events)
            .max_bytes(settings.max_bytes)
            .expires(settings.window)
            .messages();
        let mut batch = tokio::select! {
            batch = request => match batch {
                Ok(batch) => batch,
                Err(error) => {
                    failures.failed();
                    log_failure(&trigger, &failures, "pull batch", &error);
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let mut messages = Vec::with_capacity(settings.max_events);
        loop {
            let next = tokio::select! {
                next = batch.next() => next,
                () = shutdown.cancelled() => {
                    hand_back_all(&trigger, &shared, &messages).await;
                    break 'pulling;
                }
            };
            match next {
                None => {
                    failures.succeeded();
                    break;
                }
                Some(Ok(message)) => messages.push(message),
                Some(Err(error)) => {
                    failures.failed();
                    log_failure(&trigger, &failures, "receive batch", &error);
                    break;
                }
            }
        }
        if messages.is_empty() {
            continue;
        }
        tracker.spawn(handle_batch(
            trigger.clone(),
            shared.clone(),
            messages,
            permit,
            shutdown.clone(),
            abandon.clone(),
        ));
    }
}

/// Most links of a batch's invocation span (to the other events' attempts).
const MAX_LINKS: usize = 128;

async fn handle_batch(
    trigger: Arc<TriggerRuntime>,
    shared: Arc<Shared>,
    messages: Vec<jetstream::Message>,
    permit: Option<OwnedSemaphorePermit>,
    shutdown: CancellationToken,
    abandon: CancellationToken,
) {
    let _in_flight = InFlight::start(&trigger);
    let every = (trigger.config.ack_wait / 3).max(Duration::from_millis(100));
    let work = async {
        let _permit = match permit {
            Some(permit) => permit,
            None => tokio::select! {
                taken = trigger.permits.clone().acquire_owned() => taken.expect("never closed"),
                () = shutdown.cancelled() => {
                    hand_back_all(&trigger, &shared, &messages).await;
                    return;
                }
            },
        };
        let _shared_permits = tokio::select! {
            taken = acquire_shared_permits(&trigger, &shared) => taken,
            () = shutdown.cancelled() => {
                hand_back_all(&trigger, &shared, &messages).await;
                return;
            }
        };
        let mut prepared = Vec::with_capacity(messages.len());
        for message in &messages {
            if let Some(ready) = prepare(&trigger, &shared, message, None).await {
                prepared.push(ready);
            }
        }
        if prepared.is_empty() {
            return;
        }
        let events: Vec<Event> = prepared.iter().map(|(_, event)| event.clone()).collect();
        // Each event's attempt span (in its own trace), and one span of the batch's
        // invocation: a child of the first event's attempt, linked to the others'.
        let (mut attempt_spans, mut invoke_span) = if telemetry::enabled() {
            let spans: Vec<TraceSpan> = prepared
                .iter()
                .map(|(handling, event)| attempt_span(&trigger, event, handling.delivery.attempt))
                .collect();
            // The first recorded attempt is the parent (an unrecorded parent would
            // leave the invocation unrecorded for every event).
            let mut contexts: Vec<_> = spans
                .iter()
                .filter_map(|span| span.context().cloned())
                .collect();
            let first = contexts
                .iter()
                .position(|context| context.is_sampled())
                .unwrap_or(0);
            let parent = (!contexts.is_empty()).then(|| contexts.remove(first));
            let contexts = contexts.into_iter();
            let invoke = TraceSpan::start_linked(
                format!("invoke {}", trigger.function.name),
                SpanKind::Client,
                parent.as_ref(),
                contexts.take(MAX_LINKS).collect(),
                || {
                    vec![
                        KeyValue::new("faas.invoked_name", trigger.function.name.clone()),
                        KeyValue::new("switchyard.batch_size", events.len() as i64),
                    ]
                },
            );
            (spans, invoke)
        } else {
            (Vec::new(), TraceSpan::none())
        };
        let timeout = trigger.config.timeout.unwrap_or(trigger.function.timeout);
        trigger.metrics.dispatched.inc_by(events.len() as u64);
        tracing::debug!(trigger = %trigger.config.name, function = %trigger.function.name, events = events.len(), "invoking function with a batch");
        let attempt_started_at = time::OffsetDateTime::now_utc();
        let started = Instant::now();
        for (handling, _) in &prepared {
            handling.invoking();
        }
        let invocation = async {
            let Some(enricher) = &trigger.destinations.enricher else {
                return trigger.target().invoke_batch(&events, timeout).await;
            };
            let mut enriched = events.clone();
            for event in &mut enriched {
                if let Err(failure) = enricher.enrich(event).await {
                    return BatchOutcome::All(Outcome::RetryLater {
                        not_before: None,
                        failure,
                    });
                }
            }
            trigger.target().invoke_batch(&enriched, timeout).await
        };
        let outcome = bounded(
            invocation,
            timeout,
            |failure| {
                BatchOutcome::All(Outcome::RetryLater {
                    not_before: None,
                    failure,
                })
            },
            &abandon,
        )
        .await;
        let Some(outcome) = outcome else {
            // Called, outcome unknown: each recorded as an attempt.
            let failure =
                Failure::new(None, "invocation abandoned at shutdown (grace period over)");
            let started_at = switchyard_event::timestamp::rfc3339(attempt_started_at);
            for (handling, _) in &prepared {
                handling
                    .hand_back_recorded(None, Some(&failure), Some(&started_at), None)
                    .await;
            }
            return;
        };
        trigger
            .metrics
            .duration
            .observe(started.elapsed().as_secs_f64());
        if let BatchOutcome::All(
            Outcome::RetryLater { failure, .. } | Outcome::Rejected { failure },
        ) = &outcome
        {
            invoke_span.fail(failure.error.clone());
        }
        invoke_span.end();
        let mut attempt_spans = attempt_spans.drain(..);
        for (handling, event) in prepared {
            let outcome = match &outcome {
                BatchOutcome::All(outcome) => outcome.clone(),
                BatchOutcome::Partial { failed } if failed.contains(&event.id) => {
                    Outcome::RetryLater {
                        not_before: None,
                        failure: Failure::new(
                            None,
                            "the function reported this event failed (batchItemFailures)",
                        ),
                    }
                }
                BatchOutcome::Partial { .. } => Outcome::delivered(),
            };
            if let Some(span) = attempt_spans.next() {
                end_attempt_span(&trigger, handling.delivery.attempt, &outcome, span);
            }
            handling
                .settle(event, outcome, attempt_started_at, None)
                .await;
        }
    };
    tokio::select! {
        () = work => {}
        () = keep_all_in_progress(&messages, every) => {}
    }
}
