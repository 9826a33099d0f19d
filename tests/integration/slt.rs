//! The sqllogictest harness: runs every `tests/slt/*.slt` file against a fresh engine.
//!
//! `__TMP__` in a statement is replaced by a scratch directory of the file's own (and that
//! directory by `__TMP__` in a dry run's report), and statements
//! run with the repository root as the working directory (so `sql_examples/data/...` resolves).

use std::path::PathBuf;
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{Field, Schema, SchemaRef};
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::TableType;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;

use super::fakes::webhook::{FakeWebhook, Script};

use datafusion::arrow::datatypes::DataType;
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use sluice::{Engine, Outcome};
use sqllogictest::{DBOutput, DefaultColumnType};

struct SluiceDb {
    engine: Engine,
    tmp: tempfile::TempDir,
    fake: Arc<FakeWebhook>,
}

/// What the fake webhook receiver holds, as tables the `.slt` files query:
/// `webhook_state` (the materialized store: object, key, record as JSON with sorted keys) and
/// `webhook_requests` (every request: seq, status, operation, records, fields carried).
#[derive(Debug)]
struct FakeTable {
    fake: Arc<FakeWebhook>,
    requests: bool,
}

impl FakeTable {
    fn schema(requests: bool) -> SchemaRef {
        let text = |n: &str| Field::new(n, DataType::Utf8, true);
        let int = |n: &str| Field::new(n, DataType::Int64, false);
        Arc::new(Schema::new(if requests {
            vec![
                int("seq"),
                int("status"),
                text("operation"),
                int("records"),
                text("fields"),
            ]
        } else {
            vec![text("object"), text("key"), text("record")]
        }))
    }
}

impl std::fmt::Debug for FakeWebhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FakeWebhook({})", self.url)
    }
}

#[async_trait::async_trait]
impl TableProvider for FakeTable {
    fn schema(&self) -> SchemaRef {
        Self::schema(self.requests)
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
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        let schema = Self::schema(self.requests);
        let columns: Vec<ArrayRef> = if self.requests {
            let seen = self.fake.observed(|o| o.requests.clone());
            vec![
                Arc::new(Int64Array::from_iter_values(1..=seen.len() as i64)),
                Arc::new(Int64Array::from_iter_values(
                    seen.iter().map(|s| s.status as i64),
                )),
                Arc::new(StringArray::from_iter(
                    seen.iter().map(|s| s.operation.clone()),
                )),
                Arc::new(Int64Array::from_iter_values(
                    seen.iter().map(|s| s.records as i64),
                )),
                Arc::new(StringArray::from_iter_values(
                    seen.iter().map(|s| s.fields.clone()),
                )),
            ]
        } else {
            let rows = self.fake.state_rows();
            vec![
                Arc::new(StringArray::from_iter_values(
                    rows.iter().map(|r| r.0.clone()),
                )),
                Arc::new(StringArray::from_iter_values(
                    rows.iter().map(|r| r.1.clone()),
                )),
                Arc::new(StringArray::from_iter_values(
                    rows.iter().map(|r| r.2.clone()),
                )),
            ]
        };
        let batch = RecordBatch::try_new(Arc::clone(&schema), columns)?;
        Ok(MemorySourceConfig::try_new_exec(
            &[vec![batch]],
            schema,
            projection.cloned(),
        )?)
    }
}

#[async_trait::async_trait]
impl sqllogictest::AsyncDB for SluiceDb {
    type Error = sluice::Error;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<DefaultColumnType>, sluice::Error> {
        let sql = sql
            .replace("__TMP__", &self.tmp.path().display().to_string())
            .replace("__WEBHOOK__", &self.fake.url);
        let mut outcomes = self.engine.run_sql(&sql).await?;
        let Some(last) = outcomes.pop() else {
            return Ok(DBOutput::StatementComplete(0));
        };
        Ok(match last {
            Outcome::Rows { schema, batches } => {
                let types = schema
                    .fields()
                    .iter()
                    .map(|f| column_type(f.data_type()))
                    .collect();
                let options = FormatOptions::default().with_null("NULL");
                let mut rows = vec![];
                for batch in &batches {
                    let formatters: Vec<_> = batch
                        .columns()
                        .iter()
                        .map(|c| ArrayFormatter::try_new(c.as_ref(), &options))
                        .collect::<Result<_, _>>()?;
                    for row in 0..batch.num_rows() {
                        rows.push(
                            formatters
                                .iter()
                                .map(|f| {
                                    let v = f.value(row).to_string();
                                    if v.is_empty() {
                                        "(empty)".to_string()
                                    } else {
                                        v
                                    }
                                })
                                .collect(),
                        );
                    }
                }
                DBOutput::Rows { types, rows }
            }
            Outcome::Write(summary) => DBOutput::StatementComplete(summary.rows_written),
            Outcome::Done(_) | Outcome::Checked => DBOutput::StatementComplete(0),
            Outcome::DryRun(report) => DBOutput::Rows {
                types: vec![DefaultColumnType::Text],
                rows: report
                    .to_string()
                    .replace(&self.tmp.path().display().to_string(), "__TMP__")
                    .lines()
                    .map(|l| vec![l.trim().to_string()])
                    .collect(),
            },
        })
    }

    async fn shutdown(&mut self) {}

    fn engine_name(&self) -> &str {
        "sluice"
    }

    async fn sleep(dur: std::time::Duration) {
        tokio::time::sleep(dur).await;
    }
}

fn column_type(t: &DataType) -> DefaultColumnType {
    match t {
        t if t.is_integer() => DefaultColumnType::Integer,
        t if t.is_floating()
            || matches!(t, DataType::Decimal128(..) | DataType::Decimal256(..)) =>
        {
            DefaultColumnType::FloatingPoint
        }
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => DefaultColumnType::Text,
        _ => DefaultColumnType::Any,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqllogictest_files() {
    let dir = super::support::repo_root().join("tests/slt");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/slt")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "slt"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no .slt files in {}", dir.display());
    let mut failures = vec![];
    for file in &files {
        let mut runner = sqllogictest::Runner::new(|| async {
            let tmp = tempfile::tempdir().expect("tempdir");
            let mut engine = Engine::new()?;
            engine.set_state_location(&tmp.path().join(".sluice").display().to_string())?;
            let fake = Arc::new(FakeWebhook::start(Script::default()).await);
            for (name, requests) in [("webhook_state", false), ("webhook_requests", true)] {
                engine.context().register_table(
                    name,
                    Arc::new(FakeTable {
                        fake: Arc::clone(&fake),
                        requests,
                    }),
                )?;
            }
            Ok(SluiceDb { engine, tmp, fake })
        });
        if let Err(e) = runner.run_file_async(file).await {
            failures.push(format!("{}:\n{e}", file.display()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
