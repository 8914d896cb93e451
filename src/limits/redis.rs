//! The shared counter store: every edge node's admissions go through one Redis.
//!
//! Each admission is one Lua script (`admit.lua`) that checks every limit of every
//! scope (the tenant and, for a key with limits of its own, the key) and, only if all
//! fit, reserves in all; Redis runs scripts one at a time, so admissions from any
//! number of nodes can never together exceed a limit. Settling is one more script,
//! again over every scope at once.
//!
//! Keys, each with a TTL, per scope: under `llmgw:{TENANT}:` for the tenant, under
//! `llmgw:{TENANT}/KEY:` for one of its keys (tenant ids never contain `/`, so a key's
//! names never meet a tenant's; the braces are a cluster hash tag: a tenant's and its
//! keys' names share a slot, which a multi-key script needs):
//!
//! | key | type | holds | expires |
//! |---|---|---|---|
//! | `rps:SECOND` | string | requests admitted in that second | 2 s |
//! | `tpm` | hash second -> tokens | the tokens window | 120 s after the last write |
//! | `m:YYYY-MM` | hash | settled `spent`, `tokens_in`, `tokens_out`, `requests` | 7 days after the month |
//! | `h:HOUR` | hash | settled `spent` in that UTC hour | 26 h after the hour |
//! | `lease` | zset ticket -> deadline ms | requests in flight | 2 leases after the last write |
//! | `tix` | hash | each ticket's `COST MONTH HOUR`, sums `rm:MONTH`, `rh:HOUR` | with `lease` |
//!
//! Reservations live with the tickets that hold them, not in the month hash: a
//! crashed node's tickets stop being renewed, their lease runs out after [`LEASE`],
//! and the next admission of that tenant on any node gives their reservation and
//! slot back; if nothing touches the tenant, both keys simply expire together.
//!
//! Failures: an admission whose reply is lost after it was sent (a timeout, a broken
//! connection) may have run; its ticket is released at once from a task (queued for
//! replay if Redis is still away), so a Redis stall does not hold slots for a lease.
//! Settles that fail are queued (up to [`PENDING_MAX`]) and replayed every second by a
//! per-store task. A settle whose reply was lost (a timeout) may have run: its replay
//! applies only if Redis still holds the ticket, so it is never counted twice (if
//! the replay comes after the ticket's lease ran out and it was reclaimed, its spend
//! is dropped: a whole lease of Redis trouble is needed for that). Holds Redis never
//! registered (`fail_open` admissions, tenants without limits) have no ticket to
//! check: their replay after a lost reply can count twice, on the safe side.
//!
//! Time: every window (second, hour, month, lease deadlines) comes from this node's
//! clock, passed to the scripts, not from Redis `TIME`: the clock can be injected in
//! tests and the memory store agrees on every boundary. Nodes must keep their clocks
//! in sync (NTP): a node a second off counts its rps in a neighbouring second's key.

use super::calendar::{month_label, month_start_ms, Now};
use super::conn::Conn;
use super::memory::{Figures, KeyFigures};
use super::{tighter, Actual, Clock, Demand, KeyUsageView, RateHeaders, Refusal, Subject};
use super::{SpendHours, UsageView};
use crate::config::{ApiKey, Tenant};
use redis::Script;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, Weak};
use std::time::Duration;

static ADMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("common.lua"),
        include_str!("admit.lua")
    ))
});
static SETTLE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("common.lua"),
        include_str!("settle.lua")
    ))
});
static RENEW: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("renew.lua")));

/// How long an in-flight ticket holds its reservation without being renewed. Live
/// tickets are renewed every [`RENEW_EVERY`], so only a dead node's tickets lapse.
pub(super) const LEASE: Duration = Duration::from_secs(60);
const RENEW_EVERY: Duration = Duration::from_secs(15);
/// Settles that could not reach Redis are kept and replayed, up to this many.
const PENDING_MAX: usize = 100_000;
const MONTH_KEEP_MS: u64 = 7 * 86_400_000;
const HOUR_KEEP_MS: u64 = 26 * 3_600_000;

/// What a ticket needs for its settle script.
#[derive(Debug, Clone)]
pub(super) struct RemoteHold {
    /// The key prefix of each scope the ticket is counted in, the tenant's first.
    scopes: Vec<String>,
    id: String,
    /// Holds a lease in Redis (not for fail-open or unlimited admissions).
    registered: bool,
    /// The request was not counted at admission; count it when settling.
    count_request: bool,
    /// An earlier settle of this ticket may have run with its reply lost: apply this
    /// one only if Redis still holds the ticket, so that a replay never counts twice.
    maybe_settled: bool,
    second: u64,
    month: i64,
    hour: u64,
    tokens: u64,
}

impl RemoteHold {
    /// The hold of a reservation the admit script registered under `id`.
    fn registered(scopes: Vec<String>, id: String, now: Now, tokens: u64) -> RemoteHold {
        RemoteHold {
            scopes,
            id,
            registered: true,
            count_request: false,
            maybe_settled: false,
            second: now.second,
            month: now.month,
            hour: now.hour,
            tokens,
        }
    }
}

/// The outcome of an admission that could not be decided by Redis.
pub(super) enum Failure {
    Refused(Refusal),
    Down(String),
}

pub(super) struct Shared {
    pub(super) conn: Conn,
    pub(super) fail_open: bool,
    /// Prefix of this node's ticket ids: random per process.
    node: String,
    next_id: AtomicU64,
    /// Tickets in flight on this node, by the scopes they hold, for lease renewal.
    live: Mutex<HashMap<Vec<String>, HashSet<String>>>,
    pending: Mutex<VecDeque<(RemoteHold, Actual)>>,
    worker: Mutex<Option<tokio::task::JoinHandle<()>>>,
    clock: Clock,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// The prefix of a tenant's names.
fn tenant_prefix(tenant: &str) -> String {
    format!("llmgw:{{{tenant}}}:")
}

/// The prefix of the names of one key (with limits of its own) of a tenant.
fn key_prefix(tenant: &str, key: &str) -> String {
    format!("llmgw:{{{tenant}}}/{key}:")
}

/// The prefixes of every scope of `who`, the tenant's first.
fn prefixes(who: &Subject) -> Vec<String> {
    let mut v = Vec::with_capacity(2);
    v.push(tenant_prefix(who.tenant));
    if let Some((k, _)) = who.key {
        v.push(key_prefix(who.tenant, k));
    }
    v
}

fn key(tenant: &str, rest: &str) -> String {
    format!("{}{rest}", tenant_prefix(tenant))
}

/// -1 stands for "no limit" in the scripts.
fn limit<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-1".to_string(), |v| v.to_string())
}

fn month_ttl_ms(month: i64, now: Now) -> u64 {
    (month_start_ms(month + 1) + MONTH_KEEP_MS)
        .saturating_sub(now.ms)
        .max(1000)
}

fn hour_ttl_ms(hour: u64, now: Now) -> u64 {
    ((hour + 1) * 3_600_000 + HOUR_KEEP_MS)
        .saturating_sub(now.ms)
        .max(1000)
}

fn header(v: i64) -> Option<i64> {
    (v >= 0).then_some(v)
}

fn number(v: Option<String>) -> u64 {
    v.and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// Adds to `pipe` one `HGET` of the settled spend of each of the current UTC hour
/// and the 24 before it (separate keys), the newest first.
fn hours_spent(pipe: &mut redis::Pipeline, tenant: &str, now: Now) {
    for k in 0..=24u64 {
        pipe.cmd("HGET")
            .arg(key(tenant, &format!("h:{}", now.hour.saturating_sub(k))))
            .arg("spent");
    }
}

/// This hour's spend and each of the 24 before it, from [`hours_spent`].
fn hours_of(hours: impl IntoIterator<Item = Option<String>>) -> SpendHours {
    let mut spent = hours.into_iter().map(number);
    let this_hour = spent.next().unwrap_or(0);
    let mut past = [0; 24];
    for (slot, v) in past.iter_mut().zip(spent) {
        *slot = v;
    }
    SpendHours { this_hour, past }
}

/// Where on-call's clear of a tenant's guard is kept (Unix ms it lasts until), so
/// that every node stands down, not only the one the admin call reached.
fn guard_clear_key(tenant: &str) -> String {
    key(tenant, "guard_clear")
}

impl Shared {
    pub(super) fn new(url: &str, fail_open: bool, clock: Clock) -> Shared {
        let policy = if fail_open {
            "fail_open"
        } else {
            "fail_closed"
        };
        Shared {
            conn: Conn::new(url, policy),
            fail_open,
            node: format!("{:016x}", rand::random::<u64>()),
            next_id: AtomicU64::new(0),
            live: Mutex::new(HashMap::new()),
            pending: Mutex::new(VecDeque::new()),
            worker: Mutex::new(None),
            clock,
        }
    }

    pub(super) fn errors(&self) -> u64 {
        self.conn.errors()
    }

    /// A hold for a request Redis does not know about (fail-open, or a tenant with
    /// nothing to enforce): its settle records the spend and counts the request.
    pub(super) fn unregistered(&self, who: &Subject, now: Now) -> RemoteHold {
        RemoteHold {
            scopes: prefixes(who),
            id: String::new(),
            registered: false,
            count_request: true,
            maybe_settled: false,
            second: now.second,
            month: now.month,
            hour: now.hour,
            tokens: 0,
        }
    }

    /// One admission script over every scope of `who`; `demand: None` counts a request
    /// against rps only.
    pub(super) async fn admit(
        self: &Arc<Self>,
        who: &Subject<'_>,
        demand: Option<Demand>,
        now: Now,
    ) -> Result<(Option<RemoteHold>, RateHeaders), Failure> {
        self.ensure_worker();
        let id = format!(
            "{}-{}",
            self.node,
            self.next_id.fetch_add(1, Ordering::Relaxed)
        );
        let scopes = prefixes(who);
        let d = demand.unwrap_or_default();
        let month = month_label(now.month);
        let mut inv = ADMIT.prepare_invoke();
        for p in &scopes {
            inv.key(format!("{p}rps:{}", now.second))
                .key(format!("{p}tpm"))
                .key(format!("{p}m:{month}"))
                .key(format!("{p}h:{}", now.hour))
                .key(format!("{p}lease"))
                .key(format!("{p}tix"));
        }
        inv.arg(now.ms)
            .arg(now.second)
            .arg(&id)
            .arg(d.tokens)
            .arg(d.cost_nanousd)
            .arg(&month)
            .arg(now.hour)
            .arg(now.ms + LEASE.as_millis() as u64)
            .arg(2 * LEASE.as_millis() as u64)
            .arg(month_ttl_ms(now.month, now))
            .arg(if demand.is_some() {
                "reserve"
            } else {
                "request"
            });
        let caps: Vec<_> = who.scopes().collect();
        for (_, c) in &caps {
            inv.arg(limit(c.rate.rps))
                .arg(limit(c.rate.concurrency))
                .arg(limit(c.rate.tpm))
                .arg(limit(c.budget.monthly_nanousd))
                .arg(limit(c.budget.hourly_nanousd));
        }
        type Reply = (String, usize, u64, Vec<i64>, Vec<i64>);
        let (verdict, scope, retry, requests, tokens): Reply = match self.conn.invoke(&inv).await {
            Ok(v) => v,
            Err(e) => {
                if let (true, Some(d)) = (e.maybe_applied, demand) {
                    // The script may have run with its reply lost (a timeout): the
                    // ticket would hold a slot and a reservation for a request that
                    // is not going ahead here until its lease lapsed. Give it back.
                    self.release_in_background(RemoteHold::registered(scopes, id, now, d.tokens));
                }
                return Err(Failure::Down(e.msg));
            }
        };
        // Each scope's remaining counts, then the tighter of them.
        let headers = caps
            .iter()
            .enumerate()
            .map(|(i, (_, c))| RateHeaders {
                limit_requests: c.rate.rps,
                remaining_requests: requests
                    .get(i)
                    .copied()
                    .and_then(header)
                    .map(|v| v.min(i64::from(u32::MAX)) as u32),
                remaining_tokens: tokens.get(i).copied().and_then(header).map(|v| v as u64),
            })
            .reduce(tighter)
            .unwrap_or_default();
        if verdict == "ok" {
            let hold = demand.map(|d| {
                lock(&self.live)
                    .entry(scopes.clone())
                    .or_default()
                    .insert(id.clone());
                RemoteHold::registered(scopes, id, now, d.tokens)
            });
            return Ok((hold, headers));
        }
        let Some(&(scope, _)) = scope.checked_sub(1).and_then(|i| caps.get(i)) else {
            return Err(Failure::Down(self.conn.failed(format!(
                "admit script answered {verdict:?} for scope {scope}"
            ))));
        };
        let refusal = match verdict.as_str() {
            "monthly" => Refusal::Budget {
                scope,
                which: "monthly",
                retry_after_s: now.secs_to_next_month(),
                headers,
            },
            "hourly" => Refusal::Budget {
                scope,
                which: "hourly",
                retry_after_s: now.secs_to_next_hour(),
                headers,
            },
            which @ ("rps" | "tpm" | "concurrency") => Refusal::Rate {
                scope,
                which: match which {
                    "rps" => "rps",
                    "tpm" => "tpm",
                    _ => "concurrency",
                },
                retry_after_s: retry.max(1),
                headers,
            },
            other => {
                return Err(Failure::Down(
                    self.conn.failed(format!("admit script answered {other:?}")),
                ))
            }
        };
        Err(Failure::Refused(refusal))
    }

    /// Settles now; if Redis cannot be reached the settle is queued and replayed.
    pub(super) async fn settle(self: &Arc<Self>, hold: RemoteHold, actual: Actual, now: Now) {
        self.forget(&hold);
        if let Err(maybe_applied) = self.run_settle(&hold, actual, now).await {
            self.defer(hold, actual, maybe_applied);
        }
    }

    /// For a ticket dropped unsettled: release from a task, or later if there is no
    /// runtime to run one on.
    pub(super) fn release_in_background(self: &Arc<Self>, hold: RemoteHold) {
        self.forget(&hold);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let me = self.clone();
                rt.spawn(async move {
                    let now = Now::at((me.clock)());
                    if let Err(maybe_applied) = me.run_settle(&hold, Actual::default(), now).await {
                        me.defer(hold, Actual::default(), maybe_applied);
                    }
                });
            }
            Err(_) => self.defer(hold, Actual::default(), false),
        }
    }

    fn forget(&self, hold: &RemoteHold) {
        if hold.registered {
            let mut live = lock(&self.live);
            if let Some(ids) = live.get_mut(&hold.scopes) {
                ids.remove(&hold.id);
                if ids.is_empty() {
                    live.remove(&hold.scopes);
                }
            }
        }
    }

    fn defer(self: &Arc<Self>, mut hold: RemoteHold, actual: Actual, maybe_applied: bool) {
        hold.maybe_settled |= maybe_applied && hold.registered;
        {
            let mut q = lock(&self.pending);
            if q.len() >= PENDING_MAX {
                // Oldest first: its lease has long lapsed, only its spend is lost.
                q.pop_front();
            }
            q.push_back((hold, actual));
        }
        // The replaying task may not run yet: a node whose tenants have no limits
        // never makes an admission round trip, which is where it is otherwise started.
        self.ensure_worker();
    }

    /// One settle script; on failure, whether it may have run all the same.
    async fn run_settle(&self, hold: &RemoteHold, actual: Actual, now: Now) -> Result<(), bool> {
        let mut inv = SETTLE.prepare_invoke();
        let month = month_label(hold.month);
        for p in &hold.scopes {
            inv.key(format!("{p}tpm"))
                .key(format!("{p}m:{month}"))
                .key(format!("{p}h:{}", hold.hour))
                .key(format!("{p}lease"))
                .key(format!("{p}tix"));
        }
        inv.arg(now.second)
            .arg(if hold.registered {
                hold.id.as_str()
            } else {
                "-"
            })
            .arg(hold.second)
            .arg(hold.tokens)
            .arg(actual.tokens_in)
            .arg(actual.tokens_out)
            .arg(actual.cost_nanousd)
            .arg(month_ttl_ms(hold.month, now))
            .arg(hour_ttl_ms(hold.hour, now))
            .arg(u8::from(hold.count_request))
            .arg(u8::from(hold.maybe_settled));
        self.conn
            .invoke::<i64>(&inv)
            .await
            .map(|_| ())
            .map_err(|e| e.maybe_applied)
    }

    /// One round trip: the month's figures, its reservations and the hours' spend.
    pub(super) async fn usage(&self, tenant: &Tenant, now: Now) -> Result<UsageView, String> {
        let t = &tenant.id;
        let month = month_label(now.month);
        let mut pipe = redis::pipe();
        for field in ["spent", "tokens_in", "tokens_out", "requests"] {
            pipe.cmd("HGET")
                .arg(key(t, &format!("m:{month}")))
                .arg(field);
        }
        pipe.cmd("HGET")
            .arg(key(t, "tix"))
            .arg(format!("rm:{month}"));
        hours_spent(&mut pipe, t, now);
        let replies: Vec<Option<String>> = self.conn.query(&pipe).await?;
        let mut replies = replies.into_iter();
        let mut next = || number(replies.next().flatten());
        let (spent, tokens_in, tokens_out, requests, reserved) =
            (next(), next(), next(), next(), next());
        let hours = hours_of(replies);
        let (this_hour, hourly_avg) = (hours.this_hour, hours.avg24());
        Ok(super::memory::view(
            tenant,
            Figures {
                month: now.month,
                spent,
                reserved,
                tokens_in,
                tokens_out,
                requests,
                this_hour,
                hourly_avg,
            },
        ))
    }

    /// One round trip: the key's month figures and reservation, and this hour's
    /// spend and reservation.
    pub(super) async fn key_usage(
        &self,
        tenant: &Tenant,
        key: &ApiKey,
        now: Now,
    ) -> Result<KeyUsageView, String> {
        let p = key_prefix(&tenant.id, &key.id);
        let month = month_label(now.month);
        let mut pipe = redis::pipe();
        for field in ["spent", "tokens_in", "tokens_out", "requests"] {
            pipe.cmd("HGET").arg(format!("{p}m:{month}")).arg(field);
        }
        pipe.cmd("HGET")
            .arg(format!("{p}tix"))
            .arg(format!("rm:{month}"));
        pipe.cmd("HGET")
            .arg(format!("{p}h:{}", now.hour))
            .arg("spent");
        pipe.cmd("HGET")
            .arg(format!("{p}tix"))
            .arg(format!("rh:{}", now.hour));
        let replies: Vec<Option<String>> = self.conn.query(&pipe).await?;
        let mut replies = replies.into_iter();
        let mut next = || number(replies.next().flatten());
        let (spent, tokens_in, tokens_out, requests, reserved, hour_spent, hour_reserved) =
            (next(), next(), next(), next(), next(), next(), next());
        Ok(super::memory::key_view(
            tenant,
            key,
            KeyFigures {
                month: now.month,
                spent,
                reserved,
                tokens_in,
                tokens_out,
                requests,
                hour_spent,
                hour_reserved,
            },
        ))
    }

    pub(super) async fn hours(&self, tenant: &Tenant, now: Now) -> Result<SpendHours, String> {
        let mut pipe = redis::pipe();
        hours_spent(&mut pipe, &tenant.id, now);
        let hours: Vec<Option<String>> = self.conn.query(&pipe).await?;
        Ok(hours_of(hours))
    }

    /// The tenant's hours and until when on-call cleared its guard (0: not), in one
    /// round trip.
    pub(super) async fn guard_figures(
        &self,
        tenant: &str,
        now: Now,
    ) -> Result<(SpendHours, u64), String> {
        let mut pipe = redis::pipe();
        hours_spent(&mut pipe, tenant, now);
        pipe.cmd("GET").arg(guard_clear_key(tenant));
        let mut replies: Vec<Option<String>> = self.conn.query(&pipe).await?;
        let cleared_until = number(replies.pop().flatten());
        Ok((hours_of(replies), cleared_until))
    }

    /// Records on-call's clear for every node; it expires when it no longer matters.
    pub(super) async fn clear_guard(
        &self,
        tenant: &str,
        until: u64,
        for_s: u64,
    ) -> Result<(), String> {
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(guard_clear_key(tenant))
            .arg(until)
            .arg("PX")
            .arg(for_s.max(1).saturating_mul(1000));
        let _: Vec<redis::Value> = self.conn.query(&pipe).await?;
        Ok(())
    }

    /// Starts (or restarts, if its runtime went away) the task that renews leases and
    /// replays deferred settles. It holds only a weak reference: it ends with the
    /// store.
    fn ensure_worker(self: &Arc<Self>) {
        let Ok(mut w) = self.worker.try_lock() else {
            return;
        };
        if w.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let me = Arc::downgrade(self);
        *w = Some(rt.spawn(worker(me)));
    }

    async fn renew(&self) {
        let snapshot: Vec<(Vec<String>, Vec<String>)> = lock(&self.live)
            .iter()
            .map(|(scopes, ids)| (scopes.clone(), ids.iter().cloned().collect()))
            .collect();
        let now = (self.clock)();
        for (scopes, ids) in snapshot {
            for chunk in ids.chunks(500) {
                let mut inv = RENEW.prepare_invoke();
                for p in &scopes {
                    inv.key(format!("{p}lease")).key(format!("{p}tix"));
                }
                inv.arg(now + LEASE.as_millis() as u64)
                    .arg(2 * LEASE.as_millis() as u64);
                for id in chunk {
                    inv.arg(id);
                }
                if self.conn.invoke::<i64>(&inv).await.is_err() {
                    return;
                }
            }
        }
    }

    async fn replay(&self) {
        for _ in 0..1000 {
            let Some((mut hold, actual)) = lock(&self.pending).pop_front() else {
                return;
            };
            if let Err(maybe_applied) = self
                .run_settle(&hold, actual, Now::at((self.clock)()))
                .await
            {
                hold.maybe_settled |= maybe_applied && hold.registered;
                lock(&self.pending).push_front((hold, actual));
                return;
            }
        }
    }
}

async fn worker(me: Weak<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let every = RENEW_EVERY.as_secs().max(1);
    let mut n: u64 = 0;
    loop {
        tick.tick().await;
        n += 1;
        let Some(s) = me.upgrade() else { return };
        if n.is_multiple_of(every) {
            s.renew().await;
        }
        s.replay().await;
    }
}
