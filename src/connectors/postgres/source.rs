//! Reading a Postgres relation: `PgTable` (a `TableProvider` with projection, filter and limit
//! pushdown) and `postgres_scan` (`PostgresScanExec` in EXPLAIN), which streams `COPY (SELECT …) TO STDOUT (FORMAT binary)`
//! into Arrow batches without materializing the result.

use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{RecordBatch, RecordBatchOptions};
use datafusion::arrow::datatypes::{DataType, Schema, SchemaRef};
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::ScalarValue;
use datafusion::datasource::TableType;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::TaskContext;
use datafusion::logical_expr::{Expr, Operator, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;
use futures::StreamExt;

use super::metadata::{Relation, UNSUPPORTED, quote_ident};
use super::types::{ColumnBuilder, CopyReader, PgType};
use super::{PgConnection, pg_message};
use crate::connectors::paged::{PagedScanExec, Pages};
use crate::sql_text::Dialect;

/// A Postgres table or view as a DataFusion table.
#[derive(Debug)]
pub struct PgTable {
    connection: Arc<PgConnection>,
    relation: Arc<Relation>,
    schema: SchemaRef,
}

impl PgTable {
    pub fn connection(&self) -> &Arc<PgConnection> {
        &self.connection
    }

    pub fn relation(&self) -> &Arc<Relation> {
        &self.relation
    }

    pub fn new(connection: Arc<PgConnection>, relation: Arc<Relation>) -> Self {
        let schema = relation.arrow_schema();
        Self {
            connection,
            relation,
            schema,
        }
    }
}

#[async_trait]
impl TableProvider for PgTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        match self.relation.kind {
            'v' | 'm' => TableType::View,
            _ => TableType::Base,
        }
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        Ok(filters
            .iter()
            .map(|f| match filter_sql(f, &self.schema) {
                Some(_) => TableProviderFilterPushDown::Exact,
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
        let indexes: Vec<usize> = match projection {
            Some(p) => p.clone(),
            None => (0..self.schema.fields().len()).collect(),
        };
        let mut types = Vec::with_capacity(indexes.len());
        let mut names = Vec::with_capacity(indexes.len());
        for &i in &indexes {
            let column = &self.relation.columns[i];
            match &column.pg_type {
                Ok(t) => types.push(t.clone()),
                Err(type_name) => {
                    return Err(DataFusionError::Plan(format!(
                        "column '{}' of {}.{}.{} has type {type_name}, which sluice cannot read; leave it out of the query, or CAST it to text in a view",
                        column.name, self.connection.name, self.relation.schema, self.relation.name
                    )));
                }
            }
            names.push(quote_ident(&column.name));
        }
        let mut sql = format!(
            "SELECT {} FROM {}",
            names.join(", "),
            self.relation.qualified()
        );
        let conditions: Vec<String> = filters
            .iter()
            .map(|f| {
                filter_sql(f, &self.schema).ok_or_else(|| {
                    DataFusionError::Internal(format!("filter {f} cannot be pushed to Postgres"))
                })
            })
            .collect::<Result<_>>()?;
        if !conditions.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&conditions.join(" AND "));
        }
        if let Some(n) = limit {
            sql.push_str(&format!(" LIMIT {n}"));
        }
        let schema = Arc::new(self.schema.project(&indexes)?);
        Ok(Arc::new(postgres_scan(
            Arc::clone(&self.connection),
            sql,
            schema,
            types,
        )))
    }
}

/// The filter as Postgres SQL, if Postgres evaluates it exactly as DataFusion does.
///
/// Only comparisons, boolean logic, IS [NOT] NULL, IN lists, BETWEEN and LIKE over columns and
/// literals are pushed. Ordering comparisons of text are not (Postgres orders by the column's
/// collation, DataFusion by bytes), nor anything over floating point (NaN compares differently),
/// casts or functions: DataFusion evaluates those after the scan.
///
/// The SQL is written here, not by DataFusion's unparser: every name and literal goes through
/// [`Dialect::Postgres`]'s quoting, and a literal it cannot write exactly (a string with a NUL
/// character) keeps the filter out of the query. The filter is declared `Exact`, so DataFusion
/// never checks these rows again: what is written here must mean exactly the filter.
pub fn filter_sql(filter: &Expr, schema: &Schema) -> Option<String> {
    if !pushable(filter, schema) {
        return None;
    }
    Some(format!("({})", render(filter)?))
}

/// A pushable expression as Postgres SQL, every compound part in parentheses.
fn render(expr: &Expr) -> Option<String> {
    const PG: Dialect = Dialect::Postgres;
    let not = |negated: bool| if negated { "NOT " } else { "" };
    Some(match expr {
        Expr::Column(c) => PG.quote_ident(&c.name)?,
        Expr::Literal(v, _) => PG.literal(v)?,
        Expr::BinaryExpr(b) => {
            let op = match b.op {
                Operator::And => "AND",
                Operator::Or => "OR",
                Operator::Eq => "=",
                Operator::NotEq => "<>",
                Operator::Lt => "<",
                Operator::LtEq => "<=",
                Operator::Gt => ">",
                Operator::GtEq => ">=",
                _ => return None,
            };
            format!("({} {op} {})", render(&b.left)?, render(&b.right)?)
        }
        Expr::Not(e) => format!("(NOT {})", render(e)?),
        Expr::IsNull(e) => format!("({} IS NULL)", render(e)?),
        Expr::IsNotNull(e) => format!("({} IS NOT NULL)", render(e)?),
        Expr::InList(l) => {
            let list = l.list.iter().map(render).collect::<Option<Vec<_>>>()?;
            format!(
                "({} {}IN ({}))",
                render(&l.expr)?,
                not(l.negated),
                list.join(", ")
            )
        }
        Expr::Between(b) => format!(
            "({} {}BETWEEN {} AND {})",
            render(&b.expr)?,
            not(b.negated),
            render(&b.low)?,
            render(&b.high)?
        ),
        Expr::Like(l) => format!(
            "({} {}LIKE {})",
            render(&l.expr)?,
            not(l.negated),
            render(&l.pattern)?
        ),
        _ => return None,
    })
}

fn pushable(expr: &Expr, schema: &Schema) -> bool {
    let leaf = |e: &Expr| pushable(e, schema);
    match expr {
        Expr::Column(c) => schema.field_with_name(&c.name).is_ok_and(|f| {
            !f.metadata().contains_key(UNSUPPORTED)
                && matches!(
                    f.data_type(),
                    DataType::Boolean
                        | DataType::Int16
                        | DataType::Int32
                        | DataType::Int64
                        | DataType::Decimal128(..)
                        | DataType::Utf8
                        | DataType::Date32
                        | DataType::Timestamp(_, None)
                )
        }),
        Expr::Literal(v, _) => matches!(
            v,
            ScalarValue::Boolean(Some(_))
                | ScalarValue::Int8(Some(_))
                | ScalarValue::Int16(Some(_))
                | ScalarValue::Int32(Some(_))
                | ScalarValue::Int64(Some(_))
                | ScalarValue::UInt8(Some(_))
                | ScalarValue::UInt16(Some(_))
                | ScalarValue::UInt32(Some(_))
                | ScalarValue::Decimal128(Some(_), ..)
                | ScalarValue::Utf8(Some(_))
                | ScalarValue::Date32(Some(_))
                | ScalarValue::TimestampMicrosecond(Some(_), None)
        ),
        Expr::BinaryExpr(b) => match b.op {
            Operator::And | Operator::Or | Operator::Eq | Operator::NotEq => {
                leaf(&b.left) && leaf(&b.right)
            }
            Operator::Lt | Operator::LtEq | Operator::Gt | Operator::GtEq => {
                leaf(&b.left)
                    && leaf(&b.right)
                    && !is_text(&b.left, schema)
                    && !is_text(&b.right, schema)
            }
            _ => false,
        },
        Expr::Not(e) | Expr::IsNull(e) | Expr::IsNotNull(e) => leaf(e),
        Expr::InList(l) => leaf(&l.expr) && l.list.iter().all(leaf),
        Expr::Between(b) => {
            leaf(&b.expr) && leaf(&b.low) && leaf(&b.high) && !is_text(&b.expr, schema)
        }
        Expr::Like(l) => {
            !l.case_insensitive
                && l.escape_char.is_none()
                && matches!(l.expr.as_ref(), Expr::Column(_))
                && leaf(&l.expr)
                && matches!(
                    l.pattern.as_ref(),
                    Expr::Literal(ScalarValue::Utf8(Some(_)), _)
                )
        }
        _ => false,
    }
}

fn is_text(expr: &Expr, schema: &Schema) -> bool {
    match expr {
        Expr::Column(c) => schema
            .field_with_name(&c.name)
            .is_ok_and(|f| f.data_type() == &DataType::Utf8),
        Expr::Literal(ScalarValue::Utf8(_), _) => true,
        _ => false,
    }
}

/// The operator that streams the rows of one query from Postgres, shown in EXPLAIN as
/// `PostgresScanExec` with the SQL it sends: a [`PagedScanExec`] whose pages are batches of a
/// `COPY … TO STDOUT`.
pub fn postgres_scan(
    connection: Arc<PgConnection>,
    sql: String,
    schema: SchemaRef,
    types: Vec<PgType>,
) -> PagedScanExec {
    let shown = format!("connection={} sql={sql}", connection.name);
    let start_schema = Arc::clone(&schema);
    PagedScanExec::new(
        "PostgresScanExec",
        shown,
        schema,
        Arc::new(move |context: &TaskContext| {
            let batch_size = context.session_config().batch_size();
            Box::new(Scan {
                connection: Arc::clone(&connection),
                copy: format!("COPY ({sql}) TO STDOUT (FORMAT binary)"),
                schema: Arc::clone(&start_schema),
                columns: types
                    .iter()
                    .map(|t| ColumnBuilder::new(t, batch_size))
                    .collect(),
                reader: CopyReader::new(),
                batch_size,
                client: None,
                stream: None,
            }) as Box<dyn Pages>
        }),
    )
}

type CopyStream = Pin<Box<tokio_postgres::CopyOutStream>>;

/// The state of one scan: the pooled client it holds until the COPY ends, and the decoder.
struct Scan {
    connection: Arc<PgConnection>,
    copy: String,
    schema: SchemaRef,
    columns: Vec<ColumnBuilder>,
    reader: CopyReader,
    batch_size: usize,
    client: Option<deadpool_postgres::Object>,
    stream: Option<CopyStream>,
}

#[async_trait]
impl Pages for Scan {
    async fn next_batch(&mut self) -> Result<Option<RecordBatch>> {
        if self.stream.is_none() {
            if self.reader.done {
                return Ok(None);
            }
            let client = self.connection.client().await?;
            let stream = client
                .copy_out(self.copy.as_str())
                .await
                .map_err(|e| self.error(&e))?;
            self.stream = Some(Box::pin(stream));
            self.client = Some(client);
        }
        let mut rows = 0;
        loop {
            rows += self
                .reader
                .decode_rows(&mut self.columns, self.batch_size - rows)
                .map_err(|(column, message)| self.decode_error(column, message))?;
            if rows >= self.batch_size || self.reader.done {
                break;
            }
            let stream = self.stream.as_mut().expect("opened above");
            match stream.next().await {
                Some(chunk) => self.reader.extend(&chunk.map_err(|e| self.error(&e))?),
                None => {
                    if !self.reader.done {
                        return Err(DataFusionError::External(
                            "the Postgres COPY stream ended early".into(),
                        ));
                    }
                    break;
                }
            }
        }
        if self.reader.done {
            // Drain the end of the COPY so the connection goes back to the pool clean.
            if let Some(mut stream) = self.stream.take() {
                while let Some(chunk) = stream.next().await {
                    chunk.map_err(|e| self.error(&e))?;
                }
            }
            self.client = None;
        }
        if rows == 0 && self.reader.done {
            return Ok(None);
        }
        let columns = self.columns.iter_mut().map(|c| c.finish()).collect();
        Ok(Some(RecordBatch::try_new_with_options(
            Arc::clone(&self.schema),
            columns,
            &RecordBatchOptions::new().with_row_count(Some(rows)),
        )?))
    }
}

impl Scan {
    fn error(&self, e: &tokio_postgres::Error) -> DataFusionError {
        DataFusionError::External(
            format!(
                "reading from Postgres ({}): {}",
                self.connection.name,
                pg_message(e)
            )
            .into(),
        )
    }

    fn decode_error(&self, column: Option<usize>, message: String) -> DataFusionError {
        let what = match column {
            Some(i) => format!("column '{}'", self.schema.field(i).name()),
            None => "the COPY stream".to_string(),
        };
        DataFusionError::External(
            format!(
                "reading from Postgres ({}): {what}: {message}",
                self.connection.name
            )
            .into(),
        )
    }
}
