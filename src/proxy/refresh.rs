//! Background checks of the proxy's shared state: other nodes' cooldowns brought into
//! this node's pool, and the spend guards evaluated.

use super::Gateway;
use crate::limits::Limits;
use crate::routing::pool::Pool;
use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;

/// Reads the cooldowns other nodes wrote, every [`crate::limits::COOLDOWN_POLL`]
/// (only with Redis counters: alone, a node knows every cooldown already).
pub struct Refresher {
    pub gateway: Gateway,
}

#[async_trait]
impl BackgroundService for Refresher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let limits: &Limits = &self.gateway.limits;
        if !limits.shares_cooldowns() {
            // Alone, a node knows every cooldown already; wait for the end quietly.
            let _ = shutdown.changed().await;
            return;
        }
        let mut tick = tokio::time::interval(crate::limits::COOLDOWN_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            let cfg = self.gateway.config();
            let keys = Pool::keys(&cfg);
            if let Some(until) = limits.shared_cooldowns(&keys).await {
                self.gateway.pool.absorb(&keys, &until);
            }
        }
    }
}

/// Evaluates every guarded tenant's spend guard each [`crate::limits::GUARD_TICK`],
/// and reports each change: a log line, the `guard_engaged` / `guard_cleared` alert.
pub struct GuardWatch {
    pub gateway: Gateway,
}

#[async_trait]
impl BackgroundService for GuardWatch {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(crate::limits::GUARD_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            let cfg = self.gateway.config();
            if !cfg.tenants.iter().any(|t| t.guard.is_some()) {
                continue;
            }
            for change in self.gateway.limits.check_guards(&cfg.tenants).await {
                self.gateway.guard_changed(&change);
            }
        }
    }
}
