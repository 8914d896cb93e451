//! The in-process counter store: exact for a single node.
//!
//! One mutex-guarded entry per tenant; every check and reservation happens under that
//! lock, so concurrent admissions can never together overshoot a limit.

use super::{Actual, Demand, RateHeaders, Refusal, UsageView};
use crate::audit::time::civil_from_days;
use crate::config::Tenant;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Seconds in the tokens-per-minute window.
const TPM_WINDOW_S: usize = 60;
/// Hours kept for the spend-velocity average.
const HOURS_KEPT: usize = 25;

/// What an admitted request holds, to be released or settled.
#[derive(Debug, Clone)]
pub struct Hold {
    month: i64,
    hour: u64,
    second: u64,
    tokens: u64,
    cost_nanousd: u64,
}

#[derive(Debug)]
struct TenantState {
    second: u64,
    second_count: u32,
    in_flight: u32,
    /// Tokens per second over the last minute: `(second, tokens)` ring.
    tpm: [(u64, u64); TPM_WINDOW_S],
    month: i64,
    month_spent: u64,
    month_reserved: u64,
    tokens_in: u64,
    tokens_out: u64,
    requests: u64,
    /// Spend per UTC hour: `(hour, settled, reserved)` ring.
    hours: [(u64, u64, u64); HOURS_KEPT],
}

impl Default for TenantState {
    fn default() -> Self {
        TenantState {
            second: 0,
            second_count: 0,
            in_flight: 0,
            tpm: [(0, 0); TPM_WINDOW_S],
            month: 0,
            month_spent: 0,
            month_reserved: 0,
            tokens_in: 0,
            tokens_out: 0,
            requests: 0,
            hours: [(0, 0, 0); HOURS_KEPT],
        }
    }
}

/// Months since year 0, from Unix milliseconds: the key of a UTC calendar month.
fn month_of(ms: u64) -> i64 {
    let (y, m, _) = civil_from_days((ms / 1000 / 86_400) as i64);
    y * 12 + (m as i64 - 1)
}

/// Seconds until the first day of the next UTC month.
fn secs_to_next_month(ms: u64) -> u64 {
    let now_s = ms / 1000;
    let mut day = (now_s / 86_400) as i64;
    let start = month_of(ms);
    while month_of(day as u64 * 86_400_000) == start {
        day += 1;
    }
    (day as u64 * 86_400).saturating_sub(now_s).max(1)
}

fn month_label(month: i64) -> String {
    format!("{:04}-{:02}", month / 12, month % 12 + 1)
}

impl TenantState {
    fn roll(&mut self, now_ms: u64) {
        let sec = now_ms / 1000;
        if sec != self.second {
            self.second = sec;
            self.second_count = 0;
        }
        let month = month_of(now_ms);
        if month != self.month {
            // A new month: reservations still held by requests started last month are
            // released against their own month at settle time (see `settle`).
            self.month = month;
            self.month_spent = 0;
            self.month_reserved = 0;
            self.tokens_in = 0;
            self.tokens_out = 0;
            self.requests = 0;
        }
    }

    fn tpm_used(&self, now_s: u64) -> u64 {
        self.tpm
            .iter()
            .filter(|(s, _)| now_s.saturating_sub(*s) < TPM_WINDOW_S as u64)
            .map(|(_, t)| *t)
            .sum()
    }

    fn hour_slot(&mut self, hour: u64) -> &mut (u64, u64, u64) {
        let slot = &mut self.hours[(hour % HOURS_KEPT as u64) as usize];
        if slot.0 != hour {
            *slot = (hour, 0, 0);
        }
        slot
    }

    fn headers(&self, tenant: &Tenant, now_s: u64) -> RateHeaders {
        RateHeaders {
            limit_requests: tenant.rate.rps,
            remaining_requests: tenant.rate.rps.map(|r| r.saturating_sub(self.second_count)),
            remaining_tokens: tenant
                .rate
                .tpm
                .map(|t| t.saturating_sub(self.tpm_used(now_s))),
        }
    }
}

pub struct Store {
    clock: Arc<dyn Fn() -> u64 + Send + Sync>,
    tenants: Mutex<HashMap<String, TenantState>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("memory::Store")
    }
}

impl Store {
    pub fn new(clock: Arc<dyn Fn() -> u64 + Send + Sync>) -> Store {
        Store {
            clock,
            tenants: Mutex::new(HashMap::new()),
        }
    }

    fn with<R>(&self, tenant: &str, f: impl FnOnce(&mut TenantState) -> R) -> R {
        let mut map = match self.tenants.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        f(map.entry(tenant.to_string()).or_default())
    }

    pub(super) fn admit(
        &self,
        tenant: &Tenant,
        demand: Demand,
        reserve: bool,
    ) -> Result<(Hold, RateHeaders), Refusal> {
        let now = (self.clock)();
        let now_s = now / 1000;
        let hour = now_s / 3600;
        self.with(&tenant.id, |s| {
            s.roll(now);
            if let Some(rps) = tenant.rate.rps {
                if s.second_count >= rps {
                    return Err(Refusal::Rate {
                        which: "rps",
                        retry_after_s: 1,
                        headers: s.headers(tenant, now_s),
                    });
                }
            }
            if let Some(c) = tenant.rate.concurrency {
                if s.in_flight >= c {
                    return Err(Refusal::Rate {
                        which: "concurrency",
                        retry_after_s: 1,
                        headers: s.headers(tenant, now_s),
                    });
                }
            }
            if let Some(tpm) = tenant.rate.tpm {
                if s.tpm_used(now_s) + demand.tokens > tpm {
                    // Wait until the oldest tokens in the window have aged out.
                    let oldest = s
                        .tpm
                        .iter()
                        .filter(|(sec, t)| *t > 0 && now_s.saturating_sub(*sec) < 60)
                        .map(|(sec, _)| *sec)
                        .min()
                        .unwrap_or(now_s);
                    return Err(Refusal::Rate {
                        which: "tpm",
                        retry_after_s: (oldest + 60).saturating_sub(now_s).max(1),
                        headers: s.headers(tenant, now_s),
                    });
                }
            }
            if let Some(budget) = tenant.budget.monthly_nanousd {
                if s.month_spent + s.month_reserved + demand.cost_nanousd > budget {
                    return Err(Refusal::Budget {
                        which: "monthly",
                        retry_after_s: secs_to_next_month(now),
                    });
                }
            }
            if let Some(budget) = tenant.budget.hourly_nanousd {
                let (_, spent, reserved) = *s.hour_slot(hour);
                if spent + reserved + demand.cost_nanousd > budget {
                    return Err(Refusal::Budget {
                        which: "hourly",
                        retry_after_s: (hour + 1) * 3600 - now_s,
                    });
                }
            }
            s.second_count += 1;
            s.requests += 1;
            let hold = if reserve {
                s.in_flight += 1;
                let slot = &mut s.tpm[(now_s % TPM_WINDOW_S as u64) as usize];
                if slot.0 != now_s {
                    *slot = (now_s, 0);
                }
                slot.1 += demand.tokens;
                s.month_reserved += demand.cost_nanousd;
                s.hour_slot(hour).2 += demand.cost_nanousd;
                Hold {
                    month: s.month,
                    hour,
                    second: now_s,
                    tokens: demand.tokens,
                    cost_nanousd: demand.cost_nanousd,
                }
            } else {
                Hold {
                    month: s.month,
                    hour,
                    second: now_s,
                    tokens: 0,
                    cost_nanousd: 0,
                }
            };
            Ok((hold, s.headers(tenant, now_s)))
        })
    }

    /// Releases `hold`; with `actual`, records the real spend and tokens.
    pub(super) fn settle(&self, tenant: &str, hold: &Hold, actual: Option<Actual>) {
        let now = (self.clock)();
        let now_s = now / 1000;
        self.with(tenant, |s| {
            s.roll(now);
            s.in_flight = s.in_flight.saturating_sub(1);
            if s.month == hold.month {
                s.month_reserved = s.month_reserved.saturating_sub(hold.cost_nanousd);
            }
            {
                let slot = s.hour_slot(hold.hour);
                slot.2 = slot.2.saturating_sub(hold.cost_nanousd);
            }
            let actual = actual.unwrap_or_default();
            let tokens = actual.tokens_in + actual.tokens_out;
            let slot = &mut s.tpm[(hold.second % TPM_WINDOW_S as u64) as usize];
            if slot.0 == hold.second {
                slot.1 = slot.1.saturating_sub(hold.tokens) + tokens;
            } else if now_s.saturating_sub(hold.second) < TPM_WINDOW_S as u64 {
                slot.1 += tokens;
            }
            // Spend lands in the month and hour it settles in.
            s.month_spent += actual.cost_nanousd;
            s.tokens_in += actual.tokens_in;
            s.tokens_out += actual.tokens_out;
            s.hour_slot(now_s / 3600).1 += actual.cost_nanousd;
        });
    }

    pub(super) fn usage(&self, tenant: &Tenant) -> UsageView {
        let now = (self.clock)();
        let hour = now / 1000 / 3600;
        self.with(&tenant.id, |s| {
            s.roll(now);
            let this_hour = s.hour_slot(hour).1;
            let past: u64 = s
                .hours
                .iter()
                .filter(|(h, _, _)| *h < hour && hour - *h <= 24)
                .map(|(_, spent, _)| *spent)
                .sum();
            let budget = tenant.budget.monthly_nanousd;
            let remaining = budget.map(|b| b.saturating_sub(s.month_spent + s.month_reserved));
            UsageView {
                tenant: tenant.id.clone(),
                month: month_label(s.month),
                spent_nanousd: s.month_spent,
                spent_usd: super::usd(s.month_spent),
                reserved_nanousd: s.month_reserved,
                budget_nanousd: budget,
                budget_usd: budget.map(super::usd),
                remaining_nanousd: remaining,
                remaining_usd: remaining.map(super::usd),
                tokens_in: s.tokens_in,
                tokens_out: s.tokens_out,
                requests: s.requests,
                spend_this_hour_nanousd: this_hour,
                spend_hourly_avg_nanousd: past / 24,
            }
        })
    }
}
