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
//! poll of the same object): it is derived from the object, see [`crate::object`].
//! Extensions carry what triggers filter on: `s3bucket`, `s3key`, `s3size`, `s3etag`,
//! `s3versionid`, `s3sequencer`.
//!
//! The test message a store sends when notifications are configured
//! (`{"Event": "s3:TestEvent", ...}`) is recognised and yields no event.

use serde::Deserialize;
use serde_json::Value;
use switchyard_event::Event;

use crate::object::{ObjectNotice, bare_etag};

/// Why a notification body was refused; nothing of it was accepted.
#[derive(Debug, thiserror::Error)]
pub enum NotificationError {
    #[error("not an S3 event notification: {0}")]
    Json(#[from] serde_json::Error),
    #[error("record {index}: {reason}")]
    Record { index: usize, reason: String },
}

#[derive(Deserialize)]
struct Notification {
    #[serde(rename = "Records")]
    records: Option<Vec<Value>>,
    #[serde(rename = "Event")]
    event: Option<String>,
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

/// How a store writes object keys in its notifications.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyEncoding {
    /// URL-encoded, spaces as `+` (AWS, MinIO).
    #[default]
    Url,
    /// As they are (versitygw).
    None,
}

/// An S3 object key as notifications write it (URL-encoded, spaces as `+`), decoded.
pub fn decode_key(raw: &str) -> String {
    let spaced = raw.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8_lossy()
        .into_owned()
}

/// The events of a notification body. Every record is checked before any event is
/// returned: a body is accepted whole or not at all. A store's test message yields
/// no event.
pub fn object_events(body: &[u8]) -> Result<Vec<Event>, NotificationError> {
    object_events_with(body, KeyEncoding::Url)
}

/// [`object_events`] for a store that writes keys as they are (`KeyEncoding::None`).
pub fn object_events_with(body: &[u8], keys: KeyEncoding) -> Result<Vec<Event>, NotificationError> {
    let notification: Notification = serde_json::from_slice(body)?;
    let Some(records) = notification.records else {
        if notification.event.as_deref() == Some("s3:TestEvent") {
            return Ok(Vec::new());
        }
        return Err(NotificationError::Record {
            index: 0,
            reason: "the body has no `Records` array".to_owned(),
        });
    };
    records
        .into_iter()
        .enumerate()
        .map(|(index, raw)| record_event(index, raw, keys))
        .collect()
}

fn record_event(
    index: usize,
    mut raw: Value,
    keys: KeyEncoding,
) -> Result<Event, NotificationError> {
    // Read through a reference: the record is not copied to be parsed.
    let record = Record::deserialize(&raw).map_err(|error| NotificationError::Record {
        index,
        reason: error.to_string(),
    })?;
    let object = &record.s3.object;
    let key = match keys {
        KeyEncoding::Url => decode_key(&object.key),
        KeyEncoding::None => object.key.clone(),
    };
    let event_name = record
        .event_name
        .strip_prefix("s3:")
        .unwrap_or(&record.event_name);
    let notice = ObjectNotice {
        event_source: record.event_source.as_deref().unwrap_or("aws:s3"),
        region: record.aws_region.as_deref().unwrap_or_default(),
        bucket: &record.s3.bucket.name,
        key: &key,
        event_name,
        time: record.event_time.as_deref(),
        size: object.size,
        etag: object.e_tag.as_deref().map(bare_etag),
        version_id: object.version_id.as_deref(),
        sequencer: object.sequencer.as_deref(),
    };
    if let Some(object) = raw.pointer_mut("/s3/object/key") {
        *object = Value::String(key.clone());
    }
    // Some stores (versitygw) write the ETag with its HTTP quotes (`"\"<md5>\""`);
    // AWS writes it bare, and a poll stores it bare: the data is made the same,
    // so one upload reaches a function in one shape whichever path noticed it.
    if let Some(etag) = raw.pointer_mut("/s3/object/eTag")
        && let Some(text) = etag.as_str()
    {
        *etag = Value::String(bare_etag(text).to_owned());
    }
    let data = raw.get_mut("s3").map(Value::take).unwrap_or(Value::Null);
    notice
        .event(&data)
        .map_err(|reason| NotificationError::Record { index, reason })
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
            "mybucket/photos/red floweré (2).jpg@d41d8cd98f00b204e9800998ecf8427e"
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

    // What versitygw 1.8.0 sends for a PutObject (s3event/event.go): the ETag with
    // its HTTP quotes, a null version id, the keys unencoded.
    const VERSITYGW: &str = r#"{"Records":[{"eventVersion":"2.2","eventSource":"aws:s3","awsRegion":"us-east-1",
      "eventTime":"2026-11-27T10:00:00Z","eventName":"ObjectCreated:Put","userIdentity":{"PrincipalId":"user"},
      "requestParameters":{"sourceIPAddress":"127.0.0.1"},"responseElements":{"x-amz-request-id":"","x-amz-id-2":""},
      "s3":{"s3SchemaVersion":"1.0","configurationId":"","bucket":{"name":"bkt","ownerIdentity":{"PrincipalId":"user"},"arn":"arn:aws:s3:::bkt/a b.txt"},
        "object":{"key":"a b.txt","size":3,"eTag":"\"900150983cd24fb0d6963f7d28e17f72\"","versionId":null,"sequencer":"18B1A2C3D4E5F6A7"}},
      "glacierEventData":{"restoreEventData":{"lifecycleRestorationExpiryTime":"","lifecycleRestoreStorageClass":""}}}]}"#;

    #[test]
    fn a_quoted_etag_is_stored_bare_as_a_poll_stores_it() {
        let event = &object_events_with(VERSITYGW.as_bytes(), KeyEncoding::None).unwrap()[0];
        let etag = "900150983cd24fb0d6963f7d28e17f72";
        assert_eq!(event.id, format!("bkt/a b.txt@{etag}"));
        assert_eq!(event.attribute("s3etag"), Some(etag));
        let data: Value = serde_json::from_slice(&event.data).unwrap();
        assert_eq!(data["object"]["eTag"], etag, "{data}");
        // What a poll of the same object stores: the same id, ETag and data ETag.
        let polled = ObjectNotice {
            event_source: "aws:s3",
            region: "us-east-1",
            bucket: "bkt",
            key: "a b.txt",
            event_name: "ObjectCreated:Put",
            time: None,
            size: Some(3),
            etag: Some(etag),
            version_id: None,
            sequencer: None,
        };
        assert_eq!(polled.id().unwrap(), event.id);
        assert_eq!(
            polled.record_data()["object"]["eTag"],
            data["object"]["eTag"]
        );
        // A MinIO multipart ETag in quotes too.
        let minio = &object_events(MINIO.as_bytes()).unwrap()[0];
        let data: Value = serde_json::from_slice(&minio.data).unwrap();
        assert_eq!(data["object"]["eTag"], "5d2b0a6f61b9a8e1c1e2-2");
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
    fn a_test_message_yields_nothing_and_a_body_without_records_is_refused() {
        let test = br#"{"Service":"Amazon S3","Event":"s3:TestEvent","Time":"2026-11-27T10:00:00.000Z","Bucket":"b"}"#;
        assert!(object_events(test).unwrap().is_empty());
        let error = object_events(br#"{"hello": 1}"#).unwrap_err();
        assert!(error.to_string().contains("no `Records` array"), "{error}");
    }

    #[test]
    fn keys_decode_like_s3_writes_them() {
        assert_eq!(decode_key("red+flower.jpg"), "red flower.jpg");
        assert_eq!(decode_key("a%2Bb.txt"), "a+b.txt");
        assert_eq!(decode_key("%E6%97%A5%E6%9C%AC.png"), "日本.png");
    }
}
