//! Options of the `file` destination: where to write and in which format.

use std::fmt;
use std::str::FromStr;

use datafusion::datasource::listing::ListingTableUrl;

use crate::error::{Error, Result};
use crate::options::{OptionSpec, Options};

/// The options `CREATE CONNECTION ... TYPE file` accepts.
pub const OPTIONS: &[OptionSpec] = &[
    OptionSpec::new(
        "url",
        "path or URL",
        "",
        "the folder objects are written under: a local path or an s3://, gs://, az:// URL; \
              `INSERT INTO conn.obj` writes files under the folder obj/ of it",
    ),
    OptionSpec::new(
        "format",
        "jsonl | csv | parquet",
        "jsonl",
        "the file format objects are written in (and read back)",
    ),
];

/// A file format the `file` destination writes (and reads back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    /// One JSON object per line.
    Jsonl,
    /// Comma-separated values with a header row.
    Csv,
    /// Apache Parquet, Snappy-compressed.
    Parquet,
}

impl FileFormat {
    /// The extension of the files written, without the dot.
    pub fn extension(self) -> &'static str {
        match self {
            FileFormat::Jsonl => "jsonl",
            FileFormat::Csv => "csv",
            FileFormat::Parquet => "parquet",
        }
    }
}

impl FromStr for FileFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "jsonl" | "ndjson" | "json" => Ok(FileFormat::Jsonl),
            "csv" => Ok(FileFormat::Csv),
            "parquet" => Ok(FileFormat::Parquet),
            _ => Err("valid formats are 'jsonl', 'csv' and 'parquet'".into()),
        }
    }
}

impl fmt::Display for FileFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.extension())
    }
}

/// The typed options of one `file` connection.
#[derive(Debug, Clone)]
pub struct FileConfig {
    /// The folder objects live under (always ends with `/`).
    pub url: ListingTableUrl,
    pub format: FileFormat,
}

impl FileConfig {
    pub fn from_options(options: &Options) -> Result<Self> {
        let raw = options.required_string("url")?;
        let folder = if raw.ends_with('/') {
            raw.clone()
        } else {
            format!("{raw}/")
        };
        let url = ListingTableUrl::parse(&folder).map_err(|e| Error::Option {
            key: "url".into(),
            message: format!(
                "option 'url' = '{raw}' is not a path or URL sluice can write to: {e}"
            ),
        })?;
        let format = options
            .parse::<FileFormat>("format")?
            .unwrap_or(FileFormat::Jsonl);
        Ok(Self { url, format })
    }

    /// The URL of the folder holding `object`'s files.
    pub fn object_url(&self, object: &str) -> Result<ListingTableUrl> {
        ListingTableUrl::parse(format!("{}{object}/", self.url.as_str())).map_err(Error::from)
    }
}
