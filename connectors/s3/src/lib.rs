//! The object-store connector: S3 (and S3-compatible stores such as MinIO) object
//! events as CloudEvents, one per object change.
//!
//! - [`notification`]: bucket notification bodies (AWS's format and MinIO's), as the
//!   HTTP, NATS and Kafka sources receive them (`format = "s3"`); [`sns`] unwraps and
//!   verifies them when they come through an SNS HTTP subscription.
//! - `poll` (feature `store`): lists buckets at an interval, with its listing state
//!   checkpointed in NATS KV, for stores and setups without notifications.
//! - `enrich` (feature `store`): presigned URLs, metadata, tags and small contents
//!   added to object events before a trigger's function sees them.
//!
//! Both paths build events with [`object::ObjectNotice`], so one object is one event.

#[cfg(feature = "store")]
pub mod enrich;
pub mod notification;
pub mod object;
#[cfg(feature = "store")]
pub mod poll;
pub mod sns;
pub mod store;

pub use notification::{
    KeyEncoding, NotificationError, decode_key, object_events, object_events_with,
};
pub use object::{ObjectNotice, bare_etag, object_source};

/// How a source reads the messages it receives (the HTTP connector's hooks, the NATS
/// and Kafka sources): `format = "s3"` takes each message as an S3 event
/// notification and makes one event per record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageFormat {
    /// A CloudEvent when the message is one (binary or structured), else the message
    /// as the data of an event with the source's type.
    #[default]
    Cloudevents,
    /// An S3 (or MinIO) event notification: one event per record.
    S3,
}
