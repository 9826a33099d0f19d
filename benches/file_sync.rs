//! Bench: `sluice run` of a 1M-row Parquet → file (Parquet) sync, end to end through the real
//! binary. Prints rows/s, CPU seconds and peak RSS of the sluice process.
//!
//!   cargo bench --bench file_sync            # 1,000,000 rows, release build
//!   cargo test --bench file_sync -- --quick  # 50,000 rows, proves the bench runs (CI)
//!
//! Targets (issue 2): >= 2,000,000 rows/s end to end, peak RSS <= 300 MB.

#[path = "common/mod.rs"]
mod common;

fn main() {
    let rows: u64 = if common::quick() { 50_000 } else { 1_000_000 };
    let dir = tempfile::tempdir().expect("tempdir");
    let dir = dir.path();

    // The input: realistic contact rows (ids, strings, a score, a timestamp), written by sluice.
    common::generate_model(dir, rows);

    let sync = "\
CREATE EXTERNAL TABLE model STORED AS PARQUET LOCATION 'model.parquet';
CREATE CONNECTION out TYPE file OPTIONS (url 'out/', format 'parquet');
INSERT INTO out.contacts
SELECT email, full_name AS name, plan, churn_risk AS churn_score, scored_at, customer_id
FROM model;
";
    std::fs::write(dir.join("sync.sql"), sync).expect("write sync.sql");
    let (usage, summary) = common::run_sluice(dir, &["run", "sync.sql"]);

    // Prove the real path ran: the destination holds every row.
    let (_, count) = common::run_sluice(
        dir,
        &[
            "-q",
            "--format",
            "csv",
            "-c",
            "SELECT count(*) AS n FROM 'out/contacts/'",
        ],
    );
    let written: u64 = count
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0);
    assert_eq!(written, rows, "destination row count\n{summary}");

    let secs = usage.wall.as_secs_f64();
    println!(
        "file_sync: {}",
        summary
            .lines()
            .find(|l| l.starts_with("INSERT"))
            .unwrap_or("")
    );
    println!(
        "file_sync: {rows} rows Parquet -> file(parquet) in {secs:.3} s = {:.0} rows/s (target >= 2,000,000); \
         peak RSS {:.1} MB (target <= 300); CPU {:.2} s user+sys",
        rows as f64 / secs,
        usage.peak_rss_bytes as f64 / 1_048_576.0,
        usage.cpu.as_secs_f64()
    );
}
