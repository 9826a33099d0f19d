//! sluice: a SQL-native reverse ETL engine.
//!
//! Syncs are SQL: `CREATE CONNECTION` declares where data goes, `INSERT INTO conn.object SELECT …`
//! moves it. The [`engine::Engine`] plans statements with Apache DataFusion and executes them; the
//! `sluice` binary (REPL, `run`, `check`) is a thin layer over it.

pub mod cli;
pub mod connections;
pub mod connectors;
pub mod contract;
pub mod delivery;
pub mod engine;
pub mod error;
pub mod object_stores;
pub mod options;
pub mod parser;
pub mod project;
pub mod scan;
pub mod schedule;
pub mod serve;
pub mod sql_text;
pub mod sync;
pub mod watch;

pub use engine::{Engine, Mode, Outcome, WriteSummary};
pub use error::{Error, Result};
