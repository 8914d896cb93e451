//! The webhook POST: hyper's client on rustls (ring, Mozilla roots), the same stack
//! the ClickHouse client already brings, so `https://` receivers work with no new
//! crates. Only the delivery task calls it; a receiver that hangs costs that task one
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

#[derive(Clone)]
pub struct Poster {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
}

impl Poster {
    pub fn new() -> Result<Poster, String> {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .map_err(|e| format!("alerts: TLS set-up: {e}"))?
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
