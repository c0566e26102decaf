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
use std::sync::atomic::{AtomicI64, Ordering};
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
use switchyard_event::{Event, PublishError};
use tokio_util::sync::CancellationToken;

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

/// A bucket's scan state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Head {
    /// The last complete manifest and its number of chunks.
    generation: u64,
    chunks: u32,
    /// A scan under way: the manifest it is writing, chunks written, last key covered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scan: Option<Scan>,
    /// `start_after` listings: the last key seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    after: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Scan {
    generation: u64,
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
    /// Another process holds the bucket's lease.
    NotOwner,
    Shutdown,
}

impl std::fmt::Display for ScanError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ScanError::Store(error) => write!(formatter, "object store: {error}"),
            ScanError::State(error) => write!(formatter, "poll state (NATS KV): {error}"),
            ScanError::Bus(error) => write!(formatter, "event bus: {error}"),
            ScanError::NotOwner => write!(formatter, "another process polls this bucket"),
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

/// Runs a poll source until `shutdown`: one task per bucket.
pub async fn run(
    config: S3PollSourceConfig,
    store: StoreConfig,
    bus: Bus,
    metrics: PollMetrics,
    shutdown: CancellationToken,
) {
    let client = store.client().await;
    let config = Arc::new(config);
    let store = Arc::new(store);
    let owner = uuid_like();
    let mut tasks = Vec::new();
    for bucket in config.buckets.clone() {
        let poller = Poller {
            labels: PollLabels {
                source: config.name.clone(),
                bucket: bucket.clone(),
            },
            config: config.clone(),
            store: store.clone(),
            client: client.clone(),
            bus: bus.clone(),
            metrics: metrics.clone(),
            shutdown: shutdown.clone(),
            owner: owner.clone(),
            bucket,
            held: Arc::new(AtomicI64::new(0)),
        };
        tasks.push(tokio::spawn(poller.run()));
    }
    for task in tasks {
        let _ = task.await;
    }
}

fn uuid_like() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}-{}", std::process::id(), now.as_nanos())
}

fn now_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}

struct Poller {
    config: Arc<S3PollSourceConfig>,
    store: Arc<StoreConfig>,
    client: aws_sdk_s3::Client,
    bus: Bus,
    metrics: PollMetrics,
    labels: PollLabels,
    shutdown: CancellationToken,
    owner: String,
    bucket: String,
    held: Arc<AtomicI64>,
}

impl Poller {
    fn key(&self, suffix: &str) -> String {
        format!("{}.{}.{suffix}", self.config.name, self.bucket)
    }

    fn chunk_key(&self, generation: u64, chunk: u32) -> String {
        self.key(&format!("g{generation}.c{chunk}"))
    }

    fn lease_time(&self) -> Duration {
        (self.config.interval * 2 + Duration::from_secs(10)).min(Duration::from_secs(600))
    }

    async fn run(self) {
        let mut failures: u32 = 0;
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
                    if failures > 0 {
                        tracing::info!(source = %self.config.name, bucket = %self.bucket, "polling works again");
                    }
                    failures = 0;
                    self.config.interval
                }
                Err(ScanError::Shutdown) => break,
                Err(ScanError::NotOwner) => {
                    // Try again when the holder's lease could have lapsed.
                    self.config.interval.min(self.lease_time() / 2)
                }
                Err(error) => {
                    failures += 1;
                    self.metrics.errors.get_or_create(&self.labels).inc();
                    // Backoff: 1 s doubling, at most the interval (and 60 s).
                    let backoff = Duration::from_secs(1 << failures.min(6).saturating_sub(1))
                        .min(self.config.interval.max(Duration::from_secs(1)))
                        .min(Duration::from_secs(60));
                    if failures == 1 || failures.is_power_of_two() {
                        tracing::warn!(source = %self.config.name, bucket = %self.bucket, %error, failures, retry_in = ?backoff, "poll failed; it resumes from its checkpoint");
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
        let result = match entry {
            Some(entry) if !entry.value.is_empty() => {
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
                    .map(|_| ())
                    .map_err(|error| error.to_string())
            }
            Some(entry) => state
                .update(&key, mine.into(), entry.revision)
                .await
                .map(|_| ())
                .map_err(|error| error.to_string()),
            None => state
                .create(&key, mine.into())
                .await
                .map(|_| ())
                .map_err(|error| error.to_string()),
        };
        // Losing a race for the lease means another process has it.
        result.map_err(|_| ScanError::NotOwner)
    }

    async fn read_head(&self, state: &kv::Store) -> Result<Head, ScanError> {
        match state
            .get(self.key("head"))
            .await
            .map_err(|error| ScanError::State(error.to_string()))?
        {
            Some(value) => serde_json::from_slice(&value)
                .map_err(|error| ScanError::State(format!("unreadable head: {error}"))),
            None => Ok(Head::default()),
        }
    }

    async fn write_head(&self, state: &kv::Store, head: &Head) -> Result<(), ScanError> {
        state
            .put(
                self.key("head"),
                serde_json::to_vec(head).expect("a head serializes").into(),
            )
            .await
            .map(|_| ())
            .map_err(|error| ScanError::State(error.to_string()))
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
        if held > self.held.fetch_max(held, Ordering::Relaxed) {
            self.metrics
                .objects_held_max
                .get_or_create(&self.labels)
                .set(held);
        }
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

    /// One listing page: the entries (filtered) and where the next page starts.
    async fn page(
        &self,
        start_after: Option<&str>,
        token: Option<&str>,
    ) -> Result<(Vec<(Entry, Option<String>)>, Option<String>, Option<String>), ScanError> {
        let mut request = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .max_keys(self.config.page_size);
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
        let mut last_key = None;
        let mut entries = Vec::new();
        for object in output.contents() {
            let Some(key) = object.key() else { continue };
            last_key = Some(key.to_owned());
            self.metrics
                .objects_listed
                .get_or_create(&self.labels)
                .inc();
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

    /// Persists events, retrying while the bus is unavailable.
    async fn persist(&self, events: Vec<Event>) -> Result<(), ScanError> {
        if events.is_empty() {
            return Ok(());
        }
        let count = events.len() as u64;
        let mut attempt = 0u32;
        loop {
            match self.bus.publish_events(&events).await {
                Ok(_) => break,
                Err(PublishError::TooLarge(error)) => {
                    // Object events are small; one that is not is stored as a dead letter.
                    for event in events {
                        if let Err(failure) = self
                            .bus
                            .dead_letter_input(&self.config.name, event, "too_large", &error)
                            .await
                        {
                            return Err(ScanError::Bus(failure.to_string()));
                        }
                    }
                    break;
                }
                Err(error) => {
                    attempt += 1;
                    if attempt >= 5 {
                        return Err(ScanError::Bus(error.to_string()));
                    }
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(200 << attempt)) => {}
                        () = self.shutdown.cancelled() => return Err(ScanError::Shutdown),
                    }
                }
            }
        }
        self.metrics
            .events
            .get_or_create(&self.labels)
            .inc_by(count);
        Ok(())
    }

    async fn scan(&self, state: &kv::Store) -> Result<(), ScanError> {
        self.lease(state).await?;
        match self.config.listing {
            Listing::Full => self.full_scan(state).await?,
            Listing::StartAfter => self.scan_after(state).await?,
        }
        self.metrics.scans.get_or_create(&self.labels).inc();
        Ok(())
    }

    async fn scan_after(&self, state: &kv::Store) -> Result<(), ScanError> {
        let mut head = self.read_head(state).await?;
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
            if let Some(last) = last_key {
                head.after = Some(last);
                self.lease(state).await?;
                self.write_head(state, &head).await?;
            }
            match next {
                Some(next) => token = Some(next),
                None => return Ok(()),
            }
        }
    }

    async fn full_scan(&self, state: &kv::Store) -> Result<(), ScanError> {
        let head = self.read_head(state).await?;
        let (generation, mut written, cursor) = match &head.scan {
            Some(scan) => (scan.generation, scan.chunks, Some(scan.cursor.clone())),
            None => (head.generation + 1, 0, None),
        };
        let mut old = Manifest {
            poller: self,
            state,
            generation: head.generation,
            chunks: head.chunks,
            next_chunk: 0,
            entries: VecDeque::new(),
        };
        if let Some(cursor) = &cursor {
            old.skip_through(cursor).await?;
        }
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
                    }
                }
            }
            self.note_held(entries.len() + old.entries.len());
            self.persist(events).await?;
            // Then the page's part of the new manifest, then the cursor.
            let page: Vec<Entry> = entries.into_iter().map(|(entry, _)| entry).collect();
            for chunk in split_chunks(page) {
                let last = chunk.last().map(|entry| entry.0.clone());
                state
                    .put(
                        self.chunk_key(generation, written),
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
            self.lease(state).await?;
            if next.is_some()
                && let Some(cursor) = &cursor
            {
                self.write_head(
                    state,
                    &Head {
                        scan: Some(Scan {
                            generation,
                            chunks: written,
                            cursor: cursor.clone(),
                        }),
                        ..head.clone()
                    },
                )
                .await?;
            }
            match next {
                Some(next) => token = Some(next),
                None => break,
            }
        }
        self.write_head(
            state,
            &Head {
                generation,
                chunks: written,
                scan: None,
                after: None,
            },
        )
        .await?;
        self.collect_garbage(state, generation, written).await;
        Ok(())
    }

    /// Removes manifest chunks other than the current generation's.
    async fn collect_garbage(&self, state: &kv::Store, generation: u64, chunks: u32) {
        let prefix = self.key("g");
        let keep = |key: &str| -> bool {
            let Some(rest) = key.strip_prefix(&prefix) else {
                return true;
            };
            let Some((gen_text, chunk_text)) = rest.split_once(".c") else {
                return true;
            };
            gen_text.parse::<u64>().ok() == Some(generation)
                && chunk_text.parse::<u32>().is_ok_and(|chunk| chunk < chunks)
        };
        let Ok(mut keys) = state.keys().await else {
            return;
        };
        let mut stale = Vec::new();
        while let Some(Ok(key)) = keys.next().await {
            if key.starts_with(&prefix) && !keep(&key) {
                stale.push(key);
            }
        }
        for key in stale {
            let _ = state.purge(&key).await;
        }
    }
}

fn created_name(etag: &str) -> &'static str {
    // A multipart upload's ETag is `<md5 of the parts' md5s>-<parts>`.
    if etag.contains('-') {
        "ObjectCreated:CompleteMultipartUpload"
    } else {
        "ObjectCreated:Put"
    }
}

/// Splits a page's entries into chunks of at most [`CHUNK_BYTES`].
fn split_chunks(entries: Vec<Entry>) -> Vec<Vec<Entry>> {
    let mut chunks = Vec::new();
    let mut chunk = Vec::new();
    let mut bytes = 0;
    for entry in entries {
        let size = entry.0.len() + entry.1.len() + 32;
        if !chunk.is_empty() && bytes + size > CHUNK_BYTES {
            chunks.push(std::mem::take(&mut chunk));
            bytes = 0;
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
    generation: u64,
    chunks: u32,
    next_chunk: u32,
    entries: VecDeque<Entry>,
}

impl Manifest<'_> {
    async fn fill(&mut self) -> Result<(), ScanError> {
        while self.entries.is_empty() && self.next_chunk < self.chunks {
            let key = self.poller.chunk_key(self.generation, self.next_chunk);
            let value = self
                .state
                .get(&key)
                .await
                .map_err(|error| ScanError::State(error.to_string()))?
                .ok_or_else(|| ScanError::State(format!("manifest chunk `{key}` is missing")))?;
            let chunk: Vec<Entry> = serde_json::from_slice(&value)
                .map_err(|error| ScanError::State(format!("manifest chunk `{key}`: {error}")))?;
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
        let chunks = split_chunks(entries.clone());
        assert!(chunks.len() >= 3, "{}", chunks.len());
        for chunk in &chunks {
            let bytes: usize = chunk
                .iter()
                .map(|entry| entry.0.len() + entry.1.len() + 32)
                .sum();
            assert!(bytes <= CHUNK_BYTES);
        }
        assert_eq!(chunks.concat(), entries);
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
