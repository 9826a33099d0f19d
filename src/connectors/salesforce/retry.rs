//! `SalesforceRetryLogic`: what Salesforce's answers mean (§1.2–1.3 of the API notes).
//!
//! | answer | meaning |
//! | --- | --- |
//! | 200 with a result array | one result per record, in request order: `success` accepts it with its Id; a transient code (`UNABLE_TO_LOCK_ROW`, `ALL_OR_NONE_OPERATION_ROLLED_BACK`) retries that record alone; any other code rejects it with the code, message and fields; `ENTITY_IS_DELETED` on a delete is done |
//! | 401 `INVALID_SESSION_ID` | the session expired: a new token is fetched once and the call sent again |
//! | 403 `REQUEST_LIMIT_EXCEEDED` `TotalRequests` | the org's daily allocation is used up: the statement stops, acknowledged work is committed |
//! | 403 `REQUEST_LIMIT_EXCEEDED` `ConcurrentPerOrgLongTxn`, 500, 502, 503, timeouts | retried with backoff |
//! | other 403, 404 | the statement stops (permissions, object or API version) |
//! | 400 with an error array | the request as a whole is refused: each record is rejected with the code |
//!
//! Salesforce sends no 429 and no `Retry-After`; `Sforce-Limit-Info: api-usage=n/m` on every
//! answer is the quota (read by the connection, which stops before `max_api_usage_pct`).

use serde::Deserialize;

use crate::contract::Op;
use crate::delivery::retry::excerpt;
use crate::delivery::{Batch, HttpResponse, Rejection, ResponseClass};

/// Longest excerpt of a message kept in a reject or an error.
pub const MESSAGE_EXCERPT: usize = 400;

/// Per-record codes that succeed when tried again.
pub const TRANSIENT: &[&str] = &[
    "UNABLE_TO_LOCK_ROW",
    "ALL_OR_NONE_OPERATION_ROLLED_BACK",
    "SERVER_UNAVAILABLE",
    "REQUEST_LIMIT_EXCEEDED",
];

/// One error, request-level (`errorCode`) or per record (`statusCode`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SfError {
    #[serde(default, alias = "statusCode")]
    pub error_code: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub fields: Vec<String>,
}

impl SfError {
    pub fn code(&self) -> &str {
        self.error_code.as_deref().unwrap_or("UNKNOWN_ERROR")
    }

    pub fn rejection(&self) -> Rejection {
        let mut message = excerpt(self.message.as_deref().unwrap_or(""), MESSAGE_EXCERPT);
        if !self.fields.is_empty() {
            message.push_str(&format!(" (fields: {})", self.fields.join(", ")));
        }
        Rejection {
            code: self.code().to_string(),
            message,
        }
    }
}

/// One element of a collection call's answer.
#[derive(Debug, Deserialize)]
struct SaveResult {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    success: bool,
    #[serde(default)]
    errors: Vec<SfError>,
}

/// `api-usage=n/m` of `Sforce-Limit-Info`: (used, allocation).
pub fn api_usage(headers: &http::HeaderMap) -> Option<(u64, u64)> {
    let value = headers.get("sforce-limit-info")?.to_str().ok()?;
    value.split(';').find_map(|part| {
        let (name, usage) = part.trim().split_once('=')?;
        if name.trim() != "api-usage" {
            return None;
        }
        let (used, limit) = usage.trim().split_once('/')?;
        Some((used.trim().parse().ok()?, limit.trim().parse().ok()?))
    })
}

/// The top-level error array of a refused request (empty when the body is something else).
pub fn errors(response: &HttpResponse) -> Vec<SfError> {
    serde_json::from_slice::<Vec<SfError>>(&response.body).unwrap_or_default()
}

/// Reads Salesforce's answers to sObject Collections calls.
pub struct SalesforceRetryLogic;

impl SalesforceRetryLogic {
    pub fn classify(batch: &Batch, response: &HttpResponse) -> ResponseClass {
        if let Some(class) = Self::classify_status(response) {
            return class;
        }
        let status = response.status.as_u16();
        if response.status.is_success() {
            let Ok(results) = serde_json::from_slice::<Vec<SaveResult>>(&response.body) else {
                return ResponseClass::Retry {
                    reason: format!("{status} with a body that is not a result array"),
                    retry_after: None,
                    throttled: false,
                };
            };
            return correlate(batch, results);
        }
        let errors = errors(response);
        let why = errors.first().map(SfError::rejection).unwrap_or(Rejection {
            code: format!("http_{status}"),
            message: summary(response),
        });
        match status {
            404 => ResponseClass::Fatal(format!(
                "Salesforce answered 404 ({}: {}); check the object name and api_version",
                why.code, why.message
            )),
            _ => ResponseClass::RejectAll(why),
        }
    }

    /// What a status says on its own, for every kind of call (`None`: read the body).
    pub fn classify_status(response: &HttpResponse) -> Option<ResponseClass> {
        let status = response.status.as_u16();
        let retry = |reason: String| {
            Some(ResponseClass::Retry {
                reason,
                retry_after: None,
                throttled: false,
            })
        };
        match status {
            401 => Some(ResponseClass::Unauthorized(summary(response))),
            403 => {
                let errors = errors(response);
                let limit = errors.iter().find(|e| e.code() == "REQUEST_LIMIT_EXCEEDED");
                match limit {
                    Some(e) if e.message.as_deref().unwrap_or("").contains("ConcurrentPerOrgLongTxn") => {
                        retry("403 REQUEST_LIMIT_EXCEEDED (ConcurrentPerOrgLongTxn): too many long-running requests in the org".into())
                    }
                    Some(e) => Some(ResponseClass::Fatal(format!(
                        "the org's API request allocation is used up (403 REQUEST_LIMIT_EXCEEDED: {}). Records acknowledged so far are committed; run the sync again when the rolling 24-hour window frees requests and it sends the rest",
                        excerpt(e.message.as_deref().unwrap_or(""), MESSAGE_EXCERPT)
                    ))),
                    None => Some(ResponseClass::Fatal(format!(
                        "Salesforce refused the call ({}); check the integration user's permissions on this object",
                        summary(response)
                    ))),
                }
            }
            408 | 420 | 429 | 500..=599 => retry(summary(response)),
            _ => None,
        }
    }
}

/// Settles each record from a result array in request order.
fn correlate(batch: &Batch, results: Vec<SaveResult>) -> ResponseClass {
    let n = batch.records.len();
    if results.len() != n {
        return ResponseClass::Retry {
            reason: format!("{} results for {n} records", results.len()),
            retry_after: None,
            throttled: false,
        };
    }
    let mut retry = vec![];
    let mut rejected = vec![];
    let mut ids = Vec::with_capacity(n);
    for (i, result) in results.into_iter().enumerate() {
        let error = result.errors.first().cloned().unwrap_or_default();
        let deleted_already = batch.op == Op::Delete && error.code() == "ENTITY_IS_DELETED";
        if !result.success && !deleted_already {
            if TRANSIENT.contains(&error.code()) {
                retry.push(i);
            } else {
                rejected.push((i, error.rejection()));
            }
        }
        ids.push(result.id);
    }
    if retry.is_empty() && rejected.is_empty() {
        ResponseClass::Accepted { ids }
    } else {
        ResponseClass::Partial {
            retry,
            rejected,
            ids,
        }
    }
}

/// `sf__Error` of a Bulk failed result: `CODE:message:fields --`.
pub fn bulk_error(text: &str) -> SfError {
    let text = text.trim().trim_end_matches("--").trim_end();
    let (code, rest) = text.split_once(':').unwrap_or((text, ""));
    let (message, fields) = match rest.rsplit_once(':') {
        Some((m, f)) if !f.contains(' ') => (m, f),
        _ => (rest, ""),
    };
    SfError {
        error_code: Some(code.trim().to_string()),
        message: Some(message.trim().to_string()),
        fields: fields
            .split(',')
            .map(str::trim)
            .filter(|f| !f.is_empty())
            .map(str::to_string)
            .collect(),
    }
}

/// The status and Salesforce's first error (or the start of the body), for errors.
/// Salesforce's `errorCode` of the first error in an error answer.
pub fn error_code(response: &HttpResponse) -> Option<String> {
    errors(response).first()?.error_code.clone()
}

pub fn summary(response: &HttpResponse) -> String {
    let text = match errors(response).first() {
        Some(e) => format!(
            "{}: {}",
            e.code(),
            excerpt(e.message.as_deref().unwrap_or(""), MESSAGE_EXCERPT)
        ),
        None => excerpt(
            String::from_utf8_lossy(&response.body).trim(),
            MESSAGE_EXCERPT,
        ),
    };
    format!("{} {text}", response.status.as_u16())
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};

    use super::*;
    use crate::delivery::Record;

    fn response(status: u16, body: &str) -> HttpResponse {
        HttpResponse {
            status: StatusCode::from_u16(status).unwrap(),
            headers: HeaderMap::new(),
            body: Bytes::from(body.to_string()),
        }
    }

    fn batch(n: usize, op: Op) -> Batch {
        Batch {
            op,
            seq: 1,
            part: 0,
            id: "b".into(),
            records: (0..n)
                .map(|i| Record {
                    key: Some(format!("k{i}")),
                    json: Bytes::from_static(b"{}"),
                    op,
                    change: Some(i as u32),
                })
                .collect(),
            bytes: 3 * n,
        }
    }

    #[test]
    fn limit_info_is_read() {
        let mut h = HeaderMap::new();
        h.insert(
            "Sforce-Limit-Info",
            "api-usage=10018/100000; api-bursts=1/750".parse().unwrap(),
        );
        assert_eq!(api_usage(&h), Some((10018, 100000)));
    }

    #[test]
    fn results_settle_each_record_in_order() {
        let body = r#"[
            {"id":"003A","success":true,"errors":[],"created":true},
            {"success":false,"errors":[{"statusCode":"UNABLE_TO_LOCK_ROW","message":"locked","fields":[]}]},
            {"id":null,"success":false,"errors":[{"statusCode":"INVALID_EMAIL_ADDRESS","message":"Email: invalid email address: x","fields":["Email"]}]}
        ]"#;
        match SalesforceRetryLogic::classify(&batch(3, Op::Upsert), &response(200, body)) {
            ResponseClass::Partial {
                retry,
                rejected,
                ids,
            } => {
                assert_eq!(retry, [1]);
                assert_eq!(rejected[0].0, 2);
                assert_eq!(rejected[0].1.code, "INVALID_EMAIL_ADDRESS");
                assert!(rejected[0].1.message.contains("fields: Email"));
                assert_eq!(ids[0].as_deref(), Some("003A"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn quota_and_session_answers() {
        let total =
            r#"[{"message":"TotalRequests Limit exceeded.","errorCode":"REQUEST_LIMIT_EXCEEDED"}]"#;
        assert!(matches!(
            SalesforceRetryLogic::classify_status(&response(403, total)),
            Some(ResponseClass::Fatal(m)) if m.contains("allocation is used up")
        ));
        let concurrent = r#"[{"message":"ConcurrentPerOrgLongTxn Limit exceeded.","errorCode":"REQUEST_LIMIT_EXCEEDED"}]"#;
        assert!(matches!(
            SalesforceRetryLogic::classify_status(&response(403, concurrent)),
            Some(ResponseClass::Retry { .. })
        ));
        let expired =
            r#"[{"message":"Session expired or invalid","errorCode":"INVALID_SESSION_ID"}]"#;
        assert!(matches!(
            SalesforceRetryLogic::classify_status(&response(401, expired)),
            Some(ResponseClass::Unauthorized(m)) if m.contains("INVALID_SESSION_ID")
        ));
    }

    #[test]
    fn bulk_errors_are_parsed() {
        let e = bulk_error(
            "REQUIRED_FIELD_MISSING:Required fields are missing: [LastName]:LastName --",
        );
        assert_eq!(e.code(), "REQUIRED_FIELD_MISSING");
        assert_eq!(
            e.message.as_deref(),
            Some("Required fields are missing: [LastName]")
        );
        assert_eq!(e.fields, ["LastName"]);
        let d = bulk_error("DUPLICATE_VALUE:Duplicate external id specified: C-004:--");
        assert_eq!(d.code(), "DUPLICATE_VALUE");
        assert_eq!(
            d.message.as_deref(),
            Some("Duplicate external id specified: C-004")
        );
        assert!(d.fields.is_empty());
    }
}
