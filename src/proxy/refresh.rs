//! The background task that brings other nodes' cooldowns into this node's pool.

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
