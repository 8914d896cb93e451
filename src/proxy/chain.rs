//! The chain: the cache first, then each candidate model in order and, within a model,
//! each usable deployment in its balance order, until one answers.
//!
//! Failover is decided here because only here is it known whether anything reached the
//! client yet: an attempt that [`Ended::Failed`] sent nothing, so the next candidate
//! costs the client only time. A deployment is skipped, not tried, while it cools down
//! (a provider's `retry-after` or used-up quota headers), while its provider's circuit
//! is open, and while it is at its `rpm`/`tpm` this minute. Circuits are consulted
//! before and updated after each attempt, from its report; the retry budget bounds how
//! many requests fail over at once.

use super::cache::Begin;
use super::client::Client;
use super::report::{AttemptReport, Attempted, ChainOutcome, Ended};
use super::{Plan, Shared};
use crate::error::{ErrorKind, Fault, GatewayError};
use crate::limits::Take;
use crate::providers::ClientRequest;
use crate::routing::pool::Candidate;
use std::time::Duration;

impl Shared {
    /// Runs `plan`'s chain for `request`; what was delivered is in the outcome, with
    /// the answer's last bytes still to be written.
    pub(super) async fn run_chain<C: Client + ?Sized>(
        &self,
        client: &mut C,
        plan: &Plan,
        request: ClientRequest,
    ) -> ChainOutcome {
        let mut out = ChainOutcome::default();
        let mut fill = None;
        // Boxed, like the attempt's connect phase: a miss is done with it at once.
        match Box::pin(self.cache_begin(client, plan)).await {
            Begin::Hit(served) => {
                let ended = served.report.ended;
                out.attempts.push(served.report);
                out.tail = served.tail;
                if ended != Ended::Failed {
                    return out;
                }
                // An abandoned fill before its first byte: ask the providers.
                out.attempts.clear();
            }
            Begin::Fill(slot) => fill = Some(slot),
            Begin::Bypass => {}
            Begin::ClientGone(report) => {
                out.attempts.push(*report);
                return out;
            }
        }
        self.retry_budget.deposit();
        let mut request = Some(request);
        let mut skipped: Vec<String> = Vec::new();
        let mut last: Option<GatewayError> = None;
        let prompt_tokens = u64::from(crate::accounting::estimate_tokens(plan.prompt_bytes));
        'models: for model in &plan.chain.models {
            for cand in self.pool.order(model, plan.chain.region.as_deref()) {
                let dep = &cand.dep;
                let now_ms = crate::audit::time::now_ms();
                if let Some(until) = cand.live.cooling_until(now_ms) {
                    skipped.push(format!("{}: cooling down", dep.key));
                    last = Some(soonest(last, unavailable("cooling down", until - now_ms)));
                    continue;
                }
                let breaker = self.breakers.get(&dep.provider.name);
                if let Some(b) = &breaker {
                    if let Err(wait) = b.try_acquire() {
                        skipped.push(format!("{}: circuit open", dep.key));
                        let ms = wait.as_millis() as u64;
                        last = Some(soonest(last, unavailable("circuit open", ms)));
                        continue;
                    }
                }
                // Every attempt after the first is a retry, paid from the budget.
                if out.upstream_attempts() > 0 && !self.retry_budget.withdraw() {
                    if let Some(b) = &breaker {
                        b.release();
                    }
                    skipped.push("retry budget exhausted".to_string());
                    break 'models;
                }
                let minute = match self.limits.take_quota(dep, prompt_tokens).await {
                    Take::Taken { minute } => minute,
                    Take::Full { retry_after_ms } => {
                        if let Some(b) = &breaker {
                            b.release();
                        }
                        skipped.push(format!("{}: at its quota", dep.key));
                        last = Some(soonest(last, unavailable("quota", retry_after_ms)));
                        continue;
                    }
                    Take::CoolingDown { until_ms } => {
                        if let Some(b) = &breaker {
                            b.release();
                        }
                        cand.live.cool_until(until_ms);
                        skipped.push(format!("{}: cooling down", dep.key));
                        let wait = until_ms.saturating_sub(now_ms);
                        last = Some(soonest(last, unavailable("cooling down", wait)));
                        continue;
                    }
                };
                let attempt_no = out.upstream_attempts().saturating_add(1);
                let started = std::time::Instant::now();
                let busy = cand.live.enter();
                let Attempted { report, tail } = self
                    .attempt(
                        client,
                        plan,
                        model,
                        &cand,
                        &mut request,
                        attempt_no,
                        &mut fill,
                    )
                    .await;
                drop(busy);
                self.learn(&cand, &report, started, minute, prompt_tokens);
                self.metrics
                    .upstream_attempt(&dep.provider.name, report.result);
                if let Some(b) = &breaker {
                    match report.upstream_healthy() {
                        Some(ok) => b.record(ok),
                        None => b.release(),
                    }
                }
                let ended = report.ended;
                let error = report.error.clone();
                let cooldown = report.cooldown;
                out.attempts.push(report);
                if ended != Ended::Failed {
                    out.tail = tail;
                    if let Some(slot) = fill.take() {
                        slot.give_up();
                    }
                    return out;
                }
                let mut e = error.unwrap_or_else(|| {
                    GatewayError::new(ErrorKind::BadUpstreamResponse, "the attempt failed")
                });
                skipped.push(format!("{}: {}", dep.key, e.message));
                if e.kind.fault() != Fault::Upstream {
                    // Not the provider's fault: another one would fail the same way.
                    out.error = Some(e);
                    break 'models;
                }
                if let Some(d) = cooldown {
                    e.retry_after = Some(ceil_secs(d));
                }
                last = Some(soonest(last, e));
            }
        }
        if let Some(slot) = fill.take() {
            slot.failed();
        }
        if out.error.is_none() {
            let mut e = last.unwrap_or_else(|| {
                GatewayError::new(ErrorKind::UpstreamUnavailable, "no model could be tried")
            });
            if e.kind == ErrorKind::UpstreamUnavailable && e.retry_after.is_none() {
                e.retry_after = Some(1);
            }
            e.message = format!(
                "every model in the chain failed ({} attempts): {}",
                out.upstream_attempts(),
                skipped.join("; ")
            );
            out.error = Some(e);
        }
        out
    }

    /// What one attempt teaches about its deployment: a cooldown the provider asked
    /// for (here and, on Redis, on every node), its time to first byte, and its real
    /// tokens for the quota.
    fn learn(
        &self,
        cand: &Candidate,
        report: &AttemptReport,
        started: std::time::Instant,
        minute: u64,
        prompt_tokens: u64,
    ) {
        if let Some(d) = report.cooldown {
            let until = crate::audit::time::now_ms() + d.as_millis() as u64;
            cand.live.cool_until(until);
            self.limits.share_cooldown(&cand.dep.key, until);
        }
        if let Some(first) = report.first_byte {
            cand.live
                .record_ttft(first.saturating_duration_since(started));
        }
        if let Some(u) = report.completion.usage {
            let used = u.input.saturating_add(u.output);
            let delta = used as i64 - prompt_tokens as i64;
            self.limits.adjust_quota(&cand.dep, minute, delta);
        }
    }
}

/// A deployment that could not be tried now, usable again in `wait_ms`.
fn unavailable(why: &'static str, wait_ms: u64) -> GatewayError {
    GatewayError::new(ErrorKind::UpstreamUnavailable, why)
        .with_retry_after(ceil_secs(Duration::from_millis(wait_ms)))
}

/// The soonest `retry-after` of the failures seen wins: the client may come back as
/// soon as any deployment of its chain is usable again.
pub(super) fn soonest(prev: Option<GatewayError>, mut next: GatewayError) -> GatewayError {
    if let Some(p) = prev.and_then(|p| p.retry_after) {
        next.retry_after = Some(next.retry_after.map_or(p, |n| n.min(p)));
    }
    next
}

/// Whole seconds, rounded up: a client that waits `retry-after` must find the probe due.
pub(crate) fn ceil_secs(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}
