//! Schedule expressions as EventBridge Scheduler writes them, and when they fire.
//!
//! - `cron(minutes hours day-of-month month day-of-week year)`: six fields;
//!   day-of-week `1-7` or `SUN-SAT` (1 is Sunday); `?` in one of day-of-month and
//!   day-of-week (exactly one); `L` (last day of the month, or `6L` the last Friday),
//!   `W` (`15W`, the weekday nearest the 15th), `#` (`2#1`, the first Monday); years
//!   1970-2199.
//! - `rate(value unit)`: every `value` `minute(s)`, `hour(s)` or `day(s)` (and
//!   `second(s)`, which EventBridge does not have), counted from the schedule's
//!   `start`, else from the Unix epoch, so every process computes the same times.
//! - `at(yyyy-mm-ddThh:mm:ss)`: once, at that wall-clock time.
//! - A common 5-field cron (`0 12 * * 1-5`: minute hour day-of-month month
//!   day-of-week, 0 or 7 Sunday).
//!
//! Times are wall-clock times in the schedule's IANA time zone (UTC by default): a
//! time that a daylight-saving change skips fires once at the first instant after
//! the gap, a time it repeats fires once (the first time).

pub mod source;

use std::time::Duration;

use chrono::{DateTime, Datelike, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;

/// What is wrong with a schedule, said so its field can be named.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("`{0}` is not a schedule expression: cron(...), rate(...), at(...) or a 5-field cron")]
    Unknown(String),
    #[error("cron(`{expression}`): {reason}")]
    Cron { expression: String, reason: String },
    #[error("rate(`{expression}`): {reason}")]
    Rate { expression: String, reason: String },
    #[error("at(`{expression}`): {reason}")]
    At { expression: String, reason: String },
    #[error("time zone `{0}` is not an IANA time zone (e.g. `Europe/Paris`, `UTC`)")]
    TimeZone(String),
}

#[derive(Debug, Clone)]
enum Kind {
    Cron {
        cron: Box<croner::Cron>,
        /// EventBridge's year field: the years it fires in (`None`: every one).
        years: Option<Vec<i32>>,
    },
    Rate(Duration),
    At(NaiveDateTime),
}

/// A parsed schedule: its expression in its time zone.
#[derive(Debug, Clone)]
pub struct Schedule {
    kind: Kind,
    timezone: Tz,
    start: Option<DateTime<Utc>>,
    end: Option<DateTime<Utc>>,
}

/// The IANA time zone `name`.
pub fn timezone(name: &str) -> Result<Tz, ScheduleError> {
    name.parse::<Tz>()
        .map_err(|_| ScheduleError::TimeZone(name.to_owned()))
}

impl Schedule {
    /// Parses `expression` in time zone `timezone` (IANA), firing from `start` (and
    /// counting `rate()` from it) until `end`, both optional.
    pub fn parse(
        expression: &str,
        timezone: &str,
        start: Option<DateTime<Utc>>,
        end: Option<DateTime<Utc>>,
    ) -> Result<Schedule, ScheduleError> {
        let timezone = self::timezone(timezone)?;
        let expression = expression.trim();
        let inner = |prefix: &str| {
            expression
                .strip_prefix(prefix)
                .and_then(|rest| rest.strip_suffix(')'))
                .map(str::trim)
        };
        let kind = if let Some(fields) = inner("cron(") {
            eventbridge_cron(fields)?
        } else if let Some(rate) = inner("rate(") {
            Kind::Rate(parse_rate(rate)?)
        } else if let Some(at) = inner("at(") {
            Kind::At(
                NaiveDateTime::parse_from_str(at, "%Y-%m-%dT%H:%M:%S").map_err(|error| {
                    ScheduleError::At {
                        expression: at.to_owned(),
                        reason: format!("{error}: write yyyy-mm-ddThh:mm:ss"),
                    }
                })?,
            )
        } else if expression.split_whitespace().count() == 5 {
            let cron = croner::parser::CronParser::builder()
                .build()
                .parse(expression)
                .map_err(|error| ScheduleError::Cron {
                    expression: expression.to_owned(),
                    reason: error.to_string(),
                })?;
            Kind::Cron {
                cron: Box::new(cron),
                years: None,
            }
        } else {
            return Err(ScheduleError::Unknown(expression.to_owned()));
        };
        Ok(Schedule {
            kind,
            timezone,
            start,
            end,
        })
    }

    /// The first time the schedule fires strictly after `after`, if it fires again.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let after = match self.start {
            // Inclusive of `start` itself.
            Some(start) if start > after => start - chrono::Duration::nanoseconds(1),
            _ => after,
        };
        let next = match &self.kind {
            Kind::Cron { cron, years } => next_cron(cron, years.as_deref(), self.timezone, after)?,
            Kind::Rate(period) => {
                let anchor = self.start.unwrap_or(DateTime::UNIX_EPOCH);
                let period = chrono::Duration::from_std(*period).ok()?;
                let elapsed = after - anchor;
                let periods = if elapsed < chrono::Duration::zero() {
                    0
                } else {
                    elapsed.num_nanoseconds()? / period.num_nanoseconds()? + 1
                };
                anchor + period * i32::try_from(periods).ok()?
            }
            Kind::At(at) => {
                let at = first_instant(self.timezone, *at)?;
                if at > after {
                    at
                } else {
                    return None;
                }
            }
        };
        match self.end {
            Some(end) if next > end => None,
            _ => Some(next),
        }
    }
}

/// The first instant of wall-clock time `local` in `timezone`: in a gap, the first
/// instant after it.
pub(crate) fn first_instant(timezone: Tz, local: NaiveDateTime) -> Option<DateTime<Utc>> {
    let mut probe = local;
    for _ in 0..=(24 * 60) {
        if let Some(instant) = timezone.from_local_datetime(&probe).earliest() {
            return Some(instant.with_timezone(&Utc));
        }
        probe += chrono::Duration::minutes(1);
        // The first valid minute after a gap, at its start.
        probe = probe.with_second(0).unwrap_or(probe);
    }
    None
}

use chrono::Timelike as _;

fn next_cron(
    cron: &croner::Cron,
    years: Option<&[i32]>,
    timezone: Tz,
    after: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let mut from = after.with_timezone(&timezone);
    // Bounded: each round returns, moves past a repeated wall-clock time (at most 60
    // in a repeated hour for a cron firing every minute) or moves to a later allowed
    // year.
    for _ in 0..400 {
        let next = cron.find_next_occurrence(&from, false).ok()?;
        // A wall-clock time the clocks going back repeat fires the first time only
        // (croner fires a pattern with a wildcard hour in both passes).
        if let chrono::LocalResult::Ambiguous(first, _) =
            timezone.from_local_datetime(&next.naive_local())
            && first != next
        {
            from = next;
            continue;
        }
        let Some(years) = years else {
            return Some(next.with_timezone(&Utc));
        };
        if years.contains(&next.year()) {
            return Some(next.with_timezone(&Utc));
        }
        let year = *years.iter().find(|year| **year > next.year())?;
        let january = timezone.with_ymd_and_hms(year, 1, 1, 0, 0, 0).earliest()?;
        from = january - chrono::Duration::nanoseconds(1);
    }
    None
}

/// EventBridge's six cron fields: croner takes the first five (Quartz weekdays, 1
/// is Sunday), the year field is kept apart.
fn eventbridge_cron(fields: &str) -> Result<Kind, ScheduleError> {
    let error = |reason: String| ScheduleError::Cron {
        expression: fields.to_owned(),
        reason,
    };
    let parts: Vec<&str> = fields.split_whitespace().collect();
    let [minutes, hours, day_of_month, month, day_of_week, year] = parts[..] else {
        return Err(error(format!(
            "{} fields: cron() takes six (minutes hours day-of-month month day-of-week year)",
            parts.len()
        )));
    };
    match (day_of_month == "?", day_of_week == "?") {
        (true, true) => {
            return Err(error(
                "`?` in both day-of-month and day-of-week: give one of them a value".to_owned(),
            ));
        }
        (false, false) => {
            return Err(error(
                "day-of-month and day-of-week both given: one of them must be `?`".to_owned(),
            ));
        }
        _ => {}
    }
    // `0/15` (from 0, every 15), as EventBridge writes it, is `0-59/15` to croner.
    let from_every = |field: &str, last: u32| -> String {
        field
            .split(',')
            .map(|part| match part.split_once('/') {
                Some((first, step)) if first.parse::<u32>().is_ok() => {
                    format!("{first}-{last}/{step}")
                }
                _ => part.to_owned(),
            })
            .collect::<Vec<_>>()
            .join(",")
    };
    let pattern = format!(
        "{} {} {} {} {}",
        from_every(minutes, 59),
        from_every(hours, 23),
        from_every(day_of_month, 31),
        from_every(month, 12),
        from_every(day_of_week, 7),
    );
    let cron = croner::parser::CronParser::builder()
        .alternative_weekdays(true)
        .build()
        .parse(&pattern)
        .map_err(|problem| error(problem.to_string()))?;
    let years = parse_years(year).map_err(error)?;
    Ok(Kind::Cron {
        cron: Box::new(cron),
        years,
    })
}

/// EventBridge's year field (`*`, `2027`, `2027-2030`, `2027,2029`, `2027/2`), as
/// the list of years it allows; `None` for every year.
fn parse_years(field: &str) -> Result<Option<Vec<i32>>, String> {
    const FIRST: i32 = 1970;
    const LAST: i32 = 2199;
    if field == "*" {
        return Ok(None);
    }
    let number = |text: &str| -> Result<i32, String> {
        let year: i32 = text
            .parse()
            .map_err(|_| format!("year `{text}` is not a number"))?;
        if !(FIRST..=LAST).contains(&year) {
            return Err(format!("year {year} is outside {FIRST}-{LAST}"));
        }
        Ok(year)
    };
    let mut years = Vec::new();
    for part in field.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((range, step)) => (
                range,
                step.parse::<i32>()
                    .ok()
                    .filter(|step| *step > 0)
                    .ok_or_else(|| format!("year step `{step}` is not a positive number"))?,
            ),
            None => (part, 1),
        };
        let (first, last) = match range {
            "*" => (FIRST, LAST),
            _ => match range.split_once('-') {
                Some((first, last)) => (number(first)?, number(last)?),
                None if step > 1 => (number(range)?, LAST),
                None => {
                    let year = number(range)?;
                    (year, year)
                }
            },
        };
        if first > last {
            return Err(format!("year range `{range}` ends before it starts"));
        }
        years.extend((first..=last).step_by(step as usize));
    }
    years.sort_unstable();
    years.dedup();
    Ok(Some(years))
}

fn parse_rate(text: &str) -> Result<Duration, ScheduleError> {
    let error = |reason: &str| ScheduleError::Rate {
        expression: text.to_owned(),
        reason: reason.to_owned(),
    };
    let mut parts = text.split_whitespace();
    let (Some(value), Some(unit), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err(error("write rate(value unit), e.g. rate(5 minutes)"));
    };
    let value: u64 = value
        .parse()
        .ok()
        .filter(|value| *value > 0)
        .ok_or_else(|| error("the value must be a whole number above 0"))?;
    let seconds = match unit {
        "second" | "seconds" => 1,
        "minute" | "minutes" => 60,
        "hour" | "hours" => 3600,
        "day" | "days" => 86_400,
        _ => return Err(error("the unit is second(s), minute(s), hour(s) or day(s)")),
    };
    if value > 1 && !unit.ends_with('s') {
        return Err(error(
            "a value above 1 takes a plural unit (rate(5 minutes))",
        ));
    }
    Ok(Duration::from_secs(value.saturating_mul(seconds)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    fn firings(schedule: &Schedule, from: &str, count: usize) -> Vec<String> {
        let mut at = utc(from);
        let mut out = Vec::new();
        for _ in 0..count {
            let Some(next) = schedule.next_after(at) else {
                break;
            };
            out.push(next.to_rfc3339());
            at = next;
        }
        out
    }

    #[test]
    fn eventbridge_cron_with_question_mark_last_weekday_and_nth() {
        let noon = Schedule::parse("cron(0 12 * * ? *)", "UTC", None, None).unwrap();
        assert_eq!(
            firings(&noon, "2027-01-01T12:00:00Z", 2),
            ["2027-01-02T12:00:00+00:00", "2027-01-03T12:00:00+00:00"]
        );
        // The first Monday (2 is Monday: 1 is Sunday), the last Friday, the weekday
        // nearest the 15th (2026-03-15 is a Sunday), the last day of the month.
        let cases = [
            ("cron(0 9 ? * 2#1 *)", "2026-04-06T09:00:00+00:00"),
            ("cron(0 18 ? * 6L *)", "2026-03-27T18:00:00+00:00"),
            ("cron(0 8 15W * ? *)", "2026-03-16T08:00:00+00:00"),
            ("cron(0 10 L * ? *)", "2026-03-31T10:00:00+00:00"),
            ("cron(0/15 * ? * MON-FRI *)", "2026-03-09T00:00:00+00:00"),
        ];
        for (expression, first) in cases {
            let schedule = Schedule::parse(expression, "UTC", None, None).unwrap();
            assert_eq!(
                firings(&schedule, "2026-03-07T00:00:00Z", 1),
                [first],
                "{expression}"
            );
        }
    }

    #[test]
    fn the_year_field_skips_to_the_years_it_allows() {
        let schedule = Schedule::parse("cron(0 0 1 1 ? 2028,2030)", "UTC", None, None).unwrap();
        assert_eq!(
            firings(&schedule, "2026-06-01T00:00:00Z", 3),
            ["2028-01-01T00:00:00+00:00", "2030-01-01T00:00:00+00:00"]
        );
        let every_other = Schedule::parse("cron(0 0 1 1 ? 2027/2)", "UTC", None, None).unwrap();
        assert_eq!(
            firings(&every_other, "2026-06-01T00:00:00Z", 2),
            ["2027-01-01T00:00:00+00:00", "2029-01-01T00:00:00+00:00"]
        );
    }

    #[test]
    fn daylight_saving_changes_fire_once_never_twice_or_zero_times() {
        // New York: 2026-03-08 02:00 -> 03:00 (02:30 does not exist), 2026-11-01
        // 02:00 -> 01:00 (01:30 happens twice).
        let gap = Schedule::parse("cron(30 2 * * ? *)", "America/New_York", None, None).unwrap();
        assert_eq!(
            firings(&gap, "2026-03-07T12:00:00Z", 3),
            [
                "2026-03-08T07:00:00+00:00", // 03:00 EDT, the first instant after the gap
                "2026-03-09T06:30:00+00:00",
                "2026-03-10T06:30:00+00:00",
            ]
        );
        let repeated =
            Schedule::parse("cron(30 1 * * ? *)", "America/New_York", None, None).unwrap();
        assert_eq!(
            firings(&repeated, "2026-10-31T12:00:00Z", 3),
            [
                "2026-11-01T05:30:00+00:00", // 01:30 EDT, once
                "2026-11-02T06:30:00+00:00",
                "2026-11-03T06:30:00+00:00",
            ]
        );
        let at =
            Schedule::parse("at(2026-03-08T02:30:00)", "America/New_York", None, None).unwrap();
        assert_eq!(
            firings(&at, "2026-03-01T00:00:00Z", 2),
            ["2026-03-08T07:00:00+00:00"]
        );
    }

    #[test]
    fn rates_count_from_the_start_or_the_epoch_the_same_in_every_process() {
        let every_five = Schedule::parse("rate(5 minutes)", "UTC", None, None).unwrap();
        assert_eq!(
            firings(&every_five, "2026-12-05T10:02:13Z", 2),
            ["2026-12-05T10:05:00+00:00", "2026-12-05T10:10:00+00:00"]
        );
        let started = Schedule::parse(
            "rate(1 hour)",
            "UTC",
            Some(utc("2026-12-05T10:20:00Z")),
            Some(utc("2026-12-05T12:20:00Z")),
        )
        .unwrap();
        assert_eq!(
            firings(&started, "2026-12-05T00:00:00Z", 5),
            [
                "2026-12-05T10:20:00+00:00",
                "2026-12-05T11:20:00+00:00",
                "2026-12-05T12:20:00+00:00",
            ]
        );
        let second = Schedule::parse("rate(1 second)", "UTC", None, None).unwrap();
        assert_eq!(
            firings(&second, "2026-12-05T10:00:00.500Z", 2),
            ["2026-12-05T10:00:01+00:00", "2026-12-05T10:00:02+00:00"]
        );
    }

    #[test]
    fn the_common_five_field_cron_takes_sunday_as_0() {
        let weekdays = Schedule::parse("0 12 * * 1-5", "Europe/Paris", None, None).unwrap();
        // 2026-12-05 is a Saturday: next is Monday 12:00 in Paris (11:00 UTC).
        assert_eq!(
            firings(&weekdays, "2026-12-05T00:00:00Z", 1),
            ["2026-12-07T11:00:00+00:00"]
        );
    }

    #[test]
    fn bad_expressions_say_what_is_wrong() {
        let refused = |expression: &str, timezone: &str| {
            Schedule::parse(expression, timezone, None, None)
                .unwrap_err()
                .to_string()
        };
        assert!(refused("cron(0 12 * * *)", "UTC").contains("six"));
        assert!(refused("cron(0 12 * * 1 *)", "UTC").contains("must be `?`"));
        assert!(refused("cron(0 12 ? * ? *)", "UTC").contains("both"));
        assert!(refused("cron(0 12 ? * 1 1960)", "UTC").contains("outside"));
        assert!(refused("cron(0 25 ? * 1 *)", "UTC").starts_with("cron("));
        assert!(refused("rate(0 minutes)", "UTC").contains("above 0"));
        assert!(refused("rate(5 fortnights)", "UTC").contains("unit"));
        assert!(refused("rate(5 minute)", "UTC").contains("plural"));
        assert!(refused("rate(5)", "UTC").contains("rate(value unit)"));
        assert!(refused("at(tomorrow)", "UTC").contains("yyyy-mm-dd"));
        assert!(refused("every day", "UTC").contains("not a schedule expression"));
        assert!(refused("rate(5 minutes)", "Mars/Olympus").contains("IANA"));
    }
}
