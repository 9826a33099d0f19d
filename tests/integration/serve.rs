//! Issue 20: `sluice serve`, a real process: scheduled syncs, the HTTP API, a clean stop.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::fakes::webhook::{FakeWebhook, Script};

const TOKEN: &str = "tok-serve-7f3a";

const PROJECT: &str = "
CREATE CONNECTION hooks TYPE webhook OPTIONS (url env('SLUICE_TEST_SERVE_URL'), key 'id');
CREATE TABLE people AS SELECT * FROM (VALUES (1, 'a@x.io'), (2, 'b@x.io')) AS v(id, email);
CREATE SYNC every_second SCHEDULE EVERY '1 second'
  AS INSERT INTO hooks.people SELECT id, email FROM people;
CREATE SYNC on_demand AS INSERT INTO hooks.others SELECT id, email FROM people;
-- Not run by serve: syncs run on their schedules or through the API.
RUN SYNC on_demand;
";

/// A `sluice serve` process and its API's base URL; killed if the test fails.
struct Serve {
    child: Child,
    base: String,
    stderr: std::thread::JoinHandle<String>,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

fn start(dir: &std::path::Path, fake: &FakeWebhook, token: Option<&str>) -> Serve {
    start_with(dir, fake, token, &[], &[])
}

fn start_with(
    dir: &std::path::Path,
    fake: &FakeWebhook,
    token: Option<&str>,
    args: &[&str],
    envs: &[(&str, &str)],
) -> Serve {
    let mut cmd = super::support::sluice(dir);
    cmd.args([
        "serve",
        ".",
        "--listen",
        "127.0.0.1:0",
        "--shutdown-grace",
        "5s",
    ])
    .args(args)
    .envs(envs.iter().copied())
    .env("SLUICE_TEST_SERVE_URL", &fake.url)
    .env("SLUICE_LOG", "info")
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    match token {
        Some(t) => cmd.env("SLUICE_API_TOKEN", t),
        None => cmd.env_remove("SLUICE_API_TOKEN"),
    };
    let mut child = cmd.spawn().expect("sluice serve");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let stderr = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(stderr).lines() {
            text.push_str(&line.unwrap_or_default());
            text.push('\n');
        }
        text
    });
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let Some(base) = line.trim().strip_prefix("sluice serve: listening on ") else {
        let _ = child.kill();
        panic!("first line: {line:?}; stderr:\n{}", stderr.join().unwrap());
    };
    let base = base.to_string();
    Serve {
        child,
        base,
        stderr,
    }
}

/// Sends SIGTERM and waits for the process to end; answers its stderr.
fn stop(serve: &mut Serve) -> String {
    // SAFETY: a signal to the child this test started.
    unsafe { libc::kill(serve.child.id() as i32, libc::SIGTERM) };
    let until = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = serve.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < until, "sluice serve did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = std::mem::replace(&mut serve.stderr, std::thread::spawn(String::new))
        .join()
        .unwrap();
    assert!(status.success(), "{status:?}\n{stderr}");
    stderr
}

async fn get(serve: &Serve, path: &str) -> (u16, Value) {
    let r = reqwest::get(format!("{}{path}", serve.base)).await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    assert!(!text.contains(TOKEN), "{path}: {text}");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn post(serve: &Serve, path: &str, token: Option<&str>) -> (u16, Value) {
    let mut request = reqwest::Client::new().post(format!("{}{path}", serve.base));
    if let Some(t) = token {
        request = request.bearer_auth(t);
    }
    let r = request.send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    assert!(!text.contains(TOKEN), "{path}: {text}");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Polls `check` every 100 ms until it holds, for at most `within`.
async fn eventually<F: AsyncFn() -> bool>(within: Duration, what: &str, check: F) {
    let until = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < until, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_runs_schedules_and_answers_the_api_then_stops_cleanly() {
    let fake = FakeWebhook::start(Script::default()).await;
    let dir = super::support::scratch();
    std::fs::write(dir.path().join("project.sql"), PROJECT).unwrap();
    let mut serve = start(dir.path(), &fake, Some(TOKEN));

    assert_eq!(get(&serve, "/healthz").await.0, 200);
    assert_eq!(get(&serve, "/readyz").await.0, 200);

    // The scheduled sync runs every second; only its first run sends anything.
    eventually(
        Duration::from_secs(15),
        "three scheduled runs",
        async || {
            let (_, runs) = get(&serve, "/api/syncs/every_second/runs").await;
            runs["runs"]
                .as_array()
                .is_some_and(|r| r.iter().filter(|r| r["status"] == "succeeded").count() >= 3)
        },
    )
    .await;
    let (_, runs) = get(&serve, "/api/syncs/every_second/runs").await;
    let inserted: Vec<u64> = runs["runs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["status"] == "succeeded")
        .map(|r| r["inserted"].as_u64().unwrap())
        .collect();
    assert_eq!(inserted.iter().sum::<u64>(), 2, "{runs}");
    // The RUN SYNC in the file was not run.
    assert_eq!(fake.observed(|o| o.records.len()), 2);

    let (status, syncs) = get(&serve, "/api/syncs").await;
    assert_eq!(status, 200);
    let list = syncs["syncs"].as_array().unwrap();
    let every = list.iter().find(|s| s["name"] == "every_second").unwrap();
    assert_eq!(every["schedule"], "EVERY '1 second'");
    assert!(every["next_run"].is_string(), "{syncs}");
    let manual = list.iter().find(|s| s["name"] == "on_demand").unwrap();
    assert!(
        manual["schedule"].is_null() && manual["next_run"].is_null(),
        "{syncs}"
    );

    // Running a sync now needs the token.
    assert_eq!(post(&serve, "/api/syncs/on_demand/runs", None).await.0, 401);
    assert_eq!(
        post(&serve, "/api/syncs/on_demand/runs", Some("wrong"))
            .await
            .0,
        401
    );
    let (status, started) = post(&serve, "/api/syncs/on_demand/runs", Some(TOKEN)).await;
    assert_eq!(status, 202, "{started}");
    let id = started["run_id"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(10), "the requested run", async || {
        let (status, run) = get(&serve, &format!("/api/runs/{id}")).await;
        status == 200 && run["status"] == "succeeded"
    })
    .await;
    let (_, run) = get(&serve, &format!("/api/runs/{id}")).await;
    assert_eq!(
        (run["sync"].as_str(), run["inserted"].as_u64()),
        (Some("on_demand"), Some(2))
    );
    assert_eq!(fake.observed(|o| o.records.len()), 4);
    // ?wait=true answers the finished run.
    let (status, run) = post(&serve, "/api/syncs/on_demand/runs?wait=true", Some(TOKEN)).await;
    assert_eq!(status, 200, "{run}");
    assert_eq!(
        (run["status"].as_str(), run["inserted"].as_u64()),
        (Some("succeeded"), Some(0))
    );
    let (status, rejects) = get(&serve, "/api/syncs/on_demand/rejects").await;
    assert_eq!(
        (status, rejects["rejects"].as_array().map(Vec::len)),
        (200, Some(0))
    );

    // Unknown syncs, runs and routes.
    let (status, body) = get(&serve, "/api/syncs/nope/runs").await;
    assert_eq!(status, 404);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("every_second, on_demand"),
        "{body}"
    );
    assert_eq!(
        post(&serve, "/api/syncs/nope/runs", Some(TOKEN)).await.0,
        404
    );
    assert_eq!(get(&serve, "/api/runs/0000").await.0, 404);
    assert_eq!(get(&serve, "/nope").await.0, 404);

    // SIGTERM: the process stops, cleanly.
    let stderr = stop(&mut serve);
    assert!(stderr.contains("Stopping"), "{stderr}");
    assert!(!stderr.contains(TOKEN), "{stderr}");
    // No run was left recorded as running.
    let text = std::fs::read_dir(dir.path().join(".sluice/runs/every_second"))
        .unwrap()
        .map(|f| std::fs::read_to_string(f.unwrap().path()).unwrap())
        .collect::<String>();
    assert!(!text.contains("\"running\""), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_without_a_token_is_read_only_and_a_bad_schedule_stops_the_load() {
    let fake = FakeWebhook::start(Script::default()).await;
    let dir = super::support::scratch();
    std::fs::write(dir.path().join("project.sql"), PROJECT).unwrap();
    let serve = start(dir.path(), &fake, None);
    let (status, body) = post(&serve, "/api/syncs/on_demand/runs", Some(TOKEN)).await;
    assert_eq!(status, 403);
    assert!(
        body["error"].as_str().unwrap().contains("SLUICE_API_TOKEN"),
        "{body}"
    );
    drop(serve);

    // Without a token, only a loopback address.
    let out = super::support::sluice(dir.path())
        .args(["serve", ".", "--listen", "0.0.0.0:0"])
        .env_remove("SLUICE_API_TOKEN")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("loopback"), "{stderr}");

    // A schedule that does not parse: the file and line, and nothing served.
    std::fs::write(
        dir.path().join("project.sql"),
        "CREATE TABLE t AS VALUES (1);\n\nCREATE SYNC s SCHEDULE CRON '61 * * * *' AS INSERT INTO hooks.t SELECT column1 AS id FROM t;",
    )
    .unwrap();
    let out = super::support::sluice(dir.path())
        .args(["serve", ".", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("project.sql:3:") && stderr.contains("not a cron expression"),
        "{stderr}"
    );
}

/// Records the fake received for `object`.
fn sent_to(fake: &FakeWebhook, object: &str) -> usize {
    fake.observed(|o| {
        o.requests
            .iter()
            .filter(|r| r.object.as_deref() == Some(object) && r.status < 300)
            .map(|r| r.records)
            .sum()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_watches_postgres_runs_sequences_reloads_and_reports_metrics() {
    let Some(pg) = super::postgres::PgSchema::new("serve").await else {
        return;
    };
    pg.sql("CREATE TABLE $S.accounts (id int PRIMARY KEY, email text); INSERT INTO $S.accounts VALUES (1, 'a@x.io'), (2, 'b@x.io')")
        .await;
    let fake = FakeWebhook::start(Script::default()).await;
    let dir = super::support::scratch();
    let schema = &pg.name;
    let project = format!(
        "CREATE CONNECTION wh TYPE postgres OPTIONS (url 'postgres://postgres:pg-s3cret-pw@127.0.0.1:5432/test');
CREATE CONNECTION hooks TYPE webhook OPTIONS (url env('SLUICE_TEST_SERVE_URL'), key 'id');
CREATE SYNC live SCHEDULE ON CHANGE EVERY '1 second'
  AS INSERT INTO hooks.live SELECT id, email FROM wh.{schema}.accounts;
CREATE SYNC notified SCHEDULE ON NOTIFY '{schema}'
  AS INSERT INTO hooks.notified SELECT id, email FROM wh.{schema}.accounts;
CREATE SYNC first SCHEDULE EVERY '2 seconds'
  AS INSERT INTO hooks.first SELECT id, email FROM wh.{schema}.accounts;
CREATE SYNC second SCHEDULE AFTER first
  AS INSERT INTO hooks.second SELECT id, email FROM wh.{schema}.accounts;
"
    );
    std::fs::write(dir.path().join("project.sql"), &project).unwrap();
    let mut serve = start_with(
        dir.path(),
        &fake,
        Some(TOKEN),
        &["--log-format", "json"],
        &[],
    );

    // Each runs once: ON CHANGE and ON NOTIFY at start, first on its tick, second after it.
    eventually(
        Duration::from_secs(20),
        "every sync's first run",
        async || {
            ["live", "notified", "first", "second"]
                .iter()
                .all(|o| sent_to(&fake, o) == 2)
        },
    )
    .await;
    let (_, syncs) = get(&serve, "/api/syncs").await;
    let second = syncs["syncs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "second")
        .unwrap()
        .clone();
    assert_eq!(second["schedule"], "AFTER first", "{syncs}");

    // A change: ON CHANGE sends it; ON NOTIFY waits for a NOTIFY.
    pg.sql("UPDATE $S.accounts SET email = 'c@x.io' WHERE id = 1")
        .await;
    eventually(
        Duration::from_secs(20),
        "the change, by ON CHANGE",
        async || sent_to(&fake, "live") == 3,
    )
    .await;
    assert_eq!(sent_to(&fake, "notified"), 2);
    pg.sql(&format!("SELECT pg_notify('{schema}', 'accounts')"))
        .await;
    eventually(
        Duration::from_secs(10),
        "the change, by ON NOTIFY",
        async || sent_to(&fake, "notified") == 3,
    )
    .await;

    // Metrics: per sync and status, records, durations; no secret.
    let metrics = reqwest::get(format!("{}/metrics", serve.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for expected in [
        "sluice_runs_total{sync=\"first\",status=\"succeeded\"}",
        "sluice_records_total{sync=\"live\",operation=\"updated\"} 1",
        "sluice_run_duration_seconds_bucket{sync=\"second\"",
        "sluice_last_success_timestamp_seconds{sync=\"notified\"}",
        "sluice_seconds_since_last_success{sync=\"first\"}",
        "sluice_next_run_timestamp_seconds{sync=\"first\"}",
    ] {
        assert!(metrics.contains(expected), "{expected} not in\n{metrics}");
    }
    assert!(!metrics.contains("pg-s3cret-pw"), "{metrics}");

    // A broken new file: reported, and the rest keeps running.
    std::fs::write(
        dir.path().join("zz_more.sql"),
        format!("\nCREATE SYNC extra SCHEDULE EVERY '1 second' AS INSERT INTO hooks.extra SELECT id, nope FROM wh.{schema}.accounts;"),
    )
    .unwrap();
    eventually(Duration::from_secs(15), "the reload error", async || {
        let (_, ready) = get(&serve, "/readyz").await;
        ready["reload_errors"].as_array().is_some_and(|e| {
            e.iter()
                .any(|e| e.as_str().unwrap_or("").contains("zz_more.sql:2:"))
        })
    })
    .await;
    let (status, ready) = get(&serve, "/readyz").await;
    assert_eq!(status, 200, "{ready}");
    assert!(ready.to_string().contains("nope"), "{ready}");
    pg.sql("UPDATE $S.accounts SET email = 'd@x.io' WHERE id = 2")
        .await;
    eventually(
        Duration::from_secs(20),
        "a change after the failed reload",
        async || sent_to(&fake, "live") == 4,
    )
    .await;
    // Fixed: the new sync runs.
    std::fs::write(
        dir.path().join("zz_more.sql"),
        format!("CREATE SYNC extra SCHEDULE EVERY '1 second' AS INSERT INTO hooks.extra SELECT id, email FROM wh.{schema}.accounts;"),
    )
    .unwrap();
    eventually(
        Duration::from_secs(20),
        "the new sync, after a reload",
        async || sent_to(&fake, "extra") == 2,
    )
    .await;
    let (_, ready) = get(&serve, "/readyz").await;
    assert_eq!(ready["reload_errors"], serde_json::json!([]), "{ready}");

    let stderr = stop(&mut serve);
    assert!(!stderr.contains("pg-s3cret-pw"), "{stderr}");
    // JSON logs: a run's lines carry its sync and run id.
    let finished: Vec<Value> = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["message"] == "Run finished.")
        .collect();
    assert!(!finished.is_empty(), "{stderr}");
    for line in &finished {
        assert!(
            line["span"]["sync"].is_string() && line["span"]["run_id"].is_string(),
            "{line}"
        );
    }
}

/// `sluice serve` of a sync into `fake` every second, and an alert on syncs matching `pattern`
/// when a run fails, notifying `slack`.
fn start_alerting(
    dir: &std::path::Path,
    fake: &FakeWebhook,
    slack: &super::fakes::slack::FakeSlack,
    pattern: &str,
) -> Serve {
    std::fs::write(
        dir.join("project.sql"),
        format!(
            "CREATE CONNECTION hooks TYPE webhook OPTIONS (url env('SLUICE_TEST_SERVE_URL'), key 'id');
CREATE CONNECTION ops TYPE slack OPTIONS (webhook_url env('SLUICE_TEST_SLACK_URL'));
CREATE TABLE people AS SELECT * FROM (VALUES (1, 'a@x.io'), (2, 'b@x.io')) AS v(id, email);
CREATE SYNC people_every SCHEDULE EVERY '1 second'
  AS INSERT INTO hooks.people SELECT id, email FROM people;
CREATE ALERT failing ON SYNC '{pattern}' WHEN status = 'failed' NOTIFY ops;
"
        ),
    )
    .unwrap();
    start_with(
        dir,
        fake,
        Some(TOKEN),
        &[],
        &[("SLUICE_TEST_SLACK_URL", &slack.webhook_url)],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_alerts_once_into_slack_and_resolves_once() {
    use super::fakes::slack::{FakeSlack, WEBHOOK_PATH};
    let slack = FakeSlack::start().await;
    let fake = FakeWebhook::start(Script {
        unauthorized: true,
        ..Default::default()
    })
    .await;
    let dir = super::support::scratch();
    let mut serve = start_alerting(dir.path(), &fake, &slack, "people*");
    let runs_with = async |status: &str| {
        let (_, runs) = get(&serve, "/api/syncs/people_every/runs").await;
        runs["runs"]
            .as_array()
            .map_or(0, |r| r.iter().filter(|r| r["status"] == status).count())
    };
    eventually(Duration::from_secs(20), "three failed runs", async || {
        runs_with("failed").await >= 3
    })
    .await;
    let texts = slack.texts();
    assert_eq!(texts.len(), 1, "{texts:?}");
    assert!(
        texts[0].starts_with("[FIRING] failing: sync people_every")
            && texts[0].contains(&format!("Status: {}/", serve.base)),
        "{texts:?}"
    );
    fake.script(|s| s.unauthorized = false);
    eventually(Duration::from_secs(20), "the recovery notice", async || {
        slack.texts().len() == 2
    })
    .await;
    assert!(
        slack.texts()[1].starts_with("[RESOLVED] failing"),
        "{:?}",
        slack.texts()
    );
    let succeeded = runs_with("succeeded").await;
    eventually(Duration::from_secs(20), "two more runs", async || {
        runs_with("succeeded").await >= succeeded + 2
    })
    .await;
    assert_eq!(slack.texts().len(), 2, "{:?}", slack.texts());
    let stderr = stop(&mut serve);
    assert!(!stderr.contains(WEBHOOK_PATH), "{stderr}");
}

/// The answer's schema in the OpenAPI file for `path` (as written there), `method` and `status`,
/// as a validator.
fn openapi_validator(spec: &Value, path: &str, method: &str, status: u16) -> jsonschema::Validator {
    // A JSON pointer in a URI fragment: `~` and `/` escaped, then braces percent-encoded.
    let escape = |s: &str| {
        s.replace('~', "~0")
            .replace('/', "~1")
            .replace('{', "%7B")
            .replace('}', "%7D")
    };
    let pointer = format!(
        "#/paths/{}/{method}/responses/{status}/content/application~1json/schema",
        escape(path)
    );
    let at = pointer
        .trim_start_matches('#')
        .replace("%7B", "{")
        .replace("%7D", "}");
    assert!(
        spec.pointer(&at).is_some(),
        "the OpenAPI file does not describe {method} {path} answering {status}"
    );
    let mut document = spec.clone();
    document["$ref"] = Value::String(pointer);
    jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .build(&document)
        .expect("the OpenAPI file's schemas compile")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_answers_as_its_openapi_file_says() {
    let fake = FakeWebhook::start(Script {
        latency: Duration::from_millis(1500),
        reject_invalid: Some("email".into()),
        ..Default::default()
    })
    .await;
    let dir = super::support::scratch();
    std::fs::write(
        dir.path().join("project.sql"),
        "CREATE CONNECTION hooks TYPE webhook OPTIONS (url env('SLUICE_TEST_SERVE_URL'), key 'id');
CREATE TABLE people AS SELECT * FROM (VALUES (1, 'a@x.io'), (2, 'not-an-email')) AS v(id, email);
CREATE SYNC slow AS INSERT INTO hooks.people SELECT id, email FROM people;
CREATE SYNC timed SCHEDULE EVERY '1 hour' AS INSERT INTO hooks.timed SELECT id FROM people;
",
    )
    .unwrap();
    let serve = start(dir.path(), &fake, Some(TOKEN));
    let spec: Value = serde_json::from_str(
        &reqwest::get(format!("{}/openapi.json", serve.base))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    let on_disk: Value = serde_json::from_str(
        &std::fs::read_to_string(super::support::repo_root().join("docs/api/openapi.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(spec, on_disk, "/openapi.json serves docs/api/openapi.json");
    let mut covered = std::collections::BTreeSet::new();
    let mut check = |path: &str, method: &str, status: u16, expected: u16, body: &Value| {
        assert_eq!(status, expected, "{method} {path}: {body}");
        let validator = openapi_validator(&spec, path, method, status);
        let errors: Vec<String> = validator
            .iter_errors(body)
            .map(|e| format!("{e} at {}", e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{method} {path} {status}: {body}\n{errors:#?}"
        );
        covered.insert((path.to_string(), method.to_string()));
    };

    let (status, body) = get(&serve, "/readyz").await;
    check("/readyz", "get", status, 200, &body);
    let (status, body) = get(&serve, "/api/syncs").await;
    check("/api/syncs", "get", status, 200, &body);
    // Start a run, then ask again while it runs: 409 with its id.
    let (status, started) = post(&serve, "/api/syncs/slow/runs", Some(TOKEN)).await;
    check("/api/syncs/{name}/runs", "post", status, 202, &started);
    let (status, body) = post(&serve, "/api/syncs/slow/runs", Some(TOKEN)).await;
    check("/api/syncs/{name}/runs", "post", status, 409, &body);
    assert_eq!(body["run_id"], started["run_id"]);
    let (status, body) = post(&serve, "/api/syncs/slow/runs", None).await;
    check("/api/syncs/{name}/runs", "post", status, 401, &body);
    let (status, body) = post(&serve, "/api/syncs/nope/runs", Some(TOKEN)).await;
    check("/api/syncs/{name}/runs", "post", status, 404, &body);
    let (status, body) = post(&serve, "/api/syncs/timed/runs?wait=true", Some(TOKEN)).await;
    check("/api/syncs/{name}/runs", "post", status, 200, &body);
    let id = started["run_id"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(20), "the first run", async || {
        let (_, run) = get(&serve, &format!("/api/runs/{id}")).await;
        run["status"] == "partial"
    })
    .await;
    let (status, body) = get(&serve, &format!("/api/runs/{id}")).await;
    check("/api/runs/{id}", "get", status, 200, &body);
    let (status, body) = get(&serve, "/api/runs/nope").await;
    check("/api/runs/{id}", "get", status, 404, &body);
    let (status, body) = get(&serve, "/api/syncs/slow/runs").await;
    check("/api/syncs/{name}/runs", "get", status, 200, &body);
    let (status, body) = get(&serve, "/api/syncs/nope/runs").await;
    check("/api/syncs/{name}/runs", "get", status, 404, &body);
    let (status, body) = get(&serve, "/api/syncs/slow/rejects").await;
    check("/api/syncs/{name}/rejects", "get", status, 200, &body);
    assert_eq!(body["rejects"][0]["error_code"], "invalid_email", "{body}");
    let (status, body) = get(&serve, "/api/syncs/nope/rejects").await;
    check("/api/syncs/{name}/rejects", "get", status, 404, &body);
    // Every JSON route of the file was exercised.
    for (path, item) in spec["paths"].as_object().unwrap() {
        for method in ["get", "post"] {
            let json = item[method]["responses"].as_object().is_some_and(|r| {
                r.values()
                    .any(|r| r["content"]["application/json"].is_object())
            });
            if json {
                assert!(
                    covered.contains(&(path.clone(), method.to_string())),
                    "{method} {path} is not checked"
                );
            }
        }
    }
}

/// A WebDriver session on headless Chromium (Debian's chromium and chromium-driver).
struct Browser {
    driver: Child,
    base: String,
    session: String,
    client: reqwest::Client,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
    }
}

/// The key under which WebDriver answers an element's id.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    /// `None` (test skipped) when chromedriver is not installed and services are not required.
    async fn start() -> Option<Self> {
        let driver_bin = "/usr/bin/chromedriver";
        if !std::path::Path::new(driver_bin).exists() {
            if std::env::var("SLUICE_REQUIRE_SERVICES").as_deref() == Ok("1") {
                panic!(
                    "{driver_bin} is required (SLUICE_REQUIRE_SERVICES=1): install Debian's chromium and chromium-driver"
                );
            }
            eprintln!("skipping: {driver_bin} is not installed");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = std::process::Command::new(driver_bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver");
        let base = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::new();
        let mut browser = Self {
            driver,
            base,
            session: String::new(),
            client,
        };
        let capabilities = serde_json::json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"]
            }
        }}});
        let until = Instant::now() + Duration::from_secs(20);
        let answer = loop {
            match browser.call("POST", "/session", capabilities.clone()).await {
                Some(answer) => break answer,
                None => {
                    assert!(Instant::now() < until, "chromedriver did not start");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        browser.session = answer["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {answer}"))
            .to_string();
        Some(browser)
    }

    /// A WebDriver call; `None` when the driver is not listening yet.
    async fn call(&self, method: &str, path: &str, body: Value) -> Option<Value> {
        let url = format!("{}{path}", self.base);
        let request = match method {
            "GET" => self.client.get(url),
            "DELETE" => self.client.delete(url),
            // (A command without parameters still sends an empty object.)
            _ => self
                .client
                .post(url)
                .header("content-type", "application/json")
                .body(if body.is_null() {
                    "{}".to_string()
                } else {
                    body.to_string()
                }),
        };
        let response = request.send().await.ok()?;
        Some(serde_json::from_str(&response.text().await.unwrap()).unwrap())
    }

    async fn session(&self, method: &str, path: &str, body: Value) -> Value {
        let answer = self
            .call(method, &format!("/session/{}{path}", self.session), body)
            .await
            .expect("chromedriver answers");
        assert!(answer["value"]["error"].is_null(), "{path}: {answer}");
        answer["value"].clone()
    }

    async fn find(&self, css: &str) -> String {
        let found = self
            .session(
                "POST",
                "/element",
                serde_json::json!({"using": "css selector", "value": css}),
            )
            .await;
        found[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("{css}: {found}"))
            .to_string()
    }

    async fn script(&self, script: &str) -> Value {
        self.session(
            "POST",
            "/execute/sync",
            serde_json::json!({"script": script, "args": []}),
        )
        .await
    }

    async fn screenshot(&self, name: &str) -> std::path::PathBuf {
        use base64::Engine as _;
        let png = self.session("GET", "/screenshot", Value::Null).await;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap();
        let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_runs_a_sync_in_a_real_browser() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let fake = FakeWebhook::start(Script::default()).await;
    let dir = super::support::scratch();
    std::fs::write(dir.path().join("project.sql"), PROJECT).unwrap();
    let serve = start(dir.path(), &fake, Some(TOKEN));
    eventually(Duration::from_secs(15), "a scheduled run", async || {
        let (_, runs) = get(&serve, "/api/syncs/every_second/runs").await;
        runs["runs"].as_array().is_some_and(|r| r.len() >= 2)
    })
    .await;
    browser
        .session(
            "POST",
            "/url",
            serde_json::json!({"url": format!("{}/", serve.base)}),
        )
        .await;
    let title = browser.session("GET", "/title", Value::Null).await;
    assert_eq!(title, "sluice serve");
    // Both syncs are on the page; the manual one has no runs yet.
    let text = browser.script("return document.body.innerText").await;
    let text = text.as_str().unwrap();
    assert!(
        text.contains("every_second") && text.contains("EVERY '1 second'"),
        "{text}"
    );
    assert!(
        text.contains("on_demand") && text.contains("No runs yet."),
        "{text}"
    );
    // Type the token, click "Run now" on the manual sync, see its run appear.
    let token = browser.find("#token").await;
    browser
        .session(
            "POST",
            &format!("/element/{token}/value"),
            serde_json::json!({"text": TOKEN}),
        )
        .await;
    let button = browser.find("button[data-sync='on_demand']").await;
    browser
        .session("POST", &format!("/element/{button}/click"), Value::Null)
        .await;
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        // The page reloads itself after starting the run; its table then lists it.
        let rows = browser
            .script("const s=document.getElementById('sync-on_demand');return s?s.querySelectorAll('table.runs tr').length:0")
            .await;
        if rows.as_u64().unwrap_or(0) >= 2 {
            break;
        }
        assert!(
            Instant::now() < until,
            "the new run did not appear on the page"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (_, runs) = get(&serve, "/api/syncs/on_demand/runs").await;
    let id = runs["runs"][0]["run_id"].as_str().unwrap().to_string();
    let text = browser
        .script("return document.getElementById('sync-on_demand').innerText")
        .await;
    assert!(text.as_str().unwrap().contains(&id), "{text}");
    let shot = browser.screenshot("serve-status-page.png").await;
    eprintln!("screenshot: {}", shot.display());
    // A phone's width: nothing wider than the screen.
    browser
        .session(
            "POST",
            "/window/rect",
            serde_json::json!({"width": 390, "height": 844}),
        )
        .await;
    let fits = browser
        .script("return document.documentElement.scrollWidth <= window.innerWidth + 1")
        .await;
    assert_eq!(fits, Value::Bool(true));
    browser.screenshot("serve-status-page-phone.png").await;
    let html = reqwest::get(format!("{}/", serve.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!html.contains(TOKEN) && !html.contains(&fake.url), "{html}");
    browser.session("DELETE", "", Value::Null).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_run_then_a_restart_loses_nothing() {
    // Slow enough that a run outlives the 5 s grace: 4,000 records in 80 requests of 50, each
    // answered after 400 ms, 4 at a time: about 8 s.
    let fake = FakeWebhook::start(Script {
        latency: Duration::from_millis(400),
        ..Default::default()
    })
    .await;
    let dir = super::support::scratch();
    std::fs::write(
        dir.path().join("project.sql"),
        "CREATE CONNECTION hooks TYPE webhook OPTIONS (url env('SLUICE_TEST_SERVE_URL'), key 'id', batch_size '50');
CREATE TABLE people AS SELECT value AS id, concat('p', value, '@x.io') AS email FROM generate_series(1, 4000);
CREATE SYNC big OPTIONS (checkpoint_every '1s') AS INSERT INTO hooks.people SELECT id, email FROM people;
",
    )
    .unwrap();
    let stored = |fake: &FakeWebhook| {
        fake.observed(|o| {
            o.state
                .keys()
                .filter(|(object, _)| object == "people")
                .count()
        })
    };
    let mut serve = start(dir.path(), &fake, Some(TOKEN));
    let (status, started) = post(&serve, "/api/syncs/big/runs", Some(TOKEN)).await;
    assert_eq!(status, 202, "{started}");
    eventually(Duration::from_secs(20), "the run under way", async || {
        stored(&fake) >= 500
    })
    .await;
    let stderr = stop(&mut serve);
    assert!(stderr.contains("cancelled"), "{stderr}");
    let delivered = stored(&fake);
    assert!(
        delivered < 4000,
        "the run finished before it was stopped: {delivered}"
    );
    let id = started["run_id"].as_str().unwrap();
    let run: Value = serde_json::from_str(
        &std::fs::read_dir(dir.path().join(".sluice/runs/big"))
            .unwrap()
            .map(|f| std::fs::read_to_string(f.unwrap().path()).unwrap())
            .find(|t| t.contains(id))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(run["status"], "interrupted", "{run}");

    // Restarted: the next run sends the rest, and the destination holds every record once.
    let serve = start(dir.path(), &fake, Some(TOKEN));
    let (status, run) = post(&serve, "/api/syncs/big/runs?wait=true", Some(TOKEN)).await;
    assert_eq!(
        (status, run["status"].as_str()),
        (200, Some("succeeded")),
        "{run}"
    );
    assert_eq!(stored(&fake), 4000);
    let resent = run["inserted"].as_u64().unwrap() + run["updated"].as_u64().unwrap();
    assert!(
        resent >= 4000 - delivered as u64 && resent < 4000,
        "the rerun sent {resent} records; {delivered} had arrived before the stop"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_state_fails_runs_and_alerts_and_the_service_carries_on() {
    use super::fakes::slack::FakeSlack;
    let slack = FakeSlack::start().await;
    let fake = FakeWebhook::start(Script::default()).await;
    let dir = super::support::scratch();
    let mut serve = start_alerting(dir.path(), &fake, &slack, "*");
    eventually(Duration::from_secs(15), "a first run", async || {
        fake.observed(|o| o.records.len()) == 2
    })
    .await;
    // The state stops taking writes where every run starts, its lock: a folder stands where
    // the lock file goes. (Renaming the state away would look like a state that was deleted,
    // which sluice rightly answers with a first sync.)
    let lock = dir.path().join(".sluice/syncs/people_every/lock");
    // (Between two runs: while one runs, its lock file is there.)
    let until = Instant::now() + Duration::from_secs(10);
    while let Err(e) = std::fs::create_dir_all(lock.join("in-the-way")) {
        assert!(Instant::now() < until, "the lock was never free: {e}");
        std::thread::sleep(Duration::from_millis(5));
    }
    eventually(Duration::from_secs(15), "the failure notice", async || {
        slack.texts().len() == 1
    })
    .await;
    let text = &slack.texts()[0];
    assert!(
        text.starts_with("[FIRING] failing: sync people_every"),
        "{text}"
    );
    // Still serving, and still trying on each tick.
    assert_eq!(get(&serve, "/healthz").await.0, 200);
    let (_, syncs_now) = get(&serve, "/api/syncs").await;
    assert_eq!(
        syncs_now["syncs"][0]["last_status"], "failed",
        "{syncs_now}"
    );
    std::fs::remove_dir_all(&lock).unwrap();
    eventually(Duration::from_secs(15), "the recovery notice", async || {
        slack.texts().len() == 2
    })
    .await;
    assert!(
        slack.texts()[1].starts_with("[RESOLVED]"),
        "{:?}",
        slack.texts()
    );
    // Nothing was sent twice: the state came back as it was.
    assert_eq!(fake.observed(|o| o.records.len()), 2);
    stop(&mut serve);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_dbt_runs_when_dbt_built_the_models_it_reads() {
    let fake = FakeWebhook::start(Script::default()).await;
    let dir = super::support::scratch();
    std::fs::create_dir(dir.path().join("target")).unwrap();
    std::fs::write(
        dir.path().join("project.sql"),
        "CREATE CONNECTION hooks TYPE webhook OPTIONS (url env('SLUICE_TEST_SERVE_URL'), key 'id');
CREATE TABLE user_scores AS SELECT * FROM (VALUES (1, 0.5), (2, 0.9)) AS v(id, score);
CREATE SYNC scores SCHEDULE AFTER DBT 'target'
  AS INSERT INTO hooks.scores SELECT id, score FROM user_scores;
",
    )
    .unwrap();
    let results = |status: &str| {
        serde_json::json!({
            "metadata": {"generated_at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)},
            "results": [
                {"unique_id": "model.shop.user_scores", "status": status},
                {"unique_id": "model.shop.orders", "status": "success"},
                {"unique_id": "test.shop.not_null_user_scores_id", "status": "pass"}
            ]
        })
        .to_string()
    };
    let serve = start(dir.path(), &fake, Some(TOKEN));
    let runs = async || {
        let (_, body) = get(&serve, "/api/syncs/scores/runs").await;
        body["runs"].as_array().map_or(0, Vec::len)
    };
    // No dbt run yet: nothing runs.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(runs().await, 0);
    // dbt failed to build the model it reads: still nothing.
    std::fs::write(dir.path().join("target/run_results.json"), results("error")).unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(runs().await, 0);
    // dbt built it: the sync runs, once.
    std::fs::write(
        dir.path().join("target/run_results.json"),
        results("success"),
    )
    .unwrap();
    eventually(Duration::from_secs(15), "the run after dbt", async || {
        fake.observed(|o| o.records.len()) == 2
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(runs().await, 1);
}
