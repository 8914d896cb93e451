//! The Pingora `ProxyHttp` service: one pipeline per request.
//!
//! `request_filter` serves the whole request (`front.rs`): it authenticates, reads and
//! parses the body once, applies policy and admission, then runs the chain
//! (`chain.rs`). Each attempt (`attempt.rs`) drives `pingora_core`'s HTTP connector and
//! its connection pools directly: the rewritten header and body go to the provider,
//! the answer is held back until its first content byte, then relayed. So a body of any
//! size survives failover (Pingora's own upstream phases replay a body only while it
//! fits their 64 KiB retry buffer), HTTP/2 providers get the body too, and no second
//! pipeline (a subrequest) runs per request. Attempts return values (`report.rs`) from
//! which the answer, the circuits, the settle and the audit row are derived.

mod attempt;
mod cache;
mod chain;
pub mod client;
pub mod dns;
mod front;
pub mod head_deadline;
pub mod refresh;
pub mod report;
mod respond;
#[cfg(test)]
mod tests;
mod upstream;

use crate::audit::{AuditLog, AuditRow};
use crate::breaker::{Breakers, RetryBudget};
use crate::cache::{Lookup, ResponseCache};
use crate::config::{ApiKey, Config, Tenant};
use crate::error::{ApiFormat, ErrorKind, GatewayError};
use crate::limits::{Limits, RateHeaders, Ticket};
use crate::metrics::Metrics;
use crate::providers::ClientRequest;
use crate::routing::pool::Pool;
use crate::routing::Chain;
use async_trait::async_trait;
use pingora::prelude::*;
use pingora_core::connectors::http::Connector;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_proxy::{FailToProxy, ProxyHttp, Session};
use report::ChainOutcome;
use std::sync::{Arc, RwLock};
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
    /// Every deployment's live state: in flight, time to first token, cooldown.
    pub pool: Pool,
    retry_budget: RetryBudget,
    pub limits: Limits,
    pub metrics: Metrics,
    pub cache: ResponseCache,
    /// Pingora's HTTP/1.1 and HTTP/2 connector with its connection pools: every
    /// attempt to every provider goes through it.
    connector: Connector,
    /// Where events for on-call go (`alerts:`); the default drops them.
    pub alerts: crate::alerts::Alerts,
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
            inner: Arc::new(Shared::new(config, audit, metrics)),
        }
    }
}

impl Gateway {
    /// [`Gateway::new`] whose events go to `alerts` (the delivery side of `alerts:`).
    pub fn with_alerts(
        config: Arc<Config>,
        audit: AuditLog,
        metrics: Metrics,
        alerts: crate::alerts::Alerts,
    ) -> Self {
        let mut shared = Shared::new(config, audit, metrics);
        shared.alerts = alerts;
        Gateway {
            inner: Arc::new(shared),
        }
    }
}

impl Shared {
    pub fn new(config: Arc<Config>, audit: AuditLog, metrics: Metrics) -> Self {
        Shared {
            limits: Limits::new(&config.counters),
            cache: ResponseCache::new(config.cache.max_bytes),
            config: RwLock::new(config),
            resolver: dns::Resolver::default(),
            audit,
            breakers: Breakers::default(),
            pool: Pool::default(),
            retry_budget: RetryBudget::default(),
            metrics,
            connector: Connector::new(None),
            alerts: crate::alerts::Alerts::default(),
        }
    }

    /// The configuration in force; a reload swaps it without disturbing requests in flight.
    pub fn config(&self) -> Arc<Config> {
        match self.config.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// A tenant's spend guard engaged or stood down: logged once, and sent to on-call.
    pub fn guard_changed(&self, change: &crate::limits::GuardChange) {
        use crate::limits::{usd, GuardChange};
        match change {
            GuardChange::Engaged {
                tenant,
                action,
                figures: f,
            } => log::warn!(
                "spend guard engaged for tenant {tenant} ({}): {} USD this hour, above the \
                 threshold of {} USD (hourly baseline {} USD)",
                action.as_str(),
                usd(f.spend_this_hour),
                usd(f.threshold),
                usd(f.baseline)
            ),
            GuardChange::Cleared { tenant, reason, .. } => {
                log::warn!("spend guard cleared for tenant {tenant} ({reason})")
            }
        }
        self.alerts.emit(crate::alerts::guard_event(change));
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

/// Everything decided before the first attempt that every attempt reads.
pub struct Plan {
    pub request_id: String,
    /// The client's request without its body: what every phase reads (`stream`,
    /// `format`, ...). The body travels separately and is dropped once answered.
    pub req: ClientRequest,
    /// The client's headers every attempt forwards.
    pub forward: Vec<(http::HeaderName, http::HeaderValue)>,
    pub chain: Chain,
    /// Size of the client's body, for estimating input tokens when none are reported.
    pub prompt_bytes: usize,
    /// The tenant's limits as of admission, for the `x-ratelimit-*` headers.
    pub rate_headers: RateHeaders,
    /// The cache key and mode, or `None` when the request bypasses the cache.
    pub cache: Option<Lookup>,
}

/// One client request, from its head to its audit row.
#[derive(Default)]
pub struct Ctx {
    started: Option<Instant>,
    started_ms: u64,
    request_id: String,
    endpoint: Option<Endpoint>,
    /// The tenant's end user for the audit row: from the header before the body is
    /// read (so refusals before it carry it too), else from the body once parsed.
    end_user: String,
    model_requested: String,
    stream: bool,
    tenant: Option<Arc<Tenant>>,
    /// The key that authenticated the request: its id goes into the audit row, its
    /// models and limits narrow the tenant's.
    api_key: Option<Arc<ApiKey>>,
    /// The admitted request's hold on its tenant's counters, settled at the end.
    ticket: Option<Ticket>,
    rate_headers: Option<RateHeaders>,
    /// What the chain ran on and what it produced, once policy passed.
    plan: Option<Plan>,
    outcome: Option<ChainOutcome>,
    status: u16,
    error: Option<GatewayError>,
    first_byte: Option<Instant>,
    client_gone: bool,
    /// The audit row, once written ahead of the response's last bytes.
    sealed: Option<Box<AuditRow>>,
    /// Keeps a stopping process alive until this request is over (`inflight.rs`).
    _in_flight: Option<crate::inflight::InFlight>,
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx::default()
    }

    async fn early_request_filter(&self, _session: &mut Session, _ctx: &mut Ctx) -> Result<()> {
        head_deadline::head_read();
        Ok(())
    }

    /// The whole request is served here; Pingora's own upstream phases never run.
    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        ctx._in_flight = Some(crate::inflight::InFlight::enter());
        self.handle(session, ctx).await;
        Ok(true)
    }

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        Error::e_explain(
            ErrorType::InternalError,
            "requests are proxied by the chain",
        )
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &Ctx, _error: &Error) -> bool {
        // Failures are reported once, in the response and the audit row.
        true
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, _ctx: &mut Ctx) -> FailToProxy {
        // Only a request Pingora could not hand to `request_filter` gets here.
        let code = if e.esource() == &ErrorSource::Downstream {
            0
        } else {
            let ge = GatewayError::new(ErrorKind::InvalidRequest, "malformed HTTP request");
            let _ = respond::error(session, &ge, ApiFormat::OpenAi, "").await;
            ge.status()
        };
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Ctx) {
        self.finish(session, ctx).await;
    }
}
