//! The ClickHouse shipper: spool → ClickHouse, in batches of `batch_rows` or every
//! `flush_ms`, whichever comes first.
//!
//! It runs beside the spool writer and never holds anything the request path needs.
//! A failed or slow insert leaves the cursor where it was: the same rows are retried
//! with capped exponential backoff, and the spool keeps growing on disk meanwhile.
//! On shutdown it stops waiting for full batches and ships what is there until the
//! process ends; whatever is left replays at the next start. One process ships from
//! a spool directory at a time (a lock file), so during a graceful upgrade the new
//! process takes over when the old one exits.

use super::clickhouse::ClickHouse;
use super::reader::{Batch, SpoolReader};
use super::time::now_ms;
use super::AuditMetrics;
use super::Shared;
use pingora_core::server::ShutdownWatch;
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Longest the shipper sleeps without looking at the spool (rows the request path
/// wrote directly, when the queue was full, come with no wake-up).
const POLL: Duration = Duration::from_millis(250);
/// Failures are logged at most this often (every one is counted in the metrics).
const LOG_EVERY: Duration = Duration::from_secs(10);
const LOCK_FILE: &str = "clickhouse.lock";

pub struct ChShipper {
    pub sink: ClickHouse,
    pub dir: PathBuf,
    pub batch_rows: usize,
    pub flush: Duration,
    pub wake: Arc<Notify>,
    pub shared: Arc<Shared>,
    pub metrics: AuditMetrics,
}

/// Runs `f(reader)` on the blocking pool (file I/O), handing the reader back.
async fn on_disk<T: Send + 'static>(
    reader: SpoolReader,
    f: impl FnOnce(&mut SpoolReader) -> T + Send + 'static,
) -> Option<(SpoolReader, T)> {
    tokio::task::spawn_blocking(move || {
        let mut reader = reader;
        let out = f(&mut reader);
        (reader, out)
    })
    .await
    .ok()
}

impl ChShipper {
    /// Waits until this process may ship from the spool (no other process does).
    async fn lock(&self, shutdown: &mut ShutdownWatch) -> Option<File> {
        let path = self.dir.join(LOCK_FILE);
        let mut logged = false;
        loop {
            match File::create(&path).map(|f| f.try_lock().map(|()| f)) {
                Ok(Ok(f)) => return Some(f),
                Ok(Err(_)) if !logged => {
                    log::info!(
                        "audit: another process ships {} (graceful upgrade?); waiting for it",
                        self.dir.display()
                    );
                    logged = true;
                }
                Err(e) if !logged => {
                    log::error!("audit: cannot open {}: {e}", path.display());
                    logged = true;
                }
                _ => {}
            }
            if *shutdown.borrow() {
                // Stopping, but the spool may hold rows of ours: the process holding the
                // lock (an upgrade's old one) is about to end, so keep trying until the
                // process itself ends (`crate::shutdown` bounds that by the grace period).
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                changed = shutdown.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
            }
        }
    }

    pub async fn run(mut self, mut shutdown: ShutdownWatch) {
        let Some(_lock) = self.lock(&mut shutdown).await else {
            // The server is gone: nothing can ship from here.
            self.shared.mark_shipped(super::Shipped::Never);
            return;
        };
        let dir = self.dir.clone();
        let Some(mut reader) = tokio::task::spawn_blocking(move || SpoolReader::open(&dir))
            .await
            .ok()
        else {
            return;
        };
        let mut backoff = BACKOFF_START;
        // Rows read but not yet acknowledged: a batch waiting for `flush_ms` or for
        // a retry, grown by later reads rather than read again.
        let mut batch: Option<Batch> = None;
        let mut pending_since: Option<Instant> = None;
        let mut last_log: Option<Instant> = None;
        loop {
            let stopping = *shutdown.borrow();
            let max = self.batch_rows;
            let held = batch.take();
            let Some((r, (read, pending))) = on_disk(reader, move |r| {
                let read = match held {
                    Some(mut b) => r.fill(&mut b, max).map(|()| b),
                    None => r.read(max),
                };
                (read, r.pending_bytes())
            })
            .await
            else {
                return;
            };
            reader = r;
            self.shared
                .unshipped_bytes
                .store(pending, Ordering::Relaxed);
            let b = match read {
                Ok(b) => b,
                Err(e) => {
                    log::error!("audit: reading the spool {}: {e}", self.dir.display());
                    self.idle(&mut shutdown, POLL).await;
                    continue;
                }
            };
            self.metrics.corrupt_lines.inc_by(b.corrupt);
            self.shared.oldest_unshipped_ms.store(
                b.rows.first().map_or(0, |r| r.ts_ms.max(1)),
                Ordering::Relaxed,
            );
            if !b.moves(reader.cursor()) {
                if stopping {
                    // Caught up with the spool: the process may end.
                    self.shared.mark_shipped(super::Shipped::CaughtUp);
                }
                pending_since = None;
                self.idle(&mut shutdown, POLL).await;
                continue;
            }
            // A partial batch waits for more rows until `flush_ms` after it was first
            // seen (not while shutting down).
            if b.rows.len() < self.batch_rows && !stopping && !b.rows.is_empty() {
                let since = *pending_since.get_or_insert_with(Instant::now);
                let left = self.flush.saturating_sub(since.elapsed());
                if !left.is_zero() {
                    batch = Some(Batch { corrupt: 0, ..b });
                    self.idle(&mut shutdown, left.min(POLL)).await;
                    continue;
                }
            }
            if !b.rows.is_empty() {
                if let Err(e) = self.sink.insert(&b.rows).await {
                    self.metrics.failed_batches.inc();
                    if last_log.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
                        log::error!(
                            "audit: inserting {} rows into ClickHouse failed: {e}; they stay in \
                             the spool, retrying in {} ms",
                            b.rows.len(),
                            backoff.as_millis()
                        );
                        last_log = Some(Instant::now());
                    }
                    batch = Some(Batch { corrupt: 0, ..b });
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
                if last_log.take().is_some() {
                    log::info!("audit: ClickHouse accepts rows again");
                }
                self.metrics.rows_shipped.inc_by(b.rows.len() as u64);
            }
            backoff = BACKOFF_START;
            pending_since = None;
            let end = b.end;
            let Some((r, committed)) = on_disk(reader, move |r| r.commit(end)).await else {
                return;
            };
            reader = r;
            if let Err(e) = committed {
                // The rows are in ClickHouse; a restart ships them once more and they
                // collapse there.
                log::error!("audit: saving the shipping cursor: {e}");
            }
        }
    }

    /// Sleeps up to `d`, waking early for new rows or the start of a shutdown.
    async fn idle(&self, shutdown: &mut ShutdownWatch, d: Duration) {
        if *shutdown.borrow() {
            // Shutting down: poll briefly for rows written by requests still finishing.
            tokio::time::sleep(d.min(Duration::from_millis(50))).await;
            return;
        }
        tokio::select! {
            _ = self.wake.notified() => {}
            _ = tokio::time::sleep(d) => {}
            _ = shutdown.changed() => {}
        }
    }
}

/// Age of the oldest row not yet in ClickHouse, for the metrics.
pub fn oldest_age_s(oldest_ms: u64) -> i64 {
    if oldest_ms == 0 {
        return 0;
    }
    (now_ms().saturating_sub(oldest_ms) / 1000) as i64
}
