//! Function log lines into the logs stream (`nats.logs_stream`): every host's lines
//! in one place, read by `GET /v1/functions/{name}/logs` and `switchyard logs`.
//!
//! Lines are handed over without waiting (a bounded buffer of [`BUFFER`] lines) and
//! published by one task; a function printing faster than they can be stored loses
//! lines from its stored log (counted and logged), never slows its instance, other
//! functions or Switchyard's own log. The stream drops its oldest lines past its
//! limits (7 days, 1 GiB by default).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use switchyard_bus::Bus;
use switchyard_workers::logs::{LogLine, LogSink};
use tokio::sync::mpsc;

/// Lines waiting to be published, at most.
const BUFFER: usize = 16 * 1024;

/// Publishes function log lines to the logs stream.
pub struct StreamedLogs {
    sender: mpsc::Sender<LogLine>,
    dropped: Arc<AtomicU64>,
}

impl StreamedLogs {
    /// Starts the publishing task (it ends when the sink is dropped).
    pub fn start(bus: Bus) -> Arc<StreamedLogs> {
        let (sender, receiver) = mpsc::channel(BUFFER);
        let dropped = Arc::new(AtomicU64::new(0));
        tokio::spawn(publish(bus, receiver, dropped.clone()));
        Arc::new(StreamedLogs { sender, dropped })
    }
}

fn count_dropped(dropped: &AtomicU64) {
    let count = dropped.fetch_add(1, Ordering::Relaxed) + 1;
    if switchyard_event::backoff::worth_logging(count) {
        tracing::warn!(
            dropped = count,
            "function log lines are printed faster than the logs stream stores them: some are left out of it (they are still in switchyard's own log)"
        );
    }
}

impl LogSink for StreamedLogs {
    fn line(&self, line: LogLine) {
        if self.sender.try_send(line).is_err() {
            count_dropped(&self.dropped);
        }
    }
}

async fn publish(bus: Bus, mut receiver: mpsc::Receiver<LogLine>, dropped: Arc<AtomicU64>) {
    while let Some(line) = receiver.recv().await {
        let subject = bus.subjects().logs(&line.function);
        let Ok(payload) = serde_json::to_vec(&line) else {
            continue;
        };
        // Core NATS: the stream stores what its subjects take, without a PubAck to
        // wait for (log lines are not events: a line lost while NATS is away is
        // still in switchyard's own log).
        if bus.client().publish(subject, payload.into()).await.is_err() {
            count_dropped(&dropped);
        }
    }
}

/// What to read of a function's log.
#[derive(Debug, Clone)]
pub struct LogQuery {
    /// From this long ago.
    pub since: std::time::Duration,
    /// Only the lines of this invocation.
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
    let start = time::OffsetDateTime::now_utc() - query.since;
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
    // Ends right after the newest line stored when the read started (without
    // follow), without waiting for one more; a failed consumer ends it too.
    let lines =
        futures::stream::unfold((messages, false), move |(mut messages, done)| async move {
            if done {
                return None;
            }
            let message = messages.next().await?.ok()?;
            let sequence = message
                .info()
                .map(|info| info.stream_sequence)
                .unwrap_or_default();
            let done = !follow && last.is_some_and(|last| sequence >= last);
            let line = serde_json::from_slice::<LogLine>(&message.payload).ok();
            Some((line, (messages, done)))
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
