//! Progress of a long delivery: a bar (rows sent, rate, ETA) when stderr is a terminal, a log
//! line every few seconds otherwise (CI stays quiet and readable).

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::task::JoinHandle;

use super::metrics::DeliveryMetrics;

/// How often the non-terminal progress line is logged.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Shows progress until dropped.
pub struct Progress {
    bar: Option<ProgressBar>,
    ticker: Option<JoinHandle<()>>,
}

impl Progress {
    /// Starts reporting on `metrics` for a delivery to `target`.
    pub fn start(target: &str, metrics: Arc<DeliveryMetrics>) -> Self {
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix} {spinner} {human_pos} rows sent  {per_sec}  {elapsed_precise}  {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.set_prefix(target.to_string());
            let ticker_bar = bar.clone();
            let ticker = tokio::spawn(async move {
                loop {
                    let s = metrics.snapshot();
                    ticker_bar.set_position(s.accepted + s.rejected);
                    ticker_bar.set_message(format!(
                        "{} requests, {} retries, {} rate-limited",
                        s.requests, s.retries, s.throttled
                    ));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            });
            Self {
                bar: Some(bar),
                ticker: Some(ticker),
            }
        } else {
            let target = target.to_string();
            let ticker = tokio::spawn(async move {
                let started = tokio::time::Instant::now();
                loop {
                    tokio::time::sleep(LOG_EVERY).await;
                    let s = metrics.snapshot();
                    let secs = started.elapsed().as_secs_f64();
                    tracing::info!(
                        target = %target,
                        rows_sent = s.accepted + s.rejected,
                        rows_per_sec = ((s.accepted + s.rejected) as f64 / secs) as u64,
                        requests = s.requests,
                        retries = s.retries,
                        throttled = s.throttled,
                        "Delivering."
                    );
                }
            });
            Self {
                bar: None,
                ticker: Some(ticker),
            }
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(t) = self.ticker.take() {
            t.abort();
        }
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}
