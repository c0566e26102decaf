//! `lambda` instances: a command speaking the AWS Lambda Runtime API, served to it on
//! a loopback port of its own, and invocations as Lambda runs them: the structured
//! CloudEvent as the payload, a deadline after which the instance is killed
//! (`Sandbox.Timedout`), an exit during an invocation as `Runtime.ExitError`, a
//! reported error as a failed attempt with its `errorType` and `errorMessage`.

use crate::logs::{LogLine, report_line};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use switchyard_event::telemetry::{self, SpanContext};
use switchyard_event::{Failure, FunctionAnswer, Outcome, parse_structured};
use tokio_util::task::AbortOnDropHandle;

use crate::pool::{Endpoint, Instance, Lease, Pool, StartFailure};
use crate::process::{InstanceProcess, OWNER_VARIABLE};
use crate::runtime_api::{Answer, InstanceIdentity, Invocation, RuntimeApi, instance_environment};

/// Starts an instance and waits for its runtime's first `/next` (init over), an init
/// error, its exit, or `init_timeout`.
pub(crate) async fn start(
    pool: &Pool,
    label: &str,
    handler: &str,
) -> Result<Instance, StartFailure> {
    let spec = &pool.spec;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .map_err(|error| StartFailure {
            error_type: "Runtime.StartFailed".to_owned(),
            message: format!("binding the instance's runtime api failed: {error}"),
            output: None,
        })?;
    let address = listener
        .local_addr()
        .map_err(|error| StartFailure {
            error_type: "Runtime.StartFailed".to_owned(),
            message: format!("binding the instance's runtime api failed: {error}"),
            output: None,
        })?
        .to_string();
    let api = RuntimeApi::with_concurrency(spec.instance_concurrency);
    let router = api.router();
    let server = AbortOnDropHandle::new(tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    }));
    let task_root = spec.directory.to_string_lossy();
    let identity = InstanceIdentity {
        function: &spec.name,
        handler,
        task_root: &task_root,
        memory_mb: spec.memory_mb,
        region: &pool.shared.settings.region,
        runtime_api: &address,
        instance: label,
    };
    let mut environment = base_environment(&spec.environment);
    environment = instance_environment(&identity, &environment);
    environment.retain(|(name, _)| name != OWNER_VARIABLE && name != "AWS_LAMBDA_MAX_CONCURRENCY");
    environment.push((OWNER_VARIABLE.to_owned(), pool.shared.owner.clone()));
    if spec.instance_concurrency > 1 {
        // Lambda's multi-concurrency: clients that support it (awslambdaric forks
        // that many workers) ask for that many events at once.
        environment.push((
            "AWS_LAMBDA_MAX_CONCURRENCY".to_owned(),
            spec.instance_concurrency.to_string(),
        ));
    }
    let process = pool.spawn_instance(label, &environment).await?;
    let ready = tokio::select! {
        ready = api.wait_init() => ready.map_err(|(error_type, body)| {
            let (reported_type, message) = reported_error(&body);
            StartFailure {
                error_type: reported_type.unwrap_or(error_type),
                message: message.unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned()),
                output: None,
            }
        }),
        exit = process.exited() => Err(StartFailure {
            error_type: "Runtime.ExitError".to_owned(),
            message: format!("the runtime exited during init: {exit} (its output is in the log)"),
            output: Some(last_output(&process)),
        }),
        () = tokio::time::sleep(spec.init_timeout) => Err(StartFailure {
            error_type: "Sandbox.Timedout".to_owned(),
            message: format!("init did not finish within {} (its output is in the log)", seconds(spec.init_timeout)),
            output: Some(last_output(&process)),
        }),
    };
    match ready {
        Ok(()) => Ok(Instance {
            label: label.to_owned(),
            process,
            endpoint: Endpoint::Lambda {
                api,
                _server: server,
            },
            cold: Default::default(),
        }),
        Err(failure) => {
            process.kill();
            process.exited().await;
            Err(failure)
        }
    }
}

/// What every instance gets besides Lambda's variables: `PATH` from Switchyard's
/// environment (so `python3` or `node` are found) unless the function sets its own,
/// Lambda's `LANG`, and `AWS_EC2_METADATA_DISABLED=true`, so that an AWS SDK in the
/// function never takes the host's instance role from the metadata service (give a
/// function credentials in its `environment`). Nothing else of Switchyard's
/// environment is passed on.
pub(crate) fn base_environment(user: &[(String, String)]) -> Vec<(String, String)> {
    let mut environment = Vec::new();
    if !user.iter().any(|(name, _)| name == "PATH")
        && let Ok(path) = std::env::var("PATH")
    {
        environment.push(("PATH".to_owned(), path));
    }
    if !user.iter().any(|(name, _)| name == "LANG") {
        environment.push(("LANG".to_owned(), "en_US.UTF-8".to_owned()));
    }
    if !user
        .iter()
        .any(|(name, _)| name == "AWS_EC2_METADATA_DISABLED")
    {
        environment.push(("AWS_EC2_METADATA_DISABLED".to_owned(), "true".to_owned()));
    }
    environment.extend(user.iter().cloned());
    environment
}

fn seconds(duration: Duration) -> String {
    format!("{:.2} seconds", duration.as_secs_f64())
}

pub(crate) fn last_output(process: &InstanceProcess) -> String {
    let tail = process.tail();
    if tail.is_empty() {
        "(none)".to_owned()
    } else {
        tail
    }
}

/// The `errorType` and `errorMessage` of an error body, when it has them.
fn reported_error(body: &[u8]) -> (Option<String>, Option<String>) {
    let Ok(serde_json::Value::Object(object)) = serde_json::from_slice(body) else {
        return (None, None);
    };
    let text = |key: &str| {
        object
            .get(key)
            .and_then(serde_json::Value::as_str)
            .filter(|text| !text.is_empty())
            .map(str::to_owned)
    };
    (text("errorType"), text("errorMessage"))
}

/// An X-Ray-shaped trace id (`Root=1-<time>-<random>;Parent=<random>;Sampled=0`), as
/// Lambda hands every invocation.
fn trace_id() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let root: u128 = rand::random::<u128>() >> 32;
    let parent: u64 = rand::random();
    format!("Root=1-{now:08x}-{root:024x};Parent={parent:016x};Sampled=0")
}

/// What one invocation of a lambda instance came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Called {
    /// The handler's response.
    Response {
        body: Bytes,
        content_type: Option<String>,
    },
    /// The handler reported an error: its type and message, and the body as posted
    /// (`{"errorMessage":...,"errorType":...,"stackTrace":...}`).
    FunctionError {
        error_type: String,
        message: String,
        body: Bytes,
    },
    /// The invocation failed around the handler (timeout, exit, out of memory,
    /// oversize or unreadable answer, or the function could not start), in Lambda's
    /// words.
    Failed { error_type: String, message: String },
}

impl Called {
    /// As an attempt of an event: a response delivers, anything else is retried per
    /// the trigger's policy with `<errorType>: <errorMessage>` on the record.
    pub(crate) fn into_outcome(self) -> Outcome {
        match self {
            Called::Response { body, content_type } => delivered(body, content_type),
            Called::FunctionError {
                error_type,
                message,
                ..
            }
            | Called::Failed {
                error_type,
                message,
            } => Outcome::RetryLater {
                not_before: None,
                failure: Failure::new(None, format!("{error_type}: {message}")),
            },
        }
    }
}

/// Runs one invocation of an event on the leased instance, with `payload` (the event
/// as the trigger renders it) as what the handler receives.
pub(crate) async fn invoke(
    pool: &Pool,
    lease: Lease,
    request_id: Option<String>,
    payload: Bytes,
    timeout: Duration,
    trace: Option<SpanContext>,
) -> Outcome {
    call(
        pool, lease, request_id, payload, None, timeout, false, trace,
    )
    .await
    .0
    .into_outcome()
}

/// Runs one invocation with `payload` as the event (as Lambda's Invoke API passes
/// its request body) on the leased instance; with `log`, also returns its log as
/// Lambda's `LogType: Tail` shows it (`START`, what the handler printed, `END`,
/// `REPORT`), when the instance takes one invocation at a time. The request id is
/// `request_id`, or a new one. With `trace` (the invocation's span context), the
/// handler's `_X_AMZN_TRACE_ID` is that trace and a cold start is traced under it.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn call(
    pool: &Pool,
    lease: Lease,
    request_id: Option<String>,
    payload: Bytes,
    client_context: Option<String>,
    timeout: Duration,
    log: bool,
    trace: Option<SpanContext>,
) -> (Called, Option<String>) {
    let collect = log && pool.spec.instance_concurrency <= 1;
    let instance = lease.instance.clone();
    let cold = pool.cold_start(&instance, trace.as_ref());
    let request_id = request_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    if collect {
        instance.process.start_log(&request_id);
    }
    // Before the START line: reading the log from this time on finds it.
    let started_at = switchyard_event::timestamp::now_rfc3339();
    let logs = pool.shared.logs.get().cloned();
    let start_line = format!("START RequestId: {request_id} Version: $LATEST");
    if let Some(logs) = &logs {
        logs.line(LogLine::new(
            &pool.spec.name,
            &instance.label,
            Some(&request_id),
            "platform",
            start_line.clone(),
        ));
    }
    let started = std::time::Instant::now();
    let called = run(
        pool,
        lease,
        &request_id,
        payload,
        client_context,
        timeout,
        trace.as_ref(),
    )
    .await;
    let duration = started.elapsed().as_secs_f64() * 1000.0;
    let (status, error_type) = match &called {
        Called::Response { .. } => ("success", None),
        Called::FunctionError { error_type, .. } => ("error", Some(error_type.clone())),
        Called::Failed { error_type, .. } => ("failed", Some(error_type.clone())),
    };
    pool.recent.record(crate::recent::Invocation {
        request_id: request_id.clone(),
        instance: instance.label.clone(),
        started: started_at,
        duration_ms: duration,
        init_duration_ms: cold.map(|cold| cold.init.as_secs_f64() * 1000.0),
        status,
        error_type,
        trace_id: crate::recent::Invocation::sampled_trace_id(trace.as_ref()),
    });
    let end_line = format!("END RequestId: {request_id}");
    let report = report_line(
        &request_id,
        duration,
        pool.spec.memory_mb,
        instance.process.peak_memory(),
        cold.map(|cold| cold.init.as_secs_f64() * 1000.0),
    );
    if let Some(logs) = logs {
        // After what the handler printed (read from its pipes), without keeping the
        // answer waiting for it.
        let (instance, function, request_id) =
            (instance.clone(), pool.spec.name.clone(), request_id.clone());
        let (end_line, report) = (end_line.clone(), report.clone());
        tokio::spawn(async move {
            instance.process.drained().await;
            for line in [end_line, report] {
                logs.line(LogLine::new(
                    &function,
                    &instance.label,
                    Some(&request_id),
                    "platform",
                    line,
                ));
            }
        });
    }
    if !collect {
        return (called, None);
    }
    let printed = instance.process.finish_log().await;
    let log = format!("{start_line}\n{printed}{end_line}\n{report}\n");
    (called, Some(log))
}

async fn run(
    pool: &Pool,
    mut lease: Lease,
    request_id: &str,
    payload: Bytes,
    client_context: Option<String>,
    timeout: Duration,
    trace: Option<&SpanContext>,
) -> Called {
    let request_id = request_id.to_owned();
    let Endpoint::Lambda { api, .. } = &lease.instance.endpoint else {
        unreachable!("a lambda instance serves the runtime api")
    };
    let deadline = SystemTime::now() + timeout;
    let invocation = Invocation {
        request_id: request_id.clone(),
        event: payload,
        deadline_ms: deadline
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64,
        function_arn: pool.arn.clone(),
        trace_id: Some(trace.map_or_else(trace_id, telemetry::xray_header)),
        client_context,
        cognito_identity: None,
    };
    // Until the instance has answered, it is retired: if this invocation is dropped
    // midway (the dispatcher gave up), the instance is still working on the event
    // and must not be handed another.
    lease.retire = true;
    let answer = match api.invoke(invocation) {
        Ok(answer) => answer,
        Err(error) => {
            // Not expected (leases give an instance one invocation at a time): the
            // instance stays retired rather than trusted.
            return Called::Failed {
                error_type: "Runtime.Unavailable".to_owned(),
                message: format!("the instance could not take the invocation: {error}"),
            };
        }
    };
    let started = std::time::Instant::now();
    let process = &lease.instance.process;
    // One tag per instance: with several invocations at once it would name the wrong
    // one, so their lines go untagged.
    if pool.spec.instance_concurrency <= 1 {
        process.set_request(Some(&request_id));
    }
    tokio::select! {
        biased;
        answer = answer => match answer {
            Ok(Answer::Response { body, content_type }) => {
                lease.retire = false;
                Called::Response { body, content_type }
            }
            Ok(Answer::Error { error_type, body, .. }) => {
                lease.retire = false;
                let (reported_type, message) = reported_error(&body);
                Called::FunctionError {
                    error_type: reported_type.unwrap_or(error_type),
                    message: message.unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned()),
                    body,
                }
            }
            Ok(Answer::TooLarge) => {
                lease.retire = false;
                Called::Failed {
                    error_type: "Function.ResponseSizeTooLarge".to_owned(),
                    message: format!(
                        "RequestId: {request_id} Error: the response is larger than {} bytes",
                        crate::runtime_api::MAX_PAYLOAD_BYTES
                    ),
                }
            }
            // The Runtime API let the answer go without one: the instance went away
            // (its exit is reported as such), or its answer could not be read.
            Err(_) => match tokio::time::timeout(timeout.saturating_sub(started.elapsed()), process.exited()).await {
                Ok(exit) => exit_error(pool, &request_id, exit),
                Err(_) => {
                    // Retired either way; killed only when nothing else runs in it.
                    if pool.spec.instance_concurrency <= 1 {
                        process.kill();
                    }
                    Called::Failed {
                        error_type: "Runtime.TruncatedResponse".to_owned(),
                        message: format!("RequestId: {request_id} Error: the runtime's answer could not be read"),
                    }
                }
            },
        },
        exit = process.exited() => exit_error(pool, &request_id, exit),
        () = tokio::time::sleep(timeout) => {
            // Lambda's sandbox reset: the instance and everything it forked go. With
            // multi-concurrency the others in flight finish first: the instance
            // only takes no new invocation (the lease stays retired).
            if pool.spec.instance_concurrency <= 1 {
                process.kill();
            }
            pool.shared.metrics.function_timeouts.get_or_create(&pool.labels).inc();
            tracing::warn!(function = %pool.spec.name, instance = %lease.instance.label, request_id = %request_id, timeout_ms = timeout.as_millis() as u64, "invocation timed out; the instance is killed (or, with multi-concurrency, stopped once its other invocations end)");
            Called::Failed {
                error_type: "Sandbox.Timedout".to_owned(),
                message: format!("RequestId: {request_id} Error: Task timed out after {}", seconds(timeout)),
            }
        }
    }
}

fn exit_error(pool: &Pool, request_id: &str, exit: crate::process::Exit) -> Called {
    let error_type = if exit == crate::process::Exit::OutOfMemory {
        pool.shared
            .metrics
            .function_oom_kills
            .get_or_create(&pool.labels)
            .inc();
        "Runtime.OutOfMemory"
    } else {
        pool.shared
            .metrics
            .function_crashes
            .get_or_create(&pool.labels)
            .inc();
        "Runtime.ExitError"
    };
    tracing::warn!(function = %pool.spec.name, request_id = %request_id, %exit, memory_mb = pool.spec.memory_mb, "instance exited during an invocation");
    Called::Failed {
        error_type: error_type.to_owned(),
        message: format!("RequestId: {request_id} Error: Runtime exited with error: {exit}"),
    }
}

/// A response: a structured CloudEvent in it is the function's reply; anything else
/// non-empty is its answer.
fn delivered(body: Bytes, content_type: Option<String>) -> Outcome {
    if body.is_empty() {
        return Outcome::delivered();
    }
    if body.first() == Some(&b'{')
        && let Ok(reply) = parse_structured(&body)
    {
        return Outcome::Delivered {
            reply: Some(Box::new(reply)),
            answer: None,
        };
    }
    Outcome::Delivered {
        reply: None,
        answer: Some(Box::new(FunctionAnswer {
            body,
            content_type: content_type.or_else(|| Some("application/json".to_owned())),
        })),
    }
}
