//! Settling a delivery: acknowledge it, store its retry copy, dead-letter it (and
//! publish to its destinations), or hand it back to JetStream with what it did
//! recorded (see [`crate::delivery`]). Every path leaves the event in a stream: the
//! copy is acknowledged only after what replaces it was stored.

use std::sync::atomic::Ordering;
use std::time::Duration;

use switchyard_bus::async_nats::HeaderMap;
use switchyard_bus::async_nats::jetstream::{self, AckKind};
use switchyard_bus::dead_letter::{
    DeadLetter, MAX_ERROR_BYTES, REASON_ATTEMPTS_EXHAUSTED, REASON_MALFORMED, REASON_REJECTED,
};
use switchyard_bus::limits::shorten as truncate;
use switchyard_bus::{RetryState, event_headers};
use switchyard_event::timestamp::{now_rfc3339, rfc3339};
use switchyard_event::{Event, Failure, FunctionAnswer, Outcome};

use crate::delivery::Delivery;
use crate::metrics::DeadLetterLabels;
use crate::{Shared, TriggerRuntime};

/// Hands a delivery back to JetStream (NAK) without the function having been called
/// for it, recorded first so the next delivery does not count it as an attempt (see
/// [`delivery`]). If the record cannot be written the delivery still goes back; the
/// next one then counts it as unfinished.
pub(crate) async fn hand_back(
    trigger: &TriggerRuntime,
    shared: &Shared,
    message: &jetstream::Message,
    delay: Option<Duration>,
) {
    if let Ok(info) = message.info()
        && let Err(error) = shared
            .records
            .end_delivery(&trigger.config.name, info.stream_sequence, |_| {})
            .await
    {
        tracing::warn!(trigger = %trigger.config.name, sequence = info.stream_sequence, %error, stage = "hand_back", "recording a hand-back failed; the next delivery counts it as unfinished");
    }
    let _ = message.ack_with(AckKind::Nak(delay)).await;
}

/// Hands back a copy an ordered trigger held, with the attempts it made in place
/// during this delivery recorded, so a partition's next holder continues the count.
pub(crate) async fn hand_back_in_place(
    trigger: &TriggerRuntime,
    shared: &Shared,
    message: &jetstream::Message,
    in_place: &InPlace,
) {
    if in_place.attempts == 0 {
        return Box::pin(hand_back(trigger, shared, message, None)).await;
    }
    if let Ok(info) = message.info()
        && let Err(error) = shared
            .records
            .end_delivery(&trigger.config.name, info.stream_sequence, |record| {
                record.attempts += in_place.attempts;
                if record.first_attempt_at.is_none() {
                    record
                        .first_attempt_at
                        .clone_from(&in_place.first_attempt_at);
                }
                if let Some(failure) = &in_place.last_failure {
                    record.last_status = failure.status;
                    record.last_error = Some(truncate(&failure.error, MAX_ERROR_BYTES));
                }
            })
            .await
    {
        tracing::warn!(trigger = %trigger.config.name, sequence = info.stream_sequence, %error, stage = "hand_back", "recording in-place attempts failed; the next holder counts this delivery as unfinished");
    }
    let _ = message.ack_with(AckKind::Nak(None)).await;
}

/// How a handled delivery ended, for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settled {
    /// Acknowledged, retried through the retry subject, dead-lettered or handed back.
    Done,
    /// Only with in-place retries (ordered triggers): the event is still held,
    /// unacknowledged; invoke it again after this delay.
    RetryIn(Duration),
}

/// The attempt history of an event retried in place (held by an ordered trigger,
/// never acknowledged in between), which its headers cannot carry.
#[derive(Debug, Default, Clone)]
pub(crate) struct InPlace {
    pub(crate) attempts: u64,
    pub(crate) first_attempt_at: Option<String>,
    pub(crate) last_failure: Option<Failure>,
}

/// One delivery being handled: what every step that settles it needs.
pub(crate) struct Handling<'a> {
    pub(crate) trigger: &'a TriggerRuntime,
    pub(crate) shared: &'a Shared,
    pub(crate) message: &'a jetstream::Message,
    pub(crate) delivery: Delivery,
    /// Whether this delivery called the function (set just before the call).
    pub(crate) invoked: std::sync::atomic::AtomicBool,
    /// Acks and terms wait for the server's confirmation (ordered triggers: the next
    /// event of the key starts only once this one is surely settled).
    pub(crate) confirm_acks: bool,
}

impl Handling<'_> {
    /// Acknowledges (or terminates) this copy. With `confirm_acks`, waits for the
    /// server's confirmation, trying three times; false if it never came.
    pub(crate) async fn acknowledge(&self, kind: AckKind) -> bool {
        if !self.confirm_acks {
            return match self.message.ack_with(kind).await {
                Ok(()) => true,
                Err(error) => {
                    tracing::warn!(trigger = %self.trigger.config.name, %error, stage = "ack", "acknowledging failed; the event may be delivered again");
                    false
                }
            };
        }
        for attempt in 1..=3u64 {
            match Box::pin(self.message.double_ack_with(kind)).await {
                Ok(()) => return true,
                Err(error) => {
                    tracing::warn!(trigger = %self.trigger.config.name, %error, attempt, stage = "ack", "the server did not confirm an acknowledgement");
                    tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                }
            }
        }
        false
    }

    /// Marks that this delivery calls the function.
    pub(crate) fn invoking(&self) {
        self.invoked.store(true, Ordering::Relaxed);
    }

    /// Hands this copy back to JetStream with `delay`, recording first what this
    /// delivery did (see [`delivery`]): an invocation when it made one, with `failure`
    /// and `first_attempt_at`, and a dead letter's reason when its outcome was one.
    pub(crate) async fn hand_back_recorded(
        &self,
        delay: Option<Duration>,
        failure: Option<&Failure>,
        first_attempt_at: Option<&str>,
        dead_letter: Option<&str>,
    ) {
        let attempts =
            self.delivery.in_place_attempts + u64::from(self.invoked.load(Ordering::Relaxed));
        let recorded = self
            .shared
            .records
            .end_delivery(
                &self.trigger.config.name,
                self.delivery.sequence,
                |record| {
                    record.attempts += attempts;
                    if record.first_attempt_at.is_none() {
                        record.first_attempt_at = first_attempt_at.map(str::to_owned);
                    }
                    if let Some(failure) = failure {
                        record.last_status = failure.status;
                        record.last_error = Some(truncate(&failure.error, MAX_ERROR_BYTES));
                    }
                    if let Some(reason) = dead_letter {
                        record.dead_letter = Some(reason.to_owned());
                    }
                },
            )
            .await;
        if let Err(error) = recorded {
            tracing::warn!(trigger = %self.trigger.config.name, sequence = self.delivery.sequence, %error, stage = "hand_back", "recording the delivery failed; the next delivery counts it as unfinished");
        }
        let _ = self.message.ack_with(AckKind::Nak(delay)).await;
    }

    /// Settles an attempt by its outcome: acknowledge, retry (through the retry
    /// subject, or in place when `in_place` is given), or dead-letter.
    pub(crate) async fn settle(
        &self,
        event: Event,
        outcome: Outcome,
        attempt_started_at: time::OffsetDateTime,
        in_place: Option<&mut InPlace>,
    ) -> Settled {
        let (trigger, shared, delivery) = (self.trigger, self.shared, &self.delivery);
        let policy = &trigger.config.retry;
        // Formatted only when an outcome needs it (not for the common success).
        let first_attempt_at = || {
            delivery
                .state
                .first_attempt_at
                .clone()
                .unwrap_or_else(|| rfc3339(attempt_started_at))
        };
        let outcome = match (outcome, &trigger.destinations.on_success) {
            (Outcome::Delivered { reply, answer }, Some(destination)) => {
                let record =
                    reply.map_or_else(|| self.result_event(&event, answer), |reply| *reply);
                let id = vec![(
                    "Nats-Msg-Id".to_owned(),
                    format!("result {} {}", trigger.config.name, delivery.sequence),
                )];
                match destination.publish(&record, &id).await {
                    Ok(()) => Outcome::delivered(),
                    // Like a failed invocation: retried, so the function may run again.
                    Err(error) => Outcome::RetryLater {
                        not_before: None,
                        failure: Failure::new(
                            None,
                            format!(
                                "publishing the result to {} failed: {error}",
                                destination.describe()
                            ),
                        ),
                    },
                }
            }
            (outcome, _) => outcome,
        };
        match outcome {
            Outcome::Delivered { .. } => {
                trigger.function.limit.record_success();
                trigger.metrics.succeeded.inc();
                if !self.acknowledge(AckKind::Ack).await
                    && let Some(held) = in_place
                {
                    // Not surely acknowledged: the key's next event must not start
                    // (this one could come back after it). Held and tried again: at
                    // least once, in order; this call counts as an attempt.
                    // No failure is recorded: the call succeeded, so the next try is
                    // never taken for one past its last attempt and dead-lettered.
                    held.attempts += 1;
                    if held.first_attempt_at.is_none() {
                        held.first_attempt_at = Some(first_attempt_at());
                    }
                    return Settled::RetryIn(Duration::from_secs(1));
                }
            }
            Outcome::RetryLater {
                not_before,
                failure,
            } => {
                if failure.overloaded {
                    trigger.function.limit.decrease();
                }
                trigger
                    .metrics
                    .function_limit
                    .set(trigger.function.limit.limit() as i64);
                if delivery.attempt >= policy.max_attempts() {
                    let attempts = delivery.attempt;
                    Box::pin(self.dead_letter(
                        event,
                        REASON_ATTEMPTS_EXHAUSTED,
                        attempts,
                        &failure,
                        Some(first_attempt_at()),
                    ))
                    .await;
                    return Settled::Done;
                }
                // A retry copy lives in the events stream: a wait longer than the
                // stream keeps messages (a huge Retry-After) would let the stream
                // delete it.
                let longest_wait = shared.bus.events_max_age() / 2;
                let mut delay = policy
                    .delay(delivery.attempt)
                    .max(not_before.unwrap_or_default())
                    .min(longest_wait);
                if let Some(max_age) = policy.max_age {
                    // Come back no later than when the event expires, to dead-letter
                    // it then.
                    let remaining = (delivery.received_at + max_age
                        - time::OffsetDateTime::now_utc())
                    .max(time::Duration::ZERO);
                    delay = delay.min(
                        Duration::try_from(remaining).unwrap_or_default()
                            + Duration::from_millis(10),
                    );
                }
                trigger.metrics.retried.inc();
                tracing::info!(
                    event_id = %event.id, trigger = %trigger.config.name, function = %trigger.function.name,
                    attempt = delivery.attempt, status = failure.status, error = %failure.error, delay_ms = delay.as_millis() as u64,
                    "invocation failed, retrying later"
                );
                if let Some(held) = in_place {
                    // Held in place: the key's later events wait behind it.
                    held.attempts += 1;
                    held.first_attempt_at = Some(first_attempt_at());
                    held.last_failure = Some(failure);
                    return Settled::RetryIn(delay);
                }
                Box::pin(self.schedule_retry(&event, &failure, first_attempt_at(), delay)).await;
            }
            Outcome::Rejected { failure } => {
                trigger.metrics.rejected.inc();
                let attempts = delivery.attempt;
                Box::pin(self.dead_letter(
                    event,
                    REASON_REJECTED,
                    attempts,
                    &failure,
                    Some(first_attempt_at()),
                ))
                .await;
            }
        }
        Settled::Done
    }

    /// The success record of a function that did not answer with a CloudEvent: its
    /// answer (possibly empty) as the data of a `dev.switchyard.function.result` event
    /// that names the event it answered.
    pub(crate) fn result_event(&self, event: &Event, answer: Option<Box<FunctionAnswer>>) -> Event {
        let mut result = Event::new(
            event.id.clone(),
            format!("/switchyard/triggers/{}", self.trigger.config.name),
            "dev.switchyard.function.result",
        );
        result.subject.clone_from(&event.subject);
        result.time = Some(now_rfc3339());
        if let Some(answer) = answer {
            result.data = answer.body;
            result.datacontenttype = answer.content_type;
        }
        result
            .extensions
            .insert("originsource".to_owned(), event.source.clone());
        result
            .extensions
            .insert("origintype".to_owned(), event.ty.clone());
        if let Some(key) = event.extensions.get("partitionkey") {
            result
                .extensions
                .insert("partitionkey".to_owned(), key.clone());
        }
        result
    }

    /// Stores a copy of the event with its attempt history on the trigger's retry
    /// subject, due after `delay`, then acknowledges this copy. If the copy cannot be
    /// stored, this copy is NAKed with the delay instead, so the event stays in
    /// JetStream either way.
    pub(crate) async fn schedule_retry(
        &self,
        event: &Event,
        failure: &Failure,
        first_attempt_at: String,
        delay: Duration,
    ) {
        let (trigger, delivery) = (self.trigger, &self.delivery);
        let due = time::OffsetDateTime::now_utc() + delay;
        let state = RetryState {
            attempts: delivery.attempt,
            first_attempt_at: Some(first_attempt_at),
            received_at: Some(rfc3339(delivery.received_at)),
            last_status: failure.status,
            last_error: Some(truncate(&failure.error, MAX_ERROR_BYTES)),
            event_sequence: Some(delivery.event_sequence),
            retry_at_unix_ms: Some((due.unix_timestamp_nanos() / 1_000_000) as i64),
        };
        let mut headers: HeaderMap = event_headers(
            event,
            &format!("retry {} {}", trigger.config.name, delivery.sequence),
        );
        state.write_headers(&mut headers);
        let stored = self
            .shared
            .bus
            .store(trigger.retry_subject.clone(), headers, event.data.clone())
            .await;
        match stored {
            Ok(_) => {
                if let Err(error) = self.message.ack().await {
                    tracing::warn!(event_id = %event.id, %error, stage = "ack", "acknowledging a scheduled retry failed; the event may be attempted again");
                }
            }
            Err(error) => {
                tracing::warn!(event_id = %event.id, trigger = %trigger.config.name, %error, stage = "retry", "storing the retry failed, holding the event on the trigger instead");
                let first_attempt_at = state.first_attempt_at.as_deref();
                Box::pin(self.hand_back_recorded(
                    Some(delay),
                    Some(failure),
                    first_attempt_at,
                    None,
                ))
                .await;
            }
        }
    }

    /// Stores the event in the dead-letter stream, then terminates it on the trigger's
    /// consumer. `first_attempt_at` defaults to the one on record.
    pub(crate) async fn dead_letter(
        &self,
        event: Event,
        reason: &str,
        attempts: u64,
        failure: &Failure,
        first_attempt_at: Option<String>,
    ) {
        let (trigger, delivery) = (self.trigger, &self.delivery);
        let event_id = event.id.clone();
        let dead_letter = DeadLetter {
            event,
            reason: reason.to_owned(),
            trigger: trigger.config.name.clone(),
            function: trigger.function.name.clone(),
            attempts,
            last_status: failure.status,
            last_error: truncate(&failure.error, MAX_ERROR_BYTES),
            first_attempt_at: first_attempt_at.or_else(|| delivery.state.first_attempt_at.clone()),
            last_attempt_at: now_rfc3339(),
            received_at: rfc3339(delivery.received_at),
            event_sequence: delivery.sequence,
        };
        let (headers, payload) = dead_letter.to_message_within(self.shared.bus.max_payload());
        if !Box::pin(self.store_dead_letter(headers, payload, Some(&dead_letter))).await {
            return;
        }
        self.shared
            .metrics
            .events_dead_lettered
            .get_or_create(&DeadLetterLabels {
                trigger: trigger.config.name.clone(),
                function: trigger.function.name.clone(),
                reason: reason.to_owned(),
            })
            .inc();
        tracing::warn!(
            event_id = %event_id, trigger = %trigger.config.name, function = %trigger.function.name,
            attempt = delivery.attempt, reason, status = failure.status, error = %failure.error,
            "event dead-lettered"
        );
    }

    /// Dead-letters a message that is not a valid CloudEvent, headers and payload as
    /// they were (less NATS control headers), with the reason.
    pub(crate) async fn dead_letter_raw(&self, failure: &Failure) {
        let (trigger, sequence) = (self.trigger, self.delivery.sequence);
        let mut headers = HeaderMap::new();
        if let Some(original) = &self.message.headers {
            for (name, values) in original.iter() {
                let name_text = std::str::from_utf8(name.as_ref()).unwrap_or_default();
                if name_text.to_ascii_lowercase().starts_with("nats-") {
                    continue;
                }
                for value in values {
                    headers.append(name.clone(), value.clone());
                }
            }
        }
        headers.insert(
            "Nats-Msg-Id",
            format!("dlq {} {sequence}", trigger.config.name),
        );
        headers.insert("Switchyard-Dlq-Reason", REASON_MALFORMED);
        headers.insert("Switchyard-Dlq-Trigger", trigger.config.name.as_str());
        headers.insert("Switchyard-Dlq-Function", trigger.function.name.as_str());
        headers.insert(
            "Switchyard-Dlq-Last-Error",
            switchyard_event::encode_header_value(&truncate(&failure.error, MAX_ERROR_BYTES))
                .as_ref(),
        );
        headers.insert("Switchyard-Dlq-Event-Sequence", sequence.to_string());
        let mut payload = self.message.payload.clone();
        if switchyard_bus::limits::header_block_bytes(&headers) + payload.len()
            > self.shared.bus.max_payload()
            || switchyard_bus::limits::check_message("", &headers).is_err()
        {
            // The original headers do not fit beside the record: keep the record and
            // the payload (cut to what fits), say what was left out.
            let dropped = self
                .message
                .headers
                .as_ref()
                .map_or(0, |headers| headers.len());
            let mut record = HeaderMap::new();
            for name in [
                "Nats-Msg-Id",
                "Switchyard-Dlq-Reason",
                "Switchyard-Dlq-Trigger",
                "Switchyard-Dlq-Function",
                "Switchyard-Dlq-Last-Error",
                "Switchyard-Dlq-Event-Sequence",
            ] {
                if let Some(value) = headers.get(name) {
                    record.insert(name, value.clone());
                }
            }
            record.insert("Switchyard-Dlq-Headers-Dropped", dropped.to_string());
            let room = self
                .shared
                .bus
                .max_payload()
                .saturating_sub(switchyard_bus::limits::header_block_bytes(&record));
            payload.truncate(room);
            headers = record;
        }
        if Box::pin(self.store_dead_letter(headers, payload, None)).await {
            tracing::error!(trigger = %trigger.config.name, sequence, error = %failure.error, "malformed message dead-lettered");
        }
    }

    /// Stores a dead letter, then terminates this copy. If the store fails, the copy is
    /// handed back instead, so the event is always in one of the two streams. True when
    /// stored.
    pub(crate) async fn store_dead_letter(
        &self,
        headers: HeaderMap,
        payload: bytes::Bytes,
        record: Option<&DeadLetter>,
    ) -> bool {
        let subject = self
            .shared
            .bus
            .subjects()
            .dead_letter(&self.trigger.config.name);
        match self.shared.bus.store(subject, headers, payload).await {
            Ok(_) => {
                if let (Some(destination), Some(record)) =
                    (&self.trigger.destinations.on_failure, record)
                    && let Err(error) = destination
                        .publish(&record.event, &record.record_headers())
                        .await
                {
                    // Stored, but not yet where it should also go: hand the event
                    // back with its outcome recorded; the next delivery dead-letters
                    // it again without invoking (the stored copy is deduplicated)
                    // and publishes again.
                    tracing::error!(trigger = %self.trigger.config.name, destination = %destination.describe(), %error, stage = "dead_letter", "publishing the dead letter to its destination failed, retrying");
                    Box::pin(self.hand_back_dead_letter(record)).await;
                    return false;
                }
                if !self.acknowledge(AckKind::Term).await
                    && self.confirm_acks
                    && let Some(record) = record
                {
                    // If it comes back, it is dead-lettered again without invoking.
                    Box::pin(self.hand_back_dead_letter(record)).await;
                }
                true
            }
            Err(error) => {
                tracing::error!(trigger = %self.trigger.config.name, %error, stage = "dead_letter", "storing the dead letter failed, handing the event back");
                match record {
                    Some(record) => Box::pin(self.hand_back_dead_letter(record)).await,
                    // A malformed message: the next delivery dead-letters it again.
                    None => {
                        Box::pin(self.hand_back_recorded(
                            Some(Duration::from_secs(5)),
                            None,
                            None,
                            None,
                        ))
                        .await;
                    }
                }
                false
            }
        }
    }

    /// Hands the copy back with its dead letter recorded, so the next delivery stores
    /// (and publishes) it without calling the function again.
    pub(crate) async fn hand_back_dead_letter(&self, record: &DeadLetter) {
        let failure = Failure::new(record.last_status, record.last_error.clone());
        Box::pin(self.hand_back_recorded(
            Some(Duration::from_secs(5)),
            Some(&failure),
            record.first_attempt_at.as_deref(),
            Some(&record.reason),
        ))
        .await;
    }
}
