//! Tenants: the policy each API key is held to.
//!
//! Model references are resolved against the already-built models; a reference to a
//! model that exists but is broken is left unreported, since that model's own error
//! already explains it.

use super::money::usd_to_nanousd;
use super::raw::RawTenant;
use super::report::{child, item, Report};
use super::validate::{sub, Named, Ref};
use super::{ApiKey, Budget, Model, Provider, Rate, Tenant, TenantCache};
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

pub(super) fn build_tenant(
    id: &str,
    raw: RawTenant,
    at: &str,
    models: &Named<Model>,
    providers: &Named<Provider>,
    key_owners: &mut HashMap<[u8; 32], String>,
    report: &mut Report,
) -> Option<Tenant> {
    let mut ok = true;
    let api_keys = tenant_keys(&raw, at, key_owners, report);
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
        let in_region = |m: &Arc<Model>| &m.provider.region == r;
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

    let rate = raw.rate.unwrap_or_default();
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
            ok = false;
        }
    }

    let budget = raw.budget.unwrap_or_default();
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
                ok = false;
                None
            }
        }
    };
    let budget = Budget {
        monthly_nanousd: nanos("monthly_usd", budget.monthly_usd),
        hourly_nanousd: nanos("hourly_usd", budget.hourly_usd),
    };

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
        api_keys: api_keys?,
        models: allowed?,
        pin_model: pin,
        fallback: fallback?,
        allow_fallback_override: raw.allow_fallback_override,
        region,
        rate: Rate {
            rps: rate.rps,
            tpm: rate.tpm,
            concurrency: rate.concurrency,
        },
        budget,
        cache: TenantCache {
            enabled: cache.enabled,
            ttl_s: cache.ttl_s,
        },
    })
}

/// A key hash may belong to one key of one tenant only, or authentication would be
/// ambiguous.
fn tenant_keys(
    raw: &RawTenant,
    at: &str,
    key_owners: &mut HashMap<[u8; 32], String>,
    report: &mut Report,
) -> Option<Vec<ApiKey>> {
    let keys_at = child(at, "api_keys");
    if raw.api_keys.is_empty() {
        report.error(
            &keys_at,
            "a tenant needs at least one API key (`llm-gateway hash-key KEY` prints its sha256)",
        );
        return None;
    }
    let mut ok = true;
    let mut out: Vec<ApiKey> = Vec::with_capacity(raw.api_keys.len());
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
        let text = key.sha256.trim();
        let mut sha256 = [0u8; 32];
        if text.len() != 64 || hex::decode_to_slice(text, &mut sha256).is_err() {
            report.error(
                &hash_at,
                "must be exactly 64 hex characters (the output of `llm-gateway hash-key KEY`)",
            );
            ok = false;
            continue;
        }
        if let Some(owner) = key_owners.get(&sha256) {
            report.error(
                &hash_at,
                format!("the same key hash is already used by {owner}: a key can belong to one tenant key only"),
            );
            ok = false;
        } else {
            key_owners.insert(sha256, hash_at);
        }
        out.push(ApiKey {
            id: id.to_string(),
            sha256,
        });
    }
    ok.then_some(out)
}
