//! Options of the `webhook` destination, with their defaults as constants.

use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};

use crate::delivery::RetryPolicy;
use crate::delivery::settings::{Defaults, HttpSettings, Redirects, invalid, positive};
use crate::error::Result;
use crate::options::{OptionSpec, Options, Secret};

/// Records per request unless `batch_size` says otherwise.
pub const DEFAULT_BATCH_SIZE: usize = 1000;
/// The largest `batch_size` accepted.
pub const MAX_BATCH_SIZE: usize = 10_000;
/// Request body budget unless `max_bytes` says otherwise.
pub const DEFAULT_MAX_BYTES: usize = 5 * 1024 * 1024;
/// Requests in flight unless `concurrency` says otherwise.
pub const DEFAULT_CONCURRENCY: usize = 4;
/// Per-request timeout unless `timeout` says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The options `CREATE CONNECTION ... TYPE webhook` accepts.
pub const OPTIONS: &[OptionSpec] = &[
    OptionSpec {
        key: "url",
        doc: "the endpoint records are sent to (http or https)",
        secret: false,
    },
    OptionSpec {
        key: "key",
        doc: "the record field that identifies a record (for rejects, diffs and deletes)",
        secret: false,
    },
    OptionSpec {
        key: "method",
        doc: "POST (default), PUT or PATCH",
        secret: false,
    },
    OptionSpec {
        key: "header.*",
        doc: "an extra request header, e.g. 'header.Authorization' env('HOOK_TOKEN')",
        secret: true,
    },
    OptionSpec {
        key: "batch_size",
        doc: "records per request, 1-10000 (default 1000)",
        secret: false,
    },
    OptionSpec {
        key: "max_bytes",
        doc: "largest request body in bytes (default 5 MiB); a batch closes before exceeding it",
        secret: false,
    },
    OptionSpec {
        key: "concurrency",
        doc: "requests in flight at once (default 4)",
        secret: false,
    },
    OptionSpec {
        key: "rate_limit",
        doc: "requests per second at most, shared by every statement using the connection (default: none, adapts to 429s)",
        secret: false,
    },
    OptionSpec {
        key: "timeout",
        doc: "per-request timeout, e.g. '30s' (default 30s)",
        secret: false,
    },
    OptionSpec {
        key: "signing_secret",
        doc: "HMAC-SHA256 key: signs timestamp.body into X-Sluice-Signature: t=...,v1=...",
        secret: true,
    },
    OptionSpec {
        key: "max_attempts",
        doc: "attempts per request before giving up (default 7; 429s do not count)",
        secret: false,
    },
    OptionSpec {
        key: "follow_redirects",
        doc: "none (default): a 3xx answer fails the run, since following it would re-send the records, headers and signature to another address; 'same-origin' follows redirects to the url's own scheme, host and port",
        secret: false,
    },
    OptionSpec {
        key: "max_retry_time",
        doc: "longest time one request may be retried, e.g. '5m' (default 5m)",
        secret: false,
    },
];

/// The typed options of one webhook connection.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    pub url: url::Url,
    /// The url as it may be shown: scheme and host only when it came from env() or file().
    pub shown_url: String,
    pub key: Option<String>,
    pub method: Method,
    pub headers: Vec<(HeaderName, SecretHeader)>,
    pub batch_size: usize,
    pub max_bytes: usize,
    pub concurrency: usize,
    pub rate_limit: Option<f64>,
    pub timeout: Duration,
    pub signing_secret: Option<Secret>,
    pub retry: RetryPolicy,
    pub settings: HttpSettings,
    pub redirects: Redirects,
}

/// A header value that may be a credential: never printed.
#[derive(Clone)]
pub struct SecretHeader(pub HeaderValue);

impl std::fmt::Debug for SecretHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl WebhookConfig {
    pub fn from_options(options: &Options) -> Result<Self> {
        let raw = options.required_string("url")?;
        let outside = options.from_outside("url");
        let url = url::Url::parse(&raw)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .ok_or_else(|| {
                let shown = match outside {
                    true => "the value of the url's env() or file()".to_string(),
                    false => format!("'{}'", crate::options::redact_url_password(&raw)),
                };
                invalid(
                    "url",
                    format!("option 'url' = {shown} is not an http(s) URL"),
                )
            })?;
        let shown_url = crate::options::shown_url(&url, outside);
        let redirects = match options.string("follow_redirects")?.as_deref() {
            None | Some("none") => Redirects::None,
            Some("same-origin") => Redirects::SameOrigin,
            Some(other) => {
                return Err(invalid(
                    "follow_redirects",
                    format!(
                        "option 'follow_redirects' = '{other}' is not valid: use none or same-origin"
                    ),
                ));
            }
        };
        let method = match options.string("method")?.as_deref().map(str::to_uppercase) {
            None => Method::POST,
            Some(m) if m == "POST" => Method::POST,
            Some(m) if m == "PUT" => Method::PUT,
            Some(m) if m == "PATCH" => Method::PATCH,
            Some(m) => {
                return Err(invalid(
                    "method",
                    format!("option 'method' = '{m}' is not valid: use POST, PUT or PATCH"),
                ));
            }
        };
        let mut headers = vec![];
        for (name, value) in options.prefixed("header.")? {
            let header = HeaderName::try_from(name.as_str()).map_err(|_| {
                invalid(
                    "header.*",
                    format!("'{name}' is not a valid HTTP header name"),
                )
            })?;
            let value = HeaderValue::try_from(value.expose()).map_err(|_| {
                invalid(
                    "header.*",
                    format!("the value of header '{name}' is not a valid header value"),
                )
            })?;
            headers.push((header, SecretHeader(value)));
        }
        let settings = HttpSettings::from_options(
            options,
            Defaults {
                batch_size: DEFAULT_BATCH_SIZE,
                max_batch_size: MAX_BATCH_SIZE,
                concurrency: DEFAULT_CONCURRENCY,
                rate_limit: None,
                timeout: DEFAULT_TIMEOUT,
            },
        )?;
        Ok(Self {
            url,
            shown_url,
            redirects,
            key: options.string("key")?,
            method,
            headers,
            batch_size: settings.batch_size,
            max_bytes: positive(options, "max_bytes", DEFAULT_MAX_BYTES)?,
            concurrency: settings.concurrency,
            rate_limit: settings.rate_limit,
            timeout: settings.timeout,
            signing_secret: options.secret("signing_secret")?,
            retry: settings.retry,
            settings,
        })
    }
}
