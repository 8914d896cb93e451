use super::*;
use crate::config::{sha256_hex, Config};
use std::sync::atomic::{AtomicU64, Ordering};

const YAML: &str = r#"
node: { region: r1 }
listen: { http: 127.0.0.1:18080 }
providers:
  p1: { kind: openai_compatible, base_url: "http://127.0.0.1:9", region: r1 }
models:
  m1: { provider: p1, price: { input_per_mtok: 1, output_per_mtok: 2 } }
tenants:
  t:
    api_keys: [ { id: k1, sha256: "H" } ]
    models: [m1]
    rate: { rps: 3, tpm: 1000, concurrency: 2 }
    budget: { monthly_usd: 0.000001, hourly_usd: 0.0000005 }
  big:
    api_keys: [ { id: k2, sha256: "H2" } ]
    models: [m1]
    budget: { monthly_usd: 0.000037 }
"#;

/// 2026-11-22 19:00:00 UTC
const T0: u64 = 1_795_374_000_000;

fn setup() -> (Config, Arc<AtomicU64>, Limits) {
    let cfg = Config::from_yaml_str(
        &YAML
            .replace("\"H\"", &format!("\"{}\"", sha256_hex("a")))
            .replace("\"H2\"", &format!("\"{}\"", sha256_hex("b"))),
    )
    .unwrap();
    let now = Arc::new(AtomicU64::new(T0));
    let n = now.clone();
    let limits = Limits::with_clock(Arc::new(move || n.load(Ordering::SeqCst)));
    (cfg, now, limits)
}

fn d(tokens: u64, cost: u64) -> Demand {
    Demand {
        tokens,
        cost_nanousd: cost,
    }
}

#[tokio::test]
async fn rps_refuses_the_extra_request_in_the_same_second() {
    let (cfg, now, l) = setup();
    let t = cfg.tenant("t").unwrap();
    for _ in 0..3 {
        let k = l.admit(t, d(1, 0)).await.unwrap();
        l.settle(k, Actual::default()).await;
    }
    match l.admit(t, d(1, 0)).await {
        Err(Refusal::Rate {
            which: "rps",
            retry_after_s: 1,
            headers,
        }) => {
            assert_eq!(headers.limit_requests, Some(3));
            assert_eq!(headers.remaining_requests, Some(0));
        }
        other => panic!("{other:?}"),
    }
    now.fetch_add(1000, Ordering::SeqCst);
    let k = l.admit(t, d(1, 0)).await.unwrap();
    assert_eq!(k.headers.remaining_requests, Some(2));
}

#[tokio::test]
async fn concurrency_is_released_by_settle_and_by_drop() {
    let (cfg, now, l) = setup();
    let t = cfg.tenant("t").unwrap();
    let a = l.admit(t, d(1, 0)).await.unwrap();
    let b = l.admit(t, d(1, 0)).await.unwrap();
    now.fetch_add(1000, Ordering::SeqCst);
    assert!(matches!(
        l.admit(t, d(1, 0)).await,
        Err(Refusal::Rate {
            which: "concurrency",
            ..
        })
    ));
    l.settle(a, Actual::default()).await;
    let c = l.admit(t, d(1, 0)).await.unwrap();
    drop(b);
    drop(c);
    let _e = l.admit(t, d(1, 0)).await.unwrap();
    let _f = l.admit(t, d(1, 0)).await.unwrap();
}

#[tokio::test]
async fn tpm_counts_reserved_then_actual_tokens() {
    let (cfg, now, l) = setup();
    let t = cfg.tenant("t").unwrap();
    let k = l.admit(t, d(900, 0)).await.unwrap();
    assert_eq!(k.headers.remaining_tokens, Some(100));
    assert!(matches!(
        l.admit(t, d(200, 0)).await,
        Err(Refusal::Rate { which: "tpm", .. })
    ));
    // Settling at 300 actual tokens frees the other 600.
    l.settle(
        k,
        Actual {
            tokens_in: 100,
            tokens_out: 200,
            cost_nanousd: 0,
        },
    )
    .await;
    let k = l.admit(t, d(700, 0)).await.unwrap();
    l.settle(k, Actual::default()).await;
    now.fetch_add(61_000, Ordering::SeqCst);
    assert!(l.admit(t, d(1000, 0)).await.is_ok());
}

#[tokio::test]
async fn concurrent_reservations_never_exceed_the_monthly_budget() {
    let (cfg, _now, l) = setup();
    let t = cfg.tenant("big").unwrap();
    // Budget 37_000 nano-USD, each request may cost up to 1_000: exactly 37 fit.
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let l = l.clone();
        let t = t.clone();
        tasks.push(tokio::spawn(
            async move { l.admit(&t, d(10, 1_000)).await.ok() },
        ));
    }
    let mut held = Vec::new();
    for task in tasks {
        if let Some(k) = task.await.unwrap() {
            held.push(k);
        }
    }
    assert_eq!(held.len(), 37);
    // Settling below the reservation frees room for more.
    for k in held {
        l.settle(
            k,
            Actual {
                tokens_in: 5,
                tokens_out: 5,
                cost_nanousd: 500,
            },
        )
        .await;
    }
    let u = l.usage(t).await;
    assert_eq!(u.spent_nanousd, 18_500);
    assert_eq!(u.reserved_nanousd, 0);
    assert_eq!(u.remaining_nanousd, Some(18_500));
    assert_eq!(u.spent_usd, "0.000018500");
    assert_eq!(u.requests, 37);
    let mut more = 0;
    while let Ok(k) = l.admit(t, d(1, 1_000)).await {
        more += 1;
        std::mem::forget(k);
    }
    assert_eq!(more, 18);
    match l.admit(t, d(1, 1_000)).await {
        Err(Refusal::Budget {
            which: "monthly",
            retry_after_s,
        }) => {
            // 2026-11-22 19:00 to 2026-12-01 00:00
            assert_eq!(retry_after_s, 8 * 86_400 + 5 * 3600);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn hourly_budget_stops_until_the_hour_rolls() {
    let (cfg, now, l) = setup();
    let t = cfg.tenant("t").unwrap();
    // hourly 500 nano-USD, monthly 1000
    let k = l.admit(t, d(1, 400)).await.unwrap();
    l.settle(
        k,
        Actual {
            tokens_in: 1,
            tokens_out: 1,
            cost_nanousd: 400,
        },
    )
    .await;
    now.fetch_add(1_800_000, Ordering::SeqCst);
    match l.admit(t, d(1, 200)).await {
        Err(Refusal::Budget {
            which: "hourly",
            retry_after_s,
        }) => assert_eq!(retry_after_s, 1800),
        other => panic!("{other:?}"),
    }
    now.fetch_add(1_800_000, Ordering::SeqCst);
    let k = l.admit(t, d(1, 200)).await.unwrap();
    l.settle(
        k,
        Actual {
            tokens_in: 1,
            tokens_out: 1,
            cost_nanousd: 200,
        },
    )
    .await;
    let u = l.usage(t).await;
    assert_eq!(u.spend_this_hour_nanousd, 200);
    assert_eq!(u.spent_nanousd, 600);
}

#[tokio::test]
async fn a_new_month_starts_from_zero() {
    let (cfg, now, l) = setup();
    let t = cfg.tenant("big").unwrap();
    let k = l.admit(t, d(1, 30_000)).await.unwrap();
    l.settle(
        k,
        Actual {
            tokens_in: 1,
            tokens_out: 1,
            cost_nanousd: 30_000,
        },
    )
    .await;
    assert!(l.admit(t, d(1, 30_000)).await.is_err());
    now.store(T0 + (8 * 86_400 + 5 * 3600) * 1000, Ordering::SeqCst);
    let u = l.usage(t).await;
    assert_eq!((u.month.as_str(), u.spent_nanousd), ("2026-12", 0));
    assert!(l.admit(t, d(1, 30_000)).await.is_ok());
}
