//! Options of the `slack` connection: an incoming webhook, or a bot token and a channel.

use std::sync::LazyLock;
use std::time::Duration;

use crate::delivery::settings::{Defaults, Docs, HttpSettings, invalid};
use crate::error::Result;
use crate::options::{OptionSpec, Options, Secret};

/// Slack's documented pace: about one message per second per channel (and per webhook).
pub const DEFAULT_RATE: f64 = 1.0;

/// The defaults of the shared delivery options: one message per request, one at a time.
pub const DEFAULTS: Defaults = Defaults {
    batch_size: 1,
    max_batch_size: 1,
    concurrency: 1,
    rate_limit: Some(DEFAULT_RATE),
    timeout: Duration::from_secs(15),
};

/// The options `CREATE CONNECTION … TYPE slack` accepts.
pub static OPTIONS: LazyLock<Vec<OptionSpec>> = LazyLock::new(|| {
    let mut options = vec![
        OptionSpec::new(
            "webhook_url",
            "url",
            "",
            "an incoming webhook (https://hooks.slack.com/services/…), which posts to its own channel; or use token",
        )
        .secret(),
        OptionSpec::new(
            "token",
            "text",
            "",
            "a bot token (xoxb-…) for chat.postMessage; messages go to `channel`, or to each row's channel column",
        )
        .secret(),
        OptionSpec::new(
            "channel",
            "channel id",
            "",
            "with token: the channel messages and alert notices go to (e.g. C0123456)",
        ),
        OptionSpec::new(
            "base_url",
            "url",
            "https://slack.com/api",
            "the Web API's address (for tests)",
        ),
    ];
    options.extend(DEFAULTS.options(Docs {
        batch: "messages per request (Slack takes one)",
        rate_limit: "1 message per second",
    }));
    options
});

/// Where messages go.
#[derive(Debug, Clone)]
pub enum Target {
    /// An incoming webhook: its URL is the credential.
    Webhook(Secret),
    /// `chat.postMessage` with a bot token.
    Bot {
        token: Secret,
        channel: Option<String>,
        base_url: url::Url,
    },
}

/// The typed options of one slack connection.
#[derive(Debug, Clone)]
pub struct SlackConfig {
    pub target: Target,
    pub http: HttpSettings,
}

impl SlackConfig {
    pub fn from_options(options: &Options) -> Result<Self> {
        let webhook = options.secret("webhook_url")?;
        let token = options.secret("token")?;
        let target = match (webhook, token) {
            (Some(url), None) => {
                let parsed = url::Url::parse(url.expose())
                    .ok()
                    .filter(|u| matches!(u.scheme(), "http" | "https"));
                if parsed.is_none() {
                    return Err(invalid(
                        "webhook_url",
                        "option 'webhook_url' is not an http(s) URL".into(),
                    ));
                }
                Target::Webhook(url)
            }
            (None, Some(token)) => {
                let raw = options
                    .string("base_url")?
                    .unwrap_or_else(|| "https://slack.com/api".into());
                let base_url = url::Url::parse(raw.trim_end_matches('/'))
                    .ok()
                    .filter(|u| matches!(u.scheme(), "http" | "https"))
                    .ok_or_else(|| {
                        invalid(
                            "base_url",
                            format!("option 'base_url' = '{raw}' is not an http(s) URL"),
                        )
                    })?;
                Target::Bot {
                    token,
                    channel: options.string("channel")?,
                    base_url,
                }
            }
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "token",
                    "set webhook_url or token, not both".into(),
                ));
            }
            (None, None) => {
                return Err(invalid(
                    "webhook_url",
                    "a slack connection needs webhook_url (an incoming webhook) or token (a bot token, with channel)".into(),
                ));
            }
        };
        Ok(Self {
            target,
            http: HttpSettings::from_options(options, DEFAULTS)?,
        })
    }

    /// Where messages go, as it may be shown (never the webhook's path or the token).
    pub fn shown(&self) -> String {
        match &self.target {
            Target::Webhook(url) => url::Url::parse(url.expose())
                .map(|u| {
                    format!(
                        "incoming webhook at {}://{}",
                        u.scheme(),
                        u.host_str().unwrap_or("")
                    )
                })
                .unwrap_or_else(|_| "incoming webhook".into()),
            Target::Bot {
                channel, base_url, ..
            } => format!(
                "chat.postMessage at {}{}",
                base_url,
                channel
                    .as_deref()
                    .map(|c| format!(" to {c}"))
                    .unwrap_or_default()
            ),
        }
    }
}
