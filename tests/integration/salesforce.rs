//! The Salesforce destination against the fake org (faithful to ../shared/api/destinations.md
//! §1): the three OAuth flows, describe-driven planning, every mode across consecutive runs on
//! sObject Collections and on Bulk API 2.0, the switch between them, partial failures, shuffled
//! Bulk results, an expiring session, quota exhaustion and the resume after it, hostile values.

use std::collections::VecDeque;
use std::time::Duration;

use sluice::{Engine, Outcome};

use super::support::{error, query, write};

use super::fakes::salesforce::{
    CLIENT_ID, CLIENT_SECRET, FakeSalesforce, JWT_PRIVATE_KEY, REFRESH_TOKEN, Script, USERNAME,
};

/// A connection with the client credentials flow (the fake's URL is its My Domain).
async fn connect(fake: &FakeSalesforce, extra: &str) -> Engine {
    let engine = super::support::engine();
    engine
        .run_sql(&format!(
            "CREATE CONNECTION sf TYPE salesforce OPTIONS (login_url '{}', client_id '{CLIENT_ID}', client_secret '{CLIENT_SECRET}', poll_interval '20ms'{extra})",
            fake.url
        ))
        .await
        .unwrap();
    engine
}

/// Replaces the model: `n` leads, `C-0`…, with `edit` applied to the VALUES text.
async fn model(engine: &Engine, n: usize, edit: impl Fn(String) -> String) {
    let rows = (0..n)
        .map(|i| format!("('C-{i}', 'Last{i}', 'user{i}@example.com', {i}.5)"))
        .collect::<Vec<_>>()
        .join(", ");
    engine
        .run_sql(&format!(
            "CREATE OR REPLACE TABLE leads AS SELECT * FROM (VALUES {}) AS v(id, last_name, email, score)",
            edit(rows)
        ))
        .await
        .unwrap();
}

const UPSERT: &str = "INSERT INTO sf.contact SELECT id AS External_Id__c, last_name AS LastName, email AS Email, score AS Lead_Score__c FROM leads";

fn same(fake: &FakeSalesforce, n: usize) {
    let records = fake.records("Contact");
    assert_eq!(records.len(), n, "the org holds exactly the model");
    for i in 0..n {
        let key = format!("C-{i}");
        assert_eq!(
            fake.value("Contact", "External_Id__c", &key, "LastName")
                .as_deref(),
            Some(format!("Last{i}").as_str()),
            "{key}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_upserts_only_what_changed_across_runs() {
    let fake = FakeSalesforce::start(Script::default()).await;
    let engine = connect(&fake, "").await;
    model(&engine, 450, |r| r).await;

    let first = write(&engine, UPSERT).await;
    assert_eq!((first.rows_written, first.rows_rejected), (450, 0));
    assert_eq!(
        fake.calls("collections:upsert"),
        3,
        "450 records, 200 per call"
    );
    assert_eq!(fake.calls("jobs:create"), 0, "under the Bulk threshold");
    same(&fake, 450);
    assert_eq!(
        fake.value("Contact", "External_Id__c", "C-7", "Lead_Score__c")
            .as_deref(),
        Some("7.5"),
        "numbers travel as numbers"
    );

    // One changed field: one call carrying that field only.
    model(&engine, 450, |r| r.replace("'Last7'", "'Seven'")).await;
    let second = write(&engine, UPSERT).await;
    assert_eq!(second.rows_written, 1);
    assert_eq!(fake.calls("collections:upsert"), 4);
    assert_eq!(
        fake.value("Contact", "External_Id__c", "C-7", "LastName")
            .as_deref(),
        Some("Seven")
    );

    // Nothing changed: nothing sent.
    let third = write(&engine, UPSERT).await;
    assert_eq!(third.rows_written, 0);
    assert_eq!(fake.calls("collections:"), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_upserts_and_mirror_deletes_across_runs_with_shuffled_results() {
    let fake = FakeSalesforce::start(Script::default()).await;
    let engine = connect(&fake, ", api 'bulk'").await;
    model(&engine, 300, |r| r).await;
    let mirror = "MERGE INTO sf.contact AS t USING leads AS s ON t.External_Id__c = s.id
        WHEN MATCHED THEN UPDATE SET LastName = s.last_name, Email = s.email
        WHEN NOT MATCHED THEN INSERT (External_Id__c, LastName, Email) VALUES (s.id, s.last_name, s.email)
        WHEN NOT MATCHED BY SOURCE THEN DELETE";

    let first = write(&engine, mirror).await;
    assert_eq!((first.rows_written, first.rows_rejected), (300, 0));
    assert_eq!(fake.calls("jobs:create"), 1);
    assert_eq!(fake.calls("collections:"), 0);
    same(&fake, 300);

    // Results come back shuffled; each record's Id was still matched to its key: deleting by
    // the Ids in state removes exactly the records that left the model.
    model(&engine, 290, |r| r.replace("'Last3'", "'Three'")).await;
    let ids_before: Vec<String> = (290..300)
        .map(|i| {
            fake.find("Contact", "External_Id__c", &format!("C-{i}"))
                .unwrap()
                .0
        })
        .collect();
    let second = write(&engine, mirror).await;
    assert_eq!(second.rows_written, 11, "1 update + 10 deletes");
    assert_eq!(fake.calls("query"), 0, "delete Ids come from state");
    assert_eq!(fake.records("Contact").len(), 290);
    assert_eq!(
        fake.value("Contact", "External_Id__c", "C-3", "LastName")
            .as_deref(),
        Some("Three")
    );
    for id in ids_before {
        assert!(fake.records("Contact").iter().all(|(i, _)| *i != id));
    }
    // The update job carried Id and the changed field only (email unchanged: empty cell).
    assert!(fake.calls("jobs:create") >= 3);

    // Re-added record is created again.
    model(&engine, 291, |r| r.replace("'Three'", "'Last3'")).await;
    let third = write(&engine, mirror).await;
    assert_eq!(third.rows_written, 2);
    same(&fake, 291);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switches_to_bulk_above_the_threshold() {
    let fake = FakeSalesforce::start(Script::default()).await;
    let engine = connect(&fake, ", bulk_threshold '5'").await;
    model(&engine, 5, |r| r).await;
    assert_eq!(write(&engine, UPSERT).await.rows_written, 5);
    assert_eq!(
        (fake.calls("collections:upsert"), fake.calls("jobs:create")),
        (1, 0),
        "5 changes: REST"
    );
    model(&engine, 11, |r| r).await;
    assert_eq!(write(&engine, UPSERT).await.rows_written, 6);
    assert_eq!(
        (fake.calls("collections:upsert"), fake.calls("jobs:create")),
        (1, 1),
        "6 changes: one Bulk job"
    );
    same(&fake, 11);
    // Bulk's calls: create, upload, close, polls, successful results (no failures: no more).
    let polls = fake.calls("jobs:poll");
    assert_eq!(fake.calls("jobs:"), 4 + polls);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_failures_on_both_apis_are_rejects_retried_when_fixed() {
    for api in ["rest", "bulk"] {
        let fake = FakeSalesforce::start(Script::default()).await;
        let engine = connect(&fake, &format!(", api '{api}'")).await;
        model(&engine, 20, |r| {
            r.replace("'user3@example.com'", "'not-an-email'")
                .replace("'Last5'", "NULL")
        })
        .await;
        let first = write(&engine, UPSERT).await;
        assert_eq!((first.rows_written, first.rows_rejected), (18, 2), "{api}");
        let rejects = query(
            &engine,
            "SELECT key, operation, error_code, error_message FROM sluice.rejects ORDER BY key",
        )
        .await;
        assert!(
            rejects.contains("C-3") && rejects.contains("INVALID_EMAIL_ADDRESS"),
            "{api}: {rejects}"
        );
        assert!(
            rejects.contains("C-5")
                && rejects.contains("REQUIRED_FIELD_MISSING")
                && rejects.contains("LastName"),
            "{api}: {rejects}"
        );
        assert_eq!(fake.records("Contact").len(), 18);

        model(&engine, 20, |r| r).await;
        let fixed = write(&engine, UPSERT).await;
        assert_eq!((fixed.rows_written, fixed.rows_rejected), (2, 0), "{api}");
        same(&fake, 20);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_on_both_apis() {
    for api in ["rest", "bulk"] {
        let fake = FakeSalesforce::start(Script {
            concurrent_faults: 1,
            ..Script::default()
        })
        .await;
        fake.script(|s| {
            s.record_faults.insert(
                "c-4".into(),
                VecDeque::from(["UNABLE_TO_LOCK_ROW".to_string()]),
            );
        });
        let engine = connect(&fake, &format!(", api '{api}'")).await;
        model(&engine, 10, |r| r).await;
        let summary = write(&engine, UPSERT).await;
        assert_eq!(
            (summary.rows_written, summary.rows_rejected),
            (10, 0),
            "{api}"
        );
        same(&fake, 10);
        if api == "bulk" {
            assert_eq!(
                fake.calls("jobs:create"),
                2,
                "the locked row goes again in a new job"
            );
        } else {
            assert_eq!(
                fake.calls("collections:upsert"),
                2,
                "only the locked record is sent again"
            );
            let retried = fake.observed(|o| {
                o.requests
                    .iter()
                    .rfind(|r| r.kind == "collections:upsert")
                    .unwrap()
                    .records
            });
            assert_eq!(retried, 1);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_only_create_only_and_delete_on_both_apis() {
    for api in ["rest", "bulk"] {
        let fake = FakeSalesforce::start(Script::default()).await;
        fake.seed(
            "Contact",
            serde_json::json!({"External_Id__c": "C-1", "LastName": "Old", "HasOptedOutOfEmail": false}),
        );
        let engine = connect(&fake, &format!(", api '{api}'")).await;
        model(&engine, 4, |r| r).await;
        // Calls that wrote: collections calls of a kind (REST), or Bulk jobs (each kind).
        let calls = |kind: &str| {
            if api == "rest" {
                fake.calls(&format!("collections:{kind}"))
            } else {
                fake.calls("jobs:create")
            }
        };

        // Update-only: the existing record is found by a query on the external id and
        // updated; the others are not in Salesforce and are rejected.
        let update = "MERGE INTO sf.contact t USING leads s ON t.External_Id__c = s.id
            WHEN MATCHED THEN UPDATE SET LastName = s.last_name";
        let updated = write(&engine, update).await;
        assert_eq!(
            (updated.rows_written, updated.rows_rejected),
            (1, 3),
            "{api}"
        );
        assert!(
            updated.rejects.iter().all(|r| r.code == "NOT_FOUND"),
            "{api}: {:?}",
            updated.rejects
        );
        assert_eq!(fake.calls("query"), 1, "{api}");
        assert_eq!(calls("update"), 1, "{api}");
        assert_eq!(
            fake.value("Contact", "External_Id__c", "C-1", "LastName")
                .as_deref(),
            Some("Last1"),
            "{api}"
        );
        assert_eq!(
            fake.records("Contact").len(),
            1,
            "{api}: update-only creates nothing"
        );

        // Create-only: the existing record's external id is unique in Salesforce.
        let create = "MERGE INTO sf.contact t USING leads s ON t.External_Id__c = s.id
            WHEN NOT MATCHED THEN INSERT (External_Id__c, LastName) VALUES (s.id, s.last_name)";
        let created = write(&engine, create).await;
        assert_eq!(
            (created.rows_written, created.rows_rejected),
            (3, 1),
            "{api}"
        );
        assert_eq!(created.rejects[0].code, "DUPLICATE_VALUE", "{api}");
        assert_eq!(calls("create"), if api == "rest" { 1 } else { 2 }, "{api}");
        assert_eq!(fake.records("Contact").len(), 4, "{api}");

        // DELETE by external id: Ids looked up, records deleted; a key Salesforce lacks is done.
        let deleted = write(
            &engine,
            "DELETE FROM sf.contact WHERE External_Id__c IN ('C-0', 'C-2', 'C-99')",
        )
        .await;
        assert_eq!(deleted.rows_rejected, 0, "{api}");
        assert_eq!(fake.records("Contact").len(), 2, "{api}");
        assert!(
            fake.find("Contact", "External_Id__c", "C-0").is_none(),
            "{api}"
        );
        if api == "rest" {
            assert_eq!(fake.calls("collections:delete"), 1);
        } else {
            assert_eq!(fake.calls("jobs:create"), 3);
            assert_eq!(fake.calls("collections:"), 0, "bulk only");
        }
    }
}

/// Issue 19: "set on create only" on both APIs. A matched contact gets only the changed fields
/// of UPDATE SET; the email is written when the contact is created and a rep's later edit is
/// never overwritten. A change only to the email sends nothing and is remembered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_clauses_keep_their_fields_on_both_apis() {
    for api in ["rest", "bulk"] {
        let fake = FakeSalesforce::start(Script::default()).await;
        let engine = connect(&fake, &format!(", api '{api}'")).await;
        let merge = "MERGE INTO sf.contact t USING leads s ON t.External_Id__c = s.id
            WHEN MATCHED THEN UPDATE SET Lead_Score__c = s.score
            WHEN NOT MATCHED THEN INSERT (External_Id__c, LastName, Email, Lead_Score__c)
                                  VALUES (s.id, s.last_name, s.email, s.score)";
        model(&engine, 3, |r| r).await;
        assert_eq!(write(&engine, merge).await.rows_written, 3, "{api}");
        let value = |key: &str, field: &str| fake.value("Contact", "External_Id__c", key, field);
        assert_eq!(
            value("C-0", "Email").as_deref(),
            Some("user0@example.com"),
            "{api}"
        );

        // A rep fixes C-0's email; the model changes every email and C-0's and C-1's scores.
        let (id, _) = fake.find("Contact", "External_Id__c", "C-0").unwrap();
        fake.edit(
            "Contact",
            &id,
            "Email",
            serde_json::json!("rep@example.com"),
        );
        let emails = |r: String| r.replace("@example.com", "@new.example.com");
        model(&engine, 3, |r| {
            emails(r).replace("0.5)", "9.5)").replace("1.5)", "8.5)")
        })
        .await;
        let run = write(&engine, merge).await;
        assert_eq!((run.rows_written, run.rows_rejected), (2, 0), "{api}");
        assert_eq!(
            value("C-0", "Lead_Score__c").as_deref(),
            Some("9.5"),
            "{api}"
        );
        assert_eq!(
            value("C-0", "Email").as_deref(),
            Some("rep@example.com"),
            "{api}"
        );
        assert_eq!(
            value("C-1", "Email").as_deref(),
            Some("user1@example.com"),
            "{api}"
        );
        assert_eq!(
            value("C-2", "Email").as_deref(),
            Some("user2@example.com"),
            "{api}"
        );
        assert_eq!(value("C-1", "LastName").as_deref(), Some("Last1"), "{api}");

        // Remembered without being sent: a rerun sends nothing.
        let calls = fake.api_calls();
        assert_eq!(write(&engine, merge).await.rows_written, 0, "{api}");
        assert_eq!(fake.api_calls(), calls, "{api}: nothing to send, no call");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_three_oauth_flows_and_clear_token_errors() {
    let fake = FakeSalesforce::start(Script::default()).await;
    let key = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(key.path(), JWT_PRIVATE_KEY).unwrap();
    let flows = [
        format!(
            "client_id '{CLIENT_ID}', refresh_token '{REFRESH_TOKEN}', client_secret '{CLIENT_SECRET}'"
        ),
        format!(
            "client_id '{CLIENT_ID}', username '{USERNAME}', private_key file('{}')",
            key.path().display()
        ),
        format!("client_id '{CLIENT_ID}', client_secret '{CLIENT_SECRET}'"),
    ];
    for (i, flow) in flows.iter().enumerate() {
        let engine = super::support::engine();
        engine
            .run_sql(&format!(
                "CREATE CONNECTION sf TYPE salesforce OPTIONS (login_url '{}', {flow})",
                fake.url
            ))
            .await
            .unwrap();
        model(&engine, 2, |r| r).await;
        assert_eq!(write(&engine, UPSERT).await.rows_rejected, 0, "{flow}");
        let grant = fake.observed(|o| o.grants[i].clone());
        assert_eq!(
            grant,
            [
                "refresh_token",
                "urn:ietf:params:oauth:grant-type:jwt-bearer",
                "client_credentials"
            ][i]
        );
    }

    // A wrong secret: the flow and Salesforce's code, never the secret.
    let engine = super::support::engine();
    engine
        .run_sql(&format!(
            "CREATE CONNECTION sf TYPE salesforce OPTIONS (login_url '{}', client_id '{CLIENT_ID}', client_secret 'wrong-s3cret-value')",
            fake.url
        ))
        .await
        .unwrap();
    let e = error(&engine, "DESCRIBE sf.contact").await;
    assert!(
        e.contains("client credentials flow") && e.contains("invalid_client"),
        "{e}"
    );
    assert!(!e.contains("wrong-s3cret-value"), "{e}");
    let shown = query(&engine, "SHOW CONNECTIONS").await;
    assert!(
        !shown.contains("wrong-s3cret-value") && !shown.contains(CLIENT_SECRET),
        "{shown}"
    );

    // Nor in EXPLAIN of a planned sync.
    let engine = connect(&fake, "").await;
    model(&engine, 2, |r| r).await;
    let plan = query(&engine, &format!("EXPLAIN {UPSERT}")).await;
    assert!(plan.contains("SalesforceSink"), "{plan}");
    assert!(
        !plan.contains(CLIENT_SECRET) && !plan.contains("00DFAKE"),
        "{plan}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_session_is_renewed_once_mid_sync() {
    let fake = FakeSalesforce::start(Script {
        latency: Duration::from_millis(20),
        expire_after_collections: Some(4),
        ..Script::default()
    })
    .await;
    let engine = connect(&fake, ", batch_size '10', concurrency '3'").await;
    model(&engine, 100, |r| r).await;
    // The session ends while the 4th of the 10 calls arrives, with others in flight.
    let summary = write(&engine, UPSERT).await;
    assert_eq!((summary.rows_written, summary.rows_rejected), (100, 0));
    same(&fake, 100);
    let grants = fake.observed(|o| o.grants.len());
    assert_eq!(grants, 2, "concurrent 401s share one new session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_allocation_stops_cleanly_and_the_next_run_resumes() {
    // 2 describe calls, then room for 3 of the 5 upsert calls.
    let fake = FakeSalesforce::start(Script {
        allocation: 5,
        ..Script::default()
    })
    .await;
    let engine = connect(&fake, ", max_api_usage_pct '100', concurrency '1'").await;
    model(&engine, 1000, |r| r).await;
    let e = error(&engine, UPSERT).await;
    assert!(
        e.contains("allocation") || e.contains("API requests"),
        "{e}"
    );
    let committed = fake.records("Contact").len();
    assert!(committed > 0 && committed < 1000, "{committed}");
    let runs = query(&engine, "SELECT status, inserted FROM sluice.runs").await;
    assert!(
        runs.contains(&committed.to_string()),
        "acknowledged work is committed: {runs}"
    );

    // The window rolls: the rerun sends only what is missing.
    fake.script(|s| s.allocation = 100_000);
    fake.set_used(0);
    let resumed = write(&engine, UPSERT).await;
    assert_eq!(resumed.rows_written as usize, 1000 - committed);
    same(&fake, 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_api_usage_pct_stops_before_the_ceiling() {
    let fake = FakeSalesforce::start(Script {
        allocation: 1000,
        used: 795,
        ..Script::default()
    })
    .await;
    let engine = connect(&fake, ", concurrency '1', batch_size '10'").await;
    model(&engine, 100, |r| r).await;
    let e = error(&engine, UPSERT).await;
    assert!(e.contains("max_api_usage_pct is 80"), "{e}");
    assert!(
        fake.used() <= 800,
        "never past 80% of 1000: {}",
        fake.used()
    );
    assert!(!fake.records("Contact").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_values_survive_csv_and_json() {
    let hostile = [
        "O'Brien, \"Jr.\"",
        "line one\nline two",
        "Zoë 🚀 Ünïcødé",
        "comma,semi;colon",
        "#N/A is text here",
    ];
    for api in ["bulk", "rest"] {
        let fake = FakeSalesforce::start(Script::default()).await;
        let engine = connect(&fake, &format!(", api '{api}'")).await;
        let rows: Vec<String> = hostile
            .iter()
            .enumerate()
            .map(|(i, v)| format!("('K,{i}\"', '{}')", v.replace('\'', "''")))
            .collect();
        engine
            .run_sql(&format!(
                "CREATE OR REPLACE TABLE odd AS SELECT * FROM (VALUES {}) AS v(id, note)",
                rows.join(", ")
            ))
            .await
            .unwrap();
        let summary = write(
            &engine,
            "INSERT INTO sf.contact SELECT id AS External_Id__c, note AS LastName, note AS Description FROM odd",
        )
        .await;
        assert_eq!(
            (summary.rows_written, summary.rows_rejected),
            (5, 0),
            "{api}"
        );
        for (i, v) in hostile.iter().enumerate() {
            let key = format!("K,{i}\"");
            assert_eq!(
                fake.value("Contact", "External_Id__c", &key, "Description")
                    .as_deref(),
                Some(*v),
                "{api}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_and_plan_time_errors() {
    let fake = FakeSalesforce::start(Script::default()).await;
    let engine = connect(&fake, "").await;
    let described = query(&engine, "DESCRIBE sf.contact").await;
    for expected in [
        "External_Id__c",
        "Legacy_Code__c",
        "Gold, Silver, Bronze",
        "createable",
        "updateable",
        "nillable",
        "length",
    ] {
        assert!(described.contains(expected), "{expected}: {described}");
    }
    // Objects resolve in any case, custom ones too.
    assert!(
        query(&engine, "DESCRIBE sf.\"churn_score__C\"")
            .await
            .contains("Ext__c")
    );

    model(&engine, 3, |r| r).await;
    let unknown = error(
        &engine,
        "INSERT INTO sf.contact SELECT id AS External_Id__c, last_name AS LastNme FROM leads",
    )
    .await;
    assert!(
        unknown.contains("'lastnme'") && unknown.contains("did you mean 'LastName'"),
        "{unknown}"
    );
    let read_only = error(
        &engine,
        "INSERT INTO sf.contact SELECT id AS External_Id__c, now() AS CreatedDate FROM leads",
    )
    .await;
    assert!(read_only.contains("read-only"), "{read_only}");
    let not_updateable = error(&engine, "INSERT INTO sf.contact SELECT id AS External_Id__c, last_name AS LastName, 'x' AS Legacy_Code__c FROM leads").await;
    assert!(
        not_updateable.contains("Legacy_Code__c") && not_updateable.contains("create-only"),
        "{not_updateable}"
    );
    let bad_key = error(&engine, "MERGE INTO sf.contact t USING leads s ON t.Email = s.email WHEN MATCHED THEN UPDATE SET LastName = s.last_name").await;
    assert!(
        bad_key.contains("External_Id__c") && bad_key.contains("Id"),
        "{bad_key}"
    );
    // Create-only may write a createable-only field.
    let create = write(&engine, "MERGE INTO sf.contact t USING leads s ON t.External_Id__c = s.id
        WHEN NOT MATCHED THEN INSERT (External_Id__c, LastName, Legacy_Code__c) VALUES (s.id, s.last_name, 'L')").await;
    assert_eq!(create.rows_written, 3);

    // Values Salesforce would refuse are rejects before anything is sent.
    let calls = fake.api_calls();
    let refused = write(&engine, "INSERT INTO sf.contact SELECT 'X-1' AS External_Id__c, 'Platinum' AS Tier__c, repeat('x', 81) AS LastName").await;
    assert_eq!((refused.rows_written, refused.rows_rejected), (0, 1));
    assert_eq!(
        refused.rejects[0].code,
        "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST"
    );
    assert!(
        refused.rejects[0].message.contains("Gold"),
        "{}",
        refused.rejects[0].message
    );
    assert_eq!(fake.api_calls(), calls, "nothing sent");
    let long = write(
        &engine,
        "INSERT INTO sf.contact SELECT 'X-2' AS External_Id__c, repeat('x', 81) AS LastName",
    )
    .await;
    assert_eq!(long.rejects[0].code, "STRING_TOO_LONG");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_sync_reports_calls_and_the_remaining_allocation() {
    let fake = FakeSalesforce::start(Script {
        allocation: 10_000,
        used: 1_000,
        ..Script::default()
    })
    .await;
    let engine = connect(&fake, ", bulk_threshold '300'").await;
    model(&engine, 450, |r| r).await;
    engine
        .run_sql(&format!("CREATE SYNC contacts AS {UPSERT}"))
        .await
        .unwrap();
    let before = fake.calls("collections:") + fake.calls("jobs:");
    let mut out = engine.run_sql("EXPLAIN SYNC contacts").await.unwrap();
    let text = match out.pop() {
        Some(Outcome::DryRun(r)) => r.to_string(),
        other => panic!("{other:?}"),
    };
    assert!(text.contains("Bulk API 2.0"), "{text}");
    // 1,000 used before, plus the sObject list and the describes of Contact and of Account
    // (the parent of its AccountId lookup, for relationship columns).
    assert!(
        text.contains("Salesforce API usage: 1003 of 10000"),
        "{text}"
    );
    assert!(text.contains("leaves 6997"), "{text}");
    assert_eq!(
        fake.calls("collections:") + fake.calls("jobs:"),
        before,
        "nothing sent"
    );
    assert!(fake.records("Contact").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_bulk_job_keeps_what_it_settled_and_the_rerun_sends_the_rest() {
    let fake = FakeSalesforce::start(Script {
        bulk_fail: Some("InvalidBatch : Failed to process the batch".into()),
        ..Script::default()
    })
    .await;
    let engine = connect(&fake, ", api 'bulk'").await;
    model(&engine, 40, |r| r).await;
    let e = error(&engine, UPSERT).await;
    assert!(
        e.contains("ended Failed")
            && e.contains("20 never attempted")
            && e.contains("InvalidBatch"),
        "{e}"
    );
    assert_eq!(
        fake.records("Contact").len(),
        20,
        "half the job was processed"
    );
    assert_eq!(fake.calls("jobs:unprocessedrecords"), 1);
    let runs = query(&engine, "SELECT status, inserted FROM sluice.runs").await;
    assert!(
        runs.contains("| 20 "),
        "the processed half is committed: {runs}"
    );

    let rerun = write(&engine, UPSERT).await;
    assert_eq!((rerun.rows_written, rerun.rows_rejected), (20, 0));
    same(&fake, 40);
}

/// Control-plane calls (describe, lookups, Bulk polls) honour the connection's max_attempts, as
/// data calls do: a user who sets max_attempts '2' gets two tries, not six.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_describe_is_tried_max_attempts_times() {
    let fake = FakeSalesforce::start(Script {
        concurrent_faults: 100,
        ..Default::default()
    })
    .await;
    let engine = super::support::engine();
    let err = engine
        .run_sql(&format!(
            "CREATE CONNECTION sf TYPE salesforce OPTIONS (login_url '{}', client_id '{CLIENT_ID}', client_secret '{CLIENT_SECRET}', max_attempts '2');
             DESCRIBE sf.contact",
            fake.url
        ))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("gave up after 2 attempts"), "{err}");
    assert_eq!(fake.api_calls(), 2, "{err}");
}

/// Issue 17: a Bulk job that has not ended within bulk_timeout is aborted and the run fails,
/// instead of polling it without bound; its records are sent again by the next run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_job_past_bulk_timeout_is_aborted() {
    let fake = FakeSalesforce::start(Script {
        bulk_base: Duration::from_secs(30),
        ..Default::default()
    })
    .await;
    let engine = connect(&fake, ", api 'bulk', bulk_timeout '300ms'").await;
    model(&engine, 20, |rows| rows).await;
    let started = std::time::Instant::now();
    let err = error(&engine, UPSERT).await;
    assert!(err.contains("bulk_timeout"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10), "{err}");
    assert_eq!(fake.job_states(), ["Aborted"]);
    fake.script(|s| s.bulk_base = Duration::from_millis(30));
    write(&engine, UPSERT).await;
    assert_eq!(fake.records("Contact").len(), 20);
}

/// Issue 19: Salesforce objects are tables to read too: SOQL through the REST query API, only
/// the selected fields and the LIMIT pushed down, pages followed by nextRecordsUrl, `=` / `IN`
/// on a match key as `WHERE … IN`, typed values, and a drift check in plain SQL. (Salesforce's
/// API names are mixed case: SQL reads them quoted.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_are_read_with_soql_paging_and_key_lookups() {
    let fake = FakeSalesforce::start(Script {
        query_batch: 50,
        ..Script::default()
    })
    .await;
    let engine = connect(&fake, ", api 'rest'").await;
    model(&engine, 120, |r| r).await;
    assert_eq!(write(&engine, UPSERT).await.rows_written, 120);

    let calls = fake.api_calls();
    let first = query(
        &engine,
        r#"SELECT "External_Id__c", "LastName", "Lead_Score__c" FROM sf.contact LIMIT 5"#,
    )
    .await;
    assert_eq!(
        first.lines().filter(|l| l.contains("| C-")).count(),
        5,
        "{first}"
    );
    assert_eq!(fake.api_calls(), calls + 1, "one query of 5 records");

    // Every record: three pages of 50, followed by nextRecordsUrl.
    let calls = fake.api_calls();
    let total = query(
        &engine,
        r#"SELECT count(*) AS n, sum("Lead_Score__c") AS total FROM sf.contact"#,
    )
    .await;
    assert!(
        total.contains("| 120 ") && total.contains("| 7200.0 "),
        "{total}"
    );
    assert_eq!(fake.api_calls(), calls + 3);

    // By external id: one SOQL query with WHERE … IN; SQL's comparison applied after.
    let sql = r#"SELECT "External_Id__c", "Lead_Score__c" FROM sf.contact WHERE "External_Id__c" IN ('C-3', 'c-4', 'C-999') ORDER BY 1"#;
    let calls = fake.api_calls();
    let found = query(&engine, sql).await;
    assert!(found.contains("| C-3            | 3.5 "), "{found}");
    assert!(!found.contains("C-4"), "{found}");
    assert_eq!(fake.api_calls(), calls + 1);
    let plan = query(&engine, &format!("EXPLAIN {sql}")).await;
    assert!(
        plan.contains("SalesforceScanExec: connection=sf soql=[SELECT External_Id__c, Lead_Score__c FROM Contact WHERE External_Id__c IN ('C-3','c-4','C-999')]"),
        "{plan}"
    );

    // Drift: a record a rep edited differs from the model.
    let drift = r#"SELECT "External_Id__c", "LastName" FROM sf.contact EXCEPT SELECT id, last_name FROM leads"#;
    assert!(!query(&engine, drift).await.contains("| C-"));
    let (id, _) = fake.find("Contact", "External_Id__c", "C-7").unwrap();
    fake.edit("Contact", &id, "LastName", serde_json::json!("Edited"));
    let drifted = query(&engine, drift).await;
    assert!(drifted.contains("| C-7            | Edited "), "{drifted}");
}

/// Issue 19: a lookup set by the parent's External ID. `Account.Account_Ref__c` is a column of
/// sf.contact (from the describe: the relationship, the parent, its External ID field), sent as
/// `"Account": {"Account_Ref__c": "…"}` by REST and under that header by Bulk; a parent that does
/// not exist is a reject kept and sent again once fixed; the column reads back in SELECT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relationship_columns_set_lookups_by_the_parents_external_id_on_both_apis() {
    for api in ["rest", "bulk"] {
        let fake = FakeSalesforce::start(Script::default()).await;
        let acme = fake.seed(
            "Account",
            serde_json::json!({"Name": "Acme", "Account_Ref__c": "A-1"}),
        );
        let globex = fake.seed(
            "Account",
            serde_json::json!({"Name": "Globex", "Account_Ref__c": "A-2"}),
        );
        let engine = connect(&fake, &format!(", api '{api}'")).await;
        let described = query(&engine, "DESCRIBE sf.contact").await;
        assert!(
            described.contains("Account.Account_Ref__c")
                && described.contains("reference to Account by Account_Ref__c"),
            "{api}: {described}"
        );
        let links = |rows: &str| {
            format!(
                "CREATE OR REPLACE TABLE links AS SELECT * FROM (VALUES {rows}) AS v(id, last_name, acct)"
            )
        };
        let sync = r#"INSERT INTO sf.contact SELECT id AS External_Id__c, last_name AS LastName, acct AS "Account.Account_Ref__c" FROM links"#;
        engine
            .run_sql(&links(
                "('C-0', 'Ada', 'A-1'), ('C-1', 'Bob', 'A-1'), ('C-2', 'Cy', 'A-99')",
            ))
            .await
            .unwrap();
        let first = write(&engine, sync).await;
        assert_eq!((first.rows_written, first.rows_rejected), (2, 1), "{api}");
        assert!(
            first.rejects[0]
                .message
                .contains("Foreign key external ID: A-99 not found"),
            "{api}: {:?}",
            first.rejects
        );
        let account_of = |key: &str| fake.value("Contact", "External_Id__c", key, "AccountId");
        assert_eq!(account_of("C-0"), Some(acme.clone()), "{api}");

        // Fixed in the model and moved: only those two are sent.
        engine
            .run_sql(&links(
                "('C-0', 'Ada', 'A-1'), ('C-1', 'Bob', 'A-2'), ('C-2', 'Cy', 'A-2')",
            ))
            .await
            .unwrap();
        let second = write(&engine, sync).await;
        assert_eq!((second.rows_written, second.rows_rejected), (2, 0), "{api}");
        assert_eq!(account_of("C-1"), Some(globex.clone()), "{api}");
        assert_eq!(account_of("C-2"), Some(globex.clone()), "{api}");
        assert_eq!(write(&engine, sync).await.rows_written, 0, "{api}");

        // It reads back.
        let read = query(
            &engine,
            r#"SELECT "External_Id__c", "Account.Account_Ref__c" FROM sf.contact ORDER BY 1"#,
        )
        .await;
        assert!(
            read.contains("| C-1            | A-2 ") && read.contains("| C-0            | A-1 "),
            "{api}: {read}"
        );

        // A parent field that is not an External ID is a plan error naming the one that is.
        let err = error(
            &engine,
            r#"INSERT INTO sf.contact SELECT id AS External_Id__c, acct AS "Account.Name" FROM links"#,
        )
        .await;
        assert!(
            err.contains("the relationship Account is set by an External ID field of its parent, as Account.Account_Ref__c"),
            "{api}: {err}"
        );
    }
}

/// Issue 19: a scan of more than `bulk_threshold` records runs as a Bulk API 2.0 query job
/// (counted first under `api 'auto'`): created, polled, its CSV results read page by page by
/// `Sforce-Locator`, typed as the describe says; a smaller read stays on REST.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_scan_reads_through_a_bulk_query_job() {
    let fake = FakeSalesforce::start(Script {
        query_batch: 100,
        ..Script::default()
    })
    .await;
    let engine = connect(&fake, ", bulk_threshold '150'").await;
    model(&engine, 250, |r| r).await;
    assert_eq!(write(&engine, UPSERT).await.rows_written, 250);

    let total = query(
        &engine,
        r#"SELECT count(*) AS n, sum("Lead_Score__c") AS total, count("Email") AS emails FROM sf.contact"#,
    )
    .await;
    assert!(
        total.contains("| 250 ") && total.contains("| 31250.0 "),
        "{total}"
    );
    assert_eq!(fake.calls("queryjobs:create"), 1);
    assert_eq!(
        fake.calls("queryjobs:results"),
        3,
        "pages of at most 100 records"
    );
    assert!(fake.calls("queryjobs:poll") >= 1);

    // A LIMIT under the threshold stays on REST; so does a lookup.
    let limited = query(
        &engine,
        r#"SELECT "External_Id__c" FROM sf.contact LIMIT 3"#,
    )
    .await;
    assert_eq!(limited.lines().filter(|l| l.contains("| C-")).count(), 3);
    let found = query(
        &engine,
        r#"SELECT "External_Id__c", "Email" FROM sf.contact WHERE "External_Id__c" = 'C-7'"#,
    )
    .await;
    assert!(found.contains("user7@example.com"), "{found}");
    assert_eq!(fake.calls("queryjobs:create"), 1, "no other job");

    // A job that never completes is aborted at bulk_timeout, and the read fails saying so.
    let slow = FakeSalesforce::start(Script {
        bulk_base: Duration::from_secs(60),
        ..Script::default()
    })
    .await;
    let engine = connect(&slow, ", api 'bulk', bulk_timeout '300ms'").await;
    model(&engine, 3, |r| r).await;
    let err = error(&engine, r#"SELECT count(*) FROM sf.contact"#).await;
    assert!(
        err.contains("did not complete within bulk_timeout"),
        "{err}"
    );
    assert_eq!(slow.calls("queryjobs:abort"), 1);
}
