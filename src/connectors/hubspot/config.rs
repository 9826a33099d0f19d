//! Options of the `hubspot` destination, with HubSpot's documented limits as defaults.

use std::sync::LazyLock;
use std::time::Duration;

use crate::delivery::settings::{Defaults, Docs, HttpSettings, invalid};
use crate::error::Result;
use crate::options::{OptionSpec, Options, Secret};

/// HubSpot's public API.
pub const DEFAULT_BASE_URL: &str = "https://api.hubapi.com";
/// Inputs per batch call: HubSpot's limit.
pub const MAX_BATCH_SIZE: usize = 100;
/// Batch calls in flight: HubSpot's guidance is 3–5.
pub const DEFAULT_CONCURRENCY: usize = 4;
/// The share of the burst budget sluice paces at by default: a rolling window counts requests
/// as HubSpot receives them, and network jitter can bunch two together.
pub const BUDGET_SHARE: f64 = 0.97;

/// The defaults and limits of the shared delivery options (the rate budget follows the tier).
pub const DEFAULTS: Defaults = Defaults {
    batch_size: MAX_BATCH_SIZE,
    max_batch_size: MAX_BATCH_SIZE,
    concurrency: DEFAULT_CONCURRENCY,
    rate_limit: None,
    timeout: Duration::from_secs(30),
};

/// The options `CREATE CONNECTION … TYPE hubspot` accepts: its own, then the shared delivery options.
pub static OPTIONS: LazyLock<Vec<OptionSpec>> = LazyLock::new(|| {
    let mut options = vec![
        OptionSpec::new(
            "token",
            "text",
            "",
            "a private app token or OAuth access token (sent as Authorization: Bearer)",
        )
        .secret(),
        OptionSpec::new(
            "base_url",
            "url",
            "https://api.hubapi.com",
            "the API's base URL (a proxy or a test server)",
        ),
        OptionSpec::new(
            "tier",
            "free | starter | pro | enterprise",
            "free",
            "'free', 'starter', 'pro' or 'enterprise': sets the default rate budget (100 or 190 requests per 10 s)",
        ),
    ];
    options.extend(DEFAULTS.options(Docs {
        batch: "inputs per batch call",
        rate_limit: "97% of the tier's budget",
    }));
    options
});

/// How HubSpot compares values of `property`: emails case-insensitively.
pub fn normalize(property: &str, value: &str) -> String {
    if property == "email" {
        value.trim().to_lowercase()
    } else {
        value.to_string()
    }
}

/// A HubSpot account's API limits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tier {
    pub name: &'static str,
    /// Requests per 10 seconds (per app).
    pub burst: u32,
    /// Requests per day (per account).
    pub daily: u32,
}

pub const TIERS: &[(&str, Tier)] = &[
    (
        "free",
        Tier {
            name: "free",
            burst: 100,
            daily: 250_000,
        },
    ),
    (
        "starter",
        Tier {
            name: "starter",
            burst: 100,
            daily: 250_000,
        },
    ),
    (
        "pro",
        Tier {
            name: "pro",
            burst: 190,
            daily: 625_000,
        },
    ),
    (
        "professional",
        Tier {
            name: "pro",
            burst: 190,
            daily: 625_000,
        },
    ),
    (
        "enterprise",
        Tier {
            name: "enterprise",
            burst: 190,
            daily: 1_000_000,
        },
    ),
];

/// The typed options of one HubSpot connection.
#[derive(Debug, Clone)]
pub struct HubspotConfig {
    pub token: Secret,
    pub base_url: url::Url,
    /// `base_url` as it may be shown: scheme and host only when it came from env() or file().
    pub shown_base_url: String,
    pub tier: Tier,
    pub http: HttpSettings,
}

impl HubspotConfig {
    pub fn from_options(options: &Options) -> Result<Self> {
        let token = options.secret("token")?.ok_or_else(|| {
            invalid(
                "token",
                "a hubspot connection needs option 'token' (a private app token), e.g. token env('HUBSPOT_TOKEN')".into(),
            )
        })?;
        let raw = options
            .string("base_url")?
            .unwrap_or_else(|| DEFAULT_BASE_URL.into());
        let base_url = url::Url::parse(raw.trim_end_matches('/'))
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .ok_or_else(|| {
                invalid(
                    "base_url",
                    format!(
                        "option 'base_url' = '{}' is not an http(s) URL",
                        crate::options::redact_url_password(&raw)
                    ),
                )
            })?;
        let tier = match options.string("tier")? {
            None => TIERS[0].1,
            Some(t) => TIERS
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case(t.trim()))
                .map(|(_, tier)| *tier)
                .ok_or_else(|| {
                    invalid(
                        "tier",
                        format!(
                            "option 'tier' = '{t}' is not valid; use 'free', 'starter', 'pro' or 'enterprise'"
                        ),
                    )
                })?,
        };
        let http = HttpSettings::from_options(
            options,
            Defaults {
                rate_limit: Some(f64::from(tier.burst) / 10.0 * BUDGET_SHARE),
                ..DEFAULTS
            },
        )?;
        Ok(Self {
            token,
            shown_base_url: crate::options::shown_base_url(
                &base_url,
                options.from_outside("base_url"),
            ),
            base_url,
            tier,
            http,
        })
    }

    /// `base_url` joined with an API path (`/crm/v3/…`).
    pub fn endpoint(&self, path: &str) -> String {
        format!("{}{}", self.base_url.as_str().trim_end_matches('/'), path)
    }
}
