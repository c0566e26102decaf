//! Which dispatcher processes are alive, so ordered triggers can spread their key
//! partitions over them.
//!
//! Every process puts its id in a KV bucket (`<events stream>_MEMBERS`, entries expire
//! after [`MEMBER_TTL`]) every [`HEARTBEAT`] and reads the live ids back. A partition is
//! preferred by the live member with the highest rendezvous hash of (member,
//! partition), so each process computes the same answer and a join or a death moves
//! only the partitions it must. Only the preferred process pulls a partition.
//!
//! Membership decides balance, never correctness: a partition consumer is pinned to
//! one process at a time by JetStream, and a new holder waits for the previous one's
//! events to settle (see [`crate::ordered`]). If the bucket cannot be reached, every
//! process competes for every partition and the pinning alone keeps the order.

use std::time::Duration;

use futures::StreamExt;
use switchyard_bus::Bus;
use switchyard_bus::async_nats::jetstream::kv;
use switchyard_event::backoff::Backoff;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub const HEARTBEAT: Duration = Duration::from_secs(1);
pub const MEMBER_TTL: Duration = Duration::from_secs(5);

/// This process's view of the live members.
#[derive(Clone)]
pub struct Members {
    pub id: String,
    /// Live member ids, sorted; `None` while unknown (every partition is then
    /// competed for).
    pub live: watch::Receiver<Option<Vec<String>>>,
}

impl Members {
    /// Whether this process should pull partition `partition` of `trigger`.
    pub fn prefers_me(&self, trigger: &str, partition: usize) -> bool {
        match &*self.live.borrow() {
            None => true,
            Some(live) if live.is_empty() => true,
            Some(live) => preferred(live, trigger, partition) == Some(self.id.as_str()),
        }
    }
}

fn fnv(parts: &[&str]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.bytes().chain(std::iter::once(0)) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    // FNV alone spreads short keys that differ in a few bytes badly; finish with
    // MurmurHash3's 64-bit mixer.
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^ (hash >> 33)
}

/// The member that should hold `partition` of `trigger`.
pub fn preferred<'a>(live: &'a [String], trigger: &str, partition: usize) -> Option<&'a str> {
    let partition = partition.to_string();
    live.iter()
        .max_by_key(|member| fnv(&[member, trigger, &partition]))
        .map(String::as_str)
}

async fn bucket(bus: &Bus) -> Result<kv::Store, String> {
    bus.jetstream()
        .create_or_update_key_value(kv::Config {
            bucket: format!("{}_MEMBERS", bus.events_stream()),
            description: "live switchyard dispatcher processes".to_owned(),
            history: 1,
            max_age: MEMBER_TTL,
            storage: switchyard_bus::async_nats::jetstream::stream::StorageType::Memory,
            num_replicas: bus.replicas(),
            ..Default::default()
        })
        .await
        .map_err(|error| error.to_string())
}

async fn live_ids(store: &kv::Store) -> Result<Vec<String>, String> {
    let mut keys = store.keys().await.map_err(|error| error.to_string())?;
    let mut live = Vec::new();
    while let Some(key) = keys.next().await {
        live.push(key.map_err(|error| error.to_string())?);
    }
    live.sort();
    Ok(live)
}

/// Starts the heartbeat; it deletes this process's entry when `shutdown` fires, so
/// the others take its partitions at once.
pub fn start(bus: Bus, shutdown: CancellationToken) -> (Members, tokio::task::JoinHandle<()>) {
    let id = uuid::Uuid::now_v7().simple().to_string();
    let (sender, live) = watch::channel(None);
    let members = Members {
        id: id.clone(),
        live,
    };
    let task = tokio::spawn(async move {
        let mut store = None;
        let mut ticker = tokio::time::interval(HEARTBEAT);
        // Paced by the heartbeat ticker: only the count and the log throttle are used.
        let mut failures = Backoff::new(HEARTBEAT, HEARTBEAT);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = shutdown.cancelled() => break,
            }
            let beat = async {
                if store.is_none() {
                    store = Some(bucket(&bus).await?);
                }
                let store = store.as_ref().expect("opened above");
                store
                    .put(&id, bytes::Bytes::new())
                    .await
                    .map_err(|error| error.to_string())?;
                live_ids(store).await
            };
            match beat.await {
                Ok(live) => {
                    failures.succeeded();
                    sender.send_if_modified(|current| {
                        let changed = current.as_ref() != Some(&live);
                        *current = Some(live);
                        changed
                    });
                }
                Err(error) => {
                    store = None;
                    if failures.failed() {
                        tracing::warn!(%error, failures = failures.failures(), "membership heartbeat failed; ordered partitions are competed for until it works");
                    }
                    if failures.failures() >= 3 {
                        sender.send_if_modified(|current| current.take().is_some());
                    }
                }
            }
        }
        if let Some(store) = store {
            let _ = store.purge(&id).await;
        }
    });
    (members, task)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_spread_and_move_only_when_they_must() {
        let two: Vec<String> = vec!["a".into(), "b".into()];
        let three: Vec<String> = vec!["a".into(), "b".into(), "c".into()];
        let owners_two: Vec<&str> = (0..64).map(|p| preferred(&two, "t", p).unwrap()).collect();
        let owners_three: Vec<&str> = (0..64)
            .map(|p| preferred(&three, "t", p).unwrap())
            .collect();
        for member in ["a", "b"] {
            let held = owners_two.iter().filter(|owner| **owner == member).count();
            assert!((16..=48).contains(&held), "{member} holds {held} of 64");
        }
        // Adding c moves partitions only to c.
        for (before, after) in owners_two.iter().zip(&owners_three) {
            assert!(before == after || *after == "c");
        }
        assert!(owners_three.contains(&"c"));
    }
}
