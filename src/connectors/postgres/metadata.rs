//! What sluice reads from `pg_catalog`: relations, their columns and types, primary keys.

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use super::types::{PgColumn, PgType};
use crate::connectors::ObjectSpec;
use crate::sql_text::Dialect;

/// A table, view or materialized view.
#[derive(Debug, Clone)]
pub struct Relation {
    pub schema: String,
    pub name: String,
    /// `pg_class.relkind`: r (table), p (partitioned table), v, m, f.
    pub kind: char,
    pub columns: Vec<PgColumn>,
    /// The primary key's columns, in key order.
    pub primary_key: Vec<String>,
}

/// Metadata key of a field whose Postgres type sluice cannot read.
pub const UNSUPPORTED: &str = "sluice.postgres.unsupported";

impl Relation {
    /// `"schema"."name"`, quoted for SQL.
    pub fn qualified(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }

    /// Whether rows can be written to it.
    pub fn writable(&self) -> bool {
        matches!(self.kind, 'r' | 'p' | 'f')
    }

    /// The relation's columns as Arrow fields. A column of a type sluice cannot read is typed
    /// Utf8 and marked, so that selecting it is a clear error while other columns stay readable.
    pub fn arrow_schema(&self) -> SchemaRef {
        let fields: Vec<Field> = self
            .columns
            .iter()
            .map(|c| match &c.pg_type {
                Ok(t) => Field::new(&c.name, t.arrow(), !c.not_null),
                Err(type_name) => Field::new(&c.name, DataType::Utf8, true).with_metadata(
                    HashMap::from([(UNSUPPORTED.to_string(), type_name.clone())]),
                ),
            })
            .collect();
        Arc::new(Schema::new(fields))
    }

    pub fn object_spec(&self) -> ObjectSpec {
        ObjectSpec {
            name: self.name.clone(),
            fields: Some(self.arrow_schema()),
            key: match self.primary_key.as_slice() {
                [one] => Some(one.clone()),
                _ => None,
            },
            composite_key: if self.primary_key.len() > 1 {
                self.primary_key.clone()
            } else {
                vec![]
            },
            match_keys: vec![],
        }
    }

    pub fn column(&self, name: &str) -> Option<&PgColumn> {
        self.columns.iter().find(|c| c.name == name)
    }
}

/// Quotes an identifier for Postgres (`a"b` → `"a""b"`). A name with a NUL character (which
/// Postgres cannot hold) becomes the empty identifier, which Postgres refuses with an error.
pub fn quote_ident(name: &str) -> String {
    Dialect::Postgres
        .quote_ident(name)
        .unwrap_or_else(|| "\"\"".to_string())
}

const QUERY: &str = r#"
SELECT n.nspname::text, c.relname::text, c.relkind::text, a.attname::text,
       format_type(a.atttypid, a.atttypmod),
       COALESCE(bt.typname, t.typname)::text,
       CASE WHEN t.typtype = 'd' THEN t.typtypmod ELSE a.atttypmod END,
       et.typname::text,
       a.attnotnull,
       array_position(pk.conkey, a.attnum)
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_type bt ON t.typtype = 'd' AND bt.oid = t.typbasetype
LEFT JOIN pg_type et ON et.oid = COALESCE(bt.typelem, t.typelem)
     AND COALESCE(bt.typcategory, t.typcategory) = 'A'
LEFT JOIN pg_constraint pk ON pk.conrelid = c.oid AND pk.contype = 'p'
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f')
  AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\_%'
  AND ($1::text IS NULL OR n.nspname = $1)
  AND ($2::text IS NULL OR c.relname = $2)
ORDER BY 1, 2, a.attnum
"#;

/// Reads the relations of the database, or only `(schema, name)`.
pub async fn load(
    client: &tokio_postgres::Client,
    only: Option<(&str, &str)>,
) -> Result<Vec<Relation>, tokio_postgres::Error> {
    let (schema, name) = match only {
        Some((s, n)) => (Some(s), Some(n)),
        None => (None, None),
    };
    let rows = client.query(QUERY, &[&schema, &name]).await?;
    let mut relations: Vec<Relation> = vec![];
    let mut keys: Vec<Vec<(i32, String)>> = vec![];
    for row in rows {
        let schema: String = row.get(0);
        let name: String = row.get(1);
        let kind: String = row.get(2);
        let column: String = row.get(3);
        let type_name: String = row.get(4);
        let typname: String = row.get(5);
        let typmod: i32 = row.get(6);
        let element: Option<String> = row.get(7);
        let not_null: bool = row.get(8);
        let pk_position: Option<i32> = row.get(9);
        let same = relations
            .last()
            .is_some_and(|r| r.schema == schema && r.name == name);
        if !same {
            relations.push(Relation {
                schema,
                name,
                kind: kind.chars().next().unwrap_or('r'),
                columns: vec![],
                primary_key: vec![],
            });
            keys.push(vec![]);
        }
        let pg_type = PgType::from_catalog(&typname, typmod, element.as_deref())
            .ok_or_else(|| type_name.clone());
        if let Some(p) = pk_position {
            keys.last_mut().expect("pushed").push((p, column.clone()));
        }
        relations
            .last_mut()
            .expect("pushed")
            .columns
            .push(PgColumn {
                name: column,
                type_name,
                pg_type,
                not_null,
            });
    }
    for (relation, mut key) in relations.iter_mut().zip(keys) {
        key.sort();
        relation.primary_key = key.into_iter().map(|(_, c)| c).collect();
    }
    Ok(relations)
}
