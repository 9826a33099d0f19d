//! The sync contract: what the planner, the diff and every connector agree on, in one small
//! module that depends on neither `sync/` nor `delivery/` (both depend on it).
//!
//! - [`SyncMode`]: what a statement may do to the destination's records, parsed once by the
//!   planner and carried everywhere (EXPLAIN, `sluice.runs`, the diff, the sinks).
//! - [`Op`]: what one record asks of the destination.
//! - [`ChangeBatch`]: a typed view of the batches `DiffExec` hands a sink (the mapped fields,
//!   then the change columns), so that no sink reads the change columns by position.
//! - [`Clauses`]: which fields each MERGE clause sends, and when it applies.
//! - [`Ack`] and [`Rejected`]: what the destination said about one change.

mod changes;
mod clauses;
mod mode;

use std::fmt;

use bytes::Bytes;

pub use changes::{
    CHANGE_COLUMN, CHANGE_COLUMNS, CHANGED_COLUMN, ChangeBatch, OP_COLUMN, change_schema,
    is_change_column,
};
pub use clauses::{
    Clause, Clauses, WHEN_MATCHED_COLUMN, WHEN_NOT_MATCHED_COLUMN, is_clause_column,
};
pub use mode::SyncMode;

/// What a record asks of the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Create or update (the record may or may not exist).
    Upsert,
    /// Create only.
    Insert,
    /// Update only.
    Update,
    /// Delete by key.
    Delete,
}

impl Op {
    pub const ALL: [Op; 4] = [Op::Upsert, Op::Insert, Op::Update, Op::Delete];

    pub fn as_str(self) -> &'static str {
        match self {
            Op::Upsert => "upsert",
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
        }
    }

    /// The operation's code in the `__op` column (and in a Postgres stage table).
    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: u8) -> Op {
        Op::ALL[code as usize % 4]
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A sample run (`RUN SYNC name SAMPLE 5`, `sluice run --sample 5`): only these records of the
/// diff are sent, and only their state is committed; the others are left for the next run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sample {
    /// The first n records to send, in key order (so that a rerun picks the same ones).
    First(usize),
    /// The records with these keys (`SAMPLE WHERE key IN (…)`): the key field as written, and
    /// the keys as text.
    Keys { field: String, keys: Vec<String> },
}

impl fmt::Display for Sample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Sample::First(n) => write!(f, "SAMPLE {n}"),
            Sample::Keys { field, keys } => write!(
                f,
                "SAMPLE WHERE {field} IN ({})",
                keys.iter()
                    .map(|k| format!("'{}'", k.replace('\'', "''")))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

/// A change the destination acknowledged, with the record id it gave (when it gives one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// The diff's change id (the `__change` column).
    pub change: u32,
    /// The destination's id of the record (HubSpot's `id`, Salesforce's `Id`).
    pub id: Option<String>,
}

impl Ack {
    pub fn new(change: u32, id: Option<String>) -> Self {
        Self { change, id }
    }

    /// An acknowledgement that carries no record id.
    pub fn done(change: u32) -> Self {
        Self { change, id: None }
    }
}

/// A record the destination refused, kept whole so it can be reported and sent again.
#[derive(Debug, Clone)]
pub struct Rejected {
    pub key: Option<String>,
    pub code: String,
    pub message: String,
    /// The record as it was sent.
    pub payload: Bytes,
    /// How many requests carried it.
    pub attempts: u32,
    /// In a sync, the diff's change the record carried.
    pub change: Option<u32>,
}
