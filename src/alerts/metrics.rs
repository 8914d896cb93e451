//! The alerts' own metrics, registered in the process registry by
//! [`crate::metrics::Metrics`] (as the audit log's are), so delivery does not depend
//! on the module that serves `/metrics`.

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

#[derive(Clone)]
pub struct AlertMetrics {
    /// `llmgw_alerts_sent_total{webhook,type}`: POSTs answered 2xx.
    pub sent: IntCounterVec,
    /// `llmgw_alert_delivery_failures_total{webhook}`: tries that failed (retried).
    pub failures: IntCounterVec,
    /// `llmgw_alerts_pending`: (event, webhook) pairs queued, not yet delivered.
    pub pending: IntGauge,
    /// `llmgw_alerts_dropped_total`: events lost before they were queued (the
    /// in-memory hand-off full, the spool unwritable) or queued for a webhook that is
    /// no longer configured.
    pub dropped: IntCounter,
}

impl AlertMetrics {
    pub(crate) fn new(r: &Registry) -> prometheus::Result<AlertMetrics> {
        let sent = IntCounterVec::new(
            Opts::new(
                "alerts_sent_total",
                "Alert events delivered (answered 2xx), by webhook and event type",
            ),
            &["webhook", "type"],
        )?;
        r.register(Box::new(sent.clone()))?;
        let failures = IntCounterVec::new(
            Opts::new(
                "alert_delivery_failures_total",
                "Alert POSTs that failed or timed out (each is retried with backoff)",
            ),
            &["webhook"],
        )?;
        r.register(Box::new(failures.clone()))?;
        let pending = IntGauge::new(
            "alerts_pending",
            "Alert deliveries queued on disk and not yet answered 2xx",
        )?;
        r.register(Box::new(pending.clone()))?;
        let dropped = IntCounter::new(
            "alerts_dropped_total",
            "Alert events lost before they reached the durable queue",
        )?;
        r.register(Box::new(dropped.clone()))?;
        Ok(AlertMetrics {
            sent,
            failures,
            pending,
            dropped,
        })
    }

    /// Series for every configured webhook (and event type) at 0 from start-up, so a
    /// rate() or an absent() in an alert rule works before the first event.
    pub fn register_webhooks<'a>(&self, names: impl Iterator<Item = &'a str>) {
        for name in names {
            self.failures.with_label_values(&[name]);
            for kind in super::EventKind::ALL {
                self.sent.with_label_values(&[name, kind.as_str()]);
            }
        }
    }
}
