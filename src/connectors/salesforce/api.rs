//! The parts of Salesforce's API outside record writes: the session, the global describe (which
//! objects exist), the sObject describe (an object's fields), SOQL lookups of record Ids by an
//! external id, and the quota every answer reports. Every call goes through
//! [`SalesforceConnection::call`], the delivery engine's control-plane call: paced by the
//! connection's limiter, refused before it would pass `max_api_usage_pct`, re-authenticated once
//! on 401, retried when Salesforce says to within `max_attempts` / `max_retry_time`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use http::{HeaderMap, Method};
use serde::Deserialize;
use serde_json::Value;

use super::auth::{self, Session};
use super::config::MAX_JOB_BYTES;
use super::config::SalesforceConfig;
use super::retry::{self, SalesforceRetryLogic};
use crate::connectors::field_meta;
use crate::delivery::control::{self, Call, ControlPlane, expect_success};
use crate::delivery::{
    AdaptiveLimiter, DeliveryMetrics, HttpResponse, ResponseClass, RetryPolicy, Ticket,
};
use crate::error::{Error, Result};

/// Values per SOQL `IN (…)` lookup (keeps the URL well under Salesforce's 16 KB).
pub const LOOKUP_CHUNK: usize = 100;

/// Objects offered for completion before the org's own list has been read.
pub const STANDARD_OBJECTS: &[&str] = &["account", "contact", "lead", "opportunity", "case"];

/// What the describe call says about one field.
#[derive(Debug, Clone)]
pub struct FieldInfo {
    pub name: String,
    pub kind: String,
    pub createable: bool,
    pub updateable: bool,
    pub external_id: bool,
    pub length: Option<usize>,
    /// The values of a restricted picklist (anything else is refused by Salesforce).
    pub picklist: Option<Arc<HashSet<String>>>,
}

/// One sObject as its describe call gives it.
#[derive(Debug)]
pub struct SObject {
    /// The API name (`Contact`, `Churn_Score__c`).
    pub name: String,
    /// The fields by API name, typed.
    pub fields: SchemaRef,
    /// Field details by API name.
    pub info: HashMap<String, FieldInfo>,
    /// The default match key: the External ID field if there is exactly one, else `Id`.
    pub key: String,
    /// Lookups set by a parent's External ID, by column (`Account.Account_Ref__c`).
    pub relationships: HashMap<String, Relationship>,
}

/// A lookup field set by its parent's External ID: the column `Account.Account_Ref__c` is sent
/// as `"Account": {"Account_Ref__c": "…"}` (REST) and under that header (Bulk CSV).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relationship {
    /// The relationship's name (`Account`).
    pub name: String,
    /// The parent object (`Account`).
    pub parent: String,
    /// The parent's External ID field (`Account_Ref__c`).
    pub field: String,
    /// The lookup field that holds the parent's Id (`AccountId`).
    pub lookup: String,
}

impl SObject {
    /// Fields records can be matched by: External ID fields, and `Id`.
    pub fn match_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .info
            .values()
            .filter(|f| f.external_id)
            .map(|f| f.name.clone())
            .collect();
        keys.sort();
        keys.push("Id".into());
        keys
    }
}

#[derive(Deserialize)]
struct GlobalDescribe {
    #[serde(default)]
    sobjects: Vec<GlobalObject>,
}

#[derive(Deserialize)]
struct GlobalObject {
    name: String,
}

#[derive(Deserialize)]
struct Describe {
    name: String,
    #[serde(default)]
    fields: Vec<DescribeField>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DescribeField {
    name: String,
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    nillable: bool,
    #[serde(default)]
    createable: bool,
    #[serde(default)]
    updateable: bool,
    #[serde(default)]
    external_id: bool,
    #[serde(default)]
    length: Option<usize>,
    #[serde(default)]
    restricted_picklist: bool,
    #[serde(default)]
    picklist_values: Vec<PicklistValue>,
    /// A lookup's relationship (`Account` for `AccountId`).
    #[serde(default)]
    relationship_name: Option<String>,
    /// The objects a lookup points to.
    #[serde(default)]
    reference_to: Vec<String>,
}

#[derive(Deserialize)]
struct PicklistValue {
    value: String,
    #[serde(default = "yes")]
    active: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct QueryResult {
    #[serde(default)]
    records: Vec<Value>,
    #[serde(default)]
    next_records_url: Option<String>,
}

/// What every statement on one Salesforce connection shares.
#[derive(Debug)]
pub struct SalesforceConnection {
    pub name: String,
    pub config: Arc<SalesforceConfig>,
    pub client: reqwest::Client,
    pub limiter: Arc<AdaptiveLimiter>,
    /// Serializes logins; holds the current session.
    login: tokio::sync::Mutex<Option<Session>>,
    /// The current session, readable without waiting (requests are built synchronously).
    current: RwLock<Option<Session>>,
    /// Logins done, so concurrent 401s refresh the session once.
    logins: AtomicU64,

    /// The last `Sforce-Limit-Info: api-usage=n/m`.
    usage: Mutex<Option<(u64, u64)>>,
    /// The org's object API names (global describe), once read.
    objects: Mutex<Option<Vec<String>>>,
    described: Mutex<HashMap<String, Arc<SObject>>>,
}

impl SalesforceConnection {
    pub fn new(name: &str, config: SalesforceConfig, client: reqwest::Client) -> Self {
        Self {
            name: name.to_string(),
            limiter: Arc::new(AdaptiveLimiter::new(config.http.rate_limit).for_connection(name)),
            config: Arc::new(config),
            client,
            login: tokio::sync::Mutex::default(),
            current: RwLock::default(),
            logins: AtomicU64::new(0),
            usage: Mutex::default(),
            objects: Mutex::default(),
            described: Mutex::default(),
        }
    }

    pub fn error(&self, message: impl std::fmt::Display) -> Error {
        Error::Write {
            message: format!("salesforce {}: {message}", self.name),
        }
    }

    /// The session, logging in first if there is none.
    pub async fn session(&self) -> Result<Session> {
        let mut login = self.login.lock().await;
        if let Some(session) = &*login {
            return Ok(session.clone());
        }
        let session = self.login_now().await?;
        *login = Some(session.clone());
        Ok(session)
    }

    async fn login_now(&self) -> Result<Session> {
        let mut session = auth::login(&self.name, &self.config, &self.client).await?;
        session.generation = self.logins.fetch_add(1, Ordering::SeqCst) + 1;
        *self.current.write().expect("session lock") = Some(session.clone());
        Ok(session)
    }

    /// The session as of now, if logged in (for building requests synchronously).
    pub fn current_session(&self) -> Result<Session> {
        self.current
            .read()
            .expect("session lock")
            .clone()
            .ok_or_else(|| self.error("not logged in"))
    }

    /// A new session after a 401 answered a request sent with session `generation`; calls
    /// that saw the same expired session share one login, and a 401 for a request sent before
    /// a newer session was issued just retries with that one.
    pub async fn refresh(&self, generation: u64) -> Result<()> {
        let mut login = self.login.lock().await;
        if self.logins.load(Ordering::SeqCst) != generation {
            return Ok(());
        }
        *login = Some(self.login_now().await?);
        Ok(())
    }

    /// Records the quota an answer reports.
    pub fn observe(&self, headers: &http::HeaderMap) {
        if let Some(usage) = retry::api_usage(headers) {
            if usage.1 > 0 {
                metrics::gauge!("sluice_api_quota_used_ratio", "connection" => self.name.clone())
                    .set(usage.0 as f64 / usage.1 as f64);
            }
            *self.usage.lock().expect("usage lock") = Some(usage);
        }
    }

    /// The last reported (used, allocation) of the org's rolling 24-hour API requests.
    pub fn usage(&self) -> Option<(u64, u64)> {
        *self.usage.lock().expect("usage lock")
    }

    /// Refuses a call that would take the org past `max_api_usage_pct` of its allocation.
    pub fn check_quota(&self) -> Result<()> {
        let Some((used, limit)) = self.usage() else {
            return Ok(());
        };
        let pct = self.config.max_api_usage_pct;
        if limit > 0 && (used + 1) as f64 > limit as f64 * pct / 100.0 {
            return Err(self.error(format!(
                "the org has used {used} of its {limit} API requests of the last 24 hours ({:.1}%); max_api_usage_pct is {pct}, so sluice stops here. Records acknowledged so far are committed; run the sync again when usage falls (or raise max_api_usage_pct) and it sends the rest",
                used as f64 * 100.0 / limit as f64
            )));
        }
        Ok(())
    }

    /// `{instance_url}{path}` for a path starting with `/`.
    pub fn url(&self, session: &Session, path: &str) -> String {
        format!("{}{path}", session.instance_url)
    }

    /// One control-plane call (see [`control::call`]): refused past the quota, re-authenticated
    /// once on 401. Other answers are the caller's to read.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<(&'static str, Bytes)>,
        metrics: Option<&DeliveryMetrics>,
    ) -> Result<HttpResponse> {
        let mut call = Call::new(method, path);
        if let Some((content_type, body)) = body {
            call = call.body(content_type, body);
        }
        control::call(self, call, metrics).await
    }

    /// A [`SalesforceConnection::call`] that reads a Bulk job's results, which repeat its
    /// uploaded rows (at most [`MAX_JOB_BYTES`]) with an id, a flag and an error message each.
    pub async fn call_results(
        &self,
        path: &str,
        metrics: Option<&DeliveryMetrics>,
    ) -> Result<HttpResponse> {
        let call = Call::get(path).max_answer(3 * MAX_JOB_BYTES);
        control::call(self, call, metrics).await
    }

    /// Reads the org's current API usage with `GET /services/data/`, which Salesforce does not
    /// count against the allocation (a statement starts from a fresh reading, so a window that
    /// rolled on since the last statement is seen).
    pub async fn refresh_usage(&self) -> Result<()> {
        let call = Call::get("/services/data/").uncounted();
        let response = control::call(self, call, None).await?;
        expect_success(self, &response, "reading the API versions")
    }

    /// The API name of the object named `name` in any case, or `None` when the org has none.
    pub async fn object_name(&self, name: &str) -> Result<Option<String>> {
        if let Some(found) = self.find_object(name) {
            return Ok(Some(found));
        }
        if self.objects.lock().expect("objects lock").is_some() {
            return Ok(None);
        }
        let path = format!("{}/sobjects", self.config.data_path());
        let response = self.call(Method::GET, &path, None, None).await?;
        expect_success(self, &response, "listing the org's objects")?;
        let global: GlobalDescribe = serde_json::from_slice(&response.body).map_err(|e| {
            self.error(format!(
                "the list of objects came back in a shape sluice does not know ({e})"
            ))
        })?;
        *self.objects.lock().expect("objects lock") =
            Some(global.sobjects.into_iter().map(|o| o.name).collect());
        Ok(self.find_object(name))
    }

    fn find_object(&self, name: &str) -> Option<String> {
        self.objects
            .lock()
            .expect("objects lock")
            .as_ref()?
            .iter()
            .find(|o| o.eq_ignore_ascii_case(name))
            .cloned()
    }

    /// The org's objects (lowercase), once listed.
    pub fn object_names(&self) -> Option<Vec<String>> {
        self.objects
            .lock()
            .expect("objects lock")
            .as_ref()
            .map(|o| o.iter().map(|n| n.to_lowercase()).collect())
    }

    /// An object as already described, without a call.
    pub fn cached(&self, name: &str) -> Option<Arc<SObject>> {
        self.described
            .lock()
            .expect("described lock")
            .get(&name.to_lowercase())
            .cloned()
    }

    /// An object's describe (once per connection), or `None` when the org has no such object.
    pub async fn describe(&self, name: &str) -> Result<Option<Arc<SObject>>> {
        if let Some(o) = self.cached(name) {
            return Ok(Some(o));
        }
        let Some(api_name) = self.object_name(name).await? else {
            return Ok(None);
        };
        let Some(describe) = self.fetch_describe(&api_name).await? else {
            return Ok(None);
        };
        // The External ID fields of each parent a writable lookup points to (one describe per
        // parent object), for relationship columns.
        let mut parents: HashMap<String, Vec<String>> = HashMap::new();
        for f in &describe.fields {
            let ([parent], Some(_)) = (f.reference_to.as_slice(), &f.relationship_name) else {
                continue;
            };
            if !(f.createable || f.updateable) || parents.contains_key(parent) {
                continue;
            }
            let external = if parent.eq_ignore_ascii_case(&describe.name) {
                external_ids(&describe)
            } else {
                match self.fetch_describe(parent).await? {
                    Some(p) => external_ids(&p),
                    None => vec![],
                }
            };
            parents.insert(parent.clone(), external);
        }
        let object = Arc::new(sobject(describe, &parents));
        self.described
            .lock()
            .expect("described lock")
            .insert(name.to_lowercase(), Arc::clone(&object));
        Ok(Some(object))
    }

    /// An object's describe, or `None` when the org has no such object.
    async fn fetch_describe(&self, api_name: &str) -> Result<Option<Describe>> {
        let path = format!("{}/sobjects/{api_name}/describe", self.config.data_path());
        let response = self.call(Method::GET, &path, None, None).await?;
        if response.status.as_u16() == 404 {
            return Ok(None);
        }
        expect_success(self, &response, &format!("describing {api_name}"))?;
        serde_json::from_slice(&response.body)
            .map(Some)
            .map_err(|e| {
                self.error(format!(
                    "the describe of {api_name} came back in a shape sluice does not know ({e})"
                ))
            })
    }

    /// Record Ids of the `object` records whose `field` has one of `values` (SOQL, a chunk of
    /// values per query), by value; values with no record are left out.
    pub async fn lookup_ids(
        &self,
        object: &str,
        field: &str,
        values: &[String],
        metrics: Option<&DeliveryMetrics>,
    ) -> Result<HashMap<String, String>> {
        let mut found = HashMap::new();
        for chunk in values.chunks(LOOKUP_CHUNK) {
            let soql = format!(
                "SELECT Id, {field} FROM {object} WHERE {field} IN ({})",
                soql_list(chunk)
            );
            let what = format!("looking up {object} Ids by {field}");
            let mut page = QueryPage::first(self, &soql);
            // A chunk matches at most a few pages of records; a server that keeps sending
            // nextRecordsUrl is not followed forever.
            for n in 0.. {
                if n == MAX_QUERY_PAGES {
                    return Err(self.error(format!(
                        "{what}: the answer went on past {MAX_QUERY_PAGES} pages for {} values",
                        chunk.len()
                    )));
                }
                let Some(records) = self.query_page(&mut page, &what, metrics).await? else {
                    break;
                };
                for record in records {
                    let id = record.get("Id").map(crate::delivery::retry::value_text);
                    let value = record.get(field).map(crate::delivery::retry::value_text);
                    if let (Some(id), Some(value)) = (id, value) {
                        found.insert(value.to_lowercase(), id);
                    }
                }
            }
        }
        Ok(found)
    }

    /// The next page of a SOQL query's records (`GET …/query?q=`, then its `nextRecordsUrl`);
    /// `None` once the query is done. `what` names the query in errors.
    pub async fn query_page(
        &self,
        page: &mut QueryPage,
        what: &str,
        metrics: Option<&DeliveryMetrics>,
    ) -> Result<Option<Vec<Value>>> {
        let Some(path) = page.next.take() else {
            return Ok(None);
        };
        let response = self.call(Method::GET, &path, None, metrics).await?;
        expect_success(self, &response, what)?;
        let result: QueryResult = serde_json::from_slice(&response.body)
            .map_err(|e| self.error(format!("{what}: a query answer sluice cannot read ({e})")))?;
        page.next = match result.next_records_url {
            // Always a path on the same instance.
            Some(next) if next.starts_with('/') && !next.starts_with("//") => Some(next),
            Some(_) => {
                return Err(self.error(format!(
                    "{what}: a query answer's nextRecordsUrl is not a path on this instance"
                )));
            }
            None => None,
        };
        Ok(Some(result.records))
    }
}

/// Where a SOQL query goes on: its first request, then each `nextRecordsUrl`.
#[derive(Debug, Clone)]
pub struct QueryPage {
    next: Option<String>,
}

impl QueryPage {
    /// The first page of `soql` on `connection`.
    pub fn first(connection: &SalesforceConnection, soql: &str) -> Self {
        let query: String = url::form_urlencoded::byte_serialize(soql.as_bytes()).collect();
        Self {
            next: Some(format!("{}/query?q={query}", connection.config.data_path())),
        }
    }
}

/// Values as a SOQL `IN` list of string literals.
pub fn soql_list(values: &[String]) -> String {
    values
        .iter()
        .map(|v| soql_string(v))
        .collect::<Vec<_>>()
        .join(",")
}

/// Pages of one lookup query followed at most.
const MAX_QUERY_PAGES: usize = 100;

/// A SOQL string literal.
fn soql_string(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        match c {
            '\'' => out.push_str("\\'"),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

#[async_trait]
impl ControlPlane for SalesforceConnection {
    type Auth = Session;

    fn service(&self) -> &str {
        "Salesforce"
    }

    fn policy(&self) -> RetryPolicy {
        self.config.http.retry
    }

    fn limiter(&self) -> &AdaptiveLimiter {
        &self.limiter
    }

    fn check(&self, call: &Call<'_>) -> Result<()> {
        if call.counted {
            self.check_quota()?;
        }
        Ok(())
    }

    async fn request(&self, call: &Call<'_>) -> Result<(reqwest::RequestBuilder, Session)> {
        let session = self.session().await?;
        let request = self
            .client
            .request(call.method.clone(), self.url(&session, call.path))
            .bearer_auth(session.token.expose());
        Ok((request, session))
    }

    fn observe(&self, _ticket: Ticket, headers: &HeaderMap) {
        SalesforceConnection::observe(self, headers);
    }

    fn classify(&self, response: &HttpResponse) -> Option<ResponseClass> {
        SalesforceRetryLogic::classify_status(response)
    }

    async fn reauthenticate(&self, session: &Session, _message: &str) -> Result<()> {
        self.refresh(session.generation).await
    }

    fn error(&self, message: String) -> Error {
        SalesforceConnection::error(self, message)
    }

    fn summary(&self, response: &HttpResponse) -> String {
        retry::summary(response)
    }

    fn code(&self, response: &HttpResponse) -> Option<String> {
        retry::error_code(response)
    }
}

/// Arrow fields from a describe: text-like types → Utf8, boolean → Boolean, int and long →
/// Int64, double / currency / percent → Float64, date → Date32, datetime → Timestamp(ms, UTC);
/// the Salesforce type, permissions, length and picklist values travel as field metadata.
/// The External ID fields of a describe.
fn external_ids(describe: &Describe) -> Vec<String> {
    describe
        .fields
        .iter()
        .filter(|f| f.external_id)
        .map(|f| f.name.clone())
        .collect()
}

/// A lookup field's relationship columns: `<relationship>.<External ID field>` for each of
/// `parents`' External ID fields (Utf8, writable as the lookup is).
fn relationship_columns(
    f: &DescribeField,
    parents: &HashMap<String, Vec<String>>,
) -> Vec<(Field, FieldInfo, Relationship)> {
    let ([parent], Some(name)) = (f.reference_to.as_slice(), &f.relationship_name) else {
        return vec![];
    };
    let Some(external) = parents.get(parent) else {
        return vec![];
    };
    external
        .iter()
        .map(|field| {
            let column = format!("{name}.{field}");
            let flag = |b: bool| if b { "true" } else { "false" }.to_string();
            let meta = HashMap::from([
                (
                    field_meta::TYPE.to_string(),
                    format!("reference to {parent} by {field}"),
                ),
                (field_meta::NILLABLE.to_string(), flag(f.nillable)),
                (field_meta::CREATEABLE.to_string(), flag(f.createable)),
                (field_meta::UPDATEABLE.to_string(), flag(f.updateable)),
            ]);
            (
                Field::new(&column, DataType::Utf8, true).with_metadata(meta),
                FieldInfo {
                    name: column.clone(),
                    kind: "reference".into(),
                    createable: f.createable,
                    updateable: f.updateable,
                    external_id: false,
                    length: None,
                    picklist: None,
                },
                Relationship {
                    name: name.clone(),
                    parent: parent.clone(),
                    field: field.clone(),
                    lookup: f.name.clone(),
                },
            )
        })
        .collect()
}

fn sobject(describe: Describe, parents: &HashMap<String, Vec<String>>) -> SObject {
    let mut fields = Vec::with_capacity(describe.fields.len());
    let mut info = HashMap::new();
    let mut relationships = HashMap::new();
    let mut relationship_fields = vec![];
    for f in &describe.fields {
        for (field, field_info, relationship) in relationship_columns(f, parents) {
            relationships.insert(field.name().clone(), relationship);
            info.insert(field.name().clone(), field_info);
            relationship_fields.push(field);
        }
    }
    for f in describe.fields {
        let data_type = match f.kind.as_str() {
            "boolean" => DataType::Boolean,
            "int" | "long" => DataType::Int64,
            "double" | "currency" | "percent" => DataType::Float64,
            "date" => DataType::Date32,
            "datetime" => DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            _ => DataType::Utf8,
        };
        let flag = |b: bool| if b { "true" } else { "false" }.to_string();
        let mut meta = HashMap::from([
            (field_meta::TYPE.to_string(), f.kind.clone()),
            (field_meta::NILLABLE.to_string(), flag(f.nillable)),
            (field_meta::CREATEABLE.to_string(), flag(f.createable)),
            (field_meta::UPDATEABLE.to_string(), flag(f.updateable)),
        ]);
        // Id is set by Salesforce, but it is how records are matched.
        if !f.createable && !f.updateable && f.name != "Id" {
            meta.insert(field_meta::READ_ONLY.into(), "true".into());
        }
        if f.external_id || f.name == "Id" {
            meta.insert(field_meta::UNIQUE.into(), "true".into());
        }
        if let Some(length) = f.length.filter(|l| *l > 0) {
            meta.insert(field_meta::LENGTH.into(), length.to_string());
        }
        let values: Vec<String> = f
            .picklist_values
            .iter()
            .filter(|v| v.active)
            .map(|v| v.value.clone())
            .collect();
        if !values.is_empty() {
            meta.insert(
                field_meta::OPTIONS.into(),
                serde_json::to_string(&values).unwrap_or_default(),
            );
        }
        let restricted = f.restricted_picklist && !values.is_empty();
        info.insert(
            f.name.clone(),
            FieldInfo {
                name: f.name.clone(),
                kind: f.kind.clone(),
                createable: f.createable,
                updateable: f.updateable,
                external_id: f.external_id,
                length: f
                    .length
                    .filter(|l| *l > 0 && data_type == DataType::Utf8 && f.kind != "id"),
                picklist: restricted.then(|| Arc::new(values.into_iter().collect())),
            },
        );
        fields.push(Field::new(&f.name, data_type, true).with_metadata(meta));
    }
    // (After the object's own fields.)
    fields.extend(relationship_fields);
    let external: Vec<&FieldInfo> = info.values().filter(|f| f.external_id).collect();
    let key = match external.as_slice() {
        [one] => one.name.clone(),
        _ => "Id".to_string(),
    };
    SObject {
        name: describe.name,
        fields: Arc::new(Schema::new(fields)),
        info,
        key,
        relationships,
    }
}

/// How long to wait before the `n`-th poll of a Bulk job (1-based): `first`, growing by half
/// each time, at most ten times `first`. Gentle growth keeps the lag between a job ending and
/// sluice seeing it small (a job of a few seconds is seen within about a second); the cap keeps
/// a job of many minutes to a few polls a minute.
pub fn poll_wait(first: Duration, n: u32) -> Duration {
    let factor = 1.5f64.powi(n.saturating_sub(1).min(16) as i32).min(10.0);
    first.mul_f64(factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_becomes_typed_fields() {
        let body = r#"{"name":"Contact","fields":[
            {"name":"Id","type":"id","nillable":false,"createable":false,"updateable":false,"externalId":false,"length":18},
            {"name":"LastName","type":"string","nillable":false,"createable":true,"updateable":true,"length":80},
            {"name":"Email","type":"email","nillable":true,"createable":true,"updateable":true,"length":80},
            {"name":"Score__c","type":"double","nillable":true,"createable":true,"updateable":true},
            {"name":"Active__c","type":"boolean","nillable":false,"createable":true,"updateable":true},
            {"name":"Birthdate","type":"date","nillable":true,"createable":true,"updateable":true},
            {"name":"CreatedDate","type":"datetime","nillable":false,"createable":false,"updateable":false},
            {"name":"External_Id__c","type":"string","nillable":true,"createable":true,"updateable":true,"externalId":true,"length":40},
            {"name":"Tier__c","type":"picklist","nillable":true,"createable":true,"updateable":true,"restrictedPicklist":true,
             "picklistValues":[{"value":"Gold","active":true},{"value":"Old","active":false}]}]}"#;
        let object = sobject(serde_json::from_str(body).unwrap(), &HashMap::new());
        assert_eq!(object.key, "External_Id__c", "the one External ID field");
        assert_eq!(object.match_keys(), ["External_Id__c", "Id"]);
        let f = &object.fields;
        assert_eq!(
            f.field_with_name("Score__c").unwrap().data_type(),
            &DataType::Float64
        );
        assert_eq!(
            f.field_with_name("Birthdate").unwrap().data_type(),
            &DataType::Date32
        );
        let created = f.field_with_name("CreatedDate").unwrap().metadata();
        assert!(created.contains_key(field_meta::READ_ONLY));
        assert!(
            !f.field_with_name("Id")
                .unwrap()
                .metadata()
                .contains_key(field_meta::READ_ONLY)
        );
        let tier = &object.info["Tier__c"];
        assert!(tier.picklist.as_ref().unwrap().contains("Gold"));
        assert!(
            !tier.picklist.as_ref().unwrap().contains("Old"),
            "inactive values are not allowed"
        );
        assert_eq!(object.info["LastName"].length, Some(80));
    }

    #[test]
    fn soql_literals_are_escaped() {
        assert_eq!(soql_string("O'Brien\\x"), r"'O\'Brien\\x'");
    }

    #[test]
    fn polls_back_off() {
        let s = Duration::from_secs(1);
        let waits: Vec<u128> = [1, 2, 3, 4, 7, 30]
            .iter()
            .map(|n| poll_wait(s, *n).as_millis())
            .collect();
        assert_eq!(waits, [1000, 1500, 2250, 3375, 10000, 10000]);
    }
}
