//! Non-streamed responses between Anthropic messages and OpenAI chat completions, and
//! the mappings the stream translators share (ids, finish reasons, usage objects).
//!
//! A non-streamed body is one JSON document, so it is collected and translated when it
//! ends; nothing reaches the client before that, which is what a non-streaming client
//! waits for anyway.

use super::anthropic::{message_content_len, parse_usage as anthropic_usage};
use super::openai::parse_usage as openai_usage;
use super::translate_error::{from_anthropic, from_openai};
use super::{Completion, Translate, Usage};
use crate::error::{ApiFormat, ErrorKind, GatewayError};
use bytes::BytesMut;
use serde_json::{json, Value};

/// `msg_…` -> `chatcmpl-…`, so the client still sees a recognisable id per call.
pub fn chat_id(message_id: &str) -> String {
    format!(
        "chatcmpl-{}",
        message_id.strip_prefix("msg_").unwrap_or(message_id)
    )
}

/// `chatcmpl-…` -> `msg_…`.
pub fn message_id(chat_id: &str) -> String {
    format!(
        "msg_{}",
        chat_id.strip_prefix("chatcmpl-").unwrap_or(chat_id)
    )
}

/// Anthropic `stop_reason` -> OpenAI `finish_reason`.
pub fn finish_reason(stop_reason: &str) -> &'static str {
    match stop_reason {
        "max_tokens" | "model_context_window_exceeded" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        // end_turn, stop_sequence, pause_turn
        _ => "stop",
    }
}

/// OpenAI `finish_reason` -> Anthropic `stop_reason`. OpenAI does not say whether a
/// stop sequence matched, so `stop` is always `end_turn`.
pub fn stop_reason(finish_reason: &str) -> &'static str {
    match finish_reason {
        "length" => "max_tokens",
        "tool_calls" | "function_call" => "tool_use",
        "content_filter" => "refusal",
        _ => "end_turn",
    }
}

/// The `stop_reason` of a translated Anthropic message. Anthropic clients run their
/// tool loop on `stop_reason == "tool_use"`, but OpenAI does not always say
/// `tool_calls` when it calls tools: gpt-4o-mini answers `tool_choice: "required"`
/// with `finish_reason: "stop"` (tests/fixtures/wire/openai-tools-cached.json). So a
/// message that carries `tool_use` blocks stops for `tool_use`, unless it was cut
/// at its token limit (`length`): then a tool call may be truncated, and Anthropic
/// itself says `max_tokens` so the client does not run it.
pub fn message_stop_reason(finish_reason: &str, has_tool_use: bool) -> &'static str {
    if has_tool_use && finish_reason != "length" {
        "tool_use"
    } else {
        stop_reason(finish_reason)
    }
}

/// The gateway's usage as an OpenAI `usage` object.
pub fn openai_usage_json(u: Usage) -> Value {
    json!({
        "prompt_tokens": u.input,
        "completion_tokens": u.output,
        "total_tokens": u.input.saturating_add(u.output),
        "prompt_tokens_details": {"cached_tokens": u.cached_input},
    })
}

/// The gateway's usage as an Anthropic `usage` object, where `input_tokens` excludes
/// cache reads and writes (the client adds them back up).
pub fn anthropic_usage_json(u: Usage) -> Value {
    json!({
        "input_tokens": u.input.saturating_sub(u.cached_input).saturating_sub(u.cache_creation_input),
        "cache_creation_input_tokens": u.cache_creation_input,
        "cache_read_input_tokens": u.cached_input,
        "output_tokens": u.output,
    })
}

/// The body that replaces an untranslatable upstream body, in the client's format.
fn garbage(format: ApiFormat) -> Vec<u8> {
    GatewayError::new(
        ErrorKind::BadUpstreamResponse,
        "the provider's response could not be read",
    )
    .body(format)
    .to_vec()
}

/// Non-streamed Anthropic message -> `chat.completion`.
#[derive(Debug)]
pub struct MessageToChatBody {
    buf: Vec<u8>,
    created: u64,
    fallback_model: String,
    usage: Option<Usage>,
    complete: bool,
    upstream_error: bool,
    content_bytes: usize,
}

impl MessageToChatBody {
    pub fn new(created: u64, fallback_model: &str) -> Self {
        MessageToChatBody {
            buf: Vec::new(),
            created,
            fallback_model: fallback_model.to_string(),
            usage: None,
            complete: false,
            upstream_error: false,
            content_bytes: 0,
        }
    }

    fn translate(&mut self, v: &Value) -> Vec<u8> {
        if v.get("type").and_then(Value::as_str) == Some("error") {
            self.upstream_error = true;
            return from_anthropic(v, 0).body(ApiFormat::OpenAi).to_vec();
        }
        if v.get("type").and_then(Value::as_str) != Some("message") {
            return garbage(ApiFormat::OpenAi);
        }
        let mut text = String::new();
        let mut calls = Vec::new();
        for b in v
            .get("content")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            match b.get("type").and_then(Value::as_str) {
                Some("text") => text.push_str(b.get("text").and_then(Value::as_str).unwrap_or("")),
                Some("tool_use") => calls.push(json!({
                    "id": b.get("id").and_then(Value::as_str).unwrap_or(""),
                    "type": "function",
                    "function": {
                        "name": b.get("name").and_then(Value::as_str).unwrap_or(""),
                        "arguments": b.get("input").map_or_else(|| "{}".to_string(), Value::to_string),
                    },
                })),
                _ => {}
            }
        }
        let mut message = json!({"role": "assistant", "content": text, "refusal": null});
        if !calls.is_empty() {
            if text.is_empty() {
                message["content"] = Value::Null;
            }
            message["tool_calls"] = Value::Array(calls);
        }
        let stop = v
            .get("stop_reason")
            .and_then(Value::as_str)
            .unwrap_or("end_turn");
        self.usage = v.get("usage").and_then(anthropic_usage);
        self.content_bytes = message_content_len(v);
        self.complete = true;
        let mut out = json!({
            "id": chat_id(v.get("id").and_then(Value::as_str).unwrap_or("")),
            "object": "chat.completion",
            "created": self.created,
            "model": v.get("model").and_then(Value::as_str).unwrap_or(&self.fallback_model),
            "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish_reason(stop)}],
        });
        if let Some(u) = self.usage {
            out["usage"] = openai_usage_json(u);
        }
        out.to_string().into_bytes()
    }
}

impl Translate for MessageToChatBody {
    fn feed(&mut self, chunk: &[u8], _out: &mut BytesMut) {
        self.buf.extend_from_slice(chunk);
    }

    fn finish(&mut self, out: &mut BytesMut) -> Completion {
        let body = match serde_json::from_slice::<Value>(&self.buf) {
            Ok(v) => self.translate(&v),
            Err(_) => garbage(ApiFormat::OpenAi),
        };
        out.extend_from_slice(&body);
        self.snapshot()
    }

    fn snapshot(&self) -> Completion {
        Completion {
            usage: self.usage,
            complete: self.complete,
            upstream_error: self.upstream_error,
            content_bytes: if self.complete {
                self.content_bytes
            } else {
                self.buf.len()
            },
        }
    }
}

/// Non-streamed `chat.completion` -> Anthropic message.
#[derive(Debug)]
pub struct ChatToMessageBody {
    buf: Vec<u8>,
    fallback_model: String,
    usage: Option<Usage>,
    complete: bool,
    upstream_error: bool,
    content_bytes: usize,
}

impl ChatToMessageBody {
    pub fn new(fallback_model: &str) -> Self {
        ChatToMessageBody {
            buf: Vec::new(),
            fallback_model: fallback_model.to_string(),
            usage: None,
            complete: false,
            upstream_error: false,
            content_bytes: 0,
        }
    }

    fn translate(&mut self, v: &Value) -> Vec<u8> {
        if v.get("error").is_some_and(Value::is_object) {
            self.upstream_error = true;
            return from_openai(v, 0).body(ApiFormat::Anthropic).to_vec();
        }
        let Some(choice) = v.pointer("/choices/0") else {
            return garbage(ApiFormat::Anthropic);
        };
        let msg = choice.get("message").unwrap_or(&Value::Null);
        let mut content = Vec::new();
        for key in ["content", "refusal"] {
            if let Some(t) = msg
                .get(key)
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
            {
                self.content_bytes += t.len();
                content.push(json!({"type": "text", "text": t}));
            }
        }
        for c in msg
            .get("tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let args = c
                .pointer("/function/arguments")
                .and_then(Value::as_str)
                .unwrap_or("");
            self.content_bytes += args.len();
            // Anthropic's input is an object; arguments that are not one become `{}`.
            let input = match serde_json::from_str::<Value>(args) {
                Ok(o @ Value::Object(_)) => o,
                _ => json!({}),
            };
            content.push(json!({
                "type": "tool_use",
                "id": c.get("id").and_then(Value::as_str).unwrap_or(""),
                "name": c.pointer("/function/name").and_then(Value::as_str).unwrap_or(""),
                "input": input,
            }));
        }
        let finish = choice
            .get("finish_reason")
            .and_then(Value::as_str)
            .unwrap_or("stop");
        let has_tool_use = content.iter().any(|b| b["type"] == "tool_use");
        self.usage = v.get("usage").and_then(openai_usage);
        self.complete = true;
        json!({
            "id": message_id(v.get("id").and_then(Value::as_str).unwrap_or("")),
            "type": "message",
            "role": "assistant",
            "model": v.get("model").and_then(Value::as_str).unwrap_or(&self.fallback_model),
            "content": content,
            "stop_reason": message_stop_reason(finish, has_tool_use),
            "stop_sequence": null,
            "usage": anthropic_usage_json(self.usage.unwrap_or_default()),
        })
        .to_string()
        .into_bytes()
    }
}

impl Translate for ChatToMessageBody {
    fn feed(&mut self, chunk: &[u8], _out: &mut BytesMut) {
        self.buf.extend_from_slice(chunk);
    }

    fn finish(&mut self, out: &mut BytesMut) -> Completion {
        let body = match serde_json::from_slice::<Value>(&self.buf) {
            Ok(v) => self.translate(&v),
            Err(_) => garbage(ApiFormat::Anthropic),
        };
        out.extend_from_slice(&body);
        self.snapshot()
    }

    fn snapshot(&self) -> Completion {
        Completion {
            usage: self.usage,
            complete: self.complete,
            upstream_error: self.upstream_error,
            content_bytes: if self.complete {
                self.content_bytes
            } else {
                self.buf.len()
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::translate_fixtures::{self as fx, check_splits};

    fn parse(b: &[u8]) -> Value {
        serde_json::from_slice(b).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(b)))
    }

    #[test]
    fn anthropic_message_to_chat_completion() {
        let (out, c) = check_splits(
            || MessageToChatBody::new(1_700_000_000, "fallback"),
            fx::ANTHROPIC_MESSAGE,
        );
        assert!(c.complete);
        assert_eq!(
            c.usage,
            Some(Usage {
                input: 2524,
                output: 64,
                cached_input: 1024,
                cache_creation_input: 0
            })
        );
        assert_eq!(
            parse(&out),
            json!({
                "id": "chatcmpl-01Aq9w938a90dw8q",
                "object": "chat.completion",
                "created": 1_700_000_000,
                "model": "claude-3-5-haiku-20241022",
                "choices": [{
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": "I'll look that up.",
                        "refusal": null,
                        "tool_calls": [{
                            "id": "toolu_01A09q90qw90lq917835lq9",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": "{\"location\":\"San Francisco, CA\",\"unit\":\"celsius\"}"},
                        }],
                    },
                    "logprobs": null,
                    "finish_reason": "tool_calls",
                }],
                "usage": {"prompt_tokens": 2524, "completion_tokens": 64, "total_tokens": 2588,
                    "prompt_tokens_details": {"cached_tokens": 1024}},
            })
        );
    }

    #[test]
    fn chat_completion_to_anthropic_message() {
        let (out, c) = check_splits(|| ChatToMessageBody::new("fallback"), fx::OPENAI_COMPLETION);
        assert!(c.complete);
        assert_eq!(
            c.usage,
            Some(Usage {
                input: 2048,
                output: 17,
                cached_input: 1024,
                cache_creation_input: 0
            })
        );
        assert_eq!(
            parse(&out),
            json!({
                "id": "msg_B9MBs8CjcvOU2jLn4n570S5qMJKcT",
                "type": "message",
                "role": "assistant",
                "model": "gpt-4o-mini-2024-07-18",
                "content": [
                    {"type": "text", "text": "Let me check."},
                    {"type": "tool_use", "id": "call_DdmO9pD3xa9XTPNJ32zg2hcA", "name": "get_weather", "input": {"location": "Paris"}},
                ],
                "stop_reason": "tool_use",
                "stop_sequence": null,
                "usage": {"input_tokens": 1024, "cache_creation_input_tokens": 0,
                    "cache_read_input_tokens": 1024, "output_tokens": 17},
            })
        );
    }

    /// The recorded gpt-4o-mini answer to `tool_choice: "required"`: tool calls under
    /// `finish_reason: "stop"` still make an Anthropic client run its tools.
    #[test]
    fn recorded_tool_calls_with_finish_stop_stop_for_tool_use() {
        let (out, c) = check_splits(
            || ChatToMessageBody::new("fallback"),
            fx::WIRE_OPENAI_TOOLS_CACHED,
        );
        assert!(c.complete);
        assert_eq!(
            c.usage,
            Some(Usage {
                input: 1136,
                output: 64,
                cached_input: 1024,
                cache_creation_input: 0
            })
        );
        assert_eq!(
            parse(&out),
            json!({
                "id": "msg_ADeP2i0frELC4W5RVNNkKz6TQ7hig",
                "type": "message",
                "role": "assistant",
                "model": "gpt-4o-mini-2024-07-18",
                "content": [
                    {"type": "tool_use", "id": "call_viwwDZPuQh8hJFPf2Co1dYJK",
                        "name": "get_delivery_date", "input": {"order_id": "9876543210"}},
                    {"type": "tool_use", "id": "call_t1FFdAhrfvRc5IgqA6WkPKYj", "name": "cancel_order",
                        "input": {"order_id": "9876543210", "reason": "Decided to purchase locally to get it faster."}},
                ],
                "stop_reason": "tool_use",
                "stop_sequence": null,
                "usage": {"input_tokens": 112, "cache_creation_input_tokens": 0,
                    "cache_read_input_tokens": 1024, "output_tokens": 64},
            })
        );
    }

    #[test]
    fn text_answer_with_finish_stop_still_ends_the_turn() {
        let body = br#"{"id":"chatcmpl-1","model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"Hi","tool_calls":[]},"finish_reason":"stop"}]}"#;
        let (out, _) = fx::run(&mut ChatToMessageBody::new("m"), &[body]);
        assert_eq!(parse(&out)["stop_reason"], "end_turn");
        assert_eq!(message_stop_reason("length", false), "max_tokens");
        assert_eq!(message_stop_reason("stop", true), "tool_use");
        // Cut at the token limit, a tool call may be truncated: not one to run.
        assert_eq!(message_stop_reason("length", true), "max_tokens");
    }

    #[test]
    fn reason_mappings() {
        for (a, o) in [
            ("end_turn", "stop"),
            ("stop_sequence", "stop"),
            ("max_tokens", "length"),
            ("tool_use", "tool_calls"),
        ] {
            assert_eq!(finish_reason(a), o);
        }
        for (o, a) in [
            ("stop", "end_turn"),
            ("length", "max_tokens"),
            ("tool_calls", "tool_use"),
            ("content_filter", "refusal"),
        ] {
            assert_eq!(stop_reason(o), a);
        }
    }

    #[test]
    fn unreadable_bodies_become_errors_in_the_client_format() {
        let mut t = MessageToChatBody::new(0, "m");
        let (out, c) = fx::run(&mut t, &[b"{\"type\":\"mess"]);
        assert!(!c.complete);
        assert_eq!(parse(&out)["error"]["code"], "bad_upstream_response");
        let mut t = ChatToMessageBody::new("m");
        let (out, c) = fx::run(&mut t, &[b"<html>"]);
        assert!(!c.complete);
        assert_eq!(parse(&out)["error"]["type"], "api_error");
        let mut t = ChatToMessageBody::new("m");
        let (out, c) = fx::run(
            &mut t,
            &[br#"{"error":{"message":"boom","type":"server_error"}}"#],
        );
        assert!(c.upstream_error && !c.complete);
        assert_eq!(
            parse(&out),
            json!({"type": "error", "error": {"type": "api_error", "message": "boom"}})
        );
    }

    #[test]
    fn plain_text_and_length() {
        let body = br#"{"id":"msg_1","type":"message","role":"assistant","model":"c","content":[{"type":"text","text":"Hi"}],"stop_reason":"max_tokens","stop_sequence":null,"usage":{"input_tokens":3,"output_tokens":1}}"#;
        let (out, _) = fx::run(&mut MessageToChatBody::new(5, "m"), &[body]);
        let v = parse(&out);
        assert_eq!(v["choices"][0]["message"]["content"], "Hi");
        assert!(v["choices"][0]["message"].get("tool_calls").is_none());
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    }
}
