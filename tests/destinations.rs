//! Trigger destinations on NATS against a real nats-server: results go to a core NATS
//! subject, dead letters to a subject a JetStream stream captures (acknowledged).

mod common;

use std::time::Duration;

use common::{
    FunctionServer, NatsServer, Reply, Switchyard, WAIT, base_config, post_event, random_name,
};
use futures::StreamExt;
use switchyard_bus::async_nats::{self, jetstream};

#[tokio::test]
async fn results_and_dead_letters_are_published_to_nats_subjects() {
    let nats = NatsServer::start();
    let function = FunctionServer::start(|received, _| {
        if received.id() == "bad" {
            Reply::status(400).with_body("no")
        } else {
            Reply::ok()
                .with_header("content-type", "text/plain")
                .with_body("done")
        }
    })
    .await;
    let results = random_name("results");
    let failures = random_name("failures");
    let client = async_nats::connect(nats.url()).await.unwrap();
    let mut result_messages = client.subscribe(results.clone()).await.unwrap();
    let context = jetstream::new(client.clone());
    let stream = context
        .create_stream(jetstream::stream::Config {
            name: failures.to_uppercase(),
            subjects: vec![failures.clone()],
            storage: jetstream::stream::StorageType::Memory,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut text = base_config(&nats.url(), 0, 0);
    text.push_str(&format!(
        "\n[[functions]]\ntype = \"http\"\nname = \"fn\"\nurl = \"{}\"\n\n[[triggers]]\nname = \"main\"\nfunction = \"fn\"\n\
         on_success = {{ type = \"nats\", subject = \"{results}\" }}\non_failure = {{ type = \"nats\", subject = \"{failures}\" }}\n",
        function.url
    ));
    let switchyard = Switchyard::start(text).await;
    assert_eq!(
        post_event(&switchyard.url("/v1/events"), "good", "com.example.t", "in")
            .await
            .status(),
        202
    );
    assert_eq!(
        post_event(&switchyard.url("/v1/events"), "bad", "com.example.t", "in")
            .await
            .status(),
        202
    );

    let result = tokio::time::timeout(WAIT, result_messages.next())
        .await
        .unwrap()
        .unwrap();
    let headers = result.headers.unwrap();
    assert_eq!(
        headers.get("ce-type").unwrap().as_str(),
        "dev.switchyard.function.result"
    );
    assert_eq!(headers.get("ce-id").unwrap().as_str(), "good");
    assert_eq!(headers.get("ce-originsource").unwrap().as_str(), "/tests");
    assert_eq!(headers.get("content-type").unwrap().as_str(), "text/plain");
    assert_eq!(&result.payload[..], b"done");

    let deadline = std::time::Instant::now() + WAIT;
    let stored = loop {
        if let Ok(message) = stream.get_last_raw_message_by_subject(&failures).await {
            break message;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no dead letter on {failures}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let record =
        switchyard_bus::DeadLetter::from_message(Some(&stored.headers), stored.payload.clone())
            .unwrap();
    assert_eq!(record.event.id, "bad");
    assert_eq!(record.reason, "rejected");
    assert_eq!(record.last_status, Some(400));
    assert_eq!(&record.event.data[..], b"in");
    // The result went to a core subject that a subscriber (this test) listens on:
    // delivered once and acknowledged, never failed waiting for a JetStream ack that
    // no stream sends (which re-invoked the function).
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let triggers = switchyard.admin_json("/v1/triggers").await;
        let main = &triggers["triggers"][0];
        if main["in_flight"] == 0 && main["lag"] == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still busy: {main}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(switchyard.metric("switchyard_dispatch_retried").await, 0.0);
    assert_eq!(function.calls_for("good"), 1);
    switchyard.stop().await;
}

/// An `on_failure` destination that refuses publishes: the rejected event's dead
/// letter is stored, and every later delivery publishes it again without calling the
/// function again; once the destination takes it, it arrives there.
#[tokio::test]
async fn a_failing_on_failure_destination_does_not_reinvoke_the_function() {
    let nats = NatsServer::start();
    let function = FunctionServer::start(|_, _| Reply::status(400).with_body("no")).await;
    let failures = random_name("failures");
    let client = async_nats::connect(nats.url()).await.unwrap();
    let context = jetstream::new(client.clone());
    // A full stream with discard = new refuses every publish: the destination is down.
    let stream = context
        .create_stream(jetstream::stream::Config {
            name: failures.to_uppercase(),
            subjects: vec![failures.clone()],
            storage: jetstream::stream::StorageType::Memory,
            max_messages: 1,
            discard: jetstream::stream::DiscardPolicy::New,
            ..Default::default()
        })
        .await
        .unwrap();
    context
        .publish(failures.clone(), "filler".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let mut text = base_config(&nats.url(), 0, 0);
    text.push_str(&format!(
        "\n[[functions]]\ntype = \"http\"\nname = \"fn\"\nurl = \"{}\"\n\n[[triggers]]\nname = \"main\"\nfunction = \"fn\"\n\
         on_failure = {{ type = \"nats\", subject = \"{failures}\" }}\n",
        function.url
    ));
    let switchyard = Switchyard::start(text).await;
    assert_eq!(
        post_event(&switchyard.url("/v1/events"), "bad", "com.example.t", "in")
            .await
            .status(),
        202
    );
    // Wait until the event has been delivered three times (two publishes refused).
    let bus = switchyard.bus().await;
    let events = bus
        .jetstream()
        .get_stream(bus.events_stream())
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let mut consumer: jetstream::consumer::PullConsumer = events
            .get_consumer(&switchyard_dispatcher::consumer_name("main"))
            .await
            .unwrap();
        let info = consumer.info().await.unwrap();
        if info.delivered.consumer_sequence >= 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the event was not redelivered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        function.calls_for("bad"),
        1,
        "redeliveries must not re-invoke"
    );
    // The destination works again: the dead letter arrives there, still one call.
    stream.purge().await.unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    let stored = loop {
        if let Ok(message) = stream.get_last_raw_message_by_subject(&failures).await {
            break message;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no dead letter on {failures}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let record =
        switchyard_bus::DeadLetter::from_message(Some(&stored.headers), stored.payload.clone())
            .unwrap();
    assert_eq!(record.event.id, "bad");
    assert_eq!(record.reason, "rejected");
    assert_eq!(record.attempts, 1);
    assert_eq!(function.calls_for("bad"), 1);
    assert_eq!(
        switchyard::dlq::list(&bus, "main").await.unwrap().len(),
        1,
        "stored once"
    );
    switchyard.stop().await;
}
