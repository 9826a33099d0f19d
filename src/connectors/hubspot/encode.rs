//! Rows to HubSpot batch inputs. Property values travel as strings, as HubSpot expects: numbers
//! as written, bool as `true`/`false`, date as midnight UTC in epoch milliseconds, datetime as
//! ISO 8601 UTC; a null clears the property (`""`), or is left out under `null_policy 'skip'`.
//! Enumeration values are checked against the property's options before anything is sent.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use datafusion::arrow::array::{Array, StringArray};
use datafusion::arrow::record_batch::RecordBatch;

use super::api::ObjectSchema;
use crate::contract::{ChangeBatch, Op, Rejected};
use crate::delivery::Record;
use crate::delivery::encode::{DateStyle, json_str, text_values};
use crate::error::Result;
use crate::sync::{NullPolicy, SyncRun};

/// What one batch of rows became.
#[derive(Debug, Default)]
pub struct Encoded {
    pub records: Vec<Record>,
    /// Rows refused before sending (an enumeration value that is not an option).
    pub rejects: Vec<Rejected>,
    /// Deletes of records HubSpot does not have (nothing to archive): done.
    pub gone: Vec<u32>,
}

/// Encodes the changes of one HubSpot sync.
#[derive(Debug)]
pub struct Encoder {
    /// The mapped fields, in order (the change columns follow them in a sync's rows).
    pub fields: Vec<String>,
    pub key: Option<usize>,
    /// The key is a property to send (not `hs_object_id`, which is the record id itself).
    pub send_key: bool,
    pub skip_nulls: bool,
    /// Per field: the options of an enumeration property.
    pub options: Vec<Option<Arc<HashSet<String>>>>,
    /// Whether the rows carry a sync's change columns.
    pub changes: bool,
}

impl Encoder {
    /// An encoder of `fields` of `object`, matched by field `key`; in a sync (`sync` set) the
    /// rows carry its change columns and its null policy applies.
    pub fn new(
        object: &ObjectSchema,
        fields: Vec<String>,
        key: usize,
        send_key: bool,
        sync: Option<&SyncRun>,
    ) -> Self {
        Self {
            options: fields
                .iter()
                .map(|f| object.options.get(f).cloned())
                .collect(),
            fields,
            key: Some(key),
            send_key,
            skip_nulls: sync.is_some_and(|r| r.spec.options.null_policy == NullPolicy::Skip),
            changes: sync.is_some(),
        }
    }

    /// `record_id(change)`: a delete's record id, `Some(None)` when HubSpot has no such record.
    ///
    /// Long because it writes each record's JSON in one pass (values, the null policy, enumeration
    /// checks) without a map per record.
    pub fn encode(
        &self,
        batch: &RecordBatch,
        record_id: &dyn Fn(u32) -> Option<Option<String>>,
    ) -> Result<Encoded> {
        let n = self.fields.len();
        let changes = ChangeBatch::read(batch, self.changes)?;
        let values: Vec<StringArray> = (0..n)
            .map(|i| text_values(changes.field(i), DateStyle::EpochMillis))
            .collect::<Result<_>>()?;
        let mut out = Encoded::default();
        for row in 0..batch.num_rows() {
            let op = changes.op(row);
            let mask = changes.changed(row);
            let change = changes.change(row);
            let key = self.key.and_then(|k| {
                values[k]
                    .is_valid(row)
                    .then(|| values[k].value(row).to_string())
            });
            let mut json = Vec::with_capacity(64 + 24 * n);
            if op == Op::Delete {
                match change.and_then(record_id) {
                    Some(Some(id)) => {
                        json.extend_from_slice(b"{\"id\":");
                        json_str(&mut json, &id);
                        json.push(b'}');
                    }
                    Some(None) => {
                        out.gone.extend(change);
                        continue;
                    }
                    None => {
                        // A dry run does not look ids up.
                        json.extend_from_slice(b"{\"id\":\"(looked up at run time)\"}");
                    }
                }
                out.records.push(Record {
                    key,
                    json: Bytes::from(json),
                    op,
                    change,
                });
                continue;
            }
            let mut invalid = None;
            json.push(b'{');
            let mut first = true;
            for (i, name) in self.fields.iter().enumerate() {
                let is_key = Some(i) == self.key;
                if (is_key && !self.send_key) || (!is_key && mask & (1 << i) == 0) {
                    continue;
                }
                let column = &values[i];
                let value = column.is_valid(row).then(|| column.value(row));
                if value.is_none() && self.skip_nulls {
                    continue;
                }
                let value = value.unwrap_or("");
                if let Some(options) = &self.options[i]
                    && !value.is_empty()
                    && !options.contains(value)
                {
                    invalid = Some((name, value));
                    break;
                }
                if !first {
                    json.push(b',');
                }
                first = false;
                json_str(&mut json, name);
                json.push(b':');
                json_str(&mut json, value);
            }
            json.push(b'}');
            if let Some((name, value)) = invalid {
                let mut choices: Vec<&str> = self.options
                    [self.fields.iter().position(|f| f == name).unwrap_or(0)]
                .iter()
                .flat_map(|o| o.iter().map(String::as_str))
                .collect();
                choices.sort_unstable();
                let shown = choices
                    .iter()
                    .take(20)
                    .copied()
                    .collect::<Vec<_>>()
                    .join(", ");
                out.rejects.push(Rejected {
                    key,
                    code: "INVALID_OPTION".into(),
                    message: format!(
                        "'{value}' is not an option of the enumeration property '{name}' (its options: {shown}{}); not sent",
                        if choices.len() > 20 { ", …" } else { "" }
                    ),
                    payload: Bytes::from(json),
                    attempts: 0,
                    change,
                });
                continue;
            }
            out.records.push(Record {
                key,
                json: Bytes::from(json),
                op,
                change,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{
        ArrayRef, BooleanArray, Date32Array, Float64Array, TimestampMillisecondArray,
    };
    use datafusion::arrow::datatypes::DataType;

    use super::*;

    #[test]
    fn values_as_hubspot_expects() {
        let col = |a: ArrayRef| {
            text_values(&a, DateStyle::EpochMillis)
                .unwrap()
                .iter()
                .map(|v| v.map(str::to_string))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            col(Arc::new(Float64Array::from(vec![
                Some(42.0),
                Some(0.5),
                None
            ]))),
            [Some("42".into()), Some("0.5".into()), None]
        );
        assert_eq!(
            col(Arc::new(Date32Array::from(vec![19737]))),
            [Some("1705276800000".into())]
        );
        assert_eq!(
            col(Arc::new(
                TimestampMillisecondArray::from(vec![1_705_312_800_123]).with_timezone("UTC")
            )),
            [Some("2024-01-15T10:00:00.123Z".into())]
        );
        assert_eq!(
            col(Arc::new(BooleanArray::from(vec![true, false]))),
            [Some("true".into()), Some("false".into())]
        );
    }

    #[test]
    fn enumeration_values_are_checked_before_sending() {
        let schema = Arc::new(datafusion::arrow::datatypes::Schema::new(vec![
            datafusion::arrow::datatypes::Field::new("email", DataType::Utf8, true),
            datafusion::arrow::datatypes::Field::new("tier", DataType::Utf8, true),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(vec!["a@x.com", "b@x.com", "c@x.com"])),
                Arc::new(StringArray::from(vec![
                    Some("gold"),
                    Some("platinum"),
                    None,
                ])),
            ],
        )
        .unwrap();
        let encoder = Encoder {
            fields: vec!["email".into(), "tier".into()],
            key: Some(0),
            send_key: true,
            skip_nulls: false,
            options: vec![None, Some(Arc::new(HashSet::from(["gold".to_string()])))],
            changes: false,
        };
        let out = encoder.encode(&batch, &|_| None).unwrap();
        assert_eq!(out.records.len(), 2);
        assert_eq!(
            &out.records[0].json[..],
            br#"{"email":"a@x.com","tier":"gold"}"#
        );
        assert_eq!(
            &out.records[1].json[..],
            br#"{"email":"c@x.com","tier":""}"#,
            "a null clears"
        );
        assert_eq!(out.rejects.len(), 1);
        assert_eq!(out.rejects[0].key.as_deref(), Some("b@x.com"));
        assert_eq!(out.rejects[0].code, "INVALID_OPTION");
        assert!(
            out.rejects[0].message.contains("'platinum'"),
            "{}",
            out.rejects[0].message
        );
    }
}
