//! The admin listener: health, readiness, metrics and the operator API.
//!
//! Kept off the client listener so that it can be bound to loopback or a management
//! network only. `/healthz`, `/readyz` and `/metrics` are open (load balancers and
//! Prometheus scrape them); every `/admin/*` path needs the admin bearer token.

mod tenants;

use crate::config::{Counters, OnError};
use crate::proxy::Gateway;
use crate::reload::Reloader;
use async_trait::async_trait;
use http::Response;
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use serde_json::json;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use subtle::ConstantTimeEq;

/// A client listener bound at start (a reload cannot move it), probed by `/readyz`.
pub struct Listener {
    pub addr: SocketAddr,
    /// Set for the `listen.https` listener: the probe completes a TLS handshake.
    pub tls: Option<Arc<crate::tls::CertStore>>,
}

pub struct Admin {
    gateway: Gateway,
    reloader: Arc<Reloader>,
    listeners: Vec<Listener>,
    /// The counter store the process started with (a reload cannot switch it).
    counters: Counters,
    /// One `/metrics` refresh-and-render at a time.
    scrape: tokio::sync::Mutex<()>,
    /// The tenant and key store, when configured.
    store: Option<Arc<crate::store::Store>>,
}

/// Admin request bodies are small JSON documents.
const MAX_ADMIN_BODY: usize = 1 << 20;

impl Admin {
    pub fn new(
        gateway: Gateway,
        reloader: Arc<Reloader>,
        listeners: Vec<Listener>,
        store: Option<Arc<crate::store::Store>>,
    ) -> Self {
        let counters = gateway.config().counters.clone();
        Admin {
            gateway,
            reloader,
            listeners,
            counters,
            scrape: tokio::sync::Mutex::new(()),
            store,
        }
    }
}

/// The request body as JSON (`null` when empty), or the 400 that says why not.
async fn json_body(session: &mut ServerSession) -> Result<serde_json::Value, Response<Vec<u8>>> {
    let mut body = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_ADMIN_BODY {
                    return Err(error(413, "admin request bodies are limited to 1 MiB"));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(e) => return Err(error(400, &format!("cannot read the request body: {e}"))),
        }
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(serde_json::Value::Null);
    }
    serde_json::from_slice(&body).map_err(|e| {
        json_reply(
            400,
            json!({"error": {"message": format!("the body is not valid JSON: {e}"), "code": "invalid_request", "status": 400}}),
        )
    })
}

fn reply(status: u16, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    let mut r = Response::new(body);
    *r.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    let len = r.body().len();
    r.headers_mut()
        .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    r
}

fn json_reply(status: u16, v: serde_json::Value) -> Response<Vec<u8>> {
    reply(status, "application/json", v.to_string().into_bytes())
}

fn error(status: u16, message: &str) -> Response<Vec<u8>> {
    json_reply(
        status,
        json!({"error": {"message": message, "status": status}}),
    )
}

impl Admin {
    fn authorized(&self, session: &ServerSession) -> bool {
        let cfg = self.gateway.config();
        let Some(token) = cfg.admin.token.as_deref() else {
            return false;
        };
        let presented = crate::auth::presented_key(session.req_header()).unwrap_or("");
        presented.len() == token.len() && bool::from(presented.as_bytes().ct_eq(token.as_bytes()))
    }

    /// `?since=RFC3339&limit=N` over the tenant's audit rows, oldest first: from
    /// ClickHouse when configured (each request once), else from the spool.
    async fn audit(&self, tenant: &str, query: &str) -> Response<Vec<u8>> {
        if self.gateway.config().tenant(tenant).is_none() {
            return error(404, "no such tenant");
        }
        let mut since_ms = crate::audit::time::now_ms().saturating_sub(3_600_000);
        let mut limit = 100usize;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = decode_time(v);
            match k {
                "since" => match crate::audit::time::parse_rfc3339(&v) {
                    Some(ms) => since_ms = ms,
                    None => return error(400, "since must be an RFC 3339 timestamp"),
                },
                "limit" => match v.parse::<usize>() {
                    Ok(n) if (1..=10_000).contains(&n) => limit = n,
                    _ => return error(400, "limit must be between 1 and 10000"),
                },
                _ => {}
            }
        }
        match self.gateway.audit.query(tenant, since_ms, limit).await {
            Ok(a) => {
                let mut body = json!({"tenant": tenant, "source": a.source, "rows": a.rows});
                if let Some(note) = a.note {
                    body["note"] = note.into();
                }
                json_reply(200, body)
            }
            Err(e) => error(500, &format!("reading the audit spool: {e}")),
        }
    }

    /// Gauges read at scrape time: circuits, budgets, spend velocity, audit queue.
    /// Called with `scrape` held, so that no render sees the gauges between their reset
    /// (which drops tenants and providers a reload removed) and their new values.
    async fn refresh_gauges(&self) {
        let m = &self.gateway.metrics;
        let cfg = self.gateway.config();
        m.circuit_state.reset();
        m.budget_used_ppm.reset();
        m.spend_this_hour.reset();
        m.spend_velocity_pct.reset();
        m.spend_guard_engaged.reset();
        let views: std::collections::HashMap<_, _> =
            self.gateway.breakers.views().into_iter().collect();
        for p in &cfg.providers {
            let state = match views.get(&p.name).map(|v| v.state) {
                Some("open") => 2,
                Some("half_open") => 1,
                _ => 0,
            };
            m.circuit_state.with_label_values(&[&p.name]).set(state);
        }
        self.deployment_gauges(&cfg).await;
        for (i, t) in cfg.tenants.iter().enumerate() {
            let limits = &self.gateway.limits;
            if i >= cfg.file_tenants && !limits.seen_here(t) {
                continue;
            }
            if let Ok(u) = limits.usage(t).await {
                if let Some(b) = u.budget_nanousd.filter(|b| *b > 0) {
                    let used =
                        (u.spent_nanousd + u.reserved_nanousd) as u128 * 1_000_000 / b as u128;
                    m.budget_used_ppm
                        .with_label_values(&[&t.id])
                        .set(used.min(i64::MAX as u128) as i64);
                }
            }
            if t.guard.is_some() {
                m.spend_guard_engaged
                    .with_label_values(&[&t.id])
                    .set(i64::from(limits.guard_engaged(t)));
            }
            let (this_hour, avg) = limits.velocity(t).await.unwrap_or_default();
            m.spend_this_hour
                .with_label_values(&[&t.id])
                .set(this_hour.min(i64::MAX as u64) as i64);
            let velocity = if avg == 0 {
                0
            } else {
                (this_hour as u128 * 100 / avg as u128).min(i64::MAX as u128) as i64
            };
            m.spend_velocity_pct
                .with_label_values(&[&t.id])
                .set(velocity);
        }
        m.limits_store_errors
            .set(self.gateway.limits.store_errors().min(i64::MAX as u64) as i64);
        self.gateway.audit.refresh_gauges().await;
        m.cache_stats(self.gateway.cache.stats());
    }

    /// Ready when a config is loaded, the counter store answers (or is allowed to fail
    /// open) and every client listener accepts connections; the body says which is not.
    async fn readiness(&self) -> (bool, String) {
        let cfg = self.gateway.config();
        let mut ready = true;
        let mut body = format!("config: ok ({} tenants)\n", cfg.tenants.len());
        match (&self.counters, cfg.tenants.first()) {
            (Counters::Memory, _) => body.push_str("counters: ok (memory)\n"),
            (Counters::Redis { .. }, None) => {
                body.push_str("counters: redis, no tenant to check\n")
            }
            (Counters::Redis { on_error, .. }, Some(t)) => match self.gateway.limits.usage(t).await
            {
                Ok(_) => body.push_str("counters: ok (redis)\n"),
                Err(e) if *on_error == OnError::FailOpen => body.push_str(&format!(
                    "counters: redis unreachable, serving uncounted (fail_open): {e}\n"
                )),
                Err(e) => {
                    ready = false;
                    body.push_str(&format!("counters: redis unreachable (fail_closed): {e}\n"));
                }
            },
        }
        if let Some(store) = &self.store {
            let h = store.health();
            let since = |ms: u64| crate::audit::time::rfc3339(ms);
            match (h.loaded, h.stale_since_ms) {
                (false, _) => {
                    ready = false;
                    body.push_str(&format!(
                        "store: {} unreachable and no usable snapshot: store tenants not loaded ({})\n",
                        store.backend(),
                        h.last_error.unwrap_or_default()
                    ));
                }
                (true, Some(ms)) => body.push_str(&format!(
                    "store: stale since {} ({} unreachable: {}); serving version {} from {}\n",
                    since(ms),
                    store.backend(),
                    h.last_error.unwrap_or_default(),
                    store.version(),
                    h.source
                )),
                (true, None) => body.push_str(&format!(
                    "store: ok ({}, version {}, {} tenants)\n",
                    store.backend(),
                    store.version(),
                    store.tenant_count()
                )),
            }
        }
        for l in &self.listeners {
            let probe = loopback_of(l.addr);
            let result = tokio::time::timeout(Duration::from_secs(1), async {
                match &l.tls {
                    Some(store) => crate::tls::probe(store, probe).await,
                    None => tokio::net::TcpStream::connect(probe)
                        .await
                        .map(drop)
                        .map_err(|e| e.to_string()),
                }
            })
            .await
            .unwrap_or_else(|_| Err("timed out".into()));
            ready &= result.is_ok();
            match result {
                Ok(()) => body.push_str(&format!("listener {}: ok\n", l.addr)),
                Err(e) => body.push_str(&format!("listener {}: {e}\n", l.addr)),
            }
        }
        body.insert_str(0, if ready { "ready\n" } else { "not ready\n" });
        (ready, body)
    }

    /// Every model's deployments with this minute's use of their quota (one counter
    /// store round trip for all of them).
    async fn deployment_uses<'c>(
        &self,
        cfg: &'c crate::config::Config,
    ) -> Vec<(
        &'c crate::config::Model,
        &'c crate::config::Deployment,
        crate::limits::MinuteUse,
    )> {
        let deps: Vec<_> = cfg
            .models
            .iter()
            .flat_map(|m| m.deployments.iter().map(move |d| (&**m, &**d)))
            .collect();
        let only: Vec<_> = deps.iter().map(|(_, d)| *d).collect();
        let uses = self.gateway.limits.quota_use(&only).await;
        deps.into_iter()
            .zip(uses)
            .map(|((m, d), u)| (m, d, u))
            .collect()
    }

    async fn deployment_gauges(&self, cfg: &crate::config::Config) {
        let m = &self.gateway.metrics;
        for g in [
            &m.deployment_in_flight,
            &m.deployment_cooldown_ms,
            &m.deployment_requests_minute,
            &m.deployment_rpm,
            &m.deployment_ttft_ms,
        ] {
            g.reset();
        }
        let now = crate::audit::time::now_ms();
        for (md, d, u) in self.deployment_uses(cfg).await {
            let labels = [md.name.as_str(), d.key.as_str()];
            let live = self.gateway.pool.live(d);
            m.deployment_in_flight
                .with_label_values(&labels)
                .set(i64::from(live.in_flight()));
            let cd = live.cooling_until(now).map_or(0, |t| t - now);
            m.deployment_cooldown_ms
                .with_label_values(&labels)
                .set(cd.min(i64::MAX as u64) as i64);
            m.deployment_requests_minute
                .with_label_values(&labels)
                .set(u.requests.min(i64::MAX as u64) as i64);
            m.deployment_rpm
                .with_label_values(&labels)
                .set(d.rpm.map_or(0, |r| r.min(i64::MAX as u64) as i64));
            if let Some(t) = live.ewma_ttft() {
                m.deployment_ttft_ms
                    .with_label_values(&labels)
                    .set(t.as_millis().min(i64::MAX as u128) as i64);
            }
        }
    }

    /// Providers with their circuits, and every model's deployments with what decides
    /// whether they are tried now: circuit, cooldown, this minute's use against quota.
    async fn providers(&self) -> Response<Vec<u8>> {
        let cfg = self.gateway.config();
        let views: std::collections::HashMap<_, _> =
            self.gateway.breakers.views().into_iter().collect();
        let list: Vec<_> = cfg
            .providers
            .iter()
            .map(|p| {
                let v = views.get(&p.name);
                json!({
                    "name": p.name,
                    "kind": p.kind.as_str(),
                    "region": p.region,
                    "base_url": p.base_url.original,
                    "circuit": v.map_or("closed", |v| v.state),
                    "error_rate": v.map_or(0.0, |v| v.error_rate),
                    "calls_in_window": v.map_or(0, |v| v.calls_in_window),
                    "consecutive_failures": v.map_or(0, |v| v.consecutive_failures),
                    "retry_after_s": v.map_or(0, |v| v.retry_after_s),
                })
            })
            .collect();
        let now = crate::audit::time::now_ms();
        let deployments: Vec<_> = self
            .deployment_uses(&cfg)
            .await
            .into_iter()
            .map(|(m, d, u)| {
                let live = self.gateway.pool.live(d);
                let v = views.get(&d.provider.name);
                let until = live.cooling_until(now);
                json!({
                    "model": m.name,
                    "balance": m.balance.as_str(),
                    "key": d.key,
                    "provider": d.provider.name,
                    "upstream_model": d.upstream_model,
                    "region": d.provider.region,
                    "weight": d.weight,
                    "circuit": v.map_or("closed", |v| v.state),
                    "cooldown_until": until.map(crate::audit::time::rfc3339),
                    "cooldown_remaining_ms": until.map_or(0, |t| t - now),
                    "rpm": d.rpm,
                    "tpm": d.tpm,
                    "requests_this_minute": u.requests,
                    "tokens_this_minute": u.tokens,
                    "in_flight": live.in_flight(),
                    "ewma_ttft_ms": live.ewma_ttft().map(|t| t.as_secs_f64() * 1000.0),
                })
            })
            .collect();
        json_reply(
            200,
            json!({ "providers": list, "deployments": deployments }),
        )
    }
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        let method = session.req_header().method.clone();
        match path.as_str() {
            "/healthz" => return reply(200, "text/plain", b"ok\n".to_vec()),
            "/readyz" => {
                let (ready, body) = self.readiness().await;
                return reply(
                    if ready { 200 } else { 503 },
                    "text/plain",
                    body.into_bytes(),
                );
            }
            "/metrics" => {
                let _one = self.scrape.lock().await;
                self.refresh_gauges().await;
                return reply(
                    200,
                    "text/plain; version=0.0.4",
                    self.gateway.metrics.render(),
                );
            }
            _ => {}
        }
        if !path.starts_with("/admin/") {
            return error(404, "not found");
        }
        if !self.authorized(session) {
            return error(401, "admin token required");
        }
        if let Some(rest) = path.strip_prefix("/admin/v1/") {
            let parts: Vec<&str> = rest.split('/').collect();
            if matches!(parts.first(), Some(&"tenants") | Some(&"changes")) {
                let body = if matches!(method.as_str(), "POST" | "PATCH" | "PUT") {
                    match json_body(session).await {
                        Ok(b) => b,
                        Err(r) => return r,
                    }
                } else {
                    serde_json::Value::Null
                };
                let actor = session
                    .req_header()
                    .headers
                    .get("x-admin-actor")
                    .and_then(|v| v.to_str().ok())
                    .filter(|v| v.len() <= 128 && v.bytes().all(|b| (0x20..0x7f).contains(&b)))
                    .map(str::to_string);
                let query = session.req_header().uri.query().unwrap_or("").to_string();
                let call = tenants::Call {
                    method: method.as_str(),
                    parts: parts.clone(),
                    query: &query,
                    body,
                    actor,
                };
                if let Some(r) = self.tenant_api(call).await {
                    return r;
                }
            }
        }
        match (method.as_str(), path.as_str()) {
            ("GET", "/admin/v1/providers") => self.providers().await,
            ("GET", p) if p.starts_with("/admin/v1/tenants/") && p.ends_with("/audit") => {
                let id = &p["/admin/v1/tenants/".len()..p.len() - "/audit".len()];
                self.audit(id, session.req_header().uri.query().unwrap_or(""))
                    .await
            }
            ("GET", p) if p.starts_with("/admin/v1/tenants/") && p.ends_with("/usage") => {
                let id = &p["/admin/v1/tenants/".len()..p.len() - "/usage".len()];
                match self.gateway.config().tenant(id) {
                    Some(t) => match self.gateway.limits.usage(t).await {
                        Ok(view) => {
                            let mut v = serde_json::to_value(view).unwrap_or_default();
                            if let Some(g) = self.gateway.limits.guard_view(t) {
                                v["guard"] = serde_json::to_value(g).unwrap_or_default();
                            }
                            json_reply(200, v)
                        }
                        Err(e) => error(503, &format!("counter store unavailable: {e}")),
                    },
                    None => error(404, "no such tenant"),
                }
            }
            ("POST", p) if p.starts_with("/admin/v1/tenants/") && p.ends_with("/cache/purge") => {
                let id = &p["/admin/v1/tenants/".len()..p.len() - "/cache/purge".len()];
                if self.gateway.config().tenant(id).is_none() {
                    return error(404, "no such tenant");
                }
                let purged = self.gateway.cache.purge(id);
                log::info!("cache purged for tenant {id}: {purged} entries");
                json_reply(200, json!({"tenant": id, "purged": purged}))
            }
            ("POST", "/admin/v1/reload") => {
                let reloader = self.reloader.clone();
                // File reads and certificate parsing stay off the async workers.
                match tokio::task::spawn_blocking(move || reloader.reload()).await {
                    Ok(Ok(r)) => json_reply(
                        200,
                        json!({"reloaded": true, "tenants": r.tenants, "needs_restart": r.needs_restart}),
                    ),
                    Ok(Err(e)) => json_reply(400, json!({"reloaded": false, "error": e})),
                    Err(e) => error(500, &format!("reload task failed: {e}")),
                }
            }
            _ => error(404, "not found"),
        }
    }
}

/// A query value holding an RFC 3339 time, with the two characters clients
/// percent-encode in one (`:` and `+`) decoded.
fn decode_time(v: &str) -> String {
    v.replace("%3A", ":")
        .replace("%3a", ":")
        .replace("%2B", "+")
        .replace("%2b", "+")
}

/// Where to connect to reach a listener bound to `addr` from this host.
fn loopback_of(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(a) if a.ip().is_unspecified() => {
            SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, a.port()))
        }
        SocketAddr::V6(a) if a.ip().is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, a.port()))
        }
        other => other,
    }
}
