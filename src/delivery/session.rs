//! [`Session`]: the set-up and tear-down of one statement's delivery, written once for every
//! HTTP connector. A sink opens a session, builds its [`Driver`] and [`Batcher`] from it, sends,
//! and ends it; the session keeps the run id, the metrics, the progress line, the dry-run plan
//! and the sync's checkpoints.
//!
//! ```text
//! let mut session = Session::open(label, run_id, dry_run, checkpoints);
//! let driver = session.driver(service, client, limiter, retry);
//! let delivered = session.deliver(&driver, rows, encode, batcher, concurrency).await;
//! let ended = session.end(&sink_metrics);   // stats published, dry-run plan handed back
//! ```

use std::sync::Arc;

use datafusion::arrow::record_batch::RecordBatch;
use datafusion::physical_plan::SendableRecordBatchStream;
use datafusion::physical_plan::metrics::ExecutionPlanMetricsSet;

use super::metrics::DeliveryStats;
use super::progress::Progress;
use super::{
    AdaptiveLimiter, Batcher, Checkpoints, Delivered, DeliveryMetrics, Driver, DryRun, Exchange,
    HttpService, Record, RetryPolicy, Trace,
};
use crate::error::Result;

/// One statement's delivery.
pub struct Session {
    run_id: String,
    metrics: Arc<DeliveryMetrics>,
    progress: Option<Progress>,
    dry_run: Option<DryRun>,
    checkpoints: Option<Arc<dyn Checkpoints>>,
    /// A sample run's requests and answers.
    trace: Option<Trace>,
}

/// What an ended session hands back to the sink's report.
#[derive(Debug)]
pub struct Ended {
    /// The figures of every request the session's drivers and control-plane calls made.
    pub stats: DeliveryStats,
    /// What a dry run would have sent (`None`: a real run).
    pub dry_run: Option<DryRun>,
    /// A sample run's requests and answers, in the order they were answered.
    pub exchanges: Vec<Exchange>,
}

impl Session {
    /// A session writing `label` (`connection.object`, shown on the progress line) for run
    /// `run_id`. With `dry_run`, drivers count and sample batches instead of sending them;
    /// `checkpoints` commit what is settled as the delivery goes.
    pub fn open(
        label: &str,
        run_id: String,
        dry_run: bool,
        checkpoints: Option<Arc<dyn Checkpoints>>,
    ) -> Self {
        let metrics = Arc::new(DeliveryMetrics::default());
        Self {
            run_id,
            progress: Some(Progress::start(label, Arc::clone(&metrics))),
            metrics,
            dry_run: dry_run.then(DryRun::default),
            checkpoints,
            trace: None,
        }
    }

    /// With `on`, the session's drivers keep every request and answer (a sample run shows
    /// them; see [`Trace`]).
    pub fn traced(mut self, on: bool) -> Self {
        self.trace = on.then(Trace::default);
        self
    }

    /// The run id (batches' idempotency keys and envelopes carry it).
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// The session's request metrics (a control-plane call records into them too).
    pub fn metrics(&self) -> &Arc<DeliveryMetrics> {
        &self.metrics
    }

    /// Whether this is a dry run.
    pub fn is_dry_run(&self) -> bool {
        self.dry_run.is_some()
    }

    /// The dry-run plan, for a sink that adds what it would do besides its batches.
    pub fn dry_run(&mut self) -> Option<&mut DryRun> {
        self.dry_run.as_mut()
    }

    /// A driver for `service` that records into this session's metrics and checkpoints.
    pub fn driver<S: HttpService>(
        &self,
        service: Arc<S>,
        client: reqwest::Client,
        limiter: Arc<AdaptiveLimiter>,
        policy: RetryPolicy,
    ) -> Driver<S> {
        Driver::new(service, client, limiter, policy, Arc::clone(&self.metrics))
            .with_checkpoints(self.checkpoints.clone())
            .with_trace(self.trace.clone())
    }

    /// A batcher of at most `records` records and `bytes` bytes per request.
    pub fn batcher(&self, records: usize, bytes: usize) -> Batcher {
        Batcher::new(&self.run_id, records, bytes)
    }

    /// Encodes `input` with `encode` and delivers it through `driver` (see
    /// [`Driver::deliver_stream`]); in a dry run, adds the batches to the plan instead.
    pub async fn deliver<S: HttpService>(
        &mut self,
        driver: &Driver<S>,
        input: SendableRecordBatchStream,
        encode: impl FnMut(&RecordBatch) -> Result<Vec<Record>>,
        batcher: Batcher,
        concurrency: usize,
    ) -> Delivered {
        driver
            .deliver_stream(input, encode, batcher, concurrency, self.dry_run.as_mut())
            .await
    }

    /// As [`Self::deliver`], for records already encoded.
    pub async fn deliver_records<S: HttpService>(
        &mut self,
        driver: &Driver<S>,
        input: impl futures::Stream<Item = Result<Vec<Record>>>,
        batcher: Batcher,
        concurrency: usize,
    ) -> Delivered {
        driver
            .deliver_records(input, batcher, concurrency, self.dry_run.as_mut())
            .await
    }

    /// Ends the session: the progress line stops, the figures are published on the sink's
    /// DataFusion metrics (EXPLAIN ANALYZE) and handed back with the dry-run plan.
    pub fn end(mut self, sink_metrics: &ExecutionPlanMetricsSet) -> Ended {
        drop(self.progress.take());
        let stats = self.metrics.snapshot();
        stats.publish(sink_metrics);
        Ended {
            stats,
            dry_run: self.dry_run.take(),
            exchanges: self.trace.take().map(|t| t.take()).unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::Op;
    use crate::delivery::{HttpResponse, ResponseClass};
    use bytes::Bytes;

    /// A service no request may reach (a dry run sends nothing).
    struct Unreachable;

    #[async_trait::async_trait]
    impl HttpService for Unreachable {
        fn build_request(
            &self,
            client: &reqwest::Client,
            _batch: &crate::delivery::Batch,
        ) -> Result<reqwest::RequestBuilder> {
            Ok(client.post("http://127.0.0.1:9/never"))
        }

        fn classify(&self, _batch: &crate::delivery::Batch, _r: &HttpResponse) -> ResponseClass {
            unreachable!("a dry run sends nothing")
        }

        fn describe(&self) -> String {
            "nowhere".into()
        }
    }

    #[tokio::test]
    async fn a_dry_run_session_plans_every_batch_and_sends_nothing() {
        let mut session = Session::open("test.object", "run-1".into(), true, None);
        assert!(session.is_dry_run());
        let driver = session.driver(
            Arc::new(Unreachable),
            reqwest::Client::new(),
            Arc::new(AdaptiveLimiter::new(Some(1.0))),
            RetryPolicy::default(),
        );
        let records: Vec<Record> = (0..5)
            .map(|i| Record {
                key: Some(i.to_string()),
                json: Bytes::from(format!("{{\"id\":{i}}}")),
                op: Op::Upsert,
                change: Some(i),
            })
            .collect();
        let batcher = session.batcher(2, usize::MAX);
        let delivered = session
            .deliver_records(&driver, futures::stream::iter([Ok(records)]), batcher, 4)
            .await;
        assert!(delivered.error.is_none());
        assert!(delivered.outcome.acked.is_empty(), "nothing was sent");
        let ended = session.end(&ExecutionPlanMetricsSet::new());
        let plan = ended.dry_run.expect("a dry run's plan");
        assert_eq!(plan.requests(), 3, "5 records in batches of 2");
        assert_eq!(ended.stats.requests, 0);
    }
}
