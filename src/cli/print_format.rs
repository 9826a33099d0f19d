//! Printing statement outcomes: result tables as table, CSV or JSON; summaries as one line.

use std::io::Write;

use datafusion::arrow::csv::WriterBuilder as CsvWriterBuilder;
use datafusion::arrow::json::ArrayWriter;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::util::pretty::pretty_format_batches;

use crate::engine::Outcome;
use crate::error::Result;

/// Machine-readable output or the text for people (`--output`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Output {
    #[default]
    Text,
    Json,
}

/// How query results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PrintFormat {
    /// An aligned text table.
    Table,
    /// CSV with a header row.
    Csv,
    /// A JSON array of objects.
    Json,
}

impl std::str::FromStr for PrintFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "table" => Ok(PrintFormat::Table),
            "csv" => Ok(PrintFormat::Csv),
            "json" => Ok(PrintFormat::Json),
            other => Err(format!("unknown format '{other}'; use table, csv or json")),
        }
    }
}

/// Printing settings of a session.
#[derive(Debug, Clone)]
pub struct PrintOptions {
    pub format: PrintFormat,
    /// Print only rows and errors.
    pub quiet: bool,
    /// Print each statement's elapsed time (REPL `\timing`).
    pub timing: bool,
    /// `--output json`: one JSON object per statement instead of text.
    pub output: Output,
}

impl PrintOptions {
    /// Prints one outcome to `out`.
    pub fn print(&self, outcome: &Outcome, out: &mut dyn Write) -> Result<()> {
        match outcome {
            Outcome::Rows { schema, batches } => {
                let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
                let mut batches = batches.clone();
                if batches.is_empty() {
                    batches.push(RecordBatch::new_empty(schema.clone()));
                }
                self.print_batches(&batches, out)?;
                if self.format == PrintFormat::Table && !self.quiet {
                    writeln!(out, "{rows} row{}", if rows == 1 { "" } else { "s" }).map_err(io)?;
                }
            }
            Outcome::Done(message) if !self.quiet => writeln!(out, "{message}").map_err(io)?,
            Outcome::Write(summary) if !self.quiet => writeln!(out, "{summary}").map_err(io)?,
            Outcome::DryRun(report) => writeln!(out, "{report}").map_err(io)?,
            Outcome::Done(_) | Outcome::Write(_) | Outcome::Checked => {}
        }
        Ok(())
    }

    fn print_batches(&self, batches: &[RecordBatch], out: &mut dyn Write) -> Result<()> {
        match self.format {
            PrintFormat::Table => {
                writeln!(out, "{}", pretty_format_batches(batches)?).map_err(io)?;
            }
            PrintFormat::Csv => {
                let mut writer = CsvWriterBuilder::new().with_header(true).build(&mut *out);
                for batch in batches {
                    writer.write(batch)?;
                }
            }
            PrintFormat::Json => {
                out.write_all(&json_array(batches)?).map_err(io)?;
                writeln!(out).map_err(io)?;
            }
        }
        Ok(())
    }
}

/// Rows as one JSON array of objects (`[]` when there are none).
pub fn json_array(batches: &[RecordBatch]) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    let mut writer = ArrayWriter::new(&mut buf);
    for batch in batches {
        writer.write(batch)?;
    }
    writer.finish()?;
    drop(writer);
    if buf.is_empty() {
        buf.extend_from_slice(b"[]");
    }
    Ok(buf)
}

fn io(e: std::io::Error) -> crate::Error {
    crate::Error::Io {
        context: "cannot write output".into(),
        source: e,
    }
}
