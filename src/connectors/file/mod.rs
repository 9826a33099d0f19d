//! The `file` destination: each object is a folder of files, one file per run.
//!
//! ```sql
//! CREATE CONNECTION out TYPE file OPTIONS (url 'out/', format 'parquet');
//! INSERT INTO out.contacts SELECT email, score FROM customers;   -- writes out/contacts/<stamp>-<id>.parquet
//! SELECT count(*) FROM out.contacts;                               -- reads every run's files back
//! ```

mod config;
mod encode;
mod sink;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::TableProvider;
use datafusion::datasource::file_format::FileFormat as DfFileFormat;
use datafusion::datasource::file_format::csv::CsvFormat;
use datafusion::datasource::file_format::json::JsonFormat;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{ListingOptions, ListingTable, ListingTableConfig};
use datafusion::datasource::sink::DataSink;
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::runtime_env::RuntimeEnv;
use futures::TryStreamExt;

pub use config::{FileConfig, FileFormat, OPTIONS};
pub use sink::FileSink;

use crate::connections::{ConnectContext, Connected, ConnectorKind, Role};
use crate::connectors::{Destination, DestinationSchema, ObjectSpec, WriteReport};
use crate::error::{Error, Result};
use crate::options::{OptionSpec, Options};

/// `TYPE file`.
pub struct FileConnector;

impl ConnectorKind for FileConnector {
    fn kind(&self) -> &'static str {
        "file"
    }

    fn summary(&self) -> &'static str {
        "files (JSON lines, CSV, Parquet) in a local folder or on S3, GCS or Azure: written one file per statement, read back as a table"
    }

    fn role(&self) -> Role {
        Role::Both
    }

    fn options(&self) -> &'static [OptionSpec] {
        OPTIONS
    }

    fn connect(
        &self,
        name: &str,
        options: &Options,
        context: &ConnectContext,
    ) -> Result<Connected> {
        let config = FileConfig::from_options(options)?;
        let destination = FileDestination {
            connection: name.to_string(),
            config,
            runtime: Arc::clone(&context.runtime),
            known: Mutex::default(),
        };
        Ok(Connected::schema(Arc::new(DestinationSchema::new(
            Arc::new(destination),
        ))))
    }
}

/// One `file` connection.
#[derive(Debug)]
pub struct FileDestination {
    connection: String,
    config: FileConfig,
    runtime: Arc<RuntimeEnv>,
    /// Objects looked up or written in this session (remote folders are not listed eagerly).
    known: Mutex<BTreeSet<String>>,
}

impl FileDestination {
    fn listing_options(&self) -> ListingOptions {
        let format: Arc<dyn DfFileFormat> = match self.config.format {
            FileFormat::Jsonl => Arc::new(JsonFormat::default()),
            FileFormat::Csv => Arc::new(CsvFormat::default().with_has_header(true)),
            FileFormat::Parquet => Arc::new(ParquetFormat::default()),
        };
        ListingOptions::new(format)
            .with_file_extension(format!(".{}", self.config.format.extension()))
    }

    /// An object name is one folder name as it is: no path separators, no leading '.', and none
    /// of the characters a URL reads differently ('%' escapes, so `%2e%2e` was '..'; '?' and '#'
    /// end the path, so `x?y` was `x`), nor control characters.
    fn check_name(&self, name: &str) -> Result<()> {
        if name.is_empty()
            || name.starts_with('.')
            || name.contains(['/', '\\', '%', '?', '#'])
            || name.chars().any(char::is_control)
        {
            return Err(Error::plan(
                format!(
                    "'{}' cannot name a file destination object: use a name without '/', '\\', '%', '?', '#', control characters or a leading '.'",
                    name.escape_debug()
                ),
                name,
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl Destination for FileDestination {
    fn unreadable(&self, object: &str) -> String {
        format!(
            "{0}.{object} holds nothing to read yet: no file has been written under it; INSERT INTO {0}.{object} … first",
            self.connection()
        )
    }

    fn connection(&self) -> &str {
        &self.connection
    }

    fn object_names(&self) -> Vec<String> {
        let mut names = self.known.lock().expect("names lock").clone();
        // Local folders are cheap to list; remote ones are only known once used.
        if let Ok(url) = url::Url::parse(self.config.url.as_str())
            && url.scheme() == "file"
            && let Ok(path) = url.to_file_path()
            && let Ok(entries) = std::fs::read_dir(path)
        {
            names.extend(
                entries
                    .flatten()
                    .filter(|e| e.path().is_dir())
                    .filter_map(|e| e.file_name().into_string().ok()),
            );
        }
        names.into_iter().collect()
    }

    async fn object(&self, name: &str) -> Result<Option<ObjectSpec>> {
        self.check_name(name)?;
        self.known
            .lock()
            .expect("names lock")
            .insert(name.to_string());
        // Any name is a valid object: its folder is created by the first write.
        Ok(Some(ObjectSpec {
            name: name.to_string(),
            fields: None,
            key: None,
            composite_key: vec![],
            match_keys: vec![],
        }))
    }

    async fn reader(&self, object: &ObjectSpec) -> Result<Option<Arc<dyn TableProvider>>> {
        let url = self.config.object_url(&object.name)?;
        let store = self.runtime.object_store(&url)?;
        let options = self.listing_options();
        let session = SessionStateBuilder::new()
            .with_runtime_env(Arc::clone(&self.runtime))
            .build();
        let has_files = url
            .list_all_files(&session, store.as_ref(), &options.file_extension)
            .await?
            .try_next()
            .await?
            .is_some();
        if !has_files {
            return Ok(None);
        }
        let schema: SchemaRef = options.infer_schema(&session, &url).await?;
        let config = ListingTableConfig::new(url)
            .with_listing_options(options)
            .with_schema(schema);
        Ok(Some(Arc::new(ListingTable::try_new(config)?)))
    }

    /// Each INSERT writes a complete new file of every row.
    fn stateful(&self) -> bool {
        false
    }

    fn sink(
        &self,
        object: &ObjectSpec,
        schema: SchemaRef,
        report: Arc<WriteReport>,
        _sync: Option<Arc<crate::sync::SyncRun>>,
    ) -> Result<Arc<dyn DataSink>> {
        Ok(Arc::new(FileSink::new(
            &self.connection,
            &object.name,
            self.config.object_url(&object.name)?,
            self.config.format,
            schema,
            report,
        )))
    }
}
