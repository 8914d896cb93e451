//! Anthropic Messages, spoken by `anthropic` providers.
//!
//! Requests from `/v1/messages` go through natively (model rewritten, `max_tokens`
//! filled when absent) and responses come back byte for byte; only the few events that
//! carry usage, errors or the end of the message are parsed, so billing is exact
//! without re-encoding anything the client sees.

use super::sse::{SseEvent, SseParser};
use super::{ClientRequest, Completion, Translate, UpstreamRequest, Usage};
use crate::config::{Provider, Target};
use crate::error::{ErrorKind, GatewayError};
use bytes::{Bytes, BytesMut};
use serde_json::{Map, Value};

pub const MESSAGES_PATH: &str = "/v1/messages";
/// Sent when the client named no version: the one every current SDK still speaks.
pub const DEFAULT_VERSION: &str = "2023-06-01";
/// `max_tokens` when neither the client nor the model's `max_output_tokens` gives one,
/// since Anthropic refuses a request without it.
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

/// Credential and API version headers; the client's `anthropic-version` and
/// `anthropic-beta` win over the defaults because the client's code depends on them.
pub fn headers(req: &ClientRequest, provider: &Provider) -> Vec<(&'static str, String)> {
    let mut h = Vec::with_capacity(3);
    if let Some(key) = &provider.api_key {
        h.push(("x-api-key", key.clone()));
    }
    let version = req.anthropic_version.as_deref().unwrap_or(DEFAULT_VERSION);
    h.push(("anthropic-version", version.to_string()));
    if let Some(beta) = &req.anthropic_beta {
        h.push(("anthropic-beta", beta.clone()));
    }
    h
}

/// Encodes a finished Messages body into the upstream request.
pub fn upstream_request(
    req: &ClientRequest,
    provider: &Provider,
    body: Map<String, Value>,
) -> Result<UpstreamRequest, GatewayError> {
    let body = serde_json::to_vec(&body)
        .map_err(|e| GatewayError::new(ErrorKind::Internal, format!("encode: {e}")))?;
    Ok(UpstreamRequest {
        path: MESSAGES_PATH.into(),
        body: Bytes::from(body),
        headers: headers(req, provider),
        strip_usage: false,
        assembled: false,
    })
}

/// `/v1/messages` to an Anthropic provider: the client's body with the upstream model
/// name and, when the client sent none, the model's `max_tokens` (a fallback's
/// smaller bound caps the client's). `assemble`: the client asked for one body, the
/// upstream gets a stream ([`super::assemble`]).
pub fn prepare_native(
    req: &ClientRequest,
    to: Target<'_>,
    assemble: bool,
) -> Result<UpstreamRequest, GatewayError> {
    let mut body = req.body.clone();
    if assemble {
        super::stream_upstream(&mut body, false);
    }
    body.insert("model".into(), Value::String(to.dep.upstream_model.clone()));
    // The client's, capped at a fallback's smaller bound; else the model's.
    if req.max_tokens != super::max_tokens_for(req, to.model) || req.max_tokens.is_none() {
        body.insert(
            "max_tokens".into(),
            Value::from(super::output_bound(req, to.model)),
        );
    }
    upstream_request(req, &to.dep.provider, body)
}

/// Anthropic's usage counters as sent, kept apart until the end because
/// `message_delta` may update any of them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AnthropicUsage {
    /// Input tokens neither read from nor written to the cache.
    pub input_tokens: u32,
    pub output_tokens: u32,
    pub cache_read_input_tokens: u32,
    pub cache_creation_input_tokens: u32,
}

impl AnthropicUsage {
    /// Takes every counter present in a `usage` object; absent ones keep their value,
    /// since `message_delta` usually carries only `output_tokens`.
    pub fn update(&mut self, u: &Value) {
        let get = |k: &str| {
            u.get(k)
                .and_then(Value::as_u64)
                .map(|n| n.min(u64::from(u32::MAX)) as u32)
        };
        if let Some(n) = get("input_tokens") {
            self.input_tokens = n;
        }
        if let Some(n) = get("output_tokens") {
            self.output_tokens = n;
        }
        if let Some(n) = get("cache_read_input_tokens") {
            self.cache_read_input_tokens = n;
        }
        if let Some(n) = get("cache_creation_input_tokens") {
            self.cache_creation_input_tokens = n;
        }
    }

    /// The gateway's view: `input` counts every prompt token, cached or not.
    pub fn to_usage(self) -> Usage {
        Usage {
            input: self
                .input_tokens
                .saturating_add(self.cache_read_input_tokens)
                .saturating_add(self.cache_creation_input_tokens),
            output: self.output_tokens,
            cached_input: self.cache_read_input_tokens,
            cache_creation_input: self.cache_creation_input_tokens,
        }
    }
}

/// Reads an Anthropic `usage` object.
pub fn parse_usage(u: &Value) -> Option<Usage> {
    if !u.is_object() {
        return None;
    }
    let mut a = AnthropicUsage::default();
    a.update(u);
    Some(a.to_usage())
}

/// The event's type: its `event:` name, or the data's `type` for streams relayed by
/// something that dropped the names.
pub(crate) fn event_type(ev: &SseEvent, data: Option<&Value>) -> String {
    if !ev.event.is_empty() {
        return String::from_utf8_lossy(&ev.event).into_owned();
    }
    data.and_then(|d| d.get("type"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// Bytes of generated content in a `content_block_delta`'s `delta`.
pub(crate) fn delta_content_len(delta: &Value) -> usize {
    ["text", "partial_json", "thinking"]
        .iter()
        .filter_map(|k| delta.get(*k).and_then(Value::as_str))
        .map(str::len)
        .sum()
}

/// Streamed message passed through event by event.
#[derive(Debug, Default)]
pub struct MessagesStream {
    parser: SseParser,
    usage: Option<AnthropicUsage>,
    stopped: bool,
    upstream_error: bool,
    content_bytes: usize,
}

impl MessagesStream {
    pub fn new() -> Self {
        Self::default()
    }

    fn observe(&mut self, ev: &SseEvent) {
        let named = !ev.event.is_empty();
        let interesting = !named
            || matches!(
                &ev.event[..],
                b"message_start"
                    | b"message_delta"
                    | b"content_block_delta"
                    | b"message_stop"
                    | b"error"
            );
        if !interesting {
            return;
        }
        let data = serde_json::from_slice::<Value>(&ev.data).ok();
        match event_type(ev, data.as_ref()).as_str() {
            "message_start" => {
                if let Some(u) = data.as_ref().and_then(|d| d.pointer("/message/usage")) {
                    self.usage.get_or_insert_with(Default::default).update(u);
                }
            }
            "message_delta" => {
                if let Some(u) = data.as_ref().and_then(|d| d.get("usage")) {
                    self.usage.get_or_insert_with(Default::default).update(u);
                }
            }
            "content_block_delta" => {
                if let Some(d) = data.as_ref().and_then(|d| d.get("delta")) {
                    self.content_bytes += delta_content_len(d);
                }
            }
            "message_stop" => self.stopped = true,
            "error" => self.upstream_error = true,
            _ => {}
        }
    }
}

impl Translate for MessagesStream {
    fn feed(&mut self, chunk: &[u8], out: &mut BytesMut) {
        self.parser.push(chunk);
        while let Some(ev) = self.parser.next_event() {
            self.observe(&ev);
            out.extend_from_slice(&ev.raw);
        }
    }

    /// A cut tail is not forwarded: half an event would corrupt the error event the
    /// proxy appends after it.
    fn finish(&mut self, _out: &mut BytesMut) -> Completion {
        self.snapshot()
    }

    fn snapshot(&self) -> Completion {
        Completion {
            usage: self.usage.map(AnthropicUsage::to_usage),
            complete: self.stopped && !self.upstream_error,
            upstream_error: self.upstream_error,
            content_bytes: self.content_bytes,
        }
    }
}

/// Non-streamed message: forwarded as it arrives, parsed at the end for usage.
#[derive(Debug, Default)]
pub struct MessagesBody {
    buf: Vec<u8>,
    usage: Option<Usage>,
    complete: bool,
    content_bytes: usize,
}

impl Translate for MessagesBody {
    fn feed(&mut self, chunk: &[u8], out: &mut BytesMut) {
        self.buf.extend_from_slice(chunk);
        out.extend_from_slice(chunk);
    }

    fn finish(&mut self, _out: &mut BytesMut) -> Completion {
        if let Ok(v) = serde_json::from_slice::<Value>(&self.buf) {
            self.usage = v.get("usage").and_then(parse_usage);
            self.complete = v.get("type").and_then(Value::as_str) == Some("message");
            self.content_bytes = message_content_len(&v);
        }
        self.snapshot()
    }

    fn snapshot(&self) -> Completion {
        Completion {
            usage: self.usage,
            complete: self.complete,
            upstream_error: false,
            content_bytes: if self.complete {
                self.content_bytes
            } else {
                self.buf.len()
            },
        }
    }
}

/// Bytes of generated text and tool input in a `message` object.
pub(crate) fn message_content_len(v: &Value) -> usize {
    v.get("content")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|b| {
            b.get("text").and_then(Value::as_str).map_or(0, str::len)
                + b.get("input").map_or(0, |i| i.to_string().len())
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ApiFormat;
    use crate::providers::translate_fixtures::{self as fx, check_splits, sse_events};
    use serde_json::json;

    fn client(body: Value) -> ClientRequest {
        ClientRequest::parse(ApiFormat::Anthropic, body.to_string().as_bytes())
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn native_request_rewrites_model_and_fills_max_tokens() {
        let model = fx::model(crate::config::ProviderKind::Anthropic, Some(1000));
        let req = client(
            json!({"model": "claude-haiku", "messages": [{"role": "user", "content": "hi"}]}),
        );
        let up = prepare_native(&req, fx::target(&model), false).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(up.path, "/v1/messages");
        let body: Value = serde_json::from_slice(&up.body).unwrap_or_default();
        assert_eq!(body["model"], "claude-3-5-haiku-20241022");
        assert_eq!(body["max_tokens"], 1000);
        assert_eq!(body["messages"][0]["content"], "hi");
        assert!(up.headers.contains(&("x-api-key", "sk-test".to_string())));
        assert!(up
            .headers
            .contains(&("anthropic-version", DEFAULT_VERSION.to_string())));
        assert!(!up.headers.iter().any(|(k, _)| *k == "anthropic-beta"));

        let mut req = client(
            json!({"model": "m", "max_tokens": 7, "messages": [{"role": "user", "content": "hi"}]}),
        );
        req.anthropic_version = Some("2024-01-01".into());
        req.anthropic_beta = Some("prompt-caching-2024-07-31".into());
        let up = prepare_native(
            &req,
            fx::target(&fx::model(crate::config::ProviderKind::Anthropic, None)),
            false,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let body: Value = serde_json::from_slice(&up.body).unwrap_or_default();
        assert_eq!(body["max_tokens"], 7);
        assert!(up
            .headers
            .contains(&("anthropic-version", "2024-01-01".to_string())));
        assert!(up
            .headers
            .contains(&("anthropic-beta", "prompt-caching-2024-07-31".to_string())));
    }

    #[test]
    fn native_request_default_max_tokens() {
        let req = client(json!({"messages": [{"role": "user", "content": "hi"}]}));
        let up = prepare_native(
            &req,
            fx::target(&fx::model(crate::config::ProviderKind::Anthropic, None)),
            false,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let body: Value = serde_json::from_slice(&up.body).unwrap_or_default();
        assert_eq!(body["max_tokens"], 4096);
    }

    #[test]
    fn stream_passes_through_and_counts_cached_usage_at_every_split() {
        let (out, c) = check_splits(MessagesStream::new, fx::ANTHROPIC_TEXT);
        assert_eq!(out, fx::ANTHROPIC_TEXT);
        assert!(c.complete);
        assert!(!c.upstream_error);
        assert_eq!(
            c.usage,
            Some(Usage {
                input: 12 + 1800 + 200,
                output: 9,
                cached_input: 1800,
                cache_creation_input: 200,
            })
        );
        assert_eq!(c.content_bytes, "Hello! ¿Qué tal? ✓ Done.".len());
    }

    #[test]
    fn tool_stream_usage_and_completion() {
        let (out, c) = check_splits(MessagesStream::new, fx::ANTHROPIC_TOOL);
        assert_eq!(out, fx::ANTHROPIC_TOOL);
        assert!(c.complete);
        let u = c.usage.unwrap_or_default();
        assert_eq!((u.input, u.output, u.cached_input), (472, 89, 0));
    }

    #[test]
    fn message_delta_may_update_input_counters() {
        let s = b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"usage\":{\"input_tokens\":0,\"output_tokens\":1}}}\n\n\
event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"input_tokens\":30,\"cache_read_input_tokens\":5,\"output_tokens\":4}}\n\n";
        let (_, c) = check_splits(MessagesStream::new, s);
        assert!(!c.complete, "no message_stop yet");
        let u = c.usage.unwrap_or_default();
        assert_eq!((u.input, u.output, u.cached_input), (35, 4, 5));
    }

    #[test]
    fn cut_stream_keeps_usage_seen_and_drops_half_event() {
        let full = fx::ANTHROPIC_TEXT;
        let cut_at = fx::find(full, b"event: content_block_stop") + 10;
        let mut s = MessagesStream::new();
        let mut out = BytesMut::new();
        s.feed(&full[..cut_at], &mut out);
        let c = s.finish(&mut out);
        assert!(!c.complete);
        assert_eq!(c.usage.map(|u| (u.input, u.output)), Some((2012, 1)));
        assert!(out.ends_with(b"\n\n"));
        assert_eq!(&out[..], &full[..cut_at - 10]);
        assert_eq!(s.snapshot(), c);
    }

    #[test]
    fn error_event_is_forwarded_and_flagged() {
        let (out, c) = check_splits(MessagesStream::new, fx::ANTHROPIC_ERROR);
        assert_eq!(out, fx::ANTHROPIC_ERROR);
        assert!(c.upstream_error);
        assert!(!c.complete);
        let evs = sse_events(&out);
        assert_eq!(evs.last().map(|e| e.0.as_deref()), Some(Some("error")));
    }

    #[test]
    fn body_passes_through_with_usage() {
        let (out, c) = check_splits(MessagesBody::default, fx::ANTHROPIC_MESSAGE);
        assert_eq!(out, fx::ANTHROPIC_MESSAGE);
        assert!(c.complete);
        assert_eq!(
            c.usage,
            Some(Usage {
                input: 1500 + 1024,
                output: 64,
                cached_input: 1024,
                cache_creation_input: 0,
            })
        );
    }
}
