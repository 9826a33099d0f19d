//! [`ChangeBatch`]: the batches a sync's `DiffExec` hands its sink, read by name and type.
//!
//! A change batch holds the mapped fields (in the model's order; a composite key's joined field
//! among them), then three change columns: `__op` ([`Op`] code), `__changed` (bit i: field i is
//! sent) and `__change` (the change id by which the sink acknowledges it). Deletes carry only the
//! key. A statement without a sync hands its sink plain rows: [`ChangeBatch::plain`] reads them
//! as upserts of every field, so a sink has one code path for both.

use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, AsArray, PrimitiveArray, RecordBatch, UInt8Array, UInt32Array, UInt64Array,
};
use datafusion::arrow::datatypes::{
    DataType, Field, Schema, SchemaRef, UInt8Type, UInt32Type, UInt64Type,
};

use super::Op;
use crate::error::{Error, Result};

/// The number of change columns after the mapped fields.
pub const CHANGE_COLUMNS: usize = 3;
/// The operation column ([`Op::code`]).
pub const OP_COLUMN: &str = "__op";
/// The changed-fields bitmask column.
pub const CHANGED_COLUMN: &str = "__changed";
/// The change id column.
pub const CHANGE_COLUMN: &str = "__change";

/// Whether `name` is one of the change columns.
pub fn is_change_column(name: &str) -> bool {
    name == OP_COLUMN || name == CHANGED_COLUMN || name == CHANGE_COLUMN
}

/// The schema of a change batch: the model's fields (nullable: deletes carry only the key) and
/// the three change columns.
pub fn change_schema(model: &SchemaRef) -> SchemaRef {
    let mut fields: Vec<Field> = model
        .fields()
        .iter()
        .map(|f| f.as_ref().clone().with_nullable(true))
        .collect();
    fields.push(Field::new(OP_COLUMN, DataType::UInt8, false));
    fields.push(Field::new(CHANGED_COLUMN, DataType::UInt64, false));
    fields.push(Field::new(CHANGE_COLUMN, DataType::UInt32, false));
    Arc::new(Schema::new(fields))
}

/// The change columns of one batch.
#[derive(Debug, Clone, Copy)]
struct Columns<'a> {
    ops: &'a PrimitiveArray<UInt8Type>,
    changed: &'a PrimitiveArray<UInt64Type>,
    ids: &'a PrimitiveArray<UInt32Type>,
}

/// A typed view of one batch a sink receives.
#[derive(Debug, Clone, Copy)]
pub struct ChangeBatch<'a> {
    batch: &'a RecordBatch,
    fields: usize,
    changes: Option<Columns<'a>>,
}

impl<'a> ChangeBatch<'a> {
    /// A batch of a sync's changes; an error if its last columns are not the change columns.
    pub fn of(batch: &'a RecordBatch) -> Result<Self> {
        let schema = batch.schema_ref();
        let n = batch.num_columns();
        let expected = [
            (OP_COLUMN, DataType::UInt8),
            (CHANGED_COLUMN, DataType::UInt64),
            (CHANGE_COLUMN, DataType::UInt32),
        ];
        let fields = n
            .checked_sub(CHANGE_COLUMNS)
            .ok_or_else(|| not_changes(schema))?;
        for (i, (name, data_type)) in expected.iter().enumerate() {
            let field = schema.field(fields + i);
            if field.name() != name || field.data_type() != data_type {
                return Err(not_changes(schema));
            }
        }
        Ok(Self {
            batch,
            fields,
            changes: Some(Columns {
                ops: batch.column(fields).as_primitive(),
                changed: batch.column(fields + 1).as_primitive(),
                ids: batch.column(fields + 2).as_primitive(),
            }),
        })
    }

    /// Plain rows (a statement without a sync): every row an upsert of every field.
    pub fn plain(batch: &'a RecordBatch) -> Self {
        Self {
            batch,
            fields: batch.num_columns(),
            changes: None,
        }
    }

    /// [`ChangeBatch::of`] in a sync, [`ChangeBatch::plain`] otherwise.
    pub fn read(batch: &'a RecordBatch, in_sync: bool) -> Result<Self> {
        if in_sync {
            Self::of(batch)
        } else {
            Ok(Self::plain(batch))
        }
    }

    pub fn num_rows(&self) -> usize {
        self.batch.num_rows()
    }

    /// The number of mapped fields.
    pub fn num_fields(&self) -> usize {
        self.fields
    }

    /// Mapped field `i`.
    pub fn field(&self, i: usize) -> &'a ArrayRef {
        assert!(i < self.fields, "field {i} of {}", self.fields);
        self.batch.column(i)
    }

    /// The mapped fields alone.
    pub fn fields(&self) -> RecordBatch {
        self.batch
            .project(&(0..self.fields).collect::<Vec<_>>())
            .expect("the mapped fields are columns of the batch")
    }

    /// What row `row` asks of the destination.
    pub fn op(&self, row: usize) -> Op {
        self.changes
            .map_or(Op::Upsert, |c| Op::from_code(c.ops.value(row)))
    }

    /// The fields row `row` sends (bit i: field i); every field for plain rows.
    pub fn changed(&self, row: usize) -> u64 {
        self.changes.map_or(u64::MAX, |c| c.changed.value(row))
    }

    /// The change id of row `row`; `None` for plain rows.
    pub fn change(&self, row: usize) -> Option<u32> {
        self.changes.map(|c| c.ids.value(row))
    }

    /// The `__change` column (a sync's batches only).
    pub fn change_ids(&self) -> Option<&'a UInt32Array> {
        self.changes.map(|c| c.ids)
    }

    /// A change batch in which every row of `fields` is an upsert of every field, with change
    /// ids `ids` (a sink that turns one sync's rows into another object's upserts).
    pub fn upserts(fields: &RecordBatch, ids: &UInt32Array) -> Result<RecordBatch> {
        let rows = fields.num_rows();
        let schema = change_schema(fields.schema_ref());
        let mut columns = fields.columns().to_vec();
        columns.push(Arc::new(UInt8Array::from(vec![Op::Upsert.code(); rows])));
        columns.push(Arc::new(UInt64Array::from(vec![u64::MAX; rows])));
        columns.push(Arc::new(ids.clone()));
        Ok(RecordBatch::try_new(schema, columns)?)
    }

    /// The rows whose operation is `op`.
    pub fn rows_of(&self, op: Op) -> impl Iterator<Item = usize> + '_ {
        (0..self.num_rows()).filter(move |r| self.op(*r) == op)
    }
}

fn not_changes(schema: &SchemaRef) -> Error {
    Error::Write {
        message: format!(
            "a sync's sink received a batch without the change columns ({OP_COLUMN}, {CHANGED_COLUMN}, {CHANGE_COLUMN} last); its columns are: {}",
            schema
                .fields()
                .iter()
                .map(|f| f.name().as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::StringArray;

    use super::*;

    fn changes() -> RecordBatch {
        let model: SchemaRef = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, false),
            Field::new("plan", DataType::Utf8, false),
        ]));
        RecordBatch::try_new(
            change_schema(&model),
            vec![
                Arc::new(StringArray::from(vec![Some("a"), Some("b"), Some("c")])),
                Arc::new(StringArray::from(vec![Some("pro"), Some("free"), None])),
                Arc::new(UInt8Array::from(vec![
                    Op::Upsert.code(),
                    Op::Update.code(),
                    Op::Delete.code(),
                ])),
                Arc::new(UInt64Array::from(vec![0b11, 0b10, 0b01])),
                Arc::new(UInt32Array::from(vec![7, 8, 9])),
            ],
        )
        .unwrap()
    }

    #[test]
    fn a_change_batch_is_read_by_name() {
        let batch = changes();
        let changes = ChangeBatch::of(&batch).unwrap();
        assert_eq!(changes.num_fields(), 2);
        assert_eq!(changes.num_rows(), 3);
        assert_eq!(
            (0..3).map(|r| changes.op(r)).collect::<Vec<_>>(),
            [Op::Upsert, Op::Update, Op::Delete]
        );
        assert_eq!(changes.changed(1), 0b10);
        assert_eq!(changes.change(2), Some(9));
        assert_eq!(changes.rows_of(Op::Delete).collect::<Vec<_>>(), [2]);
        assert_eq!(changes.fields().num_columns(), 2);
        assert_eq!(changes.change_ids().unwrap().values().to_vec(), [7, 8, 9]);
        let upserts =
            ChangeBatch::upserts(&changes.fields(), changes.change_ids().unwrap()).unwrap();
        let upserts = ChangeBatch::of(&upserts).unwrap();
        assert_eq!(upserts.op(2), Op::Upsert);
        assert_eq!(upserts.changed(2), u64::MAX);
        assert_eq!(upserts.change(2), Some(9));
    }

    #[test]
    fn plain_rows_are_upserts_of_every_field() {
        let batch = changes().project(&[0, 1]).unwrap();
        let rows = ChangeBatch::read(&batch, false).unwrap();
        assert_eq!(rows.change_ids(), None);
        assert_eq!(rows.num_fields(), 2);
        assert_eq!(rows.op(0), Op::Upsert);
        assert_eq!(rows.changed(0), u64::MAX);
        assert_eq!(rows.change(0), None);
    }

    #[test]
    fn a_batch_without_change_columns_is_an_error_that_lists_its_columns() {
        let batch = changes().project(&[0, 1, 2]).unwrap();
        let err = ChangeBatch::of(&batch).unwrap_err().to_string();
        assert!(err.contains("__op") && err.contains("id, plan"), "{err}");
        let one = changes().project(&[0]).unwrap();
        assert!(ChangeBatch::of(&one).is_err());
    }
}
