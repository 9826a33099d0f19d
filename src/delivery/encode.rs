//! Arrow rows to JSON records, vectorized: one batch is encoded in one pass by arrow-json and cut
//! into per-record slices of the same buffer (no per-row allocation).

use bytes::Bytes;
use datafusion::arrow::json::WriterBuilder;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};

use super::batch::Record;
use crate::error::Result;

/// Every row of `batch` as one JSON object per line. Nulls are written as `null` (a mapped field
/// that is null is sent as null, not left out). Shared by every destination that writes JSON.
pub fn json_lines(batch: &RecordBatch) -> Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(batch.num_rows() * 96);
    let mut writer = WriterBuilder::new()
        .with_explicit_nulls(true)
        .build::<_, datafusion::arrow::json::writer::LineDelimited>(&mut buf);
    writer.write(batch)?;
    writer.finish()?;
    drop(writer);
    Ok(buf)
}

/// Encodes every row of `batch` as a JSON object; `key` is the index of the column whose value
/// identifies a record.
pub fn encode_records(batch: &RecordBatch, key: Option<usize>) -> Result<Vec<Record>> {
    let rows = batch.num_rows();
    let buf = Bytes::from(json_lines(batch)?);
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
        records.push(Record {
            key,
            json: buf.slice(start..end),
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
