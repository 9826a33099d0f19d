//! When a named sync runs under `sluice serve`.
//!
//! - `EVERY '…'` ticks on multiples of the interval since the Unix epoch (so restarts and
//!   several processes agree);
//! - `CRON '…'` (5 fields, or 6 with seconds first) in UTC, or in `TIMEZONE '…'` (an IANA name;
//!   across a DST change a local time that does not exist is skipped and one that occurs twice
//!   runs once);
//! - `AFTER a, b` (a sequence), `AFTER DBT '…'`, `ON CHANGE` and `ON NOTIFY '…'` are triggers:
//!   [`Trigger`] says which; the service watches for them.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::parser::Schedule;

/// A clock schedule, parsed.
#[derive(Debug, Clone)]
pub enum Timing {
    Every(Duration),
    Cron(Box<croner::Cron>, Option<chrono_tz::Tz>),
}

/// How often `ON CHANGE` checks the model's inputs unless told.
pub const CHANGE_CHECK: Duration = Duration::from_secs(10);

/// What starts a sync's runs.
#[derive(Debug, Clone)]
pub enum Trigger {
    Timed(Timing),
    /// Runs when every one of these syncs has succeeded since this one last started.
    After(Vec<String>),
    /// Runs when dbt's `run_results.json` in this target folder shows a new successful run.
    AfterDbt(std::path::PathBuf),
    /// Runs when the model's inputs change, checked at this interval.
    OnChange(Duration),
    /// Runs on a Postgres NOTIFY on this channel.
    OnNotify(String),
}

impl Trigger {
    /// The trigger of `schedule`, or what is wrong with it.
    pub fn of(schedule: &Schedule) -> Result<Self, String> {
        Ok(match schedule {
            Schedule::Every(_) | Schedule::Cron { .. } => Trigger::Timed(Timing::of(schedule)?),
            Schedule::After(names) => Trigger::After(names.clone()),
            Schedule::AfterDbt(path) => Trigger::AfterDbt(path.into()),
            Schedule::OnChange { every } => Trigger::OnChange(match every {
                None => CHANGE_CHECK,
                Some(text) => match crate::options::parse_duration(text) {
                    Ok(d) if d >= Duration::from_millis(100) => d,
                    Ok(_) => {
                        return Err(format!(
                            "SCHEDULE ON CHANGE EVERY '{text}' is shorter than 100 ms; use at least '1 second'"
                        ));
                    }
                    Err(e) => {
                        return Err(format!(
                            "SCHEDULE ON CHANGE EVERY '{text}' is not a duration ({e})"
                        ));
                    }
                },
            }),
            Schedule::OnNotify(channel) => {
                if channel.is_empty() || channel.len() > 63 {
                    return Err(format!(
                        "SCHEDULE ON NOTIFY '{channel}': a Postgres channel name has 1 to 63 characters"
                    ));
                }
                Trigger::OnNotify(channel.clone())
            }
        })
    }
}

impl Timing {
    /// The timing of a clock schedule (`EVERY` or `CRON`), or what is wrong with it.
    pub fn of(schedule: &Schedule) -> Result<Self, String> {
        match schedule {
            Schedule::Every(text) => match crate::options::parse_duration(text) {
                Ok(d) if d >= Duration::from_secs(1) => Ok(Timing::Every(d)),
                Ok(_) => Err(format!(
                    "SCHEDULE EVERY '{text}' is shorter than a second; use at least '1 second'"
                )),
                Err(e) => Err(format!("SCHEDULE EVERY '{text}' is not a duration ({e})")),
            },
            Schedule::Cron {
                expression,
                timezone,
            } => {
                let cron = croner::Cron::from_str(expression).map_err(|e| {
                    format!(
                        "SCHEDULE CRON '{expression}' is not a cron expression ({e}); e.g. CRON '*/15 * * * *'"
                    )
                })?;
                let tz = match timezone {
                    None => None,
                    Some(name) => Some(chrono_tz::Tz::from_str(name).map_err(|_| {
                        let hint = crate::error::did_you_mean(
                            name,
                            chrono_tz::TZ_VARIANTS.iter().map(|tz| tz.name()),
                        );
                        format!(
                            "TIMEZONE '{name}' is not an IANA time zone{}",
                            if hint.is_empty() {
                                "; e.g. TIMEZONE 'Europe/Paris' or 'America/New_York'".to_string()
                            } else {
                                hint
                            }
                        )
                    })?),
                };
                Ok(Timing::Cron(Box::new(cron), tz))
            }
            other => Err(format!(
                "SCHEDULE {other} is a trigger, not a clock schedule"
            )),
        }
    }

    /// The first tick strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Timing::Every(every) => {
                let step = every.as_millis() as i64;
                let ms = t.timestamp_millis();
                let next = (ms.div_euclid(step) + 1) * step;
                DateTime::from_timestamp_millis(next)
            }
            Timing::Cron(cron, None) => cron.find_next_occurrence(&t, false).ok(),
            Timing::Cron(cron, Some(tz)) => cron
                .find_next_occurrence(&t.with_timezone(tz), false)
                .ok()
                .map(|local| local.with_timezone(&Utc)),
        }
    }

    /// Whether a tick fell between `last` (the sync's last run's start) and `now`: after
    /// downtime, the sync runs once to catch up (not once per missed tick).
    pub fn missed(&self, last: DateTime<Utc>, now: DateTime<Utc>) -> bool {
        self.next_after(last).is_some_and(|tick| tick <= now)
    }
}

/// A sync's fixed offset within `jitter` (the same on every tick and every restart, different
/// between syncs), so that many syncs on the same minute do not all start at once.
pub fn jitter_of(sync: &str, jitter: Duration) -> Duration {
    if jitter.is_zero() {
        return Duration::ZERO;
    }
    let h = xxhash_rust::xxh3::xxh3_64(sync.as_bytes());
    Duration::from_millis(h % (jitter.as_millis().max(1) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cron(expression: &str, timezone: Option<&str>) -> Schedule {
        Schedule::Cron {
            expression: expression.into(),
            timezone: timezone.map(Into::into),
        }
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn every_ticks_on_multiples_of_its_interval() {
        let t = Timing::of(&Schedule::Every("15 minutes".into())).unwrap();
        assert_eq!(
            t.next_after(at("2026-12-07T10:07:30Z")),
            Some(at("2026-12-07T10:15:00Z"))
        );
        // Strictly after: a tick time gives the next one.
        assert_eq!(
            t.next_after(at("2026-12-07T10:15:00Z")),
            Some(at("2026-12-07T10:30:00Z"))
        );
        let second = Timing::of(&Schedule::Every("1s".into())).unwrap();
        assert_eq!(
            second.next_after(at("2026-12-07T10:15:00.250Z")),
            Some(at("2026-12-07T10:15:01Z"))
        );
    }

    #[test]
    fn cron_takes_5_or_6_fields_in_utc() {
        let t = Timing::of(&cron("30 2 * * 1", None)).unwrap();
        // 2026-12-07 is a Monday.
        assert_eq!(
            t.next_after(at("2026-12-07T01:00:00Z")),
            Some(at("2026-12-07T02:30:00Z"))
        );
        assert_eq!(
            t.next_after(at("2026-12-07T02:30:00Z")),
            Some(at("2026-12-14T02:30:00Z"))
        );
        let seconds = Timing::of(&cron("*/10 * * * * *", None)).unwrap();
        assert_eq!(
            seconds.next_after(at("2026-12-07T01:00:03Z")),
            Some(at("2026-12-07T01:00:10Z"))
        );
    }

    #[test]
    fn a_missed_tick_is_caught_up_once() {
        let t = Timing::of(&Schedule::Every("1 hour".into())).unwrap();
        let last = at("2026-12-07T08:00:05Z");
        assert!(!t.missed(last, at("2026-12-07T08:59:59Z")));
        assert!(t.missed(last, at("2026-12-07T09:00:00Z")));
        assert!(t.missed(last, at("2026-12-07T23:00:00Z")));
    }

    #[test]
    fn bad_schedules_say_what_to_write() {
        let e = Timing::of(&cron("61 * * * *", None)).unwrap_err();
        assert!(
            e.contains("not a cron expression") && e.contains("*/15"),
            "{e}"
        );
        let e = Timing::of(&Schedule::Every("100ms".into())).unwrap_err();
        assert!(e.contains("at least '1 second'"), "{e}");
    }

    #[test]
    fn cron_in_a_timezone_follows_its_dst_changes() {
        let t = Timing::of(&cron("0 9 * * *", Some("Europe/Paris"))).unwrap();
        // Winter: Paris is UTC+1.
        assert_eq!(
            t.next_after(at("2026-12-07T07:00:00Z")),
            Some(at("2026-12-07T08:00:00Z"))
        );
        // Summer: UTC+2; 2026-03-29 is the day clocks go forward.
        assert_eq!(
            t.next_after(at("2026-03-28T09:00:00Z")),
            Some(at("2026-03-29T07:00:00Z"))
        );
        // 02:30 does not exist in Paris on 2026-03-29: that day's tick is skipped or moved,
        // never run twice, and the next day is on time.
        let t = Timing::of(&cron("30 2 * * *", Some("Europe/Paris"))).unwrap();
        let first = t.next_after(at("2026-03-28T12:00:00Z")).unwrap();
        assert!(first > at("2026-03-29T00:00:00Z"), "{first}");
        let second = t.next_after(first).unwrap();
        assert_eq!(second, at("2026-03-30T00:30:00Z"));
        // 02:30 occurs twice on 2026-10-25 (clocks go back): it runs once that day.
        let a = t.next_after(at("2026-10-24T12:00:00Z")).unwrap();
        let b = t.next_after(a).unwrap();
        assert!(b >= at("2026-10-26T00:00:00Z"), "{a} then {b}");
        let e = Timing::of(&cron("0 9 * * *", Some("Europe/Pariss"))).unwrap_err();
        assert!(e.contains("Europe/Paris"), "{e}");
    }

    #[test]
    fn jitter_is_fixed_per_sync_and_within_bounds() {
        let jitter = Duration::from_secs(30);
        let offsets: Vec<Duration> = (0..200)
            .map(|i| jitter_of(&format!("sync_{i}"), jitter))
            .collect();
        assert!(offsets.iter().all(|o| *o < jitter));
        assert_eq!(jitter_of("sync_7", jitter), offsets[7]);
        // Spread: not all in one second.
        let seconds: std::collections::BTreeSet<u64> =
            offsets.iter().map(|o| o.as_secs()).collect();
        assert!(seconds.len() > 20, "{seconds:?}");
        assert_eq!(jitter_of("x", Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn triggers_parse_from_their_schedules() {
        assert!(matches!(
            Trigger::of(&Schedule::OnChange { every: None }),
            Ok(Trigger::OnChange(d)) if d == CHANGE_CHECK
        ));
        assert!(matches!(
            Trigger::of(&Schedule::OnChange { every: Some("1 second".into()) }),
            Ok(Trigger::OnChange(d)) if d == Duration::from_secs(1)
        ));
        assert!(Trigger::of(&Schedule::OnNotify(String::new())).is_err());
        assert!(matches!(
            Trigger::of(&Schedule::After(vec!["a".into()])),
            Ok(Trigger::After(v)) if v == ["a"]
        ));
    }
}
