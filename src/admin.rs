//! The admin listener: health, readiness and metrics for operators.
//!
//! Kept off the client listener so that it can be bound to loopback or a management
//! network only. `/admin/*` endpoints arrive with the operations issue.

use crate::proxy::Gateway;
use async_trait::async_trait;
use http::Response;
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;

pub struct Admin {
    gateway: Gateway,
}

impl Admin {
    pub fn new(gateway: Gateway) -> Self {
        Admin { gateway }
    }
}

fn reply(status: u16, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    let mut r = Response::new(body);
    *r.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    let len = r.body().len();
    r.headers_mut()
        .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    r
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        match path.as_str() {
            "/healthz" => reply(200, "text/plain", b"ok\n".to_vec()),
            "/readyz" => {
                // Serving means a valid config is loaded; it always is once we run.
                let cfg = self.gateway.config();
                let body = format!("ready tenants={}\n", cfg.tenants.len());
                reply(200, "text/plain", body.into_bytes())
            }
            "/metrics" => reply(200, "text/plain; version=0.0.4", Vec::new()),
            _ => reply(
                404,
                "application/json",
                br#"{"error":"not found"}"#.to_vec(),
            ),
        }
    }
}
