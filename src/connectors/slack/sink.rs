//! `SlackSink`: posts one message per row through the shared delivery engine (one message per
//! request, paced at the connection's rate).

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::datasource::sink::DataSink;
use datafusion::error::Result;
use datafusion::execution::TaskContext;
use datafusion::physical_plan::metrics::{ExecutionPlanMetricsSet, MetricsSet};
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, SendableRecordBatchStream};

use super::api::{SlackConnection, SlackService};
use crate::connectors::WriteReport;
use crate::delivery::encode::{encode_changes, encode_records};
use crate::sync::SyncRun;

/// Posts the rows of one `INSERT INTO slack.messages`.
#[derive(Debug)]
pub struct SlackSink {
    connection: Arc<SlackConnection>,
    object: String,
    schema: SchemaRef,
    report: Arc<WriteReport>,
    sync: Option<Arc<SyncRun>>,
    metrics: ExecutionPlanMetricsSet,
}

impl SlackSink {
    pub fn new(
        connection: Arc<SlackConnection>,
        object: &str,
        schema: SchemaRef,
        report: Arc<WriteReport>,
        sync: Option<Arc<SyncRun>>,
    ) -> Self {
        Self {
            connection,
            object: object.to_string(),
            schema,
            report,
            sync,
            metrics: ExecutionPlanMetricsSet::new(),
        }
    }
}

impl DisplayAs for SlackSink {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.connection.config;
        write!(
            f,
            "SlackSink: connection={} object={} {} rate_limit={} fields=[{}]",
            self.connection.name,
            self.object,
            c.shown(),
            c.http
                .rate_limit
                .map(|r| format!("{r}/s"))
                .unwrap_or_else(|| "adaptive".into()),
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
impl DataSink for SlackSink {
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
        let config = &connection.config;
        let mut session = WriteReport::open_session(
            &format!("{}.{}", connection.name, self.object),
            self.sync.as_ref(),
        );
        let driver = session.driver(
            Arc::new(SlackService(Arc::clone(connection))),
            connection.client.clone(),
            Arc::clone(&connection.limiter),
            config.http.retry,
        );
        let batcher = session.batcher(1, usize::MAX);
        let sync = self.sync.clone();
        let encode = move |b: &RecordBatch| match &sync {
            Some(_) => encode_changes(b, None, true),
            None => encode_records(b, None),
        };
        let delivered = session.deliver(&driver, data, encode, batcher, 1).await;
        Ok(self
            .report
            .close(session, &self.metrics, config.shown(), delivered)?)
    }
}
