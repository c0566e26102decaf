//! Concurrency permits. A permit is taken before an event is pulled and released when
//! its invocation ends (dropped), so a limit is also backpressure: a slow function
//! leaves events in JetStream, not in memory.
//!
//! [`AdaptiveLimit`] is a function's budget: it shrinks by half when the function
//! answers 429/503 (at most once per cool-down) and grows back by one after each run
//! of successes as long as the current limit (additive increase, multiplicative
//! decrease), never above the configured maximum.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

const DECREASE_COOL_DOWN: Duration = Duration::from_millis(500);

struct LimitState {
    limit: usize,
    /// Permits to retire as they are released, after a decrease found them in use.
    debt: usize,
    successes: usize,
    last_decrease: Option<Instant>,
}

pub struct AdaptiveLimit {
    semaphore: Arc<Semaphore>,
    max: usize,
    state: Mutex<LimitState>,
}

/// A permit of an [`AdaptiveLimit`]; released (or retired after a decrease) on drop.
pub struct AdaptivePermit {
    permit: Option<OwnedSemaphorePermit>,
    limit: Arc<AdaptiveLimit>,
}

impl Drop for AdaptivePermit {
    fn drop(&mut self) {
        let Some(permit) = self.permit.take() else {
            return;
        };
        let mut state = self.limit.state.lock().expect("limit state lock");
        if state.debt > 0 {
            state.debt -= 1;
            permit.forget();
        }
    }
}

impl AdaptiveLimit {
    pub fn new(max: usize) -> Arc<Self> {
        let max = max.max(1);
        Arc::new(AdaptiveLimit {
            semaphore: Arc::new(Semaphore::new(max)),
            max,
            state: Mutex::new(LimitState {
                limit: max,
                debt: 0,
                successes: 0,
                last_decrease: None,
            }),
        })
    }

    pub async fn acquire(self: &Arc<Self>) -> AdaptivePermit {
        let permit = self
            .semaphore
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        AdaptivePermit {
            permit: Some(permit),
            limit: self.clone(),
        }
    }

    pub fn try_acquire(self: &Arc<Self>) -> Option<AdaptivePermit> {
        let permit = self.semaphore.clone().try_acquire_owned().ok()?;
        Some(AdaptivePermit {
            permit: Some(permit),
            limit: self.clone(),
        })
    }

    /// The current limit.
    pub fn limit(&self) -> usize {
        self.state.lock().expect("limit state lock").limit
    }

    /// The function is overloaded: halve the limit.
    pub fn decrease(&self) {
        let mut state = self.state.lock().expect("limit state lock");
        let now = Instant::now();
        if state
            .last_decrease
            .is_some_and(|last| now.duration_since(last) < DECREASE_COOL_DOWN)
        {
            return;
        }
        state.last_decrease = Some(now);
        state.successes = 0;
        let new_limit = (state.limit / 2).max(1);
        let reduce = state.limit - new_limit;
        state.limit = new_limit;
        let retired_now = self.semaphore.forget_permits(reduce);
        state.debt += reduce - retired_now;
    }

    /// The function succeeded: after `limit` successes in a row, allow one more.
    pub fn record_success(&self) {
        let mut state = self.state.lock().expect("limit state lock");
        if state.limit >= self.max {
            return;
        }
        state.successes += 1;
        if state.successes >= state.limit {
            state.successes = 0;
            state.limit += 1;
            if state.debt > 0 {
                state.debt -= 1;
            } else {
                self.semaphore.add_permits(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn decrease_halves_and_success_recovers_step_by_step() {
        let limit = AdaptiveLimit::new(8);
        let held: Vec<_> = (0..8).map(|_| limit.try_acquire().unwrap()).collect();
        limit.decrease();
        assert_eq!(limit.limit(), 4);
        drop(held);
        // Only 4 permits came back: the other 4 were retired on release.
        let held: Vec<_> = std::iter::from_fn(|| limit.try_acquire()).collect();
        assert_eq!(held.len(), 4);
        drop(held);
        for _ in 0..4 {
            limit.record_success();
        }
        assert_eq!(limit.limit(), 5);
        for _ in 0..5 {
            limit.record_success();
        }
        assert_eq!(limit.limit(), 6);
        let held: Vec<_> = std::iter::from_fn(|| limit.try_acquire()).collect();
        assert_eq!(held.len(), 6);
    }

    #[tokio::test]
    async fn never_below_one() {
        let limit = AdaptiveLimit::new(2);
        limit.decrease();
        limit.state.lock().unwrap().last_decrease = None;
        limit.decrease();
        assert_eq!(limit.limit(), 1);
        assert!(limit.try_acquire().is_some());
    }
}
