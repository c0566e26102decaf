//! Trigger consumers across configuration changes and accidents, against a real
//! nats-server: a consumer that disappeared is recreated from where it was; the
//! consumers of a removed trigger that still hold events are reported and can be
//! drained into its dead letters; a changed `start` is refused with what to do.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{FunctionServer, NatsServer, Reply, Switchyard, WAIT, base_config};
use switchyard_event::Event;

fn config(nats: &NatsServer, function: &FunctionServer, triggers: &[(&str, &str)]) -> String {
    let mut text = base_config(&nats.url(), 0, 0);
    text.push_str(&format!(
        "\n[[functions]]\ntype = \"http\"\nname = \"fn\"\nurl = \"{}\"\n",
        function.url
    ));
    for (name, extra) in triggers {
        text.push_str(&format!(
            "\n[[triggers]]\nname = \"{name}\"\nfunction = \"fn\"\n{extra}\n"
        ));
    }
    text
}

async fn publish(bus: &switchyard_bus::Bus, ids: &[&str]) {
    let events: Vec<Event> = ids
        .iter()
        .map(|id| Event::new(*id, "/tests", "com.example.t"))
        .collect();
    bus.publish_events(&events).await.unwrap();
}

/// A consumer deleted while Switchyard was stopped (by hand, or lost with a server)
/// is recreated from the event after its last acknowledged one: the events stored
/// meanwhile are delivered, not skipped as "before the trigger existed".
#[tokio::test]
async fn a_missing_consumer_is_recreated_from_its_last_acknowledged_position() {
    let nats = NatsServer::start();
    let function = FunctionServer::start(|_, _| Reply::ok()).await;
    let text = config(&nats, &function, &[("main", "")]);
    let switchyard = Switchyard::start(text.clone()).await;
    let bus = switchyard.bus().await;
    publish(&bus, &["e1", "e2", "e3"]).await;
    function.wait_for(3, WAIT).await;
    // Wait until the position after e3 (sequence 3) is recorded.
    let positions = bus
        .jetstream()
        .get_key_value(format!("{}_POSITIONS", bus.events_stream()))
        .await
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while positions
        .get("switchyard-main")
        .await
        .unwrap()
        .is_none_or(|value| !value.ends_with(b" 3"))
    {
        assert!(Instant::now() < deadline, "the position was never recorded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    switchyard.stop().await;
    let stream = bus
        .jetstream()
        .get_stream(bus.events_stream())
        .await
        .unwrap();
    stream.delete_consumer("switchyard-main").await.unwrap();
    publish(&bus, &["e4", "e5"]).await;

    let switchyard = Switchyard::start(text).await;
    let received = function.wait_for(5, WAIT).await;
    let mut ids: Vec<_> = received.iter().map(|call| call.id().to_owned()).collect();
    ids.sort();
    assert_eq!(ids, ["e1", "e2", "e3", "e4", "e5"]);
    switchyard.stop().await;
}

use common::run_cli as cli;

/// A trigger removed from the configuration while events wait for it: reported at
/// start (log and `/v1/triggers`), and `dlq drain` moves them into its dead letters
/// and deletes its consumers.
#[tokio::test]
async fn a_removed_trigger_with_waiting_events_is_reported_and_drained() {
    let nats = NatsServer::start();
    let function = FunctionServer::start(|_, _| Reply::ok()).await;
    let both = config(&nats, &function, &[("main", ""), ("old", "")]);
    let switchyard = Switchyard::start(both.clone()).await;
    let bus = switchyard.bus().await;
    switchyard.stop().await;
    publish(&bus, &["w1", "w2", "w3"]).await;

    let only_main = config(&nats, &function, &[("main", "")]);
    // Same streams: base_config's names are per call, so take them from the first.
    let only_main = {
        let prefix_line = |text: &str, key: &str| {
            text.lines()
                .find(|line| line.starts_with(key))
                .unwrap()
                .to_owned()
        };
        let mut text = only_main.clone();
        for key in ["subject_prefix", "events_stream", "dead_letter_stream"] {
            text = text.replace(&prefix_line(&only_main, key), &prefix_line(&both, key));
        }
        text
    };
    let switchyard = Switchyard::start(only_main.clone()).await;
    function.wait_for(3, WAIT).await;
    let triggers: serde_json::Value = switchyard.admin_json("/v1/triggers").await;
    let orphaned = triggers["orphaned_consumers"].as_array().unwrap();
    assert_eq!(orphaned.len(), 1, "{triggers}");
    assert_eq!(orphaned[0]["consumer"], "switchyard-old");
    assert_eq!(orphaned[0]["trigger"], "old");
    assert_eq!(orphaned[0]["pending"], 3);

    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("switchyard.toml");
    std::fs::write(&path, &only_main).unwrap();
    let (ok, output) = cli(&path, &["dlq", "drain", "--trigger", "main"]);
    assert!(!ok && output.contains("only a removed trigger"), "{output}");
    let (ok, output) = cli(&path, &["dlq", "drain", "--trigger", "old"]);
    assert!(ok && output.contains("drained 3 events"), "{output}");
    let dead = switchyard::dlq::list(&bus, "old").await.unwrap();
    let mut ids: Vec<_> = dead
        .iter()
        .map(|entry| {
            assert_eq!(entry.dead_letter.reason, "trigger_removed");
            entry.dead_letter.event.id.clone()
        })
        .collect();
    ids.sort();
    assert_eq!(ids, ["w1", "w2", "w3"]);
    let stream = bus
        .jetstream()
        .get_stream(bus.events_stream())
        .await
        .unwrap();
    for name in [
        "switchyard-old",
        "switchyard-old-direct",
        "switchyard-old-retry",
    ] {
        assert!(stream.consumer_info(name).await.is_err(), "{name} deleted");
    }
    switchyard.stop().await;
    let switchyard = Switchyard::start(only_main).await;
    let triggers: serde_json::Value = switchyard.admin_json("/v1/triggers").await;
    assert_eq!(triggers["orphaned_consumers"], serde_json::json!([]));
    switchyard.stop().await;
}

/// Adding `start = "all"` to an existing trigger cannot be applied (JetStream fixes
/// where a consumer starts): the process exits at once with the field, both values
/// and what to do, instead of a raw JetStream error.
#[tokio::test]
async fn a_changed_start_is_refused_with_what_to_do() {
    let nats = NatsServer::start();
    let function = FunctionServer::start(|_, _| Reply::ok()).await;
    let text = config(&nats, &function, &[("main", "")]);
    let switchyard = Switchyard::start(text.clone()).await;
    switchyard.stop().await;
    let changed = text.replace(
        "name = \"main\"\nfunction = \"fn\"\n",
        "name = \"main\"\nfunction = \"fn\"\nstart = \"all\"\n",
    );
    assert_ne!(changed, text);
    let (ok, stderr) = run_until_exit(&changed).await;
    assert!(!ok);
    assert!(
        stderr.contains("switchyard-main")
            && stderr.contains("start = \"all\"")
            && stderr.contains("give the trigger a new name"),
        "{stderr}"
    );
}

/// Runs `switchyard run` on `text` and returns its stderr once it exits (it must).
async fn run_until_exit(text: &str) -> (bool, String) {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("switchyard.toml");
    std::fs::write(&path, text).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["run", "--config"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("switchyard did not exit");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    (status.success(), stderr)
}

/// Stream changes JetStream cannot apply (a stream's storage, more replicas than
/// servers) stop the process with the field, the values and what to do, instead of
/// leaving it unready forever; `validate --check-nats` reports them, and a changed
/// `start`, before a deploy.
#[tokio::test]
async fn stream_changes_the_server_cannot_apply_are_refused_and_reported_by_validate() {
    let nats = NatsServer::start();
    let function = FunctionServer::start(|_, _| Reply::ok()).await;
    let text = config(&nats, &function, &[("main", "")]);
    let switchyard = Switchyard::start(text.clone()).await;
    switchyard.stop().await;

    let file_storage = text.replacen(
        "storage = \"memory\", duplicate_window",
        "storage = \"file\", duplicate_window",
        1,
    );
    assert_ne!(file_storage, text);
    let (ok, stderr) = run_until_exit(&file_storage).await;
    assert!(!ok);
    assert!(
        stderr.contains("nats.events_stream.storage")
            && stderr.contains("is stored in `memory`, the configuration says `file`"),
        "{stderr}"
    );

    let replicated = text.replacen(
        "storage = \"memory\", duplicate_window",
        "storage = \"memory\", replicas = 3, duplicate_window",
        1,
    );
    let (ok, stderr) = run_until_exit(&replicated).await;
    assert!(!ok);
    assert!(
        stderr.contains("nats.events_stream.replicas") && stderr.contains("3 replicas"),
        "{stderr}"
    );

    let both = file_storage.replace(
        "name = \"main\"\nfunction = \"fn\"\n",
        "name = \"main\"\nfunction = \"fn\"\nstart = \"all\"\n",
    );
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("switchyard.toml");
    std::fs::write(&path, &both).unwrap();
    let (ok, output) = cli(&path, &["validate"]);
    assert!(
        ok,
        "without --check-nats only the file is checked: {output}"
    );
    let (ok, output) = cli(&path, &["validate", "--check-nats"]);
    assert!(!ok);
    assert!(
        output.contains("nats.events_stream.storage")
            && output.contains("trigger `main`: `start = \"all\"`"),
        "{output}"
    );
}
