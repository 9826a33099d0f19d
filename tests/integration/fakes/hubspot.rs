//! A fake HubSpot CRM v3 API on 127.0.0.1 (ephemeral port), faithful to
//! ../shared/api/destinations.md §2, for tests and benches.
//!
//! It serves the properties API and batch create / update / upsert / archive / read with
//! HubSpot's rules: at most 100 inputs, 400 for duplicate ids in a batch, 409 on create conflicts
//! (the whole batch, first conflict only), property validation (unknown property, read-only
//! property, invalid enumeration option, invalid email, non-string value) answered per input as
//! 207 when every input carries an `objectWriteTraceId` and as a whole-batch 400 otherwise,
//! results in random order, a rolling-window rate limit with `X-HubSpot-RateLimit-*` headers and
//! `TEN_SECONDLY_ROLLING` 429s, and a daily quota with `DAILY` 429s (`new_day` resets it).
//! Scriptable faults: statuses (502, 423, 477 …), silent empty 2xx answers, records left out of
//! `results` (merged), 401 for a wrong token, 403 for a missing scope.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use rand::seq::SliceRandom;
use serde_json::{Map, Value, json};

/// A one-off fault, used by the next batch call that arrives.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Answer with this status (and `Retry-After` seconds) without processing.
    Status(u16, Option<u64>),
    /// Answer 200 with `{"status":"COMPLETE","results":[]}` without processing.
    SilentEmpty,
}

/// How the fake behaves.
#[derive(Debug)]
pub struct Script {
    pub token: String,
    pub faults: VecDeque<Fault>,
    /// Rolling-window limit: at most `.0` requests per `.1`.
    pub limit: Option<(usize, Duration)>,
    /// Requests per day before `DAILY` 429s.
    pub daily: Option<u64>,
    /// Keys left out of `results` (as if merged into another record), without an error.
    pub merged: Vec<String>,
    /// Answer 403 MISSING_SCOPES to writes.
    pub missing_scope: bool,
    /// Added latency per request.
    pub latency: Duration,
    /// The next n properties (describe) calls answer 502.
    pub properties_faults: u32,
}

impl Default for Script {
    fn default() -> Self {
        Self {
            token: "pat-na1-test-token".into(),
            faults: VecDeque::new(),
            limit: None,
            daily: None,
            merged: vec![],
            missing_scope: false,
            latency: Duration::ZERO,
            properties_faults: 0,
        }
    }
}

/// One property of an object.
#[derive(Debug, Clone)]
pub struct Prop {
    pub name: &'static str,
    pub kind: &'static str,
    pub unique: bool,
    pub read_only: bool,
    pub options: Vec<&'static str>,
}

fn prop(name: &'static str, kind: &'static str) -> Prop {
    Prop {
        name,
        kind,
        unique: false,
        read_only: false,
        options: vec![],
    }
}

/// The objects the fake knows, with HubSpot-like properties.
pub fn default_objects() -> BTreeMap<String, Vec<Prop>> {
    let common = || {
        vec![
            Prop {
                read_only: true,
                ..prop("hs_object_id", "number")
            },
            Prop {
                read_only: true,
                ..prop("createdate", "datetime")
            },
            Prop {
                read_only: true,
                ..prop("lastmodifieddate", "datetime")
            },
        ]
    };
    let mut contacts = common();
    contacts.extend([
        prop("email", "string"),
        prop("firstname", "string"),
        prop("lastname", "string"),
        prop("churn_score", "number"),
        prop("vip", "bool"),
        prop("signup_date", "date"),
        prop("last_seen", "datetime"),
        Prop {
            options: vec!["subscriber", "lead", "customer", "evangelist"],
            ..prop("lifecyclestage", "enumeration")
        },
        Prop {
            unique: true,
            ..prop("external_id", "string")
        },
    ]);
    let mut companies = common();
    companies.extend([
        prop("name", "string"),
        prop("domain", "string"),
        Prop {
            unique: true,
            ..prop("account_ref", "string")
        },
        prop("arr", "number"),
    ]);
    let mut deals = common();
    deals.extend([prop("dealname", "string"), prop("amount", "number")]);
    let mut tickets = common();
    tickets.extend([prop("subject", "string")]);
    BTreeMap::from([
        ("contacts".to_string(), contacts),
        ("companies".to_string(), companies),
        ("deals".to_string(), deals),
        ("tickets".to_string(), tickets),
    ])
}

/// One batch call as the fake saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub at: Instant,
    pub path: String,
    pub status: u16,
    pub inputs: usize,
    /// Each input's `id` (update/upsert/archive/read) or key property (create).
    pub ids: Vec<String>,
}

/// A stored record.
#[derive(Debug, Clone)]
pub struct Stored {
    pub id: u64,
    pub properties: Map<String, Value>,
    pub archived: bool,
}

#[derive(Debug, Default)]
pub struct Observed {
    pub requests: Vec<Seen>,
    pub throttled: u64,
    /// Properties (describe) calls, answered or faulted.
    pub properties_calls: u64,
    /// object → records by id.
    pub records: BTreeMap<String, BTreeMap<u64, Stored>>,
    next_id: u64,
    /// Lists by id: (name, members' record ids).
    pub lists: BTreeMap<String, (String, std::collections::BTreeSet<u64>)>,
    /// (object, property) → normalized value → record id, for lookups by property.
    index: HashMap<(String, String), HashMap<String, u64>>,
    window: VecDeque<Instant>,
    day_count: u64,
    /// Associations: (from type, from id, to type, to id, label's type id; None: the default).
    pub associations: std::collections::BTreeSet<(String, u64, String, u64, Option<u64>)>,
}

struct Shared {
    script: Mutex<Script>,
    objects: BTreeMap<String, Vec<Prop>>,
    observed: Mutex<Observed>,
}

/// A running fake; stops when dropped.
pub struct FakeHubspot {
    pub url: String,
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeHubspot {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeHubspot {
    pub async fn start(script: Script) -> Self {
        let shared = Arc::new(Shared {
            script: Mutex::new(script),
            objects: default_objects(),
            observed: Mutex::new(Observed {
                next_id: 1000,
                ..Default::default()
            }),
        });
        let app = Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&shared));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.ok();
        });
        Self {
            url: format!("http://{addr}"),
            addr,
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

    /// A new day: the daily quota is full again.
    pub fn new_day(&self) {
        self.shared.observed.lock().unwrap().day_count = 0;
    }

    /// Live records of `object`: (id, properties) ordered by id.
    pub fn records(&self, object: &str) -> Vec<(u64, Map<String, Value>)> {
        self.observed(|o| {
            o.records
                .get(object)
                .map(|r| {
                    r.values()
                        .filter(|s| !s.archived)
                        .map(|s| (s.id, s.properties.clone()))
                        .collect()
                })
                .unwrap_or_default()
        })
    }

    /// A live record's property, found by another property's value.
    pub fn property(&self, object: &str, by: &str, value: &str, property: &str) -> Option<String> {
        self.records(object).into_iter().find_map(|(_, p)| {
            (p.get(by).and_then(Value::as_str) == Some(value))
                .then(|| p.get(property).and_then(Value::as_str).map(str::to_string))
                .flatten()
        })
    }

    /// Creates a record directly (as if made in HubSpot's UI); returns its id.
    pub fn seed(&self, object: &str, properties: Value) -> u64 {
        let mut o = self.shared.observed.lock().unwrap();
        let id = o.next_id;
        o.next_id += 1;
        for (k, v) in properties.as_object().cloned().unwrap_or_default() {
            o.set(object, id, &k, v);
        }
        id
    }

    /// Changes a record's property directly (as a rep would in HubSpot's UI).
    pub fn edit(&self, object: &str, id: u64, property: &str, value: Value) {
        let mut o = self.shared.observed.lock().unwrap();
        o.set(object, id, property, value);
    }

    /// Creates a static list directly; returns its id.
    pub fn seed_list(&self, name: &str) -> String {
        let mut o = self.shared.observed.lock().unwrap();
        let id = (o.lists.len() + 1).to_string();
        o.lists
            .insert(id.clone(), (name.to_string(), Default::default()));
        id
    }

    /// The emails of the members of the list named `name`, sorted.
    pub fn list_emails(&self, name: &str) -> Vec<String> {
        self.observed(|o| {
            let Some((_, (_, members))) = o.lists.iter().find(|(_, (n, _))| n == name) else {
                return vec![];
            };
            let mut emails: Vec<String> = members
                .iter()
                .filter_map(|id| {
                    o.records
                        .get("contacts")?
                        .get(id)?
                        .properties
                        .get("email")?
                        .as_str()
                        .map(str::to_string)
                })
                .collect();
            emails.sort();
            emails
        })
    }

    /// Associations from `from` records to `to` records: (from id, to id, label's type id).
    pub fn associations(&self, from: &str, to: &str) -> Vec<(u64, u64, Option<u64>)> {
        self.observed(|o| {
            o.associations
                .iter()
                .filter(|(a, _, b, _, _)| a == from && b == to)
                .map(|(_, f, _, t, l)| (*f, *t, *l))
                .collect()
        })
    }

    /// Pages read by `GET /crm/v3/objects/{object}`.
    pub fn list_calls(&self, object: &str) -> usize {
        let path = format!("/crm/v3/objects/{object}");
        self.observed(|o| o.requests.iter().filter(|r| r.path == path).count())
    }

    /// Batch calls by action (`upsert`, `create`, …).
    pub fn calls(&self, action: &str) -> usize {
        self.observed(|o| {
            o.requests
                .iter()
                .filter(|r| r.path.ends_with(&format!("/batch/{action}")))
                .count()
        })
    }

    /// The largest number of requests that arrived within any `window`.
    pub fn max_requests_in(&self, window: Duration) -> usize {
        self.observed(|o| {
            let times: Vec<Instant> = o.requests.iter().map(|r| r.at).collect();
            let mut best = 0;
            let mut j = 0;
            for i in 0..times.len() {
                while times[i].duration_since(times[j]) >= window {
                    j += 1;
                }
                best = best.max(i - j + 1);
            }
            best
        })
    }
}

fn error_body(status: StatusCode, message: &str, category: &str, extra: Value) -> Response {
    let mut body = json!({
        "status": "error",
        "message": message,
        "correlationId": uuid::Uuid::new_v4().to_string(),
        "category": category,
    });
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    (status, axum::Json(body)).into_response()
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (token, latency, limit, daily) = {
        let s = shared.script.lock().unwrap();
        (s.token.clone(), s.latency, s.limit, s.daily)
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if auth != format!("Bearer {token}") {
        return error_body(
            StatusCode::UNAUTHORIZED,
            "Authentication credentials not found. This API supports OAuth 2.0 authentication and you can find more details at https://developers.hubspot.com/docs/methods/auth/oauth-overview",
            "INVALID_AUTHENTICATION",
            json!({}),
        );
    }
    // Rate limits: the rolling window, then the daily quota.
    let mut rate_headers = vec![];
    {
        let mut o = shared.observed.lock().unwrap();
        let now = Instant::now();
        if let Some((max, interval)) = limit {
            while o
                .window
                .front()
                .is_some_and(|t| now.duration_since(*t) >= interval)
            {
                o.window.pop_front();
            }
            if o.window.len() >= max {
                o.throttled += 1;
                drop(o);
                let mut r = (
                    StatusCode::TOO_MANY_REQUESTS,
                    axum::Json(json!({
                        "status": "error",
                        "message": "You have reached your ten_secondly_rolling limit.",
                        "errorType": "RATE_LIMIT",
                        "correlationId": uuid::Uuid::new_v4().to_string(),
                        "policyName": "TEN_SECONDLY_ROLLING",
                    })),
                )
                    .into_response();
                let h = r.headers_mut();
                h.insert("x-hubspot-ratelimit-max", max.into());
                h.insert("x-hubspot-ratelimit-remaining", 0.into());
                h.insert(
                    "x-hubspot-ratelimit-interval-milliseconds",
                    (interval.as_millis() as u64).into(),
                );
                return r;
            }
            o.window.push_back(now);
            rate_headers.push(("x-hubspot-ratelimit-max", max as u64));
            rate_headers.push((
                "x-hubspot-ratelimit-remaining",
                (max - o.window.len()) as u64,
            ));
            rate_headers.push((
                "x-hubspot-ratelimit-interval-milliseconds",
                interval.as_millis() as u64,
            ));
        }
        if let Some(daily) = daily {
            if o.day_count >= daily {
                o.throttled += 1;
                return (
                    StatusCode::TOO_MANY_REQUESTS,
                    axum::Json(json!({
                        "status": "error",
                        "message": "You have reached your daily limit.",
                        "errorType": "RATE_LIMIT",
                        "correlationId": uuid::Uuid::new_v4().to_string(),
                        "policyName": "DAILY",
                    })),
                )
                    .into_response();
            }
            o.day_count += 1;
            rate_headers.push(("x-hubspot-ratelimit-daily", daily));
            rate_headers.push(("x-hubspot-ratelimit-daily-remaining", daily - o.day_count));
        }
    }
    let mut response = match (
        method.as_str(),
        uri.path()
            .trim_matches('/')
            .split('/')
            .collect::<Vec<_>>()
            .as_slice(),
    ) {
        ("GET", ["crm", "v3", "objects", object]) => {
            list_objects(&shared, object, uri.query().unwrap_or(""))
        }
        (_, ["crm", "v4", "associations", from, to, rest @ ..]) => {
            associations(&shared, &method, from, to, rest, &body)
        }
        _ => route(&shared, &method, uri.path(), &body),
    };
    for (name, value) in rate_headers {
        response.headers_mut().insert(name, value.into());
    }
    response
}

/// `GET /crm/v3/objects/{object}?limit=&after=&properties=&archived=`: live records by id, a page
/// of at most 100 (`limit`, default 10), the properties asked for (null when unset) and
/// `hs_object_id`, and `paging.next.after` while more remain.
fn list_objects(shared: &Shared, object: &str, query: &str) -> Response {
    if !shared.objects.contains_key(object) {
        return error_body(
            StatusCode::BAD_REQUEST,
            &format!("Unable to infer object type from: {object}"),
            "VALIDATION_ERROR",
            json!({}),
        );
    }
    let params: HashMap<String, String> = url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let limit = params
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(10);
    if !(1..=100).contains(&limit) {
        return error_body(
            StatusCode::BAD_REQUEST,
            "limit must be between 1 and 100",
            "VALIDATION_ERROR",
            json!({}),
        );
    }
    let after = params
        .get("after")
        .and_then(|a| a.parse::<u64>().ok())
        .unwrap_or(0);
    let asked: Vec<String> = params
        .get("properties")
        .map(|p| {
            p.split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let mut o = shared.observed.lock().unwrap();
    let live: Vec<(u64, Map<String, Value>)> = o
        .records
        .get(object)
        .map(|r| {
            r.values()
                .filter(|s| !s.archived && s.id > after)
                .map(|s| (s.id, s.properties.clone()))
                .collect()
        })
        .unwrap_or_default();
    let page = &live[..live.len().min(limit)];
    let results: Vec<Value> = page
        .iter()
        .map(|(id, props)| {
            let mut properties = Map::new();
            for name in &asked {
                properties.insert(name.clone(), props.get(name).cloned().unwrap_or(Value::Null));
            }
            properties.insert("hs_object_id".into(), json!(id.to_string()));
            json!({"id": id.to_string(), "properties": properties, "createdAt": "2024-01-15T10:00:00.000Z", "updatedAt": "2024-01-15T10:00:00.000Z", "archived": false})
        })
        .collect();
    let mut body = json!({ "results": results });
    if live.len() > limit
        && let Some((last, _)) = page.last()
    {
        body["paging"] = json!({"next": {"after": last.to_string(), "link": format!("/crm/v3/objects/{object}?after={last}")}});
    }
    o.requests.push(Seen {
        at: Instant::now(),
        path: format!("/crm/v3/objects/{object}"),
        status: 200,
        inputs: 0,
        ids: vec![],
    });
    axum::Json(body).into_response()
}

/// The labels of every pair of types: the default association and one labeled type.
const LABELS: [(Option<&str>, &str, u64); 2] = [
    (None, "HUBSPOT_DEFINED", 1),
    (Some("Billing contact"), "USER_DEFINED", 36),
];

/// CRM associations v4: `GET …/{from}/{to}/labels`, `POST …/batch/associate/default`,
/// `POST …/batch/create` (with a label's type), `POST …/batch/archive` (every association
/// between the pairs; 204). A record that does not exist is an error of the batch (207).
fn associations(
    shared: &Shared,
    method: &Method,
    from: &str,
    to: &str,
    rest: &[&str],
    body: &[u8],
) -> Response {
    if !shared.objects.contains_key(from) || !shared.objects.contains_key(to) {
        return error_body(
            StatusCode::BAD_REQUEST,
            &format!("Unable to infer object type from: {from}/{to}"),
            "VALIDATION_ERROR",
            json!({}),
        );
    }
    let mut o = shared.observed.lock().unwrap();
    o.requests.push(Seen {
        at: Instant::now(),
        path: format!("/crm/v4/associations/{from}/{to}/{}", rest.join("/")),
        status: 200,
        inputs: 0,
        ids: vec![],
    });
    let inputs: Vec<Value> = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("inputs").and_then(Value::as_array).cloned())
        .unwrap_or_default();
    let id_of = |v: Option<&Value>| {
        v.and_then(|v| v.get("id"))
            .map(text)
            .and_then(|s| s.parse::<u64>().ok())
    };
    let live = |o: &Observed, object: &str, id: u64| {
        o.records
            .get(object)
            .and_then(|r| r.get(&id))
            .is_some_and(|r| !r.archived)
    };
    match (method.as_str(), rest) {
        ("GET", ["labels"]) => axum::Json(json!({"results": LABELS.iter().map(|(label, category, id)| json!({"category": category, "typeId": id, "label": label})).collect::<Vec<_>>()})).into_response(),
        ("POST", ["batch", "create"]) | ("POST", ["batch", "associate", "default"]) => {
            let labeled = rest[1] == "create";
            let mut results = vec![];
            let mut errors = vec![];
            for input in &inputs {
                let (Some(f), Some(t)) = (id_of(input.get("from")), id_of(input.get("to"))) else {
                    errors.push(json!({"status": "error", "category": "VALIDATION_ERROR", "message": "missing ids"}));
                    continue;
                };
                if !live(&o, from, f) || !live(&o, to, t) {
                    errors.push(json!({"status": "error", "category": "OBJECT_NOT_FOUND", "message": format!("No {from} with ID {f} or {to} with ID {t} exists")}));
                    continue;
                }
                let type_id = labeled
                    .then(|| input.pointer("/types/0/associationTypeId").and_then(Value::as_u64))
                    .flatten();
                if let Some(id) = type_id
                    && !LABELS.iter().any(|(_, _, known)| *known == id)
                {
                    errors.push(json!({"status": "error", "category": "VALIDATION_ERROR", "message": format!("unknown association type {id}")}));
                    continue;
                }
                o.associations
                    .insert((from.to_string(), f, to.to_string(), t, type_id));
                results.push(json!({"fromObjectTypeId": from, "fromObjectId": f, "toObjectTypeId": to, "toObjectId": t}));
            }
            let mut body = json!({"status": "COMPLETE", "results": results});
            if !errors.is_empty() {
                body["numErrors"] = json!(errors.len());
                body["errors"] = json!(errors);
                return (StatusCode::MULTI_STATUS, axum::Json(body)).into_response();
            }
            (StatusCode::CREATED, axum::Json(body)).into_response()
        }
        ("POST", ["batch", "archive"]) => {
            for input in &inputs {
                let Some(f) = id_of(input.get("from")) else {
                    continue;
                };
                let tos: Vec<u64> = input
                    .get("to")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(|t| id_of(Some(t))).collect())
                    .unwrap_or_default();
                o.associations.retain(|(a, fi, b, ti, _)| {
                    !(a == from && *fi == f && b == to && tos.contains(ti))
                });
            }
            StatusCode::NO_CONTENT.into_response()
        }
        _ => error_body(StatusCode::NOT_FOUND, "not found", "NOT_FOUND", json!({})),
    }
}

/// Counts a properties call; whether it answers an injected fault (and counts that down).
fn take_properties_fault(shared: &Shared) -> bool {
    shared.observed.lock().unwrap().properties_calls += 1;
    let mut script = shared.script.lock().unwrap();
    let fault = script.properties_faults > 0;
    script.properties_faults = script.properties_faults.saturating_sub(1);
    fault
}

fn route(shared: &Shared, method: &Method, path: &str, body: &[u8]) -> Response {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method.as_str(), parts.as_slice()) {
        ("GET", ["crm", "v3", "properties", _]) if take_properties_fault(shared) => error_body(
            StatusCode::BAD_GATEWAY,
            "injected fault",
            "INTERNAL_ERROR",
            json!({}),
        ),
        ("GET", ["crm", "v3", "properties", object]) => match shared.objects.get(*object) {
            Some(props) => {
                let results: Vec<Value> = props
                    .iter()
                    .map(|p| {
                        json!({
                            "name": p.name, "label": p.name, "type": p.kind,
                            "fieldType": if p.kind == "enumeration" { "select" } else { "text" },
                            "hasUniqueValue": p.unique,
                            "calculated": false,
                            "modificationMetadata": {"archivable": true, "readOnlyDefinition": true, "readOnlyValue": p.read_only},
                            "options": p.options.iter().map(|o| json!({"label": o, "value": o, "hidden": false})).collect::<Vec<_>>(),
                        })
                    })
                    .collect();
                axum::Json(json!({ "results": results })).into_response()
            }
            None => error_body(
                StatusCode::BAD_REQUEST,
                &format!("Unable to infer object type from: {object}"),
                "VALIDATION_ERROR",
                json!({}),
            ),
        },
        ("POST", ["crm", "v3", "objects", object, "batch", action]) => {
            let response = batch(shared, object, action, body);
            let status = response.status().as_u16();
            let ids = serde_json::from_slice::<Value>(body)
                .ok()
                .and_then(|v| v.get("inputs").and_then(Value::as_array).cloned())
                .unwrap_or_default()
                .iter()
                .map(|i| {
                    i.get("id")
                        .map(text)
                        .or_else(|| i.pointer("/properties/email").map(text))
                        .unwrap_or_default()
                })
                .collect::<Vec<_>>();
            shared.observed.lock().unwrap().requests.push(Seen {
                at: Instant::now(),
                path: path.to_string(),
                status,
                inputs: ids.len(),
                ids,
            });
            response
        }
        (
            "GET",
            [
                "crm",
                "v3",
                "lists",
                "object-type-id",
                type_id,
                "name",
                name,
            ],
        ) => {
            let name = percent_decode(name);
            let o = shared.observed.lock().unwrap();
            match o.lists.iter().find(|(_, (n, _))| *n == name) {
                Some((id, _)) => axum::Json(json!({"list": {"listId": id, "name": name, "objectTypeId": type_id, "processingType": "MANUAL"}})).into_response(),
                None => error_body(
                    StatusCode::NOT_FOUND,
                    &format!("List does not exist with name {name}."),
                    "OBJECT_NOT_FOUND",
                    json!({}),
                ),
            }
        }
        ("POST", ["crm", "v3", "lists"]) => {
            let request: Value = serde_json::from_slice(body).unwrap_or_default();
            let name = request
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let mut o = shared.observed.lock().unwrap();
            if name.is_empty() || o.lists.values().any(|(n, _)| *n == name) {
                return error_body(
                    StatusCode::BAD_REQUEST,
                    "A list with this name already exists",
                    "VALIDATION_ERROR",
                    json!({}),
                );
            }
            let id = (o.lists.len() + 1).to_string();
            o.lists
                .insert(id.clone(), (name.clone(), Default::default()));
            axum::Json(json!({"list": {"listId": id, "name": name, "objectTypeId": request.get("objectTypeId"), "processingType": request.get("processingType")}})).into_response()
        }
        ("PUT", ["crm", "v3", "lists", id, "memberships", action]) => {
            let ids: Vec<String> = serde_json::from_slice(body).unwrap_or_default();
            let mut o = shared.observed.lock().unwrap();
            let existing: Vec<bool> = ids
                .iter()
                .map(|i| {
                    i.parse::<u64>().ok().is_some_and(|n| {
                        o.find("contacts", "hs_object_id", &n.to_string()).is_some()
                    })
                })
                .collect();
            let Some((_, members)) = o.lists.get_mut(*id) else {
                return error_body(
                    StatusCode::NOT_FOUND,
                    &format!("List {id} does not exist."),
                    "OBJECT_NOT_FOUND",
                    json!({}),
                );
            };
            let (mut changed, mut missing) = (vec![], vec![]);
            for (i, ok) in ids.iter().zip(existing) {
                let n: u64 = i.parse().unwrap_or(0);
                match (*action, ok) {
                    (_, false) => missing.push(i.clone()),
                    ("add", true) => {
                        if members.insert(n) {
                            changed.push(i.clone());
                        }
                    }
                    (_, true) => {
                        if members.remove(&n) {
                            changed.push(i.clone());
                        }
                    }
                }
            }
            let body = if *action == "add" {
                json!({"recordIdsMissing": missing, "recordsIdsAdded": changed})
            } else {
                json!({"recordIdsMissing": missing, "recordIdsRemoved": changed})
            };
            axum::Json(body).into_response()
        }
        _ => error_body(
            StatusCode::NOT_FOUND,
            &format!("no route for {method} {path}"),
            "OBJECT_NOT_FOUND",
            json!({}),
        ),
    }
}

impl Observed {
    /// Sets a property of a record (creating the record), keeping the lookup index current.
    fn set(&mut self, object: &str, id: u64, property: &str, value: Value) {
        let record = self
            .records
            .entry(object.to_string())
            .or_default()
            .entry(id)
            .or_insert_with(|| Stored {
                id,
                properties: Map::from_iter([("hs_object_id".to_string(), json!(id.to_string()))]),
                archived: false,
            });
        let old = record
            .properties
            .insert(property.to_string(), value.clone());
        let index = self
            .index
            .entry((object.to_string(), property.to_string()))
            .or_default();
        if let Some(old) = old.as_ref().and_then(Value::as_str) {
            index.remove(&norm(property, old));
        }
        if let Some(v) = value.as_str() {
            index.insert(norm(property, v), id);
        }
    }

    fn archive(&mut self, object: &str, id: u64) {
        let Some(record) = self.records.get_mut(object).and_then(|r| r.get_mut(&id)) else {
            return;
        };
        record.archived = true;
        for (k, v) in &record.properties {
            if let (Some(index), Some(v)) = (
                self.index.get_mut(&(object.to_string(), k.clone())),
                v.as_str(),
            ) {
                index.remove(&norm(k, v));
            }
        }
    }

    /// A live record by (property, value).
    fn find(&self, object: &str, property: &str, value: &str) -> Option<u64> {
        if property == "hs_object_id" {
            let id = value.parse::<u64>().ok()?;
            let records = self.records.get(object)?;
            return records.get(&id).filter(|r| !r.archived).map(|r| r.id);
        }
        self.index
            .get(&(object.to_string(), property.to_string()))?
            .get(&norm(property, value))
            .copied()
    }
}

/// `%XX` escapes of a path segment.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn norm(property: &str, value: &str) -> String {
    if property == "email" {
        value.to_lowercase()
    } else {
        value.to_string()
    }
}

/// One input's problem.
struct Invalid {
    code: &'static str,
    message: String,
    property: String,
}

fn validate(props: &[Prop], properties: &Map<String, Value>) -> Option<Invalid> {
    for (name, value) in properties {
        let invalid = |code, message: String| {
            Some(Invalid {
                code,
                message,
                property: name.clone(),
            })
        };
        let Some(p) = props.iter().find(|p| p.name == name) else {
            return invalid(
                "PROPERTY_DOESNT_EXIST",
                format!("Property \"{name}\" does not exist"),
            );
        };
        if p.read_only {
            return invalid(
                "READ_ONLY_VALUE",
                format!("\"{name}\" is a read only property; its value cannot be set."),
            );
        }
        let Some(v) = value.as_str() else {
            return invalid(
                "INVALID_TYPE",
                format!("Property \"{name}\" must be a string, got {value}"),
            );
        };
        if v.is_empty() {
            continue;
        }
        let bad = match p.kind {
            "number" => v.parse::<f64>().is_err().then_some("INVALID_INTEGER"),
            "bool" => (!matches!(v, "true" | "false")).then_some("INVALID_BOOLEAN"),
            "date" => {
                (!v.parse::<i64>().is_ok_and(|ms| ms % 86_400_000 == 0)).then_some("INVALID_DATE")
            }
            "datetime" => (v.parse::<i64>().is_err()
                && chrono::DateTime::parse_from_rfc3339(v).is_err())
            .then_some("INVALID_DATETIME"),
            "enumeration" => (!p.options.contains(&v)).then_some("INVALID_OPTION"),
            _ if name == "email" => (!v.contains('@')).then_some("INVALID_EMAIL"),
            _ => None,
        };
        if let Some(code) = bad {
            let message = match code {
                "INVALID_EMAIL" => format!("Property value \"{v}\" is not a valid email"),
                "INVALID_OPTION" => format!(
                    "{v} was not one of the allowed options: [{}]",
                    p.options.join(", ")
                ),
                "INVALID_DATE" => {
                    format!("{v} is at {v} which isn't midnight in UTC (property \"{name}\")")
                }
                _ => format!("Property \"{name}\" value \"{v}\" is not valid ({code})"),
            };
            return invalid(code, message);
        }
    }
    None
}

fn batch(shared: &Shared, object: &str, action: &str, body: &[u8]) -> Response {
    let Some(props) = shared.objects.get(object) else {
        return error_body(
            StatusCode::BAD_REQUEST,
            &format!("Unable to infer object type from: {object}"),
            "VALIDATION_ERROR",
            json!({}),
        );
    };
    let (fault, merged, missing_scope) = {
        let mut s = shared.script.lock().unwrap();
        (s.faults.pop_front(), s.merged.clone(), s.missing_scope)
    };
    match fault {
        Some(Fault::Status(status, retry_after)) => {
            let mut r = error_body(
                StatusCode::from_u16(status).unwrap(),
                "injected fault",
                "INTERNAL_ERROR",
                json!({}),
            );
            if let Some(s) = retry_after {
                r.headers_mut().insert("retry-after", s.into());
            }
            return r;
        }
        Some(Fault::SilentEmpty) => {
            return axum::Json(json!({"status": "COMPLETE", "results": []})).into_response();
        }
        None => {}
    }
    if missing_scope && action != "read" {
        return error_body(
            StatusCode::FORBIDDEN,
            "This app hasn't been granted all required scopes to make this call. Read more about required scopes here: https://developers.hubspot.com/scopes.",
            "MISSING_SCOPES",
            json!({"errors": [{"message": "One or more of the following scopes are required.", "context": {"requiredGranularScopes": [format!("crm.objects.{object}.write")]}}], "links": {"scopes": "https://developers.hubspot.com/scopes"}}),
        );
    }
    let Ok(request) = serde_json::from_slice::<Value>(body) else {
        return error_body(
            StatusCode::BAD_REQUEST,
            "Invalid input JSON on line 1",
            "VALIDATION_ERROR",
            json!({}),
        );
    };
    let inputs = request
        .get("inputs")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if inputs.len() > 100 {
        return error_body(
            StatusCode::BAD_REQUEST,
            "Batch input size should be less than or equal to 100",
            "VALIDATION_ERROR",
            json!({}),
        );
    }
    // The id property: inputs of update/upsert carry their own, read names it once.
    let id_property = |input: &Value| -> Option<String> {
        input
            .get("idProperty")
            .or_else(|| request.get("idProperty"))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    if action != "create" {
        let mut seen = HashMap::new();
        let mut dups = vec![];
        for input in &inputs {
            let id = input.get("id").map(text).unwrap_or_default();
            let key = norm(&id_property(input).unwrap_or_default(), &id);
            if seen.insert(key, ()).is_some() {
                dups.push(id);
            }
        }
        if !dups.is_empty() {
            return error_body(
                StatusCode::BAD_REQUEST,
                &format!(
                    "Duplicate IDs found in batch input: [{}]. IDs must be unique",
                    dups.join(", ")
                ),
                "VALIDATION_ERROR",
                json!({"context": {"ids": dups}}),
            );
        }
    }
    for input in &inputs {
        if let Some(p) = id_property(input) {
            let ok = p == "hs_object_id"
                || (object == "contacts" && p == "email")
                || props.iter().any(|q| q.name == p && q.unique);
            if !ok {
                return error_body(
                    StatusCode::BAD_REQUEST,
                    &format!("{p} is not a unique property and cannot be used as an idProperty"),
                    "VALIDATION_ERROR",
                    json!({}),
                );
            }
        }
    }
    let mut o = shared.observed.lock().unwrap();
    let traced = !inputs.is_empty() && inputs.iter().all(|i| i.get("objectWriteTraceId").is_some());
    if action == "archive" {
        for input in &inputs {
            if let Some(id) = input
                .get("id")
                .map(text)
                .and_then(|s| s.parse::<u64>().ok())
            {
                o.archive(object, id);
            }
        }
        return StatusCode::NO_CONTENT.into_response();
    }
    let find = |o: &Observed, property: &str, value: &str| o.find(object, property, value);
    if action == "read" {
        let property = id_property(&Value::Null).unwrap_or_else(|| "hs_object_id".into());
        let mut results = vec![];
        let mut missing = vec![];
        for input in &inputs {
            let id = input.get("id").map(text).unwrap_or_default();
            match find(&o, &property, &id) {
                Some(rid) => {
                    let r = &o.records[object][&rid];
                    // The id property and the properties asked for (null when unset).
                    let mut properties = Map::new();
                    let asked = request
                        .get("properties")
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default();
                    for name in asked
                        .iter()
                        .filter_map(Value::as_str)
                        .chain([property.as_str()])
                    {
                        properties.insert(
                            name.to_string(),
                            r.properties.get(name).cloned().unwrap_or(Value::Null),
                        );
                    }
                    properties.insert("hs_object_id".into(), json!(rid.to_string()));
                    results.push(
                        json!({"id": rid.to_string(), "properties": properties, "archived": false}),
                    );
                }
                None => missing.push(id),
            }
        }
        let mut body = json!({"status": "COMPLETE", "results": results, "startedAt": "2024-01-15T10:00:00.000Z", "completedAt": "2024-01-15T10:00:00.100Z"});
        if !missing.is_empty() {
            body["numErrors"] = json!(1);
            body["errors"] = json!([{"status": "error", "category": "OBJECT_NOT_FOUND", "message": format!("Could not get some {} objects, they may be deleted or not exist. Check that ids are valid.", object.trim_end_matches('s').to_uppercase()), "context": {"ids": missing}}]);
            return (StatusCode::MULTI_STATUS, axum::Json(body)).into_response();
        }
        return axum::Json(body).into_response();
    }
    // Validate every input first.
    let mut errors: Vec<(usize, Invalid)> = vec![];
    for (i, input) in inputs.iter().enumerate() {
        let properties = input
            .get("properties")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        if let Some(invalid) = validate(props, &properties) {
            errors.push((i, invalid));
        }
    }
    if !errors.is_empty() && !traced {
        let list: Vec<Value> = errors.iter().map(|(_, e)| json!({"isValid": false, "message": e.message, "error": e.code, "name": e.property})).collect();
        return error_body(
            StatusCode::BAD_REQUEST,
            &format!("Property values were not valid: {}", Value::Array(list)),
            "VALIDATION_ERROR",
            json!({"errors": errors.iter().map(|(_, e)| json!({"message": e.message, "code": e.code, "context": {"propertyName": [e.property]}})).collect::<Vec<_>>()}),
        );
    }
    if action == "create" {
        // A conflict on a unique property (email for contacts) fails the whole batch.
        for (i, input) in inputs.iter().enumerate() {
            if errors.iter().any(|(j, _)| *j == i) {
                continue;
            }
            let properties = input.get("properties").and_then(Value::as_object);
            let keys = props
                .iter()
                .filter(|p| p.unique || (object == "contacts" && p.name == "email"))
                .map(|p| p.name);
            for key in keys {
                if let Some(v) = properties.and_then(|p| p.get(key)).and_then(Value::as_str)
                    && let Some(existing) = find(&o, key, v)
                {
                    let noun = object.trim_end_matches('s');
                    let mut noun = noun.to_string();
                    noun[..1].make_ascii_uppercase();
                    return error_body(
                        StatusCode::CONFLICT,
                        &format!("{noun} already exists. Existing ID: {existing}"),
                        "CONFLICT",
                        json!({}),
                    );
                }
            }
        }
    }
    let mut results = vec![];
    let mut error_items = vec![];
    for (i, e) in &errors {
        error_items.push(json!({"status": "error", "category": "VALIDATION_ERROR", "message": e.message, "errors": [{"message": e.message, "code": e.code, "context": {"propertyName": [e.property]}}], "context": {"objectWriteTraceId": [inputs[*i].get("objectWriteTraceId").map(text).unwrap_or_default()]}}));
    }
    let mut not_found = vec![];
    let mut not_found_traces = vec![];
    for (i, input) in inputs.iter().enumerate() {
        if errors.iter().any(|(j, _)| *j == i) {
            continue;
        }
        let properties = input
            .get("properties")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let existing = match action {
            "create" => None,
            _ => {
                let id = input.get("id").map(text).unwrap_or_default();
                let property = id_property(input).unwrap_or_else(|| "hs_object_id".into());
                find(&o, &property, &id)
            }
        };
        let (rid, new) = match (existing, action) {
            (Some(rid), _) => (rid, false),
            (None, "update") => {
                not_found.push(input.get("id").map(text).unwrap_or_default());
                not_found_traces.push(
                    input
                        .get("objectWriteTraceId")
                        .map(text)
                        .unwrap_or_default(),
                );
                continue;
            }
            (None, _) => {
                let rid = o.next_id;
                o.next_id += 1;
                (rid, true)
            }
        };
        if new {
            o.set(object, rid, "hs_object_id", json!(rid.to_string()));
        }
        for (k, v) in properties {
            let v = match (k.as_str(), v) {
                ("email", Value::String(s)) => Value::String(s.to_lowercase()),
                (_, v) => v,
            };
            o.set(object, rid, &k, v);
        }
        let record = &o.records[object][&rid];
        let key_value = record
            .properties
            .get("email")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if merged.iter().any(|m| norm("email", m) == key_value) {
            continue;
        }
        results.push(json!({
            "id": rid.to_string(),
            "properties": record.properties,
            "createdAt": "2024-01-15T10:00:00.000Z",
            "updatedAt": "2024-01-15T10:00:00.100Z",
            "archived": false,
            "new": new,
        }));
    }
    if !not_found.is_empty() {
        error_items.push(json!({"status": "error", "category": "OBJECT_NOT_FOUND", "message": format!("Could not get some {} objects, they may be deleted or not exist. Check that ids are valid.", object.trim_end_matches('s').to_uppercase()), "context": {"ids": not_found, "objectWriteTraceId": not_found_traces}}));
    }
    results.shuffle(&mut rand::rng());
    let mut body = json!({
        "status": "COMPLETE",
        "results": results,
        "requestedAt": "2024-01-15T10:00:00.000Z",
        "startedAt": "2024-01-15T10:00:00.000Z",
        "completedAt": "2024-01-15T10:00:00.100Z",
    });
    if !error_items.is_empty() {
        body["numErrors"] = json!(error_items.len());
        body["errors"] = Value::Array(error_items);
        return (StatusCode::MULTI_STATUS, axum::Json(body)).into_response();
    }
    let status = if action == "create" {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    (status, axum::Json(body)).into_response()
}
