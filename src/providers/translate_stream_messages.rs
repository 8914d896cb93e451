//! OpenAI `chat.completion.chunk` events -> Anthropic's streamed message events.
//!
//! Serves `/v1/messages` from an OpenAI-kind model, producing the event sequence the
//! official SDKs expect: `message_start` on the first chunk (input tokens are not known
//! yet, so 0), `content_block_start`/`_delta`/`_stop` for text and for each tool call,
//! then one `message_delta` with the stop reason and the full usage (Anthropic lets it
//! carry `input_tokens` too) once both the finish chunk and the usage chunk have
//! arrived, and `message_stop` on `[DONE]`. An in-stream OpenAI error becomes an
//! `event: error` and the stream gets no `message_stop`.

use super::openai::parse_usage;
use super::sse::SseParser;
use super::translate_error::from_openai;
use super::translate_response::{anthropic_usage_json, message_id, message_stop_reason};
use super::{Completion, Translate, Usage};
use crate::error::{ApiFormat, ErrorKind, GatewayError};
use bytes::BytesMut;
use serde_json::{json, Value};

/// The content block open on the Anthropic side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    None,
    Text(u32),
    /// OpenAI tool-call index and Anthropic block index.
    Tool(u64, u32),
}

#[derive(Debug)]
pub struct ChatToMessagesStream {
    parser: SseParser,
    fallback_model: String,
    started: bool,
    block: Block,
    next_block: u32,
    /// The upstream's `finish_reason`, once it has come.
    finish_reason: Option<String>,
    /// A `tool_use` block was opened: the message then stops for `tool_use`
    /// whatever the finish reason said (see `message_stop_reason`).
    saw_tool: bool,
    usage: Option<Usage>,
    delta_sent: bool,
    done: bool,
    upstream_error: bool,
    content_bytes: usize,
}

impl ChatToMessagesStream {
    /// `fallback_model` names the model when the chunks do not.
    pub fn new(fallback_model: &str) -> Self {
        ChatToMessagesStream {
            parser: SseParser::new(),
            fallback_model: fallback_model.to_string(),
            started: false,
            block: Block::None,
            next_block: 0,
            finish_reason: None,
            saw_tool: false,
            usage: None,
            delta_sent: false,
            done: false,
            upstream_error: false,
            content_bytes: 0,
        }
    }

    fn emit(out: &mut BytesMut, name: &str, v: &Value) {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"\ndata: ");
        out.extend_from_slice(v.to_string().as_bytes());
        out.extend_from_slice(b"\n\n");
    }

    fn start(&mut self, out: &mut BytesMut, chunk: Option<&Value>) {
        if self.started {
            return;
        }
        self.started = true;
        let id = chunk
            .and_then(|c| c.get("id"))
            .and_then(Value::as_str)
            .map_or_else(|| "msg_gateway".to_string(), message_id);
        let model = chunk
            .and_then(|c| c.get("model"))
            .and_then(Value::as_str)
            .unwrap_or(&self.fallback_model);
        let msg = json!({
            "id": id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": null,
            "stop_sequence": null,
            "usage": anthropic_usage_json(self.usage.unwrap_or_default()),
        });
        Self::emit(
            out,
            "message_start",
            &json!({"type": "message_start", "message": msg}),
        );
    }

    fn close_block(&mut self, out: &mut BytesMut) {
        let index = match self.block {
            Block::None => return,
            Block::Text(i) | Block::Tool(_, i) => i,
        };
        self.block = Block::None;
        Self::emit(
            out,
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": index}),
        );
    }

    fn open_block(&mut self, out: &mut BytesMut, block: Value) -> u32 {
        self.close_block(out);
        let index = self.next_block;
        self.next_block += 1;
        Self::emit(
            out,
            "content_block_start",
            &json!({"type": "content_block_start", "index": index, "content_block": block}),
        );
        index
    }

    fn text(&mut self, out: &mut BytesMut, text: &str) {
        let index = match self.block {
            Block::Text(i) => i,
            _ => {
                let i = self.open_block(out, json!({"type": "text", "text": ""}));
                self.block = Block::Text(i);
                i
            }
        };
        self.content_bytes += text.len();
        let d = json!({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}});
        Self::emit(out, "content_block_delta", &d);
    }

    fn tool_call(&mut self, out: &mut BytesMut, call: &Value) {
        let oai_index = call.get("index").and_then(Value::as_u64).unwrap_or(0);
        let index = match self.block {
            Block::Tool(o, i) if o == oai_index => i,
            _ => {
                let id = call
                    .get("id")
                    .and_then(Value::as_str)
                    .map_or_else(|| format!("toolu_gateway_{oai_index}"), str::to_string);
                let name = call
                    .pointer("/function/name")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let i = self.open_block(
                    out,
                    json!({"type": "tool_use", "id": id, "name": name, "input": {}}),
                );
                self.block = Block::Tool(oai_index, i);
                self.saw_tool = true;
                i
            }
        };
        let args = call
            .pointer("/function/arguments")
            .and_then(Value::as_str)
            .unwrap_or("");
        if !args.is_empty() {
            self.content_bytes += args.len();
            let d = json!({"type": "content_block_delta", "index": index,
                "delta": {"type": "input_json_delta", "partial_json": args}});
            Self::emit(out, "content_block_delta", &d);
        }
    }

    /// The closing `message_delta`, once: it needs the stop reason and, when the
    /// provider reports it, the usage (zeros when it never does).
    fn message_delta(&mut self, out: &mut BytesMut) {
        if self.delta_sent {
            return;
        }
        self.delta_sent = true;
        self.close_block(out);
        let d = json!({
            "type": "message_delta",
            "delta": {"stop_reason": message_stop_reason(self.finish_reason.as_deref().unwrap_or("stop"), self.saw_tool), "stop_sequence": null},
            "usage": anthropic_usage_json(self.usage.unwrap_or_default()),
        });
        Self::emit(out, "message_delta", &d);
    }

    fn fail(&mut self, out: &mut BytesMut, e: GatewayError) {
        self.upstream_error = true;
        out.extend_from_slice(&e.sse_event(ApiFormat::Anthropic));
    }

    fn on_chunk(&mut self, v: &Value, out: &mut BytesMut) {
        if v.get("error").is_some_and(|e| !e.is_null()) {
            self.fail(out, from_openai(v, 0));
            return;
        }
        if let Some(u) = v.get("usage").and_then(parse_usage) {
            self.usage = Some(u);
        }
        self.start(out, Some(v));
        let choices = v.get("choices").and_then(Value::as_array);
        // Only the first choice: an Anthropic message has one.
        let choice = choices
            .into_iter()
            .flatten()
            .find(|c| c.get("index").and_then(Value::as_u64).unwrap_or(0) == 0);
        if let Some(c) = choice {
            let delta = c.get("delta").unwrap_or(&Value::Null);
            for key in ["content", "refusal"] {
                if let Some(t) = delta
                    .get(key)
                    .and_then(Value::as_str)
                    .filter(|t| !t.is_empty())
                {
                    self.text(out, t);
                }
            }
            for call in delta
                .get("tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                self.tool_call(out, call);
            }
            if let Some(f) = c.get("finish_reason").and_then(Value::as_str) {
                self.finish_reason = Some(f.to_string());
                self.close_block(out);
            }
        }
        if self.finish_reason.is_some() && self.usage.is_some() {
            self.message_delta(out);
        }
    }
}

impl Translate for ChatToMessagesStream {
    fn feed(&mut self, chunk: &[u8], out: &mut BytesMut) {
        self.parser.push(chunk);
        while let Some(ev) = self.parser.next_event() {
            // After the end or an error nothing more may reach the client.
            if self.done || self.upstream_error {
                continue;
            }
            if &ev.data[..] == b"[DONE]" {
                self.start(out, None);
                self.message_delta(out);
                Self::emit(out, "message_stop", &json!({"type": "message_stop"}));
                self.done = true;
                continue;
            }
            match serde_json::from_slice::<Value>(&ev.data) {
                Ok(v) => self.on_chunk(&v, out),
                Err(_) => self.fail(
                    out,
                    GatewayError::new(
                        ErrorKind::BadUpstreamResponse,
                        "the provider sent a malformed stream event",
                    ),
                ),
            }
        }
    }

    fn finish(&mut self, _out: &mut BytesMut) -> Completion {
        self.snapshot()
    }

    fn snapshot(&self) -> Completion {
        Completion {
            usage: self.usage,
            complete: self.done && !self.upstream_error,
            upstream_error: self.upstream_error,
            content_bytes: self.content_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::translate_fixtures::{self as fx, check_splits, sse_events};

    fn translate(input: &[u8]) -> (Vec<(String, Value)>, Completion) {
        let (out, c) = check_splits(|| ChatToMessagesStream::new("fb"), input);
        let evs = sse_events(&out)
            .into_iter()
            .map(|(n, v)| (n.unwrap_or_else(|| panic!("Anthropic events are named")), v))
            .collect();
        (evs, c)
    }

    fn names(evs: &[(String, Value)]) -> Vec<&str> {
        evs.iter().map(|(n, _)| n.as_str()).collect()
    }

    #[test]
    fn text_stream_with_cached_usage() {
        let (evs, c) = translate(fx::OPENAI_TEXT);
        assert_eq!(
            names(&evs),
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_delta",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        let m = &evs[0].1["message"];
        assert_eq!(m["id"], "msg_B9MHDbslfkBeAs8l4bebGdFOJ6PeG");
        assert_eq!(m["model"], "gpt-4o-mini-2024-07-18");
        assert_eq!(m["content"], json!([]));
        assert_eq!(m["usage"]["input_tokens"], 0);
        assert_eq!(
            evs[1].1["content_block"],
            json!({"type": "text", "text": ""})
        );
        let text: String = evs[2..7]
            .iter()
            .map(|(_, v)| v["delta"]["text"].as_str().unwrap_or("").to_string())
            .collect();
        assert_eq!(text, "Hello! ¿Qué tal? ✓");
        assert!(evs[2..8].iter().all(|(_, v)| v["index"] == 0));
        assert_eq!(
            evs[8].1,
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                "usage": {"input_tokens": 86, "cache_creation_input_tokens": 0,
                    "cache_read_input_tokens": 1920, "output_tokens": 300}})
        );
        assert!(c.complete && !c.upstream_error);
        assert_eq!(
            c.usage,
            Some(Usage {
                input: 2006,
                output: 300,
                cached_input: 1920,
                cache_creation_input: 0
            })
        );
        assert_eq!(c.content_bytes, text.len());
    }

    #[test]
    fn parallel_tool_calls_become_tool_use_blocks() {
        let (evs, c) = translate(fx::OPENAI_TOOL);
        assert_eq!(
            names(&evs),
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_delta",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert_eq!(
            evs[1].1["content_block"],
            json!({"type": "tool_use", "id": "call_DdmO9pD3xa9XTPNJ32zg2hcA", "name": "get_weather", "input": {}})
        );
        let args = |r: std::ops::Range<usize>, index: u64| -> Value {
            let s: String = evs[r]
                .iter()
                .map(|(_, v)| {
                    assert_eq!(v["index"], index);
                    assert_eq!(v["delta"]["type"], "input_json_delta");
                    v["delta"]["partial_json"]
                        .as_str()
                        .unwrap_or("")
                        .to_string()
                })
                .collect();
            serde_json::from_str(&s).unwrap_or_default()
        };
        assert_eq!(args(2..7, 0), json!({"location": "Paris"}));
        assert_eq!(evs[8].1["index"], 1);
        assert_eq!(evs[8].1["content_block"]["name"], "get_time");
        assert_eq!(evs[8].1["content_block"]["id"], "call_ABCd3f");
        assert_eq!(args(9..11, 1), json!({"tz": "CET"}));
        assert_eq!(evs[12].1["delta"]["stop_reason"], "tool_use");
        assert_eq!(evs[12].1["usage"]["output_tokens"], 40);
        assert!(c.complete);
    }

    /// The recorded gpt-4o tool stream, as sent (`finish_reason: "tool_calls"`) and with
    /// only its finish reason made `"stop"`, as gpt-4o-mini sends under `tool_choice:
    /// "required"`: both must end with `stop_reason: "tool_use"`, cut anywhere.
    #[test]
    fn recorded_tool_stream_stops_for_tool_use_whatever_the_finish_reason() {
        let recorded = fx::WIRE_OPENAI_TOOLS_STREAM;
        let from = br#""finish_reason":"tool_calls""#;
        let at = fx::find(recorded, from);
        let mut stop = recorded[..at].to_vec();
        stop.extend_from_slice(br#""finish_reason":"stop""#);
        stop.extend_from_slice(&recorded[at + from.len()..]);
        for input in [recorded, &stop[..]] {
            let (evs, c) = translate(input);
            assert!(c.complete && !c.upstream_error);
            let starts: Vec<&Value> = evs
                .iter()
                .filter(|(n, _)| n == "content_block_start")
                .map(|(_, v)| &v["content_block"])
                .collect();
            assert_eq!(starts.len(), 2);
            assert!(starts.iter().all(|b| b["type"] == "tool_use"));
            assert_eq!(starts[0]["name"], "GetWeatherArgs");
            assert_eq!(starts[1]["name"], "get_stock_price");
            let n = names(&evs);
            assert_eq!(&n[n.len() - 2..], ["message_delta", "message_stop"]);
            let delta = &evs[evs.len() - 2].1;
            assert_eq!(delta["delta"]["stop_reason"], "tool_use");
            assert_eq!(delta["usage"]["input_tokens"], 149);
            assert_eq!(delta["usage"]["output_tokens"], 60);
        }
    }

    #[test]
    fn error_chunk_becomes_error_event_without_message_stop() {
        let (evs, c) = translate(fx::OPENAI_ERROR);
        let n = names(&evs);
        assert_eq!(n.last(), Some(&"error"));
        assert!(!n.contains(&"message_stop") && !n.contains(&"message_delta"));
        let (_, e) = &evs[evs.len() - 1];
        assert_eq!(e["type"], "error");
        assert_eq!(e["error"]["type"], "api_error");
        assert!(e["error"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("The server had an error")));
        assert!(c.upstream_error && !c.complete);
        assert_eq!(c.usage, None);
        assert_eq!(c.content_bytes, 4);
    }

    #[test]
    fn provider_without_usage_still_ends_properly() {
        let (evs, c) = translate(fx::OPENAI_NO_USAGE);
        let n = names(&evs);
        assert_eq!(
            &n[n.len() - 3..],
            ["content_block_stop", "message_delta", "message_stop"]
        );
        let d = &evs[evs.len() - 2].1;
        assert_eq!(d["delta"]["stop_reason"], "max_tokens");
        assert_eq!(d["usage"]["output_tokens"], 0);
        assert_eq!(evs[0].1["message"]["model"], "llama-70b");
        assert!(c.complete);
        assert_eq!(c.usage, None);
        assert_eq!(c.content_bytes, "Hi there".len());
    }

    #[test]
    fn cut_stream_is_incomplete_without_terminal_events() {
        let cut = fx::find(fx::OPENAI_TEXT, b"\"finish_reason\":\"stop\"");
        let mut t = ChatToMessagesStream::new("fb");
        let (out, c) = fx::run(&mut t, &[&fx::OPENAI_TEXT[..cut]]);
        assert!(!c.complete && !c.upstream_error);
        assert_eq!(c.usage, None);
        let evs = sse_events(&out);
        assert!(evs
            .iter()
            .all(|(n, _)| !matches!(n.as_deref(), Some("message_delta" | "message_stop"))));
        assert_eq!(evs.len(), 7);

        // after the usage chunk but before [DONE]: usage known, still incomplete
        let cut = fx::find(fx::OPENAI_TEXT, b"data: [DONE]");
        let mut t = ChatToMessagesStream::new("fb");
        let (out, c) = fx::run(&mut t, &[&fx::OPENAI_TEXT[..cut]]);
        assert!(!c.complete);
        assert_eq!(c.usage.map(|u| u.output), Some(300));
        assert!(sse_events(&out)
            .iter()
            .any(|(n, _)| n.as_deref() == Some("message_delta")));
    }

    #[test]
    fn text_then_tool_in_one_message() {
        let s = b"data: {\"id\":\"chatcmpl-1\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Sure.\"}}]}\n\n\
data: {\"id\":\"chatcmpl-1\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"call_9\",\"type\":\"function\",\"function\":{\"name\":\"f\",\"arguments\":\"{}\"}}]}}]}\n\n\
data: {\"id\":\"chatcmpl-1\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"tool_calls\"}],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":3,\"total_tokens\":8}}\n\n\
data: [DONE]\n\n";
        let (evs, c) = translate(s);
        assert_eq!(
            names(&evs),
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert_eq!(evs[4].1["index"], 1);
        assert_eq!(evs[7].1["usage"]["input_tokens"], 5);
        assert_eq!(c.usage.map(|u| (u.input, u.output)), Some((5, 3)));
    }
}
