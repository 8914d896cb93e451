//! Tenants: the policy each API key is held to.
//!
//! Model references are resolved against the already-built models; a reference to a
//! model that exists but is broken is left unreported, since that model's own error
//! already explains it.

use super::money::usd_to_nanousd;
use super::named::{sub, Named, Ref};
use super::raw::{RawApiKey, RawTenant};
use super::report::{child, item, Report};
use super::{
    ApiKey, Budget, Guard, GuardAction, Model, Provider, Rate, Tenant, TenantCache, TenantSource,
};
use std::collections::HashMap;
use std::sync::Arc;

/// Resolves a list of model names; `None` when some name could not be resolved.
fn resolve_models(
    names: &[String],
    at: &str,
    models: &Named<Model>,
    report: &mut Report,
) -> Option<Vec<Arc<Model>>> {
    let mut out = Vec::with_capacity(names.len());
    let mut ok = true;
    for (i, name) in names.iter().enumerate() {
        match models.get(name) {
            Ref::Found(m) => out.push(m.clone()),
            Ref::Broken => ok = false,
            Ref::Missing => {
                report.error(
                    item(at, i),
                    format!("unknown model `{name}` ({})", models.known()),
                );
                ok = false;
            }
        }
    }
    ok.then_some(out)
}

/// Where a tenant comes from decides what it must have: a file tenant without keys
/// is a mistake, a store tenant gets its keys issued after it is created.
pub(super) fn build_tenant(
    id: &str,
    raw: RawTenant,
    at: &str,
    models: &Named<Model>,
    providers: &Named<Provider>,
    key_owners: &mut HashMap<[u8; 32], String>,
    report: &mut Report,
) -> Option<Tenant> {
    build_tenant_from(
        id,
        raw,
        at,
        TenantSource::File,
        models,
        providers,
        key_owners,
        report,
    )
}

#[allow(clippy::too_many_arguments)]
pub(super) fn build_tenant_from(
    id: &str,
    raw: RawTenant,
    at: &str,
    source: TenantSource,
    models: &Named<Model>,
    providers: &Named<Provider>,
    key_owners: &mut HashMap<[u8; 32], String>,
    report: &mut Report,
) -> Option<Tenant> {
    let mut ok = true;
    let api_keys = tenant_keys(&raw, at, source, key_owners, report);
    ok &= api_keys.is_some();

    let models_at = child(at, "models");
    if raw.models.is_empty() {
        report.error(
            &models_at,
            "a tenant needs at least one model (the first is its default)",
        );
        ok = false;
    }
    let allowed = resolve_models(&raw.models, &models_at, models, report);
    let is_allowed = |m: &Model| allowed.iter().flatten().any(|a| a.name == m.name);
    for (i, name) in raw.models.iter().enumerate() {
        if raw.models[..i].contains(name) {
            report.warn(item(&models_at, i), format!("`{name}` is listed twice"));
        }
    }

    let pin_at = child(at, "pin_model");
    let pin = match raw
        .pin_model
        .as_deref()
        .map(|name| (name, models.get(name)))
    {
        None => None,
        Some((_, Ref::Found(m))) => {
            if allowed.is_some() && !is_allowed(m) {
                report.error(
                    &pin_at,
                    format!("`{}` is not in this tenant's models", m.name),
                );
                ok = false;
            }
            Some(m.clone())
        }
        Some((_, Ref::Broken)) => {
            ok = false;
            None
        }
        Some((name, Ref::Missing)) => {
            report.error(
                &pin_at,
                format!("unknown model `{name}` ({})", models.known()),
            );
            ok = false;
            None
        }
    };

    let fallback_at = child(at, "fallback");
    let fallback = resolve_models(&raw.fallback, &fallback_at, models, report);
    if let (Some(fallback), Some(_)) = (&fallback, &allowed) {
        for (i, m) in fallback.iter().enumerate() {
            if !is_allowed(m) {
                report.warn(
                    item(&fallback_at, i),
                    format!(
                        "`{}` is not in this tenant's models, so it is never tried",
                        m.name
                    ),
                );
            }
        }
    }

    let region = raw.region.as_deref().map(str::trim).map(str::to_string);
    if let Some(r) = &region {
        let region_at = child(at, "region");
        let in_region = |m: &Arc<Model>| m.serves_region(r);
        if r.is_empty() {
            report.error(
                &region_at,
                "must not be empty (leave it out for no region pin)",
            );
            ok = false;
        } else if !providers.values().any(|p| &p.region == r) {
            report.warn(
                &region_at,
                format!("no provider is in region `{r}`: every request will be refused"),
            );
        } else if let Some(allowed) = &allowed {
            if !allowed.iter().any(in_region) {
                report.warn(
                    &region_at,
                    format!("none of this tenant's models is served in region `{r}`"),
                );
            } else if pin.as_ref().is_some_and(|p| !in_region(p)) {
                report.warn(
                    &pin_at,
                    format!("the pinned model is not served in region `{r}`"),
                );
            }
        }
    }

    let rate = build_rate(raw.rate.as_ref(), at, &mut ok, report);
    let budget = build_budget(raw.budget.as_ref(), at, &mut ok, report);
    let guard = raw
        .guard
        .as_ref()
        .and_then(|g| build_guard(g, &child(at, "guard"), &mut ok, report));
    if let (Some(keys), Some(allowed)) = (&api_keys, &allowed) {
        for (i, key) in keys.iter().enumerate() {
            for (j, name) in key.models.iter().flatten().enumerate() {
                if !allowed.iter().any(|m| &m.name == name) {
                    report.error(
                        item(&child(&item(&child(at, "api_keys"), i), "models"), j),
                        format!("`{name}` is not in this tenant's models"),
                    );
                    ok = false;
                }
            }
        }
    }

    let cache = raw.cache.unwrap_or_default();
    if cache.ttl_s == 0 {
        report.error(sub(at, "cache", "ttl_s"), "must be greater than 0");
        ok = false;
    }

    if !ok {
        return None;
    }
    Some(Tenant {
        id: id.to_string(),
        source,
        disabled: false,
        api_keys: api_keys?,
        models: allowed?,
        pin_model: pin,
        fallback: fallback?,
        allow_fallback_override: raw.allow_fallback_override,
        region,
        rate,
        budget,
        cache: TenantCache {
            enabled: cache.enabled,
            ttl_s: cache.ttl_s,
        },
        guard,
    })
}

/// Defaults: a factor of 10 over a floor of 10 USD an hour, alert only; a throttled
/// tenant gets 1 request a second unless `throttle_rps` says otherwise.
fn build_guard(
    raw: &super::raw::RawGuard,
    at: &str,
    ok: &mut bool,
    report: &mut Report,
) -> Option<Guard> {
    let mut fine = true;
    let factor = raw.velocity_factor.unwrap_or(10.0);
    if !factor.is_finite() || !(1.0..=1_000_000.0).contains(&factor) {
        report.error(
            child(at, "velocity_factor"),
            "must be a number from 1 to 1000000 (this hour's spend over the hourly average)",
        );
        fine = false;
    }
    let min_hourly_nanousd = match usd_to_nanousd(raw.min_hourly_usd.unwrap_or(10.0)) {
        Ok(n) => n,
        Err(e) => {
            report.error(child(at, "min_hourly_usd"), e);
            fine = false;
            0
        }
    };
    let action = match raw.action.as_deref().unwrap_or("alert") {
        "alert" => GuardAction::Alert,
        "throttle" => GuardAction::Throttle,
        "block" => GuardAction::Block,
        other => {
            report.error(
                child(at, "action"),
                format!("`{other}` is not one of: alert, throttle, block"),
            );
            fine = false;
            GuardAction::Alert
        }
    };
    if raw.throttle_rps == Some(0) {
        report.error(
            child(at, "throttle_rps"),
            "must be greater than 0 (use action: block to refuse every request)",
        );
        fine = false;
    } else if raw.throttle_rps.is_some() && action != GuardAction::Throttle {
        report.warn(child(at, "throttle_rps"), "only used with action: throttle");
    }
    if !fine {
        *ok = false;
        return None;
    }
    Some(Guard {
        factor_milli: (factor * 1000.0).round() as u64,
        min_hourly_nanousd,
        action,
        throttle_rps: raw.throttle_rps.unwrap_or(1),
    })
}

/// A key hash may belong to one key of one tenant only, or authentication would be
/// ambiguous.
fn tenant_keys(
    raw: &RawTenant,
    at: &str,
    source: TenantSource,
    key_owners: &mut HashMap<[u8; 32], String>,
    report: &mut Report,
) -> Option<Vec<Arc<ApiKey>>> {
    let keys_at = child(at, "api_keys");
    if raw.api_keys.is_empty() && source == TenantSource::File {
        report.error(
            &keys_at,
            "a tenant needs at least one API key (`llm-gateway hash-key KEY` prints its sha256)",
        );
        return None;
    }
    let mut ok = true;
    let mut out: Vec<Arc<ApiKey>> = Vec::with_capacity(raw.api_keys.len());
    for (i, key) in raw.api_keys.iter().enumerate() {
        let key_at = item(&keys_at, i);
        let id = key.id.trim();
        if id.is_empty() || !id.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            report.error(
                child(&key_at, "id"),
                "must be printable ASCII without spaces",
            );
            ok = false;
        } else if let Some(j) = raw.api_keys[..i].iter().position(|k| k.id.trim() == id) {
            report.error(
                child(&key_at, "id"),
                format!("key id `{id}` is already used by {}", item(&keys_at, j)),
            );
            ok = false;
        }
        let hash_at = child(&key_at, "sha256");
        let Some(sha256) = parse_hash(&key.sha256, &hash_at, report) else {
            ok = false;
            continue;
        };
        if let Some(owner) = key_owners.get(&sha256) {
            report.error(
                &hash_at,
                format!("the same key hash is already used by {owner}: a key can belong to one tenant key only"),
            );
            ok = false;
        } else {
            key_owners.insert(sha256, hash_at);
        }
        match key_policy(key, &key_at, report) {
            Some(policy) => out.push(Arc::new(ApiKey {
                id: id.to_string(),
                sha256,
                ..policy
            })),
            None => ok = false,
        }
    }
    ok.then_some(out)
}

fn parse_hash(text: &str, at: &str, report: &mut Report) -> Option<[u8; 32]> {
    let text = text.trim();
    let mut sha256 = [0u8; 32];
    if text.len() != 64 || hex::decode_to_slice(text, &mut sha256).is_err() {
        report.error(
            at,
            "must be exactly 64 hex characters (the output of `llm-gateway hash-key KEY`)",
        );
        return None;
    }
    Some(sha256)
}

/// A key's own fields besides its id and hash (which the caller sets).
fn key_policy(key: &RawApiKey, at: &str, report: &mut Report) -> Option<ApiKey> {
    let mut ok = true;
    let rate = build_rate(key.rate.as_ref(), at, &mut ok, report);
    let budget = build_budget(key.budget.as_ref(), at, &mut ok, report);
    let time = |field: &str, v: &Option<String>, report: &mut Report, ok: &mut bool| {
        let v = v.as_deref()?;
        let parsed = crate::audit::time::parse_rfc3339(v.trim());
        if parsed.is_none() {
            report.error(
                child(at, field),
                format!("`{v}` is not an RFC 3339 time (e.g. 2027-01-31T00:00:00Z)"),
            );
            *ok = false;
        }
        parsed
    };
    let expires_at_ms = time("expires_at", &key.expires_at, report, &mut ok);
    let previous_until = time("previous_until", &key.previous_until, report, &mut ok);
    let previous = match (&key.previous_sha256, previous_until) {
        (Some(h), Some(until)) => {
            let hash = parse_hash(h, &child(at, "previous_sha256"), report);
            ok &= hash.is_some();
            hash.map(|h| Box::new((h, until)))
        }
        (None, None) => None,
        (Some(_), None) if key.previous_until.is_none() => {
            report.error(
                child(at, "previous_until"),
                "a rotated-out secret needs the time until which it is accepted",
            );
            ok = false;
            None
        }
        _ => None,
    };
    if let Some(name) = &key.name {
        if name.len() > 256 {
            report.error(child(at, "name"), "must be at most 256 bytes");
            ok = false;
        }
    }
    if key.models.as_ref().is_some_and(|m| m.is_empty()) {
        report.error(
            child(at, "models"),
            "must name at least one model (leave it out for all of the tenant's)",
        );
        ok = false;
    }
    ok.then(|| ApiKey {
        id: String::new(),
        sha256: [0; 32],
        name: key.name.clone(),
        models: key.models.clone(),
        rate,
        budget,
        expires_at_ms,
        disabled: key.disabled,
        previous,
    })
}

fn build_rate(
    raw: Option<&super::raw::RawRate>,
    at: &str,
    ok: &mut bool,
    report: &mut Report,
) -> Rate {
    let Some(rate) = raw else {
        return Rate::default();
    };
    let positive = [
        ("rps", rate.rps.map(u64::from)),
        ("tpm", rate.tpm),
        ("concurrency", rate.concurrency.map(u64::from)),
    ];
    for (key, v) in positive {
        if v == Some(0) {
            report.error(
                sub(at, "rate", key),
                "must be greater than 0 (leave it out for no limit)",
            );
            *ok = false;
        }
    }
    Rate {
        rps: rate.rps,
        tpm: rate.tpm,
        concurrency: rate.concurrency,
    }
}

fn build_budget(
    raw: Option<&super::raw::RawBudget>,
    at: &str,
    ok: &mut bool,
    report: &mut Report,
) -> Budget {
    let Some(budget) = raw else {
        return Budget::default();
    };
    let mut nanos = |key: &str, usd: Option<f64>| -> Option<u64> {
        let usd = usd?;
        let path = sub(at, "budget", key);
        match usd_to_nanousd(usd) {
            Ok(0) => {
                report.warn(path, "a budget of 0 refuses every request with 402");
                Some(0)
            }
            Ok(n) => Some(n),
            Err(e) => {
                report.error(path, e);
                *ok = false;
                None
            }
        }
    };
    Budget {
        monthly_nanousd: nanos("monthly_usd", budget.monthly_usd),
        hourly_nanousd: nanos("hourly_usd", budget.hourly_usd),
    }
}

/// Builds the key store's tenants against a running config's models and providers,
/// with the file's rules and messages: the store keeps each tenant as the JSON of a
/// file tenant's fields, and each key as the JSON of an `api_keys` entry.
pub struct StoreTenantBuilder {
    models: Named<Model>,
    providers: Named<Provider>,
}

impl StoreTenantBuilder {
    pub fn new(cfg: &super::Config) -> Self {
        StoreTenantBuilder {
            models: Named::from_built(&cfg.models, |m| &m.name),
            providers: Named::from_built(&cfg.providers, |p| &p.name),
        }
    }

    /// `spec` is a JSON object of tenant fields (no `api_keys`); `keys` are JSON
    /// objects of `api_keys` entries. Paths in errors are relative to the tenant
    /// (`rate.rps`, `api_keys[0].budget.monthly_usd`), as the admin API reports them.
    pub fn build(
        &self,
        id: &str,
        spec: &str,
        keys: &[&str],
        disabled: bool,
    ) -> Result<Tenant, super::ConfigErrors> {
        let mut report = Report::default();
        if super::named::check_name("tenants", id, "id", &mut report) {
            let mut de = serde_json::Deserializer::from_str(spec);
            let raw: Option<RawTenant> = super::report::deserialize_from(&mut de, "", &mut report);
            let mut parsed_keys = Vec::with_capacity(keys.len());
            for (i, k) in keys.iter().enumerate() {
                let mut de = serde_json::Deserializer::from_str(k);
                let at = item("api_keys", i);
                if let Some(key) =
                    super::report::deserialize_from::<_, RawApiKey>(&mut de, &at, &mut report)
                {
                    parsed_keys.push(key);
                }
            }
            if let Some(mut raw) = raw {
                if !raw.api_keys.is_empty() {
                    report.error(
                        "api_keys",
                        "keys are issued with POST /admin/v1/tenants/{id}/keys, not set on the tenant",
                    );
                }
                raw.api_keys = parsed_keys;
                let mut owners = HashMap::new();
                if let Some(mut t) = build_tenant_from(
                    id,
                    raw,
                    "",
                    TenantSource::Store,
                    &self.models,
                    &self.providers,
                    &mut owners,
                    &mut report,
                ) {
                    if !report.has_errors() {
                        t.disabled = disabled;
                        return Ok(t);
                    }
                }
            }
        }
        let mut errors = report.into_errors();
        if errors.is_empty() {
            errors.push(super::ConfigError {
                path: String::new(),
                message: "invalid tenant".into(),
            });
        }
        Err(super::ConfigErrors(errors))
    }
}
