//! The configuration file, checked as a whole before anything uses it.
//!
//! Loading happens in two steps so that `check-config` and `POST /admin/v1/reload`
//! can list every problem at once, each with its YAML path: [`raw`] mirrors the file
//! and records type errors per section and per entry without stopping; [`validate`]
//! resolves names into `Arc`s, reads secrets from the environment and converts money
//! to integer nano-USD. A `Config` therefore only exists when the whole file is
//! consistent, and the proxy never has to handle a dangling reference.

mod money;
mod net;
mod raw;
mod report;
mod sections;
mod tenant;
mod validate;

#[cfg(test)]
mod tests;

pub use money::{sha256_hex, usd_to_nanousd};

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
                };
                Ok(Config {
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

    /// Compares against every stored hash without stopping at a match, so the time
    /// taken says nothing about which tenant (if any) a key belongs to.
    pub fn authenticate(&self, presented_key: &str) -> Option<(&Arc<Tenant>, &str)> {
        let digest: [u8; 32] = Sha256::digest(presented_key.as_bytes()).into();
        let mut found = None;
        for tenant in &self.tenants {
            for key in &tenant.api_keys {
                if bool::from(key.sha256.ct_eq(&digest)) && found.is_none() {
                    found = Some((tenant, key.id.as_str()));
                }
            }
        }
        found
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
}

impl ProviderKind {
    /// The spelling used in the file, so messages match what the operator wrote.
    pub fn as_str(&self) -> &'static str {
        match self {
            ProviderKind::OpenAi => "openai",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::OpenAiCompatible => "openai_compatible",
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
    pub region: String,
    pub timeouts: Timeouts,
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

#[derive(Debug, Clone)]
pub struct Model {
    pub name: String,
    pub provider: Arc<Provider>,
    pub upstream_model: String,
    pub price: Price,
    pub max_output_tokens: Option<u32>,
}

/// USD per million tokens, held as integer nano-USD so that cost sums are exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Price {
    pub input_nanousd_per_mtok: u64,
    pub output_nanousd_per_mtok: u64,
    pub cached_input_nanousd_per_mtok: u64,
}

#[derive(Debug, Clone)]
pub struct Tenant {
    pub id: String,
    pub api_keys: Vec<ApiKey>,
    /// Allowed models; the first is used when the client names none.
    pub models: Vec<Arc<Model>>,
    pub pin_model: Option<Arc<Model>>,
    pub fallback: Vec<Arc<Model>>,
    pub allow_fallback_override: bool,
    pub region: Option<String>,
    pub rate: Rate,
    pub budget: Budget,
    pub cache: TenantCache,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// Names the key in audit rows; the key itself is never stored.
    pub id: String,
    pub sha256: [u8; 32],
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
pub struct ClickHouseConf {
    pub url: String,
    pub database: String,
    pub table: String,
    pub user: String,
    pub password: Option<String>,
    pub batch_rows: usize,
    pub flush_ms: u64,
}
