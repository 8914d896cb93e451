//! Per-tenant rate limits and budgets, enforced before anything goes upstream.
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
//!   Tenants with no limit and no budget at all skip the admission round trip; their
//!   request is counted when it settles.
//!
//! Windows: rps counts per UTC second; tpm is a sliding 60 s of per-second buckets
//! (reserved tokens in the admission second, traded for the actual ones at settle);
//! the monthly budget is the UTC calendar month; the hourly budget uses fixed UTC
//! hours (`14:00-15:00`), not a sliding hour, so a tenant could spend up to twice
//! `hourly_usd` in the 60 minutes around a boundary. Spend is attributed to the month
//! and hour the request started in, like the audit row's `ts`.

mod calendar;
mod conn;
mod memory;
mod redis;

use crate::config::{Budget, Counters, OnError, Rate, Tenant};
use calendar::Now;
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

/// Why a request was not admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// 429 `rate_limited`; `which` is `rps`, `tpm` or `concurrency`.
    Rate {
        which: &'static str,
        retry_after_s: u64,
        headers: RateHeaders,
    },
    /// 402 `budget_exceeded`; `which` is `monthly` or `hourly`, and `retry_after_s`
    /// runs until that month or hour rolls over.
    Budget {
        which: &'static str,
        retry_after_s: u64,
        headers: RateHeaders,
    },
    /// The shared store is unreachable and `on_error` is `fail_closed`.
    Unavailable(String),
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

/// Exact decimal USD from nano-USD (`"12.000000500"`), for people.
pub fn usd(nanousd: u64) -> String {
    format!("{}.{:09}", nanousd / 1_000_000_000, nanousd % 1_000_000_000)
}

struct Inner {
    clock: Clock,
    /// The whole store for `memory`; this node's view in front of Redis.
    local: Store,
    shared: Option<Arc<redis::Shared>>,
}

impl Inner {
    fn now(&self) -> Now {
        Now::at((self.clock)())
    }
}

/// An admitted request's hold on its tenant's counters; settle it exactly once with
/// [`Limits::settle`]. Dropping it unsettled (a cancelled or panicked task) releases
/// the hold, so neither the concurrency slot nor the reservation leaks.
pub struct Ticket {
    pub headers: RateHeaders,
    hold: Option<Hold>,
}

struct Hold {
    inner: Arc<Inner>,
    tenant: String,
    local: memory::Hold,
    remote: Option<redis::RemoteHold>,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket")
            .field("headers", &self.headers)
            .field("tenant", &self.hold.as_ref().map(|h| &h.tenant))
            .finish()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(h) = self.hold.take() {
            h.inner
                .local
                .settle(&h.tenant, &h.local, None, h.inner.now());
            if let (Some(remote), Some(shared)) = (h.remote, &h.inner.shared) {
                shared.release_in_background(remote);
            }
        }
    }
}

/// The limits and budgets of every tenant, on the configured counter store. Cheap to
/// clone; clones share the counters.
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
            }),
        }
    }

    /// Checks rps, concurrency, tpm, the monthly and the hourly budget and, if all
    /// fit, reserves: one request, one slot in flight, `demand.tokens` in the tokens
    /// window and `demand.cost_nanousd` against the month and the hour. Atomic across
    /// concurrent callers (and, on Redis, across nodes).
    pub async fn admit(&self, tenant: &Tenant, demand: Demand) -> Result<Ticket, Refusal> {
        let demand = Demand {
            tokens: demand.tokens.min(MAX_AMOUNT),
            cost_nanousd: demand.cost_nanousd.min(MAX_AMOUNT),
        };
        let inner = &self.inner;
        let now = inner.now();
        let id = tenant.id.as_str();
        let Some(shared) = &inner.shared else {
            let (hold, headers) =
                inner
                    .local
                    .admit(id, &tenant.rate, &tenant.budget, demand, Mode::Reserve, now)?;
            return Ok(self.ticket(tenant, hold, None, headers));
        };
        inner.local.precheck(id, &tenant.rate, Mode::Reserve, now)?;
        let (remote, headers) = if unlimited(tenant) {
            (shared.unregistered(tenant, now), RateHeaders::default())
        } else {
            match shared.admit(tenant, Some(demand), now).await {
                Ok((Some(remote), headers)) => (remote, headers),
                Ok((None, headers)) => (shared.unregistered(tenant, now), headers),
                Err(redis::Failure::Refused(r)) => return Err(self.remember(id, r, now)),
                Err(redis::Failure::Down(e)) if !shared.fail_open => {
                    return Err(Refusal::Unavailable(e))
                }
                Err(redis::Failure::Down(_)) => {
                    // fail_open: this node's own count of rps and concurrency is the
                    // best that can be enforced; budgets and tpm go unchecked.
                    let rate = Rate {
                        tpm: None,
                        ..tenant.rate
                    };
                    let (hold, headers) = inner.local.admit(
                        id,
                        &rate,
                        &Budget::default(),
                        demand,
                        Mode::Reserve,
                        now,
                    )?;
                    let remote = shared.unregistered(tenant, now);
                    return Ok(self.ticket(tenant, hold, Some(remote), headers));
                }
            }
        };
        // Admitted by Redis: record it on this node too, for the pre-check.
        let (hold, _) = inner.local.admit(
            id,
            &Rate::default(),
            &Budget::default(),
            demand,
            Mode::Reserve,
            now,
        )?;
        Ok(self.ticket(tenant, hold, Some(remote), headers))
    }

    /// A shared-store refusal, noted locally when it is one that lasts: a full rps
    /// window stays full until its second ends, so the rest of that second's requests
    /// from this tenant are refused by the pre-check, before their body is read and
    /// without a round trip, even when no single node is over the limit by itself.
    fn remember(&self, tenant: &str, r: Refusal, now: Now) -> Refusal {
        if let Refusal::Rate { which: "rps", .. } = r {
            self.inner.local.mark_rps_full(tenant, now);
        }
        r
    }

    fn ticket(
        &self,
        tenant: &Tenant,
        local: Option<memory::Hold>,
        remote: Option<redis::RemoteHold>,
        headers: RateHeaders,
    ) -> Ticket {
        Ticket {
            headers,
            hold: local.map(|local| Hold {
                inner: self.inner.clone(),
                tenant: tenant.id.clone(),
                local,
                remote,
            }),
        }
    }

    /// Exactly once per admitted request, at its end: releases the slot and the
    /// reservation and records the actual spend and tokens (an actual cost above the
    /// reservation is recorded as it is).
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
        h.inner.local.settle(&h.tenant, &h.local, Some(actual), now);
        if let (Some(remote), Some(shared)) = (h.remote, &h.inner.shared) {
            shared.settle(remote, actual, now).await;
        }
    }

    /// Counts a request that costs nothing (a cache hit) against rps only.
    pub async fn admit_request_only(&self, tenant: &Tenant) -> Result<RateHeaders, Refusal> {
        let inner = &self.inner;
        let now = inner.now();
        let id = tenant.id.as_str();
        let none = Demand::default();
        let Some(shared) = &inner.shared else {
            let (_, headers) = inner.local.admit(
                id,
                &tenant.rate,
                &tenant.budget,
                none,
                Mode::RequestOnly,
                now,
            )?;
            return Ok(headers);
        };
        inner
            .local
            .precheck(id, &tenant.rate, Mode::RequestOnly, now)?;
        let (local_rate, headers) = if unlimited(tenant) {
            // Nothing to enforce: count it from a settle that records no spend.
            let hold = shared.unregistered(tenant, now);
            shared.settle(hold, Actual::default(), now).await;
            (Rate::default(), RateHeaders::default())
        } else {
            match shared.admit(tenant, None, now).await {
                Ok((_, headers)) => (Rate::default(), headers),
                Err(redis::Failure::Refused(r)) => return Err(self.remember(id, r, now)),
                Err(redis::Failure::Down(e)) if !shared.fail_open => {
                    return Err(Refusal::Unavailable(e))
                }
                Err(redis::Failure::Down(_)) => (tenant.rate, RateHeaders::default()),
            }
        };
        let (_, local_headers) = inner.local.admit(
            id,
            &local_rate,
            &Budget::default(),
            none,
            Mode::RequestOnly,
            now,
        )?;
        Ok(if local_rate == Rate::default() {
            headers
        } else {
            local_headers
        })
    }

    /// Refuses, by this node's own count and without I/O, a tenant already at its rps
    /// or concurrency limit, so that a flooding tenant is turned away right after auth,
    /// before its body is read and parsed. The count can only be lower than the true
    /// one (the shared store's, or the same store's a moment later for `memory`), so
    /// the refusal is never wrong; [`Limits::admit`] still does the exact check.
    /// Refused requests are not counted in the rps window.
    pub fn precheck(&self, tenant: &Tenant) -> Result<(), Refusal> {
        if tenant.rate.rps.is_none() && tenant.rate.concurrency.is_none() {
            return Ok(()); // nothing to check: not even the store's lock is taken
        }
        let now = self.inner.now();
        self.inner
            .local
            .precheck(&tenant.id, &tenant.rate, Mode::Reserve, now)
    }

    /// `x-ratelimit-*` values for a response that was not admitted (a 400, 403 or 413
    /// after auth), without counting anything. The memory store's are exact; in
    /// front of Redis this node's own count would overstate what is left, so only the
    /// limit itself is given.
    pub fn peek_headers(&self, tenant: &Tenant) -> RateHeaders {
        if self.inner.shared.is_some() {
            return RateHeaders {
                limit_requests: tenant.rate.rps,
                ..RateHeaders::default()
            };
        }
        self.inner
            .local
            .headers(&tenant.id, &tenant.rate, self.inner.now())
    }

    /// This month's settled spend, reservations, tokens and requests, with the budget.
    pub async fn usage(&self, tenant: &Tenant) -> Result<UsageView, String> {
        let now = self.inner.now();
        match &self.inner.shared {
            None => Ok(self.inner.local.usage(tenant, now)),
            Some(shared) => shared.usage(tenant, now).await,
        }
    }

    /// Settled spend of the current UTC hour and the average hourly spend of the 24
    /// hours before it (nano-USD), for the spend-velocity metric; `None` when the
    /// shared store cannot be read.
    pub async fn velocity(&self, tenant: &Tenant) -> Option<(u64, u64)> {
        let now = self.inner.now();
        match &self.inner.shared {
            None => Some(self.inner.local.velocity(&tenant.id, now)),
            Some(shared) => shared.velocity(tenant, now).await.ok(),
        }
    }

    /// Failed calls to the shared store since start (0 for `memory`), for metrics:
    /// connects, commands and scripts that failed or timed out.
    pub fn store_errors(&self) -> u64 {
        self.inner.shared.as_ref().map_or(0, |s| s.errors())
    }
}

/// A tenant with nothing to enforce: no admission round trip is needed.
fn unlimited(tenant: &Tenant) -> bool {
    tenant.rate == Rate::default() && tenant.budget == Budget::default()
}

#[cfg(test)]
mod tests;
