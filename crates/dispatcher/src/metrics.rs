use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TriggerLabels {
    pub trigger: String,
    pub function: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeadLetterLabels {
    pub trigger: String,
    pub function: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FunctionLabels {
    pub function: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TriggerOnlyLabels {
    pub trigger: String,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 18))
}

/// The dispatcher's metrics, registered under their Prometheus names.
#[derive(Clone)]
pub struct DispatcherMetrics {
    pub events_dispatched: Family<TriggerLabels, Counter>,
    pub dispatch_succeeded: Family<TriggerLabels, Counter>,
    pub dispatch_retried: Family<TriggerLabels, Counter>,
    pub dispatch_rejected: Family<TriggerLabels, Counter>,
    pub events_dead_lettered: Family<DeadLetterLabels, Counter>,
    pub events_filtered: Family<TriggerLabels, Counter>,
    pub events_in_flight: Family<TriggerLabels, Gauge>,
    pub consumer_lag: Family<TriggerOnlyLabels, Gauge>,
    pub replies_deduplicated: Family<TriggerOnlyLabels, Counter>,
    pub function_concurrency_limit: Family<FunctionLabels, Gauge>,
    pub invocation_duration_seconds: Family<TriggerLabels, Histogram>,
}

impl Default for DispatcherMetrics {
    fn default() -> Self {
        DispatcherMetrics {
            events_dispatched: Family::default(),
            dispatch_succeeded: Family::default(),
            dispatch_retried: Family::default(),
            dispatch_rejected: Family::default(),
            events_dead_lettered: Family::default(),
            events_filtered: Family::default(),
            events_in_flight: Family::default(),
            consumer_lag: Family::default(),
            replies_deduplicated: Family::default(),
            function_concurrency_limit: Family::default(),
            invocation_duration_seconds: Family::new_with_constructor(latency_histogram),
        }
    }
}

impl DispatcherMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "events_dispatched",
            "invocations started",
            self.events_dispatched.clone(),
        );
        registry.register(
            "dispatch_succeeded",
            "invocations the function accepted",
            self.dispatch_succeeded.clone(),
        );
        registry.register(
            "dispatch_retried",
            "failed invocations scheduled for retry",
            self.dispatch_retried.clone(),
        );
        registry.register(
            "dispatch_rejected",
            "invocations the function rejected permanently",
            self.dispatch_rejected.clone(),
        );
        registry.register(
            "events_dead_lettered",
            "events moved to the dead-letter stream",
            self.events_dead_lettered.clone(),
        );
        registry.register(
            "events_filtered",
            "events a trigger's filter did not match",
            self.events_filtered.clone(),
        );
        registry.register(
            "events_in_flight",
            "invocations running now",
            self.events_in_flight.clone(),
        );
        registry.register(
            "consumer_lag",
            "events waiting in a trigger's consumer",
            self.consumer_lag.clone(),
        );
        registry.register(
            "replies_deduplicated",
            "function replies not stored because an event with their source and id was already stored",
            self.replies_deduplicated.clone(),
        );
        registry.register(
            "function_concurrency_limit",
            "current adaptive concurrency limit of a function",
            self.function_concurrency_limit.clone(),
        );
        registry.register(
            "invocation_duration_seconds",
            "time from invocation start to the function's answer",
            self.invocation_duration_seconds.clone(),
        );
    }
}
