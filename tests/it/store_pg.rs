//! The tenant and key store on a real PostgreSQL: migrations raced by several nodes
//! starting at once, concurrent writers from several nodes, and every node converging
//! on the same state by version.

use crate::pg::PgServer;
use llm_gateway::config::{Config, StoreBackend, StoreConf};
use llm_gateway::store::{ops, ConfigCell, Host, Store, StoreError};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

const YAML: &str = r#"
node: { region: us }
listen: { http: 127.0.0.1:18080 }
providers:
  p: { kind: openai_compatible, base_url: "http://127.0.0.1:9", region: us }
models:
  a: { provider: p, price: { input_per_mtok: 1, output_per_mtok: 2 } }
tenants: {}
"#;

fn node(url: &str) -> (Arc<Store>, Arc<ConfigCell>) {
    let host = Arc::new(ConfigCell::new(Config::from_yaml_str(YAML).unwrap()));
    let conf = StoreConf {
        backend: StoreBackend::Postgres {
            url: url.to_string(),
        },
        sync_ms: 1000,
        snapshot: None,
    };
    (Store::open(&conf, host.clone()).unwrap(), host)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_race_migrations_and_writes_and_converge() {
    let Some(pg) = PgServer::start() else {
        return;
    };
    let url = pg.url();
    // 40 writers queue on the version row: on a loaded 2-core machine the last waits
    // longer than the default 500 ms a single admin write is allowed.
    std::env::set_var("LLM_GATEWAY_STORE_WRITE_TIMEOUT_MS", "10000");
    let nodes: Vec<_> = (0..4).map(|_| node(&url)).collect();
    // Four nodes start together: each migration is applied once.
    let loads = nodes
        .iter()
        .map(|(s, _)| s.initial_load(Duration::from_secs(20)));
    for r in futures_util::future::join_all(loads).await {
        r.unwrap();
    }
    assert_eq!(
        pg.psql("gateway", "SELECT count(*) FROM gw_schema").trim(),
        "1"
    );

    // The same tenant created from every node at once: exactly one wins.
    let body = json!({"id": "race", "models": ["a"]});
    let creates = nodes
        .iter()
        .map(|(s, _)| ops::create_tenant(s, &body, None));
    let results = futures_util::future::join_all(creates).await;
    let won = results.iter().filter(|r| r.is_ok()).count();
    let lost = results
        .iter()
        .filter(|r| matches!(r, Err(StoreError::Conflict("tenant_exists", _))))
        .count();
    assert_eq!((won, lost), (1, 3), "{results:?}");

    // 40 keys issued from four nodes concurrently: all land, versions never collide.
    let issues = (0..40).map(|i| {
        let (s, _) = &nodes[i % 4];
        async move { ops::create_key(s, "race", &json!({"id": format!("k{i}")}), None).await }
    });
    let secrets: Vec<String> = futures_util::future::join_all(issues)
        .await
        .into_iter()
        .map(|r| r.unwrap().1)
        .collect();
    assert_eq!(
        pg.psql(
            "gateway",
            "SELECT count(DISTINCT version) = count(*) FROM gw_keys WHERE tenant = 'race'"
        )
        .trim(),
        "t"
    );
    // Every node converges on every key by version alone.
    for (s, host) in &nodes {
        s.sync_now().await.unwrap();
        let cfg = host.config();
        for secret in &secrets {
            assert!(cfg.authenticate(secret, 0).is_ok());
        }
        assert_eq!(s.version(), nodes[0].0.version());
    }
    // The change log has one entry per write, in version order.
    let changes = ops::changes(&nodes[0].0, 0, 100).await.unwrap();
    assert_eq!(changes.len(), 41);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_from_its_snapshot_migrates_a_database_it_meets_fresh() {
    let Some(pg) = PgServer::start() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("gw-store-pg-snap-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let snapshot = dir.join("snap.json");
    let state = llm_gateway::store::State {
        version: 3,
        ..Default::default()
    };
    llm_gateway::store::snapshot::write(&snapshot, &state).unwrap();
    // The database `fresh` does not exist yet: the node starts from the snapshot.
    let url = pg.url().replace("/gateway", "/fresh");
    let host = Arc::new(ConfigCell::new(Config::from_yaml_str(YAML).unwrap()));
    let conf = StoreConf {
        backend: StoreBackend::Postgres { url: url.clone() },
        sync_ms: 1000,
        snapshot: Some(snapshot),
    };
    let store = Store::open(&conf, host).unwrap();
    store.initial_load(Duration::from_secs(5)).await.unwrap();
    assert_eq!(store.health().source, "snapshot");
    assert!(store.sync_now().await.is_err());
    // It appears, empty: the next read migrates it first, then takes it whole
    // (its version 0 is below the snapshot's 3).
    pg.psql("gateway", "CREATE DATABASE fresh");
    store.sync_now().await.unwrap();
    assert_eq!(store.health().source, "database");
    assert_eq!(store.version(), 0);
    ops::create_tenant(&store, &json!({"id": "t", "models": ["a"]}), None)
        .await
        .unwrap();
    let _ = std::fs::remove_dir_all(dir);
}
