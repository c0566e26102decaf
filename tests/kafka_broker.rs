//! The test environment of the queue connectors (issue 3): the project's scripts
//! install a real Apache Kafka broker, and a test can start one in KRaft mode on random
//! ports and use it.

mod common;

use common::random_name;
use switchyard_testkit::{KafkaBroker, kafka_tool};

#[test]
fn a_kraft_broker_starts_and_serves_topics() {
    let broker = KafkaBroker::start();
    let topic = random_name("topic");
    let bootstrap = broker.bootstrap();
    let (created, output) = kafka_tool(
        "org.apache.kafka.tools.TopicCommand",
        &[
            "--bootstrap-server",
            &bootstrap,
            "--create",
            "--topic",
            &topic,
            "--partitions",
            "3",
        ],
    );
    assert!(
        created && output.contains(&format!("Created topic {topic}")),
        "{output}"
    );
    let (described, output) = kafka_tool(
        "org.apache.kafka.tools.TopicCommand",
        &[
            "--bootstrap-server",
            &bootstrap,
            "--describe",
            "--topic",
            &topic,
        ],
    );
    assert!(
        described && output.contains("PartitionCount: 3"),
        "{output}"
    );
}
