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
//! Not built yet: Bulk API 2.0 query jobs for very large reads (a REST query reads 2,000 records
//! per call).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use datafusion::arrow::array::{ArrayRef, RecordBatch, RecordBatchOptions};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::ScalarValue;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::Expr;
use serde_json::Value;

use super::api::{LOOKUP_CHUNK, QueryPage, SObject, SalesforceConnection, soql_list};
use crate::connectors::paged::{PagedScanExec, PagedSource, Pages, key_lookup};
use crate::connectors::typed::{json_text, typed_column};

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
            Arc::new(move || Box::new(plan.start()) as Box<dyn Pages>),
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
            queries: self.queries().into(),
            page: None,
            left: self.limit,
            records: 0,
            logged: Instant::now(),
        }
    }
}

/// The state of one read.
struct Read {
    connection: Arc<SalesforceConnection>,
    object: Arc<SObject>,
    schema: SchemaRef,
    /// Queries not started yet.
    queries: std::collections::VecDeque<String>,
    /// The query being read.
    page: Option<QueryPage>,
    /// Records still wanted (`LIMIT`).
    left: Option<usize>,
    records: u64,
    logged: Instant,
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
            let page = match &mut self.page {
                Some(page) => page,
                None => match self.queries.pop_front() {
                    Some(soql) => self.page.insert(QueryPage::first(&self.connection, &soql)),
                    None => return Ok(None),
                },
            };
            let Some(mut records) = self
                .connection
                .query_page(page, &what, None)
                .await
                .map_err(DataFusionError::from)?
            else {
                self.page = None;
                continue;
            };
            self.records += records.len() as u64;
            if self.logged.elapsed() >= LOG_EVERY {
                self.logged = Instant::now();
                tracing::info!(target = %what, records = self.records, "Reading Salesforce records.");
            }
            if let Some(left) = &mut self.left {
                records.truncate(*left);
                *left -= records.len();
            }
            if records.is_empty() {
                continue;
            }
            return self.batch(&records).map(Some);
        }
    }
}

impl Read {
    /// The records as typed columns.
    fn batch(&self, records: &[Value]) -> Result<RecordBatch> {
        let columns = self
            .schema
            .fields()
            .iter()
            .map(|field| {
                let values: Vec<Option<String>> = records
                    .iter()
                    .map(|r| match field.name().split_once('.') {
                        // A relationship column comes back nested: `"Account":{"Ext__c":"A-1"}`.
                        Some((relationship, parent_field)) => {
                            json_text(r.get(relationship).and_then(|p| p.get(parent_field)))
                        }
                        None => json_text(r.get(field.name())),
                    })
                    .collect();
                typed_column(field.data_type(), &values, |i, v| {
                    self.connection.error(format!(
                        "{}.{} record {}: field '{}' holds '{v}', which is not a {}",
                        self.connection.name,
                        self.object.name,
                        json_text(records[i].get("Id")).unwrap_or_default(),
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
            &RecordBatchOptions::new().with_row_count(Some(records.len())),
        )?)
    }
}
