//! Reading Salesforce objects: `SELECT … FROM sf.contact` as SOQL through the REST query API.
//!
//! - A scan is `SELECT <selected fields> FROM <object> [LIMIT n]`, its pages followed by
//!   `nextRecordsUrl`.
//! - A filter `key = value` or `key IN (values)` on a field records are matched by (an External
//!   ID field, or `Id`) becomes `WHERE key IN (…)` queries of 100 values. The filter is also
//!   applied after (SOQL compares text without regard to case), so the answer is exactly SQL's.
//! - Every call goes through the connection's session, rate limiter and quota, as writes do.
//! - Values are typed as the describe declares them; a value that does not parse is an error
//!   naming the record and the field.
//!
//! - A scan of more than `bulk_threshold` records (counted first under `api 'auto'`; always
//!   under `api 'bulk'`) runs as a Bulk API 2.0 query job: created, polled until complete, its
//!   CSV results read 50,000 records a page by `Sforce-Locator`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use datafusion::arrow::array::{ArrayRef, RecordBatch, RecordBatchOptions};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::ScalarValue;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::Expr;
use http::Method;
use serde_json::Value;

use super::api::{LOOKUP_CHUNK, QueryPage, SObject, SalesforceConnection, poll_wait, soql_list};
use super::config::Api;
use crate::connectors::paged::{PagedScanExec, PagedSource, Pages, key_lookup};
use crate::connectors::typed::{json_text, typed_column};
use crate::delivery::control::expect_success;

/// How often a long read logs how far it got.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// A Salesforce object as a table.
#[derive(Debug)]
pub struct SalesforceReader {
    connection: Arc<SalesforceConnection>,
    object: Arc<SObject>,
}

impl SalesforceReader {
    pub fn new(connection: Arc<SalesforceConnection>, object: Arc<SObject>) -> Self {
        Self { connection, object }
    }
}

/// The records a filter names by a field they are matched by: (field, values).
fn lookup_of(filter: &Expr, object: &SObject) -> Option<(String, Vec<String>)> {
    let keys = object.match_keys();
    key_lookup(filter, &|c| keys.iter().any(|k| k == c), &|v| match v {
        ScalarValue::Utf8(Some(s))
        | ScalarValue::Utf8View(Some(s))
        | ScalarValue::LargeUtf8(Some(s)) => Some(s.clone()),
        _ => None,
    })
}

impl PagedSource for SalesforceReader {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.object.fields)
    }

    /// (SOQL compares text whatever its case: the filter is applied again after.)
    fn lookup(&self, filter: &Expr) -> Option<(String, Vec<String>)> {
        lookup_of(filter, &self.object)
    }

    fn scan(
        &self,
        schema: SchemaRef,
        lookup: Option<(String, Vec<String>)>,
        limit: Option<usize>,
    ) -> PagedScanExec {
        let plan = Plan {
            connection: Arc::clone(&self.connection),
            object: Arc::clone(&self.object),
            schema: Arc::clone(&schema),
            lookup,
            limit,
        };
        PagedScanExec::new(
            "SalesforceScanExec",
            plan.shown(),
            schema,
            Arc::new(move |_| Box::new(plan.start()) as Box<dyn Pages>),
        )
    }
}

/// What a read asks for, and what EXPLAIN shows of it.
#[derive(Debug, Clone)]
struct Plan {
    connection: Arc<SalesforceConnection>,
    object: Arc<SObject>,
    schema: SchemaRef,
    lookup: Option<(String, Vec<String>)>,
    limit: Option<usize>,
}

impl Plan {
    /// The SOQL queries of this read: one for a scan, one per chunk of looked-up values.
    fn queries(&self) -> Vec<String> {
        let mut fields: Vec<&str> = self
            .schema
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect();
        if fields.is_empty() {
            fields.push("Id");
        }
        let select = format!("SELECT {} FROM {}", fields.join(", "), self.object.name);
        let limit = self
            .limit
            .map(|n| format!(" LIMIT {n}"))
            .unwrap_or_default();
        match &self.lookup {
            None => vec![format!("{select}{limit}")],
            Some((field, values)) => values
                .chunks(LOOKUP_CHUNK)
                .map(|chunk| format!("{select} WHERE {field} IN ({}){limit}", soql_list(chunk)))
                .collect(),
        }
    }

    /// `connection=… soql=[…] and n more queries`.
    fn shown(&self) -> String {
        let queries = self.queries();
        let mut shown = format!(
            "connection={} soql=[{}]",
            self.connection.name,
            queries.first().map(String::as_str).unwrap_or("")
        );
        if queries.len() > 1 {
            shown.push_str(&format!(" and {} more queries", queries.len() - 1));
        }
        shown
    }

    fn start(&self) -> Read {
        Read {
            connection: Arc::clone(&self.connection),
            object: Arc::clone(&self.object),
            schema: Arc::clone(&self.schema),
            queries: self.queries(),
            scan: self.lookup.is_none(),
            source: None,
            left: self.limit,
            records: 0,
            logged: Instant::now(),
        }
    }
}

/// Records per page of a Bulk query's results.
const BULK_PAGE: usize = 50_000;

/// Where a read's records come from.
enum Source {
    /// REST queries not started yet, and the one being read.
    Rest {
        queries: VecDeque<String>,
        page: Option<QueryPage>,
    },
    /// A Bulk API 2.0 query job's results: its path and the next page's locator (`None`: done).
    Bulk {
        job: String,
        locator: Option<String>,
    },
}

/// The state of one read.
struct Read {
    connection: Arc<SalesforceConnection>,
    object: Arc<SObject>,
    schema: SchemaRef,
    queries: Vec<String>,
    /// A scan (not a lookup): one query, which may go through Bulk.
    scan: bool,
    /// Decided by the first page.
    source: Option<Source>,
    /// Records still wanted (`LIMIT`).
    left: Option<usize>,
    records: u64,
    logged: Instant,
}

#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Job {
    id: String,
    #[serde(default)]
    state: String,
    #[serde(default)]
    error_message: Option<String>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Count {
    total_size: u64,
}

#[async_trait]
impl Pages for Read {
    /// The next page as a batch; `None` at the end.
    async fn next_batch(&mut self) -> Result<Option<RecordBatch>> {
        let what = format!("reading {}.{}", self.connection.name, self.object.name);
        loop {
            if self.left == Some(0) {
                return Ok(None);
            }
            if self.source.is_none() {
                let source = self.choose(&what).await.map_err(DataFusionError::from)?;
                self.source = Some(source);
            }
            let page = match self.source.as_mut().expect("chosen") {
                Source::Rest { queries, page } => {
                    let current = match page {
                        Some(page) => page,
                        None => match queries.pop_front() {
                            Some(soql) => page.insert(QueryPage::first(&self.connection, &soql)),
                            None => return Ok(None),
                        },
                    };
                    match self
                        .connection
                        .query_page(current, &what, None)
                        .await
                        .map_err(DataFusionError::from)?
                    {
                        Some(records) => Page::Json(records),
                        None => {
                            *page = None;
                            continue;
                        }
                    }
                }
                Source::Bulk { job, locator } => {
                    let Some(at) = locator.take() else {
                        return Ok(None);
                    };
                    let job = job.clone();
                    let (rows, next) = self
                        .bulk_page(&job, &at, &what)
                        .await
                        .map_err(DataFusionError::from)?;
                    if let Some(Source::Bulk { locator, .. }) = self.source.as_mut() {
                        *locator = next;
                    }
                    Page::Csv(rows)
                }
            };
            let mut page = page;
            self.records += page.len() as u64;
            if self.logged.elapsed() >= LOG_EVERY {
                self.logged = Instant::now();
                tracing::info!(target = %what, records = self.records, "Reading Salesforce records.");
            }
            if let Some(left) = &mut self.left {
                page.truncate(*left);
                *left -= page.len();
            }
            if page.len() == 0 {
                continue;
            }
            return self.batch(&page).map(Some);
        }
    }
}

/// One page of records: REST's JSON, or a Bulk page's CSV (its header first).
enum Page {
    Json(Vec<Value>),
    Csv(Vec<csv::StringRecord>),
}

impl Page {
    fn len(&self) -> usize {
        match self {
            Page::Json(r) => r.len(),
            Page::Csv(r) => r.len().saturating_sub(1),
        }
    }

    fn truncate(&mut self, n: usize) {
        match self {
            Page::Json(r) => r.truncate(n),
            Page::Csv(r) => r.truncate(n + 1),
        }
    }
}

impl Read {
    /// REST or Bulk: REST for lookups, `api 'rest'`, and scans of at most `bulk_threshold`
    /// records (a `LIMIT`, or `SELECT COUNT()` under `api 'auto'`); Bulk API 2.0 otherwise.
    async fn choose(&self, what: &str) -> crate::error::Result<Source> {
        let config = &self.connection.config;
        let rest = || Source::Rest {
            queries: self.queries.iter().cloned().collect(),
            page: None,
        };
        if !self.scan
            || config.api == Api::Rest
            || self.left.is_some_and(|n| n <= config.bulk_threshold)
        {
            return Ok(rest());
        }
        if config.api == Api::Auto {
            let soql = format!("SELECT COUNT() FROM {}", self.object.name);
            let query: String = url::form_urlencoded::byte_serialize(soql.as_bytes()).collect();
            let path = format!("{}/query?q={query}", config.data_path());
            let response = self.connection.call(Method::GET, &path, None, None).await?;
            expect_success(
                self.connection.as_ref(),
                &response,
                &format!("{what}: counting"),
            )?;
            let count: Count = serde_json::from_slice(&response.body).map_err(|e| {
                self.connection
                    .error(format!("{what}: a count sluice cannot read ({e})"))
            })?;
            if count.total_size as usize <= config.bulk_threshold {
                return Ok(rest());
            }
        }
        self.bulk_job(what).await
    }

    /// Starts a Bulk API 2.0 query job for the scan and waits for it to complete.
    async fn bulk_job(&self, what: &str) -> crate::error::Result<Source> {
        let c = &self.connection;
        let base = format!("{}/jobs/query", c.config.data_path());
        let body = serde_json::json!({"operation": "query", "query": self.queries[0]});
        let json = |v: &Value| Some(("application/json", bytes::Bytes::from(v.to_string())));
        let created = c.call(Method::POST, &base, json(&body), None).await?;
        expect_success(
            c.as_ref(),
            &created,
            &format!("{what}: creating a Bulk query job"),
        )?;
        let job: Job = serde_json::from_slice(&created.body).map_err(|e| {
            c.error(format!(
                "{what}: a Bulk job answer sluice cannot read ({e})"
            ))
        })?;
        let path = format!("{base}/{}", job.id);
        let started = tokio::time::Instant::now();
        for polls in 1.. {
            if started.elapsed() >= c.config.bulk_timeout {
                let abort = serde_json::json!({"state": "Aborted"});
                let _ = c.call(Method::PATCH, &path, json(&abort), None).await;
                return Err(c.error(format!(
                    "{what}: Bulk query job {} did not complete within bulk_timeout ({:?}); it was aborted",
                    job.id, c.config.bulk_timeout
                )));
            }
            tokio::time::sleep(poll_wait(c.config.poll_interval, polls)).await;
            let status = c.call(Method::GET, &path, None, None).await?;
            expect_success(
                c.as_ref(),
                &status,
                &format!("{what}: polling Bulk query job {}", job.id),
            )?;
            let state: Job = serde_json::from_slice(&status.body).map_err(|e| {
                c.error(format!(
                    "{what}: a Bulk job answer sluice cannot read ({e})"
                ))
            })?;
            match state.state.as_str() {
                "JobComplete" => break,
                "Failed" | "Aborted" => {
                    return Err(c.error(format!(
                        "{what}: Bulk query job {} ended {}: {}",
                        job.id,
                        state.state,
                        state.error_message.unwrap_or_default()
                    )));
                }
                _ => {}
            }
        }
        Ok(Source::Bulk {
            job: path,
            locator: Some(String::new()),
        })
    }

    /// One page of a Bulk query's results (CSV, header first) and the next page's locator.
    async fn bulk_page(
        &self,
        job: &str,
        locator: &str,
        what: &str,
    ) -> crate::error::Result<(Vec<csv::StringRecord>, Option<String>)> {
        let c = &self.connection;
        let mut path = format!("{job}/results?maxRecords={BULK_PAGE}");
        if !locator.is_empty() {
            let locator: String =
                url::form_urlencoded::byte_serialize(locator.as_bytes()).collect();
            path.push_str(&format!("&locator={locator}"));
        }
        let response = c.call_results(&path, None).await?;
        expect_success(
            c.as_ref(),
            &response,
            &format!("{what}: reading Bulk query results"),
        )?;
        let next = response
            .headers
            .get("sforce-locator")
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && *v != "null")
            .map(str::to_string);
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(false)
            .from_reader(response.body.as_ref());
        let rows = reader
            .records()
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| {
                c.error(format!(
                    "{what}: Bulk query results sluice cannot read ({e})"
                ))
            })?;
        Ok((rows, next))
    }

    /// The records as typed columns.
    fn batch(&self, page: &Page) -> Result<RecordBatch> {
        let n = page.len();
        // A CSV page's column of each field (Bulk writes an empty cell for null).
        let header: Option<Vec<Option<usize>>> = match page {
            Page::Csv(rows) => {
                let names = rows.first();
                Some(
                    self.schema
                        .fields()
                        .iter()
                        .map(|f| names.and_then(|h| h.iter().position(|c| c == f.name())))
                        .collect(),
                )
            }
            Page::Json(_) => None,
        };
        let value = |row: usize, i: usize, name: &str| -> Option<String> {
            match page {
                Page::Json(records) => match name.split_once('.') {
                    // A relationship column comes back nested: `"Account":{"Ext__c":"A-1"}`.
                    Some((relationship, parent_field)) => json_text(
                        records[row]
                            .get(relationship)
                            .and_then(|p| p.get(parent_field)),
                    ),
                    None => json_text(records[row].get(name)),
                },
                Page::Csv(rows) => {
                    let at = header.as_ref().and_then(|h| h[i])?;
                    rows[row + 1]
                        .get(at)
                        .filter(|v| !v.is_empty())
                        .map(str::to_string)
                }
            }
        };
        let id = |row: usize| match page {
            Page::Json(records) => json_text(records[row].get("Id")).unwrap_or_default(),
            Page::Csv(_) => format!("at row {}", row + 1),
        };
        let columns = self
            .schema
            .fields()
            .iter()
            .enumerate()
            .map(|(i, field)| {
                let values: Vec<Option<String>> =
                    (0..n).map(|row| value(row, i, field.name())).collect();
                typed_column(field.data_type(), &values, |row, v| {
                    self.connection.error(format!(
                        "{}.{} record {}: field '{}' holds '{v}', which is not a {}",
                        self.connection.name,
                        self.object.name,
                        id(row),
                        field.name(),
                        field.data_type()
                    ))
                })
                .map_err(DataFusionError::from)
            })
            .collect::<Result<Vec<ArrayRef>>>()?;
        Ok(RecordBatch::try_new_with_options(
            Arc::clone(&self.schema),
            columns,
            &RecordBatchOptions::new().with_row_count(Some(n)),
        )?)
    }
}
