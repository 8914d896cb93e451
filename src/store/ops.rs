//! Reads and writes of the store's rows.
//!
//! Every write is one transaction that first bumps `gw_meta.version` (which also
//! serialises writers: on Postgres the row lock, on SQLite the immediate write lock),
//! stamps what it touches with the new version, appends its entry to `gw_changes`
//! and, on Postgres, queues a `NOTIFY` that is delivered at commit. Validation runs
//! inside the transaction, on the rows as they are then, so two nodes patching one
//! tenant cannot together produce a tenant neither checked.

use super::db::{Conn, Val, CHANNEL};
use super::read::{int, key_rec, tenant_rec, text};
use super::{flag, KeyRec, Store, StoreError, TenantRec};
use crate::audit::time::rfc3339;
use crate::config::ConfigError;
use rand::Rng;
use serde_json::{json, Map, Value};

/// One admin write, as `GET /admin/v1/changes` lists it.
pub(super) struct Change<'a> {
    pub action: &'static str,
    pub tenant: &'a str,
    pub key_id: Option<&'a str>,
    /// The fields set, with their new values; never a secret or a hash.
    pub fields: Value,
}

/// Runs `$body` in a write transaction with `$v` the new version and `$now` the
/// time, within the store's write timeout; commits on `Ok`, rolls back on `Err`.
macro_rules! write_tx {
    ($store:expr, |$conn:ident, $v:ident, $now:ident| $body:block) => {{
        let fut = async {
            let mut $conn = $store.db.connect().await?;
            $conn.begin().await?;
            let r: Result<_, $crate::store::StoreError> = async {
                let $v = $crate::store::ops::bump(&mut $conn).await?;
                let $now = $crate::audit::time::now_ms() as i64;
                $body
            }
            .await;
            match r {
                Ok(x) => {
                    $conn.commit().await?;
                    $store.db.release($conn);
                    Ok(x)
                }
                Err(e) => {
                    $conn.rollback().await;
                    Err(e)
                }
            }
        };
        let r = match tokio::time::timeout($store.write_timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err($crate::store::StoreError::Unavailable(format!(
                "the {} database did not answer within {} ms",
                $store.db.backend(),
                $store.write_timeout.as_millis()
            ))),
        };
        if r.is_ok() {
            // This node sees its own write before the answer goes out; the others
            // see it by NOTIFY or, at the latest, their next poll.
            let _ = $store.sync_now().await;
        } else if let Err($crate::store::StoreError::Unavailable(e)) = &r {
            $store.mark_stale(e);
        }
        r
    }};
}
pub(super) use write_tx;

pub(crate) async fn bump(conn: &mut Conn) -> Result<i64, StoreError> {
    let rows = conn
        .query(
            "UPDATE gw_meta SET version = version + 1 WHERE id = 1 RETURNING version",
            &[],
        )
        .await?;
    rows.first()
        .and_then(|r| r[0].int())
        .ok_or_else(|| StoreError::Unavailable("gw_meta has no version row".into()))
}

pub(super) async fn record(
    conn: &mut Conn,
    now: i64,
    actor: Option<&str>,
    c: Change<'_>,
) -> Result<(), StoreError> {
    conn.exec(
        "INSERT INTO gw_changes (at_ms, action, tenant, key_id, actor, fields) VALUES ($1, $2, $3, $4, $5, $6)",
        &[
            Val::Int(now),
            Val::Text(c.action.into()),
            Val::Text(c.tenant.into()),
            Val::opt_text(c.key_id),
            Val::opt_text(actor),
            Val::Text(c.fields.to_string()),
        ],
    )
    .await?;
    if let Conn::Pg(_) = conn {
        // `exec`: pg_notify returns `void`, which has no Rust type to read into.
        conn.exec(
            "SELECT pg_notify($1, $2)",
            &[Val::Text(CHANNEL.into()), Val::Text(c.tenant.into())],
        )
        .await?;
    }
    Ok(())
}

fn invalid(path: &str, message: impl Into<String>) -> StoreError {
    StoreError::Invalid(vec![ConfigError {
        path: path.to_string(),
        message: message.into(),
    }])
}

fn object(body: &Value) -> Result<Map<String, Value>, StoreError> {
    match body {
        Value::Object(m) => Ok(m.clone()),
        _ => Err(invalid("", "the body must be a JSON object")),
    }
}

/// RFC 7386: `null` removes a field, objects merge, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            if let Value::Object(t) = target {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn only_fields(m: &Map<String, Value>, allowed: &[&str]) -> Result<(), StoreError> {
    let mut errors = Vec::new();
    for k in m.keys() {
        if !allowed.contains(&k.as_str()) {
            let expected: Vec<String> = allowed.iter().map(|a| format!("`{a}`")).collect();
            errors.push(ConfigError {
                path: k.clone(),
                message: format!(
                    "unknown field `{k}`, expected one of {}",
                    expected.join(", ")
                ),
            });
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(StoreError::Invalid(errors))
    }
}

/// Validates a tenant with its keys; errors name fields relative to `at_key` when
/// checking one key (`rate.rps` rather than `api_keys[3].rate.rps`).
pub(super) fn validate(
    store: &Store,
    id: &str,
    spec: &str,
    keys: &[String],
    key_prefix: Option<String>,
) -> Result<(), StoreError> {
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    match store.builder().build(id, spec, &refs, false) {
        Ok(_) => Ok(()),
        Err(e) => {
            let errors =
                e.0.into_iter()
                    .map(|mut err| {
                        if let Some(p) = &key_prefix {
                            if let Some(rest) = err.path.strip_prefix(p.as_str()) {
                                err.path = rest.trim_start_matches('.').to_string();
                            }
                        }
                        err
                    })
                    .collect();
            Err(StoreError::Invalid(errors))
        }
    }
}

async fn live_keys(
    conn: &mut Conn,
    tenant: &str,
    except: Option<&str>,
) -> Result<Vec<String>, StoreError> {
    let rows = conn
        .query(
            "SELECT id, spec FROM gw_keys WHERE tenant = $1 AND revoked_ms IS NULL ORDER BY id",
            &[Val::Text(tenant.into())],
        )
        .await?;
    Ok(rows
        .into_iter()
        .filter(|r| except != Some(text(r, 0).as_str()))
        .map(|r| text(&r, 1))
        .collect())
}

pub(super) async fn tenant_row(conn: &mut Conn, id: &str) -> Result<TenantRec, StoreError> {
    let rows = conn
        .query(
            "SELECT id, spec, disabled, created_ms, updated_ms FROM gw_tenants WHERE id = $1",
            &[Val::Text(id.into())],
        )
        .await?;
    rows.first()
        .map(|r| tenant_rec(r))
        .ok_or(StoreError::NotFound("no such tenant"))
}

pub(super) async fn key_row(conn: &mut Conn, tenant: &str, id: &str) -> Result<KeyRec, StoreError> {
    let rows = conn
        .query(
            "SELECT id, spec, created_ms, updated_ms, revoked_ms FROM gw_keys WHERE tenant = $1 AND id = $2",
            &[Val::Text(tenant.into()), Val::Text(id.into())],
        )
        .await?;
    rows.first()
        .map(|r| key_rec(r))
        .ok_or(StoreError::NotFound("no such key"))
}

fn file_tenant(store: &Store, id: &str) -> Result<(), StoreError> {
    if store.host_config().file_tenant(id).is_some() {
        return Err(StoreError::Conflict(
            "tenant_in_config_file",
            format!(
                "tenant `{id}` is defined in the config file, which the admin API cannot change"
            ),
        ));
    }
    Ok(())
}

pub async fn create_tenant(
    store: &Store,
    body: &Value,
    actor: Option<&str>,
) -> Result<TenantRec, StoreError> {
    let mut spec = object(body)?;
    let id = match spec.remove("id") {
        Some(Value::String(s)) => s,
        Some(_) => return Err(invalid("id", "must be a string")),
        None => return Err(invalid("id", "required: the tenant's id")),
    };
    if spec.contains_key("api_keys") {
        return Err(invalid(
            "api_keys",
            "keys are issued with POST /admin/v1/tenants/{id}/keys, not set on the tenant",
        ));
    }
    file_tenant(store, &id)?;
    let spec_text = Value::Object(spec.clone()).to_string();
    validate(store, &id, &spec_text, &[], None)?;
    write_tx!(store, |conn, v, now| {
        let n = conn
            .exec(
                "INSERT INTO gw_tenants (id, spec, disabled, created_ms, updated_ms, version) VALUES ($1, $2, 0, $3, $3, $4) ON CONFLICT (id) DO NOTHING",
                &[Val::Text(id.clone()), Val::Text(spec_text.clone()), Val::Int(now), Val::Int(v)],
            )
            .await?;
        if n == 0 {
            return Err(StoreError::Conflict(
                "tenant_exists",
                format!("tenant `{id}` already exists"),
            ));
        }
        record(
            &mut conn,
            now,
            actor,
            Change {
                action: "tenant.create",
                tenant: &id,
                key_id: None,
                fields: Value::Object(spec.clone()),
            },
        )
        .await?;
        Ok(TenantRec {
            id: id.clone(),
            spec: spec_text.clone(),
            disabled: false,
            created_ms: now,
            updated_ms: now,
            keys: Vec::new(),
        })
    })
}

pub async fn patch_tenant(
    store: &Store,
    id: &str,
    patch: &Value,
    actor: Option<&str>,
) -> Result<TenantRec, StoreError> {
    file_tenant(store, id)?;
    let mut p = object(patch)?;
    match p.remove("id") {
        Some(Value::String(s)) if s == id => {}
        None => {}
        Some(_) => return Err(invalid("id", "a tenant's id cannot be changed")),
    }
    let enable = match p.remove("disabled") {
        None => None,
        Some(Value::Bool(b)) => Some(b),
        Some(_) => return Err(invalid("disabled", "must be true or false")),
    };
    if p.contains_key("api_keys") {
        return Err(invalid(
            "api_keys",
            "keys are managed under /admin/v1/tenants/{id}/keys",
        ));
    }
    let patch_obj = Value::Object(p);
    write_tx!(store, |conn, v, now| {
        let mut rec = tenant_row(&mut conn, id).await?;
        let mut spec: Value = serde_json::from_str(&rec.spec).unwrap_or_else(|_| json!({}));
        merge_patch(&mut spec, &patch_obj);
        let spec_text = spec.to_string();
        let keys = live_keys(&mut conn, id, None).await?;
        validate(store, id, &spec_text, &keys, None)?;
        let disabled = enable.unwrap_or(rec.disabled);
        conn.exec(
            "UPDATE gw_tenants SET spec = $2, disabled = $3, updated_ms = $4, version = $5 WHERE id = $1",
            &[Val::Text(id.into()), Val::Text(spec_text.clone()), flag(disabled), Val::Int(now), Val::Int(v)],
        )
        .await?;
        let mut fields = patch_obj.clone();
        if let (Some(b), Value::Object(m)) = (enable, &mut fields) {
            m.insert("disabled".into(), Value::Bool(b));
        }
        record(
            &mut conn,
            now,
            actor,
            Change {
                action: "tenant.update",
                tenant: id,
                key_id: None,
                fields,
            },
        )
        .await?;
        rec.spec = spec_text;
        rec.disabled = disabled;
        rec.updated_ms = now;
        Ok(rec)
    })
}

pub async fn disable_tenant(
    store: &Store,
    id: &str,
    actor: Option<&str>,
) -> Result<TenantRec, StoreError> {
    file_tenant(store, id)?;
    write_tx!(store, |conn, v, now| {
        let mut rec = tenant_row(&mut conn, id).await?;
        conn.exec(
            "UPDATE gw_tenants SET disabled = 1, updated_ms = $2, version = $3 WHERE id = $1",
            &[Val::Text(id.into()), Val::Int(now), Val::Int(v)],
        )
        .await?;
        record(
            &mut conn,
            now,
            actor,
            Change {
                action: "tenant.disable",
                tenant: id,
                key_id: None,
                fields: json!({"disabled": true}),
            },
        )
        .await?;
        rec.disabled = true;
        rec.updated_ms = now;
        Ok(rec)
    })
}

/// `sk-gw-` and 40 base62 characters (238 bits) from the OS-seeded CSPRNG.
pub fn new_secret() -> String {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::rng();
    let mut s = String::with_capacity(46);
    s.push_str("sk-gw-");
    for _ in 0..40 {
        s.push(ALPHABET[rng.random_range(0..ALPHABET.len())] as char);
    }
    s
}

fn new_key_id() -> String {
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::rng();
    let mut s = String::from("key_");
    for _ in 0..12 {
        s.push(ALPHABET[rng.random_range(0..ALPHABET.len())] as char);
    }
    s
}

pub const KEY_CREATE_FIELDS: &[&str] = &["id", "name", "models", "rate", "budget", "expires_at"];
pub const KEY_PATCH_FIELDS: &[&str] =
    &["name", "models", "rate", "budget", "expires_at", "disabled"];

/// Key ids go into URL paths and audit rows.
fn check_key_id(id: &str) -> Result<(), StoreError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id.bytes().all(|b| (0x21..=0x7e).contains(&b))
        && !id.contains(['/', '?', '#', '%', ',']);
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "id",
            "must be 1 to 128 printable ASCII characters without spaces, `/`, `?`, `#`, `%`, `,`",
        ))
    }
}

/// A key's answer fields with secrets and hashes removed.
pub fn public_fields(spec: &Value) -> Value {
    let mut v = spec.clone();
    if let Value::Object(m) = &mut v {
        m.remove("sha256");
        m.remove("previous_sha256");
    }
    v
}

pub async fn create_key(
    store: &Store,
    tenant: &str,
    body: &Value,
    actor: Option<&str>,
) -> Result<(KeyRec, String), StoreError> {
    file_tenant(store, tenant)?;
    let mut spec = if body.is_null() {
        Map::new()
    } else {
        object(body)?
    };
    only_fields(&spec, KEY_CREATE_FIELDS)?;
    let id = match spec.get("id") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(invalid("id", "must be a string")),
        None => new_key_id(),
    };
    check_key_id(&id)?;
    let secret = new_secret();
    let public = Value::Object(spec.clone());
    spec.insert("id".into(), Value::String(id.clone()));
    spec.insert(
        "sha256".into(),
        Value::String(crate::config::sha256_hex(&secret)),
    );
    let spec_text = Value::Object(spec).to_string();
    let rec = write_tx!(store, |conn, v, now| {
        let t = tenant_row(&mut conn, tenant).await?;
        if t.disabled {
            return Err(StoreError::Conflict(
                "tenant_disabled",
                format!("tenant `{tenant}` is disabled"),
            ));
        }
        let mut keys = live_keys(&mut conn, tenant, Some(&id)).await?;
        keys.push(spec_text.clone());
        let prefix = crate::config::api_key_path(keys.len() - 1);
        validate(store, tenant, &t.spec, &keys, Some(prefix))?;
        let n = conn
            .exec(
                "INSERT INTO gw_keys (tenant, id, spec, created_ms, updated_ms, revoked_ms, version) VALUES ($1, $2, $3, $4, $4, NULL, $5) ON CONFLICT (tenant, id) DO NOTHING",
                &[Val::Text(tenant.into()), Val::Text(id.clone()), Val::Text(spec_text.clone()), Val::Int(now), Val::Int(v)],
            )
            .await?;
        if n == 0 {
            return Err(StoreError::Conflict(
                "key_exists",
                format!("tenant `{tenant}` already has a key `{id}`"),
            ));
        }
        record(
            &mut conn,
            now,
            actor,
            Change {
                action: "key.create",
                tenant,
                key_id: Some(&id),
                fields: public.clone(),
            },
        )
        .await?;
        Ok(KeyRec {
            id: id.clone(),
            spec: spec_text.clone(),
            created_ms: now,
            updated_ms: now,
            revoked_ms: None,
        })
    })?;
    Ok((rec, secret))
}

pub async fn patch_key(
    store: &Store,
    tenant: &str,
    key: &str,
    patch: &Value,
    actor: Option<&str>,
) -> Result<KeyRec, StoreError> {
    file_tenant(store, tenant)?;
    let p = object(patch)?;
    only_fields(&p, KEY_PATCH_FIELDS)?;
    let patch_obj = Value::Object(p);
    write_tx!(store, |conn, v, now| {
        let t = tenant_row(&mut conn, tenant).await?;
        let mut rec = key_row(&mut conn, tenant, key).await?;
        if rec.revoked_ms.is_some() {
            return Err(StoreError::Conflict(
                "key_revoked",
                format!("key `{key}` is revoked"),
            ));
        }
        let mut spec: Value = serde_json::from_str(&rec.spec).unwrap_or_else(|_| json!({}));
        merge_patch(&mut spec, &patch_obj);
        let spec_text = spec.to_string();
        let mut keys = live_keys(&mut conn, tenant, Some(key)).await?;
        keys.push(spec_text.clone());
        let prefix = crate::config::api_key_path(keys.len() - 1);
        validate(store, tenant, &t.spec, &keys, Some(prefix))?;
        conn.exec(
            "UPDATE gw_keys SET spec = $3, updated_ms = $4, version = $5 WHERE tenant = $1 AND id = $2",
            &[Val::Text(tenant.into()), Val::Text(key.into()), Val::Text(spec_text.clone()), Val::Int(now), Val::Int(v)],
        )
        .await?;
        record(
            &mut conn,
            now,
            actor,
            Change {
                action: "key.update",
                tenant,
                key_id: Some(key),
                fields: patch_obj.clone(),
            },
        )
        .await?;
        rec.spec = spec_text;
        rec.updated_ms = now;
        Ok(rec)
    })
}

pub async fn revoke_key(
    store: &Store,
    tenant: &str,
    key: &str,
    actor: Option<&str>,
) -> Result<KeyRec, StoreError> {
    file_tenant(store, tenant)?;
    write_tx!(store, |conn, v, now| {
        tenant_row(&mut conn, tenant).await?;
        let mut rec = key_row(&mut conn, tenant, key).await?;
        if rec.revoked_ms.is_some() {
            return Ok(rec); // revoking twice is the same as once
        }
        conn.exec(
            "UPDATE gw_keys SET revoked_ms = $3, updated_ms = $3, version = $4 WHERE tenant = $1 AND id = $2",
            &[Val::Text(tenant.into()), Val::Text(key.into()), Val::Int(now), Val::Int(v)],
        )
        .await?;
        record(
            &mut conn,
            now,
            actor,
            Change {
                action: "key.revoke",
                tenant,
                key_id: Some(key),
                fields: json!({"revoked": true}),
            },
        )
        .await?;
        rec.revoked_ms = Some(now);
        rec.updated_ms = now;
        Ok(rec)
    })
}

pub async fn rotate_key(
    store: &Store,
    tenant: &str,
    key: &str,
    grace_s: u64,
    actor: Option<&str>,
) -> Result<(KeyRec, String), StoreError> {
    file_tenant(store, tenant)?;
    let grace_s = grace_s.min(30 * 86_400);
    let secret = new_secret();
    let new_hash = crate::config::sha256_hex(&secret);
    let rec = write_tx!(store, |conn, v, now| {
        tenant_row(&mut conn, tenant).await?;
        let mut rec = key_row(&mut conn, tenant, key).await?;
        if rec.revoked_ms.is_some() {
            return Err(StoreError::Conflict(
                "key_revoked",
                format!("key `{key}` is revoked"),
            ));
        }
        let mut spec = object(&serde_json::from_str(&rec.spec).unwrap_or_else(|_| json!({})))?;
        let old = spec.insert("sha256".into(), Value::String(new_hash.clone()));
        match old {
            Some(Value::String(old)) if grace_s > 0 => {
                spec.insert("previous_sha256".into(), Value::String(old));
                spec.insert(
                    "previous_until".into(),
                    Value::String(rfc3339(now as u64 + grace_s * 1000)),
                );
            }
            _ => {
                spec.remove("previous_sha256");
                spec.remove("previous_until");
            }
        }
        let spec_text = Value::Object(spec).to_string();
        conn.exec(
            "UPDATE gw_keys SET spec = $3, updated_ms = $4, version = $5 WHERE tenant = $1 AND id = $2",
            &[Val::Text(tenant.into()), Val::Text(key.into()), Val::Text(spec_text.clone()), Val::Int(now), Val::Int(v)],
        )
        .await?;
        record(
            &mut conn,
            now,
            actor,
            Change {
                action: "key.rotate",
                tenant,
                key_id: Some(key),
                fields: json!({"grace_s": grace_s}),
            },
        )
        .await?;
        rec.spec = spec_text;
        rec.updated_ms = now;
        Ok(rec)
    })?;
    Ok((rec, secret))
}

/// `GET /admin/v1/changes`: oldest first from `since_ms`.
pub async fn changes(store: &Store, since_ms: u64, limit: usize) -> Result<Vec<Value>, StoreError> {
    let fut = async {
        let mut conn = store.db.connect().await?;
        conn.query(
            "SELECT seq, at_ms, action, tenant, key_id, actor, fields FROM gw_changes WHERE at_ms >= $1 ORDER BY seq LIMIT $2",
            &[Val::Int(since_ms as i64), Val::Int(limit as i64)],
        )
        .await
    };
    let rows = match tokio::time::timeout(store.write_timeout, fut).await {
        Ok(r) => r?,
        Err(_) => return Err(StoreError::Unavailable("timed out".into())),
    };
    Ok(rows
        .iter()
        .map(|r| {
            json!({
                "seq": int(r, 0),
                "at": rfc3339(int(r, 1).max(0) as u64),
                "action": text(r, 2),
                "tenant": text(r, 3),
                "key_id": r.get(4).and_then(Val::text),
                "actor": r.get(5).and_then(Val::text),
                "fields": serde_json::from_str::<Value>(&text(r, 6)).unwrap_or(Value::Null),
            })
        })
        .collect())
}
