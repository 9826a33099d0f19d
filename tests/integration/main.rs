//! The one integration test binary: every integration test module compiles into it.

mod alerts;
mod change_log;
mod cli;
mod fakes;
mod file_destination;
mod front_door;
mod hostile;
mod hubspot;
mod postgres;
mod repl;
mod salesforce;
mod serve;
mod slt;
mod sources;
mod sql_examples;
mod support;
mod sync_state;
mod webhook;
