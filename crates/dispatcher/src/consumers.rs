//! The durable consumers of a trigger and their names.
//!
//! Every trigger owns up to four kinds of durable consumer on the events stream, one
//! [`ConsumerRole`] each: its main consumer (new events), its direct consumer (due
//! retries and replays), its retry consumer (failed events waiting out their delay)
//! and, for ordered triggers, one consumer per key partition. Their names are
//! `switchyard-<trigger>` followed by the role's suffix. JetStream creates *or
//! updates* a consumer by name, so two triggers whose consumers shared a name would
//! silently rewrite each other's consumer. What keeps the names apart is the trigger
//! name grammar checked here ([`trigger_name_problem`]): a trigger name is 1 to 64
//! letters, digits, `-` or `_` and never ends in a role suffix (`-direct`, `-retry`,
//! `-p<i>of<n>`), so [`ConsumerRole::parse`] reads every consumer name back to exactly
//! one trigger and role (tested below over adversarial names).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use switchyard_bus::async_nats::jetstream::{
    self, consumer::DeliverPolicy, consumer::pull, context::ConsumerInfoErrorKind, kv,
};
use switchyard_bus::{Bus, BusError};

use switchyard_event::backoff::Backoff;
use tokio_util::sync::CancellationToken;

use crate::metrics::TriggerOnlyLabels;
use crate::{Shared, TriggerRuntime, consumer_backoff, log_failure};

/// Longest trigger name.
pub const MAX_TRIGGER_NAME: usize = 64;

const PREFIX: &str = "switchyard-";
const DIRECT_SUFFIX: &str = "-direct";
const RETRY_SUFFIX: &str = "-retry";

/// What a trigger's consumer is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsumerRole {
    /// New events of the trigger's filter.
    Main,
    /// Due retries and replayed dead letters, for this trigger only.
    Direct,
    /// Failed events waiting until their retry is due.
    Retry,
    /// Key partition `index` of `of` of an ordered trigger.
    Partition { index: u32, of: u32 },
}

impl ConsumerRole {
    /// The durable name of this consumer of `trigger`.
    pub fn name(self, trigger: &str) -> String {
        match self {
            ConsumerRole::Main => format!("{PREFIX}{trigger}"),
            ConsumerRole::Direct => format!("{PREFIX}{trigger}{DIRECT_SUFFIX}"),
            ConsumerRole::Retry => format!("{PREFIX}{trigger}{RETRY_SUFFIX}"),
            ConsumerRole::Partition { index, of } => format!("{PREFIX}{trigger}-p{index}of{of}"),
        }
    }

    /// The trigger and role a consumer name belongs to; `None` for a name Switchyard's
    /// triggers do not use. Unambiguous for trigger names that pass
    /// [`trigger_name_problem`].
    pub fn parse(name: &str) -> Option<(&str, ConsumerRole)> {
        let rest = name.strip_prefix(PREFIX)?;
        let (trigger, role) = if let Some(trigger) = rest.strip_suffix(DIRECT_SUFFIX) {
            (trigger, ConsumerRole::Direct)
        } else if let Some(trigger) = rest.strip_suffix(RETRY_SUFFIX) {
            (trigger, ConsumerRole::Retry)
        } else if let Some((trigger, index, of)) = split_partition(rest) {
            (trigger, ConsumerRole::Partition { index, of })
        } else {
            (rest, ConsumerRole::Main)
        };
        (trigger_name_problem(trigger).is_none()).then_some((trigger, role))
    }
}

/// `<trigger>-p<i>of<n>` split into its parts, when `name` ends so.
fn split_partition(name: &str) -> Option<(&str, u32, u32)> {
    let (trigger, tail) = name.rsplit_once("-p")?;
    let (index, of) = tail.split_once("of")?;
    let digits = |text: &str| !text.is_empty() && text.bytes().all(|byte| byte.is_ascii_digit());
    if !digits(index) || !digits(of) {
        return None;
    }
    Some((trigger, index.parse().ok()?, of.parse().ok()?))
}

/// What is wrong with `name` as a trigger name, if anything.
pub fn trigger_name_problem(name: &str) -> Option<String> {
    let valid_characters = !name.is_empty()
        && name.len() <= MAX_TRIGGER_NAME
        && name.chars().all(|character| {
            character.is_ascii_alphanumeric() || character == '-' || character == '_'
        });
    if !valid_characters {
        return Some(format!(
            "trigger `{name}` is not a valid name: use 1 to {MAX_TRIGGER_NAME} letters, digits, `-` or `_`"
        ));
    }
    let reserved = if name.ends_with(DIRECT_SUFFIX) {
        Some(DIRECT_SUFFIX)
    } else if name.ends_with(RETRY_SUFFIX) {
        Some(RETRY_SUFFIX)
    } else if split_partition(name).is_some() {
        Some("-p<i>of<n>")
    } else {
        None
    };
    reserved.map(|suffix| {
        format!(
            "trigger `{name}` ends in `{suffix}`, which names another trigger's consumers (`switchyard-<trigger>{suffix}`): choose a name without it"
        )
    })
}

/// Where each trigger consumer had got to: its ack floor (the stream sequence up to
/// which everything is acknowledged), recorded every few seconds in the KV bucket
/// `<events stream>_POSITIONS`, so a consumer that disappears (deleted by hand, lost
/// with a server) is recreated from the event after it instead of from "new" (which
/// would skip every event stored meanwhile).
///
/// A position is kept with the creation time of the stream it belongs to: after the
/// stream was deleted and created again (a memory stream after a server restart),
/// sequences start over and an old position means nothing, so it is ignored.
pub struct Positions {
    store: kv::Store,
    /// The events stream's creation time (ns since the epoch): which life of the
    /// stream positions belong to.
    stream_epoch: i128,
}

impl Positions {
    pub async fn open(bus: &Bus, stream_epoch: i128) -> Result<Positions, BusError> {
        let store = bus
            .jetstream()
            .create_or_update_key_value(kv::Config {
                bucket: format!("{}_POSITIONS", bus.events_stream()),
                description: "switchyard: the ack floor of each trigger consumer".to_owned(),
                history: 1,
                num_replicas: bus.replicas(),
                ..Default::default()
            })
            .await
            .map_err(|error| BusError::operation("open the consumer positions bucket", error))?;
        Ok(Positions {
            store,
            stream_epoch,
        })
    }

    /// The recorded ack floor of consumer `name`, if it belongs to this life of the
    /// stream.
    pub async fn get(&self, name: &str) -> Option<u64> {
        let value = self.store.get(name).await.ok()??;
        let (epoch, floor) = std::str::from_utf8(&value).ok()?.split_once(' ')?;
        (epoch.parse::<i128>().ok()? == self.stream_epoch)
            .then(|| floor.parse().ok())
            .flatten()
    }

    /// Records the ack floor of consumer `name`.
    pub async fn record(&self, name: &str, ack_floor: u64) -> Result<(), String> {
        self.store
            .put(name, format!("{} {ack_floor}", self.stream_epoch).into())
            .await
            .map(|_| ())
            .map_err(|error| error.to_string())
    }

    /// Forgets consumer `name` (its trigger was drained and removed).
    pub async fn forget(&self, name: &str) {
        let _ = self.store.purge(name).await;
    }
}

/// Creates or updates a trigger consumer without losing its position:
/// - it exists: updated in place (a deliver policy it was recreated with is kept);
///   a changed `start` is refused, since JetStream fixes where a consumer starts when
///   it is created;
/// - it is missing but a position was recorded for it: recreated from the event after
///   its last acknowledged one (logged);
/// - it never existed: created with the configured start.
pub async fn ensure(
    stream: &jetstream::stream::Stream,
    config: &pull::Config,
    positions: &Positions,
) -> Result<jetstream::consumer::Consumer<pull::Config>, BusError> {
    let name = config.durable_name.clone().unwrap_or_default();
    let mut config = config.clone();
    match stream.consumer_info(&name).await {
        Ok(info) => {
            let existing = info.config.deliver_policy;
            if existing != config.deliver_policy {
                match existing {
                    DeliverPolicy::ByStartSequence { .. } => config.deliver_policy = existing,
                    _ => {
                        return Err(BusError::Operation {
                            stage: "open trigger consumer",
                            reason: format!(
                                "consumer `{name}` was created to read {}, the configuration now says `start = \"{}\"`: `start` applies only when a trigger is created. Keep `start` as it was to go on from where the trigger is, or give the trigger a new name to read the stream afresh",
                                describe(existing),
                                describe_start(config.deliver_policy)
                            ),
                        });
                    }
                }
            }
        }
        Err(error) if error.kind() == ConsumerInfoErrorKind::NotFound => {
            let last = stream.cached_info().state.last_sequence;
            if let Some(ack_floor) = positions.get(&name).await.filter(|floor| *floor <= last) {
                tracing::warn!(consumer = %name, ack_floor, "trigger consumer was missing; recreated from the event after its last acknowledged one");
                config.deliver_policy = DeliverPolicy::ByStartSequence {
                    start_sequence: ack_floor + 1,
                };
            }
        }
        // Offline, timed out: creating it reports the real problem.
        Err(_) => {}
    }
    stream
        .create_consumer(config)
        .await
        .map_err(|error| BusError::Operation {
            stage: "create trigger consumer",
            reason: format!("consumer `{name}`: {error}"),
        })
}

/// A durable consumer of a trigger that is no longer configured, still holding events:
/// new ones it never delivered (`pending`), ones delivered and never settled
/// (`ack_pending`); for a retry consumer, retries that will never be forwarded.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OrphanedConsumer {
    pub consumer: String,
    pub trigger: String,
    pub role: String,
    pub pending: u64,
    pub ack_pending: usize,
}

/// The consumers on `stream` of triggers not in `configured` that still hold events.
pub async fn orphaned(
    stream: &jetstream::stream::Stream,
    configured: &std::collections::HashSet<&str>,
) -> Vec<OrphanedConsumer> {
    use futures::StreamExt as _;
    let mut names = stream.consumer_names();
    let mut orphans = Vec::new();
    while let Some(Ok(name)) = names.next().await {
        let Some((trigger, role)) = ConsumerRole::parse(&name) else {
            continue;
        };
        if configured.contains(trigger) {
            continue;
        }
        let Ok(info) = stream.consumer_info(&name).await else {
            continue;
        };
        if info.num_pending > 0 || info.num_ack_pending > 0 {
            orphans.push(OrphanedConsumer {
                consumer: name.clone(),
                trigger: trigger.to_owned(),
                role: format!("{role:?}").to_lowercase(),
                pending: info.num_pending,
                ack_pending: info.num_ack_pending,
            });
        }
    }
    orphans
}

/// The triggers whose `start` differs from where their existing consumer was created
/// to read (what [`ensure`] refuses at start), as messages naming the trigger, both
/// values and what to do; for `switchyard validate --check-nats`.
pub async fn start_conflicts(
    stream: &jetstream::stream::Stream,
    triggers: &[crate::TriggerConfig],
) -> Vec<String> {
    let mut conflicts = Vec::new();
    for trigger in triggers {
        let wanted = match trigger.start {
            crate::StartPosition::New => DeliverPolicy::New,
            crate::StartPosition::All => DeliverPolicy::All,
        };
        let name = if trigger.ordering == crate::OrderingMode::Key {
            let of = trigger.partitions.clamp(1, switchyard_bus::KEY_BUCKETS);
            ConsumerRole::Partition { index: 0, of }.name(&trigger.name)
        } else {
            ConsumerRole::Main.name(&trigger.name)
        };
        let Ok(info) = stream.consumer_info(&name).await else {
            continue;
        };
        let existing = info.config.deliver_policy;
        if existing != wanted && !matches!(existing, DeliverPolicy::ByStartSequence { .. }) {
            conflicts.push(format!(
                "trigger `{}`: `start = \"{}\"`, but its consumer `{name}` was created to read {}: `start` applies only when a trigger is created; keep it as it was, or give the trigger a new name to read the stream afresh",
                trigger.name,
                describe_start(wanted),
                describe(existing)
            ));
        }
    }
    conflicts
}

fn describe(policy: DeliverPolicy) -> String {
    match policy {
        DeliverPolicy::All => "every event the stream holds (`start = \"all\"`)".to_owned(),
        DeliverPolicy::New => "events stored after it was created (`start = \"new\"`)".to_owned(),
        other => format!("{other:?}"),
    }
}

fn describe_start(policy: DeliverPolicy) -> &'static str {
    match policy {
        DeliverPolicy::All => "all",
        _ => "new",
    }
}

/// Opens a running trigger's consumer, re-creating it when it is gone, retrying until
/// it works or shutdown. One that exists is taken as it is, never changed: another
/// process may have changed it to a newer form of the trigger (a reload there), and
/// setting its old filter back would make the server skip the events the new form
/// wants. Consumers are made to match a trigger's configuration by [`ensure`] when
/// the trigger is built.
pub(crate) async fn open_consumer(
    trigger: &TriggerRuntime,
    config: &pull::Config,
    shutdown: &CancellationToken,
) -> Option<jetstream::consumer::Consumer<pull::Config>> {
    let mut failures = consumer_backoff();
    let name = config.durable_name.clone().unwrap_or_default();
    loop {
        if let Ok(existing) = trigger.stream.get_consumer::<pull::Config>(&name).await {
            return Some(existing);
        }
        match ensure(&trigger.stream, config, &trigger.positions).await {
            Ok(consumer) => return Some(consumer),
            Err(error) => {
                failures.failed();
                log_failure(trigger, &failures, "create consumer", &error);
                if !failures.pause(shutdown.cancelled()).await {
                    return None;
                }
            }
        }
    }
}

/// After consecutive failures: waits a growing pause and, from the third failure on,
/// creates the consumer again (it may have been deleted or lost with a server; creating
/// it is idempotent). False when shut down meanwhile.
pub(crate) async fn recover(
    trigger: &TriggerRuntime,
    config: &pull::Config,
    failures: &Backoff,
    shutdown: &CancellationToken,
    consumer: &mut jetstream::consumer::Consumer<pull::Config>,
) -> bool {
    if !failures.pause(shutdown.cancelled()).await {
        return false;
    }
    if failures.failures() >= 3 {
        match open_consumer(trigger, config, shutdown).await {
            Some(recreated) => *consumer = recreated,
            None => return false,
        }
    }
    true
}

/// Every 5 seconds: the trigger's lag and waiting retries (for `/v1/triggers` and
/// `/metrics`), and the ack floor of each of its consumers, recorded when it moved
/// (see [`Positions`]).
pub(crate) async fn lag_loop(
    trigger: Arc<TriggerRuntime>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(Duration::from_secs(5));
    let main_name = ConsumerRole::Main.name(&trigger.config.name);
    let retry_name = ConsumerRole::Retry.name(&trigger.config.name);
    let mut names = vec![
        main_name.clone(),
        ConsumerRole::Direct.name(&trigger.config.name),
        retry_name.clone(),
    ];
    names.extend(
        trigger
            .partition_configs
            .iter()
            .filter_map(|config| config.durable_name.clone()),
    );
    let mut recorded: HashMap<String, u64> = HashMap::new();
    let gauge = shared
        .metrics
        .consumer_lag
        .get_or_create(&TriggerOnlyLabels {
            trigger: trigger.config.name.clone(),
        })
        .clone();
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = shutdown.cancelled() => return,
        }
        for name in &names {
            let info = tokio::select! {
                info = trigger.stream.get_consumer::<pull::Config>(name) => info,
                () = shutdown.cancelled() => return,
            };
            let Ok(consumer) = info else { continue };
            let info = consumer.cached_info();
            if *name == main_name {
                trigger.lag.store(info.num_pending, Ordering::Relaxed);
                gauge.set(info.num_pending as i64);
            } else if *name == retry_name {
                trigger.retrying.store(
                    info.num_pending + info.num_ack_pending as u64,
                    Ordering::Relaxed,
                );
            }
            let ack_floor = info.ack_floor.stream_sequence;
            if ack_floor > 0 && recorded.get(name) != Some(&ack_floor) {
                match trigger.positions.record(name, ack_floor).await {
                    Ok(()) => {
                        recorded.insert(name.clone(), ack_floor);
                    }
                    Err(error) => {
                        tracing::debug!(consumer = %name, %error, "recording a consumer position failed");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roles() -> Vec<ConsumerRole> {
        vec![
            ConsumerRole::Main,
            ConsumerRole::Direct,
            ConsumerRole::Retry,
            ConsumerRole::Partition { index: 0, of: 8 },
            ConsumerRole::Partition { index: 7, of: 8 },
            ConsumerRole::Partition { index: 1, of: 2 },
        ]
    }

    #[test]
    fn names_ending_in_a_role_suffix_are_refused() {
        for name in [
            "orders-direct",
            "orders-retry",
            "orders-p0of8",
            "orders-p12of64",
            "x-p1of2",
        ] {
            let problem = trigger_name_problem(name).expect(name);
            assert!(problem.contains("ends in"), "{problem}");
        }
        for name in [
            "orders",
            "orders-directly",
            "retry",
            "direct",
            "orders-p",
            "orders-pXof8",
            "orders-p1of",
            "p1of2",
            "orders_retry",
        ] {
            assert_eq!(trigger_name_problem(name), None, "{name}");
        }
        assert!(trigger_name_problem("a.b").is_some());
        assert!(trigger_name_problem(&"a".repeat(65)).is_some());
    }

    #[test]
    fn every_consumer_name_belongs_to_one_trigger_and_role() {
        // Adversarial names: prefixes and suffixes of each other, and names that look
        // like role suffixes without being one.
        let triggers = [
            "orders",
            "orders-x",
            "orders-directly",
            "orders-p",
            "orders-p1",
            "orders-p1of",
            "p1of2",
            "direct",
            "retry",
            "o",
            "orders_retry",
            "orders-pof8",
            "switchyard",
        ];
        let mut seen = std::collections::HashMap::new();
        for trigger in triggers {
            assert_eq!(trigger_name_problem(trigger), None, "{trigger}");
            for role in roles() {
                let name = role.name(trigger);
                assert_eq!(
                    ConsumerRole::parse(&name),
                    Some((trigger, role)),
                    "{name} reads back"
                );
                if let Some(other) = seen.insert(name.clone(), (trigger, role)) {
                    panic!("{name} is used by {other:?} and {:?}", (trigger, role));
                }
            }
        }
        assert_eq!(ConsumerRole::parse("switchyard-orders-direct-retry"), None);
        assert_eq!(ConsumerRole::parse("other-orders"), None);
    }
}
