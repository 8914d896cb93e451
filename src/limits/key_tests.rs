//! Keys' own limits: a second scope reserved and settled with its tenant's.

use super::tests::{a, d, setup};
use super::*;
use crate::config::{ApiKey, Config};
use std::sync::atomic::Ordering;

/// `keyed` (rps 5, tpm 2000, $0.000015 a month) with its keys `team/a` (rps 2, tpm 500,
/// concurrency 1, $0.00001 a month, $0.000008 an hour) and `plain` (no limits).
fn keyed(cfg: &Config) -> (&Tenant, &ApiKey, &ApiKey) {
    let t = cfg.tenant("keyed").unwrap();
    (t, &t.api_keys[0], &t.api_keys[1])
}

#[tokio::test]
async fn a_key_budget_refuses_naming_the_key_and_the_tenant_budget_holds_for_the_other_key() {
    let (cfg, now, l) = setup();
    let (t, team, plain) = keyed(&cfg);
    assert!(team.has_limits() && !plain.has_limits());
    // Key: 10_000 a month, 8_000 an hour; tenant: 15_000 a month.
    let a1 = l.admit(t, team, d(1, 4_000)).await.unwrap();
    let a2 = l.admit(t, team, d(1, 4_000)).await.unwrap_err();
    // Both scopes reserved: the key's hour is full at 8_000 of its own, the month not.
    assert!(matches!(
        a2,
        Refusal::Rate {
            scope: Scope::Key,
            which: "concurrency",
            ..
        }
    ));
    l.settle(a1, a(1, 1, 3_000)).await;
    let a2 = l.admit(t, team, d(1, 5_000)).await.unwrap();
    l.settle(a2, a(1, 1, 5_000)).await;
    // The key has spent 8_000 of 10_000 (and 8_000 of its 8_000 this hour). In a
    // new second: its rps 2 is not what refuses.
    now.fetch_add(1000, Ordering::SeqCst);
    let r = l.admit(t, team, d(1, 1)).await.unwrap_err();
    match &r {
        Refusal::Budget {
            scope: Scope::Key,
            which: "hourly",
            retry_after_s: 3599,
            ..
        } => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(
        r.message(),
        "budget exceeded for this API key: hourly (this request could cost more than what is left)"
    );
    // The other key spends the tenant's budget only: 8_000 + 7_000 = 15_000.
    let p1 = l.admit(t, plain, d(1, 7_000)).await.unwrap();
    let r = l.admit(t, plain, d(1, 1)).await.unwrap_err();
    assert!(matches!(
        r,
        Refusal::Budget {
            scope: Scope::Tenant,
            which: "monthly",
            ..
        }
    ));
    assert_eq!(
        r.message(),
        "budget exceeded for this tenant: monthly (this request could cost more than what is left)"
    );
    // The tenant's refusal holds for the limited key too, whose own room is left.
    assert!(matches!(
        l.admit(t, team, d(1, 1)).await,
        Err(Refusal::Budget {
            scope: Scope::Tenant,
            ..
        }) | Err(Refusal::Budget {
            scope: Scope::Key,
            which: "hourly",
            ..
        })
    ));
    l.settle(p1, a(2, 3, 6_000)).await;
    let u = l.usage(t).await.unwrap();
    assert_eq!(
        (u.spent_nanousd, u.reserved_nanousd, u.requests),
        (14_000, 0, 3)
    );
    let k = l.key_usage(t, team).await.unwrap();
    assert_eq!(
        (k.tracked, k.spent_nanousd, k.reserved_nanousd, k.requests),
        (true, 8_000, 0, 2)
    );
    assert_eq!((k.tokens_in, k.tokens_out), (2, 2));
    assert_eq!(k.budget_nanousd, Some(10_000));
    assert_eq!(k.remaining_nanousd, Some(2_000));
    assert_eq!(k.remaining_usd.as_deref(), Some("0.000002000"));
    assert_eq!(k.spend_this_hour_nanousd, 8_000);
    assert_eq!(
        (k.hourly_budget_nanousd, k.hourly_remaining_nanousd),
        (Some(8_000), Some(0))
    );
    assert_eq!((k.tenant.as_str(), k.key_id.as_str()), ("keyed", "team/a"));
    let json = serde_json::to_value(&k).unwrap();
    assert_eq!(json["spent_usd"], "0.000008000");
    assert_eq!(json["hourly_budget_usd"], "0.000008000");
    // A key without limits of its own has no figures of its own.
    let p = l.key_usage(t, plain).await.unwrap();
    assert_eq!(
        (p.tracked, p.spent_nanousd, p.requests, p.budget_nanousd),
        (false, 0, 0, None)
    );
}

#[tokio::test]
async fn both_scopes_are_reserved_together_and_released_by_settle_and_by_drop() {
    let (cfg, _now, l) = setup();
    let (t, team, _) = keyed(&cfg);
    let k = l.admit(t, team, d(100, 2_500)).await.unwrap();
    assert_eq!(l.usage(t).await.unwrap().reserved_nanousd, 2_500);
    assert_eq!(l.key_usage(t, team).await.unwrap().reserved_nanousd, 2_500);
    drop(k);
    assert_eq!(l.usage(t).await.unwrap().reserved_nanousd, 0);
    let ku = l.key_usage(t, team).await.unwrap();
    assert_eq!((ku.reserved_nanousd, ku.spent_nanousd), (0, 0));
    // The key's concurrency slot came back with the drop.
    let k = l.admit(t, team, d(100, 2_500)).await.unwrap();
    l.settle(k, a(10, 20, 1_000)).await;
    let (u, ku) = (
        l.usage(t).await.unwrap(),
        l.key_usage(t, team).await.unwrap(),
    );
    assert_eq!(
        (u.spent_nanousd, u.tokens_in, u.tokens_out, u.requests),
        (1_000, 10, 20, 2)
    );
    assert_eq!(
        (ku.spent_nanousd, ku.tokens_in, ku.tokens_out, ku.requests),
        (1_000, 10, 20, 2)
    );
    assert_eq!(ku.hourly_remaining_nanousd, Some(7_000));
}

#[tokio::test]
async fn a_key_rps_limit_refuses_naming_the_key_while_its_tenant_has_room() {
    let (cfg, now, l) = setup();
    let (t, team, plain) = keyed(&cfg);
    for _ in 0..2 {
        let k = l.admit(t, team, d(1, 0)).await.unwrap();
        l.settle(k, Actual::default()).await;
    }
    let r = l.admit(t, team, d(1, 0)).await.unwrap_err();
    match &r {
        Refusal::Rate {
            scope: Scope::Key,
            which: "rps",
            retry_after_s: 1,
            headers,
        } => {
            // The key's window is the tighter one: 0 of 2 left (the tenant has 3 of 5).
            assert_eq!(
                (headers.limit_requests, headers.remaining_requests),
                (Some(2), Some(0))
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        r.message(),
        "rate limit exceeded for this API key: requests per second"
    );
    // The pre-check refuses the key too; the tenant's other key is not affected.
    assert!(matches!(
        l.precheck(t, team),
        Err(Refusal::Rate {
            scope: Scope::Key,
            which: "rps",
            ..
        })
    ));
    l.precheck(t, plain).unwrap();
    for _ in 0..3 {
        let k = l.admit(t, plain, d(1, 0)).await.unwrap();
        l.settle(k, Actual::default()).await;
    }
    // Now the tenant's window is full: the tenant's refusal, for either key.
    let r = l.admit(t, plain, d(1, 0)).await.unwrap_err();
    assert_eq!(
        r.message(),
        "rate limit exceeded for this tenant: requests per second"
    );
    assert!(matches!(
        l.precheck(t, plain),
        Err(Refusal::Rate {
            scope: Scope::Tenant,
            ..
        })
    ));
    now.fetch_add(1000, Ordering::SeqCst);
    l.precheck(t, team).unwrap();
    // A cache hit counts against the key's rps too.
    l.admit_request_only(t, team).await.unwrap();
    l.admit_request_only(t, team).await.unwrap();
    assert!(matches!(
        l.admit_request_only(t, team).await,
        Err(Refusal::Rate {
            scope: Scope::Key,
            which: "rps",
            ..
        })
    ));
}

#[tokio::test]
async fn headers_show_the_tighter_scope() {
    let (cfg, _now, l) = setup();
    let (t, team, plain) = keyed(&cfg);
    // Nothing counted yet: the key's limits are the tighter (2 of 2, 500 tokens).
    let h = l.peek_headers(t, team);
    assert_eq!(
        (h.limit_requests, h.remaining_requests, h.remaining_tokens),
        (Some(2), Some(2), Some(500))
    );
    let k = l.admit(t, team, d(100, 0)).await.unwrap();
    assert_eq!(
        (
            k.headers.limit_requests,
            k.headers.remaining_requests,
            k.headers.remaining_tokens
        ),
        (Some(2), Some(1), Some(400))
    );
    // The other key sees the tenant's: 5 - 2 requests, 2000 - 100 - 1200 tokens.
    let p = l.admit(t, plain, d(1_200, 0)).await.unwrap();
    assert_eq!(
        (
            p.headers.limit_requests,
            p.headers.remaining_requests,
            p.headers.remaining_tokens
        ),
        (Some(5), Some(3), Some(700))
    );
    // Once the tenant has fewer tokens left than the key, its figure is shown.
    let p2 = l.admit(t, plain, d(600, 0)).await.unwrap();
    let h = l.peek_headers(t, team);
    assert_eq!(
        (h.limit_requests, h.remaining_requests, h.remaining_tokens),
        (Some(2), Some(1), Some(100))
    );
    // A refusal carries the same combined view.
    match l.admit(t, team, d(1, 0)).await {
        Err(Refusal::Rate {
            scope: Scope::Key,
            which: "concurrency",
            headers,
            ..
        }) => assert_eq!(headers.remaining_tokens, Some(100)),
        other => panic!("{other:?}"),
    }
    drop((k, p, p2));
    // The combination itself: fewer requests left wins, with its own limit; with no
    // count known (in front of Redis), the smaller limit.
    let hd = |l: Option<u32>, r: Option<u32>, t: Option<u64>| RateHeaders {
        limit_requests: l,
        remaining_requests: r,
        remaining_tokens: t,
    };
    assert_eq!(
        tighter(hd(Some(10), Some(3), None), hd(Some(5), Some(4), Some(7))),
        hd(Some(10), Some(3), Some(7))
    );
    assert_eq!(
        tighter(hd(Some(10), None, None), hd(Some(5), None, None)),
        hd(Some(5), None, None)
    );
    assert_eq!(
        tighter(hd(None, None, Some(9)), hd(Some(5), Some(5), None)),
        hd(Some(5), Some(5), Some(9))
    );
}

#[tokio::test]
async fn a_request_that_can_never_fit_is_refused_as_invalid_and_counts_nothing() {
    let (cfg, _now, l) = setup();
    let (t, team, plain) = keyed(&cfg);
    let cases = [
        (
            plain,
            d(1_000_000_000_000_015, 0),
            Refusal::NeverFits {
                scope: Scope::Tenant,
                which: "tpm",
                demand: 1_000_000_000_000_015,
                limit: 2000,
            },
        ),
        (
            team,
            d(501, 0),
            Refusal::NeverFits {
                scope: Scope::Key,
                which: "tpm",
                demand: 501,
                limit: 500,
            },
        ),
        (
            plain,
            d(1, 15_001),
            Refusal::NeverFits {
                scope: Scope::Tenant,
                which: "monthly",
                demand: 15_001,
                limit: 15_000,
            },
        ),
        (
            team,
            d(1, 8_001),
            Refusal::NeverFits {
                scope: Scope::Key,
                which: "hourly",
                demand: 8_001,
                limit: 8_000,
            },
        ),
    ];
    for (key, demand, want) in cases {
        assert_eq!(l.admit(t, key, demand).await.unwrap_err(), want);
    }
    assert_eq!(
        Refusal::NeverFits {
            scope: Scope::Tenant,
            which: "tpm",
            demand: 1_000_000_000_000_015,
            limit: 2_000_000,
        }
        .message(),
        "this request can use up to 1000000000000015 tokens (max_tokens plus the prompt), \
         above this tenant's limit of 2000000 tokens per minute: lower max_tokens"
    );
    assert_eq!(
        Refusal::NeverFits {
            scope: Scope::Key,
            which: "monthly",
            demand: 10_000_000_001,
            limit: 10_000_000_000,
        }
        .message(),
        "this request can cost up to 10.000000001 USD (max_tokens plus the prompt, at the \
         model's prices), above this API key's whole monthly budget of 10.000000000 USD: \
         lower max_tokens"
    );
    // Nothing was counted: not a request, not a token.
    assert_eq!(l.usage(t).await.unwrap().requests, 0);
    assert_eq!(l.peek_headers(t, plain).remaining_tokens, Some(2000));
    assert_eq!(l.peek_headers(t, team).remaining_requests, Some(2));
    // Exactly at the limits: admitted.
    let k = l.admit(t, team, d(500, 8_000)).await.unwrap();
    l.settle(k, Actual::default()).await;
    // A budget of 0 is a pause, not a size limit: 402 as before.
    let mut paused = ApiKey::clone(plain);
    paused.budget.monthly_nanousd = Some(0);
    assert!(matches!(
        l.admit(t, &paused, d(1, 1)).await,
        Err(Refusal::Budget {
            scope: Scope::Key,
            which: "monthly",
            ..
        })
    ));
}

#[tokio::test]
async fn a_key_without_limits_touches_no_key_state() {
    let (cfg, _now, l) = setup();
    let (t, team, plain) = keyed(&cfg);
    for _ in 0..3 {
        let k = l.admit(t, plain, d(10, 100)).await.unwrap();
        l.settle(k, a(1, 1, 50)).await;
    }
    l.admit_request_only(t, plain).await.unwrap();
    l.precheck(t, plain).unwrap();
    let _ = l.peek_headers(t, plain);
    let _ = l.key_usage(t, plain).await.unwrap();
    assert_eq!(l.inner.local.key_states("keyed"), 0);
    assert_eq!(l.usage(t).await.unwrap().requests, 4);
    let k = l.admit(t, team, d(10, 100)).await.unwrap();
    assert_eq!(l.inner.local.key_states("keyed"), 1);
    drop(k);
}

#[tokio::test]
async fn a_key_with_limits_under_a_tenant_without_any_is_enforced() {
    let (cfg, _now, l) = setup();
    let t = cfg.tenant("loose").unwrap();
    let key = &t.api_keys[0];
    // $0.000003 for the key: three requests of 1_000, the tenant has no limit at all.
    let mut held = Vec::new();
    while let Ok(k) = l.admit(t, key, d(1, 1_000)).await {
        held.push(k);
    }
    assert_eq!(held.len(), 3);
    for k in held {
        l.settle(k, a(1, 1, 1_000)).await;
    }
    assert_eq!(l.usage(t).await.unwrap().spent_nanousd, 3_000);
    assert_eq!(l.key_usage(t, key).await.unwrap().spent_nanousd, 3_000);
}

#[tokio::test]
async fn concurrent_admissions_overshoot_neither_the_key_nor_the_tenant_budget() {
    let (cfg, _now, l) = setup();
    let (t, team, plain) = keyed(&cfg);
    // Raise the key's rate limits out of the way: only the budgets are raced.
    let mut t = Tenant::clone(t);
    let mut team = ApiKey::clone(team);
    team.rate = Rate::default();
    team.budget.hourly_nanousd = None;
    t.rate = Rate::default();
    let (t, team, plain) = (Arc::new(t), Arc::new(team), Arc::new(ApiKey::clone(plain)));
    // 1_000 each: the key fits 10, the tenant 15 in all.
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let (l, t) = (l.clone(), t.clone());
            let key = if i % 2 == 0 {
                team.clone()
            } else {
                plain.clone()
            };
            tokio::spawn(async move {
                l.admit(&t, &key, d(10, 1_000))
                    .await
                    .ok()
                    .map(|k| (i % 2 == 0, k))
            })
        })
        .collect();
    let mut held = Vec::new();
    for task in tasks {
        if let Some(k) = task.await.unwrap() {
            held.push(k);
        }
    }
    let on_team = held.iter().filter(|(team, _)| *team).count();
    assert_eq!(held.len(), 15);
    assert!(on_team <= 10, "{on_team}");
    for (_, k) in held {
        l.settle(k, a(1, 1, 1_000)).await;
    }
    assert_eq!(l.usage(&t).await.unwrap().spent_nanousd, 15_000);
    let ku = l.key_usage(&t, &team).await.unwrap();
    assert_eq!(ku.spent_nanousd, on_team as u64 * 1_000);
    assert!(ku.spent_nanousd <= 10_000);
}
