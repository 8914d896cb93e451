//! The response cache: which requests are cacheable, their keys, and the storage.
//!
//! The front decides here whether a request may use the cache and computes its key
//! once; the chain then uses [`Store`] (a `pingora-cache` storage) and pingora's cache
//! lock directly (`proxy/cache.rs`). What is stored is the answer as the client received
//! it (already in the endpoint's format, translated if the provider spoke another one),
//! so a hit replays bytes without knowing which provider produced them; [`Answer`]
//! rides along with each entry to say which model and provider that was and what usage
//! the provider reported, for the hit's headers and audit row.

pub mod key;
pub mod storage;

use crate::config::Tenant;
use crate::providers::Completion;
use pingora_cache::lock::{CacheKeyLockImpl, CacheLock};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
pub use storage::{Stats, Store, Stored};

/// How long one fill may hold the cache lock before waiting requests give up on it
/// and compete again. The lock is released as soon as the answer's header arrives
/// (readers then follow the fill), so this bounds the wait for a first byte.
const LOCK_AGE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long past its TTL an answer may still be served when every provider is down:
/// a day-old deterministic answer beats an error during an outage, an older one may
/// describe a world that changed.
pub const MAX_STALE: Duration = Duration::from_secs(24 * 3600);

/// Where an answer came from and what it cost originally; filled while it is written.
#[derive(Debug)]
pub struct Answer {
    pub model: String,
    pub provider: String,
    /// The deployment's name for the model, for the audit rows of hits.
    pub upstream_model: String,
    completion: Mutex<Option<Completion>>,
}

impl Answer {
    pub fn new(model: &str, provider: &str, upstream_model: &str) -> Self {
        Answer {
            model: model.to_string(),
            provider: provider.to_string(),
            upstream_model: upstream_model.to_string(),
            completion: Mutex::new(None),
        }
    }

    /// Records how the answer ended (set by the writer before its last byte is stored).
    pub fn set_completion(&self, c: Completion) {
        *self.completion.lock().unwrap_or_else(|p| p.into_inner()) = Some(c);
    }

    pub fn completion(&self) -> Option<Completion> {
        *self.completion.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Only answers that reached their proper end without an error are stored.
    pub fn complete(&self) -> bool {
        self.completion()
            .is_some_and(|c| c.complete && !c.upstream_error)
    }
}

/// A cacheable request: its key and how to use the cache.
#[derive(Debug, Clone)]
pub struct Lookup {
    pub digest: [u8; 32],
    pub tenant: String,
    pub ttl: Duration,
    /// `Cache-Control: no-cache`: skip the read, refresh the entry.
    pub refresh: bool,
}

/// The process's response cache.
pub struct ResponseCache {
    pub store: &'static Store,
    pub lock: &'static CacheKeyLockImpl,
    /// Per tenant, bumped by each purge: part of every key, so that a fill still in
    /// flight when the purge ran can never be read afterwards.
    generations: Mutex<HashMap<String, u64>>,
}

/// What [`ResponseCache::decide`] needs to know about the request.
pub struct RequestFacts<'a> {
    pub endpoint: &'a str,
    pub chain: &'a [(&'a str, &'a str)],
    pub headers: &'a [Option<&'a str>],
    pub cache_control: Option<&'a str>,
    pub body: &'a serde_json::Map<String, serde_json::Value>,
}

impl ResponseCache {
    /// One per process: pingora's storage and lock APIs take `'static` references, so
    /// both are leaked.
    pub fn new(max_bytes: u64) -> Self {
        let lock: &'static CacheKeyLockImpl = Box::leak(CacheLock::new_boxed(LOCK_AGE_TIMEOUT));
        ResponseCache {
            store: Box::leak(Box::new(Store::new(max_bytes))),
            lock,
            generations: Mutex::new(HashMap::new()),
        }
    }

    /// The lookup for a request, or `None` when it must bypass the cache.
    pub fn decide(
        &self,
        tenant: &Tenant,
        max_bytes: u64,
        req: &RequestFacts<'_>,
    ) -> Option<Lookup> {
        if !tenant.cache.enabled || max_bytes == 0 {
            return None;
        }
        let directive = key::Directive::parse(req.cache_control);
        if directive == key::Directive::NoStore || !key::deterministic(req.body) {
            return None;
        }
        let parts = key::KeyParts {
            tenant: &tenant.id,
            generation: self.generation(&tenant.id),
            endpoint: req.endpoint,
            chain: req.chain,
            headers: req.headers,
        };
        Some(Lookup {
            digest: key::digest(&parts, req.body),
            tenant: tenant.id.clone(),
            ttl: Duration::from_secs(tenant.cache.ttl_s),
            refresh: directive == key::Directive::NoCache,
        })
    }

    fn generation(&self, tenant: &str) -> u64 {
        let g = self.generations.lock().unwrap_or_else(|p| p.into_inner());
        g.get(tenant).copied().unwrap_or(0)
    }

    /// Drops every answer cached for `tenant`; returns how many entries were removed.
    pub fn purge(&self, tenant: &str) -> usize {
        {
            let mut g = self.generations.lock().unwrap_or_else(|p| p.into_inner());
            *g.entry(tenant.to_string()).or_insert(0) += 1;
        }
        self.store.purge_tenant(tenant)
    }

    /// The stored answer for `lookup`, also past its TTL (up to [`MAX_STALE`]), for
    /// when no provider can answer; never for a client that asked for a refresh.
    pub fn stale(&self, lookup: &Lookup) -> Option<Stored> {
        if lookup.refresh {
            return None;
        }
        let key = pingora_cache::CacheKey::new(lookup.digest.to_vec(), lookup.tenant.as_str());
        self.store.stale(&key, MAX_STALE)
    }

    pub fn stats(&self) -> Stats {
        self.store.stats()
    }
}

/// The `x-gateway-cache` value of a response.
pub fn header_value(lookup: Option<&Lookup>, hit: bool) -> &'static str {
    match (lookup, hit) {
        (_, true) => "hit",
        (Some(_), false) => "miss",
        (None, false) => "bypass",
    }
}
