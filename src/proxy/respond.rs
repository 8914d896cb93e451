//! Responses the gateway writes itself: errors and small JSON documents.

use super::Plan;
use crate::cache::Answer;
use crate::error::{ApiFormat, GatewayError};
use crate::limits::RateHeaders;
use bytes::Bytes;
use pingora::prelude::*;
use pingora_http::ResponseHeader;
use pingora_proxy::Session;

/// Headers every response carries, whoever produced it.
pub(super) fn gateway_headers(resp: &mut ResponseHeader, request_id: &str) -> Result<()> {
    if !request_id.is_empty() {
        resp.insert_header("x-request-id", request_id)?;
    }
    Ok(())
}

/// Writes a complete JSON response.
pub(super) async fn json(
    session: &mut Session,
    status: u16,
    body: Bytes,
    request_id: &str,
    extra: &[(&'static str, String)],
) -> Result<()> {
    let mut resp = ResponseHeader::build(status, Some(4 + extra.len()))?;
    resp.insert_header("content-type", "application/json")?;
    resp.insert_header("content-length", body.len().to_string())?;
    gateway_headers(&mut resp, request_id)?;
    for (k, v) in extra {
        resp.insert_header(*k, v.as_str())?;
    }
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await?;
    Ok(())
}

/// Writes `e` in the endpoint's format, with `retry-after` where the contract wants it.
pub(super) async fn error(
    session: &mut Session,
    e: &GatewayError,
    format: ApiFormat,
    request_id: &str,
) -> Result<()> {
    error_with(session, e, format, request_id, &[]).await
}

/// As [`error`], with extra headers.
pub(super) async fn error_with(
    session: &mut Session,
    e: &GatewayError,
    format: ApiFormat,
    request_id: &str,
    extra: &[(&'static str, String)],
) -> Result<()> {
    let mut all = extra.to_vec();
    if let Some(secs) = e.retry_after {
        all.push(("retry-after", secs.to_string()));
    }
    json(session, e.status(), e.body(format), request_id, &all).await
}

/// The `x-ratelimit-*` headers the tenant's limits call for.
pub(super) fn rate_headers(h: &RateHeaders, out: &mut Vec<(&'static str, String)>) {
    if let Some(v) = h.limit_requests {
        out.push(("x-ratelimit-limit-requests", v.to_string()));
    }
    if let Some(v) = h.remaining_requests {
        out.push(("x-ratelimit-remaining-requests", v.to_string()));
    }
    if let Some(v) = h.remaining_tokens {
        out.push(("x-ratelimit-remaining-tokens", v.to_string()));
    }
}

/// Headers a provider's answer loses on its way to the client: its hop's, and what
/// identifies the gateway's own account with the provider.
const UPSTREAM_ONLY: &[&str] = &[
    "set-cookie",
    "openai-organization",
    "openai-project",
    "anthropic-organization-id",
    "x-request-id",
    "request-id",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
];

/// The `x-gateway-*`, `x-request-id` and `x-ratelimit-*` headers of an answer served
/// by `model` of `provider`.
fn decorate(
    resp: &mut ResponseHeader,
    plan: &Plan,
    model: &str,
    provider: &str,
    attempts: u8,
    hit: bool,
) -> Result<()> {
    gateway_headers(resp, &plan.request_id)?;
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
        crate::cache::header_value(plan.cache.as_ref(), hit),
    )?;
    let mut rate = Vec::with_capacity(3);
    rate_headers(&plan.rate_headers, &mut rate);
    for (k, v) in rate {
        resp.insert_header(k, v)?;
    }
    Ok(())
}

/// Sets the body's framing: its length when known, else chunked (an HTTP/2 client's
/// connection drops the header itself).
fn framing(resp: &mut ResponseHeader, body_len: Option<usize>) -> Result<()> {
    match body_len {
        Some(n) => resp.insert_header("content-length", n.to_string()),
        None => resp.insert_header("transfer-encoding", "chunked"),
    }
}

/// The client's header for a provider's answer, whatever HTTP version it came in.
pub(super) fn upstream_header(
    upstream: &ResponseHeader,
    plan: &Plan,
    model: &str,
    provider: &str,
    attempts: u8,
    body_len: Option<usize>,
) -> Result<Box<ResponseHeader>> {
    let mut resp = upstream.clone();
    resp.set_version(http::Version::HTTP_11);
    for h in UPSTREAM_ONLY {
        resp.remove_header(*h);
    }
    framing(&mut resp, body_len)?;
    decorate(&mut resp, plan, model, provider, attempts, false)?;
    Ok(Box::new(resp))
}

/// The client's header for an answer from the cache; one past its TTL says so.
pub(super) fn stored_header(
    plan: &Plan,
    answer: &Answer,
    content_type: Option<http::HeaderValue>,
    body_len: Option<usize>,
    attempts: u8,
    stale: bool,
) -> Result<Box<ResponseHeader>> {
    let mut resp = ResponseHeader::build(200, Some(14))?;
    if let Some(ct) = content_type {
        resp.insert_header("content-type", ct)?;
    }
    framing(&mut resp, body_len)?;
    decorate(
        &mut resp,
        plan,
        &answer.model,
        &answer.provider,
        attempts,
        true,
    )?;
    if stale {
        resp.insert_header("x-gateway-cache-stale", "true")?;
        resp.insert_header("warning", "110 - \"Response is Stale\"")?;
    }
    Ok(Box::new(resp))
}
