//! Benches of the delivery engine through the real `sluice` binary against the fake receiver
//! (which runs in this process, on the same 2 cores). Prints records/s and the sluice process's
//! CPU seconds (user + sys) per 1M records, which the receiver's share of the CPU cannot hide.
//!
//!   cargo bench --bench webhook             # full sizes (about 3 minutes with the dlt peer)
//!   cargo bench --bench webhook -- rate     # only part 2 (also: throughput, peers)
//!   cargo test --bench webhook -- --quick   # small sizes, proves the bench runs (CI)
//!
//! 1. 1M records to the fake at 20 ms latency, default settings, with the change log
//!    (`sluice.changes`) and without it.
//!    Targets: >= 50,000 records/s, <= 1.5 CPU-s per 1M records; the log within 10%.
//! 2. Fake limited to 100 requests / 10 s (rolling, with X-RateLimit-* headers) for 60 s: the
//!    requests it accepted in the first 60 s against the 600 it allows in 60 s.
//!    Targets: >= 95% of the allowed request rate, < 2% of requests answered 429.
//! 3. Peer: the same records, batches of 1,000, same fake, posted by dlt's @dlt.destination
//!    (`pip install dlt pyarrow requests`), with dlt's defaults and with its parallel settings.
//!    Targets: sluice >= 5x dlt default and >= dlt tuned; CPU per record <= 1/10 of dlt's.

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/integration/fakes/webhook.rs"]
mod fake;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use fake::{FakeWebhook, Script};

const LATENCY: Duration = Duration::from_millis(20);

fn main() {
    let quick = common::quick();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async move {
        let dir = tempfile::tempdir().expect("tempdir");
        let rows: u64 = if quick { 20_000 } else { 1_000_000 };
        let d = dir.path().to_path_buf();
        tokio::task::spawn_blocking(move || common::generate_model(&d, rows))
            .await
            .unwrap();

        let only: Vec<String> = std::env::args()
            .skip(1)
            .filter(|a| ["throughput", "rate", "peers"].contains(&a.as_str()))
            .collect();
        let run = |part: &str| only.is_empty() || only.iter().any(|o| o == part);
        if run("throughput") || run("peers") {
            let sluice = throughput(dir.path(), rows).await;
            if run("peers") {
                peers(dir.path(), rows, sluice).await;
            }
        }
        if run("rate") {
            rate_limited(dir.path(), quick).await;
        }
    });
}

/// Runs a sync file through the sluice binary while the fake serves; returns its usage.
async fn run_sync(dir: &Path, sql: String) -> common::Usage {
    std::fs::write(dir.join("sync.sql"), sql).expect("sync.sql");
    // Every measurement is a first sync (all records new): forget the previous run's state.
    let _ = std::fs::remove_dir_all(dir.join(".sluice"));
    let dir = dir.to_path_buf();
    let (usage, out) =
        tokio::task::spawn_blocking(move || common::run_sluice(&dir, &["run", "sync.sql"]))
            .await
            .unwrap();
    for line in out
        .lines()
        .filter(|l| l.starts_with("INSERT") || l.trim_start().starts_with("sync "))
    {
        println!("webhook:   {line}");
    }
    usage
}

/// Part 1, twice each way (alternating, best of two: the machine drifts): with the change log
/// (`sluice.changes`, on by default) and without it (`changes_retention '0'`), whose cost must
/// stay within 10% of the throughput. Returns the defaults' (records/s, CPU-s per 1M).
async fn throughput(dir: &Path, rows: u64) -> (f64, f64) {
    let mut best = [(0.0f64, f64::MAX), (0.0f64, f64::MAX)];
    for round in 0..2 {
        for (i, log) in [true, false].into_iter().enumerate() {
            let (rate, cpu) = first_sync(dir, rows, log, round == 1).await;
            best[i] = (best[i].0.max(rate), best[i].1.min(cpu));
        }
    }
    let [(on_rate, on_cpu), (off_rate, off_cpu)] = best;
    println!(
        "webhook 1: change log on {on_rate:.0} records/s, {on_cpu:.2} CPU-s per 1M; off {off_rate:.0} records/s, \
         {off_cpu:.2} CPU-s per 1M: the log costs {:.1}% of the throughput (target <= 10%) and {:.1}% more CPU",
        (1.0 - on_rate / off_rate) * 100.0,
        (on_cpu / off_cpu - 1.0) * 100.0
    );
    (on_rate, on_cpu)
}

/// One first sync of the model to the fake, with or without the change log.
async fn first_sync(dir: &Path, rows: u64, log: bool, print: bool) -> (f64, f64) {
    let fake = FakeWebhook::start(Script {
        latency: LATENCY,
        count_only: true,
        ..Script::default()
    })
    .await;
    let sql = format!(
        "CREATE EXTERNAL TABLE model STORED AS PARQUET LOCATION 'model.parquet';
         CREATE CONNECTION hooks TYPE webhook OPTIONS (url '{}', key 'customer_id');
         CREATE SYNC contacts OPTIONS (changes_retention '{}') AS INSERT INTO hooks.contacts SELECT * FROM model;
         RUN SYNC contacts;",
        fake.url,
        if log { "14 days" } else { "0" }
    );
    let usage = run_sync(dir, sql).await;
    let received = fake.observed(|o| o.record_count);
    assert_eq!(received, rows, "the receiver got every record once");
    let rate = rows as f64 / usage.wall.as_secs_f64();
    let cpu = common::per_million(usage.cpu, rows);
    if print {
        println!(
            "webhook 1: {rows} records at {}ms latency, defaults, change log {}: {:.2} s = {rate:.0} records/s (target >= 50,000); \
             {cpu:.2} CPU-s per 1M records (target <= 1.5); peak RSS {:.0} MB",
            LATENCY.as_millis(),
            if log { "on" } else { "off" },
            usage.wall.as_secs_f64(),
            usage.peak_rss_bytes as f64 / 1_048_576.0
        );
    }
    (rate, cpu)
}

async fn rate_limited(dir: &Path, quick: bool) {
    let (limit, window, batch) = if quick {
        (10usize, Duration::from_secs(1), 50u64)
    } else {
        (100usize, Duration::from_secs(10), 100u64)
    };
    // Measure `windows` windows (60 s; quick: 3 s); send more than fits so the client is never idle.
    let windows: u32 = if quick { 3 } else { 6 };
    let span = window * windows;
    let rows = limit as u64 * (windows as u64 + 1) * batch;
    let fake = FakeWebhook::start(Script {
        latency: LATENCY,
        count_only: true,
        limit: Some((limit, window)),
        rate_headers: true,
        ..Script::default()
    })
    .await;
    let sql = format!(
        "CREATE EXTERNAL TABLE limited STORED AS PARQUET LOCATION 'model.parquet';
         CREATE CONNECTION hooks TYPE webhook OPTIONS (url '{}', key 'customer_id', batch_size '{batch}');
         INSERT INTO hooks.contacts SELECT * FROM limited LIMIT {rows};",
        fake.url
    );
    run_sync(dir, sql).await;
    let (accepted, sent, throttled) = fake.observed(|o| {
        let t0 = o.requests.first().map(|r| r.at).expect("requests");
        let within: Vec<_> = o
            .requests
            .iter()
            .filter(|r| r.at.duration_since(t0) < span)
            .collect();
        let ok = within.iter().filter(|r| r.status == 200).count() as u64;
        (ok, o.requests.len() as u64, o.throttled)
    });
    // A rolling window of `limit` per `window` allows `limit` per window in any span.
    let allowed = limit as u64 * windows as u64;
    println!(
        "webhook 2: limit {limit} requests / {}s, first {} s: {accepted} requests accepted of {allowed} allowed = {:.1}% (target >= 95%); \
         {throttled} of {sent} requests answered 429 = {:.2}% (target < 2%)",
        window.as_secs(),
        span.as_secs(),
        accepted as f64 * 100.0 / allowed as f64,
        throttled as f64 * 100.0 / sent.max(1) as f64
    );
}

fn python() -> Option<PathBuf> {
    let ok = Command::new("python3")
        .args(["-c", "import dlt, pyarrow, requests"])
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then(|| PathBuf::from("python3"))
}

async fn peers(dir: &Path, rows: u64, (sluice_rate, sluice_cpu): (f64, f64)) {
    let Some(python) = python() else {
        println!("webhook 3: dlt peer skipped: `pip install dlt pyarrow requests` to run it");
        return;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/peers/dlt_webhook.py");
    let mut results = vec![];
    for mode in ["default", "tuned"] {
        let fake = FakeWebhook::start(Script {
            latency: LATENCY,
            count_only: true,
            ..Script::default()
        })
        .await;
        let mut cmd = Command::new(&python);
        cmd.arg(&script)
            .arg(dir.join("model.parquet"))
            .arg(&fake.url)
            .arg(mode)
            .current_dir(dir);
        let (usage, _) = tokio::task::spawn_blocking(move || common::measure(cmd))
            .await
            .unwrap();
        let received = fake.observed(|o| o.record_count);
        assert_eq!(received, rows, "dlt {mode} delivered every record");
        let rate = rows as f64 / usage.wall.as_secs_f64();
        let cpu = common::per_million(usage.cpu, rows);
        println!(
            "webhook 3: dlt {mode}: {rows} records in {:.2} s = {rate:.0} records/s; {cpu:.2} CPU-s per 1M records",
            usage.wall.as_secs_f64()
        );
        results.push((rate, cpu));
    }
    let (dlt_default, dlt_tuned) = (results[0], results[1]);
    println!(
        "webhook 3: sluice/dlt default throughput {:.1}x (target >= 5x); sluice/dlt tuned {:.1}x (target >= 1x); \
         sluice CPU per record = 1/{:.0} of dlt default, 1/{:.0} of dlt tuned (target <= 1/10)",
        sluice_rate / dlt_default.0,
        sluice_rate / dlt_tuned.0,
        dlt_default.1 / sluice_cpu,
        dlt_tuned.1 / sluice_cpu
    );
}
