//! `sluice serve`: the project's named syncs run on their schedules and triggers, and an HTTP
//! API runs them on demand and reads their history, in one process with no other scheduler or
//! database.
//!
//! - [`load`]: the project's definitions (connections, tables, views, syncs), not its writes;
//!   a reload keeps a broken file's previous text.
//! - [`runner`]: starts runs (never two of one sync at once, at most `max_concurrent` in all),
//!   the schedule and trigger loops, and sequences.
//! - [`api`]: the HTTP routes (described by `docs/api/openapi.json`); [`metrics`]: `/metrics`;
//!   [`page`]: the status page at `/`.
//!
//! SIGTERM or SIGINT stop new runs; running ones get `shutdown_grace` to finish and commit, then
//! are cancelled (their runs are recorded as interrupted and their state stays consistent).
//! SIGHUP, or a changed `.sql` file, reloads the project.

mod api;
mod load;
pub mod metrics;
mod page;
mod runner;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use runner::{Cause, Clock, Ended, Project, Runner, Started, SyncStatus};

use crate::engine::Engine;

/// How `sluice serve` runs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub max_concurrent_syncs: usize,
    /// The bearer token mutating API calls need (`None`: the mutating API is off).
    pub api_token: Option<String>,
    pub shutdown_grace: Duration,
    /// Where people reach the status page, for links in alert notices (default: the listen
    /// address).
    pub public_url: Option<String>,
}

/// Makes a new session, configured as the first (its state, its settings).
pub type NewEngine = Arc<dyn Fn() -> crate::Result<Engine> + Send + Sync>;

/// How often the project's files are checked for changes.
const FILE_CHECK: Duration = Duration::from_secs(2);

/// The project as last loaded, and what the last reload said.
#[derive(Debug, Default)]
pub struct Loading {
    paths: Vec<PathBuf>,
    /// The texts now loaded.
    good: load::Texts,
    /// The texts the last load tried (a file is tried again when it changes, or on SIGHUP).
    seen: load::Texts,
    /// Files whose new text did not load (their previous text runs), or why a reload failed.
    pub errors: Vec<String>,
    pub reloads: u64,
}

/// Loads `paths`, then schedules and serves until SIGTERM or SIGINT. An error here is one the
/// service cannot start with (a file that does not load, a schedule that is wrong, an address
/// it cannot listen on).
pub async fn serve(
    new_engine: NewEngine,
    paths: &[PathBuf],
    config: ServeConfig,
) -> Result<(), String> {
    if config.api_token.is_none() && !config.listen.ip().is_loopback() {
        return Err(format!(
            "--listen {}: without an API token (--api-token-file or SLUICE_API_TOKEN) sluice serve listens on a loopback address only",
            config.listen
        ));
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let address = listener
        .local_addr()
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    // Alert notices link to the status page.
    let status_url = config
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{address}/"));
    let new_engine: NewEngine = {
        let make = new_engine;
        Arc::new(move || {
            let engine = make()?;
            engine.set_status_url(Some(status_url.clone()));
            Ok(engine)
        })
    };
    let texts = load::read(paths)?;
    let engine = new_engine().map_err(|e| e.to_string())?;
    let loaded = load::load(&engine, &texts).await.map_err(|e| e.message)?;
    let runner = Runner::new(
        Arc::new(engine),
        config.max_concurrent_syncs,
        Clock::system(),
    )
    .map_err(|(sync, e)| located(&loaded, &sync, &e))?;
    metrics::install()?;
    let scheduled = runner.schedule();
    let loading = Arc::new(Mutex::new(Loading {
        paths: paths.to_vec(),
        seen: texts.clone(),
        good: texts,
        ..Default::default()
    }));
    // (The one line a supervisor or a test reads to find the service, once it is loaded.)
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
        loading: Arc::clone(&loading),
    });
    let stop = runner.stopping();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        stop.await;
    });
    let server = tokio::spawn(async move { server.await });
    let watcher = tokio::spawn(watch_files(
        Arc::clone(&runner),
        Arc::clone(&new_engine),
        Arc::clone(&loading),
    ));
    shutdown_signal().await;
    watcher.abort();
    tracing::info!(
        grace_s = config.shutdown_grace.as_secs_f64(),
        "Stopping: no new runs; running ones may finish within the grace period."
    );
    runner.stop(config.shutdown_grace).await;
    let _ = server.await;
    Ok(())
}

fn located(loaded: &load::Loaded, sync: &str, message: &str) -> String {
    match loaded.locations.get(sync) {
        Some(at) => format!("{at}: sync {sync}: {message}"),
        None => format!("sync {sync}: {message}"),
    }
}

/// Reloads on SIGHUP, and when a file of the project changes (checked every few seconds).
async fn watch_files(runner: Arc<Runner>, new_engine: NewEngine, loading: Arc<Mutex<Loading>>) {
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        #[cfg(unix)]
        let hup = async {
            match hangup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let hup = std::future::pending::<()>();
        let forced = tokio::select! {
            _ = hup => true,
            _ = tokio::time::sleep(FILE_CHECK) => false,
        };
        let (paths, good, seen) = {
            let l = loading.lock().expect("loading");
            (l.paths.clone(), l.good.clone(), l.seen.clone())
        };
        let texts = match load::read(&paths) {
            Ok(t) => t,
            Err(e) => {
                report(&loading, vec![e]);
                continue;
            }
        };
        if !forced && texts == seen {
            continue;
        }
        loading.lock().expect("loading").seen = texts.clone();
        reload(&runner, &new_engine, &loading, texts, &good).await;
    }
}

async fn reload(
    runner: &Arc<Runner>,
    new_engine: &NewEngine,
    loading: &Mutex<Loading>,
    texts: load::Texts,
    good: &load::Texts,
) {
    tracing::info!("Reloading the project.");
    match load::load_keeping(new_engine.as_ref(), &texts, good).await {
        Ok((engine, loaded, kept, errors)) => {
            match runner.reload(Arc::new(engine)) {
                Ok(scheduled) => {
                    let messages: Vec<String> = errors
                        .iter()
                        .map(|e| {
                            format!(
                                "{} (the file's previous definitions keep running)",
                                e.message
                            )
                        })
                        .collect();
                    for m in &messages {
                        tracing::error!(error = %m, "A file did not reload.");
                    }
                    tracing::info!(
                        syncs = runner.names().len(),
                        scheduled,
                        definitions = loaded.definitions,
                        "Reloaded."
                    );
                    let mut l = loading.lock().expect("loading");
                    // What did not load is retried when its file changes again (or on SIGHUP).
                    l.good = kept;
                    l.errors = messages;
                    l.reloads += 1;
                }
                Err((sync, e)) => {
                    let message = format!(
                        "{}; the previous definitions keep running",
                        located(&loaded, &sync, &e)
                    );
                    report(loading, vec![message]);
                }
            }
        }
        Err(e) => {
            let message = format!("{}; the previous definitions keep running", e.message);
            report(loading, vec![message]);
        }
    }
}

/// Records why a reload did not happen.
fn report(loading: &Mutex<Loading>, errors: Vec<String>) {
    let mut l = loading.lock().expect("loading");
    if l.errors != errors {
        for e in &errors {
            tracing::error!(error = %e, "The project did not reload.");
        }
    }
    l.errors = errors;
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
