//! `sluice serve`: the project's named syncs run on their schedules, and an HTTP API runs them
//! on demand and reads their history, in one process with no other scheduler or database.
//!
//! - [`load`]: the project's definitions (connections, tables, views, syncs), not its writes.
//! - [`runner`]: starts runs (never two of one sync at once, at most `max_concurrent` in all)
//!   and the schedule loops.
//! - [`api`]: the HTTP routes.
//!
//! SIGTERM or SIGINT stop new runs; running ones get `shutdown_grace` to finish and commit, then
//! are cancelled (their runs are recorded as interrupted and their state stays consistent).

mod api;
mod load;
mod runner;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use runner::{Runner, Started};

use crate::engine::Engine;

/// How `sluice serve` runs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub max_concurrent_syncs: usize,
    /// The bearer token mutating API calls need (`None`: the mutating API is off).
    pub api_token: Option<String>,
    pub shutdown_grace: Duration,
}

/// Loads `paths`, then schedules and serves until SIGTERM or SIGINT. An error here is one the
/// service cannot start with (a file that does not load, an address it cannot listen on).
pub async fn serve(engine: Engine, paths: &[PathBuf], config: ServeConfig) -> Result<(), String> {
    if config.api_token.is_none() && !config.listen.ip().is_loopback() {
        return Err(format!(
            "--listen {}: without an API token (--api-token-file or SLUICE_API_TOKEN) sluice serve listens on a loopback address only",
            config.listen
        ));
    }
    let loaded = load::load(&engine, paths).await?;
    let engine = Arc::new(engine);
    let runner = Runner::new(Arc::clone(&engine), config.max_concurrent_syncs);
    let scheduled = runner.schedule().await?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let address = listener
        .local_addr()
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    // (The one line a supervisor or a test reads to find the service.)
    println!("sluice serve: listening on http://{address}");
    tracing::info!(
        files = loaded.files,
        definitions = loaded.definitions,
        skipped = loaded.skipped,
        syncs = runner.names().len(),
        scheduled,
        "Serving."
    );
    let app = api::router(api::Api {
        runner: Arc::clone(&runner),
        token: config.api_token.clone(),
    });
    let stop = runner.stopping();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        stop.await;
    });
    let server = tokio::spawn(async move { server.await });
    shutdown_signal().await;
    tracing::info!(
        grace_s = config.shutdown_grace.as_secs_f64(),
        "Stopping: no new runs; running ones may finish within the grace period."
    );
    runner.stop(config.shutdown_grace).await;
    let _ = server.await;
    Ok(())
}

/// SIGTERM or SIGINT.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let terminate = async {
            match term.as_mut() {
                Some(t) => {
                    t.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
