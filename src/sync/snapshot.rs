//! A sync's snapshot: what the destination acknowledged at the last commit, one row per record
//! (normalized key, row hash, field hashes, record id), and how model keys are found in it (a
//! cursor over the sorted keys, a binary search, or a hash index built once keys arrive out of
//! order). The diff ([`super::diff`]) reads it; the state store ([`super::state`]) writes and
//! loads it, and keeps the field hashes behind [`HashStore`] until the diff needs them.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, Int64Array, NullArray, StringArray, UInt64Array,
};
use datafusion::arrow::datatypes::{DataType, Int64Type, UInt64Type};
use hashbrown::HashTable;

use super::hash::{Key, RowHashes};
use crate::error::{Error, Result};

/// A snapshot's field hashes left in storage, read one field at a time.
#[async_trait]
pub trait HashStore: fmt::Debug + Send + Sync {
    /// The files, one per field.
    fn files(&self) -> &[String];

    /// Field `i`'s hashes; `rows` is the snapshot's length.
    async fn column(&self, i: usize, rows: usize) -> Result<UInt64Array>;
}

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
    Stored(Arc<dyn HashStore>),
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
pub(super) fn key_after(a: KeyRef<'_>, b: KeyRef<'_>) -> bool {
    match (a, b) {
        (KeyRef::Int(a), KeyRef::Int(b)) => a > b,
        (KeyRef::Str(a), KeyRef::Str(b)) => a > b,
        _ => false,
    }
}

/// The in-memory index hash of a key (as [`Key::index_hash`]).
pub(super) fn key_hash(key: KeyRef<'_>) -> u64 {
    match key {
        KeyRef::Int(v) => Key::Int(v).index_hash(),
        KeyRef::Str(s) => str_hash(s),
    }
}

impl KeyRef<'_> {
    pub(super) fn to_owned(self) -> Key {
        match self {
            KeyRef::Int(v) => Key::Int(v),
            KeyRef::Str(s) => Key::Str(s.into()),
        }
    }
}

impl Key {
    pub(super) fn as_ref(&self) -> KeyRef<'_> {
        match self {
            Key::Int(v) => KeyRef::Int(*v),
            Key::Str(s) => KeyRef::Str(s),
        }
    }
}

/// A normalized key column, typed once per batch.
pub(super) enum TypedKeys<'a> {
    Int(&'a Int64Array),
    Str(&'a StringArray),
}

impl<'a> TypedKeys<'a> {
    pub(super) fn of(keys: &'a ArrayRef) -> Self {
        match keys.data_type() {
            DataType::Int64 => TypedKeys::Int(keys.as_primitive::<Int64Type>()),
            _ => TypedKeys::Str(keys.as_string::<i32>()),
        }
    }

    pub(super) fn at(&self, row: usize) -> Option<KeyRef<'a>> {
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
pub(super) struct Locator {
    keys: ArrayRef,
    sorted: bool,
    /// One per input stream.
    cursors: Vec<usize>,
    pub(super) lookups: u64,
    pub(super) misses: u64,
    pub(super) index: Option<KeyIndex>,
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
pub(super) fn keys_sorted(keys: &ArrayRef) -> bool {
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
    pub(super) fn new(keys: ArrayRef) -> Self {
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
    pub(super) fn find(&mut self, key: KeyRef<'_>, stream: usize) -> Option<u32> {
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

pub(super) fn str_hash(s: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(s.as_bytes(), 4)
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
