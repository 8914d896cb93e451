//! Provider health: a circuit breaker per provider and a node-wide retry budget.
//!
//! When a provider is down, every tenant on the node should stop paying for it within
//! a few requests: an open circuit is skipped without a connection attempt, and a
//! single probe decides when it closes again. The retry budget keeps failover from
//! multiplying load onto the providers that are still up.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Consecutive failures that open a closed circuit, provided that at least half of the
/// last `RECENT_CALLS` calls in the window failed too. Without that condition a busy
/// provider with a modest error rate (a few % of streams cut) trips on chance alone:
/// five failures in a row among thousands of calls a minute are routine, and an open
/// circuit turns a few % of errors into 100 % for every tenant without a fallback
/// (the soak found exactly that). A real outage fails every call, so it still trips
/// within `RECENT_CALLS / 2` failures at the most, and within five on a quiet provider.
const CONSECUTIVE_FAILURES: u32 = 5;
const RECENT_CALLS: u32 = 20;
/// Error rate (percent) over the window that opens it, once enough calls were seen.
const ERROR_RATE_PCT: u32 = 50;
const MIN_CALLS: u32 = 20;
const WINDOW: Duration = Duration::from_secs(10);
/// First open period; doubled each time a probe fails, up to `MAX_OPEN`.
const BASE_OPEN: Duration = Duration::from_secs(5);
const MAX_OPEN: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Closed,
    Open {
        until: Instant,
    },
    /// One probe is in flight; everyone else waits for its verdict.
    HalfOpen,
}

#[derive(Debug)]
struct State {
    mode: Mode,
    consecutive: u32,
    open_for: Duration,
    window_start: Instant,
    calls: u32,
    failures: u32,
    /// Outcomes of the window's latest calls, newest in bit 0, a set bit a failure.
    recent: u32,
}

#[derive(Debug)]
pub struct Breaker {
    state: Mutex<State>,
}

/// What `/admin/v1/providers` shows.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BreakerView {
    pub state: &'static str,
    pub error_rate: f64,
    pub calls_in_window: u32,
    pub consecutive_failures: u32,
    pub retry_after_s: u64,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            state: Mutex::new(State {
                mode: Mode::Closed,
                consecutive: 0,
                open_for: BASE_OPEN,
                window_start: Instant::now(),
                calls: 0,
                failures: 0,
                recent: 0,
            }),
        }
    }
}

impl Breaker {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// May a call go to this provider now? `Err` carries the time until the next probe.
    pub fn try_acquire(&self) -> Result<(), Duration> {
        self.try_acquire_at(Instant::now())
    }

    fn try_acquire_at(&self, now: Instant) -> Result<(), Duration> {
        let mut s = self.lock();
        match s.mode {
            Mode::Closed => Ok(()),
            Mode::Open { until } if now >= until => {
                s.mode = Mode::HalfOpen;
                Ok(())
            }
            Mode::Open { until } => Err(until - now),
            Mode::HalfOpen => Err(Duration::from_secs(1)),
        }
    }

    /// The verdict of a call that `try_acquire` let through.
    pub fn record(&self, success: bool) {
        self.record_at(success, Instant::now())
    }

    fn record_at(&self, success: bool, now: Instant) {
        let mut s = self.lock();
        if now.duration_since(s.window_start) > WINDOW {
            s.window_start = now;
            s.calls = 0;
            s.failures = 0;
            s.recent = 0;
        }
        s.calls += 1;
        s.recent = (s.recent << 1) | u32::from(!success);
        if success {
            s.consecutive = 0;
            if s.mode == Mode::HalfOpen {
                s.mode = Mode::Closed;
                s.open_for = BASE_OPEN;
                s.calls = 0;
                s.failures = 0;
                s.recent = 0;
            }
            return;
        }
        s.failures += 1;
        s.consecutive += 1;
        let trip = match s.mode {
            Mode::HalfOpen => {
                s.open_for = (s.open_for * 2).min(MAX_OPEN);
                true
            }
            Mode::Closed => {
                let seen = s.calls.min(RECENT_CALLS);
                let recent_failures = (s.recent & ((1u32 << seen) - 1)).count_ones();
                (s.consecutive >= CONSECUTIVE_FAILURES && recent_failures * 2 >= seen)
                    || (s.calls >= MIN_CALLS && s.failures * 100 >= s.calls * ERROR_RATE_PCT)
            }
            Mode::Open { .. } => false,
        };
        if trip {
            let open_for = s.open_for;
            s.mode = Mode::Open {
                until: now + open_for,
            };
        }
    }

    /// A call that ended without a verdict on the provider (the client left, or the
    /// request was refused before reaching it): free the probe slot if it held it.
    pub fn release(&self) {
        let mut s = self.lock();
        if s.mode == Mode::HalfOpen {
            s.mode = Mode::Open {
                until: Instant::now(),
            };
        }
    }

    pub fn view(&self) -> BreakerView {
        let s = self.lock();
        let now = Instant::now();
        let (state, retry_after_s) = match s.mode {
            Mode::Closed => ("closed", 0),
            Mode::Open { until } if until > now => {
                let d = until - now;
                (
                    "open",
                    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1),
                )
            }
            Mode::Open { .. } => ("open", 0),
            Mode::HalfOpen => ("half_open", 1),
        };
        BreakerView {
            state,
            error_rate: if s.calls == 0 {
                0.0
            } else {
                s.failures as f64 / s.calls as f64
            },
            calls_in_window: s.calls,
            consecutive_failures: s.consecutive,
            retry_after_s,
        }
    }
}

/// One breaker per provider name, shared by all tenants on the node.
#[derive(Debug, Default)]
pub struct Breakers {
    map: Mutex<HashMap<String, Arc<Breaker>>>,
}

impl Breakers {
    pub fn get(&self, provider: &str) -> Option<Arc<Breaker>> {
        let mut m = match self.map.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        Some(m.entry(provider.to_string()).or_default().clone())
    }

    pub fn views(&self) -> Vec<(String, BreakerView)> {
        let m = match self.map.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        let mut v: Vec<_> = m.iter().map(|(k, b)| (k.clone(), b.view())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

/// Failover retries allowed as a share of first attempts: each request deposits
/// `DEPOSIT_MILLI` thousandths of a retry, each failover withdraws a whole one.
/// With 20 %, an outage can add at most a fifth more upstream calls than the traffic
/// itself, plus the initial balance for quiet nodes.
const DEPOSIT_MILLI: i64 = 200;
const MAX_BALANCE_MILLI: i64 = 100_000;

#[derive(Debug)]
pub struct RetryBudget {
    balance_milli: AtomicI64,
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget {
            balance_milli: AtomicI64::new(MAX_BALANCE_MILLI / 10),
        }
    }
}

impl RetryBudget {
    pub fn deposit(&self) {
        let _ = self
            .balance_milli
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some((b + DEPOSIT_MILLI).min(MAX_BALANCE_MILLI))
            });
    }

    /// Takes one retry if the budget has it.
    pub fn withdraw(&self) -> bool {
        self.balance_milli
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                (b >= 1000).then_some(b - 1000)
            })
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_then_probes_once() {
        let b = Breaker::default();
        let t0 = Instant::now();
        for _ in 0..CONSECUTIVE_FAILURES - 1 {
            assert!(b.try_acquire_at(t0).is_ok());
            b.record_at(false, t0);
        }
        assert!(b.try_acquire_at(t0).is_ok());
        b.record_at(false, t0);
        // Open: skipped, with the time until the probe.
        let wait = b.try_acquire_at(t0).unwrap_err();
        assert!(wait <= BASE_OPEN && wait > Duration::from_secs(4));
        // After the open period exactly one probe goes through.
        let later = t0 + BASE_OPEN;
        assert!(b.try_acquire_at(later).is_ok());
        assert!(b.try_acquire_at(later).is_err());
        // The probe fails: open again, for twice as long.
        b.record_at(false, later);
        let wait = b.try_acquire_at(later).unwrap_err();
        assert!(wait > BASE_OPEN);
        // Next probe succeeds: closed.
        let much_later = later + MAX_OPEN;
        assert!(b.try_acquire_at(much_later).is_ok());
        b.record_at(true, much_later);
        assert!(b.try_acquire_at(much_later).is_ok());
        assert_eq!(b.view().state, "closed");
    }

    #[test]
    fn a_chance_run_of_failures_on_a_busy_provider_does_not_open_it() {
        let b = Breaker::default();
        let t0 = Instant::now();
        for _ in 0..100 {
            b.record_at(true, t0);
        }
        // Five in a row among mostly successes: noise, not an outage.
        for _ in 0..CONSECUTIVE_FAILURES {
            b.record_at(false, t0);
        }
        assert!(b.try_acquire_at(t0).is_ok());
        assert_eq!(b.view().state, "closed");
        // A real outage keeps failing: open within half the recent calls.
        for _ in CONSECUTIVE_FAILURES..RECENT_CALLS / 2 {
            b.record_at(false, t0);
        }
        assert!(b.try_acquire_at(t0).is_err());
    }

    #[test]
    fn opens_on_error_rate() {
        let b = Breaker::default();
        let t0 = Instant::now();
        for i in 0..MIN_CALLS {
            // alternate: never 5 in a row, but 50 % overall
            b.record_at(i % 2 == 0, t0);
        }
        assert!(b.try_acquire_at(t0).is_err());
    }

    #[test]
    fn release_frees_the_probe() {
        let b = Breaker::default();
        let t0 = Instant::now();
        for _ in 0..CONSECUTIVE_FAILURES {
            b.record_at(false, t0);
        }
        assert!(b.try_acquire_at(t0 + BASE_OPEN).is_ok());
        b.release();
        assert!(b.try_acquire().is_ok());
    }

    #[test]
    fn retry_budget_caps_failover() {
        let r = RetryBudget::default();
        let mut granted = 0;
        while r.withdraw() {
            granted += 1;
        }
        assert_eq!(granted, 10);
        for _ in 0..10 {
            r.deposit();
        }
        assert!(r.withdraw());
        assert!(r.withdraw());
        assert!(!r.withdraw());
    }
}
