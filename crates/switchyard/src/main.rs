//! `switchyard`: run, validate, send test events, and manage dead letters.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use bytes::Bytes;
use clap::{Parser, Subcommand};
use switchyard::{config, dlq};
use switchyard_bus::Bus;
use switchyard_event::{Event, EventSink};

#[derive(Parser)]
#[command(
    name = "switchyard",
    version,
    about = "Event triggers and dispatch on NATS JetStream"
)]
struct Cli {
    /// The configuration file, for every command.
    #[arg(
        long,
        short,
        env = "SWITCHYARD_CONFIG",
        default_value = "config/switchyard.toml",
        global = true
    )]
    config: PathBuf,
    /// Worker threads of the runtime (default: one per core). On a small host shared
    /// with nats-server, 1 can use less CPU per event (docs/BENCHMARKS.md).
    #[arg(long, env = "SWITCHYARD_THREADS", global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sources, the dispatcher and the admin listener.
    Run {
        /// Once ready, write the process id and the addresses every listener bound
        /// (`{"pid":..,"admin":"127.0.0.1:9090","sources":{"http":"127.0.0.1:8080"}}`)
        /// to this file, replacing it atomically: with port 0 in the configuration,
        /// scripts and tests learn the ports from it.
        #[arg(long, env = "SWITCHYARD_READY_FILE")]
        ready_file: Option<PathBuf>,
    },
    /// Check a configuration file and report every mistake with file, line and field.
    Validate {
        /// Also connect to NATS and report what the configuration would change that
        /// the server cannot apply (a stream's storage, a trigger's `start`), before
        /// a deploy.
        #[arg(long)]
        check_nats: bool,
    },
    /// Publish one test event to the bus.
    Send {
        /// CloudEvents `type`.
        #[arg(long = "type", default_value = "dev.switchyard.test")]
        event_type: String,
        /// CloudEvents `source`.
        #[arg(long, default_value = "/switchyard/cli")]
        source: String,
        /// Event id; generated when absent.
        #[arg(long)]
        id: Option<String>,
        #[arg(long)]
        subject: Option<String>,
        /// The data, sent as is.
        #[arg(long, default_value = "{\"hello\":\"switchyard\"}")]
        data: String,
        #[arg(long, default_value = "application/json")]
        content_type: String,
    },
    /// Invoke a `lambda` function through the running process's Invoke API
    /// (`invoke_api.listen`). Synchronously by default: prints its answer and exits 1
    /// when the function failed (its error document is printed). With `--async`, an
    /// `Event` invocation: prints its request id once it is stored on the bus.
    Invoke {
        /// The function's name.
        name: String,
        /// The event: JSON text, `@FILE`, or `-` for standard input.
        #[arg(long, default_value = "{}")]
        data: String,
        /// Store the invocation and return (Lambda's `Event` invocation type): the
        /// function's `invoke-<name>` trigger delivers it, with retries and a dead
        /// letter.
        #[arg(long = "async")]
        asynchronous: bool,
        /// The Invoke API to call, instead of the configuration's `invoke_api.listen`.
        #[arg(long)]
        invoke_api: Option<String>,
    },
    /// Zip a directory and create or update a function through the running
    /// process's Lambda control plane (`invoke_api.listen`), then wait until it is
    /// active with the new code (as `aws lambda create-function` or
    /// `update-function-code` and `aws lambda wait` do). Requests are signed with
    /// AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, else the configuration's first
    /// `invoke_api.credentials`.
    Deploy {
        /// The directory holding the function's code (its root is the package's).
        directory: PathBuf,
        /// The function's name.
        #[arg(long = "function-name", short = 'n')]
        function: String,
        /// Lambda's runtime id (python3.12, nodejs22.x, provided.al2023, ...):
        /// needed to create the function.
        #[arg(long)]
        runtime: Option<String>,
        /// The handler (`main.handler`): needed to create the function.
        #[arg(long)]
        handler: Option<String>,
        /// Memory in MB.
        #[arg(long)]
        memory: Option<u32>,
        /// Timeout in seconds.
        #[arg(long)]
        timeout: Option<u32>,
        #[arg(long)]
        description: Option<String>,
        /// An environment variable, `NAME=VALUE` (repeatable; replaces the set).
        #[arg(long = "env", value_parser = parse_variable)]
        environment: Vec<(String, String)>,
        /// The Lambda API to call (`http(s)://host:port`), instead of the
        /// configuration's `invoke_api.listen`.
        #[arg(long)]
        endpoint: Option<String>,
        /// How long to wait for the function to be active, in seconds.
        #[arg(long, default_value_t = 300)]
        wait: u64,
    },
    /// Show the functions whose instances Switchyard runs (`lambda`, `process`):
    /// instances starting, idle and busy, cold starts, the last init error, limits.
    /// Asks the running process's admin listener (`admin.listen`).
    Functions {
        /// The admin listener to ask, instead of the configuration's `admin.listen`.
        #[arg(long)]
        admin: Option<String>,
        /// Print the JSON of `/v1/functions` instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List the schedules (`type = "schedule"` sources) of the configuration: the
    /// newest time each fired across the cluster (read from NATS) and its next
    /// firing times.
    Schedules {
        /// Print JSON (as `GET /v1/schedules`) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print a function's log lines (what its instances printed, and START, END and
    /// REPORT around each Lambda invocation) from every host, read from the logs
    /// stream.
    Logs {
        /// The function.
        function: String,
        /// Go on printing new lines as they come.
        #[arg(long, short = 'f')]
        follow: bool,
        /// From how long ago (`10m`, `2h`, `1d`).
        #[arg(long, default_value = "10m")]
        since: humantime::Duration,
        /// Only the lines of this invocation.
        #[arg(long)]
        request_id: Option<String>,
        /// Print JSON lines (as `GET /v1/functions/{name}/logs`).
        #[arg(long)]
        json: bool,
    },
    /// Ask the running process to re-read its configuration file and apply what
    /// changed (as SIGHUP does): prints what changed, or the located mistakes of a
    /// refused file (the running configuration then stays) and exits 1.
    Reload {
        /// The admin listener to ask, instead of the configuration's `admin.listen`.
        #[arg(long)]
        admin: Option<String>,
        /// The admin bearer token, instead of the configuration's.
        #[arg(long, env = "SWITCHYARD_ADMIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Inspect, replay and purge a trigger's dead letters.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
}

#[derive(Subcommand)]
enum DlqAction {
    /// List a trigger's dead letters with their reason.
    List {
        #[arg(long)]
        trigger: String,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter whole, as JSON.
    Show {
        #[arg(long)]
        trigger: String,
        sequence: u64,
    },
    /// Replay dead letters to their trigger: the given sequences, or all (optionally
    /// only those with a given reason).
    Replay {
        #[arg(long)]
        trigger: String,
        sequences: Vec<u64>,
        #[arg(long, conflicts_with = "sequences")]
        all: bool,
        /// With --all: only dead letters with this reason.
        #[arg(long, requires = "all")]
        reason: Option<String>,
    },
    /// Move every event a removed trigger's consumers still hold (never delivered,
    /// waiting for a retry) into its dead letters (reason `trigger_removed`), then
    /// delete those consumers. Refused for a trigger in the configuration.
    Drain {
        #[arg(long)]
        trigger: String,
    },
    /// Remove dead letters: the given sequences, or all of the trigger's.
    Purge {
        #[arg(long)]
        trigger: String,
        sequences: Vec<u64>,
        #[arg(long, conflicts_with = "sequences")]
        all: bool,
    },
}

fn parse_variable(given: &str) -> Result<(String, String), String> {
    given
        .split_once('=')
        .filter(|(name, _)| !name.is_empty())
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .ok_or_else(|| format!("`{given}` is not NAME=VALUE"))
}

/// The Lambda API of the running process: `--endpoint`, or the configuration's
/// `invoke_api.listen` (https when it has `tls`); signed with AWS_ACCESS_KEY_ID /
/// AWS_SECRET_ACCESS_KEY, else the configuration's first credential; the region
/// from AWS_REGION, else `workers.region`.
fn lambda_client(
    config_path: &std::path::Path,
    endpoint: Option<String>,
    flag: &str,
) -> anyhow::Result<switchyard::deploy::LambdaClient> {
    let loaded = if endpoint.is_none() || config_path.exists() {
        Some(load(config_path)?)
    } else {
        None
    };
    let base = match endpoint {
        Some(endpoint) if endpoint.starts_with("http://") || endpoint.starts_with("https://") => {
            endpoint
        }
        Some(address) => format!("http://{address}"),
        None => {
            let loaded = loaded.as_ref().expect("loaded without --endpoint");
            let listen = &loaded.invoke_api.listen;
            if listen.is_empty() || listen.ends_with(":0") {
                anyhow::bail!(
                    "{} has no fixed Invoke API address (invoke_api.listen = `{listen}`): set one, or pass {flag} HOST:PORT",
                    config_path.display()
                );
            }
            let scheme = if loaded.invoke_api.tls.is_some() {
                "https"
            } else {
                "http"
            };
            let address = listen
                .replace("0.0.0.0:", "127.0.0.1:")
                .replace("[::]:", "[::1]:");
            format!("{scheme}://{address}")
        }
    };
    let from_environment = match (
        std::env::var("AWS_ACCESS_KEY_ID"),
        std::env::var("AWS_SECRET_ACCESS_KEY"),
    ) {
        (Ok(key), Ok(secret)) if !key.is_empty() => Some((key, secret)),
        _ => None,
    };
    let credentials = from_environment.or_else(|| {
        use secrecy::ExposeSecret as _;
        let credential = loaded.as_ref()?.invoke_api.credentials.first()?;
        Some((
            credential.access_key_id.clone(),
            credential.secret_access_key.expose_secret().to_owned(),
        ))
    });
    let region = std::env::var("AWS_REGION")
        .ok()
        .filter(|region| !region.is_empty())
        .or_else(|| Some(loaded.as_ref()?.workers.region.clone()))
        .unwrap_or_else(|| "us-east-1".to_owned());
    Ok(switchyard::deploy::LambdaClient::new(
        base,
        region,
        credentials,
    ))
}

fn load(path: &std::path::Path) -> anyhow::Result<config::Config> {
    config::load(path).map_err(|errors| anyhow::anyhow!("{errors}"))
}

/// Writes `report` to `path` through a temporary file renamed into place, so a reader
/// never sees half of it.
fn write_ready_file(path: &std::path::Path, report: &serde_json::Value) -> anyhow::Result<()> {
    let partial = path.with_extension("partial");
    std::fs::write(&partial, report.to_string())
        .with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

async fn connect(config: &config::Config) -> anyhow::Result<Bus> {
    let bus = Bus::connect(&config.nats).await?;
    bus.ensure_streams().await?;
    Ok(bus)
}

/// `/v1/functions` as a table, one function per row, then each function's last init
/// error.
fn functions_table(status: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let mut table = format!(
        "{:<24}  {:<8}  {:>8}  {:>5}  {:>5}  {:>4}  {:>11}  {:>9}  {:>7}  isolation\n",
        "function", "type", "starting", "idle", "busy", "max", "cold starts", "init fail", "memory"
    );
    let empty = Vec::new();
    let functions = status["functions"].as_array().unwrap_or(&empty);
    for function in functions {
        let instances = &function["instances"];
        let limits = &function["limits"];
        // serde_json's Display ignores widths: numbers as strings first.
        let number =
            |value: &serde_json::Value| value.as_u64().map_or("?".to_owned(), |n| n.to_string());
        let _ = writeln!(
            table,
            "{:<24}  {:<8}  {:>8}  {:>5}  {:>5}  {:>4}  {:>11}  {:>9}  {:>5}MB  {}",
            function["name"].as_str().unwrap_or("?"),
            function["type"].as_str().unwrap_or("?"),
            number(&instances["starting"]),
            number(&instances["idle"]),
            number(&instances["busy"]),
            number(&limits["max_instances"]),
            number(&function["cold_starts"]),
            number(&function["init_failures"]),
            number(&limits["memory_mb"]),
            function["isolation"].as_str().unwrap_or("?"),
        );
    }
    for function in functions {
        let error = &function["last_init_error"];
        if error.is_object() {
            let _ = writeln!(
                table,
                "\n{}: failing to start ({} in a row, next start {}): {}: {}",
                function["name"].as_str().unwrap_or("?"),
                error["failures"],
                error["retry_at"].as_str().unwrap_or("now"),
                error["error_type"].as_str().unwrap_or("?"),
                error["message"].as_str().unwrap_or("?"),
            );
        }
    }
    if functions.is_empty() {
        table.push_str("(no lambda or process functions configured)\n");
    }
    table
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = cli.config;
    match cli.command {
        Command::Run { ready_file } => {
            let loaded = load(&config)?;
            switchyard::init_logging(&loaded.log);
            tracing::info!(config = %config.display(), nats = %switchyard_bus::redact_url(&loaded.nats.url), "starting switchyard");
            let telemetry = switchyard::telemetry::start(&loaded.telemetry)?;
            let running = switchyard::start(loaded).await?;
            if let Some(admin) = running.admin {
                tracing::info!(%admin, "admin listening (/healthz /readyz /metrics /v1/triggers)");
            }
            for (name, address) in &running.sources {
                tracing::info!(source = %name, %address, "http source bound");
            }
            if let Some(path) = ready_file {
                let report = running.ready_report();
                let mut ready = running.ready.clone();
                tokio::spawn(async move {
                    if ready.wait_for(|ready| *ready).await.is_err() {
                        return;
                    }
                    if let Err(error) = write_ready_file(&path, &report) {
                        tracing::error!(path = %path.display(), %error, "writing the ready file failed");
                    }
                });
            }
            let shutdown = running.shutdown.clone();
            let reloads = running.reloads.clone();
            let mut task = running.task;
            tokio::spawn(reload_on_hangup(reloads));
            let result = tokio::select! {
                result = &mut task => result,
                () = shutdown_signal() => {
                    tracing::info!("signal received, shutting down");
                    shutdown.cancel();
                    task.await
                }
            };
            if let Some(telemetry) = telemetry {
                telemetry.shutdown().await;
            }
            result.context("switchyard task panicked")?
        }
        Command::Validate { check_nats } => {
            let loaded = load(&config)?;
            if check_nats {
                let bus = tokio::time::timeout(
                    std::time::Duration::from_secs(10),
                    Bus::connect(&loaded.nats),
                )
                .await
                .map_err(|_| {
                    anyhow::anyhow!(
                        "nats at `{}` did not answer within 10 s",
                        switchyard_bus::redact_url(&loaded.nats.url)
                    )
                })??;
                let mut problems = bus.stream_conflicts().await?;
                if let Ok(stream) = bus.jetstream().get_stream(bus.events_stream()).await {
                    let triggers = loaded.all_triggers();
                    problems.extend(
                        switchyard_dispatcher::consumers::start_conflicts(&stream, &triggers).await,
                    );
                }
                if !problems.is_empty() {
                    anyhow::bail!(
                        "{}: the configuration is valid, but nats at `{}` cannot apply it:\n{}",
                        config.display(),
                        switchyard_bus::redact_url(&loaded.nats.url),
                        problems.join("\n")
                    );
                }
            }
            println!(
                "{}: ok ({} sources, {} functions, {} triggers)",
                config.display(),
                loaded.sources.len(),
                loaded.functions.len(),
                loaded.triggers.len()
            );
            Ok(())
        }
        Command::Send {
            event_type,
            source,
            id,
            subject,
            data,
            content_type,
        } => {
            let is_json = switchyard_event::is_json_content_type(&content_type);
            if is_json && serde_json::from_str::<serde_json::Value>(&data).is_err() {
                anyhow::bail!(
                    "--data is not valid JSON but --content-type is `{content_type}`; pass --content-type text/plain (or another type) for other data"
                );
            }
            let loaded = load(&config)?;
            let bus = connect(&loaded).await?;
            let mut event = Event::new(
                id.unwrap_or_else(|| uuid::Uuid::now_v7().to_string()),
                source,
                event_type,
            );
            event.subject = subject;
            event.datacontenttype = Some(content_type);
            event.time = Some(switchyard_event::timestamp::now_rfc3339());
            event.data = Bytes::from(data);
            event.validate()?;
            let receipts = bus.publish_all(vec![event]).await?;
            for receipt in receipts {
                println!(
                    "published event {} (stream sequence {}{})",
                    receipt.event_id,
                    receipt.sequence,
                    if receipt.duplicate {
                        ", duplicate: already stored"
                    } else {
                        ""
                    }
                );
            }
            Ok(())
        }
        Command::Invoke {
            name,
            data,
            asynchronous,
            invoke_api,
        } => {
            let client = lambda_client(&config, invoke_api, "--invoke-api")?;
            let payload = if data == "-" {
                let mut read = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut read)?;
                read
            } else if let Some(file) = data.strip_prefix('@') {
                std::fs::read(file).with_context(|| format!("reading {file}"))?
            } else {
                data.into_bytes()
            };
            let path = format!("/2015-03-31/functions/{name}/invocations");
            let invocation_type = if asynchronous {
                "Event"
            } else {
                "RequestResponse"
            };
            let (status, headers, body) = client
                .send(
                    reqwest::Method::POST,
                    &path,
                    &[("x-amz-invocation-type", invocation_type)],
                    payload,
                )
                .await
                .context(
                    "calling the Invoke API (is switchyard running with invoke_api.listen?)",
                )?;
            let url = path;
            let failed = headers.contains_key("x-amz-function-error");
            let request_id = headers
                .get("x-amzn-requestid")
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned);
            if !status.is_success() {
                anyhow::bail!(
                    "{url} answered {status}: {}",
                    String::from_utf8_lossy(&body)
                );
            }
            if asynchronous {
                println!(
                    "stored; request id {}",
                    request_id.as_deref().unwrap_or("(none given)")
                );
                return Ok(());
            }
            println!("{}", String::from_utf8_lossy(&body));
            if failed {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Deploy {
            directory,
            function,
            runtime,
            handler,
            memory,
            timeout,
            description,
            environment,
            endpoint,
            wait,
        } => {
            let client = lambda_client(&config, endpoint, "--endpoint")?;
            let deployed = switchyard::deploy::deploy(
                &client,
                &switchyard::deploy::Deploy {
                    directory,
                    function,
                    runtime,
                    handler,
                    memory,
                    timeout,
                    description,
                    environment,
                    wait: std::time::Duration::from_secs(wait),
                },
            )
            .await?;
            // Environment values may be secrets: printed as names only (CI logs).
            let mut deployed = deployed;
            if let Some(variables) = deployed
                .pointer_mut("/Environment/Variables")
                .and_then(serde_json::Value::as_object_mut)
            {
                for value in variables.values_mut() {
                    *value = serde_json::Value::from("[REDACTED]");
                }
            }
            println!("{}", serde_json::to_string_pretty(&deployed)?);
            Ok(())
        }
        Command::Functions { admin, json } => {
            let admin = match admin {
                Some(admin) => admin,
                None => {
                    let loaded = load(&config)?;
                    if loaded.admin.listen.is_empty() || loaded.admin.listen.ends_with(":0") {
                        anyhow::bail!(
                            "{} has no fixed admin address (admin.listen = `{}`): pass --admin HOST:PORT",
                            config.display(),
                            loaded.admin.listen
                        );
                    }
                    loaded.admin.listen
                }
            };
            let url = if admin.starts_with("http://") {
                format!("{}/v1/functions", admin.trim_end_matches('/'))
            } else {
                format!("http://{admin}/v1/functions")
            };
            let response = reqwest::get(&url)
                .await
                .with_context(|| format!("asking {url} (is switchyard running?)"))?;
            if !response.status().is_success() {
                anyhow::bail!("{url} answered {}", response.status());
            }
            let status: serde_json::Value = serde_json::from_slice(&response.bytes().await?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
                return Ok(());
            }
            print!("{}", functions_table(&status));
            Ok(())
        }
        Command::Reload { admin, token } => reload_command(&config, admin, token).await,
        Command::Logs {
            function,
            follow,
            since,
            request_id,
            json,
        } => {
            use futures::StreamExt as _;
            let loaded = load(&config)?;
            let bus = connect(&loaded).await?;
            let query = switchyard::function_logs::LogQuery {
                since: since.into(),
                start: None,
                request_id,
                follow,
            };
            let mut lines = switchyard::function_logs::read(&bus, &function, query).await?;
            while let Some(line) = lines.next().await {
                if json {
                    println!("{}", serde_json::to_string(&line)?);
                } else {
                    println!("{}  {}  {}", line.time, line.instance, line.message);
                }
            }
            Ok(())
        }
        Command::Schedules { json } => {
            let loaded = load(&config)?;
            let schedules: Vec<_> = loaded
                .sources
                .iter()
                .filter_map(|source| match source.get_ref() {
                    config::SourceConfig::Schedule(schedule) => Some(schedule.clone()),
                    _ => None,
                })
                .collect();
            let bus = connect(&loaded).await?;
            let statuses = switchyard_connector_schedule::source::statuses(&bus, &schedules).await;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({ "schedules": statuses }))?
                );
                return Ok(());
            }
            if statuses.is_empty() {
                println!("{} has no schedules", config.display());
                return Ok(());
            }
            println!(
                "{:<24}  {:<28}  {:<16}  {:<26}  next",
                "schedule", "expression", "timezone", "fired through"
            );
            for status in &statuses {
                println!(
                    "{:<24}  {:<28}  {:<16}  {:<26}  {}",
                    status.name,
                    status.expression,
                    status.timezone,
                    status.fired_through.as_deref().unwrap_or("-"),
                    status.next.first().map_or("never again", String::as_str),
                );
                if let Some(error) = &status.error {
                    eprintln!("{}: {error}", status.name);
                }
            }
            Ok(())
        }
        Command::Dlq { action } => {
            let loaded = load(&config)?;
            let bus = connect(&loaded).await?;
            match action {
                DlqAction::List { trigger, json } => {
                    let entries = dlq::list(&bus, &trigger).await?;
                    if json {
                        for entry in &entries {
                            println!("{}", dlq::entry_json(entry));
                        }
                    } else {
                        println!(
                            "{:>8}  {:<36}  {:<20}  {:>8}  {:>6}  {:>8}  error",
                            "sequence", "event id", "reason", "attempts", "status", "replays"
                        );
                        for entry in &entries {
                            let dead_letter = &entry.dead_letter;
                            println!(
                                "{:>8}  {:<36}  {:<20}  {:>8}  {:>6}  {:>8}  {}",
                                entry.sequence,
                                dead_letter.event.id,
                                dead_letter.reason,
                                dead_letter.attempts,
                                dead_letter
                                    .last_status
                                    .map_or("-".to_owned(), |status| status.to_string()),
                                entry.replays.as_ref().map_or(0, |record| record.count),
                                dead_letter.last_error
                            );
                        }
                        println!("{} dead letters for trigger `{trigger}`", entries.len());
                    }
                    Ok(())
                }
                DlqAction::Show { trigger, sequence } => {
                    let entry = dlq::show(&bus, &trigger, sequence).await?;
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&dlq::entry_json(&entry))?
                    );
                    Ok(())
                }
                DlqAction::Replay {
                    trigger,
                    sequences,
                    all,
                    reason,
                } => {
                    if !trigger.starts_with("source:")
                        && !loaded
                            .all_triggers()
                            .iter()
                            .any(|known| known.name == trigger)
                    {
                        anyhow::bail!(
                            "trigger `{trigger}` is not in {}: replaying would send its dead letters to a subject no consumer reads (list them with `dlq list`, purge them with `dlq purge`, or replay a source's with `--trigger source:<name>`)",
                            config.display()
                        );
                    }
                    let entries = if all {
                        dlq::list(&bus, &trigger)
                            .await?
                            .into_iter()
                            .filter(|entry| {
                                reason
                                    .as_ref()
                                    .is_none_or(|reason| &entry.dead_letter.reason == reason)
                            })
                            .collect()
                    } else {
                        if sequences.is_empty() {
                            anyhow::bail!(
                                "name the dead letters to replay by sequence, or pass --all"
                            );
                        }
                        let mut entries = Vec::new();
                        for sequence in sequences {
                            entries.push(dlq::show(&bus, &trigger, sequence).await?);
                        }
                        entries
                    };
                    let replayed = dlq::replay(&bus, &trigger, &entries).await?;
                    println!("replayed {replayed} dead letters to trigger `{trigger}`");
                    Ok(())
                }
                DlqAction::Drain { trigger } => {
                    if loaded
                        .all_triggers()
                        .iter()
                        .any(|known| known.name == trigger)
                    {
                        anyhow::bail!(
                            "trigger `{trigger}` is in {}: only a removed trigger's consumers are drained",
                            config.display()
                        );
                    }
                    let drained = dlq::drain(&bus, &trigger).await?;
                    println!(
                        "drained {drained} events of removed trigger `{trigger}` into its dead letters (`dlq list --trigger {trigger}`)"
                    );
                    Ok(())
                }
                DlqAction::Purge {
                    trigger,
                    sequences,
                    all,
                } => {
                    if !all && sequences.is_empty() {
                        anyhow::bail!("name the dead letters to purge by sequence, or pass --all");
                    }
                    let removed =
                        dlq::purge(&bus, &trigger, if all { None } else { Some(&sequences) })
                            .await?;
                    println!("purged {removed} dead letters of trigger `{trigger}`");
                    Ok(())
                }
            }
        }
    }
}

/// SIGHUP re-reads the configuration file; the outcome is logged by the reload.
async fn reload_on_hangup(reloads: tokio::sync::mpsc::Sender<switchyard::ReloadRequest>) {
    #[cfg(unix)]
    {
        let Ok(mut hangups) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            tracing::error!(
                "installing the SIGHUP handler failed: reload with `switchyard reload`"
            );
            return;
        };
        while hangups.recv().await.is_some() {
            tracing::info!("SIGHUP received, reloading the configuration");
            let (reply, answer) = tokio::sync::oneshot::channel();
            if reloads
                .send(switchyard::ReloadRequest { reply })
                .await
                .is_err()
            {
                return;
            }
            let _ = answer.await;
        }
    }
    #[cfg(not(unix))]
    drop(reloads);
}

/// `switchyard reload`: `POST /v1/reload` on the running process's admin listener.
async fn reload_command(
    config: &std::path::Path,
    admin: Option<String>,
    token: Option<String>,
) -> anyhow::Result<()> {
    use secrecy::ExposeSecret as _;
    // The file may be the broken edit being reloaded: then only --admin (and
    // --token) say where to ask, and the process answers with the mistakes.
    let loaded = switchyard::config::load(config);
    let admin = match (admin, &loaded) {
        (Some(admin), _) => admin,
        (None, Ok(loaded)) => {
            if loaded.admin.listen.is_empty() || loaded.admin.listen.ends_with(":0") {
                anyhow::bail!(
                    "{} has no fixed admin address (admin.listen = `{}`): pass --admin HOST:PORT",
                    config.display(),
                    loaded.admin.listen
                );
            }
            loaded.admin.listen.clone()
        }
        (None, Err(errors)) => {
            anyhow::bail!(
                "{errors}\nnothing was reloaded: fix the file, or pass --admin HOST:PORT to have the running process check it"
            );
        }
    };
    let token = token.or_else(|| {
        loaded.as_ref().ok().and_then(|loaded| {
            loaded
                .admin
                .tokens()
                .first()
                .map(|token| token.expose_secret().to_owned())
        })
    });
    let url = if admin.starts_with("http://") || admin.starts_with("https://") {
        format!("{}/v1/reload", admin.trim_end_matches('/'))
    } else {
        format!("http://{admin}/v1/reload")
    };
    let mut request = reqwest::Client::new().post(&url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request
        .send()
        .await
        .with_context(|| format!("asking {url} (is switchyard running?)"))?;
    let status = response.status();
    let body: serde_json::Value = serde_json::from_slice(&response.bytes().await?)
        .with_context(|| format!("{url} answered {status} without JSON"))?;
    if let Some(error) = body.get("error").and_then(|error| error.as_str()) {
        anyhow::bail!("{url} answered {status}: {error}");
    }
    let result = body["result"].as_str().unwrap_or("unknown");
    let revision = &body["revision"]["number"];
    for change in body["changes"].as_array().into_iter().flatten() {
        println!("{}", change.as_str().unwrap_or_default());
    }
    for error in body["errors"].as_array().into_iter().flatten() {
        eprintln!("{}", error.as_str().unwrap_or_default());
    }
    match result {
        "applied" => {
            println!("reloaded: revision {revision}");
            Ok(())
        }
        "unchanged" => {
            println!("nothing changed: revision {revision}");
            Ok(())
        }
        "refused" => anyhow::bail!("reload refused: revision {revision} keeps running"),
        _ => anyhow::bail!("reload applied in part: revision {revision}"),
    }
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}

fn main() -> ExitCode {
    // Started by switchyard as a function instance's guard: that is all this process
    // does (never returns). Otherwise this binary guards its own instances.
    switchyard_workers::guard::run_if_requested();
    let cli = Cli::parse();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = cli.threads.filter(|threads| *threads > 0) {
        builder.worker_threads(threads);
    }
    let runtime = builder
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
