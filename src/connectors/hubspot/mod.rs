//! The `hubspot` destination: CRM objects through HubSpot's CRM v3 batch API.
//!
//! ```sql
//! CREATE CONNECTION crm TYPE hubspot OPTIONS (token env('HUBSPOT_TOKEN'), tier 'pro');
//! INSERT INTO crm.contacts SELECT email, churn_risk AS churn_score FROM scores;   -- batch/upsert by email
//! MERGE INTO crm.companies t USING accounts s ON t.account_ref = s.id             -- by a unique property
//!   WHEN MATCHED THEN UPDATE SET name = s.name;                                    -- batch/update
//! ```
//!
//! Objects are `contacts`, `companies`, `deals`, `tickets` and custom objects by their object
//! type id (`crm."2-123456"`). Their fields come from the properties API ([`api`]): a mapping to
//! an unknown or read-only property fails at plan time with the closest name. Records are matched
//! by `email` (contacts), a property with unique values, or `hs_object_id`. Writes go through
//! the shared delivery engine ([`sink`]); answers are read by [`retry`]; values are encoded by
//! [`encode`]. Rate limits: the tier's budget paced by the connection's limiter, HubSpot's
//! `X-HubSpot-RateLimit-*` headers and its 429 policies (`DAILY` stops the sync cleanly).

pub mod api;
mod associations;
mod config;
pub mod encode;
mod lists;
mod read;
pub mod retry;
mod sink;

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::TableProvider;
use datafusion::datasource::sink::DataSink;

pub use api::HubspotConnection;
pub use config::{HubspotConfig, OPTIONS};
pub use sink::HubspotSink;

use crate::connections::{ConnectContext, Connected, ConnectorKind, Role};
use crate::connectors::paged::PagedTable;
use crate::connectors::{Destination, DestinationSchema, ObjectSpec, WriteReport, key_index};
use crate::delivery::settings::Redirects;
use crate::error::{Error, Result};
use crate::options::{OptionSpec, Options};
use crate::sync::SyncRun;

/// `TYPE hubspot`.
pub struct HubspotConnector;

impl ConnectorKind for HubspotConnector {
    fn kind(&self) -> &'static str {
        "hubspot"
    }

    fn summary(&self) -> &'static str {
        "HubSpot CRM objects (contacts, companies, deals, custom objects) and list memberships through the batch APIs"
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
        let config = HubspotConfig::from_options(options)?;
        let client = config.http.client("base_url", Redirects::None)?;
        let destination =
            HubspotDestination(Arc::new(HubspotConnection::new(name, config, client)));
        Ok(Connected::schema(Arc::new(DestinationSchema::new(
            Arc::new(destination),
        ))))
    }
}

/// One HubSpot connection.
#[derive(Debug)]
pub struct HubspotDestination(Arc<HubspotConnection>);

#[async_trait]
impl Destination for HubspotDestination {
    fn unreadable(&self, object: &str) -> String {
        format!(
            "{0}.{object} cannot be read: it is written by syncs only (list members, associations); sluice.runs shows what was sent and sluice.rejects what HubSpot refused",
            self.connection()
        )
    }

    async fn reader(&self, object: &ObjectSpec) -> Result<Option<Arc<dyn TableProvider>>> {
        if object.name == lists::LIST_MEMBERS || associations::parse(&object.name).is_some() {
            return Ok(None);
        }
        Ok(self.0.object_schema(&object.name).await?.map(|o| {
            Arc::new(PagedTable(read::HubspotReader::new(Arc::clone(&self.0), o)))
                as Arc<dyn TableProvider>
        }))
    }

    fn connection(&self) -> &str {
        &self.0.name
    }

    fn object_names(&self) -> Vec<String> {
        let mut names: Vec<String> = api::STANDARD_OBJECTS
            .iter()
            .map(|(n, _)| n.to_string())
            .collect();
        names.push(lists::LIST_MEMBERS.to_string());
        names.extend(associations::NAMES.iter().map(|n| n.to_string()));
        for name in self.0.cached_names() {
            if !names.contains(&name) {
                names.push(name);
            }
        }
        names
    }

    fn rate_limit(&self) -> Option<f64> {
        self.0.config.http.rate_limit
    }

    fn concurrency(&self) -> Option<usize> {
        Some(self.0.config.http.concurrency)
    }

    fn known_fields(&self, name: &str) -> Option<SchemaRef> {
        if name == lists::LIST_MEMBERS {
            return self.0.cached("contacts").map(|c| list_member_fields(&c));
        }
        self.0.cached(name).map(|o| Arc::clone(&o.fields))
    }

    fn composite_keys(&self) -> bool {
        true
    }

    async fn object(&self, name: &str) -> Result<Option<ObjectSpec>> {
        if let Some((from, from_type, to, to_type)) = associations::parse(&name.to_lowercase()) {
            let (Some(a), Some(b)) = (
                self.0.object_schema(from_type).await?,
                self.0.object_schema(to_type).await?,
            ) else {
                return Ok(None);
            };
            let fields = associations::fields((from, &a), (to, &b));
            let keys: Vec<String> = fields.fields()[..2]
                .iter()
                .map(|f| f.name().clone())
                .collect();
            return Ok(Some(ObjectSpec {
                name: name.to_lowercase(),
                fields: Some(fields),
                key: None,
                composite_key: keys,
                match_keys: vec![],
            }));
        }
        if name.eq_ignore_ascii_case(lists::LIST_MEMBERS) {
            let Some(contacts) = self.0.object_schema("contacts").await? else {
                return Ok(None);
            };
            return Ok(Some(ObjectSpec {
                name: lists::LIST_MEMBERS.into(),
                fields: Some(list_member_fields(&contacts)),
                key: None,
                composite_key: vec!["list".into(), "email".into()],
                match_keys: vec![],
            }));
        }
        Ok(self.0.object_schema(name).await?.map(|o| ObjectSpec {
            name: o.name.clone(),
            fields: Some(Arc::clone(&o.fields)),
            key: Some(o.key.clone()),
            composite_key: vec![],
            match_keys: o.id_properties(),
        }))
    }

    fn sink(
        &self,
        object: &ObjectSpec,
        schema: SchemaRef,
        report: Arc<WriteReport>,
        sync: Option<Arc<SyncRun>>,
    ) -> Result<Arc<dyn DataSink>> {
        if object.name == lists::LIST_MEMBERS {
            let (Some(contacts), Some(run)) = (self.0.cached("contacts"), sync) else {
                return Err(Error::plan(
                    format!("{}.{} is written by syncs only", self.0.name, object.name),
                    object.name.clone(),
                ));
            };
            for needed in ["list", "email"] {
                key_index(&schema, needed, &self.0.name, &object.name)?;
            }
            return Ok(Arc::new(lists::ListMembersSink::new(
                Arc::clone(&self.0),
                contacts,
                schema,
                report,
                run,
            )));
        }
        if let Some((_, from_type, _, to_type)) = associations::parse(&object.name) {
            let (Some(from), Some(to), Some(run)) =
                (self.0.cached(from_type), self.0.cached(to_type), sync)
            else {
                return Err(Error::plan(
                    format!(
                        "{}.{} is written by syncs only (INSERT INTO, MERGE or DELETE FROM)",
                        self.0.name, object.name
                    ),
                    object.name.clone(),
                ));
            };
            let side = |i: usize| {
                object
                    .fields
                    .as_ref()
                    .map(|f| f.field(i).name().clone())
                    .unwrap_or_default()
            };
            return Ok(Arc::new(associations::AssociationsSink::new(
                Arc::clone(&self.0),
                object.name.clone(),
                (from, to),
                (side(0), side(1)),
                schema,
                report,
                run,
            )));
        }
        let described = self.0.cached(&object.name).ok_or_else(|| {
            Error::plan(
                format!("{}.{} is not known", self.0.name, object.name),
                object.name.clone(),
            )
        })?;
        let key = match sync.as_ref().and_then(|run| run.spec.diff.key) {
            Some(k) => k,
            None => key_index(&schema, &described.key, &self.0.name, &object.name)?,
        };
        let key_name = schema.field(key).name();
        if !described.is_id_property(key_name) {
            return Err(Error::plan(
                format!(
                    "{}.{} cannot match records by '{key_name}': HubSpot matches by a property with unique values or by the record id; use one of {}",
                    self.0.name,
                    object.name,
                    described.id_properties().join(", ")
                ),
                key_name.clone(),
            ));
        }
        Ok(Arc::new(HubspotSink::new(
            Arc::clone(&self.0),
            described,
            schema,
            key,
            report,
            sync,
        )))
    }
}

/// `list_members`: the list (name or id), then the contact properties.
fn list_member_fields(contacts: &api::ObjectSchema) -> SchemaRef {
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    let mut fields = vec![Arc::new(Field::new("list", DataType::Utf8, true))];
    fields.extend(contacts.fields.fields().iter().cloned());
    Arc::new(Schema::new(fields))
}
