//! The events this module raises itself, from one background check every
//! [`CHECK_EVERY`] (the spend guard's events are the guard's own):
//!
//! - `budget_threshold`: for each tenant and key that settled a cost since the last
//!   check ([`Alerts::spent`] notes them at settle, a map insert), its settled spend
//!   this month and this hour is read from the counter store and compared with each
//!   of `alerts.budget_thresholds` of its monthly and hourly budget. Periodic rather
//!   than inside the settle: the settle stays as it is (on Redis it is one Lua call),
//!   the read is off the request path, and a jump over several thresholds at once
//!   raises each of them. Once per threshold and period by id
//!   (`2026-12:monthly:0.8`, `2026-12-04T14:hourly:0.5`).
//! - `spend_velocity`: same tenants, when this hour's spend is above `factor` x the
//!   trailing 24 h hourly average and above `min_hourly_usd`; once per tenant and hour.
//!   A new tenant has an average of 0, so `min_hourly_usd` alone decides.
//! - `circuit_open` / `circuit_closed`: the breakers' states compared with the last
//!   check's (a circuit stays open 5 s at least, so no opening is missed); once per
//!   provider and minute, so nodes that open together on Redis send one.
//! - `audit_shipping_stalled`: the oldest row not yet in ClickHouse older than
//!   [`STALL_S`]; once per stall (its id names the oldest row's time and the node).

use super::{Alerts, Event, EventKind};
use crate::config::{AlertsConf, Tenant};
use crate::limits::usd;
use crate::proxy::Gateway;
use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

pub const CHECK_EVERY: Duration = Duration::from_secs(1);
/// Audit shipping is stalled when the oldest unshipped row is older than this.
pub const STALL_S: u64 = 300;

/// `800000` -> `0.8`, `1000000` -> `1`: the threshold as the period names it.
pub fn fraction(ppm: u64) -> String {
    let text = format!("{}.{:06}", ppm / 1_000_000, ppm % 1_000_000);
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// The thresholds `spent` has reached of `budget` (exact integer arithmetic).
pub fn reached(spent: u64, budget: u64, thresholds_ppm: &[u64]) -> Vec<u64> {
    if budget == 0 {
        return Vec::new();
    }
    thresholds_ppm
        .iter()
        .copied()
        .filter(|t| u128::from(spent) * 1_000_000 >= u128::from(*t) * u128::from(budget))
        .collect()
}

/// Who a budget is of, and which of its windows.
pub struct Budgeted<'a> {
    pub tenant: &'a str,
    /// Empty for the tenant's own budget.
    pub key_id: &'a str,
    /// `monthly` or `hourly`.
    pub window: &'static str,
    /// `2026-12` for a month, `2026-12-04T14` for an hour.
    pub stamp: &'a str,
    pub spent: u64,
    pub budget: u64,
}

/// One `budget_threshold` event per threshold reached.
pub fn threshold_events(b: &Budgeted, thresholds_ppm: &[u64], at_ms: u64) -> Vec<Event> {
    reached(b.spent, b.budget, thresholds_ppm)
        .into_iter()
        .map(|t| {
            let period = format!("{}:{}:{}", b.stamp, b.window, fraction(t));
            Event::new(
                EventKind::BudgetThreshold,
                b.tenant,
                b.key_id,
                period,
                at_ms,
            )
            .with("scope", if b.key_id.is_empty() { "tenant" } else { "key" })
            .with("window", b.window)
            .with("threshold", fraction(t))
            .with("threshold_ppm", t)
            .with("spent_nanousd", b.spent)
            .with("spent_usd", usd(b.spent))
            .with("budget_nanousd", b.budget)
            .with("budget_usd", usd(b.budget))
        })
        .collect()
}

/// `spend_velocity` when this hour is above `factor` x the average and the minimum.
pub fn velocity_event(
    tenant: &str,
    hour: &str,
    this_hour: u64,
    avg: u64,
    conf: &crate::config::VelocityAlert,
    at_ms: u64,
) -> Option<Event> {
    let above_avg = u128::from(this_hour) * 1000 > u128::from(avg) * u128::from(conf.factor_milli);
    if !(above_avg && this_hour > conf.min_hourly_nanousd) {
        return None;
    }
    let ratio = if avg == 0 {
        "inf".to_string()
    } else {
        format!("{:.1}", this_hour as f64 / avg as f64)
    };
    Some(
        Event::new(
            EventKind::SpendVelocity,
            tenant,
            "",
            hour.to_string(),
            at_ms,
        )
        .with("spend_this_hour_nanousd", this_hour)
        .with("spend_this_hour_usd", usd(this_hour))
        .with("hourly_avg_nanousd", avg)
        .with("hourly_avg_usd", usd(avg))
        .with("ratio", ratio)
        .with("factor", conf.factor_milli as f64 / 1000.0)
        .with("min_hourly_usd", usd(conf.min_hourly_nanousd)),
    )
}

/// `2026-12-04T14` (`minutes`: `2026-12-04T14:05`), UTC.
fn stamp(ms: u64, minutes: bool) -> String {
    let t = crate::audit::time::rfc3339(ms);
    t[..if minutes { 16 } else { 13 }].to_string()
}

/// The periodic check; a background service of the server.
pub struct Checker {
    pub gateway: Gateway,
    /// Names this node in events of its own (circuits, audit).
    pub node: String,
}

/// The `budget_threshold` events of one scope's monthly and hourly budgets: `at` is
/// (tenant, key id or empty, month stamp, hour stamp), `spent` (month, this hour).
fn budget_events(
    mem: &mut Memory,
    alerts: &Alerts,
    at: (&str, &str, &str, &str),
    spent: (u64, u64),
    budget: &crate::config::Budget,
    thresholds_ppm: &[u64],
    now: u64,
) {
    let (tenant, key_id, month, hour) = at;
    for (window, stamp, spent, budget) in [
        ("monthly", month, spent.0, budget.monthly_nanousd),
        ("hourly", hour, spent.1, budget.hourly_nanousd),
    ] {
        let Some(budget) = budget else { continue };
        let b = Budgeted {
            tenant,
            key_id,
            window,
            stamp,
            spent,
            budget,
        };
        for e in threshold_events(&b, thresholds_ppm, now) {
            mem.emit(alerts, e);
        }
    }
}

#[derive(Default)]
struct Memory {
    /// Ids raised by this checker, so that a threshold that stays reached is not
    /// handed over every second (delivery would drop it, but the hand-off is bounded).
    raised: HashSet<String>,
    open: HashMap<String, bool>,
    stalled: bool,
}

impl Memory {
    fn emit(&mut self, alerts: &Alerts, e: Event) {
        if self.raised.len() > 100_000 {
            self.raised.clear(); // delivery remembers what it queued; this is a filter only
        }
        if self.raised.insert(e.id()) {
            alerts.emit(e);
        }
    }
}

fn stall_s() -> u64 {
    std::env::var("LLM_GATEWAY_ALERT_AUDIT_STALL_S")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(STALL_S)
}

#[async_trait]
impl BackgroundService for Checker {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut mem = Memory::default();
        let stall = stall_s();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            let cfg = self.gateway.config();
            let Some(conf) = cfg.alerts.as_ref() else {
                continue;
            };
            self.spend(conf, &mut mem).await;
            self.circuits(&mut mem);
            self.audit(stall, &mut mem);
        }
    }
}

impl Checker {
    async fn spend(&self, conf: &AlertsConf, mem: &mut Memory) {
        let g = &self.gateway;
        let spent = g.alerts.take_spent();
        if spent.is_empty() {
            return;
        }
        let now = crate::audit::time::now_ms();
        let hour = stamp(now, false);
        let mut tenants: HashMap<&str, &Arc<Tenant>> = HashMap::new();
        for (tenant, key) in spent.values() {
            tenants.insert(&tenant.id, tenant);
            if !key.has_limits() {
                continue;
            }
            let Ok(u) = g.limits.key_usage(tenant, key).await else {
                continue;
            };
            let spent = (u.spent_nanousd, u.spend_this_hour_nanousd);
            let at = (&tenant.id[..], &key.id[..], &u.month[..], &hour[..]);
            budget_events(
                mem,
                &g.alerts,
                at,
                spent,
                &key.budget,
                &conf.budget_thresholds_ppm,
                now,
            );
        }
        for tenant in tenants.values() {
            let Ok(u) = g.limits.usage(tenant).await else {
                continue;
            };
            let spent = (u.spent_nanousd, u.spend_this_hour_nanousd);
            let at = (&tenant.id[..], "", &u.month[..], &hour[..]);
            budget_events(
                mem,
                &g.alerts,
                at,
                spent,
                &tenant.budget,
                &conf.budget_thresholds_ppm,
                now,
            );
            let (this, avg) = (u.spend_this_hour_nanousd, u.spend_hourly_avg_nanousd);
            if let Some(e) = velocity_event(&tenant.id, &hour, this, avg, &conf.velocity, now) {
                mem.emit(&g.alerts, e);
            }
        }
    }

    fn circuits(&self, mem: &mut Memory) {
        let now = crate::audit::time::now_ms();
        for (provider, view) in self.gateway.breakers.views() {
            let was_open = mem.open.get(&provider).copied().unwrap_or(false);
            let kind = match view.state {
                "open" if !was_open => EventKind::CircuitOpen,
                "closed" if was_open => EventKind::CircuitClosed,
                _ => continue,
            };
            mem.open
                .insert(provider.clone(), kind == EventKind::CircuitOpen);
            let period = format!("{provider}:{}", stamp(now, true));
            let e = Event::new(kind, "", "", period, now)
                .with("provider", provider.as_str())
                .with("node", self.node.as_str());
            mem.emit(&self.gateway.alerts, e);
        }
    }

    fn audit(&self, stall: u64, mem: &mut Memory) {
        let oldest = self.gateway.audit.oldest_unshipped_ms();
        let now = crate::audit::time::now_ms();
        let age_s = now.saturating_sub(oldest) / 1000;
        if oldest == 0 || age_s <= stall {
            mem.stalled = false;
            return;
        }
        if mem.stalled {
            return;
        }
        mem.stalled = true;
        let e = Event::new(
            EventKind::AuditShippingStalled,
            "",
            "",
            format!("{}:{oldest}", self.node),
            now,
        )
        .with("node", self.node.as_str())
        .with("oldest_unshipped_age_s", age_s)
        .with("oldest_unshipped_at", crate::audit::time::rfc3339(oldest))
        .with("threshold_s", stall);
        mem.emit(&self.gateway.alerts, e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::VelocityAlert;

    const T: [u64; 3] = [500_000, 800_000, 1_000_000];

    #[test]
    fn fractions_read_like_the_period() {
        assert_eq!(fraction(500_000), "0.5");
        assert_eq!(fraction(800_000), "0.8");
        assert_eq!(fraction(1_000_000), "1");
        assert_eq!(fraction(1_250_000), "1.25");
    }

    #[test]
    fn thresholds_are_exact_at_the_boundary() {
        let budget = 10_000_000_000; // $10
        assert!(reached(4_999_999_999, budget, &T).is_empty());
        assert_eq!(reached(5_000_000_000, budget, &T), [500_000]);
        assert_eq!(reached(7_999_999_999, budget, &T), [500_000]);
        assert_eq!(reached(8_000_000_000, budget, &T), [500_000, 800_000]);
        assert_eq!(reached(12_000_000_000, budget, &T), T);
        assert!(reached(1, 0, &T).is_empty());
    }

    /// Spend rising through a budget in small steps raises each threshold exactly
    /// once, with its own id, whatever the number of checks (the checker's filter).
    #[test]
    fn a_rising_spend_raises_50_80_100_once_each() {
        let (alerts, rec) = Alerts::recording();
        let mut mem = Memory::default();
        let budget = 1_000_000_000;
        for step in 0..=120u64 {
            let b = Budgeted {
                tenant: "acme",
                key_id: "",
                window: "monthly",
                stamp: "2026-12",
                spent: step * 10_000_000,
                budget,
            };
            for e in threshold_events(&b, &T, step) {
                mem.emit(&alerts, e);
            }
        }
        let got = rec.lock().unwrap();
        let periods: Vec<&str> = got.iter().map(|e| e.period.as_str()).collect();
        assert_eq!(
            periods,
            [
                "2026-12:monthly:0.5",
                "2026-12:monthly:0.8",
                "2026-12:monthly:1"
            ]
        );
        assert_eq!(got[1].figures["spent_usd"], "0.800000000");
        assert_eq!(got[1].figures["scope"], "tenant");
        // The same threshold of a key, or of the next hour, is another event.
        let key = Budgeted {
            tenant: "acme",
            key_id: "k1",
            window: "monthly",
            stamp: "2026-12",
            spent: budget,
            budget,
        };
        let k = threshold_events(&key, &T, 0);
        assert_eq!(k.len(), 3);
        assert_ne!(k[0].id(), got[0].id());
        assert_eq!(k[0].figures["scope"], "key");
    }

    #[test]
    fn velocity_needs_both_the_factor_and_the_minimum() {
        let conf = VelocityAlert {
            factor_milli: 5_000,
            min_hourly_nanousd: 10_000_000_000,
        };
        let usd = |d: u64| d * 1_000_000_000;
        // 6x the average but under $10: quiet.
        assert!(velocity_event("a", "h", usd(6), usd(1), &conf, 0).is_none());
        // Above $10 but only 4x.
        assert!(velocity_event("a", "h", usd(40), usd(10), &conf, 0).is_none());
        // Exactly 5x is not above 5x.
        assert!(velocity_event("a", "h", usd(50), usd(10), &conf, 0).is_none());
        let e = velocity_event("a", "2026-12-04T14", usd(51), usd(10), &conf, 0).unwrap();
        assert_eq!(e.period, "2026-12-04T14");
        assert_eq!(e.figures["ratio"], "5.1");
        // A new tenant (no history): the minimum alone decides.
        assert!(velocity_event("a", "h", usd(10), 0, &conf, 0).is_none());
        assert!(velocity_event("a", "h", usd(11), 0, &conf, 0).is_some());
    }

    #[test]
    fn hour_and_minute_stamps() {
        let ms = 1_796_000_000_000; // 2026-11-30T...
        let h = stamp(ms, false);
        assert_eq!(h.len(), 13);
        assert_eq!(&h[10..11], "T");
        assert_eq!(stamp(ms, true).len(), 16);
    }
}
