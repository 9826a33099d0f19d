//! Starting runs: by schedule, by trigger (a sequence, a change, a NOTIFY, a dbt run) or on
//! demand; never two of one sync at once (a tick that finds it running is skipped and counted,
//! a trigger is queued to run once after it, a request gets the running run's id); at most
//! `max_concurrent` syncs at once in all, each in the one session the project loaded (so runs
//! share each connection's rate limiter and quota).
//!
//! The runner knows the project only through [`Project`], and time only through [`Clock`], so
//! its time logic is tested on tokio's paused clock with a project that only pretends to run.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::{Semaphore, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::engine::{Engine, Mode, Outcome};
use crate::parser::Schedule;
use crate::schedule::{Timing, Trigger, jitter_of};
use crate::sync::SyncOptions;
use crate::sync::state::RunRecord;
use crate::watch::ChangeProbe;

/// How often `AFTER DBT` looks at `run_results.json`.
const DBT_POLL: Duration = Duration::from_secs(2);

/// The longest wait before reconnecting a lost `LISTEN` or retrying a failing probe.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The loaded project, as the runner uses it.
#[async_trait]
pub trait Project: Send + Sync + 'static {
    /// The named syncs: schedule and options.
    fn syncs(&self) -> Vec<(String, Option<Schedule>, SyncOptions)>;
    /// Runs a sync to its end.
    async fn run(&self, name: &str, run_id: &str) -> Ended;
    /// When the sync's last recorded run started.
    async fn last_started(&self, name: &str) -> Result<Option<DateTime<Utc>>, String>;
    /// Records that the sync did not run, and why.
    async fn record_skipped(&self, name: &str, reason: &str) -> Result<(), String>;
    async fn change_probe(&self, name: &str) -> Result<Arc<dyn ChangeProbe>, String>;
    async fn listen(&self, name: &str, channel: &str)
    -> Result<BoxStream<'static, String>, String>;
    /// The tables the sync's model reads.
    async fn inputs(&self, name: &str) -> Result<Vec<String>, String>;
    /// The session, for the API's queries of `sluice.*` tables.
    fn engine(&self) -> Option<&Engine> {
        None
    }
}

/// How a run ended.
#[derive(Debug, Clone, Default)]
pub struct Ended {
    /// succeeded | partial | failed | interrupted
    pub status: String,
    pub error: Option<String>,
    /// Its row of `sluice.runs`, if it got that far.
    pub record: Option<RunRecord>,
}

#[async_trait]
impl Project for Engine {
    fn syncs(&self) -> Vec<(String, Option<Schedule>, SyncOptions)> {
        self.schedules()
            .into_iter()
            .map(|(name, schedule)| {
                let options = self.sync_options(&name).unwrap_or_default();
                (name, schedule, options)
            })
            .collect()
    }

    async fn run(&self, name: &str, run_id: &str) -> Ended {
        let result = self
            .run_sync(name, None, Some(run_id.to_string()), Mode::Run)
            .await;
        let record = self.run_record(name, run_id).await.ok().flatten();
        let (status, error) = match &result {
            Ok(Outcome::Write(w)) if w.rows_rejected > 0 => ("partial".into(), None),
            Ok(_) => ("succeeded".into(), None),
            Err(crate::error::Error::Cancelled) => ("interrupted".into(), None),
            Err(e) => ("failed".into(), Some(e.to_string())),
        };
        Ended {
            status: record
                .as_ref()
                .map(|r| r.status.clone())
                .filter(|s| s != "running")
                .unwrap_or(status),
            error,
            record,
        }
    }

    async fn last_started(&self, name: &str) -> Result<Option<DateTime<Utc>>, String> {
        self.last_run_started(name).await.map_err(|e| e.to_string())
    }

    async fn record_skipped(&self, name: &str, reason: &str) -> Result<(), String> {
        Engine::record_skipped(self, name, reason)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    async fn change_probe(&self, name: &str) -> Result<Arc<dyn ChangeProbe>, String> {
        Engine::change_probe(self, name)
            .await
            .map_err(|e| e.to_string())
    }

    async fn listen(
        &self,
        name: &str,
        channel: &str,
    ) -> Result<BoxStream<'static, String>, String> {
        Engine::listen(self, name, channel)
            .await
            .map_err(|e| e.to_string())
    }

    async fn inputs(&self, name: &str) -> Result<Vec<String>, String> {
        self.sync_inputs(name).await.map_err(|e| e.to_string())
    }

    fn engine(&self) -> Option<&Engine> {
        Some(self)
    }
}

/// Now, from the system clock, or from tokio's clock (which tests pause and advance).
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    origin: Option<(DateTime<Utc>, tokio::time::Instant)>,
}

impl Clock {
    pub fn system() -> Self {
        Self { origin: None }
    }

    /// A clock that reads `start` now and moves with tokio's time.
    pub fn tokio(start: DateTime<Utc>) -> Self {
        Self {
            origin: Some((start, tokio::time::Instant::now())),
        }
    }

    pub fn now(&self) -> DateTime<Utc> {
        match self.origin {
            None => Utc::now(),
            Some((start, at)) => {
                start + chrono::Duration::from_std(at.elapsed()).unwrap_or(chrono::Duration::zero())
            }
        }
    }

    /// Sleeps until `t` (at once if it has passed).
    async fn sleep_until(&self, t: DateTime<Utc>) {
        let wait = (t - self.now()).to_std().unwrap_or_default();
        tokio::time::sleep(wait).await;
    }
}

/// What a sync is doing, for the API and the status page.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SyncStatus {
    pub name: String,
    pub schedule: Option<String>,
    /// The run in progress, if any.
    pub running: Option<String>,
    pub next_run: Option<String>,
    /// Ticks that found the sync still running.
    pub skipped_ticks: u64,
    /// A trigger that arrived while it ran: it runs once more when this run ends.
    pub queued: bool,
    /// This process's last finished run: its id, and `succeeded`, `partial`, `failed`,
    /// `interrupted` or `skipped`.
    pub last_run: Option<String>,
    pub last_status: Option<String>,
    pub last_error: Option<String>,
    /// What keeps its trigger from working (a probe or a LISTEN that fails), if anything.
    pub trigger_error: Option<String>,
}

/// What started a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cause {
    Schedule,
    /// A tick passed while the service was down.
    Missed,
    Api,
    /// The syncs it is scheduled after succeeded (the last of them named).
    After(String),
    Change,
    Notify,
    Dbt,
    /// A trigger arrived while it ran.
    Queued,
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cause::Schedule => write!(f, "schedule"),
            Cause::Missed => write!(f, "missed schedule"),
            Cause::Api => write!(f, "api"),
            Cause::After(s) => write!(f, "after {s}"),
            Cause::Change => write!(f, "change"),
            Cause::Notify => write!(f, "notify"),
            Cause::Dbt => write!(f, "dbt"),
            Cause::Queued => write!(f, "queued trigger"),
        }
    }
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

/// One sync, as the runner tracks it.
#[derive(Debug, Clone)]
struct Tracked {
    status: SyncStatus,
    trigger: Option<Trigger>,
    options: SyncOptions,
    /// When this process last started it.
    started_at: Option<DateTime<Utc>>,
    /// When it last finished well enough for the syncs scheduled after it.
    ok_at: Option<DateTime<Utc>>,
}

/// A sync's triggers, checked: every `AFTER` names a sync and none forms a cycle.
pub fn triggers(
    syncs: &[(String, Option<Schedule>, SyncOptions)],
) -> Result<BTreeMap<String, Trigger>, (String, String)> {
    let mut out = BTreeMap::new();
    for (name, schedule, _) in syncs {
        if let Some(schedule) = schedule {
            let trigger = Trigger::of(schedule).map_err(|e| (name.clone(), e))?;
            out.insert(name.clone(), trigger);
        }
    }
    let names: BTreeSet<&str> = syncs.iter().map(|(n, _, _)| n.as_str()).collect();
    for (name, trigger) in &out {
        if let Trigger::After(upstream) = trigger {
            for u in upstream {
                if !names.contains(u.as_str()) {
                    return Err((
                        name.clone(),
                        format!(
                            "SCHEDULE AFTER {u}: no sync named '{u}'{}",
                            crate::error::did_you_mean(u, names.iter().copied())
                        ),
                    ));
                }
                if u == name {
                    return Err((
                        name.clone(),
                        format!("SCHEDULE AFTER {u}: a sync cannot run after itself"),
                    ));
                }
            }
        }
    }
    // A cycle: follow AFTER edges from each sync.
    for start in out.keys() {
        let mut path = vec![start.clone()];
        if let Some(cycle) = find_cycle(&out, start, &mut path) {
            return Err((
                start.clone(),
                format!(
                    "SCHEDULE AFTER forms a cycle ({}): no sync in it would ever run",
                    cycle.join(" after ")
                ),
            ));
        }
    }
    Ok(out)
}

fn find_cycle(
    triggers: &BTreeMap<String, Trigger>,
    at: &str,
    path: &mut Vec<String>,
) -> Option<Vec<String>> {
    let Some(Trigger::After(upstream)) = triggers.get(at) else {
        return None;
    };
    for u in upstream {
        if path.first().is_some_and(|s| s == u) {
            let mut cycle = path.clone();
            cycle.push(u.clone());
            return Some(cycle);
        }
        if path.contains(u) {
            continue;
        }
        path.push(u.clone());
        if let Some(c) = find_cycle(triggers, u, path) {
            return Some(c);
        }
        path.pop();
    }
    None
}

/// Whether a finished run lets the syncs scheduled after it run; if not, why.
fn chain_verdict(name: &str, ended: &Ended, options: &SyncOptions) -> Result<(), String> {
    match ended.status.as_str() {
        "succeeded" => Ok(()),
        "partial" => {
            let Some(max) = options.max_reject_pct else {
                return Ok(());
            };
            let Some(r) = &ended.record else {
                return Ok(());
            };
            let sent = r.inserted + r.updated + r.deleted + r.rejected;
            let pct = if sent == 0 {
                0.0
            } else {
                r.rejected as f64 * 100.0 / sent as f64
            };
            if pct > max {
                Err(format!(
                    "{name} rejected {} of the {sent} records it sent ({pct:.1}%), above its max_reject_pct {max} (run {})",
                    r.rejected, r.run_id
                ))
            } else {
                Ok(())
            }
        }
        other => Err(format!(
            "{name} {other}{}{}",
            ended
                .record
                .as_ref()
                .map(|r| format!(" (run {})", r.run_id))
                .unwrap_or_default(),
            ended
                .error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        )),
    }
}

/// Starts and tracks runs.
pub struct Runner {
    project: RwLock<Arc<dyn Project>>,
    clock: Clock,
    slots: Arc<Semaphore>,
    syncs: Mutex<BTreeMap<String, Tracked>>,
    /// Runs in progress.
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// The trigger loops of the loaded definitions (replaced on reload).
    loops: Mutex<Vec<JoinHandle<()>>>,
    stop: watch::Sender<bool>,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner").finish_non_exhaustive()
    }
}

impl Runner {
    /// A runner of `project`'s syncs; an error names the sync whose schedule is wrong.
    pub fn new(
        project: Arc<dyn Project>,
        max_concurrent: usize,
        clock: Clock,
    ) -> Result<Arc<Self>, (String, String)> {
        let runner = Arc::new(Self {
            project: RwLock::new(Arc::clone(&project)),
            clock,
            slots: Arc::new(Semaphore::new(max_concurrent.max(1))),
            syncs: Mutex::default(),
            tasks: Mutex::default(),
            loops: Mutex::default(),
            stop: watch::channel(false).0,
        });
        runner.track(project.as_ref())?;
        Ok(runner)
    }

    /// Tracks the syncs of `project` (keeping what is known of syncs tracked before).
    fn track(&self, project: &dyn Project) -> Result<(), (String, String)> {
        let defined = project.syncs();
        let mut triggers = triggers(&defined)?;
        let mut syncs = self.syncs();
        let before = std::mem::take(&mut *syncs);
        for (name, schedule, options) in defined {
            let mut tracked = before.get(&name).cloned().unwrap_or_else(|| Tracked {
                status: SyncStatus {
                    name: name.clone(),
                    ..Default::default()
                },
                trigger: None,
                options: options.clone(),
                started_at: None,
                ok_at: None,
            });
            tracked.status.schedule = schedule.as_ref().map(Schedule::to_string);
            tracked.status.next_run = None;
            tracked.status.trigger_error = None;
            tracked.trigger = triggers.remove(&name);
            tracked.options = options;
            syncs.insert(name, tracked);
        }
        // A dropped sync that is still running stays until its run ends.
        for (name, tracked) in before {
            if tracked.status.running.is_some() && !syncs.contains_key(&name) {
                syncs.insert(name, tracked);
            }
        }
        Ok(())
    }

    /// The loaded project.
    pub fn project(&self) -> Arc<dyn Project> {
        Arc::clone(&self.project.read().expect("project lock"))
    }

    fn syncs(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Tracked>> {
        self.syncs.lock().expect("runner lock")
    }

    /// The named syncs.
    pub fn names(&self) -> Vec<String> {
        self.syncs().keys().cloned().collect()
    }

    /// Every sync's status, by name.
    pub fn statuses(&self) -> Vec<SyncStatus> {
        self.syncs().values().map(|t| t.status.clone()).collect()
    }

    pub fn status(&self, name: &str) -> Option<SyncStatus> {
        self.syncs().get(name).map(|t| t.status.clone())
    }

    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
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

    /// Starts a run of `name` now; `None` for a sync that does not exist.
    pub fn start(self: &Arc<Self>, name: &str, cause: Cause) -> Option<Started> {
        if self.is_stopping() {
            return Some(Started::Stopping);
        }
        let run_id = crate::sync::run::new_run_id();
        {
            let mut syncs = self.syncs();
            let tracked = syncs.get_mut(name)?;
            if let Some(running) = &tracked.status.running {
                match cause {
                    Cause::Schedule | Cause::Missed => {
                        tracked.status.skipped_ticks += 1;
                        metrics::counter!("sluice_skipped_ticks_total", "sync" => name.to_string())
                            .increment(1);
                    }
                    Cause::Api => {}
                    _ => tracked.status.queued = true,
                }
                return Some(Started::Running(running.clone()));
            }
            tracked.status.running = Some(run_id.clone());
            tracked.started_at = Some(self.clock.now());
        }
        let (done, finished) = oneshot::channel();
        let runner = Arc::clone(self);
        let project = self.project();
        let (name, id) = (name.to_string(), run_id.clone());
        let span = tracing::info_span!("run", sync = %name, run_id = %id);
        let task = tokio::spawn(
            async move {
                let permit = Arc::clone(&runner.slots).acquire_owned().await;
                tracing::info!(cause = %cause, "Run started.");
                let started = std::time::Instant::now();
                let ended = match permit {
                    Ok(_permit) => project.run(&name, &id).await,
                    Err(_) => Ended {
                        status: "interrupted".into(),
                        ..Default::default()
                    },
                };
                let elapsed = started.elapsed();
                match &ended.record {
                    Some(r) if ended.error.is_none() => tracing::info!(
                        status = %ended.status, inserted = r.inserted, updated = r.updated,
                        deleted = r.deleted, rejected = r.rejected, duration_ms = r.duration_ms,
                        "Run finished."
                    ),
                    _ => tracing::warn!(
                        status = %ended.status, error = ended.error.as_deref().unwrap_or(""),
                        "Run finished."
                    ),
                }
                super::metrics::record_run(&name, &ended.status, ended.record.as_ref(), elapsed);
                runner.finished(&name, &id, ended).await;
                let _ = done.send(());
            }
            .instrument(span),
        );
        let mut tasks = self.tasks.lock().expect("tasks lock");
        tasks.retain(|t| !t.is_finished());
        tasks.push(task);
        Some(Started::New(run_id, finished))
    }

    /// After a run of `name`: its status, a queued trigger, and the syncs scheduled after it.
    async fn finished(self: &Arc<Self>, name: &str, id: &str, ended: Ended) {
        let now = self.clock.now();
        let (verdict, again) = {
            let mut syncs = self.syncs();
            let Some(tracked) = syncs.get_mut(name) else {
                return;
            };
            let verdict = chain_verdict(name, &ended, &tracked.options);
            tracked.status.running = None;
            tracked.status.last_run = Some(id.to_string());
            tracked.status.last_status = Some(ended.status.clone());
            tracked.status.last_error = ended.error.clone();
            if verdict.is_ok() {
                tracked.ok_at = Some(now);
                super::metrics::last_success(name, now);
            }
            (verdict, std::mem::take(&mut tracked.status.queued))
        };
        if again {
            self.start(name, Cause::Queued);
        }
        match verdict {
            Ok(()) => {
                for next in self.ready_after(name) {
                    self.start(&next, Cause::After(name.to_string()));
                }
            }
            Err(why) => self.stop_chain(name, why).await,
        }
    }

    /// The syncs scheduled after `name` whose every upstream has succeeded since they last
    /// started.
    fn ready_after(&self, name: &str) -> Vec<String> {
        let syncs = self.syncs();
        syncs
            .iter()
            .filter_map(|(next, t)| match &t.trigger {
                Some(Trigger::After(upstream)) if upstream.iter().any(|u| u == name) => {
                    let ready = upstream.iter().all(|u| {
                        let ok = syncs.get(u).and_then(|s| s.ok_at);
                        match (ok, t.started_at) {
                            (Some(ok), Some(started)) => ok > started,
                            (Some(_), None) => true,
                            (None, _) => false,
                        }
                    });
                    ready.then(|| next.clone())
                }
                _ => None,
            })
            .collect()
    }

    /// A sequence stops at `name`: each sync after it (and after those) is recorded as
    /// skipped, with why.
    async fn stop_chain(&self, name: &str, why: String) {
        let mut pending = vec![(name.to_string(), why)];
        let mut seen = BTreeSet::new();
        while let Some((upstream, why)) = pending.pop() {
            let after: Vec<String> = self
                .syncs()
                .iter()
                .filter(
                    |(_, t)| matches!(&t.trigger, Some(Trigger::After(u)) if u.contains(&upstream)),
                )
                .map(|(n, _)| n.clone())
                .collect();
            for next in after {
                if !seen.insert(next.clone()) {
                    continue;
                }
                let reason = if upstream == name {
                    format!("not run: the sequence stopped because {why}")
                } else {
                    format!("not run: {upstream}, which it runs after, was not run ({why})")
                };
                tracing::warn!(sync = %next, reason = %reason, "Sequence stopped.");
                if let Err(e) = self.project().record_skipped(&next, &reason).await {
                    tracing::warn!(sync = %next, error = %e, "Could not record the skipped run.");
                }
                metrics::counter!("sluice_runs_total", "sync" => next.clone(), "status" => "skipped")
                    .increment(1);
                if let Some(t) = self.syncs().get_mut(&next) {
                    t.status.last_status = Some("skipped".into());
                    t.status.last_error = Some(reason.clone());
                }
                pending.push((next, why.clone()));
            }
        }
    }

    /// Starts the loop of each sync's trigger (ending those of definitions loaded before);
    /// answers how many there are.
    pub fn schedule(self: &Arc<Self>) -> usize {
        let triggers: Vec<(String, Trigger, SyncOptions)> = self
            .syncs()
            .iter()
            .filter_map(|(name, t)| Some((name.clone(), t.trigger.clone()?, t.options.clone())))
            .collect();
        let mut loops = self.loops.lock().expect("loops lock");
        for old in loops.drain(..) {
            old.abort();
        }
        let mut count = 0;
        for (name, trigger, options) in triggers {
            let runner = Arc::clone(self);
            let task = match trigger {
                Trigger::Timed(timing) => {
                    tokio::spawn(async move { runner.timed(&name, timing, options.jitter).await })
                }
                Trigger::OnChange(every) => {
                    tokio::spawn(async move { runner.on_change(&name, every).await })
                }
                Trigger::OnNotify(channel) => {
                    tokio::spawn(async move { runner.on_notify(&name, &channel).await })
                }
                Trigger::AfterDbt(path) => {
                    tokio::spawn(async move { runner.after_dbt(&name, &path).await })
                }
                Trigger::After(_) => {
                    count += 1;
                    continue;
                }
            };
            loops.push(task);
            count += 1;
        }
        count
    }

    /// Replaces the project (after a reload): runs in progress finish on the one they started
    /// with; triggers follow the new definitions.
    pub fn reload(self: &Arc<Self>, project: Arc<dyn Project>) -> Result<usize, (String, String)> {
        self.track(project.as_ref())?;
        *self.project.write().expect("project lock") = project;
        Ok(self.schedule())
    }

    /// Sleeps `wait`, or until the service stops: false then.
    async fn pause(&self, wait: Duration) -> bool {
        let mut stop = self.stop.subscribe();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => return false,
        }
        !*stop.borrow()
    }

    fn set_trigger_error(&self, name: &str, error: Option<String>) {
        if let Some(t) = self.syncs().get_mut(name) {
            if error.is_some() && t.status.trigger_error != error {
                tracing::warn!(sync = %name, error = error.as_deref().unwrap_or(""), "Its trigger does not work; retrying.");
            }
            t.status.trigger_error = error;
        }
    }

    /// `EVERY` / `CRON`: a run on each tick (shifted by the sync's jitter), and one at start
    /// when a tick passed while the service was down.
    async fn timed(self: Arc<Self>, name: &str, timing: Timing, jitter: Duration) {
        let offset = chrono::Duration::from_std(jitter_of(name, jitter)).unwrap_or_default();
        let last = self.project().last_started(name).await.ok().flatten();
        if last.is_some_and(|last| timing.missed(last - offset, self.clock.now() - offset)) {
            self.start(name, Cause::Missed);
        }
        let mut stop = self.stop.subscribe();
        while let Some(tick) = timing.next_after(self.clock.now() - offset) {
            let fire = tick + offset;
            self.set_next(name, Some(fire));
            tokio::select! {
                _ = self.clock.sleep_until(fire) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
            let late = (self.clock.now() - fire).to_std().unwrap_or_default();
            metrics::histogram!("sluice_tick_lateness_seconds").record(late.as_secs_f64());
            self.start(name, Cause::Schedule);
        }
        self.set_next(name, None);
    }

    /// `ON CHANGE`: runs when the inputs' fingerprint changes (and once at start: what changed
    /// while the service was down is not known).
    async fn on_change(self: Arc<Self>, name: &str, every: Duration) {
        let mut backoff = every;
        let probe = loop {
            match self.project().change_probe(name).await {
                Ok(p) => break p,
                Err(e) => self.set_trigger_error(name, Some(e)),
            }
            if !self.pause(backoff).await {
                return;
            }
            backoff = (backoff * 2).min(MAX_BACKOFF.max(every));
        };
        self.set_trigger_error(name, None);
        tracing::info!(sync = %name, watching = %probe.describe(), every_ms = every.as_millis() as u64, "Watching for changes.");
        let mut seen: Option<String> = None;
        loop {
            match probe.fingerprint().await {
                Ok(fingerprint) => {
                    self.set_trigger_error(name, None);
                    if seen.as_ref() != Some(&fingerprint) {
                        if let Some(Started::Stopping) = self.start(name, Cause::Change) {
                            return;
                        }
                        // Started, or queued to run again after the running run.
                        seen = Some(fingerprint);
                    }
                }
                Err(e) => self.set_trigger_error(name, Some(e.to_string())),
            }
            if !self.pause(every).await {
                return;
            }
        }
    }

    /// `ON NOTIFY`: a run per NOTIFY (those arriving while it runs make one more run); after
    /// each (re)connection one run, for what was sent while nobody listened.
    async fn on_notify(self: Arc<Self>, name: &str, channel: &str) {
        let mut backoff = Duration::from_secs(1);
        loop {
            match self.project().listen(name, channel).await {
                Ok(mut notifications) => {
                    self.set_trigger_error(name, None);
                    backoff = Duration::from_secs(1);
                    tracing::info!(sync = %name, channel, "Listening.");
                    self.start(name, Cause::Notify);
                    let mut stop = self.stop.subscribe();
                    loop {
                        tokio::select! {
                            n = notifications.next() => match n {
                                Some(_) => { self.start(name, Cause::Notify); }
                                None => break,
                            },
                            _ = stop.wait_for(|s| *s) => return,
                        }
                    }
                    self.set_trigger_error(
                        name,
                        Some(format!(
                            "ON NOTIFY '{channel}': the connection was lost; reconnecting"
                        )),
                    );
                }
                Err(e) => self.set_trigger_error(name, Some(e)),
            }
            if !self.pause(backoff).await {
                return;
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// `AFTER DBT`: runs when `run_results.json` in `target` is newer than the sync's last
    /// start and shows the models the sync reads built (or, when none of them is in it, any
    /// model built) without error.
    async fn after_dbt(self: Arc<Self>, name: &str, target: &std::path::Path) {
        let file = target.join("run_results.json");
        let mut last_modified = None;
        let mut inputs: Option<Vec<String>> = None;
        loop {
            let modified = tokio::fs::metadata(&file)
                .await
                .and_then(|m| m.modified())
                .ok();
            if modified.is_some() && modified != last_modified {
                if inputs.is_none() {
                    match self.project().inputs(name).await {
                        Ok(i) => inputs = Some(i),
                        Err(e) => self.set_trigger_error(name, Some(e)),
                    }
                }
                if let Some(inputs) = &inputs {
                    last_modified = modified;
                    self.dbt_results(name, &file, inputs).await;
                }
            }
            if !self.pause(DBT_POLL).await {
                return;
            }
        }
    }

    async fn dbt_results(self: &Arc<Self>, name: &str, file: &std::path::Path, inputs: &[String]) {
        let text = match tokio::fs::read(file).await {
            Ok(t) => t,
            Err(e) => {
                self.set_trigger_error(name, Some(format!("cannot read {}: {e}", file.display())));
                return;
            }
        };
        let results = match DbtResults::parse(&text) {
            Ok(r) => r,
            Err(e) => {
                self.set_trigger_error(name, Some(format!("{}: {e}", file.display())));
                return;
            }
        };
        self.set_trigger_error(name, None);
        let started = self.syncs().get(name).and_then(|t| t.started_at);
        let started = match started {
            Some(s) => Some(s),
            None => self.project().last_started(name).await.ok().flatten(),
        };
        if started.is_some_and(|s| results.generated_at <= s) {
            return;
        }
        match results.verdict(inputs) {
            Ok(models) => {
                tracing::info!(sync = %name, models = %models, "dbt built its models.");
                self.start(name, Cause::Dbt);
            }
            Err(why) => tracing::info!(sync = %name, why = %why, "dbt's run does not start it."),
        }
    }

    fn set_next(&self, name: &str, next: Option<DateTime<Utc>>) {
        super::metrics::next_run(name, next);
        if let Some(t) = self.syncs().get_mut(name) {
            t.status.next_run = next.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
        }
    }

    /// Stops new runs, gives running ones `grace` to finish, then cancels them (a cancelled run
    /// records itself as interrupted and releases its lock).
    pub async fn stop(&self, grace: Duration) {
        self.stop.send_replace(true);
        for task in self.loops.lock().expect("loops").drain(..) {
            task.abort();
        }
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

/// What sluice reads of dbt's `run_results.json`.
#[derive(Debug)]
struct DbtResults {
    generated_at: DateTime<Utc>,
    /// (model name, status) of each model result.
    models: Vec<(String, String)>,
}

impl DbtResults {
    fn parse(text: &[u8]) -> Result<Self, String> {
        #[derive(serde::Deserialize)]
        struct File {
            metadata: Metadata,
            results: Vec<Result1>,
        }
        #[derive(serde::Deserialize)]
        struct Metadata {
            generated_at: String,
        }
        #[derive(serde::Deserialize)]
        struct Result1 {
            unique_id: String,
            status: String,
        }
        let file: File = serde_json::from_slice(text)
            .map_err(|e| format!("not a dbt run_results.json ({e})"))?;
        let generated_at = DateTime::parse_from_rfc3339(&file.metadata.generated_at)
            .or_else(|_| {
                // dbt writes `2026-12-08T10:00:00.123456Z`; older versions omit the zone.
                DateTime::parse_from_rfc3339(&format!("{}Z", file.metadata.generated_at))
            })
            .map_err(|e| format!("metadata.generated_at: {e}"))?
            .with_timezone(&Utc);
        let models = file
            .results
            .into_iter()
            .filter(|r| r.unique_id.starts_with("model."))
            .map(|r| {
                let model = r
                    .unique_id
                    .rsplit('.')
                    .next()
                    .unwrap_or_default()
                    .to_lowercase();
                (model, r.status)
            })
            .collect();
        Ok(Self {
            generated_at,
            models,
        })
    }

    /// Whether the run built what a sync reading `inputs` needs: the models named like its
    /// input tables all succeeded, or (none of them being in the run) some model did.
    fn verdict(&self, inputs: &[String]) -> Result<String, String> {
        let wanted: BTreeSet<String> = inputs
            .iter()
            .map(|t| {
                t.rsplit('.')
                    .next()
                    .unwrap_or(t)
                    .trim_matches('"')
                    .to_lowercase()
            })
            .collect();
        let ours: Vec<&(String, String)> = self
            .models
            .iter()
            .filter(|(m, _)| wanted.contains(m))
            .collect();
        if ours.is_empty() {
            return match self.models.iter().find(|(_, s)| s == "success") {
                Some(_) => Ok("(none of its tables is a model of this run; a model built)".into()),
                None => Err("no model of this run succeeded".into()),
            };
        }
        match ours.iter().find(|(_, s)| s != "success") {
            Some((m, s)) => Err(format!("model {m} ended with status {s}")),
            None => Ok(ours
                .iter()
                .map(|(m, _)| m.as_str())
                .collect::<Vec<_>>()
                .join(", ")),
        }
    }
}

#[cfg(test)]
mod tests {
    //! The runner's time logic on tokio's paused clock, with a project that only pretends to
    //! run (each run takes the time it is told, and ends as scripted).

    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[derive(Default)]
    struct Fake {
        syncs: Vec<(String, Option<Schedule>, SyncOptions)>,
        /// How long each sync's runs take.
        takes: BTreeMap<String, Duration>,
        /// Scripted ends, in order, per sync (then: succeeded).
        ends: Mutex<BTreeMap<String, VecDeque<Ended>>>,
        last_started: Option<DateTime<Utc>>,
        clock: Option<Clock>,
        /// (sync, when) of each run started.
        runs: Mutex<Vec<(String, DateTime<Utc>)>>,
        skipped: Mutex<Vec<(String, String)>>,
        /// What ON CHANGE's probe reads.
        data: Arc<AtomicU64>,
    }

    #[derive(Debug)]
    struct Probe(Arc<AtomicU64>);

    #[async_trait]
    impl ChangeProbe for Probe {
        fn describe(&self) -> String {
            "a counter".into()
        }
        async fn fingerprint(&self) -> crate::Result<String> {
            Ok(self.0.load(Ordering::SeqCst).to_string())
        }
    }

    #[async_trait]
    impl Project for Fake {
        fn syncs(&self) -> Vec<(String, Option<Schedule>, SyncOptions)> {
            self.syncs.clone()
        }
        async fn run(&self, name: &str, run_id: &str) -> Ended {
            let now = self.clock.unwrap().now();
            self.runs.lock().unwrap().push((name.to_string(), now));
            if let Some(d) = self.takes.get(name) {
                tokio::time::sleep(*d).await;
            }
            let scripted = self
                .ends
                .lock()
                .unwrap()
                .get_mut(name)
                .and_then(VecDeque::pop_front);
            let mut ended = scripted.unwrap_or(Ended {
                status: "succeeded".into(),
                ..Default::default()
            });
            if let Some(r) = &mut ended.record {
                r.run_id = run_id.to_string();
            }
            ended
        }
        async fn last_started(&self, _: &str) -> Result<Option<DateTime<Utc>>, String> {
            Ok(self.last_started)
        }
        async fn record_skipped(&self, name: &str, reason: &str) -> Result<(), String> {
            self.skipped
                .lock()
                .unwrap()
                .push((name.to_string(), reason.to_string()));
            Ok(())
        }
        async fn change_probe(&self, _: &str) -> Result<Arc<dyn ChangeProbe>, String> {
            Ok(Arc::new(Probe(Arc::clone(&self.data))))
        }
        async fn listen(&self, _: &str, _: &str) -> Result<BoxStream<'static, String>, String> {
            Err("no Postgres here".into())
        }
        async fn inputs(&self, _: &str) -> Result<Vec<String>, String> {
            Ok(vec![])
        }
    }

    fn sync(name: &str, schedule: Option<Schedule>) -> (String, Option<Schedule>, SyncOptions) {
        (name.to_string(), schedule, SyncOptions::default())
    }

    fn every(text: &str) -> Option<Schedule> {
        Some(Schedule::Every(text.into()))
    }

    fn after(names: &[&str]) -> Option<Schedule> {
        Some(Schedule::After(
            names.iter().map(|s| s.to_string()).collect(),
        ))
    }

    /// A runner of `fake` whose clock starts at `start`, its loops started.
    fn runner(mut fake: Fake, start: &str) -> (Arc<Runner>, Arc<Fake>) {
        let clock = Clock::tokio(at(start));
        fake.clock = Some(clock);
        let fake = Arc::new(fake);
        let runner = Runner::new(Arc::clone(&fake) as Arc<dyn Project>, 4, clock).unwrap();
        runner.schedule();
        (runner, fake)
    }

    fn runs_of(fake: &Fake, name: &str) -> Vec<DateTime<Utc>> {
        fake.runs
            .lock()
            .unwrap()
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, t)| *t)
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn every_ticks_on_time_and_never_overlaps() {
        let fake = Fake {
            syncs: vec![
                sync("quick", every("10 seconds")),
                sync("slow", every("10 seconds")),
            ],
            takes: [("slow".to_string(), Duration::from_secs(25))].into(),
            ..Default::default()
        };
        let (runner, fake) = runner(fake, "2026-12-07T10:00:03Z");
        tokio::time::sleep(Duration::from_secs(58)).await;
        assert_eq!(
            runs_of(&fake, "quick"),
            [
                "10:00:10", "10:00:20", "10:00:30", "10:00:40", "10:00:50", "10:01:00"
            ]
            .map(|t| at(&format!("2026-12-07T{t}Z")))
        );
        // slow: runs 10→35 and 40→65; the ticks at 20, 30, 50 and 60 found it running.
        assert_eq!(
            runs_of(&fake, "slow"),
            [at("2026-12-07T10:00:10Z"), at("2026-12-07T10:00:40Z")]
        );
        assert_eq!(runner.status("slow").unwrap().skipped_ticks, 4);
        assert_eq!(
            runner.status("quick").unwrap().next_run.as_deref(),
            Some("2026-12-07T10:01:10Z")
        );
        runner.stop(Duration::from_secs(30)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_missed_tick_runs_once_at_start() {
        let fake = Fake {
            syncs: vec![sync("hourly", every("1 hour"))],
            // Down for three hours: three ticks were missed.
            last_started: Some(at("2026-12-07T07:00:00Z")),
            ..Default::default()
        };
        let (runner, fake) = runner(fake, "2026-12-07T10:20:00Z");
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(
            runs_of(&fake, "hourly"),
            [at("2026-12-07T10:20:00Z"), at("2026-12-07T11:00:00Z")]
        );
        runner.stop(Duration::from_secs(1)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn jitter_shifts_every_tick_by_the_same_bounded_offset() {
        let options = SyncOptions {
            jitter: Duration::from_secs(30),
            ..Default::default()
        };
        let fake = Fake {
            syncs: vec![("spread".into(), every("1 minute"), options)],
            ..Default::default()
        };
        let (runner, fake) = runner(fake, "2026-12-07T10:00:00Z");
        tokio::time::sleep(Duration::from_secs(150)).await;
        let runs = runs_of(&fake, "spread");
        assert_eq!(runs.len(), 3, "{runs:?}");
        let offset = jitter_of("spread", Duration::from_secs(30));
        for (i, t) in runs.iter().enumerate() {
            let tick = at("2026-12-07T10:00:00Z") + chrono::Duration::minutes(i as i64);
            let late = (*t - tick).to_std().unwrap();
            assert!(late < Duration::from_secs(30), "{t} {tick}");
            assert_eq!(late.as_millis(), offset.as_millis(), "{t}");
        }
        runner.stop(Duration::from_secs(1)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn cron_in_a_timezone_runs_at_local_time_across_a_dst_change() {
        let fake = Fake {
            syncs: vec![sync(
                "morning",
                Some(Schedule::Cron {
                    expression: "0 9 * * *".into(),
                    timezone: Some("Europe/Paris".into()),
                }),
            )],
            ..Default::default()
        };
        // 2026-03-29: Paris moves from UTC+1 to UTC+2.
        let (runner, fake) = runner(fake, "2026-03-28T06:00:00Z");
        tokio::time::sleep(Duration::from_secs(3 * 24 * 3600)).await;
        assert_eq!(
            runs_of(&fake, "morning"),
            [
                at("2026-03-28T08:00:00Z"),
                at("2026-03-29T07:00:00Z"),
                at("2026-03-30T07:00:00Z"),
            ]
        );
        runner.stop(Duration::from_secs(1)).await;
    }

    fn failed(error: &str) -> Ended {
        Ended {
            status: "failed".into(),
            error: Some(error.into()),
            record: None,
        }
    }

    fn partial(sent: u64, rejected: u64) -> Ended {
        Ended {
            status: "partial".into(),
            error: None,
            record: Some(RunRecord {
                inserted: sent - rejected,
                rejected,
                ..Default::default()
            }),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_sequence_runs_in_order_and_stops_at_a_failure_or_too_many_rejects() {
        let strict = SyncOptions {
            max_reject_pct: Some(5.0),
            ..Default::default()
        };
        let fake = Fake {
            syncs: vec![
                ("a".into(), every("10 seconds"), strict),
                sync("b", after(&["a"])),
                sync("c", after(&["b"])),
            ],
            takes: [("a".to_string(), Duration::from_secs(1))].into(),
            ends: Mutex::new(
                [(
                    "a".to_string(),
                    // 1st ok (2% rejected), 2nd fails, 3rd rejects 10%.
                    VecDeque::from([partial(100, 2), failed("HTTP 500"), partial(100, 10)]),
                )]
                .into(),
            ),
            ..Default::default()
        };
        let (runner, fake) = runner(fake, "2026-12-07T10:00:05Z");
        tokio::time::sleep(Duration::from_secs(33)).await;
        let order: Vec<String> = fake
            .runs
            .lock()
            .unwrap()
            .iter()
            .map(|(n, _)| n.clone())
            .collect();
        // Tick 10: a, b, c. Tick 20: a fails. Tick 30: a over max_reject_pct.
        assert_eq!(order, ["a", "b", "c", "a", "a"]);
        assert_eq!(runs_of(&fake, "b"), [at("2026-12-07T10:00:11Z")]);
        let skipped = fake.skipped.lock().unwrap().clone();
        let names: Vec<&str> = skipped.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["b", "c", "b", "c"]);
        assert!(skipped[0].1.contains("a failed: HTTP 500"), "{skipped:?}");
        assert!(
            skipped[1].1.contains("b, which it runs after, was not run"),
            "{skipped:?}"
        );
        assert!(
            skipped[2].1.contains(
                "rejected 10 of the 100 records it sent (10.0%), above its max_reject_pct 5"
            ),
            "{skipped:?}"
        );
        assert_eq!(
            runner.status("b").unwrap().last_status.as_deref(),
            Some("skipped")
        );
        runner.stop(Duration::from_secs(1)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_sync_after_two_waits_for_both() {
        let fake = Fake {
            syncs: vec![
                sync("a", every("10 seconds")),
                sync("b", every("20 seconds")),
                sync("both", after(&["a", "b"])),
            ],
            ..Default::default()
        };
        let (runner, fake) = runner(fake, "2026-12-07T10:00:01Z");
        tokio::time::sleep(Duration::from_secs(45)).await;
        // a at 10, 20, 30, 40; b at 20, 40: both have succeeded since its last start at 20
        // and 40 only.
        assert_eq!(
            runs_of(&fake, "both"),
            [at("2026-12-07T10:00:20Z"), at("2026-12-07T10:00:40Z")]
        );
        runner.stop(Duration::from_secs(1)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn on_change_runs_when_the_fingerprint_moves_and_queues_a_change_seen_while_running() {
        let fake = Fake {
            syncs: vec![sync(
                "live",
                Some(Schedule::OnChange {
                    every: Some("1 second".into()),
                }),
            )],
            takes: [("live".to_string(), Duration::from_millis(2500))].into(),
            ..Default::default()
        };
        let (runner, fake) = runner(fake, "2026-12-07T10:00:00Z");
        // The first check runs it (changes while the service was down are unknown).
        tokio::time::sleep(Duration::from_millis(5500)).await;
        assert_eq!(runs_of(&fake, "live").len(), 1);
        // A change: the next check runs it.
        fake.data.store(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(runs_of(&fake, "live").len(), 2);
        // A change while it runs: queued, then run once when that run ends.
        tokio::time::sleep(Duration::from_millis(500)).await;
        fake.data.store(2, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert!(runner.status("live").unwrap().queued);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(runs_of(&fake, "live").len(), 3);
        runner.stop(Duration::from_secs(5)).await;
    }

    #[test]
    fn after_must_name_syncs_and_form_no_cycle() {
        let e = triggers(&[sync("a", every("1 minute")), sync("b", after(&["aa"]))]).unwrap_err();
        assert_eq!(e.0, "b");
        assert!(
            e.1.contains("no sync named 'aa'") && e.1.contains("did you mean 'a'"),
            "{e:?}"
        );
        let e = triggers(&[sync("a", after(&["a"]))]).unwrap_err();
        assert!(e.1.contains("after itself"), "{e:?}");
        let e = triggers(&[
            sync("a", after(&["c"])),
            sync("b", after(&["a"])),
            sync("c", after(&["b"])),
            sync("d", every("1 minute")),
        ])
        .unwrap_err();
        assert!(e.1.contains("cycle (a after c after b after a)"), "{e:?}");
        assert!(triggers(&[sync("a", every("1 minute")), sync("b", after(&["a"]))]).is_ok());
    }

    #[test]
    fn dbt_results_start_a_sync_when_its_models_built() {
        let results = DbtResults::parse(
            br#"{"metadata": {"generated_at": "2026-12-07T10:00:00.123456Z"},
                 "results": [
                   {"unique_id": "model.shop.user_scores", "status": "success"},
                   {"unique_id": "model.shop.orders", "status": "error"},
                   {"unique_id": "test.shop.not_null_x", "status": "pass"}]}"#,
        )
        .unwrap();
        assert_eq!(results.generated_at, at("2026-12-07T10:00:00.123456Z"));
        assert_eq!(
            results.verdict(&["wh.analytics.user_scores".into()]),
            Ok("user_scores".into())
        );
        let e = results
            .verdict(&[
                "wh.analytics.user_scores".into(),
                "wh.analytics.orders".into(),
            ])
            .unwrap_err();
        assert!(e.contains("orders ended with status error"), "{e}");
        // None of its tables is a model here: any model built is enough.
        assert!(results.verdict(&["files.people".into()]).is_ok());
        assert!(DbtResults::parse(b"{}").is_err());
    }
}
