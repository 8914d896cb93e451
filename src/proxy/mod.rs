//! The Pingora `ProxyHttp` service.
//!
//! Every data-plane request runs twice through this trait: once as the *parent*, which
//! authenticates, reads and parses the whole body, applies policy and then pipes a
//! *subrequest* to the client; and once as that subrequest, which does the real
//! proxying (attempts, failover, body filters). The split exists because Pingora 0.9
//! replays a body read in `request_filter` only while it fits a 64 KiB buffer: the
//! subrequest has no body of its own and gets the rewritten one injected on every
//! attempt (see `upstream.rs`). The subrequest API is alpha upstream, so everything
//! that touches it lives in this module.

mod attempts;
mod cache;
pub mod dns;
pub mod head_deadline;
mod parent;
mod respond;
mod upstream;

use crate::audit::{AuditLog, AuditRow};
use crate::breaker::{Breakers, RetryBudget};
use crate::cache::{Answer, Lookup, ResponseCache};
use crate::config::{ApiKey, Config, Model, Tenant};
use crate::error::{ApiFormat, GatewayError};
use crate::limits::{Limits, RateHeaders, Ticket};
use crate::metrics::Metrics;
use crate::providers::{ClientRequest, Completion, ResponseTranslator, UpstreamRequest};
use crate::routing::Chain;
use async_trait::async_trait;
use bytes::Bytes;
use pingora::prelude::*;
use pingora_cache::{CacheKey, CacheMeta, ForcedFreshness, HitHandler, RespCacheable};
use pingora_core::upstreams::peer::HttpPeer;
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// The proxy service; cheap to clone, so the admin listener shares the same state.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Shared>,
}

/// State shared by every request of one gateway process.
pub struct Shared {
    config: RwLock<Arc<Config>>,
    resolver: dns::Resolver,
    pub audit: AuditLog,
    pub breakers: Breakers,
    retry_budget: RetryBudget,
    pub limits: Limits,
    pub metrics: Metrics,
    pub cache: ResponseCache,
}

impl std::ops::Deref for Gateway {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.inner
    }
}

impl Gateway {
    pub fn new(config: Arc<Config>, audit: AuditLog, metrics: Metrics) -> Self {
        Gateway {
            inner: Arc::new(Shared {
                limits: Limits::new(&config.counters),
                cache: ResponseCache::new(config.cache.max_bytes),
                config: RwLock::new(config),
                resolver: dns::Resolver::default(),
                audit,
                breakers: Breakers::default(),
                retry_budget: RetryBudget::default(),
                metrics,
            }),
        }
    }

    /// The configuration in force; a reload swaps it without disturbing requests in flight.
    pub fn config(&self) -> Arc<Config> {
        match self.config.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn set_config(&self, cfg: Arc<Config>) {
        self.cache.store.set_max_bytes(cfg.cache.max_bytes);
        match self.config.write() {
            Ok(mut c) => *c = cfg,
            Err(poisoned) => *poisoned.into_inner() = cfg,
        }
    }
}

/// Which endpoint a request called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Messages,
    Models,
    Other,
}

impl Endpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat_completions",
            Endpoint::Messages => "messages",
            Endpoint::Models => "models",
            Endpoint::Other => "other",
        }
    }

    pub fn format(self) -> ApiFormat {
        match self {
            Endpoint::Messages => ApiFormat::Anthropic,
            _ => ApiFormat::OpenAi,
        }
    }
}

/// A duration in milliseconds from the environment variable `name`, or `default`
/// when it is unset, unparsable or zero.
fn env_ms(name: &str, default: u64) -> Duration {
    let ms = std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&ms: &u64| ms > 0)
        .unwrap_or(default);
    Duration::from_millis(ms)
}

/// Everything decided in the parent that every attempt of the subrequest needs.
pub struct Plan {
    pub request_id: String,
    pub tenant: Arc<Tenant>,
    /// The client's request without its body: what every phase reads (`stream`,
    /// `format`, ...).
    pub req: ClientRequest,
    /// The whole request, body included, for building each attempt's upstream request;
    /// released once the answer has started to reach the client (no attempt can follow
    /// then), so a long stream does not hold its prompt for its whole life.
    full: Mutex<Option<Arc<ClientRequest>>>,
    pub chain: Chain,
    pub started: Instant,
    /// Size of the client's body, for estimating input tokens when none are reported.
    pub prompt_bytes: usize,
    /// The tenant's limits as of admission, for the `x-ratelimit-*` headers.
    pub rate_headers: RateHeaders,
    /// The cache key and mode, or `None` when the request bypasses the cache.
    pub cache: Option<Lookup>,
    /// Written by the subrequest as it goes, read by the parent when the call ends
    /// (also when the client left and the subrequest was cancelled).
    pub outcome: Mutex<Outcome>,
}

/// What happened upstream, for accounting and the audit row.
#[derive(Debug, Default)]
pub struct Outcome {
    pub attempts: u8,
    /// The model of the attempt that produced the response (or the last one tried).
    pub model: Option<Arc<Model>>,
    pub upstream_status: u16,
    pub completion: Completion,
    pub error: Option<GatewayError>,
    /// An error event already went into the stream (no second one, no failover).
    pub error_event_sent: bool,
    /// The `code` of a provider's own error answer as the client got it.
    pub client_error_code: Option<String>,
    /// The answer came from the cache (completion and model are the original call's).
    pub cache_hit: bool,
}

impl Plan {
    /// `req` without its body (for [`Plan::req`]) and whole (for `Plan::full`).
    fn split(mut req: ClientRequest) -> (ClientRequest, Mutex<Option<Arc<ClientRequest>>>) {
        let body = std::mem::take(&mut req.body);
        let meta = req.clone();
        req.body = body;
        (meta, Mutex::new(Some(Arc::new(req))))
    }

    /// The whole request, until [`Plan::release_request`].
    fn full_request(&self) -> Option<Arc<ClientRequest>> {
        match self.full.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Drops the request's body: the answer is reaching the client, nothing will be
    /// sent upstream again.
    fn release_request(&self) {
        let taken = match self.full.lock() {
            Ok(mut g) => g.take(),
            Err(p) => p.into_inner().take(),
        };
        drop(taken);
    }

    pub fn outcome(&self) -> std::sync::MutexGuard<'_, Outcome> {
        match self.outcome.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

/// Per-request context; one struct serves both roles to keep the trait impl simple.
#[derive(Default)]
pub struct Ctx {
    /// Set in the subrequest (from the parent) and in the parent once policy passed.
    plan: Option<Arc<Plan>>,
    // --- parent ---
    started: Option<Instant>,
    started_ms: u64,
    client_gone: bool,
    model_requested: String,
    /// The tenant's end user for the audit row: from the header before the body is
    /// read (so refusals before it carry it too), else from the body once parsed.
    end_user: String,
    stream: bool,
    /// The admitted request's hold on its tenant's counters, settled at the end.
    ticket: Option<Ticket>,
    rate_headers: Option<RateHeaders>,
    request_id: String,
    endpoint: Option<Endpoint>,
    tenant: Option<Arc<Tenant>>,
    /// The key that authenticated the request: its id goes into the audit row, its
    /// models and limits narrow the tenant's.
    api_key: Option<Arc<ApiKey>>,
    status: u16,
    error: Option<GatewayError>,
    first_byte: Option<Instant>,
    /// The audit row, once written ahead of the response's last bytes.
    sealed: Option<Box<AuditRow>>,
    /// Counts the client request until its context is dropped, after `logging`
    /// wrote its audit row: a stopping gateway waits for it (`crate::shutdown`).
    _in_flight: Option<crate::inflight::InFlight>,
    // --- subrequest ---
    /// Index in the chain of the model this subrequest tries.
    idx: usize,
    /// The current attempt: its model, request and translator.
    attempt: Option<Attempt>,
    /// Retry the same model once on a stale pooled connection, without moving on.
    retry_same: bool,
    /// The response header went to the client: no failover from here on.
    header_sent: bool,
    /// This subrequest is served from the cache: the stored answer's origin.
    hit: Option<Arc<Answer>>,
    /// This subrequest's answer is being stored: its origin and, at the end, usage.
    fill: Option<Arc<Answer>>,
}

struct Attempt {
    model: Arc<Model>,
    upstream: UpstreamRequest,
    translator: Option<ResponseTranslator>,
    /// A provider's own error answer (4xx other than 429), collected to be re-rendered
    /// in the client's format: status and body so far.
    error_body: Option<(u16, Vec<u8>)>,
    body_sent: bool,
}

impl Ctx {
    fn is_subrequest(&self) -> bool {
        self.plan.is_some() && self.endpoint.is_none()
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx::default()
    }

    fn allow_spawning_subrequest(&self, session: &Session, _ctx: &Ctx) -> bool {
        session.subrequest_ctx.is_none()
    }

    async fn early_request_filter(&self, _session: &mut Session, _ctx: &mut Ctx) -> Result<()> {
        head_deadline::head_read();
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        if let Some((plan, idx)) = upstream::take_plan(session) {
            ctx.plan = Some(plan);
            ctx.idx = idx;
            return Ok(false);
        }
        ctx._in_flight = Some(crate::inflight::InFlight::enter());
        self.handle_parent(session, ctx).await;
        Ok(true)
    }

    fn request_cache_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<()> {
        self.enable_cache(session, ctx);
        Ok(())
    }

    fn cache_key_callback(&self, _session: &Session, ctx: &mut Ctx) -> Result<CacheKey> {
        cache::key(ctx)
    }

    async fn cache_hit_filter(
        &self,
        _session: &mut Session,
        meta: &CacheMeta,
        _hit_handler: &mut HitHandler,
        is_fresh: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<ForcedFreshness>> {
        Ok(cache::on_hit(meta, is_fresh, ctx))
    }

    fn response_cache_filter(
        &self,
        _session: &Session,
        resp: &ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<RespCacheable> {
        Ok(cache::response_cacheable(resp, ctx))
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        _body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<std::time::Duration>> {
        if end_of_stream && ctx.hit.is_some() {
            cache::on_hit_body_end(ctx);
        }
        Ok(None)
    }

    async fn upstream_peer(&self, session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        self.choose_peer(session, ctx).await
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        upstream::rewrite_request_header(session, upstream_request, ctx)
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        upstream::inject_body(body, end_of_stream, ctx);
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        upstream::on_response_header(upstream_response, ctx)
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if ctx.is_subrequest() {
            upstream::decorate_response(upstream_response, ctx)?;
        }
        Ok(())
    }

    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<std::time::Duration>> {
        upstream::translate_body(body, end_of_stream, ctx);
        Ok(None)
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // The parent moves on to the next candidate; a subrequest tries one model.
        let _ = ctx;
        e.set_retry(false);
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        _session: &mut Session,
        e: Box<Error>,
        ctx: &mut Ctx,
        client_reused: bool,
    ) -> Box<Error> {
        upstream::decide_retry(peer, e, ctx, client_reused)
    }

    fn suppress_proxy_warn_log(
        &self,
        _session: &Session,
        _ctx: &Ctx,
        _error: &Error,
        _log_context: pingora_proxy::ProxyWarnLogContext,
    ) -> bool {
        // Failed attempts are reported once, in the response and the audit row.
        true
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &Ctx, _error: &Error) -> bool {
        true
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        upstream::fail(session, e, ctx).await
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Ctx) {
        if ctx.is_subrequest() {
            upstream::record_end(ctx);
            return;
        }
        self.finish_parent(session, ctx).await;
    }
}
