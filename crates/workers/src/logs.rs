//! Function logs beyond Switchyard's own: every line an instance prints, and the
//! `START` / `END` / `REPORT` lines Lambda writes around each invocation, handed to
//! a [`LogSink`] (the binary stores them in a JetStream stream, so the logs of every
//! host are in one place).

use serde::Serialize;

/// One line of a function's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct LogLine {
    /// When it was read (RFC 3339, UTC).
    pub time: String,
    pub function: String,
    /// The instance that printed it (`<function>-<n>`).
    pub instance: String,
    /// The invocation the instance was working on, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// `stdout`, `stderr`, or `platform` for the lines Switchyard writes (`START`,
    /// `END`, `REPORT`).
    pub stream: String,
    pub message: String,
}

impl LogLine {
    pub fn new(
        function: &str,
        instance: &str,
        request_id: Option<&str>,
        stream: &str,
        message: String,
    ) -> LogLine {
        LogLine {
            time: switchyard_event::timestamp::rfc3339(time::OffsetDateTime::now_utc()),
            function: function.to_owned(),
            instance: instance.to_owned(),
            request_id: request_id.map(str::to_owned),
            stream: stream.to_owned(),
            message,
        }
    }
}

/// Where function log lines go. `line` must never wait: a function printing fast
/// must not slow the instance, nor other functions (a sink drops what it cannot
/// keep up with, and counts it).
pub trait LogSink: Send + Sync {
    fn line(&self, line: LogLine);
}

/// Lambda's `REPORT` line: duration, billed duration (whole milliseconds, rounded
/// up), memory size, and the init duration of a cold start.
pub fn report_line(
    request_id: &str,
    duration_ms: f64,
    memory_mb: u32,
    max_memory_used_bytes: Option<u64>,
    init_duration_ms: Option<f64>,
) -> String {
    let mut line = format!(
        "REPORT RequestId: {request_id}\tDuration: {duration_ms:.2} ms\tBilled Duration: {} ms\tMemory Size: {memory_mb} MB\t",
        duration_ms.ceil().max(1.0) as u64
    );
    if let Some(bytes) = max_memory_used_bytes {
        line.push_str(&format!(
            "Max Memory Used: {} MB\t",
            bytes.div_ceil(1024 * 1024)
        ));
    }
    if let Some(init) = init_duration_ms {
        line.push_str(&format!("Init Duration: {init:.2} ms\t"));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_lines_are_lambdas() {
        assert_eq!(
            report_line("r-1", 3.412, 256, None, None),
            "REPORT RequestId: r-1\tDuration: 3.41 ms\tBilled Duration: 4 ms\tMemory Size: 256 MB\t"
        );
        assert_eq!(
            report_line("r-2", 0.2, 128, Some(39 * 1024 * 1024 + 1), Some(101.5)),
            "REPORT RequestId: r-2\tDuration: 0.20 ms\tBilled Duration: 1 ms\tMemory Size: 128 MB\tMax Memory Used: 40 MB\tInit Duration: 101.50 ms\t"
        );
    }
}
