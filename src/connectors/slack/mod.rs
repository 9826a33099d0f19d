//! The `slack` connection: alert notices, and a destination that posts one message per new row.
//!
//! ```sql
//! CREATE CONNECTION ops TYPE slack OPTIONS (webhook_url env('SLACK_WEBHOOK_URL'));
//! -- or: OPTIONS (token env('SLACK_BOT_TOKEN'), channel 'C0123456')
//! INSERT INTO ops.messages SELECT 'Account ' || name || ' turned at-risk' AS text FROM at_risk;
//! CREATE ALERT failing ON SYNC '*' WHEN status = 'failed' NOTIFY ops;
//! ```
//!
//! The one object, `messages`, has the fields `text`, `channel` (with a bot token: where the
//! row goes, else the `channel` option) and `blocks` (Block Kit JSON). Writes append: in a sync,
//! a row is posted once, when it first appears in the model. One message per request, at most
//! one per second per connection (Slack allows about one per second per channel).

mod api;
mod config;
mod sink;

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::datasource::sink::DataSink;

pub use config::{OPTIONS, SlackConfig};

use crate::connections::{ConnectContext, Connected, ConnectorKind, Role};
use crate::connectors::{Destination, DestinationSchema, Notifier, ObjectSpec, WriteReport};
use crate::delivery::AdaptiveLimiter;
use crate::delivery::settings::Redirects;
use crate::error::{Error, Result};
use crate::options::{OptionSpec, Options};
use crate::sync::SyncRun;

/// The object messages are written to.
pub const MESSAGES: &str = "messages";

/// `TYPE slack`.
pub struct SlackConnector;

impl ConnectorKind for SlackConnector {
    fn kind(&self) -> &'static str {
        "slack"
    }

    fn summary(&self) -> &'static str {
        "Slack: alert notices, and one message per new row (incoming webhook or bot token)"
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
        let config = SlackConfig::from_options(options)?;
        let client = config.http.client("webhook_url", Redirects::None)?;
        let connection = Arc::new(api::SlackConnection {
            name: name.to_string(),
            limiter: Arc::new(AdaptiveLimiter::new(config.http.rate_limit).for_connection(name)),
            config,
            client,
        });
        Ok(Connected::schema(Arc::new(DestinationSchema::new(
            Arc::new(SlackDestination(connection)),
        ))))
    }
}

/// One slack connection.
#[derive(Debug)]
pub struct SlackDestination(Arc<api::SlackConnection>);

fn messages_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("text", DataType::Utf8, true),
        Field::new("channel", DataType::Utf8, true),
        Field::new("blocks", DataType::Utf8, true),
    ]))
}

#[async_trait]
impl Destination for SlackDestination {
    fn connection(&self) -> &str {
        &self.0.name
    }

    fn object_names(&self) -> Vec<String> {
        vec![MESSAGES.to_string()]
    }

    fn rate_limit(&self) -> Option<f64> {
        self.0.config.http.rate_limit
    }

    fn concurrency(&self) -> Option<usize> {
        Some(1)
    }

    async fn object(&self, name: &str) -> Result<Option<ObjectSpec>> {
        Ok((name == MESSAGES).then(|| ObjectSpec {
            name: name.to_string(),
            fields: Some(messages_schema()),
            key: None,
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
        if schema.index_of("text").is_err() {
            return Err(Error::plan(
                format!(
                    "{}.{}: a message needs a text column (… AS text)",
                    self.0.name, object.name
                ),
                "text",
            ));
        }
        Ok(Arc::new(sink::SlackSink::new(
            Arc::clone(&self.0),
            &object.name,
            schema,
            report,
            sync,
        )))
    }

    fn notifier(&self) -> Option<Arc<dyn Notifier>> {
        Some(Arc::new(api::SlackNotifier(Arc::clone(&self.0))))
    }
}
