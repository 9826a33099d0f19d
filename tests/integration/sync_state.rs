//! Sync state under stress, through the real binary: kill -9 at random points, corrupt and missing
//! state files, and two runs of one sync at once.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::fakes::webhook::{FakeWebhook, Fault, Script, Seen};
use super::support::sluice;

/// The model: id → (email, plan).
type Model = BTreeMap<i64, (String, String)>;

fn write_model(dir: &Path, model: &Model) {
    let mut csv = String::from("id,email,plan\n");
    for (id, (email, plan)) in model {
        csv.push_str(&format!("{id},{email},{plan}\n"));
    }
    std::fs::write(dir.join("users.csv"), csv).unwrap();
}

fn write_sync(dir: &Path, url: &str) {
    std::fs::write(
        dir.join("sync.sql"),
        format!(
            "CREATE CONNECTION hooks TYPE webhook OPTIONS (url '{url}', key 'id', batch_size '40', concurrency '2');
CREATE EXTERNAL TABLE users STORED AS CSV LOCATION 'users.csv' OPTIONS ('format.has_header' 'true');
CREATE SYNC users_sync OPTIONS (max_delete_pct '100')
AS MERGE INTO hooks.users AS t USING users AS s ON t.id = s.id
WHEN MATCHED THEN UPDATE SET email = s.email, plan = s.plan
WHEN NOT MATCHED THEN INSERT (id, email, plan) VALUES (s.id, s.email, s.plan)
WHEN NOT MATCHED BY SOURCE THEN DELETE;
RUN SYNC users_sync;
"
        ),
    )
    .unwrap();
}

/// A fake receiver answering after `latency`, and a scratch directory holding the sync file.
async fn setup(latency: Duration) -> (FakeWebhook, tempfile::TempDir) {
    let fake = FakeWebhook::start(Script {
        latency,
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    write_sync(dir.path(), &fake.url);
    (fake, dir)
}

/// `n` users with ids 0..n on the free plan.
fn model(n: i64, domain: &str) -> Model {
    (0..n)
        .map(|i| (i, (format!("u{i}@{domain}"), "free".to_string())))
        .collect()
}

fn start(dir: &Path) -> Child {
    sluice(dir)
        .args(["run", "sync.sql"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Runs the sync to the end and asserts it succeeded (its output says why if not).
fn run_ok(dir: &Path) {
    let out = start(dir).wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A small deterministic generator (the seed is printed, so a failure can be replayed).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn query(dir: &Path, sql: &str) -> String {
    let out = sluice(dir)
        .args(["--format", "csv", "-c", sql])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A run to completion leaves the receiver holding exactly the model, and the state agrees: a
/// rerun sends nothing.
fn run_converges(dir: &Path, fake: &FakeWebhook, model: &Model) {
    let out = start(dir).wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    receiver_matches(fake, model).unwrap();
    let before = fake.observed(|o| o.requests.len());
    let out = start(dir).wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        fake.observed(|o| o.requests.len()),
        before,
        "a converged rerun sent requests"
    );
}

fn receiver_matches(fake: &FakeWebhook, model: &Model) -> Result<(), String> {
    let held: BTreeMap<i64, String> = fake
        .state_rows()
        .into_iter()
        .filter(|(object, _, _)| object == "users")
        .map(|(_, id, record)| (id.parse().unwrap(), record))
        .collect();
    let want: BTreeMap<i64, String> = model
        .iter()
        .map(|(id, (email, plan))| {
            (
                *id,
                serde_json::json!({"id": id, "email": email, "plan": plan}).to_string(),
            )
        })
        .collect();
    if held == want {
        return Ok(());
    }
    let missing: Vec<_> = want
        .keys()
        .filter(|k| !held.contains_key(k))
        .take(5)
        .collect();
    let extra: Vec<_> = held
        .keys()
        .filter(|k| !want.contains_key(k))
        .take(5)
        .collect();
    let wrong: Vec<_> = want
        .iter()
        .filter(|(k, v)| held.get(k).is_some_and(|h| h != *v))
        .take(3)
        .collect();
    Err(format!(
        "receiver differs from the model: missing {missing:?}, extra {extra:?}, wrong {wrong:?}"
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_points_then_rerun_ends_equal_to_the_model() {
    let (fake, dir) = setup(Duration::from_millis(25)).await;
    let dir = dir.path();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("seed {seed}");
    let mut rng = Rng(seed);
    let mut model = model(2000, "example.com");
    let mut next_id = 2000;
    let rounds = 12;
    let mut killed = 0;
    for round in 0..rounds {
        // Change the model every round (updates, deletes, new rows), so every run has work.
        if round > 0 {
            for _ in 0..400 {
                let id = rng.below(next_id as u64) as i64;
                if let Some(row) = model.get_mut(&id) {
                    row.1 = format!("plan{}", rng.below(1000));
                }
            }
            for _ in 0..30 {
                model.remove(&(rng.below(next_id as u64) as i64));
            }
            for _ in 0..50 {
                model.insert(next_id, (format!("new{next_id}@example.com"), "pro".into()));
                next_id += 1;
            }
        }
        write_model(dir, &model);
        let requests_before = fake.observed(|o| o.requests.len());
        let mut child = start(dir);
        // Most kills land while requests are in flight; every fourth at a random moment from
        // the start (planning, state loading, the commit).
        let from_delivery = round % 4 != 0;
        let kill_after = Duration::from_millis(rng.below(if from_delivery { 250 } else { 600 }));
        let mut clock: Option<Instant> = (!from_delivery).then(Instant::now);
        loop {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            if clock.is_none() && fake.observed(|o| o.requests.len()) > requests_before {
                clock = Some(Instant::now());
            }
            if clock.is_some_and(|c| c.elapsed() >= kill_after) {
                child.kill().unwrap(); // SIGKILL
                killed += 1;
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        child.wait().unwrap();
    }
    assert!(
        killed >= rounds / 2,
        "only {killed} of {rounds} runs were killed mid-way"
    );

    run_converges(dir, &fake, &model);

    // Run history is consistent: every killed run is recorded as interrupted (or never got
    // far enough to be recorded), nothing is left "running", the last two succeeded.
    let statuses = query(
        dir,
        "SELECT status FROM sluice.runs WHERE sync = 'users_sync' ORDER BY started_at",
    );
    let statuses: Vec<&str> = statuses.lines().skip(1).collect();
    assert!(!statuses.contains(&"running"), "{statuses:?}");
    assert!(
        statuses
            .iter()
            .all(|s| ["succeeded", "interrupted"].contains(s)),
        "{statuses:?}"
    );
    assert_eq!(statuses[statuses.len() - 2..], ["succeeded", "succeeded"]);
    assert!(statuses.len() >= 2 + rounds - killed);
    assert_eq!(
        query(dir, "SELECT count(*) AS n FROM sluice.rejects"),
        "n\n0\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_or_missing_state_is_a_clear_error_never_a_full_resend() {
    let (fake, dir) = setup(Duration::ZERO).await;
    let dir = dir.path();
    let model = model(50, "x.io");
    write_model(dir, &model);
    run_ok(dir);
    let sent = fake.observed(|o| o.record_count);
    assert_eq!(sent, 50);

    // A run that must refuse: exit code 2, and stderr holding every one of `words`.
    let refused = |words: &[&str]| {
        let out = start(dir).wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            words.iter().all(|w| stderr.contains(w)),
            "{words:?} in {stderr}"
        );
    };
    let name = |p: &Path| p.file_name().unwrap().to_string_lossy().to_string();

    let state = dir.join(".sluice/syncs/users_sync");
    let manifest = state.join("manifest.json");
    let good = std::fs::read(&manifest).unwrap();
    std::fs::write(&manifest, b"{ not json").unwrap();
    refused(&["manifest.json is corrupt", "RESET SYNC users_sync"]);

    // The manifest names a snapshot (or one of its field-hash files) that is gone.
    std::fs::write(&manifest, &good).unwrap();
    let state_file = |hashes: bool| {
        std::fs::read_dir(&state)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| name(p).starts_with("snapshot-") && name(p).contains(".h") == hashes)
            .unwrap()
    };
    let hash_file = state_file(true);
    let hash_bytes = std::fs::read(&hash_file).unwrap();
    std::fs::remove_file(&hash_file).unwrap();
    refused(&["is named by the manifest but missing", &name(&hash_file)]);
    // A truncated field-hash file is found before anything is sent by a run that changes a record.
    std::fs::write(&hash_file, &hash_bytes[..hash_bytes.len() / 2]).unwrap();
    let mut changed = model.clone();
    changed.get_mut(&7).unwrap().1 = "pro".into();
    write_model(dir, &changed);
    refused(&["is corrupt", &name(&hash_file)]);
    assert_eq!(fake.observed(|o| o.record_count), sent, "nothing was sent");
    std::fs::write(&hash_file, &hash_bytes).unwrap();
    write_model(dir, &model);

    let snapshot = state_file(false);
    let bytes = std::fs::read(&snapshot).unwrap();
    std::fs::remove_file(&snapshot).unwrap();
    refused(&["is named by the manifest but missing", &name(&snapshot)]);

    // A truncated snapshot.
    std::fs::write(&snapshot, &bytes[..bytes.len() / 2]).unwrap();
    refused(&["is corrupt"]);
    assert_eq!(
        fake.observed(|o| o.record_count),
        sent,
        "nothing was resent"
    );

    // RESET SYNC forgets the state: the next run resends every record, once.
    std::fs::write(
        dir.join("reset.sql"),
        std::fs::read_to_string(dir.join("sync.sql"))
            .unwrap()
            .replace("RUN SYNC users_sync;", "RESET SYNC users_sync;"),
    )
    .unwrap();
    let out = sluice(dir).args(["run", "reset.sql"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("RESET SYNC users_sync: state forgotten")
    );
    run_ok(dir);
    assert_eq!(fake.observed(|o| o.record_count), sent + 50);
}

/// One first sync of `n` records killed `kills` times at random points of its delivery, then run
/// to the end, with checkpoints every `every` ('0': none). Returns the records delivered more
/// than once, and the most records the receiver answered within any `window` (the work of one
/// checkpoint interval, the rework a kill may cost beyond what is in flight).
async fn killed_first_sync(every: &str, kills: usize, seed: u64, window: Duration) -> (u64, u64) {
    let n = 20_000;
    let (fake, dir) = setup(Duration::from_millis(50)).await;
    let dir = dir.path();
    let sql = std::fs::read_to_string(dir.join("sync.sql"))
        .unwrap()
        .replace(
            "max_delete_pct '100'",
            &format!("max_delete_pct '100', checkpoint_every '{every}'"),
        );
    std::fs::write(dir.join("sync.sql"), sql).unwrap();
    let model = model(n, "example.com");
    write_model(dir, &model);
    let mut rng = Rng(seed);
    for _ in 0..kills {
        let requests = fake.observed(|o| o.requests.len());
        let mut child = start(dir);
        // Killed 1.1 to 1.9 s after its first request (a second or two of delivery; five runs
        // deliver at most 5 × 1.9 s × 1,600 records/s, less than the model).
        let after = Duration::from_millis(1_100 + rng.below(800));
        let mut first: Option<Instant> = None;
        loop {
            assert!(
                child.try_wait().unwrap().is_none(),
                "the run ended before its kill; give it more records"
            );
            if first.is_none() && fake.observed(|o| o.requests.len()) > requests {
                first = Some(Instant::now());
            }
            if first.is_some_and(|t| t.elapsed() >= after) {
                child.kill().unwrap(); // SIGKILL
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        child.wait().unwrap();
    }
    run_converges(dir, &fake, &model);
    let (delivered, busiest) = fake.observed(|o| {
        let accepted: Vec<&Seen> = o.requests.iter().filter(|r| r.status == 200).collect();
        let mut busiest = 0;
        let mut from = 0;
        let mut in_window = 0;
        for r in &accepted {
            in_window += r.records as u64;
            while r.at.duration_since(accepted[from].at) > window {
                in_window -= accepted[from].records as u64;
                from += 1;
            }
            busiest = busiest.max(in_window);
        }
        (o.record_count, busiest)
    });
    (delivered - n as u64, busiest)
}

/// Issue 17, bounded rework: with checkpoints every second, each kill -9 re-sends at most the
/// batches in flight plus what was answered since the last checkpoint (one interval, plus the
/// time a checkpoint takes to write); the final state equals the model. Without checkpoints the
/// same kills re-send everything each killed run had delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_bound_what_a_killed_first_sync_sends_again() {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("seed {seed}");
    let kills = 5;
    // One interval plus the time a checkpoint takes and the kill's polling (generous on a
    // loaded 2-core machine).
    let window = Duration::from_millis(1_600);
    let (extra, busiest) = killed_first_sync("1s", kills, seed, window).await;
    let in_flight = 2 * 40; // concurrency × batch_size
    let bound = kills as u64 * (busiest + in_flight);
    eprintln!(
        "checkpoint_every '1s': {extra} records sent again over {kills} kills (bound {bound}: \
         {kills} × ({busiest} answered in the busiest {window:?} + {in_flight} in flight))"
    );
    assert!(
        extra <= bound,
        "{extra} records sent again, more than {bound}"
    );
    let (without, _) = killed_first_sync("0", kills, seed, window).await;
    eprintln!("no checkpoints: {without} records sent again over {kills} kills");
    assert!(
        without > extra,
        "checkpoints saved nothing: {extra} with, {without} without"
    );
}

/// Checkpoints by record count alone (`checkpoint_every '0'`, `checkpoint_records`): a run
/// killed right after its first checkpoint re-sends only what came after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_by_record_count_alone() {
    let (fake, dir) = setup(Duration::from_millis(100)).await;
    let dir = dir.path();
    let sql = std::fs::read_to_string(dir.join("sync.sql"))
        .unwrap()
        .replace(
            "max_delete_pct '100'",
            "max_delete_pct '100', checkpoint_every '0', checkpoint_records '80'",
        );
    std::fs::write(dir.join("sync.sql"), sql).unwrap();
    let model = model(2_000, "example.com");
    write_model(dir, &model);
    let manifest = dir.join(".sluice/syncs/users_sync/manifest.json");
    let mut child = start(dir);
    let started = Instant::now();
    loop {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before a checkpoint"
        );
        assert!(started.elapsed() < Duration::from_secs(30), "no checkpoint");
        let checkpointed = std::fs::read_to_string(&manifest).is_ok_and(|m| m.contains("-c1\""));
        if checkpointed {
            child.kill().unwrap(); // SIGKILL
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    child.wait().unwrap();
    let sent = fake.observed(|o| o.record_count);
    assert!((80..2_000).contains(&sent), "{sent}");
    fake.script(|s| s.latency = Duration::ZERO);
    run_converges(dir, &fake, &model);
    // Sent again: at most the records after the checkpoint (80 per checkpoint) and those in
    // flight (2 requests of 40), with one round of requests (100 ms) of slack for the kill.
    let again = fake.observed(|o| o.record_count) - 2_000;
    assert!(again <= 80 + 80 + 80, "{again} records sent again");
}

/// Issue 17: one flipped byte in any state file (a hash file gave a run recorded as succeeded,
/// 0 rows read) is a clear error naming the file, before anything is sent or deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_in_any_state_file_is_refused_before_anything_is_sent() {
    let (fake, dir) = setup(Duration::ZERO).await;
    let dir = dir.path();
    let model = model(50, "x.io");
    write_model(dir, &model);
    run_ok(dir);
    let sent = fake.observed(|o| o.record_count);
    // The next model changes a record and drops two (a mirror sync deletes them).
    let mut changed = model.clone();
    changed.get_mut(&7).unwrap().1 = "pro".into();
    changed.remove(&8);
    changed.remove(&9);
    write_model(dir, &changed);
    let state = dir.join(".sluice/syncs/users_sync");
    let mut files: Vec<_> = std::fs::read_dir(&state)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().unwrap() != "lock")
        .collect();
    files.sort();
    assert!(files.len() >= 4, "{files:?}");
    for file in &files {
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        let good = std::fs::read(file).unwrap();
        for at in [good.len() / 3, good.len() / 2, good.len() - 20] {
            let mut bad = good.clone();
            bad[at] ^= 0x04;
            std::fs::write(file, &bad).unwrap();
            let out = start(dir).wait_with_output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{name} byte {at}: {stderr}");
            assert!(
                stderr.contains("corrupt") && stderr.contains(&name),
                "{name} byte {at}: {stderr}"
            );
            assert_eq!(fake.observed(|o| o.record_count), sent, "{name}: sent");
        }
        std::fs::write(file, &good).unwrap();
    }
    // Intact again, the run sends the update and the two deletes.
    run_ok(dir);
    assert_eq!(fake.observed(|o| o.record_count), sent + 3);
}

/// Issue 17: a run releases its lock before the process exits (the lock was deleted by a task
/// spawned in a destructor, which often never ran: 3 of 6 successful runs left it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_run_that_ends_leaves_no_lock_behind() {
    let (fake, dir) = setup(Duration::ZERO).await;
    let dir = dir.path();
    let lock = dir.join(".sluice/syncs/users_sync/lock");
    for n in 0..6 {
        write_model(dir, &model(20 + n, "x.io"));
        let out = start(dir).wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!lock.exists(), "run {n} left its lock");
    }
    // A run that fails (a model with a duplicate key) releases it too.
    let mut csv = std::fs::read_to_string(dir.join("users.csv")).unwrap();
    csv.push_str("3,dup@x.io,free\n");
    std::fs::write(dir.join("users.csv"), csv).unwrap();
    let out = start(dir).wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(!lock.exists(), "a failed run left its lock");

    // Ctrl-C while it delivers: the process exits, its lock gone and its run recorded as
    // interrupted.
    write_model(dir, &model(400, "y.io"));
    fake.script(|s| s.latency = Duration::from_millis(100));
    let requests = fake.observed(|o| o.requests.len());
    let child = start(dir);
    let started = Instant::now();
    while fake.observed(|o| o.requests.len()) == requests {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no request arrived"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // SAFETY: sends SIGINT to the child this test started.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!lock.exists(), "a cancelled run left its lock");
    let statuses = query(
        dir,
        "SELECT status FROM sluice.runs WHERE sync = 'users_sync' ORDER BY started_at",
    );
    assert_eq!(statuses.lines().last(), Some("interrupted"), "{statuses}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_run_of_the_same_sync_refuses_while_the_first_holds_the_lock() {
    let (fake, dir) = setup(Duration::from_millis(150)).await;
    let dir = dir.path();
    let model = model(400, "x.io");
    write_model(dir, &model);
    let first = start(dir);
    // Wait until the first run is delivering.
    let started = Instant::now();
    while fake.observed(|o| o.requests.len()) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "first run never sent"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let second = start(dir).wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("sync users_sync is already running") && stderr.contains("lock"),
        "{stderr}"
    );
    let first = first.wait_with_output().unwrap();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    receiver_matches(&fake, &model).unwrap();
    // The refused run changed nothing: a third run has nothing to send.
    let before = fake.observed(|o| o.requests.len());
    run_ok(dir);
    assert_eq!(fake.observed(|o| o.requests.len()), before);
}

/// `sluice run --dry-run`: every sync reports what it would do; nothing is sent, no state is
/// written, and file writes are skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_dry_run_sends_nothing_and_writes_no_state() {
    let (fake, dir) = setup(Duration::ZERO).await;
    let dir = dir.path();
    let model = model(3, "x.io");
    write_model(dir, &model);
    std::fs::write(
        dir.join("sync.sql"),
        std::fs::read_to_string(dir.join("sync.sql")).unwrap()
            + "CREATE CONNECTION out TYPE file OPTIONS (url 'out/');\nINSERT INTO out.users SELECT * FROM users;\n",
    )
    .unwrap();
    let out = sluice(dir)
        .args(["run", "--dry-run", "sync.sql"])
        .output()
        .unwrap();
    let text = super::support::transcript(&out, dir).replace(&fake.url, "[FAKE]");
    insta::assert_snapshot!("run_dry_run", text);
    assert_eq!(fake.observed(|o| o.requests.len()), 0);
    assert!(!dir.join(".sluice/syncs").exists(), "a dry run wrote state");
    assert!(!dir.join("out").exists(), "a dry run wrote a file");
}

/// A sync cancelled mid-delivery (Ctrl-C drops the statement) records itself as interrupted,
/// releases its lock, and the next run resends what was not committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_run_is_recorded_as_interrupted_and_the_next_run_completes() {
    let fake = FakeWebhook::start(Script {
        latency: Duration::from_millis(100),
        ..Default::default()
    })
    .await;
    let engine = super::support::engine();
    engine
        .run_sql(&format!(
            "CREATE CONNECTION hooks TYPE webhook OPTIONS (url '{}', key 'id', batch_size '10', concurrency '1');
             CREATE SYNC s AS INSERT INTO hooks.users SELECT value AS id, 'u' || value AS email FROM range(200);",
            fake.url
        ))
        .await
        .unwrap();
    let cancelled =
        tokio::time::timeout(Duration::from_millis(500), engine.run_sql("RUN SYNC s")).await;
    assert!(cancelled.is_err(), "the run should still be delivering");
    // The interrupted record is written by a task the dropped run spawned.
    let started = Instant::now();
    loop {
        let outcomes = engine
            .run_sql("SELECT status FROM sluice.runs WHERE sync = 's'")
            .await
            .unwrap();
        let Some(sluice::Outcome::Rows { batches, .. }) = outcomes.last() else {
            panic!("{outcomes:?}")
        };
        let text = datafusion::arrow::util::pretty::pretty_format_batches(batches)
            .unwrap()
            .to_string();
        if text.contains("interrupted") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    fake.script(|s| s.latency = Duration::ZERO);
    let done = engine.run_sql("RUN SYNC s").await.unwrap();
    let Some(sluice::Outcome::Write(summary)) = done.last() else {
        panic!("{done:?}")
    };
    assert!(summary.rows_written > 0 && summary.rows_written <= 200);
    let held: std::collections::BTreeSet<i64> = fake
        .state_rows()
        .iter()
        .map(|(_, id, _)| id.parse().unwrap())
        .collect();
    assert_eq!(held, (0..200).collect(), "every record arrives");
}

/// A duplicate key in the model's very last rows stops a first run before anything is sent
/// (the diff reads the whole model before it emits); without it, every record arrives once and
/// a rerun sends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_run_refuses_a_late_duplicate_before_sending_anything() {
    let fake = FakeWebhook::start(Script::default()).await;
    let engine = super::support::engine();
    engine
        .run_sql(&format!(
            "CREATE CONNECTION hooks TYPE webhook OPTIONS (url '{}', key 'id', batch_size '100');
             CREATE TABLE model AS SELECT value AS id, 'u' || value AS email FROM range(50000);
             CREATE TABLE late AS SELECT * FROM model UNION ALL SELECT 7 AS id, 'again' AS email;",
            fake.url
        ))
        .await
        .unwrap();
    let err = engine
        .run_sql("INSERT INTO hooks.users SELECT id, email FROM late")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("1 duplicate value(s) of the key 'id' (e.g. '7')"),
        "{err}"
    );
    assert_eq!(fake.observed(|o| o.requests.len()), 0, "something was sent");

    let done = engine
        .run_sql("INSERT INTO hooks.users SELECT id, email FROM model")
        .await
        .unwrap();
    let Some(sluice::Outcome::Write(summary)) = done.last() else {
        panic!("{done:?}")
    };
    assert_eq!(summary.rows_written, 50_000);
    assert_eq!(fake.observed(|o| o.state.len()), 50_000);
    let again = engine
        .run_sql("INSERT INTO hooks.users SELECT id, email FROM model")
        .await
        .unwrap();
    let Some(sluice::Outcome::Write(summary)) = again.last() else {
        panic!("{again:?}")
    };
    assert_eq!(summary.rows_written, 0);
}

/// A change the destination applied but never answered (the connection dropped after the
/// receiver processed it) is sent again by the next run even when the model has gone back to the
/// committed values: the snapshot cannot know which of the two the destination holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_change_is_sent_again_even_when_the_model_goes_back() {
    let fake = FakeWebhook::start(Script::default()).await;
    let engine = super::support::engine();
    let set_model = |rows: &'static str| {
        let engine = &engine;
        async move {
            let sql = format!(
                "CREATE OR REPLACE TABLE m AS SELECT * FROM (VALUES {rows}) AS v(id, plan)"
            );
            engine.run_sql(&sql).await.unwrap();
        }
    };
    unanswered_change_is_sent_again(&engine, &fake, "s", "m", "", set_model).await;
}

/// Issue 19: a MERGE whose clauses write different fields (name only on create, plan only on
/// update). An unanswered update leaves the record unknown: the next run sends it whole (the
/// INSERT's fields, in case it is not there, and the UPDATE's, in case it is), so it converges
/// at once, and a rerun sends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_change_to_a_merge_with_per_clause_fields_converges() {
    let fake = FakeWebhook::start(Script::default()).await;
    let engine = super::support::engine();
    let model = |rows: &str| {
        format!("CREATE OR REPLACE TABLE m AS SELECT * FROM (VALUES {rows}) AS v(id, name, plan)")
    };
    engine
        .run_sql(&format!(
            "CREATE CONNECTION hooks TYPE webhook OPTIONS (url '{}', key 'id', max_attempts '1');
             {};
             CREATE SYNC s AS MERGE INTO hooks.users AS t USING m ON t.id = m.id
               WHEN MATCHED THEN UPDATE SET plan = m.plan
               WHEN NOT MATCHED THEN INSERT (id, name) VALUES (m.id, m.name)",
            fake.url,
            model("(1, 'Ann', 'free'), (2, 'Bob', 'free')")
        ))
        .await
        .unwrap();
    let held = || {
        let mut rows: Vec<String> = fake.state_rows().into_iter().map(|r| r.2).collect();
        rows.sort();
        rows
    };
    let write = |sql: &'static str| super::support::write(&engine, sql);
    // Created with the INSERT's fields; the next run's UPDATE writes plan; then settled.
    assert_eq!(write("RUN SYNC s").await.rows_written, 2);
    assert_eq!(
        held(),
        [r#"{"id":1,"name":"Ann"}"#, r#"{"id":2,"name":"Bob"}"#]
    );
    assert_eq!(write("RUN SYNC s").await.rows_written, 2);
    assert_eq!(write("RUN SYNC s").await.rows_written, 0);

    // The receiver applies an update and drops the connection unanswered.
    fake.script(|s| s.faults = [Fault::DropAfter].into());
    engine
        .run_sql(&model("(1, 'Ann2', 'pro'), (2, 'Bob', 'free')"))
        .await
        .unwrap();
    let err = super::support::error(&engine, "RUN SYNC s").await;
    assert!(err.contains("gave up"), "{err}");
    assert_eq!(
        held(),
        [
            r#"{"id":1,"name":"Ann","plan":"pro"}"#,
            r#"{"id":2,"name":"Bob","plan":"free"}"#
        ]
    );
    // The model goes back; record 1 is sent whole, once.
    fake.script(|s| s.faults.clear());
    engine
        .run_sql(&model("(1, 'Ann2', 'free'), (2, 'Bob', 'free')"))
        .await
        .unwrap();
    assert_eq!(write("RUN SYNC s").await.rows_written, 1);
    assert_eq!(
        held(),
        [
            r#"{"id":1,"name":"Ann2","plan":"free"}"#,
            r#"{"id":2,"name":"Bob","plan":"free"}"#
        ]
    );
    assert_eq!(write("RUN SYNC s").await.rows_written, 0);
}

/// The scenario of [`an_unanswered_change_is_sent_again_even_when_the_model_goes_back`], for a
/// sync named `sync` with extra `options`, whose model `table` (id, plan) `set_model` fills with
/// SQL VALUES rows.
pub async fn unanswered_change_is_sent_again<F, Fut>(
    engine: &sluice::Engine,
    fake: &FakeWebhook,
    sync: &str,
    table: &str,
    options: &str,
    set_model: F,
) where
    F: Fn(&'static str) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let committed = "(1, 'free'), (2, 'free'), (3, 'free')";
    set_model(committed).await;
    engine
        .run_sql(&format!(
            "CREATE CONNECTION hooks TYPE webhook OPTIONS (url '{}', key 'id', max_attempts '1');
             CREATE SYNC {sync} OPTIONS (max_delete_pct '100'{options}) AS MERGE INTO hooks.users AS t
               USING (SELECT id, plan FROM {table}) AS m ON t.id = m.id
               WHEN MATCHED THEN UPDATE SET plan = m.plan
               WHEN NOT MATCHED THEN INSERT (id, plan) VALUES (m.id, m.plan)
               WHEN NOT MATCHED BY SOURCE THEN DELETE;
             RUN SYNC {sync}",
            fake.url
        ))
        .await
        .unwrap();
    let held = || {
        let mut rows: Vec<String> = fake.state_rows().into_iter().map(|r| r.2).collect();
        rows.sort();
        rows
    };
    let expected = vec![
        r#"{"id":1,"plan":"free"}"#.to_string(),
        r#"{"id":2,"plan":"free"}"#.to_string(),
        r#"{"id":3,"plan":"free"}"#.to_string(),
    ];
    assert_eq!(held(), expected);

    // An update, then a delete: each applied by the receiver, which drops the connection
    // unanswered; then the model goes back to what the last commit holds, and the record is
    // sent again.
    let run_sync = format!("RUN SYNC {sync}");
    for (model, applied) in [
        (
            "(1, 'pro'), (2, 'free'), (3, 'free')",
            vec![
                r#"{"id":1,"plan":"pro"}"#,
                r#"{"id":2,"plan":"free"}"#,
                r#"{"id":3,"plan":"free"}"#,
            ],
        ),
        (
            "(1, 'free'), (2, 'free')",
            vec![r#"{"id":1,"plan":"free"}"#, r#"{"id":2,"plan":"free"}"#],
        ),
    ] {
        fake.script(|s| s.faults = [Fault::DropAfter].into());
        set_model(model).await;
        let err = super::support::error(engine, &run_sync).await;
        assert!(err.contains("gave up"), "{err}");
        assert_eq!(held(), applied);

        fake.script(|s| s.faults.clear());
        set_model(committed).await;
        let run = super::support::write(engine, &run_sync).await;
        assert_eq!((run.rows_written, run.rows_rejected), (1, 0), "{model}");
        assert_eq!(held(), expected);
    }
    // Settled: the next run sends nothing.
    let run = super::support::write(engine, &run_sync).await;
    assert_eq!(run.rows_written, 0);
}

/// The same through the binary, killed with -9 after the receiver applied a change and before
/// the run could learn it: the run's intent makes the next run send the record again, although
/// the model has gone back to the values of the last commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_sent_by_a_killed_run_is_sent_again_even_when_the_model_goes_back() {
    let (fake, dir) = setup(Duration::ZERO).await;
    let dir = dir.path();
    let committed = model(3, "example.com");
    write_model(dir, &committed);
    assert!(start(dir).wait().unwrap().success());
    receiver_matches(&fake, &committed).unwrap();

    // The receiver applies the change and drops the connection, then holds the retry: the
    // process is killed while it waits.
    let mut changed = committed.clone();
    changed.get_mut(&1).unwrap().1 = "pro".into();
    write_model(dir, &changed);
    fake.script(|s| s.faults = [Fault::DropAfter, Fault::Hang(Duration::from_secs(60))].into());
    let mut child = start(dir);
    let waited = Instant::now();
    while receiver_matches(&fake, &changed).is_err() {
        assert!(
            waited.elapsed() < Duration::from_secs(60),
            "the change never arrived"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();

    fake.script(|s| s.faults.clear());
    write_model(dir, &committed);
    let out = start(dir).wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    receiver_matches(&fake, &committed).unwrap();
}
