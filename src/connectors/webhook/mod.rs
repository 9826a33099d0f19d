//! The `webhook` destination: POSTs JSON batches of records to a URL.
//!
//! ```sql
//! CREATE CONNECTION hooks TYPE webhook OPTIONS (url 'https://example.com/hook', key 'id',
//!                                                signing_secret env('HOOK_KEY'));
//! INSERT INTO hooks.users SELECT id, email, plan FROM users;
//! ```
//!
//! Any object name is valid and is sent in each body:
//! `{"object":"users","sync":null,"run_id":"…","operation":"upsert","batch":1,"records":[…]}`.
//! Each request carries an `Idempotency-Key` that stays the same across retries of that request,
//! and, with `signing_secret`, `X-Sluice-Signature: t=<unix secs>,v1=<hex HMAC-SHA256 of "t.body">`.
//! How responses are read: see [`retry`].

mod api;
mod config;
pub mod retry;
mod sink;

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::datasource::sink::DataSink;

pub use api::{IDEMPOTENCY_HEADER, SIGNATURE_HEADER, WebhookConnection, signature};
pub use config::{OPTIONS, WebhookConfig};
pub use sink::WebhookSink;

use crate::connections::{ConnectContext, Connected, ConnectorKind, Role};
use crate::connectors::{Destination, DestinationSchema, ObjectSpec, WriteReport, key_index};
use crate::delivery::AdaptiveLimiter;
use crate::error::Result;
use crate::options::{OptionSpec, Options};
use crate::sync::SyncRun;

/// `TYPE webhook`.
pub struct WebhookConnector;

impl ConnectorKind for WebhookConnector {
    fn kind(&self) -> &'static str {
        "webhook"
    }

    fn summary(&self) -> &'static str {
        "any HTTP endpoint: records in batches of JSON, signed, rate-limited and retried, with per-record rejects"
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
        let config = WebhookConfig::from_options(options)?;
        let client = config.http.client("url", config.redirects)?;
        let destination = WebhookDestination(Arc::new(WebhookConnection {
            name: name.to_string(),
            limiter: Arc::new(AdaptiveLimiter::new(config.http.rate_limit).for_connection(name)),
            config: Arc::new(config),
            client,
        }));
        Ok(Connected::schema(Arc::new(DestinationSchema::new(
            Arc::new(destination),
        ))))
    }
}

/// One webhook connection. Its client and rate limiter are shared by every statement using it.
#[derive(Debug)]
pub struct WebhookDestination(Arc<WebhookConnection>);

#[async_trait]
impl Destination for WebhookDestination {
    fn connection(&self) -> &str {
        &self.0.name
    }

    fn object_names(&self) -> Vec<String> {
        vec![]
    }

    fn rate_limit(&self) -> Option<f64> {
        self.0.config.http.rate_limit
    }

    fn concurrency(&self) -> Option<usize> {
        Some(self.0.config.http.concurrency)
    }

    fn notifier(&self) -> Option<Arc<dyn crate::connectors::Notifier>> {
        Some(Arc::new(WebhookNotifier(Arc::clone(&self.0))))
    }

    async fn object(&self, name: &str) -> Result<Option<ObjectSpec>> {
        // Any object name is valid: it travels in the body.
        Ok(Some(ObjectSpec {
            name: name.to_string(),
            fields: None,
            key: self.0.config.key.clone(),
            composite_key: vec![],
            match_keys: vec![],
        }))
    }

    fn sink(
        &self,
        object: &ObjectSpec,
        schema: SchemaRef,
        report: Arc<WriteReport>,
        sync: Option<Arc<SyncRun>>,
    ) -> Result<Arc<dyn DataSink>> {
        let key = match &sync {
            Some(run) => run.spec.diff.key,
            None => match &self.0.config.key {
                None => None,
                Some(key) => Some(key_index(&schema, key, &self.0.name, &object.name)?),
            },
        };
        Ok(Arc::new(WebhookSink::new(
            Arc::clone(&self.0),
            &object.name,
            schema,
            key,
            report,
            sync,
        )))
    }
}

/// Alert notices to a webhook: `POST` (or the configured method) of
/// `{"alert", "sync", "event", "text", "details"}`, with the connection's headers and signature.
#[derive(Debug)]
struct WebhookNotifier(Arc<WebhookConnection>);

#[async_trait]
impl crate::connectors::Notifier for WebhookNotifier {
    async fn notify(&self, notice: &crate::connectors::Notice) -> Result<()> {
        let connection = &self.0;
        let config = &connection.config;
        let body = serde_json::to_vec(notice).expect("serializing to memory");
        let key = uuid::Uuid::new_v4().simple().to_string();
        crate::connectors::notice::send(
            &format!("webhook {} ({})", connection.name, config.shown_url),
            config.http.timeout,
            || api::notice_request(&connection.client, config, &key, body.clone()),
            crate::connectors::notice::by_status,
        )
        .await
    }
}
