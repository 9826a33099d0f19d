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

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use datafusion::arrow::array::{ArrayRef, RecordBatch, RecordBatchOptions};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::ScalarValue;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::datasource::TableType;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::TaskContext;
use datafusion::logical_expr::{Expr, Operator, TableProviderFilterPushDown};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
    ReplaceChildrenOptions, SendableRecordBatchStream,
};
use http::Method;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::api::{HubspotConnection, ObjectSchema};
use super::config::MAX_BATCH_SIZE;
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
    let id_column = |e: &Expr| match e {
        Expr::Column(c) if object.is_id_property(&c.name) => Some(c.name.clone()),
        _ => None,
    };
    let value = |e: &Expr| match e {
        Expr::Literal(v, _) => literal_text(v),
        _ => None,
    };
    match filter {
        Expr::BinaryExpr(b) if b.op == Operator::Eq => {
            match (id_column(&b.left), id_column(&b.right)) {
                (Some(c), None) => Some((c, vec![value(&b.right)?])),
                (None, Some(c)) => Some((c, vec![value(&b.left)?])),
                _ => None,
            }
        }
        Expr::InList(list) if !list.negated => {
            let column = id_column(&list.expr)?;
            let values = list.list.iter().map(value).collect::<Option<Vec<_>>>()?;
            Some((column, values))
        }
        // (DataFusion writes a short IN list as equalities joined by OR.)
        Expr::BinaryExpr(b) if b.op == Operator::Or => {
            let (left, mut values) = lookup_of(&b.left, object)?;
            let (right, more) = lookup_of(&b.right, object)?;
            (left == right).then(|| {
                values.extend(more);
                (left, values)
            })
        }
        _ => None,
    }
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

#[async_trait]
impl TableProvider for HubspotReader {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.object.fields)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        Ok(filters
            .iter()
            .map(|f| match lookup_of(f, &self.object) {
                // (Applied again after: HubSpot matches emails whatever their case.)
                Some(_) => TableProviderFilterPushDown::Inexact,
                None => TableProviderFilterPushDown::Unsupported,
            })
            .collect())
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let schema = match projection {
            Some(p) => Arc::new(self.object.fields.project(p)?),
            None => Arc::clone(&self.object.fields),
        };
        // Several lookups: the first narrows the read; the rest are applied after.
        let lookup = filters.iter().find_map(|f| lookup_of(f, &self.object));
        Ok(Arc::new(HubspotScanExec::new(
            Arc::clone(&self.connection),
            Arc::clone(&self.object),
            schema,
            lookup,
            limit,
        )))
    }
}

/// Reads a HubSpot object: pages of a scan, or `batch/read` of the records a filter names.
#[derive(Debug)]
pub struct HubspotScanExec {
    connection: Arc<HubspotConnection>,
    object: Arc<ObjectSchema>,
    schema: SchemaRef,
    lookup: Option<(String, Vec<String>)>,
    limit: Option<usize>,
    properties: Arc<PlanProperties>,
}

impl HubspotScanExec {
    fn new(
        connection: Arc<HubspotConnection>,
        object: Arc<ObjectSchema>,
        schema: SchemaRef,
        lookup: Option<(String, Vec<String>)>,
        limit: Option<usize>,
    ) -> Self {
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(Arc::clone(&schema)),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Incremental,
            Boundedness::Bounded,
        ));
        Self {
            connection,
            object,
            schema,
            lookup,
            limit,
            properties,
        }
    }

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
}

impl DisplayAs for HubspotScanExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "HubspotScanExec: connection={} object={} properties=[{}]",
            self.connection.name,
            self.object.name,
            self.asked().join(", ")
        )?;
        match &self.lookup {
            Some((property, values)) => write!(
                f,
                " batch/read by {property} ({} value{})",
                values.len(),
                if values.len() == 1 { "" } else { "s" }
            )?,
            None => write!(f, " scan pages of {PAGE}")?,
        }
        if let Some(limit) = self.limit {
            write!(f, " limit={limit}")?;
        }
        Ok(())
    }
}

impl ExecutionPlan for HubspotScanExec {
    fn name(&self) -> &'static str {
        "HubspotScanExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn replace_children(
        self: Arc<Self>,
        _children: Vec<Arc<dyn ExecutionPlan>>,
        _options: ReplaceChildrenOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    #[allow(deprecated)]
    fn with_new_children(
        self: Arc<Self>,
        _children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn execute(
        &self,
        partition: usize,
        _context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        if partition != 0 {
            return Err(DataFusionError::Internal(format!(
                "HubspotScanExec has one partition, not {partition}"
            )));
        }
        let read = Read {
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
        };
        let stream = futures::stream::try_unfold(read, |mut read| async move {
            Ok(read.next_batch().await?.map(|b| (b, read)))
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            Arc::clone(&self.schema),
            stream,
        )))
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

impl Read {
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
