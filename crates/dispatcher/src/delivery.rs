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
use switchyard_bus::async_nats::jetstream::kv;
use switchyard_bus::{Bus, BusError};

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
            record.ended += 1;
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
