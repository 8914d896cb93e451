//! Per-tenant routing policy: which models a request may try, in which order.
//!
//! The chain is decided once, before anything goes upstream, so every later step
//! (reservation, attempts, audit) works from the same list. Which of a model's
//! deployments serves is decided per attempt, from live state (`pool`).

pub mod cooldown;
pub mod pool;

use crate::config::{ApiKey, Config, Model, Tenant};
use crate::error::{ErrorKind, GatewayError};
use std::sync::Arc;

/// The ordered candidates for one request.
#[derive(Debug, Clone)]
pub struct Chain {
    pub models: Vec<Arc<Model>>,
    /// The model the client asked for, as sent (empty when none).
    pub requested: String,
    /// The tenant's region pin: only deployments there are tried.
    pub region: Option<String>,
}

impl Chain {
    pub fn first(&self) -> &Arc<Model> {
        &self.models[0]
    }
}

/// Builds `[first choice] + fallback`, deduplicated, allowed-only and region-filtered.
///
/// `override_header` is the raw `x-gateway-fallback` value, if the client sent one.
pub fn plan(
    cfg: &Config,
    tenant: &Tenant,
    key: &ApiKey,
    requested: Option<&str>,
    override_header: Option<&str>,
) -> Result<Chain, GatewayError> {
    // A key narrows its tenant's models; it never widens them (validated at load).
    let allowed = |m: &Model| key.allows(&m.name) && tenant.models.iter().any(|a| a.name == m.name);
    let first = match (&tenant.pin_model, requested) {
        (Some(pin), _) if !key.allows(&pin.name) => {
            return Err(GatewayError::new(
                ErrorKind::ModelNotAllowed,
                format!(
                    "The tenant's pinned model '{}' is not enabled for this API key",
                    pin.name
                ),
            ))
        }
        (Some(pin), _) => pin.clone(),
        (None, Some(name)) => {
            let model = cfg.model(name).ok_or_else(|| {
                GatewayError::new(
                    ErrorKind::ModelNotFound,
                    format!("The model '{name}' does not exist"),
                )
            })?;
            if !allowed(model) {
                return Err(GatewayError::new(
                    ErrorKind::ModelNotAllowed,
                    format!("The model '{name}' is not enabled for this API key"),
                ));
            }
            model.clone()
        }
        (None, None) => tenant
            .models
            .iter()
            .find(|m| key.allows(&m.name))
            .unwrap_or(&tenant.models[0])
            .clone(),
    };

    let fallback: Vec<Arc<Model>> = match override_header {
        Some(raw) => {
            if !tenant.allow_fallback_override {
                return Err(GatewayError::new(
                    ErrorKind::FallbackOverrideNotAllowed,
                    "x-gateway-fallback is not allowed for this tenant",
                ));
            }
            let mut v = Vec::new();
            for name in raw.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                let m = cfg.model(name).ok_or_else(|| {
                    GatewayError::new(
                        ErrorKind::ModelNotFound,
                        format!("x-gateway-fallback names an unknown model '{name}'"),
                    )
                })?;
                v.push(m.clone());
            }
            v
        }
        None => tenant.fallback.clone(),
    };

    let mut models: Vec<Arc<Model>> = Vec::with_capacity(1 + fallback.len());
    for m in std::iter::once(first).chain(fallback) {
        if !allowed(&m) || models.iter().any(|x| x.name == m.name) {
            continue;
        }
        if let Some(region) = &tenant.region {
            if !m.serves_region(region) {
                continue;
            }
        }
        models.push(m);
    }
    if models.is_empty() {
        return Err(GatewayError::new(
            ErrorKind::RegionNotAllowed,
            format!(
                "no allowed model is served in region '{}'",
                tenant.region.as_deref().unwrap_or("")
            ),
        ));
    }
    Ok(Chain {
        models,
        requested: requested.unwrap_or("").to_string(),
        region: tenant.region.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::sha256_hex;

    const YAML: &str = r#"
node: { region: us }
listen: { http: 127.0.0.1:18080 }
providers:
  us1: { kind: openai_compatible, base_url: "http://127.0.0.1:9", region: us }
  eu1: { kind: openai_compatible, base_url: "http://127.0.0.1:9", region: eu }
models:
  a: { provider: us1, price: { input_per_mtok: 1, output_per_mtok: 2 } }
  b: { provider: us1, price: { input_per_mtok: 1, output_per_mtok: 2 } }
  c: { provider: eu1, price: { input_per_mtok: 1, output_per_mtok: 2 } }
  z: { provider: us1, price: { input_per_mtok: 1, output_per_mtok: 2 } }
tenants:
  open:
    api_keys: [ { id: k1, sha256: "H1" } ]
    models: [a, b, c]
    fallback: [c, b, a, z]
    allow_fallback_override: true
  pinned:
    api_keys: [ { id: k2, sha256: "H2" } ]
    models: [a, b, c]
    pin_model: b
    fallback: [a]
  euonly:
    api_keys: [ { id: k3, sha256: "H3" } ]
    models: [a, b, c]
    fallback: [a, b, c]
    region: eu
  usonly:
    api_keys: [ { id: k4, sha256: "H4" } ]
    models: [c]
    region: us
"#;

    fn cfg() -> Config {
        let yaml = YAML
            .replace("H1", &sha256_hex("k1"))
            .replace("H2", &sha256_hex("k2"))
            .replace("H3", &sha256_hex("k3"))
            .replace("H4", &sha256_hex("k4"));
        Config::from_yaml_str(&yaml).unwrap()
    }

    fn names(c: &Chain) -> Vec<&str> {
        c.models.iter().map(|m| m.name.as_str()).collect()
    }

    #[test]
    fn client_choice_then_fallback_deduplicated_and_allowed_only() {
        let cfg = cfg();
        let t = cfg.tenant("open").unwrap();
        let c = plan(&cfg, t, &t.api_keys[0], Some("b"), None).unwrap();
        // z is not allowed for the tenant; b appears once.
        assert_eq!(names(&c), ["b", "c", "a"]);
        assert_eq!(c.requested, "b");
        let d = plan(&cfg, t, &t.api_keys[0], None, None).unwrap();
        assert_eq!(names(&d), ["a", "c", "b"]);
    }

    #[test]
    fn pin_ignores_the_client_model() {
        let cfg = cfg();
        let t = cfg.tenant("pinned").unwrap();
        let c = plan(&cfg, t, &t.api_keys[0], Some("c"), None).unwrap();
        assert_eq!(names(&c), ["b", "a"]);
        assert_eq!(c.requested, "c");
    }

    #[test]
    fn unknown_and_disallowed_models() {
        let cfg = cfg();
        let t = cfg.tenant("open").unwrap();
        let e = plan(&cfg, t, &t.api_keys[0], Some("nope"), None).unwrap_err();
        assert_eq!(e.kind, ErrorKind::ModelNotFound);
        let e = plan(&cfg, t, &t.api_keys[0], Some("z"), None).unwrap_err();
        assert_eq!(e.kind, ErrorKind::ModelNotAllowed);
    }

    #[test]
    fn region_pin_filters_every_candidate() {
        let cfg = cfg();
        let t = cfg.tenant("euonly").unwrap();
        let c = plan(&cfg, t, &t.api_keys[0], Some("a"), None).unwrap();
        // a and b are on a us provider: never tried, not even as fallbacks.
        assert_eq!(names(&c), ["c"]);
        let t = cfg.tenant("usonly").unwrap();
        let e = plan(&cfg, t, &t.api_keys[0], None, None).unwrap_err();
        assert_eq!(e.kind, ErrorKind::RegionNotAllowed);
        assert_eq!(e.status(), 403);
    }

    #[test]
    fn override_header_replaces_fallback() {
        let cfg = cfg();
        let t = cfg.tenant("open").unwrap();
        let c = plan(&cfg, t, &t.api_keys[0], Some("a"), Some("b, a")).unwrap();
        assert_eq!(names(&c), ["a", "b"]);
        let e = plan(&cfg, t, &t.api_keys[0], Some("a"), Some("b,nope")).unwrap_err();
        assert_eq!((e.kind, e.status()), (ErrorKind::ModelNotFound, 400));
        let t = cfg.tenant("pinned").unwrap();
        let e = plan(&cfg, t, &t.api_keys[0], None, Some("a")).unwrap_err();
        assert_eq!(e.status(), 403);
    }
}
