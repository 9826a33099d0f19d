//! The change log: per record a run sent, what it sent and what the destination answered,
//! queryable as `sluice.changes`.
//!
//! - While a run delivers, `ChangeLogExec` (between the diff and the sink, in [`super::exec`]) appends each change
//!   batch as the sink takes it to `changes/<sync>/<run>.arrow` in the state store: an Arrow IPC
//!   stream of the batches as the diff emitted them (the mapped fields, `__op`, `__changed`,
//!   `__change`) and when the sink took them. Nothing is rendered while the run delivers: the
//!   cost is one copy of what was sent to a file.
//! - The run's end writes `<run>.outcomes.arrow` beside it (per change: the operation, accepted /
//!   rejected / no answer, the record id, the error) and removes logs older than the sync's
//!   `changes_retention`. A run that stopped without that file shows its records as unanswered.
//! - [`ChangesTable`] reads them back: filters on `sync`, `run_id` and `target` skip whole runs
//!   before their files are read, the other filters are applied before the sent fields are
//!   rendered as JSON, and a LIMIT stops the reading.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::io::Write;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, RecordBatch, StringArray, TimestampMicrosecondArray,
    UInt8Array, UInt32Array, new_null_array,
};
use datafusion::arrow::compute::{and, filter_record_batch};
use datafusion::arrow::datatypes::{
    DataType, Field, Schema, SchemaRef, TimeUnit, UInt8Type, UInt32Type,
};
use datafusion::arrow::ipc::reader::StreamReader;
use datafusion::arrow::ipc::writer::StreamWriter;
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::DFSchema;
use datafusion::datasource::TableType;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::TaskContext;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::ExecutionPlan;
use object_store::ObjectStoreExt;
use object_store::path::Path;

use super::diff::Changes;
use super::state::StateStore;
use crate::contract::{Ack, CHANGE_COLUMNS, ChangeBatch, Op, Rejected};
use crate::delivery::encode::encode_changes;
use crate::scan::{PagedScanExec, Pages};

/// The column a logged batch carries after the change columns: when the sink took it.
const SENT_AT: &str = "__sent_at";

/// Schema metadata of a log file.
const META_SYNC: &str = "sluice.sync";
const META_TARGET: &str = "sluice.target";
const META_KEY: &str = "sluice.key";
const META_SKIP_NULLS: &str = "sluice.skip_nulls";

/// What the destination answered, as stored (`outcome` column of an outcomes file).
const NO_ANSWER: u8 = 0;
const ACCEPTED: u8 = 1;
const REJECTED: u8 = 2;

fn outcome_text(code: u8) -> &'static str {
    match code {
        ACCEPTED => "accepted",
        REJECTED => "rejected",
        _ => "no_answer",
    }
}

fn utc_micros() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

fn io_error(what: String, e: impl fmt::Display) -> crate::error::Error {
    crate::error::Error::State {
        message: format!("{what}: {e}"),
    }
}

/// A run's log file as it is written.
pub struct ChangeLogWriter {
    /// Where it belongs in the state store.
    path: Path,
    /// Where it is written: the state's own file, or (for an object store) a private local file
    /// uploaded when the run ends.
    file: std::path::PathBuf,
    upload: bool,
    schema: SchemaRef,
    writer: StreamWriter<std::io::BufWriter<std::fs::File>>,
    rows: u64,
}

impl fmt::Debug for ChangeLogWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChangeLogWriter({}, {} rows)", self.path, self.rows)
    }
}

/// `changes/<sync>/<run>.arrow` and `changes/<sync>/<run>.outcomes.arrow`.
fn log_path(state: &StateStore, sync: &str, run_id: &str) -> Path {
    state.path(&["changes", sync, &format!("{run_id}.arrow")])
}

fn outcomes_path(state: &StateStore, sync: &str, run_id: &str) -> Path {
    state.path(&["changes", sync, &format!("{run_id}.outcomes.arrow")])
}

/// What a log says of its sync.
#[derive(Debug, Clone, Copy)]
pub struct LogSpec<'a> {
    /// The sync's state id (its folder).
    pub sync: &'a str,
    /// The sync's name as tables show it.
    pub label: &'a str,
    pub target: &'a str,
    pub key: Option<&'a str>,
    /// `null_policy 'skip'`: null fields were not sent.
    pub skip_nulls: bool,
}

impl ChangeLogWriter {
    /// Opens run `run_id`'s log for change batches of schema `changes`.
    pub fn create(
        state: &StateStore,
        spec: LogSpec<'_>,
        run_id: &str,
        changes: &SchemaRef,
    ) -> crate::error::Result<Self> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let path = log_path(state, spec.sync, run_id);
        let (file, upload) = match state.local_file(&path) {
            Some(file) => (file, false),
            None => (
                std::env::temp_dir().join(format!("sluice-changes-{run_id}.arrow")),
                true,
            ),
        };
        let failed = |e: std::io::Error| io_error(format!("cannot write {}", file.display()), e);
        if let Some(parent) = file.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(failed)?;
        }
        // Readable by its owner only: it holds the records' values.
        let out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&file)
            .map_err(failed)?;
        let mut fields: Vec<Field> = changes
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        fields.push(Field::new(SENT_AT, utc_micros(), false));
        let mut metadata = HashMap::from([
            (META_SYNC.to_string(), spec.label.to_string()),
            (META_TARGET.to_string(), spec.target.to_string()),
            (META_SKIP_NULLS.to_string(), spec.skip_nulls.to_string()),
        ]);
        if let Some(key) = spec.key {
            metadata.insert(META_KEY.to_string(), key.to_string());
        }
        let schema = Arc::new(Schema::new_with_metadata(fields, metadata));
        let writer = StreamWriter::try_new(std::io::BufWriter::new(out), &schema)
            .map_err(|e| io_error(format!("cannot write {}", file.display()), e))?;
        Ok(Self {
            path,
            file,
            upload,
            schema,
            writer,
            rows: 0,
        })
    }

    /// Appends a change batch the sink has just taken.
    pub fn append(&mut self, batch: &RecordBatch) -> crate::error::Result<()> {
        let mut columns = batch.columns().to_vec();
        columns.push(Arc::new(
            TimestampMicrosecondArray::from_value(now_micros(), batch.num_rows())
                .with_timezone("UTC"),
        ));
        let logged = RecordBatch::try_new(Arc::clone(&self.schema), columns)?;
        self.writer
            .write(&logged)
            .map_err(|e| io_error(format!("cannot write {}", self.file.display()), e))?;
        self.rows += batch.num_rows() as u64;
        Ok(())
    }

    /// Ends the log (and uploads it where the state is an object store); returns its rows.
    pub async fn finish(mut self, state: &StateStore) -> crate::error::Result<u64> {
        let failed = |e: &dyn fmt::Display| io_error(format!("cannot write {}", self.path), e);
        self.writer.finish().map_err(|e| failed(&e))?;
        let mut out = self.writer.into_inner().map_err(|e| failed(&e))?;
        out.flush().map_err(|e| failed(&e))?;
        drop(out);
        if self.upload {
            let uploaded = upload(state, &self.file, &self.path).await;
            let _ = std::fs::remove_file(&self.file);
            uploaded?;
        }
        Ok(self.rows)
    }
}

/// Copies a local file to `path` in the state's object store, in parts.
async fn upload(
    state: &StateStore,
    file: &std::path::Path,
    path: &Path,
) -> crate::error::Result<()> {
    use std::io::Read;
    const PART: usize = 8 << 20;
    let failed = |e: &dyn fmt::Display| state.io(path, "write", e);
    let mut local = std::fs::File::open(file).map_err(|e| failed(&e))?;
    let mut upload = object_store::WriteMultipart::new(
        state
            .store()
            .put_multipart(path)
            .await
            .map_err(|e| failed(&e))?,
    );
    loop {
        let (file, part) = tokio::task::spawn_blocking(move || {
            let mut part = Vec::with_capacity(PART);
            let read = (&mut local).take(PART as u64).read_to_end(&mut part);
            read.map(|_| (local, part))
        })
        .await
        .map_err(|e| failed(&e))?
        .map_err(|e| failed(&e))?;
        local = file;
        if part.is_empty() {
            break;
        }
        upload.wait_for_capacity(4).await.map_err(|e| failed(&e))?;
        upload.write(&part);
    }
    upload.finish().await.map_err(|e| failed(&e))?;
    Ok(())
}

/// What the destination answered for every change a run sent, in change order: `change`,
/// `operation` (an [`Op`] code: insert for a new record, update for a synced one), `outcome`,
/// `record_id`, `error_code`, `error_message`.
pub fn outcomes(
    changes: &Changes,
    acked: &[Ack],
    rejected: &[Rejected],
    record_ids: Option<&StringArray>,
) -> crate::error::Result<RecordBatch> {
    let n = changes.len();
    let mut outcome = vec![NO_ANSWER; n];
    let mut ids: Vec<Option<&str>> = vec![None; n];
    let mut errors: HashMap<u32, &Rejected> = HashMap::new();
    for ack in acked {
        if let Some(o) = outcome.get_mut(ack.change as usize) {
            *o = ACCEPTED;
            ids[ack.change as usize] = ack.id.as_deref();
        }
    }
    for r in rejected {
        if let Some(change) = r.change
            && let Some(o) = outcome.get_mut(change as usize)
        {
            *o = REJECTED;
            errors.insert(change, r);
        }
    }
    let sent: Vec<u32> = (0..n as u32)
        .filter(|c| {
            let c = &changes[*c as usize];
            c.live && c.sends()
        })
        .collect();
    let known_id = |c: u32| -> Option<&str> {
        let row = changes[c as usize].row? as usize;
        let ids = record_ids?;
        (row < ids.len() && ids.is_valid(row)).then(|| ids.value(row))
    };
    let columns: Vec<ArrayRef> = vec![
        Arc::new(UInt32Array::from(sent.clone())),
        Arc::new(UInt8Array::from_iter_values(sent.iter().map(|c| {
            let change = &changes[*c as usize];
            match (change.op, change.row) {
                (Op::Delete, _) => Op::Delete,
                (_, None) => Op::Insert,
                (_, Some(_)) => Op::Update,
            }
            .code()
        }))),
        Arc::new(UInt8Array::from_iter_values(
            sent.iter().map(|c| outcome[*c as usize]),
        )),
        Arc::new(StringArray::from_iter(
            sent.iter()
                .map(|c| ids[*c as usize].or_else(|| known_id(*c))),
        )),
        Arc::new(StringArray::from_iter(
            sent.iter().map(|c| errors.get(c).map(|r| r.code.as_str())),
        )),
        Arc::new(StringArray::from_iter(
            sent.iter()
                .map(|c| errors.get(c).map(|r| r.message.as_str())),
        )),
    ];
    let schema = Schema::new(vec![
        Field::new("change", DataType::UInt32, false),
        Field::new("operation", DataType::UInt8, false),
        Field::new("outcome", DataType::UInt8, false),
        Field::new("record_id", DataType::Utf8, true),
        Field::new("error_code", DataType::Utf8, true),
        Field::new("error_message", DataType::Utf8, true),
    ]);
    Ok(RecordBatch::try_new(Arc::new(schema), columns)?)
}

/// Writes a run's outcomes beside its log.
pub async fn put_outcomes(
    state: &StateStore,
    sync: &str,
    run_id: &str,
    outcomes: &RecordBatch,
) -> crate::error::Result<()> {
    state
        .put_arrow(&outcomes_path(state, sync, run_id), outcomes)
        .await
}

/// Removes the logs of `sync` older than `retention` (all of them when `None`: no log is kept);
/// returns how many files went.
pub async fn expire(
    state: &StateStore,
    sync: &str,
    retention: Option<std::time::Duration>,
) -> crate::error::Result<usize> {
    let cutoff = retention.map(|r| {
        chrono::Utc::now() - chrono::Duration::from_std(r).unwrap_or(chrono::Duration::MAX)
    });
    let mut removed = 0;
    for o in state.list(&state.path(&["changes", sync])).await? {
        if cutoff.is_none_or(|cutoff| o.last_modified < cutoff) {
            state
                .store()
                .delete(&o.location)
                .await
                .map_err(|e| state.io(&o.location, "delete", e))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// A retention as written: `14 days`, `36h`, `90s`.
pub fn shown_retention(d: std::time::Duration) -> String {
    let s = d.as_secs();
    match s {
        _ if s >= 86400 && s.is_multiple_of(86400) => match s / 86400 {
            1 => "1 day".into(),
            n => format!("{n} days"),
        },
        _ if s >= 3600 && s.is_multiple_of(3600) => format!("{}h", s / 3600),
        _ if s >= 60 && s.is_multiple_of(60) => format!("{}m", s / 60),
        _ => format!("{s}s"),
    }
}

/// `sluice.changes`.
#[derive(Debug)]
pub struct ChangesTable {
    state: StateStore,
    schema: SchemaRef,
}

/// The table's columns, in order.
const COLUMNS: [&str; 11] = [
    "sync",
    "run_id",
    "target",
    "key",
    "operation",
    "fields",
    "record_id",
    "outcome",
    "error_code",
    "error_message",
    "sent_at",
];
const SYNC: usize = 0;
const RUN_ID: usize = 1;
const TARGET: usize = 2;
const FIELDS: usize = 5;

impl ChangesTable {
    pub fn new(state: StateStore) -> Self {
        let fields = COLUMNS.iter().map(|name| match *name {
            "sent_at" => Field::new(*name, utc_micros(), false),
            "sync" | "run_id" | "target" | "operation" | "fields" | "outcome" => {
                Field::new(*name, DataType::Utf8, false)
            }
            _ => Field::new(*name, DataType::Utf8, true),
        });
        Self {
            state,
            schema: Arc::new(Schema::new(fields.collect::<Vec<_>>())),
        }
    }
}

/// One run's log, as listed.
#[derive(Debug, Clone)]
struct RunLog {
    sync: String,
    run_id: String,
    log: Path,
    outcomes: Path,
    modified: chrono::DateTime<chrono::Utc>,
}

/// A pushed filter, planned against the table's schema, with the columns it reads.
#[derive(Debug, Clone)]
struct Pushed {
    expr: Arc<dyn PhysicalExpr>,
    columns: HashSet<usize>,
}

impl Pushed {
    /// Whether it reads only columns in `of`.
    fn within(&self, of: &[usize]) -> bool {
        self.columns.iter().all(|c| of.contains(c))
    }
}

/// Rows of `batch` every filter holds for (a null is false).
fn holds(filters: &[&Pushed], batch: &RecordBatch) -> Result<Option<BooleanArray>> {
    let mut mask: Option<BooleanArray> = None;
    for f in filters {
        let values = f.expr.evaluate(batch)?.into_array(batch.num_rows())?;
        let values = values.as_boolean_opt().cloned().ok_or_else(|| {
            DataFusionError::Internal("a sluice.changes filter is not a predicate".into())
        })?;
        mask = Some(match mask {
            Some(m) => and(&m, &values)?,
            None => values,
        });
    }
    Ok(mask)
}

#[async_trait]
impl TableProvider for ChangesTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        // Applied while reading, and again after (as SQL compares).
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let df_schema = DFSchema::try_from(Arc::clone(&self.schema))?;
        let mut pushed = vec![];
        for filter in filters {
            let columns: Option<HashSet<usize>> = filter
                .column_refs()
                .iter()
                .map(|c| self.schema.index_of(&c.name).ok())
                .collect();
            // (A filter that cannot be planned here is still applied above the scan.)
            if let (Some(columns), Ok(expr)) = (
                columns,
                state.create_physical_expr(filter.clone(), &df_schema),
            ) {
                pushed.push(Pushed { expr, columns });
            }
        }
        let (logs, all) = self.list(&pushed).await?;
        let projection = projection.cloned();
        let schema = match &projection {
            Some(p) => Arc::new(self.schema.project(p)?),
            None => Arc::clone(&self.schema),
        };
        let shown = format!(
            "{} of {all} runs' logs{}{}",
            logs.len(),
            match pushed.len() {
                0 => String::new(),
                n => format!(", {n} filter(s) applied while reading"),
            },
            limit.map(|l| format!(", limit {l}")).unwrap_or_default()
        );
        let (state, table) = (self.state.clone(), Arc::clone(&self.schema));
        let loose = nullable(&table);
        Ok(Arc::new(PagedScanExec::new(
            "ChangesScanExec",
            shown,
            schema,
            Arc::new(move |_: &TaskContext| {
                Box::new(ChangePages {
                    state: state.clone(),
                    table: Arc::clone(&table),
                    loose: Arc::clone(&loose),
                    logs: logs.iter().cloned().collect(),
                    open: None,
                    filters: pushed.clone(),
                    projection: projection.clone(),
                    remaining: limit,
                }) as Box<dyn Pages>
            }),
        )))
    }
}

impl ChangesTable {
    /// The runs' logs the filters on `sync` and `run_id` keep, oldest first, and how many there
    /// are in all.
    async fn list(&self, pushed: &[Pushed]) -> Result<(Vec<RunLog>, usize)> {
        let mut logs: HashMap<(String, String), RunLog> = HashMap::new();
        let mut outcomes: HashSet<(String, String)> = HashSet::new();
        let root = self.state.path(&["changes"]);
        for o in self.state.list(&root).await? {
            let parts: Vec<_> = o
                .location
                .prefix_match(&root)
                .into_iter()
                .flatten()
                .collect();
            let [sync, file] = parts.as_slice() else {
                continue;
            };
            let (sync, file) = (sync.as_ref().to_string(), file.as_ref().to_string());
            if let Some(run) = file.strip_suffix(".outcomes.arrow") {
                outcomes.insert((sync, run.to_string()));
            } else if let Some(run) = file.strip_suffix(".arrow") {
                let log = RunLog {
                    outcomes: outcomes_path(&self.state, &sync, run),
                    log: o.location.clone(),
                    modified: o.last_modified,
                    sync: sync.clone(),
                    run_id: run.to_string(),
                };
                logs.insert((sync, run.to_string()), log);
            }
        }
        let all = logs.len();
        let by_name: Vec<&Pushed> = pushed
            .iter()
            .filter(|p| p.within(&[SYNC, RUN_ID]))
            .collect();
        let mut kept = vec![];
        for log in logs.into_values() {
            if !by_name.is_empty() {
                let named = file_row(&nullable(&self.schema), &log.sync, &log.run_id, None)?;
                if !holds(&by_name, &named)?.is_some_and(|m| m.is_valid(0) && m.value(0)) {
                    continue;
                }
            }
            kept.push(log);
        }
        kept.sort_by(|a, b| (a.modified, &a.run_id).cmp(&(b.modified, &b.run_id)));
        Ok((kept, all))
    }
}

/// The table's schema with every column nullable: the batches filters are evaluated on before
/// every column is set.
fn nullable(schema: &SchemaRef) -> SchemaRef {
    Arc::new(Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone().with_nullable(true))
            .collect::<Vec<_>>(),
    ))
}

/// A one-row batch of the table (`loose`: [`nullable`]) with only a run's own columns set (for
/// filters on them).
fn file_row(
    loose: &SchemaRef,
    sync: &str,
    run_id: &str,
    target: Option<&str>,
) -> Result<RecordBatch> {
    let columns = loose
        .fields()
        .iter()
        .enumerate()
        .map(|(i, f)| -> ArrayRef {
            match (i, target) {
                (SYNC, _) => Arc::new(StringArray::from(vec![sync])),
                (RUN_ID, _) => Arc::new(StringArray::from(vec![run_id])),
                (TARGET, Some(t)) => Arc::new(StringArray::from(vec![t])),
                _ => new_null_array(f.data_type(), 1),
            }
        })
        .collect();
    Ok(RecordBatch::try_new(Arc::clone(loose), columns)?)
}

/// A run's outcomes by change id.
struct Outcomes {
    /// Row in `batch` per change id (`u32::MAX`: none).
    row: Vec<u32>,
    batch: Option<RecordBatch>,
}

impl Outcomes {
    fn of(batch: Option<RecordBatch>) -> Self {
        let mut row = vec![];
        if let Some(b) = &batch {
            for (i, change) in b
                .column(0)
                .as_primitive::<UInt32Type>()
                .values()
                .iter()
                .enumerate()
            {
                let c = *change as usize;
                if row.len() <= c {
                    row.resize(c + 1, u32::MAX);
                }
                row[c] = i as u32;
            }
        }
        Self { row, batch }
    }

    fn find(&self, change: u32) -> Option<usize> {
        self.row
            .get(change as usize)
            .filter(|r| **r != u32::MAX)
            .map(|r| *r as usize)
    }

    fn text(&self, column: usize, row: Option<usize>) -> Option<&str> {
        let (b, row) = (self.batch.as_ref()?, row?);
        let c = b.column(column).as_string::<i32>();
        c.is_valid(row).then(|| c.value(row))
    }

    fn code(&self, column: usize, row: Option<usize>) -> Option<u8> {
        let (b, row) = (self.batch.as_ref()?, row?);
        Some(b.column(column).as_primitive::<UInt8Type>().value(row))
    }
}

/// A log being read.
struct OpenLog {
    log: RunLog,
    target: String,
    key: Option<usize>,
    skip_nulls: bool,
    reader: StreamReader<std::io::Cursor<bytes::Bytes>>,
    outcomes: Outcomes,
}

/// The reading of `sluice.changes`: run by run, batch by batch.
struct ChangePages {
    state: StateStore,
    table: SchemaRef,
    /// `table`, [`nullable`].
    loose: SchemaRef,
    logs: VecDeque<RunLog>,
    open: Option<OpenLog>,
    filters: Vec<Pushed>,
    projection: Option<Vec<usize>>,
    remaining: Option<usize>,
}

#[async_trait]
impl Pages for ChangePages {
    async fn next_batch(&mut self) -> Result<Option<RecordBatch>> {
        loop {
            if self.remaining == Some(0) {
                return Ok(None);
            }
            if self.open.is_none() {
                let Some(log) = self.logs.pop_front() else {
                    return Ok(None);
                };
                self.open = self.open(log).await?;
                continue;
            }
            let open = self.open.as_mut().expect("checked");
            let batch = match open.reader.next() {
                Some(Ok(batch)) => batch,
                // The end, or where a run that stopped mid-write left off.
                Some(Err(_)) | None => {
                    self.open = None;
                    continue;
                }
            };
            let rows = self.rows(&batch)?;
            if rows.num_rows() == 0 {
                continue;
            }
            let rows = match self.remaining.as_mut() {
                Some(left) => {
                    let n = rows.num_rows().min(*left);
                    *left -= n;
                    rows.slice(0, n)
                }
                None => rows,
            };
            return Ok(Some(match &self.projection {
                Some(p) => rows.project(p)?,
                None => rows,
            }));
        }
    }
}

impl ChangePages {
    /// Opens a run's log, unless a filter on the run's own columns rules it out or it is gone
    /// (expired since the listing).
    async fn open(&self, log: RunLog) -> Result<Option<OpenLog>> {
        let Some(bytes) = self.state.read(&log.log).await? else {
            return Ok(None);
        };
        let reader = match StreamReader::try_new(std::io::Cursor::new(bytes), None) {
            Ok(r) => r,
            // Cut short before its schema (a run that stopped as it began).
            Err(_) => return Ok(None),
        };
        let meta = reader.schema().metadata().clone();
        let target = meta.get(META_TARGET).cloned().unwrap_or_default();
        let by_run: Vec<&Pushed> = self
            .filters
            .iter()
            .filter(|p| p.within(&[SYNC, RUN_ID, TARGET]))
            .collect();
        if !by_run.is_empty() {
            let row = file_row(&self.loose, &log.sync, &log.run_id, Some(&target))?;
            if !holds(&by_run, &row)?.is_some_and(|m| m.is_valid(0) && m.value(0)) {
                return Ok(None);
            }
        }
        let key = meta
            .get(META_KEY)
            .and_then(|k| reader.schema().index_of(k).ok());
        let outcomes = match self.state.get_arrow(&log.outcomes).await {
            Ok(batches) => batches.and_then(|b| b.into_iter().next()),
            Err(e) => {
                tracing::warn!(error = %e, "A run's outcomes could not be read; its records show as unanswered.");
                None
            }
        };
        Ok(Some(OpenLog {
            skip_nulls: meta.get(META_SKIP_NULLS).map(String::as_str) == Some("true"),
            log,
            target,
            key,
            reader,
            outcomes: Outcomes::of(outcomes),
        }))
    }

    /// A logged batch as the table's rows that the filters keep (every column, `fields` rendered
    /// only for the rows kept, and only if it is read).
    fn rows(&self, logged: &RecordBatch) -> Result<RecordBatch> {
        let open = self.open.as_ref().expect("an open log");
        let changes = logged.project(&(0..logged.num_columns() - 1).collect::<Vec<_>>())?;
        let view = ChangeBatch::of(&changes)?;
        let n = changes.num_rows();
        let sent_at = logged.column(logged.num_columns() - 1);
        let found: Vec<Option<usize>> = (0..n)
            .map(|r| view.change(r).and_then(|c| open.outcomes.find(c)))
            .collect();
        let options = FormatOptions::default();
        let keys = open
            .key
            .map(|k| ArrayFormatter::try_new(changes.column(k).as_ref(), &options))
            .transpose()?;
        let key_column = open.key.map(|k| changes.column(k));
        let text = |f: &dyn Fn(usize) -> Option<String>| -> ArrayRef {
            Arc::new(StringArray::from_iter((0..n).map(f)))
        };
        let fixed =
            |s: &str| -> ArrayRef { Arc::new(StringArray::from_iter_values((0..n).map(|_| s))) };
        let columns: Vec<ArrayRef> = vec![
            fixed(&open.log.sync),
            fixed(&open.log.run_id),
            fixed(&open.target),
            text(&|r| match (&keys, key_column) {
                (Some(f), Some(c)) if c.is_valid(r) => Some(f.value(r).to_string()),
                _ => None,
            }),
            Arc::new(StringArray::from_iter_values((0..n).map(|r| {
                let op = open.outcomes.code(1, found[r]).unwrap_or(view.op(r).code());
                Op::from_code(op).as_str()
            }))),
            new_null_array(&DataType::Utf8, n),
            text(&|r| open.outcomes.text(3, found[r]).map(str::to_string)),
            Arc::new(StringArray::from_iter_values((0..n).map(|r| {
                outcome_text(open.outcomes.code(2, found[r]).unwrap_or(NO_ANSWER))
            }))),
            text(&|r| open.outcomes.text(4, found[r]).map(str::to_string)),
            text(&|r| open.outcomes.text(5, found[r]).map(str::to_string)),
            Arc::clone(sent_at),
        ];
        let loose = &self.loose;
        let early: Vec<&Pushed> = self
            .filters
            .iter()
            .filter(|p| !p.columns.contains(&FIELDS))
            .collect();
        let mut rows = RecordBatch::try_new(Arc::clone(loose), columns)?;
        let mut sent = changes.clone();
        if let Some(mask) = holds(&early, &rows)? {
            rows = filter_record_batch(&rows, &mask)?;
            sent = filter_record_batch(&sent, &mask)?;
        }
        let wants_fields = self.projection.as_ref().is_none_or(|p| p.contains(&FIELDS))
            || self.filters.iter().any(|p| p.columns.contains(&FIELDS));
        let mut columns = rows.columns().to_vec();
        if wants_fields {
            columns[FIELDS] = Arc::new(rendered(&sent, open.key, open.skip_nulls)?);
            rows = RecordBatch::try_new(Arc::clone(loose), columns.clone())?;
            let late: Vec<&Pushed> = self
                .filters
                .iter()
                .filter(|p| p.columns.contains(&FIELDS))
                .collect();
            if let Some(mask) = holds(&late, &rows)? {
                rows = filter_record_batch(&rows, &mask)?;
            }
            columns = rows.columns().to_vec();
        } else {
            // `fields` is not read: an empty object stands for it.
            columns[FIELDS] = Arc::new(StringArray::from_iter_values(
                (0..rows.num_rows()).map(|_| "{}"),
            ));
        }
        // Back to the table's schema (every column is now set).
        Ok(RecordBatch::try_new(Arc::clone(&self.table), columns)?)
    }
}

/// The fields each change sent, as a JSON object per row (in row order).
fn rendered(changes: &RecordBatch, key: Option<usize>, skip_nulls: bool) -> Result<StringArray> {
    let view = ChangeBatch::of(changes)?;
    let position: HashMap<u32, usize> = (0..changes.num_rows())
        .filter_map(|r| view.change(r).map(|c| (c, r)))
        .collect();
    let mut json: Vec<Option<bytes::Bytes>> = vec![None; changes.num_rows()];
    for record in encode_changes(changes, key, skip_nulls)? {
        if let Some(r) = record.change.and_then(|c| position.get(&c)) {
            json[*r] = Some(record.json);
        }
    }
    debug_assert_eq!(changes.num_columns() - CHANGE_COLUMNS, view.num_fields());
    Ok(StringArray::from_iter(json.iter().map(|j| {
        j.as_ref()
            .map(|b| std::str::from_utf8(b).unwrap_or("{}"))
            .or(Some("{}"))
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::hash::Key;

    /// Where the state is an object store, the log is written to a private local file and
    /// uploaded when the run ends; the table reads it back with the outcomes.
    #[tokio::test]
    async fn a_log_in_an_object_store_is_uploaded_and_read_back() {
        use datafusion::arrow::array::{Int64Array, UInt64Array};
        let state = StateStore::new(
            Arc::new(object_store::memory::InMemory::new()),
            Path::from("state"),
            "memory://state".into(),
        );
        let spec = LogSpec {
            sync: "people",
            label: "people",
            target: "hooks.people",
            key: Some("id"),
            skip_nulls: false,
        };
        let model = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("plan", DataType::Utf8, true),
        ]));
        let schema = crate::contract::change_schema(&model);
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(Int64Array::from(vec![7, 8])),
                Arc::new(StringArray::from(vec![Some("pro"), None])),
                Arc::new(UInt8Array::from(vec![Op::Upsert.code(); 2])),
                Arc::new(UInt64Array::from(vec![3, 3])),
                Arc::new(UInt32Array::from(vec![0, 1])),
            ],
        )
        .unwrap();
        let run_id = uuid::Uuid::new_v4().simple().to_string();
        let mut writer = ChangeLogWriter::create(&state, spec, &run_id, &schema).unwrap();
        assert!(writer.upload);
        let spool = writer.file.clone();
        writer.append(&batch).unwrap();
        assert_eq!(writer.finish(&state).await.unwrap(), 2);
        assert!(!spool.exists(), "the local copy is removed once uploaded");
        let mut changes = Changes::new(2);
        changes.push(Op::Upsert, Key::Int(7), None, [1, 2], 3);
        changes.push(Op::Upsert, Key::Int(8), None, [1, 2], 3);
        let acked = [Ack::new(0, Some("hs-7".into()))];
        let o = outcomes(&changes, &acked, &[], None).unwrap();
        put_outcomes(&state, "people", &run_id, &o).await.unwrap();

        let ctx = datafusion::prelude::SessionContext::new();
        ctx.register_table("changes", Arc::new(ChangesTable::new(state.clone())))
            .unwrap();
        let batches = ctx
            .sql("SELECT sync, target, key, operation, fields, record_id, outcome FROM changes ORDER BY key")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let text = datafusion::arrow::util::pretty::pretty_format_batches(&batches)
            .unwrap()
            .to_string();
        let expected = r#"
+--------+--------------+-----+-----------+-----------------------+-----------+-----------+
| sync   | target       | key | operation | fields                | record_id | outcome   |
+--------+--------------+-----+-----------+-----------------------+-----------+-----------+
| people | hooks.people | 7   | insert    | {"id":7,"plan":"pro"} | hs-7      | accepted  |
| people | hooks.people | 8   | insert    | {"id":8,"plan":null}  |           | no_answer |
+--------+--------------+-----+-----------+-----------------------+-----------+-----------+"#;
        assert_eq!(text.trim(), expected.trim(), "{text}");
        // A filter on another sync reads no log.
        let plan = ctx
            .sql("EXPLAIN SELECT key FROM changes WHERE sync = 'other'")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let plan = datafusion::arrow::util::pretty::pretty_format_batches(&plan)
            .unwrap()
            .to_string();
        assert!(
            plan.contains("ChangesScanExec: 0 of 1 runs' logs"),
            "{plan}"
        );
    }

    #[test]
    fn retentions_are_shown_as_written() {
        let d = std::time::Duration::from_secs;
        assert_eq!(shown_retention(d(14 * 86400)), "14 days");
        assert_eq!(shown_retention(d(86400)), "1 day");
        assert_eq!(shown_retention(d(36 * 3600)), "36h");
        assert_eq!(shown_retention(d(90)), "90s");
        assert_eq!(shown_retention(d(120)), "2m");
    }

    /// Per change sent: insert for a record new to the destination, update for a synced one;
    /// the answer, the record id (the ack's, else the one the state knows) and the error.
    #[test]
    fn outcomes_follow_the_answers_and_skip_what_was_not_sent() {
        let mut changes = Changes::new(1);
        let new = changes.push(Op::Upsert, Key::Int(1), None, [1], 1);
        let synced = changes.push(Op::Upsert, Key::Int(2), Some(1), [2], 1);
        let refused = changes.push(Op::Insert, Key::Int(3), None, [3], 1);
        let gone = changes.push(Op::Delete, Key::Int(4), Some(0), [], 1);
        // Changed only in a field no UPDATE sets: not sent, not logged.
        changes.push(Op::Update, Key::Int(5), Some(2), [5], 0);
        let acked = [Ack::new(new, Some("101".into())), Ack::done(synced)];
        let rejected = [Rejected {
            key: Some("3".into()),
            code: "INVALID".into(),
            message: "no".into(),
            payload: bytes::Bytes::new(),
            attempts: 1,
            change: Some(refused),
        }];
        let ids = StringArray::from(vec![Some("400"), Some("200"), None]);
        let o = outcomes(&changes, &acked, &rejected, Some(&ids)).unwrap();
        assert_eq!(o.num_rows(), 4);
        let ops: Vec<_> = o.column(1).as_primitive::<UInt8Type>().values().to_vec();
        assert_eq!(
            ops,
            [Op::Insert, Op::Update, Op::Insert, Op::Delete].map(Op::code)
        );
        let answers: Vec<_> = o.column(2).as_primitive::<UInt8Type>().values().to_vec();
        assert_eq!(answers, [ACCEPTED, ACCEPTED, REJECTED, NO_ANSWER]);
        let ids: Vec<_> = o.column(3).as_string::<i32>().iter().collect();
        assert_eq!(ids, [Some("101"), Some("200"), None, Some("400")]);
        let codes: Vec<_> = o.column(4).as_string::<i32>().iter().collect();
        assert_eq!(codes, [None, None, Some("INVALID"), None]);
        assert_eq!(gone, 3);
    }
}
