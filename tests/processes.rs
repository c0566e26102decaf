//! End to end with the real `switchyard` binary as separate processes: crash
//! recovery (SIGKILL), graceful shutdown (SIGTERM), and two dispatcher processes
//! sharing one trigger.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    FunctionServer, NatsServer, Process, Reply, WAIT, base_config, post_event, write_config,
};
use nix::sys::signal::Signal;

/// Two `switchyard run` processes on one configuration (`sections` appended to the
/// base), each on ports of its own choosing.
struct Pair {
    a: Process,
    b: Process,
    http_a: SocketAddr,
    http_b: SocketAddr,
    _directory: tempfile::TempDir,
}

async fn start_pair(nats: &NatsServer, sections: &str) -> Pair {
    let directory = tempfile::tempdir().unwrap();
    // Port 0 everywhere: each process binds its own and reports it in its ready file.
    let mut text = base_config(&nats.url(), 0, 0);
    text.push_str(sections);
    let config = write_config(directory.path(), &text);
    let (a, b) = (Process::start(&config, &[]), Process::start(&config, &[]));
    let http_a = a.wait_ready().await.sources["http"];
    let http_b = b.wait_ready().await.sources["http"];
    Pair {
        a,
        b,
        http_a,
        http_b,
        _directory: directory,
    }
}

async fn consumer_pending(config_text: &str, trigger: &str) -> (u64, usize) {
    let config = switchyard::config::parse(Path::new("t.toml"), config_text, &|name| {
        std::env::var(name).ok()
    })
    .unwrap();
    let bus = switchyard_bus::Bus::connect(&config.nats).await.unwrap();
    let stream = bus
        .jetstream()
        .get_stream(bus.events_stream())
        .await
        .unwrap();
    let mut consumer: switchyard_bus::async_nats::jetstream::consumer::PullConsumer = stream
        .get_consumer(&switchyard_dispatcher::consumer_name(trigger))
        .await
        .unwrap();
    let info = consumer.info().await.unwrap();
    (info.num_pending, info.num_ack_pending)
}

#[tokio::test]
async fn a_dispatcher_killed_mid_invocation_loses_nothing() {
    let nats = NatsServer::start();
    let function = FunctionServer::start(|received, call| {
        if received.id() == "hanging" && call == 1 {
            Reply::ok().after(Duration::from_secs(120))
        } else if received.id() == "slow" {
            Reply::ok().after(Duration::from_millis(1500))
        } else {
            Reply::ok()
        }
    })
    .await;
    let directory = tempfile::tempdir().unwrap();
    let mut text = base_config(&nats.url(), 0, 0);
    text = text.replace("shutdown_grace = \"2s\"", "shutdown_grace = \"10s\"");
    text.push_str(&format!(
        "\n[[functions]]\ntype = \"http\"\nname = \"fn\"\nurl = \"{}\"\ntimeout = \"180s\"\n\n[[triggers]]\nname = \"main\"\nfunction = \"fn\"\nack_wait = \"2s\"\n",
        function.url
    ));
    let config = write_config(directory.path(), &text);
    let first = Process::start(&config, &[]);
    first.wait_ready().await;
    let url = first.url("/v1/events");
    let response = post_event(&url, "hanging", "t", "precious").await;
    assert_eq!(response.status(), 202);
    let deadline = Instant::now() + WAIT;
    while function.calls_for("hanging") == 0 {
        assert!(Instant::now() < deadline, "the invocation never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Progress keeps the event ours well past the 2s ack wait while it runs.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        function.calls_for("hanging"),
        1,
        "an event in progress must not be redelivered"
    );
    first.signal(Signal::SIGKILL);
    drop(first);

    let mut second = Process::start(&config, &[]);
    second.wait_ready().await;
    let url = second.url("/v1/events");
    for index in 0..5 {
        post_event(&url, &format!("after-{index}"), "t", "x").await;
    }
    let received = function.wait_for(6, WAIT).await;
    let hanging = received
        .iter()
        .find(|call| call.id() == "hanging")
        .expect("the interrupted event was delivered after restart");
    assert_eq!(&hanging.body[..], b"precious");
    assert_eq!(function.calls_for("hanging"), 2);
    let deadline = Instant::now() + WAIT;
    while consumer_pending(&text, "main").await != (0, 0) {
        assert!(Instant::now() < deadline, "events left unacknowledged");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // SIGTERM while an invocation runs: it finishes within the grace, then the process
    // exits cleanly.
    post_event(&url, "slow", "t", "x").await;
    let deadline = Instant::now() + WAIT;
    while function.calls_for("slow") == 0 {
        assert!(
            Instant::now() < deadline,
            "the slow invocation never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    second.signal(Signal::SIGTERM);
    assert!(
        second.wait_exit().await,
        "switchyard exits with success on SIGTERM"
    );
    assert!(
        function.received().iter().any(|call| call.id() == "slow"),
        "the in-flight invocation completed before exit"
    );
    assert_eq!(consumer_pending(&text, "main").await, (0, 0));
}

#[tokio::test]
async fn two_dispatcher_processes_share_a_trigger_within_its_limit() {
    let nats = NatsServer::start();
    let function =
        FunctionServer::start(|_, _| Reply::ok().after(Duration::from_millis(100))).await;
    let pair = start_pair(&nats, &format!(
        "\n[[functions]]\ntype = \"http\"\nname = \"fn\"\nurl = \"{}\"\n\n[[triggers]]\nname = \"main\"\nfunction = \"fn\"\nmax_concurrency = 4\n",
        function.url
    )).await;
    let Pair {
        a,
        b,
        http_a,
        http_b,
        ..
    } = &pair;
    let (http_a, http_b) = (*http_a, *http_b);
    for index in 0..60 {
        let port = if index % 2 == 0 { http_a } else { http_b };
        let response = post_event(
            &format!("http://{port}/v1/events"),
            &format!("e{index}"),
            "t",
            "x",
        )
        .await;
        assert_eq!(response.status(), 202);
    }
    function.wait_for(60, WAIT).await;
    let metric = "switchyard_dispatch_succeeded_total{trigger=\"main\"";
    let (by_a, by_b) = (a.metric(metric).await, b.metric(metric).await);
    assert_eq!(
        by_a + by_b,
        60,
        "every event delivered exactly once between them"
    );
    assert!(
        by_a > 0 && by_b > 0,
        "both processes took work: {by_a} and {by_b}"
    );
    assert!(
        function.peak() <= 4,
        "together they exceeded max_concurrency: peak {}",
        function.peak()
    );
    assert_eq!(function.peak(), 4, "the limit is reached");
}

#[tokio::test]
async fn a_function_limit_holds_across_processes_and_triggers() {
    let nats = NatsServer::start();
    let function =
        FunctionServer::start(|_, _| Reply::ok().after(Duration::from_millis(100))).await;
    let pair = start_pair(
        &nats,
        &format!(
            r#"
[[functions]]
type = "http"
name = "fn"
url = "{}"
max_concurrency = 3

[[triggers]]
name = "orders"
function = "fn"
max_concurrency = 8
filter = {{ type = {{ exact = "orders" }} }}

[[triggers]]
name = "refunds"
function = "fn"
max_concurrency = 8
filter = {{ type = {{ exact = "refunds" }} }}
"#,
            function.url
        ),
    )
    .await;
    let Pair {
        a,
        b,
        http_a,
        http_b,
        ..
    } = &pair;
    let (http_a, http_b) = (*http_a, *http_b);
    for index in 0..40 {
        let port = if index % 2 == 0 { http_a } else { http_b };
        let ty = if index % 4 < 2 { "orders" } else { "refunds" };
        let response = post_event(
            &format!("http://{port}/v1/events"),
            &format!("e{index}"),
            ty,
            "x",
        )
        .await;
        assert_eq!(response.status(), 202);
    }
    function.wait_for(40, WAIT).await;
    let metric = "switchyard_dispatch_succeeded_total{";
    let (by_a, by_b) = (a.metric(metric).await, b.metric(metric).await);
    assert_eq!(by_a + by_b, 40);
    assert!(
        by_a > 0 && by_b > 0,
        "both processes took work: {by_a} and {by_b}"
    );
    assert_eq!(
        function.peak(),
        3,
        "two processes and two triggers together reach and never exceed the function's limit"
    );
}

#[tokio::test]
async fn slots_held_by_a_killed_process_come_back() {
    let nats = NatsServer::start();
    let function = FunctionServer::start(|received, call| {
        if received.id().starts_with("hang") && call == 1 {
            Reply::ok().after(Duration::from_secs(120))
        } else {
            Reply::ok()
        }
    })
    .await;
    let pair = start_pair(
        &nats,
        &format!(
            "\n[[functions]]\ntype = \"http\"\nname = \"fn\"\nurl = \"{}\"\ntimeout = \"180s\"\nmax_concurrency = 2\n\n[[triggers]]\nname = \"main\"\nfunction = \"fn\"\nack_wait = \"2s\"\n",
            function.url
        ),
    )
    .await;
    let Pair {
        a,
        b,
        http_a,
        http_b,
        ..
    } = pair;
    for id in ["hang-1", "hang-2"] {
        let response = post_event(&format!("http://{http_a}/v1/events"), id, "t", "x").await;
        assert_eq!(response.status(), 202);
    }
    let deadline = Instant::now() + WAIT;
    while function.calls_for("hang-1") + function.calls_for("hang-2") < 2 {
        assert!(
            Instant::now() < deadline,
            "the two invocations never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Kill a process that holds a slot (its invocation is in flight), keep the other.
    let in_flight = "switchyard_events_in_flight{";
    let a_holds = a.metric(in_flight).await > 0;
    let (survivor, killed, survivor_http) = if a_holds {
        (b, a, http_b)
    } else {
        (a, b, http_a)
    };
    killed.signal(Signal::SIGKILL);
    drop(killed);
    let response = post_event(
        &format!("http://{survivor_http}/v1/events"),
        "after",
        "t",
        "x",
    )
    .await;
    assert_eq!(response.status(), 202);
    // The survivor gets the dead process's slot back after the lease timeout (10 s),
    // its event after the trigger's ack wait (2 s), and delivers both events.
    let received = function.wait_for(2, WAIT).await;
    assert!(
        received.iter().any(|call| call.id() == "after"),
        "the new event was delivered"
    );
    assert!(
        received.iter().any(|call| call.id().starts_with("hang")),
        "the killed process's event was delivered by the survivor"
    );
    drop(survivor);
}

/// A retry storm while every one of three dispatcher processes is restarted in turn,
/// twice (SIGTERM, then a new process): events handed back unattempted at each
/// shutdown must not count as attempts. Every dead letter says `attempts = 4` and
/// the function saw exactly 4 calls for it.
#[tokio::test]
async fn rolling_restarts_in_a_retry_storm_do_not_count_hand_backs_as_attempts() {
    const EVENTS: usize = 150;
    const ATTEMPTS: usize = 4;
    let nats = NatsServer::start();
    let function = FunctionServer::start(|_, _| Reply::status(500)).await;
    let directory = tempfile::tempdir().unwrap();
    let mut text = base_config(&nats.url(), 0, 0);
    text.push_str(&format!(
        "\n[[functions]]\ntype = \"http\"\nname = \"fn\"\nurl = \"{}\"\nmax_concurrency = 64\n\n[[triggers]]\nname = \"main\"\nfunction = \"fn\"\nmax_concurrency = 16\nretry = {{ policy = \"fixed\", initial = \"1500ms\", attempts = {ATTEMPTS}, jitter = false }}\n",
        function.url
    ));
    let config = write_config(directory.path(), &text);
    let mut processes: Vec<Process> = (0..3).map(|_| Process::start(&config, &[])).collect();
    for process in &processes {
        process.wait_ready().await;
    }
    let url = processes[0].url("/v1/events");
    for index in 0..EVENTS {
        let response = post_event(&url, &format!("storm-{index}"), "t", "x").await;
        assert_eq!(response.status(), 202);
    }
    let mut restarts = 0;
    for _round in 0..2 {
        for process in processes.iter_mut() {
            process.signal(Signal::SIGTERM);
            assert!(process.wait_exit().await, "a clean exit on SIGTERM");
            *process = Process::start(&config, &[]);
            process.wait_ready().await;
            restarts += 1;
        }
    }
    let bus = {
        let config =
            switchyard::config::parse(Path::new("t.toml"), &text, &|name| std::env::var(name).ok())
                .unwrap();
        switchyard_bus::Bus::connect(&config.nats).await.unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let dead = loop {
        let dead = switchyard::dlq::list(&bus, "main").await.unwrap();
        if dead.len() >= EVENTS {
            break dead;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {EVENTS} dead letters",
            dead.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(dead.len(), EVENTS, "one dead letter per event");
    let mut wrong = Vec::new();
    for entry in &dead {
        let id = entry.dead_letter.event.id.clone();
        let calls = function.calls_for(&id);
        if entry.dead_letter.attempts != ATTEMPTS as u64 || calls != ATTEMPTS {
            wrong.push(format!(
                "{id}: dead letter says {} attempts ({}), the function saw {calls} calls",
                entry.dead_letter.attempts, entry.dead_letter.reason
            ));
        }
    }
    eprintln!(
        "retry storm: {EVENTS} events x {ATTEMPTS} attempts over {restarts} rolling restarts; {} dead letters off",
        wrong.len()
    );
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// A poison event that takes down every process handling it (here: it hangs the
/// invocation and the process is killed) is dead-lettered as `unprocessable` after
/// `retry.max_unfinished` deliveries with no outcome, not redelivered forever.
#[tokio::test]
async fn a_poison_event_that_kills_its_process_is_dead_lettered_as_unprocessable() {
    let nats = NatsServer::start();
    let function = FunctionServer::start(|_, _| Reply::ok().after(Duration::from_secs(600))).await;
    let directory = tempfile::tempdir().unwrap();
    let mut text = base_config(&nats.url(), 0, 0);
    text.push_str(&format!(
        "\n[[functions]]\ntype = \"http\"\nname = \"fn\"\nurl = \"{}\"\ntimeout = \"600s\"\n\n[[triggers]]\nname = \"main\"\nfunction = \"fn\"\nack_wait = \"1s\"\nretry = {{ attempts = 3, max_unfinished = 2 }}\n",
        function.url
    ));
    let config = write_config(directory.path(), &text);
    let mut process = Process::start(&config, &[]);
    process.wait_ready().await;
    let response = post_event(&process.url("/v1/events"), "poison", "t", "x").await;
    assert_eq!(response.status(), 202);
    for delivery in 1..=2 {
        let deadline = Instant::now() + WAIT;
        while function.calls_for("poison") < delivery {
            assert!(
                Instant::now() < deadline,
                "delivery {delivery} never reached the function"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The invocation hangs: the process dies with it, no outcome recorded.
        process.signal(Signal::SIGKILL);
        assert!(!process.wait_exit().await);
        process = Process::start(&config, &[]);
        process.wait_ready().await;
    }
    let bus = {
        let config =
            switchyard::config::parse(Path::new("t.toml"), &text, &|name| std::env::var(name).ok())
                .unwrap();
        switchyard_bus::Bus::connect(&config.nats).await.unwrap()
    };
    let dead = common::wait_for_dead_letters(&bus, "main", 1, WAIT).await;
    assert_eq!(dead[0].dead_letter.event.id, "poison");
    assert_eq!(dead[0].dead_letter.reason, "unprocessable");
    assert!(
        dead[0]
            .dead_letter
            .last_error
            .contains("delivered 2 times without an outcome"),
        "{}",
        dead[0].dead_letter.last_error
    );
    assert_eq!(function.calls_for("poison"), 2, "not invoked a third time");
    drop(process);
}
