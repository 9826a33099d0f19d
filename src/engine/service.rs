//! What `sluice serve` asks of a session beyond running syncs: each sync's options, what its
//! model reads and how to watch it, and run records for runs a sequence did not start.

use std::sync::Arc;

use futures::stream::BoxStream;

use super::{Engine, SyncContext};
use crate::error::Result;
use crate::sync::state::RunRecord;
use crate::sync::{SyncOptions, state};
use crate::watch::ChangeProbe;

impl Engine {
    /// A named sync's options, if it exists.
    pub fn sync_options(&self, name: &str) -> Option<SyncOptions> {
        self.sync_def(name).ok().map(|def| def.options)
    }

    /// The plan of a named sync's statement, as a dry run plans it (no I/O but schema lookups).
    async fn sync_plan(&self, name: &str) -> Result<super::Planned> {
        let def = self.sync_def(name)?;
        let context = SyncContext {
            name: Some(name.to_string()),
            options: def.options.clone(),
            dry_run: true,
            sample: None,
            run_id: None,
        };
        self.plan_sync_body(name, &def.body, &context).await
    }

    /// The tables a named sync's model reads, as the model names them.
    pub async fn sync_inputs(&self, name: &str) -> Result<Vec<String>> {
        let planned = self.sync_plan(name).await?;
        Ok(crate::connectors::model_inputs(&planned.plan)
            .into_iter()
            .map(|(table, _)| table)
            .collect())
    }

    /// What `SCHEDULE ON CHANGE` checks for a named sync.
    pub async fn change_probe(&self, name: &str) -> Result<Arc<dyn ChangeProbe>> {
        let def = self.sync_def(name)?;
        let planned = self.sync_plan(name).await?;
        crate::connectors::change_probe(
            &planned.plan,
            &self.ctx,
            def.options.change_query.as_deref(),
        )
    }

    /// The payloads of NOTIFY on `channel` in the Postgres database the named sync reads.
    pub async fn listen(&self, name: &str, channel: &str) -> Result<BoxStream<'static, String>> {
        let planned = self.sync_plan(name).await?;
        crate::connectors::listen(&planned.plan, channel).await
    }

    /// The run record of `run_id`, a run of `name` (`None` if the run stopped before it
    /// recorded itself: a plan error, a held lock).
    pub async fn run_record(&self, name: &str, run_id: &str) -> Result<Option<RunRecord>> {
        Ok(self
            .state
            .last_run(name)
            .await?
            .filter(|r| r.run_id == run_id))
    }

    /// Records in `sluice.runs` that a named sync did not run, and why (a sequence stopped
    /// before it). Answers the record.
    pub async fn record_skipped(&self, name: &str, reason: &str) -> Result<RunRecord> {
        let (target, mode) = match self.sync_plan(name).await {
            Ok(planned) => planned
                .sync
                .map(|run| (run.spec.target.clone(), run.spec.diff.mode.to_string()))
                .unwrap_or_default(),
            Err(_) => Default::default(),
        };
        let now = state::now();
        let record = RunRecord {
            run_id: crate::sync::run::new_run_id(),
            sync: name.to_string(),
            target,
            mode,
            started_at: now.clone(),
            finished_at: Some(now),
            status: "skipped".into(),
            error: Some(reason.to_string()),
            ..Default::default()
        };
        self.state.put_run(&record).await?;
        self.evaluate_alerts(&record).await;
        Ok(record)
    }
}
