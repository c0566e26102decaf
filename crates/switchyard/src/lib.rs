//! The `switchyard` binary's library: loads the configuration, connects the bus,
//! starts the dispatcher, the sources and the admin listener, and stops them in order
//! on shutdown (sources first, so nothing new is accepted; then the dispatcher drains).

pub mod admin;
pub mod calls;
pub mod code;
pub mod config;
pub mod console;
pub mod control_api;
pub mod deploy;
pub mod dlq;
pub mod function_logs;
pub mod invoke_api;
pub mod live;
pub mod registry;
pub mod routes;
pub mod sigv4;
pub mod sources;
pub mod telemetry;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use secrecy::ExposeSecret as _;
use switchyard_bus::Bus;
use switchyard_connector_http::HttpSourceMetrics;
use switchyard_dispatcher::{DestinationConfig, DispatcherMetrics};
use switchyard_event::Destination;
use switchyard_event::backoff::Backoff;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::{Config, ConfigErrors};

/// A running Switchyard: where it listens and how to stop it.
pub struct Running {
    /// Bound address of each HTTP source, by source name.
    pub sources: HashMap<String, SocketAddr>,
    /// Turns true once connected, streams and consumers set up, sources started.
    pub ready: tokio::sync::watch::Receiver<bool>,
    pub admin: Option<SocketAddr>,
    /// Where Lambda's Invoke API listens, when `[invoke_api] listen` is set.
    pub invoke_api: Option<SocketAddr>,
    /// Asks the running process to re-read its configuration file.
    pub reloads: tokio::sync::mpsc::Sender<ReloadRequest>,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Waits until Switchyard is ready; false if it stopped first.
    pub async fn wait_ready(&self) -> bool {
        let mut ready = self.ready.clone();
        ready.wait_for(|ready| *ready).await.is_ok()
    }

    /// What `--ready-file` holds: the process id and every bound address, as JSON.
    pub fn ready_report(&self) -> serde_json::Value {
        serde_json::json!({
            "pid": std::process::id(),
            "admin": self.admin.map(|address| address.to_string()),
            "invoke_api": self.invoke_api.map(|address| address.to_string()),
            "sources": self
                .sources
                .iter()
                .map(|(name, address)| (name.clone(), serde_json::Value::from(address.to_string())))
                .collect::<serde_json::Map<_, _>>(),
        })
    }

    /// Re-reads the configuration file and applies what changed (as SIGHUP and
    /// `POST /v1/reload` do).
    pub async fn reload(&self) -> anyhow::Result<live::ReloadOutcome> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.reloads
            .send(ReloadRequest { reply })
            .await
            .map_err(|_| anyhow::anyhow!("switchyard is stopping"))?;
        answer
            .await
            .map_err(|_| anyhow::anyhow!("switchyard stopped before reloading"))
    }

    /// Stops accepting, drains in-flight invocations and waits until everything ended.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.await.context("switchyard task panicked")?
    }
}

/// Connects to NATS, retrying until it answers or `shutdown` fires.
async fn connect_bus(
    config: &Config,
    connection_metrics: &switchyard_bus::ConnectionMetrics,
    admin_state: &admin::AdminState,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<Bus>> {
    let mut failures = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
    loop {
        match Bus::connect_counting(&config.nats, connection_metrics.clone()).await {
            Ok(bus) => {
                admin_state.set_connect_problem(None);
                return Ok(Some(bus));
            }
            // Not unreachable: the server answered and said no; `/readyz` says so too.
            Err(switchyard_bus::BusError::CredentialsRefused { url, reason }) => {
                admin_state
                    .set_connect_problem(Some(format!("nats refused the credentials: {reason}")));
                if failures.failed() {
                    tracing::error!(%url, %reason, attempt = failures.failures(), "nats refused the credentials, retrying");
                }
                if !failures.pause(shutdown.cancelled()).await {
                    return Ok(None);
                }
            }
            Err(error) => {
                admin_state.set_connect_problem(None);
                if failures.failed() {
                    tracing::warn!(%error, attempt = failures.failures(), "nats unreachable, retrying");
                }
                if !failures.pause(shutdown.cancelled()).await {
                    return Ok(None);
                }
            }
        }
    }
}

/// Says loudly, at every start, which doors open to the network authenticate
/// nobody because the configuration said `insecure = true`.
fn warn_insecure(config: &Config) {
    let open = config::open_to_network;
    for source in &config.sources {
        if let config::SourceConfig::Http(http) = source.get_ref()
            && http.insecure
            && open(&http.listen)
        {
            tracing::warn!(source = %http.name, listen = %http.listen, "insecure = true: this source takes events from anyone who reaches it without a token or signature; put it behind a network you trust");
        }
    }
    if config.admin.insecure && open(&config.admin.listen) {
        tracing::warn!(listen = %config.admin.listen, "admin.insecure = true: metrics and the trigger view are served to anyone who reaches them");
    }
    if config.invoke_api.insecure && open(&config.invoke_api.listen) {
        tracing::warn!(listen = %config.invoke_api.listen, "invoke_api.insecure = true: anyone who reaches it can invoke functions");
    }
}

/// Starts everything the configuration describes. Listeners are bound before this
/// returns; the bus connection and stream setup continue in the background, and
/// `/readyz` turns ready once they are done.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    warn_insecure(&config);
    let shutdown = CancellationToken::new();
    let ready = Arc::new(AtomicBool::new(false));
    let (ready_signal, ready_watch) = tokio::sync::watch::channel(false);
    let mut registry = Registry::with_prefix("switchyard");
    let source_metrics = HttpSourceMetrics::default();
    source_metrics.register(&mut registry);
    #[cfg(feature = "kafka")]
    let kafka_metrics = switchyard_connector_kafka::KafkaSourceMetrics::default();
    #[cfg(feature = "kafka")]
    kafka_metrics.register(&mut registry);
    let dispatcher_metrics = DispatcherMetrics::default();
    dispatcher_metrics.register(&mut registry);
    let connection_metrics = switchyard_bus::ConnectionMetrics::default();
    registry.register(
        "nats_disconnections",
        "times the connection to nats was lost (the client reconnects on its own)",
        connection_metrics.disconnections.clone(),
    );
    registry.register(
        "nats_messages_dropped",
        "messages the nats client dropped because a subscription's buffer was full (core nats source input is lost then)",
        connection_metrics.messages_dropped.clone(),
    );
    #[cfg(feature = "s3")]
    let poll_metrics = switchyard_connector_s3::poll::PollMetrics::default();
    #[cfg(feature = "s3")]
    poll_metrics.register(&mut registry);
    let supervisor_metrics = sources::SourceMetrics::default();
    supervisor_metrics.register(&mut registry);
    let route_metrics = routes::RouteMetrics::default();
    route_metrics.register(&mut registry);
    let worker_metrics = switchyard_workers::WorkerMetrics::default();
    worker_metrics.register(&mut registry);
    let reload_results =
        prometheus_client::metrics::family::Family::<ReloadLabels, Counter>::default();
    registry.register(
        "config_reloads",
        "configuration reloads, by result: applied, unchanged, refused (nothing changed) or failed (partly applied)",
        reload_results.clone(),
    );
    let registry = Arc::new(registry);
    // Made when the first function whose instances Switchyard runs is; it first
    // reaps what a killed predecessor left behind.
    let workers = Arc::new(std::sync::OnceLock::new());
    let revision = Arc::new(std::sync::RwLock::new(live::Revision {
        number: 0,
        config_sha256: live::config_sha256(&config),
        applied_at: switchyard_event::timestamp::now_rfc3339(),
    }));
    let (reload_sender, mut reload_requests) = tokio::sync::mpsc::channel::<ReloadRequest>(16);
    let reloadable = config.file.is_some();

    // HTTP sources bind now: until the bus is set up they answer `503 not ready`.
    let mut listeners = HashMap::new();
    let mut sources = HashMap::new();
    for source in &config.sources {
        if let config::SourceConfig::Http(http) = source.get_ref() {
            let listener = tokio::net::TcpListener::bind(&http.listen)
                .await
                .with_context(|| {
                    format!("source `{}`: cannot listen on `{}`", http.name, http.listen)
                })?;
            sources.insert(http.name.clone(), listener.local_addr()?);
            let interim = shutdown.child_token();
            let listener = listener.into_std()?;
            switchyard_connector_http::not_ready(
                tokio::net::TcpListener::from_std(listener.try_clone()?)?,
                http.limits.clone(),
                http.tls.clone(),
                interim.clone(),
            );
            listeners.insert(http.name.clone(), (listener, interim));
        }
    }
    let admin_state = admin::AdminState::new(
        registry.clone(),
        ready.clone(),
        workers.clone(),
        revision.clone(),
        reloadable.then(|| reload_sender.clone()),
    )
    .with_tokens(config.admin.tokens().into_iter().cloned().collect())
    .with_console(console::ConsoleInfo {
        version: env!("CARGO_PKG_VERSION"),
        telemetry: config.telemetry.otlp_endpoint.is_some(),
        trace_url: config.telemetry.trace_url.clone(),
        dead_letters: false,
    });
    let invoke_api_state = invoke_api::InvokeApiState::new(
        config.workers.region.clone(),
        config.invoke_api.max_wait,
        sigv4::Keys::new(config.invoke_api.credentials.iter().map(|credential| {
            (
                credential.access_key_id.clone(),
                credential.secret_access_key.expose_secret().to_owned(),
            )
        })),
    )
    .with_https(config.invoke_api.tls.is_some());
    let invoke_api_address = if config.invoke_api.listen.is_empty() {
        None
    } else {
        let listener = tokio::net::TcpListener::bind(&config.invoke_api.listen)
            .await
            .with_context(|| {
                format!(
                    "invoke_api: cannot listen on `{}`",
                    config.invoke_api.listen
                )
            })?;
        let address = listener.local_addr()?;
        let router = invoke_api::router(invoke_api_state.clone());
        serve_in_background(
            "the invoke api listener",
            listener,
            router,
            config.invoke_api.limits.clone(),
            config.invoke_api.tls.clone(),
            shutdown.clone(),
        );
        tracing::info!(listen = %address, "lambda invoke api listening (POST /2015-03-31/functions/{{name}}/invocations)");
        Some(address)
    };
    let admin_address = if config.admin.listen.is_empty() {
        None
    } else {
        let listener = tokio::net::TcpListener::bind(&config.admin.listen)
            .await
            .with_context(|| format!("admin: cannot listen on `{}`", config.admin.listen))?;
        let address = listener.local_addr()?;
        let router = admin::router(admin_state.clone());
        serve_in_background(
            "the admin listener",
            listener,
            router,
            config.admin.limits.clone(),
            config.admin.tls.clone(),
            shutdown.clone(),
        );
        Some(address)
    };
    if let Some(file) = config.file.clone() {
        watch_config_file(
            file,
            Arc::new(AtomicBool::new(config.admin.watch_config)),
            reload_sender.clone(),
            shutdown.clone(),
        );
    }

    let task_shutdown = shutdown.clone();
    let task = tokio::spawn(async move {
        let Some(bus) =
            connect_bus(&config, &connection_metrics, &admin_state, &task_shutdown).await?
        else {
            return Ok(());
        };
        let mut failures = Backoff::new(Duration::from_millis(500), Duration::from_secs(5));
        loop {
            match bus.ensure_streams().await {
                Ok(()) => break,
                // The configuration asks what the server cannot do: say so and stop,
                // rather than stay unready forever.
                Err(error @ switchyard_bus::BusError::Config(_)) => {
                    return Err(anyhow::Error::new(error).context("setting up the streams"));
                }
                Err(error) => {
                    if failures.failed() {
                        tracing::warn!(%error, failures = failures.failures(), "stream setup failed, retrying");
                    }
                    if !failures.pause(task_shutdown.cancelled()).await {
                        return Ok(());
                    }
                }
            }
        }
        let watching = config.admin.watch_config;
        let handles = live::Handles {
            bus: bus.clone(),
            workers,
            workers_settings: switchyard_workers::WorkersSettings {
                region: config.workers.region.clone(),
                max_cold_starts: config.workers.max_cold_starts,
                stop_grace: config.workers.stop_grace,
                cgroups: config.workers.isolation == config::Isolation::Auto,
            },
            worker_metrics,
            dispatcher_metrics,
            source_metrics,
            #[cfg(feature = "kafka")]
            kafka_metrics,
            #[cfg(feature = "s3")]
            poll_metrics,
            supervisor_metrics,
            route_metrics,
            admin_state,
            invoke_api_state,
            revision,
            reserved: Default::default(),
        };
        let triggers = config.triggers.len();
        let source_count = config.sources.len();
        // Functions defined through the Lambda API live where the Invoke API does.
        let (api_sender, mut api_changes) = tokio::sync::mpsc::channel::<live::ApiChange>(256);
        let api = if config.invoke_api.listen.is_empty() {
            None
        } else {
            let registry = registry::Registry::open(&bus)
                .await
                .context("opening the lambda api's function registry")?;
            watch_registry(registry.clone(), api_sender, task_shutdown.clone()).await?;
            Some(live::ApiFunctions::new(registry))
        };
        let invoke_api_for_control = handles.invoke_api_state.clone();
        let mut live = live::Live::start(handles, config, listeners, api.clone()).await?;
        if let Some(api) = api {
            invoke_api_for_control.set_control(api);
        }
        ready.store(true, Ordering::SeqCst);
        ready_signal.send_replace(true);
        tracing::info!(
            triggers,
            sources = source_count,
            watching,
            "switchyard ready"
        );
        loop {
            tokio::select! {
                // A stop comes before any change still queued.
                biased;
                () = task_shutdown.cancelled() => break,
                Some(change) = api_changes.recv() => live.apply_api(change).await,
                Some(request) = reload_requests.recv() => {
                    let outcome = live.reload().await;
                    reload_results
                        .get_or_create(&ReloadLabels { result: outcome.result.to_owned() })
                        .inc();
                    match outcome.result {
                        "applied" => tracing::info!(revision = outcome.revision.number, changes = ?outcome.changes, "configuration reloaded"),
                        "unchanged" => tracing::info!(revision = outcome.revision.number, "configuration reloaded: nothing changed"),
                        "refused" => tracing::error!(errors = ?outcome.errors, "configuration reload refused: the running configuration stays"),
                        _ => tracing::error!(revision = outcome.revision.number, changes = ?outcome.changes, errors = ?outcome.errors, "configuration reload applied in part"),
                    }
                    let _ = request.reply.send(outcome);
                }
            }
        }
        ready.store(false, Ordering::SeqCst);
        live.stop().await;
        tracing::info!("switchyard stopped");
        Ok(())
    });
    Ok(Running {
        sources,
        ready: ready_watch,
        admin: admin_address,
        invoke_api: invoke_api_address,
        reloads: reload_sender,
        shutdown,
        task,
    })
}

/// Follows the function registry: every definition put or deleted, by any process,
/// reaches the reconciler. The watch starts before the first apply lists the
/// definitions, so no change falls between the two (one seen twice is ignored).
async fn watch_registry(
    registry: registry::Registry,
    changes: tokio::sync::mpsc::Sender<live::ApiChange>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    use futures::StreamExt as _;
    let mut watch = registry
        .watch()
        .await
        .context("watching the lambda api's function registry")?;
    tokio::spawn(async move {
        let mut failures = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            let entry = tokio::select! {
                () = shutdown.cancelled() => return,
                entry = watch.next() => entry,
            };
            let change = match entry {
                Some(Ok(entry)) => {
                    failures.succeeded();
                    let record = match entry.operation {
                        switchyard_bus::async_nats::jetstream::kv::Operation::Put => {
                            match serde_json::from_slice(&entry.value) {
                                Ok(record) => Some((record, entry.revision)),
                                Err(error) => {
                                    tracing::error!(function = %entry.key, %error, "a function definition in the registry does not parse; ignored");
                                    continue;
                                }
                            }
                        }
                        _ => None,
                    };
                    live::ApiChange {
                        name: entry.key,
                        record,
                    }
                }
                other => {
                    if failures.failed() {
                        let error = match other {
                            Some(Err(error)) => error.to_string(),
                            _ => "the watch ended".to_owned(),
                        };
                        tracing::warn!(%error, "watching the function registry failed, watching again");
                    }
                    if !failures.pause(shutdown.cancelled()).await {
                        return;
                    }
                    match registry.watch().await {
                        Ok(renewed) => watch = renewed,
                        Err(error) => {
                            tracing::warn!(%error, "watching the function registry failed")
                        }
                    }
                    continue;
                }
            };
            if changes.send(change).await.is_err() {
                return;
            }
        }
    });
    Ok(())
}

/// A request to re-read the configuration file, answered with what it changed.
pub struct ReloadRequest {
    pub reply: tokio::sync::oneshot::Sender<live::ReloadOutcome>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ReloadLabels {
    result: String,
}

/// With `[admin] watch_config = true`, asks for a reload whenever the file's
/// contents change (read every second: this also sees a Kubernetes ConfigMap's
/// symlink swap, which file-change notifications on the path miss).
fn watch_config_file(
    file: std::path::PathBuf,
    enabled: Arc<AtomicBool>,
    reloads: tokio::sync::mpsc::Sender<ReloadRequest>,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        let mut last = tokio::fs::read(&file).await.ok();
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = shutdown.cancelled() => return,
            }
            let now = tokio::fs::read(&file).await.ok();
            if now == last || now.is_none() {
                continue;
            }
            last = now;
            if !enabled.load(Ordering::Relaxed) {
                continue;
            }
            tracing::info!(file = %file.display(), "configuration file changed, reloading");
            let (reply, answer) = tokio::sync::oneshot::channel();
            if reloads.send(ReloadRequest { reply }).await.is_err() {
                return;
            }
            if answer.await.is_ok()
                && let Some(watch) = outcome_watch_config(&file)
            {
                enabled.store(watch, Ordering::Relaxed);
            }
        }
    });
}

/// Whether the file now asks to be watched (it can turn watching off live).
fn outcome_watch_config(file: &std::path::Path) -> Option<bool> {
    config::load(file)
        .ok()
        .map(|config| config.admin.watch_config)
}

/// Serves `router` on `listener` (the Invoke API, the admin listener) until
/// `shutdown`, logging why it stopped if it fails.
fn serve_in_background(
    name: &'static str,
    listener: tokio::net::TcpListener,
    router: axum::Router,
    limits: switchyard_connector_http::listener::ListenerLimits,
    tls: Option<switchyard_connector_http::listener::TlsFiles>,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        if let Err(error) = switchyard_connector_http::listener::serve(
            listener,
            router,
            &limits,
            tls.as_ref(),
            async move { shutdown.cancelled().await },
        )
        .await
        {
            tracing::error!(%error, "{name} stopped");
        }
    });
}

/// What the workers need of a `lambda` function's configuration.
fn lambda_spec(lambda: &config::LambdaFunctionConfig) -> switchyard_workers::FunctionSpec {
    switchyard_workers::FunctionSpec {
        name: lambda.name.clone(),
        kind: switchyard_workers::Kind::Lambda {
            handler: lambda.handler.clone(),
        },
        command: lambda.command.clone(),
        directory: lambda.directory.clone(),
        environment: lambda
            .environment
            .iter()
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect(),
        timeout: lambda.timeout,
        init_timeout: lambda.init_timeout,
        idle_timeout: lambda.idle_timeout,
        memory_mb: lambda.memory,
        min_instances: lambda.min_instances,
        max_instances: lambda.max_instances(),
        instance_concurrency: lambda.instance_concurrency.max(1),
        max_cold_starts: lambda.max_cold_starts,
    }
}

/// What the workers need of a `process` function's configuration.
fn process_spec(process: &config::ProcessFunctionConfig) -> switchyard_workers::FunctionSpec {
    switchyard_workers::FunctionSpec {
        name: process.name.clone(),
        kind: switchyard_workers::Kind::Process {
            path: process.path.clone(),
            readiness_path: process.readiness_path.clone(),
        },
        command: process.command.clone(),
        directory: process.directory.clone(),
        environment: process
            .environment
            .iter()
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect(),
        timeout: process.timeout,
        init_timeout: process.init_timeout,
        idle_timeout: process.idle_timeout,
        memory_mb: process.memory,
        min_instances: process.min_instances,
        max_instances: process.max_instances(),
        instance_concurrency: process.instance_concurrency.max(1),
        max_cold_starts: process.max_cold_starts,
    }
}

/// A trigger destination from its configuration.
fn build_destination(
    bus: &Bus,
    config: &DestinationConfig,
) -> anyhow::Result<Arc<dyn Destination>> {
    match config {
        DestinationConfig::Nats { subject } => Ok(Arc::new(switchyard_bus::NatsDestination::new(
            bus.clone(),
            subject.clone(),
        ))),
        #[cfg(feature = "kafka")]
        DestinationConfig::Kafka {
            brokers,
            topic,
            properties,
        } => Ok(Arc::new(
            switchyard_connector_kafka::KafkaDestination::new(brokers, topic, properties)
                .map_err(anyhow::Error::msg)?,
        )),
        #[cfg(not(feature = "kafka"))]
        DestinationConfig::Kafka { .. } => {
            anyhow::bail!("this build has no Kafka support (the `kafka` feature)")
        }
    }
}

/// Installs the log subscriber described by the configuration.
pub fn init_logging(config: &config::LogConfig) {
    use tracing_subscriber::EnvFilter;
    let mut filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.level));
    // Libraries whose debug and trace lines carry credentials, whatever level is
    // asked for: amq-protocol-tcp traces the AMQP URL with its password, lapin traces
    // frames (the connection's start-ok holds the SASL credentials).
    for quiet in ["amq_protocol_tcp=info", "lapin=info"] {
        filter = filter.add_directive(quiet.parse().expect("a valid directive"));
    }
    // Colours only for a terminal: a file or a log collector gets plain text.
    use std::io::IsTerminal as _;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match config.format {
        config::LogFormat::Text => builder.try_init(),
        config::LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// The enricher of a trigger's `enrich`.
#[cfg(feature = "s3")]
async fn build_enricher(
    config: &Config,
    enrich: &switchyard_dispatcher::EnrichConfig,
) -> anyhow::Result<Arc<dyn switchyard_event::Enricher>> {
    let store = config
        .stores
        .get(&enrich.store)
        .with_context(|| format!("no store `{}`", enrich.store))?;
    Ok(Arc::new(
        switchyard_connector_s3::enrich::ObjectEnricher::new(
            store.get_ref().client().await,
            enrich.buckets.clone(),
            enrich.presign,
            enrich.metadata,
            enrich.tags,
            enrich.content_max_bytes,
        ),
    ))
}

#[cfg(not(feature = "s3"))]
async fn build_enricher(
    _config: &Config,
    _enrich: &switchyard_dispatcher::EnrichConfig,
) -> anyhow::Result<Arc<dyn switchyard_event::Enricher>> {
    anyhow::bail!("this build has no object-store support (the `s3` feature)")
}

/// The event sources that only their own door may produce: a webhook's, a NATS
/// source's, a Kafka source's plain records, a polled bucket's, and S3 notification
/// sources when a hook takes them. `POST /v1/events` refuses events claiming one.
fn reserved_sources(config: &config::Config) -> switchyard_connector_http::ReservedSources {
    let mut reserved = switchyard_connector_http::ReservedSources::default();
    // Recorded calls of function URLs.
    for source in &config.sources {
        if let config::SourceConfig::Http(http) = source.get_ref()
            && http.routes.iter().any(|route| route.record)
        {
            reserved.reserve(
                routes::record_source(&http.name),
                format!("the routes of source `{}`", http.name),
            );
        }
    }
    // The Invoke API's `Event` invocations.
    if !config.invoke_api.listen.is_empty() {
        reserved.reserve_prefix(
            switchyard_workers::aws::INVOKE_SOURCE_PREFIX,
            "the lambda invoke api".to_owned(),
        );
        #[cfg(feature = "kafka")]
        reserved.reserve_prefix(
            switchyard_connector_kafka::record::MAPPING_SOURCE_PREFIX,
            "lambda event source mappings".to_owned(),
        );
    }
    for source in &config.sources {
        match source.get_ref() {
            config::SourceConfig::Http(http) => {
                for hook in &http.hooks {
                    let owner = format!("webhook `{}`", hook.name);
                    match hook.format {
                        switchyard_connector_http::HookFormat::S3 => {
                            // Notifications name any bucket: `<eventSource>.<region>.<bucket>`.
                            reserved.reserve_prefix("aws:s3.", owner.clone());
                            reserved.reserve_prefix("minio:s3.", owner);
                        }
                        _ => reserved.reserve(
                            hook.event_source
                                .clone()
                                .unwrap_or_else(|| format!("/hooks/{}", hook.name)),
                            owner,
                        ),
                    }
                }
            }
            config::SourceConfig::Nats(nats) => {
                reserved.reserve(nats.source(), format!("nats source `{}`", nats.name));
            }
            // A forged firing would take the real one's place in the duplicate window.
            config::SourceConfig::Schedule(schedule) => {
                reserved.reserve(schedule.source(), format!("schedule `{}`", schedule.name));
            }
            // Events keep their message id: a forged one would take a real message's
            // place in the duplicate window.
            #[cfg(feature = "sqs")]
            config::SourceConfig::Sqs(sqs) => {
                for partition in [
                    "aws",
                    "aws-cn",
                    "aws-us-gov",
                    "aws-iso",
                    "aws-iso-b",
                    "aws-iso-e",
                    "aws-iso-f",
                    "aws-eusc",
                ] {
                    reserved.reserve_prefix(
                        format!("arn:{partition}:sqs:"),
                        format!("sqs source `{}`", sqs.name),
                    );
                }
            }
            #[cfg(feature = "amqp")]
            config::SourceConfig::Amqp(amqp) => {
                reserved.reserve(amqp.source(), format!("amqp source `{}`", amqp.name));
            }
            #[cfg(feature = "mqtt")]
            config::SourceConfig::Mqtt(mqtt) => {
                reserved.reserve(mqtt.source(), format!("mqtt source `{}`", mqtt.name));
            }
            #[cfg(feature = "kafka")]
            config::SourceConfig::Kafka(kafka) => reserved.reserve_prefix(
                kafka.event_source(""),
                format!("kafka source `{}`", kafka.name),
            ),
            #[cfg(feature = "s3")]
            config::SourceConfig::S3(poll) => {
                if let Some(store) = config.stores.get(&poll.store) {
                    let store = store.get_ref();
                    for bucket in &poll.buckets {
                        reserved.reserve(
                            format!("{}.{}.{bucket}", store.event_source, store.event_region()),
                            format!("polled bucket `{bucket}` of source `{}`", poll.name),
                        );
                    }
                }
            }
        }
    }
    reserved
}
