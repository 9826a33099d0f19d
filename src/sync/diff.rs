//! The diff kernel: classifies model rows against the last committed snapshot. Plain Arrow code;
//! [`super::exec::DiffExec`] wraps it in a DataFusion operator.
//!
//! Memory is the snapshot's keys, record ids and one row hash per record (the field hashes stay
//! in the state store until the scan ends, and are then read one field at a time to tell which
//! fields the changed records changed), one bit per snapshot row, and one entry per change; a
//! 4-byte-per-slot index over the keys only if the model arrives out of key order.

use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, Int64Array, NullArray, StringArray, UInt64Array,
};
use datafusion::arrow::datatypes::{DataType, Int64Type, UInt64Type};
use datafusion::arrow::record_batch::RecordBatch;
use hashbrown::HashTable;

use super::hash::{Key, ROW_SEED, RowHashes, combine, fold_row, hash_array, normalize_key};
use super::state::StoredHashes;
use crate::contract::{Op, SyncMode};
use crate::error::{Error, Result};

/// The state of a sync after its last commit: one row per record the destination acknowledged.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Normalized keys (Int64 or Utf8; for append-only objects, the row hash). Never null.
    pub keys: ArrayRef,
    /// The mapped fields whose hashes are kept, in order.
    pub fields: Vec<String>,
    /// Per record, its field hashes folded into one ([`super::hash::fold_row`]); null for a
    /// record sent without an answer (every field hash unknown). The diff compares these, and
    /// reads the field hashes only for the records whose row hash changed.
    pub rows: UInt64Array,
    /// One hash per field and record; null = unknown (the field was mapped after this record
    /// was sent).
    pub hashes: FieldHashes,
    /// The destination's id for each record, where it gave one (`None`: none did).
    pub record_ids: Option<StringArray>,
}

/// Where a snapshot's field hashes are.
#[derive(Debug, Clone)]
pub enum FieldHashes {
    /// In memory, one column per field.
    Loaded(Vec<UInt64Array>),
    /// In the state store, one file per field, read one at a time when needed.
    Stored(StoredHashes),
}

impl Snapshot {
    /// A snapshot from in-memory columns (its row hashes are computed here).
    pub fn new(
        keys: ArrayRef,
        fields: Vec<String>,
        hashes: Vec<UInt64Array>,
        record_ids: Option<StringArray>,
    ) -> Self {
        let mut rows = RowHashes::new(keys.len());
        for h in &hashes {
            rows.add(h);
        }
        Self {
            keys,
            fields,
            rows: rows.finish(),
            hashes: FieldHashes::Loaded(hashes),
            record_ids,
        }
    }

    pub fn empty(fields: Vec<String>) -> Self {
        let hashes = fields
            .iter()
            .map(|_| UInt64Array::from(vec![0u64; 0]))
            .collect();
        Self::new(Arc::new(NullArray::new(0)), fields, hashes, None)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn key(&self, row: usize) -> Key {
        Key::at(&self.keys, row).expect("snapshot keys are never null")
    }

    /// Whether the keys are in strictly increasing order.
    pub fn is_sorted(&self) -> bool {
        keys_sorted(&self.keys)
    }

    /// The hashes of field `i`, one per record (read from the state store if they are there).
    pub async fn field_column(&self, i: usize) -> Result<UInt64Array> {
        match &self.hashes {
            FieldHashes::Loaded(columns) => Ok(columns[i].clone()),
            FieldHashes::Stored(stored) => stored.column(i, self.len()).await,
        }
    }

    /// This snapshot with every field hash in memory.
    pub async fn loaded(self) -> Result<Self> {
        if let FieldHashes::Loaded(_) = self.hashes {
            return Ok(self);
        }
        let mut columns = Vec::with_capacity(self.fields.len());
        for i in 0..self.fields.len() {
            columns.push(self.field_column(i).await?);
        }
        Ok(Self {
            hashes: FieldHashes::Loaded(columns),
            ..self
        })
    }

    /// This snapshot sorted by key, as commits write them, so that a model read in key order
    /// is diffed by a sequential walk (see `Locator`). Its field hashes must be in memory.
    pub fn sorted(self) -> Result<Self> {
        let Some(order) = key_order(&self.keys)? else {
            return Ok(self);
        };
        let FieldHashes::Loaded(hashes) = &self.hashes else {
            return Err(Error::State {
                message: "internal: a snapshot is reordered with its field hashes in memory".into(),
            });
        };
        let take = |a: &dyn Array| datafusion::arrow::compute::take(a, &order, None);
        let take_hashes = |h: &UInt64Array| -> Result<UInt64Array> {
            Ok(take(h)?.as_primitive::<UInt64Type>().clone())
        };
        Ok(Snapshot {
            keys: take(self.keys.as_ref())?,
            rows: take_hashes(&self.rows)?,
            hashes: FieldHashes::Loaded(hashes.iter().map(take_hashes).collect::<Result<_>>()?),
            record_ids: self
                .record_ids
                .as_ref()
                .map(|r| Ok::<_, Error>(take(r)?.as_string::<i32>().clone()))
                .transpose()?,
            fields: self.fields,
        })
    }

    /// A record a run sent without committing (its hashes are unknown): it may or may not be at
    /// the destination.
    pub fn unknown(&self, row: usize) -> bool {
        self.rows.is_null(row)
    }

    /// Makes the records of `keys` unknown (see [`Snapshot::unknown`]): those present lose their
    /// field hashes, and those not present are added. The field hashes must be in memory.
    pub fn with_unknown(self, keys: &[Key]) -> Result<Self> {
        if keys.is_empty() {
            return Ok(self);
        }
        let index = KeyIndex::build(&self.keys);
        let mut seen = std::collections::HashSet::new();
        let mut present = vec![false; self.keys.len()];
        let mut new: Vec<&Key> = vec![];
        for k in keys {
            match index.find(&self.keys, k.as_ref()) {
                Some(j) => present[j as usize] = true,
                None if seen.insert(k) => new.push(k),
                None => {}
            }
        }
        let FieldHashes::Loaded(mut hashes) = self.hashes else {
            return Err(Error::State {
                message: "internal: unknown records are added with the field hashes in memory"
                    .into(),
            });
        };
        let added = key_array(&new);
        let keys = if new.is_empty() {
            self.keys
        } else if self.keys.is_empty() {
            added
        } else if added.data_type() == self.keys.data_type() {
            datafusion::arrow::compute::concat(&[self.keys.as_ref(), added.as_ref()])?
        } else {
            let text = DataType::Utf8;
            datafusion::arrow::compute::concat(&[
                datafusion::arrow::compute::cast(&self.keys, &text)?.as_ref(),
                datafusion::arrow::compute::cast(&added, &text)?.as_ref(),
            ])?
        };
        let mut fields = self.fields;
        if hashes.is_empty() && fields.is_empty() {
            // A snapshot that never committed fields: an unknown marker needs one column.
            fields.push(String::new());
            hashes.push(UInt64Array::from(vec![0u64; present.len()]));
        }
        let unknown = |h: &UInt64Array| {
            let mut b = UInt64Array::builder(h.len() + new.len());
            for (j, v) in h.iter().enumerate() {
                b.append_option(v.filter(|_| !present[j]));
            }
            b.append_nulls(new.len());
            b.finish()
        };
        let hashes: Vec<UInt64Array> = hashes.iter().map(unknown).collect();
        let record_ids = self.record_ids.as_ref().map(|record_ids| {
            let mut ids: Vec<Option<&str>> = record_ids.iter().collect();
            ids.extend(std::iter::repeat_n(None, new.len()));
            StringArray::from(ids)
        });
        let snapshot = Snapshot::new(keys, fields, hashes, record_ids);
        if new.is_empty() {
            return Ok(snapshot);
        }
        // Keep the snapshot sorted, so that the diff can still walk it.
        snapshot.sorted()
    }
}

/// Finds a key's row in a snapshot.
pub struct KeyIndex {
    table: HashTable<u32>,
}

impl KeyIndex {
    pub fn build(keys: &ArrayRef) -> Self {
        let mut table = HashTable::with_capacity(keys.len());
        match keys.data_type() {
            DataType::Int64 => {
                let k = keys.as_primitive::<Int64Type>();
                let h = |r: &u32| Key::Int(k.value(*r as usize)).index_hash();
                for row in 0..k.len() {
                    table.insert_unique(Key::Int(k.value(row)).index_hash(), row as u32, h);
                }
            }
            DataType::Utf8 => {
                let k = keys.as_string::<i32>();
                let h = |r: &u32| str_hash(k.value(*r as usize));
                for row in 0..k.len() {
                    table.insert_unique(str_hash(k.value(row)), row as u32, h);
                }
            }
            _ => {}
        }
        Self { table }
    }

    pub fn find(&self, keys: &ArrayRef, key: KeyRef<'_>) -> Option<u32> {
        if self.table.is_empty() {
            return None;
        }
        match key {
            KeyRef::Int(v) => {
                let k = keys.as_primitive::<Int64Type>();
                self.table
                    .find(Key::Int(v).index_hash(), |r| k.value(*r as usize) == v)
                    .copied()
            }
            KeyRef::Str(s) => {
                let k = keys.as_string::<i32>();
                self.table
                    .find(str_hash(s), |r| k.value(*r as usize) == s)
                    .copied()
            }
        }
    }
}

/// A key borrowed from a normalized key column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRef<'a> {
    Int(i64),
    Str(&'a str),
}

/// Whether `a` sorts after `b` (keys of two types never do: the diff then looks keys up).
fn key_after(a: KeyRef<'_>, b: KeyRef<'_>) -> bool {
    match (a, b) {
        (KeyRef::Int(a), KeyRef::Int(b)) => a > b,
        (KeyRef::Str(a), KeyRef::Str(b)) => a > b,
        _ => false,
    }
}

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

/// The in-memory index hash of a key (as [`Key::index_hash`]).
fn key_hash(key: KeyRef<'_>) -> u64 {
    match key {
        KeyRef::Int(v) => Key::Int(v).index_hash(),
        KeyRef::Str(s) => str_hash(s),
    }
}

impl KeyRef<'_> {
    fn to_owned(self) -> Key {
        match self {
            KeyRef::Int(v) => Key::Int(v),
            KeyRef::Str(s) => Key::Str(s.into()),
        }
    }
}

impl Key {
    fn as_ref(&self) -> KeyRef<'_> {
        match self {
            Key::Int(v) => KeyRef::Int(*v),
            Key::Str(s) => KeyRef::Str(s),
        }
    }
}

/// A normalized key column, typed once per batch.
enum TypedKeys<'a> {
    Int(&'a Int64Array),
    Str(&'a StringArray),
}

impl<'a> TypedKeys<'a> {
    fn of(keys: &'a ArrayRef) -> Self {
        match keys.data_type() {
            DataType::Int64 => TypedKeys::Int(keys.as_primitive::<Int64Type>()),
            _ => TypedKeys::Str(keys.as_string::<i32>()),
        }
    }

    fn at(&self, row: usize) -> Option<KeyRef<'a>> {
        match self {
            TypedKeys::Int(a) => a.is_valid(row).then(|| KeyRef::Int(a.value(row))),
            TypedKeys::Str(a) => a.is_valid(row).then(|| KeyRef::Str(a.value(row))),
        }
    }
}

/// Finds model keys in the snapshot. Commits write snapshots sorted by key, so a model read in
/// key order is matched by walking a cursor, with sequential memory access and no index at all;
/// each input stream (a scan's partition, in key order of its own) walks a cursor of its own.
/// Keys out of order fall back to binary search; once they are common, to a hash index (built
/// then, once).
struct Locator {
    keys: ArrayRef,
    sorted: bool,
    /// One per input stream.
    cursors: Vec<usize>,
    lookups: u64,
    misses: u64,
    index: Option<KeyIndex>,
}

/// The order that sorts normalized keys; `None` if they already are.
pub(crate) fn key_order(keys: &ArrayRef) -> Result<Option<datafusion::arrow::array::UInt32Array>> {
    if keys_sorted(keys) {
        return Ok(None);
    }
    Ok(Some(datafusion::arrow::compute::sort_to_indices(
        keys, None, None,
    )?))
}

/// Whether normalized keys are in strictly increasing order.
fn keys_sorted(keys: &ArrayRef) -> bool {
    match keys.data_type() {
        DataType::Int64 => keys
            .as_primitive::<Int64Type>()
            .values()
            .windows(2)
            .all(|w| w[0] < w[1]),
        DataType::Utf8 => {
            let k = keys.as_string::<i32>();
            (1..k.len()).all(|i| k.value(i - 1) < k.value(i))
        }
        _ => true,
    }
}

/// Snapshot keys a cursor steps over before a lookup counts as out of order.
const LOOK_AHEAD: usize = 16;

/// Out-of-order lookups answered by binary search before a hash index is built.
const INDEX_AFTER_MISSES: u64 = 4096;

impl Locator {
    fn new(keys: ArrayRef) -> Self {
        let sorted = keys_sorted(&keys);
        Self {
            index: (!sorted).then(|| KeyIndex::build(&keys)),
            keys,
            sorted,
            cursors: vec![],
            lookups: 0,
            misses: 0,
        }
    }

    /// Snapshot key `j` compared with `key`.
    fn cmp(&self, j: usize, key: KeyRef<'_>) -> std::cmp::Ordering {
        match key {
            KeyRef::Int(v) => self.keys.as_primitive::<Int64Type>().value(j).cmp(&v),
            KeyRef::Str(s) => self.keys.as_string::<i32>().value(j).cmp(s),
        }
    }

    /// The snapshot row of `key`, read from input stream `stream`.
    fn find(&mut self, key: KeyRef<'_>, stream: usize) -> Option<u32> {
        let n = self.keys.len();
        if n == 0 {
            return None;
        }
        if !self.sorted {
            return self.index.as_ref().and_then(|i| i.find(&self.keys, key));
        }
        self.lookups += 1;
        if self.cursors.len() <= stream {
            self.cursors.resize(stream + 1, 0);
        }
        let c = self.cursors[stream];
        use std::cmp::Ordering::*;
        let at_cursor = if c < n { self.cmp(c, key) } else { Less };
        if at_cursor == Equal {
            self.cursors[stream] = c + 1;
            return Some(c as u32);
        }
        // Between the previous key and the cursor's: not in a sorted snapshot.
        if at_cursor == Greater && (c == 0 || self.cmp(c - 1, key) == Less) {
            return None;
        }
        if c >= n && self.cmp(n - 1, key) == Less {
            return None;
        }
        if at_cursor == Less {
            // The model skipped a few snapshot keys (records it no longer has): look ahead.
            for j in c + 1..n.min(c + 1 + LOOK_AHEAD) {
                match self.cmp(j, key) {
                    Less => continue,
                    Equal => {
                        self.cursors[stream] = j + 1;
                        return Some(j as u32);
                    }
                    Greater => {
                        self.cursors[stream] = j;
                        return None;
                    }
                }
            }
        }
        self.misses += 1;
        if self.index.is_none() && self.misses > INDEX_AFTER_MISSES {
            self.index = Some(KeyIndex::build(&self.keys));
        }
        let found = match &self.index {
            Some(index) => index.find(&self.keys, key),
            None => None,
        };
        let position = match found {
            Some(j) => j as usize + 1,
            None => {
                // Binary search: the first snapshot key not less than `key`.
                let (mut lo, mut hi) = (0, n);
                while lo < hi {
                    let mid = (lo + hi) / 2;
                    if self.cmp(mid, key) == Less {
                        lo = mid + 1;
                    } else {
                        hi = mid;
                    }
                }
                if self.index.is_none() && lo < n && self.cmp(lo, key) == Equal {
                    self.cursors[stream] = lo + 1;
                    return Some(lo as u32);
                }
                lo
            }
        };
        self.cursors[stream] = position;
        found
    }
}

fn str_hash(s: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(s.as_bytes(), 4)
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
}

/// `Change::hashes_at` of a change without field hashes (a delete).
const NO_HASHES: u32 = u32::MAX;

impl Change {
    /// Whether it carries the model row's field hashes (every change but a delete).
    pub fn has_hashes(&self) -> bool {
        self.hashes_at != NO_HASHES
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
    /// Changed rows the mode does not send (create-only syncs).
    pub skipped: u64,
    pub null_keys: u64,
    pub duplicates: u64,
}

impl DiffCounts {
    /// Counts the live changes as inserts (new records), updates and deletes.
    pub fn count_changes(&mut self, changes: &[Change]) {
        for c in changes.iter().filter(|c| c.live) {
            match (c.op, c.row) {
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
}

impl Hashed {
    pub fn of(spec: &DiffSpec, batch: &RecordBatch) -> Result<Self> {
        let rows = batch.num_rows();
        let mut hashes: Vec<Vec<u64>> = Vec::with_capacity(batch.num_columns());
        if !spec.mode.listed_deletes() {
            for column in batch.columns() {
                let mut h = Vec::with_capacity(rows);
                hash_array(column.as_ref(), &mut h)?;
                hashes.push(h);
            }
        }
        let keys = match spec.key {
            Some(k) => Some(normalize_key(batch.column(k), &spec.fields[k])?),
            None => None,
        };
        Ok(Self { rows, hashes, keys })
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
    /// Changes whose row hash differed: which fields changed is settled by [`Differ::resolve`].
    pending: Vec<u32>,
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
    all_fields: u64,
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
        let all_fields = spec.all_fields();
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
            pending: vec![],
            resolved: vec![false; snapshot.fields.len()],
            live: HashTable::new(),
            newest: None,
            unindexed_from: 0,
            changes: Changes::new(spec.fields.len()),
            counts: DiffCounts::default(),
            duplicate_samples: vec![],
            all_fields,
            spec,
            snapshot,
        })
    }

    /// Classifies every row of `batch` (whose columns are the spec's fields, in order).
    pub fn push(&mut self, batch: &RecordBatch) -> Result<BatchDiff> {
        self.push_from(&Hashed::of(&self.spec, batch)?, 0)
    }

    /// Classifies every row of a hashed batch, read from input stream `stream` (see `Locator`).
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
                        let Some(op) = self.new_op() else {
                            self.counts.skipped += 1;
                            continue;
                        };
                        let id = self.add(
                            op,
                            key_ref.to_owned(),
                            Some(j),
                            row_hashes(row),
                            self.all_fields,
                        );
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
                    } else if let Some(op) = self.spec.mode.changed_op() {
                        let key_bit = key_index.map(|k| 1u64 << k).unwrap_or(0);
                        let id = self.add(
                            op,
                            key_ref.to_owned(),
                            Some(j),
                            row_hashes(row),
                            changed | key_bit,
                        );
                        if pending {
                            self.pending.push(id);
                        }
                        self.live_put(id);
                        out.change_of_row[row] = Some(id);
                    } else {
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
                    let Some(op) = self.new_op() else {
                        self.counts.skipped += 1;
                        continue;
                    };
                    let id = self.add(
                        op,
                        key_ref.to_owned(),
                        None,
                        row_hashes(row),
                        self.all_fields,
                    );
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
        for id in &self.pending {
            let c = &self.changes[*id as usize];
            let j = c.row.expect("a pending update has a snapshot row") as usize;
            if !old.is_valid(j) || old.value(j) != self.changes.hashes(c)[i] {
                self.changes[*id as usize].changed |= 1 << i;
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
        if !self.pending.is_empty() && self.resolved.iter().any(|r| !r) {
            return Err(Error::State {
                message: "internal: the diff ended before its updates' fields were resolved".into(),
            });
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

/// A snapshot key column from owned keys: Int64 if every key is an integer, else text.
pub fn key_array(keys: &[&Key]) -> ArrayRef {
    let ints: Option<Vec<i64>> = keys
        .iter()
        .map(|k| match k {
            Key::Int(v) => Some(*v),
            Key::Str(_) => None,
        })
        .collect();
    if let Some(ints) = ints {
        Arc::new(Int64Array::from(ints))
    } else {
        Arc::new(StringArray::from_iter_values(keys.iter().map(
            |k| match k {
                Key::Str(s) => s.to_string(),
                Key::Int(v) => v.to_string(),
            },
        )))
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::{Field, Schema};

    use super::*;
    use crate::sync::hash::HASH_VERSION;
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
