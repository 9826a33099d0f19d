//! The `postgres` connection: a warehouse to read models from and an application database to
//! sync into, through one connection pool.
//!
//! ```sql
//! CREATE CONNECTION warehouse TYPE postgres OPTIONS (url env('WAREHOUSE_URL'));
//! SELECT * FROM warehouse.analytics.users;      -- any schema: conn.schema.table
//! SELECT * FROM warehouse.users;                -- the default schema (option schema, 'public')
//! INSERT INTO warehouse.public.accounts SELECT id, name FROM scores;  -- keyed by the primary key
//! ```
//!
//! Reads are `COPY (SELECT …) TO STDOUT (FORMAT binary)` decoded straight into Arrow, with the
//! projection, the filters Postgres evaluates exactly as DataFusion would, and LIMIT pushed into
//! the query ([`source`]). Writes stage each batch of changes with binary COPY into a temporary
//! table and apply it with set-based statements in one transaction ([`sink`]). Types: [`types`].
//!
//! Why tokio-postgres and not `datafusion-table-providers`: the latter brings OpenSSL, its own
//! federation layer and a second copy of several Arrow-adjacent crates into the build, and reads
//! rows through `tokio_postgres::Row` value by value; decoding binary COPY into Arrow builders is
//! a few hundred lines, builds in seconds and is the fastest path Postgres offers.

mod config;
mod metadata;
mod sink;
mod source;
mod transaction;
pub mod types;
pub mod warehouse;
pub mod watch;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{CatalogProvider, SchemaProvider, TableProvider};
use datafusion::datasource::sink::DataSink;

pub use config::{OPTIONS, PgConfig};
pub use metadata::Relation;

use crate::connections::{ConnectContext, Connected, ConnectorKind, Role};
use crate::connectors::{Destination, DestinationSchema, ObjectSpec, WriteReport};
use crate::error::{Error, Result};
use crate::options::{OptionSpec, Options};
use crate::sync::SyncRun;

/// `TYPE postgres`.
pub struct PostgresConnector;

impl ConnectorKind for PostgresConnector {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn summary(&self) -> &'static str {
        "a PostgreSQL database: read its tables (with pushdown), write them with COPY and upserts, or diff in the database"
    }

    fn role(&self) -> Role {
        Role::Both
    }

    fn options(&self) -> &'static [OptionSpec] {
        OPTIONS
    }

    fn connect(
        &self,
        name: &str,
        options: &Options,
        _context: &ConnectContext,
    ) -> Result<Connected> {
        let config = PgConfig::from_options(options)?;
        if let Some(host) = config.unverified_remote_host() {
            tracing::warn!(
                connection = name,
                host = %host,
                "Postgres: the server is not verified (tls '{}'): a machine between sluice and {host} could read or change the data. Set tls 'verify-full' (with tls_root_cert for a private CA).",
                config.tls.as_str()
            );
        }
        let pool = config.pool()?;
        let connection = Arc::new(PgConnection {
            name: name.to_string(),
            config,
            pool,
            relations: RwLock::default(),
            dropped: AtomicBool::new(false),
        });
        let schema = connection.schema_provider(&connection.config.schema);
        let load = Arc::clone(&connection);
        Ok(Connected {
            schema,
            catalog: Some(Arc::new(PgCatalog(Arc::clone(&connection)))),
            load: Some(Box::pin(async move { load.load_all().await })),
            on_drop: Some(Box::new(move || {
                connection.dropped.store(true, Ordering::SeqCst)
            })),
        })
    }
}

/// One Postgres connection: its options, pool and what it knows of the database's relations.
pub struct PgConnection {
    pub name: String,
    pub config: PgConfig,
    pool: deadpool_postgres::Pool,
    /// (schema, relation) → columns, filled by `load_all` and by each lookup.
    relations: RwLock<BTreeMap<(String, String), Arc<Relation>>>,
    /// Set by DROP CONNECTION: the catalog then holds nothing (DataFusion cannot unregister it).
    dropped: AtomicBool,
}

impl std::fmt::Debug for PgConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConnection")
            .field("name", &self.name)
            .field("at", &self.config.describe())
            .finish()
    }
}

impl PgConnection {
    /// A pooled client.
    pub async fn client(&self) -> Result<deadpool_postgres::Object> {
        self.pool.get().await.map_err(|e| {
            let reason = match e {
                deadpool_postgres::PoolError::Backend(e) => pg_message(&e),
                deadpool_postgres::PoolError::Timeout(deadpool_postgres::TimeoutType::Wait) => {
                    format!(
                        "all {} of its pooled connections stayed busy for {:?} (pool_timeout); raise pool_size or pool_timeout",
                        self.config.pool_size, self.config.pool_timeout
                    )
                }
                other => other.to_string(),
            };
            Error::Write {
                message: format!(
                    "cannot connect to Postgres at {} (connection {}): {reason}",
                    self.config.describe(),
                    self.name
                ),
            }
        })
    }

    /// Reads every relation's columns (for `\d`, completion and `information_schema`).
    pub async fn load_all(&self) -> Result<()> {
        let client = self.client().await?;
        let all = metadata::load(&client, None)
            .await
            .map_err(|e| self.error(e))?;
        let mut relations = self.relations.write().expect("relations lock");
        relations.clear();
        for r in all {
            relations.insert((r.schema.clone(), r.name.clone()), Arc::new(r));
        }
        Ok(())
    }

    /// The relation `schema.name` as the database has it now (`None`: no such relation).
    pub async fn relation(&self, schema: &str, name: &str) -> Result<Option<Arc<Relation>>> {
        let client = self.client().await?;
        let found = metadata::load(&client, Some((schema, name)))
            .await
            .map_err(|e| self.error(e))?;
        let mut relations = self.relations.write().expect("relations lock");
        let key = (schema.to_string(), name.to_string());
        Ok(match found.into_iter().next() {
            Some(r) => {
                let r = Arc::new(r);
                relations.insert(key, Arc::clone(&r));
                Some(r)
            }
            None => {
                relations.remove(&key);
                None
            }
        })
    }

    fn known_schemas(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .relations
            .read()
            .expect("relations lock")
            .keys()
            .map(|(s, _)| s.clone())
            .collect();
        names.push(self.config.schema.clone());
        names.sort();
        names.dedup();
        names
    }

    fn known_relations(&self, schema: &str) -> Vec<String> {
        self.relations
            .read()
            .expect("relations lock")
            .keys()
            .filter(|(s, _)| s == schema)
            .map(|(_, n)| n.clone())
            .collect()
    }

    fn schema_provider(self: &Arc<Self>, schema: &str) -> Arc<dyn SchemaProvider> {
        Arc::new(DestinationSchema::new(Arc::new(PgDestination {
            connection: Arc::clone(self),
            schema: schema.to_string(),
        })))
    }

    /// A Postgres error as a sluice error naming the connection.
    pub fn error(&self, e: tokio_postgres::Error) -> Error {
        Error::Write {
            message: format!("Postgres ({}): {}", self.name, pg_message(&e)),
        }
    }
}

/// A Postgres error's message with its detail, hint and the column or constraint it names.
pub fn pg_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut message = db.message().to_string();
            if let Some(detail) = db.detail() {
                message.push_str(&format!(" ({detail})"));
            }
            if let Some(column) = db.column() {
                message.push_str(&format!(" [column {column}]"));
            }
            if let Some(constraint) = db.constraint() {
                message.push_str(&format!(" [constraint {constraint}]"));
            }
            if let Some(hint) = db.hint() {
                message.push_str(&format!("; {hint}"));
            }
            message
        }
        None => match std::error::Error::source(e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        },
    }
}

/// `conn.schema.table`: every schema of the database.
#[derive(Debug)]
struct PgCatalog(Arc<PgConnection>);

impl CatalogProvider for PgCatalog {
    fn schema_names(&self) -> Vec<String> {
        if self.0.dropped.load(Ordering::SeqCst) {
            return vec![];
        }
        self.0.known_schemas()
    }

    fn schema(&self, name: &str) -> Option<Arc<dyn SchemaProvider>> {
        if self.0.dropped.load(Ordering::SeqCst) {
            return None;
        }
        Some(self.0.schema_provider(name))
    }
}

/// The relations of one Postgres schema, as destination objects that can also be read.
#[derive(Debug)]
pub struct PgDestination {
    connection: Arc<PgConnection>,
    schema: String,
}

impl PgDestination {
    async fn relation(&self, name: &str) -> Result<Option<Arc<Relation>>> {
        self.connection.relation(&self.schema, name).await
    }

    /// The relation as last looked up (planning looks it up before the reader and the sink).
    fn cached(&self, name: &str) -> Option<Arc<Relation>> {
        self.connection
            .relations
            .read()
            .expect("relations lock")
            .get(&(self.schema.clone(), name.to_string()))
            .cloned()
    }
}

#[async_trait]
impl Destination for PgDestination {
    fn connection(&self) -> &str {
        &self.connection.name
    }

    fn object_names(&self) -> Vec<String> {
        self.connection.known_relations(&self.schema)
    }

    async fn object(&self, name: &str) -> Result<Option<ObjectSpec>> {
        Ok(self.relation(name).await?.map(|r| r.object_spec()))
    }

    fn warehouse_diff(&self) -> Option<Arc<dyn crate::sync::remote::WarehouseDiff>> {
        Some(Arc::new(warehouse::PgWarehouseDiff))
    }

    async fn reader(&self, object: &ObjectSpec) -> Result<Option<Arc<dyn TableProvider>>> {
        let relation = match self.cached(&object.name) {
            Some(r) => r,
            None => match self.relation(&object.name).await? {
                Some(r) => r,
                None => return Ok(None),
            },
        };
        Ok(Some(Arc::new(source::PgTable::new(
            Arc::clone(&self.connection),
            relation,
        ))))
    }

    fn composite_keys(&self) -> bool {
        true
    }

    fn known_fields(&self, name: &str) -> Option<SchemaRef> {
        self.cached(name).map(|r| r.arrow_schema())
    }

    fn concurrency(&self) -> Option<usize> {
        Some(1)
    }

    fn sink(
        &self,
        object: &ObjectSpec,
        schema: SchemaRef,
        report: Arc<WriteReport>,
        sync: Option<Arc<SyncRun>>,
    ) -> Result<Arc<dyn DataSink>> {
        let relation = self.cached(&object.name).ok_or_else(|| {
            Error::plan(
                format!(
                    "{}.{}.{} is not known; it may have been dropped",
                    self.connection.name, self.schema, object.name
                ),
                object.name.clone(),
            )
        })?;
        let sink = sink::PgSink::new(Arc::clone(&self.connection), relation, schema, report, sync)?;
        Ok(Arc::new(sink))
    }
}

/// The connection and relation a source table reads, if it is a Postgres table.
pub fn source_of(reader: &dyn TableProvider) -> Option<(Arc<PgConnection>, Arc<Relation>)> {
    let table = reader.downcast_ref::<source::PgTable>()?;
    Some((Arc::clone(table.connection()), Arc::clone(table.relation())))
}
