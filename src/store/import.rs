//! `llm-gateway import-tenants --config FILE`: moves a file's tenants into the store,
//! so an operator can migrate from the file to the admin API.
//!
//! Idempotent: a tenant or key already stored as the file has it is left alone, one
//! that differs is updated, a missing one created. Keys keep their ids and hashes, so
//! clients keep their secrets. The file's tenants keep working while both hold them
//! (the file wins for an id in both); remove them from the file and reload to hand
//! them to the store.

use super::{Host, Store};
use crate::config::Config;
use serde_json::Value;
use std::path::Path;
use std::sync::{Arc, RwLock};

/// The config the importer validates against; nothing is served.
struct Offline(RwLock<Arc<Config>>);

impl Host for Offline {
    fn config(&self) -> Arc<Config> {
        match self.0.read() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn install(&self, _cfg: Arc<Config>) {}
}

/// The file's tenants as `(id, fields without api_keys, api_keys)` in JSON.
fn file_tenants(text: &str) -> Result<Vec<(String, Value, Vec<Value>)>, String> {
    let mut doc: serde_yaml::Value =
        serde_yaml::from_str(text).map_err(|e| format!("not valid YAML: {e}"))?;
    doc.apply_merge()
        .map_err(|e| format!("cannot apply a YAML merge key: {e}"))?;
    let Some(tenants) = doc.get("tenants").and_then(|t| t.as_mapping()) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::with_capacity(tenants.len());
    for (id, t) in tenants {
        let id = match id {
            serde_yaml::Value::String(s) => s.clone(),
            serde_yaml::Value::Number(n) => n.to_string(),
            _ => continue,
        };
        let mut spec: Value = serde_json::to_value(t).map_err(|e| format!("tenants.{id}: {e}"))?;
        let keys = match spec.as_object_mut().and_then(|m| m.remove("api_keys")) {
            Some(Value::Array(k)) => k,
            _ => Vec::new(),
        };
        out.push((id, spec, keys));
    }
    Ok(out)
}

pub fn run(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let cfg = Config::load(path).map_err(|e| format!("invalid configuration:\n{e}"))?;
    let Some(conf) = cfg.store.clone() else {
        return Err(format!(
            "{}: no `store:` section: there is no store to import into",
            path.display()
        ));
    };
    let tenants = file_tenants(&text)?;
    let host = Arc::new(Offline(RwLock::new(Arc::new(cfg))));
    let store = Store::open(&conf, host)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    rt.block_on(async {
        store
            .initial_load(std::time::Duration::from_secs(10))
            .await?;
        if store.health().source != "database" {
            return Err(format!("the {} database is unreachable", store.backend()));
        }
        let r = super::ops::import(&store, &tenants)
            .await
            .map_err(|e| match e {
                super::StoreError::Invalid(errors) => errors
                    .iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("\n"),
                super::StoreError::Unavailable(m) => format!("the store is unavailable: {m}"),
                super::StoreError::NotFound(m) => m.to_string(),
                super::StoreError::Conflict(_, m) => m,
            })?;
        Ok(format!(
            "imported {} tenants into the {} store: {} created, {} updated, {} unchanged; keys: {} added, {} updated",
            tenants.len(),
            store.backend(),
            r.created,
            r.updated,
            r.unchanged,
            r.keys_added,
            r.keys_updated
        ))
    })
}
