//! A leaf operator that reads a source page by page ([`PagedScanExec`] over a [`Pages`]
//! reader), in one partition: the CRM and Postgres readers and `sluice.changes` use it.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::TaskContext;
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
    ReplaceChildrenOptions, SendableRecordBatchStream,
};

/// One read of an API, a batch per page.
#[async_trait]
pub trait Pages: Send + 'static {
    /// The next page's records; `None` at the end.
    async fn next_batch(&mut self) -> Result<Option<RecordBatch>>;
}

/// Starts a read (each execution reads anew), in a task's context.
pub type StartPages = Arc<dyn Fn(&TaskContext) -> Box<dyn Pages> + Send + Sync>;

/// A leaf operator reading one API's (or database's) pages, in one partition.
pub struct PagedScanExec {
    name: &'static str,
    /// What EXPLAIN shows after the name (never a secret).
    shown: String,
    schema: SchemaRef,
    start: StartPages,
    properties: Arc<PlanProperties>,
}

impl fmt::Debug for PagedScanExec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.name, self.shown)
    }
}

impl PagedScanExec {
    pub fn new(name: &'static str, shown: String, schema: SchemaRef, start: StartPages) -> Self {
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(Arc::clone(&schema)),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Incremental,
            Boundedness::Bounded,
        ));
        Self {
            name,
            shown,
            schema,
            start,
            properties,
        }
    }
}

impl DisplayAs for PagedScanExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.name, self.shown)
    }
}

impl ExecutionPlan for PagedScanExec {
    fn name(&self) -> &'static str {
        self.name
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
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        if partition != 0 {
            return Err(DataFusionError::Internal(format!(
                "{} has one partition, not {partition}",
                self.name
            )));
        }
        let pages = (self.start)(&context);
        let stream = futures::stream::try_unfold(pages, |mut pages| async move {
            Ok(pages.next_batch().await?.map(|b| (b, pages)))
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            Arc::clone(&self.schema),
            stream,
        )))
    }
}
