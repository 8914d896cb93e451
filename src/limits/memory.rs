//! The in-process counter store.
//!
//! It is the whole truth for `counters.backend: memory` (one node). In front of Redis
//! the same store is this node's own view of each tenant: it rejects a tenant that is
//! over its rps or concurrency on this node alone without a round trip, and it is the
//! best-effort limiter while Redis is unreachable under `fail_open`.
//!
//! One mutex-guarded map of tenants, each entry holding the counters of the tenant and
//! of those of its keys that have limits of their own; every check and reservation of
//! both scopes happens under that one lock, so concurrent admissions can never
//! together overshoot a limit of either.

use super::calendar::{month_label, Now};
use super::{
    tighter, usd, Actual, Caps, Demand, KeyUsageView, RateHeaders, Refusal, Scope, SpendHours,
    Subject, UsageView,
};
use crate::config::{ApiKey, Rate, Tenant};
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

/// The counters of one scope: a tenant, or one key of it with limits of its own.
#[derive(Debug)]
struct ScopeState {
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

impl Default for ScopeState {
    fn default() -> Self {
        ScopeState {
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

impl ScopeState {
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

    /// Settled spend of the current hour and of each of the 24 before it.
    fn hours(&self, now: Now) -> SpendHours {
        let mut past = [0; 24];
        for (k, slot) in past.iter_mut().enumerate() {
            *slot = self.hour_spent(now.hour.saturating_sub(k as u64 + 1));
        }
        SpendHours {
            this_hour: self.hour_spent(now.hour),
            past,
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

    /// The rps and concurrency checks, shared by admission and the pre-check.
    fn check_rate(&self, rate: &Rate, mode: Mode) -> Result<(), Why> {
        if rate
            .rps
            .is_some_and(|rps| self.second_count >= rps || self.shared_rps_full)
        {
            return Err(Why::Rate("rps", 1));
        }
        if mode == Mode::Reserve && rate.concurrency.is_some_and(|c| self.in_flight >= c) {
            // A slot frees when any request ends; a second is a fair first guess.
            return Err(Why::Rate("concurrency", 1));
        }
        Ok(())
    }

    /// Every limit of `caps` against `demand`, changing nothing but the hour ring's
    /// slot (rolled to the current hour).
    fn check(&mut self, caps: &Caps, demand: Demand, mode: Mode, now: Now) -> Result<(), Why> {
        let now_s = now.second;
        self.check_rate(&caps.rate, mode)?;
        if mode == Mode::RequestOnly {
            return Ok(());
        }
        if let Some(tpm) = caps.rate.tpm {
            let used = self.tpm_used(now_s);
            if exceeds(used, demand.tokens, 0, tpm) {
                // Room comes back when the oldest tokens age out of the window.
                let oldest = self.tpm_in_window(now_s).map(|(sec, _)| *sec).min();
                let retry = (oldest.unwrap_or(now_s) + TPM_WINDOW_S).saturating_sub(now_s);
                return Err(Why::Rate("tpm", retry.max(1)));
            }
        }
        if let Some(b) = caps.budget.monthly_nanousd {
            let m = self.month(now.month);
            if exceeds(m.spent, m.reserved, demand.cost_nanousd, b) {
                return Err(Why::Budget("monthly", now.secs_to_next_month()));
            }
        }
        if let Some(b) = caps.budget.hourly_nanousd {
            let h = self.hour_mut(now.hour).copied().unwrap_or_default();
            if exceeds(h.spent, h.reserved, demand.cost_nanousd, b) {
                return Err(Why::Budget("hourly", now.secs_to_next_hour()));
            }
        }
        Ok(())
    }

    /// Counts the request and, in [`Mode::Reserve`], holds a slot and the demand.
    fn reserve(&mut self, demand: Demand, mode: Mode, now: Now) {
        let now_s = now.second;
        self.second_count = self.second_count.saturating_add(1);
        if let Some(m) = self.month_mut(now.month) {
            m.requests += 1;
        }
        if mode == Mode::RequestOnly {
            return;
        }
        self.in_flight = self.in_flight.saturating_add(1);
        let slot = &mut self.tpm[(now_s % TPM_WINDOW_S) as usize];
        if slot.0 != now_s {
            *slot = (now_s, 0);
        }
        slot.1 = slot.1.saturating_add(demand.tokens);
        if let Some(m) = self.month_mut(now.month) {
            m.reserved = m.reserved.saturating_add(demand.cost_nanousd);
        }
        if let Some(h) = self.hour_mut(now.hour) {
            h.reserved = h.reserved.saturating_add(demand.cost_nanousd);
        }
    }

    /// Gives back what `hold` took; with `actual`, records the real spend and tokens.
    fn settle(&mut self, hold: &Hold, actual: Actual, now: Now) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if let Some(m) = self.month_mut(hold.month) {
            m.reserved = m.reserved.saturating_sub(hold.cost_nanousd);
            m.spent = m.spent.saturating_add(actual.cost_nanousd);
            m.tokens_in = m.tokens_in.saturating_add(actual.tokens_in);
            m.tokens_out = m.tokens_out.saturating_add(actual.tokens_out);
        }
        if let Some(h) = self.hour_mut(hold.hour) {
            h.reserved = h.reserved.saturating_sub(hold.cost_nanousd);
            h.spent = h.spent.saturating_add(actual.cost_nanousd);
        }
        // The tokens window trades the reservation for the actual tokens, in the
        // second it was reserved in, while that second is still in the window.
        let slot = &mut self.tpm[(hold.second % TPM_WINDOW_S) as usize];
        if slot.0 == hold.second && now.second.saturating_sub(hold.second) < TPM_WINDOW_S {
            let tokens = actual.tokens_in.saturating_add(actual.tokens_out);
            slot.1 = slot.1.saturating_sub(hold.tokens).saturating_add(tokens);
        }
    }
}

/// Why one scope refused, before the refusal is told which scope and given the
/// headers of both.
#[derive(Debug, Clone, Copy)]
enum Why {
    Rate(&'static str, u64),
    Budget(&'static str, u64),
}

impl Why {
    fn refusal(self, scope: Scope, headers: RateHeaders) -> Refusal {
        match self {
            Why::Rate(which, retry_after_s) => Refusal::Rate {
                scope,
                which,
                retry_after_s,
                headers,
            },
            Why::Budget(which, retry_after_s) => Refusal::Budget {
                scope,
                which,
                retry_after_s,
                headers,
            },
        }
    }
}

/// A tenant's counters and those of its keys with limits of their own, under one lock.
#[derive(Debug, Default)]
struct Entry {
    tenant: ScopeState,
    keys: HashMap<String, ScopeState>,
}

/// `a + b + c > limit`, without overflow.
fn exceeds(a: u64, b: u64, c: u64, limit: u64) -> bool {
    u128::from(a) + u128::from(b) + u128::from(c) > u128::from(limit)
}

#[derive(Debug, Default)]
pub(super) struct Store {
    tenants: Mutex<HashMap<String, Entry>>,
}

impl Store {
    /// Whether this node has counted anything for the tenant since it started.
    pub(super) fn has(&self, tenant: &str) -> bool {
        match self.tenants.lock() {
            Ok(m) => m.contains_key(tenant),
            Err(p) => p.into_inner().contains_key(tenant),
        }
    }

    /// Runs `f` on the tenant's counters and, when `key` is given, on that key's,
    /// both under the one lock (created empty when new).
    fn with<R>(
        &self,
        tenant: &str,
        key: Option<&str>,
        f: impl FnOnce(&mut ScopeState, Option<&mut ScopeState>) -> R,
    ) -> R {
        // A panic elsewhere while holding the lock leaves counters that are still
        // consistent enough to go on with; refusing every tenant forever would not be.
        let mut map = match self.tenants.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        // Looked up before inserting, so that ids are only copied for a new entry.
        match map.get_mut(tenant) {
            Some(e) => with_entry(e, key, f),
            None => with_entry(map.entry(tenant.to_string()).or_default(), key, f),
        }
    }

    /// Checks every limit of both scopes of `who` and, only if all fit, counts the
    /// request in both (and in [`Mode::Reserve`] reserves its demand in both and
    /// returns the hold to settle).
    pub(super) fn admit(
        &self,
        who: &Subject,
        demand: Demand,
        mode: Mode,
        now: Now,
    ) -> Result<(Option<Hold>, RateHeaders), Refusal> {
        let key_caps = who.key.map(|(_, c)| c);
        self.with(who.tenant, who.key.map(|(k, _)| k), |t, mut k| {
            t.roll_second(now.second);
            if let Some(k) = k.as_deref_mut() {
                k.roll_second(now.second);
            }
            let headers = |t: &ScopeState, k: Option<&ScopeState>| {
                both_headers(t, &who.caps, k.zip(key_caps.as_ref()), now.second)
            };
            if let Err(why) = t.check(&who.caps, demand, mode, now) {
                return Err(why.refusal(Scope::Tenant, headers(t, k.as_deref())));
            }
            if let (Some(ks), Some(kc)) = (k.as_deref_mut(), key_caps.as_ref()) {
                if let Err(why) = ks.check(kc, demand, mode, now) {
                    return Err(why.refusal(Scope::Key, headers(t, Some(ks))));
                }
            }
            t.reserve(demand, mode, now);
            if let Some(k) = k.as_deref_mut() {
                k.reserve(demand, mode, now);
            }
            let hold = (mode == Mode::Reserve).then_some(Hold {
                month: now.month,
                hour: now.hour,
                second: now.second,
                tokens: demand.tokens,
                cost_nanousd: demand.cost_nanousd,
            });
            Ok((hold, headers(t, k.as_deref())))
        })
    }

    /// Refuses when this node alone already has the tenant or the key at its rps or
    /// concurrency limit: the shared count can only be higher, so the refusal is
    /// always right.
    pub(super) fn precheck(&self, who: &Subject, mode: Mode, now: Now) -> Result<(), Refusal> {
        let key_caps = who.key.map(|(_, c)| c);
        self.with(who.tenant, who.key.map(|(k, _)| k), |t, mut k| {
            t.roll_second(now.second);
            if let Some(k) = k.as_deref_mut() {
                k.roll_second(now.second);
            }
            let refused = match t.check_rate(&who.caps.rate, mode) {
                Err(why) => Some((Scope::Tenant, why)),
                Ok(()) => match (k.as_deref(), key_caps.as_ref()) {
                    (Some(ks), Some(kc)) => {
                        ks.check_rate(&kc.rate, mode).err().map(|w| (Scope::Key, w))
                    }
                    _ => None,
                },
            };
            match refused {
                None => Ok(()),
                Some((scope, why)) => Err(why.refusal(
                    scope,
                    both_headers(
                        t,
                        &who.caps,
                        k.as_deref().zip(key_caps.as_ref()),
                        now.second,
                    ),
                )),
            }
        })
    }

    /// The `x-ratelimit-*` values of `who` as they stand (the tighter scope's),
    /// counting nothing.
    pub(super) fn headers(&self, who: &Subject, now: Now) -> RateHeaders {
        let key_caps = who.key.map(|(_, c)| c);
        self.with(who.tenant, who.key.map(|(k, _)| k), |t, mut k| {
            t.roll_second(now.second);
            if let Some(k) = k.as_deref_mut() {
                k.roll_second(now.second);
            }
            both_headers(
                t,
                &who.caps,
                k.as_deref().zip(key_caps.as_ref()),
                now.second,
            )
        })
    }

    /// Remembers, until `now`'s second ends, that the shared store found the rps
    /// window of `scope` full.
    pub(super) fn mark_rps_full(&self, who: &Subject, scope: Scope, now: Now) {
        let key = match scope {
            Scope::Tenant => None,
            Scope::Key => who.key.map(|(k, _)| k),
        };
        if scope == Scope::Key && key.is_none() {
            return;
        }
        self.with(who.tenant, key, |t, k| {
            let s = k.unwrap_or(t);
            s.roll_second(now.second);
            s.shared_rps_full = true;
        })
    }

    /// Releases `hold` in the tenant's and (given) the key's counters; with `actual`,
    /// records the real spend and tokens against the month and hour the hold was
    /// taken in.
    pub(super) fn settle(
        &self,
        tenant: &str,
        key: Option<&str>,
        hold: &Hold,
        actual: Option<Actual>,
        now: Now,
    ) {
        let actual = actual.unwrap_or_default();
        self.with(tenant, key, |t, k| {
            t.settle(hold, actual, now);
            if let Some(k) = k {
                k.settle(hold, actual, now);
            }
        })
    }

    pub(super) fn usage(&self, tenant: &Tenant, now: Now) -> UsageView {
        let (m, this_hour, hourly_avg) = self.with(&tenant.id, None, |s, _| {
            let hours = s.hours(now);
            (s.month(now.month), hours.this_hour, hours.avg24())
        });
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

    /// The key's own figures; none for a key whose counters were never kept (one
    /// without limits of its own), without creating any.
    pub(super) fn key_usage(&self, tenant: &Tenant, key: &ApiKey, now: Now) -> KeyUsageView {
        let map = match self.tenants.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        let figures = map
            .get(&tenant.id)
            .and_then(|e| e.keys.get(&key.id))
            .map(|s| {
                let m = s.month(now.month);
                let slot = &s.hours[(now.hour % HOURS_KEPT as u64) as usize];
                let (hour_spent, hour_reserved) = if slot.hour == now.hour {
                    (slot.spent, slot.reserved)
                } else {
                    (0, 0)
                };
                KeyFigures {
                    month: now.month,
                    spent: m.spent,
                    reserved: m.reserved,
                    tokens_in: m.tokens_in,
                    tokens_out: m.tokens_out,
                    requests: m.requests,
                    hour_spent,
                    hour_reserved,
                }
            })
            .unwrap_or(KeyFigures {
                month: now.month,
                ..KeyFigures::default()
            });
        key_view(tenant, key, figures)
    }

    /// Settled spend of the current hour and of each of the 24 hours before it.
    pub(super) fn hours(&self, tenant: &str, now: Now) -> SpendHours {
        self.with(tenant, None, |s, _| s.hours(now))
    }

    /// How many keys of `tenant` have counters of their own.
    #[cfg(test)]
    pub(super) fn key_states(&self, tenant: &str) -> usize {
        let map = match self.tenants.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        map.get(tenant).map_or(0, |e| e.keys.len())
    }
}

fn with_entry<R>(
    e: &mut Entry,
    key: Option<&str>,
    f: impl FnOnce(&mut ScopeState, Option<&mut ScopeState>) -> R,
) -> R {
    let Entry { tenant, keys } = e;
    match key {
        None => f(tenant, None),
        Some(k) => match keys.get_mut(k) {
            Some(ks) => f(tenant, Some(ks)),
            None => f(tenant, Some(keys.entry(k.to_string()).or_default())),
        },
    }
}

/// The `x-ratelimit-*` values of the tenant's counters and, when kept, the key's: the
/// tighter of the two.
fn both_headers(
    t: &ScopeState,
    caps: &Caps,
    key: Option<(&ScopeState, &Caps)>,
    now_s: u64,
) -> RateHeaders {
    let th = t.headers(&caps.rate, now_s);
    match key {
        Some((k, kc)) => tighter(th, k.headers(&kc.rate, now_s)),
        None => th,
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

/// A key's raw figures for this month and hour, as either store keeps them.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct KeyFigures {
    pub month: i64,
    pub spent: u64,
    pub reserved: u64,
    pub tokens_in: u64,
    pub tokens_out: u64,
    pub requests: u64,
    pub hour_spent: u64,
    pub hour_reserved: u64,
}

/// The key usage view from raw figures (shared with the Redis store).
pub(super) fn key_view(tenant: &Tenant, key: &ApiKey, f: KeyFigures) -> KeyUsageView {
    let budget = key.budget.monthly_nanousd;
    let remaining = budget.map(|b| b.saturating_sub(f.spent.saturating_add(f.reserved)));
    let hourly = key.budget.hourly_nanousd;
    let hourly_remaining =
        hourly.map(|b| b.saturating_sub(f.hour_spent.saturating_add(f.hour_reserved)));
    KeyUsageView {
        tenant: tenant.id.clone(),
        key_id: key.id.clone(),
        tracked: key.has_limits(),
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
        spend_this_hour_nanousd: f.hour_spent,
        spend_this_hour_usd: usd(f.hour_spent),
        hourly_budget_nanousd: hourly,
        hourly_budget_usd: hourly.map(usd),
        hourly_remaining_nanousd: hourly_remaining,
        hourly_remaining_usd: hourly_remaining.map(usd),
    }
}
