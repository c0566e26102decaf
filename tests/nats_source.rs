//! The NATS source against a real nats-server: core NATS subjects and an existing
//! JetStream stream reach the function; JetStream input is acknowledged only after the
//! event is persisted.

mod common;

use std::time::{Duration, Instant};

use common::{FunctionServer, NatsServer, Reply, Switchyard, base_config, random_name};
use switchyard_bus::async_nats::{self, HeaderMap, jetstream};

const WAIT: Duration = Duration::from_secs(20);

fn config(nats: &NatsServer, function: &FunctionServer, source: &str) -> String {
    let mut text = base_config(&nats.url(), 0, 0);
    text.push_str(source);
    text.push_str(&format!(
        "\n[[functions]]\ntype = \"http\"\nname = \"fn\"\nurl = \"{}\"\n\n[[triggers]]\nname = \"main\"\nfunction = \"fn\"\n",
        function.url
    ));
    text
}

#[tokio::test]
async fn core_nats_messages_reach_the_function() {
    let nats = NatsServer::start();
    let function = FunctionServer::start(|_, _| Reply::ok()).await;
    let subject = random_name("orders");
    let source = format!(
        "\n[[sources]]\ntype = \"nats\"\nname = \"orders\"\nsubjects = [\"{subject}.>\"]\nevent_type = \"com.example.order\"\n"
    );
    let switchyard = Switchyard::start(config(&nats, &function, &source)).await;
    let client = async_nats::connect(nats.url()).await.unwrap();

    let mut headers = HeaderMap::new();
    headers.insert("Content-Type", "application/json");
    client
        .publish_with_headers(
            format!("{subject}.created"),
            headers,
            "{\"order\":1}".into(),
        )
        .await
        .unwrap();
    // A request is answered once the event is persisted.
    let answer = client
        .request(format!("{subject}.paid"), "\u{0}binary".into())
        .await
        .unwrap();
    let answer = String::from_utf8_lossy(&answer.payload).to_string();
    assert!(answer.starts_with("ok "), "{answer}");
    // A message that is a CloudEvent keeps its attributes.
    let mut cloudevent = HeaderMap::new();
    for (name, value) in [
        ("ce-specversion", "1.0"),
        ("ce-id", "ce-1"),
        ("ce-source", "/upstream"),
        ("ce-type", "com.example.native"),
    ] {
        cloudevent.insert(name, value);
    }
    client
        .publish_with_headers(format!("{subject}.native"), cloudevent, "native".into())
        .await
        .unwrap();
    client.flush().await.unwrap();

    let received = function.wait_for(3, WAIT).await;
    let created = received
        .iter()
        .find(|call| call.header("ce-subject") == Some(&format!("{subject}.created")))
        .expect("the plain message arrived");
    assert_eq!(created.header("ce-type"), Some("com.example.order"));
    assert_eq!(created.header("ce-source"), Some("/nats/orders"));
    assert_eq!(created.header("content-type"), Some("application/json"));
    assert_eq!(&created.body[..], b"{\"order\":1}");
    let paid = received
        .iter()
        .find(|call| call.header("ce-subject") == Some(&format!("{subject}.paid")))
        .unwrap();
    assert_eq!(&paid.body[..], b"\x00binary");
    assert_eq!(answer, format!("ok {}", paid.id()));
    let native = received.iter().find(|call| call.id() == "ce-1").unwrap();
    assert_eq!(native.header("ce-source"), Some("/upstream"));
    assert_eq!(native.header("ce-type"), Some("com.example.native"));
    assert_eq!(&native.body[..], b"native");
    switchyard.stop().await;
}

async fn input_consumer_state(
    client: &async_nats::Client,
    stream: &str,
    consumer: &str,
) -> (u64, usize) {
    let context = jetstream::new(client.clone());
    let stream = context.get_stream(stream).await.unwrap();
    let consumer: jetstream::consumer::PullConsumer = stream.get_consumer(consumer).await.unwrap();
    let info = consumer.cached_info();
    (info.num_pending, info.num_ack_pending)
}

#[tokio::test]
async fn jetstream_input_is_acknowledged_only_after_the_event_is_persisted() {
    let nats = NatsServer::start();
    let function = FunctionServer::start(|_, _| Reply::ok()).await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let context = jetstream::new(client.clone());
    let input = random_name("INPUT").to_uppercase();
    create_input(&context, &input).await;
    for index in 0..10 {
        context
            .publish(
                format!("{input}.item"),
                format!("payload-{index}-{}", "x".repeat(400)).into(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let source = format!(
        "\n[[sources]]\ntype = \"nats\"\nname = \"input\"\nstream = \"{input}\"\nevent_type = \"com.example.item\"\n"
    );
    // The events stream holds only about four of these events: the rest cannot be
    // persisted, so they must stay unacknowledged in the input stream.
    let text = config(&nats, &function, &source).replace(
        "duplicate_window = \"1m\"",
        "duplicate_window = \"1m\", max_bytes = 3000",
    );
    let switchyard = Switchyard::start(text).await;
    let received = function.wait_for(1, WAIT).await;
    assert!(
        received[0].id().starts_with(&format!("{input}-")),
        "the id comes from the input's coordinates"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let delivered = function.received().len();
    assert!(delivered < 10, "the events stream cannot hold all ten");
    let (pending, ack_pending) =
        input_consumer_state(&client, &input, "switchyard-source-input").await;
    assert_eq!(
        pending as usize + ack_pending,
        10 - delivered,
        "every input that was not persisted is still owed by the input stream"
    );
    switchyard.stop().await;

    // With room in the events stream (a new deployment's streams, same input), the
    // rest goes through and the input is drained: nothing was lost.
    let switchyard = Switchyard::start(config(&nats, &function, &source)).await;
    // An input the first process held when it stopped comes back within seconds, at
    // worst after the input consumer's ack wait (30 s).
    function.wait_for(10, Duration::from_secs(45)).await;
    let mut ids: Vec<_> = function
        .received()
        .iter()
        .map(|call| call.id().to_owned())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 10, "each of the ten inputs delivered: {ids:?}");
    let deadline = Instant::now() + WAIT;
    while input_consumer_state(&client, &input, "switchyard-source-input").await != (0, 0) {
        assert!(
            Instant::now() < deadline,
            "the input stream was not drained"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    switchyard.stop().await;
}

/// JetStream inputs that cannot become storable events are dead-lettered under
/// `source:<name>` and terminated in their stream, not redelivered forever: one over
/// the bus's size limit, one whose CloudEvent headers are invalid, one whose `type`
/// would make a subject nats-server cannot take. The good ones around them pass.
#[tokio::test]
async fn jetstream_inputs_that_cannot_be_stored_are_dead_lettered() {
    let nats = NatsServer::start();
    let function = FunctionServer::start(|_, _| Reply::ok()).await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let context = jetstream::new(client.clone());
    let input = random_name("INPUT").to_uppercase();
    create_input(&context, &input).await;
    let publish = |headers: HeaderMap, payload: Vec<u8>| {
        let context = context.clone();
        let subject = format!("{input}.item");
        async move {
            context
                .publish_with_headers(subject, headers, payload.into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    };
    publish(HeaderMap::new(), b"good-1".to_vec()).await;
    // Within nats-server's 1 MiB max_payload, over what the bus accepts.
    publish(HeaderMap::new(), vec![b'x'; 1024 * 1024 - 2048]).await;
    let mut invalid = HeaderMap::new();
    invalid.insert("ce-specversion", "0.3");
    publish(invalid, b"old".to_vec()).await;
    let mut long_type = HeaderMap::new();
    for (name, value) in [
        ("ce-specversion", "1.0"),
        ("ce-id", "long"),
        ("ce-source", "/upstream"),
    ] {
        long_type.insert(name, value);
    }
    long_type.insert("ce-type", "t".repeat(5000).as_str());
    publish(long_type, b"long".to_vec()).await;
    publish(HeaderMap::new(), b"good-2".to_vec()).await;

    let source = format!(
        "\n[[sources]]\ntype = \"nats\"\nname = \"input\"\nstream = \"{input}\"\nevent_type = \"com.example.item\"\n"
    );
    let switchyard = Switchyard::start(config(&nats, &function, &source)).await;
    let bus = switchyard.bus().await;
    let dead = common::wait_for_dead_letters(&bus, "source:input", 3, WAIT).await;
    let mut reasons: Vec<_> = dead
        .iter()
        .map(|entry| {
            (
                entry.dead_letter.event.id.clone(),
                entry.dead_letter.reason.clone(),
            )
        })
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        vec![
            (format!("{input}-2"), "too_large".to_owned()),
            (format!("{input}-3"), "malformed".to_owned()),
            (format!("{input}-4"), "too_large".to_owned()),
        ]
    );
    let large = dead
        .iter()
        .find(|entry| entry.dead_letter.event.id == format!("{input}-2"))
        .unwrap();
    assert!(
        large.dead_letter.last_error.contains("over the bus limit"),
        "{}",
        large.dead_letter.last_error
    );
    function.wait_for(2, WAIT).await;
    let deadline = Instant::now() + WAIT;
    while input_consumer_state(&client, &input, "switchyard-source-input").await != (0, 0) {
        assert!(Instant::now() < deadline, "inputs left in the input stream");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(function.received().len(), 2);
    switchyard.stop().await;
}

/// A burst on a core NATS subject, published with no replies as fast as a client can:
/// every message is stored (publishes are pipelined), and the client counted no drop.
#[tokio::test]
async fn a_core_nats_burst_is_stored_whole() {
    const BURST: usize = 20_000;
    let nats = NatsServer::start();
    let function = FunctionServer::start(|_, _| Reply::ok()).await;
    let subject = random_name("burst");
    let source = format!(
        "\n[[sources]]\ntype = \"nats\"\nname = \"burst\"\nsubjects = [\"{subject}\"]\nevent_type = \"com.example.burst\"\n"
    );
    let switchyard = Switchyard::start(config(&nats, &function, &source)).await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    for index in 0..BURST {
        client
            .publish(subject.clone(), format!("{index}").into())
            .await
            .unwrap();
    }
    client.flush().await.unwrap();
    let bus = switchyard.bus().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut stream = bus
            .jetstream()
            .get_stream(bus.events_stream())
            .await
            .unwrap();
        let stored = stream.info().await.unwrap().state.messages as usize;
        let dropped = switchyard.metric("switchyard_nats_messages_dropped").await;
        assert_eq!(
            dropped, 0.0,
            "the client dropped messages ({stored} stored)"
        );
        if stored >= BURST {
            assert_eq!(stored, BURST);
            break;
        }
        assert!(Instant::now() < deadline, "{stored} of {BURST} stored");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    switchyard.stop().await;
}

/// Creates input stream `name` over `<name>.>`.
async fn create_input(context: &jetstream::Context, name: &str) {
    context
        .create_stream(jetstream::stream::Config {
            name: name.to_owned(),
            subjects: vec![format!("{name}.>")],
            ..Default::default()
        })
        .await
        .unwrap();
}

/// The state `/v1/sources` shows of `name`, with its restarts.
async fn source_state(switchyard: &Switchyard, name: &str) -> (String, u64, String) {
    let sources: serde_json::Value = switchyard.admin_json("/v1/sources").await;
    let source = sources["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|source| source["name"] == name)
        .unwrap_or_else(|| panic!("no source {name} in {sources}"))
        .clone();
    (
        source["state"].as_str().unwrap().to_owned(),
        source["restarts"].as_u64().unwrap(),
        source["last_error"].as_str().unwrap_or_default().to_owned(),
    )
}

/// Sources are supervised: a JetStream source over a stream that does not exist yet
/// fails, is shown failed (`/v1/sources`, and `/readyz` answers 503 naming it), is run
/// again after a pause, and takes input once the stream exists.
#[tokio::test]
async fn a_failing_source_is_shown_and_run_again_until_it_works() {
    let nats = NatsServer::start();
    let function = FunctionServer::start(|_, _| Reply::ok()).await;
    let input = random_name("LATER").to_uppercase();
    let source = format!(
        "\n[[sources]]\ntype = \"nats\"\nname = \"input\"\nstream = \"{input}\"\nevent_type = \"com.example.item\"\n"
    );
    let switchyard = Switchyard::start_set_up(config(&nats, &function, &source)).await;
    let deadline = Instant::now() + WAIT;
    let (state, restarts, error) = loop {
        let (state, restarts, error) = source_state(&switchyard, "input").await;
        if state == "failed" || restarts >= 2 {
            break (state, restarts, error);
        }
        assert!(
            Instant::now() < deadline,
            "the source never failed: {state}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(restarts >= 1, "{state} {restarts}");
    assert!(
        error.contains(&input),
        "the error names the stream: {error}"
    );
    let readyz = reqwest::get(switchyard.admin_url("/readyz")).await.unwrap();
    assert_eq!(readyz.status(), 503);
    let body = readyz.text().await.unwrap();
    assert!(body.contains("source `input`"), "{body}");

    let client = async_nats::connect(nats.url()).await.unwrap();
    let context = jetstream::new(client.clone());
    create_input(&context, &input).await;
    context
        .publish(format!("{input}.item"), "after".into())
        .await
        .unwrap()
        .await
        .unwrap();
    // Run again at most 30 s after its last failure.
    let received = function.wait_for(1, Duration::from_secs(60)).await;
    assert_eq!(&received[0].body[..], b"after");
    let (state, _, _) = source_state(&switchyard, "input").await;
    assert_eq!(state, "running");
    let readyz = reqwest::get(switchyard.admin_url("/readyz")).await.unwrap();
    assert_eq!(readyz.status(), 200);
    switchyard.stop().await;
}
