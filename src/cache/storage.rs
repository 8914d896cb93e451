//! A bounded in-memory `pingora-cache` storage for complete answers.
//!
//! pingora's `MemCache` is for tests (unbounded, copies bodies on every read). This one
//! keeps each committed answer as one `Bytes` (a hit is a reference count, not a copy)
//! in sharded maps, and tracks it in `pingora-lru` weighted by its size, so the total
//! stays within `cache.max_bytes`: every commit evicts least-recently-used entries
//! until it fits. Fills in flight are readable while they are written, which is what
//! lets the cache lock hand one upstream answer to every concurrent identical request
//! as it streams. A fill is committed only when the answer it carries ended complete
//! (the proxy says so through [`Answer`]); a cut, failed or abandoned fill is dropped,
//! and readers still attached to it get an error instead of a silent clean end.

use super::Answer;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora_cache::key::{CacheHashKey, HashBinary};
use pingora_cache::storage::{
    HandleHit, HandleMiss, HitHandler, MissFinishType, MissHandler, PurgeOutcome, PurgeTarget,
};
use pingora_cache::trace::SpanHandle;
use pingora_cache::{CacheKey, CacheMeta, PurgeType, Storage};
use pingora_error::{Error, ErrorType, Result};
use pingora_http::ResponseHeader;
use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::SystemTime;
use tokio::sync::watch;

const SHARDS: usize = 16;
/// Bookkeeping charged to every entry on top of its body and header bytes.
const ENTRY_OVERHEAD: usize = 256;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A committed answer's body and origin, read outside pingora (stale serving).
pub struct Stored {
    pub content_type: Option<http::HeaderValue>,
    pub body: Bytes,
    pub answer: Arc<Answer>,
    /// Past its TTL (a fresh one is read this way when no attempt could look it up,
    /// e.g. every circuit of the chain is open).
    pub expired: bool,
}

/// A committed answer.
pub struct Entry {
    hash: HashBinary,
    tenant: Box<str>,
    header: ResponseHeader,
    created: SystemTime,
    fresh_until: SystemTime,
    body: Bytes,
    answer: Arc<Answer>,
}

impl Entry {
    fn weight(&self) -> usize {
        let headers: usize = self
            .header
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum();
        self.body.len() + headers + self.tenant.len() + ENTRY_OVERHEAD
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FillState {
    /// Still being written; the number is a version readers wait on.
    Open(u64),
    Done,
    /// The writer went away before the end: readers must not take it for complete.
    Aborted,
}

/// An answer being written.
struct Fill {
    hash: HashBinary,
    tenant: Box<str>,
    header: ResponseHeader,
    created: SystemTime,
    fresh_until: SystemTime,
    answer: Arc<Answer>,
    chunks: Mutex<Vec<Bytes>>,
    state: watch::Sender<FillState>,
}

impl Fill {
    fn meta(&self) -> CacheMeta {
        meta_of(
            self.created,
            self.fresh_until,
            self.header.clone(),
            &self.answer,
        )
    }
}

fn meta_of(
    created: SystemTime,
    fresh_until: SystemTime,
    header: ResponseHeader,
    answer: &Arc<Answer>,
) -> CacheMeta {
    let mut meta = CacheMeta::new(fresh_until, created, 0, 0, header);
    meta.extensions_mut().insert(answer.clone());
    meta
}

#[derive(Default)]
struct Fills {
    by_id: HashMap<u64, Arc<Fill>>,
    /// The newest fill of each key.
    by_key: HashMap<HashBinary, u64>,
}

/// Counters for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub bytes: usize,
    pub entries: usize,
    pub evictions: u64,
    /// Fills that ended incomplete (cut, failed, abandoned) and were not stored.
    pub discarded: u64,
}

/// The storage; one per process, leaked to the `'static` lifetime pingora wants.
pub struct Store {
    shards: [RwLock<HashMap<HashBinary, Arc<Entry>>>; SHARDS],
    lru: pingora_lru::Lru<Arc<Entry>, SHARDS>,
    fills: Mutex<Fills>,
    next_id: AtomicU64,
    max_entry: AtomicUsize,
    evictions: AtomicU64,
    discarded: AtomicU64,
}

fn lru_key(hash: &HashBinary) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&hash[..8]);
    u64::from_le_bytes(b)
}

fn shard_of(hash: &HashBinary) -> usize {
    (lru_key(hash) % SHARDS as u64) as usize
}

impl Store {
    pub fn new(max_bytes: u64) -> Store {
        let max = usize::try_from(max_bytes).unwrap_or(usize::MAX);
        Store {
            shards: std::array::from_fn(|_| RwLock::new(HashMap::new())),
            lru: pingora_lru::Lru::with_capacity(max, 64),
            fills: Mutex::new(Fills::default()),
            next_id: AtomicU64::new(1),
            max_entry: AtomicUsize::new(max / 4),
            evictions: AtomicU64::new(0),
            discarded: AtomicU64::new(0),
        }
    }

    /// A new bound (config reload); evicts down to it at once.
    pub fn set_max_bytes(&self, max_bytes: u64) {
        let max = usize::try_from(max_bytes).unwrap_or(usize::MAX);
        self.max_entry.store(max / 4, Ordering::Relaxed);
        self.lru.set_weight_limit(max);
        self.evict();
    }

    pub fn stats(&self) -> Stats {
        Stats {
            bytes: self.lru.weight(),
            entries: self.lru.len(),
            evictions: self.evictions.load(Ordering::Relaxed),
            discarded: self.discarded.load(Ordering::Relaxed),
        }
    }

    /// Drops every committed entry of `tenant`; returns how many.
    pub fn purge_tenant(&self, tenant: &str) -> usize {
        let mut removed = Vec::new();
        for shard in &self.shards {
            let mut map = shard.write().unwrap_or_else(|p| p.into_inner());
            map.retain(|_, e| {
                let keep = &*e.tenant != tenant;
                if !keep {
                    removed.push(e.hash);
                }
                keep
            });
        }
        for h in &removed {
            self.lru.remove(lru_key(h));
        }
        removed.len()
    }

    /// The committed answer under `key` even if expired, as long as it expired less
    /// than `max_stale` ago: for when no provider can answer.
    pub fn stale(&self, key: &CacheKey, max_stale: std::time::Duration) -> Option<Stored> {
        let entry = self.get(&key.combined_bin())?;
        let now = SystemTime::now();
        if &*entry.tenant != key.user_tag() || entry.fresh_until + max_stale < now {
            return None;
        }
        Some(Stored {
            content_type: entry.header.headers.get("content-type").cloned(),
            body: entry.body.clone(),
            answer: entry.answer.clone(),
            expired: entry.fresh_until <= now,
        })
    }

    fn shard(&self, hash: &HashBinary) -> &RwLock<HashMap<HashBinary, Arc<Entry>>> {
        &self.shards[shard_of(hash)]
    }

    fn get(&self, hash: &HashBinary) -> Option<Arc<Entry>> {
        let map = self.shard(hash).read().unwrap_or_else(|p| p.into_inner());
        map.get(hash).cloned()
    }

    fn commit(&self, entry: Entry) -> usize {
        let weight = entry.weight();
        if weight > self.max_entry.load(Ordering::Relaxed) {
            return 0;
        }
        let entry = Arc::new(entry);
        {
            let mut map = self
                .shard(&entry.hash)
                .write()
                .unwrap_or_else(|p| p.into_inner());
            map.insert(entry.hash, entry.clone());
        }
        self.lru.admit(lru_key(&entry.hash), entry, weight);
        self.evict();
        weight
    }

    fn evict(&self) {
        for (gone, _) in self.lru.evict_to_limit() {
            self.evictions.fetch_add(1, Ordering::Relaxed);
            let mut map = self
                .shard(&gone.hash)
                .write()
                .unwrap_or_else(|p| p.into_inner());
            // A newer entry under the same key stays.
            if map.get(&gone.hash).is_some_and(|e| Arc::ptr_eq(e, &gone)) {
                map.remove(&gone.hash);
            }
        }
    }

    fn remove(&self, hash: &HashBinary) -> bool {
        let removed = {
            let mut map = self.shard(hash).write().unwrap_or_else(|p| p.into_inner());
            map.remove(hash)
        };
        if removed.is_some() {
            self.lru.remove(lru_key(hash));
        }
        removed.is_some()
    }

    fn partial_hit(fill: &Arc<Fill>) -> (CacheMeta, HitHandler) {
        let hit = Hit::Partial {
            fill: fill.clone(),
            rx: fill.state.subscribe(),
            next: 0,
        };
        (fill.meta(), Box::new(hit))
    }
}

#[async_trait]
impl Storage for Store {
    async fn lookup(
        &'static self,
        key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<Option<(CacheMeta, HitHandler)>> {
        let hash = key.combined_bin();
        let tenant = key.user_tag();
        // A fill in flight is newer than any committed entry (a refresh, or the
        // fill concurrent identical requests wait for).
        let fill = {
            let fills = lock(&self.fills);
            fills
                .by_key
                .get(&hash)
                .and_then(|id| fills.by_id.get(id))
                .cloned()
        };
        if let Some(fill) = fill.filter(|f| &*f.tenant == tenant) {
            return Ok(Some(Self::partial_hit(&fill)));
        }
        let Some(entry) = self.get(&hash) else {
            return Ok(None);
        };
        // The key's digest covers the tenant; this check makes a cross-tenant hit
        // impossible even for a hash collision.
        if &*entry.tenant != tenant {
            return Ok(None);
        }
        self.lru.promote(lru_key(&hash));
        let meta = meta_of(
            entry.created,
            entry.fresh_until,
            entry.header.clone(),
            &entry.answer,
        );
        let hit: HitHandler = Box::new(Hit::Complete(Some(entry)));
        Ok(Some((meta, hit)))
    }

    async fn lookup_streaming_write(
        &'static self,
        key: &CacheKey,
        tag: Option<&[u8]>,
        trace: &SpanHandle,
    ) -> Result<Option<(CacheMeta, HitHandler)>> {
        let id = tag
            .and_then(|t| <[u8; 8]>::try_from(t).ok())
            .map(u64::from_be_bytes);
        let Some(id) = id else {
            return self.lookup(key, trace).await;
        };
        let fill = lock(&self.fills).by_id.get(&id).cloned();
        Ok(fill.map(|f| Self::partial_hit(&f)))
    }

    async fn get_miss_handler(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        _trace: &SpanHandle,
    ) -> Result<MissHandler> {
        let answer = meta
            .extensions()
            .get::<Arc<Answer>>()
            .cloned()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "cache meta without answer"))?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let hash = key.combined_bin();
        let (state, _) = watch::channel(FillState::Open(0));
        let fill = Arc::new(Fill {
            hash,
            tenant: key.user_tag().into(),
            header: meta.response_header_copy(),
            created: meta.created(),
            fresh_until: meta.fresh_until(),
            answer,
            chunks: Mutex::new(Vec::new()),
            state,
        });
        {
            let mut fills = lock(&self.fills);
            fills.by_id.insert(id, fill.clone());
            fills.by_key.insert(hash, id);
        }
        Ok(Box::new(Writer {
            store: self,
            fill,
            id,
            tag: id.to_be_bytes(),
            bytes: 0,
            finished: false,
        }))
    }

    async fn purge(
        &'static self,
        target: PurgeTarget<'_>,
        _purge_type: PurgeType,
        _trace: &SpanHandle,
    ) -> Result<PurgeOutcome> {
        let hash = target.key().combined_bin();
        Ok(if self.remove(&hash) {
            PurgeOutcome::Purged(None)
        } else {
            PurgeOutcome::NotFound
        })
    }

    async fn update_meta(
        &'static self,
        key: &CacheKey,
        _meta: &CacheMeta,
        _trace: &SpanHandle,
    ) -> Result<bool> {
        // Answers are never revalidated (providers have no conditional requests).
        Ok(self.get(&key.combined_bin()).is_some())
    }

    fn support_streaming_partial_write(&self) -> bool {
        true
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync + 'static) {
        self
    }
}

/// Writes one fill; commits it on `finish` when the answer ended complete.
struct Writer {
    store: &'static Store,
    fill: Arc<Fill>,
    id: u64,
    tag: [u8; 8],
    bytes: usize,
    finished: bool,
}

impl Writer {
    fn close(&mut self, state: FillState) {
        self.fill.state.send_replace(state);
        let mut fills = lock(&self.store.fills);
        fills.by_id.remove(&self.id);
        if fills.by_key.get(&self.fill.hash) == Some(&self.id) {
            fills.by_key.remove(&self.fill.hash);
        }
    }
}

#[async_trait]
impl HandleMiss for Writer {
    async fn write_body(&mut self, data: Bytes, _eof: bool) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.bytes += data.len();
        let n = {
            let mut chunks = lock(&self.fill.chunks);
            chunks.push(data);
            chunks.len() as u64
        };
        self.fill.state.send_replace(FillState::Open(n));
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> Result<MissFinishType> {
        self.finished = true;
        let mut size = 0;
        if self.fill.answer.complete() {
            let body = {
                let chunks = lock(&self.fill.chunks);
                let mut b = BytesMut::with_capacity(self.bytes);
                for c in chunks.iter() {
                    b.extend_from_slice(c);
                }
                b.freeze()
            };
            let f = &self.fill;
            // Committed before the fill is unlisted, so no lookup falls between the two.
            size = self.store.commit(Entry {
                hash: f.hash,
                tenant: f.tenant.clone(),
                header: f.header.clone(),
                created: f.created,
                fresh_until: f.fresh_until,
                body,
                answer: f.answer.clone(),
            });
        } else {
            self.store.discarded.fetch_add(1, Ordering::Relaxed);
        }
        self.close(FillState::Done);
        Ok(MissFinishType::Created(size))
    }

    fn streaming_write_tag(&self) -> Option<&[u8]> {
        Some(&self.tag)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if !self.finished {
            self.store.discarded.fetch_add(1, Ordering::Relaxed);
            self.close(FillState::Aborted);
        }
    }
}

/// Reads a committed entry (one piece) or a fill as it is written (chunk by chunk).
enum Hit {
    Complete(Option<Arc<Entry>>),
    Partial {
        fill: Arc<Fill>,
        rx: watch::Receiver<FillState>,
        next: usize,
    },
}

#[async_trait]
impl HandleHit for Hit {
    async fn read_body(&mut self) -> Result<Option<Bytes>> {
        match self {
            Hit::Complete(entry) => Ok(entry.take().map(|e| e.body.clone())),
            Hit::Partial { fill, rx, next } => loop {
                let state = *rx.borrow_and_update();
                {
                    let chunks = lock(&fill.chunks);
                    if *next < chunks.len() {
                        *next += 1;
                        return Ok(Some(chunks[*next - 1].clone()));
                    }
                }
                match state {
                    FillState::Done => return Ok(None),
                    FillState::Aborted => {
                        return Error::e_explain(
                            ErrorType::ReadError,
                            "the cache fill this request was reading was abandoned",
                        )
                    }
                    FillState::Open(_) => {}
                }
                if rx.changed().await.is_err() {
                    return Error::e_explain(ErrorType::ReadError, "cache fill gone");
                }
            },
        }
    }

    async fn finish(
        self: Box<Self>,
        _storage: &'static (dyn Storage + Sync),
        _key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<()> {
        Ok(())
    }

    fn get_eviction_weight(&self) -> usize {
        match self {
            Hit::Complete(Some(e)) => e.weight(),
            _ => 0,
        }
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        self
    }

    fn as_any_mut(&mut self) -> &mut (dyn Any + Send + Sync) {
        self
    }
}

#[cfg(test)]
#[path = "storage_tests.rs"]
mod tests;
