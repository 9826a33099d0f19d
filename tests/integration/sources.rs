//! Sources through object_store URLs: a Parquet file served over HTTP (with range requests, as
//! object stores serve it) is a table like a local one.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::Response;
use sluice::Outcome;

/// Serves `bytes` at `/data/customers.parquet` with HEAD and `Range: bytes=a-b` support.
async fn serve(bytes: Vec<u8>) -> (String, tokio::task::JoinHandle<()>) {
    let bytes = Arc::new(bytes);
    let app = Router::new().route(
        "/data/customers.parquet",
        axum::routing::any(move |method: Method, headers: HeaderMap| {
            let bytes = Arc::clone(&bytes);
            async move {
                let len = bytes.len();
                let range = headers
                    .get(header::RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("bytes="))
                    .and_then(|r| r.split_once('-'))
                    .map(|(a, b)| {
                        let start: usize = a.parse().unwrap_or(0);
                        let end: usize = b.parse().map(|e: usize| e + 1).unwrap_or(len);
                        (start, end.min(len))
                    });
                let builder = Response::builder()
                    .header(header::LAST_MODIFIED, "Sun, 22 Nov 2026 00:00:00 GMT")
                    .header(header::ACCEPT_RANGES, "bytes");
                if method == Method::HEAD {
                    return builder
                        .header(header::CONTENT_LENGTH, len)
                        .body(Body::empty())
                        .unwrap();
                }
                match range {
                    Some((start, end)) => builder
                        .status(StatusCode::PARTIAL_CONTENT)
                        .header(
                            header::CONTENT_RANGE,
                            format!("bytes {start}-{}/{len}", end - 1),
                        )
                        .body(Body::from(bytes[start..end].to_vec()))
                        .unwrap(),
                    None => builder.body(Body::from(bytes.to_vec())).unwrap(),
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        axum::serve(listener, app).await.ok();
    });
    (format!("http://{addr}/data/customers.parquet"), server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parquet_over_http_is_a_table() {
    let parquet =
        std::fs::read(super::support::repo_root().join("sql_examples/data/customers.parquet"))
            .unwrap();
    let (url, server) = serve(parquet).await;
    let engine = super::support::engine();
    let outcomes = engine
        .run_sql(&format!(
            "CREATE EXTERNAL TABLE remote STORED AS PARQUET LOCATION '{url}';
             SELECT count(*) AS n, count(DISTINCT plan) AS plans FROM remote;"
        ))
        .await
        .unwrap();
    let Some(Outcome::Rows { batches, .. }) = outcomes.last() else {
        panic!("{outcomes:?}")
    };
    let text = datafusion::arrow::util::pretty::pretty_format_batches(batches)
        .unwrap()
        .to_string();
    assert!(text.contains("| 5000 | 4     |"), "{text}");
    server.abort();
}
