//! The object-store connector (issue 4, in progress): S3 and MinIO event
//! notifications become CloudEvents. Polling and the HTTP/NATS/Kafka intake come next.

pub mod notification;

pub use notification::{NotificationError, object_events};
