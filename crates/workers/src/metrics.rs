//! The workers' Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FunctionLabels {
    pub function: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InstanceStateLabels {
    pub function: String,
    /// `starting`, `idle` or `busy`.
    pub state: String,
}

fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

#[derive(Clone)]
pub struct WorkerMetrics {
    pub function_instances: Family<InstanceStateLabels, Gauge>,
    pub function_cold_starts: Family<FunctionLabels, Counter>,
    pub function_init_failures: Family<FunctionLabels, Counter>,
    pub function_init_duration_seconds: Family<FunctionLabels, Histogram>,
    pub function_invocation_duration_seconds: Family<FunctionLabels, Histogram>,
    pub function_timeouts: Family<FunctionLabels, Counter>,
    pub function_crashes: Family<FunctionLabels, Counter>,
    pub function_oom_kills: Family<FunctionLabels, Counter>,
    /// Function log lines handed to the logs stream, and left out of it.
    pub function_log_lines: Family<FunctionLabels, Counter>,
    pub function_log_lines_dropped: Family<FunctionLabels, Counter>,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        WorkerMetrics {
            function_instances: Family::default(),
            function_cold_starts: Family::default(),
            function_init_failures: Family::default(),
            function_init_duration_seconds: Family::new_with_constructor(duration_histogram),
            function_invocation_duration_seconds: Family::new_with_constructor(duration_histogram),
            function_timeouts: Family::default(),
            function_crashes: Family::default(),
            function_oom_kills: Family::default(),
            function_log_lines: Family::default(),
            function_log_lines_dropped: Family::default(),
        }
    }
}

impl WorkerMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "function_instances",
            "instances of a managed function by state (starting, idle, busy)",
            self.function_instances.clone(),
        );
        registry.register(
            "function_cold_starts",
            "instances of a managed function started",
            self.function_cold_starts.clone(),
        );
        registry.register(
            "function_init_failures",
            "instances of a managed function that failed to start",
            self.function_init_failures.clone(),
        );
        registry.register(
            "function_init_duration_seconds",
            "time from starting an instance to its being ready",
            self.function_init_duration_seconds.clone(),
        );
        registry.register(
            "function_invocation_duration_seconds",
            "time from handing an invocation to an instance to its answer",
            self.function_invocation_duration_seconds.clone(),
        );
        registry.register(
            "function_timeouts",
            "invocations that ran past their deadline (the instance was killed)",
            self.function_timeouts.clone(),
        );
        registry.register(
            "function_crashes",
            "instances that exited during an invocation",
            self.function_crashes.clone(),
        );
        registry.register(
            "function_oom_kills",
            "instances killed for using more than their memory",
            self.function_oom_kills.clone(),
        );
        registry.register(
            "function_log_lines",
            "function log lines published to the logs stream",
            self.function_log_lines.clone(),
        );
        registry.register(
            "function_log_lines_dropped",
            "function log lines left out of the logs stream (printed faster than stored, or nats away); they are still in switchyard's own log",
            self.function_log_lines_dropped.clone(),
        );
    }
}
