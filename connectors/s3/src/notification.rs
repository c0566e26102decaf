//! S3 event notifications (AWS's format, which MinIO also sends, with its own
//! `EventName`/`Key` fields around the same `Records`) as CloudEvents, one per record,
//! after the CloudEvents AWS S3 adapter:
//!
//! | attribute | value |
//! |---|---|
//! | `type` | `com.amazonaws.s3.` + `eventName` (MinIO's `s3:` prefix removed) |
//! | `source` | `{eventSource}.{awsRegion}.{bucket}` |
//! | `subject` | the object key, URL-decoded (`red+flower.jpg` -> `red flower.jpg`) |
//! | `time` | `eventTime` |
//! | data | the record's `s3` member, `application/json`, with the key decoded |
//!
//! The `id` is not the adapter's (request ids differ between a notification and a
//! poll of the same object): it is derived from the object, `<bucket>/<key>@<version>`,
//! where `<version>` is the version id when the bucket is versioned, else the ETag,
//! else (a deletion in an unversioned bucket) the notification's sequencer. So the
//! same upload noticed twice, by a notification and by a poll, is one event.
//! Extensions carry what triggers filter on: `s3bucket`, `s3key`, `s3size`, `s3etag`,
//! `s3versionid`, `s3sequencer`.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;
use switchyard_event::{Event, EventError};

/// Why a notification body was refused; nothing of it was accepted.
#[derive(Debug, thiserror::Error)]
pub enum NotificationError {
    #[error("not an S3 event notification: {0}")]
    Json(#[from] serde_json::Error),
    #[error("record {index}: {reason}")]
    Record { index: usize, reason: String },
    #[error("record {index}: {source}")]
    Event {
        index: usize,
        #[source]
        source: EventError,
    },
}

#[derive(Deserialize)]
struct Notification {
    #[serde(rename = "Records")]
    records: Vec<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Record {
    event_source: Option<String>,
    aws_region: Option<String>,
    event_time: Option<String>,
    event_name: String,
    s3: S3,
}

#[derive(Deserialize)]
struct S3 {
    bucket: Bucket,
    object: Object,
}

#[derive(Deserialize)]
struct Bucket {
    name: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Object {
    key: String,
    size: Option<u64>,
    e_tag: Option<String>,
    version_id: Option<String>,
    sequencer: Option<String>,
}

/// An S3 object key as notifications write it (URL-encoded, spaces as `+`), decoded.
pub fn decode_key(raw: &str) -> String {
    let spaced = raw.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8_lossy()
        .into_owned()
}

/// The id of an object event: see the module documentation.
pub fn object_event_id(bucket: &str, key: &str, version: &str) -> String {
    format!("{bucket}/{key}@{version}")
}

/// The events of a notification body. Every record is checked before any event is
/// returned: a body is accepted whole or not at all.
pub fn object_events(body: &[u8]) -> Result<Vec<Event>, NotificationError> {
    let notification: Notification = serde_json::from_slice(body)?;
    notification
        .records
        .into_iter()
        .enumerate()
        .map(|(index, raw)| record_event(index, raw))
        .collect()
}

fn record_event(index: usize, mut raw: Value) -> Result<Event, NotificationError> {
    let record: Record =
        serde_json::from_value(raw.clone()).map_err(|error| NotificationError::Record {
            index,
            reason: error.to_string(),
        })?;
    let object = &record.s3.object;
    let bucket = &record.s3.bucket.name;
    let key = decode_key(&object.key);
    let etag = object.e_tag.as_deref().map(|etag| etag.trim_matches('"'));
    let version = object
        .version_id
        .as_deref()
        .filter(|version| !version.is_empty() && *version != "null")
        .or(etag.filter(|etag| !etag.is_empty()))
        .or(object.sequencer.as_deref())
        .ok_or_else(|| NotificationError::Record {
            index,
            reason: "the object has no version id, ETag or sequencer to identify it".to_owned(),
        })?;
    let name = record
        .event_name
        .strip_prefix("s3:")
        .unwrap_or(&record.event_name);
    let mut event = Event::new(
        object_event_id(bucket, &key, version),
        format!(
            "{}.{}.{}",
            record.event_source.as_deref().unwrap_or("aws:s3"),
            record.aws_region.as_deref().unwrap_or_default(),
            bucket
        ),
        format!("com.amazonaws.s3.{name}"),
    );
    event.subject = Some(key.clone());
    event.time = record.event_time.clone();
    event.datacontenttype = Some("application/json".to_owned());
    let extensions = [
        ("s3bucket", Some(bucket.clone())),
        ("s3key", Some(key.clone())),
        ("s3size", object.size.map(|size| size.to_string())),
        ("s3etag", etag.map(str::to_owned)),
        ("s3versionid", object.version_id.clone()),
        ("s3sequencer", object.sequencer.clone()),
    ];
    for (name, value) in extensions {
        if let Some(value) = value.filter(|value| !value.is_empty()) {
            event.extensions.insert(name.to_owned(), value);
        }
    }
    if let Some(object) = raw.pointer_mut("/s3/object/key") {
        *object = Value::String(key);
    }
    let data = raw.get("s3").cloned().unwrap_or(Value::Null);
    event.data = Bytes::from(serde_json::to_vec(&data).expect("a JSON value serializes"));
    event
        .validate()
        .map_err(|source| NotificationError::Event { index, source })?;
    Ok(event)
}

#[cfg(test)]
mod tests {
    use super::*;

    // AWS's documented example, with a key that needs decoding.
    const AWS: &str = r#"{"Records":[{"eventVersion":"2.1","eventSource":"aws:s3","awsRegion":"us-west-2",
      "eventTime":"1970-01-01T00:00:00.000Z","eventName":"ObjectCreated:Put",
      "userIdentity":{"principalId":"AIDAJDPLRKLG7UEXAMPLE"},
      "responseElements":{"x-amz-request-id":"C3D13FE58DE4C810","x-amz-id-2":"FMyUVURIY8/IgAtTv8xRjskZQpcIZ9KG4V5Wp6S7S/JRWeUWerMUE5JgHvANOjpD"},
      "s3":{"s3SchemaVersion":"1.0","configurationId":"testRule",
        "bucket":{"name":"mybucket","ownerIdentity":{"principalId":"A3NL1KOZZKExample"},"arn":"arn:aws:s3:::mybucket"},
        "object":{"key":"photos/red+flower%C3%A9+%282%29.jpg","size":1024,"eTag":"d41d8cd98f00b204e9800998ecf8427e","versionId":"096fKKXTRTtl3on89fVO.nfljtsv6qko","sequencer":"0055AED6DCD90281E5"}}}]}"#;

    // What MinIO's webhook target POSTs for a multipart upload in an unversioned bucket.
    const MINIO: &str = r#"{"EventName":"s3:ObjectCreated:CompleteMultipartUpload","Key":"images/big file.bin",
      "Records":[{"eventVersion":"2.0","eventSource":"minio:s3","awsRegion":"","eventTime":"2026-11-27T10:00:00.000Z",
      "eventName":"s3:ObjectCreated:CompleteMultipartUpload","userIdentity":{"principalId":"minioadmin"},
      "s3":{"s3SchemaVersion":"1.0","configurationId":"Config","bucket":{"name":"images","arn":"arn:aws:s3:::images"},
        "object":{"key":"big+file.bin","size":10485760,"eTag":"\"5d2b0a6f61b9a8e1c1e2-2\"","contentType":"application/octet-stream","sequencer":"17C0F3A4B1E2D3F4"}}}]}"#;

    #[test]
    fn an_aws_record_follows_the_adapter_with_an_object_id() {
        let events = object_events(AWS.as_bytes()).unwrap();
        assert_eq!(events.len(), 1);
        let event = &events[0];
        assert_eq!(event.ty, "com.amazonaws.s3.ObjectCreated:Put");
        assert_eq!(event.source, "aws:s3.us-west-2.mybucket");
        assert_eq!(event.subject.as_deref(), Some("photos/red floweré (2).jpg"));
        assert_eq!(
            event.id,
            "mybucket/photos/red floweré (2).jpg@096fKKXTRTtl3on89fVO.nfljtsv6qko"
        );
        assert_eq!(event.time.as_deref(), Some("1970-01-01T00:00:00.000Z"));
        assert_eq!(event.attribute("s3size"), Some("1024"));
        assert_eq!(
            event.attribute("s3etag"),
            Some("d41d8cd98f00b204e9800998ecf8427e")
        );
        assert_eq!(event.attribute("s3sequencer"), Some("0055AED6DCD90281E5"));
        let data: Value = serde_json::from_slice(&event.data).unwrap();
        assert_eq!(data["object"]["key"], "photos/red floweré (2).jpg");
        assert_eq!(data["bucket"]["name"], "mybucket");
    }

    #[test]
    fn a_minio_record_without_a_version_is_identified_by_its_etag() {
        let event = &object_events(MINIO.as_bytes()).unwrap()[0];
        assert_eq!(
            event.ty,
            "com.amazonaws.s3.ObjectCreated:CompleteMultipartUpload"
        );
        assert_eq!(event.source, "minio:s3..images");
        assert_eq!(event.id, "images/big file.bin@5d2b0a6f61b9a8e1c1e2-2");
        assert_eq!(event.attribute("s3key"), Some("big file.bin"));
        assert_eq!(event.attribute("s3versionid"), None);
    }

    #[test]
    fn a_bad_body_says_what_is_wrong_and_yields_nothing() {
        let error = object_events(b"{\"Records\": [{\"eventName\": \"x\"}]}").unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("record 0: missing field `s3`"),
            "{error}"
        );
        let error = object_events(b"not json").unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("not an S3 event notification"),
            "{error}"
        );
        let mut two: Value = serde_json::from_str(AWS).unwrap();
        let good = two["Records"][0].clone();
        two["Records"] = Value::Array(vec![good, serde_json::json!({"eventName": "y"})]);
        assert!(object_events(two.to_string().as_bytes()).is_err());
    }

    #[test]
    fn keys_decode_like_s3_writes_them() {
        assert_eq!(decode_key("red+flower.jpg"), "red flower.jpg");
        assert_eq!(decode_key("a%2Bb.txt"), "a+b.txt");
        assert_eq!(decode_key("%E6%97%A5%E6%9C%AC.png"), "日本.png");
    }
}
