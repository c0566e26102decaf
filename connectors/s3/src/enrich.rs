//! Enrichment of object events for a trigger (`enrich = { store = "...", ... }`), just
//! before its function sees them: a presigned GET URL (`s3url` extension), the
//! object's metadata (HeadObject) and tags, and its content inline up to a size.
//!
//! Only events of created objects (`com.amazonaws.s3.ObjectCreated:*` with `s3bucket`
//! and `s3key`) are enriched; others pass unchanged. Additions go into the data's
//! `object` member (the record's `s3.object`), so a function reads
//! `object.metadata`, `object.tags`, `object.contentType`, `object.content` next to
//! `object.key`. An object gone (or replaced, for content: read with `If-Match` on the
//! event's ETag) by the time the function is called is delivered without what could
//! not be read and with `s3enrichment` saying why; any other store error fails the
//! attempt, which is retried.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::DateTimeFormat;
use base64::Engine;
use serde_json::{Value, json};
use switchyard_event::{Enricher, Event, Failure};

const REPLACED: &str = "object replaced since the event (its ETag differs); nothing added";

/// What to add, and from which store.
pub struct ObjectEnricher {
    client: aws_sdk_s3::Client,
    buckets: Vec<String>,
    presign: Option<Duration>,
    metadata: bool,
    tags: bool,
    content_max_bytes: Option<u64>,
}

impl ObjectEnricher {
    /// `buckets`: only objects in these are enriched (any when empty).
    pub fn new(
        client: aws_sdk_s3::Client,
        buckets: Vec<String>,
        presign: Option<Duration>,
        metadata: bool,
        tags: bool,
        content_max_bytes: Option<u64>,
    ) -> ObjectEnricher {
        ObjectEnricher {
            client,
            buckets,
            presign,
            metadata,
            tags,
            content_max_bytes,
        }
    }
}

fn store_failure(what: &str, error: impl std::error::Error) -> Failure {
    Failure::new(
        None,
        format!("enrichment: {what} failed: {}", DisplayErrorContext(error)),
    )
}

fn is_code<E: ProvideErrorMetadata>(
    error: &aws_sdk_s3::error::SdkError<E>,
    codes: &[&str],
) -> bool {
    let status = error
        .raw_response()
        .map(|response| response.status().as_u16());
    codes.iter().any(|code| {
        error.code() == Some(*code)
            || (*code == "NotFound" && status == Some(404))
            || (*code == "PreconditionFailed" && status == Some(412))
    })
}

#[async_trait]
impl Enricher for ObjectEnricher {
    async fn enrich(&self, event: &mut Event) -> Result<(), Failure> {
        if !event.ty.starts_with("com.amazonaws.s3.ObjectCreated:") {
            return Ok(());
        }
        let (Some(bucket), Some(key)) = (
            event.extensions.get("s3bucket").cloned(),
            event.extensions.get("s3key").cloned(),
        ) else {
            return Ok(());
        };
        if !self
            .buckets
            .iter()
            .any(|allowed| allowed == "*" || *allowed == bucket)
        {
            event.extensions.insert(
                "s3enrichment".to_owned(),
                "bucket not in this trigger's enrich.buckets".to_owned(),
            );
            return Ok(());
        }
        let etag = event.extensions.get("s3etag").cloned();
        let if_match = etag.as_ref().map(|etag| format!("\"{etag}\""));
        let mut data: Value = serde_json::from_slice(&event.data).unwrap_or_else(|_| json!({}));
        if !data.is_object() {
            data = json!({});
        }
        if !data["object"].is_object() {
            data["object"] = json!({ "key": key });
        }
        let mut size = event
            .extensions
            .get("s3size")
            .and_then(|size| size.parse::<u64>().ok());
        let mut missing: Option<&str> = None;

        if self.metadata || (self.content_max_bytes.is_some() && size.is_none_or(|size| size == 0))
        {
            match self
                .client
                .head_object()
                .bucket(&bucket)
                .key(&key)
                // The metadata of the object this event is about, not of one that
                // replaced it since (412 then, handled below as replaced).
                .set_if_match(if_match.clone())
                .send()
                .await
            {
                Ok(head) => {
                    size = head
                        .content_length()
                        .and_then(|length| u64::try_from(length).ok())
                        .or(size);
                    if self.metadata {
                        let object = &mut data["object"];
                        if let Some(content_type) = head.content_type() {
                            object["contentType"] = json!(content_type);
                        }
                        if let Some(size) = size {
                            object["size"] = json!(size);
                        }
                        if let Some(modified) = head
                            .last_modified()
                            .and_then(|time| time.fmt(DateTimeFormat::DateTime).ok())
                        {
                            object["lastModified"] = json!(modified);
                        }
                        let metadata: BTreeMap<&String, &String> = head
                            .metadata()
                            .map(|map| map.iter().collect())
                            .unwrap_or_default();
                        object["metadata"] = json!(metadata);
                    }
                }
                Err(error) if is_code(&error, &["NotFound", "NoSuchKey"]) => {
                    missing = Some("object not found");
                }
                Err(error) if is_code(&error, &["PreconditionFailed"]) => {
                    missing = Some(REPLACED);
                }
                Err(error) => return Err(store_failure("HeadObject", error)),
            }
        }
        if missing.is_none() && self.tags {
            match self
                .client
                .get_object_tagging()
                .bucket(&bucket)
                .key(&key)
                .send()
                .await
            {
                Ok(tagging) => {
                    let tags: BTreeMap<&str, &str> = tagging
                        .tag_set()
                        .iter()
                        .map(|tag| (tag.key(), tag.value()))
                        .collect();
                    data["object"]["tags"] = json!(tags);
                }
                Err(error) if is_code(&error, &["NotFound", "NoSuchKey"]) => {
                    missing = Some("object not found");
                }
                Err(error) => return Err(store_failure("GetObjectTagging", error)),
            }
        }
        if missing.is_none()
            && let Some(limit) = self.content_max_bytes
            && size.is_some_and(|size| size <= limit)
        {
            // At most one byte more than the limit, whatever the event says the
            // size is: a larger object is not inlined.
            let request = self
                .client
                .get_object()
                .bucket(&bucket)
                .key(&key)
                .set_if_match(if_match.clone())
                .range(format!("bytes=0-{limit}"));
            match request.send().await {
                Ok(object) => {
                    let bytes = object
                        .body
                        .collect()
                        .await
                        .map_err(|error| {
                            Failure::new(
                                None,
                                format!("enrichment: reading the object failed: {error}"),
                            )
                        })?
                        .into_bytes();
                    if bytes.len() as u64 > limit {
                        missing = Some("object larger than content_max_bytes; content not inlined");
                    } else {
                        data["object"]["content"] =
                            json!(base64::engine::general_purpose::STANDARD.encode(&bytes));
                        data["object"]["contentEncoding"] = json!("base64");
                    }
                }
                Err(error) if is_code(&error, &["NotFound", "NoSuchKey"]) => {
                    missing = Some("object not found");
                }
                Err(error) if is_code(&error, &["PreconditionFailed"]) => {
                    missing =
                        Some("object replaced since the event (ETag differs); content not inlined");
                }
                Err(error) => return Err(store_failure("GetObject", error)),
            }
        }
        if missing.is_none_or(|why| why != REPLACED && why != "object not found")
            && let Some(valid) = self.presign
        {
            let config = PresigningConfig::expires_in(valid)
                .map_err(|error| Failure::new(None, format!("enrichment: presign: {error}")))?;
            let request = self
                .client
                .get_object()
                .bucket(&bucket)
                .key(&key)
                .presigned(config)
                .await
                .map_err(|error| store_failure("presigning", error))?;
            event
                .extensions
                .insert("s3url".to_owned(), request.uri().to_owned());
        }
        if let Some(why) = missing {
            event
                .extensions
                .insert("s3enrichment".to_owned(), why.to_owned());
        }
        event.data = serde_json::to_vec(&data)
            .expect("a JSON value serializes")
            .into();
        Ok(())
    }
}
