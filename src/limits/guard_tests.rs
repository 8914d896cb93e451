//! The spend guard on an injected clock: a simulated day at a tenant's normal rate,
//! then a runaway, evaluated the way the background check does it.

use super::guard::Change;
use super::*;
use crate::config::{sha256_hex, Config, Guard};
use std::sync::atomic::{AtomicU64, Ordering};

const YAML: &str = r#"
node: { region: r1 }
listen: { http: 127.0.0.1:18080 }
providers:
  p1: { kind: openai_compatible, base_url: "http://127.0.0.1:9", region: r1 }
models:
  m1: { provider: p1, price: { input_per_mtok: 1, output_per_mtok: 2 } }
tenants:
  alerted:
    api_keys: [ { id: k1, sha256: "H1" } ]
    models: [m1]
    guard: { velocity_factor: 10, min_hourly_usd: 50, action: alert }
  throttled:
    api_keys: [ { id: k2, sha256: "H2" } ]
    models: [m1]
    guard: { velocity_factor: 10, min_hourly_usd: 50, action: throttle, throttle_rps: 2 }
  blocked:
    api_keys: [ { id: k3, sha256: "H3" } ]
    models: [m1]
    guard: { velocity_factor: 10, min_hourly_usd: 50, action: block }
  unguarded:
    api_keys: [ { id: k4, sha256: "H4" } ]
    models: [m1]
"#;

/// 2026-11-22 00:00:00 UTC
const DAY0: u64 = 1_795_305_600_000;
const USD: u64 = 1_000_000_000;

fn yaml() -> String {
    let mut yaml = YAML.to_string();
    for i in 1..=4 {
        yaml = yaml.replace(
            &format!("\"H{i}\""),
            &format!("\"{}\"", sha256_hex(&i.to_string())),
        );
    }
    yaml
}

fn setup() -> (Config, Arc<AtomicU64>, Limits) {
    let cfg = Config::from_yaml_str(&yaml()).unwrap();
    let now = Arc::new(AtomicU64::new(DAY0));
    let clock = now.clone();
    let limits = Limits::with_clock(
        &Counters::Memory,
        Arc::new(move || clock.load(Ordering::SeqCst)),
    );
    (cfg, now, limits)
}

fn demand() -> Demand {
    Demand {
        tokens: 10,
        cost_nanousd: 1,
    }
}

async fn spend(l: &Limits, t: &Tenant, nanousd: u64) -> Result<(), Refusal> {
    let ticket = l.admit(t, &t.api_keys[0], demand()).await?;
    l.settle(
        ticket,
        Actual {
            tokens_in: 5,
            tokens_out: 5,
            cost_nanousd: nanousd,
        },
    )
    .await;
    Ok(())
}

fn tenants(cfg: &Config) -> Vec<Arc<Tenant>> {
    cfg.tenants.clone()
}

#[test]
fn the_baseline_counts_only_the_hours_of_history_and_a_new_tenant_starts_at_the_floor() {
    let g = Guard {
        factor_milli: 10_000,
        min_hourly_nanousd: 50 * USD,
        action: GuardAction::Block,
        throttle_rps: 1,
    };
    // No history at all: the floor is the baseline, so 10 x 50 USD, not the first dollar.
    let new = SpendHours::default();
    assert_eq!(new.baseline(g.min_hourly_nanousd), 50 * USD);
    assert_eq!(new.threshold(&g), 500 * USD);
    // Two hours old at 20 USD an hour: compared with its two hours (200 USD), not with
    // a 24 h average of mostly zeros (which would be 1.67 USD, so the floor of 50).
    let mut young = SpendHours::default();
    young.past[0] = 20 * USD;
    young.past[1] = 20 * USD;
    assert_eq!(young.baseline(g.min_hourly_nanousd), 20 * USD);
    assert_eq!(young.threshold(&g), 200 * USD);
    assert_eq!(young.avg24(), 40 * USD / 24);
    // A quiet established tenant: the floor wins over factor x baseline.
    let quiet = SpendHours {
        this_hour: 0,
        past: [USD; 24],
    };
    assert_eq!(quiet.threshold(&g), 50 * USD);
    // A fractional factor is exact in thousandths.
    let g15 = Guard {
        factor_milli: 1_500,
        min_hourly_nanousd: 0,
        ..g
    };
    let busy = SpendHours {
        this_hour: 0,
        past: [100 * USD; 24],
    };
    assert_eq!(busy.threshold(&g15), 150 * USD);
}

/// $100 a day for a simulated day, then 50 times that: each guard engages at the first
/// check after this hour's spend passes max(10 x 4.17, 50) = 50 USD, and not before.
#[tokio::test]
async fn a_runaway_after_a_normal_day_engages_each_guard_at_the_first_check_past_the_threshold() {
    let (cfg, now, l) = setup();
    let all = tenants(&cfg);
    let per_minute = 100 * USD / 1440;
    for _minute in 0..24 * 60 {
        for t in &all {
            spend(&l, t, per_minute).await.unwrap();
        }
        now.fetch_add(60_000, Ordering::SeqCst);
        assert!(
            l.check_guards(&all).await.is_empty(),
            "a normal day engages nothing"
        );
    }
    // The runaway: 50 x $100/day is $0.0579 a second, one request a second.
    let per_second = 50 * 100 * USD / 86_400;
    let mut engaged = Vec::new();
    let mut seconds = 0;
    while engaged.is_empty() {
        for t in &all {
            spend(&l, t, per_second).await.unwrap();
        }
        now.fetch_add(1_000, Ordering::SeqCst);
        seconds += 1;
        engaged = l.check_guards(&all).await;
        assert!(seconds < 3_600, "never engaged");
    }
    // 50 USD at $0.0579 a second is crossed by the 864th request: engaged at that
    // very check, within one tick of the crossing.
    assert_eq!(seconds, 50 * USD / per_second + 1);
    let names: Vec<_> = engaged
        .iter()
        .map(|c| match c {
            Change::Engaged {
                tenant,
                action,
                figures,
            } => {
                assert!(figures.spend_this_hour > 50 * USD);
                assert!(figures.spend_this_hour < 50 * USD + per_second);
                assert_eq!(figures.threshold, 50 * USD);
                assert_eq!(figures.baseline, per_minute * 60);
                (tenant.as_str(), *action)
            }
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        names,
        [
            ("alerted", GuardAction::Alert),
            ("throttled", GuardAction::Throttle),
            ("blocked", GuardAction::Block)
        ]
    );
    let t = |id| cfg.tenant(id).unwrap();
    // alert: only the event; requests go on.
    for _ in 0..5 {
        spend(&l, t("alerted"), 1).await.unwrap();
    }
    // block: every request refused with the guard's 402, before any counter.
    let r = spend(&l, t("blocked"), 1).await.unwrap_err();
    assert!(matches!(
        r,
        Refusal::Guard {
            action: GuardAction::Block,
            ..
        }
    ));
    assert!(l.precheck(t("blocked"), &t("blocked").api_keys[0]).is_err());
    assert!(l
        .admit_request_only(t("blocked"), &t("blocked").api_keys[0])
        .await
        .is_err());
    // throttle: 2 requests this second, the third is the guard's 429.
    now.fetch_add(1_000 - now.load(Ordering::SeqCst) % 1_000, Ordering::SeqCst);
    spend(&l, t("throttled"), 1).await.unwrap();
    spend(&l, t("throttled"), 1).await.unwrap();
    let r = spend(&l, t("throttled"), 1).await.unwrap_err();
    assert!(
        matches!(
            r,
            Refusal::Guard {
                action: GuardAction::Throttle,
                throttle_rps: 2,
                retry_after_s: 1,
                ..
            }
        ),
        "{r:?}"
    );
    now.fetch_add(1_000, Ordering::SeqCst);
    spend(&l, t("throttled"), 1).await.unwrap();
    // The unguarded tenant spent the same and was never touched.
    spend(&l, t("unguarded"), 1).await.unwrap();
    let view = l.guard_view(t("blocked")).unwrap();
    assert!(view.engaged && view.engaged_since.is_some());
    assert_eq!(view.threshold_nanousd, 50 * USD);
    assert!(l.guard_view(t("unguarded")).is_none());
    assert!(l.guard_engaged(t("throttled")) && !l.guard_engaged(t("unguarded")));
}

#[tokio::test]
async fn it_stays_engaged_until_an_hour_ends_below_the_threshold() {
    let (cfg, now, l) = setup();
    let all = tenants(&cfg);
    let t = cfg.tenant("blocked").unwrap();
    // 2026-11-22 00:00; a new tenant: threshold 10 x 50 = 500 USD.
    spend(&l, t, 501 * USD).await.unwrap();
    let c = l.check_guards(&all).await;
    assert!(matches!(&c[..], [Change::Engaged { .. }]), "{c:?}");
    // The next hour: blocked, so nothing is spent; still engaged all through it.
    now.fetch_add(3_600_000, Ordering::SeqCst);
    assert!(l.check_guards(&all).await.is_empty());
    assert!(spend(&l, t, 1).await.is_err());
    now.fetch_add(3_599_000, Ordering::SeqCst);
    assert!(l.check_guards(&all).await.is_empty());
    assert!(l.guard_engaged(t));
    // That hour has ended below the threshold: stood down at the first check after.
    now.fetch_add(1_000, Ordering::SeqCst);
    let c = l.check_guards(&all).await;
    assert!(
        matches!(
            &c[..],
            [Change::Cleared {
                reason: "hour_ended",
                ..
            }]
        ),
        "{c:?}"
    );
    spend(&l, t, 1).await.unwrap();
}

#[tokio::test]
async fn a_clear_stands_the_guard_down_and_keeps_it_down_for_for_s() {
    let (cfg, now, l) = setup();
    let all = tenants(&cfg);
    let t = cfg.tenant("blocked").unwrap();
    spend(&l, t, 600 * USD).await.unwrap();
    assert_eq!(l.check_guards(&all).await.len(), 1);
    let (change, shared) = l.clear_guard(t, 60).await;
    assert!(shared.is_ok());
    assert!(matches!(
        change,
        Some(Change::Cleared {
            reason: "admin",
            ..
        })
    ));
    spend(&l, t, 600 * USD).await.unwrap();
    // Still far over, but cleared for 60 s: no engagement.
    now.fetch_add(59_000, Ordering::SeqCst);
    assert!(l.check_guards(&all).await.is_empty());
    assert!(l.guard_view(t).unwrap().cleared_until.is_some());
    // After: engaged again, as the spend is still over.
    now.fetch_add(1_000, Ordering::SeqCst);
    assert!(matches!(
        &l.check_guards(&all).await[..],
        [Change::Engaged { .. }]
    ));
    // A clear of a guard that is not engaged reports no change.
    let (c, _) = l.clear_guard(cfg.tenant("alerted").unwrap(), 0).await;
    assert!(c.is_none());
}

#[tokio::test]
async fn a_tenant_whose_guard_a_reload_removed_is_forgotten() {
    let (cfg, _now, l) = setup();
    let t = cfg.tenant("blocked").unwrap();
    spend(&l, t, 600 * USD).await.unwrap();
    assert_eq!(l.check_guards(&cfg.tenants).await.len(), 1);
    let rest: Vec<_> = cfg
        .tenants
        .iter()
        .filter(|x| x.id != "blocked")
        .cloned()
        .collect();
    l.check_guards(&rest).await;
    assert!(!l.inner.guard.engaged("blocked"));
}

#[test]
fn guard_config_errors_name_the_yaml_path_and_defaults_are_documented_ones() {
    let bad = yaml().replace(
        "guard: { velocity_factor: 10, min_hourly_usd: 50, action: block }",
        "guard: { velocity_factor: 0.5, min_hourly_usd: -1, action: stop, throttle_rps: 0 }",
    );
    let errors = Config::from_yaml_str(&bad).unwrap_err().0;
    for (path, needle) in [
        ("tenants.blocked.guard.velocity_factor", "from 1 to"),
        ("tenants.blocked.guard.min_hourly_usd", ""),
        ("tenants.blocked.guard.action", "`stop` is not one of"),
        ("tenants.blocked.guard.throttle_rps", "greater than 0"),
    ] {
        assert!(
            errors
                .iter()
                .any(|e| e.path == path && e.message.contains(needle)),
            "{path}: {errors:?}"
        );
    }
    let unknown = yaml().replace("action: block }", "action: block, factor: 3 }");
    let errors = Config::from_yaml_str(&unknown).unwrap_err().0;
    assert!(
        errors
            .iter()
            .any(|e| e.path.starts_with("tenants.blocked.guard")),
        "{errors:?}"
    );
    let defaults = yaml().replace(
        "guard: { velocity_factor: 10, min_hourly_usd: 50, action: block }",
        "guard: {}",
    );
    let cfg = Config::from_yaml_str(&defaults).unwrap();
    assert_eq!(
        cfg.tenant("blocked").unwrap().guard,
        Some(Guard {
            factor_milli: 10_000,
            min_hourly_nanousd: 10 * USD,
            action: GuardAction::Alert,
            throttle_rps: 1,
        })
    );
}
