//! Values an API returns as text (or JSON scalars), typed as the destination's schema declares
//! them: the reading side of the CRM connectors. A value that does not parse is an error, never
//! a silent null.

use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, BooleanBuilder, Date32Builder, Float64Builder, Int64Builder, StringBuilder,
    TimestampMillisecondBuilder,
};
use datafusion::arrow::datatypes::{DataType, TimeUnit};

use crate::error::{Error, Result};

/// Epoch milliseconds written as digits (`1705276800000`).
fn epoch_ms(s: &str) -> Option<i64> {
    let digits = s.strip_prefix('-').unwrap_or(s);
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

/// Days since 1970 of `YYYY-MM-DD` (or the date part of a datetime) or epoch milliseconds.
fn date(s: &str) -> Option<i32> {
    if let Some(ms) = epoch_ms(s) {
        return Some(ms.div_euclid(86_400_000) as i32);
    }
    let day = chrono::NaiveDate::parse_from_str(s.get(..10)?, "%Y-%m-%d").ok()?;
    Some((day - chrono::NaiveDate::default()).num_days() as i32)
}

/// Epoch milliseconds of ISO 8601 (`2024-01-15T10:00:00.123Z`, Salesforce's
/// `2024-01-15T10:00:00.000+0000`) or epoch milliseconds.
fn timestamp_ms(s: &str) -> Option<i64> {
    if let Some(ms) = epoch_ms(s) {
        return Some(ms);
    }
    chrono::DateTime::parse_from_rfc3339(s)
        .or_else(|_| chrono::DateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f%z"))
        .ok()
        .map(|t| t.timestamp_millis())
}

/// One column of `values` typed as `data_type` (other types are kept as text). `bad(i, value)`
/// makes the error of value `i` that does not parse.
pub fn typed_column(
    data_type: &DataType,
    values: &[Option<String>],
    bad: impl Fn(usize, &str) -> Error,
) -> Result<ArrayRef> {
    fn build<B, T>(
        mut builder: B,
        values: &[Option<String>],
        parse: impl Fn(&str) -> Option<T>,
        bad: &dyn Fn(usize, &str) -> Error,
        append: impl Fn(&mut B, Option<T>),
        finish: impl FnOnce(B) -> ArrayRef,
    ) -> Result<ArrayRef> {
        for (i, v) in values.iter().enumerate() {
            let value = match v {
                None => None,
                Some(v) => Some(parse(v).ok_or_else(|| bad(i, v))?),
            };
            append(&mut builder, value);
        }
        Ok(finish(builder))
    }
    let bad: &dyn Fn(usize, &str) -> Error = &bad;
    match data_type {
        DataType::Float64 => build(
            Float64Builder::new(),
            values,
            |s| s.parse::<f64>().ok(),
            bad,
            |b, v| b.append_option(v),
            |mut b| Arc::new(b.finish()),
        ),
        DataType::Int64 => build(
            Int64Builder::new(),
            values,
            |s| {
                s.parse::<i64>().ok().or_else(|| {
                    // (Some APIs write whole numbers as `12.0`.)
                    s.parse::<f64>()
                        .ok()
                        .filter(|f| f.fract() == 0.0)
                        .map(|f| f as i64)
                })
            },
            bad,
            |b, v| b.append_option(v),
            |mut b| Arc::new(b.finish()),
        ),
        DataType::Boolean => build(
            BooleanBuilder::new(),
            values,
            |s| match s {
                "true" => Some(true),
                "false" => Some(false),
                _ => None,
            },
            bad,
            |b, v| b.append_option(v),
            |mut b| Arc::new(b.finish()),
        ),
        DataType::Date32 => build(
            Date32Builder::new(),
            values,
            date,
            bad,
            |b, v| b.append_option(v),
            |mut b| Arc::new(b.finish()),
        ),
        DataType::Timestamp(TimeUnit::Millisecond, tz) => build(
            TimestampMillisecondBuilder::new(),
            values,
            timestamp_ms,
            bad,
            |b, v| b.append_option(v),
            |mut b| Arc::new(b.finish().with_timezone_opt(tz.clone())),
        ),
        _ => {
            let mut b = StringBuilder::new();
            for v in values {
                b.append_option(v.as_deref());
            }
            Ok(Arc::new(b.finish()))
        }
    }
}

/// A JSON scalar as text (`None` for null and for an empty string, which APIs use for "no value").
pub fn json_text(value: Option<&serde_json::Value>) -> Option<String> {
    match value? {
        serde_json::Value::String(s) if s.is_empty() => None,
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Array, AsArray};
    use datafusion::arrow::datatypes::{
        Date32Type, Float64Type, Int64Type, TimestampMillisecondType,
    };

    fn v(values: &[Option<&str>]) -> Vec<Option<String>> {
        values.iter().map(|v| v.map(str::to_string)).collect()
    }

    #[test]
    fn values_are_typed_as_declared_and_a_bad_one_is_an_error() {
        let bad = |i: usize, v: &str| Error::Write {
            message: format!("row {i}: {v}"),
        };
        let days = typed_column(
            &DataType::Date32,
            &v(&[Some("2024-01-15"), Some("1705276800000"), None]),
            bad,
        )
        .unwrap();
        let days = days.as_primitive::<Date32Type>();
        assert_eq!((days.value(0), days.value(1)), (19737, 19737));
        assert!(days.is_null(2));
        let ts = typed_column(
            &DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            &v(&[
                Some("2024-01-15T10:00:00.123Z"),
                Some("2024-01-15T10:00:00.123+0000"),
            ]),
            bad,
        )
        .unwrap();
        let ts = ts.as_primitive::<TimestampMillisecondType>();
        assert_eq!((ts.value(0), ts.value(1)), (1705312800123, 1705312800123));
        let n = typed_column(&DataType::Float64, &v(&[Some("7.5")]), bad).unwrap();
        assert_eq!(n.as_primitive::<Float64Type>().value(0), 7.5);
        let i = typed_column(&DataType::Int64, &v(&[Some("12"), Some("3.0")]), bad).unwrap();
        assert_eq!(i.as_primitive::<Int64Type>().values().to_vec(), [12, 3]);
        let err = typed_column(&DataType::Float64, &v(&[None, Some("seven")]), bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("row 1: seven"), "{err}");
        let err = typed_column(&DataType::Boolean, &v(&[Some("yes")]), bad).unwrap_err();
        assert!(err.to_string().contains("yes"));
        assert_eq!(
            json_text(Some(&serde_json::json!(12))).as_deref(),
            Some("12")
        );
        assert_eq!(json_text(Some(&serde_json::json!(""))), None);
    }
}
