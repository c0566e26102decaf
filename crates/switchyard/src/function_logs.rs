//! Function log lines into the logs stream (`nats.logs_stream`): every host's lines
//! in one place, read by `GET /v1/functions/{name}/logs` and `switchyard logs`.
//!
//! Lines are handed over without waiting (a bounded buffer of [`BUFFER`] lines, a
//! quarter of it at most for one function's output) and published by one task; a
//! function printing faster than they can be stored loses lines from its stored log
//! (counted in `switchyard_function_log_lines_dropped_total` and logged), never
//! slows its instance, and cannot push other functions' lines out. The stream drops its oldest lines past its
//! limits (7 days, 1 GiB by default).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use switchyard_bus::Bus;
use switchyard_workers::FunctionLabels;
use switchyard_workers::WorkerMetrics;
use switchyard_workers::logs::{LogLine, LogSink};
use tokio::sync::mpsc;

/// Lines waiting to be published, at most.
const BUFFER: usize = 16 * 1024;
/// Of which one function's output lines, at most: a function printing faster than
/// lines are stored cannot take the room of the others' (its `START` / `END` /
/// `REPORT` lines are not held to it).
const SHARE: usize = BUFFER / 4;

/// Publishes function log lines to the logs stream.
pub struct StreamedLogs {
    sender: mpsc::Sender<LogLine>,
    counts: Arc<Counts>,
}

/// Lines published and dropped, and waiting by function.
struct Counts {
    dropped: AtomicU64,
    metrics: WorkerMetrics,
    waiting: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

impl Counts {
    /// One line of `function` less waiting.
    fn published(&self, function: &str) {
        let mut waiting = self.waiting.lock().expect("log counts lock");
        if let Some(count) = waiting.get_mut(function) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                waiting.remove(function);
            }
        }
    }
}

impl StreamedLogs {
    /// Starts the publishing task (it ends when the sink is dropped).
    pub fn start(bus: Bus, metrics: WorkerMetrics) -> Arc<StreamedLogs> {
        let (sender, receiver) = mpsc::channel(BUFFER);
        let counts = Arc::new(Counts {
            dropped: AtomicU64::new(0),
            metrics,
            waiting: std::sync::Mutex::default(),
        });
        tokio::spawn(publish(bus, receiver, counts.clone()));
        Arc::new(StreamedLogs { sender, counts })
    }
}

fn count_dropped(counts: &Counts, function: &str) {
    counts
        .metrics
        .function_log_lines_dropped
        .get_or_create(&FunctionLabels {
            function: function.to_owned(),
        })
        .inc();
    let count = counts.dropped.fetch_add(1, Ordering::Relaxed) + 1;
    if switchyard_event::backoff::worth_logging(count) {
        tracing::warn!(
            dropped = count,
            "function log lines are printed faster than the logs stream stores them: some are left out of it (switchyard's own log carries every line at level info)"
        );
    }
}

impl LogSink for StreamedLogs {
    fn line(&self, line: LogLine) {
        {
            let mut waiting = self.counts.waiting.lock().expect("log counts lock");
            let count = waiting.entry(line.function.clone()).or_default();
            if *count >= SHARE && line.stream != "platform" {
                drop(waiting);
                count_dropped(&self.counts, &line.function);
                return;
            }
            *count += 1;
        }
        if let Err(error) = self.sender.try_send(line) {
            let line = match error {
                mpsc::error::TrySendError::Full(line) | mpsc::error::TrySendError::Closed(line) => {
                    line
                }
            };
            self.counts.published(&line.function);
            count_dropped(&self.counts, &line.function);
        }
    }
}

async fn publish(bus: Bus, mut receiver: mpsc::Receiver<LogLine>, counts: Arc<Counts>) {
    while let Some(line) = receiver.recv().await {
        counts.published(&line.function);
        let subject = bus.subjects().logs(&line.function);
        let Ok(payload) = serde_json::to_vec(&line) else {
            continue;
        };
        // Core NATS: the stream stores what its subjects take, without a PubAck to
        // wait for (log lines are not events: a line lost while NATS is away is
        // still in switchyard's own log).
        if bus.client().publish(subject, payload.into()).await.is_err() {
            count_dropped(&counts, &line.function);
        } else {
            counts
                .metrics
                .function_log_lines
                .get_or_create(&FunctionLabels {
                    function: line.function,
                })
                .inc();
        }
    }
}

/// What to read of a function's log.
#[derive(Debug, Clone)]
pub struct LogQuery {
    /// From this long ago.
    pub since: std::time::Duration,
    /// From this time on, instead of `since` (an invocation's start).
    pub start: Option<time::OffsetDateTime>,
    /// Only the lines of this invocation; the read ends with its `REPORT` line.
    pub request_id: Option<String>,
    /// Go on with new lines as they come, instead of ending at the newest.
    pub follow: bool,
}

/// Whether `name` can be a function's logs subject token.
pub fn valid_function_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 140
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_')
}

/// Function `function`'s stored log lines, oldest first, from `query.since` ago: to
/// the newest stored when the read starts, or on and on with `query.follow`.
pub async fn read(
    bus: &Bus,
    function: &str,
    query: LogQuery,
) -> anyhow::Result<futures::stream::BoxStream<'static, LogLine>> {
    use futures::StreamExt as _;
    use switchyard_bus::async_nats::jetstream::consumer::{DeliverPolicy, pull};
    anyhow::ensure!(
        valid_function_name(function),
        "`{function}` is not a function name"
    );
    let subject = bus.subjects().logs(function);
    let stream = bus.jetstream().get_stream(bus.logs_stream()).await?;
    // A few milliseconds before a given start: the stream stamps a line when it
    // stores it, on its own clock.
    let start = query.start.map_or_else(
        || time::OffsetDateTime::now_utc() - query.since,
        |start| start - std::time::Duration::from_millis(5),
    );
    // Without follow, the read ends at the newest line stored now (none: nothing).
    let last = match stream.get_last_raw_message_by_subject(&subject).await {
        Ok(last) if last.time >= start => Some(last.sequence),
        Ok(_) | Err(_) => None,
    };
    if last.is_none() && !query.follow {
        return Ok(futures::stream::empty().boxed());
    }
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: subject,
            deliver_policy: DeliverPolicy::ByStartTime { start_time: start },
            ..Default::default()
        })
        .await?;
    let messages = consumer.messages().await?;
    let follow = query.follow;
    let request_id = query.request_id;
    let wanted = request_id.clone();
    // Ends right after the newest line stored when the read started (without
    // follow), or after the wanted invocation's REPORT (its last line), without
    // waiting for one more; a failed consumer ends it too.
    let lines = futures::stream::unfold((messages, false), move |(mut messages, done)| {
        let wanted = wanted.clone();
        async move {
            if done {
                return None;
            }
            let message = messages.next().await?.ok()?;
            let sequence = message
                .info()
                .map(|info| info.stream_sequence)
                .unwrap_or_default();
            let line = serde_json::from_slice::<LogLine>(&message.payload).ok();
            let reported = line.as_ref().is_some_and(|line| {
                wanted.is_some()
                    && line.request_id == wanted
                    && line.stream == "platform"
                    && line.message.starts_with("REPORT ")
            });
            let done = reported || (!follow && last.is_some_and(|last| sequence >= last));
            Some((line, (messages, done)))
        }
    })
    .filter_map(move |line| {
        let keep = line.filter(|line| {
            request_id
                .as_deref()
                .is_none_or(|wanted| line.request_id.as_deref() == Some(wanted))
        });
        futures::future::ready(keep)
    });
    Ok(lines.boxed())
}
