//! Control-plane calls (describe, lookups, list ids, Bulk job create/poll/results): one request
//! each, outside the batching of data calls, but through the same retry policy, rate limiter and
//! metrics. A connector says how to address and authorize a call and how to read its answers
//! ([`ControlPlane`]); the loop — pacing, retries within the connection's `max_attempts` and
//! `max_retry_time`, one re-authentication on 401 — lives here once.

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderMap, Method};
use std::time::Duration;
use std::time::Instant;

use super::driver::{MAX_ANSWER_BYTES, send};
use super::{AdaptiveLimiter, DeliveryMetrics, HttpResponse, ResponseClass, RetryPolicy, Ticket};
use crate::error::{Error, Failure, Result};

/// One control-plane request.
#[derive(Debug, Clone)]
pub struct Call<'a> {
    pub method: Method,
    /// The path (and query) under the connection's base URL.
    pub path: &'a str,
    /// Content type and body.
    pub body: Option<(&'static str, Bytes)>,
    /// The largest answer read (bigger answers are an error).
    pub max_answer: usize,
    /// Whether the service counts the call against the account's API quota.
    pub counted: bool,
}

impl<'a> Call<'a> {
    pub fn new(method: Method, path: &'a str) -> Self {
        Self {
            method,
            path,
            body: None,
            max_answer: MAX_ANSWER_BYTES,
            counted: true,
        }
    }

    pub fn get(path: &'a str) -> Self {
        Self::new(Method::GET, path)
    }

    /// With a JSON body.
    pub fn json(mut self, body: &serde_json::Value) -> Self {
        self.body = Some((
            "application/json",
            Bytes::from(serde_json::to_vec(body).expect("a JSON value serializes")),
        ));
        self
    }

    /// With a body of `content_type`.
    pub fn body(mut self, content_type: &'static str, body: Bytes) -> Self {
        self.body = Some((content_type, body));
        self
    }

    /// Reads answers of up to `bytes`.
    pub fn max_answer(mut self, bytes: usize) -> Self {
        self.max_answer = bytes;
        self
    }

    /// A call the service does not count against the account's quota.
    pub fn uncounted(mut self) -> Self {
        self.counted = false;
        self
    }

    /// The call for messages: the method and the path without its query (which may hold values).
    pub fn describe(&self) -> String {
        format!(
            "{} {}",
            self.method,
            self.path.split('?').next().unwrap_or(self.path)
        )
    }
}

/// A connector's side of its control-plane calls.
#[async_trait]
pub trait ControlPlane: Send + Sync {
    /// What authorized one attempt (a session), handed back on a 401.
    type Auth: Send + Sync;

    /// The service's name in messages (`HubSpot`, `Salesforce`).
    fn service(&self) -> &str;

    /// The connection's retry policy (`max_attempts`, `max_retry_time`).
    fn policy(&self) -> RetryPolicy;

    /// The connection's rate limiter, which data calls share.
    fn limiter(&self) -> &AdaptiveLimiter;

    /// Called before every attempt; an error stops the call (a spent quota).
    fn check(&self, _call: &Call<'_>) -> Result<()> {
        Ok(())
    }

    /// The request of one attempt, addressed and authorized (the body is added after).
    async fn request(&self, call: &Call<'_>) -> Result<(reqwest::RequestBuilder, Self::Auth)>;

    /// Reads an answer's headers (rate windows, API usage) with the limiter ticket it was sent
    /// under.
    fn observe(&self, ticket: Ticket, headers: &HeaderMap);

    /// How an answer is read: `None` hands it to the caller as it is.
    fn classify(&self, response: &HttpResponse) -> Option<ResponseClass>;

    /// A 401 on `auth`: re-authenticate and try once more, or `Err` to stop.
    async fn reauthenticate(&self, _auth: &Self::Auth, message: &str) -> Result<()> {
        Err(self.error(format!(
            "{} refused the credentials: {message}",
            self.service()
        )))
    }

    /// An error of this connection (it names the connection).
    fn error(&self, message: String) -> Error;

    /// A short summary of an error answer for messages (its status and error code).
    fn summary(&self, response: &HttpResponse) -> String;

    /// The service's own error code in an answer, if it gives one.
    fn code(&self, _response: &HttpResponse) -> Option<String> {
        None
    }

    /// An error of this connection with the facts of the answer that caused it.
    fn failure(&self, facts: Failure, message: String) -> Error {
        self.error(message).with_facts(facts)
    }
}

/// Makes `call` on `plane`: paced by its limiter, retried on what `classify` says may be
/// retried within the connection's retry policy (rate-limited answers do not count as attempts),
/// re-authenticated once on 401. Other answers are the caller's to read (see
/// [`expect_success`]).
///
/// Long because it is the one control-plane retry loop (pacing, the answer's class, waits within
/// max_retry_time, one re-authentication), written once for every connector.
pub async fn call<P: ControlPlane + ?Sized>(
    plane: &P,
    call: Call<'_>,
    metrics: Option<&DeliveryMetrics>,
) -> Result<HttpResponse> {
    let policy = plane.policy();
    let limiter = plane.limiter();
    let started = Instant::now();
    let (mut attempt, mut failures) = (0u32, 0u32);
    let mut reauthenticated = false;
    loop {
        attempt += 1;
        plane.check(&call)?;
        let (mut request, auth) = plane.request(&call).await?;
        let sent = call.body.as_ref().map_or(0, |(_, b)| b.len());
        if let Some((content_type, bytes)) = &call.body {
            request = request
                .header(http::header::CONTENT_TYPE, *content_type)
                .body(bytes.clone());
        }
        let ticket = limiter.acquire().await;
        let t0 = Instant::now();
        let response = send(request, call.max_answer).await;
        limiter.finish();
        if let Some(m) = metrics {
            m.record_request(sent, t0.elapsed());
        }
        let class = match &response {
            Ok(r) => {
                plane.observe(ticket, &r.headers);
                plane.classify(r)
            }
            Err(e) => Some(ResponseClass::Retry {
                reason: e.reason(),
                retry_after: None,
                throttled: false,
            }),
        };
        let facts = || Failure {
            status: response.as_ref().ok().map(|r| r.status.as_u16()),
            code: response.as_ref().ok().and_then(|r| plane.code(r)),
            ..Default::default()
        };
        match class {
            Some(ResponseClass::Retry {
                reason,
                retry_after,
                throttled,
            }) => {
                let left = policy.max_elapsed.saturating_sub(started.elapsed());
                if let Some(wait) = retry_after.filter(|w| *w > left) {
                    return Err(plane.failure(facts(), format!(
                        "{}: {reason}; {} asks to wait {:.0}s, more than the {:.0}s left of max_retry_time",
                        call.describe(),
                        plane.service(),
                        wait.as_secs_f64(),
                        left.as_secs_f64()
                    )));
                }
                failures += u32::from(!throttled);
                if policy.exhausted(failures, started) {
                    return Err(plane.failure(facts(), format!(
                        "{} gave up after {attempt} attempts over {:.1}s (max_attempts {}, max_retry_time {:?}): {reason}",
                        call.describe(),
                        started.elapsed().as_secs_f64(),
                        policy.max_attempts,
                        policy.max_elapsed
                    )));
                }
                if let Some(m) = metrics {
                    DeliveryMetrics::add(&m.retries, 1);
                    if throttled {
                        DeliveryMetrics::add(&m.throttled, 1);
                    }
                }
                if throttled {
                    limiter.on_throttle(retry_after, true);
                } else {
                    let wait: Duration = policy.wait(failures, retry_after, started);
                    tokio::time::sleep(wait).await;
                }
            }
            Some(ResponseClass::Unauthorized(message)) => {
                if reauthenticated {
                    return Err(plane.failure(
                        facts(),
                        format!(
                            "{} rejected fresh credentials ({message}); check the user's access",
                            plane.service()
                        ),
                    ));
                }
                reauthenticated = true;
                plane
                    .reauthenticate(&auth, &message)
                    .await
                    .map_err(|e| e.with_facts(facts()))?;
            }
            Some(ResponseClass::Fatal(message)) => return Err(plane.failure(facts(), message)),
            _ => return response.map_err(|e| plane.error(e.reason())),
        }
    }
}

/// `Ok` for a 2xx answer; otherwise `what` failed, with the answer's summary.
pub fn expect_success<P: ControlPlane + ?Sized>(
    plane: &P,
    response: &HttpResponse,
    what: &str,
) -> Result<()> {
    if response.status.is_success() {
        return Ok(());
    }
    Err(plane.failure(
        Failure {
            status: Some(response.status.as_u16()),
            code: plane.code(response),
            ..Default::default()
        },
        format!("{what} failed: {}", plane.summary(response)),
    ))
}
