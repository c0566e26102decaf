//! Jaeger v2 (an OpenTelemetry Collector distribution), the tracing backend of the
//! telemetry tests: an OTLP/HTTP receiver, an in-memory store, and the query API
//! (`GET /api/traces/{trace id}`), on free loopback ports.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{ServerProcess, free_port, installed};

/// The jaeger binary the project's scripts built.
pub fn jaeger_binary() -> std::path::PathBuf {
    installed("SWITCHYARD_JAEGER", "jaeger-1.75.0/bin/jaeger", "jaeger")
}

/// A Jaeger v2 server; stopped on drop.
pub struct JaegerServer {
    _server: ServerProcess,
    /// Where OTLP/HTTP exports go (`http://127.0.0.1:<port>`).
    pub otlp_port: u16,
    /// The query API's port.
    pub query_port: u16,
    _directory: tempfile::TempDir,
}

impl JaegerServer {
    pub fn start() -> JaegerServer {
        let directory = tempfile::tempdir().unwrap();
        let (otlp_port, query_port, grpc_port) = (free_port(), free_port(), free_port());
        let config = directory.path().join("jaeger.yaml");
        std::fs::write(
            &config,
            format!(
                "service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces:
      receivers: [otlp]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    logs:
      level: warn
extensions:
  jaeger_query:
    storage:
      traces: memstore
    http:
      endpoint: 127.0.0.1:{query_port}
    grpc:
      endpoint: 127.0.0.1:{grpc_port}
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 100000
receivers:
  otlp:
    protocols:
      http:
        endpoint: 127.0.0.1:{otlp_port}
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
"
            ),
        )
        .unwrap();
        let log = directory.path().join("jaeger.log");
        let binary = jaeger_binary();
        let log_for_command = log.clone();
        let server =
            ServerProcess::start("jaeger", query_port, Duration::from_secs(60), move || {
                let output = std::fs::File::create(&log_for_command).expect("jaeger log file");
                let mut command = Command::new(&binary);
                command
                    .arg("--config")
                    .arg(&config)
                    .stdout(Stdio::null())
                    .stderr(output);
                command
            });
        // The receiver may open a moment after the query API.
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", otlp_port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "jaeger's OTLP receiver did not open; its log: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        JaegerServer {
            _server: server,
            otlp_port,
            query_port,
            _directory: directory,
        }
    }

    /// The OTLP/HTTP endpoint (`[telemetry] otlp_endpoint`).
    pub fn otlp_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.otlp_port)
    }

    /// The URL of trace `trace_id` (32 hex digits) in the query API.
    pub fn trace_url(&self, trace_id: &str) -> String {
        format!("http://127.0.0.1:{}/api/traces/{trace_id}", self.query_port)
    }
}
