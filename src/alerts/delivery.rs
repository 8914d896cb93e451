//! Alert delivery: the task that owns the receiving end of [`Alerts::emit`], queues
//! each event durably, and one worker per webhook that POSTs until a 2xx.
//!
//! - At least once: an event is in the spool (fsynced) before any POST, and leaves it
//!   only when its webhook answered 2xx; on start-up the spool's pending events are
//!   delivered first. A crash between the 2xx and the `done` record resends one event.
//! - Once per event id: ids already queued or delivered here are skipped (the spool
//!   remembers them across restarts); on Redis counters a node first claims the id with
//!   `SET alert:<id> <node> NX EX`, and only the winner queues it. Redis unreachable:
//!   the node queues it anyway, since a duplicate beats a lost alert.
//! - Off the request path: emit is a `try_send`, the spool is written on the blocking
//!   pool, and each webhook has its own worker, so a receiver that hangs delays its own
//!   queue only (each try bounded by [`super::http::post_timeout`]).

use super::body::{json_body, render, signature};
use super::http::Poster;
use super::metrics::AlertMetrics;
use super::spool::{Loaded, Pending, Spool, COMPACT_BYTES};
use super::{Alerts, Event, QUEUE_EVENTS};
use crate::config::{AlertsConf, Counters, Webhook};
use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// First retry delay; doubled per failure up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// How long the Redis claim of an id lives: past the longest "once per period" (a
/// calendar month).
const CLAIM_TTL_S: u64 = 40 * 86_400;
const REDIS_TIMEOUT: Duration = Duration::from_millis(500);

/// [`BACKOFF_MAX`], or `LLM_GATEWAY_ALERT_BACKOFF_MAX_MS` (tests of a receiver that is
/// down for a while, which should not wait a minute per retry).
fn backoff_max() -> Duration {
    std::env::var("LLM_GATEWAY_ALERT_BACKOFF_MAX_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .map_or(BACKOFF_MAX, Duration::from_millis)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Pending deliveries, shared by the intake and the workers, for the gauge and for
/// compaction (which must keep exactly these).
struct State {
    spool: Mutex<Spool>,
    pending: Mutex<Vec<Pending>>,
    metrics: AlertMetrics,
}

impl State {
    /// Runs a spool write on the blocking pool (an fsync must not stall a runtime
    /// thread that also serves requests).
    async fn write(
        self: &Arc<Self>,
        f: impl FnOnce(&mut Spool) -> std::io::Result<()> + Send + 'static,
    ) -> std::io::Result<()> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(&mut lock(&me.spool)))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
    }

    fn set_gauge(&self, n: usize) {
        self.metrics.pending.set(n as i64);
    }
}

/// Claims event ids in Redis, so that of several nodes raising the same event only
/// one queues it.
struct Claims {
    client: redis::Client,
    conn: tokio::sync::Mutex<Option<redis::aio::MultiplexedConnection>>,
    node: String,
}

impl Claims {
    /// Whether this node should deliver `id`: it won the claim now, or won it before
    /// (a restart between the claim and the spool write), or Redis could not say.
    async fn won(&self, id: &str) -> bool {
        match tokio::time::timeout(REDIS_TIMEOUT, self.claim(id)).await {
            Ok(Ok(won)) => won,
            Ok(Err(e)) => {
                *self.conn.lock().await = None;
                log::warn!("alerts: Redis claim of {id} failed ({e}); delivering anyway");
                true
            }
            Err(_) => {
                *self.conn.lock().await = None;
                log::warn!("alerts: Redis claim of {id} timed out; delivering anyway");
                true
            }
        }
    }

    async fn claim(&self, id: &str) -> redis::RedisResult<bool> {
        let mut guard = self.conn.lock().await;
        if guard.is_none() {
            *guard = Some(self.client.get_multiplexed_async_connection().await?);
        }
        let Some(conn) = guard.as_mut() else {
            return Ok(true);
        };
        let key = format!("alert:{id}");
        let set: Option<String> = redis::cmd("SET")
            .arg(&key)
            .arg(&self.node)
            .arg("NX")
            .arg("EX")
            .arg(CLAIM_TTL_S)
            .query_async(conn)
            .await?;
        if set.is_some() {
            return Ok(true);
        }
        let holder: Option<String> = redis::cmd("GET").arg(&key).query_async(conn).await?;
        Ok(holder.as_deref() == Some(self.node.as_str()))
    }
}

/// The background service of delivery; built by [`start`].
pub struct DeliveryService {
    rx: Mutex<Option<mpsc::Receiver<Event>>>,
    state: Arc<State>,
    seen: Mutex<HashMap<String, u64>>,
    /// Loaded from the spool, handed to the workers at start.
    backlog: Mutex<Vec<Pending>>,
    webhooks: Vec<Arc<Webhook>>,
    claims: Option<Claims>,
    poster: Poster,
}

/// Opens the spool under `<spool_dir>/alerts` and returns the handle every event
/// source emits to, and the service that delivers. `node` names this node in Redis
/// claims: stable across restarts, distinct between nodes.
pub fn start(
    conf: &AlertsConf,
    spool_dir: &Path,
    counters: &Counters,
    node: String,
    metrics: AlertMetrics,
) -> Result<(Alerts, DeliveryService), String> {
    let dir = spool_dir.join("alerts");
    let now = crate::audit::time::now_ms();
    let (
        spool,
        Loaded {
            pending,
            seen,
            bad_lines,
        },
    ) = Spool::open(&dir, now).map_err(|e| format!("alerts spool {}: {e}", dir.display()))?;
    if bad_lines > 0 {
        log::warn!("alerts: {bad_lines} unreadable line(s) in the spool were skipped");
    }
    metrics.register_webhooks(conf.webhooks.iter().map(|w| w.name.as_str()));
    let (known, gone): (Vec<Pending>, Vec<Pending>) = pending
        .into_iter()
        .partition(|p| conf.webhooks.iter().any(|w| w.name == p.webhook));
    if !gone.is_empty() {
        log::warn!(
            "alerts: {} queued deliveries are for webhooks no longer configured; dropped",
            gone.len()
        );
        metrics.dropped.inc_by(gone.len() as u64);
    }
    if !known.is_empty() {
        log::info!(
            "alerts: {} deliveries pending from before the restart",
            known.len()
        );
    }
    metrics.pending.set(known.len() as i64);
    let claims = match counters {
        Counters::Redis { url, .. } => Some(Claims {
            client: redis::Client::open(url.as_str()).map_err(|e| format!("counters.url: {e}"))?,
            conn: tokio::sync::Mutex::new(None),
            node,
        }),
        Counters::Memory => None,
    };
    let (tx, rx) = mpsc::channel(QUEUE_EVENTS);
    let alerts = Alerts::to(tx).counting_drops(metrics.dropped.clone());
    let service = DeliveryService {
        rx: Mutex::new(Some(rx)),
        state: Arc::new(State {
            spool: Mutex::new(spool),
            pending: Mutex::new(known.clone()),
            metrics,
        }),
        seen: Mutex::new(seen),
        backlog: Mutex::new(known),
        webhooks: conf.webhooks.iter().cloned().map(Arc::new).collect(),
        claims,
        poster: Poster::new()?,
    };
    Ok((alerts, service))
}

#[async_trait]
impl BackgroundService for DeliveryService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(mut rx) = lock(&self.rx).take() else {
            return;
        };
        let mut workers = HashMap::new();
        let backlog = std::mem::take(&mut *lock(&self.backlog));
        for hook in &self.webhooks {
            let (tx, wrx) = mpsc::unbounded_channel();
            for p in backlog.iter().filter(|p| p.webhook == hook.name) {
                let _ = tx.send(p.clone());
            }
            tokio::spawn(worker(
                hook.clone(),
                wrx,
                self.state.clone(),
                self.poster.clone(),
                shutdown.clone(),
            ));
            workers.insert(hook.name.clone(), tx);
        }
        loop {
            let event = tokio::select! {
                e = rx.recv() => e,
                _ = shutdown.changed() => return,
            };
            let Some(event) = event else { return };
            self.intake(event, &workers).await;
        }
    }
}

impl DeliveryService {
    /// One emitted event: skipped if known, else claimed, spooled, handed to workers.
    async fn intake(
        &self,
        event: Event,
        workers: &HashMap<String, mpsc::UnboundedSender<Pending>>,
    ) {
        let id = event.id();
        if lock(&self.seen).contains_key(&id) {
            return;
        }
        let at_ms = event.at_ms;
        if let Some(claims) = &self.claims {
            if !claims.won(&id).await {
                lock(&self.seen).insert(id.clone(), at_ms);
                let _ = self.state.write(move |s| s.seen(&id, at_ms)).await;
                return;
            }
        }
        let body = json_body(&event);
        let hooks: Vec<String> = self.webhooks.iter().map(|w| w.name.clone()).collect();
        lock(&self.seen).insert(id.clone(), at_ms);
        let (b, h) = (body.clone(), hooks.clone());
        if let Err(e) = self.state.write(move |s| s.add(&b, at_ms, &h)).await {
            // Delivered from memory all the same; only a restart before the 2xx loses it.
            log::error!("alerts: cannot write the spool ({e}); {id} is not durable");
            self.state.metrics.dropped.inc();
        }
        let items: Vec<Pending> = hooks
            .into_iter()
            .map(|webhook| Pending {
                id: id.clone(),
                webhook,
                body: body.clone(),
            })
            .collect();
        {
            let mut pending = lock(&self.state.pending);
            pending.extend(items.iter().cloned());
            self.state.set_gauge(pending.len());
        }
        for p in items {
            if let Some(tx) = workers.get(&p.webhook) {
                let _ = tx.send(p);
            }
        }
        self.maybe_compact().await;
    }

    async fn maybe_compact(&self) {
        if lock(&self.state.spool).bytes() <= COMPACT_BYTES {
            return;
        }
        let loaded = Loaded {
            pending: lock(&self.state.pending).clone(),
            seen: lock(&self.seen).clone(),
            bad_lines: 0,
        };
        let now = crate::audit::time::now_ms();
        if let Err(e) = self.state.write(move |s| s.compact(&loaded, now)).await {
            log::warn!("alerts: spool compaction failed: {e}");
        }
    }
}

/// Delivers one webhook's queue in order, each item until a 2xx.
async fn worker(
    hook: Arc<Webhook>,
    mut rx: mpsc::UnboundedReceiver<Pending>,
    state: Arc<State>,
    poster: Poster,
    mut shutdown: ShutdownWatch,
) {
    let cap = backoff_max();
    loop {
        let item = tokio::select! {
            p = rx.recv() => p,
            _ = shutdown.changed() => return,
        };
        let Some(item) = item else { return };
        let bytes = render(hook.format, &item.body);
        let sig = hook.secret.as_deref().map(|s| signature(s, &bytes));
        let mut backoff = BACKOFF_MIN.min(cap);
        let mut tries = 0u32;
        loop {
            tries += 1;
            let why = match poster.post(&hook, bytes.clone(), sig.clone()).await {
                Ok(s) if (200..300).contains(&s) => break,
                Ok(s) => format!("answered {s}"),
                Err(e) => e,
            };
            state
                .metrics
                .failures
                .with_label_values(&[&hook.name])
                .inc();
            if tries == 1 || tries.is_power_of_two() {
                log::warn!(
                    "alerts: webhook {} failed for {} (try {tries}): {why}; retrying in {} ms",
                    hook.name,
                    item.id,
                    backoff.as_millis()
                );
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.changed() => return,
            }
            backoff = (backoff * 2).min(cap);
        }
        let kind = item
            .body
            .get("type")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string();
        state
            .metrics
            .sent
            .with_label_values(&[&hook.name, &kind])
            .inc();
        let (id, name) = (item.id.clone(), hook.name.clone());
        if let Err(e) = state.write(move |s| s.done(&id, &name)).await {
            log::warn!(
                "alerts: cannot record {} as delivered ({e}); it may be sent again after a restart",
                item.id
            );
        }
        let mut pending = lock(&state.pending);
        pending.retain(|p| !(p.id == item.id && p.webhook == hook.name));
        state.set_gauge(pending.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::EventKind;

    fn conf() -> AlertsConf {
        let cfg = crate::config::Config::from_yaml_str(&format!(
            r#"
node: {{ region: r1 }}
listen: {{ http: 127.0.0.1:18080 }}
providers: {{ p1: {{ kind: openai_compatible, base_url: "http://127.0.0.1:9", region: r1 }} }}
models: {{ m1: {{ provider: p1, price: {{ input_per_mtok: 1, output_per_mtok: 2 }} }} }}
tenants: {{ t1: {{ api_keys: [ {{ id: k1, sha256: "{}" }} ], models: [m1] }} }}
alerts: {{ webhooks: [ {{ name: a, url: "http://127.0.0.1:9/" }}, {{ name: b, url: "http://127.0.0.1:9/" }} ] }}
"#,
            crate::config::sha256_hex("sk")
        ))
        .unwrap();
        cfg.alerts.unwrap()
    }

    fn metrics() -> AlertMetrics {
        AlertMetrics::new(&prometheus::Registry::new()).unwrap()
    }

    fn event(period: &str) -> Event {
        Event::new(EventKind::BudgetThreshold, "t1", "", period.into(), 1)
    }

    /// The local half of "once per event id": a second emit of the same event is
    /// skipped, and so it is after a restart (the spool remembers the id), while the
    /// pending deliveries come back for every webhook.
    #[tokio::test]
    async fn the_same_event_is_queued_once_even_after_a_restart() {
        let dir = std::env::temp_dir().join(format!("llmgw-alert-dedupe-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let c = conf();
        let (_, svc) = start(&c, &dir, &Counters::Memory, "n1".into(), metrics()).unwrap();
        let workers = HashMap::new();
        svc.intake(event("2026-12:monthly:0.5"), &workers).await;
        svc.intake(event("2026-12:monthly:0.5"), &workers).await;
        svc.intake(event("2026-12:monthly:0.8"), &workers).await;
        assert_eq!(
            lock(&svc.state.pending).len(),
            4,
            "two events x two webhooks"
        );
        drop(svc);
        let m = metrics();
        let (_, svc) = start(&c, &dir, &Counters::Memory, "n1".into(), m.clone()).unwrap();
        assert_eq!(m.pending.get(), 4);
        assert_eq!(lock(&svc.backlog).len(), 4);
        svc.intake(event("2026-12:monthly:0.5"), &workers).await;
        assert_eq!(lock(&svc.state.pending).len(), 4, "known after the restart");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn queued_deliveries_of_a_removed_webhook_are_dropped_and_counted() {
        let dir = std::env::temp_dir().join(format!("llmgw-alert-gone-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        {
            let (mut s, _) = Spool::open(&dir.join("alerts"), 0).unwrap();
            let body = super::super::body::json_body(&event("p"));
            s.add(&body, 1, &["a".to_string(), "old".to_string()])
                .unwrap();
        }
        let m = metrics();
        let (_, svc) = start(&conf(), &dir, &Counters::Memory, "n1".into(), m.clone()).unwrap();
        assert_eq!(m.dropped.get(), 1);
        assert_eq!(m.pending.get(), 1);
        assert_eq!(lock(&svc.backlog)[0].webhook, "a");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
