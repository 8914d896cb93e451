//! Provider adapters: pure request and response translation, no I/O.
//!
//! The proxy asks an adapter for the bytes to send upstream for one attempt and feeds
//! it the upstream's response bytes as they arrive; the adapter answers with the bytes
//! for the client and the usage it saw. Keeping this free of I/O is what lets it be
//! tested on recorded wire fixtures cut at every byte boundary.

pub mod anthropic;
pub mod assemble;
pub mod end_user;
pub mod openai;
pub mod sse;
pub mod translate_error;
#[cfg(test)]
pub(crate) mod translate_fixtures;
pub mod translate_request;
pub mod translate_response;
pub mod translate_stream_chat;
pub mod translate_stream_messages;

pub use translate_error::translate_error_body;

use crate::config::{Model, ProviderKind, Target};
use crate::error::{ApiFormat, ErrorKind, GatewayError};
use bytes::{Bytes, BytesMut};
use serde_json::{Map, Value};
use std::borrow::Cow;

/// Token usage of one call, as the provider reported it or as estimated.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens, cached ones included: Anthropic's `input_tokens` plus its cache
    /// reads and cache writes, so that `input` means the same for every provider.
    pub input: u32,
    pub output: u32,
    /// Part of `input` the provider billed at the cached price.
    pub cached_input: u32,
    /// Part of `input` Anthropic wrote to its prompt cache (`cache_creation_input_tokens`),
    /// kept apart because Anthropic bills it above the plain input price.
    pub cache_creation_input: u32,
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
    /// `max_completion_tokens`/`max_tokens` (OpenAI) or `max_tokens` (Anthropic).
    pub max_tokens: Option<u64>,
    /// The client's `anthropic-version` header, for the proxy to fill: sent upstream to
    /// Anthropic in place of the gateway's default so clients keep the API version
    /// they were written for.
    pub anthropic_version: Option<String>,
    /// The client's `anthropic-beta` header, for the proxy to fill; sent to Anthropic.
    pub anthropic_beta: Option<String>,
    /// The end user the body names (OpenAI `user`, Anthropic `metadata.user_id`) when
    /// valid; the `x-gateway-end-user` header wins over it ([`end_user`]).
    pub end_user: Option<String>,
}

impl ClientRequest {
    /// Validates the fields every endpoint needs; the error names the bad field.
    ///
    /// Both formats need a non-empty `messages` array of objects with a string `role`.
    /// An Anthropic request without `max_tokens` is accepted although the Anthropic
    /// API refuses it: the gateway fills it from the model's `max_output_tokens`, which
    /// is the cap the operator chose anyway. The two header fields start empty.
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
        if format == ApiFormat::Anthropic {
            match body.get("system") {
                None | Some(Value::Null | Value::String(_) | Value::Array(_)) => {}
                Some(_) => return Err(invalid("'system' must be a string or an array")),
            }
        }
        let include_usage = format == ApiFormat::OpenAi
            && body
                .get("stream_options")
                .and_then(|o| o.get("include_usage"))
                .and_then(Value::as_bool)
                .unwrap_or(false);
        let max_tokens_field = match format {
            ApiFormat::OpenAi => body
                .get("max_completion_tokens")
                .filter(|v| !v.is_null())
                .or_else(|| body.get("max_tokens")),
            ApiFormat::Anthropic => body.get("max_tokens"),
        };
        let max_tokens = match max_tokens_field {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_u64()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| invalid("'max_tokens' must be a positive integer"))?,
            ),
        };
        let end_user = end_user::from_body(format, &body);
        Ok(ClientRequest {
            format,
            end_user,
            body,
            model,
            stream,
            include_usage,
            max_tokens,
            anthropic_version: None,
            anthropic_beta: None,
        })
    }
}

fn invalid(msg: impl Into<String>) -> GatewayError {
    GatewayError::new(ErrorKind::InvalidRequest, msg)
}

/// What to send upstream for one attempt.
#[derive(Debug, Clone)]
pub struct UpstreamRequest {
    /// Path (and query) below the provider's base URL prefix, e.g.
    /// `/v1/chat/completions`; owned only where it names the model, as Azure's
    /// per-deployment path does.
    pub path: Cow<'static, str>,
    pub body: Bytes,
    /// Provider-specific headers (credentials, API version), set after the client's
    /// own credentials were removed.
    pub headers: Vec<(&'static str, String)>,
    /// The gateway added `stream_options.include_usage`; the usage chunk it brings
    /// must not reach the client.
    pub strip_usage: bool,
    /// The client asked for one body but the upstream was asked for a stream, which
    /// the gateway assembles ([`assemble`]), so `first_token_ms` and `idle_ms` bound
    /// a non-streaming call too.
    pub assembled: bool,
}

/// The most output tokens `model` can produce for `req`: what [`max_tokens_for`]
/// sends upstream, else the Anthropic default the adapters also use.
pub fn output_bound(req: &ClientRequest, model: &Model) -> u64 {
    max_tokens_for(req, model).unwrap_or(anthropic::DEFAULT_MAX_TOKENS)
}

/// The output bound the adapters send to `model`: the client's `max_tokens` capped at
/// the model's `max_output_tokens`, else the model's. The cap only ever applies to a
/// fallback: a client asking the first choice for more is refused by
/// [`check_max_tokens`]; a fallback with a smaller bound answers within its own
/// bound (the operator's cap) rather than fail the request.
pub fn max_tokens_for(req: &ClientRequest, model: &Model) -> Option<u64> {
    let cap = model.max_output_tokens.map(u64::from);
    match (req.max_tokens, cap) {
        (Some(n), Some(cap)) => Some(n.min(cap)),
        (n, cap) => n.or(cap),
    }
}

/// Refuses (400 `invalid_request`) a `max_tokens` above the `max_output_tokens` of
/// the chain's first choice, `first`, instead of forwarding what the operator capped
/// (and reserving a worst case the model can never produce). Only the first choice
/// is held to it: it is the model the client asked for; fallbacks with a smaller
/// bound get the request capped to theirs (see [`max_tokens_for`]).
pub fn check_max_tokens(req: &ClientRequest, first: &Model) -> Result<(), GatewayError> {
    match (req.max_tokens, first.max_output_tokens) {
        (Some(n), Some(cap)) if n > u64::from(cap) => Err(invalid(format!(
            "'max_tokens' is {n}, above model '{}''s limit of {cap} output tokens \
             (max_output_tokens): lower max_tokens",
            first.name
        ))),
        _ => Ok(()),
    }
}

/// Builds the upstream request for `to` from the client's request.
///
/// Every pair of endpoint format and provider kind is served: the same format is passed
/// through with the model rewritten, the other is translated. A non-streaming request
/// goes upstream as a stream (with usage) unless the provider opted out
/// (`upstream_streaming: as_client`): see [`UpstreamRequest::assembled`].
pub fn prepare(req: &ClientRequest, to: Target<'_>) -> Result<UpstreamRequest, GatewayError> {
    let assemble = !req.stream && to.dep.provider.stream_always;
    let mut up = match (req.format, to.dep.provider.kind) {
        (
            ApiFormat::OpenAi,
            ProviderKind::OpenAi | ProviderKind::OpenAiCompatible | ProviderKind::AzureOpenAi,
        ) => openai::prepare_chat(req, to, assemble),
        (ApiFormat::OpenAi, ProviderKind::Anthropic) => {
            let mut body = translate_request::chat_to_messages(
                &req.body,
                &to.dep.upstream_model,
                max_tokens_for(req, to.model),
            )?;
            if assemble {
                stream_upstream(&mut body, false);
            }
            anthropic::upstream_request(req, &to.dep.provider, body)
        }
        (ApiFormat::Anthropic, ProviderKind::Anthropic) => {
            anthropic::prepare_native(req, to, assemble)
        }
        (
            ApiFormat::Anthropic,
            kind @ (ProviderKind::OpenAi
            | ProviderKind::OpenAiCompatible
            | ProviderKind::AzureOpenAi),
        ) => {
            let mut body = translate_request::messages_to_chat(
                &req.body,
                &to.dep.upstream_model,
                max_tokens_for(req, to.model),
                kind.openai_native(),
            )?;
            if assemble {
                stream_upstream(&mut body, true);
            }
            openai::chat_request(to.dep, body, false)
        }
    }?;
    up.assembled = assemble;
    Ok(up)
}

/// Makes a finished upstream body ask for a stream; an OpenAI-kind one also for the
/// usage chunk, since the assembled body must carry the usage a non-streamed one
/// does.
pub(crate) fn stream_upstream(body: &mut Map<String, Value>, openai_kind: bool) {
    body.insert("stream".into(), Value::Bool(true));
    if openai_kind {
        match body.get_mut("stream_options") {
            Some(Value::Object(o)) => {
                o.insert("include_usage".into(), Value::Bool(true));
            }
            _ => {
                body.insert(
                    "stream_options".into(),
                    serde_json::json!({"include_usage": true}),
                );
            }
        }
    }
}

/// The calls every response translator answers, so [`ResponseTranslator`] and the
/// fixture tests can drive each of them the same way.
pub trait Translate {
    /// Feeds upstream bytes; appends what the client should get to `out`.
    fn feed(&mut self, chunk: &[u8], out: &mut BytesMut);
    /// The upstream body ended; appends any remainder to `out`.
    fn finish(&mut self, out: &mut BytesMut) -> Completion;
    /// What is known so far.
    fn snapshot(&self) -> Completion;
}

impl Translate for openai::ChatStream {
    fn feed(&mut self, chunk: &[u8], out: &mut BytesMut) {
        openai::ChatStream::feed(self, chunk, out)
    }
    fn finish(&mut self, out: &mut BytesMut) -> Completion {
        openai::ChatStream::finish(self, out)
    }
    fn snapshot(&self) -> Completion {
        openai::ChatStream::snapshot(self)
    }
}

impl Translate for openai::ChatBody {
    fn feed(&mut self, chunk: &[u8], out: &mut BytesMut) {
        openai::ChatBody::feed(self, chunk, out)
    }
    fn finish(&mut self, out: &mut BytesMut) -> Completion {
        openai::ChatBody::finish(self, out)
    }
    fn snapshot(&self) -> Completion {
        openai::ChatBody::snapshot(self)
    }
}

/// Translates one upstream response for the client, counting usage on the way.
#[derive(Debug)]
pub enum ResponseTranslator {
    /// OpenAI client, OpenAI-kind provider.
    OpenAiStream(openai::ChatStream),
    OpenAiBody(openai::ChatBody),
    /// Anthropic client, Anthropic provider: bytes passed through, usage read.
    AnthropicStream(anthropic::MessagesStream),
    AnthropicBody(anthropic::MessagesBody),
    /// OpenAI client, Anthropic provider.
    MessagesToChatStream(translate_stream_chat::MessagesToChatStream),
    MessagesToChatBody(translate_response::MessageToChatBody),
    /// Anthropic client, OpenAI-kind provider.
    ChatToMessagesStream(translate_stream_messages::ChatToMessagesStream),
    ChatToMessagesBody(translate_response::ChatToMessageBody),
    /// A client that asked for one body, an upstream that streams: the stream is
    /// assembled, then translated by the variant the non-stream path would use.
    Assembled(Box<assemble::Assembled>),
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

/// Seconds since the Unix epoch, for the `created` field of translated OpenAI bodies.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl ResponseTranslator {
    /// Picks the translator for the pair of endpoint format and provider kind that
    /// [`prepare`] built the upstream request for.
    pub fn new(req: &ClientRequest, up: &UpstreamRequest, to: Target<'_>) -> Self {
        let body = Self::pick(req, up, to);
        if !up.assembled {
            return body;
        }
        let assembler = if to.dep.provider.kind == ProviderKind::Anthropic {
            assemble::Assembler::Anthropic(assemble::AnthropicAssembler::new())
        } else {
            assemble::Assembler::OpenAi(assemble::OpenAiAssembler::new())
        };
        ResponseTranslator::Assembled(Box::new(assemble::Assembled::new(assembler, body)))
    }

    /// The translator for the client's own mode (streamed or one body).
    fn pick(req: &ClientRequest, up: &UpstreamRequest, to: Target<'_>) -> Self {
        use ResponseTranslator as T;
        let anthropic_provider = to.dep.provider.kind == ProviderKind::Anthropic;
        let fallback_model = to.dep.upstream_model.as_str();
        match (req.format, anthropic_provider, req.stream) {
            (ApiFormat::OpenAi, false, true) => {
                T::OpenAiStream(openai::ChatStream::new(up.strip_usage))
            }
            (ApiFormat::OpenAi, false, false) => T::OpenAiBody(openai::ChatBody::default()),
            (ApiFormat::Anthropic, true, true) => {
                T::AnthropicStream(anthropic::MessagesStream::new())
            }
            (ApiFormat::Anthropic, true, false) => {
                T::AnthropicBody(anthropic::MessagesBody::default())
            }
            (ApiFormat::OpenAi, true, true) => {
                T::MessagesToChatStream(translate_stream_chat::MessagesToChatStream::new(
                    req.include_usage,
                    unix_now(),
                    fallback_model,
                ))
            }
            (ApiFormat::OpenAi, true, false) => T::MessagesToChatBody(
                translate_response::MessageToChatBody::new(unix_now(), fallback_model),
            ),
            (ApiFormat::Anthropic, false, true) => T::ChatToMessagesStream(
                translate_stream_messages::ChatToMessagesStream::new(fallback_model),
            ),
            (ApiFormat::Anthropic, false, false) => {
                T::ChatToMessagesBody(translate_response::ChatToMessageBody::new(fallback_model))
            }
        }
    }

    fn inner(&self) -> &dyn Translate {
        match self {
            ResponseTranslator::OpenAiStream(t) => t,
            ResponseTranslator::OpenAiBody(t) => t,
            ResponseTranslator::AnthropicStream(t) => t,
            ResponseTranslator::AnthropicBody(t) => t,
            ResponseTranslator::MessagesToChatStream(t) => t,
            ResponseTranslator::MessagesToChatBody(t) => t,
            ResponseTranslator::ChatToMessagesStream(t) => t,
            ResponseTranslator::ChatToMessagesBody(t) => t,
            ResponseTranslator::Assembled(t) => t.as_ref(),
        }
    }

    fn inner_mut(&mut self) -> &mut dyn Translate {
        match self {
            ResponseTranslator::OpenAiStream(t) => t,
            ResponseTranslator::OpenAiBody(t) => t,
            ResponseTranslator::AnthropicStream(t) => t,
            ResponseTranslator::AnthropicBody(t) => t,
            ResponseTranslator::MessagesToChatStream(t) => t,
            ResponseTranslator::MessagesToChatBody(t) => t,
            ResponseTranslator::ChatToMessagesStream(t) => t,
            ResponseTranslator::ChatToMessagesBody(t) => t,
            ResponseTranslator::Assembled(t) => t.as_mut(),
        }
    }

    /// Feeds upstream bytes; appends what the client should get to `out`.
    pub fn feed(&mut self, chunk: &[u8], out: &mut BytesMut) {
        self.inner_mut().feed(chunk, out)
    }

    /// The upstream body ended; appends any remainder to `out`.
    pub fn finish(&mut self, out: &mut BytesMut) -> Completion {
        self.inner_mut().finish(out)
    }

    /// Whether the client's body may differ from the upstream's (so its length does
    /// too): every stream (a cut tail is dropped, not forwarded half) and every
    /// translated body. Only same-format bodies go out byte for byte.
    pub fn rewrites(&self) -> bool {
        !matches!(
            self,
            ResponseTranslator::OpenAiBody(_) | ResponseTranslator::AnthropicBody(_)
        )
    }

    /// What is known so far, for a stream that was cut before its end.
    pub fn snapshot(&self) -> Completion {
        self.inner().snapshot()
    }

    /// An assembled answer's stream has begun: the moment a streaming client would
    /// have had its first byte, which `first_token_ms` bounds. Always false for the
    /// other variants, whose own output says so.
    pub fn started(&self) -> bool {
        matches!(self, ResponseTranslator::Assembled(a) if a.started())
    }

    /// Why a non-streamed answer that [`finish`](Self::finish) found incomplete
    /// cannot be delivered: a plain body can only have been unreadable.
    pub fn unfinished(&self) -> assemble::Unfinished {
        match self {
            ResponseTranslator::Assembled(a) => a.unfinished(),
            _ => assemble::Unfinished::Unreadable,
        }
    }
}

#[cfg(test)]
mod output_bound_tests {
    use super::translate_fixtures::model;
    use super::*;
    use serde_json::json;

    fn req(format: ApiFormat, body: Value) -> ClientRequest {
        ClientRequest::parse(format, body.to_string().as_bytes()).expect("valid request")
    }

    fn sent(up: &UpstreamRequest) -> Value {
        serde_json::from_slice(&up.body).expect("json body")
    }

    #[test]
    fn max_tokens_above_the_first_choice_bound_is_refused_naming_it() {
        let m = model(ProviderKind::OpenAiCompatible, Some(256));
        let over = req(
            ApiFormat::OpenAi,
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 257}),
        );
        let e = check_max_tokens(&over, &m).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidRequest);
        assert_eq!(
            e.message,
            "'max_tokens' is 257, above model 'public-model''s limit of 256 output tokens \
             (max_output_tokens): lower max_tokens"
        );
        let at = req(
            ApiFormat::Anthropic,
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 256}),
        );
        check_max_tokens(&at, &m).unwrap();
        // No bound configured: anything goes, as before.
        check_max_tokens(&over, &model(ProviderKind::OpenAiCompatible, None)).unwrap();
    }

    #[test]
    fn a_fallback_with_a_smaller_bound_gets_the_request_capped_at_it() {
        let small = model(ProviderKind::OpenAi, Some(100));
        let chat = req(
            ApiFormat::OpenAi,
            json!({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 500}),
        );
        assert_eq!(output_bound(&chat, &small), 100);
        assert_eq!(
            sent(&prepare(&chat, super::translate_fixtures::target(&small)).unwrap())
                ["max_completion_tokens"],
            100
        );
        let roomy = model(ProviderKind::OpenAi, Some(1000));
        assert_eq!(
            sent(&prepare(&chat, super::translate_fixtures::target(&roomy)).unwrap())
                ["max_completion_tokens"],
            500
        );
        let msgs = req(
            ApiFormat::Anthropic,
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 500}),
        );
        let small_anthropic = model(ProviderKind::Anthropic, Some(100));
        assert_eq!(
            sent(&prepare(&msgs, super::translate_fixtures::target(&small_anthropic)).unwrap())
                ["max_tokens"],
            100
        );
        assert_eq!(
            sent(&prepare(&msgs, super::translate_fixtures::target(&small)).unwrap())
                ["max_completion_tokens"],
            100
        );
        assert_eq!(
            sent(&prepare(&chat, super::translate_fixtures::target(&small_anthropic)).unwrap())
                ["max_tokens"],
            100
        );
    }
}
