//! The delivery options every HTTP destination accepts (`batch_size`, `concurrency`,
//! `rate_limit`, `timeout`, `max_attempts`, `max_retry_time`), parsed once, with each
//! destination's own defaults and limits.

use std::time::Duration;

use super::RetryPolicy;
use crate::error::{Error, Result};
use crate::options::{OptionSpec, Options, parse_duration};

/// A destination's defaults and limits for the shared options.
#[derive(Debug, Clone, Copy)]
pub struct Defaults {
    pub batch_size: usize,
    pub max_batch_size: usize,
    pub concurrency: usize,
    pub rate_limit: Option<f64>,
    pub timeout: Duration,
}

/// How a connector's docs name what a request carries and what `rate_limit` defaults to.
#[derive(Debug, Clone, Copy)]
pub struct Docs {
    /// What one request carries: `records per request`, `inputs per batch call`.
    pub batch: &'static str,
    /// The default of `rate_limit`, in words.
    pub rate_limit: &'static str,
}

impl Defaults {
    /// The shared options documented with these defaults, for a connector to append to its own
    /// (`OPTIONS` is built once per connector kind, in a static).
    pub fn options(&self, docs: Docs) -> Vec<OptionSpec> {
        let retry = RetryPolicy::default();
        let text = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
        vec![
            OptionSpec::new(
                "batch_size",
                text(format!("integer 1-{}", self.max_batch_size)),
                text(self.batch_size.to_string()),
                docs.batch,
            ),
            OptionSpec::new(
                "concurrency",
                "integer",
                text(self.concurrency.to_string()),
                "requests in flight at once",
            ),
            OptionSpec::new(
                "rate_limit",
                "number (requests/s)",
                docs.rate_limit,
                "requests per second at most, shared by every statement on the connection",
            ),
            OptionSpec::new(
                "timeout",
                "duration",
                text(format!("{}s", self.timeout.as_secs())),
                "per-request timeout",
            ),
            OptionSpec::new(
                "max_attempts",
                "integer",
                text(retry.max_attempts.to_string()),
                "attempts per request, and per record failing transiently, before giving up (rate-limited answers do not count)",
            ),
            OptionSpec::new(
                "max_retry_time",
                "duration",
                text(format!("{}m", retry.max_elapsed.as_secs() / 60)),
                "longest time one request may be retried",
            ),
        ]
    }
}

/// The shared options of one connection.
#[derive(Debug, Clone, Copy)]
pub struct HttpSettings {
    pub batch_size: usize,
    pub concurrency: usize,
    pub rate_limit: Option<f64>,
    pub timeout: Duration,
    pub retry: RetryPolicy,
}

/// Which redirects a connection's client follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redirects {
    /// None: a 3xx answer is the destination's answer. Following one across origins would send
    /// the records, secret headers and the signature to another host.
    None,
    /// Up to 5 redirects to the request's own scheme, host and port.
    SameOrigin,
}

impl Redirects {
    fn policy(self) -> reqwest::redirect::Policy {
        match self {
            Redirects::None => reqwest::redirect::Policy::none(),
            Redirects::SameOrigin => reqwest::redirect::Policy::custom(|attempt| {
                let same = attempt
                    .previous()
                    .first()
                    .is_some_and(|first| first.origin() == attempt.url().origin());
                if same && attempt.previous().len() <= 5 {
                    attempt.follow()
                } else {
                    attempt.stop()
                }
            }),
        }
    }
}

/// The slowest `rate_limit` (requests per second).
pub const MIN_RATE_LIMIT: f64 = 0.001;
/// The fastest `rate_limit`.
pub const MAX_RATE_LIMIT: f64 = 1_000_000.0;

pub fn invalid(key: &str, message: String) -> Error {
    Error::Option {
        key: key.to_string(),
        message,
    }
}

/// A duration option (`'30s'`, `'5m'`).
pub fn duration(options: &Options, key: &str) -> Result<Option<Duration>> {
    options
        .string(key)?
        .map(|s| {
            parse_duration(&s)
                .map_err(|e| invalid(key, format!("option '{key}' = '{s}' is not valid: {e}")))
        })
        .transpose()
}

/// A count option that must be at least 1.
pub fn positive(options: &Options, key: &str, default: usize) -> Result<usize> {
    match options.parse::<usize>(key)? {
        Some(0) => Err(invalid(key, format!("option '{key}' must be at least 1"))),
        Some(v) => Ok(v),
        None => Ok(default),
    }
}

impl HttpSettings {
    pub fn from_options(options: &Options, defaults: Defaults) -> Result<Self> {
        let batch_size = options
            .parse::<usize>("batch_size")?
            .unwrap_or(defaults.batch_size);
        if !(1..=defaults.max_batch_size).contains(&batch_size) {
            return Err(invalid(
                "batch_size",
                format!(
                    "option 'batch_size' = {batch_size} is out of range: use 1 to {}",
                    defaults.max_batch_size
                ),
            ));
        }
        let rate_limit = options.parse::<f64>("rate_limit")?;
        if let Some(r) = rate_limit
            && !((MIN_RATE_LIMIT..=MAX_RATE_LIMIT).contains(&r))
        {
            return Err(invalid(
                "rate_limit",
                format!(
                    "option 'rate_limit' = {r} is out of range: give requests per second, from {MIN_RATE_LIMIT} (one every 1,000 s) to {MAX_RATE_LIMIT}"
                ),
            ));
        }
        let mut retry = RetryPolicy::default();
        if let Some(n) = options.parse::<u32>("max_attempts")? {
            retry.max_attempts = n.max(1);
        }
        if let Some(d) = duration(options, "max_retry_time")? {
            retry.max_elapsed = d;
        }
        Ok(Self {
            batch_size,
            concurrency: positive(options, "concurrency", defaults.concurrency)?,
            rate_limit: rate_limit.or(defaults.rate_limit),
            timeout: duration(options, "timeout")?.unwrap_or(defaults.timeout),
            retry,
        })
    }

    /// The HTTP client of one connection (its connection pool).
    pub fn client(&self, option: &str, redirects: Redirects) -> Result<reqwest::Client> {
        reqwest::Client::builder()
            .timeout(self.timeout)
            .redirect(redirects.policy())
            .user_agent(concat!("sluice/", env!("CARGO_PKG_VERSION")))
            .pool_max_idle_per_host(self.concurrency.max(1) * 2)
            .build()
            .map_err(|e| invalid(option, format!("cannot build an HTTP client: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The keys [`Defaults::options`] documents (the keys `HttpSettings::from_options` reads).
    const SHARED: [&str; 6] = [
        "batch_size",
        "concurrency",
        "rate_limit",
        "timeout",
        "max_attempts",
        "max_retry_time",
    ];

    #[test]
    fn the_shared_options_are_documented_with_the_connectors_defaults() {
        let defaults = Defaults {
            batch_size: 100,
            max_batch_size: 200,
            concurrency: 3,
            rate_limit: None,
            timeout: Duration::from_secs(45),
        };
        let options = defaults.options(Docs {
            batch: "inputs per call",
            rate_limit: "none",
        });
        let keys: Vec<&str> = options.iter().map(|o| o.key).collect();
        assert_eq!(keys, SHARED);
        let spec = |key: &str| *options.iter().find(|o| o.key == key).unwrap();
        assert_eq!(spec("batch_size").doc, "inputs per call");
        assert_eq!(spec("batch_size").value, "integer 1-200");
        assert_eq!(spec("batch_size").default, "100");
        assert_eq!(spec("concurrency").default, "3");
        assert_eq!(spec("rate_limit").default, "none");
        assert_eq!(spec("timeout").default, "45s");
        assert_eq!(spec("max_attempts").default, "7");
        assert_eq!(spec("max_retry_time").default, "5m");
        assert!(options.iter().all(|o| !o.secret));
    }
}
