//! The Kafka source's configuration.

use std::collections::BTreeMap;

use rdkafka::ClientConfig;
use serde::Deserialize;
pub use switchyard_event::PropertyValue;

/// A Kafka source: a consumer group over topics.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSourceConfig {
    /// Name of the source, used in logs, metrics and the default group id.
    pub name: String,
    /// Whether plain records' events keep the record exactly (the `kafkarecord`
    /// extension), for `lambda` functions given AWS-shaped payloads. Not read from
    /// the file: set by Switchyard when a trigger has `payload = "aws"`.
    #[serde(skip)]
    pub keep_records: bool,
    /// Every record is a plain record: its headers are never read as a
    /// CloudEvent's attributes, so its events always have this source's `source`
    /// (set for Lambda event source mappings, whose trigger selects that source).
    #[serde(skip)]
    pub plain: bool,
    /// Bootstrap brokers, `host:port` separated by commas.
    pub brokers: String,
    /// Topics to consume.
    #[serde(default)]
    pub topics: Vec<String>,
    /// Instead of `topics`: every topic matching this regular expression (librdkafka
    /// syntax; a leading `^` is added when missing).
    #[serde(default)]
    pub topic_pattern: Option<String>,
    /// Consumer group; `switchyard-<name>` by default. Processes with the same group
    /// share the partitions.
    #[serde(default)]
    pub group_id: Option<String>,
    /// Where a group without committed offsets starts: `latest` or `earliest`.
    #[serde(default)]
    pub start: StartAt,
    /// Name of the cluster in the events' `source` (`kafka://<cluster>/<topic>`);
    /// the source's name by default.
    #[serde(default)]
    pub cluster: Option<String>,
    /// CloudEvents `type` of records that are not CloudEvents.
    #[serde(default = "default_event_type")]
    pub event_type: String,
    /// `s3`: every record is an S3 event notification (MinIO's Kafka target), one
    /// event per object record; the default takes CloudEvents as they are and any
    /// other record as data.
    #[serde(default)]
    pub format: switchyard_connector_s3::MessageFormat,
    /// With `format = "s3"`: how the store writes keys in its notifications, `url`
    /// (AWS, MinIO: `red+flower.jpg` is `red flower.jpg`) or `none` (versitygw).
    #[serde(default)]
    pub key_encoding: switchyard_connector_s3::KeyEncoding,

    /// Per-topic `type`, overriding `event_type`.
    #[serde(default)]
    pub types: BTreeMap<String, String>,
    /// Records read but not yet persisted, at most: reading waits for room (and the
    /// partitions are paused if that takes more than 2 s).
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// librdkafka properties passed through as they are (`security.protocol`,
    /// `sasl.mechanisms`, `client.id`, ...).
    #[serde(default)]
    pub properties: BTreeMap<String, PropertyValue>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StartAt {
    #[default]
    Latest,
    Earliest,
}

fn default_event_type() -> String {
    "dev.switchyard.kafka.record".to_owned()
}

fn default_max_in_flight() -> usize {
    10_000
}

/// Properties Switchyard sets itself, and the field to use instead where there is one.
const MANAGED: &[(&str, &str)] = &[
    ("bootstrap.servers", "use the `brokers` field"),
    ("metadata.broker.list", "use the `brokers` field"),
    ("group.id", "use the `group_id` field"),
    ("auto.offset.reset", "use the `start` field"),
    (
        "enable.auto.offset.store",
        "Switchyard stores an offset only once every record before it is persisted",
    ),
    (
        "enable.auto.commit",
        "Switchyard commits stored offsets itself, periodically and on rebalance",
    ),
];

/// One mistake in a Kafka source's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub field: &'static str,
    pub message: String,
}

impl KafkaSourceConfig {
    pub fn group_id(&self) -> String {
        self.group_id
            .clone()
            .unwrap_or_else(|| format!("switchyard-{}", self.name))
    }

    /// The `source` of a plain record's event.
    pub fn event_source(&self, topic: &str) -> String {
        format!(
            "kafka://{}/{topic}",
            self.cluster.as_deref().unwrap_or(&self.name)
        )
    }

    /// The `type` of a plain record's event.
    pub fn event_type(&self, topic: &str) -> String {
        self.types
            .get(topic)
            .cloned()
            .unwrap_or_else(|| self.event_type.clone())
    }

    /// Whether `topic` is one this source subscribes to.
    pub fn subscribes_to(&self, topic: &str) -> bool {
        match &self.topic_pattern {
            Some(pattern) => {
                let anchored = if pattern.starts_with('^') {
                    pattern.clone()
                } else {
                    format!("^{pattern}")
                };
                regex::Regex::new(&anchored).is_ok_and(|regex| regex.is_match(topic))
            }
            None => self.topics.iter().any(|name| name == topic),
        }
    }

    /// What the consumer subscribes to.
    pub fn subscription(&self) -> Vec<String> {
        match &self.topic_pattern {
            Some(pattern) if pattern.starts_with('^') => vec![pattern.clone()],
            Some(pattern) => vec![format!("^{pattern}")],
            None => self.topics.clone(),
        }
    }

    /// The librdkafka configuration of the consumer.
    pub fn client_config(&self) -> ClientConfig {
        let mut client = ClientConfig::new();
        for (name, value) in &self.properties {
            client.set(name, value.to_string());
        }
        client
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", self.group_id())
            // A partition without a committed offset is one the group never read:
            // a partition added to a topic later, or a topic that matches the pattern
            // later. Reading it from its start loses nothing. `start = "latest"` is
            // applied by committing the end of every partition when the group first
            // starts (see `start_new_group_at_end`).
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false");
        // librdkafka's own read-ahead is the second half of the memory bound: 16 MiB
        // per source instead of its 64 MiB default, unless set.
        if !self.properties.contains_key("queued.max.messages.kbytes") {
            client.set("queued.max.messages.kbytes", "16384");
        }
        if !self.properties.contains_key("client.id") {
            client.set("client.id", format!("switchyard-{}", self.name));
        }
        client
    }

    /// Everything wrong with this source's settings, librdkafka's property checks
    /// included (no connection is made).
    pub fn problems(&self) -> Vec<ConfigProblem> {
        let mut problems = Vec::new();
        if self.brokers.trim().is_empty() {
            problems.push(ConfigProblem {
                field: "brokers",
                message: "must name at least one broker, like `127.0.0.1:9092`".to_owned(),
            });
        }
        if self.topics.is_empty() == self.topic_pattern.is_none() {
            problems.push(ConfigProblem {
                field: "topics",
                message: format!(
                    "source `{}` needs either `topics` or `topic_pattern`, not both",
                    self.name
                ),
            });
        }
        if self.event_type.is_empty() || self.types.values().any(String::is_empty) {
            problems.push(ConfigProblem {
                field: "event_type",
                message: "an event type must not be empty".to_owned(),
            });
        }
        if self.max_in_flight == 0 {
            problems.push(ConfigProblem {
                field: "max_in_flight",
                message: "must be at least 1".to_owned(),
            });
        }
        for (name, why) in MANAGED {
            if self.properties.contains_key(*name) {
                problems.push(ConfigProblem {
                    field: "properties",
                    message: format!("`{name}` is managed by Switchyard: {why}"),
                });
            }
        }
        if problems.is_empty()
            && let Err(error) = self.client_config().create_native_config()
        {
            problems.push(ConfigProblem {
                field: "properties",
                message: format!("librdkafka refused the configuration: {error}"),
            });
        }
        problems
    }
}
