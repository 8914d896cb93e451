//! The chain: the cache first, then each candidate model in order, until one answers.
//!
//! Failover is decided here because only here is it known whether anything reached the
//! client yet: an attempt that [`Ended::Failed`] sent nothing, so the next candidate
//! costs the client only time. Circuits are consulted before and updated after each
//! attempt, from its report; the retry budget bounds how many requests fail over at once.

use super::cache::Begin;
use super::client::Client;
use super::report::{Attempted, ChainOutcome, Ended};
use super::{Plan, Shared};
use crate::error::{ErrorKind, Fault, GatewayError};
use crate::providers::ClientRequest;
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
        let n = plan.chain.models.len();
        for (idx, model) in plan.chain.models.iter().enumerate() {
            let breaker = self.breakers.get(&model.provider.name);
            if let Some(b) = &breaker {
                if let Err(wait) = b.try_acquire() {
                    skipped.push(format!("{}: circuit open", model.name));
                    let e = GatewayError::new(ErrorKind::UpstreamUnavailable, "circuit open")
                        .with_retry_after(ceil_secs(wait));
                    last = Some(merge_retry_after(last, e));
                    continue;
                }
            }
            let attempt_no = out.upstream_attempts().saturating_add(1);
            let Attempted { report, tail } = self
                .attempt(client, plan, model, &mut request, attempt_no, &mut fill)
                .await;
            self.metrics
                .upstream_attempt(&model.provider.name, report.result);
            if let Some(b) = &breaker {
                match report.upstream_healthy() {
                    Some(ok) => b.record(ok),
                    None => b.release(),
                }
            }
            let ended = report.ended;
            let error = report.error.clone();
            out.attempts.push(report);
            if ended != Ended::Failed {
                out.tail = tail;
                if let Some(slot) = fill.take() {
                    slot.give_up();
                }
                return out;
            }
            let e = error.unwrap_or_else(|| {
                GatewayError::new(ErrorKind::BadUpstreamResponse, "the attempt failed")
            });
            skipped.push(format!("{}: {}", model.name, e.message));
            if e.kind.fault() != Fault::Upstream {
                // Not the provider's fault: another one would fail the same way.
                out.error = Some(e);
                break;
            }
            last = Some(merge_retry_after(last, e));
            if idx + 1 < n && !self.retry_budget.withdraw() {
                skipped.push("retry budget exhausted".to_string());
                break;
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
}

/// The longest `retry-after` of the failures seen wins: the client should not come
/// back before the last circuit can probe again.
pub(super) fn merge_retry_after(
    prev: Option<GatewayError>,
    mut next: GatewayError,
) -> GatewayError {
    if let Some(p) = prev.and_then(|p| p.retry_after) {
        next.retry_after = Some(next.retry_after.unwrap_or(0).max(p));
    }
    next
}

/// Whole seconds, rounded up: a client that waits `retry-after` must find the probe due.
pub(crate) fn ceil_secs(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}
