//! What an attempt and a chain produce: plain values, owned by whoever ran them.
//!
//! An attempt never writes into shared state; it returns an [`AttemptReport`], and the
//! chain collects them into a [`ChainOutcome`]. The client's answer, the breaker
//! updates, the settle of the request's ticket and its audit row are all derived from
//! that one value (`chain.rs`, `front.rs`), so nothing is reset between attempts and no
//! rule ("one error event per stream") is kept in more than one place.

use crate::config::{Deployment, Model};
use crate::error::{ErrorKind, Fault, GatewayError};
use crate::metrics::AttemptResult;
use crate::providers::Completion;
use bytes::Bytes;
use pingora_http::ResponseHeader;
use std::sync::Arc;
use std::time::Instant;

/// How an attempt ended for the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The answer went to the client (whole, or up to where it broke after its first
    /// byte; then with an error event).
    Delivered,
    /// Nothing reached the client; the next candidate may be tried.
    Failed,
    /// The client went away.
    ClientGone,
}

/// Cache facts of one attempt.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheFacts {
    /// Served from the cache: nothing went upstream; the usage is the original call's.
    pub hit: bool,
    /// The answer was past its TTL, served because no provider could answer.
    pub stale: bool,
    /// This attempt's answer was written to the cache as it streamed.
    pub filled: bool,
}

/// One attempt at one model (or one answer from the cache).
#[derive(Debug, Clone)]
pub struct AttemptReport {
    pub model: Arc<Model>,
    /// Where it went; `None` for answers from the cache.
    pub deployment: Option<Arc<Deployment>>,
    /// For an answer from the cache, the original call's upstream model (an attempt's
    /// is its deployment's: see [`AttemptReport::upstream_model`]).
    pub cached_upstream_model: String,
    /// How long the provider asked not to be called again (retry-after, used-up quota).
    pub cooldown: Option<std::time::Duration>,
    pub ended: Ended,
    /// The metric's word for how it ended (also for hits, which are not counted).
    pub result: AttemptResult,
    /// The provider's status, 0 when none arrived.
    pub upstream_status: u16,
    /// The status the client got, 0 when nothing was sent.
    pub client_status: u16,
    pub completion: Completion,
    /// Why it failed, also after the first byte (then an error event says so).
    pub error: Option<GatewayError>,
    /// An error event went into the client's stream.
    pub error_event_sent: bool,
    /// The contract's `code` of a provider's own error answer, passed on to the client.
    pub client_error_code: Option<&'static str>,
    pub cache: CacheFacts,
    /// When the first content byte went to the client.
    pub first_byte: Option<Instant>,
}

impl AttemptReport {
    pub fn new(model: Arc<Model>) -> Self {
        AttemptReport {
            model,
            deployment: None,
            cached_upstream_model: String::new(),
            cooldown: None,
            ended: Ended::Failed,
            result: AttemptResult::Ok,
            upstream_status: 0,
            client_status: 0,
            completion: Completion::default(),
            error: None,
            error_event_sent: false,
            client_error_code: None,
            cache: CacheFacts::default(),
            first_byte: None,
        }
    }

    /// The provider's name for the model that answered or was tried.
    pub fn upstream_model(&self) -> &str {
        self.deployment
            .as_ref()
            .map_or(&self.cached_upstream_model, |d| &d.upstream_model)
    }

    /// A failure before anything reached the client.
    pub fn failed(mut self, error: GatewayError, result: AttemptResult) -> Self {
        self.ended = Ended::Failed;
        self.error = Some(error);
        self.result = result;
        self
    }

    /// The client went away during this attempt.
    pub fn client_gone(mut self) -> Self {
        self.ended = Ended::ClientGone;
        self.result = AttemptResult::Cancelled;
        self
    }

    /// The provider's health as this attempt saw it: `None` when it says nothing
    /// (served from the cache, the client left, our own or the client's fault).
    pub fn upstream_healthy(&self) -> Option<bool> {
        if self.cache.hit {
            return None;
        }
        let upstream_fault = self
            .error
            .as_ref()
            .is_some_and(|e| e.kind.fault() == Fault::Upstream);
        match self.ended {
            Ended::Failed if upstream_fault => Some(false),
            Ended::Failed | Ended::ClientGone => None,
            // A stream that broke after its first byte counts against health too.
            Ended::Delivered => Some(!upstream_fault),
        }
    }
}

/// What an attempt hands back: its report and, when it delivered, the answer's end.
pub(super) struct Attempted {
    pub report: AttemptReport,
    pub tail: Option<Tail>,
}

impl Attempted {
    pub fn failed(report: AttemptReport, error: GatewayError, result: AttemptResult) -> Self {
        Attempted {
            report: report.failed(error, result),
            tail: None,
        }
    }

    /// The client went away.
    pub fn gone(report: AttemptReport) -> Self {
        Attempted {
            report: report.client_gone(),
            tail: None,
        }
    }

    /// The client's response header could not be built (a header value Pingora refused).
    pub fn unbuildable(report: AttemptReport) -> Self {
        let e = GatewayError::new(ErrorKind::Internal, "cannot build the response");
        Self::failed(report, e, AttemptResult::BadResponse)
    }
}

/// The last bytes of a delivered answer, written only after the audit row is sealed,
/// so that a client holding its whole answer always has its row.
#[derive(Debug, Default)]
pub struct Tail {
    /// The header, when nothing was sent yet (a non-streaming answer goes out whole).
    pub header: Option<Box<ResponseHeader>>,
    pub body: Bytes,
}

/// Every attempt of one request's chain, in order.
#[derive(Debug, Default)]
pub struct ChainOutcome {
    pub attempts: Vec<AttemptReport>,
    /// Why no attempt delivered an answer (every model failed, or none could be
    /// tried), with the merged `retry-after`.
    pub error: Option<GatewayError>,
    /// The answer's last bytes, still to be written.
    pub tail: Option<Tail>,
}

impl ChainOutcome {
    /// Upstream attempts made (answers from the cache are not attempts).
    pub fn upstream_attempts(&self) -> u8 {
        let n = self.attempts.iter().filter(|a| !a.cache.hit).count();
        n.min(u8::MAX as usize) as u8
    }

    /// The attempt that answered the client, else the last one tried.
    pub fn last(&self) -> Option<&AttemptReport> {
        self.attempts.last()
    }

    pub fn delivered(&self) -> Option<&AttemptReport> {
        self.attempts.iter().find(|a| a.ended == Ended::Delivered)
    }

    pub fn client_gone(&self) -> bool {
        self.attempts.iter().any(|a| a.ended == Ended::ClientGone)
    }

    /// Every provider failed (not the client, not the request): a stored answer, even
    /// past its TTL, beats the error.
    pub fn rescuable(&self) -> bool {
        self.delivered().is_none()
            && !self.client_gone()
            && self
                .error
                .as_ref()
                .is_some_and(|e| e.kind.fault() == Fault::Upstream)
    }

    pub fn cache_hit(&self) -> bool {
        self.last().is_some_and(|a| a.cache.hit)
    }
}
