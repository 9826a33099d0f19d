//! Bulk API 2.0 ingest jobs (§1.5 of the API notes): create the job, upload one CSV, close it,
//! poll with backoff until it ends, then read its results and settle every record **by its
//! key** (Salesforce does not keep the upload's order). Rows that failed transiently
//! (`UNABLE_TO_LOCK_ROW`) go again in a new job, rebuilt from the failed results themselves;
//! permanent failures are rejects with Salesforce's code, message and fields. Rows a failed or
//! aborted job never processed get no answer: the sync sends them again next run.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use http::Method;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::api::{SalesforceConnection, poll_wait};
use super::config::MAX_JOB_BYTES;
use super::retry::{MESSAGE_EXCERPT, TRANSIENT, bulk_error};
use crate::contract::{Ack, Op, Rejected};
use crate::delivery::control::expect_success;
use crate::delivery::retry::excerpt;
use crate::delivery::{DeliveryMetrics, DeliveryOutcome};
use crate::error::{Error, Result};

/// Correlation value → (the change a record carries, the record's key).
type Index = HashMap<String, (Option<u32>, Option<String>)>;

/// One job's CSV as it is built.
#[derive(Debug)]
pub struct Job {
    pub op: Op,
    pub header: Vec<String>,
    csv: csv::Writer<Vec<u8>>,
    /// The header's column results are matched by.
    correlation: usize,
    /// Correlation value → (the change it carries, the record's key).
    index: Index,
    /// Correlation values as Salesforce compares them (case-insensitively).
    seen: HashSet<String>,
    pub rows: usize,
    /// The first few lines, for dry runs.
    pub samples: Vec<String>,
}

impl Job {
    pub fn new(op: Op, header: Vec<String>, correlation: &str) -> Self {
        let mut csv = csv::WriterBuilder::new()
            .terminator(csv::Terminator::Any(b'\n'))
            .from_writer(Vec::with_capacity(1 << 16));
        csv.write_record(&header).expect("writing CSV into memory");
        let correlation = header
            .iter()
            .position(|h| h == correlation)
            .expect("the correlation column is in the header");
        Self {
            op,
            header,
            csv,
            correlation,
            index: HashMap::new(),
            seen: HashSet::new(),
            rows: 0,
            samples: vec![],
        }
    }

    /// Whether a record matched by `value` may join this job (Salesforce fails both rows of a
    /// key that appears twice in one job).
    pub fn admits(&self, value: &str) -> bool {
        !self.seen.contains(&value.to_lowercase())
    }

    /// Adds a record's cells.
    pub fn push(&mut self, cells: &[&str], change: Option<u32>, key: Option<String>) -> Result<()> {
        let value = cells[self.correlation].to_string();
        self.seen.insert(value.to_lowercase());
        self.index.insert(value, (change, key));
        self.csv.write_record(cells).map_err(|e| Error::Write {
            message: format!("writing a Bulk CSV row: {e}"),
        })?;
        if self.samples.len() < 3 {
            self.samples.push(cells.join(","));
        }
        self.rows += 1;
        Ok(())
    }

    pub fn bytes(&self) -> usize {
        self.csv.get_ref().len()
    }

    /// Whether the job is as large as one upload may be.
    pub fn full(&self) -> bool {
        self.bytes() >= MAX_JOB_BYTES - 64 * 1024
    }

    /// The CSV, and what its results are read against.
    fn into_parts(self) -> (Vec<u8>, Sent) {
        let csv = self.csv.into_inner().unwrap_or_default();
        let sent = Sent {
            op: self.op,
            header: self.header,
            correlation: self.correlation,
            index: self.index,
        };
        (csv, sent)
    }
}

/// What a job's results are read against (the same for the jobs that retry its rows).
struct Sent {
    op: Op,
    header: Vec<String>,
    correlation: usize,
    index: Index,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct JobInfo {
    id: String,
    #[serde(default)]
    state: String,
    #[serde(default)]
    content_url: Option<String>,
    #[serde(default)]
    number_records_processed: Option<u64>,
    #[serde(default)]
    number_records_failed: Option<u64>,
    #[serde(default)]
    error_message: Option<String>,
}

/// Runs Bulk jobs for one statement.
#[derive(Clone)]
pub struct BulkRunner {
    pub connection: Arc<SalesforceConnection>,
    /// The object's API name.
    pub object: String,
    /// The External ID field upserts match by.
    pub external_id: Option<String>,
    pub metrics: Arc<DeliveryMetrics>,
}

impl BulkRunner {
    /// Runs `job` (and the jobs that retry its transient failures) to the end.
    pub async fn run(self, job: Job) -> (DeliveryOutcome, Option<Error>) {
        let mut outcome = DeliveryOutcome::default();
        let attempts = self.connection.config.http.retry.max_attempts.max(1);
        let (mut csv, sent) = job.into_parts();
        for attempt in 1..=attempts {
            let last = attempt == attempts;
            match self.once(&sent, csv, attempt, last, &mut outcome).await {
                Ok(None) => return (outcome, None),
                Ok(Some(again)) => {
                    csv = again;
                    DeliveryMetrics::add(&self.metrics.retries, 1);
                    tokio::time::sleep(self.connection.config.http.retry.backoff(attempt)).await;
                }
                Err(e) => return (outcome, Some(e)),
            }
        }
        (outcome, None)
    }

    /// One job: returns the CSV of rows to try again, if some failed transiently.
    async fn once(
        &self,
        sent: &Sent,
        csv: Vec<u8>,
        attempt: u32,
        last: bool,
        outcome: &mut DeliveryOutcome,
    ) -> Result<Option<Vec<u8>>> {
        let (job, job_path, upload) = self.create(sent.op).await?;
        if let Err(e) = self.upload(&job, &job_path, &upload, csv).await {
            // Best effort: a job left open holds nothing the org would process.
            self.abort(&job_path).await;
            return Err(e);
        }
        tracing::debug!(job = %job.id, attempt, "Bulk job uploaded; polling.");
        let done = self.poll(&job, &job_path).await?;
        let settled = self
            .settle_successes(sent, &job_path, &job, outcome)
            .await?;
        let failed = done.number_records_failed.unwrap_or(0);
        let again = if failed > 0 || settled < sent.index.len() as u64 {
            self.settle_failures(sent, &job_path, &job, attempt, last, outcome)
                .await?
        } else {
            None
        };
        if done.state != "JobComplete" {
            return Err(self.unfinished(sent, &job_path, done).await);
        }
        Ok(again)
    }

    fn metrics(&self) -> Option<&DeliveryMetrics> {
        Some(self.metrics.as_ref())
    }

    /// Creates the job of `op`: its info, its path and where its CSV goes.
    async fn create(&self, op: Op) -> Result<(JobInfo, String, String)> {
        let c = &self.connection;
        let base = format!("{}/jobs/ingest", c.config.data_path());
        let mut spec = json!({
            "object": self.object,
            "operation": op.as_str(),
            "contentType": "CSV",
            "lineEnding": "LF",
            "columnDelimiter": "COMMA",
        });
        if op == Op::Upsert {
            spec["externalIdFieldName"] = json!(self.external_id);
        }
        let body = Some(("application/json", Bytes::from(spec.to_string())));
        let created = c.call(Method::POST, &base, body, self.metrics()).await?;
        expect_success(
            c.as_ref(),
            &created,
            &format!("creating a Bulk {} job on {}", op.as_str(), self.object),
        )?;
        let job: JobInfo = parse(&created.body, c)?;
        let job_path = format!("{base}/{}", job.id);
        let upload = match &job.content_url {
            Some(u) => format!("/{}", u.trim_start_matches('/')),
            None => format!("{job_path}/batches"),
        };
        Ok((job, job_path, upload))
    }

    /// Uploads the job's CSV and closes it for processing.
    async fn upload(
        &self,
        job: &JobInfo,
        job_path: &str,
        upload: &str,
        csv: Vec<u8>,
    ) -> Result<()> {
        let c = &self.connection;
        let body = Some(("text/csv", Bytes::from(csv)));
        let put = c.call(Method::PUT, upload, body, self.metrics()).await?;
        expect_success(
            c.as_ref(),
            &put,
            &format!("uploading the CSV of Bulk job {}", job.id),
        )?;
        let complete = Bytes::from_static(br#"{"state":"UploadComplete"}"#);
        let body = Some(("application/json", complete));
        let close = c
            .call(Method::PATCH, job_path, body, self.metrics())
            .await?;
        expect_success(c.as_ref(), &close, &format!("closing Bulk job {}", job.id))
    }

    /// Aborts the job (best effort: its answer is not needed).
    async fn abort(&self, job_path: &str) {
        let abort = Bytes::from_static(br#"{"state":"Aborted"}"#);
        let body = Some(("application/json", abort));
        let _ = self
            .connection
            .call(Method::PATCH, job_path, body, self.metrics())
            .await;
    }

    /// Polls the job until it ends; past `bulk_timeout` it is aborted and the run fails (its
    /// records are sent again next run).
    async fn poll(&self, job: &JobInfo, job_path: &str) -> Result<JobInfo> {
        let c = &self.connection;
        let mut polls = 0;
        let polling = tokio::time::Instant::now();
        loop {
            polls += 1;
            if polling.elapsed() >= c.config.bulk_timeout {
                self.abort(job_path).await;
                return Err(c.error(format!(
                    "Bulk job {} did not end within bulk_timeout ({:?}); it was aborted, and its records are sent again next run",
                    job.id, c.config.bulk_timeout
                )));
            }
            tokio::time::sleep(poll_wait(c.config.poll_interval, polls)).await;
            let status = c.call(Method::GET, job_path, None, self.metrics()).await?;
            expect_success(
                c.as_ref(),
                &status,
                &format!("reading the state of Bulk job {}", job.id),
            )?;
            let state: JobInfo = parse(&status.body, c)?;
            if matches!(state.state.as_str(), "JobComplete" | "Failed" | "Aborted") {
                return Ok(state);
            }
        }
    }

    /// Acknowledges the job's successful rows; returns how many of this run's rows they were.
    async fn settle_successes(
        &self,
        sent: &Sent,
        job_path: &str,
        job: &JobInfo,
        outcome: &mut DeliveryOutcome,
    ) -> Result<u64> {
        let c = &self.connection;
        let ok = c
            .call_results(&format!("{job_path}/successfulResults/"), self.metrics())
            .await?;
        expect_success(
            c.as_ref(),
            &ok,
            &format!("reading the results of Bulk job {}", job.id),
        )?;
        let mut settled = 0u64;
        let correlation = sent.header[sent.correlation].as_str();
        for_each_result(&ok.body, correlation, |value, id, _, _| {
            if let Some((change, _)) = sent.index.get(value) {
                settled += 1;
                if let Some(change) = change {
                    outcome
                        .acked
                        .push(Ack::new(*change, id.map(str::to_string)));
                }
            }
        })?;
        outcome.accepted += settled;
        DeliveryMetrics::add(&self.metrics.accepted, settled);
        Ok(settled)
    }

    /// Reads the job's failed rows: transient failures go into the CSV of the next job (unless
    /// this is the `last`), the rest are rejects kept whole.
    async fn settle_failures(
        &self,
        sent: &Sent,
        job_path: &str,
        job: &JobInfo,
        attempt: u32,
        last: bool,
        outcome: &mut DeliveryOutcome,
    ) -> Result<Option<Vec<u8>>> {
        let c = &self.connection;
        let Sent {
            header,
            correlation,
            index,
            ..
        } = sent;
        let bad = c
            .call_results(&format!("{job_path}/failedResults/"), self.metrics())
            .await?;
        expect_success(
            c.as_ref(),
            &bad,
            &format!("reading the failed results of Bulk job {}", job.id),
        )?;
        let mut failures = vec![];
        for_each_result(
            &bad.body,
            header[*correlation].as_str(),
            |value, _, error, row| {
                if index.contains_key(value) {
                    failures.push((value.to_string(), error.unwrap_or("").to_string(), row));
                }
            },
        )?;
        let mut again: Option<csv::Writer<Vec<u8>>> = None;
        for (value, error, row) in failures {
            let (change, key) = index[&value].clone();
            let error = bulk_error(&error);
            if TRANSIENT.contains(&error.code()) && !last {
                let w = again.get_or_insert_with(|| {
                    let mut w = csv::WriterBuilder::new()
                        .terminator(csv::Terminator::Any(b'\n'))
                        .from_writer(vec![]);
                    let _ = w.write_record(header);
                    w
                });
                let cells: Vec<&str> = header
                    .iter()
                    .map(|h| row.get(h).map_or("", String::as_str))
                    .collect();
                let _ = w.write_record(&cells);
                continue;
            }
            let mut why = error.rejection();
            if TRANSIENT.contains(&error.code()) {
                why.message = format!("{} (still failing after {attempt} Bulk jobs)", why.message);
            }
            DeliveryMetrics::add(&self.metrics.rejected, 1);
            let payload: Map<String, Value> = header
                .iter()
                .map(|h| (h.clone(), json!(row.get(h).cloned().unwrap_or_default())))
                .collect();
            outcome.rejected.push(Rejected {
                key,
                code: why.code,
                message: why.message,
                payload: Bytes::from(Value::Object(payload).to_string()),
                attempts: attempt,
                change,
            });
        }
        Ok(again.map(|w| w.into_inner().unwrap_or_default()))
    }

    /// The error of a job that ended without completing: what it processed, and how many of
    /// this run's rows it never attempted.
    async fn unfinished(&self, sent: &Sent, job_path: &str, done: JobInfo) -> Error {
        let c = &self.connection;
        let rows = sent.index.len();
        let processed = done.number_records_processed.unwrap_or(0);
        let never = match c
            .call_results(&format!("{job_path}/unprocessedrecords/"), self.metrics())
            .await
        {
            Ok(unprocessed) if unprocessed.status.is_success() => {
                let mut reader = csv::ReaderBuilder::new().from_reader(&unprocessed.body[..]);
                let n = reader
                    .records()
                    .flatten()
                    .filter(|r| {
                        r.get(sent.correlation)
                            .is_some_and(|v| sent.index.contains_key(v))
                    })
                    .count();
                format!(" ({n} never attempted)")
            }
            Ok(_) => String::new(),
            Err(e) => return e,
        };
        c.error(format!(
            "Bulk job {} ended {} after processing {processed} of {rows} records{never}{}; what it settled is kept, the rest is sent again by the next run",
            done.id,
            done.state,
            done.error_message
                .map(|m| format!(": {}", excerpt(&m, MESSAGE_EXCERPT)))
                .unwrap_or_default()
        ))
    }
}

/// Reads a results CSV: calls `f(correlation value, sf__Id, sf__Error, the row by column)`.
fn for_each_result(
    body: &[u8],
    correlation: &str,
    mut f: impl FnMut(&str, Option<&str>, Option<&str>, HashMap<String, String>),
) -> Result<()> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(body);
    let headers = reader
        .headers()
        .map_err(|e| Error::Write {
            message: format!("a Bulk results CSV sluice cannot read: {e}"),
        })?
        .clone();
    let find = |name: &str| headers.iter().position(|h| h == name);
    let (Some(key), id, error) = (find(correlation), find("sf__Id"), find("sf__Error")) else {
        return Ok(());
    };
    let wants_row = error.is_some();
    for record in reader.records() {
        let record = record.map_err(|e| Error::Write {
            message: format!("a Bulk results CSV sluice cannot read: {e}"),
        })?;
        let row = if wants_row {
            headers
                .iter()
                .zip(record.iter())
                .filter(|(h, _)| !h.starts_with("sf__"))
                .map(|(h, v)| (h.to_string(), v.to_string()))
                .collect()
        } else {
            HashMap::new()
        };
        f(
            record.get(key).unwrap_or(""),
            id.and_then(|i| record.get(i)).filter(|s| !s.is_empty()),
            error.and_then(|i| record.get(i)),
            row,
        );
    }
    Ok(())
}

fn parse(body: &[u8], c: &SalesforceConnection) -> Result<JobInfo> {
    serde_json::from_slice(body)
        .map_err(|e| c.error(format!("a Bulk job answer sluice cannot read ({e})")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_are_read_by_column_name() {
        let body = "\"sf__Id\",\"sf__Error\",\"Ext__c\",\"LastName\"\n\"\",\"REQUIRED_FIELD_MISSING:Required fields are missing: [LastName]:LastName --\",\"C,3\",\"\"\n";
        let mut seen = vec![];
        for_each_result(body.as_bytes(), "Ext__c", |v, id, e, row| {
            seen.push((
                v.to_string(),
                id.map(str::to_string),
                e.map(str::to_string),
                row.get("LastName").cloned(),
            ));
        })
        .unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].0, "C,3");
        assert_eq!(seen[0].1, None);
        assert!(
            seen[0]
                .2
                .as_deref()
                .unwrap()
                .starts_with("REQUIRED_FIELD_MISSING")
        );
        assert_eq!(seen[0].3.as_deref(), Some(""));
    }

    #[test]
    fn a_repeated_key_is_not_admitted() {
        let mut job = Job::new(Op::Upsert, vec!["Ext__c".into(), "Name".into()], "Ext__c");
        job.push(&["A-1", "x,\"y\"\nz"], Some(1), Some("A-1".into()))
            .unwrap();
        assert!(!job.admits("a-1"));
        assert!(job.admits("A-2"));
        let (csv, _) = job.into_parts();
        assert_eq!(
            String::from_utf8(csv).unwrap(),
            "Ext__c,Name\nA-1,\"x,\"\"y\"\"\nz\"\n"
        );
    }
}
