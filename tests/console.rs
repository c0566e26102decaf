//! The web console in a real browser (Debian's headless Chromium, driven through
//! ChromeDriver by the fantoccini WebDriver client): signing in with the admin
//! token, a webhook's invocation of a Lambda handler appearing with its log, a dead
//! letter shown, replayed from the page and delivered, the page's labels and
//! keyboard use, and a narrow screen. Screenshots are kept under
//! `<target dir>/tmp/artifacts/console/` (see docs/TESTING.md).

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{FunctionServer, NatsServer, Process, Reply};
use fantoccini::{Client, ClientBuilder, Locator};
use switchyard_testkit::browser::ChromeDriver;
use switchyard_testkit::jaeger::JaegerServer;

const WAIT: Duration = Duration::from_secs(60);
const TOKEN: &str = "console-token-7f3a";
/// WebDriver's Enter key.
const ENTER: &str = "\u{E007}";

fn artifacts() -> PathBuf {
    let directory = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("artifacts/console");
    std::fs::create_dir_all(&directory).unwrap();
    directory
}

async fn screenshot(client: &Client, name: &str) {
    let png = client.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    std::fs::write(artifacts().join(format!("{name}.png")), png).unwrap();
}

/// Evaluates `expression` in the page until it gives something other than null or
/// false (at most [`WAIT`]), and returns that; `process` must stay up meanwhile.
async fn wait_for(
    client: &Client,
    process: &Process,
    what: &str,
    expression: &str,
) -> serde_json::Value {
    let deadline = Instant::now() + WAIT;
    let script = format!("return ({expression});");
    loop {
        let value = client.execute(&script, vec![]).await.unwrap();
        if !value.is_null() && value != serde_json::Value::Bool(false) {
            return value;
        }
        process.assert_running();
        if Instant::now() > deadline {
            let page = client
                .execute("return document.body.innerText;", vec![])
                .await
                .unwrap();
            let _ = screenshot(client, &format!("failed-{}", what.replace(' ', "-"))).await;
            panic!(
                "waited {WAIT:?} for {what}; the page shows:\n{}",
                page.as_str().unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The text of the table `id`'s body cells, row by row.
fn table_rows(id: &str) -> String {
    format!(
        "Array.from(document.querySelectorAll('#{id} tbody tr')).map((row) => Array.from(row.cells).map((cell) => cell.textContent))"
    )
}

/// Every form control and button has a name a screen reader says, every table has
/// column headers, and the page declares its language: the problems found.
const ACCESSIBILITY: &str = r#"
const problems = [];
if (!document.documentElement.lang) problems.push('no lang on <html>');
for (const control of document.querySelectorAll('input, select, textarea')) {
  const labelled = (control.labels && control.labels.length > 0) || control.getAttribute('aria-label') || control.getAttribute('aria-labelledby');
  if (!labelled) problems.push('unlabelled ' + control.tagName + ' #' + control.id);
}
for (const button of document.querySelectorAll('button, a[href]')) {
  const name = (button.getAttribute('aria-label') || button.textContent || '').trim();
  if (!name) problems.push('nameless ' + button.tagName + ' ' + button.outerHTML.slice(0, 80));
}
for (const table of document.querySelectorAll('table')) {
  if (table.querySelectorAll('thead th[scope=col]').length === 0) problems.push('table #' + table.id + ' has no column headers');
}
return problems;
"#;

async fn accessibility_problems(client: &Client) -> Vec<String> {
    serde_json::from_value(client.execute(ACCESSIBILITY, vec![]).await.unwrap()).unwrap()
}

/// The page is not wider than the window (tables scroll inside their own boxes).
async fn overflows(client: &Client) -> bool {
    client
        .execute(
            "return document.documentElement.scrollWidth > window.innerWidth;",
            vec![],
        )
        .await
        .unwrap()
        .as_bool()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_signs_in_sees_an_invocation_and_replays_a_dead_letter() {
    let nats = NatsServer::start();
    let jaeger = JaegerServer::start();
    // Orders are refused (422: dead-lettered at once) until `accept` is set.
    let accept = Arc::new(AtomicBool::new(false));
    let orders = {
        let accept = accept.clone();
        FunctionServer::start(move |_, _| {
            if accept.load(Ordering::SeqCst) {
                Reply::ok()
            } else {
                Reply::status(422).with_body("<img src=x onerror=alert(1)>order 17 has no customer")
            }
        })
        .await
    };
    let directory = tempfile::tempdir().unwrap();
    let file = directory.path().join("switchyard.toml");
    let text = common::base_config(&nats.url(), 0, 0).replacen(
        "[admin]\n",
        &format!("[admin]\nbearer_token = \"{TOKEN}\"\n"),
        1,
    );
    let text = format!(
        r#"{text}
[[sources.hooks]]
name = "jobs"
event_type = "com.example.job"
id_header = "Idempotency-Key"

[[sources.hooks]]
name = "orders"
event_type = "com.example.order"
id_header = "Idempotency-Key"

{hello}

[[functions]]
type = "http"
name = "orders"
url = "{orders_url}"

[[triggers]]
name = "jobs"
function = "hello"
filter = {{ type = {{ exact = "com.example.job" }} }}

[[triggers]]
name = "orders"
function = "orders"
filter = {{ type = {{ exact = "com.example.order" }} }}

[telemetry]
otlp_endpoint = "{otlp}"
trace_url = "{trace_url}"
"#,
        hello = common::python_lambda("hello", "memory = 256"),
        orders_url = orders.url,
        otlp = jaeger.otlp_endpoint(),
        trace_url = jaeger.trace_url("{trace_id}"),
    );
    std::fs::write(&file, text).unwrap();
    let process = Process::start(&file, &[]);
    process.wait_ready().await;
    let console = format!("http://{}/console/", process.admin());

    // The page itself is public and locked down; its data is not.
    let page = reqwest::get(&console).await.unwrap();
    assert_eq!(page.status(), 200);
    let policy = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        policy.contains("script-src 'self'") && policy.contains("frame-ancestors 'none'"),
        "{policy}"
    );
    assert_eq!(
        reqwest::get(format!("http://{}/v1/console", process.admin()))
            .await
            .unwrap()
            .status(),
        401
    );

    let driver = ChromeDriver::start();
    let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(ChromeDriver::capabilities(1280, 900))
        .connect(&driver.url)
        .await
        .expect("a chromium session");
    client.goto(&console).await.unwrap();

    // Signing in: a wrong token is refused, the right one typed and sent with Enter.
    let token = client
        .wait()
        .at_most(WAIT)
        .for_element(Locator::Css("#token"))
        .await
        .unwrap();
    wait_for(
        &client,
        &process,
        "the sign-in form",
        "!document.getElementById('sign-in').hidden",
    )
    .await;
    assert_eq!(
        client
            .find(Locator::Css("label[for=token]"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "Admin token"
    );
    assert_eq!(accessibility_problems(&client).await, Vec::<String>::new());
    screenshot(&client, "1-sign-in").await;
    token
        .send_keys(&format!("not-the-token{ENTER}"))
        .await
        .unwrap();
    wait_for(
        &client,
        &process,
        "the refusal",
        "document.getElementById('sign-in-error').textContent === 'That token was refused.'",
    )
    .await;
    token.send_keys(&format!("{TOKEN}{ENTER}")).await.unwrap();

    // Sources and triggers.
    wait_for(
        &client,
        &process,
        "the http source running",
        &format!(
            "{}.some((row) => row[0] === 'http' && row[1] === 'http' && row[2] === 'running')",
            table_rows("sources")
        ),
    )
    .await;
    let triggers = wait_for(
        &client,
        &process,
        "the triggers",
        &format!("{}.length === 2 && {0}", table_rows("triggers")),
    )
    .await;
    assert_eq!(triggers[0][1], "hello", "{triggers}");
    screenshot(&client, "2-overview").await;

    // A webhook; its invocation appears on the function's page without a reload.
    client
        .find(Locator::LinkText("Functions"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(
        &client,
        &process,
        "the function list",
        &format!(
            "{}.some((row) => row[0] === 'hello')",
            table_rows("functions")
        ),
    )
    .await;
    let response = reqwest::Client::new()
        .post(process.url("/hooks/jobs"))
        .header("content-type", "application/json")
        .header("idempotency-key", "job-41")
        .body(r#"{"action":"echo"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    client
        .find(Locator::LinkText("hello"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let invocation = wait_for(
        &client,
        &process,
        "the invocation",
        &format!(
            "{}.find((row) => row[2] === 'success') || null",
            table_rows("invocations")
        ),
    )
    .await;
    let request_id = invocation[1].as_str().unwrap().to_owned();
    assert!(!request_id.is_empty());
    let counts = wait_for(
        &client,
        &process,
        "the function's counts",
        &format!(
            "{}.find((row) => row[0] === 'hello' && row[6] === '1') || null",
            table_rows("functions")
        ),
    )
    .await;
    // One cold start; the instance is idle or busy now, not starting.
    assert_eq!(counts[5], "1", "{counts}");
    client
        .find(Locator::Css(&format!(
            "button[aria-label='Show the log of invocation {request_id}']"
        )))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    // END and REPORT are stored a moment after the invocation is listed: a read that
    // ended before them is asked again.
    let log = wait_for(
        &client,
        &process,
        "the invocation's log",
        &format!(
            "(() => {{
                const text = document.getElementById('log').textContent;
                if (text.includes('REPORT RequestId')) return text;
                if (!text.startsWith('Reading')) document.querySelector(\"button[aria-label='Show the log of invocation {request_id}']\").click();
                return null;
            }})()"
        ),
    )
    .await;
    let log = log.as_str().unwrap();
    assert!(log.contains("echoing job-41"), "{log}");
    assert!(
        log.contains(&format!("START RequestId: {request_id}")),
        "{log}"
    );
    screenshot(&client, "3-function").await;

    // Its trace link leads to the trace, which holds the invocation.
    let trace = client
        .find(Locator::Css(
            "#invocations tbody tr a[aria-label^='Trace ']",
        ))
        .await
        .unwrap()
        .attr("href")
        .await
        .unwrap()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let response = reqwest::get(&trace).await.unwrap();
        let body = response.text().await.unwrap();
        if body.contains("\"operationName\":\"invoke hello\"") {
            break;
        }
        assert!(Instant::now() < deadline, "{trace} answers {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // An order is refused: a dead letter, shown, replayed with the keyboard and
    // delivered.
    let response = reqwest::Client::new()
        .post(process.url("/hooks/orders"))
        .header("content-type", "application/json")
        .header("idempotency-key", "order-17")
        .body(r#"{"order":17}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    orders.wait_for(1, WAIT).await;
    client
        .find(Locator::LinkText("Dead letters"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(
        &client,
        &process,
        "the trigger choice",
        "document.querySelector('#dead-letter-trigger option[value=orders]') !== null",
    )
    .await;
    client
        .find(Locator::Css("#dead-letter-trigger"))
        .await
        .unwrap()
        .select_by_value("orders")
        .await
        .unwrap();
    let letter = wait_for(
        &client,
        &process,
        "the dead letter",
        &format!(
            "{}.find((row) => row[5] === 'com.example.order order-17') || null",
            table_rows("dead-letters")
        ),
    )
    .await;
    assert_eq!(letter[2], "rejected", "{letter}");
    // What the function answered is shown as the text it is, never as markup.
    assert!(
        letter[4]
            .as_str()
            .unwrap()
            .contains("<img src=x onerror=alert(1)>"),
        "{letter}"
    );
    assert_eq!(
        client
            .execute(
                "return document.querySelectorAll('#dead-letters img').length;",
                vec![]
            )
            .await
            .unwrap(),
        0
    );
    assert!(letter[4].as_str().unwrap().starts_with("422"), "{letter}");
    let sequence = letter[0].as_str().unwrap().to_owned();
    client
        .find(Locator::Css(&format!(
            "button[aria-label='Show dead letter {sequence}']"
        )))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let shown = wait_for(
        &client,
        &process,
        "the dead letter's record",
        "document.getElementById('dead-letter').textContent.includes('\"order\": 17') && document.getElementById('dead-letter').textContent",
    )
    .await;
    assert!(shown.as_str().unwrap().contains("order-17"), "{shown}");
    assert_eq!(accessibility_problems(&client).await, Vec::<String>::new());
    screenshot(&client, "4-dead-letter").await;

    accept.store(true, Ordering::SeqCst);
    client
        .find(Locator::Css(&format!(
            "button[aria-label='Replay dead letter {sequence}']"
        )))
        .await
        .unwrap()
        .send_keys(ENTER)
        .await
        .unwrap();
    let question = client.get_alert_text().await.unwrap();
    assert_eq!(
        question,
        format!("Replay dead letter {sequence} of trigger orders?")
    );
    client.accept_alert().await.unwrap();
    wait_for(
        &client,
        &process,
        "the replay's result",
        "document.getElementById('action-result').textContent === 'Replayed 1 dead letter of orders.'",
    )
    .await;
    let received = orders.wait_for(2, WAIT).await;
    assert_eq!(received[1].id(), received[0].id());
    // The dead letter stays, saying it was replayed, until purged.
    wait_for(
        &client,
        &process,
        "the replay counted",
        &format!(
            "{}.some((row) => row[0] === '{sequence}' && row[6].startsWith('1 (last '))",
            table_rows("dead-letters")
        ),
    )
    .await;
    screenshot(&client, "5-replayed").await;
    client
        .find(Locator::Css(&format!(
            "button[aria-label='Purge dead letter {sequence}']"
        )))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    assert_eq!(
        client.get_alert_text().await.unwrap(),
        format!("Purge dead letter {sequence} of trigger orders?")
    );
    client.accept_alert().await.unwrap();
    wait_for(
        &client,
        &process,
        "the purge's result",
        "document.getElementById('action-result').textContent === 'Purged 1 dead letter of orders.' && !document.getElementById('dead-letters-empty').hidden && document.getElementById('dead-letter').hidden",
    )
    .await;
    screenshot(&client, "6-purged").await;
    // The trigger's page counts the delivery, live.
    client
        .find(Locator::LinkText("Sources & triggers"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(
        &client,
        &process,
        "the delivery counted",
        &format!(
            "{}.some((row) => row[0] === 'orders' && row[7] === '1' && row[9] === '1')",
            table_rows("triggers")
        ),
    )
    .await;

    // A phone-sized window: nothing wider than the screen, on every section.
    client.set_window_size(390, 844).await.unwrap();
    for (link, view, name) in [
        ("Sources & triggers", "overview", "7-narrow-overview"),
        ("Functions", "functions", "8-narrow-functions"),
        ("Dead letters", "dead-letters", "9-narrow-dead-letters"),
    ] {
        client
            .find(Locator::LinkText(link))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        wait_for(
            &client,
            &process,
            "the section",
            &format!("!document.getElementById('view-{view}').hidden"),
        )
        .await;
        assert!(
            !overflows(&client).await,
            "{name}: the page is wider than a narrow window"
        );
        screenshot(&client, name).await;
    }

    // Signing out forgets the token.
    client
        .find(Locator::Css("#sign-out"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(
        &client,
        &process,
        "the sign-in form again",
        "!document.getElementById('sign-in').hidden && sessionStorage.length === 0",
    )
    .await;
    client.close().await.unwrap();
}
