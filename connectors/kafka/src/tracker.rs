//! Which records of each partition are persisted, and the offset that is safe to
//! commit: the contiguous watermark. An offset is stored for commit only once every
//! record read before it in its partition is persisted, so a commit never passes a
//! record the bus does not hold, whatever order the publishes complete in.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

/// A record handed to the publisher: where it came from, and which assignment of its
/// partition read it (a completion from an earlier assignment is ignored).
#[derive(Debug, Clone)]
pub struct Ticket {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    epoch: u64,
}

#[derive(Debug)]
struct Partition {
    epoch: u64,
    /// Records read and not yet released, in offset order, with whether each is
    /// persisted.
    pending: VecDeque<(i64, bool)>,
}

#[derive(Debug, Default)]
struct State {
    partitions: HashMap<(Arc<str>, i32), Partition>,
    next_epoch: u64,
    in_flight: usize,
    /// Offsets ready to be stored for commit: the last persisted record of each
    /// partition's contiguous run.
    to_store: HashMap<(Arc<str>, i32), i64>,
}

/// Shared between the consumer thread and the publisher.
#[derive(Debug, Default)]
pub struct Tracker {
    state: Mutex<State>,
    changed: Condvar,
}

impl Tracker {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records that a record was read and handed on.
    pub fn read(&self, topic: &str, partition: i32, offset: i64) -> Ticket {
        let mut state = self.lock();
        state.in_flight += 1;
        let next_epoch = state.next_epoch;
        let key = match state
            .partitions
            .get_key_value(&(Arc::<str>::from(topic), partition))
        {
            Some((key, _)) => key.clone(),
            None => (Arc::<str>::from(topic), partition),
        };
        let entry = state
            .partitions
            .entry(key.clone())
            .or_insert_with(|| Partition {
                epoch: next_epoch,
                pending: VecDeque::new(),
            });
        entry.pending.push_back((offset, false));
        let epoch = entry.epoch;
        if epoch == next_epoch {
            state.next_epoch += 1;
        }
        Ticket {
            topic: key.0,
            partition,
            offset,
            epoch,
        }
    }

    /// Records that a record is persisted (or dead-lettered).
    pub fn done(&self, ticket: &Ticket) {
        let mut state = self.lock();
        let key = (ticket.topic.clone(), ticket.partition);
        let Some(partition) = state.partitions.get_mut(&key) else {
            return;
        };
        if partition.epoch != ticket.epoch {
            return;
        }
        let Ok(index) = partition
            .pending
            .binary_search_by_key(&ticket.offset, |(offset, _)| *offset)
        else {
            return;
        };
        partition.pending[index].1 = true;
        let mut released = 0;
        let mut last = None;
        while let Some(&(offset, true)) = partition.pending.front() {
            partition.pending.pop_front();
            released += 1;
            last = Some(offset);
        }
        state.in_flight -= released;
        if let Some(last) = last {
            state.to_store.insert(key, last);
        }
        drop(state);
        self.changed.notify_all();
    }

    /// Records read and not yet persisted, over every partition.
    pub fn in_flight(&self) -> usize {
        self.lock().in_flight
    }

    /// Waits up to `timeout` for the records in flight to fall to `limit` or below.
    pub fn wait_at_most(&self, limit: usize, timeout: std::time::Duration) {
        let state = self.lock();
        let _ = self
            .changed
            .wait_timeout_while(state, timeout, |state| state.in_flight > limit)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
    }

    /// Takes the offsets ready to be stored: (topic, partition, last persisted
    /// offset of the contiguous run).
    pub fn take_to_store(&self) -> Vec<(Arc<str>, i32, i64)> {
        let mut state = self.lock();
        state
            .to_store
            .drain()
            .map(|((topic, partition), offset)| (topic, partition, offset))
            .collect()
    }

    /// Waits until no record of `partitions` (all partitions when `None`) is in
    /// flight, or until `deadline`. True when they drained.
    pub fn wait_drained(&self, partitions: Option<&[(String, i32)]>, deadline: Instant) -> bool {
        let mut state = self.lock();
        loop {
            let busy = state.partitions.iter().any(|((topic, partition), track)| {
                !track.pending.is_empty()
                    && partitions.is_none_or(|list| {
                        list.iter()
                            .any(|(name, number)| **name == **topic && number == partition)
                    })
            });
            if !busy {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }

    /// Forgets partitions given up: their records still in flight no longer count,
    /// and their late completions are ignored (the next owner reads them again; the
    /// bus's duplicate window drops what was persisted twice).
    pub fn release(&self, partitions: &[(String, i32)]) -> usize {
        let mut state = self.lock();
        let mut abandoned = 0;
        for (topic, partition) in partitions {
            let key = (Arc::<str>::from(topic.as_str()), *partition);
            if let Some(track) = state.partitions.remove(&key) {
                abandoned += track.pending.len();
            }
            state.to_store.remove(&key);
        }
        state.in_flight -= abandoned;
        drop(state);
        self.changed.notify_all();
        abandoned
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_watermark_never_passes_an_unpersisted_record() {
        let tracker = Tracker::default();
        let tickets: Vec<Ticket> = (10..15)
            .map(|offset| tracker.read("t", 0, offset))
            .collect();
        let other = tracker.read("t", 1, 7);
        assert_eq!(tracker.in_flight(), 6);
        tracker.done(&tickets[1]);
        tracker.done(&tickets[2]);
        assert!(
            tracker.take_to_store().is_empty(),
            "10 is not persisted yet"
        );
        tracker.done(&tickets[0]);
        assert_eq!(tracker.take_to_store(), vec![(Arc::from("t"), 0, 12)]);
        tracker.done(&tickets[4]);
        assert!(
            tracker.take_to_store().is_empty(),
            "13 is not persisted yet"
        );
        tracker.done(&other);
        assert_eq!(tracker.take_to_store(), vec![(Arc::from("t"), 1, 7)]);
        tracker.done(&tickets[3]);
        assert_eq!(tracker.take_to_store(), vec![(Arc::from("t"), 0, 14)]);
        assert_eq!(tracker.in_flight(), 0);
    }

    #[test]
    fn completions_from_an_earlier_assignment_are_ignored() {
        let tracker = Tracker::default();
        let old = tracker.read("t", 0, 5);
        assert_eq!(tracker.release(&[("t".to_owned(), 0)]), 1);
        assert_eq!(tracker.in_flight(), 0);
        let new = tracker.read("t", 0, 5);
        tracker.done(&old);
        assert!(tracker.take_to_store().is_empty());
        assert_eq!(tracker.in_flight(), 1);
        tracker.done(&new);
        assert_eq!(tracker.take_to_store(), vec![(Arc::from("t"), 0, 5)]);
    }

    #[test]
    fn waiting_for_a_partition_to_drain() {
        let tracker = Arc::new(Tracker::default());
        let busy = tracker.read("t", 0, 1);
        let idle_partition = [("t".to_owned(), 1)];
        assert!(tracker.wait_drained(Some(&idle_partition), Instant::now()));
        assert!(!tracker.wait_drained(None, Instant::now() + Duration::from_millis(20)));
        let finisher = {
            let tracker = tracker.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(30));
                tracker.done(&busy);
            })
        };
        assert!(tracker.wait_drained(None, Instant::now() + Duration::from_secs(5)));
        finisher.join().unwrap();
    }
}
