//! Rows to Salesforce records. A row becomes a [`Row`] (what it sends, field by field), which
//! becomes a JSON record for sObject Collections or a CSV line for Bulk API 2.0.
//!
//! Values: numbers and booleans as JSON literals (CSV text), dates as `2024-01-15`, datetimes
//! as ISO 8601 UTC. A null (or an empty string, which Salesforce stores as null) clears the
//! field: JSON `null`, CSV `#N/A`; under `null_policy 'skip'` it is left out. An update sends
//! only the fields that changed; in CSV an unchanged field is an empty cell, which Salesforce
//! leaves alone. Values a restricted picklist does not allow and strings longer than the field
//! are refused before sending, with Salesforce's own codes.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use datafusion::arrow::array::{Array, StringArray};
use datafusion::arrow::datatypes::DataType;
use datafusion::arrow::record_batch::RecordBatch;

use super::api::{Relationship, SObject};
use crate::contract::{ChangeBatch, Op, Rejected};
use crate::delivery::Record;
use crate::delivery::encode::{DateStyle, json_str, text_values};
use crate::error::Result;
use crate::sync::{NullPolicy, SyncRun};

/// CSV's null: sets the field to null in Bulk API 2.0.
pub const CSV_NULL: &str = "#N/A";

/// How records are matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Matching {
    /// By an External ID field (its API name).
    External(String),
    /// By the record Id.
    Id,
}

impl Matching {
    pub fn new(key: &str) -> Self {
        if key.eq_ignore_ascii_case("Id") {
            Matching::Id
        } else {
            Matching::External(key.to_string())
        }
    }

    pub fn field(&self) -> &str {
        match self {
            Matching::External(f) => f,
            Matching::Id => "Id",
        }
    }
}

/// What one record sends.
#[derive(Debug, Clone)]
pub struct Row {
    pub op: Op,
    pub change: Option<u32>,
    /// The key's value (an external id or a record Id).
    pub key: Option<String>,
    /// The record Id an update or delete addresses (`None` until resolved).
    pub id: Option<String>,
    /// Per mapped field: `None` not sent, `Some(None)` null, `Some(Some(v))` a value.
    pub cells: Vec<Option<Option<String>>>,
}

/// The wire operation a row takes: upserts of records matched by Id are updates.
pub fn wire_op(op: Op, matching: &Matching) -> Op {
    match (op, matching) {
        (Op::Upsert, Matching::Id) => Op::Update,
        (op, _) => op,
    }
}

/// What one batch of rows became.
#[derive(Debug, Default)]
pub struct Encoded {
    pub rows: Vec<Row>,
    /// Rows refused before sending.
    pub rejects: Vec<Rejected>,
}

/// Encodes the changes of one Salesforce statement.
#[derive(Debug)]
pub struct Encoder {
    /// The object's API name.
    pub object: String,
    /// The mapped fields' API names, in order (a sync's change columns follow them).
    pub fields: Vec<String>,
    pub key: usize,
    pub matching: Matching,
    pub skip_nulls: bool,
    pub changes: bool,
    /// Per field: a JSON literal (number, boolean) rather than a string.
    literal: Vec<bool>,
    /// Per field: the allowed values of a restricted picklist.
    picklist: Vec<Option<Arc<HashSet<String>>>>,
    /// Per field: the longest string it holds.
    length: Vec<Option<usize>>,
    /// Per field: the lookup it sets by its parent's External ID (`Account.Account_Ref__c`).
    relationship: Vec<Option<Relationship>>,
}

impl Encoder {
    pub fn new(object: &SObject, fields: Vec<String>, key: usize, sync: Option<&SyncRun>) -> Self {
        let info = |f: &String| object.info.get(f);
        Self {
            object: object.name.clone(),
            literal: fields
                .iter()
                .map(|f| {
                    object.fields.field_with_name(f).is_ok_and(|f| {
                        matches!(
                            f.data_type(),
                            DataType::Boolean | DataType::Int64 | DataType::Float64
                        )
                    })
                })
                .collect(),
            picklist: fields
                .iter()
                .map(|f| info(f).and_then(|i| i.picklist.clone()))
                .collect(),
            length: fields
                .iter()
                .map(|f| info(f).and_then(|i| i.length))
                .collect(),
            relationship: fields
                .iter()
                .map(|f| object.relationships.get(f).cloned())
                .collect(),
            matching: Matching::new(&fields[key]),
            fields,
            key,
            skip_nulls: sync.is_some_and(|r| r.spec.options.null_policy == NullPolicy::Skip),
            changes: sync.is_some(),
        }
    }

    /// The rows of `batch`, with values checked.
    pub fn encode(&self, batch: &RecordBatch) -> Result<Encoded> {
        let n = self.fields.len();
        let changes = ChangeBatch::read(batch, self.changes)?;
        let values: Vec<StringArray> = (0..n)
            .map(|i| text_values(changes.field(i), DateStyle::Iso))
            .collect::<Result<_>>()?;
        let mut out = Encoded::default();
        for row in 0..batch.num_rows() {
            let op = wire_op(changes.op(row), &self.matching);
            let mask = changes.changed(row);
            let change = changes.change(row);
            let key_column = &values[self.key];
            let key = key_column
                .is_valid(row)
                .then(|| key_column.value(row).to_string());
            let id = (self.matching == Matching::Id)
                .then(|| key.clone())
                .flatten();
            let mut cells = vec![None; n];
            let mut refused = None;
            if op != Op::Delete {
                for (i, cell) in cells.iter_mut().enumerate() {
                    let is_key = i == self.key;
                    // The key travels as the record Id (matched by Id) or as the external id
                    // (upserts and creates; an update finds the record by its Id).
                    let send = if is_key {
                        self.matching != Matching::Id && op != Op::Update
                    } else {
                        mask & (1 << i) != 0
                    };
                    if !send {
                        continue;
                    }
                    let column = &values[i];
                    let value = (column.is_valid(row) && !column.value(row).is_empty())
                        .then(|| column.value(row));
                    match value {
                        None if self.skip_nulls => continue,
                        None => *cell = Some(None),
                        Some(v) => {
                            if refused.is_none() {
                                refused = self.check(i, v);
                            }
                            *cell = Some(Some(v.to_string()));
                        }
                    }
                }
            }
            let encoded = Row {
                op,
                change,
                key,
                id,
                cells,
            };
            match refused {
                Some((code, message)) => out.rejects.push(Rejected {
                    key: encoded.key.clone(),
                    code: code.into(),
                    message,
                    payload: self.json(&encoded),
                    attempts: 0,
                    change,
                }),
                None => out.rows.push(encoded),
            }
        }
        Ok(out)
    }

    /// Why Salesforce would refuse `value` for field `i`, checked before sending.
    fn check(&self, i: usize, value: &str) -> Option<(&'static str, String)> {
        let name = &self.fields[i];
        if let Some(allowed) = &self.picklist[i]
            && !allowed.contains(value)
        {
            let mut choices: Vec<&str> = allowed.iter().map(String::as_str).collect();
            choices.sort_unstable();
            return Some((
                "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
                format!(
                    "{name}: '{value}' is not a value of this restricted picklist (its values: {}); not sent",
                    choices.join(", ")
                ),
            ));
        }
        if let Some(max) = self.length[i]
            && value.chars().count() > max
        {
            return Some((
                "STRING_TOO_LONG",
                format!(
                    "{name}: data value too large: {} characters, the field holds {max}; not sent",
                    value.chars().count()
                ),
            ));
        }
        if self.literal[i]
            && !value.chars().any(|c| c.is_ascii_digit())
            && value != "true"
            && value != "false"
        {
            return Some((
                "INVALID_TYPE_ON_FIELD_IN_RECORD",
                format!("{name}: '{value}' is not a number Salesforce accepts; not sent"),
            ));
        }
        None
    }

    /// The row as an sObject Collections record.
    pub fn json(&self, row: &Row) -> Bytes {
        let mut json = Vec::with_capacity(48 + 24 * self.fields.len());
        if row.op == Op::Delete {
            json.extend_from_slice(b"{\"Id\":");
            json_str(
                &mut json,
                row.id.as_deref().unwrap_or("(looked up at run time)"),
            );
            json.push(b'}');
            return Bytes::from(json);
        }
        json.extend_from_slice(b"{\"attributes\":{\"type\":");
        json_str(&mut json, &self.object);
        json.push(b'}');
        if row.op == Op::Update {
            json.extend_from_slice(b",\"id\":");
            json_str(
                &mut json,
                row.id.as_deref().unwrap_or("(looked up at run time)"),
            );
        }
        for (i, cell) in row.cells.iter().enumerate() {
            let Some(cell) = cell else { continue };
            json.push(b',');
            // A lookup by the parent's External ID: `"Account":{"Account_Ref__c":"A-1"}`; a
            // null clears the lookup itself (`"AccountId":null`).
            if let Some(r) = &self.relationship[i] {
                match cell {
                    None => {
                        json_str(&mut json, &r.lookup);
                        json.extend_from_slice(b":null");
                    }
                    Some(v) => {
                        json_str(&mut json, &r.name);
                        json.extend_from_slice(b":{");
                        json_str(&mut json, &r.field);
                        json.push(b':');
                        json_str(&mut json, v);
                        json.push(b'}');
                    }
                }
                continue;
            }
            json_str(&mut json, &self.fields[i]);
            json.push(b':');
            match cell {
                None => json.extend_from_slice(b"null"),
                Some(v) if self.literal[i] => json.extend_from_slice(v.as_bytes()),
                Some(v) => json_str(&mut json, v),
            }
        }
        json.push(b'}');
        Bytes::from(json)
    }

    /// The row as a record for the delivery engine.
    pub fn record(&self, row: &Row) -> Record {
        Record {
            key: row.key.clone(),
            json: self.json(row),
            op: row.op,
            change: row.change,
        }
    }

    /// The CSV header of a Bulk job for `op`: `Id` alone for deletes; `Id` and the fields for
    /// updates; the fields (the external id among them) for inserts and upserts.
    pub fn csv_header(&self, op: Op) -> Vec<String> {
        match op {
            Op::Delete => vec!["Id".into()],
            Op::Update => std::iter::once("Id".to_string())
                .chain(
                    self.fields
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| *i != self.key)
                        .map(|(_, f)| f.clone()),
                )
                .collect(),
            _ => self.fields.clone(),
        }
    }

    /// The row's cells under [`Self::csv_header`]: unsent fields empty, nulls `#N/A`.
    pub fn csv_cells<'a>(&self, row: &'a Row) -> Vec<&'a str> {
        let cell = |c: &'a Option<Option<String>>| match c {
            None => "",
            Some(None) => CSV_NULL,
            Some(Some(v)) => v.as_str(),
        };
        match row.op {
            Op::Delete => vec![row.id.as_deref().unwrap_or("")],
            Op::Update => std::iter::once(row.id.as_deref().unwrap_or(""))
                .chain(
                    row.cells
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| *i != self.key)
                        .map(|(_, c)| cell(c)),
                )
                .collect(),
            _ => row.cells.iter().map(cell).collect(),
        }
    }

    /// The column Bulk results are matched back to records by: the record Id for updates and
    /// deletes, else the key field.
    pub fn correlation(&self, op: Op) -> &str {
        match op {
            Op::Update | Op::Delete => "Id",
            _ => &self.fields[self.key],
        }
    }

    /// A row's value in [`Self::correlation`].
    pub fn correlation_value<'a>(&self, row: &'a Row) -> Option<&'a str> {
        match row.op {
            Op::Update | Op::Delete => row.id.as_deref(),
            _ => row.key.as_deref(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use datafusion::arrow::array::{ArrayRef, BooleanArray, Date32Array, Float64Array};
    use datafusion::arrow::datatypes::{Field, Schema};

    use super::*;
    use crate::connectors::salesforce::api::FieldInfo;

    fn contact() -> SObject {
        let fields = vec![
            Field::new("External_Id__c", DataType::Utf8, true),
            Field::new("LastName", DataType::Utf8, true),
            Field::new("Score__c", DataType::Float64, true),
            Field::new("Active__c", DataType::Boolean, true),
            Field::new("Birthdate", DataType::Date32, true),
            Field::new("Tier__c", DataType::Utf8, true),
        ];
        let info = |name: &str, length: Option<usize>, picklist: Option<&[&str]>| FieldInfo {
            name: name.into(),
            kind: "string".into(),
            createable: true,
            updateable: true,
            external_id: name == "External_Id__c",
            length,
            picklist: picklist.map(|p| Arc::new(p.iter().map(|s| s.to_string()).collect())),
        };
        SObject {
            name: "Contact".into(),
            fields: Arc::new(Schema::new(fields)),
            info: HashMap::from([
                ("LastName".into(), info("LastName", Some(8), None)),
                (
                    "Tier__c".into(),
                    info("Tier__c", None, Some(&["Gold", "Silver"])),
                ),
            ]),
            key: "External_Id__c".into(),
            relationships: HashMap::new(),
        }
    }

    #[test]
    fn rows_become_json_and_csv() {
        let object = contact();
        let schema = Arc::clone(&object.fields);
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(vec!["C-1", "C-2", "C-3", "C,4"])),
            Arc::new(StringArray::from(vec![
                Some("Lovelace"),
                Some("Turing"),
                Some("Hopper-Grace"),
                None,
            ])),
            Arc::new(Float64Array::from(vec![
                Some(7.5),
                None,
                Some(1.0),
                Some(2.0),
            ])),
            Arc::new(BooleanArray::from(vec![true, false, true, true])),
            Arc::new(Date32Array::from(vec![Some(19737), None, None, None])),
            Arc::new(StringArray::from(vec![
                Some("Gold"),
                Some("Platinum"),
                Some("Gold"),
                Some("Silver"),
            ])),
        ];
        let batch = RecordBatch::try_new(schema, columns).unwrap();
        let names: Vec<String> = object
            .fields
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        let encoder = Encoder::new(&object, names, 0, None);
        let out = encoder.encode(&batch).unwrap();
        assert_eq!(out.rows.len(), 2, "{:?}", out.rejects);
        assert_eq!(
            &encoder.json(&out.rows[0])[..],
            br#"{"attributes":{"type":"Contact"},"External_Id__c":"C-1","LastName":"Lovelace","Score__c":7.5,"Active__c":true,"Birthdate":"2024-01-15","Tier__c":"Gold"}"#
        );
        let codes: Vec<&str> = out.rejects.iter().map(|r| r.code.as_str()).collect();
        assert_eq!(
            codes,
            ["INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST", "STRING_TOO_LONG"]
        );
        assert!(out.rejects[0].message.contains("'Platinum'"));
        assert_eq!(
            encoder.csv_cells(&out.rows[1]),
            ["C,4", "#N/A", "2", "true", "#N/A", "Silver"],
            "nulls clear"
        );
    }
}
