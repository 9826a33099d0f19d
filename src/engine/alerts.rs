//! Alerts as SQL: `CREATE ALERT name ON SYNC pattern WHEN predicate NOTIFY connection`.
//!
//! After each run of a named sync (under `sluice run` or `sluice serve`), each alert whose
//! pattern matches the sync evaluates its predicate on the run's `sluice.runs` row. It notifies
//! once when the predicate starts holding (`fired`), again every `repeat_every` while it holds
//! (`repeated`, only with that option), and once when it stops (`resolved`), so a failing sync
//! does not notify on every run. Each notice, delivered or not, is a row of `sluice.alerts`;
//! whether an alert is firing is read back from there, so a restart neither repeats nor forgets.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::array::{Array, BooleanArray, RecordBatch};
use datafusion::arrow::datatypes::DataType;
use datafusion::common::DFSchema;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::prelude::{col, lit};
use serde_json::json;

use super::{Engine, Outcome};
use crate::connectors::{Notice, destination_of};
use crate::error::{Error, Result};
use crate::options::{OptionSpec, Options};
use crate::parser::CreateAlert;
use crate::sync::state::{AlertEvent, RunRecord, now};
use crate::sync::tables::{runs_batch, runs_schema};

/// The options an alert accepts.
pub const ALERT_OPTIONS: &[OptionSpec] = &[OptionSpec::new(
    "repeat_every",
    "duration",
    "",
    "while the condition keeps holding, notify again this often ('1 hour'); unset: once when it starts holding, once when it stops",
)];

/// An alert, as defined in this session.
#[derive(Debug, Clone)]
pub(super) struct AlertDef {
    pattern: String,
    predicate: String,
    expr: Arc<dyn PhysicalExpr>,
    notify: String,
    repeat_every: Option<Duration>,
    options_text: String,
}

/// (alert, sync) → when the last notice of that firing alert went.
type Firing = BTreeMap<(String, String), chrono::DateTime<chrono::Utc>>;

/// The session's alerts, and (loaded from `sluice.alerts` on first use) which are firing for
/// which sync, since when their last notice went.
#[derive(Debug, Default)]
pub(super) struct Alerts {
    defs: std::sync::Mutex<BTreeMap<String, AlertDef>>,
    firing: tokio::sync::Mutex<Option<Firing>>,
    /// The status page, linked from notices (`sluice serve` sets it).
    status_url: std::sync::Mutex<Option<String>>,
}

/// Whether `name` matches `pattern`, where `*` is any run of characters and `?` one.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    // Classic backtracking over the last `*`.
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

impl Engine {
    /// Links notices to the status page at `url`.
    pub fn set_status_url(&self, url: Option<String>) {
        *self.alerts.status_url.lock().expect("status url") = url;
    }

    pub(super) fn create_alert(&self, create: &CreateAlert) -> Result<Outcome> {
        let name = &create.name;
        let options = Options::new("alert", ALERT_OPTIONS, create.options.clone())?;
        let repeat_every =
            crate::delivery::settings::duration(&options, "repeat_every")?.filter(|d| !d.is_zero());
        let expr = self.alert_predicate(name, &create.predicate)?;
        let notifies = destination_of(self.catalog.as_ref(), &create.notify)
            .and_then(|d| d.notifier())
            .is_some();
        if !notifies {
            let known = self.connections.get(&create.notify).is_some();
            return Err(Error::plan(
                format!(
                    "alert {name}: NOTIFY {}: {}; notices go to a webhook or slack connection defined before the alert",
                    create.notify,
                    if known {
                        "this connection cannot receive notices"
                    } else {
                        "no such connection"
                    }
                ),
                create.notify.clone(),
            ));
        }
        let mut defs = self.alerts.defs.lock().expect("alerts");
        if defs.contains_key(name) {
            if create.if_not_exists {
                return Ok(Outcome::Done(format!(
                    "alert {name} already exists; left unchanged"
                )));
            }
            if !create.or_replace {
                return Err(Error::plan(
                    format!(
                        "alert '{name}' already exists; use CREATE OR REPLACE ALERT to redefine it, or DROP ALERT {name} first"
                    ),
                    name.clone(),
                ));
            }
        }
        defs.insert(
            name.clone(),
            AlertDef {
                pattern: create.pattern.clone(),
                predicate: create.predicate.clone(),
                expr,
                notify: create.notify.clone(),
                repeat_every,
                options_text: options.redacted(),
            },
        );
        Ok(Outcome::Done(format!(
            "CREATE ALERT {name} on sync {} → {}",
            create.pattern, create.notify
        )))
    }

    /// The predicate, planned against `sluice.runs`'s columns: an unknown column or a
    /// predicate that is not true/false is an error now, not after a run.
    fn alert_predicate(&self, name: &str, predicate: &str) -> Result<Arc<dyn PhysicalExpr>> {
        let schema = runs_schema();
        let columns: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        let fail = |e: String| {
            Error::plan(
                format!(
                    "alert {name}: WHEN {predicate}: {e}; the condition reads the run's sluice.runs row: {}",
                    columns.join(", ")
                ),
                predicate.to_string(),
            )
        };
        let df_schema = DFSchema::try_from(schema.clone()).map_err(|e| fail(e.to_string()))?;
        let expr = self
            .ctx
            .parse_sql_expr(predicate, &df_schema)
            .map_err(|e| fail(crate::error::Error::from(e).to_string()))?;
        let physical = self
            .ctx
            .create_physical_expr(expr, &df_schema)
            .map_err(|e| fail(crate::error::Error::from(e).to_string()))?;
        match physical.data_type(&schema) {
            Ok(DataType::Boolean) => Ok(physical),
            Ok(other) => Err(fail(format!("it is {other}, not true or false"))),
            Err(e) => Err(fail(e.to_string())),
        }
    }

    pub(super) fn drop_alert(&self, name: &str, if_exists: bool) -> Result<Outcome> {
        if self
            .alerts
            .defs
            .lock()
            .expect("alerts")
            .remove(name)
            .is_none()
            && !if_exists
        {
            let defs = self.alerts.defs.lock().expect("alerts");
            return Err(Error::plan(
                format!(
                    "unknown alert '{name}'{}",
                    crate::error::did_you_mean(name, defs.keys().map(String::as_str))
                ),
                name.to_string(),
            ));
        }
        Ok(Outcome::Done(format!("DROP ALERT {name}")))
    }

    pub(super) async fn show_alerts(&self) -> Result<Outcome> {
        let defs: Vec<(String, AlertDef)> = self
            .alerts
            .defs
            .lock()
            .expect("alerts")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let firing = self.firing().await?;
        let rows = defs
            .into_iter()
            .map(|(name, def)| {
                let syncs: Vec<&str> = firing
                    .keys()
                    .filter(|(a, _)| *a == name)
                    .map(|(_, s)| s.as_str())
                    .collect();
                vec![
                    Some(name.clone()),
                    Some(def.pattern),
                    Some(def.predicate),
                    Some(def.notify),
                    Some(def.options_text),
                    Some(syncs.join(", ")),
                ]
            })
            .collect();
        super::discover::text_rows(
            &["name", "on_sync", "when", "notify", "options", "firing_for"],
            rows,
        )
    }

    /// (alert, sync) pairs firing now, and when their last notice went: from `sluice.alerts`,
    /// read once.
    async fn firing(&self) -> Result<Firing> {
        let mut firing = self.alerts.firing.lock().await;
        if firing.is_none() {
            let mut state = BTreeMap::new();
            for e in self.state.alert_events().await? {
                if !e.delivered {
                    continue;
                }
                let key = (e.alert.clone(), e.sync.clone());
                match e.event.as_str() {
                    "resolved" => {
                        state.remove(&key);
                    }
                    _ => {
                        if let Ok(at) = chrono::DateTime::parse_from_rfc3339(&e.at) {
                            state.insert(key, at.with_timezone(&chrono::Utc));
                        }
                    }
                }
            }
            *firing = Some(state);
        }
        Ok(firing.clone().unwrap_or_default())
    }

    /// Whether an alert watches sync `name` (so its runs' rows are worth reading).
    pub(super) fn alerts_watch(&self, name: &str) -> bool {
        self.alerts
            .defs
            .lock()
            .expect("alerts")
            .values()
            .any(|d| glob_match(&d.pattern, name))
    }

    /// Evaluates every alert on `record` (a run of a named sync that just ended) and sends the
    /// notices that are due. Never fails the run: problems are logged and kept in
    /// `sluice.alerts`.
    pub(super) async fn evaluate_alerts(&self, record: &RunRecord) {
        let defs: Vec<(String, AlertDef)> = self
            .alerts
            .defs
            .lock()
            .expect("alerts")
            .iter()
            .filter(|(_, d)| glob_match(&d.pattern, &record.sync))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if defs.is_empty() {
            return;
        }
        if let Err(e) = self.firing().await {
            tracing::warn!(error = %e, "Alerts: cannot read sluice.alerts; alerts are not evaluated.");
            return;
        }
        let batch = match runs_batch(std::slice::from_ref(record)) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "Alerts: cannot build the run's row.");
                return;
            }
        };
        for (name, def) in defs {
            let holds = match holds(&def.expr, &batch) {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(alert = %name, error = %e, "Alert condition could not be evaluated.");
                    continue;
                }
            };
            let key = (name.clone(), record.sync.clone());
            let now_t = chrono::Utc::now();
            let since = self
                .alerts
                .firing
                .lock()
                .await
                .as_ref()
                .and_then(|f| f.get(&key).copied());
            let event = match (holds, since) {
                (true, None) => "fired",
                (true, Some(last)) => match def.repeat_every {
                    Some(every) if (now_t - last).to_std().unwrap_or_default() >= every => {
                        "repeated"
                    }
                    _ => continue,
                },
                (false, Some(_)) => "resolved",
                (false, None) => continue,
            };
            self.notify(&name, &def, event, record, holds).await;
        }
    }

    async fn notify(
        &self,
        name: &str,
        def: &AlertDef,
        event: &str,
        record: &RunRecord,
        holds: bool,
    ) {
        let rejects = if holds {
            self.top_reject_codes(&record.sync).await
        } else {
            vec![]
        };
        let status_url = self.alerts.status_url.lock().expect("status url").clone();
        let text = notice_text(name, def, event, record, &rejects, status_url.as_deref());
        let notice = Notice {
            alert: name.to_string(),
            sync: record.sync.clone(),
            event: event.to_string(),
            text: text.clone(),
            details: json!({
                "condition": def.predicate,
                "run": record,
                "top_reject_codes": rejects
                    .iter()
                    .map(|(code, n)| json!({"code": code, "count": n}))
                    .collect::<Vec<_>>(),
                "status_page": status_url,
            }),
        };
        let notifier =
            destination_of(self.catalog.as_ref(), &def.notify).and_then(|d| d.notifier());
        let result = match notifier {
            Some(n) => n.notify(&notice).await,
            None => Err(Error::Write {
                message: format!(
                    "connection {} cannot receive notices (was it dropped?)",
                    def.notify
                ),
            }),
        };
        let at = now();
        let delivered = result.is_ok();
        match &result {
            Ok(()) => {
                tracing::info!(alert = %name, sync = %record.sync, event, "Alert notice sent.")
            }
            Err(e) => {
                tracing::warn!(alert = %name, sync = %record.sync, event, error = %e, "Alert notice not delivered; it is tried again after the next run.")
            }
        }
        if delivered {
            let mut firing = self.alerts.firing.lock().await;
            let map = firing.get_or_insert_with(BTreeMap::new);
            let key = (name.to_string(), record.sync.clone());
            if event == "resolved" {
                map.remove(&key);
            } else {
                map.insert(key, chrono::Utc::now());
            }
        }
        let entry = AlertEvent {
            event_id: crate::sync::run::new_run_id(),
            alert: name.to_string(),
            sync: record.sync.clone(),
            event: event.to_string(),
            run_id: record.run_id.clone(),
            status: record.status.clone(),
            at,
            notified: def.notify.clone(),
            delivered,
            error: result.err().map(|e| e.to_string()),
            message: text,
        };
        if let Err(e) = self.state.put_alert_event(&entry).await {
            tracing::warn!(alert = %name, error = %e, "Could not record the alert's event in sluice.alerts.");
        }
    }

    /// The sync's most frequent reject codes, most frequent first (at most 3).
    async fn top_reject_codes(&self, sync: &str) -> Vec<(String, u64)> {
        let query = async {
            let frame = self
                .ctx
                .table("sluice.rejects")
                .await?
                .filter(col("sync").eq(lit(sync)))?
                .aggregate(
                    vec![col("error_code")],
                    vec![datafusion::functions_aggregate::count::count(lit(1)).alias("n")],
                )?
                .sort(vec![
                    col("n").sort(false, true),
                    col("error_code").sort(true, true),
                ])?
                .limit(0, Some(3))?;
            frame.collect().await
        };
        let Ok(batches) = query.await else {
            return vec![];
        };
        let mut out = vec![];
        for b in batches {
            let codes = b
                .column(0)
                .as_any()
                .downcast_ref::<datafusion::arrow::array::StringArray>();
            let counts = b
                .column(1)
                .as_any()
                .downcast_ref::<datafusion::arrow::array::Int64Array>();
            if let (Some(codes), Some(counts)) = (codes, counts) {
                for i in 0..b.num_rows() {
                    out.push((codes.value(i).to_string(), counts.value(i).max(0) as u64));
                }
            }
        }
        out
    }
}

/// Whether the predicate holds on the one row of `batch` (null: it does not).
fn holds(expr: &Arc<dyn PhysicalExpr>, batch: &RecordBatch) -> Result<bool> {
    let value = expr.evaluate(batch)?.into_array(batch.num_rows())?;
    let value = value
        .as_any()
        .downcast_ref::<BooleanArray>()
        .ok_or_else(|| Error::Write {
            message: "the condition is not true or false".into(),
        })?;
    Ok(value.len() == 1 && value.is_valid(0) && value.value(0))
}

/// The notice in one readable line (Slack's mrkdwn, and plain text).
fn notice_text(
    name: &str,
    def: &AlertDef,
    event: &str,
    r: &RunRecord,
    rejects: &[(String, u64)],
    status_url: Option<&str>,
) -> String {
    let head = match event {
        "resolved" => format!("[RESOLVED] {name}: sync {} is back to normal", r.sync),
        "repeated" => format!("[STILL FIRING] {name}: sync {}", r.sync),
        _ => format!("[FIRING] {name}: sync {}", r.sync),
    };
    let mut text = format!(
        "{head} (when {}). Run {} {}: {} read, {} inserted, {} updated, {} deleted, {} rejected in {}.",
        def.predicate,
        r.run_id,
        r.status,
        r.rows_read,
        r.inserted,
        r.updated,
        r.deleted,
        r.rejected,
        super::format_duration(Duration::from_millis(r.duration_ms)),
    );
    if let Some(e) = &r.error {
        text.push_str(&format!(
            " Error: {}",
            crate::connectors::notice::snippet(e)
        ));
    }
    if !rejects.is_empty() {
        text.push_str(&format!(
            " Top reject codes: {}.",
            rejects
                .iter()
                .map(|(c, n)| format!("{c} ({n})"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if let Some(url) = status_url {
        text.push_str(&format!(" Status: {url}"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn patterns_match_names() {
        assert!(glob_match("*", "anything"));
        assert!(glob_match("accounts", "accounts"));
        assert!(!glob_match("accounts", "accounts_sf"));
        assert!(glob_match("accounts_*", "accounts_sf"));
        assert!(glob_match("*_sf", "accounts_sf"));
        assert!(glob_match("a?c*", "abcdef"));
        assert!(!glob_match("a?c*", "acdef"));
        assert!(glob_match("*a*b*", "xxaxxbxx"));
        assert!(!glob_match("*a*b", "xxaxxbxx"));
    }
}
