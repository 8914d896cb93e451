//! Responses the gateway writes itself: errors and small JSON documents.

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
