//! Connectors: one folder per system sluice reads or writes, and the seam between a planned
//! sync and that system. [`kinds`] is the one list of them.
//!
//! A connection is a schema (`conn.object`); each object is a [`DestinationTable`], a DataFusion
//! `TableProvider` that reads where the system can be read and whose `insert_into` builds a
//! `DataSinkExec` over the connector's sink. The engine plans the mapping from the query to the
//! object's fields **by name** (see `engine::insert`) and hands the table a narrowed schema
//! holding only the mapped fields, so an unmapped field never reaches the sink and is never
//! blanked. Sinks do all I/O in `write_all`, never while planning (DataFusion plans DML under
//! `EXPLAIN` too). In a sync the sink reads its rows as a [`crate::contract::ChangeBatch`].
//!
//! Every folder has the same roles (docs/src/architecture.md draws the whole path):
//!
//! | file | role |
//! | --- | --- |
//! | `mod.rs` | docs with a SQL example; the `ConnectorKind` (`TYPE name`) and the [`Destination`] |
//! | `config.rs` | its own `OPTIONS` (the shared delivery options come from `delivery::settings`) and their typed values |
//! | `api.rs` | the connection every statement shares (client, limiter); an HTTP connector's `HttpService` and `ControlPlane` |
//! | `retry.rs` | how an HTTP connector reads answers: accepted, rejected per record, retry, fatal |
//! | `sink.rs` | the `DataSink`: open a delivery `Session`, encode, deliver, close the [`WriteReport`] |
//! | `encode.rs` | records in the system's wire shape (when `delivery::encode` is not enough) |
//! | `source.rs` | a connector that can be read: its `TableProvider` |
//!
//! and its own extras: `hubspot/lists.rs` (list memberships), `salesforce/auth.rs` (OAuth) and
//! `bulk.rs` (Bulk API 2.0), `postgres/metadata.rs`, `types.rs`, `transaction.rs` and
//! `warehouse.rs` (its [`WarehouseDiff`]). Postgres is not HTTP: its `metadata.rs` plays the
//! part of `api.rs`. `webhook/` is the smallest HTTP connector and the one to copy.

pub mod file;
pub mod hubspot;
pub mod notice;
pub mod paged;
pub mod postgres;
pub mod salesforce;
mod schema;
pub mod slack;
mod table;
pub mod typed;
pub mod webhook;

use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::TableProvider;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::datasource::sink::DataSink;
use datafusion::datasource::source_as_provider;
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_plan::metrics::ExecutionPlanMetricsSet;

use crate::connections::ConnectorKind;
use crate::contract::{Ack, Rejected};
use crate::delivery::metrics::DeliveryStats;
use crate::delivery::{Delivered, DryRun, Session};
use crate::error::{Error, Result};
use crate::sync::SyncRun;
use crate::sync::remote::WarehouseDiff;

pub use schema::DestinationSchema;
pub use table::DestinationTable;

/// Every connection kind sluice has: the one list to add a connector to.
pub fn kinds() -> Vec<Arc<dyn ConnectorKind>> {
    vec![
        Arc::new(file::FileConnector),
        Arc::new(webhook::WebhookConnector),
        Arc::new(hubspot::HubspotConnector),
        Arc::new(salesforce::SalesforceConnector),
        Arc::new(postgres::PostgresConnector),
        Arc::new(slack::SlackConnector),
    ]
}

/// The warehouse diff of the connection whose tables `model` reads (`diff 'warehouse'`); the
/// connector checks the rest of the model itself.
pub fn warehouse_diff(model: &LogicalPlan) -> Result<Arc<dyn WarehouseDiff>> {
    let mut first: Option<String> = None;
    let mut found: Option<Arc<dyn WarehouseDiff>> = None;
    model
        .apply_with_subqueries(|node| {
            if let LogicalPlan::TableScan(scan) = node {
                first.get_or_insert_with(|| scan.table_name.to_string());
                found = source_as_provider(&scan.source)
                    .ok()
                    .and_then(|p| p.downcast_ref::<DestinationTable>()?.warehouse_diff());
                if found.is_some() {
                    return Ok(TreeNodeRecursion::Stop);
                }
            }
            Ok(TreeNodeRecursion::Continue)
        })
        .map_err(Error::from)?;
    found.ok_or_else(|| {
        Error::plan(
            match first {
                Some(name) => format!(
                    "{name} is not a Postgres table; the model of a diff 'warehouse' sync runs in the database it reads (Postgres today), so it may only read that database's tables"
                ),
                None => "diff 'warehouse' runs the model in the database it reads, and this model reads no table; drop the option".to_string(),
            },
            "diff".to_string(),
        )
    })
}

/// The tables `model` reads (scans in it and its subqueries), by name as the model names them.
pub fn model_inputs(model: &LogicalPlan) -> Vec<(String, Arc<dyn TableProvider>)> {
    let mut inputs: Vec<(String, Arc<dyn TableProvider>)> = vec![];
    let _ = model.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node
            && let Ok(provider) = source_as_provider(&scan.source)
        {
            let name = scan.table_name.to_string();
            if !inputs.iter().any(|(n, _)| *n == name) {
                inputs.push((name, provider));
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    inputs
}

/// The one Postgres connection `inputs` read (`ON NOTIFY` listens there and `change_query`
/// runs there); `what` names the feature in the error.
fn postgres_of(
    inputs: &[(String, Arc<dyn TableProvider>)],
    what: &str,
) -> Result<Arc<postgres::PgConnection>> {
    let mut found: Vec<Arc<postgres::PgConnection>> = vec![];
    for (_, provider) in inputs {
        let reader = match provider.downcast_ref::<DestinationTable>() {
            Some(table) => table.reader().cloned(),
            None => Some(Arc::clone(provider)),
        };
        if let Some((connection, _)) = reader.as_deref().and_then(postgres::source_of)
            && !found.iter().any(|c| c.name == connection.name)
        {
            found.push(connection);
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(Error::plan(
            format!("{what} needs a model that reads a Postgres connection; this one reads none"),
            what.to_string(),
        )),
        _ => Err(Error::plan(
            format!(
                "{what}: the model reads several Postgres connections ({}); it works with one",
                found
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            what.to_string(),
        )),
    }
}

/// What `SCHEDULE ON CHANGE` checks for `model`: its `change_query` on its Postgres
/// connection, or each input's own probe (Postgres counters, a file folder's listing).
pub fn change_probe(
    model: &LogicalPlan,
    ctx: &datafusion::prelude::SessionContext,
    change_query: Option<&str>,
) -> Result<Arc<dyn crate::watch::ChangeProbe>> {
    let inputs = model_inputs(model);
    if let Some(query) = change_query {
        let connection = postgres_of(&inputs, "change_query")?;
        return Ok(Arc::new(postgres::watch::QueryProbe {
            connection,
            query: query.to_string(),
        }));
    }
    if inputs.is_empty() {
        return Err(Error::plan(
            "SCHEDULE ON CHANGE: the model reads no table, so nothing can change; use SCHEDULE EVERY",
            "ON CHANGE",
        ));
    }
    let mut probes: Vec<Arc<dyn crate::watch::ChangeProbe>> = vec![];
    for (name, provider) in inputs {
        let reader = match provider.downcast_ref::<DestinationTable>() {
            Some(table) => table.reader().cloned(),
            None => Some(Arc::clone(&provider)),
        };
        let reader = reader.as_deref();
        if let Some((connection, relation)) = reader.and_then(postgres::source_of) {
            if !matches!(relation.kind, 'r' | 'p' | 'm') {
                return Err(Error::plan(
                    format!(
                        "SCHEDULE ON CHANGE cannot watch {name}: it is a view, and Postgres counts changes of tables only; set the sync's change_query option (e.g. 'SELECT max(updated_at) FROM …')"
                    ),
                    name,
                ));
            }
            probes.push(Arc::new(postgres::watch::CountersProbe {
                connection,
                relation: relation.qualified(),
                table: name,
            }));
        } else if let Some(listing) =
            reader.and_then(|r| r.downcast_ref::<datafusion::datasource::listing::ListingTable>())
        {
            probes.push(Arc::new(crate::watch::FilesProbe {
                table: name,
                urls: listing.table_paths().clone(),
                ctx: ctx.clone(),
            }));
        } else {
            return Err(Error::plan(
                format!(
                    "SCHEDULE ON CHANGE cannot watch {name}: only Postgres tables and files are watched; use SCHEDULE EVERY, or a change_query on the model's Postgres connection"
                ),
                name,
            ));
        }
    }
    Ok(Arc::new(crate::watch::AllOf(probes)))
}

/// The payloads of NOTIFY on `channel` in the Postgres database `model` reads.
pub async fn listen(
    model: &LogicalPlan,
    channel: &str,
) -> Result<futures::stream::BoxStream<'static, String>> {
    let connection = postgres_of(&model_inputs(model), "SCHEDULE ON NOTIFY")?;
    postgres::watch::listen(&connection, channel).await
}

/// An alert's notice: what happened, for people (`text`) and for programs (`details`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Notice {
    pub alert: String,
    pub sync: String,
    /// fired | repeated | resolved
    pub event: String,
    /// One line for people (Slack's message, a webhook's `text`).
    pub text: String,
    /// The run's `sluice.runs` row, the top reject codes and the status page's link.
    pub details: serde_json::Value,
}

/// Delivers alert notices (see [`Destination::notifier`]).
#[async_trait]
pub trait Notifier: Debug + Send + Sync {
    /// Sends `notice`; an error says why it was not delivered (retried within the call).
    async fn notify(&self, notice: &Notice) -> Result<()>;
}

/// The destination behind connection `name`'s schema, if it is one.
pub fn destination_of(
    catalog: &dyn datafusion::catalog::CatalogProvider,
    name: &str,
) -> Option<Arc<dyn Destination>> {
    let schema = catalog.schema(name)?;
    let schema = schema.downcast_ref::<DestinationSchema>()?;
    Some(Arc::clone(schema.destination()))
}

/// Field metadata a destination's declared fields may carry: planning refuses read-only
/// fields, and DESCRIBE shows them all.
pub mod field_meta {
    /// The destination's own name for the field's type (`enumeration`, `datetime`, …).
    pub const TYPE: &str = "sluice.type";
    /// The destination does not accept writes to this field.
    pub const READ_ONLY: &str = "sluice.read_only";
    /// Values are unique across records: usable as a match key.
    pub const UNIQUE: &str = "sluice.unique";
    /// The allowed values, as a JSON array.
    pub const OPTIONS: &str = "sluice.options";
    /// `true` / `false`: whether the field may be empty (Salesforce's `nillable`).
    pub const NILLABLE: &str = "sluice.nillable";
    /// `true` / `false`: whether a new record may set the field.
    pub const CREATEABLE: &str = "sluice.createable";
    /// `true` / `false`: whether an existing record's field may change.
    pub const UPDATEABLE: &str = "sluice.updateable";
    /// The longest text the field holds.
    pub const LENGTH: &str = "sluice.length";
}

/// What a destination says about one of its objects.
#[derive(Debug, Clone)]
pub struct ObjectSpec {
    /// The object's name as the destination spells it.
    pub name: String,
    /// The object's declared fields, or `None` for free-form objects (files, webhooks) that accept
    /// whatever fields the query maps.
    pub fields: Option<SchemaRef>,
    /// The field that identifies a record (its id property, external id or primary key), if
    /// the object has one. Objects without one are append-only.
    pub key: Option<String>,
    /// The columns of a key made of several (a composite primary key); `key` is then `None`.
    pub composite_key: Vec<String>,
    /// Other fields a statement may match records by (`MERGE … ON t.field = …`), such as a
    /// CRM's unique properties.
    pub match_keys: Vec<String>,
}

impl ObjectSpec {
    /// `name` as the object declares it: the declared field of that name, else the one field
    /// whose name differs only in case (SQL folds unquoted names to lower case; Salesforce
    /// spells `LastName`). Undeclared names come back as given.
    pub fn canonical_field(&self, name: &str) -> String {
        let Some(fields) = &self.fields else {
            return name.to_string();
        };
        if fields.field_with_name(name).is_ok() {
            return name.to_string();
        }
        let mut same = fields
            .fields()
            .iter()
            .filter(|f| f.name().eq_ignore_ascii_case(name));
        match (same.next(), same.next()) {
            (Some(one), None) => one.name().clone(),
            _ => name.to_string(),
        }
    }

    /// The key a statement that does not name one matches records by: the object's key when
    /// `mapped` holds it, else the one other match key that `mapped` holds.
    pub fn default_key(&self, mapped: &[String]) -> Option<String> {
        let key = self.key.clone()?;
        if mapped.contains(&key) {
            return Some(key);
        }
        let mut others = self.match_keys.iter().filter(|k| mapped.contains(k));
        match (others.next(), others.next()) {
            (Some(one), None) => Some(one.clone()),
            _ => Some(key),
        }
    }
}

/// One destination connection.
#[async_trait]
pub trait Destination: Debug + Send + Sync + 'static {
    /// The connection's name (its schema name in SQL).
    fn connection(&self) -> &str;

    /// Object names known without I/O, for completion and `\d`.
    fn object_names(&self) -> Vec<String>;

    /// Looks up an object; may call the destination's schema API. `None`: no such object.
    async fn object(&self, name: &str) -> Result<Option<ObjectSpec>>;

    /// A provider that reads what the object currently holds, if this destination can be read.
    async fn reader(&self, _object: &ObjectSpec) -> Result<Option<Arc<dyn TableProvider>>> {
        Ok(None)
    }

    /// Why `SELECT … FROM conn.object` cannot read `object` (it has no reader), and what to do.
    fn unreadable(&self, object: &str) -> String {
        format!(
            "{}.{object} cannot be read: this connection's objects are written to, not read; sluice.runs shows what was sent and sluice.rejects what was refused",
            self.connection()
        )
    }

    /// The diff in the warehouse this connection's tables are read from (`diff 'warehouse'`),
    /// if the connection is a source that can run one.
    fn warehouse_diff(&self) -> Option<Arc<dyn WarehouseDiff>> {
        None
    }

    /// How an alert notifies through this connection, if it can (webhook, slack).
    fn notifier(&self) -> Option<Arc<dyn Notifier>> {
        None
    }

    /// Whether writes are incremental syncs with state (only changes are sent), or every write
    /// sends every row (files: each INSERT writes a complete new file).
    fn stateful(&self) -> bool {
        true
    }

    /// Requests per second the connection is limited to, if set (for dry-run estimates).
    fn rate_limit(&self) -> Option<f64> {
        None
    }

    /// Requests in flight at once (for dry-run estimates).
    fn concurrency(&self) -> Option<usize> {
        None
    }

    /// The fields of object `name` as the destination already knows them, without a lookup (REPL
    /// completion runs after every statement); `None` when it would have to ask.
    fn known_fields(&self, _name: &str) -> Option<SchemaRef> {
        None
    }

    /// Whether records can be matched by several fields at once (`MERGE … ON t.a = … AND t.b =
    /// …`, composite primary keys). The sink then receives the composite key as a last field
    /// named [`crate::sync::hash::COMPOSITE_KEY`], which it does not write.
    fn composite_keys(&self) -> bool {
        false
    }

    /// Builds the sink that writes rows shaped like `schema` (the mapped fields only) into
    /// `object`. In a sync (`sync` is set) the rows are a `DiffExec`'s changes. Called while
    /// planning: it must not do I/O.
    fn sink(
        &self,
        object: &ObjectSpec,
        schema: SchemaRef,
        report: Arc<WriteReport>,
        sync: Option<Arc<SyncRun>>,
    ) -> Result<Arc<dyn DataSink>>;
}

/// What a write did, filled in by the sink as it runs and read by the engine for the statement's
/// summary.
#[derive(Debug, Default)]
pub struct WriteReport {
    /// The connection and object written (named in the facts of a failure).
    target: Option<(String, String)>,
    locations: Mutex<Vec<String>>,
    delivery: Mutex<Option<DeliveryStats>>,
    rejects: Mutex<Vec<Rejected>>,
    acked: Mutex<Vec<Ack>>,
    dry_run: Mutex<Option<DryRun>>,
    /// A sample run's requests and answers.
    exchanges: Mutex<Vec<crate::delivery::Exchange>>,
}

impl WriteReport {
    /// The report of a write into `object` of `connection`.
    pub fn for_object(connection: &str, object: &str) -> Self {
        Self {
            target: Some((connection.to_string(), object.to_string())),
            ..Default::default()
        }
    }

    /// Records a place the write made visible (a file URL, an endpoint).
    pub fn add_location(&self, location: impl Into<String>) {
        self.locations
            .lock()
            .expect("report lock")
            .push(location.into());
    }

    pub fn locations(&self) -> Vec<String> {
        self.locations.lock().expect("report lock").clone()
    }

    /// Records what an HTTP delivery did (requests, retries, 429s, bytes, latency).
    pub fn set_delivery(&self, stats: DeliveryStats) {
        *self.delivery.lock().expect("report lock") = Some(stats);
    }

    pub fn delivery(&self) -> Option<DeliveryStats> {
        *self.delivery.lock().expect("report lock")
    }

    /// Keeps records the destination refused.
    pub fn add_rejects(&self, rejects: Vec<Rejected>) {
        self.rejects.lock().expect("report lock").extend(rejects);
    }

    /// The rejected records, leaving the report's list empty.
    pub fn take_rejects(&self) -> Vec<Rejected> {
        std::mem::take(&mut *self.rejects.lock().expect("report lock"))
    }

    /// Records changes as done without a request (a delete of a record the destination no
    /// longer has).
    pub fn ack(&self, changes: Vec<Ack>) {
        if !changes.is_empty() {
            self.acked.lock().expect("report lock").extend(changes);
        }
    }

    /// The changes the destination acknowledged, leaving the report's list empty.
    pub fn take_acked(&self) -> Vec<Ack> {
        std::mem::take(&mut *self.acked.lock().expect("report lock"))
    }

    pub fn set_dry_run(&self, dry_run: DryRun) {
        *self.dry_run.lock().expect("report lock") = Some(dry_run);
    }

    pub fn dry_run(&self) -> Option<DryRun> {
        self.dry_run.lock().expect("report lock").clone()
    }

    /// A sample run's requests and answers.
    pub fn take_exchanges(&self) -> Vec<crate::delivery::Exchange> {
        std::mem::take(&mut *self.exchanges.lock().expect("report lock"))
    }

    /// Opens the delivery session of a write into `label` (`connection.object`): the sync's run
    /// id, dry run and checkpoints, or a fresh run id for a plain INSERT.
    pub fn open_session(label: &str, sync: Option<&Arc<SyncRun>>) -> Session {
        Session::open(
            label,
            crate::sync::run::run_id(sync.map(|r| r.as_ref())),
            sync.is_some_and(|r| r.dry_run),
            sync.and_then(|r| r.checkpoints()),
        )
        .traced(sync.is_some_and(|r| r.sample.is_some() && !r.dry_run))
    }

    /// Ends a write's delivery session: its figures (also published on `sink_metrics`), its
    /// dry-run plan and `location` go into the report, then what `delivered` settled (see
    /// [`WriteReport::settle`]).
    pub fn close(
        &self,
        session: Session,
        sink_metrics: &ExecutionPlanMetricsSet,
        location: String,
        delivered: Delivered,
    ) -> Result<u64> {
        let ended = session.end(sink_metrics);
        if let Some(dry_run) = ended.dry_run {
            self.set_dry_run(dry_run);
        }
        self.exchanges
            .lock()
            .expect("report lock")
            .extend(ended.exchanges);
        self.set_delivery(ended.stats);
        self.add_location(location);
        self.settle(delivered)
    }

    /// Records what a delivery settled (even when it stopped early) and returns the number of
    /// accepted records, or the error that stopped it.
    pub fn settle(&self, delivered: Delivered) -> Result<u64> {
        let Delivered { outcome, error } = delivered;
        let mut acked = self.acked.lock().expect("report lock");
        if acked.is_empty() {
            // (Moved, not copied: a first run acknowledges every record.)
            *acked = outcome.acked;
        } else {
            acked.extend(outcome.acked);
        }
        drop(acked);
        self.add_rejects(outcome.rejected);
        match (error, &self.target) {
            (Some(e), Some((connection, object))) => Err(e.at(connection, object)),
            (Some(e), None) => Err(e),
            (None, _) => Ok(outcome.accepted),
        }
    }
}

/// The mapped fields of a write's rows: all of `schema`, less the change columns a sync's
/// `DiffExec` appends after them (`sync`).
pub fn mapped_fields(schema: &SchemaRef, sync: bool) -> Vec<String> {
    let n = schema.fields().len()
        - if sync {
            crate::contract::CHANGE_COLUMNS
        } else {
            0
        };
    schema
        .fields()
        .iter()
        .take(n)
        .map(|f| f.name().clone())
        .collect()
}

/// The index of `key` among the mapped fields, or an error saying to map it.
pub fn key_index(schema: &SchemaRef, key: &str, connection: &str, object: &str) -> Result<usize> {
    schema.index_of(key).map_err(|_| {
        let mapped: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        Error::plan(
            format!(
                "{connection}.{object} identifies records by '{key}', but the statement does not map a field '{key}' (it maps {}); add it to the SELECT",
                mapped.join(", ")
            ),
            object.to_string(),
        )
    })
}
