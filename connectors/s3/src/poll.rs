//! Polling: for stores and setups without notifications, a source lists its buckets
//! (ListObjectsV2) at an interval and turns new and changed objects (by ETag) into
//! events, and, when asked, deleted ones too.
//!
//! State lives in NATS KV (bucket `<events stream>_S3_POLL`), so a restart neither
//! re-emits the whole bucket nor misses what was created while Switchyard was down:
//!
//! - `listing = "full"` (default): each scan walks the whole listing in key order next
//!   to the previous scan's manifest (the sorted (key, ETag, size) of every object,
//!   stored in chunks of at most [`CHUNK_BYTES`]) and writes the new manifest as it
//!   goes. Memory holds one listing page and one chunk of each manifest, whatever
//!   the bucket's size. After every page the events are persisted first, then the
//!   page's chunk and a cursor: a scan interrupted by a crash or an outage resumes
//!   after its last page, and what it re-emits (at most that page) has the same ids,
//!   so the duplicate window drops it. Finds new, changed and deleted objects; costs
//!   one full listing per interval.
//! - `listing = "start_after"`: for append-mostly prefixes (keys that grow, such as
//!   timestamps): each scan lists only keys after the last one seen (`StartAfter`) and
//!   every listed object is new. Costs only the new objects; never sees changes,
//!   deletions, or new keys that sort before the cursor.
//!
//! One process polls a bucket at a time: the scanner holds a lease in the same KV
//! bucket, renewed as it goes; another process takes over when it lapses.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use aws_sdk_s3::primitives::DateTimeFormat;
use futures::StreamExt;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use switchyard_bus::Bus;
use switchyard_bus::async_nats::jetstream::kv;
use switchyard_event::backoff::Backoff;
use switchyard_event::{Event, PublishError, Source, SourceHealth};
use tokio_util::sync::CancellationToken;

use crate::notification::decode_key;
use crate::object::{ObjectNotice, bare_etag};
use crate::store::StoreConfig;

/// A manifest chunk holds at most this many bytes of keys and ETags (KV values must
/// fit the server's max payload, 1 MiB by default).
pub const CHUNK_BYTES: usize = 256 * 1024;

/// A poll source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3PollSourceConfig {
    /// Name of the source, used in logs, metrics and the state's keys.
    pub name: String,
    /// The `[stores.<name>]` to list.
    pub store: String,
    /// Buckets to list.
    pub buckets: Vec<String>,
    /// Only keys that start with this.
    #[serde(default)]
    pub prefix: Option<String>,
    /// Only keys that end with this (`.jpg`).
    #[serde(default)]
    pub suffix: Option<String>,
    /// Pause between the end of a scan and the next.
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// `full` or `start_after`; see the module documentation.
    #[serde(default)]
    pub listing: Listing,
    /// With `full`: an object gone since the last scan is an `ObjectRemoved:Delete`
    /// event.
    #[serde(default)]
    pub deletions: bool,
    /// Keys per listing request (1..=1000).
    #[serde(default = "default_page_size")]
    pub page_size: i32,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Listing {
    #[default]
    Full,
    StartAfter,
}

fn default_interval() -> Duration {
    Duration::from_secs(60)
}

fn default_page_size() -> i32 {
    1000
}

impl S3PollSourceConfig {
    /// Mistakes `validate` reports, as (field, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        if self.buckets.is_empty() {
            problems.push(("buckets", "list at least one bucket".to_owned()));
        }
        for bucket in &self.buckets {
            let valid = (3..=63).contains(&bucket.len())
                && bucket.chars().all(|character| {
                    character.is_ascii_lowercase()
                        || character.is_ascii_digit()
                        || character == '-'
                        || character == '.'
                });
            if !valid {
                problems.push(("buckets", format!("`{bucket}` is not a bucket name (3-63 lowercase letters, digits, `-` and `.`)")));
            }
        }
        if !(1..=1000).contains(&self.page_size) {
            problems.push(("page_size", "must be between 1 and 1000".to_owned()));
        }
        if self.interval.is_zero() {
            problems.push(("interval", "must be more than zero".to_owned()));
        }
        if self.deletions && self.listing == Listing::StartAfter {
            problems.push((
                "deletions",
                "`listing = \"start_after\"` never sees deletions; use `listing = \"full\"`"
                    .to_owned(),
            ));
        }
        problems
    }
}

/// Labels of the poll counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PollLabels {
    pub source: String,
    pub bucket: String,
}

/// Metrics of every poll source in the process.
#[derive(Clone, Default)]
pub struct PollMetrics {
    pub objects_listed: Family<PollLabels, Counter>,
    pub events: Family<PollLabels, Counter>,
    pub scans: Family<PollLabels, Counter>,
    pub errors: Family<PollLabels, Counter>,
    /// The most object entries a scan held in memory at once (listing page plus
    /// manifest chunks).
    pub objects_held_max: Family<PollLabels, Gauge>,
}

impl PollMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "s3_poll_objects_listed",
            "objects a poll source listed",
            self.objects_listed.clone(),
        );
        registry.register(
            "s3_poll_events",
            "object events a poll source persisted (new, changed, deleted objects)",
            self.events.clone(),
        );
        registry.register(
            "s3_poll_scans",
            "complete scans of a bucket",
            self.scans.clone(),
        );
        registry.register(
            "s3_poll_errors",
            "failed listing, state or publish attempts (each is retried)",
            self.errors.clone(),
        );
        registry.register(
            "s3_poll_objects_held_max",
            "most object entries one scan held in memory at once",
            self.objects_held_max.clone(),
        );
    }
}

/// One manifest entry: key, ETag, size.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Entry(String, String, u64);

/// A bucket's scan state. It is written with compare-and-set on its revision, so a
/// process that lost the bucket to another (a stall past its lease) cannot overwrite
/// the other's progress; manifest chunks carry the id of the scan that wrote them, so
/// it cannot overwrite the other's chunks either.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Head {
    /// The last complete manifest: its id and number of chunks.
    #[serde(default)]
    manifest: String,
    #[serde(default)]
    chunks: u32,
    /// A scan under way: the manifest it is writing, chunks written, last key covered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scan: Option<Scan>,
    /// `start_after` listings: the last key seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    after: Option<String>,
    /// When the last scan completed (unix ms): the next is due an interval later,
    /// whichever process runs it.
    #[serde(default)]
    completed_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Scan {
    manifest: String,
    chunks: u32,
    cursor: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Lease {
    owner: String,
    until_ms: i64,
}

/// Why a scan stopped; the next attempt resumes from the checkpoint.
#[derive(Debug)]
enum ScanError {
    Store(String),
    State(String),
    Bus(String),
    /// Another process holds the bucket's lease (or wrote its state meanwhile).
    NotOwner,
    /// The next scan is due in this long (another process, or this one, scanned).
    NotDue(Duration),
    /// A chunk of the previous manifest is gone or unreadable.
    ManifestLost(String),
    Shutdown,
}

impl std::fmt::Display for ScanError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ScanError::Store(error) => write!(formatter, "object store: {error}"),
            ScanError::State(error) => write!(formatter, "poll state (NATS KV): {error}"),
            ScanError::Bus(error) => write!(formatter, "event bus: {error}"),
            ScanError::NotOwner => write!(formatter, "another process polls this bucket"),
            ScanError::NotDue(_) => write!(formatter, "not due yet"),
            ScanError::ManifestLost(error) => write!(formatter, "previous manifest lost: {error}"),
            ScanError::Shutdown => write!(formatter, "shutting down"),
        }
    }
}

/// The KV bucket that holds every poll source's state.
async fn state_bucket(bus: &Bus) -> Result<kv::Store, String> {
    bus.jetstream()
        .create_or_update_key_value(kv::Config {
            bucket: format!("{}_S3_POLL", bus.events_stream()),
            description: "switchyard s3 poll sources: manifests, cursors, leases".to_owned(),
            history: 1,
            num_replicas: bus.replicas(),
            ..Default::default()
        })
        .await
        .map_err(|error| error.to_string())
}

/// A poll source over its buckets, run and supervised by the binary.
pub struct PollSource {
    config: Arc<S3PollSourceConfig>,
    store: Arc<StoreConfig>,
    bus: Bus,
    metrics: PollMetrics,
}

impl PollSource {
    pub fn new(
        config: S3PollSourceConfig,
        store: StoreConfig,
        bus: Bus,
        metrics: PollMetrics,
    ) -> Self {
        PollSource {
            config: Arc::new(config),
            store: Arc::new(store),
            bus,
            metrics,
        }
    }
}

#[async_trait::async_trait]
impl Source for PollSource {
    fn name(&self) -> &str {
        &self.config.name
    }

    fn kind(&self) -> &'static str {
        "s3_poll"
    }

    /// Polls each bucket until `shutdown` (a failing scan is retried inside, from its
    /// checkpoint, and counted in `switchyard_s3_poll_errors_total`). Fails when a
    /// bucket's poller panicked; the others are stopped first.
    async fn run(
        &self,
        health: &dyn SourceHealth,
        shutdown: CancellationToken,
    ) -> Result<(), String> {
        health.up();
        run(
            self.config.clone(),
            self.store.clone(),
            self.bus.clone(),
            self.metrics.clone(),
            shutdown,
        )
        .await
    }
}

/// Runs a poll source until `shutdown`: one task per bucket.
async fn run(
    config: Arc<S3PollSourceConfig>,
    store: Arc<StoreConfig>,
    bus: Bus,
    metrics: PollMetrics,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let client = store.client().await;
    // Stops the other buckets' pollers when one fails.
    let shutdown = shutdown.child_token();
    let owner = uuid::Uuid::now_v7().simple().to_string();
    let mut tasks = tokio::task::JoinSet::new();
    for bucket in config.buckets.clone() {
        let poller = Poller {
            meters: Meters::new(&metrics, &config.name, &bucket),
            config: config.clone(),
            store: store.clone(),
            client: client.clone(),
            bus: bus.clone(),
            shutdown: shutdown.clone(),
            owner: owner.clone(),
            bucket,
        };
        tasks.spawn(poller.run());
    }
    let mut failed = None;
    while let Some(ended) = tasks.join_next().await {
        if let Err(error) = ended {
            shutdown.cancel();
            failed.get_or_insert_with(|| format!("a bucket's poller failed: {error}"));
        }
    }
    failed.map_or(Ok(()), Err)
}

fn now_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}

/// One bucket's metrics, looked up once.
struct Meters {
    listed: Counter,
    events: Counter,
    scans: Counter,
    errors: Counter,
    held_max: Gauge,
}

impl Meters {
    fn new(metrics: &PollMetrics, source: &str, bucket: &str) -> Meters {
        let labels = PollLabels {
            source: source.to_owned(),
            bucket: bucket.to_owned(),
        };
        Meters {
            listed: metrics.objects_listed.get_or_create(&labels).clone(),
            events: metrics.events.get_or_create(&labels).clone(),
            scans: metrics.scans.get_or_create(&labels).clone(),
            errors: metrics.errors.get_or_create(&labels).clone(),
            held_max: metrics.objects_held_max.get_or_create(&labels).clone(),
        }
    }
}

struct Poller {
    config: Arc<S3PollSourceConfig>,
    store: Arc<StoreConfig>,
    client: aws_sdk_s3::Client,
    bus: Bus,
    meters: Meters,
    shutdown: CancellationToken,
    owner: String,
    bucket: String,
}

impl Poller {
    fn key(&self, suffix: &str) -> String {
        format!("{}.{}.{suffix}", self.config.name, self.bucket)
    }

    fn chunk_key(&self, manifest: &str, chunk: u32) -> String {
        self.key(&format!("m{manifest}.c{chunk}"))
    }

    /// Whether `key` is one of this bucket's manifest chunks, and which: exactly
    /// `<source>.<bucket>.m<id>.c<n>` (another bucket's keys, `logs.gz` beside `logs`,
    /// never match).
    fn parse_chunk_key<'k>(&self, key: &'k str) -> Option<(&'k str, u32)> {
        parse_chunk_key(&self.key(""), key)
    }

    fn lease_time(&self) -> Duration {
        (self.config.interval * 2 + Duration::from_secs(10)).min(Duration::from_secs(600))
    }

    async fn run(self) {
        // 1 s doubling, at most 32 s and the interval.
        let mut failures = Backoff::new(
            Duration::from_secs(1),
            Duration::from_secs(32).min(self.config.interval.max(Duration::from_secs(1))),
        );
        let mut state: Option<kv::Store> = None;
        loop {
            let result = match &state {
                Some(store) => self.scan(store).await,
                None => match state_bucket(&self.bus).await {
                    Ok(store) => {
                        state = Some(store.clone());
                        self.scan(&store).await
                    }
                    Err(error) => Err(ScanError::State(error)),
                },
            };
            let pause = match result {
                Ok(()) => {
                    if failures.succeeded() > 0 {
                        tracing::info!(source = %self.config.name, bucket = %self.bucket, "polling works again");
                    }
                    self.config.interval
                }
                Err(ScanError::Shutdown) => break,
                Err(ScanError::NotDue(remaining)) => remaining,
                Err(ScanError::NotOwner) => {
                    // Try again when the holder's lease could have lapsed.
                    self.config.interval.min(self.lease_time() / 2)
                }
                Err(error) => {
                    let worth_logging = failures.failed();
                    self.meters.errors.inc();
                    let backoff = failures.delay();
                    if let ScanError::ManifestLost(_) = error {
                        tracing::error!(source = %self.config.name, bucket = %self.bucket, %error, "the previous scan's manifest is lost; the next scan starts from an empty one (every object is emitted again with its own id; the duplicate window drops what it still remembers)");
                    } else if worth_logging {
                        tracing::warn!(source = %self.config.name, bucket = %self.bucket, %error, failures = failures.failures(), retry_in = ?backoff, "poll failed; it resumes from its checkpoint");
                    }
                    backoff
                }
            };
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = self.shutdown.cancelled() => break,
            }
        }
        // Hand the bucket over now rather than when the lease lapses, so a restarted
        // or another process polls it at once.
        if let Some(state) = &state {
            self.release(state).await;
        }
    }

    async fn release(&self, state: &kv::Store) {
        let key = self.key("lease");
        if let Ok(Some(entry)) = state.entry(&key).await
            && let Ok(holder) = serde_json::from_slice::<Lease>(&entry.value)
            && holder.owner == self.owner
        {
            let _ = state.update(&key, Vec::new().into(), entry.revision).await;
        }
    }

    /// Takes or renews the bucket's lease.
    async fn lease(&self, state: &kv::Store) -> Result<(), ScanError> {
        let key = self.key("lease");
        let mine = serde_json::to_vec(&Lease {
            owner: self.owner.clone(),
            until_ms: now_ms() + i64::try_from(self.lease_time().as_millis()).unwrap_or(0),
        })
        .expect("a lease serializes");
        let entry = state
            .entry(&key)
            .await
            .map_err(|error| ScanError::State(error.to_string()))?;
        let written = match entry {
            Some(entry) => {
                let holder: Option<Lease> = serde_json::from_slice(&entry.value).ok();
                if let Some(holder) = holder
                    && holder.owner != self.owner
                    && holder.until_ms > now_ms()
                {
                    return Err(ScanError::NotOwner);
                }
                state
                    .update(&key, mine.into(), entry.revision)
                    .await
                    .is_ok()
            }
            None => state.create(&key, mine.into()).await.is_ok(),
        };
        if written {
            return Ok(());
        }
        // Lost a race for it, or KV failed: which one?
        state
            .entry(&key)
            .await
            .map_err(|error| ScanError::State(error.to_string()))?;
        Err(ScanError::NotOwner)
    }

    /// The head and its revision (`None`: never written).
    async fn read_head(&self, state: &kv::Store) -> Result<(Head, Option<u64>), ScanError> {
        match state
            .entry(self.key("head"))
            .await
            .map_err(|error| ScanError::State(error.to_string()))?
        {
            Some(entry) if !entry.value.is_empty() => serde_json::from_slice(&entry.value)
                .map(|head| (head, Some(entry.revision)))
                .map_err(|error| ScanError::State(format!("unreadable head: {error}"))),
            Some(entry) => Ok((Head::default(), Some(entry.revision))),
            None => Ok((Head::default(), None)),
        }
    }

    /// Writes the head if nobody else did since `revision`; returns the new revision.
    async fn write_head(
        &self,
        state: &kv::Store,
        head: &Head,
        revision: Option<u64>,
    ) -> Result<u64, ScanError> {
        let value: bytes::Bytes = serde_json::to_vec(head).expect("a head serializes").into();
        let key = self.key("head");
        let written = match revision {
            Some(revision) => state.update(&key, value, revision).await.ok(),
            None => state.create(&key, value).await.ok(),
        };
        match written {
            Some(revision) => Ok(revision),
            None => {
                // Someone else wrote it (a process that took the bucket over), or KV
                // failed: which one?
                let (_, now) = self.read_head(state).await?;
                if now != revision {
                    Err(ScanError::NotOwner)
                } else {
                    Err(ScanError::State("writing the head failed".to_owned()))
                }
            }
        }
    }

    fn check_shutdown(&self) -> Result<(), ScanError> {
        if self.shutdown.is_cancelled() {
            Err(ScanError::Shutdown)
        } else {
            Ok(())
        }
    }

    fn matches(&self, key: &str) -> bool {
        self.config
            .suffix
            .as_deref()
            .is_none_or(|suffix| key.ends_with(suffix))
    }

    fn note_held(&self, held: usize) {
        let held = i64::try_from(held).unwrap_or(i64::MAX);
        self.meters
            .held_max
            .inner()
            .fetch_max(held, Ordering::Relaxed);
    }

    /// The event of an object this scan noticed.
    fn object_event(
        &self,
        event_name: &str,
        entry: &Entry,
        time: Option<&str>,
    ) -> Result<Event, ScanError> {
        let notice = ObjectNotice {
            event_source: &self.store.event_source,
            region: self.store.event_region(),
            bucket: &self.bucket,
            key: &entry.0,
            event_name,
            time,
            size: Some(entry.2),
            etag: Some(&entry.1)
                .filter(|etag| !etag.is_empty())
                .map(String::as_str),
            version_id: None,
            sequencer: None,
        };
        notice
            .event(&notice.record_data())
            .map_err(|error| ScanError::Store(format!("object `{}`: {error}", entry.0)))
    }

    /// The event of an object gone since the last scan. Its id leaves the time out, so
    /// a resumed scan that notices it again has the same one.
    fn removed_event(&self, entry: &Entry, now: &str) -> Result<Event, ScanError> {
        let mut event = self.object_event("ObjectRemoved:Delete", entry, None)?;
        event.time = Some(now.to_owned());
        event.extensions.remove("s3size");
        Ok(event)
    }

    /// One listing page: the entries (filtered, in strictly increasing key order) and
    /// where the next page starts.
    async fn page(
        &self,
        start_after: Option<&str>,
        token: Option<&str>,
    ) -> Result<(Vec<(Entry, Option<String>)>, Option<String>, Option<String>), ScanError> {
        let mut request = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .max_keys(self.config.page_size)
            // Keys come back URL-encoded, so a key with characters XML 1.0 cannot carry
            // does not make the page unreadable (stores that ignore this answer
            // without `EncodingType` and plain keys).
            .encoding_type(aws_sdk_s3::types::EncodingType::Url);
        if let Some(prefix) = &self.config.prefix {
            request = request.prefix(prefix);
        }
        if let Some(token) = token {
            request = request.continuation_token(token);
        } else if let Some(after) = start_after {
            request = request.start_after(after);
        }
        let output = tokio::select! {
            output = request.send() => output.map_err(|error| {
                ScanError::Store(format!(
                    "listing `{}`: {}",
                    self.bucket,
                    aws_sdk_s3::error::DisplayErrorContext(&error)
                ))
            })?,
            () = self.shutdown.cancelled() => return Err(ScanError::Shutdown),
        };
        let mut last_key: Option<String> =
            start_after.filter(|_| token.is_none()).map(str::to_owned);
        let mut entries = Vec::new();
        let encoded = output.encoding_type() == Some(&aws_sdk_s3::types::EncodingType::Url);
        for object in output.contents() {
            let Some(key) = object.key() else { continue };
            // Decoded as the SDKs do (`+` is a space, then percent-decoding).
            let decoded = encoded.then(|| decode_key(key));
            let key = decoded.as_deref().unwrap_or(key);
            // The merge with the previous manifest needs S3's order (UTF-8 bytes).
            if last_key.as_deref().is_some_and(|last| key <= last) {
                return Err(ScanError::Store(format!(
                    "the store lists `{key}` after `{}`: not in key order, which polling needs",
                    last_key.unwrap_or_default()
                )));
            }
            last_key = Some(key.to_owned());
            self.meters.listed.inc();
            if !self.matches(key) {
                continue;
            }
            let etag = object.e_tag().map(bare_etag).unwrap_or_default().to_owned();
            let size = object
                .size()
                .and_then(|size| u64::try_from(size).ok())
                .unwrap_or(0);
            let time = object
                .last_modified()
                .and_then(|time| time.fmt(DateTimeFormat::DateTime).ok());
            entries.push((Entry(key.to_owned(), etag, size), time));
        }
        let next = if output.is_truncated() == Some(true) {
            output.next_continuation_token().map(str::to_owned)
        } else {
            None
        };
        if output.is_truncated() == Some(true) && next.is_none() {
            return Err(ScanError::Store(format!(
                "listing `{}` is truncated but has no continuation token",
                self.bucket
            )));
        }
        Ok((entries, next, last_key))
    }

    /// Persists events, retrying while the bus is unavailable. An event larger than
    /// the bus accepts is stored as a dead letter; the others go on.
    async fn persist(&self, mut events: Vec<Event>) -> Result<(), ScanError> {
        if events.is_empty() {
            return Ok(());
        }
        let _spans = switchyard_event::telemetry::start_ingests(
            &mut events,
            switchyard_event::telemetry::SpanKind::Consumer,
            &self.config.name,
        );
        let count = events.len() as u64;
        match self.publish_retrying(&events).await? {
            Ok(()) => {}
            Err(_) => {
                // One is too large: one by one, in order, to find it.
                for event in events {
                    if let Err(error) = self.publish_retrying(std::slice::from_ref(&event)).await? {
                        self.bus
                            .dead_letter_input(&self.config.name, event, "too_large", &error)
                            .await
                            .map_err(|failure| ScanError::Bus(failure.to_string()))?;
                    }
                }
            }
        }
        self.meters.events.inc_by(count);
        Ok(())
    }

    /// `Ok(Ok)` once stored, `Ok(Err(why))` when one is too large.
    async fn publish_retrying(&self, events: &[Event]) -> Result<Result<(), String>, ScanError> {
        // A few tries, then the scan fails and resumes later from its checkpoint.
        let mut failures = Backoff::new(Duration::from_millis(400), Duration::from_millis(3200));
        loop {
            match self.bus.publish_events(events).await {
                Ok(_) => return Ok(Ok(())),
                Err(PublishError::TooLarge(error)) => return Ok(Err(error)),
                Err(error) => {
                    failures.failed();
                    if failures.failures() >= 5 {
                        return Err(ScanError::Bus(error.to_string()));
                    }
                    if !failures.pause(self.shutdown.cancelled()).await {
                        return Err(ScanError::Shutdown);
                    }
                }
            }
        }
    }

    async fn scan(&self, state: &kv::Store) -> Result<(), ScanError> {
        self.lease(state).await?;
        let (head, revision) = self.read_head(state).await?;
        // Not before an interval after the last complete scan, whoever ran it (a
        // process that takes the bucket over between scans waits too).
        if head.scan.is_none() && head.completed_ms > 0 {
            let due = head.completed_ms
                + i64::try_from(self.config.interval.as_millis()).unwrap_or(i64::MAX);
            let now = now_ms();
            if now < due {
                return Err(ScanError::NotDue(Duration::from_millis(
                    u64::try_from(due - now).unwrap_or(0),
                )));
            }
        }
        match self.config.listing {
            Listing::Full => match self.full_scan(state, head.clone(), revision).await {
                Err(ScanError::ManifestLost(error)) => {
                    // Start over from an empty manifest, if the head is still the one
                    // that pointed at the lost chunks.
                    let fresh = Head {
                        completed_ms: head.completed_ms,
                        ..Head::default()
                    };
                    self.write_head(state, &fresh, revision).await?;
                    return Err(ScanError::ManifestLost(error));
                }
                other => other?,
            },
            Listing::StartAfter => self.scan_after(state, head, revision).await?,
        }
        self.meters.scans.inc();
        Ok(())
    }

    async fn scan_after(
        &self,
        state: &kv::Store,
        mut head: Head,
        mut revision: Option<u64>,
    ) -> Result<(), ScanError> {
        let mut token: Option<String> = None;
        loop {
            self.check_shutdown()?;
            let (entries, next, last_key) =
                self.page(head.after.as_deref(), token.as_deref()).await?;
            self.note_held(entries.len());
            let events = entries
                .iter()
                .map(|(entry, time)| {
                    self.object_event(created_name(&entry.1), entry, time.as_deref())
                })
                .collect::<Result<Vec<_>, _>>()?;
            self.persist(events).await?;
            if next.is_none() {
                head.completed_ms = now_ms();
            }
            if last_key.is_some() || next.is_none() {
                if let Some(last) = last_key {
                    head.after = Some(last);
                }
                self.lease(state).await?;
                revision = Some(self.write_head(state, &head, revision).await?);
            }
            match next {
                Some(next) => token = Some(next),
                None => return Ok(()),
            }
        }
    }

    async fn full_scan(
        &self,
        state: &kv::Store,
        head: Head,
        mut revision: Option<u64>,
    ) -> Result<(), ScanError> {
        let (manifest, mut written, cursor) = match &head.scan {
            Some(scan) => (
                scan.manifest.clone(),
                scan.chunks,
                Some(scan.cursor.clone()),
            ),
            // Letters and digits only: it is part of KV keys.
            None => (uuid::Uuid::now_v7().simple().to_string(), 0, None),
        };
        let mut old = Manifest {
            poller: self,
            state,
            manifest: head.manifest.clone(),
            chunks: head.chunks,
            next_chunk: 0,
            entries: VecDeque::new(),
        };
        if let Some(cursor) = &cursor {
            old.skip_through(cursor).await?;
        }
        let chunk_limit = CHUNK_BYTES.min(self.bus.max_event_bytes() / 2);
        let flush_at = usize::try_from(self.config.page_size)
            .unwrap_or(1000)
            .max(1);
        let now = switchyard_event::timestamp::now_rfc3339();
        let mut token: Option<String> = None;
        let mut cursor = cursor;
        loop {
            self.check_shutdown()?;
            let (entries, next, _) = self.page(cursor.as_deref(), token.as_deref()).await?;
            let mut events = Vec::new();
            for (entry, time) in &entries {
                while let Some(previous) = old.peek().await? {
                    if previous.0 >= entry.0 {
                        break;
                    }
                    let gone = old.pop().expect("peeked");
                    if self.config.deletions {
                        events.push(self.removed_event(&gone, &now)?);
                        if events.len() >= flush_at {
                            // Removal ids do not depend on when they are noticed: a
                            // crash after this re-emits the same ones.
                            self.persist(std::mem::take(&mut events)).await?;
                        }
                    }
                }
                let unchanged = match old.peek().await? {
                    Some(previous) if previous.0 == entry.0 => {
                        let previous = old.pop().expect("peeked");
                        previous.1 == entry.1
                    }
                    _ => false,
                };
                if !unchanged {
                    events.push(self.object_event(
                        created_name(&entry.1),
                        entry,
                        time.as_deref(),
                    )?);
                }
            }
            if next.is_none() {
                // The listing is over: whatever the old manifest still has is gone.
                while let Some(gone) = old.next_entry().await? {
                    if self.config.deletions {
                        events.push(self.removed_event(&gone, &now)?);
                        if events.len() >= flush_at {
                            self.persist(std::mem::take(&mut events)).await?;
                        }
                    }
                }
            }
            self.note_held(entries.len() + old.entries.len() + events.len());
            self.persist(events).await?;
            // Then the page's part of the new manifest (under this scan's id, so a
            // process that lost the bucket meanwhile writes only its own chunks),
            // then the cursor.
            self.lease(state).await?;
            let page: Vec<Entry> = entries.into_iter().map(|(entry, _)| entry).collect();
            for chunk in split_chunks(page, chunk_limit) {
                let last = chunk.last().map(|entry| entry.0.clone());
                state
                    .put(
                        self.chunk_key(&manifest, written),
                        serde_json::to_vec(&chunk)
                            .expect("a chunk serializes")
                            .into(),
                    )
                    .await
                    .map_err(|error| ScanError::State(error.to_string()))?;
                written += 1;
                if let Some(last) = last {
                    cursor = Some(last);
                }
            }
            if next.is_some()
                && let Some(cursor) = &cursor
            {
                revision = Some(
                    self.write_head(
                        state,
                        &Head {
                            scan: Some(Scan {
                                manifest: manifest.clone(),
                                chunks: written,
                                cursor: cursor.clone(),
                            }),
                            ..head.clone()
                        },
                        revision,
                    )
                    .await?,
                );
            }
            match next {
                Some(next) => token = Some(next),
                None => break,
            }
        }
        self.write_head(
            state,
            &Head {
                manifest: manifest.clone(),
                chunks: written,
                scan: None,
                after: None,
                completed_ms: now_ms(),
            },
            revision,
        )
        .await?;
        // Only after the head moved to the new manifest (and nobody else had written
        // it): the old one and any abandoned scan's chunks go.
        self.collect_garbage(state, &manifest, written).await;
        Ok(())
    }

    /// Removes this bucket's manifest chunks other than the current manifest's.
    async fn collect_garbage(&self, state: &kv::Store, manifest: &str, chunks: u32) {
        let Ok(mut keys) = state.keys().await else {
            return;
        };
        let mut stale = Vec::new();
        while let Some(Ok(key)) = keys.next().await {
            if let Some((id, chunk)) = self.parse_chunk_key(&key)
                && (id != manifest || chunk >= chunks)
            {
                stale.push(key);
            }
        }
        for key in stale {
            let _ = state.purge(&key).await;
        }
    }
}

/// `(manifest id, chunk)` of a key `<prefix>m<id>.c<n>`, where `prefix` is
/// `<source>.<bucket>.`; `None` for anything else.
fn parse_chunk_key<'k>(prefix: &str, key: &'k str) -> Option<(&'k str, u32)> {
    let rest = key.strip_prefix(prefix)?;
    let (manifest, chunk) = rest.strip_prefix('m')?.split_once(".c")?;
    let valid = !manifest.is_empty()
        && manifest
            .chars()
            .all(|character| character.is_ascii_alphanumeric());
    valid.then_some(())?;
    Some((manifest, chunk.parse().ok()?))
}

fn created_name(etag: &str) -> &'static str {
    // A multipart upload's ETag is `<md5 of the parts' md5s>-<parts>`.
    if etag.contains('-') {
        "ObjectCreated:CompleteMultipartUpload"
    } else {
        "ObjectCreated:Put"
    }
}

/// Splits a page's entries into chunks whose JSON is at most `limit` bytes.
fn split_chunks(entries: Vec<Entry>, limit: usize) -> Vec<Vec<Entry>> {
    let mut chunks = Vec::new();
    let mut chunk = Vec::new();
    let mut bytes = 2;
    for entry in entries {
        let size = serde_json::to_vec(&entry).map_or(0, |json| json.len()) + 1;
        if !chunk.is_empty() && bytes + size > limit {
            chunks.push(std::mem::take(&mut chunk));
            bytes = 2;
        }
        bytes += size;
        chunk.push(entry);
    }
    if !chunk.is_empty() {
        chunks.push(chunk);
    }
    chunks
}

/// The previous scan's manifest, read a chunk at a time in key order.
struct Manifest<'a> {
    poller: &'a Poller,
    state: &'a kv::Store,
    manifest: String,
    chunks: u32,
    next_chunk: u32,
    entries: VecDeque<Entry>,
}

impl Manifest<'_> {
    async fn fill(&mut self) -> Result<(), ScanError> {
        while self.entries.is_empty() && self.next_chunk < self.chunks {
            let key = self.poller.chunk_key(&self.manifest, self.next_chunk);
            let value = self
                .state
                .get(&key)
                .await
                .map_err(|error| ScanError::State(error.to_string()))?
                .ok_or_else(|| ScanError::ManifestLost(format!("chunk `{key}` is missing")))?;
            let chunk: Vec<Entry> = serde_json::from_slice(&value)
                .map_err(|error| ScanError::ManifestLost(format!("chunk `{key}`: {error}")))?;
            self.entries.extend(chunk);
            self.next_chunk += 1;
        }
        Ok(())
    }

    async fn peek(&mut self) -> Result<Option<&Entry>, ScanError> {
        self.fill().await?;
        Ok(self.entries.front())
    }

    fn pop(&mut self) -> Option<Entry> {
        self.entries.pop_front()
    }

    async fn next_entry(&mut self) -> Result<Option<Entry>, ScanError> {
        self.fill().await?;
        Ok(self.entries.pop_front())
    }

    /// Drops every entry up to and including `cursor` (a resumed scan covered them).
    async fn skip_through(&mut self, cursor: &str) -> Result<(), ScanError> {
        while let Some(entry) = self.peek().await? {
            if entry.0.as_str() > cursor {
                break;
            }
            self.pop();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_stay_under_the_byte_limit_and_keep_order() {
        let entries: Vec<Entry> = (0..3000)
            .map(|index| Entry(format!("{index:0>200}"), "e".repeat(32), 1))
            .collect();
        let chunks = split_chunks(entries.clone(), CHUNK_BYTES);
        assert!(chunks.len() >= 3, "{}", chunks.len());
        for chunk in &chunks {
            assert!(serde_json::to_vec(chunk).unwrap().len() <= CHUNK_BYTES);
        }
        assert_eq!(chunks.concat(), entries);
        // Keys that JSON escapes (control characters: six bytes each) still fit.
        let escaped: Vec<Entry> = (0..400)
            .map(|index| {
                Entry(
                    format!("{index:04}{}", "\u{1}".repeat(1000)),
                    "e".repeat(32),
                    1,
                )
            })
            .collect();
        for chunk in split_chunks(escaped, CHUNK_BYTES) {
            assert!(serde_json::to_vec(&chunk).unwrap().len() <= CHUNK_BYTES);
        }
    }

    #[test]
    fn chunk_keys_are_recognised_exactly() {
        assert_eq!(
            parse_chunk_key("src.logs.", "src.logs.mab12.c3"),
            Some(("ab12", 3))
        );
        // Another bucket's keys (`logs.gz` beside `logs`) are not this bucket's.
        assert_eq!(parse_chunk_key("src.logs.", "src.logs.gz.mab12.c3"), None);
        assert_eq!(parse_chunk_key("src.logs.", "src.logs.head"), None);
        assert_eq!(parse_chunk_key("src.logs.", "src.logs.m.c3"), None);
        assert_eq!(parse_chunk_key("src.logs.", "src.logs.mab12.cx"), None);
    }

    #[test]
    fn multipart_etags_name_their_upload() {
        assert_eq!(
            created_name("abc-3"),
            "ObjectCreated:CompleteMultipartUpload"
        );
        assert_eq!(created_name("abc"), "ObjectCreated:Put");
    }
}
