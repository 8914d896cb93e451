//! Alerts: the events on-call must hear about (budget thresholds, spend velocity, the
//! spend guard, circuits, audit shipping), handed to the webhooks of `alerts:`.
//!
//! The request path and the background checks only [`Alerts::emit`]: a bounded,
//! non-blocking hand-off, so a webhook receiver that hangs or answers slowly costs a
//! request nothing. What happens after (the durable queue under `audit.spool_dir`,
//! delivery with retries and backoff, signing, "once per tenant and period" across
//! nodes) lives behind the handle.

pub mod body;
pub mod delivery;
pub mod http;
pub mod metrics;
pub mod sources;
pub mod spool;

pub use metrics::AlertMetrics;

use crate::config::{ApiKey, Tenant};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// Events queued in memory before the hand-off drops (and counts) new ones; events
/// are rare (a few per tenant and hour), so a full queue means delivery is stuck.
pub const QUEUE_EVENTS: usize = 4096;

/// The contract's event types (`type` of the JSON body).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    BudgetThreshold,
    SpendVelocity,
    GuardEngaged,
    GuardCleared,
    CircuitOpen,
    CircuitClosed,
    AuditShippingStalled,
}

impl EventKind {
    pub const ALL: [EventKind; 7] = [
        EventKind::BudgetThreshold,
        EventKind::SpendVelocity,
        EventKind::GuardEngaged,
        EventKind::GuardCleared,
        EventKind::CircuitOpen,
        EventKind::CircuitClosed,
        EventKind::AuditShippingStalled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::BudgetThreshold => "budget_threshold",
            EventKind::SpendVelocity => "spend_velocity",
            EventKind::GuardEngaged => "guard_engaged",
            EventKind::GuardCleared => "guard_cleared",
            EventKind::CircuitOpen => "circuit_open",
            EventKind::CircuitClosed => "circuit_closed",
            EventKind::AuditShippingStalled => "audit_shipping_stalled",
        }
    }
}

/// One event. Its id is derived from what makes it unique (type, tenant, key and
/// period), so the same event raised twice, by this node or another, has one id and
/// is delivered once.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub kind: EventKind,
    /// Empty for events of no tenant (circuits, audit shipping).
    pub tenant: String,
    /// Empty unless the event is about one API key.
    pub key_id: String,
    /// What makes the event once per tenant and period, e.g. `2026-12-03T14` for an
    /// hour, `2026-12:monthly:0.8` for a monthly threshold, or a provider name and the
    /// time it opened for a circuit.
    pub period: String,
    /// When it was raised, ms since the epoch.
    pub at_ms: u64,
    /// The event's own figures (spend, budget, threshold, factor, provider, ...), added
    /// to the JSON body after `id`, `type`, `at`, `tenant`, `key_id`.
    pub figures: Map<String, Value>,
}

impl Event {
    pub fn new(kind: EventKind, tenant: &str, key_id: &str, period: String, at_ms: u64) -> Self {
        Event {
            kind,
            tenant: tenant.to_string(),
            key_id: key_id.to_string(),
            period,
            at_ms,
            figures: Map::new(),
        }
    }

    pub fn with(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.figures.insert(name.to_string(), value.into());
        self
    }

    /// Stable across nodes and restarts: the same event always has the same id.
    pub fn id(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for part in [self.kind.as_str(), &self.tenant, &self.key_id, &self.period] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        format!("evt_{}", hex::encode(&h.finalize()[..12]))
    }
}

/// `YYYY-MM-DDTHH` (UTC) of Unix milliseconds: the period of hourly events.
pub fn hour_label(ms: u64) -> String {
    let mut s = crate::audit::time::rfc3339(ms);
    s.truncate(13);
    s
}

/// The event of a change of a tenant's spend guard: once per tenant and hour for each
/// of engaged and cleared, on every node alike (the id does not depend on which node
/// saw it first).
pub fn guard_event(change: &crate::limits::GuardChange) -> Event {
    use crate::limits::{usd, GuardChange};
    match change {
        GuardChange::Engaged {
            tenant,
            action,
            figures: f,
        } => Event::new(
            EventKind::GuardEngaged,
            tenant,
            "",
            hour_label(f.at_ms),
            f.at_ms,
        )
        .with("action", action.as_str())
        .with("spend_this_hour_nanousd", f.spend_this_hour)
        .with("spend_this_hour_usd", usd(f.spend_this_hour))
        .with("baseline_hourly_nanousd", f.baseline)
        .with("threshold_nanousd", f.threshold)
        .with("threshold_usd", usd(f.threshold)),
        GuardChange::Cleared {
            tenant,
            reason,
            at_ms,
        } => Event::new(
            EventKind::GuardCleared,
            tenant,
            "",
            hour_label(*at_ms),
            *at_ms,
        )
        .with("reason", *reason),
    }
}

/// Tenants and keys that spent since the last check, by (tenant id, key id).
pub type Spent = HashMap<(String, String), (Arc<Tenant>, Arc<ApiKey>)>;

fn note(spent: &Mutex<Spent>, tenant: &Arc<Tenant>, key: &Arc<ApiKey>) {
    let mut s = match spent.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    // Replaced, not kept: a reload's newer Arc carries the newer budget.
    s.insert(
        (tenant.id.clone(), key.id.clone()),
        (tenant.clone(), key.clone()),
    );
}

/// The hand-off to alert delivery; cheap to clone. The default one has no webhooks
/// and drops every event (alerts not configured).
#[derive(Clone, Default)]
pub struct Alerts {
    tx: Option<mpsc::Sender<Event>>,
    /// Tests: every event emitted, in order.
    recorded: Option<Arc<Mutex<Vec<Event>>>>,
    /// `llmgw_alerts_dropped_total`, counted when the hand-off is full.
    dropped: Option<prometheus::IntCounter>,
    /// Tenants (and keys) that spent since the budget checker last looked.
    spent: Option<Arc<Mutex<Spent>>>,
}

impl Alerts {
    /// A handle feeding `tx` (the delivery side owns the receiver).
    pub fn to(tx: mpsc::Sender<Event>) -> Self {
        Alerts {
            tx: Some(tx),
            recorded: None,
            dropped: None,
            spent: Some(Arc::default()),
        }
    }

    /// Counts the events the full hand-off drops in `c`.
    pub fn counting_drops(mut self, c: prometheus::IntCounter) -> Self {
        self.dropped = Some(c);
        self
    }

    /// After a settle that cost money: notes the tenant and key for the budget and
    /// velocity checker ([`sources`]), which reads their spend off the request path.
    /// A map insert under a lock; nothing when alerts are off.
    pub fn spent(&self, tenant: &Arc<crate::config::Tenant>, key: &Arc<crate::config::ApiKey>) {
        if let Some(s) = &self.spent {
            note(s, tenant, key);
        }
    }

    /// What [`Alerts::spent`] noted since the last call (the checker's side).
    pub fn take_spent(&self) -> Spent {
        match &self.spent {
            Some(s) => std::mem::take(&mut *match s.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            }),
            None => Spent::default(),
        }
    }

    /// A handle that only records what is emitted, for tests of the event sources.
    pub fn recording() -> (Self, Arc<Mutex<Vec<Event>>>) {
        let rec = Arc::new(Mutex::new(Vec::new()));
        (
            Alerts {
                tx: None,
                recorded: Some(rec.clone()),
                dropped: None,
                spent: Some(Arc::default()),
            },
            rec,
        )
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some() || self.recorded.is_some()
    }

    /// Hands the event over without waiting; returns whether it was taken (false: no
    /// webhooks, or the queue is full because delivery is stuck).
    pub fn emit(&self, event: Event) -> bool {
        if let Some(rec) = &self.recorded {
            match rec.lock() {
                Ok(mut r) => r.push(event.clone()),
                Err(p) => p.into_inner().push(event.clone()),
            }
        }
        match &self.tx {
            Some(tx) => match tx.try_send(event) {
                Ok(()) => true,
                Err(e) => {
                    log::warn!("alerts: event dropped, the queue is full or closed: {e}");
                    if let Some(c) = &self.dropped {
                        c.inc();
                    }
                    false
                }
            },
            None => self.recorded.is_some(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_event_has_the_same_id_and_another_period_another() {
        let a = Event::new(
            EventKind::BudgetThreshold,
            "acme",
            "",
            "2026-12:monthly:0.8".into(),
            1,
        );
        let b = Event::new(
            EventKind::BudgetThreshold,
            "acme",
            "",
            "2026-12:monthly:0.8".into(),
            2,
        )
        .with("spend_usd", "80.0");
        let c = Event::new(
            EventKind::BudgetThreshold,
            "acme",
            "",
            "2026-12:monthly:1".into(),
            1,
        );
        assert_eq!(a.id(), b.id());
        assert_ne!(a.id(), c.id());
        assert!(a.id().starts_with("evt_"));
    }

    #[test]
    fn recording_keeps_what_is_emitted_and_the_default_drops_it() {
        assert!(!Alerts::default().emit(Event::new(EventKind::CircuitOpen, "", "", "p".into(), 0)));
        let (alerts, rec) = Alerts::recording();
        assert!(alerts.emit(Event::new(EventKind::CircuitOpen, "", "", "p".into(), 0)));
        assert_eq!(rec.lock().unwrap()[0].kind, EventKind::CircuitOpen);
    }
}
