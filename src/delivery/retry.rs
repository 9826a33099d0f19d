//! Retry policy: capped exponential backoff with full jitter, bounded in attempts and in time,
//! and the `Retry-After` / rate-limit header parsing every destination shares.

use std::time::{Duration, SystemTime};

use http::HeaderMap;
use rand::Rng;

/// How often and for how long a request is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per request, the first included. Rate-limited answers do not count.
    pub max_attempts: u32,
    /// Total time a request may spend being retried (rate-limit waits included).
    pub max_elapsed: Duration,
    /// The first backoff's upper bound.
    pub base: Duration,
    /// No backoff is longer than this.
    pub cap: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 7,
            max_elapsed: Duration::from_secs(300),
            base: Duration::from_millis(200),
            cap: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// Whether a call that has failed `failures` times (rate-limited answers not counted) since
    /// `started` should stop trying.
    pub fn exhausted(&self, failures: u32, started: std::time::Instant) -> bool {
        failures >= self.max_attempts || started.elapsed() >= self.max_elapsed
    }

    /// How long to wait before the next try: what the server asked, else the backoff, never
    /// past `max_elapsed`.
    pub fn wait(
        &self,
        failures: u32,
        asked: Option<Duration>,
        started: std::time::Instant,
    ) -> Duration {
        let left = self.max_elapsed.saturating_sub(started.elapsed());
        asked.unwrap_or_else(|| self.backoff(failures)).min(left)
    }

    /// "Full jitter" backoff before attempt `failed + 1`: uniform in `[0, min(cap, base·2^(failed-1))]`.
    /// (AWS architecture blog, "Exponential Backoff And Jitter": it spreads retries of many
    /// clients best.) Written out here because it is three lines; the popular backoff crates
    /// add jitter on top of the delay instead.
    pub fn backoff(&self, failed: u32) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << failed.saturating_sub(1).min(20));
        let ceiling = exp.min(self.cap);
        let nanos = ceiling.as_nanos().min(u64::MAX as u128) as u64;
        if nanos == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(rand::rng().random_range(0..=nanos))
    }
}

/// The longest wait a server's answer can ask for: longer ones are read as this long (the
/// driver then gives up on them, as no run waits a day).
pub const MAX_SERVER_WAIT: Duration = Duration::from_secs(24 * 3600);

/// A number of seconds a server sent, as a wait: at most [`MAX_SERVER_WAIT`]; `None` for what is
/// not a wait (negative, NaN). Never panics, whatever the number.
pub fn server_seconds(secs: f64) -> Option<Duration> {
    if secs.is_nan() || secs < 0.0 {
        return None;
    }
    Some(Duration::try_from_secs_f64(secs).map_or(MAX_SERVER_WAIT, |d| d.min(MAX_SERVER_WAIT)))
}

/// `Retry-After`: delay-seconds (fractions accepted) or an HTTP date; at most
/// [`MAX_SERVER_WAIT`].
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = value.parse::<f64>() {
        return server_seconds(secs);
    }
    let when = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let when: SystemTime = when.into();
    Some(
        when.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
            .min(MAX_SERVER_WAIT),
    )
}

/// What rate-limit headers say about the current window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateWindow {
    /// Requests left in the window.
    pub remaining: u64,
    /// Until the window frees a slot (or resets).
    pub reset_in: Duration,
}

/// Reads `X-RateLimit-Remaining` with `X-RateLimit-Reset` (seconds from now, fractions
/// accepted, or a Unix timestamp) — and the `RateLimit-*` draft spelling.
pub fn rate_window(headers: &HeaderMap) -> Option<RateWindow> {
    let get = |names: &[&str]| {
        names.iter().find_map(|n| {
            headers
                .get(*n)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
    };
    let remaining = get(&["x-ratelimit-remaining", "ratelimit-remaining"])?;
    let reset = get(&["x-ratelimit-reset", "ratelimit-reset"]).unwrap_or(1.0);
    let reset_in = if reset > 1_000_000_000.0 {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        (reset - now).max(0.0)
    } else {
        reset.max(0.0)
    };
    Some(RateWindow {
        remaining: remaining.max(0.0) as u64,
        reset_in: server_seconds(reset_in.min(3600.0)).unwrap_or(Duration::ZERO),
    })
}

/// At most `max` bytes of `text` (cut at a character boundary, marked with `…`), for messages
/// that quote a server's answer.
pub fn excerpt(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// A JSON value as text (`"a"` → `a`, `1` → `1`).
pub fn value_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_jitter_stays_under_the_capped_exponential() {
        let p = RetryPolicy {
            base: Duration::from_millis(100),
            cap: Duration::from_millis(1000),
            ..RetryPolicy::default()
        };
        for failed in 1..12 {
            let ceiling = (100u64 << (failed - 1)).min(1000);
            for _ in 0..50 {
                assert!(p.backoff(failed) <= Duration::from_millis(ceiling));
            }
        }
    }

    #[test]
    fn hostile_numbers_from_a_server_never_panic() {
        for value in [
            "NaN", "-1", "inf", "-inf", "1e300", "99999999", "1e-300", "0x10",
        ] {
            let mut h = HeaderMap::new();
            h.insert("retry-after", value.parse().unwrap());
            assert!(
                retry_after(&h).is_none_or(|d| d <= MAX_SERVER_WAIT),
                "{value}"
            );
            h.insert("x-ratelimit-remaining", value.parse().unwrap());
            h.insert("x-ratelimit-reset", value.parse().unwrap());
            let w = rate_window(&h);
            assert!(
                w.is_none_or(|w| w.reset_in <= Duration::from_secs(3600)),
                "{value}"
            );
            let w = crate::connectors::hubspot::retry::rate_window(&{
                let mut h = HeaderMap::new();
                h.insert("x-hubspot-ratelimit-remaining", "0".parse().unwrap());
                h.insert("x-hubspot-ratelimit-max", value.parse().unwrap());
                h.insert(
                    "x-hubspot-ratelimit-interval-milliseconds",
                    value.parse().unwrap(),
                );
                h
            });
            assert!(
                w.is_some_and(|w| w.reset_in <= Duration::from_secs(60)),
                "{value}"
            );
        }
        assert_eq!(server_seconds(f64::NAN), None);
        assert_eq!(server_seconds(1e300), Some(MAX_SERVER_WAIT));
    }

    #[test]
    fn parses_retry_after_and_rate_headers() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", "2".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert("retry-after", "0.25".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_millis(250)));
        h.insert("x-ratelimit-remaining", "3".parse().unwrap());
        h.insert("x-ratelimit-reset", "0.5".parse().unwrap());
        assert_eq!(
            rate_window(&h),
            Some(RateWindow {
                remaining: 3,
                reset_in: Duration::from_millis(500)
            })
        );
    }
}
