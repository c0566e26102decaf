//! A dedup horizon longer than the events stream's duplicate window: the ids a source
//! stored, kept in a KV bucket whose entries expire after the horizon.
//!
//! The key is the SHA-256 of the event's `source` and `id` (the pair CloudEvents makes
//! unique), so any id fits a KV key. A source checks [`KvHorizon::seen`] before
//! publishing and calls [`KvHorizon::remember`] after the PubAck: a crash in between
//! can let one later redelivery through (at least once), never drop an event.

use std::time::Duration;

use async_nats::jetstream::kv;
use async_trait::async_trait;
use sha2::Digest;
use switchyard_event::{DedupHorizon, Event};

use crate::{Bus, BusError};

/// The ids one source stored within its horizon.
pub struct KvHorizon {
    store: kv::Store,
}

impl KvHorizon {
    /// Opens (or creates) the bucket `<events stream>_DEDUP_<name>`, whose entries
    /// expire after `horizon`.
    pub async fn open(bus: &Bus, name: &str, horizon: Duration) -> Result<KvHorizon, BusError> {
        let store = bus
            .jetstream()
            .create_or_update_key_value(kv::Config {
                bucket: format!("{}_DEDUP_{name}", bus.events_stream()),
                description: format!("switchyard: ids `{name}` stored in the last {horizon:?}"),
                history: 1,
                max_age: horizon,
                num_replicas: bus.replicas(),
                ..Default::default()
            })
            .await
            .map_err(|error| BusError::operation("open a dedup horizon bucket", error))?;
        Ok(KvHorizon { store })
    }

    fn key(event: &Event) -> String {
        let mut digest = sha2::Sha256::new();
        digest.update(event.source.as_bytes());
        digest.update([0]);
        digest.update(event.id.as_bytes());
        hex::encode(digest.finalize())
    }
}

#[async_trait]
impl DedupHorizon for KvHorizon {
    async fn seen(&self, event: &Event) -> Result<bool, String> {
        self.store
            .get(Self::key(event))
            .await
            .map(|value| value.is_some())
            .map_err(|error| error.to_string())
    }

    async fn remember(&self, event: &Event) -> Result<(), String> {
        self.store
            .put(Self::key(event), bytes::Bytes::from_static(b"1"))
            .await
            .map(|_| ())
            .map_err(|error| error.to_string())
    }
}
