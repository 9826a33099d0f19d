//! The adaptive rate limiter one connection shares across every statement that uses it.
//!
//! Three signals pace requests:
//! - a token-bucket pace (GCRA) at the current rate: the configured `rate_limit`, or unpaced;
//! - the destination's window headers (`X-RateLimit-Remaining` / `-Reset`): when the window is
//!   spent, wait for it to reset, then probe one request at a time until a response reports again;
//! - 429 / `Retry-After`: pause everyone for as long as told and, without window headers to go by,
//!   halve the rate (multiplicative decrease); every success adds back a step (additive increase)
//!   up to the configured rate.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::retry::RateWindow;

/// The slowest the limiter backs off to.
const MIN_RATE: f64 = 0.1;
/// An unconfigured limiter that climbs back past this rate stops pacing.
const UNPACED_ABOVE: f64 = 10_000.0;
/// How long a probe may go unanswered before another probe goes.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Added to a reported reset: the destination's clock and rounding are not ours, and arriving a
/// hair early costs a 429.
const RESET_MARGIN: Duration = Duration::from_millis(10);

/// A per-connection, adaptive limiter. See the module docs.
#[derive(Debug)]
pub struct AdaptiveLimiter {
    configured: Option<f64>,
    /// The connection it paces, for metrics (`None`: not reported).
    connection: Option<String>,
    state: Mutex<State>,
    /// Wakes waiters when a response changes what they wait for (a window report, a finished
    /// probe), so nobody sleeps out a wait that no longer applies.
    changed: tokio::sync::Notify,
}

#[derive(Debug)]
struct State {
    rate: Option<f64>,
    next_slot: Instant,
    paused_until: Option<Instant>,
    window: Option<Window>,
    in_flight: u64,
    /// Grants so far; each grant's number is its ticket.
    issued: u64,
    /// The ticket of the newest request whose window report was applied.
    last_report: Option<u64>,
    recent: VecDeque<Instant>,
}

/// Identifies a granted request, to order the window reports of responses that arrive out of
/// order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket(u64);

#[derive(Debug, Clone, Copy)]
struct Window {
    remaining: u64,
    granted: u64,
    reset_at: Instant,
    /// Our own guess after a reset (one request at a time), not a report: any report replaces it.
    probe: bool,
}

impl AdaptiveLimiter {
    /// `rate`: requests per second at most, or `None` for no configured limit.
    pub fn new(rate: Option<f64>) -> Self {
        Self {
            configured: rate,
            connection: None,
            state: Mutex::new(State {
                rate,
                next_slot: Instant::now(),
                paused_until: None,
                window: None,
                in_flight: 0,
                issued: 0,
                last_report: None,
                recent: VecDeque::with_capacity(32),
            }),
            changed: tokio::sync::Notify::new(),
        }
    }

    /// Reports its waits under the connection's name (`sluice_limiter_wait_seconds`).
    pub fn for_connection(mut self, name: &str) -> Self {
        self.connection = Some(name.to_string());
        self
    }

    /// The rate currently paced at (requests/s), `None` when unpaced.
    pub fn current_rate(&self) -> Option<f64> {
        self.lock().rate
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("limiter lock")
    }

    /// Waits until a request may go. Pair every call with [`AdaptiveLimiter::finish`].
    pub async fn acquire(&self) -> Ticket {
        let begun = Instant::now();
        let ticket = self.grant().await;
        if let Some(connection) = &self.connection {
            let waited = begun.elapsed();
            if waited >= Duration::from_millis(1) {
                metrics::histogram!("sluice_limiter_wait_seconds", "connection" => connection.clone())
                    .record(waited.as_secs_f64());
            }
        }
        ticket
    }

    async fn grant(&self) -> Ticket {
        loop {
            let wait = {
                let mut s = self.lock();
                let now = Instant::now();
                let mut until = now;
                match s.paused_until {
                    Some(p) if p > now => until = until.max(p),
                    Some(_) => s.paused_until = None,
                    None => {}
                }
                if let Some(w) = &mut s.window
                    && w.granted >= w.remaining
                {
                    if w.reset_at > now {
                        until = until.max(w.reset_at);
                    } else {
                        // The window has reset: probe with one request until a response reports.
                        *w = Window {
                            remaining: 1,
                            granted: 0,
                            reset_at: now + PROBE_TIMEOUT,
                            probe: true,
                        };
                    }
                }
                if s.rate.is_some() {
                    until = until.max(s.next_slot);
                }
                if until <= now {
                    if let Some(rate) = s.rate {
                        // A grant that comes late (timer granularity, a busy runtime) may be
                        // made up by the next one, by at most half an interval: the pace holds
                        // over a long run, and no window of T seconds ever holds more than
                        // T × rate + 1 grants (a configured limit is never exceeded).
                        let interval = Duration::try_from_secs_f64(1.0 / rate)
                            .unwrap_or(Duration::from_secs(1));
                        let earliest = now.checked_sub(interval / 2).unwrap_or(now);
                        s.next_slot = s.next_slot.max(earliest) + interval;
                    }
                    if let Some(w) = &mut s.window {
                        w.granted += 1;
                    }
                    s.in_flight += 1;
                    if s.recent.len() == 32 {
                        s.recent.pop_front();
                    }
                    s.recent.push_back(now);
                    let ticket = Ticket(s.issued);
                    s.issued += 1;
                    return ticket;
                }
                until - now
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.changed.notified() => {}
            }
        }
    }

    /// A request granted by [`AdaptiveLimiter::acquire`] has completed.
    pub fn finish(&self) {
        let mut s = self.lock();
        s.in_flight = s.in_flight.saturating_sub(1);
        drop(s);
        self.changed.notify_waiters();
    }

    /// The destination reported its window in the response to request `ticket`.
    ///
    /// Connections reorder requests, so a report may miss requests the destination counts a
    /// moment later: every other request still in flight counts against it, a report older than
    /// one already applied is ignored, and until the current window's reset time a report may
    /// only lower what is available, never raise it.
    pub fn observe_window(&self, ticket: Ticket, window: RateWindow) {
        let mut s = self.lock();
        if s.last_report.is_some_and(|last| ticket.0 < last) {
            return;
        }
        s.last_report = Some(ticket.0);
        let now = Instant::now();
        let reported = Window {
            remaining: window.remaining,
            granted: s.in_flight.saturating_sub(1),
            reset_at: now + window.reset_in + RESET_MARGIN,
            probe: false,
        };
        let available = |w: &Window| w.remaining.saturating_sub(w.granted);
        let keep = s
            .window
            .as_ref()
            .is_some_and(|w| !w.probe && now < w.reset_at && available(w) < available(&reported));
        if !keep {
            s.window = Some(reported);
        }
        drop(s);
        self.changed.notify_waiters();
    }

    /// A request was rate limited.
    pub fn on_throttle(&self, retry_after: Option<Duration>, had_window: bool) {
        let mut s = self.lock();
        let now = Instant::now();
        let wait = retry_after
            .unwrap_or(Duration::from_secs(1))
            .min(super::retry::MAX_SERVER_WAIT);
        let pause_until = now + wait;
        s.paused_until = Some(s.paused_until.map_or(pause_until, |p| p.max(pause_until)));
        if !had_window {
            let current = s.rate.or_else(|| observed_rate(&s.recent)).unwrap_or(10.0);
            s.rate = Some((current / 2.0).max(MIN_RATE));
            s.next_slot = pause_until;
        }
    }

    /// A request succeeded: climb back towards the configured rate.
    pub fn on_success(&self) {
        let mut s = self.lock();
        let Some(rate) = s.rate else {
            return;
        };
        let step = (rate * 0.05).max(0.2);
        let raised = rate + step;
        s.rate = match self.configured {
            Some(max) => Some(raised.min(max)),
            None if raised > UNPACED_ABOVE => None,
            None => Some(raised),
        };
    }
}

/// Requests per second over the last grants.
fn observed_rate(recent: &VecDeque<Instant>) -> Option<f64> {
    let (first, last) = (recent.front()?, recent.back()?);
    let span = last.duration_since(*first).as_secs_f64();
    (recent.len() > 1 && span > 0.0).then(|| (recent.len() - 1) as f64 / span)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn paces_at_the_configured_rate() {
        let limiter = AdaptiveLimiter::new(Some(10.0));
        let start = Instant::now();
        for _ in 0..11 {
            limiter.acquire().await;
            limiter.finish();
        }
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_millis(999), "{elapsed:?}");
        assert!(elapsed < Duration::from_millis(1100), "{elapsed:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_grant_is_made_up_once_but_never_bursts() {
        let limiter = AdaptiveLimiter::new(Some(10.0));
        limiter.acquire().await;
        limiter.finish();
        // The next caller arrives 30 ms after its slot: the one after it keeps the pace.
        tokio::time::advance(Duration::from_millis(130)).await;
        let start = Instant::now();
        limiter.acquire().await;
        limiter.acquire().await;
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(70),
            "the third grant is due 200 ms after the first"
        );
        // After a long idle, at most half an interval of slack: never two at once.
        tokio::time::advance(Duration::from_secs(5)).await;
        let start = Instant::now();
        for _ in 0..4 {
            limiter.acquire().await;
        }
        assert_eq!(start.elapsed(), Duration::from_millis(250));
    }

    #[tokio::test(start_paused = true)]
    async fn waits_for_a_spent_window_then_probes() {
        let limiter = AdaptiveLimiter::new(None);
        let ticket = limiter.acquire().await;
        limiter.observe_window(
            ticket,
            RateWindow {
                remaining: 0,
                reset_in: Duration::from_millis(500),
            },
        );
        limiter.finish();
        let start = Instant::now();
        limiter.acquire().await;
        assert!(start.elapsed() >= Duration::from_millis(500));
        // One probe is out; the next waits for its answer (or the probe timeout).
        let second = tokio::time::timeout(Duration::from_millis(100), limiter.acquire()).await;
        assert!(second.is_err(), "a second request must wait for the probe");
    }

    #[tokio::test(start_paused = true)]
    async fn stale_reports_are_ignored_and_later_grants_count() {
        let limiter = AdaptiveLimiter::new(None);
        let first = limiter.acquire().await;
        let second = limiter.acquire().await;
        let _third = limiter.acquire().await;
        let report = |remaining| RateWindow {
            remaining,
            reset_in: Duration::from_secs(1),
        };
        // The second request's answer: 2 left, but two other requests are still in flight.
        limiter.observe_window(second, report(2));
        limiter.finish();
        // The first request's answer arrives late and would claim 5 left: ignored.
        limiter.observe_window(first, report(5));
        let next = tokio::time::timeout(Duration::from_millis(500), limiter.acquire()).await;
        assert!(
            next.is_err(),
            "the window is spent: 2 left, 2 others in flight"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn throttling_pauses_halves_and_success_recovers() {
        let limiter = AdaptiveLimiter::new(Some(8.0));
        limiter.on_throttle(Some(Duration::from_secs(2)), false);
        assert_eq!(limiter.current_rate(), Some(4.0));
        let start = Instant::now();
        limiter.acquire().await;
        assert!(start.elapsed() >= Duration::from_secs(2));
        for _ in 0..100 {
            limiter.on_success();
        }
        assert_eq!(
            limiter.current_rate(),
            Some(8.0),
            "capped at the configured rate"
        );
    }
}
