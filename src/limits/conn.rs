//! One multiplexed connection to the counters' Redis, shared by every request, that
//! never stalls a request for long and heals itself.
//!
//! - Nothing connects at construction (the config loader and `Limits::new` run before
//!   any runtime); the first call connects, later calls clone the connection.
//! - Every connect and every command is bounded by a short timeout, so a dead or
//!   hung Redis costs a request at most [`OP_TIMEOUT`], and during the back-off after
//!   a failed connect it costs nothing: calls fail at once and `on_error` decides.
//! - A transport error drops the connection; the next call after the back-off (100 ms
//!   doubling to 1 s) reconnects, so Redis coming back is noticed within about a
//!   second, without a restart. Scripts are re-sent by `EVALSHA`'s `NOSCRIPT` fallback.
//! - Failures are counted for the metrics and logged at most once per
//!   [`LOG_EVERY`], never per request; the first success after a failure is logged.
//!
//! Why not `redis::aio::ConnectionManager` (the `connection-manager` feature): while
//! it reconnects, every call awaits its shared reconnect future and its retries, so
//! with Redis down each request would spend its whole timeout waiting; here calls
//! during the back-off fail at once and `on_error` decides without delay. The
//! wrapper is a plain `MultiplexedConnection` plus the state above.

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ErrorKind, FromRedisValue, RedisError};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Bound on one connect attempt and on one command's round trip.
pub(super) const OP_TIMEOUT: Duration = Duration::from_millis(200);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
const LOG_EVERY: Duration = Duration::from_secs(10);

/// A failed call: why, and whether Redis may have run it all the same (the command
/// was sent, then the reply was lost or late), so that its effects may need undoing.
#[derive(Debug)]
pub(super) struct CallError {
    pub msg: String,
    pub maybe_applied: bool,
}

#[derive(Default)]
struct State {
    /// The live connection and its generation, so a failure seen on an old
    /// connection does not drop a newer one.
    conn: Option<(u64, MultiplexedConnection)>,
    generation: u64,
    retry_at: Option<Instant>,
    backoff: Duration,
}

pub(super) struct Conn {
    client: Result<redis::Client, String>,
    /// What unavailability means, for the log line.
    policy: &'static str,
    state: Mutex<State>,
    /// One connect at a time; the others wait for its outcome instead of piling on.
    connecting: tokio::sync::Mutex<()>,
    errors: AtomicU64,
    down: AtomicBool,
    started: Instant,
    /// Milliseconds since `started` of the last log line, plus one (0: never).
    logged_at: AtomicU64,
}

impl Conn {
    pub(super) fn new(url: &str, policy: &'static str) -> Conn {
        Conn {
            client: redis::Client::open(url).map_err(|e| format!("counters.url: {e}")),
            policy,
            state: Mutex::new(State::default()),
            connecting: tokio::sync::Mutex::new(()),
            errors: AtomicU64::new(0),
            down: AtomicBool::new(false),
            started: Instant::now(),
            logged_at: AtomicU64::new(0),
        }
    }

    pub(super) fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        }
    }

    /// The shared connection, connecting first if there is none and the back-off
    /// allows it.
    async fn get(&self) -> Result<(u64, MultiplexedConnection), String> {
        if let Some(c) = self.ready()? {
            return Ok(c);
        }
        // Longer than one connect attempt, so that requests arriving while the first
        // connect is under way get its connection rather than an error.
        let _one = tokio::time::timeout(2 * OP_TIMEOUT, self.connecting.lock())
            .await
            .map_err(|_| "waiting for another connect to redis timed out".to_string())?;
        if let Some(c) = self.ready()? {
            return Ok(c);
        }
        let client = self.client.as_ref().map_err(Clone::clone)?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(OP_TIMEOUT))
            .set_response_timeout(Some(OP_TIMEOUT));
        let attempt = tokio::time::timeout(
            OP_TIMEOUT + Duration::from_millis(50),
            client.get_multiplexed_async_connection_with_config(&config),
        )
        .await;
        let mut s = self.state();
        match attempt {
            Ok(Ok(conn)) => {
                s.generation += 1;
                s.conn = Some((s.generation, conn.clone()));
                s.retry_at = None;
                s.backoff = BACKOFF_MIN;
                Ok((s.generation, conn))
            }
            Ok(Err(e)) => Err(Self::back_off(&mut s, format!("connect: {e}"))),
            Err(_) => Err(Self::back_off(&mut s, "connect timed out".to_string())),
        }
    }

    /// The live connection; `Ok(None)` when a connect should be tried now.
    fn ready(&self) -> Result<Option<(u64, MultiplexedConnection)>, String> {
        let s = self.state();
        if let Some(c) = &s.conn {
            return Ok(Some(c.clone()));
        }
        match s.retry_at {
            Some(t) if Instant::now() < t => {
                Err("redis unreachable (waiting to reconnect)".to_string())
            }
            _ => Ok(None),
        }
    }

    fn back_off(s: &mut State, why: String) -> String {
        let wait = s.backoff.clamp(BACKOFF_MIN, BACKOFF_MAX);
        s.retry_at = Some(Instant::now() + wait);
        s.backoff = (wait * 2).min(BACKOFF_MAX);
        why
    }

    /// Forgets connection `generation` after a transport failure.
    fn drop_conn(&self, generation: u64) {
        let mut s = self.state();
        if s.conn.as_ref().is_some_and(|(g, _)| *g == generation) {
            s.conn = None;
        }
    }

    /// Runs a script invocation with the timeout and failure handling above.
    pub(super) async fn invoke<T: FromRedisValue>(
        &self,
        inv: &redis::ScriptInvocation<'_>,
    ) -> Result<T, CallError> {
        let (generation, mut c) = self.get().await.map_err(|e| CallError {
            msg: self.failed(e),
            maybe_applied: false,
        })?;
        let r = tokio::time::timeout(OP_TIMEOUT, inv.invoke_async(&mut c)).await;
        self.outcome(generation, r)
    }

    /// Runs a pipeline (reads) with the timeout and failure handling above.
    pub(super) async fn query<T: FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, String> {
        let (generation, mut c) = self.get().await.map_err(|e| self.failed(e))?;
        let r = tokio::time::timeout(OP_TIMEOUT, pipe.query_async(&mut c)).await;
        self.outcome(generation, r).map_err(|e| e.msg)
    }

    fn outcome<T>(
        &self,
        generation: u64,
        r: Result<Result<T, RedisError>, tokio::time::error::Elapsed>,
    ) -> Result<T, CallError> {
        match r {
            Ok(Ok(v)) => {
                if self.down.swap(false, Ordering::Relaxed) {
                    log::info!(
                        "counters: redis reachable again ({} errors so far)",
                        self.errors()
                    );
                }
                Ok(v)
            }
            Ok(Err(e)) => {
                // A reply from the server (a script error) says the connection works;
                // anything else may have left it broken, possibly after Redis ran the
                // command. The scripts check everything before their first write, so
                // an error reply means nothing was applied.
                let kind = e.kind();
                let replied =
                    matches!(kind, ErrorKind::Server(_) | ErrorKind::UnexpectedReturnType);
                if !replied {
                    self.drop_conn(generation);
                }
                Err(CallError {
                    msg: self.failed(e.to_string()),
                    maybe_applied: !matches!(kind, ErrorKind::Server(_)),
                })
            }
            Err(_) => {
                self.drop_conn(generation);
                Err(CallError {
                    msg: self.failed(format!("no reply within {} ms", OP_TIMEOUT.as_millis())),
                    maybe_applied: true,
                })
            }
        }
    }

    /// Counts a failure and logs it unless another line went out recently.
    pub(super) fn failed(&self, why: String) -> String {
        let n = self.errors.fetch_add(1, Ordering::Relaxed) + 1;
        self.down.store(true, Ordering::Relaxed);
        let now = self.started.elapsed().as_millis() as u64 + 1;
        let last = self.logged_at.load(Ordering::Relaxed);
        if (last == 0 || now.saturating_sub(last) >= LOG_EVERY.as_millis() as u64)
            && self
                .logged_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            log::warn!(
                "counters: redis unavailable ({n} errors so far; on_error: {}): {why}",
                self.policy
            );
        }
        format!("counters store unavailable: {why}")
    }
}
