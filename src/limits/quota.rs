//! Deployment quotas and cooldowns in the counter store.
//!
//! A deployment's `rpm`/`tpm` is its provider account's quota, so it is counted where
//! every node sees it: with `counters.backend: redis`, one script per attempt
//! (`quota.lua`) takes a request and the prompt's estimated tokens from the current
//! UTC minute only if both fit, and the tokens are corrected to the provider's usage
//! when the call ends. Nodes together therefore never send a deployment more than
//! `rpm` requests in a minute. In memory the same counts are this node's alone.
//!
//! Cooldowns (a provider said "not before T") are kept on each node
//! (`routing::pool`) and, on Redis, also written to `llmgw:dep:{KEY}:cd` with a TTL;
//! every node reads them back every [`COOLDOWN_POLL`] and the quota script reports
//! them, so a cooldown one node saw parks the deployment on all of them.
//!
//! Redis keys, per deployment (`provider/upstream_model`):
//!
//! | key | holds | expires |
//! |---|---|---|
//! | `llmgw:dep:{KEY}:r:MINUTE` | requests sent in that UTC minute | 2 minutes |
//! | `llmgw:dep:{KEY}:t:MINUTE` | tokens of those requests | 2 minutes |
//! | `llmgw:dep:{KEY}:cd` | cooldown until, Unix ms | at that time |
//!
//! When Redis cannot be reached the node's own counts decide: a deployment is never
//! skipped because the counter store is down (that would turn a Redis outage into a
//! provider outage); its quota then holds per node only, until Redis is back.

use super::Limits;
use crate::config::Deployment;
use redis::Script;
use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

static QUOTA: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("quota.lua")));
/// Writes a cooldown unless a later one is there: another node's longer wait stands.
static COOL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "local c = tonumber(redis.call('GET', KEYS[1]) or '0') \
         if tonumber(ARGV[1]) > c then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) end \
         return 0",
    )
});

/// How often a node reads the cooldowns other nodes wrote.
pub const COOLDOWN_POLL: Duration = Duration::from_millis(250);
const MINUTE_MS: u64 = 60_000;
const KEEP_MS: u64 = 2 * MINUTE_MS;

/// What a deployment's quota said to one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// Counted: the attempt may go. `minute` is where its tokens were counted, for
    /// the correction at its end.
    Taken { minute: u64 },
    /// At its quota for this minute: skip it until the minute ends.
    Full { retry_after_ms: u64 },
    /// Another node saw the provider ask for a pause, until this Unix ms.
    CoolingDown { until_ms: u64 },
}

/// One deployment's counts in one minute.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MinuteUse {
    pub minute: u64,
    pub requests: u64,
    pub tokens: u64,
}

/// This node's own counts (the whole truth in memory, the fallback on Redis).
#[derive(Debug, Default)]
pub(super) struct Local {
    map: Mutex<HashMap<String, MinuteUse>>,
}

impl Local {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, MinuteUse>> {
        match self.map.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn take(&self, dep: &Deployment, tokens: u64, minute: u64) -> bool {
        let mut m = self.lock();
        let u = m.entry(dep.key.clone()).or_default();
        if u.minute != minute {
            *u = MinuteUse {
                minute,
                ..MinuteUse::default()
            };
        }
        if fits(dep, u.requests, u.tokens, tokens) {
            u.requests += 1;
            u.tokens += tokens;
            true
        } else {
            false
        }
    }

    fn adjust(&self, key: &str, minute: u64, delta: i64) {
        if let Some(u) = self.lock().get_mut(key).filter(|u| u.minute == minute) {
            u.tokens = u.tokens.saturating_add_signed(delta);
        }
    }

    fn get(&self, key: &str, minute: u64) -> MinuteUse {
        let u = self.lock().get(key).copied().unwrap_or_default();
        if u.minute == minute {
            u
        } else {
            MinuteUse {
                minute,
                ..MinuteUse::default()
            }
        }
    }
}

/// The quota rule, as `quota.lua` has it.
fn fits(dep: &Deployment, requests: u64, tokens_used: u64, tokens: u64) -> bool {
    let rpm_ok = dep.rpm.is_none_or(|rpm| requests < rpm);
    let tpm_ok = dep
        .tpm
        .is_none_or(|tpm| tokens_used == 0 || tokens_used.saturating_add(tokens) <= tpm);
    rpm_ok && tpm_ok
}

fn key(dep_key: &str, rest: &str) -> String {
    format!("llmgw:dep:{{{dep_key}}}:{rest}")
}

fn opt(v: Option<u64>) -> i64 {
    v.map_or(-1, |v| v.min(i64::MAX as u64) as i64)
}

impl Limits {
    /// Counts an attempt at `dep` (one request and the prompt's `tokens`) if its quota
    /// has room this minute. Deployments without a quota are not counted at all.
    pub async fn take_quota(&self, dep: &Deployment, tokens: u64) -> Take {
        let now = (self.inner.clock)();
        let minute = now / MINUTE_MS;
        let full = Take::Full {
            retry_after_ms: (minute + 1) * MINUTE_MS - now,
        };
        if !dep.has_quota() {
            return Take::Taken { minute };
        }
        let Some(shared) = &self.inner.shared else {
            return if self.inner.quota.take(dep, tokens, minute) {
                Take::Taken { minute }
            } else {
                full
            };
        };
        let mut inv = QUOTA.prepare_invoke();
        inv.key(key(&dep.key, &format!("r:{minute}")))
            .key(key(&dep.key, &format!("t:{minute}")))
            .key(key(&dep.key, "cd"))
            .arg(opt(dep.rpm))
            .arg(opt(dep.tpm))
            .arg(tokens.min(i64::MAX as u64))
            .arg(KEEP_MS)
            .arg(now);
        match shared.conn.invoke::<(u8, u64, u64, u64)>(&inv).await {
            Ok((1, _, _, _)) => {
                // Mirrored, so that the node's view is current when Redis goes away.
                self.inner.quota.take(dep, tokens, minute);
                Take::Taken { minute }
            }
            Ok((_, _, _, until)) if until > now => Take::CoolingDown { until_ms: until },
            Ok(_) => full,
            Err(_) => {
                if self.inner.quota.take(dep, tokens, minute) {
                    Take::Taken { minute }
                } else {
                    full
                }
            }
        }
    }

    /// Corrects the tokens an attempt counted at `minute` by `delta` (the provider's
    /// usage minus the estimate), in the background: the answer does not wait for it.
    pub fn adjust_quota(&self, dep: &Deployment, minute: u64, delta: i64) {
        if dep.tpm.is_none() || delta == 0 {
            return;
        }
        self.inner.quota.adjust(&dep.key, minute, delta);
        if let Some(shared) = self.inner.shared.clone() {
            let k = key(&dep.key, &format!("t:{minute}"));
            tokio::spawn(async move {
                let mut pipe = redis::pipe();
                pipe.cmd("INCRBY").arg(&k).arg(delta).ignore();
                pipe.cmd("PEXPIRE").arg(&k).arg(KEEP_MS).ignore();
                let _ = shared.conn.query::<()>(&pipe).await;
            });
        }
    }

    /// Tells every node that `dep` must not be called before `until_ms`.
    pub fn share_cooldown(&self, dep_key: &str, until_ms: u64) {
        let Some(shared) = self.inner.shared.clone() else {
            return;
        };
        let now = (self.inner.clock)();
        if until_ms <= now {
            return;
        }
        let mut inv = COOL.prepare_invoke();
        inv.key(key(dep_key, "cd"))
            .arg(until_ms)
            .arg(until_ms - now);
        tokio::spawn(async move {
            let _ = shared.conn.invoke::<i64>(&inv).await;
        });
    }

    /// The cooldowns other nodes wrote for `keys` (Unix ms, 0 for none), or `None`
    /// without Redis or when it cannot be read.
    pub async fn shared_cooldowns(&self, keys: &[&str]) -> Option<Vec<u64>> {
        let shared = self.inner.shared.as_ref()?;
        if keys.is_empty() {
            return Some(Vec::new());
        }
        let mut pipe = redis::pipe();
        let mget = pipe.cmd("MGET");
        for k in keys {
            mget.arg(key(k, "cd"));
        }
        let (v,): (Vec<Option<u64>>,) = shared.conn.query(&pipe).await.ok()?;
        Some(v.into_iter().map(Option::unwrap_or_default).collect())
    }

    /// Whether cooldowns are shared with other nodes (Redis counters).
    pub fn shares_cooldowns(&self) -> bool {
        self.inner.shared.is_some()
    }

    /// This minute's requests and tokens sent to each of `deps`, for the admin API.
    pub async fn quota_use(&self, deps: &[&Deployment]) -> Vec<MinuteUse> {
        let now = (self.inner.clock)();
        let minute = now / MINUTE_MS;
        let local = || {
            deps.iter()
                .map(|d| self.inner.quota.get(&d.key, minute))
                .collect::<Vec<_>>()
        };
        let Some(shared) = &self.inner.shared else {
            return local();
        };
        let mut pipe = redis::pipe();
        for d in deps {
            pipe.cmd("GET").arg(key(&d.key, &format!("r:{minute}")));
            pipe.cmd("GET").arg(key(&d.key, &format!("t:{minute}")));
        }
        match shared.conn.query::<Vec<Option<i64>>>(&pipe).await {
            Ok(v) => v
                .chunks(2)
                .map(|c| MinuteUse {
                    minute,
                    requests: c[0].unwrap_or(0).max(0) as u64,
                    tokens: c.get(1).copied().flatten().unwrap_or(0).max(0) as u64,
                })
                .collect(),
            Err(_) => local(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::translate_fixtures as fx;

    fn dep(rpm: Option<u64>, tpm: Option<u64>) -> Deployment {
        let mut m = fx::model(crate::config::ProviderKind::OpenAi, None);
        let d = fx::dep_mut(&mut m);
        d.rpm = rpm;
        d.tpm = tpm;
        d.clone()
    }

    #[test]
    fn a_minute_holds_rpm_requests_and_tpm_tokens() {
        let local = Local::default();
        let d = dep(Some(3), None);
        let taken = (0..5).filter(|_| local.take(&d, 10, 7)).count();
        assert_eq!(taken, 3);
        assert!(local.take(&d, 10, 8), "the next minute starts afresh");

        let d = dep(None, Some(100));
        assert!(
            local.take(&d, 500, 1),
            "alone above the tpm, in an empty minute"
        );
        assert!(!local.take(&d, 1, 1));
        let d2 = dep(None, Some(100));
        let local = Local::default();
        assert!(local.take(&d2, 60, 1));
        assert!(!local.take(&d2, 60, 1));
        local.adjust(&d2.key, 1, -30);
        assert!(local.take(&d2, 60, 1), "corrected to the provider's usage");
        assert_eq!(local.get(&d2.key, 1).tokens, 90);
        assert_eq!(
            local.get(&d2.key, 2),
            MinuteUse {
                minute: 2,
                ..Default::default()
            }
        );
    }
}
