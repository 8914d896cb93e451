//! Bounded mutation fuzzing of everything that parses untrusted bytes.
//!
//! cargo-fuzz needs a nightly toolchain, which CI does not have, so this harness
//! runs the same idea on stable inside the test binary: start from recorded wire
//! fixtures and valid requests, mutate them (bit flips, byte edits, splices,
//! truncation, deep nesting, random cuts into TCP-sized pieces) and feed every parser
//! and translator the gateway exposes to clients or upstreams. Any panic fails the
//! test and prints the seed and the input, which then becomes a regression case
//! below.
//!
//! `LLM_GATEWAY_FUZZ_MS` sets the time per target (default 1500 ms, so CI stays
//! fast); `LLM_GATEWAY_FUZZ_SEED` replays one run; `LLM_GATEWAY_FUZZ_REPLAY=FILE`
//! feeds a saved failing input (the panic message names it) to every target first.

use bytes::BytesMut;
use llm_gateway::config::{Config, Model};
use llm_gateway::demo::demo_yaml_for_serve;
use llm_gateway::error::ApiFormat;
use llm_gateway::providers::sse::SseParser;
use llm_gateway::providers::{self, ClientRequest, ResponseTranslator};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

const ANTHROPIC_TEXT: &[u8] = include_bytes!("../fixtures/providers/anthropic_text.sse");
const ANTHROPIC_TOOL: &[u8] = include_bytes!("../fixtures/providers/anthropic_tool.sse");
const ANTHROPIC_ERROR: &[u8] = include_bytes!("../fixtures/providers/anthropic_error.sse");
const ANTHROPIC_MESSAGE: &[u8] = include_bytes!("../fixtures/providers/anthropic_message.json");
const OPENAI_TEXT: &[u8] = include_bytes!("../fixtures/providers/openai_text.sse");
const OPENAI_TOOL: &[u8] = include_bytes!("../fixtures/providers/openai_tool.sse");
const OPENAI_ERROR: &[u8] = include_bytes!("../fixtures/providers/openai_error.sse");
const OPENAI_NO_USAGE: &[u8] = include_bytes!("../fixtures/providers/openai_no_usage.sse");
const OPENAI_COMPLETION: &[u8] = include_bytes!("../fixtures/providers/openai_completion.json");

const CHAT_REQUESTS: &[&str] = &[
    r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#,
    r#"{"model":"claude-haiku","stream":true,"stream_options":{"include_usage":true},"temperature":0,"max_tokens":64,"messages":[{"role":"system","content":"be brief"},{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]}"#,
    r#"{"model":"gpt-4o-mini","tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object","properties":{"x":{"type":"string"}}}}}],"tool_choice":"auto","messages":[{"role":"user","content":"q"},{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{\"x\":\"1\"}"}}]},{"role":"tool","tool_call_id":"c1","content":"r"}],"stop":["\n"],"top_p":0.5}"#,
];

const MESSAGES_REQUESTS: &[&str] = &[
    r#"{"model":"claude-haiku","max_tokens":32,"messages":[{"role":"user","content":"hi"}]}"#,
    r#"{"model":"gpt-4o-mini","stream":true,"max_tokens":32,"system":[{"type":"text","text":"s"}],"stop_sequences":["x"],"messages":[{"role":"user","content":[{"type":"text","text":"a"}]},{"role":"assistant","content":[{"type":"tool_use","id":"t1","name":"f","input":{"a":1}}]},{"role":"user","content":[{"type":"tool_result","tool_use_id":"t1","content":"ok"}]}],"tools":[{"name":"f","input_schema":{"type":"object"}}],"tool_choice":{"type":"any"}}"#,
];

fn budget() -> Duration {
    let ms = std::env::var("LLM_GATEWAY_FUZZ_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500);
    Duration::from_millis(ms)
}

fn seed() -> u64 {
    std::env::var("LLM_GATEWAY_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| rand::rng().random())
}

/// One mutation of `input`, sometimes several stacked.
fn mutate(rng: &mut StdRng, input: &[u8], corpus: &[&[u8]]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        let len = out.len();
        match rng.random_range(0..9) {
            0 if len > 0 => {
                let i = rng.random_range(0..len);
                out[i] ^= 1 << rng.random_range(0..8);
            }
            1 if len > 0 => {
                let i = rng.random_range(0..len);
                out[i] = rng.random();
            }
            2 => {
                let i = rng.random_range(0..=len);
                let interesting: &[&[u8]] = &[
                    b"\n\n",
                    b"\r\n",
                    b"\r",
                    b"data: ",
                    b"event: ",
                    b"[DONE]",
                    b"{",
                    b"}",
                    b"[",
                    b"\"",
                    b"\\u0000",
                    b"\xff\xfe",
                    b"\xe2\x82",
                    b"null",
                    b"-1",
                    b"18446744073709551616",
                    b"1e400",
                    b"\"usage\":{\"prompt_tokens\":4294967296}",
                ];
                let piece = interesting[rng.random_range(0..interesting.len())];
                out.splice(i..i, piece.iter().copied());
            }
            3 if len > 0 => {
                let a = rng.random_range(0..len);
                let b = rng.random_range(a..=len.min(a + 64));
                out.drain(a..b);
            }
            4 if len > 0 => {
                out.truncate(rng.random_range(0..len));
            }
            5 => {
                // Splice a piece of another corpus entry in.
                let other = corpus[rng.random_range(0..corpus.len())];
                if !other.is_empty() {
                    let a = rng.random_range(0..other.len());
                    let b = rng.random_range(a..=other.len());
                    let i = rng.random_range(0..=len);
                    out.splice(i..i, other[a..b].iter().copied());
                }
            }
            6 if len > 0 => {
                // Duplicate a region: repeated events, repeated keys.
                let a = rng.random_range(0..len);
                let b = rng.random_range(a..=len.min(a + 256));
                let piece = out[a..b].to_vec();
                out.splice(b..b, piece);
            }
            7 => {
                let depth = rng.random_range(1..4000);
                let i = rng.random_range(0..=len);
                let mut nest = "[".repeat(depth).into_bytes();
                nest.extend(std::iter::repeat_n(b']', rng.random_range(0..=depth)));
                out.splice(i..i, nest);
            }
            _ => {}
        }
    }
    out
}

/// Random cut points, so every parser also sees arbitrary TCP segmentation.
fn chunks(rng: &mut StdRng, input: &[u8]) -> Vec<std::ops::Range<usize>> {
    let mut cuts = Vec::new();
    let mut at = 0;
    while at < input.len() {
        let step = if rng.random_bool(0.3) {
            1
        } else {
            rng.random_range(1..=input.len().max(1))
        };
        let end = (at + step).min(input.len());
        cuts.push(at..end);
        at = end;
    }
    cuts
}

/// Runs `body` on mutated inputs until the time budget is spent; a panic fails the
/// test with what is needed to replay it.
fn fuzz(name: &str, corpus: &[&[u8]], mut body: impl FnMut(&mut StdRng, &[u8])) -> u64 {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let deadline = Instant::now() + budget();
    let mut runs = 0u64;
    // Unmutated inputs first: the harness must accept what is valid.
    let mut queue: Vec<Vec<u8>> = corpus.iter().map(|c| c.to_vec()).collect();
    // A saved failing input, replayed first through every target.
    if let Some(saved) = std::env::var_os("LLM_GATEWAY_FUZZ_REPLAY") {
        queue.push(std::fs::read(saved).expect("LLM_GATEWAY_FUZZ_REPLAY names a readable file"));
    }
    loop {
        let input = match queue.pop() {
            Some(i) => i,
            None => {
                if Instant::now() >= deadline {
                    break;
                }
                let base = corpus[rng.random_range(0..corpus.len())];
                mutate(&mut rng, base, corpus)
            }
        };
        let mut case_rng = StdRng::seed_from_u64(rng.random());
        let outcome = catch_unwind(AssertUnwindSafe(|| body(&mut case_rng, &input)));
        if outcome.is_err() {
            let saved = std::env::temp_dir().join(format!("llm-gateway-fuzz-{name}-{seed}.bin"));
            let _ = std::fs::write(&saved, &input);
            panic!(
                "fuzz target {name} panicked (LLM_GATEWAY_FUZZ_SEED={seed}); input saved to {}: {:?}",
                saved.display(),
                String::from_utf8_lossy(&input[..input.len().min(2000)])
            );
        }
        runs += 1;
    }
    eprintln!("fuzz {name}: {runs} inputs, seed {seed}");
    runs
}

fn demo_models() -> (Arc<Model>, Arc<Model>) {
    let cfg = Config::from_yaml_str(&demo_yaml_for_serve()).expect("demo config");
    let openai = cfg.model("gpt-4o-mini").expect("openai model").clone();
    let anthropic = cfg.model("claude-haiku").expect("anthropic model").clone();
    (openai, anthropic)
}

#[test]
fn sse_parser_survives_any_bytes() {
    let corpus = [
        ANTHROPIC_TEXT,
        ANTHROPIC_TOOL,
        ANTHROPIC_ERROR,
        OPENAI_TEXT,
        OPENAI_TOOL,
        OPENAI_ERROR,
        OPENAI_NO_USAGE,
    ];
    let runs = fuzz("sse", &corpus, |rng, input| {
        let mut p = SseParser::new();
        let mut seen = 0usize;
        for r in chunks(rng, input) {
            p.push(&input[r]);
            while let Some(ev) = p.next_event() {
                seen += ev.raw.len();
            }
        }
        // Nothing is invented or lost: events plus the unfinished tail are the input.
        assert!(seen + p.pending().len() <= input.len());
    });
    assert!(runs > corpus.len() as u64);
}

#[test]
fn request_parsing_and_translation_survive_any_body() {
    let (openai, anthropic) = demo_models();
    let chat: Vec<&[u8]> = CHAT_REQUESTS.iter().map(|s| s.as_bytes()).collect();
    let messages: Vec<&[u8]> = MESSAGES_REQUESTS.iter().map(|s| s.as_bytes()).collect();
    for (format, corpus) in [
        (ApiFormat::OpenAi, &chat),
        (ApiFormat::Anthropic, &messages),
    ] {
        let mut accepted = 0u64;
        fuzz("request", corpus, |_, input| {
            if let Ok(req) = ClientRequest::parse(format, input) {
                accepted += 1;
                for model in [&openai, &anthropic] {
                    if let Ok(up) = providers::prepare(&req, target(model)) {
                        // What goes upstream is JSON whatever came in.
                        assert!(serde_json::from_slice::<serde_json::Value>(&up.body).is_ok());
                    }
                }
            }
        });
        assert!(
            accepted >= corpus.len() as u64,
            "valid requests were refused"
        );
    }
}

#[test]
fn cache_key_canonicalisation_survives_any_body_and_keeps_tenants_apart() {
    use llm_gateway::cache::key::{deterministic, digest, Directive, KeyParts};
    let corpus: Vec<&[u8]> = CHAT_REQUESTS.iter().map(|s| s.as_bytes()).collect();
    let chain = [
        ("gpt-4o-mini", "gpt-4o-mini"),
        ("claude-haiku", "claude-3-haiku"),
    ];
    let parts = |tenant| KeyParts {
        tenant,
        generation: 0,
        endpoint: "chat_completions",
        chain: &chain,
        headers: &[None, Some("2023-06-01")],
    };
    let mut objects = 0u64;
    let runs = fuzz("cache-key", &corpus, |_, input| {
        let _ = Directive::parse(std::str::from_utf8(input).ok());
        let Ok(serde_json::Value::Object(body)) = serde_json::from_slice(input) else {
            return;
        };
        objects += 1;
        let _ = deterministic(&body);
        let a = digest(&parts("acme"), &body);
        // Stable, blind to how the JSON was spelled, and never shared across tenants.
        assert_eq!(a, digest(&parts("acme"), &body));
        let respelled = serde_json::to_string_pretty(&body).expect("a parsed body prints");
        let again: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&respelled).expect("a printed body parses");
        assert_eq!(a, digest(&parts("acme"), &again));
        assert_ne!(a, digest(&parts("globex"), &body));
    });
    assert!(runs > corpus.len() as u64);
    assert!(
        objects >= corpus.len() as u64,
        "valid bodies were not parsed"
    );
}

/// Client format, streamed or not, the serving model, and upstream bodies to start from.
type Case<'a> = (ApiFormat, bool, &'a Arc<Model>, &'a [&'a [u8]]);

#[test]
fn response_translators_survive_any_upstream_bytes() {
    let (openai, anthropic) = demo_models();
    let streams_openai = [OPENAI_TEXT, OPENAI_TOOL, OPENAI_ERROR, OPENAI_NO_USAGE];
    let streams_anthropic = [ANTHROPIC_TEXT, ANTHROPIC_TOOL, ANTHROPIC_ERROR];
    let cases: [Case; 8] = [
        (ApiFormat::OpenAi, true, &openai, &streams_openai),
        (ApiFormat::OpenAi, false, &openai, &[OPENAI_COMPLETION]),
        (ApiFormat::OpenAi, true, &anthropic, &streams_anthropic),
        (ApiFormat::OpenAi, false, &anthropic, &[ANTHROPIC_MESSAGE]),
        (ApiFormat::Anthropic, true, &anthropic, &streams_anthropic),
        (
            ApiFormat::Anthropic,
            false,
            &anthropic,
            &[ANTHROPIC_MESSAGE],
        ),
        (ApiFormat::Anthropic, true, &openai, &streams_openai),
        (ApiFormat::Anthropic, false, &openai, &[OPENAI_COMPLETION]),
    ];
    for (format, stream, model, corpus) in cases {
        let raw = match format {
            ApiFormat::OpenAi => CHAT_REQUESTS[0],
            ApiFormat::Anthropic => MESSAGES_REQUESTS[0],
        };
        let mut body: serde_json::Value = serde_json::from_str(raw).expect("json");
        body["stream"] = serde_json::Value::Bool(stream);
        let req = ClientRequest::parse(format, body.to_string().as_bytes()).expect("request");
        let up = providers::prepare(&req, target(model)).expect("prepare");
        let mut completed = 0u64;
        let label = format!("translator-{format:?}-{}-stream{stream}", model.name);
        fuzz(&label, corpus, |rng, input| {
            let mut t = ResponseTranslator::new(&req, &up, target(model));
            let mut out = BytesMut::new();
            for r in chunks(rng, input) {
                t.feed(&input[r], &mut out);
                let _ = t.snapshot();
            }
            let done = t.finish(&mut out);
            if done.complete {
                completed += 1;
            }
            // Translation never amplifies without bound (a guard against a loop that
            // re-emits its buffer). The factor is loose on purpose: OpenAI chunks repeat
            // the upstream's model id, so a long id legitimately multiplies the bytes.
            assert!(
                out.len() <= input.len() * 32 + (64 << 10),
                "output blew up: {} bytes out of {} in",
                out.len(),
                input.len()
            );
        });
        assert!(
            completed > 0,
            "no fixture completed for {format:?} stream={stream}"
        );
    }
}

#[test]
fn config_parsing_survives_any_yaml() {
    let demo = demo_yaml_for_serve();
    let corpus: [&[u8]; 1] = [demo.as_bytes()];
    let mut valid = 0u64;
    fuzz("config", &corpus, |_, input| {
        if let Ok(text) = std::str::from_utf8(input) {
            match Config::from_yaml_str(text) {
                Ok(_) => valid += 1,
                // Every refusal explains itself.
                Err(e) => assert!(!e.to_string().trim().is_empty()),
            }
        }
    });
    assert!(valid >= 1, "the demo config must parse");
}

/// A model's first deployment as an attempt's target.
fn target(model: &llm_gateway::config::Model) -> llm_gateway::config::Target<'_> {
    llm_gateway::config::Target {
        model,
        dep: &model.deployments[0],
    }
}
