//! The diff kernel: classifies model rows against the last committed snapshot. Plain Arrow code;
//! [`super::exec::DiffExec`] wraps it in a DataFusion operator.
//!
//! Memory is the snapshot's keys, record ids and one row hash per record (the field hashes stay
//! in the state store until the scan ends, and are then read one field at a time to tell which
//! fields the changed records changed), one bit per snapshot row, and one entry per change; a
//! 4-byte-per-slot index over the keys only if the model arrives out of key order.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, UInt8Array, UInt64Array};
use datafusion::arrow::datatypes::DataType;
use datafusion::arrow::record_batch::RecordBatch;
use hashbrown::HashTable;

use super::hash::{Key, ROW_SEED, combine, fold_row, hash_array, normalize_key};
use super::snapshot::{FieldHashes, KeyRef, Locator, Snapshot, TypedKeys, key_after, key_hash};
use crate::contract::{Clauses, Op, SyncMode};
use crate::error::{Error, Result};

/// An entry of the live-change table: the change and 32 bits of its key's hash, from which the
/// table hash is rebuilt when the table grows (without reading the change back).
#[derive(Debug, Clone, Copy)]
struct LiveEntry {
    id: u32,
    short: u32,
}

/// The live-change table's hash of a key, and the 32 bits it is made from.
fn live_hash(key: KeyRef<'_>) -> (u64, u32) {
    let short = key_hash(key) as u32;
    (spread(short), short)
}

/// 32 hash bits spread over 64 (the table takes its bucket from the low bits and a tag from the
/// high ones).
fn spread(short: u32) -> u64 {
    (short as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// What a sync may do with each kind of row.
#[derive(Debug, Clone)]
pub struct DiffSpec {
    /// Index of the key among the model's fields; `None` for append-only objects.
    pub key: Option<usize>,
    /// The model's fields (the destination fields, mapped), in order.
    pub fields: Vec<String>,
    /// What the sync may do (`Append` exactly when `key` is `None`).
    pub mode: SyncMode,
    /// On a duplicate key, keep the last row instead of failing.
    pub keep_last: bool,
    /// For a key made of several fields: their names (the key field is then
    /// [`super::hash::COMPOSITE_KEY`], which joins them).
    pub key_parts: Vec<String>,
    /// Which fields each clause sends, and when it applies (the model then ends with the clause
    /// columns, after `fields`).
    pub clauses: Clauses,
}

impl DiffSpec {
    /// The operation for a record the destination is not known to have (`None`: not sent).
    pub fn new_op(&self) -> Option<Op> {
        self.mode.new_op()
    }

    /// The mask of every mapped field.
    pub fn all_fields(&self) -> u64 {
        match self.fields.len() {
            64.. => u64::MAX,
            n => (1u64 << n) - 1,
        }
    }

    /// The key's bit (0 without a key).
    pub fn key_bit(&self) -> u64 {
        // (Past 64 fields a sync is refused by `Differ::new`; EXPLAIN may still ask.)
        self.key.filter(|k| *k < 64).map_or(0, |k| 1u64 << k)
    }

    /// The fields sent to a record the destination is not known to have: those of the
    /// `WHEN NOT MATCHED` clause the row picked (for a sync that only updates, of its
    /// `WHEN MATCHED` clause); `None` if no clause applies to the row.
    pub fn new_fields(&self, choice: Choice) -> Option<u64> {
        let fields = if self.mode.inserts() {
            self.clauses.insert_fields(choice.not_matched)
        } else {
            self.clauses.update_fields(choice.matched)
        };
        Some(fields? & self.all_fields() | self.key_bit())
    }

    /// The fields sent to a record a run sent without an answer (it may or may not be at the
    /// destination): those of its new-record clause, so that it is created whole if it is not
    /// there, and those of its `WHEN MATCHED` clause, so that it is made current if it is.
    /// `None` if no clause applies.
    pub fn unknown_fields(&self, choice: Choice) -> Option<u64> {
        let updated = match self.mode.updates() {
            true => self.update_fields(choice),
            false => None,
        };
        match (self.new_fields(choice), updated) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0) | b.unwrap_or(0)),
        }
    }

    /// The fields whose new hash a run commits for an acknowledged change that sent `changed`:
    /// those it sent, and those no UPDATE clause sends (a field only in INSERT is stored, so a
    /// change to it alone is not found again every run). Any other field keeps what the
    /// destination has: its old hash, or for a new record none yet (see
    /// [`super::hash::UNSENT_HASH`]), so that an UPDATE sends it next run.
    pub fn committed_fields(&self, changed: u64) -> u64 {
        if self.clauses.uniform(self.all_fields()) {
            return u64::MAX;
        }
        let updated = self.clauses.updates.iter().fold(0, |m, c| m | c.fields);
        changed | !updated
    }

    /// The fields a changed record may send: those of the `WHEN MATCHED` clause the row picked
    /// (the key's always); `None` if no clause applies to the row.
    pub fn update_fields(&self, choice: Choice) -> Option<u64> {
        Some(self.clauses.update_fields(choice.matched)? & self.all_fields() | self.key_bit())
    }
}

/// The clause of each kind a model row picked (see [`Clauses`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    pub matched: Option<u8>,
    pub not_matched: Option<u8>,
}

impl Choice {
    /// The first clause of each kind: a write without conditions.
    pub const FIRST: Choice = Choice {
        matched: Some(0),
        not_matched: Some(0),
    };
}

/// One record to send.
#[derive(Debug, Clone)]
pub struct Change {
    pub op: Op,
    pub key: Key,
    /// Its row in the snapshot, if the key was there.
    pub row: Option<u32>,
    /// Where the model row's field hashes are in [`Changes`] (`NO_HASHES` for deletes).
    hashes_at: u32,
    /// Bit i set: model field i is sent (changed, or a new record).
    pub changed: u64,
    /// False once a later row with the same key replaced it (`keep_last`).
    pub live: bool,
    /// The record was sent by a run that stopped before its commit (a warehouse diff's pending
    /// record): what the destination holds of the fields this change does not send is unknown.
    pub unknown: bool,
}

/// `Change::hashes_at` of a change without field hashes (a delete).
const NO_HASHES: u32 = u32::MAX;

impl Change {
    /// Whether it carries the model row's field hashes (every change but a delete).
    pub fn has_hashes(&self) -> bool {
        self.hashes_at != NO_HASHES
    }

    /// Whether it is sent. A change to a synced record that sends nothing (only fields its
    /// `WHEN MATCHED` clause does not update changed) is not: its new hashes are committed as
    /// if the destination had acknowledged it, so it is not found again next run.
    pub fn sends(&self) -> bool {
        self.op == Op::Delete || self.changed != 0
    }
}

/// The changes of a diff, by id, with their field hashes beside them in chunks of
/// `HASH_CHUNK` changes (an allocation per chunk, not per change, and none copied as they grow).
#[derive(Debug, Clone, Default)]
pub struct Changes {
    list: Vec<Change>,
    /// `width` hashes per change that has them, in the order they were added.
    hashes: Vec<Vec<u64>>,
    /// Changes with hashes so far.
    hashed: usize,
    width: usize,
}

/// Changes whose hashes share one allocation.
const HASH_CHUNK: usize = 8192;

impl Changes {
    /// Changes whose field hashes are `width` long (the mapped fields).
    pub fn new(width: usize) -> Self {
        Self {
            list: vec![],
            hashes: vec![],
            hashed: 0,
            width,
        }
    }

    /// Adds a change with the model row's field hashes (`width` of them; none for a delete) and
    /// returns its id.
    pub fn push(
        &mut self,
        op: Op,
        key: Key,
        row: Option<u32>,
        hashes: impl IntoIterator<Item = u64>,
        changed: u64,
    ) -> u32 {
        let mut hashes = hashes.into_iter().peekable();
        let hashes_at = match hashes.peek() {
            None => NO_HASHES,
            Some(_) => {
                if self.hashed.is_multiple_of(HASH_CHUNK) {
                    self.hashes
                        .push(Vec::with_capacity(HASH_CHUNK * self.width));
                }
                let chunk = self.hashes.last_mut().expect("pushed");
                let before = chunk.len();
                chunk.extend(hashes);
                debug_assert_eq!(
                    chunk.len() - before,
                    self.width,
                    "a change's hashes are all its fields"
                );
                self.hashed += 1;
                (self.hashed - 1) as u32
            }
        };
        let id = self.list.len() as u32;
        self.list.push(Change {
            op,
            key,
            row,
            hashes_at,
            changed,
            live: true,
            unknown: false,
        });
        id
    }

    /// The model row's field hashes of change `c` (empty for a delete).
    pub fn hashes(&self, c: &Change) -> &[u64] {
        match c.hashes_at {
            NO_HASHES => &[],
            at => {
                let at = at as usize;
                let start = at % HASH_CHUNK * self.width;
                &self.hashes[at / HASH_CHUNK][start..start + self.width]
            }
        }
    }
}

impl std::ops::Deref for Changes {
    type Target = [Change];

    fn deref(&self) -> &[Change] {
        &self.list
    }
}

impl std::ops::DerefMut for Changes {
    fn deref_mut(&mut self) -> &mut [Change] {
        &mut self.list
    }
}

/// Counts of one diff.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DiffCounts {
    pub rows: u64,
    pub inserts: u64,
    pub updates: u64,
    pub deletes: u64,
    pub unchanged: u64,
    /// Rows the sync does not send: changed rows of a create-only sync, rows no clause applies
    /// to (`WHEN … AND <condition>`), changes only to fields no `WHEN MATCHED` clause updates.
    pub skipped: u64,
    pub null_keys: u64,
    pub duplicates: u64,
}

impl DiffCounts {
    /// Counts the live changes as inserts (new records), updates and deletes (and those that
    /// send nothing as skipped).
    pub fn count_changes(&mut self, changes: &[Change]) {
        for c in changes.iter().filter(|c| c.live) {
            match (c.op, c.row) {
                _ if !c.sends() => self.skipped += 1,
                (Op::Delete, _) => self.deletes += 1,
                (_, None) => self.inserts += 1,
                (_, Some(_)) => self.updates += 1,
            }
        }
    }
}

/// A model batch's field hashes and normalized keys: the part of the diff that needs no
/// snapshot, computed where the batch is read (in parallel, one task per input partition).
pub struct Hashed {
    rows: usize,
    /// Per field, one hash per row (none for a DELETE's listed keys).
    hashes: Vec<Vec<u64>>,
    keys: Option<ArrayRef>,
    /// The clause columns (`WHEN MATCHED`, `WHEN NOT MATCHED`) of a conditional write.
    choices: Option<(UInt8Array, UInt8Array)>,
}

impl Hashed {
    /// Hashes the spec's fields of `batch` (its first columns; a conditional write's clause
    /// columns follow them).
    pub fn of(spec: &DiffSpec, batch: &RecordBatch) -> Result<Self> {
        let rows = batch.num_rows();
        let fields = spec.fields.len();
        if batch.num_columns() != fields + spec.clauses.columns() {
            return Err(Error::State {
                message: format!(
                    "internal: the diff expected {fields} field(s) and {} clause column(s), and read {} column(s)",
                    spec.clauses.columns(),
                    batch.num_columns()
                ),
            });
        }
        let mut hashes: Vec<Vec<u64>> = Vec::with_capacity(fields);
        if !spec.mode.listed_deletes() {
            for column in &batch.columns()[..fields] {
                let mut h = Vec::with_capacity(rows);
                hash_array(column.as_ref(), &mut h)?;
                hashes.push(h);
            }
        }
        let keys = match spec.key {
            Some(k) => Some(normalize_key(batch.column(k), &spec.fields[k])?),
            None => None,
        };
        let choices = match spec.clauses.conditional() {
            true => {
                let choice = |i: usize| -> Result<UInt8Array> {
                    let column = datafusion::arrow::compute::cast(
                        batch.column(fields + i),
                        &DataType::UInt8,
                    )?;
                    Ok(column.as_primitive().clone())
                };
                Some((choice(0)?, choice(1)?))
            }
            false => None,
        };
        Ok(Self {
            rows,
            hashes,
            keys,
            choices,
        })
    }

    /// The clauses row `row` picked.
    fn choice(&self, row: usize) -> Choice {
        match &self.choices {
            None => Choice::FIRST,
            Some((matched, not_matched)) => {
                let at = |c: &UInt8Array| c.is_valid(row).then(|| c.value(row));
                Choice {
                    matched: at(matched),
                    not_matched: at(not_matched),
                }
            }
        }
    }
}

/// The classification of one model batch.
pub struct BatchDiff {
    /// Per row: the change it became, if any.
    pub change_of_row: Vec<Option<u32>>,
    /// Rows whose key is null.
    pub null_key_rows: Vec<u32>,
}

/// The streaming classifier.
pub struct Differ {
    spec: DiffSpec,
    snapshot: Arc<Snapshot>,
    locator: Locator,
    /// Model field i -> snapshot hash column.
    field_map: Vec<Option<usize>>,
    /// Snapshot hash column f -> the model field whose hash it holds (`None`: the key-only
    /// marker column, whose known hashes are 0). `None` as a whole if the model no longer maps
    /// some stored field: row hashes cannot be compared, and every field hash is read up front.
    row_map: Option<Vec<Option<usize>>>,
    /// Mapped fields the snapshot has no hash of: changed for every record.
    unstored: u64,
    /// Changes of synced records: (change id, the fields its clause may update, whether its row
    /// hash differed and which fields changed is settled by [`Differ::resolve`]).
    updates: Vec<(u32, u64, bool)>,
    /// Snapshot hash columns already resolved.
    resolved: Vec<bool>,
    seen: Vec<u64>,
    /// Keys with a live change (or, for new keys, seen at all): their change ids, found by key.
    live: HashTable<LiveEntry>,
    /// The change of the greatest key new to the snapshot so far. Models are mostly written in
    /// key order: a new key past it cannot repeat an earlier key, so it needs no lookup, and its
    /// change is put in `live` only when a key that is not past it needs one.
    newest: Option<u32>,
    /// Changes from this id on whose key is new are not in `live` yet (see `newest`).
    unindexed_from: u32,
    changes: Changes,
    counts: DiffCounts,
    duplicate_samples: Vec<String>,
}

impl Differ {
    pub fn new(spec: DiffSpec, snapshot: Arc<Snapshot>) -> Result<Self> {
        if spec.fields.len() > 64 {
            return Err(Error::plan(
                format!(
                    "a sync maps at most 64 fields; this one maps {}",
                    spec.fields.len()
                ),
                spec.fields[64].clone(),
            ));
        }
        let field_map: Vec<Option<usize>> = spec
            .fields
            .iter()
            .map(|f| snapshot.fields.iter().position(|s| s == f))
            .collect();
        let row_map = row_map(&spec, &snapshot);
        if row_map.is_none() && matches!(snapshot.hashes, FieldHashes::Stored(_)) {
            return Err(Error::State {
                message: "internal: this diff reads every field hash; load them first".into(),
            });
        }
        let mut unstored = 0u64;
        for (i, f) in field_map.iter().enumerate() {
            if f.is_none() && Some(i) != spec.key {
                unstored |= 1 << i;
            }
        }
        Ok(Self {
            locator: Locator::new(Arc::clone(&snapshot.keys)),
            seen: vec![0; snapshot.len().div_ceil(64)],
            field_map,
            row_map,
            unstored,
            updates: vec![],
            resolved: vec![false; snapshot.fields.len()],
            live: HashTable::new(),
            newest: None,
            unindexed_from: 0,
            changes: Changes::new(spec.fields.len()),
            counts: DiffCounts::default(),
            duplicate_samples: vec![],
            spec,
            snapshot,
        })
    }

    /// Classifies every row of `batch` (whose columns are the spec's fields, in order).
    pub fn push(&mut self, batch: &RecordBatch) -> Result<BatchDiff> {
        self.push_from(&Hashed::of(&self.spec, batch)?, 0)
    }

    /// Classifies every row of a hashed batch, read from input stream `stream` (see `Locator`).
    ///
    /// Long because it is the diff's per-row loop (matched, new, duplicate and out-of-order keys
    /// in one pass), kept whole so that each row is read once.
    pub fn push_from(&mut self, batch: &Hashed, stream: usize) -> Result<BatchDiff> {
        let rows = batch.rows;
        self.counts.rows += rows as u64;
        let hashes = &batch.hashes;
        let keys = match &batch.keys {
            Some(k) => Some(self.align(Arc::clone(k))?),
            None => None,
        };
        let mut out = BatchDiff {
            change_of_row: vec![None; rows],
            null_key_rows: vec![],
        };
        let key_index = self.spec.key;
        let row_hashes = |row: usize| hashes.iter().map(move |h| h[row]);
        let typed = keys.as_ref().map(TypedKeys::of);
        for row in 0..rows {
            // The key by reference: an owned `Key` is made only for rows that become changes.
            let event_key;
            let key_ref = match &typed {
                Some(t) => match t.at(row) {
                    Some(k) => k,
                    None => {
                        self.counts.null_keys += 1;
                        out.null_key_rows.push(row as u32);
                        continue;
                    }
                },
                None => {
                    event_key = combine(hashes.iter().map(|h| h[row])) as i64;
                    KeyRef::Int(event_key)
                }
            };
            if self.spec.mode.listed_deletes() {
                if self.live_find(key_ref).is_some() {
                    continue;
                }
                let row_in = self.locator.find(key_ref, stream);
                let id = self.add(Op::Delete, key_ref.to_owned(), row_in, [], 0);
                self.live_put(id);
                out.change_of_row[row] = Some(id);
                continue;
            }
            match self.locator.find(key_ref, stream) {
                Some(j) => {
                    let (word, bit) = (j as usize / 64, 1u64 << (j % 64));
                    if self.seen[word] & bit != 0 {
                        self.duplicate(&key_ref.to_owned());
                        if let Some(prev) = self.live_take(key_ref) {
                            self.changes[prev as usize].live = false;
                        }
                    }
                    self.seen[word] |= bit;
                    if self.spec.key.is_none() {
                        // An event already sent (its key is its content).
                        self.counts.unchanged += 1;
                        continue;
                    }
                    if self.snapshot.unknown(j as usize) {
                        // Sent by a run that stopped before its commit: it may or may not be at
                        // the destination, so it is sent again as a new record.
                        let (Some(op), Some(fields)) =
                            (self.new_op(), self.spec.unknown_fields(batch.choice(row)))
                        else {
                            self.counts.skipped += 1;
                            continue;
                        };
                        let id = self.add(op, key_ref.to_owned(), Some(j), row_hashes(row), fields);
                        self.live_put(id);
                        out.change_of_row[row] = Some(id);
                        continue;
                    }
                    // Same row hash: every stored field is unchanged. A different one: an update,
                    // whose changed fields `resolve` reads from the field hashes at the end.
                    let mut changed = self.unstored;
                    let mut pending = false;
                    match &self.row_map {
                        Some(map) => {
                            let model = map.iter().fold(ROW_SEED, |acc, i| {
                                fold_row(acc, Some(i.map_or(0, |i| hashes[i][row])))
                            });
                            pending = self.snapshot.rows.value(j as usize) != model;
                        }
                        // (No row hash to compare: every field hash is in memory.)
                        None => {
                            let FieldHashes::Loaded(old) = &self.snapshot.hashes else {
                                unreachable!("checked by Differ::new")
                            };
                            for (i, f) in self.field_map.iter().enumerate() {
                                let old = f.and_then(|f| {
                                    old[f]
                                        .is_valid(j as usize)
                                        .then(|| old[f].value(j as usize))
                                });
                                if Some(i) != key_index && old != Some(hashes[i][row]) {
                                    changed |= 1 << i;
                                }
                            }
                        }
                    }
                    if changed == 0 && !pending {
                        self.counts.unchanged += 1;
                    } else if let (Some(op), Some(fields)) = (
                        self.spec.mode.changed_op(),
                        self.spec.update_fields(batch.choice(row)),
                    ) {
                        let id = self.add(
                            op,
                            key_ref.to_owned(),
                            Some(j),
                            row_hashes(row),
                            changed & fields | self.spec.key_bit(),
                        );
                        self.updates.push((id, fields, pending));
                        self.live_put(id);
                        out.change_of_row[row] = Some(id);
                    } else {
                        // (The committed state keeps what the destination has.)
                        self.counts.skipped += 1;
                    }
                }
                None => {
                    let past_newest = self.spec.key.is_some()
                        && self.newest.is_none_or(|n| {
                            key_after(key_ref, self.changes[n as usize].key.as_ref())
                        });
                    if !past_newest {
                        self.index_new_keys();
                        if let Some(prev) = self.live_find(key_ref) {
                            if self.spec.key.is_none() {
                                // The same event twice: one event.
                                continue;
                            }
                            self.live_take(key_ref);
                            self.duplicate(&key_ref.to_owned());
                            self.changes[prev as usize].live = false;
                        }
                    }
                    let (Some(op), Some(fields)) =
                        (self.new_op(), self.spec.new_fields(batch.choice(row)))
                    else {
                        self.counts.skipped += 1;
                        continue;
                    };
                    let id = self.add(op, key_ref.to_owned(), None, row_hashes(row), fields);
                    if past_newest {
                        self.newest = Some(id);
                    } else {
                        self.live_put(id);
                        self.unindexed_from = id + 1;
                    }
                    out.change_of_row[row] = Some(id);
                }
            }
        }
        Ok(out)
    }

    /// Puts the changes of new keys past `newest` that are not in `live` yet into it, before a
    /// key that is not past it is looked up.
    fn index_new_keys(&mut self) {
        let from = self.unindexed_from;
        self.unindexed_from = self.changes.len() as u32;
        for id in from..self.unindexed_from {
            // (Changes of keys in the snapshot are put as they are made.)
            if self.changes[id as usize].row.is_none() {
                self.live_put(id);
            }
        }
    }

    /// The live change of `key`, if any.
    fn live_find(&self, key: KeyRef<'_>) -> Option<u32> {
        let changes = &self.changes;
        let (hash, short) = live_hash(key);
        self.live
            .find(hash, |e| {
                e.short == short && changes[e.id as usize].key.as_ref() == key
            })
            .map(|e| e.id)
    }

    /// Removes the live change of `key` and returns it.
    fn live_take(&mut self, key: KeyRef<'_>) -> Option<u32> {
        let changes = &self.changes;
        let (hash, short) = live_hash(key);
        self.live
            .find_entry(hash, |e| {
                e.short == short && changes[e.id as usize].key.as_ref() == key
            })
            .ok()
            .map(|entry| entry.remove().0.id)
    }

    /// Makes change `id` the live change of its key.
    fn live_put(&mut self, id: u32) {
        let (hash, short) = live_hash(self.changes[id as usize].key.as_ref());
        self.live
            .insert_unique(hash, LiveEntry { id, short }, |e| spread(e.short));
    }

    /// The operation for a record the destination is not known to have.
    fn new_op(&self) -> Option<Op> {
        self.spec.new_op()
    }

    /// Integer keys in the model against a snapshot of text keys (or the reverse, after the
    /// key's type changed) compare as text.
    fn align(&mut self, keys: ArrayRef) -> Result<ArrayRef> {
        let snap = self.snapshot.keys.data_type();
        if self.snapshot.is_empty() || snap == keys.data_type() {
            return Ok(keys);
        }
        if snap == &DataType::Utf8 {
            return Ok(datafusion::arrow::compute::cast(&keys, &DataType::Utf8)?);
        }
        let mut snapshot = (*self.snapshot).clone();
        snapshot.keys = datafusion::arrow::compute::cast(&snapshot.keys, &DataType::Utf8)?;
        self.locator = Locator::new(Arc::clone(&snapshot.keys));
        self.snapshot = Arc::new(snapshot);
        Ok(datafusion::arrow::compute::cast(&keys, &DataType::Utf8)?)
    }

    fn add(
        &mut self,
        op: Op,
        key: Key,
        row: Option<u32>,
        hashes: impl IntoIterator<Item = u64>,
        changed: u64,
    ) -> u32 {
        self.changes.push(op, key, row, hashes, changed)
    }

    fn duplicate(&mut self, key: &Key) {
        self.counts.duplicates += 1;
        if self.duplicate_samples.len() < 5 {
            self.duplicate_samples.push(key.to_string());
        }
    }

    /// The snapshot's hash columns to pass to [`Differ::resolve`] once the model is read: every
    /// one not yet resolved, if this diff changes anything. They tell which fields the records
    /// whose row hash changed changed, and the commit will read them, so reading them now also
    /// proves them whole before anything is sent.
    pub fn fields_to_read(&self) -> Vec<usize> {
        let seen = self
            .seen
            .iter()
            .map(|w| w.count_ones() as usize)
            .sum::<usize>();
        let deletes = self.spec.mode.deletes_missing() && seen < self.snapshot.len();
        if self.changes.is_empty() && !deletes {
            return vec![];
        }
        (0..self.resolved.len())
            .filter(|f| !self.resolved[*f])
            .collect()
    }

    /// Settles, for every pending update, whether the field stored in snapshot column `f`
    /// changed (`old`: that column's hashes).
    pub fn resolve(&mut self, f: usize, old: &UInt64Array) {
        self.resolved[f] = true;
        let Some(Some(i)) = self.row_map.as_ref().map(|m| m[f]) else {
            return;
        };
        if Some(i) == self.spec.key {
            return;
        }
        let bit = 1u64 << i;
        for (id, fields, pending) in &self.updates {
            if !pending || fields & bit == 0 {
                continue;
            }
            let c = &self.changes[*id as usize];
            let j = c.row.expect("a pending update has a snapshot row") as usize;
            if !old.is_valid(j) || old.value(j) != self.changes.hashes(c)[i] {
                self.changes[*id as usize].changed |= bit;
            }
        }
    }

    /// The changes found so far, by id.
    pub fn changes(&self) -> &[Change] {
        &self.changes
    }

    /// Ends the scan: adds the deletes and returns every change with the counts. Fails on
    /// duplicate keys unless the spec keeps the last row. With pending updates, every field of
    /// [`Differ::fields_to_read`] must have been resolved.
    pub fn finish(mut self) -> Result<(Changes, DiffCounts)> {
        if self.counts.duplicates > 0 && !self.spec.keep_last && !self.spec.mode.listed_deletes() {
            let key = self
                .spec
                .key
                .map(|k| self.spec.fields[k].clone())
                .unwrap_or_default();
            return Err(duplicate_keys_error(
                &key,
                self.counts.duplicates,
                &self.duplicate_samples,
            ));
        }
        if self.updates.iter().any(|(_, _, pending)| *pending) && self.resolved.iter().any(|r| !r) {
            return Err(Error::State {
                message: "internal: the diff ended before its updates' fields were resolved".into(),
            });
        }
        // An update whose changed fields are all ones its clause does not update sends nothing.
        let key_bit = self.spec.key_bit();
        for (id, _, _) in &self.updates {
            let c = &mut self.changes[*id as usize];
            if c.changed & !key_bit == 0 {
                c.changed = 0;
            }
        }
        if self.spec.mode.deletes_missing() {
            for j in 0..self.snapshot.len() {
                if self.seen[j / 64] & (1 << (j % 64)) == 0 {
                    let key = self.snapshot.key(j);
                    self.add(Op::Delete, key, Some(j as u32), [], 0);
                }
            }
        }
        self.counts.count_changes(&self.changes);
        Ok((self.changes, self.counts))
    }
}

/// The mapping of snapshot hash columns to model fields, if the model maps every stored field.
fn row_map(spec: &DiffSpec, snapshot: &Snapshot) -> Option<Vec<Option<usize>>> {
    snapshot
        .fields
        .iter()
        .map(|f| {
            if f.is_empty() {
                return Some(None);
            }
            spec.fields.iter().position(|m| m == f).map(Some)
        })
        .collect()
}

/// Whether a diff of `spec` against `snapshot` needs every field hash in memory: when the model
/// no longer maps some stored field, row hashes cannot be compared.
pub fn needs_field_hashes(spec: &DiffSpec, snapshot: &Snapshot) -> bool {
    spec.key.is_some() && !spec.mode.listed_deletes() && row_map(spec, snapshot).is_none()
}

/// The model repeats keys: nothing is sent.
pub fn duplicate_keys_error(key: &str, duplicates: u64, samples: &[String]) -> Error {
    Error::Write {
        message: format!(
            "the model has {duplicates} duplicate value(s) of the key '{key}' (e.g. {}); nothing was sent. Make '{key}' unique in the query, or set OPTIONS (duplicate_keys 'keep_last')",
            samples
                .iter()
                .map(|k| format!("'{k}'"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::{Field, Schema};

    use super::*;
    use crate::sync::hash::HASH_VERSION;
    use crate::sync::snapshot::key_array;
    use crate::sync::state::{FORMAT, Manifest, StateStore, now};

    fn batch(rows: &[(i64, &str, Option<&str>)]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("email", DataType::Utf8, true),
            Field::new("plan", DataType::Utf8, true),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.1))),
                Arc::new(StringArray::from(
                    rows.iter().map(|r| r.2).collect::<Vec<_>>(),
                )),
            ],
        )
        .unwrap()
    }

    fn spec(insert: bool, update: bool, delete: bool) -> DiffSpec {
        DiffSpec {
            key: Some(0),
            fields: vec!["id".into(), "email".into(), "plan".into()],
            mode: SyncMode::merge(insert, update, delete).unwrap(),
            keep_last: false,
            key_parts: vec![],
            clauses: Clauses::every_field(),
        }
    }

    /// The snapshot a fully acknowledged run over `rows` would commit.
    fn snapshot_of(rows: &[(i64, &str, Option<&str>)]) -> Arc<Snapshot> {
        let b = batch(rows);
        let mut hashes = vec![];
        for c in b.columns() {
            let mut h = vec![];
            hash_array(c.as_ref(), &mut h).unwrap();
            hashes.push(UInt64Array::from(h));
        }
        Arc::new(Snapshot::new(
            b.column(0).clone(),
            vec!["id".into(), "email".into(), "plan".into()],
            hashes,
            None,
        ))
    }

    fn run(
        spec: DiffSpec,
        snap: Arc<Snapshot>,
        rows: &[(i64, &str, Option<&str>)],
    ) -> Vec<(Op, String, u64)> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let in_memory = runtime.block_on(diff(&spec, Arc::clone(&snap), rows));
        // The same snapshot committed and read back: its field hashes stay in the store, and the
        // fields of changed records are resolved after the scan.
        let dir = tempfile::tempdir().unwrap();
        let stored = runtime.block_on(async {
            let state = StateStore::local(dir.path()).unwrap();
            let manifest = Manifest {
                format: FORMAT,
                hash: HASH_VERSION.into(),
                sync: "s".into(),
                target: "t.o".into(),
                key: None,
                fields: vec![],
                snapshot: String::new(),
                hash_files: vec![],
                rows: 0,
                rejects: None,
                run_id: "r".into(),
                committed_at: now(),
                checksum: None,
            };
            state
                .commit(manifest, &snap, false, &[], None)
                .await
                .unwrap();
            let manifest = state.manifest("s").await.unwrap().unwrap();
            let loaded = state.snapshot("s", &manifest).await.unwrap();
            assert!(snap.is_empty() || matches!(loaded.hashes, FieldHashes::Stored(_)));
            diff(&spec, Arc::new(loaded), rows).await
        });
        assert_eq!(in_memory, stored, "stored field hashes change nothing");
        in_memory
    }

    /// The diff as `DiffExec` runs it.
    async fn diff(
        spec: &DiffSpec,
        mut snap: Arc<Snapshot>,
        rows: &[(i64, &str, Option<&str>)],
    ) -> Vec<(Op, String, u64)> {
        if needs_field_hashes(spec, &snap) {
            snap = Arc::new((*snap).clone().loaded().await.unwrap());
        }
        let mut d = Differ::new(spec.clone(), Arc::clone(&snap)).unwrap();
        d.push(&batch(rows)).unwrap();
        for f in d.fields_to_read() {
            d.resolve(f, &snap.field_column(f).await.unwrap());
        }
        let (changes, _) = d.finish().unwrap();
        changes
            .iter()
            .filter(|c| c.live)
            .map(|c| (c.op, c.key.to_string(), c.changed))
            .collect()
    }

    #[test]
    fn first_run_inserts_everything() {
        let out = run(
            spec(true, true, false),
            Arc::new(Snapshot::empty(vec![])),
            &[(1, "a", None), (2, "b", Some("pro"))],
        );
        assert_eq!(
            out,
            vec![
                (Op::Upsert, "1".into(), 0b111),
                (Op::Upsert, "2".into(), 0b111)
            ]
        );
    }

    #[test]
    fn updates_carry_only_changed_fields_and_the_key() {
        let snap = snapshot_of(&[(1, "a", None), (2, "b", Some("pro")), (3, "c", None)]);
        let out = run(
            spec(true, true, true),
            snap,
            &[(1, "a", None), (2, "b", Some("free")), (4, "d", None)],
        );
        assert_eq!(
            out,
            vec![
                (Op::Upsert, "2".into(), 0b101),
                (Op::Upsert, "4".into(), 0b111),
                (Op::Delete, "3".into(), 0),
            ]
        );
    }

    /// `WHEN MATCHED THEN UPDATE SET plan` and `WHEN NOT MATCHED THEN INSERT (id, email, plan)`.
    fn create_only_email() -> DiffSpec {
        use crate::contract::Clause;
        let clause = |fields: u64| Clause {
            fields,
            condition: None,
        };
        DiffSpec {
            clauses: Clauses {
                inserts: vec![clause(0b111)],
                updates: vec![clause(0b101)],
            },
            ..spec(true, true, false)
        }
    }

    #[test]
    fn an_update_sends_only_its_clause_fields_and_a_change_to_the_others_sends_nothing() {
        let snap = snapshot_of(&[(1, "a", None), (2, "b", Some("pro")), (3, "c", None)]);
        let rows = [
            (1, "a2", None),
            (2, "b2", Some("free")),
            (3, "c", None),
            (4, "d", None),
        ];
        let out = run(create_only_email(), Arc::clone(&snap), &rows);
        assert_eq!(
            out,
            vec![
                // Only the create-only email changed: nothing is sent (its hash is committed).
                (Op::Upsert, "1".into(), 0),
                // email and plan changed: only plan (and the key) is sent.
                (Op::Upsert, "2".into(), 0b101),
                // A new record gets every field its INSERT lists.
                (Op::Upsert, "4".into(), 0b111),
            ]
        );
        let mut d = Differ::new(create_only_email(), snap).unwrap();
        d.push(&batch(&rows)).unwrap();
        for f in d.fields_to_read() {
            let FieldHashes::Loaded(h) = &d.snapshot.hashes else {
                unreachable!()
            };
            let column = h[f].clone();
            d.resolve(f, &column);
        }
        let (changes, counts) = d.finish().unwrap();
        assert!(!changes[0].sends() && changes[1].sends());
        assert_eq!(
            (
                counts.inserts,
                counts.updates,
                counts.skipped,
                counts.unchanged
            ),
            (1, 1, 1, 1)
        );
    }

    #[test]
    fn conditions_pick_a_clause_per_row_and_rows_no_clause_takes_are_not_sent() {
        use crate::contract::Clause;
        use datafusion::arrow::array::UInt8Array;
        let conditional = |fields: u64| Clause {
            fields,
            condition: Some("s.ok".into()),
        };
        let spec = DiffSpec {
            clauses: Clauses {
                inserts: vec![conditional(0b011)],
                updates: vec![conditional(0b101)],
            },
            ..spec(true, true, false)
        };
        let snap = snapshot_of(&[(1, "a", None), (2, "b", Some("pro"))]);
        let rows = [
            (1, "a", Some("x")),
            (2, "b", Some("free")),
            (4, "d", None),
            (5, "e", None),
        ];
        let model = batch(&rows);
        let mut columns = model.columns().to_vec();
        // (matched, not matched): row 1 matches no UPDATE, row 4 no INSERT.
        columns.push(Arc::new(UInt8Array::from(vec![None, Some(0), None, None])));
        columns.push(Arc::new(UInt8Array::from(vec![None, None, None, Some(0)])));
        let mut fields = model.schema().fields().to_vec();
        fields.push(Arc::new(Field::new(
            "__when_matched",
            DataType::UInt8,
            true,
        )));
        fields.push(Arc::new(Field::new(
            "__when_not_matched",
            DataType::UInt8,
            true,
        )));
        let model = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap();
        let mut d = Differ::new(spec.clone(), snap).unwrap();
        let classified = d.push(&model).unwrap();
        assert_eq!(
            classified
                .change_of_row
                .iter()
                .map(|c| c.is_some())
                .collect::<Vec<_>>(),
            [false, true, false, true]
        );
        for f in d.fields_to_read() {
            let FieldHashes::Loaded(h) = &d.snapshot.hashes else {
                unreachable!()
            };
            let column = h[f].clone();
            d.resolve(f, &column);
        }
        let (changes, counts) = d.finish().unwrap();
        let sent: Vec<(Op, String, u64)> = changes
            .iter()
            .map(|c| (c.op, c.key.to_string(), c.changed))
            .collect();
        assert_eq!(
            sent,
            [
                (Op::Upsert, "2".into(), 0b101),
                (Op::Upsert, "5".into(), 0b011)
            ]
        );
        assert_eq!(counts.skipped, 2);
        // A batch without its clause columns is an error, not a misread.
        assert!(Hashed::of(&spec, &batch(&rows)).is_err());
    }

    #[test]
    fn modes_select_what_is_sent() {
        let snap = snapshot_of(&[(1, "a", None), (2, "b", None)]);
        let rows = [(1, "a2", None), (3, "c", None)];
        let create_only = run(spec(true, false, false), snap.clone(), &rows);
        assert_eq!(create_only, vec![(Op::Insert, "3".into(), 0b111)]);
        let update_only = run(spec(false, true, false), snap.clone(), &rows);
        assert_eq!(
            update_only,
            vec![
                (Op::Update, "1".into(), 0b011),
                (Op::Update, "3".into(), 0b111)
            ]
        );
        let mirror = run(spec(true, true, true), snap, &rows);
        assert_eq!(mirror.last().unwrap(), &(Op::Delete, "2".into(), 0));
    }

    #[test]
    fn a_newly_mapped_field_is_sent_alone() {
        // The snapshot only knew id and email; plan is newly mapped.
        let full = snapshot_of(&[(1, "a", Some("pro"))]);
        let FieldHashes::Loaded(hashes) = &full.hashes else {
            unreachable!("built in memory")
        };
        let snap = Arc::new(Snapshot::new(
            full.keys.clone(),
            vec!["id".into(), "email".into()],
            hashes[..2].to_vec(),
            None,
        ));
        let out = run(spec(true, true, false), snap, &[(1, "a", Some("pro"))]);
        assert_eq!(out, vec![(Op::Upsert, "1".into(), 0b101)]);
    }

    #[test]
    fn a_field_no_longer_mapped_changes_nothing() {
        // The snapshot knows id, email and plan; the model now maps id and email only.
        let snap = snapshot_of(&[(1, "a", Some("pro")), (2, "b", Some("free"))]);
        let mut s = spec(true, true, false);
        s.fields.truncate(2);
        assert!(needs_field_hashes(&s, &snap));
        let model = RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new("id", DataType::Int64, true),
                Field::new("email", DataType::Utf8, true),
            ])),
            vec![
                Arc::new(Int64Array::from(vec![1, 2])),
                Arc::new(StringArray::from(vec!["a", "c"])),
            ],
        )
        .unwrap();
        let mut d = Differ::new(s, snap).unwrap();
        d.push(&model).unwrap();
        let (changes, counts) = d.finish().unwrap();
        assert_eq!((counts.unchanged, counts.updates), (1, 1));
        assert_eq!(changes[0].key.to_string(), "2");
        assert_eq!(changes[0].changed, 0b11, "email and the key");
    }

    #[test]
    fn duplicate_keys_fail_with_samples_or_keep_the_last() {
        let snap = snapshot_of(&[(1, "a", None)]);
        let rows = [
            (1, "x", None),
            (1, "a", None),
            (2, "b", None),
            (2, "c", None),
        ];
        let (err, out) = duplicates(snap, &rows);
        assert!(
            err.contains("2 duplicate") && err.contains("'1', '2'"),
            "{err}"
        );
        // Key 1's last row equals the snapshot: nothing to send for it.
        assert_eq!(out, vec![(Op::Upsert, "2".into(), 0b111)]);
    }

    /// The error of a diff of `rows` (which repeat keys), and what `keep_last` sends instead.
    fn duplicates(
        snap: Arc<Snapshot>,
        rows: &[(i64, &str, Option<&str>)],
    ) -> (String, Vec<(Op, String, u64)>) {
        let mut d = Differ::new(spec(true, true, false), Arc::clone(&snap)).unwrap();
        d.push(&batch(rows)).unwrap();
        let err = d.finish().unwrap_err().to_string();
        let mut keep = spec(true, true, false);
        keep.keep_last = true;
        (err, run(keep, snap, rows))
    }

    #[test]
    fn changes_keep_their_hashes_in_chunks() {
        let mut changes = Changes::new(3);
        let a = changes.push(Op::Upsert, Key::Int(1), None, [1, 2, 3], 0b111);
        let d = changes.push(Op::Delete, Key::Int(2), Some(0), [], 0);
        let b = changes.push(Op::Update, Key::Int(3), Some(1), [4, 5, 6], 0b10);
        assert_eq!((a, d, b), (0, 1, 2));
        assert_eq!(changes.hashes(&changes[0]), [1, 2, 3]);
        assert!(changes.hashes(&changes[1]).is_empty() && !changes[1].has_hashes());
        assert_eq!(changes.hashes(&changes[2]), [4, 5, 6]);
        assert_eq!(changes.len(), 3);
        // Past the first chunk (deletes take no room in it).
        for i in 0..HASH_CHUNK as u64 + 10 {
            changes.push(
                Op::Upsert,
                Key::Int(i as i64),
                None,
                [i, i + 1, i + 2],
                0b111,
            );
            changes.push(Op::Delete, Key::Int(-1), Some(0), [], 0);
        }
        for c in changes.iter().skip(3).filter(|c| c.has_hashes()) {
            let Key::Int(i) = c.key else { unreachable!() };
            let i = i as u64;
            assert_eq!(changes.hashes(c), [i, i + 1, i + 2]);
        }
        assert_eq!(changes.hashes.len(), 2, "two chunks");
    }

    #[test]
    fn new_keys_in_order_need_no_lookup_and_repeats_are_still_found() {
        // New keys in order (looked up by nobody), then 2 and 5 again, out of order, among keys
        // of the snapshot and further new keys in order.
        let snap = snapshot_of(&[(3, "c", None)]);
        let rows = [
            (1, "a", None),
            (2, "b", None),
            (3, "c", None),
            (4, "d", None),
            (5, "e", None),
            (2, "B", None),
            (6, "f", None),
            (5, "E", None),
            (7, "g", None),
        ];
        let mut d = Differ::new(spec(true, true, false), snap.clone()).unwrap();
        d.push(&batch(&rows[..5])).unwrap();
        assert!(d.live.is_empty(), "new keys in order are not indexed");
        let (err, out) = duplicates(snap, &rows);
        assert!(
            err.contains("2 duplicate") && err.contains("'2', '5'"),
            "{err}"
        );
        let sent: Vec<String> = out.iter().map(|(_, k, _)| k.clone()).collect();
        assert_eq!(sent, ["1", "4", "2", "6", "5", "7"]);
        // Descending keys: each is past nothing, so each is looked up; a repeat is found.
        let (err, _) = duplicates(
            snapshot_of(&[]),
            &[(9, "a", None), (8, "b", None), (9, "c", None)],
        );
        assert!(err.contains("1 duplicate") && err.contains("'9'"), "{err}");
    }

    #[test]
    fn records_sent_without_a_commit_are_resent_or_deleted() {
        // 1 is known. A run that stopped before its commit sent 7 and 8 as new records and
        // changed 2 (the destination may hold that change, whatever the snapshot says).
        let snap = (*snapshot_of(&[(1, "a", None), (2, "b", None)]))
            .clone()
            .with_unknown(&[Key::Int(7), Key::Int(8), Key::Int(2)])
            .unwrap();
        assert_eq!(snap.len(), 4);
        let unknown: Vec<bool> = (0..4).map(|j| snap.unknown(j)).collect();
        assert_eq!(unknown, [false, true, true, true]);
        // The model still holds 2's committed values: it is sent again all the same.
        let out = run(
            spec(true, true, true),
            Arc::new(snap),
            &[(1, "a", None), (2, "b", None), (7, "g", None)],
        );
        assert_eq!(
            out,
            vec![
                (Op::Upsert, "2".into(), 0b111),
                (Op::Upsert, "7".into(), 0b111),
                (Op::Delete, "8".into(), 0)
            ]
        );
    }

    /// A scan's partitions each in key order, interleaved, with records gone from the model:
    /// every lookup is answered by its stream's cursor, with no index.
    #[test]
    fn interleaved_sorted_streams_walk_without_an_index() {
        let rows: Vec<(i64, &str, Option<&str>)> = (0..20_000).map(|i| (i, "a", None)).collect();
        let snap = snapshot_of(&rows);
        let mut d = Differ::new(spec(true, true, true), snap).unwrap();
        let kept = |range: std::ops::Range<i64>| -> Vec<(i64, &str, Option<&str>)> {
            range
                .filter(|k| k % 7 != 0)
                .map(|k| (k, "a", None))
                .collect()
        };
        let (low, high) = (kept(0..10_000), kept(10_000..20_000));
        for (a, b) in low.chunks(100).zip(high.chunks(100)) {
            d.push_from(&Hashed::of(&d.spec, &batch(a)).unwrap(), 0)
                .unwrap();
            d.push_from(&Hashed::of(&d.spec, &batch(b)).unwrap(), 1)
                .unwrap();
        }
        assert!(d.locator.index.is_none(), "no hash index");
        assert!(d.locator.misses <= 2, "{} misses", d.locator.misses);
        let (_, counts) = d.finish().unwrap();
        assert_eq!((counts.deletes, counts.unchanged), (2858, 17_142));
    }

    /// The same classification whatever the model's order: in key order (cursor), shuffled
    /// (binary search, then a hash index), and against an unsorted snapshot (hash index).
    #[test]
    fn key_order_changes_nothing_but_speed() {
        let n = 20_000i64;
        let rows: Vec<(i64, &str, Option<&str>)> = (0..n).map(|i| (i * 2, "a", None)).collect();
        let sorted = snapshot_of(&rows);
        assert!(sorted.is_sorted());
        // Model: every old key but those = 0 mod 10, plus odd new keys = 1 mod 10; key 4 changed.
        let mut model: Vec<(i64, &str, Option<&str>)> = (0..n * 2)
            .filter(|k| (k % 2 == 0 && k % 10 != 0) || k % 10 == 1)
            .map(|k| (k, if k == 4 { "b" } else { "a" }, None))
            .collect();
        let expect = |out: &[(Op, String, u64)]| {
            let count = |op: Op| out.iter().filter(|c| c.0 == op).count();
            assert_eq!(count(Op::Delete), (n / 5) as usize, "deletes");
            assert_eq!(
                out.iter()
                    .filter(|c| c.0 == Op::Upsert && c.2 == 0b111)
                    .count(),
                (n / 5) as usize,
                "inserts"
            );
            assert!(out.contains(&(Op::Upsert, "4".into(), 0b011)), "the update");
        };
        expect(&run(spec(true, true, true), sorted.clone(), &model));
        let mut x = 12345u64;
        for i in (1..model.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            model.swap(i, (x % (i as u64 + 1)) as usize);
        }
        expect(&run(spec(true, true, true), sorted.clone(), &model));
        let mut reversed = rows.clone();
        reversed.reverse();
        let unsorted = snapshot_of(&reversed);
        assert!(!unsorted.is_sorted());
        expect(&run(spec(true, true, true), unsorted, &model));
    }

    #[test]
    fn null_keys_are_set_aside() {
        let b = RecordBatch::try_new(
            Arc::new(Schema::new(vec![Field::new("id", DataType::Utf8, true)])),
            vec![Arc::new(StringArray::from(vec![Some("a"), None]))],
        )
        .unwrap();
        let mut s = spec(true, true, false);
        s.fields = vec!["id".into()];
        let mut d = Differ::new(s, Arc::new(Snapshot::empty(vec![]))).unwrap();
        let out = d.push(&b).unwrap();
        assert_eq!(out.null_key_rows, vec![1]);
        assert_eq!(d.finish().unwrap().1.null_keys, 1);
    }

    #[test]
    fn append_only_rows_are_sent_once() {
        let mut s = spec(true, false, false);
        s.key = None;
        let rows = [(1, "a", None), (1, "a", None), (2, "b", None)];
        let mut d = Differ::new(s.clone(), Arc::new(Snapshot::empty(vec![]))).unwrap();
        d.push(&batch(&rows)).unwrap();
        let (changes, counts) = d.finish().unwrap();
        assert_eq!(counts.inserts, 2, "identical rows are one event");
        let keys: Vec<Key> = changes.iter().map(|c| c.key.clone()).collect();
        let snap = Arc::new(Snapshot::new(
            key_array(&keys.iter().collect::<Vec<_>>()),
            vec![],
            vec![],
            None,
        ));
        let again = run(s, snap, &[(1, "a", None), (2, "b", None), (3, "c", None)]);
        assert_eq!(again.len(), 1, "only the new event");
        assert_eq!(again[0].0, Op::Insert);
    }
}
