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
