//! Provider adapters: pure request and response translation, no I/O.
//!
//! The proxy asks an adapter for the bytes to send upstream for one attempt and feeds
//! it the upstream's response bytes as they arrive; the adapter answers with the bytes
//! for the client and the usage it saw. Keeping this free of I/O is what lets it be
//! tested on recorded wire fixtures cut at every byte boundary.

pub mod openai;
pub mod sse;

use crate::config::{Model, ProviderKind};
use crate::error::{ApiFormat, ErrorKind, GatewayError};
use bytes::{Bytes, BytesMut};
use serde_json::{Map, Value};

/// Token usage of one call, as the provider reported it or as estimated.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens, cached ones included.
    pub input: u32,
    pub output: u32,
    /// Part of `input` the provider billed at the cached price.
    pub cached_input: u32,
}

/// The client's request, parsed once in the parent request and shared by every attempt.
#[derive(Debug, Clone)]
pub struct ClientRequest {
    pub format: ApiFormat,
    pub body: Map<String, Value>,
    pub model: Option<String>,
    pub stream: bool,
    /// The client asked for the usage chunk itself (`stream_options.include_usage`).
    pub include_usage: bool,
    pub max_tokens: Option<u64>,
}

impl ClientRequest {
    /// Validates the fields every endpoint needs; the error names the bad field.
    pub fn parse(format: ApiFormat, raw: &[u8]) -> Result<Self, GatewayError> {
        let value: Value = serde_json::from_slice(raw).map_err(|e| {
            GatewayError::new(
                ErrorKind::InvalidRequest,
                format!("request body is not valid JSON: {e}"),
            )
        })?;
        let Value::Object(body) = value else {
            return Err(invalid("request body must be a JSON object"));
        };
        let model = match body.get("model") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(invalid("'model' must be a string")),
        };
        match body.get("messages") {
            Some(Value::Array(m)) if !m.is_empty() => {
                for (i, msg) in m.iter().enumerate() {
                    if !msg.get("role").is_some_and(Value::is_string) {
                        return Err(invalid(format!("'messages[{i}].role' must be a string")));
                    }
                }
            }
            Some(Value::Array(_)) => return Err(invalid("'messages' must not be empty")),
            Some(_) => return Err(invalid("'messages' must be an array")),
            None => return Err(invalid("'messages' is required")),
        }
        let stream = match body.get("stream") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(invalid("'stream' must be a boolean")),
        };
        let include_usage = body
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let max_tokens = match body
            .get("max_completion_tokens")
            .or_else(|| body.get("max_tokens"))
        {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_u64()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| invalid("'max_tokens' must be a positive integer"))?,
            ),
        };
        Ok(ClientRequest {
            format,
            body,
            model,
            stream,
            include_usage,
            max_tokens,
        })
    }
}

fn invalid(msg: impl Into<String>) -> GatewayError {
    GatewayError::new(ErrorKind::InvalidRequest, msg)
}

/// What to send upstream for one attempt.
#[derive(Debug, Clone)]
pub struct UpstreamRequest {
    /// Path below the provider's base URL prefix, e.g. `/v1/chat/completions`.
    pub path: &'static str,
    pub body: Bytes,
    /// Provider-specific headers (credentials, API version), set after the client's
    /// own credentials were removed.
    pub headers: Vec<(&'static str, String)>,
    /// The gateway added `stream_options.include_usage`; the usage chunk it brings
    /// must not reach the client.
    pub strip_usage: bool,
}

/// Builds the upstream request for `model` from the client's request.
pub fn prepare(req: &ClientRequest, model: &Model) -> Result<UpstreamRequest, GatewayError> {
    match (req.format, model.provider.kind) {
        (ApiFormat::OpenAi, ProviderKind::OpenAi | ProviderKind::OpenAiCompatible) => {
            openai::prepare_chat(req, model)
        }
        (format, kind) => Err(GatewayError::new(
            ErrorKind::InvalidRequest,
            format!(
                "model '{}' is served by a {} provider, which this endpoint ({:?}) cannot use yet",
                model.name,
                kind.as_str(),
                format
            ),
        )),
    }
}

/// Translates one upstream response for the client, counting usage on the way.
#[derive(Debug)]
pub enum ResponseTranslator {
    OpenAiStream(openai::ChatStream),
    OpenAiBody(openai::ChatBody),
}

/// How a response ended, for accounting and the audit row.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub usage: Option<Usage>,
    /// The stream reached its proper end (`[DONE]`, `message_stop`) or the body parsed.
    pub complete: bool,
    /// The provider sent an error in the middle of a stream.
    pub upstream_error: bool,
    /// Bytes of generated content seen, for estimating usage when none was reported.
    pub content_bytes: usize,
}

impl ResponseTranslator {
    pub fn new(req: &ClientRequest, up: &UpstreamRequest, model: &Model) -> Self {
        let _ = model;
        if req.stream {
            ResponseTranslator::OpenAiStream(openai::ChatStream::new(up.strip_usage))
        } else {
            ResponseTranslator::OpenAiBody(openai::ChatBody::default())
        }
    }

    /// Feeds upstream bytes; appends what the client should get to `out`.
    pub fn feed(&mut self, chunk: &[u8], out: &mut BytesMut) {
        match self {
            ResponseTranslator::OpenAiStream(s) => s.feed(chunk, out),
            ResponseTranslator::OpenAiBody(b) => b.feed(chunk, out),
        }
    }

    /// The upstream body ended; appends any remainder to `out`.
    pub fn finish(&mut self, out: &mut BytesMut) -> Completion {
        match self {
            ResponseTranslator::OpenAiStream(s) => s.finish(out),
            ResponseTranslator::OpenAiBody(b) => b.finish(out),
        }
    }

    /// Whether the client's body differs from the upstream's (so its length does too).
    pub fn rewrites(&self) -> bool {
        matches!(self, ResponseTranslator::OpenAiStream(_))
    }

    /// What is known so far, for a stream that was cut before its end.
    pub fn snapshot(&self) -> Completion {
        match self {
            ResponseTranslator::OpenAiStream(s) => s.snapshot(),
            ResponseTranslator::OpenAiBody(b) => b.snapshot(),
        }
    }
}
