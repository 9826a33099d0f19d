//! Delivery counters: requests, retries, 429s, records accepted/rejected, bytes, latency.

use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use datafusion::physical_plan::metrics::{ExecutionPlanMetricsSet, MetricBuilder};

/// Live counters of one statement's delivery.
#[derive(Debug, Default)]
pub struct DeliveryMetrics {
    pub requests: AtomicU64,
    pub retries: AtomicU64,
    pub throttled: AtomicU64,
    pub accepted: AtomicU64,
    pub rejected: AtomicU64,
    pub bytes: AtomicU64,
    latencies_us: Mutex<Vec<u32>>,
}

impl DeliveryMetrics {
    pub fn record_request(&self, bytes: usize, latency: Duration) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        let micros = latency.as_micros().min(u32::MAX as u128) as u32;
        self.latencies_us.lock().expect("latency lock").push(micros);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// A consistent copy of the counters.
    pub fn snapshot(&self) -> DeliveryStats {
        let mut lat = self.latencies_us.lock().expect("latency lock").clone();
        lat.sort_unstable();
        let pct = |p: f64| -> Duration {
            if lat.is_empty() {
                return Duration::ZERO;
            }
            let i = ((lat.len() as f64 - 1.0) * p).round() as usize;
            Duration::from_micros(lat[i] as u64)
        };
        DeliveryStats {
            requests: self.requests.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            throttled: self.throttled.load(Ordering::Relaxed),
            accepted: self.accepted.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            latency_p50: pct(0.50),
            latency_p99: pct(0.99),
        }
    }
}

/// What a statement's delivery did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeliveryStats {
    pub requests: u64,
    pub retries: u64,
    /// Requests answered 429 (not failures: they are waited out).
    pub throttled: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub bytes: u64,
    pub latency_p50: Duration,
    pub latency_p99: Duration,
}

impl DeliveryStats {
    /// Publishes the figures as DataFusion metrics, so `EXPLAIN ANALYZE` shows them on the sink.
    pub fn publish(&self, set: &ExecutionPlanMetricsSet) {
        let counter = |name: &'static str, v: u64| {
            MetricBuilder::new(set).global_counter(name).add(v as usize)
        };
        counter("requests", self.requests);
        counter("retries", self.retries);
        counter("throttled_429", self.throttled);
        counter("rows_accepted", self.accepted);
        counter("rows_rejected", self.rejected);
        counter("bytes_sent", self.bytes);
        counter("latency_p50_us", self.latency_p50.as_micros() as u64);
        counter("latency_p99_us", self.latency_p99.as_micros() as u64);
    }
}

impl fmt::Display for DeliveryStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.requests == 0 {
            return f.write_str("no requests (nothing to send)");
        }
        write!(
            f,
            "{} request{} ({} retr{}, {} rate-limited), {}, latency p50 {} p99 {}",
            self.requests,
            if self.requests == 1 { "" } else { "s" },
            self.retries,
            if self.retries == 1 { "y" } else { "ies" },
            self.throttled,
            human_bytes(self.bytes),
            ms(self.latency_p50),
            ms(self.latency_p99),
        )
    }
}

fn ms(d: Duration) -> String {
    format!("{:.0}ms", d.as_secs_f64() * 1000.0)
}

/// `512 B`, `1.4 MB`.
pub fn human_bytes(n: u64) -> String {
    match n {
        n if n < 1024 => format!("{n} B"),
        n if n < 1024 * 1024 => format!("{:.1} KB", n as f64 / 1024.0),
        n => format!("{:.1} MB", n as f64 / 1_048_576.0),
    }
}
