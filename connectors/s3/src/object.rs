//! One object, one event: how an object event is built, whichever path noticed the
//! object (a notification record or a poll), so the same upload yields the same
//! `source` and `id` and the bus's duplicate window keeps only the first.
//!
//! - `source` is the AWS S3 adapter's `{eventSource}.{awsRegion}.{bucket}`.
//! - `id` of new content (`ObjectCreated:Put`, `:Post`, `:Copy`,
//!   `:CompleteMultipartUpload`) is `<bucket>/<key>@<ETag>` (the ETag without quotes;
//!   the version id when there is no ETag; `t<time>:<size>` when there is neither). A
//!   listing and a notification both know the ETag, and a new upload of different
//!   bytes has a new one.
//! - `id` of anything else (removals, restores, tagging, ...) is
//!   `<bucket>/<key>#<eventName>@<version id, sequencer or ETag>/<time>`: only the path
//!   that noticed it deduplicates it (a notification of a deletion carries no ETag).

use bytes::Bytes;
use serde_json::{Value, json};
use switchyard_event::{Event, EventError};

/// What both paths know about an object when they notice it.
#[derive(Debug, Clone)]
pub struct ObjectNotice<'a> {
    /// The adapter's `eventSource`: `aws:s3` for AWS (and most S3-compatible stores),
    /// `minio:s3` for MinIO.
    pub event_source: &'a str,
    /// The adapter's `awsRegion` (MinIO sends an empty one unless a region is set).
    pub region: &'a str,
    pub bucket: &'a str,
    /// The key, decoded.
    pub key: &'a str,
    /// `ObjectCreated:Put`, `ObjectRemoved:Delete`, ... (no `s3:` prefix).
    pub event_name: &'a str,
    pub time: Option<&'a str>,
    pub size: Option<u64>,
    /// The ETag without quotes.
    pub etag: Option<&'a str>,
    pub version_id: Option<&'a str>,
    pub sequencer: Option<&'a str>,
}

/// Whether an event name is new content under a key (an upload, a copy, a completed
/// multipart upload), identified by its ETag. Other `ObjectCreated:*` events
/// (`PutTagging`, `PutRetention`, `PutLegalHold`, ...) keep the upload's ETag and are
/// identified like removals, so they are not taken for the upload.
fn is_upload(event_name: &str) -> bool {
    matches!(
        event_name,
        "ObjectCreated:Put"
            | "ObjectCreated:Post"
            | "ObjectCreated:Copy"
            | "ObjectCreated:CompleteMultipartUpload"
    )
}

/// The CloudEvents `source` of a bucket's object events.
pub fn object_source(event_source: &str, region: &str, bucket: &str) -> String {
    format!("{event_source}.{region}.{bucket}")
}

/// An ETag as stores print it (`"abc"`, sometimes `W/"abc"`), without the quotes.
pub fn bare_etag(etag: &str) -> &str {
    etag.trim().trim_start_matches("W/").trim_matches('"')
}

fn present(value: Option<&str>) -> Option<&str> {
    value.filter(|value| !value.is_empty() && *value != "null")
}

impl ObjectNotice<'_> {
    /// The event id: see the module documentation.
    pub fn id(&self) -> Result<String, String> {
        let (bucket, key) = (self.bucket, self.key);
        if is_upload(self.event_name) {
            if let Some(version) = present(self.etag).or(present(self.version_id)) {
                return Ok(format!("{bucket}/{key}@{version}"));
            }
            // No ETag (some stores omit it for objects written behind their back):
            // the modification time and size identify this content well enough.
            if let (Some(time), Some(size)) = (self.time, self.size) {
                return Ok(format!("{bucket}/{key}@t{time}:{size}"));
            }
            return Err(
                "a created object without an ETag, a version id or a time cannot be identified"
                    .to_owned(),
            );
        }
        let version = present(self.version_id)
            .or(present(self.sequencer))
            .or(present(self.etag))
            .unwrap_or("-");
        let time = self.time.unwrap_or("-");
        Ok(format!(
            "{bucket}/{key}#{}@{version}/{time}",
            self.event_name
        ))
    }

    /// The event, with `data` as given (the record's `s3` member, key decoded).
    pub fn event(&self, data: &Value) -> Result<Event, String> {
        let mut event = Event::new(
            self.id()?,
            object_source(self.event_source, self.region, self.bucket),
            format!("com.amazonaws.s3.{}", self.event_name),
        );
        event.subject = Some(self.key.to_owned());
        event.time = self.time.map(str::to_owned);
        event.datacontenttype = Some("application/json".to_owned());
        let extensions = [
            ("s3bucket", Some(self.bucket.to_owned())),
            ("s3key", Some(self.key.to_owned())),
            ("s3size", self.size.map(|size| size.to_string())),
            ("s3etag", present(self.etag).map(str::to_owned)),
            ("s3versionid", present(self.version_id).map(str::to_owned)),
            ("s3sequencer", present(self.sequencer).map(str::to_owned)),
        ];
        for (name, value) in extensions {
            if let Some(value) = value.filter(|value| !value.is_empty()) {
                event.extensions.insert(name.to_owned(), value);
            }
        }
        event.data = Bytes::from(serde_json::to_vec(data).expect("a JSON value serializes"));
        event
            .validate()
            .map_err(|error: EventError| error.to_string())?;
        Ok(event)
    }

    /// The `s3` member of a notification record for an object a poll noticed, so a
    /// function reads the same shape either way.
    pub fn record_data(&self) -> Value {
        let mut object = json!({ "key": self.key });
        if let Some(size) = self.size {
            object["size"] = json!(size);
        }
        if let Some(etag) = present(self.etag) {
            object["eTag"] = json!(etag);
        }
        if let Some(version) = present(self.version_id) {
            object["versionId"] = json!(version);
        }
        json!({
            "s3SchemaVersion": "1.0",
            "configurationId": "switchyard-poll",
            "bucket": { "name": self.bucket, "arn": format!("arn:aws:s3:::{}", self.bucket) },
            "object": object,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notice<'a>(event_name: &'a str, etag: Option<&'a str>) -> ObjectNotice<'a> {
        ObjectNotice {
            event_source: "aws:s3",
            region: "us-east-1",
            bucket: "images",
            key: "a b+c.jpg",
            event_name,
            time: Some("2026-11-27T10:00:00Z"),
            size: Some(3),
            etag,
            version_id: Some("v1"),
            sequencer: Some("17"),
        }
    }

    #[test]
    fn a_created_object_is_its_bucket_key_and_etag() {
        assert_eq!(
            notice("ObjectCreated:Put", Some("abc")).id().unwrap(),
            "images/a b+c.jpg@abc"
        );
        // A multipart upload noticed by a poll has the same id as its notification.
        assert_eq!(
            notice("ObjectCreated:CompleteMultipartUpload", Some("abc"))
                .id()
                .unwrap(),
            notice("ObjectCreated:Put", Some("abc")).id().unwrap()
        );
        assert_eq!(
            notice("ObjectCreated:Put", None).id().unwrap(),
            "images/a b+c.jpg@v1"
        );
        // Tagging keeps the upload's ETag but is not the upload.
        assert_eq!(
            notice("ObjectCreated:PutTagging", Some("abc"))
                .id()
                .unwrap(),
            "images/a b+c.jpg#ObjectCreated:PutTagging@v1/2026-11-27T10:00:00Z"
        );
        let mut bare = notice("ObjectCreated:Put", None);
        bare.version_id = None;
        assert_eq!(
            bare.id().unwrap(),
            "images/a b+c.jpg@t2026-11-27T10:00:00Z:3"
        );
        assert_eq!(
            notice("ObjectRemoved:Delete", None).id().unwrap(),
            "images/a b+c.jpg#ObjectRemoved:Delete@v1/2026-11-27T10:00:00Z"
        );
    }

    #[test]
    fn etags_lose_their_quotes() {
        assert_eq!(bare_etag("\"d41d8\""), "d41d8");
        assert_eq!(bare_etag("W/\"d41d8-2\""), "d41d8-2");
        assert_eq!(bare_etag("d41d8"), "d41d8");
    }

    #[test]
    fn a_polled_object_reads_like_a_record() {
        let notice = notice("ObjectCreated:Put", Some("abc"));
        let event = notice.event(&notice.record_data()).unwrap();
        assert_eq!(event.source, "aws:s3.us-east-1.images");
        assert_eq!(event.ty, "com.amazonaws.s3.ObjectCreated:Put");
        assert_eq!(event.subject.as_deref(), Some("a b+c.jpg"));
        let data: Value = serde_json::from_slice(&event.data).unwrap();
        assert_eq!(data["object"]["key"], "a b+c.jpg");
        assert_eq!(data["object"]["eTag"], "abc");
        assert_eq!(data["bucket"]["name"], "images");
    }
}
