//! `GET /metrics`: Prometheus text, from the `metrics` facade. Per sync: runs by status,
//! records by operation, requests, retries, 429s, a run duration histogram, the last success,
//! the next scheduled run and the seconds since the last success; per connection: the rate
//! limiter's waits and the API quota used (see `delivery::limiter` and the Salesforce
//! connection). Labels are sync and connection names, never an option's value.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::sync::state::RunRecord;

/// Run durations, in seconds: the histogram's buckets.
const DURATION_BUCKETS: &[f64] = &[
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// How late a schedule's tick fired, in seconds: the histogram's buckets.
const LATENESS_BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0];

fn handle() -> &'static OnceLock<PrometheusHandle> {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    &HANDLE
}

/// When each sync last succeeded (for the seconds-since gauge, computed at each scrape).
fn successes() -> &'static Mutex<BTreeMap<String, DateTime<Utc>>> {
    static LAST: OnceLock<Mutex<BTreeMap<String, DateTime<Utc>>>> = OnceLock::new();
    LAST.get_or_init(Mutex::default)
}

/// Installs the process's recorder (once; later calls keep the first).
pub fn install() -> Result<(), String> {
    if handle().get().is_some() {
        return Ok(());
    }
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("sluice_run_duration_seconds".into()),
            DURATION_BUCKETS,
        )
        .map_err(|e| e.to_string())?
        .set_buckets_for_metric(
            Matcher::Full("sluice_tick_lateness_seconds".into()),
            LATENESS_BUCKETS,
        )
        .map_err(|e| e.to_string())?
        .build_recorder();
    let h = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|e| e.to_string())?;
    let _ = handle().set(h);
    describe();
    Ok(())
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!("sluice_runs_total", "Runs that ended, by sync and status.");
    describe_counter!(
        "sluice_records_total",
        "Records by sync and operation (inserted, updated, deleted, rejected)."
    );
    describe_counter!(
        "sluice_requests_total",
        "Requests to destinations, by sync."
    );
    describe_counter!("sluice_retries_total", "Retried requests, by sync.");
    describe_counter!(
        "sluice_throttled_total",
        "Requests answered 429 (waited out and retried), by sync."
    );
    describe_counter!(
        "sluice_skipped_ticks_total",
        "Schedule ticks that found the sync still running."
    );
    describe_histogram!(
        "sluice_run_duration_seconds",
        Unit::Seconds,
        "How long runs took."
    );
    describe_gauge!(
        "sluice_last_success_timestamp_seconds",
        Unit::Seconds,
        "When the sync last succeeded (Unix time)."
    );
    describe_gauge!(
        "sluice_seconds_since_last_success",
        Unit::Seconds,
        "Seconds since the sync last succeeded in this process."
    );
    describe_histogram!(
        "sluice_tick_lateness_seconds",
        Unit::Seconds,
        "How long after its time each schedule tick fired (runs then wait for a free slot of --max-concurrent-syncs)."
    );
    describe_gauge!(
        "sluice_next_run_timestamp_seconds",
        Unit::Seconds,
        "When the sync's schedule runs it next (Unix time)."
    );
    describe_histogram!(
        "sluice_limiter_wait_seconds",
        Unit::Seconds,
        "Requests the connection's rate limiter held back, and how long."
    );
    describe_gauge!(
        "sluice_api_quota_used_ratio",
        "The share of its API quota the connection reports used (0 to 1)."
    );
}

/// The metrics, as Prometheus text (empty when no recorder is installed).
pub fn render() -> String {
    let Some(h) = handle().get() else {
        return String::new();
    };
    let now = Utc::now();
    for (sync, at) in successes().lock().expect("successes").iter() {
        metrics::gauge!("sluice_seconds_since_last_success", "sync" => sync.clone())
            .set((now - *at).num_milliseconds() as f64 / 1000.0);
    }
    h.render()
}

/// What a run did: how it ended (`status`), and its `sluice.runs` row if it has one.
pub fn record_run(sync: &str, status: &str, record: Option<&RunRecord>, took: Duration) {
    let sync = sync.to_string();
    metrics::counter!("sluice_runs_total", "sync" => sync.clone(), "status" => status.to_string())
        .increment(1);
    metrics::histogram!("sluice_run_duration_seconds", "sync" => sync.clone())
        .record(took.as_secs_f64());
    if let Some(r) = record {
        for (operation, n) in [
            ("inserted", r.inserted),
            ("updated", r.updated),
            ("deleted", r.deleted),
            ("rejected", r.rejected),
        ] {
            metrics::counter!("sluice_records_total", "sync" => sync.clone(), "operation" => operation)
                .increment(n);
        }
        metrics::counter!("sluice_requests_total", "sync" => sync.clone()).increment(r.requests);
        metrics::counter!("sluice_retries_total", "sync" => sync.clone()).increment(r.retries);
        metrics::counter!("sluice_throttled_total", "sync" => sync.clone()).increment(r.throttled);
    }
}

/// A run of `sync` that lets the syncs after it run ended at `at`.
pub fn last_success(sync: &str, at: DateTime<Utc>) {
    metrics::gauge!("sluice_last_success_timestamp_seconds", "sync" => sync.to_string())
        .set(at.timestamp_millis() as f64 / 1000.0);
    successes()
        .lock()
        .expect("successes")
        .insert(sync.to_string(), at);
}

/// When `sync`'s schedule runs it next.
pub fn next_run(sync: &str, at: Option<DateTime<Utc>>) {
    let gauge = metrics::gauge!("sluice_next_run_timestamp_seconds", "sync" => sync.to_string());
    match at {
        Some(at) => gauge.set(at.timestamp_millis() as f64 / 1000.0),
        None => gauge.set(f64::NAN),
    }
}
