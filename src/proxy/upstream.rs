//! The subrequest side: one upstream attempt after another until one answers.
//!
//! Each attempt rebuilds the request for its model's provider (the next one may speak
//! another dialect), injects that body when Pingora asks for the (empty) request body,
//! and translates the response as it streams. Failover happens only while nothing has
//! been sent to the client.

use super::{respond, Attempt, Ctx, Gateway, Plan};
use crate::error::{ErrorKind, GatewayError};
use crate::providers::{self, ResponseTranslator};
use bytes::{Bytes, BytesMut};
use pingora::prelude::*;
use pingora_core::protocols::ALPN;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, Session};
use std::sync::Arc;
use std::time::Duration;

/// What the parent hands to its subrequest: the plan and which candidate to try.
pub(super) struct SubInput {
    pub plan: Arc<Plan>,
    pub idx: usize,
}

/// The plan and candidate index, when this session is one of our subrequests.
pub(super) fn take_plan(session: &mut Session) -> Option<(Arc<Plan>, usize)> {
    session
        .subrequest_ctx
        .as_mut()?
        .user_ctx_mut()?
        .downcast_mut::<SubInput>()
        .map(|s| (s.plan.clone(), s.idx))
}

fn plan_of(ctx: &Ctx) -> Result<Arc<Plan>> {
    ctx.plan
        .clone()
        .ok_or_else(|| Error::explain(ErrorType::InternalError, "subrequest without a plan"))
}

fn ms(v: u64) -> Option<Duration> {
    Some(Duration::from_millis(v))
}

impl Gateway {
    pub(super) async fn choose_peer(
        &self,
        _session: &mut Session,
        ctx: &mut Ctx,
    ) -> Result<Box<HttpPeer>> {
        let plan = plan_of(ctx)?;
        ctx.retry_same = false;
        let model = plan
            .chain
            .models
            .get(ctx.idx)
            .cloned()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no such candidate"))?;
        ctx.error = None;
        let req = plan.full_request().ok_or_else(|| {
            Error::explain(
                ErrorType::InternalError,
                "the request was released: its answer already reached the client",
            )
        })?;
        let upstream = match providers::prepare(&req, &model) {
            Ok(u) => u,
            Err(ge) => {
                let mut e = Error::explain(ErrorType::InternalError, ge.message.clone());
                ctx.error = Some(ge);
                e.set_retry(false);
                return Err(e);
            }
        };
        let translator = Some(ResponseTranslator::new(&req, &upstream, &model));
        ctx.attempt = Some(Attempt {
            model: model.clone(),
            upstream,
            translator,
            error_body: None,
            body_sent: false,
        });

        let p = &model.provider;
        let addrs = match self
            .resolver
            .resolve(&p.base_url.host, p.base_url.port)
            .await
        {
            Ok(a) => a,
            Err(err) => {
                let mut e = Error::because(
                    ErrorType::ConnectNoRoute,
                    format!("resolving {}", p.base_url.host),
                    err,
                )
                .into_up();
                e.set_retry(false);
                return Err(e);
            }
        };
        let mut peer = HttpPeer::new(addrs[0], p.base_url.tls, p.base_url.host.clone());
        let t = &p.timeouts;
        peer.options.connection_timeout = ms(t.connect_ms);
        peer.options.total_connection_timeout = ms(t.connect_ms);
        // Each read is bounded by the idle gap for streams (the parent enforces the
        // first-token deadline itself, to fail over); a non-stream answer comes in
        // one piece, so only the total bounds it.
        peer.options.read_timeout = ms(if plan.req.stream {
            t.idle_ms
        } else {
            t.total_ms
        });
        peer.options.write_timeout = ms(t.idle_ms);
        peer.options.idle_timeout = Some(Duration::from_secs(60));
        // HTTP/1.1 only: a body injected through `request_body_filter` cannot go to an
        // h2 upstream in Pingora 0.9.
        peer.options.alpn = ALPN::H1;
        Ok(Box::new(peer))
    }
}

/// Headers that belong to the client's hop or identify the client to us; never forwarded.
const STRIPPED: &[&str] = &[
    "authorization",
    "x-api-key",
    "proxy-authorization",
    "cookie",
    "host",
    "expect",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "te",
    "upgrade",
    "accept-encoding",
    "x-request-id",
    "x-gateway-fallback",
    // The tenant's end user is the gateway's bookkeeping (the audit row), not the
    // provider's; a body's own `user` field still goes up as the client sent it.
    "x-gateway-end-user",
];

pub(super) fn rewrite_request_header(
    _session: &mut Session,
    req: &mut RequestHeader,
    ctx: &mut Ctx,
) -> Result<()> {
    let plan = plan_of(ctx)?;
    let a = ctx
        .attempt
        .as_ref()
        .ok_or_else(|| Error::explain(ErrorType::InternalError, "no attempt"))?;
    let base = &a.model.provider.base_url;
    let uri = format!("{}{}", base.path_prefix, a.upstream.path);
    req.set_uri(
        uri.parse()
            .or_err(ErrorType::InternalError, "upstream uri")?,
    );
    req.set_method(http::Method::POST);
    for h in STRIPPED {
        req.remove_header(*h);
    }
    let default_port = if base.tls { 443 } else { 80 };
    let host = if base.port == default_port {
        base.host.clone()
    } else {
        format!("{}:{}", base.host, base.port)
    };
    req.insert_header("host", host)?;
    req.insert_header("content-type", "application/json")?;
    req.insert_header("content-length", a.upstream.body.len().to_string())?;
    req.insert_header("x-request-id", plan.request_id.as_str())?;
    for (k, v) in &a.upstream.headers {
        req.insert_header(*k, v.as_str())?;
    }
    Ok(())
}

/// Gives the attempt its body: the subrequest itself has none.
///
/// The body is handed over, not copied: once Pingora has written it the stream would
/// otherwise hold a copy of the whole prompt for as long as it lasts (a heap profile of
/// held streams, BENCHMARKS.md). A retry of this candidate calls `choose_peer`
/// again, which prepares the body afresh; `content-length` was set from it before.
pub(super) fn inject_body(body: &mut Option<Bytes>, end_of_stream: bool, ctx: &mut Ctx) {
    let Some(a) = ctx.attempt.as_mut() else {
        return;
    };
    if end_of_stream && body.as_ref().is_none_or(Bytes::is_empty) && !a.body_sent {
        *body = Some(std::mem::take(&mut a.upstream.body));
        a.body_sent = true;
    }
}

pub(super) fn on_response_header(resp: &mut ResponseHeader, ctx: &mut Ctx) -> Result<()> {
    let status = resp.status.as_u16();
    if let Some(plan) = &ctx.plan {
        plan.outcome().upstream_status = status;
    }
    if status == 429 || status >= 500 {
        let name = ctx
            .attempt
            .as_ref()
            .map(|a| a.model.name.clone())
            .unwrap_or_default();
        let mut ge = GatewayError::new(
            ErrorKind::UpstreamUnavailable,
            format!("model '{name}' is unavailable: upstream answered {status}"),
        );
        let retry_after = resp
            .headers
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        ge.retry_after = Some(retry_after.unwrap_or(1));
        ctx.error = Some(ge);
        let mut e =
            Error::explain(ErrorType::HTTPStatus(status), "upstream failure status").into_up();
        // The parent moves on to the next candidate; this subrequest is done.
        e.set_retry(false);
        return Err(e);
    }
    if status != 200 {
        // The client's own mistake, answered by the provider: passed on, in the
        // client's format when the provider speaks another one.
        if let Some(a) = ctx.attempt.as_mut() {
            a.translator = None;
            a.error_body = Some((status, Vec::new()));
        }
    }
    Ok(())
}

pub(super) fn decorate_response(resp: &mut ResponseHeader, ctx: &mut Ctx) -> Result<()> {
    ctx.header_sent = true;
    let plan = plan_of(ctx)?;
    for h in [
        "set-cookie",
        "openai-organization",
        "openai-project",
        "anthropic-organization-id",
        "x-request-id",
        "request-id",
    ] {
        resp.remove_header(h);
    }
    let (model, provider) = match (&ctx.hit, &ctx.attempt) {
        // Served from the cache: the model and provider of the original call.
        (Some(h), _) => (h.model.as_str(), h.provider.as_str()),
        (None, Some(a)) => {
            // A translated body (or a provider error re-rendered for the client) has
            // another length than the upstream's.
            if a.error_body.is_some()
                || a.translator
                    .as_ref()
                    .is_some_and(ResponseTranslator::rewrites)
            {
                resp.remove_header("content-length");
                resp.insert_header("transfer-encoding", "chunked")?;
            }
            (a.model.name.as_str(), a.model.provider.name.as_str())
        }
        (None, None) => return Error::e_explain(ErrorType::InternalError, "no attempt"),
    };
    let attempts = plan.outcome().attempts;
    respond::gateway_headers(resp, &plan.request_id)?;
    resp.insert_header("x-gateway-model", model)?;
    resp.insert_header("x-gateway-provider", provider)?;
    resp.insert_header("x-gateway-attempts", attempts.to_string())?;
    let fell_back = model != plan.chain.first().name;
    resp.insert_header(
        "x-gateway-fallback",
        if fell_back { "true" } else { "false" },
    )?;
    resp.insert_header(
        "x-gateway-cache",
        crate::cache::header_value(plan.cache.as_ref(), ctx.hit.is_some()),
    )?;
    let mut rate = Vec::with_capacity(3);
    respond::rate_headers(&plan.rate_headers, &mut rate);
    for (k, v) in rate {
        resp.insert_header(k, v)?;
    }
    Ok(())
}

pub(super) fn translate_body(body: &mut Option<Bytes>, end_of_stream: bool, ctx: &mut Ctx) {
    let Some(plan) = ctx.plan.clone() else {
        return;
    };
    let Some(a) = ctx.attempt.as_mut() else {
        return;
    };
    if let Some((status, buf)) = a.error_body.as_mut() {
        if let Some(b) = body.as_ref() {
            buf.extend_from_slice(b);
        }
        *body = Some(if end_of_stream {
            let out = providers::translate_error_body(
                a.model.provider.kind,
                plan.req.format,
                *status,
                buf,
            );
            plan.outcome().client_error_code = Some(client_error_code(*status));
            out
        } else {
            Bytes::new()
        });
        return;
    }
    let Some(t) = a.translator.as_mut() else {
        return;
    };
    let mut out = BytesMut::new();
    if let Some(b) = body.as_ref() {
        t.feed(b, &mut out);
    }
    let completion = if end_of_stream {
        let c = t.finish(&mut out);
        if plan.req.stream && !c.complete && !c.upstream_error {
            // A clean close before the stream's own end is still a failure: say so.
            let ge = GatewayError::new(
                ErrorKind::BadUpstreamResponse,
                "the upstream stream ended before completion",
            );
            out.extend_from_slice(&ge.sse_event(plan.req.format));
            let mut o = plan.outcome();
            o.error = Some(ge);
            o.error_event_sent = true;
        }
        c
    } else {
        t.snapshot()
    };
    *body = Some(out.freeze());
    if end_of_stream {
        if let Some(fill) = &ctx.fill {
            // Before pingora stores this last chunk: the fill is committed only if the
            // answer ended complete, and hits report this usage.
            fill.set_completion(completion);
        }
    }
    let mut o = plan.outcome();
    if completion.upstream_error && o.error.is_none() {
        // The provider's own error event went to the client, translated: record it.
        o.error = Some(GatewayError::new(
            ErrorKind::UpstreamUnavailable,
            "the provider reported an error in the middle of the stream",
        ));
        o.error_event_sent = true;
    }
    o.completion = completion;
}

/// The audit `error_code` of a provider's own error answer: the contract's code for
/// its status, the same whichever format the client's body is in (Anthropic bodies
/// carry no code, and provider codes are not the contract's).
fn client_error_code(status: u16) -> String {
    let kind = match status {
        401 => ErrorKind::InvalidApiKey,
        403 => ErrorKind::ModelNotAllowed,
        404 => ErrorKind::ModelNotFound,
        413 => ErrorKind::RequestTooLarge,
        _ => ErrorKind::InvalidRequest,
    };
    kind.code().to_string()
}

/// Only a stale pooled connection is retried here, on the same model; moving on to
/// another candidate is the parent's decision.
pub(super) fn decide_retry(
    peer: &HttpPeer,
    e: Box<Error>,
    ctx: &mut Ctx,
    client_reused: bool,
) -> Box<Error> {
    let mut e = e.more_context(format!("peer {peer}"));
    if !ctx.header_sent && matches!(e.retry, RetryType::ReusedOnly) && client_reused {
        ctx.retry_same = true;
        e.set_retry(true);
    } else {
        e.set_retry(false);
    }
    e
}

/// Maps a Pingora failure that our filters did not already describe.
fn classify(e: &Error) -> GatewayError {
    use ErrorType::*;
    let (kind, msg) = match e.etype() {
        ConnectTimedout | ReadTimedout | WriteTimedout => (
            ErrorKind::UpstreamTimeout,
            "the upstream did not answer in time",
        ),
        ConnectRefused | ConnectNoRoute | ConnectError | TLSHandshakeFailure
        | TLSHandshakeTimedout | ConnectionClosed | HTTPStatus(_) => (
            ErrorKind::UpstreamUnavailable,
            "the upstream could not be reached",
        ),
        _ if e.esource() == &ErrorSource::Upstream => (
            ErrorKind::BadUpstreamResponse,
            "the upstream sent an invalid response",
        ),
        _ => (ErrorKind::Internal, "internal error"),
    };
    let ge = GatewayError::new(kind, msg);
    if kind == ErrorKind::UpstreamUnavailable {
        ge.with_retry_after(1)
    } else {
        ge
    }
}

pub(super) async fn fail(session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
    let Some(plan) = ctx.plan.clone() else {
        // A parent-level failure before our own handling (e.g. an unreadable request).
        let ge = GatewayError::new(ErrorKind::InvalidRequest, "malformed HTTP request");
        let code = if e.esource() == &ErrorSource::Downstream {
            0
        } else {
            let _ = respond::error(session, &ge, crate::error::ApiFormat::OpenAi, "").await;
            ge.status()
        };
        return FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        };
    };
    let ge = ctx.error.take().unwrap_or_else(|| classify(e));
    let code = ge.status();
    // Before the header, the parent answers (or fails over); after it, the stream
    // must end with an error event, never a silent clean end.
    let event = {
        let mut o = plan.outcome();
        let event = (ctx.header_sent && plan.req.stream && !o.error_event_sent)
            .then(|| ge.sse_event(plan.req.format));
        o.error_event_sent |= event.is_some();
        if o.error.is_none() {
            o.error = Some(ge);
        }
        event
    };
    if let Some(ev) = event {
        let _ = session.write_response_body(Some(ev), true).await;
    }
    FailToProxy {
        error_code: code,
        can_reuse_downstream: false,
    }
}

/// The subrequest is over; anything the body filter did not see is settled here.
pub(super) fn record_end(ctx: &mut Ctx) {
    if let (Some(plan), Some(a)) = (&ctx.plan, &ctx.attempt) {
        if let Some(t) = &a.translator {
            let mut o = plan.outcome();
            if o.completion == Default::default() {
                o.completion = t.snapshot();
            }
        }
    }
}
