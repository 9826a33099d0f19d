//! Starting runs: by schedule or on demand, never two of one sync at once (a tick that finds it
//! running is skipped and counted; a request gets the running run's id), at most
//! `max_concurrent` syncs at once in all, each in the one session the project loaded (so runs
//! share each connection's rate limiter and quota).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{Semaphore, oneshot, watch};
use tokio::task::JoinHandle;

use crate::engine::{Engine, Mode, Outcome};
use crate::parser::Schedule;
use crate::schedule::Timing;

/// What a sync is doing, for the API.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SyncStatus {
    pub name: String,
    pub schedule: Option<String>,
    /// The run in progress, if any.
    pub running: Option<String>,
    pub next_run: Option<String>,
    /// Ticks that found the sync still running.
    pub skipped_ticks: u64,
    /// This process's last finished run: its id, and `succeeded`, `partial` or `failed`.
    pub last_run: Option<String>,
    pub last_status: Option<String>,
    pub last_error: Option<String>,
}

/// What [`Runner::start`] did.
#[derive(Debug)]
pub enum Started {
    /// A new run, and a receiver told when it ends.
    New(String, oneshot::Receiver<()>),
    /// The sync is already running: that run's id.
    Running(String),
    /// The service is stopping.
    Stopping,
}

/// Starts and tracks runs.
pub struct Runner {
    engine: Arc<Engine>,
    slots: Arc<Semaphore>,
    syncs: Mutex<BTreeMap<String, SyncStatus>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    stop: watch::Sender<bool>,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner").finish_non_exhaustive()
    }
}

impl Runner {
    pub fn new(engine: Arc<Engine>, max_concurrent: usize) -> Arc<Self> {
        let syncs = engine
            .schedules()
            .into_iter()
            .map(|(name, schedule)| {
                let status = SyncStatus {
                    name: name.clone(),
                    schedule: schedule.as_ref().map(Schedule::to_string),
                    ..Default::default()
                };
                (name, status)
            })
            .collect();
        Arc::new(Self {
            engine,
            slots: Arc::new(Semaphore::new(max_concurrent.max(1))),
            syncs: Mutex::new(syncs),
            tasks: Mutex::default(),
            stop: watch::channel(false).0,
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    fn syncs(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, SyncStatus>> {
        self.syncs.lock().expect("runner lock")
    }

    /// The named syncs.
    pub fn names(&self) -> Vec<String> {
        self.syncs().keys().cloned().collect()
    }

    /// Every sync's status, by name.
    pub fn statuses(&self) -> Vec<SyncStatus> {
        self.syncs().values().cloned().collect()
    }

    pub fn status(&self, name: &str) -> Option<SyncStatus> {
        self.syncs().get(name).cloned()
    }

    fn is_stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Resolves once the service is stopping.
    pub fn stopping(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.stop.subscribe();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    }

    /// Starts a run of `name` now (`why`: what started it, for the logs); `None` for a sync
    /// that does not exist.
    pub fn start(self: &Arc<Self>, name: &str, why: &'static str) -> Option<Started> {
        if self.is_stopping() {
            return Some(Started::Stopping);
        }
        let run_id = crate::sync::run::new_run_id();
        {
            let mut syncs = self.syncs();
            let status = syncs.get_mut(name)?;
            if let Some(running) = &status.running {
                if why == "schedule" {
                    status.skipped_ticks += 1;
                }
                return Some(Started::Running(running.clone()));
            }
            status.running = Some(run_id.clone());
        }
        let (done, finished) = oneshot::channel();
        let runner = Arc::clone(self);
        let (name, id) = (name.to_string(), run_id.clone());
        let task = tokio::spawn(async move {
            let permit = Arc::clone(&runner.slots).acquire_owned().await;
            tracing::info!(sync = %name, run_id = %id, cause = why, "Run started.");
            let result = match permit {
                Ok(_permit) => {
                    runner
                        .engine
                        .run_sync(&name, None, Some(id.clone()), Mode::Run)
                        .await
                }
                Err(_) => Err(crate::error::Error::Cancelled),
            };
            let (status, error) = match &result {
                Ok(Outcome::Write(w)) if w.rows_rejected > 0 => ("partial", None),
                Ok(_) => ("succeeded", None),
                Err(e) => ("failed", Some(e.to_string())),
            };
            match &result {
                Ok(Outcome::Write(w)) => tracing::info!(
                    sync = %name, run_id = %id, status, written = w.rows_written,
                    rejected = w.rows_rejected, "Run finished."
                ),
                _ => {
                    tracing::warn!(sync = %name, run_id = %id, status, error = error.as_deref().unwrap_or(""), "Run finished.")
                }
            }
            if let Some(s) = runner.syncs().get_mut(&name) {
                s.running = None;
                s.last_run = Some(id);
                s.last_status = Some(status.into());
                s.last_error = error;
            }
            let _ = done.send(());
        });
        let mut tasks = self.tasks.lock().expect("tasks lock");
        tasks.retain(|t| !t.is_finished());
        tasks.push(task);
        Some(Started::New(run_id, finished))
    }

    /// Starts each scheduled sync's loop; returns how many there are. A sync whose last run
    /// (in the state) is older than its last tick runs once now.
    pub async fn schedule(self: &Arc<Self>) -> Result<usize, String> {
        let mut loops = 0;
        for (name, schedule) in self.engine.schedules() {
            let Some(schedule) = schedule else {
                continue;
            };
            let timing = Timing::of(&schedule).map_err(|e| format!("sync {name}: {e}"))?;
            let last = self
                .engine
                .last_run_started(&name)
                .await
                .map_err(|e| e.to_string())?;
            let runner = Arc::clone(self);
            let mut stop = self.stop.subscribe();
            tokio::spawn(async move {
                if last.is_some_and(|last| timing.missed(last, Utc::now())) {
                    runner.start(&name, "missed schedule");
                }
                while let Some(next) = timing.next_after(Utc::now()) {
                    runner.set_next(&name, Some(next));
                    let wait = (next - Utc::now()).to_std().unwrap_or_default();
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = stop.wait_for(|s| *s) => break,
                    }
                    runner.start(&name, "schedule");
                }
                runner.set_next(&name, None);
            });
            loops += 1;
        }
        Ok(loops)
    }

    fn set_next(&self, name: &str, next: Option<DateTime<Utc>>) {
        if let Some(s) = self.syncs().get_mut(name) {
            s.next_run = next.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
        }
    }

    /// Stops new runs, gives running ones `grace` to finish, then cancels them (a cancelled run
    /// records itself as interrupted and releases its lock).
    pub async fn stop(&self, grace: Duration) {
        self.stop.send_replace(true);
        let tasks: Vec<JoinHandle<()>> = std::mem::take(&mut *self.tasks.lock().expect("tasks"));
        let aborts: Vec<_> = tasks.iter().map(|t| t.abort_handle()).collect();
        let all = futures::future::join_all(tasks);
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!(
                "Runs still going after the grace period were cancelled; they are recorded as interrupted."
            );
            for abort in aborts {
                abort.abort();
            }
        }
    }
}
