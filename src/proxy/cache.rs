//! The subrequest's `pingora-cache` phases.
//!
//! The parent computed the request's [`Lookup`](crate::cache::Lookup) (or decided to
//! bypass); each attempt's subrequest then enables pingora's cache with the shared
//! storage and lock, so that concurrent identical requests wait for one upstream call
//! and follow its answer as it streams. What gets stored is the client-format stream,
//! since the body filters translate before pingora writes to the cache; the
//! [`Answer`] in the meta carries the model, provider and usage of the original call.
//! When every provider of the chain failed, the parent serves a stored answer past its
//! TTL instead of the error ([`Gateway::serve_stale`]).

use super::{respond, Ctx, Gateway, Plan};
use crate::cache::{Answer, Stored};
use crate::error::{ErrorKind, GatewayError};
use pingora::prelude::*;
use pingora_cache::{CacheKey, CacheMeta, ForcedFreshness, NoCacheReason, RespCacheable};
use pingora_http::ResponseHeader;
use pingora_proxy::Session;
use std::sync::Arc;
use std::time::SystemTime;

impl Gateway {
    pub(super) fn enable_cache(&self, session: &mut Session, ctx: &Ctx) {
        if !ctx.is_subrequest() {
            return;
        }
        if ctx.plan.as_ref().is_some_and(|p| p.cache.is_some()) {
            session
                .cache
                .enable(self.cache.store, None, None, Some(self.cache.lock), None);
        }
    }
}

pub(super) fn key(ctx: &Ctx) -> Result<CacheKey> {
    let lookup = ctx
        .plan
        .as_ref()
        .and_then(|p| p.cache.as_ref())
        .ok_or_else(|| Error::explain(ErrorType::InternalError, "cache without a lookup"))?;
    Ok(CacheKey::new(
        lookup.digest.to_vec(),
        lookup.tenant.as_str(),
    ))
}

/// A stored answer was found: take it (the outcome now describes the original call),
/// or skip it when the client asked for a refresh.
pub(super) fn on_hit(meta: &CacheMeta, is_fresh: bool, ctx: &mut Ctx) -> Option<ForcedFreshness> {
    let plan = ctx.plan.clone()?;
    if plan.cache.as_ref().is_some_and(|l| l.refresh) {
        return Some(ForcedFreshness::ForceMiss);
    }
    if !is_fresh {
        return None;
    }
    let answer = meta.extensions().get::<Arc<Answer>>()?.clone();
    let mut o = plan.outcome();
    o.cache_hit = true;
    // No upstream attempt is made for this candidate.
    o.attempts = o.attempts.saturating_sub(1);
    o.upstream_status = 200;
    if let Some(m) = plan.chain.models.iter().find(|m| m.name == answer.model) {
        o.model = Some(m.clone());
    }
    if let Some(c) = answer.completion() {
        o.completion = c;
    }
    drop(o);
    ctx.hit = Some(answer);
    None
}

/// Only a 200 that this attempt translates (not a provider's error answer) may be
/// stored; whether it ended complete is decided when the fill finishes.
pub(super) fn response_cacheable(resp: &ResponseHeader, ctx: &mut Ctx) -> RespCacheable {
    let Some(lookup) = ctx.plan.as_ref().and_then(|p| p.cache.as_ref()) else {
        return RespCacheable::Uncacheable(NoCacheReason::InternalError);
    };
    let Some(a) = ctx.attempt.as_ref() else {
        return RespCacheable::Uncacheable(NoCacheReason::InternalError);
    };
    if resp.status.as_u16() != 200 || a.error_body.is_some() || a.translator.is_none() {
        return RespCacheable::Uncacheable(NoCacheReason::OriginNotCache);
    }
    let Ok(mut header) = ResponseHeader::build(200, Some(2)) else {
        return RespCacheable::Uncacheable(NoCacheReason::InternalError);
    };
    if let Some(ct) = resp.headers.get("content-type") {
        let _ = header.insert_header("content-type", ct.clone());
    }
    let answer = Arc::new(Answer::new(&a.model.name, &a.model.provider.name));
    ctx.fill = Some(answer.clone());
    let now = SystemTime::now();
    let mut meta = CacheMeta::new(now + lookup.ttl, now, 0, 0, header);
    meta.extensions_mut().insert(answer);
    RespCacheable::Cacheable(meta)
}

/// The end of a body served from the cache: the original call's usage is known by
/// now (the writer records it before storing its last byte), also when this request
/// followed a fill in flight.
pub(super) fn on_hit_body_end(ctx: &Ctx) {
    let (Some(plan), Some(answer)) = (&ctx.plan, &ctx.hit) else {
        return;
    };
    if let Some(c) = answer.completion() {
        let mut o = plan.outcome();
        o.completion = c;
        // A fill that failed carried its own error event to this reader already.
        if plan.req.stream && (!c.complete || c.upstream_error) {
            o.error_event_sent = true;
        }
    }
}

impl Gateway {
    /// Answers from a stored answer because no provider could answer: one past its TTL
    /// is marked `x-gateway-cache-stale: true` and gets a `Warning: 110` header.
    pub(super) async fn serve_stale(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        plan: &Plan,
        stored: Stored,
    ) -> Result<(), GatewayError> {
        let answer = &stored.answer;
        let attempts = {
            let mut o = plan.outcome();
            o.cache_hit = true;
            o.error = None;
            o.upstream_status = 200;
            o.client_error_code = None;
            if let Some(m) = plan.chain.models.iter().find(|m| m.name == answer.model) {
                o.model = Some(m.clone());
            }
            if let Some(c) = answer.completion() {
                o.completion = c;
            }
            o.attempts
        };
        let failed = |_| GatewayError::new(ErrorKind::Internal, "cannot build the response");
        let mut resp = ResponseHeader::build(200, Some(12)).map_err(failed)?;
        let h = |resp: &mut ResponseHeader, k: &'static str, v: &str| {
            resp.insert_header(k, v).map_err(failed)
        };
        if let Some(ct) = &stored.content_type {
            resp.insert_header("content-type", ct.clone())
                .map_err(failed)?;
        }
        h(&mut resp, "content-length", &stored.body.len().to_string())?;
        respond::gateway_headers(&mut resp, &plan.request_id).map_err(failed)?;
        h(&mut resp, "x-gateway-model", &answer.model)?;
        h(&mut resp, "x-gateway-provider", &answer.provider)?;
        h(&mut resp, "x-gateway-attempts", &attempts.to_string())?;
        let fell_back = answer.model != plan.chain.first().name;
        h(
            &mut resp,
            "x-gateway-fallback",
            if fell_back { "true" } else { "false" },
        )?;
        h(&mut resp, "x-gateway-cache", "hit")?;
        if stored.expired {
            h(&mut resp, "x-gateway-cache-stale", "true")?;
            h(&mut resp, "warning", "110 - \"Response is Stale\"")?;
        }
        let mut rate = Vec::with_capacity(3);
        respond::rate_headers(&plan.rate_headers, &mut rate);
        for (k, v) in rate {
            h(&mut resp, k, &v)?;
        }
        ctx.status = 200;
        if session
            .write_response_header(Box::new(resp), false)
            .await
            .is_err()
        {
            ctx.client_gone = true;
            return Ok(());
        }
        ctx.first_byte = Some(std::time::Instant::now());
        self.seal(ctx).await;
        if session
            .write_response_body(Some(stored.body.clone()), true)
            .await
            .is_err()
        {
            ctx.client_gone = true;
        }
        Ok(())
    }
}
