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
use serde_json::Value;

use super::api::{LOOKUP_CHUNK, QueryPage, SObject, SalesforceConnection, soql_list};
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
    let key_column = |e: &Expr| match e {
        Expr::Column(c) if keys.contains(&c.name) => Some(c.name.clone()),
        _ => None,
    };
    let value = |e: &Expr| match e {
        Expr::Literal(
            ScalarValue::Utf8(Some(s))
            | ScalarValue::Utf8View(Some(s))
            | ScalarValue::LargeUtf8(Some(s)),
            _,
        ) => Some(s.clone()),
        _ => None,
    };
    match filter {
        Expr::BinaryExpr(b) if b.op == Operator::Eq => {
            match (key_column(&b.left), key_column(&b.right)) {
                (Some(c), None) => Some((c, vec![value(&b.right)?])),
                (None, Some(c)) => Some((c, vec![value(&b.left)?])),
                _ => None,
            }
        }
        Expr::InList(list) if !list.negated => {
            let column = key_column(&list.expr)?;
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

#[async_trait]
impl TableProvider for SalesforceReader {
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
                // (Applied again after: SOQL compares text whatever its case.)
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
        let lookup = filters.iter().find_map(|f| lookup_of(f, &self.object));
        Ok(Arc::new(SalesforceScanExec::new(
            Arc::clone(&self.connection),
            Arc::clone(&self.object),
            schema,
            lookup,
            limit,
        )))
    }
}

/// Reads a Salesforce object with SOQL queries.
#[derive(Debug)]
pub struct SalesforceScanExec {
    connection: Arc<SalesforceConnection>,
    object: Arc<SObject>,
    schema: SchemaRef,
    lookup: Option<(String, Vec<String>)>,
    limit: Option<usize>,
    properties: Arc<PlanProperties>,
}

impl SalesforceScanExec {
    fn new(
        connection: Arc<SalesforceConnection>,
        object: Arc<SObject>,
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
}

impl DisplayAs for SalesforceScanExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let queries = self.queries();
        write!(
            f,
            "SalesforceScanExec: connection={} soql=[{}]",
            self.connection.name,
            queries.first().map(String::as_str).unwrap_or("")
        )?;
        if queries.len() > 1 {
            write!(f, " and {} more queries", queries.len() - 1)?;
        }
        Ok(())
    }
}

impl ExecutionPlan for SalesforceScanExec {
    fn name(&self) -> &'static str {
        "SalesforceScanExec"
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
                "SalesforceScanExec has one partition, not {partition}"
            )));
        }
        let read = Read {
            connection: Arc::clone(&self.connection),
            object: Arc::clone(&self.object),
            schema: Arc::clone(&self.schema),
            queries: self.queries().into(),
            page: None,
            left: self.limit,
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

impl Read {
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
