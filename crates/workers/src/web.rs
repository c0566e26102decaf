//! `process` instances: any command that serves HTTP on `$PORT` (a web framework, an
//! OpenFaaS of-watchdog or Knative-style container command). Ready once its readiness
//! check passes (an HTTP GET answering 2xx, or the port accepting connections); events
//! are POSTed to it in CloudEvents binary mode through the same [`HttpTarget`] as
//! `http` functions, so one function's code runs managed or unmanaged alike.
//!
//! A free loopback port is chosen by binding port 0 and closing it before the
//! instance binds it; another process could take it in between, which the readiness
//! check cannot always tell. Timeouts: the attempt fails and the instance takes no new
//! invocation; it is stopped once those it has in flight end.

use std::time::{Duration, Instant};

use switchyard_event::{Event, Failure, Outcome, Target};
use switchyard_targets::HttpTarget;

use crate::pool::{Endpoint, Instance, Lease, Pool, StartFailure};
use crate::process::OWNER_VARIABLE;

/// Starts an instance on a free port and waits until its readiness check passes, it
/// exits, or `init_timeout` passes.
pub(crate) async fn start(
    pool: &Pool,
    label: &str,
    path: &str,
    readiness_path: Option<&str>,
) -> Result<Instance, StartFailure> {
    let spec = &pool.spec;
    let port = free_port().map_err(|error| StartFailure {
        error_type: "Runtime.StartFailed".to_owned(),
        message: format!("finding a free port failed: {error}"),
        output: None,
    })?;
    let url = reqwest::Url::parse(&format!("http://127.0.0.1:{port}{path}")).map_err(|error| {
        StartFailure {
            error_type: "Runtime.StartFailed".to_owned(),
            message: format!("bad path `{path}`: {error}"),
            output: None,
        }
    })?;
    let mut environment = crate::lambda::base_environment(&spec.environment);
    environment.retain(|(name, _)| name != "PORT" && name != OWNER_VARIABLE);
    environment.push(("PORT".to_owned(), port.to_string()));
    environment.push(("SWITCHYARD_FUNCTION".to_owned(), spec.name.clone()));
    environment.push((
        "SWITCHYARD_FUNCTION_MEMORY_MB".to_owned(),
        spec.memory_mb.to_string(),
    ));
    environment.push((OWNER_VARIABLE.to_owned(), pool.shared.owner.clone()));
    let process = pool.spawn_instance(label, &environment).await?;
    let ready = tokio::select! {
        () = wait_ready(&pool.shared.http, port, readiness_path) => Ok(()),
        exit = process.exited() => Err(StartFailure {
            error_type: "Runtime.ExitError".to_owned(),
            message: format!("the process exited before it was ready: {exit} (its output is in the log)"),
            output: Some(crate::lambda::last_output(&process)),
        }),
        () = tokio::time::sleep(spec.init_timeout) => Err(StartFailure {
            error_type: "Sandbox.Timedout".to_owned(),
            message: format!(
                "not ready within {:.2} seconds ({}; its output is in the log)",
                spec.init_timeout.as_secs_f64(),
                match readiness_path {
                    Some(path) => format!("GET {path} on port {port} did not answer 2xx"),
                    None => format!("nothing accepted connections on port {port}"),
                },
            ),
            output: Some(crate::lambda::last_output(&process)),
        }),
    };
    if let Err(failure) = ready {
        process.kill();
        process.exited().await;
        return Err(failure);
    }
    Ok(Instance {
        label: label.to_owned(),
        process,
        endpoint: Endpoint::Http {
            target: HttpTarget::new(spec.name.clone(), url, pool.shared.http.clone()),
        },
        cold: Default::default(),
    })
}

fn free_port() -> std::io::Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    Ok(listener.local_addr()?.port())
}

/// Polls the readiness check until it passes (every 10 ms at first, then up to
/// every 200 ms).
async fn wait_ready(client: &reqwest::Client, port: u16, readiness_path: Option<&str>) {
    let mut pause = Duration::from_millis(10);
    loop {
        let ready = match readiness_path {
            Some(path) => client
                .get(format!("http://127.0.0.1:{port}{path}"))
                .timeout(Duration::from_secs(1))
                .send()
                .await
                .is_ok_and(|response| response.status().is_success()),
            None => tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok(),
        };
        if ready {
            return;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// One invocation: the event POSTed in binary mode, classified as for `http`
/// functions; past `timeout` the attempt fails and the instance is retired.
pub(crate) async fn invoke(pool: &Pool, lease: Lease, event: &Event, timeout: Duration) -> Outcome {
    let started_at = switchyard_event::timestamp::now_rfc3339();
    let started = Instant::now();
    let instance = lease.instance.label.clone();
    let trace = switchyard_event::telemetry::enabled()
        .then(|| switchyard_event::telemetry::event_context(event))
        .flatten();
    let cold = pool.cold_start(&lease.instance, trace.as_ref());
    let outcome = invoke_leased(pool, lease, event, timeout, started).await;
    let (status, error_type) = match &outcome {
        Outcome::Delivered { .. } => ("success", None),
        // An answer the function gave (a 4xx/5xx) is its error; no answer (timeout,
        // exit) a failure around it.
        Outcome::RetryLater { failure, .. } | Outcome::Rejected { failure } => (
            if failure.status.is_some() {
                "error"
            } else {
                "failed"
            },
            failure
                .error
                .split_once(':')
                .filter(|(kind, _)| kind.contains('.'))
                .map(|(kind, _)| kind.to_owned())
                .or_else(|| failure.status.map(|status| format!("HTTP {status}"))),
        ),
    };
    pool.recent.record(crate::recent::Invocation {
        request_id: event.id.clone(),
        instance,
        started: started_at,
        duration_ms: started.elapsed().as_secs_f64() * 1000.0,
        init_duration_ms: cold.map(|cold| cold.init.as_secs_f64() * 1000.0),
        status,
        error_type,
        trace_id: crate::recent::Invocation::sampled_trace_id(trace.as_ref()),
    });
    outcome
}

async fn invoke_leased(
    pool: &Pool,
    mut lease: Lease,
    event: &Event,
    timeout: Duration,
    started: Instant,
) -> Outcome {
    let Endpoint::Http { target } = &lease.instance.endpoint else {
        unreachable!("a process instance has an HTTP endpoint")
    };
    let process = &lease.instance.process;
    // Retired until an outcome: dropped midway (the dispatcher gave up), the instance
    // may still be working on the event.
    lease.retire = true;
    // The target's own timeout is later than ours: ours decides.
    let outcome = tokio::select! {
        biased;
        outcome = target.invoke(event, timeout + Duration::from_secs(1)) => outcome,
        () = tokio::time::sleep(timeout) => {
            pool.shared.metrics.function_timeouts.get_or_create(&pool.labels).inc();
            tracing::warn!(function = %pool.spec.name, instance = %lease.instance.label, event_id = %event.id, timeout_ms = timeout.as_millis() as u64, "invocation timed out; the instance takes no more and stops once idle");
            return Outcome::RetryLater {
                not_before: None,
                failure: Failure::new(None, format!("Sandbox.Timedout: Task timed out after {:.2} seconds", timeout.as_secs_f64())),
            };
        }
    };
    // A failure without an answer because the process died: say so, as for lambda
    // instances (its exit may be noticed a moment after the connection broke).
    if let Outcome::RetryLater { failure, .. } = &outcome
        && failure.status.is_none()
        && let Ok(exit) = tokio::time::timeout(
            Duration::from_millis(100).min(timeout.saturating_sub(started.elapsed())),
            process.exited(),
        )
        .await
    {
        lease.retire = true;
        let (error_type, counter) = if exit == crate::process::Exit::OutOfMemory {
            (
                "Runtime.OutOfMemory",
                &pool.shared.metrics.function_oom_kills,
            )
        } else {
            ("Runtime.ExitError", &pool.shared.metrics.function_crashes)
        };
        counter.get_or_create(&pool.labels).inc();
        tracing::warn!(function = %pool.spec.name, instance = %lease.instance.label, event_id = %event.id, %exit, "instance exited during an invocation");
        return Outcome::RetryLater {
            not_before: None,
            failure: Failure::new(
                None,
                format!("{error_type}: the process exited with {exit}"),
            ),
        };
    }
    // Answered, and alive: the instance goes back to the pool.
    lease.retire = false;
    outcome
}

/// Why a forwarded request got no answer from the function, in Lambda's words
/// (`Sandbox.Timedout`, `Runtime.ExitError`, an init error, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallFailure {
    pub error_type: String,
    pub message: String,
}

/// Forwards one HTTP request (a function URL's) to the leased `process` instance and
/// returns its answer; past `timeout` the instance is retired as for events.
pub(crate) async fn forward(
    pool: &Pool,
    mut lease: Lease,
    request: switchyard_targets::forward::Forward<'_>,
    timeout: Duration,
) -> Result<switchyard_targets::forward::Forwarded, CallFailure> {
    use switchyard_targets::forward::ForwardError;
    let Endpoint::Http { target } = &lease.instance.endpoint else {
        unreachable!("a process instance has an HTTP endpoint")
    };
    let started = Instant::now();
    lease.retire = true;
    let answer =
        switchyard_targets::forward::forward(target.client(), target.url(), request, timeout).await;
    match answer {
        Ok(forwarded) => {
            lease.retire = false;
            Ok(forwarded)
        }
        Err(ForwardError::TimedOut) => {
            pool.shared
                .metrics
                .function_timeouts
                .get_or_create(&pool.labels)
                .inc();
            tracing::warn!(function = %pool.spec.name, instance = %lease.instance.label, timeout_ms = timeout.as_millis() as u64, "request timed out; the instance takes no more and stops once idle");
            Err(CallFailure {
                error_type: "Sandbox.Timedout".to_owned(),
                message: format!("Task timed out after {:.2} seconds", timeout.as_secs_f64()),
            })
        }
        Err(ForwardError::TooLarge) => {
            lease.retire = false;
            Err(CallFailure {
                error_type: "Function.ResponseSizeTooLarge".to_owned(),
                message: format!(
                    "the answer is larger than {} bytes",
                    switchyard_targets::forward::MAX_FORWARDED_ANSWER_BYTES
                ),
            })
        }
        Err(ForwardError::Unreachable(error)) => {
            let process = &lease.instance.process;
            match tokio::time::timeout(
                Duration::from_millis(100).min(timeout.saturating_sub(started.elapsed())),
                process.exited(),
            )
            .await
            {
                Ok(exit) => {
                    let (error_type, counter) = if exit == crate::process::Exit::OutOfMemory {
                        (
                            "Runtime.OutOfMemory",
                            &pool.shared.metrics.function_oom_kills,
                        )
                    } else {
                        ("Runtime.ExitError", &pool.shared.metrics.function_crashes)
                    };
                    counter.get_or_create(&pool.labels).inc();
                    tracing::warn!(function = %pool.spec.name, instance = %lease.instance.label, %exit, "instance exited during a request");
                    Err(CallFailure {
                        error_type: error_type.to_owned(),
                        message: format!("the process exited with {exit}"),
                    })
                }
                // Alive but the exchange broke: the instance is not trusted again.
                Err(_) => Err(CallFailure {
                    error_type: "Function.Unreachable".to_owned(),
                    message: error,
                }),
            }
        }
    }
}
