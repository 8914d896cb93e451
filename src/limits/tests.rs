use super::*;
use crate::config::{sha256_hex, ApiKey, Config, Counters};
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
  free:
    api_keys: [ { id: k3, sha256: "H3" } ]
    models: [m1]
  huge:
    api_keys: [ { id: k4, sha256: "H4" } ]
    models: [m1]
    rate: { rps: 2, concurrency: 1 }
  rich:
    api_keys: [ { id: k5, sha256: "H5" } ]
    models: [m1]
    budget: { monthly_usd: 20000000, hourly_usd: 10000000 }
  keyed:
    api_keys:
      - id: "team/a"
        sha256: "H6"
        rate: { rps: 2, tpm: 500, concurrency: 1 }
        budget: { monthly_usd: 0.00001, hourly_usd: 0.000008 }
      - { id: plain, sha256: "H7" }
    models: [m1]
    rate: { rps: 5, tpm: 2000 }
    budget: { monthly_usd: 0.000015 }
  loose:
    api_keys:
      - { id: capped, sha256: "H8", budget: { monthly_usd: 0.000003 } }
    models: [m1]
"#;

/// 2026-11-22 19:00:00 UTC
const T0: u64 = 1_795_374_000_000;

pub(super) fn setup() -> (Config, Arc<AtomicU64>, Limits) {
    let cfg = Config::from_yaml_str(
        &YAML
            .replace("\"H\"", &format!("\"{}\"", sha256_hex("a")))
            .replace("\"H2\"", &format!("\"{}\"", sha256_hex("b")))
            .replace("\"H3\"", &format!("\"{}\"", sha256_hex("c")))
            .replace("\"H4\"", &format!("\"{}\"", sha256_hex("d")))
            .replace("\"H5\"", &format!("\"{}\"", sha256_hex("e")))
            .replace("\"H6\"", &format!("\"{}\"", sha256_hex("f")))
            .replace("\"H7\"", &format!("\"{}\"", sha256_hex("g")))
            .replace("\"H8\"", &format!("\"{}\"", sha256_hex("h"))),
    )
    .unwrap();
    let now = Arc::new(AtomicU64::new(T0));
    let n = now.clone();
    let limits = Limits::with_clock(
        &Counters::Memory,
        Arc::new(move || n.load(Ordering::SeqCst)),
    );
    (cfg, now, limits)
}

/// The tenant's first key (in this file's tenants: one without limits of its own).
fn key0(t: &Tenant) -> &ApiKey {
    &t.api_keys[0]
}

pub(super) fn d(tokens: u64, cost: u64) -> Demand {
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
        let k = l.admit(t, key0(t), d(1, 0)).await.unwrap();
        l.settle(k, Actual::default()).await;
    }
    match l.admit(t, key0(t), d(1, 0)).await {
        Err(Refusal::Rate {
            scope: Scope::Tenant,
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
    let k = l.admit(t, key0(t), d(1, 0)).await.unwrap();
    assert_eq!(k.headers.remaining_requests, Some(2));
}

#[tokio::test]
async fn precheck_refuses_at_rps_or_concurrency_and_counts_nothing() {
    let (cfg, now, l) = setup();
    let t = cfg.tenant("t").unwrap();
    assert_eq!(l.peek_headers(t, key0(t)).remaining_requests, Some(3));
    let a = l.admit(t, key0(t), d(100, 0)).await.unwrap();
    let b = l.admit(t, key0(t), d(100, 0)).await.unwrap();
    // rps 3 has room, concurrency 2 does not.
    assert!(matches!(
        l.precheck(t, key0(t)),
        Err(Refusal::Rate {
            which: "concurrency",
            retry_after_s: 1,
            ..
        })
    ));
    l.settle(a, Actual::default()).await;
    l.precheck(t, key0(t)).unwrap();
    l.precheck(t, key0(t)).unwrap();
    let c = l.admit(t, key0(t), d(1, 0)).await.unwrap();
    // Three admitted this second: refused, and the refusals were not counted. (Only
    // `b` still holds tokens: `a` settled at none, `c` was dropped.)
    drop(c);
    match l.precheck(t, key0(t)) {
        Err(Refusal::Rate {
            which: "rps",
            headers,
            ..
        }) => assert_eq!(headers.remaining_requests, Some(0)),
        other => panic!("{other:?}"),
    }
    let h = l.peek_headers(t, key0(t));
    assert_eq!(
        (h.limit_requests, h.remaining_requests, h.remaining_tokens),
        (Some(3), Some(0), Some(1000 - 100))
    );
    now.fetch_add(1000, Ordering::SeqCst);
    l.precheck(t, key0(t)).unwrap();
    assert_eq!(l.peek_headers(t, key0(t)).remaining_requests, Some(3));
    drop(b);
    // A tenant with no limits is never refused early.
    let free = cfg.tenant("free").unwrap();
    l.precheck(free, key0(free)).unwrap();
    assert_eq!(l.peek_headers(free, key0(free)), RateHeaders::default());
}

#[tokio::test]
async fn concurrency_is_released_by_settle_and_by_drop() {
    let (cfg, now, l) = setup();
    let t = cfg.tenant("t").unwrap();
    let a = l.admit(t, key0(t), d(1, 0)).await.unwrap();
    let b = l.admit(t, key0(t), d(1, 0)).await.unwrap();
    now.fetch_add(1000, Ordering::SeqCst);
    assert!(matches!(
        l.admit(t, key0(t), d(1, 0)).await,
        Err(Refusal::Rate {
            which: "concurrency",
            ..
        })
    ));
    l.settle(a, Actual::default()).await;
    let c = l.admit(t, key0(t), d(1, 0)).await.unwrap();
    drop(b);
    drop(c);
    let _e = l.admit(t, key0(t), d(1, 0)).await.unwrap();
    let _f = l.admit(t, key0(t), d(1, 0)).await.unwrap();
}

#[tokio::test]
async fn tpm_counts_reserved_then_actual_tokens() {
    let (cfg, now, l) = setup();
    let t = cfg.tenant("t").unwrap();
    let k = l.admit(t, key0(t), d(900, 0)).await.unwrap();
    assert_eq!(k.headers.remaining_tokens, Some(100));
    assert!(matches!(
        l.admit(t, key0(t), d(200, 0)).await,
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
    let k = l.admit(t, key0(t), d(700, 0)).await.unwrap();
    l.settle(k, Actual::default()).await;
    now.fetch_add(61_000, Ordering::SeqCst);
    assert!(l.admit(t, key0(t), d(1000, 0)).await.is_ok());
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
        tasks.push(tokio::spawn(async move {
            l.admit(&t, key0(&t), d(10, 1_000)).await.ok()
        }));
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
    let u = l.usage(t).await.unwrap();
    assert_eq!(u.spent_nanousd, 18_500);
    assert_eq!(u.reserved_nanousd, 0);
    assert_eq!(u.remaining_nanousd, Some(18_500));
    assert_eq!(u.spent_usd, "0.000018500");
    assert_eq!(u.requests, 37);
    let mut more = 0;
    while let Ok(k) = l.admit(t, key0(t), d(1, 1_000)).await {
        more += 1;
        std::mem::forget(k);
    }
    assert_eq!(more, 18);
    match l.admit(t, key0(t), d(1, 1_000)).await {
        Err(Refusal::Budget {
            which: "monthly",
            retry_after_s,
            ..
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
    let k = l.admit(t, key0(t), d(1, 400)).await.unwrap();
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
    match l.admit(t, key0(t), d(1, 200)).await {
        Err(Refusal::Budget {
            which: "hourly",
            retry_after_s,
            ..
        }) => assert_eq!(retry_after_s, 1800),
        other => panic!("{other:?}"),
    }
    now.fetch_add(1_800_000, Ordering::SeqCst);
    let k = l.admit(t, key0(t), d(1, 200)).await.unwrap();
    l.settle(
        k,
        Actual {
            tokens_in: 1,
            tokens_out: 1,
            cost_nanousd: 200,
        },
    )
    .await;
    let u = l.usage(t).await.unwrap();
    assert_eq!(u.spent_nanousd, 600);
    // This hour 200; the 24 before it hold 400 in all.
    assert_eq!(l.velocity(t).await, Some((200, 400 / 24)));
}

#[tokio::test]
async fn a_new_month_starts_from_zero() {
    let (cfg, now, l) = setup();
    let t = cfg.tenant("big").unwrap();
    let k = l.admit(t, key0(t), d(1, 30_000)).await.unwrap();
    l.settle(
        k,
        Actual {
            tokens_in: 1,
            tokens_out: 1,
            cost_nanousd: 30_000,
        },
    )
    .await;
    assert!(l.admit(t, key0(t), d(1, 30_000)).await.is_err());
    now.store(T0 + (8 * 86_400 + 5 * 3600) * 1000, Ordering::SeqCst);
    let u = l.usage(t).await.unwrap();
    assert_eq!((u.month.as_str(), u.spent_nanousd), ("2026-12", 0));
    assert!(l.admit(t, key0(t), d(1, 30_000)).await.is_ok());
}

pub(super) fn a(tokens_in: u64, tokens_out: u64, cost: u64) -> Actual {
    Actual {
        tokens_in,
        tokens_out,
        cost_nanousd: cost,
    }
}

#[tokio::test]
async fn a_dropped_ticket_gives_back_its_slot_and_its_reservation() {
    let (cfg, _now, l) = setup();
    let t = cfg.tenant("big").unwrap();
    let k = l.admit(t, key0(t), d(10, 37_000)).await.unwrap();
    assert!(matches!(
        l.admit(t, key0(t), d(1, 1)).await,
        Err(Refusal::Budget {
            which: "monthly",
            ..
        })
    ));
    assert_eq!(l.usage(t).await.unwrap().reserved_nanousd, 37_000);
    drop(k);
    let u = l.usage(t).await.unwrap();
    assert_eq!((u.reserved_nanousd, u.spent_nanousd), (0, 0));
    assert!(l.admit(t, key0(t), d(10, 37_000)).await.is_ok());
}

#[tokio::test]
async fn an_actual_cost_above_the_reservation_is_recorded_as_it_is() {
    let (cfg, _now, l) = setup();
    let t = cfg.tenant("big").unwrap();
    let k = l.admit(t, key0(t), d(10, 1_000)).await.unwrap();
    l.settle(k, a(7, 9, 1_500)).await;
    let u = l.usage(t).await.unwrap();
    assert_eq!(
        (
            u.spent_nanousd,
            u.reserved_nanousd,
            u.tokens_in,
            u.tokens_out
        ),
        (1_500, 0, 7, 9)
    );
    assert_eq!(u.remaining_nanousd, Some(35_500));
    assert_eq!(u.remaining_usd.as_deref(), Some("0.000035500"));
    assert_eq!(u.budget_usd.as_deref(), Some("0.000037000"));
}

#[tokio::test]
async fn cache_hits_count_against_rps_only() {
    let (cfg, now, l) = setup();
    let t = cfg.tenant("huge").unwrap();
    // concurrency 1 is held, yet a cache hit still passes: it holds nothing.
    let k = l.admit(t, key0(t), d(1, 1)).await.unwrap();
    let h = l.admit_request_only(t, key0(t)).await.unwrap();
    assert_eq!((h.limit_requests, h.remaining_requests), (Some(2), Some(0)));
    assert!(matches!(
        l.admit_request_only(t, key0(t)).await,
        Err(Refusal::Rate {
            which: "rps",
            retry_after_s: 1,
            ..
        })
    ));
    now.fetch_add(1000, Ordering::SeqCst);
    assert!(matches!(
        l.admit(t, key0(t), d(1, 1)).await,
        Err(Refusal::Rate {
            which: "concurrency",
            ..
        })
    ));
    l.settle(k, Actual::default()).await;
    // The admission and the cache hit; refusals are not requests served.
    assert_eq!(l.usage(t).await.unwrap().requests, 2);
}

#[tokio::test]
async fn tpm_retry_after_runs_until_the_oldest_tokens_leave_the_window() {
    let (cfg, now, l) = setup();
    let t = cfg.tenant("t").unwrap();
    let k = l.admit(t, key0(t), d(600, 0)).await.unwrap();
    l.settle(k, a(300, 300, 0)).await;
    now.fetch_add(20_000, Ordering::SeqCst);
    let k = l.admit(t, key0(t), d(300, 0)).await.unwrap();
    assert_eq!(k.headers.remaining_tokens, Some(100));
    match l.admit(t, key0(t), d(200, 0)).await {
        Err(Refusal::Rate {
            scope: Scope::Tenant,
            which: "tpm",
            retry_after_s,
            headers,
        }) => {
            assert_eq!(retry_after_s, 40);
            assert_eq!(headers.remaining_tokens, Some(100));
        }
        other => panic!("{other:?}"),
    }
    now.fetch_add(40_000, Ordering::SeqCst);
    assert!(l.admit(t, key0(t), d(200, 0)).await.is_ok());
}

#[tokio::test]
async fn a_request_straddling_the_month_end_is_billed_to_the_month_it_started_in() {
    let (cfg, now, l) = setup();
    let t = cfg.tenant("big").unwrap();
    // 2026-11-30 23:59:59 UTC
    let last_second = T0 + (8 * 86_400 + 5 * 3600 - 1) * 1000;
    now.store(last_second, Ordering::SeqCst);
    let k = l.admit(t, key0(t), d(1, 30_000)).await.unwrap();
    assert!(l.admit(t, key0(t), d(1, 30_000)).await.is_err());
    now.store(last_second + 2_000, Ordering::SeqCst);
    // December starts from zero while November's request is still in flight...
    let dec = l.usage(t).await.unwrap();
    assert_eq!(
        (dec.month.as_str(), dec.reserved_nanousd, dec.requests),
        ("2026-12", 0, 0)
    );
    let k2 = l.admit(t, key0(t), d(1, 30_000)).await.unwrap();
    // ...and November's spend stays in November.
    l.settle(k, a(1, 1, 25_000)).await;
    let dec = l.usage(t).await.unwrap();
    assert_eq!((dec.spent_nanousd, dec.reserved_nanousd), (0, 30_000));
    l.settle(k2, a(1, 1, 1_000)).await;
    assert_eq!(l.usage(t).await.unwrap().spent_nanousd, 1_000);
    // Back in November (a clock that stepped back), the late settle is there.
    now.store(last_second, Ordering::SeqCst);
    let nov = l.usage(t).await.unwrap();
    assert_eq!(
        (nov.month.as_str(), nov.spent_nanousd, nov.requests),
        ("2026-11", 25_000, 1)
    );
}

#[tokio::test]
async fn budgets_above_what_a_double_holds_stay_exact() {
    let (cfg, _now, l) = setup();
    // 10_000_000_000_000_001 nano-USD: above 2^53, and finer than the file's f64 reads.
    let mut t = Tenant::clone(cfg.tenant("rich").unwrap());
    t.budget.hourly_nanousd = Some(10_000_000_000_000_001);
    let t = &t;
    let k = l
        .admit(t, key0(t), d(1, 10_000_000_000_000_000))
        .await
        .unwrap();
    l.settle(k, a(0, 0, 10_000_000_000_000_000)).await;
    let k = l.admit(t, key0(t), d(1, 1)).await.unwrap();
    l.settle(k, a(0, 0, 1)).await;
    assert!(matches!(
        l.admit(t, key0(t), d(1, 1)).await,
        Err(Refusal::Budget {
            which: "hourly",
            ..
        })
    ));
    assert_eq!(l.usage(t).await.unwrap().spent_usd, "10000000.000000001");
}

#[tokio::test]
async fn velocity_compares_this_hour_with_the_last_24() {
    let (cfg, now, l) = setup();
    let t = cfg.tenant("free").unwrap();
    for _ in 0..24 {
        let k = l.admit(t, key0(t), d(1, 1_000)).await.unwrap();
        l.settle(k, a(1, 1, 100)).await;
        now.fetch_add(3_600_000, Ordering::SeqCst);
    }
    let k = l.admit(t, key0(t), d(1, 1_000)).await.unwrap();
    l.settle(k, a(1, 1, 5_000)).await;
    assert_eq!(l.velocity(t).await, Some((5_000, 100)));
    // The usage view carries the same two figures.
    let u = l.usage(t).await.unwrap();
    assert_eq!(
        (u.spend_this_hour_nanousd, u.spend_hourly_avg_nanousd),
        (5_000, 100)
    );
    let json = serde_json::to_value(&u).unwrap();
    assert_eq!(json["spend_this_hour_nanousd"], 5_000);
    assert_eq!(json["spend_hourly_avg_nanousd"], 100);
    assert_eq!(l.store_errors(), 0);
}

#[test]
fn usd_is_exact() {
    assert_eq!(usd(0), "0.000000000");
    assert_eq!(usd(1), "0.000000001");
    assert_eq!(usd(12_000_000_500), "12.000000500");
    assert_eq!(usd(u64::MAX), "18446744073.709551615");
}

/// Nothing listens on port 1: every call to the store fails at once.
fn unreachable(on_error: OnError) -> Limits {
    let conf = Counters::Redis {
        url: "redis://127.0.0.1:1/".to_string(),
        on_error,
    };
    Limits::with_clock(&conf, Arc::new(move || T0))
}

#[tokio::test]
async fn unreachable_redis_fail_closed_refuses_without_panicking() {
    let (cfg, _now, _) = setup();
    let l = unreachable(OnError::FailClosed);
    let t = cfg.tenant("t").unwrap();
    for _ in 0..5 {
        assert!(matches!(
            l.admit(t, key0(t), d(1, 1)).await,
            Err(Refusal::Unavailable(_))
        ));
        assert!(matches!(
            l.admit_request_only(t, key0(t)).await,
            Err(Refusal::Unavailable(_))
        ));
    }
    assert!(l.usage(t).await.is_err());
    assert_eq!(l.velocity(t).await, None);
    assert!(l.store_errors() >= 10);
    // A tenant with nothing to enforce needs no round trip to be admitted.
    let free = cfg.tenant("free").unwrap();
    let k = l.admit(free, key0(free), d(1, 1)).await.unwrap();
    l.settle(k, a(1, 1, 1)).await;
}

#[tokio::test]
async fn unreachable_redis_fail_open_enforces_rps_and_concurrency_per_node() {
    let (cfg, _now, _) = setup();
    let l = unreachable(OnError::FailOpen);
    let t = cfg.tenant("t").unwrap();
    // Budgets cannot be checked (the hourly one fits 1 of these), rps 3 and
    // concurrency 2 can.
    let k1 = l.admit(t, key0(t), d(1, 400)).await.unwrap();
    let k2 = l.admit(t, key0(t), d(1, 400)).await.unwrap();
    assert!(matches!(
        l.admit(t, key0(t), d(1, 400)).await,
        Err(Refusal::Rate {
            which: "concurrency",
            ..
        })
    ));
    drop(k1);
    l.settle(k2, a(1, 1, 1)).await;
    let k3 = l.admit(t, key0(t), d(1, 400)).await.unwrap();
    assert!(matches!(
        l.admit(t, key0(t), d(1, 400)).await,
        Err(Refusal::Rate { which: "rps", .. })
    ));
    drop(k3);
    assert!(l.store_errors() >= 3);
}
