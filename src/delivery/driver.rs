//! The delivery driver: turns a stream of rows into batches, sends them with bounded
//! concurrency through the connection's limiter, retries what may be retried, and returns the
//! outcome of every record. A rejected record is never dropped: it comes back as [`Rejected`].

use std::sync::Arc;

use datafusion::arrow::record_batch::RecordBatch;
use datafusion::physical_plan::SendableRecordBatchStream;
use futures::StreamExt;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::batch::Record;
use super::batch::{Batch, Batcher};
use super::limiter::AdaptiveLimiter;
use super::metrics::DeliveryMetrics;
use super::retry::{RetryPolicy, retry_after};
use super::trace::{Exchange, Trace, shown_body};
use super::{Checkpoints, HttpResponse, HttpService, Rejection, ResponseClass};
use crate::contract::{Ack, Rejected};
use crate::error::{Error, Failure, Result};

/// One request's answer as the driver reads it.
struct Answer {
    class: ResponseClass,
    /// The answer reported a rate window.
    had_window: bool,
    /// The HTTP status (`None`: no answer, a transport error).
    status: Option<u16>,
    /// The destination's error code, for an answer that did not accept the request.
    code: Option<String>,
}

impl Answer {
    fn without_response(class: ResponseClass) -> Self {
        Self {
            class,
            had_window: false,
            status: None,
            code: None,
        }
    }
}

/// What happened to the records of a delivery.
#[derive(Debug, Default)]
pub struct DeliveryOutcome {
    pub accepted: u64,
    pub rejected: Vec<Rejected>,
    /// In a sync: the changes the destination acknowledged, with the record id it gave.
    pub acked: Vec<Ack>,
}

impl DeliveryOutcome {
    fn merge(&mut self, other: DeliveryOutcome) {
        self.accepted += other.accepted;
        self.rejected.extend(other.rejected);
        self.acked.extend(other.acked);
    }
}

/// The outcome of a whole stream: what was settled, and the error that stopped it, if any
/// (records that never got an answer are in neither list; a sync sends them again next run).
#[derive(Debug, Default)]
pub struct Delivered {
    pub outcome: DeliveryOutcome,
    pub error: Option<Error>,
}

/// What a dry run would send, per operation.
#[derive(Debug, Default, Clone)]
pub struct DryRun {
    pub ops: Vec<DryRunOp>,
    /// What else the destination wants said (its quota, how it would send).
    pub notes: Vec<String>,
}

/// One operation's share of a dry run.
#[derive(Debug, Default, Clone)]
pub struct DryRunOp {
    pub op: &'static str,
    pub records: u64,
    pub requests: u64,
    pub bytes: u64,
    /// The first few records, as they would be sent.
    pub samples: Vec<String>,
}

impl DryRun {
    fn add(&mut self, batch: &Batch) {
        let op = batch.op.as_str();
        let entry = match self.ops.iter().position(|o| o.op == op) {
            Some(i) => &mut self.ops[i],
            None => {
                self.ops.push(DryRunOp {
                    op,
                    ..Default::default()
                });
                self.ops.last_mut().expect("just pushed")
            }
        };
        entry.records += batch.records.len() as u64;
        entry.requests += 1;
        entry.bytes += batch.bytes as u64;
        for r in batch
            .records
            .iter()
            .take(3usize.saturating_sub(entry.samples.len()))
        {
            entry
                .samples
                .push(String::from_utf8_lossy(&r.json).into_owned());
        }
    }

    pub fn requests(&self) -> u64 {
        self.ops.iter().map(|o| o.requests).sum()
    }
}

/// Sends batches for one statement. Cheap to clone; clones share the limiter and metrics.
pub struct Driver<S> {
    service: Arc<S>,
    client: reqwest::Client,
    limiter: Arc<AdaptiveLimiter>,
    policy: RetryPolicy,
    metrics: Arc<DeliveryMetrics>,
    checkpoints: Option<Arc<dyn Checkpoints>>,
    /// A sample run's record of its requests and answers.
    trace: Option<Trace>,
}

impl<S> Clone for Driver<S> {
    fn clone(&self) -> Self {
        Self {
            service: Arc::clone(&self.service),
            client: self.client.clone(),
            limiter: Arc::clone(&self.limiter),
            policy: self.policy,
            metrics: Arc::clone(&self.metrics),
            checkpoints: self.checkpoints.clone(),
            trace: self.trace.clone(),
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
            checkpoints: None,
            trace: None,
        }
    }

    /// Keeps every request and answer in `trace` (a sample run shows them).
    pub fn with_trace(mut self, trace: Option<Trace>) -> Self {
        self.trace = trace;
        self
    }

    /// Commits what is settled as the delivery goes (a sync's checkpoints).
    pub fn with_checkpoints(mut self, checkpoints: Option<Arc<dyn Checkpoints>>) -> Self {
        self.checkpoints = checkpoints;
        self
    }

    /// A checkpoint, if one is due. A failed one is logged: the delivery goes on, and its
    /// records are committed at the end of the run (or sent again after a crash).
    async fn checkpoint(&self, done: &Delivered) {
        let Some(checkpoints) = &self.checkpoints else {
            return;
        };
        let settled = done.outcome.acked.len() + done.outcome.rejected.len();
        if done.error.is_some() || !checkpoints.due(settled) {
            return;
        }
        if let Err(e) = checkpoints.checkpoint(&done.outcome).await {
            tracing::warn!(error = %e, "A checkpoint of the sync's state failed; the run goes on.");
        }
    }

    /// Encodes `input` into records with `encode`, batches them and delivers with at most
    /// `concurrency` requests in flight. Stops at the first fatal error, returning what was
    /// settled before it. With `dry_run`, batches are counted and sampled but nothing is sent.
    pub async fn deliver_stream(
        &self,
        input: SendableRecordBatchStream,
        mut encode: impl FnMut(&RecordBatch) -> Result<Vec<Record>>,
        batcher: Batcher,
        concurrency: usize,
        dry_run: Option<&mut DryRun>,
    ) -> Delivered {
        let records = input.map(move |rows| rows.map_err(Error::from).and_then(|b| encode(&b)));
        self.deliver_records(records, batcher, concurrency, dry_run)
            .await
    }

    /// As [`Self::deliver_stream`], for records already encoded (a stream of chunks).
    pub async fn deliver_records(
        &self,
        input: impl futures::Stream<Item = Result<Vec<Record>>>,
        mut batcher: Batcher,
        concurrency: usize,
        mut dry_run: Option<&mut DryRun>,
    ) -> Delivered {
        let mut input = std::pin::pin!(input);
        let concurrency = concurrency.max(1);
        let mut done = Delivered::default();
        let mut tasks: JoinSet<Result<DeliveryOutcome>> = JoinSet::new();
        let settle = |done: &mut Delivered, r: Result<DeliveryOutcome>| match r {
            Ok(o) => done.outcome.merge(o),
            Err(e) => {
                done.error.get_or_insert(e);
            }
        };
        let send = |tasks: &mut JoinSet<_>, batch: Batch, dry: &mut Option<&mut DryRun>| match dry {
            Some(d) => d.add(&batch),
            None => {
                let driver = self.clone();
                tasks.spawn(async move { driver.deliver(batch).await });
            }
        };
        'input: while let Some(rows) = input.next().await {
            let records = match rows {
                Ok(r) => r,
                Err(e) => {
                    done.error = Some(e);
                    break;
                }
            };
            for record in records {
                if let Some(batch) = batcher.push(record) {
                    while tasks.len() >= concurrency {
                        settle(&mut done, join(tasks.join_next().await));
                        if done.error.is_some() {
                            break 'input;
                        }
                        self.checkpoint(&done).await;
                    }
                    send(&mut tasks, batch, &mut dry_run);
                }
            }
        }
        if done.error.is_none() {
            for batch in batcher.finish() {
                while tasks.len() >= concurrency && done.error.is_none() {
                    settle(&mut done, join(tasks.join_next().await));
                    self.checkpoint(&done).await;
                }
                if done.error.is_some() {
                    break;
                }
                send(&mut tasks, batch, &mut dry_run);
            }
        }
        while let Some(result) = tasks.join_next().await {
            settle(&mut done, join(Some(result)));
            self.checkpoint(&done).await;
            if done.error.is_some() {
                // Requests still in flight are abandoned: their records got no answer and are
                // sent again by the next run.
                tasks.abort_all();
            }
        }
        done
    }

    /// Delivers one batch: retries the whole request or only its failed records as the
    /// destination says, within the retry policy.
    ///
    /// Long because it is the retry state machine over [`ResponseClass`]: every answer is handled
    /// in one match, so the attempt, failure and backoff accounting lives in one place.
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
            let Answer {
                class,
                had_window,
                status,
                code,
            } = self.send(&pending).await?;
            // What a failure of this request is about.
            let facts = || Failure {
                status,
                code: code.clone(),
                key: match pending.records.as_slice() {
                    [one] => one.key.clone(),
                    _ => None,
                },
                ..Default::default()
            };
            let wait = match class {
                ResponseClass::Accepted { ids } => {
                    self.limiter.on_success();
                    self.accept(&mut outcome, &pending, &[], &ids);
                    return Ok(outcome);
                }
                ResponseClass::Partial {
                    retry,
                    rejected,
                    ids,
                } => {
                    self.limiter.on_success();
                    let unsettled: Vec<usize> = retry
                        .iter()
                        .copied()
                        .chain(rejected.iter().map(|(i, _)| *i))
                        .collect();
                    self.accept(&mut outcome, &pending, &unsettled, &ids);
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
                ResponseClass::Split(_) if pending.records.len() > 1 => {
                    self.limiter.on_success();
                    let half = pending.records.len() / 2;
                    let (left, right): (Vec<usize>, Vec<usize>) =
                        (0..pending.records.len()).partition(|i| *i < half);
                    for (n, indexes) in [left, right].into_iter().enumerate() {
                        let next = pending.subset(&indexes, part * 2 + 1 + n as u32);
                        outcome.merge(Box::pin(self.deliver(next)).await?);
                    }
                    return Ok(outcome);
                }
                ResponseClass::RejectAll(why) | ResponseClass::Split(why) => {
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
                        // A wait longer than the batch has left is not waited for: the run
                        // would hold its lock past `max_retry_time` for nothing.
                        let left = self.policy.max_elapsed.saturating_sub(started.elapsed());
                        if let Some(wait) = retry_after.filter(|w| *w > left) {
                            return Err(self.gave_up(
                                attempts,
                                started,
                                facts(),
                                &format!(
                                    "{reason}; the destination asks to wait {:.0}s, more than the {:.0}s left of max_retry_time",
                                    wait.as_secs_f64(),
                                    left.as_secs_f64()
                                ),
                            ));
                        }
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
                    if failures >= self.policy.max_attempts
                        || started.elapsed() >= self.policy.max_elapsed
                    {
                        return Err(self.gave_up(attempts, started, facts(), &reason));
                    }
                    // A throttled request waits in the limiter (which honours Retry-After).
                    (!throttled)
                        .then(|| retry_after.unwrap_or_else(|| self.policy.backoff(failures)))
                }
                ResponseClass::Unauthorized(message) => {
                    if !refreshed && self.service.refresh_credentials(&pending).await? {
                        refreshed = true;
                        None
                    } else {
                        return Err(Error::destination(
                            format!(
                                "{}: the destination rejected the credentials (401: {message}); check the token or secret, nothing more will be sent",
                                self.service.describe()
                            ),
                            facts(),
                        ));
                    }
                }
                ResponseClass::Fatal(message) => {
                    return Err(Error::destination(
                        format!("{}: {message}", self.service.describe()),
                        facts(),
                    ));
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
    async fn send(&self, batch: &Batch) -> Result<Answer> {
        let ticket = self.limiter.acquire().await;
        let request = self.service.build_request(&self.client, batch);
        let request = match request {
            Ok(r) => r,
            Err(e) => {
                self.limiter.finish();
                return Err(e);
            }
        };
        let (request, mut exchange) = match &self.trace {
            Some(_) => traced(request, self.service.as_ref()),
            None => (request, None),
        };
        let t0 = Instant::now();
        let response = send(request, MAX_ANSWER_BYTES).await;
        self.metrics.record_request(batch.bytes, t0.elapsed());
        if let (Some(trace), Some(mut exchange)) = (&self.trace, exchange.take()) {
            match &response {
                Ok(r) => {
                    exchange.status = Some(r.status.as_u16());
                    exchange.response = shown_body(&r.body);
                }
                Err(e) => exchange.response = e.reason(),
            }
            trace.push(exchange);
        }
        let answer = match response {
            Ok(response) => {
                let window = self.service.rate_window(&response.headers);
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
                let failed = !matches!(
                    class,
                    ResponseClass::Accepted { .. } | ResponseClass::Partial { .. }
                );
                Answer {
                    class,
                    had_window: window.is_some(),
                    status: Some(response.status.as_u16()),
                    code: failed.then(|| self.service.error_code(&response)).flatten(),
                }
            }
            Err(e @ SendError::TooLarge { .. }) => {
                Answer::without_response(ResponseClass::Fatal(e.reason()))
            }
            Err(e) => Answer::without_response(ResponseClass::Retry {
                reason: e.reason(),
                retry_after: None,
                throttled: false,
            }),
        };
        self.limiter.finish();
        Ok(answer)
    }

    /// Accepts every record of `batch` except those at `except`; `ids` are the destination's
    /// record ids in request order, where it returns them.
    fn accept(
        &self,
        outcome: &mut DeliveryOutcome,
        batch: &Batch,
        except: &[usize],
        ids: &[Option<String>],
    ) {
        let mut skip = vec![false; batch.records.len()];
        for i in except {
            if let Some(s) = skip.get_mut(*i) {
                *s = true;
            }
        }
        let mut n = 0;
        for (i, record) in batch.records.iter().enumerate() {
            if skip[i] {
                continue;
            }
            n += 1;
            if let Some(change) = record.change {
                outcome
                    .acked
                    .push(Ack::new(change, ids.get(i).cloned().flatten()));
            }
        }
        outcome.accepted += n;
        DeliveryMetrics::add(&self.metrics.accepted, n);
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
            change: record.change,
        });
    }

    fn gave_up(&self, attempts: u32, started: Instant, facts: Failure, reason: &str) -> Error {
        Error::destination(
            format!(
                "{}: gave up after {attempts} attempt{} over {:.1}s; last error: {reason}",
                self.service.describe(),
                if attempts == 1 { "" } else { "s" },
                started.elapsed().as_secs_f64()
            ),
            facts,
        )
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

/// The most an answer to one request may hold unless an API says otherwise: far more than any
/// API sluice speaks sends for one batch, far less than a hostile or broken server could.
pub const MAX_ANSWER_BYTES: usize = 8 << 20;

/// Why a request has no answer to read.
#[derive(Debug)]
pub(crate) enum SendError {
    /// A transport error, its URL removed (it can carry a secret).
    Http(reqwest::Error),
    /// The answer is larger than the limit; it was not read further.
    TooLarge { limit: usize },
}

impl SendError {
    /// What went wrong.
    pub fn reason(&self) -> String {
        match self {
            SendError::Http(e) if e.is_timeout() => format!("timed out: {}", root_cause(e)),
            SendError::Http(e) if e.is_connect() => format!("cannot connect: {}", root_cause(e)),
            SendError::Http(e) => format!("request failed: {}", root_cause(e)),
            SendError::TooLarge { limit } => format!(
                "the answer is larger than {} MB, more than this API sends for one request; it was not read",
                limit >> 20
            ),
        }
    }
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason())
    }
}

/// The request as a sample run shows it (read from a copy; the request is sent as built).
fn traced<S: HttpService>(
    request: reqwest::RequestBuilder,
    service: &S,
) -> (reqwest::RequestBuilder, Option<Exchange>) {
    let Some(Ok(built)) = request.try_clone().map(|copy| copy.build()) else {
        // (A request that cannot be built fails at its send, with its own error.)
        return (request, None);
    };
    let exchange = Exchange {
        method: built.method().to_string(),
        url: service.shown_url(built.url()),
        request: built
            .body()
            .and_then(|b| b.as_bytes())
            .map(shown_body)
            .unwrap_or_default(),
        status: None,
        response: String::new(),
    };
    (request, Some(exchange))
}

/// Sends a request and reads its answer, at most `limit` bytes of it.
pub(crate) async fn send(
    request: reqwest::RequestBuilder,
    limit: usize,
) -> Result<HttpResponse, SendError> {
    let http = |e: reqwest::Error| SendError::Http(e.without_url());
    let mut response = request.send().await.map_err(http)?;
    let status = response.status();
    let headers = response.headers().clone();
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Err(SendError::TooLarge { limit });
    }
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = response.chunk().await.map_err(http)? {
        if body.len() + chunk.len() > limit {
            return Err(SendError::TooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(HttpResponse {
        status,
        headers,
        body: body.freeze(),
    })
}

/// The innermost cause of an error (reqwest wraps hyper wraps io).
pub(crate) fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use axum::Router;
    use axum::http::StatusCode;
    use axum::routing::post;
    use bytes::Bytes;

    use super::*;
    use crate::contract::Op;

    /// A local server answering each request with the next status of `script`, then 200.
    async fn server(script: Vec<u16>) -> (String, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let (counter, script) = (Arc::clone(&calls), Arc::new(script));
        let app = Router::new().route(
            "/",
            post(move || {
                let (counter, script) = (Arc::clone(&counter), Arc::clone(&script));
                async move {
                    let n = counter.fetch_add(1, Ordering::SeqCst);
                    StatusCode::from_u16(*script.get(n).unwrap_or(&200)).unwrap()
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (format!("http://{addr}/"), calls)
    }

    /// Reads answers by status: 200 accepted, 503 retry, 400 rejected, 207 the first record
    /// rejected, anything else fatal.
    struct ByStatus {
        url: String,
    }

    #[async_trait::async_trait]
    impl HttpService for ByStatus {
        fn build_request(
            &self,
            client: &reqwest::Client,
            batch: &Batch,
        ) -> Result<reqwest::RequestBuilder> {
            Ok(client.post(&self.url).body(batch.records.len().to_string()))
        }

        fn classify(&self, _batch: &Batch, response: &HttpResponse) -> ResponseClass {
            let why = || Rejection {
                code: "bad".into(),
                message: "refused".into(),
            };
            match response.status.as_u16() {
                200 => ResponseClass::Accepted { ids: vec![] },
                503 => ResponseClass::Retry {
                    reason: "503".into(),
                    retry_after: Some(Duration::from_millis(1)),
                    throttled: false,
                },
                400 => ResponseClass::RejectAll(why()),
                207 => ResponseClass::Partial {
                    retry: vec![],
                    rejected: vec![(0, why())],
                    ids: vec![],
                },
                other => ResponseClass::Fatal(format!("answered {other}")),
            }
        }

        fn error_code(&self, _response: &HttpResponse) -> Option<String> {
            Some("TEAPOT".into())
        }

        fn describe(&self) -> String {
            "test service".into()
        }
    }

    fn driver(url: String, max_attempts: u32) -> Driver<ByStatus> {
        let policy = RetryPolicy {
            max_attempts,
            max_elapsed: Duration::from_secs(30),
            base: Duration::from_millis(1),
            cap: Duration::from_millis(5),
        };
        Driver::new(
            Arc::new(ByStatus { url }),
            reqwest::Client::new(),
            Arc::new(AdaptiveLimiter::new(None)),
            policy,
            Arc::new(DeliveryMetrics::default()),
        )
    }

    fn records(n: u32) -> Vec<Record> {
        (0..n)
            .map(|i| Record {
                key: Some(format!("k{i}")),
                json: Bytes::from(format!("{{\"id\":{i}}}")),
                op: Op::Upsert,
                change: Some(i),
            })
            .collect()
    }

    async fn deliver(driver: &Driver<ByStatus>, n: u32, batch_size: usize) -> Delivered {
        driver
            .deliver_records(
                futures::stream::iter([Ok(records(n))]),
                Batcher::new("run", batch_size, usize::MAX),
                1,
                None,
            )
            .await
    }

    #[tokio::test]
    async fn transient_failures_are_retried_then_every_record_is_acknowledged() {
        let (url, calls) = server(vec![503, 503]).await;
        let driver = driver(url, 5);
        let done = deliver(&driver, 3, 10).await;
        assert!(done.error.is_none(), "{:?}", done.error);
        let mut acked: Vec<u32> = done.outcome.acked.iter().map(|a| a.change).collect();
        acked.sort_unstable();
        assert_eq!(acked, [0, 1, 2]);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(driver.metrics.snapshot().retries, 2);
    }

    #[tokio::test]
    async fn max_attempts_bounds_a_failing_request_and_the_error_carries_its_facts() {
        let (url, calls) = server(vec![503; 10]).await;
        let done = deliver(&driver(url, 2), 1, 10).await;
        let error = done.error.expect("gave up");
        assert!(
            error.to_string().contains("gave up after 2 attempts"),
            "{error}"
        );
        let facts = error.facts().expect("a destination failure");
        assert_eq!(facts.status, Some(503));
        assert_eq!(facts.code.as_deref(), Some("TEAPOT"));
        assert_eq!(facts.key.as_deref(), Some("k0"), "the one record at fault");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert!(done.outcome.acked.is_empty());
    }

    #[tokio::test]
    async fn rejected_records_come_back_whole_and_the_rest_are_acknowledged() {
        let (url, _) = server(vec![207, 400]).await;
        let done = deliver(&driver(url, 3), 4, 2).await;
        assert!(done.error.is_none());
        // Batch 1 (k0, k1): k0 rejected, k1 accepted; batch 2 (k2, k3): both rejected.
        let mut rejected: Vec<&str> = done
            .outcome
            .rejected
            .iter()
            .map(|r| r.key.as_deref().unwrap())
            .collect();
        rejected.sort_unstable();
        assert_eq!(rejected, ["k0", "k2", "k3"]);
        let k0 = &done.outcome.rejected[0];
        assert_eq!(
            (k0.code.as_str(), &k0.payload[..]),
            ("bad", &b"{\"id\":0}"[..])
        );
        assert_eq!(k0.change, Some(0));
        assert_eq!(
            done.outcome
                .acked
                .iter()
                .map(|a| a.change)
                .collect::<Vec<_>>(),
            [1]
        );
    }

    #[tokio::test]
    async fn a_fatal_answer_stops_the_delivery_and_keeps_what_was_settled_before_it() {
        let (url, calls) = server(vec![200, 418]).await;
        let done = deliver(&driver(url, 3), 6, 2).await;
        let error = done.error.expect("fatal");
        assert!(error.to_string().contains("answered 418"), "{error}");
        assert_eq!(error.facts().unwrap().status, Some(418));
        assert_eq!(
            error.facts().unwrap().key,
            None,
            "two records: none at fault alone"
        );
        assert_eq!(
            done.outcome
                .acked
                .iter()
                .map(|a| a.change)
                .collect::<Vec<_>>(),
            [0, 1]
        );
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "nothing sent after the fatal answer"
        );
    }
}
