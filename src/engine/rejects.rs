//! `sluice.rejects`: every record a destination refused in this session, queryable with SQL.

use std::sync::{Arc, Mutex};

use datafusion::arrow::array::{ArrayRef, StringArray, TimestampMicrosecondArray, UInt32Array};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::catalog::{MemTable, MemorySchemaProvider, SchemaProvider};

use crate::delivery::Rejected;
use crate::error::Result;

/// The schema name sluice's own tables live under.
pub const SCHEMA: &str = "sluice";

/// One rejected record and where it was going.
#[derive(Debug, Clone)]
struct Row {
    target: String,
    at_micros: i64,
    reject: Rejected,
}

/// The session's rejects, re-published as the table `sluice.rejects` after every write.
#[derive(Debug)]
pub struct RejectLog {
    rows: Mutex<Vec<Row>>,
    schema: Arc<MemorySchemaProvider>,
}

fn table_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("target", DataType::Utf8, false),
        Field::new(
            "rejected_at",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        Field::new("key", DataType::Utf8, true),
        Field::new("error_code", DataType::Utf8, false),
        Field::new("error_message", DataType::Utf8, false),
        Field::new("payload", DataType::Utf8, false),
        Field::new("attempts", DataType::UInt32, false),
    ]))
}

impl RejectLog {
    /// Creates the log and the (empty) `sluice.rejects` table in `schema`.
    pub fn new(schema: Arc<MemorySchemaProvider>) -> Result<Self> {
        let log = Self {
            rows: Mutex::default(),
            schema,
        };
        log.publish()?;
        Ok(log)
    }

    /// Adds the rejects of one write to `target`.
    pub fn record(&self, target: &str, rejects: &[Rejected]) -> Result<()> {
        if rejects.is_empty() {
            return Ok(());
        }
        let at_micros = chrono::Utc::now().timestamp_micros();
        self.rows
            .lock()
            .expect("rejects lock")
            .extend(rejects.iter().map(|r| Row {
                target: target.to_string(),
                at_micros,
                reject: r.clone(),
            }));
        self.publish()
    }

    fn publish(&self) -> Result<()> {
        let rows = self.rows.lock().expect("rejects lock");
        let text = |f: fn(&Row) -> String| -> ArrayRef {
            Arc::new(StringArray::from_iter_values(rows.iter().map(f)))
        };
        let schema = table_schema();
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                text(|r| r.target.clone()),
                Arc::new(
                    TimestampMicrosecondArray::from_iter_values(rows.iter().map(|r| r.at_micros))
                        .with_timezone("UTC"),
                ),
                Arc::new(StringArray::from_iter(
                    rows.iter().map(|r| r.reject.key.clone()),
                )),
                text(|r| r.reject.code.clone()),
                text(|r| r.reject.message.clone()),
                text(|r| String::from_utf8_lossy(&r.reject.payload).into_owned()),
                Arc::new(UInt32Array::from_iter_values(
                    rows.iter().map(|r| r.reject.attempts),
                )),
            ],
        )?;
        let table = MemTable::try_new(schema, vec![vec![batch]])?;
        self.schema.deregister_table("rejects")?;
        self.schema
            .register_table("rejects".into(), Arc::new(table))?;
        Ok(())
    }
}
