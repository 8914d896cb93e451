//! The store on a real SQLite file: writes, validation, the state published into the
//! served config, rotation, revocation and the change log.

use super::*;
use crate::config::{Config, StoreBackend, StoreConf};
use serde_json::json;

const YAML: &str = r#"
node: { region: us }
listen: { http: 127.0.0.1:18080 }
providers:
  p: { kind: openai_compatible, base_url: "http://127.0.0.1:9", region: us }
models:
  a: { provider: p, price: { input_per_mtok: 1, output_per_mtok: 2 } }
  b: { provider: p, price: { input_per_mtok: 1, output_per_mtok: 2 } }
tenants:
  filet:
    api_keys: [ { id: k1, sha256: "0000000000000000000000000000000000000000000000000000000000000001" } ]
    models: [a]
"#;

fn setup(name: &str) -> (Arc<Store>, Arc<ConfigCell>, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("gw-store-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let host = Arc::new(ConfigCell::new(Config::from_yaml_str(YAML).unwrap()));
    let conf = StoreConf {
        backend: StoreBackend::Sqlite {
            path: dir.join("t.db"),
        },
        sync_ms: 1000,
        snapshot: Some(dir.join("snap.json")),
    };
    let store = Store::open(&conf, host.clone()).unwrap();
    (store, host, dir)
}

fn invalid_paths(e: StoreError) -> Vec<String> {
    match e {
        StoreError::Invalid(errors) => errors.into_iter().map(|e| e.path).collect(),
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[tokio::test]
async fn tenants_and_keys_reach_the_served_config() {
    let (store, host, dir) = setup("serve");
    store.initial_load(Duration::from_secs(5)).await.unwrap();
    let t = ops::create_tenant(
        &store,
        &json!({"id": "acme", "models": ["a", "b"], "rate": {"rps": 5}}),
        Some("ops"),
    )
    .await
    .unwrap();
    assert_eq!(t.id, "acme");
    let cfg = host.config();
    let acme = cfg.tenant("acme").expect("published");
    assert_eq!(acme.rate.rps, Some(5));
    assert_eq!(acme.source, crate::config::TenantSource::Store);
    assert!(cfg.tenant("filet").is_some(), "file tenants stay");

    let (key, secret) = ops::create_key(
        &store,
        "acme",
        &json!({"name": "team", "models": ["b"], "budget": {"monthly_usd": 1.5}}),
        None,
    )
    .await
    .unwrap();
    assert!(
        secret.starts_with("sk-gw-") && secret.len() >= 6 + 32,
        "{secret}"
    );
    assert!(!key.spec.contains(&secret), "only the hash is stored");
    let cfg = host.config();
    let (t, k) = cfg.authenticate(&secret, 0).expect("the new key works");
    assert_eq!((t.id.as_str(), k.id.as_str()), ("acme", key.id.as_str()));
    assert_eq!(k.budget.monthly_nanousd, Some(1_500_000_000));
    assert!(k.allows("b") && !k.allows("a"));

    // Rotation with a grace period: both secrets work until it ends.
    let (_, new_secret) = ops::rotate_key(&store, "acme", &key.id, 60, None)
        .await
        .unwrap();
    let cfg = host.config();
    let now = crate::audit::time::now_ms();
    assert!(cfg.authenticate(&secret, now).is_ok());
    assert!(cfg.authenticate(&new_secret, now).is_ok());
    assert!(
        cfg.authenticate(&secret, now + 61_000).is_err(),
        "grace over"
    );
    // Without grace the old secret stops at once.
    let (_, third) = ops::rotate_key(&store, "acme", &key.id, 0, None)
        .await
        .unwrap();
    let cfg = host.config();
    assert!(cfg.authenticate(&new_secret, now).is_err());
    assert!(cfg.authenticate(&third, now).is_ok());

    // Disable the key, then revoke it.
    ops::patch_key(&store, "acme", &key.id, &json!({"disabled": true}), None)
        .await
        .unwrap();
    assert_eq!(
        host.config().authenticate(&third, now).unwrap_err(),
        crate::config::AuthFailure::Disabled
    );
    ops::patch_key(&store, "acme", &key.id, &json!({"disabled": false}), None)
        .await
        .unwrap();
    assert!(host.config().authenticate(&third, now).is_ok());
    ops::revoke_key(&store, "acme", &key.id, None)
        .await
        .unwrap();
    assert!(host.config().authenticate(&third, now).is_err());
    assert!(matches!(
        ops::patch_key(&store, "acme", &key.id, &json!({"name": "x"}), None).await,
        Err(StoreError::Conflict("key_revoked", _))
    ));

    // Expiry.
    let (_, exp) = ops::create_key(
        &store,
        "acme",
        &json!({"expires_at": "2020-01-01T00:00:00Z"}),
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        host.config().authenticate(&exp, now).unwrap_err(),
        crate::config::AuthFailure::Expired
    );

    // Deleting the tenant disables it: its keys stop, the tenant stays readable.
    let (_, live) = ops::create_key(&store, "acme", &json!({}), None)
        .await
        .unwrap();
    ops::disable_tenant(&store, "acme", None).await.unwrap();
    assert!(host.config().authenticate(&live, now).is_err());
    assert!(host.config().tenant("acme").is_some_and(|t| t.disabled));
    assert!(matches!(
        ops::create_key(&store, "acme", &json!({}), None).await,
        Err(StoreError::Conflict("tenant_disabled", _))
    ));

    // The change log has every write, never a hash or secret.
    let changes = ops::changes(&store, 0, 100).await.unwrap();
    let text = serde_json::to_string(&changes).unwrap();
    let actions: Vec<&str> = changes
        .iter()
        .map(|c| c["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "tenant.create",
            "key.create",
            "key.rotate",
            "key.rotate",
            "key.update",
            "key.update",
            "key.revoke",
            "key.create",
            "key.create",
            "tenant.disable"
        ]
    );
    assert_eq!(changes[0]["actor"], "ops");
    assert!(
        !text.contains("sha256") && !text.contains("sk-gw-"),
        "{text}"
    );
    assert!(!text.contains(&crate::config::sha256_hex(&secret)));
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn validation_names_fields_and_conflicts_have_codes() {
    let (store, _host, dir) = setup("validate");
    store.initial_load(Duration::from_secs(5)).await.unwrap();
    let e = ops::create_tenant(&store, &json!({"id": "t", "models": ["a", "nope"]}), None)
        .await
        .unwrap_err();
    assert_eq!(invalid_paths(e), ["models[1]"]);
    let e = ops::create_tenant(
        &store,
        &json!({"id": "t", "models": ["a"], "rate": {"rpz": 1}}),
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(invalid_paths(e), ["rate.rpz"]);
    let e = ops::create_tenant(
        &store,
        &json!({"id": "t", "models": ["a"], "rate": {"rps": 0}}),
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(invalid_paths(e), ["rate.rps"]);
    let e = ops::create_tenant(&store, &json!({"id": "a/b", "models": ["a"]}), None)
        .await
        .unwrap_err();
    assert_eq!(invalid_paths(e), ["id"]);
    let e = ops::create_tenant(&store, &json!({"models": ["a"]}), None)
        .await
        .unwrap_err();
    assert_eq!(invalid_paths(e), ["id"]);
    assert!(matches!(
        ops::create_tenant(&store, &json!({"id": "filet", "models": ["a"]}), None).await,
        Err(StoreError::Conflict("tenant_in_config_file", _))
    ));
    ops::create_tenant(&store, &json!({"id": "t", "models": ["a"]}), None)
        .await
        .unwrap();
    assert!(matches!(
        ops::create_tenant(&store, &json!({"id": "t", "models": ["a"]}), None).await,
        Err(StoreError::Conflict("tenant_exists", _))
    ));
    // A key may only narrow the tenant's models.
    let e = ops::create_key(&store, "t", &json!({"models": ["b"]}), None)
        .await
        .unwrap_err();
    assert_eq!(invalid_paths(e), ["models[0]"]);
    let e = ops::create_key(&store, "t", &json!({"sha256": "00"}), None)
        .await
        .unwrap_err();
    assert_eq!(invalid_paths(e), ["sha256"]);
    let e = ops::create_key(&store, "t", &json!({"expires_at": "tomorrow"}), None)
        .await
        .unwrap_err();
    assert_eq!(invalid_paths(e), ["expires_at"]);
    let e = ops::create_key(&store, "t", &json!({"budget": {"monthly_usd": -1}}), None)
        .await
        .unwrap_err();
    assert_eq!(invalid_paths(e), ["budget.monthly_usd"]);
    ops::create_key(&store, "t", &json!({"id": "k"}), None)
        .await
        .unwrap();
    assert!(matches!(
        ops::create_key(&store, "t", &json!({"id": "k"}), None).await,
        Err(StoreError::Conflict("key_exists", _))
    ));
    // A tenant patch that would strand a key's models is refused, naming the key.
    ops::patch_tenant(&store, "t", &json!({"models": ["a", "b"]}), None)
        .await
        .unwrap();
    ops::create_key(&store, "t", &json!({"id": "kb", "models": ["b"]}), None)
        .await
        .unwrap();
    let e = ops::patch_tenant(&store, "t", &json!({"models": ["a"]}), None)
        .await
        .unwrap_err();
    assert_eq!(invalid_paths(e), ["api_keys[1].models[0]"]);
    // Merge patch: null removes a field.
    ops::patch_tenant(&store, "t", &json!({"budget": {"monthly_usd": 5}}), None)
        .await
        .unwrap();
    let rec = ops::patch_tenant(&store, "t", &json!({"budget": null}), None)
        .await
        .unwrap();
    assert!(!rec.spec.contains("budget"), "{}", rec.spec);
    let e = ops::patch_tenant(&store, "t", &json!({"id": "other"}), None)
        .await
        .unwrap_err();
    assert_eq!(invalid_paths(e), ["id"]);
    assert!(matches!(
        ops::patch_tenant(&store, "nope", &json!({}), None).await,
        Err(StoreError::NotFound(_))
    ));
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_second_store_on_the_same_file_catches_up_and_snapshots_restore() {
    let (a, _ha, dir) = setup("two");
    a.initial_load(Duration::from_secs(5)).await.unwrap();
    ops::create_tenant(&a, &json!({"id": "t", "models": ["a"]}), None)
        .await
        .unwrap();
    let (_, secret) = ops::create_key(&a, "t", &json!({}), None).await.unwrap();

    // Another process on the same file (import-tenants and a gateway, say).
    let hb = Arc::new(ConfigCell::new(Config::from_yaml_str(YAML).unwrap()));
    let b = Store::open(a.conf(), hb.clone()).unwrap();
    b.initial_load(Duration::from_secs(5)).await.unwrap();
    assert!(hb.config().authenticate(&secret, 0).is_ok());
    ops::create_tenant(&a, &json!({"id": "u", "models": ["a"]}), None)
        .await
        .unwrap();
    assert!(hb.config().tenant("u").is_none(), "not yet synced");
    b.sync_now().await.unwrap();
    assert!(hb.config().tenant("u").is_some(), "incremental sync");

    // The snapshot restores the same state with no database at all.
    let state = a.take_snapshot_state().expect("dirty after changes");
    snapshot::write(a.conf().snapshot.as_ref().unwrap(), &state).unwrap();
    let conf = StoreConf {
        backend: StoreBackend::Postgres {
            url: "postgres://nobody@127.0.0.1:1/none".into(),
        },
        ..a.conf().clone()
    };
    let hc = Arc::new(ConfigCell::new(Config::from_yaml_str(YAML).unwrap()));
    let c = Store::open(&conf, hc.clone()).unwrap();
    c.initial_load(Duration::from_secs(2)).await.unwrap();
    assert_eq!(c.health().source, "snapshot");
    assert!(c.health().stale_since_ms.is_some());
    assert!(hc.config().authenticate(&secret, 0).is_ok());
    // A torn snapshot is refused whole.
    let path = conf.snapshot.clone().unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let hd = Arc::new(ConfigCell::new(Config::from_yaml_str(YAML).unwrap()));
    let d = Store::open(&conf, hd.clone()).unwrap();
    let e = d.initial_load(Duration::from_secs(2)).await.unwrap_err();
    assert!(e.contains("refused"), "{e}");
    assert!(!d.health().loaded);
    assert!(hd.config().tenant("t").is_none(), "nothing half-loaded");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn merge_patch_follows_rfc_7386() {
    let mut v = json!({"a": 1, "b": {"c": 2, "d": 3}});
    ops::merge_patch(&mut v, &json!({"a": null, "b": {"c": 9}, "e": [1]}));
    assert_eq!(v, json!({"b": {"c": 9, "d": 3}, "e": [1]}));
}
