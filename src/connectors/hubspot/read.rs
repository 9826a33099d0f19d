//! Reading HubSpot objects: `SELECT … FROM crm.contacts` through HubSpot's own read APIs.
//!
//! - A scan pages through `GET /crm/v3/objects/{object}?limit=100&after=…&properties=…`, asking
//!   only for the selected properties, and stops as soon as a `LIMIT` is met.
//! - A filter `key = value` or `key IN (values)` on a property that identifies records (`email`
//!   for contacts, a property with unique values, `hs_object_id`) becomes `batch/read` calls of
//!   100 ids instead of a scan. The filter is also applied after (HubSpot matches emails without
//!   regard to case), so the answer is exactly SQL's.
//! - Every call goes through the connection's rate limiter and retry policy, as writes do.
//! - Values come back as strings and are typed as the properties API declares them (numbers,
//!   booleans, dates as `YYYY-MM-DD` or epoch milliseconds, datetimes as ISO 8601 or epoch
//!   milliseconds); a value that does not parse is an error naming the record and the property.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use datafusion::arrow::array::{ArrayRef, RecordBatch, RecordBatchOptions};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::ScalarValue;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::Expr;
use http::Method;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::api::{HubspotConnection, ObjectSchema};
use super::config::MAX_BATCH_SIZE;
use crate::connectors::paged::{PagedScanExec, PagedSource, Pages, key_lookup};
use crate::connectors::typed::{json_text, typed_column};
use crate::delivery::control::expect_success;

/// Records per page of a scan (HubSpot's maximum).
const PAGE: usize = 100;

/// How often a long read logs how far it got.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// A HubSpot object as a table.
#[derive(Debug)]
pub struct HubspotReader {
    connection: Arc<HubspotConnection>,
    object: Arc<ObjectSchema>,
}

impl HubspotReader {
    pub fn new(connection: Arc<HubspotConnection>, object: Arc<ObjectSchema>) -> Self {
        Self { connection, object }
    }
}

/// The records a filter names by a property that identifies them: (property, values).
fn lookup_of(filter: &Expr, object: &ObjectSchema) -> Option<(String, Vec<String>)> {
    key_lookup(filter, &|c| object.is_id_property(c), &literal_text)
}

/// A literal as HubSpot spells the value (`12` for the number 12.0).
fn literal_text(v: &ScalarValue) -> Option<String> {
    match v {
        ScalarValue::Utf8(Some(s))
        | ScalarValue::Utf8View(Some(s))
        | ScalarValue::LargeUtf8(Some(s)) => Some(s.clone()),
        ScalarValue::Int64(Some(n)) => Some(n.to_string()),
        ScalarValue::Int32(Some(n)) => Some(n.to_string()),
        ScalarValue::Float64(Some(f)) if f.fract() == 0.0 && f.abs() < 1e15 => {
            Some(format!("{}", *f as i64))
        }
        ScalarValue::Float64(Some(f)) => Some(f.to_string()),
        _ => None,
    }
}

impl PagedSource for HubspotReader {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.object.fields)
    }

    /// (HubSpot matches emails whatever their case: the filter is applied again after.)
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
            "HubspotScanExec",
            plan.shown(),
            schema,
            Arc::new(move |_| Box::new(plan.start()) as Box<dyn Pages>),
        )
    }
}

/// What a read asks for, and what EXPLAIN shows of it.
#[derive(Debug, Clone)]
struct Plan {
    connection: Arc<HubspotConnection>,
    object: Arc<ObjectSchema>,
    schema: SchemaRef,
    lookup: Option<(String, Vec<String>)>,
    limit: Option<usize>,
}

impl Plan {
    /// The properties each call asks for (at least one, so that a count reads ids only).
    fn asked(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .schema
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        if names.is_empty() {
            names.push("hs_object_id".into());
        }
        names
    }

    /// `connection=… object=… properties=[…] batch/read by email (2 values) limit=10`.
    fn shown(&self) -> String {
        let mut shown = format!(
            "connection={} object={} properties=[{}]",
            self.connection.name,
            self.object.name,
            self.asked().join(", ")
        );
        match &self.lookup {
            Some((property, values)) => shown.push_str(&format!(
                " batch/read by {property} ({} value{})",
                values.len(),
                if values.len() == 1 { "" } else { "s" }
            )),
            None => shown.push_str(&format!(" scan pages of {PAGE}")),
        }
        if let Some(limit) = self.limit {
            shown.push_str(&format!(" limit={limit}"));
        }
        shown
    }

    fn start(&self) -> Read {
        Read {
            connection: Arc::clone(&self.connection),
            object: Arc::clone(&self.object),
            schema: Arc::clone(&self.schema),
            asked: self.asked(),
            pending: self
                .lookup
                .clone()
                .map(|(property, values)| (property, values.into_iter().collect())),
            after: None,
            left: self.limit,
            done: false,
            records: 0,
            logged: Instant::now(),
        }
    }
}

/// The state of one read.
struct Read {
    connection: Arc<HubspotConnection>,
    object: Arc<ObjectSchema>,
    schema: SchemaRef,
    asked: Vec<String>,
    /// A lookup's values not read yet.
    pending: Option<(String, std::collections::VecDeque<String>)>,
    /// A scan's cursor.
    after: Option<String>,
    /// Records still wanted (`LIMIT`).
    left: Option<usize>,
    done: bool,
    records: u64,
    logged: Instant,
}

#[derive(Debug, Deserialize)]
struct Page {
    #[serde(default)]
    results: Vec<Found>,
    #[serde(default)]
    paging: Option<Paging>,
}

#[derive(Debug, Deserialize)]
struct Found {
    id: String,
    #[serde(default)]
    properties: Map<String, Value>,
}

#[derive(Debug, Deserialize)]
struct Paging {
    next: Option<Next>,
}

#[derive(Debug, Deserialize)]
struct Next {
    after: String,
}

#[async_trait]
impl Pages for Read {
    /// The next page (or lookup chunk) as a batch; `None` at the end.
    async fn next_batch(&mut self) -> Result<Option<RecordBatch>> {
        loop {
            if self.done || self.left == Some(0) {
                return Ok(None);
            }
            let found = match &mut self.pending {
                Some((property, values)) => {
                    let n = values.len().min(MAX_BATCH_SIZE);
                    if n == 0 {
                        self.done = true;
                        return Ok(None);
                    }
                    let chunk: Vec<Value> = values.drain(..n).map(|v| json!({ "id": v })).collect();
                    let property = property.clone();
                    self.read_by(&property, chunk).await?
                }
                None => self.page().await?,
            };
            self.records += found.len() as u64;
            if self.logged.elapsed() >= LOG_EVERY {
                self.logged = Instant::now();
                tracing::info!(
                    target = %format!("{}.{}", self.connection.name, self.object.name),
                    records = self.records,
                    "Reading HubSpot records."
                );
            }
            let mut found = found;
            if let Some(left) = &mut self.left {
                found.truncate(*left);
                *left -= found.len();
            }
            if found.is_empty() {
                continue;
            }
            return self.batch(&found).map(Some);
        }
    }
}

impl Read {
    /// One page of a scan.
    async fn page(&mut self) -> Result<Vec<Found>> {
        let limit = self.left.map_or(PAGE, |l| l.clamp(1, PAGE));
        let query = {
            let mut query = url::form_urlencoded::Serializer::new(String::new());
            query.append_pair("limit", &limit.to_string());
            query.append_pair("archived", "false");
            query.append_pair("properties", &self.asked.join(","));
            if let Some(after) = &self.after {
                query.append_pair("after", after);
            }
            query.finish()
        };
        let path = format!("/crm/v3/objects/{}?{query}", self.object.name);
        let response = self
            .connection
            .call(Method::GET, &path, None, None)
            .await
            .map_err(DataFusionError::from)?;
        expect_success(
            self.connection.as_ref(),
            &response,
            &format!("reading {}.{}", self.connection.name, self.object.name),
        )
        .map_err(DataFusionError::from)?;
        let page: Page = serde_json::from_slice(&response.body).map_err(|e| self.shape(e))?;
        self.after = page.paging.and_then(|p| p.next).map(|n| n.after);
        self.done = self.after.is_none();
        Ok(page.results)
    }

    /// The records whose `property` is one of `inputs` (`batch/read`; ids HubSpot has no
    /// record for are left out).
    async fn read_by(&self, property: &str, inputs: Vec<Value>) -> Result<Vec<Found>> {
        let body = json!({
            "idProperty": property,
            "properties": self.asked,
            "inputs": inputs,
        });
        let response = self
            .connection
            .call(
                Method::POST,
                &format!("/crm/v3/objects/{}/batch/read", self.object.name),
                Some(body),
                None,
            )
            .await
            .map_err(DataFusionError::from)?;
        expect_success(
            self.connection.as_ref(),
            &response,
            &format!(
                "reading {}.{} by {property}",
                self.connection.name, self.object.name
            ),
        )
        .map_err(DataFusionError::from)?;
        let page: Page = serde_json::from_slice(&response.body).map_err(|e| self.shape(e))?;
        Ok(page.results)
    }

    fn shape(&self, e: serde_json::Error) -> DataFusionError {
        DataFusionError::from(self.connection.error(format!(
            "records of {} came back in a shape sluice does not know ({e})",
            self.object.name
        )))
    }

    /// The records as typed columns.
    fn batch(&self, found: &[Found]) -> Result<RecordBatch> {
        let columns = self
            .schema
            .fields()
            .iter()
            .map(|field| {
                let values: Vec<Option<String>> = found
                    .iter()
                    .map(|r| match json_text(r.properties.get(field.name())) {
                        None if field.name() == "hs_object_id" => Some(r.id.clone()),
                        v => v,
                    })
                    .collect();
                typed_column(field.data_type(), &values, |i, v| {
                    self.connection.error(format!(
                        "{}.{} record {}: property '{}' holds '{v}', which is not a {}",
                        self.connection.name,
                        self.object.name,
                        found[i].id,
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
            &RecordBatchOptions::new().with_row_count(Some(found.len())),
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_are_spelled_as_hubspot_spells_values() {
        assert_eq!(
            literal_text(&ScalarValue::Float64(Some(12.0))).as_deref(),
            Some("12")
        );
        assert_eq!(
            literal_text(&ScalarValue::Float64(Some(1.5))).as_deref(),
            Some("1.5")
        );
        assert_eq!(
            literal_text(&ScalarValue::Utf8(Some("a@x.io".into()))).as_deref(),
            Some("a@x.io")
        );
        assert_eq!(literal_text(&ScalarValue::Boolean(Some(true))), None);
    }
}
