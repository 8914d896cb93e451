//! The client's side of an attempt: where its answer goes, and whether it is still there.
//!
//! The request path writes through this trait rather than to Pingora's `Session`, so
//! the chain, the hold-back and failover run in `cargo test` against a recording
//! client (`tests.rs`) exactly as they run against a real connection.

use async_trait::async_trait;
use pingora_core::protocols::http::HttpTask;
use pingora_proxy::Session;

#[async_trait]
pub trait Client: Send {
    /// Writes response tasks in order; `false` when the client can no longer be written to.
    async fn send(&mut self, tasks: Vec<HttpTask>) -> bool;

    /// Resolves once the client has gone away; never while it is still connected.
    /// Cancel-safe: it is raced against upstream reads.
    async fn gone(&mut self);
}

#[async_trait]
impl Client for Session {
    async fn send(&mut self, tasks: Vec<HttpTask>) -> bool {
        self.write_response_tasks(tasks).await.is_ok()
    }

    async fn gone(&mut self) {
        // The body was read whole before any attempt, so the only thing the client can
        // still send is the end of its connection.
        if self
            .downstream_session
            .read_body_or_idle(true)
            .await
            .is_ok()
        {
            std::future::pending::<()>().await;
        }
    }
}
