//! Every `sql_examples/*.sql` runs as a test. A file whose first line is
//! `-- expect-error: <text>` must fail with exit code 2 and an error containing <text>.
//! Examples that sync to a webhook get the fake receiver's URL in `SLUICE_EXAMPLE_WEBHOOK_URL`.

use super::fakes::webhook::{FakeWebhook, Script};
use super::support::{repo_root, scratch, sluice};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sql_example_runs() {
    let fake = FakeWebhook::start(Script::default()).await;
    let mut files: Vec<_> = std::fs::read_dir(repo_root().join("sql_examples"))
        .expect("sql_examples")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 3,
        "expected the bundled examples, found {files:?}"
    );
    let mut failures = vec![];
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let expected_error = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("-- expect-error:"))
            .map(|s| s.trim().to_string());
        let dir = scratch();
        let relative = file.strip_prefix(repo_root()).unwrap();
        let mut command = sluice(dir.path());
        command
            .arg("run")
            .arg(relative)
            .arg("--state")
            .arg(dir.path().join(".sluice"))
            .env("SLUICE_EXAMPLE_WEBHOOK_URL", &fake.url);
        let output = tokio::task::spawn_blocking(move || command.output().unwrap())
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        let code = output.status.code();
        match &expected_error {
            None if code != Some(0) => {
                failures.push(format!("{}: exit {code:?}\n{stderr}", relative.display()))
            }
            Some(needle) if code != Some(2) || !stderr.contains(needle.as_str()) => failures.push(
                format!(
                    "{}: expected exit 2 and an error containing {needle:?}, got exit {code:?}\n{stderr}",
                    relative.display()
                ),
            ),
            _ => {}
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
