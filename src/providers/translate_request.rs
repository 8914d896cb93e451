//! Request bodies between OpenAI Chat Completions and Anthropic Messages.
//!
//! Tenants may reach any model through either endpoint, so a request is rewritten into
//! the provider's format. Everything that has a counterpart is carried over; things
//! that would silently change the answer if dropped (several choices, log
//! probabilities, audio, server-side tools, unknown content types) are refused with a
//! 400 naming the field, while hints with no counterpart and no effect on the content
//! (`seed`, penalties, `top_k`, `thinking`...) are dropped.

use super::anthropic::DEFAULT_MAX_TOKENS;
use crate::error::{ErrorKind, GatewayError};
use serde_json::{json, Map, Value};

type Obj = Map<String, Value>;

fn bad(msg: impl Into<String>) -> GatewayError {
    GatewayError::new(ErrorKind::InvalidRequest, msg)
}

fn text_block(text: &str) -> Value {
    json!({"type": "text", "text": text})
}

/// OpenAI chat request -> Anthropic Messages request for `upstream_model`.
///
/// `max_tokens` is the client's or the model's cap; Anthropic requires one, so
/// [`DEFAULT_MAX_TOKENS`] stands in when both are absent.
pub fn chat_to_messages(
    body: &Obj,
    upstream_model: &str,
    max_tokens: Option<u64>,
) -> Result<Obj, GatewayError> {
    refuse_chat_only_features(body)?;
    let mut out = Obj::new();
    out.insert("model".into(), Value::from(upstream_model));
    let mut system: Vec<String> = Vec::new();
    let mut messages: Vec<(&'static str, Vec<Value>)> = Vec::new();
    let empty = Vec::new();
    let list = body
        .get("messages")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    for (i, m) in list.iter().enumerate() {
        let path = format!("messages[{i}]");
        let content = m.get("content");
        let (role, blocks) = match m.get("role").and_then(Value::as_str).unwrap_or("") {
            // Anthropic has one system prompt: system turns anywhere are hoisted into it.
            "system" | "developer" => {
                let text = plain_text(content, &format!("{path}.content"))?;
                if !text.is_empty() {
                    system.push(text);
                }
                continue;
            }
            "user" => ("user", user_blocks(content, &path)?),
            "assistant" => ("assistant", assistant_blocks(m, &path)?),
            "tool" => ("user", vec![tool_result_block(m, &path)?]),
            other => return Err(bad(format!("'{path}.role': unsupported role '{other}'"))),
        };
        if blocks.is_empty() {
            continue;
        }
        // Anthropic wants user and assistant turns to alternate.
        match messages.last_mut() {
            Some((last, acc)) if *last == role => acc.extend(blocks),
            _ => messages.push((role, blocks)),
        }
    }
    if messages.is_empty() {
        return Err(bad(
            "'messages': at least one non-empty user or assistant message is required",
        ));
    }
    let messages: Vec<Value> = messages
        .into_iter()
        .map(|(role, mut blocks)| {
            // Tool results must open the user turn that answers the tool calls.
            blocks.sort_by_key(|b| b.get("type").and_then(Value::as_str) != Some("tool_result"));
            json!({"role": role, "content": blocks})
        })
        .collect();
    if !system.is_empty() {
        out.insert("system".into(), Value::String(system.join("\n\n")));
    }
    out.insert("messages".into(), Value::Array(messages));
    out.insert(
        "max_tokens".into(),
        Value::from(max_tokens.unwrap_or(DEFAULT_MAX_TOKENS)),
    );
    if let Some(t) = number(body, "temperature")? {
        // OpenAI's range is 0..2, Anthropic's 0..1: the top of one is the top of the other.
        out.insert("temperature".into(), Value::from(t.clamp(0.0, 1.0)));
    }
    if let Some(p) = number(body, "top_p")? {
        out.insert("top_p".into(), Value::from(p));
    }
    match body.get("stop") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s.is_empty() => {}
        Some(Value::String(s)) => {
            out.insert("stop_sequences".into(), json!([s]));
        }
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => {
            if !a.is_empty() {
                out.insert("stop_sequences".into(), Value::Array(a.clone()));
            }
        }
        Some(_) => return Err(bad("'stop' must be a string or an array of strings")),
    }
    if body.get("stream").and_then(Value::as_bool) == Some(true) {
        out.insert("stream".into(), Value::Bool(true));
    }
    if let Some(user) = body.get("user").and_then(Value::as_str) {
        out.insert("metadata".into(), json!({"user_id": user}));
    }
    chat_tools_to_messages(body, &mut out)?;
    Ok(out)
}

fn refuse_chat_only_features(body: &Obj) -> Result<(), GatewayError> {
    if body.get("n").and_then(Value::as_u64).is_some_and(|n| n > 1) {
        return Err(bad("'n': this model's provider returns one choice only"));
    }
    if body.get("logprobs").and_then(Value::as_bool) == Some(true) {
        return Err(bad("'logprobs': not supported by this model's provider"));
    }
    if body.get("top_logprobs").is_some_and(|v| !v.is_null()) {
        return Err(bad(
            "'top_logprobs': not supported by this model's provider",
        ));
    }
    if body.get("audio").is_some_and(|v| !v.is_null()) {
        return Err(bad("'audio': not supported by this model's provider"));
    }
    if body.get("functions").is_some_and(|v| !v.is_null())
        || body.get("function_call").is_some_and(|v| !v.is_null())
    {
        return Err(bad(
            "'functions': the legacy functions API is not supported here; use 'tools'",
        ));
    }
    Ok(())
}

fn number(body: &Obj, key: &str) -> Result<Option<f64>, GatewayError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| bad(format!("'{key}' must be a number"))),
    }
}

/// Text of a system, developer or tool message: a string or text parts.
fn plain_text(content: Option<&Value>, path: &str) -> Result<String, GatewayError> {
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (j, p) in parts.iter().enumerate() {
                match p.get("type").and_then(Value::as_str) {
                    Some("text") => texts.push(p.get("text").and_then(Value::as_str).unwrap_or("")),
                    other => {
                        return Err(bad(format!(
                            "'{path}[{j}].type': only text parts are supported here, not {}",
                            other.unwrap_or("a part without type")
                        )))
                    }
                }
            }
            Ok(texts.join("\n"))
        }
        Some(_) => Err(bad(format!(
            "'{path}' must be a string or an array of parts"
        ))),
    }
}

fn user_blocks(content: Option<&Value>, path: &str) -> Result<Vec<Value>, GatewayError> {
    let parts = match content {
        None | Some(Value::Null) => return Ok(vec![]),
        Some(Value::String(s)) if s.is_empty() => return Ok(vec![]),
        Some(Value::String(s)) => return Ok(vec![text_block(s)]),
        Some(Value::Array(parts)) => parts,
        Some(_) => {
            return Err(bad(format!(
                "'{path}.content' must be a string or an array"
            )))
        }
    };
    let mut blocks = Vec::with_capacity(parts.len());
    for (j, p) in parts.iter().enumerate() {
        let part_path = format!("{path}.content[{j}]");
        match p.get("type").and_then(Value::as_str) {
            Some("text") => {
                let t = p.get("text").and_then(Value::as_str).unwrap_or("");
                if !t.is_empty() {
                    blocks.push(text_block(t));
                }
            }
            Some("image_url") => blocks.push(image_block(p, &part_path)?),
            other => {
                return Err(bad(format!(
                "'{part_path}.type': content type '{}' is not supported by this model's provider",
                other.unwrap_or("")
            )))
            }
        }
    }
    Ok(blocks)
}

/// `image_url` part -> Anthropic image block (base64 for data URLs, else by URL).
fn image_block(p: &Value, path: &str) -> Result<Value, GatewayError> {
    let url = p
        .get("image_url")
        .and_then(|u| u.get("url").or(Some(u)))
        .and_then(Value::as_str)
        .ok_or_else(|| bad(format!("'{path}.image_url.url' must be a string")))?;
    if let Some(rest) = url.strip_prefix("data:") {
        let (media_type, data) = rest.split_once(";base64,").ok_or_else(|| {
            bad(format!(
                "'{path}.image_url.url': only base64 data URLs are supported"
            ))
        })?;
        return Ok(
            json!({"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}),
        );
    }
    if url.starts_with("https://") || url.starts_with("http://") {
        return Ok(json!({"type": "image", "source": {"type": "url", "url": url}}));
    }
    Err(bad(format!(
        "'{path}.image_url.url' must be an http(s) or data URL"
    )))
}

fn assistant_blocks(m: &Value, path: &str) -> Result<Vec<Value>, GatewayError> {
    let mut blocks = Vec::new();
    match m.get("content") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => {
            if !s.is_empty() {
                blocks.push(text_block(s));
            }
        }
        Some(Value::Array(parts)) => {
            for (j, p) in parts.iter().enumerate() {
                let key = match p.get("type").and_then(Value::as_str) {
                    Some("text") => "text",
                    Some("refusal") => "refusal",
                    _ => {
                        return Err(bad(format!(
                            "'{path}.content[{j}].type': assistant content must be text"
                        )))
                    }
                };
                let t = p.get(key).and_then(Value::as_str).unwrap_or("");
                if !t.is_empty() {
                    blocks.push(text_block(t));
                }
            }
        }
        Some(_) => {
            return Err(bad(format!(
                "'{path}.content' must be a string or an array"
            )))
        }
    }
    let calls = match m.get("tool_calls") {
        None | Some(Value::Null) => return Ok(blocks),
        Some(Value::Array(c)) => c,
        Some(_) => return Err(bad(format!("'{path}.tool_calls' must be an array"))),
    };
    for (j, c) in calls.iter().enumerate() {
        let cp = format!("{path}.tool_calls[{j}]");
        let id = c
            .get("id")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("'{cp}.id' must be a string")))?;
        let name = c
            .pointer("/function/name")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("'{cp}.function.name' must be a string")))?;
        let args = c
            .pointer("/function/arguments")
            .and_then(Value::as_str)
            .unwrap_or("");
        let input = if args.trim().is_empty() {
            json!({})
        } else {
            match serde_json::from_str::<Value>(args) {
                Ok(v @ Value::Object(_)) => v,
                _ => {
                    return Err(bad(format!(
                        "'{cp}.function.arguments' must be a JSON object encoded as a string"
                    )))
                }
            }
        };
        blocks.push(json!({"type": "tool_use", "id": id, "name": name, "input": input}));
    }
    Ok(blocks)
}

fn tool_result_block(m: &Value, path: &str) -> Result<Value, GatewayError> {
    let id = m
        .get("tool_call_id")
        .and_then(Value::as_str)
        .ok_or_else(|| bad(format!("'{path}.tool_call_id' must be a string")))?;
    let text = plain_text(m.get("content"), &format!("{path}.content"))?;
    let mut b = json!({"type": "tool_result", "tool_use_id": id});
    if !text.is_empty() {
        b["content"] = Value::String(text);
    }
    Ok(b)
}

fn chat_tools_to_messages(body: &Obj, out: &mut Obj) -> Result<(), GatewayError> {
    let tools = match body.get("tools") {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::Array(t)) => t,
        Some(_) => return Err(bad("'tools' must be an array")),
    };
    if tools.is_empty() {
        return Ok(());
    }
    let mut converted = Vec::with_capacity(tools.len());
    for (i, t) in tools.iter().enumerate() {
        match t.get("type").and_then(Value::as_str) {
            Some("function") | None => {}
            Some(other) => {
                return Err(bad(format!(
                "'tools[{i}].type': tool type '{other}' is not supported by this model's provider"
            )))
            }
        }
        let f = t.get("function").unwrap_or(&Value::Null);
        let name = f
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("'tools[{i}].function.name' must be a string")))?;
        let mut tool = json!({"name": name});
        if let Some(d) = f.get("description").and_then(Value::as_str) {
            tool["description"] = Value::from(d);
        }
        tool["input_schema"] = match f.get("parameters") {
            Some(p @ Value::Object(_)) => p.clone(),
            _ => json!({"type": "object", "properties": {}}),
        };
        converted.push(tool);
    }
    out.insert("tools".into(), Value::Array(converted));
    let mut choice = match body.get("tool_choice") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(match s.as_str() {
            "auto" => json!({"type": "auto"}),
            "none" => json!({"type": "none"}),
            "required" => json!({"type": "any"}),
            other => return Err(bad(format!("'tool_choice': unknown value '{other}'"))),
        }),
        Some(c) => {
            let name = c
                .pointer("/function/name")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("'tool_choice.function.name' must be a string"))?;
            Some(json!({"type": "tool", "name": name}))
        }
    };
    if body.get("parallel_tool_calls").and_then(Value::as_bool) == Some(false) {
        let c = choice.get_or_insert_with(|| json!({"type": "auto"}));
        if c["type"] != "none" {
            c["disable_parallel_tool_use"] = Value::Bool(true);
        }
    }
    if let Some(c) = choice {
        out.insert("tool_choice".into(), c);
    }
    Ok(())
}

/// Anthropic Messages request -> OpenAI chat request for `upstream_model`.
///
/// `openai_native` picks `max_completion_tokens` (OpenAI itself, which refuses
/// `max_tokens` on its reasoning models) over `max_tokens` (what in-house servers
/// understand). Streams always ask for the usage chunk, which is what gets billed and
/// reported in the closing `message_delta`.
pub fn messages_to_chat(
    body: &Obj,
    upstream_model: &str,
    max_tokens: Option<u64>,
    openai_native: bool,
) -> Result<Obj, GatewayError> {
    let mut out = Obj::new();
    out.insert("model".into(), Value::from(upstream_model));
    let mut messages: Vec<Value> = Vec::new();
    match body.get("system") {
        None | Some(Value::Null) => {}
        Some(s) => {
            let text = anthropic_text(s, "system")?;
            if !text.is_empty() {
                messages.push(json!({"role": "system", "content": text}));
            }
        }
    }
    let empty = Vec::new();
    let list = body
        .get("messages")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    for (i, m) in list.iter().enumerate() {
        let path = format!("messages[{i}]");
        match m.get("role").and_then(Value::as_str).unwrap_or("") {
            "user" => user_to_chat(m.get("content"), &path, &mut messages)?,
            "assistant" => messages.push(assistant_to_chat(m.get("content"), &path)?),
            other => return Err(bad(format!("'{path}.role': unsupported role '{other}'"))),
        }
    }
    out.insert("messages".into(), Value::Array(messages));
    if let Some(n) = max_tokens {
        let key = if openai_native {
            "max_completion_tokens"
        } else {
            "max_tokens"
        };
        out.insert(key.into(), Value::from(n));
    }
    for key in ["temperature", "top_p"] {
        if let Some(v) = number(body, key)? {
            out.insert(key.into(), Value::from(v));
        }
    }
    match body.get("stop_sequences") {
        None | Some(Value::Null) => {}
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => {
            if !a.is_empty() {
                out.insert("stop".into(), Value::Array(a.clone()));
            }
        }
        Some(_) => return Err(bad("'stop_sequences' must be an array of strings")),
    }
    if body.get("stream").and_then(Value::as_bool) == Some(true) {
        out.insert("stream".into(), Value::Bool(true));
        out.insert("stream_options".into(), json!({"include_usage": true}));
    }
    if let Some(u) = body
        .get("metadata")
        .and_then(|m| m.get("user_id"))
        .and_then(Value::as_str)
    {
        out.insert("user".into(), Value::from(u));
    }
    messages_tools_to_chat(body, &mut out)?;
    Ok(out)
}

/// Text of a string or of an array of text blocks (`system`, `tool_result.content`).
fn anthropic_text(v: &Value, path: &str) -> Result<String, GatewayError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => {
            let mut texts = Vec::with_capacity(blocks.len());
            for (j, b) in blocks.iter().enumerate() {
                if b.get("type").and_then(Value::as_str) != Some("text") {
                    return Err(bad(format!(
                        "'{path}[{j}].type': only text blocks are supported here by this model's provider"
                    )));
                }
                texts.push(b.get("text").and_then(Value::as_str).unwrap_or(""));
            }
            Ok(texts.join("\n"))
        }
        Value::Null => Ok(String::new()),
        _ => Err(bad(format!(
            "'{path}' must be a string or an array of blocks"
        ))),
    }
}

/// A user turn: its tool results become `tool` messages (which must directly follow
/// the assistant's tool calls), the rest one user message.
fn user_to_chat(
    content: Option<&Value>,
    path: &str,
    out: &mut Vec<Value>,
) -> Result<(), GatewayError> {
    let blocks = match content {
        Some(Value::String(s)) => {
            out.push(json!({"role": "user", "content": s}));
            return Ok(());
        }
        Some(Value::Array(b)) => b,
        _ => {
            return Err(bad(format!(
                "'{path}.content' must be a string or an array"
            )))
        }
    };
    let mut parts = Vec::new();
    for (j, b) in blocks.iter().enumerate() {
        let bp = format!("{path}.content[{j}]");
        match b.get("type").and_then(Value::as_str).unwrap_or("") {
            "text" => parts.push(json!({"type": "text", "text": b.get("text").and_then(Value::as_str).unwrap_or("")})),
            "image" => parts.push(image_to_chat(b, &bp)?),
            "tool_result" => {
                let id = b
                    .get("tool_use_id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad(format!("'{bp}.tool_use_id' must be a string")))?;
                let text = anthropic_text(b.get("content").unwrap_or(&Value::Null), &format!("{bp}.content"))?;
                out.push(json!({"role": "tool", "tool_call_id": id, "content": text}));
            }
            other => {
                return Err(bad(format!(
                    "'{bp}.type': content type '{other}' is not supported by this model's provider"
                )))
            }
        }
    }
    match parts.as_slice() {
        [] => {}
        [one] if one["type"] == "text" => out.push(json!({"role": "user", "content": one["text"]})),
        _ => out.push(json!({"role": "user", "content": parts})),
    }
    Ok(())
}

fn image_to_chat(b: &Value, path: &str) -> Result<Value, GatewayError> {
    let src = b.get("source").unwrap_or(&Value::Null);
    let url = match src.get("type").and_then(Value::as_str) {
        Some("base64") => format!(
            "data:{};base64,{}",
            src.get("media_type")
                .and_then(Value::as_str)
                .unwrap_or("image/png"),
            src.get("data").and_then(Value::as_str).unwrap_or("")
        ),
        Some("url") => src
            .get("url")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        _ => {
            return Err(bad(format!(
                "'{path}.source.type': only base64 and url images are supported"
            )))
        }
    };
    Ok(json!({"type": "image_url", "image_url": {"url": url}}))
}

fn assistant_to_chat(content: Option<&Value>, path: &str) -> Result<Value, GatewayError> {
    let blocks = match content {
        Some(Value::String(s)) => return Ok(json!({"role": "assistant", "content": s})),
        Some(Value::Array(b)) => b,
        _ => {
            return Err(bad(format!(
                "'{path}.content' must be a string or an array"
            )))
        }
    };
    let mut text = String::new();
    let mut calls = Vec::new();
    for (j, b) in blocks.iter().enumerate() {
        match b.get("type").and_then(Value::as_str).unwrap_or("") {
            "text" => text.push_str(b.get("text").and_then(Value::as_str).unwrap_or("")),
            "tool_use" => {
                let id = b.get("id").and_then(Value::as_str).unwrap_or("");
                let name = b.get("name").and_then(Value::as_str).unwrap_or("");
                let args = b.get("input").map_or_else(|| "{}".to_string(), Value::to_string);
                calls.push(json!({"id": id, "type": "function", "function": {"name": name, "arguments": args}}));
            }
            // Reasoning of an earlier turn has no place in a chat request.
            "thinking" | "redacted_thinking" => {}
            other => {
                return Err(bad(format!(
                    "'{path}.content[{j}].type': content type '{other}' is not supported by this model's provider"
                )))
            }
        }
    }
    let mut m = json!({"role": "assistant"});
    m["content"] = if text.is_empty() && !calls.is_empty() {
        Value::Null
    } else {
        Value::String(text)
    };
    if !calls.is_empty() {
        m["tool_calls"] = Value::Array(calls);
    }
    Ok(m)
}

fn messages_tools_to_chat(body: &Obj, out: &mut Obj) -> Result<(), GatewayError> {
    let tools = match body.get("tools") {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::Array(t)) => t,
        Some(_) => return Err(bad("'tools' must be an array")),
    };
    if tools.is_empty() {
        return Ok(());
    }
    let mut converted = Vec::with_capacity(tools.len());
    for (i, t) in tools.iter().enumerate() {
        if let Some(ty) = t.get("type").and_then(Value::as_str) {
            if ty != "custom" {
                return Err(bad(format!(
                    "'tools[{i}].type': server tool '{ty}' is not supported by this model's provider"
                )));
            }
        }
        let name = t
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("'tools[{i}].name' must be a string")))?;
        let mut f = json!({"name": name});
        if let Some(d) = t.get("description").and_then(Value::as_str) {
            f["description"] = Value::from(d);
        }
        f["parameters"] = match t.get("input_schema") {
            Some(s @ Value::Object(_)) => s.clone(),
            _ => json!({"type": "object", "properties": {}}),
        };
        converted.push(json!({"type": "function", "function": f}));
    }
    out.insert("tools".into(), Value::Array(converted));
    let Some(c) = body.get("tool_choice").filter(|c| !c.is_null()) else {
        return Ok(());
    };
    let choice = match c.get("type").and_then(Value::as_str) {
        Some("auto") => json!("auto"),
        Some("any") => json!("required"),
        Some("none") => json!("none"),
        Some("tool") => {
            let name = c
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("'tool_choice.name' must be a string"))?;
            json!({"type": "function", "function": {"name": name}})
        }
        _ => return Err(bad("'tool_choice.type' must be auto, any, tool or none")),
    };
    out.insert("tool_choice".into(), choice);
    if c.get("disable_parallel_tool_use").and_then(Value::as_bool) == Some(true) {
        out.insert("parallel_tool_calls".into(), Value::Bool(false));
    }
    Ok(())
}

#[cfg(test)]
#[path = "translate_request_tests.rs"]
mod tests;
