//! Responses the gateway writes itself: errors and small JSON documents.

use crate::error::{ApiFormat, GatewayError};
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
    error_with_attempts(session, e, format, request_id, None).await
}

/// As [`error`], also saying how many upstream attempts were made.
pub(super) async fn error_with_attempts(
    session: &mut Session,
    e: &GatewayError,
    format: ApiFormat,
    request_id: &str,
    attempts: Option<u8>,
) -> Result<()> {
    let mut extra = Vec::with_capacity(2);
    if let Some(secs) = e.retry_after {
        extra.push(("retry-after", secs.to_string()));
    }
    if let Some(n) = attempts {
        extra.push(("x-gateway-attempts", n.to_string()));
    }
    json(session, e.status(), e.body(format), request_id, &extra).await
}
