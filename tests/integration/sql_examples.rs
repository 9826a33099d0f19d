//! Every `sql_examples/*.sql` runs as a test. A file whose first line is
//! `-- expect-error: <text>` must fail with exit code 2 and an error containing <text>.
//! Examples that sync to a webhook get the fake receiver's URL in `SLUICE_EXAMPLE_WEBHOOK_URL`;
//! examples that sync to HubSpot get the fake HubSpot's in `SLUICE_EXAMPLE_HUBSPOT_URL`, and its
//! token in `HUBSPOT_TOKEN`.

use super::fakes::hubspot::{self, FakeHubspot};
use super::fakes::webhook::{FakeWebhook, Script};
use super::support::{repo_root, scratch, sluice};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sql_example_runs() {
    let fake = FakeWebhook::start(Script::default()).await;
    let crm = FakeHubspot::start(hubspot::Script::default()).await;
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
    let mut outputs = std::collections::HashMap::new();
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
            .env("SLUICE_EXAMPLE_WEBHOOK_URL", &fake.url)
            .env("SLUICE_EXAMPLE_HUBSPOT_URL", &crm.url)
            .env("HUBSPOT_TOKEN", hubspot::Script::default().token);
        let output = tokio::task::spawn_blocking(move || command.output().unwrap())
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        let code = output.status.code();
        outputs.insert(
            relative.display().to_string(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
        );
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

    // The CRM example did what it says: 25 contacts, each linked to its country's company, read
    // back by stage, and no drift between HubSpot and the model.
    let crm_output = &outputs["sql_examples/crm_sync.sql"];
    assert_eq!(crm.records("contacts").len(), 25, "{crm_output}");
    assert_eq!(crm.associations("contacts", "companies").len(), 25);
    assert!(
        crm_output.contains("| customer ") && crm_output.contains("| lead "),
        "{crm_output}"
    );
    assert!(
        crm_output.contains("fields sent (besides the key): insert=[lifecyclestage, firstname] update=[lifecyclestage]"),
        "{crm_output}"
    );
}
