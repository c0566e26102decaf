//! The AMQP 0-9-1 source (`type = "amqp"`, RabbitMQ): deliveries of a queue become
//! CloudEvents in the events stream.
//!
//! The source consumes one durable queue (declared, and bound to an exchange, when
//! asked) with manual acknowledgement and a prefetch window as backpressure: at most
//! `prefetch` deliveries are unacknowledged at once. Deliveries are stored in the
//! order they came, then acknowledged (one `basic.ack` with `multiple` for a run of
//! them); while the bus cannot store them they stay unacknowledged, and if the
//! source stops or dies first the broker requeues them. A lost connection fails the
//! source and its supervisor reconnects with the shared backoff.
//!
//! A delivery becomes an event with `id` = its `message-id` property (set it, and a
//! redelivery after a crash is dropped by the duplicate window; without one each
//! delivery gets a new id, so a redelivered message may be stored twice), `source`
//! `amqp://<host>:<port>/<vhost, URL-encoded>/<queue>`, `type` = `event_type` (or the
//! `type` property),
//! `time` = the `timestamp` property, `datacontenttype` = `content-type`, data = the
//! body byte for byte. A delivery in the CloudEvents AMQP binding keeps its
//! attributes: binary mode (`cloudEvents:`/`cloudEvents_` application properties) or
//! structured mode (`content-type: application/cloudevents+json`). With
//! `keep_records` (a trigger has `payload = "aws"`), the delivery's AMQP fields are
//! kept in the `amqpmessage` extension, for Lambda's RabbitMQ event.

use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use futures::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use secrecy::{ExposeSecret as _, SecretString};
use serde::Deserialize;
use switchyard_bus::Bus;
use switchyard_bus::ingest::{Claims, Input, store_inputs};
use switchyard_event::{Event, Source, SourceHealth};
use tokio_util::sync::CancellationToken;

/// The extension a delivery's event keeps its AMQP fields in (for Lambda's RabbitMQ
/// event).
pub const AMQP_MESSAGE: &str = "amqpmessage";

/// A `[[sources]]` entry with `type = "amqp"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpSourceConfig {
    /// Name of the source, in logs and in `source:<name>` dead letters.
    pub name: String,
    /// The broker, `amqp://user:password@host:5672/vhost` (`amqps://` for TLS). It
    /// holds a password: write it as `${VAR}`; it is never logged.
    pub url: SecretString,
    /// The queue consumed.
    pub queue: String,
    /// Declare the queue (durable) if it does not exist.
    #[serde(default = "default_true")]
    pub declare: bool,
    /// Bind the queue to this exchange (which must exist), with `routing_keys`.
    #[serde(default)]
    pub exchange: Option<String>,
    #[serde(default = "default_routing_keys")]
    pub routing_keys: Vec<String>,
    /// Deliveries unacknowledged at once (`basic.qos`).
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
    /// `type` of deliveries that are not CloudEvents and have no `type` property.
    #[serde(default = "default_event_type")]
    pub event_type: String,
    /// Set by Switchyard when a trigger hands events to a handler as AWS shapes them.
    #[serde(skip)]
    pub keep_records: bool,
}

fn default_true() -> bool {
    true
}

fn default_routing_keys() -> Vec<String> {
    vec!["#".to_owned()]
}

fn default_prefetch() -> u16 {
    256
}

fn default_event_type() -> String {
    "dev.switchyard.amqp.message".to_owned()
}

impl AmqpSourceConfig {
    /// The broker's URI. amq-protocol-uri takes the host from the URL's domain, so an
    /// IP address (`amqp://10.0.0.5/`) would become `localhost`: the host is taken
    /// from the URL here instead.
    pub fn uri(&self) -> Result<lapin::uri::AMQPUri, String> {
        let text = self.url.expose_secret();
        let mut uri: lapin::uri::AMQPUri = text.parse().map_err(|error: String| {
            // The library's message may quote the whole URL, password included.
            error.replace(text, "<url>")
        })?;
        let parsed = url::Url::parse(text).map_err(|error| error.to_string())?;
        if let Some(host) = parsed.host_str() {
            uri.authority.host = host.to_owned();
        }
        Ok(uri)
    }

    /// Mistakes `validate` reports, as (field, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        if let Err(error) = self.uri() {
            problems.push((
                "url",
                format!("not an AMQP URL like amqp://user:password@host:5672/%2f ({error})"),
            ));
        }
        if self.queue.is_empty() || self.queue.len() > 255 {
            problems.push(("queue", "must be 1 to 255 bytes".to_owned()));
        }
        if self.prefetch == 0 {
            problems.push((
                "prefetch",
                "must be at least 1 (0 would let the broker send everything at once)".to_owned(),
            ));
        }
        if self.event_type.is_empty() {
            problems.push(("event_type", "must not be empty".to_owned()));
        }
        problems
    }

    /// The broker as events and logs name it, without credentials:
    /// `amqp://host:port/<vhost, URL-encoded>`.
    pub fn broker(&self) -> String {
        match self.uri() {
            Ok(uri) => format!(
                "amqp://{}:{}/{}",
                uri.authority.host,
                uri.authority.port,
                uri.vhost.replace('%', "%25").replace('/', "%2f")
            ),
            Err(_) => "amqp://unknown".to_owned(),
        }
    }

    /// The CloudEvents `source` of its deliveries: `<broker>/<queue>`.
    pub fn source(&self) -> String {
        format!("{}/{}", self.broker(), self.queue)
    }
}

/// An error's text with the URL (and its password) taken out, should it quote them.
fn redact(error: &dyn std::fmt::Display, url: &str) -> String {
    let mut text = error.to_string().replace(url, "<url>");
    if let Ok(parsed) = url::Url::parse(url)
        && let Some(password) = parsed.password()
        && !password.is_empty()
    {
        text = text.replace(password, "***");
    }
    text
}

/// An AMQP value as JSON: strings as text (bytes that are not UTF-8 in base64),
/// numbers, booleans, tables and arrays as themselves.
fn value_json(value: &AMQPValue) -> serde_json::Value {
    use serde_json::Value;
    match value {
        AMQPValue::Boolean(value) => Value::from(*value),
        AMQPValue::ShortShortInt(value) => Value::from(*value),
        AMQPValue::ShortShortUInt(value) => Value::from(*value),
        AMQPValue::ShortInt(value) => Value::from(*value),
        AMQPValue::ShortUInt(value) => Value::from(*value),
        AMQPValue::LongInt(value) => Value::from(*value),
        AMQPValue::LongUInt(value) => Value::from(*value),
        AMQPValue::LongLongInt(value) => Value::from(*value),
        AMQPValue::Float(value) => Value::from(*value),
        AMQPValue::Double(value) => Value::from(*value),
        AMQPValue::DecimalValue(value) => {
            Value::from(f64::from(value.value) / 10f64.powi(i32::from(value.scale)))
        }
        AMQPValue::ShortString(value) => Value::from(value.as_str()),
        AMQPValue::LongString(value) => match std::str::from_utf8(value.as_bytes()) {
            Ok(text) => Value::from(text),
            Err(_) => {
                Value::from(base64::engine::general_purpose::STANDARD.encode(value.as_bytes()))
            }
        },
        AMQPValue::FieldArray(values) => {
            Value::Array(values.as_slice().iter().map(value_json).collect())
        }
        AMQPValue::Timestamp(value) => Value::from(*value),
        AMQPValue::FieldTable(table) => table_json(table),
        AMQPValue::ByteArray(bytes) => {
            Value::from(base64::engine::general_purpose::STANDARD.encode(bytes.as_slice()))
        }
        AMQPValue::Void => Value::Null,
    }
}

fn table_json(table: &FieldTable) -> serde_json::Value {
    serde_json::Value::Object(
        table
            .inner()
            .iter()
            .map(|(name, value)| (name.as_str().to_owned(), value_json(value)))
            .collect(),
    )
}

/// A header value as a CloudEvents attribute's text.
fn value_text(value: &AMQPValue) -> String {
    match value_json(value) {
        serde_json::Value::String(text) => text,
        other => other.to_string(),
    }
}

/// The event of one delivery, or why it cannot become one (with what could be read
/// of it, for its dead letter).
pub fn to_input(
    config: &AmqpSourceConfig,
    source: &str,
    delivery: &lapin::message::Delivery,
) -> Input {
    let properties = &delivery.properties;
    let id = properties
        .message_id()
        .as_ref()
        .map(|id| id.as_str().to_owned())
        .filter(|id| !id.is_empty())
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    // An empty content type says nothing.
    let content_type = properties
        .content_type()
        .as_ref()
        .map(|value| value.as_str().to_owned())
        .filter(|value| !value.is_empty());
    let data = Bytes::copy_from_slice(&delivery.data);
    let ty = properties
        .kind()
        .as_ref()
        .map(|kind| kind.as_str().to_owned())
        .filter(|kind| !kind.is_empty())
        .unwrap_or_else(|| config.event_type.clone());
    let mut fallback = Event::new(id.clone(), source.to_owned(), ty);
    fallback.data = data.clone();
    fallback.datacontenttype = content_type.clone();
    let headers = properties.headers().as_ref();
    let binding: Vec<(String, String)> = headers
        .map(|headers| {
            headers
                .inner()
                .iter()
                .filter_map(|(name, value)| {
                    let name = name.as_str();
                    let attribute = name
                        .strip_prefix("cloudEvents:")
                        .or_else(|| name.strip_prefix("cloudEvents_"))?;
                    Some((attribute.to_ascii_lowercase(), value_text(value)))
                })
                .collect()
        })
        .unwrap_or_default();
    let invalid = |fallback: Event, error: String| Input::Invalid {
        event: Box::new(fallback),
        reason: "malformed",
        error,
    };
    let mut event = if content_type
        .as_deref()
        .is_some_and(|content_type| content_type.starts_with("application/cloudevents+json"))
    {
        match switchyard_event::parse_structured(&data) {
            Ok(event) => event,
            Err(error) => {
                return invalid(
                    fallback,
                    format!("the delivery is not a valid structured CloudEvent: {error}"),
                );
            }
        }
    } else if !binding.is_empty() {
        // Binary mode: the attributes are application properties.
        let mut event = Event::new("", "", "");
        event.data = data.clone();
        event.datacontenttype = content_type.clone();
        for (name, value) in binding {
            match name.as_str() {
                "specversion" if value != switchyard_event::SPEC_VERSION => {
                    return invalid(
                        fallback,
                        format!("unsupported CloudEvents specversion `{value}`"),
                    );
                }
                "specversion" => {}
                "id" => event.id = value,
                "source" => event.source = value,
                "type" => event.ty = value,
                "subject" => event.subject = Some(value),
                "time" => event.time = Some(value),
                "dataschema" => event.dataschema = Some(value),
                _ => {
                    event.extensions.insert(name, value);
                }
            }
        }
        event
    } else {
        let mut event = fallback.clone();
        event.time = properties
            .timestamp()
            .and_then(|seconds| i64::try_from(seconds).ok())
            .and_then(|seconds| time::OffsetDateTime::from_unix_timestamp(seconds).ok())
            .map(switchyard_event::timestamp::rfc3339);
        event
    };
    if config.keep_records {
        event.extensions.insert(
            AMQP_MESSAGE.to_owned(),
            kept_delivery(config, delivery).to_string(),
        );
    }
    if let Err(error) = event.validate() {
        return invalid(fallback, error.to_string());
    }
    Input::Events(vec![event])
}

/// A delivery's AMQP fields as Lambda's RabbitMQ event writes a message (but the
/// data, which is the event's).
fn kept_delivery(
    config: &AmqpSourceConfig,
    delivery: &lapin::message::Delivery,
) -> serde_json::Value {
    let properties = &delivery.properties;
    let text = |value: &Option<lapin::types::ShortString>| {
        value.as_ref().map(|value| value.as_str().to_owned())
    };
    let headers = properties
        .headers()
        .as_ref()
        .map(|headers| {
            serde_json::Value::Object(
                headers
                    .inner()
                    .iter()
                    .map(|(name, value)| {
                        // Lambda writes string headers as their bytes.
                        let value = match value {
                            AMQPValue::LongString(bytes) => {
                                serde_json::json!({ "bytes": bytes.as_bytes() })
                            }
                            other => value_json(other),
                        };
                        (name.as_str().to_owned(), value)
                    })
                    .collect(),
            )
        })
        .unwrap_or(serde_json::Value::Null);
    let vhost = match config.uri() {
        Ok(uri) => uri.vhost,
        Err(_) => "/".to_owned(),
    };
    serde_json::json!({
        "queue": config.queue,
        "vhost": vhost,
        "source": config.name,
        "basicProperties": {
            "contentType": text(properties.content_type()),
            "contentEncoding": text(properties.content_encoding()),
            "headers": headers,
            "deliveryMode": properties.delivery_mode(),
            "priority": properties.priority(),
            "correlationId": text(properties.correlation_id()),
            "replyTo": text(properties.reply_to()),
            "expiration": text(properties.expiration()),
            "messageId": text(properties.message_id()),
            "timestamp": properties.timestamp(),
            "type": text(properties.kind()),
            "userId": text(properties.user_id()),
            "appId": text(properties.app_id()),
            "clusterId": text(properties.cluster_id()),
            "bodySize": delivery.data.len(),
        },
        "redelivered": delivery.redelivered,
    })
}

/// An AMQP queue, run and supervised by the binary.
pub struct AmqpSource {
    config: AmqpSourceConfig,
    bus: Bus,
    claims: Claims,
}

impl AmqpSource {
    /// `claims`: what the source may not produce (the other doors' sources).
    pub fn new(config: AmqpSourceConfig, bus: Bus, claims: Claims) -> Self {
        AmqpSource {
            config,
            bus,
            claims,
        }
    }
}

/// How long a stopping source goes on storing what it received before giving up (the
/// broker then requeues what was not acknowledged).
const DRAIN: Duration = Duration::from_secs(10);

/// Deliveries stored (and acknowledged) together at most.
const BATCH: usize = 256;

#[async_trait::async_trait]
impl Source for AmqpSource {
    fn name(&self) -> &str {
        &self.config.name
    }

    fn kind(&self) -> &'static str {
        "amqp"
    }

    /// Fails when the broker cannot be reached, the queue not declared or consumed,
    /// or the connection is lost: the supervisor then tries again after a pause.
    async fn run(
        &self,
        health: &dyn SourceHealth,
        shutdown: CancellationToken,
    ) -> Result<(), String> {
        let config = &self.config;
        let url = config.url.expose_secret();
        let broker = config.broker();
        let uri = config.uri()?;
        let connection = tokio::select! {
            connection = Connection::connect_uri(uri, ConnectionProperties::default()) => connection
                .map_err(|error| format!("connecting to {broker} failed: {}", redact(&error, url)))?,
            () = shutdown.cancelled() => return Ok(()),
        };
        let channel = connection
            .create_channel()
            .await
            .map_err(|error| format!("opening a channel on {broker} failed: {error}"))?;
        channel
            .basic_qos(config.prefetch, BasicQosOptions::default())
            .await
            .map_err(|error| format!("setting the prefetch on {broker} failed: {error}"))?;
        if config.declare {
            channel
                .queue_declare(
                    config.queue.as_str().into(),
                    QueueDeclareOptions::durable(),
                    FieldTable::default(),
                )
                .await
                .map_err(|error| format!("declaring queue `{}` failed: {error}", config.queue))?;
        }
        if let Some(exchange) = &config.exchange {
            for key in &config.routing_keys {
                channel
                    .queue_bind(
                        config.queue.as_str().into(),
                        exchange.as_str().into(),
                        key.as_str().into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(|error| {
                        format!(
                            "binding queue `{}` to exchange `{exchange}` with `{key}` failed: {error}",
                            config.queue
                        )
                    })?;
            }
        }
        let mut consumer = channel
            .basic_consume(
                config.queue.as_str().into(),
                format!("switchyard-{}", config.name).as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|error| format!("consuming queue `{}` failed: {error}", config.queue))?;
        tracing::info!(source = %config.name, %broker, queue = %config.queue, "amqp source consuming");
        health.up();
        let source = config.source();
        // Stores still under way when shutdown comes get DRAIN to finish.
        let abandoned = CancellationToken::new();
        let _drain = {
            let (shutdown, abandoned) = (shutdown.clone(), abandoned.clone());
            let guard = abandoned.clone().drop_guard();
            // Ends with the run too (the guard cancels `abandoned` when it returns).
            tokio::spawn(async move {
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    () = abandoned.cancelled() => return,
                }
                tokio::select! {
                    () = tokio::time::sleep(DRAIN) => abandoned.cancel(),
                    () = abandoned.cancelled() => {}
                }
            });
            guard
        };
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            let first = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                next = consumer.next() => next,
            };
            let Some(first) = first else {
                return Err(format!(
                    "the broker ended the consumer of queue `{}`",
                    config.queue
                ));
            };
            batch.push(first.map_err(|error| format!("consuming from {broker} failed: {error}"))?);
            // What else is already here joins this store.
            while batch.len() < BATCH {
                match futures::FutureExt::now_or_never(consumer.next()) {
                    Some(Some(Ok(delivery))) => batch.push(delivery),
                    Some(Some(Err(error))) => {
                        return Err(format!("consuming from {broker} failed: {error}"));
                    }
                    _ => break,
                }
            }
            let inputs: Vec<Input> = batch
                .iter()
                .map(|delivery| to_input(config, &source, delivery))
                .collect();
            if store_inputs(&self.bus, &config.name, &self.claims, inputs, &abandoned)
                .await
                .is_none()
            {
                // Given up at shutdown: the broker requeues what is unacknowledged
                // when the channel closes.
                break;
            }
            // Everything up to the last one, in one ack.
            let last = batch.last().expect("not empty");
            let acknowledged = last
                .ack(BasicAckOptions { multiple: true })
                .await
                .map_err(|error| {
                    format!("acknowledging stored deliveries failed (they come back and are deduplicated by message-id): {error}")
                })?;
            if !acknowledged {
                return Err("acknowledging stored deliveries failed: the channel is closed (they come back and are deduplicated by message-id)".to_owned());
            }
            batch.clear();
        }
        let _ = channel.close(200, "switchyard stopping".into()).await;
        let _ = connection.close(200, "switchyard stopping".into()).await;
        Ok(())
    }
}
