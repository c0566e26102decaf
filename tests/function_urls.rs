//! Function URLs (`[[sources.routes]]`) against a real nats-server: a Lambda handler
//! run by awslambdaric reads each request with AWS's Powertools
//! (`APIGatewayProxyEventV2`) and answers by the function URL rules; `process` and
//! `http` functions get the request forwarded as it came.

mod common;

use std::io::BufRead as _;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{
    FunctionServer, NatsServer, Reply, Switchyard, WAIT, base_config, installed, random_name,
};

/// A `lambda` function running tests/functions/python/web.py.
fn web_function(name: &str, extra: &str) -> String {
    format!(
        r#"
[[functions]]
type = "lambda"
name = "{name}"
command = ["{python}", "-m", "awslambdaric", "web.handler"]
handler = "web.handler"
directory = "{directory}"
timeout = "3s"
{extra}
"#,
        python = installed("SWITCHYARD_LAMBDA_PYTHON"),
        directory = common::test_functions().join("python").display(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lambda_function_url_speaks_payload_format_2() {
    let nats = NatsServer::start();
    let function = random_name("web");
    let audit = FunctionServer::start(|_, _| Reply::ok()).await;
    let mut text = base_config(&nats.url(), 0, 0);
    text.push_str(&format!(
        r#"
[[sources.routes]]
path = "/api"
function = "{function}"
methods = ["GET", "POST"]
record = true
cors = {{ allow_origins = ["https://app.example"], allow_methods = ["GET", "POST"], allow_headers = ["content-type"], max_age = "10m" }}

[[sources.routes]]
path = "/private/"
function = "{function}"
bearer_token = "s3cret"
{web}
[[functions]]
type = "http"
name = "audit"
url = "{audit}"

[[triggers]]
name = "audit"
function = "audit"
filter = {{ type = {{ exact = "dev.switchyard.route.call" }} }}
"#,
        web = web_function(&function, ""),
        audit = audit.url,
    ));
    let switchyard = Switchyard::start(text).await;
    let client = reqwest::Client::new();

    // A request with everything payload format 2.0 carries: repeated headers and query
    // parameters, cookies, a JSON body; the handler's own status, headers and cookies
    // come back.
    let response = client
        .post(switchyard.url("/api/echo?p=1&p=2&q=a+b%21"))
        .header("content-type", "application/json")
        .header("user-agent", "switchyard-test/1")
        .header("x-multi", "one")
        .header("x-multi", "two")
        .header("cookie", "a=1; b=two")
        .body(r#"{"order": 42}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(response.headers()["x-handled-by"], "web.py");
    let cookies: Vec<&str> = response
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|value| value.to_str().unwrap())
        .collect();
    assert_eq!(cookies, ["session=abc; Path=/", "theme=dark; Max-Age=60"]);
    let request_id = response.headers()["x-amzn-requestid"]
        .to_str()
        .unwrap()
        .to_owned();
    let seen: serde_json::Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(seen["version"], "2.0");
    assert_eq!(seen["route_key"], "$default");
    assert_eq!(seen["method"], "POST");
    assert_eq!(seen["raw_path"], "/api/echo");
    assert_eq!(seen["path"], "/api/echo");
    assert_eq!(seen["raw_query_string"], "p=1&p=2&q=a+b%21");
    assert_eq!(seen["query"], serde_json::json!({"p": "1,2", "q": "a b!"}));
    assert_eq!(seen["cookies"], serde_json::json!(["a=1", "b=two"]));
    assert_eq!(seen["headers"]["x-multi"], "one,two");
    assert_eq!(seen["headers"]["content-type"], "application/json");
    assert_eq!(seen["headers"].get("cookie"), None);
    assert_eq!(seen["body"], r#"{"order": 42}"#);
    assert_eq!(seen["is_base64_encoded"], false);
    assert_eq!(seen["source_ip"], "127.0.0.1");
    assert_eq!(seen["user_agent"], "switchyard-test/1");
    assert_eq!(seen["protocol"], "HTTP/1.1");
    assert_eq!(seen["domain_name"], "127.0.0.1");
    assert_eq!(seen["stage"], "$default");
    assert!(seen["time_epoch"].as_i64().unwrap() > 1_700_000_000_000);
    // The answer's request id is the one the handler's context had.
    assert_eq!(seen["aws_request_id"], request_id.as_str());

    // A binary body reaches the handler base64-encoded, byte for byte.
    let bytes: Vec<u8> = (0..=255).collect();
    let seen: serde_json::Value = client
        .post(switchyard.url("/api/echo"))
        .header("content-type", "application/octet-stream")
        .body(bytes.clone())
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .map(|body| serde_json::from_slice(&body).unwrap())
        .unwrap();
    assert_eq!(seen["is_base64_encoded"], true);
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(seen["body"].as_str().unwrap())
            .unwrap(),
        bytes
    );

    // JSON without statusCode: 200, application/json, the JSON as returned.
    let plain = client
        .get(switchyard.url("/api/plain"))
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status(), 200);
    assert_eq!(plain.headers()["content-type"], "application/json");
    assert_eq!(plain.text().await.unwrap(), r#"{"hello": "world"}"#);
    // isBase64Encoded answers are decoded.
    let binary = client
        .get(switchyard.url("/api/binary"))
        .send()
        .await
        .unwrap();
    assert_eq!(binary.status(), 200);
    assert_eq!(binary.headers()["content-type"], "application/octet-stream");
    assert_eq!(binary.bytes().await.unwrap().to_vec(), bytes);

    // Failures: the handler's error is a 502 with its type; an answer that is no
    // HTTP response a 502 too; past the timeout a 504.
    let raised = client
        .get(switchyard.url("/api/raise"))
        .send()
        .await
        .unwrap();
    assert_eq!(raised.status(), 502);
    assert_eq!(raised.headers()["x-amzn-errortype"], "ValueError");
    let garbage = client
        .get(switchyard.url("/api/garbage"))
        .send()
        .await
        .unwrap();
    assert_eq!(garbage.status(), 502);
    assert_eq!(
        garbage.headers()["x-amzn-errortype"],
        "Function.InvalidResponse"
    );
    let slow = client
        .get(switchyard.url("/api/sleep?seconds=10"))
        .send()
        .await
        .unwrap();
    assert_eq!(slow.status(), 504);
    assert_eq!(slow.headers()["x-amzn-errortype"], "Sandbox.Timedout");

    // Methods the route does not take: 405 with Allow.
    let deleted = client
        .delete(switchyard.url("/api/echo"))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 405);
    assert_eq!(deleted.headers()["allow"], "GET, POST");
    // HEAD is taken with GET.
    let head = client
        .head(switchyard.url("/api/plain"))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    // A `..` segment (here percent-encoded, which clients would normalise away) would
    // leave the route's prefix: refused.
    let mut stream = tokio::net::TcpStream::connect(switchyard.http)
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut stream,
        b"GET /api/%2e%2e/admin HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut raw)
        .await
        .unwrap();
    let raw = String::from_utf8_lossy(&raw);
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");
    // A path no route takes is still the source's 404.
    let elsewhere = client.get(switchyard.url("/apix")).send().await.unwrap();
    assert_eq!(elsewhere.status(), 404);

    // CORS: the preflight is answered without calling the function; answers carry
    // the allowed origin.
    let preflight = client
        .request(reqwest::Method::OPTIONS, switchyard.url("/api/echo"))
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type")
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status(), 200);
    assert_eq!(
        preflight.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    assert_eq!(preflight.headers()["access-control-max-age"], "600");
    let cross = client
        .get(switchyard.url("/api/plain"))
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(
        cross.headers()["access-control-allow-origin"],
        "https://app.example"
    );

    // A route with a bearer token: 401 without, 403 with a wrong one; the function
    // never sees the token.
    let missing = client
        .get(switchyard.url("/private/echo"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 401);
    let wrong = client
        .get(switchyard.url("/private/echo"))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 403);
    let allowed = client
        .get(switchyard.url("/private/echo"))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(allowed.status(), 201);
    let seen: serde_json::Value = serde_json::from_slice(&allowed.bytes().await.unwrap()).unwrap();
    assert_eq!(seen["headers"].get("authorization"), None, "{seen}");

    // `record = true`: each call of /api is published as an event, the request in
    // payload format 2.0 and the response.
    // (Records are delivered in parallel: the first call's is found by its id.)
    let deadline = Instant::now() + WAIT;
    let first = loop {
        if let Some(found) = audit
            .received()
            .into_iter()
            .find(|record| record.header("ce-id") == Some(request_id.as_str()))
        {
            break found;
        }
        assert!(
            Instant::now() < deadline,
            "no record of the first call among {} records",
            audit.received().len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(first.header("ce-type"), Some("dev.switchyard.route.call"));
    let record: serde_json::Value = serde_json::from_slice(&first.body).unwrap();
    assert_eq!(record["function"], function.as_str());
    assert_eq!(record["request"]["rawPath"], "/api/echo");
    assert_eq!(record["request"]["body"], r#"{"order": 42}"#);
    assert_eq!(record["response"]["statusCode"], 201);
    assert_eq!(record["response"]["headers"]["x-handled-by"], "web.py");
    // Credentials and cookies are not recorded.
    assert_eq!(record["request"].get("cookies"), None, "{record}");
    assert_eq!(record["response"]["headers"].get("set-cookie"), None);
    switchyard.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_function_answers_429_after_the_routes_bounded_wait() {
    let nats = NatsServer::start();
    let function = random_name("full");
    let mut text = base_config(&nats.url(), 0, 0);
    text.push_str(&format!(
        r#"
[[sources.routes]]
path = "/"
function = "{function}"
max_wait = "200ms"
{web}"#,
        web = web_function(&function, "max_concurrency = 1"),
    ));
    let switchyard = Switchyard::start(text).await;
    let client = reqwest::Client::new();
    // One slow call holds the function's only place...
    let slow = {
        let client = client.clone();
        let url = switchyard.url("/sleep?seconds=2");
        tokio::spawn(async move { client.get(url).send().await.unwrap().status() })
    };
    let deadline = Instant::now() + WAIT;
    loop {
        let status = switchyard.admin_json("/v1/functions").await;
        if status["functions"][0]["instances"]["busy"] == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the slow call never ran: {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ...so the next waits 200ms, then gets 429 with Retry-After.
    let throttled = client.get(switchyard.url("/plain")).send().await.unwrap();
    assert_eq!(throttled.status(), 429);
    assert_eq!(throttled.headers()["retry-after"], "1");
    assert_eq!(slow.await.unwrap(), 200);
    // Free again.
    let answered = client.get(switchyard.url("/plain")).send().await.unwrap();
    assert_eq!(answered.status(), 200);
    switchyard.stop().await;
}

/// tests/functions/python/echo_server.py started by the test, on the port it reports.
struct EchoServer {
    child: std::process::Child,
    url: String,
}

impl EchoServer {
    fn start() -> EchoServer {
        let mut child = std::process::Command::new("python3")
            .arg(
                common::test_functions()
                    .join("python")
                    .join("echo_server.py"),
            )
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: u16 = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("the echo server did not report its port: {line:?}"));
        EchoServer {
            child,
            url: format!("http://127.0.0.1:{port}/"),
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_and_http_functions_get_the_request_as_it_came() {
    let nats = NatsServer::start();
    let echo = EchoServer::start();
    let process = random_name("proc");
    let mut text = base_config(&nats.url(), 0, 0);
    text.push_str(&format!(
        r#"
[[sources.routes]]
path = "/managed"
function = "{process}"

[[sources.routes]]
path = "/direct"
function = "direct"

[[sources.routes]]
path = "/signed"
function = "direct"
signature = {{ scheme = "hmac", secret = "route-secret", header = "X-Signature" }}

[[functions]]
type = "process"
name = "{process}"
command = ["python3", "echo_server.py"]
directory = "{directory}"
timeout = "2s"

[[functions]]
type = "http"
name = "direct"
url = "{echo}"
timeout = "2s"
"#,
        directory = common::test_functions().join("python").display(),
        echo = echo.url,
    ));
    let switchyard = Switchyard::start(text).await;
    let client = reqwest::Client::new();
    for prefix in ["/managed", "/direct"] {
        let response = client
            .put(switchyard.url(&format!("{prefix}/items/7?status=202&x=a%20b")))
            .header("x-custom", "kept")
            .header("connection", "x-hop")
            .header("x-hop", "dropped")
            .header("authorization", "Bearer the-functions-own")
            .body(vec![0u8, 1, 2, 255])
            .send()
            .await
            .unwrap();
        // The function's own status and headers come back.
        assert_eq!(response.status(), 202, "{prefix}");
        assert_eq!(response.headers()["x-echo"], "1");
        let seen: serde_json::Value =
            serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        assert_eq!(seen["method"], "PUT");
        assert_eq!(seen["path"], format!("{prefix}/items/7?status=202&x=a%20b"));
        let headers: Vec<(String, String)> =
            serde_json::from_value(seen["headers"].clone()).unwrap();
        let header = |name: &str| {
            headers
                .iter()
                .find(|(candidate, _)| candidate == name)
                .map(|(_, value)| value.as_str())
        };
        assert_eq!(header("x-custom"), Some("kept"));
        // Hop-by-hop headers (and those Connection names) are not forwarded.
        assert_eq!(header("x-hop"), None, "{headers:?}");
        assert!(header("connection").is_none_or(|value| !value.contains("x-hop")));
        // A route without its own bearer token passes Authorization on.
        assert_eq!(header("authorization"), Some("Bearer the-functions-own"));
        assert_eq!(header("x-forwarded-for"), Some("127.0.0.1"));
        assert_eq!(header("x-forwarded-proto"), Some("http"));
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(seen["body"].as_str().unwrap())
                .unwrap(),
            [0u8, 1, 2, 255]
        );
        // Past the function's timeout: 504.
        let slow = client
            .get(switchyard.url(&format!("{prefix}/sleep?seconds=10")))
            .send()
            .await
            .unwrap();
        assert_eq!(slow.status(), 504, "{prefix}");
        assert_eq!(slow.headers()["x-amzn-errortype"], "Sandbox.Timedout");
    }
    // A route with an HMAC signature: unsigned 401, wrongly signed 403, signed 200.
    let body = br#"{"signed": true}"#;
    let unsigned = client
        .post(switchyard.url("/signed"))
        .body(&body[..])
        .send()
        .await
        .unwrap();
    assert_eq!(unsigned.status(), 401);
    let wrong = client
        .post(switchyard.url("/signed"))
        .header("x-signature", "00")
        .body(&body[..])
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 403);
    use hmac::Mac as _;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"route-secret").unwrap();
    mac.update(body);
    let signed = client
        .post(switchyard.url("/signed"))
        .header("x-signature", hex::encode(mac.finalize().into_bytes()))
        .body(&body[..])
        .send()
        .await
        .unwrap();
    assert_eq!(signed.status(), 200);
    switchyard.stop().await;
}
