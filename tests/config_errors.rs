//! Configuration mistakes are reported with the file, the line and the field, by
//! `switchyard validate` and before anything starts.

use std::process::Command;

fn validate(text: &str) -> (bool, String) {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("broken.toml");
    std::fs::write(&path, text).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["validate", "--config"])
        .arg(&path)
        .env_remove("SWITCHYARD_UNSET_FOR_TEST")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stderr).to_string()
        + &String::from_utf8_lossy(&output.stdout);
    (
        output.status.success(),
        text.replace(&directory.path().display().to_string(), "DIR"),
    )
}

#[test]
fn every_shipped_configuration_is_valid() {
    let directory = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config");
    let mut checked = 0;
    for entry in std::fs::read_dir(directory).unwrap() {
        let path = entry.unwrap().path();
        if path
            .extension()
            .is_some_and(|extension| extension == "toml")
        {
            // The docker configuration's tokens come from the environment.
            let output = Command::new(env!("CARGO_BIN_EXE_switchyard"))
                .args(["validate", "--config"])
                .arg(&path)
                .env("SWITCHYARD_TOKEN", "shipped-token")
                .env("SWITCHYARD_ADMIN_TOKEN", "shipped-admin-token")
                .env("GITHUB_WEBHOOK_SECRET", "shipped-github-secret")
                .output()
                .unwrap();
            assert!(
                output.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&output.stderr)
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 2,
        "config/ holds the default and the docker configuration"
    );
}

#[test]
fn an_unknown_field_names_file_line_and_field() {
    let (ok, output) = validate(
        "[nats]\nurl = \"nats://127.0.0.1:4222\"\n\n[[triggers]]\nname = \"t\"\nfunction = \"f\"\nmax_concurency = 3\n",
    );
    assert!(!ok);
    assert!(
        output.contains(
            "DIR/broken.toml:7:1: field `max_concurency`: unknown field `max_concurency`"
        ),
        "{output}"
    );
}

/// Every parse mistake at once, each at its own field's line, also inside tables
/// selected by `type` (where the deserializer only knows the table's header).
#[test]
fn every_parse_mistake_is_reported_at_its_own_line() {
    let (ok, output) = validate(
        r#"
[[triggers]]
name = "t"
function = "f"
timeout = "5 parsecs"

[[sources]]
type = "http"
name = "web"
listn = "127.0.0.1:8080"

[[functions]]
type = "http"
name = "f"
url = "http://127.0.0.1:9/"
timeout = "7 fortnights"
"#,
    );
    assert!(!ok);
    for expected in [
        "DIR/broken.toml:5:11: field `timeout`: invalid value: string \"5 parsecs\"",
        "DIR/broken.toml:10:1: field `listn`: unknown field `listn`",
        "DIR/broken.toml:16:1: field `timeout`: invalid value: string \"7 fortnights\"",
    ] {
        assert!(
            output.contains(expected),
            "missing `{expected}` in:\n{output}"
        );
    }
}

#[test]
fn a_wrong_type_names_file_line_and_field() {
    let (ok, output) = validate(
        "[[functions]]\ntype = \"log\"\nname = \"p\"\n\n[[triggers]]\nname = \"t\"\nfunction = \"p\"\nmax_concurrency = \"lots\"\n",
    );
    assert!(!ok);
    assert!(
        output.contains(
            "DIR/broken.toml:8:19: field `max_concurrency`: invalid type: string \"lots\""
        ),
        "{output}"
    );
}

#[test]
fn an_unknown_connector_type_lists_the_known_ones() {
    let (ok, output) = validate("[[sources]]\ntype = \"kafak\"\nname = \"k\"\n");
    assert!(!ok);
    assert!(
        output.contains(
            "DIR/broken.toml:2:8: field `type`: unknown variant `kafak`, expected one of `http`, `nats`"
        ),
        "{output}"
    );
}

#[test]
fn every_semantic_mistake_is_reported_at_once() {
    let text = r#"
[[functions]]
type = "http"
name = "build"
url = "ftp://example.com/"

[[triggers]]
name = "on-push"
function = "biuld"

[[triggers]]
name = "on-push"
function = "build"
max_concurrency = 0
"#;
    let (ok, output) = validate(text);
    assert!(!ok);
    for expected in [
        "DIR/broken.toml:5:1: field `url`: scheme `ftp` is not supported",
        "DIR/broken.toml:9:1: field `function`: trigger `on-push` targets unknown function `biuld` (known: build)",
        "DIR/broken.toml:12:1: field `name`: trigger `on-push` is defined twice",
        "DIR/broken.toml:14:1: field `max_concurrency`: must be at least 1",
    ] {
        assert!(
            output.contains(expected),
            "missing `{expected}` in:\n{output}"
        );
    }
}

/// An ack_wait as long as the duplicate window would let a redelivered event's retry
/// copy or dead letter be stored twice after a crash: refused at its line.
#[test]
fn ack_wait_must_be_shorter_than_the_duplicate_window() {
    let text = r#"
[nats]
events_stream = { duplicate_window = "1m" }

[[functions]]
type = "http"
name = "f"
url = "http://127.0.0.1:9/"

[[triggers]]
name = "slow"
function = "f"
ack_wait = "5m"
"#;
    let (ok, output) = validate(text);
    assert!(!ok);
    assert!(
        output.contains("DIR/broken.toml:13:1: field `ack_wait`: 5m is not shorter than the events stream's duplicate_window (1m)"),
        "{output}"
    );
}

/// A trigger named like another trigger's consumer (`orders-direct` is the name of
/// `orders`' direct consumer) would rewrite that consumer at start: refused.
#[test]
fn trigger_names_that_would_share_a_consumer_are_refused() {
    let text = r#"
[[functions]]
type = "http"
name = "f"
url = "http://127.0.0.1:9/"

[[triggers]]
name = "orders"
function = "f"

[[triggers]]
name = "orders-direct"
function = "f"

[[triggers]]
name = "orders-retry"
function = "f"

[[triggers]]
name = "orders-p0of8"
function = "f"
"#;
    let (ok, output) = validate(text);
    assert!(!ok);
    for (line, suffix) in [(12, "-direct"), (16, "-retry"), (20, "-p<i>of<n>")] {
        let expected = format!("DIR/broken.toml:{line}:1: field `name`: trigger `");
        assert!(
            output.contains(&expected) && output.contains(&format!("ends in `{suffix}`")),
            "missing `{expected}...{suffix}` in:\n{output}"
        );
    }
    assert!(!output.contains("trigger `orders` "), "{output}");
}

#[test]
fn an_unset_environment_variable_is_located() {
    let (ok, output) = validate("[nats]\nurl = \"${SWITCHYARD_UNSET_FOR_TEST}\"\n");
    assert!(!ok);
    assert!(
        output.contains(
            "DIR/broken.toml:2:8: environment variable `SWITCHYARD_UNSET_FOR_TEST` is not set"
        ),
        "{output}"
    );
}

#[cfg(feature = "kafka")]
#[test]
fn kafka_source_mistakes_are_located() {
    let (ok, output) = validate(
        r#"
[[sources]]
type = "kafka"
name = "orders"
brokers = "127.0.0.1:9092"
topics = ["orders"]
topic_pattern = "orders-.*"
max_in_flight = 0
properties = { "group.id" = "mine", "no.such.property" = "1" }
"#,
    );
    assert!(!ok);
    for expected in [
        "DIR/broken.toml:6:1: field `topics`: source `orders` needs either `topics` or `topic_pattern`, not both",
        "DIR/broken.toml:8:1: field `max_in_flight`: must be at least 1",
        "DIR/broken.toml:9:1: field `properties`: `group.id` is managed by Switchyard: use the `group_id` field",
    ] {
        assert!(
            output.contains(expected),
            "missing `{expected}` in:\n{output}"
        );
    }
    // librdkafka's own check, once the rest is right.
    let (ok, output) = validate(
        r#"
[[sources]]
type = "kafka"
name = "orders"
brokers = "127.0.0.1:9092"
topics = ["orders"]
properties = { "no.such.property" = "1" }
"#,
    );
    assert!(!ok);
    assert!(
        output.contains(
            "DIR/broken.toml:7:1: field `properties`: librdkafka refused the configuration"
        ) && output.contains("no.such.property"),
        "{output}"
    );
}

#[cfg(feature = "s3")]
#[test]
fn object_store_mistakes_are_located() {
    let (ok, output) = validate(
        r#"
[stores.minio]
endpoint = "127.0.0.1:9000"
access_key_id = "key-without-secret"

[[sources]]
type = "s3"
name = "uploads"
store = "nowhere"
buckets = ["Bad_Bucket"]
page_size = 0
listing = "start_after"
deletions = true

[[sources]]
type = "http"
name = "http"

[[sources.hooks]]
name = "s3"
format = "s3"
event_type = "com.example.upload"

[[functions]]
type = "log"
name = "fn"

[[triggers]]
name = "t"
function = "fn"
enrich = { store = "elsewhere", presign = "30d", content_max_bytes = 10000000 }
"#,
    );
    assert!(!ok);
    for expected in [
        "DIR/broken.toml:3:1: field `endpoint`: `127.0.0.1:9000` is not a URL like http://127.0.0.1:9000",
        "DIR/broken.toml:4:1: field `access_key_id`: set both access_key_id and secret_access_key",
        "DIR/broken.toml:9:1: field `store`: no store named `nowhere` (add a `[stores.nowhere]` table; known: minio)",
        "DIR/broken.toml:10:1: field `buckets`: `Bad_Bucket` is not a bucket name",
        "DIR/broken.toml:11:1: field `page_size`: must be between 1 and 1000",
        "DIR/broken.toml:13:1: field `deletions`: `listing = \"start_after\"` never sees deletions",
        "field `event_type`: hook `s3` reads S3 notifications",
        "field `enrich`: no store named `elsewhere`",
        "field `enrich`: `presign` must be more than zero and at most 7 days",
        "field `enrich`: list the `buckets` whose objects may be enriched (`[\"*\"]` for any)",
        "field `enrich`: `content_max_bytes` must be between 1 and 4194304",
    ] {
        assert!(
            output.contains(expected),
            "missing `{expected}` in:\n{output}"
        );
    }
}

#[test]
fn managed_function_mistakes_are_located() {
    let text = r#"
[[functions]]
type = "lambda"
name = "thumbnails"
command = []
directory = "no/such/dir"
memory = 64
timeout = "0s"
environment = { "A=B" = "x" }

[[functions]]
type = "process"
name = "web"
command = ["python3", "server.py"]
path = "events"
instance_concurrency = 0
min_instances = 20
max_concurrency = 4

[[functions]]
type = "lambda"
name = "typo"
command = ["python3"]
hander = "app.handler"

[[triggers]]
name = "batched"
function = "web"
batch = { max_events = 10 }
"#;
    let (ok, output) = validate(text);
    assert!(!ok);
    let expected = "DIR/broken.toml:24:1: field `hander`: unknown field `hander`";
    assert!(
        output.contains(expected),
        "missing `{expected}` in:\n{output}"
    );
    // The parse mistake is reported first; without it, every semantic one at once.
    let (ok, output) = validate(&text.replace("hander", "handler"));
    assert!(!ok);
    for expected in [
        "DIR/broken.toml:5:1: field `command`: is empty",
        "DIR/broken.toml:6:1: field `directory`: `DIR/no/such/dir` is not a directory",
        "DIR/broken.toml:7:1: field `memory`: 64 MB is outside 128 to 10240",
        "DIR/broken.toml:8:1: field `timeout`: must be longer than 0s",
        "DIR/broken.toml:9:1: field `environment`: `A=B` is not a valid environment variable name",
        "DIR/broken.toml:15:1: field `path`: `events` is not a path",
        "DIR/broken.toml:16:1: field `instance_concurrency`: must be at least 1",
        "DIR/broken.toml:17:1: field `min_instances`: 20 is more than the most instances at once",
        "DIR/broken.toml:29:1: field `batch`: function `web` runs as instances Switchyard manages",
    ] {
        assert!(
            output.contains(expected),
            "missing `{expected}` in:\n{output}"
        );
    }
}

/// The Invoke API checks no signatures yet: a listener off loopback needs the
/// operator's explicit word.
#[test]
fn an_invoke_api_open_to_the_network_is_refused_without_insecure() {
    let (ok, output) = validate("[invoke_api]\nlisten = \"0.0.0.0:9001\"\n");
    assert!(!ok);
    assert!(
        output.contains("field `invoke_api.listen`: `0.0.0.0:9001` is open to the network"),
        "{output}"
    );
    let (ok, output) = validate("[invoke_api]\nlisten = \"0.0.0.0:9001\"\ninsecure = true\n");
    assert!(ok, "{output}");
    let (ok, output) = validate("[invoke_api]\nlisten = \"127.0.0.1:9001\"\n");
    assert!(ok, "{output}");
}

/// AWS-shaped payloads are for `lambda` functions; with the Invoke API on, each
/// `lambda` function's `invoke-<name>` trigger name is taken and its `async`
/// settings are checked.
#[test]
fn aws_payload_and_event_invocation_mistakes_are_located() {
    let text = r#"
[invoke_api]
listen = "127.0.0.1:9001"

[[functions]]
type = "log"
name = "printer"

[[functions]]
type = "lambda"
name = "thumbs"
command = ["python3"]
async = { attempts = 0 }

[[triggers]]
name = "shaped"
function = "printer"
payload = "aws"

[[triggers]]
name = "invoke-thumbs"
function = "thumbs"
"#;
    let (ok, output) = validate(text);
    assert!(!ok);
    for expected in [
        "DIR/broken.toml:13:1: field `async`: `attempts` must be at least 1",
        "DIR/broken.toml:18:1: field `payload`: `aws` payloads are for `lambda` functions; `printer` receives CloudEvents",
        "DIR/broken.toml:21:1: field `name`: `invoke-thumbs` is the name of the trigger delivering function `thumbs`'s Event invocations",
    ] {
        assert!(
            output.contains(expected),
            "missing `{expected}` in:\n{output}"
        );
    }
}

/// Function URL mistakes: a route open to the network without authentication (unless
/// `public`), a path the source serves itself, a function that cannot answer, a
/// method that is none, CORS credentials with a wildcard.
#[test]
fn route_mistakes_are_located() {
    let text = r#"
[[sources]]
type = "http"
name = "web"
listen = "0.0.0.0:8080"

[[sources.routes]]
path = "/api"
function = "printer"
methods = ["GE T"]

[[sources.routes]]
path = "/hooks/x"
function = "nope"
public = true
cors = { allow_origins = ["*"], allow_credentials = true }

[[sources.routes]]
path = "/api/:v1"
function = "printer"
public = true

[[sources.routes]]
path = "/api/"
function = "printer"
public = true

[[functions]]
type = "log"
name = "printer"
"#;
    let (ok, output) = validate(text);
    assert!(!ok);
    for expected in [
        "DIR/broken.toml:19:1: field `path`: route path `/api/:v1` is a prefix of letters, digits",
        "DIR/broken.toml:23:1: field `methods`: route `/api/` takes methods an earlier route at `/api` takes already",
        "DIR/broken.toml:7:1: field `public`: route `/api` on `0.0.0.0:8080`, which is open to the network, has no authentication",
        "DIR/broken.toml:9:1: field `function`: route `/api`: function `printer` only logs events and cannot answer a request",
        "DIR/broken.toml:10:1: field `methods`: route `/api`: `GE T` is not an HTTP method",
        "DIR/broken.toml:13:1: field `path`: route path `/hooks/x` is the source's own",
        "DIR/broken.toml:14:1: field `function`: route `/hooks/x` names unknown function `nope`",
        "DIR/broken.toml:16:1: field `cors`: route `/hooks/x`: `allow_credentials` cannot go with `*`",
    ] {
        assert!(
            output.contains(expected),
            "missing `{expected}` in:\n{output}"
        );
    }
}

/// Listener limits that would refuse everyone or nothing are located.
#[test]
fn listener_limit_mistakes_are_located() {
    let text = r#"
[[sources]]
type = "http"
name = "web"
limits = { header_timeout = "0s", max_requests = 0, rate_limit = { per_second = 0 } }

[admin]
listen = "127.0.0.1:9090"
limits = { max_connections = 0 }
"#;
    let (ok, output) = validate(text);
    assert!(!ok);
    for expected in [
        "DIR/broken.toml:5:1: field `limits`: `header_timeout` must be longer than 0s",
        "DIR/broken.toml:5:1: field `limits`: `max_requests` must be at least 1",
        "DIR/broken.toml:5:1: field `limits`: `rate_limit` `per_second` and `burst` must be at least 1",
        "field `admin.limits.max_connections`: must be at least 1",
    ] {
        assert!(
            output.contains(expected),
            "missing `{expected}` in:\n{output}"
        );
    }
}

/// A listener open to the network that takes events needs authentication: a token,
/// a signature, client certificates, or the operator's explicit `insecure = true`.
#[test]
fn an_http_source_open_to_the_network_needs_authentication() {
    let open = r#"
[[sources]]
type = "http"
name = "web"
listen = "0.0.0.0:8080"

[[sources.hooks]]
name = "plain"
event_type = "com.example.plain"

[[sources.hooks]]
name = "github"
event_type = "com.github.event"
signature = { scheme = "github", secret = "s3cret" }
"#;
    let (ok, output) = validate(open);
    assert!(!ok);
    assert!(
        output.contains("DIR/broken.toml:5:1: field `listen`: source `web` listens on `0.0.0.0:8080`, open to the network, and its `/v1/events` would take events from anyone"),
        "{output}"
    );
    assert!(
        output.contains("field `hooks`: hook `plain` of source `web` is open to the network"),
        "{output}"
    );
    assert!(!output.contains("hook `github`"), "{output}");
    // The source's token guards `/v1/events` and the hook without its own.
    let (ok, output) = validate(&open.replace(
        "listen = \"0.0.0.0:8080\"\n",
        "listen = \"0.0.0.0:8080\"\nbearer_token = \"t0ken\"\n",
    ));
    assert!(ok, "{output}");
    // Only the signed hook, the CloudEvents endpoint off.
    let signed_only = open.replace(
        "listen = \"0.0.0.0:8080\"\n",
        "listen = \"0.0.0.0:8080\"\nevents_endpoint = false\n",
    );
    let (ok, output) = validate(&signed_only);
    assert!(!ok && !output.contains("/v1/events"), "{output}");
    let (ok, output) = validate(&signed_only.replace(
        "[[sources.hooks]]\nname = \"plain\"\nevent_type = \"com.example.plain\"\n\n",
        "",
    ));
    assert!(ok, "{output}");
    // The operator's word.
    let (ok, output) = validate(&open.replace(
        "listen = \"0.0.0.0:8080\"\n",
        "listen = \"0.0.0.0:8080\"\ninsecure = true\n",
    ));
    assert!(ok, "{output}");
    // Client certificates (mutual TLS).
    let directory = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(directory.path().join("cert.pem"), certified.cert.pem()).unwrap();
    std::fs::write(
        directory.path().join("key.pem"),
        certified.key_pair.serialize_pem(),
    )
    .unwrap();
    let (ok, output) = validate(&open.replace(
        "listen = \"0.0.0.0:8080\"\n",
        &format!(
            "listen = \"0.0.0.0:8080\"\ntls = {{ cert_file = \"{dir}/cert.pem\", key_file = \"{dir}/key.pem\", client_ca_file = \"{dir}/cert.pem\" }}\n",
            dir = directory.path().display()
        ),
    ));
    assert!(ok, "{output}");
    // On loopback nothing is needed.
    let (ok, output) = validate(&open.replace("0.0.0.0:8080", "127.0.0.1:8080"));
    assert!(ok, "{output}");
}

#[test]
fn empty_tokens_and_secrets_are_refused() {
    let text = r#"
[admin]
bearer_token = ""

[[sources]]
type = "http"
name = "web"
bearer_tokens = ["good", " "]

[[sources.hooks]]
name = "github"
event_type = "com.github.event"
signature = { scheme = "github", secret = "" }
"#;
    let (ok, output) = validate(text);
    assert!(!ok);
    for expected in [
        "DIR/broken.toml:3:1: field `admin.bearer_token`: an empty bearer token would let anyone in",
        "field `bearer_token`: source `web`: an empty bearer token would let anyone in",
        "field `secret`: hook `github`: an empty signature secret would let anyone sign",
    ] {
        assert!(
            output.contains(expected),
            "missing `{expected}` in:\n{output}"
        );
    }
}

#[test]
fn an_admin_listener_open_to_the_network_needs_a_token() {
    let (ok, output) = validate("[admin]\nlisten = \"0.0.0.0:9090\"\n");
    assert!(!ok);
    assert!(
        output.contains(
            "DIR/broken.toml:2:1: field `admin.listen`: `0.0.0.0:9090` is open to the network"
        ),
        "{output}"
    );
    let (ok, output) = validate("[admin]\nlisten = \"0.0.0.0:9090\"\nbearer_token = \"t\"\n");
    assert!(ok, "{output}");
    let (ok, output) = validate("[admin]\nlisten = \"0.0.0.0:9090\"\ninsecure = true\n");
    assert!(ok, "{output}");
}

/// `<secret>_file` reads a secret from a file; a missing or empty file, or both
/// forms at once, are located.
#[test]
fn secret_file_mistakes_are_located() {
    let text = r#"
[admin]
bearer_token_file = "missing-token"

[[sources]]
type = "http"
name = "web"
bearer_token = "inline"
bearer_token_file = "token"

[[sources.hooks]]
name = "github"
event_type = "com.github.event"
signature = { scheme = "github", secret_file = "empty" }
"#;
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("broken.toml");
    std::fs::write(&path, text).unwrap();
    std::fs::write(directory.path().join("token"), "t\n").unwrap();
    std::fs::write(directory.path().join("empty"), "\n").unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["validate", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let output = String::from_utf8_lossy(&output.stderr)
        .replace(&directory.path().display().to_string(), "DIR");
    for expected in [
        "DIR/broken.toml:3:1: field `bearer_token_file`: cannot read `DIR/missing-token`",
        "DIR/broken.toml:9:1: field `bearer_token_file`: set `bearer_token` or `bearer_token_file`, not both",
        "DIR/broken.toml:14:34: field `secret_file`: `DIR/empty` is empty",
    ] {
        assert!(
            output.contains(expected),
            "missing `{expected}` in:\n{output}"
        );
    }
}

/// A `${VAR}` value cannot change the file's structure.
#[test]
fn substituted_values_stay_values() {
    let run = |text: &str, value: &str| {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("broken.toml");
        std::fs::write(&path, text).unwrap();
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["validate", "--config"])
            .arg(&path)
            .env("SWITCHYARD_TEST_VALUE", value)
            .output()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stderr)
                .replace(&directory.path().display().to_string(), "DIR"),
        )
    };
    // A value that would close the string and add a table is one string.
    let injected = "x\"\n[admin]\nlisten = \"0.0.0.0:1\"\ninsecure = true\n#";
    let text = "[[sources]]\ntype = \"http\"\nname = \"web\"\nlisten = \"127.0.0.1:8080\"\n\n[[sources.hooks]]\nname = \"h\"\nevent_type = \"${SWITCHYARD_TEST_VALUE}\"\n";
    let (ok, output) = run(text, injected);
    assert!(ok, "{output}");
    // Outside quotes, only a number, boolean or date-time.
    let (ok, output) = run(
        "[dispatcher]\nshutdown_grace = \"1s\"\n[workers]\nmax_cold_starts = ${SWITCHYARD_TEST_VALUE}\n",
        "1\n[admin]",
    );
    assert!(!ok);
    assert!(
        output.contains(
            "DIR/broken.toml:4:19: `${SWITCHYARD_TEST_VALUE}` outside quotes must be a number"
        ),
        "{output}"
    );
    let (ok, output) = run(
        "[workers]\nmax_cold_starts = ${SWITCHYARD_TEST_VALUE}\n",
        "8",
    );
    assert!(ok, "{output}");
    // A literal string cannot hold a quote.
    let (ok, output) = run(
        "[[sources]]\ntype = \"http\"\nname = 'x${SWITCHYARD_TEST_VALUE}'\n",
        "a'b",
    );
    assert!(!ok);
    assert!(
        output.contains("DIR/broken.toml:3:10: the value of `SWITCHYARD_TEST_VALUE` holds a `'`"),
        "{output}"
    );
}

#[test]
fn nats_credential_mistakes_are_located() {
    let text = r#"
[nats]
url = "nats://127.0.0.1:4222"
user = "switchyard"
token = "t"
nkey_seed = "not-a-seed"
creds_file = "missing.creds"
tls = { cert_file = "client.pem" }
"#;
    let (ok, output) = validate(text);
    assert!(!ok);
    for expected in [
        "DIR/broken.toml:4:1: field `nats.user`: choose one way to authenticate",
        "DIR/broken.toml:4:1: field `nats.user`: needs `password` (or `password_file`)",
        "DIR/broken.toml:6:1: field `nats.nkey_seed`: is not a user seed",
        "DIR/broken.toml:7:1: field `nats.creds_file`: `DIR/missing.creds`",
        "DIR/broken.toml:8:1: field `nats.tls`: `cert_file` and `key_file` go together",
    ] {
        assert!(
            output.contains(expected),
            "missing `{expected}` in:\n{output}"
        );
    }
    let (ok, output) = validate("[nats]\nurl = \"nats://a:b@127.0.0.1:4222\"\ntoken = \"t\"\n");
    assert!(
        !ok && output.contains("field `nats.url`: holds credentials"),
        "{output}"
    );
}

/// A hook whose signature carries a timestamp remembers delivery ids at least as
/// long as it accepts a timestamp, or a captured request could be replayed between.
#[test]
fn a_dedup_horizon_shorter_than_the_signature_tolerance_is_refused() {
    let text = r#"
[[sources]]
type = "http"
name = "web"

[[sources.hooks]]
name = "stamped"
event_type = "com.example.stamped"
id_header = "Idempotency-Key"
dedup_horizon = "5m"
signature = { scheme = "hmac", secret = "k", header = "X-Signature", timestamp_header = "X-Timestamp", tolerance = "10m" }
"#;
    let (ok, output) = validate(text);
    assert!(!ok);
    assert!(
        output.contains("DIR/broken.toml:10:1: field `dedup_horizon`: hook `stamped` forgets deliveries after 5m but accepts signed timestamps 10m either side of now"),
        "{output}"
    );
    let (ok, output) = validate(&text.replace("\"5m\"", "\"20m\""));
    assert!(ok, "{output}");
}

#[test]
fn function_tls_and_auth_mistakes_are_located() {
    let text = r#"
[[functions]]
type = "http"
name = "plain"
url = "http://functions.example.com/"
tls = { ca_file = "ca.pem" }
auth = { scheme = "bearer", token = "t" }

[[functions]]
type = "http"
name = "signed"
url = "https://functions.example.com/"
tls = { ca_file = "missing-ca.pem" }
auth = { scheme = "hmac", secret = "not-the-form" }
"#;
    let (ok, output) = validate(text);
    assert!(!ok);
    for expected in [
        "DIR/broken.toml:6:1: field `tls`: is for https:// functions",
        "DIR/broken.toml:7:1: field `auth`: a token sent over plain http:// to another host can be read",
        "DIR/broken.toml:13:1: field `tls`: ca_file `DIR/missing-ca.pem`",
        "DIR/broken.toml:14:1: field `auth`: `secret` must be `whsec_` and base64",
    ] {
        assert!(
            output.contains(expected),
            "missing `{expected}` in:\n{output}"
        );
    }
}

/// `<secret>_file` is a field only where the field is: in a function's environment an
/// entry named `token_file` is the user's own variable.
#[test]
fn an_environment_entry_named_like_a_secret_file_is_left_alone() {
    let directory = tempfile::tempdir().unwrap();
    std::fs::create_dir(directory.path().join("fn")).unwrap();
    let text = r#"
[[functions]]
type = "process"
name = "web"
command = ["python3", "server.py"]
directory = "fn"
environment = { token_file = "/run/secrets/not-read-by-switchyard" }
"#;
    let path = directory.path().join("switchyard.toml");
    std::fs::write(&path, text).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["validate", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A schedule's mistakes name their line and field: an expression that is no
/// schedule, `?` in neither day field, an unknown time zone, an end before its
/// start, a flexible window over 24 hours.
#[test]
fn schedule_mistakes_are_located_at_their_field() {
    let text = r#"
[[sources]]
type = "schedule"
name = "typo"
expression = "rate(5 minits)"

[[sources]]
type = "schedule"
name = "no-question-mark"
expression = "cron(0 12 * * * *)"

[[sources]]
type = "schedule"
name = "elsewhere"
expression = "cron(0 12 * * ? *)"
timezone = "Mars/Olympus"

[[sources]]
type = "schedule"
name = "backwards"
expression = "rate(1 hour)"
start = "2027-06-01T00:00:00Z"
end = "2027-01-01T00:00:00Z"
flexible_window = "2d"
"#;
    let (ok, output) = validate(text);
    assert!(!ok);
    for expected in [
        "DIR/broken.toml:5:1: field `expression`: rate(`5 minits`)",
        "DIR/broken.toml:10:1: field `expression`: cron(`0 12 * * * *`)",
        "DIR/broken.toml:16:1: field `timezone`: time zone `Mars/Olympus` is not an IANA time zone",
        "DIR/broken.toml:23:1: field `end`:",
        "DIR/broken.toml:24:1: field `flexible_window`: must be at most 24h",
    ] {
        assert!(
            output.contains(expected),
            "missing `{expected}` in:\n{output}"
        );
    }
}

/// An MQTT source's mistakes name their line and field: TLS settings on a plain
/// `mqtt://` URL, a certificate file that is not there, a key without its
/// certificate, a topic filter with `#` before its end, a session expiry on MQTT
/// 3.1.1.
#[test]
fn mqtt_mistakes_are_located_at_their_field() {
    let text = r#"
[[sources]]
type = "mqtt"
name = "plain"
url = "mqtt://127.0.0.1:1883"
topics = ["a/#"]
tls = { ca_file = "/nonexistent/ca.pem" }

[[sources]]
type = "mqtt"
name = "half"
url = "mqtts://broker.example:8883"
topics = ["a/#/b"]
tls = { key_file = "/nonexistent/key.pem" }

[[sources]]
type = "mqtt"
name = "old"
url = "mqtt://127.0.0.1:1883"
topics = ["a"]
session_expiry = "1d"
"#;
    let (ok, output) = validate(text);
    assert!(!ok);
    for expected in [
        "DIR/broken.toml:7:1: field `tls`: TLS settings need an mqtts:// url",
        "DIR/broken.toml:7:1: field `tls`: `/nonexistent/ca.pem`: No such file",
        "DIR/broken.toml:13:1: field `topics`: `a/#/b` is not an MQTT topic filter",
        "DIR/broken.toml:14:1: field `tls`: `cert_file` and `key_file` go together",
        "DIR/broken.toml:21:1: field `session_expiry`: is MQTT 5's",
    ] {
        assert!(
            output.contains(expected),
            "missing `{expected}` in:\n{output}"
        );
    }
}

#[test]
fn telemetry_mistakes_name_file_line_and_field_and_never_quote_a_header_value() {
    let (ok, output) = validate(
        "[telemetry]\notlp_endpoint = \"http://user:pass@collector:4318/?key=k3y\"\nsampling_ratio = 1.5\nheaders = { \"x-api-key\" = \"s3cret\\n\" }\ntrace_url = \"http://jaeger:16686/trace/\"\n",
    );
    assert!(!ok);
    for expected in [
        "DIR/broken.toml:2:1: field `telemetry.otlp_endpoint`: must not carry credentials, a query or a fragment",
        "DIR/broken.toml:3:1: field `telemetry.sampling_ratio`: must be between 0.0 and 1.0, not 1.5",
        "DIR/broken.toml:4:1: field `telemetry.headers`: the value of `x-api-key` is not a valid header value",
        "DIR/broken.toml:5:1: field `telemetry.trace_url`: must hold `{trace_id}` where the trace's id goes",
    ] {
        assert!(output.contains(expected), "{expected}\n{output}");
    }
    for secret in ["s3cret", "pass", "k3y"] {
        assert!(!output.contains(secret), "{secret} quoted: {output}");
    }
}
