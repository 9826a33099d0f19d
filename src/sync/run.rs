//! One run of a sync: loads its state, holds the diff's changes, and commits only what the
//! destination acknowledged.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, RecordBatch, StringArray, UInt32Array, UInt64Array, make_array,
};
use datafusion::arrow::compute::{cast, concat, take};
use datafusion::arrow::datatypes::UInt64Type;

use super::SyncOptions;
use super::changelog::{self, ChangeLogWriter, LogSpec};
use super::diff::{Change, Changes, DiffCounts, DiffSpec};
use super::hash::{HASH_VERSION, Key, RowHashes, UNSENT_HASH};
use super::remote::{RemoteCommit, RemoteState, RemoteUpsert};
use super::snapshot::{FieldHashes, Snapshot, key_array, key_order};
use super::state::{
    FORMAT, Manifest, RejectEntry, RunRecord, StateStore, SyncLock, now, snapshot_file,
};
use crate::contract::{Ack, Op, Rejected, Sample};
use crate::delivery::metrics::DeliveryStats;
use crate::delivery::{Checkpoints, DeliveryOutcome};
use crate::error::{Error, Result};

/// What a sync is: where it writes, how records are matched, what it may do.
#[derive(Debug, Clone)]
pub struct SyncSpec {
    /// The state directory: the sync's name, or for an unnamed statement one derived from the
    /// destination object, the key and the mapped fields.
    pub id: String,
    /// Named syncs (`CREATE SYNC`).
    pub name: Option<String>,
    /// `connection.object`.
    pub target: String,
    pub diff: DiffSpec,
    pub options: SyncOptions,
    /// The destination's (rate limit, concurrency), for dry-run estimates.
    pub pacing: (Option<f64>, Option<usize>),
    /// `diff 'warehouse'`: the snapshot lives in the source warehouse and the diff runs there.
    pub remote: Option<Arc<dyn RemoteState>>,
}

impl SyncSpec {
    /// The state id of an unnamed statement.
    pub fn unnamed_id(target: &str, key: Option<&str>, fields: &[String], what: &str) -> String {
        let mut sorted: Vec<&str> = fields.iter().map(String::as_str).collect();
        sorted.sort();
        let signature = format!("{target}|{}|{}|{what}", key.unwrap_or(""), sorted.join(","));
        let hash = xxhash_rust::xxh3::xxh3_64(signature.as_bytes());
        let safe: String = target
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        format!("{safe}-{hash:016x}")
    }

    pub fn key_name(&self) -> Option<&str> {
        self.diff.key.map(|k| self.diff.fields[k].as_str())
    }

    /// The sync's label in messages and tables.
    pub fn label(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.id)
    }
}

/// What the engine reports after a run.
#[derive(Debug, Clone, Default)]
pub struct RunSummary {
    pub record: RunRecord,
    pub counts: DiffCounts,
    /// Every record refused this run (by the destination, or for a null key).
    pub rejects: Vec<Rejected>,
    /// A sample run's (records sent, records the diff found to send).
    pub sampled: Option<(u64, u64)>,
}

/// Where a run is in its life. The engine, `DiffExec` and the sink each drive part of it; every
/// step names the phases it may follow and refuses any other, so a call out of order is an
/// error that names both (and commits nothing), not a commit built on the wrong state.
///
/// ```text
/// Planned ──prepare──► Prepared ──stream_first_run──► Diffing ──set_changes──► Diffed
///    │  set_atomic_sink    │  (the warehouse diff goes straight to set_changes)    │
///    └─────────────────────┴──────────── finish (from any phase, once) ──────────┴──► Finished
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Phase {
    /// Planned: nothing read yet; a sink may still say it holds one transaction.
    #[default]
    Planned,
    /// The lock is held and the committed state loaded.
    Prepared,
    /// The diff is reading the model; whether it streams is decided.
    Diffing,
    /// The diff's changes are recorded; the sink is sending them.
    Diffed,
    /// Committed (or the failure recorded).
    Finished,
}

#[derive(Default)]
struct Inner {
    phase: Phase,
    lock: Option<SyncLock>,
    manifest: Option<Manifest>,
    snapshot: Option<Arc<Snapshot>>,
    previous_rejects: Vec<RejectEntry>,
    changes: Arc<Changes>,
    counts: DiffCounts,
    key_rejects: Vec<Rejected>,
    record: RunRecord,
    refusal: Option<String>,
    /// Intent files of earlier runs folded into the loaded snapshot, and this run's own.
    intents: Vec<String>,
    /// Records in a remote state (`diff 'warehouse'`), for delete caps.
    remote_rows: u64,
    /// The sink holds the run's writes in one transaction until the change stream ends.
    atomic_sink: bool,
    /// The diff sends changes while it reads the model (see [`SyncRun::stream_first_run`]).
    streaming: bool,
    /// The next snapshot as it will be if every change is acknowledged, being built while the
    /// sink finishes (see [`SyncRun::prepare_commit`]).
    prepared: Option<tokio::task::JoinHandle<Option<Snapshot>>>,
    /// The manifest of this run's last checkpoint, and when and where in the delivery it was
    /// taken (see [`Checkpoints`]).
    checkpoint: Option<Manifest>,
    checkpointed_at: Option<std::time::Instant>,
    checkpointed_settled: usize,
    checkpoints_taken: u32,
    /// A sample run's (records kept, records the diff found to send).
    sampled: Option<(u64, u64)>,
}

/// One run, shared by the engine, `DiffExec` and the sink.
pub struct SyncRun {
    pub spec: SyncSpec,
    pub run_id: String,
    pub dry_run: bool,
    /// A sample run: only these records of the diff are sent and committed.
    pub sample: Option<Sample>,
    state: StateStore,
    inner: Mutex<Inner>,
    /// The change log, opened when the sink takes the first change batch.
    log: Mutex<ChangeLog>,
}

/// A run's change log (see [`super::changelog`]).
#[derive(Debug, Default)]
enum ChangeLog {
    #[default]
    Closed,
    Open(Box<ChangeLogWriter>),
    /// It could not be written (said once); the run goes on.
    Failed,
}

impl std::fmt::Debug for SyncRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncRun")
            .field("sync", &self.spec.id)
            .field("run_id", &self.run_id)
            .finish()
    }
}

/// A run dropped after it started but before it finished (Ctrl-C cancels the statement's future)
/// releases its lock, then records itself as interrupted.
impl Drop for SyncRun {
    fn drop(&mut self) {
        let inner = self.inner.get_mut().expect("sync run lock");
        let Some(lock) = inner.lock.take() else {
            return;
        };
        if inner.phase == Phase::Finished || self.dry_run {
            return;
        }
        let mut record = std::mem::take(&mut inner.record);
        super::state::interrupted(&mut record);
        record.finished_at = Some(now());
        let state = self.state.clone();
        super::cleanup::spawn(async move {
            // The lock first: once the record says interrupted, the sync is free to run.
            lock.release().await;
            let _ = state.put_run(&record).await;
        });
    }
}

impl SyncRun {
    pub fn new(spec: SyncSpec, state: StateStore, dry_run: bool) -> Self {
        Self {
            spec,
            run_id: new_run_id(),
            dry_run,
            sample: None,
            state,
            inner: Mutex::default(),
            log: Mutex::default(),
        }
    }

    /// The run's id chosen by its caller, when it did (else a new one).
    pub fn with_run_id(mut self, run_id: Option<String>) -> Self {
        if let Some(id) = run_id {
            self.run_id = id;
        }
        self
    }

    /// A sample run of `sample` (see [`Sample`]).
    pub fn with_sample(mut self, sample: Option<Sample>) -> Self {
        self.sample = sample;
        self
    }

    /// A sample run's (records kept, records the diff found to send), once its diff has ended.
    pub fn sampled(&self) -> Option<(u64, u64)> {
        self.inner().sampled
    }

    /// Records what a sample run kept of the diff.
    pub fn set_sampled(&self, kept: u64, of: u64) {
        self.inner().sampled = Some((kept, of));
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("sync run lock")
    }

    /// Moves the run from one of `from` to `to`, or says which step came out of order.
    fn step(&self, inner: &mut Inner, step: &str, from: &[Phase], to: Phase) -> Result<()> {
        if !from.contains(&inner.phase) {
            return Err(Error::State {
                message: format!(
                    "sync {}: {step} was called while the run is {:?}; it follows {}. This is a bug in sluice: nothing was committed, and the next run sends what this one did not settle",
                    self.spec.label(),
                    inner.phase,
                    from.iter()
                        .map(|p| format!("{p:?}"))
                        .collect::<Vec<_>>()
                        .join(" or ")
                ),
            });
        }
        inner.phase = to;
        Ok(())
    }

    /// Where the run is in its life.
    pub fn phase(&self) -> Phase {
        self.inner().phase
    }

    /// Where the state of this sync lives (for EXPLAIN).
    pub fn state_location(&self) -> String {
        match &self.spec.remote {
            Some(remote) => remote.location(),
            None => format!("{}/syncs/{}", self.state.display(), self.spec.id),
        }
    }

    /// Where this sync's change logs are (for EXPLAIN).
    pub fn changes_location(&self) -> String {
        format!("{}/changes/{}/", self.state.display(), self.spec.id)
    }

    /// Logs a change batch the sink has just taken (see [`super::changelog`]). A log that cannot
    /// be written is reported once and the run goes on: it records the delivery, it is not part
    /// of it.
    pub fn log_changes(&self, batch: &RecordBatch) {
        if self.dry_run || self.spec.options.changes_retention.is_none() || batch.num_rows() == 0 {
            return;
        }
        let mut log = self.log.lock().expect("change log lock");
        let written = match &mut *log {
            ChangeLog::Failed => return,
            ChangeLog::Open(writer) => writer.append(batch),
            ChangeLog::Closed => {
                let spec = LogSpec {
                    sync: &self.spec.id,
                    label: self.spec.label(),
                    target: &self.spec.target,
                    key: self.spec.key_name(),
                    skip_nulls: self.spec.options.null_policy == super::NullPolicy::Skip,
                };
                ChangeLogWriter::create(&self.state, spec, &self.run_id, batch.schema_ref())
                    .and_then(|mut writer| {
                        writer.append(batch)?;
                        Ok(writer)
                    })
                    .map(|writer| *log = ChangeLog::Open(Box::new(writer)))
            }
        };
        if let Err(e) = written {
            tracing::warn!(
                sync = %self.spec.label(),
                error = %e,
                "This run's change log (sluice.changes) could not be written; the sync goes on without it."
            );
            *log = ChangeLog::Failed;
        }
    }

    /// Ends the change log: its file, then what the destination answered per record, then the
    /// logs the retention no longer keeps. Failures are reported, never the run's.
    async fn end_change_log(&self, log: Option<(ChangeLogWriter, Option<RecordBatch>)>) {
        let label = self.spec.label();
        if let Some((writer, outcomes)) = log {
            let written = match writer.finish(&self.state).await {
                Ok(_) => match outcomes {
                    Some(o) => {
                        changelog::put_outcomes(&self.state, &self.spec.id, &self.run_id, &o).await
                    }
                    None => Ok(()),
                },
                Err(e) => Err(e),
            };
            if let Err(e) = written {
                tracing::warn!(sync = %label, error = %e, "This run's change log (sluice.changes) could not be completed.");
            }
        }
        if self.dry_run {
            return;
        }
        match changelog::expire(
            &self.state,
            &self.spec.id,
            self.spec.options.changes_retention,
        )
        .await
        {
            Ok(0) => {}
            Ok(n) => tracing::debug!(sync = %label, files = n, "Expired change logs removed."),
            Err(e) => {
                tracing::warn!(sync = %label, error = %e, "Expired change logs could not be removed.")
            }
        }
    }

    /// The hash scheme of this sync's snapshot.
    fn hash_version(&self) -> &'static str {
        match &self.spec.remote {
            Some(remote) => remote.hash_version(),
            None => HASH_VERSION,
        }
    }

    /// Takes the sync's lock (not for dry runs), loads its committed state and records the
    /// run as started.
    ///
    /// Long because loading state is one ordered protocol: the lock, the manifest and its format,
    /// the run record, a remote state, and crashed runs' intents folded into the snapshot.
    pub async fn prepare(&self) -> Result<()> {
        {
            let mut inner = self.inner();
            self.step(&mut inner, "prepare", &[Phase::Planned], Phase::Prepared)?;
        }
        let started = std::time::Instant::now();
        let id = &self.spec.id;
        let lock = if self.dry_run {
            None
        } else {
            let lock = self.state.lock(id, &self.run_id).await?;
            // A lock left by a dead process: before this run's own record, the runs that died
            // without recording their end are settled (only then: it lists the sync's history).
            if lock.taken_over.is_some() {
                let settled = self.state.settle_dead_runs(id).await?;
                tracing::warn!(
                    sync = %self.spec.label(),
                    runs = settled,
                    "Earlier runs of this sync stopped before they finished; recorded them as interrupted. Records they sent without a commit are sent again."
                );
            }
            Some(lock)
        };
        let manifest = self.state.manifest(id).await?;
        let (snapshot, rejects) = match &manifest {
            Some(m) => {
                if m.key.as_deref() != self.spec.key_name() && !self.spec.diff.mode.listed_deletes()
                {
                    return Err(Error::State {
                        message: format!(
                            "sync {} matched records by {} until now and now by {}; its state cannot be reused. RESET SYNC {} to resync every record under the new key",
                            self.spec.label(),
                            m.key
                                .as_deref()
                                .map(|k| format!("'{k}'"))
                                .unwrap_or("row content (no key)".into()),
                            self.spec
                                .key_name()
                                .map(|k| format!("'{k}'"))
                                .unwrap_or("row content (no key)".into()),
                            self.spec.label()
                        ),
                    });
                }
                if m.hash != self.hash_version() {
                    let (was, is) = match &self.spec.remote {
                        Some(_) => ("locally (diff 'local')", "in the warehouse"),
                        None => ("in the warehouse (diff 'warehouse')", "locally"),
                    };
                    return Err(Error::State {
                        message: format!(
                            "sync {} kept its state {was} until now and would now diff {is}; RESET SYNC {} to start over with the new diff (its next run resends every record)",
                            self.spec.label(),
                            self.spec.label()
                        ),
                    });
                }
                let snapshot = match &self.spec.remote {
                    Some(_) => Snapshot::empty(vec![]),
                    None => self.state.snapshot(id, m).await?,
                };
                (snapshot, self.state.rejects(id, m).await?)
            }
            None => (Snapshot::empty(vec![]), vec![]),
        };
        let record = RunRecord {
            run_id: self.run_id.clone(),
            sync: self.spec.label().to_string(),
            target: self.spec.target.clone(),
            mode: self.spec.diff.mode.to_string(),
            started_at: now(),
            status: if self.dry_run { "dry_run" } else { "running" }.into(),
            ..Default::default()
        };
        if !self.dry_run {
            self.state.put_run(&record).await?;
        }
        let remote_rows = match &self.spec.remote {
            Some(remote) => remote.prepare(manifest.is_none()).await?,
            None => 0,
        };
        // Records that runs which stopped before their commit were about to send (a remote
        // state keeps them itself).
        let mut intents = vec![];
        let mut snapshot = snapshot;
        if !self.spec.diff.mode.listed_deletes()
            && self.spec.diff.key.is_some()
            && self.spec.remote.is_none()
        {
            let mut keys = vec![];
            for (name, array) in self.state.intents(id).await? {
                keys.extend((0..array.len()).filter_map(|i| Key::at(&array, i)));
                intents.push(name);
            }
            if !keys.is_empty() {
                // (A run that crashed: rare enough to read every field hash for.)
                snapshot = snapshot.loaded().await?.with_unknown(&keys)?;
            }
        }
        tracing::debug!(
            ms = started.elapsed().as_millis() as u64,
            rows = snapshot.len(),
            rss_mb = crate::sync::rss_mb(),
            "Sync state loaded."
        );
        let mut inner = self.inner();
        inner.lock = lock;
        inner.manifest = manifest;
        inner.intents = intents;
        inner.snapshot = Some(Arc::new(snapshot));
        inner.previous_rejects = rejects;
        inner.record = record;
        inner.remote_rows = remote_rows;
        Ok(())
    }

    /// The committed snapshot (empty before the first commit). Set by [`SyncRun::prepare`].
    pub fn snapshot(&self) -> Result<Arc<Snapshot>> {
        self.inner().snapshot.clone().ok_or_else(|| Error::State {
            message: format!(
                "sync {}: its state was not loaded before it ran",
                self.spec.label()
            ),
        })
    }

    /// Records the diff's result.
    pub fn set_changes(
        &self,
        changes: Changes,
        counts: DiffCounts,
        key_rejects: Vec<Rejected>,
    ) -> Result<()> {
        let mut inner = self.inner();
        self.step(
            &mut inner,
            "set_changes",
            &[Phase::Prepared, Phase::Diffing],
            Phase::Diffed,
        )?;
        inner.changes = Arc::new(changes);
        inner.counts = counts;
        inner.key_rejects = key_rejects;
        Ok(())
    }

    /// Writes the keys of the records this run is about to send, before it sends them. A run
    /// that stops before its commit leaves them behind: the next run treats those records as sent
    /// without an answer (new ones may exist, changed and deleted ones may or may not have
    /// changed), so it sends each again whatever the model then holds, and deletes what the model
    /// no longer has.
    pub async fn write_intent(&self, changes: &[Change]) -> Result<()> {
        if self.dry_run || self.spec.diff.key.is_none() || self.spec.diff.mode.listed_deletes() {
            return Ok(());
        }
        let keys: Vec<&Key> = changes
            .iter()
            .filter(|c| c.live && c.sends())
            .map(|c| &c.key)
            .collect();
        if keys.is_empty() {
            return Ok(());
        }
        if let Some(remote) = &self.spec.remote {
            return remote.write_intent(&keys).await;
        }
        self.state
            .put_intent(&self.spec.id, &self.run_id, key_array(&keys))
            .await?;
        self.inner()
            .intents
            .push(format!("intent-{}.arrow", self.run_id));
        tracing::debug!(keys = keys.len(), "Intent written.");
        Ok(())
    }

    /// The destination's record ids of the given changes, as the committed state knows them.
    pub fn record_ids(&self, changes: &[u32]) -> Vec<Option<String>> {
        let inner = self.inner();
        let ids = inner.snapshot.as_ref().and_then(|s| s.record_ids.as_ref());
        changes
            .iter()
            .map(|c| {
                let row = inner.changes.get(*c as usize)?.row? as usize;
                let ids = ids?;
                (row < ids.len() && ids.is_valid(row)).then(|| ids.value(row).to_string())
            })
            .collect()
    }

    /// A dry run found that a real run would refuse (a safety rail).
    pub fn set_refusal(&self, message: String) {
        self.inner().refusal = Some(message);
    }

    pub fn refusal(&self) -> Option<String> {
        self.inner().refusal.clone()
    }

    /// Called by a sink that writes everything a run sends in one transaction, committed only
    /// once the change stream has ended without an error (and rolled back otherwise).
    pub fn set_atomic_sink(&self) -> Result<()> {
        let mut inner = self.inner();
        let phase = inner.phase;
        self.step(
            &mut inner,
            "set_atomic_sink",
            &[Phase::Planned, Phase::Prepared],
            phase,
        )?;
        inner.atomic_sink = true;
        Ok(())
    }

    /// Called by the diff as it starts: whether it sends changes while it reads the model instead
    /// of after. Only a first run (nothing synced, nothing sent by a stopped run) into an atomic
    /// sink streams: a duplicate key found late, or any other error, then rolls back everything
    /// sent, so "nothing is written before the whole model is checked" still holds; and the
    /// intent (every key) is written at the end of the diff, before the sink's commit.
    pub fn stream_first_run(&self) -> Result<bool> {
        let d = &self.spec.diff;
        let mut inner = self.inner();
        self.step(
            &mut inner,
            "stream_first_run",
            &[Phase::Prepared],
            Phase::Diffing,
        )?;
        inner.streaming = inner.atomic_sink
            && !self.dry_run
            && self.sample.is_none()
            && self.spec.remote.is_none()
            && d.key.is_some()
            && !d.mode.listed_deletes()
            && !d.keep_last
            && inner.snapshot.as_ref().is_some_and(|s| s.is_empty());
        Ok(inner.streaming)
    }

    /// Whether this run's diff streams (see [`SyncRun::stream_first_run`]).
    pub fn streaming(&self) -> bool {
        self.inner().streaming
    }

    /// Starts building a streaming first run's next snapshot as soon as its diff has ended,
    /// while the sink writes its last batches and commits, assuming that every change will be
    /// acknowledged: the sink's one transaction commits all or nothing, so it nearly always is.
    /// [`SyncRun::finish`] uses it only if so, and builds the snapshot itself otherwise. (Its
    /// files are this run's own, which only a commit makes part of the state.)
    pub fn prepare_commit(self: &Arc<Self>) {
        if !self.streaming() || self.dry_run || self.phase() != Phase::Diffed {
            return;
        }
        let run = Arc::clone(self);
        let task = tokio::spawn(async move {
            let (snapshot, changes) = {
                let inner = run.inner();
                (inner.snapshot.clone()?, Arc::clone(&inner.changes))
            };
            let acked: Vec<Ack> = (0..changes.len() as u32).map(Ack::done).collect();
            let settled = vec![true; changes.len()];
            let started = std::time::Instant::now();
            let next = match run
                .next_snapshot(&snapshot, &changes, &acked, &settled, &run.run_id)
                .await
            {
                Ok(next) => run
                    .state
                    .put_snapshot(&run.spec.id, &run.run_id, &next)
                    .await
                    .map(|_| next),
                Err(e) => Err(e),
            };
            match next {
                Ok(next) => {
                    tracing::debug!(
                        ms = started.elapsed().as_millis() as u64,
                        "Next snapshot prepared."
                    );
                    Some(next)
                }
                Err(e) => {
                    // (The commit builds it again, and reports an error that persists.)
                    tracing::debug!(error = %e, "Preparing the next snapshot failed.");
                    None
                }
            }
        });
        self.inner().prepared = Some(task);
    }

    /// The committed snapshot's size (for delete caps).
    pub fn snapshot_rows(&self) -> usize {
        let inner = self.inner();
        match &self.spec.remote {
            Some(_) => inner.remote_rows as usize,
            None => inner.snapshot.as_ref().map(|s| s.len()).unwrap_or(0),
        }
    }

    /// Commits what the destination acknowledged and records the run. `error` is the statement's
    /// error, if it failed (acknowledged work is committed all the same).
    ///
    /// Long because it is the commit protocol in its order (prepared snapshot, remote or local
    /// commit, rejects, run record, lock release): each step needs what the one before decided.
    pub async fn finish(
        &self,
        acked: Vec<Ack>,
        rejected: Vec<Rejected>,
        delivery: Option<DeliveryStats>,
        error: Option<&Error>,
    ) -> Result<RunSummary> {
        {
            // From any phase (a run may fail at any step), once. The phase becomes Finished only
            // once the commit is done: until then a dropped run still releases its lock.
            let mut inner = self.inner();
            let phase = inner.phase;
            let before = [
                Phase::Planned,
                Phase::Prepared,
                Phase::Diffing,
                Phase::Diffed,
            ];
            self.step(&mut inner, "finish", &before, phase)?;
        }
        let prepared = self.inner().prepared.take();
        let prepared = match prepared {
            Some(task) => task.await.ok().flatten(),
            None => None,
        };
        let prepared_files: Vec<String> = match prepared.as_ref().map(|s| &s.hashes) {
            Some(FieldHashes::Stored(stored)) => std::iter::once(snapshot_file(&self.run_id))
                .chain(stored.files().iter().cloned())
                .collect(),
            _ => vec![],
        };
        let mut committed = false;
        let checkpoint = self.inner().checkpoint.take();
        let log = match std::mem::take(&mut *self.log.lock().expect("change log lock")) {
            ChangeLog::Open(writer) => Some(*writer),
            _ => None,
        };
        let (mut record, counts, manifest, snapshot, commit, rejected, intents, log) = {
            let mut inner = self.inner();
            let mut rejected = rejected;
            rejected.extend(std::mem::take(&mut inner.key_rejects));
            let snapshot = inner.snapshot.clone();
            let changes = std::mem::take(&mut inner.changes);
            let mut record = inner.record.clone();
            let counts = inner.counts;
            record.rows_read = counts.rows;
            record.unchanged = counts.unchanged;
            for ack in &acked {
                let Some(c) = changes.get(ack.change as usize) else {
                    continue;
                };
                match (c.op, c.row) {
                    (Op::Delete, _) => record.deleted += 1,
                    (_, None) => record.inserted += 1,
                    (_, Some(_)) => record.updated += 1,
                }
            }
            record.rejected = rejected.len() as u64;
            let log = log.map(|writer| {
                let ids = snapshot.as_ref().and_then(|s| s.record_ids.as_ref());
                let outcomes = changelog::outcomes(&changes, &acked, &rejected, ids);
                if let Err(e) = &outcomes {
                    tracing::warn!(error = %e, "This run's outcomes could not be logged.");
                }
                (writer, outcomes.ok())
            });
            if let Some(d) = delivery {
                record.requests = d.requests;
                record.retries = d.retries;
                record.throttled = d.throttled;
            }
            let commit = (snapshot.is_some() && !self.dry_run).then(|| {
                let mut acked = acked;
                acked.extend(unsent_acks(&changes));
                let rejects = self.merge_rejects(
                    &inner.previous_rejects,
                    &changes,
                    &acked,
                    &rejected,
                    error.is_none(),
                );
                (changes, acked, rejects)
            });
            let intents = std::mem::take(&mut inner.intents);
            (
                record,
                counts,
                inner.manifest.clone(),
                snapshot,
                commit,
                rejected,
                intents,
                log,
            )
        };
        // What was sent and answered is logged before the commit: it holds whether or not the
        // commit then succeeds.
        self.end_change_log(log).await;
        record.finished_at = Some(now());
        record.duration_ms = chrono::DateTime::parse_from_rfc3339(&record.started_at)
            .map(|t| {
                (chrono::Utc::now() - t.with_timezone(&chrono::Utc))
                    .num_milliseconds()
                    .max(0) as u64
            })
            .unwrap_or(0);
        record.error = error.map(|e| e.to_string());
        record.failure = error.and_then(|e| e.facts()).cloned();
        record.status = match (self.dry_run, error, record.rejected) {
            (true, _, _) => "dry_run",
            (_, Some(_), _) => "failed",
            (_, None, 0) => "succeeded",
            (_, None, _) => "partial",
        }
        .into();
        if let (Some((changes, acked, rejects)), Some(snapshot)) = (commit, snapshot) {
            let acked_any = !acked.is_empty();
            let rejects_changed =
                !rejects.is_empty() || manifest.as_ref().is_some_and(|m| m.rejects.is_some());
            // Nothing acknowledged and nothing to remember: the committed state stays as is.
            if acked_any
                || rejects_changed
                || manifest.is_none()
                || !intents.is_empty()
                || checkpoint.is_some()
            {
                tracing::debug!(acked = acked.len(), "Committing the sync state.");
                let settled = settled(changes.len(), &acked, &rejected);
                // Whether the snapshot's main file is written (prepared).
                let mut written = false;
                let next = match &self.spec.remote {
                    Some(remote) => {
                        remote
                            .commit(remote_commit(&self.spec.diff, &changes, &acked, &settled))
                            .await?;
                        Snapshot::empty(self.spec.diff.fields.clone())
                    }
                    None => {
                        // Prepared for every change acknowledged without a record id.
                        let as_prepared = acked.len() == changes.len()
                            && acked.iter().all(|a| a.id.is_none())
                            && {
                                let mut once = vec![false; changes.len()];
                                acked.iter().all(|a| {
                                    once.get_mut(a.change as usize)
                                        .is_some_and(|seen| !std::mem::replace(seen, true))
                                })
                            };
                        match prepared.filter(|_| as_prepared) {
                            Some(next) => {
                                written = true;
                                next
                            }
                            None => {
                                self.next_snapshot(
                                    &snapshot,
                                    &changes,
                                    &acked,
                                    &settled,
                                    &self.run_id,
                                )
                                .await?
                            }
                        }
                    }
                };
                let committed_manifest = self
                    .state
                    .commit(
                        self.new_manifest(&self.run_id),
                        &next,
                        written,
                        &rejects,
                        manifest.as_ref(),
                    )
                    .await?;
                // The run's checkpoints are superseded, and so is a snapshot an earlier run left
                // behind when it stopped after a checkpoint.
                if let Some(checkpoint) = &checkpoint {
                    self.state.forget(&committed_manifest, checkpoint).await;
                }
                self.state.sweep(&committed_manifest).await?;
                tracing::debug!(rows = next.len(), "Sync state committed.");
                // Folded into the committed snapshot: the intents have served.
                self.state.delete_files(&self.spec.id, &intents).await;
                committed = true;
            }
        }
        if !committed {
            self.state
                .delete_files(&self.spec.id, &prepared_files)
                .await;
        }
        if !self.dry_run {
            self.state.put_run(&record).await?;
        }
        let lock = {
            let mut inner = self.inner();
            inner.phase = Phase::Finished;
            inner.lock.take()
        };
        if let Some(lock) = lock {
            lock.release().await;
        }
        Ok(RunSummary {
            record,
            counts,
            rejects: rejected,
            sampled: self.sampled(),
        })
    }

    /// The manifest of a commit whose files are named after `tag` (the run id, or a
    /// checkpoint's); [`StateStore::commit`] fills in the files and counts.
    fn new_manifest(&self, tag: &str) -> Manifest {
        Manifest {
            format: FORMAT,
            hash: self.hash_version().into(),
            sync: self.spec.id.clone(),
            target: self.spec.target.clone(),
            key: self.spec.key_name().map(str::to_string),
            fields: vec![],
            snapshot: String::new(),
            hash_files: vec![],
            rows: 0,
            rejects: None,
            run_id: tag.to_string(),
            committed_at: now(),
            checksum: None,
        }
    }

    /// This run's checkpoints, for a sink whose deliveries are answered as they go; `None` where
    /// a run commits only at its end: a dry run, a sink that holds one transaction, a state kept
    /// in the warehouse, a DELETE of listed keys, or checkpoints turned off.
    pub fn checkpoints(self: &Arc<Self>) -> Option<Arc<dyn Checkpoints>> {
        let options = &self.spec.options;
        let off = self.dry_run
            || self.spec.remote.is_some()
            || self.spec.diff.mode.listed_deletes()
            || (options.checkpoint_every.is_none() && options.checkpoint_records.is_none())
            || {
                let inner = self.inner();
                inner.atomic_sink || inner.streaming
            };
        (!off).then(|| Arc::clone(self) as Arc<dyn Checkpoints>)
    }

    fn merge_rejects(
        &self,
        previous: &[RejectEntry],
        changes: &[Change],
        acked: &[Ack],
        rejected: &[Rejected],
        completed: bool,
    ) -> Vec<RejectEntry> {
        let by_key: HashMap<&str, &RejectEntry> = previous
            .iter()
            .filter_map(|r| r.key.as_deref().map(|k| (k, r)))
            .collect();
        let stamp = now();
        let mut out: Vec<RejectEntry> = rejected
            .iter()
            .map(|r| {
                let op = r
                    .change
                    .and_then(|id| changes.get(id as usize))
                    .map(|c| c.op.as_str())
                    .unwrap_or("none");
                let first = r
                    .key
                    .as_deref()
                    .and_then(|k| by_key.get(k))
                    .map(|p| p.first_seen.clone())
                    .unwrap_or_else(|| stamp.clone());
                RejectEntry {
                    sync: self.spec.label().to_string(),
                    run_id: self.run_id.clone(),
                    target: self.spec.target.clone(),
                    key: r.key.clone(),
                    operation: op.to_string(),
                    error_code: r.code.clone(),
                    error_message: r.message.clone(),
                    payload: String::from_utf8_lossy(&r.payload).into_owned(),
                    attempts: r.attempts,
                    first_seen: first,
                    last_seen: stamp.clone(),
                }
            })
            .collect();
        if !completed {
            // Not every change was attempted: earlier rejects not settled this run still stand.
            let settled: HashSet<String> = acked
                .iter()
                .filter_map(|a| changes.get(a.change as usize).map(|c| c.key.to_string()))
                .chain(rejected.iter().filter_map(|r| r.key.clone()))
                .collect();
            out.extend(
                previous
                    .iter()
                    .filter(|p| p.key.as_ref().is_none_or(|k| !settled.contains(k)))
                    .cloned(),
            );
        }
        out
    }

    /// The snapshot after this run: the previous one with acknowledged updates and deletes
    /// applied and acknowledged new records appended. Unacknowledged changes keep their old
    /// state, so they are sent again next run. The field hashes are built, written to the state
    /// store and dropped one field at a time.
    ///
    /// One function on purpose: one pass merges the old snapshot with the acknowledged changes
    /// field by field, so that at most one field's hashes are in memory, and its steps share the
    /// row maps it builds.
    async fn next_snapshot(
        &self,
        old: &Snapshot,
        changes: &Changes,
        acked: &[Ack],
        settled: &[bool],
        tag: &str,
    ) -> Result<Snapshot> {
        let diff = &self.spec.diff;
        if diff.mode.listed_deletes() {
            return Ok(Snapshot::empty(vec![]));
        }
        // One hash per mapped field except the key (records are matched by the key itself).
        // A key-only mapping keeps an empty-named marker column, so that records sent without
        // an answer can still be told apart (null) from acknowledged ones.
        let stored: Vec<usize> = match diff.key {
            Some(k) => (0..diff.fields.len()).filter(|i| *i != k).collect(),
            None => vec![],
        };
        let marker = diff.key.is_some() && stored.is_empty();
        let fields: Vec<String> = if marker {
            vec![String::new()]
        } else {
            stored.iter().map(|i| diff.fields[*i].clone()).collect()
        };
        let old_column: Vec<Option<usize>> = fields
            .iter()
            .map(|f| old.fields.iter().position(|o| o == f))
            .collect();
        let mut row_change: Vec<u32> = vec![u32::MAX; old.len()];
        // Records whose change got no answer (or was never sent: the run stopped). The destination
        // may hold the change or not, so every field hash becomes unknown and the next run sends
        // the record again whatever the model then holds (were the old hashes kept, a model that
        // went back to the old values would leave the unanswered change in the destination).
        let mut unanswered = vec![false; old.len()];
        for (id, c) in changes.iter().enumerate() {
            if let Some(j) = c.row.filter(|_| c.live && !settled[id]) {
                unanswered[j as usize] = true;
            }
        }
        // (change, record id, known): unknown = sent without an answer.
        let mut new_rows: Vec<(u32, Option<&String>, bool)> = vec![];
        let mut ids: HashMap<u32, &String> = HashMap::new();
        for Ack {
            change: id,
            id: record_id,
        } in acked
        {
            let Some(c) = changes.get(*id as usize) else {
                continue;
            };
            if let Some(r) = record_id {
                ids.insert(*id, r);
            }
            match c.row {
                Some(j) => row_change[j as usize] = *id,
                None if c.op != Op::Delete => new_rows.push((*id, record_id.as_ref(), true)),
                None => {}
            }
        }
        if diff.key.is_some() {
            for (id, c) in changes.iter().enumerate() {
                let id = id as u32;
                if c.live && c.row.is_none() && c.op != Op::Delete && !settled[id as usize] {
                    new_rows.push((id, None, false));
                }
            }
        }
        let kept: Vec<u32> = (0..old.len() as u32)
            .filter(|j| {
                let id = row_change[*j as usize];
                id == u32::MAX || changes[id as usize].op != Op::Delete
            })
            .collect();
        let kept_idx = UInt32Array::from(kept.clone());
        let new_keys: Vec<&Key> = new_rows
            .iter()
            .map(|(id, _, _)| &changes[*id as usize].key)
            .collect();
        // A key whose type changed (integers to text) is kept as text on both sides.
        let appended = key_array(&new_keys);
        let keys = if old.is_empty() {
            appended
        } else {
            let old_keys = take(&old.keys, &kept_idx, None)?;
            if new_keys.is_empty() {
                // (An empty `appended` is typed Int64 whatever the keys' type.)
                old_keys
            } else if appended.data_type() == old_keys.data_type() {
                concat(&[old_keys.as_ref(), appended.as_ref()])?
            } else {
                let text = datafusion::arrow::datatypes::DataType::Utf8;
                concat(&[
                    cast(&old_keys, &text)?.as_ref(),
                    cast(&appended, &text)?.as_ref(),
                ])?
            }
        };
        let record_ids = (old.record_ids.is_some() || !ids.is_empty()).then(|| {
            kept.iter()
                .map(|&j| {
                    let id = row_change[j as usize];
                    ids.get(&id).map(|s| s.as_str()).or_else(|| {
                        old.record_ids
                            .as_ref()
                            .filter(|r| r.is_valid(j as usize))
                            .map(|r| r.value(j as usize))
                    })
                })
                .chain(new_rows.iter().map(|(_, r, _)| r.map(|s| s.as_str())))
                .collect::<StringArray>()
        });
        // Sorted by key, as the diff walks it.
        let order = key_order(&keys)?;
        let ordered = |a: &dyn Array| -> Result<ArrayRef> {
            Ok(match &order {
                Some(order) => take(a, order, None)?,
                None => make_array(a.to_data()),
            })
        };
        let keys = ordered(keys.as_ref())?;
        let record_ids = record_ids
            .map(|r| Ok::<_, Error>(ordered(&r)?.as_string::<i32>().clone()))
            .transpose()?;
        let mut rows = RowHashes::new(keys.len());
        let mut files = Vec::with_capacity(fields.len());
        for (n, old_col) in old_column.iter().enumerate() {
            let old_col = match old_col {
                Some(f) => Some(old.field_column(*f).await?),
                None => None,
            };
            // The change's hash of this field (0 for the marker column), if the run commits it
            // (see `DiffSpec::committed_fields`).
            let hash_of = |c: &Change| {
                if marker {
                    Some(0)
                } else {
                    let i = stored[n];
                    (i >= 64 || diff.committed_fields(c.changed) & (1 << i) != 0)
                        .then(|| changes.hashes(c)[i])
                }
            };
            let old_hash = |j: u32| {
                old_col
                    .as_ref()
                    .filter(|col| col.is_valid(j as usize))
                    .map(|col| col.value(j as usize))
            };
            let mut b = UInt64Array::builder(kept.len() + new_rows.len());
            for &j in &kept {
                let id = row_change[j as usize];
                if id != u32::MAX {
                    // A field the change did not send keeps what the destination has (not null
                    // if unknown: a record with every hash null is one sent without an answer).
                    b.append_value(
                        hash_of(&changes[id as usize])
                            .or_else(|| old_hash(j))
                            .unwrap_or(UNSENT_HASH),
                    );
                } else if unanswered[j as usize] {
                    b.append_null();
                } else {
                    match &old_col {
                        Some(col) if col.is_valid(j as usize) => {
                            b.append_value(col.value(j as usize))
                        }
                        _ => b.append_null(),
                    }
                }
            }
            drop(old_col);
            for (id, _, known) in &new_rows {
                if *known {
                    b.append_value(hash_of(&changes[*id as usize]).unwrap_or(UNSENT_HASH));
                } else {
                    b.append_null();
                }
            }
            let column = ordered(&b.finish())?.as_primitive::<UInt64Type>().clone();
            rows.add(&column);
            files.push(
                self.state
                    .put_hashes(&self.spec.id, tag, n, &column)
                    .await?,
            );
        }
        Ok(Snapshot {
            keys,
            fields,
            rows: rows.finish(),
            hashes: FieldHashes::Stored(Arc::new(self.state.stored_hashes(&self.spec.id, files))),
            record_ids,
        })
    }
}

/// The changes that send nothing, committed as if acknowledged (see [`Change::sends`]).
fn unsent_acks(changes: &Changes) -> Vec<Ack> {
    changes
        .iter()
        .enumerate()
        .filter(|(_, c)| c.live && !c.sends())
        .map(|(id, _)| Ack::done(id as u32))
        .collect()
}

/// Per change: whether the destination answered it (acknowledged or rejected).
fn settled(changes: usize, acked: &[Ack], rejected: &[Rejected]) -> Vec<bool> {
    let mut settled = vec![false; changes];
    for id in acked
        .iter()
        .map(|a| a.change)
        .chain(rejected.iter().filter_map(|r| r.change))
    {
        if let Some(s) = settled.get_mut(id as usize) {
            *s = true;
        }
    }
    settled
}

/// What a run commits to a remote state: acknowledged changes, and the intents of new records
/// the destination refused.
fn remote_commit<'a>(
    diff: &DiffSpec,
    changes: &'a Changes,
    acked: &'a [Ack],
    settled: &[bool],
) -> RemoteCommit<'a> {
    let mut commit = RemoteCommit::default();
    let mut acknowledged = vec![false; changes.len()];
    for Ack {
        change: id,
        id: record_id,
    } in acked
    {
        let Some(c) = changes.get(*id as usize) else {
            continue;
        };
        acknowledged[*id as usize] = true;
        match c.op {
            Op::Delete => commit.deletes.push(&c.key),
            _ => commit.upserts.push(RemoteUpsert {
                key: &c.key,
                record_id: record_id.as_deref(),
                hashes: changes.hashes(c),
                committed: diff.committed_fields(c.changed),
                unknown: c.unknown,
            }),
        }
    }
    for (c, _) in changes
        .iter()
        .zip(settled.iter().zip(&acknowledged))
        .filter(|(_, (settled, acked))| **settled && !**acked)
    {
        if c.row.is_none() && c.op != Op::Delete {
            commit.withdrawn.push(&c.key);
        }
    }
    commit
}

/// A new run id: 16 hex digits.
pub fn new_run_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..16].to_string()
}

/// The run id a write goes under: its sync's, or a new one for a write outside a sync (the
/// basis of its requests' idempotency keys).
pub fn run_id(sync: Option<&SyncRun>) -> String {
    sync.map_or_else(new_run_id, |run| run.run_id.clone())
}

/// A checkpoint commits the snapshot the run would commit if it ended now: acknowledged changes
/// applied, every change not yet answered (in flight, or not sent yet) marked unknown so that it
/// is sent again after a crash, and new records not yet answered kept as possibly at the
/// destination (a mirror sync can still delete them). That holds everything the run's intent
/// says, so the intents are then deleted. Deletes were decided after the whole model was read
/// (the diff emits them at its end), as without checkpoints. The run's starting snapshot stays
/// in place until its final commit, which builds on it again.
#[async_trait::async_trait]
impl Checkpoints for SyncRun {
    fn due(&self, settled: usize) -> bool {
        let options = &self.spec.options;
        let mut inner = self.inner();
        let since = *inner
            .checkpointed_at
            .get_or_insert_with(std::time::Instant::now);
        let answered = settled.saturating_sub(inner.checkpointed_settled) as u64;
        answered > 0
            && (options
                .checkpoint_every
                .is_some_and(|every| since.elapsed() >= every)
                || options.checkpoint_records.is_some_and(|n| answered >= n))
    }

    async fn checkpoint(&self, outcome: &DeliveryOutcome) -> Result<()> {
        let started = std::time::Instant::now();
        let (snapshot, changes, previous, previous_rejects, intents, n) = {
            let mut inner = self.inner();
            inner.checkpoints_taken += 1;
            (
                inner.snapshot.clone(),
                Arc::clone(&inner.changes),
                inner.checkpoint.clone(),
                inner.previous_rejects.clone(),
                inner.intents.clone(),
                inner.checkpoints_taken,
            )
        };
        let Some(snapshot) = snapshot else {
            return Ok(());
        };
        // (Borrowed unless some changes send nothing: a long run's acknowledgements are many.)
        let unsent = unsent_acks(&changes);
        let acked: std::borrow::Cow<'_, [Ack]> = if unsent.is_empty() {
            std::borrow::Cow::Borrowed(&outcome.acked)
        } else {
            std::borrow::Cow::Owned([outcome.acked.as_slice(), &unsent].concat())
        };
        let settled = settled(changes.len(), &acked, &outcome.rejected);
        let tag = format!("{}-c{n}", self.run_id);
        let next = self
            .next_snapshot(&snapshot, &changes, &acked, &settled, &tag)
            .await?;
        let rejects = self.merge_rejects(
            &previous_rejects,
            &changes,
            &acked,
            &outcome.rejected,
            false,
        );
        let committed = self
            .state
            .commit(
                self.new_manifest(&tag),
                &next,
                false,
                &rejects,
                previous.as_ref(),
            )
            .await?;
        // Folded into the checkpoint.
        self.state.delete_files(&self.spec.id, &intents).await;
        let settled_now = outcome.acked.len() + outcome.rejected.len();
        {
            let mut inner = self.inner();
            inner.checkpoint = Some(committed);
            inner.intents.retain(|i| !intents.contains(i));
            inner.checkpointed_at = Some(std::time::Instant::now());
            inner.checkpointed_settled = settled_now;
        }
        tracing::debug!(
            checkpoint = n,
            acked = outcome.acked.len(),
            rows = next.len(),
            ms = started.elapsed().as_millis() as u64,
            "Checkpoint committed."
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::SyncMode;

    fn run(dir: &std::path::Path) -> SyncRun {
        let spec = SyncSpec {
            id: "life".into(),
            name: Some("life".into()),
            target: "hooks.people".into(),
            diff: DiffSpec {
                key: Some(0),
                fields: vec!["id".into(), "plan".into()],
                mode: SyncMode::Upsert,
                keep_last: false,
                key_parts: vec![],
                clauses: Default::default(),
            },
            options: SyncOptions::default(),
            pacing: (None, None),
            remote: None,
        };
        SyncRun::new(spec, StateStore::local(dir).unwrap(), false)
    }

    fn refused(result: Result<impl std::fmt::Debug>, step: &str, phase: &str) {
        let message = result.expect_err(step).to_string();
        assert!(
            message.contains(step) && message.contains(phase) && message.contains("bug"),
            "{message}"
        );
    }

    #[tokio::test]
    async fn a_run_goes_through_its_phases_in_order_and_refuses_any_other() {
        let dir = tempfile::tempdir().unwrap();
        let run = Arc::new(run(dir.path()));
        assert_eq!(run.phase(), Phase::Planned);
        refused(
            run.set_changes(Changes::default(), DiffCounts::default(), vec![]),
            "set_changes",
            "Planned",
        );
        refused(run.stream_first_run(), "stream_first_run", "Planned");
        run.set_atomic_sink().unwrap();
        run.prepare().await.unwrap();
        assert_eq!(run.phase(), Phase::Prepared);
        refused(run.prepare().await, "prepare", "Prepared");
        // A first run into a sink that holds one transaction streams.
        assert!(run.stream_first_run().unwrap());
        assert_eq!(run.phase(), Phase::Diffing);
        refused(run.set_atomic_sink(), "set_atomic_sink", "Diffing");
        run.set_changes(Changes::default(), DiffCounts::default(), vec![])
            .unwrap();
        assert_eq!(run.phase(), Phase::Diffed);
        refused(run.stream_first_run(), "stream_first_run", "Diffed");
        let summary = run.finish(vec![], vec![], None, None).await.unwrap();
        assert_eq!(summary.record.status, "succeeded");
        assert_eq!(summary.record.mode, "upsert");
        assert_eq!(run.phase(), Phase::Finished);
        refused(
            run.finish(vec![], vec![], None, None).await,
            "finish",
            "Finished",
        );
    }

    #[tokio::test]
    async fn a_run_that_fails_before_its_diff_finishes_and_frees_the_sync() {
        let dir = tempfile::tempdir().unwrap();
        let first = run(dir.path());
        first.prepare().await.unwrap();
        let error = Error::Write {
            message: "the destination went away".into(),
        };
        let summary = first
            .finish(vec![], vec![], None, Some(&error))
            .await
            .unwrap();
        assert_eq!(summary.record.status, "failed");
        assert_eq!(first.phase(), Phase::Finished);
        // The lock was released: the next run of the sync starts.
        let second = run(dir.path());
        second.prepare().await.unwrap();
        assert_eq!(second.phase(), Phase::Prepared);
    }
}
