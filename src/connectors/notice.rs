//! Sending one alert notice over HTTP: a few attempts, 429's `Retry-After` honoured (within
//! bounds), server errors and lost connections retried, other answers final. The caller reads
//! each answer ([`Answer`]); errors name the connection, never its URL's secret part.

use std::time::Duration;

use crate::error::{Error, Result};

/// Attempts per notice.
const ATTEMPTS: u32 = 4;

/// The longest wait a `Retry-After` may ask for before the notice is given up.
const MAX_WAIT: Duration = Duration::from_secs(30);

/// What an answer means.
#[derive(Debug)]
pub enum Answer {
    Delivered,
    /// Try again after this long.
    Retry(Duration),
    /// Not delivered, and trying again will not help: why.
    Refused(String),
}

/// The usual reading of an HTTP status: 2xx delivered, 429 and 5xx retried, others refused.
pub fn by_status(status: u16, headers: &http::HeaderMap, body: &str) -> Answer {
    match status {
        200..=299 => Answer::Delivered,
        429 => Answer::Retry(
            crate::delivery::retry::retry_after(headers).unwrap_or(Duration::from_secs(1)),
        ),
        500..=599 => Answer::Retry(Duration::from_secs(1)),
        _ => Answer::Refused(format!("HTTP {status}: {}", snippet(body))),
    }
}

/// At most 200 characters of an answer, on one line.
pub fn snippet(body: &str) -> String {
    let one_line: String = body.split_whitespace().collect::<Vec<_>>().join(" ");
    one_line.chars().take(200).collect()
}

/// Sends what `request` builds until `read` says it is delivered or refused.
pub async fn send(
    describe: &str,
    timeout: Duration,
    request: impl Fn() -> reqwest::RequestBuilder,
    read: impl Fn(u16, &http::HeaderMap, &str) -> Answer,
) -> Result<()> {
    let mut last = String::new();
    for attempt in 1..=ATTEMPTS {
        let wait = match tokio::time::timeout(timeout, request().send()).await {
            Err(_) => {
                last = format!("no answer within {timeout:?}");
                Duration::from_secs(1)
            }
            Ok(Err(e)) => {
                last = format!(
                    "cannot connect: {}",
                    crate::delivery::driver::root_cause(&e)
                );
                Duration::from_secs(1)
            }
            Ok(Ok(response)) => {
                let status = response.status().as_u16();
                let headers = response.headers().clone();
                let body = match tokio::time::timeout(timeout, response.text()).await {
                    Ok(Ok(b)) => b,
                    _ => String::new(),
                };
                match read(status, &headers, &body) {
                    Answer::Delivered => return Ok(()),
                    Answer::Refused(why) => {
                        return Err(Error::Write {
                            message: format!("{describe}: the notice was refused: {why}"),
                        });
                    }
                    Answer::Retry(wait) if wait > MAX_WAIT => {
                        return Err(Error::Write {
                            message: format!(
                                "{describe}: throttled for {wait:?}, longer than a notice waits"
                            ),
                        });
                    }
                    Answer::Retry(wait) => {
                        last = format!("HTTP {status}: {}", snippet(&body));
                        wait
                    }
                }
            }
        };
        if attempt < ATTEMPTS {
            tokio::time::sleep(wait * attempt).await;
        }
    }
    Err(Error::Write {
        message: format!("{describe}: gave up after {ATTEMPTS} attempts; last: {last}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_read_as_delivered_retried_or_refused() {
        let mut h = http::HeaderMap::new();
        assert!(matches!(by_status(200, &h, "ok"), Answer::Delivered));
        h.insert(http::header::RETRY_AFTER, "3".parse().unwrap());
        assert!(matches!(by_status(429, &h, ""), Answer::Retry(d) if d == Duration::from_secs(3)));
        assert!(matches!(by_status(503, &h, ""), Answer::Retry(_)));
        assert!(
            matches!(by_status(404, &h, "channel_not_found"), Answer::Refused(m) if m.contains("channel_not_found"))
        );
    }
}
