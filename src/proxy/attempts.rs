//! The attempt loop: one subrequest per candidate model, until one answers.
//!
//! Failover is decided here, in the parent, because only the parent knows whether
//! anything has reached the client yet. Each attempt's response header is held back
//! until its first content byte (streams) or its complete, readable body (non-streams);
//! until then a failure — refused connection, 5xx/429, first-token timeout, garbage —
//! costs the client nothing but the next attempt.

use super::upstream::SubInput;
use super::{Ctx, Gateway, Plan};
use crate::error::{ErrorKind, GatewayError};
use bytes::Bytes;
use pingora_core::protocols::http::subrequest::server::SubrequestHandle;
use pingora_core::protocols::http::HttpTask;
use pingora_proxy::subrequest::{BodyMode, Ctx as SubrequestCtx};
use pingora_proxy::Session;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How one attempt ended.
enum AttemptEnd {
    /// The response (or its failure, after the first byte) went to the client.
    Delivered,
    /// Nothing reached the client; the next candidate may be tried.
    Failed(GatewayError),
    /// The client went away.
    ClientGone,
}

impl Gateway {
    /// Tries the chain in order; on success the response has been written.
    pub(super) async fn run_chain(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        plan: Arc<Plan>,
    ) -> Result<(), GatewayError> {
        self.retry_budget.deposit();
        let mut failures: Vec<String> = Vec::new();
        let mut last: Option<GatewayError> = None;
        for idx in 0..plan.chain.models.len() {
            let model = plan.chain.models[idx].clone();
            let breaker = self.breakers.get(&model.provider.name);
            if let Some(b) = &breaker {
                if let Err(wait) = b.try_acquire() {
                    failures.push(format!("{}: circuit open", model.name));
                    let e = GatewayError::new(ErrorKind::UpstreamUnavailable, "circuit open")
                        .with_retry_after(ceil_secs(wait));
                    last = Some(merge_retry_after(last, e));
                    continue;
                }
            }
            {
                let mut o = plan.outcome();
                o.attempts = o.attempts.saturating_add(1);
                o.model = Some(model.clone());
                o.upstream_status = 0;
                o.completion = Default::default();
                o.error = None;
                o.error_event_sent = false;
                o.client_error_code = None;
                o.cache_hit = false;
            }
            let end = self.attempt(session, ctx, &plan, idx).await;
            if let Some(b) = &breaker {
                let upstream_fault =
                    |e: &GatewayError| e.kind.fault() == crate::error::Fault::Upstream;
                match &end {
                    AttemptEnd::Failed(e) if upstream_fault(e) => b.record(false),
                    AttemptEnd::Failed(_) | AttemptEnd::ClientGone => b.release(),
                    // Served from the cache: says nothing about the provider's health.
                    AttemptEnd::Delivered if plan.outcome().cache_hit => b.release(),
                    AttemptEnd::Delivered => {
                        // A stream that broke after its first byte counts against health too.
                        let failed = plan.outcome().error.as_ref().is_some_and(upstream_fault);
                        b.record(!failed)
                    }
                }
            }
            match end {
                AttemptEnd::Delivered => return Ok(()),
                AttemptEnd::ClientGone => {
                    ctx.client_gone = true;
                    return Ok(());
                }
                AttemptEnd::Failed(e) => {
                    failures.push(format!("{}: {}", model.name, e.message));
                    if e.kind.fault() != crate::error::Fault::Upstream {
                        return Err(e);
                    }
                    last = Some(merge_retry_after(last, e));
                    if idx + 1 < plan.chain.models.len() && !self.retry_budget.withdraw() {
                        failures.push("retry budget exhausted".to_string());
                        break;
                    }
                }
            }
        }
        let mut e = last.unwrap_or_else(|| {
            GatewayError::new(ErrorKind::UpstreamUnavailable, "no model could be tried")
        });
        if e.kind == ErrorKind::UpstreamUnavailable && e.retry_after.is_none() {
            e.retry_after = Some(1);
        }
        e.message = format!(
            "every model in the chain failed ({} attempts): {}",
            plan.outcome().attempts,
            failures.join("; ")
        );
        plan.outcome().error = Some(e.clone());
        Err(e)
    }

    /// Runs candidate `idx` as a subrequest and relays what it produces.
    async fn attempt(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        plan: &Arc<Plan>,
        idx: usize,
    ) -> AttemptEnd {
        let model = &plan.chain.models[idx];
        let t = &model.provider.timeouts;
        let started = Instant::now();
        let total = started + Duration::from_millis(t.total_ms);
        let first = if plan.req.stream {
            started + Duration::from_millis(t.first_token_ms)
        } else {
            total
        };
        let Some(spawner) = session.subrequest_spawner.as_ref() else {
            return AttemptEnd::Failed(GatewayError::new(
                ErrorKind::Internal,
                "subrequests are not enabled",
            ));
        };
        let sub_ctx = SubrequestCtx::builder()
            .body_mode(BodyMode::NoBody)
            .user_ctx(Box::new(SubInput {
                plan: plan.clone(),
                idx,
            }))
            .build();
        let (prepared, handle) = spawner.create_subrequest(session.as_downstream(), sub_ctx);
        let SubrequestHandle { tx, mut rx, .. } = handle;
        let job = tokio::spawn(prepared.run());

        let mut held: Vec<HttpTask> = Vec::new();
        let mut delivered = false;
        let mut finished = false;
        let mut watch_client = true;
        let end = loop {
            let deadline = if delivered { total } else { first };
            tokio::select! {
                biased;
                task = rx.recv() => {
                    let Some(t) = task else { break None };
                    let mut tasks = vec![t];
                    while tasks.len() < 16 {
                        match rx.try_recv() {
                            Ok(t) => tasks.push(t),
                            Err(_) => break,
                        }
                    }
                    let is_end = tasks.iter().any(HttpTask::is_end);
                    if !delivered {
                        held.append(&mut tasks);
                        let release = if plan.req.stream {
                            is_end || held.iter().any(|t| matches!(t, HttpTask::Body(Some(b), _) if !b.is_empty()))
                        } else {
                            is_end
                        };
                        if !release {
                            continue;
                        }
                        if let Some(e) = unusable(&held, plan) {
                            break Some(AttemptEnd::Failed(e));
                        }
                        delivered = true;
                        plan.release_request();
                        tasks = std::mem::take(&mut held);
                    }
                    self.note_tasks(&tasks, ctx);
                    if is_end {
                        self.seal(ctx).await;
                    }
                    match session.write_response_tasks(tasks).await {
                        Ok(true) => {
                            finished = true;
                            break Some(AttemptEnd::Delivered);
                        }
                        Ok(false) => {}
                        Err(_) => break Some(AttemptEnd::ClientGone),
                    }
                }
                _ = tokio::time::sleep_until(deadline.into()) => {
                    let e = GatewayError::new(
                        ErrorKind::UpstreamTimeout,
                        if delivered { "total time limit reached" } else { "no first token in time" },
                    );
                    plan.outcome().error = Some(e.clone());
                    if delivered {
                        break None;
                    }
                    break Some(AttemptEnd::Failed(e));
                }
                gone = session.downstream_session.read_body_or_idle(true), if watch_client => {
                    match gone {
                        Err(_) => break Some(AttemptEnd::ClientGone),
                        Ok(_) => watch_client = false,
                    }
                }
            }
        };
        drop(tx);
        if !matches!(end, Some(AttemptEnd::Delivered)) || !finished {
            job.abort();
        }
        let _ = job.await;
        match end {
            Some(e @ (AttemptEnd::Failed(_) | AttemptEnd::ClientGone)) => e,
            Some(AttemptEnd::Delivered) => AttemptEnd::Delivered,
            None if delivered => {
                // The subrequest stopped after the client got bytes: end the response,
                // with an error event unless the stream already carries its end.
                self.close_delivered(session, ctx, plan).await
            }
            None => {
                let o = plan.outcome();
                AttemptEnd::Failed(o.error.clone().unwrap_or_else(|| {
                    GatewayError::new(
                        ErrorKind::BadUpstreamResponse,
                        "the upstream attempt ended without a response",
                    )
                }))
            }
        }
    }

    async fn close_delivered(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        plan: &Plan,
    ) -> AttemptEnd {
        let event = {
            let mut o = plan.outcome();
            let c = o.completion;
            if plan.req.stream && !c.complete && !c.upstream_error && !o.error_event_sent {
                let e = o.error.clone().unwrap_or_else(|| {
                    GatewayError::new(
                        ErrorKind::BadUpstreamResponse,
                        "the upstream stream ended before completion",
                    )
                });
                o.error_event_sent = true;
                o.error = Some(e.clone());
                Some(e.sse_event(plan.req.format))
            } else {
                None
            }
        };
        let tasks = vec![HttpTask::Body(event.or(Some(Bytes::new())), true)];
        self.seal(ctx).await;
        if session.write_response_tasks(tasks).await.is_err() {
            ctx.client_gone = true;
            return AttemptEnd::ClientGone;
        }
        AttemptEnd::Delivered
    }

    /// Remembers the status and the time of the first content byte.
    fn note_tasks(&self, tasks: &[HttpTask], ctx: &mut Ctx) {
        for t in tasks {
            match t {
                HttpTask::Header(h, _) => ctx.status = h.status.as_u16(),
                HttpTask::Body(Some(b), _) if !b.is_empty() && ctx.first_byte.is_none() => {
                    ctx.first_byte = Some(Instant::now());
                }
                _ => {}
            }
        }
    }
}

/// The longest `retry-after` of the failures seen wins: the client should not come
/// back before the last circuit can probe again.
fn merge_retry_after(prev: Option<GatewayError>, mut next: GatewayError) -> GatewayError {
    if let Some(p) = prev.and_then(|p| p.retry_after) {
        next.retry_after = Some(next.retry_after.unwrap_or(0).max(p));
    }
    next
}

/// Why a held, complete-enough response must not reach the client, if it must not.
fn unusable(held: &[HttpTask], plan: &Plan) -> Option<GatewayError> {
    let status = held.iter().find_map(|t| match t {
        HttpTask::Header(h, _) => Some(h.status.as_u16()),
        _ => None,
    });
    let o = plan.outcome();
    match status {
        None => Some(o.error.clone().unwrap_or_else(|| {
            GatewayError::new(ErrorKind::BadUpstreamResponse, "no response header")
        })),
        Some(200) if !plan.req.stream && !o.completion.complete => Some(GatewayError::new(
            ErrorKind::BadUpstreamResponse,
            "the upstream answered with an unreadable response",
        )),
        Some(200)
            if plan.req.stream
                && (o.error_event_sent || o.completion.upstream_error)
                && o.completion.content_bytes == 0 =>
        {
            // The stream failed before its first token: nothing useful was said yet.
            // (Once tokens were generated they go to the client, with the error event:
            // they were produced and are billed.)
            Some(o.error.clone().unwrap_or_else(|| {
                GatewayError::new(ErrorKind::BadUpstreamResponse, "the upstream stream failed")
            }))
        }
        _ => None,
    }
}

/// Whole seconds, rounded up: a client that waits `retry-after` must find the probe due.
pub(crate) fn ceil_secs(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}
