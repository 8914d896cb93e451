//! The audit log: one row per request that reached the gateway.
//!
//! Rows are what tenants are billed from, so a row must survive the gateway being
//! killed the moment its response has gone out. The request path serialises its row
//! and hands it to the writer thread, which appends whatever has queued with one
//! `write(2)` (group commit) and acknowledges; the response's last bytes are only
//! written after that acknowledgement ([`AuditLog::write`]). A row in the page cache
//! outlives the process; an fsync every 100 ms, on a thread of its own, covers the
//! machine going down. Nothing on a worker thread blocks on the disk: the writer is a
//! thread of its own, and a full queue (the disk far behind) is the one case where the
//! request path writes the spool itself, slower for that request but losing nothing.

pub mod clickhouse;
mod metrics;
pub mod reader;
pub mod shipper;
pub mod spool;
pub mod time;

use crate::config::AuditConf;
use async_trait::async_trait;
pub use metrics::AuditMetrics;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Notify};

pub use spool::Spool;

/// One audit row; field names and meanings are the contract's `llm_audit` columns.
/// Columns added after the first release sit at the end, in the order
/// [`clickhouse::ADDED_COLUMNS`] adds them to an existing table.
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
    /// The tenant's own end user (`x-gateway-end-user`, OpenAI `user`, Anthropic
    /// `metadata.user_id`), empty when none. Defaulted when absent so that spool lines
    /// written by a version without the column still ship, with it empty.
    #[serde(default)]
    pub end_user: String,
    /// The provider's name for the model that served (a deployment's upstream model or
    /// Azure deployment name), empty when none was tried. Defaulted like `end_user`.
    #[serde(default)]
    pub upstream_model: String,
}

/// Rows queued in memory before the request path falls back to writing the spool itself.
const QUEUE_ROWS: usize = 65_536;
/// Most rows the writer appends with one `write(2)`.
const BATCH_ROWS: usize = 4096;
/// How long the writer lets rows gather after a batch before looking again
/// (`LLM_GATEWAY_AUDIT_GATHER_US` overrides; 0 turns it off). Waking the writer for
/// each row cost a futex wake and two context switches per request, about a sixth of
/// the gateway's CPU under load; pausing after a batch means that, while rows keep
/// coming, senders find the writer not parked (no wake) and one write takes what
/// gathered. A request then waits at most this much longer for its row, and only
/// under load: after a quiet pause the writer parks and the next row wakes it at once.
const GATHER: Duration = Duration::from_micros(250);
/// Client-chosen request ids remembered before the stale ones are dropped.
const RECENT_IDS: usize = 4096;
/// How long a written row may wait for its fsync.
const SYNC_EVERY: Duration = Duration::from_millis(100);
/// Longest a response waits for its row to be written. Past it (a stalled disk) the
/// response goes on and the row stays queued: a hung disk must not hang every client,
/// and the row is only at risk if the process also dies before the disk recovers.
const WRITE_WAIT: Duration = Duration::from_secs(2);

/// The start ms last given to each recently seen client-chosen request id (hashed).
#[derive(Default)]
struct RecentIds {
    last: HashMap<u64, u64>,
    pruned_at: u64,
}

/// A serialised row, and who waits for it to be written.
struct Job {
    line: Vec<u8>,
    ack: Option<oneshot::Sender<()>>,
}

/// State the writer, the shipper and the admin listener share.
pub struct Shared {
    spool: Mutex<Spool>,
    dir: PathBuf,
    clickhouse: Option<clickhouse::ClickHouse>,
    /// `ts_ms` of the oldest row in the spool not yet in ClickHouse; 0 when none.
    oldest_unshipped_ms: AtomicU64,
    /// Spool bytes behind the shipper's cursor.
    unshipped_bytes: AtomicU64,
    /// Rows written since the last fsync.
    dirty: AtomicBool,
    /// Shutting down: the writer may be gone, rows are written by their requests.
    closing: AtomicBool,
    /// Latest start ms given to each recently seen client-chosen request id (hashed).
    recent_ids: Mutex<RecentIds>,
    metrics: AuditMetrics,
    /// Whether this process has anything left to ship while stopping
    /// ([`Shipped`]); the early exit on SIGTERM waits for it (`crate::shutdown`).
    shipped: tokio::sync::watch::Sender<Shipped>,
}

/// A stopping shipper's progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shipped {
    /// Rows may be waiting.
    Pending,
    /// The shipper found the spool shipped, as of its last look.
    CaughtUp,
    /// Nothing will ever ship from this process: no ClickHouse, or another process
    /// (an upgrade's new one) holds the spool.
    Never,
}

impl Shared {
    pub(crate) fn mark_shipped(&self, state: Shipped) {
        self.shipped.send_if_modified(|s| {
            let change = *s != Shipped::Never && *s != state;
            if change {
                *s = state;
            }
            change
        });
    }
}

/// The request path's handle.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Job>,
    shared: Arc<Shared>,
}

/// The background service: starts the writer and fsync threads and, with a
/// `clickhouse` section, runs the shipper beside them. Add it to the server as a
/// background service (threads are started there, after a `-d` fork, not before).
pub struct AuditService {
    rx: Mutex<Option<mpsc::Receiver<Job>>>,
    /// For the queue's depth while draining at shutdown.
    log: AuditLog,
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
            dirty: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            recent_ids: Mutex::new(RecentIds::default()),
            metrics: metrics.clone(),
            shipped: tokio::sync::watch::Sender::new(if conf.clickhouse.is_none() {
                Shipped::Never
            } else {
                Shipped::Pending
            }),
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
        let log = AuditLog {
            tx,
            shared: shared.clone(),
        };
        Ok((
            log.clone(),
            AuditService {
                rx: Mutex::new(Some(rx)),
                log,
                shared,
                shipper: Mutex::new(shipper),
                wake,
            },
        ))
    }

    /// The start ms to record for a request carrying the client-chosen id
    /// `request_id`, which started at `ms`: `ms`, or the first later ms this node has
    /// not given that id yet. Rows collapse in ClickHouse on (tenant, ts, request_id,
    /// ts_ms, node), so without this two calls reusing one id within a millisecond on
    /// one node would be billed as one. Costs a lock only for requests that bring
    /// their own id; the shift is at most the number of such same-ms reuses.
    pub fn unique_start_ms(&self, request_id: &str, ms: u64) -> u64 {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let h = BuildHasherDefault::<DefaultHasher>::default().hash_one(request_id);
        let mut recent = match self.shared.recent_ids.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if recent.last.len() >= RECENT_IDS && ms >= recent.pruned_at + 1000 {
            // Ids last used over a second ago cannot collide with a start from now on.
            // At most once a second, so a flood of fresh ids costs no scan per request.
            recent.last.retain(|_, last| *last + 1000 > ms);
            recent.pruned_at = ms;
        }
        let slot = recent.last.entry(h).or_insert(0);
        let start = if *slot >= ms { *slot + 1 } else { ms };
        *slot = start;
        start
    }

    /// Rows waiting in memory for the writer.
    pub fn queue_depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Hands a row over without waiting for it to be written; never drops it. For
    /// rows whose response did not complete (nothing to hold back).
    pub fn emit(&self, row: &AuditRow) {
        self.submit(row, None);
    }

    /// Returns once `row` is written to the spool (see the module doc), or after
    /// [`WRITE_WAIT`] with the row still queued. Call it before the response's last
    /// bytes: a client that got its answer then always has its row.
    pub async fn write(&self, row: &AuditRow) {
        let (tx, rx) = oneshot::channel();
        if self.submit(row, Some(tx)) {
            // An error means the writer is gone (shutdown): the row was then written
            // by `submit` or by the writer's drain.
            if tokio::time::timeout(WRITE_WAIT, rx).await.is_err() {
                self.shared.metrics.slow_writes.inc();
            }
        }
    }

    /// Returns once every row handed over before the call is in the spool and
    /// fsynced, or at `deadline`. The process may then end at once: the shutdown
    /// path (`crate::shutdown`) calls it after the last request, instead of waiting
    /// out Pingora's grace period with the writer still running.
    pub async fn flush(&self, deadline: std::time::Instant) {
        let deadline = tokio::time::Instant::from_std(deadline);
        let (ack, done) = oneshot::channel();
        // An empty line behind every row queued so far: the writer acknowledges it
        // once those are written. Rows the request path wrote itself are already on
        // disk. An error means the writer is gone, with nothing left queued.
        let job = Job {
            line: Vec::new(),
            ack: Some(ack),
        };
        if let Ok(Ok(())) = tokio::time::timeout_at(deadline, self.tx.send(job)).await {
            if tokio::time::timeout_at(deadline, done).await.is_err() {
                log::warn!("audit: rows still queued at the end of the grace period");
            }
        }
        let shared = self.shared.clone();
        let _ = tokio::task::spawn_blocking(move || sync_now(&shared)).await;
    }

    /// Queues the row, or writes it here when the queue is full or the writer has
    /// stopped. Returns whether it was queued.
    fn submit(&self, row: &AuditRow, ack: Option<oneshot::Sender<()>>) -> bool {
        let mut line = Vec::with_capacity(640);
        if let Err(e) = serde_json::to_writer(&mut line, row) {
            // Plain strings and integers: cannot fail, but a row is not dropped silently.
            log::error!("audit: cannot serialise a row: {e}");
            self.shared.metrics.write_errors.inc();
            return false;
        }
        line.push(b'\n');
        if !self.shared.closing.load(Ordering::Acquire) {
            match self.tx.try_send(Job { line, ack }) {
                Ok(()) => return true,
                Err(
                    mpsc::error::TrySendError::Full(job) | mpsc::error::TrySendError::Closed(job),
                ) => line = job.line,
            }
        }
        write_lines(&self.shared, &line);
        false
    }

    /// Returns once a stopping shipper has shipped everything in the spool (at once
    /// without ClickHouse, or when another process ships), or at `deadline`; what is
    /// left then ships at the next start.
    /// Call it after [`AuditLog::flush`]: an earlier "caught up" may predate the last
    /// rows, so the shipper is asked to look again (it does every 250 ms).
    pub async fn wait_shipped(&self, deadline: std::time::Instant) -> bool {
        self.shared.mark_shipped(Shipped::Pending);
        let mut rx = self.shared.shipped.subscribe();
        let deadline = tokio::time::Instant::from_std(deadline);
        let done = tokio::time::timeout_at(deadline, rx.wait_for(|s| *s != Shipped::Pending))
            .await
            .is_ok_and(|r| r.is_ok());
        done
    }

    /// `ts_ms` of the oldest spooled row not yet in ClickHouse (0: none waiting), for
    /// the `audit_shipping_stalled` alert.
    pub fn oldest_unshipped_ms(&self) -> u64 {
        self.shared.oldest_unshipped_ms.load(Ordering::Relaxed)
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
                Ok(mut rows) => {
                    rows.iter_mut().for_each(with_every_column);
                    return Ok(AuditAnswer {
                        source: "clickhouse",
                        rows,
                        note: None,
                    });
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
        let mut rows =
            tokio::task::spawn_blocking(move || spool::query(&dir, &tenant, since_ms, limit))
                .await
                .map_err(std::io::Error::other)??;
        rows.iter_mut().for_each(with_every_column);
        Ok(AuditAnswer {
            source: "spool",
            rows,
            note,
        })
    }
}

/// Gives an answered row every column of [`AuditRow`], with its default where the
/// source lacks it: spool lines written by an earlier version, and a ClickHouse table
/// not yet given its [`clickhouse::ADDED_COLUMNS`] (that happens at the first insert),
/// read the same as new rows. Columns the row has that `AuditRow` does not are kept.
fn with_every_column(row: &mut serde_json::Value) {
    static DEFAULTS: std::sync::OnceLock<serde_json::Map<String, serde_json::Value>> =
        std::sync::OnceLock::new();
    let defaults = DEFAULTS.get_or_init(|| match serde_json::to_value(AuditRow::default()) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    });
    if let serde_json::Value::Object(m) = row {
        for (k, v) in defaults {
            if !m.contains_key(k) {
                m.insert(k.clone(), v.clone());
            }
        }
    }
}

fn write_lines(shared: &Shared, lines: &[u8]) {
    let mut s = match shared.spool.lock() {
        Ok(s) => s,
        Err(p) => p.into_inner(),
    };
    match s.append_lines(lines) {
        Ok(()) => shared.dirty.store(true, Ordering::Release),
        Err(e) => {
            shared.metrics.write_errors.inc();
            log::error!(
                "audit: writing {} bytes of rows to the spool {} failed: {e}",
                lines.len(),
                s.dir().display()
            );
        }
    }
}

/// The writer thread: appends what has queued with one write, then acknowledges it.
/// Blocks on the queue (a thread, not a task, so it may block on the disk too); ends
/// when every sender is gone or the queue is closed and drained.
fn writer(mut rx: mpsc::Receiver<Job>, shared: Arc<Shared>, wake: Arc<Notify>) {
    // Fault injection for tests: a disk this slow per write.
    let delay = std::env::var("LLM_GATEWAY_AUDIT_WRITE_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis);
    let gather = std::env::var("LLM_GATEWAY_AUDIT_GATHER_US")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(GATHER, Duration::from_micros);
    let mut buf = Vec::with_capacity(1 << 20);
    let mut acks = Vec::with_capacity(BATCH_ROWS);
    let mut busy = false;
    loop {
        let first = if busy && !gather.is_zero() {
            // Rows came in the last batch: let the next ones gather instead of being
            // woken for each (see `GATHER`); none after the pause means quiet again.
            std::thread::sleep(gather);
            match rx.try_recv() {
                Ok(job) => job,
                Err(mpsc::error::TryRecvError::Empty) => {
                    busy = false;
                    continue;
                }
                Err(mpsc::error::TryRecvError::Disconnected) => break,
            }
        } else {
            match rx.blocking_recv() {
                Some(job) => job,
                None => break,
            }
        };
        busy = true;
        let mut job = Some(first);
        let mut rows = 0;
        while let Some(j) = job.take() {
            buf.extend_from_slice(&j.line);
            acks.extend(j.ack);
            rows += 1;
            if rows < BATCH_ROWS {
                job = rx.try_recv().ok();
            }
        }
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
        // A batch of nothing but `flush` markers writes nothing.
        if !buf.is_empty() {
            write_lines(&shared, &buf);
        }
        buf.clear();
        for a in acks.drain(..) {
            let _ = a.send(());
        }
        wake.notify_one();
    }
}

/// The fsync thread: syncs the spool file when rows were written since the last time.
fn syncer(shared: Arc<Shared>) {
    loop {
        std::thread::sleep(SYNC_EVERY);
        if shared.dirty.swap(false, Ordering::AcqRel) {
            sync_now(&shared);
        }
    }
}

fn sync_now(shared: &Shared) {
    let file = match shared.spool.lock() {
        Ok(s) => s.current_file(),
        Err(p) => p.into_inner().current_file(),
    };
    if let Some(Err(e)) = file.map(|f| f.sync_data()) {
        log::error!("audit: fsync of the spool failed: {e}");
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
        let Some(rx) = take(&self.rx) else {
            return;
        };
        let (shared, wake) = (self.shared.clone(), self.wake.clone());
        let writer = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer(rx, shared, wake));
        let shared = self.shared.clone();
        let syncer = std::thread::Builder::new()
            .name("audit-fsync".into())
            .spawn(move || syncer(shared));
        if let Err(e) = writer.as_ref().and(syncer.as_ref()) {
            // Rows then queue until the queue is full, and are written by the request
            // path from there: slow, but nothing is lost.
            log::error!("audit: cannot start the writer threads: {e}");
        }
        let shipper = take(&self.shipper).map(|s| tokio::spawn(s.run(shutdown.clone())));
        let _ = shutdown.changed().await;
        // From here rows are written by their own requests, and what is queued is
        // drained: graceful shutdown and upgrade lose no row.
        self.shared.closing.store(true, Ordering::Release);
        let log = &self.log;
        let mut waited = Duration::ZERO;
        while log.queue_depth() > 0 && waited < Duration::from_secs(30) {
            tokio::time::sleep(Duration::from_millis(10)).await;
            waited += Duration::from_millis(10);
        }
        let shared = self.shared.clone();
        let _ = tokio::task::spawn_blocking(move || sync_now(&shared)).await;
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
    fn a_reused_request_id_never_gets_the_same_start_ms_twice() {
        let dir = std::env::temp_dir().join(format!("llmgw-audit-ids-{}", std::process::id()));
        let conf = AuditConf {
            spool_dir: dir.clone(),
            clickhouse: None,
        };
        let metrics = crate::metrics::Metrics::new().unwrap().audit;
        let (log, _service) = AuditLog::new(&conf, metrics).unwrap();
        let t = 1_700_000_000_000;
        assert_eq!(log.unique_start_ms("a", t), t);
        assert_eq!(log.unique_start_ms("a", t), t + 1);
        assert_eq!(log.unique_start_ms("a", t), t + 2);
        assert_eq!(log.unique_start_ms("b", t), t, "another id is not shifted");
        assert_eq!(log.unique_start_ms("a", t + 1), t + 3);
        assert_eq!(
            log.unique_start_ms("a", t + 10),
            t + 10,
            "a later start is kept"
        );
        // Many ids: once a second the old ones are dropped; recent ones still shift.
        for i in 0..2 * RECENT_IDS {
            log.unique_start_ms(&format!("x{i}"), t + 5_000);
        }
        assert_eq!(log.unique_start_ms("x1", t + 5_000), t + 5_001);
        log.unique_start_ms("y", t + 7_000);
        assert_eq!(log.shared.recent_ids.lock().unwrap().last.len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The writer pauses after each batch so that rows gather (`GATHER`): rows sent
    /// in a burst, during the pause and after the writer went back to waiting must all
    /// be acknowledged well before `WRITE_WAIT` (a row missed by the pause would hold
    /// its response for the whole 2 s and count as a slow write).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rows_sent_in_bursts_and_after_pauses_are_all_acknowledged_at_once() {
        let dir = std::env::temp_dir().join(format!("llmgw-audit-gather-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let conf = AuditConf {
            spool_dir: dir.clone(),
            clickhouse: None,
        };
        let metrics = crate::metrics::Metrics::new().unwrap().audit;
        let (log, service) = AuditLog::new(&conf, metrics).unwrap();
        let log = Arc::new(log);
        let (stop, watch) = tokio::sync::watch::channel(false);
        let service = tokio::spawn(async move { service.start(watch).await });
        let mut n = 0;
        for pause_us in [0u64, 50, 250, 400, 2_000, 0] {
            let burst: Vec<_> = (0..64)
                .map(|_| {
                    n += 1;
                    let log = log.clone();
                    let row = AuditRow {
                        request_id: format!("g{n}"),
                        ..AuditRow::default()
                    };
                    tokio::spawn(async move { log.write(&row).await })
                })
                .collect();
            let started = std::time::Instant::now();
            for b in burst {
                b.await.unwrap();
            }
            assert!(
                started.elapsed() < Duration::from_millis(500),
                "a burst waited {:?} for its rows",
                started.elapsed()
            );
            tokio::time::sleep(Duration::from_micros(pause_us)).await;
        }
        assert_eq!(log.shared.metrics.slow_writes.get(), 0);
        let lines: usize = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
            .map(|t| {
                t.lines()
                    .filter(|l| l.contains("\"request_id\":\"g"))
                    .count()
            })
            .sum();
        assert_eq!(lines, n);
        stop.send(true).unwrap();
        let _ = service.await;
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// What the shutdown path relies on before it ends the process: every row handed
    /// over before `flush` is in the spool when it returns.
    #[tokio::test]
    async fn flush_returns_once_every_queued_row_is_in_the_spool() {
        let dir = std::env::temp_dir().join(format!("llmgw-audit-flush-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let conf = AuditConf {
            spool_dir: dir.clone(),
            clickhouse: None,
        };
        let metrics = crate::metrics::Metrics::new().unwrap().audit;
        let (log, service) = AuditLog::new(&conf, metrics).unwrap();
        let (stop, watch) = tokio::sync::watch::channel(false);
        let service = tokio::spawn(async move { service.start(watch).await });
        for i in 0..500 {
            log.emit(&AuditRow {
                request_id: format!("r{i}"),
                ..AuditRow::default()
            });
        }
        log.flush(std::time::Instant::now() + Duration::from_secs(10))
            .await;
        let lines: usize = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
            .map(|t| {
                t.lines()
                    .filter(|l| l.contains("\"request_id\":\"r"))
                    .count()
            })
            .sum();
        assert_eq!(lines, 500);
        stop.send(true).unwrap();
        service.await.unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn answered_rows_get_the_columns_an_older_writer_did_not_know() {
        let mut old = serde_json::json!({"request_id": "r", "tenant": "acme", "future": 1});
        with_every_column(&mut old);
        assert_eq!(old["end_user"], "");
        assert_eq!(old["tenant"], "acme", "present columns are kept");
        assert_eq!(old["future"], 1, "unknown columns are kept");
        let mut new = serde_json::json!({"end_user": "alice"});
        with_every_column(&mut new);
        assert_eq!(new["end_user"], "alice");
    }

    #[tokio::test]
    async fn the_spool_answer_shows_end_user_for_old_and_new_lines() {
        let dir = std::env::temp_dir().join(format!("llmgw-audit-eu-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let now = time::now_ms();
        let name = format!("audit-{}.jsonl", time::hour_stamp(now));
        let old = serde_json::json!({"request_id": "old", "tenant": "acme", "ts_ms": now});
        let new = AuditRow {
            request_id: "new".into(),
            tenant: "acme".into(),
            ts_ms: now,
            end_user: "alice".into(),
            ..AuditRow::default()
        };
        let text = format!("{old}\n{}\n", serde_json::to_string(&new).unwrap());
        std::fs::write(dir.join(name), text).unwrap();
        let conf = AuditConf {
            spool_dir: dir.clone(),
            clickhouse: None,
        };
        let metrics = crate::metrics::Metrics::new().unwrap().audit;
        let (log, _service) = AuditLog::new(&conf, metrics).unwrap();
        let answer = log.query("acme", now, 10).await.unwrap();
        let got: Vec<(&str, &str)> = answer
            .rows
            .iter()
            .map(|r| {
                (
                    r["request_id"].as_str().unwrap(),
                    r["end_user"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(got, [("old", ""), ("new", "alice")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

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
            log.emit(&AuditRow {
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
