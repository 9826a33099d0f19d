//! [`Trace`]: the requests a sample run sends and the answers it gets, kept to be shown.
//!
//! Only what is safe to print is kept: the method, the URL as the connector shows it
//! ([`super::HttpService::shown_url`]: no query string, and an endpoint given by `env()` or
//! `file()` reduced to its origin), the request body (record fields) and the answer's status and
//! body, each cut at [`BODY_LIMIT`] bytes. Headers, which carry the credentials, are never kept.

use std::sync::{Arc, Mutex};

/// The most of a body kept per request or answer.
pub const BODY_LIMIT: usize = 2048;

/// One request and its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exchange {
    pub method: String,
    pub url: String,
    pub request: String,
    /// The answer's status; `None` if no answer came (the reason is in `response`).
    pub status: Option<u16>,
    pub response: String,
}

impl std::fmt::Display for Exchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "→ {} {}", self.method, self.url)?;
        if !self.request.is_empty() {
            writeln!(f, "  {}", self.request)?;
        }
        match self.status {
            Some(status) => write!(f, "← {status} {}", self.response),
            None => write!(f, "← no answer: {}", self.response),
        }
    }
}

/// The exchanges of one statement, shared by its drivers.
#[derive(Debug, Clone, Default)]
pub struct Trace(Arc<Mutex<Vec<Exchange>>>);

impl Trace {
    pub fn push(&self, exchange: Exchange) {
        self.0.lock().expect("trace lock").push(exchange);
    }

    pub fn take(&self) -> Vec<Exchange> {
        std::mem::take(&mut *self.0.lock().expect("trace lock"))
    }
}

/// A body as text, cut at [`BODY_LIMIT`] bytes (on a character boundary).
pub fn shown_body(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    if text.len() <= BODY_LIMIT {
        return text.into_owned();
    }
    let mut end = BODY_LIMIT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes in all)", &text[..end], body.len())
}

/// A URL without its query string, password or fragment: `scheme://host[:port]/path`.
pub fn shown_url(url: &url::Url) -> String {
    format!("{}{}", crate::options::origin(url), url.path())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_query_and_password_and_bodies_are_cut() {
        let url =
            url::Url::parse("https://user:pw@api.example.com:8443/v1/x?token=s3cret#f").unwrap();
        assert_eq!(shown_url(&url), "https://api.example.com:8443/v1/x");
        let long = "é".repeat(BODY_LIMIT);
        let shown = shown_body(long.as_bytes());
        assert!(
            shown.len() < long.len() && shown.ends_with(&format!("({} bytes in all)", long.len()))
        );
        assert_eq!(shown_body(b"{\"a\":1}"), "{\"a\":1}");
        let trace = Trace::default();
        trace.push(Exchange {
            method: "POST".into(),
            url: "https://h/p".into(),
            request: "{}".into(),
            status: Some(200),
            response: "ok".into(),
        });
        assert_eq!(
            trace.take()[0].to_string(),
            "→ POST https://h/p\n  {}\n← 200 ok"
        );
        assert!(trace.take().is_empty());
    }
}
