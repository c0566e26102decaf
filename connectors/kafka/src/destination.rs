//! A Kafka topic as a trigger's destination: each record is an event in the
//! CloudEvents Kafka binding (binary mode: `ce_` headers, `content-type`, the data as
//! the value, `partitionkey` as the key), with the dead-letter record's
//! `Switchyard-Dlq-*` headers beside it. The producer is idempotent and waits for
//! every in-sync replica (`acks=all`).

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use switchyard_event::{Destination, Event};

use crate::config::PropertyValue;

/// How long a record may wait for the broker's acknowledgement.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

pub struct KafkaDestination {
    producer: FutureProducer,
    topic: String,
}

/// The librdkafka configuration of a destination's producer.
pub fn producer_config(
    brokers: &str,
    properties: &BTreeMap<String, PropertyValue>,
) -> ClientConfig {
    let mut client = ClientConfig::new();
    client
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set(
            "message.timeout.ms",
            DELIVERY_TIMEOUT.as_millis().to_string(),
        );
    for (name, value) in properties {
        client.set(name, value.to_string());
    }
    client.set("bootstrap.servers", brokers);
    client
}

impl KafkaDestination {
    pub fn new(
        brokers: &str,
        topic: &str,
        properties: &BTreeMap<String, PropertyValue>,
    ) -> Result<KafkaDestination, String> {
        let producer = producer_config(brokers, properties)
            .create()
            .map_err(|error| format!("creating the kafka producer for topic `{topic}`: {error}"))?;
        Ok(KafkaDestination {
            producer,
            topic: topic.to_owned(),
        })
    }
}

#[async_trait]
impl Destination for KafkaDestination {
    fn describe(&self) -> String {
        format!("kafka topic {}", self.topic)
    }

    async fn publish(&self, event: &Event, extra: &[(String, String)]) -> Result<(), String> {
        let mut attributes: Vec<(String, &str)> = vec![
            ("ce_specversion".to_owned(), switchyard_event::SPEC_VERSION),
            ("ce_id".to_owned(), &event.id),
            ("ce_source".to_owned(), &event.source),
            ("ce_type".to_owned(), &event.ty),
        ];
        for (name, value) in [
            ("ce_subject", &event.subject),
            ("ce_time", &event.time),
            ("ce_dataschema", &event.dataschema),
            ("content-type", &event.datacontenttype),
        ] {
            if let Some(value) = value {
                attributes.push((name.to_owned(), value));
            }
        }
        for (name, value) in &event.extensions {
            attributes.push((format!("ce_{name}"), value));
        }
        let mut headers = OwnedHeaders::new_with_capacity(attributes.len() + extra.len());
        for (name, value) in &attributes {
            headers = headers.insert(Header {
                key: name,
                value: Some(*value),
            });
        }
        for (name, value) in extra {
            if name.to_ascii_lowercase().starts_with("nats-") {
                continue;
            }
            headers = headers.insert(Header {
                key: name,
                value: Some(value),
            });
        }
        let mut record = FutureRecord::<str, [u8]>::to(&self.topic)
            .payload(&event.data[..])
            .headers(headers);
        if let Some(key) = event.extensions.get("partitionkey") {
            record = record.key(key);
        }
        self.producer
            .send(record, DELIVERY_TIMEOUT)
            .await
            .map(|_| ())
            .map_err(|(error, _)| format!("kafka topic {}: {error}", self.topic))
    }
}
