//! `HubspotSink`: delivers one statement's changes to a CRM object through the shared delivery
//! engine: `batch/upsert` (INSERT), `batch/update` (update-only MERGE), `batch/create`
//! (create-only MERGE) and `batch/archive` (mirror deletes and DELETE), 100 inputs per call,
//! every input with an `objectWriteTraceId` so one bad record does not fail its batch.

use std::collections::HashMap;
use std::fmt;
use std::io::Write;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use datafusion::arrow::array::Array;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::datasource::sink::DataSink;
use datafusion::error::Result;
use datafusion::execution::TaskContext;
use datafusion::physical_plan::metrics::{ExecutionPlanMetricsSet, MetricsSet};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, SendableRecordBatchStream};
use futures::StreamExt;
use http::HeaderMap;

use super::api::{HubspotConnection, ObjectSchema};
use super::config::normalize;
use super::encode::Encoder;
use super::retry::{self, HubspotRetryLogic};
use crate::connectors::WriteReport;
use crate::contract::{Ack, ChangeBatch, Op};
use crate::delivery::encode::json_str;
use crate::delivery::retry::RateWindow;
use crate::delivery::{
    Batch, Batcher, DeliveryMetrics, Driver, HttpResponse, HttpService, ResponseClass, Session,
};
use crate::sync::SyncRun;

/// How records are matched: by a property (`idProperty`), or by HubSpot's record id.
#[derive(Debug, Clone)]
pub enum Matching {
    Property(String),
    RecordId,
}

impl Matching {
    pub fn new(key: &str) -> Self {
        if key == "hs_object_id" {
            Matching::RecordId
        } else {
            Matching::Property(key.to_string())
        }
    }

    pub fn key(&self) -> &str {
        match self {
            Matching::Property(p) => p,
            Matching::RecordId => "hs_object_id",
        }
    }
}

/// What the driver calls for HubSpot: request building and response reading.
pub(super) struct HubspotService {
    pub connection: Arc<HubspotConnection>,
    pub object: String,
    pub matching: Matching,
}

impl HubspotService {
    /// Batch calls on `object`: a driver over the connection's client, limiter and retry
    /// policy, and a batcher that never puts two records HubSpot sees as one in a call.
    /// The driver and batcher of `session`'s writes to `object`.
    pub(super) fn delivery(
        connection: &Arc<HubspotConnection>,
        object: &str,
        matching: Matching,
        session: &Session,
    ) -> (Driver<Self>, Batcher) {
        let normalize_key: fn(&str) -> String = match &matching {
            Matching::Property(p) if p == "email" => |k| normalize("email", k),
            _ => |k| k.to_string(),
        };
        let config = &connection.config;
        let batcher = session
            .batcher(config.http.batch_size, usize::MAX)
            .with_unique_keys(normalize_key);
        let service = Arc::new(HubspotService {
            connection: Arc::clone(connection),
            object: object.to_string(),
            matching,
        });
        let driver = session.driver(
            service,
            connection.client.clone(),
            Arc::clone(&connection.limiter),
            config.http.retry,
        );
        (driver, batcher)
    }

    fn path(&self, op: Op) -> String {
        let action = match (op, &self.matching) {
            (Op::Upsert, Matching::Property(_)) => "upsert",
            // Records matched by their HubSpot id exist already: an upsert is an update.
            (Op::Upsert | Op::Update, _) => "update",
            (Op::Insert, _) => "create",
            (Op::Delete, _) => "archive",
        };
        format!("/crm/v3/objects/{}/batch/{action}", self.object)
    }

    /// `{"inputs":[…]}` with each record in the shape its operation takes.
    fn body(&self, batch: &Batch) -> Vec<u8> {
        let mut body = Vec::with_capacity(batch.bytes + batch.records.len() * 96 + 16);
        body.extend_from_slice(b"{\"inputs\":[");
        for (i, record) in batch.records.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            if batch.op == Op::Delete {
                body.extend_from_slice(&record.json);
                continue;
            }
            body.push(b'{');
            if batch.op != Op::Insert {
                body.extend_from_slice(b"\"id\":");
                json_str(&mut body, record.key.as_deref().unwrap_or(""));
                if let Matching::Property(p) = &self.matching {
                    body.extend_from_slice(b",\"idProperty\":");
                    json_str(&mut body, p);
                }
                body.push(b',');
            }
            let _ = write!(body, "\"objectWriteTraceId\":\"{i}\",\"properties\":");
            body.extend_from_slice(&record.json);
            body.push(b'}');
        }
        body.extend_from_slice(b"]}");
        body
    }
}

#[async_trait]
impl HttpService for HubspotService {
    fn build_request(
        &self,
        client: &reqwest::Client,
        batch: &Batch,
    ) -> crate::error::Result<reqwest::RequestBuilder> {
        let config = &self.connection.config;
        Ok(client
            .post(config.endpoint(&self.path(batch.op)))
            .bearer_auth(config.token.expose())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(self.body(batch)))
    }

    fn classify(&self, batch: &Batch, response: &HttpResponse) -> ResponseClass {
        let key = (batch.op != Op::Delete).then(|| self.matching.key());
        HubspotRetryLogic::classify(batch, response, key)
    }

    fn rate_window(&self, headers: &HeaderMap) -> Option<RateWindow> {
        retry::rate_window(headers)
    }

    fn error_code(&self, response: &HttpResponse) -> Option<String> {
        super::retry::error_code(response)
    }

    fn describe(&self) -> String {
        format!("hubspot {} ({})", self.connection.name, self.object)
    }
}

/// Sends the changes of one statement on `crm.<object>`.
#[derive(Debug)]
pub struct HubspotSink {
    connection: Arc<HubspotConnection>,
    object: Arc<ObjectSchema>,
    schema: SchemaRef,
    key: usize,
    matching: Matching,
    report: Arc<WriteReport>,
    sync: Option<Arc<SyncRun>>,
    metrics: ExecutionPlanMetricsSet,
}

impl HubspotSink {
    pub fn new(
        connection: Arc<HubspotConnection>,
        object: Arc<ObjectSchema>,
        schema: SchemaRef,
        key: usize,
        report: Arc<WriteReport>,
        sync: Option<Arc<SyncRun>>,
    ) -> Self {
        let matching = Matching::new(schema.field(key).name());
        Self {
            connection,
            object,
            schema,
            key,
            matching,
            report,
            sync,
            metrics: ExecutionPlanMetricsSet::new(),
        }
    }

    /// The mapped fields (a sync's rows carry its change columns after them).
    fn mapped_fields(&self) -> Vec<String> {
        crate::connectors::mapped_fields(&self.schema, self.sync.is_some())
    }
}

/// Finds the record ids of deletes before their rows are encoded.
#[derive(Debug, Clone)]
struct Resolver {
    connection: Arc<HubspotConnection>,
    object: String,
    key: usize,
    matching: Matching,
    sync: Option<Arc<SyncRun>>,
    /// Change id → record id (`None`: HubSpot has no such record).
    resolved: Arc<Mutex<HashMap<u32, Option<String>>>>,
    /// The write's session metrics (lookups count among its requests).
    metrics: Arc<DeliveryMetrics>,
}

impl Resolver {
    /// The record ids of this batch's deletes: from the sync's state, else looked up with
    /// `batch/read` by the key property. Not in HubSpot: `None` (nothing to archive).
    async fn resolve(&self, batch: &RecordBatch) -> crate::error::Result<()> {
        let Some(run) = &self.sync else {
            return Ok(());
        };
        let changes = ChangeBatch::of(batch)?;
        let deletes: Vec<(usize, u32)> = changes
            .rows_of(Op::Delete)
            .filter_map(|r| Some((r, changes.change(r)?)))
            .collect();
        if deletes.is_empty() {
            return Ok(());
        }
        let keys = crate::delivery::encode::text_values(
            batch.column(self.key),
            crate::delivery::encode::DateStyle::EpochMillis,
        )?;
        let known = run.record_ids(&deletes.iter().map(|(_, c)| *c).collect::<Vec<_>>());
        let mut ask: Vec<(u32, String)> = vec![];
        let mut found: HashMap<u32, Option<String>> = HashMap::new();
        for ((row, change), id) in deletes.iter().zip(known) {
            let key = keys.is_valid(*row).then(|| keys.value(*row).to_string());
            match (id, key, &self.matching) {
                (Some(id), _, _) => {
                    found.insert(*change, Some(id));
                }
                (None, Some(key), Matching::RecordId) => {
                    found.insert(*change, Some(key));
                }
                (None, Some(key), Matching::Property(_)) => ask.push((*change, key)),
                (None, None, _) => {
                    found.insert(*change, None);
                }
            }
        }
        if !ask.is_empty() && !run.dry_run {
            let property = self.matching.key();
            let values: Vec<String> = ask.iter().map(|(_, k)| k.clone()).collect();
            let ids = self
                .connection
                .read_ids(&self.object, property, &values, Some(&self.metrics))
                .await?;
            for (change, key) in ask {
                found.insert(change, ids.get(&normalize(property, &key)).cloned());
            }
        }
        self.resolved.lock().expect("resolved lock").extend(found);
        Ok(())
    }
}

impl DisplayAs for HubspotSink {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.connection.config;
        write!(
            f,
            "HubspotSink: connection={} object={} key={} ({}){} tier={} batch_size={} concurrency={} rate_limit={:.1}/s fields=[{}]",
            self.connection.name,
            self.object.name,
            self.matching.key(),
            match self.matching {
                Matching::Property(_) => "idProperty",
                Matching::RecordId => "record id",
            },
            if self.sync.as_ref().is_some_and(|s| s.dry_run) {
                " dry_run=true"
            } else {
                ""
            },
            c.tier.name,
            c.http.batch_size,
            c.http.concurrency,
            c.http.rate_limit.unwrap_or(0.0),
            self.mapped_fields().join(", "),
        )
    }
}

#[async_trait]
impl DataSink for HubspotSink {
    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }

    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    async fn write_all(
        &self,
        data: SendableRecordBatchStream,
        _context: &Arc<TaskContext>,
    ) -> Result<u64> {
        let connection = &self.connection;
        let config = &connection.config;
        let mut session = WriteReport::open_session(
            &format!("{}.{}", connection.name, self.object.name),
            self.sync.as_ref(),
        );
        let (driver, batcher) = HubspotService::delivery(
            connection,
            &self.object.name,
            self.matching.clone(),
            &session,
        );
        let encoder = Encoder::new(
            &self.object,
            self.mapped_fields(),
            self.key,
            matches!(self.matching, Matching::Property(_)),
            self.sync.as_deref(),
        );
        // Deletes need record ids: looked up (asynchronously) before their rows are encoded.
        let resolver = Resolver {
            connection: Arc::clone(connection),
            object: self.object.name.clone(),
            key: self.key,
            matching: self.matching.clone(),
            sync: self.sync.clone(),
            resolved: Arc::default(),
            metrics: Arc::clone(session.metrics()),
        };
        let resolved = Arc::clone(&resolver.resolved);
        let schema = data.schema();
        let resolving = data.then(move |batch| {
            let resolver = resolver.clone();
            async move {
                let batch = batch?;
                resolver.resolve(&batch).await?;
                Ok(batch)
            }
        });
        let input = Box::pin(RecordBatchStreamAdapter::new(schema, resolving));
        let report = Arc::clone(&self.report);
        let encode = |b: &RecordBatch| {
            let ids = resolved.lock().expect("resolved lock");
            let out = encoder.encode(b, &|change| ids.get(&change).cloned())?;
            report.add_rejects(out.rejects);
            report.ack(out.gone.into_iter().map(Ack::done).collect());
            Ok(out.records)
        };
        let delivered = session
            .deliver(&driver, input, encode, batcher, config.http.concurrency)
            .await;
        let location = format!(
            "{}/crm/v3/objects/{}",
            config.shown_base_url, self.object.name
        );
        Ok(self
            .report
            .close(session, &self.metrics, location, delivered)?)
    }
}
