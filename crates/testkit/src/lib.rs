//! Real servers for Switchyard's tests and benchmarks: nats-server with JetStream, a
//! single-node Apache Kafka broker in KRaft mode, from the jars the project's scripts
//! install, and an S3-compatible object store ([`object_store`]).

pub mod browser;
pub mod jaeger;
pub mod object_store;
pub mod queues;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1 for a server started later.
///
/// Taken from below Linux's ephemeral range (32768-60999 by default), where nothing
/// binding port 0 (Switchyard, NATS, Kafka, test servers) is ever given a port: a port
/// reserved here and released cannot be taken by another listener before the server it
/// was chosen for binds it. Successive calls in one process walk the range from a
/// per-process start, so two tests never get the same port; each candidate is checked
/// free by binding it.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id().wrapping_mul(7_919)) % SPAN,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 127.0.0.1:{LOW}-{}", LOW + SPAN)
}

/// The client port in a nats-server ports file
/// (`{"nats":["nats://127.0.0.1:4222"],...}`).
fn client_port(text: &str) -> Option<u16> {
    let value: serde_json::Value = serde_json::from_str(text).ok()?;
    value["nats"]
        .as_array()?
        .iter()
        .filter_map(|url| url.as_str()?.rsplit(':').next()?.parse().ok())
        .next()
}

/// Where the project's scripts installed something: `$variable` if set, else
/// `~/.cache/switchyard/<cached>`; panics with how to install it otherwise.
pub fn installed(variable: &str, cached: &str, what: &str) -> PathBuf {
    if let Ok(path) = std::env::var(variable) {
        return PathBuf::from(path);
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let cached = Path::new(&home).join(".cache/switchyard").join(cached);
    if cached.exists() {
        return cached;
    }
    panic!(
        "{what} is not installed: run scripts/install-deps.sh (or scripts/test.sh), or set {variable}"
    );
}

/// The Kafka broker's jars the project's scripts installed.
pub fn kafka_lib() -> PathBuf {
    installed(
        "SWITCHYARD_KAFKA_LIB",
        "kafka-4.1.1/lib",
        "the kafka broker",
    )
}

/// The nats-server binary the project's scripts installed.
pub fn nats_server_binary() -> PathBuf {
    installed(
        "SWITCHYARD_NATS_SERVER",
        "nats-server-2.15.1/bin/nats-server",
        "nats-server",
    )
}

/// Runs a Kafka (Java) tool class with the broker's jars; returns success and output.
pub fn kafka_tool(class: &str, arguments: &[&str]) -> (bool, String) {
    let output = Command::new("java")
        .arg("-cp")
        .arg(format!("{}/*", kafka_lib().display()))
        .arg(class)
        .args(arguments)
        .output()
        .expect("running java");
    let text = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

/// A single-node Apache Kafka broker in KRaft mode (broker and controller in one JVM)
/// on random ports with a temporary log directory, stopped on drop.
pub struct KafkaBroker {
    server: ServerProcess,
    pub port: u16,
    _directory: tempfile::TempDir,
}

impl KafkaBroker {
    pub fn start() -> KafkaBroker {
        let directory = tempfile::tempdir().unwrap();
        let (port, controller_port) = (free_port(), free_port());
        let properties = directory.path().join("server.properties");
        std::fs::write(
            &properties,
            format!(
                "process.roles=broker,controller\n\
                 node.id=1\n\
                 controller.quorum.voters=1@127.0.0.1:{controller_port}\n\
                 listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}\n\
                 advertised.listeners=PLAINTEXT://127.0.0.1:{port}\n\
                 controller.listener.names=CONTROLLER\n\
                 listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n\
                 log.dirs={}\n\
                 offsets.topic.replication.factor=1\n\
                 offsets.topic.num.partitions=4\n\
                 transaction.state.log.replication.factor=1\n\
                 transaction.state.log.min.isr=1\n\
                 group.initial.rebalance.delay.ms=0\n\
                 num.partitions=1\n",
                directory.path().join("data").display()
            ),
        )
        .unwrap();
        let properties_text = properties.display().to_string();
        let cluster_id = uuid::Uuid::new_v4().simple().to_string()[..22].to_owned();
        let (formatted, output) = kafka_tool(
            "kafka.tools.StorageTool",
            &[
                "format",
                "--cluster-id",
                &cluster_id,
                "--config",
                &properties_text,
            ],
        );
        assert!(
            formatted,
            "formatting the kafka log directory failed:\n{output}"
        );
        let server = ServerProcess::start(
            "the kafka broker",
            port,
            Duration::from_secs(60),
            move || {
                let mut command = Command::new("java");
                command
                    .args(["-Xmx512m", "-XX:+UseSerialGC", "-cp"])
                    .arg(format!("{}/*", kafka_lib().display()))
                    .arg("kafka.Kafka")
                    .arg(&properties)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
                command
            },
        );
        KafkaBroker {
            server,
            port,
            _directory: directory,
        }
    }

    /// Kills the broker (SIGKILL), keeping its data.
    pub fn stop(&mut self) {
        self.server.stop();
    }

    /// Starts it again on the same ports with the same data.
    pub fn restart(&mut self) {
        self.server.restart();
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Creates a topic with `partitions` partitions.
    pub fn create_topic(&self, topic: &str, partitions: u32) {
        let (created, output) = kafka_tool(
            "org.apache.kafka.tools.TopicCommand",
            &[
                "--bootstrap-server",
                &self.bootstrap(),
                "--create",
                "--topic",
                topic,
                "--partitions",
                &partitions.to_string(),
            ],
        );
        assert!(created, "creating topic {topic} failed:\n{output}");
    }
}

/// A server run as a child process on a known loopback port: started and waited for
/// (the port answers), killed and started again with the same arguments (and so the
/// same data), killed on drop.
pub struct ServerProcess {
    name: &'static str,
    port: u16,
    command: Box<dyn Fn() -> Command + Send + Sync>,
    ready_within: Duration,
    child: Option<Child>,
}

impl ServerProcess {
    /// Runs `command()` and waits until `port` accepts connections.
    pub fn start(
        name: &'static str,
        port: u16,
        ready_within: Duration,
        command: impl Fn() -> Command + Send + Sync + 'static,
    ) -> ServerProcess {
        let mut server = ServerProcess {
            name,
            port,
            command: Box::new(command),
            ready_within,
            child: None,
        };
        server.spawn();
        server
    }

    /// A server already started by `child` and listening on `port`; `command()` starts
    /// it again after [`ServerProcess::stop`].
    pub fn adopt(
        name: &'static str,
        port: u16,
        ready_within: Duration,
        command: impl Fn() -> Command + Send + Sync + 'static,
        child: Child,
    ) -> ServerProcess {
        ServerProcess {
            name,
            port,
            command: Box::new(command),
            ready_within,
            child: Some(child),
        }
    }

    fn spawn(&mut self) {
        let child = (self.command)()
            .spawn()
            .unwrap_or_else(|error| panic!("starting {}: {error}", self.name));
        self.child = Some(child);
        let deadline = Instant::now() + self.ready_within;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("{} exited with {status} before it listened", self.name);
            }
            assert!(Instant::now() < deadline, "{} did not start", self.name);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The running server's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server (SIGKILL); its data stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again, same port, same data.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A nats-server with JetStream on a random port and a temporary store, stopped on
/// drop.
pub struct NatsServer {
    server: ServerProcess,
    pub port: u16,
    _store: std::sync::Arc<tempfile::TempDir>,
}

impl NatsServer {
    /// Starts nats-server on a port it picks itself (`--port -1`) and reads that port
    /// from the ports file it writes once listening, so no other process can take the
    /// port between choosing and binding it. A restart reuses that port.
    pub fn start() -> NatsServer {
        NatsServer::start_with(&[])
    }

    /// [`NatsServer::start`] with more command-line arguments (`--user`, `--pass`, ...).
    pub fn start_with(extra: &[&str]) -> NatsServer {
        let extra: Vec<String> = extra
            .iter()
            .map(|argument| (*argument).to_owned())
            .collect();
        let store = std::sync::Arc::new(tempfile::tempdir().unwrap());
        let ports_directory = store.path().join("ports");
        std::fs::create_dir_all(&ports_directory).unwrap();
        let command_for = {
            let directory = store.clone();
            move |port: &str| {
                let mut command = Command::new(nats_server_binary());
                command
                    .args(["--jetstream", "--addr", "127.0.0.1", "--port", port])
                    .arg("--store_dir")
                    .arg(directory.path().join("jetstream"))
                    .arg("--ports_file_dir")
                    .arg(directory.path().join("ports"))
                    .args(&extra)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
                command
            }
        };
        let mut child = command_for("-1")
            .spawn()
            .unwrap_or_else(|error| panic!("starting nats-server: {error}"));
        let port = wait_for_ports(&mut child, &ports_directory, "nats-server").0;
        let server = ServerProcess::adopt(
            "nats-server",
            port,
            Duration::from_secs(10),
            move || command_for(&port.to_string()),
            child,
        );
        NatsServer {
            server,
            port,
            _store: store,
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The running server's process id.
    pub fn pid(&self) -> Option<u32> {
        self.server.pid()
    }

    /// Stops the server, keeping its store.
    pub fn stop(&mut self) {
        self.server.stop();
    }

    /// Starts it again on the same port with the same store.
    pub fn restart(&mut self) {
        self.server.restart();
    }
}

/// A cluster of nats-servers with JetStream, each on ports it picks itself (client and
/// cluster ports read from the ports files), for replicated streams. Killed on drop.
pub struct NatsCluster {
    nodes: Vec<Option<Child>>,
    ports: Vec<u16>,
    /// Each node's cluster (route) port.
    cluster_ports: Vec<u16>,
    cluster_name: String,
    store: tempfile::TempDir,
}

impl NatsCluster {
    /// Starts `size` servers: the first, then the others routed to it; waits until
    /// each has written its ports file.
    pub fn start(size: usize) -> NatsCluster {
        let store = tempfile::tempdir().unwrap();
        let cluster_name = format!("c{}", uuid::Uuid::new_v4().simple());
        let mut nodes = Vec::new();
        let mut ports = Vec::new();
        let mut cluster_ports = Vec::new();
        let mut first_route: Option<u16> = None;
        for index in 0..size {
            let directory = store.path().join(format!("n{index}"));
            let ports_directory = directory.join("ports");
            std::fs::create_dir_all(&ports_directory).unwrap();
            let mut command = Command::new(nats_server_binary());
            command
                .args(["--jetstream", "--addr", "127.0.0.1", "--port", "-1"])
                .args(["--server_name", &format!("n{index}")])
                .args(["--cluster_name", &cluster_name])
                .args(["--cluster", "nats://127.0.0.1:-1"])
                .arg("--store_dir")
                .arg(directory.join("jetstream"))
                .arg("--ports_file_dir")
                .arg(&ports_directory)
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            // JetStream in a cluster needs configured routes: the others route to the
            // first; the first, whose peers' ports are not known yet, gets a route
            // nobody listens on (loopback port 1) and learns the others when they
            // connect.
            let route = first_route.unwrap_or(1);
            command.args(["--routes", &format!("nats://127.0.0.1:{route}")]);
            let mut child = command
                .spawn()
                .unwrap_or_else(|error| panic!("starting nats-server: {error}"));
            let (client, cluster) = wait_for_ports(&mut child, &ports_directory, "nats-server");
            let cluster = cluster.expect("a clustered nats-server reports its cluster port");
            first_route.get_or_insert(cluster);
            ports.push(client);
            cluster_ports.push(cluster);
            nodes.push(Some(child));
        }
        NatsCluster {
            nodes,
            ports,
            cluster_ports,
            cluster_name,
            store,
        }
    }

    /// The name of node `index` (`n<index>`), as JetStream reports leaders.
    pub fn name(index: usize) -> String {
        format!("n{index}")
    }

    /// Node `index`'s process id, while it runs.
    pub fn pid(&self, index: usize) -> Option<u32> {
        self.nodes[index].as_ref().map(Child::id)
    }

    /// Starts node `index` again (after [`NatsCluster::kill`]) on its ports, with its
    /// store, routed to every other node; waits until it listens.
    pub fn restart(&mut self, index: usize) {
        self.kill(index);
        let directory = self.store.path().join(format!("n{index}"));
        let ports_directory = directory.join("ports");
        let _ = std::fs::remove_dir_all(&ports_directory);
        std::fs::create_dir_all(&ports_directory).unwrap();
        let routes: Vec<String> = self
            .cluster_ports
            .iter()
            .enumerate()
            .filter(|(other, _)| *other != index)
            .map(|(_, port)| format!("nats://127.0.0.1:{port}"))
            .collect();
        let mut child = Command::new(nats_server_binary())
            .args(["--jetstream", "--addr", "127.0.0.1"])
            .args(["--port", &self.ports[index].to_string()])
            .args(["--server_name", &Self::name(index)])
            .args(["--cluster_name", &self.cluster_name])
            .args([
                "--cluster",
                &format!("nats://127.0.0.1:{}", self.cluster_ports[index]),
            ])
            .args(["--routes", &routes.join(",")])
            .arg("--store_dir")
            .arg(directory.join("jetstream"))
            .arg("--ports_file_dir")
            .arg(&ports_directory)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| panic!("starting nats-server: {error}"));
        wait_for_ports(&mut child, &ports_directory, "nats-server");
        self.nodes[index] = Some(child);
    }

    /// Sends `signal` (SIGSTOP, SIGCONT, ...) to node `index`.
    pub fn signal(&self, index: usize, signal: nix::sys::signal::Signal) {
        let pid = self.pid(index).expect("the node runs");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal)
            .unwrap_or_else(|error| panic!("{signal} to nats-server {pid}: {error}"));
    }

    /// Every node's client URL, comma-separated (as `nats.url` takes them).
    pub fn urls(&self) -> String {
        self.ports
            .iter()
            .map(|port| format!("nats://127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Kills node `index` (SIGKILL).
    pub fn kill(&mut self, index: usize) {
        if let Some(mut child) = self.nodes[index].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for index in 0..self.nodes.len() {
            self.kill(index);
        }
    }
}

/// Waits (10 s at most, checking the child is alive) until the nats-server `child`
/// wrote its ports file in `directory`; returns its client port and, when it has
/// one, its cluster port.
fn wait_for_ports(
    child: &mut Child,
    directory: &std::path::Path,
    what: &str,
) -> (u16, Option<u16>) {
    let ports_file = directory.join(format!(
        "{}_{}.ports",
        nats_server_binary().file_name().unwrap().to_string_lossy(),
        child.id()
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(text) = std::fs::read_to_string(&ports_file)
            && let Some(client) = client_port(&text)
        {
            return (client, cluster_port(&text));
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited with {status} before it listened");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} did not write {}", ports_file.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The cluster port in a nats-server ports file.
fn cluster_port(text: &str) -> Option<u16> {
    let value: serde_json::Value = serde_json::from_str(text).ok()?;
    value["cluster"]
        .as_array()?
        .iter()
        .filter_map(|url| url.as_str()?.rsplit(':').next()?.parse().ok())
        .next()
}
