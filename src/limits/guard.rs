//! The spend guard: a tenant whose spend this hour runs far above its own normal is
//! throttled or blocked automatically, without an hourly budget set in advance.
//!
//! Evaluation is not on the request path: a background check ([`Limits::check_guards`],
//! every [`GUARD_TICK`]) reads each guarded tenant's hourly spend from the counter
//! store (Redis when shared, so every node decides on the same figures) and updates a
//! small board. The request path only reads the board, and only for tenants with a
//! guard: an engaged `block` refuses before the body is read, an engaged `throttle`
//! lowers the tenant's rps to `throttle_rps` inside the ordinary admission, so the
//! cap is exact across nodes exactly as a configured rps is.
//!
//! The baseline (what "its own normal" means): the average hourly spend over the
//! hours of history in the 24 before the current one, counted from the oldest hour
//! with any spend. A tenant two hours old is compared with its two hours, not with
//! 24 hours of mostly zeros (which would engage on its first busy hour). A tenant
//! with no spend at all in those 24 hours gets `min_hourly_usd` as its baseline, so it
//! engages at `velocity_factor x min_hourly_usd` in its first hour: neither on its
//! first dollar nor never.
//!
//! Once engaged it stays engaged until an hour ends below the threshold (so at least
//! for the rest of this hour and the whole next one, when the tenant is blocked and
//! spends nothing in it) or until on-call clears it, which also keeps it from
//! engaging again for `for_s` seconds (on Redis, on every node).

use super::calendar::Now;
use super::{Limits, RateHeaders, Refusal, Scope, Subject};
use crate::audit::time::rfc3339;
use crate::config::ApiKey;
use crate::config::{Guard, GuardAction, Tenant};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::RwLock;
use std::time::Duration;

/// How often guarded tenants are evaluated: the guard engages within this (plus a
/// counter-store round trip) of the settle that crosses the threshold.
pub const GUARD_TICK: Duration = Duration::from_secs(1);

/// Settled spend of the current UTC hour and of each of the 24 before it (nano-USD).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpendHours {
    pub this_hour: u64,
    /// `past[0]` is the hour before the current one.
    pub past: [u64; 24],
}

impl SpendHours {
    /// The average of the 24 hours before this one, zeros included (the velocity
    /// metric's baseline, which must not move with the tenant's age).
    pub fn avg24(&self) -> u64 {
        self.past.iter().sum::<u64>() / 24
    }

    /// The guard's baseline; see the module doc for why it is not [`Self::avg24`].
    pub fn baseline(&self, floor: u64) -> u64 {
        match self.past.iter().rposition(|s| *s > 0) {
            None => floor,
            Some(oldest) => self.past[..=oldest].iter().sum::<u64>() / (oldest as u64 + 1),
        }
    }

    /// The spend this hour above which the guard engages.
    pub fn threshold(&self, g: &Guard) -> u64 {
        let base = u128::from(self.baseline(g.min_hourly_nanousd));
        let by_factor = (base * u128::from(g.factor_milli) / 1000).min(u128::from(u64::MAX));
        (by_factor as u64).max(g.min_hourly_nanousd)
    }
}

/// The figures of one evaluation, shown by the usage API and sent with the events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Figures {
    pub at_ms: u64,
    pub spend_this_hour: u64,
    pub baseline: u64,
    pub threshold: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct State {
    /// Since when (Unix ms) it is engaged; `None`: not engaged.
    engaged_since: Option<u64>,
    /// The last hour (hours since the epoch) whose spend was over the threshold.
    last_hour_over: u64,
    /// Unix ms until which it may not engage (cleared by on-call).
    cleared_until: u64,
    last: Figures,
}

/// A change of a guard's state, for the alert events and the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Engaged {
        tenant: String,
        action: GuardAction,
        figures: Figures,
    },
    Cleared {
        tenant: String,
        /// `hour_ended` or `admin`.
        reason: &'static str,
        at_ms: u64,
    },
}

/// The guard's state as the usage API shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct GuardView {
    pub action: &'static str,
    pub engaged: bool,
    /// RFC 3339, when engaged.
    pub engaged_since: Option<String>,
    /// RFC 3339, when on-call cleared it and it may not engage again before then.
    pub cleared_until: Option<String>,
    pub velocity_factor_milli: u64,
    pub min_hourly_nanousd: u64,
    /// From the last evaluation (every second while the node runs).
    pub spend_this_hour_nanousd: u64,
    pub baseline_nanousd: u64,
    pub threshold_nanousd: u64,
    pub checked_at: Option<String>,
}

/// Every guarded tenant's state on this node.
#[derive(Debug, Default)]
pub(super) struct Board {
    states: RwLock<HashMap<String, State>>,
}

impl Board {
    /// Whether the tenant's guard is engaged now (the request path's one read).
    pub fn engaged(&self, tenant: &str) -> bool {
        let states = self.states.read().unwrap_or_else(|p| p.into_inner());
        states
            .get(tenant)
            .is_some_and(|s| s.engaged_since.is_some())
    }

    fn with<R>(&self, tenant: &str, f: impl FnOnce(&mut State) -> R) -> R {
        let mut states = self.states.write().unwrap_or_else(|p| p.into_inner());
        f(states.entry(tenant.to_string()).or_default())
    }

    /// One evaluation of `tenant` on `hours`; `cleared_until` is what the shared store
    /// says on-call set (0 when nothing, or no shared store).
    pub fn evaluate(
        &self,
        tenant: &str,
        g: &Guard,
        hours: &SpendHours,
        cleared_until: u64,
        now: Now,
    ) -> Option<Change> {
        let threshold = hours.threshold(g);
        let figures = Figures {
            at_ms: now.ms,
            spend_this_hour: hours.this_hour,
            baseline: hours.baseline(g.min_hourly_nanousd),
            threshold,
        };
        self.with(tenant, |s| {
            s.last = figures;
            s.cleared_until = s.cleared_until.max(cleared_until);
            if now.ms < s.cleared_until {
                // Cleared by another node's admin call: stand down here too.
                return s.engaged_since.take().map(|_| Change::Cleared {
                    tenant: tenant.to_string(),
                    reason: "admin",
                    at_ms: now.ms,
                });
            }
            if hours.this_hour > threshold {
                s.last_hour_over = now.hour;
                if s.engaged_since.is_none() {
                    s.engaged_since = Some(now.ms);
                    return Some(Change::Engaged {
                        tenant: tenant.to_string(),
                        action: g.action,
                        figures,
                    });
                }
            } else if s.engaged_since.is_some() && now.hour > s.last_hour_over + 1 {
                // The hour after the last one over has ended below the threshold.
                s.engaged_since = None;
                return Some(Change::Cleared {
                    tenant: tenant.to_string(),
                    reason: "hour_ended",
                    at_ms: now.ms,
                });
            }
            None
        })
    }

    /// On-call's clear on this node: disengaged now, and not again before `until`.
    pub fn clear(&self, tenant: &str, now_ms: u64, until: u64) -> Option<Change> {
        self.with(tenant, |s| {
            s.cleared_until = s.cleared_until.max(until);
            s.engaged_since.take().map(|_| Change::Cleared {
                tenant: tenant.to_string(),
                reason: "admin",
                at_ms: now_ms,
            })
        })
    }

    pub fn view(&self, g: &Guard, tenant: &str, now_ms: u64) -> GuardView {
        let s = {
            let states = self.states.read().unwrap_or_else(|p| p.into_inner());
            states.get(tenant).copied().unwrap_or_default()
        };
        GuardView {
            action: g.action.as_str(),
            engaged: s.engaged_since.is_some(),
            engaged_since: s.engaged_since.map(rfc3339),
            cleared_until: (s.cleared_until > now_ms).then(|| rfc3339(s.cleared_until)),
            velocity_factor_milli: g.factor_milli,
            min_hourly_nanousd: g.min_hourly_nanousd,
            spend_this_hour_nanousd: s.last.spend_this_hour,
            baseline_nanousd: s.last.baseline,
            threshold_nanousd: s.last.threshold,
            checked_at: (s.last.at_ms > 0).then(|| rfc3339(s.last.at_ms)),
        }
    }

    /// Forgets tenants whose guard a reload removed, so they cannot stay engaged.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        let mut states = self.states.write().unwrap_or_else(|p| p.into_inner());
        states.retain(|t, _| keep(t));
    }
}

impl Limits {
    /// The subject of a request with the spend guard applied: refused while it
    /// blocks, its rps lowered while it throttles (then the lowered rps, so that
    /// hitting it is told apart from the tenant's own limit).
    pub(super) fn subject<'a>(
        &self,
        tenant: &'a Tenant,
        key: &'a ApiKey,
    ) -> Result<(Subject<'a>, Option<u32>), Refusal> {
        let who = Subject::of(tenant, key);
        let Some(g) = &tenant.guard else {
            return Ok((who, None));
        };
        if !self.inner.guard.engaged(&tenant.id) {
            return Ok((who, None));
        }
        match g.action {
            GuardAction::Alert => Ok((who, None)),
            GuardAction::Block => Err(Refusal::Guard {
                action: GuardAction::Block,
                throttle_rps: 0,
                // At the earliest, the next hour ends below the threshold.
                retry_after_s: self.inner.now().secs_to_next_hour() + 3600,
                headers: RateHeaders::default(),
            }),
            GuardAction::Throttle if who.caps.rate.rps.is_some_and(|r| r <= g.throttle_rps) => {
                Ok((who, None)) // the tenant's own limit is the tighter one
            }
            GuardAction::Throttle => {
                let mut who = who;
                who.caps.rate.rps = Some(g.throttle_rps);
                Ok((who, Some(g.throttle_rps)))
            }
        }
    }

    /// Evaluates every guarded tenant among `tenants` that this node has served (a
    /// tenant it has not served has nothing to refuse here; its first request makes
    /// it one, and it is evaluated a tick later). Returns what changed. A tenant whose
    /// figures cannot be read (Redis down) keeps its state.
    pub async fn check_guards(&self, tenants: &[std::sync::Arc<Tenant>]) -> Vec<Change> {
        let mut changes = Vec::new();
        let mut guarded = std::collections::HashSet::new();
        for t in tenants {
            let Some(g) = &t.guard else { continue };
            guarded.insert(t.id.as_str());
            if !self.seen_here(t) {
                continue;
            }
            let now = self.inner.now();
            let read = match &self.inner.shared {
                None => Ok((self.inner.local.hours(&t.id, now), 0)),
                Some(shared) => shared.guard_figures(&t.id, now).await,
            };
            let Ok((hours, cleared_until)) = read else {
                continue;
            };
            if let Some(c) = self
                .inner
                .guard
                .evaluate(&t.id, g, &hours, cleared_until, now)
            {
                changes.push(c);
            }
        }
        self.inner.guard.retain(|t| guarded.contains(t));
        changes
    }

    /// On-call's `guard/clear`: disengages the tenant's guard now and keeps it from
    /// engaging for `for_s` seconds, on every node when the counters are shared (the
    /// others see it at their next check). Errors only when the shared store cannot
    /// record it; this node is cleared either way.
    pub async fn clear_guard(
        &self,
        tenant: &Tenant,
        for_s: u64,
    ) -> (Option<Change>, Result<(), String>) {
        let now = self.inner.now();
        let until = now.ms.saturating_add(for_s.saturating_mul(1000));
        let change = self.inner.guard.clear(&tenant.id, now.ms, until);
        let shared = match &self.inner.shared {
            None => Ok(()),
            Some(shared) => shared.clear_guard(&tenant.id, until, for_s).await,
        };
        (change, shared)
    }

    /// The tenant's guard as the usage API shows it; `None` for a tenant with none.
    pub fn guard_view(&self, tenant: &Tenant) -> Option<GuardView> {
        let g = tenant.guard.as_ref()?;
        Some(self.inner.guard.view(g, &tenant.id, self.inner.now().ms))
    }

    /// Whether the tenant's guard is engaged on this node (the metric).
    pub fn guard_engaged(&self, tenant: &Tenant) -> bool {
        tenant.guard.is_some() && self.inner.guard.engaged(&tenant.id)
    }
}

/// A refusal of the tenant's rps while the guard throttles it to `throttle` is the
/// guard's (429 `spend_guard`), not the tenant's own limit.
pub(super) fn guarded(r: Refusal, throttle: Option<u32>) -> Refusal {
    match (r, throttle) {
        (
            Refusal::Rate {
                scope: Scope::Tenant,
                which: "rps",
                headers,
                ..
            },
            Some(throttle_rps),
        ) => Refusal::Guard {
            action: GuardAction::Throttle,
            throttle_rps,
            retry_after_s: 1,
            headers,
        },
        (r, _) => r,
    }
}
