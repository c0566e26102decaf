//! The MQTT source (`type = "mqtt"`, MQTT 3.1.1): messages on subscribed topics
//! (wildcards allowed) become CloudEvents in the events stream.
//!
//! The source keeps a persistent session (`clean_session = false`, a fixed client
//! id), subscribes with QoS 1 and acknowledges each message (PUBACK, in the order they
//! came) only once its event is stored: the broker keeps what was not acknowledged,
//! and what is published while Switchyard is away, and delivers it when the source
//! is back. A lost connection fails the source, and its supervisor reconnects with
//! the shared backoff (the session is resumed).
//!
//! A message becomes an event with a new `id` (MQTT 3.1.1 carries no message id: a
//! message the broker delivers again after a crash, before its PUBACK, may be stored
//! twice), `source` `mqtt://<host>:<port>`, `subject` = its topic, `type` =
//! `event_type`, data = the payload byte for byte. A payload that is a structured
//! CloudEvent (a JSON object with `specversion`, the CloudEvents MQTT binding's mode
//! for 3.1.1) keeps its attributes.

use std::time::Duration;

use bytes::Bytes;
use rumqttc::{AsyncClient, Event as MqttEvent, MqttOptions, Packet, QoS, Transport};
use secrecy::{ExposeSecret as _, SecretString};
use serde::Deserialize;
use switchyard_bus::Bus;
use switchyard_bus::ingest::{Input, store_inputs};
use switchyard_event::{Event, Source, SourceHealth};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A `[[sources]]` entry with `type = "mqtt"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSourceConfig {
    /// Name of the source, in logs and in `source:<name>` dead letters.
    pub name: String,
    /// The broker: `mqtt://host:1883`, or `mqtts://host:8883` for TLS (checked
    /// against the system's root certificates unless `tls.ca_file` says otherwise).
    pub url: String,
    /// TLS settings for an `mqtts://` broker: `ca_file`, a client certificate
    /// (`cert_file`, `key_file`), `server_name`.
    #[serde(default)]
    pub tls: Option<switchyard_bus::tls::ClientTls>,
    /// Topic filters subscribed to (`+` and `#` wildcards).
    pub topics: Vec<String>,
    /// The session's client id: one process at a time may hold it.
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<SecretString>,
    /// How often the connection is checked when idle.
    #[serde(default = "default_keep_alive", with = "humantime_serde")]
    pub keep_alive: Duration,
    /// `type` of messages that are not CloudEvents.
    #[serde(default = "default_event_type")]
    pub event_type: String,
}

fn default_keep_alive() -> Duration {
    Duration::from_secs(30)
}

fn default_event_type() -> String {
    "dev.switchyard.mqtt.message".to_owned()
}

/// The parts of `url`: TLS or not, host, port.
fn parse_url(url: &str) -> Result<(bool, String, u16), String> {
    let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtts://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("mqtt://") {
        (false, rest)
    } else {
        return Err(format!(
            "`{url}` is not an MQTT URL like mqtt://127.0.0.1:1883 or mqtts://broker:8883"
        ));
    };
    let authority = rest.trim_end_matches('/');
    if authority.contains('@') || authority.contains('/') {
        return Err(format!(
            "`{url}`: write the broker as mqtt://host:port; credentials go in username and password"
        ));
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) => (
            host,
            port.parse()
                .map_err(|_| format!("`{url}`: `{port}` is not a port"))?,
        ),
        None => (authority, if tls { 8883 } else { 1883 }),
    };
    if host.is_empty() {
        return Err(format!("`{url}` names no host"));
    }
    Ok((tls, host.to_owned(), port))
}

impl MqttSourceConfig {
    /// Mistakes `validate` reports, as (field, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        if let Err(error) = parse_url(&self.url) {
            problems.push(("url", error));
        }
        if self.topics.is_empty() {
            problems.push((
                "topics",
                "subscribe to at least one topic filter".to_owned(),
            ));
        }
        for topic in &self.topics {
            if !rumqttc::valid_filter(topic) {
                problems.push((
                    "topics",
                    format!("`{topic}` is not an MQTT topic filter (`+` is one level, `#` the rest, last)"),
                ));
            }
        }
        if let Some(tls) = &self.tls {
            if !self.url.starts_with("mqtts://") {
                problems.push((
                    "tls",
                    "TLS settings need an mqtts:// url (this one would connect without TLS)"
                        .to_owned(),
                ));
            }
            for problem in tls.problems() {
                problems.push(("tls", problem));
            }
        }
        if self.username.is_none() && self.password.is_some() {
            problems.push(("password", "a password needs a username".to_owned()));
        }
        if self.keep_alive < Duration::from_secs(5) {
            problems.push(("keep_alive", "must be at least 5s".to_owned()));
        }
        if self.event_type.is_empty() {
            problems.push(("event_type", "must not be empty".to_owned()));
        }
        problems
    }

    /// The session's client id.
    pub fn client_id(&self) -> String {
        self.client_id
            .clone()
            .unwrap_or_else(|| format!("switchyard-{}", self.name))
    }

    /// The CloudEvents `source` of its messages.
    pub fn source(&self) -> String {
        match parse_url(&self.url) {
            Ok((tls, host, port)) => {
                format!("{}://{host}:{port}", if tls { "mqtts" } else { "mqtt" })
            }
            Err(_) => format!("mqtt://{}", self.name),
        }
    }

    fn options(&self) -> Result<MqttOptions, String> {
        let (tls, host, port) = parse_url(&self.url)?;
        let mut options = MqttOptions::new(self.client_id(), host, port);
        options
            .set_keep_alive(self.keep_alive)
            .set_clean_session(false)
            .set_manual_acks(true)
            // Payloads up to what a broker commonly allows (the bus checks its own
            // limit, and dead-letters what is over it).
            .set_max_packet_size(256 * 1024 * 1024, 256 * 1024 * 1024);
        if tls {
            let config = self.tls.clone().unwrap_or_default().rustls_config()?;
            options.set_transport(Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(std::sync::Arc::new(config)),
            ));
        }
        if let Some(username) = &self.username {
            options.set_credentials(
                username.clone(),
                self.password
                    .as_ref()
                    .map(|password| password.expose_secret().to_owned())
                    .unwrap_or_default(),
            );
        }
        Ok(options)
    }
}

/// The event of one message, or why it cannot become one (with what could be read
/// of it, for its dead letter).
pub fn to_input(config: &MqttSourceConfig, source: &str, publish: &rumqttc::Publish) -> Input {
    let id = uuid::Uuid::now_v7().to_string();
    let mut fallback = Event::new(id, source.to_owned(), config.event_type.clone());
    fallback.subject = Some(publish.topic.clone());
    fallback.data = Bytes::copy_from_slice(&publish.payload);
    let structured = publish.payload.first() == Some(&b'{')
        && serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&publish.payload)
            .is_ok_and(|object| object.contains_key("specversion"));
    let event = if structured {
        match switchyard_event::parse_structured(&fallback.data) {
            Ok(event) => event,
            Err(error) => {
                return Input::Invalid {
                    event: Box::new(fallback),
                    reason: "malformed",
                    error: format!(
                        "the message is a JSON object with `specversion` but not a valid structured CloudEvent: {error}"
                    ),
                };
            }
        }
    } else {
        fallback.clone()
    };
    if let Err(error) = event.validate() {
        return Input::Invalid {
            event: Box::new(fallback),
            reason: "malformed",
            error: error.to_string(),
        };
    }
    Input::Events(vec![event])
}

/// An MQTT subscription, run and supervised by the binary.
pub struct MqttSource {
    config: MqttSourceConfig,
    bus: Bus,
}

impl MqttSource {
    pub fn new(config: MqttSourceConfig, bus: Bus) -> Self {
        MqttSource { config, bus }
    }
}

/// How long a stopping source goes on storing (and acknowledging) what it received.
const DRAIN: Duration = Duration::from_secs(10);

/// Messages stored (then acknowledged) together at most.
const BATCH: usize = 256;

#[async_trait::async_trait]
impl Source for MqttSource {
    fn name(&self) -> &str {
        &self.config.name
    }

    fn kind(&self) -> &'static str {
        "mqtt"
    }

    /// Fails when the broker cannot be reached, refuses the connection or a
    /// subscription, or the connection is lost: the supervisor then reconnects after
    /// a pause, resuming the session.
    async fn run(
        &self,
        health: &dyn SourceHealth,
        shutdown: CancellationToken,
    ) -> Result<(), String> {
        let config = &self.config;
        let options = config.options()?;
        let source = config.source();
        // The event loop is never kept waiting (it also sends the acks: waiting for
        // room in a bounded channel while the storing task waits to ack deadlocks,
        // seen when a resumed session brings thousands of messages at once). What
        // is held is bounded by the broker's in-flight window for the session.
        let (client, mut eventloop) = AsyncClient::new(options, 1024);
        let filters: Vec<rumqttc::SubscribeFilter> = config
            .topics
            .iter()
            .map(|topic| rumqttc::SubscribeFilter::new(topic.clone(), QoS::AtLeastOnce))
            .collect();
        client
            .subscribe_many(filters)
            .await
            .map_err(|error| format!("subscribing failed: {error}"))?;
        // Received messages go to the storing task, which acknowledges them once
        // stored; the event loop keeps being polled meanwhile (it sends the acks).
        let (sender, receiver) = mpsc::unbounded_channel::<rumqttc::Publish>();
        let abandoned = CancellationToken::new();
        let storing = tokio::spawn(store_and_ack(
            config.clone(),
            self.bus.clone(),
            client.clone(),
            source,
            receiver,
            abandoned.clone(),
        ));
        let mut sender = Some(sender);
        let mut drain_until: Option<tokio::time::Instant> = None;
        let outcome = loop {
            if shutdown.is_cancelled() && drain_until.is_none() {
                // Stop taking messages (the broker keeps them for the session); go on
                // polling so the acks of what is being stored reach it.
                sender = None;
                drain_until = Some(tokio::time::Instant::now() + DRAIN);
            }
            if let Some(until) = drain_until
                && (storing.is_finished() || tokio::time::Instant::now() >= until)
            {
                break Ok(());
            }
            let event = tokio::select! {
                event = eventloop.poll() => event,
                () = shutdown.cancelled(), if drain_until.is_none() => continue,
                () = tokio::time::sleep(Duration::from_millis(100)), if drain_until.is_some() => continue,
            };
            match event {
                Ok(MqttEvent::Incoming(Packet::ConnAck(ack))) => {
                    if ack.code != rumqttc::ConnectReturnCode::Success {
                        break Err(format!("the broker refused the connection: {:?}", ack.code));
                    }
                    tracing::info!(source = %config.name, broker = %config.source(), session_present = ack.session_present, "mqtt source connected");
                }
                Ok(MqttEvent::Incoming(Packet::SubAck(ack))) => {
                    if ack
                        .return_codes
                        .iter()
                        .any(|code| matches!(code, rumqttc::SubscribeReasonCode::Failure))
                    {
                        break Err("the broker refused a subscription".to_owned());
                    }
                    // QoS 0 would be at most once, with nothing to acknowledge and no
                    // bound on what the broker sends.
                    if ack.return_codes.iter().any(|code| {
                        matches!(code, rumqttc::SubscribeReasonCode::Success(QoS::AtMostOnce))
                    }) {
                        break Err("the broker granted a subscription at QoS 0 only (at most once): allow QoS 1 for this client".to_owned());
                    }
                    health.up();
                }
                Ok(MqttEvent::Incoming(Packet::Publish(publish))) => {
                    tracing::trace!(source = %config.name, topic = %publish.topic, pkid = publish.pkid, dup = publish.dup, "message received");
                    if let Some(sender) = &sender
                        && sender.send(publish).is_err()
                    {
                        break Err("the storing task ended".to_owned());
                    }
                }
                Ok(_) => {}
                Err(error) => {
                    if drain_until.is_some() {
                        break Ok(());
                    }
                    break Err(format!(
                        "the connection to {} failed: {error}",
                        config.source()
                    ));
                }
            }
        };
        drop(sender);
        abandoned.cancel();
        // The event loop goes on being polled while the storing task ends: it sends
        // the acks the task queues (which would wait for room otherwise).
        let mut storing = storing;
        loop {
            tokio::select! {
                _ = &mut storing => break,
                polled = eventloop.poll() => if polled.is_err() {
                    // No connection to send acks on: the task's acks fail and it ends.
                    let _ = tokio::time::timeout(Duration::from_secs(1), &mut storing).await;
                    break;
                },
            }
        }
        let _ = client.try_disconnect();
        // Let the disconnect go out.
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            while eventloop.poll().await.is_ok() {}
        })
        .await;
        outcome
    }
}

/// Stores received messages in order and acknowledges each once stored.
async fn store_and_ack(
    config: MqttSourceConfig,
    bus: Bus,
    client: AsyncClient,
    source: String,
    mut receiver: mpsc::UnboundedReceiver<rumqttc::Publish>,
    abandoned: CancellationToken,
) {
    let mut batch = Vec::with_capacity(BATCH);
    while receiver.recv_many(&mut batch, BATCH).await > 0 {
        if abandoned.is_cancelled() {
            // Not stored, not acknowledged: the broker delivers them again.
            return;
        }
        let inputs: Vec<Input> = batch
            .iter()
            .map(|publish| to_input(&config, &source, publish))
            .collect();
        if store_inputs(&bus, &config.name, inputs, &abandoned)
            .await
            .is_none()
        {
            // Given up at shutdown: unacknowledged, the broker delivers them again.
            return;
        }
        tracing::trace!(source = %config.name, messages = batch.len(), "messages stored; acknowledging");
        for publish in batch.drain(..) {
            if client.try_ack(&publish).is_err() && client.ack(&publish).await.is_err() {
                return;
            }
        }
    }
}
