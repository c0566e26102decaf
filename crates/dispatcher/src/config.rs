//! Trigger and dispatcher settings, as written in the configuration file: what a
//! trigger takes (filter), where it delivers (function, destinations), how (limits,
//! retries, ordering, batches) and where it starts. Read by the binary's config loader;
//! the dispatcher builds its consumers and permits from them.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use switchyard_event::{Destination, Enricher, Target};

use crate::batch::BatchSettings;
use crate::filter::Filter;
use crate::retry::RetryPolicy;

/// Process-wide dispatcher settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DispatcherConfig {
    /// Invocations in flight at once in this process, over every trigger.
    #[serde(default = "default_global_concurrency")]
    pub max_concurrency: usize,
    /// On SIGTERM/SIGINT, how long in-flight invocations may run before they are
    /// abandoned and their events handed back to JetStream.
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        DispatcherConfig {
            max_concurrency: default_global_concurrency(),
            shutdown_grace: default_shutdown_grace(),
        }
    }
}

fn default_global_concurrency() -> usize {
    1024
}
fn default_shutdown_grace() -> Duration {
    Duration::from_secs(30)
}

/// Where a new trigger starts reading the events stream.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum StartPosition {
    /// Events stored after the trigger was first created.
    #[default]
    New,
    /// Every event the stream still holds.
    All,
}

/// A trigger: events matching `filter` go to `function`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerConfig {
    /// Unique name (letters, digits, `-`, `_`); names the durable consumer.
    pub name: String,
    /// The function events are delivered to.
    pub function: String,
    /// Which events this trigger takes; all of them when absent.
    #[serde(default)]
    pub filter: Filter,
    /// Invocations in flight at once for this trigger, across every dispatcher
    /// process.
    #[serde(default = "default_trigger_concurrency")]
    pub max_concurrency: usize,
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Per-invocation timeout; the function's timeout when absent.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// How long JetStream waits for an outcome before redelivering (a crashed
    /// dispatcher's events come back after this). Long invocations send progress
    /// every third of it.
    #[serde(default = "default_ack_wait", with = "humantime_serde")]
    pub ack_wait: Duration,
    /// Publish a CloudEvent the function answers with back onto the bus.
    #[serde(default)]
    pub publish_replies: bool,
    #[serde(default)]
    pub start: StartPosition,
    /// `key`: events sharing a `partitionkey` are delivered one at a time, in order.
    #[serde(default)]
    pub ordering: OrderingMode,
    /// With `ordering = "key"`: how many parts the key space is split into, each
    /// delivered by one dispatcher process at a time (1 to 64).
    #[serde(default = "default_partitions")]
    pub partitions: u32,
    /// Deliver events in batches, one invocation per batch.
    #[serde(default)]
    pub batch: Option<BatchSettings>,
    /// Where the function's results are also published.
    #[serde(default)]
    pub on_success: Option<DestinationConfig>,
    /// Where dead letters are also published (beside the dead-letter stream).
    #[serde(default)]
    pub on_failure: Option<DestinationConfig>,
    /// Object events (from the S3 connector) get what is asked here from the object
    /// store just before the function sees them.
    #[serde(default)]
    pub enrich: Option<EnrichConfig>,
    /// What a `lambda` function receives: the structured CloudEvent, or the event as
    /// AWS would have sent it (`aws`).
    #[serde(default)]
    pub payload: PayloadFormat,
}

/// The shape of what a trigger hands its function.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum PayloadFormat {
    /// The CloudEvent (structured JSON for `lambda` functions, binary mode over HTTP).
    #[default]
    CloudEvent,
    /// For `lambda` functions: the event as AWS would send it (an S3 notification's
    /// `Records`, a self-managed Kafka event, an API Gateway HTTP API request, an
    /// Invoke API payload as given), the structured CloudEvent for anything else.
    Aws,
}

/// The most `content_max_bytes` may be: 4 MiB, whose base64 (5.6 MB) still fits the
/// 6 MB payload of a synchronous Lambda invocation; every delivery in flight may hold
/// that much.
pub const CONTENT_MAX_BYTES_LIMIT: u64 = 4 * 1024 * 1024;

/// What a trigger adds to object events before its function sees them; see the S3
/// connector's `enrich` module. Nothing is stored: a retry enriches afresh (a new
/// presigned URL, the object's current metadata).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EnrichConfig {
    /// The `[stores.<name>]` the objects are in.
    pub store: String,
    /// Only objects in these buckets are enriched (`["*"]`: any; required): the
    /// bucket and key come from the event, so this bounds what an event's sender can
    /// make Switchyard read with the store's credentials.
    #[serde(default)]
    pub buckets: Vec<String>,
    /// A presigned GET URL valid this long, in the `s3url` extension.
    #[serde(default, with = "humantime_serde")]
    pub presign: Option<Duration>,
    /// The object's content type, user metadata and last-modified time (HeadObject),
    /// in the data's `object` member.
    #[serde(default)]
    pub metadata: bool,
    /// The object's tags, in the data's `object.tags`.
    #[serde(default)]
    pub tags: bool,
    /// Objects up to this many bytes (at most [`CONTENT_MAX_BYTES_LIMIT`]) are read
    /// and put inline, base64, in the data's `object.content`.
    #[serde(default)]
    pub content_max_bytes: Option<u64>,
}

/// A NATS subject or a Kafka topic that results or dead letters are published to.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum DestinationConfig {
    Nats {
        subject: String,
    },
    Kafka {
        brokers: String,
        topic: String,
        /// librdkafka producer properties passed through.
        #[serde(default)]
        properties: std::collections::BTreeMap<String, switchyard_event::PropertyValue>,
    },
}

/// What a trigger is attached to besides its function, built by the caller: its
/// destinations (from its [`DestinationConfig`]s) and its enricher (from `enrich`).
#[derive(Clone, Default)]
pub struct Destinations {
    pub on_success: Option<Arc<dyn Destination>>,
    pub on_failure: Option<Arc<dyn Destination>>,
    /// Adds to each event before the function sees it (`enrich`).
    pub enricher: Option<Arc<dyn Enricher>>,
    /// The function as this trigger calls it, when not as the function's own target
    /// (a `lambda` function given AWS-shaped payloads, `payload = "aws"`). It shares
    /// the function's instances and budget.
    pub target: Option<Arc<dyn Target>>,
}

/// Whether a trigger keeps events in order.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum OrderingMode {
    /// Events are delivered in parallel, retries wait aside.
    #[default]
    None,
    /// Per `partitionkey`: one at a time, in arrival order; retries hold the key.
    Key,
}

fn default_partitions() -> u32 {
    8
}

fn default_trigger_concurrency() -> usize {
    16
}
fn default_ack_wait() -> Duration {
    Duration::from_secs(30)
}
