//! The HubSpot destination against the fake HubSpot API (faithful to
//! ../shared/api/destinations.md §2): every mode across consecutive runs, partial failures,
//! rate-limit storms, a rejected token, quota exhaustion and the next day's resume.

use std::time::Duration;

use serde_json::json;
use sluice::{Engine, Outcome};

use super::fakes::hubspot::{FakeHubspot, Fault, Script};
use super::support::{query, write};

const TOKEN: &str = "pat-na1-test-token";

async fn connect(fake: &FakeHubspot, extra: &str) -> Engine {
    let engine = super::support::engine();
    engine
        .run_sql(&format!(
            "CREATE CONNECTION crm TYPE hubspot OPTIONS (token '{TOKEN}', base_url '{}'{extra})",
            fake.url
        ))
        .await
        .unwrap();
    engine
}

/// Replaces the model: `rows` as `(email, firstname, churn_score, lifecyclestage)` tuples.
async fn model(engine: &Engine, rows: &str) {
    engine
        .run_sql(&format!(
            "CREATE OR REPLACE TABLE people AS SELECT * FROM (VALUES {rows}) AS v(email, firstname, churn_score, stage)"
        ))
        .await
        .unwrap();
}

const UPSERT: &str = "INSERT INTO crm.contacts SELECT email, firstname, churn_score, stage AS lifecyclestage FROM people";

fn people(n: usize) -> String {
    (0..n)
        .map(|i| format!("('user{i}@example.com', 'User{i}', {i}.5, 'lead')"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upserts_only_what_changed_across_runs() {
    let fake = FakeHubspot::start(Script::default()).await;
    let engine = connect(&fake, "").await;
    model(&engine, &people(250)).await;

    let first = write(&engine, UPSERT).await;
    assert_eq!((first.rows_written, first.rows_rejected), (250, 0));
    assert_eq!(fake.calls("upsert"), 3, "250 records in batches of 100");
    assert_eq!(fake.records("contacts").len(), 250);
    assert_eq!(
        fake.property("contacts", "email", "user7@example.com", "churn_score")
            .as_deref(),
        Some("7.5"),
        "numbers travel as strings"
    );

    // One changed field of one record: one call, one input, carrying only that field.
    model(&engine, &people(250).replace("'User7'", "'Seven'")).await;
    let second = write(&engine, UPSERT).await;
    assert_eq!(second.rows_written, 1);
    assert_eq!(fake.calls("upsert"), 4);
    fake.observed(|o| {
        let last = o.requests.last().unwrap();
        assert_eq!(
            (last.inputs, last.ids[0].as_str()),
            (1, "user7@example.com")
        );
    });
    assert_eq!(
        fake.property("contacts", "email", "user7@example.com", "firstname")
            .as_deref(),
        Some("Seven")
    );

    // Nothing changed: nothing sent.
    let third = write(&engine, UPSERT).await;
    assert_eq!(third.rows_written, 0);
    assert_eq!(fake.calls("upsert"), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_are_encoded_as_hubspot_expects() {
    let fake = FakeHubspot::start(Script::default()).await;
    let engine = connect(&fake, "").await;
    let summary = write(
        &engine,
        "INSERT INTO crm.contacts SELECT 'A@Example.com' AS email, true AS vip, DATE '2024-01-15' AS signup_date,
            TIMESTAMP '2024-01-15 10:00:00.123' AS last_seen, 42 AS churn_score, CAST(NULL AS VARCHAR) AS lastname",
    )
    .await;
    assert_eq!((summary.rows_written, summary.rows_rejected), (1, 0));
    let (_, props) = fake.records("contacts").pop().unwrap();
    assert_eq!(props["email"], json!("a@example.com"));
    assert_eq!(props["vip"], json!("true"));
    assert_eq!(
        props["signup_date"],
        json!("1705276800000"),
        "date: midnight UTC in epoch ms"
    );
    assert_eq!(props["last_seen"], json!("2024-01-15T10:00:00.123Z"));
    assert_eq!(props["churn_score"], json!("42"));
    assert_eq!(props["lastname"], json!(""), "a null clears the property");
    // HubSpot lowercases the email; the result is still matched to the record and its id kept.
    let again = write(
        &engine,
        "INSERT INTO crm.contacts SELECT 'A@Example.com' AS email, true AS vip, DATE '2024-01-15' AS signup_date,
            TIMESTAMP '2024-01-15 10:00:00.123' AS last_seen, 42 AS churn_score, CAST(NULL AS VARCHAR) AS lastname",
    )
    .await;
    assert_eq!(again.rows_written, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_failures_are_rejects_kept_and_retried_when_fixed() {
    let fake = FakeHubspot::start(Script::default()).await;
    let engine = connect(&fake, "").await;
    let rows = people(150)
        .replace("'user3@example.com'", "'not-an-email'")
        .replace("'User9', 9.5, 'lead'", "'User9', 9.5, 'platinum'");
    model(&engine, &rows).await;
    let first = write(&engine, UPSERT).await;
    assert_eq!((first.rows_written, first.rows_rejected), (148, 2));
    assert_eq!(fake.records("contacts").len(), 148);
    let rejects = query(
        &engine,
        "SELECT key, operation, error_code FROM sluice.rejects ORDER BY key",
    )
    .await;
    let line = |key: &str, code: &str| {
        rejects
            .lines()
            .any(|l| l.contains(key) && l.contains("upsert") && l.contains(code))
    };
    assert!(line("not-an-email", "INVALID_EMAIL"), "{rejects}");
    assert!(line("user9@example.com", "INVALID_OPTION"), "{rejects}");
    assert_eq!(
        fake.calls("upsert"),
        2,
        "207 per input: nothing re-sent for a bad record"
    );

    // Fixed in the model: only the two are sent; the rejects clear.
    model(&engine, &people(150)).await;
    let fixed = write(&engine, UPSERT).await;
    assert_eq!((fixed.rows_written, fixed.rows_rejected), (2, 0));
    assert_eq!(fake.records("contacts").len(), 150);
    let left = query(&engine, "SELECT count(*) AS n FROM sluice.rejects WHERE run_id = (SELECT max(run_id) FROM sluice.runs)").await;
    assert!(left.contains("| 0 "), "{left}");

    // sluice.changes: every record each run sent, with HubSpot's answer and its record id.
    let log = query(
        &engine,
        "SELECT outcome, error_code, count(*) AS n, count(record_id) AS ids FROM sluice.changes
         GROUP BY outcome, error_code ORDER BY outcome, error_code",
    )
    .await;
    let rows: String = log.chars().filter(|c| *c != ' ').collect();
    assert!(
        rows.contains("|accepted||150|150|")
            && rows.contains("|rejected|INVALID_EMAIL|1|0|")
            && rows.contains("|rejected|INVALID_OPTION|1|0|"),
        "{log}"
    );
    let (id, _) = fake
        .records("contacts")
        .into_iter()
        .find(|(_, p)| p["email"] == json!("user5@example.com"))
        .unwrap();
    let logged = query(
        &engine,
        "SELECT record_id FROM sluice.changes WHERE key = 'user5@example.com'",
    )
    .await;
    assert!(logged.contains(&format!("| {id} ")), "{id}: {logged}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_only_create_only_and_mirror() {
    let fake = FakeHubspot::start(Script::default()).await;
    let existing = fake.seed(
        "contacts",
        json!({"email": "user1@example.com", "firstname": "Old"}),
    );
    let engine = connect(&fake, "").await;
    model(&engine, &people(4)).await;

    // Update-only: the existing record is updated; the others are not found and rejected.
    let update = "MERGE INTO crm.contacts AS t USING people AS s ON t.email = s.email
        WHEN MATCHED THEN UPDATE SET firstname = s.firstname";
    let updated = write(&engine, update).await;
    assert_eq!((updated.rows_written, updated.rows_rejected), (1, 3));
    assert!(updated.rejects.iter().all(|r| r.code == "OBJECT_NOT_FOUND"));
    assert_eq!(
        fake.property("contacts", "email", "user1@example.com", "firstname")
            .as_deref(),
        Some("User1")
    );
    assert_eq!(
        fake.records("contacts").len(),
        1,
        "update-only creates nothing"
    );

    // Create-only: the batch's 409 is split until the existing record is alone; it is a reject
    // carrying the existing id, and the other three are created.
    let create = "MERGE INTO crm.contacts AS t USING people AS s ON t.email = s.email
        WHEN NOT MATCHED THEN INSERT (email, firstname) VALUES (s.email, s.firstname)";
    let created = write(&engine, create).await;
    assert_eq!((created.rows_written, created.rows_rejected), (3, 1));
    let conflict = &created.rejects[0];
    assert_eq!(
        (conflict.key.as_deref(), conflict.code.as_str()),
        (Some("user1@example.com"), "CONFLICT")
    );
    assert!(
        conflict
            .message
            .contains(&format!("Existing ID: {existing}")),
        "{}",
        conflict.message
    );
    assert_eq!(fake.records("contacts").len(), 4);

    // Mirror: upsert everything, then a record that leaves the model is archived by the id the
    // state holds (no lookup).
    let mirror = "MERGE INTO crm.contacts AS t USING people AS s ON t.email = s.email
        WHEN MATCHED THEN UPDATE SET firstname = s.firstname
        WHEN NOT MATCHED THEN INSERT (email, firstname) VALUES (s.email, s.firstname)
        WHEN NOT MATCHED BY SOURCE THEN DELETE";
    let synced = write(&engine, mirror).await;
    assert_eq!(synced.rows_written, 4);
    model(&engine, &people(3)).await;
    let shrunk = write(&engine, mirror).await;
    assert_eq!(shrunk.sync.as_ref().unwrap().counts.deletes, 1);
    assert_eq!(fake.calls("archive"), 1);
    assert_eq!(fake.calls("read"), 0, "the record id came from the state");
    assert!(
        fake.property("contacts", "email", "user3@example.com", "email")
            .is_none()
    );

    // DELETE FROM by key: the id is looked up with batch/read, then archived.
    let deleted = write(
        &engine,
        "DELETE FROM crm.contacts WHERE email IN (SELECT email FROM people WHERE firstname = 'User0')",
    )
    .await;
    assert_eq!(deleted.rows_written, 1);
    assert_eq!(fake.calls("read"), 1);
    assert!(
        fake.property("contacts", "email", "user0@example.com", "email")
            .is_none()
    );
    assert_eq!(fake.records("contacts").len(), 2);
}

/// Issue 19: "set on create only". A matched contact gets only the changed fields of UPDATE SET;
/// the first name is written when the contact is created and a rep's later edit is never
/// overwritten. A change only to the first name sends nothing and is remembered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_clauses_keep_their_fields_across_runs() {
    let fake = FakeHubspot::start(Script::default()).await;
    let engine = connect(&fake, "").await;
    let merge = "MERGE INTO crm.contacts AS t USING people AS s ON t.email = s.email
        WHEN MATCHED THEN UPDATE SET churn_score = s.churn_score
        WHEN NOT MATCHED THEN INSERT (email, firstname, lifecyclestage, churn_score)
                              VALUES (s.email, s.firstname, 'lead', s.churn_score)";
    model(&engine, &people(3)).await;
    assert_eq!(write(&engine, merge).await.rows_written, 3);
    let property = |email: &str, name: &str| fake.property("contacts", "email", email, name);
    assert_eq!(
        property("user0@example.com", "firstname").as_deref(),
        Some("User0")
    );
    assert_eq!(
        property("user0@example.com", "lifecyclestage").as_deref(),
        Some("lead")
    );

    // A rep renames user0; the model renames all three and rescores user0 and user1.
    let (id, _) = fake.records("contacts")[0].clone();
    fake.edit("contacts", id, "firstname", json!("Rep's pick"));
    model(
        &engine,
        "('user0@example.com', 'New0', 9.5, 'lead'), ('user1@example.com', 'New1', 8.5, 'lead'),
         ('user2@example.com', 'New2', 2.5, 'lead')",
    )
    .await;
    let upserts = fake.calls("upsert");
    let run = write(&engine, merge).await;
    assert_eq!((run.rows_written, run.rows_rejected), (2, 0));
    assert_eq!(fake.calls("upsert"), upserts + 1);
    assert_eq!(
        property("user0@example.com", "churn_score").as_deref(),
        Some("9.5")
    );
    assert_eq!(
        property("user0@example.com", "firstname").as_deref(),
        Some("Rep's pick")
    );
    assert_eq!(
        property("user1@example.com", "firstname").as_deref(),
        Some("User1")
    );
    assert_eq!(
        property("user2@example.com", "firstname").as_deref(),
        Some("User2")
    );
    let counts = run.sync.as_ref().unwrap().counts;
    assert_eq!((counts.updates, counts.skipped), (2, 1), "{counts:?}");

    // The renames were remembered without being sent: a rerun sends nothing.
    let rerun = write(&engine, merge).await;
    assert_eq!(rerun.rows_written, 0);
    assert_eq!(fake.calls("upsert"), upserts + 1);

    // A new contact gets every field its INSERT lists.
    model(
        &engine,
        "('user0@example.com', 'New0', 9.5, 'lead'), ('user1@example.com', 'New1', 8.5, 'lead'),
         ('user2@example.com', 'New2', 2.5, 'lead'), ('user3@example.com', 'New3', 3.5, 'lead')",
    )
    .await;
    assert_eq!(write(&engine, merge).await.rows_written, 1);
    assert_eq!(
        property("user3@example.com", "firstname").as_deref(),
        Some("New3")
    );
    assert_eq!(
        property("user3@example.com", "churn_score").as_deref(),
        Some("3.5")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_names_fail_at_plan_time_with_the_closest_name() {
    let fake = FakeHubspot::start(Script::default()).await;
    let engine = connect(&fake, "").await;
    let error = |sql: &'static str| {
        let engine = &engine;
        async move { engine.run_sql(sql).await.unwrap_err().to_string() }
    };
    let e = error("INSERT INTO crm.contacts SELECT 'a@x.com' AS email, 'A' AS firstnam").await;
    assert!(
        e.contains("no field 'firstnam'") && e.contains("did you mean 'firstname'"),
        "{e}"
    );
    let e = error("INSERT INTO crm.contacts SELECT 'a@x.com' AS email, TIMESTAMP '2024-01-01 00:00:00' AS createdate").await;
    assert!(e.contains("createdate is read-only"), "{e}");
    let e = error(
        "MERGE INTO crm.contacts AS t USING (SELECT 'A' AS firstname) AS s ON t.firstname = s.firstname WHEN MATCHED THEN UPDATE SET firstname = s.firstname",
    )
    .await;
    assert!(
        e.contains("not 'firstname'") && e.contains("external_id"),
        "{e}"
    );
    // List memberships are written by syncs, not read: the error says where to read instead.
    let e = error("SELECT email FROM crm.list_members LIMIT 1").await;
    assert!(
        e.contains("written by syncs only (list members, associations)"),
        "{e}"
    );
    let e = error("INSERT INTO crm.widgets SELECT 1 AS x").await;
    assert!(e.to_lowercase().contains("widgets"), "{e}");
    assert_eq!(
        fake.observed(|o| o.requests.len()),
        0,
        "no batch call was made"
    );

    let described = query(&engine, "DESCRIBE crm.contacts").await;
    assert!(described.contains("lifecyclestage"), "{described}");
    assert!(
        described.contains("subscriber, lead, customer, evangelist"),
        "{described}"
    );
    assert!(described.contains("external_id"), "{described}");

    // SHOW OBJECTS: the objects with their keys, the unique properties records can be matched
    // by, and the modes; read from the properties API, never by a batch call.
    let objects = query(&engine, "SHOW OBJECTS IN crm").await;
    let contacts = objects
        .lines()
        .find(|l| l.contains("| contacts "))
        .unwrap_or_else(|| panic!("{objects}"));
    assert!(
        contacts.contains("email")
            && contacts.contains("external_id")
            && contacts.contains("mirror"),
        "{objects}"
    );
    assert!(objects.contains("| companies "), "{objects}");
    assert_eq!(
        fake.observed(|o| o.requests.len()),
        0,
        "a batch call was made"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_storm_loses_nothing() {
    let fake = FakeHubspot::start(Script {
        limit: Some((5, Duration::from_millis(500))),
        ..Script::default()
    })
    .await;
    // Paced far faster than the fake allows: the 429s and headers must slow it down.
    let engine = connect(&fake, ", rate_limit '100', batch_size '10'").await;
    model(&engine, &people(300)).await;
    let summary = write(&engine, UPSERT).await;
    assert_eq!((summary.rows_written, summary.rows_rejected), (300, 0));
    assert_eq!(fake.records("contacts").len(), 300);
    assert!(fake.max_requests_in(Duration::from_millis(500)) <= 5);
    let delivery = summary.delivery.unwrap();
    assert_eq!(delivery.requests - delivery.throttled, 30, "{delivery:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_token_stops_at_once_and_is_never_printed() {
    let fake = FakeHubspot::start(Script::default()).await;
    let engine = super::support::engine();
    engine
        .run_sql(&format!(
            "CREATE CONNECTION crm TYPE hubspot OPTIONS (token 'pat-na1-WRONG-secret', base_url '{}')",
            fake.url
        ))
        .await
        .unwrap();
    let e = engine.run_sql(UPSERT).await.unwrap_err().to_string();
    assert!(
        e.contains("rejected the token") && e.contains("INVALID_AUTHENTICATION"),
        "{e}"
    );
    assert!(!e.contains("WRONG-secret"), "{e}");

    // Token revoked between planning and writing: one batch call, no retry storm.
    let engine = connect(&fake, "").await;
    model(&engine, &people(300)).await;
    engine
        .run_sql("SELECT * FROM crm.contacts LIMIT 0")
        .await
        .ok();
    fake.script(|s| s.token = "rotated".into());
    let e = engine.run_sql(UPSERT).await.unwrap_err().to_string();
    assert!(e.contains("rejected the token"), "{e}");
    assert!(
        fake.calls("upsert") <= 3,
        "one call per batch at most, none retried: {}",
        fake.calls("upsert")
    );
    let explain = query(&engine, &format!("EXPLAIN {UPSERT}")).await;
    assert!(
        explain.contains("HubspotSink") && !explain.contains(TOKEN),
        "{explain}"
    );
    let shown = query(&engine, "SHOW CONNECTIONS").await;
    assert!(!shown.contains(TOKEN), "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daily_quota_stops_cleanly_and_the_next_day_resumes() {
    let fake = FakeHubspot::start(Script {
        // The properties call and two batch calls, then the day is used up.
        daily: Some(3),
        ..Script::default()
    })
    .await;
    let engine = connect(&fake, ", concurrency '1'").await;
    model(&engine, &people(450)).await;
    let e = engine.run_sql(UPSERT).await.unwrap_err().to_string();
    assert!(
        e.contains("daily API limit") && e.contains("committed"),
        "{e}"
    );
    assert_eq!(fake.records("contacts").len(), 200);
    let runs = query(&engine, "SELECT status, inserted FROM sluice.runs").await;
    assert!(runs.contains("200"), "{runs}");

    fake.new_day();
    let resumed = write(&engine, UPSERT).await;
    assert_eq!((resumed.rows_written, resumed.rows_rejected), (250, 0));
    assert_eq!(fake.records("contacts").len(), 450);
    assert_eq!(
        fake.calls("upsert"),
        2 + 3,
        "2 accepted, then the other 250 the next day"
    );
    assert_eq!(
        fake.observed(|o| o.throttled),
        1,
        "one call refused with DAILY, none retried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_faults_are_retried_and_merged_records_reported() {
    let fake = FakeHubspot::start(Script {
        faults: [
            Fault::Status(502, None),
            Fault::Status(423, None),
            Fault::SilentEmpty,
            Fault::Status(477, Some(0)),
        ]
        .into(),
        merged: vec!["user5@example.com".into()],
        ..Script::default()
    })
    .await;
    let engine = connect(&fake, ", concurrency '1'").await;
    model(&engine, &people(120)).await;
    let summary = write(&engine, UPSERT).await;
    assert_eq!((summary.rows_written, summary.rows_rejected), (119, 1));
    assert_eq!(summary.rejects[0].code, "MISSING_FROM_RESULTS");
    assert_eq!(summary.delivery.unwrap().retries, 4);
    assert_eq!(fake.records("contacts").len(), 120);

    // A missing scope stops the sync and names the scope.
    fake.script(|s| {
        s.merged.clear();
        s.missing_scope = true;
    });
    model(&engine, &people(121)).await;
    let e = engine.run_sql(UPSERT).await.unwrap_err().to_string();
    assert!(e.contains("crm.objects.contacts.write"), "{e}");
    // sluice.runs keeps the failure's facts for alerts: where, the status and HubSpot's code.
    let facts = query(
        &engine,
        "SELECT mode, error_connection, error_object, error_status, error_code FROM sluice.runs WHERE status = 'failed'",
    )
    .await;
    for fact in ["upsert", "crm", "contacts", "403", "MISSING_SCOPES"] {
        assert!(facts.contains(fact), "{fact} in {facts}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matches_by_a_unique_property_of_a_custom_key() {
    let fake = FakeHubspot::start(Script::default()).await;
    let engine = connect(&fake, "").await;
    let merge = |name: &str| {
        format!(
            "MERGE INTO crm.companies AS t
               USING (SELECT * FROM (VALUES ('A-1', 'Acme'), ('A-2', '{name}')) AS v(ref, name)) AS s
               ON t.account_ref = s.ref
             WHEN MATCHED THEN UPDATE SET name = s.name
             WHEN NOT MATCHED THEN INSERT (account_ref, name) VALUES (s.ref, s.name)"
        )
    };
    let first = write(&engine, &merge("Globex")).await;
    assert_eq!(first.rows_written, 2);
    let second = write(&engine, &merge("Globex Corp")).await;
    assert_eq!(second.rows_written, 1);
    assert_eq!(
        fake.property("companies", "account_ref", "A-2", "name")
            .as_deref(),
        Some("Globex Corp")
    );
    assert_eq!(fake.records("companies").len(), 2);
    assert_eq!(fake.calls("upsert"), 2, "upserts by idProperty account_ref");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_sync_counts_the_calls_and_sends_nothing() {
    let fake = FakeHubspot::start(Script::default()).await;
    let engine = connect(&fake, ", tier 'pro'").await;
    model(&engine, &people(250)).await;
    engine
        .run_sql(&format!("CREATE SYNC contacts_sync AS {UPSERT}"))
        .await
        .unwrap();
    let report = match engine
        .run_sql("EXPLAIN SYNC contacts_sync")
        .await
        .unwrap()
        .pop()
    {
        Some(Outcome::DryRun(r)) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!((report.counts.inserts, report.plan.requests()), (250, 3));
    assert!(
        report.rate_limit.is_some_and(|r| (r - 18.43).abs() < 0.01),
        "{:?}",
        report.rate_limit
    );
    let sample = &report.plan.ops[0].samples[0];
    assert!(sample.contains("\"churn_score\":\"0.5\""), "{sample}");
    assert_eq!(
        fake.observed(|o| o.requests.len()),
        0,
        "a dry run sends nothing"
    );
    let run = write(&engine, "RUN SYNC contacts_sync").await;
    assert_eq!(run.rows_written, 250);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_memberships_follow_the_model() {
    let fake = FakeHubspot::start(Script::default()).await;
    let vip = fake.seed_list("VIP");
    let engine = connect(&fake, "").await;
    model(&engine, &people(4)).await;
    let mirror = "MERGE INTO crm.list_members AS t
          USING (SELECT CASE WHEN churn_score > 2 THEN 'Churn risk' ELSE 'VIP' END AS list, email, firstname FROM people) AS s
          ON t.list = s.list AND t.email = s.email
        WHEN MATCHED THEN UPDATE SET firstname = s.firstname
        WHEN NOT MATCHED THEN INSERT (list, email, firstname) VALUES (s.list, s.email, s.firstname)
        WHEN NOT MATCHED BY SOURCE THEN DELETE";
    let first = write(&engine, mirror).await;
    assert_eq!((first.rows_written, first.rows_rejected), (4, 0));
    assert_eq!(
        fake.list_emails("VIP"),
        ["user0@example.com", "user1@example.com"]
    );
    assert_eq!(
        fake.list_emails("Churn risk"),
        ["user2@example.com", "user3@example.com"],
        "a MANUAL list is created when missing"
    );
    assert_eq!(
        fake.records("contacts").len(),
        4,
        "the contacts were upserted first"
    );
    assert_eq!(fake.observed(|o| o.lists.len()), 2);
    // Every call the write made counts among its requests: one contact upsert, the lists' lookup
    // by name (VIP found; Churn risk not found, then created) and one membership call per list.
    assert_eq!(fake.calls("upsert"), 1);
    assert_eq!(first.delivery.unwrap().requests, 1 + 3 + 2);

    // One member leaves the model: removed from its list by the record id the state holds.
    model(&engine, &people(3)).await;
    let second = write(&engine, mirror).await;
    assert_eq!(second.sync.as_ref().unwrap().counts.deletes, 1);
    assert_eq!(fake.list_emails("Churn risk"), ["user2@example.com"]);
    assert_eq!(
        fake.records("contacts").len(),
        4,
        "leaving a list does not delete the contact"
    );
    assert_eq!(fake.calls("read"), 0);

    // Nothing changed: no call at all.
    let before = fake.observed(|o| o.requests.len());
    let third = write(&engine, mirror).await;
    assert_eq!(third.rows_written, 0);
    assert_eq!(fake.observed(|o| o.requests.len()), before);

    // A list named by its id.
    let by_id = write(
        &engine,
        &format!("INSERT INTO crm.list_members SELECT '{vip}' AS list, 'new@example.com' AS email"),
    )
    .await;
    assert_eq!(by_id.rows_written, 1);
    assert_eq!(
        fake.list_emails("VIP"),
        ["new@example.com", "user0@example.com", "user1@example.com"]
    );
    assert_eq!(fake.observed(|o| o.lists.len()), 2, "no list was created");
}

/// Two model rows whose emails differ only in case are one record to HubSpot, which refuses a
/// batch holding an id twice: they go in separate calls, in order, and nothing is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_hubspot_sees_as_equal_never_share_a_batch() {
    let fake = FakeHubspot::start(Script::default()).await;
    let engine = connect(&fake, ", concurrency '1'").await;
    model(
        &engine,
        "('Dup@example.com', 'First', 1.0, 'lead'), ('x@example.com', 'X', 1.0, 'lead'), ('dup@example.com', 'Second', 2.0, 'lead')",
    )
    .await;
    let summary = write(&engine, UPSERT).await;
    assert_eq!((summary.rows_written, summary.rows_rejected), (3, 0));
    fake.observed(|o| {
        assert_eq!(o.requests.len(), 2, "the repeated key starts a second call");
        assert!(o.requests.iter().all(|r| r.status == 200));
    });
    assert_eq!(fake.records("contacts").len(), 2);
    assert_eq!(
        fake.property("contacts", "email", "dup@example.com", "firstname")
            .as_deref(),
        Some("Second"),
        "the later row wins"
    );
}

/// Control-plane calls (here the properties describe) honour the connection's max_attempts,
/// as data calls do: a user who sets max_attempts '2' gets two tries, not six.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_describe_is_tried_max_attempts_times() {
    let fake = FakeHubspot::start(Script {
        properties_faults: 100,
        ..Default::default()
    })
    .await;
    let engine = super::support::engine();
    let err = engine
        .run_sql(&format!(
            "CREATE CONNECTION crm TYPE hubspot OPTIONS (token '{TOKEN}', base_url '{}', max_attempts '2');
             DESCRIBE crm.contacts",
            fake.url
        ))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("gave up after 2 attempts"), "{err}");
    assert_eq!(fake.observed(|o| o.properties_calls), 2);
}

/// Issue 19: a sample run against HubSpot sends the first records by key, shows the batch
/// request and HubSpot's answer (never the token, which travels in a header) and commits only
/// their state; the next run sends the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sample_run_shows_the_request_and_answer_and_commits_only_its_records() {
    let fake = FakeHubspot::start(Script::default()).await;
    let engine = connect(&fake, "").await;
    model(&engine, &people(5)).await;
    engine
        .run_sql(&format!("CREATE SYNC contacts AS {UPSERT}"))
        .await
        .unwrap();
    let sample = write(&engine, "RUN SYNC contacts SAMPLE 2").await;
    assert_eq!((sample.rows_written, sample.rows_rejected), (2, 0));
    assert_eq!(sample.sync.as_ref().unwrap().sampled, Some((2, 5)));
    assert_eq!(fake.records("contacts").len(), 2);
    let [exchange] = sample.exchanges.as_slice() else {
        panic!("one request: {:?}", sample.exchanges);
    };
    assert_eq!(exchange.method, "POST");
    assert!(
        exchange
            .url
            .ends_with("/crm/v3/objects/contacts/batch/upsert"),
        "{}",
        exchange.url
    );
    assert!(
        exchange.request.contains("user0@example.com")
            && exchange.request.contains("user1@example.com")
            && !exchange.request.contains("user2@example.com"),
        "{}",
        exchange.request
    );
    assert_eq!(exchange.status, Some(200));
    assert!(
        exchange.response.contains("\"results\""),
        "{}",
        exchange.response
    );
    let shown = sample.to_string();
    assert!(!shown.contains(TOKEN), "{shown}");

    let rest = write(&engine, "RUN SYNC contacts").await;
    assert_eq!(rest.rows_written, 3);
    assert_eq!(fake.records("contacts").len(), 5);
    assert_eq!(write(&engine, "RUN SYNC contacts").await.rows_written, 0);
}

/// Issue 19: HubSpot objects are tables to read too, through HubSpot's own read APIs: pages of
/// `GET /crm/v3/objects/{object}` with only the selected properties and the LIMIT pushed down,
/// `batch/read` for a filter on a property that identifies records, typed values, and a drift
/// check between the model and HubSpot in plain SQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_are_read_with_projection_limit_and_key_lookups_pushed_down() {
    let fake = FakeHubspot::start(Script::default()).await;
    let engine = connect(&fake, "").await;
    model(&engine, &people(250)).await;
    assert_eq!(write(&engine, UPSERT).await.rows_written, 250);

    // LIMIT: one page of 10, not a scan of 250.
    let first = query(
        &engine,
        "SELECT email, firstname FROM crm.contacts LIMIT 10",
    )
    .await;
    assert_eq!(
        first.lines().filter(|l| l.contains("@example.com")).count(),
        10,
        "{first}"
    );
    assert_eq!(fake.list_calls("contacts"), 1);

    // A filter HubSpot cannot apply: pages of 100 through every record, filtered here.
    let count = query(
        &engine,
        "SELECT count(*) AS n, sum(churn_score) AS total FROM crm.contacts WHERE lifecyclestage = 'lead'",
    )
    .await;
    assert!(
        count.contains("| 250 ") && count.contains("| 31250.0 "),
        "{count}"
    );
    assert_eq!(fake.list_calls("contacts"), 1 + 3);

    // Key lookups: batch/read by email, then SQL's own comparison (HubSpot ignores case).
    let reads = fake.calls("read");
    let sql = "SELECT email, churn_score FROM crm.contacts WHERE email IN ('user3@example.com', 'USER4@example.com', 'nobody@example.com') ORDER BY email";
    let found = query(&engine, sql).await;
    assert!(found.contains("| user3@example.com | 3.5 "), "{found}");
    assert!(!found.contains("user4"), "{found}");
    assert_eq!(fake.calls("read"), reads + 1);
    assert_eq!(fake.list_calls("contacts"), 4, "no scan for a lookup");
    let plan = query(&engine, &format!("EXPLAIN {sql}")).await;
    assert!(
        plan.contains("HubspotScanExec: connection=crm object=contacts properties=[email, churn_score] batch/read by email (3 values)"),
        "{plan}"
    );

    // Drift: what the model says and HubSpot holds differ where a rep edited a record.
    let drift =
        "SELECT email, firstname FROM crm.contacts EXCEPT SELECT email, firstname FROM people";
    assert!(!query(&engine, drift).await.contains("@example.com"));
    let (id, _) = fake.records("contacts")[7].clone();
    fake.edit("contacts", id, "firstname", json!("Edited"));
    let drifted = query(&engine, drift).await;
    assert!(drifted.contains("| Edited "), "{drifted}");
    assert_eq!(
        drifted
            .lines()
            .filter(|l| l.contains("@example.com"))
            .count(),
        1
    );

    // A CRM object feeds a sync like any table: only what changed is sent again.
    let copy = "INSERT INTO crm.contacts SELECT email, upper(firstname) AS firstname FROM crm.contacts WHERE email IN ('user1@example.com', 'user2@example.com')";
    assert_eq!(write(&engine, copy).await.rows_written, 2);
    assert_eq!(
        fake.property("contacts", "email", "user1@example.com", "firstname")
            .as_deref(),
        Some("USER1")
    );
    assert_eq!(write(&engine, copy).await.rows_written, 0);
}

/// Issue 19: associations as an object of the connection. `crm.contact_company` is matched by
/// both sides' keys; record ids are read at run time (so records an earlier statement of the
/// same run created are found); a label is sent with its type; a mirror removes associations
/// that left the model; a record HubSpot lacks and an unknown label are rejects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn associations_link_records_created_earlier_in_the_same_run() {
    let fake = FakeHubspot::start(Script::default()).await;
    let acme = fake.seed("companies", json!({"name": "Acme", "account_ref": "A-1"}));
    let engine = connect(&fake, "").await;
    let described = query(&engine, "DESCRIBE crm.contact_company").await;
    assert!(
        described.contains("contact_email") && described.contains("company_account_ref"),
        "{described}"
    );
    // One run: the contacts are created, then linked by the next statement.
    model(&engine, &people(3)).await;
    engine
        .run_sql(&format!(
            "{UPSERT};
             CREATE SYNC links AS MERGE INTO crm.contact_company AS t
               USING (SELECT email, 'A-1' AS ref, CASE WHEN email = 'user0@example.com' THEN 'Billing contact' END AS label FROM people) AS s
               ON t.contact_email = s.email AND t.company_account_ref = s.ref
             WHEN MATCHED THEN UPDATE SET label = s.label
             WHEN NOT MATCHED THEN INSERT (contact_email, company_account_ref, label) VALUES (s.email, s.ref, s.label)
             WHEN NOT MATCHED BY SOURCE THEN DELETE;
             RUN SYNC links;"
        ))
        .await
        .unwrap();
    let id = |email: &str| {
        fake.records("contacts")
            .into_iter()
            .find(|(_, p)| p.get("email").and_then(|v| v.as_str()) == Some(email))
            .map(|(id, _)| id)
            .unwrap()
    };
    let mut linked = fake.associations("contacts", "companies");
    linked.sort();
    assert_eq!(
        linked,
        [
            (id("user0@example.com"), acme, Some(36)),
            (id("user1@example.com"), acme, None),
            (id("user2@example.com"), acme, None),
        ]
    );
    assert_eq!(write(&engine, "RUN SYNC links").await.rows_written, 0);

    // A contact that left the model loses its association; one HubSpot lacks and an unknown
    // label are rejects, kept and reported.
    model(
        &engine,
        "('user0@example.com', 'User0', 0.5, 'lead'), ('user1@example.com', 'User1', 1.5, 'lead'),
         ('ghost@example.com', 'Ghost', 9.5, 'lead')",
    )
    .await;
    let run = write(&engine, "RUN SYNC links").await;
    assert_eq!(
        (run.rows_written, run.rows_rejected),
        (1, 1),
        "{:?}",
        run.rejects
    );
    assert_eq!(run.rejects[0].code, "NOT_FOUND");
    assert!(
        run.rejects[0].message.contains("ghost@example.com"),
        "{}",
        run.rejects[0].message
    );
    assert_eq!(fake.associations("contacts", "companies").len(), 2);
    // A dry run says what it would do (the rejected record is tried again) and calls nothing.
    let calls = fake.observed(|o| o.requests.len());
    let mut explained = engine.run_sql("EXPLAIN SYNC links").await.unwrap();
    let plan = match explained.pop() {
        Some(Outcome::DryRun(r)) => r.to_string(),
        other => panic!("{other:?}"),
    };
    assert!(plan.contains("associate: 1 record in 1 request"), "{plan}");
    assert_eq!(fake.observed(|o| o.requests.len()), calls);
    let labeled = write(
        &engine,
        "INSERT INTO crm.contact_company SELECT 'user1@example.com' AS contact_email, 'A-1' AS company_account_ref, 'Partner' AS label",
    )
    .await;
    assert_eq!(labeled.rows_rejected, 1);
    assert!(
        labeled.rejects[0]
            .message
            .contains("'Partner' is not an association label")
            && labeled.rejects[0].message.contains("Billing contact"),
        "{}",
        labeled.rejects[0].message
    );
}
