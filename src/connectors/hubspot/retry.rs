//! `HubspotRetryLogic`: what HubSpot's answers mean for the records of a batch call.
//!
//! | answer | meaning |
//! | --- | --- |
//! | 200 / 201 with `results` | records found in `results` (matched by their key, as `results` is unordered) are accepted with their record id; a record in neither `results` nor `errors` (merged into another record) is rejected `MISSING_FROM_RESULTS` |
//! | 2xx with no `results` and no `errors` | HubSpot did nothing it reports: the call is retried |
//! | 204 (archive) | every record archived |
//! | 207 with `numErrors` / `errors` | records named by `context.objectWriteTraceId` (or `context.ids`) are rejected with the error's code, the rest handled as for 200 |
//! | 400, 409 for a batch | split in halves until the record at fault is alone (HubSpot does not say which one); alone, it is rejected (a 409 `CONFLICT` carries the existing record id) |
//! | 429 `TEN_SECONDLY_ROLLING` / `SECONDLY` | slow down and retry (not counted as a failure) |
//! | 429 `DAILY` | the account's daily quota is used up: the statement stops, acknowledged work is committed |
//! | 401 | the token is rejected: the statement stops, nothing is retried |
//! | 403 | a missing scope: the statement stops, naming the scopes HubSpot asked for |
//! | 423, 477, 5xx, timeouts | retried with backoff (423 waits at least 2 s; 477 honours `Retry-After`) |

use std::collections::HashMap;
use std::time::Duration;

use http::HeaderMap;
use serde::Deserialize;
use serde_json::Value;

use super::config::normalize;
use crate::contract::Op;
use crate::delivery::retry::{RateWindow, excerpt, value_text};
use crate::delivery::{Batch, HttpResponse, Rejection, ResponseClass};

/// Longest excerpt of a message kept in a reject.
const MESSAGE_EXCERPT: usize = 400;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ErrorBody {
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    category: Option<String>,
    #[serde(default)]
    policy_name: Option<String>,
    #[serde(default)]
    errors: Vec<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct BatchBody {
    #[serde(default)]
    results: Option<Vec<Value>>,
    #[serde(default)]
    errors: Vec<BatchError>,
}

#[derive(Debug, Deserialize)]
struct BatchError {
    #[serde(default)]
    category: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    errors: Vec<Value>,
    #[serde(default)]
    context: HashMap<String, Vec<String>>,
}

/// Reads HubSpot's answers to batch calls.
pub struct HubspotRetryLogic;

impl HubspotRetryLogic {
    /// `key` is the property records are matched by (`None` for archive calls).
    pub fn classify(batch: &Batch, response: &HttpResponse, key: Option<&str>) -> ResponseClass {
        if let Some(class) = Self::classify_status(response) {
            return class;
        }
        let status = response.status.as_u16();
        let n = batch.records.len();
        if status == 204 || (batch.op == Op::Delete && response.status.is_success()) {
            return ResponseClass::Accepted { ids: vec![None; n] };
        }
        if response.status.is_success() {
            let Ok(body) = serde_json::from_slice::<BatchBody>(&response.body) else {
                return ResponseClass::Retry {
                    reason: format!("{status} with a body that is not a batch response"),
                    retry_after: None,
                    throttled: false,
                };
            };
            let results = body.results.unwrap_or_default();
            if results.is_empty() && body.errors.is_empty() {
                return ResponseClass::Retry {
                    reason: format!("{status} with neither results nor errors"),
                    retry_after: None,
                    throttled: false,
                };
            }
            return correlate(batch, &results, &body.errors, key);
        }
        let why = rejection(response);
        match status {
            400 | 409 => ResponseClass::Split(why),
            404 => ResponseClass::Fatal(format!(
                "HubSpot answered 404 ({}); check the object type and base_url",
                why.message
            )),
            _ => ResponseClass::RejectAll(why),
        }
    }

    /// What a status says on its own, for every kind of call (`None`: read the body).
    pub fn classify_status(response: &HttpResponse) -> Option<ResponseClass> {
        let status = response.status.as_u16();
        let retry = |reason: String, retry_after: Option<Duration>, throttled: bool| {
            Some(ResponseClass::Retry {
                reason,
                retry_after,
                throttled,
            })
        };
        match status {
            429 => {
                let body: ErrorBody = serde_json::from_slice(&response.body).unwrap_or_default();
                let policy = body.policy_name.unwrap_or_default().to_uppercase();
                let message = body.message.unwrap_or_default();
                if policy == "DAILY" || message.to_lowercase().contains("daily limit") {
                    return Some(ResponseClass::Fatal(
                        "HubSpot's daily API limit for this account is used up (429 DAILY). Records acknowledged so far are committed; run the sync again after the limit resets at midnight in the account's time zone and it sends the rest".into(),
                    ));
                }
                let wait = match policy.as_str() {
                    "SECONDLY" => Some(Duration::from_secs(1)),
                    _ => None,
                };
                retry(
                    format!(
                        "429 {}: {message}",
                        if policy.is_empty() {
                            "RATE_LIMIT"
                        } else {
                            &policy
                        }
                    ),
                    wait,
                    true,
                )
            }
            401 => {
                let body: ErrorBody = serde_json::from_slice(&response.body).unwrap_or_default();
                Some(ResponseClass::Unauthorized(format!(
                    "HubSpot rejected the token ({}: {}); check the connection's token option",
                    body.category
                        .unwrap_or_else(|| "INVALID_AUTHENTICATION".into()),
                    excerpt(&body.message.unwrap_or_default(), MESSAGE_EXCERPT)
                )))
            }
            403 => {
                let body: ErrorBody = serde_json::from_slice(&response.body).unwrap_or_default();
                let scopes: Vec<String> = body
                    .errors
                    .iter()
                    .filter_map(|e| e.pointer("/context/requiredGranularScopes"))
                    .filter_map(Value::as_array)
                    .flatten()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect();
                Some(ResponseClass::Fatal(if scopes.is_empty() {
                    format!(
                        "HubSpot refused the call (403 {}: {}); check the private app's scopes",
                        body.category.unwrap_or_default(),
                        excerpt(&body.message.unwrap_or_default(), MESSAGE_EXCERPT)
                    )
                } else {
                    format!(
                        "the private app lacks the scopes this sync needs: grant {} in HubSpot (Settings → Integrations → Private apps)",
                        scopes.join(", ")
                    )
                }))
            }
            423 => retry(
                "423 Locked".into(),
                Some(
                    crate::delivery::retry::retry_after(&response.headers)
                        .unwrap_or(Duration::from_secs(2))
                        .max(Duration::from_secs(2)),
                ),
                false,
            ),
            408 | 477 | 500..=599 => retry(
                format!("{status}: {}", summary(response)),
                crate::delivery::retry::retry_after(&response.headers),
                false,
            ),
            _ => None,
        }
    }
}

/// Settles each record of `batch` from a 2xx body: accepted when its key is in `results`,
/// rejected when an error names it, rejected as missing otherwise.
fn correlate(
    batch: &Batch,
    results: &[Value],
    errors: &[BatchError],
    key: Option<&str>,
) -> ResponseClass {
    let n = batch.records.len();
    let mut rejected: Vec<Option<Rejection>> = vec![None; n];
    let index_of_key: HashMap<String, usize> = match key {
        Some(k) => batch
            .records
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.key.as_deref().map(|v| (normalize(k, v), i)))
            .collect(),
        None => HashMap::new(),
    };
    for error in errors {
        let why = Rejection {
            code: error
                .errors
                .iter()
                .find_map(|e| e.get("code").and_then(Value::as_str))
                .or(error.category.as_deref())
                .unwrap_or("VALIDATION_ERROR")
                .to_string(),
            message: excerpt(error.message.as_deref().unwrap_or(""), MESSAGE_EXCERPT),
        };
        let traced = error.context.get("objectWriteTraceId");
        let indexes: Vec<usize> = match traced {
            Some(ids) => ids.iter().filter_map(|t| t.parse().ok()).collect(),
            None => error
                .context
                .get("ids")
                .into_iter()
                .flatten()
                .filter_map(|v| key.and_then(|k| index_of_key.get(&normalize(k, v)).copied()))
                .collect(),
        };
        for i in indexes {
            if i < n {
                rejected[i] = Some(why.clone());
            }
        }
    }
    let mut ids: Vec<Option<String>> = vec![None; n];
    let mut found = vec![false; n];
    for result in results {
        let id = result.get("id").map(value_text);
        let value = match key {
            Some("hs_object_id") => id.clone(),
            Some(k) => result.pointer(&format!("/properties/{k}")).map(value_text),
            None => None,
        };
        if let Some(i) = value
            .zip(key)
            .and_then(|(v, k)| index_of_key.get(&normalize(k, &v)).copied())
        {
            found[i] = true;
            ids[i] = id;
        }
    }
    let mut missing = vec![];
    for i in 0..n {
        if rejected[i].is_none() && !found[i] {
            missing.push((
                i,
                Rejection {
                    code: "MISSING_FROM_RESULTS".into(),
                    message: "HubSpot answered without a result or an error for this record (it may have been merged into another record); it is sent again next run".into(),
                },
            ));
        }
    }
    let rejected: Vec<(usize, Rejection)> = rejected
        .into_iter()
        .enumerate()
        .filter_map(|(i, r)| r.map(|r| (i, r)))
        .chain(missing)
        .collect();
    if rejected.is_empty() {
        ResponseClass::Accepted { ids }
    } else {
        ResponseClass::Partial {
            retry: vec![],
            rejected,
            ids,
        }
    }
}

/// `(record id, value of property)` of every result of a batch answer.
pub fn result_ids(body: &[u8], property: &str) -> Vec<(String, Option<String>)> {
    let body: BatchBody = serde_json::from_slice(body).unwrap_or_default();
    body.results
        .unwrap_or_default()
        .iter()
        .filter_map(|r| {
            let id = r.get("id").map(value_text)?;
            let value = match property {
                "hs_object_id" => Some(id.clone()),
                p => r.pointer(&format!("/properties/{p}")).map(value_text),
            };
            Some((id, value))
        })
        .collect()
}

/// HubSpot's rolling window from `X-HubSpot-RateLimit-Remaining`, `-Max` and
/// `-Interval-Milliseconds`: when nothing remains, a slot frees in about `interval / max`.
pub fn rate_window(headers: &HeaderMap) -> Option<RateWindow> {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    let remaining = get("x-hubspot-ratelimit-remaining")?;
    let interval = get("x-hubspot-ratelimit-interval-milliseconds").unwrap_or(10_000.0);
    let max = get("x-hubspot-ratelimit-max").unwrap_or(100.0).max(1.0);
    Some(RateWindow {
        remaining: remaining.max(0.0) as u64,
        reset_in: crate::delivery::retry::server_seconds((interval / max / 1000.0).min(60.0))
            .unwrap_or(Duration::ZERO),
    })
}

/// A non-2xx answer as one rejection: the first per-property code, else the category.
fn rejection(response: &HttpResponse) -> Rejection {
    let body: ErrorBody = serde_json::from_slice(&response.body).unwrap_or_default();
    let code = body
        .errors
        .iter()
        .find_map(|e| e.get("code").and_then(Value::as_str).map(str::to_string))
        .or(body.category)
        .unwrap_or_else(|| format!("http_{}", response.status.as_u16()));
    Rejection {
        code,
        message: excerpt(
            &body.message.unwrap_or_else(|| summary(response)),
            MESSAGE_EXCERPT,
        ),
    }
}

/// The status and HubSpot's message (or the start of the body), for errors.
/// HubSpot's error category in an error answer (`VALIDATION_ERROR`, `MISSING_SCOPES`, …).
pub fn error_code(response: &HttpResponse) -> Option<String> {
    serde_json::from_slice::<ErrorBody>(&response.body)
        .ok()?
        .category
}

pub fn summary(response: &HttpResponse) -> String {
    let body: ErrorBody = serde_json::from_slice(&response.body).unwrap_or_default();
    let text = body
        .message
        .unwrap_or_else(|| String::from_utf8_lossy(&response.body).trim().to_string());
    format!(
        "{} {}",
        response.status.as_u16(),
        excerpt(&text, MESSAGE_EXCERPT)
    )
}
