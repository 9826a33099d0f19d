//! `WebhookRetryLogic`: what a receiver's answer means for the records of a request.
//!
//! | answer | meaning |
//! | --- | --- |
//! | 2xx, empty or any body | every record accepted |
//! | 2xx `{"errors":[{"index":3,"code":"…","message":"…","retryable":false}]}` | those records rejected (or retried when `retryable`), the rest accepted |
//! | 408, 425, 429, 5xx, timeout, connection reset | the request is retried (429 and `Retry-After` slow the connection down) |
//! | 401 | credentials rejected: the statement stops |
//! | 403, 404, 405, 410, 413 | the endpoint cannot take these requests: the statement stops |
//! | any other 4xx | every record of the request rejected, with the status and body |

use serde::Deserialize;

use crate::delivery::retry::excerpt;
use crate::delivery::{Batch, HttpResponse, Rejection, ResponseClass};

/// Longest excerpt of a response body kept in a reject's message.
const BODY_EXCERPT: usize = 300;

#[derive(Debug, Deserialize)]
struct ErrorsBody {
    #[serde(default)]
    errors: Vec<RecordError>,
}

#[derive(Debug, Deserialize)]
struct RecordError {
    index: usize,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    retryable: bool,
}

/// Classifies webhook responses.
pub struct WebhookRetryLogic;

impl WebhookRetryLogic {
    pub fn classify(batch: &Batch, response: &HttpResponse) -> ResponseClass {
        let status = response.status;
        let body_text = || {
            let text = String::from_utf8_lossy(&response.body);
            match text.trim() {
                "" => status.canonical_reason().unwrap_or("").to_string(),
                text => excerpt(text, BODY_EXCERPT),
            }
        };
        if status.is_success() {
            return match serde_json::from_slice::<ErrorsBody>(&response.body) {
                Ok(body) if !body.errors.is_empty() => {
                    let (mut retry, mut rejected) = (vec![], vec![]);
                    for e in body.errors {
                        if e.index >= batch.records.len() {
                            continue;
                        }
                        if e.retryable {
                            retry.push(e.index);
                        } else {
                            rejected.push((
                                e.index,
                                Rejection {
                                    code: e.code.unwrap_or_else(|| "rejected".into()),
                                    message: e.message.unwrap_or_default(),
                                },
                            ));
                        }
                    }
                    retry.sort_unstable();
                    retry.dedup();
                    ResponseClass::Partial {
                        retry,
                        rejected,
                        ids: vec![],
                    }
                }
                _ => ResponseClass::Accepted {
                    ids: vec![None; batch.records.len()],
                },
            };
        }
        match status.as_u16() {
            429 => ResponseClass::Retry {
                reason: format!("429 Too Many Requests: {}", body_text()),
                retry_after: None,
                throttled: true,
            },
            408 | 425 | 500..=599 => ResponseClass::Retry {
                reason: format!("{status}: {}", body_text()),
                retry_after: None,
                throttled: false,
            },
            401 => ResponseClass::Unauthorized(body_text()),
            403 | 404 | 405 | 410 => ResponseClass::Fatal(format!(
                "the endpoint answered {status} ({}); check the url and its credentials",
                body_text()
            )),
            300..=399 => ResponseClass::Fatal(format!(
                "the endpoint answered {status}, a redirect; sluice does not follow it (it would send the records, headers and signature to another address): set url to the final address, or follow_redirects 'same-origin' for a redirect within the url's own host"
            )),
            413 => ResponseClass::Fatal(
                "the endpoint answered 413 Payload Too Large; lower batch_size or max_bytes".into(),
            ),
            _ => ResponseClass::RejectAll(Rejection {
                code: format!("http_{}", status.as_u16()),
                message: body_text(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};

    use super::*;
    use crate::delivery::Record;

    fn batch(n: usize) -> Batch {
        Batch {
            op: crate::contract::Op::Upsert,
            seq: 1,
            part: 0,
            id: "b".into(),
            records: (0..n)
                .map(|i| Record::new(Some(i.to_string()), Bytes::from_static(b"{}")))
                .collect(),
            bytes: 2 * n,
        }
    }

    fn response(status: u16, body: &str) -> HttpResponse {
        HttpResponse {
            status: StatusCode::from_u16(status).unwrap(),
            headers: HeaderMap::new(),
            body: Bytes::from(body.to_string()),
        }
    }

    #[test]
    fn per_record_errors_in_a_2xx() {
        let body = r#"{"errors":[{"index":1,"code":"invalid_email","message":"bad"},{"index":2,"retryable":true}]}"#;
        match WebhookRetryLogic::classify(&batch(3), &response(200, body)) {
            ResponseClass::Partial {
                retry, rejected, ..
            } => {
                assert_eq!(retry, vec![2]);
                assert_eq!(rejected[0].0, 1);
                assert_eq!(rejected[0].1.code, "invalid_email");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn statuses() {
        let b = batch(2);
        assert!(matches!(
            WebhookRetryLogic::classify(&b, &response(204, "")),
            ResponseClass::Accepted { .. }
        ));
        assert!(matches!(
            WebhookRetryLogic::classify(&b, &response(200, "<html>")),
            ResponseClass::Accepted { .. }
        ));
        assert!(matches!(
            WebhookRetryLogic::classify(&b, &response(429, "")),
            ResponseClass::Retry {
                throttled: true,
                ..
            }
        ));
        assert!(matches!(
            WebhookRetryLogic::classify(&b, &response(503, "")),
            ResponseClass::Retry {
                throttled: false,
                ..
            }
        ));
        assert!(matches!(
            WebhookRetryLogic::classify(&b, &response(401, "")),
            ResponseClass::Unauthorized(_)
        ));
        assert!(matches!(
            WebhookRetryLogic::classify(&b, &response(404, "")),
            ResponseClass::Fatal(_)
        ));
        match WebhookRetryLogic::classify(&b, &response(422, "email is invalid")) {
            ResponseClass::RejectAll(r) => assert_eq!(
                (r.code.as_str(), r.message.as_str()),
                ("http_422", "email is invalid")
            ),
            other => panic!("{other:?}"),
        }
    }
}
