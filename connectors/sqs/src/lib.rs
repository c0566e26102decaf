//! The SQS source (`type = "sqs"`): messages of an SQS queue (or an SQS-compatible
//! server's) become CloudEvents in the events stream.
//!
//! Each receiver long-polls the queue (`ReceiveMessage`, up to 10 messages, up to
//! 20 s) and stores what it got; only then are the messages deleted, in one
//! `DeleteMessageBatch`. While storing takes long (NATS away), their visibility is
//! extended (`ChangeMessageVisibilityBatch`) so SQS does not hand them to another
//! receiver meanwhile. A process that dies before deleting leaves them to come back
//! after their visibility timeout: their event id is the SQS message id, so the
//! events stream's duplicate window drops a copy stored before.
//!
//! A message becomes an event with `id` = its message id, `source` = the queue's ARN,
//! `type` = `event_type`, `time` = its `SentTimestamp`, data = its body, byte for
//! byte, `datacontenttype` = its `content-type` message attribute; a FIFO queue's
//! `MessageGroupId` is the `partitionkey` (so `ordering = "key"` keeps a group's
//! order). A body that is a structured CloudEvent (`content-type` attribute
//! `application/cloudevents+json`) keeps its attributes. With `keep_records` (a
//! trigger has `payload = "aws"`) the message's SQS fields are kept in the `sqsmessage`
//! extension, for Lambda's SQS event.

use std::collections::BTreeMap;
use std::time::Duration;

use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry, Message,
    MessageSystemAttributeName, QueueAttributeName,
};
use base64::Engine as _;
use bytes::Bytes;
use secrecy::{ExposeSecret as _, SecretString};
use serde::Deserialize;
use switchyard_bus::Bus;
use switchyard_bus::ingest::{Claims, Input, store_inputs};
use switchyard_event::backoff::Backoff;
use switchyard_event::{Event, Source, SourceHealth};
use tokio_util::sync::CancellationToken;

/// The extension an SQS message's event keeps the message's SQS fields in (for
/// Lambda's SQS event).
pub const SQS_MESSAGE: &str = "sqsmessage";

/// A `[[sources]]` entry with `type = "sqs"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqsSourceConfig {
    /// Name of the source, in logs and in `source:<name>` dead letters.
    pub name: String,
    /// The queue's URL (`https://sqs.us-east-1.amazonaws.com/123456789012/orders`).
    pub queue_url: String,
    /// The SQS endpoint; AWS's for `region` when absent, or the queue URL's origin
    /// when that is not an AWS host (an SQS-compatible server).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Region to sign requests for.
    #[serde(default = "default_region")]
    pub region: String,
    /// Static credentials; without them, the standard AWS chain (environment,
    /// profile, web identity, container and instance credentials).
    #[serde(default)]
    pub access_key_id: Option<String>,
    #[serde(default)]
    pub secret_access_key: Option<SecretString>,
    #[serde(default)]
    pub session_token: Option<SecretString>,
    /// Messages asked for per receive (1-10).
    #[serde(default = "default_max_messages")]
    pub max_messages: i32,
    /// How long a receive waits for messages (long polling, at most 20 s).
    #[serde(default = "default_wait_time", with = "humantime_serde")]
    pub wait_time: Duration,
    /// The visibility timeout asked for on receive; the queue's own when absent. It is
    /// extended while storing the messages takes longer than half of it.
    #[serde(default, with = "humantime_serde::option")]
    pub visibility_timeout: Option<Duration>,
    /// Receives in flight at once.
    #[serde(default = "default_receivers")]
    pub receivers: usize,
    /// `type` of messages that are not CloudEvents.
    #[serde(default = "default_event_type")]
    pub event_type: String,
    /// Set by Switchyard when a trigger hands events to a handler as AWS shapes them.
    #[serde(skip)]
    pub keep_records: bool,
}

fn default_region() -> String {
    "us-east-1".to_owned()
}

fn default_max_messages() -> i32 {
    10
}

fn default_wait_time() -> Duration {
    Duration::from_secs(20)
}

fn default_receivers() -> usize {
    1
}

fn default_event_type() -> String {
    "dev.switchyard.sqs.message".to_owned()
}

impl SqsSourceConfig {
    /// Mistakes `validate` reports, as (field, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        if !(self.queue_url.starts_with("http://") || self.queue_url.starts_with("https://")) {
            problems.push((
                "queue_url",
                format!(
                    "`{}` is not a queue URL like https://sqs.us-east-1.amazonaws.com/123456789012/orders",
                    self.queue_url
                ),
            ));
        }
        if let Some(endpoint) = &self.endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            problems.push((
                "endpoint",
                format!("`{endpoint}` is not a URL like http://127.0.0.1:9324"),
            ));
        }
        if self.access_key_id.is_some() != self.secret_access_key.is_some() {
            problems.push((
                "access_key_id",
                "set both access_key_id and secret_access_key, or neither (then the standard AWS chain is used)".to_owned(),
            ));
        }
        if self.session_token.is_some() && self.access_key_id.is_none() {
            problems.push((
                "session_token",
                "goes with access_key_id and secret_access_key (without them the standard AWS chain is used, and brings its own)".to_owned(),
            ));
        }
        if !(1..=10).contains(&self.max_messages) {
            problems.push(("max_messages", "must be 1 to 10 (SQS's limit)".to_owned()));
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(20)).contains(&self.wait_time) {
            problems.push((
                "wait_time",
                "must be 1s to 20s (SQS's long polling; shorter would poll an empty queue in a loop)".to_owned(),
            ));
        }
        if let Some(timeout) = self.visibility_timeout
            && !(Duration::from_secs(1)..=Duration::from_secs(12 * 60 * 60)).contains(&timeout)
        {
            problems.push((
                "visibility_timeout",
                "must be 1s to 12h (SQS's limits)".to_owned(),
            ));
        }
        if self.receivers == 0 || self.receivers > 64 {
            problems.push(("receivers", "must be 1 to 64".to_owned()));
        }
        if self.event_type.is_empty() {
            problems.push(("event_type", "must not be empty".to_owned()));
        }
        problems
    }

    /// The endpoint requests go to, if not AWS's for the region.
    fn endpoint(&self) -> Option<String> {
        if let Some(endpoint) = &self.endpoint {
            return Some(endpoint.clone());
        }
        let rest = self
            .queue_url
            .strip_prefix("https://")
            .or_else(|| self.queue_url.strip_prefix("http://"))?;
        let host = rest.split('/').next().unwrap_or_default();
        if host.ends_with(".amazonaws.com") || host.ends_with(".amazonaws.com.cn") {
            return None;
        }
        let scheme = if self.queue_url.starts_with("https://") {
            "https"
        } else {
            "http"
        };
        Some(format!("{scheme}://{host}"))
    }

    /// A client for the queue. TLS is rustls with ring; a receive may wait
    /// `wait_time`, so attempts time out 30 s after it.
    pub async fn client(&self) -> aws_sdk_sqs::Client {
        use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region, timeout::TimeoutConfig};
        use aws_smithy_http_client::tls;
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http)
            .region(Region::new(self.region.clone()))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_attempt_timeout(self.wait_time + Duration::from_secs(30))
                    .build(),
            );
        if let (Some(key), Some(secret)) = (&self.access_key_id, &self.secret_access_key) {
            loader = loader.credentials_provider(Credentials::new(
                key,
                secret.expose_secret(),
                self.session_token
                    .as_ref()
                    .map(|token| token.expose_secret().to_owned()),
                None,
                "switchyard-config",
            ));
        }
        let shared = loader.load().await;
        let mut builder = aws_sdk_sqs::config::Builder::from(&shared);
        if let Some(endpoint) = self.endpoint() {
            builder = builder.endpoint_url(endpoint);
        }
        aws_sdk_sqs::Client::from_conf(builder.build())
    }
}

/// What a queue is, as events name it.
#[derive(Debug, Clone)]
pub struct Queue {
    pub url: String,
    pub arn: String,
    pub region: String,
    /// The visibility timeout messages are received with.
    pub visibility: Duration,
}

/// The event of one SQS message, or why it cannot become one (with what could be
/// read of it, for its dead letter).
pub fn to_input(config: &SqsSourceConfig, queue: &Queue, message: &Message) -> Input {
    let id = message.message_id().unwrap_or_default().to_owned();
    let body = message.body().unwrap_or_default();
    let attributes = message.attributes();
    let system = |name: MessageSystemAttributeName| {
        attributes.and_then(|attributes| attributes.get(&name).cloned())
    };
    let content_type = message.message_attributes().and_then(|attributes| {
        attributes
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case("content-type"))
            .and_then(|(_, value)| value.string_value().map(str::to_owned))
    });
    let mut fallback = Event::new(id.clone(), queue.arn.clone(), config.event_type.clone());
    fallback.data = Bytes::copy_from_slice(body.as_bytes());
    let mut event = if content_type
        .as_deref()
        .is_some_and(|content_type| content_type.starts_with("application/cloudevents+json"))
    {
        match switchyard_event::parse_structured(&Bytes::copy_from_slice(body.as_bytes())) {
            Ok(event) => event,
            Err(error) => {
                return Input::Invalid {
                    event: Box::new(fallback),
                    reason: "malformed",
                    error: format!("the message is not a valid structured CloudEvent: {error}"),
                };
            }
        }
    } else {
        let mut event = fallback.clone();
        event.datacontenttype = content_type;
        event.time = system(MessageSystemAttributeName::SentTimestamp)
            .and_then(|millis| millis.parse::<i64>().ok())
            .and_then(|millis| {
                time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(millis) * 1_000_000).ok()
            })
            .map(switchyard_event::timestamp::rfc3339);
        event
    };
    if let Some(group) = system(MessageSystemAttributeName::MessageGroupId) {
        event
            .extensions
            .entry("partitionkey".to_owned())
            .or_insert(group);
    }
    if config.keep_records {
        event.extensions.insert(
            SQS_MESSAGE.to_owned(),
            kept_message(queue, message).to_string(),
        );
    }
    if let Err(error) = event.validate() {
        return Input::Invalid {
            event: Box::new(fallback),
            reason: "malformed",
            error: error.to_string(),
        };
    }
    Input::Events(vec![event])
}

/// The SQS fields of a message as Lambda's SQS event record writes them (but the
/// body, which is the event's data).
fn kept_message(queue: &Queue, message: &Message) -> serde_json::Value {
    let attributes: BTreeMap<String, String> = message
        .attributes()
        .map(|attributes| {
            attributes
                .iter()
                .map(|(name, value)| (name.as_str().to_owned(), value.clone()))
                .collect()
        })
        .unwrap_or_default();
    let base64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let message_attributes: serde_json::Map<String, serde_json::Value> = message
        .message_attributes()
        .map(|attributes| {
            attributes
                .iter()
                .map(|(name, value)| {
                    let mut attribute = serde_json::json!({
                        "stringListValues": value.string_list_values(),
                        "binaryListValues": value
                            .binary_list_values()
                            .iter()
                            .map(|blob| base64(blob.as_ref()))
                            .collect::<Vec<_>>(),
                        "dataType": value.data_type(),
                    });
                    if let Some(text) = value.string_value() {
                        attribute["stringValue"] = text.into();
                    }
                    if let Some(blob) = value.binary_value() {
                        attribute["binaryValue"] = base64(blob.as_ref()).into();
                    }
                    (name.clone(), attribute)
                })
                .collect()
        })
        .unwrap_or_default();
    serde_json::json!({
        "messageId": message.message_id(),
        "receiptHandle": message.receipt_handle(),
        "attributes": attributes,
        "messageAttributes": message_attributes,
        "md5OfBody": message.md5_of_body(),
        "md5OfMessageAttributes": message.md5_of_message_attributes(),
        "eventSource": "aws:sqs",
        "eventSourceARN": queue.arn,
        "awsRegion": queue.region,
    })
}

/// An SQS queue, run and supervised by the binary.
pub struct SqsSource {
    config: SqsSourceConfig,
    bus: Bus,
    claims: Claims,
}

impl SqsSource {
    /// `claims`: what the source may not produce (the other doors' sources).
    pub fn new(config: SqsSourceConfig, bus: Bus, claims: Claims) -> Self {
        SqsSource {
            config,
            bus,
            claims,
        }
    }
}

/// How long a stopping source goes on storing what it received before giving up (the
/// messages then come back after their visibility timeout).
const DRAIN: Duration = Duration::from_secs(10);

#[async_trait::async_trait]
impl Source for SqsSource {
    fn name(&self) -> &str {
        &self.config.name
    }

    fn kind(&self) -> &'static str {
        "sqs"
    }

    /// Fails when the queue cannot be looked up (it does not exist, the credentials
    /// are refused); receive errors are waited out here.
    async fn run(
        &self,
        health: &dyn SourceHealth,
        shutdown: CancellationToken,
    ) -> Result<(), String> {
        let config = &self.config;
        let client = config.client().await;
        let attributes = client
            .get_queue_attributes()
            .queue_url(&config.queue_url)
            .attribute_names(QueueAttributeName::QueueArn)
            .attribute_names(QueueAttributeName::VisibilityTimeout)
            .send()
            .await
            .map_err(|error| {
                format!(
                    "looking up queue {} failed: {}",
                    config.queue_url,
                    aws_sdk_sqs::error::DisplayErrorContext(&error)
                )
            })?;
        let attributes = attributes.attributes().cloned().unwrap_or_default();
        let arn = attributes
            .get(&QueueAttributeName::QueueArn)
            .cloned()
            .ok_or_else(|| format!("queue {} has no QueueArn attribute", config.queue_url))?;
        let visibility = config.visibility_timeout.unwrap_or_else(|| {
            Duration::from_secs(
                attributes
                    .get(&QueueAttributeName::VisibilityTimeout)
                    .and_then(|seconds| seconds.parse().ok())
                    .unwrap_or(30),
            )
        });
        let queue = Queue {
            url: config.queue_url.clone(),
            region: arn.split(':').nth(3).unwrap_or(&config.region).to_owned(),
            arn,
            visibility,
        };
        tracing::info!(source = %config.name, queue = %queue.url, arn = %queue.arn, "sqs source receiving");
        health.up();
        // Stores still under way when shutdown comes get DRAIN to finish.
        let abandoned = CancellationToken::new();
        let drain = {
            let (shutdown, abandoned) = (shutdown.clone(), abandoned.clone());
            tokio::spawn(async move {
                shutdown.cancelled().await;
                tokio::time::sleep(DRAIN).await;
                abandoned.cancel();
            })
        };
        let receivers: Vec<_> = (0..config.receivers)
            .map(|_| {
                receive_loop(
                    config,
                    &self.bus,
                    &self.claims,
                    &client,
                    &queue,
                    &shutdown,
                    &abandoned,
                )
            })
            .collect();
        futures::future::join_all(receivers).await;
        drain.abort();
        Ok(())
    }
}

/// One receiver: receive, store, delete, until shutdown.
async fn receive_loop(
    config: &SqsSourceConfig,
    bus: &Bus,
    claims: &Claims,
    client: &aws_sdk_sqs::Client,
    queue: &Queue,
    shutdown: &CancellationToken,
    abandoned: &CancellationToken,
) {
    let mut failures = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        let mut request = client
            .receive_message()
            .queue_url(&queue.url)
            .max_number_of_messages(config.max_messages)
            .wait_time_seconds(i32::try_from(config.wait_time.as_secs()).unwrap_or(20))
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .message_attribute_names("All");
        if let Some(timeout) = config.visibility_timeout {
            request = request.visibility_timeout(i32::try_from(timeout.as_secs()).unwrap_or(30));
        }
        let received = tokio::select! {
            received = request.send() => received,
            () = shutdown.cancelled() => return,
        };
        let messages = match received {
            Ok(output) => {
                if failures.failing() {
                    tracing::info!(source = %config.name, "receiving from the queue works again");
                    failures.succeeded();
                }
                output.messages.unwrap_or_default()
            }
            Err(error) => {
                if failures.failed() {
                    tracing::warn!(source = %config.name, error = %aws_sdk_sqs::error::DisplayErrorContext(&error), failures = failures.failures(), "receiving from the queue failed; trying again");
                }
                if !failures.pause(shutdown.cancelled()).await {
                    return;
                }
                continue;
            }
        };
        if messages.is_empty() {
            continue;
        }
        let inputs: Vec<Input> = messages
            .iter()
            .map(|message| to_input(config, queue, message))
            .collect();
        // Store, extending the messages' visibility while that takes long.
        let storing = store_inputs(bus, &config.name, claims, inputs, abandoned);
        tokio::pin!(storing);
        let mut extend = tokio::time::interval_at(
            tokio::time::Instant::now() + queue.visibility / 2,
            (queue.visibility / 2).max(Duration::from_millis(500)),
        );
        let stored = loop {
            tokio::select! {
                stored = &mut storing => break stored,
                _ = extend.tick() => extend_visibility(config, client, queue, &messages).await,
            }
        };
        if stored.is_none() {
            // Given up at shutdown: the messages come back after their visibility
            // timeout, and what was stored is dropped as a duplicate then.
            return;
        }
        delete(config, client, queue, &messages).await;
    }
}

/// Asks for another visibility timeout on `messages`.
async fn extend_visibility(
    config: &SqsSourceConfig,
    client: &aws_sdk_sqs::Client,
    queue: &Queue,
    messages: &[Message],
) {
    let seconds = i32::try_from(queue.visibility.as_secs()).unwrap_or(30);
    let entries: Vec<_> = messages
        .iter()
        .enumerate()
        .filter_map(|(index, message)| {
            ChangeMessageVisibilityBatchRequestEntry::builder()
                .id(index.to_string())
                .receipt_handle(message.receipt_handle()?)
                .visibility_timeout(seconds)
                .build()
                .ok()
        })
        .collect();
    match client
        .change_message_visibility_batch()
        .queue_url(&queue.url)
        .set_entries(Some(entries))
        .send()
        .await
    {
        Ok(output) if output.failed().is_empty() => {
            tracing::debug!(source = %config.name, messages = messages.len(), "storing takes long: visibility extended");
        }
        Ok(output) => {
            tracing::warn!(source = %config.name, failed = output.failed().len(), "extending the visibility of some messages failed; they may be received again (and dropped as duplicates)");
        }
        Err(error) => {
            tracing::warn!(source = %config.name, error = %aws_sdk_sqs::error::DisplayErrorContext(&error), "extending the visibility of messages failed; they may be received again (and dropped as duplicates)");
        }
    }
}

/// Deletes stored messages (one batch), trying a failed delete again a few times: a
/// message not deleted comes back after its visibility timeout and is then dropped
/// as a duplicate while within the duplicate window.
async fn delete(
    config: &SqsSourceConfig,
    client: &aws_sdk_sqs::Client,
    queue: &Queue,
    messages: &[Message],
) {
    let mut pending: Vec<(String, String)> = messages
        .iter()
        .enumerate()
        .filter_map(|(index, message)| {
            Some((index.to_string(), message.receipt_handle()?.to_owned()))
        })
        .collect();
    let mut failures = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    for _ in 0..5 {
        let entries: Vec<_> = pending
            .iter()
            .filter_map(|(id, handle)| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(id)
                    .receipt_handle(handle)
                    .build()
                    .ok()
            })
            .collect();
        match client
            .delete_message_batch()
            .queue_url(&queue.url)
            .set_entries(Some(entries))
            .send()
            .await
        {
            Ok(output) => {
                let failed: Vec<&str> = output.failed().iter().map(|entry| entry.id()).collect();
                pending.retain(|(id, _)| failed.contains(&id.as_str()));
                if pending.is_empty() {
                    return;
                }
            }
            Err(error) => {
                tracing::debug!(source = %config.name, error = %aws_sdk_sqs::error::DisplayErrorContext(&error), "deleting stored messages failed; trying again");
            }
        }
        failures.failed();
        tokio::time::sleep(failures.delay()).await;
    }
    tracing::warn!(source = %config.name, messages = pending.len(), "stored messages could not be deleted; they will be received again and dropped as duplicates within the duplicate window");
}
