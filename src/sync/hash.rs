//! Stable per-value hashes, the ones persisted in sync state.
//!
//! Never DataFusion's internal hash (its family has changed between versions): every value is
//! normalized (integers to i64, floats to f64 with one zero and one NaN, every string layout to
//! its bytes, timestamps to UTC microseconds, decimals to their canonical text) and hashed with
//! XXH3-64, seeded by a type tag so `1`, `1.0` and `"1"` differ. [`HASH_VERSION`] is written in
//! every manifest; a change to anything here must bump it.

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Int64Array, StringArray, UInt64Array,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Int64Type, TimeUnit};
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::error::{Error, Result};

/// The name and version of the hash scheme, as recorded in manifests.
pub const HASH_VERSION: &str = "xxh3_64/v1";

/// The hashes of a state kept in a Postgres source (`diff 'warehouse'`): Postgres computes them,
/// `hashtextextended(value::text, 0)`.
pub const POSTGRES_HASH_VERSION: &str = "postgres-hashtextextended/v1";

const NULL: u64 = 0x9e37_79b9_7f4a_7c15;
const TAG_INT: u64 = 1;
const TAG_UINT: u64 = 2;
const TAG_FLOAT: u64 = 3;
const TAG_STR: u64 = 4;
const TAG_BIN: u64 = 5;
const TAG_BOOL: u64 = 6;
const TAG_DATE: u64 = 7;
const TAG_TS: u64 = 8;
const TAG_DECIMAL: u64 = 9;
const TAG_OTHER: u64 = 10;

fn int(tag: u64, v: i64) -> u64 {
    xxh3_64_with_seed(&v.to_le_bytes(), tag)
}

fn bytes(tag: u64, v: &[u8]) -> u64 {
    xxh3_64_with_seed(v, tag)
}

/// One stable hash per value of `array`, appended to `out`.
///
/// Long because it is one match over every Arrow type sluice hashes; each arm is short.
pub fn hash_array(array: &dyn Array, out: &mut Vec<u64>) -> Result<()> {
    out.reserve(array.len());
    let nulls = array.logical_nulls();
    let valid = |i: usize| nulls.as_ref().is_none_or(|n| n.is_valid(i));
    macro_rules! each {
        ($values:expr, $f:expr) => {{
            let values = $values;
            for i in 0..array.len() {
                out.push(if valid(i) { $f(values.value(i)) } else { NULL });
            }
        }};
    }
    match array.data_type() {
        DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64 => {
            let wide = cast(array, &DataType::Int64)?;
            each!(wide.as_primitive::<Int64Type>(), |v| int(TAG_INT, v))
        }
        DataType::UInt8 | DataType::UInt16 | DataType::UInt32 | DataType::UInt64 => {
            let wide = cast(array, &DataType::UInt64)?;
            let wide = wide
                .as_any()
                .downcast_ref::<UInt64Array>()
                .expect("cast to UInt64");
            // Unsigned values that fit in i64 hash like the same signed value.
            each!(wide, |v: u64| match i64::try_from(v) {
                Ok(v) => int(TAG_INT, v),
                Err(_) => xxh3_64_with_seed(&v.to_le_bytes(), TAG_UINT),
            })
        }
        DataType::Float16 | DataType::Float32 | DataType::Float64 => {
            let wide = cast(array, &DataType::Float64)?;
            each!(
                wide.as_primitive::<datafusion::arrow::datatypes::Float64Type>(),
                |v: f64| {
                    let v = if v == 0.0 {
                        0.0
                    } else if v.is_nan() {
                        f64::NAN
                    } else {
                        v
                    };
                    xxh3_64_with_seed(&v.to_bits().to_le_bytes(), TAG_FLOAT)
                }
            )
        }
        DataType::Utf8 => each!(array.as_string::<i32>(), |v: &str| bytes(
            TAG_STR,
            v.as_bytes()
        )),
        DataType::LargeUtf8 => each!(array.as_string::<i64>(), |v: &str| bytes(
            TAG_STR,
            v.as_bytes()
        )),
        DataType::Utf8View => each!(array.as_string_view(), |v: &str| bytes(
            TAG_STR,
            v.as_bytes()
        )),
        DataType::Binary => each!(array.as_binary::<i32>(), |v| bytes(TAG_BIN, v)),
        DataType::LargeBinary => each!(array.as_binary::<i64>(), |v| bytes(TAG_BIN, v)),
        DataType::BinaryView => each!(array.as_binary_view(), |v| bytes(TAG_BIN, v)),
        DataType::Boolean => {
            let b: &BooleanArray = array.as_boolean();
            each!(b, |v: bool| int(TAG_BOOL, v as i64))
        }
        DataType::Date32 | DataType::Date64 => {
            let days = cast(array, &DataType::Date32)?;
            let days = cast(&days, &DataType::Int32)?;
            let days = cast(&days, &DataType::Int64)?;
            each!(days.as_primitive::<Int64Type>(), |v| int(TAG_DATE, v))
        }
        DataType::Timestamp(_, tz) => {
            let micros = cast(
                array,
                &DataType::Timestamp(TimeUnit::Microsecond, tz.clone()),
            )?;
            let micros = cast(&micros, &DataType::Int64)?;
            each!(micros.as_primitive::<Int64Type>(), |v| int(TAG_TS, v))
        }
        DataType::Decimal32(..)
        | DataType::Decimal64(..)
        | DataType::Decimal128(..)
        | DataType::Decimal256(..) => {
            let text = cast(array, &DataType::Utf8)?;
            each!(text.as_string::<i32>(), |v: &str| bytes(
                TAG_DECIMAL,
                canonical_decimal(v).as_bytes()
            ))
        }
        DataType::Null => out.extend(std::iter::repeat_n(NULL, array.len())),
        _ => {
            // Lists, structs, times, durations, intervals: their display text is stable.
            let formatter = ArrayFormatter::try_new(array, &FormatOptions::default())?;
            for i in 0..array.len() {
                out.push(if valid(i) {
                    bytes(TAG_OTHER, formatter.value(i).to_string().as_bytes())
                } else {
                    NULL
                });
            }
        }
    }
    Ok(())
}

/// `1.500` and `1.5` are the same number.
fn canonical_decimal(v: &str) -> &str {
    if !v.contains('.') {
        return v;
    }
    let v = v.trim_end_matches('0');
    v.strip_suffix('.').unwrap_or(v)
}

/// The hash of a whole row from its field hashes (identifies append-only records).
pub fn combine(field_hashes: impl IntoIterator<Item = u64>) -> u64 {
    let mut buf = Vec::with_capacity(64);
    for h in field_hashes {
        buf.extend_from_slice(&h.to_le_bytes());
    }
    xxh3_64(&buf)
}

/// The start of a record's row hash (see [`fold_row`]).
pub const ROW_SEED: u64 = 0x2545_f491_4f6c_dd1d;

/// The stored hash of a field a new record was created without (its `WHEN NOT MATCHED … INSERT`
/// does not list it) and that an UPDATE may send: no model value hashes to it (but with
/// probability 2^-64), so the next run finds the field changed and its UPDATE sends it, as a
/// second SQL MERGE would. (Not null: a record whose every hash is null is one sent without an
/// answer.)
pub const UNSENT_HASH: u64 = 0x756e_7365_6e74_2e2e;

/// What an unknown field hash (a field mapped after the record was sent) contributes to a row
/// hash: no model value hashes to it, so such a record always goes on to the field-by-field check.
const UNKNOWN_FIELD: u64 = 0xd6e8_feb8_6659_fd93;

/// Folds one field hash into a record's row hash: `rotl(acc, 29) ^ field`, over the stored fields
/// in the snapshot's order from [`ROW_SEED`]. Field hashes are already XXH3 outputs, so this
/// linear fold keeps their quality: the row hashes of two records are equal exactly when all their
/// field hashes are, except with probability 2^-64 (29 is odd, so up to 64 fields land on distinct
/// rotations). Persisted in snapshots: part of [`HASH_VERSION`].
#[inline]
pub fn fold_row(acc: u64, field: Option<u64>) -> u64 {
    acc.rotate_left(29) ^ field.unwrap_or(UNKNOWN_FIELD)
}

/// Builds the row hashes of a snapshot one field column at a time (so that the field columns
/// never need to be in memory together). A record whose every field hash is unknown gets a null
/// row hash: it was sent without an answer.
pub struct RowHashes {
    acc: Vec<u64>,
    known: Vec<bool>,
    fields: usize,
}

impl RowHashes {
    pub fn new(rows: usize) -> Self {
        Self {
            acc: vec![ROW_SEED; rows],
            known: vec![false; rows],
            fields: 0,
        }
    }

    /// Folds in the next field's column (one hash per record, null = unknown).
    pub fn add(&mut self, column: &UInt64Array) {
        debug_assert_eq!(column.len(), self.acc.len());
        self.fields += 1;
        if column.null_count() == 0 {
            for (acc, h) in self.acc.iter_mut().zip(column.values()) {
                *acc = fold_row(*acc, Some(*h));
            }
            self.known.fill(true);
            return;
        }
        for (row, acc) in self.acc.iter_mut().enumerate() {
            let h = column.is_valid(row).then(|| column.value(row));
            *acc = fold_row(*acc, h);
            self.known[row] |= h.is_some();
        }
    }

    pub fn finish(self) -> UInt64Array {
        if self.fields == 0 || self.known.iter().all(|k| *k) {
            return UInt64Array::from(self.acc);
        }
        self.acc
            .into_iter()
            .zip(self.known)
            .map(|(h, known)| known.then_some(h))
            .collect()
    }
}

/// The field that carries a key made of several fields (`MERGE … ON t.a = … AND t.b = …`, a
/// composite primary key). It is added after the mapped fields; sinks match by the parts and do not
/// write it.
pub const COMPOSITE_KEY: &str = "__sluice_key";

/// The composite key of `parts` as one text value: each part's text prefixed by its length in
/// characters (`1:7,3:a,b`), so any text round-trips; null if any part is null.
pub fn composite_key_expr(
    parts: Vec<datafusion::logical_expr::Expr>,
) -> datafusion::logical_expr::Expr {
    use datafusion::functions::unicode::expr_fn::character_length;
    use datafusion::logical_expr::{Operator, binary_expr, cast, lit};
    let concat = |a, b| binary_expr(a, Operator::StringConcat, b);
    let mut key = None;
    for part in parts {
        let text = cast(part, DataType::Utf8);
        let piece = concat(
            concat(
                cast(character_length(text.clone()), DataType::Utf8),
                lit(":"),
            ),
            text,
        );
        key = Some(match key {
            None => piece,
            Some(previous) => concat(concat(previous, lit(",")), piece),
        });
    }
    key.expect("a composite key has parts")
}

/// The parts of a composite key written by [`composite_key_expr`] (`None`: not such a key).
pub fn split_composite_key(key: &str, parts: usize) -> Option<Vec<String>> {
    let mut out = Vec::with_capacity(parts);
    let mut rest = key;
    for i in 0..parts {
        if i > 0 {
            rest = rest.strip_prefix(',')?;
        }
        let (len, after) = rest.split_once(':')?;
        let len: usize = len.parse().ok()?;
        let end = match after.char_indices().nth(len) {
            Some((at, _)) => at,
            None if after.chars().count() == len => after.len(),
            None => return None,
        };
        out.push(after[..end].to_string());
        rest = &after[end..];
    }
    rest.is_empty().then_some(out)
}

/// A match key column in its normalized type: integers as Int64, everything else as its text.
pub fn normalize_key(array: &ArrayRef, field: &str) -> Result<ArrayRef> {
    let dt = array.data_type();
    let target = if dt.is_integer() {
        DataType::Int64
    } else {
        DataType::Utf8
    };
    if dt == &target {
        return Ok(array.clone());
    }
    cast(array, &target).map_err(|e| Error::Plan {
        message: format!(
            "the key field '{field}' is {dt}, which cannot be used as a match key ({e}); CAST it to a string or an integer"
        ),
        token: Some(field.to_string()),
    })
}

/// A normalized key value (owned), for the keys of records that are not in the snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    Int(i64),
    Str(Box<str>),
}

impl Key {
    /// The key at `row` of a normalized key column (`None` when null).
    pub fn at(keys: &ArrayRef, row: usize) -> Option<Key> {
        if keys.is_null(row) {
            return None;
        }
        match keys.data_type() {
            DataType::Int64 => Some(Key::Int(
                keys.as_any()
                    .downcast_ref::<Int64Array>()
                    .expect("Int64 key")
                    .value(row),
            )),
            _ => Some(Key::Str(
                keys.as_any()
                    .downcast_ref::<StringArray>()
                    .expect("Utf8 key")
                    .value(row)
                    .into(),
            )),
        }
    }

    /// The hash used by in-memory key indexes (not persisted).
    pub fn index_hash(&self) -> u64 {
        match self {
            Key::Int(v) => int(TAG_INT, *v),
            Key::Str(s) => bytes(TAG_STR, s.as_bytes()),
        }
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Key::Int(v) => write!(f, "{v}"),
            Key::Str(s) => f.write_str(s),
        }
    }
}

#[cfg(test)]
mod composite_tests {
    use super::split_composite_key;

    #[test]
    fn composite_keys_split_back_into_their_parts() {
        let parts = ["7", "a,1:b", "", "émoji 🦀:,"];
        let key: String = parts
            .iter()
            .map(|p| format!("{}:{p}", p.chars().count()))
            .collect::<Vec<_>>()
            .join(",");
        assert_eq!(split_composite_key(&key, 4).unwrap(), parts);
        assert_eq!(split_composite_key(&key, 3), None, "a part left over");
        assert_eq!(split_composite_key("5:ab", 1), None, "too short");
        assert_eq!(split_composite_key("x:ab", 1), None);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{
        Decimal128Array, Float64Array, Int32Array, StringViewArray, TimestampMillisecondArray,
        TimestampSecondArray,
    };

    use super::*;

    fn hashes(a: &dyn Array) -> Vec<u64> {
        let mut out = vec![];
        hash_array(a, &mut out).unwrap();
        out
    }

    #[test]
    fn equal_values_hash_equal_across_layouts() {
        assert_eq!(
            hashes(&Int32Array::from(vec![Some(5), None])),
            hashes(&Int64Array::from(vec![Some(5), None]))
        );
        assert_eq!(
            hashes(&StringArray::from(vec!["a@x.io"])),
            hashes(&StringViewArray::from(vec!["a@x.io"]))
        );
        assert_eq!(
            hashes(&TimestampSecondArray::from(vec![1_700_000_000])),
            hashes(&TimestampMillisecondArray::from(vec![1_700_000_000_000]))
        );
        assert_eq!(
            hashes(&Float64Array::from(vec![0.0])),
            hashes(&Float64Array::from(vec![-0.0]))
        );
        let a = Decimal128Array::from(vec![150])
            .with_precision_and_scale(10, 2)
            .unwrap();
        let b = Decimal128Array::from(vec![15])
            .with_precision_and_scale(10, 1)
            .unwrap();
        assert_eq!(hashes(&a), hashes(&b));
    }

    #[test]
    fn types_and_nulls_are_distinguished() {
        let one_int = hashes(&Int64Array::from(vec![1]));
        let one_float = hashes(&Float64Array::from(vec![1.0]));
        let one_str = hashes(&StringArray::from(vec!["1"]));
        assert_ne!(one_int, one_float);
        assert_ne!(one_int, one_str);
        let null = hashes(&StringArray::from(vec![None::<&str>]));
        assert_ne!(null, hashes(&StringArray::from(vec![""])));
    }

    /// The persisted hashes must never change silently: these are the values of v1.
    #[test]
    fn hash_values_are_pinned() {
        let h = hashes(&StringArray::from(vec![Some("ada@example.com"), None]));
        let i = hashes(&Int64Array::from(vec![42]));
        assert_eq!(
            (h[0], h[1], i[0]),
            (
                xxh3_64_with_seed(b"ada@example.com", 4),
                0x9e37_79b9_7f4a_7c15,
                xxh3_64_with_seed(&42i64.to_le_bytes(), 1)
            )
        );
        assert_eq!(xxh3_64(b""), 0x2d06_8005_38d3_94c2, "XXH3-64 of nothing");
    }

    #[test]
    fn row_hashes_are_pinned_and_null_only_when_nothing_is_known() {
        let a = UInt64Array::from(vec![Some(1), Some(2), None]);
        let b = UInt64Array::from(vec![Some(3), None, None]);
        let mut rows = RowHashes::new(3);
        rows.add(&a);
        rows.add(&b);
        let rows = rows.finish();
        assert_eq!(
            rows.value(0),
            ROW_SEED.rotate_left(58) ^ 1u64.rotate_left(29) ^ 3
        );
        assert_eq!(
            rows.value(0),
            fold_row(fold_row(ROW_SEED, Some(1)), Some(3))
        );
        assert_eq!(rows.value(1), fold_row(fold_row(ROW_SEED, Some(2)), None));
        assert_ne!(
            rows.value(1),
            fold_row(fold_row(ROW_SEED, Some(2)), Some(0))
        );
        assert!(
            rows.is_null(2),
            "every field unknown: sent without an answer"
        );
        // Swapped values give another row hash.
        assert_ne!(
            fold_row(fold_row(ROW_SEED, Some(5)), Some(9)),
            fold_row(fold_row(ROW_SEED, Some(9)), Some(5))
        );
    }

    #[test]
    fn keys_normalize_to_int_or_text() {
        let k: ArrayRef = Arc::new(Int32Array::from(vec![Some(7), None]));
        let n = normalize_key(&k, "id").unwrap();
        assert_eq!(n.data_type(), &DataType::Int64);
        assert_eq!(Key::at(&n, 0), Some(Key::Int(7)));
        assert_eq!(Key::at(&n, 1), None);
        let s: ArrayRef = Arc::new(StringViewArray::from(vec!["a"]));
        let n = normalize_key(&s, "email").unwrap();
        assert_eq!(Key::at(&n, 0).unwrap().to_string(), "a");
    }
}
