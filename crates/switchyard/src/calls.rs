//! Functions called synchronously (the Invoke API, function URLs): the function and
//! the concurrency budget it shares with its triggers.

use std::sync::Arc;
use std::time::Duration;

use switchyard_dispatcher::{AdaptiveLimit, AdaptivePermit, FunctionSlots, SlotPermit};
use switchyard_targets::HttpTarget;
use switchyard_workers::ManagedFunction;

/// What a synchronous call reaches.
pub enum CallKind {
    /// A `lambda` function: the request becomes its event.
    Lambda(ManagedFunction),
    /// A `process` function: requests are forwarded to an instance.
    Process(ManagedFunction),
    /// An `http` function: requests are forwarded to its server.
    Http(Arc<HttpTarget>),
}

/// A function callable synchronously.
pub struct SyncFunction {
    pub name: String,
    pub kind: CallKind,
    /// The function's concurrency budget in this process, shared with its triggers.
    pub limit: Arc<AdaptiveLimit>,
    /// Its budget across every process (`concurrency_scope = "cluster"`), shared
    /// with its triggers too.
    pub slots: Option<Arc<FunctionSlots>>,
    pub timeout: Duration,
}

/// A place in a function's budget, held for one call.
pub struct Budget {
    _local: AdaptivePermit,
    _cluster: Option<SlotPermit>,
}

impl SyncFunction {
    /// Waits at most `max_wait` for a place in the function's budget (in this process,
    /// then across processes); `None` when it stayed full (Lambda's throttling).
    pub async fn take_budget(&self, max_wait: Duration) -> Option<Budget> {
        tokio::time::timeout(max_wait, async {
            let local = self.limit.acquire().await;
            let cluster = match &self.slots {
                Some(slots) => Some(slots.acquire().await),
                None => None,
            };
            Budget {
                _local: local,
                _cluster: cluster,
            }
        })
        .await
        .ok()
    }
}
