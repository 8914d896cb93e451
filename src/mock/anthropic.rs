//! Anthropic Messages wire format.
//!
//! Event names, order and fields follow api.anthropic.com, because the official
//! `anthropic` SDK and the gateway's Anthropic<->OpenAI translation parse this.

use super::content::{random_id, Finish, Generation, Prompt, StreamParts, TOOL_ARG_FRAGMENTS};
use bytes::Bytes;
use serde_json::{json, Value};

/// What the mock needs from a Messages request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessagesRequest {
    pub model: String,
    pub stream: bool,
    pub max_tokens: u64,
    /// Tool names offered in `tools`.
    pub tool_names: Vec<String>,
    pub prompt: Prompt,
}

/// Validates like the real API: `model`, `messages` and `max_tokens` are required.
pub fn parse_request(body: &Value) -> Result<MessagesRequest, String> {
    if !body.is_object() {
        return Err("The request body must be a JSON object.".into());
    }
    let model = match body.get("model") {
        Some(Value::String(m)) => m.clone(),
        _ => return Err("model: Field required".into()),
    };
    if !body.get("messages").is_some_and(Value::is_array) {
        return Err("messages: Field required".into());
    }
    let Some(max_tokens) = body.get("max_tokens").and_then(Value::as_u64) else {
        return Err("max_tokens: Field required".into());
    };
    let tool_names = body
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|t| t.get("name").and_then(Value::as_str))
        .map(str::to_string)
        .collect();
    Ok(MessagesRequest {
        model,
        stream: body.get("stream").and_then(Value::as_bool).unwrap_or(false),
        max_tokens,
        tool_names,
        prompt: Prompt::from_anthropic(body),
    })
}

fn stop_reason(f: Finish) -> &'static str {
    match f {
        Finish::Stop => "end_turn",
        Finish::Length => "max_tokens",
        Finish::ToolCalls => "tool_use",
    }
}

fn usage(input: u32, output: u32) -> Value {
    json!({
        "input_tokens": input,
        "output_tokens": output,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0
    })
}

/// A non-streamed `message` object.
pub fn message(req: &MessagesRequest, g: &Generation, with_usage: bool, id: &str) -> Bytes {
    let content = match &g.tool {
        Some(tool) => json!([{
            "type": "tool_use",
            "id": random_id("toolu_01", 22),
            "name": tool.name,
            "input": {"x": 1}
        }]),
        None => json!([{"type": "text", "text": g.text()}]),
    };
    let mut body = json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": req.model,
        "content": content,
        "stop_reason": stop_reason(g.finish),
        "stop_sequence": null,
    });
    if with_usage {
        body["usage"] = usage(g.prompt_tokens, g.completion_tokens);
    }
    Bytes::from(body.to_string())
}

/// One SSE event, `event: NAME\ndata: {json}\n\n`.
fn event(name: &str, v: &Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {v}\n\n"))
}

/// The streamed reply: message_start, content_block_start, ping, one
/// content_block_delta per token (or input_json_delta per argument fragment),
/// content_block_stop, message_delta, message_stop.
pub fn stream_parts(
    req: &MessagesRequest,
    g: &Generation,
    usage_none: bool,
    id: &str,
) -> StreamParts {
    let mut parts = StreamParts::default();
    let mut msg = json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": req.model,
        "content": [],
        "stop_reason": null,
        "stop_sequence": null,
    });
    if !usage_none {
        msg["usage"] = usage(g.prompt_tokens, 1);
    }
    parts.head.push(event(
        "message_start",
        &json!({"type": "message_start", "message": msg}),
    ));
    let block = match &g.tool {
        Some(tool) => {
            json!({"type": "tool_use", "id": random_id("toolu_01", 22), "name": tool.name, "input": {}})
        }
        None => json!({"type": "text", "text": ""}),
    };
    parts.head.push(event(
        "content_block_start",
        &json!({"type": "content_block_start", "index": 0, "content_block": block}),
    ));
    parts.head.push(event("ping", &json!({"type": "ping"})));
    let deltas: Vec<Value> = match &g.tool {
        Some(_) => TOOL_ARG_FRAGMENTS
            .iter()
            .map(|f| json!({"type": "input_json_delta", "partial_json": f}))
            .collect(),
        None => g
            .pieces
            .iter()
            .map(|p| json!({"type": "text_delta", "text": p}))
            .collect(),
    };
    for delta in deltas {
        parts.content.push(event(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": 0, "delta": delta}),
        ));
    }
    parts.tail.push(event(
        "content_block_stop",
        &json!({"type": "content_block_stop", "index": 0}),
    ));
    let mut delta = json!({
        "type": "message_delta",
        "delta": {"stop_reason": stop_reason(g.finish), "stop_sequence": null},
    });
    if !usage_none {
        delta["usage"] = json!({"output_tokens": g.completion_tokens});
    }
    parts.tail.push(event("message_delta", &delta));
    parts
        .tail
        .push(event("message_stop", &json!({"type": "message_stop"})));
    parts.error_event = event("error", &error_json(529, Some("Overloaded")));
    parts.garbage_event = Bytes::from_static(b"data: not-json\n\n");
    parts
}

/// Error `type` and default message for `status`, as the real API uses them.
fn error_kind(status: u16) -> (&'static str, &'static str) {
    match status {
        400 => ("invalid_request_error", "Invalid request (mock)."),
        401 => ("authentication_error", "invalid x-api-key (mock)"),
        403 => (
            "permission_error",
            "Your API key does not have permission to use the specified resource (mock).",
        ),
        404 => (
            "not_found_error",
            "The requested resource could not be found (mock).",
        ),
        413 => (
            "request_too_large",
            "Request exceeds the maximum allowed number of bytes (mock).",
        ),
        429 => (
            "rate_limit_error",
            "Number of requests has exceeded your rate limit (mock).",
        ),
        529 => ("overloaded_error", "Overloaded"),
        s if s >= 500 => ("api_error", "Internal server error (mock)."),
        _ => ("invalid_request_error", "Request failed (mock)."),
    }
}

/// `{"type":"error","error":{"type","message"}}`; `message` overrides the default text.
pub fn error_json(status: u16, message: Option<&str>) -> Value {
    let (kind, default_message) = error_kind(status);
    json!({"type": "error", "error": {"type": kind, "message": message.unwrap_or(default_message)}})
}

/// `GET /v1/models` in Anthropic's list format (sent when `anthropic-version` is present).
pub fn models_list() -> Bytes {
    let data: Vec<Value> = super::MODELS
        .iter()
        .map(|(id, _)| json!({"type": "model", "id": id, "display_name": id, "created_at": "2024-10-22T00:00:00Z"}))
        .collect();
    let first = super::MODELS.first().map(|m| m.0);
    let last = super::MODELS.last().map(|m| m.0);
    Bytes::from(
        json!({"data": data, "has_more": false, "first_id": first, "last_id": last}).to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock::content::{assemble, generate, Step, StreamShape};
    use crate::mock::directives::Fault;

    fn req(body: Value) -> MessagesRequest {
        match parse_request(&body) {
            Ok(r) => r,
            Err(e) => panic!("parse failed: {e}"),
        }
    }

    /// Splits `event: X\ndata: Y\n\n` into (X, parsed Y), checking the framing.
    fn parse_event(ev: &str) -> (String, Value) {
        let body = ev
            .strip_suffix("\n\n")
            .unwrap_or_else(|| panic!("unterminated {ev:?}"));
        let (name_line, data_line) = body
            .split_once('\n')
            .unwrap_or_else(|| panic!("one line {ev:?}"));
        let name = name_line
            .strip_prefix("event: ")
            .unwrap_or_else(|| panic!("no event: {ev:?}"));
        let data = data_line
            .strip_prefix("data: ")
            .unwrap_or_else(|| panic!("no data: {ev:?}"));
        let v: Value =
            serde_json::from_str(data).unwrap_or_else(|e| panic!("bad json {e}: {data}"));
        assert_eq!(v["type"], name, "event name must match data.type");
        (name.to_string(), v)
    }

    fn events(parts: StreamParts, fault: Option<Fault>) -> Vec<(String, Value)> {
        assemble(
            parts,
            StreamShape {
                fault,
                ..Default::default()
            },
        )
        .into_iter()
        .filter_map(|s| match s {
            Step::Data(b) => Some(parse_event(&String::from_utf8_lossy(&b))),
            _ => None,
        })
        .collect()
    }

    #[test]
    fn requires_max_tokens() {
        assert!(parse_request(&json!({"model": "c", "messages": []})).is_err());
        assert!(parse_request(&json!({"max_tokens": 5, "messages": []})).is_err());
        let r = req(
            json!({"model": "c", "max_tokens": 5, "messages": [], "system": "s", "stream": true}),
        );
        assert_eq!((r.max_tokens, r.stream), (5, true));
        assert_eq!(r.prompt.texts, ["s"]);
    }

    #[test]
    fn non_stream_shape() {
        let r = req(
            json!({"model": "claude-x", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}),
        );
        let g = generate(&r.prompt, 16, Some(r.max_tokens), None);
        let v: Value = serde_json::from_slice(&message(&r, &g, true, "msg_1")).unwrap_or_default();
        assert_eq!(v["type"], "message");
        assert_eq!(v["model"], "claude-x");
        assert_eq!(v["content"][0]["type"], "text");
        assert_eq!(v["content"][0]["text"], g.text());
        assert_eq!(v["stop_reason"], "max_tokens");
        assert_eq!(v["stop_sequence"], Value::Null);
        assert_eq!(
            v["usage"],
            json!({"input_tokens": 4, "output_tokens": 2,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0})
        );
    }

    #[test]
    fn stream_sequence_in_order() {
        let r = req(
            json!({"model": "claude-x", "max_tokens": 100, "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
        );
        let g = generate(&r.prompt, 3, Some(r.max_tokens), None);
        let evs = events(stream_parts(&r, &g, false, "msg_1"), None);
        let names: Vec<&str> = evs.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "ping",
                "content_block_delta",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert_eq!(evs[0].1["message"]["content"], json!([]));
        assert_eq!(evs[0].1["message"]["usage"]["output_tokens"], 1);
        assert_eq!(evs[0].1["message"]["usage"]["input_tokens"], 4);
        assert_eq!(
            evs[1].1["content_block"],
            json!({"type": "text", "text": ""})
        );
        let text: String = evs[3..6]
            .iter()
            .map(|(_, v)| v["delta"]["text"].as_str().unwrap_or_default().to_string())
            .collect();
        assert_eq!(text, g.text());
        assert_eq!(evs[7].1["delta"]["stop_reason"], "end_turn");
        assert_eq!(evs[7].1["usage"]["output_tokens"], 3);
    }

    #[test]
    fn tool_use_and_midstream_error() {
        let r = req(json!({"model": "c", "max_tokens": 100, "messages": [],
            "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}]}));
        assert_eq!(r.tool_names, ["get_weather"]);
        let g = generate(
            &r.prompt,
            16,
            Some(r.max_tokens),
            Some("get_weather".into()),
        );
        let evs = events(stream_parts(&r, &g, false, "msg_1"), None);
        assert_eq!(evs[1].1["content_block"]["type"], "tool_use");
        assert_eq!(evs[1].1["content_block"]["name"], "get_weather");
        assert!(evs[1].1["content_block"]["id"]
            .as_str()
            .is_some_and(|s| s.starts_with("toolu_")));
        let json: String = evs[3..5]
            .iter()
            .map(|(_, v)| {
                v["delta"]["partial_json"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            })
            .collect();
        assert_eq!(json, "{\"x\":1}");
        assert_eq!(evs[6].1["delta"]["stop_reason"], "tool_use");
        let v: Value = serde_json::from_slice(&message(&r, &g, true, "m")).unwrap_or_default();
        assert_eq!(v["content"][0]["input"], json!({"x": 1}));

        let text = generate(&r.prompt, 4, None, None);
        let mid = events(
            stream_parts(&r, &text, false, "m"),
            Some(Fault::MidstreamError),
        );
        let last = mid
            .last()
            .map(|(n, v)| (n.clone(), v["error"]["type"].clone()));
        assert_eq!(last, Some(("error".to_string(), json!("overloaded_error"))));
        assert_eq!(
            mid.iter()
                .filter(|(n, _)| n == "content_block_delta")
                .count(),
            2
        );
    }

    #[test]
    fn usage_none_and_errors() {
        let r = req(json!({"model": "c", "max_tokens": 100, "messages": []}));
        let g = generate(&r.prompt, 2, None, None);
        let evs = events(stream_parts(&r, &g, true, "m"), None);
        assert!(evs
            .iter()
            .all(|(_, v)| v.get("usage").is_none() && v["message"].get("usage").is_none()));
        assert_eq!(error_json(429, None)["error"]["type"], "rate_limit_error");
        assert_eq!(error_json(529, None)["error"]["type"], "overloaded_error");
        assert_eq!(error_json(500, None)["type"], "error");
        let m: Value = serde_json::from_slice(&models_list()).unwrap_or_default();
        assert_eq!(m["has_more"], false);
    }
}
