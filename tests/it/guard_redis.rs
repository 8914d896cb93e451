//! The spend guard on shared (Redis) counters: two `Limits` on one private Redis stand
//! for two edge nodes, each running the guard check as its background task does.

use crate::limits_redis::{clock, Redis};
use llm_gateway::config::{sha256_hex, Config, GuardAction, OnError, Tenant};
use llm_gateway::limits::{Actual, Demand, GuardChange, Limits, Refusal};
use std::sync::atomic::Ordering;
use std::sync::Arc;

const USD: u64 = 1_000_000_000;

fn config() -> Config {
    let yaml = r#"
node: { region: r1 }
listen: { http: 127.0.0.1:18080 }
providers:
  p1: { kind: openai_compatible, base_url: "http://127.0.0.1:9", region: r1 }
models:
  m1: { provider: p1, price: { input_per_mtok: 1, output_per_mtok: 2 } }
tenants:
  runaway:
    api_keys: [ { id: k1, sha256: "H1" } ]
    models: [m1]
    guard: { velocity_factor: 10, min_hourly_usd: 5, action: throttle, throttle_rps: 3 }
"#
    .replace("\"H1\"", &format!("\"{}\"", sha256_hex("k1")));
    Config::from_yaml_str(&yaml).expect("test config")
}

async fn spend(node: &Limits, t: &Arc<Tenant>, cost: u64) -> Result<(), Refusal> {
    let k = node
        .admit(
            t,
            &t.api_keys[0],
            Demand {
                tokens: 1,
                cost_nanousd: 1,
            },
        )
        .await?;
    node.settle(
        k,
        Actual {
            tokens_in: 1,
            tokens_out: 0,
            cost_nanousd: cost,
        },
    )
    .await;
    Ok(())
}

fn engaged(changes: &[GuardChange]) -> bool {
    matches!(
        changes,
        [GuardChange::Engaged {
            action: GuardAction::Throttle,
            ..
        }]
    )
}

/// Spend on node A engages the guard on node B too (it decides on the shared hours),
/// the throttle is one rps cap across both nodes, and a clear on A stands B down.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn both_nodes_engage_on_the_shared_spend_throttle_together_and_stand_down_on_one_clear() {
    let redis = Redis::start();
    let (now, clock) = clock();
    let conf = redis.counters(OnError::FailClosed);
    let a = Limits::with_clock(&conf, clock.clone());
    let b = Limits::with_clock(&conf, clock);
    let cfg = config();
    let t = cfg.tenant("runaway").expect("tenant").clone();
    // Start at the top of an hour, so the hour cannot roll over mid-test.
    let ms = now.load(Ordering::SeqCst);
    now.store((ms / 3_600_000 + 1) * 3_600_000, Ordering::SeqCst);
    // B serves one cheap request (so it watches the tenant); A does the spending.
    spend(&b, &t, 1).await.expect("b admits");
    spend(&a, &t, 49 * USD).await.expect("a admits");
    assert!(a.check_guards(&cfg.tenants).await.is_empty(), "49 < 10 x 5");
    assert!(b.check_guards(&cfg.tenants).await.is_empty());
    spend(&a, &t, 2 * USD).await.expect("a admits");
    assert!(engaged(&a.check_guards(&cfg.tenants).await));
    assert!(
        engaged(&b.check_guards(&cfg.tenants).await),
        "B engages on A's spend"
    );
    // Throttled to 3 rps across both nodes together, in one second.
    now.fetch_add(1_000, Ordering::SeqCst);
    let mut admitted = 0;
    let mut guard_429 = 0;
    for i in 0..8 {
        let node = if i % 2 == 0 { &a } else { &b };
        match spend(node, &t, 1).await {
            Ok(()) => admitted += 1,
            Err(Refusal::Guard {
                action: GuardAction::Throttle,
                throttle_rps: 3,
                ..
            }) => guard_429 += 1,
            Err(other) => panic!("{other:?}"),
        }
    }
    assert_eq!((admitted, guard_429), (3, 5));
    // On-call clears on A for 120 s: A now, B at its next check.
    let (change, shared) = a.clear_guard(&t, 120).await;
    shared.expect("clear recorded in redis");
    assert!(matches!(
        change,
        Some(GuardChange::Cleared {
            reason: "admin",
            ..
        })
    ));
    let c = b.check_guards(&cfg.tenants).await;
    assert!(
        matches!(
            &c[..],
            [GuardChange::Cleared {
                reason: "admin",
                ..
            }]
        ),
        "{c:?}"
    );
    assert!(!b.guard_engaged(&t));
    now.fetch_add(1_000, Ordering::SeqCst);
    for _ in 0..6 {
        spend(&b, &t, 1).await.expect("cleared: not throttled");
    }
    // Past for_s, still over the threshold: both engage again.
    now.fetch_add(120_000, Ordering::SeqCst);
    assert!(engaged(&a.check_guards(&cfg.tenants).await));
    assert!(engaged(&b.check_guards(&cfg.tenants).await));
}
