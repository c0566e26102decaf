//! Faults, injected while events flow: a real 3-node NATS cluster (streams and KV
//! buckets at R3), two `switchyard run` processes, steady HTTP ingest and a Kafka
//! source, and a function that sometimes fails (and, in the second test, hangs,
//! crashes and answers garbage). In turn: the events stream's leader is SIGKILLed
//! and restarted; every node is restarted one at a time; a node is SIGSTOPped past
//! its heartbeats and continued; a Switchyard process is SIGKILLed and restarted;
//! one of the two processes dies for good.
//!
//! After each fault, ingest pauses until everything accepted is settled, and then:
//! every event answered 202 and every Kafka record produced is delivered to the
//! function or dead-lettered (by id: zero lost); duplicates are counted and
//! reported; no event is tried more often than its attempts allow; the function's
//! `max_concurrency` (cluster-wide) is never exceeded; `/readyz` answered throughout
//! and is 200 again once the fault is over.
//!
//! `.ci/run` runs each fault once; `SWITCHYARD_FAULT_ROUNDS=N` repeats the sequence N
//! times (docs/RELIABILITY.md has the long run and its figures).

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{FunctionServer, Process, Received, Reply, random_name, write_config};
use nix::sys::signal::Signal;
use switchyard_connector_kafka::rdkafka::ClientConfig;
use switchyard_connector_kafka::rdkafka::producer::{FutureProducer, FutureRecord};
use switchyard_testkit::{KafkaBroker, NatsCluster};

const SETTLE: Duration = Duration::from_secs(180);
const ATTEMPTS: usize = 4;
const MAX_CONCURRENCY: usize = 8;

/// What the function did with each event (keyed by its body: `h-<n>` for HTTP
/// events, `k-<n>` for Kafka records).
#[derive(Default)]
struct Ledger {
    calls: HashMap<String, usize>,
    succeeded: HashSet<String>,
    /// The call that first succeeded, per key: calls after it are duplicates.
    first_success: HashMap<String, usize>,
}

/// How the function treats an event: by its key and how often it saw it.
#[derive(Clone, Copy)]
enum Mode {
    /// Every 10th key fails its first call (500); keys ending in 7 are refused (422).
    SometimesFails,
    /// As above, and every 13th key hangs past the timeout on its first call, every
    /// 17th crashes (the connection dropped without an answer) on its first call,
    /// every 19th answers garbage (a 200 that claims to be a CloudEvent but is not)
    /// on its first call.
    Misbehaves,
}

fn key_of(received: &Received) -> String {
    String::from_utf8_lossy(&received.body)
        .trim_matches('"')
        .to_owned()
}

fn number(key: &str) -> usize {
    key[2..].parse().unwrap_or_default()
}

fn behave(mode: Mode, ledger: &Mutex<Ledger>, received: &Received) -> Reply {
    let key = key_of(received);
    let n = number(&key);
    let call = {
        let mut ledger = ledger.lock().unwrap();
        let calls = ledger.calls.entry(key.clone()).or_default();
        *calls += 1;
        *calls
    };
    let reply = if n % 10 == 7 {
        Reply::status(422)
    } else if n % 10 == 3 && call == 1 {
        Reply::status(500)
    } else if matches!(mode, Mode::Misbehaves) && call == 1 && n.is_multiple_of(13) {
        return Reply::ok().after(Duration::from_secs(5));
    } else if matches!(mode, Mode::Misbehaves) && call == 1 && n.is_multiple_of(17) {
        return Reply::ok().abort();
    } else if matches!(mode, Mode::Misbehaves) && call == 1 && n.is_multiple_of(19) {
        Reply::ok()
            .with_header("ce-specversion", "0.1")
            .with_body("\u{1}not an event")
    } else {
        Reply::ok()
    };
    if reply.status < 300 {
        let mut ledger = ledger.lock().unwrap();
        ledger.first_success.entry(key.clone()).or_insert(call);
        ledger.succeeded.insert(key);
    }
    reply
}

struct Harness {
    cluster: NatsCluster,
    _broker: KafkaBroker,
    function: FunctionServer,
    ledger: Arc<Mutex<Ledger>>,
    config: PathBuf,
    _directory: tempfile::TempDir,
    processes: Vec<Option<Process>>,
    /// Where ingest posts: the live processes' HTTP sources.
    targets: Arc<Mutex<Vec<std::net::SocketAddr>>>,
    /// The live processes' admin listeners.
    admins: Arc<Mutex<Vec<std::net::SocketAddr>>>,
    accepted: Arc<Mutex<HashSet<String>>>,
    produced: Arc<Mutex<HashSet<String>>>,
    paused: Arc<AtomicBool>,
    stopped: Arc<AtomicBool>,
    posted: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
    readyz: Arc<Mutex<BTreeMap<String, usize>>>,
    faults: Vec<String>,
    kills: usize,
    events_stream: String,
}

impl Harness {
    async fn start(mode: Mode) -> Harness {
        let cluster = NatsCluster::start(3);
        let broker = KafkaBroker::start();
        let topic = random_name("faults");
        broker.create_topic(&topic, 2);
        let ledger: Arc<Mutex<Ledger>> = Arc::default();
        let recorded = ledger.clone();
        let function =
            FunctionServer::start(move |received, _| behave(mode, &recorded, received)).await;
        // A hanging call (5 s) is given up on at the function's 1 s timeout, and its
        // slot goes to another call while this server still sleeps on it: counted as
        // in flight for 800 ms only, so the peak is what Switchyard had in flight (a
        // margin for the call's way to the server under load).
        function.count_in_flight_for(Duration::from_millis(800));
        let prefix = random_name("f");
        let events_stream = format!("{}_EVENTS", prefix.to_uppercase());
        let text = format!(
            r#"
[nats]
url = "{urls}"
subject_prefix = "{prefix}"
publish_timeout = "3s"
events_stream = {{ name = "{events_stream}", replicas = 3, duplicate_window = "5m" }}
dead_letter_stream = {{ name = "{upper}_DLQ", replicas = 3 }}

[admin]
listen = "127.0.0.1:0"

[log]
level = "${{SWITCHYARD_TEST_LOG:-error}}"

[dispatcher]
shutdown_grace = "2s"

[[sources]]
type = "http"
name = "http"
listen = "127.0.0.1:0"

[[sources]]
type = "kafka"
name = "orders"
brokers = "{brokers}"
topics = ["{topic}"]
start = "earliest"
types = {{ "{topic}" = "com.example.order" }}
properties = {{ "session.timeout.ms" = 6000, "heartbeat.interval.ms" = 500, "auto.commit.interval.ms" = 200 }}

[[functions]]
type = "http"
name = "fn"
url = "{url}"
timeout = "1s"
max_concurrency = {MAX_CONCURRENCY}

[[triggers]]
name = "main"
function = "fn"
ack_wait = "10s"
retry = {{ policy = "fixed", initial = "200ms", attempts = {ATTEMPTS}, jitter = false }}
"#,
            urls = cluster.urls(),
            upper = prefix.to_uppercase(),
            brokers = broker.bootstrap(),
            url = function.url,
        );
        let directory = tempfile::tempdir().unwrap();
        let config = write_config(directory.path(), &text);
        let mut harness = Harness {
            cluster,
            _broker: broker,
            function,
            ledger,
            config,
            _directory: directory,
            processes: Vec::new(),
            targets: Arc::default(),
            admins: Arc::default(),
            accepted: Arc::default(),
            produced: Arc::default(),
            paused: Arc::new(AtomicBool::new(false)),
            stopped: Arc::new(AtomicBool::new(false)),
            posted: Arc::default(),
            refused: Arc::default(),
            readyz: Arc::default(),
            faults: Vec::new(),
            kills: 0,
            events_stream,
        };
        for _ in 0..2 {
            harness.processes.push(None);
        }
        for index in 0..2 {
            harness.start_process(index).await;
        }
        harness.spawn_ingest();
        harness.spawn_kafka(topic);
        harness.spawn_readyz();
        harness
    }

    async fn start_process(&mut self, index: usize) {
        let process = Process::start(&self.config, &[]);
        process.wait_ready().await;
        self.processes[index] = Some(process);
        self.refresh_targets();
    }

    fn refresh_targets(&self) {
        *self.targets.lock().unwrap() = self
            .processes
            .iter()
            .flatten()
            .map(|process| process.source("http"))
            .collect();
        *self.admins.lock().unwrap() = self
            .processes
            .iter()
            .flatten()
            .map(Process::admin)
            .collect();
    }

    /// Posts `h-<n>` events to the live processes in turn, each retried (same id)
    /// until a 202 or three refusals.
    fn spawn_ingest(&self) {
        let (targets, accepted, paused, stopped, posted, refused) = (
            self.targets.clone(),
            self.accepted.clone(),
            self.paused.clone(),
            self.stopped.clone(),
            self.posted.clone(),
            self.refused.clone(),
        );
        tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap();
            let mut n = 0usize;
            while !stopped.load(Ordering::SeqCst) {
                if paused.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                let key = format!("h-{n}");
                let body = format!("\"{key}\"");
                for attempt in 0..3 {
                    let live = targets.lock().unwrap().clone();
                    if live.is_empty() {
                        break;
                    }
                    let target = live[(n + attempt) % live.len()];
                    posted.fetch_add(1, Ordering::SeqCst);
                    let status = client
                        .post(format!("http://{target}/v1/events"))
                        .header("ce-specversion", "1.0")
                        .header("ce-id", &key)
                        .header("ce-source", "/faults")
                        .header("ce-type", "com.example.fault")
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await
                        .map(|response| response.status().as_u16());
                    if status.as_ref().ok() == Some(&202) {
                        accepted.lock().unwrap().insert(key.clone());
                        break;
                    }
                    refused.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        });
    }

    /// Produces `k-<n>` records, each acknowledged by the broker.
    fn spawn_kafka(&self, topic: String) {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", self._broker.bootstrap())
            .set("message.timeout.ms", "120000")
            .create()
            .unwrap();
        let (produced, paused, stopped) = (
            self.produced.clone(),
            self.paused.clone(),
            self.stopped.clone(),
        );
        tokio::spawn(async move {
            let mut n = 0usize;
            while !stopped.load(Ordering::SeqCst) {
                if paused.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                let key = format!("k-{n}");
                let partition_key = format!("p{}", n % 5);
                if producer
                    .send(
                        FutureRecord::to(&topic).key(&partition_key).payload(&key),
                        Duration::from_secs(60),
                    )
                    .await
                    .is_ok()
                {
                    produced.lock().unwrap().insert(key);
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        });
    }

    /// Asks every live process's `/readyz` every 200 ms and counts the answers.
    fn spawn_readyz(&self) {
        let (readyz, stopped, admins) = (
            self.readyz.clone(),
            self.stopped.clone(),
            self.admins.clone(),
        );
        tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap();
            while !stopped.load(Ordering::SeqCst) {
                let live = admins.lock().unwrap().clone();
                for admin in &live {
                    let answer = match client.get(format!("http://{admin}/readyz")).send().await {
                        Ok(response) => response.status().as_u16().to_string(),
                        Err(error) if error.is_timeout() => "no answer in 5s".to_owned(),
                        Err(_) => "process down".to_owned(),
                    };
                    *readyz.lock().unwrap().entry(answer).or_default() += 1;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }

    /// The node leading the events stream.
    async fn leader(&self) -> usize {
        let config = switchyard_bus::BusConfig {
            url: self.cluster.urls(),
            ..Default::default()
        };
        let deadline = Instant::now() + SETTLE;
        loop {
            if let Ok(bus) = switchyard_bus::Bus::connect(&config).await
                && let Ok(mut stream) = bus.jetstream().get_stream(&self.events_stream).await
                && let Ok(info) = stream.info().await
                && let Some(leader) = info
                    .cluster
                    .as_ref()
                    .and_then(|cluster| cluster.leader.clone())
                && let Some(index) = (0..3).find(|index| NatsCluster::name(*index) == leader)
            {
                return index;
            }
            assert!(Instant::now() < deadline, "no leader of the events stream");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Lets events flow for `duration` (the fault in place).
    async fn run_for(&self, duration: Duration) {
        tokio::time::sleep(duration).await;
    }

    /// Pauses ingest and waits until everything accepted is delivered or
    /// dead-lettered, then checks the invariants and resumes.
    async fn settle_and_check(&mut self, fault: &str) {
        self.paused.store(true, Ordering::SeqCst);
        // Ingest requests in flight finish within their client timeout.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let deadline = Instant::now() + SETTLE;
        let parsed = switchyard::config::load(&self.config).unwrap();
        let bus = switchyard_bus::Bus::connect(&parsed.nats).await.unwrap();
        let (lost, dead) = loop {
            let dead: HashSet<String> = switchyard::dlq::list(&bus, "main")
                .await
                .map(|entries| {
                    entries
                        .iter()
                        .map(|entry| {
                            String::from_utf8_lossy(&entry.dead_letter.event.data)
                                .trim_matches('"')
                                .to_owned()
                        })
                        .collect()
                })
                .unwrap_or_default();
            let succeeded = self.ledger.lock().unwrap().succeeded.clone();
            let wanted: Vec<String> = self
                .accepted
                .lock()
                .unwrap()
                .iter()
                .chain(self.produced.lock().unwrap().iter())
                .cloned()
                .collect();
            let lost: Vec<String> = wanted
                .into_iter()
                .filter(|key| !succeeded.contains(key) && !dead.contains(key))
                .collect();
            if lost.is_empty() || Instant::now() > deadline {
                break (lost, dead);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        let (summary, most_calls) = {
            let ledger = self.ledger.lock().unwrap();
            let accepted = self.accepted.lock().unwrap().len();
            let produced = self.produced.lock().unwrap().len();
            // Calls after the first that succeeded: the event was delivered again.
            let duplicates: usize = ledger
                .first_success
                .iter()
                .map(|(key, first)| ledger.calls[key].saturating_sub(*first))
                .sum();
            let most_calls = ledger.calls.values().copied().max().unwrap_or_default();
            let summary = format!(
                "{fault}: {accepted} accepted over HTTP ({} posts, {} refused), {produced} Kafka records, {} delivered, {} dead-lettered, lost {}, duplicate calls {duplicates}, most calls for one event {most_calls}, function peak concurrency {}, /readyz answers during this phase {:?}",
                self.posted.load(Ordering::SeqCst),
                self.refused.load(Ordering::SeqCst),
                ledger.succeeded.len(),
                dead.len(),
                lost.len(),
                self.function.peak(),
                std::mem::take(&mut *self.readyz.lock().unwrap()),
            );
            (summary, most_calls)
        };
        println!("{summary}");
        self.faults.push(summary);
        assert!(lost.is_empty(), "{fault}: lost {lost:?}");
        assert!(
            self.function.peak() <= MAX_CONCURRENCY,
            "{fault}: function concurrency {} over {MAX_CONCURRENCY}",
            self.function.peak()
        );
        // Each attempt at most once, but an attempt in flight when a process or
        // node died is made again by whoever takes the event over.
        let allowed = ATTEMPTS + self.kills;
        assert!(
            most_calls <= allowed,
            "{fault}: an event was called {most_calls} times, more than its {ATTEMPTS} attempts plus {} takeovers",
            self.kills
        );
        // Every live process is ready again.
        for process in self.processes.iter().flatten() {
            let deadline = Instant::now() + SETTLE;
            loop {
                let status = reqwest::get(format!("http://{}/readyz", process.admin()))
                    .await
                    .map(|response| response.status().as_u16());
                if status.as_ref().ok() == Some(&200) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{fault}: /readyz {status:?} after the fault"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        self.paused.store(false, Ordering::SeqCst);
    }

    async fn run(&mut self, rounds: usize) {
        self.run_for(Duration::from_secs(2)).await;
        self.settle_and_check("steady state").await;
        for round in 0..rounds {
            // The events stream's leader, SIGKILLed, then started again.
            let leader = self.leader().await;
            self.cluster.kill(leader);
            self.kills += 1;
            self.run_for(Duration::from_secs(3)).await;
            self.cluster.restart(leader);
            self.settle_and_check(&format!(
                "round {round}: stream leader n{leader} killed and restarted"
            ))
            .await;

            // A rolling restart of every node.
            for node in 0..3 {
                self.cluster.kill(node);
                self.run_for(Duration::from_secs(1)).await;
                self.cluster.restart(node);
                self.run_for(Duration::from_secs(2)).await;
            }
            self.kills += 3;
            self.settle_and_check(&format!("round {round}: rolling restart of 3 nodes"))
                .await;

            // A hung node: stopped past its heartbeats (the leader, so a new one is
            // elected), then continued.
            let leader = self.leader().await;
            self.cluster.signal(leader, Signal::SIGSTOP);
            self.run_for(Duration::from_secs(8)).await;
            self.cluster.signal(leader, Signal::SIGCONT);
            self.kills += 1;
            self.settle_and_check(&format!(
                "round {round}: leader n{leader} stopped 8s, continued"
            ))
            .await;

            // A Switchyard process SIGKILLed and started again.
            if let Some(process) = self.processes[0].take() {
                process.signal(Signal::SIGKILL);
                drop(process);
            }
            self.kills += 1;
            self.refresh_targets();
            self.run_for(Duration::from_secs(2)).await;
            self.start_process(0).await;
            self.settle_and_check(&format!(
                "round {round}: a switchyard process killed and restarted"
            ))
            .await;
        }
        // One of two processes dies for good: the other takes its work over.
        if let Some(process) = self.processes[1].take() {
            process.signal(Signal::SIGKILL);
            drop(process);
        }
        self.kills += 1;
        self.refresh_targets();
        self.run_for(Duration::from_secs(3)).await;
        self.settle_and_check("one of two switchyard processes died")
            .await;
        self.stopped.store(true, Ordering::SeqCst);
    }
}

fn rounds() -> usize {
    std::env::var("SWITCHYARD_FAULT_ROUNDS")
        .ok()
        .and_then(|rounds| rounds.parse().ok())
        .unwrap_or(1)
}

/// One harness at a time: each runs three nats-servers, a Kafka broker and two
/// Switchyard processes.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_accepted_is_lost_through_cluster_and_process_faults() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut harness = Harness::start(Mode::SometimesFails).await;
    harness.run(rounds()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_accepted_is_lost_with_a_function_that_hangs_crashes_and_answers_garbage() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut harness = Harness::start(Mode::Misbehaves).await;
    harness.run(rounds()).await;
}
