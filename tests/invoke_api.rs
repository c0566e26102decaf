//! Lambda's Invoke API against a real nats-server, called by AWS's own clients
//! (boto3 and the AWS CLI, installed by scripts/install-deps.sh) with dummy
//! credentials, the handler run by awslambdaric.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;
use switchyard_bus::async_nats;

use common::{NatsServer, Switchyard, WAIT, base_config, installed, random_name};

/// Switchyard with the Invoke API on and one `lambda` function running the test
/// handlers (`app.handler`).
async fn start(function: &str, extra: &str, invoke_api: &str) -> (NatsServer, Switchyard) {
    let nats = NatsServer::start();
    let text = config(&nats, function, extra, invoke_api);
    let switchyard = Switchyard::start(text).await;
    (nats, switchyard)
}

fn config(nats: &NatsServer, function: &str, extra: &str, invoke_api: &str) -> String {
    let mut text = base_config(&nats.url(), 0, 0);
    text.push_str(&format!(
        r#"
[invoke_api]
listen = "127.0.0.1:0"
{invoke_api}

[[functions]]
type = "lambda"
name = "{function}"
command = ["{python}", "-m", "awslambdaric", "app.handler"]
handler = "app.handler"
directory = "{directory}"
timeout = "20s"
{extra}
"#,
        python = installed("SWITCHYARD_LAMBDA_PYTHON"),
        directory = common::test_functions().join("python").display(),
    ));
    text
}

/// One boto3 `invoke`, as JSON: StatusCode, FunctionError, ExecutedVersion, Payload.
async fn boto3_invoke(
    endpoint: &str,
    function: &str,
    invocation_type: &str,
    payload: serde_json::Value,
) -> serde_json::Value {
    boto3_invoke_logged(endpoint, function, invocation_type, payload, "None").await
}

/// As [`boto3_invoke`], with boto3's `LogType`; the decoded log is in `Log`.
async fn boto3_invoke_logged(
    endpoint: &str,
    function: &str,
    invocation_type: &str,
    payload: serde_json::Value,
    log_type: &str,
) -> serde_json::Value {
    boto3_invoke_as(
        endpoint,
        function,
        invocation_type,
        payload,
        log_type,
        ("test", "test"),
    )
    .await
}

/// As [`boto3_invoke_logged`], signing with the access key `(id, secret)`.
async fn boto3_invoke_as(
    endpoint: &str,
    function: &str,
    invocation_type: &str,
    payload: serde_json::Value,
    log_type: &str,
    key: (&str, &str),
) -> serde_json::Value {
    let (key_id, secret) = (key.0.to_owned(), key.1.to_owned());
    let python = installed("SWITCHYARD_AWS_PYTHON");
    let script = common::test_functions().join("invoke_with_boto3.py");
    let arguments = vec![
        script.display().to_string(),
        endpoint.to_owned(),
        function.to_owned(),
        invocation_type.to_owned(),
        payload.to_string(),
        log_type.to_owned(),
    ];
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .args(arguments)
            .env("INVOKE_ACCESS_KEY_ID", key_id)
            .env("INVOKE_SECRET_ACCESS_KEY", secret)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "boto3 failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|error| panic!("{error}: {}", String::from_utf8_lossy(&output.stdout)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boto3_and_the_aws_cli_invoke_a_lambda_function_as_they_would_on_aws() {
    let function = random_name("sync");
    let (_nats, switchyard) = start(&function, "", "").await;
    let endpoint = format!("http://{}", switchyard.invoke_api.expect("invoke api on"));

    // RequestResponse: the request body is the event; the handler's answer comes back.
    let answer = boto3_invoke(
        &endpoint,
        &function,
        "RequestResponse",
        serde_json::json!({"id": "direct-1", "data": {"action": "echo", "order": 7}}),
    )
    .await;
    assert_eq!(answer["StatusCode"], 200, "{answer}");
    assert_eq!(answer["FunctionError"], serde_json::Value::Null);
    assert_eq!(answer["ExecutedVersion"], "$LATEST");
    assert_eq!(answer["Payload"]["echo"]["order"], 7);
    assert_eq!(answer["Payload"]["event_id"], "direct-1");
    assert_eq!(answer["Payload"]["function"], function.as_str());

    // LogType Tail: the invocation's log comes back with the answer.
    let logged = boto3_invoke_logged(
        &endpoint,
        &function,
        "RequestResponse",
        serde_json::json!({"id": "tail-1", "data": {"action": "echo"}}),
        "Tail",
    )
    .await;
    assert_eq!(logged["StatusCode"], 200);
    let log = logged["Log"].as_str().expect("a log came back");
    assert!(log.starts_with("START RequestId: "), "{log}");
    assert!(log.contains("echoing tail-1"), "{log}");
    assert!(log.contains("\nEND RequestId: "), "{log}");
    assert!(log.contains("\nREPORT RequestId: "), "{log}");

    // A handler that raises: 200, FunctionError Unhandled, the error document.
    let raised = boto3_invoke(
        &endpoint,
        &function,
        "RequestResponse",
        serde_json::json!({"data": {"action": "raise", "value": "y"}}),
    )
    .await;
    assert_eq!(raised["StatusCode"], 200);
    assert_eq!(raised["FunctionError"], "Unhandled");
    assert_eq!(raised["Payload"]["errorType"], "ValueError");
    assert_eq!(raised["Payload"]["errorMessage"], "bad input: y");

    // DryRun: 204; an unknown function: ResourceNotFoundException.
    let dry = boto3_invoke(&endpoint, &function, "DryRun", serde_json::json!({})).await;
    assert_eq!(dry["StatusCode"], 204);
    let missing = boto3_invoke(&endpoint, "nope", "RequestResponse", serde_json::json!({})).await;
    assert_eq!(missing["error"], "ResourceNotFoundException", "{missing}");

    // The AWS CLI (v1, from PyPI: `--payload` is the JSON itself), as a user would
    // type it.
    let directory = tempfile::tempdir().unwrap();
    let out = directory.path().join("out.json");
    let printed = aws_cli(vec![
        "lambda".into(),
        "invoke".into(),
        "--endpoint-url".into(),
        endpoint.clone(),
        "--region".into(),
        "us-east-1".into(),
        "--function-name".into(),
        function.clone(),
        "--payload".into(),
        r#"{"id": "cli-1", "data": {"action": "echo", "order": 8}}"#.into(),
        out.display().to_string(),
    ])
    .await;
    assert_eq!(printed["StatusCode"], 200, "{printed}");
    let written: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(written["echo"]["order"], 8);
    assert_eq!(written["event_id"], "cli-1");

    // `switchyard invoke`: the answer printed; a failed function exits 1.
    let address = switchyard.invoke_api.unwrap().to_string();
    let (ok, printed) = common::run_cli(
        Path::new("/nonexistent.toml"),
        &[
            "invoke",
            &function,
            "--invoke-api",
            &address,
            "--data",
            r#"{"data": {"action": "echo", "order": 9}}"#,
        ],
    );
    assert!(ok, "{printed}");
    let printed: serde_json::Value = serde_json::from_str(printed.trim()).unwrap();
    assert_eq!(printed["echo"]["order"], 9);
    let (ok, printed) = common::run_cli(
        Path::new("/nonexistent.toml"),
        &[
            "invoke",
            &function,
            "--invoke-api",
            &address,
            "--data",
            r#"{"data": {"action": "raise", "value": "z"}}"#,
        ],
    );
    assert!(!ok);
    assert!(printed.contains("bad input: z"), "{printed}");
    switchyard.stop().await;
}

/// Starts a 3-second call of the function at `url` and waits (bounded) until
/// `switchyard` runs it; the task answers the call's status.
async fn hold_the_function(
    client: &reqwest::Client,
    url: &str,
    switchyard: &Switchyard,
) -> tokio::task::JoinHandle<reqwest::StatusCode> {
    let slow = {
        let client = client.clone();
        let url = url.to_owned();
        tokio::spawn(async move {
            client
                .post(url)
                .body(r#"{"data": {"action": "sleep", "seconds": 3}}"#)
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    let deadline = Instant::now() + WAIT;
    loop {
        let status = switchyard.admin_json("/v1/functions").await;
        if status["functions"][0]["instances"]["busy"] == 1 {
            return slow;
        }
        assert!(
            Instant::now() < deadline,
            "the slow call never ran: {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_function_answers_429_after_the_bounded_wait() {
    let function = random_name("full");
    let (_nats, switchyard) = start(&function, "max_concurrency = 1", "max_wait = \"200ms\"").await;
    let url = format!(
        "http://{}/2015-03-31/functions/{function}/invocations",
        switchyard.invoke_api.expect("invoke api on")
    );
    let client = reqwest::Client::new();
    // One slow call holds the function's only place...
    let slow = hold_the_function(&client, &url, &switchyard).await;
    // ...so the next waits 200ms, then gets Lambda's throttling answer.
    let throttled = client
        .post(&url)
        .body(r#"{"data": {"action": "echo"}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(throttled.status(), 429);
    assert_eq!(throttled.headers()["retry-after"], "1");
    assert_eq!(
        throttled.headers()["x-amzn-errortype"],
        "TooManyRequestsException"
    );
    assert_eq!(slow.await.unwrap(), 200);
    switchyard.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_functions_cluster_budget_holds_synchronous_calls_across_processes() {
    // Two Switchyard processes, one configuration: max_concurrency = 1 across both
    // (concurrency_scope = "cluster", the default).
    let nats = NatsServer::start();
    let function = random_name("shared");
    let text = config(
        &nats,
        &function,
        "max_concurrency = 1",
        "max_wait = \"300ms\"",
    );
    let first = Switchyard::start(text.clone()).await;
    let second = Switchyard::start(text).await;
    let url = |switchyard: &Switchyard| {
        format!(
            "http://{}/2015-03-31/functions/{function}/invocations",
            switchyard.invoke_api.expect("invoke api on")
        )
    };
    let client = reqwest::Client::new();
    let slow = hold_the_function(&client, &url(&first), &first).await;
    // The other process has its own local budget free, but the function's one
    // cluster slot is taken.
    let throttled = client
        .post(url(&second))
        .body(r#"{"data": {"action": "echo"}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(throttled.status(), 429);
    assert_eq!(slow.await.unwrap(), 200);
    // Free again: the other process calls it, once the slot has moved over (a
    // caller retries 429s, as AWS's clients do).
    let deadline = Instant::now() + WAIT;
    loop {
        let answered = client
            .post(url(&second))
            .body(r#"{"data": {"action": "echo", "order": 3}}"#)
            .send()
            .await
            .unwrap();
        if answered.status() == 200 {
            break;
        }
        assert_eq!(answered.status(), 429);
        assert!(Instant::now() < deadline, "the slot never came back");
    }
    second.stop().await;
    first.stop().await;
}

/// Runs the AWS CLI (v1, from PyPI) with dummy credentials; its stdout as JSON.
async fn aws_cli(arguments: Vec<String>) -> serde_json::Value {
    aws_cli_as(arguments, ("test", "test")).await
}

/// Runs the AWS CLI signing with the access key `(id, secret)`; its stdout as JSON.
async fn aws_cli_as(arguments: Vec<String>, key: (&str, &str)) -> serde_json::Value {
    let cli = installed("SWITCHYARD_AWS_CLI");
    let (key_id, secret) = (key.0.to_owned(), key.1.to_owned());
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(cli)
            .args(arguments)
            .env("AWS_ACCESS_KEY_ID", key_id)
            .env("AWS_SECRET_ACCESS_KEY", secret)
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "the aws cli failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_invocations_are_stored_then_delivered_with_retries_and_a_dead_letter() {
    let function = random_name("async");
    let nats = NatsServer::start();
    let results = format!("results.{function}");
    let client = async_nats::connect(nats.url()).await.unwrap();
    let mut answers = client.subscribe(results.clone()).await.unwrap();
    client.flush().await.unwrap();
    let text = config(
        &nats,
        &function,
        &format!(
            r#"async = {{ attempts = 2, retry_delay = "50ms", on_success = {{ type = "nats", subject = "{results}" }} }}"#
        ),
        "",
    );
    let switchyard = Switchyard::start(text).await;
    let endpoint = format!("http://{}", switchyard.invoke_api.expect("invoke api on"));

    // boto3's InvocationType=Event: 202 once stored, then the handler runs it with
    // the payload as given and the request id the caller was told.
    let accepted = boto3_invoke(
        &endpoint,
        &function,
        "Event",
        serde_json::json!({"id": "async-1", "data": {"action": "echo", "order": 5}}),
    )
    .await;
    assert_eq!(accepted["StatusCode"], 202, "{accepted}");
    assert_eq!(accepted["Payload"], serde_json::Value::Null);
    let request_id = accepted["RequestId"]
        .as_str()
        .expect("a request id")
        .to_owned();
    let answer = tokio::time::timeout(WAIT, answers.next())
        .await
        .expect("the Event invocation ran")
        .unwrap();
    let answer: serde_json::Value = serde_json::from_slice(&answer.payload).unwrap();
    assert_eq!(answer["echo"]["order"], 5, "{answer}");
    assert_eq!(answer["event_id"], "async-1");
    assert_eq!(answer["request_id"], request_id.as_str());

    // The AWS CLI's --invocation-type Event.
    let printed = aws_cli(vec![
        "lambda".into(),
        "invoke".into(),
        "--endpoint-url".into(),
        endpoint.clone(),
        "--region".into(),
        "us-east-1".into(),
        "--function-name".into(),
        function.clone(),
        "--invocation-type".into(),
        "Event".into(),
        "--payload".into(),
        r#"{"id": "async-2", "data": {"action": "echo", "order": 6}}"#.into(),
        "/dev/null".into(),
    ])
    .await;
    assert_eq!(printed["StatusCode"], 202, "{printed}");
    let answer = tokio::time::timeout(WAIT, answers.next())
        .await
        .expect("the CLI's Event invocation ran")
        .unwrap();
    let answer: serde_json::Value = serde_json::from_slice(&answer.payload).unwrap();
    assert_eq!(answer["event_id"], "async-2", "{answer}");

    // `switchyard invoke --async`.
    let address = switchyard.invoke_api.unwrap().to_string();
    let (ok, printed) = common::run_cli(
        Path::new("/nonexistent.toml"),
        &[
            "invoke",
            &function,
            "--async",
            "--invoke-api",
            &address,
            "--data",
            r#"{"id": "async-3", "data": {"action": "echo"}}"#,
        ],
    );
    assert!(ok, "{printed}");
    assert!(printed.contains("stored; request id "), "{printed}");
    let answer = tokio::time::timeout(WAIT, answers.next())
        .await
        .expect("the CLI's --async invocation ran")
        .unwrap();
    let answer: serde_json::Value = serde_json::from_slice(&answer.payload).unwrap();
    assert_eq!(answer["event_id"], "async-3", "{answer}");

    // A handler that raises: retried per `async`, then dead-lettered by the
    // function's own trigger, the same request id on every attempt.
    let raised = boto3_invoke(
        &endpoint,
        &function,
        "Event",
        serde_json::json!({"id": "async-4", "data": {"action": "raise", "value": "q"}}),
    )
    .await;
    assert_eq!(raised["StatusCode"], 202);
    let dead = common::wait_for_dead_letters(
        &switchyard.bus().await,
        &format!("invoke-{function}"),
        1,
        WAIT,
    )
    .await;
    let dead = &dead[0].dead_letter;
    assert_eq!(dead.attempts, 2);
    assert_eq!(dead.last_error, "ValueError: bad input: q");
    assert_eq!(dead.event.id, raised["RequestId"].as_str().unwrap());
    let stored: serde_json::Value = serde_json::from_slice(&dead.event.data).unwrap();
    assert_eq!(stored["id"], "async-4");
    // Each successful invocation ran once.
    assert_eq!(
        switchyard
            .metric("switchyard_dispatch_succeeded_total")
            .await,
        3.0
    );

    // Not JSON: refused at the door, as Lambda does; too large for the bus: 413.
    let url = format!("{endpoint}/2015-03-31/functions/{function}/invocations");
    let http = reqwest::Client::new();
    let refused = http
        .post(&url)
        .header("x-amz-invocation-type", "Event")
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    assert_eq!(
        refused.headers()["x-amzn-errortype"],
        "InvalidRequestContentException"
    );
    let large = format!("\"{}\"", "x".repeat(2 * 1024 * 1024));
    let refused = http
        .post(&url)
        .header("x-amz-invocation-type", "Event")
        .body(large)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 413);
    assert_eq!(
        refused.headers()["x-amzn-errortype"],
        "RequestTooLargeException"
    );
    switchyard.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_credentials_only_requests_signed_by_a_known_key_are_served() {
    let function = random_name("signed");
    let (_nats, switchyard) = start(
        &function,
        "",
        r#"credentials = [{ access_key_id = "AKIDSWITCHYARD", secret_access_key = "s3cr3t/with+chars" }]"#,
    )
    .await;
    let endpoint = format!("http://{}", switchyard.invoke_api.expect("invoke api on"));
    let payload = serde_json::json!({"id": "signed-1", "data": {"action": "echo", "order": 1}});
    // boto3 signs with SigV4, as for Lambda: the right key is served...
    let answer = boto3_invoke_as(
        &endpoint,
        &function,
        "RequestResponse",
        payload.clone(),
        "None",
        ("AKIDSWITCHYARD", "s3cr3t/with+chars"),
    )
    .await;
    assert_eq!(answer["StatusCode"], 200, "{answer}");
    assert_eq!(answer["Payload"]["event_id"], "signed-1");
    // ...a wrong secret or an unknown key is refused as AWS refuses them.
    let wrong = boto3_invoke_as(
        &endpoint,
        &function,
        "RequestResponse",
        payload.clone(),
        "None",
        ("AKIDSWITCHYARD", "guess"),
    )
    .await;
    assert_eq!(wrong["error"], "InvalidSignatureException", "{wrong}");
    let unknown = boto3_invoke_as(
        &endpoint,
        &function,
        "RequestResponse",
        payload,
        "None",
        ("AKIDOTHER", "s3cr3t/with+chars"),
    )
    .await;
    assert_eq!(unknown["error"], "UnrecognizedClientException", "{unknown}");
    // Unsigned: refused before saying whether the function exists.
    let unsigned = reqwest::Client::new()
        .post(format!("{endpoint}/2015-03-31/functions/nope/invocations"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(unsigned.status(), 403);
    assert_eq!(
        unsigned.headers()["x-amzn-errortype"],
        "MissingAuthenticationTokenException"
    );
    // The AWS CLI signs the same way.
    let printed = aws_cli_as(
        vec![
            "lambda".into(),
            "invoke".into(),
            "--endpoint-url".into(),
            endpoint.clone(),
            "--region".into(),
            "eu-west-1".into(),
            "--function-name".into(),
            format!("arn:aws:lambda:eu-west-1:000000000000:function:{function}"),
            "--payload".into(),
            r#"{"id": "signed-cli"}"#.into(),
            "/dev/null".into(),
        ],
        ("AKIDSWITCHYARD", "s3cr3t/with+chars"),
    )
    .await;
    assert_eq!(printed["StatusCode"], 200, "{printed}");
    switchyard.stop().await;
}
