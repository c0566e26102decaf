//! (l) Function logs under a noisy neighbour: a quiet Lambda handler (Python,
//! awslambdaric) invoked one call at a time through the Invoke API, alone and then
//! while a second function prints 10,000 lines a second (each line stored in the logs
//! stream and written to Switchyard's own log, here a file at level info). Reported:
//! the quiet calls' latency in both phases (their ratio is the slowdown), the noisy
//! lines printed, stored in the stream and left out of it, and the noisy lines in
//! Switchyard's own log (which must hold every one).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::{Nats, config_header, free_port, milliseconds, percentile, wait_ready};

/// Sequential calls of the quiet function; their latencies, sorted.
async fn quiet_calls(
    client: &reqwest::Client,
    url: &str,
    calls: usize,
) -> anyhow::Result<Vec<Duration>> {
    let mut latencies = Vec::with_capacity(calls);
    for index in 0..calls {
        let started = Instant::now();
        let response = client
            .post(url)
            .body(format!(
                r#"{{"id":"q-{index}","data":{{"action":"echo"}}}}"#
            ))
            .send()
            .await?;
        anyhow::ensure!(
            response.status() == 200,
            "quiet call answered {}",
            response.status()
        );
        let _ = response.bytes().await?;
        latencies.push(started.elapsed());
    }
    latencies.sort_unstable();
    Ok(latencies)
}

async fn metric(client: &reqwest::Client, admin_port: u16, name: &str) -> f64 {
    let text = client
        .get(format!("http://127.0.0.1:{admin_port}/metrics"))
        .send()
        .await
        .ok();
    let text = match text {
        Some(response) => response.text().await.unwrap_or_default(),
        None => String::new(),
    };
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

pub(crate) async fn bench_logs(nats: &Nats, binary: &Path, quick: bool) -> anyhow::Result<()> {
    let calls = if quick { 200 } else { 1_000 };
    let (rate, seconds) = (10_000u64, if quick { 5u64 } else { 20 });
    let python = std::env::var("SWITCHYARD_LAMBDA_PYTHON")
        .context("SWITCHYARD_LAMBDA_PYTHON is not set: run scripts/bench.sh")?;
    let handlers = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/functions/python");
    let (invoke_port, admin_port) = (free_port(), free_port());
    let prefix = format!(
        "benchlogs{}",
        &uuid::Uuid::new_v4().simple().to_string()[..6]
    );
    let mut text = config_header(&nats.url(), &prefix, admin_port)
        .replace("level = \"error\"", "level = \"info\"");
    text.push_str(&format!(
        r#"
[invoke_api]
listen = "127.0.0.1:{invoke_port}"

[[functions]]
type = "lambda"
name = "quiet"
command = [{python:?}, "-m", "awslambdaric", "app.handler"]
handler = "app.handler"
directory = {handlers:?}

[[functions]]
type = "lambda"
name = "noisy"
command = [{python:?}, "-m", "awslambdaric", "app.handler"]
handler = "app.handler"
directory = {handlers:?}
timeout = "120s"
"#,
        handlers = handlers.display().to_string(),
    ));
    let directory = tempfile::tempdir()?;
    let config = directory.path().join("logs.toml");
    std::fs::write(&config, text)?;
    let own_log = directory.path().join("switchyard.log");
    let log_file = std::fs::File::create(&own_log)?;
    let mut child = Stopped(
        Command::new(binary)
            .args(["run", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file))
            .spawn()?,
    );
    wait_ready(format!("127.0.0.1:{admin_port}").parse()?).await;
    let client = reqwest::Client::new();
    let invoke = |function: &str| {
        format!("http://127.0.0.1:{invoke_port}/2015-03-31/functions/{function}/invocations")
    };
    // Warm: both functions have an instance.
    quiet_calls(&client, &invoke("quiet"), 20).await?;
    let alone = quiet_calls(&client, &invoke("quiet"), calls).await?;

    // The noisy function, asynchronously (an Event invocation), then the quiet calls
    // while it prints.
    let response = client
        .post(invoke("noisy"))
        .header("X-Amz-Invocation-Type", "Event")
        .body(format!(
            r#"{{"id":"noise","data":{{"action":"print_rate","rate":{rate},"seconds":{seconds}}}}}"#
        ))
        .send()
        .await?;
    anyhow::ensure!(
        response.status() == 202,
        "the noisy invocation answered {}",
        response.status()
    );
    // Until its lines flow.
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(
        &client,
        admin_port,
        "switchyard_function_log_lines_total{function=\"noisy\"}",
    )
    .await
        < 1_000.0
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the noisy function printed nothing"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let noisy_started = Instant::now();
    let beside = quiet_calls(&client, &invoke("quiet"), calls).await?;
    let overlapped = noisy_started.elapsed() < Duration::from_secs(seconds);
    // Until it is done: its REPORT stored or left out (counted either way).
    let expected = (rate * seconds) as f64;
    let deadline = Instant::now() + Duration::from_secs(seconds + 120);
    let (stored, dropped) = loop {
        let stored = metric(
            &client,
            admin_port,
            "switchyard_function_log_lines_total{function=\"noisy\"}",
        )
        .await;
        let dropped = metric(
            &client,
            admin_port,
            "switchyard_function_log_lines_dropped_total{function=\"noisy\"}",
        )
        .await;
        if stored + dropped >= expected {
            break (stored, dropped);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the noisy function did not finish: {stored} stored, {dropped} left out"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let _ = terminate(&mut child.0);
    let own = std::fs::read_to_string(&own_log)?;
    let in_own_log = own.matches("noise noise ").count();

    println!(
        "### (l) function logs: a quiet handler's calls alone and beside one printing {rate} lines/s for {seconds}s\n"
    );
    println!(
        "| quiet calls ({calls}, one at a time) | p50 ms | p90 ms | p99 ms |\n|---|---|---|---|"
    );
    for (label, latencies) in [("alone", &alone), ("beside the noisy function", &beside)] {
        println!(
            "| {label} | {} | {} | {} |",
            milliseconds(percentile(latencies, 0.5)),
            milliseconds(percentile(latencies, 0.9)),
            milliseconds(percentile(latencies, 0.99)),
        );
    }
    println!(
        "\nslowdown: p50 {:.2}x, p99 {:.2}x{}\n",
        percentile(&beside, 0.5).as_secs_f64() / percentile(&alone, 0.5).as_secs_f64(),
        percentile(&beside, 0.99).as_secs_f64() / percentile(&alone, 0.99).as_secs_f64(),
        if overlapped {
            ""
        } else {
            " (the quiet calls outlasted the noise: raise the seconds)"
        }
    );
    println!(
        "noisy lines: {} printed, {stored:.0} stored in the logs stream (with its START/END/REPORT), {dropped:.0} left out of it, {in_own_log} in switchyard's own log\n",
        rate * seconds
    );
    Ok(())
}

/// The `switchyard` process, killed if the bench ends early (an error).
struct Stopped(std::process::Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// SIGTERM, then wait (the log file is complete once the process is gone).
fn terminate(child: &mut std::process::Child) -> std::io::Result<()> {
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            child.kill()?;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
