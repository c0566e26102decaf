//! Pausing and logging while infrastructure keeps failing.
//!
//! Every loop that talks to a server (a trigger's pull, a source's subscription, a
//! bucket poll, a slot lease) retries forever while Switchyard runs: giving up would
//! silently stop a trigger or a source. What they share is this: a pause that grows
//! with consecutive failures up to a cap (exponential, with a little jitter so
//! processes that lost the same server do not come back in lockstep), a log line on
//! the first failure and then at powers of two (a long outage stays visible without
//! flooding the log), and the count, which some loops use to escalate (recreate a
//! consumer from the third failure on).
//!
//! Written here rather than taken from `backon`: these loops are state machines that
//! keep their own state across tries and must stop at shutdown, not one closure
//! retried a bounded number of times.

use std::time::Duration;

/// Consecutive failures of one operation and the pause before its next try.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    /// A pause of `first` after the first failure, doubling up to `max`.
    pub const fn new(first: Duration, max: Duration) -> Self {
        Backoff {
            first,
            max,
            failures: 0,
        }
    }

    /// Counts one more consecutive failure. True when it deserves a log line.
    pub fn failed(&mut self) -> bool {
        self.failures = self.failures.saturating_add(1);
        worth_logging(u64::from(self.failures))
    }

    /// Whether the last failure deserves a log line (see [`Backoff::failed`]).
    pub fn worth_logging(&self) -> bool {
        self.failures > 0 && worth_logging(u64::from(self.failures))
    }

    /// Ends a run of failures; returns how many there were (to log a recovery).
    pub fn succeeded(&mut self) -> u32 {
        std::mem::take(&mut self.failures)
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Whether the last try failed.
    pub fn failing(&self) -> bool {
        self.failures > 0
    }

    /// The pause before the next try: `first * 2^(failures - 1)`, at most `max`,
    /// less up to a fifth of it at random. Zero before any failure.
    pub fn delay(&self) -> Duration {
        if self.failures == 0 {
            return Duration::ZERO;
        }
        let doubled = self
            .first
            .saturating_mul(1u32 << (self.failures - 1).min(20))
            .min(self.max);
        let jitter = doubled.mul_f64(f64::from(jitter_permille()) / 5000.0);
        doubled.saturating_sub(jitter)
    }

    /// Sleeps for [`Backoff::delay`], unless `stop` completes first; false then.
    pub async fn pause(&self, stop: impl Future<Output = ()>) -> bool {
        let delay = self.delay();
        if delay.is_zero() {
            return true;
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => true,
            () = stop => false,
        }
    }
}

/// Whether the `count`th occurrence of something repeated (a failure, a dropped
/// message) deserves a log line: the first, then at powers of two.
pub fn worth_logging(count: u64) -> bool {
    count == 1 || count.is_power_of_two()
}

/// 0..=999, different from call to call (not for anything but spreading retries).
fn jitter_permille() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    (hasher.finish() % 1000) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pause_doubles_up_to_its_cap_and_resets_on_success() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        assert_eq!(backoff.delay(), Duration::ZERO);
        let mut logged = Vec::new();
        let mut delays = Vec::new();
        for _ in 0..10 {
            logged.push(backoff.failed());
            delays.push(backoff.delay());
        }
        assert_eq!(
            logged,
            [
                true, true, false, true, false, false, false, true, false, false
            ]
        );
        // Each within its fifth of jitter below 100 ms * 2^(n-1), capped at 5 s.
        for (n, delay) in delays.iter().enumerate() {
            let full = Duration::from_millis(100 * (1 << n)).min(Duration::from_secs(5));
            assert!(
                *delay <= full && *delay >= full.mul_f64(0.8),
                "{n}: {delay:?}"
            );
        }
        assert_eq!(backoff.succeeded(), 10);
        assert!(!backoff.failing());
        assert_eq!(backoff.delay(), Duration::ZERO);
        // Far past the shift width: still the cap, no overflow.
        for _ in 0..100 {
            backoff.failed();
        }
        assert!(backoff.delay() <= Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_pause_ends_early_when_stopped() {
        let mut backoff = Backoff::new(Duration::from_secs(3600), Duration::from_secs(3600));
        backoff.failed();
        assert!(!backoff.pause(std::future::ready(())).await);
    }
}
