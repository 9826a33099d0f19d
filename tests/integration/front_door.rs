//! The front door through the real binary: `sluice init` → `check` → `run --dry-run` → `run`
//! on the generated project against the webhook fake, `--output json` for CI, shell
//! completions, and the book's generated option tables.

use std::path::Path;
use std::process::Output;

use serde_json::Value;

use super::fakes::webhook::{FakeWebhook, Script};
use super::support::sluice;

fn run(dir: &Path, url: &str, args: &[&str]) -> Output {
    sluice(dir)
        .args(args)
        .env("WEBHOOK_URL", url)
        .output()
        .expect("sluice runs")
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn json_lines(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}\n{}", text(out))))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_then_check_dry_run_and_run_against_the_webhook_fake() {
    let fake = FakeWebhook::start(Script::default()).await;
    let tmp = tempfile::tempdir().unwrap();
    let project = tmp.path().join("acme");
    let out = run(
        tmp.path(),
        &fake.url,
        &["init", "acme", "--with", "webhook,file"],
    );
    assert!(out.status.success(), "{}", text(&out));
    for file in [
        "connections.sql",
        "models.sql",
        "syncs.sql",
        "data/customers.csv",
        ".gitignore",
        "README.md",
    ] {
        assert!(
            project.join(file).is_file(),
            "{file} missing\n{}",
            text(&out)
        );
    }
    let connections = std::fs::read_to_string(project.join("connections.sql")).unwrap();
    assert!(connections.contains("url env('WEBHOOK_URL')") && connections.contains("TYPE file"));

    let check = run(&project, &fake.url, &["check", "."]);
    assert!(check.status.success(), "{}", text(&check));
    assert!(
        String::from_utf8_lossy(&check.stdout).contains(": ok"),
        "{}",
        text(&check)
    );
    assert_eq!(
        fake.observed(|o| o.requests.len()),
        0,
        "check sent a request"
    );

    let dry = run(&project, &fake.url, &["run", "--dry-run", "."]);
    assert!(dry.status.success(), "{}", text(&dry));
    assert!(
        String::from_utf8_lossy(&dry.stdout).contains("5 to insert"),
        "{}",
        text(&dry)
    );
    assert_eq!(
        fake.observed(|o| o.requests.len()),
        0,
        "a dry run sent a request"
    );

    // A sample run first: two real records, the request and the answer shown, only their state
    // committed.
    let sample = run(
        &project,
        &fake.url,
        &["run", "--sample", "2", "--output", "json", "."],
    );
    assert!(sample.status.success(), "{}", text(&sample));
    let lines = json_lines(&sample);
    let sync = lines
        .iter()
        .find(|l| l["statement"] == "RUN SYNC")
        .unwrap_or_else(|| panic!("no RUN SYNC line\n{}", text(&sample)));
    assert_eq!(sync["sample"], serde_json::json!({"sent": 2, "of": 5}));
    assert_eq!(sync["exchanges"][0]["status"], 200, "{}", text(&sample));
    assert_eq!(fake.observed(|o| o.record_count), 2);
    let conflict = run(
        &project,
        &fake.url,
        &["run", "--sample", "2", "--dry-run", "."],
    );
    assert_eq!(conflict.status.code(), Some(2), "{}", text(&conflict));

    // The real run, with machine-readable output: one object per statement, the sync's counts.
    let real = run(&project, &fake.url, &["run", "--output", "json", "."]);
    assert!(real.status.success(), "{}", text(&real));
    let lines = json_lines(&real);
    let sync = lines
        .iter()
        .find(|l| l["statement"] == "RUN SYNC")
        .unwrap_or_else(|| panic!("no RUN SYNC line\n{}", text(&real)));
    assert_eq!(sync["status"], "ok");
    assert_eq!(sync["file"], "./syncs.sql");
    assert_eq!(sync["sync"]["name"], "customers_to_hook");
    assert_eq!(
        sync["sync"]["inserted"], 3,
        "the sample's two were sent already"
    );
    assert!(
        sync["sync"]["run_id"]
            .as_str()
            .is_some_and(|r| !r.is_empty())
    );
    assert_eq!(sync["rows_rejected"], 0);
    assert_eq!(fake.observed(|o| o.record_count), 5);
    assert!(
        fake.observed(|o| o.requests.iter().all(|r| r.fields == "email,name,plan")),
        "the sync sent other fields"
    );
    assert_eq!(
        lines.iter().filter(|l| l["status"] == "ok").count(),
        lines.len()
    );

    // A second run sends nothing: the state lives in the project's .sluice/.
    let again = run(&project, &fake.url, &["run", "--output", "json", "."]);
    let lines = json_lines(&again);
    let sync = lines.iter().find(|l| l["statement"] == "RUN SYNC").unwrap();
    assert_eq!(sync["sync"]["unchanged"], 5, "{}", text(&again));
    assert_eq!(fake.observed(|o| o.record_count), 5);
    assert!(project.join(".sluice").is_dir());

    // init again changes nothing; a file of the user's in the way stops it.
    let out = run(
        tmp.path(),
        &fake.url,
        &["init", "acme", "--with", "webhook,file"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing changed"));
    let out = run(
        tmp.path(),
        &fake.url,
        &["init", "acme", "--with", "hubspot"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing was written"));
}

#[test]
fn check_and_errors_as_json_never_echo_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.sql"),
        "CREATE CONNECTION crm TYPE hubspot OPTIONS (token 'pat-na1-hunter2');\n\
         SELECT nope FROM nowhere;\n\
         CREATE CONNECTION x TYPE hubspot OPTIONS (tokn 'pat-na1-hunter2');\n",
    )
    .unwrap();
    let out = sluice(dir.path())
        .args(["check", "--output", "json", "bad.sql"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 3, "{}", text(&out));
    assert_eq!(lines[0]["line"], 2);
    assert!(lines[0]["problem"].as_str().unwrap().contains("nowhere"));
    assert_eq!(lines[1]["line"], 3);
    assert!(lines[1]["problem"].as_str().unwrap().contains("tokn"));
    assert_eq!(lines[2]["checked"], 3);
    assert_eq!(lines[2]["problems"], 2);

    let out = sluice(dir.path())
        .args(["run", "--output", "json", "bad.sql"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let lines = json_lines(&out);
    assert_eq!(lines[0]["statement"], "CREATE CONNECTION");
    assert_eq!(lines[0]["status"], "ok");
    assert_eq!(lines[1]["status"], "error");
    assert_eq!(lines[1]["statement"], "SELECT");
    for stream in [&out.stdout, &out.stderr] {
        assert!(
            !String::from_utf8_lossy(stream).contains("hunter2"),
            "{}",
            text(&out)
        );
    }
}

#[test]
fn shell_completions_name_the_subcommands() {
    let dir = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish"] {
        let out = sluice(dir.path())
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let script = String::from_utf8_lossy(&out.stdout);
        for word in ["run", "check", "init", "dry-run", "output"] {
            assert!(script.contains(word), "{shell}: {word} missing");
        }
    }
}

/// The book's option tables are what the code says (CI also runs `sluice docs options
/// --check`; this keeps `cargo test` honest on its own).
#[test]
fn the_books_option_tables_match_the_option_specs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = sluice(root)
        .args(["docs", "options", "--check", "--dir", "docs/src"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
}

/// mdBook's id for a heading: lowercase, letters, digits, `-` and `_` kept, spaces as `-`.
fn heading_id(heading: &str) -> String {
    heading
        .trim()
        .chars()
        .filter_map(|c| match c {
            c if c.is_alphanumeric() || c == '_' || c == '-' => Some(c.to_ascii_lowercase()),
            c if c.is_whitespace() => Some('-'),
            _ => None,
        })
        .collect()
}

/// Every link between the book's pages (and to a heading in one) leads somewhere, and every
/// page is in SUMMARY.md; `mdbook build` in CI only warns about these.
#[test]
fn the_books_links_resolve() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/src");
    let link = regex::Regex::new(r"\]\(([^)\s]+)\)").unwrap();
    let summary = std::fs::read_to_string(src.join("SUMMARY.md")).unwrap();
    let mut pages = vec![];
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "md") {
                pages.push(path);
            }
        }
    }
    let ids = |page: &Path| -> Vec<String> {
        let mut fence = false;
        std::fs::read_to_string(page)
            .unwrap()
            .lines()
            .filter(|l| {
                if l.starts_with("```") {
                    fence = !fence;
                }
                !fence && l.starts_with('#')
            })
            .map(|l| heading_id(l.trim_start_matches('#')))
            .collect()
    };
    let mut broken = vec![];
    for page in &pages {
        let rel = page
            .strip_prefix(&src)
            .unwrap()
            .to_string_lossy()
            .to_string();
        if rel != "SUMMARY.md" && !summary.contains(&format!("]({rel})")) {
            broken.push(format!("{rel} is not in SUMMARY.md"));
        }
        let text = std::fs::read_to_string(page).unwrap();
        for target in link.captures_iter(&text).map(|c| c[1].to_string()) {
            if target.starts_with("http") || target.starts_with("mailto:") {
                continue;
            }
            let (file, anchor) = target.split_once('#').unwrap_or((&target, ""));
            let dest = if file.is_empty() {
                page.clone()
            } else {
                page.parent().unwrap().join(file)
            };
            if !dest.is_file() {
                broken.push(format!("{rel}: {target} (no such page)"));
            } else if !anchor.is_empty() && !ids(&dest).iter().any(|id| id == anchor) {
                broken.push(format!("{rel}: {target} (no such heading)"));
            }
        }
    }
    assert!(pages.len() >= 10, "{pages:?}");
    assert!(broken.is_empty(), "{broken:#?}");
}
