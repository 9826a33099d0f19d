//! When a scheduled sync runs (`sluice serve`): `EVERY '…'` ticks on multiples of the interval
//! since the Unix epoch (so restarts and several processes agree), `CRON '…'` (5 fields, or 6
//! with seconds first) in UTC.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::parser::Schedule;

/// A schedule, parsed.
#[derive(Debug, Clone)]
pub enum Timing {
    Every(Duration),
    Cron(Box<croner::Cron>),
}

impl Timing {
    /// The timing of `schedule`, or what is wrong with it.
    pub fn of(schedule: &Schedule) -> Result<Self, String> {
        match schedule {
            Schedule::Every(text) => match crate::options::parse_duration(text) {
                Ok(d) if d >= Duration::from_secs(1) => Ok(Timing::Every(d)),
                Ok(_) => Err(format!(
                    "SCHEDULE EVERY '{text}' is shorter than a second; use at least '1 second'"
                )),
                Err(e) => Err(format!("SCHEDULE EVERY '{text}' is not a duration ({e})")),
            },
            Schedule::Cron(text) => croner::Cron::from_str(text)
                .map(|c| Timing::Cron(Box::new(c)))
                .map_err(|e| {
                    format!(
                        "SCHEDULE CRON '{text}' is not a cron expression ({e}); e.g. CRON '*/15 * * * *'"
                    )
                }),
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
            Timing::Cron(cron) => cron.find_next_occurrence(&t, false).ok(),
        }
    }

    /// Whether a tick fell between `last` (the sync's last run's start) and `now`: after
    /// downtime, the sync runs once to catch up (not once per missed tick).
    pub fn missed(&self, last: DateTime<Utc>, now: DateTime<Utc>) -> bool {
        self.next_after(last).is_some_and(|tick| tick <= now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let t = Timing::of(&Schedule::Cron("30 2 * * 1".into())).unwrap();
        // 2026-12-07 is a Monday.
        assert_eq!(
            t.next_after(at("2026-12-07T01:00:00Z")),
            Some(at("2026-12-07T02:30:00Z"))
        );
        assert_eq!(
            t.next_after(at("2026-12-07T02:30:00Z")),
            Some(at("2026-12-14T02:30:00Z"))
        );
        let seconds = Timing::of(&Schedule::Cron("*/10 * * * * *".into())).unwrap();
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
        let e = Timing::of(&Schedule::Cron("61 * * * *".into())).unwrap_err();
        assert!(
            e.contains("not a cron expression") && e.contains("*/15"),
            "{e}"
        );
        let e = Timing::of(&Schedule::Every("100ms".into())).unwrap_err();
        assert!(e.contains("at least '1 second'"), "{e}");
    }
}
