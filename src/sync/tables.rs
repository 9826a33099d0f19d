//! `sluice.runs`, `sluice.rejects` and `sluice.alerts`: sync history, current rejects and what
//! alerts did, read from the state store each time they are queried (so another process's runs
//! show up too).

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{
    ArrayRef, BooleanArray, RecordBatch, StringArray, TimestampMicrosecondArray, UInt16Array,
    UInt32Array, UInt64Array,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::TableType;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::error::Result;
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;

use super::state::StateStore;

/// Which table.
#[derive(Debug, Clone, Copy)]
pub enum StateTableKind {
    Runs,
    Rejects,
    Alerts,
}

/// A table over the state store.
#[derive(Debug)]
pub struct StateTable {
    state: StateStore,
    kind: StateTableKind,
    schema: SchemaRef,
}

fn ts(name: &str, nullable: bool) -> Field {
    Field::new(
        name,
        DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        nullable,
    )
}

fn micros(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.timestamp_micros())
}

fn text(name: &str, nullable: bool) -> Field {
    Field::new(name, DataType::Utf8, nullable)
}

fn count(name: &str) -> Field {
    Field::new(name, DataType::UInt64, false)
}

/// The columns of `sluice.runs`.
pub fn runs_schema() -> Schema {
    Schema::new(vec![
        text("run_id", false),
        text("sync", false),
        text("target", false),
        ts("started_at", false),
        ts("finished_at", true),
        text("status", false),
        count("rows_read"),
        count("inserted"),
        count("updated"),
        count("deleted"),
        count("unchanged"),
        count("rejected"),
        count("requests"),
        count("retries"),
        count("throttled"),
        count("duration_ms"),
        text("error", true),
        text("mode", false),
        text("error_connection", true),
        text("error_object", true),
        Field::new("error_status", DataType::UInt16, true),
        text("error_code", true),
        text("error_key", true),
    ])
}

/// Run records as rows of `sluice.runs` (alerts evaluate their predicates on one).
pub fn runs_batch(runs: &[super::state::RunRecord]) -> crate::error::Result<RecordBatch> {
    let s = |f: fn(&super::state::RunRecord) -> &str| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(runs.iter().map(f)))
    };
    let fact = |f: fn(&crate::error::Failure) -> Option<&str>| -> ArrayRef {
        Arc::new(StringArray::from(
            runs.iter()
                .map(|r| r.failure.as_ref().and_then(f))
                .collect::<Vec<_>>(),
        ))
    };
    let n = |f: fn(&super::state::RunRecord) -> u64| -> ArrayRef {
        Arc::new(UInt64Array::from_iter_values(runs.iter().map(f)))
    };
    let columns: Vec<ArrayRef> = vec![
        s(|r| &r.run_id),
        s(|r| &r.sync),
        s(|r| &r.target),
        Arc::new(
            TimestampMicrosecondArray::from(
                runs.iter()
                    .map(|r| micros(&r.started_at).unwrap_or(0))
                    .collect::<Vec<_>>(),
            )
            .with_timezone("UTC"),
        ),
        Arc::new(
            TimestampMicrosecondArray::from(
                runs.iter()
                    .map(|r| r.finished_at.as_deref().and_then(micros))
                    .collect::<Vec<_>>(),
            )
            .with_timezone("UTC"),
        ),
        s(|r| &r.status),
        n(|r| r.rows_read),
        n(|r| r.inserted),
        n(|r| r.updated),
        n(|r| r.deleted),
        n(|r| r.unchanged),
        n(|r| r.rejected),
        n(|r| r.requests),
        n(|r| r.retries),
        n(|r| r.throttled),
        n(|r| r.duration_ms),
        Arc::new(StringArray::from(
            runs.iter().map(|r| r.error.as_deref()).collect::<Vec<_>>(),
        )),
        s(|r| &r.mode),
        fact(|f| f.connection.as_deref()),
        fact(|f| f.object.as_deref()),
        Arc::new(UInt16Array::from(
            runs.iter()
                .map(|r| r.failure.as_ref().and_then(|f| f.status))
                .collect::<Vec<_>>(),
        )),
        fact(|f| f.code.as_deref()),
        fact(|f| f.key.as_deref()),
    ];
    Ok(RecordBatch::try_new(Arc::new(runs_schema()), columns)?)
}

impl StateTable {
    pub fn new(state: StateStore, kind: StateTableKind) -> Self {
        let schema = match kind {
            StateTableKind::Runs => runs_schema(),
            StateTableKind::Alerts => Schema::new(vec![
                text("alert", false),
                text("sync", false),
                text("event", false),
                text("run_id", false),
                text("status", false),
                ts("at", false),
                text("notified", false),
                Field::new("delivered", DataType::Boolean, false),
                text("error", true),
                text("message", false),
            ]),
            StateTableKind::Rejects => Schema::new(vec![
                text("sync", false),
                text("run_id", false),
                text("target", false),
                text("key", true),
                text("operation", false),
                text("error_code", false),
                text("error_message", false),
                text("payload", false),
                Field::new("attempts", DataType::UInt32, false),
                ts("first_seen", false),
                ts("last_seen", false),
            ]),
        };
        Self {
            state,
            kind,
            schema: Arc::new(schema),
        }
    }

    /// Long because it builds every column of `sluice.runs` and `sluice.rejects`, in the tables'
    /// column order.
    async fn batch(&self) -> crate::error::Result<RecordBatch> {
        let columns: Vec<ArrayRef> = match self.kind {
            StateTableKind::Runs => {
                return runs_batch(&self.state.runs().await?);
            }
            StateTableKind::Alerts => {
                let events = self.state.alert_events().await?;
                let s = |f: fn(&super::state::AlertEvent) -> &str| -> ArrayRef {
                    Arc::new(StringArray::from_iter_values(events.iter().map(f)))
                };
                vec![
                    s(|e| &e.alert),
                    s(|e| &e.sync),
                    s(|e| &e.event),
                    s(|e| &e.run_id),
                    s(|e| &e.status),
                    Arc::new(
                        TimestampMicrosecondArray::from(
                            events
                                .iter()
                                .map(|e| micros(&e.at).unwrap_or(0))
                                .collect::<Vec<_>>(),
                        )
                        .with_timezone("UTC"),
                    ),
                    s(|e| &e.notified),
                    Arc::new(BooleanArray::from(
                        events.iter().map(|e| e.delivered).collect::<Vec<_>>(),
                    )),
                    Arc::new(StringArray::from(
                        events
                            .iter()
                            .map(|e| e.error.as_deref())
                            .collect::<Vec<_>>(),
                    )),
                    s(|e| &e.message),
                ]
            }
            StateTableKind::Rejects => {
                let mut rejects = vec![];
                for sync in self.state.synced().await? {
                    if let Some(m) = self.state.manifest(&sync).await? {
                        rejects.extend(self.state.rejects(&sync, &m).await?);
                    }
                }
                let s = |f: fn(&super::state::RejectEntry) -> &str| -> ArrayRef {
                    Arc::new(StringArray::from_iter_values(rejects.iter().map(f)))
                };
                let t = |f: fn(&super::state::RejectEntry) -> &str| -> ArrayRef {
                    Arc::new(
                        TimestampMicrosecondArray::from(
                            rejects
                                .iter()
                                .map(|r| micros(f(r)).unwrap_or(0))
                                .collect::<Vec<_>>(),
                        )
                        .with_timezone("UTC"),
                    )
                };
                vec![
                    s(|r| &r.sync),
                    s(|r| &r.run_id),
                    s(|r| &r.target),
                    Arc::new(StringArray::from(
                        rejects.iter().map(|r| r.key.as_deref()).collect::<Vec<_>>(),
                    )),
                    s(|r| &r.operation),
                    s(|r| &r.error_code),
                    s(|r| &r.error_message),
                    s(|r| &r.payload),
                    Arc::new(UInt32Array::from_iter_values(
                        rejects.iter().map(|r| r.attempts),
                    )),
                    t(|r| &r.first_seen),
                    t(|r| &r.last_seen),
                ]
            }
        };
        Ok(RecordBatch::try_new(Arc::clone(&self.schema), columns)?)
    }
}

#[async_trait]
impl TableProvider for StateTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let batch = self.batch().await?;
        Ok(MemorySourceConfig::try_new_exec(
            &[vec![batch]],
            Arc::clone(&self.schema),
            projection.cloned(),
        )?)
    }
}
