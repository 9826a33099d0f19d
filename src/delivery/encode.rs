//! Arrow rows to JSON records, vectorized: one batch is encoded in one pass by arrow-json and cut
//! into per-record slices of the same buffer (no per-row allocation).

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use datafusion::arrow::array::{Array, ArrayRef, AsArray, StringArray, UInt32Array};
use datafusion::arrow::compute::{cast, take_record_batch};
use datafusion::arrow::datatypes::{
    DataType, Date32Type, Float32Type, Float64Type, Schema, TimeUnit, TimestampMillisecondType,
};
use datafusion::arrow::json::WriterBuilder;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};

use super::batch::Record;
use crate::contract::{ChangeBatch, Op};
use crate::error::Result;

/// Every row of `batch` as one JSON object per line. Nulls are written as `null` (a mapped field
/// that is null is sent as null, not left out). Shared by every destination that writes JSON.
pub fn json_lines(batch: &RecordBatch) -> Result<Vec<u8>> {
    json_lines_with(batch, true)
}

/// As [`json_lines`]; with `explicit_nulls` false, null fields are left out of the object.
pub fn json_lines_with(batch: &RecordBatch, explicit_nulls: bool) -> Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(batch.num_rows() * 96);
    let mut writer = WriterBuilder::new()
        .with_explicit_nulls(explicit_nulls)
        .build::<_, datafusion::arrow::json::writer::LineDelimited>(&mut buf);
    writer.write(batch)?;
    writer.finish()?;
    drop(writer);
    Ok(buf)
}

/// Encodes every row of `batch` as a JSON object; `key` is the index of the column whose value
/// identifies a record.
pub fn encode_records(batch: &RecordBatch, key: Option<usize>) -> Result<Vec<Record>> {
    encode_rows(batch, key, true, |_| (Op::Upsert, None))
}

/// Encodes the changes a sync's `DiffExec` emits (its fields, then `__op`, `__changed`,
/// `__change`): each record carries only what it sends: every field of a new record, the key and
/// the changed fields of an update, the key alone for a delete. With `skip_nulls`, null fields
/// are left out (the destination keeps its value). Rows are grouped by what they send, so each
/// group is encoded in one vectorized pass.
pub fn encode_changes(
    batch: &RecordBatch,
    key: Option<usize>,
    skip_nulls: bool,
) -> Result<Vec<Record>> {
    let changes = ChangeBatch::of(batch)?;
    let fields = changes.num_fields();
    let key_bit = key.map(|k| 1u64 << k).unwrap_or(0);
    let mut groups: BTreeMap<(u8, u64), Vec<u32>> = BTreeMap::new();
    for row in 0..batch.num_rows() {
        let op = changes.op(row);
        let mask = match op {
            Op::Delete => key_bit,
            _ => changes.changed(row) | key_bit,
        };
        groups
            .entry((op.code(), mask))
            .or_default()
            .push(row as u32);
    }
    let mut records = Vec::with_capacity(batch.num_rows());
    for ((op, mask), rows) in groups {
        let columns: Vec<usize> = (0..fields).filter(|i| mask & (1 << i) != 0).collect();
        let projected = batch.project(&columns)?;
        let group = if rows.len() == batch.num_rows() {
            projected
        } else {
            take_record_batch(&projected, &UInt32Array::from(rows.clone()))?
        };
        let group_key = key.and_then(|k| columns.iter().position(|c| *c == k));
        let op = Op::from_code(op);
        let skip = skip_nulls && op != Op::Delete;
        records.extend(encode_rows(&group, group_key, !skip, |i| {
            (op, changes.change(rows[i] as usize))
        })?);
    }
    Ok(records)
}

/// One record per row; `tag` gives each row's operation and change.
fn encode_rows(
    batch: &RecordBatch,
    key: Option<usize>,
    explicit_nulls: bool,
    tag: impl Fn(usize) -> (Op, Option<u32>),
) -> Result<Vec<Record>> {
    let rows = batch.num_rows();
    let batch = if batch.num_columns() == 0 {
        // arrow-json writes nothing for a batch without columns; an empty object per row.
        RecordBatch::try_new_with_options(
            Arc::new(Schema::empty()),
            vec![],
            &datafusion::arrow::record_batch::RecordBatchOptions::new().with_row_count(Some(rows)),
        )?
    } else {
        batch.clone()
    };
    let buf = Bytes::from(json_lines_with(&batch, explicit_nulls)?);
    let options = FormatOptions::default();
    let keys = key
        .map(|i| ArrayFormatter::try_new(batch.column(i).as_ref(), &options))
        .transpose()?;
    let key_column = key.map(|i| batch.column(i));
    let mut records = Vec::with_capacity(rows);
    let mut start = 0;
    for row in 0..rows {
        let end = memchr_newline(&buf, start).unwrap_or(buf.len());
        let key = match (&keys, key_column) {
            (Some(f), Some(col)) if col.is_valid(row) => Some(f.value(row).to_string()),
            _ => None,
        };
        let (op, change) = tag(row);
        records.push(Record {
            key,
            json: buf.slice(start..end),
            op,
            change,
        });
        start = end + 1;
    }
    Ok(records)
}

fn memchr_newline(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .iter()
        .position(|&b| b == b'\n')
        .map(|i| from + i)
}

/// How a date travels as text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DateStyle {
    /// Midnight UTC in epoch milliseconds (HubSpot).
    EpochMillis,
    /// `2024-01-15` (Salesforce, CSV).
    Iso,
}

/// A column as text values, the way JSON-string and CSV APIs take them (nulls stay null):
/// numbers as written, booleans as `true`/`false`, dates per `dates`, timestamps as ISO 8601
/// UTC with milliseconds.
pub fn text_values(array: &ArrayRef, dates: DateStyle) -> Result<StringArray> {
    let strings: StringArray = match array.data_type() {
        DataType::Float64 => array
            .as_primitive::<Float64Type>()
            .iter()
            .map(|v| v.map(|v| v.to_string()))
            .collect(),
        DataType::Float32 => array
            .as_primitive::<Float32Type>()
            .iter()
            .map(|v| v.map(|v| v.to_string()))
            .collect(),
        DataType::Date32 => array
            .as_primitive::<Date32Type>()
            .iter()
            .map(|v| {
                v.map(|days| match dates {
                    DateStyle::EpochMillis => (i64::from(days) * 86_400_000).to_string(),
                    DateStyle::Iso => chrono::DateTime::from_timestamp(i64::from(days) * 86_400, 0)
                        .map(|t| t.format("%Y-%m-%d").to_string())
                        .unwrap_or_default(),
                })
            })
            .collect(),
        DataType::Timestamp(_, _) => {
            let ms = cast(array, &DataType::Timestamp(TimeUnit::Millisecond, None))?;
            ms.as_primitive::<TimestampMillisecondType>()
                .iter()
                .map(|v| {
                    v.and_then(chrono::DateTime::from_timestamp_millis)
                        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
                })
                .collect()
        }
        DataType::Utf8 => array.as_string::<i32>().clone(),
        _ => cast(array, &DataType::Utf8)?.as_string::<i32>().clone(),
    };
    Ok(strings)
}

/// Appends `s` as a JSON string.
pub fn json_str(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(out, s).expect("writing JSON into memory does not fail");
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    #[test]
    fn one_json_object_per_row_with_keys() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("note", DataType::Utf8, true),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(vec![Some(1), None])),
                Arc::new(StringArray::from(vec![Some("a\nb"), None])),
            ],
        )
        .unwrap();
        let records = encode_records(&batch, Some(0)).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(&records[0].json[..], br#"{"id":1,"note":"a\nb"}"#);
        assert_eq!(&records[1].json[..], br#"{"id":null,"note":null}"#);
        assert_eq!(records[0].key.as_deref(), Some("1"));
        assert_eq!(records[1].key, None);
    }
}
