//! The configuration file, checked as a whole before anything uses it.
//!
//! Loading happens in two steps so that `check-config` and `POST /admin/v1/reload`
//! can list every problem at once, each with its YAML path: [`raw`] mirrors the file
//! and records type errors per section and per entry without stopping; [`validate`]
//! resolves names into `Arc`s, reads secrets from the environment and converts money
//! to integer nano-USD. A `Config` therefore only exists when the whole file is
//! consistent, and the proxy never has to handle a dangling reference.

mod alerts;
mod model;
mod money;
mod named;
mod net;
mod raw;
mod report;
mod sections;
mod tenant;
mod validate;

#[cfg(test)]
mod tests;

pub use alerts::{AlertsConf, VelocityAlert, Webhook, WebhookFormat};
pub use money::{sha256_hex, usd_to_nanousd};
pub use tenant::StoreTenantBuilder;

use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// The embedded configuration behind `llm-gateway demo` and `serve` without `--config`,
/// so that a first run needs no file at all.
pub const DEMO_YAML: &str = include_str!("../../conf/demo.yaml");

#[derive(Debug, Clone)]
pub struct Config {
    pub node: Node,
    pub listen: Listen,
    pub admin: Admin,
    pub max_body_bytes: usize,
    /// File order, so listings (`/admin/v1/providers`, `/v1/models`) read like the file.
    pub providers: Vec<Arc<Provider>>,
    pub models: Vec<Arc<Model>>,
    pub tenants: Vec<Arc<Tenant>>,
    pub counters: Counters,
    pub cache: CacheConf,
    pub audit: AuditConf,
    /// The tenant and key store, when tenants may also come from a database.
    pub store: Option<StoreConf>,
    /// `alerts:`; `None` when the file has no such section.
    pub alerts: Option<AlertsConf>,
    /// How many of `tenants` (the first ones) come from this file; the rest are the
    /// store's, merged in by [`Config::with_store_tenants`].
    pub file_tenants: usize,
    /// Things that work but are probably not what the operator meant; printed by
    /// `check-config` and logged at start-up.
    pub warnings: Vec<String>,
    index: Index,
}

/// Name lookups happen on every request, so they should not scan the lists.
#[derive(Debug, Clone, Default)]
struct Index {
    providers: HashMap<String, usize>,
    models: HashMap<String, usize>,
    tenants: HashMap<String, usize>,
    /// sha256 of a key -> (tenant, key within it, is it the key's rotated-out secret).
    keys: HashMap<[u8; 32], KeySlot>,
}

#[derive(Debug, Clone, Copy)]
struct KeySlot {
    tenant: u32,
    key: u32,
    previous: bool,
}

/// Why a presented key does not authenticate; each is a 401 `invalid_api_key`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    Unknown,
    Expired,
    Disabled,
}

impl AuthFailure {
    pub fn message(self) -> &'static str {
        match self {
            AuthFailure::Unknown => "invalid API key",
            AuthFailure::Expired => "invalid API key: the key has expired",
            AuthFailure::Disabled => "invalid API key: the key is disabled or revoked",
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        match std::fs::read_to_string(path) {
            Ok(text) => Config::from_yaml_str(&text),
            Err(e) => Err(ConfigErrors(vec![ConfigError {
                path: String::new(),
                message: format!("cannot read {}: {e}", path.display()),
            }])),
        }
    }

    pub fn from_yaml_str(text: &str) -> Result<Config, ConfigErrors> {
        let mut report = report::Report::default();
        let parts = raw::parse(text, &mut report).and_then(|r| validate::build(r, &mut report));
        let warnings = report.warnings();
        match parts {
            Some(p) if !report.has_errors() => {
                let index = Index {
                    providers: index_of(&p.providers, |x| &x.name),
                    models: index_of(&p.models, |x| &x.name),
                    tenants: index_of(&p.tenants, |x| &x.id),
                    keys: key_index(&p.tenants),
                };
                Ok(Config {
                    file_tenants: p.tenants.len(),
                    store: p.store,
                    alerts: p.alerts,
                    node: p.node,
                    listen: p.listen,
                    admin: p.admin,
                    max_body_bytes: p.max_body_bytes,
                    providers: p.providers,
                    models: p.models,
                    tenants: p.tenants,
                    counters: p.counters,
                    cache: p.cache,
                    audit: p.audit,
                    warnings,
                    index,
                })
            }
            _ => Err(ConfigErrors(report.into_errors())),
        }
    }

    pub fn provider(&self, name: &str) -> Option<&Arc<Provider>> {
        self.index
            .providers
            .get(name)
            .and_then(|&i| self.providers.get(i))
    }

    pub fn model(&self, name: &str) -> Option<&Arc<Model>> {
        self.index
            .models
            .get(name)
            .and_then(|&i| self.models.get(i))
    }

    pub fn tenant(&self, id: &str) -> Option<&Arc<Tenant>> {
        self.index
            .tenants
            .get(id)
            .and_then(|&i| self.tenants.get(i))
    }

    /// Looks the key up by its sha256. The map is keyed by the digest, not the key,
    /// so lookup timing can at most reveal something about a hash of a secret the
    /// caller already holds; the final comparison is constant-time anyway. A disabled
    /// tenant, a disabled, expired or revoked key, and a rotated-out secret past its
    /// grace period do not authenticate.
    pub fn authenticate(
        &self,
        presented_key: &str,
        now_ms: u64,
    ) -> Result<(&Arc<Tenant>, &Arc<ApiKey>), AuthFailure> {
        let digest: [u8; 32] = Sha256::digest(presented_key.as_bytes()).into();
        let slot = self.index.keys.get(&digest).ok_or(AuthFailure::Unknown)?;
        let tenant = self
            .tenants
            .get(slot.tenant as usize)
            .ok_or(AuthFailure::Unknown)?;
        let key = tenant
            .api_keys
            .get(slot.key as usize)
            .ok_or(AuthFailure::Unknown)?;
        let stored = if slot.previous {
            match key.previous.as_deref() {
                Some((hash, until_ms)) if now_ms < *until_ms => hash,
                _ => return Err(AuthFailure::Unknown),
            }
        } else {
            &key.sha256
        };
        if !bool::from(stored.ct_eq(&digest)) {
            return Err(AuthFailure::Unknown);
        }
        if tenant.disabled || key.disabled {
            return Err(AuthFailure::Disabled);
        }
        if key.expires_at_ms.is_some_and(|t| now_ms >= t) {
            return Err(AuthFailure::Expired);
        }
        Ok((tenant, key))
    }

    /// This file's tenants plus the store's, as one config: what a store change (or a
    /// reload, with the store's last state) swaps in. A store tenant whose id the file
    /// also has, or one of whose key hashes the file already uses, is left out (the
    /// store API never lets either happen; this guards against a hand-edited
    /// database).
    pub fn with_store_tenants(&self, store: &[Arc<Tenant>]) -> (Config, Vec<String>) {
        let mut out = self.clone();
        let mut skipped = Vec::new();
        out.tenants.truncate(self.file_tenants);
        out.tenants.reserve(store.len());
        let mut ids: HashMap<String, usize> = index_of(&out.tenants, |x| &x.id);
        let mut keys = key_index(&out.tenants);
        for t in store {
            if ids.contains_key(&t.id) {
                skipped.push(format!(
                    "store tenant `{}`: the config file has this id",
                    t.id
                ));
                continue;
            }
            let hashes = t
                .api_keys
                .iter()
                .flat_map(|k| std::iter::once(&k.sha256).chain(k.previous.as_ref().map(|p| &p.0)));
            if let Some(clash) = hashes.clone().find(|h| keys.contains_key(*h)) {
                let _ = clash;
                skipped.push(format!(
                    "store tenant `{}`: a key hash is already used by another tenant",
                    t.id
                ));
                continue;
            }
            let at = out.tenants.len();
            ids.insert(t.id.clone(), at);
            add_keys(&mut keys, at, t);
            out.tenants.push(t.clone());
        }
        out.index.tenants = ids;
        out.index.keys = keys;
        (out, skipped)
    }

    /// The tenants from this file (read-only through the admin API).
    pub fn file_tenant(&self, id: &str) -> Option<&Arc<Tenant>> {
        self.index
            .tenants
            .get(id)
            .filter(|&&i| i < self.file_tenants)
            .and_then(|&i| self.tenants.get(i))
    }
}

fn key_index(tenants: &[Arc<Tenant>]) -> HashMap<[u8; 32], KeySlot> {
    let mut keys = HashMap::with_capacity(tenants.iter().map(|t| t.api_keys.len()).sum());
    for (i, t) in tenants.iter().enumerate() {
        add_keys(&mut keys, i, t);
    }
    keys
}

fn add_keys(keys: &mut HashMap<[u8; 32], KeySlot>, tenant: usize, t: &Tenant) {
    for (k, key) in t.api_keys.iter().enumerate() {
        let slot = |previous| KeySlot {
            tenant: tenant as u32,
            key: k as u32,
            previous,
        };
        keys.insert(key.sha256, slot(false));
        if let Some((hash, _)) = key.previous.as_deref() {
            keys.entry(*hash).or_insert(slot(true));
        }
    }
}

fn index_of<T>(items: &[Arc<T>], name: impl Fn(&T) -> &String) -> HashMap<String, usize> {
    items
        .iter()
        .enumerate()
        .map(|(i, x)| (name(x).clone(), i))
        .collect()
}

/// Every problem found in one file; loading never stops at the first.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Where in the file, e.g. `tenants.acme.models[2]`; empty for the file as a whole.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}
impl std::error::Error for ConfigErrors {}

#[derive(Debug, Clone)]
pub struct Node {
    pub region: String,
    /// Goes into the audit `node` column, so rows can be traced to an edge machine.
    pub hostname: String,
}

#[derive(Debug, Clone)]
pub struct Listen {
    pub http: Option<SocketAddr>,
    pub https: Option<Https>,
}

#[derive(Debug, Clone)]
pub struct Https {
    pub addr: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Admin {
    pub listen: SocketAddr,
    /// `None` when no token is configured; the admin API decides what that means.
    pub token: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    OpenAi,
    Anthropic,
    OpenAiCompatible,
    /// Azure OpenAI: OpenAI's chat wire format at a per-deployment path with an
    /// `api-version` query and an `api-key` header.
    AzureOpenAi,
}

impl ProviderKind {
    /// Speaks OpenAI's own API (OpenAI or Azure OpenAI), so takes what only it knows,
    /// such as `max_completion_tokens`, which reasoning models require and some
    /// OpenAI-compatible servers refuse.
    pub fn openai_native(self) -> bool {
        matches!(self, ProviderKind::OpenAi | ProviderKind::AzureOpenAi)
    }

    /// The spelling used in the file, so messages match what the operator wrote.
    pub fn as_str(&self) -> &'static str {
        match self {
            ProviderKind::OpenAi => "openai",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::OpenAiCompatible => "openai_compatible",
            ProviderKind::AzureOpenAi => "azure_openai",
        }
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone)]
pub struct Provider {
    pub name: String,
    pub kind: ProviderKind,
    pub base_url: BaseUrl,
    pub api_key: Option<String>,
    /// Azure's `api-version` (`Some` exactly for `azure_openai`): Azure refuses a
    /// request without one, and which one is the operator's choice of API surface.
    pub api_version: Option<String>,
    pub region: String,
    pub timeouts: Timeouts,
    /// `http2: auto` (the default): offer `h2` and `http/1.1` by ALPN to a TLS upstream
    /// and use what it picks, so one connection multiplexes many streams. `false`
    /// (`http2: off`) offers `http/1.1` only. Never h2c: plain `http://` is HTTP/1.1.
    pub http2: bool,
    /// `upstream_streaming: always` (the default): a non-streaming request goes
    /// upstream as a stream that the gateway assembles into the one body the client
    /// asked for, so `first_token_ms` and `idle_ms` bound it and a stalled provider is
    /// failed over within `first_token_ms`. `false` (`as_client`): sent as the client
    /// asked, for a server that cannot stream; then only `total_ms` bounds it.
    pub stream_always: bool,
}

/// A base URL split once at load time, because peers are built from host and port on
/// every attempt and request paths are appended to the prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    pub tls: bool,
    /// Lower-cased; an IPv6 literal keeps its brackets so it can go into `Host` as is.
    pub host: String,
    pub port: u16,
    /// `""` or e.g. `"/openai"`: never a trailing slash, so `prefix + "/v1/..."` is right.
    pub path_prefix: String,
    pub original: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub connect_ms: u64,
    pub first_token_ms: u64,
    pub idle_ms: u64,
    pub total_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect_ms: 2_000,
            first_token_ms: 20_000,
            idle_ms: 30_000,
            total_ms: 600_000,
        }
    }
}

/// A public model: what tenants ask for and are billed by, served by one or more
/// deployments.
#[derive(Debug, Clone)]
pub struct Model {
    pub name: String,
    /// At least one, in the order written; tried in [`Model::balance`] order.
    pub deployments: Vec<Arc<Deployment>>,
    pub balance: Balance,
    /// Every deployment's upstream name, in order, for the cache key: pointing the
    /// model at another upstream model is a different answer.
    pub upstream_names: String,
    pub price: Price,
    pub max_output_tokens: Option<u32>,
}

impl Model {
    /// Whether any deployment is served in `region` (a tenant's region pin).
    pub fn serves_region(&self, region: &str) -> bool {
        self.deployments.iter().any(|d| d.provider.region == region)
    }

    /// The provider named for the model where one name is wanted (`/v1/models`).
    pub fn first_provider(&self) -> &Arc<Provider> {
        &self.deployments[0].provider
    }
}

/// One place that serves a model: a provider account and the upstream model (or
/// Azure deployment) name, with that account's quota for it.
#[derive(Debug, Clone)]
pub struct Deployment {
    /// `provider/upstream_model`: the provider's quota, cooldowns and counters are per
    /// account and upstream model, so models sharing a deployment share its state.
    pub key: String,
    pub provider: Arc<Provider>,
    pub upstream_model: String,
    /// Relative share under `balance: weighted`, and the tie-break of `least_busy`.
    pub weight: u32,
    /// Requests per minute the gateway may send it (all nodes together on Redis).
    pub rpm: Option<u64>,
    /// Tokens per minute, likewise.
    pub tpm: Option<u64>,
}

impl Deployment {
    pub fn has_quota(&self) -> bool {
        self.rpm.is_some() || self.tpm.is_some()
    }
}

/// Where one attempt goes: the public model (its name, price and bounds) and the
/// deployment (provider and upstream name) chosen for it.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub model: &'a Model,
    pub dep: &'a Deployment,
}

/// The order a model's deployments are tried in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    /// Fewest requests in flight on this node; ties by weight, then as written.
    LeastBusy,
    /// At random in proportion to weight.
    Weighted,
    /// Lowest moving average of time to first token; untried ones first.
    LowestLatency,
}

impl Balance {
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::LeastBusy => "least_busy",
            Balance::Weighted => "weighted",
            Balance::LowestLatency => "lowest_latency",
        }
    }
}

/// USD per million tokens, held as integer nano-USD so that cost sums are exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Price {
    pub input_nanousd_per_mtok: u64,
    pub output_nanousd_per_mtok: u64,
    pub cached_input_nanousd_per_mtok: u64,
}

/// Where a tenant is defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TenantSource {
    File,
    Store,
}

impl TenantSource {
    pub fn as_str(self) -> &'static str {
        match self {
            TenantSource::File => "file",
            TenantSource::Store => "store",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Tenant {
    pub id: String,
    pub source: TenantSource,
    /// A store tenant that was deleted: its keys answer 401, its usage stays readable.
    pub disabled: bool,
    pub api_keys: Vec<Arc<ApiKey>>,
    /// Allowed models; the first is used when the client names none.
    pub models: Vec<Arc<Model>>,
    pub pin_model: Option<Arc<Model>>,
    pub fallback: Vec<Arc<Model>>,
    pub allow_fallback_override: bool,
    pub region: Option<String>,
    pub rate: Rate,
    pub budget: Budget,
    pub cache: TenantCache,
    /// The spend guard (`guard:`); `None`: spend runs away unwatched, as before.
    pub guard: Option<Guard>,
}

/// What the spend guard does once engaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuardAction {
    /// Only the `guard_engaged` event.
    Alert,
    /// The tenant is held to `throttle_rps` (429 `spend_guard` above it).
    Throttle,
    /// Every request is refused (402 `spend_guard`).
    Block,
}

impl GuardAction {
    pub fn as_str(self) -> &'static str {
        match self {
            GuardAction::Alert => "alert",
            GuardAction::Throttle => "throttle",
            GuardAction::Block => "block",
        }
    }
}

/// A tenant's spend guard: it engages when this hour's spend passes both
/// `factor_milli / 1000` x the tenant's hourly baseline and `min_hourly_nanousd`
/// (the baseline rule is [`crate::limits::SpendHours::baseline`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Guard {
    /// The velocity factor in thousandths, so that the comparison is integer.
    pub factor_milli: u64,
    pub min_hourly_nanousd: u64,
    pub action: GuardAction,
    pub throttle_rps: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// Names the key in audit rows; the key itself is never stored.
    pub id: String,
    pub sha256: [u8; 32],
    pub name: Option<String>,
    /// Narrows the tenant's models to these (names, validated to be the tenant's);
    /// `None`: all of the tenant's.
    pub models: Option<Vec<String>>,
    /// The key's own limits, enforced together with the tenant's.
    pub rate: Rate,
    pub budget: Budget,
    /// Unix ms from which the key answers 401.
    pub expires_at_ms: Option<u64>,
    pub disabled: bool,
    /// A rotated-out secret's hash and the Unix ms until which it is still accepted.
    /// Boxed: most keys have none, and a store may hold hundreds of thousands of keys.
    pub previous: Option<Box<([u8; 32], u64)>>,
}

impl ApiKey {
    /// Whether the key narrows the tenant's models, limits or budget at all.
    pub fn has_limits(&self) -> bool {
        self.rate != Rate::default() || self.budget != Budget::default()
    }

    pub fn allows(&self, model: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|m| m.iter().any(|n| n == model))
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rate {
    pub rps: Option<u32>,
    pub tpm: Option<u64>,
    pub concurrency: Option<u32>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Budget {
    pub monthly_nanousd: Option<u64>,
    pub hourly_nanousd: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantCache {
    pub enabled: bool,
    pub ttl_s: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Counters {
    Memory,
    Redis { url: String, on_error: OnError },
}

/// What to do with a request when the shared counters cannot be reached: refuse it
/// (limits hold) or serve it uncounted (availability holds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    FailOpen,
    FailClosed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConf {
    pub max_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConf {
    pub spool_dir: PathBuf,
    pub clickhouse: Option<ClickHouseConf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConf {
    pub backend: StoreBackend,
    /// Postgres: the longest a change made on one node takes to reach the others
    /// (the version poll's period, behind LISTEN/NOTIFY).
    pub sync_ms: u64,
    /// The last state seen, written after every change; a node that starts while the
    /// database is down serves from it.
    pub snapshot: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreBackend {
    Sqlite {
        path: PathBuf,
    },
    /// The URL holds the password: never logged (see `Debug` of the store).
    Postgres {
        url: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClickHouseConf {
    pub url: String,
    pub database: String,
    pub table: String,
    pub user: String,
    pub password: Option<String>,
    pub batch_rows: usize,
    pub flush_ms: u64,
}

/// The path of a tenant's `index`th key in validation messages (`api_keys[3]`).
pub fn api_key_path(index: usize) -> String {
    report::item("api_keys", index)
}
