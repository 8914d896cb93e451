//! One upstream attempt, driven through Pingora's own HTTP connector and pools.
//!
//! The attempt connects (a pooled connection when there is one, HTTP/2 when the
//! provider negotiates it), sends the header and the body it was given, and holds the
//! answer back until its first content byte (streams) or its complete, readable body
//! (non-streams). Until then a failure (refused connection, 5xx/429, no first token in
//! time, garbage) costs the client nothing: the attempt reports [`Ended::Failed`] and the
//! chain tries the next candidate. After it, the answer is relayed as it comes, and a
//! stream that breaks ends with exactly one error event, never a silent clean end.
//!
//! The last bytes are not written here but handed back as a [`Tail`]: the request's
//! audit row is written before them (`front.rs`).

use super::client::Client;
use super::report::{AttemptReport, Attempted, Ended, Tail};
use super::{cache::FillSlot, respond, upstream, Plan, Shared};
use crate::config::{Model, Target};
use crate::error::{ErrorKind, GatewayError};
use crate::metrics::AttemptResult;
use crate::providers::assemble::Unfinished;
use crate::providers::{self, ClientRequest, Completion, ResponseTranslator, UpstreamRequest};
use crate::routing::cooldown;
use crate::routing::pool::Candidate;
use bytes::{Bytes, BytesMut};
use pingora::prelude::*;
use pingora_core::protocols::http::client::HttpSession;
use pingora_core::protocols::http::HttpTask;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_http::ResponseHeader;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::time::timeout_at;

/// The most of a provider's own error answer (a 4xx) that is read to re-render it.
const ERROR_BODY_CAP: usize = 1 << 20;

/// The answer so far, while it is held back.
struct Held {
    session: HttpSession,
    /// How long the provider asked not to be called again (its quota headers).
    cooldown: Option<Duration>,
    header: ResponseHeader,
    /// What the client gets, translated, so far.
    out: BytesMut,
    /// The provider's body ended.
    ended: bool,
    translator: Option<ResponseTranslator>,
    /// A provider's own error answer (4xx other than 429): status and body so far.
    error_body: Option<Vec<u8>>,
    /// How the answer ended, when it already did.
    completion: Option<Completion>,
}

/// Why holding the answer back ended without one to deliver.
struct Refused {
    error: GatewayError,
    result: AttemptResult,
    upstream_status: u16,
    cooldown: Option<Duration>,
}

impl Refused {
    /// A refusal before any response header arrived.
    fn early(error: GatewayError, result: AttemptResult) -> Refused {
        Refused::at(0, error, result)
    }

    /// A refusal of an answer whose header said `upstream_status`.
    fn at(upstream_status: u16, error: GatewayError, result: AttemptResult) -> Refused {
        Refused {
            error,
            result,
            upstream_status,
            cooldown: None,
        }
    }

    fn cooling(mut self, cooldown: Option<Duration>) -> Refused {
        self.cooldown = cooldown;
        self
    }

    /// The failed attempt this refusal makes.
    fn into_attempted(self, report: AttemptReport) -> Attempted {
        let mut a = Attempted::failed(report, self.error, self.result);
        a.report.upstream_status = self.upstream_status;
        a.report.cooldown = self.cooldown;
        a
    }
}

/// The deadlines of one attempt.
#[derive(Clone, Copy)]
struct Deadlines {
    /// The first content byte (streams) or the whole answer (non-streams) by then.
    first: Instant,
    total: Instant,
}

impl Shared {
    /// Tries `model` once, at deployment `cand`. `request` is the client's request, body included; it is
    /// dropped once the answer reaches the client (no attempt can follow then), so a
    /// long stream does not hold its prompt for its whole life. `attempt_no` is this
    /// attempt's number in the chain, for `x-gateway-attempts`.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn attempt<C: Client + ?Sized>(
        &self,
        client: &mut C,
        plan: &Plan,
        model: &Arc<Model>,
        cand: &Candidate,
        request: &mut Option<ClientRequest>,
        attempt_no: u8,
        fill: &mut Option<FillSlot>,
    ) -> Attempted {
        let mut report = AttemptReport::new(model.clone());
        report.deployment = Some(cand.dep.clone());
        let to = Target {
            model,
            dep: &cand.dep,
        };
        let Some(req) = request.as_ref() else {
            let e = GatewayError::new(ErrorKind::Internal, "the request was already answered");
            return Attempted::failed(report, e, AttemptResult::Cancelled);
        };
        let up = match providers::prepare(req, to) {
            Ok(u) => u,
            Err(e) => return Attempted::failed(report, e, AttemptResult::BadResponse),
        };
        let translator = ResponseTranslator::new(req, &up, to);
        let provider = &cand.dep.provider;
        let peer = match upstream::peer(&self.resolver, provider).await {
            Ok(p) => p,
            Err(e) => return Attempted::failed(report, e, AttemptResult::Connect),
        };
        let t = &provider.timeouts;
        let started = Instant::now();
        let total = started + Duration::from_millis(t.total_ms);
        // An assembled answer is a stream upstream: its first event is due as a
        // stream's first byte is, and the rest of it within the total.
        let assembled = up.assembled;
        let first = if plan.req.stream || assembled {
            (started + Duration::from_millis(t.first_token_ms)).min(total)
        } else {
            total
        };
        let deadlines = Deadlines { first, total };
        // Boxed: connecting and reading up to the first byte takes Pingora's connector
        // futures, which a stream relaying for minutes must not keep allocated.
        let hold = Box::pin(self.hold(plan, to, &peer, up, translator));
        let held = tokio::select! {
            biased;
            r = timeout_at(deadlines.first.into(), hold) => match r {
                Ok(Ok(held)) => held,
                Ok(Err(r)) => return r.into_attempted(report),
                Err(_) => {
                    let (msg, result) = if plan.req.stream || assembled {
                        ("no first token in time", AttemptResult::FirstTokenTimeout)
                    } else {
                        ("total time limit reached", AttemptResult::IdleTimeout)
                    };
                    let e = GatewayError::new(ErrorKind::UpstreamTimeout, msg);
                    return Attempted::failed(report, e, result);
                }
            },
            _ = client.gone() => return Attempted::gone(report),
        };
        // The assembled answer has begun: the rest of it is still held (the client
        // gets one body), each read bounded by `idle_ms`, the whole by `total_ms`.
        let held = if assembled && !held.ended {
            tokio::select! {
                biased;
                r = timeout_at(deadlines.total.into(), Box::pin(collect(held))) => match r {
                    Ok(Ok(held)) => held,
                    Ok(Err(r)) => return r.into_attempted(report),
                    Err(_) => {
                        let e = GatewayError::new(ErrorKind::UpstreamTimeout, "total time limit reached");
                        return Attempted::failed(report, e, AttemptResult::IdleTimeout);
                    }
                },
                _ = client.gone() => return Attempted::gone(report),
            }
        } else {
            held
        };
        // The answer goes to the client: nothing is sent upstream again.
        *request = None;
        report.cooldown = held.cooldown;
        self.deliver(
            client, plan, report, held, attempt_no, deadlines, fill, &peer,
        )
        .await
    }

    /// Connects, sends, and reads until the answer may go to the client. A pooled
    /// connection the provider had closed meanwhile is replaced once, at once.
    async fn hold(
        &self,
        plan: &Plan,
        to: Target<'_>,
        peer: &HttpPeer,
        up: UpstreamRequest,
        mut translator: ResponseTranslator,
    ) -> Result<Held, Refused> {
        let provider = &to.dep.provider;
        let header = upstream::request_header(provider, &up, &plan.forward, &plan.request_id)
            .map_err(|e| {
                Refused::early(
                    GatewayError::new(ErrorKind::Internal, format!("upstream request: {e}")),
                    AttemptResult::BadResponse,
                )
            })?;
        let mut retried = false;
        let mut session = loop {
            let (mut s, reused) = self.connector.get_http_session(peer).await.map_err(|e| {
                let (ge, result) = upstream::classify(&e, true);
                Refused::early(ge, result)
            })?;
            // A non-stream answer comes in one piece: only the total bounds its wait
            // (an assembled one is a stream upstream: each read waits `idle_ms`).
            let t = &provider.timeouts;
            let read_ms = if plan.req.stream || up.assembled {
                t.idle_ms
            } else {
                t.total_ms
            };
            s.set_read_timeout(Some(Duration::from_millis(read_ms)));
            match send(&mut s, header.clone(), up.body.clone()).await {
                Ok(()) => break s,
                Err(e) if reused && !retried && upstream::stale_pooled(&e) => {
                    retried = true;
                    s.shutdown().await;
                }
                Err(e) => {
                    s.shutdown().await;
                    let (ge, result) = upstream::classify(&e, true);
                    return Err(Refused::early(ge, result));
                }
            }
        };
        let assembled = up.assembled;
        drop(up);
        let mut resp = session.response_header().cloned().ok_or_else(|| {
            Refused::early(
                GatewayError::new(ErrorKind::BadUpstreamResponse, "no response header"),
                AttemptResult::BadResponse,
            )
        })?;
        let status = resp.status.as_u16();
        let cooldown = cooldown::cooldown(status, &resp.headers, crate::audit::time::now_ms());
        // A server that ignored `stream: true` answers one JSON body: no first token
        // to wait for, so once its header came only the total bounds it.
        let json_answer = assembled
            && status == 200
            && resp
                .headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|ct| ct.starts_with("application/json"));
        if assembled && status == 200 {
            // The client gets the assembled JSON body, not the provider's stream.
            let _ = resp.insert_header("content-type", "application/json");
        }
        if status == 429 || status >= 500 {
            session.shutdown().await;
            let e = GatewayError::new(
                ErrorKind::UpstreamUnavailable,
                format!(
                    "model '{}' is unavailable: upstream answered {status}",
                    to.model.name
                ),
            )
            .with_retry_after(upstream::retry_after_s(&resp));
            let result = if status == 429 {
                AttemptResult::Status429
            } else {
                AttemptResult::Status5xx
            };
            return Err(Refused::at(status, e, result).cooling(cooldown));
        }
        let mut held = Held {
            session,
            cooldown,
            header: resp,
            out: BytesMut::new(),
            ended: false,
            translator: None,
            error_body: None,
            completion: None,
        };
        if status != 200 {
            // The client's own mistake, answered by the provider: passed on whole, in
            // the client's format when the provider speaks another one.
            let mut body = Vec::new();
            while let Some(chunk) = read(&mut held.session, status).await? {
                if body.len() < ERROR_BODY_CAP {
                    body.extend_from_slice(&chunk);
                }
            }
            held.ended = true;
            held.error_body = Some(body);
            return Ok(held);
        }
        let stream = plan.req.stream;
        if json_answer {
            held.translator = Some(translator);
            return Ok(held);
        }
        loop {
            match read(&mut held.session, status).await? {
                Some(chunk) => translator.feed(&chunk, &mut held.out),
                None => {
                    held.ended = true;
                    break;
                }
            }
            if stream && !held.out.is_empty() {
                break;
            }
            if assembled && translator.started() {
                // First event in time; `collect` reads the rest.
                held.translator = Some(translator);
                return Ok(held);
            }
        }
        let so_far = if held.ended {
            let c = translator.finish(&mut held.out);
            if stream && !c.complete && !c.upstream_error && c.content_bytes == 0 {
                // Ended before its first token: nothing useful was said yet.
                let e = GatewayError::new(
                    ErrorKind::BadUpstreamResponse,
                    "the upstream stream ended before completion",
                );
                return Err(Refused::at(status, e, AttemptResult::Reset));
            }
            c
        } else {
            translator.snapshot()
        };
        if !stream && !so_far.complete {
            return Err(unfinished(&translator, status));
        }
        if stream && so_far.upstream_error && so_far.content_bytes == 0 {
            // The provider's own error event before its first token: the next
            // candidate may still answer. (Once tokens were generated they go to the
            // client, with the error event: they were produced and are billed.)
            let e = GatewayError::new(
                ErrorKind::UpstreamUnavailable,
                "the provider reported an error before its first token",
            )
            .with_retry_after(1);
            return Err(Refused::at(status, e, AttemptResult::BadResponse));
        }
        if held.ended {
            held.completion = Some(so_far);
        }
        held.translator = Some(translator);
        Ok(held)
    }

    /// Sends the held answer and relays the rest; returns the answer's end as a tail.
    #[allow(clippy::too_many_arguments)]
    async fn deliver<C: Client + ?Sized>(
        &self,
        client: &mut C,
        plan: &Plan,
        mut report: AttemptReport,
        held: Held,
        attempt_no: u8,
        deadlines: Deadlines,
        fill: &mut Option<FillSlot>,
        peer: &HttpPeer,
    ) -> Attempted {
        let Held {
            mut session,
            cooldown: _,
            header: up_header,
            mut out,
            ended,
            translator,
            error_body,
            completion,
        } = held;
        let status = up_header.status.as_u16();
        report.upstream_status = status;
        report.client_status = status;
        report.ended = Ended::Delivered;
        let model = report.model.clone();
        let Some(dep) = report.deployment.clone() else {
            return Attempted::unbuildable(report);
        };
        let provider = &dep.provider;
        let (mut translator, body_len) = match (translator, error_body) {
            (_, Some(body)) => {
                let b =
                    providers::translate_error_body(provider.kind, plan.req.format, status, &body);
                report.client_error_code = Some(upstream::client_error_code(status));
                report.result = AttemptResult::Status4xx;
                out = BytesMut::from(&b[..]);
                (None, Some(out.len()))
            }
            (Some(t), None) => {
                let len = (!plan.req.stream).then_some(out.len());
                (Some(t), len)
            }
            (None, None) => (None, Some(out.len())),
        };
        let header = match respond::upstream_header(
            &up_header,
            plan,
            &model.name,
            &provider.name,
            attempt_no,
            body_len,
        ) {
            Ok(h) => h,
            Err(_) => return Attempted::unbuildable(report),
        };
        // Only a 200 this attempt translated may be stored.
        if let (Some(slot), Some(_)) = (fill.as_mut(), translator.as_ref()) {
            report.cache.filled = slot.start(&up_header, &model.name, &dep).await;
        } else if let Some(slot) = fill.take() {
            slot.give_up();
        }
        // The client's header is built: a long stream need not keep the provider's.
        drop(up_header);
        if ended {
            // Whole already (every non-stream, and short streams): one write, after
            // the audit row.
            if let Some(c) = completion {
                conclude(&mut report, c, Ok(()), &mut out, plan);
            }
            self.finish_fill(fill, &report, &out).await;
            self.release(session, peer, &report).await;
            report.first_byte = (!out.is_empty()).then(Instant::now);
            return Attempted {
                report,
                tail: Some(Tail {
                    header: Some(header),
                    body: out.freeze(),
                }),
            };
        }
        // A stream with its first content: header and first bytes now.
        let first_bytes = out.split().freeze();
        if let Some(slot) = fill.as_mut() {
            slot.write(first_bytes.clone()).await;
        }
        let tasks = vec![
            HttpTask::Header(header, false),
            HttpTask::Body(Some(first_bytes), false),
        ];
        report.first_byte = Some(Instant::now());
        let Some(t) = translator.as_mut() else {
            return Attempted::gone(report);
        };
        if !client.send(tasks).await {
            report.completion = t.snapshot();
            return Attempted::gone(report);
        }
        let end: Result<(), (GatewayError, AttemptResult)> = loop {
            let read = tokio::select! {
                biased;
                r = timeout_at(deadlines.total.into(), session.read_response_body()) => r,
                _ = client.gone() => {
                    // What was produced until the client left is billed.
                    report.completion = t.snapshot();
                    return Attempted::gone(report);
                }
            };
            match read {
                Ok(Ok(Some(chunk))) => {
                    t.feed(&chunk, &mut out);
                    if out.is_empty() {
                        continue;
                    }
                    let bytes = out.split().freeze();
                    if let Some(slot) = fill.as_mut() {
                        slot.write(bytes.clone()).await;
                    }
                    if !client.send(vec![HttpTask::Body(Some(bytes), false)]).await {
                        report.completion = t.snapshot();
                        return Attempted::gone(report);
                    }
                }
                Ok(Ok(None)) => break Ok(()),
                Ok(Err(e)) => break Err(upstream::classify(&e, false)),
                Err(_) => {
                    let e =
                        GatewayError::new(ErrorKind::UpstreamTimeout, "total time limit reached");
                    break Err((e, AttemptResult::IdleTimeout));
                }
            }
        };
        let c = match &end {
            Ok(()) => t.finish(&mut out),
            Err(_) => t.snapshot(),
        };
        conclude(&mut report, c, end, &mut out, plan);
        self.finish_fill(fill, &report, &out).await;
        self.release(session, peer, &report).await;
        Attempted {
            report,
            tail: Some(Tail {
                header: None,
                body: out.freeze(),
            }),
        }
    }

    /// Returns a cleanly finished connection to the pool; closes any other.
    async fn release(&self, mut session: HttpSession, peer: &HttpPeer, report: &AttemptReport) {
        if report.error.is_none() {
            self.connector
                .release_http_session(session, peer, upstream::pool_idle())
                .await;
        } else {
            session.shutdown().await;
        }
    }

    /// The fill, if any, gets the answer's last bytes and is committed when it ended
    /// complete, before the client reads its end (so its next identical request hits).
    async fn finish_fill(&self, fill: &mut Option<FillSlot>, report: &AttemptReport, last: &[u8]) {
        if let Some(slot) = fill.take() {
            slot.finish(report.completion, Bytes::copy_from_slice(last))
                .await;
        }
    }
}

/// Records how a delivered answer ended; a stream that did not reach its own end gets
/// its one error event appended to `out` (unless the provider's own already went out).
fn conclude(
    report: &mut AttemptReport,
    c: Completion,
    end: Result<(), (GatewayError, AttemptResult)>,
    out: &mut BytesMut,
    plan: &Plan,
) {
    report.completion = c;
    if c.upstream_error {
        // The provider's own error event went to the client, translated.
        report.error = Some(GatewayError::new(
            ErrorKind::UpstreamUnavailable,
            "the provider reported an error in the middle of the stream",
        ));
        report.error_event_sent = true;
        report.result = AttemptResult::BadResponse;
    } else if plan.req.stream && !c.complete {
        let (e, result) = end.err().unwrap_or_else(|| {
            // A clean close before the stream's own end is still a failure: say so.
            (
                GatewayError::new(
                    ErrorKind::BadUpstreamResponse,
                    "the upstream stream ended before completion",
                ),
                AttemptResult::Reset,
            )
        });
        out.extend_from_slice(&e.sse_event(plan.req.format));
        report.error = Some(e);
        report.error_event_sent = true;
        report.result = result;
    }
}

/// Reads the rest of an assembled answer whose stream has begun, then requires it
/// whole, as a non-streamed body is required whole.
async fn collect(mut held: Held) -> Result<Held, Refused> {
    let status = held.header.status.as_u16();
    let Some(mut t) = held.translator.take() else {
        let e = GatewayError::new(ErrorKind::Internal, "no translator for the answer");
        return Err(Refused::at(status, e, AttemptResult::BadResponse));
    };
    while let Some(chunk) = read(&mut held.session, status).await? {
        t.feed(&chunk, &mut held.out);
    }
    held.ended = true;
    let c = t.finish(&mut held.out);
    if !c.complete {
        return Err(unfinished(&t, status));
    }
    held.completion = Some(c);
    held.translator = Some(t);
    Ok(held)
}

/// Why a non-streamed (or assembled) answer that did not complete is refused.
fn unfinished(t: &ResponseTranslator, status: u16) -> Refused {
    let (kind, msg, result) = match t.unfinished() {
        Unfinished::Unreadable => (
            ErrorKind::BadUpstreamResponse,
            "the upstream answered with an unreadable response",
            AttemptResult::BadResponse,
        ),
        Unfinished::Cut => (
            ErrorKind::BadUpstreamResponse,
            "the upstream stream ended before completion",
            AttemptResult::Reset,
        ),
        Unfinished::ProviderError => {
            let e = GatewayError::new(
                ErrorKind::UpstreamUnavailable,
                "the provider reported an error in the middle of the stream",
            )
            .with_retry_after(1);
            return Refused::at(status, e, AttemptResult::BadResponse);
        }
    };
    Refused::at(status, GatewayError::new(kind, msg), result)
}

/// Writes the request and reads the response header (skipping informational ones).
async fn send(
    s: &mut HttpSession,
    header: Box<pingora_http::RequestHeader>,
    body: Bytes,
) -> Result<()> {
    s.write_request_header(header).await?;
    s.write_request_body(body, true).await?;
    s.finish_request_body().await?;
    loop {
        s.read_response_header().await?;
        match s.response_header().map(|h| h.status.as_u16()) {
            Some(100..=199) if matches!(s, HttpSession::H1(_)) => continue,
            _ => return Ok(()),
        }
    }
}

/// One body read while the answer is held back.
async fn read(s: &mut HttpSession, status: u16) -> Result<Option<Bytes>, Refused> {
    s.read_response_body().await.map_err(|e| {
        let (error, result) = upstream::classify(&e, false);
        Refused::at(status, error, result)
    })
}
