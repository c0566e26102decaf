//! (j) SQS, RabbitMQ and MQTT -> function: messages already waiting in the queue
//! (ElasticMQ, a private RabbitMQ node, mosquitto, as the tests run them), taken by
//! - a bare bridge: the queue's client library (aws-sdk-sqs, lapin, rumqttc) takes
//!   each message, POSTs it to the no-op function (64 in flight) and only then
//!   deletes / acknowledges it: the loop anyone would write by hand, without
//!   durability;
//! - Switchyard: the source -> JetStream (file storage), alone (counted as stored);
//!   then with a trigger to the same function, one message per invocation; then
//!   with a trigger batching up to 100;
//!
//! each over its own copy of the messages (four queues, or four MQTT sessions), in
//! one run. The rate counts from the first message at the function (or stored).

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::StreamExt;
use switchyard_testkit::queues::{MosquittoServer, RabbitServer, SqsServer};

use crate::{Nats, NoopFunction, PAYLOAD, client, config_header, free_port};

/// How a Switchyard run is measured.
#[derive(Clone, Copy)]
enum Mode {
    /// The source alone: events stored in JetStream, no trigger.
    Stored,
    /// A trigger making one invocation per event.
    Single,
    /// A trigger making invocations of up to 100 events.
    Batched,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::Stored, Mode::Single, Mode::Batched];

    fn suffix(self) -> &'static str {
        match self {
            Mode::Stored => "stored",
            Mode::Single => "single",
            Mode::Batched => "batched",
        }
    }
}

/// Runs Switchyard with `source` (a `[[sources]]` table) until `count` events are
/// stored (`Mode::Stored`) or the no-op function got `count` events; the time from
/// the first.
async fn run_switchyard(
    nats: &Nats,
    name: &str,
    source: &str,
    function: &NoopFunction,
    count: usize,
    mode: Mode,
) -> anyhow::Result<Duration> {
    let trigger = match mode {
        Mode::Stored => String::new(),
        Mode::Single => format!(
            r#"
[[functions]]
type = "http"
name = "noop"
url = "{url}"
max_concurrency = 64
concurrency_scope = "process"
[[triggers]]
name = "bench"
function = "noop"
max_concurrency = 64
"#,
            url = function.url()
        ),
        Mode::Batched => format!(
            r#"
[[functions]]
type = "http"
name = "noop"
url = "{url}"
max_concurrency = 64
concurrency_scope = "process"
[[triggers]]
name = "bench"
function = "noop"
max_concurrency = 8
batch = {{ max_events = 100, window = "20ms" }}
"#,
            url = function.url()
        ),
    };
    let prefix = format!("benchq{name}{}", mode.suffix());
    let text = config_header(&nats.url(), &prefix, free_port()) + source + &trigger;
    let config = switchyard::config::parse(Path::new("bench.toml"), &text, &|_| None)
        .map_err(|errors| anyhow::anyhow!("{errors}"))?;
    function.count.store(0, Ordering::SeqCst);
    let bus = switchyard_bus::Bus::connect(&config.nats).await?;
    let running = switchyard::start(config).await?;
    let elapsed = match mode {
        Mode::Stored => {
            let stored = || async {
                match bus.jetstream().get_stream(bus.events_stream()).await {
                    Ok(mut stream) => stream.info().await.map_or(0, |info| info.state.messages),
                    Err(_) => 0,
                }
            };
            while stored().await == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let started = Instant::now();
            let first = stored().await as usize;
            while (stored().await as usize) < count {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            started
                .elapsed()
                .mul_f64(count as f64 / (count - first).max(1) as f64)
        }
        Mode::Single | Mode::Batched => time_calls(function, count).await,
    };
    running.stop().await?;
    Ok(elapsed)
}

/// From the function's first call to its `count`th, scaled to `count` calls.
async fn time_calls(function: &NoopFunction, count: usize) -> Duration {
    while function.count.load(Ordering::Relaxed) == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let started = Instant::now();
    let first = function.count.load(Ordering::Relaxed) as usize;
    while (function.count.load(Ordering::Relaxed) as usize) < count {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    started
        .elapsed()
        .mul_f64(count as f64 / (count - first).max(1) as f64)
}

/// A POST of one message to the function, as the dispatcher makes it (binary mode).
async fn post(http: &reqwest::Client, url: &str, id: &str, body: Vec<u8>) {
    let _ = http
        .post(url)
        .header("ce-specversion", "1.0")
        .header("ce-id", id)
        .header("ce-source", "/bench")
        .header("ce-type", "com.example.bench.message")
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("calling the function")
        .bytes()
        .await;
}

fn print_row(queue: &str, count: usize, bridge: Duration, switchyard: &[Duration]) {
    let rate = |elapsed: Duration| count as f64 / elapsed.as_secs_f64();
    let [stored, single, batched] = switchyard else {
        unreachable!("one figure per mode")
    };
    println!(
        "| {queue} | {count} | {:.0} | {:.0} ({:.0}%) | {:.0} | **{:.0}%** | {:.0} | **{:.0}%** |",
        rate(bridge),
        rate(*stored),
        100.0 * rate(*stored) / rate(bridge),
        rate(*single),
        100.0 * rate(*single) / rate(bridge),
        rate(*batched),
        100.0 * rate(*batched) / rate(bridge),
    );
}

async fn sqs_queue(
    client: &aws_sdk_sqs::Client,
    name: &str,
    count: usize,
) -> anyhow::Result<String> {
    let url = client
        .create_queue()
        .queue_name(name)
        .send()
        .await?
        .queue_url
        .unwrap_or_default();
    let body = PAYLOAD.to_owned();
    let batches = (0..count).collect::<Vec<_>>();
    let sends = batches.chunks(10).map(|chunk| {
        let entries: Vec<_> = chunk
            .iter()
            .map(|index| {
                aws_sdk_sqs::types::SendMessageBatchRequestEntry::builder()
                    .id(index.to_string())
                    .message_body(&body)
                    .build()
                    .expect("an entry")
            })
            .collect();
        let (client, url) = (client.clone(), url.clone());
        async move {
            client
                .send_message_batch()
                .queue_url(url)
                .set_entries(Some(entries))
                .send()
                .await
                .expect("sending messages")
        }
    });
    futures::stream::iter(sends)
        .buffer_unordered(16)
        .for_each(|_| async {})
        .await;
    Ok(url)
}

async fn bench_sqs(nats: &Nats, function: &NoopFunction, count: usize) -> anyhow::Result<()> {
    let server = tokio::task::spawn_blocking(SqsServer::start).await?;
    let config: switchyard_connector_sqs::SqsSourceConfig = toml_source(&format!(
        r#"name = "sqs"
queue_url = "{}/000000000000/bridge"
access_key_id = "bench"
secret_access_key = "bench"
wait_time = "1s"
receivers = 4
"#,
        server.endpoint()
    ))?;
    let sqs = config.client().await;
    let bridge_url = sqs_queue(&sqs, "bridge", count).await?;
    let mut switchyard_urls = Vec::new();
    for mode in Mode::ALL {
        switchyard_urls.push(sqs_queue(&sqs, mode.suffix(), count).await?);
    }

    // Bare bridge: 4 receivers (as the source's), each receives 10, POSTs them
    // concurrently, deletes them in one batch; 64 POSTs in flight in all at most.
    function.count.store(0, Ordering::SeqCst);
    let http = client();
    let receivers = (0..4).map(|_| {
        let (sqs, url, http, function) = (
            sqs.clone(),
            bridge_url.clone(),
            http.clone(),
            function.clone(),
        );
        async move {
            while (function.count.load(Ordering::Relaxed) as usize) < count {
                let received = sqs
                    .receive_message()
                    .queue_url(&url)
                    .max_number_of_messages(10)
                    .wait_time_seconds(1)
                    .send()
                    .await
                    .expect("receiving");
                let messages = received.messages.unwrap_or_default();
                let function_url = function.url();
                let calls = messages.iter().map(|message| {
                    post(
                        &http,
                        &function_url,
                        message.message_id().unwrap_or_default(),
                        message.body().unwrap_or_default().as_bytes().to_vec(),
                    )
                });
                futures::future::join_all(calls).await;
                let entries: Vec<_> = messages
                    .iter()
                    .enumerate()
                    .filter_map(|(index, message)| {
                        aws_sdk_sqs::types::DeleteMessageBatchRequestEntry::builder()
                            .id(index.to_string())
                            .receipt_handle(message.receipt_handle()?)
                            .build()
                            .ok()
                    })
                    .collect();
                if !entries.is_empty() {
                    sqs.delete_message_batch()
                        .queue_url(&url)
                        .set_entries(Some(entries))
                        .send()
                        .await
                        .expect("deleting");
                }
            }
        }
    });
    let bridge = {
        let timing = time_calls(function, count);
        let (elapsed, _) = tokio::join!(timing, futures::future::join_all(receivers));
        elapsed
    };
    let mut switchyard = Vec::new();
    for (mode, switchyard_url) in Mode::ALL.into_iter().zip(&switchyard_urls) {
        let source = format!(
            r#"
[[sources]]
type = "sqs"
name = "sqs"
queue_url = "{switchyard_url}"
access_key_id = "bench"
secret_access_key = "bench"
wait_time = "1s"
receivers = 4
"#
        );
        switchyard.push(run_switchyard(nats, "sqs", &source, function, count, mode).await?);
    }
    print_row(
        "SQS (ElasticMQ 1.7.1), 4 receivers of 10",
        count,
        bridge,
        &switchyard,
    );
    Ok(())
}

/// A source's table parsed as its connector's configuration.
fn toml_source<T: serde::de::DeserializeOwned>(text: &str) -> anyhow::Result<T> {
    Ok(toml::from_str(text)?)
}

async fn amqp_queue(channel: &lapin::Channel, name: &str, count: usize) -> anyhow::Result<()> {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions::durable(),
            lapin::types::FieldTable::default(),
        )
        .await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut confirms = Vec::with_capacity(count);
    for index in 0..count {
        let properties = lapin::BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(format!("{name}-{index}").as_str().into())
            .with_content_type("application/json".into());
        confirms.push(
            channel
                .basic_publish(
                    "".into(),
                    name.into(),
                    BasicPublishOptions::default(),
                    PAYLOAD.as_bytes(),
                    properties,
                )
                .await?,
        );
    }
    for confirm in confirms {
        confirm.await?;
    }
    Ok(())
}

async fn bench_amqp(nats: &Nats, function: &NoopFunction, count: usize) -> anyhow::Result<()> {
    use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
    let server = tokio::task::spawn_blocking(RabbitServer::start).await?;
    let connection =
        lapin::Connection::connect(&server.url(), lapin::ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    amqp_queue(&channel, "bridge", count).await?;
    for mode in Mode::ALL {
        amqp_queue(&channel, mode.suffix(), count).await?;
    }

    // Bare bridge: consume with the source's prefetch (256), POST each (64 in flight),
    // acknowledge each after its POST.
    let consumer_channel = connection.create_channel().await?;
    consumer_channel
        .basic_qos(256, BasicQosOptions::default())
        .await?;
    let consumer = consumer_channel
        .basic_consume(
            "bridge".into(),
            "bridge".into(),
            BasicConsumeOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await?;
    function.count.store(0, Ordering::SeqCst);
    let http = client();
    let url = function.url();
    let bridging = consumer
        .take(count)
        .map(|delivery| {
            let delivery = delivery.expect("consuming");
            let (http, url) = (http.clone(), url.clone());
            async move {
                let id = delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|id| id.as_str().to_owned())
                    .unwrap_or_default();
                post(&http, &url, &id, delivery.data.clone()).await;
                delivery
                    .ack(BasicAckOptions::default())
                    .await
                    .expect("acknowledging");
            }
        })
        .buffer_unordered(64)
        .for_each(|()| async {});
    let (bridge, ()) = tokio::join!(time_calls(function, count), bridging);
    let mut switchyard = Vec::new();
    for mode in Mode::ALL {
        let source = format!(
            r#"
[[sources]]
type = "amqp"
name = "amqp"
url = "{url}"
queue = "{queue}"
"#,
            url = server.url(),
            queue = mode.suffix()
        );
        switchyard.push(run_switchyard(nats, "amqp", &source, function, count, mode).await?);
    }
    print_row(
        "RabbitMQ (Debian 3.10), prefetch 256",
        count,
        bridge,
        &switchyard,
    );
    let _ = connection.close(200, "done".into()).await;
    Ok(())
}

/// A persistent MQTT session subscribed to `bench/#`, left so the broker queues for it.
async fn mqtt_session(port: u16, client_id: &str) -> anyhow::Result<()> {
    let mut options = rumqttc::MqttOptions::new(client_id, "127.0.0.1", port);
    options.set_clean_session(false);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 16);
    client
        .subscribe("bench/#", rumqttc::QoS::AtLeastOnce)
        .await?;
    loop {
        if let rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)) = eventloop.poll().await? {
            break;
        }
    }
    client.disconnect().await?;
    while eventloop.poll().await.is_ok() {}
    Ok(())
}

async fn bench_mqtt(nats: &Nats, function: &NoopFunction, count: usize) -> anyhow::Result<()> {
    let server = tokio::task::spawn_blocking(MosquittoServer::start).await?;
    mqtt_session(server.port, "bridge").await?;
    for mode in Mode::ALL {
        mqtt_session(server.port, mode.suffix()).await?;
    }
    // Publish once: both sessions get a copy queued.
    {
        let options = rumqttc::MqttOptions::new("publisher", "127.0.0.1", server.port);
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 1024);
        let publishing = async {
            for _ in 0..count {
                client
                    .publish(
                        "bench/x",
                        rumqttc::QoS::AtLeastOnce,
                        false,
                        PAYLOAD.as_bytes().to_vec(),
                    )
                    .await
                    .expect("publishing");
            }
        };
        let acknowledged = async {
            let mut acks = 0;
            while acks < count {
                if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) =
                    eventloop.poll().await.expect("publishing")
                {
                    acks += 1;
                }
            }
        };
        tokio::join!(publishing, acknowledged);
        client.disconnect().await?;
    }

    // Bare bridge: the session resumed with manual acks, each message POSTed (64 in
    // flight) and then acknowledged.
    function.count.store(0, Ordering::SeqCst);
    let mut options = rumqttc::MqttOptions::new("bridge", "127.0.0.1", server.port);
    options.set_clean_session(false).set_manual_acks(true);
    let (mqtt, mut eventloop) = rumqttc::AsyncClient::new(options, 4096);
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel::<rumqttc::Publish>();
    let done = std::sync::Arc::new(tokio::sync::Notify::new());
    let polling = {
        let done = done.clone();
        async move {
            loop {
                tokio::select! {
                    event = eventloop.poll() => {
                        if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(publish))) = event {
                            let _ = sender.send(publish);
                        }
                    }
                    () = done.notified() => break,
                }
            }
        }
    };
    let http = client();
    let url = function.url();
    let bridging = {
        unbounded_stream(receiver)
            .take(count)
            .map(|publish| {
                let (http, url, mqtt) = (http.clone(), url.clone(), mqtt.clone());
                async move {
                    post(
                        &http,
                        &url,
                        &publish.pkid.to_string(),
                        publish.payload.to_vec(),
                    )
                    .await;
                    mqtt.ack(&publish).await.expect("acknowledging");
                }
            })
            .buffer_unordered(64)
            .for_each(|()| async {})
    };
    let measuring = async {
        let elapsed = time_calls(function, count).await;
        done.notify_waiters();
        elapsed
    };
    let (bridge, (), ()) = tokio::join!(measuring, polling, bridging);
    let mut switchyard = Vec::new();
    for mode in Mode::ALL {
        let source = format!(
            r#"
[[sources]]
type = "mqtt"
name = "mqtt"
url = "{url}"
client_id = "{client_id}"
topics = ["bench/#"]
"#,
            url = server.url(),
            client_id = mode.suffix()
        );
        switchyard.push(run_switchyard(nats, "mqtt", &source, function, count, mode).await?);
    }
    print_row(
        "MQTT 3.1.1 (mosquitto 2.0), QoS 1, persistent session",
        count,
        bridge,
        &switchyard,
    );
    Ok(())
}

fn unbounded_stream<T: Send + 'static>(
    mut receiver: tokio::sync::mpsc::UnboundedReceiver<T>,
) -> impl futures::Stream<Item = T> {
    futures::stream::poll_fn(move |context| receiver.poll_recv(context))
}

pub async fn bench_queues(nats: &Nats, sqs_count: usize, count: usize) -> anyhow::Result<()> {
    let function = NoopFunction::start(false).await;
    println!(
        "### (j) queues -> function, messages of {} bytes waiting in the queue, no-op function\n",
        PAYLOAD.len()
    );
    println!(
        "| queue | messages | bare bridge msgs/s | source alone, stored (vs bridge) | switchyard, one per invocation | vs bridge | switchyard, batches of up to 100 | vs bridge |\n|---|---|---|---|---|---|---|---|"
    );
    bench_sqs(nats, &function, sqs_count).await?;
    bench_amqp(nats, &function, count).await?;
    bench_mqtt(nats, &function, count).await?;
    println!("\ntarget: switchyard >= 80% of the bare bridge (client -> HTTP, no durability)\n");
    Ok(())
}
