//! `switchyard deploy`: zips a directory and creates or updates the function through
//! the Lambda control plane of a running process (its `[invoke_api]` listener), then
//! waits until the function is active with the new code, as `aws lambda
//! create-function` / `update-function-code` followed by `aws lambda wait
//! function-active-v2` / `function-updated-v2` do. Requests are signed (SigV4, by
//! AWS's own signer) when credentials are known.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use serde_json::{Value, json};

/// A client of a Switchyard Lambda API, signing when it has credentials.
pub struct LambdaClient {
    client: reqwest::Client,
    base: String,
    region: String,
    credentials: Option<(String, String)>,
}

impl LambdaClient {
    /// `base`: `http(s)://host:port`.
    pub fn new(base: String, region: String, credentials: Option<(String, String)>) -> Self {
        LambdaClient {
            client: reqwest::Client::new(),
            base: base.trim_end_matches('/').to_owned(),
            region,
            credentials,
        }
    }

    /// Sends a request (signed when credentials are known): status and body.
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> anyhow::Result<(reqwest::StatusCode, reqwest::header::HeaderMap, Vec<u8>)> {
        let url = format!("{}{path}", self.base);
        let mut request = self.client.request(method.clone(), &url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some((access_key, secret)) = &self.credentials {
            use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
            let identity: aws_smithy_runtime_api::client::identity::Identity =
                aws_credential_types::Credentials::new(
                    access_key.as_str(),
                    secret.as_str(),
                    None,
                    None,
                    "switchyard",
                )
                .into();
            let params = aws_sigv4::sign::v4::SigningParams::builder()
                .identity(&identity)
                .region(&self.region)
                .name("lambda")
                .time(SystemTime::now())
                .settings(SigningSettings::default())
                .build()
                .context("signing parameters")?
                .into();
            let signable = SignableRequest::new(
                method.as_str(),
                &url,
                headers.iter().copied(),
                SignableBody::Bytes(&body),
            )
            .context("signing the request")?;
            let (instructions, _) = sign(signable, &params)
                .context("signing the request")?
                .into_parts();
            for (name, value) in instructions.headers() {
                request = request.header(name, value);
            }
        }
        let response = request
            .body(body)
            .send()
            .await
            .with_context(|| format!("calling {url}"))?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.bytes().await?.to_vec();
        Ok((status, headers, body))
    }

    /// A control-plane call with a JSON body (or none): status and JSON answer.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(reqwest::StatusCode, Value)> {
        let bytes = body
            .map(|body| body.to_string().into_bytes())
            .unwrap_or_default();
        let headers: &[(&str, &str)] = if body.is_some() {
            &[("content-type", "application/json")]
        } else {
            &[]
        };
        let (status, _, answer) = self.send(method, path, headers, bytes).await?;
        let answer = if answer.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&answer)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&answer).into_owned()))
        };
        Ok((status, answer))
    }
}

/// What `switchyard deploy` was asked.
pub struct Deploy {
    pub directory: PathBuf,
    pub function: String,
    pub runtime: Option<String>,
    pub handler: Option<String>,
    pub memory: Option<u32>,
    pub timeout: Option<u32>,
    pub description: Option<String>,
    pub environment: Vec<(String, String)>,
    /// How long to wait for the function to be active with the new code.
    pub wait: Duration,
}

/// Zips `directory` as Lambda expects a package: paths relative to it, file modes
/// kept (executables stay executable), entries sorted and dated 1980-01-01 so the
/// same files give the same CodeSha256. Symbolic links are refused.
pub fn zip_directory(directory: &Path) -> anyhow::Result<Vec<u8>> {
    fn walk(root: &Path, directory: &Path, files: &mut Vec<PathBuf>) -> anyhow::Result<()> {
        let mut entries: Vec<_> = std::fs::read_dir(directory)
            .with_context(|| format!("reading {}", directory.display()))?
            .collect::<Result<_, _>>()?;
        entries.sort_by_key(|entry| entry.file_name());
        for entry in entries {
            let path = entry.path();
            let kind = entry.file_type()?;
            if kind.is_symlink() {
                bail!(
                    "{} is a symbolic link: copy what it points to into the directory",
                    path.display()
                );
            } else if kind.is_dir() {
                walk(root, &path, files)?;
            } else if kind.is_file() {
                files.push(path.strip_prefix(root).expect("under root").to_path_buf());
            }
        }
        Ok(())
    }
    if !directory.is_dir() {
        bail!("{} is not a directory", directory.display());
    }
    let mut files = Vec::new();
    walk(directory, directory, &mut files)?;
    if files.is_empty() {
        bail!("{} holds no files", directory.display());
    }
    let mut buffer = std::io::Cursor::new(Vec::new());
    let mut writer = zip::ZipWriter::new(&mut buffer);
    for relative in files {
        let path = directory.join(&relative);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .unix_permissions(mode)
            .last_modified_time(zip::DateTime::default());
        let name = relative
            .to_str()
            .with_context(|| format!("{} is not UTF-8", relative.display()))?;
        writer.start_file(name, options)?;
        writer.write_all(
            &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
        )?;
    }
    writer.finish()?;
    Ok(buffer.into_inner())
}

fn failure(status: reqwest::StatusCode, answer: &Value) -> anyhow::Error {
    let message = answer["message"]
        .as_str()
        .or(answer["Message"].as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| answer.to_string());
    anyhow::anyhow!("{status}: {message}")
}

/// Creates or updates the function and waits until it runs the new code: the
/// function's configuration as GetFunctionConfiguration answers it then.
pub async fn deploy(client: &LambdaClient, deploy: &Deploy) -> anyhow::Result<Value> {
    let zip = zip_directory(&deploy.directory)?;
    let encoded = base64::engine::general_purpose::STANDARD.encode(&zip);
    let name = &deploy.function;
    let configuration_path = format!("/2015-03-31/functions/{name}/configuration");
    let (status, existing) = client
        .call(reqwest::Method::GET, &configuration_path, None)
        .await?;
    let mut settings = serde_json::Map::new();
    if let Some(memory) = deploy.memory {
        settings.insert("MemorySize".into(), memory.into());
    }
    if let Some(timeout) = deploy.timeout {
        settings.insert("Timeout".into(), timeout.into());
    }
    if let Some(description) = &deploy.description {
        settings.insert("Description".into(), description.clone().into());
    }
    if !deploy.environment.is_empty() {
        let variables: serde_json::Map<String, Value> = deploy
            .environment
            .iter()
            .map(|(name, value)| (name.clone(), Value::from(value.clone())))
            .collect();
        settings.insert("Environment".into(), json!({ "Variables": variables }));
    }
    if status == reqwest::StatusCode::NOT_FOUND {
        let (Some(runtime), Some(handler)) = (&deploy.runtime, &deploy.handler) else {
            bail!(
                "function `{name}` does not exist yet: --runtime and --handler are needed to create it"
            );
        };
        let mut request = settings.clone();
        request.insert("FunctionName".into(), name.clone().into());
        request.insert("Runtime".into(), runtime.clone().into());
        request.insert("Handler".into(), handler.clone().into());
        request.insert(
            "Role".into(),
            "arn:aws:iam::000000000000:role/switchyard".into(),
        );
        request.insert("Code".into(), json!({ "ZipFile": encoded }));
        let (status, answer) = client
            .call(
                reqwest::Method::POST,
                "/2015-03-31/functions",
                Some(&Value::Object(request)),
            )
            .await?;
        if !status.is_success() {
            return Err(failure(status, &answer).context(format!("creating `{name}`")));
        }
        eprintln!(
            "created {name} ({} bytes, CodeSha256 {})",
            zip.len(),
            answer["CodeSha256"].as_str().unwrap_or_default()
        );
    } else if status.is_success() {
        let _ = existing;
        let (status, answer) = client
            .call(
                reqwest::Method::PUT,
                &format!("/2015-03-31/functions/{name}/code"),
                Some(&json!({ "ZipFile": encoded })),
            )
            .await?;
        if !status.is_success() {
            return Err(failure(status, &answer).context(format!("updating `{name}`'s code")));
        }
        eprintln!(
            "updated {name}'s code ({} bytes, CodeSha256 {})",
            zip.len(),
            answer["CodeSha256"].as_str().unwrap_or_default()
        );
        if deploy.runtime.is_some() || deploy.handler.is_some() || !settings.is_empty() {
            wait_ready(client, name, deploy.wait).await?;
            if let Some(runtime) = &deploy.runtime {
                settings.insert("Runtime".into(), runtime.clone().into());
            }
            if let Some(handler) = &deploy.handler {
                settings.insert("Handler".into(), handler.clone().into());
            }
            let (status, answer) = client
                .call(
                    reqwest::Method::PUT,
                    &configuration_path,
                    Some(&Value::Object(settings)),
                )
                .await?;
            if !status.is_success() {
                return Err(
                    failure(status, &answer).context(format!("updating `{name}`'s configuration"))
                );
            }
        }
    } else {
        return Err(failure(status, &existing).context(format!("looking up `{name}`")));
    }
    wait_ready(client, name, deploy.wait).await
}

/// Waits until the function is `Active` and its last update `Successful`.
async fn wait_ready(client: &LambdaClient, name: &str, wait: Duration) -> anyhow::Result<Value> {
    let deadline = Instant::now() + wait;
    let path = format!("/2015-03-31/functions/{name}/configuration");
    loop {
        let (status, answer) = client.call(reqwest::Method::GET, &path, None).await?;
        if !status.is_success() {
            return Err(failure(status, &answer).context(format!("waiting for `{name}`")));
        }
        let state = answer["State"].as_str().unwrap_or_default();
        let update = answer["LastUpdateStatus"].as_str().unwrap_or_default();
        if state == "Failed" || update == "Failed" {
            let reason = answer["LastUpdateStatusReason"]
                .as_str()
                .or(answer["StateReason"].as_str())
                .unwrap_or("no reason given");
            bail!("`{name}` failed to deploy: {reason}");
        }
        if state == "Active" && update == "Successful" {
            return Ok(answer);
        }
        if Instant::now() >= deadline {
            bail!(
                "`{name}` is not active with its new code after {}s (State {state}, LastUpdateStatus {update})",
                wait.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
