//! The event model every Switchyard component shares.
//!
//! An [`Event`] is a CloudEvents 1.0 envelope: validated context attributes plus the
//! data as opaque bytes. The data is never parsed or re-serialized between ingest and
//! the function; only the attributes travel as headers (binary content mode) on NATS
//! and on HTTP. This crate also owns the traits a connector (an [`EventSink`] user)
//! and the dispatcher's function targets ([`Target`]) see, so neither depends on the bus implementation.

pub mod backoff;
mod binary;
mod event;
mod json;
mod sink;
mod source;
mod target;
pub mod telemetry;
pub mod timestamp;

pub use binary::{BinaryHeaders, decode_header_value, encode_header_value};
pub use event::{CORE_ATTRIBUTES, Event, EventError, SPEC_VERSION, is_valid_extension_name};
pub use json::{
    StructuredError, is_json_content_type, parse_batch, parse_structured, to_structured_json,
};
pub use sink::{DedupHorizon, Destination, EventSink, PropertyValue, PublishError, PublishReceipt};
pub use source::{Source, SourceHealth};

/// What the CloudEvents source of every schedule's firings starts with
/// (`/schedules/<name>`): with `payload = "aws"` such an event is EventBridge's
/// "Scheduled Event".
pub const SCHEDULE_SOURCE_PREFIX: &str = "/schedules/";
pub use target::{BatchOutcome, Enricher, Failure, FunctionAnswer, Outcome, Reservation, Target};

/// Event sources that belong to a door of their own (a webhook, a connector, a
/// polled bucket, a schedule). `POST /v1/events` refuses events that claim one, and
/// the queue sources dead-letter them (`reserved_source`), so nobody can forge an
/// event of an authenticated webhook or a schedule's firing, nor spend its id first
/// to make the real one a "duplicate".
#[derive(Debug, Clone, Default)]
pub struct ReservedSources {
    exact: std::collections::HashMap<String, String>,
    prefixes: Vec<(String, String)>,
}

impl ReservedSources {
    /// `source` belongs to `owner` (said in refusals, e.g. "webhook `github`").
    pub fn reserve(&mut self, source: impl Into<String>, owner: impl Into<String>) {
        self.exact
            .entry(source.into())
            .or_insert_with(|| owner.into());
    }

    /// Every source starting with `prefix` belongs to `owner`.
    pub fn reserve_prefix(&mut self, prefix: impl Into<String>, owner: impl Into<String>) {
        self.prefixes.push((prefix.into(), owner.into()));
    }

    /// Who `source` belongs to when it is reserved, but not to `owner` (several
    /// owners may share a prefix: every SQS source reserves its partition's ARNs).
    pub fn other_owner(&self, source: &str, owner: &str) -> Option<&str> {
        let mut owners = self
            .exact
            .get(source)
            .map(String::as_str)
            .into_iter()
            .chain(
                self.prefixes
                    .iter()
                    .filter(|(prefix, _)| source.starts_with(prefix.as_str()))
                    .map(|(_, owner)| owner.as_str()),
            )
            .peekable();
        let first = *owners.peek()?;
        if owners.any(|candidate| candidate == owner) {
            None
        } else {
            Some(first)
        }
    }

    /// Who `source` belongs to, if it is reserved.
    pub fn owner(&self, source: &str) -> Option<&str> {
        if let Some(owner) = self.exact.get(source) {
            return Some(owner);
        }
        self.prefixes
            .iter()
            .find(|(prefix, _)| source.starts_with(prefix.as_str()))
            .map(|(_, owner)| owner.as_str())
    }
}

#[cfg(test)]
mod reserved_tests {
    use super::ReservedSources;

    #[test]
    fn another_doors_source_is_named_and_a_shared_prefix_is_everyones() {
        let mut reserved = ReservedSources::default();
        reserved.reserve("/schedules/nightly", "schedule `nightly`");
        reserved.reserve_prefix("arn:aws:sqs:", "sqs source `a`");
        reserved.reserve_prefix("arn:aws:sqs:", "sqs source `b`");
        assert_eq!(
            reserved.other_owner("/schedules/nightly", "mqtt source `m`"),
            Some("schedule `nightly`")
        );
        assert_eq!(
            reserved.other_owner("/schedules/nightly", "schedule `nightly`"),
            None
        );
        assert_eq!(
            reserved.other_owner("arn:aws:sqs:eu-west-1:1:q", "sqs source `b`"),
            None
        );
        assert_eq!(
            reserved.other_owner("arn:aws:sqs:eu-west-1:1:q", "mqtt source `m`"),
            Some("sqs source `a`")
        );
        assert_eq!(reserved.other_owner("/anything", "mqtt source `m`"), None);
    }
}
