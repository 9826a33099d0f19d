//! Benches of incremental syncs through the real `sluice` binary (wall time and peak RSS of that
//! process, measured from outside with `wait4`).
//!
//!   cargo bench --bench diff              # full sizes
//!   cargo bench --bench diff -- diff      # only part 1 + 2 (also: rerun)
//!   cargo test --bench diff -- --quick    # small sizes, proves the bench runs (CI)
//!
//! 1. The diff of a 10M-row model (key + 5 mapped columns) against the 10M-row snapshot of the
//!    previous model, with 1% of rows updated, 0.1% inserted and 0.1% deleted: `EXPLAIN SYNC`
//!    of a mirror sync (reads the model's Parquet, loads the snapshot, classifies every row,
//!    plans the requests; sends nothing). Targets: <= 2 s wall, <= 800 MB peak RSS.
//! 2. Peer, same run: DuckDB computing the same classification from the same Parquet files
//!    (benches/peers/duckdb_diff.py), as a FULL OUTER JOIN with IS DISTINCT FROM and as a
//!    comparison of per-row hash(...). Target: sluice / DuckDB's faster variant <= 1.0 in time
//!    and in memory. Every run's counts must agree.
//!    Also printed: the same diff with the model in random key order (the snapshot is sorted by
//!    key, so a model in key order is matched by a sequential walk; a shuffled one through a
//!    hash index).
//! 3. A no-change rerun of a 1M-row webhook sync: 0 requests, <= 1.5 s end to end.

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/integration/fakes/webhook.rs"]
mod fake;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, UInt64Array};
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use fake::{FakeWebhook, Script};
use sluice::sync::hash::{HASH_VERSION, hash_array, normalize_key};
use sluice::sync::snapshot::Snapshot;
use sluice::sync::state::{FORMAT, Manifest, StateStore, now};

const FIELDS: [&str; 5] = ["email", "name", "plan", "score", "updated_at"];

fn main() {
    // The snapshot is built in a child process (see `diff`), so that this process stays small:
    // a child's peak RSS as wait4 reports it starts from its parent's size at fork.
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--setup-snapshot") {
        let dir = std::path::PathBuf::from(&args[i + 1]);
        tokio::runtime::Runtime::new()
            .expect("runtime")
            .block_on(commit_previous_snapshot(&dir));
        return;
    }
    let quick = common::quick();
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| ["diff", "rerun"].contains(&a.as_str()))
        .collect();
    let run = |part: &str| only.is_empty() || only.iter().any(|o| o == part);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    if run("diff") {
        let rows: u64 = if quick { 100_000 } else { 10_000_000 };
        runtime.block_on(diff(rows));
    }
    if run("rerun") {
        let rows: u64 = if quick { 20_000 } else { 1_000_000 };
        runtime.block_on(rerun(rows));
    }
}

/// The previous model and the model: 1% updated, 0.1% deleted, 0.1% inserted.
fn generate(dir: &Path, rows: u64) {
    let columns = "value AS id,
                   'user' || value || '@example.com' AS email,
                   'Name ' || (value % 9973) AS name,
                   ['free', 'starter', 'pro', 'enterprise'][value % 4 + 1] AS plan,
                   (value * 7919 % 1000) / 1000.0 AS score,
                   to_timestamp_seconds(1793491200 + value % 86400) AS updated_at";
    let sql = format!(
        "COPY (SELECT {columns} FROM range({rows})) TO 'previous.parquet' STORED AS PARQUET;
         COPY (SELECT id, email, name, plan,
                      CASE WHEN id % 100 = 7 THEN score + 1 ELSE score END AS score, updated_at
               FROM 'previous.parquet' WHERE id % 1000 <> 3
               UNION ALL
               SELECT {columns} FROM range({rows}, {rows} + {rows} / 1000))
         TO 'model.parquet' STORED AS PARQUET"
    );
    common::run_sluice(dir, &["-q", "-c", &sql]);
}

/// Commits the snapshot a fully acknowledged sync of the previous model leaves, with the same
/// hashing the diff uses.
async fn commit_previous_snapshot(dir: &Path) {
    let ctx = SessionContext::new();
    let batches = ctx
        .read_parquet(
            dir.join("previous.parquet").to_str().expect("utf-8 path"),
            ParquetReadOptions::default(),
        )
        .await
        .expect("previous.parquet")
        .collect()
        .await
        .expect("read previous.parquet");
    let mut keys: Vec<ArrayRef> = vec![];
    let mut hashes: Vec<Vec<u64>> = vec![vec![]; FIELDS.len()];
    for batch in &batches {
        keys.push(normalize_key(batch.column(0), "id").expect("key"));
        for (i, h) in hashes.iter_mut().enumerate() {
            hash_array(batch.column(i + 1).as_ref(), h).expect("hash");
        }
    }
    let keys: Vec<&dyn datafusion::arrow::array::Array> = keys.iter().map(|k| k.as_ref()).collect();
    let snapshot = Snapshot::new(
        datafusion::arrow::compute::concat(&keys).expect("concat"),
        FIELDS.iter().map(|f| f.to_string()).collect(),
        hashes.into_iter().map(UInt64Array::from).collect(),
        None,
    )
    // As commits write them.
    .sorted()
    .expect("sort the snapshot");
    let state = StateStore::local(&dir.join(".sluice")).expect("state");
    let manifest = Manifest {
        format: FORMAT,
        hash: HASH_VERSION.into(),
        sync: "bench".into(),
        target: "hooks.users".into(),
        key: Some("id".into()),
        fields: FIELDS.iter().map(|f| f.to_string()).collect(),
        snapshot: String::new(),
        hash_files: vec![],
        rows: 0,
        rejects: None,
        run_id: "setup".into(),
        committed_at: now(),
        checksum: None,
    };
    state
        .commit(manifest, &snapshot, false, &[], None)
        .await
        .expect("commit the snapshot");
}

/// (inserts, updates, deletes, unchanged) from a dry run's report.
fn counts_of(report: &str) -> (u64, u64, u64, u64) {
    let line = report
        .lines()
        .find(|l| l.trim_start().starts_with("model rows"))
        .unwrap_or_else(|| panic!("no counts in:\n{report}"));
    let numbers: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    (numbers[1], numbers[2], numbers[3], numbers[4])
}

async fn diff(rows: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_path_buf();
    tokio::task::spawn_blocking(move || generate(&d, rows))
        .await
        .unwrap();
    let setup = Command::new(std::env::current_exe().expect("this bench"))
        .arg("--setup-snapshot")
        .arg(dir.path())
        .status()
        .expect("snapshot setup");
    assert!(setup.success(), "snapshot setup failed");
    if let Ok(keep) = std::env::var("SLUICE_BENCH_KEEP") {
        // Keep the inputs for profiling: SLUICE_BENCH_KEEP=/some/dir.
        let _ = std::fs::remove_dir_all(&keep);
        let out = Command::new("cp")
            .arg("-r")
            .arg(dir.path())
            .arg(&keep)
            .status();
        assert!(out.is_ok_and(|s| s.success()), "copy to {keep}");
    }
    std::fs::write(
        dir.path().join("sync.sql"),
        "CREATE CONNECTION hooks TYPE webhook OPTIONS (url 'http://127.0.0.1:9/unused', key 'id');
         CREATE SYNC bench AS MERGE INTO hooks.users AS t
           USING (SELECT * FROM 'model.parquet') AS s ON t.id = s.id
         WHEN MATCHED THEN UPDATE SET email = s.email, name = s.name, plan = s.plan,
                                      score = s.score, updated_at = s.updated_at
         WHEN NOT MATCHED THEN INSERT (id, email, name, plan, score, updated_at)
                               VALUES (s.id, s.email, s.name, s.plan, s.score, s.updated_at)
         WHEN NOT MATCHED BY SOURCE THEN DELETE;
         EXPLAIN SYNC bench;",
    )
    .unwrap();
    let expected = (
        rows / 1000,
        rows / 100,
        rows / 1000,
        rows - rows / 100 - rows / 1000,
    );
    let d = dir.path().to_path_buf();
    let (sluice, report) =
        tokio::task::spawn_blocking(move || common::run_sluice(&d, &["-q", "run", "sync.sql"]))
            .await
            .unwrap();
    let counts = counts_of(&report);
    assert_eq!(counts, expected, "sluice's classification\n{report}");
    println!(
        "diff: sluice  {rows} rows, 1% updated, 0.1% inserted, 0.1% deleted: {:.2} s wall, {:.0} MB peak RSS, {:.2} CPU-s  (targets: <= 2 s, <= 800 MB)",
        sluice.wall.as_secs_f64(),
        sluice.peak_rss_bytes as f64 / 1e6,
        sluice.cpu.as_secs_f64()
    );
    println!("diff:   (inserts, updates, deletes, unchanged) = {counts:?}");

    // The same model in random key order: the diff then finds keys through a hash index
    // instead of walking the sorted snapshot (reported, not a target).
    let d = dir.path().to_path_buf();
    tokio::task::spawn_blocking(move || {
        common::run_sluice(
            &d,
            &[
                "-q",
                "-c",
                "COPY (SELECT * FROM 'model.parquet' ORDER BY random()) TO 'shuffled.parquet' STORED AS PARQUET",
            ],
        )
    })
    .await
    .unwrap();
    let sql = std::fs::read_to_string(dir.path().join("sync.sql")).unwrap();
    std::fs::write(
        dir.path().join("shuffled.sql"),
        sql.replace("'model.parquet'", "'shuffled.parquet'"),
    )
    .unwrap();
    let d = dir.path().to_path_buf();
    let (shuffled, report) =
        tokio::task::spawn_blocking(move || common::run_sluice(&d, &["-q", "run", "shuffled.sql"]))
            .await
            .unwrap();
    assert_eq!(counts_of(&report), expected, "shuffled model\n{report}");
    println!(
        "diff: sluice, the same model in random key order: {:.2} s wall, {:.0} MB peak RSS (not a target)",
        shuffled.wall.as_secs_f64(),
        shuffled.peak_rss_bytes as f64 / 1e6
    );

    let mut best: Option<(common::Usage, &str)> = None;
    for variant in ["join", "hash"] {
        let mut cmd = Command::new("python3");
        cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/peers/duckdb_diff.py"))
            .arg(dir.path())
            .arg(variant);
        let probe = Command::new("python3")
            .args(["-c", "import duckdb"])
            .output();
        if !probe.is_ok_and(|o| o.status.success()) {
            println!("diff: DuckDB peer skipped: `pip install duckdb` to compare");
            return;
        }
        let (usage, out) = tokio::task::spawn_blocking(move || common::measure(cmd))
            .await
            .unwrap();
        let json: serde_json::Value = serde_json::from_str(out.trim()).expect("peer output");
        let peer = (
            json["inserts"].as_u64().unwrap(),
            json["updates"].as_u64().unwrap(),
            json["deletes"].as_u64().unwrap(),
            json["unchanged"].as_u64().unwrap(),
        );
        assert_eq!(peer, expected, "DuckDB ({variant}) disagrees");
        println!(
            "diff: DuckDB {} ({variant}): {:.2} s wall ({:.2} s in the query), {:.0} MB peak RSS",
            json["duckdb"].as_str().unwrap_or("?"),
            usage.wall.as_secs_f64(),
            json["seconds"].as_f64().unwrap_or(0.0),
            usage.peak_rss_bytes as f64 / 1e6
        );
        if best.is_none_or(|(b, _)| usage.wall < b.wall) {
            best = Some((usage, variant));
        }
    }
    if let Some((peer, variant)) = best {
        println!(
            "diff: sluice / DuckDB ({variant}, the faster): time {:.2}, memory {:.2}  (target <= 1.0 on both)",
            sluice.wall.as_secs_f64() / peer.wall.as_secs_f64(),
            sluice.peak_rss_bytes as f64 / peer.peak_rss_bytes as f64
        );
    }
}

async fn rerun(rows: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_path_buf();
    tokio::task::spawn_blocking(move || common::generate_model(&d, rows))
        .await
        .unwrap();
    let fake = Arc::new(
        FakeWebhook::start(Script {
            count_only: true,
            ..Default::default()
        })
        .await,
    );
    std::fs::write(
        dir.path().join("sync.sql"),
        format!(
            "CREATE CONNECTION hooks TYPE webhook OPTIONS (url '{}', key 'customer_id');
             INSERT INTO hooks.contacts SELECT * FROM 'model.parquet';",
            fake.url
        ),
    )
    .unwrap();
    let d = dir.path().to_path_buf();
    let (first, _) =
        tokio::task::spawn_blocking(move || common::run_sluice(&d, &["run", "sync.sql"]))
            .await
            .unwrap();
    let sent = fake.observed(|o| (o.requests.len(), o.record_count));
    assert_eq!(sent.1, rows, "the first run delivers every record");
    let d = dir.path().to_path_buf();
    let (again, out) =
        tokio::task::spawn_blocking(move || common::run_sluice(&d, &["run", "sync.sql"]))
            .await
            .unwrap();
    let requests = fake.observed(|o| o.requests.len()) - sent.0;
    assert_eq!(requests, 0, "a no-change rerun sent requests:\n{out}");
    println!(
        "rerun: first sync of {rows} records {:.2} s ({} requests); no-change rerun {:.2} s wall, {:.0} MB peak RSS, {requests} requests  (target: 0 requests, <= 1.5 s)",
        first.wall.as_secs_f64(),
        sent.0,
        again.wall.as_secs_f64(),
        again.peak_rss_bytes as f64 / 1e6
    );
}
