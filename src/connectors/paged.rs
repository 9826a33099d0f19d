//! What the CRM readers share: a table over an API ([`PagedTable`] of a [`PagedSource`]), the
//! leaf operator that reads it page by page ([`PagedScanExec`] over a [`Pages`] reader, in
//! [`crate::scan`]), and the filters they turn into key lookups ([`key_lookup`]).

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

pub use crate::scan::{PagedScanExec, Pages, StartPages};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::ScalarValue;
use datafusion::datasource::TableType;
use datafusion::error::Result;
use datafusion::logical_expr::TableProviderFilterPushDown;
use datafusion::logical_expr::{Expr, Operator};
use datafusion::physical_plan::ExecutionPlan;

/// An API's records as a table: its schema, the key lookups it can make, and its reads.
pub trait PagedSource: fmt::Debug + Send + Sync + 'static {
    fn schema(&self) -> SchemaRef;

    /// The records `filter` names by a key, which the API reads directly (the filter is applied
    /// again after, as SQL compares: APIs match some keys whatever their case).
    fn lookup(&self, filter: &Expr) -> Option<(String, Vec<String>)>;

    /// The operator reading `schema` (the table's, projected), the records of `lookup` if any,
    /// at most `limit` of them.
    fn scan(
        &self,
        schema: SchemaRef,
        lookup: Option<(String, Vec<String>)>,
        limit: Option<usize>,
    ) -> PagedScanExec;
}

/// A [`PagedSource`] as a DataFusion table.
#[derive(Debug)]
pub struct PagedTable<S>(pub S);

#[async_trait]
impl<S: PagedSource> TableProvider for PagedTable<S> {
    fn schema(&self) -> SchemaRef {
        self.0.schema()
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
            .map(|f| match self.0.lookup(f) {
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
            Some(p) => Arc::new(self.0.schema().project(p)?),
            None => self.0.schema(),
        };
        // Several lookups: the first narrows the read; the rest are applied after.
        let lookup = filters.iter().find_map(|f| self.0.lookup(f));
        Ok(Arc::new(self.0.scan(schema, lookup, limit)))
    }
}

/// The records a filter names by a key column: `key = v`, `key IN (v, …)`, or equalities of
/// one key joined by OR (DataFusion's form of a short IN list), as (column, values). `is_key`
/// says which columns are keys; `text` spells a literal as the API does (`None`: not pushed).
pub fn key_lookup(
    filter: &Expr,
    is_key: &dyn Fn(&str) -> bool,
    text: &dyn Fn(&ScalarValue) -> Option<String>,
) -> Option<(String, Vec<String>)> {
    let key = |e: &Expr| match e {
        Expr::Column(c) if is_key(&c.name) => Some(c.name.clone()),
        _ => None,
    };
    let value = |e: &Expr| match e {
        Expr::Literal(v, _) => text(v),
        _ => None,
    };
    match filter {
        Expr::BinaryExpr(b) if b.op == Operator::Eq => match (key(&b.left), key(&b.right)) {
            (Some(c), None) => Some((c, vec![value(&b.right)?])),
            (None, Some(c)) => Some((c, vec![value(&b.left)?])),
            _ => None,
        },
        Expr::InList(list) if !list.negated => {
            let column = key(&list.expr)?;
            let values = list.list.iter().map(value).collect::<Option<Vec<_>>>()?;
            Some((column, values))
        }
        Expr::BinaryExpr(b) if b.op == Operator::Or => {
            let (left, mut values) = key_lookup(&b.left, is_key, text)?;
            let (right, more) = key_lookup(&b.right, is_key, text)?;
            (left == right).then(|| {
                values.extend(more);
                (left, values)
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::prelude::{col, lit};

    #[test]
    fn equalities_in_lists_and_ors_of_one_key_are_lookups() {
        let is_key = |c: &str| c == "email";
        let text = |v: &ScalarValue| match v {
            ScalarValue::Utf8(Some(s)) => Some(s.clone()),
            _ => None,
        };
        let lookup = |e: Expr| key_lookup(&e, &is_key, &text);
        assert_eq!(
            lookup(col("email").eq(lit("a"))),
            Some(("email".into(), vec!["a".into()]))
        );
        assert_eq!(
            lookup(col("email").in_list(vec![lit("a"), lit("b")], false)),
            Some(("email".into(), vec!["a".into(), "b".into()]))
        );
        assert_eq!(
            lookup(col("email").eq(lit("a")).or(col("email").eq(lit("b")))),
            Some(("email".into(), vec!["a".into(), "b".into()]))
        );
        assert_eq!(
            lookup(col("email").eq(lit("a")).or(col("id").eq(lit("b")))),
            None
        );
        assert_eq!(lookup(col("name").eq(lit("a"))), None);
        assert_eq!(lookup(col("email").in_list(vec![lit("a")], true)), None);
        assert_eq!(
            lookup(col("email").eq(lit(1))),
            None,
            "a literal not spelled"
        );
    }
}
