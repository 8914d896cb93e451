//! Anthropic's streamed message events -> OpenAI `chat.completion.chunk` events.
//!
//! Serves `/v1/chat/completions` from an Anthropic model. Each Anthropic event is
//! translated as soon as it is complete, so tokens reach the client as they arrive:
//! `message_start` gives the role chunk, text and tool-input deltas give content and
//! `tool_calls` chunks, `message_delta` the chunk with `finish_reason`, and
//! `message_stop` the usage chunk (when the client asked for it) and `[DONE]`. An
//! `error` event becomes OpenAI's in-stream error and the stream gets no `[DONE]`.

use super::anthropic::{delta_content_len, event_type, AnthropicUsage};
use super::sse::SseParser;
use super::translate_error::from_anthropic;
use super::translate_response::{chat_id, finish_reason, openai_usage_json};
use super::{Completion, Translate};
use crate::error::{ApiFormat, ErrorKind, GatewayError};
use bytes::BytesMut;
use serde_json::{json, Value};

#[derive(Debug)]
pub struct MessagesToChatStream {
    parser: SseParser,
    include_usage: bool,
    created: u64,
    id: String,
    model: String,
    started: bool,
    usage: Option<AnthropicUsage>,
    /// Anthropic content-block index -> OpenAI tool-call index, for open tool blocks.
    tools: Vec<(u64, u32)>,
    next_tool: u32,
    finish_sent: bool,
    stopped: bool,
    upstream_error: bool,
    content_bytes: usize,
}

impl MessagesToChatStream {
    /// `include_usage`: the client asked for the final usage chunk. `created` is the
    /// timestamp every chunk carries; `fallback_model` names the model until
    /// `message_start` says which one answered.
    pub fn new(include_usage: bool, created: u64, fallback_model: &str) -> Self {
        MessagesToChatStream {
            parser: SseParser::new(),
            include_usage,
            created,
            id: "chatcmpl-gateway".to_string(),
            model: fallback_model.to_string(),
            started: false,
            usage: None,
            tools: Vec::new(),
            next_tool: 0,
            finish_sent: false,
            stopped: false,
            upstream_error: false,
            content_bytes: 0,
        }
    }

    fn emit(out: &mut BytesMut, v: &Value) {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(v.to_string().as_bytes());
        out.extend_from_slice(b"\n\n");
    }

    fn chunk(&self, out: &mut BytesMut, delta: Value, finish: Option<&str>) {
        let v = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        });
        Self::emit(out, &v);
    }

    /// The role chunk OpenAI always sends first; also covers a provider that skipped
    /// `message_start`.
    fn start(&mut self, out: &mut BytesMut) {
        if !self.started {
            self.started = true;
            self.chunk(out, json!({"role": "assistant", "content": ""}), None);
        }
    }

    fn fail(&mut self, out: &mut BytesMut, e: GatewayError) {
        self.upstream_error = true;
        out.extend_from_slice(&e.sse_event(ApiFormat::OpenAi));
    }

    fn tool_index(&self, block: u64) -> Option<u32> {
        self.tools
            .iter()
            .find(|(b, _)| *b == block)
            .map(|(_, t)| *t)
    }

    fn text(&mut self, out: &mut BytesMut, text: &str) {
        if !text.is_empty() {
            self.content_bytes += text.len();
            self.chunk(out, json!({"content": text}), None);
        }
    }

    fn on_event(&mut self, kind: &str, v: &Value, out: &mut BytesMut) {
        match kind {
            "message_start" => {
                let m = v.get("message").unwrap_or(&Value::Null);
                if let Some(id) = m.get("id").and_then(Value::as_str) {
                    self.id = chat_id(id);
                }
                if let Some(model) = m.get("model").and_then(Value::as_str) {
                    self.model = model.to_string();
                }
                if let Some(u) = m.get("usage") {
                    self.usage.get_or_insert_with(Default::default).update(u);
                }
                self.start(out);
            }
            "content_block_start" => {
                self.start(out);
                let block = v.get("index").and_then(Value::as_u64).unwrap_or(0);
                let cb = v.get("content_block").unwrap_or(&Value::Null);
                match cb.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        self.text(out, cb.get("text").and_then(Value::as_str).unwrap_or(""))
                    }
                    Some("tool_use") => {
                        let idx = self.next_tool;
                        self.next_tool += 1;
                        self.tools.push((block, idx));
                        let call = json!({
                            "index": idx,
                            "id": cb.get("id").and_then(Value::as_str).unwrap_or(""),
                            "type": "function",
                            "function": {"name": cb.get("name").and_then(Value::as_str).unwrap_or(""), "arguments": ""},
                        });
                        self.chunk(out, json!({"tool_calls": [call]}), None);
                    }
                    // thinking and server-side blocks have no chat counterpart
                    _ => {}
                }
            }
            "content_block_delta" => {
                self.start(out);
                let block = v.get("index").and_then(Value::as_u64).unwrap_or(0);
                let d = v.get("delta").unwrap_or(&Value::Null);
                match d.get("type").and_then(Value::as_str) {
                    Some("text_delta") => {
                        self.text(out, d.get("text").and_then(Value::as_str).unwrap_or(""))
                    }
                    Some("input_json_delta") => {
                        let frag = d.get("partial_json").and_then(Value::as_str).unwrap_or("");
                        if let (Some(idx), false) = (self.tool_index(block), frag.is_empty()) {
                            self.content_bytes += frag.len();
                            let call = json!({"index": idx, "function": {"arguments": frag}});
                            self.chunk(out, json!({"tool_calls": [call]}), None);
                        }
                    }
                    // thinking is generated (and billed) but not shown to chat clients
                    _ => self.content_bytes += delta_content_len(d),
                }
            }
            "message_delta" => {
                if let Some(u) = v.get("usage") {
                    self.usage.get_or_insert_with(Default::default).update(u);
                }
                if let Some(r) = v.pointer("/delta/stop_reason").and_then(Value::as_str) {
                    self.start(out);
                    self.finish_sent = true;
                    self.chunk(out, json!({}), Some(finish_reason(r)));
                }
            }
            "message_stop" => {
                self.start(out);
                if !self.finish_sent {
                    self.finish_sent = true;
                    self.chunk(out, json!({}), Some("stop"));
                }
                if self.include_usage {
                    let u = self.usage.unwrap_or_default().to_usage();
                    let v = json!({
                        "id": self.id,
                        "object": "chat.completion.chunk",
                        "created": self.created,
                        "model": self.model,
                        "choices": [],
                        "usage": openai_usage_json(u),
                    });
                    Self::emit(out, &v);
                }
                out.extend_from_slice(b"data: [DONE]\n\n");
                self.stopped = true;
            }
            "error" => self.fail(out, from_anthropic(v, 0)),
            // ping, content_block_stop, and event types added later
            _ => {}
        }
    }
}

impl Translate for MessagesToChatStream {
    fn feed(&mut self, chunk: &[u8], out: &mut BytesMut) {
        self.parser.push(chunk);
        while let Some(ev) = self.parser.next_event() {
            // After the end or an error nothing more may reach the client.
            if self.stopped || self.upstream_error {
                continue;
            }
            let Ok(v) = serde_json::from_slice::<Value>(&ev.data) else {
                self.fail(
                    out,
                    GatewayError::new(
                        ErrorKind::BadUpstreamResponse,
                        "the provider sent a malformed stream event",
                    ),
                );
                continue;
            };
            let kind = event_type(&ev, Some(&v));
            self.on_event(&kind, &v, out);
        }
    }

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::translate_fixtures::{self as fx, check_splits, sse_events};
    use crate::providers::Usage;

    fn translate(input: &[u8], include_usage: bool) -> (Vec<(Option<String>, Value)>, Completion) {
        let (out, c) = check_splits(
            || MessagesToChatStream::new(include_usage, 1_741_570_283, "fb"),
            input,
        );
        (sse_events(&out), c)
    }

    fn data(evs: &[(Option<String>, Value)]) -> Vec<Value> {
        evs.iter()
            .map(|(name, v)| {
                assert!(name.is_none(), "OpenAI streams carry no event names");
                v.clone()
            })
            .collect()
    }

    #[test]
    fn text_stream_with_usage_chunk() {
        let (evs, c) = translate(fx::ANTHROPIC_TEXT, true);
        let d = data(&evs);
        assert_eq!(d.len(), 1 + 4 + 1 + 1 + 1);
        for chunk in &d[..7] {
            assert_eq!(chunk["object"], "chat.completion.chunk");
            assert_eq!(chunk["id"], "chatcmpl-01XFDUDYJgAACzvnptvVoYEL");
            assert_eq!(chunk["model"], "claude-3-5-haiku-20241022");
            assert_eq!(chunk["created"], 1_741_570_283);
        }
        assert_eq!(
            d[0]["choices"][0]["delta"],
            json!({"role": "assistant", "content": ""})
        );
        let text: String = d[1..5]
            .iter()
            .map(|c| {
                c["choices"][0]["delta"]["content"]
                    .as_str()
                    .unwrap_or("")
                    .to_string()
            })
            .collect();
        assert_eq!(text, "Hello! ¿Qué tal? ✓ Done.");
        assert_eq!(d[5]["choices"][0]["finish_reason"], "stop");
        assert_eq!(d[5]["choices"][0]["delta"], json!({}));
        assert_eq!(d[6]["choices"], json!([]));
        assert_eq!(
            d[6]["usage"],
            json!({"prompt_tokens": 2012, "completion_tokens": 9, "total_tokens": 2021,
                "prompt_tokens_details": {"cached_tokens": 1800}})
        );
        assert_eq!(d[7], json!("[DONE]"));
        assert!(c.complete && !c.upstream_error);
        assert_eq!(
            c.usage,
            Some(Usage {
                input: 2012,
                output: 9,
                cached_input: 1800,
                cache_creation_input: 200
            })
        );
        assert_eq!(c.content_bytes, text.len());
    }

    #[test]
    fn no_usage_chunk_unless_asked() {
        let (evs, c) = translate(fx::ANTHROPIC_TEXT, false);
        let d = data(&evs);
        assert!(d.iter().all(|c| c.get("usage").is_none()));
        assert_eq!(d.last(), Some(&json!("[DONE]")));
        assert_eq!(c.usage.map(|u| u.output), Some(9), "still billed");
    }

    #[test]
    fn tool_use_stream() {
        let (evs, c) = translate(fx::ANTHROPIC_TOOL, false);
        let d = data(&evs);
        let deltas: Vec<&Value> = d
            .iter()
            .filter_map(|c| c.pointer("/choices/0/delta"))
            .collect();
        let text: String = deltas
            .iter()
            .filter_map(|x| x["content"].as_str())
            .collect();
        assert_eq!(text, "Okay, let me check the weather.");
        let calls: Vec<&Value> = deltas
            .iter()
            .filter_map(|x| x.pointer("/tool_calls/0"))
            .collect();
        assert_eq!(
            calls[0],
            &json!({"index": 0, "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "type": "function",
                "function": {"name": "get_weather", "arguments": ""}})
        );
        let args: String = calls[1..]
            .iter()
            .map(|c| {
                assert_eq!(c["index"], 0);
                assert!(c.get("id").is_none());
                c["function"]["arguments"]
                    .as_str()
                    .unwrap_or("")
                    .to_string()
            })
            .collect();
        let parsed: Value = serde_json::from_str(&args).unwrap_or_default();
        assert_eq!(
            parsed,
            json!({"location": "San Francisco, CA", "unit": "fahrenheit"})
        );
        assert_eq!(calls.len(), 6, "empty fragment skipped");
        let finish: Vec<&Value> = d
            .iter()
            .filter_map(|c| c.pointer("/choices/0/finish_reason"))
            .filter(|f| !f.is_null())
            .collect();
        assert_eq!(finish, [&json!("tool_calls")]);
        assert!(c.complete);
        assert_eq!(c.usage.map(|u| (u.input, u.output)), Some((472, 89)));
    }

    #[test]
    fn error_event_becomes_openai_error_without_done() {
        let (evs, c) = translate(fx::ANTHROPIC_ERROR, true);
        let d = data(&evs);
        let last = d.last().cloned().unwrap_or_default();
        assert_eq!(last["error"]["message"], "Overloaded");
        assert_eq!(last["error"]["code"], "upstream_unavailable");
        assert!(d.iter().all(|x| x != &json!("[DONE]")));
        assert!(d.iter().all(|x| x.get("usage").is_none()));
        assert!(c.upstream_error && !c.complete);
        assert_eq!(c.usage.map(|u| (u.input, u.output)), Some((20, 1)));
        assert_eq!(c.content_bytes, "Once upon".len());
    }

    #[test]
    fn cut_stream_is_incomplete_with_usage_so_far() {
        let cut = fx::find(fx::ANTHROPIC_TEXT, b"event: message_delta");
        let mut t = MessagesToChatStream::new(true, 0, "fb");
        let (out, c) = fx::run(&mut t, &[&fx::ANTHROPIC_TEXT[..cut + 30]]);
        assert!(!c.complete && !c.upstream_error);
        assert_eq!(
            c.usage.map(|u| (u.input, u.output, u.cached_input)),
            Some((2012, 1, 1800))
        );
        let d = data(&sse_events(&out));
        assert_eq!(d.len(), 5, "role chunk and four text chunks, nothing more");
        assert!(d.iter().all(|x| x
            .pointer("/choices/0/finish_reason")
            .is_some_and(Value::is_null)));
    }

    #[test]
    fn each_event_is_emitted_as_soon_as_it_is_complete() {
        let end = fx::find(fx::ANTHROPIC_TEXT, b"\"Hello!\"}}\n\n") + 12;
        let mut t = MessagesToChatStream::new(false, 0, "fb");
        let mut out = BytesMut::new();
        t.feed(&fx::ANTHROPIC_TEXT[..end - 1], &mut out);
        assert!(!String::from_utf8_lossy(&out).contains("Hello!"));
        t.feed(&fx::ANTHROPIC_TEXT[end - 1..end], &mut out);
        assert!(String::from_utf8_lossy(&out).contains("\"content\":\"Hello!\""));
    }

    #[test]
    fn malformed_event_ends_with_an_error() {
        let s = b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"model\":\"c\",\"usage\":{\"input_tokens\":3,\"output_tokens\":1}}}\n\nevent: content_block_delta\ndata: not-json\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        let (evs, c) = translate(s, false);
        let d = data(&evs);
        assert_eq!(d.len(), 2);
        assert_eq!(d[1]["error"]["code"], "bad_upstream_response");
        assert!(c.upstream_error && !c.complete);
    }
}
