//! The front of the request path: everything decided before the first upstream byte
//! (authentication, body, policy, admission), then the chain, then the audit row.

use super::report::ChainOutcome;
use super::{env_ms, respond, upstream, Ctx, Endpoint, Gateway, Plan};
use crate::audit::AuditRow;
use crate::config::Tenant;
use crate::error::{ErrorKind, GatewayError};
use crate::limits::{Actual, Demand, Refusal};
use crate::providers::{self, end_user, ClientRequest};
use crate::{accounting, auth, routing};
use bytes::{Bytes, BytesMut};
use pingora_core::protocols::http::HttpTask;
use pingora_proxy::Session;
use serde_json::json;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long one write to the client may stay blocked before the client counts as
/// gone (`LLM_GATEWAY_CLIENT_WRITE_TIMEOUT_MS`, default 30 s): then the upstream call is
/// cancelled and the request is recorded as `client_closed`.
fn client_write_timeout() -> Duration {
    static TIMEOUT: OnceLock<Duration> = OnceLock::new();
    *TIMEOUT.get_or_init(|| env_ms("LLM_GATEWAY_CLIENT_WRITE_TIMEOUT_MS", 30_000))
}

/// How long a client may take to send its whole body, from the end of its headers
/// (`LLM_GATEWAY_CLIENT_BODY_TIMEOUT_MS`, default 60 s): a sender trickling a byte per
/// read timeout would otherwise hold its connection, and its admission, for hours.
fn client_body_timeout() -> Duration {
    static TIMEOUT: OnceLock<Duration> = OnceLock::new();
    *TIMEOUT.get_or_init(|| env_ms("LLM_GATEWAY_CLIENT_BODY_TIMEOUT_MS", 60_000))
}

/// Above the limit the body is still read (and dropped) up to this much, so that the
/// client, still busy uploading, gets to read our 413 instead of a reset connection.
const DRAIN_CAP: usize = 64 << 20;

impl Gateway {
    pub(super) async fn handle(&self, session: &mut Session, ctx: &mut Ctx) {
        ctx.started = Some(Instant::now());
        ctx.started_ms = crate::audit::time::now_ms();
        // A client that stops reading would otherwise block the pipe's write forever,
        // holding its upstream call open past every deadline.
        session.set_write_timeout(Some(client_write_timeout()));
        ctx.request_id = auth::request_id(session.req_header());
        if session.req_header().headers.contains_key("x-request-id") {
            ctx.started_ms = self.audit.unique_start_ms(&ctx.request_id, ctx.started_ms);
        }
        let endpoint = Endpoint::of(session.req_header());
        ctx.endpoint = Some(endpoint);
        ctx.end_user = end_user::from_headers(&session.req_header().headers).unwrap_or_default();
        if let Err(ge) = self.serve(session, ctx, endpoint).await {
            // A body too slow to wait for is not waited for after the answer either.
            if !session.is_body_done() && ge.kind != ErrorKind::RequestTimeout {
                refused_unread(session, self.config().max_body_bytes);
            }
            let mut extra = Vec::with_capacity(4);
            if let Some(outcome) = &ctx.outcome {
                extra.push((
                    "x-gateway-attempts",
                    outcome.upstream_attempts().to_string(),
                ));
            }
            // Every response to a known tenant says where its limits stand, also
            // errors raised before admission (a 400, 403 or 413).
            if ctx.rate_headers.is_none() {
                if let (Some(t), Some(k)) = (&ctx.tenant, &ctx.api_key) {
                    ctx.rate_headers = Some(self.limits.peek_headers(t, k));
                }
            }
            if let Some(h) = &ctx.rate_headers {
                respond::rate_headers(h, &mut extra);
            }
            ctx.status = ge.status();
            ctx.error = Some(ge.clone());
            self.seal(ctx).await;
            let _ =
                respond::error_with(session, &ge, endpoint.format(), &ctx.request_id, &extra).await;
        }
    }

    async fn serve(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        endpoint: Endpoint,
    ) -> Result<(), GatewayError> {
        let method = &session.req_header().method;
        match endpoint {
            Endpoint::ChatCompletions | Endpoint::Messages if method == http::Method::POST => {}
            Endpoint::Models if method == http::Method::GET => {}
            Endpoint::Other => {
                return Err(GatewayError::new(ErrorKind::NotFound, "no such endpoint"));
            }
            _ => {
                return Err(GatewayError::new(
                    ErrorKind::MethodNotAllowed,
                    format!("method {method} is not allowed here"),
                ))
            }
        }
        let cfg = self.config();
        let key = auth::presented_key(session.req_header()).ok_or_else(|| {
            GatewayError::new(
                ErrorKind::InvalidApiKey,
                "missing API key: send 'Authorization: Bearer <key>' or 'x-api-key'",
            )
        })?;
        let (tenant, api_key) = cfg
            .authenticate(key, ctx.started_ms)
            .map_err(|f| GatewayError::new(ErrorKind::InvalidApiKey, f.message()))?;
        let tenant = tenant.clone();
        let api_key = api_key.clone();
        ctx.api_key = Some(api_key.clone());
        ctx.tenant = Some(tenant.clone());

        if endpoint == Endpoint::Models {
            let body = models_list(&tenant);
            let mut extra = Vec::with_capacity(3);
            respond::rate_headers(&self.limits.peek_headers(&tenant, &api_key), &mut extra);
            ctx.status = 200;
            self.seal(ctx).await;
            return respond::json(session, 200, body, &ctx.request_id, &extra)
                .await
                .map_err(|_| GatewayError::new(ErrorKind::Internal, "write failed"));
        }

        // A tenant already over its rps or concurrency is refused before its body is
        // read, let alone parsed: a flood costs a hash lookup per request.
        self.limits
            .precheck(&tenant, &api_key)
            .map_err(|r| refusal_error(r, ctx))?;
        // The transient steps are boxed: a future's memory is what its largest step
        // touched, and a stream relays for minutes after these are done.
        let body = Box::pin(read_body(session, cfg.max_body_bytes)).await?;
        let prompt_bytes = body.len();
        let mut req = ClientRequest::parse(endpoint.format(), &body)?;
        drop(body);
        ctx.model_requested = req.model.clone().unwrap_or_default();
        ctx.end_user = end_user::resolve(&ctx.end_user, req.end_user.as_deref());
        ctx.stream = req.stream;
        let header = |name: &str| {
            session
                .req_header()
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        req.anthropic_version = header("anthropic-version");
        req.anthropic_beta = header("anthropic-beta");
        let override_header = session
            .req_header()
            .headers
            .get("x-gateway-fallback")
            .map(|v| v.to_str().unwrap_or("\u{0}"));
        let chain = routing::plan(
            &cfg,
            &tenant,
            &api_key,
            req.model.as_deref(),
            override_header,
        )?;
        providers::check_max_tokens(&req, chain.first())?;
        let ticket = Box::pin(self.limits.admit(
            &tenant,
            &api_key,
            demand(&req, &chain, prompt_bytes),
        ))
        .await
        .map_err(|r| refusal_error(r, ctx))?;
        ctx.rate_headers = Some(ticket.headers.clone());
        let rate_headers = ticket.headers.clone();
        ctx.ticket = Some(ticket);
        let cache = self.cache_lookup(&cfg, &tenant, endpoint, &chain, &req, session);
        // Every phase reads the request's flags; only attempts need its body.
        let body = std::mem::take(&mut req.body);
        let meta = req.clone();
        req.body = body;
        let plan = Plan {
            request_id: ctx.request_id.clone(),
            req: meta,
            forward: upstream::forwarded(session.req_header()),
            chain,
            prompt_bytes,
            rate_headers,
            cache,
        };
        let mut outcome = self.run_chain(session, &plan, req).await;
        if outcome.rescuable() {
            // Every provider failed: a stored answer, even expired, beats an error.
            if let Some(stored) = plan.cache.as_ref().and_then(|l| self.cache.stale(l)) {
                let served = self.serve_stale(&plan, stored, outcome.upstream_attempts());
                outcome.attempts.push(served.report);
                outcome.tail = served.tail;
                outcome.error = None;
            }
        }
        let tail = outcome.tail.take();
        let delivered = outcome.delivered().map(|a| (a.client_status, a.first_byte));
        let error = outcome.error.clone();
        ctx.client_gone = outcome.client_gone();
        if ctx.client_gone {
            // Left in the middle of an answer: the row says how far it got.
            if let Some(a) = outcome.last() {
                ctx.status = a.client_status;
                ctx.first_byte = a.first_byte;
            }
        }
        ctx.plan = Some(plan);
        ctx.outcome = Some(outcome);
        if ctx.client_gone {
            return Ok(());
        }
        let Some((status, first_byte)) = delivered else {
            return Err(error.unwrap_or_else(|| {
                GatewayError::new(ErrorKind::Internal, "the chain ended without an answer")
            }));
        };
        ctx.status = status;
        ctx.first_byte = first_byte;
        // The row goes out before the answer's last bytes (see `seal`).
        self.seal(ctx).await;
        if let Some(tail) = tail {
            let mut tasks = Vec::with_capacity(2);
            if let Some(h) = tail.header {
                tasks.push(HttpTask::Header(h, false));
            }
            tasks.push(HttpTask::Body(Some(tail.body), true));
            if !super::client::Client::send(session, tasks).await {
                ctx.client_gone = true;
            }
        }
        Ok(())
    }

    /// Writes the request's audit row, as things stand, before the response's last
    /// bytes go out: a client that got its whole answer always has its row, even if
    /// the gateway is killed right after (the row is in the spool, see `audit`). So
    /// the row's `latency_ms` runs to just before that last write, and a client that
    /// drops in the middle of it is still recorded as served (it had everything but
    /// the terminator).
    pub(super) async fn seal(&self, ctx: &mut Ctx) {
        if ctx.sealed.is_some() || ctx.started.is_none() {
            return;
        }
        let row = self.audit_row(ctx);
        // Settled before the row is written: a crash between the two leaves the shared
        // spend above what the audit bills, never below it (budgets stay conservative).
        self.settle(ctx, &row).await;
        // Counted before the row is written too: whoever sees the row sees the counters.
        self.count(ctx, &row);
        self.audit.write(&row).await;
        // Boxed: the context lives in both proxy state machines of every stream.
        ctx.sealed = Some(Box::new(row));
    }

    /// The request's metrics, from its row and its exact timings (the row's are in
    /// whole milliseconds: a fast first byte there is 0).
    fn count(&self, ctx: &Ctx, row: &AuditRow) {
        let started = ctx.started.unwrap_or_else(Instant::now);
        let timing = crate::metrics::Timing {
            latency: started.elapsed(),
            ttft: ctx.first_byte.map(|t| t.duration_since(started)),
        };
        self.metrics.observe(row, &timing);
        if let (Some(plan), Some(outcome)) = (&ctx.plan, &ctx.outcome) {
            let result = crate::cache::header_value(plan.cache.as_ref(), outcome.cache_hit());
            self.metrics.cache_result(&row.tenant, result);
        }
    }

    /// Releases the request's hold on its tenant's counters for what it really used.
    async fn settle(&self, ctx: &mut Ctx, row: &AuditRow) {
        if let Some(ticket) = ctx.ticket.take() {
            // A hit counts as a request (rps) but used no upstream tokens or money.
            let upstream = row.cache_hit == 0;
            let actual = Actual {
                tokens_in: if upstream { row.tokens_in.into() } else { 0 },
                tokens_out: if upstream { row.tokens_out.into() } else { 0 },
                cost_nanousd: row.cost_nanousd,
            };
            self.limits.settle(ticket, actual).await;
            if actual.cost_nanousd > 0 {
                if let (Some(tenant), Some(key)) = (&ctx.tenant, &ctx.api_key) {
                    // Budget thresholds and velocity are checked off the request path.
                    self.alerts.spent(tenant, key);
                }
            }
        }
    }

    /// The request is over: unless [`Self::seal`] did it already (the response did
    /// not complete), bill, count and write its audit row; then log it.
    pub(super) async fn finish(&self, _session: &mut Session, ctx: &mut Ctx) {
        if ctx.started.is_none() {
            return;
        }
        let row = match ctx.sealed.take() {
            Some(row) => *row,
            None => {
                let row = self.audit_row(ctx);
                self.settle(ctx, &row).await;
                self.count(ctx, &row);
                self.audit.emit(&row);
                row
            }
        };
        // One line per request, at warn only when on-call should look at it.
        let level = if row.status >= 500 {
            log::Level::Warn
        } else {
            log::Level::Debug
        };
        crate::logging::request(
            level,
            &crate::logging::RequestLine {
                request_id: &row.request_id,
                tenant: &row.tenant,
                endpoint: &row.endpoint,
                model: &row.model,
                provider: &row.provider,
                status: row.status,
                code: &row.error_code,
                attempts: row.attempts,
                tokens_in: row.tokens_in,
                tokens_out: row.tokens_out,
                latency_ms: row.latency_ms,
            },
        );
    }

    /// The request's audit row from what is known now.
    fn audit_row(&self, ctx: &Ctx) -> AuditRow {
        let cfg = self.config();
        let ms = |d: std::time::Duration| d.as_millis().min(u32::MAX as u128) as u32;
        let started = ctx.started.unwrap_or_else(Instant::now);
        let mut row = AuditRow {
            request_id: ctx.request_id.clone(),
            ts: crate::audit::time::datetime(ctx.started_ms),
            ts_ms: ctx.started_ms,
            tenant: ctx
                .tenant
                .as_ref()
                .map(|t| t.id.clone())
                .unwrap_or_default(),
            api_key_id: ctx
                .api_key
                .as_ref()
                .map(|k| k.id.clone())
                .unwrap_or_default(),
            endpoint: ctx.endpoint.map(Endpoint::as_str).unwrap_or("").to_string(),
            model_requested: ctx.model_requested.clone(),
            end_user: ctx.end_user.clone(),
            region: cfg.node.region.clone(),
            stream: ctx.stream as u8,
            status: ctx.status,
            error_code: ctx
                .error
                .as_ref()
                .map(|e| e.kind.code().to_string())
                .unwrap_or_default(),
            latency_ms: ms(started.elapsed()),
            ttft_ms: ctx.first_byte.map_or(0, |t| ms(t.duration_since(started))),
            node: cfg.node.hostname.clone(),
            ..AuditRow::default()
        };
        if let (Some(plan), Some(outcome)) = (&ctx.plan, &ctx.outcome) {
            outcome_into_row(&mut row, plan, outcome, &cfg.node.region);
        }
        if ctx.client_gone {
            if row.status == 0 {
                // nginx's convention for "the client closed the request".
                row.status = 499;
            }
            if row.error_code.is_empty() {
                row.error_code = "client_closed".to_string();
            }
        }
        row
    }
}

/// What the chain did, into the row: attempts, the model that served (or was tried
/// last), its usage and cost, and the error it ended with.
pub(super) fn outcome_into_row(
    row: &mut AuditRow,
    plan: &Plan,
    outcome: &ChainOutcome,
    node_region: &str,
) {
    row.attempts = outcome.upstream_attempts();
    let Some(a) = outcome.last() else {
        return;
    };
    let m = &a.model;
    row.model = m.name.clone();
    row.upstream_model = a.upstream_model().to_string();
    if let Some(d) = &a.deployment {
        row.provider = d.provider.name.clone();
        row.region = d.provider.region.clone();
    }
    row.fallback_used = (m.name != plan.chain.first().name) as u8;
    let bill = accounting::bill(
        &a.completion,
        a.upstream_status,
        plan.prompt_bytes,
        &m.price,
    );
    row.tokens_in = bill.usage.input;
    row.tokens_out = bill.usage.output;
    row.cached_tokens_in = bill.usage.cached_input;
    row.usage_estimated = bill.estimated as u8;
    row.cost_nanousd = bill.cost_nanousd;
    if a.cache.hit {
        // The row keeps the original call's usage; nothing went upstream, so nothing
        // is billed and no provider served.
        row.cache_hit = 1;
        row.cost_nanousd = 0;
        row.provider.clear();
        row.region = node_region.to_string();
    }
    if row.error_code.is_empty() {
        if let Some(e) = outcome.error.as_ref().or(a.error.as_ref()) {
            row.error_code = e.kind.code().to_string();
        } else if let Some(code) = a.client_error_code {
            row.error_code = code.to_string();
        }
    }
}

impl Gateway {
    /// The request's cache key and mode, or `None` when it bypasses the cache.
    fn cache_lookup(
        &self,
        cfg: &crate::config::Config,
        tenant: &Tenant,
        endpoint: Endpoint,
        chain: &routing::Chain,
        req: &ClientRequest,
        session: &Session,
    ) -> Option<crate::cache::Lookup> {
        if !tenant.cache.enabled {
            return None;
        }
        let names: Vec<(&str, &str)> = chain
            .models
            .iter()
            .map(|m| (m.name.as_str(), m.upstream_names.as_str()))
            .collect();
        // Several Cache-Control headers count as one list.
        let cache_control: Vec<&str> = session
            .req_header()
            .headers
            .get_all("cache-control")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        let cache_control = cache_control.join(",");
        let facts = crate::cache::RequestFacts {
            endpoint: endpoint.as_str(),
            chain: &names,
            headers: &[
                req.anthropic_version.as_deref(),
                req.anthropic_beta.as_deref(),
            ],
            cache_control: Some(cache_control.as_str()),
            body: &req.body,
        };
        self.cache.decide(tenant, cfg.cache.max_bytes, &facts)
    }
}

impl Endpoint {
    fn of(req: &pingora_http::RequestHeader) -> Endpoint {
        match req.uri.path().trim_end_matches('/') {
            "/v1/chat/completions" => Endpoint::ChatCompletions,
            "/v1/messages" => Endpoint::Messages,
            "/v1/models" => Endpoint::Models,
            _ => Endpoint::Other,
        }
    }
}

fn models_list(tenant: &Tenant) -> Bytes {
    let data: Vec<_> = tenant
        .models
        .iter()
        .map(
            |m| json!({"id": m.name, "object": "model", "created": 0, "owned_by": m.first_provider().name}),
        )
        .collect();
    Bytes::from(json!({"object": "list", "data": data}).to_string())
}

/// The most `req` can consume on any model of `chain`, reserved before forwarding.
///
/// Prompt tokens are bounded by half the body's bytes (a token is rarely under 2
/// bytes, and the JSON around the text adds slack); output by the bound the adapters
/// send upstream. The costliest candidate is reserved, so a fallback never overdraws.
fn demand(req: &ClientRequest, chain: &routing::Chain, prompt_bytes: usize) -> Demand {
    let prompt = prompt_bytes.div_ceil(2) as u64;
    let mut d = Demand::default();
    for m in &chain.models {
        // Unclamped: a limit can only refuse a huge max_tokens if it sees it whole.
        let output = providers::output_bound(req, m);
        d.tokens = d.tokens.max(prompt.saturating_add(output));
        d.cost_nanousd = d
            .cost_nanousd
            .max(accounting::worst_cost_nanousd(prompt, output, &m.price));
    }
    d
}

/// A refusal by the limits, as the client sees it; the message names the scope
/// (tenant or key) whose limit refused.
fn refusal_error(r: Refusal, ctx: &mut Ctx) -> GatewayError {
    let message = r.message();
    match r {
        Refusal::Rate {
            retry_after_s,
            headers,
            ..
        } => {
            ctx.rate_headers = Some(headers);
            GatewayError::new(ErrorKind::RateLimited, message).with_retry_after(retry_after_s)
        }
        Refusal::Unavailable(_) => {
            GatewayError::new(ErrorKind::UpstreamUnavailable, message).with_retry_after(1)
        }
        Refusal::Budget {
            retry_after_s,
            headers,
            ..
        } => {
            ctx.rate_headers = Some(headers);
            GatewayError::new(ErrorKind::BudgetExceeded, message).with_retry_after(retry_after_s)
        }
        Refusal::Guard {
            action,
            retry_after_s,
            headers,
            ..
        } => {
            ctx.rate_headers = Some(headers);
            let kind = match action {
                crate::config::GuardAction::Block => ErrorKind::SpendGuardBlocked,
                _ => ErrorKind::SpendGuardThrottled,
            };
            GatewayError::new(kind, message).with_retry_after(retry_after_s)
        }
        // Never admitted however long the client waits: no retry-after.
        Refusal::NeverFits { .. } => GatewayError::new(ErrorKind::InvalidRequest, message),
    }
}

/// A request refused before its body was read (unknown key, rate limit). Pingora's
/// default closes such a connection once the answer is out, and a client still
/// uploading its body may then see a reset instead of the answer; so a body of
/// declared, acceptable length is read and dropped after the answer (no parsing),
/// which also keeps the connection for the next request. A client waiting for
/// `100 Continue` will not send its body, and a body of unknown or excessive length
/// is not worth reading: those connections close.
fn refused_unread(session: &mut Session, max_body: usize) {
    let req = session.req_header();
    let expects = req
        .headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let drainable = req
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|n| n <= max_body);
    if expects {
        session.set_keepalive(None);
    } else if drainable {
        session.set_close_on_response_before_downstream_finish(false);
    }
}

fn too_large(max: usize) -> GatewayError {
    GatewayError::new(
        ErrorKind::RequestTooLarge,
        format!("request body is larger than the limit of {max} bytes"),
    )
}

/// Reads the whole body, refusing anything over `max` bytes or slower than the body
/// deadline (408, and the connection closes: what is left of the body is unread).
async fn read_body(session: &mut Session, max: usize) -> Result<Bytes, GatewayError> {
    match tokio::time::timeout(client_body_timeout(), read_body_within(session, max)).await {
        Ok(r) => r,
        Err(_) => {
            session.set_keepalive(None);
            Err(GatewayError::new(
                ErrorKind::RequestTimeout,
                format!(
                    "the request body was not received within {} s",
                    client_body_timeout().as_secs_f32()
                ),
            ))
        }
    }
}

async fn read_body_within(session: &mut Session, max: usize) -> Result<Bytes, GatewayError> {
    let declared = session
        .req_header()
        .headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(16 << 10).min(max));
    let mut over = declared.is_some_and(|n| n > max);
    let mut seen = 0usize;
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                seen += chunk.len();
                if seen > max {
                    over = true;
                }
                if over {
                    buf.clear();
                    if seen > DRAIN_CAP {
                        break;
                    }
                } else {
                    buf.extend_from_slice(&chunk);
                }
            }
            Ok(None) => break,
            Err(_) => {
                return Err(GatewayError::new(
                    ErrorKind::InvalidRequest,
                    "the request body could not be read",
                ))
            }
        }
    }
    if over {
        session.set_keepalive(None);
        return Err(too_large(max));
    }
    Ok(buf.freeze())
}
