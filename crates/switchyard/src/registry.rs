//! Functions defined through the Lambda control-plane API, shared by every process:
//! their definitions in a JetStream key-value bucket (`<EVENTS>_FUNCTIONS`, one key
//! per function, replicated like the events stream) that every process watches, and
//! their code in a JetStream object store (`<EVENTS>_CODE`), each package stored once
//! under its SHA-256. A definition names its package by digest, so a process that
//! sees a definition can always fetch the code it needs.

use std::collections::BTreeMap;

use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use switchyard_bus::Bus;
use switchyard_bus::async_nats::jetstream::{kv, object_store};
use tokio::io::AsyncReadExt as _;

/// How long a stored package no definition names is kept (a create or update
/// stores the package, then writes the definition).
const UNNAMED_CODE_GRACE: time::Duration = time::Duration::minutes(10);

/// How a package's description says when an upload last named it.
const REFERENCED_PREFIX: &str = "referenced at ";

/// A function as the control plane stored it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct FunctionRecord {
    pub function_name: String,
    pub runtime: String,
    pub handler: String,
    #[serde(default)]
    pub description: String,
    pub memory_size: u32,
    /// Seconds.
    pub timeout: u32,
    #[serde(default)]
    pub environment: BTreeMap<String, String>,
    /// Accepted and returned, not used (there is no IAM here).
    #[serde(default)]
    pub role: String,
    #[serde(default)]
    pub architectures: Vec<String>,
    /// Lambda's `CodeSha256` (base64).
    pub code_sha256: String,
    /// The package's name in the code store (hex SHA-256).
    pub code_key: String,
    pub code_size: u64,
    /// ISO 8601, as Lambda writes it (`2026-12-05T14:00:00.000+0000`).
    pub last_modified: String,
    /// Changes with every update (Lambda's `RevisionId`).
    pub revision_id: String,
    /// Published versions (immutable), by number.
    #[serde(default)]
    pub versions: BTreeMap<u32, VersionRecord>,
    /// The last version number given (numbers are never reused).
    #[serde(default)]
    pub last_version: u32,
    /// Aliases, by name: each routes to a version or `$LATEST`.
    #[serde(default)]
    pub aliases: BTreeMap<String, AliasRecord>,
    /// PutFunctionConcurrency: the function's concurrency limit.
    #[serde(default)]
    pub reserved_concurrency: Option<u32>,
    /// CreateFunctionUrlConfig: the function's URL (of `$LATEST`).
    #[serde(default)]
    pub url_config: Option<UrlConfigRecord>,
    /// CreateEventSourceMapping: what feeds the function, by UUID.
    #[serde(default)]
    pub event_source_mappings: BTreeMap<String, MappingRecord>,
}

/// An event source mapping of a self-managed Kafka topic: a Kafka source and a
/// batched trigger handing Lambda's `SelfManagedKafka` event to `$LATEST`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct MappingRecord {
    pub bootstrap_servers: Vec<String>,
    pub topic: String,
    /// `TRIM_HORIZON` or `LATEST`.
    pub starting_position: String,
    pub batch_size: u32,
    /// Seconds; `None`: Lambda's default for Kafka (500 ms).
    #[serde(default)]
    pub maximum_batching_window_in_seconds: Option<u32>,
    pub enabled: bool,
    pub consumer_group_id: String,
    /// Seconds since the epoch, as Lambda answers `LastModified`.
    pub last_modified: f64,
}

/// A function URL's settings, as Lambda's FunctionUrlConfig names them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct UrlConfigRecord {
    /// `AWS_IAM` (requests signed with the `[invoke_api]` credentials) or `NONE`.
    pub auth_type: String,
    #[serde(default)]
    pub cors: Option<UrlCors>,
    pub creation_time: String,
    pub last_modified_time: String,
}

/// A function URL's CORS settings (Lambda's `Cors`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct UrlCors {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_credentials: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_headers: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_methods: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_origins: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expose_headers: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age: Option<u32>,
}

impl UrlCors {
    /// As an HTTP source route's CORS settings (the layer both use).
    pub fn to_config(&self) -> switchyard_connector_http::CorsConfig {
        switchyard_connector_http::CorsConfig {
            allow_origins: self.allow_origins.clone().unwrap_or_default(),
            allow_methods: self.allow_methods.clone().unwrap_or_default(),
            allow_headers: self.allow_headers.clone().unwrap_or_default(),
            expose_headers: self.expose_headers.clone().unwrap_or_default(),
            max_age: self
                .max_age
                .map(|seconds| std::time::Duration::from_secs(u64::from(seconds))),
            allow_credentials: self.allow_credentials.unwrap_or(false),
        }
    }
}

/// What a version fixes of a function: its code and settings when published.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct VersionRecord {
    pub runtime: String,
    pub handler: String,
    #[serde(default)]
    pub description: String,
    pub memory_size: u32,
    pub timeout: u32,
    #[serde(default)]
    pub environment: BTreeMap<String, String>,
    pub code_sha256: String,
    pub code_key: String,
    pub code_size: u64,
    pub last_modified: String,
    pub revision_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct AliasRecord {
    /// A version number, or `$LATEST`.
    pub function_version: String,
    #[serde(default)]
    pub description: String,
    pub revision_id: String,
}

impl FunctionRecord {
    /// `$LATEST`'s code and settings, as a version would fix them.
    pub fn latest(&self) -> VersionRecord {
        VersionRecord {
            runtime: self.runtime.clone(),
            handler: self.handler.clone(),
            description: self.description.clone(),
            memory_size: self.memory_size,
            timeout: self.timeout,
            environment: self.environment.clone(),
            code_sha256: self.code_sha256.clone(),
            code_key: self.code_key.clone(),
            code_size: self.code_size,
            last_modified: self.last_modified.clone(),
            revision_id: self.revision_id.clone(),
        }
    }

    /// Every package the function needs ($LATEST's and its versions').
    pub fn code_keys(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.code_key.as_str()).chain(
            self.versions
                .values()
                .map(|version| version.code_key.as_str()),
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("the function registry: {0}")]
    Store(String),
    /// Someone else changed the function since it was read.
    #[error("the function changed meanwhile")]
    Conflict,
}

fn store_error(error: impl std::fmt::Display) -> RegistryError {
    RegistryError::Store(error.to_string())
}

/// The shared definitions and code.
#[derive(Clone)]
pub struct Registry {
    definitions: kv::Store,
    code: object_store::ObjectStore,
}

impl Registry {
    pub async fn open(bus: &Bus) -> Result<Registry, RegistryError> {
        let jetstream = bus.jetstream();
        let definitions = jetstream
            .create_or_update_key_value(kv::Config {
                bucket: format!("{}_FUNCTIONS", bus.events_stream()),
                description: "switchyard: functions defined through the lambda api".to_owned(),
                history: 1,
                num_replicas: bus.replicas(),
                ..Default::default()
            })
            .await
            .map_err(store_error)?;
        let bucket = format!("{}_CODE", bus.events_stream());
        let code = match jetstream.get_object_store(&bucket).await {
            Ok(code) => code,
            Err(_) => jetstream
                .create_object_store(object_store::Config {
                    bucket,
                    description: Some(
                        "switchyard: lambda deployment packages, by sha-256".to_owned(),
                    ),
                    num_replicas: bus.replicas(),
                    ..Default::default()
                })
                .await
                .map_err(store_error)?,
        };
        Ok(Registry { definitions, code })
    }

    /// The size of a stored package, if it is stored.
    pub async fn code_size(&self, key: &str) -> Option<u64> {
        self.code.info(key).await.ok().map(|info| info.size as u64)
    }

    /// Stores a package unless one with its digest is there already; either way
    /// marks it referenced now (its description), so the cleanup's grace period
    /// covers the definition about to name it. A stored package is never written
    /// again: a process may be fetching it.
    pub async fn put_code(&self, key: &str, zip: &[u8]) -> Result<(), RegistryError> {
        let marker = format!(
            "{REFERENCED_PREFIX}{}",
            time::OffsetDateTime::now_utc().unix_timestamp()
        );
        if self.code.info(key).await.is_ok() {
            self.code
                .update_metadata(
                    key,
                    object_store::UpdateMetadata {
                        name: key.to_owned(),
                        description: Some(marker),
                        ..Default::default()
                    },
                )
                .await
                .map_err(store_error)?;
            return Ok(());
        }
        let mut reader = zip;
        self.code.put(key, &mut reader).await.map_err(store_error)?;
        Ok(())
    }

    /// A stored package.
    pub async fn code(&self, key: &str) -> Result<Vec<u8>, RegistryError> {
        let mut object = self.code.get(key).await.map_err(store_error)?;
        let mut zip = Vec::new();
        object.read_to_end(&mut zip).await.map_err(store_error)?;
        Ok(zip)
    }

    /// Bytes of every stored package.
    pub async fn code_bytes(&self) -> Result<u64, RegistryError> {
        let mut list = self.code.list().await.map_err(store_error)?;
        let mut total = 0u64;
        while let Some(info) = list.next().await {
            total += info.map_err(store_error)?.size as u64;
        }
        Ok(total)
    }

    /// Removes packages no definition names any more.
    pub async fn remove_unused_code(&self) -> Result<(), RegistryError> {
        let used: std::collections::HashSet<String> = self
            .list()
            .await?
            .iter()
            .flat_map(|(record, _)| record.code_keys().map(str::to_owned))
            .collect();
        let mut list = self.code.list().await.map_err(store_error)?;
        let mut unused = Vec::new();
        while let Some(info) = list.next().await {
            let info = info.map_err(store_error)?;
            // A package is stored before the definition naming it is written: one
            // stored recently may be about to be named (by this process or another).
            let now = time::OffsetDateTime::now_utc();
            let referenced = info
                .description
                .as_deref()
                .and_then(|description| description.strip_prefix(REFERENCED_PREFIX))
                .and_then(|seconds| seconds.parse::<i64>().ok())
                .and_then(|seconds| time::OffsetDateTime::from_unix_timestamp(seconds).ok());
            let settled = [info.modified, referenced]
                .iter()
                .flatten()
                .all(|at| now - *at > UNNAMED_CODE_GRACE)
                && info.modified.is_some();
            if settled && !used.contains(&info.name) {
                unused.push(info.name);
            }
        }
        if unused.is_empty() {
            return Ok(());
        }
        // Named meanwhile: kept.
        let used_now: std::collections::HashSet<String> = self
            .list()
            .await?
            .iter()
            .flat_map(|(record, _)| record.code_keys().map(str::to_owned))
            .collect();
        for name in unused {
            if !used_now.contains(&name) {
                let _ = self.code.delete(&name).await;
            }
        }
        Ok(())
    }

    /// A definition and its revision in the bucket.
    pub async fn get(&self, name: &str) -> Result<Option<(FunctionRecord, u64)>, RegistryError> {
        let Some(entry) = self.definitions.entry(name).await.map_err(store_error)? else {
            return Ok(None);
        };
        if entry.operation != kv::Operation::Put {
            return Ok(None);
        }
        let record = serde_json::from_slice(&entry.value).map_err(store_error)?;
        Ok(Some((record, entry.revision)))
    }

    /// Every definition, by name.
    pub async fn list(&self) -> Result<Vec<(FunctionRecord, u64)>, RegistryError> {
        let mut keys = self.definitions.keys().await.map_err(store_error)?;
        let mut names = Vec::new();
        while let Some(key) = keys.next().await {
            names.push(key.map_err(store_error)?);
        }
        names.sort();
        let mut records = Vec::new();
        for name in names {
            if let Some(found) = self.get(&name).await? {
                records.push(found);
            }
        }
        Ok(records)
    }

    /// Creates a definition; `Conflict` if one exists.
    pub async fn create(&self, record: &FunctionRecord) -> Result<u64, RegistryError> {
        let value = serde_json::to_vec(record).map_err(store_error)?;
        match self
            .definitions
            .create(&record.function_name, value.into())
            .await
        {
            Ok(revision) => Ok(revision),
            Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => {
                Err(RegistryError::Conflict)
            }
            Err(error) => Err(store_error(error)),
        }
    }

    /// Replaces a definition read at `revision`; `Conflict` if it changed since.
    pub async fn update(
        &self,
        record: &FunctionRecord,
        revision: u64,
    ) -> Result<u64, RegistryError> {
        let value = serde_json::to_vec(record).map_err(store_error)?;
        self.definitions
            .update(&record.function_name, value.into(), revision)
            .await
            .map_err(|error| match error.kind() {
                kv::UpdateErrorKind::WrongLastRevision => RegistryError::Conflict,
                _ => store_error(error),
            })
    }

    pub async fn delete(&self, name: &str) -> Result<(), RegistryError> {
        self.definitions.delete(name).await.map_err(store_error)
    }

    /// Every change from now on (after the current values).
    pub async fn watch(&self) -> Result<kv::Watch, RegistryError> {
        self.definitions
            .watch_with_history(">")
            .await
            .map_err(store_error)
    }
}
