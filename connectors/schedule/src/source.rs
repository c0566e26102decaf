//! The schedule source (`type = "schedule"`): each time a schedule fires becomes one
//! event in the events stream, once across every process of the cluster.
//!
//! Every process runs every schedule; none is elected. A firing's event has the
//! schedule's source (`/schedules/<name>`) and the scheduled time as its id, so two
//! processes firing the same time publish the same message id and the events
//! stream's duplicate window stores it once. What has fired is also kept in a KV
//! bucket (`<events stream>_SCHEDULES`, one key per schedule: the last time fired),
//! advanced by compare-and-set after the PubAck and read before each firing, so a
//! process that comes back after the duplicate window does not fire a time again.
//! A process that dies between the PubAck and the KV write is covered by the events
//! stream itself: at start, the last stored firing of the schedule counts too.
//!
//! After downtime (a process, or the whole cluster, was not running when times were
//! due) `catch_up` decides what the missed times do: `all` (the default) fires each
//! of them, in order, at most `catch_up_limit` (the newest) and none older than
//! `catch_up_max_age` (24 hours, EventBridge's default maximum event age); `last`
//! fires the newest only; `none` skips them. A time is missed when it was due more
//! than [`MISSED_AFTER`] before the process saw it; later than that it is just late
//! and fires whatever the policy.
//!
//! `flexible_window` delays each firing by an offset in `[0, window)` derived from
//! the schedule's name and the time, the same in every process (EventBridge's
//! flexible time window spreads invocations; here they spread without processes
//! disagreeing on when).

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use switchyard_bus::async_nats::jetstream::kv;
use switchyard_bus::{Bus, BusError};
use switchyard_event::backoff::Backoff;
use switchyard_event::{Event, PublishError, Source, SourceHealth};
use tokio_util::sync::CancellationToken;

use crate::Schedule;

/// The CloudEvents type of a firing, unless `event_type` says otherwise.
pub const SCHEDULE_TYPE: &str = "dev.switchyard.schedule";
pub use switchyard_event::SCHEDULE_SOURCE_PREFIX;
/// A time due longer ago than this when a process first sees it was missed (the
/// process, or the cluster, was down): `catch_up` decides whether it fires.
pub const MISSED_AFTER: chrono::Duration = chrono::Duration::seconds(10);
/// The longest a schedule's loop sleeps before looking at the clock again (a wall
/// clock set forward is noticed within this).
const LONGEST_SLEEP: Duration = Duration::from_secs(30);

/// What a schedule does with times missed while it was not running.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CatchUp {
    /// Skip them.
    None,
    /// Fire the newest one.
    Last,
    /// Fire each of them, oldest first (bounded by `catch_up_limit` and
    /// `catch_up_max_age`).
    #[default]
    All,
}

/// A `[[sources]]` entry with `type = "schedule"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSourceConfig {
    /// Name of the schedule: its events' source is `/schedules/<name>`.
    pub name: String,
    /// `cron(...)`, `rate(...)`, `at(...)` (EventBridge Scheduler) or a 5-field cron.
    pub expression: String,
    /// IANA time zone the expression's wall-clock times are in.
    #[serde(default = "default_timezone")]
    pub timezone: String,
    /// First instant the schedule may fire (and what `rate()` counts from): RFC 3339
    /// (`2027-01-01T00:00:00Z`) or a wall-clock time in `timezone`
    /// (`2027-01-01T00:00:00`); a TOML date-time works too.
    #[serde(default, deserialize_with = "date_time_text")]
    pub start: Option<String>,
    /// Last instant the schedule may fire; same forms as `start`.
    #[serde(default, deserialize_with = "date_time_text")]
    pub end: Option<String>,
    /// Spread each firing over this window after its time (at most 24 hours).
    #[serde(default, with = "humantime_serde")]
    pub flexible_window: Option<Duration>,
    /// What times missed while nothing ran do: `all`, `last` or `none`.
    #[serde(default)]
    pub catch_up: CatchUp,
    /// Missed times older than this never fire.
    #[serde(default = "default_catch_up_max_age", with = "humantime_serde")]
    pub catch_up_max_age: Duration,
    /// With `catch_up = "all"`: at most this many missed times fire (the newest).
    #[serde(default = "default_catch_up_limit")]
    pub catch_up_limit: usize,
    /// The data of each firing: a table or array becomes JSON; a string is taken as
    /// it is (JSON text, as EventBridge Scheduler's `Input`).
    #[serde(default)]
    pub input: Option<serde_json::Value>,
    /// CloudEvents `type` of the firings.
    #[serde(default = "default_event_type")]
    pub event_type: String,
}

fn default_timezone() -> String {
    "UTC".to_owned()
}

fn default_catch_up_max_age() -> Duration {
    Duration::from_secs(24 * 60 * 60)
}

fn default_catch_up_limit() -> usize {
    1000
}

fn default_event_type() -> String {
    SCHEDULE_TYPE.to_owned()
}

/// A date-time written as a string or as a TOML date-time (which reaches serde as
/// a one-entry table).
fn date_time_text<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    let value = Option::<serde_json::Value>::deserialize(deserializer)?;
    Ok(match value {
        None => None,
        Some(serde_json::Value::String(text)) => Some(text),
        Some(serde_json::Value::Object(map)) if map.len() == 1 => map
            .values()
            .next()
            .and_then(|value| value.as_str())
            .map(str::to_owned),
        Some(other) => Some(other.to_string()),
    })
}

/// An instant written as RFC 3339, or as a wall-clock time in `timezone`.
fn instant(text: &str, timezone: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(instant) = DateTime::parse_from_rfc3339(text) {
        return Ok(instant.with_timezone(&Utc));
    }
    let zone = crate::timezone(timezone).map_err(|error| error.to_string())?;
    let local = chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S")
        .or_else(|_| chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S"))
        .map_err(|_| {
            format!("`{text}` is not a date-time: write 2027-01-01T00:00:00Z, or 2027-01-01T00:00:00 in the schedule's time zone")
        })?;
    crate::first_instant(zone, local)
        .ok_or_else(|| format!("`{text}` does not exist in time zone {timezone}"))
}

impl ScheduleSourceConfig {
    /// The schedule it describes, or the field that is wrong and why.
    pub fn schedule(&self) -> Result<Schedule, (&'static str, String)> {
        let start = self
            .start
            .as_deref()
            .map(|text| instant(text, &self.timezone))
            .transpose()
            .map_err(|error| ("start", error))?;
        let end = self
            .end
            .as_deref()
            .map(|text| instant(text, &self.timezone))
            .transpose()
            .map_err(|error| ("end", error))?;
        if let (Some(start), Some(end)) = (start, end)
            && end < start
        {
            return Err(("end", format!("{end} is before start {start}")));
        }
        Schedule::parse(&self.expression, &self.timezone, start, end).map_err(|error| {
            let field = if matches!(error, crate::ScheduleError::TimeZone(_)) {
                "timezone"
            } else {
                "expression"
            };
            (field, error.to_string())
        })
    }

    /// Every mistake, as (field, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        if let Err(problem) = self.schedule() {
            problems.push(problem);
        }
        if self
            .flexible_window
            .is_some_and(|window| window > Duration::from_secs(24 * 60 * 60))
        {
            problems.push((
                "flexible_window",
                "must be at most 24h (EventBridge allows 1440 minutes)".to_owned(),
            ));
        }
        if self.catch_up_limit == 0 {
            problems.push((
                "catch_up_limit",
                "must be at least 1 (use catch_up = \"none\" to skip missed times)".to_owned(),
            ));
        }
        if self.event_type.is_empty() {
            problems.push(("event_type", "must not be empty".to_owned()));
        }
        problems
    }

    /// The CloudEvents source of its firings.
    pub fn source(&self) -> String {
        format!("{SCHEDULE_SOURCE_PREFIX}{}", self.name)
    }

    /// The firing's data and content type.
    fn data(&self) -> (Bytes, Option<String>) {
        match &self.input {
            None => (Bytes::new(), None),
            Some(serde_json::Value::String(text)) => {
                let json = serde_json::from_str::<serde_json::Value>(text).is_ok();
                (
                    Bytes::from(text.clone()),
                    Some(
                        if json {
                            "application/json"
                        } else {
                            "text/plain"
                        }
                        .to_owned(),
                    ),
                )
            }
            Some(value) => (
                Bytes::from(value.to_string()),
                Some("application/json".to_owned()),
            ),
        }
    }

    /// The event of the firing at `time`.
    pub fn event(&self, time: DateTime<Utc>) -> Event {
        let stamp = time.to_rfc3339_opts(SecondsFormat::AutoSi, true);
        let mut event = Event::new(stamp.clone(), self.source(), self.event_type.clone());
        event.time = Some(stamp);
        event.subject = Some(self.name.clone());
        let (data, content_type) = self.data();
        event.data = data;
        event.datacontenttype = content_type;
        event
    }

    /// How long after `time` the firing happens: an offset in the flexible window
    /// the same in every process.
    fn delay(&self, time: DateTime<Utc>) -> chrono::Duration {
        let Some(window) = self.flexible_window.filter(|window| !window.is_zero()) else {
            return chrono::Duration::zero();
        };
        use sha2::Digest as _;
        let digest = sha2::Sha256::new()
            .chain_update(self.name.as_bytes())
            .chain_update([0])
            .chain_update(time.timestamp_millis().to_be_bytes())
            .finalize();
        let value = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
        let millis = u64::try_from(window.as_millis()).unwrap_or(u64::MAX).max(1);
        chrono::Duration::milliseconds(i64::try_from(value % millis).unwrap_or(0))
    }
}

/// What to do now: the times to fire, oldest first, and the missed times skipped.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub fire: Vec<DateTime<Utc>>,
    /// Missed times skipped by `catch_up` or `catch_up_limit`.
    pub skipped: usize,
    /// Times older than `catch_up_max_age` were skipped too (not counted).
    pub expired: bool,
    /// Nothing at or before this fires any more (the newest time skipped).
    pub skipped_through: Option<DateTime<Utc>>,
}

/// What is due at `now` for a schedule that fired through `fired_through`: every
/// time after it whose firing instant (time plus its flexible delay) has come.
/// Times due longer than [`MISSED_AFTER`] ago are missed ones when `first_look`
/// (the process has just started looking); `catch_up` decides what they do. Times
/// older than `catch_up_max_age` never fire.
pub fn plan(
    config: &ScheduleSourceConfig,
    schedule: &Schedule,
    fired_through: DateTime<Utc>,
    now: DateTime<Utc>,
    first_look: bool,
) -> Plan {
    let max_age =
        chrono::Duration::from_std(config.catch_up_max_age).unwrap_or(chrono::Duration::days(1));
    let oldest = now - max_age;
    let mut plan = Plan::default();
    let mut missed: VecDeque<DateTime<Utc>> = VecDeque::new();
    // Iteration starts no earlier than the oldest time that may still fire.
    let mut after = fired_through;
    if after < oldest {
        if schedule
            .next_after(after)
            .is_some_and(|time| time <= oldest)
        {
            plan.expired = true;
            plan.skipped_through = Some(oldest);
        }
        after = oldest;
    }
    // In time order, stopping at the first time not due yet; once one time is on
    // time, every later one is too. (With a flexible window a later time's firing
    // instant can come before an earlier one's: it waits for the earlier, so no time
    // is ever fired, or skipped, before an earlier one.)
    let mut on_time = Vec::new();
    while let Some(time) = schedule.next_after(after) {
        let fires_at = time + config.delay(time);
        if fires_at > now {
            // Not due yet: nothing after it fires before it.
            break;
        }
        after = time;
        if first_look && on_time.is_empty() && now - fires_at > MISSED_AFTER {
            missed.push_back(time);
            // Only the newest `catch_up_limit` matter.
            if missed.len() > config.catch_up_limit
                && let Some(dropped) = missed.pop_front()
            {
                plan.skipped += 1;
                plan.skipped_through = Some(dropped);
            }
        } else {
            on_time.push(time);
        }
    }
    let keep = match config.catch_up {
        CatchUp::All => missed.len(),
        CatchUp::Last => missed.len().min(1),
        CatchUp::None => 0,
    };
    let skip = missed.len() - keep;
    if skip > 0 {
        plan.skipped += skip;
        plan.skipped_through = Some(missed[skip - 1]);
    }
    plan.fire = missed.into_iter().skip(skip).chain(on_time).collect();
    plan
}

/// What the KV bucket keeps of a schedule.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Kept {
    /// The newest time fired (or skipped): nothing at or before it fires again.
    fired_through: String,
}

/// The KV bucket every process keeps schedules' progress in.
pub async fn open_bucket(bus: &Bus) -> Result<kv::Store, BusError> {
    bus.jetstream()
        .create_or_update_key_value(kv::Config {
            bucket: format!("{}_SCHEDULES", bus.events_stream()),
            description: "switchyard: the last time each schedule fired".to_owned(),
            history: 1,
            num_replicas: bus.replicas(),
            ..Default::default()
        })
        .await
        .map_err(|error| BusError::operation("open the schedules bucket", error))
}

/// A schedule's key in the bucket: its name when KV takes it as a key, else its
/// SHA-256.
fn key(name: &str) -> String {
    if !name.is_empty()
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_'))
    {
        name.to_owned()
    } else {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(name.as_bytes()))
    }
}

/// The time a schedule fired through and the entry's revision (0: no entry).
async fn read(store: &kv::Store, name: &str) -> Result<(Option<DateTime<Utc>>, u64), String> {
    let entry = store
        .entry(key(name))
        .await
        .map_err(|error| format!("reading the schedules bucket: {error}"))?;
    let Some(entry) = entry else {
        return Ok((None, 0));
    };
    if entry.operation != kv::Operation::Put {
        return Ok((None, entry.revision));
    }
    let kept: Kept = serde_json::from_slice(&entry.value)
        .map_err(|error| format!("the schedules bucket's entry `{name}` is unreadable: {error}"))?;
    let time = DateTime::parse_from_rfc3339(&kept.fired_through)
        .map_err(|error| format!("the schedules bucket's entry `{name}`: {error}"))?
        .with_timezone(&Utc);
    Ok((Some(time), entry.revision))
}

/// Records that the schedule fired through `time`, unless the bucket already says
/// as much or more (another process got there first). Compare-and-set: a newer
/// time written meanwhile is never moved back.
async fn advance(store: &kv::Store, name: &str, time: DateTime<Utc>) -> Result<(), String> {
    let value = serde_json::to_vec(&Kept {
        fired_through: time.to_rfc3339_opts(SecondsFormat::AutoSi, true),
    })
    .expect("serializable");
    for _ in 0..16 {
        let (kept, revision) = read(store, name).await?;
        if kept.is_some_and(|kept| kept >= time) {
            return Ok(());
        }
        let written = if revision == 0 {
            store
                .create(key(name), value.clone().into())
                .await
                .map(|_| ())
                .map_err(|error| error.to_string())
        } else {
            store
                .update(key(name), value.clone().into(), revision)
                .await
                .map(|_| ())
                .map_err(|error| error.to_string())
        };
        if written.is_ok() {
            return Ok(());
        }
        // Someone wrote in between: read again.
    }
    Err(format!(
        "the schedules bucket's entry `{name}` kept changing under 16 writes"
    ))
}

/// What `switchyard schedules` and `GET /v1/schedules` show of one schedule.
#[derive(Debug, Clone, Serialize)]
pub struct ScheduleStatus {
    pub name: String,
    pub expression: String,
    pub timezone: String,
    pub catch_up: CatchUp,
    /// The newest time fired across the cluster (RFC 3339), if any yet.
    pub fired_through: Option<String>,
    /// The next times it fires (up to 5), RFC 3339 in UTC.
    pub next: Vec<String>,
    /// Why the status is incomplete (the bucket could not be read).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The status of each schedule: its progress in the cluster's bucket and its next
/// firing times after now.
pub async fn statuses(bus: &Bus, configs: &[ScheduleSourceConfig]) -> Vec<ScheduleStatus> {
    // Looked up, not created: no schedule has run yet when it does not exist.
    let store = bus
        .jetstream()
        .get_key_value(format!("{}_SCHEDULES", bus.events_stream()))
        .await
        .map_err(|error| error.to_string());
    let now = Utc::now();
    let mut statuses = Vec::with_capacity(configs.len());
    for config in configs {
        let mut status = ScheduleStatus {
            name: config.name.clone(),
            expression: config.expression.clone(),
            timezone: config.timezone.clone(),
            catch_up: config.catch_up,
            fired_through: None,
            next: Vec::new(),
            error: None,
        };
        let fired_through = match &store {
            Ok(store) => match read(store, &config.name).await {
                Ok((time, _)) => time,
                Err(error) => {
                    status.error = Some(error);
                    None
                }
            },
            Err(error) => {
                status.error = Some(error.clone());
                None
            }
        };
        status.fired_through =
            fired_through.map(|time| time.to_rfc3339_opts(SecondsFormat::AutoSi, true));
        match config.schedule() {
            Ok(schedule) => {
                let mut after = fired_through.map_or(now, |fired| fired.max(now));
                for _ in 0..5 {
                    let Some(time) = schedule.next_after(after) else {
                        break;
                    };
                    status.next.push(
                        (time + config.delay(time)).to_rfc3339_opts(SecondsFormat::AutoSi, true),
                    );
                    after = time;
                }
            }
            Err((_, error)) => status.error = Some(error),
        }
        statuses.push(status);
    }
    statuses
}

/// A schedule, run and supervised by the binary.
pub struct ScheduleSource {
    config: ScheduleSourceConfig,
    schedule: Schedule,
    bus: Bus,
    /// A run has looked for missed times already.
    looked: std::sync::atomic::AtomicBool,
}

impl ScheduleSource {
    /// Fails when the configuration is wrong (the config check reports it first).
    pub fn new(config: ScheduleSourceConfig, bus: Bus) -> Result<Self, String> {
        let schedule = config
            .schedule()
            .map_err(|(field, error)| format!("{field}: {error}"))?;
        Ok(ScheduleSource {
            config,
            schedule,
            bus,
            looked: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Publishes the firing at `time` and waits for its PubAck, trying again while
    /// the bus is unavailable. `Ok(false)`: shutdown came first.
    async fn publish(
        &self,
        store: &kv::Store,
        time: DateTime<Utc>,
        shutdown: &CancellationToken,
    ) -> Result<bool, String> {
        let mut event = self.config.event(time);
        let _span = switchyard_event::telemetry::start_ingest(
            &mut event,
            format!("schedule {}", self.config.name),
            switchyard_event::telemetry::SpanKind::Producer,
            &self.config.name,
        );
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            match self.bus.publish_events(std::slice::from_ref(&event)).await {
                Ok(receipts) => {
                    let duplicate = receipts.first().is_some_and(|receipt| receipt.duplicate);
                    tracing::debug!(schedule = %self.config.name, time = %event.id, duplicate, "schedule fired");
                    return Ok(true);
                }
                // While NATS is away: tried again (the same id, so never stored twice);
                // after 20 tries the source fails and its supervisor restarts it.
                Err(PublishError::Unavailable(error)) if backoff.failures() < 20 => {
                    if backoff.failed() {
                        tracing::warn!(schedule = %self.config.name, time = %event.id, %error, "the bus did not store a firing; trying again");
                    }
                    tokio::select! {
                        () = tokio::time::sleep(backoff.delay()) => {}
                        () = shutdown.cancelled() => return Ok(false),
                    }
                    // Another process may have fired it meanwhile: publishing it after
                    // the duplicate window would store it twice.
                    if read(store, &self.config.name)
                        .await
                        .is_ok_and(|(fired, _)| fired.is_some_and(|fired| fired >= time))
                    {
                        return Ok(true);
                    }
                }
                Err(error) => {
                    return Err(format!(
                        "the firing at {} was not stored: {error}",
                        event.id
                    ));
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl Source for ScheduleSource {
    fn name(&self) -> &str {
        &self.config.name
    }

    fn kind(&self) -> &'static str {
        "schedule"
    }

    async fn run(
        &self,
        health: &dyn SourceHealth,
        shutdown: CancellationToken,
    ) -> Result<(), String> {
        let name = &self.config.name;
        // An event that could never be stored (an `input` over the bus's limits) is a
        // configuration problem: said at once, not at the first firing.
        self.bus
            .check_event(&self.config.event(Utc::now()))
            .map_err(|error| format!("its firings cannot be stored: {error}"))?;
        let store = open_bucket(&self.bus)
            .await
            .map_err(|error| error.to_string())?;
        // What the events stream holds of the schedule counts too: a process that
        // died between a PubAck and the bucket's update left its firing there.
        let stored = self
            .bus
            .last_event(&self.config.source(), &self.config.event_type)
            .await
            .map_err(|error| error.to_string())?
            // A firing's id is its time; anything else under the schedule's source,
            // or a time still to come, is not a firing of this schedule.
            .filter(|event| event.time.as_deref() == Some(event.id.as_str()))
            .and_then(|event| DateTime::parse_from_rfc3339(&event.id).ok())
            .map(|time| time.with_timezone(&Utc))
            .filter(|time| *time <= Utc::now() + chrono::Duration::seconds(5));
        if let Some(stored) = stored {
            advance(&store, name, stored).await?;
        }
        health.up();
        // Missed times are only looked for once per process: a run of this source
        // started again after a NATS outage sees late times, not missed ones.
        let mut first_look = !self.looked.swap(true, std::sync::atomic::Ordering::SeqCst);
        loop {
            let now = Utc::now();
            let fired_through = match read(&store, name).await? {
                (Some(time), _) => time,
                (None, _) => {
                    // Never fired in this cluster: times from now on fire.
                    advance(&store, name, now).await?;
                    continue;
                }
            };
            let plan = plan(&self.config, &self.schedule, fired_through, now, first_look);
            if plan.skipped > 0 || plan.expired {
                tracing::warn!(schedule = %name, skipped = plan.skipped, older_than_max_age = plan.expired, through = ?plan.skipped_through, catch_up = ?self.config.catch_up, "times missed while no process ran this schedule are skipped");
            }
            if let Some(through) = plan.skipped_through {
                advance(&store, name, through).await?;
            }
            if first_look && plan.fire.len() > 1 {
                tracing::info!(schedule = %name, firing = plan.fire.len(), "firing times missed while no process ran this schedule");
            }
            first_look = false;
            let mut last_fired = plan
                .skipped_through
                .unwrap_or(fired_through)
                .max(fired_through);
            for time in plan.fire {
                if shutdown.is_cancelled() {
                    return Ok(());
                }
                // Another process may have fired it meanwhile.
                if read(&store, name)
                    .await?
                    .0
                    .is_some_and(|fired| fired >= time)
                {
                    continue;
                }
                if !self.publish(&store, time, &shutdown).await? {
                    return Ok(());
                }
                advance(&store, name, time).await?;
                last_fired = time;
            }
            // Until the next firing instant (or a while, to notice clock changes).
            let now = Utc::now();
            // The first time not fired yet: the plan stops at it, whatever the
            // flexible window does to later ones.
            let next = self
                .schedule
                .next_after(last_fired)
                .map(|time| time + self.config.delay(time));
            let wait = next
                .map(|at| (at - now).to_std().unwrap_or(Duration::ZERO))
                .unwrap_or(LONGEST_SLEEP)
                .min(LONGEST_SLEEP);
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = shutdown.cancelled() => return Ok(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    fn config(expression: &str, timezone: &str) -> ScheduleSourceConfig {
        ScheduleSourceConfig {
            name: "nightly".to_owned(),
            expression: expression.to_owned(),
            timezone: timezone.to_owned(),
            start: None,
            end: None,
            flexible_window: None,
            catch_up: CatchUp::All,
            catch_up_max_age: default_catch_up_max_age(),
            catch_up_limit: default_catch_up_limit(),
            input: None,
            event_type: default_event_type(),
        }
    }

    fn stamps(times: &[DateTime<Utc>]) -> Vec<String> {
        times
            .iter()
            .map(|time| time.to_rfc3339_opts(SecondsFormat::Secs, true))
            .collect()
    }

    /// Runs a schedule against a clock stepped by `step` from `from` to `to`, as the
    /// source's loop does (each look fires what is due and records it), and returns
    /// every time fired.
    fn run_clock(config: &ScheduleSourceConfig, from: &str, to: &str, step: i64) -> Vec<String> {
        let schedule = config.schedule().unwrap();
        let (mut now, to) = (utc(from), utc(to));
        let mut fired_through = now;
        let mut fired = Vec::new();
        while now <= to {
            let plan = plan(config, &schedule, fired_through, now, false);
            if let Some(last) = plan.fire.last() {
                fired_through = *last;
            }
            fired.extend(plan.fire);
            now += chrono::Duration::seconds(step);
        }
        stamps(&fired)
    }

    #[test]
    fn a_clock_through_daylight_saving_changes_fires_each_day_once() {
        // New York, 2027: clocks skip 02:00-03:00 on March 14 and repeat 01:00-02:00
        // on November 7. A clock stepped minute by minute over both.
        let skipped = config("cron(30 2 * * ? *)", "America/New_York");
        assert_eq!(
            run_clock(&skipped, "2027-03-13T00:00:00Z", "2027-03-16T00:00:00Z", 60),
            [
                "2027-03-13T07:30:00Z", // 02:30 EST
                "2027-03-14T07:00:00Z", // no 02:30 that day: 03:00 EDT, once
                "2027-03-15T06:30:00Z", // 02:30 EDT
            ]
        );
        let repeated = config("cron(30 1 * * ? *)", "America/New_York");
        assert_eq!(
            run_clock(
                &repeated,
                "2027-11-06T00:00:00Z",
                "2027-11-09T00:00:00Z",
                60
            ),
            [
                "2027-11-06T05:30:00Z", // 01:30 EDT
                "2027-11-07T05:30:00Z", // the first 01:30 (EDT) only, not 06:30Z too
                "2027-11-08T06:30:00Z", // 01:30 EST
            ]
        );
        // A 5-field cron every 30 minutes through the repeated hour: the wall clock
        // shows 01:00 and 01:30 twice but each fires once.
        let half_hourly = config("0,30 * * * *", "America/New_York");
        let fired = run_clock(
            &half_hourly,
            "2027-11-07T04:50:00Z",
            "2027-11-07T07:10:00Z",
            60,
        );
        assert_eq!(
            fired,
            [
                "2027-11-07T05:00:00Z", // 01:00 EDT
                "2027-11-07T05:30:00Z", // 01:30 EDT
                "2027-11-07T07:00:00Z", // 02:00 EST (01:00 and 01:30 EST not again)
            ]
        );
    }

    #[test]
    fn missed_times_follow_catch_up_and_late_ones_fire() {
        let mut config = config("rate(1 minute)", "UTC");
        let schedule = config.schedule().unwrap();
        let fired_through = utc("2027-01-01T00:00:00Z");
        let now = utc("2027-01-01T00:10:30Z");
        // Ten minutes missed: all fire, oldest first.
        let all = plan(&config, &schedule, fired_through, now, true);
        assert_eq!(all.fire.len(), 10);
        assert_eq!(stamps(&all.fire[..1]), ["2027-01-01T00:01:00Z"]);
        assert_eq!((all.skipped, all.skipped_through), (0, None));
        // Not the first look: the process was running, the times are just late.
        config.catch_up = CatchUp::None;
        assert_eq!(
            plan(&config, &schedule, fired_through, now, false)
                .fire
                .len(),
            10
        );
        let none = plan(&config, &schedule, fired_through, now, true);
        assert!(none.fire.is_empty());
        assert_eq!(none.skipped, 10);
        assert_eq!(none.skipped_through, Some(utc("2027-01-01T00:10:00Z")));
        config.catch_up = CatchUp::Last;
        let last = plan(&config, &schedule, fired_through, now, true);
        assert_eq!(stamps(&last.fire), ["2027-01-01T00:10:00Z"]);
        assert_eq!(last.skipped_through, Some(utc("2027-01-01T00:09:00Z")));
        // A time due less than MISSED_AFTER ago is on time, whatever the policy.
        config.catch_up = CatchUp::None;
        let now = utc("2027-01-01T00:10:05Z");
        let fresh = plan(&config, &schedule, utc("2027-01-01T00:09:00Z"), now, true);
        assert_eq!(stamps(&fresh.fire), ["2027-01-01T00:10:00Z"]);
    }

    #[test]
    fn catching_up_is_bounded_by_count_and_age() {
        let mut config = config("rate(1 minute)", "UTC");
        let schedule = config.schedule().unwrap();
        config.catch_up_limit = 3;
        let now = utc("2027-01-01T00:10:30Z");
        let bounded = plan(&config, &schedule, utc("2027-01-01T00:00:00Z"), now, true);
        assert_eq!(
            stamps(&bounded.fire),
            [
                "2027-01-01T00:08:00Z",
                "2027-01-01T00:09:00Z",
                "2027-01-01T00:10:00Z"
            ]
        );
        assert_eq!(bounded.skipped, 7);
        assert_eq!(bounded.skipped_through, Some(utc("2027-01-01T00:07:00Z")));
        // A week down: only the last day counts, and of it the newest 3.
        config.catch_up_max_age = Duration::from_secs(24 * 60 * 60);
        let week = plan(&config, &schedule, utc("2026-12-25T00:00:00Z"), now, true);
        assert!(week.expired);
        assert_eq!(week.fire.len(), 3);
        assert_eq!(stamps(&week.fire[2..]), ["2027-01-01T00:10:00Z"]);
    }

    #[test]
    fn a_flexible_window_delays_each_time_the_same_in_every_process() {
        let mut config = config("rate(1 hour)", "UTC");
        config.flexible_window = Some(Duration::from_secs(15 * 60));
        let schedule = config.schedule().unwrap();
        let time = utc("2027-01-01T01:00:00Z");
        let delay = config.delay(time);
        assert!(delay >= chrono::Duration::zero() && delay < chrono::Duration::minutes(15));
        assert_eq!(delay, config.clone().delay(time));
        // Not due before its delay has passed, due after.
        let before = plan(
            &config,
            &schedule,
            utc("2027-01-01T00:00:00Z"),
            time + delay - chrono::Duration::milliseconds(1),
            false,
        );
        assert!(before.fire.is_empty());
        let after = plan(
            &config,
            &schedule,
            utc("2027-01-01T00:00:00Z"),
            time + delay,
            false,
        );
        assert_eq!(after.fire, [time]);
    }

    #[test]
    fn with_a_flexible_window_times_fire_in_order_and_none_is_skipped() {
        let mut config = config("rate(1 minute)", "UTC");
        config.flexible_window = Some(Duration::from_secs(10 * 60));
        config.catch_up = CatchUp::None;
        let schedule = config.schedule().unwrap();
        let fired_through = utc("2027-01-01T00:00:00Z");
        for minutes in [1, 5, 9, 13, 30] {
            let now = fired_through + chrono::Duration::minutes(minutes);
            for first_look in [false, true] {
                let plan = plan(&config, &schedule, fired_through, now, first_look);
                // What fires, and what is skipped before it, is a run of consecutive
                // minutes from the first after `fired_through`.
                let mut expected = fired_through;
                if let Some(through) = plan.skipped_through {
                    assert_eq!(
                        through,
                        fired_through + chrono::Duration::minutes(plan.skipped as i64),
                        "{plan:?}"
                    );
                    expected = through;
                }
                for time in &plan.fire {
                    expected += chrono::Duration::minutes(1);
                    assert_eq!(*time, expected, "out of order or a gap: {plan:?}");
                }
            }
        }
    }

    #[test]
    fn start_end_and_input_are_read_as_written() {
        let mut config = config("rate(1 day)", "Europe/Paris");
        config.start = Some("2027-01-01T09:00:00".to_owned());
        let schedule = config.schedule().unwrap();
        // 09:00 in Paris is 08:00 UTC, and rate() counts from it.
        assert_eq!(
            schedule.next_after(utc("2027-01-01T00:00:00Z")),
            Some(utc("2027-01-01T08:00:00Z"))
        );
        config.end = Some("2026-01-01T00:00:00Z".to_owned());
        assert_eq!(config.problems()[0].0, "end");
        config.end = None;
        config.start = Some("tomorrow".to_owned());
        assert_eq!(config.problems()[0].0, "start");
        config.start = None;
        config.timezone = "Mars/Olympus".to_owned();
        assert_eq!(config.problems()[0].0, "timezone");

        let mut config = self::config("rate(5 minutes)", "UTC");
        config.input = Some(serde_json::json!({"job": "cleanup"}));
        let event = config.event(utc("2027-01-01T00:05:00Z"));
        assert_eq!(event.id, "2027-01-01T00:05:00Z");
        assert_eq!(event.source, "/schedules/nightly");
        assert_eq!(event.ty, SCHEDULE_TYPE);
        assert_eq!(event.time.as_deref(), Some("2027-01-01T00:05:00Z"));
        assert_eq!(event.datacontenttype.as_deref(), Some("application/json"));
        assert_eq!(&event.data[..], br#"{"job":"cleanup"}"#);
        config.input = Some(serde_json::Value::from("plain words"));
        assert_eq!(
            config
                .event(utc("2027-01-01T00:05:00Z"))
                .datacontenttype
                .as_deref(),
            Some("text/plain")
        );
    }
}
