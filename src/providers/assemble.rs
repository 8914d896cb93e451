//! Non-streaming answers assembled from the provider's stream.
//!
//! A non-streaming request is sent upstream as a stream so that the attempt can bound
//! it by `first_token_ms` and `idle_ms` (a provider that stalls is left for the next
//! candidate within seconds, not after `total_ms`). The client still asked for one
//! JSON document, so the events are folded here into the body the provider would have
//! sent non-streamed: same members, same key order, usage copied as the provider
//! counted it. Nothing is invented that the stream did not carry (a member the
//! non-streamed body has but no event mentions stays out), with the exceptions the
//! provider's own format makes mandatory (`refusal: null`, `logprobs: null`).
//!
//! [`Assembled`] wraps the body translator the non-stream path would have used: the
//! assembled body goes through it exactly as a provider's body would, so the client's
//! bytes and the [`Completion`] (usage, content bytes) are those of the non-stream
//! path. A stream that ends without its terminator, carries an error event or cannot
//! be read is never assembled: the attempt fails (and the chain moves on) as it does
//! for a cut or unreadable body today.
//!
//! `openai.rs` folds `chat.completion.chunk`s (OpenAI, Azure, OpenAI-compatible
//! servers), `anthropic.rs` Messages events; this file holds what both share.

mod anthropic;
mod openai;

pub use anthropic::AnthropicAssembler;
pub use openai::OpenAiAssembler;

use super::{Completion, ResponseTranslator, Translate, Usage};
use bytes::BytesMut;

/// Why an assembled (or any non-streamed) answer cannot be delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unfinished {
    /// Not the provider's format: no event or body could be read.
    Unreadable,
    /// Valid events, then the stream ended before its terminator.
    Cut,
    /// The provider's own error event.
    ProviderError,
}

/// How far a stream got, shared by both assemblers.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Progress {
    /// Events read, of any kind (`ping` included): the first one is when a streaming
    /// client would have had its first byte.
    events: usize,
    /// `[DONE]` / `message_stop`.
    ended: bool,
    upstream_error: bool,
    /// An event that could not be read: the whole answer is unreadable.
    broken: bool,
    content_bytes: usize,
}

impl Progress {
    /// Nothing after this point changes the answer: it ended, broke or erred, so the
    /// rest of the stream is read and ignored.
    fn settled(&self) -> bool {
        self.ended || self.broken || self.upstream_error
    }

    fn complete(&self) -> bool {
        self.ended && !self.upstream_error && !self.broken
    }

    fn completion(&self, usage: Option<Usage>) -> Completion {
        Completion {
            usage,
            complete: self.complete(),
            upstream_error: self.upstream_error,
            content_bytes: self.content_bytes,
        }
    }

    fn unfinished(&self) -> Unfinished {
        if self.upstream_error {
            Unfinished::ProviderError
        } else if self.broken || self.events == 0 {
            Unfinished::Unreadable
        } else {
            Unfinished::Cut
        }
    }
}

/// The provider's stream assembler. Its variants differ in size, but it only ever
/// lives inside the boxed [`Assembled`] of one attempt, so nothing is gained by boxing
/// the larger one.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Assembler {
    OpenAi(OpenAiAssembler),
    Anthropic(AnthropicAssembler),
}

impl Assembler {
    fn push(&mut self, chunk: &[u8]) {
        match self {
            Assembler::OpenAi(a) => a.push(chunk),
            Assembler::Anthropic(a) => a.push(chunk),
        }
    }
    fn started(&self) -> bool {
        match self {
            Assembler::OpenAi(a) => a.started(),
            Assembler::Anthropic(a) => a.started(),
        }
    }
    fn snapshot(&self) -> Completion {
        match self {
            Assembler::OpenAi(a) => a.snapshot(),
            Assembler::Anthropic(a) => a.snapshot(),
        }
    }
    fn finish(&mut self) -> Result<Vec<u8>, Unfinished> {
        match self {
            Assembler::OpenAi(a) => a.finish(),
            Assembler::Anthropic(a) => a.finish(),
        }
    }
}

/// What the upstream turned out to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Only whitespace so far.
    Undecided,
    Stream,
    /// A JSON body: a server that ignored `stream: true`. Passed to the body
    /// translator unchanged, as the non-stream path would.
    Body,
}

/// A streamed upstream answer for a client that asked for one body: the provider's
/// stream is assembled, then handed to `body`, the translator the non-stream path
/// picks for this pair of formats.
#[derive(Debug)]
pub struct Assembled {
    assembler: Assembler,
    body: ResponseTranslator,
    mode: Mode,
    /// Leading whitespace, replayed into whichever mode follows.
    lead: Vec<u8>,
    unfinished: Option<Unfinished>,
}

impl Assembled {
    pub fn new(assembler: Assembler, body: ResponseTranslator) -> Self {
        Assembled {
            assembler,
            body,
            mode: Mode::Undecided,
            lead: Vec::new(),
            unfinished: None,
        }
    }

    /// Whether the stream has begun: the point at which a streaming client would
    /// have had its first byte, which is what `first_token_ms` bounds.
    pub fn started(&self) -> bool {
        match self.mode {
            Mode::Undecided => false,
            Mode::Stream => self.assembler.started(),
            // A whole body arrives in one piece: only the total bounds it.
            Mode::Body => false,
        }
    }

    /// Why the answer cannot be delivered, once [`Translate::finish`] said incomplete.
    pub fn unfinished(&self) -> Unfinished {
        self.unfinished.unwrap_or(Unfinished::Unreadable)
    }
}

impl Translate for Assembled {
    fn feed(&mut self, chunk: &[u8], out: &mut BytesMut) {
        if self.mode == Mode::Undecided {
            match chunk.iter().find(|b| !b.is_ascii_whitespace()) {
                None => {
                    self.lead.extend_from_slice(chunk);
                    return;
                }
                Some(b'{') => self.mode = Mode::Body,
                Some(_) => self.mode = Mode::Stream,
            }
            let lead = std::mem::take(&mut self.lead);
            match self.mode {
                Mode::Body => self.body.feed(&lead, out),
                _ => self.assembler.push(&lead),
            }
        }
        match self.mode {
            Mode::Body => self.body.feed(chunk, out),
            _ => self.assembler.push(chunk),
        }
    }

    fn finish(&mut self, out: &mut BytesMut) -> Completion {
        match self.mode {
            Mode::Body => self.body.finish(out),
            Mode::Stream => match self.assembler.finish() {
                Ok(body) => {
                    self.body.feed(&body, out);
                    let c = self.body.finish(out);
                    if !c.complete {
                        self.unfinished = Some(Unfinished::Unreadable);
                    }
                    c
                }
                Err(why) => {
                    self.unfinished = Some(why);
                    self.assembler.snapshot()
                }
            },
            Mode::Undecided => {
                self.unfinished = Some(Unfinished::Unreadable);
                self.assembler.snapshot()
            }
        }
    }

    fn snapshot(&self) -> Completion {
        match self.mode {
            Mode::Body => self.body.snapshot(),
            _ => self.assembler.snapshot(),
        }
    }
}

#[cfg(test)]
#[path = "assemble_tests.rs"]
mod tests;
