//! Per-tenant rate limits and budgets, enforced before anything goes upstream.
//!
//! Reserve, then settle: admission reserves the request's largest possible tokens and
//! cost (prompt estimated conservatively plus the output bound the adapters send
//! upstream); the end of the call settles to the actual usage and releases the rest.
//! A tenant's settled spend therefore never exceeds its budget, however many requests
//! race, because every admitted request already holds its worst case.
//!
//! Counter stores sit behind [`Limits`]; `memory` is exact for one node. The shared
//! `redis` store is not built yet: a `redis` config runs on the memory store with a
//! warning (see the README).

mod memory;

use crate::config::{Counters, Tenant};
use serde::Serialize;
use std::sync::Arc;

pub use memory::Store;

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

/// Values for the `x-ratelimit-*` response headers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RateHeaders {
    pub limit_requests: Option<u32>,
    pub remaining_requests: Option<u32>,
    pub remaining_tokens: Option<u64>,
}

/// Why a request was not admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Rate {
        which: &'static str,
        retry_after_s: u64,
        headers: RateHeaders,
    },
    Budget {
        which: &'static str,
        retry_after_s: u64,
    },
}

/// This month's figures for `GET /admin/v1/tenants/{id}/usage`.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct UsageView {
    pub tenant: String,
    pub month: String,
    pub spent_nanousd: u64,
    pub spent_usd: String,
    pub reserved_nanousd: u64,
    pub budget_nanousd: Option<u64>,
    pub budget_usd: Option<String>,
    pub remaining_nanousd: Option<u64>,
    pub remaining_usd: Option<String>,
    pub tokens_in: u64,
    pub tokens_out: u64,
    pub requests: u64,
    /// Spend in the current UTC hour and the average hour of the 24 before it.
    pub spend_this_hour_nanousd: u64,
    pub spend_hourly_avg_nanousd: u64,
}

/// Exact decimal USD from nano-USD, for people.
pub fn usd(nanousd: u64) -> String {
    format!("{}.{:09}", nanousd / 1_000_000_000, nanousd % 1_000_000_000)
}

/// An admitted request's hold on its tenant's counters; settle it once. Dropping it
/// unsettled (a cancelled task) releases the hold, so nothing leaks.
#[derive(Debug)]
pub struct Ticket {
    store: Arc<Store>,
    tenant: String,
    hold: memory::Hold,
    pub headers: RateHeaders,
    settled: bool,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.settled {
            self.store.settle(&self.tenant, &self.hold, None);
        }
    }
}

#[derive(Clone)]
pub struct Limits {
    store: Arc<Store>,
}

impl Limits {
    pub fn new(conf: &Counters) -> Limits {
        if let Counters::Redis { url, .. } = conf {
            log::warn!(
                "counters.backend redis ({url}) is not implemented yet: limits and budgets are enforced per node, in memory"
            );
        }
        Limits {
            store: Arc::new(Store::new(Arc::new(crate::audit::time::now_ms))),
        }
    }

    /// For tests: a store on a given clock (Unix milliseconds).
    pub fn with_clock(clock: Arc<dyn Fn() -> u64 + Send + Sync>) -> Limits {
        Limits {
            store: Arc::new(Store::new(clock)),
        }
    }

    pub async fn admit(&self, tenant: &Tenant, demand: Demand) -> Result<Ticket, Refusal> {
        let (hold, headers) = self.store.admit(tenant, demand, true)?;
        Ok(Ticket {
            store: self.store.clone(),
            tenant: tenant.id.clone(),
            hold,
            headers,
            settled: false,
        })
    }

    pub async fn settle(&self, mut ticket: Ticket, actual: Actual) {
        ticket.settled = true;
        ticket
            .store
            .settle(&ticket.tenant, &ticket.hold, Some(actual));
    }

    pub async fn usage(&self, tenant: &Tenant) -> UsageView {
        self.store.usage(tenant)
    }
}

#[cfg(test)]
mod tests;
