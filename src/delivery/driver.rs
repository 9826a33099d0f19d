//! The delivery driver: turns a stream of rows into batches, sends them with bounded
//! concurrency through the connection's limiter, retries what may be retried, and returns the
//! outcome of every record. A rejected record is never dropped: it comes back as [`Rejected`].

use std::sync::Arc;

use bytes::Bytes;
use datafusion::physical_plan::SendableRecordBatchStream;
use futures::StreamExt;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::batch::{Batch, Batcher};
use super::encode::encode_records;
use super::limiter::AdaptiveLimiter;
use super::metrics::DeliveryMetrics;
use super::retry::{RetryPolicy, rate_window, retry_after};
use super::{HttpResponse, HttpService, Rejection, ResponseClass};
use crate::error::{Error, Result};

/// A record the destination refused, kept whole so it can be reported and sent again.
#[derive(Debug, Clone)]
pub struct Rejected {
    pub key: Option<String>,
    pub code: String,
    pub message: String,
    /// The record as it was sent.
    pub payload: Bytes,
    /// How many requests carried it.
    pub attempts: u32,
}

/// What happened to the records of a delivery.
#[derive(Debug, Default)]
pub struct DeliveryOutcome {
    pub accepted: u64,
    pub rejected: Vec<Rejected>,
}

impl DeliveryOutcome {
    fn merge(&mut self, other: DeliveryOutcome) {
        self.accepted += other.accepted;
        self.rejected.extend(other.rejected);
    }
}

/// Sends batches for one statement. Cheap to clone; clones share the limiter and metrics.
pub struct Driver<S> {
    service: Arc<S>,
    client: reqwest::Client,
    limiter: Arc<AdaptiveLimiter>,
    policy: RetryPolicy,
    metrics: Arc<DeliveryMetrics>,
}

impl<S> Clone for Driver<S> {
    fn clone(&self) -> Self {
        Self {
            service: Arc::clone(&self.service),
            client: self.client.clone(),
            limiter: Arc::clone(&self.limiter),
            policy: self.policy,
            metrics: Arc::clone(&self.metrics),
        }
    }
}

impl<S: HttpService> Driver<S> {
    pub fn new(
        service: Arc<S>,
        client: reqwest::Client,
        limiter: Arc<AdaptiveLimiter>,
        policy: RetryPolicy,
        metrics: Arc<DeliveryMetrics>,
    ) -> Self {
        Self {
            service,
            client,
            limiter,
            policy,
            metrics,
        }
    }

    /// Encodes `input` into records (`key`: the column identifying a record), batches them and
    /// delivers with at most `concurrency` requests in flight. Stops at the first fatal error.
    pub async fn deliver_stream(
        &self,
        mut input: SendableRecordBatchStream,
        key: Option<usize>,
        mut batcher: Batcher,
        concurrency: usize,
    ) -> Result<DeliveryOutcome> {
        let concurrency = concurrency.max(1);
        let mut total = DeliveryOutcome::default();
        let mut tasks: JoinSet<Result<DeliveryOutcome>> = JoinSet::new();
        while let Some(rows) = input.next().await {
            for record in encode_records(&rows?, key)? {
                if let Some(batch) = batcher.push(record) {
                    while tasks.len() >= concurrency {
                        total.merge(join(tasks.join_next().await)?);
                    }
                    let driver = self.clone();
                    tasks.spawn(async move { driver.deliver(batch).await });
                }
            }
        }
        if let Some(batch) = batcher.finish() {
            let driver = self.clone();
            tasks.spawn(async move { driver.deliver(batch).await });
        }
        while let Some(done) = tasks.join_next().await {
            total.merge(join(Some(done))?);
        }
        Ok(total)
    }

    /// Delivers one batch: retries the whole request or only its failed records as the
    /// destination says, within the retry policy.
    pub async fn deliver(&self, batch: Batch) -> Result<DeliveryOutcome> {
        let started = Instant::now();
        let mut outcome = DeliveryOutcome::default();
        let mut pending = batch;
        let mut attempts: u32 = 0; // requests that carried the pending records
        let mut failures: u32 = 0; // failed attempts (rate limiting excluded)
        let mut refreshed = false;
        let mut part = 0;
        loop {
            attempts += 1;
            let (class, had_window) = self.send(&pending).await?;
            let wait = match class {
                ResponseClass::Accepted { .. } => {
                    self.limiter.on_success();
                    self.accept(&mut outcome, pending.records.len());
                    return Ok(outcome);
                }
                ResponseClass::Partial { retry, rejected } => {
                    self.limiter.on_success();
                    let settled = retry.len() + rejected.len();
                    self.accept(&mut outcome, pending.records.len().saturating_sub(settled));
                    for (i, why) in rejected {
                        self.reject(&mut outcome, &pending, i, why, attempts);
                    }
                    if retry.is_empty() {
                        return Ok(outcome);
                    }
                    failures += 1;
                    if failures >= self.policy.max_attempts
                        || started.elapsed() >= self.policy.max_elapsed
                    {
                        // Records the destination keeps failing transiently end as rejects
                        // (kept and reported), not as a failed statement.
                        let why = Rejection {
                            code: "retries_exhausted".into(),
                            message: format!(
                                "still failing transiently after {attempts} attempts over {:.1}s",
                                started.elapsed().as_secs_f64()
                            ),
                        };
                        for i in retry {
                            self.reject(&mut outcome, &pending, i, why.clone(), attempts);
                        }
                        return Ok(outcome);
                    }
                    part += 1;
                    pending = pending.subset(&retry, part);
                    Some(self.policy.backoff(failures))
                }
                ResponseClass::RejectAll(why) => {
                    self.limiter.on_success();
                    for i in 0..pending.records.len() {
                        self.reject(&mut outcome, &pending, i, why.clone(), attempts);
                    }
                    return Ok(outcome);
                }
                ResponseClass::Retry {
                    reason,
                    retry_after,
                    throttled,
                } => {
                    if throttled {
                        DeliveryMetrics::add(&self.metrics.throttled, 1);
                        self.limiter.on_throttle(retry_after, had_window);
                        tracing::warn!(
                            retry_in_ms = retry_after.map(|d| d.as_millis() as u64),
                            batch = pending.seq,
                            "Rate limited; backing off."
                        );
                    } else {
                        failures += 1;
                        tracing::debug!(batch = pending.seq, reason = %reason, "Retrying.");
                    }
                    if failures >= self.policy.max_attempts {
                        return Err(self.gave_up(attempts, started, &reason));
                    }
                    if started.elapsed() >= self.policy.max_elapsed {
                        return Err(self.gave_up(attempts, started, &reason));
                    }
                    // A throttled request waits in the limiter (which honours Retry-After).
                    (!throttled)
                        .then(|| retry_after.unwrap_or_else(|| self.policy.backoff(failures)))
                }
                ResponseClass::Unauthorized(message) => {
                    if !refreshed && self.service.refresh_credentials().await? {
                        refreshed = true;
                        None
                    } else {
                        return Err(Error::Write {
                            message: format!(
                                "{}: the destination rejected the credentials (401: {message}); check the token or secret, nothing more will be sent",
                                self.service.describe()
                            ),
                        });
                    }
                }
                ResponseClass::Fatal(message) => {
                    return Err(Error::Write {
                        message: format!("{}: {message}", self.service.describe()),
                    });
                }
            };
            DeliveryMetrics::add(&self.metrics.retries, 1);
            if let Some(wait) = wait {
                let left = self.policy.max_elapsed.saturating_sub(started.elapsed());
                tokio::time::sleep(wait.min(left)).await;
            }
        }
    }

    /// One request. Transport errors become retriable classes.
    async fn send(&self, batch: &Batch) -> Result<(ResponseClass, bool)> {
        let ticket = self.limiter.acquire().await;
        let request = self.service.build_request(&self.client, batch);
        let request = match request {
            Ok(r) => r,
            Err(e) => {
                self.limiter.finish();
                return Err(e);
            }
        };
        let t0 = Instant::now();
        let result = request.send().await;
        let response = match result {
            Ok(r) => {
                let status = r.status();
                let headers = r.headers().clone();
                r.bytes().await.map(|body| HttpResponse {
                    status,
                    headers,
                    body,
                })
            }
            Err(e) => Err(e),
        };
        self.metrics.record_request(batch.bytes, t0.elapsed());
        let out = match response {
            Ok(response) => {
                let window = rate_window(&response.headers);
                if let Some(w) = window {
                    self.limiter.observe_window(ticket, w);
                }
                let mut class = self.service.classify(batch, &response);
                if let ResponseClass::Retry {
                    retry_after: ra, ..
                } = &mut class
                    && ra.is_none()
                {
                    *ra = retry_after(&response.headers);
                }
                (class, window.is_some())
            }
            Err(e) => {
                let e = e.without_url();
                let reason = if e.is_timeout() {
                    format!("timed out: {e}")
                } else if e.is_connect() {
                    format!("cannot connect: {}", root_cause(&e))
                } else {
                    format!("request failed: {}", root_cause(&e))
                };
                (
                    ResponseClass::Retry {
                        reason,
                        retry_after: None,
                        throttled: false,
                    },
                    false,
                )
            }
        };
        self.limiter.finish();
        Ok(out)
    }

    fn accept(&self, outcome: &mut DeliveryOutcome, n: usize) {
        outcome.accepted += n as u64;
        DeliveryMetrics::add(&self.metrics.accepted, n as u64);
    }

    fn reject(
        &self,
        outcome: &mut DeliveryOutcome,
        batch: &Batch,
        index: usize,
        why: Rejection,
        attempts: u32,
    ) {
        let Some(record) = batch.records.get(index) else {
            return;
        };
        DeliveryMetrics::add(&self.metrics.rejected, 1);
        outcome.rejected.push(Rejected {
            key: record.key.clone(),
            code: why.code,
            message: why.message,
            payload: record.json.clone(),
            attempts,
        });
    }

    fn gave_up(&self, attempts: u32, started: Instant, reason: &str) -> Error {
        Error::Write {
            message: format!(
                "{}: gave up after {attempts} attempt{} over {:.1}s; last error: {reason}",
                self.service.describe(),
                if attempts == 1 { "" } else { "s" },
                started.elapsed().as_secs_f64()
            ),
        }
    }
}

fn join(
    done: Option<Result<Result<DeliveryOutcome>, tokio::task::JoinError>>,
) -> Result<DeliveryOutcome> {
    match done {
        Some(Ok(outcome)) => outcome,
        Some(Err(e)) => Err(Error::Write {
            message: format!("a delivery task failed: {e}"),
        }),
        None => Ok(DeliveryOutcome::default()),
    }
}

/// The innermost cause of an error (reqwest wraps hyper wraps io).
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}
