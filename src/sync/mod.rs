//! Incremental syncs: only what changed since the last acknowledged run is sent.
//!
//! - [`hash`]: stable per-value hashes (persisted).
//! - [`diff`]: the diff kernel (plain Arrow): model rows vs the last snapshot → insert / update
//!   (with the changed fields) / unchanged, and snapshot keys absent from the model → delete.
//! - [`snapshot`]: the last commit's records and the lookup of model keys in it.
//! - [`exec`]: `DiffExec`, the kernel as a DataFusion operator (visible in `EXPLAIN`).
//! - [`run`]: one run of a sync: its changes, what the destination acknowledged, the commit.
//! - [`state`]: snapshots, manifests, rejects, run records and locks in an object store.
//! - [`tables`]: `sluice.runs` and `sluice.rejects`.
//! - [`changelog`]: what each run sent per record and what the destination answered
//!   (`sluice.changes`).
//! - [`cleanup`]: what a dropped run still has to do before the process exits.

pub mod changelog;
pub mod cleanup;
pub mod diff;
pub mod exec;
pub mod hash;
pub mod remote;
pub mod run;
pub mod snapshot;
pub mod state;
pub mod tables;

use crate::error::Result;
use crate::options::{OptionSpec, Options};

pub use remote::RemoteState;
pub use run::SyncRun;
pub use state::StateStore;

/// `null_policy`: what a null in the model does to the destination's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NullPolicy {
    /// Send the null (the destination value is cleared).
    Clear,
    /// Leave the field out (the destination keeps its value).
    Skip,
}

/// The options a sync accepts (`CREATE SYNC … OPTIONS (…)`).
pub const OPTIONS: &[OptionSpec] = &[
    OptionSpec::new(
        "max_deletes",
        "integer",
        "",
        "refuse to run if the sync would delete more records than this",
    ),
    OptionSpec::new(
        "max_delete_pct",
        "number 0-100",
        "",
        "refuse to run if the sync would delete more than this percentage of the synced records",
    ),
    OptionSpec::new(
        "on_empty_source",
        "abort | allow",
        "abort",
        "what to do when the model returns no rows; 'abort' protects syncs that delete from wiping the destination",
    ),
    OptionSpec::new(
        "null_policy",
        "clear | skip",
        "clear",
        "'clear' sends the null (the destination value is cleared); 'skip' leaves the field alone",
    ),
    OptionSpec::new(
        "duplicate_keys",
        "error | keep_last",
        "error",
        "'error' fails the run, showing a few duplicate keys; 'keep_last' keeps the last row of each key",
    ),
    OptionSpec::new(
        "checkpoint_every",
        "duration",
        "30s",
        "while a run delivers, commit what the destination acknowledged this often ('0' turns checkpoints off): a crash then re-sends at most what was in flight and one interval's work",
    ),
    OptionSpec::new(
        "checkpoint_records",
        "integer",
        "",
        "also commit a checkpoint after this many records are answered (unset: by time only)",
    ),
    OptionSpec::new(
        "changes_retention",
        "duration",
        "14 days",
        "how long sluice.changes keeps what each run sent and what the destination answered, per record ('30 days', '12h'); '0' keeps no log (and removes this sync's logs at its next run)",
    ),
    OptionSpec::new(
        "max_reject_pct",
        "number 0-100",
        "",
        "under sluice serve, a run that rejects more than this percentage of the records it sends counts as failed for the syncs SCHEDULEd AFTER it: the chain stops there",
    ),
    OptionSpec::new(
        "jitter",
        "duration",
        "0",
        "under sluice serve, start each scheduled run this much later at most (a fixed offset per sync), so that many syncs on the same minute do not start at once",
    ),
    OptionSpec::new(
        "change_query",
        "SQL text",
        "",
        "SCHEDULE ON CHANGE: a query run in the Postgres database the model reads (e.g. 'SELECT max(updated_at) FROM accounts'); the sync runs when its answer changes (unset: the tables' pg_stat_user_tables counters, or files' size and modification time)",
    ),
    OptionSpec::new(
        "diff",
        "local | warehouse",
        "local",
        "'local': the state is a snapshot next to the sync's other state; 'warehouse': the state is a table in the Postgres source and the diff runs there as SQL",
    ),
];

/// A sync's safety rails and policies.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncOptions {
    pub max_deletes: Option<u64>,
    pub max_delete_pct: Option<f64>,
    pub abort_on_empty_source: bool,
    pub null_policy: NullPolicy,
    pub keep_last: bool,
    /// `diff 'warehouse'`: the diff runs in the source warehouse against a state table there.
    pub warehouse_diff: bool,
    /// Checkpoints during a run: at most this long apart (`None`: by count only, or none).
    pub checkpoint_every: Option<std::time::Duration>,
    /// Checkpoints during a run: after this many more records are answered.
    pub checkpoint_records: Option<u64>,
    /// How long the change log of each run is kept (`None`: no log).
    pub changes_retention: Option<std::time::Duration>,
    /// `sluice serve`: rejects above this percentage of the records sent stop a sequence.
    pub max_reject_pct: Option<f64>,
    /// `sluice serve`: a scheduled run starts up to this much after its tick.
    pub jitter: std::time::Duration,
    /// `SCHEDULE ON CHANGE`: the query whose answer changing means the inputs changed.
    pub change_query: Option<String>,
}

/// How long a run's change log is kept unless `changes_retention` says otherwise.
pub const DEFAULT_CHANGES_RETENTION: std::time::Duration =
    std::time::Duration::from_secs(14 * 24 * 3600);

/// Checkpoints of a run's state unless `checkpoint_every` says otherwise.
pub const DEFAULT_CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

impl Default for SyncOptions {
    fn default() -> Self {
        Self {
            max_deletes: None,
            max_delete_pct: None,
            abort_on_empty_source: true,
            null_policy: NullPolicy::Clear,
            keep_last: false,
            warehouse_diff: false,
            checkpoint_every: Some(DEFAULT_CHECKPOINT_EVERY),
            checkpoint_records: None,
            changes_retention: Some(DEFAULT_CHANGES_RETENTION),
            max_reject_pct: None,
            jitter: std::time::Duration::ZERO,
            change_query: None,
        }
    }
}

impl SyncOptions {
    pub fn from_options(options: &Options) -> Result<Self> {
        let choice = |key: &str, valid: &[&str]| -> Result<Option<String>> {
            match options.string(key)? {
                None => Ok(None),
                Some(v) if valid.contains(&v.to_lowercase().as_str()) => Ok(Some(v.to_lowercase())),
                Some(v) => Err(crate::error::Error::Option {
                    key: key.to_string(),
                    message: format!(
                        "option '{key}' = '{v}' is not valid; use {}",
                        valid
                            .iter()
                            .map(|v| format!("'{v}'"))
                            .collect::<Vec<_>>()
                            .join(" or ")
                    ),
                }),
            }
        };
        let pct = |key: &str| -> Result<Option<f64>> {
            let value: Option<f64> = options.parse(key)?;
            match value {
                Some(p) if !(0.0..=100.0).contains(&p) => Err(crate::error::Error::Option {
                    key: key.into(),
                    message: format!("option '{key}' = '{p}' must be between 0 and 100"),
                }),
                v => Ok(v),
            }
        };
        let max_delete_pct = pct("max_delete_pct")?;
        Ok(Self {
            max_deletes: options.parse("max_deletes")?,
            max_delete_pct,
            abort_on_empty_source: choice("on_empty_source", &["abort", "allow"])?.as_deref()
                != Some("allow"),
            null_policy: match choice("null_policy", &["clear", "skip"])?.as_deref() {
                Some("skip") => NullPolicy::Skip,
                _ => NullPolicy::Clear,
            },
            keep_last: choice("duplicate_keys", &["error", "keep_last"])?.as_deref()
                == Some("keep_last"),
            warehouse_diff: choice("diff", &["local", "warehouse"])?.as_deref()
                == Some("warehouse"),
            checkpoint_every: match crate::delivery::settings::duration(
                options,
                "checkpoint_every",
            )? {
                None => Some(DEFAULT_CHECKPOINT_EVERY),
                Some(d) if d.is_zero() => None,
                Some(d) => Some(d),
            },
            checkpoint_records: match options.parse::<u64>("checkpoint_records")? {
                Some(0) => {
                    return Err(crate::error::Error::Option {
                        key: "checkpoint_records".into(),
                        message: "option 'checkpoint_records' must be at least 1".into(),
                    });
                }
                n => n,
            },
            changes_retention: match options.string("changes_retention")? {
                None => Some(DEFAULT_CHANGES_RETENTION),
                Some(text) => {
                    match crate::options::parse_duration_within(
                        &text,
                        crate::options::MAX_RETENTION,
                    ) {
                        Ok(d) if d.is_zero() => None,
                        Ok(d) => Some(d),
                        Err(e) => {
                            return Err(crate::error::Error::Option {
                                key: "changes_retention".into(),
                                message: format!(
                                    "option 'changes_retention' = '{text}' is not valid: {e}; write '14 days', '36h', or '0' for no change log"
                                ),
                            });
                        }
                    }
                }
            },
            max_reject_pct: pct("max_reject_pct")?,
            jitter: crate::delivery::settings::duration(options, "jitter")?.unwrap_or_default(),
            change_query: options
                .string("change_query")?
                .filter(|q| !q.trim().is_empty()),
        })
    }
}

/// This process's resident memory in MB, for debug logs (Linux; 0 elsewhere).
pub fn rss_mb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kb| kb / 1024)
        .unwrap_or(0)
}
