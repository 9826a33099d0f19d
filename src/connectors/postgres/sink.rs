//! `PgSink`: applies a sync's changes to a Postgres table, a batch per transaction.
//!
//! Each batch (`batch_size` rows) is one transaction:
//! 1. Records new to the sync (every field sent) are first copied straight into the table with
//!    binary COPY, the fastest way into Postgres. If that fails (a row already exists, a value
//!    the table refuses), it is rolled back to a savepoint and those records take step 2's path.
//! 2. The other changes are copied into a temporary staging table and applied with set-based
//!    statements: an UPDATE of the changed fields only (`null_policy 'skip'` keeps the table's
//!    value for nulls), an INSERT of the records that do not exist (create-only records that
//!    already exist are rejected, update-only records that do not exist are rejected), a DELETE.
//! 3. If a statement fails, the batch is split in halves under savepoints until the records the
//!    table refuses are isolated; they become rejects with Postgres's message, the rest is
//!    written.
//!
//! Records are acknowledged to the sync only after their transaction commits.
//!
//! A sync's first run streams ([`crate::sync::SyncRun::stream_first_run`]): its batches are
//! written while the model is still being read, all in one transaction that commits only when the
//! change stream ends cleanly. A late duplicate key (or any error) rolls back everything.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use datafusion::arrow::array::{RecordBatch, UInt32Array};
use datafusion::arrow::compute::take_record_batch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::datasource::sink::DataSink;
use datafusion::error::Result as DfResult;
use datafusion::execution::TaskContext;
use datafusion::physical_plan::metrics::{ExecutionPlanMetricsSet, MetricsSet};
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, SendableRecordBatchStream};
use futures::{SinkExt, StreamExt};

use super::metadata::{Relation, quote_ident};
use super::transaction::Tx;
use super::types::{COPY_HEADER, COPY_TRAILER, PgType, can_encode, encode_field};
use super::{PgConnection, pg_message};
use crate::connectors::WriteReport;
use crate::contract::{Ack, ChangeBatch, Op, Rejected, SyncMode, is_change_column};
use crate::delivery::encode::json_lines;
use crate::delivery::progress::Progress;
use crate::delivery::{Delivered, DeliveryMetrics, DeliveryOutcome, DryRun, DryRunOp};
use crate::error::{Error, Result};
use crate::sync::hash::COMPOSITE_KEY;
use crate::sync::{NullPolicy, SyncRun};

/// Bytes of COPY data sent per message.
const COPY_CHUNK: usize = 1 << 20;
/// Staged records above which the staging table is analyzed before the statements run.
const ANALYZE_ABOVE: usize = 1000;

/// Writes one statement's changes into a Postgres table.
#[derive(Debug)]
pub struct PgSink {
    connection: Arc<PgConnection>,
    relation: Arc<Relation>,
    schema: SchemaRef,
    /// The mapped fields: (name, Postgres type).
    fields: Vec<(String, PgType)>,
    /// The batch column of the key records are known by (for rejects).
    key: Option<usize>,
    /// The fields records are matched by: the key, or the parts of a composite key.
    matches: Vec<usize>,
    /// The batch column of `__op` (after the mapped fields and a composite key's field).
    change_at: usize,
    report: Arc<WriteReport>,
    sync: Option<Arc<SyncRun>>,
    metrics: ExecutionPlanMetricsSet,
}

impl PgSink {
    /// Checks every mapped field against the table before anything is written.
    pub fn new(
        connection: Arc<PgConnection>,
        relation: Arc<Relation>,
        schema: SchemaRef,
        report: Arc<WriteReport>,
        sync: Option<Arc<SyncRun>>,
    ) -> Result<Self> {
        let target = format!("{}.{}.{}", connection.name, relation.schema, relation.name);
        if !relation.writable() {
            return Err(Error::plan(
                format!("{target} is a view; sync into a table"),
                relation.name.clone(),
            ));
        }
        let key = sync.as_ref().and_then(|r| r.spec.diff.key);
        if let Some(run) = &sync {
            // Everything a streaming first run sends is held in one transaction (see `Writer`).
            run.set_atomic_sink()?;
        }
        let mut fields = vec![];
        let mut change_at = schema.fields().len();
        for (i, field) in schema.fields().iter().enumerate() {
            let name = field.name();
            if sync.is_some() && (is_change_column(name) || name == COMPOSITE_KEY) {
                change_at = change_at.min(i + usize::from(name == COMPOSITE_KEY));
                continue;
            }
            let column = relation.column(name).ok_or_else(|| {
                Error::plan(format!("{target} has no column '{name}'"), name.clone())
            })?;
            let pg_type = column.pg_type.clone().map_err(|type_name| {
                Error::plan(
                    format!(
                        "{target}.{name} has type {type_name}, which sluice cannot write; leave it out of the mapping"
                    ),
                    name.clone(),
                )
            })?;
            if !can_encode(field.data_type(), &pg_type) {
                return Err(Error::plan(
                    format!(
                        "{target}.{name} is {} but the query gives {}; CAST it in the query",
                        column.type_name,
                        field.data_type()
                    ),
                    name.clone(),
                ));
            }
            fields.push((name.clone(), pg_type));
        }
        let parts = sync
            .as_ref()
            .map(|r| r.spec.diff.key_parts.clone())
            .unwrap_or_default();
        let matches = if parts.is_empty() {
            key.into_iter().collect()
        } else {
            parts
                .iter()
                .filter_map(|p| fields.iter().position(|(n, _)| n == p))
                .collect()
        };
        Ok(Self {
            connection,
            relation,
            schema,
            fields,
            key,
            matches,
            change_at,
            report,
            sync,
            metrics: ExecutionPlanMetricsSet::new(),
        })
    }

    /// The fields each `WHEN NOT MATCHED … INSERT` clause writes, as a new record's `__changed`
    /// holds them (`all`: every field, as without a sync).
    fn inserted_fields(&self, all: u64) -> Vec<u64> {
        let Some(run) = &self.sync else {
            return vec![all];
        };
        let diff = &run.spec.diff;
        let mut fields: Vec<u64> = diff
            .clauses
            .inserts
            .iter()
            .map(|c| c.fields & diff.all_fields() | diff.key_bit())
            .collect();
        fields.sort_unstable();
        fields.dedup();
        fields
    }

    /// What records are matched by: `id`, or `(tenant, id)`.
    fn key_label(&self) -> Option<String> {
        match self.matches.as_slice() {
            [] => None,
            [one] => Some(self.fields[*one].0.clone()),
            parts => Some(format!(
                "({})",
                parts
                    .iter()
                    .map(|i| self.fields[*i].0.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }

    fn target(&self) -> String {
        format!(
            "{}.{}.{}",
            self.connection.name, self.relation.schema, self.relation.name
        )
    }
}

impl DisplayAs for PgSink {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PostgresSink: connection={} table={} at={} mode={} key={} batch_size={} fields=[{}]{}",
            self.connection.name,
            self.relation.qualified(),
            self.connection.config.describe(),
            self.sync
                .as_ref()
                .map_or(SyncMode::Append, |r| r.spec.diff.mode),
            self.key_label().unwrap_or_else(|| "none".into()),
            self.connection.config.batch_size,
            self.fields
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            if self.sync.as_ref().is_some_and(|s| s.dry_run) {
                " dry_run=true"
            } else {
                ""
            }
        )
    }
}

#[async_trait]
impl DataSink for PgSink {
    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }

    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    async fn write_all(
        &self,
        mut data: SendableRecordBatchStream,
        _context: &Arc<TaskContext>,
    ) -> DfResult<u64> {
        let metrics = Arc::new(DeliveryMetrics::default());
        let dry_run = self.sync.as_ref().is_some_and(|r| r.dry_run);
        let progress = (!dry_run).then(|| Progress::start(&self.target(), Arc::clone(&metrics)));
        let mut writer = Writer {
            sink: self,
            metrics: Arc::clone(&metrics),
            outcome: DeliveryOutcome::default(),
            dry_run: dry_run.then(DryRun::default),
            held: None,
            uncommitted: vec![],
            deferred: None,
        };
        let batch_size = self.connection.config.batch_size;
        let mut pending: Vec<RecordBatch> = vec![];
        let mut rows = 0;
        // Rows of the next flush (set when the first batch arrives).
        let mut limit = 0;
        let mut error = None;
        while let Some(batch) = data.next().await {
            let batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    error = Some(Error::from(e));
                    break;
                }
            };
            if limit == 0 {
                // A streaming first run writes its first batch as soon as it arrives, so that
                // Postgres starts its ingest while the rest of the model is read.
                let streaming = self.sync.as_ref().is_some_and(|r| r.streaming());
                limit = match streaming {
                    true => batch.num_rows().clamp(1, batch_size),
                    false => batch_size,
                };
            }
            // At most `batch_size` rows per transaction: a large batch is cut into slices.
            let mut offset = 0;
            while offset < batch.num_rows() {
                let take = (limit - rows).min(batch.num_rows() - offset);
                pending.push(batch.slice(offset, take));
                offset += take;
                rows += take;
                if rows >= limit {
                    if let Err(e) = writer.flush(std::mem::take(&mut pending)).await {
                        error = Some(e);
                        break;
                    }
                    rows = 0;
                    limit = batch_size;
                }
            }
            if error.is_some() {
                break;
            }
        }
        if error.is_none()
            && !pending.is_empty()
            && let Err(e) = writer.flush(pending).await
        {
            error = Some(e);
        }
        if let Err(e) = writer.end(error.is_none()).await {
            error = Some(e);
        }
        drop(progress);
        let Writer {
            outcome, dry_run, ..
        } = writer;
        if let Some(dry_run) = dry_run {
            self.report.set_dry_run(dry_run);
        }
        let stats = metrics.snapshot();
        stats.publish(&self.metrics);
        self.report.set_delivery(stats);
        self.report.add_location(format!(
            "postgres://{} table {}",
            self.connection.config.describe(),
            self.relation.qualified()
        ));
        Ok(self.report.settle(Delivered { outcome, error })?)
    }
}

/// One change, located in the batches of a flush.
#[derive(Debug, Clone, Copy)]
struct Row {
    batch: usize,
    row: usize,
    op: Op,
    changed: u64,
    change: u32,
}

/// The state of one write: what was acknowledged and rejected so far.
struct Writer<'a> {
    sink: &'a PgSink,
    metrics: Arc<DeliveryMetrics>,
    outcome: DeliveryOutcome,
    dry_run: Option<DryRun>,
    /// A streaming first run's connection, in the one transaction that holds all its batches
    /// until the change stream ends ([`crate::sync::SyncRun::stream_first_run`]).
    held: Option<Tx>,
    /// The changes written in that transaction, acknowledged once it commits.
    uncommitted: Vec<u32>,
    /// The match key's index, dropped in that transaction and built again before it commits.
    deferred: Option<DeferredIndex>,
}

impl Writer<'_> {
    /// Ends the write: a held transaction commits if the change stream ended cleanly (its records
    /// are then acknowledged) and is rolled back otherwise (nothing of the run is written).
    async fn end(&mut self, clean: bool) -> Result<()> {
        let Some(tx) = self.held.take() else {
            return Ok(());
        };
        if !clean {
            tx.rollback().await;
            return Ok(());
        }
        if let Err(e) = self.rebuild_index(&tx).await {
            tx.rollback().await;
            return Err(e);
        }
        tx.commit().await.map_err(|e| self.sink.pg_error(e))?;
        tracing::debug!(
            rows = self.uncommitted.len(),
            "Postgres: the run's transaction committed."
        );
        let acked = std::mem::take(&mut self.uncommitted);
        self.acknowledge(acked);
        Ok(())
    }

    fn acknowledge(&mut self, acked: Vec<u32>) {
        DeliveryMetrics::add(&self.metrics.accepted, acked.len() as u64);
        self.outcome.accepted += acked.len() as u64;
        self.outcome.acked.extend(acked.into_iter().map(Ack::done));
    }

    /// Writes the changes of `batches` in a transaction of their own, or, in a streaming first
    /// run, in the run's held transaction.
    async fn flush(&mut self, batches: Vec<RecordBatch>) -> Result<()> {
        let sink = self.sink;
        let n = sink.change_at;
        let all = if n >= 64 { u64::MAX } else { (1u64 << n) - 1 };
        let mut rows = vec![];
        for (b, batch) in batches.iter().enumerate() {
            let changes = ChangeBatch::read(batch, sink.sync.is_some())?;
            rows.extend((0..changes.num_rows()).map(|r| match changes.change(r) {
                Some(change) => Row {
                    batch: b,
                    row: r,
                    op: changes.op(r),
                    changed: changes.changed(r),
                    change,
                },
                None => Row {
                    batch: b,
                    row: r,
                    op: Op::Insert,
                    changed: all,
                    change: r as u32,
                },
            }));
        }
        if let Some(dry_run) = &mut self.dry_run {
            add_dry_run(dry_run, &batches, &rows, n)?;
            return Ok(());
        }
        let started = Instant::now();
        let held = self.sink.sync.as_ref().is_some_and(|r| r.streaming());
        let tx = match self.held.take() {
            Some(tx) => tx,
            None => {
                let client = self.sink.connection.client().await?;
                let tx = Tx::begin(client).await.map_err(|e| self.sink.pg_error(e))?;
                if held && self.sink.connection.config.defer_key_index {
                    self.deferred = DeferredIndex::drop_if_empty(&tx, self.sink).await?;
                }
                tx
            }
        };
        let result = match self.transaction(&tx, &batches, rows, all, held).await {
            Ok(written) if !held => tx
                .commit()
                .await
                .map(|()| (written, None))
                .map_err(|e| self.sink.pg_error(e)),
            Ok(written) => Ok((written, Some(tx))),
            Err(e) => {
                tx.rollback().await;
                Err(e)
            }
        };
        let ((acked, rejected, bytes), tx) = match result {
            Ok(done) => done,
            Err(e) => {
                // (The rollback undid the writes and the index's drop alike.)
                self.uncommitted.clear();
                self.deferred = None;
                return Err(e);
            }
        };
        tracing::debug!(
            rows = acked.len() + rejected.len(),
            bytes,
            ms = started.elapsed().as_millis() as u64,
            held,
            "Postgres batch written."
        );
        self.metrics.record_request(bytes, started.elapsed());
        DeliveryMetrics::add(&self.metrics.rejected, rejected.len() as u64);
        self.outcome.rejected.extend(rejected);
        if let Some(tx) = tx {
            self.uncommitted.extend(acked);
            self.held = Some(tx);
        } else {
            self.acknowledge(acked);
        }
        Ok(())
    }

    /// Writes `rows` in the transaction `client` is in: new records by direct COPY, the rest
    /// through the staging table, refused records isolated under savepoints. `held`: the run's
    /// transaction, which goes on after this batch (else the caller commits it next).
    ///
    /// Long because it is one transaction's protocol in order (direct COPY of new records,
    /// staging, set-based UPDATE / INSERT / DELETE, savepoints around refused records); the steps
    /// share the statements and the row indexes.
    async fn transaction(
        &mut self,
        client: &deadpool_postgres::Object,
        batches: &[RecordBatch],
        rows: Vec<Row>,
        all: u64,
        held: bool,
    ) -> Result<(Vec<u32>, Vec<Rejected>, usize)> {
        let sink = self.sink;
        let pg = |e: tokio_postgres::Error| sink.pg_error(e);
        let mut acked: Vec<u32> = vec![];
        let mut rejected: Vec<Rejected> = vec![];
        let mut bytes = 0;

        // 1. New records straight into the table, each with the fields its INSERT lists (the
        // table's defaults fill the others): one COPY per INSERT clause.
        let inserted = sink.inserted_fields(all);
        let (direct, mut staged): (Vec<Row>, Vec<Row>) = rows.into_iter().partition(|r| {
            matches!(r.op, Op::Insert | Op::Upsert) && inserted.contains(&r.changed)
        });
        if !direct.is_empty() {
            client
                .batch_execute("SAVEPOINT sluice_direct")
                .await
                .map_err(pg)?;
            let (mut sent, mut bad) = (Ok(0), vec![]);
            for fields in &inserted {
                let rows: Vec<Row> = direct
                    .iter()
                    .filter(|r| r.changed == *fields)
                    .copied()
                    .collect();
                if rows.is_empty() {
                    continue;
                }
                let columns: Vec<String> = sink
                    .fields
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| copied(*fields, *i))
                    .map(|(_, (n, _))| quote_ident(n))
                    .collect();
                let copy = format!(
                    "COPY {} ({}) FROM STDIN (FORMAT binary)",
                    sink.relation.qualified(),
                    columns.join(", ")
                );
                let (result, refused) =
                    copy_rows(client, &copy, batches, &rows, sink, *fields, false).await;
                bad.extend(refused);
                sent = match (sent, result) {
                    (Ok(a), Ok(b)) => Ok(a + b),
                    (Err(e), _) | (_, Err(e)) => Err(e),
                };
                if sent.is_err() || !bad.is_empty() {
                    break;
                }
            }
            match sent {
                Ok(b) if bad.is_empty() => {
                    bytes += b;
                    client
                        .batch_execute("RELEASE SAVEPOINT sluice_direct")
                        .await
                        .map_err(pg)?;
                    acked.extend(direct.iter().map(|r| r.change));
                }
                _ => {
                    // Some exist already or are refused: take the careful path.
                    client
                        .batch_execute("ROLLBACK TO SAVEPOINT sluice_direct")
                        .await
                        .map_err(pg)?;
                    tracing::debug!(
                        target = %sink.target(),
                        "direct COPY refused ({:?}); staging {} records",
                        sent.err().map(|e| pg_message(&e)),
                        direct.len()
                    );
                    staged.extend(direct);
                }
            }
        }

        // 2. The rest through the staging table.
        if !staged.is_empty() {
            // Its statements find records by the key's index.
            self.rebuild_index(client).await?;
            staged.sort_by_key(|r| r.change);
            let stage = self.stage_table(client).await?;
            if held {
                // (Emptied at each commit, and this transaction goes on.)
                client
                    .batch_execute(&format!("TRUNCATE {stage}"))
                    .await
                    .map_err(pg)?;
            }
            let copy = format!(
                "COPY {stage} ({}, __op, __changed, __change) FROM STDIN (FORMAT binary)",
                (0..sink.fields.len())
                    .map(|i| format!("c{i}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let (sent, bad) =
                copy_rows(client, &copy, batches, &staged, sink, u64::MAX, true).await;
            bytes += sent.map_err(pg)?;
            let bad: HashSet<u32> = bad
                .into_iter()
                .map(|(row, message)| {
                    rejected.push(sink.reject(batches, &row, "invalid_value", message));
                    row.change
                })
                .collect();
            staged.retain(|r| !bad.contains(&r.change));
            if staged.len() > ANALYZE_ABOVE {
                client
                    .batch_execute(&format!("ANALYZE {stage}"))
                    .await
                    .map_err(pg)?;
            }
            let statements = Statements::new(sink, &stage);
            let mut indexed = false;
            let mut todo = vec![(0, staged.len())];
            while let Some((lo, hi)) = todo.pop() {
                let part = &staged[lo..hi];
                let range = (part[0].change as i64, part[hi - lo - 1].change as i64);
                client
                    .batch_execute("SAVEPOINT sluice_part")
                    .await
                    .map_err(pg)?;
                match statements.apply(client, part, range).await {
                    Ok(done) => {
                        client
                            .batch_execute("RELEASE SAVEPOINT sluice_part")
                            .await
                            .map_err(pg)?;
                        for row in part {
                            if done.contains(&row.change) {
                                acked.push(row.change);
                            } else {
                                let (code, message) = sink.not_applied(row.op);
                                rejected.push(sink.reject(batches, row, code, message));
                            }
                        }
                    }
                    Err(e) if e.as_db_error().is_some() => {
                        client
                            .batch_execute("ROLLBACK TO SAVEPOINT sluice_part")
                            .await
                            .map_err(pg)?;
                        if part.len() == 1 {
                            let code = e
                                .as_db_error()
                                .map(|d| format!("pg_{}", d.code().code()))
                                .unwrap_or_else(|| "pg_error".into());
                            rejected.push(sink.reject(batches, &part[0], &code, pg_message(&e)));
                        } else {
                            if !indexed {
                                // Splitting reads the staging table by change id many times.
                                client
                                    .batch_execute(&format!(
                                        "CREATE INDEX IF NOT EXISTS {} ON {stage} (__change)",
                                        quote_ident(&format!("{}_change", stage.trim_matches('"')))
                                    ))
                                    .await
                                    .map_err(pg)?;
                                indexed = true;
                            }
                            let mid = lo + (hi - lo) / 2;
                            todo.push((mid, hi));
                            todo.push((lo, mid));
                        }
                    }
                    Err(e) => return Err(pg(e)),
                }
            }
        }
        Ok((acked, rejected, bytes))
    }

    /// Builds the key's index again if this run's transaction dropped it.
    async fn rebuild_index(&mut self, client: &deadpool_postgres::Object) -> Result<()> {
        let Some(index) = self.deferred.take() else {
            return Ok(());
        };
        let started = Instant::now();
        for statement in &index.rebuild {
            client.batch_execute(statement).await.map_err(|e| {
                let sink = self.sink;
                let duplicate = e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION);
                Error::Write {
                    message: format!(
                        "writing to {}: building the index {} of the key {} after the load failed, nothing was written: {}{}",
                        sink.target(),
                        index.name,
                        sink.key_label().unwrap_or_default(),
                        pg_message(&e),
                        if duplicate {
                            "; two of the model's keys are one key to Postgres (a padded char(n), a rounded numeric, a case-insensitive type): make them distinct in the query"
                        } else {
                            ""
                        }
                    ),
                }
            })?;
        }
        tracing::debug!(
            index = %index.name,
            ms = started.elapsed().as_millis() as u64,
            "Postgres: the key's index is built."
        );
        Ok(())
    }

    /// The staging table on this pooled connection (temporary, emptied at each commit).
    async fn stage_table(&self, client: &deadpool_postgres::Object) -> Result<String> {
        let sink = self.sink;
        let columns: Vec<String> = sink
            .fields
            .iter()
            .enumerate()
            .map(|(i, (_, t))| format!("c{i} {}", t.staging_type()))
            .collect();
        let ddl_columns = format!(
            "{}, __op smallint, __changed bigint, __change bigint",
            columns.join(", ")
        );
        let name = format!(
            "\"sluice_stage_{:016x}\"",
            xxhash_rust::xxh3::xxh3_64(ddl_columns.as_bytes())
        );
        client
            .batch_execute(&format!(
                "CREATE TEMP TABLE IF NOT EXISTS {name} ({ddl_columns}) ON COMMIT DELETE ROWS"
            ))
            .await
            .map_err(|e| sink.pg_error(e))?;
        Ok(name)
    }
}

/// The unique index of a sync's match key, dropped while a first run loads an empty table: one
/// sorted build at the end is much cheaper than an index insertion per row. Dropped and built
/// again inside the run's transaction, so a failed or killed run leaves the table as it was.
///
/// Only an index that can be built again exactly is dropped: a plain b-tree on the key's columns
/// (a primary key or unique constraint, or a unique index), not partial, not on expressions, in
/// the default tablespace, without comments, not the replica identity or clustering index, and
/// referenced by no foreign key (the DROP fails for any other dependent, and is then undone).
struct DeferredIndex {
    /// The quoted index name (for messages).
    name: String,
    /// The statements that build it again.
    rebuild: Vec<String>,
}

/// The key's candidate indexes: (index, CREATE INDEX statement, constraint, constraint kind,
/// deferrable, initially deferred, key columns). A primary key first.
const KEY_INDEXES: &str = r#"
SELECT ic.relname::text, pg_get_indexdef(i.indexrelid), con.conname::text, con.contype::text,
       COALESCE(con.condeferrable, false), COALESCE(con.condeferred, false),
       ARRAY(SELECT a.attname::text
             FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
             WHERE k.n <= i.indnkeyatts)
FROM pg_index i
JOIN pg_class ic ON ic.oid = i.indexrelid
JOIN pg_class tc ON tc.oid = i.indrelid
LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid
     AND con.contype IN ('p', 'u')
WHERE i.indrelid = $1::text::regclass AND tc.relkind = 'r'
  AND i.indisunique AND i.indisvalid AND i.indpred IS NULL AND i.indexprs IS NULL
  AND NOT i.indisreplident AND NOT i.indisclustered AND ic.reltablespace = 0
  AND obj_description(i.indexrelid, 'pg_class') IS NULL
  AND (con.oid IS NULL OR obj_description(con.oid, 'pg_constraint') IS NULL)
  AND NOT EXISTS (SELECT 1 FROM pg_constraint f WHERE f.conindid = i.indexrelid AND f.contype = 'f')
ORDER BY con.contype = 'p' DESC NULLS LAST
"#;

impl DeferredIndex {
    /// In the run's transaction: drops the key's index if the table is empty and the index can
    /// be built again exactly. Anything in the way (rows, a dependent object, a lock another
    /// session holds for more than a moment) keeps the index, and the load goes on with it.
    ///
    /// Long because every reason to keep the index is checked, in the one transaction, before the
    /// drop.
    async fn drop_if_empty(
        client: &deadpool_postgres::Object,
        sink: &PgSink,
    ) -> Result<Option<Self>> {
        let pg = |e: tokio_postgres::Error| sink.pg_error(e);
        let table = sink.relation.qualified();
        let mut key: Vec<&str> = sink
            .matches
            .iter()
            .map(|i| sink.fields[*i].0.as_str())
            .collect();
        if key.is_empty() {
            return Ok(None);
        }
        key.sort_unstable();
        let empty = format!("SELECT NOT EXISTS (SELECT 1 FROM {table})");
        if !client
            .query_one(&empty, &[])
            .await
            .map_err(pg)?
            .get::<_, bool>(0)
        {
            return Ok(None);
        }
        let rows = client.query(KEY_INDEXES, &[&table]).await.map_err(pg)?;
        let Some(row) = rows.iter().find(|row| {
            let mut columns: Vec<String> = row.get(6);
            columns.sort_unstable();
            columns == key
        }) else {
            return Ok(None);
        };
        let index = quote_ident(row.get::<_, &str>(0));
        let mut rebuild = vec![row.get::<_, String>(1)];
        let drop = match row.get::<_, Option<&str>>(2) {
            Some(constraint) => {
                let constraint = quote_ident(constraint);
                let kind = match row.get::<_, &str>(3) {
                    "p" => "PRIMARY KEY",
                    _ => "UNIQUE",
                };
                let mut add = format!(
                    "ALTER TABLE {table} ADD CONSTRAINT {constraint} {kind} USING INDEX {index}"
                );
                if row.get::<_, bool>(4) {
                    add.push_str(" DEFERRABLE");
                }
                if row.get::<_, bool>(5) {
                    add.push_str(" INITIALLY DEFERRED");
                }
                rebuild.push(add);
                format!("ALTER TABLE {table} DROP CONSTRAINT {constraint}")
            }
            None => format!("DROP INDEX {}.{index}", quote_ident(&sink.relation.schema)),
        };
        client
            .batch_execute("SAVEPOINT sluice_defer")
            .await
            .map_err(pg)?;
        let lock_timeout: String = client
            .query_one("SHOW lock_timeout", &[])
            .await
            .map_err(pg)?
            .get(0);
        let dropped = async {
            client
                .batch_execute(&format!("SET LOCAL lock_timeout = '2s'; {drop}"))
                .await?;
            // (Rows committed between the first look and the lock.)
            let empty: bool = client.query_one(&empty, &[]).await?.get(0);
            client
                .execute(
                    "SELECT set_config('lock_timeout', $1, true)",
                    &[&lock_timeout],
                )
                .await?;
            Ok::<_, tokio_postgres::Error>(empty)
        }
        .await;
        match dropped {
            Ok(true) => {
                client
                    .batch_execute("RELEASE SAVEPOINT sluice_defer")
                    .await
                    .map_err(pg)?;
                tracing::debug!(index = %index, "Postgres: the key's index is dropped until the rows are in.");
                Ok(Some(Self {
                    name: index,
                    rebuild,
                }))
            }
            other => {
                client
                    .batch_execute("ROLLBACK TO SAVEPOINT sluice_defer")
                    .await
                    .map_err(pg)?;
                tracing::debug!(
                    index = %index,
                    reason = ?other.map_err(|e| pg_message(&e)),
                    "Postgres: the key's index is kept for the load."
                );
                Ok(None)
            }
        }
    }
}

/// Sends `rows` with binary COPY. Returns the bytes sent (or the error that ended the COPY) and
/// the rows whose values could not be encoded (left out). With `meta`, each row also carries its
/// operation, changed-fields mask and change id.
/// Whether field `i` is among `fields` (fields past the 64th always are).
fn copied(fields: u64, i: usize) -> bool {
    i >= 64 || fields & (1 << i) != 0
}

/// COPYs `rows`: the sink's fields among `fields`, then with `meta` the change columns.
async fn copy_rows(
    client: &deadpool_postgres::Object,
    copy: &str,
    batches: &[RecordBatch],
    rows: &[Row],
    sink: &PgSink,
    fields: u64,
    meta: bool,
) -> (
    std::result::Result<usize, tokio_postgres::Error>,
    Vec<(Row, String)>,
) {
    let mut bad = vec![];
    let result = async {
        let copy_in = client.copy_in(copy).await?;
        let mut copy_in = Box::pin(copy_in);
        let columns = (0..sink.fields.len())
            .filter(|i| copied(fields, *i))
            .count();
        let count = columns as i16 + if meta { 3 } else { 0 };
        let mut buf = Vec::with_capacity(COPY_CHUNK + 4096);
        buf.extend_from_slice(COPY_HEADER);
        let mut sent = 0;
        for row in rows {
            let start = buf.len();
            buf.extend_from_slice(&count.to_be_bytes());
            let batch = &batches[row.batch];
            let mut failed = None;
            for (i, (name, pg_type)) in sink.fields.iter().enumerate() {
                if !copied(fields, i) {
                    continue;
                }
                if let Err(message) =
                    encode_field(&mut buf, batch.column(i).as_ref(), row.row, pg_type)
                {
                    failed = Some(format!("{name}: {message}"));
                    break;
                }
            }
            if let Some(message) = failed {
                buf.truncate(start);
                bad.push((*row, message));
                continue;
            }
            if meta {
                buf.extend_from_slice(&2i32.to_be_bytes());
                buf.extend_from_slice(&(row.op.code() as i16).to_be_bytes());
                buf.extend_from_slice(&8i32.to_be_bytes());
                buf.extend_from_slice(&(row.changed as i64).to_be_bytes());
                buf.extend_from_slice(&8i32.to_be_bytes());
                buf.extend_from_slice(&(row.change as i64).to_be_bytes());
            }
            if buf.len() >= COPY_CHUNK {
                sent += buf.len();
                copy_in
                    .send(Bytes::from(std::mem::replace(
                        &mut buf,
                        Vec::with_capacity(COPY_CHUNK + 4096),
                    )))
                    .await?;
            }
        }
        buf.extend_from_slice(COPY_TRAILER);
        sent += buf.len();
        copy_in.send(Bytes::from(buf)).await?;
        copy_in.as_mut().finish().await?;
        Ok(sent)
    }
    .await;
    (result, bad)
}

/// The set-based statements that apply staged changes, each limited to a range of change ids.
struct Statements {
    update: Option<String>,
    insert: String,
    delete: Option<String>,
}

impl Statements {
    fn new(sink: &PgSink, stage: &str) -> Self {
        let table = sink.relation.qualified();
        let columns: Vec<String> = sink.fields.iter().map(|(n, _)| quote_ident(n)).collect();
        let skip_nulls = sink
            .sync
            .as_ref()
            .is_some_and(|r| r.spec.options.null_policy == NullPolicy::Skip);
        let range = "s.__change BETWEEN $1 AND $2";
        let (upsert, insert, update, delete) = (
            Op::Upsert.code(),
            Op::Insert.code(),
            Op::Update.code(),
            Op::Delete.code(),
        );
        if sink.matches.is_empty() {
            // Append-only: every staged row is inserted.
            return Self {
                update: None,
                insert: format!(
                    "INSERT INTO {table} ({}) SELECT {} FROM {stage} AS s WHERE {range} RETURNING NULL::bigint",
                    columns.join(", "),
                    (0..columns.len())
                        .map(|i| format!("s.c{i}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                delete: None,
            };
        };
        // t.key = s.key, for each column records are matched by.
        let matched = |t: &str, s: &str| {
            sink.matches
                .iter()
                .map(|i| format!("{t}.{} = {s}.c{i}", columns[*i]))
                .collect::<Vec<_>>()
                .join(" AND ")
        };
        let (on_table, on_inserted) = (matched("t", "s"), matched("ins", "s"));
        let returned = sink
            .matches
            .iter()
            .map(|i| columns[*i].clone())
            .collect::<Vec<_>>()
            .join(", ");
        let sets: Vec<String> = columns
            .iter()
            .enumerate()
            .filter(|(i, _)| !sink.matches.contains(i))
            .map(|(i, c)| {
                let nulls = if skip_nulls {
                    format!(" AND s.c{i} IS NOT NULL")
                } else {
                    String::new()
                };
                format!(
                    "{c} = CASE WHEN (s.__changed & {}) <> 0{nulls} THEN s.c{i} ELSE t.{c} END",
                    1u64 << i
                )
            })
            .collect();
        let update_sql = if sets.is_empty() {
            // Only the key is mapped: an existing row is already as the model says.
            format!(
                "SELECT s.__change FROM {stage} AS s WHERE s.__op IN ({upsert}, {update}) AND {range} AND EXISTS (SELECT 1 FROM {table} AS t WHERE {on_table})"
            )
        } else {
            format!(
                "UPDATE {table} AS t SET {} FROM {stage} AS s WHERE s.__op IN ({upsert}, {update}) AND {range} AND {on_table} RETURNING s.__change",
                sets.join(", ")
            )
        };
        // A field that some `WHEN NOT MATCHED … INSERT` clause does not list is inserted only
        // by rows whose clause lists it (see `Clauses`); the others always are.
        let inserted_by_all = sink.sync.as_ref().map_or(u64::MAX, |r| {
            r.spec
                .diff
                .clauses
                .inserts
                .iter()
                .fold(u64::MAX, |all, c| all & c.fields)
        });
        let values: Vec<String> = (0..columns.len())
            .map(|i| match i < 64 && inserted_by_all & (1 << i) == 0 {
                true => format!(
                    "CASE WHEN (s.__changed & {}) <> 0 THEN s.c{i} END",
                    1u64 << i
                ),
                false => format!("s.c{i}"),
            })
            .collect();
        Self {
            update: Some(update_sql),
            insert: format!(
                "WITH ins AS (INSERT INTO {table} ({}) SELECT {} FROM {stage} AS s WHERE s.__op IN ({upsert}, {insert}) AND {range} AND NOT EXISTS (SELECT 1 FROM {table} AS t WHERE {on_table}) ON CONFLICT DO NOTHING RETURNING {returned}) \
                 SELECT s.__change FROM {stage} AS s JOIN ins ON {on_inserted} WHERE s.__op IN ({upsert}, {insert}) AND {range}",
                columns.join(", "),
                values.join(", ")
            ),
            delete: Some(format!(
                "WITH del AS (DELETE FROM {table} AS t USING {stage} AS s WHERE s.__op = {delete} AND {range} AND {on_table}) \
                 SELECT s.__change FROM {stage} AS s WHERE s.__op = {delete} AND {range}"
            )),
        }
    }

    /// Runs the statements over the staged rows `part` (change ids in `range`); returns the change
    /// ids that were applied.
    async fn apply(
        &self,
        client: &deadpool_postgres::Object,
        part: &[Row],
        range: (i64, i64),
    ) -> std::result::Result<HashSet<u32>, tokio_postgres::Error> {
        let has = |ops: &[Op]| part.iter().any(|r| ops.contains(&r.op));
        let mut done = HashSet::with_capacity(part.len());
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&range.0, &range.1];
        let mut run = async |sql: &str| -> std::result::Result<(), tokio_postgres::Error> {
            for row in client.query(sql, &params).await? {
                let id: Option<i64> = row.get(0);
                if let Some(id) = id {
                    done.insert(id as u32);
                }
            }
            Ok(())
        };
        if let Some(update) = &self.update
            && has(&[Op::Upsert, Op::Update])
        {
            run(update).await?;
        }
        if has(&[Op::Upsert, Op::Insert]) {
            run(&self.insert).await?;
        }
        if let Some(delete) = &self.delete
            && has(&[Op::Delete])
        {
            run(delete).await?;
        }
        if self.update.is_none() {
            // Append-only: the INSERT returns no ids; every row of the part was written.
            done.extend(part.iter().map(|r| r.change));
        }
        Ok(done)
    }
}

impl PgSink {
    fn pg_error(&self, e: tokio_postgres::Error) -> Error {
        Error::Write {
            message: format!("writing to {}: {}", self.target(), pg_message(&e)),
        }
    }

    /// Why a statement left a record out.
    fn not_applied(&self, op: Op) -> (&'static str, String) {
        let key = self.key_label().unwrap_or_else(|| "key".into());
        match op {
            Op::Update => (
                "not_found",
                format!(
                    "no row of {} has this {key}; an update-only sync does not create rows",
                    self.target()
                ),
            ),
            Op::Insert => (
                "already_exists",
                format!(
                    "a row of {} with this {key} (or another unique value of it) already exists; a create-only sync does not change it",
                    self.target()
                ),
            ),
            _ => (
                "unique_violation",
                format!(
                    "the record conflicts with a unique constraint of {} on another column",
                    self.target()
                ),
            ),
        }
    }

    /// A reject for `row`, carrying its key and its fields as JSON.
    fn reject(&self, batches: &[RecordBatch], row: &Row, code: &str, message: String) -> Rejected {
        let batch = &batches[row.batch];
        let taken = take_record_batch(batch, &UInt32Array::from(vec![row.row as u32]))
            .ok()
            .map(|b| b.project(&(0..self.fields.len()).collect::<Vec<_>>()));
        let payload = match taken {
            Some(Ok(b)) => json_lines(&b).unwrap_or_default(),
            _ => vec![],
        };
        let key = self.key.and_then(|k| {
            datafusion::arrow::util::display::array_value_to_string(batch.column(k), row.row).ok()
        });
        Rejected {
            key,
            code: code.to_string(),
            message,
            payload: Bytes::from(payload.trim_ascii_end().to_vec()),
            attempts: 1,
            change: self.sync.as_ref().map(|_| row.change),
        }
    }
}

/// What a dry run would write: per operation, the records, the transactions and samples.
fn add_dry_run(
    dry_run: &mut DryRun,
    batches: &[RecordBatch],
    rows: &[Row],
    fields: usize,
) -> Result<()> {
    for op in Op::ALL {
        let of_op: Vec<&Row> = rows.iter().filter(|r| r.op == op).collect();
        if of_op.is_empty() {
            continue;
        }
        let entry = match dry_run.ops.iter().position(|o| o.op == op.as_str()) {
            Some(i) => &mut dry_run.ops[i],
            None => {
                dry_run.ops.push(DryRunOp {
                    op: op.as_str(),
                    ..Default::default()
                });
                dry_run.ops.last_mut().expect("just pushed")
            }
        };
        entry.records += of_op.len() as u64;
        // One transaction per flush holds every operation of it.
        entry.requests += 1;
        for row in of_op
            .iter()
            .take(3usize.saturating_sub(entry.samples.len()))
        {
            let batch = &batches[row.batch];
            let one = take_record_batch(batch, &UInt32Array::from(vec![row.row as u32]))?
                .project(&(0..fields).collect::<Vec<_>>())?;
            let line = json_lines(&one)?;
            entry
                .samples
                .push(String::from_utf8_lossy(line.trim_ascii_end()).into_owned());
        }
    }
    Ok(())
}
