//! A fake Slack (../shared/api/destinations.md §5): incoming webhooks at
//! `/services/T…/B…/secret` (200 `ok`, 400 `no_text` / `invalid_payload`, 404 `no_service`) and
//! `chat.postMessage` at `/api/chat.postMessage` with a bot token (HTTP 200 and `{"ok":false,
//! "error":…}` for logical errors; `is_archived` for channel `C_ARCHIVED`, `channel_not_found`
//! for `C_GONE`). Both enforce about one message per second per channel: a message less than
//! 900 ms after the previous one to the same channel gets 429 with `Retry-After: 1`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// The token `chat.postMessage` accepts.
pub const BOT_TOKEN: &str = "xoxb-fake-7c1d";
/// The path part of the incoming webhook's URL (its secret).
pub const WEBHOOK_PATH: &str = "/services/T000/B000/s3cretHookPath";

/// A message Slack accepted.
#[derive(Debug, Clone)]
pub struct Posted {
    pub at: Instant,
    pub channel: String,
    pub text: String,
}

#[derive(Default)]
pub struct Seen {
    pub posted: Vec<Posted>,
    pub throttled: u64,
    pub refused: Vec<String>,
}

#[derive(Default)]
struct Shared {
    seen: Mutex<Seen>,
    last: Mutex<HashMap<String, Instant>>,
}

/// A running fake Slack; stops when dropped.
pub struct FakeSlack {
    /// The incoming webhook's URL.
    pub webhook_url: String,
    /// The Web API's base (`…/api`).
    pub api_url: String,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeSlack {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeSlack {
    pub async fn start() -> Self {
        let shared = Arc::new(Shared::default());
        let app = Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&shared));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.ok();
        });
        Self {
            webhook_url: format!("http://{addr}{WEBHOOK_PATH}"),
            api_url: format!("http://{addr}/api"),
            shared,
            server,
        }
    }

    pub fn seen<T>(&self, f: impl FnOnce(&Seen) -> T) -> T {
        f(&self.shared.seen.lock().unwrap())
    }

    pub fn texts(&self) -> Vec<String> {
        self.seen(|s| s.posted.iter().map(|p| p.text.clone()).collect())
    }
}

/// One message per second per channel (with a little slack for timers).
fn paced(shared: &Shared, channel: &str) -> bool {
    let mut last = shared.last.lock().unwrap();
    let now = Instant::now();
    if let Some(prev) = last.get(channel)
        && now.duration_since(*prev) < Duration::from_millis(900)
    {
        shared.seen.lock().unwrap().throttled += 1;
        return false;
    }
    last.insert(channel.to_string(), now);
    true
}

fn throttled(bot: bool) -> Response {
    let mut response = if bot {
        (
            StatusCode::TOO_MANY_REQUESTS,
            axum::Json(json!({"ok": false, "error": "ratelimited"})),
        )
            .into_response()
    } else {
        (StatusCode::TOO_MANY_REQUESTS, "rate_limited").into_response()
    };
    response
        .headers_mut()
        .insert("Retry-After", "1".parse().unwrap());
    response
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let message: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(_) => return (StatusCode::BAD_REQUEST, "invalid_payload").into_response(),
    };
    let text = message["text"].as_str().unwrap_or("").to_string();
    let refuse = |code: &str| {
        shared.seen.lock().unwrap().refused.push(code.to_string());
    };
    match uri.path() {
        WEBHOOK_PATH => {
            if text.is_empty() && message.get("blocks").is_none() {
                refuse("no_text");
                return (StatusCode::BAD_REQUEST, "no_text").into_response();
            }
            if !paced(&shared, "webhook") {
                return throttled(false);
            }
            shared.seen.lock().unwrap().posted.push(Posted {
                at: Instant::now(),
                channel: "webhook".into(),
                text,
            });
            (StatusCode::OK, "ok").into_response()
        }
        "/api/chat.postMessage" => {
            let auth = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if auth != format!("Bearer {BOT_TOKEN}") {
                return axum::Json(json!({"ok": false, "error": "invalid_auth"})).into_response();
            }
            let channel = message["channel"].as_str().unwrap_or("").to_string();
            let error = match channel.as_str() {
                "" | "C_GONE" => Some("channel_not_found"),
                "C_ARCHIVED" => Some("is_archived"),
                _ if text.is_empty() => Some("no_text"),
                _ if text.chars().count() > 40_000 => Some("msg_too_long"),
                _ => None,
            };
            if let Some(error) = error {
                refuse(error);
                return axum::Json(json!({"ok": false, "error": error})).into_response();
            }
            if !paced(&shared, &channel) {
                return throttled(true);
            }
            let mut seen = shared.seen.lock().unwrap();
            let ts = format!("1700000000.{:06}", seen.posted.len() + 1);
            seen.posted.push(Posted {
                at: Instant::now(),
                channel: channel.clone(),
                text,
            });
            axum::Json(json!({"ok": true, "channel": channel, "ts": ts, "message": {"text": message["text"]}}))
                .into_response()
        }
        _ => (StatusCode::NOT_FOUND, "no_service").into_response(),
    }
}
