//! The NATS source: messages on core NATS subjects, or in an existing JetStream
//! stream, become CloudEvents in the events stream.
//!
//! A message that already is a CloudEvent (NATS binding, binary mode: `ce-` headers)
//! keeps its attributes; any other message becomes the data of an event with the
//! configured type and source, the NATS subject as `subject`, and its `Content-Type`
//! header as `datacontenttype`.
//!
//! Delivery: JetStream input is acknowledged only after the event is persisted (PubAck);
//! if the bus is unavailable the input is NAKed and comes back later. Its event id is
//! derived from the input's stream and sequence, so a re-read after a crash is dropped
//! by the duplicate window. Core NATS has no redelivery: a message is persisted or, if
//! the bus is unavailable, reported and lost upstream; a request (message with a reply
//! subject) is answered `ok <id>` only after the event is persisted, or with an error.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use serde::Deserialize;
use switchyard_bus::async_nats::jetstream::{self, AckKind, consumer::pull};
use switchyard_bus::async_nats::{self, HeaderMap};
use switchyard_bus::{Bus, event_from_message};
use switchyard_connector_s3::MessageFormat;
use switchyard_event::backoff::Backoff;
use switchyard_event::{Event, EventError, EventSink, PublishError, Source, SourceHealth};
use tokio_util::sync::CancellationToken;

/// A NATS source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsSourceConfig {
    /// Name of the source, used in logs and in the default event source.
    pub name: String,
    /// Core NATS subjects to subscribe to (wildcards allowed).
    #[serde(default)]
    pub subjects: Vec<String>,
    /// Queue group of the subscriptions, so several processes share the messages;
    /// `switchyard-<name>` by default.
    #[serde(default)]
    pub queue_group: Option<String>,
    /// An existing JetStream stream to consume instead of core subjects.
    #[serde(default)]
    pub stream: Option<String>,
    /// With `stream`: only its messages on this subject.
    #[serde(default)]
    pub filter_subject: Option<String>,
    /// `s3`: every message is an S3 event notification (MinIO's and versitygw's NATS
    /// targets), one event per object record; by default CloudEvents are taken as
    /// they are and any other message becomes data.
    #[serde(default)]
    pub format: MessageFormat,
    /// With `format = "s3"`: how the store writes keys in its notifications, `url`
    /// (AWS, MinIO: `red+flower.jpg` is `red flower.jpg`) or `none` (versitygw).
    #[serde(default)]
    pub key_encoding: switchyard_connector_s3::KeyEncoding,

    /// CloudEvents `type` of messages that are not CloudEvents.
    #[serde(default = "default_event_type")]
    pub event_type: String,
    /// CloudEvents `source` of messages that are not CloudEvents; `/nats/<name>` by
    /// default.
    #[serde(default)]
    pub event_source: Option<String>,
}

fn default_event_type() -> String {
    "dev.switchyard.nats.message".to_owned()
}

impl NatsSourceConfig {
    pub fn source(&self) -> String {
        self.event_source
            .clone()
            .unwrap_or_else(|| format!("/nats/{}", self.name))
    }

    /// The durable consumer of a JetStream input.
    pub fn consumer_name(&self) -> String {
        format!("switchyard-source-{}", self.name)
    }
}

/// Turns a NATS message into its events: with `format = "s3"` one per object record
/// of the notification it carries, else the one of [`normalize`].
pub fn normalize_all(
    config: &NatsSourceConfig,
    subject: &str,
    headers: Option<&HeaderMap>,
    payload: Bytes,
    id: String,
) -> Result<Vec<Event>, String> {
    match config.format {
        MessageFormat::Cloudevents => normalize(config, subject, headers, payload, id)
            .map(|event| vec![event])
            .map_err(|error| format!("not a valid cloudevent: {error}")),
        MessageFormat::S3 => {
            switchyard_connector_s3::object_events_with(&payload, config.key_encoding)
                .map_err(|error| format!("not a valid S3 event notification: {error}"))
        }
    }
}

/// Turns a NATS message into an event: its own CloudEvent when it carries one, else
/// the payload as data. `id` is used for messages that are not CloudEvents.
pub fn normalize(
    config: &NatsSourceConfig,
    subject: &str,
    headers: Option<&HeaderMap>,
    payload: Bytes,
    id: String,
) -> Result<Event, EventError> {
    if headers.is_some_and(|headers| headers.get("ce-specversion").is_some()) {
        return event_from_message(headers, payload);
    }
    let mut event = Event::new(id, config.source(), config.event_type.clone());
    event.subject = Some(subject.to_owned());
    event.datacontenttype = headers
        .and_then(|headers| headers.get("Content-Type"))
        .map(|value| value.as_str().to_owned())
        .filter(|value| !value.is_empty());
    event.data = payload;
    event.validate()?;
    Ok(event)
}

/// A NATS source: core NATS subjects (a queue group) or a JetStream stream (a durable
/// consumer), run and supervised by the binary.
pub struct NatsSource {
    config: Arc<NatsSourceConfig>,
    bus: Bus,
}

impl NatsSource {
    pub fn new(config: NatsSourceConfig, bus: Bus) -> Self {
        NatsSource {
            config: Arc::new(config),
            bus,
        }
    }
}

#[async_trait::async_trait]
impl Source for NatsSource {
    fn name(&self) -> &str {
        &self.config.name
    }

    fn kind(&self) -> &'static str {
        "nats"
    }

    /// Fails when a subject cannot be subscribed to or the input stream cannot be
    /// consumed (it does not exist, its consumer is refused).
    async fn run(
        &self,
        health: &dyn SourceHealth,
        shutdown: CancellationToken,
    ) -> Result<(), String> {
        let (config, bus) = (self.config.clone(), self.bus.clone());
        if config.stream.is_some() {
            run_jetstream(config, bus, health, shutdown).await
        } else {
            run_core(config, bus, health, shutdown).await
        }
    }
}

async fn run_core(
    config: Arc<NatsSourceConfig>,
    bus: Bus,
    health: &dyn SourceHealth,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let client = bus.client().clone();
    let group = config
        .queue_group
        .clone()
        .unwrap_or_else(|| format!("switchyard-{}", config.name));
    let mut subscriptions = Vec::new();
    for subject in &config.subjects {
        // One refused subject fails the whole source (and it is tried again): never
        // run with part of its subjects silently missing.
        let subscription = client
            .queue_subscribe(subject.clone(), group.clone())
            .await
            .map_err(|error| format!("subscribing to `{subject}` failed: {error}"))?;
        subscriptions.push(subscription);
    }
    health.up();
    let mut messages = futures::stream::select_all(subscriptions);
    // Publishes are pipelined: each message's events are sent in arrival order on the
    // one connection (so the stream stores them in that order), and up to
    // CORE_IN_FLIGHT messages wait for their PubAcks at once, so a burst is drained
    // from the subscription as fast as the bus takes it (one at a time, the
    // subscription's buffer would fill and the client drop what follows; drops are
    // counted in switchyard_nats_messages_dropped_total).
    let in_flight = Arc::new(tokio::sync::Semaphore::new(CORE_IN_FLIGHT));
    let tasks = tokio_util::task::TaskTracker::new();
    loop {
        let message = tokio::select! {
            message = messages.next() => match message {
                Some(message) => message,
                None => break,
            },
            () = shutdown.cancelled() => break,
        };
        let permit = in_flight
            .clone()
            .acquire_owned()
            .await
            .expect("never closed");
        let sent = send_core(&config, &bus, &message).await;
        let (config, client) = (config.clone(), client.clone());
        tasks.spawn(async move {
            let _permit = permit;
            let outcome = match sent {
                Ok((acks, ids)) => {
                    let mut stored = Ok(ids);
                    for ack in acks {
                        if let Err(error) = ack.await {
                            stored = Err(format!("event bus refused the event: {error}"));
                        }
                    }
                    stored
                }
                Err(error) => Err(error),
            };
            if let Err(error) = &outcome {
                tracing::error!(source = %config.name, subject = %message.subject, %error, stage = "publish", "nats message not accepted");
            }
            if let Some(reply) = message.reply {
                let answer = match outcome {
                    Ok(ids) => format!("ok {ids}"),
                    Err(error) => format!("error {error}"),
                };
                let _ = client.publish(reply, answer.into()).await;
            }
        });
    }
    // What was received is still published and answered.
    tasks.close();
    tasks.wait().await;
    if shutdown.is_cancelled() {
        Ok(())
    } else {
        Err("its subscriptions ended (the connection was closed)".to_owned())
    }
}

/// Messages of the core source awaiting their PubAck at once.
const CORE_IN_FLIGHT: usize = 512;

/// Sends the events of one core NATS message (in order) and returns their PubAck
/// futures with the events' ids, or why the message cannot become events.
async fn send_core(
    config: &NatsSourceConfig,
    bus: &Bus,
    message: &async_nats::Message,
) -> Result<
    (
        Vec<switchyard_bus::async_nats::jetstream::context::PublishAckFuture>,
        String,
    ),
    String,
> {
    let id = uuid::Uuid::now_v7().to_string();
    let mut events = normalize_all(
        config,
        message.subject.as_str(),
        message.headers.as_ref(),
        message.payload.clone(),
        id,
    )?;
    // Ingest spans, ended once the events are sent (their PubAcks are awaited by the
    // caller).
    let _spans = switchyard_event::telemetry::start_ingests(
        &mut events,
        switchyard_event::telemetry::SpanKind::Consumer,
        &config.name,
    );
    for event in &events {
        bus.check_event(event).map_err(|error| error.to_string())?;
    }
    let mut acks = Vec::with_capacity(events.len());
    for event in &events {
        acks.push(
            bus.send_event(event)
                .await
                .map_err(|error| error.to_string())?,
        );
    }
    let ids = events
        .iter()
        .map(|event| event.id.clone())
        .collect::<Vec<_>>()
        .join(" ");
    Ok((acks, ids))
}

/// Consumes the input stream. A receive error (a reconnect, missed heartbeats)
/// reopens the consumer here after a pause; when opening fails (the stream does not
/// exist, the consumer is refused) the source fails and its supervisor tries again.
async fn run_jetstream(
    config: Arc<NatsSourceConfig>,
    bus: Bus,
    health: &dyn SourceHealth,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let stream_name = config.stream.clone().unwrap_or_default();
    let mut failures = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    'consuming: loop {
        if !failures.pause(shutdown.cancelled()).await {
            return Ok(());
        }
        let consumer = async {
            let stream = bus
                .jetstream()
                .get_stream(&stream_name)
                .await
                .map_err(|error| error.to_string())?;
            stream
                .create_consumer(pull::Config {
                    durable_name: Some(config.consumer_name()),
                    description: Some(format!("switchyard source `{}`", config.name)),
                    filter_subject: config.filter_subject.clone().unwrap_or_default(),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(30),
                    max_deliver: -1,
                    max_ack_pending: 1024,
                    ..Default::default()
                })
                .await
                .map_err(|error| error.to_string())
        };
        let consumer = consumer
            .await
            .map_err(|error| format!("opening input stream `{stream_name}` failed: {error}"))?;
        // Short pull requests: after a shutdown, the server forgets this process's
        // requests within a second and hands what it returned to the next process.
        let mut messages = consumer
            .stream()
            .expires(Duration::from_secs(1))
            .messages()
            .await
            .map_err(|error| format!("consuming input stream `{stream_name}` failed: {error}"))?;
        health.up();
        loop {
            let message = tokio::select! {
                message = messages.next() => message,
                () = shutdown.cancelled() => {
                    // Messages already delivered to this client but not yet taken
                    // would otherwise wait out the ack wait (30 s) before another
                    // process gets them: hand them back now.
                    // Delayed past this process's pull requests, so they go to the next.
                    let deadline = tokio::time::Instant::now() + Duration::from_millis(100);
                    while let Ok(Some(Ok(message))) =
                        tokio::time::timeout_at(deadline, messages.next()).await
                    {
                        let _ = message
                            .ack_with(AckKind::Nak(Some(Duration::from_secs(2))))
                            .await;
                    }
                    return Ok(());
                }
            };
            let message = match message {
                Some(Ok(message)) => message,
                Some(Err(error)) => {
                    if failures.failed() {
                        tracing::warn!(source = %config.name, %error, failures = failures.failures(), stage = "consume", "receiving from the input stream failed");
                    }
                    continue 'consuming;
                }
                None => continue 'consuming,
            };
            failures.succeeded();
            forward_jetstream(&config, &bus, &stream_name, message).await;
        }
    }
}

/// Persists one JetStream input message as an event, then acknowledges the input.
async fn forward_jetstream(
    config: &NatsSourceConfig,
    bus: &Bus,
    stream_name: &str,
    message: jetstream::Message,
) {
    let sequence = message
        .info()
        .map(|info| info.stream_sequence)
        .unwrap_or_default();
    // Derived from the input's coordinates, so a re-read is deduplicated.
    let id = format!("{stream_name}-{sequence}");
    let events = match normalize_all(
        config,
        message.subject.as_str(),
        message.headers.as_ref(),
        message.payload.clone(),
        id.clone(),
    ) {
        Ok(events) => events,
        Err(error) => {
            // Redelivering cannot make it valid: dead-lettered under source:<name>.
            let event = fallback_event(config, &message, id);
            return dead_letter_input(
                config,
                bus,
                stream_name,
                sequence,
                message,
                event,
                "malformed",
                error,
            )
            .await;
        }
    };
    let mut events = events;
    let _spans = switchyard_event::telemetry::start_ingests(
        &mut events,
        switchyard_event::telemetry::SpanKind::Consumer,
        &config.name,
    );
    match bus.publish_all(events.clone()).await {
        Ok(_) => {
            let _ = message.ack().await;
        }
        Err(PublishError::Unavailable(error)) => {
            tracing::warn!(source = %config.name, stream = %stream_name, sequence, %error, stage = "publish", "event bus unavailable, input handed back");
            let _ = message
                .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                .await;
        }
        // Too large, or refused by the stream: no retry can store it.
        Err(PublishError::TooLarge(error) | PublishError::Rejected(error)) => {
            let reason = if bus_says_too_large(&events, bus) {
                "too_large"
            } else {
                "rejected"
            };
            let event = fallback_event(config, &message, id);
            dead_letter_input(
                config,
                bus,
                stream_name,
                sequence,
                message,
                event,
                reason,
                error,
            )
            .await;
        }
    }
}

/// Whether one of `events` is larger than the bus accepts.
fn bus_says_too_large(events: &[Event], bus: &Bus) -> bool {
    events.iter().any(|event| bus.check_event(event).is_err())
}

/// The event a JetStream input that cannot become events is dead-lettered as: its
/// coordinates as id, the source's own `source` and `type`, the NATS subject as
/// `subject`, the payload as data (a dead letter moves or drops what does not fit).
fn fallback_event(config: &NatsSourceConfig, message: &jetstream::Message, id: String) -> Event {
    let mut event = Event::new(id, config.source(), config.event_type.clone());
    event.subject = Some(message.subject.to_string()).filter(|subject| !subject.is_empty());
    event.data = message.payload.clone();
    event
}

/// Stores a JetStream input as a dead letter of `source:<name>`, then terminates it in
/// its stream; if the dead letter cannot be stored, the input is handed back and tried
/// again.
#[allow(clippy::too_many_arguments)]
async fn dead_letter_input(
    config: &NatsSourceConfig,
    bus: &Bus,
    stream_name: &str,
    sequence: u64,
    message: jetstream::Message,
    event: Event,
    reason: &str,
    error: String,
) {
    match bus
        .dead_letter_input(&config.name, event, reason, &error)
        .await
    {
        Ok(()) => {
            tracing::error!(source = %config.name, stream = %stream_name, sequence, reason, %error, stage = "receive", "input message cannot become an event; dead-lettered");
            let _ = message.ack_with(AckKind::Term).await;
        }
        Err(failure) => {
            tracing::warn!(source = %config.name, stream = %stream_name, sequence, error = %failure, stage = "dead_letter", "storing the dead letter of an input failed, handing it back");
            let _ = message
                .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                .await;
        }
    }
}
