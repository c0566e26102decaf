//! The Lambda control-plane API on the `[invoke_api]` listener (API version
//! 2015-03-31, SigV4 as the Invoke API): CreateFunction (`ZipFile`), GetFunction,
//! GetFunctionConfiguration, ListFunctions, UpdateFunctionCode,
//! UpdateFunctionConfiguration and DeleteFunction, so `aws lambda ...` and boto3
//! deploy to Switchyard unchanged.
//!
//! A definition is stored in the function registry ([`crate::registry`]) and every
//! process's reconciler runs it; `State` and `LastUpdateStatus` say whether the
//! process answering runs the stored revision yet (`Pending`/`InProgress` until it
//! does), so `aws lambda wait function-active-v2` and `function-updated-v2` work. The
//! configuration file's functions are listed too and cannot be changed here
//! (`ResourceConflictException` naming the file).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};
use switchyard_workers::runtime_api::function_arn;

use crate::invoke_api::{InvokeApiState, api_error, function_name};
use crate::live::ApiFunctions;
use crate::registry::{FunctionRecord, RegistryError};

/// Lambda's limit on a CreateFunction or UpdateFunctionCode request.
const MAX_REQUEST_BYTES: usize = 70_167_211;
/// Lambda's limit on a function's environment variables, in total.
const MAX_ENVIRONMENT_BYTES: usize = 4096;
/// Code all functions may store together (Lambda's default quota, 75 GB).
const CODE_STORAGE_BYTES: u64 = 75 * 1000 * 1000 * 1000;

pub(crate) fn routes() -> Router<InvokeApiState> {
    Router::new()
        .route(
            "/2015-03-31/functions",
            post(create_function).get(list_functions),
        )
        .route(
            "/2015-03-31/functions/",
            post(create_function).get(list_functions),
        )
        .route(
            "/2015-03-31/functions/{name}",
            get(get_function).delete(delete_function),
        )
        .route(
            "/2015-03-31/functions/{name}/configuration",
            get(get_configuration).put(update_configuration),
        )
        .route("/2015-03-31/functions/{name}/code", put(update_code))
        .route(
            "/2015-03-31/functions/{name}/versions",
            post(publish_version).get(list_versions),
        )
        .route(
            "/2015-03-31/functions/{name}/aliases",
            post(create_alias).get(list_aliases),
        )
        .route(
            "/2015-03-31/functions/{name}/aliases/{alias}",
            get(get_alias).put(update_alias).delete(delete_alias),
        )
        .route(
            "/2017-10-31/functions/{name}/concurrency",
            put(put_concurrency).delete(delete_concurrency),
        )
        .route(
            "/2019-09-30/functions/{name}/concurrency",
            get(get_concurrency),
        )
        .route(
            "/2015-03-31/event-source-mappings",
            post(create_mapping).get(list_mappings),
        )
        .route(
            "/2015-03-31/event-source-mappings/",
            post(create_mapping).get(list_mappings),
        )
        .route(
            "/2015-03-31/event-source-mappings/{uuid}",
            get(get_mapping).put(update_mapping).delete(delete_mapping),
        )
        .route(
            "/2021-10-31/functions/{name}/url",
            post(create_url_config)
                .get(get_url_config)
                .put(update_url_config)
                .delete(delete_url_config),
        )
}

/// A refusal, as Lambda words it.
struct ApiError(StatusCode, &'static str, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        api_error(self.0, self.1, &self.2)
    }
}

fn not_found(region: &str, name: &str) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        "ResourceNotFoundException",
        format!("Function not found: {}", function_arn(region, name)),
    )
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError(
        StatusCode::BAD_REQUEST,
        "InvalidParameterValueException",
        message.into(),
    )
}

fn validation(value: &str, field: &str, constraint: &str) -> ApiError {
    ApiError(
        StatusCode::BAD_REQUEST,
        "ValidationException",
        format!(
            "1 validation error detected: Value '{value}' at '{field}' failed to satisfy constraint: {constraint}"
        ),
    )
}

fn registry_error(error: RegistryError) -> ApiError {
    match error {
        RegistryError::Conflict => ApiError(
            StatusCode::CONFLICT,
            "ResourceConflictException",
            "The operation cannot be performed at this time. The function was changed by another request meanwhile: retry".to_owned(),
        ),
        RegistryError::Store(problem) => {
            tracing::error!(%problem, "the function registry failed");
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                "ServiceException",
                "the function registry is unavailable; retry".to_owned(),
            )
        }
    }
}

/// Reads a request's body within `limit` and checks its signature (when keys are
/// configured), before anything is said about the request.
async fn signed_body(
    state: &InvokeApiState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    operation: &str,
) -> Result<Bytes, ApiError> {
    if !state.keys.is_empty()
        && let Err(refusal) = state
            .keys
            .precheck(headers, time::OffsetDateTime::now_utc())
    {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            refusal.error_type,
            refusal.message,
        ));
    }
    let too_large = || {
        ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestEntityTooLargeException",
            format!("Request must be smaller than {limit} bytes for the {operation} operation"),
        )
    };
    if headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<usize>().ok())
        .is_some_and(|length| length > limit)
    {
        return Err(too_large());
    }
    let payload =
        match http_body_util::BodyExt::collect(http_body_util::Limited::new(body, limit)).await {
            Ok(collected) => collected.to_bytes(),
            Err(error) if error.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
            Err(error) => {
                return Err(ApiError(
                    StatusCode::BAD_REQUEST,
                    "InvalidRequestContentException",
                    format!("the request body could not be read: {error}"),
                ));
            }
        };
    if !state.keys.is_empty()
        && let Err(refusal) = state.keys.verify(
            method,
            uri,
            headers,
            &payload,
            time::OffsetDateTime::now_utc(),
        )
    {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            refusal.error_type,
            refusal.message,
        ));
    }
    Ok(payload)
}

fn control(state: &InvokeApiState) -> Result<Arc<ApiFunctions>, ApiError> {
    state.control.get().cloned().ok_or_else(|| {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceException",
            "switchyard is starting".to_owned(),
        )
    })
}

/// A function name as Lambda takes it: 1 to 64 letters, digits, `-` and `_`.
fn checked_name(given: &str) -> Result<String, ApiError> {
    let name = function_name(given);
    if name.is_empty()
        || name.len() > 64
        || !name.chars().all(|character| {
            character.is_ascii_alphanumeric() || character == '-' || character == '_'
        })
    {
        return Err(validation(
            given,
            "functionName",
            "Member must satisfy regular expression pattern: (arn:(aws[a-zA-Z-]*)?:lambda:)?([a-z]{2}(-gov)?-[a-z]+-\\d{1}:)?(\\d{12}:)?(function:)?([a-zA-Z0-9-_]+)(:(\\$LATEST|[a-zA-Z0-9-_]+))?",
        ));
    }
    Ok(name.to_owned())
}

/// The qualifier of a request: `?Qualifier=`, else the one in the name or ARN.
pub(crate) fn qualifier_of<'a>(given: &'a str, qualifier: Option<&'a str>) -> Option<&'a str> {
    let from_name = given
        .strip_prefix("arn:")
        .map(|arn| arn.split(':').nth(6))
        .unwrap_or_else(|| given.split(':').nth(1));
    qualifier
        .or(from_name)
        .filter(|qualifier| !qualifier.is_empty())
}

/// Which version a qualifier names of `record`: `None` for `$LATEST`; an alias
/// is followed. Unknown: `ResourceNotFoundException` with the qualified ARN.
fn version_of(
    region: &str,
    record: &FunctionRecord,
    qualifier: Option<&str>,
) -> Result<Option<u32>, ApiError> {
    let name = &record.function_name;
    let missing = |qualifier: &str| {
        ApiError(
            StatusCode::NOT_FOUND,
            "ResourceNotFoundException",
            format!(
                "Function not found: {}:{qualifier}",
                function_arn(region, name)
            ),
        )
    };
    match qualifier {
        None | Some("$LATEST") => Ok(None),
        Some(text) => {
            let target = match record.aliases.get(text) {
                Some(alias) => alias.function_version.as_str(),
                None => text,
            };
            if target == "$LATEST" {
                return Ok(None);
            }
            let number: u32 = target.parse().map_err(|_| missing(text))?;
            if record.versions.contains_key(&number) {
                Ok(Some(number))
            } else {
                Err(missing(text))
            }
        }
    }
}

/// Only `$LATEST` for functions of the configuration file.
fn check_qualifier(region: &str, given: &str, qualifier: Option<&str>) -> Result<(), ApiError> {
    match qualifier_of(given, qualifier) {
        None | Some("$LATEST") => Ok(()),
        Some(_) => Err(not_found(region, function_name(given))),
    }
}

/// A function the file defines cannot be changed through the API.
fn refuse_file_function(api: &ApiFunctions, name: &str) -> Result<(), ApiError> {
    if let Some(file) = api.file_functions.read().expect("api lock").get(name) {
        return Err(ApiError(
            StatusCode::CONFLICT,
            "ResourceConflictException",
            format!(
                "Function {name} is defined in {file}; change it there (and reload), not through the API"
            ),
        ));
    }
    Ok(())
}

fn now_lambda() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}+0000",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.millisecond()
    )
}

/// Lambda's FunctionConfiguration of an API function's `$LATEST`, with its state
/// in this process.
fn configuration(
    region: &str,
    api: &ApiFunctions,
    record: &FunctionRecord,
    revision: u64,
) -> Value {
    version_configuration(region, api, record, revision, None)
}

/// Lambda's FunctionConfiguration of `$LATEST` (`version` none) or of a published
/// version.
fn version_configuration(
    region: &str,
    api: &ApiFunctions,
    record: &FunctionRecord,
    revision: u64,
    version: Option<u32>,
) -> Value {
    let name = &record.function_name;
    let settings = match version.and_then(|number| record.versions.get(&number)) {
        Some(published) => published.clone(),
        None => record.latest(),
    };
    let applied = api.applied.read().expect("api lock").get(name).copied();
    let failed = api
        .failed
        .read()
        .expect("api lock")
        .get(name)
        .filter(|(failed, _)| *failed == revision)
        .map(|(_, reason)| reason.clone());
    let (state, update, reason) = match (failed, applied) {
        (Some(reason), None) => ("Failed", "Failed", Some(reason)),
        (Some(reason), Some(_)) => ("Active", "Failed", Some(reason)),
        (None, Some(applied)) if applied == revision => ("Active", "Successful", None),
        (None, Some(_)) => ("Active", "InProgress", None),
        (None, None) => ("Pending", "InProgress", None),
    };
    // A published version never changes: once this process runs the function it
    // runs the version as published.
    let (state, update, reason) = if version.is_some() && applied.is_some() {
        ("Active", "Successful", None)
    } else {
        (state, update, reason)
    };
    let mut configuration = json!({
        "FunctionName": name,
        "FunctionArn": match version {
            Some(number) => format!("{}:{number}", function_arn(region, name)),
            None => function_arn(region, name),
        },
        "Runtime": settings.runtime,
        "Role": record.role,
        "Handler": settings.handler,
        "CodeSize": settings.code_size,
        "Description": settings.description,
        "Timeout": settings.timeout,
        "MemorySize": settings.memory_size,
        "LastModified": settings.last_modified,
        "CodeSha256": settings.code_sha256,
        "Version": version.map_or_else(|| "$LATEST".to_owned(), |number| number.to_string()),
        "Environment": { "Variables": settings.environment },
        "TracingConfig": { "Mode": "PassThrough" },
        "RevisionId": record.revision_id,
        "State": state,
        "LastUpdateStatus": update,
        "PackageType": "Zip",
        "Architectures": if record.architectures.is_empty() { vec!["x86_64".to_owned()] } else { record.architectures.clone() },
        "EphemeralStorage": { "Size": 512 },
    });
    if let Some(reason) = reason {
        if state == "Failed" {
            configuration["StateReason"] = json!(reason);
            configuration["StateReasonCode"] = json!("InternalError");
        }
        configuration["LastUpdateStatusReason"] = json!(reason);
        configuration["LastUpdateStatusReasonCode"] = json!("InternalError");
    } else if state == "Pending" {
        configuration["StateReason"] = json!("The function is being created.");
        configuration["StateReasonCode"] = json!("Creating");
    }
    configuration
}

/// A `lambda` function of the configuration file, as ListFunctions shows it.
fn file_configuration(
    region: &str,
    file: &str,
    (name, handler, memory, timeout): &(String, String, u32, u64),
) -> Value {
    json!({
        "FunctionName": name,
        "FunctionArn": function_arn(region, name),
        "Handler": handler,
        "MemorySize": memory,
        "Timeout": timeout,
        "Description": format!("defined in {file}"),
        "Version": "$LATEST",
        "State": "Active",
        "LastUpdateStatus": "Successful",
        "PackageType": "Zip",
        "CodeSize": 0,
        "CodeSha256": "",
    })
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct EnvironmentInput {
    #[serde(default)]
    variables: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct CodeInput {
    zip_file: Option<String>,
    s3_bucket: Option<String>,
    image_uri: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CreateInput {
    function_name: String,
    runtime: Option<String>,
    #[serde(default)]
    handler: Option<String>,
    #[serde(default)]
    role: String,
    code: Option<CodeInput>,
    #[serde(default)]
    description: String,
    timeout: Option<u32>,
    memory_size: Option<u32>,
    environment: Option<EnvironmentInput>,
    #[serde(default)]
    architectures: Vec<String>,
    package_type: Option<String>,
    /// Also publish version 1 of it.
    #[serde(default)]
    publish: bool,
    // Accepted and ignored (CONFIG.md lists them): VpcConfig, Tags,
    // Layers, KMSKeyArn, TracingConfig, DeadLetterConfig, EphemeralStorage...
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct UpdateConfigurationInput {
    runtime: Option<String>,
    handler: Option<String>,
    role: Option<String>,
    description: Option<String>,
    timeout: Option<u32>,
    memory_size: Option<u32>,
    environment: Option<EnvironmentInput>,
    revision_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct UpdateCodeInput {
    zip_file: Option<String>,
    s3_bucket: Option<String>,
    image_uri: Option<String>,
    revision_id: Option<String>,
    #[serde(default)]
    architectures: Vec<String>,
    /// Also publish a version of the new code.
    #[serde(default)]
    publish: bool,
    /// Check the package and answer, changing nothing.
    #[serde(default)]
    dry_run: bool,
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|error| {
        ApiError(
            StatusCode::BAD_REQUEST,
            "InvalidRequestContentException",
            format!("Could not parse request body into json: {error}"),
        )
    })
}

/// Checks the settings both CreateFunction and UpdateFunctionConfiguration take.
fn check_settings(api: &ApiFunctions, record: &FunctionRecord) -> Result<(), ApiError> {
    let runtimes = api.runtimes.read().expect("api lock");
    if !runtimes.contains_key(&record.runtime) {
        return Err(invalid(format!(
            "The runtime parameter of {} is not supported here: Switchyard runs {} (add others in [runtimes])",
            record.runtime,
            runtimes.keys().cloned().collect::<Vec<_>>().join(", ")
        )));
    }
    if !(128..=10240).contains(&record.memory_size) {
        return Err(validation(
            &record.memory_size.to_string(),
            "memorySize",
            "Member must have value less than or equal to 10240 and greater than or equal to 128",
        ));
    }
    if !(1..=900).contains(&record.timeout) {
        return Err(validation(
            &record.timeout.to_string(),
            "timeout",
            "Member must have value greater than or equal to 1 and less than or equal to 900",
        ));
    }
    if record.handler.is_empty() && !record.runtime.starts_with("provided") {
        return Err(invalid(
            "Handler is required for a function with a runtime other than provided.*",
        ));
    }
    if record.handler.len() > 128 {
        return Err(validation(
            &record.handler,
            "handler",
            "Member must have length less than or equal to 128",
        ));
    }
    let environment_bytes: usize = record
        .environment
        .iter()
        .map(|(name, value)| name.len() + value.len())
        .sum();
    if environment_bytes > MAX_ENVIRONMENT_BYTES {
        return Err(invalid(format!(
            "Lambda was unable to configure your environment variables because the environment variables you have provided exceeded the 4KB limit. String measured: {environment_bytes}"
        )));
    }
    for name in record.environment.keys() {
        let valid = name
            .chars()
            .next()
            .is_some_and(|first| first.is_ascii_alphabetic())
            && name
                .chars()
                .all(|character| character.is_ascii_alphanumeric() || character == '_');
        if !valid {
            return Err(validation(
                name,
                "environment.variables",
                "Member must satisfy regular expression pattern: [a-zA-Z]([a-zA-Z0-9_])+",
            ));
        }
        if RESERVED_VARIABLES.contains(&name.as_str()) {
            return Err(invalid(format!(
                "Lambda was unable to configure your environment variables because the environment variables you have provided contains reserved keys that are currently not supported for modification. Reserved keys used in this request: {name}"
            )));
        }
    }
    Ok(())
}

/// Variables Lambda sets itself and refuses from users.
const RESERVED_VARIABLES: [&str; 13] = [
    "_HANDLER",
    "_X_AMZN_TRACE_ID",
    "AWS_REGION",
    "AWS_EXECUTION_ENV",
    "AWS_LAMBDA_FUNCTION_NAME",
    "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
    "AWS_LAMBDA_FUNCTION_VERSION",
    "AWS_LAMBDA_INITIALIZATION_TYPE",
    "AWS_LAMBDA_LOG_GROUP_NAME",
    "AWS_LAMBDA_LOG_STREAM_NAME",
    "AWS_LAMBDA_RUNTIME_API",
    "LAMBDA_TASK_ROOT",
    "LAMBDA_RUNTIME_DIR",
];

/// Decodes, checks and stores a package; its digest and size.
/// The package of `code`, checked (Lambda's limits and rules), and its bytes.
async fn check_package(code: CodeInput) -> Result<(Vec<u8>, crate::code::Package), ApiError> {
    if code.s3_bucket.is_some() || code.image_uri.is_some() {
        return Err(invalid(
            "Switchyard takes code as ZipFile only (no S3Bucket/S3Key, no container images): upload the zip in the request",
        ));
    }
    let encoded = code
        .zip_file
        .ok_or_else(|| invalid("Please provide a source for function code."))?;
    let zip = base64::engine::general_purpose::STANDARD
        .decode(encoded.as_bytes())
        .map_err(|_| {
            invalid(
                "Could not unzip uploaded file. Please check your file, then try to upload again.",
            )
        })?;
    let (zip, package) = tokio::task::spawn_blocking(move || {
        let package = crate::code::check(&zip);
        (zip, package)
    })
    .await
    .map_err(|_| invalid("the package could not be checked"))?;
    let package = package.map_err(|refusal| {
        let status = if refusal.error_type == "RequestEntityTooLargeException" {
            StatusCode::PAYLOAD_TOO_LARGE
        } else {
            StatusCode::BAD_REQUEST
        };
        ApiError(status, refusal.error_type, refusal.message)
    })?;
    Ok((zip, package))
}

/// Checks the package and stores it in the code store (once per content).
async fn store_code(api: &ApiFunctions, code: CodeInput) -> Result<crate::code::Package, ApiError> {
    let (zip, package) = check_package(code).await?;
    let stored = api.registry.code_bytes().await.map_err(registry_error)?;
    // A package stored already is replaced, not added.
    let replaced = api.registry.code_size(&package.key).await.unwrap_or(0);
    if stored.saturating_sub(replaced) + package.size > CODE_STORAGE_BYTES {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "CodeStorageExceededException",
            format!("Code storage limit exceeded: {stored} bytes stored of {CODE_STORAGE_BYTES}"),
        ));
    }
    api.registry
        .put_code(&package.key, &zip)
        .await
        .map_err(registry_error)?;
    Ok(package)
}

async fn create_function(
    State(state): State<InvokeApiState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match create(&state, &method, &uri, &headers, body).await {
        Ok(response) => response,
        Err(refusal) => refusal.into_response(),
    }
}

async fn create(
    state: &InvokeApiState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body = signed_body(
        state,
        method,
        uri,
        headers,
        body,
        MAX_REQUEST_BYTES,
        "CreateFunction",
    )
    .await?;
    let api = control(state)?;
    let input: CreateInput = parse_json(&body)?;
    let name = checked_name(&input.function_name)?;
    if input.function_name.contains(':') {
        return Err(invalid(
            "FunctionName must be a name, not an ARN, for CreateFunction",
        ));
    }
    if input
        .package_type
        .as_deref()
        .is_some_and(|kind| kind != "Zip")
    {
        return Err(invalid(
            "Switchyard runs Zip packages only (PackageType = Zip)",
        ));
    }
    refuse_file_function(&api, &name)?;
    let runtime = input
        .runtime
        .ok_or_else(|| invalid("Runtime is required for .zip file archive functions"))?;
    let mut record = FunctionRecord {
        function_name: name.clone(),
        runtime,
        handler: input.handler.unwrap_or_default(),
        description: input.description,
        memory_size: input.memory_size.unwrap_or(128),
        timeout: input.timeout.unwrap_or(3),
        environment: input.environment.unwrap_or_default().variables,
        role: input.role,
        architectures: input.architectures,
        code_sha256: String::new(),
        code_key: String::new(),
        code_size: 0,
        last_modified: now_lambda(),
        revision_id: uuid::Uuid::new_v4().to_string(),
        versions: BTreeMap::new(),
        last_version: 0,
        aliases: BTreeMap::new(),
        reserved_concurrency: None,
        url_config: None,
        event_source_mappings: BTreeMap::new(),
    };
    check_settings(&api, &record)?;
    if api
        .registry
        .get(&name)
        .await
        .map_err(registry_error)?
        .is_some()
    {
        return Err(already_exists(&name));
    }
    let package = store_code(&api, input.code.unwrap_or_default()).await?;
    record.code_sha256 = package.sha256;
    record.code_key = package.key;
    record.code_size = package.size;
    let published = input.publish.then(|| publish_latest(&mut record, None));
    let revision = match api.registry.create(&record).await {
        Ok(revision) => revision,
        Err(RegistryError::Conflict) => return Err(already_exists(&name)),
        Err(error) => return Err(registry_error(error)),
    };
    tracing::info!(function = %name, runtime = %record.runtime, code_sha256 = %record.code_sha256, "function created through the lambda api");
    Ok((
        StatusCode::CREATED,
        axum::Json(version_configuration(
            &state.region,
            &api,
            &record,
            revision,
            published,
        )),
    )
        .into_response())
}

fn already_exists(name: &str) -> ApiError {
    ApiError(
        StatusCode::CONFLICT,
        "ResourceConflictException",
        format!("Function already exist: {name}"),
    )
}

#[derive(Deserialize, Default)]
struct QualifierQuery {
    #[serde(rename = "Qualifier")]
    qualifier: Option<String>,
}

/// The stored record of `given` (a name or ARN), or the file's function of that name.
enum Found {
    Api(Box<FunctionRecord>, u64),
    File(String, (String, String, u32, u64)),
}

async fn find(state: &InvokeApiState, api: &ApiFunctions, given: &str) -> Result<Found, ApiError> {
    let name = checked_name(given)?;
    if let Some(file) = api
        .file_functions
        .read()
        .expect("api lock")
        .get(&name)
        .cloned()
        && let Some(lambda) = api
            .file_lambdas
            .read()
            .expect("api lock")
            .iter()
            .find(|lambda| lambda.0 == name)
            .cloned()
    {
        return Ok(Found::File(file, lambda));
    }
    match api.registry.get(&name).await.map_err(registry_error)? {
        Some((record, revision)) => Ok(Found::Api(Box::new(record), revision)),
        None => Err(not_found(&state.region, &name)),
    }
}

async fn get_function(
    State(state): State<InvokeApiState>,
    Path(given): Path<String>,
    Query(query): Query<QualifierQuery>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        signed_body(&state, &method, &uri, &headers, body, 0, "GetFunction").await?;
        let api = control(&state)?;
        Ok::<_, ApiError>(match find(&state, &api, &given).await? {
            Found::Api(record, revision) => {
                let version = version_of(&state.region, &record, qualifier_of(&given, query.qualifier.as_deref()))?;
                let mut answer = json!({
                    "Configuration": version_configuration(&state.region, &api, &record, revision, version),
                    "Code": { "RepositoryType": "S3", "Location": "" },
                });
                if let Some(reserved) = record.reserved_concurrency {
                    answer["Concurrency"] = json!({ "ReservedConcurrentExecutions": reserved });
                }
                answer
            }
            Found::File(file, lambda) => {
                check_qualifier(&state.region, &given, query.qualifier.as_deref())?;
                json!({
                    "Configuration": file_configuration(&state.region, &file, &lambda),
                    "Code": { "RepositoryType": "S3", "Location": "" },
                })
            }
        })
    }
    .await;
    match result {
        Ok(answer) => axum::Json(answer).into_response(),
        Err(refusal) => refusal.into_response(),
    }
}

async fn get_configuration(
    State(state): State<InvokeApiState>,
    Path(given): Path<String>,
    Query(query): Query<QualifierQuery>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        signed_body(
            &state,
            &method,
            &uri,
            &headers,
            body,
            0,
            "GetFunctionConfiguration",
        )
        .await?;
        let api = control(&state)?;
        Ok::<_, ApiError>(match find(&state, &api, &given).await? {
            Found::Api(record, revision) => {
                let version = version_of(
                    &state.region,
                    &record,
                    qualifier_of(&given, query.qualifier.as_deref()),
                )?;
                version_configuration(&state.region, &api, &record, revision, version)
            }
            Found::File(file, lambda) => {
                check_qualifier(&state.region, &given, query.qualifier.as_deref())?;
                file_configuration(&state.region, &file, &lambda)
            }
        })
    }
    .await;
    match result {
        Ok(answer) => axum::Json(answer).into_response(),
        Err(refusal) => refusal.into_response(),
    }
}

#[derive(Deserialize, Default)]
struct ListQuery {
    #[serde(rename = "Marker")]
    marker: Option<String>,
    #[serde(rename = "MaxItems")]
    max_items: Option<usize>,
}

async fn list_functions(
    State(state): State<InvokeApiState>,
    Query(query): Query<ListQuery>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        signed_body(&state, &method, &uri, &headers, body, 0, "ListFunctions").await?;
        let api = control(&state)?;
        let max_items = query.max_items.unwrap_or(50);
        if !(1..=10_000).contains(&max_items) {
            return Err(validation(
                &max_items.to_string(),
                "maxItems",
                "Member must have value less than or equal to 10000 and greater than or equal to 1",
            ));
        }
        let mut all: BTreeMap<String, Value> = BTreeMap::new();
        for (record, revision) in api.registry.list().await.map_err(registry_error)? {
            all.insert(
                record.function_name.clone(),
                configuration(&state.region, &api, &record, revision),
            );
        }
        // The file's names win.
        let files = api.file_functions.read().expect("api lock").clone();
        for lambda in api.file_lambdas.read().expect("api lock").iter() {
            let file = files.get(&lambda.0).cloned().unwrap_or_default();
            all.insert(lambda.0.clone(), file_configuration(&state.region, &file, lambda));
        }
        let page: Vec<(String, Value)> = all
            .into_iter()
            .filter(|(name, _)| query.marker.as_ref().is_none_or(|marker| name > marker))
            .take(max_items + 1)
            .collect();
        let more = page.len() > max_items;
        let page: Vec<(String, Value)> = page.into_iter().take(max_items).collect();
        let mut answer = json!({
            "Functions": page.iter().map(|(_, configuration)| configuration.clone()).collect::<Vec<_>>(),
        });
        if more && let Some((last, _)) = page.last() {
            answer["NextMarker"] = json!(last);
        }
        Ok::<_, ApiError>(answer)
    }
    .await;
    match result {
        Ok(answer) => axum::Json(answer).into_response(),
        Err(refusal) => refusal.into_response(),
    }
}

/// Reads the API function `given` for an update, refusing the file's.
async fn for_update(
    state: &InvokeApiState,
    api: &ApiFunctions,
    given: &str,
    revision_id: Option<&str>,
) -> Result<(FunctionRecord, u64), ApiError> {
    let name = checked_name(given)?;
    refuse_file_function(api, &name)?;
    let (record, revision) = api
        .registry
        .get(&name)
        .await
        .map_err(registry_error)?
        .ok_or_else(|| not_found(&state.region, &name))?;
    if let Some(expected) = revision_id
        && expected != record.revision_id
    {
        return Err(ApiError(
            StatusCode::PRECONDITION_FAILED,
            "PreconditionFailedException",
            "The Revision Id provided does not match the latest Revision Id. Call the GetFunction/GetAlias API to retrieve the latest Revision Id".to_owned(),
        ));
    }
    Ok((record, revision))
}

async fn update_code(
    State(state): State<InvokeApiState>,
    Path(given): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let body = signed_body(&state, &method, &uri, &headers, body, MAX_REQUEST_BYTES, "UpdateFunctionCode").await?;
        let api = control(&state)?;
        let input: UpdateCodeInput = parse_json(&body)?;
        unqualified(&given, "UpdateFunctionCode")?;
        let (mut record, revision) = for_update(&state, &api, &given, input.revision_id.as_deref()).await?;
        let code = CodeInput {
            zip_file: input.zip_file,
            s3_bucket: input.s3_bucket,
            image_uri: input.image_uri,
        };
        if input.dry_run {
            // The package checked as a real update would, nothing stored.
            let (_, package) = check_package(code).await?;
            record.code_sha256 = package.sha256;
            record.code_size = package.size;
            return Ok(configuration(&state.region, &api, &record, revision));
        }
        let package = store_code(&api, code).await?;
        record.code_sha256 = package.sha256;
        record.code_key = package.key;
        record.code_size = package.size;
        if !input.architectures.is_empty() {
            record.architectures = input.architectures;
        }
        record.last_modified = now_lambda();
        record.revision_id = uuid::Uuid::new_v4().to_string();
        let published = input.publish.then(|| publish_latest(&mut record, None));
        let revision_now = api.registry.update(&record, revision).await.map_err(registry_error)?;
        tracing::info!(function = %record.function_name, code_sha256 = %record.code_sha256, "function code updated through the lambda api");
        Ok::<_, ApiError>(version_configuration(&state.region, &api, &record, revision_now, published))
    }
    .await;
    match result {
        Ok(answer) => axum::Json(answer).into_response(),
        Err(refusal) => refusal.into_response(),
    }
}

async fn update_configuration(
    State(state): State<InvokeApiState>,
    Path(given): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let body = signed_body(&state, &method, &uri, &headers, body, 64 * 1024, "UpdateFunctionConfiguration").await?;
        let api = control(&state)?;
        let input: UpdateConfigurationInput = parse_json(&body)?;
        unqualified(&given, "UpdateFunctionConfiguration")?;
        let (mut record, revision) = for_update(&state, &api, &given, input.revision_id.as_deref()).await?;
        if let Some(runtime) = input.runtime {
            record.runtime = runtime;
        }
        if let Some(handler) = input.handler {
            record.handler = handler;
        }
        if let Some(role) = input.role {
            record.role = role;
        }
        if let Some(description) = input.description {
            record.description = description;
        }
        if let Some(timeout) = input.timeout {
            record.timeout = timeout;
        }
        if let Some(memory) = input.memory_size {
            record.memory_size = memory;
        }
        if let Some(environment) = input.environment {
            record.environment = environment.variables;
        }
        check_settings(&api, &record)?;
        record.last_modified = now_lambda();
        record.revision_id = uuid::Uuid::new_v4().to_string();
        let revision_now = api.registry.update(&record, revision).await.map_err(registry_error)?;
        tracing::info!(function = %record.function_name, "function configuration updated through the lambda api");
        Ok::<_, ApiError>(configuration(&state.region, &api, &record, revision_now))
    }
    .await;
    match result {
        Ok(answer) => axum::Json(answer).into_response(),
        Err(refusal) => refusal.into_response(),
    }
}

async fn delete_function(
    State(state): State<InvokeApiState>,
    Path(given): Path<String>,
    Query(query): Query<QualifierQuery>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        signed_body(&state, &method, &uri, &headers, body, 0, "DeleteFunction").await?;
        let api = control(&state)?;
        let (mut record, revision) = for_update(&state, &api, &given, None).await?;
        match qualifier_of(&given, query.qualifier.as_deref()) {
            Some("$LATEST") => {
                return Err(invalid(
                    "$LATEST version cannot be deleted without deleting the function.",
                ));
            }
            None => {
                api.registry
                    .delete(&record.function_name)
                    .await
                    .map_err(registry_error)?;
                tracing::info!(function = %record.function_name, "function deleted through the lambda api");
            }
            Some(qualifier) => {
                // One version: not while an alias routes to it.
                let number: u32 = qualifier.parse().map_err(|_| invalid(format!("Qualifier {qualifier} is not a version number: delete an alias with DeleteAlias")))?;
                if record.versions.remove(&number).is_none() {
                    return Err(ApiError(
                        StatusCode::NOT_FOUND,
                        "ResourceNotFoundException",
                        format!("Function not found: {}:{number}", function_arn(&state.region, &record.function_name)),
                    ));
                }
                if let Some((alias, _)) = record.aliases.iter().find(|(_, alias)| alias.function_version.parse::<u32>() == Ok(number)) {
                    return Err(ApiError(
                        StatusCode::CONFLICT,
                        "ResourceConflictException",
                        format!("Unable to delete version because the following aliases reference it: [{alias}]"),
                    ));
                }
                api.registry.update(&record, revision).await.map_err(registry_error)?;
                tracing::info!(function = %record.function_name, version = number, "function version deleted through the lambda api");
            }
        }
        Ok::<_, ApiError>(())
    }
    .await;
    match result {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(refusal) => refusal.into_response(),
    }
}

/// Runs `change` on the stored record of API function `given` and stores it (with
/// a new `RevisionId`).
async fn change_record(
    state: &InvokeApiState,
    api: &ApiFunctions,
    given: &str,
    revision_id: Option<&str>,
    change: impl FnOnce(&mut FunctionRecord) -> Result<(), ApiError>,
) -> Result<(FunctionRecord, u64), ApiError> {
    let (mut record, revision) = for_update(state, api, given, revision_id).await?;
    change(&mut record)?;
    record.revision_id = uuid::Uuid::new_v4().to_string();
    let revision_now = api
        .registry
        .update(&record, revision)
        .await
        .map_err(registry_error)?;
    Ok((record, revision_now))
}

/// A signed request with a small JSON body, and the control plane.
async fn small_request(
    state: &InvokeApiState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Body,
    operation: &str,
) -> Result<(Bytes, Arc<ApiFunctions>), ApiError> {
    let body = signed_body(state, method, uri, headers, body, 64 * 1024, operation).await?;
    Ok((body, control(state)?))
}

/// `Null` answers `204 No Content`.
fn respond(status: StatusCode, result: Result<Value, ApiError>) -> Response {
    match result {
        Ok(Value::Null) => StatusCode::NO_CONTENT.into_response(),
        Ok(answer) => (status, axum::Json(answer)).into_response(),
        Err(refusal) => refusal.into_response(),
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct PublishInput {
    code_sha256: Option<String>,
    description: Option<String>,
    revision_id: Option<String>,
}

/// Publishes `$LATEST` as a new version (or finds the last version, when it has
/// the same code and settings, as Lambda does): its number.
fn publish_latest(record: &mut FunctionRecord, description: Option<&str>) -> u32 {
    let mut latest = record.latest();
    if let Some(description) = description {
        latest.description = description.to_owned();
    }
    let same = |version: &crate::registry::VersionRecord| {
        version.code_sha256 == latest.code_sha256
            && version.runtime == latest.runtime
            && version.handler == latest.handler
            && version.memory_size == latest.memory_size
            && version.timeout == latest.timeout
            && version.environment == latest.environment
    };
    if let Some((number, _)) = record
        .versions
        .iter()
        .next_back()
        .filter(|(_, version)| same(version))
    {
        return *number;
    }
    record.last_version += 1;
    latest.last_modified = now_lambda();
    record.versions.insert(record.last_version, latest);
    record.last_version
}

/// Operations that change `$LATEST` take the function's name without a qualifier.
fn unqualified(given: &str, operation: &str) -> Result<(), ApiError> {
    match qualifier_of(given, None) {
        None | Some("$LATEST") => Ok(()),
        Some(qualifier) => Err(invalid(format!(
            "{operation} changes $LATEST: give the function's name without the qualifier `{qualifier}`"
        ))),
    }
}

async fn publish_version(
    State(state): State<InvokeApiState>,
    Path(given): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let (body, api) =
            small_request(&state, &method, &uri, &headers, body, "PublishVersion").await?;
        let input: PublishInput = if body.is_empty() {
            PublishInput::default()
        } else {
            parse_json(&body)?
        };
        let mut published = 0;
        let (record, revision) =
            change_record(&state, &api, &given, input.revision_id.as_deref(), |record| {
                if let Some(expected) = &input.code_sha256
                    && *expected != record.code_sha256
                {
                    return Err(invalid(format!(
                        "CodeSHA256 ({expected}) is different from current CodeSHA256 in $LATEST ({}). Please try again with the CodeSHA256 in $LATEST.",
                        record.code_sha256
                    )));
                }
                published = publish_latest(record, input.description.as_deref());
                Ok(())
            })
            .await?;
        tracing::info!(function = %record.function_name, version = published, "function version published through the lambda api");
        Ok(version_configuration(
            &state.region,
            &api,
            &record,
            revision,
            Some(published),
        ))
    }
    .await;
    respond(StatusCode::CREATED, result)
}

async fn list_versions(
    State(state): State<InvokeApiState>,
    Path(given): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let (_, api) = small_request(
            &state,
            &method,
            &uri,
            &headers,
            body,
            "ListVersionsByFunction",
        )
        .await?;
        match find(&state, &api, &given).await? {
            Found::Api(record, revision) => {
                let mut versions = vec![configuration(&state.region, &api, &record, revision)];
                versions.extend(record.versions.keys().map(|number| {
                    version_configuration(&state.region, &api, &record, revision, Some(*number))
                }));
                Ok(json!({ "Versions": versions }))
            }
            Found::File(file, lambda) => Ok(json!({
                "Versions": [file_configuration(&state.region, &file, &lambda)]
            })),
        }
    }
    .await;
    respond(StatusCode::OK, result)
}

fn alias_configuration(
    region: &str,
    function: &str,
    alias: &str,
    record: &crate::registry::AliasRecord,
) -> Value {
    json!({
        "AliasArn": format!("{}:{alias}", function_arn(region, function)),
        "Name": alias,
        "FunctionVersion": record.function_version,
        "Description": record.description,
        "RevisionId": record.revision_id,
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AliasInput {
    name: Option<String>,
    function_version: Option<String>,
    description: Option<String>,
    revision_id: Option<String>,
    routing_config: Option<Value>,
}

impl AliasInput {
    /// Weighted aliases (a canary's `AdditionalVersionWeights`) are refused rather
    /// than routed 100% to `FunctionVersion`.
    fn check_routing(&self) -> Result<(), ApiError> {
        let weighted = self.routing_config.as_ref().is_some_and(|routing| {
            routing["AdditionalVersionWeights"]
                .as_object()
                .is_some_and(|weights| !weights.is_empty())
        });
        if weighted {
            return Err(invalid(
                "RoutingConfig.AdditionalVersionWeights is not supported: an alias routes to one version here",
            ));
        }
        Ok(())
    }
}

/// An alias name as Lambda takes it: not only digits, 1 to 128 of `[a-zA-Z0-9-_]`.
fn check_alias_name(alias: &str) -> Result<(), ApiError> {
    let valid = !alias.is_empty()
        && alias.len() <= 128
        && !alias.bytes().all(|byte| byte.is_ascii_digit())
        && alias.chars().all(|character| {
            character.is_ascii_alphanumeric() || character == '-' || character == '_'
        });
    if valid {
        Ok(())
    } else {
        Err(validation(
            alias,
            "name",
            "Member must satisfy regular expression pattern: (?!^[0-9]+$)([a-zA-Z0-9-_]+)",
        ))
    }
}

/// An alias may route to `$LATEST` or a published version.
fn check_target(region: &str, record: &FunctionRecord, version: &str) -> Result<(), ApiError> {
    if version == "$LATEST" {
        return Ok(());
    }
    match version.parse::<u32>() {
        Ok(number) if record.versions.contains_key(&number) => Ok(()),
        _ => Err(ApiError(
            StatusCode::NOT_FOUND,
            "ResourceNotFoundException",
            format!(
                "Function not found: {}:{version}",
                function_arn(region, &record.function_name)
            ),
        )),
    }
}

fn alias_not_found(region: &str, function: &str, alias: &str) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        "ResourceNotFoundException",
        format!(
            "Alias not found: {}:{alias}",
            function_arn(region, function)
        ),
    )
}

async fn create_alias(
    State(state): State<InvokeApiState>,
    Path(given): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let (body, api) =
            small_request(&state, &method, &uri, &headers, body, "CreateAlias").await?;
        let input: AliasInput = parse_json(&body)?;
        input.check_routing()?;
        let alias = input
            .name
            .clone()
            .ok_or_else(|| invalid("Name is required"))?;
        check_alias_name(&alias)?;
        let version = input
            .function_version
            .clone()
            .ok_or_else(|| invalid("FunctionVersion is required"))?;
        let region = state.region.clone();
        let (record, _) = change_record(&state, &api, &given, None, |record| {
            if record.aliases.contains_key(&alias) {
                return Err(ApiError(
                    StatusCode::CONFLICT,
                    "ResourceConflictException",
                    format!(
                        "Alias already exists: {}:{alias}",
                        function_arn(&region, &record.function_name)
                    ),
                ));
            }
            check_target(&region, record, &version)?;
            record.aliases.insert(
                alias.clone(),
                crate::registry::AliasRecord {
                    function_version: version.clone(),
                    description: input.description.clone().unwrap_or_default(),
                    revision_id: uuid::Uuid::new_v4().to_string(),
                },
            );
            Ok(())
        })
        .await?;
        tracing::info!(function = %record.function_name, %alias, %version, "alias created through the lambda api");
        Ok(alias_configuration(
            &state.region,
            &record.function_name,
            &alias,
            &record.aliases[&alias],
        ))
    }
    .await;
    respond(StatusCode::CREATED, result)
}

async fn update_alias(
    State(state): State<InvokeApiState>,
    Path((given, alias)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let (body, api) =
            small_request(&state, &method, &uri, &headers, body, "UpdateAlias").await?;
        let input: AliasInput = parse_json(&body)?;
        input.check_routing()?;
        let region = state.region.clone();
        let (record, _) = change_record(&state, &api, &given, None, |record| {
            let name = record.function_name.clone();
            if let Some(version) = &input.function_version {
                check_target(&region, record, version)?;
            }
            let target = record
                .aliases
                .get_mut(&alias)
                .ok_or_else(|| alias_not_found(&region, &name, &alias))?;
            if let Some(expected) = &input.revision_id
                && *expected != target.revision_id
            {
                return Err(ApiError(
                    StatusCode::PRECONDITION_FAILED,
                    "PreconditionFailedException",
                    "The Revision Id provided does not match the latest Revision Id. Call the GetFunction/GetAlias API to retrieve the latest Revision Id".to_owned(),
                ));
            }
            if let Some(version) = &input.function_version {
                target.function_version = version.clone();
            }
            if let Some(description) = &input.description {
                target.description = description.clone();
            }
            target.revision_id = uuid::Uuid::new_v4().to_string();
            Ok(())
        })
        .await?;
        Ok(alias_configuration(
            &state.region,
            &record.function_name,
            &alias,
            &record.aliases[&alias],
        ))
    }
    .await;
    respond(StatusCode::OK, result)
}

async fn get_alias(
    State(state): State<InvokeApiState>,
    Path((given, alias)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let (_, api) = small_request(&state, &method, &uri, &headers, body, "GetAlias").await?;
        let Found::Api(record, _) = find(&state, &api, &given).await? else {
            return Err(alias_not_found(
                &state.region,
                function_name(&given),
                &alias,
            ));
        };
        let target = record
            .aliases
            .get(&alias)
            .ok_or_else(|| alias_not_found(&state.region, &record.function_name, &alias))?;
        Ok(alias_configuration(
            &state.region,
            &record.function_name,
            &alias,
            target,
        ))
    }
    .await;
    respond(StatusCode::OK, result)
}

async fn list_aliases(
    State(state): State<InvokeApiState>,
    Path(given): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let (_, api) = small_request(&state, &method, &uri, &headers, body, "ListAliases").await?;
        let aliases: Vec<Value> = match find(&state, &api, &given).await? {
            Found::Api(record, _) => record
                .aliases
                .iter()
                .map(|(alias, target)| {
                    alias_configuration(&state.region, &record.function_name, alias, target)
                })
                .collect(),
            Found::File(..) => Vec::new(),
        };
        Ok(json!({ "Aliases": aliases }))
    }
    .await;
    respond(StatusCode::OK, result)
}

async fn delete_alias(
    State(state): State<InvokeApiState>,
    Path((given, alias)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let (_, api) = small_request(&state, &method, &uri, &headers, body, "DeleteAlias").await?;
        change_record(&state, &api, &given, None, |record| {
            // Deleting an alias that is not there succeeds, as Lambda's does.
            record.aliases.remove(&alias);
            Ok(())
        })
        .await?;
        Ok(Value::Null)
    }
    .await;
    respond(StatusCode::NO_CONTENT, result)
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ConcurrencyInput {
    reserved_concurrent_executions: Option<i64>,
}

async fn put_concurrency(
    State(state): State<InvokeApiState>,
    Path(given): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let (body, api) =
            small_request(&state, &method, &uri, &headers, body, "PutFunctionConcurrency").await?;
        let input: ConcurrencyInput = parse_json(&body)?;
        let reserved = input
            .reserved_concurrent_executions
            .ok_or_else(|| invalid("ReservedConcurrentExecutions is required"))?;
        if reserved < 0 {
            return Err(validation(
                &reserved.to_string(),
                "reservedConcurrentExecutions",
                "Member must have value greater than or equal to 0",
            ));
        }
        if reserved == 0 {
            return Err(invalid(
                "ReservedConcurrentExecutions = 0 (throttle every invocation) is not supported by Switchyard: delete the function or its triggers instead",
            ));
        }
        let reserved = u32::try_from(reserved)
            .map_err(|_| invalid("ReservedConcurrentExecutions is too large"))?;
        change_record(&state, &api, &given, None, |record| {
            record.reserved_concurrency = Some(reserved);
            Ok(())
        })
        .await?;
        Ok(json!({ "ReservedConcurrentExecutions": reserved }))
    }
    .await;
    respond(StatusCode::OK, result)
}

async fn delete_concurrency(
    State(state): State<InvokeApiState>,
    Path(given): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let (_, api) = small_request(
            &state,
            &method,
            &uri,
            &headers,
            body,
            "DeleteFunctionConcurrency",
        )
        .await?;
        change_record(&state, &api, &given, None, |record| {
            record.reserved_concurrency = None;
            Ok(())
        })
        .await?;
        Ok(Value::Null)
    }
    .await;
    respond(StatusCode::NO_CONTENT, result)
}

async fn get_concurrency(
    State(state): State<InvokeApiState>,
    Path(given): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let (_, api) = small_request(
            &state,
            &method,
            &uri,
            &headers,
            body,
            "GetFunctionConcurrency",
        )
        .await?;
        Ok(match find(&state, &api, &given).await? {
            Found::Api(record, _) => match record.reserved_concurrency {
                Some(reserved) => json!({ "ReservedConcurrentExecutions": reserved }),
                None => json!({}),
            },
            Found::File(..) => json!({}),
        })
    }
    .await;
    respond(StatusCode::OK, result)
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct UrlConfigInput {
    auth_type: Option<String>,
    cors: Option<crate::registry::UrlCors>,
    invoke_mode: Option<String>,
}

/// Function URLs are of `$LATEST` here: a qualifier is refused.
fn url_qualifier(uri: &Uri) -> Result<(), ApiError> {
    let qualifier =
        axum::extract::Query::<std::collections::HashMap<String, String>>::try_from_uri(uri)
            .ok()
            .and_then(|query| query.0.get("Qualifier").cloned());
    match qualifier.as_deref() {
        None | Some("$LATEST") => Ok(()),
        Some(other) => Err(invalid(format!(
            "switchyard serves function URLs of $LATEST only, not of `{other}`"
        ))),
    }
}

fn check_url_input(input: &UrlConfigInput) -> Result<(), ApiError> {
    if let Some(auth_type) = &input.auth_type
        && auth_type != "AWS_IAM"
        && auth_type != "NONE"
    {
        return Err(invalid(format!(
            "1 validation error detected: Value '{auth_type}' at 'authType' failed to satisfy constraint: Member must satisfy enum value set: [AWS_IAM, NONE]"
        )));
    }
    if let Some(mode) = &input.invoke_mode
        && mode != "BUFFERED"
    {
        return Err(invalid(format!(
            "switchyard answers function URLs BUFFERED only, not `{mode}`"
        )));
    }
    if let Some(cors) = &input.cors {
        for method in cors.allow_methods.iter().flatten() {
            if method != "*" && Method::from_bytes(method.as_bytes()).is_err() {
                return Err(invalid(format!(
                    "Cors.AllowMethods: `{method}` is not an HTTP method"
                )));
            }
        }
        if cors.max_age.is_some_and(|age| age > 86_400) {
            return Err(invalid("Cors.MaxAge must be at most 86400"));
        }
        let config = cors.to_config();
        let wildcard = [
            &config.allow_origins,
            &config.allow_headers,
            &config.allow_methods,
            &config.expose_headers,
        ]
        .iter()
        .any(|values| values.iter().any(|value| value == "*"));
        if config.allow_credentials && wildcard {
            return Err(invalid(
                "Cors.AllowCredentials cannot go with `*` in AllowOrigins, AllowHeaders, AllowMethods or ExposeHeaders (browsers refuse it): list them",
            ));
        }
        for origin in &config.allow_origins {
            if origin != "*" && axum::http::HeaderValue::from_str(origin).is_err() {
                return Err(invalid(format!(
                    "Cors.AllowOrigins: `{origin}` is not a valid origin"
                )));
            }
        }
        for name in config.allow_headers.iter().chain(&config.expose_headers) {
            if name != "*" && axum::http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(invalid(format!(
                    "Cors: `{name}` is not a valid header name"
                )));
            }
        }
    }
    Ok(())
}

/// The URL a function answers at: `<scheme>://<host this request came to>/lambda-url/<name>/`.
pub(crate) fn function_url(headers: &HeaderMap, https: bool, name: &str) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("localhost");
    let scheme = if https { "https" } else { "http" };
    format!("{scheme}://{host}/lambda-url/{name}/")
}

fn url_configuration(
    state: &InvokeApiState,
    headers: &HeaderMap,
    name: &str,
    config: &crate::registry::UrlConfigRecord,
) -> Value {
    let mut answer = json!({
        "FunctionUrl": function_url(headers, state.https, name),
        "FunctionArn": function_arn(&state.region, name),
        "AuthType": config.auth_type,
        "CreationTime": config.creation_time,
        "LastModifiedTime": config.last_modified_time,
        "InvokeMode": "BUFFERED",
    });
    if let Some(cors) = &config.cors {
        answer["Cors"] = serde_json::to_value(cors).expect("json");
    }
    answer
}

fn url_not_found(region: &str, name: &str) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        "ResourceNotFoundException",
        format!(
            "The resource you requested does not exist. (Service: Lambda, function URL of {})",
            function_arn(region, name)
        ),
    )
}

async fn create_url_config(
    State(state): State<InvokeApiState>,
    Path(given): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let (body, api) = small_request(
            &state,
            &method,
            &uri,
            &headers,
            body,
            "CreateFunctionUrlConfig",
        )
        .await?;
        url_qualifier(&uri)?;
        let input: UrlConfigInput = parse_json(&body)?;
        check_url_input(&input)?;
        let auth_type = input
            .auth_type
            .clone()
            .ok_or_else(|| invalid("AuthType is required"))?;
        let region = state.region.clone();
        let (record, _) = change_record(&state, &api, &given, None, |record| {
            if record.url_config.is_some() {
                return Err(ApiError(
                    StatusCode::CONFLICT,
                    "ResourceConflictException",
                    format!(
                        "Failed to create function url config for [functionArn = {}]. Error message:  FunctionUrlConfig exists for this Lambda function",
                        function_arn(&region, &record.function_name)
                    ),
                ));
            }
            let now = now_lambda();
            record.url_config = Some(crate::registry::UrlConfigRecord {
                auth_type: auth_type.clone(),
                cors: input.cors.clone(),
                creation_time: now.clone(),
                last_modified_time: now,
            });
            Ok(())
        })
        .await?;
        tracing::info!(function = %record.function_name, %auth_type, "function url created through the lambda api");
        let config = record.url_config.as_ref().expect("just set");
        let mut answer = url_configuration(&state, &headers, &record.function_name, config);
        if let Value::Object(fields) = &mut answer {
            fields.remove("LastModifiedTime");
        }
        Ok(answer)
    }
    .await;
    respond(StatusCode::CREATED, result)
}

async fn get_url_config(
    State(state): State<InvokeApiState>,
    Path(given): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let (_, api) = small_request(
            &state,
            &method,
            &uri,
            &headers,
            body,
            "GetFunctionUrlConfig",
        )
        .await?;
        url_qualifier(&uri)?;
        let Found::Api(record, _) = find(&state, &api, &given).await? else {
            return Err(url_not_found(&state.region, function_name(&given)));
        };
        let config = record
            .url_config
            .as_ref()
            .ok_or_else(|| url_not_found(&state.region, &record.function_name))?;
        Ok(url_configuration(
            &state,
            &headers,
            &record.function_name,
            config,
        ))
    }
    .await;
    respond(StatusCode::OK, result)
}

async fn update_url_config(
    State(state): State<InvokeApiState>,
    Path(given): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let (body, api) = small_request(
            &state,
            &method,
            &uri,
            &headers,
            body,
            "UpdateFunctionUrlConfig",
        )
        .await?;
        url_qualifier(&uri)?;
        let input: UrlConfigInput = parse_json(&body)?;
        check_url_input(&input)?;
        let region = state.region.clone();
        let (record, _) = change_record(&state, &api, &given, None, |record| {
            let name = record.function_name.clone();
            let config = record
                .url_config
                .as_mut()
                .ok_or_else(|| url_not_found(&region, &name))?;
            if let Some(auth_type) = &input.auth_type {
                config.auth_type = auth_type.clone();
            }
            if let Some(cors) = &input.cors {
                config.cors = Some(cors.clone());
            }
            config.last_modified_time = now_lambda();
            Ok(())
        })
        .await?;
        let config = record.url_config.as_ref().expect("checked");
        Ok(url_configuration(
            &state,
            &headers,
            &record.function_name,
            config,
        ))
    }
    .await;
    respond(StatusCode::OK, result)
}

async fn delete_url_config(
    State(state): State<InvokeApiState>,
    Path(given): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let (_, api) = small_request(
            &state,
            &method,
            &uri,
            &headers,
            body,
            "DeleteFunctionUrlConfig",
        )
        .await?;
        url_qualifier(&uri)?;
        let region = state.region.clone();
        change_record(&state, &api, &given, None, |record| {
            if record.url_config.take().is_none() {
                return Err(url_not_found(&region, &record.function_name));
            }
            Ok(())
        })
        .await?;
        Ok(Value::Null)
    }
    .await;
    respond(StatusCode::NO_CONTENT, result)
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct MappingInput {
    function_name: Option<String>,
    event_source_arn: Option<String>,
    self_managed_event_source: Option<SelfManagedSource>,
    topics: Option<Vec<String>>,
    starting_position: Option<String>,
    starting_position_timestamp: Option<Value>,
    batch_size: Option<i64>,
    maximum_batching_window_in_seconds: Option<i64>,
    enabled: Option<bool>,
    self_managed_kafka_event_source_config: Option<KafkaSourceConfigInput>,
    source_access_configurations: Option<Vec<Value>>,
    filter_criteria: Option<Value>,
    destination_config: Option<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SelfManagedSource {
    endpoints: Option<BTreeMap<String, Vec<String>>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct KafkaSourceConfigInput {
    consumer_group_id: Option<String>,
}

/// How Lambda answers a mapping (`state`: `Creating`, `Enabled`, `Disabled`, ...).
fn mapping_configuration(
    region: &str,
    function: &str,
    uuid: &str,
    mapping: &crate::registry::MappingRecord,
    state: &str,
) -> Value {
    json!({
        "UUID": uuid,
        "FunctionArn": function_arn(region, function),
        "SelfManagedEventSource": { "Endpoints": { "KAFKA_BOOTSTRAP_SERVERS": mapping.bootstrap_servers } },
        "Topics": [mapping.topic],
        "StartingPosition": mapping.starting_position,
        "BatchSize": mapping.batch_size,
        "MaximumBatchingWindowInSeconds": mapping.maximum_batching_window_in_seconds.unwrap_or(0),
        "SelfManagedKafkaEventSourceConfig": { "ConsumerGroupId": mapping.consumer_group_id },
        "State": state,
        "StateTransitionReason": "USER_INITIATED",
        "LastModified": mapping.last_modified,
        "LastProcessingResult": "No records processed",
    })
}

fn mapping_state(mapping: &crate::registry::MappingRecord) -> &'static str {
    if mapping.enabled {
        "Enabled"
    } else {
        "Disabled"
    }
}

fn mapping_not_found(uuid: &str) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        "ResourceNotFoundException",
        format!(
            "The resource you requested does not exist. (Service: Lambda, event source mapping {uuid})"
        ),
    )
}

fn epoch_seconds() -> f64 {
    let now = time::OffsetDateTime::now_utc();
    (now.unix_timestamp_nanos() / 1_000_000) as f64 / 1000.0
}

fn check_batching(batch_size: Option<i64>, window: Option<i64>) -> Result<(), ApiError> {
    if let Some(size) = batch_size
        && !(1..=10_000).contains(&size)
    {
        return Err(invalid(format!(
            "1 validation error detected: Value '{size}' at 'batchSize' failed to satisfy constraint: Member must have value between 1 and 10000"
        )));
    }
    if let Some(window) = window
        && !(0..=300).contains(&window)
    {
        return Err(invalid(format!(
            "1 validation error detected: Value '{window}' at 'maximumBatchingWindowInSeconds' failed to satisfy constraint: Member must have value between 0 and 300"
        )));
    }
    Ok(())
}

/// Every mapping of every API function: (function, uuid, mapping).
async fn all_mappings(
    api: &ApiFunctions,
) -> Result<Vec<(String, String, crate::registry::MappingRecord)>, ApiError> {
    let records = api.registry.list().await.map_err(registry_error)?;
    Ok(records
        .into_iter()
        .flat_map(|(record, _)| {
            let function = record.function_name.clone();
            record
                .event_source_mappings
                .into_iter()
                .map(move |(uuid, mapping)| (function.clone(), uuid, mapping))
        })
        .collect())
}

/// The mapping `uuid`: its function, UUID and record; `404` when there is none.
async fn find_mapping(
    api: &ApiFunctions,
    uuid: &str,
) -> Result<(String, String, crate::registry::MappingRecord), ApiError> {
    all_mappings(api)
        .await?
        .into_iter()
        .find(|(_, id, _)| id == uuid)
        .ok_or_else(|| mapping_not_found(uuid))
}

async fn create_mapping(
    State(state): State<InvokeApiState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let (body, api) = small_request(
            &state,
            &method,
            &uri,
            &headers,
            body,
            "CreateEventSourceMapping",
        )
        .await?;
        let input: MappingInput = parse_json(&body)?;
        if !cfg!(feature = "kafka") {
            return Err(invalid(
                "this build of switchyard has no Kafka support (the `kafka` feature): event source mappings cannot run",
            ));
        }
        let given = input
            .function_name
            .clone()
            .ok_or_else(|| invalid("FunctionName is required"))?;
        if qualifier_of(&given, None).is_some_and(|qualifier| qualifier != "$LATEST") {
            return Err(invalid(
                "switchyard maps event sources to $LATEST only: give the function's name without a qualifier",
            ));
        }
        if input.event_source_arn.is_some() {
            return Err(invalid(
                "switchyard maps self-managed Kafka (SelfManagedEventSource) only; NATS, object-store and webhook events reach functions through [[sources]] and [[triggers]] in the configuration file (see CONFIG.md)",
            ));
        }
        if input
            .source_access_configurations
            .as_ref()
            .is_some_and(|list| !list.is_empty())
        {
            return Err(invalid(
                "SourceAccessConfigurations (Secrets Manager, VPC) are not available here: define a kafka source with its `properties` (SASL, TLS) in the configuration file",
            ));
        }
        if input
            .filter_criteria
            .as_ref()
            .is_some_and(|criteria| criteria["Filters"].as_array().is_some_and(|filters| !filters.is_empty()))
        {
            return Err(invalid(
                "FilterCriteria is not supported for event source mappings yet: use a trigger's `filter` in the configuration file",
            ));
        }
        if input.destination_config.is_some() {
            return Err(invalid(
                "DestinationConfig is not supported for event source mappings yet: use a trigger's `on_failure` in the configuration file",
            ));
        }
        let servers = input
            .self_managed_event_source
            .as_ref()
            .and_then(|source| source.endpoints.as_ref())
            .and_then(|endpoints| endpoints.get("KAFKA_BOOTSTRAP_SERVERS"))
            .cloned()
            .unwrap_or_default();
        if servers.is_empty() {
            return Err(invalid(
                "SelfManagedEventSource.Endpoints.KAFKA_BOOTSTRAP_SERVERS is required",
            ));
        }
        for server in &servers {
            let valid = server
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
                && !server.contains([',', ' ']);
            if !valid {
                return Err(invalid(format!(
                    "KAFKA_BOOTSTRAP_SERVERS: `{server}` is not host:port"
                )));
            }
        }
        let topics = input.topics.clone().unwrap_or_default();
        let [topic] = &topics[..] else {
            return Err(invalid("Topics must name exactly one topic"));
        };
        if topic.is_empty()
            || topic.len() > 249
            || !topic
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'))
        {
            return Err(invalid(format!(
                "Topics: `{topic}` is not a Kafka topic name (1-249 of letters, digits, `.`, `_` and `-`)"
            )));
        }
        let starting_position = input
            .starting_position
            .clone()
            .ok_or_else(|| invalid("StartingPosition is required for a Kafka event source"))?;
        if starting_position != "TRIM_HORIZON" && starting_position != "LATEST" {
            return Err(invalid(format!(
                "StartingPosition `{starting_position}`: TRIM_HORIZON or LATEST (AT_TIMESTAMP is not supported for Kafka)"
            )));
        }
        if input.starting_position_timestamp.is_some() {
            return Err(invalid("StartingPositionTimestamp is not supported for Kafka"));
        }
        check_batching(input.batch_size, input.maximum_batching_window_in_seconds)?;
        let uuid = uuid::Uuid::new_v4().to_string();
        let group = input
            .self_managed_kafka_event_source_config
            .as_ref()
            .and_then(|config| config.consumer_group_id.clone())
            .unwrap_or_else(|| uuid.clone());
        if group.is_empty() || group.len() > 200 {
            return Err(invalid("ConsumerGroupId must be 1 to 200 characters"));
        }
        let mapping = crate::registry::MappingRecord {
            bootstrap_servers: servers,
            topic: topic.clone(),
            starting_position,
            batch_size: input.batch_size.unwrap_or(100) as u32,
            maximum_batching_window_in_seconds: input
                .maximum_batching_window_in_seconds
                .map(|seconds| seconds as u32),
            enabled: input.enabled.unwrap_or(true),
            consumer_group_id: group,
            last_modified: epoch_seconds(),
        };
        let region = state.region.clone();
        let (record, _) = change_record(&state, &api, &given, None, |record| {
            if let Some((existing, _)) = record.event_source_mappings.iter().find(|(_, other)| {
                other.topic == mapping.topic && other.bootstrap_servers == mapping.bootstrap_servers
            }) {
                return Err(ApiError(
                    StatusCode::CONFLICT,
                    "ResourceConflictException",
                    format!(
                        "An event source mapping with event source ({}), function ({}) and topics ({}) already exists. Please update or delete the existing mapping with UUID {existing}",
                        mapping.bootstrap_servers.join(","),
                        function_arn(&region, &record.function_name),
                        mapping.topic
                    ),
                ));
            }
            record
                .event_source_mappings
                .insert(uuid.clone(), mapping.clone());
            Ok(())
        })
        .await?;
        tracing::info!(function = %record.function_name, %uuid, topic = %mapping.topic, "event source mapping created through the lambda api");
        let state_word = if mapping.enabled { "Creating" } else { "Disabled" };
        Ok(mapping_configuration(
            &state.region,
            &record.function_name,
            &uuid,
            &mapping,
            state_word,
        ))
    }
    .await;
    respond(StatusCode::ACCEPTED, result)
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct MappingListQuery {
    function_name: Option<String>,
    event_source_arn: Option<String>,
    marker: Option<String>,
    max_items: Option<usize>,
}

async fn list_mappings(
    State(state): State<InvokeApiState>,
    Query(query): Query<MappingListQuery>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let (_, api) = small_request(
            &state,
            &method,
            &uri,
            &headers,
            body,
            "ListEventSourceMappings",
        )
        .await?;
        let mut mappings = all_mappings(&api).await?;
        if query.event_source_arn.is_some() {
            // No ARN-named sources here: nothing matches.
            mappings.clear();
        }
        if let Some(given) = &query.function_name {
            let name = function_name(given);
            mappings.retain(|(function, _, _)| function == name);
        }
        mappings.sort_by(|a, b| a.1.cmp(&b.1));
        let start = query.marker.as_ref().map_or(0, |marker| {
            mappings.partition_point(|(_, uuid, _)| uuid <= marker)
        });
        let size = query.max_items.unwrap_or(100).clamp(1, 10_000);
        let page: Vec<Value> = mappings[start..]
            .iter()
            .take(size)
            .map(|(function, uuid, mapping)| {
                mapping_configuration(
                    &state.region,
                    function,
                    uuid,
                    mapping,
                    mapping_state(mapping),
                )
            })
            .collect();
        let mut answer = json!({ "EventSourceMappings": page });
        if start + size < mappings.len() {
            answer["NextMarker"] = Value::from(mappings[start + size - 1].1.clone());
        }
        Ok(answer)
    }
    .await;
    respond(StatusCode::OK, result)
}

async fn get_mapping(
    State(state): State<InvokeApiState>,
    Path(uuid): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let (_, api) = small_request(
            &state,
            &method,
            &uri,
            &headers,
            body,
            "GetEventSourceMapping",
        )
        .await?;
        let (function, uuid, mapping) = find_mapping(&api, &uuid).await?;
        Ok(mapping_configuration(
            &state.region,
            &function,
            &uuid,
            &mapping,
            mapping_state(&mapping),
        ))
    }
    .await;
    respond(StatusCode::OK, result)
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct MappingUpdate {
    function_name: Option<String>,
    enabled: Option<bool>,
    batch_size: Option<i64>,
    maximum_batching_window_in_seconds: Option<i64>,
    filter_criteria: Option<Value>,
    destination_config: Option<Value>,
    source_access_configurations: Option<Vec<Value>>,
}

async fn update_mapping(
    State(state): State<InvokeApiState>,
    Path(uuid): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let (body, api) = small_request(
            &state,
            &method,
            &uri,
            &headers,
            body,
            "UpdateEventSourceMapping",
        )
        .await?;
        let input: MappingUpdate = parse_json(&body)?;
        check_batching(input.batch_size, input.maximum_batching_window_in_seconds)?;
        if input.filter_criteria.is_some()
            || input.destination_config.is_some()
            || input.source_access_configurations.is_some()
        {
            return Err(invalid(
                "FilterCriteria, DestinationConfig and SourceAccessConfigurations are not supported for event source mappings yet",
            ));
        }
        let (function, _, _) = find_mapping(&api, &uuid).await?;
        if let Some(target) = &input.function_name
            && function_name(target) != function
        {
            return Err(invalid(
                "moving a mapping to another function is not supported: delete it and create one for that function",
            ));
        }
        let (record, _) = change_record(&state, &api, &function, None, |record| {
            let mapping = record
                .event_source_mappings
                .get_mut(&uuid)
                .ok_or_else(|| mapping_not_found(&uuid))?;
            if let Some(enabled) = input.enabled {
                mapping.enabled = enabled;
            }
            if let Some(size) = input.batch_size {
                mapping.batch_size = size as u32;
            }
            if let Some(window) = input.maximum_batching_window_in_seconds {
                mapping.maximum_batching_window_in_seconds = Some(window as u32);
            }
            mapping.last_modified = epoch_seconds();
            Ok(())
        })
        .await?;
        let mapping = &record.event_source_mappings[&uuid];
        let state_word = match input.enabled {
            Some(true) => "Enabling",
            Some(false) => "Disabling",
            None => "Updating",
        };
        tracing::info!(function = %record.function_name, %uuid, enabled = mapping.enabled, "event source mapping updated through the lambda api");
        Ok(mapping_configuration(
            &state.region,
            &record.function_name,
            &uuid,
            mapping,
            state_word,
        ))
    }
    .await;
    respond(StatusCode::ACCEPTED, result)
}

async fn delete_mapping(
    State(state): State<InvokeApiState>,
    Path(uuid): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let (_, api) = small_request(
            &state,
            &method,
            &uri,
            &headers,
            body,
            "DeleteEventSourceMapping",
        )
        .await?;
        let (function, _, mapping) = find_mapping(&api, &uuid).await?;
        change_record(&state, &api, &function, None, |record| {
            record
                .event_source_mappings
                .remove(&uuid)
                .map(|_| ())
                .ok_or_else(|| mapping_not_found(&uuid))
        })
        .await?;
        tracing::info!(%function, %uuid, "event source mapping deleted through the lambda api");
        Ok(mapping_configuration(
            &state.region,
            &function,
            &uuid,
            &mapping,
            "Deleting",
        ))
    }
    .await;
    respond(StatusCode::ACCEPTED, result)
}
