//! The HubSpot destination through the real `sluice` binary against the fake HubSpot API,
//! limited like a Professional account: 190 requests per rolling 10 s.
//!
//!   cargo bench --bench hubspot            # 100k contacts (about 1 minute: the limit is the bound)
//!   cargo test --bench hubspot -- --quick  # 2,000 contacts, proves the bench runs (CI)
//!
//! 1. First sync of every contact: the achieved request rate against the limit
//!    (target >= 95%), 429s, and records lost (target 0).
//! 2. A rerun with 1% of the contacts changed: requests sent (target ceil(changed / 100)).

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/integration/fakes/hubspot.rs"]
mod fake;

use std::time::Duration;

use fake::{FakeHubspot, Script};

const LIMIT: usize = 190;
const WINDOW: Duration = Duration::from_secs(10);

fn main() {
    let quick = common::quick();
    let rows: u64 = if quick { 2_000 } else { 100_000 };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async move {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().to_path_buf();
        tokio::task::spawn_blocking(move || common::generate_model(&d, rows))
            .await
            .unwrap();
        let fake = FakeHubspot::start(Script {
            limit: Some((LIMIT, WINDOW)),
            ..Script::default()
        })
        .await;
        let sync = |changed_every: u64| {
            // The model: every contact; on the rerun, every `changed_every`-th has a new score.
            let score = if changed_every == 0 {
                "churn_risk".to_string()
            } else {
                format!(
                    "CASE WHEN customer_id % {changed_every} = 0 THEN churn_risk + 1 ELSE churn_risk END"
                )
            };
            format!(
                "CREATE EXTERNAL TABLE model STORED AS PARQUET LOCATION 'model.parquet';
                 CREATE CONNECTION crm TYPE hubspot OPTIONS (token '{}', base_url '{}', tier 'pro');
                 INSERT INTO crm.contacts SELECT email, full_name AS firstname, {score} AS churn_score FROM model;",
                Script::default().token,
                fake.url
            )
        };
        let run = |sql: String| {
            let dir = dir.path().to_path_buf();
            async move {
                std::fs::write(dir.join("sync.sql"), sql).expect("sync.sql");
                tokio::task::spawn_blocking(move || common::run_sluice(&dir, &["run", "sync.sql"]))
                    .await
                    .unwrap()
            }
        };

        // 1. First sync.
        let (first, out) = run(sync(0)).await;
        print_summary(&out);
        let (accepted, throttled, span) = fake.observed(|o| {
            let ok: Vec<_> = o.requests.iter().filter(|r| r.status < 300).collect();
            let span = ok.last().unwrap().at.duration_since(ok.first().unwrap().at);
            (ok.len(), o.throttled, span)
        });
        let stored = fake.records("contacts").len() as u64;
        // Requests per second between the first and last accepted call, against the limit's.
        let rate = (accepted.saturating_sub(1)) as f64 / span.as_secs_f64().max(1e-9);
        let allowed = LIMIT as f64 / WINDOW.as_secs_f64();
        println!(
            "hubspot 1: first sync of {rows} contacts: {accepted} batch calls in {:.1} s = {rate:.2} requests/s = {:.1}% of the {LIMIT}/10 s limit (target >= 95%); \
             {throttled} answered 429; {} contacts stored, {} lost (target 0); sluice used {:.2} CPU-s, peak RSS {:.0} MB",
            span.as_secs_f64(),
            rate / allowed * 100.0,
            stored,
            rows - stored,
            first.cpu.as_secs_f64(),
            first.peak_rss_bytes as f64 / 1_048_576.0
        );
        assert_eq!(stored, rows, "every contact reached the fake");

        // 2. Rerun with 1% changed.
        let before = fake.calls("upsert");
        let (rerun, out) = run(sync(100)).await;
        print_summary(&out);
        let sent = fake.calls("upsert") - before;
        let changed = rows.div_ceil(100);
        println!(
            "hubspot 2: rerun with {changed} of {rows} contacts changed: {sent} batch calls (target ceil({changed} / 100) = {}), {:.2} s wall, {:.2} CPU-s",
            changed.div_ceil(100),
            rerun.wall.as_secs_f64(),
            rerun.cpu.as_secs_f64()
        );
        assert_eq!(fake.records("contacts").len() as u64, rows);
    });
}

fn print_summary(out: &str) {
    for line in out
        .lines()
        .filter(|l| l.starts_with("INSERT") || l.trim_start().starts_with("sync "))
    {
        println!("hubspot:   {line}");
    }
}
