//! `--output json`: one JSON object per line on stdout for each statement `sluice run` runs and
//! each problem `sluice check` finds, so CI can annotate a pull request. A statement's text is
//! never echoed (it may hold a literal secret): it is named by its first keywords and located by
//! file, line and column.

use serde_json::{Value, json};

use crate::engine::Outcome;
use crate::error::Error;
use crate::parser::ParsedStatement;

/// `INSERT`, `CREATE CONNECTION`, `RUN SYNC`, …: the statement's leading keywords only.
pub fn statement_kind(text: &str) -> String {
    let mut words = text
        .split(|c: char| c.is_whitespace() || c == '(')
        .filter(|w| !w.is_empty());
    let first = words.next().unwrap_or("").to_uppercase();
    let mut kind = first.clone();
    if matches!(
        first.as_str(),
        "CREATE" | "DROP" | "SHOW" | "RUN" | "EXPLAIN" | "RESET" | "DESCRIBE" | "INSERT" | "MERGE"
    ) {
        for word in words.take(3) {
            let upper = word.to_uppercase();
            let keyword = matches!(
                upper.as_str(),
                "OR" | "REPLACE"
                    | "CONNECTION"
                    | "CONNECTIONS"
                    | "TYPE"
                    | "TYPES"
                    | "SYNC"
                    | "SYNCS"
                    | "EXTERNAL"
                    | "TABLE"
                    | "VIEW"
                    | "OBJECTS"
                    | "INTO"
                    | "IF"
                    | "NOT"
                    | "EXISTS"
            );
            if !keyword {
                break;
            }
            kind.push(' ');
            kind.push_str(&upper);
        }
    }
    kind
}

fn located(source: &str, statement: &ParsedStatement) -> serde_json::Map<String, Value> {
    let mut object = serde_json::Map::new();
    object.insert("file".into(), json!(source));
    object.insert("line".into(), json!(statement.line));
    object.insert("column".into(), json!(statement.column));
    object.insert("statement".into(), json!(statement_kind(&statement.text)));
    object
}

/// What one statement did.
pub fn outcome(source: &str, statement: &ParsedStatement, outcome: &Outcome) -> Value {
    let mut o = located(source, statement);
    let status = if outcome.rejected() > 0 {
        "rejected"
    } else {
        "ok"
    };
    o.insert("status".into(), json!(status));
    match outcome {
        Outcome::Rows { batches, .. } => {
            let rows = match super::print_format::json_array(batches) {
                Ok(buf) => serde_json::from_slice(&buf).unwrap_or(json!([])),
                Err(e) => json!({ "error": e.to_string() }),
            };
            o.insert(
                "row_count".into(),
                json!(rows.as_array().map_or(0, Vec::len)),
            );
            o.insert("rows".into(), rows);
        }
        Outcome::Done(message) => {
            o.insert("message".into(), json!(message));
        }
        Outcome::Checked => {}
        Outcome::Write(w) => {
            o.insert("verb".into(), json!(w.verb));
            o.insert("target".into(), json!(w.target));
            o.insert("rows_read".into(), json!(w.rows_read));
            o.insert("rows_written".into(), json!(w.rows_written));
            o.insert("rows_rejected".into(), json!(w.rows_rejected));
            o.insert("locations".into(), json!(w.locations));
            o.insert("elapsed_ms".into(), json!(w.elapsed.as_millis() as u64));
            if let Some(d) = &w.delivery {
                o.insert(
                    "delivery".into(),
                    json!({
                        "requests": d.requests,
                        "retries": d.retries,
                        "throttled": d.throttled,
                        "bytes": d.bytes,
                    }),
                );
            }
            if let Some(sync) = &w.sync {
                let r = &sync.record;
                o.insert(
                    "sync".into(),
                    json!({
                        "name": r.sync,
                        "run_id": r.run_id,
                        "mode": r.mode,
                        "status": r.status,
                        "inserted": r.inserted,
                        "updated": r.updated,
                        "deleted": r.deleted,
                        "unchanged": r.unchanged,
                        "rejected": r.rejected,
                        "not_sent_by_mode": sync.counts.skipped,
                    }),
                );
                if let Some((sent, of)) = sync.sampled {
                    o.insert("sample".into(), json!({"sent": sent, "of": of}));
                }
            }
            if !w.exchanges.is_empty() {
                let exchanges: Vec<serde_json::Value> = w
                    .exchanges
                    .iter()
                    .map(|e| {
                        json!({
                            "method": e.method,
                            "url": e.url,
                            "request": e.request,
                            "status": e.status,
                            "response": e.response,
                        })
                    })
                    .collect();
                o.insert("exchanges".into(), json!(exchanges));
            }
        }
        Outcome::DryRun(report) => {
            let c = &report.counts;
            o.insert("dry_run".into(), json!(true));
            o.insert(
                "sync".into(),
                json!({
                    "name": report.sync,
                    "target": report.target,
                    "mode": report.mode.as_str(),
                    "key": report.key,
                    "rows": c.rows,
                    "inserts": c.inserts,
                    "updates": c.updates,
                    "deletes": c.deletes,
                    "unchanged": c.unchanged,
                    "rejected": report.rejected,
                    "not_sent_by_mode": c.skipped,
                    "requests": report.plan.requests(),
                    "refusal": report.refusal,
                }),
            );
        }
    }
    Value::Object(o)
}

/// A problem `sluice check` found.
pub fn problem(source: &str, (line, column): (u64, u64), message: &str) -> Value {
    json!({ "file": source, "line": line, "column": column, "problem": message })
}

/// What `sluice check` found in all.
pub fn checked(statements: usize, files: usize, problems: usize) -> Value {
    json!({ "checked": statements, "files": files, "problems": problems })
}

/// A statement that failed (or, without a statement, a file that did not parse).
pub fn error(
    source: &str,
    statement: Option<&ParsedStatement>,
    (line, column): (u64, u64),
    error: &Error,
) -> Value {
    let mut o = match statement {
        Some(s) => located(source, s),
        None => {
            let mut o = serde_json::Map::new();
            o.insert("file".into(), json!(source));
            o
        }
    };
    o.insert("line".into(), json!(line));
    o.insert("column".into(), json!(column));
    o.insert("status".into(), json!("error"));
    o.insert("error".into(), json!(error.to_string()));
    Value::Object(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_are_named_by_keywords_never_by_their_values() {
        assert_eq!(
            statement_kind("CREATE CONNECTION crm TYPE hubspot OPTIONS (token 'pat-123')"),
            "CREATE CONNECTION"
        );
        assert_eq!(
            statement_kind("create or replace sync s AS INSERT"),
            "CREATE OR REPLACE SYNC"
        );
        assert_eq!(statement_kind("INSERT INTO out.x SELECT 1"), "INSERT INTO");
        assert_eq!(statement_kind("SELECT 'hunter2'"), "SELECT");
        assert_eq!(statement_kind("RUN SYNC nightly"), "RUN SYNC");
        assert_eq!(
            statement_kind("SHOW CONNECTION TYPES"),
            "SHOW CONNECTION TYPES"
        );
    }
}
