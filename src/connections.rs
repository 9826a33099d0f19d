//! Connections: the kinds sluice can connect to, and the live connections of a session.
//!
//! `CREATE CONNECTION name TYPE kind OPTIONS (...)` finds the kind, lets it consume its typed
//! options, and registers what it returns as the schema `name`, so its objects resolve as
//! `name.object`.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use datafusion::catalog::{CatalogProvider, SchemaProvider};
use datafusion::execution::runtime_env::RuntimeEnv;
use futures::future::BoxFuture;

use crate::error::{Error, Result};
use crate::options::{OptionSpec, Options};

/// What a connection kind needs from the session to open a connection.
#[derive(Debug, Clone)]
pub struct ConnectContext {
    /// Object stores (local, s3://, gs://, …) for kinds that read or write files.
    pub runtime: Arc<RuntimeEnv>,
}

/// A kind of connection (`file`, later `webhook`, `hubspot`, `postgres` …).
pub trait ConnectorKind: Send + Sync + 'static {
    /// The name used in `TYPE kind`.
    fn kind(&self) -> &'static str;

    /// One line on what it connects to, for `SHOW CONNECTION TYPES` and the book.
    fn summary(&self) -> &'static str;

    /// Whether its objects can be read, written or both.
    fn role(&self) -> Role;

    /// The options this kind accepts.
    fn options(&self) -> &'static [OptionSpec];

    /// Opens a connection from its options. Must not do network I/O: connections are created by
    /// `sluice check` too.
    fn connect(&self, name: &str, options: &Options, context: &ConnectContext)
    -> Result<Connected>;
}

/// What a connection kind's objects can be used as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Read with `SELECT`.
    Source,
    /// Written with `INSERT`, `MERGE`, `DELETE` and syncs.
    Destination,
    Both,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Source => "source",
            Role::Destination => "destination",
            Role::Both => "source, destination",
        })
    }
}

/// What opening a connection gives the session.
pub struct Connected {
    /// `name.object`.
    pub schema: Arc<dyn SchemaProvider>,
    /// `name.schema.object`, for connections with schemas of their own (databases).
    pub catalog: Option<Arc<dyn CatalogProvider>>,
    /// Reads what the connection holds (for `\d` and completion) when statements run; skipped
    /// by `sluice check`.
    pub load: Option<BoxFuture<'static, Result<()>>>,
    /// Called by DROP CONNECTION.
    pub on_drop: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl Connected {
    /// A connection that is just a schema.
    pub fn schema(schema: Arc<dyn SchemaProvider>) -> Self {
        Self {
            schema,
            catalog: None,
            load: None,
            on_drop: None,
        }
    }
}

/// A live connection, as `SHOW CONNECTIONS` lists it.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub name: String,
    pub kind: String,
    /// The options with secrets redacted.
    pub options: String,
}

/// The connections of one session.
#[derive(Default)]
pub struct Connections {
    kinds: Vec<Arc<dyn ConnectorKind>>,
    live: RwLock<BTreeMap<String, ConnectionInfo>>,
}

impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connections")
            .field("live", &self.live.read().expect("connections lock").keys())
            .finish()
    }
}

impl Connections {
    pub fn new(kinds: Vec<Arc<dyn ConnectorKind>>) -> Self {
        Self {
            kinds,
            live: RwLock::default(),
        }
    }

    /// Adds (or replaces) a kind.
    pub fn add_kind(&mut self, kind: Arc<dyn ConnectorKind>) {
        self.kinds.retain(|k| k.kind() != kind.kind());
        self.kinds.push(kind);
    }

    /// Every kind, in the order they were added.
    pub fn kinds(&self) -> &[Arc<dyn ConnectorKind>] {
        &self.kinds
    }

    /// Finds a kind by name, or says which kinds exist.
    pub fn kind(&self, kind: &str) -> Result<&Arc<dyn ConnectorKind>> {
        self.kinds
            .iter()
            .find(|k| k.kind().eq_ignore_ascii_case(kind))
            .ok_or_else(|| Error::UnknownKind {
                kind: kind.to_string(),
                valid: self
                    .kinds
                    .iter()
                    .map(|k| k.kind())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    pub fn get(&self, name: &str) -> Option<ConnectionInfo> {
        self.live
            .read()
            .expect("connections lock")
            .get(name)
            .cloned()
    }

    pub fn list(&self) -> Vec<ConnectionInfo> {
        self.live
            .read()
            .expect("connections lock")
            .values()
            .cloned()
            .collect()
    }

    pub fn insert(&self, info: ConnectionInfo) {
        self.live
            .write()
            .expect("connections lock")
            .insert(info.name.clone(), info);
    }

    pub fn remove(&self, name: &str) -> Option<ConnectionInfo> {
        self.live.write().expect("connections lock").remove(name)
    }
}
