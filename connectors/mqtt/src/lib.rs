//! The MQTT source (`type = "mqtt"`, MQTT 3.1.1 or 5): messages on subscribed
//! topics (wildcards allowed) become CloudEvents in the events stream.
//!
//! The source keeps a persistent session (3.1.1: `clean_session = false`; 5:
//! `clean_start = false` with a session expiry; a fixed client id), subscribes with
//! QoS 1 and acknowledges each message (PUBACK, in the order they came) only once
//! its event is stored: the broker keeps what was not acknowledged, and what is
//! published while Switchyard is away, and delivers it when the source is back. A
//! lost connection fails the source, and its supervisor reconnects with the shared
//! backoff (the session is resumed).
//!
//! A message becomes an event with a new `id` (MQTT carries no message id: a
//! message the broker delivers again after a crash, before its PUBACK, may be stored
//! twice), `source` `mqtt://<host>:<port>`, `subject` = its topic, `type` =
//! `event_type`, data = the payload byte for byte; one that is a CloudEvent in the
//! binding's structured mode, or MQTT 5's binary mode, keeps its attributes (see
//! [`to_input`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

mod session;

use rumqttc::Transport;
use secrecy::{ExposeSecret as _, SecretString};
use serde::Deserialize;
pub use session::Received;
use session::{Client, EventLoop, Polled};
use switchyard_bus::Bus;
use switchyard_bus::ingest::{Claims, Input, store_inputs};
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
    /// `"3.1.1"` or `"5"`.
    #[serde(default)]
    pub protocol: Protocol,
    /// MQTT 5: how long the broker keeps the session (and queues for it) after the
    /// connection ends; it never expires when unset.
    #[serde(default, with = "humantime_serde")]
    pub session_expiry: Option<Duration>,
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

/// The MQTT version spoken to the broker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum Protocol {
    #[default]
    #[serde(rename = "3.1.1")]
    V311,
    #[serde(rename = "5", alias = "5.0")]
    V5,
}

/// MQTT 5: how many unacknowledged messages the broker may send at once (its own
/// limit may be lower: mosquitto's `max_inflight_messages`).
const RECEIVE_MAXIMUM: u16 = 1024;

/// The largest packet MQTT allows: the broker sends every message, and what is over
/// the bus's limit is dead-lettered (MQTT 5 brokers drop, unseen, messages over a
/// client's maximum).
const MAX_PACKET: u32 = 268_435_455;

fn default_keep_alive() -> Duration {
    Duration::from_secs(30)
}

fn default_event_type() -> String {
    "dev.switchyard.mqtt.message".to_owned()
}

/// The parts of `url`: TLS or not, host, port.
fn parse_url(url: &str) -> Result<(bool, String, u16), String> {
    // A URL with user info holds a password: never quoted.
    if url.contains('@') {
        return Err(
            "write the broker as mqtt://host:port (or mqtts://); credentials go in username and password, not in the URL"
                .to_owned(),
        );
    }
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
    if authority.contains('/') {
        return Err(format!(
            "`{url}`: write the broker as mqtt://host:port, without a path"
        ));
    }
    // An IPv6 address is written in brackets: `mqtt://[::1]:1883`.
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let (host, after) = bracketed
            .split_once(']')
            .ok_or_else(|| format!("`{url}`: `[` without `]`"))?;
        (host, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    let port = match port {
        Some(port) => port
            .parse()
            .map_err(|_| format!("`{url}`: `{port}` is not a port"))?,
        None => {
            if tls {
                8883
            } else {
                1883
            }
        }
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
        if let Some(expiry) = self.session_expiry {
            if self.protocol != Protocol::V5 {
                problems.push((
                    "session_expiry",
                    "is MQTT 5's (set protocol = \"5\"); a 3.1.1 session lasts until the broker expires it".to_owned(),
                ));
            }
            if expiry.as_secs() == 0 {
                problems.push((
                    "session_expiry",
                    "must be more than 0s: with 0 the broker drops the session, and the messages not acknowledged yet, whenever the connection ends".to_owned(),
                ));
            }
            if expiry.as_secs() >= u64::from(u32::MAX) {
                problems.push((
                    "session_expiry",
                    "must be under 136 years (leave it out: the session never expires)".to_owned(),
                ));
            }
        }
        if self.username.is_none() && self.password.is_some() {
            problems.push(("password", "a password needs a username".to_owned()));
        }
        if self.keep_alive < Duration::from_secs(5) {
            problems.push(("keep_alive", "must be at least 5s".to_owned()));
        }
        if self.client_id.as_deref() == Some("") {
            problems.push((
                "client_id",
                "must not be empty (a broker would give each connection a new id, and no session would be resumed)".to_owned(),
            ));
        }
        if self.event_type.is_empty() {
            problems.push(("event_type", "must not be empty".to_owned()));
        }
        problems
    }

    /// MQTT 5: the session expiry asked for, in seconds (`u32::MAX`: never).
    fn session_expiry_seconds(&self) -> u32 {
        self.session_expiry.map_or(u32::MAX, |expiry| {
            u32::try_from(expiry.as_secs()).unwrap_or(u32::MAX - 1)
        })
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
                let scheme = if tls { "mqtts" } else { "mqtt" };
                if host.contains(':') {
                    format!("{scheme}://[{host}]:{port}")
                } else {
                    format!("{scheme}://{host}:{port}")
                }
            }
            Err(_) => format!("mqtt://{}", self.name),
        }
    }

    /// A client and its event loop, not connected yet (the first poll connects).
    fn connect(&self) -> Result<(Client, EventLoop), String> {
        let (tls, host, port) = parse_url(&self.url)?;
        let transport = if tls {
            let config = self.tls.clone().unwrap_or_default().rustls_config()?;
            Some(Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(std::sync::Arc::new(config)),
            ))
        } else {
            None
        };
        let password = || {
            self.password
                .as_ref()
                .map(|password| password.expose_secret().to_owned())
                .unwrap_or_default()
        };
        // The event loop is never kept waiting (it also sends the acks: waiting for
        // room in a bounded channel while the storing task waits to ack deadlocks,
        // seen when a resumed session brings thousands of messages at once). What is
        // held is bounded by the broker's in-flight window for the session.
        match self.protocol {
            Protocol::V311 => {
                let mut options = rumqttc::MqttOptions::new(self.client_id(), host, port);
                options
                    .set_keep_alive(self.keep_alive)
                    .set_clean_session(false)
                    .set_manual_acks(true)
                    .set_max_packet_size(MAX_PACKET as usize, MAX_PACKET as usize);
                if let Some(transport) = transport {
                    options.set_transport(transport);
                }
                if let Some(username) = &self.username {
                    options.set_credentials(username.clone(), password());
                }
                let (client, eventloop) = rumqttc::AsyncClient::new(options, 1024);
                Ok((Client::V311(client), EventLoop::V311(Box::new(eventloop))))
            }
            Protocol::V5 => {
                let mut options = rumqttc::v5::MqttOptions::new(self.client_id(), host, port);
                options
                    .set_keep_alive(self.keep_alive)
                    .set_clean_start(false)
                    .set_manual_acks(true)
                    .set_session_expiry_interval(Some(self.session_expiry_seconds()))
                    .set_receive_maximum(Some(RECEIVE_MAXIMUM))
                    .set_max_packet_size(Some(MAX_PACKET));
                if let Some(transport) = transport {
                    options.set_transport(transport);
                }
                if let Some(username) = &self.username {
                    options.set_credentials(username.clone(), password());
                }
                let (client, eventloop) = rumqttc::v5::AsyncClient::new(options, 1024);
                Ok((Client::V5(client), EventLoop::V5(Box::new(eventloop))))
            }
        }
    }
}

/// The event of one message, or why it cannot become one (with what could be read
/// of it, for its dead letter).
///
/// The CloudEvents MQTT binding: in structured mode the payload is the event (MQTT
/// 5 says so with the Content Type `application/cloudevents+json`; a 3.1.1 message,
/// or a 5 one without a content type, is taken as one when it is a JSON object with
/// `specversion`); in MQTT 5's binary mode the attributes are User Properties
/// (`specversion`, `id`, ...: other User Properties, whose names are no CloudEvents
/// attribute names, are left out), the Content Type is `datacontenttype` and the
/// payload is the data. Any other message gets a new id, `source`, its topic as
/// `subject`, and MQTT 5's Content Type as `datacontenttype`.
pub fn to_input(config: &MqttSourceConfig, source: &str, message: &Received) -> Input {
    let id = uuid::Uuid::now_v7().to_string();
    let payload = message.payload();
    let mut fallback = Event::new(id, source.to_owned(), config.event_type.clone());
    fallback.subject = Some(message.topic().into_owned());
    fallback.data = payload.clone();
    fallback.datacontenttype = message.content_type().map(str::to_owned);
    let malformed = |fallback: Event, error: String| Input::Invalid {
        event: Box::new(fallback),
        reason: "malformed",
        error,
    };
    let content_type = message.content_type().unwrap_or_default();
    let user_properties = message.user_properties();
    let event = if content_type.starts_with("application/cloudevents+json")
        || (content_type.is_empty()
            && payload.first() == Some(&b'{')
            && serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(payload)
                .is_ok_and(|object| object.contains_key("specversion")))
    {
        match switchyard_event::parse_structured(payload) {
            Ok(event) => event,
            Err(error) => {
                return malformed(
                    fallback,
                    format!(
                        "the message is a structured CloudEvent by its content type or its `specversion`, but not a valid one: {error}"
                    ),
                );
            }
        }
    } else if user_properties
        .iter()
        .any(|(name, _)| name == "specversion")
    {
        let mut event = Event::new(String::new(), String::new(), String::new());
        event.datacontenttype = message.content_type().map(str::to_owned);
        event.data = payload.clone();
        for (name, value) in user_properties {
            let attribute = switchyard_event::CORE_ATTRIBUTES.contains(&name.as_str())
                || switchyard_event::is_valid_extension_name(name);
            if !attribute || name == "datacontenttype" {
                continue;
            }
            if let Err(error) = event.set_attribute(name, value.clone()) {
                return malformed(
                    fallback,
                    format!(
                        "the message is a binary-mode CloudEvent (a `specversion` User Property) but not a valid one: {error}"
                    ),
                );
            }
        }
        event
    } else {
        fallback.clone()
    };
    if let Err(error) = event.validate() {
        return malformed(fallback, error.to_string());
    }
    Input::Events(vec![event])
}

/// An MQTT subscription, run and supervised by the binary.
pub struct MqttSource {
    config: MqttSourceConfig,
    bus: Bus,
    claims: Claims,
    /// Connected once already: a later connection without a session is worth a
    /// warning.
    connected_before: AtomicBool,
}

impl MqttSource {
    /// `claims`: what the source may not produce (the other doors' sources).
    pub fn new(config: MqttSourceConfig, bus: Bus, claims: Claims) -> Self {
        MqttSource {
            config,
            bus,
            claims,
            connected_before: AtomicBool::new(false),
        }
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
        let (client, mut eventloop) = config.connect()?;
        let source = config.source();
        client.subscribe(&config.topics).await?;
        // Received messages go to the storing task, which acknowledges them once
        // stored; the event loop keeps being polled meanwhile (it sends the acks).
        let (sender, receiver) = mpsc::unbounded_channel::<Received>();
        let abandoned = CancellationToken::new();
        let mut storing = tokio::spawn(store_and_ack(
            config.clone(),
            self.bus.clone(),
            self.claims.clone(),
            client.clone(),
            source,
            receiver,
            abandoned.clone(),
        ));
        let mut sender = Some(sender);
        let mut drain_until: Option<tokio::time::Instant> = None;
        // Set once the connection failed: rumqttc reconnects at the next poll, and
        // the acks still queued must not go out on a new connection (the broker may
        // have given their packet ids to other messages meanwhile).
        let mut lost = false;
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
            let polled = tokio::select! {
                polled = eventloop.poll() => polled,
                () = shutdown.cancelled(), if drain_until.is_none() => continue,
                () = tokio::time::sleep(Duration::from_millis(100)), if drain_until.is_some() => continue,
            };
            match polled {
                Ok(Polled::Connected {
                    session_present,
                    session_expiry,
                }) => {
                    let resumed = self.connected_before.swap(true, Ordering::SeqCst);
                    tracing::info!(source = %config.name, broker = %config.source(), session_present, "mqtt source connected");
                    if resumed && !session_present {
                        tracing::warn!(source = %config.name, client_id = %config.client_id(), "the broker kept no session for this client id: what was published while the source was away was not queued for it (the session expired, the broker lost it, or another client took the id)");
                    }
                    if let Some(granted) = session_expiry
                        && granted < config.session_expiry_seconds()
                    {
                        tracing::warn!(source = %config.name, granted_seconds = granted, "the broker keeps the session for less than asked after a disconnect: messages published while the source is away longer are lost to it");
                    }
                }
                Ok(Polled::Subscribed(Ok(()))) => health.up(),
                Ok(Polled::Subscribed(Err(error))) => break Err(error),
                Ok(Polled::Message(message)) => {
                    tracing::trace!(source = %config.name, topic = %message.topic(), pkid = message.pkid(), dup = message.dup(), "message received");
                    if let Some(sender) = &sender
                        && sender.send(message).is_err()
                    {
                        break Err("the storing task ended".to_owned());
                    }
                }
                Ok(Polled::Disconnected | Polled::Other) => {}
                Err(error) => {
                    lost = true;
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
        if !lost {
            // The event loop goes on being polled while the storing task ends: it
            // sends the acks the task queues (which would wait for room otherwise).
            // A failure or a reconnect ends that: unacknowledged, the messages come
            // again.
            loop {
                tokio::select! {
                    _ = &mut storing => break,
                    polled = eventloop.poll() => if matches!(polled, Err(_) | Ok(Polled::Connected { .. })) {
                        lost = true;
                        break;
                    },
                }
            }
        }
        if !storing.is_finished() {
            storing.abort();
        }
        // Ended (or aborted: not acknowledged, delivered again), so nothing it did
        // overlaps the next run's storing.
        let _ = (&mut storing).await;
        if !lost {
            // The acks queued go out before the DISCONNECT (one channel, in order).
            client.try_disconnect();
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                while let Ok(polled) = eventloop.poll().await {
                    if matches!(polled, Polled::Disconnected | Polled::Connected { .. }) {
                        break;
                    }
                }
            })
            .await;
        }
        outcome
    }
}

/// Stores received messages in order and acknowledges each once stored.
async fn store_and_ack(
    config: MqttSourceConfig,
    bus: Bus,
    claims: Claims,
    client: Client,
    source: String,
    mut receiver: mpsc::UnboundedReceiver<Received>,
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
        if store_inputs(&bus, &config.name, &claims, inputs, &abandoned)
            .await
            .is_none()
        {
            // Given up at shutdown: unacknowledged, the broker delivers them again.
            return;
        }
        tracing::trace!(source = %config.name, messages = batch.len(), "messages stored; acknowledging");
        for message in batch.drain(..) {
            if !client.ack(&message).await {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::v5::mqttbytes::v5::{Publish, PublishProperties};

    fn config() -> MqttSourceConfig {
        toml::from_str(
            r##"name = "sensors"
url = "mqtt://127.0.0.1:1883"
topics = ["#"]
protocol = "5"
"##,
        )
        .unwrap()
    }

    fn v5(payload: &str, content_type: Option<&str>, properties: &[(&str, &str)]) -> Received {
        Received::V5(Publish::new(
            "sensors/kitchen",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            payload.to_owned(),
            Some(PublishProperties {
                content_type: content_type.map(str::to_owned),
                user_properties: properties
                    .iter()
                    .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
                    .collect(),
                ..Default::default()
            }),
        ))
    }

    fn event(input: Input) -> Event {
        match input {
            Input::Events(mut events) => events.remove(0),
            Input::Invalid { error, .. } => panic!("invalid: {error}"),
        }
    }

    #[test]
    fn binary_mode_takes_attributes_from_user_properties() {
        let event = event(to_input(
            &config(),
            "mqtt://127.0.0.1:1883",
            &v5(
                "21.5",
                Some("text/plain"),
                &[
                    ("specversion", "1.0"),
                    ("id", "reading-1"),
                    ("source", "/sensors/kitchen"),
                    ("type", "com.example.reading"),
                    (
                        "traceparent",
                        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                    ),
                    ("App-Header", "not an attribute name"),
                ],
            ),
        ));
        assert_eq!(event.id, "reading-1");
        assert_eq!(event.source, "/sensors/kitchen");
        assert_eq!(event.ty, "com.example.reading");
        assert_eq!(event.subject, None);
        assert_eq!(event.datacontenttype.as_deref(), Some("text/plain"));
        assert_eq!(&event.data[..], b"21.5");
        assert_eq!(event.extensions.keys().collect::<Vec<_>>(), ["traceparent"]);
    }

    #[test]
    fn structured_mode_by_content_type_and_plain_messages() {
        let structured = event(to_input(
            &config(),
            "mqtt://127.0.0.1:1883",
            &v5(
                r#"{"specversion":"1.0","id":"s-1","source":"/s","type":"t","data":1}"#,
                Some("application/cloudevents+json; charset=utf-8"),
                &[],
            ),
        ));
        assert_eq!(structured.id, "s-1");
        let plain = event(to_input(
            &config(),
            "mqtt://127.0.0.1:1883",
            &v5(
                r#"{"celsius":21.5}"#,
                Some("application/json"),
                &[("unit", "c")],
            ),
        ));
        assert_eq!(plain.source, "mqtt://127.0.0.1:1883");
        assert_eq!(plain.subject.as_deref(), Some("sensors/kitchen"));
        assert_eq!(plain.datacontenttype.as_deref(), Some("application/json"));
        assert!(plain.extensions.is_empty());
    }

    #[test]
    fn a_binary_mode_event_without_an_id_or_of_another_version_is_malformed() {
        for properties in [
            &[("specversion", "1.0"), ("source", "/s"), ("type", "t")][..],
            &[
                ("specversion", "0.3"),
                ("id", "1"),
                ("source", "/s"),
                ("type", "t"),
            ][..],
        ] {
            match to_input(&config(), "mqtt://h:1", &v5("x", None, properties)) {
                Input::Invalid { reason, event, .. } => {
                    assert_eq!(reason, "malformed");
                    assert_eq!(&event.data[..], b"x");
                }
                Input::Events(events) => panic!("accepted: {events:?}"),
            }
        }
        let structured = to_input(
            &config(),
            "mqtt://h:1",
            &v5("not json", Some("application/cloudevents+json"), &[]),
        );
        assert!(matches!(structured, Input::Invalid { .. }));
    }
}
