//! Options of the `salesforce` destination, with Salesforce's documented limits as defaults.

use std::sync::LazyLock;
use std::time::Duration;

use crate::delivery::settings::{Defaults, Docs, HttpSettings, invalid, positive};
use crate::error::Result;
use crate::options::{OptionSpec, Options, Secret};

/// Where OAuth tokens come from unless `login_url` says otherwise.
pub const DEFAULT_LOGIN_URL: &str = "https://login.salesforce.com";
/// A recent API version (Winter '25).
pub const DEFAULT_API_VERSION: &str = "62.0";
/// Records per sObject Collections call: Salesforce's limit.
pub const MAX_BATCH_SIZE: usize = 200;
/// Changed records of one operation above which Bulk API 2.0 is used (Salesforce's guidance).
pub const DEFAULT_BULK_THRESHOLD: usize = 2_000;
/// Raw CSV bytes per Bulk job (Salesforce accepts 150 MB after base64, about 100 MB raw).
pub const MAX_JOB_BYTES: usize = 100 * 1024 * 1024;

/// The defaults and limits of the shared delivery options.
pub const DEFAULTS: Defaults = Defaults {
    batch_size: MAX_BATCH_SIZE,
    max_batch_size: MAX_BATCH_SIZE,
    concurrency: 4,
    rate_limit: None,
    timeout: Duration::from_secs(120),
};

/// The options `CREATE CONNECTION … TYPE salesforce` accepts: its own, then the shared delivery options.
pub static OPTIONS: LazyLock<Vec<OptionSpec>> = LazyLock::new(|| {
    let mut options = vec![
        OptionSpec::new(
            "login_url",
            "url",
            "https://login.salesforce.com",
            "the OAuth host: https://login.salesforce.com, https://test.salesforce.com or the org's My Domain (needed for client credentials)",
        ),
        OptionSpec::new("client_id", "text", "", "the connected app's consumer key").secret(),
        OptionSpec::new(
            "client_secret",
            "text",
            "",
            "the connected app's consumer secret (client credentials and refresh token flows)",
        )
        .secret(),
        OptionSpec::new(
            "refresh_token",
            "text",
            "",
            "a refresh token: selects the refresh token flow",
        )
        .secret(),
        OptionSpec::new(
            "username",
            "text",
            "",
            "the user a JWT bearer token is issued for (with private_key)",
        ),
        OptionSpec::new(
            "private_key",
            "PEM text",
            "",
            "the RS256 private key (PEM) of the JWT bearer flow, e.g. file('sf.key')",
        )
        .secret(),
        OptionSpec::new(
            "audience",
            "url",
            "login_url when it is login or test.salesforce.com, else https://login.salesforce.com",
            "the JWT's aud claim",
        ),
        OptionSpec::new(
            "api_version",
            "version",
            "62.0",
            "the REST API version, e.g. '62.0'",
        ),
        OptionSpec::new(
            "api",
            "auto | rest | bulk",
            "auto",
            "'auto': Bulk API 2.0 above bulk_threshold changed records of an operation, else sObject Collections; 'rest' or 'bulk' always",
        ),
        OptionSpec::new(
            "bulk_threshold",
            "integer",
            "2000",
            "changed records of one operation above which 'auto' uses Bulk API 2.0",
        ),
        OptionSpec::new(
            "max_api_usage_pct",
            "number 0-100",
            "80",
            "stop before the org's rolling 24 h API usage passes this percentage of its allocation",
        ),
        OptionSpec::new(
            "poll_interval",
            "duration",
            "1s",
            "first wait between Bulk job status polls; it grows by half each poll, up to 10x",
        ),
        OptionSpec::new(
            "bulk_timeout",
            "duration",
            "4h",
            "longest a Bulk job may take, from its upload to its end, before the run fails (its records are sent again next run)",
        ),
    ];
    options.extend(DEFAULTS.options(Docs {
        batch: "records per sObject Collections call",
        rate_limit: "none; Salesforce limits by daily allocation, see max_api_usage_pct",
    }));
    options
});

/// How sluice gets an access token (§1.1 of the API notes).
#[derive(Debug, Clone)]
pub enum Flow {
    ClientCredentials {
        client_id: Secret,
        client_secret: Secret,
    },
    RefreshToken {
        client_id: Secret,
        client_secret: Option<Secret>,
        refresh_token: Secret,
    },
    JwtBearer {
        client_id: Secret,
        username: String,
        private_key: Secret,
        audience: String,
    },
}

impl Flow {
    pub fn name(&self) -> &'static str {
        match self {
            Flow::ClientCredentials { .. } => "client credentials",
            Flow::RefreshToken { .. } => "refresh token",
            Flow::JwtBearer { .. } => "JWT bearer",
        }
    }
}

/// Which API writes go through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Auto,
    Rest,
    Bulk,
}

/// The typed options of one Salesforce connection.
#[derive(Debug, Clone)]
pub struct SalesforceConfig {
    pub login_url: url::Url,
    pub flow: Flow,
    /// `62.0` (paths say `v62.0`).
    pub api_version: String,
    pub api: Api,
    pub bulk_threshold: usize,
    pub max_api_usage_pct: f64,
    pub poll_interval: Duration,
    /// Longest a Bulk job may take before the run gives up on it.
    pub bulk_timeout: Duration,
    pub http: HttpSettings,
}

impl SalesforceConfig {
    pub fn from_options(options: &Options) -> Result<Self> {
        let raw = options
            .string("login_url")?
            .unwrap_or_else(|| DEFAULT_LOGIN_URL.into());
        let login_url = url::Url::parse(raw.trim_end_matches('/'))
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .ok_or_else(|| {
                invalid(
                    "login_url",
                    format!(
                        "option 'login_url' = '{}' is not an http(s) URL",
                        crate::options::redact_url_password(&raw)
                    ),
                )
            })?;
        let flow = flow(options, &login_url)?;
        let api_version = options
            .string("api_version")?
            .unwrap_or_else(|| DEFAULT_API_VERSION.into());
        let api_version = api_version.trim_start_matches(['v', 'V']).to_string();
        if api_version.parse::<f64>().is_err() {
            return Err(invalid(
                "api_version",
                format!("option 'api_version' = '{api_version}' is not a version such as '62.0'"),
            ));
        }
        let api = match options.string("api")?.as_deref().map(str::to_lowercase) {
            None => Api::Auto,
            Some(a) if a == "auto" => Api::Auto,
            Some(a) if a == "rest" => Api::Rest,
            Some(a) if a == "bulk" => Api::Bulk,
            Some(a) => {
                return Err(invalid(
                    "api",
                    format!("option 'api' = '{a}' is not valid; use 'auto', 'rest' or 'bulk'"),
                ));
            }
        };
        let max_api_usage_pct = options.parse::<f64>("max_api_usage_pct")?.unwrap_or(80.0);
        if !(max_api_usage_pct > 0.0 && max_api_usage_pct <= 100.0) {
            return Err(invalid(
                "max_api_usage_pct",
                format!(
                    "option 'max_api_usage_pct' = {max_api_usage_pct} must be above 0 and at most 100"
                ),
            ));
        }
        let http = HttpSettings::from_options(options, DEFAULTS)?;
        Ok(Self {
            login_url,
            flow,
            api_version,
            api,
            bulk_threshold: positive(options, "bulk_threshold", DEFAULT_BULK_THRESHOLD)?,
            max_api_usage_pct,
            poll_interval: crate::delivery::settings::duration(options, "poll_interval")?
                .unwrap_or(Duration::from_secs(1)),
            bulk_timeout: crate::delivery::settings::duration(options, "bulk_timeout")?
                .unwrap_or(Duration::from_secs(4 * 3600)),
            http,
        })
    }

    /// `{login_url}/services/oauth2/token`.
    pub fn token_url(&self) -> String {
        format!(
            "{}/services/oauth2/token",
            self.login_url.as_str().trim_end_matches('/')
        )
    }

    /// The data API's base path: `/services/data/v62.0`.
    pub fn data_path(&self) -> String {
        format!("/services/data/v{}", self.api_version)
    }
}

/// The flow the given options select: a private key means JWT bearer, a refresh token the
/// refresh token flow, else client credentials.
fn flow(options: &Options, login_url: &url::Url) -> Result<Flow> {
    let client_id = options.secret("client_id")?.ok_or_else(|| {
        invalid(
            "client_id",
            "a salesforce connection needs option 'client_id' (the connected app's consumer key), e.g. client_id env('SF_CLIENT_ID')".into(),
        )
    })?;
    let client_secret = options.secret("client_secret")?;
    if let Some(private_key) = options.secret("private_key")? {
        let username = options.string("username")?.ok_or_else(|| {
            invalid(
                "username",
                "the JWT bearer flow (option 'private_key') needs option 'username': the Salesforce user the token is for".into(),
            )
        })?;
        let audience = match options.string("audience")? {
            Some(a) => a,
            None => {
                let host = login_url.host_str().unwrap_or_default();
                if host == "test.salesforce.com" {
                    "https://test.salesforce.com".into()
                } else {
                    "https://login.salesforce.com".into()
                }
            }
        };
        return Ok(Flow::JwtBearer {
            client_id,
            username,
            private_key,
            audience,
        });
    }
    if let Some(refresh_token) = options.secret("refresh_token")? {
        return Ok(Flow::RefreshToken {
            client_id,
            client_secret,
            refresh_token,
        });
    }
    let client_secret = client_secret.ok_or_else(|| {
        invalid(
            "client_secret",
            "a salesforce connection needs option 'client_secret' (client credentials flow), or 'refresh_token', or 'private_key' with 'username' (JWT bearer flow)".into(),
        )
    })?;
    let host = login_url.host_str().unwrap_or_default();
    if host == "login.salesforce.com" || host == "test.salesforce.com" {
        return Err(invalid(
            "login_url",
            "the client credentials flow needs the org's My Domain as login_url (e.g. 'https://acme.my.salesforce.com'); login.salesforce.com and test.salesforce.com do not issue client credentials tokens".into(),
        ));
    }
    Ok(Flow::ClientCredentials {
        client_id,
        client_secret,
    })
}
