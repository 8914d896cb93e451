//! The assembler on recorded provider streams, cut at every byte boundary.
//!
//! The stream and non-stream recordings in `tests/fixtures/wire/` are not of the same
//! calls, so each assembled stream is checked twice: against the body derived by hand
//! from that stream (every value read off its events), and for its JSON shape (keys,
//! their order at every level, value types) against the provider's own non-streamed
//! body of the same kind. Where the two recordings come from different API versions,
//! the members one has and the other cannot have are named, with the reason.

use super::*;
use crate::providers::translate_fixtures::{self as fx, check_splits, find, run};
use crate::providers::translate_response::{ChatToMessageBody, MessageToChatBody};
use crate::providers::{anthropic, openai};
use serde_json::{json, Value};

fn openai_same_format() -> Assembled {
    Assembled::new(
        Assembler::OpenAi(OpenAiAssembler::new()),
        ResponseTranslator::OpenAiBody(openai::ChatBody::default()),
    )
}

fn anthropic_same_format() -> Assembled {
    Assembled::new(
        Assembler::Anthropic(AnthropicAssembler::new()),
        ResponseTranslator::AnthropicBody(anthropic::MessagesBody::default()),
    )
}

fn parse(b: &[u8]) -> Value {
    serde_json::from_slice(b).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(b)))
}

/// Assembles `stream` whole, cut at every byte and byte by byte (all must agree);
/// returns the body (as text, so key order counts) and the completion. Each
/// recorded stream goes through this once; other uses of it take [`assemble_once`].
fn assemble(make: fn() -> Assembled, stream: &[u8]) -> (String, Completion) {
    let (out, c) = check_splits(make, stream);
    assert!(c.complete, "{c:?}: {}", String::from_utf8_lossy(&out));
    (String::from_utf8(out).expect("UTF-8 body"), c)
}

/// As [`assemble`], in one piece.
fn assemble_once(make: fn() -> Assembled, stream: &[u8]) -> (String, Completion) {
    let (out, c) = run(&mut make(), &[stream]);
    assert!(c.complete, "{c:?}: {}", String::from_utf8_lossy(&out));
    (String::from_utf8(out).expect("UTF-8 body"), c)
}

/// The type skeleton of a JSON value: keys in order, each value's type.
fn shape(v: &Value) -> Value {
    match v {
        Value::Object(o) => Value::Object(o.iter().map(|(k, v)| (k.clone(), shape(v))).collect()),
        Value::Array(a) => a.iter().map(shape).collect(),
        Value::String(_) => "string".into(),
        Value::Number(_) => "number".into(),
        Value::Bool(_) => "bool".into(),
        Value::Null => "null".into(),
    }
}

/// `v` without the members at `pointers` (JSON pointers).
fn without(mut v: Value, pointers: &[&str]) -> Value {
    for p in pointers {
        let (parent, key) = p.rsplit_once('/').unwrap_or(("", p));
        let removed = v
            .pointer_mut(parent)
            .and_then(Value::as_object_mut)
            .and_then(|o| o.shift_remove(key));
        assert!(removed.is_some(), "{p} is not there to explain");
    }
    v
}

fn assert_same_shape(assembled: &Value, recorded: &Value) {
    assert_eq!(
        shape(assembled).to_string(),
        shape(recorded).to_string(),
        "shapes differ"
    );
}

#[test]
fn openai_text_stream_is_assembled_into_its_body() {
    let (body, c) = assemble(openai_same_format, fx::WIRE_OPENAI_TEXT_STREAM);
    let expected = json!({
        "id": "chatcmpl-ABfw031mOJeYCSHe4yI2ZjOA6kMJL",
        "object": "chat.completion",
        "created": 1727346168,
        "model": "gpt-4o-2024-08-06",
        "choices": [{
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "I'm unable to provide real-time weather updates. To get the current weather \
                    in San Francisco, I recommend checking a reliable weather website or a weather app.",
                "refusal": null,
            },
            "logprobs": null,
            "finish_reason": "stop",
        }],
        "usage": {"prompt_tokens": 14, "completion_tokens": 30, "total_tokens": 44,
            "completion_tokens_details": {"reasoning_tokens": 0}},
        "system_fingerprint": "fp_5050236cbd",
    });
    assert_eq!(body, expected.to_string());
    // The completion is the non-stream path's for that body.
    let (_, plain) = run(&mut openai::ChatBody::default(), &[body.as_bytes()]);
    assert_eq!(c, plain);
    assert_eq!(
        c.usage,
        Some(Usage {
            input: 14,
            output: 30,
            cached_input: 0,
            cache_creation_input: 0
        })
    );

    // The text recording (openai-text.json) is the 2025 API reference example; the
    // stream was recorded in September 2024. What one has and the other cannot: the
    // 2025 body's empty `annotations` and `service_tier` (no event of the 2024 stream
    // mentions either, and nothing is invented) and its fuller usage details (usage
    // is the stream's own object, verbatim); the 2024 `system_fingerprint`, which
    // the 2025 example leaves out. Every other member matches in name, order and type.
    let recorded = without(
        parse(fx::WIRE_OPENAI_TEXT),
        &[
            "/choices/0/message/annotations",
            "/service_tier",
            "/usage/prompt_tokens_details",
            "/usage/completion_tokens_details/audio_tokens",
            "/usage/completion_tokens_details/accepted_prediction_tokens",
            "/usage/completion_tokens_details/rejected_prediction_tokens",
        ],
    );
    let assembled = without(parse(body.as_bytes()), &["/system_fingerprint"]);
    assert_same_shape(&assembled, &recorded);
}

#[test]
fn members_of_newer_streams_take_the_places_of_the_non_streamed_body() {
    // The text stream as today's API sends it: `service_tier` on every chunk,
    // `annotations` in the first delta, `obfuscation` padding, the usage chunk with
    // the 2025 example's usage. Assembled, it has the 2025 body's shape exactly
    // (bar the fingerprint the example omits).
    let recorded = parse(fx::WIRE_OPENAI_TEXT);
    let usage = recorded["usage"].to_string();
    let text = String::from_utf8_lossy(fx::WIRE_OPENAI_TEXT_STREAM)
        .replace(
            r#""system_fingerprint""#,
            r#""service_tier":"default","system_fingerprint""#,
        )
        .replace(r#""refusal":null}"#, r#""refusal":null,"annotations":[]}"#)
        .replace(r#"}]}"#, r#"}],"obfuscation":"x1"}"#)
        .replace(
            r#""usage":{"prompt_tokens":14,"completion_tokens":30,"total_tokens":44,"completion_tokens_details":{"reasoning_tokens":0}}"#,
            &format!(r#""usage":{usage}"#),
        );
    let (body, _) = assemble_once(openai_same_format, text.as_bytes());
    let v = without(parse(body.as_bytes()), &["/system_fingerprint"]);
    assert_same_shape(&v, &recorded);
    assert_eq!(v["usage"], recorded["usage"]);
    assert!(!body.contains("obfuscation"), "stream-only padding: {body}");
}

#[test]
fn openai_parallel_tool_calls_stream_is_assembled_into_its_body() {
    let (body, c) = assemble(openai_same_format, fx::WIRE_OPENAI_TOOLS_STREAM);
    let expected = json!({
        "id": "chatcmpl-ABfwAwrNePHUgBBezonVC6MX3zd63",
        "object": "chat.completion",
        "created": 1727346178,
        "model": "gpt-4o-2024-08-06",
        "choices": [{
            "index": 0,
            "message": {
                "role": "assistant",
                "content": null,
                "tool_calls": [
                    {"id": "call_JMW1whyEaYG438VE1OIflxA2", "type": "function", "function": {
                        "name": "GetWeatherArgs",
                        "arguments": "{\"city\": \"Edinburgh\", \"country\": \"GB\", \"units\": \"c\"}"}},
                    {"id": "call_DNYTawLBoN8fj3KN6qU9N1Ou", "type": "function", "function": {
                        "name": "get_stock_price",
                        "arguments": "{\"ticker\": \"AAPL\", \"exchange\": \"NASDAQ\"}"}},
                ],
                "refusal": null,
            },
            "logprobs": null,
            "finish_reason": "tool_calls",
        }],
        "usage": {"prompt_tokens": 149, "completion_tokens": 60, "total_tokens": 209,
            "completion_tokens_details": {"reasoning_tokens": 0}},
        "system_fingerprint": "fp_5050236cbd",
    });
    assert_eq!(body, expected.to_string());
    assert_eq!(c.usage.map(|u| (u.input, u.output)), Some((149, 60)));
    // Recorded in the same week by the same SDK test suite: the same shape exactly.
    assert_same_shape(
        &parse(body.as_bytes()),
        &parse(fx::WIRE_OPENAI_TOOLS_PARALLEL),
    );
}

#[test]
fn openai_refusal_stream_is_assembled_into_its_body() {
    let (body, c) = assemble(openai_same_format, fx::WIRE_OPENAI_REFUSAL_STREAM);
    let expected = json!({
        "id": "chatcmpl-ABfw4IfQfCCrcuybFm41wJyxjbkz7",
        "object": "chat.completion",
        "created": 1727346172,
        "model": "gpt-4o-2024-08-06",
        "choices": [{
            "index": 0,
            "message": {
                "role": "assistant",
                "content": null,
                "refusal": "I'm sorry, I can't assist with that request.",
            },
            "logprobs": null,
            "finish_reason": "stop",
        }],
        "usage": {"prompt_tokens": 79, "completion_tokens": 11, "total_tokens": 90,
            "completion_tokens_details": {"reasoning_tokens": 0}},
        "system_fingerprint": "fp_5050236cbd",
    });
    assert_eq!(body, expected.to_string());
    assert_eq!(c.usage.map(|u| (u.input, u.output)), Some((79, 11)));
    assert_same_shape(&parse(body.as_bytes()), &parse(fx::WIRE_OPENAI_REFUSAL));
}

#[test]
fn azure_reasoning_stream_keeps_its_usage_details_and_azures_sorted_keys() {
    let (body, c) = assemble(openai_same_format, fx::WIRE_OPENAI_REASONING_STREAM);
    let safe = json!({"filtered": false, "severity": "safe"});
    let expected = json!({
        "choices": [{
            "content_filter_results": {"hate": safe, "self_harm": safe, "sexual": safe, "violence": safe},
            "finish_reason": "stop",
            "index": 0,
            "logprobs": null,
            "message": {"content": "Capital of Denmark.", "refusal": null, "role": "assistant"},
        }],
        "created": 1762317021,
        "id": "chatcmpl-CYPS1lijGoK8gd9lYzY3r9Sx50nbt",
        "model": "gpt-5-nano-2025-08-07",
        "object": "chat.completion",
        "prompt_filter_results": [{
            "content_filter_results": {"hate": safe, "jailbreak": {"detected": false, "filtered": false},
                "self_harm": safe, "sexual": safe, "violence": safe},
            "prompt_index": 0,
        }],
        "system_fingerprint": null,
        "usage": {
            "completion_tokens": 78,
            "completion_tokens_details": {"accepted_prediction_tokens": 0, "audio_tokens": 0,
                "reasoning_tokens": 64, "rejected_prediction_tokens": 0},
            "prompt_tokens": 15,
            "prompt_tokens_details": {"audio_tokens": 0, "cached_tokens": 0},
            "total_tokens": 93,
        },
    });
    assert_eq!(body, expected.to_string());
    assert_eq!(c.usage.map(|u| (u.input, u.output)), Some((15, 78)));
    // Usage details: the same members as OpenAI's own non-streamed usage (the 2025
    // example), in Azure's sorted order.
    let mut ours: Vec<String> = keys_deep(&parse(body.as_bytes())["usage"]);
    let mut theirs: Vec<String> = keys_deep(&parse(fx::WIRE_OPENAI_TEXT)["usage"]);
    ours.sort();
    theirs.sort();
    assert_eq!(ours, theirs);
}

/// Every member path below `v`.
fn keys_deep(v: &Value) -> Vec<String> {
    let mut out = Vec::new();
    if let Value::Object(o) = v {
        for (k, child) in o {
            out.push(k.clone());
            out.extend(keys_deep(child).into_iter().map(|c| format!("{k}.{c}")));
        }
    }
    out
}

#[test]
fn cached_prompt_tokens_reach_the_body_and_the_bill() {
    // No recorded stream has cached tokens (SOURCES.md): the tools stream with the
    // usage of the recorded cached answer (openai-tools-cached.json) in its usage
    // chunk, as the API sends it there.
    let cached = parse(fx::WIRE_OPENAI_TOOLS_CACHED)["usage"].to_string();
    let text = String::from_utf8_lossy(fx::WIRE_OPENAI_TOOLS_STREAM).replace(
        r#""usage":{"prompt_tokens":149,"completion_tokens":60,"total_tokens":209,"completion_tokens_details":{"reasoning_tokens":0}}"#,
        &format!(r#""usage":{cached}"#),
    );
    let (body, c) = assemble_once(openai_same_format, text.as_bytes());
    assert_eq!(parse(body.as_bytes())["usage"].to_string(), cached);
    assert_eq!(
        c.usage,
        Some(Usage {
            input: 1136,
            output: 64,
            cached_input: 1024,
            cache_creation_input: 0
        })
    );
}

#[test]
fn anthropic_tool_stream_is_assembled_into_its_message() {
    let (body, c) = assemble(anthropic_same_format, fx::WIRE_ANTHROPIC_TOOL_STREAM);
    let expected = json!({
        "model": "claude-haiku-4-5-20251001",
        "id": "msg_01AusY9WEbCaj3N7Tv5J4YjH",
        "type": "message",
        "role": "assistant",
        "content": [{
            "type": "tool_use",
            "id": "toolu_018acGYLtfR52q9yDbWaEdQZ",
            "name": "get_weather",
            "input": {"location": "San Francisco, CA", "units": "f"},
            "caller": {"type": "direct"},
        }],
        "stop_reason": "tool_use",
        "stop_sequence": null,
        // message_start's usage, updated by message_delta's (input and output).
        "usage": {"input_tokens": 656, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
            "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
            "output_tokens": 74, "service_tier": "standard", "inference_geo": "not_available"},
    });
    assert_eq!(body, expected.to_string());
    let (_, plain) = run(&mut anthropic::MessagesBody::default(), &[body.as_bytes()]);
    assert_eq!(c, plain);
    assert_eq!(c.usage.map(|u| (u.input, u.output)), Some((656, 74)));
    // The same cassette family as anthropic-tool.json (text + tool_use there, a
    // tool_use alone here): the message and its tool_use block have its shape.
    let recorded = parse(fx::WIRE_ANTHROPIC_TOOL);
    let ours = parse(body.as_bytes());
    assert_same_shape(
        &without(ours.clone(), &["/content"]),
        &without(recorded.clone(), &["/content"]),
    );
    assert_same_shape(&ours["content"][0], &recorded["content"][1]);
}

#[test]
fn anthropic_text_and_tool_stream_parses_input_split_mid_key() {
    let (body, _) = assemble_once(anthropic_same_format, fx::WIRE_ANTHROPIC_TOOL_TEXT_STREAM);
    let v = parse(body.as_bytes());
    assert_eq!(
        v["content"],
        json!([
            {"type": "text", "text": "I'll check the current weather in Paris for you."},
            {"type": "tool_use", "id": "toolu_01NRLabsLyVHZPKxbKvkfSMn", "name": "get_weather",
                "caller": {"type": "direct"}, "input": {"location": "Paris"}},
        ])
    );
    assert_eq!(v["stop_reason"], "tool_use");
    assert_eq!(v["usage"]["output_tokens"], 65);
}

#[test]
fn anthropic_thinking_stream_keeps_the_signature_and_matches_the_text_shape() {
    let (body, c) = assemble(anthropic_same_format, fx::WIRE_ANTHROPIC_THINKING_STREAM);
    let v = parse(body.as_bytes());
    assert_eq!(v["content"][0]["type"], "thinking");
    assert_eq!(
        v["content"][0]["thinking"],
        "The previous result was 925. Now I need to divide that by 5.\n\n925 ÷ 5 = 185"
    );
    assert!(v["content"][0]["signature"]
        .as_str()
        .is_some_and(|s| s.starts_with("EvQBCkYICxgCKkAxhD4N") && s.ends_with("Ca17BgB")));
    assert_eq!(
        v["content"][1],
        json!({"type": "text", "text": "925 ÷ 5 = 185"})
    );
    assert_eq!(v["context_management"], json!({"applied_edits": []}));
    assert_eq!(c.usage.map(|u| (u.input, u.output)), Some((69, 53)));
    // The text kind: the message, its usage and its text block have the shape of
    // the recorded text answer (anthropic-text.json), bar `context_management`,
    // which the recorded stream's request enabled (a beta) and the other did not.
    let recorded = parse(fx::WIRE_ANTHROPIC_TEXT);
    assert_same_shape(
        &without(v.clone(), &["/content", "/context_management"]),
        &without(recorded.clone(), &["/content"]),
    );
    assert_same_shape(&v["content"][1], &recorded["content"][0]);
}

#[test]
fn anthropic_cache_stream_with_server_tools_keeps_every_block_and_the_final_usage() {
    let (body, c) = assemble(anthropic_same_format, fx::WIRE_ANTHROPIC_CACHE_STREAM);
    let v = parse(body.as_bytes());
    let types: Vec<&str> = v["content"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| b["type"].as_str())
        .collect();
    assert_eq!(
        types,
        [
            "server_tool_use",
            "bash_code_execution_tool_result",
            "server_tool_use",
            "bash_code_execution_tool_result",
            "text"
        ]
    );
    assert_eq!(
        v["content"][0]["input"],
        json!({"command": "for n in $(seq 1 12); do echo \"$n: $((n*n))\"; done"})
    );
    assert_eq!(v["content"][3]["content"]["stdout"], "Sum: 650\n");
    assert_eq!(
        v["container"],
        json!({"id": "container_01Qh1LG5zm6onKQjYrHnhrvi", "expires_at": "2026-07-30T18:54:08.960841Z"})
    );
    // message_delta's cumulative counters replace message_start's, member by member.
    assert_eq!(
        v["usage"],
        json!({"input_tokens": 6, "cache_creation_input_tokens": 3337, "cache_read_input_tokens": 6289,
            "cache_creation": {"ephemeral_5m_input_tokens": 3068, "ephemeral_1h_input_tokens": 0},
            "output_tokens": 198, "service_tier": "standard", "inference_geo": "global",
            "output_tokens_details": {"thinking_tokens": 0},
            "server_tool_use": {"web_search_requests": 0, "web_fetch_requests": 0}})
    );
    assert_eq!(
        c.usage,
        Some(Usage {
            input: 6 + 3337 + 6289,
            output: 198,
            cached_input: 6289,
            cache_creation_input: 3337
        })
    );
    // Usage details: every member of the documented non-streamed usage
    // (anthropic-cache.json, a docs example with sorted keys) is there; the stream
    // adds `output_tokens_details`, newer than that example.
    let mut ours = keys_deep(&v["usage"]);
    let mut theirs = keys_deep(&parse(fx::WIRE_ANTHROPIC_CACHE)["usage"]);
    ours.retain(|k| !k.starts_with("output_tokens_details"));
    ours.sort();
    theirs.sort();
    assert_eq!(ours, theirs);
}

#[test]
fn anthropic_sdk_text_stream_is_assembled_into_its_message() {
    let (body, _) = assemble(anthropic_same_format, fx::WIRE_ANTHROPIC_TEXT_STREAM);
    let expected = json!({
        "id": "msg_4QpJur2dWWDjF6C758FbBw5vm12BaVipnK",
        "type": "message",
        "role": "assistant",
        "content": [{"type": "text", "text": "Hello there!"}],
        "model": "claude-3-opus-latest",
        "stop_reason": "end_turn",
        "stop_sequence": null,
        "usage": {"input_tokens": 11, "output_tokens": 6},
    });
    assert_eq!(body, expected.to_string());
}

/// The byte just past the terminator event (`[DONE]`, `message_stop`).
fn terminator_end(stream: &[u8], terminator: &[u8]) -> usize {
    let at = find(stream, terminator);
    at + find(&stream[at..], b"\n\n") + 2
}

#[test]
fn a_stream_cut_anywhere_before_its_end_is_never_assembled() {
    type Case = (fn() -> Assembled, &'static [u8], &'static [u8]);
    let cases: [Case; 4] = [
        (
            openai_same_format,
            fx::WIRE_OPENAI_TEXT_STREAM,
            b"data: [DONE]",
        ),
        (
            openai_same_format,
            fx::WIRE_OPENAI_TOOLS_STREAM,
            b"data: [DONE]",
        ),
        (
            anthropic_same_format,
            fx::WIRE_ANTHROPIC_TOOL_STREAM,
            b"event: message_stop",
        ),
        (
            anthropic_same_format,
            fx::WIRE_ANTHROPIC_THINKING_STREAM,
            b"event: message_stop",
        ),
    ];
    for (make, stream, terminator) in cases {
        let end = terminator_end(stream, terminator);
        // Every byte of the short streams; around every line end of the long ones
        // (a cut inside an event behaves as the cut just before its end does).
        let cuts: Vec<usize> = if stream.len() < 4096 {
            (0..end - 1).collect()
        } else {
            (0..end - 1)
                .filter(|&i| (i.saturating_sub(2)..=i + 1).any(|j| stream.get(j) == Some(&b'\n')))
                .collect()
        };
        for cut in cuts {
            let mut a = make();
            let (out, c) = run(&mut a, &[&stream[..cut]]);
            assert!(out.is_empty(), "cut at {cut}: nothing for the client");
            assert!(!c.complete && !c.upstream_error, "cut at {cut}: {c:?}");
            let why = a.unfinished();
            let leading = stream[..cut].iter().all(u8::is_ascii_whitespace);
            let first_event = find(stream, b"\n\n") + 2;
            let expected = if cut < first_event || leading {
                Unfinished::Unreadable
            } else {
                Unfinished::Cut
            };
            assert_eq!(why, expected, "cut at {cut}");
        }
    }
}

#[test]
fn an_error_event_mid_stream_is_an_upstream_error_not_a_body() {
    let (out, c) = check_splits(anthropic_same_format, fx::WIRE_ANTHROPIC_OVERLOADED_STREAM);
    assert!(out.is_empty());
    assert!(c.upstream_error && !c.complete, "{c:?}");
    // What was generated before the error is still counted.
    assert_eq!(c.usage.map(|u| (u.input, u.output)), Some((770, 8)));
    assert_eq!(
        c.content_bytes,
        "The weather in San Francisco, CA is currently".len()
    );
    let mut a = anthropic_same_format();
    run(&mut a, &[fx::WIRE_ANTHROPIC_OVERLOADED_STREAM]);
    assert_eq!(a.unfinished(), Unfinished::ProviderError);

    // OpenAI's in-band error, even followed by `[DONE]`.
    let end = terminator_end(fx::WIRE_OPENAI_TEXT_STREAM, b"data: [DONE]");
    let half = find(fx::WIRE_OPENAI_TEXT_STREAM, b"data: {\"id\":\"chatcmpl-ABfw031mOJeYCSHe4yI2ZjOA6kMJL\",\"object\":\"chat.completion.chunk\",\"created\":1727346168,\"model\":\"gpt-4o-2024-08-06\",\"system_fingerprint\":\"fp_5050236cbd\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" To\"}");
    assert!(half < end);
    let mut s = fx::WIRE_OPENAI_TEXT_STREAM[..half].to_vec();
    s.extend_from_slice(b"data: {\"error\":{\"message\":\"The server had an error\",\"type\":\"server_error\"}}\n\ndata: [DONE]\n\n");
    let (out, c) = run(&mut openai_same_format(), &[&s]);
    assert!(out.is_empty() && c.upstream_error && !c.complete, "{c:?}");
}

#[test]
fn garbage_is_unreadable() {
    for (make, input) in [
        (openai_same_format as fn() -> Assembled, &b"data: not-json\n\n"[..]),
        (openai_same_format, b"<html>oops</html>"),
        (anthropic_same_format, b"event: message_start\ndata: {\"type\n\nevent: message_stop\ndata: {}\n\n"),
        (anthropic_same_format, b""),
        // A tool's input that is not JSON cannot become the message's `input`.
        (anthropic_same_format, b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"type\":\"message\",\"content\":[]}}\n\n\
event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"tool_use\",\"id\":\"t\",\"name\":\"f\",\"input\":{}}}\n\n\
event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"a\"}}\n\n\
event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n\
event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"),
    ] {
        let mut a = make();
        let (out, c) = run(&mut a, &[input]);
        assert!(out.is_empty() && !c.complete, "{}", String::from_utf8_lossy(input));
        assert_eq!(a.unfinished(), Unfinished::Unreadable);
    }
}

#[test]
fn a_server_that_ignores_stream_true_is_served_its_body_as_is() {
    for body in [fx::WIRE_OPENAI_TOOLS_PARALLEL, fx::WIRE_OPENAI_TEXT] {
        let (out, c) = check_splits(openai_same_format, body);
        let (plain_out, plain) = run(&mut openai::ChatBody::default(), &[body]);
        assert_eq!((out, c), (plain_out, plain));
        assert!(c.complete);
    }
    let (out, c) = check_splits(anthropic_same_format, fx::WIRE_ANTHROPIC_TOOL);
    let (plain_out, plain) = run(
        &mut anthropic::MessagesBody::default(),
        &[fx::WIRE_ANTHROPIC_TOOL],
    );
    assert_eq!((out, c), (plain_out, plain));
    // A body is no stream: it does not count as a first token.
    let mut a = openai_same_format();
    a.feed(b"  {\"id\":", &mut BytesMut::new());
    assert!(!a.started());
    let mut a = openai_same_format();
    a.feed(b"\ndata: {\"id\":\"x\"}\n\n", &mut BytesMut::new());
    assert!(a.started());
}

#[test]
fn cross_format_answers_are_the_non_stream_translation_of_the_assembled_body() {
    // Anthropic provider, OpenAI client.
    let make = || {
        Assembled::new(
            Assembler::Anthropic(AnthropicAssembler::new()),
            ResponseTranslator::MessagesToChatBody(MessageToChatBody::new(7, "fallback")),
        )
    };
    let (out, c) = check_splits(make, fx::WIRE_ANTHROPIC_TOOL_TEXT_STREAM);
    let (message, _) = assemble_once(anthropic_same_format, fx::WIRE_ANTHROPIC_TOOL_TEXT_STREAM);
    let (plain_out, plain) = run(
        &mut MessageToChatBody::new(7, "fallback"),
        &[message.as_bytes()],
    );
    assert_eq!((&out, c), (&plain_out, plain));
    let v = parse(&out);
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(
        v["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
        "{\"location\":\"Paris\"}"
    );

    // OpenAI provider, Anthropic client.
    let make = || {
        Assembled::new(
            Assembler::OpenAi(OpenAiAssembler::new()),
            ResponseTranslator::ChatToMessagesBody(ChatToMessageBody::new("fallback")),
        )
    };
    let (out, c) = run(&mut make(), &[fx::WIRE_OPENAI_TOOLS_STREAM]);
    let (chat, _) = assemble_once(openai_same_format, fx::WIRE_OPENAI_TOOLS_STREAM);
    let (plain_out, plain) = run(&mut ChatToMessageBody::new("fallback"), &[chat.as_bytes()]);
    assert_eq!((&out, c), (&plain_out, plain));
    let v = parse(&out);
    assert_eq!(v["stop_reason"], "tool_use");
    assert_eq!(
        v["content"][1]["input"],
        json!({"ticker": "AAPL", "exchange": "NASDAQ"})
    );
}

#[test]
fn deltas_without_rules_compose_as_openai_composes_them() {
    // vLLM's `reasoning_content`, logprobs, two choices out of order, a legacy
    // `function_call`, a tool call without `index`.
    let s = concat!(
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":5,\"model\":\"m\",\"choices\":[",
        "{\"index\":1,\"delta\":{\"role\":\"assistant\",\"content\":\"B\"},\"logprobs\":null,\"finish_reason\":null},",
        "{\"index\":0,\"delta\":{\"role\":\"assistant\",\"reasoning_content\":\"thi\",\"content\":\"\"},\"logprobs\":{\"content\":[{\"token\":\"A\"}],\"refusal\":null},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":5,\"model\":\"m\",\"choices\":[",
        "{\"index\":0,\"delta\":{\"reasoning_content\":\"nk\",\"content\":\"A\",\"function_call\":{\"name\":\"f\",\"arguments\":\"{\"}},\"logprobs\":{\"content\":[{\"token\":\"!\"}],\"refusal\":null},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":5,\"model\":\"m\",\"choices\":[",
        "{\"index\":0,\"delta\":{\"function_call\":{\"arguments\":\"}\"}},\"finish_reason\":\"stop\"},",
        "{\"index\":1,\"delta\":{\"tool_calls\":[{\"id\":\"call_1\",\"type\":\"function\",\"function\":{\"name\":\"g\",\"arguments\":\"{}\"}}]},\"finish_reason\":\"length\"}]}\n\n",
        "data: [DONE]\n\n",
    );
    let (body, c) = assemble(openai_same_format, s.as_bytes());
    let expected = json!({
        "id": "c", "object": "chat.completion", "created": 5, "model": "m",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "A", "refusal": null,
                "reasoning_content": "think", "function_call": {"name": "f", "arguments": "{}"}},
             "logprobs": {"content": [{"token": "A"}, {"token": "!"}], "refusal": null},
             "finish_reason": "stop"},
            {"index": 1, "message": {"role": "assistant", "content": "B",
                "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "g", "arguments": "{}"}}],
                "refusal": null},
             "logprobs": null, "finish_reason": "length"},
        ],
    });
    assert_eq!(body, expected.to_string());
    assert!(c.usage.is_none(), "no usage chunk: the proxy estimates");
}
