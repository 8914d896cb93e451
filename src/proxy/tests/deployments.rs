//! The chain over a model's several deployments: the next deployment before the next
//! model, cooldowns from `retry-after`, the soonest `retry-after` when nothing is
//! usable, and `rpm` quotas.

use super::*;

/// Model m0 on deployments p0 (tried first: heavier) and p1, with `p0_extra` in p0's
/// entry; model m1 on p2.
fn two_deployments(
    addrs: &[SocketAddr],
    p0_extra: &str,
) -> (Arc<Shared>, Vec<Arc<Model>>, tempdir::Dir) {
    let models = format!(
        "  m0:\n    deployments:\n      - {{ provider: p0, upstream_model: u0, weight: 2{p0_extra} }}\n      - {{ provider: p1, upstream_model: u1 }}\n    price: {{ input_per_mtok: 1, output_per_mtok: 2 }}\n  m1: {{ provider: p2, price: {{ input_per_mtok: 1, output_per_mtok: 2 }} }}\n"
    );
    gateway_with(addrs, &models, &["m0".to_string(), "m1".to_string()], "")
}

#[tokio::test]
async fn a_model_s_other_deployment_serves_before_the_next_model() {
    let a = fake(vec![Act::Status(503, None)]).await;
    let b = fake(vec![Act::Ok { delay_ms: 0 }]).await;
    let c = fake(vec![Act::Ok { delay_ms: 0 }]).await;
    let (gw, models, _d) = two_deployments(&[a.addr, b.addr, c.addr], "");
    let (mut outcome, client, plan) = run(&gw, &models, true).await;
    let row = row_of(&plan, &outcome);
    assert_eq!(
        (
            row.attempts,
            row.fallback_used,
            row.model.as_str(),
            row.provider.as_str()
        ),
        (2, 0, "m0", "p1")
    );
    assert_eq!(row.upstream_model, "u1");
    assert_eq!(client.header("x-gateway-provider").as_deref(), Some("p1"));
    assert_eq!(
        client.header("x-gateway-fallback").as_deref(),
        Some("false")
    );
    let (status, _) = client.finish(&mut outcome);
    assert_eq!(status, 200);
    assert_eq!(
        [&a, &b, &c].map(|f| f.requests.load(Ordering::SeqCst)),
        [1, 1, 0],
        "the next model is not asked while m0 has a usable deployment"
    );
}

#[tokio::test]
async fn a_429_with_retry_after_parks_its_deployment_and_no_more() {
    let a = fake(vec![Act::Status(429, Some(3))]).await;
    let b = fake(vec![Act::Ok { delay_ms: 0 }]).await;
    let c = fake(vec![Act::Ok { delay_ms: 0 }]).await;
    let (gw, models, _d) = two_deployments(&[a.addr, b.addr, c.addr], "");
    let (first, _, _) = run(&gw, &models, false).await;
    assert_eq!(first.upstream_attempts(), 2);
    let parked = gw.pool.live(&models[0].deployments[0]);
    let now = crate::audit::time::now_ms();
    let until = parked.cooling_until(now).expect("p0 cools down");
    assert!((2_000..=3_000).contains(&(until - now)), "{}", until - now);
    // Parked: skipped, not tried.
    for _ in 0..3 {
        let (o, _, plan) = run(&gw, &models, false).await;
        assert_eq!(o.upstream_attempts(), 1);
        assert_eq!(row_of(&plan, &o).provider, "p1");
    }
    assert_eq!(a.requests.load(Ordering::SeqCst), 1);
    assert_eq!(
        gw.pool.live(&models[1].deployments[0]).in_flight(),
        0,
        "no attempt stays counted in flight"
    );
}

#[tokio::test]
async fn nothing_usable_left_answers_503_with_the_soonest_retry_after() {
    let a = fake(vec![Act::Status(429, Some(4))]).await;
    let b = fake(vec![Act::Status(429, Some(2))]).await;
    let c = fake(vec![Act::Status(429, Some(9))]).await;
    let (gw, models, _d) = two_deployments(&[a.addr, b.addr, c.addr], "");
    let (o, _, _) = run(&gw, &models, false).await;
    assert_eq!(o.upstream_attempts(), 3);
    assert_eq!(o.error.as_ref().and_then(|e| e.retry_after), Some(2));
    // Now every deployment is parked: nothing goes upstream at all.
    let (o, _, plan) = run(&gw, &models, false).await;
    assert_eq!(o.upstream_attempts(), 0);
    let e = o.error.clone().expect("refused");
    assert_eq!(e.kind, ErrorKind::UpstreamUnavailable);
    assert_eq!(e.retry_after, Some(2), "{}", e.message);
    assert!(e.message.contains("cooling down"), "{}", e.message);
    assert_eq!(row_of(&plan, &o).attempts, 0);
    let calls: usize = [&a, &b, &c]
        .map(|f| f.requests.load(Ordering::SeqCst))
        .iter()
        .sum();
    assert_eq!(calls, 3);
}

#[tokio::test]
async fn a_deployment_at_its_rpm_is_skipped_for_the_minute() {
    let a = fake(vec![Act::Ok { delay_ms: 0 }]).await;
    let b = fake(vec![Act::Ok { delay_ms: 0 }]).await;
    let c = fake(vec![Act::Ok { delay_ms: 0 }]).await;
    let (gw, models, _d) = two_deployments(&[a.addr, b.addr, c.addr], ", rpm: 2");
    let mut providers = Vec::new();
    for _ in 0..4 {
        let (o, _, plan) = run(&gw, &models, false).await;
        assert_eq!(o.upstream_attempts(), 1, "skipped, not tried");
        providers.push(row_of(&plan, &o).provider);
    }
    // Unless the minute turned between the requests: then p0 has room again.
    let p0 = providers.iter().filter(|p| *p == "p0").count();
    assert!(p0 == 2 || p0 == 3, "{providers:?}");
    assert_eq!(a.requests.load(Ordering::SeqCst), p0);
}
