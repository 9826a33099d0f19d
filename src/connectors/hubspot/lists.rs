//! Static list memberships: `crm.list_members`.
//!
//! ```sql
//! INSERT INTO crm.list_members SELECT 'Churn risk' AS list, email, firstname FROM scores WHERE churn_risk > 0.8;
//! MERGE INTO crm.list_members AS t USING at_risk AS s ON t.list = s.list AND t.email = s.email
//!   WHEN NOT MATCHED THEN INSERT (list, email) VALUES (s.list, s.email)
//!   WHEN NOT MATCHED BY SOURCE THEN DELETE;                 -- members who left the model are removed
//! ```
//!
//! A row is a contact in a list, matched by (list, email). `list` is a list name (a MANUAL list
//! is created when none has that name) or a list id; the other fields are contact properties.
//! Members are added by record id, so the contacts are upserted first (`batch/upsert` by email),
//! then added with `PUT /crm/v3/lists/{id}/memberships/add`; removed members go through
//! `…/memberships/remove` with the record id the state holds (or `batch/read` by email). A
//! membership is acknowledged only when its list call succeeded.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use datafusion::arrow::array::Array;
use datafusion::arrow::datatypes::{Schema, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::datasource::sink::DataSink;
use datafusion::error::Result;
use datafusion::execution::TaskContext;
use datafusion::physical_plan::metrics::{ExecutionPlanMetricsSet, MetricsSet};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, SendableRecordBatchStream};
use futures::TryStreamExt;
use http::Method;
use serde_json::{Value, json};

use super::api::{HubspotConnection, ObjectSchema};
use super::config::normalize;
use super::encode::Encoder;
use super::sink::{HubspotService, Matching};
use crate::connectors::WriteReport;
use crate::contract::{Ack, CHANGE_COLUMNS, ChangeBatch, Op, Rejected};
use crate::delivery::control::expect_success;
use crate::delivery::encode::{DateStyle, text_values};
use crate::delivery::{Delivered, DeliveryMetrics, DeliveryOutcome, DryRun, DryRunOp, Session};
use crate::error::Error;
use crate::sync::SyncRun;
use crate::sync::hash::COMPOSITE_KEY;

/// The object name of memberships.
pub const LIST_MEMBERS: &str = "list_members";
/// Record ids per membership call (HubSpot accepts more; this keeps bodies small).
const IDS_PER_CALL: usize = 10_000;

/// The membership calls of one run: record id and change per list.
#[derive(Debug, Default)]
struct Memberships<'a> {
    adds: BTreeMap<&'a str, Vec<(String, u32)>>,
    removes: BTreeMap<&'a str, Vec<(String, u32)>>,
    /// Removals whose contact id is not in the state.
    lookups: Vec<&'a Member>,
}

impl Memberships<'_> {
    /// What a dry run would call.
    fn add_to(&self, dry: &mut DryRun) {
        for (op, lists) in [
            ("add to list", &self.adds),
            ("remove from list", &self.removes),
        ] {
            let records: usize = lists.values().map(Vec::len).sum();
            if records > 0 {
                dry.ops.push(DryRunOp {
                    op,
                    records: records as u64,
                    requests: lists
                        .values()
                        .map(|v| v.len().div_ceil(IDS_PER_CALL) as u64)
                        .sum(),
                    ..Default::default()
                });
            }
        }
    }
}

/// One membership change.
#[derive(Debug)]
struct Member {
    change: u32,
    list: String,
    email: String,
}

/// Writes the membership changes of one statement on `crm.list_members`.
#[derive(Debug)]
pub struct ListMembersSink {
    connection: Arc<HubspotConnection>,
    contacts: Arc<ObjectSchema>,
    schema: SchemaRef,
    report: Arc<WriteReport>,
    sync: Arc<SyncRun>,
    metrics: ExecutionPlanMetricsSet,
}

impl ListMembersSink {
    pub fn new(
        connection: Arc<HubspotConnection>,
        contacts: Arc<ObjectSchema>,
        schema: SchemaRef,
        report: Arc<WriteReport>,
        sync: Arc<SyncRun>,
    ) -> Self {
        Self {
            connection,
            contacts,
            schema,
            report,
            sync,
            metrics: ExecutionPlanMetricsSet::new(),
        }
    }

    /// The model's fields (the change columns follow them).
    fn fields(&self) -> usize {
        self.schema.fields().len() - CHANGE_COLUMNS
    }

    /// The contact properties among the mapped fields, by index.
    fn contact_fields(&self) -> Vec<usize> {
        (0..self.fields())
            .filter(|i| {
                let name = self.schema.field(*i).name();
                name != "list" && name != COMPOSITE_KEY
            })
            .collect()
    }

    /// The contact columns of the rows that add members, as upserts of every mapped property.
    fn contact_upserts(&self, batch: &RecordBatch) -> Result<Option<RecordBatch>> {
        let changes = ChangeBatch::of(batch)?;
        let keep: datafusion::arrow::array::BooleanArray = (0..changes.num_rows())
            .map(|r| Some(changes.op(r) != Op::Delete))
            .collect();
        let kept = datafusion::arrow::compute::filter_record_batch(batch, &keep)?;
        if kept.num_rows() == 0 {
            return Ok(None);
        }
        let kept = ChangeBatch::of(&kept)?;
        let contact = kept.fields().project(&self.contact_fields())?;
        let ids = kept.change_ids().expect("a sync's batch has change ids");
        Ok(Some(ChangeBatch::upserts(&contact, ids)?))
    }

    /// Every row's (change, list, email, op).
    fn members(&self, batches: &[RecordBatch]) -> Result<Vec<(Member, Op)>> {
        let list = self.schema.index_of("list")?;
        let email = self.schema.index_of("email")?;
        let mut out = vec![];
        for batch in batches {
            let changes = ChangeBatch::of(batch)?;
            let lists = text_values(changes.field(list), DateStyle::EpochMillis)?;
            let emails = text_values(changes.field(email), DateStyle::EpochMillis)?;
            for r in 0..changes.num_rows() {
                let Some(change) = changes.change(r) else {
                    continue;
                };
                if lists.is_null(r) || emails.is_null(r) {
                    continue;
                }
                out.push((
                    Member {
                        change,
                        list: lists.value(r).to_string(),
                        email: emails.value(r).to_string(),
                    },
                    changes.op(r),
                ));
            }
        }
        Ok(out)
    }

    /// Phase 1: upserts the contacts of the rows that add members (by email), for their record
    /// ids; contacts refused before sending are among the outcome's rejects.
    async fn upsert_contacts(
        &self,
        session: &mut Session,
        batches: &[RecordBatch],
    ) -> crate::error::Result<Delivered> {
        let upserts: Vec<RecordBatch> = batches
            .iter()
            .map(|b| self.contact_upserts(b))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .flatten()
            .collect();
        let names: Vec<String> = self
            .contact_fields()
            .iter()
            .map(|i| self.schema.field(*i).name().clone())
            .collect();
        let key = names
            .iter()
            .position(|n| n == "email")
            .ok_or_else(|| Error::Write {
                message: "list members need their 'email'".into(),
            })?;
        let encoder = Encoder::new(&self.contacts, names, key, true, Some(&self.sync));
        let (driver, batcher) = HubspotService::delivery(
            &self.connection,
            "contacts",
            Matching::Property("email".into()),
            session,
        );
        let schema = upserts
            .first()
            .map(|b| b.schema())
            .unwrap_or_else(|| Arc::new(Schema::empty()));
        let input = Box::pin(RecordBatchStreamAdapter::new(
            schema,
            futures::stream::iter(upserts.into_iter().map(Ok)),
        ));
        let mut encode_rejects = vec![];
        let encode = |b: &RecordBatch| {
            let out = encoder.encode(b, &|_| None)?;
            encode_rejects.extend(out.rejects);
            Ok(out.records)
        };
        let concurrency = self.connection.config.http.concurrency;
        let mut delivered = session
            .deliver(&driver, input, encode, batcher, concurrency)
            .await;
        delivered.outcome.rejected.extend(encode_rejects);
        Ok(delivered)
    }

    /// Phase 2's plan: adds for the contacts HubSpot took (`upserted`), removes for members that
    /// left (their contact's id from the state, else looked up by email).
    fn memberships<'a>(&self, members: &'a [(Member, Op)], upserted: Vec<Ack>) -> Memberships<'a> {
        let ids: HashMap<u32, String> = upserted
            .into_iter()
            .filter_map(|a| a.id.map(|id| (a.change, id)))
            .collect();
        let deletes: Vec<u32> = members
            .iter()
            .filter(|(_, op)| *op == Op::Delete)
            .map(|(m, _)| m.change)
            .collect();
        let known: HashMap<u32, Option<String>> = deletes
            .iter()
            .copied()
            .zip(self.sync.record_ids(&deletes))
            .collect();
        let mut plan = Memberships::default();
        for (member, op) in members {
            if *op == Op::Delete {
                match known.get(&member.change).cloned().flatten() {
                    Some(id) => plan
                        .removes
                        .entry(&member.list)
                        .or_default()
                        .push((id, member.change)),
                    None => plan.lookups.push(member),
                }
            } else if let Some(id) = ids.get(&member.change) {
                plan.adds
                    .entry(&member.list)
                    .or_default()
                    .push((id.clone(), member.change));
            }
        }
        plan
    }

    /// Finds the contacts of removals the state has no id for; a member whose contact HubSpot
    /// does not have is done (nothing to remove).
    async fn look_up_removals<'a>(
        &self,
        plan: &mut Memberships<'a>,
        outcome: &mut DeliveryOutcome,
        metrics: &DeliveryMetrics,
    ) -> crate::error::Result<()> {
        if plan.lookups.is_empty() {
            return Ok(());
        }
        let emails: Vec<String> = plan.lookups.iter().map(|m| m.email.clone()).collect();
        let found = self
            .connection
            .read_ids("contacts", "email", &emails, Some(metrics))
            .await?;
        for m in std::mem::take(&mut plan.lookups) {
            match found.get(&normalize("email", &m.email)) {
                Some(id) => plan
                    .removes
                    .entry(&m.list)
                    .or_default()
                    .push((id.clone(), m.change)),
                None => outcome.acked.push(Ack::done(m.change)),
            }
        }
        Ok(())
    }

    /// Sends the planned adds and removes, list by list. A list whose call fails is not
    /// acknowledged (its members are sent again next run); the first such error is returned.
    async fn apply(
        &self,
        plan: Memberships<'_>,
        outcome: &mut DeliveryOutcome,
        metrics: &DeliveryMetrics,
    ) -> crate::error::Result<()> {
        let mut error = None;
        for (add, lists) in [(true, plan.adds), (false, plan.removes)] {
            for (list, members) in lists {
                let (done, missing) = match self.membership(list, add, &members, metrics).await {
                    Ok(settled) => settled,
                    Err(e) => {
                        error.get_or_insert(e);
                        continue;
                    }
                };
                let id_of: HashMap<u32, &String> = members.iter().map(|(id, c)| (*c, id)).collect();
                outcome.acked.extend(
                    done.iter()
                        .map(|c| Ack::new(*c, id_of.get(c).map(|s| s.to_string()))),
                );
                outcome.accepted += done.len() as u64;
                for change in missing {
                    let id = id_of.get(&change).map(|s| s.as_str());
                    outcome.rejected.push(Rejected {
                        key: None,
                        code: "RECORD_MISSING".into(),
                        message: format!(
                            "HubSpot has no contact with record id {} to add to list '{list}'",
                            id.unwrap_or("?")
                        ),
                        payload: Bytes::from(json!({"list": list, "recordId": id}).to_string()),
                        attempts: 1,
                        change: Some(change),
                    });
                }
            }
        }
        error.map_or(Ok(()), Err)
    }

    /// Adds or removes `ids` (record id → change) in `list`; returns the changes settled and
    /// those HubSpot had no record for.
    async fn membership(
        &self,
        list: &str,
        add: bool,
        ids: &[(String, u32)],
        metrics: &DeliveryMetrics,
    ) -> crate::error::Result<(Vec<u32>, Vec<u32>)> {
        let list_id = self
            .connection
            .list_id("contacts", list, Some(metrics))
            .await?;
        let (mut done, mut missing) = (vec![], vec![]);
        for chunk in ids.chunks(IDS_PER_CALL) {
            let body = Value::Array(chunk.iter().map(|(id, _)| json!(id)).collect());
            let action = if add { "add" } else { "remove" };
            let response = self
                .connection
                .call(
                    Method::PUT,
                    &format!("/crm/v3/lists/{list_id}/memberships/{action}"),
                    Some(body),
                    Some(metrics),
                )
                .await?;
            expect_success(
                self.connection.as_ref(),
                &response,
                &format!("{action} members of list '{list}'"),
            )?;
            let answer: Value = serde_json::from_slice(&response.body).unwrap_or_default();
            let absent: Vec<&str> = answer
                .get("recordIdsMissing")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            for (id, change) in chunk {
                if add && absent.contains(&id.as_str()) {
                    missing.push(*change);
                } else {
                    done.push(*change);
                }
            }
        }
        Ok((done, missing))
    }
}

impl DisplayAs for ListMembersSink {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "HubspotListMembersSink: connection={} key=(list, email){} contacts upserted by email, then added with memberships/add; removed with memberships/remove",
            self.connection.name,
            if self.sync.dry_run {
                " dry_run=true"
            } else {
                ""
            },
        )
    }
}

#[async_trait]
impl DataSink for ListMembersSink {
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
        let config = &self.connection.config;
        let batches: Vec<RecordBatch> = data.try_collect().await?;
        let members = self.members(&batches)?;
        // No checkpoints: the changes are list memberships, settled only once the member is
        // added or removed, not when its contact is upserted.
        let mut session = Session::open(
            &format!("{}.{LIST_MEMBERS}", self.connection.name),
            self.sync.run_id.clone(),
            self.sync.dry_run,
            None,
        )
        .traced(self.sync.sample.is_some() && !self.sync.dry_run);
        // 1. Upsert the contacts of added members, for their record ids.
        let Delivered {
            outcome: upserted,
            mut error,
        } = self.upsert_contacts(&mut session, &batches).await?;
        // 2. Memberships: adds for the contacts HubSpot took, removes for members that left.
        let mut outcome = DeliveryOutcome {
            rejected: upserted.rejected,
            ..Default::default()
        };
        let mut plan = self.memberships(&members, upserted.acked);
        // The membership calls count among the write's requests.
        let metrics = Arc::clone(session.metrics());
        match session.dry_run() {
            Some(dry) => plan.add_to(dry),
            None => {
                if let Err(e) = self
                    .look_up_removals(&mut plan, &mut outcome, &metrics)
                    .await
                {
                    error.get_or_insert(e);
                }
                if let Err(e) = self.apply(plan, &mut outcome, &metrics).await {
                    error.get_or_insert(e);
                }
            }
        }
        let location = format!("{}/crm/v3/lists", config.shown_base_url);
        Ok(self.report.close(
            session,
            &self.metrics,
            location,
            Delivered { outcome, error },
        )?)
    }
}
