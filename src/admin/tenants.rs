//! The tenant and key API of the admin listener (`/admin/v1/tenants...`,
//! `/admin/v1/changes`).
//!
//! Reads answer from this node's memory (file tenants and the store's last state), so
//! they work while the database is down; writes go to the database and answer 503
//! `store_unavailable` when it cannot be reached in time. No answer ever carries a
//! key's hash; a secret appears once, in the answer that issued it.

use super::{error, json_reply, Admin};
use crate::audit::time::rfc3339;
use crate::config::{ApiKey, Tenant};
use crate::store::{ops, KeyRec, Store, StoreError, TenantRec};
use http::Response;
use serde_json::{json, Value};
use std::sync::Arc;

/// A request to the tenant API, already authorised.
pub(super) struct Call<'a> {
    pub method: &'a str,
    /// The path below `/admin/v1/`, split on `/`.
    pub parts: Vec<&'a str>,
    pub query: &'a str,
    pub body: Value,
    /// `x-admin-actor`, recorded in the change log (who, when the token is shared).
    pub actor: Option<String>,
}

pub(super) fn store_error(e: StoreError) -> Response<Vec<u8>> {
    match e {
        StoreError::Unavailable(msg) => json_reply(
            503,
            json!({"error": {"message": format!("the tenant store is unavailable: {msg}"), "code": "store_unavailable", "status": 503}}),
        ),
        StoreError::NotFound(msg) => json_reply(
            404,
            json!({"error": {"message": msg, "code": "not_found", "status": 404}}),
        ),
        StoreError::Conflict(code, msg) => json_reply(
            409,
            json!({"error": {"message": msg, "code": code, "status": 409}}),
        ),
        StoreError::Invalid(errors) => {
            let message = errors
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; ");
            let fields: Vec<Value> = errors
                .iter()
                .map(|e| json!({"field": e.path, "message": e.message}))
                .collect();
            json_reply(
                400,
                json!({"error": {"message": message, "code": "invalid_request", "status": 400, "fields": fields}}),
            )
        }
    }
}

fn not_found(msg: &'static str) -> Response<Vec<u8>> {
    store_error(StoreError::NotFound(msg))
}

fn no_store() -> Response<Vec<u8>> {
    store_error(StoreError::Conflict(
        "store_not_configured",
        "no tenant store is configured (`store:` in the config file): tenants come from the file only".into(),
    ))
}

/// A tenant from the file, in the API's shape (the same as a store tenant's).
fn file_tenant_view(t: &Tenant) -> Value {
    let mut v = crate::store::spec::tenant(t);
    if let Value::Object(m) = &mut v {
        m.insert("id".into(), t.id.clone().into());
        m.insert("source".into(), "file".into());
        m.insert("disabled".into(), false.into());
        m.insert("keys".into(), t.api_keys.len().into());
    }
    v
}

/// A stored tenant: the fields as set through the API, plus where it stands.
fn store_tenant_view(rec: &TenantRec, broken: Option<String>) -> Value {
    let mut v: Value = serde_json::from_str(&rec.spec).unwrap_or_else(|_| json!({}));
    if let Value::Object(m) = &mut v {
        m.insert("id".into(), rec.id.clone().into());
        m.insert("source".into(), "store".into());
        m.insert("disabled".into(), rec.disabled.into());
        m.insert(
            "created_at".into(),
            rfc3339(rec.created_ms.max(0) as u64).into(),
        );
        m.insert(
            "updated_at".into(),
            rfc3339(rec.updated_ms.max(0) as u64).into(),
        );
        m.insert(
            "keys".into(),
            rec.keys
                .iter()
                .filter(|k| k.revoked_ms.is_none())
                .count()
                .into(),
        );
        if let Some(b) = broken {
            m.insert("not_served".into(), b.into());
        }
    }
    v
}

fn file_key_view(tenant: &str, k: &ApiKey) -> Value {
    let mut v = crate::store::spec::key(k, false);
    if let Value::Object(m) = &mut v {
        m.insert("tenant".into(), tenant.into());
        m.insert("source".into(), "file".into());
        m.entry("disabled").or_insert(false.into());
        m.insert("revoked".into(), false.into());
    }
    v
}

fn store_key_view(tenant: &str, k: &KeyRec) -> Value {
    let spec: Value = serde_json::from_str(&k.spec).unwrap_or_else(|_| json!({}));
    let mut v = ops::public_fields(&spec);
    if let Value::Object(m) = &mut v {
        m.insert("id".into(), k.id.clone().into());
        m.insert("tenant".into(), tenant.into());
        m.insert("source".into(), "store".into());
        m.entry("disabled").or_insert(false.into());
        m.insert("revoked".into(), k.revoked_ms.is_some().into());
        m.insert(
            "revoked_at".into(),
            k.revoked_ms.map(|t| rfc3339(t.max(0) as u64)).into(),
        );
        m.insert(
            "created_at".into(),
            rfc3339(k.created_ms.max(0) as u64).into(),
        );
        m.insert(
            "updated_at".into(),
            rfc3339(k.updated_ms.max(0) as u64).into(),
        );
        // The rotated-out secret's grace: when it stops working (its hash is not shown).
        if let Some(until) = m.remove("previous_until") {
            m.insert("previous_secret_valid_until".into(), until);
        }
    }
    v
}

fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|p| p.split_once('=').or(Some((p, ""))))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn limit_param(query: &str, default: usize) -> Result<usize, StoreError> {
    match query_param(query, "limit") {
        None => Ok(default),
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=10_000).contains(&n) => Ok(n),
            _ => Err(StoreError::Invalid(vec![crate::config::ConfigError {
                path: "limit".into(),
                message: "must be between 1 and 10000".into(),
            }])),
        },
    }
}

impl Admin {
    fn store(&self) -> Option<&Arc<Store>> {
        self.store.as_ref()
    }

    /// Routes `/admin/v1/tenants...` and `/admin/v1/changes`; `None` for paths this
    /// module does not serve (usage, audit, purge: the caller's).
    pub(super) async fn tenant_api(&self, c: Call<'_>) -> Option<Response<Vec<u8>>> {
        let actor = c.actor.as_deref();
        let p = &c.parts;
        Some(match (c.method, p.as_slice()) {
            ("GET", ["changes"]) => self.changes(c.query).await,
            ("GET", ["tenants"]) => self.list_tenants(c.query),
            ("POST", ["tenants"]) => match self.store() {
                Some(s) => match ops::create_tenant(s, &c.body, actor).await {
                    Ok(rec) => json_reply(201, store_tenant_view(&rec, None)),
                    Err(e) => store_error(e),
                },
                None => no_store(),
            },
            ("GET", ["tenants", id]) => self.get_tenant(id),
            ("PATCH", ["tenants", id]) => {
                self.write(id, |s| async move {
                    ops::patch_tenant(s, id, &c.body, actor)
                        .await
                        .map(|rec| json_reply(200, store_tenant_view(&rec, s.broken(id))))
                })
                .await
            }
            ("DELETE", ["tenants", id]) => {
                self.write(id, |s| async move {
                    ops::disable_tenant(s, id, actor)
                        .await
                        .map(|rec| json_reply(200, store_tenant_view(&rec, None)))
                })
                .await
            }
            ("GET", ["tenants", id, "keys"]) => self.list_keys(id),
            ("POST", ["tenants", id, "keys"]) => {
                self.write(id, |s| async move {
                    ops::create_key(s, id, &c.body, actor)
                        .await
                        .map(|(rec, secret)| {
                            let mut v = store_key_view(id, &rec);
                            v["key"] = secret.into();
                            json_reply(201, v)
                        })
                })
                .await
            }
            ("PATCH", ["tenants", id, "keys", key]) => {
                self.write(id, |s| async move {
                    ops::patch_key(s, id, key, &c.body, actor)
                        .await
                        .map(|rec| json_reply(200, store_key_view(id, &rec)))
                })
                .await
            }
            ("DELETE", ["tenants", id, "keys", key]) => {
                self.write(id, |s| async move {
                    ops::revoke_key(s, id, key, actor)
                        .await
                        .map(|rec| json_reply(200, store_key_view(id, &rec)))
                })
                .await
            }
            ("POST", ["tenants", id, "keys", key, "rotate"]) => {
                let grace = match c.body.get("grace_s") {
                    None | Some(Value::Null) => Some(0),
                    Some(v) => v.as_u64(),
                };
                let Some(grace) = grace else {
                    return Some(store_error(StoreError::Invalid(vec![
                        crate::config::ConfigError {
                            path: "grace_s".into(),
                            message: "must be a whole number of seconds".into(),
                        },
                    ])));
                };
                if let Value::Object(m) = &c.body {
                    if let Some(k) = m.keys().find(|k| k.as_str() != "grace_s") {
                        return Some(store_error(StoreError::Invalid(vec![
                            crate::config::ConfigError {
                                path: k.clone(),
                                message: format!("unknown field `{k}`, expected `grace_s`"),
                            },
                        ])));
                    }
                }
                self.write(id, |s| async move {
                    ops::rotate_key(s, id, key, grace, actor)
                        .await
                        .map(|(rec, secret)| {
                            let mut v = store_key_view(id, &rec);
                            v["key"] = secret.into();
                            json_reply(201, v)
                        })
                })
                .await
            }
            ("GET", ["tenants", id, "keys", key, "usage"]) => self.key_usage(id, key).await,
            ("POST", ["tenants", id, "guard", "clear"]) => self.clear_guard(id, &c.body).await,
            _ => return None,
        })
    }

    /// `POST /admin/v1/tenants/{id}/guard/clear` (`{"for_s": N}`, default 3600):
    /// on-call stands the tenant's spend guard down and keeps it from engaging again
    /// for N seconds (the default runs past the end of this hour, so a clear is not
    /// undone by the next check while the hour's spend is still over the threshold).
    async fn clear_guard(&self, id: &str, body: &Value) -> Response<Vec<u8>> {
        let cfg = self.gateway.config();
        let Some(t) = cfg.tenant(id) else {
            return error(404, "no such tenant");
        };
        if t.guard.is_none() {
            return error(409, &format!("tenant `{id}` has no spend guard (`guard:`)"));
        }
        let for_s = match body.get("for_s") {
            None | Some(Value::Null) => Some(3600),
            Some(v) => v.as_u64().filter(|n| *n <= 31 * 86_400),
        };
        let Some(for_s) = for_s else {
            return error(
                400,
                "for_s: must be a whole number of seconds, at most 31 days",
            );
        };
        if let Value::Object(m) = body {
            if let Some(k) = m.keys().find(|k| k.as_str() != "for_s") {
                return error(400, &format!("unknown field `{k}`, expected `for_s`"));
            }
        }
        let (change, shared) = self.gateway.limits.clear_guard(t, for_s).await;
        let was_engaged = change.is_some();
        if let Some(c) = &change {
            self.gateway.guard_changed(c);
        }
        match shared {
            Ok(()) => json_reply(
                200,
                json!({"tenant": id, "cleared": true, "was_engaged": was_engaged, "for_s": for_s,
                       "guard": self.gateway.limits.guard_view(t)}),
            ),
            Err(e) => error(
                503,
                &format!(
                    "cleared on this node only: the shared counter store is unreachable ({e})"
                ),
            ),
        }
    }

    /// A write to a store tenant: refused for file tenants (409) and without a store.
    async fn write<'a, F, Fut>(&'a self, id: &str, f: F) -> Response<Vec<u8>>
    where
        F: FnOnce(&'a Store) -> Fut,
        Fut: std::future::Future<Output = Result<Response<Vec<u8>>, StoreError>>,
    {
        if self.gateway.config().file_tenant(id).is_some() {
            return store_error(StoreError::Conflict(
                "tenant_in_config_file",
                format!("tenant `{id}` is defined in the config file, which the admin API cannot change"),
            ));
        }
        match self.store() {
            Some(s) => f(s).await.unwrap_or_else(store_error),
            None => no_store(),
        }
    }

    fn list_tenants(&self, query: &str) -> Response<Vec<u8>> {
        let limit = match limit_param(query, 1_000) {
            Ok(n) => n,
            Err(e) => return store_error(e),
        };
        let after = query_param(query, "after").unwrap_or("");
        let cfg = self.gateway.config();
        let mut out: Vec<(String, Value)> = cfg.tenants[..cfg.file_tenants]
            .iter()
            .filter(|t| t.id.as_str() > after)
            .map(|t| (t.id.clone(), file_tenant_view(t)))
            .collect();
        if let Some(s) = self.store() {
            for id in s.tenant_ids().into_iter().filter(|id| id.as_str() > after) {
                if cfg.file_tenant(&id).is_some() {
                    continue;
                }
                if let Some(rec) = s.tenant(&id) {
                    let broken = s.broken(&id);
                    out.push((id, store_tenant_view(&rec, broken)));
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        let more = out.len() > limit;
        out.truncate(limit);
        let next = if more {
            out.last().map(|(id, _)| id.clone())
        } else {
            None
        };
        json_reply(
            200,
            json!({"tenants": out.into_iter().map(|(_, v)| v).collect::<Vec<_>>(), "next_after": next}),
        )
    }

    fn get_tenant(&self, id: &str) -> Response<Vec<u8>> {
        let cfg = self.gateway.config();
        if let Some(t) = cfg.file_tenant(id) {
            return json_reply(200, file_tenant_view(t));
        }
        match self
            .store()
            .and_then(|s| s.tenant(id).map(|r| (r, s.broken(id))))
        {
            Some((rec, broken)) => json_reply(200, store_tenant_view(&rec, broken)),
            None => not_found("no such tenant"),
        }
    }

    fn list_keys(&self, id: &str) -> Response<Vec<u8>> {
        let cfg = self.gateway.config();
        if let Some(t) = cfg.file_tenant(id) {
            let keys: Vec<Value> = t.api_keys.iter().map(|k| file_key_view(id, k)).collect();
            return json_reply(200, json!({"tenant": id, "keys": keys}));
        }
        match self.store().and_then(|s| s.tenant(id)) {
            Some(rec) => {
                let keys: Vec<Value> = rec.keys.iter().map(|k| store_key_view(id, k)).collect();
                json_reply(200, json!({"tenant": id, "keys": keys}))
            }
            None => not_found("no such tenant"),
        }
    }

    async fn key_usage(&self, id: &str, key: &str) -> Response<Vec<u8>> {
        let cfg = self.gateway.config();
        let Some(tenant) = cfg.tenant(id) else {
            return not_found("no such tenant");
        };
        let Some(k) = tenant.api_keys.iter().find(|k| k.id == key) else {
            return not_found("no such key");
        };
        match self.gateway.limits.key_usage(tenant, k).await {
            Ok(view) => json_reply(200, serde_json::to_value(view).unwrap_or_default()),
            Err(e) => json_reply(
                503,
                json!({"error": {"message": format!("counter store unavailable: {e}"), "status": 503}}),
            ),
        }
    }

    async fn changes(&self, query: &str) -> Response<Vec<u8>> {
        let Some(s) = self.store() else {
            return no_store();
        };
        let limit = match limit_param(query, 1_000) {
            Ok(n) => n,
            Err(e) => return store_error(e),
        };
        let since = match query_param(query, "since") {
            None => 0,
            Some(v) => match crate::audit::time::parse_rfc3339(&super::decode_time(v)) {
                Some(ms) => ms,
                None => {
                    return store_error(StoreError::Invalid(vec![crate::config::ConfigError {
                        path: "since".into(),
                        message: "must be an RFC 3339 timestamp".into(),
                    }]))
                }
            },
        };
        match ops::changes(s, since, limit).await {
            Ok(rows) => json_reply(200, json!({"changes": rows})),
            Err(e) => store_error(e),
        }
    }
}
