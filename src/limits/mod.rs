//! Per-tenant and per-key rate limits and budgets, enforced before anything goes
//! upstream.
//!
//! Two scopes: the tenant, and the API key when it has limits of its own
//! ([`ApiKey::has_limits`]). A request must fit both; both are checked and reserved
//! together, atomically (one lock in memory, one script on Redis), and settled
//! together, so neither scope can be overshot by a race. A key without limits of its
//! own costs nothing extra: no counters are kept for it. A key's counters are named
//! `TENANT/KEY`, which no tenant can be called (tenant ids never contain `/`).
//!
//! Reserve, then settle: admission reserves the request's largest possible tokens and
//! cost (prompt estimated conservatively plus the output bound the adapters send
//! upstream); the end of the call settles to the actual usage and releases the rest.
//! Admission refuses when `spent + reserved + demand > budget`, so a tenant's settled
//! spend never exceeds its budget however many requests race: every admitted request
//! already holds its worst case.
//!
//! Two stores behind [`Limits`]:
//! - `memory` (`memory::Store`): exact for one node.
//! - `redis` (`redis::Shared`): exact across every edge node sharing the Redis, one
//!   Lua script per admission. In front of it, this node's own memory store is a
//!   pre-check that only ever refuses early (a tenant already at its rps or
//!   concurrency limit on this node alone is over it globally too, and one whose
//!   rps Redis refused this second stays refused until the second ends), so a
//!   flooding tenant costs no round trip; it never admits on its own, because
//!   budgets must be exact and shared, and every admission needs the one round trip
//!   anyway.
//!   Tenants with no limit and no budget at all, asked through a key without limits
//!   of its own, skip the admission round trip; their request is counted when it
//!   settles.
//!
//! Windows: rps counts per UTC second; tpm is a sliding 60 s of per-second buckets
//! (reserved tokens in the admission second, traded for the actual ones at settle);
//! the monthly budget is the UTC calendar month; the hourly budget uses fixed UTC
//! hours (`14:00-15:00`), not a sliding hour, so a tenant could spend up to twice
//! `hourly_usd` in the 60 minutes around a boundary. Spend is attributed to the month
//! and hour the request started in, like the audit row's `ts`.

mod calendar;
mod conn;
mod guard;
mod memory;
mod quota;
mod redis;

pub use guard::{
    Change as GuardChange, Figures as GuardFigures, GuardView, SpendHours, GUARD_TICK,
};
pub use quota::{MinuteUse, Take, COOLDOWN_POLL};

use crate::config::{ApiKey, Budget, Counters, GuardAction, OnError, Rate, Tenant};
use calendar::Now;
use guard::guarded;
use memory::{Mode, Store};
use serde::Serialize;
use std::sync::Arc;

/// Unix milliseconds; injectable so tests can cross hour and month boundaries.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Amounts above this (about 2.3 billion USD) are clamped: Redis adds them as signed
/// 64-bit integers, and no single request comes near.
const MAX_AMOUNT: u64 = i64::MAX as u64 / 4;

/// The most a request may consume, reserved at admission.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Demand {
    pub tokens: u64,
    pub cost_nanousd: u64,
}

/// What a request actually consumed, settled at its end.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Actual {
    pub tokens_in: u64,
    pub tokens_out: u64,
    pub cost_nanousd: u64,
}

/// Values for the `x-ratelimit-*` response headers (`None`: no such limit).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RateHeaders {
    pub limit_requests: Option<u32>,
    pub remaining_requests: Option<u32>,
    pub remaining_tokens: Option<u64>,
}

/// Whose limit a refusal is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Tenant,
    Key,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Tenant => "tenant",
            Scope::Key => "key",
        }
    }

    /// How the client is told whose limit it is ("this API key").
    fn phrase(self) -> &'static str {
        match self {
            Scope::Tenant => "this tenant",
            Scope::Key => "this API key",
        }
    }
}

/// Why a request was not admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// 429 `rate_limited`; `which` is `rps`, `tpm` or `concurrency`.
    Rate {
        scope: Scope,
        which: &'static str,
        retry_after_s: u64,
        headers: RateHeaders,
    },
    /// 402 `budget_exceeded`; `which` is `monthly` or `hourly`, and `retry_after_s`
    /// runs until that month or hour rolls over.
    Budget {
        scope: Scope,
        which: &'static str,
        retry_after_s: u64,
        headers: RateHeaders,
    },
    /// 400 `invalid_request`: the request's worst case is above a limit as a whole
    /// (`which`: `tpm`, `monthly` or `hourly`), so it would never be admitted and
    /// telling the client to retry would be a lie. `demand` and `limit` are tokens
    /// for `tpm`, nano-USD for the budgets.
    NeverFits {
        scope: Scope,
        which: &'static str,
        demand: u64,
        limit: u64,
    },
    /// The spend guard is engaged: 429 `spend_guard` above `throttle_rps` when it
    /// throttles, 402 `spend_guard` for every request when it blocks.
    Guard {
        action: GuardAction,
        throttle_rps: u32,
        retry_after_s: u64,
        headers: RateHeaders,
    },
    /// The shared store is unreachable and `on_error` is `fail_closed`.
    Unavailable(String),
}

impl Refusal {
    /// The message the client reads: which limit, and whose.
    pub fn message(&self) -> String {
        match self {
            Refusal::Rate { scope, which, .. } => {
                let what = match *which {
                    "rps" => "requests per second",
                    "tpm" => "tokens per minute",
                    _ => "concurrent requests",
                };
                format!("rate limit exceeded for {}: {what}", scope.phrase())
            }
            Refusal::Budget { scope, which, .. } => format!(
                "budget exceeded for {}: {which} (this request could cost more than what is left)",
                scope.phrase()
            ),
            Refusal::NeverFits {
                scope,
                which: "tpm",
                demand,
                limit,
            } => format!(
                "this request can use up to {demand} tokens (max_tokens plus the prompt), above \
                 {}'s limit of {limit} tokens per minute: lower max_tokens",
                scope.phrase()
            ),
            Refusal::NeverFits {
                scope,
                which,
                demand,
                limit,
            } => format!(
                "this request can cost up to {} USD (max_tokens plus the prompt, at the model's \
                 prices), above {}'s whole {which} budget of {} USD: lower max_tokens",
                usd(*demand),
                scope.phrase(),
                usd(*limit)
            ),
            Refusal::Guard {
                action: GuardAction::Block,
                ..
            } => "spend guard engaged for this tenant: its spend this hour is far above its \
                  normal, so requests are refused until the hour ends below the threshold or \
                  an operator clears it"
                .to_string(),
            Refusal::Guard { throttle_rps, .. } => format!(
                "spend guard engaged for this tenant: its spend this hour is far above its \
                 normal, so it is held to {throttle_rps} requests per second"
            ),
            Refusal::Unavailable(e) => {
                format!("the shared rate-limit store is unreachable (on_error: fail_closed): {e}")
            }
        }
    }
}

/// The limits of one scope.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Caps {
    pub rate: Rate,
    pub budget: Budget,
}

impl Caps {
    fn none(self) -> bool {
        self == Caps::default()
    }
}

/// Who a request is counted against: its tenant and, for a key with limits of its
/// own, that key.
#[derive(Debug, Clone, Copy)]
pub(super) struct Subject<'a> {
    pub tenant: &'a str,
    pub caps: Caps,
    /// The key's id and limits; `None` for a key without limits of its own, which
    /// is then not counted apart at all.
    pub key: Option<(&'a str, Caps)>,
}

impl<'a> Subject<'a> {
    fn of(tenant: &'a Tenant, key: &'a ApiKey) -> Subject<'a> {
        Subject {
            tenant: &tenant.id,
            caps: Caps {
                rate: tenant.rate,
                budget: tenant.budget,
            },
            key: key.has_limits().then_some((
                key.id.as_str(),
                Caps {
                    rate: key.rate,
                    budget: key.budget,
                },
            )),
        }
    }

    /// The same scopes with every limit changed by `f` (the local record of a Redis
    /// admission enforces none; a fail-open one only rps and concurrency).
    fn map_caps(self, f: impl Fn(Caps) -> Caps) -> Subject<'a> {
        Subject {
            tenant: self.tenant,
            caps: f(self.caps),
            key: self.key.map(|(k, c)| (k, f(c))),
        }
    }

    /// Each scope with its limits, the tenant first.
    fn scopes(&self) -> impl Iterator<Item = (Scope, Caps)> {
        std::iter::once((Scope::Tenant, self.caps)).chain(self.key.map(|(_, c)| (Scope::Key, c)))
    }

    /// Nothing to enforce in any scope: no admission round trip is needed.
    fn unlimited(&self) -> bool {
        self.caps.none() && self.key.is_none_or(|(_, c)| c.none())
    }

    /// Some scope has an rps or concurrency limit (what the pre-check looks at).
    fn has_rate_or_concurrency(&self) -> bool {
        self.scopes()
            .any(|(_, c)| c.rate.rps.is_some() || c.rate.concurrency.is_some())
    }

    /// A scope whose limit `demand` exceeds on its own, whatever else is in flight. A
    /// limit of 0 is not one: it is the operator's way to pause a tenant or key, which
    /// a smaller request would not get past either, so it stays a plain refusal (402
    /// or 429) as the config check warns.
    fn never_fits(&self, demand: Demand) -> Option<Refusal> {
        self.scopes().find_map(|(scope, c)| {
            let over = |which: &'static str, demand: u64, limit: Option<u64>| {
                limit
                    .filter(|l| *l > 0 && demand > *l)
                    .map(|limit| Refusal::NeverFits {
                        scope,
                        which,
                        demand,
                        limit,
                    })
            };
            over("tpm", demand.tokens, c.rate.tpm)
                .or_else(|| over("monthly", demand.cost_nanousd, c.budget.monthly_nanousd))
                .or_else(|| over("hourly", demand.cost_nanousd, c.budget.hourly_nanousd))
        })
    }
}

/// The `x-ratelimit-*` values of the tighter of two scopes: the fewer requests left
/// (with the limit of the scope that leaves them; with no count known, the smaller
/// limit) and the fewer tokens left.
pub(super) fn tighter(a: RateHeaders, b: RateHeaders) -> RateHeaders {
    let requests = [&a, &b]
        .into_iter()
        .filter(|h| h.limit_requests.is_some())
        .min_by_key(|h| (h.remaining_requests, h.limit_requests))
        .map(|h| (h.limit_requests, h.remaining_requests))
        .unwrap_or((None, None));
    let remaining_tokens = match (a.remaining_tokens, b.remaining_tokens) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    };
    RateHeaders {
        limit_requests: requests.0,
        remaining_requests: requests.1,
        remaining_tokens,
    }
}

/// This month's figures for `GET /admin/v1/tenants/{id}/usage`.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct UsageView {
    pub tenant: String,
    /// `YYYY-MM`, UTC.
    pub month: String,
    /// Settled spend of requests started this month.
    pub spent_nanousd: u64,
    pub spent_usd: String,
    /// Held by requests in flight.
    pub reserved_nanousd: u64,
    pub budget_nanousd: Option<u64>,
    pub budget_usd: Option<String>,
    /// `budget - spent - reserved`: what new requests may still reserve.
    pub remaining_nanousd: Option<u64>,
    pub remaining_usd: Option<String>,
    pub tokens_in: u64,
    pub tokens_out: u64,
    pub requests: u64,
    /// Settled spend of requests started in the current UTC hour.
    pub spend_this_hour_nanousd: u64,
    /// Average settled spend per hour over the 24 hours before the current one (the
    /// baseline of the spend velocity).
    pub spend_hourly_avg_nanousd: u64,
}

/// This month's and this hour's figures of one API key with limits of its own, for
/// the admin API. A key without limits of its own is not counted apart (its requests
/// are in its tenant's usage only): then `tracked` is false and every figure 0.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct KeyUsageView {
    pub tenant: String,
    pub key_id: String,
    pub tracked: bool,
    /// `YYYY-MM`, UTC.
    pub month: String,
    /// Settled spend of the key's requests started this month.
    pub spent_nanousd: u64,
    pub spent_usd: String,
    /// Held by the key's requests in flight.
    pub reserved_nanousd: u64,
    /// The key's own monthly budget.
    pub budget_nanousd: Option<u64>,
    pub budget_usd: Option<String>,
    /// `budget - spent - reserved`.
    pub remaining_nanousd: Option<u64>,
    pub remaining_usd: Option<String>,
    pub tokens_in: u64,
    pub tokens_out: u64,
    pub requests: u64,
    /// Settled spend of the key's requests started in the current UTC hour.
    pub spend_this_hour_nanousd: u64,
    pub spend_this_hour_usd: String,
    /// The key's own hourly budget, and what this hour still leaves of it (after
    /// what is settled and what is held).
    pub hourly_budget_nanousd: Option<u64>,
    pub hourly_budget_usd: Option<String>,
    pub hourly_remaining_nanousd: Option<u64>,
    pub hourly_remaining_usd: Option<String>,
}

/// Exact decimal USD from nano-USD (`"12.000000500"`), for people.
pub fn usd(nanousd: u64) -> String {
    format!("{}.{:09}", nanousd / 1_000_000_000, nanousd % 1_000_000_000)
}

struct Inner {
    clock: Clock,
    /// The whole store for `memory`; this node's view in front of Redis.
    local: Store,
    shared: Option<Arc<redis::Shared>>,
    /// Deployment quotas: the whole store for `memory`, the fallback on Redis.
    quota: quota::Local,
    /// The spend guards' state on this node.
    guard: guard::Board,
}

impl Inner {
    fn now(&self) -> Now {
        Now::at((self.clock)())
    }
}

/// An admitted request's hold on its tenant's (and its key's) counters; settle it
/// exactly once with [`Limits::settle`]. Dropping it unsettled (a cancelled or
/// panicked task) releases the hold, so neither the concurrency slot nor the
/// reservation leaks.
pub struct Ticket {
    pub headers: RateHeaders,
    hold: Option<Hold>,
}

struct Hold {
    inner: Arc<Inner>,
    tenant: String,
    /// The key's id when its own counters hold the request too.
    key: Option<String>,
    local: memory::Hold,
    remote: Option<redis::RemoteHold>,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket")
            .field("headers", &self.headers)
            .field("tenant", &self.hold.as_ref().map(|h| &h.tenant))
            .field("key", &self.hold.as_ref().map(|h| &h.key))
            .finish()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(h) = self.hold.take() {
            h.inner
                .local
                .settle(&h.tenant, h.key.as_deref(), &h.local, None, h.inner.now());
            if let (Some(remote), Some(shared)) = (h.remote, &h.inner.shared) {
                shared.release_in_background(remote);
            }
        }
    }
}

/// The limits and budgets of every tenant and key, on the configured counter store.
/// Cheap to clone; clones share the counters.
#[derive(Clone)]
pub struct Limits {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let backend = if self.inner.shared.is_some() {
            "redis"
        } else {
            "memory"
        };
        f.debug_struct("Limits").field("backend", &backend).finish()
    }
}

impl Limits {
    /// No I/O: Redis is connected on first use, and reconnected whenever it is lost.
    pub fn new(conf: &Counters) -> Limits {
        Limits::with_clock(conf, Arc::new(crate::audit::time::now_ms))
    }

    /// On a given clock (Unix milliseconds), for tests that cross boundaries.
    pub fn with_clock(conf: &Counters, clock: Clock) -> Limits {
        let shared = match conf {
            Counters::Memory => None,
            Counters::Redis { url, on_error } => Some(Arc::new(redis::Shared::new(
                url,
                *on_error == OnError::FailOpen,
                clock.clone(),
            ))),
        };
        Limits {
            inner: Arc::new(Inner {
                clock,
                local: Store::default(),
                shared,
                quota: quota::Local::default(),
                guard: guard::Board::default(),
            }),
        }
    }

    /// Checks rps, concurrency, tpm, the monthly and the hourly budget of the tenant
    /// and of the key (when it has limits of its own) and, if all fit, reserves in
    /// both: one request, one slot in flight, `demand.tokens` in the tokens window and
    /// `demand.cost_nanousd` against the month and the hour. Atomic across concurrent
    /// callers (and, on Redis, across nodes). A demand above a limit as a whole is
    /// refused with [`Refusal::NeverFits`] before any counter is read.
    pub async fn admit(
        &self,
        tenant: &Tenant,
        key: &ApiKey,
        demand: Demand,
    ) -> Result<Ticket, Refusal> {
        let (who, throttle) = self.subject(tenant, key)?;
        self.admit_who(who, demand)
            .await
            .map_err(|r| guarded(r, throttle))
    }

    async fn admit_who(&self, who: Subject<'_>, demand: Demand) -> Result<Ticket, Refusal> {
        if let Some(r) = who.never_fits(demand) {
            return Err(r);
        }
        let demand = Demand {
            tokens: demand.tokens.min(MAX_AMOUNT),
            cost_nanousd: demand.cost_nanousd.min(MAX_AMOUNT),
        };
        let inner = &self.inner;
        let now = inner.now();
        let Some(shared) = &inner.shared else {
            let (hold, headers) = inner.local.admit(&who, demand, Mode::Reserve, now)?;
            return Ok(self.ticket(&who, hold, None, headers));
        };
        inner.local.precheck(&who, Mode::Reserve, now)?;
        let (remote, headers) = if who.unlimited() {
            (shared.unregistered(&who, now), RateHeaders::default())
        } else {
            match shared.admit(&who, Some(demand), now).await {
                Ok((Some(remote), headers)) => (remote, headers),
                Ok((None, headers)) => (shared.unregistered(&who, now), headers),
                Err(redis::Failure::Refused(r)) => return Err(self.remember(&who, r, now)),
                Err(redis::Failure::Down(e)) if !shared.fail_open => {
                    return Err(Refusal::Unavailable(e))
                }
                Err(redis::Failure::Down(_)) => {
                    // fail_open: this node's own count of rps and concurrency is the
                    // best that can be enforced; budgets and tpm go unchecked.
                    let local = who.map_caps(|c| Caps {
                        rate: Rate {
                            tpm: None,
                            ..c.rate
                        },
                        budget: Budget::default(),
                    });
                    let (hold, headers) = inner.local.admit(&local, demand, Mode::Reserve, now)?;
                    let remote = shared.unregistered(&who, now);
                    return Ok(self.ticket(&who, hold, Some(remote), headers));
                }
            }
        };
        // Admitted by Redis: record it on this node too, for the pre-check.
        let record = who.map_caps(|_| Caps::default());
        let (hold, _) = inner.local.admit(&record, demand, Mode::Reserve, now)?;
        Ok(self.ticket(&who, hold, Some(remote), headers))
    }

    /// A shared-store refusal, noted locally when it is one that lasts: a full rps
    /// window stays full until its second ends, so the rest of that second's requests
    /// from this tenant (or key) are refused by the pre-check, before their body is
    /// read and without a round trip, even when no single node is over the limit by
    /// itself.
    fn remember(&self, who: &Subject, r: Refusal, now: Now) -> Refusal {
        if let Refusal::Rate {
            which: "rps",
            scope,
            ..
        } = r
        {
            self.inner.local.mark_rps_full(who, scope, now);
        }
        r
    }

    fn ticket(
        &self,
        who: &Subject,
        local: Option<memory::Hold>,
        remote: Option<redis::RemoteHold>,
        headers: RateHeaders,
    ) -> Ticket {
        Ticket {
            headers,
            hold: local.map(|local| Hold {
                inner: self.inner.clone(),
                tenant: who.tenant.to_string(),
                key: who.key.map(|(k, _)| k.to_string()),
                local,
                remote,
            }),
        }
    }

    /// Exactly once per admitted request, at its end: releases the slot and the
    /// reservation in every scope that holds them and records the actual spend and
    /// tokens there (an actual cost above the reservation is recorded as it is).
    pub async fn settle(&self, mut ticket: Ticket, actual: Actual) {
        let Some(h) = ticket.hold.take() else {
            return;
        };
        let actual = Actual {
            tokens_in: actual.tokens_in.min(MAX_AMOUNT),
            tokens_out: actual.tokens_out.min(MAX_AMOUNT),
            cost_nanousd: actual.cost_nanousd.min(MAX_AMOUNT),
        };
        let now = h.inner.now();
        h.inner
            .local
            .settle(&h.tenant, h.key.as_deref(), &h.local, Some(actual), now);
        if let (Some(remote), Some(shared)) = (h.remote, &h.inner.shared) {
            shared.settle(remote, actual, now).await;
        }
    }

    /// Counts a request that costs nothing (a cache hit) against rps only, the
    /// tenant's and the key's.
    pub async fn admit_request_only(
        &self,
        tenant: &Tenant,
        key: &ApiKey,
    ) -> Result<RateHeaders, Refusal> {
        let (who, throttle) = self.subject(tenant, key)?;
        let now = self.inner.now();
        self.count_request(who, now)
            .await
            .map_err(|r| guarded(r, throttle))
    }

    async fn count_request(&self, who: Subject<'_>, now: Now) -> Result<RateHeaders, Refusal> {
        let inner = &self.inner;
        let none = Demand::default();
        let Some(shared) = &inner.shared else {
            let (_, headers) = inner.local.admit(&who, none, Mode::RequestOnly, now)?;
            return Ok(headers);
        };
        inner.local.precheck(&who, Mode::RequestOnly, now)?;
        let (local, headers) = if who.unlimited() {
            // Nothing to enforce: count it from a settle that records no spend.
            let hold = shared.unregistered(&who, now);
            shared.settle(hold, Actual::default(), now).await;
            (None, RateHeaders::default())
        } else {
            match shared.admit(&who, None, now).await {
                Ok((_, headers)) => (None, headers),
                Err(redis::Failure::Refused(r)) => return Err(self.remember(&who, r, now)),
                Err(redis::Failure::Down(e)) if !shared.fail_open => {
                    return Err(Refusal::Unavailable(e))
                }
                Err(redis::Failure::Down(_)) => (Some(who), RateHeaders::default()),
            }
        };
        // This node's own count: the enforced one while Redis is away under
        // fail_open, else only a record for the pre-check.
        let record = local.unwrap_or_else(|| who.map_caps(|_| Caps::default()));
        let (_, local_headers) = inner.local.admit(&record, none, Mode::RequestOnly, now)?;
        Ok(if local.is_some() {
            local_headers
        } else {
            headers
        })
    }

    /// Refuses, by this node's own count and without I/O, a tenant or key already at
    /// its rps or concurrency limit, so that a flooding client is turned away right
    /// after auth, before its body is read and parsed. The count can only be lower
    /// than the true one (the shared store's, or the same store's a moment later for
    /// `memory`), so the refusal is never wrong; [`Limits::admit`] still does the
    /// exact check. Refused requests are not counted in the rps window.
    pub fn precheck(&self, tenant: &Tenant, key: &ApiKey) -> Result<(), Refusal> {
        let (who, throttle) = self.subject(tenant, key)?;
        if !who.has_rate_or_concurrency() {
            return Ok(()); // nothing to check: not even the store's lock is taken
        }
        let now = self.inner.now();
        self.inner
            .local
            .precheck(&who, Mode::Reserve, now)
            .map_err(|r| guarded(r, throttle))
    }

    /// `x-ratelimit-*` values (the tighter scope's) for a response that was not
    /// admitted (a 400, 403 or 413 after auth), without counting anything. The memory
    /// store's are exact; in front of Redis this node's own count would overstate
    /// what is left, so only the (smaller) limit itself is given.
    pub fn peek_headers(&self, tenant: &Tenant, key: &ApiKey) -> RateHeaders {
        let who = Subject::of(tenant, key);
        if self.inner.shared.is_some() {
            return who
                .scopes()
                .map(|(_, c)| RateHeaders {
                    limit_requests: c.rate.rps,
                    ..RateHeaders::default()
                })
                .reduce(tighter)
                .unwrap_or_default();
        }
        self.inner.local.headers(&who, self.inner.now())
    }

    /// This month's settled spend, reservations, tokens and requests, with the budget.
    pub async fn usage(&self, tenant: &Tenant) -> Result<UsageView, String> {
        let now = self.inner.now();
        match &self.inner.shared {
            None => Ok(self.inner.local.usage(tenant, now)),
            Some(shared) => shared.usage(tenant, now).await,
        }
    }

    /// One key's own figures this month and hour, with its own budgets. A key
    /// without limits of its own has no counters (nothing is read): `tracked` false.
    pub async fn key_usage(&self, tenant: &Tenant, key: &ApiKey) -> Result<KeyUsageView, String> {
        let now = self.inner.now();
        match &self.inner.shared {
            _ if !key.has_limits() => Ok(memory::key_view(
                tenant,
                key,
                memory::KeyFigures {
                    month: now.month,
                    ..memory::KeyFigures::default()
                },
            )),
            None => Ok(self.inner.local.key_usage(tenant, key, now)),
            Some(shared) => shared.key_usage(tenant, key, now).await,
        }
    }

    /// Settled spend of the current UTC hour and the average hourly spend of the 24
    /// hours before it (nano-USD), for the spend-velocity metric; `None` when the
    /// shared store cannot be read.
    pub async fn velocity(&self, tenant: &Tenant) -> Option<(u64, u64)> {
        let now = self.inner.now();
        let hours = match &self.inner.shared {
            None => self.inner.local.hours(&tenant.id, now),
            Some(shared) => shared.hours(tenant, now).await.ok()?,
        };
        Some((hours.this_hour, hours.avg24()))
    }

    /// Whether this node has admitted or counted a request of the tenant since it
    /// started: the metrics' per-tenant gauges cover such tenants (and the file's), not
    /// every one of a store's hundred thousand, which would cost a shared-store round
    /// trip each per scrape and as many series.
    pub fn seen_here(&self, tenant: &Tenant) -> bool {
        self.inner.local.has(&tenant.id)
    }

    /// Failed calls to the shared store since start (0 for `memory`), for metrics:
    /// connects, commands and scripts that failed or timed out.
    pub fn store_errors(&self) -> u64 {
        self.inner.shared.as_ref().map_or(0, |s| s.errors())
    }
}

#[cfg(test)]
mod guard_tests;
#[cfg(test)]
mod key_tests;
#[cfg(test)]
mod tests;
