//! The `salesforce` destination: sObjects through sObject Collections and Bulk API 2.0.
//!
//! ```sql
//! CREATE CONNECTION sf TYPE salesforce OPTIONS (login_url 'https://acme.my.salesforce.com',
//!     client_id env('SF_CLIENT_ID'), client_secret env('SF_CLIENT_SECRET'));
//! INSERT INTO sf.contact SELECT id AS External_Id__c, last_name AS LastName FROM leads;  -- upsert by external id
//! MERGE INTO sf.contact t USING leads s ON t.External_Id__c = s.id                     -- update-only
//!   WHEN MATCHED THEN UPDATE SET Lead_Score__c = s.score;
//! ```
//!
//! Objects are named by their API name in any case (`sf.contact`, `sf."Churn_Score__c"`); their
//! fields come from the describe call ([`api`]), so an unknown, read-only or non-updateable
//! field fails at plan time. Records are matched by an External ID field or by `Id`. OAuth
//! ([`auth`]): client credentials, refresh token or JWT bearer. Writes ([`sink`]) go through
//! sObject Collections (the shared delivery engine; answers read by [`retry`]) or Bulk API 2.0
//! jobs ([`bulk`]) above `bulk_threshold`; values are encoded by [`encode`]. The quota is the
//! org's rolling 24-hour allocation, read from `Sforce-Limit-Info` on every answer.

pub mod api;
mod auth;
mod bulk;
mod config;
pub mod encode;
mod read;
pub mod retry;
mod sink;

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::TableProvider;
use datafusion::datasource::sink::DataSink;

pub use api::SalesforceConnection;
pub use config::{OPTIONS, SalesforceConfig};
pub use sink::SalesforceSink;

use crate::connections::{ConnectContext, Connected, ConnectorKind, Role};
use crate::connectors::paged::PagedTable;
use crate::connectors::{Destination, DestinationSchema, ObjectSpec, WriteReport, key_index};
use crate::error::{Error, Result};
use crate::options::{OptionSpec, Options};
use crate::sync::SyncRun;

/// `TYPE salesforce`.
pub struct SalesforceConnector;

impl ConnectorKind for SalesforceConnector {
    fn kind(&self) -> &'static str {
        "salesforce"
    }

    fn summary(&self) -> &'static str {
        "Salesforce sObjects by Id or External ID, through sObject Collections or Bulk API 2.0"
    }

    fn role(&self) -> Role {
        Role::Destination
    }

    fn options(&self) -> &'static [OptionSpec] {
        &OPTIONS
    }

    fn connect(
        &self,
        name: &str,
        options: &Options,
        _context: &ConnectContext,
    ) -> Result<Connected> {
        let config = SalesforceConfig::from_options(options)?;
        let client = config
            .http
            .client("login_url", crate::delivery::settings::Redirects::None)?;
        let destination =
            SalesforceDestination(Arc::new(SalesforceConnection::new(name, config, client)));
        Ok(Connected::schema(Arc::new(DestinationSchema::new(
            Arc::new(destination),
        ))))
    }
}

/// One Salesforce connection.
#[derive(Debug)]
pub struct SalesforceDestination(Arc<SalesforceConnection>);

#[async_trait]
impl Destination for SalesforceDestination {
    async fn reader(&self, object: &ObjectSpec) -> Result<Option<Arc<dyn TableProvider>>> {
        Ok(self.0.describe(&object.name).await?.map(|o| {
            Arc::new(PagedTable(read::SalesforceReader::new(
                Arc::clone(&self.0),
                o,
            ))) as Arc<dyn TableProvider>
        }))
    }

    fn connection(&self) -> &str {
        &self.0.name
    }

    fn object_names(&self) -> Vec<String> {
        self.0.object_names().unwrap_or_else(|| {
            api::STANDARD_OBJECTS
                .iter()
                .map(|s| s.to_string())
                .collect()
        })
    }

    fn rate_limit(&self) -> Option<f64> {
        self.0.config.http.rate_limit
    }

    fn concurrency(&self) -> Option<usize> {
        Some(self.0.config.http.concurrency)
    }

    fn known_fields(&self, name: &str) -> Option<SchemaRef> {
        self.0.cached(name).map(|o| Arc::clone(&o.fields))
    }

    async fn object(&self, name: &str) -> Result<Option<ObjectSpec>> {
        Ok(self.0.describe(name).await?.map(|o| ObjectSpec {
            name: o.name.clone(),
            fields: Some(Arc::clone(&o.fields)),
            key: Some(o.key.clone()),
            composite_key: vec![],
            match_keys: o.match_keys(),
        }))
    }

    fn sink(
        &self,
        object: &ObjectSpec,
        schema: SchemaRef,
        report: Arc<WriteReport>,
        sync: Option<Arc<SyncRun>>,
    ) -> Result<Arc<dyn DataSink>> {
        let c = &self.0;
        let described = c.cached(&object.name).ok_or_else(|| {
            Error::plan(
                format!("{}.{} is not known", c.name, object.name),
                object.name.clone(),
            )
        })?;
        let key = match sync.as_ref().and_then(|run| run.spec.diff.key) {
            Some(k) => k,
            None => key_index(&schema, &described.key, &c.name, &object.name)?,
        };
        let key_name = schema.field(key).name().clone();
        let target = format!("{}.{}", c.name, described.name);
        let matches = described.match_keys();
        if !matches.contains(&key_name) {
            return Err(Error::plan(
                format!(
                    "{target} cannot match records by '{key_name}': Salesforce matches by an External ID field or by Id; use one of {} (or mark '{key_name}' External ID in Salesforce Setup)",
                    matches.join(", ")
                ),
                key_name,
            ));
        }
        let (creates, updates) = match &sync {
            Some(run) => (run.spec.diff.mode.inserts(), run.spec.diff.mode.updates()),
            None => (true, true),
        };
        if key_name == "Id" && creates && !updates {
            return Err(Error::plan(
                format!(
                    "{target}: a create-only MERGE cannot match by Id (Salesforce gives new records their Id); match by an External ID field ({})",
                    matches[..matches.len() - 1].join(", ")
                ),
                key_name,
            ));
        }
        for name in crate::connectors::mapped_fields(&schema, sync.is_some()) {
            let Some(info) = described.info.get(&name) else {
                continue;
            };
            let is_key = name == key_name;
            let refusal = if creates && !info.createable && !(is_key && key_name == "Id") {
                Some("creates records, and Salesforce does not let a new record set it")
            } else if updates && !info.updateable && !is_key {
                Some(
                    "updates records (INSERT INTO upserts), and Salesforce does not let it change once set; write it with a create-only MERGE (WHEN NOT MATCHED THEN INSERT)",
                )
            } else {
                None
            };
            if let Some(why) = refusal {
                return Err(Error::plan(
                    format!(
                        "{target}.{name} cannot be written by this statement: it {why}; or remove it from the mapping"
                    ),
                    name,
                ));
            }
        }
        Ok(Arc::new(SalesforceSink::new(
            Arc::clone(c),
            described,
            schema,
            key,
            report,
            sync,
        )))
    }
}
