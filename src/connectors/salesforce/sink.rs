//! `SalesforceSink`: delivers one statement's changes to an sObject. Each operation's records
//! go through sObject Collections (200 per call, through the shared delivery engine) or, above
//! `bulk_threshold` changed records of that operation, through Bulk API 2.0 jobs ([`bulk`]).
//! Under `api 'auto'` the first `bulk_threshold` records of an operation wait; the one past it
//! sends them all the Bulk way, and operations that never pass it go through REST at the end.
//!
//! [`bulk`]: super::bulk

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::datasource::sink::DataSink;
use datafusion::error::Result;
use datafusion::execution::TaskContext;
use datafusion::physical_plan::metrics::{ExecutionPlanMetricsSet, MetricsSet};
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, SendableRecordBatchStream};
use futures::StreamExt;
use http::HeaderMap;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::api::{SObject, SalesforceConnection};
use super::bulk::{BulkRunner, Job};
use super::config::Api;
use super::encode::{Encoder, Matching, Row};
use super::retry::SalesforceRetryLogic;
use crate::connectors::WriteReport;
use crate::contract::{Ack, Op, Rejected};
use crate::delivery::retry::RateWindow;
use crate::delivery::{
    Batch, Delivered, DeliveryOutcome, DryRunOp, HttpResponse, HttpService, Record, ResponseClass,
};
use crate::error::Error;
use crate::sync::SyncRun;

/// Calls one Bulk job makes at least: create, upload, close, one poll, successful results.
const BULK_CALLS_PER_JOB: u64 = 5;

/// sObject Collections calls for the delivery engine.
pub(super) struct SalesforceService {
    pub connection: Arc<SalesforceConnection>,
    pub object: String,
    pub matching: Matching,
    /// The session each batch was last sent with (by idempotency key), so a 401 renews only
    /// the session that expired.
    pub sent_with: Mutex<HashMap<String, u64>>,
}

impl SalesforceService {
    fn body(batch: &Batch) -> Vec<u8> {
        let mut body = Vec::with_capacity(batch.bytes + 40);
        body.extend_from_slice(b"{\"allOrNone\":false,\"records\":");
        batch.write_json_array(&mut body);
        body.push(b'}');
        body
    }
}

#[async_trait]
impl HttpService for SalesforceService {
    fn build_request(
        &self,
        client: &reqwest::Client,
        batch: &Batch,
    ) -> crate::error::Result<reqwest::RequestBuilder> {
        let c = &self.connection;
        c.check_quota()?;
        let session = c.current_session()?;
        self.sent_with
            .lock()
            .expect("sessions lock")
            .insert(batch.idempotency_key(), session.generation);
        let collections = format!("{}/composite/sobjects", c.config.data_path());
        let json = |request: reqwest::RequestBuilder| {
            request
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Self::body(batch))
        };
        let request = match batch.op {
            Op::Delete => {
                let ids: Vec<String> = batch
                    .records
                    .iter()
                    .filter_map(|r| {
                        serde_json::from_slice::<Value>(&r.json)
                            .ok()?
                            .get("Id")?
                            .as_str()
                            .map(str::to_string)
                    })
                    .collect();
                // Each id escaped: a value from the model may hold '&', '#' or '?'.
                let ids: Vec<String> = ids
                    .iter()
                    .map(|id| url::form_urlencoded::byte_serialize(id.as_bytes()).collect())
                    .collect();
                client.delete(c.url(
                    &session,
                    &format!("{collections}?ids={}&allOrNone=false", ids.join(",")),
                ))
            }
            Op::Insert => json(client.post(c.url(&session, &collections))),
            Op::Update => json(client.patch(c.url(&session, &collections))),
            Op::Upsert => json(client.patch(c.url(
                &session,
                &format!("{collections}/{}/{}", self.object, self.matching.field()),
            ))),
        };
        Ok(request.bearer_auth(session.token.expose()))
    }

    fn classify(&self, batch: &Batch, response: &HttpResponse) -> ResponseClass {
        SalesforceRetryLogic::classify(batch, response)
    }

    async fn refresh_credentials(&self, batch: &Batch) -> crate::error::Result<bool> {
        let generation = self
            .sent_with
            .lock()
            .expect("sessions lock")
            .get(&batch.idempotency_key())
            .copied()
            .unwrap_or(0);
        self.connection.refresh(generation).await?;
        Ok(true)
    }

    /// Salesforce has no rate headers; its quota header is recorded for the quota check.
    fn rate_window(&self, headers: &HeaderMap) -> Option<RateWindow> {
        self.connection.observe(headers);
        None
    }

    fn error_code(&self, response: &HttpResponse) -> Option<String> {
        super::retry::error_code(response)
    }

    fn describe(&self) -> String {
        format!("salesforce {} ({})", self.connection.name, self.object)
    }
}

/// Sends the changes of one statement on `sf.<object>`.
#[derive(Debug)]
pub struct SalesforceSink {
    connection: Arc<SalesforceConnection>,
    object: Arc<SObject>,
    schema: SchemaRef,
    key: usize,
    report: Arc<WriteReport>,
    sync: Option<Arc<SyncRun>>,
    metrics: ExecutionPlanMetricsSet,
}

impl SalesforceSink {
    pub fn new(
        connection: Arc<SalesforceConnection>,
        object: Arc<SObject>,
        schema: SchemaRef,
        key: usize,
        report: Arc<WriteReport>,
        sync: Option<Arc<SyncRun>>,
    ) -> Self {
        Self {
            connection,
            object,
            schema,
            key,
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

impl DisplayAs for SalesforceSink {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.connection.config;
        let fields = self.mapped_fields();
        write!(
            f,
            "SalesforceSink: connection={} object={} key={} ({}){} api={} bulk_threshold={} batch_size={} concurrency={} max_api_usage_pct={} fields=[{}]",
            self.connection.name,
            self.object.name,
            fields[self.key],
            if fields[self.key] == "Id" {
                "record Id"
            } else {
                "external id"
            },
            if self.sync.as_ref().is_some_and(|s| s.dry_run) {
                " dry_run=true"
            } else {
                ""
            },
            match c.api {
                Api::Auto => "auto",
                Api::Rest => "rest",
                Api::Bulk => "bulk",
            },
            c.bulk_threshold,
            c.http.batch_size,
            c.http.concurrency,
            c.max_api_usage_pct,
            fields.join(", "),
        )
    }
}

/// How one operation's records travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Rest,
    Bulk,
    /// `api 'auto'`, below the threshold so far: records wait.
    Undecided,
}

/// Sends each record the way its operation goes, and runs the Bulk jobs.
struct Router<'a> {
    sink: &'a SalesforceSink,
    encoder: Arc<Encoder>,
    dry_run: bool,
    routes: [Route; 4],
    waiting: [Vec<Row>; 4],
    jobs: [Option<Job>; 4],
    rest: Option<mpsc::Sender<crate::error::Result<Vec<Record>>>>,
    runner: BulkRunner,
    running: JoinSet<(DeliveryOutcome, Option<Error>)>,
    outcome: DeliveryOutcome,
    error: Option<Error>,
    /// What the Bulk side would send, in a dry run.
    planned: Vec<DryRunOp>,
}

impl Router<'_> {
    async fn run(
        mut self,
        mut input: SendableRecordBatchStream,
    ) -> (DeliveryOutcome, Vec<DryRunOp>, Option<Error>) {
        while self.error.is_none() {
            let Some(batch) = input.next().await else {
                break;
            };
            let taken = match batch {
                Ok(batch) => self.take(&batch).await,
                Err(e) => Err(e.into()),
            };
            if let Err(e) = taken {
                self.error.get_or_insert(e);
            }
        }
        if self.error.is_none()
            && let Err(e) = self.finish().await
        {
            self.error.get_or_insert(e);
        }
        self.rest = None;
        while let Some(done) = self.running.join_next().await {
            self.settle(done);
        }
        (self.outcome, self.planned, self.error)
    }

    /// Encodes, resolves and routes one batch of changes.
    async fn take(&mut self, batch: &RecordBatch) -> crate::error::Result<()> {
        let encoded = self.encoder.encode(batch)?;
        self.sink.report.add_rejects(encoded.rejects);
        let rows = self.resolve(encoded.rows).await?;
        let mut rest = vec![];
        for row in rows {
            let slot = row.op.code() as usize;
            match self.routes[slot] {
                Route::Rest => rest.push(self.encoder.record(&row)),
                Route::Bulk => self.bulk(row).await?,
                Route::Undecided => {
                    self.waiting[slot].push(row);
                    if self.waiting[slot].len() > self.sink.connection.config.bulk_threshold {
                        self.routes[slot] = Route::Bulk;
                        for row in std::mem::take(&mut self.waiting[slot]) {
                            self.bulk(row).await?;
                        }
                    }
                }
            }
        }
        self.send_rest(rest).await
    }

    async fn send_rest(&mut self, records: Vec<Record>) -> crate::error::Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        if let Some(tx) = &self.rest
            && tx.send(Ok(records)).await.is_err()
        {
            // The REST side stopped on an error of its own, which it reports.
            self.rest = None;
        }
        Ok(())
    }

    /// Operations still under the threshold go through REST; open jobs are sent.
    async fn finish(&mut self) -> crate::error::Result<()> {
        for slot in 0..4 {
            let waiting = std::mem::take(&mut self.waiting[slot]);
            let records = waiting.iter().map(|r| self.encoder.record(r)).collect();
            self.send_rest(records).await?;
        }
        for slot in 0..4 {
            if let Some(job) = self.jobs[slot].take() {
                self.submit(job).await;
            }
        }
        Ok(())
    }

    /// Adds a record to its operation's open job, sending the job first when the record's key
    /// is already in it or it is full.
    async fn bulk(&mut self, row: Row) -> crate::error::Result<()> {
        let slot = row.op.code() as usize;
        let value = self
            .encoder
            .correlation_value(&row)
            .or(row.key.as_deref())
            .unwrap_or("")
            .to_string();
        if let Some(job) = &self.jobs[slot]
            && (!job.admits(&value) || job.full())
        {
            let job = self.jobs[slot].take().expect("checked");
            self.submit(job).await;
        }
        let encoder = &self.encoder;
        let job = self.jobs[slot].get_or_insert_with(|| {
            Job::new(
                row.op,
                encoder.csv_header(row.op),
                encoder.correlation(row.op),
            )
        });
        let mut cells = self.encoder.csv_cells(&row);
        if cells[0].is_empty() && matches!(row.op, Op::Update | Op::Delete) {
            cells[0] = "(looked up at run time)";
        }
        job.push(&cells, row.change, row.key.clone())
    }

    /// Runs a job (at most `concurrency` at once), or in a dry run counts it.
    async fn submit(&mut self, job: Job) {
        if self.dry_run {
            let op = bulk_label(job.op);
            let entry = match self.planned.iter().position(|o| o.op == op) {
                Some(i) => &mut self.planned[i],
                None => {
                    self.planned.push(DryRunOp {
                        op,
                        ..Default::default()
                    });
                    self.planned.last_mut().expect("just pushed")
                }
            };
            entry.records += job.rows as u64;
            entry.requests += BULK_CALLS_PER_JOB;
            entry.bytes += job.bytes() as u64;
            if entry.samples.is_empty() {
                entry.samples.push(job.header.join(","));
                entry.samples.extend(job.samples.iter().cloned());
            }
            return;
        }
        while self.running.len() >= self.sink.connection.config.http.concurrency {
            match self.running.join_next().await {
                Some(done) => self.settle(done),
                None => break,
            }
        }
        self.running.spawn(self.runner.clone().run(job));
    }

    fn settle(
        &mut self,
        done: std::result::Result<(DeliveryOutcome, Option<Error>), tokio::task::JoinError>,
    ) {
        match done {
            Ok((outcome, error)) => {
                self.outcome.accepted += outcome.accepted;
                self.outcome.acked.extend(outcome.acked);
                self.outcome.rejected.extend(outcome.rejected);
                if let Some(e) = error {
                    self.error.get_or_insert(e);
                }
            }
            Err(e) => {
                self.error.get_or_insert(Error::Write {
                    message: format!("a Bulk job task failed: {e}"),
                });
            }
        }
    }

    /// Record Ids for updates and deletes matched by an external id: from the sync's state,
    /// else looked up by SOQL. A delete of a record Salesforce does not have is done; an update
    /// of one is a reject (update-only syncs create nothing).
    async fn resolve(&mut self, rows: Vec<Row>) -> crate::error::Result<Vec<Row>> {
        let needs = |r: &Row| matches!(r.op, Op::Update | Op::Delete) && r.id.is_none();
        if !rows.iter().any(needs) {
            return Ok(rows);
        }
        let mut rows = rows;
        if let Some(run) = &self.sink.sync {
            let changes: Vec<(usize, u32)> = rows
                .iter()
                .enumerate()
                .filter(|(_, r)| needs(r))
                .filter_map(|(i, r)| r.change.map(|c| (i, c)))
                .collect();
            let known = run.record_ids(&changes.iter().map(|(_, c)| *c).collect::<Vec<_>>());
            for ((i, _), id) in changes.into_iter().zip(known) {
                rows[i].id = id;
            }
        }
        let ask: Vec<String> = rows
            .iter()
            .filter(|r| needs(r))
            .filter_map(|r| r.key.clone())
            .collect();
        if ask.is_empty() || self.dry_run {
            return Ok(rows);
        }
        let c = &self.sink.connection;
        let found = c
            .lookup_ids(
                &self.encoder.object,
                self.encoder.matching.field(),
                &ask,
                Some(&self.runner.metrics),
            )
            .await?;
        let mut kept = Vec::with_capacity(rows.len());
        let mut gone = vec![];
        let mut missing = vec![];
        for mut row in rows {
            if needs(&row) {
                row.id = row
                    .key
                    .as_deref()
                    .and_then(|k| found.get(&k.to_lowercase()).cloned());
                if row.id.is_none() {
                    match row.op {
                        Op::Delete => gone.extend(row.change.map(Ack::done)),
                        _ => missing.push(Rejected {
                            key: row.key.clone(),
                            code: "NOT_FOUND".into(),
                            message: format!(
                                "no {} has {} = '{}'; an update-only sync does not create records",
                                self.encoder.object,
                                self.encoder.matching.field(),
                                row.key.as_deref().unwrap_or("")
                            ),
                            payload: self.encoder.json(&row),
                            attempts: 0,
                            change: row.change,
                        }),
                    }
                    continue;
                }
            }
            kept.push(row);
        }
        self.sink.report.ack(gone);
        self.sink.report.add_rejects(missing);
        Ok(kept)
    }
}

fn bulk_label(op: Op) -> &'static str {
    match op {
        Op::Upsert => "upsert (Bulk API 2.0 jobs)",
        Op::Insert => "insert (Bulk API 2.0 jobs)",
        Op::Update => "update (Bulk API 2.0 jobs)",
        Op::Delete => "delete (Bulk API 2.0 jobs)",
    }
}

#[async_trait]
impl DataSink for SalesforceSink {
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
        let c = &self.connection;
        let config = &c.config;
        let session = c.session().await?;
        c.refresh_usage().await?;
        let mut delivery = WriteReport::open_session(
            &format!("{}.{}", c.name, self.object.name),
            self.sync.as_ref(),
        );
        let dry_run = delivery.is_dry_run();
        let metrics = Arc::clone(delivery.metrics());
        let encoder = Arc::new(Encoder::new(
            &self.object,
            self.mapped_fields(),
            self.key,
            self.sync.as_deref(),
        ));
        let driver = delivery.driver(
            Arc::new(SalesforceService {
                connection: Arc::clone(c),
                object: self.object.name.clone(),
                matching: encoder.matching.clone(),
                sent_with: Mutex::default(),
            }),
            c.client.clone(),
            Arc::clone(&c.limiter),
            config.http.retry,
        );
        let batcher = delivery
            .batcher(config.http.batch_size, usize::MAX)
            .with_unique_keys(|k| k.to_lowercase());
        let (tx, rx) = mpsc::channel::<crate::error::Result<Vec<Record>>>(4);
        let records = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|chunk| (chunk, rx))
        });
        let route = match config.api {
            Api::Rest => Route::Rest,
            Api::Bulk => Route::Bulk,
            Api::Auto => Route::Undecided,
        };
        let router = Router {
            sink: self,
            encoder: Arc::clone(&encoder),
            dry_run,
            routes: [route; 4],
            waiting: Default::default(),
            jobs: Default::default(),
            rest: Some(tx),
            runner: BulkRunner {
                connection: Arc::clone(c),
                object: self.object.name.clone(),
                external_id: match &encoder.matching {
                    Matching::External(f) => Some(f.clone()),
                    Matching::Id => None,
                },
                metrics: Arc::clone(&metrics),
            },
            running: JoinSet::new(),
            outcome: DeliveryOutcome::default(),
            error: None,
            planned: vec![],
        };
        let rest = delivery.deliver_records(&driver, records, batcher, config.http.concurrency);
        let (rest, (bulk, planned, bulk_error)) = tokio::join!(rest, router.run(data));
        if let Some(plan) = delivery.dry_run() {
            plan.ops.extend(planned);
            plan.notes.push(quota_note(c, plan.requests()));
        }
        let location = format!(
            "{}{}/sobjects/{}",
            session.instance_url,
            config.data_path(),
            self.object.name
        );
        let mut outcome = rest.outcome;
        outcome.accepted += bulk.accepted;
        outcome.acked.extend(bulk.acked);
        outcome.rejected.extend(bulk.rejected);
        Ok(self.report.close(
            delivery,
            &self.metrics,
            location,
            Delivered {
                outcome,
                error: rest.error.or(bulk_error),
            },
        )?)
    }
}

/// The org's quota as of the last answer, and what a dry run's calls would leave of it.
fn quota_note(c: &SalesforceConnection, calls: u64) -> String {
    let pct = c.config.max_api_usage_pct;
    match c.usage() {
        Some((used, limit)) => {
            let ceiling = (limit as f64 * pct / 100.0).floor() as u64;
            let left = ceiling.saturating_sub(used);
            format!(
                "Salesforce API usage: {used} of {limit} requests in the last 24 hours; this run would spend about {calls} (Bulk jobs add one call per extra poll), and max_api_usage_pct {pct} leaves {left} before sluice stops{}",
                if calls > left {
                    " — NOT ENOUGH: the run would stop part-way"
                } else {
                    ""
                }
            )
        }
        None => format!(
            "Salesforce API usage: not reported yet; this run would spend about {calls} calls"
        ),
    }
}
