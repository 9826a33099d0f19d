//! A fake Salesforce org on 127.0.0.1 (ephemeral port), faithful to
//! ../shared/api/destinations.md §1, for tests and benches.
//!
//! - OAuth token endpoint: client credentials (Basic header or form fields), refresh token and
//!   JWT bearer (the RS256 assertion is verified with the test key's public half; `iss`, `sub`,
//!   `aud`, `exp` checked); OAuth error bodies; tokens expire after `token_ttl` (then every data
//!   call answers 401 `INVALID_SESSION_ID`).
//! - Global describe and sObject describe; SOQL `SELECT Id, F FROM O WHERE F IN (…)`.
//! - sObject Collections create / update / upsert by external id / delete: ≤200 records, results
//!   in request order, `allOrNone` rollback semantics, in-request duplicate external ids fail
//!   both rows (`DUPLICATE_VALUE`), field validation (required, createable / updateable, length,
//!   email, restricted picklist, number types, unique external ids).
//! - Bulk API 2.0 ingest: create → upload CSV → close → `UploadComplete` → `InProgress` for a
//!   time proportional to the rows → `JobComplete` (or `Failed` by script); successful, failed
//!   and unprocessed results as CSV in shuffled order.
//! - `Sforce-Limit-Info: api-usage=n/m` on every data answer; 403 `TotalRequests` when the
//!   allocation is spent; scripted 403 `ConcurrentPerOrgLongTxn`; per-key scripted record
//!   failures (e.g. `UNABLE_TO_LOCK_ROW` once).

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use rand::seq::SliceRandom;
use serde_json::{Map, Value, json};

pub const CLIENT_ID: &str = "3MVG9fake-consumer-key";
pub const CLIENT_SECRET: &str = "fake-consumer-secret-5551";
pub const REFRESH_TOKEN: &str = "5Aep861fake-refresh-token";
pub const USERNAME: &str = "integration@acme.example";
pub const AUDIENCE: &str = "https://login.salesforce.com";
/// The throwaway RSA key pair of the JWT bearer tests (never used anywhere real).
pub const JWT_PRIVATE_KEY: &str = include_str!("../../fixtures/salesforce_jwt_test.key");
pub const JWT_PUBLIC_KEY: &str = include_str!("../../fixtures/salesforce_jwt_test.pub");

/// How the fake behaves.
#[derive(Debug)]
pub struct Script {
    /// Tokens stop working this long after they were issued.
    pub token_ttl: Option<Duration>,
    /// The org's daily API allocation, and what was used before the test.
    pub allocation: u64,
    pub used: u64,
    /// The next n data calls answer 403 `ConcurrentPerOrgLongTxn`.
    pub concurrent_faults: u32,
    /// Per external id / Id (lowercase): codes its next attempts fail with, one per attempt.
    pub record_faults: HashMap<String, VecDeque<String>>,
    /// Bulk: time in `InProgress` per job, plus per row.
    pub bulk_base: Duration,
    pub bulk_per_row: Duration,
    /// Bulk: the next job fails with this message after processing half its rows.
    pub bulk_fail: Option<String>,
    /// Added latency per data request.
    pub latency: Duration,
    /// Every session stops working when this many collection calls have arrived (once).
    pub expire_after_collections: Option<usize>,
    /// Records per page of a query answer (Salesforce's default: 2,000).
    pub query_batch: usize,
}

impl Default for Script {
    fn default() -> Self {
        Self {
            token_ttl: None,
            allocation: 100_000,
            used: 0,
            concurrent_faults: 0,
            record_faults: HashMap::new(),
            bulk_base: Duration::from_millis(30),
            bulk_per_row: Duration::ZERO,
            bulk_fail: None,
            latency: Duration::ZERO,
            expire_after_collections: None,
            query_batch: 2000,
        }
    }
}

/// One field of an object.
#[derive(Debug, Clone)]
pub struct SfField {
    pub name: &'static str,
    pub kind: &'static str,
    pub nillable: bool,
    pub createable: bool,
    pub updateable: bool,
    pub external_id: bool,
    pub length: usize,
    pub picklist: Vec<&'static str>,
    /// A lookup: (relationship name, parent object).
    pub reference: Option<(&'static str, &'static str)>,
}

fn field(name: &'static str, kind: &'static str) -> SfField {
    SfField {
        name,
        kind,
        nillable: true,
        createable: true,
        updateable: true,
        external_id: false,
        length: if matches!(kind, "string" | "email" | "textarea" | "picklist") {
            80
        } else {
            0
        },
        picklist: vec![],
        reference: None,
    }
}

fn system_fields() -> Vec<SfField> {
    vec![
        SfField {
            nillable: false,
            createable: false,
            updateable: false,
            length: 18,
            ..field("Id", "id")
        },
        SfField {
            nillable: false,
            createable: false,
            updateable: false,
            ..field("CreatedDate", "datetime")
        },
        SfField {
            nillable: false,
            createable: false,
            updateable: false,
            ..field("LastModifiedDate", "datetime")
        },
    ]
}

/// The objects of the fake org: (API name, Id prefix, fields).
pub fn default_objects() -> Vec<(&'static str, &'static str, Vec<SfField>)> {
    let mut contact = system_fields();
    contact.extend([
        SfField {
            nillable: false,
            ..field("LastName", "string")
        },
        field("FirstName", "string"),
        field("Email", "email"),
        field("Phone", "phone"),
        SfField {
            external_id: true,
            length: 40,
            ..field("External_Id__c", "string")
        },
        field("Lead_Score__c", "double"),
        SfField {
            picklist: vec!["Gold", "Silver", "Bronze"],
            ..field("Tier__c", "picklist")
        },
        field("Birthdate", "date"),
        SfField {
            nillable: false,
            ..field("HasOptedOutOfEmail", "boolean")
        },
        field("Last_Seen__c", "datetime"),
        SfField {
            length: 1000,
            ..field("Description", "textarea")
        },
        SfField {
            updateable: false,
            ..field("Legacy_Code__c", "string")
        },
        SfField {
            length: 18,
            reference: Some(("Account", "Account")),
            ..field("AccountId", "reference")
        },
    ]);
    let mut account = system_fields();
    account.extend([
        SfField {
            nillable: false,
            ..field("Name", "string")
        },
        SfField {
            external_id: true,
            length: 40,
            ..field("Account_Ref__c", "string")
        },
        field("AnnualRevenue", "currency"),
    ]);
    let mut churn = system_fields();
    churn.extend([
        field("Name", "string"),
        SfField {
            external_id: true,
            length: 40,
            ..field("Ext__c", "string")
        },
        field("Score__c", "double"),
    ]);
    vec![
        ("Account", "001", account),
        ("Contact", "003", contact),
        ("Churn_Score__c", "a01", churn),
    ]
}

/// One request as the fake saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub at: Instant,
    pub method: String,
    /// What it was: `token`, `versions`, `describe`, `sobjects`, `query`, `collections:create|update|upsert|delete`,
    /// `jobs:create|upload|close|poll|successfulResults|failedResults|unprocessedrecords`.
    pub kind: String,
    pub status: u16,
    pub records: usize,
}

#[derive(Debug)]
struct Job {
    id: String,
    object: String,
    operation: String,
    external_id: Option<String>,
    state: String,
    csv: Option<Vec<u8>>,
    closed: Option<Instant>,
    processed: bool,
    fail: Option<String>,
    rows: usize,
    successful: Vec<Vec<String>>,
    failed: Vec<Vec<String>>,
    unprocessed: Vec<Vec<String>>,
    header: Vec<String>,
    number_failed: usize,
}

#[derive(Debug, Default)]
pub struct Observed {
    pub requests: Vec<Seen>,
    /// object → Id → fields.
    pub records: BTreeMap<String, BTreeMap<String, Map<String, Value>>>,
    pub deleted: HashSet<String>,
    next_id: u64,
    tokens: HashMap<String, Instant>,
    /// Grants issued, by grant type.
    pub grants: Vec<String>,
    used: u64,
    jobs: BTreeMap<String, Job>,
    /// (object, External ID field) → lowercase value → Ids, for lookups by external id.
    index: HashMap<(String, String), HashMap<String, std::collections::BTreeSet<String>>>,
    /// Query cursors: the records of a query's pages not read yet.
    cursors: HashMap<String, Vec<Value>>,
    /// Bulk query jobs: id → (completes at, CSV rows with the header first, state).
    query_jobs: HashMap<String, (Instant, Vec<Vec<String>>, String)>,
    /// The `Sforce-Locator` of the answer being built (Bulk query results).
    locator: Option<String>,
}

struct Shared {
    script: Mutex<Script>,
    objects: Vec<(&'static str, &'static str, Vec<SfField>)>,
    observed: Mutex<Observed>,
    url: Mutex<String>,
}

/// A running fake; stops when dropped.
pub struct FakeSalesforce {
    pub url: String,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeSalesforce {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeSalesforce {
    pub async fn start(script: Script) -> Self {
        let used = script.used;
        let shared = Arc::new(Shared {
            script: Mutex::new(script),
            objects: default_objects(),
            observed: Mutex::new(Observed {
                next_id: 1,
                used,
                index: default_objects()
                    .iter()
                    .flat_map(|(name, _, fields)| {
                        fields
                            .iter()
                            .filter(|f| f.external_id)
                            .map(|f| ((name.to_string(), f.name.to_string()), HashMap::new()))
                    })
                    .collect(),
                ..Default::default()
            }),
            url: Mutex::default(),
        });
        // Bulk uploads may be 150 MB (axum's default limit is 2 MB).
        let app = Router::new()
            .fallback(handle)
            .layer(axum::extract::DefaultBodyLimit::max(150 * 1024 * 1024))
            .with_state(Arc::clone(&shared));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        *shared.url.lock().unwrap() = url.clone();
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.ok();
        });
        Self {
            url,
            shared,
            server,
        }
    }

    pub fn script(&self, f: impl FnOnce(&mut Script)) {
        f(&mut self.shared.script.lock().unwrap());
    }

    pub fn observed<T>(&self, f: impl FnOnce(&Observed) -> T) -> T {
        f(&self.shared.observed.lock().unwrap())
    }

    /// Requests of a kind (see [`Seen::kind`]); a kind ending in `:` counts every kind under it.
    pub fn calls(&self, kind: &str) -> usize {
        self.observed(|o| {
            o.requests
                .iter()
                .filter(|r| {
                    if kind.ends_with(':') {
                        r.kind.starts_with(kind)
                    } else {
                        r.kind == kind
                    }
                })
                .count()
        })
    }

    /// Data API requests counted against the allocation (all but the token endpoint and the
    /// version list).
    pub fn api_calls(&self) -> usize {
        self.observed(|o| {
            o.requests
                .iter()
                .filter(|r| r.kind != "token" && r.kind != "versions")
                .count()
        })
    }

    /// The state of every Bulk job, in creation order of their ids.
    pub fn job_states(&self) -> Vec<String> {
        self.observed(|o| o.jobs.values().map(|j| j.state.clone()).collect())
    }

    /// The org's API usage so far.
    pub fn used(&self) -> u64 {
        self.observed(|o| o.used)
    }

    /// The rolling window moved on: usage is back to `used`.
    pub fn set_used(&self, used: u64) {
        self.shared.observed.lock().unwrap().used = used;
    }

    /// Live records of `object`: (Id, fields) ordered by Id.
    pub fn records(&self, object: &str) -> Vec<(String, Map<String, Value>)> {
        self.observed(|o| {
            o.records
                .get(object)
                .map(|r| r.iter().map(|(id, f)| (id.clone(), f.clone())).collect())
                .unwrap_or_default()
        })
    }

    /// A live record found by a field's value.
    pub fn find(
        &self,
        object: &str,
        by: &str,
        value: &str,
    ) -> Option<(String, Map<String, Value>)> {
        self.records(object)
            .into_iter()
            .find(|(_, f)| f.get(by).map(text).as_deref() == Some(value))
    }

    /// A field of the record whose `by` is `value`, as text.
    pub fn value(&self, object: &str, by: &str, value: &str, field: &str) -> Option<String> {
        let (_, fields) = self.find(object, by, value)?;
        fields.get(field).filter(|v| !v.is_null()).map(text)
    }

    /// Changes a record's field directly (as a rep would in Salesforce's UI).
    pub fn edit(&self, object: &str, id: &str, field: &str, value: Value) {
        let mut o = self.shared.observed.lock().unwrap();
        let mut fields = o
            .records
            .get(object)
            .and_then(|r| r.get(id))
            .cloned()
            .expect("the record exists");
        fields.insert(field.to_string(), value);
        o.put(object, id, fields);
    }

    /// Creates a record directly (as if made in Salesforce's UI); returns its Id.
    pub fn seed(&self, object: &str, fields: Value) -> String {
        let prefix = self
            .shared
            .objects
            .iter()
            .find(|(n, _, _)| *n == object)
            .expect("object")
            .1;
        let mut o = self.shared.observed.lock().unwrap();
        let id = o.new_id(prefix);
        o.put(object, &id, fields.as_object().cloned().unwrap_or_default());
        id
    }
}

impl Observed {
    fn new_id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}R{:014}", self.next_id)
    }

    /// Stores a record (replacing the one with that Id), keeping the index.
    fn put(&mut self, object: &str, id: &str, fields: Map<String, Value>) {
        self.take(object, id);
        for ((o, f), values) in self.index.iter_mut() {
            if o == object
                && let Some(v) = fields.get(f).filter(|v| !v.is_null())
            {
                values
                    .entry(text(v).to_lowercase())
                    .or_default()
                    .insert(id.to_string());
            }
        }
        self.records
            .entry(object.to_string())
            .or_default()
            .insert(id.to_string(), fields);
    }

    /// Removes a record, keeping the index.
    fn take(&mut self, object: &str, id: &str) -> Option<Map<String, Value>> {
        let old = self.records.get_mut(object)?.remove(id)?;
        for ((o, f), values) in self.index.iter_mut() {
            if o == object
                && let Some(v) = old.get(f).filter(|v| !v.is_null())
                && let Some(ids) = values.get_mut(&text(v).to_lowercase())
            {
                ids.remove(id);
            }
        }
        Some(old)
    }

    fn find_by(&self, object: &str, field: &str, value: &str) -> Vec<String> {
        if let Some(values) = self.index.get(&(object.to_string(), field.to_string())) {
            return values
                .get(&value.to_lowercase())
                .map(|ids| ids.iter().cloned().collect())
                .unwrap_or_default();
        }
        self.records
            .get(object)
            .map(|r| {
                r.iter()
                    .filter(|(_, f)| {
                        f.get(field)
                            .is_some_and(|v| text(v).eq_ignore_ascii_case(value))
                    })
                    .map(|(id, _)| id.clone())
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn sf_error(code: &str, message: &str, fields: &[&str]) -> Value {
    json!({"statusCode": code, "message": message, "fields": fields})
}

fn top_error(status: StatusCode, code: &str, message: &str) -> (StatusCode, Value) {
    (status, json!([{"message": message, "errorCode": code}]))
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    if path == "/services/oauth2/token" && method == Method::POST {
        let (status, body) = token(&shared, &headers, &body);
        let mut o = shared.observed.lock().unwrap();
        o.requests.push(Seen {
            at: Instant::now(),
            method: "POST".into(),
            kind: "token".into(),
            status: status.as_u16(),
            records: 0,
        });
        return (
            status,
            [("content-type", "application/json")],
            body.to_string(),
        )
            .into_response();
    }
    let latency = shared.script.lock().unwrap().latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let (kind, status, content_type, out, records) = data(&shared, &method, &uri, &headers, &body);
    let mut o = shared.observed.lock().unwrap();
    let locator = o.locator.take();
    o.requests.push(Seen {
        at: Instant::now(),
        method: method.to_string(),
        kind,
        status: status.as_u16(),
        records,
    });
    let limit = format!(
        "api-usage={}/{}",
        o.used,
        shared.script.lock().unwrap().allocation
    );
    let mut response = (
        status,
        [
            ("content-type", content_type),
            ("sforce-limit-info", limit.as_str()),
        ],
        out,
    )
        .into_response();
    if let Some(locator) = locator {
        response
            .headers_mut()
            .insert("sforce-locator", locator.parse().unwrap());
    }
    response
}

/// The token endpoint.
fn token(shared: &Shared, headers: &HeaderMap, body: &[u8]) -> (StatusCode, Value) {
    let form: HashMap<String, String> = url::form_urlencoded::parse(body).into_owned().collect();
    let bad = |error: &str, description: &str| {
        (
            StatusCode::BAD_REQUEST,
            json!({"error": error, "error_description": description}),
        )
    };
    let grant = form.get("grant_type").cloned().unwrap_or_default();
    let ok = match grant.as_str() {
        "client_credentials" => {
            let basic = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Basic "))
                .and_then(|b| {
                    use base64::Engine;
                    base64::engine::general_purpose::STANDARD.decode(b).ok()
                })
                .and_then(|b| String::from_utf8(b).ok());
            let (id, secret) = match basic {
                Some(pair) => pair
                    .split_once(':')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .unwrap_or_default(),
                None => (
                    form.get("client_id").cloned().unwrap_or_default(),
                    form.get("client_secret").cloned().unwrap_or_default(),
                ),
            };
            if id != CLIENT_ID {
                return bad("invalid_client_id", "client identifier invalid");
            }
            if secret != CLIENT_SECRET {
                return bad("invalid_client", "invalid client credentials");
            }
            true
        }
        "refresh_token" => {
            if form.get("client_id").map(String::as_str) != Some(CLIENT_ID) {
                return bad("invalid_client_id", "client identifier invalid");
            }
            if form.get("refresh_token").map(String::as_str) != Some(REFRESH_TOKEN) {
                return bad("invalid_grant", "expired access/refresh token");
            }
            true
        }
        "urn:ietf:params:oauth:grant-type:jwt-bearer" => {
            let assertion = form.get("assertion").cloned().unwrap_or_default();
            let key = jsonwebtoken::DecodingKey::from_rsa_pem(JWT_PUBLIC_KEY.as_bytes())
                .expect("public key");
            let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
            validation.set_audience(&[AUDIENCE]);
            validation.set_issuer(&[CLIENT_ID]);
            match jsonwebtoken::decode::<Value>(&assertion, &key, &validation) {
                Ok(data) if data.claims.get("sub").and_then(Value::as_str) == Some(USERNAME) => {
                    let exp = data.claims.get("exp").and_then(Value::as_u64).unwrap_or(0);
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_secs();
                    if exp > now + 300 {
                        return bad(
                            "invalid_grant",
                            "invalid assertion: exp too far in the future",
                        );
                    }
                    true
                }
                Ok(_) => return bad("invalid_grant", "user hasn't approved this consumer"),
                Err(_) => return bad("invalid_grant", "invalid assertion"),
            }
        }
        _ => return bad("unsupported_grant_type", "grant type not supported"),
    };
    assert!(ok);
    let mut o = shared.observed.lock().unwrap();
    let n = o.grants.len() + 1;
    let access = format!("00DFAKE000000001!AQ{n:08}.session");
    o.tokens.insert(access.clone(), Instant::now());
    o.grants.push(grant);
    let instance = shared.url.lock().unwrap().clone();
    (
        StatusCode::OK,
        json!({
            "access_token": access,
            "signature": "fake-signature",
            "scope": "api",
            "instance_url": instance,
            "id": format!("{instance}/id/00DFAKE000000001/005FAKE000000001"),
            "token_type": "Bearer",
            "issued_at": "1278448384422"
        }),
    )
}

/// Every data API call: auth, quota, faults, then the route.
fn data(
    shared: &Shared,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> (String, StatusCode, &'static str, String, usize) {
    let path = uri.path().trim_end_matches('/').to_string();
    let kind = kind_of(method, &path);
    let as_json = |kind: String, (status, v): (StatusCode, Value), n: usize| {
        (kind, status, "application/json", v.to_string(), n)
    };
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .to_string();
    {
        let mut o = shared.observed.lock().unwrap();
        let mut script = shared.script.lock().unwrap();
        let valid = o
            .tokens
            .get(&token)
            .is_some_and(|issued| script.token_ttl.is_none_or(|ttl| issued.elapsed() < ttl));
        if !valid {
            return as_json(
                kind,
                top_error(
                    StatusCode::UNAUTHORIZED,
                    "INVALID_SESSION_ID",
                    "Session expired or invalid",
                ),
                0,
            );
        }
        if path.contains("/composite/sobjects")
            && let Some(n) = script.expire_after_collections
            && o.requests
                .iter()
                .filter(|r| r.kind.starts_with("collections:"))
                .count()
                + 1
                >= n
        {
            script.expire_after_collections = None;
            o.tokens.clear();
        }
        // GET /services/data/ (the versions) is not counted against the allocation.
        if *method == Method::GET && path == "/services/data" {
            drop(script);
            drop(o);
            return as_json(
                kind,
                (
                    StatusCode::OK,
                    json!([{"label": "Winter '25", "url": "/services/data/v62.0", "version": "62.0"}]),
                ),
                0,
            );
        }
        if o.used >= script.allocation {
            return as_json(
                kind,
                top_error(
                    StatusCode::FORBIDDEN,
                    "REQUEST_LIMIT_EXCEEDED",
                    "TotalRequests Limit exceeded.",
                ),
                0,
            );
        }
        o.used += 1;
        if script.concurrent_faults > 0 {
            script.concurrent_faults -= 1;
            return as_json(
                kind,
                top_error(
                    StatusCode::FORBIDDEN,
                    "REQUEST_LIMIT_EXCEEDED",
                    "ConcurrentPerOrgLongTxn Limit exceeded.",
                ),
                0,
            );
        }
    }
    let Some(rest) = path.strip_prefix("/services/data") else {
        return as_json(
            kind,
            top_error(
                StatusCode::NOT_FOUND,
                "NOT_FOUND",
                "The requested resource does not exist",
            ),
            0,
        );
    };
    let rest = rest.trim_start_matches('/');
    if rest.is_empty() {
        return as_json(
            kind,
            (
                StatusCode::OK,
                json!([{"label": "Winter '25", "url": "/services/data/v62.0", "version": "62.0"}]),
            ),
            0,
        );
    }
    let (_version, route) = rest.split_once('/').unwrap_or((rest, ""));
    let segments: Vec<&str> = route.split('/').collect();
    let query: HashMap<String, String> = uri
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    match (method.clone(), segments.as_slice()) {
        (Method::GET, ["sobjects"]) => {
            let list: Vec<Value> = shared
                .objects
                .iter()
                .map(|(n, p, _)| json!({"name": n, "keyPrefix": p, "custom": n.ends_with("__c"), "createable": true, "updateable": true}))
                .collect();
            as_json(
                kind,
                (
                    StatusCode::OK,
                    json!({"encoding": "UTF-8", "maxBatchSize": 200, "sobjects": list}),
                ),
                0,
            )
        }
        (Method::GET, ["sobjects", object, "describe"]) => {
            as_json(kind, describe(shared, object), 0)
        }
        (Method::GET, ["query"]) => as_json(
            kind,
            soql(shared, query.get("q").map(String::as_str).unwrap_or("")),
            0,
        ),
        (Method::GET, ["query", cursor]) => {
            let rest = shared.observed.lock().unwrap().cursors.remove(*cursor);
            let answer = match rest {
                Some(records) => query_page(shared, records),
                None => top_error(
                    StatusCode::BAD_REQUEST,
                    "INVALID_QUERY_LOCATOR",
                    "invalid query locator",
                ),
            };
            as_json(kind, answer, 0)
        }
        (_, ["composite", "sobjects", rest @ ..]) => {
            let (status, v, n) = collections(shared, method, rest, &query, body);
            as_json(kind, (status, v), n)
        }
        (_, ["jobs", "query", rest @ ..]) => {
            let (status, content_type, out, n) = query_job(shared, method, rest, &query, body);
            (
                kind,
                status,
                content_type,
                String::from_utf8_lossy(&out).into_owned(),
                n,
            )
        }
        (_, ["jobs", "ingest", rest @ ..]) => {
            let (status, content_type, out, n) = bulk(shared, method, rest, body);
            (kind, status, content_type, out, n)
        }
        _ => as_json(
            kind,
            top_error(
                StatusCode::NOT_FOUND,
                "NOT_FOUND",
                "The requested resource does not exist",
            ),
            0,
        ),
    }
}

fn kind_of(method: &Method, path: &str) -> String {
    let segments: Vec<&str> = path.split('/').collect();
    let last = segments.last().copied().unwrap_or("");
    if path.contains("/composite/sobjects") {
        let verb = match *method {
            Method::POST => "create",
            Method::DELETE => "delete",
            Method::GET => "retrieve",
            _ if segments.len() > 6 => "upsert",
            _ => "update",
        };
        return format!("collections:{verb}");
    }
    if path.contains("/jobs/query") {
        let action = match (method.clone(), last) {
            (Method::POST, "query") => "create",
            (Method::GET, "results") => "results",
            (Method::GET, _) => "poll",
            (Method::PATCH, _) => "abort",
            _ => "other",
        };
        return format!("queryjobs:{action}");
    }
    if path.contains("/jobs/ingest") {
        let action = match (method.clone(), last) {
            (Method::POST, "ingest") => "create",
            (Method::PUT, _) => "upload",
            (Method::PATCH, _) => "close",
            (
                Method::GET,
                "successfulResults" | "failedResults" | "unprocessedrecords" | "unprocessedRecords",
            ) => last,
            (Method::GET, _) => "poll",
            _ => "other",
        };
        return format!("jobs:{action}");
    }
    if path.trim_end_matches('/') == "/services/data" {
        return "versions".into();
    }
    if path.ends_with("/describe") {
        return "describe".into();
    }
    if path.ends_with("/sobjects") {
        return "sobjects".into();
    }
    if path.ends_with("/query") {
        return "query".into();
    }
    "other".into()
}

fn object_of<'a>(
    shared: &'a Shared,
    name: &str,
) -> Option<&'a (&'static str, &'static str, Vec<SfField>)> {
    shared
        .objects
        .iter()
        .find(|(n, _, _)| n.eq_ignore_ascii_case(name))
}

fn describe(shared: &Shared, object: &str) -> (StatusCode, Value) {
    let Some((name, _, fields)) = object_of(shared, object) else {
        return top_error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "The requested resource does not exist",
        );
    };
    let fields: Vec<Value> = fields
        .iter()
        .map(|f| {
            json!({
                "name": f.name, "label": f.name, "type": f.kind, "nillable": f.nillable,
                "createable": f.createable, "updateable": f.updateable, "externalId": f.external_id,
                "idLookup": f.external_id || f.name == "Id", "unique": f.external_id,
                "caseSensitive": false, "length": f.length, "defaultedOnCreate": f.kind == "boolean",
                "restrictedPicklist": !f.picklist.is_empty(),
                "relationshipName": f.reference.map(|(r, _)| r),
                "referenceTo": f.reference.map(|(_, p)| vec![p]).unwrap_or_default(),
                "picklistValues": f.picklist.iter().map(|v| json!({"value": v, "label": v, "active": true, "defaultValue": false})).collect::<Vec<_>>()
            })
        })
        .collect();
    (
        StatusCode::OK,
        json!({"name": name, "label": name, "custom": name.ends_with("__c"), "fields": fields}),
    )
}

/// `SELECT f, … FROM Object [WHERE f IN ('v', …)] [LIMIT n]`: records by Id (a `WHERE … IN`
/// compares text as Salesforce does, without regard to case), the fields asked for (null when
/// unset), in pages of `query_batch` with a `nextRecordsUrl`.
fn soql(shared: &Shared, q: &str) -> (StatusCode, Value) {
    // `SELECT COUNT() FROM O`: the count alone.
    let count = regex::Regex::new(r"(?is)^SELECT\s+COUNT\(\)\s+FROM\s+(\w+)\s*$").unwrap();
    if let Some(c) = count.captures(q.trim()) {
        let Some((name, _, _)) = object_of(shared, &c[1]) else {
            return top_error(
                StatusCode::BAD_REQUEST,
                "INVALID_TYPE",
                &format!("sObject type '{}' is not supported.", &c[1]),
            );
        };
        let o = shared.observed.lock().unwrap();
        let n = o.records.get(*name).map_or(0, |r| r.len());
        return (
            StatusCode::OK,
            json!({"totalSize": n, "done": true, "records": []}),
        );
    }
    match soql_records(shared, q) {
        Ok((_, records)) => query_page(shared, records),
        Err(e) => e,
    }
}

/// The fields a SOQL query selects, and its records.
type Selected = (Vec<String>, Vec<Value>);

fn soql_records(shared: &Shared, q: &str) -> Result<Selected, (StatusCode, Value)> {
    let re = regex::Regex::new(
        r"(?is)^SELECT\s+(.+?)\s+FROM\s+(\w+)(?:\s+WHERE\s+(\w+)\s+IN\s*\((.*)\))?(?:\s+LIMIT\s+(\d+))?\s*$",
    )
    .unwrap();
    let Some(c) = re.captures(q.trim()) else {
        return Err(top_error(
            StatusCode::BAD_REQUEST,
            "MALFORMED_QUERY",
            "unexpected token",
        ));
    };
    let selected: Vec<String> = c[1].split(',').map(|f| f.trim().to_string()).collect();
    let object = c[2].to_string();
    let Some((name, _, fields)) = object_of(shared, &object) else {
        return Err(top_error(
            StatusCode::BAD_REQUEST,
            "INVALID_TYPE",
            &format!("sObject type '{object}' is not supported."),
        ));
    };
    // `Account.Account_Ref__c`: a field of the parent a lookup points to: (lookup field,
    // relationship, parent object, parent field).
    let parent_field = |f: &str| -> Option<(&'static str, &'static str, &'static str, String)> {
        let (relationship, field) = f.split_once('.')?;
        let lookup = fields.iter().find(|sf| {
            sf.reference
                .is_some_and(|(r, _)| r.eq_ignore_ascii_case(relationship))
        })?;
        let (r, parent) = lookup.reference?;
        let (_, _, parent_fields) = object_of(shared, parent)?;
        parent_fields
            .iter()
            .any(|pf| pf.name.eq_ignore_ascii_case(field))
            .then(|| (lookup.name, r, parent, field.to_string()))
    };
    for f in selected
        .iter()
        .chain(c.get(3).map(|m| m.as_str().to_string()).iter())
    {
        if f != "Id" && parent_field(f).is_none() && !fields.iter().any(|sf| sf.name == f.as_str())
        {
            return Err(top_error(
                StatusCode::BAD_REQUEST,
                "INVALID_FIELD",
                &format!("No such column '{f}' on entity '{name}'."),
            ));
        }
    }
    let o = shared.observed.lock().unwrap();
    let ids: Vec<String> = match (c.get(3), c.get(4)) {
        (Some(field), Some(list)) => {
            let mut values = vec![];
            let mut chars = list.as_str().chars().peekable();
            while let Some(ch) = chars.next() {
                if ch == '\'' {
                    let mut v = String::new();
                    while let Some(ch) = chars.next() {
                        match ch {
                            '\\' => match chars.next() {
                                Some('n') => v.push('\n'),
                                Some('r') => v.push('\r'),
                                Some('t') => v.push('\t'),
                                Some(other) => v.push(other),
                                None => {}
                            },
                            '\'' => break,
                            other => v.push(other),
                        }
                    }
                    values.push(v);
                }
            }
            let mut ids = std::collections::BTreeSet::new();
            for v in values {
                if field.as_str() == "Id" {
                    if o.records.get(*name).is_some_and(|r| r.contains_key(&v)) {
                        ids.insert(v);
                    }
                } else {
                    ids.extend(o.find_by(name, field.as_str(), &v));
                }
            }
            ids.into_iter().collect()
        }
        _ => o
            .records
            .get(*name)
            .map(|r| r.keys().cloned().collect())
            .unwrap_or_default(),
    };
    let limit = c.get(5).and_then(|l| l.as_str().parse::<usize>().ok());
    let records: Vec<Value> = ids
        .iter()
        .take(limit.unwrap_or(usize::MAX))
        .map(|id| {
            let stored = &o.records[*name][id];
            let mut record = Map::new();
            record.insert(
                "attributes".into(),
                json!({"type": name, "url": format!("/services/data/v62.0/sobjects/{name}/{id}")}),
            );
            for f in &selected {
                if let Some((lookup, relationship, parent, field)) = parent_field(f) {
                    let found = stored
                        .get(lookup)
                        .filter(|v| !v.is_null())
                        .map(text)
                        .and_then(|pid| o.records.get(parent)?.get(&pid).cloned());
                    match found {
                        None => {
                            record.insert(relationship.to_string(), Value::Null);
                        }
                        Some(p) => {
                            let entry = record
                                .entry(relationship.to_string())
                                .or_insert_with(|| json!({"attributes": {"type": parent}}));
                            entry[field.as_str()] = p.get(&field).cloned().unwrap_or(Value::Null);
                        }
                    }
                    continue;
                }
                let value = match f.as_str() {
                    "Id" => json!(id),
                    f => stored.get(f).cloned().unwrap_or(Value::Null),
                };
                record.insert(f.clone(), value);
            }
            Value::Object(record)
        })
        .collect();
    drop(o);
    Ok((selected, records))
}

/// Bulk API 2.0 query jobs: `POST jobs/query` runs the SOQL at once and completes after
/// `bulk_base`; `GET jobs/query/{id}` polls; `GET …/results?maxRecords=&locator=` answers CSV
/// pages (null as an empty cell, a relationship field as `Rel.Field`) with `Sforce-Locator`
/// naming the next page (`null` after the last); `PATCH` aborts.
fn query_job(
    shared: &Shared,
    method: &Method,
    rest: &[&str],
    query: &HashMap<String, String>,
    body: &[u8],
) -> (StatusCode, &'static str, Vec<u8>, usize) {
    let json_answer = |(status, v): (StatusCode, Value)| {
        (status, "application/json", v.to_string().into_bytes(), 0)
    };
    match (method.clone(), rest) {
        (Method::POST, []) => {
            let request: Value = serde_json::from_slice(body).unwrap_or_default();
            let q = request.get("query").and_then(Value::as_str).unwrap_or("");
            let (selected, records) = match soql_records(shared, q) {
                Ok(found) => found,
                Err(e) => return json_answer(e),
            };
            let mut rows = vec![selected.clone()];
            for r in &records {
                rows.push(
                    selected
                        .iter()
                        .map(|f| {
                            let v = match f.split_once('.') {
                                Some((rel, field)) => r.get(rel).and_then(|p| p.get(field)),
                                None => r.get(f),
                            };
                            v.filter(|v| !v.is_null()).map(text).unwrap_or_default()
                        })
                        .collect(),
                );
            }
            let ready = Instant::now() + shared.script.lock().unwrap().bulk_base;
            let mut o = shared.observed.lock().unwrap();
            o.next_id += 1;
            let id = format!("750FAKE{:011}", o.next_id);
            o.query_jobs
                .insert(id.clone(), (ready, rows, "UploadComplete".into()));
            json_answer((
                StatusCode::OK,
                json!({"id": id, "operation": "query", "object": "", "state": "UploadComplete", "concurrencyMode": "Parallel", "contentType": "CSV", "apiVersion": 62.0, "lineEnding": "LF", "columnDelimiter": "COMMA"}),
            ))
        }
        (Method::GET, [id]) => {
            let mut o = shared.observed.lock().unwrap();
            let Some((ready, rows, state)) = o.query_jobs.get_mut(*id) else {
                return json_answer(top_error(
                    StatusCode::NOT_FOUND,
                    "NOT_FOUND",
                    "The requested resource does not exist",
                ));
            };
            if state == "UploadComplete" {
                *state = if Instant::now() >= *ready {
                    "JobComplete"
                } else {
                    "InProgress"
                }
                .into();
            } else if state == "InProgress" && Instant::now() >= *ready {
                *state = "JobComplete".into();
            }
            let processed = rows.len().saturating_sub(1);
            json_answer((
                StatusCode::OK,
                json!({"id": id, "operation": "query", "state": state, "numberRecordsProcessed": processed, "retries": 0, "totalProcessingTime": 10}),
            ))
        }
        (Method::GET, [id, "results"]) => {
            let mut o = shared.observed.lock().unwrap();
            let Some((_, rows, state)) = o.query_jobs.get(*id) else {
                return json_answer(top_error(
                    StatusCode::NOT_FOUND,
                    "NOT_FOUND",
                    "The requested resource does not exist",
                ));
            };
            if state != "JobComplete" {
                return json_answer(top_error(
                    StatusCode::BAD_REQUEST,
                    "INVALIDJOBSTATE",
                    "Results are not available until the job is complete",
                ));
            }
            // (Salesforce may answer fewer than maxRecords: at most query_batch here.)
            let max = query
                .get("maxRecords")
                .and_then(|m| m.parse::<usize>().ok())
                .unwrap_or(usize::MAX)
                .min(shared.script.lock().unwrap().query_batch);
            let from = query
                .get("locator")
                .and_then(|l| l.parse::<usize>().ok())
                .unwrap_or(0);
            let data = &rows[1..];
            let to = data.len().min(from.saturating_add(max));
            let mut w = csv::WriterBuilder::new()
                .terminator(csv::Terminator::Any(b'\n'))
                .from_writer(vec![]);
            w.write_record(&rows[0]).unwrap();
            for row in &data[from.min(to)..to] {
                w.write_record(row).unwrap();
            }
            let out = w.into_inner().unwrap();
            let n = to - from.min(to);
            o.locator = Some(if to < data.len() {
                to.to_string()
            } else {
                "null".into()
            });
            (StatusCode::OK, "text/csv", out, n)
        }
        (Method::PATCH, [id]) => {
            let mut o = shared.observed.lock().unwrap();
            if let Some((_, _, state)) = o.query_jobs.get_mut(*id) {
                *state = "Aborted".into();
            }
            json_answer((StatusCode::OK, json!({"id": id, "state": "Aborted"})))
        }
        _ => json_answer(top_error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "The requested resource does not exist",
        )),
    }
}

/// The first `query_batch` of `records` as a query answer; the rest behind a cursor.
fn query_page(shared: &Shared, mut records: Vec<Value>) -> (StatusCode, Value) {
    let batch = shared.script.lock().unwrap().query_batch;
    let total = records.len();
    if records.len() <= batch {
        return (
            StatusCode::OK,
            json!({"totalSize": total, "done": true, "records": records}),
        );
    }
    let rest = records.split_off(batch);
    let mut o = shared.observed.lock().unwrap();
    o.next_id += 1;
    let cursor = format!("01gFAKE{:011}-{batch}", o.next_id);
    o.cursors.insert(cursor.clone(), rest);
    (
        StatusCode::OK,
        json!({"totalSize": total, "done": false, "nextRecordsUrl": format!("/services/data/v62.0/query/{cursor}"), "records": records}),
    )
}

/// Why a record cannot be written (a per-record error), checked against the object's fields.
fn validate(
    fields: &[SfField],
    record: &Map<String, Value>,
    creating: bool,
    existing: Option<&Map<String, Value>>,
) -> Result<(), Value> {
    for (name, value) in record {
        if name == "attributes" || name == "Id" || name == "id" {
            continue;
        }
        let Some(f) = fields.iter().find(|f| f.name.eq_ignore_ascii_case(name)) else {
            return Err(sf_error(
                "INVALID_FIELD",
                &format!("No such column '{name}' on sobject"),
                &[],
            ));
        };
        if (creating && !f.createable)
            || (!creating && !f.updateable && existing.and_then(|e| e.get(f.name)) != Some(value))
        {
            return Err(sf_error(
                "INVALID_FIELD_FOR_INSERT_UPDATE",
                &format!(
                    "Unable to create/update fields: {}. Please check the security settings of this field and verify that it is read/write for your profile or permission set.",
                    f.name
                ),
                &[f.name],
            ));
        }
        if value.is_null() {
            if !f.nillable && f.kind != "boolean" {
                return Err(sf_error(
                    "REQUIRED_FIELD_MISSING",
                    &format!("Required fields are missing: [{}]", f.name),
                    &[f.name],
                ));
            }
            continue;
        }
        let t = text(value);
        match f.kind {
            "double" | "currency" | "percent" | "int" if t.parse::<f64>().is_err() => {
                return Err(sf_error(
                    "INVALID_TYPE_ON_FIELD_IN_RECORD",
                    &format!("{}: value not of required type: {t}", f.name),
                    &[f.name],
                ));
            }
            "boolean" if t != "true" && t != "false" => {
                return Err(sf_error(
                    "INVALID_TYPE_ON_FIELD_IN_RECORD",
                    &format!("{}: value not of required type: {t}", f.name),
                    &[f.name],
                ));
            }
            "email"
                if !(t.contains('@') && t.rsplit('@').next().is_some_and(|d| d.contains('.'))) =>
            {
                return Err(sf_error(
                    "INVALID_EMAIL_ADDRESS",
                    &format!("{}: invalid email address: {t}", f.name),
                    &[f.name],
                ));
            }
            _ => {}
        }
        if f.length > 0 && f.kind != "id" && t.chars().count() > f.length {
            return Err(sf_error(
                "STRING_TOO_LONG",
                &format!(
                    "{}: data value too large: {t} (max length={})",
                    f.name, f.length
                ),
                &[f.name],
            ));
        }
        if !f.picklist.is_empty() && !f.picklist.contains(&t.as_str()) {
            return Err(sf_error(
                "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
                &format!("{}: bad value for restricted picklist field: {t}", f.name),
                &[f.name],
            ));
        }
    }
    if creating {
        for f in fields
            .iter()
            .filter(|f| !f.nillable && f.createable && f.kind != "boolean")
        {
            if record.get(f.name).is_none_or(Value::is_null) {
                return Err(sf_error(
                    "REQUIRED_FIELD_MISSING",
                    &format!("Required fields are missing: [{}]", f.name),
                    &[f.name],
                ));
            }
        }
    }
    Ok(())
}

/// One write: create / update / upsert / delete of one record. Returns (Id, created).
/// A record whose relationships are set by a parent's External ID (`"Account":
/// {"Account_Ref__c": "A-1"}` in JSON, an `Account.Account_Ref__c` column in CSV) with the lookup
/// field set to the parent's Id instead, as Salesforce resolves them; a parent that does not
/// exist, or a field that is not its External ID, is the record's error.
fn resolve_relationships(
    o: &Observed,
    objects: &[(&'static str, &'static str, Vec<SfField>)],
    fields: &[SfField],
    record: &Map<String, Value>,
) -> Result<Map<String, Value>, Value> {
    let mut out = Map::new();
    for (k, v) in record {
        let (relationship, by) = match (k.split_once('.'), v) {
            (Some((r, f)), _) => (r.to_string(), Some((f.to_string(), v.clone()))),
            (None, Value::Object(inner)) if k != "attributes" => (
                k.clone(),
                inner
                    .iter()
                    .find(|(f, _)| f.as_str() != "attributes")
                    .map(|(f, v)| (f.clone(), v.clone())),
            ),
            _ => {
                out.insert(k.clone(), v.clone());
                continue;
            }
        };
        let Some(lookup) = fields.iter().find(|f| {
            f.reference
                .is_some_and(|(r, _)| r.eq_ignore_ascii_case(&relationship))
        }) else {
            return Err(sf_error(
                "INVALID_FIELD",
                &format!("No such column '{k}' on sobject"),
                &[],
            ));
        };
        let parent = lookup.reference.map(|(_, p)| p).unwrap_or_default();
        let Some((field, value)) = by else {
            return Err(sf_error(
                "INVALID_FIELD",
                &format!("{k}: no External ID given"),
                &[],
            ));
        };
        let parent_fields = objects
            .iter()
            .find(|(n, _, _)| *n == parent)
            .map(|(_, _, f)| f.as_slice())
            .unwrap_or_default();
        if !parent_fields
            .iter()
            .any(|f| f.external_id && f.name.eq_ignore_ascii_case(&field))
        {
            return Err(sf_error(
                "INVALID_FIELD",
                &format!(
                    "The field {field} on entity {parent} is not an External ID or indexed field"
                ),
                &[],
            ));
        }
        if value.is_null() {
            out.insert(lookup.name.to_string(), Value::Null);
            continue;
        }
        let text_value = text(&value);
        match o.find_by(parent, &field, &text_value).as_slice() {
            [id] => {
                out.insert(lookup.name.to_string(), json!(id));
            }
            [] => {
                return Err(sf_error(
                    "INVALID_FIELD",
                    &format!(
                        "Foreign key external ID: {text_value} not found for field {field} in entity {parent}"
                    ),
                    &[],
                ));
            }
            _ => {
                return Err(sf_error(
                    "INVALID_FIELD",
                    &format!(
                        "Foreign key external ID: {text_value} matches more than one {parent} by {field}"
                    ),
                    &[],
                ));
            }
        }
    }
    Ok(out)
}

fn write_one(
    o: &mut Observed,
    script: &mut Script,
    objects: &[(&'static str, &'static str, Vec<SfField>)],
    object: &(&'static str, &'static str, Vec<SfField>),
    op: &str,
    external_id: Option<&str>,
    record: &Map<String, Value>,
) -> Result<(String, bool), Value> {
    let (name, prefix, fields) = object;
    let resolved = resolve_relationships(o, objects, fields, record)?;
    let record = &resolved;
    let key = match op {
        "upsert" | "create" => external_id
            .and_then(|f| record.get(f))
            .map(text)
            .or_else(|| {
                fields
                    .iter()
                    .find(|f| f.external_id)
                    .and_then(|f| record.get(f.name))
                    .map(text)
            }),
        _ => record.get("Id").or(record.get("id")).map(text),
    };
    if let Some(k) = &key
        && let Some(codes) = script.record_faults.get_mut(&k.to_lowercase())
        && let Some(code) = codes.pop_front()
    {
        return Err(sf_error(&code, &format!("scripted failure: {code}"), &[]));
    }
    let clean = |r: &Map<String, Value>| -> Map<String, Value> {
        r.iter()
            .filter(|(k, _)| !matches!(k.as_str(), "attributes" | "Id" | "id"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    let unique_clash = |o: &Observed, r: &Map<String, Value>, me: Option<&str>| -> Option<Value> {
        for f in fields.iter().filter(|f| f.external_id) {
            if let Some(v) = r.get(f.name).filter(|v| !v.is_null())
                && let Some(other) = o
                    .find_by(name, f.name, &text(v))
                    .into_iter()
                    .find(|id| Some(id.as_str()) != me)
            {
                return Some(sf_error(
                    "DUPLICATE_VALUE",
                    &format!(
                        "duplicate value found: {} duplicates value on record with id: {other}",
                        f.name
                    ),
                    &[f.name],
                ));
            }
        }
        None
    };
    match op {
        "create" => {
            validate(fields, record, true, None)?;
            if let Some(e) = unique_clash(o, record, None) {
                return Err(e);
            }
            let id = o.new_id(prefix);
            o.put(name, &id, clean(record));
            Ok((id, true))
        }
        "update" => {
            let Some(id) = key else {
                return Err(sf_error(
                    "MISSING_ARGUMENT",
                    "Id not specified in an update call",
                    &["Id"],
                ));
            };
            if o.deleted.contains(&id) {
                return Err(sf_error("ENTITY_IS_DELETED", "entity is deleted", &[]));
            }
            let Some(existing) = o.records.get(*name).and_then(|r| r.get(&id)).cloned() else {
                let code = if id.len() == 18 && id.starts_with(prefix) {
                    "INVALID_CROSS_REFERENCE_KEY"
                } else {
                    "MALFORMED_ID"
                };
                return Err(sf_error(
                    code,
                    &format!("{name} ID: id value of incorrect type: {id}"),
                    &["Id"],
                ));
            };
            validate(fields, record, false, Some(&existing))?;
            if let Some(e) = unique_clash(o, record, Some(&id)) {
                return Err(e);
            }
            let mut stored = existing;
            for (k, v) in clean(record) {
                stored.insert(k, v);
            }
            o.put(name, &id, stored);
            Ok((id, false))
        }
        "upsert" => {
            let field = external_id.unwrap_or("");
            if record.contains_key("Id") || record.contains_key("id") {
                return Err(sf_error(
                    "INVALID_FIELD",
                    "Only external ids are supported. Don't use record ids.",
                    &["Id"],
                ));
            }
            let Some(value) = record.get(field).filter(|v| !v.is_null()).map(text) else {
                return Err(sf_error(
                    "REQUIRED_FIELD_MISSING",
                    &format!("Required fields are missing: [{field}]"),
                    &[field],
                ));
            };
            let matches = o.find_by(name, field, &value);
            match matches.as_slice() {
                [] => write_one(o, script, objects, object, "create", external_id, record),
                [id] => {
                    let mut r = record.clone();
                    r.insert("Id".into(), json!(id));
                    write_one(o, script, objects, object, "update", None, &r)
                }
                many => Err(sf_error(
                    "DUPLICATE_EXTERNAL_ID",
                    &format!("{field}: more than one record found for external id field: {many:?}"),
                    &[field],
                )),
            }
        }
        "delete" => {
            let id = key.unwrap_or_default();
            if o.deleted.contains(&id) {
                return Err(sf_error("ENTITY_IS_DELETED", "entity is deleted", &[]));
            }
            match o.take(name, &id) {
                Some(_) => {
                    o.deleted.insert(id.clone());
                    Ok((id, false))
                }
                None => Err(sf_error(
                    "INVALID_CROSS_REFERENCE_KEY",
                    &format!("invalid cross reference id: {id}"),
                    &[],
                )),
            }
        }
        other => panic!("op {other}"),
    }
}

/// sObject Collections.
fn collections(
    shared: &Shared,
    method: &Method,
    rest: &[&str],
    query: &HashMap<String, String>,
    body: &[u8],
) -> (StatusCode, Value, usize) {
    let (all_or_none, records): (bool, Vec<Map<String, Value>>) = if *method == Method::DELETE {
        let ids: Vec<Map<String, Value>> = query
            .get("ids")
            .map(|ids| {
                ids.split(',')
                    .filter(|s| !s.is_empty())
                    .map(|id| Map::from_iter([("Id".to_string(), json!(id))]))
                    .collect()
            })
            .unwrap_or_default();
        (query.get("allOrNone").is_some_and(|v| v == "true"), ids)
    } else {
        let Ok(v) = serde_json::from_slice::<Value>(body) else {
            let (s, e) = top_error(
                StatusCode::BAD_REQUEST,
                "JSON_PARSER_ERROR",
                "Unexpected character",
            );
            return (s, e, 0);
        };
        let records = v
            .get("records")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        (
            v.get("allOrNone").and_then(Value::as_bool).unwrap_or(false),
            records
                .into_iter()
                .filter_map(|r| r.as_object().cloned())
                .collect(),
        )
    };
    let n = records.len();
    if n > 200 {
        let (s, e) = top_error(
            StatusCode::BAD_REQUEST,
            "EXCEEDED_ID_LIMIT",
            "record limit reached. cannot submit more than 200 records into this call",
        );
        return (s, e, n);
    }
    let (op, uri_object, external_id) = match (method.clone(), rest) {
        (Method::POST, []) => ("create", None, None),
        (Method::PATCH, []) => ("update", None, None),
        (Method::DELETE, []) => ("delete", None, None),
        (Method::PATCH, [object, field]) => ("upsert", Some(*object), Some(*field)),
        _ => {
            let (s, e) = top_error(
                StatusCode::NOT_FOUND,
                "NOT_FOUND",
                "The requested resource does not exist",
            );
            return (s, e, n);
        }
    };
    // Every record names its type; upserts' must be the URI's object; unknown fields refuse the request.
    let mut objects = vec![];
    for r in &records {
        let t = if op == "delete" {
            let id = r.get("Id").map(text).unwrap_or_default();
            shared
                .objects
                .iter()
                .find(|(_, p, _)| id.starts_with(p))
                .map(|(n, _, _)| n.to_string())
        } else {
            r.get("attributes")
                .and_then(|a| a.get("type"))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        let object = t.as_deref().and_then(|t| object_of(shared, t));
        match (object, uri_object) {
            (Some(obj), Some(u)) if !obj.0.eq_ignore_ascii_case(u) => {
                let (s, e) = top_error(
                    StatusCode::BAD_REQUEST,
                    "INVALID_TYPE",
                    "The sObject type in the record does not match the URI",
                );
                return (s, e, n);
            }
            (None, _) if op != "delete" => {
                let (s, e) = top_error(
                    StatusCode::BAD_REQUEST,
                    "INVALID_TYPE",
                    "Must send a concrete entity type.",
                );
                return (s, e, n);
            }
            _ => {}
        }
        if let Some(obj) = object {
            for k in r
                .keys()
                .filter(|k| !matches!(k.as_str(), "attributes" | "Id" | "id"))
            {
                let relationship = obj
                    .2
                    .iter()
                    .any(|f| f.reference.is_some_and(|(r, _)| r.eq_ignore_ascii_case(k)));
                if !relationship && !obj.2.iter().any(|f| f.name.eq_ignore_ascii_case(k)) {
                    let (s, e) = top_error(
                        StatusCode::BAD_REQUEST,
                        "INVALID_FIELD",
                        &format!("No such column '{k}' on sobject of type {}", obj.0),
                    );
                    return (s, e, n);
                }
            }
        }
        objects.push(object);
    }
    let mut o = shared.observed.lock().unwrap();
    let mut script = shared.script.lock().unwrap();
    // allOrNone: work on a copy, kept only if every record succeeds.
    let saved = all_or_none.then(|| (o.records.clone(), o.deleted.clone(), o.index.clone()));
    // Duplicate external ids in one upsert fail both rows.
    let mut counts: HashMap<String, usize> = HashMap::new();
    if let Some(f) = external_id {
        for r in &records {
            if let Some(v) = r.get(f).filter(|v| !v.is_null()) {
                *counts.entry(text(v).to_lowercase()).or_default() += 1;
            }
        }
    }
    let mut results = vec![];
    for (r, object) in records.iter().zip(objects) {
        let dup = external_id
            .and_then(|f| r.get(f))
            .map(text)
            .filter(|v| counts.get(&v.to_lowercase()).copied().unwrap_or(0) > 1);
        let result = match (dup, object) {
            (Some(v), _) => Err(sf_error(
                "DUPLICATE_VALUE",
                &format!("Duplicate external id specified: {v}"),
                &[],
            )),
            (None, None) => Err(sf_error(
                "MALFORMED_ID",
                &format!("malformed id {}", r.get("Id").map(text).unwrap_or_default()),
                &[],
            )),
            (None, Some(obj)) => write_one(
                &mut o,
                &mut script,
                &shared.objects,
                obj,
                op,
                external_id,
                r,
            ),
        };
        results.push(result);
    }
    if let Some((records, deleted, index)) = saved
        && results.iter().any(Result::is_err)
    {
        o.records = records;
        o.deleted = deleted;
        o.index = index;
        let out: Vec<Value> = results
            .into_iter()
            .map(|r| match r {
                Ok((id, _)) => json!({"id": id, "success": false, "errors": [sf_error("ALL_OR_NONE_OPERATION_ROLLED_BACK", "Record rolled back because not all records were valid and the request was using AllOrNone header", &[])]}),
                Err(e) => json!({"success": false, "errors": [e]}),
            })
            .collect();
        return (StatusCode::OK, Value::Array(out), n);
    }
    let out: Vec<Value> = results
        .into_iter()
        .map(|r| match r {
            Ok((id, created)) if op == "upsert" => {
                json!({"id": id, "success": true, "errors": [], "created": created})
            }
            Ok((id, _)) => json!({"id": id, "success": true, "errors": []}),
            Err(e) if op == "upsert" => {
                json!({"id": null, "success": false, "errors": [e], "created": false})
            }
            Err(e) => json!({"success": false, "errors": [e]}),
        })
        .collect();
    (StatusCode::OK, Value::Array(out), n)
}

fn job_info(job: &Job) -> Value {
    let mut v = json!({
        "id": job.id, "operation": job.operation, "object": job.object, "createdById": "005FAKE000000001",
        "createdDate": "2026-12-02T00:00:00.000+0000", "systemModstamp": "2026-12-02T00:00:00.000+0000",
        "state": job.state, "concurrencyMode": "Parallel", "contentType": "CSV", "apiVersion": 62.0,
        "jobType": "V2Ingest", "lineEnding": "LF", "columnDelimiter": "COMMA",
        "contentUrl": format!("services/data/v62.0/jobs/ingest/{}/batches", job.id),
    });
    if let Some(f) = &job.external_id {
        v["externalIdFieldName"] = json!(f);
    }
    if job.processed {
        v["numberRecordsProcessed"] = json!(job.successful.len() + job.failed.len());
        v["numberRecordsFailed"] = json!(job.number_failed);
        v["retries"] = json!(0);
        v["totalProcessingTime"] = json!(170);
    }
    if let Some(m) = &job.fail
        && job.state == "Failed"
    {
        v["errorMessage"] = json!(m);
    }
    v
}

fn csv_body(header: &[String], rows: &[Vec<String>]) -> String {
    let mut w = csv::WriterBuilder::new()
        .quote_style(csv::QuoteStyle::Always)
        .terminator(csv::Terminator::Any(b'\n'))
        .from_writer(vec![]);
    w.write_record(header).unwrap();
    for r in rows {
        w.write_record(r).unwrap();
    }
    String::from_utf8(w.into_inner().unwrap()).unwrap()
}

/// Bulk API 2.0 ingest.
fn bulk(
    shared: &Shared,
    method: &Method,
    rest: &[&str],
    body: &[u8],
) -> (StatusCode, &'static str, String, usize) {
    let json_out = |(s, v): (StatusCode, Value)| (s, "application/json", v.to_string(), 0);
    let mut o = shared.observed.lock().unwrap();
    match (method.clone(), rest) {
        (Method::POST, []) => {
            let spec: Value = serde_json::from_slice(body).unwrap_or_default();
            let object = spec.get("object").and_then(Value::as_str).unwrap_or("");
            let operation = spec
                .get("operation")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let Some((name, _, fields)) = object_of(shared, object) else {
                return json_out(top_error(
                    StatusCode::BAD_REQUEST,
                    "INVALIDENTITY",
                    &format!("Entity '{object}' is not supported by the Bulk API."),
                ));
            };
            if !["insert", "update", "upsert", "delete", "hardDelete"].contains(&operation.as_str())
            {
                return json_out(top_error(
                    StatusCode::BAD_REQUEST,
                    "INVALIDJOB",
                    "InvalidJob : Invalid operation",
                ));
            }
            let external_id = spec
                .get("externalIdFieldName")
                .and_then(Value::as_str)
                .map(str::to_string);
            if operation == "upsert"
                && !external_id
                    .as_deref()
                    .is_some_and(|f| fields.iter().any(|x| x.external_id && x.name == f))
            {
                return json_out(top_error(
                    StatusCode::BAD_REQUEST,
                    "INVALIDJOB",
                    "InvalidJob : External ID was blank or not an External ID field",
                ));
            }
            let id = o.new_id("750");
            let job = Job {
                id: id.clone(),
                object: name.to_string(),
                operation,
                external_id,
                state: "Open".into(),
                csv: None,
                closed: None,
                processed: false,
                fail: None,
                rows: 0,
                successful: vec![],
                failed: vec![],
                unprocessed: vec![],
                header: vec![],
                number_failed: 0,
            };
            let info = job_info(&job);
            o.jobs.insert(id, job);
            json_out((StatusCode::OK, info))
        }
        (Method::PUT, [id, "batches"]) => {
            let Some(job) = o.jobs.get_mut(*id) else {
                return json_out(top_error(
                    StatusCode::NOT_FOUND,
                    "NOT_FOUND",
                    "The requested resource does not exist",
                ));
            };
            if job.state != "Open" {
                return json_out(top_error(
                    StatusCode::CONFLICT,
                    "INVALIDJOBSTATE",
                    "Job is not open for upload",
                ));
            }
            job.csv = Some(body.to_vec());
            (StatusCode::CREATED, "text/plain", String::new(), 0)
        }
        (Method::PATCH, [id]) => {
            let state = serde_json::from_slice::<Value>(body)
                .ok()
                .and_then(|v| v.get("state").and_then(Value::as_str).map(str::to_string))
                .unwrap_or_default();
            let fail = shared.script.lock().unwrap().bulk_fail.take();
            let Some(job) = o.jobs.get_mut(*id) else {
                return json_out(top_error(
                    StatusCode::NOT_FOUND,
                    "NOT_FOUND",
                    "The requested resource does not exist",
                ));
            };
            match state.as_str() {
                "UploadComplete" if job.state == "Open" => {
                    job.state = "UploadComplete".into();
                    job.closed = Some(Instant::now());
                    job.fail = fail;
                }
                "Aborted" => job.state = "Aborted".into(),
                _ => {
                    return json_out(top_error(
                        StatusCode::BAD_REQUEST,
                        "INVALIDJOBSTATE",
                        "Invalid state change",
                    ));
                }
            }
            json_out((StatusCode::OK, job_info(job)))
        }
        (Method::GET, [id]) => {
            let id = id.to_string();
            let Some(job) = o.jobs.get(&id) else {
                return json_out(top_error(
                    StatusCode::NOT_FOUND,
                    "NOT_FOUND",
                    "The requested resource does not exist",
                ));
            };
            if job.state == "UploadComplete" || job.state == "InProgress" {
                let rows = job
                    .csv
                    .as_ref()
                    .map_or(0, |c| c.iter().filter(|b| **b == b'\n').count());
                let (base, per_row) = {
                    let s = shared.script.lock().unwrap();
                    (s.bulk_base, s.bulk_per_row)
                };
                let ready = job
                    .closed
                    .is_some_and(|t| t.elapsed() >= base + per_row * rows as u32);
                if ready {
                    process(shared, &mut o, &id);
                } else {
                    o.jobs.get_mut(&id).unwrap().state = "InProgress".into();
                }
            }
            json_out((StatusCode::OK, job_info(&o.jobs[&id])))
        }
        (Method::GET, [id, which]) => {
            let Some(job) = o.jobs.get(*id) else {
                return json_out(top_error(
                    StatusCode::NOT_FOUND,
                    "NOT_FOUND",
                    "The requested resource does not exist",
                ));
            };
            let mut rows;
            let header: Vec<String>;
            match *which {
                "successfulResults" => {
                    header = ["sf__Id", "sf__Created"]
                        .iter()
                        .map(|s| s.to_string())
                        .chain(job.header.iter().cloned())
                        .collect();
                    rows = job.successful.clone();
                }
                "failedResults" => {
                    header = ["sf__Id", "sf__Error"]
                        .iter()
                        .map(|s| s.to_string())
                        .chain(job.header.iter().cloned())
                        .collect();
                    rows = job.failed.clone();
                }
                "unprocessedrecords" | "unprocessedRecords" => {
                    header = job.header.clone();
                    rows = job.unprocessed.clone();
                }
                _ => {
                    return json_out(top_error(
                        StatusCode::NOT_FOUND,
                        "NOT_FOUND",
                        "The requested resource does not exist",
                    ));
                }
            }
            rows.shuffle(&mut rand::rng());
            let n = rows.len();
            (StatusCode::OK, "text/csv", csv_body(&header, &rows), n)
        }
        _ => json_out(top_error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "The requested resource does not exist",
        )),
    }
}

/// Processes an uploaded job's CSV as Salesforce would.
fn process(shared: &Shared, o: &mut Observed, id: &str) {
    let mut job = o.jobs.remove(id).unwrap();
    let csv = job.csv.take().unwrap_or_default();
    let mut reader = csv::ReaderBuilder::new().from_reader(&csv[..]);
    job.header = reader
        .headers()
        .map(|h| h.iter().map(str::to_string).collect())
        .unwrap_or_default();
    let rows: Vec<Vec<String>> = reader
        .records()
        .filter_map(|r| r.ok())
        .map(|r| r.iter().map(str::to_string).collect())
        .collect();
    job.rows = rows.len();
    let object = object_of(shared, &job.object).unwrap();
    let fields = &object.2;
    let key_column = match job.operation.as_str() {
        "upsert" => job.external_id.clone(),
        "update" | "delete" | "hardDelete" => Some("Id".into()),
        _ => fields
            .iter()
            .find(|f| f.external_id)
            .map(|f| f.name.to_string()),
    };
    let key_index = key_column
        .as_ref()
        .and_then(|k| job.header.iter().position(|h| h == k));
    let mut counts: HashMap<String, usize> = HashMap::new();
    if job.operation == "upsert"
        && let Some(k) = key_index
    {
        for r in &rows {
            *counts.entry(r[k].to_lowercase()).or_default() += 1;
        }
    }
    let limit = if job.fail.is_some() {
        rows.len() / 2
    } else {
        rows.len()
    };
    let mut script = shared.script.lock().unwrap();
    for (i, row) in rows.into_iter().enumerate() {
        if i >= limit {
            job.unprocessed.push(row);
            continue;
        }
        // CSV cells → a record: empty leaves the field alone, #N/A clears it.
        let mut record = Map::new();
        for (h, v) in job.header.iter().zip(&row) {
            if v.is_empty() {
                continue;
            }
            let value = if v == "#N/A" {
                Value::Null
            } else {
                let kind = fields
                    .iter()
                    .find(|f| f.name.eq_ignore_ascii_case(h))
                    .map(|f| f.kind)
                    .unwrap_or("string");
                match kind {
                    "double" | "currency" | "percent" => {
                        v.parse::<f64>().map(|f| json!(f)).unwrap_or(json!(v))
                    }
                    "boolean" => match v.to_lowercase().as_str() {
                        "true" => json!(true),
                        "false" => json!(false),
                        _ => json!(v),
                    },
                    _ => json!(v),
                }
            };
            record.insert(h.clone(), value);
        }
        let dup = key_index
            .map(|k| row[k].clone())
            .filter(|v| counts.get(&v.to_lowercase()).copied().unwrap_or(0) > 1);
        let op = match job.operation.as_str() {
            "insert" => "create",
            "hardDelete" => "delete",
            other => other,
        };
        let result = match dup {
            Some(v) => Err(sf_error(
                "DUPLICATE_VALUE",
                &format!("Duplicate external id specified: {v}"),
                &[],
            )),
            None => write_one(
                o,
                &mut script,
                &shared.objects,
                object,
                op,
                job.external_id.as_deref(),
                &record,
            ),
        };
        match result {
            Ok((sf_id, created)) => {
                let mut out = vec![sf_id, created.to_string()];
                out.extend(row);
                job.successful.push(out);
            }
            Err(e) => {
                job.number_failed += 1;
                let fields: Vec<String> = e["fields"]
                    .as_array()
                    .map(|a| a.iter().map(text).collect())
                    .unwrap_or_default();
                let mut out = vec![
                    String::new(),
                    format!(
                        "{}:{}:{} --",
                        text(&e["statusCode"]),
                        text(&e["message"]),
                        fields.join(",")
                    ),
                ];
                out.extend(row);
                job.failed.push(out);
            }
        }
    }
    job.processed = true;
    job.state = if job.fail.is_some() {
        "Failed".into()
    } else {
        "JobComplete".into()
    };
    o.jobs.insert(id.to_string(), job);
}
