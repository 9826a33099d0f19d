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

use super::api::{Envelope, WebhookConnection, WebhookService};
use super::config::WebhookConfig;
use crate::connectors::WriteReport;
use crate::delivery::encode::{encode_changes, encode_records};
use crate::sync::{NullPolicy, SyncRun};
use datafusion::arrow::record_batch::RecordBatch;

/// Room kept in `max_bytes` for the envelope around the records (object name, run id, …).
const ENVELOPE_BYTES: usize = 512;

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
            c.http.batch_size,
            c.max_bytes,
            c.http.concurrency,
            c.http
                .rate_limit
                .map(|r| format!("{r}/s"))
                .unwrap_or_else(|| "adaptive".into()),
            c.http.timeout,
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
        let connection = &self.connection;
        let config = self.config();
        let mut session = WriteReport::open_session(
            &format!("{}.{}", connection.name, self.object),
            self.sync.as_ref(),
        );
        let service = Arc::new(WebhookService {
            config: Arc::clone(&connection.config),
            envelope: Envelope {
                object: self.object.clone(),
                sync: self.sync.as_ref().map(|r| r.spec.label().to_string()),
                run_id: session.run_id().to_string(),
            },
            describe: format!(
                "webhook {} ({} {})",
                connection.name, config.method, config.shown_url
            ),
        });
        let driver = session.driver(
            service,
            connection.client.clone(),
            Arc::clone(&connection.limiter),
            config.http.retry,
        );
        // The envelope around the records is small and bounded; keep the whole body in max_bytes.
        let budget = config.max_bytes.saturating_sub(ENVELOPE_BYTES).max(1);
        let batcher = session.batcher(config.http.batch_size, budget);
        let key = self.key;
        let sync = self.sync.clone();
        let skip_nulls = sync
            .as_ref()
            .is_some_and(|r| r.spec.options.null_policy == NullPolicy::Skip);
        let encode = move |b: &RecordBatch| match &sync {
            Some(_) => encode_changes(b, key, skip_nulls),
            None => encode_records(b, key),
        };
        let delivered = session
            .deliver(&driver, data, encode, batcher, config.http.concurrency)
            .await;
        Ok(self
            .report
            .close(session, &self.metrics, config.shown_url.clone(), delivered)?)
    }
}
