//! `WebhookSink`: delivers one statement's rows through the shared delivery engine.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::datasource::sink::DataSink;
use datafusion::error::Result;
use datafusion::execution::TaskContext;
use datafusion::physical_plan::metrics::{ExecutionPlanMetricsSet, MetricsSet};
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, SendableRecordBatchStream};

use super::config::WebhookConfig;
use super::request_builder::{self, Envelope};
use super::retry::WebhookRetryLogic;
use crate::delivery::encode::{encode_changes, encode_records};
use crate::delivery::progress::Progress;
use crate::delivery::{
    AdaptiveLimiter, Batch, Batcher, DeliveryMetrics, Driver, DryRun, HttpResponse, HttpService,
    ResponseClass,
};
use crate::destinations::WriteReport;
use crate::sync::{NullPolicy, SyncRun};
use datafusion::arrow::record_batch::RecordBatch;

/// Room kept in `max_bytes` for the envelope around the records (object name, run id, …).
const ENVELOPE_BYTES: usize = 512;

/// What the driver calls for a webhook: request building and response reading.
struct WebhookService {
    config: Arc<WebhookConfig>,
    envelope: Envelope,
    describe: String,
}

#[async_trait]
impl HttpService for WebhookService {
    fn build_request(
        &self,
        client: &reqwest::Client,
        batch: &Batch,
    ) -> crate::Result<reqwest::RequestBuilder> {
        Ok(request_builder::build(
            client,
            &self.config,
            &self.envelope,
            batch,
        ))
    }

    fn classify(&self, batch: &Batch, response: &HttpResponse) -> ResponseClass {
        WebhookRetryLogic::classify(batch, response)
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }
}

/// What every statement on one webhook connection shares: its options, HTTP client (connection
/// pool) and rate limiter.
#[derive(Debug)]
pub struct WebhookConnection {
    pub name: String,
    pub config: Arc<WebhookConfig>,
    pub client: reqwest::Client,
    pub limiter: Arc<AdaptiveLimiter>,
}

/// Sends the rows of one `INSERT INTO hooks.object` as JSON batches.
#[derive(Debug)]
pub struct WebhookSink {
    connection: Arc<WebhookConnection>,
    object: String,
    schema: SchemaRef,
    key: Option<usize>,
    report: Arc<WriteReport>,
    sync: Option<Arc<SyncRun>>,
    metrics: ExecutionPlanMetricsSet,
}

impl WebhookSink {
    pub fn new(
        connection: Arc<WebhookConnection>,
        object: &str,
        schema: SchemaRef,
        key: Option<usize>,
        report: Arc<WriteReport>,
        sync: Option<Arc<SyncRun>>,
    ) -> Self {
        Self {
            connection,
            object: object.to_string(),
            schema,
            key,
            report,
            sync,
            metrics: ExecutionPlanMetricsSet::new(),
        }
    }

    fn config(&self) -> &WebhookConfig {
        &self.connection.config
    }
}

impl DisplayAs for WebhookSink {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = self.config();
        write!(
            f,
            "WebhookSink: connection={} object={} {} {} key={}{} batch_size={} max_bytes={} concurrency={} rate_limit={} timeout={:?} signed={} headers=[{}] fields=[{}]",
            self.connection.name,
            self.object,
            c.method,
            c.shown_url,
            self.key
                .map(|k| self.schema.field(k).name().as_str())
                .unwrap_or("none"),
            if self.sync.as_ref().is_some_and(|s| s.dry_run) {
                " dry_run=true"
            } else {
                ""
            },
            c.batch_size,
            c.max_bytes,
            c.concurrency,
            c.rate_limit
                .map(|r| format!("{r}/s"))
                .unwrap_or_else(|| "adaptive".into()),
            c.timeout,
            c.signing_secret.is_some(),
            c.headers
                .iter()
                .map(|(n, _)| format!("{n}: ***"))
                .collect::<Vec<_>>()
                .join(", "),
            self.schema
                .fields()
                .iter()
                .map(|f| f.name().as_str())
                .filter(|n| !n.starts_with("__"))
                .collect::<Vec<_>>()
                .join(", "),
        )
    }
}

#[async_trait]
impl DataSink for WebhookSink {
    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }

    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    async fn write_all(
        &self,
        data: SendableRecordBatchStream,
        _context: &Arc<TaskContext>,
    ) -> Result<u64> {
        let run_id = crate::sync::run::run_id(self.sync.as_deref());
        let connection = &self.connection;
        let config = self.config();
        let describe = format!(
            "webhook {} ({} {})",
            connection.name, config.method, config.shown_url
        );
        let service = Arc::new(WebhookService {
            config: Arc::clone(&connection.config),
            envelope: Envelope {
                object: self.object.clone(),
                sync: self.sync.as_ref().map(|r| r.spec.label().to_string()),
                run_id: run_id.clone(),
            },
            describe,
        });
        let delivery_metrics = Arc::new(DeliveryMetrics::default());
        let progress = Progress::start(
            &format!("{}.{}", connection.name, self.object),
            Arc::clone(&delivery_metrics),
        );
        let driver = Driver::new(
            service,
            connection.client.clone(),
            Arc::clone(&connection.limiter),
            config.retry,
            Arc::clone(&delivery_metrics),
        )
        .with_checkpoints(self.sync.as_ref().and_then(|r| r.checkpoints()));
        // The envelope around the records is small and bounded; keep the whole body in max_bytes.
        let budget = config.max_bytes.saturating_sub(ENVELOPE_BYTES).max(1);
        let batcher = Batcher::new(&run_id, config.batch_size, budget);
        let key = self.key;
        let sync = self.sync.clone();
        let skip_nulls = sync
            .as_ref()
            .is_some_and(|r| r.spec.options.null_policy == NullPolicy::Skip);
        let encode = move |b: &RecordBatch| match &sync {
            Some(_) => encode_changes(b, key, skip_nulls),
            None => encode_records(b, key),
        };
        let mut dry_run = self
            .sync
            .as_ref()
            .is_some_and(|r| r.dry_run)
            .then(DryRun::default);
        let delivered = driver
            .deliver_stream(data, encode, batcher, config.concurrency, dry_run.as_mut())
            .await;
        drop(progress);
        if let Some(dry_run) = dry_run {
            self.report.set_dry_run(dry_run);
        }
        let stats = delivery_metrics.snapshot();
        stats.publish(&self.metrics);
        self.report.set_delivery(stats);
        self.report.add_location(config.shown_url.clone());
        Ok(self.report.settle(delivered)?)
    }
}
