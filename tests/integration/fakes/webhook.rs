//! A scriptable fake webhook receiver on 127.0.0.1 (ephemeral port), for tests and benches.
//!
//! It behaves like a careful receiver: it dedups requests by `Idempotency-Key` (a repeated key is
//! answered as before and its records are not stored again), verifies `X-Sluice-Signature` when
//! given the secret, and answers per-record errors in the webhook contract's shape. Faults are
//! scripted: latency, a queue of one-off faults (status codes with `Retry-After`, timeouts,
//! dropped connections before or after processing, malformed bodies), records that are always
//! rejected or transiently failing, and a real rolling-window rate limit with
//! `X-RateLimit-*` headers.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, KeyInit, Mac};
use serde::Deserialize;
use serde::de::IgnoredAny;

/// A one-off fault, used by the next request that arrives.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Answer with this status (and `Retry-After` seconds, if given) without processing.
    Status(u16, Option<f64>),
    /// Sleep this long before answering normally (longer than the client's timeout = a timeout;
    /// the request is not processed).
    Hang(Duration),
    /// Close the connection without answering, before processing.
    DropBefore,
    /// Process the request (store its records), then close the connection without answering:
    /// the client cannot know it succeeded and must retry with the same idempotency key.
    DropAfter,
    /// Answer 500 with a body that is not JSON.
    Malformed500,
    /// Process the request, answer 200 with a body that is not JSON.
    Malformed200,
}

/// How the fake behaves.
#[derive(Debug, Default)]
pub struct Script {
    pub latency: Duration,
    pub faults: VecDeque<Fault>,
    /// Records whose `field` lacks an '@' are rejected with `invalid_email`.
    pub reject_invalid: Option<String>,
    /// Records whose `field` value is in this map fail transiently (`retryable`) that many times.
    pub flaky: Option<(String, HashMap<String, u32>)>,
    /// Rolling-window limit: at most `.0` requests per `.1`.
    pub limit: Option<(usize, Duration)>,
    /// Send `X-RateLimit-Remaining` / `-Reset` with every answer (when limited).
    pub rate_headers: bool,
    /// Verify `X-Sluice-Signature` with this secret; a wrong signature gets 401.
    pub secret: Option<String>,
    /// Answer every request 401 (bad credentials).
    pub unauthorized: bool,
    /// Only count records (benches): no per-record storage.
    pub count_only: bool,
}

/// One request as the fake saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub at: Instant,
    pub idempotency_key: String,
    pub status: u16,
    pub records: usize,
    pub object: Option<String>,
    pub signature_ok: Option<bool>,
    pub method: String,
    pub body_bytes: usize,
    pub authorization: Option<String>,
    /// The `id` field of each record (for "which records were resent").
    pub record_ids: Vec<String>,
    /// The envelope's operation (upsert, insert, update, delete).
    pub operation: Option<String>,
    /// The field names each record carried, e.g. `email,id` (sorted, de-duplicated).
    pub fields: String,
}

#[derive(Debug, Default)]
pub struct Observed {
    pub requests: Vec<Seen>,
    /// Records stored, deduplicated by idempotency key: what a careful receiver ends up with.
    pub records: Vec<serde_json::Value>,
    pub record_count: u64,
    pub processed_keys: HashSet<String>,
    /// Requests whose idempotency key had already been processed.
    pub duplicates: u64,
    pub throttled: u64,
    /// What a receiver applying each operation to a store keyed by `id` ends up holding:
    /// upsert and update merge fields, insert creates, delete removes. Records without an `id`
    /// are events, appended to `events`.
    pub state:
        std::collections::BTreeMap<(String, String), serde_json::Map<String, serde_json::Value>>,
    pub events: Vec<serde_json::Value>,
    window: VecDeque<Instant>,
}

#[derive(Default)]
struct Shared {
    script: Mutex<Script>,
    observed: Mutex<Observed>,
}

/// A running fake receiver; stops when dropped.
pub struct FakeWebhook {
    pub url: String,
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeWebhook {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeWebhook {
    /// Starts a fake on an ephemeral port.
    pub async fn start(script: Script) -> Self {
        let shared = Arc::new(Shared {
            script: Mutex::new(script),
            observed: Mutex::default(),
        });
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
            url: format!("http://{addr}/hook"),
            addr,
            shared,
            server,
        }
    }

    /// Changes the script while running.
    pub fn script(&self, f: impl FnOnce(&mut Script)) {
        f(&mut self.shared.script.lock().unwrap());
    }

    /// Reads what the fake saw.
    pub fn observed<T>(&self, f: impl FnOnce(&Observed) -> T) -> T {
        f(&self.shared.observed.lock().unwrap())
    }

    /// The largest number of requests that arrived within any `window`.
    /// The materialized store: (object, id, record as JSON with sorted keys).
    pub fn state_rows(&self) -> Vec<(String, String, String)> {
        self.observed(|o| {
            o.state
                .iter()
                .map(|((object, id), v)| {
                    (
                        object.clone(),
                        id.clone(),
                        serde_json::Value::Object(v.clone()).to_string(),
                    )
                })
                .collect()
        })
    }

    pub fn max_requests_in(&self, window: Duration) -> usize {
        self.observed(|o| {
            let times: Vec<Instant> = o.requests.iter().map(|r| r.at).collect();
            let mut best = 0;
            let mut j = 0;
            for i in 0..times.len() {
                while times[i].duration_since(times[j]) >= window {
                    j += 1;
                }
                best = best.max(i - j + 1);
            }
            best
        })
    }
}

#[derive(Deserialize)]
struct Envelope {
    #[serde(default)]
    object: Option<String>,
    #[serde(default)]
    operation: Option<String>,
    records: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
struct CountOnly {
    records: Vec<IgnoredAny>,
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: axum::http::Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let arrived = Instant::now();
    let peek = serde_json::from_slice::<Envelope>(&body).ok();
    let operation = peek.as_ref().and_then(|e| e.operation.clone());
    let fields = peek
        .as_ref()
        .map(|e| {
            let mut names: Vec<String> = e
                .records
                .iter()
                .filter_map(|r| r.as_object())
                .flat_map(|o| o.keys().cloned())
                .collect();
            names.sort();
            names.dedup();
            names.join(",")
        })
        .unwrap_or_default();
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let (latency, fault, limit, rate_headers, secret, unauthorized, count_only) = {
        let mut s = shared.script.lock().unwrap();
        (
            s.latency,
            s.faults.pop_front(),
            s.limit,
            s.rate_headers,
            s.secret.clone(),
            s.unauthorized,
            s.count_only,
        )
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let log = |status: u16,
               records: usize,
               object: Option<String>,
               sig: Option<bool>,
               first: Vec<String>| {
        shared.observed.lock().unwrap().requests.push(Seen {
            at: arrived,
            idempotency_key: key.clone(),
            status,
            records,
            object,
            signature_ok: sig,
            record_ids: first,
            operation: operation.clone(),
            fields: fields.clone(),
            method: method.to_string(),
            body_bytes: body.len(),
            authorization: headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
        });
    };

    // The rolling window: every request that arrives counts.
    if let Some((max, window)) = limit {
        let mut o = shared.observed.lock().unwrap();
        while o
            .window
            .front()
            .is_some_and(|t| arrived.duration_since(*t) >= window)
        {
            o.window.pop_front();
        }
        if o.window.len() >= max {
            o.throttled += 1;
            let wait = window.saturating_sub(arrived.duration_since(o.window[0]));
            drop(o);
            log(429, 0, None, None, vec![]);
            let mut h = HeaderMap::new();
            h.insert(
                "retry-after",
                format!("{:.3}", wait.as_secs_f64()).parse().unwrap(),
            );
            if rate_headers {
                h.insert("x-ratelimit-limit", max.to_string().parse().unwrap());
                h.insert("x-ratelimit-remaining", "0".parse().unwrap());
                h.insert(
                    "x-ratelimit-reset",
                    format!("{:.3}", wait.as_secs_f64()).parse().unwrap(),
                );
            }
            return (
                StatusCode::TOO_MANY_REQUESTS,
                h,
                r#"{"error":"rate limited"}"#,
            )
                .into_response();
        }
        o.window.push_back(arrived);
    }
    let rate_header_map = |shared: &Shared| {
        let mut h = HeaderMap::new();
        if let (Some((max, window)), true) = (limit, rate_headers) {
            let o = shared.observed.lock().unwrap();
            let remaining = max.saturating_sub(o.window.len());
            let reset = o
                .window
                .front()
                .map(|t| window.saturating_sub(Instant::now().duration_since(*t)))
                .unwrap_or(window);
            h.insert("x-ratelimit-limit", max.to_string().parse().unwrap());
            h.insert(
                "x-ratelimit-remaining",
                remaining.to_string().parse().unwrap(),
            );
            h.insert(
                "x-ratelimit-reset",
                format!("{:.3}", reset.as_secs_f64()).parse().unwrap(),
            );
        }
        h
    };

    let signature_ok = secret
        .as_ref()
        .map(|secret| verify(secret, &headers, &body));
    if unauthorized || signature_ok == Some(false) {
        log(401, 0, None, signature_ok, vec![]);
        return (
            StatusCode::UNAUTHORIZED,
            r#"{"error":"invalid credentials"}"#,
        )
            .into_response();
    }

    match &fault {
        Some(Fault::Status(code, retry_after)) => {
            log(*code, 0, None, signature_ok, vec![]);
            let mut h = rate_header_map(&shared);
            if let Some(secs) = retry_after {
                h.insert("retry-after", format!("{secs}").parse().unwrap());
            }
            let status = StatusCode::from_u16(*code).unwrap();
            return (status, h, format!(r#"{{"error":"scripted {code}"}}"#)).into_response();
        }
        Some(Fault::Hang(d)) => {
            tokio::time::sleep(*d).await;
            log(0, 0, None, signature_ok, vec![]);
            return StatusCode::GATEWAY_TIMEOUT.into_response();
        }
        Some(Fault::DropBefore) => {
            log(0, 0, None, signature_ok, vec![]);
            std::panic::resume_unwind(Box::new("dropping the connection"));
        }
        Some(Fault::Malformed500) => {
            log(500, 0, None, signature_ok, vec![]);
            return (StatusCode::INTERNAL_SERVER_ERROR, "<html>oops").into_response();
        }
        _ => {}
    }

    // Process: dedup by idempotency key, then apply per-record rules.
    if count_only {
        let n = serde_json::from_slice::<CountOnly>(&body)
            .map(|b| b.records.len())
            .unwrap_or(0);
        let mut o = shared.observed.lock().unwrap();
        if !key.is_empty() && !o.processed_keys.insert(key.clone()) {
            o.duplicates += 1;
        } else {
            o.record_count += n as u64;
        }
        drop(o);
        log(200, n, None, signature_ok, vec![]);
        return (StatusCode::OK, rate_header_map(&shared), "").into_response();
    }
    let Ok(envelope) = serde_json::from_slice::<Envelope>(&body) else {
        log(400, 0, None, signature_ok, vec![]);
        return (StatusCode::BAD_REQUEST, "body is not a webhook envelope").into_response();
    };
    let first: Vec<String> = envelope
        .records
        .iter()
        .map(|r| r.get("id").map(|v| v.to_string()).unwrap_or_default())
        .collect();
    let mut errors = vec![];
    let mut keep = vec![];
    {
        let mut s = shared.script.lock().unwrap();
        for (i, record) in envelope.records.iter().enumerate() {
            // (A value given is checked: a delete, or an update that leaves it, carries none.)
            if let Some(field) = &s.reject_invalid
                && let Some(value) = record.get(field)
            {
                let value = value.as_str().unwrap_or("");
                if !value.contains('@') {
                    errors.push(serde_json::json!({"index": i, "code": "invalid_email",
                        "message": format!("'{value}' is not an email address")}));
                    continue;
                }
            }
            if let Some((field, flaky)) = &mut s.flaky {
                let value = record
                    .get(field.as_str())
                    .map(|v| v.to_string())
                    .unwrap_or_default();
                if let Some(left) = flaky.get_mut(&value)
                    && *left > 0
                {
                    *left -= 1;
                    errors.push(serde_json::json!({"index": i, "code": "locked",
                        "message": "row locked, try again", "retryable": true}));
                    continue;
                }
            }
            keep.push((i, record.clone()));
        }
    }
    {
        let mut o = shared.observed.lock().unwrap();
        if !key.is_empty() && !o.processed_keys.insert(key.clone()) {
            o.duplicates += 1;
        } else {
            let op = envelope.operation.as_deref().unwrap_or("upsert");
            let mut applied = vec![];
            for (i, record) in keep {
                let id = record.get("id").map(|v| match v {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                });
                let Some(id) = id.map(|id| (envelope.object.clone().unwrap_or_default(), id))
                else {
                    o.events.push(record.clone());
                    applied.push(record);
                    continue;
                };
                let fields = record.as_object().cloned().unwrap_or_default();
                let exists = o.state.contains_key(&id);
                match op {
                    "insert" if exists => {
                        errors.push(serde_json::json!({"index": i, "code": "already_exists",
                            "message": format!("record {} already exists", id.1)}));
                        continue;
                    }
                    "update" if !exists => {
                        errors.push(serde_json::json!({"index": i, "code": "not_found",
                            "message": format!("record {} does not exist", id.1)}));
                        continue;
                    }
                    "delete" => {
                        o.state.remove(&id);
                    }
                    _ => o.state.entry(id).or_default().extend(fields),
                }
                applied.push(record);
            }
            o.record_count += applied.len() as u64;
            o.records.extend(applied);
        }
    }
    log(
        200,
        envelope.records.len(),
        envelope.object.clone(),
        signature_ok,
        first,
    );
    match fault {
        Some(Fault::DropAfter) => std::panic::resume_unwind(Box::new("dropping the connection")),
        Some(Fault::Malformed200) => return (StatusCode::OK, "not json {").into_response(),
        _ => {}
    }
    let body = if errors.is_empty() {
        String::new()
    } else {
        serde_json::json!({ "errors": errors }).to_string()
    };
    (StatusCode::OK, rate_header_map(&shared), body).into_response()
}

/// Checks `X-Sluice-Signature: t=…,v1=…` against HMAC-SHA256(secret, "t.body").
fn verify(secret: &str, headers: &HeaderMap, body: &[u8]) -> bool {
    let Some(header) = headers
        .get("x-sluice-signature")
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = Some(v),
            Some(("v1", v)) => v1 = Some(v),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return false;
    };
    let Ok(expected) = hex::decode(v1) else {
        return false;
    };
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(t.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&expected).is_ok()
}
