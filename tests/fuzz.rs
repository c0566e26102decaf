//! Property-based tests (proptest) of every parser of outside input: CloudEvents
//! binary, structured and batch; webhook signatures and bearer tokens; S3/MinIO
//! notifications; SNS envelopes; Kafka record mapping; AWS payload shapes (Lambda
//! batch answers, function URL answers, error types, the rendered events); SigV4
//! headers; the configuration file with `${VAR}` substitution.
//!
//! Properties: no input makes a parser panic; what a parser returns is bounded by
//! its input; a valid input round-trips; an invalid one is refused with a message.
//! Inputs are bounded in size, so every case ends.
//!
//! CI runs proptest's default 256 cases per property; for longer:
//! `PROPTEST_CASES=100000 cargo test --release -p switchyard --test fuzz`
//! (docs/TESTING.md). A failure prints the smallest input found and proptest keeps
//! it in `tests/fuzz.proptest-regressions`, replayed first on later runs.

use std::collections::BTreeMap;
use std::path::Path;

use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use switchyard_event::{Event, parse_batch, parse_structured, to_structured_json};

/// Proptest's defaults (`PROPTEST_CASES` cases, 256 unless set), with failures kept
/// in tests/fuzz.proptest-regressions.
fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fuzz.proptest-regressions"
        )))),
        ..ProptestConfig::default()
    }
}

/// Any bytes, up to 2 KiB, and often JSON-looking ones.
fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..2048),
        "[\\[\\]{}\":,0-9a-zA-Z_ .\\\\-]{0,256}".prop_map(String::into_bytes),
        json_value().prop_map(|value| serde_json::to_vec(&value).unwrap()),
    ]
}

/// Nested JSON values with strings, integers and booleans.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        "\\PC{0,24}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
            proptest::collection::btree_map("[a-zA-Z_]{1,12}", inner, 0..6)
                .prop_map(|map| serde_json::Value::Object(map.into_iter().collect())),
        ]
    })
}

/// A valid event: printable Unicode attributes, extensions with valid names, and
/// data matching its content type.
fn event() -> impl Strategy<Value = Event> {
    (
        "\\PC{1,40}",
        "\\PC{1,40}",
        "\\PC{1,40}",
        proptest::option::of("\\PC{1,40}"),
        proptest::option::of(Just("2026-12-02T10:11:12.345Z".to_owned())),
        proptest::collection::btree_map("[a-z][a-z0-9]{0,15}", "\\PC{0,40}", 0..4),
        prop_oneof![
            json_value().prop_map(|value| (
                Some("application/json".to_owned()),
                serde_json::to_vec(&value).unwrap()
            )),
            proptest::collection::vec(any::<u8>(), 0..512)
                .prop_map(|data| (Some("application/octet-stream".to_owned()), data)),
            "\\PC{0,64}".prop_map(|text| (Some("text/plain".to_owned()), text.into_bytes())),
        ],
    )
        .prop_map(
            |(id, source, ty, subject, time, extensions, (content_type, data))| {
                let mut event = Event::new(id, source, ty);
                event.subject = subject;
                event.time = time;
                event.datacontenttype = content_type;
                event.extensions = extensions
                    .into_iter()
                    .filter(|(name, _)| {
                        !switchyard_event::CORE_ATTRIBUTES.contains(&name.as_str())
                            && name != "data"
                            && name != "data_base64"
                    })
                    .collect::<BTreeMap<_, _>>();
                event.data = Bytes::from(data);
                event
            },
        )
        .prop_filter("valid", |event| event.validate().is_ok())
}

/// Bytes an event holds, roughly.
fn size(event: &Event) -> usize {
    event.id.len()
        + event.source.len()
        + event.ty.len()
        + event.subject.as_ref().map_or(0, String::len)
        + event.time.as_ref().map_or(0, String::len)
        + event.datacontenttype.as_ref().map_or(0, String::len)
        + event.dataschema.as_ref().map_or(0, String::len)
        + event
            .extensions
            .iter()
            .map(|(name, value)| name.len() + value.len())
            .sum::<usize>()
        + event.data.len()
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn binary_mode_round_trips(event in event()) {
        let headers: Vec<(String, String)> = event
            .binary_headers()
            .into_iter()
            .map(|(name, value)| (name.into_owned(), value.into_owned()))
            .collect();
        let parsed = Event::from_binary(
            headers.iter().map(|(name, value)| (name.as_str(), value.as_str())),
            event.data.clone(),
        );
        prop_assert_eq!(parsed, Ok(event));
    }

    #[test]
    fn structured_mode_and_batches_round_trip(events in proptest::collection::vec(event(), 1..4)) {
        let one = to_structured_json(&events[0]);
        prop_assert_eq!(parse_structured(&Bytes::from(one)).unwrap(), events[0].clone());
        let mut batch = b"[".to_vec();
        for (index, event) in events.iter().enumerate() {
            if index > 0 {
                batch.push(b',');
            }
            batch.extend(to_structured_json(event));
        }
        batch.push(b']');
        prop_assert_eq!(parse_batch(&Bytes::from(batch)).unwrap(), events);
    }

    #[test]
    fn any_body_is_parsed_or_refused_with_a_message(body in body()) {
        let bytes = Bytes::from(body.clone());
        match parse_structured(&bytes) {
            Ok(event) => prop_assert!(size(&event) <= 2 * body.len() + 64),
            Err(error) => prop_assert!(!error.to_string().is_empty()),
        }
        match parse_batch(&bytes) {
            Ok(events) => {
                prop_assert!(events.iter().map(size).sum::<usize>() <= 2 * body.len() + 64);
            }
            Err(error) => prop_assert!(!error.to_string().is_empty()),
        }
    }

    #[test]
    fn any_binary_headers_are_parsed_or_refused_with_a_message(
        headers in proptest::collection::vec(
            (prop_oneof!["ce-[a-z]{0,12}", "\\PC{0,12}", Just("ce-specversion".to_owned())], "\\PC{0,40}"),
            0..12,
        ),
        data in body(),
    ) {
        match Event::from_binary(
            headers.iter().map(|(name, value)| (name.as_str(), value.as_str())),
            Bytes::from(data),
        ) {
            Ok(event) => prop_assert!(event.validate().is_ok()),
            Err(error) => prop_assert!(!error.to_string().is_empty()),
        }
    }

    #[test]
    fn signatures_verify_their_body_and_nothing_else(
        secret in "\\PC{1,32}",
        body in body(),
        flip in any::<prop::sample::Index>(),
        header in "\\PC{0,80}",
    ) {
        use hmac::Mac as _;
        use switchyard_connector_http::SignatureConfig;
        use switchyard_connector_http::signature::{check_bearer, check_signature};
        let config = SignatureConfig::Github { secret: secret.clone().into() };
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(&body);
        let signed = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        let mut headers = axum::http::HeaderMap::new();
        headers.insert("x-hub-signature-256", signed.parse().unwrap());
        prop_assert!(check_signature(&config, &headers, &body, 0).is_ok());
        if !body.is_empty() {
            let mut changed = body.clone();
            let at = flip.index(changed.len());
            changed[at] ^= 0x01;
            prop_assert!(check_signature(&config, &headers, &changed, 0).is_err());
        }
        // Any header value: refused with a message, never a panic.
        if let Ok(value) = header.parse() {
            let mut headers = axum::http::HeaderMap::new();
            headers.insert("x-hub-signature-256", value);
            if let Err(error) = check_signature(&config, &headers, &body, 0) {
                prop_assert!(!error.to_string().is_empty());
            }
            let mut headers = axum::http::HeaderMap::new();
            headers.insert("authorization", header.parse().unwrap());
            let token = secrecy::SecretString::from(secret.clone());
            let expected = format!("Bearer {secret}");
            prop_assert_eq!(check_bearer(&headers, &[&token]).is_ok(), header.split_once(' ').is_some_and(|(scheme, rest)| scheme.eq_ignore_ascii_case("bearer") && rest.trim_start_matches(' ') == secret) || header == expected);
        }
    }

    #[test]
    fn s3_notifications_round_trip_their_keys(
        bucket in "[a-z0-9][a-z0-9.-]{2,20}",
        key in "\\PC{1,60}",
        size in any::<u32>(),
    ) {
        let encoded = switchyard_workers::aws::s3_encode_key(&key);
        let notification = serde_json::json!({"Records": [{
            "eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1",
            "eventTime": "2026-12-02T10:11:12.345Z", "eventName": "ObjectCreated:Put",
            "s3": {"bucket": {"name": bucket}, "object": {"key": encoded, "size": size, "eTag": "0123456789abcdef", "sequencer": "00A1"}}
        }]});
        let events = switchyard_connector_s3::object_events_with(
            &serde_json::to_vec(&notification).unwrap(),
            switchyard_connector_s3::KeyEncoding::Url,
        )
        .unwrap();
        prop_assert_eq!(events.len(), 1);
        prop_assert_eq!(events[0].extensions.get("s3key"), Some(&key));
        prop_assert_eq!(events[0].extensions.get("s3bucket"), Some(&bucket));
        // And rendered back for a Lambda handler, the key is encoded as AWS does.
        let rendered: serde_json::Value =
            serde_json::from_slice(&switchyard_workers::aws::render(&events[0])).unwrap();
        prop_assert_eq!(&rendered["Records"][0]["s3"]["object"]["key"], &serde_json::Value::from(encoded));
    }

    #[test]
    fn any_notification_or_sns_body_is_parsed_or_refused(body in body()) {
        for encoding in [switchyard_connector_s3::KeyEncoding::Url, switchyard_connector_s3::KeyEncoding::None] {
            match switchyard_connector_s3::object_events_with(&body, encoding) {
                Ok(events) => prop_assert!(events.iter().map(size).sum::<usize>() <= 4 * body.len() + 1024),
                Err(error) => prop_assert!(!error.to_string().is_empty()),
            }
        }
        let _ = switchyard_connector_s3::sns::looks_like_sns(&body);
        if let Ok(message) = serde_json::from_slice::<switchyard_connector_s3::sns::SnsMessage>(&body)
            && let Err(error) = switchyard_connector_s3::sns::string_to_sign(&message)
        {
            prop_assert!(!error.to_string().is_empty());
        }
    }

    #[test]
    fn lambda_answers_are_classified_or_refused(body in body(), events in proptest::collection::vec(event(), 1..4), status in 200u16..300) {
        match switchyard_targets::classify_batch_answer(&events, status, Ok(&body)) {
            switchyard_event::BatchOutcome::Partial { failed } => {
                for id in failed {
                    prop_assert!(events.iter().any(|event| event.id == id));
                }
            }
            switchyard_event::BatchOutcome::All(_) => {}
        }
        if let Err(error) = switchyard_workers::aws::http_api_response(&body) {
            prop_assert!(!error.is_empty());
        }
        let text = String::from_utf8_lossy(&body);
        let normalised = switchyard_workers::runtime_api::normalise_error_type(&text);
        prop_assert!(normalised.starts_with("Runtime.") || normalised.starts_with("Function."));
    }

    #[test]
    fn every_event_renders_as_json_for_lambda(event in event()) {
        let rendered = switchyard_workers::aws::render(&event);
        prop_assert!(serde_json::from_slice::<serde_json::Value>(&rendered).is_ok() || rendered == event.data);
        let batch = switchyard_workers::aws::render_batch(std::slice::from_ref(&event));
        prop_assert!(serde_json::from_slice::<serde_json::Value>(&batch).is_ok());
    }

    #[test]
    fn sigv4_headers_are_checked_or_refused(authorization in "\\PC{0,200}", date in "[0-9TZ]{0,20}") {
        let keys = switchyard::sigv4::Keys::new([("AKIDEXAMPLE".to_owned(), "secret".to_owned())]);
        let mut headers = axum::http::HeaderMap::new();
        if let Ok(value) = authorization.parse() {
            headers.insert("authorization", value);
        }
        if let Ok(value) = date.parse() {
            headers.insert("x-amz-date", value);
        }
        let verdict = keys.verify(
            &axum::http::Method::POST,
            &"/2015-03-31/functions/f/invocations".parse().unwrap(),
            &headers,
            b"{}",
            time::OffsetDateTime::now_utc(),
        );
        prop_assert!(verdict.is_err());
    }

    #[test]
    fn substituted_values_never_change_the_configuration(value in "\\PC{1,60}|[\\x00-\\x7f]{1,60}") {
        let lookup = |name: &str| (name == "V").then(|| value.clone());
        let text = "[[sources]]\ntype = \"http\"\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n\n[[sources.hooks]]\nname = \"h\"\nevent_type = \"x${V}\"\nsubject_header = \"${V:-fallback}\"\n";
        let config = switchyard::config::parse(Path::new("fuzz.toml"), text, &lookup).unwrap();
        let switchyard::config::SourceConfig::Http(http) = config.sources[0].get_ref() else {
            panic!("an http source");
        };
        let expected_subject = value.clone();
        prop_assert_eq!(http.hooks.len(), 1);
        prop_assert_eq!(http.hooks[0].event_type.clone(), Some(format!("x{value}")));
        prop_assert_eq!(http.hooks[0].subject_header.clone(), Some(expected_subject));
        prop_assert!(config.admin.bearer_token.is_none());
    }

    #[test]
    fn any_configuration_text_is_parsed_or_refused_with_a_location(text in "\\PC{0,300}|[\\[\\]=\"'#${}a-z_. \\n0-9]{0,300}") {
        let lookup = |name: &str| (name == "V").then(|| "v".to_owned());
        if let Err(errors) = switchyard::config::parse(Path::new("fuzz.toml"), &text, &lookup) {
            prop_assert!(!errors.0.is_empty());
            for error in errors.0 {
                prop_assert!(!error.message.is_empty());
                prop_assert!(error.line <= text.lines().count() + 1);
            }
        }
    }
}

#[cfg(feature = "kafka")]
mod kafka {
    use super::*;
    use switchyard_connector_kafka::record::{Coordinates, Record, to_events};

    fn source() -> switchyard_connector_kafka::KafkaSourceConfig {
        toml::from_str(
            "name = \"k\"\nbrokers = \"127.0.0.1:9092\"\ntopics = [\"t\"]\nevent_type = \"com.example.record\"\n",
        )
        .unwrap()
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn a_binary_mode_record_round_trips(event in event()) {
            // The CloudEvents Kafka binding: `ce_` headers holding the attributes as
            // UTF-8 (no percent-encoding, unlike HTTP's), `content-type`.
            let mut headers: Vec<(String, Vec<u8>)> = vec![
                ("ce_specversion".to_owned(), b"1.0".to_vec()),
                ("ce_id".to_owned(), event.id.clone().into_bytes()),
                ("ce_source".to_owned(), event.source.clone().into_bytes()),
                ("ce_type".to_owned(), event.ty.clone().into_bytes()),
            ];
            for (name, value) in [("subject", &event.subject), ("time", &event.time)] {
                if let Some(value) = value {
                    headers.push((format!("ce_{name}"), value.clone().into_bytes()));
                }
            }
            if let Some(content_type) = &event.datacontenttype {
                headers.push(("content-type".to_owned(), content_type.clone().into_bytes()));
            }
            for (name, value) in &event.extensions {
                headers.push((format!("ce_{name}"), value.clone().into_bytes()));
            }
            let record = Record {
                at: Coordinates { topic: "t", partition: 0, offset: 7 },
                key: None,
                headers: headers.iter().map(|(name, value)| (name.as_str(), Some(&value[..]))).collect(),
                timestamp: None,
                timestamp_type: None,
                payload: Some(&event.data),
            };
            let events = to_events(&source(), &record).unwrap();
            prop_assert_eq!(events.len(), 1);
            let mut parsed = events[0].clone();
            parsed.extensions.remove("kafkarecord");
            prop_assert_eq!(parsed, event);
        }

        #[test]
        fn any_record_is_mapped_or_refused_with_a_message(
            headers in proptest::collection::vec(("\\PC{0,16}|ce_[a-z]{0,10}", proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40))), 0..8),
            key in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
            payload in proptest::option::of(body()),
        ) {
            let record = Record {
                at: Coordinates { topic: "t", partition: 3, offset: 42 },
                key: key.as_deref(),
                headers: headers.iter().map(|(name, value)| (name.as_str(), value.as_deref())).collect(),
                timestamp: Some(1_700_000_000_000),
                timestamp_type: Some("CreateTime"),
                payload: payload.as_deref(),
            };
            match to_events(&source(), &record) {
                Ok(events) => {
                    for event in events {
                        prop_assert!(event.validate().is_ok());
                    }
                }
                Err(error) => prop_assert!(!error.to_string().is_empty()),
            }
        }
    }
}
