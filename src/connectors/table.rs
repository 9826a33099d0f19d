//! `DestinationTable`: a destination object as a DataFusion table (reads where the destination can
//! be read; writes through the destination's sink).

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::{Schema, SchemaRef};
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::TableType;
use datafusion::datasource::sink::DataSinkExec;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::dml::InsertOp;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;

use super::{Destination, ObjectSpec, WriteReport};
use crate::sync::SyncRun;
use crate::sync::exec::{ChangeLogExec, DiffExec};

/// A destination object. As looked up by name it describes the object (and reads it, where the
/// destination can be read); [`DestinationTable::mapped`] gives the write-side table the engine
/// plans an insert against, whose schema is exactly the mapped fields.
#[derive(Debug, Clone)]
pub struct DestinationTable {
    destination: Arc<dyn Destination>,
    object: ObjectSpec,
    schema: SchemaRef,
    reader: Option<Arc<dyn TableProvider>>,
    /// Set on the write-side table only: where the sink reports what it did.
    write: Option<Arc<WriteReport>>,
    /// Set on the write-side table of a sync: the run its `DiffExec` and sink share.
    sync: Option<Arc<SyncRun>>,
}

impl DestinationTable {
    pub fn new(
        destination: Arc<dyn Destination>,
        object: ObjectSpec,
        reader: Option<Arc<dyn TableProvider>>,
    ) -> Self {
        let schema = object
            .fields
            .clone()
            .or_else(|| reader.as_ref().map(|r| r.schema()))
            .unwrap_or_else(|| Arc::new(Schema::empty()));
        Self {
            destination,
            object,
            schema,
            reader,
            write: None,
            sync: None,
        }
    }

    /// Whether writes to this object are incremental syncs (see [`Destination::stateful`]).
    pub fn stateful(&self) -> bool {
        self.destination.stateful()
    }

    /// The destination's (rate limit, concurrency), for dry-run estimates.
    pub fn pacing(&self) -> (Option<f64>, Option<usize>) {
        (
            self.destination.rate_limit(),
            self.destination.concurrency(),
        )
    }

    /// What reads this object (a source table), if it can be read.
    pub fn warehouse_diff(&self) -> Option<Arc<dyn crate::sync::remote::WarehouseDiff>> {
        self.reader.as_ref()?;
        self.destination.warehouse_diff()
    }

    pub fn reader(&self) -> Option<&Arc<dyn TableProvider>> {
        self.reader.as_ref()
    }

    /// Whether records can be matched by several fields (see [`Destination::composite_keys`]).
    pub fn composite_keys(&self) -> bool {
        self.destination.composite_keys()
    }

    /// The object as the destination describes it.
    pub fn object(&self) -> &ObjectSpec {
        &self.object
    }

    /// The connection this object belongs to.
    pub fn connection(&self) -> &str {
        self.destination.connection()
    }

    /// The write-side table for a write whose mapped fields are `schema`; in a sync, rows pass
    /// through the sync's `DiffExec` before the sink.
    pub fn mapped(
        &self,
        schema: SchemaRef,
        report: Arc<WriteReport>,
        sync: Option<Arc<SyncRun>>,
    ) -> Self {
        Self {
            destination: Arc::clone(&self.destination),
            object: self.object.clone(),
            schema,
            reader: None,
            write: Some(report),
            sync,
        }
    }
}

#[async_trait]
impl TableProvider for DestinationTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        match &self.reader {
            Some(r) => r.supports_filters_pushdown(filters),
            None => Ok(vec![
                TableProviderFilterPushDown::Unsupported;
                filters.len()
            ]),
        }
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        match &self.reader {
            Some(reader) => reader.scan(state, projection, filters, limit).await,
            None => Err(DataFusionError::Plan(
                self.destination.unreadable(&self.object.name),
            )),
        }
    }

    async fn insert_into(
        &self,
        _state: &dyn Session,
        input: Arc<dyn ExecutionPlan>,
        insert_op: InsertOp,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let Some(report) = &self.write else {
            // The engine always plans destination inserts by name; a positional plan that reached
            // here would blank unmapped fields, so refuse it.
            return Err(DataFusionError::Plan(format!(
                "inserts into {}.{} must be planned by sluice (by column name)",
                self.destination.connection(),
                self.object.name
            )));
        };
        if insert_op != InsertOp::Append {
            return Err(DataFusionError::Plan(format!(
                "{insert_op} is not supported for {}.{}; use INSERT INTO",
                self.destination.connection(),
                self.object.name
            )));
        }
        let input: Arc<dyn ExecutionPlan> = match &self.sync {
            Some(run) => {
                let diff = match &run.spec.remote {
                    // The diff runs in the warehouse: the model is read there, not through `input`.
                    Some(remote) => remote.diff_exec(Arc::clone(run), input.schema()),
                    None => Arc::new(DiffExec::new(input, Arc::clone(run))),
                };
                match run.spec.options.changes_retention {
                    Some(_) => Arc::new(ChangeLogExec::new(diff, Arc::clone(run))),
                    None => diff,
                }
            }
            None => input,
        };
        let sink = self.destination.sink(
            &self.object,
            input.schema(),
            Arc::clone(report),
            self.sync.clone(),
        )?;
        Ok(Arc::new(DataSinkExec::new(input, sink, None)))
    }
}
