//! `FileSink`: writes one statement's rows to one new file, atomically.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::datasource::listing::ListingTableUrl;
use datafusion::datasource::sink::DataSink;
use datafusion::error::Result;
use datafusion::execution::TaskContext;
use datafusion::physical_plan::metrics::{ExecutionPlanMetricsSet, MetricBuilder, MetricsSet};
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, SendableRecordBatchStream};
use futures::StreamExt;
use object_store::path::Path;

use super::config::FileFormat;
use super::encode::FileWriter;
use crate::connectors::WriteReport;

/// Writes the rows of one statement into `<url>/<object>/<timestamp>-<id>.<ext>`.
///
/// The file is uploaded with a multipart upload that completes only after the last row, so a
/// failed or cancelled statement leaves no file, and every run gets its own file name.
#[derive(Debug)]
pub struct FileSink {
    connection: String,
    object: String,
    folder: ListingTableUrl,
    format: FileFormat,
    schema: SchemaRef,
    report: Arc<WriteReport>,
    metrics: ExecutionPlanMetricsSet,
}

impl FileSink {
    pub fn new(
        connection: &str,
        object: &str,
        folder: ListingTableUrl,
        format: FileFormat,
        schema: SchemaRef,
        report: Arc<WriteReport>,
    ) -> Self {
        Self {
            connection: connection.to_string(),
            object: object.to_string(),
            folder,
            format,
            schema,
            report,
            metrics: ExecutionPlanMetricsSet::new(),
        }
    }

    /// A file name that sorts by time and never repeats.
    fn file_name(&self) -> String {
        let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
        let id = uuid::Uuid::new_v4().simple().to_string();
        format!("{stamp}-{}.{}", &id[..12], self.format.extension())
    }
}

impl DisplayAs for FileSink {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fields: Vec<&str> = self
            .schema
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect();
        write!(
            f,
            "FileSink: connection={} object={} folder={} format={} fields=[{}]",
            self.connection,
            self.object,
            display_folder(&self.folder),
            self.format,
            fields.join(", ")
        )
    }
}

#[async_trait]
impl DataSink for FileSink {
    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }

    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    async fn write_all(
        &self,
        mut data: SendableRecordBatchStream,
        context: &Arc<TaskContext>,
    ) -> Result<u64> {
        let rows_metric = MetricBuilder::new(&self.metrics).global_counter("rows_written");
        let bytes_metric = MetricBuilder::new(&self.metrics).global_counter("bytes_written");
        let store = context.runtime_env().object_store(&self.folder)?;
        let name = self.file_name();
        let path = Path::from(format!("{}/{name}", self.folder.prefix()));
        let mut writer: Option<FileWriter> = None;
        let mut rows = 0u64;
        while let Some(next) = data.next().await {
            let batch = match next {
                Ok(batch) => batch,
                Err(e) => {
                    if let Some(w) = writer {
                        w.abort().await;
                    }
                    return Err(e);
                }
            };
            if batch.num_rows() == 0 {
                continue;
            }
            let w = match &mut writer {
                Some(w) => w,
                None => writer.insert(FileWriter::new(
                    Arc::clone(&store),
                    path.clone(),
                    self.format,
                    Arc::clone(&self.schema),
                )?),
            };
            if let Err(e) = w.write(&batch).await {
                if let Some(w) = writer {
                    w.abort().await;
                }
                return Err(e);
            }
            rows += batch.num_rows() as u64;
        }
        if let Some(w) = writer {
            let bytes = w.finish().await?;
            bytes_metric.add(bytes as usize);
            rows_metric.add(rows as usize);
            self.report
                .add_location(format!("{}{name}", display_folder(&self.folder)));
        }
        Ok(rows)
    }
}

/// A local folder as a path, anything else as its URL with any password masked.
pub(crate) fn display_folder(url: &ListingTableUrl) -> String {
    if url.scheme() == "file"
        && let Some(path) = url::Url::parse(url.as_str())
            .ok()
            .and_then(|u| u.to_file_path().ok())
    {
        return format!("{}/", path.display().to_string().trim_end_matches('/'));
    }
    crate::options::redact_url_password(url.as_str())
}
