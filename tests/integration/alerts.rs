//! Issue 20: the `slack` connection (a destination posting one message per new row, and alert
//! notices), and alerts as SQL (`CREATE ALERT`, `sluice.alerts`) evaluated after each run.

use std::time::Duration;

use super::fakes::slack::{BOT_TOKEN, FakeSlack, WEBHOOK_PATH};
use super::fakes::webhook::{FakeWebhook, Script};
use super::support::{engine, error, query, write};

#[tokio::test]
async fn slack_posts_one_message_per_new_row_at_its_pace_and_keeps_what_it_refuses() {
    let slack = FakeSlack::start().await;
    let engine = engine();
    write(
        &engine,
        &format!(
            "CREATE CONNECTION ops TYPE slack OPTIONS (token '{BOT_TOKEN}', channel 'C1', base_url '{}');
             CREATE TABLE at_risk (name TEXT, channel TEXT);
             INSERT INTO at_risk VALUES ('Acme', NULL), ('Globex', 'C_ARCHIVED'), ('Initech', 'C2'), ('Umbrella', NULL);
             CREATE SYNC risk AS INSERT INTO ops.messages
               SELECT 'Account ' || name || ' turned at-risk' AS text, channel FROM at_risk;
             RUN SYNC risk",
            slack.api_url
        ),
    )
    .await;
    let mut texts = slack.texts();
    texts.sort();
    assert_eq!(
        texts,
        [
            "Account Acme turned at-risk",
            "Account Initech turned at-risk",
            "Account Umbrella turned at-risk"
        ]
    );
    // Kept and reported: the archived channel's message.
    let rejects = query(&engine, "SELECT error_code, payload FROM sluice.rejects").await;
    assert!(
        rejects.contains("is_archived") && rejects.contains("Globex"),
        "{rejects}"
    );
    // Slack's pace: never two messages to one channel within a second, so never throttled.
    let (posted, throttled) = slack.seen(|s| (s.posted.clone(), s.throttled));
    assert_eq!(throttled, 0);
    let c1: Vec<_> = posted.iter().filter(|p| p.channel == "C1").collect();
    assert_eq!(c1.len(), 2);
    assert!(
        c1[1].at.duration_since(c1[0].at) >= Duration::from_millis(900),
        "{:?}",
        c1
    );

    // Append: a rerun posts nothing again; a new row posts once.
    let summary = write(&engine, "RUN SYNC risk").await;
    assert_eq!(slack.texts().len(), 3, "{summary:?}");
    write(
        &engine,
        "INSERT INTO at_risk VALUES ('Hooli', NULL); RUN SYNC risk",
    )
    .await;
    assert_eq!(slack.texts().len(), 4);
    assert_eq!(
        slack.texts().last().unwrap(),
        "Account Hooli turned at-risk"
    );

    // The token is never shown.
    let shown = query(&engine, "SHOW CONNECTIONS").await
        + &query(
            &engine,
            "EXPLAIN INSERT INTO ops.messages SELECT 'x' AS text",
        )
        .await;
    assert!(!shown.contains(BOT_TOKEN), "{shown}");

    // A bad token stops the statement with what to check.
    engine
        .run_sql(&format!(
            "CREATE CONNECTION wrong TYPE slack OPTIONS (token 'xoxb-nope', channel 'C1', base_url '{}')",
            slack.api_url
        ))
        .await
        .unwrap();
    let e = error(&engine, "INSERT INTO wrong.messages SELECT 'hello' AS text").await;
    assert!(
        e.contains("invalid_auth") && !e.contains("xoxb-nope"),
        "{e}"
    );
    // A message without text is refused at plan time.
    let e = error(&engine, "INSERT INTO ops.messages SELECT 'C1' AS channel").await;
    assert!(e.contains("text"), "{e}");
}

#[tokio::test]
async fn alerts_are_checked_when_created() {
    let slack = FakeSlack::start().await;
    let engine = engine();
    engine
        .run_sql(&format!(
            "CREATE CONNECTION ops TYPE slack OPTIONS (webhook_url '{}');
             CREATE CONNECTION files TYPE file OPTIONS (url '/tmp');",
            slack.webhook_url
        ))
        .await
        .unwrap();
    let e = error(
        &engine,
        "CREATE ALERT a ON SYNC '*' WHEN rejectd > 0 NOTIFY ops",
    )
    .await;
    assert!(
        e.contains("rejectd") && e.contains("rows_read, inserted"),
        "{e}"
    );
    let e = error(
        &engine,
        "CREATE ALERT a ON SYNC '*' WHEN rejected + 1 NOTIFY ops",
    )
    .await;
    assert!(e.contains("not true or false"), "{e}");
    let e = error(
        &engine,
        "CREATE ALERT a ON SYNC '*' WHEN status = 'failed' NOTIFY nobody",
    )
    .await;
    assert!(e.contains("no such connection"), "{e}");
    let e = error(
        &engine,
        "CREATE ALERT a ON SYNC '*' WHEN status = 'failed' NOTIFY files",
    )
    .await;
    assert!(e.contains("cannot receive notices"), "{e}");
    let e = error(
        &engine,
        "CREATE ALERT a ON SYNC '*' status = 'failed' NOTIFY ops",
    )
    .await;
    assert!(e.contains("expected WHEN"), "{e}");
    // A valid one, with the issue's own example predicate.
    engine
        .run_sql(
            "CREATE ALERT slow_or_bad ON SYNC accounts WHEN status = 'failed' OR rejected > 0.05 * rows_read OR duration_ms > 600000 NOTIFY ops OPTIONS (repeat_every '1 hour')",
        )
        .await
        .unwrap();
    let shown = query(&engine, "SHOW ALERTS").await;
    assert!(
        shown.contains("slow_or_bad")
            && shown.contains("repeat_every")
            && !shown.contains(WEBHOOK_PATH),
        "{shown}"
    );
}

#[tokio::test]
async fn an_alert_fires_once_and_resolves_once() {
    let slack = FakeSlack::start().await;
    let hook = FakeWebhook::start(Script {
        unauthorized: true,
        ..Default::default()
    })
    .await;
    let engine = engine();
    engine
        .run_sql(&format!(
            "CREATE CONNECTION ops TYPE slack OPTIONS (webhook_url '{}');
             CREATE CONNECTION hooks TYPE webhook OPTIONS (url '{}', key 'id');
             CREATE TABLE people AS VALUES (1, 'a@x.io'), (2, 'b@x.io');
             CREATE SYNC people_sync AS INSERT INTO hooks.people SELECT column1 AS id, column2 AS email FROM people;
             CREATE SYNC other AS INSERT INTO hooks.other SELECT column1 AS id FROM people;
             CREATE ALERT failing ON SYNC 'people*' WHEN status = 'failed' NOTIFY ops;",
            slack.webhook_url, hook.url
        ))
        .await
        .unwrap();
    for _ in 0..3 {
        assert!(engine.run_sql("RUN SYNC people_sync").await.is_err());
        // Not matched by the pattern: never notifies.
        assert!(engine.run_sql("RUN SYNC other").await.is_err());
    }
    let texts = slack.texts();
    assert_eq!(texts.len(), 1, "{texts:?}");
    assert!(
        texts[0].starts_with("[FIRING] failing: sync people_sync") && texts[0].contains("failed"),
        "{texts:?}"
    );
    hook.script(|s| s.unauthorized = false);
    write(&engine, "RUN SYNC people_sync").await;
    write(&engine, "RUN SYNC people_sync").await;
    let texts = slack.texts();
    assert_eq!(texts.len(), 2, "{texts:?}");
    assert!(
        texts[1].starts_with("[RESOLVED] failing: sync people_sync"),
        "{texts:?}"
    );
    let history = query(
        &engine,
        "SELECT alert, sync, event, status, notified, delivered FROM sluice.alerts ORDER BY at",
    )
    .await;
    insta::assert_snapshot!(history, @r"
    +---------+-------------+----------+-----------+----------+-----------+
    | alert   | sync        | event    | status    | notified | delivered |
    +---------+-------------+----------+-----------+----------+-----------+
    | failing | people_sync | fired    | failed    | ops      | true      |
    | failing | people_sync | resolved | succeeded | ops      | true      |
    +---------+-------------+----------+-----------+----------+-----------+
    ");
    // The webhook's secret path is in no message or record.
    let all = query(&engine, "SELECT message FROM sluice.alerts").await;
    assert!(!all.contains(WEBHOOK_PATH), "{all}");
}
