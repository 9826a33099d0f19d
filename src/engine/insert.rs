//! Plans `INSERT INTO <destination object> ...` by column **name**.
//!
//! DataFusion's own INSERT maps the query's columns to the table's by position and fills every
//! unlisted column with NULL. For a destination that would blank fields the user never mapped, so
//! we plan it ourselves: the query's output names (or the explicit column list) are the
//! destination fields, checked against the object's declared fields and cast to their types, and
//! the sink is handed a table whose schema is exactly those fields.

use std::collections::HashSet;
use std::sync::Arc;

use datafusion::arrow::compute::can_cast_types;
use datafusion::common::Column;
use datafusion::common::TableReference;
use datafusion::datasource::provider_as_source;
use datafusion::logical_expr::dml::InsertOp;
use datafusion::logical_expr::{Expr, LogicalPlan, LogicalPlanBuilder, cast};
use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::planner::object_name_to_table_reference;
use datafusion::sql::sqlparser::ast::{
    Expr as SqlExpr, Insert, ObjectName, Query, SelectItem, SetExpr, Statement as SqlStatement,
    TableObject,
};

use super::{Engine, Planned, SyncContext};
use crate::connectors::{DestinationTable, WriteReport, key_index};
use crate::contract::{
    Clause, Clauses, SyncMode, WHEN_MATCHED_COLUMN, WHEN_NOT_MATCHED_COLUMN, is_clause_column,
};
use crate::error::{Error, Result, did_you_mean};
use crate::sync::SyncRun;
use crate::sync::diff::DiffSpec;
use crate::sync::hash::{COMPOSITE_KEY, composite_key_expr};
use crate::sync::run::SyncSpec;

impl Engine {
    /// The destination object `name` refers to; `None` if it is an ordinary table.
    pub(super) async fn destination(
        &self,
        name: &ObjectName,
    ) -> Result<Option<(TableReference, DestinationTable)>> {
        let table_ref = object_name_to_table_reference(name.clone(), true)?;
        // `conn.object`, or `conn.schema.object` for connections with schemas (databases).
        let in_database = table_ref
            .catalog()
            .is_some_and(|c| self.connections.get(c).is_some());
        let Some(schema_name) = table_ref.schema() else {
            return Ok(None);
        };
        if !in_database && self.connections.get(schema_name).is_none() {
            if table_ref.catalog().is_none() && self.catalog.schema(schema_name).is_none() {
                return Err(self.unknown_connection(schema_name));
            }
            return Ok(None);
        }
        let provider = self.ctx.table_provider(table_ref.clone()).await?;
        Ok(provider
            .downcast_ref::<DestinationTable>()
            .map(|t| (table_ref, t.clone())))
    }

    /// Plans `insert` if its target is a destination object; `None` if it is an ordinary table.
    pub(super) async fn plan_destination_insert(
        &self,
        insert: &Insert,
        sync: &SyncContext,
    ) -> Result<Option<Planned>> {
        let TableObject::TableName(name) = &insert.table else {
            return Ok(None);
        };
        let Some((table_ref, table)) = self.destination(name).await? else {
            return Ok(None);
        };
        let table = &table;
        let target = table_ref.to_string();

        if insert.overwrite || insert.or.is_some() || insert.replace_into {
            return Err(Error::plan(
                format!(
                    "{target} accepts INSERT INTO only; OVERWRITE and REPLACE are not supported"
                ),
                table.object().name.clone(),
            ));
        }
        if insert.on.is_some() || insert.returning.is_some() {
            return Err(Error::plan(
                format!(
                    "{target}: ON CONFLICT and RETURNING are not supported on destinations; sluice decides how records are matched"
                ),
                table.object().name.clone(),
            ));
        }
        let Some(source) = &insert.source else {
            return Err(Error::plan(
                format!("INSERT INTO {target} needs a query: INSERT INTO {target} SELECT ..."),
                table.object().name.clone(),
            ));
        };

        if insert.columns.is_empty() {
            check_unique_output_names(source, &target)?;
        }
        let query = self.plan_query(source).await?;
        let query_schema = Arc::clone(query.schema());

        // The destination field each query column goes to.
        let names: Vec<String> = if insert.columns.is_empty() {
            let mut names = vec![];
            for (i, field) in query_schema.fields().iter().enumerate() {
                let name = field.name();
                if name.contains('(') {
                    return Err(Error::plan(
                        format!(
                            "INSERT INTO {target}: query column {} is the expression `{name}` and has no field name; name it with AS, e.g. `{name} AS my_field`",
                            i + 1
                        ),
                        table.object().name.clone(),
                    ));
                }
                names.push(name.clone());
            }
            names
        } else {
            let listed: Vec<String> = insert
                .columns
                .iter()
                .map(|c| {
                    c.0.last()
                        .and_then(|p| p.as_ident().cloned())
                        .map(crate::parser::normalize)
                        .unwrap_or_else(|| c.to_string())
                })
                .collect();
            if listed.len() != query_schema.fields().len() {
                return Err(Error::plan(
                    format!(
                        "INSERT INTO {target} lists {} field(s) but the query returns {} column(s); list one field per query column, or drop the list and name the query's columns with AS",
                        listed.len(),
                        query_schema.fields().len()
                    ),
                    table.object().name.clone(),
                ));
            }
            listed
        };

        let mapped = map_fields(table, &target, query, &names)?;
        self.plan_write(table, table_ref, mapped, Write::insert(), sync)
            .map(Some)
    }

    /// Plans a query given as SQL AST.
    pub(super) async fn plan_query(&self, query: &Query) -> Result<LogicalPlan> {
        Ok(self
            .ctx
            .state()
            .statement_to_plan(DFStatement::Statement(Box::new(SqlStatement::Query(
                Box::new(query.clone()),
            ))))
            .await?)
    }

    /// The write of `mapped` (the query projected to destination fields) into `table`: an
    /// incremental sync through `DiffExec` for stateful destinations, a plain write otherwise.
    pub(super) fn plan_write(
        &self,
        table: &DestinationTable,
        table_ref: TableReference,
        mapped: LogicalPlan,
        write: Write,
        sync: &SyncContext,
    ) -> Result<Planned> {
        let target = table_ref.to_string();
        let (mapped, key_parts) = with_composite_key(table, &target, mapped, &write)?;
        // The model's schema: the mapped fields, then a conditional MERGE's clause columns,
        // which the diff reads and the sink never sees.
        let model = Arc::new(mapped.schema().as_arrow().clone());
        let names: Vec<String> = model
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .filter(|n| !is_clause_column(n))
            .collect();
        let fields = Arc::new(model.project(&(0..names.len()).collect::<Vec<_>>())?);
        let report = Arc::new(WriteReport::for_object(
            table.connection(),
            &table.object().name,
        ));
        let run = if table.stateful() {
            let key = if key_parts.is_empty() {
                write
                    .key
                    .clone()
                    .or_else(|| table.object().default_key(&names))
            } else {
                Some(COMPOSITE_KEY.to_string())
            };
            let key_index = key
                .as_deref()
                .map(|k| key_index(&fields, k, table.connection(), &table.object().name))
                .transpose()?;
            if key_index.is_none() && write.statement != "insert" {
                return Err(Error::plan(
                    format!(
                        "{target} has no key to match records by, so it can only be appended to with INSERT INTO; MERGE and DELETE need one (set the connection's key option)"
                    ),
                    table.object().name.clone(),
                ));
            }
            let clauses = match &write.clauses {
                Some(merge) => merge.masks(&names, key_index, &key_parts),
                None => Clauses::every_field(),
            };
            let diff = DiffSpec {
                key: key_index,
                fields: names.clone(),
                mode: write.mode.keyed(key_index.is_some()),
                keep_last: sync.options.keep_last,
                key_parts,
                clauses,
            };
            let id = sync.name.clone().unwrap_or_else(|| {
                SyncSpec::unnamed_id(&target, key.as_deref(), &names, &write.signature())
            });
            let remote = if sync.options.warehouse_diff {
                // Optimized first: the unparser writes simpler (and correct) SQL for it.
                let optimized = self.ctx.state().optimize(&mapped)?;
                let warehouse = crate::connectors::warehouse_diff(&optimized)?;
                Some(warehouse.plan(&optimized, &diff, &id, &target)?)
            } else {
                None
            };
            if let Some(crate::contract::Sample::Keys { field, .. }) = &sync.sample {
                let field = table.object().canonical_field(field);
                match diff.key.map(|k| &diff.fields[k]) {
                    Some(k) if *k == field && diff.key_parts.is_empty() => {}
                    _ => {
                        return Err(Error::plan(
                            format!(
                                "SAMPLE WHERE {field} IN (…): records of {target} are matched by {}; write SAMPLE WHERE <that key> IN (…), or SAMPLE <number of records>",
                                match (&diff.key, diff.key_parts.is_empty()) {
                                    (Some(k), true) => format!("'{}'", diff.fields[*k]),
                                    (Some(_), false) => format!(
                                        "({}), which SAMPLE WHERE cannot list",
                                        diff.key_parts.join(", ")
                                    ),
                                    (None, _) =>
                                        "their content (no key), which SAMPLE WHERE cannot list"
                                            .into(),
                                }
                            ),
                            field,
                        ));
                    }
                }
            }
            Some(Arc::new(
                SyncRun::new(
                    SyncSpec {
                        id,
                        name: sync.name.clone(),
                        target: target.clone(),
                        diff,
                        options: sync.options.clone(),
                        pacing: table.pacing(),
                        remote,
                    },
                    self.state.clone(),
                    sync.dry_run,
                )
                .with_sample(sync.sample.clone())
                .with_run_id(sync.run_id.clone()),
            ))
        } else {
            if write.statement != "insert" {
                return Err(Error::plan(
                    format!(
                        "{target}: {} is not supported here; this destination writes a complete new file per INSERT INTO",
                        write.statement.to_uppercase()
                    ),
                    table.object().name.clone(),
                ));
            }
            None
        };
        // A sample of a write that keeps no state: its first rows.
        let mapped = match (&sync.sample, &run) {
            (Some(crate::contract::Sample::First(n)), None) => LogicalPlanBuilder::from(mapped)
                .limit(0, Some(*n))?
                .build()?,
            (Some(sample @ crate::contract::Sample::Keys { .. }), None) => {
                return Err(Error::plan(
                    format!(
                        "{sample}: {target} keeps no sync state and has no key to pick records by; write SAMPLE <number of rows>"
                    ),
                    table.object().name.clone(),
                ));
            }
            _ => mapped,
        };
        let write_table = table.mapped(Arc::clone(&model), Arc::clone(&report), run.clone());
        let writes = (
            table.connection().to_string(),
            table.object().name.clone(),
            fields,
        );
        let plan: LogicalPlan = LogicalPlanBuilder::insert_into(
            mapped,
            table_ref,
            provider_as_source(Arc::new(write_table)),
            InsertOp::Append,
        )?
        .build()?;
        Ok(Planned {
            plan,
            report: Some(report),
            writes: Some(writes),
            sync: run,
        })
    }
}

/// A sync matched by a key of several fields gets one more field, [`COMPOSITE_KEY`], that joins
/// them: the diff, the state and rejects know records by it; the sink matches by the parts.
fn with_composite_key(
    table: &DestinationTable,
    target: &str,
    mapped: LogicalPlan,
    write: &Write,
) -> Result<(LogicalPlan, Vec<String>)> {
    let object = table.object();
    let parts = if !write.key_parts.is_empty() {
        write.key_parts.clone()
    } else if table.stateful() && write.key.is_none() && object.key.is_none() {
        object.composite_key.clone()
    } else {
        vec![]
    };
    if parts.is_empty() {
        return Ok((mapped, parts));
    }
    if !table.composite_keys() {
        return Err(Error::plan(
            format!(
                "{target} matches records by one field; MERGE … ON one column (t.<key> = s.<expression>)"
            ),
            object.name.clone(),
        ));
    }
    let names: Vec<&String> = mapped.schema().fields().iter().map(|f| f.name()).collect();
    if let Some(missing) = parts.iter().find(|p| !names.contains(p)) {
        return Err(Error::plan(
            format!(
                "records of {target} are matched by ({}); map every one of those columns ('{missing}' is not mapped)",
                parts.join(", ")
            ),
            missing.clone(),
        ));
    }
    let mut exprs: Vec<Expr> = mapped
        .schema()
        .columns()
        .into_iter()
        .map(Expr::Column)
        .collect();
    // After the fields, before a conditional MERGE's clause columns.
    let at = names.iter().filter(|n| !is_clause_column(n)).count();
    exprs.insert(
        at,
        composite_key_expr(
            parts
                .iter()
                .map(|p| Expr::Column(Column::new_unqualified(p)))
                .collect(),
        )
        .alias(COMPOSITE_KEY),
    );
    let mapped = LogicalPlanBuilder::from(mapped).project(exprs)?.build()?;
    Ok((mapped, parts))
}

/// What a write statement may do.
#[derive(Debug, Clone)]
pub(super) struct Write {
    /// `insert`, `merge` or `delete`.
    pub statement: &'static str,
    /// What the statement may do once its key is known (an INSERT INTO is `Upsert` until the
    /// planner finds the object has no key: then it appends).
    pub mode: SyncMode,
    /// The match key, when the statement names it (`MERGE … ON`, `DELETE … WHERE key …`).
    pub key: Option<String>,
    /// The columns of a key made of several (`MERGE … ON t.a = … AND t.b = …`).
    pub key_parts: Vec<String>,
    /// A MERGE's clauses (`None`: every clause writes every field).
    pub clauses: Option<MergeClauses>,
}

impl Write {
    pub fn insert() -> Self {
        Self {
            statement: "insert",
            mode: SyncMode::Upsert,
            key: None,
            key_parts: vec![],
            clauses: None,
        }
    }

    /// Distinguishes the state of unnamed statements that differ in what they may do.
    fn signature(&self) -> String {
        format!("{}:{}", self.statement, self.mode.signature_bits())
    }
}

/// A MERGE's `WHEN MATCHED … UPDATE` and `WHEN NOT MATCHED … INSERT` clauses: the fields each
/// writes, by name (the match key's among them), and its condition as written.
#[derive(Debug, Clone, Default)]
pub(super) struct MergeClauses {
    pub inserts: Vec<(Vec<String>, Option<String>)>,
    pub updates: Vec<(Vec<String>, Option<String>)>,
}

impl MergeClauses {
    /// Adds a clause; an error if one of its kind without a condition came before (this one
    /// would never apply).
    pub fn add(
        &mut self,
        update: bool,
        fields: Vec<String>,
        condition: Option<String>,
        target: &str,
    ) -> Result<()> {
        let (list, kind) = match update {
            true => (&mut self.updates, "MATCHED"),
            false => (&mut self.inserts, "NOT MATCHED"),
        };
        if list.last().is_some_and(|(_, c)| c.is_none()) {
            return Err(Error::plan(
                format!(
                    "MERGE INTO {target}: a WHEN {kind} clause follows a WHEN {kind} clause without a condition, so it never applies; give the earlier one a condition (WHEN {kind} AND <condition> THEN …) or remove this one"
                ),
                target.to_string(),
            ));
        }
        list.push((fields, condition));
        Ok(())
    }

    pub fn conditional(&self) -> bool {
        self.inserts
            .iter()
            .chain(&self.updates)
            .any(|(_, c)| c.is_some())
    }

    /// The model's clause columns (see [`Clauses`]), as SQL select items: for each kind, the
    /// index of the first clause whose condition holds, or null. None without conditions.
    pub fn choice_columns(&self) -> Vec<String> {
        if !self.conditional() {
            return vec![];
        }
        [
            (&self.updates, WHEN_MATCHED_COLUMN),
            (&self.inserts, WHEN_NOT_MATCHED_COLUMN),
        ]
        .iter()
        .map(|(list, column)| {
            let choice = if list.is_empty() {
                "CAST(NULL AS SMALLINT)".to_string()
            } else {
                let whens: Vec<String> = list
                    .iter()
                    .enumerate()
                    .map(|(i, (_, c))| format!("WHEN {} THEN {i}", c.as_deref().unwrap_or("TRUE")))
                    .collect();
                format!("CASE {} END", whens.join(" "))
            };
            format!("{choice} AS \"{column}\"")
        })
        .collect()
    }

    /// The clauses as masks over the model's fields `names`; the key (and a composite key's
    /// parts) are written by every clause.
    pub fn masks(&self, names: &[String], key: Option<usize>, key_parts: &[String]) -> Clauses {
        let bit = |name: &str| {
            names
                .iter()
                .position(|n| n == name)
                .filter(|i| *i < 64)
                .map_or(0, |i| 1u64 << i)
        };
        let mut always = key.filter(|k| *k < 64).map_or(0, |k| 1u64 << k);
        for part in key_parts {
            always |= bit(part);
        }
        let clause = |(fields, condition): &(Vec<String>, Option<String>)| Clause {
            fields: fields.iter().fold(always, |mask, f| mask | bit(f)),
            condition: condition.clone(),
        };
        Clauses {
            inserts: self.inserts.iter().map(clause).collect(),
            updates: self.updates.iter().map(clause).collect(),
        }
    }
}

/// The query's columns as the destination fields `names` (checked against the object's declared
/// fields, cast to their types).
pub(super) fn map_fields(
    table: &DestinationTable,
    target: &str,
    query: LogicalPlan,
    names: &[String],
) -> Result<LogicalPlan> {
    let query_schema = Arc::clone(query.schema());
    let names: Vec<String> = names
        .iter()
        .map(|n| table.object().canonical_field(n))
        .collect();
    let mut seen = HashSet::new();
    for name in &names {
        if !seen.insert(name.as_str()) {
            return Err(Error::plan(
                format!(
                    "INSERT INTO {target} maps field '{name}' more than once; map each field once"
                ),
                name.clone(),
            ));
        }
    }

    // Check against the object's declared fields and cast to their types.
    let declared = table.object().fields.clone();
    let mut exprs: Vec<Expr> = Vec::with_capacity(names.len());
    for ((qualifier, field), name) in query_schema.iter().zip(&names) {
        let mut expr = Expr::Column(Column::new(qualifier.cloned(), field.name()));
        if let Some(declared) = &declared {
            let Ok(target_field) = declared.field_with_name(name) else {
                let candidates: Vec<&str> = declared
                    .fields()
                    .iter()
                    .map(|f| f.name().as_str())
                    .collect();
                // `Account.Name`: a relationship column names one of the parent's External IDs.
                if let Some((relationship, _)) = name.split_once('.') {
                    let same: Vec<&str> = candidates
                        .iter()
                        .copied()
                        .filter(|c| c.split_once('.').is_some_and(|(r, _)| r == relationship))
                        .collect();
                    if !same.is_empty() {
                        return Err(Error::plan(
                            format!(
                                "{target} has no field '{name}': the relationship {relationship} is set by an External ID field of its parent, as {}; DESCRIBE {target} lists them",
                                same.join(" or ")
                            ),
                            name.clone(),
                        ));
                    }
                }
                return Err(Error::plan(
                    format!(
                        "{target} has no field '{name}'{}; DESCRIBE {target} lists its fields",
                        did_you_mean(name, candidates.iter().copied())
                    ),
                    name.clone(),
                ));
            };
            if target_field
                .metadata()
                .contains_key(crate::connectors::field_meta::READ_ONLY)
            {
                let writable = declared.fields().iter().filter(|f| {
                    !f.metadata()
                        .contains_key(crate::connectors::field_meta::READ_ONLY)
                });
                return Err(Error::plan(
                    format!(
                        "{target}.{name} is read-only in the destination and cannot be written{}; remove it from the SELECT",
                        did_you_mean(name, writable.map(|f| f.name().as_str()))
                    ),
                    name.clone(),
                ));
            }
            if target_field.data_type() != field.data_type() {
                if !can_cast_types(field.data_type(), target_field.data_type()) {
                    return Err(Error::plan(
                        format!(
                            "{target}.{name} is {} but the query gives {}, which cannot be converted; CAST it in the query",
                            target_field.data_type(),
                            field.data_type()
                        ),
                        name.clone(),
                    ));
                }
                expr = cast(expr, target_field.data_type().clone());
            }
        }
        exprs.push(expr.alias(name));
    }
    // A conditional MERGE's clause columns follow the fields, as they are.
    for (qualifier, field) in query_schema.iter().skip(names.len()) {
        if is_clause_column(field.name()) {
            exprs.push(Expr::Column(Column::new(qualifier.cloned(), field.name())));
        }
    }
    Ok(LogicalPlanBuilder::from(query).project(exprs)?.build()?)
}

/// `SELECT email, name AS email` maps one field twice. DataFusion rejects such a query with a
/// message about ambiguous names; say what it means for a sync instead.
fn check_unique_output_names(query: &Query, target: &str) -> Result<()> {
    let SetExpr::Select(select) = query.body.as_ref() else {
        return Ok(());
    };
    let mut seen = HashSet::new();
    for item in &select.projection {
        let name = match item {
            SelectItem::ExprWithAlias { alias, .. } => crate::parser::normalize(alias.clone()),
            SelectItem::UnnamedExpr(SqlExpr::Identifier(ident)) => {
                crate::parser::normalize(ident.clone())
            }
            SelectItem::UnnamedExpr(SqlExpr::CompoundIdentifier(parts)) => match parts.last() {
                Some(ident) => crate::parser::normalize(ident.clone()),
                None => continue,
            },
            _ => continue,
        };
        if !seen.insert(name.clone()) {
            return Err(Error::plan(
                format!(
                    "INSERT INTO {target} maps field '{name}' more than once; map each field once"
                ),
                name,
            ));
        }
    }
    Ok(())
}
