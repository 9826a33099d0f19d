//! MERGE and DELETE on destinations, and named syncs (`CREATE SYNC`, `RUN SYNC`, …).
//!
//! MERGE is planned from the statement itself rather than DataFusion's `merge_into` hook: the
//! target of a sync is the destination as sluice last synced it (its state), not a table to
//! join against, and free-form objects (webhooks) have no columns to join on. The ON clause gives
//! the match key, the clauses give the mode, and the INSERT / UPDATE expressions give the mapping;
//! the USING relation becomes the model query.

use std::collections::BTreeMap;

use datafusion::sql::sqlparser::ast::{
    AssignmentTarget, BinaryOperator, Delete, Expr as SqlExpr, FromTable, Merge, MergeAction,
    MergeClauseKind, MergeInsertKind, ObjectName, TableFactor,
};

use super::insert::{MergeClauses, Write, map_fields};
use super::{Engine, Outcome, Planned};
use crate::contract::SyncMode;
use crate::error::{Error, Result};
use crate::options::Options;
use crate::parser::{CreateSync, Schedule, normalize};
use crate::sync::SyncOptions;

/// The sync a write statement belongs to, if any, and whether it is a dry run.
#[derive(Debug, Clone, Default)]
pub struct SyncContext {
    pub name: Option<String>,
    pub options: SyncOptions,
    pub dry_run: bool,
    /// A sample run: only these records are sent (`RUN SYNC … SAMPLE`).
    pub sample: Option<crate::contract::Sample>,
    /// The run's id, when its caller chose it (`sluice serve` answers it before the run ends).
    pub run_id: Option<String>,
}

/// A named sync, as defined in this session.
#[derive(Debug, Clone)]
pub(super) struct SyncDef {
    pub schedule: Option<Schedule>,
    pub options: SyncOptions,
    pub options_text: String,
    pub body: Box<datafusion::sql::parser::Statement>,
    pub body_text: String,
}

/// The session's named syncs.
pub(super) type SyncDefs = std::sync::Mutex<BTreeMap<String, SyncDef>>;

fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn last_ident(name: &ObjectName) -> String {
    name.0
        .last()
        .and_then(|p| p.as_ident().cloned())
        .map(normalize)
        .unwrap_or_else(|| name.to_string())
}

/// The column a side of `ON` names, if it refers to the target (by alias or table name).
fn target_column(expr: &SqlExpr, target_names: &[String]) -> Option<String> {
    match expr {
        SqlExpr::CompoundIdentifier(parts) if parts.len() >= 2 => {
            let qualifier = normalize(parts[parts.len() - 2].clone());
            target_names
                .contains(&qualifier)
                .then(|| normalize(parts[parts.len() - 1].clone()))
        }
        SqlExpr::Nested(e) => target_column(e, target_names),
        _ => None,
    }
}

/// The first reference to the target (`t.field`, by alias or table name) in `expr`, if any.
fn target_reference(expr: &SqlExpr, target_names: &[String]) -> Option<String> {
    use std::ops::ControlFlow;
    let mut found = None;
    let _ = datafusion::sql::sqlparser::ast::visit_expressions(expr, |e| {
        if let Some(column) = target_column(e, target_names) {
            found = Some(format!("{e} ('{column}')"));
            return ControlFlow::Break(());
        }
        ControlFlow::<()>::Continue(())
    });
    found
}

/// The `(target column, source expression)` pairs of `ON t.a = s.x [AND t.b = s.y …]`; on
/// anything else, the part that is not such a comparison.
fn on_pairs<'a>(
    expr: &'a SqlExpr,
    target_names: &[String],
    out: &mut Vec<(String, &'a SqlExpr)>,
) -> std::result::Result<(), String> {
    match expr {
        SqlExpr::Nested(e) => on_pairs(e, target_names, out),
        SqlExpr::BinaryOp {
            left,
            op: BinaryOperator::And,
            right,
        } => {
            on_pairs(left, target_names, out)?;
            on_pairs(right, target_names, out)
        }
        SqlExpr::BinaryOp {
            left,
            op: BinaryOperator::Eq,
            right,
        } => match (
            target_column(left, target_names),
            target_column(right, target_names),
        ) {
            (Some(k), None) => {
                out.push((k, right.as_ref()));
                Ok(())
            }
            (None, Some(k)) => {
                out.push((k, left.as_ref()));
                Ok(())
            }
            _ => Err(format!(
                "{expr}: one side must be the target's column written with its alias (e.g. t.id) and the other the source's"
            )),
        },
        other => Err(other.to_string()),
    }
}

impl Engine {
    /// Plans `MERGE INTO <destination> USING … ON t.key = s.expr WHEN …`.
    ///
    /// Long because it checks each MERGE form users write, in clause order, and answers each one
    /// it refuses with what to write instead.
    pub(super) async fn plan_destination_merge(
        &self,
        merge: &Merge,
        sync: &SyncContext,
    ) -> Result<Option<Planned>> {
        let TableFactor::Table { name, alias, .. } = &merge.table else {
            return Ok(None);
        };
        let Some((table_ref, table)) = self.destination(name).await? else {
            return Ok(None);
        };
        let target = table_ref.to_string();
        let object = table.object().name.clone();
        let mut target_names = vec![table_ref.table().to_string()];
        if let Some(alias) = alias {
            target_names.push(normalize(alias.name.clone()));
        }
        let refuse = |message: String| Err(Error::plan(message, object.clone()));

        // ON target.key = <source expression> [AND target.key2 = <source expression> …]
        let mut on = vec![];
        if let Err(found) = on_pairs(&merge.on, &target_names, &mut on) {
            return refuse(format!(
                "MERGE INTO {target}: ON must compare the record key with the source, e.g. ON t.id = s.id, or each column of a key made of several with AND (found {found})"
            ));
        }
        for (k, _) in on.iter_mut() {
            *k = table.object().canonical_field(k);
        }
        let keys: Vec<String> = on.iter().map(|(k, _)| k.clone()).collect();
        if let Some(object_key) = &table.object().key
            && keys != [object_key.clone()]
            && !(keys.len() == 1 && table.object().match_keys.contains(&keys[0]))
        {
            return refuse(format!(
                "MERGE INTO {target}: records of {target} are matched by '{object_key}'{}, not {}; write ON t.{object_key} = …",
                match &table.object().match_keys {
                    others if others.is_empty() => String::new(),
                    others => format!(" or by one of {}", others.join(", ")),
                },
                keys.iter()
                    .map(|k| format!("'{k}'"))
                    .collect::<Vec<_>>()
                    .join(" and ")
            ));
        }

        // Clauses → mode, mapping, and the fields each clause writes.
        let composite = keys.len() > 1;
        let mut fields: Vec<(String, String)> = vec![];
        for (key, expr) in &on {
            if fields.iter().any(|(k, _)| k == key) {
                return refuse(format!(
                    "MERGE INTO {target}: ON compares '{key}' twice; compare each key column once"
                ));
            }
            fields.push((key.clone(), expr.to_string()));
        }
        let mut add_field = |name: String, expr: String| -> Result<String> {
            if let Some((_, existing)) = fields.iter().find(|(n, _)| *n == name) {
                if *existing != expr {
                    return Err(Error::plan(
                        format!(
                            "MERGE INTO {target} sets '{name}' to `{existing}` in one clause and `{expr}` in another; a field has one mapping: compute it once in the USING query (e.g. CASE WHEN … END AS {name}) and use s.{name} in every clause"
                        ),
                        name,
                    ));
                }
                return Ok(name);
            }
            fields.push((name.clone(), expr));
            Ok(name)
        };
        let mut clauses = MergeClauses::default();
        let mut deletes = false;
        for clause in &merge.clauses {
            let condition = match &clause.predicate {
                None => None,
                Some(_) if clause.clause_kind == MergeClauseKind::NotMatchedBySource => {
                    return refuse(format!(
                        "MERGE INTO {target}: WHEN NOT MATCHED BY SOURCE AND <condition> is not supported (the condition would need the destination's values, which sluice does not read); write WHEN NOT MATCHED BY SOURCE THEN DELETE, or delete chosen records with DELETE FROM {target} WHERE <key> IN (SELECT …)"
                    ));
                }
                Some(predicate) => {
                    if let Some(column) = target_reference(predicate, &target_names) {
                        return refuse(format!(
                            "MERGE INTO {target}: the condition `{predicate}` reads the destination's field {column}; a condition may use only the source's columns (sluice compares with what it last synced, not the destination's current values), e.g. WHEN MATCHED AND s.score > 0.5 THEN …"
                        ));
                    }
                    Some(predicate.to_string())
                }
            };
            let kind = &clause.clause_kind;
            match (kind, &clause.action) {
                (MergeClauseKind::Matched, MergeAction::Update(update)) => {
                    let mut names = keys.clone();
                    for a in &update.assignments {
                        let AssignmentTarget::ColumnName(column) = &a.target else {
                            return refuse(format!(
                                "MERGE INTO {target}: set one field per assignment"
                            ));
                        };
                        names.push(add_field(
                            table.object().canonical_field(&last_ident(column)),
                            a.value.to_string(),
                        )?);
                    }
                    clauses.add(true, names, condition, &target)?;
                }
                (
                    MergeClauseKind::NotMatched | MergeClauseKind::NotMatchedByTarget,
                    MergeAction::Insert(insert),
                ) => {
                    let MergeInsertKind::Values(values) = &insert.kind else {
                        return refuse(format!(
                            "MERGE INTO {target}: write WHEN NOT MATCHED THEN INSERT (fields) VALUES (source expressions)"
                        ));
                    };
                    let [row] = values.rows.as_slice() else {
                        return refuse(format!("MERGE INTO {target}: INSERT takes one VALUES row"));
                    };
                    if row.len() != insert.columns.len() {
                        return refuse(format!(
                            "MERGE INTO {target}: INSERT lists {} field(s) and {} value(s)",
                            insert.columns.len(),
                            row.len()
                        ));
                    }
                    let mut names = keys.clone();
                    for (column, value) in insert.columns.iter().zip(row.iter()) {
                        names.push(add_field(
                            table.object().canonical_field(&last_ident(column)),
                            value.to_string(),
                        )?);
                    }
                    clauses.add(false, names, condition, &target)?;
                }
                (MergeClauseKind::NotMatchedBySource, MergeAction::Delete { .. }) => {
                    deletes = true;
                }
                (MergeClauseKind::Matched, MergeAction::Delete { .. }) => {
                    return refuse(format!(
                        "MERGE INTO {target}: WHEN MATCHED THEN DELETE is not supported; delete the records the model marks with a statement of its own, e.g. DELETE FROM {target} WHERE <key> IN (SELECT <key> FROM … WHERE <condition>), or let a mirror sync delete records that left the model (WHEN NOT MATCHED BY SOURCE THEN DELETE)"
                    ));
                }
                (kind, action) => {
                    return refuse(format!(
                        "MERGE INTO {target}: WHEN {kind} THEN {} is not supported; use WHEN MATCHED THEN UPDATE, WHEN NOT MATCHED THEN INSERT and WHEN NOT MATCHED BY SOURCE THEN DELETE",
                        match action {
                            MergeAction::Insert(_) => "INSERT",
                            MergeAction::Update(_) => "UPDATE",
                            MergeAction::Delete { .. } => "DELETE",
                        }
                    ));
                }
            }
        }
        let Some(mode) = SyncMode::merge(
            !clauses.inserts.is_empty(),
            !clauses.updates.is_empty(),
            deletes,
        ) else {
            return refuse(format!("MERGE INTO {target} has no WHEN clause"));
        };
        let mut select: Vec<String> = fields
            .iter()
            .map(|(name, expr)| format!("{expr} AS {}", quote(name)))
            .collect();
        select.extend(clauses.choice_columns());
        let write = Write {
            statement: "merge",
            mode,
            key: (!composite).then(|| keys[0].clone()),
            key_parts: if composite { keys.clone() } else { vec![] },
            clauses: Some(clauses),
        };
        let sql = format!("SELECT {} FROM {}", select.join(", "), merge.source);
        let query = self.plan_sql_query(&sql).await.map_err(|e| match &write.clauses {
            Some(c) if c.conditional() => Error::plan(
                format!(
                    "MERGE INTO {target}: {e} (a WHEN … AND condition may use the source's columns, e.g. s.score)"
                ),
                object.clone(),
            ),
            _ => e,
        })?;
        let names: Vec<String> = fields.into_iter().map(|(n, _)| n).collect();
        let mapped = map_fields(&table, &target, query, &names)?;
        self.plan_write(&table, table_ref, mapped, write, sync)
            .map(Some)
    }

    /// Plans `DELETE FROM <destination> WHERE key IN (SELECT …) | key = v | key IN (v, …)`.
    /// Only predicates that list keys are accepted: a delete never widens to "every record".
    ///
    /// Long because each predicate form (IN subquery, =, IN list) gets its own checks and its own
    /// advice.
    pub(super) async fn plan_destination_delete(
        &self,
        delete: &Delete,
        sync: &SyncContext,
    ) -> Result<Option<Planned>> {
        let (FromTable::WithFromKeyword(from) | FromTable::WithoutKeyword(from)) = &delete.from;
        let [from] = from.as_slice() else {
            return Ok(None);
        };
        let TableFactor::Table { name, .. } = &from.relation else {
            return Ok(None);
        };
        let Some((table_ref, table)) = self.destination(name).await? else {
            return Ok(None);
        };
        let target = table_ref.to_string();
        let object = table.object().name.clone();
        let usage = format!(
            "write DELETE FROM {target} WHERE <key> IN (SELECT …), <key> = value or <key> IN (values); sluice deletes records by key and never deletes every record"
        );
        if delete.using.is_some() || delete.limit.is_some() || !delete.order_by.is_empty() {
            return Err(Error::plan(
                format!(
                    "DELETE FROM {target}: USING, ORDER BY and LIMIT are not supported; {usage}"
                ),
                object,
            ));
        }
        let Some(selection) = &delete.selection else {
            return Err(Error::plan(
                format!("DELETE FROM {target} has no WHERE; {usage}"),
                object,
            ));
        };
        let column = |e: &SqlExpr| match e {
            SqlExpr::Identifier(i) => Some(normalize(i.clone())),
            SqlExpr::CompoundIdentifier(parts) => parts.last().cloned().map(normalize),
            _ => None,
        };
        let (key, sql) = match selection {
            SqlExpr::InSubquery {
                expr,
                subquery,
                negated: false,
            } => (
                column(expr),
                format!("SELECT * FROM ({subquery}) AS __keys"),
            ),
            SqlExpr::InList {
                expr,
                list,
                negated: false,
            } if !list.is_empty() => (
                column(expr),
                format!(
                    "SELECT * FROM (VALUES {}) AS __keys",
                    list.iter()
                        .map(|v| format!("({v})"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
            SqlExpr::BinaryOp {
                left,
                op: BinaryOperator::Eq,
                right,
            } => (
                column(left),
                format!("SELECT * FROM (VALUES ({right})) AS __keys"),
            ),
            _ => {
                return Err(Error::plan(
                    format!("DELETE FROM {target} WHERE {selection}: {usage}"),
                    object,
                ));
            }
        };
        let Some(key) = key else {
            return Err(Error::plan(
                format!("DELETE FROM {target} WHERE {selection}: {usage}"),
                object,
            ));
        };
        let key = table.object().canonical_field(&key);
        match &table.object().key {
            Some(k) if *k == key || table.object().match_keys.contains(&key) => {}
            Some(k) => {
                return Err(Error::plan(
                    format!(
                        "DELETE FROM {target}: records are deleted by their key '{k}', not '{key}'"
                    ),
                    key,
                ));
            }
            None if !table.object().composite_key.is_empty() => {
                return Err(Error::plan(
                    format!(
                        "DELETE FROM {target}: its key has several columns ({}); delete such records with a mirror sync (MERGE … WHEN NOT MATCHED BY SOURCE THEN DELETE)",
                        table.object().composite_key.join(", ")
                    ),
                    object,
                ));
            }
            None if table.stateful() => {
                return Err(Error::plan(
                    format!(
                        "DELETE FROM {target}: this object has no key to delete records by (set the connection's key option)"
                    ),
                    object,
                ));
            }
            None => {}
        }
        let query = self.plan_sql_query(&sql).await?;
        if query.schema().fields().len() != 1 {
            return Err(Error::plan(
                format!(
                    "DELETE FROM {target}: the subquery returns {} columns; it must return only the keys",
                    query.schema().fields().len()
                ),
                object,
            ));
        }
        let mapped = map_fields(&table, &target, query, std::slice::from_ref(&key))?;
        let write = Write {
            statement: "delete",
            mode: SyncMode::DeleteListed,
            key: Some(key),
            key_parts: vec![],
            clauses: None,
        };
        self.plan_write(&table, table_ref, mapped, write, sync)
            .map(Some)
    }

    async fn plan_sql_query(&self, sql: &str) -> Result<datafusion::logical_expr::LogicalPlan> {
        let mut statements = crate::parser::parse_sql(sql)?;
        let Some(crate::parser::ParsedStatement {
            statement: crate::parser::Statement::Sql(statement),
            ..
        }) = statements.pop()
        else {
            return Err(Error::plan(format!("cannot plan `{sql}`"), sql.to_string()));
        };
        Ok(self.ctx.state().statement_to_plan(*statement).await?)
    }

    pub(super) async fn create_sync(&self, create: &CreateSync) -> Result<Outcome> {
        let name = &create.name;
        let options = Options::new("sync", crate::sync::OPTIONS, create.options.clone())?;
        let parsed = SyncOptions::from_options(&options)?;
        if let Some(schedule) = &create.schedule
            && let Err(e) = crate::schedule::Trigger::of(schedule)
        {
            return Err(Error::plan(e, "SCHEDULE"));
        }
        if self.syncs.lock().expect("syncs").contains_key(name) {
            if create.if_not_exists {
                return Ok(Outcome::Done(format!(
                    "sync {name} already exists; left unchanged"
                )));
            }
            if !create.or_replace {
                return Err(Error::plan(
                    format!(
                        "sync '{name}' already exists; use CREATE OR REPLACE SYNC to redefine it, or DROP SYNC {name} first"
                    ),
                    name.clone(),
                ));
            }
        }
        // Plan the body now, so a wrong field or table fails at definition.
        let context = SyncContext {
            name: Some(name.clone()),
            options: parsed.clone(),
            dry_run: true,
            sample: None,
            run_id: None,
        };
        let planned = self.plan_sync_body(name, &create.body, &context).await?;
        let target = planned
            .sync
            .as_ref()
            .map(|r| r.spec.target.clone())
            .unwrap_or_default();
        self.syncs.lock().expect("syncs").insert(
            name.clone(),
            SyncDef {
                schedule: create.schedule.clone(),
                options: parsed,
                options_text: options.redacted(),
                body: create.body.clone(),
                body_text: create.body_text.clone(),
            },
        );
        Ok(Outcome::Done(format!("CREATE SYNC {name} → {target}")))
    }

    /// Plans a sync's body: it must be a write into a stateful destination.
    pub(super) async fn plan_sync_body(
        &self,
        name: &str,
        body: &datafusion::sql::parser::Statement,
        context: &SyncContext,
    ) -> Result<Planned> {
        let planned = self.plan(body, context).await?;
        if planned.sync.is_none() {
            return Err(Error::plan(
                format!(
                    "sync {name}: its statement must write into a destination that keeps sync state (a webhook, CRM or database object), not a file or a table"
                ),
                name.to_string(),
            ));
        }
        Ok(planned)
    }

    pub(super) fn sync_def(&self, name: &str) -> Result<SyncDef> {
        let syncs = self.syncs.lock().expect("syncs");
        syncs.get(name).cloned().ok_or_else(|| {
            let names: Vec<&str> = syncs.keys().map(String::as_str).collect();
            Error::plan(
                format!(
                    "unknown sync '{name}'{}",
                    match crate::error::did_you_mean(name, names.iter().copied()) {
                        h if !h.is_empty() => h,
                        _ if names.is_empty() =>
                            "; no sync is defined in this session: CREATE SYNC first".into(),
                        _ => format!("; syncs: {}", names.join(", ")),
                    }
                ),
                name.to_string(),
            )
        })
    }

    pub(super) async fn show_syncs(&self) -> Result<Outcome> {
        let defs: Vec<(String, SyncDef)> = self
            .syncs
            .lock()
            .expect("syncs")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut rows = vec![];
        for (name, def) in defs {
            let last = self.state.last_run(&name).await?;
            let (status, started) = last.map(|r| (r.status, r.started_at)).unzip();
            rows.push(vec![
                Some(name),
                def.schedule.as_ref().map(|s| s.to_string()),
                Some(def.body_text),
                Some(def.options_text),
                status,
                started,
            ]);
        }
        super::discover::text_rows(
            &[
                "name",
                "schedule",
                "statement",
                "options",
                "last_status",
                "last_started_at",
            ],
            rows,
        )
    }

    pub(super) async fn reset_sync(&self, name: &str) -> Result<Outcome> {
        let lock = self.state.lock(name, "reset").await?;
        let removed = self.state.reset(name).await?;
        lock.release().await;
        Ok(Outcome::Done(if removed == 0 {
            format!("RESET SYNC {name}: it had no state; its next run sends every record")
        } else {
            format!(
                "RESET SYNC {name}: state forgotten; its next run sends every record (its run history stays in sluice.runs)"
            )
        }))
    }

    pub(super) fn drop_sync(&self, name: &str, if_exists: bool) -> Result<Outcome> {
        if self.syncs.lock().expect("syncs").remove(name).is_none() {
            if if_exists {
                return Ok(Outcome::Done(format!(
                    "sync {name} does not exist; nothing dropped"
                )));
            }
            self.sync_def(name)?;
        }
        Ok(Outcome::Done(format!(
            "DROP SYNC {name} (its state is kept; RESET SYNC {name} forgets it)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parser::{Statement, parse_sql};
    use crate::sync::StateStore;

    async fn engine(dir: &std::path::Path) -> Engine {
        let mut engine = Engine::new().unwrap();
        engine.set_state(StateStore::local(dir).unwrap()).unwrap();
        engine
            .run_sql(
                "CREATE CONNECTION hooks TYPE webhook OPTIONS (url 'http://127.0.0.1:9/hook', key 'id');
                 CREATE CONNECTION events TYPE webhook OPTIONS (url 'http://127.0.0.1:9/events');
                 CREATE VIEW people AS SELECT * FROM (VALUES (1, 'a@x.io', 'pro')) AS t(id, email, plan);",
            )
            .await
            .unwrap();
        engine
    }

    /// The mode the planner gives `sql` (nothing runs).
    async fn mode(engine: &Engine, sql: &str) -> Result<SyncMode> {
        Ok(diff_spec(engine, sql).await?.mode)
    }

    /// The diff the planner gives `sql` (nothing runs).
    async fn diff_spec(engine: &Engine, sql: &str) -> Result<crate::sync::diff::DiffSpec> {
        let parsed = parse_sql(sql)?;
        let Statement::Sql(statement) = &parsed[0].statement else {
            panic!("{sql} is not a write");
        };
        let context = SyncContext {
            name: None,
            options: SyncOptions::default(),
            dry_run: false,
            sample: None,
            run_id: None,
        };
        let planned = engine.plan(statement, &context).await?;
        Ok(planned.sync.expect("a sync").spec.diff.clone())
    }

    #[tokio::test]
    async fn each_merge_clause_keeps_its_fields_and_its_condition() {
        use crate::contract::{Clause, Clauses};
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(dir.path()).await;
        // id, email, plan: the key in every clause; email only on create.
        let diff = diff_spec(
            &engine,
            "MERGE INTO hooks.people AS t USING people AS s ON t.id = s.id \
             WHEN MATCHED THEN UPDATE SET plan = s.plan \
             WHEN NOT MATCHED THEN INSERT (id, email, plan) VALUES (s.id, s.email, s.plan)",
        )
        .await
        .unwrap();
        assert_eq!(diff.fields, ["id", "plan", "email"]);
        let clause = |fields: u64, condition: Option<&str>| Clause {
            fields,
            condition: condition.map(str::to_string),
        };
        assert_eq!(
            diff.clauses,
            Clauses {
                inserts: vec![clause(0b111, None)],
                updates: vec![clause(0b011, None)],
            }
        );
        // Conditions on the source's columns, several clauses of a kind, first match wins.
        let diff = diff_spec(
            &engine,
            "MERGE INTO hooks.people AS t USING people AS s ON t.id = s.id \
             WHEN MATCHED AND s.plan = 'pro' THEN UPDATE SET plan = s.plan \
             WHEN MATCHED THEN UPDATE SET email = s.email \
             WHEN NOT MATCHED AND s.email IS NOT NULL THEN INSERT (id, email) VALUES (s.id, s.email)",
        )
        .await
        .unwrap();
        assert_eq!(diff.mode, SyncMode::Upsert);
        assert_eq!(diff.fields, ["id", "plan", "email"]);
        assert_eq!(
            diff.clauses,
            Clauses {
                inserts: vec![clause(0b101, Some("s.email IS NOT NULL"))],
                updates: vec![clause(0b011, Some("s.plan = 'pro'")), clause(0b101, None)],
            }
        );
        // An INSERT INTO writes every field in every clause.
        let diff = diff_spec(
            &engine,
            "INSERT INTO hooks.people SELECT id, plan FROM people",
        )
        .await
        .unwrap();
        assert_eq!(diff.clauses, Clauses::every_field());
    }

    #[tokio::test]
    async fn each_statement_plans_the_mode_it_says() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(dir.path()).await;
        let merge = |clauses: &str| {
            format!("MERGE INTO hooks.people AS t USING people AS s ON t.id = s.id {clauses}")
        };
        let update = "WHEN MATCHED THEN UPDATE SET plan = s.plan";
        let insert = "WHEN NOT MATCHED THEN INSERT (id, plan) VALUES (s.id, s.plan)";
        let delete = "WHEN NOT MATCHED BY SOURCE THEN DELETE";
        let cases = [
            (
                "INSERT INTO hooks.people SELECT id, plan FROM people".to_string(),
                SyncMode::Upsert,
            ),
            (
                "INSERT INTO events.clicks SELECT id, plan FROM people".to_string(),
                SyncMode::Append,
            ),
            (merge(&format!("{update} {insert}")), SyncMode::Upsert),
            (
                merge(&format!("{update} {insert} {delete}")),
                SyncMode::Mirror,
            ),
            (merge(insert), SyncMode::CreateOnly),
            (
                merge(&format!("{insert} {delete}")),
                SyncMode::CreateAndDelete,
            ),
            (merge(update), SyncMode::UpdateOnly),
            (
                merge(&format!("{update} {delete}")),
                SyncMode::UpdateAndDelete,
            ),
            (merge(delete), SyncMode::DeleteMissing),
            (
                "DELETE FROM hooks.people WHERE id IN (SELECT id FROM people)".to_string(),
                SyncMode::DeleteListed,
            ),
            (
                "DELETE FROM hooks.people WHERE id = 7".to_string(),
                SyncMode::DeleteListed,
            ),
        ];
        for (sql, expected) in cases {
            assert_eq!(mode(&engine, &sql).await.unwrap(), expected, "{sql}");
        }
    }

    #[tokio::test]
    async fn statements_a_mode_cannot_serve_are_refused_with_what_to_write() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(dir.path()).await;
        let refusals = [
            (
                "MERGE INTO hooks.people AS t USING people AS s ON t.id = s.id WHEN MATCHED AND t.plan <> s.plan THEN UPDATE SET plan = s.plan",
                "reads the destination's field t.plan ('plan'); a condition may use only the source's columns",
            ),
            (
                "MERGE INTO hooks.people AS t USING people AS s ON t.id = s.id WHEN MATCHED AND s.nope = 1 THEN UPDATE SET plan = s.plan",
                "a WHEN … AND condition may use the source's columns",
            ),
            (
                "MERGE INTO hooks.people AS t USING people AS s ON t.id = s.id WHEN MATCHED THEN UPDATE SET plan = s.plan WHEN MATCHED AND s.plan = 'x' THEN UPDATE SET email = s.email",
                "a WHEN MATCHED clause follows a WHEN MATCHED clause without a condition, so it never applies",
            ),
            (
                "MERGE INTO hooks.people AS t USING people AS s ON t.id = s.id WHEN NOT MATCHED BY SOURCE AND t.plan = 'free' THEN DELETE",
                "WHEN NOT MATCHED BY SOURCE AND <condition> is not supported",
            ),
            (
                "MERGE INTO hooks.people AS t USING people AS s ON t.id = s.id WHEN MATCHED AND s.plan = 'gone' THEN DELETE",
                "DELETE FROM hooks.people WHERE <key> IN (SELECT <key> FROM … WHERE <condition>)",
            ),
            (
                "MERGE INTO hooks.people AS t USING people AS s ON t.id = s.id WHEN MATCHED THEN UPDATE SET plan = s.plan WHEN NOT MATCHED THEN INSERT (id, plan) VALUES (s.id, upper(s.plan))",
                "compute it once in the USING query",
            ),
            (
                "MERGE INTO hooks.people AS t USING people AS s ON t.email = s.email WHEN MATCHED THEN UPDATE SET plan = s.plan",
                "write ON t.id",
            ),
            (
                "DELETE FROM hooks.people WHERE plan = 'free'",
                "records are deleted by their key 'id', not 'plan'",
            ),
            (
                "DELETE FROM hooks.people WHERE id > 3",
                "sluice deletes records by key and never deletes every record",
            ),
        ];
        for (sql, says) in refusals {
            let message = mode(&engine, sql).await.unwrap_err().to_string();
            assert!(message.contains(says), "{sql}: {message}");
        }
    }
}
