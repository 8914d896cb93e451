//! A total deadline for a request's head, which Pingora does not have.
//!
//! Pingora times out each read of a request head (60 s), not the head as a whole, so a
//! client sending one byte every 59 s could hold a connection for as long as its
//! headers may grow (1 MiB): a slowloris sender ties up descriptors for days. This
//! wrapper around the proxy gives every request head, from the moment the connection
//! waits for it (a new connection, or a kept-alive one after its last response), a
//! deadline (`LLM_GATEWAY_CLIENT_HEADER_TIMEOUT_MS`, default 60 s) and closes the
//! connection when it passes. The head counts as arrived when the first proxy hook
//! runs, which marks a task-local flag; a kept-alive connection idle past the deadline
//! is closed the same way, as a keep-alive timeout would. The body has its own
//! deadline (`parent.rs`).

use async_trait::async_trait;
use pingora_core::apps::{HttpServerApp, HttpServerOptions, ReusedHttpStream};
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::Stream;
use pingora_core::server::ShutdownWatch;
use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

tokio::task_local! {
    /// Set once the current request's head has been read.
    static HEAD_READ: Cell<bool>;
}

/// Marks the current request's head as read; outside a connection task (a test) it
/// does nothing.
pub(super) fn head_read() {
    let _ = HEAD_READ.try_with(|h| h.set(true));
}

fn header_timeout() -> Duration {
    static TIMEOUT: OnceLock<Duration> = OnceLock::new();
    *TIMEOUT.get_or_init(|| super::env_ms("LLM_GATEWAY_CLIENT_HEADER_TIMEOUT_MS", 60_000))
}

/// The proxy app, with a deadline on every request head.
pub struct HeadDeadline<A>(pub Arc<A>);

#[async_trait]
impl<A> HttpServerApp for HeadDeadline<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    // Written out rather than `async fn`: an async body would keep its own copy of the
    // session argument (680 bytes) beside the one the inner future holds, for the
    // connection's whole life; this way the session moves straight into the proxy's
    // (boxed) future and this one holds a pointer, the flag and the timer.
    fn process_new_http<'a, 'b, 'async_trait>(
        self: &'a Arc<Self>,
        session: ServerSession,
        shutdown: &'b ShutdownWatch,
    ) -> Pin<Box<dyn Future<Output = Option<ReusedHttpStream>> + Send + 'async_trait>>
    where
        'a: 'async_trait,
        'b: 'async_trait,
        Self: 'async_trait,
    {
        let inner = self.0.process_new_http(session, shutdown);
        Box::pin(HEAD_READ.scope(Cell::new(false), async move {
            tokio::select! {
                reused = inner => reused,
                _ = expired() => None,
            }
        }))
    }

    fn h2_options(&self) -> Option<pingora_core::protocols::http::v2::server::H2Options> {
        self.0.h2_options()
    }

    fn server_options(&self) -> Option<&HttpServerOptions> {
        self.0.server_options()
    }

    async fn http_cleanup(&self) {
        self.0.http_cleanup().await
    }

    async fn process_custom_session(
        self: Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        self.0
            .clone()
            .process_custom_session(stream, shutdown)
            .await
    }
}

/// Resolves when the deadline passed without the head read; never once it was read.
async fn expired() {
    tokio::time::sleep(header_timeout()).await;
    if HEAD_READ.try_with(Cell::get).unwrap_or(true) {
        std::future::pending::<()>().await;
    }
}
