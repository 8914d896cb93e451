//! The tenant and key store: tenants and keys managed through the admin API, in
//! SQLite (one node) or PostgreSQL (shared by every edge node).
//!
//! The request path never touches the database. Every node holds the whole state in
//! memory ([`State`]) and publishes it as part of the one `Arc<Config>` requests read:
//! file tenants first, then the store's (see `Config::with_store_tenants`), swapped in
//! one pointer store per change set, as a reload does. Changes arrive by a version
//! number: every write bumps `gw_meta.version` and stamps the rows it touched with
//! it, so a node asks for "rows above the version I have" and gets exactly what
//! changed. Postgres writers also `NOTIFY`; a version poll every `sync_ms` catches a
//! lost notification (or a write made while this node's listener was reconnecting).
//!
//! Database down: the node keeps serving what it last saw and reports itself stale
//! (readiness stays up); writes fail fast with 503 `store_unavailable`. A node that
//! starts while the database is down loads the snapshot file instead, and without
//! one is not ready. Stored forms are the file's own: a tenant is the JSON of a file
//! tenant's fields, a key the JSON of an `api_keys` entry (hash only), so one
//! validator (`config::StoreTenantBuilder`) and one set of messages serve both.

pub mod db;
pub mod import;
pub mod ops;
pub mod read;
pub mod snapshot;
pub mod spec;
pub mod sync;

use crate::config::{Config, StoreBackend, StoreConf, StoreTenantBuilder, Tenant};
use db::{Db, DbError, Val};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The longest an admin write waits on the database before answering 503, unless
/// `LLM_GATEWAY_STORE_WRITE_TIMEOUT_MS` says otherwise.
const WRITE_TIMEOUT_MS: u64 = 500;

/// A stored tenant as read from the database.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TenantRec {
    pub id: String,
    /// JSON object of the tenant's fields, as a file tenant has them (no `api_keys`).
    pub spec: String,
    pub disabled: bool,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub keys: Vec<KeyRec>,
}

/// A stored key: its `api_keys` entry as JSON (hash only, never the secret).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyRec {
    pub id: String,
    pub spec: String,
    pub created_ms: i64,
    pub updated_ms: i64,
    /// Revoked keys stay listed (who had which key, until when) but never
    /// authenticate.
    pub revoked_ms: Option<i64>,
}

/// The store's tenants in their stored form, at one version: what the snapshot file
/// holds (and what a node writes back from its built tenants, see [`spec`]).
#[derive(Debug, Clone, Default)]
pub struct State {
    pub version: i64,
    pub tenants: HashMap<String, TenantRec>,
}

/// What a read found: the version it reached, and whether it was the whole store
/// (then tenants it did not emit are gone) or only the tenants that changed.
#[derive(Debug, Clone, Copy)]
pub struct Read {
    pub version: i64,
    pub full: bool,
}

/// What a node uses the store for: the config it serves, to swap in a new one.
pub trait Host: Send + Sync {
    fn config(&self) -> Arc<Config>;
    fn install(&self, cfg: Arc<Config>);
}

/// A config in a cell: the host of a store with no proxy around it (`import-tenants`,
/// tests), holding what the store installs.
pub struct ConfigCell(std::sync::RwLock<Arc<Config>>);

impl ConfigCell {
    pub fn new(cfg: Config) -> ConfigCell {
        ConfigCell(std::sync::RwLock::new(Arc::new(cfg)))
    }
}

impl Host for ConfigCell {
    fn config(&self) -> Arc<Config> {
        match self.0.read() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn install(&self, cfg: Arc<Config>) {
        match self.0.write() {
            Ok(mut c) => *c = cfg,
            Err(p) => *p.into_inner() = cfg,
        }
    }
}

/// How fresh this node's copy is, for `/readyz` and the admin API.
#[derive(Debug, Clone, Default)]
pub struct Health {
    /// A state was loaded (from the database or the snapshot): the node can serve
    /// its store tenants.
    pub loaded: bool,
    /// `database` or `snapshot`: where the state in memory came from.
    pub source: &'static str,
    /// Unix ms since which the database could not be read, while it cannot.
    pub stale_since_ms: Option<u64>,
    pub last_error: Option<String>,
    pub last_sync_ms: u64,
}

/// A store failure as the admin API reports it.
#[derive(Debug, Clone)]
pub enum StoreError {
    /// 503 `store_unavailable`: the database cannot be reached or timed out.
    Unavailable(String),
    /// 404.
    NotFound(&'static str),
    /// 409 with a code (`tenant_exists`, `tenant_in_config_file`, `key_exists`,
    /// `tenant_disabled`, `key_revoked`).
    Conflict(&'static str, String),
    /// 400 naming each field.
    Invalid(Vec<crate::config::ConfigError>),
}

impl From<DbError> for StoreError {
    fn from(e: DbError) -> Self {
        StoreError::Unavailable(e.0)
    }
}

pub struct Store {
    db: Db,
    conf: StoreConf,
    host: Arc<dyn Host>,
    /// The state and its built tenants; held while a new config is published, so
    /// store changes and reloads are installed one at a time.
    inner: Mutex<Inner>,
    health: Mutex<Health>,
    /// Wakes the sync task (a write on this node, a NOTIFY).
    pub(crate) wake: tokio::sync::Notify,
    write_timeout: Duration,
    /// The schema is known to be this binary's: a node that started from the snapshot
    /// migrates when the database first answers, before it reads.
    migrated: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct Inner {
    version: i64,
    tenants: HashMap<String, Entry>,
    snapshot_dirty: bool,
}

/// One stored tenant as a node holds it: built, plus what the built form lacks.
struct Entry {
    created_ms: i64,
    updated_ms: i64,
    /// Every key's dates and revocation (revoked keys are not in the built tenant).
    keys: Vec<KeyMeta>,
    built: Built,
}

enum Built {
    Ok(Arc<Tenant>),
    /// Does not validate against the running config (a model it names was removed
    /// from the file): not served; its stored form is kept to be shown and rebuilt.
    Broken(String, Box<TenantRec>),
}

struct KeyMeta {
    id: String,
    created_ms: i64,
    updated_ms: i64,
    revoked_ms: Option<i64>,
}

impl Entry {
    fn new(builder: &StoreTenantBuilder, rec: TenantRec) -> Entry {
        let keys = rec
            .keys
            .iter()
            .map(|k| KeyMeta {
                id: k.id.clone(),
                created_ms: k.created_ms,
                updated_ms: k.updated_ms,
                revoked_ms: k.revoked_ms,
            })
            .collect();
        let built = match build(builder, &rec) {
            Ok(t) => Built::Ok(Arc::new(t)),
            Err(e) => {
                log::error!(
                    "store: tenant `{}` does not validate against the running config and is not served: {e}",
                    rec.id
                );
                Built::Broken(e, Box::new(rec.clone()))
            }
        };
        Entry {
            created_ms: rec.created_ms,
            updated_ms: rec.updated_ms,
            keys,
            built,
        }
    }

    /// The stored form, written back from the built one.
    fn record(&self, id: &str) -> TenantRec {
        let t = match &self.built {
            Built::Broken(_, rec) => return (**rec).clone(),
            Built::Ok(t) => t,
        };
        let keys = self
            .keys
            .iter()
            .map(|m| {
                let spec = match t.api_keys.iter().find(|k| k.id == m.id) {
                    Some(k) if m.revoked_ms.is_none() => spec::key(k, true),
                    // Revoked: never built again, so only its id is kept.
                    _ => serde_json::json!({ "id": m.id }),
                };
                KeyRec {
                    id: m.id.clone(),
                    spec: spec.to_string(),
                    created_ms: m.created_ms,
                    updated_ms: m.updated_ms,
                    revoked_ms: m.revoked_ms,
                }
            })
            .collect();
        TenantRec {
            id: id.to_string(),
            spec: spec::tenant(t).to_string(),
            disabled: t.disabled,
            created_ms: self.created_ms,
            updated_ms: self.updated_ms,
            keys,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl Store {
    /// Opens the database handle; no I/O on Postgres until first use.
    pub fn open(conf: &StoreConf, host: Arc<dyn Host>) -> Result<Arc<Store>, String> {
        let write_timeout = Duration::from_millis(
            std::env::var("LLM_GATEWAY_STORE_WRITE_TIMEOUT_MS")
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|&ms: &u64| ms > 0)
                .unwrap_or(WRITE_TIMEOUT_MS),
        );
        let db = match &conf.backend {
            StoreBackend::Sqlite { path } => Db::sqlite(path).map_err(|e| e.0)?,
            StoreBackend::Postgres { url } => Db::postgres(url, write_timeout).map_err(|e| e.0)?,
        };
        Ok(Arc::new(Store {
            db,
            conf: conf.clone(),
            host,
            inner: Mutex::new(Inner::default()),
            health: Mutex::new(Health::default()),
            wake: tokio::sync::Notify::new(),
            write_timeout,
            migrated: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    pub fn backend(&self) -> &'static str {
        self.db.backend()
    }

    pub fn health(&self) -> Health {
        lock(&self.health).clone()
    }

    pub fn version(&self) -> i64 {
        lock(&self.inner).version
    }

    /// Migrates and loads the whole state; on failure, the snapshot (if configured and
    /// sound). Called once before the node serves.
    pub async fn initial_load(&self, timeout: Duration) -> Result<(), String> {
        let started = std::time::Instant::now();
        let builder = self.builder();
        let mut entries = Vec::new();
        let result = tokio::time::timeout(timeout, async {
            self.db.migrate().await?;
            self.migrated
                .store(true, std::sync::atomic::Ordering::Release);
            read::read_changes(&self.db, 0, |rec| {
                entries.push((rec.id.clone(), Entry::new(&builder, rec)))
            })
            .await
        })
        .await
        .unwrap_or_else(|_| Err(DbError("timed out".into())));
        match result {
            Ok(read) => {
                let n = entries.len();
                self.install(read, entries, "database");
                log::info!(
                    "store: loaded {n} tenants from {} (version {}) in {} ms",
                    self.backend(),
                    read.version,
                    started.elapsed().as_millis()
                );
                Ok(())
            }
            Err(e) => {
                self.mark_stale(&e.0);
                let Some(path) = &self.conf.snapshot else {
                    return Err(format!(
                        "store: the {} database is unreachable ({e}) and no snapshot is configured: store tenants are not served until it answers",
                        self.backend()
                    ));
                };
                match snapshot::read(path) {
                    Ok(state) => {
                        let n = state.tenants.len();
                        let read = Read {
                            version: state.version,
                            full: true,
                        };
                        let entries = state
                            .tenants
                            .into_iter()
                            .map(|(id, rec)| (id, Entry::new(&builder, rec)))
                            .collect();
                        self.install(read, entries, "snapshot");
                        log::warn!(
                            "store: the {} database is unreachable ({e}); serving {n} tenants from the snapshot {} (version {})",
                            self.backend(),
                            path.display(),
                            read.version
                        );
                        Ok(())
                    }
                    Err(se) => Err(format!(
                        "store: the {} database is unreachable ({e}) and the snapshot cannot be used: {se}",
                        self.backend()
                    )),
                }
            }
        }
    }

    /// Lays what a read found over the state (replacing it when the read was whole)
    /// and publishes the result.
    fn install(&self, read: Read, entries: Vec<(String, Entry)>, source: &'static str) {
        {
            let mut inner = lock(&self.inner);
            if !read.full && entries.is_empty() && read.version <= inner.version {
                return;
            }
            if read.full {
                inner.tenants.clear();
            }
            for (id, e) in entries {
                inner.tenants.insert(id, e);
            }
            inner.version = if read.full {
                read.version
            } else {
                inner.version.max(read.version)
            };
            inner.snapshot_dirty |= source == "database";
            self.publish(&inner, &self.host.config());
        }
        let mut h = lock(&self.health);
        h.loaded = true;
        h.source = source;
    }

    /// Installs `base` (a config just loaded from the file) with the store's tenants
    /// rebuilt against its models. Refused when the file adds a tenant id the store
    /// holds: one id must not name two tenants.
    pub fn install_file_config(&self, base: Config, old: &Config) -> Result<(), String> {
        let mut inner = lock(&self.inner);
        let mut clashes: Vec<&str> = base.tenants[..base.file_tenants]
            .iter()
            .map(|t| t.id.as_str())
            .filter(|id| inner.tenants.contains_key(*id) && old.file_tenant(id).is_none())
            .collect();
        clashes.sort();
        if !clashes.is_empty() {
            return Err(clashes
                .iter()
                .map(|id| format!("tenants.{id}: the tenant store already has a tenant `{id}`; one id cannot be in both"))
                .collect::<Vec<_>>()
                .join("\n"));
        }
        let builder = StoreTenantBuilder::new(&base);
        let ids: Vec<String> = inner.tenants.keys().cloned().collect();
        for id in ids {
            if let Some(old) = inner.tenants.remove(&id) {
                let rec = old.record(&id);
                inner.tenants.insert(id, Entry::new(&builder, rec));
            }
        }
        self.publish(&inner, &base);
        Ok(())
    }

    fn publish(&self, inner: &Inner, base: &Config) {
        let mut list: Vec<Arc<Tenant>> = inner
            .tenants
            .values()
            .filter_map(|e| match &e.built {
                Built::Ok(t) => Some(t.clone()),
                Built::Broken(..) => None,
            })
            .collect();
        // Stable order: listings and the metrics' tenant loops read like the store.
        list.sort_by(|a, b| a.id.cmp(&b.id));
        let (merged, skipped) = base.with_store_tenants(&list);
        for s in skipped {
            log::warn!("store: {s}: the file's tenant is served");
        }
        self.host.install(Arc::new(merged));
    }

    pub(crate) fn mark_stale(&self, error: &str) {
        let mut h = lock(&self.health);
        if h.stale_since_ms.is_none() {
            log::warn!(
                "store: the {} database cannot be read ({error}); serving the last state seen",
                self.db.backend()
            );
            h.stale_since_ms = Some(crate::audit::time::now_ms());
        }
        h.last_error = Some(error.to_string());
    }

    pub(crate) fn mark_fresh(&self) {
        let mut h = lock(&self.health);
        if let Some(since) = h.stale_since_ms.take() {
            log::info!(
                "store: the {} database answers again (stale for {} ms); caught up",
                self.db.backend(),
                crate::audit::time::now_ms().saturating_sub(since)
            );
        }
        h.last_error = None;
        h.last_sync_ms = crate::audit::time::now_ms();
    }

    /// The stored tenant, as this node last saw it.
    pub fn tenant(&self, id: &str) -> Option<TenantRec> {
        lock(&self.inner).tenants.get(id).map(|e| e.record(id))
    }

    /// Why a stored tenant is not served, if it is not.
    pub fn broken(&self, id: &str) -> Option<String> {
        match &lock(&self.inner).tenants.get(id)?.built {
            Built::Broken(e, _) => Some(e.clone()),
            Built::Ok(_) => None,
        }
    }

    pub fn tenant_count(&self) -> usize {
        lock(&self.inner).tenants.len()
    }

    /// Every stored tenant id, sorted.
    pub fn tenant_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = lock(&self.inner).tenants.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// The whole state in stored form when it changed since the last snapshot.
    pub(crate) fn take_snapshot_state(&self) -> Option<State> {
        let mut inner = lock(&self.inner);
        if !inner.snapshot_dirty || self.conf.snapshot.is_none() {
            return None;
        }
        inner.snapshot_dirty = false;
        Some(State {
            version: inner.version,
            tenants: inner
                .tenants
                .iter()
                .map(|(id, e)| (id.clone(), e.record(id)))
                .collect(),
        })
    }

    pub fn conf(&self) -> &StoreConf {
        &self.conf
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Reads what changed since this node's version and applies it.
    pub async fn sync_now(&self) -> Result<(), DbError> {
        let since = self.version();
        let read_timeout = Duration::from_millis(self.conf.sync_ms.max(1_000));
        let builder = self.builder();
        let mut entries = Vec::new();
        let read = tokio::time::timeout(read_timeout, async {
            if !self.migrated.load(std::sync::atomic::Ordering::Acquire) {
                self.db.migrate().await?;
                self.migrated
                    .store(true, std::sync::atomic::Ordering::Release);
            }
            read::read_changes(&self.db, since, |rec| {
                entries.push((rec.id.clone(), Entry::new(&builder, rec)))
            })
            .await
        })
        .await
        .unwrap_or_else(|_| Err(DbError("timed out".into())));
        let read = match read {
            Ok(r) => r,
            Err(e) => {
                self.mark_stale(&e.0);
                return Err(e);
            }
        };
        if read.version < since {
            // The database is behind what this node saw (restored from a backup, or a
            // snapshot newer than it): take the database's state whole.
            log::warn!(
                "store: the database is at version {} but this node saw {since}: reloading it whole",
                read.version
            );
            entries.clear();
            let all = tokio::time::timeout(
                read_timeout,
                read::read_changes(&self.db, 0, |rec| {
                    entries.push((rec.id.clone(), Entry::new(&builder, rec)))
                }),
            )
            .await
            .unwrap_or_else(|_| Err(DbError("timed out".into())))?;
            self.mark_fresh();
            self.install(all, entries, "database");
            return Ok(());
        }
        self.mark_fresh();
        self.install(read, entries, "database");
        Ok(())
    }

    pub fn builder(&self) -> StoreTenantBuilder {
        StoreTenantBuilder::new(&self.host.config())
    }

    pub fn host_config(&self) -> Arc<Config> {
        self.host.config()
    }
}

/// A stored tenant as the request path uses it: revoked keys are left out.
pub fn build(builder: &StoreTenantBuilder, rec: &TenantRec) -> Result<Tenant, String> {
    let keys: Vec<&str> = rec
        .keys
        .iter()
        .filter(|k| k.revoked_ms.is_none())
        .map(|k| k.spec.as_str())
        .collect();
    builder
        .build(&rec.id, &rec.spec, &keys, rec.disabled)
        .map_err(|e| e.to_string())
}

/// `Val::Int` of a bool, as the schema stores them.
pub(crate) fn flag(b: bool) -> Val {
    Val::Int(b as i64)
}

#[cfg(test)]
mod tests;
