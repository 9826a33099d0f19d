//! What sluice can connect to and what a connection holds, asked from SQL:
//! `SHOW CONNECTION TYPES`, `DESCRIBE CONNECTION TYPE kind`, `SHOW OBJECTS IN conn`.

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::arrow::record_batch::RecordBatch;

use super::{Engine, Outcome};
use crate::connectors::DestinationTable;
use crate::contract::SyncMode;
use crate::error::{Error, Result};
use crate::options::OptionSpec;

/// Rows of text columns (`None` shows as NULL) as an outcome.
pub(super) fn text_rows(columns: &[&str], rows: Vec<Vec<Option<String>>>) -> Result<Outcome> {
    let schema = Arc::new(Schema::new(
        columns
            .iter()
            .map(|c| Field::new(*c, DataType::Utf8, true))
            .collect::<Vec<_>>(),
    ));
    let arrays: Vec<ArrayRef> = (0..columns.len())
        .map(|i| Arc::new(StringArray::from_iter(rows.iter().map(|r| r[i].as_deref()))) as ArrayRef)
        .collect();
    let batch = RecordBatch::try_new(Arc::clone(&schema), arrays)?;
    Ok(Outcome::Rows {
        schema,
        batches: vec![batch],
    })
}

/// One option as `DESCRIBE CONNECTION TYPE` and the book show it: key, values, default,
/// secret, doc.
pub fn option_row(spec: &OptionSpec) -> Vec<Option<String>> {
    vec![
        Some(spec.key.to_string()),
        Some(spec.value.to_string()),
        (!spec.default.is_empty()).then(|| spec.default.to_string()),
        Some(if spec.secret { "yes" } else { "no" }.to_string()),
        Some(spec.doc.to_string()),
    ]
}

/// The columns of [`option_row`].
pub const OPTION_COLUMNS: [&str; 5] = ["option", "values", "default", "secret", "description"];

/// The modes a statement may sync an object in: every mode when it has a key to match records
/// by, else append.
pub fn modes(keyed: bool) -> String {
    if !keyed {
        return SyncMode::Append.to_string();
    }
    SyncMode::ALL[1..]
        .iter()
        .map(|m| m.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

impl Engine {
    /// The option keys of every connection type, and of `CREATE SYNC` under `sync` (for the
    /// REPL's completion).
    pub fn option_keys(&self) -> Vec<(String, Vec<String>)> {
        let keys = |specs: &[OptionSpec]| {
            specs
                .iter()
                .map(|s| s.key.trim_end_matches('*').to_string())
                .collect()
        };
        let mut out: Vec<(String, Vec<String>)> = self
            .connections
            .kinds()
            .iter()
            .map(|k| (k.kind().to_string(), keys(k.options())))
            .collect();
        out.push(("sync".into(), keys(crate::sync::OPTIONS)));
        out
    }

    /// `SHOW CONNECTION TYPES`.
    pub(super) fn show_connection_types(&self) -> Result<Outcome> {
        let rows = self
            .connections
            .kinds()
            .iter()
            .map(|k| {
                vec![
                    Some(k.kind().to_string()),
                    Some(k.role().to_string()),
                    Some(k.summary().to_string()),
                ]
            })
            .collect();
        text_rows(&["type", "role", "description"], rows)
    }

    /// `DESCRIBE CONNECTION TYPE kind`.
    pub(super) fn describe_connection_type(&self, kind: &str) -> Result<Outcome> {
        let kind = self.connections.kind(kind)?;
        text_rows(
            &OPTION_COLUMNS,
            kind.options().iter().map(option_row).collect(),
        )
    }

    /// `SHOW OBJECTS IN conn`: each object the connection knows, its key, the other fields
    /// records can be matched by, the modes a sync may use, whether it can be read, and how
    /// many fields it declares. Looks each object up (a CRM describes it once per session).
    pub(super) async fn show_objects(&self, connection: &str) -> Result<Outcome> {
        let Some(info) = self.connections.get(connection) else {
            return Err(self.unknown_connection(connection));
        };
        let Some(schema) = self.catalog.schema(connection) else {
            return Err(self.unknown_connection(connection));
        };
        let mut names = schema.table_names();
        names.sort();
        if names.is_empty() {
            return Ok(Outcome::Done(format!(
                "connection {connection} (type {}) has no objects yet; its objects are named by the statements that write them: INSERT INTO {connection}.<any name> …",
                info.kind
            )));
        }
        let mut rows = vec![];
        for name in names {
            let table = schema.table(&name).await.map_err(Error::from)?;
            let Some(table) = table else { continue };
            let row = match table.downcast_ref::<DestinationTable>() {
                Some(object) => {
                    let spec = object.object();
                    let key = match (&spec.key, spec.composite_key.is_empty()) {
                        (Some(key), _) => Some(key.clone()),
                        (None, false) => Some(spec.composite_key.join(", ")),
                        (None, true) => None,
                    };
                    let keyed = key.is_some() || !spec.match_keys.is_empty();
                    vec![
                        Some(name),
                        key,
                        (!spec.match_keys.is_empty()).then(|| spec.match_keys.join(", ")),
                        Some(modes(keyed)),
                        Some(
                            if object.reader().is_some() {
                                "yes"
                            } else {
                                "no"
                            }
                            .into(),
                        ),
                        Some(match &spec.fields {
                            Some(fields) => fields.fields().len().to_string(),
                            None => "any".to_string(),
                        }),
                    ]
                }
                None => vec![
                    Some(name),
                    None,
                    None,
                    None,
                    Some("yes".into()),
                    Some(table.schema().fields().len().to_string()),
                ],
            };
            rows.push(row);
        }
        text_rows(
            &["object", "key", "match_keys", "modes", "readable", "fields"],
            rows,
        )
    }
}
