//! The last invocations of a managed function in this process, for the admin
//! listener's `/v1/functions/{name}/invocations` and the web console: when, how long,
//! how it ended, and its trace. Bounded ([`KEPT`] per function); what the handler
//! printed is in the logs stream, found by the request id.

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::Serialize;
use switchyard_event::telemetry::SpanContext;

/// Invocations kept per function.
pub const KEPT: usize = 100;

/// One finished invocation.
#[derive(Debug, Clone, Serialize)]
pub struct Invocation {
    pub request_id: String,
    /// The instance that ran it.
    pub instance: String,
    /// When it started (RFC 3339, UTC).
    pub started: String,
    pub duration_ms: f64,
    /// The instance's init, when this invocation waited for it (a cold start).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_duration_ms: Option<f64>,
    /// `success`, `error` (the handler reported one) or `failed` (timeout, exit,
    /// out of memory, the function could not start).
    pub status: &'static str,
    /// Lambda's error type (`Sandbox.Timedout`, `Runtime.ExitError`, the handler's
    /// own) unless it succeeded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_type: Option<String>,
    /// The W3C trace id of the invocation's span, when it was sampled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

impl Invocation {
    /// The trace id to show for an invocation traced under `trace`: only a sampled
    /// one was exported.
    pub fn sampled_trace_id(trace: Option<&SpanContext>) -> Option<String> {
        trace
            .filter(|context| context.is_sampled())
            .map(|context| format!("{:032x}", context.trace_id()))
    }
}

/// Durations of the invocations kept, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Durations {
    pub p50: f64,
    pub p95: f64,
    pub max: f64,
}

/// Counts since this process started and the last [`KEPT`] invocations.
#[derive(Default)]
pub(crate) struct Recent(Mutex<Kept>);

#[derive(Default)]
struct Kept {
    invocations: u64,
    errors: u64,
    last: VecDeque<Invocation>,
}

impl Recent {
    pub(crate) fn record(&self, invocation: Invocation) {
        let mut kept = self.0.lock().expect("recent lock");
        kept.invocations += 1;
        if invocation.status != "success" {
            kept.errors += 1;
        }
        if kept.last.len() == KEPT {
            kept.last.pop_front();
        }
        kept.last.push_back(invocation);
    }

    /// The invocations kept, newest first.
    pub(crate) fn newest_first(&self) -> Vec<Invocation> {
        let kept = self.0.lock().expect("recent lock");
        kept.last.iter().rev().cloned().collect()
    }

    /// Invocations and errors since start, and the durations of those kept.
    pub(crate) fn summary(&self) -> (u64, u64, Option<Durations>) {
        let kept = self.0.lock().expect("recent lock");
        let mut durations: Vec<f64> = kept.last.iter().map(|i| i.duration_ms).collect();
        (kept.invocations, kept.errors, durations_of(&mut durations))
    }
}

/// Nearest-rank percentiles of `durations`; none when empty.
fn durations_of(durations: &mut [f64]) -> Option<Durations> {
    if durations.is_empty() {
        return None;
    }
    durations.sort_by(f64::total_cmp);
    let rank = |p: f64| {
        let index = ((p * durations.len() as f64).ceil() as usize).clamp(1, durations.len());
        durations[index - 1]
    };
    Some(Durations {
        p50: rank(0.50),
        p95: rank(0.95),
        max: durations[durations.len() - 1],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invocation(n: usize, status: &'static str) -> Invocation {
        Invocation {
            request_id: format!("r-{n}"),
            instance: "f-1".to_owned(),
            started: "2026-12-06T00:00:00Z".to_owned(),
            duration_ms: n as f64,
            init_duration_ms: None,
            status,
            error_type: None,
            trace_id: None,
        }
    }

    #[test]
    fn keeps_the_last_ones_newest_first_and_counts_all() {
        let recent = Recent::default();
        for n in 1..=KEPT + 5 {
            recent.record(invocation(n, if n % 10 == 0 { "error" } else { "success" }));
        }
        let kept = recent.newest_first();
        assert_eq!(kept.len(), KEPT);
        assert_eq!(kept[0].request_id, format!("r-{}", KEPT + 5));
        assert_eq!(kept[KEPT - 1].request_id, "r-6");
        let (invocations, errors, durations) = recent.summary();
        assert_eq!((invocations, errors), (KEPT as u64 + 5, 10));
        // Durations 6..=105 ms.
        assert_eq!(
            durations,
            Some(Durations {
                p50: 55.0,
                p95: 100.0,
                max: 105.0
            })
        );
    }

    #[test]
    fn no_durations_before_the_first_invocation() {
        assert_eq!(Recent::default().summary(), (0, 0, None));
    }
}
