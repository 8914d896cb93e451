//! The file exactly as written, before any cross-reference is resolved.
//!
//! The document is read into a `serde_yaml::Value` first and every section, and every
//! provider, model and tenant, is deserialized on its own: one typo then costs one
//! entry, not the whole report, and the remaining entries are still checked.
//! Name→entry maps are kept as `Vec`s in file order because a tenant's first model is
//! its default and messages should follow the file.

use super::report::{child, describe, deserialize, Report};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_yaml::{Mapping, Value};
use std::path::PathBuf;

const SECTIONS: &[&str] = &[
    "node",
    "listen",
    "admin",
    "max_body_bytes",
    "providers",
    "models",
    "tenants",
    "counters",
    "cache",
    "audit",
    "store",
    "alerts",
];

/// A section's state after parsing. `Invalid` is kept apart from `Absent` so that a
/// section whose own error was already reported does not also count as missing.
#[derive(Debug)]
pub(super) enum Sec<T> {
    Absent,
    Invalid,
    Valid(T),
}

impl<T> Sec<T> {
    fn from_parsed(v: Option<T>) -> Self {
        v.map_or(Sec::Invalid, Sec::Valid)
    }
}

/// Entries in file order; `None` marks an entry whose own errors were reported, so
/// references to it stay quiet instead of adding a second, misleading error.
pub(super) type Entries<T> = Vec<(String, Option<T>)>;

#[derive(Debug)]
pub(super) struct RawConfig {
    pub node: Sec<RawNode>,
    pub listen: Sec<RawListen>,
    pub admin: Sec<RawAdmin>,
    pub max_body_bytes: Sec<u64>,
    pub providers: Sec<Entries<RawProvider>>,
    pub models: Sec<Entries<RawModel>>,
    pub tenants: Sec<Entries<RawTenant>>,
    pub counters: Sec<RawCounters>,
    pub cache: Sec<RawCache>,
    pub audit: Sec<RawAudit>,
    pub store: Sec<RawStore>,
    pub alerts: Sec<RawAlerts>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
pub(super) struct RawNode {
    pub region: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
pub(super) struct RawListen {
    pub http: Option<String>,
    pub https: Option<RawHttps>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
pub(super) struct RawHttps {
    pub addr: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
pub(super) struct RawAdmin {
    pub listen: Option<String>,
    pub token_env: Option<String>,
}

/// The enums go through a string: serde_yaml's own enum errors name its internals
/// ("expected a Value::Tagged enum") instead of the accepted values.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(try_from = "String")]
pub(super) enum RawKind {
    OpenAi,
    Anthropic,
    OpenAiCompatible,
    AzureOpenAi,
}

impl TryFrom<String> for RawKind {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        variant(
            &s,
            &[
                ("openai", RawKind::OpenAi),
                ("anthropic", RawKind::Anthropic),
                ("openai_compatible", RawKind::OpenAiCompatible),
                ("azure_openai", RawKind::AzureOpenAi),
            ],
        )
    }
}

fn variant<T: Copy>(s: &str, options: &[(&str, T)]) -> Result<T, String> {
    if let Some((_, v)) = options.iter().find(|(name, _)| *name == s) {
        return Ok(*v);
    }
    let names: Vec<String> = options.iter().map(|(n, _)| format!("`{n}`")).collect();
    Err(format!(
        "unknown variant `{s}`, expected one of {}",
        names.join(", ")
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
pub(super) struct RawProvider {
    pub kind: RawKind,
    pub base_url: String,
    pub api_key_env: Option<String>,
    /// Azure OpenAI's `api-version` query parameter; only that kind takes one.
    pub api_version: Option<String>,
    pub region: String,
    pub timeouts: Option<RawTimeouts>,
    /// Absent: `auto`.
    pub http2: Option<RawHttp2>,
    /// Absent: `always`.
    pub upstream_streaming: Option<RawUpstreamStreaming>,
}

/// Whether a TLS upstream may be offered HTTP/2 by ALPN. `off` exists for servers
/// that advertise `h2` but handle it badly; plain `http://` upstreams are always
/// HTTP/1.1 (no h2c), whatever this says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub(super) enum RawHttp2 {
    Auto,
    Off,
}

impl TryFrom<String> for RawHttp2 {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        variant(&s, &[("auto", RawHttp2::Auto), ("off", RawHttp2::Off)])
    }
}

/// Whether a non-streaming request goes upstream as a stream the gateway assembles
/// (`always`, so `first_token_ms` and `idle_ms` bound it) or as the client sent it
/// (`as_client`, for a server that cannot stream).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub(super) enum RawUpstreamStreaming {
    Always,
    AsClient,
}

impl TryFrom<String> for RawUpstreamStreaming {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        variant(
            &s,
            &[
                ("always", RawUpstreamStreaming::Always),
                ("as_client", RawUpstreamStreaming::AsClient),
            ],
        )
    }
}

/// Each timeout may be given alone; the others keep their defaults.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
pub(super) struct RawTimeouts {
    pub connect_ms: Option<u64>,
    pub first_token_ms: Option<u64>,
    pub idle_ms: Option<u64>,
    pub total_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
pub(super) struct RawModel {
    /// The one-deployment form; `deployments` is the other, and exactly one is given.
    pub provider: Option<String>,
    pub upstream_model: Option<String>,
    pub deployments: Option<Vec<RawDeployment>>,
    /// Absent: `least_busy`.
    pub balance: Option<RawBalance>,
    pub price: RawPrice,
    pub max_output_tokens: Option<u32>,
}

/// One place that serves a model: a provider, the name it knows the model by, and
/// that provider account's quota for it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
pub(super) struct RawDeployment {
    pub provider: String,
    pub upstream_model: Option<String>,
    pub weight: Option<u32>,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
}

/// The order a model's deployments are tried in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub(super) enum RawBalance {
    LeastBusy,
    Weighted,
    LowestLatency,
}

impl TryFrom<String> for RawBalance {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        variant(
            &s,
            &[
                ("least_busy", RawBalance::LeastBusy),
                ("weighted", RawBalance::Weighted),
                ("lowest_latency", RawBalance::LowestLatency),
            ],
        )
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
pub(super) struct RawPrice {
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
    pub cached_input_per_mtok: Option<f64>,
}

/// `api_keys` and `models` default to empty so that leaving them out gets a message
/// saying why they are needed, and the rest of the tenant is still checked.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
pub(crate) struct RawTenant {
    #[serde(default)]
    pub api_keys: Vec<RawApiKey>,
    #[serde(default)]
    pub models: Vec<String>,
    pub pin_model: Option<String>,
    #[serde(default)]
    pub fallback: Vec<String>,
    #[serde(default)]
    pub allow_fallback_override: bool,
    pub region: Option<String>,
    pub rate: Option<RawRate>,
    pub budget: Option<RawBudget>,
    pub cache: Option<RawTenantCache>,
    pub guard: Option<RawGuard>,
}

/// `tenants.X.guard`: what to do when the tenant's spend this hour runs away.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
pub(crate) struct RawGuard {
    pub velocity_factor: Option<f64>,
    pub min_hourly_usd: Option<f64>,
    pub action: Option<String>,
    pub throttle_rps: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
pub(crate) struct RawApiKey {
    pub id: String,
    pub sha256: String,
    pub name: Option<String>,
    /// A subset of the tenant's models; absent: all of them.
    pub models: Option<Vec<String>>,
    pub rate: Option<RawRate>,
    pub budget: Option<RawBudget>,
    /// RFC 3339; from then on the key answers 401.
    pub expires_at: Option<String>,
    #[serde(default)]
    pub disabled: bool,
    /// A rotated-out secret's hash, still accepted until `previous_until` (RFC 3339).
    /// Written by the key store only; a file has no use for it but may carry it.
    pub previous_sha256: Option<String>,
    pub previous_until: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
pub(crate) struct RawRate {
    pub rps: Option<u32>,
    pub tpm: Option<u64>,
    pub concurrency: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
pub(crate) struct RawBudget {
    pub monthly_usd: Option<f64>,
    pub hourly_usd: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
pub(crate) struct RawTenantCache {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default = "default_ttl_s")]
    pub ttl_s: u64,
}

impl Default for RawTenantCache {
    fn default() -> Self {
        RawTenantCache {
            enabled: false,
            ttl_s: default_ttl_s(),
        }
    }
}

fn default_ttl_s() -> u64 {
    300
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub(super) enum RawBackend {
    Memory,
    Redis,
}

impl TryFrom<String> for RawBackend {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        variant(
            &s,
            &[("memory", RawBackend::Memory), ("redis", RawBackend::Redis)],
        )
    }
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(try_from = "String")]
pub(super) enum RawOnError {
    FailOpen,
    FailClosed,
}

impl TryFrom<String> for RawOnError {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        variant(
            &s,
            &[
                ("fail_open", RawOnError::FailOpen),
                ("fail_closed", RawOnError::FailClosed),
            ],
        )
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
pub(super) struct RawCounters {
    pub backend: RawBackend,
    pub url: Option<String>,
    pub on_error: Option<RawOnError>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
pub(super) struct RawCache {
    #[serde(default = "default_cache_max_bytes")]
    pub max_bytes: u64,
}

fn default_cache_max_bytes() -> u64 {
    256 * 1024 * 1024
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub(super) enum RawStoreBackend {
    Sqlite,
    Postgres,
}

impl TryFrom<String> for RawStoreBackend {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        variant(
            &s,
            &[
                ("sqlite", RawStoreBackend::Sqlite),
                ("postgres", RawStoreBackend::Postgres),
            ],
        )
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
pub(super) struct RawStore {
    pub backend: RawStoreBackend,
    pub path: Option<PathBuf>,
    pub url_env: Option<String>,
    pub sync_ms: Option<u64>,
    pub snapshot: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
pub(super) struct RawAudit {
    #[serde(default = "default_spool_dir")]
    pub spool_dir: PathBuf,
    pub clickhouse: Option<RawClickHouse>,
}

fn default_spool_dir() -> PathBuf {
    PathBuf::from("./data/spool")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
pub(super) struct RawClickHouse {
    pub url: String,
    #[serde(default = "default_database")]
    pub database: String,
    #[serde(default = "default_table")]
    pub table: String,
    #[serde(default = "default_user")]
    pub user: String,
    pub password_env: Option<String>,
    #[serde(default = "default_batch_rows")]
    pub batch_rows: u64,
    #[serde(default = "default_flush_ms")]
    pub flush_ms: u64,
}

fn default_database() -> String {
    "default".into()
}
fn default_table() -> String {
    "llm_audit".into()
}
fn default_user() -> String {
    "default".into()
}
fn default_batch_rows() -> u64 {
    5000
}
fn default_flush_ms() -> u64 {
    1000
}

/// Reads the document section by section; `None` only when it is not YAML at all or
/// not a mapping, since then there is nothing further to check.
pub(super) fn parse(text: &str, report: &mut Report) -> Option<RawConfig> {
    let mut doc: Value = match serde_yaml::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            report.error("", format!("not valid YAML: {e}"));
            return None;
        }
    };
    if let Err(e) = doc.apply_merge() {
        report.error("", format!("cannot apply a YAML merge key (<<): {e}"));
        return None;
    }
    let top = match doc {
        Value::Mapping(m) => m,
        Value::Null => Mapping::new(),
        other => {
            report.error(
                "",
                format!(
                    "the file must be a mapping of sections, found {}",
                    describe(&other)
                ),
            );
            return None;
        }
    };

    let mut raw = RawConfig {
        node: Sec::Absent,
        listen: Sec::Absent,
        admin: Sec::Absent,
        max_body_bytes: Sec::Absent,
        providers: Sec::Absent,
        models: Sec::Absent,
        tenants: Sec::Absent,
        counters: Sec::Absent,
        cache: Sec::Absent,
        audit: Sec::Absent,
        store: Sec::Absent,
        alerts: Sec::Absent,
    };
    for (pos, (key, value)) in top.into_iter().enumerate() {
        let Some(name) = key_string(&key) else {
            report.error(
                "",
                format!("section names must be strings, found {}", describe(&key)),
            );
            continue;
        };
        let at = child("", &name);
        report.rank(at.clone(), pos, 0);
        match name.as_str() {
            "node" => raw.node = section(value, &at, report),
            "listen" => raw.listen = section(value, &at, report),
            "admin" => raw.admin = section(value, &at, report),
            "max_body_bytes" => raw.max_body_bytes = section(value, &at, report),
            "providers" => raw.providers = entries(value, &at, pos, report),
            "models" => raw.models = entries(value, &at, pos, report),
            "tenants" => raw.tenants = entries(value, &at, pos, report),
            "counters" => raw.counters = section(value, &at, report),
            "cache" => raw.cache = section(value, &at, report),
            "audit" => raw.audit = section(value, &at, report),
            "store" => raw.store = section(value, &at, report),
            "alerts" => raw.alerts = section(value, &at, report),
            _ => {
                let expected: Vec<String> = SECTIONS.iter().map(|s| format!("`{s}`")).collect();
                report.error(
                    at,
                    format!(
                        "unknown field `{name}`, expected one of {}",
                        expected.join(", ")
                    ),
                );
            }
        }
    }
    Some(raw)
}

fn section<T: DeserializeOwned>(value: Value, at: &str, report: &mut Report) -> Sec<T> {
    Sec::from_parsed(deserialize(value, at, report))
}

fn entries<T: DeserializeOwned>(
    value: Value,
    at: &str,
    pos: usize,
    report: &mut Report,
) -> Sec<Entries<T>> {
    let map = match value {
        Value::Mapping(m) => m,
        // `tenants:` with nothing under it reads as an empty section, not a type error.
        Value::Null => return Sec::Valid(Vec::new()),
        other => {
            report.error(
                at,
                format!(
                    "expected a mapping of names to entries, found {}",
                    describe(&other)
                ),
            );
            return Sec::Invalid;
        }
    };
    let mut out = Vec::with_capacity(map.len());
    for (i, (key, value)) in map.into_iter().enumerate() {
        let Some(name) = key_string(&key) else {
            report.error(
                at,
                format!("entry names must be strings, found {}", describe(&key)),
            );
            continue;
        };
        let entry_at = child(at, &name);
        report.rank(entry_at.clone(), pos, i + 1);
        let parsed = deserialize(value, &entry_at, report);
        out.push((name, parsed));
    }
    Sec::Valid(out)
}

/// Numeric names (`1234:` as a tenant id) are accepted as the text they were written as.
fn key_string(key: &Value) -> Option<String> {
    match key {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// `alerts:` (validated in `alerts.rs`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
pub(crate) struct RawAlerts {
    #[serde(default)]
    pub webhooks: Vec<RawWebhook>,
    pub budget_thresholds: Option<Vec<f64>>,
    pub velocity: Option<RawVelocity>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
pub(crate) struct RawWebhook {
    pub name: String,
    pub url: String,
    pub secret_env: Option<String>,
    pub format: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
pub(crate) struct RawVelocity {
    pub factor: f64,
    pub min_hourly_usd: f64,
}
