//! The audit log: one row per request that reached the gateway.
//!
//! Rows are what tenants are billed from, so the request path hands each row to a
//! bounded in-memory queue and never waits on storage; a background service writes
//! them out in batches. When the queue is full the row is appended to the spool
//! directly: slower for that one request, but nothing is dropped.

pub mod spool;
pub mod time;

use crate::config::AuditConf;
use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

pub use spool::Spool;

/// One audit row; field names and meanings are the contract's `llm_audit` columns.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
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
/// Largest batch written (and fsynced) at once.
const BATCH_ROWS: usize = 4096;
/// How long a row may wait in memory before its batch is written.
const FLUSH_EVERY: Duration = Duration::from_millis(100);

/// The request path's handle.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<AuditRow>,
    spool: Arc<Mutex<Spool>>,
}

/// The background writer; add it to the server as a background service.
pub struct Shipper {
    rx: Mutex<Option<mpsc::Receiver<AuditRow>>>,
    spool: Arc<Mutex<Spool>>,
}

impl AuditLog {
    pub fn new(conf: &AuditConf) -> std::io::Result<(AuditLog, Shipper)> {
        let spool = Arc::new(Mutex::new(Spool::open(&conf.spool_dir)?));
        let (tx, rx) = mpsc::channel(QUEUE_ROWS);
        Ok((
            AuditLog {
                tx,
                spool: spool.clone(),
            },
            Shipper {
                rx: Mutex::new(Some(rx)),
                spool,
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
            write_batch(&self.spool, &[row]);
        }
    }
}

fn write_batch(spool: &Mutex<Spool>, rows: &[AuditRow]) {
    let mut s = match spool.lock() {
        Ok(s) => s,
        Err(p) => p.into_inner(),
    };
    if let Err(e) = s.append(rows) {
        log::error!(
            "audit: writing {} rows to the spool failed: {e}",
            rows.len()
        );
    }
}

#[async_trait]
impl BackgroundService for Shipper {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let taken = match self.rx.lock() {
            Ok(mut g) => g.take(),
            Err(p) => p.into_inner().take(),
        };
        let Some(mut rx) = taken else {
            return;
        };
        // Timer-driven on purpose: awaiting the queue would wake this task, which runs
        // on a thread of its own, for every row sent — a futex wake and two context
        // switches per request, measured at ~8 % of the gateway's CPU (BENCHMARKS.md).
        // A row waits at most FLUSH_EVERY; nothing is dropped (a full queue is written
        // by the request path itself).
        let mut batch = Vec::with_capacity(BATCH_ROWS);
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut open = true;
        while open {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => {
                    // Drain what is queued: graceful shutdown and upgrade lose no row.
                    rx.close();
                    open = false;
                }
            }
            loop {
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
                let spool = self.spool.clone();
                let rows = std::mem::replace(&mut batch, Vec::with_capacity(BATCH_ROWS));
                let _ = tokio::task::spawn_blocking(move || write_batch(&spool, &rows)).await;
                if !full {
                    break;
                }
            }
        }
    }
}
