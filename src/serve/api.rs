//! The HTTP API of `sluice serve`: JSON, no secret in any answer.
//!
//! ```text
//! GET  /                               the status page (HTML)
//! GET  /openapi.json                   this API, described (docs/api/openapi.json)
//! GET  /healthz                        the process is up
//! GET  /readyz                         the project is loaded and the state is reachable (JSON,
//!                                      with the files that did not reload)
//! GET  /metrics                        Prometheus text
//! GET  /api/syncs                      every named sync: schedule, next run, running run, last run
//! GET  /api/syncs/{name}/runs          its runs, newest first (rows of sluice.runs)
//! POST /api/syncs/{name}/runs          run it now: 202 {"run_id"}; ?wait=true: 200 with the run's row
//! GET  /api/syncs/{name}/rejects       its rejected records (rows of sluice.rejects)
//! GET  /api/runs/{id}                  one run (a row of sluice.runs)
//! ```
//!
//! POST needs `Authorization: Bearer <token>` (the token of `--api-token-file` or
//! `SLUICE_API_TOKEN`, compared in constant time); without a configured token it is off.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use datafusion::arrow::array::RecordBatch;
use datafusion::prelude::{col, lit};
use serde_json::{Value, json};

use super::runner::{Runner, Started};

/// What the routes share.
#[derive(Clone)]
pub struct Api {
    pub runner: Arc<Runner>,
    pub token: Option<String>,
    pub loading: Arc<std::sync::Mutex<super::Loading>>,
}

/// The API's description, served at `/openapi.json`; the tests check the server against it.
pub const OPENAPI: &str = include_str!("../../docs/api/openapi.json");

/// Requests carry no body worth more than this.
const BODY_LIMIT: usize = 16 * 1024;

/// Rows a list answers at most.
const MAX_ROWS: usize = 100;

pub fn router(api: Api) -> Router {
    Router::new()
        .route("/", get(status_page))
        .route(
            "/openapi.json",
            get(|| async {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    OPENAPI,
                )
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(prometheus))
        .route("/api/syncs", get(syncs))
        .route("/api/syncs/{name}/runs", get(runs).post(run_now))
        .route("/api/syncs/{name}/rejects", get(rejects))
        .route("/api/runs/{id}", get(run))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route; see GET /api/syncs") })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(api)
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

fn internal(e: impl std::fmt::Display) -> Response {
    error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string())
}

/// Whether two byte strings are equal, in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `None` when the request may mutate, else the answer refusing it.
fn refused(api: &Api, headers: &HeaderMap) -> Option<Response> {
    let Some(token) = &api.token else {
        return Some(error(
            StatusCode::FORBIDDEN,
            "the mutating API is off: start sluice serve with --api-token-file or SLUICE_API_TOKEN",
        ));
    };
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(given) if constant_time_eq(given.as_bytes(), token.as_bytes()) => None,
        _ => Some(error(
            StatusCode::UNAUTHORIZED,
            "send Authorization: Bearer <the API token>",
        )),
    }
}

async fn ready(State(api): State<Api>) -> Response {
    let (errors, reloads) = {
        let l = api.loading.lock().expect("loading");
        (l.errors.clone(), l.reloads)
    };
    let reachable = match with_engine(&api, |engine| {
        let ctx = engine.context().clone();
        async move {
            ctx.table("sluice.runs")
                .await?
                .limit(0, Some(1))?
                .collect()
                .await
        }
    })
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("the state is not reachable: {e}")),
        Err(_) => Err("no session".to_string()),
    };
    let status = if reachable.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({
            "ready": reachable.is_ok(),
            "state": reachable.err(),
            "reloads": reloads,
            "reload_errors": errors,
        })),
    )
        .into_response()
}

async fn prometheus() -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        super::metrics::render(),
    )
        .into_response()
}

/// Runs `f` on the loaded session.
async fn with_engine<F, Fut, T>(api: &Api, f: F) -> Result<T, Response>
where
    F: FnOnce(&crate::engine::Engine) -> Fut,
    Fut: Future<Output = T>,
{
    let project = api.runner.project();
    match project.engine() {
        Some(engine) => Ok(f(engine).await),
        None => Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no session is loaded",
        )),
    }
}

async fn syncs(State(api): State<Api>) -> Response {
    Json(json!({ "syncs": api.runner.statuses() })).into_response()
}

/// Rows of `table` (a `sluice.*` table), where `column` = `value` if given, newest first by
/// `order` if given, at most `limit`, as JSON objects. The value is a literal expression, never
/// SQL text.
async fn query(
    api: &Api,
    table: &str,
    filter: Option<(&str, &str)>,
    order: Option<&str>,
    limit: Option<usize>,
) -> Result<Vec<Value>, Response> {
    let table = table.to_string();
    let filter = filter.map(|(c, v)| (c.to_string(), v.to_string()));
    let order = order.map(str::to_string);
    let batches = with_engine(api, |engine| {
        let ctx = engine.context().clone();
        async move {
            let mut frame = ctx.table(table.as_str()).await?;
            if let Some((column, value)) = filter {
                frame = frame.filter(col(column.as_str()).eq(lit(value)))?;
            }
            if let Some(order) = order {
                frame = frame.sort(vec![col(order.as_str()).sort(false, true)])?;
            }
            frame.limit(0, limit)?.collect().await
        }
    })
    .await?
    .map_err(internal)?;
    json_rows(&batches).map_err(internal)
}

/// At most [`MAX_ROWS`] rows of `table` where `column` = `value`, newest first by `order`.
async fn rows(
    api: &Api,
    table: &str,
    column: &str,
    value: &str,
    order: Option<&str>,
) -> Result<Vec<Value>, Response> {
    query(api, table, Some((column, value)), order, Some(MAX_ROWS)).await
}

async fn status_page(State(api): State<Api>) -> Response {
    let runs = match query(&api, "sluice.runs", None, Some("started_at"), None).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    let rejects = query(&api, "sluice.rejects", None, Some("last_seen"), None)
        .await
        .unwrap_or_default();
    let errors = api.loading.lock().expect("loading").errors.clone();
    axum::response::Html(super::page::render(
        &api.runner.statuses(),
        &runs,
        &rejects,
        &errors,
    ))
    .into_response()
}

fn json_rows(batches: &[RecordBatch]) -> Result<Vec<Value>, String> {
    let mut buf = Vec::new();
    let mut writer = datafusion::arrow::json::ArrayWriter::new(&mut buf);
    let refs: Vec<&RecordBatch> = batches.iter().collect();
    writer
        .write_batches(&refs)
        .and_then(|_| writer.finish())
        .map_err(|e| e.to_string())?;
    drop(writer);
    if buf.is_empty() {
        return Ok(vec![]);
    }
    serde_json::from_slice(&buf).map_err(|e| e.to_string())
}

fn unknown_sync(api: &Api, name: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        &format!(
            "no sync named '{name}'; the syncs are: {}",
            api.runner.names().join(", ")
        ),
    )
}

async fn runs(State(api): State<Api>, Path(name): Path<String>) -> Response {
    if api.runner.status(&name).is_none() {
        return unknown_sync(&api, &name);
    }
    match rows(&api, "sluice.runs", "sync", &name, Some("started_at")).await {
        Ok(rows) => Json(json!({ "runs": rows })).into_response(),
        Err(r) => r,
    }
}

async fn rejects(State(api): State<Api>, Path(name): Path<String>) -> Response {
    if api.runner.status(&name).is_none() {
        return unknown_sync(&api, &name);
    }
    match rows(&api, "sluice.rejects", "sync", &name, Some("last_seen")).await {
        Ok(rows) => Json(json!({ "rejects": rows })).into_response(),
        Err(r) => r,
    }
}

async fn run(State(api): State<Api>, Path(id): Path<String>) -> Response {
    match rows(&api, "sluice.runs", "run_id", &id, None).await {
        Ok(mut rows) if !rows.is_empty() => Json(rows.swap_remove(0)).into_response(),
        Ok(_) => error(StatusCode::NOT_FOUND, &format!("no run with id '{id}'")),
        Err(r) => r,
    }
}

#[derive(serde::Deserialize)]
struct RunQuery {
    #[serde(default)]
    wait: bool,
}

async fn run_now(
    State(api): State<Api>,
    Path(name): Path<String>,
    Query(query): Query<RunQuery>,
    headers: HeaderMap,
) -> Response {
    if let Some(refusal) = refused(&api, &headers) {
        return refusal;
    }
    match api.runner.start(&name, super::Cause::Api) {
        None => unknown_sync(&api, &name),
        Some(Started::Stopping) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "sluice serve is stopping; no new runs",
        ),
        Some(Started::Running(id)) => (
            StatusCode::CONFLICT,
            Json(json!({
                "error": format!("sync {name} is already running (run {id})"),
                "run_id": id,
            })),
        )
            .into_response(),
        Some(Started::New(id, done)) if query.wait => {
            let _ = done.await;
            match rows(&api, "sluice.runs", "run_id", &id, None).await {
                Ok(mut rows) if !rows.is_empty() => Json(rows.swap_remove(0)).into_response(),
                // It failed before it recorded itself (its plan failed).
                Ok(_) => {
                    let status = api.runner.status(&name);
                    Json(json!({
                        "run_id": id,
                        "status": status.as_ref().and_then(|s| s.last_status.clone()),
                        "error": status.and_then(|s| s.last_error),
                        "unrecorded": true,
                    }))
                    .into_response()
                }
                Err(r) => r,
            }
        }
        Some(Started::New(id, _)) => {
            (StatusCode::ACCEPTED, Json(json!({ "run_id": id }))).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"s3cret", b"s3cret"));
        assert!(!constant_time_eq(b"s3cret", b"s3creT"));
        assert!(!constant_time_eq(b"s3cret", b"s3cre"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
