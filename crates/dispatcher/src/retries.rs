//! Failed events waiting for their retry: each trigger's retry consumer holds the
//! retry copies (a NAK with delay until due, so the wait survives restarts and never
//! occupies the trigger's own consumer), then forwards each due copy to the trigger's
//! direct subject (PubAck, then ack), where the trigger's direct consumer picks it up.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use switchyard_bus::RetryState;
use switchyard_bus::async_nats::jetstream::{self, AckKind};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::consumers::{open_consumer, recover};
use crate::{PULL_EXPIRES, Shared, TriggerRuntime, consumer_backoff, log_failure};

/// Holds a trigger's failed events until their retry is due, then sends each to the
/// trigger's direct subject. The wait is a NAK with delay on this consumer, so it
/// survives restarts and never occupies the trigger's own consumer.
pub(crate) async fn retry_loop(
    trigger: Arc<TriggerRuntime>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let Some(mut consumer) =
        open_consumer(&trigger, &trigger.retry_consumer_config, &shutdown).await
    else {
        return;
    };
    let forwarding = Arc::new(Semaphore::new(256));
    let mut failures = consumer_backoff();
    'pulling: loop {
        if failures.failing() {
            let config = &trigger.retry_consumer_config;
            if !recover(&trigger, config, &failures, &shutdown, &mut consumer).await {
                break;
            }
        }
        let request = consumer
            .batch()
            .max_messages(256)
            .expires(PULL_EXPIRES)
            .messages();
        let mut batch = tokio::select! {
            batch = request => match batch {
                Ok(batch) => {
                    failures.succeeded();
                    batch
                }
                Err(error) => {
                    failures.failed();
                    log_failure(&trigger, &failures, "pull retries", &error);
                    continue 'pulling;
                }
            },
            () = shutdown.cancelled() => break 'pulling,
        };
        loop {
            let next = tokio::select! {
                next = batch.next() => next,
                () = shutdown.cancelled() => break 'pulling,
            };
            let message = match next {
                None => break,
                Some(Ok(message)) => message,
                Some(Err(error)) => {
                    failures.failed();
                    log_failure(&trigger, &failures, "receive retries", &error);
                    break;
                }
            };
            failures.succeeded();
            let state = RetryState::from_headers(message.headers.as_ref());
            let now_ms =
                (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
            let due_in = state.retry_at_unix_ms.unwrap_or(0) - now_ms;
            if due_in > 2 {
                let _ = message
                    .ack_with(AckKind::Nak(Some(Duration::from_millis(due_in as u64))))
                    .await;
                continue;
            }
            let permit = forwarding
                .clone()
                .acquire_owned()
                .await
                .expect("never closed");
            let shared = shared.clone();
            let trigger = trigger.clone();
            tokio::spawn(async move {
                let _permit = permit;
                forward_due_retry(&trigger, &shared, message).await;
            });
        }
    }
}

async fn forward_due_retry(trigger: &TriggerRuntime, shared: &Shared, message: jetstream::Message) {
    let sequence = message
        .info()
        .map(|info| info.stream_sequence)
        .unwrap_or_default();
    let mut headers = message.headers.clone().unwrap_or_default();
    headers.insert(
        "Nats-Msg-Id",
        format!("due {} {sequence}", trigger.config.name),
    );
    let subject = trigger.direct_subject.clone();
    let stored = shared
        .bus
        .store(subject, headers, message.payload.clone())
        .await
        .map(|_| ());
    match stored {
        Ok(()) => {
            let _ = message.ack().await;
        }
        Err(error) => {
            tracing::warn!(trigger = %trigger.config.name, %error, stage = "retry", "sending a due retry failed, trying again shortly");
            let _ = message
                .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                .await;
        }
    }
}
