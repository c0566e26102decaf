//! The `switchyard` binary's library: loads the configuration, connects the bus,
//! starts the dispatcher, the sources and the admin listener, and stops them in order
//! on shutdown (sources first, so nothing new is accepted; then the dispatcher drains).

pub mod admin;
pub mod calls;
pub mod config;
pub mod dlq;
pub mod invoke_api;
pub mod routes;
pub mod sigv4;
pub mod sources;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use prometheus_client::registry::Registry;
use secrecy::ExposeSecret as _;
use switchyard_bus::Bus;
use switchyard_connector_http::HttpSourceMetrics;
use switchyard_dispatcher::{
    AdaptiveLimit, DestinationConfig, Destinations, Dispatcher, DispatcherMetrics, FunctionRuntime,
    TriggerConfig,
};
use switchyard_event::backoff::Backoff;
use switchyard_event::{Destination, EventSink, Source, Target};
use switchyard_targets::{HttpTarget, LogTarget, http_client};
use switchyard_workers::ManagedFunction;
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
    let registry = Arc::new(registry);
    // Functions whose instances Switchyard runs: set up (and what a killed
    // predecessor left behind reaped) before anything starts one.
    let workers = config
        .functions
        .iter()
        .any(|function| {
            matches!(
                function.get_ref(),
                config::FunctionConfig::Lambda(_) | config::FunctionConfig::Process(_)
            )
        })
        .then(|| {
            Arc::new(switchyard_workers::Workers::new(
                switchyard_workers::WorkersSettings {
                    region: config.workers.region.clone(),
                    max_cold_starts: config.workers.max_cold_starts,
                    stop_grace: config.workers.stop_grace,
                    cgroups: config.workers.isolation == config::Isolation::Auto,
                },
                worker_metrics,
            ))
        });

    let mut source_listeners = Vec::new();
    let mut nats_sources = Vec::new();
    #[cfg(feature = "kafka")]
    let mut kafka_sources = Vec::new();
    #[cfg(feature = "s3")]
    let mut poll_sources = Vec::new();
    let mut sources = HashMap::new();
    for source in &config.sources {
        match source.get_ref() {
            config::SourceConfig::Nats(nats) => nats_sources.push(nats.clone()),
            #[cfg(feature = "kafka")]
            config::SourceConfig::Kafka(kafka) => {
                // Records keep themselves exactly only when a trigger may hand them
                // to a handler as Lambda's Kafka event.
                let mut kafka = kafka.clone();
                kafka.keep_records = config.triggers.iter().any(|trigger| {
                    trigger.get_ref().payload == switchyard_dispatcher::PayloadFormat::Aws
                });
                kafka_sources.push(kafka);
            }
            #[cfg(feature = "s3")]
            config::SourceConfig::S3(poll) => {
                let store = config
                    .stores
                    .get(&poll.store)
                    .with_context(|| format!("source `{}`: no store `{}`", poll.name, poll.store))?
                    .get_ref()
                    .clone();
                poll_sources.push((poll.clone(), store));
            }
            config::SourceConfig::Http(http) => {
                let listener = tokio::net::TcpListener::bind(&http.listen)
                    .await
                    .with_context(|| {
                        format!("source `{}`: cannot listen on `{}`", http.name, http.listen)
                    })?;
                sources.insert(http.name.clone(), listener.local_addr()?);
                // Until the source runs, requests get a fast `503 not ready`.
                let interim = shutdown.child_token();
                let listener = listener.into_std()?;
                switchyard_connector_http::not_ready(
                    tokio::net::TcpListener::from_std(listener.try_clone()?)?,
                    http.limits.clone(),
                    http.tls.clone(),
                    interim.clone(),
                );
                source_listeners.push((
                    http.clone(),
                    tokio::net::TcpListener::from_std(listener)?,
                    interim,
                ));
            }
        }
    }
    let reserved = Arc::new(reserved_sources(&config));
    let admin_state = admin::AdminState::new(registry.clone(), ready.clone(), workers.clone())
        .with_tokens(config.admin.tokens().into_iter().cloned().collect());
    let invoke_api_state = invoke_api::InvokeApiState::new(
        config.workers.region.clone(),
        config.invoke_api.max_wait,
        sigv4::Keys::new(config.invoke_api.credentials.iter().map(|credential| {
            (
                credential.access_key_id.clone(),
                credential.secret_access_key.expose_secret().to_owned(),
            )
        })),
    );
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
        let client = http_client();
        let mut functions = HashMap::new();
        // What synchronous calls (the Invoke API, function URLs) reach, with the
        // budget the function's triggers use; slots are added once the dispatcher
        // made them.
        let mut callable: Vec<(calls::CallKind, Arc<AdaptiveLimit>, Duration)> = Vec::new();
        let mut callable_names = Vec::new();
        for function in &config.functions {
            let function = function.get_ref();
            let limit = AdaptiveLimit::new(function.max_concurrency());
            let (target, timeout, call): (Arc<dyn Target>, Duration, Option<calls::CallKind>) =
                match function {
                    config::FunctionConfig::Http(http) => {
                        let url = reqwest::Url::parse(&http.url)
                            .with_context(|| format!("function `{}`: bad url", http.name))?;
                        // https:// functions get a client of their own (their CA, their
                        // client certificate); http:// ones share one without TLS.
                        let client =
                            if url.scheme() == "https" {
                                http.tls.clone().unwrap_or_default().client().map_err(
                                    |problem| {
                                        anyhow::anyhow!("function `{}`: tls: {problem}", http.name)
                                    },
                                )?
                            } else {
                                client.clone()
                            };
                        let target = Arc::new(
                            HttpTarget::new(http.name.clone(), url, client)
                                .with_auth(http.auth.clone()),
                        );
                        (
                            target.clone(),
                            http.timeout,
                            Some(calls::CallKind::Http(target)),
                        )
                    }
                    config::FunctionConfig::Log(log) => (
                        Arc::new(LogTarget::new(log.name.clone())),
                        Duration::from_secs(5),
                        None,
                    ),
                    config::FunctionConfig::Lambda(lambda) => {
                        let workers = workers.as_ref().expect("set up for managed functions");
                        let managed = workers.add(lambda_spec(lambda));
                        (
                            Arc::new(managed.clone()),
                            lambda.timeout,
                            Some(calls::CallKind::Lambda(managed)),
                        )
                    }
                    config::FunctionConfig::Process(process) => {
                        let workers = workers.as_ref().expect("set up for managed functions");
                        let managed = workers.add(process_spec(process));
                        (
                            Arc::new(managed.clone()),
                            process.timeout,
                            Some(calls::CallKind::Process(managed)),
                        )
                    }
                };
            if let Some(call) = call {
                callable.push((call, limit.clone(), timeout));
                callable_names.push(function.name().to_owned());
            }
            functions.insert(
                function.name().to_owned(),
                Arc::new(FunctionRuntime {
                    name: function.name().to_owned(),
                    target,
                    timeout,
                    limit,
                    cluster_slots: (function.concurrency_scope()
                        == config::ConcurrencyScope::Cluster)
                        .then_some(function.max_concurrency()),
                }),
            );
        }

        let triggers: Vec<TriggerConfig> = config.all_triggers();
        let lambdas: HashMap<&str, &ManagedFunction> = callable_names
            .iter()
            .zip(&callable)
            .filter_map(|(name, (kind, _, _))| match kind {
                calls::CallKind::Lambda(managed) => Some((name.as_str(), managed)),
                _ => None,
            })
            .collect();
        let mut destinations = HashMap::new();
        for trigger in &triggers {
            let build = |destination: &Option<DestinationConfig>| {
                destination
                    .as_ref()
                    .map(|destination| build_destination(&bus, destination))
                    .transpose()
            };
            let enricher = match &trigger.enrich {
                None => None,
                Some(enrich) => Some(
                    build_enricher(&config, enrich)
                        .await
                        .with_context(|| format!("trigger `{}`: enrich", trigger.name))?,
                ),
            };
            // `payload = "aws"` (validated to name a `lambda` function).
            let target = match (trigger.payload, lambdas.get(trigger.function.as_str())) {
                (switchyard_dispatcher::PayloadFormat::Aws, Some(managed)) => {
                    Some(Arc::new(managed.aws_payloads()) as Arc<dyn Target>)
                }
                _ => None,
            };
            destinations.insert(
                trigger.name.clone(),
                Destinations {
                    target,
                    enricher,
                    on_success: build(&trigger.on_success)
                        .with_context(|| format!("trigger `{}`: on_success", trigger.name))?,
                    on_failure: build(&trigger.on_failure)
                        .with_context(|| format!("trigger `{}`: on_failure", trigger.name))?,
                },
            );
        }
        drop(lambdas);
        // Consumers exist before any source accepts an event, so a new trigger that
        // starts at `new` sees every event accepted from now on.
        let dispatcher = Dispatcher::new(
            bus.clone(),
            config.dispatcher.clone(),
            triggers,
            functions,
            destinations,
            dispatcher_metrics,
        )
        .await
        .context("starting the dispatcher")?;
        admin_state.set_dispatcher(dispatcher.view(), bus.clone());
        let callable: HashMap<String, Arc<calls::SyncFunction>> = callable_names
            .into_iter()
            .zip(callable)
            .map(|(name, (kind, limit, timeout))| {
                let slots = dispatcher.function_slots(&name);
                (
                    name.clone(),
                    Arc::new(calls::SyncFunction {
                        name,
                        kind,
                        limit,
                        slots,
                        timeout,
                    }),
                )
            })
            .collect();
        // Lambda's Invoke API calls them from now on, within the same budgets as
        // their triggers.
        invoke_api_state.set_functions(&callable, bus.clone());
        let sink: Arc<dyn EventSink> = Arc::new(bus.clone());
        let source_shutdown = CancellationToken::new();
        let mut supervised: Vec<Arc<dyn Source>> = Vec::new();
        // Hooks keep their request (headers, path, client) only when a trigger may
        // hand it to a handler as an API Gateway request.
        let keep_requests = config
            .triggers
            .iter()
            .any(|trigger| trigger.get_ref().payload == switchyard_dispatcher::PayloadFormat::Aws);
        for (http, listener, interim) in source_listeners {
            let mut horizons: HashMap<String, Arc<dyn switchyard_event::DedupHorizon>> =
                HashMap::new();
            for hook in &http.hooks {
                if let Some(horizon) = hook.dedup_horizon() {
                    // Names may hold `_` and `-`: the source name's length makes the
                    // split unambiguous (`a_b`+`c` is `3_a_b_c`, `a`+`b_c` is `1_a_b_c`).
                    let store = switchyard_bus::horizon::KvHorizon::open(
                        &bus,
                        &format!("{}_{}_{}", http.name.len(), http.name, hook.name),
                        horizon,
                    )
                    .await
                    .with_context(|| format!("hook `{}`: opening its dedup horizon", hook.name))?;
                    horizons.insert(hook.name.clone(), Arc::new(store));
                }
            }
            let routes = routes::router(
                &http,
                &callable,
                &bus,
                &config.workers.region,
                &route_metrics,
            )
            .with_context(|| format!("source `{}`: routes", http.name))?;
            let router = switchyard_connector_http::router(
                http.clone(),
                sink.clone(),
                source_metrics.clone(),
                reserved.clone(),
                horizons,
                routes,
                keep_requests,
            );
            tracing::info!(source = %http.name, listen = %listener.local_addr()?, "http source listening");
            supervised.push(Arc::new(switchyard_connector_http::HttpSource::new(
                http.name.clone(),
                listener.into_std()?,
                router,
                http.limits.clone(),
                http.tls.clone(),
                interim,
            )));
        }
        for nats in nats_sources {
            tracing::info!(source = %nats.name, "nats source consuming");
            supervised.push(Arc::new(switchyard_connector_nats::NatsSource::new(
                nats,
                bus.clone(),
            )));
        }
        #[cfg(feature = "kafka")]
        for kafka in kafka_sources {
            supervised.push(Arc::new(switchyard_connector_kafka::KafkaSource::new(
                kafka,
                bus.clone(),
                kafka_metrics.clone(),
            )));
        }
        #[cfg(feature = "s3")]
        for (poll, store) in poll_sources {
            tracing::info!(source = %poll.name, buckets = ?poll.buckets, "s3 poll source started");
            supervised.push(Arc::new(switchyard_connector_s3::poll::PollSource::new(
                poll,
                store,
                bus.clone(),
                poll_metrics.clone(),
            )));
        }
        let mut servers = Vec::new();
        let mut cells = Vec::new();
        for source in supervised {
            let (cell, task) =
                sources::supervise(source, &supervisor_metrics, source_shutdown.clone());
            cells.push(cell);
            servers.push(task);
        }
        admin_state.set_sources(cells);
        ready.store(true, Ordering::SeqCst);
        ready_signal.send_replace(true);
        tracing::info!(
            triggers = config.triggers.len(),
            sources = config.sources.len(),
            "switchyard ready"
        );
        let dispatcher_shutdown = CancellationToken::new();
        let dispatching = tokio::spawn(dispatcher.run(dispatcher_shutdown.clone()));
        task_shutdown.cancelled().await;
        ready.store(false, Ordering::SeqCst);
        tracing::info!("shutting down: closing sources");
        source_shutdown.cancel();
        for server in servers {
            let _ = server.await;
        }
        tracing::info!("shutting down: draining the dispatcher");
        dispatcher_shutdown.cancel();
        let _ = dispatching.await;
        if let Some(workers) = &workers {
            tracing::info!("shutting down: stopping function instances");
            workers.shutdown().await;
        }
        // Acks and NAKs sent while draining must reach the server before we leave.
        let _ = tokio::time::timeout(Duration::from_secs(2), bus.client().flush()).await;
        tracing::info!("switchyard stopped");
        Ok(())
    });
    Ok(Running {
        sources,
        ready: ready_watch,
        admin: admin_address,
        invoke_api: invoke_api_address,
        shutdown,
        task,
    })
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
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.level));
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
