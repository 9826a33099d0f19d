//! Postgres types as Arrow types, and the binary COPY wire format in both directions: decoding
//! `COPY … TO STDOUT (FORMAT binary)` straight into Arrow builders (sources) and encoding Arrow
//! columns for `COPY … FROM STDIN (FORMAT binary)` (destinations). Binary, because it skips
//! parsing and printing text on both sides.

use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BinaryBuilder, BooleanBuilder, Date32Builder, Decimal128Builder,
    Float32Builder, Float64Builder, Int16Builder, Int32Builder, Int64Builder, ListArray,
    StringBuilder, Time64MicrosecondBuilder, TimestampMicrosecondBuilder,
};
use datafusion::arrow::buffer::{NullBuffer, OffsetBuffer};
use datafusion::arrow::datatypes::{
    DataType, Date32Type, Decimal128Type, Field, Float32Type, Float64Type, Int16Type, Int32Type,
    Int64Type, Time64MicrosecondType, TimeUnit,
};

/// Days from 1970-01-01 (Arrow) to 2000-01-01 (Postgres).
const PG_EPOCH_DAYS: i32 = 10_957;
/// Microseconds from 1970-01-01 to 2000-01-01.
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// The header of a binary COPY stream (signature, flags, no extension).
pub const COPY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// The trailer of a binary COPY stream.
pub const COPY_TRAILER: &[u8] = &[0xff, 0xff];

/// A Postgres column type sluice reads and writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgType {
    Bool,
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    /// `numeric(p, s)`; `None` for unconstrained numeric (read as double, as DuckDB does).
    Numeric(Option<(u8, i8)>),
    /// text, varchar, char, name, citext.
    Text,
    Json,
    Jsonb,
    Uuid,
    Bytea,
    Date,
    Time,
    Timestamp,
    Timestamptz,
    /// A one-dimensional array of a scalar type above.
    Array(Box<PgType>),
}

/// A column of a Postgres relation.
#[derive(Debug, Clone)]
pub struct PgColumn {
    pub name: String,
    /// The type as Postgres prints it (`character varying(20)`), for messages and DDL.
    pub type_name: String,
    /// `Err(type name)`: a type sluice cannot read or write.
    pub pg_type: Result<PgType, String>,
    pub not_null: bool,
}

impl PgType {
    /// The type of a column from its `pg_type.typname`, type modifier and, for arrays, the
    /// element's `typname`.
    pub fn from_catalog(typname: &str, typmod: i32, element: Option<&str>) -> Option<PgType> {
        if let Some(element) = element {
            let inner = PgType::from_catalog(element, typmod, None)?;
            return Some(PgType::Array(Box::new(inner)));
        }
        Some(match typname {
            "bool" => PgType::Bool,
            "int2" => PgType::Int2,
            "int4" => PgType::Int4,
            "int8" => PgType::Int8,
            "float4" => PgType::Float4,
            "float8" => PgType::Float8,
            "numeric" => {
                // typmod = ((precision << 16) | scale) + 4, -1 when unconstrained.
                if typmod >= 4 {
                    let m = typmod - 4;
                    let (p, s) = ((m >> 16) & 0xffff, m & 0xffff);
                    let s = if s > 1000 { s - 2048 } else { s };
                    if (1..=38).contains(&p) && (0..=p).contains(&s) {
                        PgType::Numeric(Some((p as u8, s as i8)))
                    } else {
                        PgType::Numeric(None)
                    }
                } else {
                    PgType::Numeric(None)
                }
            }
            "text" | "varchar" | "bpchar" | "name" | "citext" => PgType::Text,
            "json" => PgType::Json,
            "jsonb" => PgType::Jsonb,
            "uuid" => PgType::Uuid,
            "bytea" => PgType::Bytea,
            "date" => PgType::Date,
            "time" => PgType::Time,
            "timestamp" => PgType::Timestamp,
            "timestamptz" => PgType::Timestamptz,
            _ => return None,
        })
    }

    /// The Arrow type values of this type are read as.
    pub fn arrow(&self) -> DataType {
        match self {
            PgType::Bool => DataType::Boolean,
            PgType::Int2 => DataType::Int16,
            PgType::Int4 => DataType::Int32,
            PgType::Int8 => DataType::Int64,
            PgType::Float4 => DataType::Float32,
            PgType::Float8 | PgType::Numeric(None) => DataType::Float64,
            PgType::Numeric(Some((p, s))) => DataType::Decimal128(*p, *s),
            PgType::Text | PgType::Json | PgType::Jsonb | PgType::Uuid => DataType::Utf8,
            PgType::Bytea => DataType::Binary,
            PgType::Date => DataType::Date32,
            PgType::Time => DataType::Time64(TimeUnit::Microsecond),
            PgType::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, None),
            PgType::Timestamptz => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            PgType::Array(inner) => {
                DataType::List(Arc::new(Field::new("item", inner.arrow(), true)))
            }
        }
    }

    /// A type of the same binary format without length or precision limits (for staging
    /// tables, so that a value too long for the target is refused per record by the statement
    /// that writes it, not by the COPY of the whole batch).
    pub fn staging_type(&self) -> String {
        match self {
            PgType::Bool => "boolean".into(),
            PgType::Int2 => "smallint".into(),
            PgType::Int4 => "integer".into(),
            PgType::Int8 => "bigint".into(),
            PgType::Float4 => "real".into(),
            PgType::Float8 => "double precision".into(),
            PgType::Numeric(_) => "numeric".into(),
            PgType::Text => "text".into(),
            PgType::Json => "json".into(),
            PgType::Jsonb => "jsonb".into(),
            PgType::Uuid => "uuid".into(),
            PgType::Bytea => "bytea".into(),
            PgType::Date => "date".into(),
            PgType::Time => "time".into(),
            PgType::Timestamp => "timestamp".into(),
            PgType::Timestamptz => "timestamptz".into(),
            PgType::Array(inner) => format!("{}[]", inner.staging_type()),
        }
    }

    /// The type an Arrow value of type `arrow` is read back as when Postgres computes it
    /// (`None`: no such type here).
    pub fn for_arrow(arrow: &DataType) -> Option<PgType> {
        Some(match arrow {
            DataType::Boolean => PgType::Bool,
            DataType::Int8 | DataType::Int16 | DataType::UInt8 => PgType::Int2,
            DataType::Int32 | DataType::UInt16 => PgType::Int4,
            DataType::Int64 | DataType::UInt32 => PgType::Int8,
            DataType::Float16 | DataType::Float32 => PgType::Float4,
            DataType::Float64 => PgType::Float8,
            DataType::Decimal128(p, s) if *p <= 38 && *s >= 0 => PgType::Numeric(Some((*p, *s))),
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => PgType::Text,
            DataType::Binary | DataType::LargeBinary | DataType::BinaryView => PgType::Bytea,
            DataType::Date32 | DataType::Date64 => PgType::Date,
            DataType::Time64(_) | DataType::Time32(_) => PgType::Time,
            DataType::Timestamp(_, None) => PgType::Timestamp,
            DataType::Timestamp(_, Some(_)) => PgType::Timestamptz,
            DataType::List(item) | DataType::LargeList(item) => {
                PgType::Array(Box::new(PgType::for_arrow(item.data_type())?))
            }
            _ => return None,
        })
    }

    /// The type to CAST a value to so that it is read back as this type (with its typmod).
    pub fn cast_type(&self) -> String {
        match self {
            PgType::Numeric(Some((p, s))) => format!("numeric({p},{s})"),
            PgType::Array(inner) => format!("{}[]", inner.cast_type()),
            other => other.staging_type(),
        }
    }

    /// The Postgres type's OID (the binary array format names its element type).
    fn oid(&self) -> u32 {
        match self {
            PgType::Bool => 16,
            PgType::Int2 => 21,
            PgType::Int4 => 23,
            PgType::Int8 => 20,
            PgType::Float4 => 700,
            PgType::Float8 => 701,
            PgType::Numeric(_) => 1700,
            PgType::Text => 25,
            PgType::Json => 114,
            PgType::Jsonb => 3802,
            PgType::Uuid => 2950,
            PgType::Bytea => 17,
            PgType::Date => 1082,
            PgType::Time => 1083,
            PgType::Timestamp => 1114,
            PgType::Timestamptz => 1184,
            PgType::Array(_) => 0,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Decoding (COPY TO STDOUT, binary) into Arrow.

/// Why a value could not be read.
pub type DecodeError = String;

/// Builds one Arrow column from binary COPY values.
pub enum ColumnBuilder {
    Bool(BooleanBuilder),
    Int16(Int16Builder),
    Int32(Int32Builder),
    Int64(Int64Builder),
    Float32(Float32Builder),
    Float64(Float64Builder),
    /// Unconstrained numeric, as a double.
    NumericF64(Float64Builder),
    Decimal(Decimal128Builder, i8),
    Text(StringBuilder),
    Jsonb(StringBuilder),
    Uuid(StringBuilder),
    Bytea(BinaryBuilder),
    Date(Date32Builder),
    Time(Time64MicrosecondBuilder),
    Timestamp(TimestampMicrosecondBuilder, bool),
    List {
        item: Box<ColumnBuilder>,
        offsets: Vec<i32>,
        valid: Vec<bool>,
        field: Arc<Field>,
    },
}

impl ColumnBuilder {
    pub fn new(pg_type: &PgType, capacity: usize) -> Self {
        match pg_type {
            PgType::Bool => ColumnBuilder::Bool(BooleanBuilder::with_capacity(capacity)),
            PgType::Int2 => ColumnBuilder::Int16(Int16Builder::with_capacity(capacity)),
            PgType::Int4 => ColumnBuilder::Int32(Int32Builder::with_capacity(capacity)),
            PgType::Int8 => ColumnBuilder::Int64(Int64Builder::with_capacity(capacity)),
            PgType::Float4 => ColumnBuilder::Float32(Float32Builder::with_capacity(capacity)),
            PgType::Float8 => ColumnBuilder::Float64(Float64Builder::with_capacity(capacity)),
            PgType::Numeric(None) => {
                ColumnBuilder::NumericF64(Float64Builder::with_capacity(capacity))
            }
            PgType::Numeric(Some((p, s))) => ColumnBuilder::Decimal(
                Decimal128Builder::with_capacity(capacity)
                    .with_data_type(DataType::Decimal128(*p, *s)),
                *s,
            ),
            PgType::Text | PgType::Json => {
                ColumnBuilder::Text(StringBuilder::with_capacity(capacity, capacity * 16))
            }
            PgType::Jsonb => {
                ColumnBuilder::Jsonb(StringBuilder::with_capacity(capacity, capacity * 16))
            }
            PgType::Uuid => {
                ColumnBuilder::Uuid(StringBuilder::with_capacity(capacity, capacity * 36))
            }
            PgType::Bytea => {
                ColumnBuilder::Bytea(BinaryBuilder::with_capacity(capacity, capacity * 16))
            }
            PgType::Date => ColumnBuilder::Date(Date32Builder::with_capacity(capacity)),
            PgType::Time => ColumnBuilder::Time(Time64MicrosecondBuilder::with_capacity(capacity)),
            PgType::Timestamp | PgType::Timestamptz => {
                let utc = *pg_type == PgType::Timestamptz;
                let mut b = TimestampMicrosecondBuilder::with_capacity(capacity);
                if utc {
                    b = b.with_timezone("UTC");
                }
                ColumnBuilder::Timestamp(b, utc)
            }
            PgType::Array(inner) => ColumnBuilder::List {
                item: Box::new(ColumnBuilder::new(inner, capacity)),
                offsets: vec![0],
                valid: Vec::with_capacity(capacity),
                field: Arc::new(Field::new("item", inner.arrow(), true)),
            },
        }
    }

    /// Appends one value (`None`: SQL NULL).
    pub fn append(&mut self, value: Option<&[u8]>) -> Result<(), DecodeError> {
        let Some(v) = value else {
            self.append_null();
            return Ok(());
        };
        match self {
            ColumnBuilder::Bool(b) => b.append_value(fixed::<1>(v)?[0] != 0),
            ColumnBuilder::Int16(b) => b.append_value(i16::from_be_bytes(fixed(v)?)),
            ColumnBuilder::Int32(b) => b.append_value(i32::from_be_bytes(fixed(v)?)),
            ColumnBuilder::Int64(b) => b.append_value(i64::from_be_bytes(fixed(v)?)),
            ColumnBuilder::Float32(b) => b.append_value(f32::from_be_bytes(fixed(v)?)),
            ColumnBuilder::Float64(b) => b.append_value(f64::from_be_bytes(fixed(v)?)),
            ColumnBuilder::NumericF64(b) => b.append_value(numeric_to_f64(v)?),
            ColumnBuilder::Decimal(b, scale) => b.append_value(numeric_to_i128(v, *scale)?),
            ColumnBuilder::Text(b) => b.append_value(utf8(v)?),
            ColumnBuilder::Jsonb(b) => match v.split_first() {
                Some((1, rest)) => b.append_value(utf8(rest)?),
                _ => return Err("unknown jsonb binary version".into()),
            },
            ColumnBuilder::Uuid(b) => {
                let u = uuid::Uuid::from_bytes(fixed(v)?);
                b.append_value(
                    u.hyphenated()
                        .encode_lower(&mut uuid::Uuid::encode_buffer()),
                );
            }
            ColumnBuilder::Bytea(b) => b.append_value(v),
            ColumnBuilder::Date(b) => {
                let days = i32::from_be_bytes(fixed(v)?);
                match days {
                    i32::MAX | i32::MIN => return Err("infinite dates cannot be read".into()),
                    d => b.append_value(d + PG_EPOCH_DAYS),
                }
            }
            ColumnBuilder::Time(b) => b.append_value(i64::from_be_bytes(fixed(v)?)),
            ColumnBuilder::Timestamp(b, _) => {
                let micros = i64::from_be_bytes(fixed(v)?);
                match micros {
                    i64::MAX | i64::MIN => {
                        return Err("infinite timestamps cannot be read".into());
                    }
                    m => b.append_value(m + PG_EPOCH_MICROS),
                }
            }
            ColumnBuilder::List {
                item,
                offsets,
                valid,
                ..
            } => {
                let n = decode_array(v, item)?;
                let last = *offsets.last().expect("offsets start with 0");
                offsets.push(last + n as i32);
                valid.push(true);
            }
        }
        Ok(())
    }

    fn append_null(&mut self) {
        match self {
            ColumnBuilder::Bool(b) => b.append_null(),
            ColumnBuilder::Int16(b) => b.append_null(),
            ColumnBuilder::Int32(b) => b.append_null(),
            ColumnBuilder::Int64(b) => b.append_null(),
            ColumnBuilder::Float32(b) => b.append_null(),
            ColumnBuilder::Float64(b) | ColumnBuilder::NumericF64(b) => b.append_null(),
            ColumnBuilder::Decimal(b, _) => b.append_null(),
            ColumnBuilder::Text(b) | ColumnBuilder::Jsonb(b) | ColumnBuilder::Uuid(b) => {
                b.append_null()
            }
            ColumnBuilder::Bytea(b) => b.append_null(),
            ColumnBuilder::Date(b) => b.append_null(),
            ColumnBuilder::Time(b) => b.append_null(),
            ColumnBuilder::Timestamp(b, _) => b.append_null(),
            ColumnBuilder::List { offsets, valid, .. } => {
                let last = *offsets.last().expect("offsets start with 0");
                offsets.push(last);
                valid.push(false);
            }
        }
    }

    /// The column built so far; the builder starts over.
    pub fn finish(&mut self) -> ArrayRef {
        match self {
            ColumnBuilder::Bool(b) => Arc::new(b.finish()),
            ColumnBuilder::Int16(b) => Arc::new(b.finish()),
            ColumnBuilder::Int32(b) => Arc::new(b.finish()),
            ColumnBuilder::Int64(b) => Arc::new(b.finish()),
            ColumnBuilder::Float32(b) => Arc::new(b.finish()),
            ColumnBuilder::Float64(b) | ColumnBuilder::NumericF64(b) => Arc::new(b.finish()),
            ColumnBuilder::Decimal(b, _) => Arc::new(b.finish()),
            ColumnBuilder::Text(b) | ColumnBuilder::Jsonb(b) | ColumnBuilder::Uuid(b) => {
                Arc::new(b.finish())
            }
            ColumnBuilder::Bytea(b) => Arc::new(b.finish()),
            ColumnBuilder::Date(b) => Arc::new(b.finish()),
            ColumnBuilder::Time(b) => Arc::new(b.finish()),
            ColumnBuilder::Timestamp(b, _) => Arc::new(b.finish()),
            ColumnBuilder::List {
                item,
                offsets,
                valid,
                field,
            } => {
                let values = item.finish();
                let offsets = OffsetBuffer::new(std::mem::replace(offsets, vec![0]).into());
                let nulls = NullBuffer::from(std::mem::take(valid));
                Arc::new(ListArray::new(
                    Arc::clone(field),
                    offsets,
                    values,
                    (nulls.null_count() > 0).then_some(nulls),
                ))
            }
        }
    }
}

fn fixed<const N: usize>(v: &[u8]) -> Result<[u8; N], DecodeError> {
    v.try_into()
        .map_err(|_| format!("expected {N} bytes, got {}", v.len()))
}

fn utf8(v: &[u8]) -> Result<&str, DecodeError> {
    std::str::from_utf8(v).map_err(|e| format!("text is not UTF-8: {e}"))
}

fn be_i16(v: &[u8], at: usize) -> Result<i16, DecodeError> {
    v.get(at..at + 2)
        .map(|b| i16::from_be_bytes([b[0], b[1]]))
        .ok_or_else(|| "truncated value".to_string())
}

fn be_i32(v: &[u8], at: usize) -> Result<i32, DecodeError> {
    v.get(at..at + 4)
        .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| "truncated value".to_string())
}

/// A binary numeric: (digits in base 10000, weight of the first digit, negative, special).
fn numeric_parts(v: &[u8]) -> Result<(Vec<i16>, i16, bool), DecodeError> {
    let ndigits = be_i16(v, 0)?;
    let weight = be_i16(v, 2)?;
    let sign = be_i16(v, 4)? as u16;
    match sign {
        0x0000 | 0x4000 => {}
        0xC000 => return Err("NaN cannot be read as a number".into()),
        _ => return Err("infinite numerics cannot be read".into()),
    }
    let digits = (0..ndigits.max(0) as usize)
        .map(|i| be_i16(v, 8 + 2 * i))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((digits, weight, sign == 0x4000))
}

fn numeric_to_f64(v: &[u8]) -> Result<f64, DecodeError> {
    let (digits, weight, negative) = numeric_parts(v)?;
    // Through the decimal text, so that the nearest double is chosen exactly.
    let mut text = String::with_capacity(digits.len() * 4 + 8);
    if negative {
        text.push('-');
    }
    for d in &digits {
        text.push_str(&format!("{d:04}"));
    }
    if text.is_empty() || text == "-" {
        return Ok(0.0);
    }
    let exponent = 4 * (weight as i32 - digits.len() as i32 + 1);
    text.push_str(&format!("e{exponent}"));
    text.parse::<f64>().map_err(|e| e.to_string())
}

fn numeric_to_i128(v: &[u8], scale: i8) -> Result<i128, DecodeError> {
    let (digits, weight, negative) = numeric_parts(v)?;
    let mut acc: i128 = 0;
    for d in &digits {
        acc = acc
            .checked_mul(10_000)
            .and_then(|a| a.checked_add(*d as i128))
            .ok_or("numeric does not fit 38 digits")?;
    }
    // acc × 10000^(weight - ndigits + 1), as a value with `scale` decimal places.
    let exponent = 4 * (weight as i32 - digits.len() as i32 + 1) + scale as i32;
    let value = if exponent >= 0 {
        10i128
            .checked_pow(exponent as u32)
            .and_then(|p| acc.checked_mul(p))
            .ok_or("numeric does not fit 38 digits")?
    } else {
        acc / 10i128.pow((-exponent) as u32)
    };
    Ok(if negative { -value } else { value })
}

/// Decodes a binary array into `item`, returning its number of elements.
fn decode_array(v: &[u8], item: &mut ColumnBuilder) -> Result<usize, DecodeError> {
    let ndim = be_i32(v, 0)?;
    if ndim == 0 {
        return Ok(0);
    }
    if ndim != 1 {
        return Err(format!(
            "{ndim}-dimensional arrays cannot be read; only one-dimensional arrays"
        ));
    }
    let len = be_i32(v, 12)?.max(0) as usize;
    let mut at = 20;
    for _ in 0..len {
        let n = be_i32(v, at)?;
        at += 4;
        if n < 0 {
            item.append(None)?;
        } else {
            let end = at + n as usize;
            item.append(Some(v.get(at..end).ok_or("truncated array")?))?;
            at = end;
        }
    }
    Ok(len)
}

/// Splits a binary COPY stream into rows. Bytes arrive in arbitrary chunks; a row is decoded only
/// once all of it has arrived.
pub struct CopyReader {
    buf: Vec<u8>,
    pos: usize,
    header_read: bool,
    pub done: bool,
}

impl Default for CopyReader {
    fn default() -> Self {
        Self::new()
    }
}

impl CopyReader {
    pub fn new() -> Self {
        Self {
            buf: Vec::with_capacity(1 << 20),
            pos: 0,
            header_read: false,
            done: false,
        }
    }

    /// Adds bytes received from the server.
    pub fn extend(&mut self, chunk: &[u8]) {
        if self.pos > 0 && self.pos * 2 > self.buf.len() {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(chunk);
    }

    /// Decodes every complete row buffered so far into `columns` (up to `max_rows` rows);
    /// returns how many rows were decoded. An error names the failing column's index.
    pub fn decode_rows(
        &mut self,
        columns: &mut [ColumnBuilder],
        max_rows: usize,
    ) -> Result<usize, (Option<usize>, DecodeError)> {
        if !self.header_read {
            let fixed = 11 + 4 + 4;
            if self.buf.len() - self.pos < fixed {
                return Ok(0);
            }
            if &self.buf[self.pos..self.pos + 11] != b"PGCOPY\n\xff\r\n\0" {
                return Err((None, "not a binary COPY stream".into()));
            }
            let ext = be_i32(&self.buf, self.pos + 15).map_err(|e| (None, e))? as usize;
            if self.buf.len() - self.pos < fixed + ext {
                return Ok(0);
            }
            self.pos += fixed + ext;
            self.header_read = true;
        }
        let mut rows = 0;
        while rows < max_rows && !self.done {
            let data = &self.buf[self.pos..];
            let Some(end) = row_end(data, columns.len()).map_err(|e| (None, e))? else {
                break;
            };
            if end == TRAILER {
                // The trailer (-1 fields).
                self.done = true;
                self.pos += 2;
                break;
            }
            let mut at = 2;
            for (i, column) in columns.iter_mut().enumerate() {
                let n = i32::from_be_bytes(data[at..at + 4].try_into().expect("4 bytes"));
                at += 4;
                if n < 0 {
                    column.append(None).map_err(|e| (Some(i), e))?;
                } else {
                    let len = n as usize;
                    column
                        .append(Some(&data[at..at + len]))
                        .map_err(|e| (Some(i), e))?;
                    at += len;
                }
            }
            self.pos += end;
            rows += 1;
        }
        Ok(rows)
    }
}

/// What [`row_end`] answers for the trailer.
const TRAILER: usize = usize::MAX;

/// The length of the row at the start of `data` if all of it is there ([`TRAILER`] for the
/// trailer).
fn row_end(data: &[u8], columns: usize) -> Result<Option<usize>, DecodeError> {
    if data.len() < 2 {
        return Ok(None);
    }
    let fields = i16::from_be_bytes([data[0], data[1]]);
    if fields == -1 {
        return Ok(Some(TRAILER));
    }
    if fields as usize != columns {
        return Err(format!(
            "the server sent {fields} fields per row, expected {columns}"
        ));
    }
    let mut at = 2;
    for _ in 0..columns {
        if data.len() < at + 4 {
            return Ok(None);
        }
        let n = i32::from_be_bytes(data[at..at + 4].try_into().expect("4 bytes"));
        at += 4;
        if n > 0 {
            at += n as usize;
        }
    }
    Ok((data.len() >= at).then_some(at))
}

// ---------------------------------------------------------------------------------------------
// Encoding Arrow into COPY FROM STDIN (binary).

/// Whether an Arrow column of type `arrow` can be written to a Postgres column of type `pg`.
/// (The engine casts the query's columns to the object's Arrow types before the sink.)
pub fn can_encode(arrow: &DataType, pg: &PgType) -> bool {
    match (pg, arrow) {
        (PgType::Array(inner), DataType::List(f)) => can_encode(f.data_type(), inner),
        (PgType::Array(_), _) => false,
        (PgType::Text | PgType::Json | PgType::Jsonb | PgType::Uuid, t) => {
            matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
        }
        (pg, t) => &pg.arrow() == t,
    }
}

/// Appends the value at `row` of `array` (of Postgres type `pg`) as a binary COPY field: a length
/// and the bytes, or -1 for NULL.
pub fn encode_field(
    out: &mut Vec<u8>,
    array: &dyn Array,
    row: usize,
    pg: &PgType,
) -> Result<(), String> {
    if array.is_null(row) {
        out.extend_from_slice(&(-1i32).to_be_bytes());
        return Ok(());
    }
    let len_at = out.len();
    out.extend_from_slice(&[0; 4]);
    encode_value(out, array, row, pg)?;
    let len = (out.len() - len_at - 4) as i32;
    out[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

fn string_at(array: &dyn Array, row: usize) -> &str {
    match array.data_type() {
        DataType::Utf8View => array.as_string_view().value(row),
        DataType::LargeUtf8 => array.as_string::<i64>().value(row),
        _ => array.as_string::<i32>().value(row),
    }
}

fn encode_value(
    out: &mut Vec<u8>,
    array: &dyn Array,
    row: usize,
    pg: &PgType,
) -> Result<(), String> {
    match pg {
        PgType::Bool => out.push(array.as_boolean().value(row) as u8),
        PgType::Int2 => {
            out.extend_from_slice(&array.as_primitive::<Int16Type>().value(row).to_be_bytes())
        }
        PgType::Int4 => {
            out.extend_from_slice(&array.as_primitive::<Int32Type>().value(row).to_be_bytes())
        }
        PgType::Int8 => {
            out.extend_from_slice(&array.as_primitive::<Int64Type>().value(row).to_be_bytes())
        }
        PgType::Float4 => {
            out.extend_from_slice(&array.as_primitive::<Float32Type>().value(row).to_be_bytes())
        }
        PgType::Float8 => {
            out.extend_from_slice(&array.as_primitive::<Float64Type>().value(row).to_be_bytes())
        }
        PgType::Numeric(None) => {
            let v = array.as_primitive::<Float64Type>().value(row);
            encode_numeric_f64(out, v);
        }
        PgType::Numeric(Some((_, scale))) => {
            let v = array.as_primitive::<Decimal128Type>().value(row);
            encode_numeric(out, v, *scale as i32);
        }
        PgType::Text | PgType::Json => out.extend_from_slice(string_at(array, row).as_bytes()),
        PgType::Jsonb => {
            out.push(1);
            out.extend_from_slice(string_at(array, row).as_bytes());
        }
        PgType::Uuid => {
            let s = string_at(array, row);
            let u = uuid::Uuid::parse_str(s).map_err(|_| format!("'{s}' is not a UUID"))?;
            out.extend_from_slice(u.as_bytes());
        }
        PgType::Bytea => match array.data_type() {
            DataType::LargeBinary => out.extend_from_slice(array.as_binary::<i64>().value(row)),
            DataType::BinaryView => out.extend_from_slice(array.as_binary_view().value(row)),
            _ => out.extend_from_slice(array.as_binary::<i32>().value(row)),
        },
        PgType::Date => out.extend_from_slice(
            &(array.as_primitive::<Date32Type>().value(row) - PG_EPOCH_DAYS).to_be_bytes(),
        ),
        PgType::Time => out.extend_from_slice(
            &array
                .as_primitive::<Time64MicrosecondType>()
                .value(row)
                .to_be_bytes(),
        ),
        PgType::Timestamp | PgType::Timestamptz => {
            let micros = array
                .as_primitive::<datafusion::arrow::datatypes::TimestampMicrosecondType>()
                .value(row);
            out.extend_from_slice(&(micros - PG_EPOCH_MICROS).to_be_bytes());
        }
        PgType::Array(inner) => {
            let list = array.as_list::<i32>();
            let values = list.value(row);
            let has_null = values.null_count() > 0;
            out.extend_from_slice(&1i32.to_be_bytes());
            out.extend_from_slice(&(has_null as i32).to_be_bytes());
            out.extend_from_slice(&inner.oid().to_be_bytes());
            out.extend_from_slice(&(values.len() as i32).to_be_bytes());
            out.extend_from_slice(&1i32.to_be_bytes());
            for i in 0..values.len() {
                encode_field(out, values.as_ref(), i, inner)?;
            }
        }
    }
    Ok(())
}

/// A binary numeric from an unscaled integer with `scale` decimal places.
fn encode_numeric(out: &mut Vec<u8>, unscaled: i128, scale: i32) {
    let negative = unscaled < 0;
    let mut text = unscaled.unsigned_abs().to_string();
    // Split into integer and fraction digits.
    let scale_u = scale.max(0) as usize;
    if text.len() <= scale_u {
        text = format!("{}{text}", "0".repeat(scale_u + 1 - text.len()));
    }
    let (int, frac) = text.split_at(text.len() - scale_u);
    encode_numeric_digits(out, negative, int, frac, scale_u as u16);
}

fn encode_numeric_f64(out: &mut Vec<u8>, v: f64) {
    if v.is_nan() {
        out.extend_from_slice(&[0, 0, 0, 0, 0xC0, 0, 0, 0]);
        return;
    }
    if v.is_infinite() {
        let sign: u16 = if v > 0.0 { 0xD000 } else { 0xF000 };
        out.extend_from_slice(&[0, 0, 0, 0]);
        out.extend_from_slice(&sign.to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        return;
    }
    // Rust prints the shortest text that reads back as the same double, without exponent.
    let text = format!("{}", v.abs());
    let (int, frac) = text.split_once('.').unwrap_or((&text, ""));
    encode_numeric_digits(out, v < 0.0, int, frac, frac.len() as u16);
}

/// Encodes decimal digits `int`.`frac` as base-10000 groups aligned on the decimal point.
fn encode_numeric_digits(out: &mut Vec<u8>, negative: bool, int: &str, frac: &str, dscale: u16) {
    let int = int.trim_start_matches('0');
    let int_pad = (4 - int.len() % 4) % 4;
    let frac_pad = (4 - frac.len() % 4) % 4;
    let digits_text: String = "0".repeat(int_pad) + int + frac + &"0".repeat(frac_pad);
    let mut groups: Vec<i16> = digits_text
        .as_bytes()
        .chunks(4)
        .map(|c| c.iter().fold(0i16, |a, d| a * 10 + (d - b'0') as i16))
        .collect();
    let mut weight = ((int.len() + int_pad) / 4) as i32 - 1;
    // Strip leading and trailing zero groups.
    while groups.first() == Some(&0) {
        groups.remove(0);
        weight -= 1;
    }
    while groups.last() == Some(&0) {
        groups.pop();
    }
    if groups.is_empty() {
        weight = 0;
    }
    out.extend_from_slice(&(groups.len() as i16).to_be_bytes());
    out.extend_from_slice(&(weight as i16).to_be_bytes());
    let sign: u16 = if negative && !groups.is_empty() {
        0x4000
    } else {
        0
    };
    out.extend_from_slice(&sign.to_be_bytes());
    out.extend_from_slice(&dscale.to_be_bytes());
    for g in groups {
        out.extend_from_slice(&g.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip_numeric(unscaled: i128, scale: i8) -> i128 {
        let mut out = vec![];
        encode_numeric(&mut out, unscaled, scale as i32);
        numeric_to_i128(&out, scale).unwrap()
    }

    #[test]
    fn numerics_roundtrip() {
        for (v, s) in [
            (0, 2),
            (1, 0),
            (-1, 0),
            (12345, 2),
            (-12345, 2),
            (100000000, 4),
            (5, 3),
            (99999999999999999999999999999999999999, 0),
            (-10001, 4),
        ] {
            assert_eq!(roundtrip_numeric(v, s), v, "{v} scale {s}");
        }
    }

    #[test]
    fn float_numerics_roundtrip() {
        for v in [0.0, 1.5, -2.25, 1e-7, 123456789.125, 1e21, -0.001] {
            let mut out = vec![];
            encode_numeric_f64(&mut out, v);
            assert_eq!(numeric_to_f64(&out).unwrap(), v, "{v}");
        }
    }

    #[test]
    fn numeric_typmods() {
        // numeric(10, 2)
        let typmod = ((10 << 16) | 2) + 4;
        assert_eq!(
            PgType::from_catalog("numeric", typmod, None),
            Some(PgType::Numeric(Some((10, 2))))
        );
        assert_eq!(
            PgType::from_catalog("numeric", -1, None),
            Some(PgType::Numeric(None))
        );
        assert_eq!(PgType::from_catalog("tsvector", -1, None), None);
    }

    #[test]
    fn copy_rows_split_across_chunks() {
        let mut stream = COPY_HEADER.to_vec();
        for i in 0..3i64 {
            stream.extend_from_slice(&2i16.to_be_bytes());
            stream.extend_from_slice(&8i32.to_be_bytes());
            stream.extend_from_slice(&i.to_be_bytes());
            if i == 1 {
                stream.extend_from_slice(&(-1i32).to_be_bytes());
            } else {
                stream.extend_from_slice(&2i32.to_be_bytes());
                stream.extend_from_slice(b"hi");
            }
        }
        stream.extend_from_slice(COPY_TRAILER);
        let mut columns = vec![
            ColumnBuilder::new(&PgType::Int8, 4),
            ColumnBuilder::new(&PgType::Text, 4),
        ];
        let mut reader = CopyReader::new();
        let mut rows = 0;
        for chunk in stream.chunks(5) {
            reader.extend(chunk);
            rows += reader.decode_rows(&mut columns, 100).unwrap();
        }
        assert!(reader.done);
        assert_eq!(rows, 3);
        let ids = columns[0].finish();
        let names = columns[1].finish();
        assert_eq!(ids.as_primitive::<Int64Type>().values(), &[0, 1, 2]);
        assert_eq!(names.null_count(), 1);
        assert_eq!(names.as_string::<i32>().value(2), "hi");
    }
}
