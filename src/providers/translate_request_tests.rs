//! Request translation tests, both directions.

use super::*;
use crate::config::ProviderKind;
use crate::error::ApiFormat;
use crate::providers::translate_fixtures as fx;
use crate::providers::{prepare, ClientRequest};

fn obj(v: Value) -> Obj {
    match v {
        Value::Object(o) => o,
        _ => panic!("not an object"),
    }
}

fn to_messages(v: Value, max: Option<u64>) -> Value {
    Value::Object(chat_to_messages(&obj(v), "claude-up", max).unwrap_or_else(|e| panic!("{e}")))
}

fn to_chat(v: Value, max: Option<u64>, native: bool) -> Value {
    Value::Object(
        messages_to_chat(&obj(v), "gpt-up", max, native).unwrap_or_else(|e| panic!("{e}")),
    )
}

fn err_messages(v: Value) -> String {
    match chat_to_messages(&obj(v), "m", None) {
        Ok(o) => panic!("accepted: {o:?}"),
        Err(e) => {
            assert_eq!(e.status(), 400);
            e.message
        }
    }
}

fn err_chat(v: Value) -> String {
    match messages_to_chat(&obj(v), "m", None, true) {
        Ok(o) => panic!("accepted: {o:?}"),
        Err(e) => {
            assert_eq!(e.status(), 400);
            e.message
        }
    }
}

#[test]
fn chat_to_messages_basic_fields() {
    let v = to_messages(
        json!({
            "model": "claude-haiku",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "developer", "content": [{"type": "text", "text": "Use French."}]},
                {"role": "user", "content": "Hi"},
                {"role": "user", "content": [{"type": "text", "text": "there"}]},
                {"role": "assistant", "content": "Bonjour"},
            ],
            "max_completion_tokens": 50,
            "temperature": 1.6,
            "top_p": 0.9,
            "stop": "END",
            "stream": true,
            "stream_options": {"include_usage": true},
            "user": "u-42",
            "seed": 7,
        }),
        Some(50),
    );
    assert_eq!(
        v,
        json!({
            "model": "claude-up",
            "system": "Be brief.\n\nUse French.",
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Bonjour"}]},
            ],
            "max_tokens": 50,
            "temperature": 1.0,
            "top_p": 0.9,
            "stop_sequences": ["END"],
            "stream": true,
            "metadata": {"user_id": "u-42"},
        })
    );
}

#[test]
fn chat_to_messages_default_max_tokens_and_stop_array() {
    let v = to_messages(
        json!({"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b"]}),
        None,
    );
    assert_eq!(v["max_tokens"], 4096);
    assert_eq!(v["stop_sequences"], json!(["a", "b"]));
    assert!(v.get("system").is_none());
    assert!(v.get("stream").is_none());
}

#[test]
fn chat_to_messages_tools_and_tool_round_trip() {
    let v = to_messages(
        json!({
            "messages": [
                {"role": "user", "content": "Weather in Paris and time?"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"location\":\"Paris\"}"}},
                    {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": ""}},
                ]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
                {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "12:00"}]},
                {"role": "user", "content": "Thanks"},
            ],
            "tools": [
                {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}}},
                {"type": "function", "function": {"name": "get_time"}},
            ],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "parallel_tool_calls": false,
        }),
        None,
    );
    assert_eq!(
        v["messages"],
        json!([
            {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and time?"}]},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"location": "Paris"}},
                {"type": "tool_use", "id": "call_2", "name": "get_time", "input": {}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "18C"},
                {"type": "tool_result", "tool_use_id": "call_2", "content": "12:00"},
                {"type": "text", "text": "Thanks"},
            ]},
        ])
    );
    assert_eq!(
        v["tools"],
        json!([
            {"name": "get_weather", "description": "Weather", "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}}},
            {"name": "get_time", "input_schema": {"type": "object", "properties": {}}},
        ])
    );
    assert_eq!(
        v["tool_choice"],
        json!({"type": "tool", "name": "get_weather", "disable_parallel_tool_use": true})
    );
}

#[test]
fn chat_to_messages_tool_choice_strings() {
    for (oc, ac) in [("auto", "auto"), ("none", "none"), ("required", "any")] {
        let v = to_messages(
            json!({"messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": oc}),
            None,
        );
        assert_eq!(v["tool_choice"], json!({"type": ac}));
    }
    // tool_choice without tools is meaningless to Anthropic: dropped
    let v = to_messages(
        json!({"messages": [{"role": "user", "content": "x"}], "tool_choice": "none"}),
        None,
    );
    assert!(v.get("tool_choice").is_none());
}

#[test]
fn chat_to_messages_images() {
    let v = to_messages(
        json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg", "detail": "low"}},
        ]}]}),
        None,
    );
    assert_eq!(
        v["messages"][0]["content"],
        json!([
            {"type": "text", "text": "What is this?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
        ])
    );
}

#[test]
fn chat_to_messages_refusals_name_the_field() {
    let m = |extra: Value| {
        let mut b = json!({"messages": [{"role": "user", "content": "x"}]});
        if let (Some(o), Value::Object(e)) = (b.as_object_mut(), extra) {
            o.extend(e);
        }
        err_messages(b)
    };
    assert!(m(json!({"n": 2})).contains("'n'"));
    assert!(m(json!({"logprobs": true})).contains("'logprobs'"));
    assert!(m(json!({"tools": [{"type": "web_search"}]})).contains("tools[0].type"));
    assert!(m(json!({"stop": 5})).contains("'stop'"));
    let e = err_messages(
        json!({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}),
    );
    assert!(e.contains("messages[0].content[0].type"), "{e}");
    let e = err_messages(json!({"messages": [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]}));
    assert!(
        e.contains("messages[0].tool_calls[0].function.arguments"),
        "{e}"
    );
    let e = err_messages(json!({"messages": [{"role": "tool", "content": "x"}]}));
    assert!(e.contains("messages[0].tool_call_id"), "{e}");
    let e = err_messages(json!({"messages": [{"role": "system", "content": "only system"}]}));
    assert!(e.contains("'messages'"), "{e}");
    let e = err_messages(json!({"messages": [{"role": "function", "content": "x"}]}));
    assert!(e.contains("messages[0].role"), "{e}");
}

#[test]
fn messages_to_chat_basic_fields() {
    let v = to_chat(
        json!({
            "model": "gpt-4o-mini",
            "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            ],
            "max_tokens": 100,
            "temperature": 0.5,
            "top_p": 0.8,
            "top_k": 5,
            "stop_sequences": ["###"],
            "stream": true,
            "metadata": {"user_id": "u-1"},
        }),
        Some(100),
        true,
    );
    assert_eq!(
        v,
        json!({
            "model": "gpt-up",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            ],
            "max_completion_tokens": 100,
            "temperature": 0.5,
            "top_p": 0.8,
            "stop": ["###"],
            "stream": true,
            "stream_options": {"include_usage": true},
            "user": "u-1",
        })
    );
    let v = to_chat(
        json!({"messages": [{"role": "user", "content": "x"}]}),
        Some(9),
        false,
    );
    assert_eq!(v["max_tokens"], 9);
    assert!(v.get("max_completion_tokens").is_none());
    assert!(v.get("stream_options").is_none());
}

#[test]
fn messages_to_chat_tool_round_trip() {
    let v = to_chat(
        json!({
            "messages": [
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "x"},
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"location": "Paris"}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "18C"}]},
                    {"type": "text", "text": "And tomorrow?"},
                ]},
            ],
            "tools": [{"name": "get_weather", "description": "Weather", "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}}}],
            "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": true},
        }),
        None,
        true,
    );
    assert_eq!(
        v["messages"],
        json!([
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "Checking.", "tool_calls": [
                {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"location\":\"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "18C"},
            {"role": "user", "content": "And tomorrow?"},
        ])
    );
    assert_eq!(
        v["tools"],
        json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather",
            "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}}}])
    );
    assert_eq!(
        v["tool_choice"],
        json!({"type": "function", "function": {"name": "get_weather"}})
    );
    assert_eq!(v["parallel_tool_calls"], false);
    assert!(v.get("max_completion_tokens").is_none());
    for (ac, oc) in [("auto", "auto"), ("any", "required"), ("none", "none")] {
        let v = to_chat(
            json!({"messages": [{"role": "user", "content": "x"}], "tools": [{"name": "f", "input_schema": {}}], "tool_choice": {"type": ac}}),
            None,
            false,
        );
        assert_eq!(v["tool_choice"], oc);
    }
}

#[test]
fn messages_to_chat_images_and_refusals() {
    let v = to_chat(
        json!({"messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "AAAA"}},
            {"type": "text", "text": "what?"},
        ]}]}),
        None,
        true,
    );
    assert_eq!(
        v["messages"][0]["content"],
        json!([{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,AAAA"}}, {"type": "text", "text": "what?"}])
    );
    let e = err_chat(
        json!({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}),
    );
    assert!(e.contains("messages[0].content[0].type"), "{e}");
    let e = err_chat(
        json!({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "web_search_20250305", "name": "web_search"}]}),
    );
    assert!(e.contains("tools[0].type"), "{e}");
    let e = err_chat(json!({"messages": [{"role": "system", "content": "x"}]}));
    assert!(e.contains("messages[0].role"), "{e}");
    let e = err_chat(
        json!({"system": [{"type": "image"}], "messages": [{"role": "user", "content": "x"}]}),
    );
    assert!(e.contains("system[0].type"), "{e}");
}

#[test]
fn client_request_parses_both_formats() {
    let a = ClientRequest::parse(
        ApiFormat::Anthropic,
        br#"{"model":"m","max_tokens":5,"stream":true,"messages":[{"role":"user","content":"x"}],"stream_options":{"include_usage":true}}"#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (a.max_tokens, a.stream, a.include_usage),
        (Some(5), true, false)
    );
    assert!(a.anthropic_version.is_none());
    let a = ClientRequest::parse(
        ApiFormat::Anthropic,
        br#"{"messages":[{"role":"user","content":"x"}]}"#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(a.max_tokens, None);
    let e = ClientRequest::parse(ApiFormat::Anthropic, br#"{"messages":[],"max_tokens":1}"#);
    assert!(e.is_err());
    let e = ClientRequest::parse(
        ApiFormat::Anthropic,
        br#"{"messages":[{"role":"user","content":"x"}],"system":5}"#,
    );
    assert!(e.is_err_and(|e| e.message.contains("'system'")));
    let e = ClientRequest::parse(
        ApiFormat::Anthropic,
        br#"{"messages":[{"role":"user","content":"x"}],"max_tokens":0}"#,
    );
    assert!(e.is_err_and(|e| e.message.contains("max_tokens")));
    let o = ClientRequest::parse(
        ApiFormat::OpenAi,
        br#"{"messages":[{"role":"user","content":"x"}],"max_completion_tokens":null,"max_tokens":8}"#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(o.max_tokens, Some(8));
}

#[test]
fn prepare_covers_every_pair() {
    let chat = ClientRequest::parse(
        ApiFormat::OpenAi,
        br#"{"model":"x","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut msgs = ClientRequest::parse(
        ApiFormat::Anthropic,
        br#"{"model":"x","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    msgs.anthropic_beta = Some("b1".into());
    let anth = fx::model(ProviderKind::Anthropic, Some(321));
    let oai = fx::model(ProviderKind::OpenAi, None);
    let compat = fx::model(ProviderKind::OpenAiCompatible, Some(77));

    let up = prepare(&chat, fx::target(&anth)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(up.path, "/v1/messages");
    let b: Value = serde_json::from_slice(&up.body).unwrap_or_default();
    assert_eq!(
        (
            b["model"].as_str(),
            b["max_tokens"].as_u64(),
            b["stream"].as_bool()
        ),
        (Some("claude-3-5-haiku-20241022"), Some(321), Some(true))
    );
    assert!(up.headers.contains(&("x-api-key", "sk-test".into())));
    assert!(up
        .headers
        .contains(&("anthropic-version", "2023-06-01".into())));
    assert!(!up.strip_usage);

    let up = prepare(&msgs, fx::target(&oai)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(up.path, "/v1/chat/completions");
    let b: Value = serde_json::from_slice(&up.body).unwrap_or_default();
    assert_eq!(b["model"], "gpt-4o-mini");
    assert_eq!(b["stream_options"]["include_usage"], true);
    assert!(b.get("max_completion_tokens").is_none());
    assert!(up
        .headers
        .contains(&("authorization", "Bearer sk-test".into())));

    let up = prepare(&msgs, fx::target(&compat)).unwrap_or_else(|e| panic!("{e}"));
    let b: Value = serde_json::from_slice(&up.body).unwrap_or_default();
    assert_eq!(b["max_tokens"], 77);

    let up = prepare(&msgs, fx::target(&anth)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(up.path, "/v1/messages");
    assert!(up.headers.contains(&("anthropic-beta", "b1".into())));

    let up = prepare(&chat, fx::target(&oai)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(up.path, "/v1/chat/completions");
    assert!(up.strip_usage);
}

#[test]
fn azure_openai_gets_the_deployment_path_the_api_version_and_an_api_key_header() {
    let chat = ClientRequest::parse(
        ApiFormat::OpenAi,
        br#"{"model":"x","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let msgs = ClientRequest::parse(
        ApiFormat::Anthropic,
        br#"{"model":"x","max_tokens":50,"messages":[{"role":"user","content":"hi"}]}"#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut azure = fx::model(ProviderKind::AzureOpenAi, Some(99));
    fx::dep_mut(&mut azure).upstream_model = "gpt4o prod".into();
    let want = "/openai/deployments/gpt4o%20prod/chat/completions?api-version=2024-10-21";

    let up = prepare(&chat, fx::target(&azure)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(up.path, want);
    assert_eq!(up.headers, vec![("api-key", "sk-test".to_string())]);
    let b: Value = serde_json::from_slice(&up.body).unwrap_or_default();
    assert_eq!(b["stream_options"]["include_usage"], true);
    assert_eq!(b["max_completion_tokens"], 99);
    assert!(up.strip_usage);

    let up = prepare(&msgs, fx::target(&azure)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(up.path, want);
    assert_eq!(up.headers, vec![("api-key", "sk-test".to_string())]);
    let b: Value = serde_json::from_slice(&up.body).unwrap_or_default();
    assert_eq!(b["max_completion_tokens"], 50);
}
