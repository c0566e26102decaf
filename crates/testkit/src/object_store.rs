//! A real S3-compatible object store for tests: versitygw (Apache-2.0), built from its
//! Go module by the project's scripts, serving a temporary directory (its POSIX
//! backend) on a random port, with its bucket event notifications pointed where a
//! test asks. See docs/TESTING.md for why it is versitygw and not MinIO.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::{ServerProcess, free_port, installed};

pub const ACCESS_KEY: &str = "switchyard";
pub const SECRET_KEY: &str = "switchyard-secret";
pub const REGION: &str = "us-east-1";

/// The versitygw binary the project's scripts installed.
pub fn object_store_binary() -> PathBuf {
    installed(
        "SWITCHYARD_S3_SERVER",
        "versitygw-1.8.0/bin/versitygw",
        "the S3 test server (versitygw)",
    )
}

/// Where the store sends its event notifications (one sink per store).
#[derive(Debug, Clone)]
pub enum Notifications {
    None,
    /// POSTs every notification to this URL (must be listening when the store starts).
    Webhook(String),
    /// Publishes every notification on this core NATS subject.
    Nats {
        url: String,
        subject: String,
    },
    /// Produces every notification to this Kafka topic.
    Kafka {
        brokers: String,
        topic: String,
    },
}

/// A running object store, stopped on drop; its data survives `stop`/`restart`.
pub struct ObjectStore {
    server: Option<ServerProcess>,
    pub port: u16,
    notifications: Notifications,
    data: std::sync::Arc<tempfile::TempDir>,
}

impl ObjectStore {
    pub fn start(notifications: Notifications) -> ObjectStore {
        ObjectStore::start_later(notifications).run()
    }

    /// A store whose port and endpoint are known but that is not running yet (start it
    /// with [`ObjectStore::run`]), for a webhook that must be up before it starts.
    pub fn start_later(notifications: Notifications) -> ObjectStore {
        ObjectStore {
            server: None,
            port: free_port(),
            notifications,
            data: std::sync::Arc::new(tempfile::tempdir().unwrap()),
        }
    }

    pub fn run(mut self) -> ObjectStore {
        let (port, notifications, data) =
            (self.port, self.notifications.clone(), self.data.clone());
        self.server = Some(ServerProcess::start(
            "versitygw",
            port,
            Duration::from_secs(30),
            move || {
                let mut command = Command::new(object_store_binary());
                command
                    .env("ROOT_ACCESS_KEY", ACCESS_KEY)
                    .env("ROOT_SECRET_KEY", SECRET_KEY)
                    .args(["--port", &format!("127.0.0.1:{port}")])
                    .args(["--region", REGION]);
                match &notifications {
                    Notifications::None => {}
                    Notifications::Webhook(url) => {
                        command.args(["--event-webhook-url", url]);
                    }
                    Notifications::Nats { url, subject } => {
                        command.args(["--event-nats-url", url, "--event-nats-topic", subject]);
                    }
                    Notifications::Kafka { brokers, topic } => {
                        command.args(["--event-kafka-url", brokers, "--event-kafka-topic", topic]);
                    }
                }
                command
                    .arg("posix")
                    .arg(data.path())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
                command
            },
        ));
        self
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Kills the store (SIGKILL), keeping its data.
    pub fn stop(&mut self) {
        if let Some(server) = &mut self.server {
            server.stop();
        }
    }

    /// Starts it again on the same port with the same data.
    pub fn restart(&mut self) {
        if let Some(server) = &mut self.server {
            server.restart();
        }
    }

    /// This store as Switchyard's config describes it.
    pub fn store_config(&self) -> switchyard_connector_s3::store::StoreConfig {
        switchyard_connector_s3::store::StoreConfig {
            endpoint: Some(self.endpoint()),
            region: REGION.to_owned(),
            path_style: None,
            access_key_id: Some(ACCESS_KEY.to_owned()),
            secret_access_key: Some(SECRET_KEY.into()),
            session_token: None,
            event_source: "aws:s3".to_owned(),
            event_region: None,
        }
    }

    /// An S3 client (aws-sdk-s3) for this store.
    pub async fn client(&self) -> aws_sdk_s3::Client {
        self.store_config().client().await
    }

    /// A `[stores.<name>]` table for this store.
    pub fn config_table(&self, name: &str) -> String {
        format!(
            "\n[stores.{name}]\nendpoint = \"{}\"\nregion = \"{REGION}\"\naccess_key_id = \"{ACCESS_KEY}\"\nsecret_access_key = \"{SECRET_KEY}\"\n",
            self.endpoint()
        )
    }
}
