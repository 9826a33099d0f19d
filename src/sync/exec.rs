//! `DiffExec`: the diff kernel as a DataFusion operator between the model and the sink.
//!
//! It reads the whole model (streaming; only changed rows are kept), so that duplicate keys and
//! the safety rails can stop a run before anything is sent, then emits the changes: the mapped
//! fields plus `__op` (the operation), `__changed` (bit i: field i is sent) and `__change` (the
//! change's id, by which the sink reports what the destination acknowledged). Deletes carry only
//! the key. A first run into a sink that commits only when the stream ends emits its changes as
//! it reads instead ([`SyncRun::stream_first_run`]).

use std::fmt;
use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, AsArray, BooleanArray, RecordBatch, StringArray, UInt8Array, UInt32Array,
    UInt64Array, new_null_array,
};
use datafusion::arrow::compute::{cast, filter_record_batch, take_record_batch};
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::common::runtime::SpawnedTask;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::TaskContext;
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::metrics::{ExecutionPlanMetricsSet, MetricBuilder, MetricsSet};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    ChildrenPropertiesMode, DisplayAs, DisplayFormatType, Distribution, ExecutionPlan,
    Partitioning, PlanProperties, ReplaceChildrenOptions, SendableRecordBatchStream,
};
use futures::{StreamExt, TryStreamExt};

use super::SyncRun;
use super::diff::{Change, Changes, DiffCounts, Differ, Hashed, needs_field_hashes};
use super::hash::{Key, split_composite_key};
use super::snapshot::key_array;
use crate::contract::{Op, Rejected, Sample, change_schema};
use crate::delivery::encode::json_lines;
use crate::error::Error;

/// Classifies the model against the sync's snapshot and emits only the changes.
#[derive(Debug)]
pub struct DiffExec {
    input: Arc<dyn ExecutionPlan>,
    run: Arc<SyncRun>,
    schema: SchemaRef,
    properties: Arc<PlanProperties>,
    metrics: ExecutionPlanMetricsSet,
}

impl DiffExec {
    pub fn new(input: Arc<dyn ExecutionPlan>, run: Arc<SyncRun>) -> Self {
        let schema = change_schema(&model_fields(&input.schema(), &run));
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(Arc::clone(&schema)),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Final,
            Boundedness::Bounded,
        ));
        Self {
            input,
            run,
            schema,
            properties,
            metrics: ExecutionPlanMetricsSet::new(),
        }
    }
}

/// The model's mapped fields: its schema without a conditional write's clause columns (the diff
/// reads them; the sink never sees them).
pub fn model_fields(model: &SchemaRef, run: &SyncRun) -> SchemaRef {
    let fields = run.spec.diff.fields.len().min(model.fields().len());
    Arc::new(
        model
            .project(&(0..fields).collect::<Vec<_>>())
            .expect("the mapped fields are the model's first columns"),
    )
}

/// What a sync matches records by, for EXPLAIN: `id`, `(tenant, id)` or `(row hash)`.
pub fn key_label(spec: &super::run::SyncSpec) -> String {
    if !spec.diff.key_parts.is_empty() {
        return format!("({})", spec.diff.key_parts.join(", "));
    }
    spec.key_name().unwrap_or("(row hash)").to_string()
}

/// What each clause of a MERGE sends, when its clauses send different fields or have
/// conditions (`insert=[…] update when s.x > 1=[…]`; the key, sent by every clause, is left out).
pub fn clause_fields(diff: &super::diff::DiffSpec) -> Option<String> {
    if diff.clauses.uniform(diff.all_fields()) || diff.mode.listed_deletes() {
        return None;
    }
    let mut key = diff.key_bit();
    for part in &diff.key_parts {
        if let Some(i) = diff
            .fields
            .iter()
            .position(|f| f == part)
            .filter(|i| *i < 64)
        {
            key |= 1 << i;
        }
    }
    Some(diff.clauses.describe(&diff.fields, key))
}

/// What a diff operator shows in EXPLAIN: `sync=… mode=… key=… fields=[…] state=…`, and for a
/// MERGE whose clauses send different fields, what each sends ([`clause_fields`]).
pub fn describe_diff(run: &SyncRun) -> String {
    let spec = &run.spec;
    let diff = &spec.diff;
    let clauses = clause_fields(diff)
        .map(|c| format!(" {c}"))
        .unwrap_or_default();
    format!(
        "sync={} mode={} key={} fields=[{}]{clauses} state={}",
        spec.label(),
        diff.mode,
        key_label(spec),
        diff.fields.join(", "),
        run.state_location()
    )
}

/// A diff's batches, produced all at once by `diff`, as the operator's output stream.
pub fn diff_output(
    schema: SchemaRef,
    diff: impl std::future::Future<Output = Result<Vec<RecordBatch>>> + Send + 'static,
    output_rows: datafusion::physical_plan::metrics::Count,
) -> SendableRecordBatchStream {
    let stream = futures::stream::once(diff)
        .map_ok(|batches| futures::stream::iter(batches.into_iter().map(Ok)))
        .try_flatten()
        .inspect_ok(move |b: &RecordBatch| output_rows.add(b.num_rows()));
    Box::pin(RecordBatchStreamAdapter::new(schema, stream))
}

impl DisplayAs for DiffExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DiffExec: {}", describe_diff(&self.run))
    }
}

impl ExecutionPlan for DiffExec {
    fn name(&self) -> &'static str {
        "DiffExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    /// Every input partition is read here, each through a cursor of its own over the sorted
    /// snapshot: a scan's partitions are each in key order, their interleaving is not.
    fn required_input_distribution(&self) -> Vec<Distribution> {
        vec![Distribution::UnspecifiedDistribution]
    }

    fn benefits_from_input_partitioning(&self) -> Vec<bool> {
        vec![false]
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn replace_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
        _options: ReplaceChildrenOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(DiffExec::new(
            children.swap_remove(0),
            Arc::clone(&self.run),
        )))
    }

    #[allow(deprecated)]
    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        self.replace_children(
            children,
            ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
        )
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        if partition != 0 {
            return Err(DataFusionError::Internal(format!(
                "DiffExec has one output partition, not {partition}"
            )));
        }
        // One task per input partition reads its batches and hashes them (the part of the diff
        // that needs no snapshot), so that partitions decode and hash in parallel.
        let partitions = self.input.properties().partitioning.partition_count();
        let (tx, rx) = tokio::sync::mpsc::channel(HASHED_AHEAD * partitions.max(1));
        let mut tasks = vec![];
        for p in 0..partitions {
            let mut stream = self.input.execute(p, Arc::clone(&context))?;
            let spec = self.run.spec.diff.clone();
            let tx = tx.clone();
            tasks.push(SpawnedTask::spawn(async move {
                while let Some(batch) = stream.next().await {
                    let hashed = batch.and_then(|b| {
                        let h = Hashed::of(&spec, &b).map_err(DataFusionError::from)?;
                        Ok((p, b, h))
                    });
                    let failed = hashed.is_err();
                    if tx.send(hashed).await.is_err() || failed {
                        break;
                    }
                }
            }));
        }
        let input = Tagged {
            schema: self.input.schema(),
            batches: received(rx, tasks, "reading the model"),
        };
        let run = Arc::clone(&self.run);
        let schema = Arc::clone(&self.schema);
        let output_rows = MetricBuilder::new(&self.metrics).output_rows(partition);
        // The diff runs as a task of its own, sending its batches here: during the scan when it
        // streams, else at the end.
        let (out, rx) = tokio::sync::mpsc::channel(STREAMED_AHEAD);
        let task = SpawnedTask::spawn({
            let schema = Arc::clone(&schema);
            async move {
                let batches = match diff_stream(input, run, schema, &out).await {
                    Ok(batches) => batches.into_iter().map(Ok).collect(),
                    Err(e) => vec![Err(e)],
                };
                for batch in batches {
                    if out.send(batch).await.is_err() {
                        break;
                    }
                }
            }
        });
        let stream = received(rx, vec![task], "the diff")
            .inspect_ok(move |b: &RecordBatch| output_rows.add(b.num_rows()));
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, stream)))
    }
}

/// Passes a sync's change batches to its sink and logs each as the sink takes it (see
/// [`super::changelog`]). A dry run logs nothing.
#[derive(Debug)]
pub struct ChangeLogExec {
    input: Arc<dyn ExecutionPlan>,
    run: Arc<SyncRun>,
    metrics: ExecutionPlanMetricsSet,
}

impl ChangeLogExec {
    pub fn new(input: Arc<dyn ExecutionPlan>, run: Arc<SyncRun>) -> Self {
        Self {
            input,
            run,
            metrics: ExecutionPlanMetricsSet::new(),
        }
    }
}

impl DisplayAs for ChangeLogExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kept = self
            .run
            .spec
            .options
            .changes_retention
            .map(super::changelog::shown_retention)
            .unwrap_or_default();
        write!(
            f,
            "ChangeLogExec: each record sent, to {} (sluice.changes), kept {kept}",
            self.run.changes_location()
        )
    }
}

impl ExecutionPlan for ChangeLogExec {
    fn name(&self) -> &'static str {
        "ChangeLogExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        self.input.properties()
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![true]
    }

    /// The diff's one partition, as it is: a repartition here would reorder what the sink
    /// receives and delay its errors.
    fn required_input_distribution(&self) -> Vec<Distribution> {
        vec![Distribution::SinglePartition]
    }

    fn benefits_from_input_partitioning(&self) -> Vec<bool> {
        vec![false]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn replace_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
        _options: ReplaceChildrenOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(ChangeLogExec::new(
            children.swap_remove(0),
            Arc::clone(&self.run),
        )))
    }

    #[allow(deprecated)]
    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        self.replace_children(
            children,
            ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
        )
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let input = self.input.execute(partition, context)?;
        let run = Arc::clone(&self.run);
        let logged = input.inspect_ok(move |batch| run.log_changes(batch));
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            self.input.schema(),
            logged,
        )))
    }
}

/// Change batches a streaming diff sends ahead of the sink: enough for the sink's next
/// transaction-sized batch to be ready by the time its current one is written (32 batches of
/// 8,192 rows), so that reading the model and the destination's ingest overlap.
const STREAMED_AHEAD: usize = 32;

/// Batches each input partition task reads ahead.
const HASHED_AHEAD: usize = 2;

/// The model's batches, each with the input partition it came from and its hashes.
struct Tagged {
    schema: SchemaRef,
    batches: futures::stream::BoxStream<'static, Result<(usize, RecordBatch, Hashed)>>,
}

/// What `tasks` send on `rx`, then, once every sender is gone, an error if any of them panicked
/// or was cancelled: a closed channel alone is not the end of the input, since a task that
/// panics drops its sender too (a truncated model would read as a complete one, and a mirror
/// sync would delete the rest). The tasks stop when the stream is dropped.
fn received<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<Result<T>>,
    tasks: Vec<SpawnedTask<()>>,
    what: &'static str,
) -> futures::stream::BoxStream<'static, Result<T>> {
    let items = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let end = futures::stream::once(async move {
        for task in tasks {
            if let Err(e) = task.join().await {
                let why = if e.is_panic() {
                    let panic = e.into_panic();
                    panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "a panic".into())
                } else {
                    "it was cancelled".into()
                };
                return Some(Err(DataFusionError::Execution(format!(
                    "{what} failed ({why}); the run stops and commits nothing it did not deliver"
                ))));
            }
        }
        None
    })
    .filter_map(futures::future::ready);
    Box::pin(items.chain(end))
}

async fn diff_stream(
    mut input: Tagged,
    run: Arc<SyncRun>,
    schema: SchemaRef,
    out: &tokio::sync::mpsc::Sender<Result<RecordBatch>>,
) -> Result<Vec<RecordBatch>> {
    let spec = run.spec.diff.clone();
    let started = std::time::Instant::now();
    let mut snapshot = run.snapshot()?;
    if needs_field_hashes(&spec, &snapshot) {
        // The model no longer maps some stored field: compare field by field.
        snapshot = Arc::new((*snapshot).clone().loaded().await?);
    }
    let mut differ = Differ::new(spec.clone(), Arc::clone(&snapshot))?;
    tracing::debug!(
        ms = started.elapsed().as_millis() as u64,
        "DiffExec: snapshot index built"
    );
    let streaming = run.stream_first_run()?;
    let mut kept: Vec<(RecordBatch, Vec<u32>)> = vec![];
    let mut key_rejects = vec![];
    let model_schema = model_fields(&input.schema, &run);
    let fields: Vec<usize> = (0..spec.fields.len()).collect();
    while let Some(batch) = input.batches.next().await {
        let (stream, batch, hashed) = batch?;
        let d = differ.push_from(&hashed, stream)?;
        // (A conditional write's clause columns have served.)
        let batch = match batch.num_columns() == fields.len() {
            true => batch,
            false => batch.project(&fields)?,
        };
        let rows: Vec<u32> = (0..batch.num_rows() as u32)
            .filter(|r| d.change_of_row[*r as usize].is_some())
            .collect();
        if !rows.is_empty() {
            let ids: Vec<u32> = rows
                .iter()
                .map(|r| d.change_of_row[*r as usize].expect("filtered"))
                .collect();
            let taken = if rows.len() == batch.num_rows() {
                batch.clone()
            } else {
                compact(take_record_batch(&batch, &UInt32Array::from(rows))?)?
            };
            if streaming {
                let changes =
                    with_change_columns(&schema, taken.columns().to_vec(), &ids, differ.changes())?;
                if out.send(Ok(changes)).await.is_err() {
                    return Err(DataFusionError::Execution(
                        "the sink stopped reading the changes".into(),
                    ));
                }
            } else {
                kept.push((taken, ids));
            }
        }
        if !d.null_key_rows.is_empty() {
            key_rejects.extend(null_key_rejects(&batch, &d.null_key_rows, &run)?);
        }
    }
    tracing::debug!(
        ms = started.elapsed().as_millis() as u64,
        rss_mb = crate::sync::rss_mb(),
        "DiffExec: model classified"
    );
    // Which fields the changed records changed: one stored hash column at a time.
    for f in differ.fields_to_read() {
        differ.resolve(f, &snapshot.field_column(f).await?);
    }
    let (changes, counts) = differ.finish()?;
    let out = emit_changes(
        &run,
        &schema,
        &model_schema,
        kept,
        changes,
        counts,
        key_rejects,
    )
    .await?;
    run.prepare_commit();
    Ok(out)
}

/// The end of a diff, whichever ran it: checks the safety rails, writes the intent, and returns
/// the change batches (the `kept` model rows with their change ids, then the deletes).
pub(crate) async fn emit_changes(
    run: &SyncRun,
    schema: &SchemaRef,
    model_schema: &SchemaRef,
    kept: Vec<(RecordBatch, Vec<u32>)>,
    changes: Changes,
    counts: DiffCounts,
    key_rejects: Vec<Rejected>,
) -> Result<Vec<RecordBatch>> {
    // A sample run: only its records are sent, and the rails weigh those.
    let (mut changes, mut counts) = (changes, counts);
    if let Some(sample) = &run.sample {
        let (kept, of) = take_sample(&mut changes, sample);
        run.set_sampled(kept, of);
        let DiffCounts {
            rows,
            unchanged,
            null_keys,
            duplicates,
            ..
        } = counts;
        counts = DiffCounts {
            rows,
            unchanged,
            null_keys,
            duplicates,
            ..Default::default()
        };
        counts.count_changes(&changes);
    }
    if let Err(refusal) = check_rails(run, &counts) {
        if !run.dry_run {
            return Err(DataFusionError::from(Error::Write { message: refusal }));
        }
        // A dry run reports what it found and that a real run would refuse.
        run.set_changes(Changes::default(), counts, key_rejects)?;
        run.set_refusal(refusal);
        return Ok(vec![]);
    }
    // Write-ahead: the keys of every change are recorded before any of them is sent (a streaming
    // first run: before any of them is committed).
    run.write_intent(&changes).await?;
    let mut out = Vec::with_capacity(kept.len() + 1);
    for (batch, ids) in kept {
        // Rows replaced by a later row with the same key (keep_last) are dropped, and so are
        // changes that send nothing.
        let sent = |id: &u32| changes[*id as usize].live && changes[*id as usize].sends();
        let (batch, ids) = if ids.iter().all(sent) {
            (batch, ids)
        } else {
            let live: BooleanArray = ids.iter().map(|id| Some(sent(id))).collect();
            let ids: Vec<u32> = ids.into_iter().filter(sent).collect();
            (filter_record_batch(&batch, &live)?, ids)
        };
        if !ids.is_empty() {
            out.push(with_change_columns(
                schema,
                batch.columns().to_vec(),
                &ids,
                &changes,
            )?);
        }
    }
    if let Some(deletes) = delete_batch(schema, model_schema, run, &changes)? {
        out.push(deletes);
    }
    run.set_changes(changes, counts, key_rejects)?;
    Ok(out)
}

/// Keeps only a sample run's records among the changes: the others are no longer live, so they
/// are neither sent nor committed (the state keeps what it had for them, and the next run finds
/// them again). Returns (records kept, records the diff found to send).
fn take_sample(changes: &mut Changes, sample: &Sample) -> (u64, u64) {
    let mut sent: Vec<u32> = (0..changes.len() as u32)
        .filter(|id| changes[*id as usize].live && changes[*id as usize].sends())
        .collect();
    let of = sent.len() as u64;
    match sample {
        Sample::First(n) => {
            // Key order: integers by value, text by bytes (and integers before text).
            sent.sort_by(
                |a, b| match (&changes[*a as usize].key, &changes[*b as usize].key) {
                    (Key::Int(x), Key::Int(y)) => x.cmp(y),
                    (Key::Str(x), Key::Str(y)) => x.cmp(y),
                    (Key::Int(_), Key::Str(_)) => std::cmp::Ordering::Less,
                    (Key::Str(_), Key::Int(_)) => std::cmp::Ordering::Greater,
                },
            );
            sent.truncate(*n);
        }
        Sample::Keys { keys, .. } => {
            let wanted: std::collections::HashSet<&str> = keys.iter().map(String::as_str).collect();
            sent.retain(|id| wanted.contains(changes[*id as usize].key.to_string().as_str()));
        }
    }
    let mut keep = vec![false; changes.len()];
    for id in &sent {
        keep[*id as usize] = true;
    }
    for (c, keep) in changes.iter_mut().zip(keep) {
        c.live &= keep;
    }
    (sent.len() as u64, of)
}

/// Copies only the strings a few taken rows use: a taken view array still points into the
/// whole batch's string buffers, and keeping a few rows of every batch would keep them all.
pub(crate) fn compact(batch: RecordBatch) -> Result<RecordBatch> {
    let columns = batch
        .columns()
        .iter()
        .map(|c| -> ArrayRef {
            match c.data_type() {
                DataType::Utf8View => Arc::new(c.as_string_view().gc()),
                DataType::BinaryView => Arc::new(c.as_binary_view().gc()),
                _ => Arc::clone(c),
            }
        })
        .collect();
    Ok(RecordBatch::try_new(batch.schema(), columns)?)
}

fn with_change_columns(
    schema: &SchemaRef,
    mut columns: Vec<ArrayRef>,
    ids: &[u32],
    changes: &[Change],
) -> Result<RecordBatch> {
    columns.push(Arc::new(UInt8Array::from_iter_values(
        ids.iter().map(|id| changes[*id as usize].op.code()),
    )));
    columns.push(Arc::new(UInt64Array::from_iter_values(
        ids.iter().map(|id| changes[*id as usize].changed),
    )));
    columns.push(Arc::new(UInt32Array::from(ids.to_vec())));
    Ok(RecordBatch::try_new(Arc::clone(schema), columns)?)
}

/// Snapshot keys absent from the model, as rows holding only the key.
fn delete_batch(
    schema: &SchemaRef,
    model: &SchemaRef,
    run: &SyncRun,
    changes: &[Change],
) -> Result<Option<RecordBatch>> {
    let spec = &run.spec.diff;
    let (Some(key), false) = (spec.key, spec.mode.listed_deletes()) else {
        return Ok(None);
    };
    let ids: Vec<u32> = changes
        .iter()
        .enumerate()
        .filter(|(_, c)| c.live && c.op == Op::Delete && !c.has_hashes())
        .map(|(i, _)| i as u32)
        .collect();
    if ids.is_empty() {
        return Ok(None);
    }
    let keys: Vec<_> = ids.iter().map(|id| &changes[*id as usize].key).collect();
    let key_values = cast(&key_array(&keys), model.field(key).data_type())?;
    let mut columns: Vec<ArrayRef> = model
        .fields()
        .iter()
        .enumerate()
        .map(|(i, f)| {
            if i == key {
                Arc::clone(&key_values)
            } else {
                new_null_array(f.data_type(), ids.len())
            }
        })
        .collect();
    // A composite key: its parts too, which the destination matches by.
    if !spec.key_parts.is_empty() {
        let split: Vec<Vec<String>> = keys
            .iter()
            .map(|k| {
                let text = k.to_string();
                split_composite_key(&text, spec.key_parts.len()).ok_or_else(|| {
                    DataFusionError::from(Error::State {
                        message: format!(
                            "sync {}: the state holds the key '{text}', which is not a key of ({}); RESET SYNC {} to resync",
                            run.spec.label(),
                            spec.key_parts.join(", "),
                            run.spec.label()
                        ),
                    })
                })
            })
            .collect::<Result<_>>()?;
        for (n, part) in spec.key_parts.iter().enumerate() {
            let i = model.index_of(part)?;
            let text = StringArray::from_iter_values(split.iter().map(|p| p[n].as_str()));
            columns[i] = cast(&text, model.field(i).data_type())?;
        }
    }
    Ok(Some(with_change_columns(schema, columns, &ids, changes)?))
}

pub(crate) fn null_key_rejects(
    batch: &RecordBatch,
    rows: &[u32],
    run: &SyncRun,
) -> Result<Vec<Rejected>> {
    let taken = take_record_batch(batch, &UInt32Array::from(rows.to_vec()))?;
    let lines = json_lines(&taken).map_err(DataFusionError::from)?;
    let key = run.spec.key_name().unwrap_or_default();
    Ok(lines
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|line| Rejected {
            key: None,
            code: "null_key".into(),
            message: format!(
                "the key field '{key}' is null, so the record cannot be matched; filter such rows out of the model or give them a key"
            ),
            payload: bytes::Bytes::copy_from_slice(line),
            attempts: 0,
            change: None,
        })
        .collect())
}

/// Safety rails: refuse to run (nothing sent) and say why.
fn check_rails(run: &SyncRun, counts: &DiffCounts) -> std::result::Result<(), String> {
    let options = &run.spec.options;
    let label = run.spec.label();
    let synced = run.snapshot_rows() as u64;
    let refuse = Err;
    if run.spec.diff.mode.deletes()
        && counts.rows == 0
        && synced > 0
        && options.abort_on_empty_source
    {
        return refuse(format!(
            "sync {label}: the model returned no rows, so this sync would delete all {synced} records it synced; nothing was sent. If the model really is empty, set OPTIONS (on_empty_source 'allow')"
        ));
    }
    if let Some(max) = options.max_deletes
        && counts.deletes > max
    {
        return refuse(format!(
            "sync {label} would delete {} records, more than max_deletes {max}; nothing was sent. Check the model, or raise max_deletes",
            counts.deletes
        ));
    }
    if let Some(pct) = options.max_delete_pct
        && synced > 0
        && (counts.deletes as f64) * 100.0 / (synced as f64) > pct
    {
        return refuse(format!(
            "sync {label} would delete {} of {synced} synced records ({:.1}%), more than max_delete_pct {pct}; nothing was sent. Check the model, or raise max_delete_pct",
            counts.deletes,
            counts.deletes as f64 * 100.0 / synced as f64
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 17: a task that panics after sending some items ends the stream with an error, not
    /// as if its input had ended.
    #[tokio::test]
    async fn a_panicking_task_is_an_error_not_the_end_of_input() {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let task = SpawnedTask::spawn(async move {
            tx.send(Ok(1)).await.unwrap();
            tx.send(Ok(2)).await.unwrap();
            panic!("index out of bounds");
        });
        let items: Vec<Result<i32>> = received(rx, vec![task], "reading the model")
            .collect()
            .await;
        assert_eq!(items.len(), 3);
        assert_eq!(items[1].as_ref().unwrap(), &2);
        let err = items[2].as_ref().unwrap_err().to_string();
        assert!(
            err.contains("reading the model failed (index out of bounds)"),
            "{err}"
        );

        // A task that ends normally ends the stream with its items only.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let task = SpawnedTask::spawn(async move {
            tx.send(Ok(7)).await.unwrap();
        });
        let items: Vec<Result<i32>> = received(rx, vec![task], "x").collect().await;
        assert_eq!(items.len(), 1);
        assert!(items[0].is_ok());
    }
}
