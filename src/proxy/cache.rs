//! The response cache on the request path: `pingora-cache`'s storage and lock, used
//! directly.
//!
//! The front computed the request's [`Lookup`](crate::cache::Lookup) (or decided to
//! bypass). Before any attempt the chain looks the key up: a fresh answer is replayed
//! (also one still being written by a concurrent identical request, followed as it
//! streams). On a miss it takes the key's cache lock: the holder fills, and every
//! identical request arriving meanwhile waits on the lock, then reads that fill; so N
//! concurrent identical misses make one upstream call. The lock is released as soon as
//! the fill has its header, and the fill is committed only if the answer ended
//! complete. What is stored is the answer as the client received it (translated if the
//! provider spoke another format); the [`Answer`] beside it names the model, provider
//! and usage of the original call. When every provider of the chain failed, the front
//! serves a stored answer past its TTL instead of the error ([`Shared::serve_stale`]).

use super::client::Client;
use super::report::{AttemptReport, Attempted, Ended, Tail};
use super::{respond, Plan, Shared};
use crate::cache::{Answer, Store, Stored};
use crate::config::Deployment;
use crate::error::{ErrorKind, GatewayError};
use crate::metrics::AttemptResult;
use crate::providers::Completion;
use bytes::{Bytes, BytesMut};
use pingora_cache::lock::{CacheKeyLockImpl, LockStatus, Locked, WritePermit};
use pingora_cache::storage::{HitHandler, MissHandler};
use pingora_cache::trace::Span;
use pingora_cache::{CacheKey, CacheMeta, Storage};
use pingora_core::protocols::http::HttpTask;
use pingora_http::ResponseHeader;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

/// How often a request waiting on another's fill competes for the lock again when
/// that fill failed, before it asks the providers without the cache.
const LOCK_ROUNDS: usize = 3;

/// What the cache says before any attempt.
pub(super) enum Begin {
    /// Served (or, when it [`Ended::Failed`] before its first byte, not).
    Hit(Attempted),
    /// A miss, and this request fills the entry.
    Fill(FillSlot),
    /// Not cached, or the fill it waited for declined to store.
    Bypass,
    /// The client left while waiting for another request's fill.
    ClientGone(Box<AttemptReport>),
}

/// This request's right to fill the key, and the fill once it has started.
pub(super) struct FillSlot {
    store: &'static Store,
    lock: &'static CacheKeyLockImpl,
    key: CacheKey,
    ttl: std::time::Duration,
    permit: Option<WritePermit>,
    writer: Option<(MissHandler, Arc<Answer>)>,
}

impl FillSlot {
    /// Starts the fill with the answer's header: from here concurrent identical
    /// requests read it as it is written, so the lock is released. `false` when the
    /// storage refused.
    pub async fn start(
        &mut self,
        upstream: &ResponseHeader,
        model: &str,
        dep: &Deployment,
    ) -> bool {
        let Ok(mut header) = ResponseHeader::build(200, Some(2)) else {
            return false;
        };
        if let Some(ct) = upstream.headers.get("content-type") {
            let _ = header.insert_header("content-type", ct.clone());
        }
        let answer = Arc::new(Answer::new(model, &dep.provider.name, &dep.upstream_model));
        let now = SystemTime::now();
        let mut meta = CacheMeta::new(now + self.ttl, now, 0, 0, header);
        meta.extensions_mut().insert(answer.clone());
        let span = Span::inactive().handle();
        let started = match self.store.get_miss_handler(&self.key, &meta, &span).await {
            Ok(w) => {
                self.writer = Some((w, answer));
                true
            }
            Err(_) => false,
        };
        self.unlock(if started {
            LockStatus::Done
        } else {
            LockStatus::GiveUp
        });
        started
    }

    pub async fn write(&mut self, bytes: Bytes) {
        if let Some((w, _)) = self.writer.as_mut() {
            if w.write_body(bytes, false).await.is_err() {
                self.writer = None;
            }
        }
    }

    /// The answer ended as `completion`; `last` are its final bytes. The entry is
    /// committed only when the answer was complete.
    pub async fn finish(mut self, completion: Completion, last: Bytes) {
        if let Some((mut w, answer)) = self.writer.take() {
            // Before the last bytes are stored: the storage decides on it.
            answer.set_completion(completion);
            if w.write_body(last, true).await.is_ok() {
                let _ = w.finish().await;
            }
        }
        self.unlock(LockStatus::GiveUp);
    }

    /// The answer is not one to store (a provider's error answer).
    pub fn give_up(mut self) {
        self.unlock(LockStatus::GiveUp);
    }

    /// Every candidate failed: waiting requests compete for the lock again.
    pub fn failed(mut self) {
        self.unlock(LockStatus::TransientError);
    }

    fn unlock(&mut self, status: LockStatus) {
        if let Some(permit) = self.permit.take() {
            self.lock.release(&self.key, permit, status);
        }
    }
}

impl Drop for FillSlot {
    fn drop(&mut self) {
        // The client left mid-fill: readers of the fill get an error, not a clean end
        // (the writer's own drop says so), and waiting requests try again.
        self.unlock(LockStatus::TransientError);
    }
}

impl Shared {
    /// Looks the request up; on a miss, takes or waits for the key's lock.
    pub(super) async fn cache_begin<C: Client + ?Sized>(
        &self,
        client: &mut C,
        plan: &Plan,
    ) -> Begin {
        let Some(lookup) = &plan.cache else {
            return Begin::Bypass;
        };
        let key = CacheKey::new(lookup.digest.to_vec(), lookup.tenant.as_str());
        let span = Span::inactive().handle();
        // A refresh skips the first read; what it then waits for is itself fresh.
        let mut read = !lookup.refresh;
        for _ in 0..LOCK_ROUNDS {
            if read {
                if let Ok(Some((meta, hit))) = self.cache.store.lookup(&key, &span).await {
                    if meta.is_fresh(SystemTime::now()) {
                        return Begin::Hit(self.serve_hit(client, plan, &meta, hit).await);
                    }
                }
            }
            match self.cache.lock.lock(&key, false) {
                Locked::Write(permit) => {
                    return Begin::Fill(FillSlot {
                        store: self.cache.store,
                        lock: self.cache.lock,
                        key,
                        ttl: lookup.ttl,
                        permit: Some(permit),
                        writer: None,
                    })
                }
                Locked::Read(wait) => {
                    tokio::select! {
                        _ = wait.wait() => {}
                        _ = client.gone() => {
                            let report = AttemptReport::new(plan.chain.first().clone());
                            return Begin::ClientGone(Box::new(report.client_gone()));
                        }
                    }
                    if wait.lock_status() == LockStatus::GiveUp {
                        return Begin::Bypass;
                    }
                    read = true;
                }
            }
        }
        Begin::Bypass
    }

    /// Replays a stored answer, or one being written, followed as it streams.
    async fn serve_hit<C: Client + ?Sized>(
        &self,
        client: &mut C,
        plan: &Plan,
        meta: &CacheMeta,
        mut hit: HitHandler,
    ) -> Attempted {
        let answer = meta.extensions().get::<Arc<Answer>>().cloned();
        let model = answer
            .as_ref()
            .and_then(|a| plan.chain.models.iter().find(|m| m.name == a.model))
            .unwrap_or_else(|| plan.chain.first())
            .clone();
        let mut report = AttemptReport::new(model);
        report.cache.hit = true;
        report.upstream_status = 200;
        let Some(answer) = answer else {
            let e = GatewayError::new(ErrorKind::Internal, "a cache entry without its origin");
            return Attempted::failed(report, e, AttemptResult::BadResponse);
        };
        report.cached_upstream_model = answer.upstream_model.clone();
        let content_type = meta.response_header().headers.get("content-type").cloned();
        if !plan.req.stream {
            // A non-stream answer goes out whole, so a fill that breaks costs nothing.
            let mut body = BytesMut::new();
            loop {
                match next_piece(client, &mut hit).await {
                    Ok(Some(b)) => body.extend_from_slice(&b),
                    Ok(None) => break,
                    Err(None) => return Attempted::gone(report),
                    Err(Some(e)) => {
                        return Attempted::failed(report, e, AttemptResult::BadResponse)
                    }
                }
            }
            let Ok(header) =
                respond::stored_header(plan, &answer, content_type, Some(body.len()), 0, false)
            else {
                return Attempted::unbuildable(report);
            };
            report.ended = Ended::Delivered;
            report.client_status = 200;
            report.completion = answer.completion().unwrap_or_default();
            report.first_byte = Some(Instant::now());
            let tail = Tail {
                header: Some(header),
                body: body.freeze(),
            };
            return Attempted {
                report,
                tail: Some(tail),
            };
        }
        let first = match next_piece(client, &mut hit).await {
            Ok(b) => b.unwrap_or_default(),
            Err(None) => return Attempted::gone(report),
            Err(Some(e)) => return Attempted::failed(report, e, AttemptResult::BadResponse),
        };
        let Ok(header) = respond::stored_header(plan, &answer, content_type, None, 0, false) else {
            return Attempted::unbuildable(report);
        };
        report.ended = Ended::Delivered;
        report.client_status = 200;
        report.first_byte = Some(Instant::now());
        let first = vec![
            HttpTask::Header(header, false),
            HttpTask::Body(Some(first), false),
        ];
        if !client.send(first).await {
            return Attempted::gone(report);
        }
        let mut tail = Bytes::new();
        loop {
            match next_piece(client, &mut hit).await {
                Ok(Some(b)) => {
                    if !client.send(vec![HttpTask::Body(Some(b), false)]).await {
                        return Attempted::gone(report);
                    }
                }
                Ok(None) => break,
                Err(None) => return Attempted::gone(report),
                Err(Some(e)) => {
                    tail = e.sse_event(plan.req.format);
                    report.error = Some(e);
                    report.error_event_sent = true;
                    break;
                }
            }
        }
        if let Some(c) = answer.completion() {
            report.completion = c;
            // A fill that failed carried its own error event to this reader already.
            if !c.complete || c.upstream_error {
                report.error_event_sent = true;
            }
        }
        Attempted {
            report,
            tail: Some(Tail {
                header: None,
                body: tail,
            }),
        }
    }

    /// Answers from a stored answer because no provider could: one past its TTL is
    /// marked `x-gateway-cache-stale: true` and gets a `Warning: 110` header.
    pub(super) fn serve_stale(&self, plan: &Plan, stored: Stored, attempts: u8) -> Attempted {
        let answer = &stored.answer;
        let model = plan
            .chain
            .models
            .iter()
            .find(|m| m.name == answer.model)
            .unwrap_or_else(|| plan.chain.first())
            .clone();
        let mut report = AttemptReport::new(model);
        report.cache.hit = true;
        report.cache.stale = stored.expired;
        report.cached_upstream_model = answer.upstream_model.clone();
        report.upstream_status = 200;
        let header = respond::stored_header(
            plan,
            answer,
            stored.content_type.clone(),
            Some(stored.body.len()),
            attempts,
            stored.expired,
        );
        let Ok(header) = header else {
            return Attempted::unbuildable(report);
        };
        report.ended = Ended::Delivered;
        report.client_status = 200;
        report.completion = answer.completion().unwrap_or_default();
        report.first_byte = Some(Instant::now());
        Attempted {
            report,
            tail: Some(Tail {
                header: Some(header),
                body: stored.body,
            }),
        }
    }
}

/// The next piece of a hit's body; `Err(None)` when the client left meanwhile,
/// `Err(Some(..))` when the fill being followed broke off.
async fn next_piece<C: Client + ?Sized>(
    client: &mut C,
    hit: &mut HitHandler,
) -> Result<Option<Bytes>, Option<GatewayError>> {
    tokio::select! {
        r = hit.read_body() => r.map_err(|_| Some(GatewayError::new(
            ErrorKind::BadUpstreamResponse,
            "the answer this request was reading from the cache broke off",
        ))),
        _ = client.gone() => Err(None),
    }
}
