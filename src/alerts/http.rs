//! The webhook POST: hyper's client on rustls (ring), the same stack the ClickHouse
//! client already brings, so `https://` receivers work with no new crates. Receivers'
//! certificates are verified against the system roots (`SSL_CERT_FILE` /
//! `SSL_CERT_DIR` replace them), as upstream providers' are: an on-call receiver
//! behind a company CA must work with the same trust store the providers use. Only
//! the delivery task calls it; a receiver that hangs costs that task one
//! [`post_timeout`] per try, and a request nothing.

use crate::config::Webhook;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::time::Duration;

/// The longest one POST may take, connect to last byte of the answer. A receiver
/// slower than that is treated as down and retried with backoff.
const POST_TIMEOUT: Duration = Duration::from_secs(10);

/// [`POST_TIMEOUT`], or `LLM_GATEWAY_ALERT_TIMEOUT_MS` (tests of a hung receiver).
pub fn post_timeout() -> Duration {
    std::env::var("LLM_GATEWAY_ALERT_TIMEOUT_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .map_or(POST_TIMEOUT, Duration::from_millis)
}

/// A client TLS config on the system roots; the bundled Mozilla roots only when the
/// system has none (a minimal container), so https receivers never fail for want of
/// a trust store.
fn tls_config() -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    if let Ok(certs) = pingora_rustls::load_native_certs() {
        let _ = roots.add_parsable_certificates(certs);
    }
    if roots.is_empty() {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("alerts: TLS set-up: {e}"))
    .map(|b| b.with_root_certificates(roots).with_no_client_auth())
}

#[derive(Clone)]
pub struct Poster {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
}

impl Poster {
    pub fn new() -> Result<Poster, String> {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config()?)
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(https);
        Ok(Poster {
            client,
            timeout: post_timeout(),
        })
    }

    /// POSTs `body`; `Ok(status)` for any answer (the caller decides what a non-2xx
    /// means), `Err` for no answer within the timeout.
    pub async fn post(
        &self,
        hook: &Webhook,
        body: Vec<u8>,
        signature: Option<String>,
    ) -> Result<u16, String> {
        let mut req = http::Request::post(hook.url.original.as_str())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::USER_AGENT, "llm-gateway-alerts");
        if let Some(sig) = signature {
            req = req.header("x-gateway-signature", sig);
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| format!("bad request: {e}"))?;
        let call = async {
            let resp = self.client.request(req).await.map_err(|e| format!("{e}"))?;
            let status = resp.status().as_u16();
            // Read the answer to its end so the connection can be reused.
            let _ = resp.into_body().collect().await;
            Ok::<u16, String>(status)
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {} ms", self.timeout.as_millis())),
        }
    }
}
