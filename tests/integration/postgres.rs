//! Postgres as a source and as a destination, against the real local server (127.0.0.1:5432,
//! user postgres, database test). Each test works in its own schema and drops it.
//!
//! Without a reachable server these tests say so and pass, unless `SLUICE_REQUIRE_SERVICES=1`
//! (set by `.ci/run`), where they fail.

use super::fakes::webhook::{FakeWebhook, Script};
use super::support::{query, write};

const URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A schema of its own on the local server, dropped when the test ends.
pub(super) struct PgSchema {
    client: tokio_postgres::Client,
    pub(super) name: String,
}

impl PgSchema {
    /// `None` (test skipped) when the server cannot be reached and services are not required.
    pub(super) async fn new(name: &str) -> Option<Self> {
        let url = std::env::var("SLUICE_TEST_PG_URL").unwrap_or_else(|_| URL.to_string());
        let client = match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
            Ok((client, connection)) => {
                tokio::spawn(connection);
                client
            }
            Err(e) => {
                if std::env::var("SLUICE_REQUIRE_SERVICES").as_deref() == Ok("1") {
                    panic!(
                        "PostgreSQL at {url} is required (SLUICE_REQUIRE_SERVICES=1) but cannot be reached: {e}"
                    );
                }
                eprintln!("skipping: PostgreSQL at {url} cannot be reached: {e}");
                return None;
            }
        };
        let name = format!("{name}_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        client
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {quoted} CASCADE; CREATE SCHEMA {quoted}"
            ))
            .await
            .expect("create schema");
        Some(Self { client, name })
    }

    fn quoted(&self) -> String {
        format!("\"{}\"", self.name.replace('"', "\"\""))
    }

    pub(super) async fn sql(&self, sql: &str) {
        self.client
            .batch_execute(&sql.replace("$S", &self.quoted()))
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }

    /// Every row of `query` as text lines (`a|b|c`), in the query's order.
    async fn rows(&self, query: &str) -> Vec<String> {
        let query = query.replace("$S", &self.quoted());
        let rows = self
            .client
            .simple_query(&query)
            .await
            .unwrap_or_else(|e| panic!("{query}: {e:?}"));
        rows.into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                    (0..r.len())
                        .map(|i| r.get(i).unwrap_or("NULL").to_string())
                        .collect::<Vec<_>>()
                        .join("|"),
                ),
                _ => None,
            })
            .collect()
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let sql = format!("DROP SCHEMA IF EXISTS {} CASCADE", self.quoted());
        let _ = std::process::Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "test",
                "-q",
                "-c",
                &sql,
            ])
            .output();
    }
}

/// An engine with the connection `wh` to the local server, its default schema `schema`.
async fn engine(schema: &PgSchema) -> sluice::Engine {
    let engine = super::support::engine();
    // SAFETY: set before any thread reads it; every test sets the same value.
    unsafe { std::env::set_var("SLUICE_TEST_WH_URL", URL) };
    engine
        .run_sql(&format!(
            "CREATE CONNECTION wh TYPE postgres OPTIONS (url env('SLUICE_TEST_WH_URL'), schema '{}')",
            schema.name.replace('\'', "''")
        ))
        .await
        .expect("connection");
    engine
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_every_supported_type_with_pushdown() {
    let Some(pg) = PgSchema::new("sluice_src").await else {
        return;
    };
    pg.sql(
        "CREATE TABLE $S.users (id bigint PRIMARY KEY, small smallint, n integer, email text NOT NULL,
            code varchar(5), score numeric(10,2), big numeric, ratio float8, r real, active bool,
            born date, seen timestamptz, at timestamp, uid uuid, doc jsonb, js json, raw bytea,
            tags text[], nums int[], v tsvector);
         INSERT INTO $S.users VALUES
          (1, 1, 10, 'a@x.com', 'AB', 12.50, 123456789012345678901234567890.5, 0.5, 1.5, true,
           '2024-02-29', '2024-01-01 10:00:00+02', '2024-01-01 10:00:00',
           'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{\"a\": [1, 2]}', '{\"b\":1}', '\\xdeadbeef',
           ARRAY['x', NULL, 'y'], ARRAY[1, 2], to_tsvector('hello')),
          (2, NULL, NULL, 'b@x.com', NULL, -0.01, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
           NULL, NULL, NULL, NULL, '{}', NULL);",
    )
    .await;
    let engine = engine(&pg).await;
    let all = "id, small, n, email, code, score, big, ratio, r, active, born, seen, at, uid, doc, js, raw, tags, nums";
    let text = query(&engine, &format!("SELECT {all} FROM wh.users ORDER BY id")).await;
    for expected in [
        "| 1  | 1     | 10 | a@x.com | AB   | 12.50 |",
        "1.2345678901234568e29",
        "2024-02-29",
        "2024-01-01T08:00:00Z",
        "2024-01-01T10:00:00",
        "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "{\"a\": [1, 2]}",
        "deadbeef",
        "[x, , y]",
        "| 2  |       |    | b@x.com |      | -0.01 |",
        "| []",
    ] {
        assert!(text.contains(expected), "{expected} missing from\n{text}");
    }
    // The same relation through conn.schema.table; count(*) reads no column at all.
    let count = query(
        &engine,
        &format!("SELECT count(*) AS n FROM wh.{}.users", pg.name),
    )
    .await;
    assert!(count.contains("| 2 |"), "{count}");

    // Projection, filters Postgres evaluates exactly, and LIMIT reach the SQL sent.
    let explain = query(
        &engine,
        "EXPLAIN SELECT id FROM wh.users WHERE id > 0 AND email LIKE '%@x.com' AND email > 'a' LIMIT 1",
    )
    .await;
    assert!(
        explain.contains("PostgresScanExec: connection=wh sql=SELECT \"id\", \"email\" FROM"),
        "{explain}"
    );
    assert!(explain.contains("(\"id\" > 0)"), "{explain}");
    assert!(explain.contains("(\"email\" LIKE '%@x.com')"), "{explain}");
    // Text ordering depends on collation: DataFusion filters it after the scan.
    assert!(explain.contains("FilterExec: email@1 > a"), "{explain}");
    let limited = query(
        &engine,
        "EXPLAIN SELECT id FROM wh.users WHERE id >= 2 LIMIT 1",
    )
    .await;
    assert!(
        limited.contains("WHERE ((\"id\" >= 2)) LIMIT 1"),
        "{limited}"
    );
    let filtered = query(
        &engine,
        "SELECT id FROM wh.users WHERE id >= 2 AND email = 'b@x.com'",
    )
    .await;
    assert!(
        filtered.contains("| 2  |") && !filtered.contains("| 1  |"),
        "{filtered}"
    );

    // An unsupported type is a clear error naming the column, only when it is read.
    let err = engine
        .run_sql("SELECT v FROM wh.users")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("column 'v'") && err.contains("tsvector"),
        "{err}"
    );
    let err = engine
        .run_sql("SELECT * FROM wh.no_such_table")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("no_such_table"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_never_show() {
    let Some(pg) = PgSchema::new("sluice_secret").await else {
        return;
    };
    pg.sql("CREATE TABLE $S.t (id int PRIMARY KEY)").await;
    let engine = super::support::engine();
    // Trust auth ignores the password, so the connection works and its text can be checked.
    unsafe {
        std::env::set_var(
            "SLUICE_TEST_SECRET_URL",
            "postgres://postgres:hunter2secret@127.0.0.1:5432/test",
        )
    };
    engine
        .run_sql(&format!(
            "CREATE CONNECTION wh TYPE postgres OPTIONS (url env('SLUICE_TEST_SECRET_URL'), schema '{}')",
            pg.name
        ))
        .await
        .unwrap();
    let mut seen = String::new();
    for sql in [
        "SHOW CONNECTIONS",
        "EXPLAIN SELECT * FROM wh.t",
        "EXPLAIN INSERT INTO wh.t SELECT 1 AS id",
    ] {
        seen.push_str(&query(&engine, sql).await);
    }
    let outcome = engine
        .run_sql("INSERT INTO wh.t SELECT 1 AS id")
        .await
        .unwrap();
    seen.push_str(&format!("{outcome:?}"));
    assert!(!seen.contains("hunter2secret"), "{seen}");
    assert!(seen.contains("PostgresSink"), "{seen}");

    // A server that cannot be reached: the message names where, never the password.
    unsafe {
        std::env::set_var(
            "SLUICE_TEST_BAD_URL",
            "postgres://postgres:hunter2secret@127.0.0.1:1/test",
        )
    };
    let err = engine
        .run_sql("CREATE CONNECTION bad TYPE postgres OPTIONS (url env('SLUICE_TEST_BAD_URL'))")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("127.0.0.1:1/test") && !err.contains("hunter2secret"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syncs_every_mode_into_a_table() {
    let Some(pg) = PgSchema::new("sluice_dst").await else {
        return;
    };
    pg.sql(
        "CREATE TABLE $S.accounts (id bigint PRIMARY KEY, email varchar(12), score numeric(10,2),
            note text DEFAULT 'kept', updated_at timestamptz)",
    )
    .await;
    let engine = engine(&pg).await;
    let model = |rows: &str| {
        format!(
            "CREATE OR REPLACE TABLE model AS SELECT * FROM (VALUES {rows}) AS v(id, email, score)"
        )
    };
    let upsert = "INSERT INTO wh.accounts SELECT id, email, CAST(score AS DECIMAL(10,2)) AS score FROM model";
    let table = "SELECT id, email, score, note FROM $S.accounts ORDER BY id";

    // First run: every row inserted (unmapped columns keep their defaults).
    engine
        .run_sql(&model("(1, 'a@x', 1.5), (2, 'b@x', 2.5), (3, 'c@x', 3.5)"))
        .await
        .unwrap();
    engine.run_sql(upsert).await.unwrap();
    assert_eq!(
        pg.rows(table).await,
        ["1|a@x|1.50|kept", "2|b@x|2.50|kept", "3|c@x|3.50|kept"]
    );

    // A change elsewhere in the table is left alone: only changed fields are written.
    pg.sql("UPDATE $S.accounts SET note = 'mine', email = 'edited' WHERE id = 1")
        .await;
    engine
        .run_sql(&model(
            "(1, 'a@x', 9.0), (2, 'b@x', 2.5), (3, 'c@x', 3.5), (4, 'd@x', 4.0)",
        ))
        .await
        .unwrap();
    let outcomes = engine.run_sql(upsert).await.unwrap();
    let summary = format!("{outcomes:?}");
    assert!(
        summary.contains("inserted: 1") && summary.contains("updated: 1"),
        "{summary}"
    );
    assert_eq!(
        pg.rows(table).await,
        [
            "1|edited|9.00|mine",
            "2|b@x|2.50|kept",
            "3|c@x|3.50|kept",
            "4|d@x|4.00|kept"
        ]
    );

    // A value the table refuses is a reject naming the key and Postgres's reason; the rest lands.
    engine
        .run_sql(&model(
            "(1, 'a@x', 9.0), (2, 'far-too-long@x', 2.5), (3, 'c@x', 7.0), (4, 'd@x', 4.0)",
        ))
        .await
        .unwrap();
    engine.run_sql(upsert).await.unwrap();
    let rejects = query(
        &engine,
        "SELECT key, error_code, error_message FROM sluice.rejects",
    )
    .await;
    assert!(
        rejects.contains("| 2   | pg_22001") && rejects.contains("character varying(12)"),
        "{rejects}"
    );
    assert_eq!(
        pg.rows("SELECT score FROM $S.accounts WHERE id = 3").await,
        ["7.00"]
    );

    // Mirror: rows that left the model are deleted; the rejected one is retried once fixed.
    let mirror = "MERGE INTO wh.accounts AS t USING model AS s ON t.id = s.id
        WHEN MATCHED THEN UPDATE SET email = s.email, score = CAST(s.score AS DECIMAL(10,2))
        WHEN NOT MATCHED THEN INSERT (id, email, score) VALUES (s.id, s.email, CAST(s.score AS DECIMAL(10,2)))
        WHEN NOT MATCHED BY SOURCE THEN DELETE";
    engine
        .run_sql(&model("(1, 'a@x', 9.0), (2, 'b@x', 2.0), (4, 'd@x', 4.0)"))
        .await
        .unwrap();
    engine.run_sql(mirror).await.unwrap();
    // The mirror sync is a new sync (its own state): its first run sends every row.
    assert_eq!(
        pg.rows("SELECT id, email, score FROM $S.accounts ORDER BY id")
            .await,
        ["1|a@x|9.00", "2|b@x|2.00", "3|c@x|7.00", "4|d@x|4.00"]
    );
    engine
        .run_sql(&model("(1, 'a@x', 9.0), (4, 'd@x', 4.0)"))
        .await
        .unwrap();
    engine.run_sql(mirror).await.unwrap();
    assert_eq!(
        pg.rows("SELECT id FROM $S.accounts ORDER BY id").await,
        ["1", "3", "4"],
        "2 left the model and is deleted; 3 was never synced by this sync"
    );

    // Create-only: an existing row is a reject, a new one is inserted.
    let create_only = "MERGE INTO wh.accounts AS t USING model AS s ON t.id = s.id
        WHEN NOT MATCHED THEN INSERT (id, email) VALUES (s.id, s.email)";
    engine
        .run_sql(&model("(3, 'new3@x', 0.0), (5, 'e@x', 0.0)"))
        .await
        .unwrap();
    engine.run_sql(create_only).await.unwrap();
    let rejects = query(
        &engine,
        "SELECT key, error_code FROM sluice.rejects WHERE error_code = 'already_exists'",
    )
    .await;
    assert!(rejects.contains("| 3   | already_exists"), "{rejects}");
    assert_eq!(
        pg.rows("SELECT id, email FROM $S.accounts WHERE id IN (3, 5) ORDER BY id")
            .await,
        ["3|c@x", "5|e@x"]
    );

    // Update-only: a missing row is a reject, an existing one is updated.
    let update_only = "MERGE INTO wh.accounts AS t USING model AS s ON t.id = s.id
        WHEN MATCHED THEN UPDATE SET email = s.email";
    engine
        .run_sql(&model("(5, 'e2@x', 0.0), (6, 'f@x', 0.0)"))
        .await
        .unwrap();
    engine.run_sql(update_only).await.unwrap();
    let rejects = query(
        &engine,
        "SELECT key, error_code FROM sluice.rejects WHERE error_code = 'not_found'",
    )
    .await;
    assert!(rejects.contains("| 6   | not_found"), "{rejects}");
    assert_eq!(
        pg.rows("SELECT email FROM $S.accounts WHERE id = 5").await,
        ["e2@x"]
    );
    assert_eq!(
        pg.rows("SELECT count(*) FROM $S.accounts WHERE id = 6")
            .await,
        ["0"]
    );

    // DELETE by a key list.
    engine
        .run_sql("DELETE FROM wh.accounts WHERE id IN (SELECT 5 AS id)")
        .await
        .unwrap();
    assert_eq!(
        pg.rows("SELECT id FROM $S.accounts ORDER BY id").await,
        ["1", "3", "4"]
    );

    // A type that cannot be converted is refused before anything is written, naming the column.
    let err = engine
        .run_sql("INSERT INTO wh.accounts SELECT 7 AS id, true AS updated_at")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("updated_at"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_identifiers_are_quoted_everywhere() {
    let Some(pg) = PgSchema::new("sluice \"we;ird\" ß").await else {
        return;
    };
    pg.sql(
        "CREATE TABLE $S.\"Tab le\"\"; DROP TABLE x; --\" (
            \"i d\" bigint PRIMARY KEY, \"na\"\"me;\" text, \"ünï çødé\" int, \"select\" text)",
    )
    .await;
    let engine = engine(&pg).await;
    let table = "wh.\"Tab le\"\"; DROP TABLE x; --\"";
    engine
        .run_sql(
            "CREATE TABLE model AS SELECT * FROM (VALUES (1, 'o''brien', 7, 'a'), (2, 'x\"y', 8, 'b'))
             AS v(\"i d\", \"na\"\"me;\", \"ünï çødé\", \"select\")",
        )
        .await
        .unwrap();
    engine
        .run_sql(&format!(
            "INSERT INTO {table} SELECT \"i d\", \"na\"\"me;\", \"ünï çødé\", \"select\" FROM model"
        ))
        .await
        .unwrap();
    let select = "SELECT * FROM $S.\"Tab le\"\"; DROP TABLE x; --\" ORDER BY 1";
    assert_eq!(pg.rows(select).await, ["1|o'brien|7|a", "2|x\"y|8|b"]);

    // Updates and deletes through the staging path (a mirror sync: its first run syncs both
    // rows, its second deletes the row that left the model), then read back through the source.
    let mirror = format!(
        "MERGE INTO {table} AS t USING model2 AS s ON t.\"i d\" = s.\"i d\"
         WHEN MATCHED THEN UPDATE SET \"na\"\"me;\" = s.\"na\"\"me;\"
         WHEN NOT MATCHED THEN INSERT (\"i d\", \"na\"\"me;\") VALUES (s.\"i d\", s.\"na\"\"me;\")
         WHEN NOT MATCHED BY SOURCE THEN DELETE"
    );
    for rows in ["(1, 'changed'), (2, 'x\"y')", "(1, 'changed')"] {
        engine
            .run_sql(&format!(
                "CREATE OR REPLACE TABLE model2 AS SELECT * FROM (VALUES {rows}) AS v(\"i d\", \"na\"\"me;\")"
            ))
            .await
            .unwrap();
        engine.run_sql(&mirror).await.unwrap();
    }
    assert_eq!(pg.rows(select).await, ["1|changed|7|a"]);
    let text = query(
        &engine,
        &format!("SELECT \"na\"\"me;\", \"ünï çødé\" FROM {table} WHERE \"select\" = 'a' AND \"ünï çødé\" = 7"),
    )
    .await;
    assert!(text.contains("| changed | 7 "), "{text}");
}

/// The model of the kill test as CSV (id, email, plan).
fn write_model(dir: &std::path::Path, model: &std::collections::BTreeMap<i64, (String, String)>) {
    let mut csv = String::from("id,email,plan\n");
    for (id, (email, plan)) in model {
        csv.push_str(&format!("{id},{email},{plan}\n"));
    }
    std::fs::write(dir.join("model.csv"), csv).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_sync_then_rerun_ends_equal_to_the_model() {
    let Some(pg) = PgSchema::new("sluice_kill").await else {
        return;
    };
    pg.sql("CREATE TABLE $S.accounts (id bigint PRIMARY KEY, email text NOT NULL, plan text)")
        .await;
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    std::fs::write(
        dir.join("sync.sql"),
        format!(
            "CREATE CONNECTION app TYPE postgres OPTIONS (url env('SLUICE_KILL_PG_URL'), schema '{}', batch_size '700');
             CREATE EXTERNAL TABLE model STORED AS CSV LOCATION 'model.csv' OPTIONS ('format.has_header' 'true');
             MERGE INTO app.accounts AS t USING model AS s ON t.id = s.id
               WHEN MATCHED THEN UPDATE SET email = s.email, plan = s.plan
               WHEN NOT MATCHED THEN INSERT (id, email, plan) VALUES (s.id, s.email, s.plan)
               WHEN NOT MATCHED BY SOURCE THEN DELETE;",
            pg.name
        ),
    )
    .unwrap();
    let start = || {
        super::support::sluice(dir)
            .args(["run", "sync.sql"])
            .env("SLUICE_KILL_PG_URL", URL)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("seed {seed}");
    let mut below = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut model: std::collections::BTreeMap<i64, (String, String)> = (0..20_000)
        .map(|i| (i, (format!("u{i}@example.com"), "free".to_string())))
        .collect();
    let mut next_id = 20_000;
    let mut killed = 0;
    // A first run to completion tells how long a run takes here, so that the kills below land
    // mid-way on a slow machine and a fast one alike.
    write_model(dir, &model);
    let timed = std::time::Instant::now();
    assert!(start().wait().unwrap().success(), "the first run failed");
    let mut run_ms = timed.elapsed().as_millis().max(20) as u64;
    // Killed mid-way, a run ends with the table and the state in whatever state it left them.
    let run_and_kill = |kill_after: std::time::Duration| async move {
        let mut child = start();
        let started = std::time::Instant::now();
        let mut killed = false;
        loop {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            if started.elapsed() >= kill_after {
                child.kill().unwrap(); // SIGKILL
                killed = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        child.wait().unwrap();
        (killed, started.elapsed())
    };
    // A first run streams into one transaction: start from nothing again and kill one.
    pg.sql("TRUNCATE $S.accounts").await;
    std::fs::remove_dir_all(dir.join(".sluice")).unwrap();
    let (first_killed, _) = run_and_kill(std::time::Duration::from_millis(5 + below(run_ms))).await;
    eprintln!("first run killed: {first_killed}");
    for _ in 0..8 {
        for _ in 0..3000 {
            if let Some(row) = model.get_mut(&(below(next_id as u64) as i64)) {
                row.1 = format!("plan{}", below(1000));
            }
        }
        for _ in 0..300 {
            model.remove(&(below(next_id as u64) as i64));
        }
        for _ in 0..500 {
            model.insert(next_id, (format!("new{next_id}@example.com"), "pro".into()));
            next_id += 1;
        }
        write_model(dir, &model);
        let kill_after = std::time::Duration::from_millis(5 + below(run_ms * 9 / 10));
        let (was_killed, took) = run_and_kill(kill_after).await;
        if was_killed {
            killed += 1;
        } else {
            // Runs of a few changes are quicker than the first: aim the next kills within one.
            run_ms = took.as_millis().max(20) as u64;
        }
    }
    eprintln!("killed {killed} of 8 runs");
    assert!(killed >= 4, "only {killed} of 8 runs were killed mid-way");

    // A run to completion converges: the table holds exactly the model.
    let out = start().wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected: Vec<String> = model
        .iter()
        .map(|(id, (email, plan))| format!("{id}|{email}|{plan}"))
        .collect();
    let actual = pg
        .rows("SELECT id, email, plan FROM $S.accounts ORDER BY id")
        .await;
    assert_eq!(actual.len(), expected.len(), "row count");
    assert!(actual == expected, "the table differs from the model");

    // State agrees with the table: a rerun changes nothing.
    let out = start().wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("0 inserted, 0 updated, 0 deleted"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_sees_every_schema() {
    let Some(pg) = PgSchema::new("sluice_complete").await else {
        return;
    };
    pg.sql("CREATE TABLE $S.leads (lead_id int PRIMARY KEY)")
        .await;
    let engine = engine(&pg).await;
    let words = engine.completion_words().await;
    for word in [
        "wh.leads".to_string(),
        "lead_id".to_string(),
        format!("wh.{}.leads", pg.name),
    ] {
        assert!(words.contains(&word), "{word} missing from {words:?}");
    }

    // Completion (after every REPL statement) answers from what the connection knows, without a
    // query per table: a column renamed behind sluice's back shows up once sluice looks again.
    pg.sql("ALTER TABLE $S.leads RENAME COLUMN lead_id TO lead_key")
        .await;
    let words = engine.completion_words().await;
    assert!(words.contains(&"lead_id".to_string()) && !words.contains(&"lead_key".to_string()));
    query(&engine, "SELECT count(*) AS n FROM wh.leads").await;
    let words = engine.completion_words().await;
    assert!(words.contains(&"lead_key".to_string()), "{words:?}");
}

/// `SHOW OBJECTS IN wh`: each table with its key (primary, or composite), the modes a sync may
/// use, and an append-only table without a key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_objects_lists_keys_and_modes() {
    let Some(pg) = PgSchema::new("sluice_objects").await else {
        return;
    };
    pg.sql(
        "CREATE TABLE $S.leads (lead_id int PRIMARY KEY, email text UNIQUE, score int);
         CREATE TABLE $S.pairs (a int, b int, PRIMARY KEY (a, b));
         CREATE TABLE $S.events (at timestamptz, what text);",
    )
    .await;
    let engine = engine(&pg).await;
    let text = query(&engine, "SHOW OBJECTS IN wh").await;
    let keyed = "upsert, mirror, create-only, create-only+delete, update-only, update-only+delete, delete-only, delete";
    for row in [
        "| events | | | append | yes | 2 |".to_string(),
        format!("| leads | lead_id | | {keyed} | yes | 3 |"),
        format!("| pairs | a, b | | {keyed} | yes | 2 |"),
    ] {
        let squeezed: String = text
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(squeezed.contains(&row), "{row} missing from\n{text}");
    }
}

/// The latest run of `sync` as `rows_read/inserted/updated/deleted/unchanged/rejected`.
async fn last_run(engine: &sluice::Engine, sync: &str) -> String {
    let table = query(
        engine,
        &format!(
            "SELECT concat_ws('/', rows_read, inserted, updated, deleted, unchanged, rejected) AS c
             FROM sluice.runs WHERE sync = '{sync}' ORDER BY started_at DESC LIMIT 1"
        ),
    )
    .await;
    table
        .lines()
        .nth(3)
        .unwrap_or_default()
        .trim_matches(|c| c == '|' || c == ' ')
        .to_string()
}

/// Runs the sync `local` (the local diff, into `dst_local`) and `remote` (the warehouse diff,
/// into `dst_wh`); checks that they counted alike and left the same `cols` in their tables, and
/// returns the counts and the rows.
async fn run_both(
    engine: &sluice::Engine,
    pg: &PgSchema,
    (local, remote): (&str, &str),
    cols: &str,
) -> (String, Vec<String>) {
    engine.run_sql(&format!("RUN SYNC {local}")).await.unwrap();
    engine.run_sql(&format!("RUN SYNC {remote}")).await.unwrap();
    let (a, b) = (
        last_run(engine, local).await,
        last_run(engine, remote).await,
    );
    assert_eq!(a, b, "the two diffs counted differently");
    let (x, y) = (
        pg.rows(&format!("SELECT {cols} FROM $S.dst_local ORDER BY id"))
            .await,
        pg.rows(&format!("SELECT {cols} FROM $S.dst_wh ORDER BY id"))
            .await,
    );
    assert_eq!(x, y, "the two destinations differ");
    (a, y)
}

/// Issue 19: MERGE clauses keep their own fields, with the local diff and the warehouse diff
/// alike: a field only in INSERT is set on create and never overwritten (a rep's edit stays), a
/// field only in UPDATE SET is left to the table's default on create, and a change only to
/// create-only fields sends nothing and is remembered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_clauses_keep_their_fields_in_both_diffs() {
    let Some(pg) = PgSchema::new("sluice_clauses").await else {
        return;
    };
    pg.sql(
        "CREATE TABLE $S.people (id bigint PRIMARY KEY, firstname text, score numeric(10,2), note text);
         CREATE TABLE $S.dst_local (id bigint PRIMARY KEY, firstname text, lead_source text,
            score numeric(10,2), note text NOT NULL DEFAULT 'by default');
         CREATE TABLE $S.dst_wh (LIKE $S.dst_local INCLUDING ALL);
         INSERT INTO $S.people VALUES (1, 'Ann', 1.50, 'n1'), (2, 'Bob', 2.50, 'n2'), (3, 'Cy', 3.50, 'n3');",
    )
    .await;
    let engine = engine(&pg).await;
    let suffix = &pg.name[pg.name.len() - 8..];
    let (local, remote) = (format!("cl_local_{suffix}"), format!("cl_remote_{suffix}"));
    let body = |dst: &str| {
        format!(
            "MERGE INTO wh.{dst} AS t USING (SELECT id, firstname, score, note FROM wh.people) AS s
             ON t.id = s.id
             WHEN MATCHED THEN UPDATE SET score = s.score, note = s.note
             WHEN NOT MATCHED THEN INSERT (id, firstname, lead_source, score)
                                   VALUES (s.id, s.firstname, 'warehouse', s.score)"
        )
    };
    engine
        .run_sql(&format!(
            "CREATE SYNC {local} AS {}; CREATE SYNC {remote} OPTIONS (diff 'warehouse') AS {};",
            body("dst_local"),
            body("dst_wh")
        ))
        .await
        .unwrap();
    let run_both = || {
        run_both(
            &engine,
            &pg,
            (&local, &remote),
            "id, firstname, lead_source, score, note",
        )
    };

    // Created with the INSERT's fields; note, only in UPDATE SET, takes the table's default.
    let (counts, rows) = run_both().await;
    assert_eq!(counts, "3/3/0/0/0/0");
    assert_eq!(
        rows,
        [
            "1|Ann|warehouse|1.50|by default",
            "2|Bob|warehouse|2.50|by default",
            "3|Cy|warehouse|3.50|by default"
        ]
    );

    // A rep renames record 1; the model renames records 1 and 2 and rescores record 1.
    pg.sql("UPDATE $S.dst_local SET firstname = 'Rep' WHERE id = 1; UPDATE $S.dst_wh SET firstname = 'Rep' WHERE id = 1;
            UPDATE $S.people SET firstname = 'Ann2', score = 9 WHERE id = 1; UPDATE $S.people SET firstname = 'Bob2' WHERE id = 2")
        .await;
    let (counts, rows) = run_both().await;
    // As a second SQL MERGE would: every record is matched now, so UPDATE SET writes note
    // (which the INSERT left out) and record 1's score; neither first name is sent.
    assert_eq!(counts, "3/0/3/0/0/0");
    assert_eq!(
        rows,
        [
            "1|Rep|warehouse|9.00|n1",
            "2|Bob|warehouse|2.50|n2",
            "3|Cy|warehouse|3.50|n3"
        ]
    );
    // Record 2's new first name was remembered, not sent: a rerun finds nothing to do.
    let (counts, _) = run_both().await;
    assert_eq!(counts, "3/0/0/0/3/0");

    // A condition on the source's columns: the local diff takes it; the warehouse diff says
    // what to do instead.
    let conditional = |dst: &str| {
        format!(
            "MERGE INTO wh.{dst} AS t USING (SELECT id, firstname, score, note FROM wh.people) AS s
             ON t.id = s.id
             WHEN MATCHED AND s.score >= 5 THEN UPDATE SET score = s.score, note = s.note
             WHEN NOT MATCHED THEN INSERT (id, firstname, lead_source, score)
                                   VALUES (s.id, s.firstname, 'warehouse', s.score)"
        )
    };
    let refused = engine
        .run_sql(&format!(
            "CREATE OR REPLACE SYNC {remote} OPTIONS (diff 'warehouse') AS {}",
            conditional("dst_wh")
        ))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("diff 'warehouse' does not evaluate WHEN … AND <condition> clauses"),
        "{refused}"
    );
    engine
        .run_sql(&format!(
            "CREATE OR REPLACE SYNC {local} AS {}",
            conditional("dst_local")
        ))
        .await
        .unwrap();
    pg.sql("UPDATE $S.people SET score = 4, note = 'low' WHERE id = 2; UPDATE $S.people SET score = 8, note = 'high' WHERE id = 3;
            INSERT INTO $S.people VALUES (4, 'Di', 0.5, 'n4')")
        .await;
    engine.run_sql(&format!("RUN SYNC {local}")).await.unwrap();
    assert_eq!(last_run(&engine, &local).await, "4/1/1/0/1/0");
    assert_eq!(
        pg.rows("SELECT id, firstname, lead_source, score, note FROM $S.dst_local ORDER BY id")
            .await,
        [
            "1|Rep|warehouse|9.00|n1",
            "2|Bob|warehouse|2.50|n2",
            "3|Cy|warehouse|8.00|high",
            "4|Di|warehouse|0.50|by default"
        ]
    );
    // Records 2 and 4 (whose note its UPDATE would send), which no clause takes, are found
    // again and still not taken.
    engine.run_sql(&format!("RUN SYNC {local}")).await.unwrap();
    assert_eq!(last_run(&engine, &local).await, "4/0/0/0/2/0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warehouse_diff_gives_the_same_results_as_the_local_diff() {
    let Some(pg) = PgSchema::new("sluice_whdiff").await else {
        return;
    };
    pg.sql(
        "CREATE TABLE $S.users (id bigint PRIMARY KEY, email text, score numeric(10,2), plan text, seen timestamptz);
         CREATE TABLE $S.dst_local (id bigint PRIMARY KEY, email text, score numeric(10,2), plan text, seen timestamptz);
         CREATE TABLE $S.dst_wh (LIKE $S.dst_local INCLUDING ALL);
         INSERT INTO $S.users VALUES
           (1, 'A@x', 1.50, 'free', '2026-01-01 10:00:00+00'), (2, 'b@x', 2.50, 'pro', NULL),
           (3, 'c@x', NULL, 'free', '2026-02-01 00:00:00+00'), (4, 'd@x', 4.00, 'banned', NULL),
           (5, 'e@x', 5.00, 'pro', '2026-03-01 12:30:00+00');",
    )
    .await;
    let engine = engine(&pg).await;
    // Sync names are the state tables' names in sluice_state: unique per test run.
    let suffix = &pg.name[pg.name.len() - 8..];
    let (local, remote) = (format!("local_{suffix}"), format!("remote_{suffix}"));
    let body = |dst: &str, fields: &str| {
        format!(
            "MERGE INTO wh.{dst} AS t
             USING (SELECT id, lower(email) AS email, score, plan{fields} FROM wh.users WHERE plan <> 'banned') AS s
             ON t.id = s.id
             WHEN MATCHED THEN UPDATE SET email = s.email, score = s.score, plan = s.plan{updates}
             WHEN NOT MATCHED THEN INSERT (id, email, score, plan{inserts}) VALUES (s.id, s.email, s.score, s.plan{values})
             WHEN NOT MATCHED BY SOURCE THEN DELETE",
            updates = if fields.is_empty() { "" } else { ", seen = s.seen" },
            inserts = if fields.is_empty() { "" } else { ", seen" },
            values = if fields.is_empty() { "" } else { ", s.seen" },
        )
    };
    let define = |fields: &str| {
        format!(
            "CREATE OR REPLACE SYNC {local} OPTIONS (max_delete_pct '100') AS {};
             CREATE OR REPLACE SYNC {remote} OPTIONS (diff 'warehouse', max_delete_pct '100') AS {};",
            body("dst_local", fields),
            body("dst_wh", fields)
        )
    };
    let run_both = || {
        run_both(
            &engine,
            &pg,
            (&local, &remote),
            "id, email, score, plan, seen",
        )
    };

    engine.run_sql(&define("")).await.unwrap();
    let (counts, rows) = run_both().await;
    assert_eq!(counts, "4/4/0/0/0/0");
    assert_eq!(rows.len(), 4);
    assert_eq!(rows[0], "1|a@x|1.50|free|NULL");

    // Two changes, one new row, one row leaving the model.
    pg.sql("UPDATE $S.users SET score = 9 WHERE id = 2; UPDATE $S.users SET email = 'C2@x' WHERE id = 3;
            INSERT INTO $S.users VALUES (6, 'f@x', 6, 'free', NULL); UPDATE $S.users SET plan = 'banned' WHERE id = 5")
        .await;
    let (counts, rows) = run_both().await;
    assert_eq!(counts, "4/1/2/1/1/0");
    assert_eq!(
        rows,
        [
            "1|a@x|1.50|free|NULL",
            "2|b@x|9.00|pro|NULL",
            "3|c2@x|NULL|free|NULL",
            "6|f@x|6.00|free|NULL"
        ]
    );

    // Nothing changed: nothing sent.
    let (counts, _) = run_both().await;
    assert_eq!(counts, "4/0/0/0/4/0");

    // A field mapped later is sent on its own, once; a re-added row comes back.
    pg.sql("UPDATE $S.users SET plan = 'pro' WHERE id = 5")
        .await;
    engine.run_sql(&define(", seen")).await.unwrap();
    let (counts, rows) = run_both().await;
    assert_eq!(counts, "5/1/4/0/0/0");
    assert!(
        rows.contains(&"3|c2@x|NULL|free|2026-02-01 00:00:00+00".to_string()),
        "{rows:?}"
    );
    let (counts, _) = run_both().await;
    assert_eq!(counts, "5/0/0/0/5/0");

    // The state is a table in the source; the diff's SQL is in EXPLAIN.
    assert_eq!(
        pg.rows(&format!(
            "SELECT count(*) FROM sluice_state.\"{remote}\" WHERE NOT pending"
        ))
        .await,
        ["5"]
    );
    // A dry run diffs in the warehouse too, and changes nothing.
    pg.sql("UPDATE $S.users SET score = 10 WHERE id = 1").await;
    let report = format!(
        "{:?}",
        engine
            .run_sql(&format!("EXPLAIN SYNC {remote}"))
            .await
            .unwrap()
    );
    assert!(
        report.contains("rows: 5, inserts: 0, updates: 1, deletes: 0, unchanged: 4"),
        "{report}"
    );
    let (counts, _) = run_both().await;
    assert_eq!(counts, "5/0/1/0/4/0");

    // A record a stopped run sent without an answer (pending) is sent again, then settled.
    pg.sql(&format!(
        "UPDATE sluice_state.\"{remote}\" SET pending = true WHERE key = '6'"
    ))
    .await;
    engine.run_sql(&format!("RUN SYNC {remote}")).await.unwrap();
    assert_eq!(last_run(&engine, &remote).await, "5/0/1/0/4/0");
    assert_eq!(
        pg.rows(&format!(
            "SELECT count(*) FROM sluice_state.\"{remote}\" WHERE pending"
        ))
        .await,
        ["0"]
    );

    // Duplicate keys are refused before anything is sent, as with the local diff.
    let dupes = format!(
        "CREATE OR REPLACE SYNC {remote} OPTIONS (diff 'warehouse') AS INSERT INTO wh.dst_wh
         SELECT 1 AS id, email FROM wh.users"
    );
    engine.run_sql(&dupes).await.unwrap();
    let err = engine
        .run_sql(&format!("RUN SYNC {remote}"))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("duplicate value(s) of the key 'id'"), "{err}");

    // A model that reads anything but this Postgres cannot run there.
    engine
        .run_sql("CREATE TABLE local_model AS SELECT 1 AS id")
        .await
        .unwrap();
    let err = engine
        .run_sql(&format!(
            "CREATE OR REPLACE SYNC {remote} OPTIONS (diff 'warehouse') AS INSERT INTO wh.dst_wh SELECT id FROM local_model;
             RUN SYNC {remote}"
        ))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a Postgres table"), "{err}");

    // A join or an aggregate is refused (the unparser does not write them back faithfully);
    // the same model as a Postgres view syncs.
    let joined = "SELECT u.id, count(*) AS n FROM wh.users u JOIN wh.users v ON v.plan = u.plan GROUP BY u.id";
    pg.sql(
        "CREATE TABLE $S.counts (id bigint PRIMARY KEY, n bigint);
         CREATE VIEW $S.plan_peers AS
           SELECT u.id, count(*) AS n FROM $S.users u JOIN $S.users v ON v.plan = u.plan GROUP BY u.id;",
    )
    .await;
    let err = engine
        .run_sql(&format!(
            "CREATE OR REPLACE SYNC {remote} OPTIONS (diff 'warehouse') AS INSERT INTO wh.counts {joined}"
        ))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("Create a view in Postgres"), "{err}");
    engine
        .run_sql(&format!(
            "CREATE OR REPLACE SYNC {remote} OPTIONS (diff 'warehouse') AS INSERT INTO wh.counts SELECT id, n FROM wh.plan_peers;
             RUN SYNC {remote}"
        ))
        .await
        .unwrap();
    assert_eq!(
        pg.rows("SELECT id, n FROM $S.counts ORDER BY id").await,
        pg.rows("SELECT id, n FROM $S.plan_peers ORDER BY id").await
    );

    pg.sql(&format!("DROP TABLE IF EXISTS sluice_state.\"{remote}\""))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn composite_keys_match_by_every_column() {
    let Some(pg) = PgSchema::new("sluice_ckey").await else {
        return;
    };
    pg.sql(
        "CREATE TABLE $S.members (tenant bigint, id text, role text, note text DEFAULT 'kept', PRIMARY KEY (tenant, id));
         CREATE TABLE $S.mirror (LIKE $S.members INCLUDING ALL);
         CREATE TABLE $S.src (tenant bigint, id text, role text);",
    )
    .await;
    let engine = engine(&pg).await;
    let model = |rows: &str| {
        format!(
            "CREATE OR REPLACE TABLE model AS SELECT * FROM (VALUES {rows}) AS v(tenant, id, role)"
        )
    };
    // The same id in two tenants, and ids that look like the key's own encoding.
    engine
        .run_sql(&model(
            "(1, 'a', 'x'), (2, 'a', 'y'), (1, '3:b,1:c', 'z'), (1, '', 'w')",
        ))
        .await
        .unwrap();
    let upsert = "INSERT INTO wh.members SELECT tenant, id, role FROM model";
    engine.run_sql(upsert).await.unwrap();
    let table = "SELECT tenant, id, role, note FROM $S.members ORDER BY tenant, id";
    assert_eq!(
        pg.rows(table).await,
        ["1||w|kept", "1|3:b,1:c|z|kept", "1|a|x|kept", "2|a|y|kept"]
    );

    // One row of one tenant changes: only it is written.
    pg.sql("UPDATE $S.members SET note = 'mine'").await;
    engine
        .run_sql(&model(
            "(1, 'a', 'x'), (2, 'a', 'admin'), (1, '3:b,1:c', 'z'), (1, '', 'w')",
        ))
        .await
        .unwrap();
    let summary = format!("{:?}", engine.run_sql(upsert).await.unwrap());
    assert!(
        summary.contains("updated: 1") && summary.contains("inserted: 0"),
        "{summary}"
    );
    assert_eq!(
        pg.rows(table).await,
        [
            "1||w|mine",
            "1|3:b,1:c|z|mine",
            "1|a|x|mine",
            "2|a|admin|mine"
        ]
    );

    // Mirror by MERGE … ON both columns: a row leaving the model deletes that row only.
    let mirror =
        "MERGE INTO wh.members AS t USING model AS s ON t.tenant = s.tenant AND t.id = s.id
        WHEN MATCHED THEN UPDATE SET role = s.role
        WHEN NOT MATCHED THEN INSERT (tenant, id, role) VALUES (s.tenant, s.id, s.role)
        WHEN NOT MATCHED BY SOURCE THEN DELETE";
    engine.run_sql(mirror).await.unwrap();
    engine
        .run_sql(&model(
            "(2, 'a', 'admin'), (1, '3:b,1:c', 'z'), (1, '', 'w')",
        ))
        .await
        .unwrap();
    engine.run_sql(mirror).await.unwrap();
    assert_eq!(
        pg.rows("SELECT tenant, id FROM $S.members ORDER BY tenant, id")
            .await,
        ["1|", "1|3:b,1:c", "2|a"],
        "(1, a) left the model; (2, a) stays"
    );
    let rejects = query(&engine, "SELECT count(*) AS n FROM sluice.rejects").await;
    assert!(rejects.contains("| 0 "), "{rejects}");

    // Every column of the key must be mapped; DELETE by a key list needs a one-column key.
    let err = engine
        .run_sql("INSERT INTO wh.members SELECT tenant, role FROM model")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("(tenant, id)") && err.contains("'id' is not mapped"),
        "{err}"
    );
    let err = engine
        .run_sql("DELETE FROM wh.members WHERE id IN (SELECT 'a' AS id)")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("several columns (tenant, id)"), "{err}");

    // The warehouse-side diff with a composite key gives the same table.
    pg.sql("INSERT INTO $S.src VALUES (1, 'a', 'x'), (2, 'a', 'y'), (1, '3:b,1:c', 'z')")
        .await;
    let sync = format!("ckey_{}", &pg.name[pg.name.len() - 8..]);
    engine
        .run_sql(&format!(
            "CREATE SYNC {sync} OPTIONS (diff 'warehouse', max_delete_pct '100') AS
             MERGE INTO wh.mirror AS t USING (SELECT tenant, id, role FROM wh.src) AS s
             ON t.tenant = s.tenant AND t.id = s.id
             WHEN MATCHED THEN UPDATE SET role = s.role
             WHEN NOT MATCHED THEN INSERT (tenant, id, role) VALUES (s.tenant, s.id, s.role)
             WHEN NOT MATCHED BY SOURCE THEN DELETE;
             RUN SYNC {sync}"
        ))
        .await
        .unwrap();
    pg.sql("DELETE FROM $S.src WHERE tenant = 1 AND id = 'a'; UPDATE $S.src SET role = 'q' WHERE tenant = 2")
        .await;
    engine.run_sql(&format!("RUN SYNC {sync}")).await.unwrap();
    assert_eq!(last_run(&engine, &sync).await, "2/0/1/1/1/0");
    assert_eq!(
        pg.rows("SELECT tenant, id, role FROM $S.mirror ORDER BY tenant, id")
            .await,
        ["1|3:b,1:c|z", "2|a|q"]
    );
    pg.sql(&format!("DROP TABLE IF EXISTS sluice_state.\"{sync}\""))
        .await;
}

/// With the diff in the warehouse as with the local diff: a change the destination applied but
/// never answered is sent again even when the model has gone back to the committed values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warehouse_diff_sends_an_unanswered_change_again_even_when_the_model_goes_back() {
    let Some(pg) = PgSchema::new("sluice_whunanswered").await else {
        return;
    };
    pg.sql("CREATE TABLE $S.m (id bigint PRIMARY KEY, plan text)")
        .await;
    let engine = engine(&pg).await;
    let fake = FakeWebhook::start(Script::default()).await;
    let sync = format!("unanswered_{}", &pg.name[pg.name.len() - 8..]);
    let set_model = |rows: &'static str| {
        let pg = &pg;
        async move {
            pg.sql(&format!("TRUNCATE $S.m; INSERT INTO $S.m VALUES {rows}"))
                .await
        }
    };
    super::sync_state::unanswered_change_is_sent_again(
        &engine,
        &fake,
        &sync,
        "wh.m",
        ", diff 'warehouse'",
        set_model,
    )
    .await;
    pg.sql(&format!("DROP TABLE IF EXISTS sluice_state.\"{sync}\""))
        .await;
}

/// A first run streams its batches into one transaction while it reads the model: a duplicate
/// key found after batches were written rolls every one of them back, and once the model is
/// fixed the next run writes everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_first_run_rolls_everything_back_on_a_late_duplicate() {
    let Some(pg) = PgSchema::new("sluice_stream").await else {
        return;
    };
    pg.sql("CREATE TABLE $S.accounts (id bigint PRIMARY KEY, email text NOT NULL)")
        .await;
    let engine = engine(&pg).await;
    engine
        .run_sql(&format!(
            "CREATE CONNECTION app TYPE postgres OPTIONS (url env('SLUICE_TEST_WH_URL'), schema '{}', batch_size '10')",
            pg.name
        ))
        .await
        .unwrap();
    let model = |duplicate: &str| {
        let rows: Vec<String> = (0..200).map(|i| format!("({i}, 'u{i}@x')")).collect();
        format!(
            "CREATE OR REPLACE TABLE model AS SELECT * FROM (VALUES {}{duplicate}) AS v(id, email)",
            rows.join(", ")
        )
    };
    let sync = format!("stream_{}", &pg.name[pg.name.len() - 8..]);
    engine
        .run_sql(&format!(
            "{}; CREATE SYNC {sync} AS INSERT INTO app.accounts SELECT id, email FROM model",
            model(", (3, 'again@x')")
        ))
        .await
        .unwrap();
    let err = super::support::error(&engine, &format!("RUN SYNC {sync}")).await;
    assert!(err.contains("duplicate value(s) of the key 'id'"), "{err}");
    // Batches were written before the duplicate was found (the run made requests), and none
    // of them stayed.
    let requests = query(
        &engine,
        &format!("SELECT requests, status FROM sluice.runs WHERE sync = '{sync}'"),
    )
    .await;
    let written: u64 = requests
        .lines()
        .nth(3)
        .and_then(|l| l.split('|').nth(1))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("{requests}"));
    assert!(written >= 10, "{requests}");
    assert!(requests.contains("failed"), "{requests}");
    assert_eq!(pg.rows("SELECT count(*) FROM $S.accounts").await, ["0"]);

    engine.run_sql(&model("")).await.unwrap();
    engine.run_sql(&format!("RUN SYNC {sync}")).await.unwrap();
    assert_eq!(last_run(&engine, &sync).await, "200/200/0/0/0/0");
    assert_eq!(
        pg.rows("SELECT count(*), sum(id), min(email) FROM $S.accounts")
            .await,
        ["200|19900|u0@x"]
    );
    engine.run_sql(&format!("RUN SYNC {sync}")).await.unwrap();
    assert_eq!(last_run(&engine, &sync).await, "200/0/0/0/200/0");
}

/// Every index of a table: (oid, definition, constraint definition), by index name.
async fn indexes(pg: &PgSchema, table: &str) -> Vec<(String, String)> {
    pg.rows(&format!(
        "SELECT i.indexrelid::bigint, pg_get_indexdef(i.indexrelid) || ' / ' || COALESCE(c.conname || ' ' || pg_get_constraintdef(c.oid), '-')
         FROM pg_index i LEFT JOIN pg_constraint c ON c.conindid = i.indexrelid AND c.conrelid = i.indrelid
         WHERE i.indrelid = '$S.{table}'::regclass ORDER BY i.indexrelid::regclass::text"
    ))
    .await
    .into_iter()
    .map(|line| {
        let (oid, definition) = line.split_once('|').expect("two columns");
        (oid.to_string(), definition.to_string())
    })
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_run_builds_the_key_index_after_the_load_exactly_as_it_was() {
    let Some(pg) = PgSchema::new("sluice_defer").await else {
        return;
    };
    // `plain`: a primary key with a hostile name, INCLUDE and a fill factor, and a second
    // unique index that is not the key. `referenced`: its key is referenced by a foreign key.
    // `filled`: not empty. `refusing`: a check refuses one row in the middle of the load.
    // `unique_only`: no primary key, a unique index on the column a MERGE matches on.
    pg.sql(
        r#"CREATE TABLE $S.plain (id bigint, email text, CONSTRAINT "plain key; ""x""" PRIMARY KEY (id) INCLUDE (email) WITH (fillfactor = 80));
           CREATE UNIQUE INDEX plain_email ON $S.plain (email);
           CREATE TABLE $S.referenced (id bigint PRIMARY KEY, email text);
           CREATE TABLE $S.child (parent bigint REFERENCES $S.referenced (id));
           CREATE TABLE $S.filled (id bigint PRIMARY KEY, email text);
           INSERT INTO $S.filled VALUES (7, 'u7@x');
           CREATE TABLE $S.refusing (id bigint PRIMARY KEY, email text CHECK (email <> 'u150@x'));
           CREATE TABLE $S.unique_only (id bigint NOT NULL, email text);
           CREATE UNIQUE INDEX "unique only; id" ON $S.unique_only (id) WITH (fillfactor = 70);"#,
    )
    .await;
    let tables = ["plain", "referenced", "filled", "refusing", "unique_only"];
    let mut before = vec![];
    for table in tables {
        before.push(indexes(&pg, table).await);
    }
    let engine = engine(&pg).await;
    engine
        .run_sql(&format!(
            "CREATE CONNECTION app TYPE postgres OPTIONS (url env('SLUICE_TEST_WH_URL'), schema '{}', batch_size '10');
             CREATE TABLE model AS SELECT * FROM (VALUES {}) AS v(id, email)",
            pg.name,
            (0..200)
                .map(|i| format!("({i}, 'u{i}@x')"))
                .collect::<Vec<_>>()
                .join(", ")
        ))
        .await
        .unwrap();
    let suffix = &pg.name[pg.name.len() - 8..];
    for table in tables {
        let sync = format!("defer_{table}_{suffix}");
        let statement = match table {
            "unique_only" => "MERGE INTO app.unique_only AS t USING model AS s ON t.id = s.id
                 WHEN MATCHED THEN UPDATE SET email = s.email
                 WHEN NOT MATCHED THEN INSERT (id, email) VALUES (s.id, s.email)"
                .to_string(),
            _ => format!("INSERT INTO app.{table} SELECT id, email FROM model"),
        };
        engine
            .run_sql(&format!("CREATE SYNC {sync} AS {statement}"))
            .await
            .unwrap();
        engine.run_sql(&format!("RUN SYNC {sync}")).await.unwrap();
        // (The row already in `filled` counts as inserted: the first run upserts it.)
        let expected = match table {
            "refusing" => "200/199/0/0/0/1",
            _ => "200/200/0/0/0/0",
        };
        assert_eq!(last_run(&engine, &sync).await, expected, "{table}");
        let loaded = if table == "refusing" { "199" } else { "200" };
        assert_eq!(
            pg.rows(&format!("SELECT count(*) FROM $S.{table}")).await,
            [loaded],
            "{table}"
        );
    }
    for (table, before) in tables.iter().zip(before) {
        let after = indexes(&pg, table).await;
        // Every index is defined as it was, constraints included.
        let definitions =
            |v: &[(String, String)]| v.iter().map(|(_, d)| d.clone()).collect::<Vec<_>>();
        assert_eq!(definitions(&after), definitions(&before), "{table}");
        // Only the key's index of the empty tables was built again (a new index).
        let rebuilt: Vec<bool> = before.iter().zip(&after).map(|(b, a)| b.0 != a.0).collect();
        let expected = match *table {
            "plain" => vec![true, false],
            "refusing" | "unique_only" => vec![true],
            _ => vec![false],
        };
        assert_eq!(rebuilt, expected, "{table}: {before:?} {after:?}");
    }
    // The refused record was not acknowledged, so the snapshot prepared while the index was built
    // (every record acknowledged) was not the one committed: the next run sends it again.
    let sync = format!("defer_refusing_{suffix}");
    engine.run_sql(&format!("RUN SYNC {sync}")).await.unwrap();
    assert_eq!(last_run(&engine, &sync).await, "200/0/0/0/199/1");
    // The key works as a key again: a second run updates in place.
    engine
        .run_sql("CREATE OR REPLACE TABLE model AS SELECT id, CASE WHEN id = 5 THEN 'five@x' ELSE email END AS email FROM model")
        .await
        .unwrap();
    let sync = format!("defer_plain_{suffix}");
    engine.run_sql(&format!("RUN SYNC {sync}")).await.unwrap();
    assert_eq!(last_run(&engine, &sync).await, "200/0/1/0/199/0");
    assert_eq!(
        pg.rows("SELECT count(*), max(email) FILTER (WHERE id = 5) FROM $S.plain")
            .await,
        ["200|five@x"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_only_postgres_sees_as_one_fail_the_first_run_whole() {
    let Some(pg) = PgSchema::new("sluice_defer_dup").await else {
        return;
    };
    // char(3) pads: 'a' and 'a ' are two keys to the model and one to Postgres, which finds
    // that only when it builds the index after the load.
    pg.sql("CREATE TABLE $S.accounts (id char(3) PRIMARY KEY, email text)")
        .await;
    let before = indexes(&pg, "accounts").await;
    let engine = engine(&pg).await;
    let sync = format!("dup_{}", &pg.name[pg.name.len() - 8..]);
    engine
        .run_sql(&format!(
            "CREATE CONNECTION app TYPE postgres OPTIONS (url env('SLUICE_TEST_WH_URL'), schema '{}', batch_size '2');
             CREATE TABLE model AS SELECT * FROM (VALUES ('a', 'x@x'), ('b', 'y@x'), ('a ', 'z@x'), ('c', 'w@x')) AS v(id, email);
             CREATE SYNC {sync} AS INSERT INTO app.accounts SELECT id, email FROM model",
            pg.name
        ))
        .await
        .unwrap();
    let err = super::support::error(&engine, &format!("RUN SYNC {sync}")).await;
    assert!(
        err.contains("building the index")
            && err.contains("nothing was written")
            && err.contains("is duplicated")
            && err.contains("one key to Postgres"),
        "{err}"
    );
    assert_eq!(pg.rows("SELECT count(*) FROM $S.accounts").await, ["0"]);
    assert_eq!(
        indexes(&pg, "accounts").await,
        before,
        "the index is as it was"
    );
    // Every snapshot file left is one the committed state names (the snapshot prepared while
    // the index was built was rebuilt from what was acknowledged: nothing).
    let files = super::support::files_under(std::path::Path::new(engine.state_location()));
    let manifest = files
        .iter()
        .find(|p| p.ends_with("manifest.json"))
        .expect("a first run commits its state");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(manifest).unwrap()).unwrap();
    let named: Vec<&str> = std::iter::once(&manifest["snapshot"])
        .chain(manifest["hash_files"].as_array().unwrap())
        .map(|v| v.as_str().unwrap())
        .collect();
    for file in &files {
        let name = file.file_name().unwrap().to_string_lossy();
        if name.starts_with("snapshot-") {
            assert!(
                named.contains(&name.as_ref()),
                "{name} is not named by {manifest}"
            );
        }
    }
    // With the model fixed, the next run loads it.
    engine
        .run_sql(&format!(
            "CREATE OR REPLACE TABLE model AS SELECT * FROM model WHERE id <> 'a '; RUN SYNC {sync}"
        ))
        .await
        .unwrap();
    assert_eq!(
        pg.rows("SELECT string_agg(trim(id), ',' ORDER BY id) FROM $S.accounts")
            .await,
        ["a,b,c"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_run_keeps_the_key_index_when_another_session_holds_the_table() {
    let Some(pg) = PgSchema::new("sluice_defer_lock").await else {
        return;
    };
    pg.sql("CREATE TABLE $S.accounts (id bigint PRIMARY KEY, email text)")
        .await;
    let before = indexes(&pg, "accounts").await;
    // A reader in an open transaction: the load may go on beside it, dropping the index may not.
    pg.sql("BEGIN; SELECT count(*) FROM $S.accounts").await;
    let engine = engine(&pg).await;
    let sync = format!("lock_{}", &pg.name[pg.name.len() - 8..]);
    engine
        .run_sql(&format!(
            "CREATE TABLE model AS SELECT * FROM (VALUES (1, 'a@x'), (2, 'b@x')) AS v(id, email);
             CREATE SYNC {sync} AS INSERT INTO wh.accounts SELECT id, email FROM model"
        ))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    engine.run_sql(&format!("RUN SYNC {sync}")).await.unwrap();
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(2),
        "the drop waited for the lock"
    );
    pg.sql("COMMIT").await;
    assert_eq!(last_run(&engine, &sync).await, "2/2/0/0/0/0");
    assert_eq!(pg.rows("SELECT count(*) FROM $S.accounts").await, ["2"]);
    assert_eq!(indexes(&pg, "accounts").await, before, "the index was kept");
}

/// Strings that broke the unparser's quoting (issue 17): quotes after backslashes, doubled
/// quotes, a COPY-ending payload, dollar quotes, comments, control and non-ASCII characters.
const HOSTILE: &[&str] = &[
    "x\\'' OR true))) TO STDOUT (FORMAT binary) --",
    "x\\' OR true))) TO PROGRAM 'touch /tmp/sluice_pwned' --",
    "a''b",
    "a''''b",
    "a'b",
    "'",
    "\\",
    "\\\\'",
    "$$ OR true $$",
    "'; DROP TABLE users; --",
    "/* */",
    "a\nb\tc",
    "é😀\u{202e}",
    "\"",
    "E'x'",
    "%",
    "_",
];

/// Random strings over an alphabet of SQL's special characters, from a fixed seed.
fn random_strings(n: usize) -> Vec<String> {
    use rand::{Rng, SeedableRng};
    const ALPHABET: &[char] = &[
        '\'', '\\', '"', '$', '-', '/', '*', ';', '(', ')', ' ', '\n', 'E', 'a', 'é', '😀', '%',
        '_', '\0',
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    (0..n)
        .map(|_| {
            let len = rng.random_range(0..8);
            (0..len)
                .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())])
                .collect()
        })
        .collect()
}

/// A string as a DataFusion SQL literal (sluice's own parser: quotes doubled, backslashes plain).
fn df_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Issue 17, critical 1: a string pushed down to Postgres matches exactly the rows that hold it,
/// whatever it holds (a property over hostile and random strings, and strings never stored).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_down_strings_match_exactly_the_rows_that_hold_them() {
    let Some(pg) = PgSchema::new("sluice_inject").await else {
        return;
    };
    pg.sql("CREATE TABLE $S.names (id int PRIMARY KEY, name text)")
        .await;
    let mut stored: Vec<String> = HOSTILE.iter().map(|s| s.to_string()).collect();
    stored.extend(
        random_strings(150)
            .into_iter()
            .filter(|s| !s.contains('\0')),
    );
    let insert = format!("INSERT INTO {}.names VALUES ($1, $2)", pg.quoted());
    for (id, name) in stored.iter().enumerate() {
        pg.client
            .execute(&insert, &[&(id as i32), name])
            .await
            .unwrap();
    }
    let engine = engine(&pg).await;
    let ids = |text: String| -> Vec<i32> {
        let mut ids: Vec<i32> = text
            .lines()
            .filter_map(|l| l.trim_matches(|c| c == '|' || c == ' ').parse().ok())
            .collect();
        ids.sort();
        ids
    };
    let expected = |pred: &dyn Fn(&str) -> bool| -> Vec<i32> {
        (0..stored.len() as i32)
            .filter(|&i| pred(&stored[i as usize]))
            .collect()
    };
    let mut probes: Vec<String> = stored.clone();
    probes.extend(random_strings(60));
    probes.push("x\\".into());
    probes.push("a'''b".into());
    for probe in &probes {
        let lit = df_literal(probe);
        let eq = query(
            &engine,
            &format!("SELECT id FROM wh.names WHERE name = {lit}"),
        )
        .await;
        assert_eq!(ids(eq), expected(&|s| s == probe), "name = {probe:?}");
        let ne = query(
            &engine,
            &format!("SELECT id FROM wh.names WHERE name <> {lit} AND id < 20"),
        )
        .await;
        assert_eq!(
            ids(ne),
            expected(&|s| s != probe)
                .into_iter()
                .filter(|&i| i < 20)
                .collect::<Vec<_>>(),
            "name <> {probe:?}"
        );
    }
    let list = format!("{}, {}", df_literal(HOSTILE[2]), df_literal(HOSTILE[0]));
    let inlist = query(
        &engine,
        &format!("SELECT id FROM wh.names WHERE name IN ({list})"),
    )
    .await;
    assert_eq!(ids(inlist), vec![0, 2]);

    // The equality really reaches Postgres, quoted by sluice.
    let explain = query(
        &engine,
        &format!(
            "EXPLAIN SELECT id FROM wh.names WHERE name = {}",
            df_literal(HOSTILE[0])
        ),
    )
    .await;
    assert!(
        explain
            .contains(r#"WHERE (("name" = E'x\\'''' OR true))) TO STDOUT (FORMAT binary) --'))"#),
        "{explain}"
    );
    // A string Postgres cannot hold is not pushed: DataFusion compares it (and finds nothing).
    let explain = query(
        &engine,
        "EXPLAIN SELECT id FROM wh.names WHERE name = 'a\0'",
    )
    .await;
    assert!(!explain.contains("WHERE"), "{explain}");
    assert!(!std::path::Path::new("/tmp/sluice_pwned").exists());
}

/// Issue 17, critical 1: the warehouse-side diff's model SQL carries its literals exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warehouse_diff_model_keeps_hostile_literals_exact() {
    let Some(pg) = PgSchema::new("sluice_inject_wh").await else {
        return;
    };
    pg.sql(
        "CREATE TABLE $S.names (id int PRIMARY KEY, name text);
         CREATE TABLE $S.dst (id int PRIMARY KEY, name text, tag text);",
    )
    .await;
    let insert = format!("INSERT INTO {}.names VALUES ($1, $2)", pg.quoted());
    for (id, name) in HOSTILE.iter().enumerate() {
        pg.client
            .execute(&insert, &[&(id as i32), name])
            .await
            .unwrap();
    }
    let engine = engine(&pg).await;
    let sync = format!("inject_{}", &pg.name[pg.name.len() - 8..]);
    // The model selects two hostile strings by value and writes another as a constant.
    engine
        .run_sql(&format!(
            "CREATE SYNC {sync} OPTIONS (diff 'warehouse') AS INSERT INTO wh.dst
             SELECT id, name, {tag} AS tag FROM wh.names WHERE name = {a} OR name = {b};
             RUN SYNC {sync}",
            tag = df_literal(HOSTILE[1]),
            a = df_literal(HOSTILE[0]),
            b = df_literal(HOSTILE[3]),
        ))
        .await
        .unwrap();
    let rows = pg
        .client
        .query(
            &format!("SELECT id, name, tag FROM {}.dst ORDER BY id", pg.quoted()),
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(i32, String, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        got,
        vec![
            (0, HOSTILE[0].to_string(), HOSTILE[1].to_string()),
            (3, HOSTILE[3].to_string(), HOSTILE[1].to_string()),
        ]
    );
    pg.sql(&format!("DROP TABLE IF EXISTS sluice_state.\"{sync}\""))
        .await;
}

/// Issue 17, critical 2: a write cancelled at any point (Ctrl-C, a dropped future) leaves no
/// open transaction on a pooled connection: the next write on a one-connection pool does not
/// commit the cancelled rows, and the key's index dropped by the cancelled first run is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_write_leaves_no_open_transaction_in_the_pool() {
    let Some(pg) = PgSchema::new("sluice_cancel").await else {
        return;
    };
    pg.sql(
        "CREATE TABLE $S.src AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 200000) g;
         CREATE TABLE $S.dst (id int PRIMARY KEY, v text);
         CREATE TABLE $S.other (id int PRIMARY KEY);",
    )
    .await;
    let engine = engine(&pg).await;
    let schema = pg.name.replace('\'', "''");
    engine
        .run_sql(&format!(
            "CREATE CONNECTION one TYPE postgres OPTIONS (url env('SLUICE_TEST_WH_URL'), schema '{schema}', pool_size '1');
             CREATE SYNC copy_all AS INSERT INTO one.dst SELECT id, v FROM wh.src;"
        ))
        .await
        .unwrap();
    let key_index = indexes(&pg, "dst").await;
    assert_eq!(key_index.len(), 1);
    let mut cancelled = 0;
    for (n, ms) in [1u64, 10, 30, 60, 120, 250, 500, 900]
        .into_iter()
        .enumerate()
    {
        let run = engine.run_sql("RUN SYNC copy_all");
        match tokio::time::timeout(std::time::Duration::from_millis(ms), run).await {
            Err(_) => cancelled += 1,
            Ok(_) => {
                // Finished before the cancel: start over.
                pg.sql("TRUNCATE $S.dst").await;
                engine.run_sql("RESET SYNC copy_all").await.unwrap();
                continue;
            }
        }
        // (The cancelled run's tasks stop asynchronously.)
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        // A cancel that lands after a commit of the destination leaves those rows, committed by
        // the run itself and sent again next run, not lost: all of them after a first run's one
        // transaction (cancelled while the run commits its own state); after a run that follows
        // a cancelled one (its keys are then in the state as "maybe sent", so it does not
        // stream), each whole transaction of batch_size (100000) rows already committed.
        let before = pg.rows("SELECT count(*) FROM $S.dst").await;
        // Another write on the one pooled connection, committed on its own.
        engine
            .run_sql(&format!("INSERT INTO one.other SELECT {n} AS id"))
            .await
            .unwrap();
        let after = pg.rows("SELECT count(*) FROM $S.dst").await;
        assert_eq!(
            before, after,
            "cancelled after {ms} ms: the next write committed the cancelled run's rows"
        );
        assert!(
            ["0", "100000", "200000"].contains(&after[0].as_str()),
            "cancelled after {ms} ms: {after:?} rows committed, not whole transactions"
        );
        assert_eq!(
            indexes(&pg, "dst").await.len(),
            1,
            "cancelled after {ms} ms: the key's index is gone"
        );
        // No session keeps a lock on the schema's tables (an open transaction of the cancelled
        // run would, for good; other tests' sessions touch other schemas). The cancelled run's
        // source scan ends asynchronously, as its connection drains the COPY: wait for it.
        let locks =
            "SELECT coalesce(string_agg(c.relname || ' ' || l.mode, ', '), '') FROM pg_locks l
                     JOIN pg_class c ON c.oid = l.relation
                     WHERE c.relnamespace = '$S'::regnamespace AND l.pid <> pg_backend_pid()";
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut held = pg.rows(locks).await;
        while held != [""] && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            held = pg.rows(locks).await;
        }
        assert_eq!(
            held,
            [""],
            "cancelled after {ms} ms: sessions still hold locks 10 s later"
        );
        if after != ["0"] {
            // Start the next round from an empty table, as after a run that finished.
            pg.sql("TRUNCATE $S.dst").await;
            engine.run_sql("RESET SYNC copy_all").await.unwrap();
        }
    }
    assert!(cancelled >= 3, "only {cancelled} runs were cancelled");
    // The sync still runs whole afterwards.
    engine.run_sql("RUN SYNC copy_all").await.unwrap();
    assert_eq!(pg.rows("SELECT count(*) FROM $S.dst").await, ["200000"]);
    assert_eq!(indexes(&pg, "dst").await[0].1, key_index[0].1);
}

/// Issue 17: record values never reach the logs, even at debug level (tokio-postgres logs the
/// parameters of every statement at debug; the warehouse-side diff binds the records' keys).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_values_stay_out_of_debug_logs() {
    let Some(pg) = PgSchema::new("sluice_logs").await else {
        return;
    };
    pg.sql(
        "CREATE TABLE $S.src (k text PRIMARY KEY, v text);
         INSERT INTO $S.src VALUES ('key_PRIVATE_VALUE', 'v_PRIVATE_VALUE');
         CREATE TABLE $S.dst (k text PRIMARY KEY, v text);",
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let sync = format!("logs_{}", &pg.name[pg.name.len() - 8..]);
    std::fs::write(
        dir.path().join("s.sql"),
        format!(
            "CREATE CONNECTION wh TYPE postgres OPTIONS (url env('SLUICE_TEST_WH_URL'), schema '{}');
CREATE SYNC {sync} OPTIONS (diff 'warehouse') AS INSERT INTO wh.dst SELECT k, v FROM wh.src;
RUN SYNC {sync};
",
            pg.name
        ),
    )
    .unwrap();
    let output = super::support::sluice(dir.path())
        .env("SLUICE_TEST_WH_URL", URL)
        .env("SLUICE_LOG", "debug")
        .args(["run", "s.sql"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("DEBUG"), "debug logs are on:\n{stderr}");
    assert!(
        !stderr.contains("PRIVATE_VALUE"),
        "a record value was logged:\n{stderr}"
    );
    assert_eq!(pg.rows("SELECT k FROM $S.dst").await, ["key_PRIVATE_VALUE"]);
    pg.sql(&format!("DROP TABLE IF EXISTS sluice_state.\"{sync}\""))
        .await;
}

/// Issue 17: no Postgres wait is unbounded. A statement past statement_timeout is cancelled by
/// Postgres; a statement that finds every pooled connection busy past pool_timeout fails with a
/// message that names the options.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_and_pool_waits_end_at_their_timeouts() {
    let Some(pg) = PgSchema::new("sluice_timeouts").await else {
        return;
    };
    pg.sql("CREATE VIEW $S.slow AS SELECT pg_sleep(1.5)::text AS x")
        .await;
    let engine = super::support::engine();
    // SAFETY: set before any thread reads it; every test sets the same value.
    unsafe { std::env::set_var("SLUICE_TEST_WH_URL", URL) };
    let schema = pg.name.replace('\'', "''");
    engine
        .run_sql(&format!(
            "CREATE CONNECTION quick TYPE postgres OPTIONS (url env('SLUICE_TEST_WH_URL'), schema '{schema}', statement_timeout '300ms');
             CREATE CONNECTION one TYPE postgres OPTIONS (url env('SLUICE_TEST_WH_URL'), schema '{schema}', pool_size '1', pool_timeout '300ms');"
        ))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let err = super::support::error(&engine, "SELECT x FROM quick.slow").await;
    assert!(err.contains("statement timeout"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_millis(1_400));

    // The one connection of `one` is busy reading the slow view; a second statement waits for it
    // at most pool_timeout.
    let (slow, waiting) = tokio::join!(engine.run_sql("SELECT x FROM one.slow"), async {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let started = std::time::Instant::now();
        let result = engine.run_sql("SELECT x FROM one.slow").await;
        (result, started.elapsed())
    });
    slow.unwrap();
    let (result, waited) = waiting;
    let err = result.unwrap_err().to_string();
    assert!(
        err.contains("pool_timeout") && err.contains("pool_size"),
        "{err}"
    );
    assert!(
        waited < std::time::Duration::from_millis(1_000),
        "{waited:?}"
    );
}

/// Issue 19: the change log covers a streaming first run into Postgres and a warehouse diff, and
/// copies into a warehouse table with plain SQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_change_log_covers_both_diffs_and_copies_into_a_table() {
    let Some(pg) = PgSchema::new("sluice_changes").await else {
        return;
    };
    pg.sql(
        "CREATE TABLE $S.src (id bigint PRIMARY KEY, email text);
         INSERT INTO $S.src SELECT i, 'u' || i || '@x.io' FROM generate_series(1, 1000) AS i;
         CREATE TABLE $S.dst (id bigint PRIMARY KEY, email text);
         CREATE TABLE $S.dst_wh (LIKE $S.dst INCLUDING ALL);
         CREATE TABLE $S.audit (sync text, run_id text, target text, key text, operation text,
           fields text, record_id text, outcome text, error_code text, error_message text,
           sent_at timestamptz);",
    )
    .await;
    let engine = engine(&pg).await;
    let suffix = &pg.name[pg.name.len() - 8..];
    let (local, remote) = (format!("local_{suffix}"), format!("remote_{suffix}"));
    engine
        .run_sql(&format!(
            "CREATE SYNC {local} AS INSERT INTO wh.dst SELECT id, email FROM wh.src;
             CREATE SYNC {remote} OPTIONS (diff 'warehouse') AS INSERT INTO wh.dst_wh SELECT id, email FROM wh.src;"
        ))
        .await
        .unwrap();
    let run = async || {
        engine
            .run_sql(&format!("RUN SYNC {local}; RUN SYNC {remote}"))
            .await
            .unwrap();
    };
    run().await;
    pg.sql("UPDATE $S.src SET email = 'changed' WHERE id <= 10")
        .await;
    run().await;
    let text = query(
        &engine,
        "SELECT sync, operation, outcome, count(*) AS n FROM sluice.changes
         GROUP BY sync, operation, outcome ORDER BY sync, operation",
    )
    .await;
    let rows: String = text.chars().filter(|c| *c != ' ').collect();
    for sync in [&local, &remote] {
        assert!(
            rows.contains(&format!("|{sync}|insert|accepted|1000|"))
                && rows.contains(&format!("|{sync}|update|accepted|10|")),
            "{text}"
        );
    }
    // Copied into the warehouse with plain SQL.
    let copied = write(
        &engine,
        &format!(
            "INSERT INTO wh.audit SELECT * FROM sluice.changes WHERE sync IN ('{local}', '{remote}')"
        ),
    )
    .await;
    assert_eq!(copied.rows_written, 2020);
    assert_eq!(
        pg.rows("SELECT operation, count(*) FROM $S.audit GROUP BY 1 ORDER BY 1")
            .await,
        ["insert|2000", "update|20"]
    );
    assert_eq!(
        pg.rows("SELECT DISTINCT fields FROM $S.audit WHERE key = '3' AND operation = 'update'")
            .await,
        [r#"{"id":3,"email":"changed"}"#]
    );
}
