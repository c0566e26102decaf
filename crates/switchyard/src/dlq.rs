//! Dead-letter operations behind `switchyard dlq`: list a trigger's dead letters,
//! show one whole, replay some back to their trigger, purge them.
//!
//! A replay publishes the event to the trigger's direct subject with a fresh
//! `Nats-Msg-Id`, so the duplicate window does not swallow it and no other trigger
//! sees it again. The dead letter stays in place and the replay is recorded beside it
//! (key-value bucket `SWITCHYARD_DLQ_REPLAYS`), so `list` shows what was replayed.

use std::time::Duration;

use anyhow::{Context as _, bail};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use switchyard_bus::async_nats::jetstream::{self, consumer::pull, kv};
use switchyard_bus::{Bus, DeadLetter};

pub const REPLAYS_BUCKET: &str = "SWITCHYARD_DLQ_REPLAYS";

/// A record of a dead letter's replays.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReplayRecord {
    pub count: u64,
    pub last_replayed_at: String,
}

/// One dead letter with its place in the dead-letter stream.
#[derive(Debug, Clone)]
pub struct Entry {
    pub sequence: u64,
    pub dead_letter: DeadLetter,
    pub replays: Option<ReplayRecord>,
    /// What was stored is not a CloudEvent (reason `malformed`): `dead_letter.event` is
    /// a placeholder carrying the payload, these are the message's headers as stored.
    pub malformed_headers: Option<Vec<(String, String)>>,
    /// Why the stored event is not whole (its data was dropped, or its attributes cut
    /// short, to fit the stream): such a dead letter is shown, not replayed.
    pub incomplete: Option<String>,
}

/// Why a stored dead letter is not the whole event, if it is not.
fn incompleteness(
    headers: Option<&switchyard_bus::async_nats::HeaderMap>,
    payload: &bytes::Bytes,
) -> Option<String> {
    let header = |name: &str| {
        headers
            .and_then(|headers| headers.get(name))
            .map(|value| value.as_str().to_owned())
    };
    if let Some(size) = header("Switchyard-Dlq-Data-Dropped") {
        return Some(format!("its data ({size} bytes) was too large to keep"));
    }
    if header("Switchyard-Dlq-Stored-As").as_deref() == Some("structured") && payload.is_empty() {
        return Some("its attributes were too large and were cut short".to_owned());
    }
    None
}

/// The headers of a stored message, for showing a malformed dead letter.
fn header_pairs(headers: Option<&switchyard_bus::async_nats::HeaderMap>) -> Vec<(String, String)> {
    headers
        .map(|headers| {
            headers
                .iter()
                .flat_map(|(name, values)| {
                    let name = name.to_string();
                    values
                        .iter()
                        .map(move |value| (name.clone(), value.as_str().to_owned()))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The entry of a stored dead letter: parsed, or kept as it is when it is not a
/// CloudEvent.
fn entry_of(
    sequence: u64,
    headers: Option<&switchyard_bus::async_nats::HeaderMap>,
    payload: bytes::Bytes,
    replays: Option<ReplayRecord>,
) -> Entry {
    let incomplete = incompleteness(headers, &payload);
    match DeadLetter::from_message(headers, payload.clone()) {
        Ok(dead_letter) => Entry {
            sequence,
            dead_letter,
            replays,
            malformed_headers: None,
            incomplete,
        },
        Err(_) => Entry {
            sequence,
            dead_letter: DeadLetter::malformed_from_message(headers, payload),
            replays,
            malformed_headers: Some(header_pairs(headers)),
            incomplete,
        },
    }
}

async fn replays_bucket(bus: &Bus) -> anyhow::Result<kv::Store> {
    bus.jetstream()
        .create_or_update_key_value(kv::Config {
            bucket: REPLAYS_BUCKET.to_owned(),
            description: "replays of dead letters".to_owned(),
            history: 1,
            max_age: Duration::from_secs(90 * 24 * 3600),
            num_replicas: bus.replicas(),
            ..Default::default()
        })
        .await
        .context("opening the replays bucket")
}

/// The KV key of a dead letter's replay record. KV keys cannot hold `:`: a source's
/// `source:<name>` becomes `source=<name>` (names have no `=`).
fn replay_key(trigger: &str, sequence: u64) -> String {
    format!("{}.{sequence}", trigger.replace(':', "="))
}

async fn dead_letter_stream(bus: &Bus) -> anyhow::Result<jetstream::stream::Stream> {
    bus.jetstream()
        .get_stream(bus.dead_letter_stream())
        .await
        .with_context(|| format!("opening stream `{}`", bus.dead_letter_stream()))
}

/// Every dead letter of `trigger`, oldest first.
pub async fn list(bus: &Bus, trigger: &str) -> anyhow::Result<Vec<Entry>> {
    list_page(bus, trigger, 0, u64::MAX).await
}

/// At most `limit` dead letters of `trigger` whose sequence is after `after`,
/// oldest first.
pub async fn list_page(
    bus: &Bus,
    trigger: &str,
    after: u64,
    limit: u64,
) -> anyhow::Result<Vec<Entry>> {
    let stream = dead_letter_stream(bus).await?;
    let replays = replays_bucket(bus).await?;
    let consumer = stream
        .create_consumer(pull::Config {
            filter_subject: bus.subjects().dead_letter(trigger),
            deliver_policy: match after {
                0 => jetstream::consumer::DeliverPolicy::All,
                after => jetstream::consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: after.saturating_add(1),
                },
            },
            ack_policy: jetstream::consumer::AckPolicy::None,
            inactive_threshold: Duration::from_secs(30),
            ..Default::default()
        })
        .await
        .context("reading the dead letters")?;
    let mut remaining = consumer.cached_info().num_pending.min(limit);
    let mut entries = Vec::new();
    while remaining > 0 {
        let mut batch = consumer
            .fetch()
            .max_messages(remaining.min(512) as usize)
            .messages()
            .await
            .context("reading the dead letters")?;
        let mut received = 0;
        while let Some(message) = batch.next().await {
            let message =
                message.map_err(|error| anyhow::anyhow!("reading the dead letters: {error}"))?;
            received += 1;
            let sequence = message
                .info()
                .map(|info| info.stream_sequence)
                .unwrap_or_default();
            let replays = replays
                .get(replay_key(trigger, sequence))
                .await
                .ok()
                .flatten()
                .and_then(|value| serde_json::from_slice(&value).ok());
            entries.push(entry_of(
                sequence,
                message.headers.as_ref(),
                message.payload.clone(),
                replays,
            ));
        }
        if received == 0 {
            break;
        }
        remaining = remaining.saturating_sub(received);
    }
    Ok(entries)
}

/// One dead letter by its sequence in the dead-letter stream.
pub async fn show(bus: &Bus, trigger: &str, sequence: u64) -> anyhow::Result<Entry> {
    let stream = dead_letter_stream(bus).await?;
    let message = stream
        .get_raw_message(sequence)
        .await
        .with_context(|| format!("no dead letter with sequence {sequence}"))?;
    if message.subject.as_str() != bus.subjects().dead_letter(trigger) {
        bail!(
            "dead letter {sequence} belongs to another trigger (subject `{}`)",
            message.subject
        );
    }
    let replays = replays_bucket(bus)
        .await?
        .get(replay_key(trigger, sequence))
        .await
        .ok()
        .flatten()
        .and_then(|value| serde_json::from_slice(&value).ok());
    Ok(entry_of(
        sequence,
        Some(&message.headers),
        message.payload.clone(),
        replays,
    ))
}

/// Replays dead letters, waiting for each publish to be stored, and records each
/// replay. A trigger's dead letters go back to that trigger only; a source's
/// (`source:<name>`: inputs that could not be stored) go through the events stream to
/// every trigger that matches them. A malformed dead letter (not a CloudEvent) is
/// refused. Returns how many were replayed.
pub async fn replay(bus: &Bus, trigger: &str, entries: &[Entry]) -> anyhow::Result<usize> {
    if let Some(entry) = entries
        .iter()
        .find(|entry| entry.malformed_headers.is_some())
    {
        bail!(
            "dead letter {} is not a CloudEvent (reason `{}`): it cannot be replayed; `dlq show` it, fix it and send it again",
            entry.sequence,
            entry.dead_letter.reason
        );
    }
    if let Some((entry, why)) = entries
        .iter()
        .find_map(|entry| Some((entry, entry.incomplete.as_ref()?)))
    {
        bail!(
            "dead letter {} is not the whole event ({why}): it cannot be replayed as it was; `dlq show` it and send the event again",
            entry.sequence
        );
    }
    let replays = replays_bucket(bus).await?;
    let now = time::OffsetDateTime::now_utc();
    for entry in entries {
        let replay_id = format!(
            "replay {} {} {}",
            trigger,
            entry.sequence,
            now.unix_timestamp_nanos()
        );
        let sent = if trigger.starts_with("source:") {
            bus.send_event_as(&entry.dead_letter.event, &replay_id)
                .await
        } else {
            bus.send_direct(trigger, &entry.dead_letter.event, &replay_id)
                .await
        };
        let ack = sent.with_context(|| format!("replaying dead letter {}", entry.sequence))?;
        ack.await
            .with_context(|| format!("replaying dead letter {}", entry.sequence))?;
        let record = ReplayRecord {
            count: entry.replays.as_ref().map_or(0, |record| record.count) + 1,
            last_replayed_at: switchyard_event::timestamp::rfc3339(now),
        };
        replays
            .put(
                replay_key(trigger, entry.sequence),
                serde_json::to_vec(&record)?.into(),
            )
            .await
            .with_context(|| format!("recording the replay of dead letter {}", entry.sequence))?;
    }
    Ok(entries.len())
}

/// Why an event of a removed trigger was dead-lettered by `dlq drain`.
pub const REASON_TRIGGER_REMOVED: &str = "trigger_removed";

/// Moves every event the consumers of removed trigger `trigger` still hold into its
/// dead letters (reason `trigger_removed`, the attempt history the event carried),
/// then deletes those consumers. Events delivered to a process that died come back
/// after the consumer's ack wait: this waits for them (up to the ack wait and 10 s).
/// Returns how many events were moved.
pub async fn drain(bus: &Bus, trigger: &str) -> anyhow::Result<usize> {
    use switchyard_dispatcher::ConsumerRole;
    let stream = bus
        .jetstream()
        .get_stream(bus.events_stream())
        .await
        .with_context(|| format!("opening stream `{}`", bus.events_stream()))?;
    let mut names = Vec::new();
    let mut listing = stream.consumer_names();
    while let Some(name) = listing.next().await {
        let name = name.context("listing consumers")?;
        if ConsumerRole::parse(&name).is_some_and(|(owner, _)| owner == trigger) {
            names.push(name);
        }
    }
    if names.is_empty() {
        bail!(
            "trigger `{trigger}` has no consumers on stream `{}`",
            bus.events_stream()
        );
    }
    let positions = switchyard_dispatcher::consumers::Positions::open(
        bus,
        stream.cached_info().created.unix_timestamp_nanos(),
    )
    .await?;
    let mut drained = 0;
    for name in names {
        let mut consumer: jetstream::consumer::PullConsumer = stream
            .get_consumer(&name)
            .await
            .map_err(|error| anyhow::anyhow!("opening consumer `{name}`: {error}"))?;
        let ack_wait = consumer.cached_info().config.ack_wait;
        let deadline = tokio::time::Instant::now() + ack_wait + Duration::from_secs(10);
        loop {
            let info = consumer
                .info()
                .await
                .context("reading the consumer")?
                .clone();
            if info.num_pending == 0 && info.num_ack_pending == 0 {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "consumer `{name}` still has {} events delivered to a process that has not settled them: stop every process running trigger `{trigger}` and drain again",
                    info.num_ack_pending
                );
            }
            let mut batch = consumer
                .fetch()
                .max_messages(256)
                .expires(Duration::from_secs(1))
                .messages()
                .await
                .context("reading the consumer")?;
            while let Some(message) = batch.next().await {
                let message =
                    message.map_err(|error| anyhow::anyhow!("reading the consumer: {error}"))?;
                let (headers, payload) = removed_dead_letter(bus, trigger, &message);
                bus.store(bus.subjects().dead_letter(trigger), headers, payload)
                    .await
                    .with_context(|| format!("storing a dead letter of `{trigger}`"))?;
                message
                    .double_ack()
                    .await
                    .map_err(|error| anyhow::anyhow!("acknowledging a drained event: {error}"))?;
                drained += 1;
            }
        }
        stream
            .delete_consumer(&name)
            .await
            .with_context(|| format!("deleting consumer `{name}`"))?;
        positions.forget(&name).await;
    }
    Ok(drained)
}

/// The dead letter of an event a removed trigger held: the event with its attempt
/// history, or the message as it was when it is not a CloudEvent.
fn removed_dead_letter(
    bus: &Bus,
    trigger: &str,
    message: &jetstream::Message,
) -> (switchyard_bus::async_nats::HeaderMap, bytes::Bytes) {
    let info = message.info().ok();
    let sequence = info.as_ref().map_or(0, |info| info.stream_sequence);
    let received_at = info
        .as_ref()
        .map(|info| switchyard_event::timestamp::rfc3339(info.published))
        .unwrap_or_default();
    let state = switchyard_bus::RetryState::from_headers(message.headers.as_ref());
    let now = switchyard_event::timestamp::now_rfc3339();
    match switchyard_bus::event_from_message(message.headers.as_ref(), message.payload.clone()) {
        Ok(event) => DeadLetter {
            event,
            reason: REASON_TRIGGER_REMOVED.to_owned(),
            trigger: trigger.to_owned(),
            function: String::new(),
            attempts: state.attempts,
            last_status: state.last_status,
            last_error: state
                .last_error
                .unwrap_or_else(|| "the trigger was removed from the configuration".to_owned()),
            first_attempt_at: state.first_attempt_at,
            last_attempt_at: now,
            received_at: state.received_at.unwrap_or(received_at),
            event_sequence: sequence,
        }
        .to_message_within(bus.max_payload()),
        Err(_) => {
            let mut headers = switchyard_bus::async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", format!("dlq {trigger} {sequence}"));
            headers.insert("Switchyard-Dlq-Reason", REASON_TRIGGER_REMOVED);
            headers.insert("Switchyard-Dlq-Trigger", trigger);
            headers.insert("Switchyard-Dlq-Event-Sequence", sequence.to_string());
            (headers, message.payload.clone())
        }
    }
}

/// Removes the given dead letters, or every dead letter of the trigger when
/// `sequences` is `None`. Returns how many were removed.
pub async fn purge(bus: &Bus, trigger: &str, sequences: Option<&[u64]>) -> anyhow::Result<u64> {
    let stream = dead_letter_stream(bus).await?;
    match sequences {
        None => {
            let response = stream
                .purge()
                .filter(bus.subjects().dead_letter(trigger))
                .await
                .context("purging dead letters")?;
            Ok(response.purged)
        }
        Some(sequences) => {
            let mut removed = 0;
            for &sequence in sequences {
                // Refuse to delete another trigger's dead letter by mistake.
                show(bus, trigger, sequence).await?;
                if stream
                    .delete_message(sequence)
                    .await
                    .with_context(|| format!("deleting dead letter {sequence}"))?
                {
                    removed += 1;
                }
            }
            Ok(removed)
        }
    }
}

/// A dead letter as JSON, for `dlq show`.
pub fn entry_json(entry: &Entry) -> serde_json::Value {
    let dead_letter = &entry.dead_letter;
    let event: serde_json::Value =
        serde_json::from_slice(&switchyard_event::to_structured_json(&dead_letter.event))
            .unwrap_or_default();
    serde_json::json!({
        "sequence": entry.sequence,
        "trigger": dead_letter.trigger,
        "function": dead_letter.function,
        "reason": dead_letter.reason,
        "attempts": dead_letter.attempts,
        "last_status": dead_letter.last_status,
        "last_error": dead_letter.last_error,
        "first_attempt_at": dead_letter.first_attempt_at,
        "last_attempt_at": dead_letter.last_attempt_at,
        "received_at": dead_letter.received_at,
        "replays": entry.replays,
        "event": event,
        "incomplete": entry.incomplete,
        "malformed_headers": entry.malformed_headers.as_ref().map(|headers| {
            headers
                .iter()
                .map(|(name, value)| serde_json::json!([name, value]))
                .collect::<Vec<_>>()
        }),
    })
}
