//! The reconciler: what runs follows the desired state. The first configuration is
//! applied at start; each reload (SIGHUP, `POST /v1/reload`, a watched file) compares
//! the new file with the one running, table by table, and changes only what differs:
//!
//! - functions added, changed or removed: a changed function is built anew and its
//!   triggers, routes and Invoke API entry move to it at once; the old one serves
//!   what is already on its way, its idle instances stop now, busy ones once they
//!   finish. Unchanged functions keep their instances.
//! - triggers added, changed or removed through the running dispatcher: durable
//!   consumers keep their positions, a removed trigger stops pulling and lets its
//!   invocations in flight finish, so a change loses nothing and delivers nothing
//!   twice.
//! - sources started, restarted (when their table changed) or stopped by the
//!   supervisor; an HTTP source's routes and hooks are swapped on its running
//!   listener without dropping connections, and a new `listen` rebinds.
//!
//! What cannot change while running (the NATS connection and streams, the admin and
//! Invoke API listeners, logging, the dispatcher's and workers' process-wide
//! settings) is refused by name, and the running state is left as it was. Every
//! apply that changes something is a new revision, shown by `/v1/functions`,
//! `/v1/triggers` and `/v1/sources`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use serde::Serialize;
use sha2::Digest as _;
use switchyard_bus::Bus;
use switchyard_connector_http::HttpSourceMetrics;
use switchyard_dispatcher::{
    AdaptiveLimit, Destinations, Dispatcher, DispatcherMetrics, FunctionRuntime, RunningDispatcher,
    TriggerConfig,
};
use switchyard_event::{EventSink, Source, Target};
use switchyard_targets::{HttpTarget, LogTarget};
use switchyard_workers::{ManagedFunction, Workers};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::calls::{CallKind, SyncFunction};
use crate::config::{self, Config, FunctionConfig, SourceConfig};
use crate::sources::{SourceCell, SourceMetrics};
use crate::{admin, invoke_api, routes};

/// Which state a process runs: a number that grows with every change applied, and
/// the SHA-256 of the configuration file's values it came from.
#[derive(Debug, Clone, Serialize)]
pub struct Revision {
    pub number: u64,
    pub config_sha256: String,
    /// RFC 3339.
    pub applied_at: String,
}

/// What a reload did.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadOutcome {
    /// `applied`, `unchanged`, `refused` (nothing changed) or `failed` (part of it
    /// applied: `changes` says what, `errors` what not).
    pub result: &'static str,
    pub revision: Revision,
    pub changes: Vec<String>,
    pub errors: Vec<String>,
}

/// What the control-plane API and the reconciler share about functions defined
/// through the API.
pub struct ApiFunctions {
    pub registry: crate::registry::Registry,
    /// The bucket revision of each API function this process runs now.
    pub applied: RwLock<HashMap<String, u64>>,
    /// API functions this process could not run, with the revision and why.
    pub failed: RwLock<HashMap<String, (u64, String)>>,
    /// Functions the file defines (the API may not change them), and the file.
    pub file_functions: RwLock<HashMap<String, String>>,
    /// The runtime ids API functions can use.
    pub runtimes: RwLock<std::collections::BTreeMap<String, config::RuntimeConfig>>,
    /// The file's `lambda` functions, for ListFunctions: name, handler, memory,
    /// timeout in seconds.
    pub file_lambdas: RwLock<Vec<(String, String, u32, u64)>>,
    /// The aliases of the API functions this process runs: function, alias, and
    /// the version it routes to (`$LATEST` or a number).
    pub aliases: RwLock<HashMap<String, std::collections::BTreeMap<String, String>>>,
    /// The function URLs of the API functions this process runs, by function.
    pub urls: RwLock<HashMap<String, crate::registry::UrlConfigRecord>>,
}

impl ApiFunctions {
    /// What a qualified call (`Qualifier`, or `name:qualifier`) reaches here: the
    /// function as the reconciler names it (`name`, or `name:N` for version N) and
    /// the version it runs; `None` for an unknown alias.
    pub fn resolve(&self, name: &str, qualifier: Option<&str>) -> Option<(String, String)> {
        match qualifier {
            None | Some("$LATEST") => Some((name.to_owned(), "$LATEST".to_owned())),
            Some(number)
                if !number.is_empty() && number.bytes().all(|byte| byte.is_ascii_digit()) =>
            {
                Some((format!("{name}:{number}"), number.to_owned()))
            }
            Some(alias) => {
                let version = self
                    .aliases
                    .read()
                    .expect("api lock")
                    .get(name)?
                    .get(alias)?
                    .clone();
                if version == alias {
                    return None;
                }
                self.resolve(name, Some(&version))
            }
        }
    }
}

impl ApiFunctions {
    pub fn new(registry: crate::registry::Registry) -> Arc<ApiFunctions> {
        Arc::new(ApiFunctions {
            registry,
            applied: RwLock::default(),
            failed: RwLock::default(),
            file_functions: RwLock::default(),
            runtimes: RwLock::default(),
            file_lambdas: RwLock::default(),
            aliases: RwLock::default(),
            urls: RwLock::default(),
        })
    }

    /// What the file defines, for the API's answers.
    fn learn_file(&self, file: &Config) {
        let name = file
            .file
            .as_ref()
            .map(|path| path.display().to_string())
            .unwrap_or_else(|| "the configuration".to_owned());
        *self.file_functions.write().expect("api lock") = file
            .functions
            .iter()
            .map(|function| (function.get_ref().name().to_owned(), name.clone()))
            .collect();
        *self.file_lambdas.write().expect("api lock") = file
            .functions
            .iter()
            .filter_map(|function| match function.get_ref() {
                FunctionConfig::Lambda(lambda) => Some((
                    lambda.name.clone(),
                    lambda.handler.clone(),
                    lambda.memory,
                    lambda.timeout.as_secs(),
                )),
                _ => None,
            })
            .collect();
        *self.runtimes.write().expect("api lock") = file.all_runtimes();
    }
}

/// A change of the API's definitions: a function's record and revision, or its
/// removal.
pub(crate) struct ApiChange {
    pub(crate) name: String,
    pub(crate) record: Option<(crate::registry::FunctionRecord, u64)>,
}

/// Everything a reload needs that lives as long as the process.
pub(crate) struct Handles {
    pub(crate) bus: Bus,
    pub(crate) workers: Arc<OnceLock<Arc<Workers>>>,
    pub(crate) workers_settings: switchyard_workers::WorkersSettings,
    pub(crate) worker_metrics: switchyard_workers::WorkerMetrics,
    pub(crate) dispatcher_metrics: DispatcherMetrics,
    pub(crate) source_metrics: HttpSourceMetrics,
    #[cfg(feature = "kafka")]
    pub(crate) kafka_metrics: switchyard_connector_kafka::KafkaSourceMetrics,
    #[cfg(feature = "s3")]
    pub(crate) poll_metrics: switchyard_connector_s3::poll::PollMetrics,
    pub(crate) supervisor_metrics: SourceMetrics,
    pub(crate) route_metrics: routes::RouteMetrics,
    pub(crate) admin_state: admin::AdminState,
    pub(crate) invoke_api_state: invoke_api::InvokeApiState,
    pub(crate) revision: Arc<RwLock<Revision>>,
    /// The sources only their own door may produce, as the running configuration
    /// says: the queue sources dead-letter events claiming another's.
    pub(crate) reserved: switchyard_bus::ingest::SharedReserved,
}

/// A function as it runs.
struct LiveFunction {
    fingerprint: String,
    runtime: Arc<FunctionRuntime>,
    /// How synchronous calls reach it (not `log` functions).
    call: Option<Arc<SyncFunction>>,
    managed: Option<ManagedFunction>,
}

/// A supervised source as it runs.
struct LiveSource {
    fingerprint: String,
    stop: CancellationToken,
    task: JoinHandle<()>,
    cell: Arc<SourceCell>,
    http: Option<LiveListener>,
}

/// An HTTP source's socket and the router its requests go to.
struct LiveListener {
    /// `listen`, `tls` and `limits`: a change there needs a new server.
    fingerprint: String,
    /// A copy of the bound socket, so a new server can take it over from the old.
    socket: std::net::TcpListener,
    address: SocketAddr,
    router: Arc<RwLock<Router>>,
}

/// An HTTP source's listener made ready for this apply.
struct PreparedListener {
    socket: std::net::TcpListener,
    address: SocketAddr,
    /// Cancelled once the source answers (stops the `503 not ready` server).
    interim: CancellationToken,
    /// Reused from the running source with the same settings: only routes change.
    same_server: bool,
}

/// The running state of one process.
pub(crate) struct Live {
    handles: Handles,
    /// The file as last loaded.
    file: Config,
    /// Functions defined through the API, by name, with their bucket revision.
    api_records: std::collections::BTreeMap<String, (crate::registry::FunctionRecord, u64)>,
    api: Option<Arc<ApiFunctions>>,
    /// The file and the API's functions, as applied.
    config: Config,
    dispatcher: RunningDispatcher,
    functions: HashMap<String, LiveFunction>,
    /// Running triggers and their fingerprints.
    triggers: HashMap<String, String>,
    /// In the configuration's order.
    sources: Vec<(String, LiveSource)>,
    /// Parent of every source's own stop token.
    source_shutdown: CancellationToken,
    /// Replaced or removed functions something may still call because part of an
    /// apply failed (a trigger kept its old form, or a listener its old routes):
    /// retired at the next apply without errors.
    lingering: Vec<LiveFunction>,
    /// Whether the last reload of the file applied without errors (a reload of the
    /// same file after a failed one tries again).
    clean: bool,
}

/// How long unpacked code no definition names is kept on disk.
const UNPACKED_CODE_GRACE: std::time::Duration = std::time::Duration::from_secs(600);

/// Tables whose change needs a restart, and what to do instead.
const FIXED_TABLES: [(&str, &str); 7] = [
    ("nats", "the NATS connection and streams"),
    ("admin", "the admin listener"),
    ("invoke_api", "the Invoke API listener"),
    ("log", "logging"),
    ("telemetry", "exporting traces"),
    ("dispatcher", "the process-wide dispatch limits"),
    ("workers", "the process-wide worker settings"),
];

/// An event source mapping as a `[[sources]]` table (`type = "kafka"`, named
/// `esm-<uuid>`, its consumer group the mapping's) and a `[[triggers]]` table
/// handing its records to the function in batches, as Lambda's `SelfManagedKafka`
/// event, from the first event the source stored.
fn mapping_tables(
    function: &str,
    uuid: &str,
    mapping: &crate::registry::MappingRecord,
) -> (toml::Table, toml::Table) {
    let name = format!("esm-{uuid}");
    let mut source = toml::Table::new();
    source.insert("type".into(), "kafka".into());
    source.insert("name".into(), name.clone().into());
    source.insert("brokers".into(), mapping.bootstrap_servers.join(",").into());
    source.insert(
        "topics".into(),
        toml::Value::Array(vec![mapping.topic.clone().into()]),
    );
    source.insert("group_id".into(), mapping.consumer_group_id.clone().into());
    let start = if mapping.starting_position == "TRIM_HORIZON" {
        "earliest"
    } else {
        "latest"
    };
    source.insert("start".into(), start.into());
    let window_ms = match mapping.maximum_batching_window_in_seconds {
        None => 500,
        Some(0) => 10,
        Some(seconds) => u64::from(seconds) * 1000,
    };
    let mut trigger = toml::Table::new();
    trigger.insert("name".into(), name.clone().into());
    trigger.insert("function".into(), function.into());
    let mut exact = toml::Table::new();
    exact.insert(
        "exact".into(),
        format!("kafka://{name}/{}", mapping.topic).into(),
    );
    let mut filter = toml::Table::new();
    filter.insert("source".into(), toml::Value::Table(exact));
    trigger.insert("filter".into(), toml::Value::Table(filter));
    trigger.insert("start".into(), "all".into());
    trigger.insert("payload".into(), "aws".into());
    let mut batch = toml::Table::new();
    batch.insert("max_events".into(), i64::from(mapping.batch_size).into());
    batch.insert("window".into(), format!("{window_ms}ms").into());
    trigger.insert("batch".into(), toml::Value::Table(batch));
    (source, trigger)
}

fn fingerprint_of(value: Option<&toml::Value>) -> String {
    value.map(|value| value.to_string()).unwrap_or_default()
}

/// The `index`th entry of an array of tables (`functions`, `triggers`, `sources`).
fn entry<'a>(document: &'a toml::Table, array: &str, index: usize) -> Option<&'a toml::Value> {
    document.get(array)?.as_array()?.get(index)
}

fn store_fingerprint(document: &toml::Table, store: &str) -> String {
    fingerprint_of(
        document
            .get("stores")
            .and_then(|stores| stores.as_table())
            .and_then(|stores| stores.get(store)),
    )
}

/// The SHA-256 of a configuration's values (comments and layout aside).
pub(crate) fn config_sha256(config: &Config) -> String {
    hex::encode(sha2::Sha256::digest(
        toml::Value::Table(config.document.clone())
            .to_string()
            .as_bytes(),
    ))
}

/// Which tables of the process-wide settings differ, each with what it governs.
fn fixed_changes(old: &Config, new: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    for (table, what) in FIXED_TABLES {
        let mut before = old.document.get(table).cloned();
        let mut after = new.document.get(table).cloned();
        // Watching the file can be turned on and off live.
        for value in [&mut before, &mut after].into_iter().flatten() {
            if let Some(table) = value.as_table_mut() {
                table.remove("watch_config");
            }
        }
        if before != after {
            problems.push(format!(
                "`[{table}]` changed, but {what} cannot change while switchyard runs: restart the process (in a cluster, one process at a time) to apply it; nothing else was changed"
            ));
        }
    }
    problems
}

/// The fingerprints of the triggers a configuration runs, with what they depend on
/// (their function's definition, their enrichment's store).
fn trigger_fingerprints(config: &Config) -> Vec<(TriggerConfig, String)> {
    let function_fingerprint = |name: &str| {
        config
            .functions
            .iter()
            .position(|function| function.get_ref().name() == name)
            .map(|index| fingerprint_of(entry(&config.document, "functions", index)))
            .unwrap_or_default()
    };
    let written = config.triggers.len();
    config
        .all_triggers()
        .into_iter()
        .enumerate()
        .map(|(index, trigger)| {
            let own = if index < written {
                fingerprint_of(entry(&config.document, "triggers", index))
            } else {
                // A `lambda` function's `invoke-<name>` trigger: its function's.
                "invoke".to_owned()
            };
            let store = trigger
                .enrich
                .as_ref()
                .map(|enrich| store_fingerprint(&config.document, &enrich.store))
                .unwrap_or_default();
            let fingerprint = format!(
                "{own}|function={}|store={store}",
                function_fingerprint(&trigger.function)
            );
            (trigger, fingerprint)
        })
        .collect()
}

/// Whether any trigger hands events to a handler as AWS shapes them (sources then
/// keep what those shapes need).
fn any_aws_payload(config: &Config) -> bool {
    config
        .triggers
        .iter()
        .any(|trigger| trigger.get_ref().payload == switchyard_dispatcher::PayloadFormat::Aws)
}

fn source_fingerprint(config: &Config, index: usize) -> String {
    let own = fingerprint_of(entry(&config.document, "sources", index));
    match config.sources[index].get_ref() {
        #[cfg(feature = "kafka")]
        SourceConfig::Kafka(_) => format!("{own}|keep_records={}", any_aws_payload(config)),
        #[cfg(feature = "sqs")]
        SourceConfig::Sqs(_) => format!("{own}|keep_records={}", any_aws_payload(config)),
        #[cfg(feature = "amqp")]
        SourceConfig::Amqp(_) => format!("{own}|keep_records={}", any_aws_payload(config)),
        #[cfg(feature = "s3")]
        SourceConfig::S3(poll) => {
            format!(
                "{own}|store={}",
                store_fingerprint(&config.document, &poll.store)
            )
        }
        _ => own,
    }
}

fn listener_fingerprint(http: &switchyard_connector_http::HttpSourceConfig) -> String {
    format!("{}|{:?}|{:?}", http.listen, http.tls, http.limits)
}

/// A router whose routes can be replaced while it serves: each request goes to the
/// router current when it arrives, so connections stay open across a swap.
fn swappable(current: Arc<RwLock<Router>>) -> Router {
    use tower::ServiceExt as _;
    Router::new().fallback_service(tower::service_fn(move |request: axum::extract::Request| {
        let router = current.read().expect("router lock").clone();
        async move { router.oneshot(request).await }
    }))
}

impl Live {
    /// Applies the first configuration: every function, trigger and source.
    /// `listeners` are the HTTP sources' sockets, bound before the bus was set up.
    pub(crate) async fn start(
        handles: Handles,
        config: Config,
        listeners: HashMap<String, (std::net::TcpListener, CancellationToken)>,
        api: Option<Arc<ApiFunctions>>,
    ) -> anyhow::Result<Live> {
        let mut api_records = std::collections::BTreeMap::new();
        if let Some(api) = &api {
            api.learn_file(&config);
            for (record, revision) in api
                .registry
                .list()
                .await
                .context("listing the functions defined through the lambda api")?
            {
                api_records.insert(record.function_name.clone(), (record, revision));
            }
        }
        let dispatcher = Dispatcher::empty(
            handles.bus.clone(),
            config.dispatcher.clone(),
            handles.dispatcher_metrics.clone(),
        )
        .await
        .context("starting the dispatcher")?
        .start();
        handles
            .admin_state
            .set_dispatcher(dispatcher.view(), handles.bus.clone());
        let mut live = Live {
            handles,
            file: config.clone(),
            api_records,
            api,
            config: Config::default(),
            dispatcher,
            functions: HashMap::new(),
            triggers: HashMap::new(),
            sources: Vec::new(),
            source_shutdown: CancellationToken::new(),
            lingering: Vec::new(),
            clean: true,
        };
        let mut prepared = HashMap::new();
        for (name, (socket, interim)) in listeners {
            let address = socket.local_addr()?;
            prepared.insert(
                name,
                PreparedListener {
                    socket,
                    address,
                    interim,
                    same_server: false,
                },
            );
        }
        let desired = live.desired(&config).await;
        let (_, errors) = live.apply(desired, prepared).await;
        live.note_applied();
        if let Some(error) = errors.into_iter().next() {
            anyhow::bail!("{error}");
        }
        live.dispatcher.check_orphans().await;
        Ok(live)
    }

    /// Re-reads the file the running configuration came from and applies it.
    pub(crate) async fn reload(&mut self) -> ReloadOutcome {
        let refused = |revision: Revision, errors: Vec<String>| ReloadOutcome {
            result: "refused",
            revision,
            changes: Vec::new(),
            errors,
        };
        let current = self.handles.revision.read().expect("revision lock").clone();
        let Some(file) = self.config.file.clone() else {
            return refused(
                current,
                vec!["this process was not started from a file".to_owned()],
            );
        };
        let new = match config::load(&file) {
            Ok(new) => new,
            Err(errors) => {
                return refused(
                    current,
                    errors.0.iter().map(|error| error.to_string()).collect(),
                );
            }
        };
        let problems = fixed_changes(&self.file, &new);
        if !problems.is_empty() {
            return refused(current, problems);
        }
        if self.clean && config_sha256(&new) == config_sha256(&self.file) {
            return ReloadOutcome {
                result: "unchanged",
                revision: current,
                changes: Vec::new(),
                errors: Vec::new(),
            };
        }
        // Listeners first: a port that cannot be bound changes nothing.
        let prepared = match self.prepare_listeners(&new).await {
            Ok(prepared) => prepared,
            Err(error) => return refused(current, vec![format!("{error:#}")]),
        };
        if let Some(api) = &self.api {
            api.learn_file(&new);
        }
        self.file = new.clone();
        let desired = self.desired(&new).await;
        let (changes, errors) = self.apply(desired, prepared).await;
        self.clean = errors.is_empty();
        self.note_applied();
        self.dispatcher.check_orphans().await;
        ReloadOutcome {
            result: if errors.is_empty() {
                "applied"
            } else {
                "failed"
            },
            revision: self.handles.revision.read().expect("revision lock").clone(),
            changes,
            errors,
        }
    }

    /// Applies a change of the API's definitions (from this process or another).
    pub(crate) async fn apply_api(&mut self, change: ApiChange) {
        match change.record {
            Some(found) => {
                if self.api_records.get(&change.name) == Some(&found) {
                    return;
                }
                self.api_records.insert(change.name.clone(), found);
            }
            None => {
                if self.api_records.remove(&change.name).is_none() {
                    return;
                }
            }
        }
        let file = self.file.clone();
        let prepared = match self.prepare_listeners(&file).await {
            Ok(prepared) => prepared,
            Err(error) => {
                tracing::error!(error = %format!("{error:#}"), "applying a lambda api change failed");
                // A removed URL or alias, or a URL's new AuthType, holds at once.
                self.note_applied();
                return;
            }
        };
        let desired = self.desired(&file).await;
        let (changes, errors) = self.apply(desired, prepared).await;
        self.note_applied();
        if errors.is_empty() {
            tracing::info!(function = %change.name, ?changes, "lambda api change applied");
        } else {
            tracing::error!(function = %change.name, ?changes, ?errors, "lambda api change applied in part");
        }
        if let Some(api) = &self.api {
            let _ = api.registry.remove_unused_code().await;
        }
        self.remove_unused_code();
    }

    /// Records which API revisions run now (what GetFunction's state tells).
    fn note_applied(&self) {
        let Some(api) = &self.api else {
            return;
        };
        // The file's functions are the file's: an API record of the same name
        // (stored before the file named it, or by a process whose file does not)
        // gives them no alias, URL or state.
        let file_names: std::collections::HashSet<String> = self
            .file
            .functions
            .iter()
            .map(|function| function.get_ref().name().to_owned())
            .collect();
        let api_records = || {
            self.api_records
                .iter()
                .filter(|(name, _)| !file_names.contains(name.as_str()))
        };
        *api.aliases.write().expect("api lock") = api_records()
            .map(|(name, (record, _))| {
                (
                    name.clone(),
                    record
                        .aliases
                        .iter()
                        .map(|(alias, target)| (alias.clone(), target.function_version.clone()))
                        .collect(),
                )
            })
            .collect();
        *api.urls.write().expect("api lock") = api_records()
            .filter(|(name, _)| self.functions.contains_key(name.as_str()))
            .filter_map(|(name, (record, _))| Some((name.clone(), record.url_config.clone()?)))
            .collect();
        // A function whose latest revision failed here keeps running the revision
        // it ran before (if any): that one stays the applied one.
        let failed = api.failed.read().expect("api lock").clone();
        let previous = api.applied.read().expect("api lock").clone();
        *api.applied.write().expect("api lock") = api_records()
            .filter(|(name, _)| self.functions.contains_key(name.as_str()))
            .filter_map(|(name, (_, revision))| match failed.get(name.as_str()) {
                Some((failed_revision, _)) if failed_revision == revision => {
                    previous.get(name).map(|applied| (name.clone(), *applied))
                }
                _ => Some((name.clone(), *revision)),
            })
            .collect();
    }

    fn code_root(&self) -> std::path::PathBuf {
        self.file.workers.data_directory().join("code")
    }

    /// The unpacked code of `record`, fetched from the code store on first need.
    async fn code_directory(
        &self,
        api: &ApiFunctions,
        record: &crate::registry::VersionRecord,
    ) -> anyhow::Result<std::path::PathBuf> {
        let directory = self.code_root().join(&record.code_key);
        if directory.is_dir() {
            return Ok(directory);
        }
        let zip = api
            .registry
            .code(&record.code_key)
            .await
            .with_context(|| format!("fetching the code {}", record.code_sha256))?;
        let target = directory.clone();
        tokio::task::spawn_blocking(move || {
            if target.is_dir() {
                return Ok(());
            }
            match crate::code::unpack(&zip, &target) {
                // Another process sharing the directory unpacked it first.
                Err(_) if target.is_dir() => Ok(()),
                done => done,
            }
        })
        .await
        .context("unpacking the code")?
        .with_context(|| format!("unpacking the code into {}", directory.display()))?;
        Ok(directory)
    }

    /// Removes unpacked code no function of this process uses any more (a replaced
    /// function's old instances keep theirs until they stopped).
    fn remove_unused_code(&self) {
        let root = self.code_root();
        let Ok(entries) = std::fs::read_dir(&root) else {
            return;
        };
        let in_use: std::collections::HashSet<std::path::PathBuf> = self
            .handles
            .workers
            .get()
            .map(|workers| workers.directories_in_use())
            .unwrap_or_default()
            .into_iter()
            .collect();
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            // Staging directories of an unpack in progress start with `.`.
            if name.starts_with('.') {
                continue;
            }
            if in_use.contains(&path)
                || self
                    .api_records
                    .values()
                    .any(|(record, _)| record.code_keys().any(|key| key == name))
            {
                // Still needed: its time says so to every process sharing the
                // directory (the grace below counts from the last time it was).
                if let Ok(directory) = std::fs::File::open(&path) {
                    let _ = directory.set_modified(std::time::SystemTime::now());
                }
                continue;
            }
            // Another process sharing the directory may still run from it for a
            // while (instances finishing, a previous form kept): unpacked code is
            // removed once it has gone unnamed for a while.
            let recent = entry
                .metadata()
                .and_then(|metadata| metadata.modified())
                .ok()
                .and_then(|modified| modified.elapsed().ok())
                .is_none_or(|age| age < UNPACKED_CODE_GRACE);
            if recent {
                continue;
            }
            let _ = std::fs::remove_dir_all(&path);
        }
    }

    /// The desired state: the file's functions, then the API's (a name the file
    /// defines is the file's).
    async fn desired(&self, file: &Config) -> Config {
        let mut desired = file.clone();
        let Some(api) = self.api.clone() else {
            return desired;
        };
        let runtimes = file.all_runtimes();
        let file_names: std::collections::HashSet<String> = file
            .functions
            .iter()
            .map(|function| function.get_ref().name().to_owned())
            .collect();
        let mut failed = HashMap::new();
        let mut tables = Vec::new();
        for (name, (record, revision)) in &self.api_records {
            if file_names.contains(name) {
                tracing::warn!(function = %name, "a function defined through the lambda api has the name of one in the configuration file: the file's is used");
                continue;
            }
            // `$LATEST` as `name`, each published version as `name:N`.
            let mut variants = vec![(name.clone(), record.latest())];
            variants.extend(
                record
                    .versions
                    .iter()
                    .map(|(number, version)| (format!("{name}:{number}"), version.clone())),
            );
            for (variant, settings) in variants {
                let table = match self
                    .api_function_table(
                        &api,
                        &variant,
                        &settings,
                        record.reserved_concurrency,
                        &runtimes,
                    )
                    .await
                {
                    Ok(table) => table,
                    Err(error) => {
                        let reason = format!("{error:#}");
                        failed.insert(name.clone(), (*revision, reason.clone()));
                        // What runs now goes on running (Lambda keeps the last
                        // good code when an update fails).
                        if let Some((function, table)) = self.running_function(&variant) {
                            tracing::error!(function = %variant, %reason, "a change of a function defined through the lambda api cannot run here; its previous form goes on running");
                            desired.functions.push(function);
                            tables.push(table);
                        } else {
                            tracing::error!(function = %variant, %reason, "a function defined through the lambda api cannot run here");
                        }
                        continue;
                    }
                };
                match toml::Value::Table(table.clone()).try_into::<FunctionConfig>() {
                    Ok(function) => {
                        desired.functions.push(toml::Spanned::new(0..0, function));
                        tables.push(toml::Value::Table(table));
                    }
                    Err(error) => {
                        failed.insert(name.clone(), (*revision, error.to_string()));
                    }
                }
            }
        }
        // Event source mappings: a Kafka source and a trigger each, for functions
        // that run.
        let mut source_tables = Vec::new();
        let mut trigger_tables = Vec::new();
        let running: std::collections::HashSet<String> = desired
            .functions
            .iter()
            .map(|function| function.get_ref().name().to_owned())
            .collect();
        for (name, (record, _)) in &self.api_records {
            if file_names.contains(name) || !running.contains(name) {
                continue;
            }
            for (uuid, mapping) in &record.event_source_mappings {
                if !mapping.enabled {
                    continue;
                }
                let (source, trigger) = mapping_tables(name, uuid, mapping);
                let parsed = toml::Value::Table(source.clone())
                    .try_into::<SourceConfig>()
                    .map_err(|error| error.to_string())
                    .and_then(|source| {
                        toml::Value::Table(trigger.clone())
                            .try_into::<TriggerConfig>()
                            .map(|trigger| (source, trigger))
                            .map_err(|error| error.to_string())
                    });
                match parsed {
                    Ok((mut source_config, trigger_config)) => {
                        #[cfg(feature = "kafka")]
                        if let SourceConfig::Kafka(kafka) = &mut source_config {
                            kafka.plain = true;
                        }
                        desired
                            .sources
                            .push(toml::Spanned::new(0..0, source_config));
                        desired
                            .triggers
                            .push(toml::Spanned::new(0..0, trigger_config));
                        source_tables.push(toml::Value::Table(source));
                        trigger_tables.push(toml::Value::Table(trigger));
                    }
                    Err(error) => {
                        tracing::error!(function = %name, mapping = %uuid, %error, "an event source mapping cannot run here");
                    }
                }
            }
        }
        for (array, entries) in [("sources", source_tables), ("triggers", trigger_tables)] {
            if entries.is_empty() {
                continue;
            }
            let list = desired
                .document
                .entry(array)
                .or_insert_with(|| toml::Value::Array(Vec::new()));
            if let Some(list) = list.as_array_mut() {
                list.extend(entries);
            }
        }
        *api.failed.write().expect("api lock") = failed;
        if !tables.is_empty() {
            // Entries are compared by position: the file's first, then these.
            let functions = desired
                .document
                .entry("functions")
                .or_insert_with(|| toml::Value::Array(Vec::new()));
            if let Some(array) = functions.as_array_mut() {
                array.extend(tables);
            }
        }
        desired
    }

    /// The function `name` as the running configuration has it, with its table.
    fn running_function(&self, name: &str) -> Option<(toml::Spanned<FunctionConfig>, toml::Value)> {
        let index = self
            .config
            .functions
            .iter()
            .position(|function| function.get_ref().name() == name)?;
        let table = entry(&self.config.document, "functions", index)?.clone();
        Some((self.config.functions[index].clone(), table))
    }

    /// An API function as a `[[functions]]` table of `type = "lambda"`.
    async fn api_function_table(
        &self,
        api: &ApiFunctions,
        name: &str,
        record: &crate::registry::VersionRecord,
        reserved_concurrency: Option<u32>,
        runtimes: &std::collections::BTreeMap<String, config::RuntimeConfig>,
    ) -> anyhow::Result<toml::Table> {
        let runtime = runtimes.get(&record.runtime).with_context(|| {
            format!(
                "runtime `{}` is not in [runtimes] (known: {})",
                record.runtime,
                runtimes.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })?;
        let directory = self.code_directory(api, record).await?;
        let command: Vec<toml::Value> = runtime
            .command
            .iter()
            .map(|part| toml::Value::String(part.replace("{handler}", &record.handler)))
            .collect();
        let mut table = toml::Table::new();
        table.insert("type".into(), "lambda".into());
        table.insert("name".into(), name.into());
        if let Some(reserved) = reserved_concurrency {
            table.insert("max_concurrency".into(), i64::from(reserved).into());
        }
        table.insert("command".into(), toml::Value::Array(command));
        table.insert("handler".into(), record.handler.clone().into());
        table.insert("directory".into(), directory.display().to_string().into());
        table.insert("memory".into(), i64::from(record.memory_size).into());
        table.insert("timeout".into(), format!("{}s", record.timeout).into());
        table.insert(
            "environment".into(),
            toml::Value::Table(
                record
                    .environment
                    .iter()
                    .map(|(name, value)| (name.clone(), toml::Value::String(value.clone())))
                    .collect(),
            ),
        );
        Ok(table)
    }

    /// Binds what the new configuration's HTTP sources need: the running socket when
    /// its address stays, a new one otherwise.
    async fn prepare_listeners(
        &self,
        new: &Config,
    ) -> anyhow::Result<HashMap<String, PreparedListener>> {
        let mut prepared = HashMap::new();
        for source in &new.sources {
            let SourceConfig::Http(http) = source.get_ref() else {
                continue;
            };
            let running = self
                .sources
                .iter()
                .find(|(name, _)| *name == http.name)
                .and_then(|(_, source)| source.http.as_ref());
            let listener = match running {
                Some(running) if running.fingerprint == listener_fingerprint(http) => {
                    PreparedListener {
                        socket: running.socket.try_clone()?,
                        address: running.address,
                        interim: CancellationToken::new(),
                        same_server: true,
                    }
                }
                // Same address, other TLS or limits: a new server on the same socket.
                Some(running)
                    if running.fingerprint.split('|').next() == Some(http.listen.as_str()) =>
                {
                    PreparedListener {
                        socket: running.socket.try_clone()?,
                        address: running.address,
                        interim: CancellationToken::new(),
                        same_server: false,
                    }
                }
                _ => {
                    let socket = tokio::net::TcpListener::bind(&http.listen)
                        .await
                        .with_context(|| {
                            format!("source `{}`: cannot listen on `{}`", http.name, http.listen)
                        })?;
                    let address = socket.local_addr()?;
                    PreparedListener {
                        socket: socket.into_std()?,
                        address,
                        interim: CancellationToken::new(),
                        same_server: false,
                    }
                }
            };
            prepared.insert(http.name.clone(), listener);
        }
        Ok(prepared)
    }

    fn workers(&self) -> Arc<Workers> {
        self.handles
            .workers
            .get_or_init(|| {
                let workers = Workers::new(
                    self.handles.workers_settings.clone(),
                    self.handles.worker_metrics.clone(),
                );
                workers.set_log_sink(crate::function_logs::StreamedLogs::start(
                    self.handles.bus.clone(),
                    self.handles.worker_metrics.clone(),
                ));
                Arc::new(workers)
            })
            .clone()
    }

    /// Builds a function (not yet reachable by anything).
    fn build_function(
        &self,
        function: &FunctionConfig,
        fingerprint: String,
        client: &reqwest::Client,
    ) -> anyhow::Result<LiveFunction> {
        let limit = AdaptiveLimit::new(function.max_concurrency());
        let (target, timeout, call, managed): (
            Arc<dyn Target>,
            Duration,
            Option<CallKind>,
            Option<ManagedFunction>,
        ) = match function {
            FunctionConfig::Http(http) => {
                let url = reqwest::Url::parse(&http.url)
                    .with_context(|| format!("function `{}`: bad url", http.name))?;
                // https:// functions get a client of their own (their CA, their
                // client certificate); http:// ones share one without TLS.
                let client = if url.scheme() == "https" {
                    http.tls
                        .clone()
                        .unwrap_or_default()
                        .client()
                        .map_err(|problem| {
                            anyhow::anyhow!("function `{}`: tls: {problem}", http.name)
                        })?
                } else {
                    client.clone()
                };
                let target = Arc::new(
                    HttpTarget::new(http.name.clone(), url, client).with_auth(http.auth.clone()),
                );
                (
                    target.clone(),
                    http.timeout,
                    Some(CallKind::Http(target)),
                    None,
                )
            }
            FunctionConfig::Log(log) => (
                Arc::new(LogTarget::new(log.name.clone())),
                Duration::from_secs(5),
                None,
                None,
            ),
            FunctionConfig::Lambda(lambda) => {
                let managed = self.workers().add(crate::lambda_spec(lambda));
                (
                    Arc::new(managed.clone()),
                    lambda.timeout,
                    Some(CallKind::Lambda(managed.clone())),
                    Some(managed),
                )
            }
            FunctionConfig::Process(process) => {
                let managed = self.workers().add(crate::process_spec(process));
                (
                    Arc::new(managed.clone()),
                    process.timeout,
                    Some(CallKind::Process(managed.clone())),
                    Some(managed),
                )
            }
        };
        let runtime = Arc::new(FunctionRuntime {
            name: function.name().to_owned(),
            target,
            timeout,
            limit: limit.clone(),
            cluster_slots: (function.concurrency_scope() == config::ConcurrencyScope::Cluster)
                .then_some(function.max_concurrency()),
        });
        let call = call.map(|kind| {
            Arc::new(SyncFunction {
                name: function.name().to_owned(),
                kind,
                limit,
                slots: None,
                timeout,
            })
        });
        Ok(LiveFunction {
            fingerprint,
            runtime,
            call,
            managed,
        })
    }

    /// A trigger's destinations, enricher and AWS-shaped target.
    async fn destinations(
        &self,
        config: &Config,
        trigger: &TriggerConfig,
    ) -> anyhow::Result<Destinations> {
        let bus = &self.handles.bus;
        let build = |destination: &Option<switchyard_dispatcher::DestinationConfig>| {
            destination
                .as_ref()
                .map(|destination| crate::build_destination(bus, destination))
                .transpose()
        };
        let enricher = match &trigger.enrich {
            None => None,
            Some(enrich) => Some(
                crate::build_enricher(config, enrich)
                    .await
                    .with_context(|| format!("trigger `{}`: enrich", trigger.name))?,
            ),
        };
        // `payload = "aws"` (validated to name a `lambda` function).
        let target = match (
            trigger.payload,
            self.functions
                .get(&trigger.function)
                .and_then(|function| function.managed.as_ref()),
        ) {
            (switchyard_dispatcher::PayloadFormat::Aws, Some(managed)) if managed.is_lambda() => {
                Some(Arc::new(managed.aws_payloads()) as Arc<dyn Target>)
            }
            _ => None,
        };
        Ok(Destinations {
            target,
            enricher,
            on_success: build(&trigger.on_success)
                .with_context(|| format!("trigger `{}`: on_success", trigger.name))?,
            on_failure: build(&trigger.on_failure)
                .with_context(|| format!("trigger `{}`: on_failure", trigger.name))?,
        })
    }

    /// Applies `new` with `prepared` listeners for its HTTP sources: what changed,
    /// and what could not be applied.
    async fn apply(
        &mut self,
        new: Config,
        mut prepared: HashMap<String, PreparedListener>,
    ) -> (Vec<String>, Vec<String>) {
        let mut changes = Vec::new();
        let mut errors = Vec::new();
        let client = switchyard_targets::http_client();

        // Functions: build the new and changed ones before anything points at them.
        let mut built = HashMap::new();
        for (index, function) in new.functions.iter().enumerate() {
            let function = function.get_ref();
            let fingerprint = fingerprint_of(entry(&new.document, "functions", index));
            if self
                .functions
                .get(function.name())
                .is_some_and(|running| running.fingerprint == fingerprint)
            {
                continue;
            }
            match self.build_function(function, fingerprint, &client) {
                Ok(live) => {
                    built.insert(function.name().to_owned(), live);
                }
                Err(error) => errors.push(format!("{error:#}")),
            }
        }
        if !errors.is_empty() {
            // Nothing points at them yet: stop what was started.
            for (_, function) in built {
                self.retire(function);
            }
            return (changes, errors);
        }
        let mut retiring = Vec::new();
        for (name, mut function) in built {
            if let Some(call) = &mut function.call {
                match self.dispatcher.function_slots(&function.runtime).await {
                    Ok(slots) => {
                        Arc::get_mut(call).expect("not shared yet").slots = slots;
                    }
                    Err(error) => errors.push(format!("function `{name}`: {error}")),
                }
            }
            let verb = if self.functions.contains_key(&name) {
                "changed"
            } else {
                "added"
            };
            changes.push(format!("function `{name}` {verb}"));
            if let Some(old) = self.functions.insert(name, function) {
                retiring.push(old);
            }
        }
        let kept: std::collections::HashSet<&str> = new
            .functions
            .iter()
            .map(|function| function.get_ref().name())
            .collect();
        let removed: Vec<String> = self
            .functions
            .keys()
            .filter(|name| !kept.contains(name.as_str()))
            .cloned()
            .collect();

        // Synchronous calls of functions that ran before reach their new form at
        // once (their `invoke-<name>` consumers exist already); new functions become
        // callable once their triggers' consumers exist, below.
        let existed: std::collections::HashSet<&str> = self
            .config
            .functions
            .iter()
            .map(|function| function.get_ref().name())
            .collect();
        let early: HashMap<String, Arc<SyncFunction>> = self
            .functions
            .iter()
            .filter(|(name, _)| existed.contains(name.as_str()))
            .filter_map(|(name, function)| Some((name.clone(), function.call.clone()?)))
            .collect();
        self.handles
            .invoke_api_state
            .set_functions(&early, self.handles.bus.clone());

        // Triggers: removed ones stop pulling first, then new and changed ones start
        // (each stop waits for its pull in flight to end: they stop together).
        let desired = trigger_fingerprints(&new);
        let wanted: std::collections::HashSet<&str> = desired
            .iter()
            .map(|(trigger, _)| trigger.name.as_str())
            .collect();
        let gone: Vec<String> = self
            .triggers
            .keys()
            .filter(|name| !wanted.contains(name.as_str()))
            .cloned()
            .collect();
        let dispatcher = &self.dispatcher;
        futures::future::join_all(gone.iter().map(|name| dispatcher.remove(name))).await;
        for name in gone {
            self.triggers.remove(&name);
            changes.push(format!("trigger `{name}` removed"));
        }
        // What each running trigger calls now: a trigger whose change fails goes
        // on calling it, so it must not be retired.
        let calling: HashMap<String, String> = self
            .config
            .all_triggers()
            .into_iter()
            .map(|trigger| (trigger.name, trigger.function))
            .collect();
        let mut still_called = std::collections::HashSet::new();
        let mut upserts = Vec::new();
        for (trigger, fingerprint) in desired {
            if self.triggers.get(&trigger.name) == Some(&fingerprint) {
                continue;
            }
            let Some(function) = self.functions.get(&trigger.function) else {
                if self.triggers.contains_key(&trigger.name)
                    && let Some(function) = calling.get(&trigger.name)
                {
                    still_called.insert(function.clone());
                }
                errors.push(format!(
                    "trigger `{}`: no function `{}`",
                    trigger.name, trigger.function
                ));
                continue;
            };
            let runtime = function.runtime.clone();
            let destinations = self.destinations(&new, &trigger).await;
            upserts.push((trigger, fingerprint, runtime, destinations));
        }
        let dispatcher = &self.dispatcher;
        let outcomes = futures::future::join_all(upserts.into_iter().map(
            |(trigger, fingerprint, runtime, destinations)| async move {
                let name = trigger.name.clone();
                let outcome = match destinations {
                    Ok(destinations) => dispatcher
                        .upsert(trigger, runtime, destinations)
                        .await
                        .map_err(anyhow::Error::new),
                    Err(error) => Err(error),
                };
                (name, fingerprint, outcome)
            },
        ))
        .await;
        for (name, fingerprint, outcome) in outcomes {
            match outcome {
                Ok(()) => {
                    let verb = if self.triggers.contains_key(&name) {
                        "changed"
                    } else {
                        "added"
                    };
                    self.triggers.insert(name.clone(), fingerprint);
                    changes.push(format!("trigger `{name}` {verb}"));
                }
                Err(error) => {
                    if self.triggers.contains_key(&name)
                        && let Some(function) = calling.get(&name)
                    {
                        still_called.insert(function.clone());
                    }
                    errors.push(format!("trigger `{name}`: {error:#}"));
                }
            }
        }
        for name in removed {
            if let Some(old) = self.functions.remove(&name) {
                changes.push(format!("function `{name}` removed"));
                retiring.push(old);
            }
        }
        let trigger_errors = !errors.is_empty();

        // Synchronous calls reach the functions as they are now.
        let callable: HashMap<String, Arc<SyncFunction>> = self
            .functions
            .iter()
            .filter_map(|(name, function)| Some((name.clone(), function.call.clone()?)))
            .collect();
        self.handles
            .invoke_api_state
            .set_functions(&callable, self.handles.bus.clone());

        // Sources.
        let (source_changes, source_errors) =
            self.apply_sources(&new, &callable, &mut prepared).await;
        changes.extend(source_changes);
        let source_errors_empty = source_errors.is_empty();
        errors.extend(source_errors);

        // Nothing new reaches the old functions now: let them finish and stop. When
        // a listener kept its old routes, every replaced function may still be
        // called; when a trigger kept its old form, the function it calls.
        let routes_kept = !source_errors_empty;
        for old in retiring {
            if routes_kept || (trigger_errors && still_called.contains(&old.runtime.name)) {
                self.lingering.push(old);
            } else {
                self.retire(old);
            }
        }
        if errors.is_empty() {
            for old in std::mem::take(&mut self.lingering) {
                self.retire(old);
            }
        }
        let number = {
            let current = self.handles.revision.read().expect("revision lock");
            current.number + u64::from(!changes.is_empty() || current.number == 0)
        };
        *self.handles.revision.write().expect("revision lock") = Revision {
            number,
            config_sha256: config_sha256(&new),
            applied_at: switchyard_event::timestamp::now_rfc3339(),
        };
        self.config = new;
        (changes, errors)
    }

    fn retire(&self, function: LiveFunction) {
        if let Some(managed) = &function.managed
            && let Some(workers) = self.handles.workers.get()
        {
            workers.retire(managed);
        }
    }

    /// Starts, restarts and stops sources so they match `new`, and gives every
    /// HTTP source the routes and hooks `new` describes.
    async fn apply_sources(
        &mut self,
        new: &Config,
        callable: &HashMap<String, Arc<SyncFunction>>,
        prepared: &mut HashMap<String, PreparedListener>,
    ) -> (Vec<String>, Vec<String>) {
        let mut changes = Vec::new();
        let mut errors = Vec::new();
        let bus = self.handles.bus.clone();
        let sink: Arc<dyn EventSink> = Arc::new(bus.clone());
        let reserved = Arc::new(crate::reserved_sources(new));
        *self
            .handles
            .reserved
            .write()
            .expect("reserved sources lock") = reserved.clone();
        let keep_requests = any_aws_payload(new);
        let mut running: HashMap<String, LiveSource> = self.sources.drain(..).collect();
        let mut next = Vec::new();
        // Stop sources no longer configured (or of another kind) first.
        let wanted: HashMap<&str, &'static str> = new
            .sources
            .iter()
            .map(|source| (source.get_ref().name(), source_kind(source.get_ref())))
            .collect();
        let gone: Vec<String> = running
            .iter()
            .filter(|(name, source)| wanted.get(name.as_str()) != Some(&source.cell.status().kind))
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            let source = running.remove(&name).expect("listed");
            stop_source(source).await;
            changes.push(format!("source `{name}` removed"));
        }
        for (index, source) in new.sources.iter().enumerate() {
            let source = source.get_ref();
            let name = source.name().to_owned();
            let fingerprint = source_fingerprint(new, index);
            let old = running.remove(&name);
            let outcome: anyhow::Result<LiveSource> = match source {
                SourceConfig::Http(http) => {
                    let Some(listener) = prepared.remove(&name) else {
                        errors.push(format!("source `{name}`: no listener prepared"));
                        if let Some(old) = old {
                            next.push((name, old));
                        }
                        continue;
                    };
                    let router = match self
                        .http_router(http, callable, &sink, &reserved, keep_requests)
                        .await
                    {
                        Ok(router) => router,
                        Err(error) => {
                            errors.push(format!("source `{name}`: {error:#}"));
                            if let Some(old) = old {
                                next.push((name, old));
                            }
                            continue;
                        }
                    };
                    match old {
                        Some(old) if listener.same_server => {
                            let live = old.http.as_ref().expect("an http source");
                            if old.fingerprint != fingerprint {
                                changes.push(format!("source `{name}`: routes and hooks changed"));
                            }
                            *live.router.write().expect("router lock") = router;
                            Ok(LiveSource { fingerprint, ..old })
                        }
                        old => {
                            let started = self.start_http(http, listener, router, fingerprint);
                            match old {
                                Some(old) => {
                                    stop_source(old).await;
                                    changes.push(format!("source `{name}` restarted"));
                                }
                                None => changes.push(format!("source `{name}` added")),
                            }
                            started
                        }
                    }
                }
                _ => match old {
                    Some(old) if old.fingerprint == fingerprint => Ok(old),
                    old => {
                        let restarted = old.is_some();
                        if let Some(old) = old {
                            stop_source(old).await;
                        }
                        let started = self.start_source(new, source, fingerprint);
                        if started.is_ok() {
                            changes.push(format!(
                                "source `{name}` {}",
                                if restarted { "restarted" } else { "added" }
                            ));
                        }
                        started
                    }
                },
            };
            match outcome {
                Ok(live) => next.push((name, live)),
                Err(error) => errors.push(format!("source `{name}`: {error:#}")),
            }
        }
        self.sources = next;
        self.handles.admin_state.set_sources(
            self.sources
                .iter()
                .map(|(_, source)| source.cell.clone())
                .collect(),
        );
        self.handles.admin_state.set_schedules(
            new.sources
                .iter()
                .filter_map(|source| match source.get_ref() {
                    SourceConfig::Schedule(schedule) => Some(schedule.clone()),
                    _ => None,
                })
                .collect(),
        );
        (changes, errors)
    }

    /// The router an HTTP source serves: its function URLs, `/v1/events` and hooks.
    async fn http_router(
        &self,
        http: &switchyard_connector_http::HttpSourceConfig,
        callable: &HashMap<String, Arc<SyncFunction>>,
        sink: &Arc<dyn EventSink>,
        reserved: &Arc<switchyard_connector_http::ReservedSources>,
        keep_requests: bool,
    ) -> anyhow::Result<Router> {
        let bus = &self.handles.bus;
        let mut horizons: HashMap<String, Arc<dyn switchyard_event::DedupHorizon>> = HashMap::new();
        for hook in &http.hooks {
            if let Some(horizon) = hook.dedup_horizon() {
                // Names may hold `_` and `-`: the source name's length makes the
                // split unambiguous (`a_b`+`c` is `3_a_b_c`, `a`+`b_c` is `1_a_b_c`).
                let store = switchyard_bus::horizon::KvHorizon::open(
                    bus,
                    &format!("{}_{}_{}", http.name.len(), http.name, hook.name),
                    horizon,
                )
                .await
                .with_context(|| format!("hook `{}`: opening its dedup horizon", hook.name))?;
                horizons.insert(hook.name.clone(), Arc::new(store));
            }
        }
        let routes = routes::router(
            http,
            callable,
            bus,
            &self.handles.workers_settings.region,
            &self.handles.route_metrics,
        )
        .context("routes")?;
        Ok(switchyard_connector_http::router(
            http.clone(),
            sink.clone(),
            self.handles.source_metrics.clone(),
            reserved.clone(),
            horizons,
            routes,
            keep_requests,
        ))
    }

    fn start_http(
        &self,
        http: &switchyard_connector_http::HttpSourceConfig,
        listener: PreparedListener,
        router: Router,
        fingerprint: String,
    ) -> anyhow::Result<LiveSource> {
        let current = Arc::new(RwLock::new(router));
        tracing::info!(source = %http.name, listen = %listener.address, "http source listening");
        let source = Arc::new(switchyard_connector_http::HttpSource::new(
            http.name.clone(),
            listener.socket.try_clone()?,
            swappable(current.clone()),
            http.limits.clone(),
            http.tls.clone(),
            listener.interim,
        ));
        let mut live = self.supervise(source, fingerprint);
        live.http = Some(LiveListener {
            fingerprint: listener_fingerprint(http),
            socket: listener.socket,
            address: listener.address,
            router: current,
        });
        live.cell.set_address(listener.address);
        Ok(live)
    }

    fn supervise(&self, source: Arc<dyn Source>, fingerprint: String) -> LiveSource {
        let stop = self.source_shutdown.child_token();
        let (cell, task) =
            crate::sources::supervise(source, &self.handles.supervisor_metrics, stop.clone());
        LiveSource {
            fingerprint,
            stop,
            task,
            cell,
            http: None,
        }
    }

    /// What a queue source named `owner` in the reserved sources may not produce.
    #[cfg_attr(
        not(any(feature = "sqs", feature = "amqp", feature = "mqtt")),
        allow(dead_code)
    )]
    fn claims(&self, owner: String) -> switchyard_bus::ingest::Claims {
        switchyard_bus::ingest::Claims::new(self.handles.reserved.clone(), owner)
    }

    /// Starts a source that is not an HTTP listener.
    #[cfg_attr(not(feature = "kafka"), allow(unused_variables))]
    fn start_source(
        &self,
        config: &Config,
        source: &SourceConfig,
        fingerprint: String,
    ) -> anyhow::Result<LiveSource> {
        let bus = self.handles.bus.clone();
        let source: Arc<dyn Source> = match source {
            SourceConfig::Http(_) => unreachable!("http sources are started by start_http"),
            SourceConfig::Nats(nats) => {
                tracing::info!(source = %nats.name, "nats source consuming");
                Arc::new(switchyard_connector_nats::NatsSource::new(
                    nats.clone(),
                    bus,
                ))
            }
            #[cfg(feature = "kafka")]
            SourceConfig::Kafka(kafka) => {
                // Records keep themselves exactly only when a trigger may hand them
                // to a handler as Lambda's Kafka event.
                let mut kafka = kafka.clone();
                kafka.keep_records = any_aws_payload(config);
                Arc::new(switchyard_connector_kafka::KafkaSource::new(
                    kafka,
                    bus,
                    self.handles.kafka_metrics.clone(),
                ))
            }
            #[cfg(feature = "sqs")]
            SourceConfig::Sqs(sqs) => {
                // Messages keep their SQS fields only when a trigger may hand them to
                // a handler as Lambda's SQS event.
                let mut sqs = sqs.clone();
                sqs.keep_records = any_aws_payload(config);
                let claims = self.claims(format!("sqs source `{}`", sqs.name));
                Arc::new(switchyard_connector_sqs::SqsSource::new(sqs, bus, claims))
            }
            #[cfg(feature = "amqp")]
            SourceConfig::Amqp(amqp) => {
                let mut amqp = amqp.clone();
                amqp.keep_records = any_aws_payload(config);
                let claims = self.claims(format!("amqp source `{}`", amqp.name));
                Arc::new(switchyard_connector_amqp::AmqpSource::new(
                    amqp, bus, claims,
                ))
            }
            #[cfg(feature = "mqtt")]
            SourceConfig::Mqtt(mqtt) => Arc::new(switchyard_connector_mqtt::MqttSource::new(
                mqtt.clone(),
                bus,
                self.claims(format!("mqtt source `{}`", mqtt.name)),
            )),
            SourceConfig::Schedule(schedule) => {
                tracing::info!(source = %schedule.name, expression = %schedule.expression, timezone = %schedule.timezone, "schedule started");
                Arc::new(
                    switchyard_connector_schedule::source::ScheduleSource::new(
                        schedule.clone(),
                        bus,
                    )
                    .map_err(|error| anyhow::anyhow!(error))?,
                )
            }
            #[cfg(feature = "s3")]
            SourceConfig::S3(poll) => {
                let store = config
                    .stores
                    .get(&poll.store)
                    .with_context(|| format!("no store `{}`", poll.store))?
                    .get_ref()
                    .clone();
                tracing::info!(source = %poll.name, buckets = ?poll.buckets, "s3 poll source started");
                Arc::new(switchyard_connector_s3::poll::PollSource::new(
                    poll.clone(),
                    store,
                    bus,
                    self.handles.poll_metrics.clone(),
                ))
            }
        };
        Ok(self.supervise(source, fingerprint))
    }

    /// Stops everything in order: sources first (nothing new is accepted), then the
    /// dispatcher drains, then function instances stop.
    pub(crate) async fn stop(self) {
        tracing::info!("shutting down: closing sources");
        self.source_shutdown.cancel();
        for (_, source) in self.sources {
            let _ = source.task.await;
        }
        tracing::info!("shutting down: draining the dispatcher");
        self.dispatcher.stop().await;
        if let Some(workers) = self.handles.workers.get() {
            tracing::info!("shutting down: stopping function instances");
            workers.shutdown().await;
        }
        // Acks and NAKs sent while draining must reach the server before we leave.
        let _ =
            tokio::time::timeout(Duration::from_secs(2), self.handles.bus.client().flush()).await;
    }
}

fn source_kind(source: &SourceConfig) -> &'static str {
    match source {
        SourceConfig::Http(_) => "http",
        SourceConfig::Nats(_) => "nats",
        #[cfg(feature = "kafka")]
        SourceConfig::Kafka(_) => "kafka",
        #[cfg(feature = "s3")]
        SourceConfig::S3(_) => "s3_poll",
        SourceConfig::Schedule(_) => "schedule",
        #[cfg(feature = "sqs")]
        SourceConfig::Sqs(_) => "sqs",
        #[cfg(feature = "amqp")]
        SourceConfig::Amqp(_) => "amqp",
        #[cfg(feature = "mqtt")]
        SourceConfig::Mqtt(_) => "mqtt",
    }
}

/// Stops one source and waits until it returned (an HTTP source once its requests
/// in flight are answered, a Kafka source once its positions are committed).
async fn stop_source(source: LiveSource) {
    source.stop.cancel();
    let _ = source.task.await;
}
