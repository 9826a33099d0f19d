//! Encodes record batches into JSON lines, CSV or Parquet and streams the bytes to object storage.
//!
//! Writes go through object_store's multipart `BufWriter`: nothing is visible at the final path
//! until [`FileWriter::finish`] completes, and [`FileWriter::abort`] leaves nothing behind.

use std::io::Write;
use std::sync::{Arc, Mutex};

use datafusion::arrow::csv::WriterBuilder as CsvWriterBuilder;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::error::{DataFusionError, Result};
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::basic::Compression;
use datafusion::parquet::file::properties::WriterProperties;
use object_store::ObjectStore;
use object_store::buffered::BufWriter;
use object_store::path::Path;
use tokio::io::AsyncWriteExt;

use super::config::FileFormat;

/// Parquet row groups are flushed at this many rows, which bounds the writer's memory.
const PARQUET_ROW_GROUP_ROWS: usize = 128 * 1024;

/// Streams batches into one file.
pub struct FileWriter {
    out: BufWriter,
    encoder: Encoder,
    bytes: u64,
}

enum Encoder {
    Jsonl,
    Csv {
        header_written: bool,
    },
    Parquet {
        writer: Box<ArrowWriter<SharedBuffer>>,
        buffer: SharedBuffer,
    },
}

impl FileWriter {
    pub fn new(
        store: Arc<dyn ObjectStore>,
        path: Path,
        format: FileFormat,
        schema: SchemaRef,
    ) -> Result<Self> {
        let encoder = match format {
            FileFormat::Jsonl => Encoder::Jsonl,
            FileFormat::Csv => Encoder::Csv {
                header_written: false,
            },
            FileFormat::Parquet => {
                let buffer = SharedBuffer::default();
                let props = WriterProperties::builder()
                    .set_compression(Compression::SNAPPY)
                    .set_max_row_group_row_count(Some(PARQUET_ROW_GROUP_ROWS))
                    .build();
                let writer = ArrowWriter::try_new(buffer.clone(), schema, Some(props))?;
                Encoder::Parquet {
                    writer: Box::new(writer),
                    buffer,
                }
            }
        };
        Ok(Self {
            out: BufWriter::new(store, path),
            encoder,
            bytes: 0,
        })
    }

    /// Encodes one batch and hands its bytes to the upload.
    pub async fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        let bytes = match &mut self.encoder {
            Encoder::Jsonl => crate::delivery::encode::json_lines(batch)?,
            Encoder::Csv { header_written } => {
                let mut buf = Vec::with_capacity(batch.num_rows() * 48);
                let mut writer = CsvWriterBuilder::new()
                    .with_header(!*header_written)
                    .build(&mut buf);
                writer.write(batch)?;
                drop(writer);
                *header_written = true;
                buf
            }
            Encoder::Parquet { writer, buffer } => {
                writer.write(batch)?;
                buffer.take()
            }
        };
        self.put(&bytes).await
    }

    async fn put(&mut self, bytes: &[u8]) -> Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.bytes += bytes.len() as u64;
        self.out
            .write_all(bytes)
            .await
            .map_err(|e| DataFusionError::External(Box::new(e)))
    }

    /// Completes the file and makes it visible. Returns the bytes written.
    pub async fn finish(mut self) -> Result<u64> {
        if let Encoder::Parquet { writer, buffer } = self.encoder {
            writer.close()?;
            let rest = buffer.take();
            self.encoder = Encoder::Jsonl;
            self.put(&rest).await?;
        }
        self.out
            .shutdown()
            .await
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        Ok(self.bytes)
    }

    /// Abandons the file: nothing becomes visible.
    pub async fn abort(mut self) {
        if let Err(e) = self.out.abort().await {
            tracing::warn!(error = %e, "Could not clean up an aborted upload.");
        }
    }
}

/// An in-memory `Write` target the Parquet writer encodes into; drained after every batch.
#[derive(Clone, Default)]
struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

impl SharedBuffer {
    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.0.lock().expect("buffer lock"))
    }
}

impl Write for SharedBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("buffer lock").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
