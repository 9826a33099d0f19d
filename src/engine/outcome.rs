//! What a statement produced: rows to show, a session change, a write summary, or a check.

use std::fmt;
use std::time::Duration;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;

use crate::contract::Rejected;
use crate::delivery::DryRun;
use crate::delivery::metrics::DeliveryStats;
use crate::sync::diff::DiffCounts;
use crate::sync::run::RunSummary;

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
    Write(Box<WriteSummary>),
    /// A sync's dry run: what it would send.
    DryRun(Box<DryRunReport>),
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
    /// For syncs: the run (inserted / updated / deleted / unchanged, run id).
    pub sync: Option<RunSummary>,
    /// A sample run's requests and answers (`RUN SYNC … SAMPLE`).
    pub exchanges: Vec<crate::delivery::Exchange>,
}

/// Exchanges as a sample run prints them: each line indented by four spaces.
pub fn indented(exchanges: &[crate::delivery::Exchange]) -> String {
    exchanges
        .iter()
        .flat_map(|e| {
            e.to_string()
                .lines()
                .map(|l| format!("    {l}"))
                .collect::<Vec<_>>()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// What a sync would do (`EXPLAIN SYNC`, `sluice run --dry-run`). Nothing was sent and the
/// state is unchanged.
#[derive(Debug, Clone)]
pub struct DryRunReport {
    pub sync: String,
    pub target: String,
    pub mode: crate::contract::SyncMode,
    pub key: Option<String>,
    pub counts: DiffCounts,
    pub plan: DryRun,
    /// Null keys and other records refused before sending.
    pub rejected: u64,
    /// The destination's request rate limit, if one is set (requests per second).
    pub rate_limit: Option<f64>,
    pub concurrency: Option<usize>,
    /// Why a real run would refuse to send anything (a safety rail), if it would.
    pub refusal: Option<String>,
    /// What each MERGE clause sends, when they differ (`insert=[…] update=[…]`).
    pub clauses: Option<String>,
    /// Where a real run logs what it sends (`None`: `changes_retention '0'`).
    pub change_log: Option<String>,
}

impl fmt::Display for DryRunReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.counts;
        writeln!(
            f,
            "DRY RUN of sync {} into {} (mode {}, key {}): nothing sent, state unchanged",
            self.sync,
            self.target,
            self.mode,
            self.key.as_deref().unwrap_or("row hash")
        )?;
        writeln!(
            f,
            "  model rows {}: {} to insert, {} to update, {} to delete, {} unchanged, {} rejected by key (null), {} not sent by this mode or its clauses",
            c.rows, c.inserts, c.updates, c.deletes, c.unchanged, self.rejected, c.skipped
        )?;
        if let Some(clauses) = &self.clauses {
            writeln!(f, "  fields sent (besides the key): {clauses}")?;
        }
        if let Some(refusal) = &self.refusal {
            return write!(f, "  a real run would refuse: {refusal}");
        }
        let requests = self.plan.requests();
        write!(f, "  API calls: {requests}")?;
        for op in &self.plan.ops {
            write!(
                f,
                "\n    {}: {} record{} in {} request{} ({} bytes)",
                op.op,
                op.records,
                plural(op.records),
                op.requests,
                plural(op.requests),
                op.bytes
            )?;
            for sample in &op.samples {
                write!(f, "\n      e.g. {sample}")?;
            }
        }
        for note in &self.plan.notes {
            write!(f, "\n  {note}")?;
        }

        match self.rate_limit {
            Some(rate) if rate > 0.0 => write!(
                f,
                "\n  estimated duration: {} at rate_limit {rate}/s",
                format_duration(
                    Duration::try_from_secs_f64(requests as f64 / rate).unwrap_or(Duration::MAX)
                )
            ),
            _ => write!(
                f,
                "\n  estimated duration: no rate limit is set, so it depends on the endpoint ({requests} request{} at concurrency {})",
                plural(requests),
                self.concurrency.unwrap_or(1)
            ),
        }?;
        match &self.change_log {
            Some(log) => write!(f, "\n  change log: {log}"),
            None => write!(f, "\n  change log: off (changes_retention '0')"),
        }
    }
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
        if let Some(sync) = &self.sync {
            let r = &sync.record;
            write!(
                f,
                "\n  sync {} run {}: {} inserted, {} updated, {} deleted, {} unchanged",
                r.sync, r.run_id, r.inserted, r.updated, r.deleted, r.unchanged
            )?;
            if sync.counts.skipped > 0 {
                write!(
                    f,
                    ", {} changed but not sent by this mode or its clauses",
                    sync.counts.skipped
                )?;
            }
            if let Some((sent, of)) = sync.sampled {
                write!(
                    f,
                    "\n  sample: {sent} of the {of} records this run would send were sent, and only their state was committed; the other {} are left for the next run",
                    of - sent
                )?;
            }
        }
        if !self.exchanges.is_empty() {
            write!(
                f,
                "\n  requests and answers:\n{}",
                indented(&self.exchanges)
            )?;
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
