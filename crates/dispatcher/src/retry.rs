//! Retry policies: how long to wait before the next attempt, and when to give up.
//! The wait itself is held by JetStream (a NAK with delay), so a pending retry
//! survives a dispatcher restart.

use std::time::Duration;

use rand::Rng;
use serde::Deserialize;

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackoffKind {
    /// No retries: the first failure dead-letters.
    None,
    /// The same delay before every retry.
    Fixed,
    /// `initial`, doubling each attempt, capped at `max`.
    #[default]
    Exponential,
}

/// A trigger's retry policy.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    #[serde(default)]
    pub policy: BackoffKind,
    /// Delay before the first retry.
    #[serde(default = "default_initial", with = "humantime_serde")]
    pub initial: Duration,
    /// Longest delay between attempts.
    #[serde(default = "default_max", with = "humantime_serde")]
    pub max: Duration,
    /// Attempts in all, the first included.
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// An event older than this (since the bus stored it) is dead-lettered instead of
    /// attempted again.
    #[serde(default, with = "humantime_serde")]
    pub max_age: Option<Duration>,
    /// Randomize each delay between half and all of its value, so retries of many
    /// events do not arrive together.
    #[serde(default = "default_jitter")]
    pub jitter: bool,
    /// Deliveries that may end with no outcome at all (the process handling the
    /// event died or hung until `ack_wait`) before the event is dead-lettered as
    /// `unprocessable`, so a poison event that takes down whoever handles it is not
    /// redelivered forever. Such deliveries are not counted as attempts.
    #[serde(default = "default_max_unfinished")]
    pub max_unfinished: u32,
}

fn default_initial() -> Duration {
    Duration::from_secs(1)
}
fn default_max() -> Duration {
    Duration::from_secs(60)
}
fn default_attempts() -> u32 {
    5
}
fn default_jitter() -> bool {
    true
}
fn default_max_unfinished() -> u32 {
    5
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            policy: BackoffKind::default(),
            initial: default_initial(),
            max: default_max(),
            attempts: default_attempts(),
            max_age: None,
            jitter: default_jitter(),
            max_unfinished: default_max_unfinished(),
        }
    }
}

impl RetryPolicy {
    /// Attempts allowed in all.
    pub fn max_attempts(&self) -> u64 {
        match self.policy {
            BackoffKind::None => 1,
            _ => u64::from(self.attempts.max(1)),
        }
    }

    /// The delay after failed attempt number `attempt` (1-based), before jitter.
    pub fn base_delay(&self, attempt: u64) -> Duration {
        match self.policy {
            BackoffKind::None => Duration::ZERO,
            BackoffKind::Fixed => self.initial.min(self.max),
            BackoffKind::Exponential => {
                let doublings = attempt.saturating_sub(1).min(32) as u32;
                self.initial
                    .checked_mul(1u32 << doublings.min(31))
                    .unwrap_or(self.max)
                    .min(self.max)
            }
        }
    }

    /// The delay after failed attempt number `attempt`, with jitter when enabled.
    pub fn delay(&self, attempt: u64) -> Duration {
        let base = self.base_delay(attempt);
        if !self.jitter || base.is_zero() {
            return base;
        }
        let half = base / 2;
        half + rand::rng().random_range(Duration::ZERO..=half)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponential_doubles_up_to_max() {
        let policy = RetryPolicy {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(10),
            jitter: false,
            ..RetryPolicy::default()
        };
        let delays: Vec<_> = (1..=6)
            .map(|attempt| policy.delay(attempt).as_secs())
            .collect();
        assert_eq!(delays, [1, 2, 4, 8, 10, 10]);
        assert_eq!(policy.base_delay(u64::MAX), Duration::from_secs(10));
    }

    #[test]
    fn jitter_stays_between_half_and_all() {
        let policy = RetryPolicy::default();
        for attempt in 1..8 {
            let base = policy.base_delay(attempt);
            let delay = policy.delay(attempt);
            assert!(delay >= base / 2 && delay <= base, "{delay:?} vs {base:?}");
        }
    }

    #[test]
    fn none_means_one_attempt() {
        let policy = RetryPolicy {
            policy: BackoffKind::None,
            ..RetryPolicy::default()
        };
        assert_eq!(policy.max_attempts(), 1);
    }
}
