//! Attempt accounting across deliveries of one event copy.
//!
//! JetStream counts *deliveries*: a message handed back without the function being
//! called (no permit was free, the process was shutting down, a partition moved)
//! counts as much as one whose invocation failed. The attempt number Switchyard
//! reports (on a retry, a dead letter, `Switchyard-Attempts`) must count
//! *invocations*. So a delivery that ends without an ack or a term (the copy goes
//! back to JetStream) first writes a [`DeliveryRecord`] for the copy, keyed by
//! trigger and stream sequence, in the KV bucket `<events stream>_DELIVERIES`:
//! - a hand-back adds one ended delivery and no attempt;
//! - an invocation whose outcome could not be stored (its retry copy or dead letter
//!   was refused by the bus) adds one ended delivery, one attempt, its failure, and
//!   for a dead letter its reason, so the next delivery stores the dead letter
//!   without calling the function again;
//! - an invocation abandoned at shutdown adds one ended delivery and one attempt.
//!
//! The next delivery reads the record only when JetStream says the copy was delivered
//! before (rare), so the common path costs nothing. A delivery that ended with no
//! record at all (the process died, or hung until `ack_wait`) is *unfinished*: it is
//! not counted as an attempt (nothing says the function was called), but an event
//! with `retry.max_unfinished` unfinished deliveries is dead-lettered as
//! `unprocessable` instead of being redelivered forever (a poison event that crashes
//! or hangs every process that takes it). Records expire with the events stream's
//! `max_age`: no copy lives longer.

use serde::{Deserialize, Serialize};
use std::time::Duration;
use switchyard_bus::async_nats::jetstream::kv;
use switchyard_bus::{Bus, BusError};

use switchyard_bus::async_nats::jetstream::{self, AckKind};
use switchyard_bus::dead_letter::{
    REASON_ATTEMPTS_EXHAUSTED, REASON_MAX_AGE_EXCEEDED, REASON_UNPROCESSABLE,
};
use switchyard_bus::{RetryState, event_from_message};
use switchyard_event::timestamp::parse_rfc3339;
use switchyard_event::{Event, Failure};

use crate::settle::{Handling, InPlace};
use crate::{Shared, TriggerRuntime};

/// What the ended deliveries of one event copy left for the next one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryRecord {
    /// Deliveries of the copy that ended with this record written (hand-backs and
    /// outcomes the streams could not take).
    #[serde(default)]
    pub ended: u64,
    /// Invocations among them.
    #[serde(default)]
    pub attempts: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_attempt_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The copy was settled as a dead letter with this reason, but storing it failed:
    /// the next delivery stores it without invoking.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<String>,
    /// A random mark of the write that changed the record last: a write retried after
    /// its reply was lost (it landed) finds its own mark and is not counted twice.
    #[serde(default)]
    pub last_write: u64,
}

/// The KV bucket of delivery records.
pub struct DeliveryRecords {
    store: kv::Store,
    /// The events stream's creation time: records are keyed by it too, so a stream
    /// created again (sequences start over) never meets an old record.
    stream_epoch: i128,
}

/// Tries of a compare-and-set update before giving up.
const UPDATE_TRIES: usize = 3;

impl DeliveryRecords {
    pub async fn open(bus: &Bus, stream_epoch: i128) -> Result<DeliveryRecords, BusError> {
        let store = bus
            .jetstream()
            .create_or_update_key_value(kv::Config {
                bucket: format!("{}_DELIVERIES", bus.events_stream()),
                description: "switchyard: deliveries of event copies that ended without an outcome on the stream".to_owned(),
                history: 1,
                max_age: bus.events_max_age(),
                num_replicas: bus.replicas(),
                ..Default::default()
            })
            .await
            .map_err(|error| BusError::operation("open the delivery records bucket", error))?;
        Ok(DeliveryRecords {
            store,
            stream_epoch,
        })
    }

    fn key(&self, trigger: &str, sequence: u64) -> String {
        format!("{trigger}.{}.{sequence}", self.stream_epoch)
    }

    /// The record of copy `sequence` of `trigger`; empty when none was written.
    pub async fn read(&self, trigger: &str, sequence: u64) -> Result<DeliveryRecord, String> {
        match self.store.get(self.key(trigger, sequence)).await {
            Ok(Some(value)) => serde_json::from_slice(&value).map_err(|error| error.to_string()),
            Ok(None) => Ok(DeliveryRecord::default()),
            Err(error) => Err(error.to_string()),
        }
    }

    /// Records one more ended delivery of copy `sequence`, changed by `change`
    /// (compare-and-set: only one process holds a copy at a time, but a slow write of
    /// an earlier holder must not be lost).
    pub async fn end_delivery(
        &self,
        trigger: &str,
        sequence: u64,
        change: impl Fn(&mut DeliveryRecord),
    ) -> Result<(), String> {
        self.end_delivery_marked(trigger, sequence, rand::random::<u64>().max(1), change)
            .await
    }

    /// [`Self::end_delivery`] with the write's mark given: a try that finds the
    /// record already carrying `mark` (an earlier try landed, its reply was lost)
    /// changes nothing.
    pub async fn end_delivery_marked(
        &self,
        trigger: &str,
        sequence: u64,
        mark: u64,
        change: impl Fn(&mut DeliveryRecord),
    ) -> Result<(), String> {
        let key = self.key(trigger, sequence);
        let mut last_error = String::new();
        for _ in 0..UPDATE_TRIES {
            let entry = self
                .store
                .entry(key.as_str())
                .await
                .map_err(|error| error.to_string())?;
            let (mut record, revision) = match entry {
                Some(entry) if entry.operation == kv::Operation::Put => (
                    serde_json::from_slice(&entry.value).unwrap_or_default(),
                    Some(entry.revision),
                ),
                _ => (DeliveryRecord::default(), None),
            };
            if record.last_write == mark {
                return Ok(());
            }
            record.ended += 1;
            record.last_write = mark;
            change(&mut record);
            let value = serde_json::to_vec(&record).expect("a record serializes");
            let written = match revision {
                Some(revision) => self
                    .store
                    .update(key.as_str(), value.into(), revision)
                    .await
                    .map(|_| ())
                    .map_err(|error| error.to_string()),
                None => self
                    .store
                    .create(key.as_str(), value.into())
                    .await
                    .map(|_| ())
                    .map_err(|error| error.to_string()),
            };
            match written {
                Ok(()) => return Ok(()),
                Err(error) => last_error = error,
            }
        }
        Err(last_error)
    }
}

/// Everything known about one delivery of an event to a trigger.
pub(crate) struct Delivery {
    /// 1-based number of this attempt, over every copy of the event.
    pub(crate) attempt: u64,
    /// Sequence of this copy (original, or a due retry) in the events stream.
    pub(crate) sequence: u64,
    /// Sequence of the original event.
    pub(crate) event_sequence: u64,
    pub(crate) received_at: time::OffsetDateTime,
    pub(crate) state: RetryState,
    /// Earlier deliveries of this copy that ended with no outcome and no record (the
    /// process died or hung): not attempts, but bounded by `retry.max_unfinished`.
    pub(crate) unfinished: u64,
    /// A dead letter an earlier delivery settled but could not store: its reason.
    pub(crate) pending_dead_letter: Option<String>,
    /// Attempts made in place during this very delivery (ordered triggers).
    pub(crate) in_place_attempts: u64,
}

impl Delivery {
    fn last_failure(&self) -> Option<Failure> {
        let error = self.state.last_error.clone()?;
        Some(Failure::new(self.state.last_status, error))
    }
}

/// Reads what is known of a delivery and settles, without invoking, what must not be
/// invoked: a malformed message, an event the filter refuses, an event out of attempts
/// or past its max age. Returns the event to invoke otherwise.
pub(crate) async fn prepare<'a>(
    trigger: &'a TriggerRuntime,
    shared: &'a Shared,
    message: &'a jetstream::Message,
    in_place: Option<&InPlace>,
) -> Option<(Handling<'a>, Event)> {
    let delivery = match message.info() {
        Ok(info) => {
            let mut state = RetryState::from_headers(message.headers.as_ref());
            let delivered = info.delivered.max(1) as u64;
            // Only a redelivered copy can have a record: the first delivery reads
            // nothing.
            // Whether earlier deliveries are known: without the record (it could not
            // be read) none of them is taken for an unfinished one.
            let mut record_known = true;
            let record = if delivered > 1 {
                Box::pin(shared.records.read(&trigger.config.name, info.stream_sequence))
                    .await
                    .unwrap_or_else(|error| {
                        tracing::warn!(trigger = %trigger.config.name, sequence = info.stream_sequence, %error, stage = "dispatch", "reading the delivery record failed; attempts may be undercounted");
                        record_known = false;
                        DeliveryRecord::default()
                    })
            } else {
                DeliveryRecord::default()
            };
            if state.first_attempt_at.is_none() {
                state.first_attempt_at.clone_from(&record.first_attempt_at);
            }
            if record.last_error.is_some() {
                state.last_status = record.last_status;
                state.last_error.clone_from(&record.last_error);
            }
            let mut earlier = record.attempts;
            let mut in_place_attempts = 0;
            if let Some(held) = in_place {
                in_place_attempts = held.attempts;
                earlier += held.attempts;
                if held.first_attempt_at.is_some() {
                    state.first_attempt_at.clone_from(&held.first_attempt_at);
                }
                if let Some(failure) = &held.last_failure {
                    state.last_status = failure.status;
                    state.last_error = Some(failure.error.clone());
                }
            }
            Delivery {
                // Invocations on record (the copy's headers, this copy's delivery
                // record, in-place retries) plus this one: hand-backs never count.
                attempt: state.attempts + earlier + 1,
                // Ordered triggers hold queued events delivered but not invoked: a
                // crash ends those deliveries too, so they are not counted there.
                unfinished: if record_known && in_place.is_none() {
                    (delivered - 1).saturating_sub(record.ended)
                } else {
                    0
                },
                pending_dead_letter: record.dead_letter,
                in_place_attempts,
                sequence: info.stream_sequence,
                event_sequence: state.event_sequence.unwrap_or(info.stream_sequence),
                received_at: state
                    .received_at
                    .as_deref()
                    .and_then(parse_rfc3339)
                    .unwrap_or(info.published),
                state,
            }
        }
        Err(error) => {
            tracing::error!(trigger = %trigger.config.name, %error, stage = "dispatch", "message without jetstream metadata, handing back");
            let _ = Box::pin(message.ack_with(AckKind::Nak(Some(Duration::from_secs(1))))).await;
            return None;
        }
    };
    if message.subject.as_str() != trigger.direct_subject
        && !trigger.expects(message.subject.as_str())
    {
        // Another process changed this trigger's consumers to a new form this one
        // does not run yet: handed back for a process that does, not settled as
        // filtered out by the old filter.
        if !trigger
            .superseded
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            tracing::warn!(trigger = %trigger.config.name, subject = %message.subject, "another process changed this trigger's consumers to a newer form of it: this process stops pulling its events until it is reloaded with the same configuration");
        }
        Box::pin(crate::settle::hand_back(
            trigger,
            shared,
            message,
            Some(Duration::from_secs(1)),
        ))
        .await;
        return None;
    }
    let handling = Handling {
        trigger,
        shared,
        message,
        delivery,
        invoked: std::sync::atomic::AtomicBool::new(false),
        confirm_acks: in_place.is_some(),
    };
    let delivery = &handling.delivery;
    let event = match event_from_message(message.headers.as_ref(), message.payload.clone()) {
        Ok(event) => event,
        Err(error) => {
            let failure = Failure::new(None, format!("not a valid cloudevent: {error}"));
            Box::pin(handling.dead_letter_raw(&failure)).await;
            return None;
        }
    };
    let direct = message.subject.as_str() == trigger.direct_subject;
    if !direct && !trigger.config.filter.matches(&event) {
        trigger.metrics.filtered.inc();
        let _ = Box::pin(message.ack()).await;
        return None;
    }
    let policy = &trigger.config.retry;
    if let Some(reason) = &delivery.pending_dead_letter {
        // An earlier delivery settled it as a dead letter but could not store it (or
        // publish it to `on_failure`): store it now, without invoking again.
        let failure = delivery
            .last_failure()
            .unwrap_or_else(|| Failure::new(None, "dead-lettered by an earlier delivery"));
        let reason = reason.clone();
        let attempts = delivery.attempt - 1;
        Box::pin(handling.dead_letter(event, &reason, attempts, &failure, None)).await;
        return None;
    }
    if delivery.unfinished >= u64::from(policy.max_unfinished.max(1)) {
        // A poison event: every process that took it died or hung before an outcome.
        let failure = Failure::new(
            None,
            format!(
                "delivered {} times without an outcome: the process handling it stopped or hung each time{}",
                delivery.unfinished,
                delivery
                    .last_failure()
                    .map(|failure| format!(" (last recorded failure: {})", failure.error))
                    .unwrap_or_default()
            ),
        );
        let attempts = delivery.attempt - 1;
        Box::pin(handling.dead_letter(event, REASON_UNPROCESSABLE, attempts, &failure, None)).await;
        return None;
    }
    // Only when an earlier attempt's failure is on record.
    if delivery.attempt > policy.max_attempts() && delivery.state.last_error.is_some() {
        // Only reachable when an earlier delivery could not settle the event (its
        // dead letter or retry could not be stored): settle it now, without invoking.
        let failure = delivery
            .last_failure()
            .unwrap_or_else(|| Failure::new(None, "attempts exhausted"));
        let attempts = delivery.attempt - 1;
        Box::pin(handling.dead_letter(event, REASON_ATTEMPTS_EXHAUSTED, attempts, &failure, None))
            .await;
        return None;
    }
    if let Some(max_age) = policy.max_age {
        let age =
            (time::OffsetDateTime::now_utc() - delivery.received_at).max(time::Duration::ZERO);
        if age > max_age {
            let failure = delivery.last_failure().unwrap_or_else(|| {
                Failure::new(
                    None,
                    format!(
                        "event is {}s old, older than max_age {}s",
                        age.whole_seconds(),
                        max_age.as_secs()
                    ),
                )
            });
            let attempts = delivery.attempt - 1;
            Box::pin(handling.dead_letter(
                event,
                REASON_MAX_AGE_EXCEEDED,
                attempts,
                &failure,
                None,
            ))
            .await;
            return None;
        }
    }
    Some((handling, event))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_record_reads_from_old_or_partial_json() {
        let record: DeliveryRecord = serde_json::from_str("{}").unwrap();
        assert_eq!(record, DeliveryRecord::default());
        let record: DeliveryRecord =
            serde_json::from_str(r#"{"ended":2,"attempts":1,"dead_letter":"rejected"}"#).unwrap();
        assert_eq!(record.ended, 2);
        assert_eq!(record.dead_letter.as_deref(), Some("rejected"));
    }
}
