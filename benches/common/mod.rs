//! Shared bench helpers: run the real `sluice` binary and measure it from outside (wall time,
//! CPU seconds and peak RSS of that process alone, via `wait4`).

#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What one measured process used.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    pub wall: Duration,
    /// user + system CPU time.
    pub cpu: Duration,
    pub peak_rss_bytes: u64,
}

/// `--quick` (or `SLUICE_BENCH_QUICK=1`): a small run that proves the bench works (CI). Says so,
/// because its figures (small inputs, usually a debug build) are not the measurements.
pub fn quick() -> bool {
    let quick = std::env::args().any(|a| a == "--quick")
        || std::env::var_os("SLUICE_BENCH_QUICK").is_some();
    if quick {
        println!(
            "quick mode: small inputs{}; these figures only prove the bench runs, `cargo bench` measures",
            if cfg!(debug_assertions) {
                ", debug build"
            } else {
                ""
            }
        );
    }
    quick
}

/// The sluice binary built for this bench.
pub fn sluice_bin() -> &'static str {
    env!("CARGO_BIN_EXE_sluice")
}

/// Runs `sluice args...` in `dir`, panicking on failure, and measures it.
pub fn run_sluice(dir: &Path, args: &[&str]) -> (Usage, String) {
    let mut cmd = Command::new(sluice_bin());
    cmd.current_dir(dir).args(args);
    measure(cmd)
}

/// Runs a command to completion and measures it with `wait4`.
#[allow(clippy::zombie_processes)] // reaped by wait4 below, which also reports its usage
pub fn measure(mut cmd: Command) -> (Usage, String) {
    let started = Instant::now();
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn");
    let pid = child.id() as libc::pid_t;
    let mut stdout = child.stdout.expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut s).ok();
        s
    });
    let mut status = 0;
    // SAFETY: `rusage` is plain data that wait4 fills in; `pid` is our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let wall = started.elapsed();
    assert_eq!(waited, pid, "wait4 failed");
    let output = reader.join().unwrap_or_default();
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "command failed with status {status}: {cmd:?}\n{output}"
    );
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    (
        Usage {
            wall,
            cpu: tv(usage.ru_utime) + tv(usage.ru_stime),
            peak_rss_bytes: usage.ru_maxrss as u64 * 1024,
        },
        output,
    )
}

/// Writes `rows` synthetic contact rows to `dir/model.parquet` with sluice itself.
pub fn generate_model(dir: &Path, rows: u64) {
    let generate = format!(
        "COPY (SELECT value AS customer_id,
                      'customer' || value || '@example.com' AS email,
                      'Name ' || (value % 9973) AS full_name,
                      ['free', 'starter', 'pro', 'enterprise'][value % 4 + 1] AS plan,
                      (value * 7919 % 1000) / 1000.0 AS churn_risk,
                      to_timestamp_seconds(1793491200 + value % 86400) AS scored_at
               FROM range({rows}))
         TO 'model.parquet' STORED AS PARQUET"
    );
    run_sluice(dir, &["-q", "-c", &generate]);
}

/// Seconds per million records.
pub fn per_million(d: Duration, records: u64) -> f64 {
    d.as_secs_f64() * 1_000_000.0 / records.max(1) as f64
}
