//! The webhook's client side: the connection every statement shares, its [`HttpService`] for
//! the delivery engine, and the request of one batch (the JSON envelope, the idempotency key and
//! the signature).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use super::config::WebhookConfig;
use super::retry::WebhookRetryLogic;
use crate::delivery::{AdaptiveLimiter, Batch, HttpResponse, HttpService, ResponseClass};

/// What the driver calls for a webhook: request building and response reading.
pub(super) struct WebhookService {
    pub config: Arc<WebhookConfig>,
    pub envelope: Envelope,
    pub describe: String,
}

#[async_trait]
impl HttpService for WebhookService {
    fn build_request(
        &self,
        client: &reqwest::Client,
        batch: &Batch,
    ) -> crate::error::Result<reqwest::RequestBuilder> {
        Ok(build(client, &self.config, &self.envelope, batch))
    }

    fn classify(&self, batch: &Batch, response: &HttpResponse) -> ResponseClass {
        WebhookRetryLogic::classify(batch, response)
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }

    /// The endpoint as configured and shown everywhere (only its origin when it came from
    /// `env()` or `file()`: a webhook URL may carry its secret in the path).
    fn shown_url(&self, _url: &url::Url) -> String {
        self.config.shown_url.clone()
    }
}

/// What every statement on one webhook connection shares: its options, HTTP client (connection
/// pool) and rate limiter.
#[derive(Debug)]
pub struct WebhookConnection {
    pub name: String,
    pub config: Arc<WebhookConfig>,
    pub client: reqwest::Client,
    pub limiter: Arc<AdaptiveLimiter>,
}

/// The header carrying the signature: `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "t.body")>`.
pub const SIGNATURE_HEADER: &str = "X-Sluice-Signature";
/// The header carrying the batch's idempotency key (stable across retries of the request).
pub const IDEMPOTENCY_HEADER: &str = "Idempotency-Key";

/// What goes in every envelope of one statement.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub object: String,
    pub sync: Option<String>,
    pub run_id: String,
}

/// Writes `{"object":…,"sync":…,"run_id":…,"operation":…,"batch":n,"records":[…]}` by
/// concatenating the already-encoded records (no re-parsing).
pub fn encode_body(envelope: &Envelope, batch: &Batch) -> Vec<u8> {
    let mut body = Vec::with_capacity(batch.bytes + batch.records.len() + 160);
    let string = |body: &mut Vec<u8>, s: &str| {
        serde_json::to_writer(&mut *body, s).expect("writing a string to memory");
    };
    body.extend_from_slice(b"{\"object\":");
    string(&mut body, &envelope.object);
    body.extend_from_slice(b",\"sync\":");
    match &envelope.sync {
        Some(s) => string(&mut body, s),
        None => body.extend_from_slice(b"null"),
    }
    body.extend_from_slice(b",\"run_id\":");
    string(&mut body, &envelope.run_id);
    body.extend_from_slice(b",\"operation\":");
    string(&mut body, batch.op.as_str());
    body.extend_from_slice(format!(",\"batch\":{},\"records\":", batch.seq).as_bytes());
    batch.write_json_array(&mut body);
    body.push(b'}');
    body
}

/// `t=…,v1=…` for `body` signed at `timestamp`.
pub fn signature(secret: &str, timestamp: u64, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC accepts any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!(
        "t={timestamp},v1={}",
        hex::encode(mac.finalize().into_bytes())
    )
}

/// A request carrying `body` (an alert notice) with the connection's headers and signature.
pub fn notice_request(
    client: &reqwest::Client,
    config: &WebhookConfig,
    idempotency_key: &str,
    body: Vec<u8>,
) -> reqwest::RequestBuilder {
    signed(
        client
            .request(config.method.clone(), config.url.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(IDEMPOTENCY_HEADER, idempotency_key),
        config,
        body,
    )
}

/// Adds the configured headers and, with a signing secret, the signature of `body`.
fn signed(
    mut request: reqwest::RequestBuilder,
    config: &WebhookConfig,
    body: Vec<u8>,
) -> reqwest::RequestBuilder {
    for (name, value) in &config.headers {
        request = request.header(name, value.0.clone());
    }
    if let Some(secret) = &config.signing_secret {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        request = request.header(SIGNATURE_HEADER, signature(secret.expose(), now, &body));
    }
    request.body(body)
}

/// The full request for `batch`.
pub fn build(
    client: &reqwest::Client,
    config: &WebhookConfig,
    envelope: &Envelope,
    batch: &Batch,
) -> reqwest::RequestBuilder {
    let body = encode_body(envelope, batch);
    let request = client
        .request(config.method.clone(), config.url.clone())
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(IDEMPOTENCY_HEADER, batch.idempotency_key());
    signed(request, config, body)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::delivery::Record;

    #[test]
    fn envelope_wraps_records_verbatim() {
        let batch = Batch {
            op: crate::contract::Op::Upsert,
            seq: 7,
            part: 0,
            id: "r-000007".into(),
            records: vec![
                Record::new(Some("1".into()), Bytes::from_static(br#"{"id":1}"#)),
                Record::new(Some("2".into()), Bytes::from_static(br#"{"id":2}"#)),
            ],
            bytes: 16,
        };
        let envelope = Envelope {
            object: "users".into(),
            sync: None,
            run_id: "r".into(),
        };
        let body = encode_body(&envelope, &batch);
        let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            parsed,
            serde_json::json!({"object": "users", "sync": null, "run_id": "r", "operation": "upsert",
                               "batch": 7, "records": [{"id": 1}, {"id": 2}]})
        );
    }

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        // Reference value: python3 -c "import hmac,hashlib;print(hmac.new(b'key', b'1700000000.{}', hashlib.sha256).hexdigest())"
        assert_eq!(
            signature("key", 1_700_000_000, b"{}"),
            "t=1700000000,v1=9d713ed406bb7076d4123f0dc2c39d2df5c654ed4b0cd56b52c8b4c940bd63ae"
        );
    }
}
