//! What a statement produced: rows to show, a session change, a write summary, or a check.

use std::fmt;
use std::time::Duration;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;

use crate::delivery::Rejected;
use crate::delivery::metrics::DeliveryStats;

/// The result of one statement.
#[derive(Debug)]
pub enum Outcome {
    /// Rows to show (queries, `SHOW`, `EXPLAIN`, `DESCRIBE`).
    Rows {
        schema: SchemaRef,
        batches: Vec<RecordBatch>,
    },
    /// The session changed (connections, tables, views, settings).
    Done(String),
    /// Rows were written.
    Write(WriteSummary),
    /// `sluice check`: planned and valid, not executed.
    Checked,
}

impl Outcome {
    /// Records a destination rejected (these make the process exit with 1).
    pub fn rejected(&self) -> u64 {
        match self {
            Outcome::Write(w) => w.rows_rejected,
            _ => 0,
        }
    }
}

/// What one write statement did.
#[derive(Debug, Clone)]
pub struct WriteSummary {
    /// `INSERT INTO`, `COPY`, …
    pub verb: String,
    /// The table or object written.
    pub target: String,
    /// Rows the statement's sources produced.
    pub rows_read: u64,
    /// Rows the destination accepted.
    pub rows_written: u64,
    /// Rows the destination rejected (kept and reported, never dropped).
    pub rows_rejected: u64,
    /// Where the rows went (files, endpoints).
    pub locations: Vec<String>,
    pub elapsed: Duration,
    /// For HTTP destinations: requests, retries, 429s, bytes and latency.
    pub delivery: Option<DeliveryStats>,
    /// The records the destination refused (also in `sluice.rejects`).
    pub rejects: Vec<Rejected>,
}

impl fmt::Display for WriteSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: read {} row{}, wrote {} row{}",
            self.verb,
            self.target,
            self.rows_read,
            plural(self.rows_read),
            self.rows_written,
            plural(self.rows_written)
        )?;
        if self.rows_rejected > 0 {
            write!(f, ", {} rejected", self.rows_rejected)?;
        }
        match self.locations.as_slice() {
            [] => {}
            [one] => write!(f, " to {one}")?,
            many => write!(f, " to {} locations", many.len())?,
        }
        write!(f, " in {}", format_duration(self.elapsed))?;
        if let Some(delivery) = &self.delivery {
            write!(f, "; {delivery}")?;
        }
        // A few rejects inline; all of them are in sluice.rejects.
        for r in self.rejects.iter().take(MAX_REJECTS_SHOWN) {
            write!(
                f,
                "\n  rejected {}: {}: {}",
                r.key
                    .as_deref()
                    .map(|k| format!("key {k}"))
                    .unwrap_or_else(|| "a record".into()),
                r.code,
                r.message
            )?;
        }
        if self.rejects.len() > MAX_REJECTS_SHOWN {
            write!(
                f,
                "\n  … and {} more",
                self.rejects.len() - MAX_REJECTS_SHOWN
            )?;
        }
        if !self.rejects.is_empty() {
            write!(
                f,
                "\n  (SELECT * FROM sluice.rejects lists every rejected record with its payload)"
            )?;
        }
        Ok(())
    }
}

/// Rejected records printed under a summary.
const MAX_REJECTS_SHOWN: usize = 5;

fn plural(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// `412ms`, `3.07s`.
pub fn format_duration(d: Duration) -> String {
    if d.as_millis() < 1000 {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:.2}s", d.as_secs_f64())
    }
}
