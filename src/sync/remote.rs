//! Sync state kept in the source warehouse (`diff 'warehouse'`): the diff runs there as SQL and
//! only changed rows cross the network. The run, its rails, rejects and run records work as with
//! the local diff; only the snapshot lives elsewhere, behind this trait.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::physical_plan::ExecutionPlan;

use datafusion::logical_expr::LogicalPlan;

use super::SyncRun;
use super::diff::DiffSpec;
use super::hash::Key;
use crate::error::Result;

/// A source connector that can run a sync's diff where the model's data lives
/// (`diff 'warehouse'`): the engine asks the tables the model reads for one.
pub trait WarehouseDiff: fmt::Debug + Send + Sync {
    /// The remote state of sync `id` (writing into `target`) whose mapped, optimized model is
    /// `model`; an error says why this model cannot run in the warehouse.
    fn plan(
        &self,
        model: &LogicalPlan,
        diff: &DiffSpec,
        id: &str,
        target: &str,
    ) -> Result<Arc<dyn RemoteState>>;
}

/// What a run commits to a remote state: acknowledged writes and settled intents.
#[derive(Debug, Default)]
pub struct RemoteCommit<'a> {
    /// Acknowledged inserts and updates.
    pub upserts: Vec<RemoteUpsert<'a>>,
    /// Acknowledged deletes.
    pub deletes: Vec<&'a Key>,
    /// New records announced by an intent and then refused by the destination: they are not
    /// there, so the intent is withdrawn.
    pub withdrawn: Vec<&'a Key>,
}

/// An acknowledged insert or update, as a remote state commits it.
#[derive(Debug, Clone, Copy)]
pub struct RemoteUpsert<'a> {
    pub key: &'a Key,
    /// The destination's record id, when it gives one.
    pub record_id: Option<&'a str>,
    /// The hash of every mapped field, in the sync's field order.
    pub hashes: &'a [u64],
    /// Which of those hashes to commit (bit i: field i; see `DiffSpec::committed_fields`).
    pub committed: u64,
    /// The record was unknown (pending): the hashes not committed become unknown; else they
    /// keep what the state holds.
    pub unknown: bool,
}

/// A sync's snapshot held by the warehouse the model reads from.
#[async_trait]
pub trait RemoteState: Send + Sync + fmt::Debug {
    /// Where the state lives, for EXPLAIN and messages (never a secret).
    fn location(&self) -> String;

    /// The hash scheme, recorded in the sync's manifest.
    fn hash_version(&self) -> &'static str;

    /// Makes the state ready for a run and returns how many records it holds. `fresh`: the sync
    /// has no committed state (first run, or after RESET SYNC), so only records sent without an
    /// answer are kept; otherwise a missing state is an error.
    async fn prepare(&self, fresh: bool) -> Result<u64>;

    /// The diff as an operator: emits what `DiffExec` emits for the model `model`.
    fn diff_exec(&self, run: Arc<SyncRun>, model: SchemaRef) -> Arc<dyn ExecutionPlan>;

    /// Records the keys of the records about to be sent, before they are sent: until a commit
    /// settles them, each is sent again (or deleted) whatever the model then holds.
    async fn write_intent(&self, keys: &[&Key]) -> Result<()>;

    /// Applies what the destination acknowledged, atomically.
    async fn commit(&self, commit: RemoteCommit<'_>) -> Result<()>;
}
