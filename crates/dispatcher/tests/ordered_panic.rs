//! An ordered trigger whose invocation panics (a bug in a target, say) must not hold
//! its key forever: the head is tried again and the key's later events follow, in
//! order. Against a real nats-server, with a target that panics once.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use switchyard_bus::Bus;
use switchyard_dispatcher::{
    AdaptiveLimit, Dispatcher, DispatcherConfig, DispatcherMetrics, FunctionRuntime, TriggerConfig,
};
use switchyard_event::{Event, Outcome, Target};
use switchyard_testkit::NatsServer;
use tokio_util::sync::CancellationToken;

/// A dispatcher with one ordered trigger (one partition) on function `f` = `target`.
async fn ordered_dispatcher(bus: &Bus, target: Arc<dyn Target>) -> Dispatcher {
    let function = Arc::new(FunctionRuntime {
        name: "f".to_owned(),
        target,
        timeout: Duration::from_secs(5),
        limit: AdaptiveLimit::new(4),
        cluster_slots: None,
    });
    let trigger: TriggerConfig = toml::from_str(
        "name = \"ordered\"\nfunction = \"f\"\nordering = \"key\"\npartitions = 1\n",
    )
    .unwrap();
    Dispatcher::new(
        bus.clone(),
        DispatcherConfig::default(),
        vec![trigger],
        HashMap::from([("f".to_owned(), function)]),
        HashMap::new(),
        DispatcherMetrics::default(),
    )
    .await
    .unwrap()
}

/// Events `k-1`, `k-2`, `k-3` of one partition key.
fn keyed_events() -> Vec<Event> {
    (1..=3)
        .map(|index| {
            let mut event = Event::new(format!("k-{index}"), "/tests", "com.example.t");
            event
                .extensions
                .insert("partitionkey".to_owned(), "k".to_owned());
            event
        })
        .collect()
}

#[derive(Default)]
struct PanicsOnce {
    calls: Mutex<Vec<String>>,
    panicked: AtomicBool,
}

#[async_trait]
impl Target for PanicsOnce {
    async fn invoke(&self, event: &Event, _timeout: Duration) -> Outcome {
        if event.id == "k-1" && !self.panicked.swap(true, Ordering::SeqCst) {
            panic!("a bug in the function client");
        }
        self.calls.lock().unwrap().push(event.id.clone());
        Outcome::delivered()
    }
}

#[tokio::test]
async fn a_panicked_invocation_releases_its_key() {
    let nats = NatsServer::start();
    let prefix = format!("p{}", std::process::id());
    let bus = common::bus(&nats.url(), &prefix, "", ", storage = \"memory\"").await;
    let target = Arc::new(PanicsOnce::default());
    let dispatcher = ordered_dispatcher(&bus, target.clone()).await;
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(dispatcher.run(shutdown.clone()));
    let events = keyed_events();
    bus.publish_events(&events).await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let calls = target.calls.lock().unwrap().clone();
        if calls.len() >= 3 {
            assert_eq!(calls, ["k-1", "k-2", "k-3"], "in order, after the panic");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the key stalled after the panic: {calls:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(target.panicked.load(Ordering::SeqCst));
    shutdown.cancel();
    running.await.unwrap();
}

/// Stops nats-server from inside the first invocation of `k-1`, so its ack cannot be
/// confirmed; records every call and whether the server was down then.
struct StopsTheServer {
    calls: Mutex<Vec<(String, bool)>>,
    nats: Mutex<Option<NatsServer>>,
    stopped: AtomicBool,
    down: AtomicBool,
}

#[async_trait]
impl Target for StopsTheServer {
    async fn invoke(&self, event: &Event, _timeout: Duration) -> Outcome {
        let down = self.down.load(Ordering::SeqCst);
        self.calls.lock().unwrap().push((event.id.clone(), down));
        if event.id == "k-1" && !self.stopped.swap(true, Ordering::SeqCst) {
            self.nats.lock().unwrap().as_mut().unwrap().stop();
            self.down.store(true, Ordering::SeqCst);
        }
        Outcome::delivered()
    }
}

/// The ack of an ordered event that the server cannot confirm (it is down when the
/// function answers) must not let the key's next event start: `k-2` is never invoked
/// while the server is down (before, the ack was sent and forgotten and `k-2` ran at
/// once, though `k-1` could still come back after it), and runs once `k-1` is settled.
#[tokio::test]
async fn an_unconfirmed_ack_holds_the_key() {
    let nats = NatsServer::start();
    let prefix = format!("a{}", std::process::id());
    let bus = common::bus(&nats.url(), &prefix, "publish_timeout = \"1s\"", "").await;
    let target = Arc::new(StopsTheServer {
        calls: Mutex::default(),
        nats: Mutex::new(Some(nats)),
        stopped: AtomicBool::new(false),
        down: AtomicBool::new(false),
    });
    let dispatcher = ordered_dispatcher(&bus, target.clone()).await;
    let events = keyed_events();
    // Stored before the dispatcher runs, so all three are held when k-1 runs.
    bus.publish_events(&events).await.unwrap();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(dispatcher.run(shutdown.clone()));

    let deadline = Instant::now() + Duration::from_secs(30);
    while !target.stopped.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "k-1 never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Down long enough for k-2 to have started, had k-1's ack been taken as done.
    tokio::time::sleep(Duration::from_secs(3)).await;
    target.down.store(false, Ordering::SeqCst);
    target.nats.lock().unwrap().as_mut().unwrap().restart();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let calls = target.calls.lock().unwrap().clone();
        assert!(
            !calls.iter().any(|(id, down)| id == "k-2" && *down),
            "k-2 ran while k-1's ack could not be confirmed: {calls:?}"
        );
        if calls.iter().any(|(id, _)| id == "k-3") {
            let order: Vec<&str> = calls.iter().map(|(id, _)| id.as_str()).collect();
            let first_k2 = order.iter().position(|id| *id == "k-2").unwrap();
            assert!(order[..first_k2].iter().all(|id| *id == "k-1"), "{order:?}");
            break;
        }
        assert!(Instant::now() < deadline, "stalled: {calls:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.cancel();
    running.await.unwrap();
}
