//! Hostile receivers and careless options (issue 17): waits a server asks for that outlast the
//! run, numbers that do not fit, answers too large to read, redirects to another host, and
//! secrets carried in a URL. Each must end in a clear error within the run's time limits, never
//! a panic, a hang, or a secret in the output.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;

use super::support::{scratch, sluice};
use super::webhook::connect;

/// A receiver that answers by its path; counts the requests that reach it.
struct Hostile {
    url: String,
    hits: Arc<AtomicUsize>,
    _server: tokio::task::JoinHandle<()>,
}

impl Hostile {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let app = Router::new()
            .route("/{behaviour}", any(answer))
            .route("/{behaviour}/{arg}", any(answer_with))
            .with_state((Arc::clone(&hits), addr));
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            url: format!("http://{addr}"),
            hits,
            _server: server,
        }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

type Shared = (Arc<AtomicUsize>, SocketAddr);

async fn answer(state: State<Shared>, Path(behaviour): Path<String>) -> Response {
    answer_with(state, Path((behaviour, String::new()))).await
}

async fn answer_with(
    State((hits, me)): State<Shared>,
    Path((behaviour, arg)): Path<(String, String)>,
) -> Response {
    hits.fetch_add(1, Ordering::SeqCst);
    let mut headers = HeaderMap::new();
    match behaviour.as_str() {
        // 429 with the Retry-After given in the path.
        "wait" => {
            headers.insert("retry-after", arg.parse().unwrap());
            (StatusCode::TOO_MANY_REQUESTS, headers, "slow down").into_response()
        }
        // 200 with a body of `arg` MB, streamed without a length.
        "huge" => {
            let mb: usize = arg.parse().unwrap();
            let chunks = futures::stream::iter(
                (0..mb * 16).map(|_| Ok::<_, std::io::Error>(vec![b' '; 64 * 1024])),
            );
            (StatusCode::OK, Body::from_stream(chunks)).into_response()
        }
        // A redirect to the receiver at port `arg` (another origin), or to /ok here.
        "redirect" => {
            let to = match arg.as_str() {
                "" => format!("http://{me}/ok"),
                port => format!("http://127.0.0.1:{port}/ok"),
            };
            headers.insert("location", to.parse().unwrap());
            (StatusCode::TEMPORARY_REDIRECT, headers, "").into_response()
        }
        "ok" => (StatusCode::OK, "{}").into_response(),
        // Always failing, so the error paths print what they print.
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "down").into_response(),
    }
}

/// Runs a one-record insert, which must fail within `limit`; returns its error.
async fn fails_within(engine: &sluice::Engine, limit: Duration) -> String {
    let started = Instant::now();
    let run = engine.run_sql("INSERT INTO hooks.users SELECT 1 AS id, 'a@x.io' AS email");
    let result = tokio::time::timeout(limit, run)
        .await
        .unwrap_or_else(|_| panic!("the run hung past {limit:?}"));
    let err = result.expect_err("the run must fail").to_string();
    assert!(started.elapsed() < limit, "{err}");
    err
}

/// A server asking for a wait longer than the run has left (or a number no wait can be) fails
/// the run at once with a clear error, instead of holding it (and its lock) without bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_given_waits_are_clamped_to_the_time_the_run_has_left() {
    let hostile = Hostile::start().await;
    for wait in [
        "99999999",
        "1e300",
        "1000000000000000000000000000000",
        "inf",
    ] {
        let engine = connect(
            &format!("{}/wait/{wait}", hostile.url),
            ", max_retry_time '5s'",
        )
        .await;
        let err = fails_within(&engine, Duration::from_secs(4)).await;
        assert!(
            err.contains("asks to wait") && err.contains("max_retry_time"),
            "Retry-After {wait}: {err}"
        );
    }
    // Waits that are not waits (NaN, negative) are ignored: the run backs off and gives up at
    // max_retry_time.
    for wait in ["NaN", "-5"] {
        let engine = connect(
            &format!("{}/wait/{wait}", hostile.url),
            ", max_retry_time '1s'",
        )
        .await;
        let err = fails_within(&engine, Duration::from_secs(20)).await;
        assert!(err.contains("gave up"), "Retry-After {wait}: {err}");
    }
}

/// An answer larger than any the API sends is not read whole: the request fails clearly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_answer_is_not_read_whole() {
    let hostile = Hostile::start().await;
    let engine = connect(&format!("{}/huge/40", hostile.url), "").await;
    let err = fails_within(&engine, Duration::from_secs(20)).await;
    assert!(err.contains("larger than 8 MB"), "{err}");
}

/// Options that would overflow a duration or a rate are clear errors naming the option.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impossible_durations_and_rates_are_refused() {
    let engine = super::support::engine();
    for (option, value) in [
        ("timeout", "99999999999999999999999"),
        ("timeout", "1e300"),
        ("max_retry_time", "99999999999999999999999h"),
        ("rate_limit", "1e-300"),
        ("rate_limit", "NaN"),
        ("rate_limit", "1e300"),
    ] {
        let err = engine
            .run_sql(&format!(
                "CREATE CONNECTION h TYPE webhook OPTIONS (url 'http://127.0.0.1:9/', {option} '{value}')"
            ))
            .await
            .expect_err(value)
            .to_string();
        assert!(err.contains(option), "{option} '{value}': {err}");
    }
}

/// Redirects are not followed by default (they would carry the records, headers and signature
/// to another host); 'same-origin' follows one within the url's own host only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_to_another_origin_are_never_followed() {
    let hostile = Hostile::start().await;
    let elsewhere = Hostile::start().await;
    let port = elsewhere.url.rsplit(':').next().unwrap().to_string();
    for extra in ["", ", follow_redirects 'same-origin'"] {
        let engine = connect(&format!("{}/redirect/{port}", hostile.url), extra).await;
        let err = fails_within(&engine, Duration::from_secs(20)).await;
        assert!(err.contains("redirect"), "{err}");
    }
    assert_eq!(elsewhere.hits(), 0, "a redirect reached another origin");
    // Within the same origin, with the option.
    let engine = connect(&format!("{}/redirect", hostile.url), "").await;
    fails_within(&engine, Duration::from_secs(20)).await;
    let engine = connect(
        &format!("{}/redirect", hostile.url),
        ", follow_redirects 'same-origin'",
    )
    .await;
    engine
        .run_sql("INSERT INTO hooks.users SELECT 1 AS id")
        .await
        .unwrap();
}

/// A webhook url from env() is a secret as a whole: its path and query string (which carry
/// tokens) appear nowhere — not in SHOW CONNECTIONS, EXPLAIN, the summary, errors, debug logs
/// or the run records in the state folder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_from_env_is_never_shown_beyond_its_host() {
    let hostile = Hostile::start().await;
    let dir = scratch();
    std::fs::write(
        dir.path().join("s.sql"),
        "CREATE CONNECTION hooks TYPE webhook OPTIONS (url env('SLUICE_HOOK_URL'), key 'id', max_retry_time '1s');
SHOW CONNECTIONS;
EXPLAIN INSERT INTO hooks.users SELECT 1 AS id;
CREATE SYNC s AS INSERT INTO hooks.users SELECT 1 AS id;
RUN SYNC s;
",
    )
    .unwrap();
    let run = |url: String| {
        let dir = dir.path().to_path_buf();
        async move {
            tokio::task::spawn_blocking(move || {
                sluice(&dir)
                    .env("SLUICE_HOOK_URL", url)
                    .env("SLUICE_LOG", "debug")
                    .args(["run", "s.sql"])
                    .output()
                    .unwrap()
            })
            .await
            .unwrap()
        }
    };
    // A failing receiver (errors), then one that accepts (the summary line).
    for (path, code) in [
        ("down/tok_SECRET_PATH?key=SECRET_QUERY", 2),
        ("ok?key=SECRET_QUERY", 0),
    ] {
        let output = run(format!("{}/{path}", hostile.url)).await;
        let mut all = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(output.status.code(), Some(code), "{all}");
        for file in super::support::files_under(&dir.path().join(".sluice")) {
            all.push_str(&String::from_utf8_lossy(&std::fs::read(file).unwrap()));
        }
        assert!(!all.contains("SECRET"), "a secret leaked:\n{all}");
        assert!(all.contains(&format!("{}/***", hostile.url)), "{all}");
    }
}
