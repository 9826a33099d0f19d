//! Benches of Postgres as a destination and as a source, through the real `sluice` binary
//! against the local server (127.0.0.1:5432, user postgres, database test), each in a schema of
//! its own that is dropped at the end.
//!
//!   cargo bench --bench postgres                 # 1M rows
//!   cargo test --bench postgres -- --quick       # small, proves the bench runs (CI)
//!
//! 1. first: a 1M-row Parquet model into a Postgres table with a primary key, the first run of
//!    an `INSERT INTO pg.t SELECT * FROM 'model.parquet'` sync (plan, diff against no state,
//!    binary COPY, state commit), against DuckDB's postgres extension loading the same file into
//!    an identical table in the same run (benches/peers/duckdb_postgres.py).
//!    Target: sluice / DuckDB <= 1.0. Also printed: Postgres's own binary COPY of the same rows
//!    from a file (`psql \copy`), the floor both tools pay.
//! 2. rerun: the same sync with 1% of the rows changed: <= 1.5 s end to end (reads the 1M-row
//!    model, diffs it, writes the 10k changed rows).
//! 3. extract: every column of the 1M rows read through the Postgres source (an aggregate over
//!    all of them, so that nothing is printed) against
//!    `psql -c "\copy (SELECT * FROM t) TO '/dev/null'"`. Target: sluice / psql <= 1.5.
//!
//! The DuckDB peer needs `duckdb` and `duckdb-extension-postgres` (same version) in the Python
//! named by SLUICE_DUCKDB_PG_PYTHON, else `$HOME/.cache/sluice-duckpg/bin/python` (`.ci/run` makes
//! that venv); without it the bench says so and skips the peer.

#[path = "common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

const URL: &str = "postgres://postgres@127.0.0.1:5432/test";
const COLUMNS: &str = "(id bigint PRIMARY KEY, email text, name text, plan text, score double precision, updated_at timestamp)";

/// `psql` on the local server, quiet and without the user's psqlrc.
fn psql_command() -> Command {
    let mut cmd = Command::new("psql");
    cmd.args([
        "-h",
        "127.0.0.1",
        "-U",
        "postgres",
        "-d",
        "test",
        "-X",
        "-q",
    ]);
    cmd
}

fn psql(sql: &str) -> Result<String, String> {
    let out = psql_command()
        .args(["-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .map_err(|e| format!("psql: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Drops the bench's schema when the bench ends, however it ends.
struct Schema(String);

impl Drop for Schema {
    fn drop(&mut self) {
        let _ = psql(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.0));
    }
}

fn duckdb_python() -> Option<PathBuf> {
    let python = std::env::var_os("SLUICE_DUCKDB_PG_PYTHON")
        .map(PathBuf::from)
        .or_else(|| dirs::home_dir().map(|h| h.join(".cache/sluice-duckpg/bin/python")))?;
    let ok = Command::new(&python)
        .args(["-c", "import duckdb, duckdb_extension_postgres"])
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then_some(python)
}

fn main() {
    let quick = common::quick();
    let rows: u64 = if quick { 20_000 } else { 1_000_000 };
    if let Err(e) = psql("SELECT 1") {
        if std::env::var("SLUICE_REQUIRE_SERVICES").as_deref() == Ok("1") {
            panic!("PostgreSQL at 127.0.0.1:5432 is required (SLUICE_REQUIRE_SERVICES=1): {e}");
        }
        println!("postgres: skipped, PostgreSQL at 127.0.0.1:5432 cannot be reached: {e}");
        return;
    }
    let schema = Schema(format!(
        "sluice_bench_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ));
    let s = &schema.0;
    psql(&format!(
        "CREATE SCHEMA {s}; CREATE TABLE {s}.t_sluice {COLUMNS}; CREATE TABLE {s}.t_duckdb {COLUMNS};
         CREATE TABLE {s}.t_copy {COLUMNS};"
    ))
    .expect("bench tables");
    let dir = tempfile::tempdir().expect("tempdir");
    generate(dir.path(), rows);
    std::fs::write(
        dir.path().join("sync.sql"),
        format!(
            "CREATE CONNECTION pg TYPE postgres OPTIONS (url '{URL}', schema '{s}');
             INSERT INTO pg.t_sluice SELECT * FROM 'model.parquet';"
        ),
    )
    .unwrap();

    // 1. First run, and DuckDB loading the same file. Each timed load starts with no dirty
    // pages left by the step before it (generating the model, the previous load).
    settle();
    let (first, _) = common::run_sluice(dir.path(), &["-q", "run", "sync.sql"]);
    let loaded: u64 = psql(&format!("SELECT count(*) FROM {s}.t_sluice"))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(loaded, rows, "sluice loaded every row");
    println!(
        "postgres first: {rows} rows Parquet -> Postgres table with a primary key: {:.2} s wall, {:.2} s CPU, {} MB peak RSS",
        first.wall.as_secs_f64(),
        first.cpu.as_secs_f64(),
        first.peak_rss_bytes >> 20
    );
    match duckdb_python() {
        None => println!(
            "postgres first: DuckDB peer skipped: needs duckdb and duckdb-extension-postgres in SLUICE_DUCKDB_PG_PYTHON or ~/.cache/sluice-duckpg"
        ),
        Some(python) => {
            let mut cmd = Command::new(python);
            cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/peers/duckdb_postgres.py"))
                .arg(dir.path().join("model.parquet"))
                .arg("host=127.0.0.1 user=postgres dbname=test")
                .arg(s)
                .arg("t_duckdb");
            settle();
            let (process, out) = common::measure(cmd);
            let json: serde_json::Value = serde_json::from_str(out.trim()).expect("peer output");
            assert_eq!(json["rows"].as_u64(), Some(rows), "DuckDB loaded every row");
            let seconds = json["seconds"].as_f64().expect("seconds");
            println!(
                "postgres first: DuckDB (postgres extension) ATTACH + INSERT: {seconds:.2} s ({:.2} s for its whole process); sluice / DuckDB = {:.2} (target <= 1.0)",
                process.wall.as_secs_f64(),
                first.wall.as_secs_f64() / seconds
            );
        }
    }

    // The floor both pay: Postgres's own binary COPY of the same rows into the same kind of table.
    let file = dir.path().join("rows.bin");
    psql(&format!(
        "\\copy {s}.t_sluice TO '{}' (FORMAT binary)",
        file.display()
    ))
    .expect("export the rows");
    let mut cmd = psql_command();
    cmd.arg("-c").arg(format!(
        "\\copy {s}.t_copy FROM '{}' (FORMAT binary)",
        file.display()
    ));
    settle();
    let (copy, _) = common::measure(cmd);
    println!(
        "postgres first: for reference, Postgres's own binary COPY of the same rows into a table with a primary key (psql \\copy from a file): {:.2} s",
        copy.wall.as_secs_f64()
    );

    // 2. Rerun with 1% of the rows changed.
    change_one_percent(dir.path());
    let (rerun, out) = common::run_sluice(dir.path(), &["run", "sync.sql"]);
    let changed: u64 = psql(&format!(
        "SELECT count(*) FROM {s}.t_sluice WHERE score >= 1"
    ))
    .unwrap()
    .parse()
    .unwrap();
    assert_eq!(changed, rows / 100, "the changed rows landed\n{out}");
    println!(
        "postgres rerun: {rows} rows, {} changed: {:.2} s wall end to end (target <= 1.5 s), {:.2} s CPU, {} MB peak RSS",
        rows / 100,
        rerun.wall.as_secs_f64(),
        rerun.cpu.as_secs_f64(),
        rerun.peak_rss_bytes >> 20
    );

    // 3. Extract every column through the source, and with psql.
    let extract = format!(
        "CREATE CONNECTION pg TYPE postgres OPTIONS (url '{URL}', schema '{s}');
         SELECT count(*) AS n, sum(id) AS ids, sum(length(email)) + sum(length(name)) + sum(length(plan)) AS chars,
                sum(score) AS score, max(updated_at) AS latest
         FROM pg.t_sluice;"
    );
    let (sluice, out) = common::run_sluice(dir.path(), &["-q", "--format", "csv", "-c", &extract]);
    assert!(
        out.lines().any(|l| l.starts_with(&format!("{rows},"))),
        "sluice read every row:\n{out}"
    );
    let mut cmd = psql_command();
    cmd.arg("-c").arg(format!(
        "\\copy (SELECT * FROM {s}.t_sluice) TO '/dev/null'"
    ));
    let (psql_copy, _) = common::measure(cmd);
    println!(
        "postgres extract: {rows} rows, every column: sluice {:.2} s wall ({:.2} s CPU), psql \\copy {:.2} s; sluice / psql = {:.2} (target <= 1.5)",
        sluice.wall.as_secs_f64(),
        sluice.cpu.as_secs_f64(),
        psql_copy.wall.as_secs_f64(),
        sluice.wall.as_secs_f64() / psql_copy.wall.as_secs_f64()
    );
}

/// Writes back every dirty page (of this process's files and Postgres's), so that the next
/// timed step does not pay for the writes of the one before it.
fn settle() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    psql("CHECKPOINT").expect("checkpoint");
}

/// `base.parquet` (the model's first version) and `model.parquet`, a copy the sync reads.
fn generate(dir: &Path, rows: u64) {
    let sql = format!(
        "COPY (SELECT value AS id,
                      'user' || value || '@example.com' AS email,
                      'Name ' || (value % 9973) AS name,
                      ['free', 'starter', 'pro', 'enterprise'][value % 4 + 1] AS plan,
                      (value * 7919 % 1000) / 1000.0 AS score,
                      CAST(to_timestamp_seconds(1793491200 + value % 86400) AS TIMESTAMP) AS updated_at
               FROM range({rows}))
         TO 'base.parquet' STORED AS PARQUET"
    );
    common::run_sluice(dir, &["-q", "-c", &sql]);
    std::fs::copy(dir.join("base.parquet"), dir.join("model.parquet")).expect("copy model");
}

/// The model with the score of 1% of the rows raised by 1 (scores start below 1).
fn change_one_percent(dir: &Path) {
    let sql = "COPY (SELECT id, email, name, plan,
                           CASE WHEN id % 100 = 7 THEN score + 1 ELSE score END AS score, updated_at
                    FROM 'base.parquet')
               TO 'model.parquet' STORED AS PARQUET";
    common::run_sluice(dir, &["-q", "-c", sql]);
}
