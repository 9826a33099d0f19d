//! Helpers shared by the integration tests: running the `sluice` binary in a scratch directory
//! and filtering what varies between runs (timings, file stamps, temp paths) out of its output.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root (cargo runs tests from the package root).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A scratch directory holding a link to `sql_examples/`, so examples run with their relative
/// paths and write their `out/` folders into the scratch directory.
pub fn scratch() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::symlink(
        repo_root().join("sql_examples"),
        dir.path().join("sql_examples"),
    )
    .expect("symlink sql_examples");
    dir
}

/// The `sluice` binary, run in `dir` with a clean logging environment.
pub fn sluice(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.current_dir(dir)
        .env_remove("SLUICE_LOG")
        .env_remove("SLUICE_STATE")
        .env("SLUICE_HISTORY", dir.join(".history"));
    cmd
}

/// stdout, stderr and exit code of a finished run, with what varies between runs filtered.
pub fn transcript(output: &Output, dir: &Path) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    filter(
        &format!(
            "exit: {}\n--- stdout\n{stdout}--- stderr\n{stderr}",
            output.status.code().unwrap_or(-1)
        ),
        dir,
    )
}

/// Replaces timings, run file names and the scratch path with placeholders.
pub fn filter(text: &str, dir: &Path) -> String {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let mut out = text.replace(&dir.display().to_string(), "[DIR]");
    out = regex_replace(&out, r"\d{8}T\d{6}\.\d{3}Z-[0-9a-f]{12}", "[RUN]");
    out = regex_replace(&out, r" in \d+(\.\d+)?m?s", " in [TIME]");
    out = regex_replace(&out, r"-[0-9a-f]{16} run [0-9a-f]{16}", " run [SYNC-RUN]");
    out = regex_replace(&out, r" run [0-9a-f]{16}", " run [SYNC-RUN]");
    out
}

fn regex_replace(text: &str, pattern: &str, with: &str) -> String {
    regex::Regex::new(pattern)
        .expect("pattern")
        .replace_all(text, with)
        .into_owned()
}

/// Every regular file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// An engine whose sync state lives in a fresh temporary directory (kept for the process, so a
/// failing test's state can be inspected).
pub fn engine() -> sluice::Engine {
    let mut engine = sluice::Engine::new().expect("engine");
    let dir = tempfile::tempdir().expect("tempdir").keep();
    engine
        .set_state_location(&dir.join(".sluice").display().to_string())
        .expect("state");
    engine
}

/// Runs `sql` and returns its last statement's write summary.
pub async fn write(engine: &sluice::Engine, sql: &str) -> sluice::WriteSummary {
    let mut outcomes = engine
        .run_sql(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    match outcomes.pop() {
        Some(sluice::Outcome::Write(w)) => *w,
        other => panic!("{sql}: {other:?}"),
    }
}

/// Runs `sql` and returns its last statement's rows as a pretty table.
pub async fn query(engine: &sluice::Engine, sql: &str) -> String {
    let mut outcomes = engine
        .run_sql(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    match outcomes.pop() {
        Some(sluice::Outcome::Rows { batches, .. }) => {
            datafusion::arrow::util::pretty::pretty_format_batches(&batches)
                .unwrap()
                .to_string()
        }
        other => panic!("{sql}: {other:?}"),
    }
}

/// Runs `sql`, which must fail, and returns the error's text.
pub async fn error(engine: &sluice::Engine, sql: &str) -> String {
    match engine.run_sql(sql).await {
        Ok(o) => panic!("{sql}: expected an error, got {o:?}"),
        Err(e) => e.to_string(),
    }
}
