//! `llm-gateway import-tenants --config FILE`: moves a file's tenants into the store,
//! so an operator can migrate from the file to the admin API.
//!
//! Idempotent: a tenant or key already stored as the file has it is left alone, one
//! that differs is updated, a missing one created. Keys keep their ids and hashes, so
//! clients keep their secrets. The file's tenants keep working while both hold them
//! (the file wins for an id in both); remove them from the file and reload to hand
//! them to the store.

use super::db::Val;
use super::ops::{key_row, public_fields, record, tenant_row, validate, write_tx, Change};
use super::{Store, StoreError};
use crate::config::Config;
use serde_json::json;
use serde_json::Value;
use std::path::Path;
use std::sync::Arc;

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
    let host = Arc::new(super::ConfigCell::new(cfg));
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
        let r = import(&store, &tenants)
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

/// What `import-tenants` did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Imported {
    pub created: usize,
    pub updated: usize,
    pub unchanged: usize,
    pub keys_added: usize,
    pub keys_updated: usize,
}

/// Moves file tenants into the store: creates missing tenants and keys, updates those
/// that differ, leaves equal ones alone, so running it twice changes nothing.
/// `tenants` are `(id, spec without api_keys, api_keys entries)` as JSON.
pub async fn import(
    store: &Store,
    tenants: &[(String, Value, Vec<Value>)],
) -> Result<Imported, StoreError> {
    let mut out = Imported::default();
    for (id, spec, keys) in tenants {
        let spec_text = spec.to_string();
        let key_texts: Vec<String> = keys.iter().map(Value::to_string).collect();
        validate(store, id, &spec_text, &key_texts, None)?;
        let r: Result<Imported, StoreError> = write_tx!(store, |conn, v, now| {
            let mut one = Imported::default();
            match tenant_row(&mut conn, id).await {
                Ok(t) => {
                    let same = serde_json::from_str::<Value>(&t.spec).ok().as_ref() == Some(spec);
                    if same && !t.disabled {
                        one.unchanged += 1;
                    } else {
                        conn.exec(
                            "UPDATE gw_tenants SET spec = $2, disabled = 0, updated_ms = $3, version = $4 WHERE id = $1",
                            &[Val::Text(id.clone()), Val::Text(spec_text.clone()), Val::Int(now), Val::Int(v)],
                        )
                        .await?;
                        one.updated += 1;
                    }
                }
                Err(StoreError::NotFound(_)) => {
                    conn.exec(
                        "INSERT INTO gw_tenants (id, spec, disabled, created_ms, updated_ms, version) VALUES ($1, $2, 0, $3, $3, $4)",
                        &[Val::Text(id.clone()), Val::Text(spec_text.clone()), Val::Int(now), Val::Int(v)],
                    )
                    .await?;
                    one.created += 1;
                }
                Err(e) => return Err(e),
            }
            for (k, text_k) in keys.iter().zip(&key_texts) {
                let kid = k
                    .get("id")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                match key_row(&mut conn, id, &kid).await {
                    Ok(rec) => {
                        let same =
                            serde_json::from_str::<Value>(&rec.spec).ok().as_ref() == Some(k);
                        if !same || rec.revoked_ms.is_some() {
                            conn.exec(
                                "UPDATE gw_keys SET spec = $3, revoked_ms = NULL, updated_ms = $4, version = $5 WHERE tenant = $1 AND id = $2",
                                &[Val::Text(id.clone()), Val::Text(kid.clone()), Val::Text(text_k.clone()), Val::Int(now), Val::Int(v)],
                            )
                            .await?;
                            one.keys_updated += 1;
                        }
                    }
                    Err(StoreError::NotFound(_)) => {
                        conn.exec(
                            "INSERT INTO gw_keys (tenant, id, spec, created_ms, updated_ms, revoked_ms, version) VALUES ($1, $2, $3, $4, $4, NULL, $5)",
                            &[Val::Text(id.clone()), Val::Text(kid.clone()), Val::Text(text_k.clone()), Val::Int(now), Val::Int(v)],
                        )
                        .await?;
                        one.keys_added += 1;
                    }
                    Err(e) => return Err(e),
                }
            }
            if one.unchanged == 0 || one.keys_added + one.keys_updated > 0 {
                let public: Vec<Value> = keys.iter().map(public_fields).collect();
                record(
                    &mut conn,
                    now,
                    Some("import-tenants"),
                    Change {
                        action: "tenant.import",
                        tenant: id,
                        key_id: None,
                        fields: json!({"tenant": spec, "api_keys": public}),
                    },
                )
                .await?;
            }
            Ok(one)
        });
        let one = r?;
        out.created += one.created;
        out.updated += one.updated;
        out.unchanged += one.unchanged;
        out.keys_added += one.keys_added;
        out.keys_updated += one.keys_updated;
    }
    Ok(out)
}
