//! Options of the `webhook` destination, with their defaults as constants.

use std::sync::LazyLock;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};

use crate::delivery::settings::{Defaults, Docs, HttpSettings, Redirects, invalid, positive};
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

/// The defaults and limits of the shared delivery options.
pub const DEFAULTS: Defaults = Defaults {
    batch_size: DEFAULT_BATCH_SIZE,
    max_batch_size: MAX_BATCH_SIZE,
    concurrency: DEFAULT_CONCURRENCY,
    rate_limit: None,
    timeout: DEFAULT_TIMEOUT,
};

/// The options `CREATE CONNECTION ... TYPE webhook` accepts: its own, then the shared delivery options.
pub static OPTIONS: LazyLock<Vec<OptionSpec>> = LazyLock::new(|| {
    let mut options = vec![
        OptionSpec::new(
            "url",
            "url",
            "",
            "the endpoint records are sent to (http or https)",
        ),
        OptionSpec::new(
            "key",
            "field name",
            "",
            "the record field that identifies a record (for rejects, diffs and deletes)",
        ),
        OptionSpec::new(
            "method",
            "POST | PUT | PATCH",
            "POST",
            "the HTTP method of each request",
        ),
        OptionSpec::new(
            "header.*",
            "text",
            "",
            "an extra request header, e.g. 'header.Authorization' env('HOOK_TOKEN')",
        )
        .secret(),
        OptionSpec::new(
            "max_bytes",
            "integer (bytes)",
            "5242880",
            "largest request body; a batch closes before exceeding it",
        ),
        OptionSpec::new(
            "signing_secret",
            "text",
            "",
            "HMAC-SHA256 key: signs timestamp.body into X-Sluice-Signature: t=...,v1=...",
        )
        .secret(),
        OptionSpec::new(
            "follow_redirects",
            "none | same-origin",
            "none",
            "'none': a 3xx answer fails the run, since following it would re-send the records, headers and signature to another address; 'same-origin' follows redirects to the url's own scheme, host and port",
        ),
    ];
    options.extend(DEFAULTS.options(Docs {
        batch: "records per request",
        rate_limit: "none, adapts to 429s",
    }));
    options
});

/// The typed options of one webhook connection.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    pub url: url::Url,
    /// The url as it may be shown: scheme and host only when it came from env() or file().
    pub shown_url: String,
    pub key: Option<String>,
    pub method: Method,
    pub headers: Vec<(HeaderName, SecretHeader)>,
    pub max_bytes: usize,
    pub signing_secret: Option<Secret>,
    /// The shared delivery options (batch size, concurrency, rate, timeout, retries).
    pub http: HttpSettings,
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
        Ok(Self {
            url,
            shown_url,
            redirects,
            key: options.string("key")?,
            method,
            headers,
            max_bytes: positive(options, "max_bytes", DEFAULT_MAX_BYTES)?,
            signing_secret: options.secret("signing_secret")?,
            http: HttpSettings::from_options(options, DEFAULTS)?,
        })
    }
}
