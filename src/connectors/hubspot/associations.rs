//! Associations between records: `crm.contact_company`, `crm.deal_contact`, … (CRM associations
//! v4).
//!
//! ```sql
//! MERGE INTO crm.contact_company AS t
//!   USING (SELECT email, account_ref, 'Billing contact' AS label FROM links) AS s
//!   ON t.contact_email = s.email AND t.company_account_ref = s.account_ref
//! WHEN MATCHED THEN UPDATE SET label = s.label
//! WHEN NOT MATCHED THEN INSERT (contact_email, company_account_ref, label) VALUES (s.email, s.account_ref, s.label)
//! WHEN NOT MATCHED BY SOURCE THEN DELETE;        -- associations that left the model are removed
//! ```
//!
//! The object `<from>_<to>` (singular type names) has one field per side, named after the side
//! and the property its records are matched by (`contact_email`, `company_account_ref`), and
//! `label`. Rows are matched by both sides. Each side's record ids are read at run time with
//! `batch/read`, so records an earlier statement of the same file created are found. A row
//! without a label gets the default association (`batch/associate/default`); a label is looked
//! up among the pair's labels (`GET …/labels`, once per statement) and created with its type
//! (`batch/create`). Removed associations go through `batch/archive` (every association
//! between the two records). A record HubSpot does not have, or an unknown label, is a reject.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use datafusion::arrow::array::Array;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::datasource::sink::DataSink;
use datafusion::error::Result;
use datafusion::execution::TaskContext;
use datafusion::physical_plan::metrics::{ExecutionPlanMetricsSet, MetricsSet};
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, SendableRecordBatchStream};
use futures::TryStreamExt;
use http::Method;
use serde_json::{Value, json};

use super::api::{HubspotConnection, ObjectSchema};
use super::config::{MAX_BATCH_SIZE, normalize};
use super::retry;
use crate::connectors::WriteReport;
use crate::contract::{Ack, ChangeBatch, Op, Rejected};
use crate::delivery::encode::{DateStyle, text_values};
use crate::delivery::{Delivered, DeliveryMetrics, DeliveryOutcome, DryRunOp, Session};
use crate::error::Error;
use crate::sync::SyncRun;

/// Singular type names in association object names, and the object types they stand for.
const TYPES: [(&str, &str); 4] = [
    ("contact", "contacts"),
    ("company", "companies"),
    ("deal", "deals"),
    ("ticket", "tickets"),
];

/// The association objects offered without I/O (completion); any pair of two types works.
pub const NAMES: [&str; 6] = [
    "contact_company",
    "company_contact",
    "deal_contact",
    "deal_company",
    "ticket_contact",
    "ticket_company",
];

/// `contact_company` → (`contact`, `contacts`, `company`, `companies`); `None` for any other name.
pub fn parse(name: &str) -> Option<(&'static str, &'static str, &'static str, &'static str)> {
    let (a, b) = name.split_once('_')?;
    let side = |s: &str| TYPES.iter().find(|(singular, _)| *singular == s).copied();
    let ((fa, ta), (fb, tb)) = (side(a)?, side(b)?);
    (fa != fb).then_some((fa, ta, fb, tb))
}

/// An association object's fields: `<from>_<key>`, `<to>_<key>` and `label`.
pub fn fields(from: (&str, &ObjectSchema), to: (&str, &ObjectSchema)) -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(format!("{}_{}", from.0, from.1.key), DataType::Utf8, true),
        Field::new(format!("{}_{}", to.0, to.1.key), DataType::Utf8, true),
        Field::new("label", DataType::Utf8, true),
    ]))
}

/// One row: what it asks, and its change.
#[derive(Debug, Clone)]
struct Link {
    op: Op,
    change: u32,
    from: String,
    to: String,
    label: Option<String>,
}

/// Writes a sync's association rows.
pub struct AssociationsSink {
    connection: Arc<HubspotConnection>,
    name: String,
    from: Arc<ObjectSchema>,
    to: Arc<ObjectSchema>,
    /// The fields of each side (`contact_email`, `company_account_ref`).
    sides: (String, String),
    schema: SchemaRef,
    report: Arc<WriteReport>,
    run: Arc<SyncRun>,
    metrics: ExecutionPlanMetricsSet,
}

impl fmt::Debug for AssociationsSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "AssociationsSink({}.{})",
            self.connection.name, self.name
        )
    }
}

impl AssociationsSink {
    pub fn new(
        connection: Arc<HubspotConnection>,
        name: String,
        (from, to): (Arc<ObjectSchema>, Arc<ObjectSchema>),
        sides: (String, String),
        schema: SchemaRef,
        report: Arc<WriteReport>,
        run: Arc<SyncRun>,
    ) -> Self {
        Self {
            connection,
            name,
            from,
            to,
            sides,
            schema,
            report,
            run,
            metrics: ExecutionPlanMetricsSet::new(),
        }
    }

    /// `/crm/v4/associations/{from}/{to}` and a suffix.
    fn path(&self, suffix: &str) -> String {
        format!(
            "/crm/v4/associations/{}/{}/{suffix}",
            self.from.name, self.to.name
        )
    }

    /// The rows of the change batches.
    fn links(&self, batches: &[RecordBatch]) -> Result<Vec<Link>> {
        let (from, to) = (
            self.schema.index_of(&self.sides.0)?,
            self.schema.index_of(&self.sides.1)?,
        );
        let label = self.schema.index_of("label").ok();
        let mut out = vec![];
        for batch in batches {
            let changes = ChangeBatch::of(batch)?;
            let froms = text_values(changes.field(from), DateStyle::EpochMillis)?;
            let tos = text_values(changes.field(to), DateStyle::EpochMillis)?;
            let labels = label
                .filter(|l| *l < changes.num_fields())
                .map(|l| text_values(changes.field(l), DateStyle::EpochMillis))
                .transpose()?;
            for r in 0..changes.num_rows() {
                let Some(change) = changes.change(r) else {
                    continue;
                };
                if froms.is_null(r) || tos.is_null(r) {
                    continue;
                }
                out.push(Link {
                    op: changes.op(r),
                    change,
                    from: froms.value(r).to_string(),
                    to: tos.value(r).to_string(),
                    label: labels
                        .as_ref()
                        .filter(|l| l.is_valid(r) && !l.value(r).is_empty())
                        .map(|l| l.value(r).to_string()),
                });
            }
        }
        Ok(out)
    }

    /// Record ids of `values` of `object`'s key (the values themselves for `hs_object_id`).
    async fn ids(
        &self,
        object: &ObjectSchema,
        values: Vec<String>,
        metrics: &DeliveryMetrics,
    ) -> crate::error::Result<HashMap<String, String>> {
        if object.key == "hs_object_id" {
            return Ok(values.into_iter().map(|v| (v.clone(), v)).collect());
        }
        let mut values = values;
        values.sort();
        values.dedup();
        self.connection
            .read_ids(&object.name, &object.key, &values, Some(metrics))
            .await
    }

    /// The pair's labels: label → (category, type id).
    async fn labels(
        &self,
        metrics: &DeliveryMetrics,
    ) -> crate::error::Result<HashMap<String, (String, u64)>> {
        let response = self
            .connection
            .call(Method::GET, &self.path("labels"), None, Some(metrics))
            .await?;
        crate::delivery::control::expect_success(
            self.connection.as_ref(),
            &response,
            &format!("reading the association labels of {}", self.name),
        )?;
        let body: Value = serde_json::from_slice(&response.body).unwrap_or_default();
        Ok(body
            .get("results")
            .and_then(Value::as_array)
            .map(|results| {
                results
                    .iter()
                    .filter_map(|r| {
                        let label = r.get("label")?.as_str()?.to_string();
                        let category = r.get("category")?.as_str()?.to_string();
                        let id = r.get("typeId")?.as_u64()?;
                        Some((label, (category, id)))
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    fn reject(&self, link: &Link, code: &str, message: String) -> Rejected {
        Rejected {
            key: Some(format!("{}, {}", link.from, link.to)),
            code: code.into(),
            message,
            payload: Bytes::from(
                json!({"from": link.from, "to": link.to, "label": link.label}).to_string(),
            ),
            attempts: 1,
            change: Some(link.change),
        }
    }

    /// Sends `calls` (inputs and their rows) to `action`, 100 at a time: a chunk HubSpot
    /// accepts is acknowledged, one it refuses is rejected with its answer.
    async fn send(
        &self,
        action: &str,
        calls: Vec<(Value, &Link)>,
        outcome: &mut DeliveryOutcome,
        metrics: &DeliveryMetrics,
    ) -> crate::error::Result<()> {
        for chunk in calls.chunks(MAX_BATCH_SIZE) {
            let inputs: Vec<Value> = chunk.iter().map(|(input, _)| input.clone()).collect();
            let response = self
                .connection
                .call(
                    Method::POST,
                    &self.path(&format!("batch/{action}")),
                    Some(json!({ "inputs": inputs })),
                    Some(metrics),
                )
                .await?;
            let status = response.status.as_u16();
            if response.status.is_success() && status != 207 {
                outcome.accepted += chunk.len() as u64;
                outcome
                    .acked
                    .extend(chunk.iter().map(|(_, link)| Ack::done(link.change)));
                continue;
            }
            if matches!(status, 401 | 403) {
                return Err(self.connection.error(format!(
                    "{action} of associations {} was refused: {}",
                    self.name,
                    retry::summary(&response)
                )));
            }
            let code = retry::error_code(&response).unwrap_or_else(|| format!("http_{status}"));
            let why = retry::summary(&response);
            outcome.rejected.extend(
                chunk
                    .iter()
                    .map(|(_, link)| self.reject(link, &code, why.clone())),
            );
        }
        Ok(())
    }

    /// Resolves ids and labels, then associates and removes.
    async fn apply(
        &self,
        links: &[Link],
        outcome: &mut DeliveryOutcome,
        metrics: &DeliveryMetrics,
    ) -> crate::error::Result<()> {
        let from_ids = self
            .ids(
                &self.from,
                links.iter().map(|l| l.from.clone()).collect(),
                metrics,
            )
            .await?;
        let to_ids = self
            .ids(
                &self.to,
                links.iter().map(|l| l.to.clone()).collect(),
                metrics,
            )
            .await?;
        let labels = match links
            .iter()
            .any(|l| l.label.is_some() && l.op != Op::Delete)
        {
            true => self.labels(metrics).await?,
            false => HashMap::new(),
        };
        let (mut default, mut labeled, mut removed) = (vec![], vec![], vec![]);
        for link in links {
            let from = from_ids.get(&normalize(&self.from.key, &link.from));
            let to = to_ids.get(&normalize(&self.to.key, &link.to));
            let (Some(from), Some(to)) = (from, to) else {
                let (object, key, value) = match from {
                    None => (&self.from, &self.from.key, &link.from),
                    Some(_) => (&self.to, &self.to.key, &link.to),
                };
                outcome.rejected.push(self.reject(
                    link,
                    "NOT_FOUND",
                    format!(
                        "HubSpot has no {} whose {key} is '{value}'; create it first (an earlier statement of the same run may), or fix the model",
                        object.name
                    ),
                ));
                continue;
            };
            match (link.op, &link.label) {
                (Op::Delete, _) => removed.push((
                    json!({"from": {"id": from}, "to": [{"id": to}]}),
                    link,
                )),
                (_, None) => default.push((json!({"from": {"id": from}, "to": {"id": to}}), link)),
                (_, Some(label)) => match labels.get(label) {
                    Some((category, id)) => labeled.push((
                        json!({"from": {"id": from}, "to": {"id": to}, "types": [{"associationCategory": category, "associationTypeId": id}]}),
                        link,
                    )),
                    None => {
                        let mut known: Vec<&str> = labels.keys().map(String::as_str).collect();
                        known.sort_unstable();
                        outcome.rejected.push(self.reject(
                            link,
                            "INVALID_LABEL",
                            format!(
                                "'{label}' is not an association label of {}; its labels: {}",
                                self.name,
                                known.join(", ")
                            ),
                        ));
                    }
                },
            }
        }
        self.send("associate/default", default, outcome, metrics)
            .await?;
        self.send("create", labeled, outcome, metrics).await?;
        self.send("archive", removed, outcome, metrics).await
    }
}

impl DisplayAs for AssociationsSink {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "HubspotAssociationsSink: connection={} object={} from={} by {} to={} by {}: batch/associate/default, batch/create (labels), batch/archive",
            self.connection.name,
            self.name,
            self.from.name,
            self.from.key,
            self.to.name,
            self.to.key
        )
    }
}

#[async_trait]
impl DataSink for AssociationsSink {
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
        let batches: Vec<RecordBatch> = data.try_collect().await?;
        let links = self.links(&batches)?;
        let mut session = Session::open(
            &format!("{}.{}", self.connection.name, self.name),
            self.run.run_id.clone(),
            self.run.dry_run,
            None,
        );
        let metrics = Arc::clone(session.metrics());
        let mut outcome = DeliveryOutcome::default();
        let mut error: Option<Error> = None;
        match session.dry_run() {
            Some(dry) => {
                let mut ops: BTreeMap<&'static str, u64> = BTreeMap::new();
                for link in &links {
                    let op = match (link.op, &link.label) {
                        (Op::Delete, _) => "remove association",
                        (_, None) => "associate",
                        (_, Some(_)) => "associate with a label",
                    };
                    *ops.entry(op).or_default() += 1;
                }
                for (op, records) in ops {
                    dry.ops.push(DryRunOp {
                        op,
                        records,
                        requests: records.div_ceil(MAX_BATCH_SIZE as u64),
                        ..Default::default()
                    });
                }
            }
            None => {
                if let Err(e) = self.apply(&links, &mut outcome, &metrics).await {
                    error = Some(e);
                }
            }
        }
        let location = format!(
            "{}/crm/v4/associations",
            self.connection.config.shown_base_url
        );
        Ok(self.report.close(
            session,
            &self.metrics,
            location,
            Delivered { outcome, error },
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn association_names_are_two_different_types() {
        assert_eq!(
            parse("contact_company"),
            Some(("contact", "contacts", "company", "companies"))
        );
        assert_eq!(parse("deal_contact").map(|p| p.3), Some("contacts"));
        assert_eq!(parse("contact_contact"), None);
        assert_eq!(parse("contacts"), None);
        assert_eq!(parse("list_members"), None);
        assert!(NAMES.iter().all(|n| parse(n).is_some()));
    }
}
