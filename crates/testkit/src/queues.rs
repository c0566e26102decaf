//! The queue servers of the SQS and AMQP sources' tests: ElasticMQ (SQS-compatible,
//! from Maven Central) and a private RabbitMQ node (Debian's rabbitmq-server), each
//! a plain process on 127.0.0.1 with its data in a temporary directory, stopped on
//! drop.

use std::io::{Read as _, Write as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::{free_port, installed};

/// ElasticMQ's jars the project's scripts installed.
pub fn elasticmq_lib() -> PathBuf {
    installed(
        "SWITCHYARD_ELASTICMQ_LIB",
        "elasticmq-1.7.1/lib",
        "ElasticMQ (the SQS-compatible test server)",
    )
}

/// An ElasticMQ server on a port it picks itself (it logs the port it bound), with
/// queues in memory; stopped on drop.
pub struct SqsServer {
    child: Option<Child>,
    pub port: u16,
    directory: tempfile::TempDir,
}

impl SqsServer {
    pub fn start() -> SqsServer {
        let directory = tempfile::tempdir().unwrap();
        let mut server = SqsServer {
            child: None,
            port: 0,
            directory,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let config = self.directory.path().join("elasticmq.conf");
        // The include keeps ElasticMQ's own defaults (without it the request timeout
        // is 20 s, and a 20 s long poll on an empty queue fails with 503).
        std::fs::write(
            &config,
            "include classpath(\"application.conf\")\n\
             node-address { protocol = http, host = \"127.0.0.1\", port = 0, context-path = \"\" }\n\
             rest-sqs { enabled = true, bind-port = 0, bind-hostname = \"127.0.0.1\", sqs-limits = strict }\n\
             generate-node-address = true\n\
             aws { region = us-east-1, accountId = \"000000000000\" }\n",
        )
        .unwrap();
        let log = self.directory.path().join("elasticmq.log");
        let child = Command::new("java")
            .args([
                "-Xms16m",
                "-Xmx256m",
                "-XX:+UseSerialGC",
                "-XX:TieredStopAtLevel=1",
            ])
            .arg(format!("-Dconfig.file={}", config.display()))
            .arg("-cp")
            .arg(format!("{}/*", elasticmq_lib().display()))
            .arg("org.elasticmq.server.Main")
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting ElasticMQ (java)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(port) = text
                .lines()
                .find_map(|line| line.split("Started SQS rest server, bind address ").nth(1))
                .and_then(|address| address.trim().rsplit(':').next()?.parse().ok())
                && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            {
                self.port = port;
                return;
            }
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("ElasticMQ exited with {status} before it listened:\n{text}");
            }
            assert!(
                Instant::now() < deadline,
                "ElasticMQ did not start:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The endpoint SQS clients are pointed at.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for SqsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Three consecutive free ports (RabbitMQ's AMQP, distribution and epmd ports).
fn three_free_ports() -> u16 {
    for _ in 0..1000 {
        let (first, second, third) = (free_port(), free_port(), free_port());
        if second == first + 1 && third == first + 2 {
            return first;
        }
    }
    panic!("no three consecutive free ports")
}

/// A private RabbitMQ node (scripts/rabbitmq-node.sh) on three consecutive ports, in
/// a process group of its own that is stopped whole on drop; user `guest`/`guest`.
pub struct RabbitServer {
    child: Option<Child>,
    pub port: u16,
    directory: tempfile::TempDir,
}

impl RabbitServer {
    pub fn start() -> RabbitServer {
        let directory = tempfile::tempdir().unwrap();
        let mut server = RabbitServer {
            child: None,
            port: three_free_ports(),
            directory,
        };
        server.spawn(false);
        server
    }

    fn script() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/rabbitmq-node.sh")
    }

    fn spawn(&mut self, keep: bool) {
        let node = self.directory.path().join("node");
        let log = std::fs::File::create(self.directory.path().join("rabbitmq.log")).unwrap();
        let mut command = Command::new("bash");
        command
            .arg(Self::script())
            .arg(&node)
            .arg(self.port.to_string())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0);
        if keep {
            command.arg("keep");
        }
        let child = command.spawn().expect("starting rabbitmq-node.sh");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(90);
        while !amqp_answers(self.port) {
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.try_wait()
            {
                let text = std::fs::read_to_string(self.directory.path().join("rabbitmq.log"))
                    .unwrap_or_default();
                panic!("RabbitMQ exited with {status} before it listened:\n{text}");
            }
            assert!(Instant::now() < deadline, "RabbitMQ did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The URL AMQP clients connect to.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Stops the whole node (its process group), gracefully first.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let group = Pid::from_raw(child.id() as i32);
        let _ = killpg(group, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = killpg(group, Signal::SIGKILL);
        let _ = child.wait();
    }

    /// Starts it again on the same ports with the same data.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn(true);
    }
}

impl Drop for RabbitServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether an AMQP 0-9-1 server answers the protocol header with Connection.Start.
fn amqp_answers(port: u16) -> bool {
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream.write_all(b"AMQP\x00\x00\x09\x01").is_err() {
        return false;
    }
    let mut frame = [0u8; 11];
    stream.read_exact(&mut frame).is_ok() && frame[0] == 1 && frame[7..11] == [0, 10, 0, 10]
}

/// A mosquitto broker (Debian's) on a free port, persistent (its sessions and queued
/// messages survive a restart), users `switchyard`/`mqtt-secret` required when
/// started with [`MosquittoServer::start_with_password`]; stopped on drop.
pub struct MosquittoServer {
    server: crate::ServerProcess,
    pub port: u16,
    /// The TLS listener's port, when started with [`MosquittoServer::start_tls`].
    pub tls_port: Option<u16>,
    _directory: tempfile::TempDir,
}

impl MosquittoServer {
    /// Anonymous clients allowed.
    pub fn start() -> MosquittoServer {
        Self::start_inner(false, None)
    }

    /// Only `switchyard` with password `mqtt-secret` (and `producer`/`producer`).
    pub fn start_with_password() -> MosquittoServer {
        Self::start_inner(true, None)
    }

    /// Anonymous clients allowed, on the plain port and on a second, TLS listener
    /// (`tls_port`) serving `certs/server.pem` (key `certs/server-key.pem`) and
    /// requiring a client certificate issued by a CA of `certs/ca.pem`.
    pub fn start_tls(certs: &std::path::Path) -> MosquittoServer {
        Self::start_inner(false, Some(certs))
    }

    fn start_inner(passwords: bool, certs: Option<&std::path::Path>) -> MosquittoServer {
        let directory = tempfile::tempdir().unwrap();
        let port = free_port();
        let data = directory.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let mut text = format!(
            "user root\n\
             listener {port} 127.0.0.1\n\
             persistence true\n\
             persistence_location {}/\n\
             autosave_interval 1\n\
             max_queued_messages 20000\n\
             max_inflight_messages 20\n\
             log_dest file {}\n\
             log_type error\n\
             log_type warning\n",
            data.display(),
            directory.path().join("mosquitto.log").display(),
        );
        if passwords {
            let file = directory.path().join("passwords");
            for (user, password) in [("switchyard", "mqtt-secret"), ("producer", "producer")] {
                let mut command = Command::new("mosquitto_passwd");
                if !file.exists() {
                    command.arg("-c");
                }
                let status = command
                    .arg("-b")
                    .arg(&file)
                    .args([user, password])
                    .status()
                    .expect("running mosquitto_passwd");
                assert!(status.success(), "mosquitto_passwd failed");
            }
            text.push_str(&format!(
                "allow_anonymous false\npassword_file {}\n",
                file.display()
            ));
        } else {
            text.push_str("allow_anonymous true\n");
        }
        // Listener options apply to the listener above them: this one goes last.
        let tls_port = certs.map(|certs| {
            let tls_port = free_port();
            text.push_str(&format!(
                "listener {tls_port} 127.0.0.1\n\
                 cafile {ca}\n\
                 certfile {cert}\n\
                 keyfile {key}\n\
                 require_certificate true\n",
                ca = certs.join("ca.pem").display(),
                cert = certs.join("server.pem").display(),
                key = certs.join("server-key.pem").display(),
            ));
            tls_port
        });
        let config = directory.path().join("mosquitto.conf");
        std::fs::write(&config, text).unwrap();
        let server =
            crate::ServerProcess::start("mosquitto", port, Duration::from_secs(30), move || {
                let mut command = Command::new("/usr/sbin/mosquitto");
                command
                    .arg("-c")
                    .arg(&config)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
                command
            });
        MosquittoServer {
            server,
            port,
            tls_port,
            _directory: directory,
        }
    }

    /// Stops the broker (SIGTERM: it saves its sessions and queued messages) and
    /// starts it again on the same port with its data.
    pub fn restart(&mut self) {
        if let Some(pid) = self.server.pid() {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.server.restart();
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}
