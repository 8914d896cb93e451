//! Ends the process as soon as a graceful stop has nothing left to wait for.
//!
//! On SIGTERM (and on SIGQUIT, after the listeners went to the new process of a
//! graceful upgrade) Pingora 0.9.1 stops accepting, broadcasts its shutdown watch
//! and then sleeps `grace_period_seconds` unconditionally before it stops the
//! runtimes: `Server::run` has no hook to end that sleep early, and its
//! `ShutdownSignalWatch` only picks the kind of shutdown. So an idle gateway took
//! the whole grace period (30 s by default) to stop. This background service waits
//! for the same broadcast, then for the last request in flight ([`crate::inflight`]),
//! for the audit rows to be on disk and for the ClickHouse shipper to catch up, and
//! exits the process itself; when
//! requests still run at the end of the grace period it does nothing, and Pingora
//! stops them as before.

use crate::audit::AuditLog;
use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use std::time::{Duration, Instant};

/// The background service; add it to the server beside the proxy.
pub struct ExitWhenIdle {
    pub audit: AuditLog,
    /// The server's `grace_period_seconds`.
    pub grace: Duration,
}

#[async_trait]
impl BackgroundService for ExitWhenIdle {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        if shutdown.wait_for(|stopping| *stopping).await.is_err() {
            return;
        }
        let deadline = Instant::now() + self.grace;
        let running = crate::inflight::count();
        if running > 0 {
            log::info!(
                "shutdown: waiting up to {} s for {running} request(s) in flight",
                self.grace.as_secs()
            );
        }
        if !crate::inflight::wait_idle(deadline).await {
            log::warn!(
                "shutdown: {} request(s) still in flight at the end of the grace period",
                crate::inflight::count()
            );
            return;
        }
        self.audit.flush(deadline).await;
        // Rows held back for a full batch or `flush_ms` ship on the way out, as they did
        // when the process waited out the grace period.
        if !self.audit.wait_shipped(deadline).await {
            log::warn!("shutdown: audit rows left unshipped; they ship at the next start");
        }
        log::info!("shutdown: no request in flight and the audit rows written; exiting");
        // Pingora's own end (`run_forever`) is `process::exit(0)` too, after the runtimes
        // stopped; nothing here needs their destructors.
        std::process::exit(0);
    }
}
