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
    let mut cmd = super::support::sluice(dir);
    cmd.args([
        "serve",
        ".",
        "--listen",
        "127.0.0.1:0",
        "--shutdown-grace",
        "5s",
    ])
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
    let base = line
        .trim()
        .strip_prefix("sluice serve: listening on ")
        .unwrap_or_else(|| panic!("first line: {line:?}"))
        .to_string();
    Serve {
        child,
        base,
        stderr,
    }
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
