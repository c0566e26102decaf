//! How Switchyard reaches NATS. Against a real 3-node nats-server cluster: with `replicas = 3`, every stream and
//! KV bucket Switchyard creates (events, dead letters, concurrency slots, consumer
//! positions, delivery records, dedup horizons) is replicated 3 times, and events
//! still reach a cluster-scoped function after a node is killed. And credentials in
//! `nats.url` are used (the client library ignores them in URLs).

mod common;

use std::time::Duration;

use common::{FunctionServer, NatsServer, Reply, Switchyard, base_config, post_event};
use switchyard_bus::async_nats::{self, jetstream};
use switchyard_testkit::NatsCluster;

#[tokio::test]
async fn cluster_state_follows_replicas_and_survives_a_lost_node() {
    let mut cluster = NatsCluster::start(3);
    let function = FunctionServer::start(|_, _| Reply::ok()).await;
    let mut text = base_config(&cluster.urls(), 0, 0)
        .replace(
            "storage = \"memory\", duplicate_window",
            "replicas = 3, duplicate_window",
        )
        .replace(
            "storage = \"memory\" }",
            "storage = \"memory\", replicas = 3 }",
        );
    // A hook with an id header: its dedup horizon is a KV bucket too.
    text.push_str(
        "\n[[sources.hooks]]\nname = \"gh\"\nevent_type = \"com.example.hook\"\nid_header = \"X-Delivery\"\n",
    );
    text.push_str(&format!(
        "\n[[functions]]\ntype = \"http\"\nname = \"fn\"\nurl = \"{}\"\nmax_concurrency = 2\n\n[[triggers]]\nname = \"main\"\nfunction = \"fn\"\n",
        function.url
    ));
    assert!(text.contains("replicas = 3 }"), "{text}");
    let switchyard = Switchyard::start(text).await;
    post_event(
        &switchyard.url("/v1/events"),
        "before",
        "com.example.t",
        "x",
    )
    .await;
    function.wait_for(1, Duration::from_secs(30)).await;

    let servers = switchyard_bus::server_addresses(&cluster.urls()).unwrap();
    let client = async_nats::connect(servers.as_slice()).await.unwrap();
    let context = jetstream::new(client);
    let mut names = context.stream_names();
    let mut checked = Vec::new();
    use futures::StreamExt;
    while let Some(name) = names.next().await {
        let name = name.unwrap();
        let mut stream = context.get_stream(&name).await.unwrap();
        let replicas = stream.info().await.unwrap().config.num_replicas;
        assert_eq!(replicas, 3, "stream {name} has {replicas} replicas");
        checked.push(name);
    }
    for part in [
        "_EVENTS",
        "_DLQ",
        "_SLOTS",
        "_POSITIONS",
        "_DELIVERIES",
        "_DEDUP_",
    ] {
        assert!(
            checked.iter().any(|name| name.contains(part)),
            "no stream for {part} among {checked:?}"
        );
    }

    // One node down: the cluster keeps a quorum; events still reach the function,
    // whose concurrency slots live in a replicated stream.
    cluster.kill(2);
    for index in 0..5 {
        // As a client following the contract does: a 503 (the connection moving to
        // another node, a stream leader being elected) is sent again.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let status = post_event(
                &switchyard.url("/v1/events"),
                &format!("after-{index}"),
                "com.example.t",
                "x",
            )
            .await
            .status();
            if status == 202 {
                break;
            }
            assert_eq!(status, 503, "only 'retry later' while a node is down");
            assert!(std::time::Instant::now() < deadline, "never accepted");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    function.wait_for(6, Duration::from_secs(60)).await;
    switchyard.stop().await;
}

#[tokio::test]
async fn credentials_in_the_url_are_used() {
    let nats = NatsServer::start_with(&["--user", "switchyard", "--pass", "p@ss word"]);
    let function = FunctionServer::start(|_, _| Reply::ok()).await;
    let url = format!("nats://switchyard:p%40ss%20word@127.0.0.1:{}", nats.port);
    let mut text = base_config(&url, 0, 0);
    text.push_str(&format!(
        "\n[[functions]]\ntype = \"http\"\nname = \"fn\"\nurl = \"{}\"\n\n[[triggers]]\nname = \"main\"\nfunction = \"fn\"\n",
        function.url
    ));
    let switchyard = Switchyard::start(text).await;
    let answer = post_event(
        &switchyard.url("/v1/events"),
        "authed",
        "com.example.t",
        "x",
    )
    .await;
    assert_eq!(answer.status(), 202);
    function.wait_for(1, Duration::from_secs(30)).await;
    switchyard.stop().await;
}
