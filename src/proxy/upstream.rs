//! Talking to one provider: its peer, the request header it gets, and what its
//! failures mean.
//!
//! Attempts drive `pingora_core`'s HTTP connector and its connection pools directly
//! (`attempt.rs`), so everything a `ProxyHttp` would have configured through hooks is
//! decided here instead: addresses (resolved off the hot path, `dns.rs`), timeouts,
//! ALPN, and the header rewritten for the provider.

use super::dns::Resolver;
use crate::config::Provider;
use crate::error::{ErrorKind, GatewayError};
use crate::metrics::AttemptResult;
use crate::providers::UpstreamRequest;
use http::{HeaderName, HeaderValue};
use pingora::prelude::*;
use pingora_core::protocols::ALPN;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_http::RequestHeader;
use std::time::Duration;

/// How long an idle pooled connection to a provider is kept.
const POOL_IDLE: Duration = Duration::from_secs(60);

/// Concurrent streams one HTTP/2 connection to a provider may carry before the
/// connector opens another.
const H2_STREAMS: usize = 100;

pub(super) fn pool_idle() -> Option<Duration> {
    Some(POOL_IDLE)
}

fn ms(v: u64) -> Option<Duration> {
    Some(Duration::from_millis(v))
}

/// The ALPN offered to `p`: HTTP/2 and 1.1 to a TLS provider unless its `http2` is
/// `off`; plain-text providers get HTTP/1.1 (there is nothing to negotiate with).
fn alpn(p: &Provider) -> ALPN {
    if p.base_url.tls && p.http2 {
        ALPN::H2H1
    } else {
        ALPN::H1
    }
}

/// The peer for one attempt at provider `p`.
pub(super) async fn peer(resolver: &Resolver, p: &Provider) -> Result<HttpPeer, GatewayError> {
    let addrs = resolver
        .resolve(&p.base_url.host, p.base_url.port)
        .await
        .map_err(|e| {
            GatewayError::new(
                ErrorKind::UpstreamUnavailable,
                format!("cannot resolve {}: {e}", p.base_url.host),
            )
            .with_retry_after(1)
        })?;
    let addr = *addrs.first().ok_or_else(|| {
        GatewayError::new(
            ErrorKind::UpstreamUnavailable,
            format!("{} has no address", p.base_url.host),
        )
        .with_retry_after(1)
    })?;
    let mut peer = HttpPeer::new(addr, p.base_url.tls, p.base_url.host.clone());
    let t = &p.timeouts;
    peer.options.connection_timeout = ms(t.connect_ms);
    peer.options.total_connection_timeout = ms(t.connect_ms);
    // Every read waits at most the idle gap; the first-token and total deadlines are
    // the attempt's own (`attempt.rs`), since only it knows which one applies.
    peer.options.read_timeout = ms(t.idle_ms);
    peer.options.write_timeout = ms(t.idle_ms);
    peer.options.idle_timeout = pool_idle();
    peer.options.alpn = alpn(p);
    peer.options.max_h2_streams = H2_STREAMS;
    Ok(peer)
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
    "content-type",
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

/// The client's headers that every attempt forwards (its `user-agent`, `openai-beta`,
/// ...), picked once per request.
pub(super) fn forwarded(req: &RequestHeader) -> Vec<(HeaderName, HeaderValue)> {
    req.headers
        .iter()
        .filter(|(k, _)| !STRIPPED.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The request header one attempt sends to provider `p`.
pub(super) fn request_header(
    p: &Provider,
    up: &UpstreamRequest,
    forward: &[(HeaderName, HeaderValue)],
    request_id: &str,
) -> Result<Box<RequestHeader>> {
    let base = &p.base_url;
    let path = format!("{}{}", base.path_prefix, up.path);
    let mut req = RequestHeader::build("POST", path.as_bytes(), Some(forward.len() + 8))?;
    for (k, v) in forward {
        req.append_header(k.clone(), v.clone())?;
    }
    let default_port = if base.tls { 443 } else { 80 };
    if base.port == default_port {
        req.insert_header("host", base.host.as_str())?;
    } else {
        req.insert_header("host", format!("{}:{}", base.host, base.port))?;
    }
    req.insert_header("content-type", "application/json")?;
    req.insert_header("content-length", up.body.len().to_string())?;
    if !request_id.is_empty() {
        req.insert_header("x-request-id", request_id)?;
    }
    for (k, v) in &up.headers {
        req.insert_header(*k, v.as_str())?;
    }
    Ok(Box::new(req))
}

/// What a Pingora failure talking to the provider means for the client and the metric.
pub(super) fn classify(e: &Error, connecting: bool) -> (GatewayError, AttemptResult) {
    use ErrorType::*;
    let (kind, msg, result) = match e.etype() {
        ConnectTimedout | TLSHandshakeTimedout => (
            ErrorKind::UpstreamTimeout,
            "the upstream did not accept the connection in time",
            AttemptResult::Connect,
        ),
        ReadTimedout | WriteTimedout => (
            ErrorKind::UpstreamTimeout,
            "the upstream did not answer in time",
            AttemptResult::IdleTimeout,
        ),
        ConnectRefused | ConnectNoRoute | ConnectError | TLSHandshakeFailure
        | ConnectProxyFailure | SocketError | BindError | InvalidCert => (
            ErrorKind::UpstreamUnavailable,
            "the upstream could not be reached",
            AttemptResult::Connect,
        ),
        ConnectionClosed | ReadError | WriteError | H2Error | H2Downgrade => (
            ErrorKind::UpstreamUnavailable,
            "the upstream closed the connection",
            if connecting {
                AttemptResult::Connect
            } else {
                AttemptResult::Reset
            },
        ),
        _ => (
            ErrorKind::BadUpstreamResponse,
            "the upstream sent an invalid response",
            AttemptResult::BadResponse,
        ),
    };
    let ge = GatewayError::new(kind, msg);
    let ge = if kind == ErrorKind::UpstreamUnavailable {
        ge.with_retry_after(1)
    } else {
        ge
    };
    (ge, result)
}

/// Whether a failure on a pooled connection before any response byte means only that
/// the provider had closed it meanwhile: then the same provider is tried again at once
/// on a fresh connection, which is not a new attempt.
pub(super) fn stale_pooled(e: &Error) -> bool {
    matches!(e.retry, RetryType::ReusedOnly) || {
        use ErrorType::*;
        matches!(
            e.etype(),
            ConnectionClosed | ReadError | WriteError | H2Error
        )
    }
}

/// The audit `error_code` of a provider's own error answer: the contract's code for
/// its status, the same whichever format the client's body is in (Anthropic bodies
/// carry no code, and provider codes are not the contract's).
pub(super) fn client_error_code(status: u16) -> &'static str {
    let kind = match status {
        401 => ErrorKind::InvalidApiKey,
        403 => ErrorKind::ModelNotAllowed,
        404 => ErrorKind::ModelNotFound,
        413 => ErrorKind::RequestTooLarge,
        _ => ErrorKind::InvalidRequest,
    };
    kind.code()
}

/// The seconds a 429/5xx asks the client to wait (`retry-after` in seconds), 1 if unsaid.
pub(super) fn retry_after_s(resp: &pingora_http::ResponseHeader) -> u64 {
    resp.headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ProviderKind;
    use crate::error::ApiFormat;
    use crate::providers::translate_fixtures as fx;
    use crate::providers::{prepare, ClientRequest};
    use std::sync::Arc;

    #[test]
    fn azure_path_keeps_the_base_url_prefix_and_its_query() {
        let mut model = fx::model(ProviderKind::AzureOpenAi, None);
        let dep = fx::dep_mut(&mut model);
        dep.upstream_model = "dep1".into();
        let mut provider = (*dep.provider).clone();
        provider.base_url.path_prefix = "/azure".into();
        dep.provider = Arc::new(provider);
        let req = ClientRequest::parse(
            ApiFormat::OpenAi,
            br#"{"model":"x","messages":[{"role":"user","content":"hi"}]}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let up = prepare(&req, fx::target(&model)).unwrap_or_else(|e| panic!("{e}"));
        let h = request_header(&model.deployments[0].provider, &up, &[], "r1")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            h.uri.path(),
            "/azure/openai/deployments/dep1/chat/completions"
        );
        assert_eq!(h.uri.query(), Some("api-version=2024-10-21"));
        assert_eq!(
            h.headers.get("api-key").and_then(|v| v.to_str().ok()),
            Some("sk-test")
        );
        assert!(h.headers.get("authorization").is_none());
    }
}
