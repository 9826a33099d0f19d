//! The status page at `/`: each sync with its schedule, next run, what is running, its last runs
//! (status, counts, duration, and a small chart of durations and records), its top reject codes
//! with a sample payload, and a "Run now" button that calls the API with the token typed on the
//! page. Server-rendered HTML, a little inline CSS and JavaScript, no build step; it refreshes
//! itself every 15 seconds. Every value is HTML-escaped; nothing secret is on it (run errors are
//! redacted where they are made, and options are not shown).

use std::collections::BTreeMap;
use std::fmt::Write;

use serde_json::Value;

use super::runner::SyncStatus;

/// Runs shown per sync (and charted).
pub const RUNS_SHOWN: usize = 20;

/// `s` with HTML's special characters escaped (for text and quoted attribute values).
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "
body{font:15px/1.4 system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d2430}
header{background:#1d2430;color:#fff;padding:12px 16px;display:flex;flex-wrap:wrap;gap:12px;align-items:center}
header h1{font-size:18px;margin:0;flex:1 1 auto}
header input{padding:6px;border-radius:4px;border:0;min-width:12em}
main{padding:12px;display:grid;gap:12px;grid-template-columns:repeat(auto-fill,minmax(min(100%,560px),1fr))}
section{background:#fff;border-radius:8px;padding:12px 14px;box-shadow:0 1px 2px #0002;min-width:0}
h2{font-size:17px;margin:0 0 4px;display:flex;gap:8px;align-items:center;flex-wrap:wrap}
.meta{color:#556;font-size:13px;margin-bottom:8px}
.b{display:inline-block;padding:1px 7px;border-radius:9px;font-size:12px;color:#fff;background:#778}
.succeeded{background:#1f8a4c}.partial{background:#c98a00}.failed,.interrupted{background:#c0392b}.skipped{background:#778}.running{background:#2c6fbb}
.scroll{overflow-x:auto}
table{border-collapse:collapse;width:100%;font-size:13px}
td,th{padding:3px 6px;text-align:left;border-bottom:1px solid #eee;white-space:nowrap}
td.n,th.n{text-align:right}
button{padding:5px 12px;border-radius:4px;border:1px solid #2c6fbb;background:#2c6fbb;color:#fff;cursor:pointer}
button:disabled{opacity:.5}
.out{font-size:13px;margin-left:6px}
.err{background:#fdecea;color:#8a1c12;padding:8px 16px;margin:0}
pre{white-space:pre-wrap;word-break:break-all;font-size:12px;background:#f3f3f3;padding:4px;margin:2px 0}
svg{display:block;margin:6px 0}
";

const SCRIPT: &str = "
const t=document.getElementById('token');
t.value=sessionStorage.getItem('sluice_token')||'';
t.addEventListener('input',()=>sessionStorage.setItem('sluice_token',t.value));
async function runNow(b){
  b.disabled=true;
  const out=b.parentElement.querySelector('.out');
  out.textContent='starting…';
  try{
    const r=await fetch('/api/syncs/'+encodeURIComponent(b.dataset.sync)+'/runs',
      {method:'POST',headers:t.value?{'Authorization':'Bearer '+t.value}:{}});
    const j=await r.json().catch(()=>({}));
    if(r.ok){out.textContent='started run '+j.run_id;setTimeout(()=>location.reload(),1500);}
    else{out.textContent=j.error||('HTTP '+r.status);b.disabled=false;}
  }catch(e){out.textContent=String(e);b.disabled=false;}
}
";

/// A number from a JSON row.
fn n(row: &Value, key: &str) -> u64 {
    row[key].as_u64().unwrap_or(0)
}

fn s<'a>(row: &'a Value, key: &str) -> &'a str {
    row[key].as_str().unwrap_or("")
}

/// Durations (bar height) and records sent (the line) of `runs`, oldest to newest.
fn chart(runs: &[&Value]) -> String {
    if runs.len() < 2 {
        return String::new();
    }
    let (w, h) = (300.0, 48.0);
    let step = w / runs.len() as f64;
    let max_ms = runs
        .iter()
        .map(|r| n(r, "duration_ms"))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let sent = |r: &Value| n(r, "inserted") + n(r, "updated") + n(r, "deleted") + n(r, "rejected");
    let max_sent = runs.iter().map(|r| sent(r)).max().unwrap_or(1).max(1) as f64;
    let mut svg = format!(
        "<svg viewBox=\"0 0 {w} {h}\" width=\"100%\" height=\"{h}\" preserveAspectRatio=\"none\" role=\"img\" aria-label=\"duration (bars) and records sent (line) of the last runs\">"
    );
    let mut line = String::new();
    for (i, r) in runs.iter().rev().enumerate() {
        let bar = (n(r, "duration_ms") as f64 / max_ms * (h - 4.0)).max(1.0);
        let color = match s(r, "status") {
            "succeeded" => "#1f8a4c",
            "partial" => "#c98a00",
            "failed" | "interrupted" => "#c0392b",
            _ => "#778",
        };
        let _ = write!(
            svg,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bar:.1}\" fill=\"{color}\"><title>{} ms</title></rect>",
            i as f64 * step + 1.0,
            h - bar,
            (step - 2.0).max(1.0),
            n(r, "duration_ms")
        );
        let y = h - 2.0 - sent(r) as f64 / max_sent * (h - 6.0);
        let _ = write!(line, "{:.1},{y:.1} ", i as f64 * step + step / 2.0);
    }
    let _ = write!(
        svg,
        "<polyline points=\"{}\" fill=\"none\" stroke=\"#2c6fbb\" stroke-width=\"1.5\"/></svg>",
        line.trim_end()
    );
    svg
}

/// The page. `runs` and `rejects` are rows of `sluice.runs` (newest first) and
/// `sluice.rejects`.
pub fn render(
    statuses: &[SyncStatus],
    runs: &[Value],
    rejects: &[Value],
    reload_errors: &[String],
) -> String {
    let mut by_sync: BTreeMap<&str, Vec<&Value>> = BTreeMap::new();
    for r in runs {
        let list = by_sync.entry(s(r, "sync")).or_default();
        if list.len() < RUNS_SHOWN {
            list.push(r);
        }
    }
    // Per sync and code: how many, and the first payload.
    let mut codes: BTreeMap<&str, BTreeMap<&str, (u64, &str)>> = BTreeMap::new();
    for r in rejects {
        let entry = codes
            .entry(s(r, "sync"))
            .or_default()
            .entry(s(r, "error_code"))
            .or_insert((0, s(r, "payload")));
        entry.0 += 1;
    }
    let mut html = String::with_capacity(16 * 1024);
    html.push_str("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">");
    html.push_str("<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">");
    html.push_str("<meta http-equiv=\"refresh\" content=\"15\"><title>sluice serve</title><style>");
    html.push_str(STYLE);
    html.push_str("</style></head><body><header><h1>sluice serve</h1>");
    let _ = write!(
        html,
        "<span>{} syncs</span><label>API token <input id=\"token\" type=\"password\" autocomplete=\"off\" placeholder=\"for Run now\"></label></header>",
        statuses.len()
    );
    for e in reload_errors {
        let _ = write!(html, "<p class=\"err\">Not reloaded: {}</p>", esc(e));
    }
    html.push_str("<main>");
    for status in statuses {
        let name = status.name.as_str();
        let last = status.last_status.as_deref().unwrap_or("never run");
        let _ = write!(
            html,
            "<section id=\"sync-{}\"><h2>{}<span class=\"b {}\">{}</span>{}</h2>",
            esc(name),
            esc(name),
            esc(last),
            esc(last),
            match &status.running {
                Some(id) => format!("<span class=\"b running\">running {}</span>", esc(id)),
                None => String::new(),
            }
        );
        let _ = write!(
            html,
            "<div class=\"meta\">schedule: {} · next run: {}{}{}</div>",
            esc(status.schedule.as_deref().unwrap_or("none (API only)")),
            esc(status.next_run.as_deref().unwrap_or("—")),
            if status.skipped_ticks > 0 {
                format!(" · {} ticks skipped while running", status.skipped_ticks)
            } else {
                String::new()
            },
            match &status.trigger_error {
                Some(e) => format!(" · <b>trigger: {}</b>", esc(e)),
                None => String::new(),
            }
        );
        let _ = write!(
            html,
            "<div><button type=\"button\" data-sync=\"{}\" onclick=\"runNow(this)\">Run now</button><span class=\"out\"></span></div>",
            esc(name)
        );
        let runs = by_sync.get(name).cloned().unwrap_or_default();
        html.push_str(&chart(&runs));
        if runs.is_empty() {
            html.push_str("<p class=\"meta\">No runs yet.</p>");
        } else {
            html.push_str("<div class=\"scroll\"><table class=\"runs\"><tr><th>started</th><th>status</th><th class=\"n\">ins</th><th class=\"n\">upd</th><th class=\"n\">del</th><th class=\"n\">rej</th><th class=\"n\">duration</th><th>run</th></tr>");
            for r in runs.iter().take(10) {
                let _ = write!(
                    html,
                    "<tr title=\"{}\"><td>{}</td><td><span class=\"b {}\">{}</span></td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td>{}</td></tr>",
                    esc(s(r, "error")),
                    esc(s(r, "started_at")),
                    esc(s(r, "status")),
                    esc(s(r, "status")),
                    n(r, "inserted"),
                    n(r, "updated"),
                    n(r, "deleted"),
                    n(r, "rejected"),
                    esc(&crate::engine::format_duration(
                        std::time::Duration::from_millis(n(r, "duration_ms"))
                    )),
                    esc(s(r, "run_id")),
                );
            }
            html.push_str("</table></div>");
        }
        if let Some(e) = &status.last_error {
            let _ = write!(html, "<p class=\"meta\">last error: {}</p>", esc(e));
        }
        if let Some(codes) = codes.get(name) {
            let mut top: Vec<(&&str, &(u64, &str))> = codes.iter().collect();
            top.sort_by(|a, b| b.1.0.cmp(&a.1.0).then(a.0.cmp(b.0)));
            html.push_str(
                "<div class=\"meta\">top reject codes:</div><div class=\"scroll\"><table>",
            );
            for (code, (count, payload)) in top.into_iter().take(5) {
                let sample: String = payload.chars().take(300).collect();
                let _ = write!(
                    html,
                    "<tr><td>{}</td><td class=\"n\">{count}</td><td><pre>{}</pre></td></tr>",
                    esc(code),
                    esc(&sample)
                );
            }
            html.push_str("</table></div>");
        }
        html.push_str("</section>");
    }
    html.push_str("</main><script>");
    html.push_str(SCRIPT);
    html.push_str("</script></body></html>");
    html
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn everything_shown_is_escaped() {
        assert_eq!(
            esc("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        let status = SyncStatus {
            name: "s<script>".into(),
            last_error: Some("<img src=x onerror=alert(1)>".into()),
            ..Default::default()
        };
        let runs = [
            json!({"sync": "s<script>", "status": "failed", "run_id": "r1", "error": "\"><b>", "duration_ms": 5}),
        ];
        let rejects = [
            json!({"sync": "s<script>", "error_code": "bad<code>", "payload": "{\"email\":\"<x>\"}"}),
        ];
        let page = render(&[status], &runs, &rejects, &["a <broken> file".into()]);
        assert!(!page.contains("<script>alert") && !page.contains("<img") && !page.contains("<b>"));
        assert!(
            !page.contains("s<script>")
                && !page.contains("bad<code>")
                && !page.contains("<broken>")
        );
        assert!(page.contains("bad&lt;code&gt;") && page.contains("Run now"));
    }

    #[test]
    fn the_chart_spans_the_runs() {
        let runs: Vec<Value> = (0..5)
            .map(|i| json!({"status": "succeeded", "duration_ms": 100 * (i + 1), "inserted": i}))
            .collect();
        let refs: Vec<&Value> = runs.iter().collect();
        let svg = chart(&refs);
        assert_eq!(svg.matches("<rect").count(), 5);
        assert!(svg.contains("<polyline"));
        assert_eq!(chart(&refs[..1]), "");
    }
}
