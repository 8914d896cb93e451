//! Per-tenant routing policy: which models a request may try, in which order.
//!
//! The chain is decided once, before anything goes upstream, so every later step
//! (reservation, attempts, audit) works from the same list.

use crate::config::{Config, Model, Tenant};
use crate::error::{ErrorKind, GatewayError};
use std::sync::Arc;

/// The ordered candidates for one request.
#[derive(Debug, Clone)]
pub struct Chain {
    pub models: Vec<Arc<Model>>,
    /// The model the client asked for, as sent (empty when none).
    pub requested: String,
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
    requested: Option<&str>,
    override_header: Option<&str>,
) -> Result<Chain, GatewayError> {
    let allowed = |m: &Model| tenant.models.iter().any(|a| a.name == m.name);
    let first = match (&tenant.pin_model, requested) {
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
        (None, None) => tenant.models[0].clone(),
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
            if &m.provider.region != region {
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
    })
}
