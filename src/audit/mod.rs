//! The audit log: one row per request that reached the gateway.
//!
//! Rows are what tenants are billed from, so the request path hands each row to a
//! bounded in-memory queue and never waits on storage; a background service writes
//! them out in batches. When the queue is full the row is appended to the spool
//! directly: slower for that one request, but nothing is dropped.

pub mod clickhouse;
pub mod reader;
pub mod shipper;
pub mod spool;
pub mod time;

use crate::config::AuditConf;
use crate::metrics::AuditMetrics;
use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, Notify};

pub use spool::Spool;

/// One audit row; field names and meanings are the contract's `llm_audit` columns.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditRow {
    pub request_id: String,
    /// Request start, UTC, as ClickHouse's `DateTime` text form.
    pub ts: String,
    pub ts_ms: u64,
    pub tenant: String,
    pub api_key_id: String,
    pub endpoint: String,
    pub model_requested: String,
    pub model: String,
    pub provider: String,
    pub region: String,
    pub stream: u8,
    pub status: u16,
    pub error_code: String,
    pub tokens_in: u32,
    pub tokens_out: u32,
    pub cached_tokens_in: u32,
    pub usage_estimated: u8,
    pub cost_nanousd: u64,
    pub latency_ms: u32,
    pub ttft_ms: u32,
    pub cache_hit: u8,
    pub fallback_used: u8,
    pub attempts: u8,
    pub node: String,
}

/// Rows queued in memory before the request path falls back to writing the spool itself.
const QUEUE_ROWS: usize = 65_536;
/// Largest batch written (and fsynced) to the spool at once.
const BATCH_ROWS: usize = 4096;
/// How long a row may wait in memory before its batch is written to the spool.
const FLUSH_EVERY: Duration = Duration::from_millis(100);

/// State the writer, the shipper and the admin listener share.
pub struct Shared {
    spool: Mutex<Spool>,
    dir: PathBuf,
    clickhouse: Option<clickhouse::ClickHouse>,
    /// `ts_ms` of the oldest row in the spool not yet in ClickHouse; 0 when none.
    oldest_unshipped_ms: AtomicU64,
    /// Spool bytes behind the shipper's cursor.
    unshipped_bytes: AtomicU64,
    metrics: AuditMetrics,
}

/// The request path's handle.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<AuditRow>,
    shared: Arc<Shared>,
}

/// The background service: writes queued rows to the spool in fsynced batches and,
/// with a `clickhouse` section, runs the shipper beside it. Add it to the server as
/// a background service.
pub struct AuditService {
    rx: Mutex<Option<mpsc::Receiver<AuditRow>>>,
    shared: Arc<Shared>,
    shipper: Mutex<Option<shipper::ChShipper>>,
    wake: Arc<Notify>,
}

/// Where an audit query was answered from.
pub struct AuditAnswer {
    pub source: &'static str,
    pub rows: Vec<serde_json::Value>,
    /// Why the answer did not come from ClickHouse although it is configured.
    pub note: Option<String>,
}

impl AuditLog {
    pub fn new(
        conf: &AuditConf,
        metrics: AuditMetrics,
    ) -> std::io::Result<(AuditLog, AuditService)> {
        Self::with_queue(conf, metrics, QUEUE_ROWS)
    }

    fn with_queue(
        conf: &AuditConf,
        metrics: AuditMetrics,
        queue_rows: usize,
    ) -> std::io::Result<(AuditLog, AuditService)> {
        let spool = Spool::open(&conf.spool_dir)?;
        let shared = Arc::new(Shared {
            spool: Mutex::new(spool),
            dir: conf.spool_dir.clone(),
            clickhouse: conf.clickhouse.as_ref().map(clickhouse::ClickHouse::new),
            oldest_unshipped_ms: AtomicU64::new(0),
            unshipped_bytes: AtomicU64::new(0),
            metrics: metrics.clone(),
        });
        let wake = Arc::new(Notify::new());
        let shipper = conf.clickhouse.as_ref().map(|ch| shipper::ChShipper {
            sink: clickhouse::ClickHouse::new(ch),
            dir: conf.spool_dir.clone(),
            batch_rows: ch.batch_rows,
            flush: Duration::from_millis(ch.flush_ms),
            wake: wake.clone(),
            shared: shared.clone(),
            metrics,
        });
        let (tx, rx) = mpsc::channel(queue_rows);
        Ok((
            AuditLog {
                tx,
                shared: shared.clone(),
            },
            AuditService {
                rx: Mutex::new(Some(rx)),
                shared,
                shipper: Mutex::new(shipper),
                wake,
            },
        ))
    }

    /// Rows waiting in memory for the writer.
    pub fn queue_depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Hands a row over without waiting; never drops it.
    pub fn emit(&self, row: AuditRow) {
        if let Err(e) = self.tx.try_send(row) {
            let row = match e {
                mpsc::error::TrySendError::Full(r) | mpsc::error::TrySendError::Closed(r) => r,
            };
            write_batch(&self.shared.spool, &[row]);
        }
    }

    /// Sets the audit gauges (read at scrape time).
    pub async fn refresh_gauges(&self) {
        let m = &self.shared.metrics;
        m.queue_depth.set(self.queue_depth() as i64);
        let oldest = self.shared.oldest_unshipped_ms.load(Ordering::Relaxed);
        m.oldest_unshipped_age_seconds
            .set(shipper::oldest_age_s(oldest));
        m.unshipped_bytes
            .set(self.shared.unshipped_bytes.load(Ordering::Relaxed) as i64);
        let dir = self.shared.dir.clone();
        if let Ok(bytes) = tokio::task::spawn_blocking(move || spool::total_bytes(&dir)).await {
            m.spool_bytes.set(bytes.min(i64::MAX as u64) as i64);
        }
    }

    /// `tenant`'s rows since `since_ms`, oldest first, at most `limit`: from ClickHouse
    /// when configured, else (or when it fails) from the spool, saying so.
    pub async fn query(
        &self,
        tenant: &str,
        since_ms: u64,
        limit: usize,
    ) -> std::io::Result<AuditAnswer> {
        let mut note = None;
        if let Some(ch) = &self.shared.clickhouse {
            match ch.query(tenant, since_ms, limit).await {
                Ok(rows) => {
                    return Ok(AuditAnswer {
                        source: "clickhouse",
                        rows,
                        note: None,
                    })
                }
                Err(e) => {
                    log::warn!("audit: query to ClickHouse failed, answering from the spool: {e}");
                    note = Some(format!(
                        "ClickHouse query failed ({e}); rows from the local spool only, which \
                         holds the rows not yet shipped"
                    ));
                }
            }
        }
        let dir = self.shared.dir.clone();
        let tenant = tenant.to_string();
        let rows =
            tokio::task::spawn_blocking(move || spool::query(&dir, &tenant, since_ms, limit))
                .await
                .map_err(std::io::Error::other)??;
        Ok(AuditAnswer {
            source: "spool",
            rows,
            note,
        })
    }
}

fn write_batch(spool: &Mutex<Spool>, rows: &[AuditRow]) {
    let mut s = match spool.lock() {
        Ok(s) => s,
        Err(p) => p.into_inner(),
    };
    if let Err(e) = s.append(rows) {
        log::error!(
            "audit: writing {} rows to the spool {} failed: {e}",
            rows.len(),
            s.dir().display()
        );
    }
}

fn take<T>(m: &Mutex<Option<T>>) -> Option<T> {
    match m.lock() {
        Ok(mut g) => g.take(),
        Err(p) => p.into_inner().take(),
    }
}

#[async_trait]
impl BackgroundService for AuditService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(mut rx) = take(&self.rx) else {
            return;
        };
        let shipper = take(&self.shipper).map(|s| tokio::spawn(s.run(shutdown.clone())));
        // Timer-driven on purpose: awaiting the queue would wake this task for every row
        // sent, a futex wake and two context switches per request, measured at ~8 % of
        // the gateway's CPU (BENCHMARKS.md). A row waits at most FLUSH_EVERY; nothing is
        // dropped (a full queue is written by the request path itself).
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut open = true;
        while open {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => {
                    // Drain what is queued: graceful shutdown and upgrade lose no row.
                    // Rows of requests still finishing go to the spool directly.
                    rx.close();
                    open = false;
                }
            }
            loop {
                let mut batch = Vec::with_capacity(BATCH_ROWS);
                while batch.len() < BATCH_ROWS {
                    match rx.try_recv() {
                        Ok(r) => batch.push(r),
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => {
                            open = false;
                            break;
                        }
                    }
                }
                if batch.is_empty() {
                    break;
                }
                let full = batch.len() == BATCH_ROWS;
                let shared = self.shared.clone();
                let _ =
                    tokio::task::spawn_blocking(move || write_batch(&shared.spool, &batch)).await;
                self.wake.notify_one();
                if !full {
                    break;
                }
            }
        }
        // The shipper keeps shipping through the grace period, until the runtime
        // stops; what it has not shipped by then replays at the next start.
        if let Some(s) = shipper {
            let _ = s.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_sends_rows_straight_to_the_spool() {
        let dir = std::env::temp_dir().join(format!("llmgw-audit-full-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let conf = AuditConf {
            spool_dir: dir.clone(),
            clickhouse: None,
        };
        let metrics = crate::metrics::Metrics::new().unwrap().audit;
        let (log, _service) = AuditLog::with_queue(&conf, metrics, 2).unwrap();
        for i in 0..5 {
            log.emit(AuditRow {
                request_id: format!("r{i}"),
                ..AuditRow::default()
            });
        }
        assert_eq!(log.queue_depth(), 2);
        let on_disk: Vec<String> = spool::list_files(&dir)
            .unwrap()
            .iter()
            .flat_map(|f| {
                let text = std::fs::read_to_string(dir.join(f)).unwrap();
                text.lines()
                    .map(|l| serde_json::from_str::<AuditRow>(l).unwrap().request_id)
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(on_disk, ["r2", "r3", "r4"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
