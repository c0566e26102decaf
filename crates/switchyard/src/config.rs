//! The configuration file: TOML, with `${VAR}` and `${VAR:-default}` interpolated
//! from the environment first. Every mistake is reported with the file, the line and
//! the field; `switchyard validate` reports all the mistakes it can find at once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret as _, SecretString};
use serde::Deserialize;
use switchyard_bus::BusConfig;
use switchyard_connector_http::HttpSourceConfig;
#[cfg(feature = "kafka")]
use switchyard_connector_kafka::KafkaSourceConfig;
use switchyard_connector_nats::NatsSourceConfig;
#[cfg(feature = "s3")]
use switchyard_connector_s3::poll::S3PollSourceConfig;
pub use switchyard_connector_s3::store::StoreConfig;
pub use switchyard_connector_schedule::source::ScheduleSourceConfig;
use switchyard_dispatcher::{DispatcherConfig, TriggerConfig};
use toml::Spanned;

/// The whole configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// How to reach NATS and the streams' settings.
    #[serde(default)]
    pub nats: BusConfig,
    /// The admin listener: health, readiness, metrics, trigger view.
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// Traces over OTLP (off unless `otlp_endpoint` is set).
    #[serde(default)]
    pub telemetry: crate::telemetry::TelemetryConfig,
    #[serde(default)]
    pub dispatcher: DispatcherConfig,
    /// Settings shared by the functions whose instances Switchyard runs.
    #[serde(default)]
    pub workers: WorkersConfig,
    /// AWS Lambda's Invoke API for `lambda` functions.
    #[serde(default)]
    pub invoke_api: InvokeApiConfig,
    /// Object stores, by name, for `s3` poll sources and enriching triggers.
    #[serde(default)]
    pub stores: BTreeMap<String, Spanned<StoreConfig>>,
    /// Where events come from.
    #[serde(default)]
    pub sources: Vec<Spanned<SourceConfig>>,
    /// Where events go.
    #[serde(default)]
    pub functions: Vec<Spanned<FunctionConfig>>,
    /// Which events go to which function.
    #[serde(default)]
    pub triggers: Vec<Spanned<TriggerConfig>>,
    /// Lambda runtime ids (`python3.12`, `nodejs22.x`, `provided.al2023`...) and the
    /// command that runs a handler of a function created through the Lambda API;
    /// `{handler}` in it becomes the function's handler. Defaults for every id
    /// Switchyard knows ([`default_runtimes`]); a table here replaces one.
    #[serde(default)]
    pub runtimes: BTreeMap<String, RuntimeConfig>,
    /// The file as values (after `${VAR}` and `<secret>_file` substitution): what a
    /// reload compares, table by table, to tell what changed.
    #[serde(skip)]
    pub document: toml::Table,
    /// The file it was read from, re-read on reload.
    #[serde(skip)]
    pub file: Option<PathBuf>,
}

impl Config {
    /// The triggers written in the file, then, with the Invoke API on, one per
    /// `lambda` function delivering its `Event` invocations.
    pub fn all_triggers(&self) -> Vec<TriggerConfig> {
        let mut triggers: Vec<TriggerConfig> = self
            .triggers
            .iter()
            .map(|trigger| trigger.get_ref().clone())
            .collect();
        if !self.invoke_api.listen.is_empty() {
            for function in &self.functions {
                // A published version (`name:N`, from the Lambda API) is called
                // synchronously only: `Event` invocations run `$LATEST`.
                if let FunctionConfig::Lambda(lambda) = function.get_ref()
                    && !lambda.name.contains(':')
                {
                    triggers.push(lambda.invoke_trigger());
                }
            }
        }
        triggers
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin listener; empty disables it.
    #[serde(default = "default_admin_listen")]
    pub listen: String,
    /// Token every admin endpoint but `/healthz` and `/readyz` requires as
    /// `Authorization: Bearer <token>`; the dead-letter endpoints are served only
    /// with one.
    #[serde(default)]
    pub bearer_token: Option<SecretString>,
    /// Several tokens, any of which is accepted (rotation).
    #[serde(default)]
    pub bearer_tokens: Vec<SecretString>,
    /// Serve the admin endpoints off loopback without a token (a trusted network).
    #[serde(default)]
    pub insecure: bool,
    /// Timeouts, connection and request caps, per-client rate limit.
    #[serde(default)]
    pub limits: switchyard_connector_http::listener::ListenerLimits,
    /// HTTPS: `{ cert_file, key_file }` (PEM), reloaded when they change.
    #[serde(default)]
    pub tls: Option<switchyard_connector_http::listener::TlsFiles>,
    /// Re-read the configuration file when it changes (checked every second), as
    /// SIGHUP and `switchyard reload` do.
    #[serde(default)]
    pub watch_config: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: default_admin_listen(),
            bearer_token: None,
            bearer_tokens: Vec::new(),
            insecure: false,
            limits: Default::default(),
            tls: None,
            watch_config: false,
        }
    }
}

impl AdminConfig {
    /// Every token the admin endpoints accept.
    pub fn tokens(&self) -> Vec<&SecretString> {
        switchyard_connector_http::config::tokens(&self.bearer_token, &self.bearer_tokens)
    }
}

/// Whether a listener at `listen` is reachable from the network (an address off
/// loopback; `0.0.0.0` included).
pub fn open_to_network(listen: &str) -> bool {
    listen
        .parse::<SocketAddr>()
        .is_ok_and(|address| !address.ip().is_loopback())
}

/// Whether a listener's TLS asks clients for certificates (mutual TLS), which
/// authenticates them.
fn verifies_clients(tls: &Option<switchyard_connector_http::listener::TlsFiles>) -> bool {
    tls.as_ref().is_some_and(|tls| tls.client_ca_file.is_some())
}

fn default_admin_listen() -> String {
    "127.0.0.1:9090".to_owned()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    #[serde(default)]
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `switchyard=debug,info`; `RUST_LOG`
    /// overrides it.
    #[serde(default = "default_log_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::default(),
            level: default_log_level(),
        }
    }
}

fn default_log_level() -> String {
    "info".to_owned()
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// A source, chosen by `type`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SourceConfig {
    /// CloudEvents over HTTP and webhooks.
    Http(HttpSourceConfig),
    /// Core NATS subjects or an existing JetStream stream.
    Nats(NatsSourceConfig),
    /// A Kafka consumer group.
    #[cfg(feature = "kafka")]
    Kafka(KafkaSourceConfig),
    /// Buckets of an object store, listed at an interval.
    #[cfg(feature = "s3")]
    S3(S3PollSourceConfig),
    /// A cron, rate or at schedule firing once per time across the cluster.
    Schedule(ScheduleSourceConfig),
    /// An SQS queue, long-polled.
    #[cfg(feature = "sqs")]
    Sqs(switchyard_connector_sqs::SqsSourceConfig),
    /// An AMQP 0-9-1 (RabbitMQ) queue.
    #[cfg(feature = "amqp")]
    Amqp(switchyard_connector_amqp::AmqpSourceConfig),
    /// MQTT topics, with a persistent session.
    #[cfg(feature = "mqtt")]
    Mqtt(switchyard_connector_mqtt::MqttSourceConfig),
}

impl SourceConfig {
    pub fn name(&self) -> &str {
        match self {
            SourceConfig::Http(config) => &config.name,
            SourceConfig::Nats(config) => &config.name,
            #[cfg(feature = "kafka")]
            SourceConfig::Kafka(config) => &config.name,
            #[cfg(feature = "s3")]
            SourceConfig::S3(config) => &config.name,
            SourceConfig::Schedule(config) => &config.name,
            #[cfg(feature = "sqs")]
            SourceConfig::Sqs(config) => &config.name,
            #[cfg(feature = "amqp")]
            SourceConfig::Amqp(config) => &config.name,
            #[cfg(feature = "mqtt")]
            SourceConfig::Mqtt(config) => &config.name,
        }
    }
}

/// A function, chosen by `type`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum FunctionConfig {
    /// An HTTP endpoint that receives events in CloudEvents binary mode.
    Http(HttpFunctionConfig),
    /// Prints events to the log.
    Log(LogFunctionConfig),
    /// A command speaking the AWS Lambda Runtime API, whose instances Switchyard
    /// starts on demand, scales with load and stops when idle.
    Lambda(LambdaFunctionConfig),
    /// A command serving HTTP on `$PORT`, whose instances Switchyard starts on
    /// demand, scales with load and stops when idle; events are POSTed to it as to
    /// `http` functions.
    Process(ProcessFunctionConfig),
}

impl FunctionConfig {
    pub fn name(&self) -> &str {
        match self {
            FunctionConfig::Http(config) => &config.name,
            FunctionConfig::Log(config) => &config.name,
            FunctionConfig::Lambda(config) => &config.name,
            FunctionConfig::Process(config) => &config.name,
        }
    }

    pub fn max_concurrency(&self) -> usize {
        match self {
            FunctionConfig::Http(config) => config.max_concurrency,
            FunctionConfig::Log(config) => config.max_concurrency,
            FunctionConfig::Lambda(config) => config.max_concurrency,
            FunctionConfig::Process(config) => config.max_concurrency,
        }
    }

    pub fn concurrency_scope(&self) -> ConcurrencyScope {
        match self {
            FunctionConfig::Http(config) => config.concurrency_scope,
            FunctionConfig::Log(config) => config.concurrency_scope,
            FunctionConfig::Lambda(config) => config.concurrency_scope,
            FunctionConfig::Process(config) => config.concurrency_scope,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpFunctionConfig {
    pub name: String,
    /// Where events are POSTed: `http://` or `https://`.
    pub url: String,
    /// For `https://`: the CA to trust, a client certificate to present.
    #[serde(default)]
    pub tls: Option<switchyard_targets::FunctionTls>,
    /// Credentials presented on every call: `{ scheme = "bearer", token }`,
    /// `{ scheme = "header", header, token }` or `{ scheme = "hmac", secret }`
    /// (Standard Webhooks signatures).
    #[serde(default)]
    pub auth: Option<switchyard_targets::auth::FunctionAuth>,
    /// Per-invocation timeout (a trigger may override it).
    #[serde(default = "default_function_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Invocations in flight at once in this process, over every trigger that
    /// targets this function. Shrinks while the function answers 429/503.
    #[serde(default = "default_function_concurrency")]
    pub max_concurrency: usize,
    /// Where `max_concurrency` holds: across every dispatcher process (`cluster`) or
    /// in each process (`process`).
    #[serde(default)]
    pub concurrency_scope: ConcurrencyScope,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogFunctionConfig {
    pub name: String,
    #[serde(default = "default_function_concurrency")]
    pub max_concurrency: usize,
    #[serde(default = "process_scope")]
    pub concurrency_scope: ConcurrencyScope,
}

/// A function written for AWS Lambda, run unchanged: its `command` is started with
/// Lambda's environment (`AWS_LAMBDA_RUNTIME_API`, `_HANDLER`, `LAMBDA_TASK_ROOT`,
/// `AWS_LAMBDA_FUNCTION_*`, region, log group and stream) and asks Switchyard's Runtime
/// API for events, one at a time per instance.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LambdaFunctionConfig {
    pub name: String,
    /// The program and its arguments, e.g.
    /// `["python3", "-m", "awslambdaric", "app.handler"]`. A program given as a
    /// relative path with a `/` (`./bootstrap`) is found in `directory`; a bare name
    /// on `PATH`.
    pub command: Vec<String>,
    /// Lambda's handler setting, given to instances as `_HANDLER` (e.g.
    /// `app.handler`).
    #[serde(default)]
    pub handler: String,
    /// The function's code: its instances' working directory and
    /// `LAMBDA_TASK_ROOT`. Relative to the configuration file's directory; by default
    /// that directory.
    #[serde(default)]
    pub directory: PathBuf,
    /// Environment variables of its instances (`${VAR}` passes one of Switchyard's
    /// own). Nothing else of Switchyard's environment reaches them, except `PATH`.
    #[serde(default)]
    pub environment: BTreeMap<String, String>,
    /// Per-invocation deadline (a trigger may override it); past it the instance is
    /// killed and the attempt fails with `Sandbox.Timedout`. Lambda's default, 3s.
    #[serde(default = "default_lambda_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// How long a starting instance may take to ask for its first event.
    #[serde(default = "default_init_timeout", with = "humantime_serde")]
    pub init_timeout: Duration,
    /// An instance idle this long is stopped (down to `min_instances`).
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Memory of one instance in MB, as Lambda's `MemorySize` (128 to 10240): told to
    /// the instance as `AWS_LAMBDA_FUNCTION_MEMORY_SIZE`.
    #[serde(default = "default_memory")]
    pub memory: u32,
    /// Instances kept running even when idle (a warm floor, like Lambda's
    /// provisioned concurrency).
    #[serde(default)]
    pub min_instances: usize,
    /// Invocations in flight at once over every trigger; instances at once are
    /// `max_concurrency / instance_concurrency`, rounded up.
    #[serde(default = "default_managed_concurrency")]
    pub max_concurrency: usize,
    /// Invocations one instance takes at once: 1 is classic Lambda; more sets
    /// `AWS_LAMBDA_MAX_CONCURRENCY` for runtime clients that support Lambda's
    /// multi-concurrency (awslambdaric forks that many workers).
    #[serde(default = "default_instance_concurrency")]
    pub instance_concurrency: usize,
    /// Most instances of this function starting at once; more events wait in the
    /// stream.
    #[serde(default = "default_function_cold_starts")]
    pub max_cold_starts: usize,
    /// Where `max_concurrency` holds: across every dispatcher process (`cluster`) or
    /// in each process (`process`).
    #[serde(default)]
    pub concurrency_scope: ConcurrencyScope,
    /// How the Invoke API's `Event` invocations of this function are retried and
    /// where their results go (Lambda's asynchronous invocation settings).
    #[serde(default, rename = "async")]
    pub asynchronous: AsyncInvokeConfig,
}

/// Lambda's asynchronous invocation settings for a `lambda` function: the Invoke
/// API's `Event` invocations are stored on the bus and delivered by a trigger of
/// their own, `invoke-<function>`, with these settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AsyncInvokeConfig {
    /// Attempts in all, the first included: Lambda's `MaximumRetryAttempts` (2) + 1.
    #[serde(default = "default_async_attempts")]
    pub attempts: u32,
    /// Delay before the first retry, doubled for each next one (Lambda waits about
    /// a minute, then two).
    #[serde(default = "default_async_retry_delay", with = "humantime_serde")]
    pub retry_delay: Duration,
    /// An invocation stored longer ago than this is dead-lettered instead of
    /// attempted again: Lambda's `MaximumEventAgeInSeconds` (6 hours by default).
    #[serde(default = "default_async_max_age", with = "humantime_serde")]
    pub max_age: Duration,
    /// Where each successful invocation's result is also published.
    #[serde(default)]
    pub on_success: Option<switchyard_dispatcher::DestinationConfig>,
    /// Where each invocation that failed every attempt is also published (besides
    /// the dead-letter stream).
    #[serde(default)]
    pub on_failure: Option<switchyard_dispatcher::DestinationConfig>,
}

impl Default for AsyncInvokeConfig {
    fn default() -> Self {
        AsyncInvokeConfig {
            attempts: default_async_attempts(),
            retry_delay: default_async_retry_delay(),
            max_age: default_async_max_age(),
            on_success: None,
            on_failure: None,
        }
    }
}

fn default_async_attempts() -> u32 {
    3
}
fn default_async_retry_delay() -> Duration {
    Duration::from_secs(60)
}
fn default_async_max_age() -> Duration {
    Duration::from_secs(6 * 3600)
}

/// The trigger that delivers the Invoke API's `Event` invocations of `function`.
pub fn invoke_trigger_name(function: &str) -> String {
    format!("invoke-{function}")
}

/// Any program that serves HTTP on the port in `$PORT` (a web framework's server,
/// an OpenFaaS of-watchdog or Knative-style command): Switchyard starts instances on
/// demand, POSTs each event to `path` in CloudEvents binary mode (as to `http`
/// functions), and stops instances when idle. Instances get `PORT`,
/// `SWITCHYARD_FUNCTION`, `SWITCHYARD_FUNCTION_MEMORY_MB` and their `environment`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessFunctionConfig {
    pub name: String,
    /// The program and its arguments, e.g. `["python3", "server.py"]`.
    pub command: Vec<String>,
    /// The working directory: relative to the configuration file's directory; by
    /// default that directory.
    #[serde(default)]
    pub directory: PathBuf,
    /// Environment variables of its instances (`${VAR}` passes one of Switchyard's
    /// own). Nothing else of Switchyard's environment reaches them, except `PATH`.
    #[serde(default)]
    pub environment: BTreeMap<String, String>,
    /// Where events are POSTed on the instance.
    #[serde(default = "default_process_path")]
    pub path: String,
    /// An instance is ready once `GET <readiness_path>` answers 2xx; without it, once
    /// its port accepts connections.
    #[serde(default)]
    pub readiness_path: Option<String>,
    /// Invocations one instance takes at once (Knative's containerConcurrency).
    #[serde(default = "default_instance_concurrency")]
    pub instance_concurrency: usize,
    /// Per-invocation deadline (a trigger may override it).
    #[serde(default = "default_function_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// How long a starting instance may take to become ready.
    #[serde(default = "default_init_timeout", with = "humantime_serde")]
    pub init_timeout: Duration,
    /// An instance idle this long is stopped (down to `min_instances`).
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Memory of one instance in MB (128 to 10240), told to it as
    /// `SWITCHYARD_FUNCTION_MEMORY_MB`.
    #[serde(default = "default_memory")]
    pub memory: u32,
    /// Instances kept running even when idle.
    #[serde(default)]
    pub min_instances: usize,
    /// Invocations in flight at once over every trigger; instances at once are
    /// `max_concurrency / instance_concurrency`, rounded up.
    #[serde(default = "default_managed_concurrency")]
    pub max_concurrency: usize,
    /// Most instances of this function starting at once.
    #[serde(default = "default_function_cold_starts")]
    pub max_cold_starts: usize,
    #[serde(default)]
    pub concurrency_scope: ConcurrencyScope,
}

impl ProcessFunctionConfig {
    /// The most instances at once.
    pub fn max_instances(&self) -> usize {
        self.max_concurrency
            .div_ceil(self.instance_concurrency.max(1))
    }
}

impl LambdaFunctionConfig {
    /// The trigger delivering this function's Invoke API `Event` invocations: they
    /// are stored as CloudEvents of type `dev.switchyard.function.invoke` from
    /// `/functions/<name>`, and handed to the function as the payload given.
    pub fn invoke_trigger(&self) -> TriggerConfig {
        use switchyard_dispatcher::{Filter, Matcher};
        let settings = &self.asynchronous;
        TriggerConfig {
            name: invoke_trigger_name(&self.name),
            function: self.name.clone(),
            filter: Filter::All(vec![
                Filter::Attribute {
                    name: "source".to_owned(),
                    matcher: Matcher::Exact(switchyard_workers::aws::invoke_source(&self.name)),
                },
                Filter::Attribute {
                    name: "type".to_owned(),
                    matcher: Matcher::Exact(switchyard_workers::aws::INVOKE_TYPE.to_owned()),
                },
            ]),
            max_concurrency: self.max_concurrency,
            retry: switchyard_dispatcher::RetryPolicy {
                policy: switchyard_dispatcher::BackoffKind::Exponential,
                initial: settings.retry_delay,
                max: settings.retry_delay.saturating_mul(2),
                attempts: settings.attempts,
                max_age: Some(settings.max_age),
                jitter: false,
                ..switchyard_dispatcher::RetryPolicy::default()
            },
            timeout: None,
            ack_wait: Duration::from_secs(30),
            publish_replies: false,
            start: switchyard_dispatcher::StartPosition::New,
            ordering: switchyard_dispatcher::OrderingMode::None,
            partitions: 8,
            batch: None,
            on_success: settings.on_success.clone(),
            on_failure: settings.on_failure.clone(),
            enrich: None,
            payload: switchyard_dispatcher::PayloadFormat::Aws,
        }
    }

    /// The most instances at once.
    pub fn max_instances(&self) -> usize {
        self.max_concurrency
            .div_ceil(self.instance_concurrency.max(1))
    }
}

fn default_process_path() -> String {
    "/".to_owned()
}
fn default_instance_concurrency() -> usize {
    1
}

fn default_lambda_timeout() -> Duration {
    Duration::from_secs(3)
}
fn default_init_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_memory() -> u32 {
    128
}
fn default_managed_concurrency() -> usize {
    10
}
fn default_function_cold_starts() -> usize {
    4
}

/// AWS Lambda's Invoke API (`POST /2015-03-31/functions/{name}/invocations`) for
/// `lambda` functions, on a listener of its own.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InvokeApiConfig {
    /// Address to listen on; empty (the default) turns the Invoke API off.
    #[serde(default)]
    pub listen: String,
    /// How long a call waits for a place in the function's `max_concurrency` before
    /// it is answered 429 (Lambda's throttling answer).
    #[serde(default = "default_invoke_max_wait", with = "humantime_serde")]
    pub max_wait: Duration,
    /// Access keys requests must be signed with (AWS Signature Version 4), as AWS's
    /// clients sign them for Lambda; when empty, signatures are not checked.
    #[serde(default)]
    pub credentials: Vec<InvokeCredential>,
    /// Without `credentials`, a listener off loopback is refused unless this says the
    /// network in front of it is trusted.
    #[serde(default)]
    pub insecure: bool,
    /// Timeouts, connection and request caps, per-client rate limit.
    #[serde(default)]
    pub limits: switchyard_connector_http::listener::ListenerLimits,
    /// HTTPS: `{ cert_file, key_file }` (PEM), reloaded when they change.
    #[serde(default)]
    pub tls: Option<switchyard_connector_http::listener::TlsFiles>,
}

/// An access key of the Invoke API (its secret prints as `[REDACTED]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InvokeCredential {
    pub access_key_id: String,
    pub secret_access_key: SecretString,
}

impl Default for InvokeApiConfig {
    fn default() -> Self {
        InvokeApiConfig {
            listen: String::new(),
            max_wait: default_invoke_max_wait(),
            credentials: Vec::new(),
            insecure: false,
            limits: Default::default(),
            tls: None,
        }
    }
}

fn default_invoke_max_wait() -> Duration {
    Duration::from_secs(1)
}

/// Settings shared by every function whose instances Switchyard runs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkersConfig {
    /// The AWS region instances are told they run in (`AWS_REGION`, the ARN).
    #[serde(default = "default_region")]
    pub region: String,
    /// Most instances starting at once, over every function.
    #[serde(default = "default_total_cold_starts")]
    pub max_cold_starts: usize,
    /// How long a stopping instance has between SIGTERM and SIGKILL.
    #[serde(default = "default_stop_grace", with = "humantime_serde")]
    pub stop_grace: Duration,
    /// `auto`: each instance in cgroups of its own (memory, pids and CPU limits)
    /// where the host lets Switchyard create them, else process groups only;
    /// `process-group`: never cgroups (no limits; faster cold starts on cgroup v1
    /// hosts, where moving a process into a cgroup waits for the kernel).
    #[serde(default)]
    pub isolation: Isolation,
    /// Where the code of functions created through the Lambda API is unpacked
    /// (`<data_directory>/code/<sha256>`); by default `$HOME/.local/state/switchyard`.
    #[serde(default)]
    pub data_directory: Option<PathBuf>,
}

impl WorkersConfig {
    /// Where code is unpacked.
    pub fn data_directory(&self) -> PathBuf {
        self.data_directory.clone().unwrap_or_else(|| {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(std::env::temp_dir)
                .join(".local/state/switchyard")
        })
    }
}

/// How a Lambda runtime id runs a handler.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// The program and its arguments; `{handler}` is replaced by the handler. Run in
    /// the function's unpacked code, so `./bootstrap` names the package's own.
    pub command: Vec<String>,
}

/// The runtimes Switchyard knows, each run by AWS's own runtime interface client:
/// Python's `awslambdaric` (`$SWITCHYARD_LAMBDA_PYTHON`, else the one
/// `scripts/install-deps.sh` installed, else `python3`), Node.js's `aws-lambda-ric`
/// (`$SWITCHYARD_LAMBDA_NODE_RIC`, likewise), and the package's own `bootstrap` for
/// `provided.*`.
pub fn default_runtimes() -> BTreeMap<String, RuntimeConfig> {
    let installed = |variable: &str, link: &str, fallback: &str| {
        std::env::var(variable)
            .ok()
            .filter(|path| !path.is_empty())
            .or_else(|| {
                // Where scripts/install-deps.sh links them: $SWITCHYARD_CACHE/bin,
                // by default ~/.cache/switchyard/bin.
                let cache = std::env::var_os("SWITCHYARD_CACHE")
                    .filter(|cache| !cache.is_empty())
                    .map(PathBuf::from)
                    .or_else(|| {
                        Some(PathBuf::from(std::env::var_os("HOME")?).join(".cache/switchyard"))
                    })?;
                let path = cache.join("bin").join(link);
                path.exists().then(|| path.display().to_string())
            })
            .unwrap_or_else(|| fallback.to_owned())
    };
    let python = installed("SWITCHYARD_LAMBDA_PYTHON", "lambda-python", "python3");
    let node = installed(
        "SWITCHYARD_LAMBDA_NODE_RIC",
        "aws-lambda-ric",
        "aws-lambda-ric",
    );
    let mut runtimes = BTreeMap::new();
    for id in ["python3.12", "python3.13"] {
        runtimes.insert(
            id.to_owned(),
            RuntimeConfig {
                command: vec![
                    python.clone(),
                    "-m".to_owned(),
                    "awslambdaric".to_owned(),
                    "{handler}".to_owned(),
                ],
            },
        );
    }
    for id in ["nodejs20.x", "nodejs22.x"] {
        runtimes.insert(
            id.to_owned(),
            RuntimeConfig {
                command: vec![node.clone(), "{handler}".to_owned()],
            },
        );
    }
    for id in ["provided.al2", "provided.al2023"] {
        runtimes.insert(
            id.to_owned(),
            RuntimeConfig {
                command: vec!["./bootstrap".to_owned()],
            },
        );
    }
    runtimes
}

impl Config {
    /// The runtimes functions created through the API can use: the defaults, with
    /// the configuration's `[runtimes]` over them.
    pub fn all_runtimes(&self) -> BTreeMap<String, RuntimeConfig> {
        let mut runtimes = default_runtimes();
        runtimes.extend(
            self.runtimes
                .iter()
                .map(|(id, runtime)| (id.clone(), runtime.clone())),
        );
        runtimes
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Isolation {
    #[default]
    Auto,
    ProcessGroup,
}

impl Default for WorkersConfig {
    fn default() -> Self {
        WorkersConfig {
            region: default_region(),
            max_cold_starts: default_total_cold_starts(),
            stop_grace: default_stop_grace(),
            isolation: Isolation::Auto,
            data_directory: None,
        }
    }
}

fn default_region() -> String {
    "us-east-1".to_owned()
}
fn default_total_cold_starts() -> usize {
    16
}
fn default_stop_grace() -> Duration {
    Duration::from_secs(2)
}

/// Where a function's `max_concurrency` is enforced.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ConcurrencyScope {
    /// Across every dispatcher process, through slots leased from JetStream.
    #[default]
    Cluster,
    /// In each process on its own.
    Process,
}

fn process_scope() -> ConcurrencyScope {
    ConcurrencyScope::Process
}

fn default_function_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_function_concurrency() -> usize {
    64
}

/// One configuration mistake, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            formatter,
            "{}:{}:{}: ",
            self.file.display(),
            self.line,
            self.column
        )?;
        if let Some(field) = &self.field {
            write!(formatter, "field `{field}`: ")?;
        }
        write!(formatter, "{}", self.message)
    }
}

/// Every mistake found in one file.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, error) in self.0.iter().enumerate() {
            if index > 0 {
                writeln!(formatter)?;
            }
            write!(formatter, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Line and column (1-based) of a byte offset.
fn position(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(offset, |newline| offset - newline - 1)
        + 1;
    (line, column)
}

/// Where a `${...}` stands in the TOML text, which decides how its value is written.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Context {
    /// Outside strings: the value must be a number, boolean or date-time.
    Bare,
    /// `"..."` or `"""..."""`: the value is escaped.
    Basic {
        multiline: bool,
    },
    /// `'...'` or `'''...'''`: no escapes exist, so quotes and control characters
    /// cannot be written.
    Literal {
        multiline: bool,
    },
    Comment,
}

/// How `value` is written at `context` so that it stays one value of the TOML text
/// (never closing its string, starting a line or adding a key), or why it cannot be.
fn written(value: &str, context: Context, name: &str) -> Result<String, String> {
    match context {
        Context::Basic { .. } => {
            let mut output = String::with_capacity(value.len());
            for character in value.chars() {
                match character {
                    '"' => output.push_str("\\\""),
                    '\\' => output.push_str("\\\\"),
                    '\n' => output.push_str("\\n"),
                    '\t' => output.push_str("\\t"),
                    '\r' => output.push_str("\\r"),
                    control if control.is_control() => {
                        output.push_str(&format!("\\u{:04X}", control as u32))
                    }
                    other => output.push(other),
                }
            }
            Ok(output)
        }
        Context::Literal { .. } => {
            if value
                .chars()
                .any(|character| character == '\'' || (character.is_control() && character != '\t'))
            {
                Err(format!(
                    "the value of `{name}` holds a `'` or a control character, which a '...' string cannot hold: write \"${{{name}}}\""
                ))
            } else {
                Ok(value.to_owned())
            }
        }
        Context::Bare | Context::Comment => {
            let scalar = !value.is_empty()
                && value.chars().all(|character| {
                    character.is_ascii_alphanumeric() || "_+-.:".contains(character)
                })
                && toml::from_str::<toml::Table>(&format!("v = {value}"))
                    .ok()
                    .and_then(|table| table.get("v").cloned())
                    .is_some_and(|parsed| {
                        matches!(
                            parsed,
                            toml::Value::Integer(_)
                                | toml::Value::Float(_)
                                | toml::Value::Boolean(_)
                                | toml::Value::Datetime(_)
                        )
                    });
            if scalar {
                Ok(value.to_owned())
            } else {
                Err(format!(
                    "`${{{name}}}` outside quotes must be a number, a boolean or a date-time, and its value is not: write \"${{{name}}}\""
                ))
            }
        }
    }
}

/// Replaces `${VAR}` and `${VAR:-default}` with the environment's values (or the
/// default); `$${` is a literal `${`. Comments are left alone. A value never changes
/// the file's structure: inside `"..."` it is escaped, inside `'...'` a value a
/// literal string cannot hold is an error, and outside quotes it must be a number,
/// boolean or date-time.
pub fn interpolate(
    file: &Path,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, ConfigErrors> {
    let mut output = String::with_capacity(text.len());
    let mut errors = Vec::new();
    let mut context = Context::Bare;
    let bytes = text.as_bytes();
    let mut index = 0;
    let error_at = |index: usize, message: String| {
        let (line, column) = position(text, index);
        ConfigError {
            file: file.to_owned(),
            line,
            column,
            field: None,
            message,
        }
    };
    while index < text.len() {
        let rest = &text[index..];
        // A run of quotes (`"""`, and up to two quotes of content before a closing one).
        let run = |quote: u8| {
            bytes[index..]
                .iter()
                .take_while(|&&byte| byte == quote)
                .count()
        };
        match (context, bytes[index]) {
            (Context::Comment, b'\n') => context = Context::Bare,
            (Context::Comment, _) => {}
            (Context::Bare, b'#') => context = Context::Comment,
            (Context::Bare, b'"') if rest.starts_with("\"\"\"") => {
                output.push_str("\"\"\"");
                index += 3;
                context = Context::Basic { multiline: true };
                continue;
            }
            (Context::Bare, b'"') => context = Context::Basic { multiline: false },
            (Context::Bare, b'\'') if rest.starts_with("\'\'\'") => {
                output.push_str("\'\'\'");
                index += 3;
                context = Context::Literal { multiline: true };
                continue;
            }
            (Context::Bare, b'\'') => context = Context::Literal { multiline: false },
            (Context::Basic { .. }, b'\\') => {
                // An escape: the backslash and the character after it.
                let escaped = rest[1..].chars().next().map_or(0, char::len_utf8);
                output.push_str(&rest[..1 + escaped]);
                index += 1 + escaped;
                continue;
            }
            (Context::Basic { multiline: false }, b'"' | b'\n')
            | (Context::Literal { multiline: false }, b'\'' | b'\n') => context = Context::Bare,
            (Context::Basic { multiline: true }, b'"') if run(b'"') >= 3 => {
                let length = run(b'"');
                output.push_str(&rest[..length]);
                index += length;
                context = Context::Bare;
                continue;
            }
            (Context::Literal { multiline: true }, b'\'') if run(b'\'') >= 3 => {
                let length = run(b'\'');
                output.push_str(&rest[..length]);
                index += length;
                context = Context::Bare;
                continue;
            }
            (_, b'$') if rest.starts_with("$${") => {
                output.push_str("${");
                index += 3;
                continue;
            }
            (_, b'$') if rest.starts_with("${") => {
                let Some(end) = rest.find('}').filter(|end| !rest[..*end].contains('\n')) else {
                    errors.push(error_at(
                        index,
                        "unclosed `${` (write `$${` for a literal)".to_owned(),
                    ));
                    output.push_str(rest);
                    break;
                };
                let expression = &rest[2..end];
                let (name, default) = match expression.split_once(":-") {
                    Some((name, default)) => (name, Some(default)),
                    None => (expression, None),
                };
                let value = match (env(name).filter(|value| !value.is_empty()), default) {
                    (Some(value), _) => Some(value),
                    (None, Some(default)) => Some(default.to_owned()),
                    (None, None) => {
                        errors.push(error_at(index, format!("environment variable `{name}` is not set (write `${{{name}:-default}}` to give a default)")));
                        None
                    }
                };
                if let Some(value) = value {
                    match written(&value, context, name) {
                        Ok(text) => output.push_str(&text),
                        Err(message) => errors.push(error_at(index, message)),
                    }
                }
                index += end + 1;
                continue;
            }
            _ => {}
        }
        let character = rest.chars().next().map_or(1, char::len_utf8);
        output.push_str(&rest[..character]);
        index += character;
    }
    if errors.is_empty() {
        Ok(output)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// Reads, interpolates, parses and validates a configuration file.
pub fn load(file: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(file).map_err(|error| {
        ConfigErrors(vec![ConfigError {
            file: file.to_owned(),
            line: 0,
            column: 0,
            field: None,
            message: format!("cannot read the file: {error}"),
        }])
    })?;
    let mut config = parse(file, &text, &|name| std::env::var(name).ok())?;
    config.file = Some(file.to_owned());
    Ok(config)
}

/// Parses and validates configuration text; `file` names it in errors.
pub fn parse(
    file: &Path,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigErrors> {
    // A function's directory, certificate and secret files are relative to the
    // configuration file's directory.
    let base = file
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let text = interpolate(file, text, env)?;
    let text = secret_files(file, &text, base)?;
    let mut config: Config =
        toml::from_str(&text).map_err(|error| ConfigErrors(parse_errors(file, &text, error)))?;
    config.document = toml::from_str(&text).unwrap_or_default();
    // Certificate files are relative to the configuration file's directory.
    let relative = |files: &mut Option<switchyard_connector_http::listener::TlsFiles>| {
        if let Some(files) = files {
            files.cert_file = base.join(&files.cert_file);
            files.key_file = base.join(&files.key_file);
            if let Some(client_ca_file) = &mut files.client_ca_file {
                *client_ca_file = base.join(&*client_ca_file);
            }
        }
    };
    config.nats.files_relative_to(base);
    // Absolute, as a function's directory: code unpacked there is the instances'
    // `LAMBDA_TASK_ROOT`.
    if let Some(data) = &mut config.workers.data_directory {
        let joined = base.join(&*data);
        *data = std::path::absolute(&joined).unwrap_or(joined);
    }
    relative(&mut config.admin.tls);
    relative(&mut config.invoke_api.tls);
    for source in &mut config.sources {
        match source.get_mut() {
            SourceConfig::Http(http) => relative(&mut http.tls),
            #[cfg(feature = "mqtt")]
            SourceConfig::Mqtt(mqtt) => {
                if let Some(tls) = &mut mqtt.tls {
                    tls.files_relative_to(base);
                }
            }
            _ => {}
        }
    }
    for function in &mut config.functions {
        // Absolute: the instance's working directory and `LAMBDA_TASK_ROOT` must not
        // depend on where Switchyard was started from.
        let absolute = |directory: &Path| {
            let joined = base.join(directory);
            std::path::absolute(&joined).unwrap_or(joined)
        };
        match function.get_mut() {
            FunctionConfig::Http(http) => {
                if let Some(tls) = &mut http.tls {
                    tls.files_relative_to(base);
                }
            }
            FunctionConfig::Lambda(lambda) => lambda.directory = absolute(&lambda.directory),
            FunctionConfig::Process(process) => process.directory = absolute(&process.directory),
            _ => {}
        }
    }
    let errors = validate(file, &text, &config);
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// Fields holding secrets; each can instead be read from a file with `<field>_file`.
const SECRET_FIELDS: [&str; 8] = [
    "bearer_token",
    "bearer_tokens",
    "secret",
    "password",
    "token",
    "nkey_seed",
    "secret_access_key",
    "session_token",
];

/// Tables whose keys are the user's own names, not fields: `<x>_file` there is not
/// a secret file (an environment variable named `token_file`, say).
const FREE_FORM_TABLES: [&str; 3] = ["environment", "properties", "types"];

/// Replaces every `<secret>_file = "path"` (`bearer_token_file`, `secret_file`,
/// `password_file`, ...) with `<secret> = "<the file's contents>"` where it is written,
/// so secrets can come from mounted files (a Kubernetes or Docker secret) rather than
/// the configuration. A file's trailing line break is not part of the secret;
/// `bearer_tokens_file` holds one token per line. The text keeps its lines, so later
/// errors are still located. Text that does not parse is left to the deserializer
/// to report.
fn secret_files(file: &Path, text: &str, base: &Path) -> Result<String, ConfigErrors> {
    if !text.contains("_file") {
        return Ok(text.to_owned());
    }
    let Ok(document) = toml_edit::ImDocument::parse(text) else {
        return Ok(text.to_owned());
    };
    let mut edits: Vec<(Range<usize>, String)> = Vec::new();
    let mut errors = Vec::new();
    let mut error = |offset: usize, field: &str, message: String| {
        let (line, column) = position(text, offset);
        errors.push(ConfigError {
            file: file.to_owned(),
            line,
            column,
            field: Some(field.to_owned()),
            message,
        });
    };
    let mut pending: Vec<&dyn toml_edit::TableLike> = vec![document.as_table()];
    while let Some(table) = pending.pop() {
        let keys: Vec<String> = table.iter().map(|(key, _)| key.to_owned()).collect();
        for key in &keys {
            let Some((key_repr, item)) = table.get_key_value(key) else {
                continue;
            };
            if FREE_FORM_TABLES.contains(&key.as_str()) {
                continue;
            }
            match item {
                toml_edit::Item::Table(inner) => pending.push(inner),
                toml_edit::Item::ArrayOfTables(array) => {
                    pending.extend(array.iter().map(|inner| inner as &dyn toml_edit::TableLike))
                }
                toml_edit::Item::Value(toml_edit::Value::InlineTable(inner)) => pending.push(inner),
                toml_edit::Item::Value(toml_edit::Value::Array(array)) => {
                    pending.extend(array.iter().filter_map(|value| {
                        value
                            .as_inline_table()
                            .map(|inner| inner as &dyn toml_edit::TableLike)
                    }))
                }
                _ => {}
            }
            let Some(stem) = key
                .strip_suffix("_file")
                .filter(|stem| SECRET_FIELDS.contains(stem))
            else {
                continue;
            };
            let (Some(key_span), Some(value_span)) = (key_repr.span(), item.span()) else {
                continue;
            };
            if table.contains_key(stem) {
                error(
                    key_span.start,
                    key,
                    format!("set `{stem}` or `{key}`, not both"),
                );
                continue;
            }
            let Some(path) = item.as_str() else {
                error(
                    key_span.start,
                    key,
                    "must be a file path (a string)".to_owned(),
                );
                continue;
            };
            let path = base.join(path);
            let contents = match std::fs::read_to_string(&path) {
                Ok(contents) => contents,
                Err(problem) => {
                    error(
                        key_span.start,
                        key,
                        format!("cannot read `{}`: {problem}", path.display()),
                    );
                    continue;
                }
            };
            let basic = |value: &str| {
                format!(
                    "\"{}\"",
                    written(value, Context::Basic { multiline: false }, key)
                        .expect("a basic string holds any value")
                )
            };
            let value = if stem == "bearer_tokens" {
                let tokens: Vec<String> = contents
                    .lines()
                    .map(str::trim)
                    .filter(|line| !line.is_empty())
                    .map(basic)
                    .collect();
                if tokens.is_empty() {
                    error(
                        key_span.start,
                        key,
                        format!("`{}` holds no token", path.display()),
                    );
                    continue;
                }
                format!("[{}]", tokens.join(", "))
            } else {
                let secret = contents.trim_end_matches(['\n', '\r']);
                if secret.is_empty() {
                    error(
                        key_span.start,
                        key,
                        format!("`{}` is empty", path.display()),
                    );
                    continue;
                }
                basic(secret)
            };
            edits.push((value_span, value));
            edits.push((key_span, stem.to_owned()));
        }
    }
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    edits.sort_by_key(|(span, _)| std::cmp::Reverse(span.start));
    let mut output = text.to_owned();
    for (span, replacement) in edits {
        output.replace_range(span, &replacement);
    }
    Ok(output)
}

/// Every mistake the TOML deserializer finds, each at its own field's line: serde stops
/// at the first, and inside tables selected by `type` it points at the table's header.
/// So the mistake's key is looked up inside the table's span (by name for an unknown
/// field, by the quoted value for a bad value), reported there, blanked out of a copy
/// of the text (offsets kept), and the copy parsed again, up to 50 mistakes. A
/// "missing field" caused by blanking a field is not reported.
fn parse_errors(file: &Path, text: &str, first: toml::de::Error) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    let mut working = text.to_owned();
    let mut blanked: Vec<String> = Vec::new();
    let mut error = first;
    for _ in 0..50 {
        let message = match error.message().trim() {
            // The parser gives some mistakes no words (`a=` at the end of the text,
            // found by tests/fuzz.rs).
            "" => "not valid TOML here (a key needs `= value`)".to_owned(),
            message => message.to_owned(),
        };
        if let Some(missing) = backticked_after(&message, "missing field ")
            && blanked.contains(&missing)
        {
            break;
        }
        let span = error.span();
        let key_line = span.clone().and_then(|span| {
            mistaken_key_line(&working, span.clone(), &message).or_else(|| {
                // A precise span (the value itself): its own line's key.
                let key = key_at(&working, span.clone())?;
                let line_start = working[..span.start.min(working.len())]
                    .rfind('\n')
                    .map_or(0, |newline| newline + 1);
                let indent = working[line_start..].len() - working[line_start..].trim_start().len();
                Some((line_start + indent, key))
            })
        });
        // The value's own position when the span is that precise, else the key's line.
        let (offset, field) = match (&key_line, span) {
            (Some((start, key)), Some(span)) if span.start >= *start => {
                (span.start, Some(key.clone()))
            }
            (Some((start, key)), _) => (*start, Some(key.clone())),
            (None, Some(span)) => (span.start, key_at(&working, span)),
            (None, None) => (0, None),
        };
        let (line, column) = position(&working, offset);
        errors.push(ConfigError {
            file: file.to_owned(),
            line,
            column,
            field,
            message,
        });
        let Some((start, key)) = key_line else { break };
        let end = working[start..]
            .find('\n')
            .map_or(working.len(), |newline| start + newline);
        let blank: String = working[start..end]
            .chars()
            .map(|character| if character.is_ascii() { ' ' } else { character })
            .collect();
        if blank.len() != end - start {
            break;
        }
        working.replace_range(start..end, &blank);
        blanked.push(key);
        match toml::from_str::<Config>(&working) {
            Ok(_) => break,
            Err(next) => error = next,
        }
    }
    errors
}

/// The first `` `name` `` after `prefix` in `message`.
fn backticked_after(message: &str, prefix: &str) -> Option<String> {
    let rest = &message[message.find(prefix)? + prefix.len()..];
    let rest = rest.strip_prefix('`')?;
    Some(rest[..rest.find('`')?].to_owned())
}

/// The `key = value` line inside `span` that a deserializer `message` is about: the
/// unknown field it names, or the line holding the quoted value it quotes. Returns the
/// line's start offset and key.
fn mistaken_key_line(text: &str, span: Range<usize>, message: &str) -> Option<(usize, String)> {
    let end = span.end.min(text.len());
    let start = span.start.min(end);
    let wanted_key = backticked_after(message, "unknown field ");
    let wanted_value = message
        .split('"')
        .nth(1)
        .filter(|value| !value.is_empty())
        .map(str::to_owned);
    let mut offset = start;
    for line in text[start..end].split_inclusive('\n') {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if let Some((key, value)) = trimmed.split_once('=') {
            let key = key.trim().trim_matches('"');
            let matches = match (&wanted_key, &wanted_value) {
                (Some(wanted), _) => key == wanted,
                (None, Some(value_text)) => value.contains(value_text.as_str()),
                (None, None) => false,
            };
            if matches && !key.is_empty() && !key.starts_with('[') {
                return Some((offset + indent, key.to_owned()));
            }
        }
        offset += line.len();
    }
    None
}

/// The key of the `key = value` line an error span starts on, if any.
fn key_at(text: &str, span: Range<usize>) -> Option<String> {
    let start = span.start.min(text.len());
    let line_start = text[..start].rfind('\n').map_or(0, |newline| newline + 1);
    let line_end = text[line_start..]
        .find('\n')
        .map_or(text.len(), |newline| line_start + newline);
    let line = &text[line_start..line_end];
    let (key, _) = line.split_once('=')?;
    let key = key.trim();
    let valid = !key.is_empty()
        && key
            .chars()
            .all(|character| character.is_ascii_alphanumeric() || "_-.\"".contains(character));
    valid.then(|| key.trim_matches('"').to_owned())
}

/// Locates `field` inside the table spanning `span`: the line where `field = ...` is
/// written, or the table's first line.
fn locate(
    file: &Path,
    text: &str,
    span: Range<usize>,
    field: &str,
    message: String,
) -> ConfigError {
    let table = &text[span.start.min(text.len())..span.end.min(text.len())];
    let mut offset = span.start;
    for line in table.split_inclusive('\n') {
        let trimmed = line.trim_start();
        if let Some(rest) = trimmed.strip_prefix(field)
            && rest.trim_start().starts_with('=')
        {
            offset += line.len() - trimmed.len();
            break;
        }
        offset += line.len();
    }
    if offset >= span.end {
        offset = span.start;
    }
    let (line, column) = position(text, offset);
    ConfigError {
        file: file.to_owned(),
        line,
        column,
        field: Some(field.to_owned()),
        message,
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|character| {
            character.is_ascii_alphanumeric() || character == '-' || character == '_'
        })
}

/// Collects located mistakes.
struct Checker<'a> {
    file: &'a Path,
    text: &'a str,
    errors: Vec<ConfigError>,
}

impl Checker<'_> {
    /// A mistake in `field` of the table at `span`.
    fn error(&mut self, span: Range<usize>, field: &str, message: String) {
        self.errors
            .push(locate(self.file, self.text, span, field, message));
    }

    /// The `name` of a `kind` (function, trigger, ...) must be valid and unique among
    /// `seen`.
    fn name(&mut self, span: &Range<usize>, kind: &str, name: &str, seen: &mut HashSet<String>) {
        if kind == "trigger" {
            // Trigger names also name consumers: the dispatcher's grammar keeps them
            // apart.
            if let Some(problem) = switchyard_dispatcher::consumers::trigger_name_problem(name) {
                self.error(span.clone(), "name", problem);
            }
        } else if !valid_name(name) {
            self.error(
                span.clone(),
                "name",
                format!(
                    "{kind} `{name}` is not a valid name: use 1 to 64 letters, digits, `-` or `_`"
                ),
            );
        }
        if !seen.insert(name.to_owned()) {
            self.error(
                span.clone(),
                "name",
                format!("{kind} `{name}` is defined twice"),
            );
        }
    }
}

/// What is wrong with a trigger destination, if anything.
fn destination_problem(destination: &switchyard_dispatcher::DestinationConfig) -> Option<String> {
    use switchyard_dispatcher::DestinationConfig;
    match destination {
        DestinationConfig::Nats { subject } => {
            let valid = !subject.is_empty()
                && !subject.contains(char::is_whitespace)
                && subject.split('.').all(|token| !token.is_empty());
            (!valid).then(|| format!("`{subject}` is not a NATS subject like `results.orders`"))
        }
        DestinationConfig::Kafka {
            brokers,
            topic,
            properties,
        } => {
            if brokers.trim().is_empty() || topic.trim().is_empty() {
                return Some("a kafka destination needs `brokers` and `topic`".to_owned());
            }
            #[cfg(feature = "kafka")]
            {
                switchyard_connector_kafka::destination::producer_config(brokers, properties)
                    .create_native_config()
                    .err()
                    .map(|error| format!("librdkafka refused the configuration: {error}"))
            }
            #[cfg(not(feature = "kafka"))]
            {
                let _ = properties;
                Some("this build has no Kafka support (the `kafka` feature)".to_owned())
            }
        }
    }
}

/// The settings `lambda` and `process` functions share, for checking.
struct ManagedSettings<'a> {
    command: &'a [String],
    directory: &'a Path,
    environment: &'a BTreeMap<String, String>,
    memory: u32,
    timeouts: [(&'static str, Duration); 3],
    max_cold_starts: usize,
    min_instances: usize,
    max_instances: usize,
}

/// Where each `[[sources.routes]]` table of the source whose table starts at
/// `source` is (its header to the next header), in order; empty when the routes are
/// written inline.
fn route_spans(text: &str, source: &Range<usize>) -> Vec<Range<usize>> {
    sub_table_spans(text, source, "[[sources.routes]]")
}

/// Where each `header` table (`[[sources.hooks]]`, `[[sources.routes]]`) of the source
/// whose table starts at `source` is, in order; empty when written inline.
fn sub_table_spans(text: &str, source: &Range<usize>, wanted: &str) -> Vec<Range<usize>> {
    let mut spans: Vec<Range<usize>> = Vec::new();
    let mut offset = source.start.min(text.len());
    let mut first = true;
    for line in text[offset..].split_inclusive('\n') {
        let header = line.trim();
        if header.starts_with('[') {
            if let Some(open) = spans.last_mut()
                && open.end == usize::MAX
            {
                open.end = offset;
            }
            match header {
                _ if header == wanted => spans.push(offset..usize::MAX),
                _ if first => {}
                _ if header.starts_with("[sources.") || header.starts_with("[[sources.") => {}
                _ => break,
            }
            first = false;
        }
        offset += line.len();
    }
    for span in &mut spans {
        span.end = span.end.min(text.len());
    }
    spans
}

/// An error about `field` of the top-level table `[section]`, at the line the field
/// is written on (or the table's header; line 0 when the table is not written).
fn section_error(
    file: &Path,
    text: &str,
    section: &str,
    field: &str,
    message: String,
) -> ConfigError {
    let header = format!("[{section}]");
    let mut offset = 0;
    let mut span: Option<Range<usize>> = None;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim();
        if let Some(open) = &mut span {
            if trimmed.starts_with('[') {
                open.end = offset;
                break;
            }
        } else if trimmed == header || trimmed.starts_with(&format!("{header} ")) {
            span = Some(offset..text.len());
        }
        offset += line.len();
    }
    let field_name = field.rsplit('.').next().unwrap_or(field);
    match span {
        Some(span) => {
            let mut error = locate(file, text, span, field_name, message);
            error.field = Some(format!("{section}.{field_name}"));
            error
        }
        None => ConfigError {
            file: file.to_owned(),
            line: 0,
            column: 0,
            field: Some(format!("{section}.{field_name}")),
            message,
        },
    }
}

/// Empty tokens and secrets: an empty token or HMAC key lets anyone in.
fn auth_secret_problems(
    tokens: &[&SecretString],
    signature: Option<&switchyard_connector_http::SignatureConfig>,
) -> Vec<(&'static str, String)> {
    let mut problems = Vec::new();
    if tokens
        .iter()
        .any(|token| token.expose_secret().trim().is_empty())
    {
        problems.push((
            "bearer_token",
            "an empty bearer token would let anyone in".to_owned(),
        ));
    }
    if signature.is_some_and(|signature| signature.secret().expose_secret().trim().is_empty()) {
        problems.push((
            "secret",
            "an empty signature secret would let anyone sign".to_owned(),
        ));
    }
    problems
}

/// Empty tokens and secrets of an HTTP source and its hooks.
fn secret_problems(check: &mut Checker<'_>, span: &Range<usize>, http: &HttpSourceConfig) {
    for (field, problem) in auth_secret_problems(&http.tokens(), None) {
        check.error(
            span.clone(),
            field,
            format!("source `{}`: {problem}", http.name),
        );
    }
    for hook in &http.hooks {
        for (field, problem) in auth_secret_problems(&hook.tokens(), hook.signature.as_ref()) {
            check.error(
                span.clone(),
                field,
                format!("hook `{}`: {problem}", hook.name),
            );
        }
    }
}

/// What is wrong with an HTTP source's routes (function URLs).
fn route_problems(
    check: &mut Checker<'_>,
    span: &Range<usize>,
    http: &HttpSourceConfig,
    config: &Config,
) {
    let open = open_to_network(&http.listen);
    let mut cors_by_path: HashMap<&str, &Option<switchyard_connector_http::CorsConfig>> =
        HashMap::new();
    let spans = route_spans(check.text, span);
    let mut methods_by_path: Vec<(&str, HashSet<String>)> = Vec::new();
    for (index, route) in http.routes.iter().enumerate() {
        let span = spans.get(index).unwrap_or(span);
        let path = route.path.as_str();
        let normalized = crate::routes::normalized(path);
        let reserved =
            |prefix: &str| normalized == prefix || normalized.starts_with(&format!("{prefix}/"));
        if !path.starts_with('/') {
            check.error(
                span.clone(),
                "path",
                format!("route path `{path}` must start with `/`"),
            );
        } else if !path.chars().all(|character| {
            character.is_ascii_alphanumeric() || "-._~!$&'()+,;=@/".contains(character)
        }) || path
            .split('/')
            .any(|segment| segment == "." || segment == "..")
        {
            check.error(
                span.clone(),
                "path",
                format!("route path `{path}` is a prefix of letters, digits and `-._~!$&'()+,;=@/`, without `.` or `..` segments"),
            );
        } else if reserved("/v1/events") || reserved("/hooks") {
            check.error(
                span.clone(),
                "path",
                format!("route path `{path}` is the source's own (`/v1/events`, `/hooks/<name>`): choose another"),
            );
        }
        match config
            .functions
            .iter()
            .map(|function| function.get_ref())
            .find(|function| function.name() == route.function)
        {
            None => check.error(
                span.clone(),
                "function",
                format!("route `{path}` names unknown function `{}`", route.function),
            ),
            Some(FunctionConfig::Log(_)) => check.error(
                span.clone(),
                "function",
                format!(
                    "route `{path}`: function `{}` only logs events and cannot answer a request; use a `lambda`, `process` or `http` function",
                    route.function
                ),
            ),
            Some(_) => {}
        }
        for method in &route.methods {
            if axum::http::Method::from_bytes(method.to_ascii_uppercase().as_bytes()).is_err() {
                check.error(
                    span.clone(),
                    "methods",
                    format!("route `{path}`: `{method}` is not an HTTP method"),
                );
            }
        }
        for (field, problem) in auth_secret_problems(&route.tokens(), route.signature.as_ref()) {
            check.error(span.clone(), field, format!("route `{path}`: {problem}"));
        }
        let authenticated = !route.tokens().is_empty() || route.signature.is_some();
        if open && !authenticated && !route.public && !verifies_clients(&http.tls) {
            check.error(
                span.clone(),
                "public",
                format!(
                    "route `{path}` on `{}`, which is open to the network, has no authentication: set `bearer_token` or `signature`, or `public = true` to serve anyone (a function URL with AuthType NONE)",
                    http.listen
                ),
            );
        }
        if authenticated && route.public {
            check.error(
                span.clone(),
                "public",
                format!("route `{path}` is `public` but also asks for a bearer token or signature: choose one"),
            );
        }
        if let Some(cors) = &route.cors {
            let wildcard = [
                &cors.allow_origins,
                &cors.allow_headers,
                &cors.allow_methods,
                &cors.expose_headers,
            ]
            .iter()
            .any(|values| values.iter().any(|value| value == "*"));
            if cors.allow_credentials && wildcard {
                check.error(
                    span.clone(),
                    "cors",
                    format!("route `{path}`: `allow_credentials` cannot go with `*` (browsers refuse it): list the origins, methods and headers"),
                );
            }
            for origin in &cors.allow_origins {
                if origin != "*" && axum::http::HeaderValue::from_str(origin).is_err() {
                    check.error(
                        span.clone(),
                        "cors",
                        format!("route `{path}`: origin `{origin}` is not a valid header value"),
                    );
                }
            }
        }
        let methods: HashSet<String> = route
            .methods
            .iter()
            .map(|method| method.to_ascii_uppercase())
            .collect();
        if let Some(other) = methods_by_path.iter().find(|(other_path, other_methods)| {
            *other_path == normalized
                && (methods.is_empty()
                    || other_methods.is_empty()
                    || !methods.is_disjoint(other_methods))
        }) {
            check.error(
                span.clone(),
                "methods",
                format!(
                    "route `{path}` takes methods an earlier route at `{}` takes already: it would never be reached",
                    other.0
                ),
            );
        }
        methods_by_path.push((normalized, methods));
        if let Some(earlier) = cors_by_path.insert(normalized, &route.cors)
            && earlier != &route.cors
        {
            check.error(
                span.clone(),
                "cors",
                format!("routes at `{normalized}` differ in `cors`: routes sharing a path share one CORS setting"),
            );
        }
    }
}

/// What is wrong with a managed (`lambda` or `process`) function's settings.
fn managed_problems(check: &mut Checker<'_>, span: &Range<usize>, settings: &ManagedSettings<'_>) {
    match settings.command.first() {
        None => check.error(
            span.clone(),
            "command",
            "is empty: give the program and its arguments, e.g. [\"python3\", \"-m\", \"awslambdaric\", \"app.handler\"]".to_owned(),
        ),
        Some(program) if program.is_empty() => {
            check.error(span.clone(), "command", "the program is empty".to_owned());
        }
        Some(_) => {}
    }
    if !settings.directory.is_dir() {
        check.error(
            span.clone(),
            "directory",
            format!("`{}` is not a directory", settings.directory.display()),
        );
    }
    if !(128..=10240).contains(&settings.memory) {
        check.error(
            span.clone(),
            "memory",
            format!(
                "{} MB is outside 128 to 10240 (Lambda's range)",
                settings.memory
            ),
        );
    }
    for (field, value) in settings.timeouts {
        if value.is_zero() {
            check.error(span.clone(), field, "must be longer than 0s".to_owned());
        }
    }
    if settings.max_cold_starts == 0 {
        check.error(
            span.clone(),
            "max_cold_starts",
            "must be at least 1".to_owned(),
        );
    }
    if settings.min_instances > settings.max_instances {
        check.error(
            span.clone(),
            "min_instances",
            format!(
                "{} is more than the most instances at once ({}, from max_concurrency)",
                settings.min_instances, settings.max_instances
            ),
        );
    }
    for name in settings.environment.keys() {
        if name.is_empty() || name.contains('=') || name.contains('\0') {
            check.error(
                span.clone(),
                "environment",
                format!("`{name}` is not a valid environment variable name"),
            );
        }
    }
}

/// Checks what parsing cannot: names, references between sections, addresses, URLs.
fn validate(file: &Path, text: &str, config: &Config) -> Vec<ConfigError> {
    let mut check = Checker {
        file,
        text,
        errors: Vec::new(),
    };
    for store in config.stores.values() {
        for (field, message) in store.get_ref().problems() {
            check.error(store.span(), field, message);
        }
    }
    let mut function_names = HashSet::new();
    for function in &config.functions {
        let span = function.span();
        let function = function.get_ref();
        let name = function.name();
        check.name(&span, "function", name, &mut function_names);
        if function.max_concurrency() == 0 {
            check.error(
                span.clone(),
                "max_concurrency",
                "must be at least 1".to_owned(),
            );
        }
        match function {
            FunctionConfig::Lambda(lambda) => {
                if !config.invoke_api.listen.is_empty()
                    && valid_name(&lambda.name)
                    && let Some(problem) = switchyard_dispatcher::consumers::trigger_name_problem(
                        &invoke_trigger_name(&lambda.name),
                    )
                {
                    check.error(
                        span.clone(),
                        "name",
                        format!(
                            "with the Invoke API on, its Event invocations get a trigger: {problem}"
                        ),
                    );
                }
                for (name, destination) in [
                    ("on_success", &lambda.asynchronous.on_success),
                    ("on_failure", &lambda.asynchronous.on_failure),
                ] {
                    if let Some(destination) = destination
                        && let Some(problem) = destination_problem(destination)
                    {
                        check.error(span.clone(), "async", format!("`{name}`: {problem}"));
                    }
                }
                if !config.invoke_api.listen.is_empty()
                    && config
                        .nats
                        .events_stream
                        .duplicate_window
                        .unwrap_or(Duration::from_secs(120))
                        <= lambda.invoke_trigger().ack_wait
                {
                    check.error(
                        span.clone(),
                        "name",
                        "with the Invoke API on, its Event invocations get a trigger whose ack_wait (30s) must be shorter than the events stream's duplicate_window; raise nats.events_stream.duplicate_window".to_owned(),
                    );
                }
                if lambda.asynchronous.attempts == 0 {
                    check.error(
                        span.clone(),
                        "async",
                        "`attempts` must be at least 1 (the first attempt counts)".to_owned(),
                    );
                }
                if lambda.instance_concurrency == 0 {
                    check.error(
                        span.clone(),
                        "instance_concurrency",
                        "must be at least 1".to_owned(),
                    );
                }
                managed_problems(
                    &mut check,
                    &span,
                    &ManagedSettings {
                        command: &lambda.command,
                        directory: &lambda.directory,
                        environment: &lambda.environment,
                        memory: lambda.memory,
                        timeouts: [
                            ("timeout", lambda.timeout),
                            ("init_timeout", lambda.init_timeout),
                            ("idle_timeout", lambda.idle_timeout),
                        ],
                        max_cold_starts: lambda.max_cold_starts,
                        min_instances: lambda.min_instances,
                        max_instances: lambda.max_instances(),
                    },
                );
            }
            FunctionConfig::Process(process) => {
                if process.instance_concurrency == 0 {
                    check.error(
                        span.clone(),
                        "instance_concurrency",
                        "must be at least 1".to_owned(),
                    );
                }
                for (field, path) in [
                    ("path", Some(&process.path)),
                    ("readiness_path", process.readiness_path.as_ref()),
                ] {
                    if let Some(path) = path
                        && (!path.starts_with('/') || path.contains(char::is_whitespace))
                    {
                        check.error(
                            span.clone(),
                            field,
                            format!("`{path}` is not a path like `/` or `/healthz`"),
                        );
                    }
                }
                managed_problems(
                    &mut check,
                    &span,
                    &ManagedSettings {
                        command: &process.command,
                        directory: &process.directory,
                        environment: &process.environment,
                        memory: process.memory,
                        timeouts: [
                            ("timeout", process.timeout),
                            ("init_timeout", process.init_timeout),
                            ("idle_timeout", process.idle_timeout),
                        ],
                        max_cold_starts: process.max_cold_starts,
                        min_instances: process.min_instances,
                        max_instances: process.max_instances(),
                    },
                );
            }
            _ => {}
        }
        if let FunctionConfig::Http(http) = function {
            match reqwest::Url::parse(&http.url) {
                Ok(url) if url.scheme() == "http" || url.scheme() == "https" => {
                    if url.scheme() == "http" && http.tls.is_some() {
                        check.error(
                            span.clone(),
                            "tls",
                            "is for https:// functions; this url is http://".to_owned(),
                        );
                    }
                    if url.scheme() == "http" && http.auth.is_some() {
                        let host = url.host_str().unwrap_or_default();
                        let local = host == "localhost"
                            || host
                                .trim_matches(['[', ']'])
                                .parse::<std::net::IpAddr>()
                                .is_ok_and(|ip| ip.is_loopback());
                        if !local
                            && matches!(
                                http.auth,
                                Some(
                                    switchyard_targets::auth::FunctionAuth::Bearer { .. }
                                        | switchyard_targets::auth::FunctionAuth::Header { .. }
                                )
                            )
                        {
                            check.error(
                                span.clone(),
                                "auth",
                                "a token sent over plain http:// to another host can be read on the way: use https:// (or the `hmac` scheme, which sends no secret)".to_owned(),
                            );
                        }
                    }
                    if let Some(tls) = &http.tls
                        && let Err(problem) = tls.client()
                    {
                        check.error(span.clone(), "tls", problem);
                    }
                    if let Some(auth) = &http.auth {
                        for (field, problem) in auth.problems() {
                            check.error(span.clone(), "auth", format!("`{field}` {problem}"));
                        }
                    }
                }
                Ok(url) => check.error(
                    span.clone(),
                    "url",
                    format!(
                        "scheme `{}` is not supported, use http:// or https://",
                        url.scheme()
                    ),
                ),
                Err(error) => check.error(
                    span.clone(),
                    "url",
                    format!("`{}` is not a valid URL: {error}", http.url),
                ),
            }
        }
    }
    let mut trigger_names = HashSet::new();
    let mut known: Vec<&str> = function_names.iter().map(String::as_str).collect();
    known.sort_unstable();
    for trigger in &config.triggers {
        let span = trigger.span();
        let trigger = trigger.get_ref();
        check.name(&span, "trigger", &trigger.name, &mut trigger_names);
        if !function_names.contains(&trigger.function) {
            check.error(
                span.clone(),
                "function",
                format!(
                    "trigger `{}` targets unknown function `{}` (known: {})",
                    trigger.name,
                    trigger.function,
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                ),
            );
        }
        let managed = config.functions.iter().any(|function| {
            function.get_ref().name() == trigger.function
                && matches!(
                    function.get_ref(),
                    FunctionConfig::Lambda(_) | FunctionConfig::Process(_)
                )
        });
        if trigger.payload == switchyard_dispatcher::PayloadFormat::Aws
            && function_names.contains(&trigger.function)
            && !config.functions.iter().any(|function| {
                function.get_ref().name() == trigger.function
                    && matches!(function.get_ref(), FunctionConfig::Lambda(_))
            })
        {
            check.error(
                span.clone(),
                "payload",
                format!(
                    "`aws` payloads are for `lambda` functions; `{}` receives CloudEvents (remove `payload`)",
                    trigger.function
                ),
            );
        }
        if !config.invoke_api.listen.is_empty()
            && let Some(function) = trigger.name.strip_prefix("invoke-")
            && config.functions.iter().any(|candidate| {
                candidate.get_ref().name() == function
                    && matches!(candidate.get_ref(), FunctionConfig::Lambda(_))
            })
        {
            check.error(
                span.clone(),
                "name",
                format!(
                    "`{}` is the name of the trigger delivering function `{function}`'s Event invocations (the Invoke API); choose another",
                    trigger.name
                ),
            );
        }
        let aws_lambda = trigger.payload == switchyard_dispatcher::PayloadFormat::Aws
            && config.functions.iter().any(|function| {
                function.get_ref().name() == trigger.function
                    && matches!(function.get_ref(), FunctionConfig::Lambda(_))
            });
        if managed && trigger.batch.is_some() && !aws_lambda {
            check.error(
                span.clone(),
                "batch",
                format!(
                    "function `{}` runs as instances Switchyard manages, which take one event per invocation unless a `lambda` function gets AWS-shaped batches (`payload = \"aws\"`); remove `batch`",
                    trigger.function
                ),
            );
        }
        if trigger.max_concurrency == 0 {
            check.error(
                span.clone(),
                "max_concurrency",
                "must be at least 1".to_owned(),
            );
        }
        let duplicate_window = config
            .nats
            .events_stream
            .duplicate_window
            .unwrap_or(Duration::from_secs(120));
        if trigger.ack_wait >= duplicate_window {
            check.error(
                span.clone(),
                "ack_wait",
                format!(
                    "{} is not shorter than the events stream's duplicate_window ({}): after a crash, the retry copy or dead letter a redelivered event publishes again would not be recognised as one already stored; lower ack_wait or raise nats.events_stream.duplicate_window",
                    humantime::format_duration(trigger.ack_wait),
                    humantime::format_duration(duplicate_window)
                ),
            );
        }
        if trigger.ack_wait < Duration::from_secs(1) {
            check.error(span.clone(), "ack_wait", "must be at least 1s".to_owned());
        }
        if !(1..=switchyard_bus::KEY_BUCKETS).contains(&trigger.partitions) {
            check.error(
                span.clone(),
                "partitions",
                format!(
                    "must be between 1 and {} (the bus's key buckets)",
                    switchyard_bus::KEY_BUCKETS
                ),
            );
        }
        if let Some(batch) = &trigger.batch {
            if !(1..=10_000).contains(&batch.max_events) {
                check.error(
                    span.clone(),
                    "batch",
                    "`max_events` must be between 1 and 10000".to_owned(),
                );
            }
            if batch.max_bytes == 0 {
                check.error(
                    span.clone(),
                    "batch",
                    "`max_bytes` must be at least 1".to_owned(),
                );
            }
            if batch.window < Duration::from_millis(10) || batch.window > Duration::from_secs(300) {
                check.error(
                    span.clone(),
                    "batch",
                    "`window` must be between 10ms and 300s".to_owned(),
                );
            }
            if trigger.ordering == switchyard_dispatcher::OrderingMode::Key {
                check.error(
                    span.clone(),
                    "batch",
                    "batching and `ordering = \"key\"` cannot be combined yet".to_owned(),
                );
            }
            if trigger.publish_replies {
                check.error(
                    span.clone(),
                    "publish_replies",
                    "a batched trigger has no single reply to publish".to_owned(),
                );
            }
        }
        for (field, destination) in [
            ("on_success", &trigger.on_success),
            ("on_failure", &trigger.on_failure),
        ] {
            if let Some(destination) = destination
                && let Some(problem) = destination_problem(destination)
            {
                check.error(span.clone(), field, problem);
            }
        }
        if let Some(enrich) = &trigger.enrich {
            if !config.stores.contains_key(&enrich.store) {
                check.error(
                    span.clone(),
                    "enrich",
                    format!(
                        "no store named `{}` (add a `[stores.{}]` table)",
                        enrich.store, enrich.store
                    ),
                );
            }
            if enrich.buckets.is_empty() {
                check.error(
                    span.clone(),
                    "enrich",
                    "list the `buckets` whose objects may be enriched (`[\"*\"]` for any): the bucket and key come from the event, so without a list any sender of events could make Switchyard read any object the store's credentials reach".to_owned(),
                );
            }
            if let Some(limit) = enrich.content_max_bytes
                && (limit == 0 || limit > switchyard_dispatcher::config::CONTENT_MAX_BYTES_LIMIT)
            {
                check.error(
                    span.clone(),
                    "enrich",
                    format!(
                        "`content_max_bytes` must be between 1 and {} (4 MiB: inlined as base64 it still fits a 6 MB Lambda payload)",
                        switchyard_dispatcher::config::CONTENT_MAX_BYTES_LIMIT
                    ),
                );
            }
            if enrich
                .presign
                .is_some_and(|valid| valid.is_zero() || valid > Duration::from_secs(7 * 24 * 3600))
            {
                check.error(
                    span.clone(),
                    "enrich",
                    "`presign` must be more than zero and at most 7 days (S3's limit)".to_owned(),
                );
            }
            if !cfg!(feature = "s3") {
                check.error(
                    span.clone(),
                    "enrich",
                    "this build has no object-store support (the `s3` feature)".to_owned(),
                );
            }
        }
        if trigger.retry.attempts == 0 {
            check.error(
                span.clone(),
                "retry",
                "`attempts` must be at least 1".to_owned(),
            );
        }
    }
    let mut source_names = HashSet::new();
    let mut listeners: HashMap<SocketAddr, String> = HashMap::new();
    for source in &config.sources {
        let span = source.span();
        let source = source.get_ref();
        check.name(&span, "source", source.name(), &mut source_names);
        match source {
            #[cfg(feature = "kafka")]
            SourceConfig::Kafka(kafka) => {
                for problem in kafka.problems() {
                    check.error(span.clone(), problem.field, problem.message);
                }
            }
            #[cfg(feature = "s3")]
            SourceConfig::S3(poll) => {
                for (field, message) in poll.problems() {
                    check.error(span.clone(), field, message);
                }
                if !config.stores.contains_key(&poll.store) {
                    let known: Vec<&str> = config.stores.keys().map(String::as_str).collect();
                    check.error(
                        span.clone(),
                        "store",
                        format!(
                            "no store named `{}` (add a `[stores.{}]` table; known: {})",
                            poll.store,
                            poll.store,
                            if known.is_empty() {
                                "none".to_owned()
                            } else {
                                known.join(", ")
                            }
                        ),
                    );
                }
            }
            SourceConfig::Schedule(schedule) => {
                for (field, message) in schedule.problems() {
                    check.error(span.clone(), field, message);
                }
            }
            #[cfg(feature = "sqs")]
            SourceConfig::Sqs(sqs) => {
                for (field, message) in sqs.problems() {
                    check.error(span.clone(), field, message);
                }
            }
            #[cfg(feature = "amqp")]
            SourceConfig::Amqp(amqp) => {
                for (field, message) in amqp.problems() {
                    check.error(span.clone(), field, message);
                }
            }
            #[cfg(feature = "mqtt")]
            SourceConfig::Mqtt(mqtt) => {
                for (field, message) in mqtt.problems() {
                    check.error(span.clone(), field, message);
                }
            }
            SourceConfig::Nats(nats) => {
                if nats.subjects.is_empty() == nats.stream.is_none() {
                    check.error(span.clone(), "subjects", format!("source `{}` needs either `subjects` (core NATS) or `stream` (JetStream), not both", nats.name));
                }
                if nats.event_type.is_empty() {
                    check.error(span.clone(), "event_type", "must not be empty".to_owned());
                }
            }
            SourceConfig::Http(http) => {
                match http.listen.parse::<SocketAddr>() {
                    Ok(address) => {
                        if let Some(other) = listeners.insert(address, http.name.clone()) {
                            check.error(
                                span.clone(),
                                "listen",
                                format!("`{address}` is already the listener of source `{other}`"),
                            );
                        }
                    }
                    Err(_) => check.error(
                        span.clone(),
                        "listen",
                        format!("`{}` is not an address like 127.0.0.1:8080", http.listen),
                    ),
                }
                let mut hook_names = HashSet::new();
                let hook_spans = sub_table_spans(check.text, &span, "[[sources.hooks]]");
                for (index, hook) in http.hooks.iter().enumerate() {
                    let hook_span = hook_spans.get(index).unwrap_or(&span).clone();
                    check.name(&span, "hook", &hook.name, &mut hook_names);
                    let raw = hook.format == switchyard_connector_http::HookFormat::Raw;
                    if raw && hook.event_type.as_deref().is_none_or(str::is_empty) {
                        check.error(
                            span.clone(),
                            "event_type",
                            format!("hook `{}` needs a non-empty event_type", hook.name),
                        );
                    }
                    if let (Some(tolerance), Some(_)) = (
                        hook.signature
                            .as_ref()
                            .and_then(|signature| signature.tolerance()),
                        &hook.id_header,
                    ) {
                        let remembered = hook.dedup_horizon().unwrap_or(
                            config
                                .nats
                                .events_stream
                                .duplicate_window
                                .unwrap_or(Duration::from_secs(120)),
                        );
                        // Timestamps are accepted `tolerance` either side of now.
                        if remembered < tolerance * 2 {
                            check.error(
                                hook_span.clone(),
                                "dedup_horizon",
                                format!(
                                    "hook `{}` forgets deliveries after {} but accepts signed timestamps {} either side of now: a captured request could be replayed in between; remember them at least twice the tolerance ({})",
                                    hook.name,
                                    humantime::format_duration(remembered),
                                    humantime::format_duration(tolerance),
                                    humantime::format_duration(tolerance * 2)
                                ),
                            );
                        }
                    }
                    if !raw && hook.event_type.is_some() {
                        check.error(
                            span.clone(),
                            "event_type",
                            format!("hook `{}` reads S3 notifications (`format = \"s3\"`), whose events take their type from each record; remove event_type", hook.name),
                        );
                    }
                }
                secret_problems(&mut check, &span, http);
                if open_to_network(&http.listen) && !verifies_clients(&http.tls) && !http.insecure {
                    let source_tokens = !http.tokens().is_empty();
                    if http.events_endpoint && !source_tokens {
                        check.error(
                            span.clone(),
                            "listen",
                            format!(
                                "source `{}` listens on `{}`, open to the network, and its `/v1/events` would take events from anyone: set `bearer_token` (or `bearer_tokens`), require client certificates with `tls.client_ca_file`, set `events_endpoint = false` if only its hooks are used, or `insecure = true` if the network in front of it is trusted",
                                http.name, http.listen
                            ),
                        );
                    }
                    for hook in &http.hooks {
                        if !hook.authenticates_itself() && !source_tokens {
                            check.error(
                                span.clone(),
                                "hooks",
                                format!(
                                    "hook `{}` of source `{}` is open to the network (`{}`) without authentication: give it a `bearer_token` or `signature` (or the source a `bearer_token`), or set the source's `insecure = true` if the network in front of it is trusted",
                                    hook.name, http.name, http.listen
                                ),
                            );
                        }
                    }
                }
                route_problems(&mut check, &span, http, config);
                if let Some(tls) = &http.tls
                    && let Err(error) = tls.check()
                {
                    check.error(span.clone(), "tls", error);
                }
                for (field, message) in http.limits.problems() {
                    check.error(span.clone(), "limits", format!("`{field}` {message}"));
                }
            }
        }
    }
    for (field, problem) in config.nats.auth_problems() {
        check
            .errors
            .push(section_error(file, text, "nats", field, problem));
    }
    for (field, problem) in config.telemetry.problems() {
        check
            .errors
            .push(section_error(file, text, "telemetry", field, problem));
    }
    let admin_tokens = config.admin.tokens();
    for (field, problem) in auth_secret_problems(&admin_tokens, None) {
        check
            .errors
            .push(section_error(file, text, "admin", field, problem));
    }
    if open_to_network(&config.admin.listen)
        && admin_tokens.is_empty()
        && !config.admin.insecure
        && !verifies_clients(&config.admin.tls)
    {
        check.errors.push(section_error(
            file,
            text,
            "admin",
            "listen",
            format!(
                "`{}` is open to the network and the admin endpoints (metrics, triggers, dead letters) would answer anyone: set admin.bearer_token, listen on loopback, or set admin.insecure = true if the network in front of it is trusted",
                config.admin.listen
            ),
        ));
    }
    if !config.admin.listen.is_empty() && config.admin.listen.parse::<SocketAddr>().is_err() {
        check.errors.push(ConfigError {
            file: file.to_owned(),
            line: 0,
            column: 0,
            field: Some("admin.listen".to_owned()),
            message: format!(
                "`{}` is not an address like 127.0.0.1:9090",
                config.admin.listen
            ),
        });
    }
    if !config.invoke_api.listen.is_empty() {
        let problem = match config.invoke_api.listen.parse::<SocketAddr>() {
            Err(_) => Some(format!(
                "`{}` is not an address like 127.0.0.1:9001",
                config.invoke_api.listen
            )),
            Ok(address)
                if !address.ip().is_loopback()
                    && config.invoke_api.credentials.is_empty()
                    && !config.invoke_api.insecure
                    && !verifies_clients(&config.invoke_api.tls) =>
            {
                Some(format!(
                    "`{}` is open to the network and invoke_api has no `credentials` to check request signatures against: add them, listen on loopback, or set invoke_api.insecure = true if the network in front of it is trusted",
                    config.invoke_api.listen
                ))
            }
            Ok(_) => None,
        };
        if let Some(message) = problem {
            check.errors.push(ConfigError {
                file: file.to_owned(),
                line: 0,
                column: 0,
                field: Some("invoke_api.listen".to_owned()),
                message,
            });
        }
    }
    for (section, tls) in [
        ("admin.tls", &config.admin.tls),
        ("invoke_api.tls", &config.invoke_api.tls),
    ] {
        if let Some(tls) = tls
            && let Err(message) = tls.check()
        {
            check.errors.push(ConfigError {
                file: file.to_owned(),
                line: 0,
                column: 0,
                field: Some(section.to_owned()),
                message,
            });
        }
    }
    for (section, limits) in [
        ("admin.limits", &config.admin.limits),
        ("invoke_api.limits", &config.invoke_api.limits),
    ] {
        for (field, message) in limits.problems() {
            check.errors.push(ConfigError {
                file: file.to_owned(),
                line: 0,
                column: 0,
                field: Some(format!("{section}.{field}")),
                message,
            });
        }
    }
    let mut key_ids = HashSet::new();
    for credential in &config.invoke_api.credentials {
        if !key_ids.insert(credential.access_key_id.as_str()) {
            check.errors.push(ConfigError {
                file: file.to_owned(),
                line: 0,
                column: 0,
                field: Some("invoke_api.credentials".to_owned()),
                message: format!("access key `{}` is listed twice", credential.access_key_id),
            });
        }
        if credential.access_key_id.is_empty()
            || credential.secret_access_key.expose_secret().is_empty()
        {
            check.errors.push(ConfigError {
                file: file.to_owned(),
                line: 0,
                column: 0,
                field: Some("invoke_api.credentials".to_owned()),
                message: "an access key needs a non-empty access_key_id and secret_access_key"
                    .to_owned(),
            });
        }
    }
    check.errors
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOST" => Some("example.org".to_owned()),
            _ => None,
        }
    }

    #[test]
    fn interpolation() {
        let file = Path::new("c.toml");
        let text = "a = \"${HOST}\"\nb = \"${PORT:-4222}\" # ${NOT_SET}\nc = \"$${HOST} $5\"\n";
        assert_eq!(
            interpolate(file, text, &env).unwrap(),
            "a = \"example.org\"\nb = \"4222\" # ${NOT_SET}\nc = \"${HOST} $5\"\n"
        );
        let error = interpolate(file, "\n\nx = \"${MISSING}\"", &env).unwrap_err();
        assert_eq!(error.0[0].line, 3);
        // Values are values, whatever they hold, in every kind of string.
        for value in [
            "plain",
            "quote\" and \\ backslash",
            "line\nbreak [admin]\r\t\u{1}",
            "${NESTED} $${ '''\"\"\"",
            "ünïcødé ✓",
        ] {
            let lookup = |name: &str| (name == "V").then(|| value.to_owned());
            for (text, literal) in [
                ("x = \"${V}\"\ny = 1\n", false),
                ("x = \"\"\"\n${V}\"\"\"\ny = 1\n", false),
                ("x = 'a${V}'\ny = 1\n", true),
            ] {
                let result = interpolate(file, text, &lookup);
                let literal_cannot = literal
                    && value
                        .chars()
                        .any(|c| c == '\'' || (c.is_control() && c != '\t'));
                if literal_cannot {
                    assert!(result.is_err(), "{value:?} in {text:?}");
                    continue;
                }
                let table: toml::Table = toml::from_str(&result.unwrap()).unwrap();
                let expected = if literal {
                    format!("a{value}")
                } else {
                    value.to_owned()
                };
                assert_eq!(table["x"].as_str(), Some(expected.as_str()), "{text:?}");
                assert_eq!(
                    table.len(),
                    2,
                    "{value:?} changed the structure of {text:?}"
                );
            }
        }
        assert_eq!(error.0[0].line, 3);
        assert!(
            error.0[0]
                .to_string()
                .starts_with("c.toml:3:6: environment variable `MISSING` is not set"),
            "{error}"
        );
    }
}
