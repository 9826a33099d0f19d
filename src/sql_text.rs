//! SQL text that sluice sends to a database: identifiers and literals quoted by this one tested
//! piece of code per dialect, never by pasting values and never by a general-purpose unparser's
//! escaping (sqlparser's leaves a quote after a backslash, and an existing `''`, as they are).
//!
//! Where a value can be bound as a parameter it is; this module is for the statements that cannot
//! take parameters (`COPY (SELECT …)`, a model query nested in a larger one) and for names.

use std::ops::ControlFlow;

use datafusion::common::ScalarValue;
use datafusion::sql::sqlparser::ast::{Statement, Value, ValueWithSpan, VisitMut, VisitorMut};

/// The SQL dialects sluice emits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// PostgreSQL (and what speaks its dialect), with or without `standard_conforming_strings`.
    Postgres,
}

impl Dialect {
    /// An identifier, always quoted (`a"b` → `"a""b"`), so keywords, case and any character
    /// stay the name they are. `None` for a name the database cannot hold (a NUL character).
    pub fn quote_ident(self, name: &str) -> Option<String> {
        if name.contains('\0') {
            return None;
        }
        match self {
            Dialect::Postgres => Some(format!("\"{}\"", name.replace('"', "\"\""))),
        }
    }

    /// A string literal that reads back as exactly `value`. `None` for a value the database's
    /// text cannot hold (a NUL character): the caller then evaluates the condition itself.
    ///
    /// Postgres: `'…'` with quotes doubled; a value with a backslash is written `E'…'` with the
    /// backslashes doubled too, which reads the same whether `standard_conforming_strings` is on
    /// or off (in a plain literal a backslash means itself only when it is on).
    pub fn quote_string(self, value: &str) -> Option<String> {
        if value.contains('\0') {
            return None;
        }
        match self {
            Dialect::Postgres => Some(if value.contains('\\') {
                format!("E'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
            } else {
                format!("'{}'", value.replace('\'', "''"))
            }),
        }
    }

    /// A literal of one of the types sluice pushes down, as SQL; `None` when the type (or this
    /// value of it) has no literal here that means exactly the same thing.
    pub fn literal(self, value: &ScalarValue) -> Option<String> {
        Some(match value {
            ScalarValue::Boolean(Some(b)) => if *b { "TRUE" } else { "FALSE" }.to_string(),
            ScalarValue::Int8(Some(v)) => v.to_string(),
            ScalarValue::Int16(Some(v)) => v.to_string(),
            ScalarValue::Int32(Some(v)) => v.to_string(),
            ScalarValue::Int64(Some(v)) => v.to_string(),
            ScalarValue::UInt8(Some(v)) => v.to_string(),
            ScalarValue::UInt16(Some(v)) => v.to_string(),
            ScalarValue::UInt32(Some(v)) => v.to_string(),
            ScalarValue::UInt64(Some(v)) => v.to_string(),
            ScalarValue::Decimal128(Some(v), _, scale) => decimal(*v, *scale)?,
            ScalarValue::Utf8(Some(s)) | ScalarValue::LargeUtf8(Some(s)) => self.quote_string(s)?,
            ScalarValue::Date32(Some(days)) => {
                let date = chrono::NaiveDate::from_num_days_from_ce_opt(
                    i32::try_from(i64::from(*days) + 719_163).ok()?,
                )?;
                format!("DATE '{}'", year_in_range(date)?.format("%Y-%m-%d"))
            }
            ScalarValue::TimestampMicrosecond(Some(micros), None) => {
                let at = chrono::DateTime::from_timestamp_micros(*micros)?.naive_utc();
                let _ = year_in_range(at.date())?;
                format!("TIMESTAMP '{}'", at.format("%Y-%m-%d %H:%M:%S%.6f"))
            }
            _ => return None,
        })
    }

    /// Rewrites every string literal of `statement` (as an unparser wrote it) with this dialect's
    /// quoting. An error names a literal kind that has no faithful quoting here.
    pub fn requote_literals(self, statement: &mut Statement) -> Result<(), String> {
        struct Requote(Dialect);
        impl VisitorMut for Requote {
            type Break = String;
            fn pre_visit_value(&mut self, value: &mut ValueWithSpan) -> ControlFlow<String> {
                let text = match &value.value {
                    Value::SingleQuotedString(s)
                    | Value::EscapedStringLiteral(s)
                    | Value::DoubleQuotedString(s) => s,
                    Value::DollarQuotedString(d) => &d.value,
                    Value::Number(..) | Value::Boolean(_) | Value::Null | Value::Placeholder(_) => {
                        return ControlFlow::Continue(());
                    }
                    other => {
                        return ControlFlow::Break(format!(
                            "the literal {other} has no quoting sluice trusts"
                        ));
                    }
                };
                match self.0.quote_string(text) {
                    // A placeholder is written verbatim: the text is our quoted literal.
                    Some(quoted) => {
                        value.value = Value::Placeholder(quoted);
                        ControlFlow::Continue(())
                    }
                    None => ControlFlow::Break(
                        "a string literal holds a NUL character, which the database's text cannot hold".into(),
                    ),
                }
            }
        }
        match statement.visit(&mut Requote(self)) {
            ControlFlow::Continue(()) => Ok(()),
            ControlFlow::Break(message) => Err(message),
        }
    }
}

/// `unscaled × 10^-scale` as a SQL numeric literal.
fn decimal(unscaled: i128, scale: i8) -> Option<String> {
    if scale <= 0 {
        let zeros = "0".repeat(usize::try_from(-i32::from(scale)).ok()?);
        return Some(format!("{unscaled}{zeros}"));
    }
    let scale = usize::try_from(scale).ok()?;
    let digits = unscaled.unsigned_abs().to_string();
    let digits = format!("{digits:0>width$}", width = scale + 1);
    let (int, frac) = digits.split_at(digits.len() - scale);
    let sign = if unscaled < 0 { "-" } else { "" };
    Some(format!("{sign}{int}.{frac}"))
}

/// Dates of years 1–9999 only: Postgres writes others with `BC` or more digits, which a plain
/// ISO literal does not express.
fn year_in_range(date: chrono::NaiveDate) -> Option<chrono::NaiveDate> {
    use chrono::Datelike;
    (1..=9999).contains(&date.year()).then_some(date)
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
    use datafusion::sql::sqlparser::parser::Parser;

    /// Strings that broke or bent other quoting: quotes after backslashes, doubled quotes,
    /// dollar quotes, comments, statement ends, control characters and non-ASCII text.
    pub const HOSTILE: &[&str] = &[
        "",
        "'",
        "''",
        "a''''b",
        "x\\'' OR true))) TO STDOUT (FORMAT binary) --",
        "\\",
        "\\\\'",
        "'; DROP TABLE t; --",
        "$$",
        "$tag$ x $tag$",
        "/* c */",
        "a\nb\r\tc",
        "é😀\u{202e}",
        "\"",
        "E'x'",
    ];

    /// Reads a quoted literal back as Postgres would with `standard_conforming_strings` on
    /// (sqlparser's Postgres tokenizer), and with it off (backslashes escape in every literal).
    #[test]
    fn postgres_strings_read_back_exactly_in_both_string_modes() {
        for s in HOSTILE {
            let quoted = Dialect::Postgres.quote_string(s).unwrap();
            let sql = format!("SELECT {quoted} AS v");
            let parsed = Parser::parse_sql(&PostgreSqlDialect {}, &sql).unwrap();
            let Statement::Query(q) = &parsed[0] else {
                panic!("{sql}")
            };
            let text = q.body.to_string();
            let value = match &*q.body {
                datafusion::sql::sqlparser::ast::SetExpr::Select(sel) => match &sel.projection[0] {
                    datafusion::sql::sqlparser::ast::SelectItem::ExprWithAlias { expr, .. } => {
                        match expr {
                            datafusion::sql::sqlparser::ast::Expr::Value(v) => match &v.value {
                                Value::SingleQuotedString(v) | Value::EscapedStringLiteral(v) => {
                                    v.clone()
                                }
                                other => panic!("{sql}: {other:?}"),
                            },
                            other => panic!("{sql}: {other:?}"),
                        }
                    }
                    other => panic!("{sql}: {other:?}"),
                },
                _ => panic!("{text}"),
            };
            assert_eq!(&value, s, "{sql}");
            // With backslash escapes on (the old server setting), a literal without a backslash
            // has none to misread, and one with a backslash is an E'' literal: read the same.
            assert!(
                !quoted.starts_with('\'') || !quoted.contains('\\'),
                "{quoted}"
            );
        }
        assert_eq!(Dialect::Postgres.quote_string("a\0b"), None);
        assert_eq!(
            Dialect::Postgres.quote_string("it's"),
            Some("'it''s'".into())
        );
        assert_eq!(
            Dialect::Postgres.quote_string("a\\b"),
            Some("E'a\\\\b'".into())
        );
    }

    #[test]
    fn postgres_identifiers_double_their_quotes() {
        assert_eq!(
            Dialect::Postgres.quote_ident("a\"b"),
            Some("\"a\"\"b\"".into())
        );
        assert_eq!(
            Dialect::Postgres.quote_ident("x\\\"y"),
            Some("\"x\\\"\"y\"".into())
        );
        assert_eq!(Dialect::Postgres.quote_ident("a\0"), None);
    }

    #[test]
    fn literals_of_pushed_types() {
        let d = Dialect::Postgres;
        assert_eq!(
            d.literal(&ScalarValue::Decimal128(Some(-5), 10, 2)),
            Some("-0.05".into())
        );
        assert_eq!(
            d.literal(&ScalarValue::Decimal128(Some(1250), 10, 2)),
            Some("12.50".into())
        );
        assert_eq!(
            d.literal(&ScalarValue::Decimal128(Some(12), 10, -2)),
            Some("1200".into())
        );
        assert_eq!(
            d.literal(&ScalarValue::Date32(Some(0))),
            Some("DATE '1970-01-01'".into())
        );
        assert_eq!(d.literal(&ScalarValue::Date32(Some(-800_000))), None);
        assert_eq!(
            d.literal(&ScalarValue::TimestampMicrosecond(Some(1_500_000), None)),
            Some("TIMESTAMP '1970-01-01 00:00:01.500000'".into())
        );
        assert_eq!(
            d.literal(&ScalarValue::Int64(Some(i64::MIN))),
            Some(i64::MIN.to_string())
        );
        assert_eq!(d.literal(&ScalarValue::Float64(Some(1.0))), None);
    }

    #[test]
    fn requoted_statements_keep_every_hostile_literal() {
        for s in HOSTILE {
            let sql = format!(
                "SELECT a FROM t WHERE a = {} AND b = DATE '2020-01-01'",
                Dialect::Postgres.quote_string(s).unwrap()
            );
            let mut statement = Parser::parse_sql(&PostgreSqlDialect {}, &sql)
                .unwrap()
                .remove(0);
            Dialect::Postgres.requote_literals(&mut statement).unwrap();
            let reparsed = Parser::parse_sql(&PostgreSqlDialect {}, &statement.to_string())
                .unwrap()
                .remove(0);
            let mut again = reparsed.clone();
            Dialect::Postgres.requote_literals(&mut again).unwrap();
            assert_eq!(again.to_string(), statement.to_string(), "{s:?}");
            assert!(
                statement.to_string().ends_with("'2020-01-01'"),
                "{statement}"
            );
        }
    }
}
