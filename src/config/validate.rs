//! Turns the raw file into the runtime form: names become `Arc`s, secrets are read
//! from the environment, money becomes nano-USD.
//!
//! Entries are built in dependency order (providers, models, tenants). An entry that
//! is broken is still remembered by name, so that references to it do not produce a
//! second "unknown" error on top of the real one.

use super::named::{check_name, sub, Named};
use super::net::base_url;
use super::raw::{Entries, RawConfig, RawHttp2, RawKind, RawProvider, RawUpstreamStreaming, Sec};
use super::report::{child, Report};
use super::sections::{self, env_secret};
use super::tenant;
use super::{
    Admin, AuditConf, BaseUrl, CacheConf, Counters, Listen, Model, Node, Provider, ProviderKind,
    StoreConf, Tenant, Timeouts,
};
use std::collections::HashMap;
use std::sync::Arc;

/// Everything a `Config` is made of, once every section is valid.
pub(super) struct Parts {
    pub node: Node,
    pub listen: Listen,
    pub admin: Admin,
    pub max_body_bytes: usize,
    pub providers: Vec<Arc<Provider>>,
    pub models: Vec<Arc<Model>>,
    pub tenants: Vec<Arc<Tenant>>,
    pub counters: Counters,
    pub cache: CacheConf,
    pub audit: AuditConf,
    pub store: Option<StoreConf>,
    pub alerts: Option<super::AlertsConf>,
}

pub(super) fn build(raw: RawConfig, report: &mut Report) -> Option<Parts> {
    let node = sections::node(raw.node, report);
    let listen = sections::listen(raw.listen, report);
    let admin = sections::admin(raw.admin, report);
    let max_body_bytes = sections::max_body_bytes(raw.max_body_bytes, report);
    let providers = named(raw.providers, "providers", report, build_provider);
    let models = named(raw.models, "models", report, |name, raw, at, report| {
        super::model::build_model(name, raw, at, &providers, report)
    });
    let mut key_owners = HashMap::new();
    let tenants = named(raw.tenants, "tenants", report, |id, raw, at, report| {
        tenant::build_tenant(id, raw, at, &models, &providers, &mut key_owners, report)
    });
    let counters = sections::counters(raw.counters, report);
    let cache = sections::cache(raw.cache);
    let audit = sections::audit(raw.audit, report);
    let store = sections::store(raw.store, report);
    let alerts = super::alerts::alerts(raw.alerts, report);

    if let (Some(listen), Some(admin)) = (&listen, &admin) {
        let taken = [listen.http, listen.https.as_ref().map(|h| h.addr)];
        if taken.contains(&Some(admin.listen)) {
            report.error(
                "admin.listen",
                format!("{} is also a client listener", admin.listen),
            );
        }
    }
    for (name, provider) in &providers.items {
        let used = |m: &Arc<Model>| m.deployments.iter().any(|d| &d.provider.name == name);
        if provider.is_some() && !models.values().any(used) {
            report.warn(child("providers", name), "no model uses this provider");
        }
    }
    super::model::check_shared_quotas(&models, report);
    if tenants.section_ok && tenants.items.is_empty() {
        report.warn(
            "tenants",
            "no tenants: every request will be refused with 401",
        );
    }
    if let Some(c) = &cache {
        if c.max_bytes == 0 && tenants.values().any(|t| t.cache.enabled) {
            report.warn(
                "cache.max_bytes",
                "0 turns the response cache off, although some tenants enable it",
            );
        }
    }

    Some(Parts {
        node: node?,
        listen: listen?,
        admin: admin?,
        max_body_bytes: max_body_bytes?,
        providers: providers.into_values(),
        models: models.into_values(),
        tenants: tenants.into_values(),
        counters: counters?,
        cache: cache?,
        audit: audit?,
        store: store?,
        alerts: alerts?,
    })
}

fn named<R, T>(
    sec: Sec<Entries<R>>,
    section: &str,
    report: &mut Report,
    mut build: impl FnMut(&str, R, &str, &mut Report) -> Option<T>,
) -> Named<T> {
    let (section_ok, entries) = match sec {
        Sec::Valid(e) => (true, e),
        Sec::Invalid => (false, Vec::new()),
        Sec::Absent => {
            report.error(section, "required section is missing");
            (false, Vec::new())
        }
    };
    let mut out = Named {
        section_ok,
        items: Vec::with_capacity(entries.len()),
        index: HashMap::with_capacity(entries.len()),
    };
    for (name, raw) in entries {
        let at = child(section, &name);
        let name_ok = check_name(section, &name, &at, report);
        let built = raw.and_then(|raw| build(&name, raw, &at, report));
        out.index.insert(name.clone(), out.items.len());
        out.items
            .push((name, built.filter(|_| name_ok).map(Arc::new)));
    }
    out
}

fn build_provider(name: &str, raw: RawProvider, at: &str, report: &mut Report) -> Option<Provider> {
    let mut ok = true;
    let mut err = |report: &mut Report, key: &str, msg: String| {
        report.error(child(at, key), msg);
        ok = false;
    };
    let kind = match raw.kind {
        RawKind::OpenAi => ProviderKind::OpenAi,
        RawKind::Anthropic => ProviderKind::Anthropic,
        RawKind::OpenAiCompatible => ProviderKind::OpenAiCompatible,
        RawKind::AzureOpenAi => ProviderKind::AzureOpenAi,
    };
    let api_version = match (raw.api_version, kind) {
        (Some(v), ProviderKind::AzureOpenAi) => {
            let v = v.trim().to_string();
            // It goes into the query string as is: only what Azure's versions use.
            let usable = !v.is_empty()
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
            if !usable {
                err(
                    report,
                    "api_version",
                    "must be an Azure OpenAI API version such as \"2024-10-21\"".into(),
                );
            }
            Some(v)
        }
        (None, ProviderKind::AzureOpenAi) => {
            err(
                report,
                "api_version",
                "a provider of kind azure_openai needs api_version, e.g. \"2024-10-21\"".into(),
            );
            None
        }
        (Some(_), _) => {
            err(
                report,
                "api_version",
                format!("only a provider of kind azure_openai takes api_version, not {kind}"),
            );
            None
        }
        (None, _) => None,
    };
    let url = base_url(&raw.base_url)
        .map_err(|e| err(report, "base_url", e))
        .ok();
    let api_key = match (&raw.api_key_env, kind) {
        (Some(var), _) => env_secret(var)
            .map_err(|e| err(report, "api_key_env", e))
            .ok(),
        (None, ProviderKind::OpenAiCompatible) => None,
        (None, _) => {
            err(
                report,
                "api_key_env",
                format!("a provider of kind {kind} needs api_key_env: the environment variable holding its API key"),
            );
            None
        }
    };
    let region = raw.region.trim().to_string();
    if region.is_empty() {
        err(report, "region", "must not be empty".into());
    }
    let t = raw.timeouts.unwrap_or_default();
    let d = Timeouts::default();
    let timeouts = Timeouts {
        connect_ms: t.connect_ms.unwrap_or(d.connect_ms),
        first_token_ms: t.first_token_ms.unwrap_or(d.first_token_ms),
        idle_ms: t.idle_ms.unwrap_or(d.idle_ms),
        total_ms: t.total_ms.unwrap_or(d.total_ms),
    };
    let each = [
        ("connect_ms", timeouts.connect_ms),
        ("first_token_ms", timeouts.first_token_ms),
        ("idle_ms", timeouts.idle_ms),
        ("total_ms", timeouts.total_ms),
    ];
    for (key, v) in each {
        if v == 0 {
            report.error(sub(at, "timeouts", key), "must be greater than 0");
            ok = false;
        } else if v > timeouts.total_ms {
            report.warn(
                sub(at, "timeouts", key),
                format!(
                    "{v} is longer than total_ms ({}), which wins",
                    timeouts.total_ms
                ),
            );
        }
    }
    let url = url?;
    if !url.tls && api_key.is_some() && !is_local(&url) {
        report.warn(
            child(at, "base_url"),
            "plain http: the provider's API key crosses the network unencrypted",
        );
    }
    ok.then(|| Provider {
        name: name.to_string(),
        kind,
        base_url: url,
        api_key,
        api_version,
        region,
        timeouts,
        http2: raw.http2.unwrap_or(RawHttp2::Auto) == RawHttp2::Auto,
        stream_always: raw
            .upstream_streaming
            .unwrap_or(RawUpstreamStreaming::Always)
            == RawUpstreamStreaming::Always,
    })
}

fn is_local(url: &BaseUrl) -> bool {
    let host = url.host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}
