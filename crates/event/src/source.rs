//! What every event source is to the process that runs it: a [`Source`] the binary
//! starts and supervises uniformly, whatever it reads (an HTTP listener, a NATS
//! subscription or stream, a Kafka consumer group, a polled bucket).
//!
//! A source runs until shutdown. When it cannot go on (its input stream does not
//! exist, a subscription was refused, its consumer could not be created, it panicked)
//! it returns an error; the supervisor marks it failed (shown by `/readyz` and
//! `/v1/sources`) and runs it again after a growing pause. A source says when it is
//! up (subscribed, consuming, listening) through its [`SourceHealth`]: until then, and
//! while failed, the process is not ready.

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

/// Where a running source reports its state.
pub trait SourceHealth: Send + Sync {
    /// The source is set up and taking input.
    fn up(&self);
}

/// An input of events, run and supervised by the binary.
#[async_trait]
pub trait Source: Send + Sync + 'static {
    /// Its configured name.
    fn name(&self) -> &str;

    /// Its configured kind (`http`, `nats`, `kafka`, `s3_poll`).
    fn kind(&self) -> &'static str;

    /// Runs until `shutdown` is cancelled, then returns `Ok` once everything it
    /// accepted is stored (or handed back upstream). Returns `Err` with a message
    /// when it cannot go on; it is then run again after a pause. Returning `Ok`
    /// before shutdown counts as a failure too: a source never stops by itself.
    async fn run(
        &self,
        health: &dyn SourceHealth,
        shutdown: CancellationToken,
    ) -> Result<(), String>;
}
