//! The delivery engine every HTTP destination shares (Vector's `sinks/util` is the model).
//!
//! A destination describes two things through [`HttpService`]: how to build the request for a
//! batch of records, and how to read the response ([`ResponseClass`]). Everything else lives here
//! once: batching by count and bytes ([`batch`]), a per-connection adaptive rate limiter
//! ([`limiter`]), retries with capped exponential backoff and full jitter ([`retry`]), bounded
//! concurrency and per-record outcomes ([`driver`]), metrics and progress ([`metrics`],
//! [`progress`]), and the set-up and tear-down of one statement's delivery ([`session`]).
//! Control-plane calls (describe, lookups, job polls) go through [`control::call`] with the
//! same retry policy, limiter and metrics as data calls.

pub mod batch;
pub mod control;
pub mod driver;
pub mod encode;
pub mod limiter;
pub mod metrics;
pub mod progress;
pub mod retry;
pub mod session;
pub mod settings;
pub mod trace;

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderMap, StatusCode};

pub use batch::{Batch, Batcher, Record};
pub use driver::{Delivered, DeliveryOutcome, Driver, DryRun, DryRunOp};
pub use limiter::{AdaptiveLimiter, Ticket};
pub use metrics::DeliveryMetrics;
pub use retry::RetryPolicy;
pub use session::Session;
pub use trace::{Exchange, Trace};

use crate::error::Result;

/// Commits what a delivery has settled so far while it goes on: a sync's checkpoints, so that a
/// crash re-sends at most what was in flight and one interval's work, not the whole run.
#[async_trait]
pub trait Checkpoints: Send + Sync {
    /// Whether a checkpoint is due, `settled` records having been answered so far.
    fn due(&self, settled: usize) -> bool;
    /// Commits the state of everything `outcome` acknowledged and rejected so far.
    async fn checkpoint(&self, outcome: &DeliveryOutcome) -> Result<()>;
}

/// A response as the classifier sees it.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Why the destination refused a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The destination's error code (e.g. `INVALID_EMAIL_ADDRESS`, `http_422`).
    pub code: String,
    /// The destination's message.
    pub message: String,
}

/// What a response means for the records of the request (the answer of a destination's
/// `RetryLogic`).
#[derive(Debug, Clone)]
pub enum ResponseClass {
    /// Every record accepted; destination record ids in request order where the API returns them.
    Accepted { ids: Vec<Option<String>> },
    /// Some records need another attempt and some are rejected for good; the rest are accepted.
    /// Indexes are positions in the request's records.
    Partial {
        retry: Vec<usize>,
        rejected: Vec<(usize, Rejection)>,
        /// Record ids in request order where the API returns them (may be empty).
        ids: Vec<Option<String>>,
    },
    /// Send the whole request again (5xx, 408, timeouts, connection resets, 429).
    Retry {
        reason: String,
        /// The destination said when to come back.
        retry_after: Option<Duration>,
        /// Rate limited: slow down; does not count as a failed attempt.
        throttled: bool,
    },
    /// Every record of the request is rejected for good (a 4xx for the whole request).
    RejectAll(Rejection),
    /// The request was refused as a whole for a reason one of its records causes, without
    /// saying which (HubSpot's 400 and 409 for a batch): send each half on its own until the
    /// records at fault are alone; a single record gets this rejection.
    Split(Rejection),
    /// The statement cannot go on (bad credentials, quota exhausted, endpoint gone).
    Fatal(String),
    /// 401: refresh credentials once, then try again.
    Unauthorized(String),
}

/// How one HTTP destination talks to its API.
#[async_trait]
pub trait HttpService: Send + Sync + 'static {
    /// Builds the request for `batch`. Called again for every attempt; it must produce the same
    /// idempotency key for the same batch.
    fn build_request(
        &self,
        client: &reqwest::Client,
        batch: &Batch,
    ) -> Result<reqwest::RequestBuilder>;

    /// Reads a response.
    fn classify(&self, batch: &Batch, response: &HttpResponse) -> ResponseClass;

    /// Refreshes credentials after a 401 answered `batch`'s request; `Ok(false)` when this
    /// destination cannot.
    async fn refresh_credentials(&self, _batch: &Batch) -> Result<bool> {
        Ok(false)
    }

    /// What a response's rate-limit headers say about the current window.
    fn rate_window(&self, headers: &HeaderMap) -> Option<retry::RateWindow> {
        retry::rate_window(headers)
    }

    /// The destination's own error code in an answer (for the facts of a failed write), if it
    /// gives one.
    fn error_code(&self, _response: &HttpResponse) -> Option<String> {
        None
    }

    /// What is being called, for messages (never containing secrets).
    fn describe(&self) -> String;

    /// A request's URL as a sample run shows it (never containing secrets): by default without
    /// its query string or password.
    fn shown_url(&self, url: &url::Url) -> String {
        trace::shown_url(url)
    }
}
