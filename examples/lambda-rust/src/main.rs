//! A Lambda function on the official Rust runtime client (`lambda_runtime`), exactly
//! as one would deploy it to AWS: Switchyard runs the same binary as a `lambda`
//! function. It echoes the event's data with what its context says; `{"action":
//! "raise"}` makes it fail with its own error type.

use lambda_runtime::{Diagnostic, LambdaEvent, service_fn};
use serde_json::{Value, json};

/// The handler's own error: Lambda reports its type and message.
#[derive(Debug)]
struct BadInput(String);

impl From<BadInput> for Diagnostic {
    fn from(error: BadInput) -> Diagnostic {
        Diagnostic {
            error_type: "BadInput".to_owned(),
            error_message: error.0,
        }
    }
}

async fn handler(event: LambdaEvent<Value>) -> Result<Value, BadInput> {
    // When the handler was entered, in microseconds since the epoch: the benchmark
    // measures cold starts up to here.
    let entered_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_micros() as u64);
    let (payload, context) = event.into_parts();
    let data = payload.get("data").cloned().unwrap_or(Value::Null);
    if data.get("action").and_then(Value::as_str) == Some("raise") {
        let value = data["value"].as_str().unwrap_or_default();
        return Err(BadInput(format!("bad input: {value}")));
    }
    Ok(json!({
        "echo": data,
        "event_id": payload["id"],
        "function": context.env_config.function_name,
        "memory": context.env_config.memory,
        "arn": context.invoked_function_arn,
        "request_id": context.request_id,
        "pid": std::process::id(),
        "runtime": "rust",
        "entered_us": entered_us,
    }))
}

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    // The tests count cold starts by the lines of this file.
    if let Ok(path) = std::env::var("STARTS_FILE") {
        use std::io::Write as _;
        let mut starts = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        writeln!(starts, "{}", std::process::id())?;
    }
    lambda_runtime::run(service_fn(handler)).await
}
