//! `diff 'warehouse'`: the diff of a sync whose model reads one Postgres connection runs in that
//! Postgres, as SQL, against a state table in its `sluice_state` schema; only changed rows (and
//! the keys to delete) cross the network.
//!
//! The state table holds, per synced record, its key as text, the destination's record id, one
//! 64-bit hash per mapped field except the key (`hashtextextended(value::text, 0)`, a fixed
//! value for null), and `pending` for records a run announced before sending them and no commit
//! has settled since (the destination may or may not hold what was sent, so they are sent again,
//! or deleted, whatever their hashes say, as with the local diff's intents). A field
//! mapped later gets a new column whose null hashes mark it changed on every record, so a
//! mapping change sends only that field.
//!
//! The model is the sync's mapped plan unparsed to Postgres SQL (DataFusion's unparser), with
//! sluice's table names rewritten to the Postgres relations and every string literal quoted again
//! by [`crate::sql_text`] (the unparser's escaping is not safe). Postgres then evaluates the model's
//! expressions, so a function or cast means what it means in Postgres.

use std::fmt;
use std::ops::ControlFlow;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{Array, AsArray, RecordBatch, UInt32Array};
use datafusion::arrow::compute::{cast, take_record_batch};
use datafusion::arrow::datatypes::{Field, Int64Type, Schema, SchemaRef};
use datafusion::catalog::default_table_source::source_as_provider;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::Result as DfResult;
use datafusion::execution::TaskContext;
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::metrics::{ExecutionPlanMetricsSet, MetricBuilder, MetricsSet};
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
    ReplaceChildrenOptions, SendableRecordBatchStream,
};
use datafusion::sql::sqlparser::ast::{Ident, ObjectName, visit_relations_mut};
use datafusion::sql::unparser::Unparser;
use datafusion::sql::unparser::dialect::PostgreSqlDialect;
use futures::StreamExt;

use super::metadata::quote_ident;
use super::source::{PgTable, postgres_scan};
use super::types::PgType;
use super::{PgConnection, pg_message};
use crate::connectors::table::DestinationTable;
use crate::contract::{Op, change_schema};
use crate::error::{Error, Result};
use crate::sql_text::Dialect;
use crate::sync::SyncRun;
use crate::sync::diff::{Changes, DiffCounts, DiffSpec, duplicate_keys_error};
use crate::sync::exec::{describe_diff, diff_output, emit_changes, null_key_rejects};
use crate::sync::hash::{Key, POSTGRES_HASH_VERSION};
use crate::sync::remote::{RemoteCommit, RemoteState, WarehouseDiff};

/// The schema of the source that holds the state tables.
pub const STATE_SCHEMA: &str = "sluice_state";

/// The hash of a null value (any fixed value; a real value hashing to it is a 2^-64 event).
const NULL_HASH: i64 = 0x61c8_8646_80b5_83eb;

/// What a commit passes for a hash that becomes unknown (null): a field a pending record's change
/// did not send. (Null in the commit's arrays means "keep what the state holds".)
const UNKNOWN_HASH: i64 = i64::MIN;

/// Names of the columns the diff query adds after the model's fields.
const KEY: &str = "__sluice_key_text";

/// How many acknowledged records one commit statement carries.
const COMMIT_CHUNK: usize = 50_000;

/// The warehouse diff of Postgres connections: the model runs as SQL in the database it reads.
#[derive(Debug)]
pub struct PgWarehouseDiff;

impl WarehouseDiff for PgWarehouseDiff {
    fn plan(
        &self,
        model: &LogicalPlan,
        diff: &DiffSpec,
        id: &str,
        target: &str,
    ) -> Result<Arc<dyn RemoteState>> {
        plan(model, diff, id, target)
    }
}

/// Plans the warehouse-side diff of the sync `id` whose mapped model is `mapped`.
fn plan(
    mapped: &LogicalPlan,
    diff: &DiffSpec,
    id: &str,
    target: &str,
) -> Result<Arc<dyn RemoteState>> {
    let refuse = |message: String| Err(Error::plan(message, "diff".to_string()));
    let Some(key) = diff.key else {
        return refuse(format!(
            "diff 'warehouse' needs a match key and {target} has none; use the local diff (drop the option) for append-only objects"
        ));
    };
    if diff.mode.listed_deletes() {
        return refuse(
            "diff 'warehouse' applies to INSERT and MERGE syncs; a DELETE statement sends the keys it lists and keeps no state".into(),
        );
    }
    if diff.clauses.conditional() {
        return refuse(
            "diff 'warehouse' does not evaluate WHEN … AND <condition> clauses yet; use the local diff (drop the option), or filter the USING query".into(),
        );
    }
    if diff.keep_last {
        return refuse(
            "duplicate_keys 'keep_last' needs the local diff (a SQL result has no row order to take the last row from); make the key unique in the model".into(),
        );
    }
    let (connection, sql) = model_sql(mapped)?;
    tracing::debug!(model = %sql, "diff 'warehouse': the model as Postgres SQL");
    let schema = mapped.schema().as_arrow();
    let mut types = Vec::with_capacity(schema.fields().len());
    for field in schema.fields() {
        match PgType::for_arrow(field.data_type()) {
            Some(t) => types.push(t),
            None => {
                return Err(Error::plan(
                    format!(
                        "diff 'warehouse' cannot read field '{}' ({}) back from Postgres; CAST it to text in the model, or use the local diff",
                        field.name(),
                        field.data_type()
                    ),
                    field.name().clone(),
                ));
            }
        }
    }
    let state = PgState {
        connection,
        table: state_table_name(id),
        fields: diff.fields.clone(),
        key,
        delete: diff.mode.deletes_missing(),
        types,
        model: sql,
    };
    Ok(Arc::new(state))
}

/// The model as Postgres SQL, and the one connection it reads.
///
/// Long because it walks the plan once and checks every node against what Postgres SQL carries
/// faithfully, with one message per refusal.
fn model_sql(mapped: &LogicalPlan) -> Result<(Arc<PgConnection>, String)> {
    let mut connection: Option<Arc<PgConnection>> = None;
    // sluice's name of each table (as the plan spells it) → its Postgres relation.
    let mut relations: Vec<(Vec<String>, Vec<String>)> = vec![];
    let mut problem: Option<String> = None;
    mapped
        .apply_with_subqueries(|node| {
            // sqlparser writes a double quote inside a quoted name as it is when a backslash
            // precedes it: a name with one is refused rather than risk its SQL meaning more.
            if let Some(name) = node
                .schema()
                .iter()
                .flat_map(|(q, f)| [q.map(|q| q.to_string()), Some(f.name().clone())])
                .flatten()
                .find(|n| n.contains('"'))
            {
                problem = Some(format!(
                    "diff 'warehouse' cannot name `{name}` in Postgres SQL (it holds a double quote); rename it with AS, or use the local diff"
                ));
                return Ok(TreeNodeRecursion::Stop);
            }
            let scan = match node {
                LogicalPlan::TableScan(scan) => scan,
                // What DataFusion's unparser writes back faithfully.
                LogicalPlan::Projection(_)
                | LogicalPlan::Filter(_)
                | LogicalPlan::SubqueryAlias(_)
                | LogicalPlan::Sort(_)
                | LogicalPlan::Limit(_) => return Ok(TreeNodeRecursion::Continue),
                other => {
                    problem = Some(format!(
                        "diff 'warehouse' runs models that select, filter and compute columns of one Postgres table or view; this model has `{}` (a join, aggregate, union, window or subquery), which sluice does not yet translate to Postgres SQL reliably. Create a view in Postgres for that part and select from the view",
                        other.display().to_string().split(':').next().unwrap_or("step")
                    ));
                    return Ok(TreeNodeRecursion::Stop);
                }
            };
            let name = scan.table_name.to_string();
            let pg = source_as_provider(&scan.source).ok().and_then(|p| {
                let table = p.downcast_ref::<DestinationTable>()?;
                let reader = table.reader()?;
                let pg = reader.downcast_ref::<PgTable>()?;
                Some((Arc::clone(pg.connection()), pg.relation().clone()))
            });
            let Some((conn, relation)) = pg else {
                problem = Some(format!(
                    "{name} is not a Postgres table; the model of a diff 'warehouse' sync runs in Postgres, so it may only read tables of one Postgres connection"
                ));
                return Ok(TreeNodeRecursion::Stop);
            };
            match &connection {
                Some(c) if !Arc::ptr_eq(c, &conn) => {
                    problem = Some(format!(
                        "the model reads {} and {}; the model of a diff 'warehouse' sync runs in one Postgres, so it may only read tables of one connection",
                        c.name, conn.name
                    ));
                    return Ok(TreeNodeRecursion::Stop);
                }
                Some(_) => {}
                None => connection = Some(conn),
            }
            if relation.schema.contains('"') || relation.name.contains('"') {
                problem = Some(format!(
                    "diff 'warehouse' cannot name {name} in Postgres SQL (its name holds a double quote); create a view with a plain name, or use the local diff"
                ));
                return Ok(TreeNodeRecursion::Stop);
            }
            relations.push((
                scan.table_name.to_vec(),
                vec![relation.schema.clone(), relation.name.clone()],
            ));
            Ok(TreeNodeRecursion::Continue)
        })
        .map_err(Error::from)?;
    if let Some(problem) = problem {
        return Err(Error::plan(problem, "diff".to_string()));
    }
    let Some(connection) = connection else {
        return Err(Error::plan(
            "the model reads no table; diff 'warehouse' runs the model in a Postgres source, so it must read one".to_string(),
            "diff".to_string(),
        ));
    };
    let mut statement = Unparser::new(&PostgreSqlDialect {})
        .plan_to_sql(mapped)
        .map_err(|e| {
            Error::plan(
                format!("diff 'warehouse': the model cannot be written as Postgres SQL ({e}); use the local diff"),
                "diff".to_string(),
            )
        })?;
    let _ = visit_relations_mut(&mut statement, |name: &mut ObjectName| {
        let parts: Vec<String> = name
            .0
            .iter()
            .filter_map(|p| p.as_ident().map(|i| i.value.clone()))
            .collect();
        if let Some((_, pg)) = relations.iter().find(|(ours, _)| *ours == parts) {
            *name = ObjectName::from(
                pg.iter()
                    .map(|p| Ident::with_quote('"', p.as_str()))
                    .collect::<Vec<_>>(),
            );
        }
        ControlFlow::<()>::Continue(())
    });
    // Every string literal is written by our quoting, not the unparser's.
    Dialect::Postgres
        .requote_literals(&mut statement)
        .map_err(|message| {
            Error::plan(
                format!("diff 'warehouse': {message}; use the local diff"),
                "diff".to_string(),
            )
        })?;
    Ok((connection, statement.to_string()))
}

/// A Postgres identifier is at most 63 bytes: longer sync ids keep a prefix and their hash.
fn state_table_name(id: &str) -> String {
    if id.len() <= 63 {
        return id.to_string();
    }
    let mut cut = 40;
    while !id.is_char_boundary(cut) {
        cut -= 1;
    }
    format!(
        "{}_{:016x}",
        &id[..cut],
        xxhash_rust::xxh3::xxh3_64(id.as_bytes())
    )
}

/// The state column of a mapped field (fixed length, whatever the field's name).
fn hash_column(field: &str) -> String {
    format!("h_{:016x}", xxhash_rust::xxh3::xxh3_64(field.as_bytes()))
}

/// A sync's state table in the source Postgres, and the SQL of its diff.
#[derive(Clone)]
pub struct PgState {
    connection: Arc<PgConnection>,
    table: String,
    fields: Vec<String>,
    key: usize,
    delete: bool,
    /// How each mapped field is read back.
    types: Vec<PgType>,
    /// The model as Postgres SQL.
    model: String,
}

impl fmt::Debug for PgState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.location())
    }
}

impl PgState {
    fn qualified(&self) -> String {
        format!("{}.{}", quote_ident(STATE_SCHEMA), quote_ident(&self.table))
    }

    /// The mapped fields that have a hash column (all but the key).
    fn stored(&self) -> impl Iterator<Item = (usize, &String)> {
        self.fields
            .iter()
            .enumerate()
            .filter(move |(i, _)| *i != self.key)
    }

    fn key_text(&self) -> String {
        format!("(m.{})::text", quote_ident(&self.fields[self.key]))
    }

    /// Rows, null keys, duplicate keys (with up to five of them) of the model.
    fn stats_sql(&self) -> String {
        format!(
            "WITH m AS ({model}), g AS (SELECT {key} AS k, count(*) AS n FROM m GROUP BY 1) \
             SELECT coalesce(sum(n), 0)::int8, coalesce(sum(n) FILTER (WHERE k IS NULL), 0)::int8, \
             coalesce(sum(n - 1) FILTER (WHERE k IS NOT NULL AND n > 1), 0)::int8, \
             (SELECT array_agg(k) FROM (SELECT k FROM g WHERE k IS NOT NULL AND n > 1 LIMIT 5) d) FROM g",
            model = self.model,
            key = self.key_text()
        )
    }

    /// The diff: model rows that are new, changed, unanswered or keyless, then (for syncs that
    /// delete) the state's keys the model no longer has. Columns: the fields, the key as text,
    /// known, pending, deleted, the new hashes, the stored hashes.
    fn diff_sql(&self) -> String {
        let q = quote_ident;
        let state = self.qualified();
        let mut hashed = vec![format!("{} AS {}", self.key_text(), q(KEY))];
        for (n, (_, field)) in self.stored().enumerate() {
            hashed.push(format!(
                "coalesce(hashtextextended((m.{})::text, 0), {NULL_HASH}) AS \"__sluice_h{n}\"",
                q(field)
            ));
        }
        let mut select: Vec<String> = self
            .fields
            .iter()
            .zip(&self.types)
            .map(|(f, t)| format!("(d.{})::{}", q(f), t.cast_type()))
            .collect();
        select.push(format!("d.{}", q(KEY)));
        select.push("s.key IS NOT NULL".into());
        select.push("coalesce(s.pending, false)".into());
        select.push("false".into());
        let mut changed = vec![
            format!("d.{} IS NULL", q(KEY)),
            "s.key IS NULL".into(),
            "s.pending".into(),
        ];
        for (n, (_, field)) in self.stored().enumerate() {
            select.push(format!("d.\"__sluice_h{n}\""));
            changed.push(format!(
                "d.\"__sluice_h{n}\" IS DISTINCT FROM s.{}",
                q(&hash_column(field))
            ));
        }
        for (_, field) in self.stored() {
            select.push(format!("s.{}", q(&hash_column(field))));
        }
        let mut sql = format!(
            "WITH m AS ({model}), d AS (SELECT m.*, {hashed} FROM m) SELECT {select} FROM d \
             LEFT JOIN {state} s ON s.key = d.{key} WHERE {changed}",
            model = self.model,
            hashed = hashed.join(", "),
            select = select.join(", "),
            key = q(KEY),
            changed = changed.join(" OR ")
        );
        if self.delete {
            let mut gone: Vec<String> = self
                .types
                .iter()
                .map(|t| format!("NULL::{}", t.cast_type()))
                .collect();
            gone.extend([
                "s.key".into(),
                "true".into(),
                "s.pending".into(),
                "true".into(),
            ]);
            gone.extend((0..2 * self.stored().count()).map(|_| "NULL::int8".to_string()));
            sql.push_str(&format!(
                " UNION ALL SELECT {} FROM {state} s WHERE NOT EXISTS (SELECT 1 FROM m WHERE {} = s.key)",
                gone.join(", "),
                self.key_text()
            ));
        }
        sql
    }

    /// The diff query's columns and how they are read.
    fn diff_columns(&self, model: &SchemaRef) -> (SchemaRef, Vec<PgType>) {
        let mut fields: Vec<Field> = model
            .fields()
            .iter()
            .zip(&self.types)
            .map(|(f, t)| Field::new(f.name(), t.arrow(), true))
            .collect();
        let mut types = self.types.clone();
        let mut add = |name: String, t: PgType| {
            fields.push(Field::new(name, t.arrow(), true));
            types.push(t);
        };
        add(KEY.into(), PgType::Text);
        for flag in ["__sluice_known", "__sluice_pending", "__sluice_deleted"] {
            add(flag.into(), PgType::Bool);
        }
        let stored = self.stored().count();
        for n in 0..stored {
            add(format!("__sluice_h{n}"), PgType::Int8);
        }
        for n in 0..stored {
            add(format!("__sluice_old{n}"), PgType::Int8);
        }
        (Arc::new(Schema::new(fields)), types)
    }

    fn error(&self, what: &str, e: tokio_postgres::Error) -> Error {
        Error::State {
            message: format!(
                "the warehouse state of this sync ({}): {what}: {}",
                self.location(),
                pg_message(&e)
            ),
        }
    }

    /// What the model holds: rows, null keys, duplicates and a few duplicate keys.
    async fn stats(&self) -> Result<(u64, u64, u64, Vec<String>)> {
        let client = self.connection.client().await?;
        let row = client
            .query_one(self.stats_sql().as_str(), &[])
            .await
            .map_err(|e| Error::Write {
                message: format!(
                    "running the model in Postgres ({}): {}",
                    self.connection.name,
                    pg_message(&e)
                ),
            })?;
        let samples: Option<Vec<String>> = row.get(3);
        Ok((
            row.get::<_, i64>(0) as u64,
            row.get::<_, i64>(1) as u64,
            row.get::<_, i64>(2) as u64,
            samples.unwrap_or_default(),
        ))
    }
}

/// `CREATE SCHEMA IF NOT EXISTS` and `CREATE TABLE IF NOT EXISTS` race with a concurrent session
/// doing the same; the loser sees a unique violation and may simply go on.
fn already_there(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        *c == tokio_postgres::error::SqlState::UNIQUE_VIOLATION
            || *c == tokio_postgres::error::SqlState::DUPLICATE_SCHEMA
            || *c == tokio_postgres::error::SqlState::DUPLICATE_TABLE
    })
}

#[async_trait]
impl RemoteState for PgState {
    fn location(&self) -> String {
        format!(
            "postgres {}: {}.{}",
            self.connection.name,
            quote_ident(STATE_SCHEMA),
            quote_ident(&self.table)
        )
    }

    fn hash_version(&self) -> &'static str {
        POSTGRES_HASH_VERSION
    }

    async fn prepare(&self, fresh: bool) -> Result<u64> {
        let client = self.connection.client().await?;
        let table = self.qualified();
        if fresh {
            for ddl in [
                format!("CREATE SCHEMA IF NOT EXISTS {}", quote_ident(STATE_SCHEMA)),
                format!(
                    "CREATE TABLE IF NOT EXISTS {table} (key text PRIMARY KEY, record_id text, pending boolean NOT NULL DEFAULT false)"
                ),
            ] {
                if let Err(e) = client.batch_execute(&ddl).await
                    && !already_there(&e)
                {
                    return Err(self.error("creating it", e));
                }
            }
            // No committed state: forget all but the records sent without an answer.
            client
                .execute(
                    format!("DELETE FROM {table} WHERE NOT pending").as_str(),
                    &[],
                )
                .await
                .map_err(|e| self.error("clearing it", e))?;
        } else {
            let exists: bool = client
                .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
                .await
                .map_err(|e| self.error("looking it up", e))?
                .get(0);
            if !exists {
                return Err(Error::State {
                    message: format!(
                        "the warehouse state of this sync ({}) is missing, though the sync has committed runs; nothing was sent. Restore it, or RESET SYNC to resync every record",
                        self.location()
                    ),
                });
            }
        }
        for (_, field) in self.stored() {
            let ddl = format!(
                "ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {} bigint",
                quote_ident(&hash_column(field))
            );
            if let Err(e) = client.batch_execute(&ddl).await
                && !already_there(&e)
            {
                return Err(self.error("adding a field's column", e));
            }
        }
        let rows: i64 = client
            .query_one(format!("SELECT count(*) FROM {table}").as_str(), &[])
            .await
            .map_err(|e| self.error("counting its records", e))?
            .get(0);
        Ok(rows as u64)
    }

    fn diff_exec(&self, run: Arc<SyncRun>, model: SchemaRef) -> Arc<dyn ExecutionPlan> {
        Arc::new(WarehouseDiffExec::new(self.clone(), run, model))
    }

    async fn write_intent(&self, keys: &[&Key]) -> Result<()> {
        let keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        let client = self.connection.client().await?;
        client
            .execute(
                format!(
                    "INSERT INTO {} (key, pending) SELECT unnest($1::text[]), true ON CONFLICT (key) DO UPDATE SET pending = true",
                    self.qualified()
                )
                .as_str(),
                &[&keys],
            )
            .await
            .map_err(|e| self.error("recording the records about to be sent", e))?;
        Ok(())
    }

    async fn commit(&self, commit: RemoteCommit<'_>) -> Result<()> {
        let table = self.qualified();
        let mut client = self.connection.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| self.error("committing", e))?;
        let text = |keys: &[&Key]| keys.iter().map(|k| k.to_string()).collect::<Vec<_>>();
        if !commit.deletes.is_empty() {
            tx.execute(
                format!("DELETE FROM {table} WHERE key = ANY($1)").as_str(),
                &[&text(&commit.deletes)],
            )
            .await
            .map_err(|e| self.error("committing deletes", e))?;
        }
        if !commit.withdrawn.is_empty() {
            tx.execute(
                format!("DELETE FROM {table} WHERE pending AND key = ANY($1)").as_str(),
                &[&text(&commit.withdrawn)],
            )
            .await
            .map_err(|e| self.error("committing refused records", e))?;
        }
        let stored: Vec<(usize, String)> =
            self.stored().map(|(i, f)| (i, hash_column(f))).collect();
        let columns: Vec<String> = stored.iter().map(|(_, c)| quote_ident(c)).collect();
        let upsert = format!(
            "INSERT INTO {table} AS t (key, record_id, pending{cols}) \
             SELECT u.k, u.r, false{vals} FROM unnest($1::text[], $2::text[]{arrays}) AS u(k, r{names}) \
             ON CONFLICT (key) DO UPDATE SET record_id = coalesce(EXCLUDED.record_id, t.record_id), pending = false{sets}",
            cols = columns.iter().map(|c| format!(", {c}")).collect::<String>(),
            vals = (0..stored.len())
                .map(|n| format!(", nullif(u.h{n}, {UNKNOWN_HASH})"))
                .collect::<String>(),
            arrays = (0..stored.len())
                .map(|n| format!(", ${}::int8[]", n + 3))
                .collect::<String>(),
            names = (0..stored.len())
                .map(|n| format!(", h{n}"))
                .collect::<String>(),
            // A hash not committed (null) keeps what the state holds; UNKNOWN_HASH sets it
            // unknown (null).
            sets = columns
                .iter()
                .map(|c| format!(
                    ", {c} = CASE WHEN EXCLUDED.{c} IS NULL THEN t.{c} ELSE nullif(EXCLUDED.{c}, {UNKNOWN_HASH}) END"
                ))
                .collect::<String>(),
        );
        for chunk in commit.upserts.chunks(COMMIT_CHUNK) {
            let keys: Vec<String> = chunk.iter().map(|u| u.key.to_string()).collect();
            let ids: Vec<Option<&str>> = chunk.iter().map(|u| u.record_id).collect();
            let hashes: Vec<Vec<Option<i64>>> = stored
                .iter()
                .map(|(i, _)| {
                    chunk
                        .iter()
                        .map(|u| match *i >= 64 || u.committed & (1 << i) != 0 {
                            true => Some(u.hashes[*i] as i64),
                            false if u.unknown => Some(UNKNOWN_HASH),
                            false => None,
                        })
                        .collect()
                })
                .collect();
            let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&keys, &ids];
            for h in &hashes {
                params.push(h);
            }
            tx.execute(upsert.as_str(), &params)
                .await
                .map_err(|e| self.error("committing acknowledged records", e))?;
        }
        tx.commit().await.map_err(|e| self.error("committing", e))?;
        Ok(())
    }
}

/// The warehouse diff as an operator: reads the diff query's rows (only what changed) and emits
/// what `DiffExec` emits.
#[derive(Debug)]
pub struct WarehouseDiffExec {
    state: PgState,
    run: Arc<SyncRun>,
    model: SchemaRef,
    input: Arc<dyn ExecutionPlan>,
    schema: SchemaRef,
    properties: Arc<PlanProperties>,
    metrics: ExecutionPlanMetricsSet,
}

impl WarehouseDiffExec {
    fn new(state: PgState, run: Arc<SyncRun>, model: SchemaRef) -> Self {
        let (columns, types) = state.diff_columns(&model);
        let input: Arc<dyn ExecutionPlan> = Arc::new(postgres_scan(
            Arc::clone(&state.connection),
            state.diff_sql(),
            columns,
            types,
        ));
        let schema = change_schema(&model);
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(Arc::clone(&schema)),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Final,
            Boundedness::Bounded,
        ));
        Self {
            state,
            run,
            model,
            input,
            schema,
            properties,
            metrics: ExecutionPlanMetricsSet::new(),
        }
    }
}

impl DisplayAs for WarehouseDiffExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WarehouseDiffExec: {}", describe_diff(&self.run))
    }
}

impl ExecutionPlan for WarehouseDiffExec {
    fn name(&self) -> &'static str {
        "WarehouseDiffExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>,
    ) -> DfResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn replace_children(
        self: Arc<Self>,
        _children: Vec<Arc<dyn ExecutionPlan>>,
        _options: ReplaceChildrenOptions,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    #[allow(deprecated)]
    fn with_new_children(
        self: Arc<Self>,
        _children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> DfResult<SendableRecordBatchStream> {
        let diff = DiffRun {
            state: self.state.clone(),
            run: Arc::clone(&self.run),
            model: Arc::clone(&self.model),
            schema: Arc::clone(&self.schema),
            input: Arc::clone(&self.input),
            context,
        };
        let output_rows = MetricBuilder::new(&self.metrics).output_rows(partition);
        Ok(diff_output(
            Arc::clone(&self.schema),
            diff.run(),
            output_rows,
        ))
    }
}

/// One execution of the warehouse diff.
struct DiffRun {
    state: PgState,
    run: Arc<SyncRun>,
    model: SchemaRef,
    schema: SchemaRef,
    input: Arc<dyn ExecutionPlan>,
    context: Arc<TaskContext>,
}

impl DiffRun {
    /// Long because it runs the diff query and classifies its rows as they stream in; the
    /// classification shares each batch's decoded columns.
    async fn run(self) -> DfResult<Vec<RecordBatch>> {
        let spec = self.run.spec.diff.clone();
        let (rows, null_keys, duplicates, samples) = self.state.stats().await?;
        if duplicates > 0 {
            return Err(
                duplicate_keys_error(&spec.fields[self.state.key], duplicates, &samples).into(),
            );
        }
        let mut counts = DiffCounts {
            rows,
            null_keys,
            ..Default::default()
        };
        let n = spec.fields.len();
        let stored: Vec<usize> = (0..n).filter(|i| *i != self.state.key).collect();
        let key_bit = 1u64 << self.state.key;
        let choice = crate::sync::diff::Choice::FIRST;
        let new_op = spec.new_op();
        // Model rows the diff returned that have a key (the rest of the keyed rows are unchanged).
        let mut returned = 0u64;
        let mut changes = Changes::new(n);
        let mut kept = vec![];
        let mut key_rejects = vec![];
        let nullable_model = Arc::new(Schema::new(
            self.model
                .fields()
                .iter()
                .map(|f| f.as_ref().clone().with_nullable(true))
                .collect::<Vec<_>>(),
        ));
        let mut input = self.input.execute(0, Arc::clone(&self.context))?;
        while let Some(batch) = input.next().await {
            let batch = batch?;
            let column = |i: usize| batch.column(i);
            let keys = column(n).as_string::<i32>();
            let known = column(n + 1).as_boolean();
            let pending = column(n + 2).as_boolean();
            let deleted = column(n + 3).as_boolean();
            let new_hashes: Vec<_> = (0..stored.len())
                .map(|j| column(n + 4 + j).as_primitive::<Int64Type>())
                .collect();
            let old_hashes: Vec<_> = (0..stored.len())
                .map(|j| column(n + 4 + stored.len() + j).as_primitive::<Int64Type>())
                .collect();
            let mut rows_out = vec![];
            let mut ids = vec![];
            let mut null_rows = vec![];
            for r in 0..batch.num_rows() {
                if deleted.value(r) {
                    changes.push(Op::Delete, Key::Str(keys.value(r).into()), Some(0), [], 0);
                    continue;
                }
                if keys.is_null(r) {
                    null_rows.push(r as u32);
                    continue;
                }
                returned += 1;
                let mut hashes = vec![0u64; n];
                for (j, i) in stored.iter().enumerate() {
                    hashes[*i] = new_hashes[j].value(r) as u64;
                }
                let is_known = known.value(r);
                let fields = match is_known {
                    false => spec.new_fields(choice),
                    true => spec.unknown_fields(choice),
                };
                let (op, changed) = if !is_known || pending.value(r) {
                    match (new_op, fields) {
                        (Some(op), Some(fields)) => (op, fields),
                        _ => {
                            counts.skipped += 1;
                            continue;
                        }
                    }
                } else {
                    let mut changed = 0u64;
                    for (j, i) in stored.iter().enumerate() {
                        let old = old_hashes[j];
                        if old.is_null(r) || old.value(r) != new_hashes[j].value(r) {
                            changed |= 1 << i;
                        }
                    }
                    if changed == 0 {
                        counts.unchanged += 1;
                        continue;
                    }
                    let (Some(op), Some(fields)) =
                        (spec.mode.changed_op(), spec.update_fields(choice))
                    else {
                        counts.skipped += 1;
                        continue;
                    };
                    // Only fields the UPDATE does not set changed: nothing is sent, and the new
                    // hashes are committed (see `Change::sends`).
                    match changed & fields {
                        0 => (op, 0),
                        sent => (op, sent | key_bit),
                    }
                };
                rows_out.push(r as u32);
                let id = changes.push(
                    op,
                    Key::Str(keys.value(r).into()),
                    is_known.then_some(0),
                    hashes,
                    changed,
                );
                changes[id as usize].unknown = pending.value(r);
                ids.push(id);
            }
            if rows_out.is_empty() && null_rows.is_empty() {
                continue;
            }
            // The model's fields, as the model types them.
            let fields = (0..n)
                .map(|i| cast(column(i), self.model.field(i).data_type()))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            let model_rows = RecordBatch::try_new(Arc::clone(&nullable_model), fields)?;
            if !null_rows.is_empty() {
                key_rejects.extend(null_key_rejects(&model_rows, &null_rows, &self.run)?);
            }
            if !rows_out.is_empty() {
                kept.push((
                    take_record_batch(&model_rows, &UInt32Array::from(rows_out))?,
                    ids,
                ));
            }
        }
        counts.unchanged += rows - null_keys - returned.min(rows - null_keys);
        counts.count_changes(&changes);
        emit_changes(
            &self.run,
            &self.schema,
            &self.model,
            kept,
            changes,
            counts,
            key_rejects,
        )
        .await
    }
}
