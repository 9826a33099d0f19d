//! The `sluice` binary as users see it: stdout, stderr and exit code, snapshot-tested with
//! timings and file stamps filtered out.

use super::support::{files_under, scratch, sluice, transcript};

#[test]
fn quickstart_runs_and_writes_one_file() {
    let dir = scratch();
    let output = sluice(dir.path())
        .args(["run", "sql_examples/quickstart.sql"])
        .output()
        .unwrap();
    insta::assert_snapshot!("quickstart", transcript(&output, dir.path()));
    let files = files_under(&dir.path().join("out/contacts"));
    assert_eq!(files.len(), 1, "{files:?}");
    let lines = std::fs::read_to_string(&files[0]).unwrap().lines().count();
    assert_eq!(lines, 3750);
}

#[test]
fn check_plans_everything_and_writes_nothing() {
    let dir = scratch();
    let output = sluice(dir.path())
        .args([
            "check",
            "sql_examples/quickstart.sql",
            "sql_examples/file_formats.sql",
        ])
        .output()
        .unwrap();
    insta::assert_snapshot!("check_ok", transcript(&output, dir.path()));
    assert!(!dir.path().join("out").exists(), "check must not write");
}

const BROKEN: &str = "\
CREATE CONNECTION out TYPE file OPTIONS (url 'out/');
CREATE CONNECTION bad TYPE file OPTIONS (url 'x/', fromat 'csv');
CREATE EXTERNAL TABLE customers STORED AS PARQUET LOCATION 'sql_examples/data/customers.parquet';
SELEC 1;
INSERT INTO out.contacts
SELECT emial FROM customers;
INSERT INTO crm.contacts SELECT email FROM customers;
CREATE CONNECTION s3 TYPE snowflake;
CREATE EXTERNAL TABLE gone STORED AS CSV LOCATION 'sql_examples/data/missing.csv';
";

#[test]
fn check_reports_every_problem_at_file_line_col() {
    let dir = scratch();
    std::fs::write(dir.path().join("broken.sql"), BROKEN).unwrap();
    let output = sluice(dir.path())
        .args(["check", "broken.sql"])
        .output()
        .unwrap();
    insta::assert_snapshot!("check_broken", transcript(&output, dir.path()));
    assert_eq!(output.status.code(), Some(2));
    assert!(!dir.path().join("out").exists());
}

#[test]
fn run_with_a_syntax_error_anywhere_runs_nothing() {
    let dir = scratch();
    let sql = "CREATE CONNECTION out TYPE file OPTIONS (url 'out/');\n\
               INSERT INTO out.c SELECT 1 AS a;\n\
               INSERT INTO out.c SELEC 2 AS a;\n";
    std::fs::write(dir.path().join("s.sql"), sql).unwrap();
    let output = sluice(dir.path()).args(["run", "s.sql"]).output().unwrap();
    insta::assert_snapshot!("syntax_error_runs_nothing", transcript(&output, dir.path()));
    assert!(!dir.path().join("out").exists());
}

#[test]
fn run_stops_at_the_first_error_and_exits_2() {
    let dir = scratch();
    let sql = "CREATE CONNECTION out TYPE file OPTIONS (url 'out/');\n\
               INSERT INTO out.first SELECT 1 AS a;\n\
               INSERT INTO out.second SELECT CAST('x' AS INT) AS a;\n\
               INSERT INTO out.third SELECT 3 AS a;\n";
    std::fs::write(dir.path().join("s.sql"), sql).unwrap();
    let output = sluice(dir.path()).args(["run", "s.sql"]).output().unwrap();
    insta::assert_snapshot!("stops_at_first_error", transcript(&output, dir.path()));
    assert_eq!(files_under(&dir.path().join("out/first")).len(), 1);
    assert!(files_under(&dir.path().join("out/second")).is_empty());
    assert!(!dir.path().join("out/third").exists());
}

#[test]
fn directories_run_in_name_order() {
    let dir = scratch();
    std::fs::create_dir(dir.path().join("syncs")).unwrap();
    std::fs::write(
        dir.path().join("syncs/02_sync.sql"),
        "INSERT INTO out.t SELECT 'second file' AS step;",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("syncs/01_connections.sql"),
        "CREATE CONNECTION out TYPE file OPTIONS (url 'out/');",
    )
    .unwrap();
    std::fs::write(dir.path().join("syncs/notes.txt"), "not sql").unwrap();
    let output = sluice(dir.path()).args(["run", "syncs"]).output().unwrap();
    insta::assert_snapshot!("directory_order", transcript(&output, dir.path()));
}

#[test]
fn command_flag_errors_point_at_the_token() {
    let dir = scratch();
    let output = sluice(dir.path())
        .args([
            "-c",
            "SELECT 1 AS ok",
            "-c",
            "SELECT nope FROM (SELECT 1 AS yes)",
        ])
        .output()
        .unwrap();
    insta::assert_snapshot!("command_flag_error", transcript(&output, dir.path()));
}

#[test]
fn output_formats() {
    let dir = scratch();
    for format in ["csv", "json"] {
        let output = sluice(dir.path())
            .args(["--format", format, "-c"])
            .arg("SELECT customer_id, plan FROM 'sql_examples/data/customers.parquet' ORDER BY customer_id LIMIT 2")
            .output()
            .unwrap();
        insta::assert_snapshot!(format!("format_{format}"), transcript(&output, dir.path()));
    }
}

#[test]
fn missing_files_and_variables_exit_2_with_a_clear_message() {
    let dir = scratch();
    let output = sluice(dir.path())
        .args(["run", "nope.sql"])
        .output()
        .unwrap();
    insta::assert_snapshot!("missing_file", transcript(&output, dir.path()));
    let output = sluice(dir.path())
        .env_remove("SLUICE_CLI_TEST_UNSET")
        .args([
            "-c",
            "CREATE CONNECTION out TYPE file OPTIONS (url env('SLUICE_CLI_TEST_UNSET'))",
        ])
        .output()
        .unwrap();
    insta::assert_snapshot!("missing_env", transcript(&output, dir.path()));
}

/// Secrets (here a password inside a URL, given literally and through env()) never reach
/// stdout or stderr: not in SHOW CONNECTIONS, not in EXPLAIN, not in errors.
#[test]
fn secrets_never_appear_in_output_or_errors() {
    let dir = scratch();
    let sql = "\
CREATE CONNECTION a TYPE file OPTIONS (url 'http://alice:literal-pw-123@127.0.0.1:9/out/');
CREATE CONNECTION b TYPE file OPTIONS (url env('SLUICE_SECRET_URL'), format 'csv');
SHOW CONNECTIONS;
EXPLAIN INSERT INTO a.contacts SELECT 1 AS id;
EXPLAIN INSERT INTO b.contacts SELECT 1 AS id;
INSERT INTO b.contacts SELECT 1 AS id;
";
    std::fs::write(dir.path().join("s.sql"), sql).unwrap();
    let output = sluice(dir.path())
        .env(
            "SLUICE_SECRET_URL",
            "http://bob:env-pw-456@127.0.0.1:9/out/",
        )
        .env("SLUICE_LOG", "debug")
        .args(["run", "s.sql"])
        .output()
        .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        output.status.code(),
        Some(2),
        "the last insert cannot connect:\n{all}"
    );
    assert!(
        all.contains("SHOW") || all.contains("env('SLUICE_SECRET_URL')"),
        "{all}"
    );
    for secret in ["literal-pw-123", "env-pw-456"] {
        assert!(!all.contains(secret), "secret {secret} leaked:\n{all}");
    }
    assert!(all.contains("alice:***@"), "{all}");
}
