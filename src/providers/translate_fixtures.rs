//! Recorded-style wire fixtures and the split harness the translator tests share.
//!
//! The fixtures under `tests/fixtures/providers/` follow the providers' real wire
//! formats (field order, `ping`, `usage: null` members, cache counters, UTF-8 split
//! points). Every translator must give the same bytes and the same usage whatever the
//! TCP segmentation, so each fixture is replayed cut at every byte boundary. Those
//! under `tests/fixtures/wire/` are verbatim recordings of real provider answers.

use super::{Completion, Translate};
use crate::config::{
    Balance, BaseUrl, Deployment, Model, Price, Provider, ProviderKind, Target, Timeouts,
};
use bytes::BytesMut;
use serde_json::Value;
use std::sync::Arc;

pub const ANTHROPIC_TEXT: &[u8] =
    include_bytes!("../../tests/fixtures/providers/anthropic_text.sse");
pub const ANTHROPIC_TOOL: &[u8] =
    include_bytes!("../../tests/fixtures/providers/anthropic_tool.sse");
pub const ANTHROPIC_ERROR: &[u8] =
    include_bytes!("../../tests/fixtures/providers/anthropic_error.sse");
pub const ANTHROPIC_MESSAGE: &[u8] =
    include_bytes!("../../tests/fixtures/providers/anthropic_message.json");
pub const OPENAI_TEXT: &[u8] = include_bytes!("../../tests/fixtures/providers/openai_text.sse");
pub const OPENAI_TOOL: &[u8] = include_bytes!("../../tests/fixtures/providers/openai_tool.sse");
pub const OPENAI_ERROR: &[u8] = include_bytes!("../../tests/fixtures/providers/openai_error.sse");
pub const OPENAI_NO_USAGE: &[u8] =
    include_bytes!("../../tests/fixtures/providers/openai_no_usage.sse");
pub const OPENAI_COMPLETION: &[u8] =
    include_bytes!("../../tests/fixtures/providers/openai_completion.json");
/// Recorded gpt-4o-mini answer under `tool_choice: "required"`: two tool calls with
/// `finish_reason: "stop"` (tests/fixtures/wire/SOURCES.md).
pub const WIRE_OPENAI_TOOLS_CACHED: &[u8] =
    include_bytes!("../../tests/fixtures/wire/openai-tools-cached.json");
/// Recorded gpt-4o stream with two tool calls (tests/fixtures/wire/SOURCES.md).
pub const WIRE_OPENAI_TOOLS_STREAM: &[u8] =
    include_bytes!("../../tests/fixtures/wire/openai-tools-stream.sse");

/// Recorded non-stream bodies and streams the assembler is checked against
/// (tests/fixtures/wire/SOURCES.md says where each came from).
pub const WIRE_OPENAI_TEXT: &[u8] = include_bytes!("../../tests/fixtures/wire/openai-text.json");
pub const WIRE_OPENAI_TEXT_STREAM: &[u8] =
    include_bytes!("../../tests/fixtures/wire/openai-text-stream.sse");
pub const WIRE_OPENAI_TOOLS_PARALLEL: &[u8] =
    include_bytes!("../../tests/fixtures/wire/openai-tools-parallel.json");
pub const WIRE_OPENAI_REFUSAL: &[u8] =
    include_bytes!("../../tests/fixtures/wire/openai-refusal.json");
pub const WIRE_OPENAI_REFUSAL_STREAM: &[u8] =
    include_bytes!("../../tests/fixtures/wire/openai-refusal-stream.sse");
pub const WIRE_OPENAI_REASONING_STREAM: &[u8] =
    include_bytes!("../../tests/fixtures/wire/openai-reasoning-stream.sse");
pub const WIRE_ANTHROPIC_TEXT: &[u8] =
    include_bytes!("../../tests/fixtures/wire/anthropic-text.json");
pub const WIRE_ANTHROPIC_TOOL: &[u8] =
    include_bytes!("../../tests/fixtures/wire/anthropic-tool.json");
pub const WIRE_ANTHROPIC_CACHE: &[u8] =
    include_bytes!("../../tests/fixtures/wire/anthropic-cache.json");
pub const WIRE_ANTHROPIC_TEXT_STREAM: &[u8] =
    include_bytes!("../../tests/fixtures/wire/anthropic-text-stream.sse");
pub const WIRE_ANTHROPIC_TOOL_STREAM: &[u8] =
    include_bytes!("../../tests/fixtures/wire/anthropic-tool-stream.sse");
pub const WIRE_ANTHROPIC_TOOL_TEXT_STREAM: &[u8] =
    include_bytes!("../../tests/fixtures/wire/anthropic-tool-text-stream.sse");
pub const WIRE_ANTHROPIC_THINKING_STREAM: &[u8] =
    include_bytes!("../../tests/fixtures/wire/anthropic-thinking-stream.sse");
pub const WIRE_ANTHROPIC_CACHE_STREAM: &[u8] =
    include_bytes!("../../tests/fixtures/wire/anthropic-cache-stream.sse");
pub const WIRE_ANTHROPIC_OVERLOADED_STREAM: &[u8] =
    include_bytes!("../../tests/fixtures/wire/anthropic-overloaded-midstream.sse");

/// A model of the given provider kind, as the config would build it.
pub fn model(kind: ProviderKind, max_output_tokens: Option<u32>) -> Model {
    let upstream = match kind {
        ProviderKind::Anthropic => "claude-3-5-haiku-20241022",
        _ => "gpt-4o-mini",
    };
    let provider = Arc::new(Provider {
        name: kind.as_str().into(),
        kind,
        base_url: BaseUrl {
            tls: false,
            host: "127.0.0.1".into(),
            port: 1,
            path_prefix: String::new(),
            original: "http://127.0.0.1:1".into(),
        },
        api_key: Some("sk-test".into()),
        api_version: (kind == ProviderKind::AzureOpenAi).then(|| "2024-10-21".into()),
        region: "test".into(),
        timeouts: Timeouts::default(),
        http2: true,
        stream_always: true,
    });
    Model {
        name: "public-model".into(),
        deployments: vec![Arc::new(Deployment {
            key: format!("{}/{upstream}", provider.name),
            provider,
            upstream_model: upstream.into(),
            weight: 1,
            rpm: None,
            tpm: None,
        })],
        balance: Balance::LeastBusy,
        upstream_names: upstream.into(),
        price: Price {
            input_nanousd_per_mtok: 0,
            output_nanousd_per_mtok: 0,
            cached_input_nanousd_per_mtok: 0,
        },
        max_output_tokens,
    }
}

/// The model's one deployment as an attempt's target.
pub fn target(model: &Model) -> Target<'_> {
    Target {
        model,
        dep: &model.deployments[0],
    }
}

/// The model's one deployment, to change in a test.
pub fn dep_mut(model: &mut Model) -> &mut Deployment {
    Arc::make_mut(&mut model.deployments[0])
}

/// Feeds `chunks` in order, then finishes.
pub fn run<T: Translate>(t: &mut T, chunks: &[&[u8]]) -> (Vec<u8>, Completion) {
    let mut out = BytesMut::new();
    for c in chunks {
        t.feed(c, &mut out);
    }
    let c = t.finish(&mut out);
    (out.to_vec(), c)
}

/// Runs `input` whole, cut once at every byte, and byte by byte; all must agree.
/// Also checks that output only ever grows by whole SSE events (never half of one).
pub fn check_splits<T: Translate>(make: impl Fn() -> T, input: &[u8]) -> (Vec<u8>, Completion) {
    let (whole, c) = run(&mut make(), &[input]);
    for i in 0..=input.len() {
        let (out, c2) = run(&mut make(), &[&input[..i], &input[i..]]);
        assert_eq!(out, whole, "output differs when cut at byte {i}");
        assert_eq!(c2, c, "completion differs when cut at byte {i}");
    }
    let mut t = make();
    let mut out = BytesMut::new();
    for b in input {
        let before = out.len();
        t.feed(std::slice::from_ref(b), &mut out);
        if out.len() != before && !looks_like_json_body(&whole) {
            assert!(out.ends_with(b"\n\n"), "half an event written");
        }
    }
    let c3 = t.finish(&mut out);
    assert_eq!(&out[..], &whole[..], "byte-by-byte output differs");
    assert_eq!(c3, c, "byte-by-byte completion differs");
    (whole, c)
}

fn looks_like_json_body(b: &[u8]) -> bool {
    b.first() == Some(&b'{')
}

/// Position of `needle` in `hay` (panics when absent: fixtures are known).
pub fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len())
        .position(|w| w == needle)
        .unwrap_or_else(|| panic!("{:?} not in fixture", String::from_utf8_lossy(needle)))
}

/// Splits SSE output into (event name, data) pairs, asserting the framing and that
/// every data payload other than `[DONE]` is JSON.
pub fn sse_events(out: &[u8]) -> Vec<(Option<String>, Value)> {
    let text = std::str::from_utf8(out).unwrap_or_else(|e| panic!("output not UTF-8: {e}"));
    assert!(
        text.is_empty() || text.ends_with("\n\n"),
        "unterminated: {text:?}"
    );
    let mut evs = vec![];
    for block in text.split("\n\n").filter(|b| !b.is_empty()) {
        let mut name = None;
        let mut data = None;
        for line in block.lines() {
            if let Some(n) = line.strip_prefix("event: ") {
                name = Some(n.to_string());
            } else if let Some(d) = line.strip_prefix("data: ") {
                data = Some(d.to_string());
            } else {
                panic!("unexpected line {line:?}");
            }
        }
        let data = data.unwrap_or_else(|| panic!("no data in {block:?}"));
        let v = if data == "[DONE]" {
            Value::String(data)
        } else {
            serde_json::from_str(&data).unwrap_or_else(|e| panic!("bad JSON {e}: {data}"))
        };
        if let Some(n) = &name {
            assert_eq!(v["type"], n.as_str(), "event name must match data.type");
        }
        evs.push((name, v));
    }
    evs
}
