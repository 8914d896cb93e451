//! The live state of every deployment on this node, and the order a model's
//! deployments are tried in.
//!
//! Per deployment (keyed `provider/upstream_model`, so it survives reloads and is
//! shared by models that name the same one): requests in flight here, a moving
//! average of time to first token, and the cooldown a provider asked for. Reading it
//! is a few atomic loads; nothing on this path waits on I/O. Cooldowns seen by other
//! nodes arrive through [`Pool::absorb`], which the background refresher
//! (`proxy::refresh`) feeds from the counter store.

use crate::config::{Balance, Config, Deployment, Model};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// One deployment's live state.
#[derive(Debug, Default)]
pub struct Live {
    in_flight: AtomicU32,
    /// Microseconds; 0 until the first answer.
    ewma_ttft_us: AtomicU64,
    /// Unix ms before which the provider asked not to be called; 0 for none.
    cooldown_until_ms: AtomicU64,
}

impl Live {
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn ewma_ttft(&self) -> Option<Duration> {
        match self.ewma_ttft_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// Unix ms the deployment is parked until, if it still is at `now_ms`.
    pub fn cooling_until(&self, now_ms: u64) -> Option<u64> {
        let until = self.cooldown_until_ms.load(Ordering::Relaxed);
        (until > now_ms).then_some(until)
    }

    /// Parks the deployment until `until_ms`, unless a longer wait is already set.
    pub fn cool_until(&self, until_ms: u64) {
        self.cooldown_until_ms
            .fetch_max(until_ms, Ordering::Relaxed);
    }

    /// Folds one time to first token into the average (weight 1/5: a few slow
    /// answers move it, one does not dominate it).
    pub fn record_ttft(&self, ttft: Duration) {
        let x = (ttft.as_micros() as u64).max(1);
        let _ = self
            .ewma_ttft_us
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                Some(if old == 0 { x } else { (old * 4 + x) / 5 })
            });
    }

    /// Counts an attempt in flight until the guard drops.
    pub fn enter(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Busy(self.clone())
    }
}

/// An attempt in flight on a deployment.
#[derive(Debug)]
pub struct Busy(Arc<Live>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A deployment of a chain's model, with its live state, in trying order.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub dep: Arc<Deployment>,
    pub live: Arc<Live>,
}

/// Every deployment's live state on this node.
#[derive(Debug, Default)]
pub struct Pool {
    map: RwLock<HashMap<String, Arc<Live>>>,
}

impl Pool {
    pub fn live(&self, dep: &Deployment) -> Arc<Live> {
        self.by_key(&dep.key)
    }

    fn by_key(&self, key: &str) -> Arc<Live> {
        if let Some(l) = read(&self.map).get(key) {
            return l.clone();
        }
        let mut m = match self.map.write() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        m.entry(key.to_string()).or_default().clone()
    }

    /// `model`'s deployments in `region` (all without a pin), in the order its
    /// `balance` tries them now.
    pub fn order(&self, model: &Model, region: Option<&str>) -> Vec<Candidate> {
        let mut v: Vec<(usize, Candidate)> = model
            .deployments
            .iter()
            .filter(|d| region.is_none_or(|r| d.provider.region == r))
            .enumerate()
            .map(|(i, d)| {
                let c = Candidate {
                    dep: d.clone(),
                    live: self.live(d),
                };
                (i, c)
            })
            .collect();
        if v.len() > 1 {
            match model.balance {
                Balance::LeastBusy => v.sort_by_key(|(i, c)| {
                    (c.live.in_flight(), std::cmp::Reverse(c.dep.weight), *i)
                }),
                Balance::LowestLatency => v.sort_by_key(|(i, c)| {
                    // Untried first (0), so every deployment gets measured.
                    let ewma = c.live.ewma_ttft_us.load(Ordering::Relaxed);
                    (ewma, c.live.in_flight(), *i)
                }),
                Balance::Weighted => weighted_shuffle(&mut v),
            }
        }
        v.into_iter().map(|(_, c)| c).collect()
    }

    /// Applies cooldowns another node wrote (Unix ms per key, 0 for none).
    pub fn absorb(&self, keys: &[&str], until_ms: &[u64]) {
        for (k, &until) in keys.iter().zip(until_ms) {
            if until == 0 {
                continue;
            }
            // Also for a deployment this node has not used yet: its first request
            // must already skip it.
            self.by_key(k).cool_until(until);
        }
    }

    /// Every configured deployment's key, once each.
    pub fn keys(cfg: &Config) -> Vec<&str> {
        let mut keys: Vec<&str> = cfg
            .models
            .iter()
            .flat_map(|m| m.deployments.iter().map(|d| d.key.as_str()))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        keys
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    match l.read() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// A random order in which each deployment comes first in proportion to its weight
/// (Efraimidis-Spirakis: sort by `u^(1/w)`, highest first); the rest follow likewise.
fn weighted_shuffle(v: &mut [(usize, Candidate)]) {
    let mut keyed: Vec<(f64, usize)> = v
        .iter()
        .enumerate()
        .map(|(pos, (_, c))| {
            let u: f64 = rand::random::<f64>().max(f64::MIN_POSITIVE);
            (u.powf(1.0 / f64::from(c.dep.weight.max(1))), pos)
        })
        .collect();
    keyed.sort_by(|a, b| b.0.total_cmp(&a.0));
    let order: Vec<usize> = keyed.into_iter().map(|(_, pos)| pos).collect();
    let taken: Vec<(usize, Candidate)> = order.iter().map(|&p| v[p].clone()).collect();
    v.clone_from_slice(&taken);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::translate_fixtures as fx;

    fn model(balance: Balance, weights: &[u32]) -> Model {
        let mut m = fx::model(crate::config::ProviderKind::OpenAi, None);
        let base = m.deployments[0].clone();
        m.deployments = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                let mut d = (*base).clone();
                d.upstream_model = format!("up{i}");
                d.key = format!("p/up{i}");
                d.weight = w;
                Arc::new(d)
            })
            .collect();
        m.balance = balance;
        m
    }

    fn names(v: &[Candidate]) -> Vec<&str> {
        v.iter().map(|c| c.dep.upstream_model.as_str()).collect()
    }

    #[test]
    fn least_busy_prefers_the_idle_then_the_heavier() {
        let pool = Pool::default();
        let m = model(Balance::LeastBusy, &[1, 3, 1]);
        assert_eq!(names(&pool.order(&m, None)), ["up1", "up0", "up2"]);
        let busy = pool.live(&m.deployments[1]).enter();
        assert_eq!(names(&pool.order(&m, None)), ["up0", "up2", "up1"]);
        drop(busy);
        assert_eq!(pool.live(&m.deployments[1]).in_flight(), 0);
    }

    #[test]
    fn lowest_latency_tries_the_unmeasured_then_the_fastest() {
        let pool = Pool::default();
        let m = model(Balance::LowestLatency, &[1, 1, 1]);
        pool.live(&m.deployments[0])
            .record_ttft(Duration::from_millis(50));
        pool.live(&m.deployments[2])
            .record_ttft(Duration::from_millis(10));
        assert_eq!(names(&pool.order(&m, None)), ["up1", "up2", "up0"]);
        let l = pool.live(&m.deployments[2]);
        l.record_ttft(Duration::from_millis(60));
        assert_eq!(l.ewma_ttft(), Some(Duration::from_millis(20)));
    }

    #[test]
    fn weighted_follows_the_weights() {
        let pool = Pool::default();
        let m = model(Balance::Weighted, &[3, 1]);
        let n = 20_000;
        let first0 = (0..n)
            .filter(|_| pool.order(&m, None)[0].dep.upstream_model == "up0")
            .count();
        let share = first0 as f64 / n as f64;
        assert!((share - 0.75).abs() < 0.02, "{share}");
    }

    #[test]
    fn a_region_pin_leaves_out_other_regions() {
        let pool = Pool::default();
        let mut m = model(Balance::LeastBusy, &[1, 1]);
        let d = Arc::make_mut(&mut m.deployments[1]);
        let mut p = (*d.provider).clone();
        p.region = "eu".into();
        d.provider = Arc::new(p);
        assert_eq!(names(&pool.order(&m, Some("eu"))), ["up1"]);
        assert_eq!(names(&pool.order(&m, Some("test"))), ["up0"]);
        assert!(pool.order(&m, Some("mars")).is_empty());
    }

    #[test]
    fn another_node_s_cooldown_applies_to_a_deployment_not_used_here_yet() {
        let pool = Pool::default();
        let m = model(Balance::LeastBusy, &[1, 1]);
        pool.absorb(&["p/up1", "p/up0"], &[9_000, 0]);
        assert_eq!(
            pool.live(&m.deployments[1]).cooling_until(1_000),
            Some(9_000)
        );
        assert_eq!(pool.live(&m.deployments[0]).cooling_until(1_000), None);
    }

    #[test]
    fn cooldowns_only_grow_and_lapse() {
        let l = Live::default();
        l.cool_until(5_000);
        l.cool_until(3_000);
        assert_eq!(l.cooling_until(4_000), Some(5_000));
        assert_eq!(l.cooling_until(5_000), None);
    }
}
