//! Slack's side: the connection every statement shares, the [`HttpService`] that posts one
//! message per request, how Slack's answers read, and alert notices.
//!
//! | answer | meaning |
//! | --- | --- |
//! | webhook: 200 `ok` | posted |
//! | webhook: 400 `invalid_payload`, `no_text`, `invalid_blocks` | that message rejected |
//! | webhook: 403, 404, 410 (`invalid_token`, `no_service`, `channel_not_found`, `channel_is_archived`) | the webhook cannot post: the statement stops |
//! | chat.postMessage: 200 `{"ok":true,"ts":…}` | posted (its `ts` is the record id) |
//! | chat.postMessage: 200 `{"ok":false,"error":"ratelimited"}`, any 429 | waited out (`Retry-After`) and sent again |
//! | chat.postMessage: 200 `{"ok":false}` with `invalid_auth`, `not_authed`, `token_revoked`, `account_inactive`, `missing_scope` | the statement stops |
//! | chat.postMessage: 200 `{"ok":false}` with another error (`channel_not_found`, `not_in_channel`, `is_archived`, `msg_too_long`, `no_text`, …) | that message rejected, with the code |
//! | 5xx, timeouts | sent again |

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::{Value, json};

use super::config::{SlackConfig, Target};
use crate::connectors::{Notice, Notifier};
use crate::delivery::{
    AdaptiveLimiter, Batch, HttpResponse, HttpService, Rejection, ResponseClass,
};
use crate::error::Result;

/// What every statement on one slack connection shares.
#[derive(Debug)]
pub struct SlackConnection {
    pub name: String,
    pub config: SlackConfig,
    pub client: reqwest::Client,
    pub limiter: Arc<AdaptiveLimiter>,
}

/// Bot-token errors that no retry or other message fixes.
const FATAL: &[&str] = &[
    "invalid_auth",
    "not_authed",
    "token_revoked",
    "token_expired",
    "account_inactive",
    "missing_scope",
    "not_allowed_token_type",
    "team_access_not_granted",
];

impl SlackConnection {
    /// The request posting `message` (`text`, optional `channel` and `blocks`).
    fn request(&self, message: &Value) -> reqwest::RequestBuilder {
        let text = message.get("text").cloned().unwrap_or(Value::Null);
        let mut body = json!({ "text": text });
        if let Some(blocks) = message.get("blocks").filter(|b| !b.is_null()) {
            // A column holding blocks as JSON text is sent as the blocks themselves.
            let blocks = match blocks {
                Value::String(s) => serde_json::from_str(s).unwrap_or(Value::String(s.clone())),
                other => other.clone(),
            };
            body["blocks"] = blocks;
        }
        match &self.config.target {
            Target::Webhook(url) => self
                .client
                .post(url.expose())
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(body.to_string()),
            Target::Bot {
                token,
                channel,
                base_url,
            } => {
                let channel = message
                    .get("channel")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .or_else(|| channel.clone());
                body["channel"] = channel.map(Value::String).unwrap_or(Value::Null);
                self.client
                    .post(format!(
                        "{}/chat.postMessage",
                        base_url.as_str().trim_end_matches('/')
                    ))
                    .bearer_auth(token.expose())
                    .header(
                        http::header::CONTENT_TYPE,
                        "application/json; charset=utf-8",
                    )
                    .body(body.to_string())
            }
        }
    }

    /// What an answer to one message means.
    fn classify(&self, response: &HttpResponse) -> ResponseClass {
        let status = response.status.as_u16();
        let text = String::from_utf8_lossy(&response.body);
        let code = text.trim();
        match (&self.config.target, status) {
            (_, 429) => ResponseClass::Retry {
                reason: "429 ratelimited".into(),
                retry_after: None,
                throttled: true,
            },
            (_, 500..=599) => ResponseClass::Retry {
                reason: format!("{status}: {}", crate::connectors::notice::snippet(code)),
                retry_after: None,
                throttled: false,
            },
            (Target::Webhook(_), 200..=299) => ResponseClass::Accepted { ids: vec![None] },
            (Target::Webhook(_), 403 | 404 | 410) => ResponseClass::Fatal(format!(
                "the incoming webhook answered {status} {code}: it cannot post (revoked, or its channel is gone or archived); create a new webhook and set webhook_url"
            )),
            (Target::Webhook(_), _) => ResponseClass::RejectAll(Rejection {
                code: if code.is_empty() || code.len() > 64 {
                    format!("http_{status}")
                } else {
                    code.to_string()
                },
                message: format!(
                    "Slack answered {status} {}",
                    crate::connectors::notice::snippet(code)
                ),
            }),
            (Target::Bot { .. }, 200..=299) => {
                let body: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
                if body["ok"] == Value::Bool(true) {
                    return ResponseClass::Accepted {
                        ids: vec![body["ts"].as_str().map(str::to_string)],
                    };
                }
                let error = body["error"]
                    .as_str()
                    .unwrap_or("unknown_error")
                    .to_string();
                if error == "ratelimited" {
                    ResponseClass::Retry {
                        reason: "ratelimited".into(),
                        retry_after: None,
                        throttled: true,
                    }
                } else if FATAL.contains(&error.as_str()) {
                    ResponseClass::Fatal(format!(
                        "Slack refused the bot token ({error}); check the token option and the app's scopes (chat:write)"
                    ))
                } else {
                    ResponseClass::RejectAll(Rejection {
                        message: format!("chat.postMessage answered {error}"),
                        code: error,
                    })
                }
            }
            (Target::Bot { .. }, 401 | 403) => {
                ResponseClass::Fatal(format!("Slack answered {status}; check the token option"))
            }
            (Target::Bot { .. }, _) => ResponseClass::RejectAll(Rejection {
                code: format!("http_{status}"),
                message: crate::connectors::notice::snippet(code),
            }),
        }
    }
}

/// The delivery engine's view of a slack connection: a batch is one message.
pub(super) struct SlackService(pub Arc<SlackConnection>);

#[async_trait]
impl HttpService for SlackService {
    fn build_request(
        &self,
        _client: &reqwest::Client,
        batch: &Batch,
    ) -> Result<reqwest::RequestBuilder> {
        let message: Value = batch
            .records
            .first()
            .and_then(|r| serde_json::from_slice(&r.json).ok())
            .unwrap_or(Value::Null);
        Ok(self.0.request(&message))
    }

    fn classify(&self, _batch: &Batch, response: &HttpResponse) -> ResponseClass {
        self.0.classify(response)
    }

    fn describe(&self) -> String {
        format!("slack {} ({})", self.0.name, self.0.config.shown())
    }

    fn shown_url(&self, _url: &url::Url) -> String {
        self.0.config.shown()
    }
}

/// Alert notices as Slack messages, through the connection's limiter.
#[derive(Debug)]
pub(super) struct SlackNotifier(pub Arc<SlackConnection>);

#[async_trait]
impl Notifier for SlackNotifier {
    async fn notify(&self, notice: &Notice) -> Result<()> {
        let connection = &self.0;
        let message = json!({ "text": notice.text });
        // Notices share the connection's pace with the messages it posts.
        let _ticket = connection.limiter.acquire().await;
        let sent = crate::connectors::notice::send(
            &format!("slack {} ({})", connection.name, connection.config.shown()),
            connection.config.http.timeout,
            || connection.request(&message),
            |status, headers, body| {
                let response = HttpResponse {
                    status: http::StatusCode::from_u16(status)
                        .unwrap_or(http::StatusCode::BAD_GATEWAY),
                    headers: headers.clone(),
                    body: bytes::Bytes::from(body.to_string()),
                };
                use crate::connectors::notice::Answer;
                match connection.classify(&response) {
                    ResponseClass::Accepted { .. } => Answer::Delivered,
                    ResponseClass::Retry { .. } => Answer::Retry(
                        crate::delivery::retry::retry_after(headers)
                            .unwrap_or(std::time::Duration::from_secs(1)),
                    ),
                    ResponseClass::RejectAll(r) => Answer::Refused(r.message),
                    ResponseClass::Fatal(m) | ResponseClass::Unauthorized(m) => Answer::Refused(m),
                    other => Answer::Refused(format!("{other:?}")),
                }
            },
        )
        .await;
        connection.limiter.finish();
        sent
    }
}
