//! Issue 19, part 4: `sluice.changes`, what each run sent per record and what the destination
//! answered, kept with the state for `changes_retention`.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::fakes::webhook::{FakeWebhook, Script};
use super::support::{error, query};

/// The table `m` holding `rows` of (id, email, plan).
fn model(rows: &str) -> String {
    format!("CREATE OR REPLACE TABLE m AS SELECT * FROM (VALUES {rows}) AS v(id, email, plan)")
}

/// A mirror of `m` into the fake, with `options`.
async fn mirror(fake: &FakeWebhook, options: &str) -> sluice::Engine {
    let engine = super::webhook::connect(&fake.url, ", max_attempts '1'").await;
    engine
        .run_sql(&format!(
            "{};
             CREATE SYNC users OPTIONS (max_delete_pct '100'{options}) AS MERGE INTO hooks.users AS t
               USING m ON t.id = m.id
               WHEN MATCHED THEN UPDATE SET email = m.email
               WHEN NOT MATCHED THEN INSERT (id, email, plan) VALUES (m.id, m.email, m.plan)
               WHEN NOT MATCHED BY SOURCE THEN DELETE",
            model("(0, 'x@x.io', 'free')")
        ))
        .await
        .unwrap();
    engine
}

async fn run(engine: &sluice::Engine, rows: &str) {
    engine
        .run_sql(&format!("{}; RUN SYNC users", model(rows)))
        .await
        .unwrap();
}

/// The files of the sync's change log.
fn logs(engine: &sluice::Engine) -> Vec<PathBuf> {
    let dir = Path::new(engine.state_location()).join("changes/users");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    files.sort();
    files
}

/// `EXPLAIN SYNC users`, as shown.
async fn explain(engine: &sluice::Engine) -> String {
    match engine.run_sql("EXPLAIN SYNC users").await.unwrap().pop() {
        Some(sluice::Outcome::DryRun(report)) => report.to_string(),
        other => panic!("{other:?}"),
    }
}

/// The id of the sync's latest run.
async fn last_run(engine: &sluice::Engine) -> String {
    let text = query(
        engine,
        "SELECT run_id FROM sluice.runs WHERE sync = 'users' ORDER BY started_at DESC LIMIT 1",
    )
    .await;
    text.lines()
        .nth(3)
        .unwrap()
        .trim_matches(|c| c == '|' || c == ' ')
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_run_logs_what_it_sent_and_the_answer_per_record() {
    let fake = FakeWebhook::start(Script {
        reject_invalid: Some("email".into()),
        ..Script::default()
    })
    .await;
    let engine = mirror(&fake, "").await;
    // Run 1: three new records, one of which the destination refuses.
    run(
        &engine,
        "(1, 'a@x.io', 'free'), (2, 'b@x.io', 'pro'), (3, 'nope', 'free')",
    )
    .await;
    let first = last_run(&engine).await;
    // Run 2: 1 changes its email (and its plan, which only an insert sends), 2 left the model,
    // 3 is fixed and sent again.
    run(&engine, "(1, 'a2@x.io', 'pro'), (3, 'c@x.io', 'free')").await;
    let second = last_run(&engine).await;
    assert_ne!(first, second);

    let text = query(
        &engine,
        "SELECT key, operation, outcome, error_code, fields, record_id IS NULL AS no_id
         FROM sluice.changes WHERE sync = 'users'
         ORDER BY sent_at, operation = 'delete', key",
    )
    .await;
    let expected = r#"
+-----+-----------+----------+---------------+-----------------------------------------+-------+
| key | operation | outcome  | error_code    | fields                                  | no_id |
+-----+-----------+----------+---------------+-----------------------------------------+-------+
| 1   | insert    | accepted |               | {"id":1,"email":"a@x.io","plan":"free"} | true  |
| 2   | insert    | accepted |               | {"id":2,"email":"b@x.io","plan":"pro"}  | true  |
| 3   | insert    | rejected | invalid_email | {"id":3,"email":"nope","plan":"free"}   | true  |
| 1   | update    | accepted |               | {"id":1,"email":"a2@x.io"}              | true  |
| 3   | insert    | accepted |               | {"id":3,"email":"c@x.io","plan":"free"} | true  |
| 2   | delete    | accepted |               | {"id":2}                                | true  |
+-----+-----------+----------+---------------+-----------------------------------------+-------+"#;
    assert_eq!(text.trim(), expected.trim(), "{text}");

    // Per run, with its target and the refusal's message.
    let text = query(
        &engine,
        &format!(
            "SELECT run_id, target, count(*) AS records, count(error_message) AS refused,
                    max(error_message) AS why
             FROM sluice.changes GROUP BY run_id, target ORDER BY run_id = '{second}'"
        ),
    )
    .await;
    assert!(
        text.contains(&format!("| {first} | hooks.users | 3 ")),
        "{text}"
    );
    assert!(
        text.contains(&format!("| {second} | hooks.users | 3 ")),
        "{text}"
    );
    assert!(text.contains("'nope' is not an email address"), "{text}");

    // A record's history, by key.
    let text = query(
        &engine,
        "SELECT run_id, outcome FROM sluice.changes WHERE key = '3' ORDER BY sent_at",
    )
    .await;
    assert!(
        text.contains(&format!("| {first} | rejected"))
            && text.contains(&format!("| {second} | accepted")),
        "{text}"
    );

    // Filters on the run are applied before a log is read: EXPLAIN says how many runs are read.
    let plan = query(
        &engine,
        &format!("EXPLAIN SELECT key FROM sluice.changes WHERE run_id = '{second}' AND outcome = 'accepted'"),
    )
    .await;
    assert!(
        plan.contains("ChangesScanExec: 1 of 2 runs' logs, 2 filter(s) applied while reading"),
        "{plan}"
    );
    let text = query(
        &engine,
        &format!("SELECT count(*) AS n FROM sluice.changes WHERE run_id = '{second}' AND outcome = 'accepted'"),
    )
    .await;
    assert!(text.contains("| 3 "), "{text}");
    // A filter on the rendered fields, and a LIMIT.
    let text = query(
        &engine,
        "SELECT key FROM sluice.changes WHERE fields LIKE '%\"plan\":\"pro\"%'",
    )
    .await;
    assert!(text.contains("| 2 ") && !text.contains("| 1 "), "{text}");
    let text = query(&engine, "SELECT key FROM sluice.changes LIMIT 2").await;
    assert_eq!(text.lines().count(), 6, "{text}");

    // The plan of a write shows where its log goes, and so does a dry run, which writes none.
    let plan = query(
        &engine,
        "EXPLAIN INSERT INTO hooks.users SELECT id, email FROM m",
    )
    .await;
    assert!(
        plan.contains("ChangeLogExec: each record sent, to ")
            && plan.contains("(sluice.changes), kept 14 days"),
        "{plan}"
    );
    // Right above the diff: nothing reorders or delays what the sink takes.
    let lines: Vec<&str> = plan.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.contains("ChangeLogExec"))
        .unwrap();
    assert!(lines[at + 1].contains("DiffExec"), "{plan}");
    let before = logs(&engine);
    assert_eq!(
        before.len(),
        4,
        "a log and its outcomes per run: {before:?}"
    );
    engine
        .run_sql(&model("(9, 'z@x.io', 'free')"))
        .await
        .unwrap();
    let dry = explain(&engine).await;
    assert!(
        dry.contains("change log: each record sent is kept 14 days in sluice.changes (")
            && dry.contains("changes/users/)"),
        "{dry}"
    );
    assert_eq!(logs(&engine), before);
    // The logs are the owner's only: they hold the records' values.
    use std::os::unix::fs::PermissionsExt;
    for file in &before {
        let mode = std::fs::metadata(file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", file.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_run_logs_its_records_as_unanswered() {
    let fake = FakeWebhook::start(Script::default()).await;
    let engine = mirror(&fake, "").await;
    fake.script(|s| s.unauthorized = true);
    let err = error(
        &engine,
        &format!("{}; RUN SYNC users", model("(1, 'a@x.io', 'free')")),
    )
    .await;
    assert!(err.contains("401"), "{err}");
    let text = query(
        &engine,
        "SELECT key, operation, outcome, error_code FROM sluice.changes",
    )
    .await;
    assert!(text.contains("| 1   | insert    | no_answer |"), "{text}");
    // Sent again by the next run, and answered.
    fake.script(|s| s.unauthorized = false);
    run(&engine, "(1, 'a@x.io', 'free')").await;
    let text = query(
        &engine,
        "SELECT outcome, count(*) AS n FROM sluice.changes GROUP BY outcome ORDER BY outcome",
    )
    .await;
    assert!(
        text.contains("| accepted  | 1 |") && text.contains("| no_answer | 1 |"),
        "{text}"
    );
}

/// Sets a file's modification time `age` ago.
fn age(file: &Path, age: Duration) {
    let f = std::fs::File::options().write(true).open(file).unwrap();
    f.set_modified(SystemTime::now() - age).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_older_than_the_retention_are_removed_and_0_keeps_none() {
    let fake = FakeWebhook::start(Script::default()).await;
    let engine = mirror(&fake, ", changes_retention '2 days'").await;
    run(&engine, "(1, 'a@x.io', 'free')").await;
    let old = logs(&engine);
    assert_eq!(old.len(), 2, "{old:?}");
    for file in &old {
        age(file, Duration::from_secs(3 * 86400));
    }
    run(&engine, "(1, 'b@x.io', 'free')").await;
    let now = logs(&engine);
    assert_eq!(now.len(), 2, "{now:?}");
    assert!(now.iter().all(|f| !old.contains(f)), "{old:?} {now:?}");
    let text = query(&engine, "SELECT operation FROM sluice.changes").await;
    assert!(
        text.contains("update") && !text.contains("insert"),
        "{text}"
    );

    // '0': no log, and the sync's logs go.
    engine
        .run_sql(
            "CREATE OR REPLACE SYNC users OPTIONS (changes_retention '0') AS MERGE INTO hooks.users AS t
               USING m ON t.id = m.id
               WHEN MATCHED THEN UPDATE SET email = m.email
               WHEN NOT MATCHED THEN INSERT (id, email, plan) VALUES (m.id, m.email, m.plan)",
        )
        .await
        .unwrap();
    let dry = explain(&engine).await;
    assert!(
        dry.contains("change log: off (changes_retention '0')"),
        "{dry}"
    );
    run(&engine, "(1, 'c@x.io', 'free')").await;
    assert_eq!(fake.observed(|o| o.records.len()), 3);
    assert!(logs(&engine).is_empty(), "{:?}", logs(&engine));
    let text = query(&engine, "SELECT count(*) AS n FROM sluice.changes").await;
    assert!(text.contains("| 0 "), "{text}");

    // A retention that is not a duration says what to write.
    let err = error(
        &engine,
        "CREATE OR REPLACE SYNC users OPTIONS (changes_retention 'forever') AS INSERT INTO hooks.users SELECT id, email FROM m",
    )
    .await;
    assert!(
        err.contains("changes_retention") && err.contains("'14 days'"),
        "{err}"
    );
}
