//! The subject scheme, which lets JetStream filter by source and type server-side.
//!
//! ```text
//! <prefix>.events.<bucket>.<source>.<type token>...       every ingested event
//! <prefix>.direct.<trigger>                                an event for one trigger only: a due retry or a replayed dead letter
//! <prefix>.retry.<trigger>                                 a failed event waiting out its retry delay
//! <prefix>.dlq.<trigger>                                   a trigger's dead letters
//! ```
//!
//! `<bucket>` is the event's key bucket, `00` to `63`: a hash of its `partitionkey`
//! extension (`00` when it has none), so ordered triggers can split the key space
//! among dispatcher processes server-side. `<source>` is the whole `source`
//! attribute as one token; the `type` attribute is
//! split on `.` into tokens, so `com.github.push` becomes `com.github.push` and a type
//! prefix ending at a dot becomes a `>` wildcard. Inside a token, characters NATS
//! reserves (`.`, `*`, `>`, whitespace), `%` and non-ASCII bytes are written as `%XX`;
//! an empty token is written as `%`.

use std::fmt::Write as _;

/// Escapes one token of a subject.
pub fn escape_token(raw: &str) -> String {
    if raw.is_empty() {
        return "%".to_owned();
    }
    let mut token = String::with_capacity(raw.len());
    for byte in raw.bytes() {
        match byte {
            b'.' | b'*' | b'>' | b'%' => write!(token, "%{byte:02X}").expect("writing to a string"),
            0x21..=0x7e => token.push(byte as char),
            _ => write!(token, "%{byte:02X}").expect("writing to a string"),
        }
    }
    token
}

/// How many key buckets events are spread over.
pub const KEY_BUCKETS: u32 = 64;

/// The key bucket of an event with this `partitionkey`:
/// 32-bit FNV-1a of its bytes, modulo [`KEY_BUCKETS`]. Stable across versions and
/// processes; it decides which dispatcher process delivers a key of an ordered
/// trigger. (Eight lines, so no hashing crate.)
pub fn key_bucket(key: &str) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in key.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash % KEY_BUCKETS
}

/// The subjects one deployment uses, under a common prefix.
#[derive(Debug, Clone)]
pub struct Subjects {
    prefix: String,
}

impl Subjects {
    pub fn new(prefix: impl Into<String>) -> Self {
        Subjects {
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The subject an event in key bucket `bucket` with this source and type is
    /// published on.
    pub fn event(&self, bucket: u32, source: &str, ty: &str) -> String {
        let mut subject = format!(
            "{}.events.{bucket:02}.{}",
            self.prefix,
            escape_token(source)
        );
        for token in ty.split('.') {
            subject.push('.');
            subject.push_str(&escape_token(token));
        }
        subject
    }

    /// Every event subject; what the events stream stores.
    pub fn all_events(&self) -> String {
        format!("{}.events.>", self.prefix)
    }

    /// Every direct subject; also stored by the events stream.
    pub fn all_direct(&self) -> String {
        format!("{}.direct.>", self.prefix)
    }

    /// Events for one trigger only: due retries and replayed dead letters.
    pub fn direct(&self, trigger: &str) -> String {
        format!("{}.direct.{}", self.prefix, escape_token(trigger))
    }

    /// Every retry subject; also stored by the events stream.
    pub fn all_retries(&self) -> String {
        format!("{}.retry.>", self.prefix)
    }

    /// Failed events of one trigger waiting out their retry delay.
    pub fn retry(&self, trigger: &str) -> String {
        format!("{}.retry.{}", self.prefix, escape_token(trigger))
    }

    pub fn dead_letter(&self, trigger: &str) -> String {
        format!("{}.dlq.{}", self.prefix, escape_token(trigger))
    }

    pub fn all_dead_letters(&self) -> String {
        format!("{}.dlq.>", self.prefix)
    }

    /// The subject function `function`'s log lines are stored under.
    pub fn logs(&self, function: &str) -> String {
        format!("{}.logs.{function}", self.prefix)
    }

    /// Every function's log lines.
    pub fn all_logs(&self) -> String {
        format!("{}.logs.>", self.prefix)
    }

    /// The narrowest server-side filter that still matches every event in key bucket
    /// `bucket` (any when `None`) with the given exact source (if any) and a type that
    /// equals `type_exact` or starts with `type_prefix`. The dispatcher applies the
    /// full filter on top.
    pub fn event_filter(
        &self,
        bucket: Option<u32>,
        source_exact: Option<&str>,
        type_exact: Option<&str>,
        type_prefix: Option<&str>,
    ) -> String {
        let source = source_exact.map_or_else(|| "*".to_owned(), escape_token);
        let bucket = bucket.map_or_else(|| "*".to_owned(), |bucket| format!("{bucket:02}"));
        let mut subject = format!("{}.events.{bucket}.{source}", self.prefix);
        if let Some(ty) = type_exact {
            for token in ty.split('.') {
                subject.push('.');
                subject.push_str(&escape_token(token));
            }
            return subject;
        }
        if let Some(prefix) = type_prefix {
            // Only whole tokens can be matched by the server: everything up to the
            // last dot of the prefix.
            if let Some(last_dot) = prefix.rfind('.') {
                for token in prefix[..last_dot].split('.') {
                    subject.push('.');
                    subject.push_str(&escape_token(token));
                }
            }
        }
        subject.push_str(".>");
        subject
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_escape_reserved_characters() {
        let subjects = Subjects::new("sy");
        assert_eq!(
            subjects.event(3, "/hooks/github", "com.github.push"),
            "sy.events.03./hooks/github.com.github.push"
        );
        assert_eq!(
            subjects.event(42, "https://x.io/a b", "t*"),
            "sy.events.42.https://x%2Eio/a%20b.t%2A"
        );
        assert_eq!(subjects.event(0, "s", "a..b"), "sy.events.00.s.a.%.b");
        assert_eq!(escape_token("ü"), "%C3%BC");
    }

    #[test]
    fn filters_use_whole_type_tokens() {
        let subjects = Subjects::new("sy");
        assert_eq!(
            subjects.event_filter(None, None, None, Some("com.github.")),
            "sy.events.*.*.com.github.>"
        );
        assert_eq!(
            subjects.event_filter(None, None, None, Some("com.git")),
            "sy.events.*.*.com.>"
        );
        assert_eq!(
            subjects.event_filter(None, None, None, Some("com")),
            "sy.events.*.*.>"
        );
        assert_eq!(
            subjects.event_filter(Some(7), Some("/hooks/x"), Some("a.b"), None),
            "sy.events.07./hooks/x.a.b"
        );
        assert_eq!(
            subjects.event_filter(None, None, None, None),
            "sy.events.*.*.>"
        );
    }

    #[test]
    fn key_buckets_are_stable_and_spread() {
        // FNV-1a test vectors: "" -> 0x811c9dc5, "a" -> 0xe40c292c.
        assert_eq!(key_bucket(""), 0x811c_9dc5 % KEY_BUCKETS);
        assert_eq!(key_bucket("a"), 0xe40c_292c % KEY_BUCKETS);
        let used: std::collections::HashSet<u32> = (0..1000)
            .map(|n| key_bucket(&format!("customer-{n}")))
            .collect();
        assert_eq!(used.len(), KEY_BUCKETS as usize);
    }
}
