//! The Salesforce destination through the real `sluice` binary against the fake org.
//!
//!   cargo bench --bench salesforce            # 200k contacts
//!   cargo test --bench salesforce -- --quick  # 3,000 contacts, proves the bench runs (CI)
//!
//! 1. First sync of every contact: above the 2,000-record threshold it goes through Bulk API
//!    2.0. Total API calls (target <= 10 + jobs x polls), rows/s (bounded by the fake's
//!    processing time, which stands in for Salesforce's), and the CPU time sluice used.
//! 2. A rerun with 0.5% of the contacts changed: under the threshold, sObject Collections;
//!    API calls (target ceil(changed / 200)).

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/integration/fakes/salesforce.rs"]
mod fake;

use std::time::Duration;

use fake::{CLIENT_ID, CLIENT_SECRET, FakeSalesforce, Script};

fn main() {
    let quick = common::quick();
    let rows: u64 = if quick { 3_000 } else { 200_000 };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async move {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().to_path_buf();
        tokio::task::spawn_blocking(move || common::generate_model(&d, rows))
            .await
            .unwrap();
        // The fake takes 0.5 s per job plus 20 µs per row in `InProgress` (50,000 rows/s).
        let fake = FakeSalesforce::start(Script {
            bulk_base: Duration::from_millis(500),
            bulk_per_row: Duration::from_micros(20),
            ..Script::default()
        })
        .await;
        let sync = |changed_every: u64| {
            let score = if changed_every == 0 {
                "churn_risk".to_string()
            } else {
                format!(
                    "CASE WHEN customer_id % {changed_every} = 0 THEN churn_risk + 1 ELSE churn_risk END"
                )
            };
            format!(
                "CREATE EXTERNAL TABLE model STORED AS PARQUET LOCATION 'model.parquet';
                 CREATE CONNECTION sf TYPE salesforce OPTIONS (login_url '{}', client_id '{CLIENT_ID}', client_secret '{CLIENT_SECRET}');
                 INSERT INTO sf.contact SELECT 'C-' || customer_id AS External_Id__c, full_name AS LastName, email AS Email, {score} AS Lead_Score__c FROM model;",
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

        // 1. First sync: Bulk.
        let (first, out) = run(sync(0)).await;
        print_summary(&out);
        let calls = fake.api_calls();
        let (jobs, polls) = (fake.calls("jobs:create"), fake.calls("jobs:poll"));
        let stored = fake.records("Contact").len() as u64;
        println!(
            "salesforce 1: first sync of {rows} contacts via Bulk API 2.0: {calls} API calls ({jobs} job(s), {polls} poll(s); target <= 10 + jobs x polls = {}); \
             {:.2} s wall = {:.0} rows/s (the fake processes 50,000 rows/s after 0.5 s per job); {stored} stored, {} lost (target 0); \
             sluice used {:.2} CPU-s, peak RSS {:.0} MB",
            10 + jobs * polls,
            first.wall.as_secs_f64(),
            rows as f64 / first.wall.as_secs_f64(),
            rows - stored,
            first.cpu.as_secs_f64(),
            first.peak_rss_bytes as f64 / 1_048_576.0
        );
        assert_eq!(stored, rows, "every contact reached the fake");
        assert!(calls <= 10 + jobs * polls, "{calls} API calls");

        // 2. Rerun with 0.5% changed: REST.
        let before = fake.api_calls();
        let upserts = fake.calls("collections:upsert");
        let (rerun, out) = run(sync(200)).await;
        print_summary(&out);
        let sent = fake.calls("collections:upsert") - upserts;
        let spent = fake.api_calls() - before;
        let changed = rows.div_ceil(200);
        println!(
            "salesforce 2: rerun with {changed} of {rows} contacts changed: {sent} sObject Collections calls (target ceil({changed} / 200) = {}), \
             {spent} API calls in all (with describe), {:.2} s wall, {:.2} CPU-s",
            changed.div_ceil(200),
            rerun.wall.as_secs_f64(),
            rerun.cpu.as_secs_f64()
        );
        assert_eq!(sent as u64, changed.div_ceil(200));
        assert_eq!(fake.records("Contact").len() as u64, rows);
    });
}

fn print_summary(out: &str) {
    for line in out
        .lines()
        .filter(|l| l.starts_with("INSERT") || l.trim_start().starts_with("sync "))
    {
        println!("salesforce:   {line}");
    }
}
