//! The permits an invocation holds, taken before its event is pulled and released
//! when it ends, so a limit is also backpressure: the trigger's own (per process;
//! across processes JetStream's `max_ack_pending` applies), the function's adaptive
//! budget and its cluster slot (shared by every trigger of the function), and the
//! process's global one.

use tokio::sync::OwnedSemaphorePermit;

use crate::limit::AdaptivePermit;
use crate::slots::SlotPermit;
use crate::{Shared, TriggerRuntime};

/// The permits one invocation holds; released on drop.
pub(crate) struct Permits {
    /// Taken before the pull, except by the direct consumer, which takes it once its
    /// event arrived.
    pub(crate) trigger: Option<OwnedSemaphorePermit>,
    /// Taken before the pull, except for an idle trigger's single waiting pull, which
    /// takes them once its event arrived (see `pull_loop`).
    pub(crate) shared: Option<SharedPermits>,
}

/// The permits an invocation shares with other triggers: its function's (adaptive,
/// and a cluster slot) and the process's.
pub(crate) struct SharedPermits {
    _function: AdaptivePermit,
    _slot: Option<SlotPermit>,
    _global: OwnedSemaphorePermit,
}

pub(crate) async fn acquire_shared_permits(
    trigger: &TriggerRuntime,
    shared: &Shared,
) -> SharedPermits {
    // The cluster slot last, so it is never held while waiting for a local permit.
    let function_permit = trigger.function.limit.acquire().await;
    let global_permit = shared
        .global
        .clone()
        .acquire_owned()
        .await
        .expect("never closed");
    let slot = match &trigger.slots {
        Some(slots) => Some(slots.acquire().await),
        None => None,
    };
    SharedPermits {
        _function: function_permit,
        _slot: slot,
        _global: global_permit,
    }
}

pub(crate) async fn acquire_permits(
    trigger: &TriggerRuntime,
    shared: &Shared,
    with_shared: bool,
) -> Permits {
    let trigger_permit = trigger
        .permits
        .clone()
        .acquire_owned()
        .await
        .expect("never closed");
    let shared = if with_shared {
        Some(acquire_shared_permits(trigger, shared).await)
    } else {
        None
    };
    Permits {
        trigger: Some(trigger_permit),
        shared,
    }
}

pub(crate) fn try_acquire_permits(
    trigger: &TriggerRuntime,
    shared: &Shared,
    with_shared: bool,
) -> Option<Permits> {
    let trigger_permit = trigger.permits.clone().try_acquire_owned().ok()?;
    if !with_shared {
        return Some(Permits {
            trigger: Some(trigger_permit),
            shared: None,
        });
    }
    let function_permit = trigger.function.limit.try_acquire()?;
    let global_permit = shared.global.clone().try_acquire_owned().ok()?;
    let slot = match &trigger.slots {
        Some(slots) => Some(slots.try_acquire()?),
        None => None,
    };
    Some(Permits {
        trigger: Some(trigger_permit),
        shared: Some(SharedPermits {
            _function: function_permit,
            _slot: slot,
            _global: global_permit,
        }),
    })
}
