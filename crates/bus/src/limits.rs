//! The limits nats-server enforces on a publish, checked before Switchyard publishes.
//!
//! Two of them are not just "this message is refused": a publish command longer than
//! the server's `max_control_line` (4 KiB by default) makes the server close the
//! *whole connection*, which every request and every trigger of the process shares;
//! and JetStream refuses a message whose header block is 64 KiB or more with a `400`
//! that no retry can fix. So every publish goes through [`check_message`] (subject
//! and header block), and events get stricter limits at ingest
//! ([`MAX_EVENT_HEADER_BYTES`]) so the headers a retry copy or a dead letter adds
//! always fit.

use async_nats::HeaderMap;

/// nats-server's default `max_control_line`: the longest protocol line it reads.
pub const SERVER_MAX_CONTROL_LINE: usize = 4096;

/// The longest subject Switchyard publishes on: the server's control line less room
/// for the rest of the publish command (`HPUB`, the reply inbox, two sizes).
pub const MAX_SUBJECT_BYTES: usize = SERVER_MAX_CONTROL_LINE - 256;

/// The largest header block JetStream stores (`NATS/1.0` line, every header, the
/// blank line): 64 KiB less one byte; a larger one is refused with error 10097.
pub const MAX_HEADER_BYTES: usize = 65_535;

/// Room kept in the header block of an event for the headers its retry copies and its
/// dead letter add (attempt history, the last error cut to 1 KiB and percent-encoded,
/// the trigger and function names, times).
pub const RECORD_HEADER_ROOM: usize = 8 * 1024;

/// The largest header block an event may have when it is accepted: its attributes as
/// `ce-` headers plus its `Nats-Msg-Id`.
pub const MAX_EVENT_HEADER_BYTES: usize = MAX_HEADER_BYTES - RECORD_HEADER_ROOM;

/// The size of `headers` as NATS sends them.
pub fn header_block_bytes(headers: &HeaderMap) -> usize {
    let lines: usize = headers
        .iter()
        .map(|(name, values)| {
            let name: &[u8] = name.as_ref();
            values
                .iter()
                .map(|value| name.len() + 2 + value.as_str().len() + 2)
                .sum::<usize>()
        })
        .sum();
    "NATS/1.0\r\n".len() + lines + 2
}

/// Why a message cannot be published as it is, if it cannot.
pub fn check_message(subject: &str, headers: &HeaderMap) -> Result<(), String> {
    if subject.len() > MAX_SUBJECT_BYTES {
        return Err(format!(
            "subject is {} bytes, over the limit of {MAX_SUBJECT_BYTES} bytes (nats-server's 4 KiB max_control_line less the rest of the publish command)",
            subject.len()
        ));
    }
    let header_bytes = header_block_bytes(headers);
    if header_bytes > MAX_HEADER_BYTES {
        return Err(format!(
            "headers take {header_bytes} bytes, over JetStream's limit of {MAX_HEADER_BYTES} bytes"
        ));
    }
    Ok(())
}

/// `text` cut to at most `limit` bytes at a character boundary, with `...` when cut.
pub fn shorten(text: &str, limit: usize) -> String {
    if text.len() <= limit {
        return text.to_owned();
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_block_counts_what_nats_sends() {
        let mut headers = HeaderMap::new();
        headers.insert("X", "v");
        // "NATS/1.0\r\n" + "X: v\r\n" + "\r\n"
        assert_eq!(header_block_bytes(&headers), 10 + 6 + 2);
        assert!(check_message("a.b", &headers).is_ok());
        headers.insert("Y", "v".repeat(MAX_HEADER_BYTES).as_str());
        let problem = check_message("a.b", &headers).unwrap_err();
        assert!(problem.contains("JetStream's limit of 65535"), "{problem}");
        let problem =
            check_message(&"a".repeat(MAX_SUBJECT_BYTES + 1), &HeaderMap::new()).unwrap_err();
        assert!(problem.contains("max_control_line"), "{problem}");
    }

    #[test]
    fn shorten_cuts_at_a_character_boundary() {
        assert_eq!(shorten("abc", 5), "abc");
        assert_eq!(shorten("ééé", 3), "é...");
    }
}
