//! The audit log's own metrics, registered in the process's registry by
//! [`crate::metrics::Metrics`]; here so that the audit code does not depend on the
//! module that reads its rows.

use prometheus::{IntCounter, IntGauge, Registry};

/// The audit log's health: what is waiting where, and whether shipping keeps up.
#[derive(Clone)]
pub struct AuditMetrics {
    pub queue_depth: IntGauge,
    pub spool_bytes: IntGauge,
    pub unshipped_bytes: IntGauge,
    pub oldest_unshipped_age_seconds: IntGauge,
    pub rows_shipped: IntCounter,
    pub failed_batches: IntCounter,
    pub corrupt_lines: IntCounter,
    pub write_errors: IntCounter,
    pub slow_writes: IntCounter,
}

impl AuditMetrics {
    pub(crate) fn new(r: &Registry) -> prometheus::Result<AuditMetrics> {
        let gauge = |name: &str, help: &str| -> prometheus::Result<IntGauge> {
            let g = IntGauge::new(name, help)?;
            r.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let counter = |name: &str, help: &str| -> prometheus::Result<IntCounter> {
            let c = IntCounter::new(name, help)?;
            r.register(Box::new(c.clone()))?;
            Ok(c)
        };
        Ok(AuditMetrics {
            queue_depth: gauge("audit_queue_depth", "Audit rows queued in memory")?,
            spool_bytes: gauge("audit_spool_bytes", "Bytes of audit spool files on disk")?,
            unshipped_bytes: gauge(
                "audit_unshipped_bytes",
                "Bytes of audit spool not yet in ClickHouse",
            )?,
            oldest_unshipped_age_seconds: gauge(
                "audit_oldest_unshipped_age_seconds",
                "Age of the oldest audit row not yet in ClickHouse (0: none waiting)",
            )?,
            rows_shipped: counter(
                "audit_rows_shipped_total",
                "Audit rows acknowledged by ClickHouse",
            )?,
            failed_batches: counter(
                "audit_failed_batches_total",
                "Audit inserts into ClickHouse that failed or timed out (retried)",
            )?,
            corrupt_lines: counter(
                "audit_corrupt_lines_total",
                "Unreadable audit spool lines skipped by the shipper",
            )?,
            write_errors: counter(
                "audit_write_errors_total",
                "Audit spool writes that failed (rows lost: disk full or unwritable)",
            )?,
            slow_writes: counter(
                "audit_slow_writes_total",
                "Responses that went out before their audit row was written (the disk \
                 stalled past 2 s; the row stayed queued)",
            )?,
        })
    }
}
