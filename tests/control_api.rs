//! The Lambda control-plane API end to end, with AWS's own clients (the AWS CLI and
//! boto3 from PyPI) pointed at two `switchyard run` processes on one nats-server: a
//! Python function created from a zip through one process runs through both, its
//! code and configuration are updated (`aws lambda wait function-updated-v2` then
//! sees only the new code), it is deleted (404, and no process of it left); bad
//! packages, unknown runtimes, names Lambda refuses and the file's own functions are
//! refused with Lambda's errors, and nothing is stored for them.

mod common;

use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{NatsServer, Process, WAIT, installed, random_name, test_functions};
use sha2::Digest as _;

/// A zip holding `main.py` whose handler answers `version` with its pid and memory.
fn package(version: &str, extra: &[(&str, &[u8])]) -> Vec<u8> {
    let mut buffer = std::io::Cursor::new(Vec::new());
    {
        let mut writer = zip::ZipWriter::new(&mut buffer);
        let options = zip::write::SimpleFileOptions::default().unix_permissions(0o644);
        writer.start_file("main.py", options).unwrap();
        write!(
            writer,
            "import os\n\ndef handler(event, context):\n    return {{\"version\": \"{version}\", \"pid\": os.getpid(), \"memory\": context.memory_limit_in_mb, \"greeting\": os.environ.get(\"GREETING\")}}\n"
        )
        .unwrap();
        for (name, content) in extra {
            writer.start_file(*name, options).unwrap();
            writer.write_all(content).unwrap();
        }
        writer.finish().unwrap();
    }
    buffer.into_inner()
}

/// The AWS CLI (v1, PyPI) with dummy credentials: success and stdout as JSON (or
/// the error text).
async fn aws(arguments: &[&str]) -> Result<serde_json::Value, String> {
    let cli = installed("SWITCHYARD_AWS_CLI");
    let arguments: Vec<String> = arguments
        .iter()
        .map(|argument| (*argument).to_owned())
        .collect();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(cli)
            .args(&arguments)
            .args(["--region", "us-east-1", "--output", "json"])
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            .env("AWS_MAX_ATTEMPTS", "1")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    if stdout.trim().is_empty() {
        return Ok(serde_json::Value::Null);
    }
    Ok(serde_json::from_str(&stdout).unwrap_or_else(|error| panic!("{error}: {stdout}")))
}

/// Runs calls through boto3 (tests/functions/control_with_boto3.py): one answer per
/// call, `{"ok": ...}` or `{"error", "message", "status"}`.
async fn boto3(endpoint: &str, calls: serde_json::Value) -> Vec<serde_json::Value> {
    let python = installed("SWITCHYARD_AWS_PYTHON");
    let script = test_functions().join("control_with_boto3.py");
    let endpoint = endpoint.to_owned();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(script)
            .arg(endpoint)
            .arg(calls.to_string())
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
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// Invokes `function` through the CLI at `endpoint`; what the handler returned.
async fn invoke(endpoint: &str, function: &str, directory: &Path) -> serde_json::Value {
    let out = directory.join(format!("{}.json", uuid::Uuid::new_v4().simple()));
    let answer = aws(&[
        "lambda",
        "invoke",
        "--function-name",
        function,
        "--payload",
        "{}",
        "--endpoint-url",
        endpoint,
        out.to_str().unwrap(),
    ])
    .await
    .unwrap_or_else(|error| panic!("invoking {function} at {endpoint}: {error}"));
    assert_eq!(answer["StatusCode"], 200, "{answer}");
    assert!(
        answer.get("FunctionError").is_none(),
        "{answer}: {}",
        std::fs::read_to_string(&out).unwrap()
    );
    serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap()
}

/// Processes whose environment names `function` as their Lambda function.
fn function_processes(function: &str) -> Vec<i32> {
    let needle = format!("AWS_LAMBDA_FUNCTION_NAME={function}");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|environment| {
                environment
                    .split(|byte| *byte == 0)
                    .any(|variable| variable == needle.as_bytes())
            })
        })
        .collect()
}

fn config(nats: &NatsServer, prefix: &str, data: &Path) -> String {
    let upper = prefix.to_uppercase();
    format!(
        r#"[nats]
url = "{nats}"
subject_prefix = "{prefix}"
events_stream = {{ name = "{upper}_EVENTS", storage = "memory", duplicate_window = "1m" }}
dead_letter_stream = {{ name = "{upper}_DLQ", storage = "memory" }}

[admin]
listen = "127.0.0.1:0"

[log]
level = "${{SWITCHYARD_TEST_LOG:-warn}}"

[invoke_api]
listen = "127.0.0.1:0"

[workers]
data_directory = "{data}"

[[functions]]
type = "lambda"
name = "from-file"
command = ["{python}", "-m", "awslambdaric", "app.handler"]
handler = "app.handler"
directory = "{handlers}"
"#,
        nats = nats.url(),
        data = data.display(),
        python = installed("SWITCHYARD_LAMBDA_PYTHON"),
        handlers = test_functions().join("python").display(),
    )
}

async fn wait_until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_aws_cli_and_boto3_deploy_update_and_delete_a_function_served_by_every_process() {
    let nats = NatsServer::start();
    let prefix = random_name("c");
    let directory = tempfile::tempdir().unwrap();
    let processes: Vec<Process> = ["a", "b"]
        .iter()
        .map(|name| {
            let data = directory.path().join(format!("data-{name}"));
            let file = directory.path().join(format!("{name}.toml"));
            std::fs::write(&file, config(&nats, &prefix, &data)).unwrap();
            Process::start(&file, &[])
        })
        .collect();
    let mut endpoints = Vec::new();
    for process in &processes {
        let bound = process.wait_ready().await;
        endpoints.push(format!(
            "http://{}",
            bound.invoke_api.expect("invoke api bound")
        ));
    }
    let (a, b) = (endpoints[0].as_str(), endpoints[1].as_str());
    let function = random_name("hello");
    let v1 = package("v1", &[]);
    let v1_file = directory.path().join("v1.zip");
    std::fs::write(&v1_file, &v1).unwrap();
    let v1_uri = format!("fileb://{}", v1_file.display());

    // Create through A with the CLI, as Lambda answers: its CodeSha256, $LATEST.
    let created = aws(&[
        "lambda",
        "create-function",
        "--function-name",
        &function,
        "--runtime",
        "python3.12",
        "--handler",
        "main.handler",
        "--zip-file",
        &v1_uri,
        "--role",
        "arn:aws:iam::000000000000:role/ignored",
        "--architectures",
        "x86_64",
        "--environment",
        "Variables={GREETING=hi}",
        "--endpoint-url",
        a,
    ])
    .await
    .unwrap();
    assert_eq!(created["FunctionName"], function.as_str(), "{created}");
    assert_eq!(
        created["CodeSha256"],
        base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(&v1)),
        "{created}"
    );
    assert_eq!(created["CodeSize"], v1.len(), "{created}");
    assert_eq!(created["Version"], "$LATEST");
    assert_eq!(
        created["FunctionArn"],
        format!("arn:aws:lambda:us-east-1:000000000000:function:{function}")
    );
    aws(&[
        "lambda",
        "wait",
        "function-active-v2",
        "--function-name",
        &function,
        "--endpoint-url",
        a,
    ])
    .await
    .unwrap();
    let answer = invoke(a, &function, directory.path()).await;
    assert_eq!(answer["version"], "v1", "{answer}");
    assert_eq!(answer["greeting"], "hi", "{answer}");
    // B runs it too, created through A: once B says Active, B invokes it.
    aws(&[
        "lambda",
        "wait",
        "function-active-v2",
        "--function-name",
        &function,
        "--endpoint-url",
        b,
    ])
    .await
    .unwrap();
    let answer = invoke(b, &function, directory.path()).await;
    assert_eq!(answer["version"], "v1", "{answer}");

    // New code through B with boto3; once updated (asked of A), A serves only v2.
    let v2 = package("v2", &[("data/readme.txt", b"kept")]);
    let updated = boto3(
        b,
        serde_json::json!([{ "op": "update_function_code", "args": {
            "FunctionName": function,
            "ZipFileBase64": base64::engine::general_purpose::STANDARD.encode(&v2),
        }}]),
    )
    .await;
    assert_eq!(
        updated[0]["ok"]["CodeSha256"],
        base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(&v2)),
        "{updated:?}"
    );
    aws(&[
        "lambda",
        "wait",
        "function-updated-v2",
        "--function-name",
        &function,
        "--endpoint-url",
        a,
    ])
    .await
    .unwrap();
    for _ in 0..3 {
        let answer = invoke(a, &function, directory.path()).await;
        assert_eq!(answer["version"], "v2", "{answer}");
    }
    aws(&[
        "lambda",
        "wait",
        "function-updated-v2",
        "--function-name",
        &function,
        "--endpoint-url",
        b,
    ])
    .await
    .unwrap();
    assert_eq!(
        invoke(b, &function, directory.path()).await["version"],
        "v2"
    );

    // Configuration: memory and environment.
    let changed = aws(&[
        "lambda",
        "update-function-configuration",
        "--function-name",
        &function,
        "--memory-size",
        "256",
        "--environment",
        "Variables={GREETING=hello}",
        "--endpoint-url",
        a,
    ])
    .await
    .unwrap();
    assert_eq!(changed["MemorySize"], 256, "{changed}");
    aws(&[
        "lambda",
        "wait",
        "function-updated-v2",
        "--function-name",
        &function,
        "--endpoint-url",
        a,
    ])
    .await
    .unwrap();
    let answer = invoke(a, &function, directory.path()).await;
    assert_eq!(
        answer["memory"].to_string().trim_matches('"'),
        "256",
        "{answer}"
    );
    assert_eq!(answer["greeting"], "hello", "{answer}");
    let got = aws(&[
        "lambda",
        "get-function",
        "--function-name",
        &function,
        "--endpoint-url",
        a,
    ])
    .await
    .unwrap();
    assert_eq!(got["Configuration"]["State"], "Active", "{got}");
    assert_eq!(
        got["Configuration"]["LastUpdateStatus"], "Successful",
        "{got}"
    );
    assert_eq!(got["Configuration"]["Runtime"], "python3.12", "{got}");

    // ListFunctions shows both kinds, in pages.
    let listed = boto3(
        a,
        serde_json::json!([
            { "op": "list_functions", "args": { "MaxItems": 1 } },
            { "op": "list_functions", "args": {} },
        ]),
    )
    .await;
    let first_page = &listed[0]["ok"];
    assert_eq!(
        first_page["Functions"].as_array().unwrap().len(),
        1,
        "{first_page}"
    );
    assert!(first_page["NextMarker"].is_string(), "{first_page}");
    let names: Vec<&str> = listed[1]["ok"]["Functions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|function| function["FunctionName"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"from-file") && names.contains(&function.as_str()),
        "{names:?}"
    );
    let second_page = boto3(
        a,
        serde_json::json!([{ "op": "list_functions", "args": { "MaxItems": 1, "Marker": first_page["NextMarker"] } }]),
    )
    .await;
    assert_ne!(
        second_page[0]["ok"]["Functions"][0]["FunctionName"],
        first_page["Functions"][0]["FunctionName"]
    );

    // Delete: 404 from both, and no process of it left anywhere.
    aws(&[
        "lambda",
        "delete-function",
        "--function-name",
        &function,
        "--endpoint-url",
        b,
    ])
    .await
    .unwrap();
    for endpoint in [a, b] {
        let missing = aws(&[
            "lambda",
            "get-function",
            "--function-name",
            &function,
            "--endpoint-url",
            endpoint,
        ])
        .await
        .unwrap_err();
        assert!(missing.contains("ResourceNotFoundException"), "{missing}");
    }
    wait_until("the deleted function's instances stop", async || {
        function_processes(&function).is_empty()
    })
    .await;
    wait_until("invocations of the deleted function get 404", async || {
        let answer = boto3(
            a,
            serde_json::json!([{ "op": "invoke", "args": { "FunctionName": function, "Payload": "{}" } }]),
        )
        .await;
        answer[0]["error"] == "ResourceNotFoundException"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_packages_runtimes_and_names_get_lambdas_errors_and_nothing_is_stored() {
    let nats = NatsServer::start();
    let prefix = random_name("c");
    let directory = tempfile::tempdir().unwrap();
    let file = directory.path().join("switchyard.toml");
    std::fs::write(
        &file,
        config(&nats, &prefix, &directory.path().join("data")),
    )
    .unwrap();
    let process = Process::start(&file, &[]);
    let endpoint = format!("http://{}", process.wait_ready().await.invoke_api.unwrap());
    let encode = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let escaping = {
        let mut buffer = std::io::Cursor::new(Vec::new());
        let mut writer = zip::ZipWriter::new(&mut buffer);
        writer
            .start_file("../outside.py", zip::write::SimpleFileOptions::default())
            .unwrap();
        writer.write_all(b"x = 1\n").unwrap();
        writer.finish().unwrap();
        buffer.into_inner()
    };
    let create = |name: &str, runtime: &str, zip: &[u8]| {
        serde_json::json!({ "op": "create_function", "args": {
            "FunctionName": name, "Runtime": runtime, "Handler": "main.handler",
            "Role": "arn:aws:iam::000000000000:role/ignored", "ZipFileBase64": encode(zip),
        }})
    };
    let good = package("v1", &[]);
    let answers = boto3(
        &endpoint,
        serde_json::json!([
            create("not-a-zip", "python3.12", b"this is not a zip file"),
            create("escaping", "python3.12", &escaping),
            create("unknown-runtime", "java99", &good),
            create("bad name!", "python3.12", &good),
            create("from-file", "python3.12", &good),
            { "op": "update_function_code", "args": { "FunctionName": "from-file", "ZipFileBase64": encode(&good) } },
            { "op": "delete_function", "args": { "FunctionName": "from-file" } },
            { "op": "get_function", "args": { "FunctionName": "never-created" } },
            { "op": "update_function_configuration", "args": { "FunctionName": "never-created", "MemorySize": 256 } },
            create("fine", "python3.12", &good),
            create("fine", "python3.12", &good),
            { "op": "update_function_configuration", "args": { "FunctionName": "fine", "MemorySize": 20000 } },
            { "op": "list_functions", "args": {} },
        ]),
    )
    .await;
    let expect = |index: usize, code: &str, status: u64, words: &str| {
        let answer = &answers[index];
        assert_eq!(answer["error"], code, "call {index}: {answer}");
        assert_eq!(answer["status"], status, "call {index}: {answer}");
        assert!(
            answer["message"].as_str().unwrap().contains(words),
            "call {index}: `{words}` not in {answer}"
        );
    };
    expect(
        0,
        "InvalidParameterValueException",
        400,
        "Could not unzip uploaded file",
    );
    expect(
        1,
        "InvalidParameterValueException",
        400,
        "leaves the package",
    );
    expect(
        2,
        "InvalidParameterValueException",
        400,
        "java99 is not supported",
    );
    expect(3, "ValidationException", 400, "functionName");
    expect(4, "ResourceConflictException", 409, "switchyard.toml");
    expect(5, "ResourceConflictException", 409, "defined in");
    expect(6, "ResourceConflictException", 409, "defined in");
    expect(
        7,
        "ResourceNotFoundException",
        404,
        "Function not found: arn:aws:lambda:us-east-1:000000000000:function:never-created",
    );
    expect(8, "ResourceNotFoundException", 404, "Function not found");
    assert!(answers[9].get("ok").is_some(), "{}", answers[9]);
    expect(
        10,
        "ResourceConflictException",
        409,
        "Function already exist: fine",
    );
    expect(11, "ValidationException", 400, "memorySize");
    let names: Vec<&str> = answers[12]["ok"]["Functions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|function| function["FunctionName"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        vec!["fine", "from-file"],
        "only the valid function was stored"
    );
}

/// One process of this test's configuration on `nats`; its invoke API endpoint.
async fn one_process(nats: &NatsServer, directory: &Path) -> (Process, String) {
    let prefix = random_name("c");
    let file = directory.join("switchyard.toml");
    std::fs::write(&file, config(nats, &prefix, &directory.join("data"))).unwrap();
    let process = Process::start(&file, &[]);
    let endpoint = format!(
        "http://{}",
        process
            .wait_ready()
            .await
            .invoke_api
            .expect("invoke api bound")
    );
    (process, endpoint)
}

/// Creates `function` from `code` through the CLI and waits until it is active.
async fn create(endpoint: &str, function: &str, code: &[u8], directory: &Path) {
    let file = directory.join(format!("{}.zip", uuid::Uuid::new_v4().simple()));
    std::fs::write(&file, code).unwrap();
    aws(&[
        "lambda",
        "create-function",
        "--function-name",
        function,
        "--runtime",
        "python3.12",
        "--handler",
        "main.handler",
        "--role",
        "arn:aws:iam::000000000000:role/ignored",
        "--zip-file",
        &format!("fileb://{}", file.display()),
        "--endpoint-url",
        endpoint,
    ])
    .await
    .unwrap();
    wait_for(endpoint, "function-active-v2", function).await;
}

/// `aws lambda wait <waiter> --function-name <function>`.
async fn wait_for(endpoint: &str, waiter: &str, function: &str) {
    aws(&[
        "lambda",
        "wait",
        waiter,
        "--function-name",
        function,
        "--endpoint-url",
        endpoint,
    ])
    .await
    .unwrap_or_else(|error| panic!("{waiter} {function}: {error}"));
}

/// New code for `function` through the CLI.
async fn update_code(endpoint: &str, function: &str, code: &[u8], directory: &Path) {
    let file = directory.join(format!("{}.zip", uuid::Uuid::new_v4().simple()));
    std::fs::write(&file, code).unwrap();
    aws(&[
        "lambda",
        "update-function-code",
        "--function-name",
        function,
        "--zip-file",
        &format!("fileb://{}", file.display()),
        "--endpoint-url",
        endpoint,
    ])
    .await
    .unwrap();
}

/// Invokes `function` (with `--qualifier` when given) through the CLI: the CLI's
/// answer (StatusCode, ExecutedVersion) and what the handler returned.
async fn invoke_qualified(
    endpoint: &str,
    function: &str,
    qualifier: Option<&str>,
    directory: &Path,
) -> Result<(serde_json::Value, serde_json::Value), String> {
    let out = directory.join(format!("{}.json", uuid::Uuid::new_v4().simple()));
    let mut arguments = vec![
        "lambda",
        "invoke",
        "--function-name",
        function,
        "--payload",
        "{}",
        "--endpoint-url",
        endpoint,
    ];
    if let Some(qualifier) = qualifier {
        arguments.extend(["--qualifier", qualifier]);
    }
    arguments.push(out.to_str().unwrap());
    let answer = aws(&arguments).await?;
    let returned = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    Ok((answer, returned))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_callers_invoking_through_a_code_update_see_no_error_and_only_new_code_after_it() {
    let nats = NatsServer::start();
    let directory = tempfile::tempdir().unwrap();
    let (_process, endpoint) = one_process(&nats, directory.path()).await;
    let function = random_name("rolling");
    create(&endpoint, &function, &package("v1", &[]), directory.path()).await;

    // Eight boto3 callers invoke without pause from before the update until each
    // has made 5 calls started after `function-updated-v2` returned.
    let marker = directory.path().join("updated");
    let mut callers = tokio::process::Command::new(installed("SWITCHYARD_AWS_PYTHON"))
        .arg(test_functions().join("invoke_continuously.py"))
        .args([&endpoint, &function, "8", marker.to_str().unwrap(), "5"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stderr = callers.stderr.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stderr));
    let started = tokio::time::timeout(WAIT, async {
        let mut seen = Vec::new();
        while let Some(line) = lines.next_line().await.unwrap() {
            if line == "started" {
                return Ok(());
            }
            seen.push(line);
        }
        Err(seen.join("\n"))
    })
    .await
    .expect("the callers have every one an answer within the wait");
    if let Err(output) = started {
        panic!("the callers ended before all had an answer: {output}");
    }
    update_code(&endpoint, &function, &package("v2", &[]), directory.path()).await;
    wait_for(&endpoint, "function-updated-v2", &function).await;
    std::fs::write(&marker, b"").unwrap();
    let output = tokio::time::timeout(Duration::from_secs(120), callers.wait_with_output())
        .await
        .expect("the callers finish their calls")
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let results: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let errors: Vec<&serde_json::Value> = results
        .iter()
        .filter(|result| result.get("error").is_some())
        .collect();
    assert!(
        errors.is_empty(),
        "calls failed during the update: {errors:?}"
    );
    let versions = |after: bool| -> Vec<&str> {
        results
            .iter()
            .filter(|result| result["after_update"] == after)
            .map(|result| result["version"].as_str().unwrap())
            .collect()
    };
    let (before, after) = (versions(false), versions(true));
    assert!(
        before
            .iter()
            .all(|version| *version == "v1" || *version == "v2"),
        "{before:?}"
    );
    assert!(before.contains(&"v1"), "{before:?}");
    assert_eq!(after.len(), 8 * 5);
    assert!(after.iter().all(|version| *version == "v2"), "{after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_aliases_and_reserved_concurrency_work_as_lambdas() {
    let nats = NatsServer::start();
    let directory = tempfile::tempdir().unwrap();
    let (process, endpoint) = one_process(&nats, directory.path()).await;
    let endpoint = endpoint.as_str();
    let dir = directory.path();
    let function = random_name("versioned");
    create(endpoint, &function, &package("v1", &[]), dir).await;

    // Version 1 is what $LATEST runs now; alias `live` routes to it.
    let published = aws(&[
        "lambda",
        "publish-version",
        "--function-name",
        &function,
        "--description",
        "first",
        "--endpoint-url",
        endpoint,
    ])
    .await
    .unwrap();
    assert_eq!(published["Version"], "1", "{published}");
    assert_eq!(
        published["FunctionArn"],
        format!("arn:aws:lambda:us-east-1:000000000000:function:{function}:1")
    );
    let alias = aws(&[
        "lambda",
        "create-alias",
        "--function-name",
        &function,
        "--name",
        "live",
        "--function-version",
        "1",
        "--endpoint-url",
        endpoint,
    ])
    .await
    .unwrap();
    assert_eq!(alias["FunctionVersion"], "1", "{alias}");
    assert_eq!(
        alias["AliasArn"],
        format!("arn:aws:lambda:us-east-1:000000000000:function:{function}:live")
    );

    // New code: $LATEST answers v2, the alias and the version still v1.
    update_code(endpoint, &function, &package("v2", &[]), dir).await;
    wait_for(endpoint, "function-updated-v2", &function).await;
    let (answer, returned) = invoke_qualified(endpoint, &function, None, dir)
        .await
        .unwrap();
    assert_eq!(returned["version"], "v2", "{returned}");
    assert_eq!(answer["ExecutedVersion"], "$LATEST", "{answer}");
    let (answer, returned) = invoke_qualified(endpoint, &function, Some("live"), dir)
        .await
        .unwrap();
    assert_eq!(returned["version"], "v1", "{returned}");
    assert_eq!(answer["ExecutedVersion"], "1", "{answer}");
    let (_, returned) = invoke_qualified(endpoint, &format!("{function}:1"), None, dir)
        .await
        .unwrap();
    assert_eq!(returned["version"], "v1", "{returned}");
    // A version is an instance set of its own: its handler sees its version.
    let running = function_processes(&function);
    assert!(
        running.len() >= 2,
        "$LATEST and version 1 each run an instance: {running:?}"
    );

    // Version 2, the alias moved to it.
    let published = aws(&[
        "lambda",
        "publish-version",
        "--function-name",
        &function,
        "--endpoint-url",
        endpoint,
    ])
    .await
    .unwrap();
    assert_eq!(published["Version"], "2", "{published}");
    aws(&[
        "lambda",
        "update-alias",
        "--function-name",
        &function,
        "--name",
        "live",
        "--function-version",
        "2",
        "--endpoint-url",
        endpoint,
    ])
    .await
    .unwrap();
    wait_until("the alias routes to version 2", async || {
        invoke_qualified(endpoint, &function, Some("live"), dir)
            .await
            .is_ok_and(|(_, returned)| returned["version"] == "v2")
    })
    .await;
    let versions = aws(&[
        "lambda",
        "list-versions-by-function",
        "--function-name",
        &function,
        "--endpoint-url",
        endpoint,
    ])
    .await
    .unwrap();
    let listed: Vec<&str> = versions["Versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|version| version["Version"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ["$LATEST", "1", "2"]);
    let aliases = aws(&[
        "lambda",
        "list-aliases",
        "--function-name",
        &function,
        "--endpoint-url",
        endpoint,
    ])
    .await
    .unwrap();
    assert_eq!(aliases["Aliases"][0]["Name"], "live", "{aliases}");
    assert_eq!(aliases["Aliases"][0]["FunctionVersion"], "2", "{aliases}");
    // A weighted alias (a canary) is refused, not routed all to one version.
    let refused = aws(&[
        "lambda",
        "update-alias",
        "--function-name",
        &function,
        "--name",
        "live",
        "--routing-config",
        r#"{"AdditionalVersionWeights": {"1": 0.1}}"#,
        "--endpoint-url",
        endpoint,
    ])
    .await
    .unwrap_err();
    assert!(
        refused.contains("InvalidParameterValueException"),
        "{refused}"
    );

    // An Event invocation of a version is refused (Switchyard queues $LATEST only).
    let refused = aws(&[
        "lambda",
        "invoke",
        "--function-name",
        &function,
        "--qualifier",
        "1",
        "--invocation-type",
        "Event",
        "--payload",
        "{}",
        "--endpoint-url",
        endpoint,
        dir.join("event.json").to_str().unwrap(),
    ])
    .await
    .unwrap_err();
    assert!(
        refused.contains("InvalidParameterValueException"),
        "{refused}"
    );

    // Reserved concurrency is the function's instance limit.
    let reserved = aws(&[
        "lambda",
        "put-function-concurrency",
        "--function-name",
        &function,
        "--reserved-concurrent-executions",
        "3",
        "--endpoint-url",
        endpoint,
    ])
    .await
    .unwrap();
    assert_eq!(reserved["ReservedConcurrentExecutions"], 3, "{reserved}");
    let admin = format!("http://{}/v1/functions", process.admin());
    let max_instances = async |name: String| -> Option<u64> {
        let body = reqwest::get(&admin).await.ok()?.bytes().await.ok()?;
        let listed: serde_json::Value = serde_json::from_slice(&body).ok()?;
        listed["functions"]
            .as_array()?
            .iter()
            .find(|entry| entry["name"] == name.as_str())?["limits"]["max_instances"]
            .as_u64()
    };
    wait_until("the function's limit becomes 3", async || {
        max_instances(function.clone()).await == Some(3)
    })
    .await;
    let got = aws(&[
        "lambda",
        "get-function-concurrency",
        "--function-name",
        &function,
        "--endpoint-url",
        endpoint,
    ])
    .await
    .unwrap();
    assert_eq!(got["ReservedConcurrentExecutions"], 3, "{got}");
    aws(&[
        "lambda",
        "delete-function-concurrency",
        "--function-name",
        &function,
        "--endpoint-url",
        endpoint,
    ])
    .await
    .unwrap();
    wait_until("the function's limit is the default again", async || {
        max_instances(function.clone())
            .await
            .is_some_and(|limit| limit != 3)
    })
    .await;

    // Deleting the alias, then version 1: both are gone, $LATEST stays.
    aws(&[
        "lambda",
        "delete-alias",
        "--function-name",
        &function,
        "--name",
        "live",
        "--endpoint-url",
        endpoint,
    ])
    .await
    .unwrap();
    wait_until("the deleted alias is not found", async || {
        invoke_qualified(endpoint, &function, Some("live"), dir)
            .await
            .is_err_and(|error| error.contains("ResourceNotFoundException"))
    })
    .await;
    aws(&[
        "lambda",
        "delete-function",
        "--function-name",
        &function,
        "--qualifier",
        "1",
        "--endpoint-url",
        endpoint,
    ])
    .await
    .unwrap();
    wait_until("the deleted version is not found", async || {
        invoke_qualified(endpoint, &function, Some("1"), dir)
            .await
            .is_err_and(|error| error.contains("ResourceNotFoundException"))
    })
    .await;
    let (_, returned) = invoke_qualified(endpoint, &function, None, dir)
        .await
        .unwrap();
    assert_eq!(returned["version"], "v2", "{returned}");

    // $LATEST is not deleted on its own; a qualified name does not change $LATEST.
    let refused = aws(&[
        "lambda",
        "delete-function",
        "--function-name",
        &function,
        "--qualifier",
        "$LATEST",
        "--endpoint-url",
        endpoint,
    ])
    .await
    .unwrap_err();
    assert!(
        refused.contains("InvalidParameterValueException"),
        "{refused}"
    );
    let v3 = dir.join("v3.zip");
    std::fs::write(&v3, package("v3", &[])).unwrap();
    let v3_uri = format!("fileb://{}", v3.display());
    let refused = aws(&[
        "lambda",
        "update-function-code",
        "--function-name",
        &format!("{function}:2"),
        "--zip-file",
        &v3_uri,
        "--endpoint-url",
        endpoint,
    ])
    .await
    .unwrap_err();
    assert!(
        refused.contains("InvalidParameterValueException"),
        "{refused}"
    );
    // --dry-run checks and answers, changing nothing.
    let dry = aws(&[
        "lambda",
        "update-function-code",
        "--function-name",
        &function,
        "--zip-file",
        &v3_uri,
        "--dry-run",
        "--endpoint-url",
        endpoint,
    ])
    .await
    .unwrap();
    assert_eq!(
        dry["CodeSha256"],
        base64::engine::general_purpose::STANDARD
            .encode(sha2::Sha256::digest(std::fs::read(&v3).unwrap())),
        "{dry}"
    );
    let (_, returned) = invoke_qualified(endpoint, &function, None, dir)
        .await
        .unwrap();
    assert_eq!(returned["version"], "v2", "{returned}");
    // --publish: the new code and a version of it (numbers are never reused).
    let published = aws(&[
        "lambda",
        "update-function-code",
        "--function-name",
        &function,
        "--zip-file",
        &v3_uri,
        "--publish",
        "--endpoint-url",
        endpoint,
    ])
    .await
    .unwrap();
    assert_eq!(published["Version"], "3", "{published}");
    wait_for(endpoint, "function-updated-v2", &function).await;
    let (answer, returned) = invoke_qualified(endpoint, &function, Some("3"), dir)
        .await
        .unwrap();
    assert_eq!(returned["version"], "v3", "{returned}");
    assert_eq!(answer["ExecutedVersion"], "3", "{answer}");
}

/// A handler answering a function URL with what it was asked.
const URL_HANDLER: &[u8] = br#"import json

def handler(event, context):
    return {
        "statusCode": 201,
        "headers": {"content-type": "application/json", "x-from": "function"},
        "body": json.dumps({
            "path": event["rawPath"],
            "query": event.get("rawQueryString"),
            "method": event["requestContext"]["http"]["method"],
            "body": event.get("body"),
        }),
    }
"#;

/// A request signed for Lambda with the test's access key (botocore's SigV4Auth):
/// status and body.
async fn signed_request(method: &str, url: &str, body: &str) -> (u16, String) {
    let python = installed("SWITCHYARD_AWS_PYTHON");
    let script = r#"
import sys, urllib.request, urllib.error
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
method, url, body = sys.argv[1], sys.argv[2], sys.argv[3].encode()
request = AWSRequest(method=method, url=url, data=body, headers={"content-type": "application/json"})
SigV4Auth(Credentials("test", "test"), "lambda", "us-east-1").add_auth(request)
prepared = request.prepare()
try:
    answer = urllib.request.urlopen(urllib.request.Request(url, data=body, headers=dict(prepared.headers), method=method))
    print(answer.status); print(answer.read().decode())
except urllib.error.HTTPError as error:
    print(error.code); print(error.read().decode())
"#;
    let arguments = [method.to_owned(), url.to_owned(), body.to_owned()];
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg("-c")
            .arg(script)
            .args(arguments)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (status, body) = text.split_once('\n').unwrap();
    (status.trim().parse().unwrap(), body.trim().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_url_made_through_the_api_answers_with_the_function_as_lambdas_do() {
    let nats = NatsServer::start();
    let directory = tempfile::tempdir().unwrap();
    let dir = directory.path();
    // Signed requests this time: the CLI and boto3 sign with test/test.
    let file = dir.join("switchyard.toml");
    let text = config(&nats, &random_name("u"), &dir.join("data")).replace(
        "[invoke_api]\nlisten = \"127.0.0.1:0\"\n",
        "[invoke_api]\nlisten = \"127.0.0.1:0\"\ncredentials = [{ access_key_id = \"test\", secret_access_key = \"test\" }]\n",
    );
    assert!(text.contains("credentials"));
    std::fs::write(&file, text).unwrap();
    let process = Process::start(&file, &[]);
    let endpoint = format!(
        "http://{}",
        process
            .wait_ready()
            .await
            .invoke_api
            .expect("invoke api bound")
    );
    let endpoint = endpoint.as_str();
    let function = random_name("web");
    let code = package("v1", &[("url.py", URL_HANDLER)]);
    let zip = dir.join("web.zip");
    std::fs::write(&zip, &code).unwrap();
    aws(&[
        "lambda",
        "create-function",
        "--function-name",
        &function,
        "--runtime",
        "python3.12",
        "--handler",
        "url.handler",
        "--role",
        "arn:aws:iam::000000000000:role/ignored",
        "--zip-file",
        &format!("fileb://{}", zip.display()),
        "--endpoint-url",
        endpoint,
    ])
    .await
    .unwrap();
    wait_for(endpoint, "function-active-v2", &function).await;

    let created = aws(&[
        "lambda",
        "create-function-url-config",
        "--function-name",
        &function,
        "--auth-type",
        "NONE",
        "--cors",
        "AllowOrigins=https://example.com,AllowMethods=POST,MaxAge=60",
        "--endpoint-url",
        endpoint,
    ])
    .await
    .unwrap();
    let url = created["FunctionUrl"].as_str().unwrap().to_owned();
    assert_eq!(
        url,
        format!("{endpoint}/lambda-url/{function}/"),
        "{created}"
    );
    assert_eq!(created["AuthType"], "NONE", "{created}");
    assert_eq!(created["Cors"]["AllowOrigins"][0], "https://example.com");
    let again = aws(&[
        "lambda",
        "create-function-url-config",
        "--function-name",
        &function,
        "--auth-type",
        "NONE",
        "--endpoint-url",
        endpoint,
    ])
    .await
    .unwrap_err();
    assert!(again.contains("ResourceConflictException"), "{again}");

    // Anyone may call it (AuthType NONE); the function sees the path after the URL.
    let client = reqwest::Client::new();
    let target = format!("{url}orders/7?expand=1");
    let mut answered = None;
    wait_until("the function URL answers", async || {
        let Ok(response) = client
            .post(&target)
            .header("content-type", "application/json")
            .body("{\"n\":1}")
            .send()
            .await
        else {
            return false;
        };
        if response.status() == 404 {
            return false;
        }
        answered = Some(response);
        true
    })
    .await;
    let response = answered.unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(response.headers()["x-from"], "function");
    assert!(response.headers().contains_key("x-amzn-requestid"));
    let seen: serde_json::Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(seen["path"], "/orders/7", "{seen}");
    assert_eq!(seen["query"], "expand=1", "{seen}");
    assert_eq!(seen["method"], "POST", "{seen}");
    assert_eq!(seen["body"], "{\"n\":1}", "{seen}");
    // A browser's preflight is answered with the CORS settings.
    let preflight = client
        .request(reqwest::Method::OPTIONS, &target)
        .header("origin", "https://example.com")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(
        preflight.headers()["access-control-allow-origin"],
        "https://example.com"
    );

    // AWS_IAM: unsigned requests are refused, signed ones served.
    let updated = aws(&[
        "lambda",
        "update-function-url-config",
        "--function-name",
        &function,
        "--auth-type",
        "AWS_IAM",
        "--endpoint-url",
        endpoint,
    ])
    .await
    .unwrap();
    assert_eq!(updated["AuthType"], "AWS_IAM", "{updated}");
    // Credentials with `*` is what browsers refuse: refused here, nothing stored.
    let refused = aws(&[
        "lambda",
        "update-function-url-config",
        "--function-name",
        &function,
        "--cors",
        "AllowOrigins=*,AllowCredentials=true",
        "--endpoint-url",
        endpoint,
    ])
    .await
    .unwrap_err();
    assert!(
        refused.contains("InvalidParameterValueException"),
        "{refused}"
    );
    wait_until("unsigned calls are refused", async || {
        client
            .post(&target)
            .body("{}")
            .send()
            .await
            .is_ok_and(|response| response.status() == 403)
    })
    .await;
    let (status, body) = signed_request("POST", &target, "{\"signed\":true}").await;
    assert_eq!(status, 201, "{body}");
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(seen["body"], "{\"signed\":true}", "{seen}");
    let got = aws(&[
        "lambda",
        "get-function-url-config",
        "--function-name",
        &function,
        "--endpoint-url",
        endpoint,
    ])
    .await
    .unwrap();
    assert_eq!(got["AuthType"], "AWS_IAM", "{got}");
    assert_eq!(got["FunctionUrl"], url.as_str(), "{got}");

    // Deleted: the URL is gone, the function stays.
    aws(&[
        "lambda",
        "delete-function-url-config",
        "--function-name",
        &function,
        "--endpoint-url",
        endpoint,
    ])
    .await
    .unwrap();
    wait_until("the deleted URL answers 404", async || {
        client
            .post(&target)
            .send()
            .await
            .is_ok_and(|response| response.status() == 404)
    })
    .await;
    let missing = aws(&[
        "lambda",
        "get-function-url-config",
        "--function-name",
        &function,
        "--endpoint-url",
        endpoint,
    ])
    .await
    .unwrap_err();
    assert!(missing.contains("ResourceNotFoundException"), "{missing}");
}

#[cfg(feature = "kafka")]
/// A handler that writes each event it gets to a file of its own in `OUT_DIR`.
const RECORDING_HANDLER: &[u8] = br#"import json, os, uuid

def handler(event, context):
    path = os.path.join(os.environ["OUT_DIR"], uuid.uuid4().hex)
    with open(path + ".tmp", "w") as out:
        json.dump(event, out)
    os.rename(path + ".tmp", path + ".json")
    return {}
"#;

#[cfg(feature = "kafka")]
/// The record values (decoded) of every SelfManagedKafka event in `directory`.
fn kafka_values(directory: &Path, bootstrap: &str) -> Vec<String> {
    let mut values = Vec::new();
    for entry in std::fs::read_dir(directory).unwrap().flatten() {
        if entry
            .path()
            .extension()
            .is_none_or(|extension| extension != "json")
        {
            continue;
        }
        let event: serde_json::Value =
            serde_json::from_slice(&std::fs::read(entry.path()).unwrap()).unwrap();
        assert_eq!(event["eventSource"], "SelfManagedKafka", "{event}");
        assert_eq!(event["bootstrapServers"], bootstrap, "{event}");
        for records in event["records"].as_object().unwrap().values() {
            for record in records.as_array().unwrap() {
                let value = base64::engine::general_purpose::STANDARD
                    .decode(record["value"].as_str().unwrap())
                    .unwrap();
                values.push(String::from_utf8(value).unwrap());
            }
        }
    }
    values.sort();
    values
}

#[cfg(feature = "kafka")]
async fn produce(broker: &switchyard_testkit::KafkaBroker, topic: &str, values: &[String]) {
    use switchyard_connector_kafka::rdkafka::ClientConfig;
    use switchyard_connector_kafka::rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("message.timeout.ms", "120000")
        .create()
        .unwrap();
    use switchyard_connector_kafka::rdkafka::message::{Header, OwnedHeaders};
    for value in values {
        let mut record = FutureRecord::<str, str>::to(topic).payload(value);
        // Records a CloudEvents producer writes (binary mode) reach the function too.
        if value.starts_with("ce-") {
            record = record.headers(
                OwnedHeaders::new()
                    .insert(Header {
                        key: "ce_specversion",
                        value: Some("1.0"),
                    })
                    .insert(Header {
                        key: "ce_id",
                        value: Some(value.as_str()),
                    })
                    .insert(Header {
                        key: "ce_source",
                        value: Some("/producer"),
                    })
                    .insert(Header {
                        key: "ce_type",
                        value: Some("com.example.order"),
                    }),
            );
        }
        producer
            .send(record, Duration::from_secs(120))
            .await
            .map_err(|(error, _)| error)
            .unwrap();
    }
}

#[cfg(feature = "kafka")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_event_source_mapping_feeds_the_function_lambdas_event_until_disabled_or_deleted() {
    let broker = switchyard_testkit::KafkaBroker::start();
    let topic = random_name("orders");
    broker.create_topic(&topic, 2);
    let nats = NatsServer::start();
    let directory = tempfile::tempdir().unwrap();
    let dir = directory.path();
    let (process, endpoint) = one_process(&nats, dir).await;
    let endpoint = endpoint.as_str();
    let out = dir.join("received");
    std::fs::create_dir(&out).unwrap();
    let function = random_name("consumer");
    let zip = dir.join("consumer.zip");
    std::fs::write(&zip, package("v1", &[("esm.py", RECORDING_HANDLER)])).unwrap();
    aws(&[
        "lambda",
        "create-function",
        "--function-name",
        &function,
        "--runtime",
        "python3.12",
        "--handler",
        "esm.handler",
        "--role",
        "arn:aws:iam::000000000000:role/ignored",
        "--zip-file",
        &format!("fileb://{}", zip.display()),
        "--environment",
        &format!("Variables={{OUT_DIR={}}}", out.display()),
        "--endpoint-url",
        endpoint,
    ])
    .await
    .unwrap();
    wait_for(endpoint, "function-active-v2", &function).await;

    // Records produced before the mapping exists: TRIM_HORIZON reads them too.
    let first: Vec<String> = (0..20).map(|number| format!("first-{number:02}")).collect();
    produce(&broker, &topic, &first).await;
    let source = format!(
        "{{\"Endpoints\":{{\"KAFKA_BOOTSTRAP_SERVERS\":[\"{}\"]}}}}",
        broker.bootstrap()
    );
    let created = aws(&[
        "lambda",
        "create-event-source-mapping",
        "--function-name",
        &function,
        "--topics",
        &topic,
        "--starting-position",
        "TRIM_HORIZON",
        "--batch-size",
        "10",
        "--self-managed-event-source",
        &source,
        "--endpoint-url",
        endpoint,
    ])
    .await
    .unwrap();
    assert_eq!(created["State"], "Creating", "{created}");
    assert_eq!(created["BatchSize"], 10, "{created}");
    let uuid = created["UUID"].as_str().unwrap().to_owned();
    let duplicate = aws(&[
        "lambda",
        "create-event-source-mapping",
        "--function-name",
        &function,
        "--topics",
        &topic,
        "--starting-position",
        "LATEST",
        "--self-managed-event-source",
        &source,
        "--endpoint-url",
        endpoint,
    ])
    .await
    .unwrap_err();
    assert!(
        duplicate.contains("ResourceConflictException"),
        "{duplicate}"
    );
    wait_until("the records reach the function", async || {
        kafka_values(&out, &broker.bootstrap()).len() >= first.len()
    })
    .await;
    assert_eq!(kafka_values(&out, &broker.bootstrap()), first);
    let listed = aws(&[
        "lambda",
        "list-event-source-mappings",
        "--function-name",
        &function,
        "--endpoint-url",
        endpoint,
    ])
    .await
    .unwrap();
    assert_eq!(listed["EventSourceMappings"][0]["UUID"], uuid.as_str());
    assert_eq!(listed["EventSourceMappings"][0]["State"], "Enabled");

    // Disabled: its source stops; records produced meanwhile come once enabled.
    let admin = format!("http://{}/v1/sources", process.admin());
    let source_name = format!("esm-{uuid}");
    let source_running = async |admin: &str, name: &str| -> Option<bool> {
        let body = reqwest::get(admin).await.ok()?.bytes().await.ok()?;
        let listed: serde_json::Value = serde_json::from_slice(&body).ok()?;
        Some(
            listed["sources"]
                .as_array()?
                .iter()
                .any(|source| source["name"] == name),
        )
    };
    assert_eq!(source_running(&admin, &source_name).await, Some(true));
    let disabled = aws(&[
        "lambda",
        "update-event-source-mapping",
        "--uuid",
        &uuid,
        "--no-enabled",
        "--endpoint-url",
        endpoint,
    ])
    .await
    .unwrap();
    assert_eq!(disabled["State"], "Disabling", "{disabled}");
    wait_until("the mapping's source stops", async || {
        source_running(&admin, &source_name).await == Some(false)
    })
    .await;
    let got = aws(&[
        "lambda",
        "get-event-source-mapping",
        "--uuid",
        &uuid,
        "--endpoint-url",
        endpoint,
    ])
    .await
    .unwrap();
    assert_eq!(got["State"], "Disabled", "{got}");
    let second: Vec<String> = (0..5)
        .map(|number| format!("second-{number:02}"))
        .chain((0..3).map(|number| format!("ce-{number:02}")))
        .collect();
    produce(&broker, &topic, &second).await;
    aws(&[
        "lambda",
        "update-event-source-mapping",
        "--uuid",
        &uuid,
        "--enabled",
        "--endpoint-url",
        endpoint,
    ])
    .await
    .unwrap();
    let mut everything: Vec<String> = first.iter().chain(&second).cloned().collect();
    everything.sort();
    wait_until("the records produced while disabled arrive", async || {
        kafka_values(&out, &broker.bootstrap()).len() >= everything.len()
    })
    .await;
    // Each once: nothing lost, nothing repeated by the stop and start.
    assert_eq!(kafka_values(&out, &broker.bootstrap()), everything);

    // Deleted: gone from the API and its source stops.
    let deleted = aws(&[
        "lambda",
        "delete-event-source-mapping",
        "--uuid",
        &uuid,
        "--endpoint-url",
        endpoint,
    ])
    .await
    .unwrap();
    assert_eq!(deleted["State"], "Deleting", "{deleted}");
    let missing = aws(&[
        "lambda",
        "get-event-source-mapping",
        "--uuid",
        &uuid,
        "--endpoint-url",
        endpoint,
    ])
    .await
    .unwrap_err();
    assert!(missing.contains("ResourceNotFoundException"), "{missing}");
    wait_until("the deleted mapping's source stops", async || {
        source_running(&admin, &source_name).await == Some(false)
    })
    .await;

    // What is not a self-managed Kafka source is refused with Lambda's error.
    let refused = aws(&[
        "lambda",
        "create-event-source-mapping",
        "--function-name",
        &function,
        "--event-source-arn",
        "arn:aws:sqs:us-east-1:000000000000:queue",
        "--endpoint-url",
        endpoint,
    ])
    .await
    .unwrap_err();
    assert!(
        refused.contains("InvalidParameterValueException"),
        "{refused}"
    );
    let listed = aws(&[
        "lambda",
        "list-event-source-mappings",
        "--endpoint-url",
        endpoint,
    ])
    .await
    .unwrap();
    assert_eq!(listed["EventSourceMappings"], serde_json::json!([]));
}

/// `switchyard deploy` with the test's credentials in its environment: success and
/// what it printed (stdout, then stderr).
async fn switchyard_deploy(arguments: Vec<String>) -> (bool, String, String) {
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .arg("deploy")
            .args(arguments)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchyard_deploy_zips_a_directory_creates_or_updates_and_waits() {
    let nats = NatsServer::start();
    let directory = tempfile::tempdir().unwrap();
    let dir = directory.path();
    let file = dir.join("switchyard.toml");
    let text = config(&nats, &random_name("d"), &dir.join("data")).replace(
        "[invoke_api]\nlisten = \"127.0.0.1:0\"\n",
        "[invoke_api]\nlisten = \"127.0.0.1:0\"\ncredentials = [{ access_key_id = \"test\", secret_access_key = \"test\" }]\n",
    );
    std::fs::write(&file, text).unwrap();
    let process = Process::start(&file, &[]);
    let endpoint = format!(
        "http://{}",
        process
            .wait_ready()
            .await
            .invoke_api
            .expect("invoke api bound")
    );
    let function = random_name("deployed");
    let code = dir.join("code");
    std::fs::create_dir_all(code.join("lib")).unwrap();
    let handler = |version: &str| {
        format!(
            "import os\nfrom lib import helper\n\ndef handler(event, context):\n    return {{\"version\": \"{version}\", \"helper\": helper.NAME, \"executable\": os.access(os.path.join(os.path.dirname(__file__), \"tool.sh\"), os.X_OK), \"greeting\": os.environ.get(\"GREETING\")}}\n"
        )
    };
    std::fs::write(code.join("main.py"), handler("v1")).unwrap();
    std::fs::write(code.join("lib/__init__.py"), "").unwrap();
    std::fs::write(code.join("lib/helper.py"), "NAME = 'helper'\n").unwrap();
    std::fs::write(code.join("tool.sh"), "#!/bin/sh\necho hi\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(code.join("tool.sh"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
    }
    let base = |extra: &[&str]| -> Vec<String> {
        let mut arguments = vec![
            code.display().to_string(),
            "--function-name".to_owned(),
            function.clone(),
            "--endpoint".to_owned(),
            endpoint.clone(),
        ];
        arguments.extend(extra.iter().map(|argument| (*argument).to_owned()));
        arguments
    };

    // A new function needs its runtime and handler.
    let (ok, _, stderr) = switchyard_deploy(base(&[])).await;
    assert!(!ok);
    assert!(stderr.contains("--runtime and --handler"), "{stderr}");

    let (ok, stdout, stderr) = switchyard_deploy(base(&[
        "--runtime",
        "python3.12",
        "--handler",
        "main.handler",
        "--env",
        "GREETING=hi",
    ]))
    .await;
    assert!(ok, "{stderr}");
    let deployed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(deployed["State"], "Active", "{deployed}");
    // Active when the command returns: the first invocation answers.
    let answer = invoke(&endpoint, &function, dir).await;
    assert_eq!(answer["version"], "v1", "{answer}");
    assert_eq!(answer["helper"], "helper", "{answer}");
    assert_eq!(answer["executable"], true, "{answer}");
    assert_eq!(answer["greeting"], "hi", "{answer}");

    // New code: once the command returns, only the new code answers.
    std::fs::write(code.join("main.py"), handler("v2")).unwrap();
    let (ok, stdout, stderr) = switchyard_deploy(base(&["--memory", "256"])).await;
    assert!(ok, "{stderr}");
    let deployed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(deployed["MemorySize"], 256, "{deployed}");
    assert_eq!(deployed["LastUpdateStatus"], "Successful", "{deployed}");
    for _ in 0..3 {
        let answer = invoke(&endpoint, &function, dir).await;
        assert_eq!(answer["version"], "v2", "{answer}");
    }

    // Wrong credentials: refused, nothing changed.
    std::fs::write(code.join("main.py"), handler("v3")).unwrap();
    let arguments = base(&[]);
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .arg("deploy")
            .args(arguments)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "wrong")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("403"), "{stderr}");
    assert_eq!(invoke(&endpoint, &function, dir).await["version"], "v2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_a_process_cannot_run_leaves_the_previous_form_running_there() {
    let nats = NatsServer::start();
    let prefix = random_name("k");
    let directory = tempfile::tempdir().unwrap();
    let dir = directory.path();
    // Process A knows the runtime id `python-alt`; process B does not.
    let mut endpoints = Vec::new();
    let mut processes = Vec::new();
    for (name, runtimes) in [
        (
            "a",
            format!(
                "\n[runtimes]\n\"python-alt\" = {{ command = [\"{}\", \"-m\", \"awslambdaric\", \"{{handler}}\"] }}\n",
                installed("SWITCHYARD_LAMBDA_PYTHON")
            ),
        ),
        ("b", String::new()),
    ] {
        let file = dir.join(format!("{name}.toml"));
        let text = config(&nats, &prefix, &dir.join(format!("data-{name}"))) + &runtimes;
        std::fs::write(&file, text).unwrap();
        let process = Process::start(&file, &[]);
        endpoints.push(format!(
            "http://{}",
            process
                .wait_ready()
                .await
                .invoke_api
                .expect("invoke api bound")
        ));
        processes.push(process);
    }
    let (a, b) = (endpoints[0].as_str(), endpoints[1].as_str());
    let function = random_name("kept");
    create(a, &function, &package("v1", &[]), dir).await;
    wait_for(b, "function-active-v2", &function).await;
    assert_eq!(invoke(b, &function, dir).await["version"], "v1");

    // A runtime only A has, and a new environment: A runs it, B goes on running
    // the previous form and says its last update failed.
    let answer = boto3(
        a,
        serde_json::json!([{ "op": "update_function_configuration", "args": {
            "FunctionName": function,
            "Runtime": "python-alt",
            "Environment": { "Variables": { "GREETING": "changed" } },
        } }]),
    )
    .await;
    assert!(answer[0].get("ok").is_some(), "{answer:?}");
    wait_for(a, "function-updated-v2", &function).await;
    assert_eq!(invoke(a, &function, dir).await["greeting"], "changed");
    wait_until("B reports the failed update", async || {
        let got = aws(&[
            "lambda",
            "get-function-configuration",
            "--function-name",
            &function,
            "--endpoint-url",
            b,
        ])
        .await
        .unwrap();
        got["LastUpdateStatus"] == "Failed"
    })
    .await;
    let got = aws(&[
        "lambda",
        "get-function-configuration",
        "--function-name",
        &function,
        "--endpoint-url",
        b,
    ])
    .await
    .unwrap();
    assert_eq!(got["State"], "Active", "{got}");
    assert!(
        got["LastUpdateStatusReason"]
            .as_str()
            .is_some_and(|reason| reason.contains("python-alt")),
        "{got}"
    );
    let answer = invoke(b, &function, dir).await;
    assert_eq!(answer["version"], "v1", "{answer}");
    assert!(answer["greeting"].is_null(), "{answer}");
}

/// Invokes `function` at `endpoint` with `payload` through the CLI: what it returned.
async fn invoke_with(
    endpoint: &str,
    function: &str,
    payload: &str,
    directory: &Path,
) -> serde_json::Value {
    let out = directory.join(format!("{}.json", uuid::Uuid::new_v4().simple()));
    let answer = aws(&[
        "lambda",
        "invoke",
        "--function-name",
        function,
        "--payload",
        payload,
        "--endpoint-url",
        endpoint,
        out.to_str().unwrap(),
    ])
    .await
    .unwrap();
    assert!(answer.get("FunctionError").is_none(), "{answer}");
    serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_runtimes_run_a_provided_bootstrap_and_a_node_handler_from_their_zips() {
    let nats = NatsServer::start();
    let directory = tempfile::tempdir().unwrap();
    let dir = directory.path();
    let (_process, endpoint) = one_process(&nats, dir).await;
    let endpoint = endpoint.as_str();
    // provided.al2023: the zip's own `bootstrap` (a Rust lambda_runtime binary),
    // executable because the zip says so.
    let bootstrap = std::fs::read(installed("SWITCHYARD_LAMBDA_RUST")).unwrap();
    let rust_zip = {
        let mut buffer = std::io::Cursor::new(Vec::new());
        let mut writer = zip::ZipWriter::new(&mut buffer);
        let options = zip::write::SimpleFileOptions::default().unix_permissions(0o755);
        writer.start_file("bootstrap", options).unwrap();
        writer.write_all(&bootstrap).unwrap();
        writer.finish().unwrap();
        buffer.into_inner()
    };
    let node_zip = {
        let mut buffer = std::io::Cursor::new(Vec::new());
        let mut writer = zip::ZipWriter::new(&mut buffer);
        let options = zip::write::SimpleFileOptions::default().unix_permissions(0o644);
        writer.start_file("index.mjs", options).unwrap();
        writer
            .write_all(&std::fs::read(test_functions().join("node/index.mjs")).unwrap())
            .unwrap();
        writer.finish().unwrap();
        buffer.into_inner()
    };
    for (runtime, handler, code, language) in [
        ("provided.al2023", "bootstrap", rust_zip, "rust"),
        ("nodejs20.x", "index.handler", node_zip, "node"),
    ] {
        let function = random_name(language);
        let file = dir.join(format!("{language}.zip"));
        std::fs::write(&file, &code).unwrap();
        aws(&[
            "lambda",
            "create-function",
            "--function-name",
            &function,
            "--runtime",
            runtime,
            "--handler",
            handler,
            "--role",
            "arn:aws:iam::000000000000:role/ignored",
            "--zip-file",
            &format!("fileb://{}", file.display()),
            "--endpoint-url",
            endpoint,
        ])
        .await
        .unwrap();
        wait_for(endpoint, "function-active-v2", &function).await;
        let answer = invoke_with(endpoint, &function, r#"{"data": {"n": 7}}"#, dir).await;
        assert_eq!(answer["runtime"], language, "{answer}");
        assert_eq!(answer["echo"]["n"], 7, "{answer}");
        assert_eq!(answer["function"], function.as_str(), "{answer}");
    }
}
