//! OpenAI Chat Completions wire format (also served for in-house vLLM servers,
//! which speak the same dialect).
//!
//! Field names and order follow what api.openai.com sends, because the official
//! `openai` SDK and the gateway's translation code parse this output.

use super::content::{
    random_id, Finish, Generation, Prompt, StreamParts, ToolCall, TOOL_ARG_FRAGMENTS,
};
use bytes::Bytes;
use serde_json::{json, Value};

/// Constant fingerprint: real responses carry one and some clients log it.
const FINGERPRINT: &str = "fp_mock0001";

/// What the mock needs from a chat completion request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatRequest {
    pub model: String,
    pub stream: bool,
    pub include_usage: bool,
    /// `max_completion_tokens`, else `max_tokens`.
    pub max_tokens: Option<u64>,
    /// Function names offered in `tools`.
    pub tool_names: Vec<String>,
    /// `tool_choice: "required"`, which real gpt-4o-mini answers with tool calls under
    /// `finish_reason: "stop"` (tests/fixtures/wire/openai-tools-cached.json); the mock
    /// does the same so the gateway's translation of it is tested end to end.
    pub tool_choice_required: bool,
    pub prompt: Prompt,
}

/// Validates the fields a real server would reject the request without.
pub fn parse_request(body: &Value) -> Result<ChatRequest, String> {
    if !body.is_object() {
        return Err("The request body must be a JSON object.".into());
    }
    let model = match body.get("model") {
        Some(Value::String(m)) => m.clone(),
        _ => return Err("you must provide a model parameter".into()),
    };
    if !body.get("messages").is_some_and(Value::is_array) {
        return Err("Missing required parameter: 'messages'.".into());
    }
    let tool_names = body
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|t| t.pointer("/function/name").and_then(Value::as_str))
        .map(str::to_string)
        .collect();
    Ok(ChatRequest {
        model,
        stream: body.get("stream").and_then(Value::as_bool).unwrap_or(false),
        include_usage: body
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        max_tokens: body
            .get("max_completion_tokens")
            .and_then(Value::as_u64)
            .or_else(|| body.get("max_tokens").and_then(Value::as_u64)),
        tool_names,
        tool_choice_required: body.get("tool_choice").and_then(Value::as_str) == Some("required"),
        prompt: Prompt::from_openai(body),
    })
}

fn finish_reason(req: &ChatRequest, f: Finish) -> &'static str {
    match f {
        Finish::Stop => "stop",
        Finish::Length => "length",
        Finish::ToolCalls if req.tool_choice_required => "stop",
        Finish::ToolCalls => "tool_calls",
    }
}

/// The `usage` object, with the detail objects current OpenAI responses carry.
pub fn usage(g: &Generation) -> Value {
    json!({
        "prompt_tokens": g.prompt_tokens,
        "completion_tokens": g.completion_tokens,
        "total_tokens": u64::from(g.prompt_tokens) + u64::from(g.completion_tokens),
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0
        }
    })
}

/// A non-streamed `chat.completion` object.
pub fn completion(
    req: &ChatRequest,
    g: &Generation,
    with_usage: bool,
    id: &str,
    created: u64,
) -> Bytes {
    let message = match &g.tool {
        Some(tool) => json!({
            "role": "assistant",
            "content": null,
            "tool_calls": [{
                "id": random_id("call_", 24),
                "type": "function",
                "function": {"name": tool.name, "arguments": ToolCall::arguments()}
            }],
            "refusal": null,
            "annotations": []
        }),
        None => {
            json!({"role": "assistant", "content": g.text(), "refusal": null, "annotations": []})
        }
    };
    let mut body = json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": req.model,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": null,
            "finish_reason": finish_reason(req, g.finish)
        }],
    });
    if with_usage {
        body["usage"] = usage(g);
    }
    body["system_fingerprint"] = json!(FINGERPRINT);
    Bytes::from(body.to_string())
}

/// One SSE event, `data: {json}\n\n`.
fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// Builds `chat.completion.chunk` events sharing id, created and model.
struct Chunker<'a> {
    id: &'a str,
    created: u64,
    model: &'a str,
    /// In `include_usage` mode every chunk carries `"usage": null`, as OpenAI does.
    usage_null: bool,
}

impl Chunker<'_> {
    fn base(&self, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": FINGERPRINT,
            "choices": choices,
        })
    }

    fn chunk(&self, delta: Value, finish: Option<&str>) -> Bytes {
        let mut c = self
            .base(json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]));
        if self.usage_null {
            c["usage"] = Value::Null;
        }
        sse(&c)
    }
}

/// The streamed reply: role chunk, one chunk per token (or tool-call header plus
/// argument fragments), finish chunk, optional usage chunk, `[DONE]`.
pub fn stream_parts(
    req: &ChatRequest,
    g: &Generation,
    usage_none: bool,
    id: &str,
    created: u64,
) -> StreamParts {
    let ch = Chunker {
        id,
        created,
        model: &req.model,
        usage_null: req.include_usage,
    };
    let mut parts = StreamParts::default();
    match &g.tool {
        Some(tool) => {
            parts.head.push(ch.chunk(
                json!({
                    "role": "assistant",
                    "content": null,
                    "tool_calls": [{
                        "index": 0,
                        "id": random_id("call_", 24),
                        "type": "function",
                        "function": {"name": tool.name, "arguments": ""}
                    }],
                    "refusal": null
                }),
                None,
            ));
            for frag in TOOL_ARG_FRAGMENTS {
                parts.content.push(ch.chunk(
                    json!({"tool_calls": [{"index": 0, "function": {"arguments": frag}}]}),
                    None,
                ));
            }
        }
        None => {
            parts.head.push(ch.chunk(
                json!({"role": "assistant", "content": "", "refusal": null}),
                None,
            ));
            for piece in &g.pieces {
                parts
                    .content
                    .push(ch.chunk(json!({"content": piece}), None));
            }
        }
    }
    parts
        .tail
        .push(ch.chunk(json!({}), Some(finish_reason(req, g.finish))));
    if req.include_usage && !usage_none {
        let mut last = ch.base(json!([]));
        last["usage"] = usage(g);
        parts.tail.push(sse(&last));
    }
    parts.tail.push(Bytes::from_static(b"data: [DONE]\n\n"));
    parts.error_event = sse(&error_json(500, None));
    parts.garbage_event = Bytes::from_static(b"data: not-json\n\n");
    parts
}

/// `(type, code, message)` of an OpenAI error for `status`, as the real API sends them.
fn error_kind(status: u16) -> (&'static str, Option<&'static str>, &'static str) {
    match status {
        400 => ("invalid_request_error", None, "Invalid request (mock)."),
        401 => (
            "invalid_request_error",
            Some("invalid_api_key"),
            "Incorrect API key provided (mock).",
        ),
        403 => (
            "invalid_request_error",
            Some("permission_denied"),
            "You are not allowed to access this resource (mock).",
        ),
        404 => (
            "invalid_request_error",
            Some("model_not_found"),
            "The model does not exist or you do not have access to it (mock).",
        ),
        413 => (
            "invalid_request_error",
            Some("request_too_large"),
            "Request too large (mock).",
        ),
        429 => (
            "requests",
            Some("rate_limit_exceeded"),
            "Rate limit reached for requests (mock). Please try again in 1s.",
        ),
        500 => (
            "server_error",
            None,
            "The server had an error while processing your request. Sorry about that! (mock)",
        ),
        502 => ("server_error", Some("bad_gateway"), "Bad gateway (mock)."),
        503 => (
            "server_error",
            Some("service_unavailable"),
            "The engine is currently overloaded, please try again later (mock).",
        ),
        504 => ("server_error", Some("timeout"), "Request timed out (mock)."),
        s if s >= 500 => ("server_error", None, "Server error (mock)."),
        _ => ("invalid_request_error", None, "Request failed (mock)."),
    }
}

/// `{"error":{"message","type","param":null,"code"}}`; `message` overrides the default text.
pub fn error_json(status: u16, message: Option<&str>) -> Value {
    let (kind, code, default_message) = error_kind(status);
    json!({"error": {"message": message.unwrap_or(default_message), "type": kind, "param": null, "code": code}})
}

/// Models the mock claims to serve, in `GET /v1/models` list format.
pub fn models_list(created: u64) -> Bytes {
    let data: Vec<Value> = super::MODELS
        .iter()
        .map(|(id, owner)| json!({"id": id, "object": "model", "created": created, "owned_by": owner}))
        .collect();
    Bytes::from(json!({"object": "list", "data": data}).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock::content::{assemble, generate, Step, StreamShape};

    fn req(body: Value) -> ChatRequest {
        match parse_request(&body) {
            Ok(r) => r,
            Err(e) => panic!("parse failed: {e}"),
        }
    }

    fn events(parts: StreamParts) -> Vec<String> {
        assemble(parts, StreamShape::default())
            .into_iter()
            .filter_map(|s| match s {
                Step::Data(b) => Some(String::from_utf8_lossy(&b).into_owned()),
                _ => None,
            })
            .collect()
    }

    fn payload(ev: &str) -> Value {
        let json = ev
            .strip_prefix("data: ")
            .and_then(|s| s.strip_suffix("\n\n"));
        match json.map(serde_json::from_str::<Value>) {
            Some(Ok(v)) => v,
            other => panic!("not an SSE JSON event: {ev:?} ({other:?})"),
        }
    }

    #[test]
    fn validates_requests() {
        assert!(parse_request(&json!({"messages": []})).is_err());
        assert!(parse_request(&json!({"model": "m"})).is_err());
        assert!(parse_request(&json!([1])).is_err());
        let r = req(
            json!({"model": "m", "messages": [], "max_tokens": 3, "max_completion_tokens": 5,
            "stream": true, "stream_options": {"include_usage": true}}),
        );
        assert_eq!(
            (r.max_tokens, r.stream, r.include_usage),
            (Some(5), true, true)
        );
    }

    #[test]
    fn non_stream_shape() {
        let r = req(
            json!({"model": "gpt-x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
        );
        let g = generate(&r.prompt, 16, r.max_tokens, None);
        let v: Value =
            serde_json::from_slice(&completion(&r, &g, true, "chatcmpl-1", 7)).unwrap_or_default();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], "gpt-x");
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        assert_eq!(v["choices"][0]["message"]["refusal"], Value::Null);
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["usage"]["completion_tokens"], 2);
        assert_eq!(v["usage"]["prompt_tokens"], 4);
        assert_eq!(v["usage"]["total_tokens"], 6);
        assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
        let no_usage: Value =
            serde_json::from_slice(&completion(&r, &g, false, "c", 7)).unwrap_or_default();
        assert!(no_usage.get("usage").is_none());
    }

    #[test]
    fn stream_with_usage_is_valid_openai() {
        let r = req(
            json!({"model": "gpt-x", "messages": [{"role": "user", "content": "hi"}],
            "stream": true, "stream_options": {"include_usage": true}}),
        );
        let g = generate(&r.prompt, 3, r.max_tokens, None);
        let evs = events(stream_parts(&r, &g, false, "chatcmpl-1", 7));
        assert_eq!(evs.len(), 1 + 3 + 1 + 1 + 1);
        assert_eq!(evs.last().map(String::as_str), Some("data: [DONE]\n\n"));
        let chunks: Vec<Value> = evs[..evs.len() - 1].iter().map(|e| payload(e)).collect();
        for c in &chunks {
            assert_eq!(c["object"], "chat.completion.chunk");
            assert_eq!(c["id"], "chatcmpl-1");
            assert!(c.as_object().is_some_and(|o| o.contains_key("usage")));
        }
        assert_eq!(
            chunks[0]["choices"][0]["delta"],
            json!({"role": "assistant", "content": "", "refusal": null})
        );
        let text: String = chunks[1..4]
            .iter()
            .map(|c| {
                c["choices"][0]["delta"]["content"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            })
            .collect();
        assert_eq!(text, g.text());
        assert_eq!(chunks[4]["choices"][0]["delta"], json!({}));
        assert_eq!(chunks[4]["choices"][0]["finish_reason"], "stop");
        assert_eq!(chunks[4]["usage"], Value::Null);
        assert_eq!(chunks[5]["choices"], json!([]));
        assert_eq!(chunks[5]["usage"]["completion_tokens"], 3);
    }

    #[test]
    fn stream_without_usage_and_usage_none() {
        let r = req(json!({"model": "m", "messages": [], "stream": true}));
        let g = generate(&r.prompt, 2, None, None);
        let evs = events(stream_parts(&r, &g, false, "c", 1));
        assert_eq!(evs.len(), 1 + 2 + 1 + 1);
        assert!(evs[..4].iter().all(|e| !payload(e)
            .as_object()
            .is_some_and(|o| o.contains_key("usage"))));
        let r2 = req(
            json!({"model": "m", "messages": [], "stream": true, "stream_options": {"include_usage": true}}),
        );
        let evs2 = events(stream_parts(&r2, &g, true, "c", 1));
        assert_eq!(evs2.len(), 1 + 2 + 1 + 1);
    }

    #[test]
    fn tool_call_stream_and_body() {
        let r = req(json!({"model": "m", "messages": [], "stream": true,
            "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]}));
        assert_eq!(r.tool_names, ["get_weather"]);
        let g = generate(&r.prompt, 16, None, Some("get_weather".into()));
        let evs = events(stream_parts(&r, &g, false, "c", 1));
        let first = payload(&evs[0]);
        let call = &first["choices"][0]["delta"]["tool_calls"][0];
        assert_eq!(call["index"], 0);
        assert!(call["id"].as_str().is_some_and(|s| s.starts_with("call_")));
        assert_eq!(call["function"]["name"], "get_weather");
        let args: String = evs[1..3]
            .iter()
            .map(|e| {
                payload(e)["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            })
            .collect();
        assert_eq!(args, "{\"x\":1}");
        assert_eq!(
            payload(&evs[3])["choices"][0]["finish_reason"],
            "tool_calls"
        );
        let v: Value =
            serde_json::from_slice(&completion(&r, &g, true, "c", 1)).unwrap_or_default();
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(
            v["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
            "{\"x\":1}"
        );
        assert_eq!(v["choices"][0]["message"]["content"], Value::Null);
    }

    /// gpt-4o-mini's answer to `tool_choice: "required"`: tool calls, `finish_reason: "stop"`.
    #[test]
    fn required_tool_choice_finishes_with_stop_like_gpt_4o_mini() {
        let r = req(
            json!({"model": "m", "messages": [], "stream": true, "tool_choice": "required",
            "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]}),
        );
        assert!(r.tool_choice_required);
        let g = generate(&r.prompt, 16, None, Some("get_weather".into()));
        let evs = events(stream_parts(&r, &g, false, "c", 1));
        assert_eq!(payload(&evs[3])["choices"][0]["finish_reason"], "stop");
        let v: Value =
            serde_json::from_slice(&completion(&r, &g, true, "c", 1)).unwrap_or_default();
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(
            v["choices"][0]["message"]["tool_calls"][0]["function"]["name"],
            "get_weather"
        );
        let text = generate(&r.prompt, 4, None, None);
        let v: Value =
            serde_json::from_slice(&completion(&r, &text, true, "c", 1)).unwrap_or_default();
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
    }

    #[test]
    fn errors_and_models() {
        let e = error_json(429, None);
        assert_eq!(e["error"]["code"], "rate_limit_exceeded");
        assert_eq!(e["error"]["param"], Value::Null);
        assert_eq!(error_json(500, Some("x"))["error"]["message"], "x");
        assert_eq!(error_json(500, None)["error"]["type"], "server_error");
        let m: Value = serde_json::from_slice(&models_list(1)).unwrap_or_default();
        assert_eq!(m["object"], "list");
        assert!(m["data"].as_array().is_some_and(|d| !d.is_empty()));
    }
}
