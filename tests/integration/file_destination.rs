//! The destination seam and the `file` destination, through the library: writes only in
//! `execute()`, atomic files, and mapping by name that never blanks an unmapped field.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::datatypes::{DataType, Field, Float64Type, Schema, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::datasource::sink::DataSink;
use datafusion::execution::TaskContext;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, SendableRecordBatchStream};
use futures::StreamExt;
use sluice::connections::{ConnectContext, Connected, ConnectorKind, Role};
use sluice::connectors::{Destination, DestinationSchema, ObjectSpec, WriteReport};
use sluice::options::{OptionSpec, Options};
use sluice::{Engine, Outcome};

use super::support::files_under;

fn sql_path(dir: &std::path::Path) -> String {
    dir.display().to_string()
}

/// An engine with a `file` connection `out` (JSON lines) writing into a fresh temporary folder.
async fn file_engine() -> (tempfile::TempDir, Engine) {
    let dir = tempfile::tempdir().unwrap();
    let engine = super::support::engine();
    let out = sql_path(dir.path());
    engine
        .run_sql(&format!(
            "CREATE CONNECTION out TYPE file OPTIONS (url '{out}/')"
        ))
        .await
        .unwrap();
    (dir, engine)
}

#[tokio::test]
async fn explain_insert_shows_the_sink_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let engine = super::support::engine();
    let out = sql_path(dir.path());
    let outcomes = engine
        .run_sql(&format!(
            "CREATE CONNECTION out TYPE file OPTIONS (url '{out}/', format 'parquet');
             EXPLAIN INSERT INTO out.contacts SELECT 'a@b.c' AS email, 0.5 AS score;"
        ))
        .await
        .unwrap();
    let Outcome::Rows { batches, .. } = &outcomes[1] else {
        panic!("{outcomes:?}")
    };
    let plan = datafusion::arrow::util::pretty::pretty_format_batches(batches)
        .unwrap()
        .to_string();
    assert!(
        plan.contains("Dml: op=[Insert Into] table=[out.contacts]"),
        "{plan}"
    );
    assert!(
        plan.contains("DataSinkExec: sink=FileSink: connection=out object=contacts"),
        "{plan}"
    );
    assert!(
        plan.contains("format=parquet fields=[email, score]"),
        "{plan}"
    );
    assert!(files_under(dir.path()).is_empty(), "EXPLAIN wrote files");
}

/// More rows than the upload buffer holds, so the multipart upload has begun when the query
/// fails on its last row: the failed statement must leave no file at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_that_fails_midway_leaves_no_file() {
    let (dir, engine) = file_engine().await;
    let err = engine
        .run_sql(
            "INSERT INTO out.big
             SELECT value AS id, repeat('x', 100) AS padding,
                    CAST(CASE WHEN value < 199999 THEN '1' ELSE 'boom' END AS INT) AS flag
             FROM range(200000)",
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("boom"), "{err}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        files_under(dir.path()).is_empty(),
        "{:?}",
        files_under(dir.path())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_statement_leaves_no_file() {
    let (dir, engine) = file_engine().await;
    let insert = engine.run_sql(
        "INSERT INTO out.endless SELECT value AS id, repeat('y', 200) AS padding FROM range(1000000000)",
    );
    let result = tokio::time::timeout(Duration::from_millis(1500), insert).await;
    assert!(result.is_err(), "the insert should still be running");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        files_under(dir.path()).is_empty(),
        "{:?}",
        files_under(dir.path())
    );
}

// ---- mapping by name, against a destination that declares its fields -------------------------

/// A destination whose objects declare fields (like a CRM) and which records what its sink gets.
#[derive(Debug, Default)]
struct Capture {
    received: Arc<Mutex<Vec<RecordBatch>>>,
}

fn crm_fields() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("email", DataType::Utf8, true),
        Field::new("first_name", DataType::Utf8, true),
        Field::new("churn_score", DataType::Float64, true),
    ]))
}

#[async_trait]
impl Destination for Capture {
    fn connection(&self) -> &str {
        "crm"
    }
    fn object_names(&self) -> Vec<String> {
        vec!["contacts".into()]
    }
    async fn object(&self, name: &str) -> sluice::Result<Option<ObjectSpec>> {
        Ok((name == "contacts").then(|| ObjectSpec {
            name: name.into(),
            fields: Some(crm_fields()),
            key: None,
            composite_key: vec![],
            match_keys: vec![],
        }))
    }
    /// This test is about the mapping the sink receives, not about sync state.
    fn stateful(&self) -> bool {
        false
    }
    fn sink(
        &self,
        _object: &ObjectSpec,
        schema: SchemaRef,
        _report: Arc<WriteReport>,
        _sync: Option<Arc<sluice::sync::SyncRun>>,
    ) -> sluice::Result<Arc<dyn DataSink>> {
        Ok(Arc::new(CaptureSink {
            schema,
            into: Arc::clone(&self.received),
        }))
    }
}

#[derive(Debug)]
struct CaptureSink {
    schema: SchemaRef,
    into: Arc<Mutex<Vec<RecordBatch>>>,
}

impl DisplayAs for CaptureSink {
    fn fmt_as(&self, _: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CaptureSink")
    }
}

#[async_trait]
impl DataSink for CaptureSink {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }
    async fn write_all(
        &self,
        mut data: SendableRecordBatchStream,
        _: &Arc<TaskContext>,
    ) -> datafusion::error::Result<u64> {
        let mut n = 0;
        while let Some(batch) = data.next().await {
            let batch = batch?;
            n += batch.num_rows() as u64;
            self.into.lock().unwrap().push(batch);
        }
        Ok(n)
    }
}

struct CaptureKind(Arc<Mutex<Vec<RecordBatch>>>);

impl ConnectorKind for CaptureKind {
    fn kind(&self) -> &'static str {
        "capture"
    }
    fn summary(&self) -> &'static str {
        "records kept in memory, for tests"
    }
    fn role(&self) -> Role {
        Role::Destination
    }
    fn options(&self) -> &'static [OptionSpec] {
        &[]
    }
    fn connect(
        &self,
        _name: &str,
        _options: &Options,
        _context: &ConnectContext,
    ) -> sluice::Result<Connected> {
        Ok(Connected::schema(Arc::new(DestinationSchema::new(
            Arc::new(Capture {
                received: Arc::clone(&self.0),
            }),
        ))))
    }
}

type Captured = Arc<Mutex<Vec<RecordBatch>>>;

async fn crm_engine() -> (Engine, Captured) {
    let captured = Captured::default();
    let mut engine = super::support::engine();
    engine.register_kind(Arc::new(CaptureKind(Arc::clone(&captured))));
    engine
        .run_sql("CREATE CONNECTION crm TYPE capture")
        .await
        .unwrap();
    (engine, captured)
}

/// The regression DataFusion's positional INSERT would cause: a two-field sync into a
/// three-field object must send exactly those two fields, never a NULL for the third.
#[tokio::test]
async fn only_mapped_fields_reach_the_sink_in_the_users_order() {
    let (engine, captured) = crm_engine().await;
    engine
        .run_sql(
            "INSERT INTO crm.contacts
             SELECT CAST(0.25 AS DOUBLE) AS churn_score, 'ada@example.com' AS email",
        )
        .await
        .unwrap();
    let batches = captured.lock().unwrap().clone();
    assert_eq!(batches.len(), 1);
    let names: Vec<_> = batches[0]
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    assert_eq!(
        names,
        ["churn_score", "email"],
        "first_name must not be sent"
    );
    assert_eq!(
        batches[0].column(0).as_primitive::<Float64Type>().value(0),
        0.25
    );
    assert!(batches[0].column(1).is_valid(0));
}

#[tokio::test]
async fn values_are_cast_to_the_declared_field_types() {
    let (engine, captured) = crm_engine().await;
    engine
        .run_sql("INSERT INTO crm.contacts (email, churn_score) SELECT 'x@y.z', 1")
        .await
        .unwrap();
    let batches = captured.lock().unwrap().clone();
    assert_eq!(batches[0].schema().field(1).data_type(), &DataType::Float64);
}

#[tokio::test]
async fn unknown_fields_and_impossible_casts_fail_at_plan_time() {
    let (engine, _) = crm_engine().await;
    let err = engine
        .run_sql("INSERT INTO crm.contacts SELECT 'a' AS email, 'Ada' AS firstname")
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "crm.contacts has no field 'firstname' (did you mean 'first_name'?); DESCRIBE crm.contacts lists its fields"
    );
    assert_eq!(err.token().as_deref(), Some("firstname"));
    let err = engine
        .run_sql("INSERT INTO crm.contacts SELECT make_array(1, 2) AS churn_score")
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("crm.contacts.churn_score is Float64 but the query gives List"),
        "{err}"
    );
}

#[tokio::test]
async fn describe_shows_the_declared_fields() {
    let (engine, _) = crm_engine().await;
    let outcomes = engine.run_sql("DESCRIBE crm.contacts").await.unwrap();
    let Outcome::Rows { batches, .. } = &outcomes[0] else {
        panic!()
    };
    let text = datafusion::arrow::util::pretty::pretty_format_batches(batches)
        .unwrap()
        .to_string();
    for field in ["email", "first_name", "churn_score", "Float64"] {
        assert!(text.contains(field), "{text}");
    }
}

/// Issue 17: an object name is one folder as written: `%2e%2e` wrote one level above the
/// connection's folder, and `x?y` / `x#y` collapsed into `x`.
#[tokio::test]
async fn object_names_a_url_would_read_differently_are_refused() {
    let (dir, engine) = file_engine().await;
    for name in ["%2e%2e", "..", "x?y", "x#y", "a%2fb", "tab\there"] {
        let err = engine
            .run_sql(&format!("INSERT INTO out.\"{name}\" SELECT 1 AS id"))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cannot name a file destination object"),
            "{name}: {err}"
        );
    }
    assert!(files_under(dir.path()).is_empty());
    engine
        .run_sql("INSERT INTO out.\"plain name é\" SELECT 1 AS id")
        .await
        .unwrap();
    assert_eq!(files_under(dir.path()).len(), 1);
}
