//! The in-process counter store.
//!
//! It is the whole truth for `counters.backend: memory` (one node). In front of Redis
//! the same store is this node's own view of each tenant: it rejects a tenant that is
//! over its rps or concurrency on this node alone without a round trip, and it is the
//! best-effort limiter while Redis is unreachable under `fail_open`.
//!
//! One mutex-guarded entry per tenant; every check and reservation happens under that
//! lock, so concurrent admissions can never together overshoot a limit.

use super::calendar::{month_label, Now};
use super::{usd, Actual, Demand, RateHeaders, Refusal, UsageView};
use crate::config::{Budget, Rate, Tenant};
use std::collections::HashMap;
use std::sync::Mutex;

/// Seconds in the tokens-per-minute window.
const TPM_WINDOW_S: u64 = 60;
/// Hours kept: the current one and the 24 before it (velocity), plus one of slack.
const HOURS_KEPT: usize = 26;

/// What a store admission asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// A request that goes upstream: every limit, and a hold to settle.
    Reserve,
    /// A request that costs nothing (a cache hit): rps only, nothing held.
    RequestOnly,
}

/// What an admitted request holds, to be released or settled. Spend, tokens and the
/// request count are attributed to the month and hour the request was admitted in,
/// like the audit row's `ts`, so that each month's and hour's settled spend stays
/// within what was reserved against that month's and hour's budget.
#[derive(Debug, Clone, Copy)]
pub(super) struct Hold {
    pub month: i64,
    pub hour: u64,
    pub second: u64,
    pub tokens: u64,
    pub cost_nanousd: u64,
}

#[derive(Debug, Default, Clone, Copy)]
struct MonthState {
    month: i64,
    spent: u64,
    reserved: u64,
    tokens_in: u64,
    tokens_out: u64,
    requests: u64,
}

#[derive(Debug, Default, Clone, Copy)]
struct HourState {
    hour: u64,
    spent: u64,
    reserved: u64,
}

#[derive(Debug)]
struct TenantState {
    second: u64,
    second_count: u32,
    /// The shared store refused this second's rps: it stays full until the second
    /// ends (its count only grows), so this node refuses the rest without asking.
    shared_rps_full: bool,
    in_flight: u32,
    /// Tokens per second over the last minute: `(second, tokens)` ring.
    tpm: [(u64, u64); TPM_WINDOW_S as usize],
    /// The current month and the one before it, whose long requests may still settle.
    months: [MonthState; 2],
    /// Spend per UTC hour, a ring indexed by `hour % HOURS_KEPT`.
    hours: [HourState; HOURS_KEPT],
}

impl Default for TenantState {
    fn default() -> Self {
        TenantState {
            second: 0,
            second_count: 0,
            shared_rps_full: false,
            in_flight: 0,
            tpm: [(0, 0); TPM_WINDOW_S as usize],
            months: [MonthState::default(); 2],
            hours: [HourState::default(); HOURS_KEPT],
        }
    }
}

impl TenantState {
    fn roll_second(&mut self, second: u64) {
        if second != self.second {
            self.second = second;
            self.second_count = 0;
            self.shared_rps_full = false;
        }
    }

    fn tpm_in_window(&self, now_s: u64) -> impl Iterator<Item = &(u64, u64)> {
        self.tpm
            .iter()
            .filter(move |(s, t)| *t > 0 && now_s.saturating_sub(*s) < TPM_WINDOW_S)
    }

    fn tpm_used(&self, now_s: u64) -> u64 {
        self.tpm_in_window(now_s).map(|(_, t)| *t).sum()
    }

    /// The counters of `month`, created when it is newer than both kept months;
    /// `None` for a month older than both (a request older than a month: dropped).
    fn month_mut(&mut self, month: i64) -> Option<&mut MonthState> {
        if let Some(i) = self.months.iter().position(|m| m.month == month) {
            return Some(&mut self.months[i]);
        }
        let oldest = usize::from(self.months[1].month < self.months[0].month);
        if self.months[oldest].month > month {
            return None;
        }
        self.months[oldest] = MonthState {
            month,
            ..MonthState::default()
        };
        Some(&mut self.months[oldest])
    }

    fn month(&self, month: i64) -> MonthState {
        self.months
            .iter()
            .find(|m| m.month == month)
            .copied()
            .unwrap_or(MonthState {
                month,
                ..MonthState::default()
            })
    }

    /// Like [`Self::month_mut`], for the ring of hours.
    fn hour_mut(&mut self, hour: u64) -> Option<&mut HourState> {
        let slot = &mut self.hours[(hour % HOURS_KEPT as u64) as usize];
        if slot.hour > hour {
            return None;
        }
        if slot.hour != hour {
            *slot = HourState {
                hour,
                ..HourState::default()
            };
        }
        Some(slot)
    }

    fn hour_spent(&self, hour: u64) -> u64 {
        let slot = &self.hours[(hour % HOURS_KEPT as u64) as usize];
        if slot.hour == hour {
            slot.spent
        } else {
            0
        }
    }

    fn headers(&self, rate: &Rate, now_s: u64) -> RateHeaders {
        RateHeaders {
            limit_requests: rate.rps,
            remaining_requests: rate.rps.map(|r| {
                if self.shared_rps_full {
                    0
                } else {
                    r.saturating_sub(self.second_count)
                }
            }),
            remaining_tokens: rate.tpm.map(|t| t.saturating_sub(self.tpm_used(now_s))),
        }
    }

    fn rate_refusal(
        &self,
        which: &'static str,
        retry_after_s: u64,
        rate: &Rate,
        now_s: u64,
    ) -> Refusal {
        Refusal::Rate {
            which,
            retry_after_s,
            headers: self.headers(rate, now_s),
        }
    }

    /// The rps and concurrency checks, shared by admission and the pre-check.
    fn check_rate(&self, rate: &Rate, mode: Mode, now_s: u64) -> Result<(), Refusal> {
        if rate
            .rps
            .is_some_and(|rps| self.second_count >= rps || self.shared_rps_full)
        {
            return Err(self.rate_refusal("rps", 1, rate, now_s));
        }
        if mode == Mode::Reserve && rate.concurrency.is_some_and(|c| self.in_flight >= c) {
            // A slot frees when any request ends; a second is a fair first guess.
            return Err(self.rate_refusal("concurrency", 1, rate, now_s));
        }
        Ok(())
    }
}

/// `a + b + c > limit`, without overflow.
fn exceeds(a: u64, b: u64, c: u64, limit: u64) -> bool {
    u128::from(a) + u128::from(b) + u128::from(c) > u128::from(limit)
}

#[derive(Debug, Default)]
pub(super) struct Store {
    tenants: Mutex<HashMap<String, TenantState>>,
}

impl Store {
    fn with<R>(&self, tenant: &str, f: impl FnOnce(&mut TenantState) -> R) -> R {
        // A panic elsewhere while holding the lock leaves counters that are still
        // consistent enough to go on with; refusing every tenant forever would not be.
        let mut map = match self.tenants.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        match map.get_mut(tenant) {
            Some(s) => f(s),
            None => f(map.entry(tenant.to_string()).or_default()),
        }
    }

    /// Checks every limit given and, if all fit, counts the request (and in
    /// [`Mode::Reserve`] reserves its demand and returns the hold to settle).
    pub(super) fn admit(
        &self,
        tenant: &str,
        rate: &Rate,
        budget: &Budget,
        demand: Demand,
        mode: Mode,
        now: Now,
    ) -> Result<(Option<Hold>, RateHeaders), Refusal> {
        let now_s = now.second;
        self.with(tenant, |s| {
            s.roll_second(now_s);
            s.check_rate(rate, mode, now_s)?;
            if mode == Mode::Reserve {
                if let Some(tpm) = rate.tpm {
                    let used = s.tpm_used(now_s);
                    if exceeds(used, demand.tokens, 0, tpm) {
                        // Room comes back when the oldest tokens age out of the window.
                        let oldest = s.tpm_in_window(now_s).map(|(sec, _)| *sec).min();
                        let retry = (oldest.unwrap_or(now_s) + TPM_WINDOW_S).saturating_sub(now_s);
                        return Err(s.rate_refusal("tpm", retry.max(1), rate, now_s));
                    }
                }
                if let Some(b) = budget.monthly_nanousd {
                    let m = s.month(now.month);
                    if exceeds(m.spent, m.reserved, demand.cost_nanousd, b) {
                        return Err(Refusal::Budget {
                            which: "monthly",
                            retry_after_s: now.secs_to_next_month(),
                            headers: s.headers(rate, now_s),
                        });
                    }
                }
                if let Some(b) = budget.hourly_nanousd {
                    let h = s.hour_mut(now.hour).copied().unwrap_or_default();
                    if exceeds(h.spent, h.reserved, demand.cost_nanousd, b) {
                        return Err(Refusal::Budget {
                            which: "hourly",
                            retry_after_s: now.secs_to_next_hour(),
                            headers: s.headers(rate, now_s),
                        });
                    }
                }
            }
            s.second_count = s.second_count.saturating_add(1);
            if let Some(m) = s.month_mut(now.month) {
                m.requests += 1;
            }
            if mode == Mode::RequestOnly {
                return Ok((None, s.headers(rate, now_s)));
            }
            s.in_flight = s.in_flight.saturating_add(1);
            let slot = &mut s.tpm[(now_s % TPM_WINDOW_S) as usize];
            if slot.0 != now_s {
                *slot = (now_s, 0);
            }
            slot.1 = slot.1.saturating_add(demand.tokens);
            if let Some(m) = s.month_mut(now.month) {
                m.reserved = m.reserved.saturating_add(demand.cost_nanousd);
            }
            if let Some(h) = s.hour_mut(now.hour) {
                h.reserved = h.reserved.saturating_add(demand.cost_nanousd);
            }
            let hold = Hold {
                month: now.month,
                hour: now.hour,
                second: now_s,
                tokens: demand.tokens,
                cost_nanousd: demand.cost_nanousd,
            };
            Ok((Some(hold), s.headers(rate, now_s)))
        })
    }

    /// Refuses when this node alone already has the tenant at its rps or concurrency
    /// limit: the shared count can only be higher, so the refusal is always right.
    pub(super) fn precheck(
        &self,
        tenant: &str,
        rate: &Rate,
        mode: Mode,
        now: Now,
    ) -> Result<(), Refusal> {
        self.with(tenant, |s| {
            s.roll_second(now.second);
            s.check_rate(rate, mode, now.second)
        })
    }

    /// The tenant's `x-ratelimit-*` values as they stand, counting nothing.
    pub(super) fn headers(&self, tenant: &str, rate: &Rate, now: Now) -> RateHeaders {
        self.with(tenant, |s| {
            s.roll_second(now.second);
            s.headers(rate, now.second)
        })
    }

    /// Remembers, until `now`'s second ends, that the shared store found the tenant's
    /// rps window full.
    pub(super) fn mark_rps_full(&self, tenant: &str, now: Now) {
        self.with(tenant, |s| {
            s.roll_second(now.second);
            s.shared_rps_full = true;
        })
    }

    /// Releases `hold`; with `actual`, records the real spend and tokens against the
    /// month and hour the hold was taken in.
    pub(super) fn settle(&self, tenant: &str, hold: &Hold, actual: Option<Actual>, now: Now) {
        let actual = actual.unwrap_or_default();
        self.with(tenant, |s| {
            s.in_flight = s.in_flight.saturating_sub(1);
            if let Some(m) = s.month_mut(hold.month) {
                m.reserved = m.reserved.saturating_sub(hold.cost_nanousd);
                m.spent = m.spent.saturating_add(actual.cost_nanousd);
                m.tokens_in = m.tokens_in.saturating_add(actual.tokens_in);
                m.tokens_out = m.tokens_out.saturating_add(actual.tokens_out);
            }
            if let Some(h) = s.hour_mut(hold.hour) {
                h.reserved = h.reserved.saturating_sub(hold.cost_nanousd);
                h.spent = h.spent.saturating_add(actual.cost_nanousd);
            }
            // The tokens window trades the reservation for the actual tokens, in the
            // second it was reserved in, while that second is still in the window.
            let slot = &mut s.tpm[(hold.second % TPM_WINDOW_S) as usize];
            if slot.0 == hold.second && now.second.saturating_sub(hold.second) < TPM_WINDOW_S {
                let tokens = actual.tokens_in.saturating_add(actual.tokens_out);
                slot.1 = slot.1.saturating_sub(hold.tokens).saturating_add(tokens);
            }
        })
    }

    pub(super) fn usage(&self, tenant: &Tenant, now: Now) -> UsageView {
        let m = self.with(&tenant.id, |s| s.month(now.month));
        let (this_hour, hourly_avg) = self.velocity(&tenant.id, now);
        view(
            tenant,
            Figures {
                month: now.month,
                spent: m.spent,
                reserved: m.reserved,
                tokens_in: m.tokens_in,
                tokens_out: m.tokens_out,
                requests: m.requests,
                this_hour,
                hourly_avg,
            },
        )
    }

    /// Settled spend of the current hour and the average of the 24 hours before it.
    pub(super) fn velocity(&self, tenant: &str, now: Now) -> (u64, u64) {
        self.with(tenant, |s| {
            let past: u64 = (1..=24)
                .map(|k| s.hour_spent(now.hour.saturating_sub(k)))
                .sum();
            (s.hour_spent(now.hour), past / 24)
        })
    }
}

/// One month's raw figures and the spend velocity, as either store keeps them.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Figures {
    pub month: i64,
    pub spent: u64,
    pub reserved: u64,
    pub tokens_in: u64,
    pub tokens_out: u64,
    pub requests: u64,
    pub this_hour: u64,
    pub hourly_avg: u64,
}

/// The usage view from raw figures (shared with the Redis store).
pub(super) fn view(tenant: &Tenant, f: Figures) -> UsageView {
    let budget = tenant.budget.monthly_nanousd;
    let remaining = budget.map(|b| b.saturating_sub(f.spent.saturating_add(f.reserved)));
    UsageView {
        tenant: tenant.id.clone(),
        month: month_label(f.month),
        spent_nanousd: f.spent,
        spent_usd: usd(f.spent),
        reserved_nanousd: f.reserved,
        budget_nanousd: budget,
        budget_usd: budget.map(usd),
        remaining_nanousd: remaining,
        remaining_usd: remaining.map(usd),
        tokens_in: f.tokens_in,
        tokens_out: f.tokens_out,
        requests: f.requests,
        spend_this_hour_nanousd: f.this_hour,
        spend_hourly_avg_nanousd: f.hourly_avg,
    }
}
