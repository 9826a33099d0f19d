//! The engine: a DataFusion session plus sluice's connections, executing one statement at a time.
//!
//! The same engine serves the REPL, `sluice run`, `sluice check` and the library API.

mod alerts;
mod discover;
mod insert;
mod outcome;
mod service;
mod sync;

use std::sync::Arc;
use std::time::Instant;

use datafusion::arrow::array::{ArrayRef, StringArray, UInt64Array};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::catalog::{CatalogProvider, MemorySchemaProvider, SchemaProvider};
use datafusion::datasource::source_as_provider;
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::cache::cache_manager::CacheManagerConfig;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::logical_expr::{DdlStatement, LogicalPlan, LogicalPlanBuilder, WriteOp};
use datafusion::physical_plan::{ExecutionPlan, collect};
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast::Statement as SqlStatement;

pub use alerts::{ALERT_OPTIONS, glob_match};
pub use discover::{OPTION_COLUMNS, option_row};
pub use outcome::{DryRunReport, Outcome, WriteSummary, format_duration};
pub use sync::SyncContext;

use crate::connections::{ConnectContext, ConnectionInfo, Connections};
use crate::connectors::{DestinationSchema, DestinationTable, WriteReport, kinds};
use crate::error::{Error, Result, did_you_mean};
use crate::object_stores::EnvObjectStoreRegistry;
use crate::parser::{CreateConnection, ParsedStatement, Statement, parse_sql};
use crate::sync::tables::{StateTable, StateTableKind};
use crate::sync::{StateStore, SyncRun};

/// The schema sluice's own tables live under (`sluice.runs`, `sluice.rejects`).
pub const SLUICE_SCHEMA: &str = "sluice";

/// Whether statements run, or are only planned (`sluice check`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Execute everything.
    Run,
    /// Parse and plan everything; execute session DDL (connections, external tables, views) so
    /// later statements can be planned, and execute no query and no write.
    Check,
    /// Run everything except writes: syncs report what they would send (reading their state,
    /// changing nothing); other writes are skipped.
    DryRun,
}

/// A DataFusion session with sluice's statements, connections and destinations.
pub struct Engine {
    ctx: SessionContext,
    /// The default catalog itself (the context's view of it is wrapped by `enable_url_table`,
    /// which cannot deregister schemas).
    catalog: Arc<dyn CatalogProvider>,
    connections: Connections,
    /// Where sync state, run records and rejects live.
    state: StateStore,
    /// The schema holding `sluice.runs` and `sluice.rejects`.
    sluice_schema: Arc<MemorySchemaProvider>,
    syncs: sync::SyncDefs,
    /// What DROP CONNECTION calls, per connection that registered a hook.
    on_drop: std::sync::Mutex<std::collections::HashMap<String, Box<dyn FnOnce() + Send + Sync>>>,
    /// `sluice run --sample n`: every sync this session runs sends only a sample.
    sample: Option<crate::contract::Sample>,
    alerts: alerts::Alerts,
}

/// The row a failed run would have had in `sluice.runs` when it failed before recording one
/// (its plan failed: a source that cannot be reached, a table gone), for its alerts.
fn unrecorded_failure(
    name: &str,
    run_id: Option<String>,
    e: &Error,
) -> crate::sync::state::RunRecord {
    let now = crate::sync::state::now();
    crate::sync::state::RunRecord {
        run_id: run_id.unwrap_or_else(crate::sync::run::new_run_id),
        sync: name.to_string(),
        started_at: now.clone(),
        finished_at: Some(now),
        status: "failed".into(),
        error: Some(e.to_string()),
        ..Default::default()
    }
}

/// A statement planned and ready to execute.
pub(crate) struct Planned {
    plan: LogicalPlan,
    /// For writes into a destination: where the sink reports what it did.
    report: Option<Arc<WriteReport>>,
    /// For writes into a destination: (connection, object, mapped fields).
    writes: Option<(String, String, SchemaRef)>,
    /// For syncs: the run.
    sync: Option<Arc<SyncRun>>,
}

impl Engine {
    /// A new session with every connection kind sluice has and object stores configured from
    /// the environment.
    pub fn new() -> Result<Self> {
        // No list-files cache: its default TTL is infinite, so a file destination read after a
        // write (or a source folder that gained files) would silently miss the new files.
        let runtime = RuntimeEnvBuilder::new()
            .with_object_store_registry(Arc::new(EnvObjectStoreRegistry::new()))
            .with_cache_manager(CacheManagerConfig::default().with_list_files_cache_limit(0))
            .build_arc()?;
        let config = SessionConfig::new()
            .with_information_schema(true)
            .with_create_default_catalog_and_schema(true);
        let state = SessionStateBuilder::new()
            .with_config(config)
            .with_runtime_env(runtime)
            .with_default_features()
            .build();
        let ctx = SessionContext::new_with_state(state);
        let catalog_name = ctx
            .state()
            .config()
            .options()
            .catalog
            .default_catalog
            .clone();
        let catalog = ctx.catalog(&catalog_name).ok_or_else(|| {
            Error::plan(
                format!("default catalog '{catalog_name}' is missing"),
                catalog_name,
            )
        })?;
        let sluice_schema = Arc::new(MemorySchemaProvider::new());
        catalog.register_schema(SLUICE_SCHEMA, Arc::clone(&sluice_schema) as _)?;
        let mut engine = Self {
            ctx: ctx.enable_url_table(),
            catalog,
            connections: Connections::new(kinds()),
            state: StateStore::local(std::path::Path::new(".sluice"))?,
            sluice_schema,
            syncs: Default::default(),
            on_drop: Default::default(),
            sample: None,
            alerts: Default::default(),
        };
        engine.set_state(engine.state.clone())?;
        Ok(engine)
    }

    /// Keeps sync state at `state` (default: `.sluice` in the working directory).
    /// Makes every sync this session runs a sample run (`sluice run --sample n`): only `sample`
    /// of its records are sent and committed.
    pub fn set_sample(&mut self, sample: Option<crate::contract::Sample>) {
        self.sample = sample;
    }

    pub fn set_state(&mut self, state: StateStore) -> Result<()> {
        for (name, kind) in [
            ("runs", StateTableKind::Runs),
            ("rejects", StateTableKind::Rejects),
            ("alerts", StateTableKind::Alerts),
        ] {
            self.sluice_schema.deregister_table(name)?;
            self.sluice_schema.register_table(
                name.to_string(),
                Arc::new(StateTable::new(state.clone(), kind)),
            )?;
        }
        self.sluice_schema.deregister_table("changes")?;
        self.sluice_schema.register_table(
            "changes".to_string(),
            Arc::new(crate::sync::changelog::ChangesTable::new(state.clone())),
        )?;
        self.state = state;
        Ok(())
    }

    /// Keeps sync state at `location`: a directory, or an object store URL (`s3://…`).
    pub fn set_state_location(&mut self, location: &str) -> Result<()> {
        let state = StateStore::at(
            location,
            self.ctx.runtime_env().object_store_registry.as_ref(),
        )?;
        self.set_state(state)
    }

    /// Where sync state lives.
    pub fn state_location(&self) -> &str {
        self.state.display()
    }

    /// Adds a connection kind (a destination or source type) to this session.
    pub fn register_kind(&mut self, kind: Arc<dyn crate::connections::ConnectorKind>) {
        self.connections.add_kind(kind);
    }

    /// The underlying DataFusion context (to register tables or functions from Rust).
    pub fn context(&self) -> &SessionContext {
        &self.ctx
    }

    /// The live connections.
    pub fn connections(&self) -> Vec<ConnectionInfo> {
        self.connections.list()
    }

    /// Parses and runs every statement in `sql`, returning each statement's outcome.
    pub async fn run_sql(&self, sql: &str) -> Result<Vec<Outcome>> {
        let mut outcomes = vec![];
        for statement in parse_sql(sql)? {
            outcomes.push(self.execute(&statement, Mode::Run).await?);
        }
        Ok(outcomes)
    }

    /// Executes (or, in [`Mode::Check`], plans) one parsed statement. Dropping the returned
    /// future cancels the statement; a write that has not completed leaves nothing visible.
    pub async fn execute(&self, statement: &ParsedStatement, mode: Mode) -> Result<Outcome> {
        match &statement.statement {
            Statement::CreateConnection(create) => self.create_connection(create, mode).await,
            Statement::DropConnection { name, if_exists } => self.drop_connection(name, *if_exists),
            Statement::ShowConnections => self.show_connections(),
            Statement::ShowConnectionTypes => self.show_connection_types(),
            Statement::DescribeConnectionType { kind } => self.describe_connection_type(kind),
            Statement::ShowObjects { connection } => {
                if mode == Mode::Check {
                    return Ok(Outcome::Checked);
                }
                self.show_objects(connection).await
            }
            Statement::CreateSync(create) => self.create_sync(create).await,
            Statement::RunSync { name, sample } => {
                self.run_sync(name, sample.clone(), None, mode).await
            }
            Statement::ExplainSync { name } => {
                let def = self.sync_def(name)?;
                let context = SyncContext {
                    name: Some(name.clone()),
                    options: def.options.clone(),
                    dry_run: true,
                    sample: None,
                    run_id: None,
                };
                let planned = self.plan_sync_body(name, &def.body, &context).await?;
                if mode == Mode::Check {
                    return Ok(Outcome::Checked);
                }
                self.execute_planned(planned, Mode::DryRun).await
            }
            Statement::ResetSync { name } => {
                if mode != Mode::Run {
                    return Ok(Outcome::Checked);
                }
                self.reset_sync(name).await
            }
            Statement::DropSync { name, if_exists } => self.drop_sync(name, *if_exists),
            Statement::ShowSyncs => self.show_syncs().await,
            Statement::CreateAlert(create) => self.create_alert(create),
            Statement::DropAlert { name, if_exists } => self.drop_alert(name, *if_exists),
            Statement::ShowAlerts => self.show_alerts().await,
            Statement::Sql(sql) => {
                let context = SyncContext {
                    dry_run: mode == Mode::DryRun,
                    sample: self.sample.clone(),
                    ..Default::default()
                };
                let planned = self.plan(sql, &context).await?;
                self.execute_planned(planned, mode).await
            }
        }
    }

    /// `RUN SYNC name`, as run `run_id` when given.
    pub async fn run_sync(
        &self,
        name: &str,
        sample: Option<crate::contract::Sample>,
        run_id: Option<String>,
        mode: Mode,
    ) -> Result<Outcome> {
        let def = self.sync_def(name)?;
        let context = SyncContext {
            name: Some(name.to_string()),
            options: def.options.clone(),
            dry_run: mode == Mode::DryRun,
            sample: sample.or_else(|| self.sample.clone()),
            run_id,
        };
        // Alerts follow real runs of the whole sync (not dry, checked or sample runs) that an
        // alert watches.
        let alerting = mode == Mode::Run && context.sample.is_none() && self.alerts_watch(name);
        let planned = match self.plan_sync_body(name, &def.body, &context).await {
            Ok(planned) => planned,
            Err(e) => {
                if alerting {
                    self.evaluate_alerts(&unrecorded_failure(name, context.run_id, &e))
                        .await;
                }
                return Err(e);
            }
        };
        if mode == Mode::Check {
            return Ok(Outcome::Checked);
        }
        let run_id = planned.sync.as_ref().map(|r| r.run_id.clone());
        let result = self.execute_planned(planned, mode).await;
        if alerting && !matches!(result, Err(Error::Cancelled)) {
            let recorded = match &run_id {
                Some(id) => self.run_record(name, id).await.ok().flatten(),
                None => None,
            };
            let record = match (recorded, &result) {
                (Some(r), _) => Some(r),
                (None, Err(e)) => Some(unrecorded_failure(name, run_id, e)),
                (None, Ok(_)) => None,
            };
            if let Some(record) = record {
                self.evaluate_alerts(&record).await;
            }
        }
        result
    }

    /// When the named sync's last recorded run started, if it ever ran.
    pub async fn last_run_started(
        &self,
        name: &str,
    ) -> Result<Option<chrono::DateTime<chrono::Utc>>> {
        Ok(self
            .state
            .last_run(name)
            .await?
            .and_then(|r| chrono::DateTime::parse_from_rfc3339(&r.started_at).ok())
            .map(|t| t.with_timezone(&chrono::Utc)))
    }

    /// The session's named syncs and their schedules, by name.
    pub fn schedules(&self) -> Vec<(String, Option<crate::parser::Schedule>)> {
        self.syncs
            .lock()
            .expect("syncs lock")
            .iter()
            .map(|(name, def)| (name.clone(), def.schedule.clone()))
            .collect()
    }

    async fn create_connection(&self, create: &CreateConnection, mode: Mode) -> Result<Outcome> {
        let name = &create.name;
        let kind = self.connections.kind(&create.kind)?;
        let options =
            crate::options::Options::new(kind.kind(), kind.options(), create.options.clone())?;
        let catalog = &self.catalog;
        if self.connections.get(name).is_some() {
            if create.if_not_exists {
                return Ok(Outcome::Done(format!(
                    "connection {name} already exists; left unchanged"
                )));
            }
            if !create.or_replace {
                return Err(Error::ConnectionExists { name: name.clone() });
            }
        } else if catalog.schema(name).is_some() {
            return Err(Error::plan(
                format!(
                    "'{name}' is already a schema of this session; choose another connection name"
                ),
                name.clone(),
            ));
        }
        let connected = kind.connect(
            name,
            &options,
            &ConnectContext {
                runtime: self.ctx.runtime_env(),
            },
        )?;
        if let Some(load) = connected.load
            && mode != Mode::Check
        {
            load.await?;
        }
        if let Some(old) = self.on_drop.lock().expect("on_drop lock").remove(name) {
            old();
        }
        catalog.register_schema(name, connected.schema)?;
        if let Some(databases) = connected.catalog {
            self.ctx.register_catalog(name, databases);
        }
        if let Some(hook) = connected.on_drop {
            self.on_drop
                .lock()
                .expect("on_drop lock")
                .insert(name.clone(), hook);
        }
        self.connections.insert(ConnectionInfo {
            name: name.clone(),
            kind: kind.kind().to_string(),
            options: options.redacted(),
        });
        Ok(Outcome::Done(format!(
            "CREATE CONNECTION {name} (type {})",
            kind.kind()
        )))
    }

    fn drop_connection(&self, name: &str, if_exists: bool) -> Result<Outcome> {
        if self.connections.get(name).is_none() {
            if if_exists {
                return Ok(Outcome::Done(format!(
                    "connection {name} does not exist; nothing dropped"
                )));
            }
            return Err(self.unknown_connection(name));
        }
        self.catalog.deregister_schema(name, true)?;
        if let Some(hook) = self.on_drop.lock().expect("on_drop lock").remove(name) {
            hook();
        }
        self.connections.remove(name);
        Ok(Outcome::Done(format!("DROP CONNECTION {name}")))
    }

    fn unknown_connection(&self, name: &str) -> Error {
        let names: Vec<String> = self
            .connections
            .list()
            .into_iter()
            .map(|c| c.name)
            .collect();
        let hint = match did_you_mean(name, names.iter().map(String::as_str)) {
            h if !h.is_empty() => h,
            _ if names.is_empty() => "; no connections exist yet: CREATE CONNECTION first".into(),
            _ => format!("; connections: {}", names.join(", ")),
        };
        Error::UnknownConnection {
            name: name.to_string(),
            hint,
        }
    }

    fn show_connections(&self) -> Result<Outcome> {
        let rows = self
            .connections
            .list()
            .into_iter()
            .map(|c| vec![Some(c.name), Some(c.kind), Some(c.options)])
            .collect();
        discover::text_rows(&["name", "type", "options"], rows)
    }

    /// Plans a destination write (INSERT, MERGE, DELETE) as sluice does; `None` for anything
    /// else.
    async fn plan_destination_write(
        &self,
        statement: &SqlStatement,
        sync: &SyncContext,
    ) -> Result<Option<Planned>> {
        match statement {
            SqlStatement::Insert(insert) => self.plan_destination_insert(insert, sync).await,
            SqlStatement::Merge(merge) => self.plan_destination_merge(merge, sync).await,
            SqlStatement::Delete(delete) => self.plan_destination_delete(delete, sync).await,
            _ => Ok(None),
        }
    }

    async fn plan(&self, statement: &DFStatement, sync: &SyncContext) -> Result<Planned> {
        match statement {
            DFStatement::Statement(s) => {
                if let Some(planned) = self.plan_destination_write(s, sync).await? {
                    return Ok(planned);
                }
            }
            DFStatement::Explain(explain) => {
                if let DFStatement::Statement(s) = explain.statement.as_ref()
                    && let Some(planned) = self.plan_destination_write(s, sync).await?
                {
                    let plan = LogicalPlanBuilder::from(planned.plan)
                        .explain(explain.options.verbose, explain.options.analyze)?
                        .build()?;
                    // EXPLAIN ANALYZE runs the sync; plain EXPLAIN only plans it.
                    return Ok(Planned {
                        plan,
                        report: planned.report,
                        writes: None,
                        sync: planned.sync.filter(|_| explain.options.analyze),
                    });
                }
            }
            _ => {}
        }
        let plan = self
            .ctx
            .state()
            .statement_to_plan(statement.clone())
            .await?;
        self.refuse_unsupported_destination_dml(&plan)?;
        Ok(Planned {
            plan,
            report: None,
            writes: None,
            sync: None,
        })
    }

    /// DELETE / UPDATE / MERGE / TRUNCATE on a destination object are not planned here (yet):
    /// refuse them before DataFusion calls a hook that could widen them.
    fn refuse_unsupported_destination_dml(&self, plan: &LogicalPlan) -> Result<()> {
        let LogicalPlan::Dml(dml) = plan else {
            return Ok(());
        };
        let provider = source_as_provider(&dml.target)?;
        if let Some(table) = provider.downcast_ref::<DestinationTable>()
            && !matches!(dml.op, WriteOp::Insert(_))
        {
            {
                return Err(Error::plan(
                    format!(
                        "{} on {} is not supported; destinations accept INSERT INTO, MERGE INTO and DELETE FROM … WHERE key IN (…)",
                        dml.op.name().to_uppercase(),
                        dml.table_name
                    ),
                    table.object().name.clone(),
                ));
            }
        }
        Ok(())
    }

    /// Long because it is the one place a planned statement runs: a sync's lock and state,
    /// execution, the commit, and the outcome of each kind of statement.
    async fn execute_planned(&self, planned: Planned, mode: Mode) -> Result<Outcome> {
        let started = Instant::now();
        let Planned {
            plan,
            report,
            writes,
            sync,
        } = planned;
        let session_change = matches!(plan, LogicalPlan::Ddl(_) | LogicalPlan::Statement(_));
        if mode == Mode::Check && !session_change {
            // Physical planning validates the whole statement; DML hooks only build plans.
            self.ctx.state().create_physical_plan(&plan).await?;
            if let Some((connection, object, fields)) = writes
                && let Some(schema) = self.catalog.schema(&connection)
                && let Some(destination) = schema.downcast_ref::<DestinationSchema>()
            {
                destination.plan_object(&object, fields);
            }
            return Ok(Outcome::Checked);
        }
        if let LogicalPlan::DescribeTable(d) = &plan
            && let Some(batch) = describe_destination_fields(&d.schema)?
        {
            return Ok(Outcome::Rows {
                schema: batch.schema(),
                batches: vec![batch],
            });
        }
        if session_change {
            let message = describe_session_change(&plan);
            self.ctx.execute_logical_plan(plan).await?.collect().await?;
            return Ok(Outcome::Done(message));
        }
        let write_target = match &plan {
            LogicalPlan::Dml(dml) => Some((dml_verb(&dml.op), dml.table_name.to_string())),
            LogicalPlan::Copy(copy) => Some(("COPY".to_string(), copy.output_url.clone())),
            _ => None,
        };
        if mode == Mode::DryRun
            && sync.is_none()
            && let Some((verb, target)) = &write_target
        {
            return Ok(Outcome::Done(format!(
                "DRY RUN: {verb} {target} is not a sync (it writes every row each time); skipped"
            )));
        }
        if let Some(run) = &sync {
            run.prepare().await?;
        }
        let result = async {
            let dataframe = self.ctx.execute_logical_plan(plan).await?;
            let schema = Arc::new(dataframe.schema().as_arrow().clone());
            let physical = dataframe.create_physical_plan().await?;
            let batches = collect(Arc::clone(&physical), self.ctx.task_ctx()).await?;
            Ok::<_, Error>((schema, physical, batches))
        }
        .await;
        let (rows_read_n, run_summary, rejects) = match &sync {
            Some(run) => {
                let report = report.as_ref().expect("sync writes have a report");
                let summary = run
                    .finish(
                        report.take_acked(),
                        report.take_rejects(),
                        report.delivery(),
                        result.as_ref().err(),
                    )
                    .await?;
                if run.dry_run && result.is_ok() {
                    return Ok(Outcome::DryRun(Box::new(DryRunReport {
                        sync: run.spec.label().to_string(),
                        target: run.spec.target.clone(),
                        mode: run.spec.diff.mode,
                        key: run.spec.key_name().map(str::to_string),
                        counts: summary.counts,
                        plan: report.dry_run().unwrap_or_default(),
                        rejected: summary.rejects.len() as u64,
                        rate_limit: run.spec.pacing.0,
                        concurrency: run.spec.pacing.1,
                        refusal: run.refusal(),
                        clauses: crate::sync::exec::clause_fields(&run.spec.diff),
                        change_log: run.spec.options.changes_retention.map(|kept| {
                            format!(
                                "each record sent is kept {} in sluice.changes ({})",
                                crate::sync::changelog::shown_retention(kept),
                                run.changes_location()
                            )
                        }),
                    })));
                }
                (
                    Some(summary.counts.rows),
                    Some(summary.clone()),
                    summary.rejects,
                )
            }
            None => (
                None,
                None,
                report
                    .as_ref()
                    .map(|r| r.take_rejects())
                    .unwrap_or_default(),
            ),
        };
        let exchanges = report
            .as_ref()
            .map(|r| r.take_exchanges())
            .unwrap_or_default();
        let (schema, physical, batches) = match result {
            Ok(done) => done,
            // A sample run that failed shows what it sent and what it was told.
            Err(e) if !exchanges.is_empty() => {
                return Err(Error::Write {
                    message: format!(
                        "{e}\n  the requests and answers of this sample run:\n{}",
                        outcome::indented(&exchanges)
                    ),
                });
            }
            Err(e) => return Err(e),
        };
        let Some((verb, target)) = write_target else {
            return Ok(Outcome::Rows { schema, batches });
        };
        let rows_written = batches
            .iter()
            .filter_map(|b| b.column(0).as_any().downcast_ref::<UInt64Array>())
            .map(|a| a.iter().flatten().sum::<u64>())
            .sum();
        let mut locations = report.as_ref().map(|r| r.locations()).unwrap_or_default();
        if verb == "COPY" {
            locations.push(target.clone());
        }
        let verb = match &sync {
            Some(run) => run.spec.diff.mode.verb().map_or(verb, str::to_string),
            None => verb,
        };
        Ok(Outcome::Write(Box::new(WriteSummary {
            verb,
            target,
            rows_read: rows_read_n.unwrap_or_else(|| rows_read(&physical)),
            rows_written,
            rows_rejected: rejects.len() as u64,
            locations,
            elapsed: started.elapsed(),
            delivery: report.as_ref().and_then(|r| r.delivery()),
            rejects,
            sync: run_summary,
            exchanges,
        })))
    }

    /// Words for tab completion: connections, tables and objects (`schema.table`) and their
    /// columns.
    pub async fn completion_words(&self) -> Vec<String> {
        let mut words = vec![];
        let catalog = &self.catalog;
        for schema_name in catalog.schema_names() {
            if schema_name == "information_schema" {
                continue;
            }
            let Some(schema) = catalog.schema(&schema_name) else {
                continue;
            };
            let is_default = schema_name == "public";
            if !is_default {
                words.push(schema_name.clone());
            }
            for table in schema.table_names() {
                words.push(if is_default {
                    table.clone()
                } else {
                    format!("{schema_name}.{table}")
                });
                // What a database connection already knows, else a lookup.
                let known = schema
                    .downcast_ref::<DestinationSchema>()
                    .and_then(|s| s.known_fields(&table));
                let fields = match known {
                    Some(fields) => Some(fields),
                    None => match schema.table(&table).await {
                        Ok(Some(provider)) => Some(provider.schema()),
                        _ => None,
                    },
                };
                if let Some(fields) = fields {
                    words.extend(fields.fields().iter().map(|f| f.name().clone()));
                }
            }
        }
        // Connections with schemas of their own (databases): `conn.schema.table`, from what the
        // connection already knows (no lookup per table).
        for connection in self.connections.list() {
            let Some(databases) = self.ctx.catalog(&connection.name) else {
                continue;
            };
            for schema_name in databases.schema_names() {
                if schema_name == "information_schema" {
                    continue;
                }
                let Some(schema) = databases.schema(&schema_name) else {
                    continue;
                };
                for table in schema.table_names() {
                    words.push(format!("{}.{schema_name}.{table}", connection.name));
                }
            }
        }
        words.extend(self.syncs.lock().expect("syncs").keys().cloned());
        words.sort();
        words.dedup();
        words
    }
}

/// Rows the statement's sources produced: the output of the plan's leaves.
fn rows_read(plan: &Arc<dyn ExecutionPlan>) -> u64 {
    let children = plan.children();
    if children.is_empty() {
        return plan.metrics().and_then(|m| m.output_rows()).unwrap_or(0) as u64;
    }
    children.into_iter().map(rows_read).sum()
}

fn dml_verb(op: &WriteOp) -> String {
    match op {
        WriteOp::Insert(_) => "INSERT INTO".into(),
        other => other.name().to_uppercase(),
    }
}

/// A psql-style tag for statements that change the session.
fn describe_session_change(plan: &LogicalPlan) -> String {
    match plan {
        LogicalPlan::Ddl(ddl) => match ddl {
            DdlStatement::CreateExternalTable(t) => format!("CREATE EXTERNAL TABLE {}", t.name),
            DdlStatement::CreateMemoryTable(t) => format!("CREATE TABLE {}", t.name),
            DdlStatement::CreateView(v) => format!("CREATE VIEW {}", v.name),
            DdlStatement::CreateCatalogSchema(s) => format!("CREATE SCHEMA {}", s.schema_name),
            DdlStatement::CreateCatalog(c) => format!("CREATE DATABASE {}", c.catalog_name),
            DdlStatement::DropTable(t) => format!("DROP TABLE {}", t.name),
            DdlStatement::DropView(v) => format!("DROP VIEW {}", v.name),
            other => other.name().to_uppercase(),
        },
        LogicalPlan::Statement(s) => s.name().to_uppercase(),
        other => other.display().to_string(),
    }
}

/// `DESCRIBE conn.object` of a destination whose fields carry what the destination says about
/// them (its type, read-only, unique, allowed values): DataFusion's three columns and those.
fn describe_destination_fields(schema: &Schema) -> Result<Option<RecordBatch>> {
    use crate::connectors::field_meta;
    use datafusion::arrow::array::BooleanArray;
    let fields = schema.fields();
    if !fields
        .iter()
        .any(|f| f.metadata().contains_key(field_meta::TYPE))
    {
        return Ok(None);
    }
    let text = |f: &dyn Fn(&Field) -> Option<String>| -> ArrayRef {
        Arc::new(fields.iter().map(|x| f(x)).collect::<StringArray>())
    };
    let flag = |key: &'static str| -> ArrayRef {
        Arc::new(
            fields
                .iter()
                .map(|f| Some(f.metadata().contains_key(key)))
                .collect::<BooleanArray>(),
        )
    };
    let mut out = vec![
        Field::new("column_name", DataType::Utf8, false),
        Field::new("data_type", DataType::Utf8, false),
        Field::new("destination_type", DataType::Utf8, true),
        Field::new("read_only", DataType::Boolean, false),
        Field::new("unique", DataType::Boolean, false),
        Field::new("options", DataType::Utf8, true),
    ];
    let mut columns = vec![
        text(&|f| Some(f.name().clone())),
        text(&|f| Some(f.data_type().to_string())),
        text(&|f| f.metadata().get(field_meta::TYPE).cloned()),
        flag(field_meta::READ_ONLY),
        flag(field_meta::UNIQUE),
        text(&|f| {
            let values: Vec<String> =
                serde_json::from_str(f.metadata().get(field_meta::OPTIONS)?).ok()?;
            Some(values.join(", "))
        }),
    ];
    // Destinations that say more about a field (Salesforce's describe) get more columns.
    if fields
        .iter()
        .any(|f| f.metadata().contains_key(field_meta::CREATEABLE))
    {
        for (name, key) in [
            ("nillable", field_meta::NILLABLE),
            ("createable", field_meta::CREATEABLE),
            ("updateable", field_meta::UPDATEABLE),
        ] {
            out.push(Field::new(name, DataType::Boolean, true));
            columns.push(Arc::new(
                fields
                    .iter()
                    .map(|f| f.metadata().get(key).map(|v| v == "true"))
                    .collect::<BooleanArray>(),
            ));
        }
        out.push(Field::new("length", DataType::Int64, true));
        columns.push(Arc::new(
            fields
                .iter()
                .map(|f| f.metadata().get(field_meta::LENGTH)?.parse::<i64>().ok())
                .collect::<datafusion::arrow::array::Int64Array>(),
        ));
    }
    Ok(Some(RecordBatch::try_new(
        Arc::new(Schema::new(out)),
        columns,
    )?))
}
