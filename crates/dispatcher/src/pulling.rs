//! The pull protocol of a trigger's main and direct consumers: one subscription for
//! the consumer's life and one pull request in flight at a time, sized to the permits
//! already taken, so an event is asked for only when it can start at once and the
//! accounting is exact (an event does not say which request it answers; only a
//! request's end does). Events that arrive with no permit waiting are handed back.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use switchyard_bus::async_nats::StatusCode;
use switchyard_bus::async_nats::jetstream::{self, consumer::pull};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::consumers::{open_consumer, recover};
use crate::invoke::handle_message;
use crate::permits::{Permits, acquire_permits, try_acquire_permits};
use crate::settle::hand_back;
use crate::{PULL_EXPIRES, Shared, TriggerRuntime, consumer_backoff, log_failure};

/// The one pull request a trigger has waiting on the server, with the permits of the
/// events it may still bring. One at a time keeps the accounting exact: events carry
/// no trace of the request they answer (only the request's end does, on its own reply
/// subject), so with several requests in flight a lost or late end could not be told
/// apart from another request's events.
struct PullRequest {
    id: u64,
    permits: Vec<Permits>,
    /// After this, the request has certainly ended on the server, answered or not.
    give_up_at: tokio::time::Instant,
    /// Made while the trigger was idle: one event, covered by the trigger's permit
    /// only.
    idle: bool,
}

/// Longest a pull waits for more permits to gather under load (see the loop).
const PULL_GATHER: Duration = Duration::from_millis(1);

/// How long after a request's expiry its end may still be reported.
const PULL_SLACK: Duration = Duration::from_secs(2);

/// The id of the pull request a status answers: the last token of its subject.
fn request_id(subject: &str) -> Option<u64> {
    subject.rsplit('.').next()?.parse().ok()
}

/// The pull loop of a trigger: one subscription for its whole life, and pull requests
/// sized to the permits taken, so an event is asked for only when it can start at
/// once. (async-nats' `batch()` opens a subscription per request, which costs more
/// than the event itself under load.)
pub(crate) async fn pull_loop(
    trigger: Arc<TriggerRuntime>,
    shared: Arc<Shared>,
    consumer_config: pull::Config,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    abandon: CancellationToken,
) {
    // The direct consumer (due retries, replays) holds no permit while it waits: its
    // events take theirs once they arrive, so it never sits on permits the main
    // consumer could use. It asks for twice what it has in flight, plus one.
    let direct = consumer_config.filter_subject == trigger.direct_subject;
    let own_in_flight = Arc::new(AtomicI64::new(0));
    let client = shared.bus.client().clone();
    let context = shared.bus.jetstream().clone();
    let Some(mut consumer) = open_consumer(&trigger, &consumer_config, &shutdown).await else {
        return;
    };
    let inbox = client.new_inbox();
    let mut subscribing = consumer_backoff();
    let mut subscription = loop {
        match client.subscribe(format!("{inbox}.*")).await {
            Ok(subscription) => break subscription,
            Err(error) => {
                subscribing.failed();
                log_failure(&trigger, &subscribing, "subscribe", &error);
                if !subscribing.pause(shutdown.cancelled()).await {
                    return;
                }
            }
        }
    };
    let max = trigger.config.max_concurrency.max(1);
    let mut current: Option<PullRequest> = None;
    let mut next_id: u64 = 0;
    let mut unrequested: Vec<Permits> = Vec::new();
    let mut failures = consumer_backoff();
    // Since when permits wait for the next pull to be sent.
    let mut gather_since: Option<tokio::time::Instant> = None;
    // One timer for the loop's deadlines (gathering permits, giving up on a request),
    // reset only when the next deadline moves.
    let mut timer = std::pin::pin!(tokio::time::sleep(Duration::ZERO));
    let mut timer_at: Option<tokio::time::Instant> = None;
    // An event no permit waits for goes back unattempted, recorded as such, off the
    // loop's path.
    let hand_back_late = |message: switchyard_bus::async_nats::Message| {
        let message = jetstream::Message {
            message,
            context: context.clone(),
        };
        let (trigger, shared) = (trigger.clone(), shared.clone());
        tracker.spawn(async move { hand_back(&trigger, &shared, &message, None).await });
    };
    // The failure count the last recovery answered: a failure since then recovers
    // again, with a longer pause, and from the third on creates the consumer anew.
    // The count is reset only by a pull that worked (an event, or a request's
    // normal end), not by the recovery itself.
    let mut recovered = 0;
    loop {
        // Superseded by a newer form of the trigger in another process: its events
        // are that process's now (a reload here starts new loops).
        if !direct && trigger.superseded.load(Ordering::SeqCst) {
            break;
        }
        if failures.failures() > recovered {
            // Whatever was asked for is in doubt: forget it (late events are handed
            // back when no permit waits for them).
            current = None;
            unrequested.clear();
            let config = &consumer_config;
            if !recover(&trigger, config, &failures, &shutdown, &mut consumer).await {
                break;
            }
            recovered = failures.failures();
        }
        if current
            .as_ref()
            .is_some_and(|request| request.give_up_at <= tokio::time::Instant::now())
        {
            // Its end was never reported (lost while disconnected): stop counting on it.
            current = None;
        }
        let outstanding = current.as_ref().map_or(0, |request| request.permits.len());
        // An idle trigger waits for its next event holding only its own permit, so
        // idle triggers do not sit on the function's and the process's shared budget;
        // that one event takes its shared permits when it arrives (at most one event
        // per trigger waits so, with progress acks). Once events flow, every pull is
        // covered by all permits beforehand.
        let own = own_in_flight.load(Ordering::Relaxed).max(0) as usize;
        // Idle too while its one idle pull waits: a turn of the loop (a timer, a
        // heartbeat) must not make it take shared permits for more.
        let idle = own == 0 && current.as_ref().is_none_or(|request| request.idle);
        let wanted = match (idle, direct) {
            (true, _) => 1,
            (false, true) => (2 * own + 1).min(max),
            (false, false) => max,
        };
        while outstanding + unrequested.len() < wanted {
            if direct {
                unrequested.push(Permits {
                    trigger: None,
                    shared: None,
                });
                continue;
            }
            match try_acquire_permits(&trigger, &shared, !idle) {
                Some(permits) => unrequested.push(permits),
                None => break,
            }
        }
        // Under load, a pull waits until a quarter of the events in flight have freed
        // their permits (or PULL_GATHER passed): one request per event would cost the
        // server a request each, while completions come in a steady stream.
        let gather = if idle || direct { 1 } else { (own / 4).max(1) };
        if current.is_some() || unrequested.is_empty() {
            gather_since = None;
        } else if gather_since.is_none() {
            gather_since = Some(tokio::time::Instant::now());
        }
        let gathered = unrequested.len() >= gather
            || gather_since.is_some_and(|since| since.elapsed() >= PULL_GATHER);
        if current.is_none() && !unrequested.is_empty() && gathered {
            next_id += 1;
            let request = pull::BatchConfig {
                batch: unrequested.len(),
                expires: Some(PULL_EXPIRES),
                ..Default::default()
            };
            let reply = format!("{inbox}.{next_id}");
            if let Err(error) = consumer.request_batch(request, reply.into()).await {
                failures.failed();
                log_failure(&trigger, &failures, "pull", &error);
                continue;
            }
            gather_since = None;
            current = Some(PullRequest {
                id: next_id,
                permits: std::mem::take(&mut unrequested),
                give_up_at: tokio::time::Instant::now() + PULL_EXPIRES + PULL_SLACK,
                idle,
            });
        }
        let outstanding = current.as_ref().map_or(0, |request| request.permits.len());
        let can_take_more = !direct && outstanding + unrequested.len() < wanted;
        let give_up = current.as_ref().map(|request| request.give_up_at);
        let gather_until = gather_since.map(|since| since + PULL_GATHER);
        let next_deadline = match (give_up, gather_until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if next_deadline != timer_at {
            if let Some(at) = next_deadline {
                timer.as_mut().reset(at);
            }
            timer_at = next_deadline;
        }
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            message = subscription.next() => {
                // Every message already received is taken in this turn (at most a
                // request's worth), not one per turn of the loop.
                let mut next = Some(message);
                let mut taken = 0;
                while let Some(message) = next.take() {
                    let Some(message) = message else {
                        failures.failed();
                        log_failure(&trigger, &failures, "receive", &"subscription closed");
                        match client.subscribe(format!("{inbox}.*")).await {
                            Ok(renewed) => subscription = renewed,
                            Err(error) => log_failure(&trigger, &failures, "subscribe", &error),
                        }
                        continue;
                    };
                    match message.status {
                        None | Some(StatusCode::OK) => {
                            failures.succeeded();
                            recovered = 0;
                            let permits = current.as_mut().and_then(|request| request.permits.pop());
                            if current.as_ref().is_some_and(|request| request.permits.is_empty()) {
                                // Fulfilled: the server sends nothing more for it.
                                current = None;
                            }
                            match permits {
                                Some(permits) => {
                                    own_in_flight.fetch_add(1, Ordering::Relaxed);
                                    let own_in_flight = own_in_flight.clone();
                                    let handling = handle_message(
                                        trigger.clone(),
                                        shared.clone(),
                                        jetstream::Message { message, context: context.clone() },
                                        permits,
                                        shutdown.clone(),
                                        abandon.clone(),
                                    );
                                    tracker.spawn(async move {
                                        handling.await;
                                        own_in_flight.fetch_sub(1, Ordering::Relaxed);
                                    });
                                }
                                // An event of a request already given up on: hand it
                                // back for another pull.
                                None => hand_back_late(message),
                            }
                        }
                        Some(StatusCode::IDLE_HEARTBEAT) => {}
                        status => {
                            // The request ended (expired, or terminated by the server):
                            // its remaining permits come back. An end of an older request
                            // is ignored.
                            let id = request_id(message.subject.as_str());
                            if current.as_ref().is_some_and(|request| Some(request.id) == id) {
                                current = None;
                            }
                            let accounted = matches!(status, Some(StatusCode::TIMEOUT) | Some(StatusCode::REQUEST_TERMINATED))
                                && message
                                    .headers
                                    .as_ref()
                                    .is_some_and(|headers| headers.get("Nats-Pending-Messages").is_some());
                            if accounted {
                                failures.succeeded();
                                recovered = 0;
                            } else {
                                // No responders, a deleted consumer, a leader change.
                                failures.failed();
                                let description = message.description.clone().unwrap_or_default();
                                log_failure(&trigger, &failures, "pull", &format!("status {status:?}: {description}"));
                            }
                        }
                    }
                    taken += 1;
                    if taken < max.max(16) {
                        next = subscription.next().now_or_never();
                    }
                }
            }
            // Made anew each turn: a wait kept across turns would hold the permits it
            // already took (a trigger's, a function's) while the loop's state moved on.
            permits = acquire_permits(&trigger, &shared, !idle), if can_take_more => {
                unrequested.push(permits);
            }
            () = &mut timer, if timer_at.is_some() => {
                // A deadline passed: the loop's top sends the gathered pull, or
                // forgets a request whose end never came.
                timer_at = None;
            }
            () = trigger.permit_wanted.notified(), if !direct => {
                // A due retry or replay waits: give it a permit held for a pull (an
                // event that pull still brings without a permit is handed back).
                if unrequested.pop().is_none()
                    && let Some(request) = current.as_mut()
                {
                    drop(request.permits.pop());
                }
            }
        }
    }
    // Events the server still sends for the request in flight are handed back at once
    // rather than left to wait out their ack wait.
    drop(unrequested);
    let drain = async {
        while current
            .as_ref()
            .is_some_and(|request| !request.permits.is_empty())
        {
            let Some(message) = subscription.next().await else {
                break;
            };
            match message.status {
                None | Some(StatusCode::OK) => {
                    if let Some(request) = current.as_mut() {
                        drop(request.permits.pop());
                    }
                    hand_back_late(message);
                }
                Some(StatusCode::IDLE_HEARTBEAT) => {}
                _ => current = None,
            }
        }
    };
    let _ = tokio::time::timeout(PULL_EXPIRES + Duration::from_millis(500), drain).await;
    let _ = subscription.unsubscribe().await;
}
