//! The delivery engine and the webhook destination against the fault-injecting fake receiver.
//! These prove, not assume: nothing lost, limits respected, partial failures retried narrowly,
//! rejects kept, bounded retry time, no retry storms.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use sluice::{Engine, Outcome};

use super::fakes::webhook::{FakeWebhook, Fault, Script};
use super::support::write;

/// An engine with the connection `hooks` to `fake_url`, keyed by `id`, with `extra` options.
pub(super) async fn connect(fake_url: &str, extra: &str) -> Engine {
    let engine = super::support::engine();
    engine
        .run_sql(&format!(
            "CREATE CONNECTION hooks TYPE webhook OPTIONS (url '{fake_url}', key 'id'{extra})"
        ))
        .await
        .unwrap();
    engine
}

/// `n` users: ids 0..n and their emails.
fn users(n: usize) -> String {
    format!(
        "INSERT INTO hooks.users SELECT value AS id, 'user' || value || '@example.com' AS email FROM range({n})"
    )
}

fn ids(records: &[serde_json::Value]) -> Vec<i64> {
    let mut ids: Vec<i64> = records.iter().map(|r| r["id"].as_i64().unwrap()).collect();
    ids.sort_unstable();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_signed_batches_with_stable_envelopes() {
    let fake = FakeWebhook::start(Script {
        secret: Some("s3cret".into()),
        ..Script::default()
    })
    .await;
    let engine = connect(&fake.url, ", signing_secret 's3cret', batch_size '1000'").await;
    let summary = write(&engine, &users(2500)).await;
    assert_eq!((summary.rows_written, summary.rows_rejected), (2500, 0));
    let delivery = summary.delivery.expect("delivery stats");
    assert_eq!((delivery.requests, delivery.retries), (3, 0));
    fake.observed(|o| {
        assert_eq!(o.requests.len(), 3);
        assert!(o.requests.iter().all(|r| r.signature_ok == Some(true)));
        assert!(
            o.requests
                .iter()
                .all(|r| r.object.as_deref() == Some("users"))
        );
        let keys: HashSet<_> = o
            .requests
            .iter()
            .map(|r| r.idempotency_key.clone())
            .collect();
        assert_eq!(keys.len(), 3, "one idempotency key per batch");
        assert_eq!(ids(&o.records), (0..2500).collect::<Vec<_>>());
    });
}

/// `method`, `max_bytes` and `'header.<Name>'` reach the receiver as configured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_headers_and_max_bytes_reach_the_receiver() {
    let fake = FakeWebhook::start(Script::default()).await;
    // SAFETY: test-local variable name, read by this test only.
    unsafe { std::env::set_var("SLUICE_TEST_AUTH_HEADER", "Bearer abc") };
    let engine = connect(
        &fake.url,
        ", method 'put', max_bytes '2048', 'header.Authorization' env('SLUICE_TEST_AUTH_HEADER')",
    )
    .await;
    let summary = write(&engine, &users(200)).await;
    assert_eq!(summary.rows_written, 200);
    fake.observed(|o| {
        assert!(
            o.requests.len() > 5,
            "200 records of ~45 bytes need several 2 KiB bodies"
        );
        for r in &o.requests {
            assert_eq!(r.method, "PUT");
            assert!(
                r.body_bytes <= 2048,
                "a {} byte body exceeds max_bytes",
                r.body_bytes
            );
            assert_eq!(r.authorization.as_deref(), Some("Bearer abc"));
        }
        assert_eq!(ids(&o.records), (0..200).collect::<Vec<_>>());
    });
}

/// Every fault at once; the receiver, deduping by idempotency key, must end with every record
/// exactly once, and a request processed but unanswered must have been retried with its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_or_duplicated_under_faults() {
    let fake = FakeWebhook::start(Script {
        latency: Duration::from_millis(5),
        faults: [
            Fault::Status(503, None),
            Fault::DropAfter,
            Fault::Status(429, Some(0.2)),
            Fault::DropBefore,
            Fault::Hang(Duration::from_secs(3)),
            Fault::Malformed500,
            Fault::Malformed200,
            Fault::Status(502, None),
            Fault::DropAfter,
            Fault::Status(500, None),
        ]
        .into(),
        ..Script::default()
    })
    .await;
    let engine = connect(&fake.url, ", batch_size '100', timeout '1s'").await;
    let summary = write(&engine, &users(3000)).await;
    assert_eq!((summary.rows_written, summary.rows_rejected), (3000, 0));
    let delivery = summary.delivery.unwrap();
    assert!(delivery.retries >= 9, "{delivery:?}");
    assert_eq!(delivery.throttled, 1);
    fake.observed(|o| {
        let got = ids(&o.records);
        assert_eq!(got.len(), 3000, "every record exactly once");
        assert_eq!(got, (0..3000).collect::<Vec<_>>());
        assert_eq!(
            o.duplicates, 2,
            "both processed-but-unanswered requests were resent with their key"
        );
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_rate_limit_is_never_exceeded() {
    let fake = FakeWebhook::start(Script::default()).await;
    let engine = connect(
        &fake.url,
        ", batch_size '1', concurrency '8', rate_limit '20'",
    )
    .await;
    let started = Instant::now();
    let summary = write(&engine, &users(60)).await;
    assert_eq!(summary.rows_written, 60);
    assert!(
        started.elapsed() >= Duration::from_millis(2900),
        "{:?}",
        started.elapsed()
    );
    let most = fake.max_requests_in(Duration::from_secs(1));
    assert!(most <= 21, "{most} requests within one second, limit 20/s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limiter_is_shared_by_statements_on_one_connection() {
    let fake = FakeWebhook::start(Script::default()).await;
    let engine = connect(
        &fake.url,
        ", batch_size '1', concurrency '4', rate_limit '10'",
    )
    .await;
    let a = "INSERT INTO hooks.a SELECT value AS id FROM range(15)";
    let b = "INSERT INTO hooks.b SELECT value AS id FROM range(15)";
    let (ra, rb) = tokio::join!(engine.run_sql(a), engine.run_sql(b));
    ra.unwrap();
    rb.unwrap();
    assert_eq!(fake.observed(|o| o.requests.len()), 30);
    let most = fake.max_requests_in(Duration::from_secs(1));
    assert!(
        most <= 11,
        "{most} requests within one second across both statements, limit 10/s"
    );
}

/// The receiver allows 10 requests per rolling second and says so in X-RateLimit-* headers:
/// sluice paces itself by them and is almost never answered 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapts_to_the_receivers_rate_window() {
    let fake = FakeWebhook::start(Script {
        limit: Some((10, Duration::from_secs(1))),
        rate_headers: true,
        ..Script::default()
    })
    .await;
    let engine = connect(&fake.url, ", batch_size '1', concurrency '4'").await;
    let summary = write(&engine, &users(50)).await;
    assert_eq!(summary.rows_written, 50);
    let throttled = fake.observed(|o| o.throttled);
    assert_eq!(summary.delivery.unwrap().throttled, throttled);
    let log = fake.observed(|o| {
        let t0 = o.requests.first().map(|r| r.at);
        o.requests
            .iter()
            .map(|r| {
                format!(
                    "{:>5}ms {}",
                    r.at.duration_since(t0.unwrap()).as_millis(),
                    r.status
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    });
    assert!(
        throttled <= 3,
        "{throttled} of ~50 requests answered 429:\n{log}"
    );
    assert_eq!(
        fake.observed(|o| ids(&o.records)),
        (0..50).collect::<Vec<_>>()
    );
}

/// Without headers, 429s alone: sluice halves its rate, waits out Retry-After, and gets everything
/// through; rate-limited requests do not count as failed attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backs_off_on_429_storms_without_failing() {
    let fake = FakeWebhook::start(Script {
        limit: Some((5, Duration::from_millis(500))),
        ..Script::default()
    })
    .await;
    let engine = connect(
        &fake.url,
        ", batch_size '1', concurrency '4', max_attempts '2'",
    )
    .await;
    let summary = write(&engine, &users(40)).await;
    assert_eq!(summary.rows_written, 40);
    assert!(summary.delivery.unwrap().throttled >= 1);
    assert_eq!(
        fake.observed(|o| ids(&o.records)),
        (0..40).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_failures_retry_only_the_failed_records_and_keep_the_rejected() {
    let fake = FakeWebhook::start(Script {
        reject_invalid: Some("email".into()),
        flaky: Some((
            "id".into(),
            HashMap::from([("3".into(), 1), ("7".into(), 2)]),
        )),
        ..Script::default()
    })
    .await;
    let engine = connect(&fake.url, ", batch_size '20'").await;
    let sql = "INSERT INTO hooks.users SELECT value AS id,
                 CASE WHEN value IN (5, 11) THEN 'nope' ELSE 'u' || value || '@example.com' END AS email
               FROM range(20)";
    let summary = write(&engine, sql).await;
    assert_eq!((summary.rows_written, summary.rows_rejected), (18, 2));
    fake.observed(|o| {
        let sizes: Vec<usize> = o.requests.iter().map(|r| r.records).collect();
        assert_eq!(
            sizes,
            vec![20, 2, 1],
            "retries carry only the failed records"
        );
        assert_eq!(o.requests[1].record_ids, vec!["3", "7"]);
        assert_eq!(o.requests[2].record_ids, vec!["7"]);
        let keys: HashSet<_> = o
            .requests
            .iter()
            .map(|r| r.idempotency_key.clone())
            .collect();
        assert_eq!(
            keys.len(),
            3,
            "a subset with different content gets its own key"
        );
        assert_eq!(ids(&o.records).len(), 18);
    });
    let mut rejected: Vec<_> = summary
        .rejects
        .iter()
        .map(|r| r.key.clone().unwrap())
        .collect();
    rejected.sort();
    assert_eq!(rejected, vec!["11", "5"]);
    // Rejects are kept whole and queryable.
    let rows = engine
        .run_sql("SELECT key, error_code, error_message, payload, attempts FROM sluice.rejects ORDER BY key")
        .await
        .unwrap();
    let Some(Outcome::Rows { batches, .. }) = rows.last() else {
        panic!()
    };
    let text = datafusion::arrow::util::pretty::pretty_format_batches(batches)
        .unwrap()
        .to_string();
    assert!(text.contains(r#"'nope' is not an email address"#), "{text}");
    assert!(text.contains(r#"{"id":5,"email":"nope"}"#), "{text}");
    assert!(text.contains("invalid_email"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_4xx_rejects_the_whole_request_and_the_rest_goes_on() {
    let fake = FakeWebhook::start(Script {
        faults: [Fault::Status(422, None)].into(),
        ..Script::default()
    })
    .await;
    let engine = connect(&fake.url, ", batch_size '5', concurrency '1'").await;
    let summary = write(&engine, &users(10)).await;
    assert_eq!((summary.rows_written, summary.rows_rejected), (5, 5));
    assert!(
        summary
            .rejects
            .iter()
            .all(|r| r.code == "http_422" && r.message.contains("scripted 422"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoint_fails_the_statement_in_bounded_time() {
    // Nothing listens on this port: bind, note the port, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let engine = connect(
        &format!("http://127.0.0.1:{port}/hook"),
        ", max_retry_time '2s'",
    )
    .await;
    let started = Instant::now();
    let err = engine.run_sql(&users(10)).await.unwrap_err().to_string();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(6), "took {took:?}");
    assert!(err.contains("gave up after"), "{err}");
    assert!(err.contains("cannot connect"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_credentials_stop_without_a_retry_storm() {
    let fake = FakeWebhook::start(Script {
        unauthorized: true,
        ..Script::default()
    })
    .await;
    let engine = connect(&fake.url, ", batch_size '100', concurrency '4'").await;
    let err = engine.run_sql(&users(1000)).await.unwrap_err().to_string();
    assert!(err.contains("rejected the credentials (401"), "{err}");
    let requests = fake.observed(|o| o.requests.len());
    assert!(requests <= 4, "{requests} requests after a 401");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_shows_the_sink_without_secrets_and_analyze_shows_delivery() {
    let fake = FakeWebhook::start(Script::default()).await;
    // SAFETY: test-local variable name, read by this test only.
    unsafe { std::env::set_var("SLUICE_TEST_HOOK_TOKEN", "Bearer tok-987") };
    let engine = connect(
        &fake.url,
        ", signing_secret 'sig-654', 'header.Authorization' env('SLUICE_TEST_HOOK_TOKEN')",
    )
    .await;
    let show = engine.run_sql("SHOW CONNECTIONS").await.unwrap();
    let explain = engine
        .run_sql("EXPLAIN INSERT INTO hooks.users SELECT 1 AS id")
        .await
        .unwrap();
    let analyze = engine
        .run_sql("EXPLAIN ANALYZE INSERT INTO hooks.users SELECT value AS id FROM range(3)")
        .await
        .unwrap();
    let text = |o: &[Outcome]| match o.last() {
        Some(Outcome::Rows { batches, .. }) => {
            datafusion::arrow::util::pretty::pretty_format_batches(batches)
                .unwrap()
                .to_string()
        }
        other => panic!("{other:?}"),
    };
    let all = format!("{}{}{}", text(&show), text(&explain), text(&analyze));
    for secret in ["tok-987", "sig-654"] {
        assert!(!all.contains(secret), "{secret} leaked:\n{all}");
    }
    assert!(text(&show).contains("signing_secret '***'"), "{all}");
    assert!(
        text(&explain).contains("WebhookSink: connection=hooks object=users POST"),
        "{all}"
    );
    assert!(
        text(&explain).contains("signed=true headers=[authorization: ***]"),
        "{all}"
    );
    assert!(
        text(&explain).contains("DiffExec: sync=hooks.users-")
            && text(&explain).contains("mode=upsert key=id fields=[id]"),
        "the sync's diff is in the plan: {all}"
    );
    assert_eq!(
        fake.observed(|o| o.requests.len()),
        1,
        "EXPLAIN sent nothing; ANALYZE sent one"
    );
    assert!(text(&analyze).contains("requests=1"), "{}", text(&analyze));
    assert!(
        text(&analyze).contains("rows_accepted=3"),
        "{}",
        text(&analyze)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_must_be_mapped() {
    let fake = FakeWebhook::start(Script::default()).await;
    let engine = connect(&fake.url, "").await;
    let err = engine
        .run_sql("INSERT INTO hooks.users SELECT 'a@b.c' AS email")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("identifies records by 'id', but the statement does not map a field 'id'"),
        "{err}"
    );
    assert_eq!(fake.observed(|o| o.requests.len()), 0);
}

/// Through the binary: rejected records are printed, queryable, and make the exit code 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_records_make_the_exit_code_1() {
    let fake = FakeWebhook::start(Script {
        reject_invalid: Some("email".into()),
        ..Script::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let sql = format!(
        "CREATE CONNECTION hooks TYPE webhook OPTIONS (url '{}', key 'id');
INSERT INTO hooks.users SELECT value AS id, CASE WHEN value = 2 THEN 'not-an-email' ELSE 'u' || value || '@x.io' END AS email FROM range(4);
SELECT key, error_code, error_message FROM sluice.rejects;
",
        fake.url
    );
    std::fs::write(dir.path().join("sync.sql"), sql).unwrap();
    let mut cmd = super::support::sluice(dir.path());
    cmd.args(["run", "sync.sql"]);
    let output = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let text = super::support::transcript(&output, dir.path()).replace(&fake.url, "[FAKE]");
    let text = regex::Regex::new(r"latency p50 \d+ms p99 \d+ms")
        .unwrap()
        .replace_all(&text, "latency [LATENCY]")
        .into_owned();
    insta::assert_snapshot!("webhook_rejects_exit_1", text);
    assert_eq!(output.status.code(), Some(1));
}

/// The driver's 401 path, through a destination that can refresh its credentials: one refresh,
/// then the request goes through; a second 401 after a refresh stops the statement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_refreshes_credentials_once() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use sluice::delivery::{
        AdaptiveLimiter, Batch, Batcher, DeliveryMetrics, Driver, HttpResponse, HttpService,
        Record, ResponseClass, RetryPolicy,
    };

    struct Refreshing {
        url: String,
        fake: Arc<FakeWebhook>,
        refreshes: AtomicU32,
        fixes: bool,
    }

    #[async_trait::async_trait]
    impl HttpService for Refreshing {
        fn build_request(
            &self,
            client: &reqwest::Client,
            batch: &Batch,
        ) -> sluice::Result<reqwest::RequestBuilder> {
            let records: Vec<&[u8]> = batch.records.iter().map(|r| &r.json[..]).collect();
            let body = format!(
                r#"{{"records":[{}]}}"#,
                records
                    .iter()
                    .map(|r| String::from_utf8_lossy(r))
                    .collect::<Vec<_>>()
                    .join(",")
            );
            Ok(client
                .post(&self.url)
                .header("Idempotency-Key", batch.idempotency_key())
                .body(body))
        }
        fn classify(&self, batch: &Batch, response: &HttpResponse) -> ResponseClass {
            sluice::connectors::webhook::retry::WebhookRetryLogic::classify(batch, response)
        }
        async fn refresh_credentials(&self, _batch: &Batch) -> sluice::Result<bool> {
            self.refreshes.fetch_add(1, Ordering::SeqCst);
            if self.fixes {
                self.fake.script(|s| s.unauthorized = false);
            }
            Ok(true)
        }
        fn describe(&self) -> String {
            "test destination".into()
        }
    }

    for fixes in [true, false] {
        let fake = Arc::new(
            FakeWebhook::start(Script {
                unauthorized: true,
                ..Script::default()
            })
            .await,
        );
        let service = Arc::new(Refreshing {
            url: fake.url.clone(),
            fake: Arc::clone(&fake),
            refreshes: AtomicU32::new(0),
            fixes,
        });
        let driver = Driver::new(
            Arc::clone(&service),
            reqwest::Client::new(),
            Arc::new(AdaptiveLimiter::new(None)),
            RetryPolicy::default(),
            Arc::new(DeliveryMetrics::default()),
        );
        let mut batcher = Batcher::new("run", 10, 1 << 20);
        batcher.push(Record::new(
            Some("1".into()),
            bytes::Bytes::from_static(br#"{"id":1}"#),
        ));
        let result = driver.deliver(batcher.finish().remove(0)).await;
        assert_eq!(
            service.refreshes.load(Ordering::SeqCst),
            1,
            "exactly one refresh"
        );
        if fixes {
            assert_eq!(result.unwrap().accepted, 1);
            assert_eq!(fake.observed(|o| o.requests.len()), 2);
        } else {
            let err = result.unwrap_err().to_string();
            assert!(err.contains("rejected the credentials (401"), "{err}");
            assert_eq!(
                fake.observed(|o| o.requests.len()),
                2,
                "no retry storm after a refresh"
            );
        }
    }
}

/// Secrets (header values, signing secrets, URL passwords) never reach the state: snapshots,
/// manifests, rejects, run records (including their error messages) or lock files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_state_files() {
    let fake = FakeWebhook::start(Script {
        reject_invalid: Some("email".into()),
        ..Default::default()
    })
    .await;
    // SAFETY: test-local variable name, read by this test only.
    unsafe { std::env::set_var("SLUICE_TEST_STATE_TOKEN", "Bearer tok-state-1") };
    let url = fake.url.replace("http://", "http://robot:pw-state-2@");
    let engine = connect(
        &url,
        ", signing_secret 'sig-state-3', 'header.Authorization' env('SLUICE_TEST_STATE_TOKEN')",
    )
    .await;
    let summary = write(
        &engine,
        "INSERT INTO hooks.users SELECT * FROM (VALUES (1, 'a@x.io'), (2, 'nope')) AS t(id, email)",
    )
    .await;
    assert_eq!(summary.rows_rejected, 1);
    // A failing run records its error.
    fake.script(|s| s.unauthorized = true);
    let err = engine
        .run_sql("INSERT INTO hooks.users SELECT * FROM (VALUES (3, 'c@x.io')) AS t(id, email)")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("401"), "{err}");
    let runs = engine
        .run_sql("SELECT status, error FROM sluice.runs ORDER BY started_at")
        .await
        .unwrap();
    let Some(Outcome::Rows { batches, .. }) = runs.last() else {
        panic!("{runs:?}")
    };
    let runs = datafusion::arrow::util::pretty::pretty_format_batches(batches)
        .unwrap()
        .to_string();
    assert!(
        runs.contains("partial") && runs.contains("failed") && runs.contains("401"),
        "{runs}"
    );
    // The failure's facts: the connection, object, status, and the key of the one record the
    // refused request carried.
    let facts = engine
        .run_sql("SELECT error_connection, error_object, error_status, error_key FROM sluice.runs WHERE status = 'failed'")
        .await
        .unwrap();
    let Some(Outcome::Rows { batches, .. }) = facts.last() else {
        panic!("{facts:?}")
    };
    let facts = datafusion::arrow::util::pretty::pretty_format_batches(batches)
        .unwrap()
        .to_string();
    assert!(
        facts.contains("| hooks ")
            && facts.contains("| users ")
            && facts.contains("| 401 ")
            && facts.contains("| 3 "),
        "{facts}"
    );
    let mut files = 0;
    for file in super::support::files_under(std::path::Path::new(engine.state_location())) {
        let text = String::from_utf8_lossy(&std::fs::read(&file).unwrap()).into_owned();
        for secret in ["tok-state-1", "pw-state-2", "sig-state-3"] {
            assert!(
                !text.contains(secret),
                "{secret} in {}:\n{text}",
                file.display()
            );
        }
        files += 1;
    }
    assert!(
        files >= 4,
        "manifest, snapshot, rejects and run records were written"
    );
}

/// Issue 19: `RUN SYNC … SAMPLE n` sends the first n records of the diff in key order, shows
/// each request and answer (no secret: the endpoint came from env() and is shown as its origin,
/// the signing secret travels in a header, which is never shown) and commits only their state:
/// the next run sends the rest. `SAMPLE WHERE key IN (…)` picks records by key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sample_run_sends_a_few_records_shows_the_exchange_and_leaves_the_rest() {
    let fake = FakeWebhook::start(Script {
        secret: Some("whsec-sample-secret".into()),
        ..Script::default()
    })
    .await;
    let endpoint = format!("{}/s3cret-path-token", fake.url.trim_end_matches('/'));
    // SAFETY: set before the engine reads it; no other test reads this variable.
    unsafe { std::env::set_var("SLUICE_TEST_SAMPLE_URL", &endpoint) };
    let engine = super::support::engine();
    engine
        .run_sql(
            "CREATE CONNECTION hooks TYPE webhook OPTIONS (url env('SLUICE_TEST_SAMPLE_URL'), key 'id', signing_secret 'whsec-sample-secret');
             CREATE TABLE people AS SELECT value AS id, 'user' || value || '@example.com' AS email FROM range(10);
             CREATE SYNC s AS INSERT INTO hooks.users SELECT id, email FROM people ORDER BY id DESC",
        )
        .await
        .unwrap();

    let sample = write(&engine, "RUN SYNC s SAMPLE 3").await;
    assert_eq!((sample.rows_written, sample.rows_rejected), (3, 0));
    let run = sample.sync.as_ref().unwrap();
    assert_eq!(run.sampled, Some((3, 10)));
    assert_eq!(
        ids(&fake.observed(|o| o.records.clone())),
        [0, 1, 2],
        "the first three keys"
    );
    assert_eq!(sample.exchanges.len(), 1);
    let exchange = &sample.exchanges[0];
    assert_eq!(exchange.method, "POST");
    assert_eq!(exchange.status, Some(200));
    assert!(
        exchange.request.contains("user2@example.com")
            && !exchange.request.contains("user3@example.com"),
        "{}",
        exchange.request
    );
    let shown = sample.to_string();
    assert!(
        shown.contains("sample: 3 of the 10 records this run would send were sent")
            && shown.contains("← 200"),
        "{shown}"
    );
    assert!(
        !shown.contains("s3cret-path-token") && !shown.contains("whsec-sample-secret"),
        "{shown}"
    );
    assert!(fake.observed(|o| o.requests.iter().all(|r| r.signature_ok == Some(true))));

    // The next run sends the other seven, and only them.
    let rest = write(&engine, "RUN SYNC s").await;
    assert_eq!(rest.rows_written, 7);
    assert!(rest.exchanges.is_empty(), "only a sample run keeps them");
    assert_eq!(
        ids(&fake.observed(|o| o.records.clone())),
        (0..10).collect::<Vec<_>>()
    );

    // By key: two changed records, one sampled; a key with no change sends nothing.
    engine
        .run_sql("CREATE OR REPLACE TABLE people AS SELECT value AS id, 'new' || value || '@example.com' AS email FROM range(10) WHERE value IN (4, 5) UNION ALL SELECT value, 'user' || value || '@example.com' FROM range(10) WHERE value NOT IN (4, 5)")
        .await
        .unwrap();
    let by_key = write(&engine, "RUN SYNC s SAMPLE WHERE id IN (5, 9)").await;
    assert_eq!(by_key.rows_written, 1);
    assert_eq!(by_key.sync.as_ref().unwrap().sampled, Some((1, 2)));
    assert!(by_key.exchanges[0].request.contains("new5@example.com"));
    let rest = write(&engine, "RUN SYNC s").await;
    assert_eq!(rest.rows_written, 1, "record 4 was left for this run");

    // A key the sync is not matched by is a plan error that names the key.
    let err = super::support::error(&engine, "RUN SYNC s SAMPLE WHERE email IN ('x')").await;
    assert!(
        err.contains("records of hooks.users are matched by 'id'"),
        "{err}"
    );
    let err = super::support::error(&engine, "RUN SYNC s SAMPLE 0").await;
    assert!(err.contains("SAMPLE <number of records>"), "{err}");
}
