//! (i) Deploys through the Lambda control plane, while 8 callers invoke the function
//! without pause through the Invoke API:
//!
//! - from UpdateFunctionCode being sent to the first answer from the new code (a
//!   call sent after the update), beside the bare cold start of a Python handler
//!   under awslambdaric (spawn to handler entered, `functions::bare_start`): the new
//!   code's instance has to start, so the bare start is the floor;
//! - from UpdateFunctionCode to GetFunctionConfiguration saying `Successful` (what
//!   `aws lambda wait function-updated-v2` waits for);
//! - the callers' latency in the second after each update beside their steady
//!   latency between updates, and every failed call.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::json;
use switchyard::deploy::LambdaClient;

use crate::{Nats, config_header, free_port, milliseconds, percentile, wait_ready};

/// One answered (or failed) call: when it was sent, its latency, the version that
/// answered (`None`: failed).
struct Call {
    sent: Instant,
    latency: Duration,
    version: Option<u64>,
}

fn package(version: u64, directory: &std::path::Path) -> anyhow::Result<String> {
    std::fs::write(
        directory.join("main.py"),
        format!("def handler(event, context):\n    return {{\"version\": {version}}}\n"),
    )?;
    Ok(base64::engine::general_purpose::STANDARD
        .encode(switchyard::deploy::zip_directory(directory)?))
}

/// Waits until GetFunctionConfiguration says the last update succeeded.
async fn wait_updated(client: &LambdaClient) -> anyhow::Result<()> {
    loop {
        let (_, answer) = client
            .call(
                reqwest::Method::GET,
                "/2015-03-31/functions/deployed/configuration",
                None,
            )
            .await?;
        if answer["State"] == "Active" && answer["LastUpdateStatus"] == "Successful" {
            return Ok(());
        }
        anyhow::ensure!(
            answer["LastUpdateStatus"] != "Failed",
            "the update failed: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub async fn bench_deploy(
    nats: &Nats,
    binary: &std::path::Path,
    quick: bool,
) -> anyhow::Result<()> {
    let rounds = if quick { 3 } else { 10 };
    let prefix = format!(
        "benchdeploy{}",
        uuid::Uuid::new_v4()
            .simple()
            .to_string()
            .get(..6)
            .unwrap_or("x")
    );
    let (invoke_port, admin_port) = (free_port(), free_port());
    let data = tempfile::tempdir()?;
    let mut text = config_header(&nats.url(), &prefix, admin_port);
    text.push_str(&format!(
        "[invoke_api]\nlisten = \"127.0.0.1:{invoke_port}\"\nmax_wait = \"30s\"\n[workers]\ndata_directory = {:?}\n",
        data.path().display().to_string()
    ));
    let config = data.path().join("deploy.toml");
    std::fs::write(&config, text)?;
    let mut child = std::process::Command::new(binary)
        .args(["run", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    wait_ready(format!("127.0.0.1:{admin_port}").parse()?).await;
    let base = format!("http://127.0.0.1:{invoke_port}");
    let client = LambdaClient::new(base.clone(), "us-east-1".to_owned(), None);
    let code = tempfile::tempdir()?;
    let created = client
        .call(
            reqwest::Method::POST,
            "/2015-03-31/functions",
            Some(&json!({
                "FunctionName": "deployed",
                "Runtime": "python3.12",
                "Handler": "main.handler",
                "Role": "arn:aws:iam::000000000000:role/bench",
                "MemorySize": 256,
                "Code": { "ZipFile": package(0, code.path())? },
            })),
        )
        .await?;
    anyhow::ensure!(
        created.0.is_success(),
        "creating the function: {:?}",
        created.1
    );
    wait_updated(&client).await?;

    // Eight callers without pause, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let url = format!("{base}/2015-03-31/functions/deployed/invocations");
    let callers: Vec<_> = (0..8)
        .map(|_| {
            let (stop, url) = (stop.clone(), url.clone());
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                let mut calls = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let sent = Instant::now();
                    let answer = http.post(&url).body("{}").send().await;
                    let version = match answer {
                        Ok(response)
                            if response.status().is_success()
                                && !response.headers().contains_key("x-amz-function-error") =>
                        {
                            response
                                .bytes()
                                .await
                                .ok()
                                .and_then(|body| {
                                    serde_json::from_slice::<serde_json::Value>(&body).ok()
                                })
                                .and_then(|body| body["version"].as_u64())
                        }
                        _ => None,
                    };
                    calls.push(Call {
                        sent,
                        latency: sent.elapsed(),
                        version,
                    });
                }
                calls
            })
        })
        .collect();

    let mut updates = Vec::new();
    for version in 1..=rounds {
        // Steady load between updates.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let zip = package(version, code.path())?;
        let sent = Instant::now();
        let (status, answer) = client
            .call(
                reqwest::Method::PUT,
                "/2015-03-31/functions/deployed/code",
                Some(&json!({ "ZipFile": zip })),
            )
            .await?;
        anyhow::ensure!(status.is_success(), "updating the code: {answer}");
        wait_updated(&client).await?;
        updates.push((version, sent, sent.elapsed()));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let mut calls = Vec::new();
    for caller in callers {
        calls.extend(caller.await?);
    }
    let _ = child.kill();
    let _ = child.wait();

    let python = crate::functions::handlers()?
        .into_iter()
        .find(|handler| handler.name.starts_with("python"))
        .expect("the python handler");
    let mut bare = Vec::new();
    for _ in 0..rounds {
        bare.push(crate::functions::bare_start(&python).await?);
    }
    bare.sort_unstable();

    let mut to_new_code = Vec::new();
    let mut to_successful = Vec::new();
    let mut during = Vec::new();
    for (version, sent, successful) in &updates {
        to_successful.push(*successful);
        if let Some(first) = calls
            .iter()
            .filter(|call| call.sent >= *sent && call.version == Some(*version))
            .map(|call| call.sent + call.latency)
            .min()
        {
            to_new_code.push(first - *sent);
        }
        during.extend(
            calls
                .iter()
                .filter(|call| {
                    call.version.is_some()
                        && call.sent >= *sent
                        && call.sent < *sent + Duration::from_secs(1)
                })
                .map(|call| call.latency),
        );
    }
    let steady: Vec<Duration> = {
        let mut steady: Vec<Duration> = calls
            .iter()
            .filter(|call| {
                call.version.is_some()
                    && updates.iter().all(|(_, sent, _)| {
                        call.sent + call.latency < *sent
                            || call.sent >= *sent + Duration::from_secs(1)
                    })
            })
            .map(|call| call.latency)
            .collect();
        steady.sort_unstable();
        steady
    };
    to_new_code.sort_unstable();
    to_successful.sort_unstable();
    during.sort_unstable();
    let failed = calls.iter().filter(|call| call.version.is_none()).count();
    println!("### (i) deploys: UpdateFunctionCode while 8 callers invoke, {rounds} updates\n");
    println!("| measure | p50 ms | max ms |\n|---|---|---|");
    println!(
        "| UpdateFunctionCode sent → first answer from the new code | {} | {} |",
        milliseconds(percentile(&to_new_code, 0.5)),
        milliseconds(percentile(&to_new_code, 1.0)),
    );
    println!(
        "| UpdateFunctionCode sent → LastUpdateStatus Successful | {} | {} |",
        milliseconds(percentile(&to_successful, 0.5)),
        milliseconds(percentile(&to_successful, 1.0)),
    );
    println!(
        "| bare cold start of a Python handler under awslambdaric (baseline) | {} | {} |",
        milliseconds(percentile(&bare, 0.5)),
        milliseconds(percentile(&bare, 1.0)),
    );
    println!("\n| callers' latency | calls | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|");
    for (name, latencies) in [
        ("steady, between updates", &steady),
        ("in the second after each update", &during),
    ] {
        println!(
            "| {name} | {} | {} | {} | {} |",
            latencies.len(),
            milliseconds(percentile(latencies, 0.5)),
            milliseconds(percentile(latencies, 0.99)),
            milliseconds(percentile(latencies, 1.0)),
        );
    }
    println!(
        "\nnew code reached in {} of {rounds} updates; failed calls: {failed} of {}\n",
        to_new_code.len(),
        calls.len()
    );
    Ok(())
}
