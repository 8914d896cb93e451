//! A built tenant and its keys back in their stored form.
//!
//! A node keeps only the built form of each store tenant in memory (what requests
//! use), not the JSON text it was built from as well: at 100,000 tenants and 300,000
//! keys the text alone is about 100 MiB. Where the stored form is needed (the
//! snapshot, rebuilding against a reloaded file, the admin API's reads) it is written
//! back from the built one. It is the effective form: defaults are left out, money is
//! the nano-USD amount as a decimal number of USD.

use crate::audit::time::rfc3339;
use crate::config::{ApiKey, Budget, Rate, Tenant};
use serde_json::{Map, Value};

fn rate(r: &Rate) -> Option<Value> {
    let mut m = Map::new();
    if let Some(v) = r.rps {
        m.insert("rps".into(), v.into());
    }
    if let Some(v) = r.tpm {
        m.insert("tpm".into(), v.into());
    }
    if let Some(v) = r.concurrency {
        m.insert("concurrency".into(), v.into());
    }
    (!m.is_empty()).then_some(Value::Object(m))
}

/// USD as the shortest decimal that reads back as the same nano-USD amount.
fn usd(nanos: u64) -> Value {
    let text = format!("{}.{:09}", nanos / 1_000_000_000, nanos % 1_000_000_000);
    let text = text.trim_end_matches('0').trim_end_matches('.');
    serde_json::from_str(text).unwrap_or(Value::Null)
}

fn budget(b: &Budget) -> Option<Value> {
    let mut m = Map::new();
    if let Some(n) = b.monthly_nanousd {
        m.insert("monthly_usd".into(), usd(n));
    }
    if let Some(n) = b.hourly_nanousd {
        m.insert("hourly_usd".into(), usd(n));
    }
    (!m.is_empty()).then_some(Value::Object(m))
}

pub fn tenant(t: &Tenant) -> Value {
    let mut m = Map::new();
    let names = |v: &[std::sync::Arc<crate::config::Model>]| -> Value {
        v.iter().map(|x| Value::from(x.name.clone())).collect()
    };
    m.insert("models".into(), names(&t.models));
    if let Some(p) = &t.pin_model {
        m.insert("pin_model".into(), p.name.clone().into());
    }
    if !t.fallback.is_empty() {
        m.insert("fallback".into(), names(&t.fallback));
    }
    if t.allow_fallback_override {
        m.insert("allow_fallback_override".into(), true.into());
    }
    if let Some(r) = &t.region {
        m.insert("region".into(), r.clone().into());
    }
    if let Some(r) = rate(&t.rate) {
        m.insert("rate".into(), r);
    }
    if let Some(b) = budget(&t.budget) {
        m.insert("budget".into(), b);
    }
    if t.cache.enabled || t.cache.ttl_s != 300 {
        m.insert(
            "cache".into(),
            serde_json::json!({"enabled": t.cache.enabled, "ttl_s": t.cache.ttl_s}),
        );
    }
    if let Some(g) = &t.guard {
        let factor = format!("{}.{:03}", g.factor_milli / 1000, g.factor_milli % 1000);
        let mut v = serde_json::json!({
            "velocity_factor": serde_json::from_str::<Value>(factor.trim_end_matches('0').trim_end_matches('.')).unwrap_or(Value::Null),
            "min_hourly_usd": usd(g.min_hourly_nanousd),
            "action": g.action.as_str(),
        });
        if g.action == crate::config::GuardAction::Throttle {
            v["throttle_rps"] = g.throttle_rps.into();
        }
        m.insert("guard".into(), v);
    }
    Value::Object(m)
}

/// With `hashes`, the key's sha256 (and a rotated-out one's) as the store has them;
/// without, as the admin API shows a key.
pub fn key(k: &ApiKey, hashes: bool) -> Value {
    let mut m = Map::new();
    m.insert("id".into(), k.id.clone().into());
    if hashes {
        m.insert("sha256".into(), hex::encode(k.sha256).into());
    }
    if let Some(n) = &k.name {
        m.insert("name".into(), n.clone().into());
    }
    if let Some(models) = &k.models {
        m.insert("models".into(), models.clone().into());
    }
    if let Some(r) = rate(&k.rate) {
        m.insert("rate".into(), r);
    }
    if let Some(b) = budget(&k.budget) {
        m.insert("budget".into(), b);
    }
    if let Some(t) = k.expires_at_ms {
        m.insert("expires_at".into(), rfc3339(t).into());
    }
    if k.disabled {
        m.insert("disabled".into(), true.into());
    }
    if let Some((hash, until)) = k.previous.as_deref() {
        if hashes {
            m.insert("previous_sha256".into(), hex::encode(hash).into());
        }
        m.insert("previous_until".into(), rfc3339(*until).into());
    }
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    #[test]
    fn usd_reads_back_exactly() {
        for n in [
            0u64,
            1,
            150_000_000,
            12_500_000_000,
            1_000_000_000_000_000_000,
            123_456_789_012,
        ] {
            let v = super::usd(n);
            let back = crate::config::usd_to_nanousd(v.as_f64().unwrap()).unwrap();
            assert_eq!(back, n, "{v}");
        }
    }
}
