//! The Kafka source: a consumer group whose records become CloudEvents in the events
//! stream, with offsets committed only behind the bus's acknowledgements.
//!
//! Two halves share a [`tracker::Tracker`]:
//! - the consumer thread owns the librdkafka consumer: it polls records, converts
//!   them (see [`record`]), hands them to the publisher, stores the offsets the
//!   tracker releases (librdkafka commits stored offsets every
//!   `auto.commit.interval.ms`), pauses every assigned partition while too many
//!   records are in flight, and on a revocation waits for the revoked partitions'
//!   records to be persisted, then commits synchronously before giving them up;
//! - the publisher (a task) persists records in the order they were read, retrying
//!   while the bus is unavailable, and reports each persisted record to the tracker.
//!
//! An offset is stored only when every record read before it in its partition is
//! persisted, so a crash at any point re-reads from the last such record; re-read
//! records keep their ids and are dropped by the bus's duplicate window.

pub mod config;
pub mod destination;
pub mod record;
mod tracker;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message};
use rdkafka::topic_partition_list::TopicPartitionList;
use switchyard_bus::Bus;
use switchyard_event::backoff::Backoff;
use switchyard_event::{Event, PublishError, Source, SourceHealth};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use config::{ConfigProblem, KafkaSourceConfig, PropertyValue, StartAt};
pub use destination::KafkaDestination;
pub use rdkafka;
use tracker::{Ticket, Tracker};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: String,
}

/// Counters and gauges of every Kafka source in the process.
#[derive(Clone, Default)]
pub struct KafkaSourceMetrics {
    pub records_read: Family<SourceLabels, Counter>,
    pub records_persisted: Family<SourceLabels, Counter>,
    pub records_dead_lettered: Family<SourceLabels, Counter>,
    pub records_in_flight: Family<SourceLabels, Gauge>,
    pub paused: Family<SourceLabels, Gauge>,
}

impl KafkaSourceMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "kafka_records_read",
            "records a Kafka source read",
            self.records_read.clone(),
        );
        registry.register(
            "kafka_records_persisted",
            "records a Kafka source persisted as events",
            self.records_persisted.clone(),
        );
        registry.register(
            "kafka_records_dead_lettered",
            "records that could not become events (malformed, too large), dead-lettered",
            self.records_dead_lettered.clone(),
        );
        registry.register(
            "kafka_records_in_flight",
            "records read and not yet persisted",
            self.records_in_flight.clone(),
        );
        registry.register(
            "kafka_paused",
            "1 while a Kafka source has paused its partitions for backpressure",
            self.paused.clone(),
        );
    }
}

/// How long a revocation or a shutdown waits for in-flight records to be persisted
/// before giving the partitions up anyway (the next owner re-reads what was not).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the records in flight may stay at `max_in_flight` before the partitions
/// are paused.
const PAUSE_AFTER: Duration = Duration::from_secs(2);
/// How often the same kind of error is logged, at most.
const REPORT_EVERY: Duration = Duration::from_secs(60);

/// Logs errors once per kind and interval, with how many were suppressed, and says
/// when things work again.
struct Reporter {
    source: String,
    seen: Mutex<HashMap<String, (Instant, u64)>>,
    troubled: AtomicBool,
}

impl Reporter {
    fn new(source: &str) -> Reporter {
        Reporter {
            source: source.to_owned(),
            seen: Mutex::new(HashMap::new()),
            troubled: AtomicBool::new(false),
        }
    }

    fn report(&self, kind: &str, stage: &str, message: &dyn std::fmt::Display) {
        self.troubled.store(true, Ordering::Relaxed);
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = Instant::now();
        let entry = seen
            .entry(kind.to_owned())
            .or_insert((now - REPORT_EVERY * 2, 0));
        if now.duration_since(entry.0) >= REPORT_EVERY {
            let suppressed = entry.1;
            *entry = (now, 0);
            tracing::warn!(source = %self.source, stage, kind, suppressed, "{message}");
        } else {
            entry.1 += 1;
        }
    }

    fn recovered(&self, stage: &str) {
        if self.troubled.swap(false, Ordering::Relaxed) {
            self.seen
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clear();
            tracing::info!(source = %self.source, stage, "kafka source working again");
        }
    }
}

/// The consumer's librdkafka context: logging, errors, rebalances and commits.
struct SourceContext {
    name: String,
    tracker: Arc<Tracker>,
    reporter: Arc<Reporter>,
    assignment_changed: AtomicBool,
}

impl ClientContext for SourceContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error
            | RDKafkaLogLevel::Warning => {
                self.reporter.report(facility, "librdkafka", &message);
            }
            _ => tracing::debug!(source = %self.name, facility, "{message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let kind = error
            .rdkafka_error_code()
            .map_or_else(|| "error".to_owned(), |code| format!("{code:?}"));
        self.reporter
            .report(&kind, "kafka", &format_args!("{error}: {reason}"));
    }
}

fn partitions_of(list: &TopicPartitionList) -> Vec<(String, i32)> {
    list.elements()
        .iter()
        .map(|element| (element.topic().to_owned(), element.partition()))
        .collect()
}

/// Stores, for commit, the offsets the tracker released.
fn store_offsets(consumer: &BaseConsumer<SourceContext>, tracker: &Tracker) {
    for (topic, partition, offset) in tracker.take_to_store() {
        // librdkafka commits `offset + 1`: the next record to read.
        if let Err(error) = consumer.store_offset(&topic, partition, offset) {
            // Only fails for a partition no longer assigned; its next owner re-reads.
            tracing::debug!(source = %consumer.context().name, topic = %topic, partition, offset, %error, "offset not stored");
        }
    }
}

fn commit(consumer: &BaseConsumer<SourceContext>, why: &str) {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => tracing::debug!(source = %consumer.context().name, why, "offsets committed"),
        Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(error) => consumer.context().reporter.report(
            "commit",
            why,
            &format_args!("committing offsets failed: {error}"),
        ),
    }
}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(list) => {
                let partitions = partitions_of(list);
                let drained = self
                    .tracker
                    .wait_drained(Some(&partitions), Instant::now() + DRAIN_TIMEOUT);
                store_offsets(consumer, &self.tracker);
                if !consumer.assignment_lost() {
                    commit(consumer, "revoke");
                }
                let abandoned = self.tracker.release(&partitions);
                tracing::info!(source = %self.name, partitions = ?partitions, drained, abandoned, "partitions revoked after committing what is persisted");
            }
            Rebalance::Assign(list) => {
                tracing::info!(source = %self.name, partitions = ?partitions_of(list), "partitions assigned");
            }
            Rebalance::Error(error) => {
                self.reporter.report(
                    "rebalance",
                    "rebalance",
                    &format_args!("rebalance failed: {error}"),
                );
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, _rebalance: &Rebalance<'_>) {
        self.assignment_changed.store(true, Ordering::SeqCst);
    }

    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        _offsets: &TopicPartitionList,
    ) {
        match result {
            Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(error) => self.reporter.report(
                "commit",
                "commit",
                &format_args!("committing offsets failed (retried at the next commit): {error}"),
            ),
        }
    }
}

/// A record on its way to the bus.
enum Item {
    /// The events of one record (none for a store's test notification).
    Events(Vec<Event>),
    /// Could not become a valid event: dead-lettered with why.
    Invalid { event: Box<Event>, error: String },
}

/// A Kafka source (a consumer group over its topics), run and supervised by the
/// binary.
pub struct KafkaSource {
    config: Arc<KafkaSourceConfig>,
    bus: Bus,
    metrics: KafkaSourceMetrics,
}

impl KafkaSource {
    pub fn new(config: KafkaSourceConfig, bus: Bus, metrics: KafkaSourceMetrics) -> Self {
        KafkaSource {
            config: Arc::new(config),
            bus,
            metrics,
        }
    }
}

#[async_trait]
impl Source for KafkaSource {
    fn name(&self) -> &str {
        &self.config.name
    }

    fn kind(&self) -> &'static str {
        "kafka"
    }

    /// Fails when its consumer cannot be created or subscribed, or its consumer
    /// thread panicked.
    async fn run(
        &self,
        health: &dyn SourceHealth,
        shutdown: CancellationToken,
    ) -> Result<(), String> {
        run(
            self.config.clone(),
            self.bus.clone(),
            self.metrics.clone(),
            health,
            shutdown,
        )
        .await
    }
}

/// Runs the source until `shutdown`, then persists what was read (for up to
/// [`DRAIN_TIMEOUT`]), commits and leaves the group.
async fn run(
    config: Arc<KafkaSourceConfig>,
    bus: Bus,
    metrics: KafkaSourceMetrics,
    health: &dyn SourceHealth,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let labels = SourceLabels {
        source: config.name.clone(),
    };
    let tracker = Arc::new(Tracker::default());
    let reporter = Arc::new(Reporter::new(&config.name));
    let context = SourceContext {
        name: config.name.clone(),
        tracker: tracker.clone(),
        reporter: reporter.clone(),
        assignment_changed: AtomicBool::new(false),
    };
    let consumer: BaseConsumer<SourceContext> = config
        .client_config()
        .create_with_context(context)
        .map_err(|error| format!("source `{}`: creating the consumer: {error}", config.name))?;
    let consumer = if config.start == config::StartAt::Latest {
        let for_thread = config.clone();
        tokio::task::spawn_blocking(move || {
            start_new_group_at_end(&for_thread, &consumer);
            consumer
        })
        .await
        .map_err(|error| format!("source `{}`: {error}", config.name))?
    } else {
        consumer
    };
    let topics = config.subscription();
    let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topic_refs).map_err(|error| {
        format!(
            "source `{}`: subscribing to {topics:?}: {error}",
            config.name
        )
    })?;
    tracing::info!(source = %config.name, topics = ?topics, group = %config.group_id(), "kafka source consuming");
    health.up();

    let (sender, receiver) = mpsc::unbounded_channel();
    let abandoned = CancellationToken::new();
    let consuming = tokio::task::spawn_blocking({
        let (config, tracker, shutdown, abandoned) = (
            config.clone(),
            tracker.clone(),
            shutdown.clone(),
            abandoned.clone(),
        );
        let meters = Meters::new(&metrics, &labels);
        move || {
            consume(&config, consumer, &tracker, &meters, &sender, &shutdown);
            drop(sender);
            abandoned.cancel();
        }
    });
    let meters = Meters::new(&metrics, &labels);
    publish(
        &config, &bus, &tracker, &reporter, &meters, receiver, &abandoned,
    )
    .await;
    consuming
        .await
        .map_err(|error| format!("source `{}`: consumer thread failed: {error}", config.name))
}

/// `start = "latest"` for a group that has never committed anything on the topics it
/// subscribes to: commits the end of every partition of them, so the group starts
/// there. Once a group has committed anywhere it is not new, and every partition
/// without a commit (added to a topic later, or a topic that matches the pattern
/// later, even while no process ran) starts at its earliest offset
/// (`auto.offset.reset = earliest`), so records written before the group noticed it
/// are read, not skipped. Blocking (broker requests); the coordinator of a new cluster
/// may still be loading, so each request is retried for up to 30 s.
fn start_new_group_at_end(config: &KafkaSourceConfig, consumer: &BaseConsumer<SourceContext>) {
    let timeout = Duration::from_secs(10);
    let deadline = Instant::now() + Duration::from_secs(30);
    let metadata = match consumer.fetch_metadata(None, timeout) {
        Ok(metadata) => metadata,
        Err(error) => {
            tracing::warn!(source = %config.name, %error, "reading topic metadata failed; if this group is new it reads from the earliest offsets");
            return;
        }
    };
    let mut partitions = TopicPartitionList::new();
    for topic in metadata.topics() {
        if config.subscribes_to(topic.name()) {
            for partition in topic.partitions() {
                partitions.add_partition(topic.name(), partition.id());
            }
        }
    }
    if partitions.count() == 0 {
        return;
    }
    let committed = loop {
        match consumer.committed_offsets(partitions.clone(), timeout) {
            Ok(committed) => break committed,
            Err(error) if Instant::now() < deadline => {
                tracing::debug!(source = %config.name, %error, "reading committed offsets failed, retrying");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(error) => {
                tracing::warn!(source = %config.name, %error, "reading committed offsets failed; if this group is new it reads from the earliest offsets");
                return;
            }
        }
    };
    if committed
        .elements()
        .iter()
        .any(|element| matches!(element.offset(), rdkafka::Offset::Offset(_)))
    {
        // Not a new group: `start` no longer applies.
        return;
    }
    let mut ends = TopicPartitionList::new();
    for element in partitions.elements() {
        match consumer.fetch_watermarks(element.topic(), element.partition(), timeout) {
            Ok((_, high)) => {
                let _ = ends.add_partition_offset(
                    element.topic(),
                    element.partition(),
                    rdkafka::Offset::Offset(high),
                );
            }
            Err(error) => {
                tracing::warn!(source = %config.name, topic = element.topic(), %error, "reading a partition's end failed; that partition is read from its start");
            }
        }
    }
    loop {
        match consumer.commit(&ends, CommitMode::Sync) {
            Ok(()) => {
                tracing::info!(source = %config.name, partitions = ends.count(), "new consumer group starts at the end of its topics (start = \"latest\")");
                return;
            }
            Err(error) if Instant::now() < deadline => {
                tracing::debug!(source = %config.name, %error, "committing the start position failed, retrying");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(error) => {
                tracing::warn!(source = %config.name, %error, "committing the start position failed; the new group reads from the earliest offsets");
                return;
            }
        }
    }
}

/// One source's metrics.
struct Meters {
    read: Counter,
    persisted: Counter,
    dead_lettered: Counter,
    in_flight: Gauge,
    paused: Gauge,
}

impl Meters {
    fn new(metrics: &KafkaSourceMetrics, labels: &SourceLabels) -> Meters {
        Meters {
            read: metrics.records_read.get_or_create(labels).clone(),
            persisted: metrics.records_persisted.get_or_create(labels).clone(),
            dead_lettered: metrics.records_dead_lettered.get_or_create(labels).clone(),
            in_flight: metrics.records_in_flight.get_or_create(labels).clone(),
            paused: metrics.paused.get_or_create(labels).clone(),
        }
    }
}

/// The consumer thread's loop.
fn consume(
    config: &KafkaSourceConfig,
    consumer: BaseConsumer<SourceContext>,
    tracker: &Tracker,
    meters: &Meters,
    sender: &mpsc::UnboundedSender<(Ticket, Item)>,
    shutdown: &CancellationToken,
) {
    let context = consumer.context();
    let mut paused = false;
    let mut full_since: Option<Instant> = None;
    let set_paused = |pause: bool| -> bool {
        let result = consumer.assignment().and_then(|assignment| {
            if pause {
                consumer.pause(&assignment)
            } else {
                consumer.resume(&assignment)
            }
        });
        match result {
            Ok(()) => {
                tracing::debug!(source = %config.name, paused = pause, "backpressure");
                meters.paused.set(i64::from(pause));
                true
            }
            Err(error) => {
                context.reporter.report(
                    "pause",
                    "backpressure",
                    &format_args!("pausing or resuming partitions failed: {error}"),
                );
                false
            }
        }
    };
    while !shutdown.is_cancelled() {
        store_offsets(&consumer, tracker);
        let in_flight = tracker.in_flight();
        meters.in_flight.set(in_flight as i64);
        let assignment_changed = context.assignment_changed.swap(false, Ordering::SeqCst);
        let wait = if in_flight >= config.max_in_flight {
            // Full. First just stop reading: librdkafka's queue fills up and it stops
            // fetching on its own, and reading resumes the moment there is room
            // (pausing would drop what it prefetched and cost a fetch backoff, up to a
            // second, on resume). Only a stall longer than PAUSE_AFTER pauses the
            // partitions, so a long outage holds no more than the queue.
            let since = *full_since.get_or_insert_with(Instant::now);
            if (!paused || assignment_changed) && since.elapsed() >= PAUSE_AFTER {
                paused = set_paused(true);
            }
            tracker.wait_at_most(config.max_in_flight - 1, Duration::from_millis(100));
            if tracker.in_flight() >= config.max_in_flight {
                // Still full: serve rebalances and errors; a record this returns is
                // taken (at most one per wait).
                Duration::ZERO
            } else {
                continue;
            }
        } else {
            full_since = None;
            if paused && set_paused(false) {
                paused = false;
            }
            Duration::from_millis(100)
        };
        let message = match consumer.poll(wait) {
            None => continue,
            Some(Err(error)) => {
                context.reporter.report(
                    "consume",
                    "consume",
                    &format_args!("consuming failed: {error}"),
                );
                continue;
            }
            Some(Ok(message)) => message,
        };
        context.reporter.recovered("consume");
        meters.read.inc();
        let ticket = tracker.read(message.topic(), message.partition(), message.offset());
        let headers: Vec<(&str, Option<&[u8]>)> = message
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .map(|header| (header.key, header.value))
                    .collect()
            })
            .unwrap_or_default();
        let record = record::Record {
            at: record::Coordinates {
                topic: message.topic(),
                partition: message.partition(),
                offset: message.offset(),
            },
            key: message.key(),
            headers,
            timestamp: message.timestamp().to_millis(),
            timestamp_type: match message.timestamp() {
                rdkafka::Timestamp::CreateTime(_) => Some("CREATE_TIME"),
                rdkafka::Timestamp::LogAppendTime(_) => Some("LOG_APPEND_TIME"),
                rdkafka::Timestamp::NotAvailable => None,
            },
            payload: message.payload(),
        };
        let item = match record::to_events(config, &record) {
            Ok(events) => Item::Events(events),
            Err(error) => Item::Invalid {
                event: Box::new(record::fallback_event(config, &record)),
                error: error.to_string(),
            },
        };
        if sender.send((ticket, item)).is_err() {
            break;
        }
    }
    // Shutting down: stop reading, let the publisher persist what was read, commit.
    let drained = tracker.wait_drained(None, Instant::now() + DRAIN_TIMEOUT);
    store_offsets(&consumer, tracker);
    commit(&consumer, "shutdown");
    tracing::info!(source = %config.name, drained, "kafka source stopped reading; leaving the group");
    // Dropping the consumer leaves the group (a final revocation, nothing left to wait
    // for).
}

/// Persists records in the order they were read.
async fn publish(
    config: &KafkaSourceConfig,
    bus: &Bus,
    tracker: &Tracker,
    reporter: &Reporter,
    meters: &Meters,
    mut receiver: mpsc::UnboundedReceiver<(Ticket, Item)>,
    abandoned: &CancellationToken,
) {
    let mut batch = Vec::with_capacity(1024);
    while receiver.recv_many(&mut batch, 1024).await > 0 {
        let mut tickets = Vec::with_capacity(batch.len());
        let mut events = Vec::with_capacity(batch.len());
        let mut invalid = Vec::new();
        let mut records = 0;
        for (ticket, item) in batch.drain(..) {
            tickets.push(ticket);
            match item {
                Item::Events(mut more) => {
                    records += 1;
                    events.append(&mut more);
                }
                Item::Invalid { event, error } => invalid.push((event, error)),
            }
        }
        let mut too_large = Vec::new();
        let _spans = switchyard_event::telemetry::start_ingests(
            &mut events,
            switchyard_event::telemetry::SpanKind::Consumer,
            &config.name,
        );
        if !persist(bus, reporter, &events, &mut too_large, abandoned).await {
            return;
        }
        for (event, error) in invalid {
            if !dead_letter(config, bus, reporter, *event, "malformed", error, abandoned).await {
                return;
            }
            meters.dead_lettered.inc();
        }
        for (event, error) in too_large {
            // Stored whole when it fits; otherwise the dead letter keeps what fits
            // and says what it dropped (see DeadLetter::to_message_within).
            if !dead_letter(config, bus, reporter, event, "too_large", error, abandoned).await {
                return;
            }
            meters.dead_lettered.inc();
        }
        reporter.recovered("publish");
        meters.persisted.inc_by(records);
        for ticket in &tickets {
            tracker.done(ticket);
        }
    }
}

/// The pause between tries to store records while the bus is unavailable: 200 ms,
/// doubling up to 6.4 s.
fn bus_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(200), Duration::from_millis(6400))
}

/// Persists `events` in order, retrying while the bus is unavailable. Events larger
/// than the bus accepts are set aside in `too_large`. False when the consumer gave up
/// waiting (shutdown): nothing is lost, the offsets were not committed.
async fn persist(
    bus: &Bus,
    reporter: &Reporter,
    events: &[Event],
    too_large: &mut Vec<(Event, String)>,
    abandoned: &CancellationToken,
) -> bool {
    if events.is_empty() {
        return true;
    }
    match publish_retrying(bus, reporter, events, abandoned).await {
        None => return false,
        Some(Ok(())) => return true,
        Some(Err(_)) => {}
    }
    // One of them is too large: publish one by one, in order, to find it.
    for event in events {
        match publish_retrying(bus, reporter, std::slice::from_ref(event), abandoned).await {
            None => return false,
            Some(Ok(())) => {}
            Some(Err(error)) => too_large.push((event.clone(), error)),
        }
    }
    true
}

/// Publishes `events` in order, retrying while the bus is unavailable: `Ok` once
/// stored, `Err` with why when one is larger than the bus accepts, `None` when the
/// consumer gave up waiting.
async fn publish_retrying(
    bus: &Bus,
    reporter: &Reporter,
    events: &[Event],
    abandoned: &CancellationToken,
) -> Option<Result<(), String>> {
    let mut failures = bus_backoff();
    loop {
        match bus.publish_events(events).await {
            Ok(_) => return Some(Ok(())),
            Err(PublishError::TooLarge(error)) => return Some(Err(error)),
            Err(error) => {
                reporter.report(
                    "publish",
                    "publish",
                    &format_args!("persisting records failed, retrying: {error}"),
                );
                failures.failed();
                if !failures.pause(abandoned.cancelled()).await {
                    return None;
                }
            }
        }
    }
}

async fn dead_letter(
    config: &KafkaSourceConfig,
    bus: &Bus,
    reporter: &Reporter,
    event: Event,
    reason: &str,
    error: String,
    abandoned: &CancellationToken,
) -> bool {
    tracing::error!(source = %config.name, event_id = %event.id, reason, %error, "record cannot become an event; dead-lettered");
    let mut failures = bus_backoff();
    loop {
        match bus
            .dead_letter_input(&config.name, event.clone(), reason, &error)
            .await
        {
            Ok(()) => return true,
            Err(PublishError::TooLarge(failure)) => {
                tracing::error!(source = %config.name, event_id = %event.id, error = %failure, "dead letter of a record is itself too large; record skipped");
                return true;
            }
            Err(failure) => {
                reporter.report(
                    "dead_letter",
                    "dead_letter",
                    &format_args!("storing a dead letter failed, retrying: {failure}"),
                );
                failures.failed();
                if !failures.pause(abandoned.cancelled()).await {
                    return false;
                }
            }
        }
    }
}
