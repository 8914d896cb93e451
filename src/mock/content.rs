//! Deterministic reply content and the provider-neutral stream plan.
//!
//! Replies must be reproducible (cache tests compare bodies, translation tests
//! compare the two formats) yet differ between prompts (so a cache mix-up is
//! visible). The reply is therefore derived from a sha256 of the prompt *text*
//! only, not of roles or JSON layout, so the same conversation sent as OpenAI or
//! as Anthropic (e.g. after the gateway translated it) gets the same words and the
//! same usage numbers.

use super::directives::{Directives, Fault};
use bytes::Bytes;
use rand::Rng;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Short words the reply is made of; 64 of them so a byte of the PRNG picks one.
const WORDS: [&str; 64] = [
    "alpha", "bravo", "cedar", "delta", "ember", "fjord", "gamma", "harbor", "iris", "jade",
    "kite", "lumen", "maple", "nova", "onyx", "pixel", "quartz", "river", "sable", "tango",
    "umber", "vivid", "willow", "xenon", "yarrow", "zephyr", "amber", "basil", "coral", "dune",
    "echo", "flint", "grove", "haze", "ivory", "juniper", "karma", "lotus", "mesa", "nectar",
    "orbit", "prism", "quill", "raven", "slate", "thyme", "ultra", "velvet", "wren", "yonder",
    "zinc", "acorn", "birch", "comet", "drift", "elm", "frost", "glade", "heron", "inlet",
    "jasper", "knoll", "lark", "moss",
];

/// Arguments of every mocked tool call, and how they are split into stream fragments.
pub const TOOL_ARG_FRAGMENTS: [&str; 2] = ["{\"x\"", ":1}"];

/// The prompt as plain texts, one per message (a system prompt counts as one).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Prompt {
    pub texts: Vec<String>,
}

/// Appends `s` to `out`, separating pieces with a newline.
fn push_piece(out: &mut String, s: &str) {
    if s.is_empty() {
        return;
    }
    if !out.is_empty() {
        out.push('\n');
    }
    out.push_str(s);
}

/// Collects the text of a content value: a string, or an array of blocks (text,
/// tool results, Anthropic tool_use), so directives hidden in any of them count.
fn collect_text(v: &Value, out: &mut String) {
    match v {
        Value::String(s) => push_piece(out, s),
        Value::Array(items) => items.iter().for_each(|b| collect_text(b, out)),
        Value::Object(block) => {
            if let Some(Value::String(t)) = block.get("text") {
                push_piece(out, t);
            } else if let Some(content) = block.get("content") {
                collect_text(content, out);
            } else if block.get("type").and_then(Value::as_str) == Some("tool_use") {
                if let Some(Value::String(name)) = block.get("name") {
                    push_piece(out, name);
                }
                if let Some(input) = block.get("input") {
                    push_piece(out, &input.to_string());
                }
            }
        }
        _ => {}
    }
}

impl Prompt {
    /// Texts of an OpenAI `messages` array (system/developer messages included,
    /// assistant tool_calls included as name + arguments).
    pub fn from_openai(body: &Value) -> Prompt {
        let mut texts = Vec::new();
        for m in body
            .get("messages")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let mut t = String::new();
            if let Some(c) = m.get("content") {
                collect_text(c, &mut t);
            }
            for call in m
                .get("tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(f) = call.get("function") {
                    for k in ["name", "arguments"] {
                        if let Some(Value::String(s)) = f.get(k) {
                            push_piece(&mut t, s);
                        }
                    }
                }
            }
            texts.push(t);
        }
        Prompt { texts }
    }

    /// Texts of an Anthropic request: `system` (string or blocks) then `messages`.
    pub fn from_anthropic(body: &Value) -> Prompt {
        let mut texts = Vec::new();
        if let Some(system) = body.get("system") {
            let mut t = String::new();
            collect_text(system, &mut t);
            if !t.is_empty() {
                texts.push(t);
            }
        }
        for m in body
            .get("messages")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let mut t = String::new();
            if let Some(c) = m.get("content") {
                collect_text(c, &mut t);
            }
            texts.push(t);
        }
        Prompt { texts }
    }

    /// Estimated prompt tokens: ceil(chars / 4) + 3 per message, like a tokenizer
    /// would roughly count, identical for both wire formats.
    pub fn prompt_tokens(&self) -> u32 {
        let total: u64 = self
            .texts
            .iter()
            .map(|t| (t.chars().count() as u64).div_ceil(4) + 3)
            .sum();
        u32::try_from(total).unwrap_or(u32::MAX)
    }

    /// Every `[[mock: ...]]` directive in the prompt, later ones winning.
    pub fn directives(&self) -> Directives {
        let mut d = Directives::default();
        for t in &self.texts {
            d.scan_text(t);
        }
        d
    }

    fn seed(&self) -> u64 {
        let mut h = Sha256::new();
        for t in &self.texts {
            h.update(t.as_bytes());
            h.update([0x1e]);
        }
        let digest = h.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        u64::from_le_bytes(first)
    }
}

/// splitmix64: tiny, fast and good enough to pick words.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Why generation stopped, mapped to each format's own vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Stop,
    Length,
    ToolCalls,
}

/// A tool call the mock decided to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub name: String,
}

impl ToolCall {
    /// The full arguments JSON (the concatenation of the stream fragments).
    pub fn arguments() -> String {
        TOOL_ARG_FRAGMENTS.concat()
    }
}

/// The reply of one request, before it is put into a wire format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    /// One entry per token, each a word followed by a space.
    pub pieces: Vec<String>,
    pub finish: Finish,
    pub tool: Option<ToolCall>,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

impl Generation {
    /// The whole reply text.
    pub fn text(&self) -> String {
        self.pieces.concat()
    }
}

/// Builds the reply: `min(tokens, max_tokens)` words seeded by the prompt, or a
/// tool call when one was asked for and the request offers tools.
pub fn generate(
    prompt: &Prompt,
    tokens: u32,
    max_tokens: Option<u64>,
    tool: Option<String>,
) -> Generation {
    let prompt_tokens = prompt.prompt_tokens();
    if let Some(name) = tool {
        let completion = (name.len() + ToolCall::arguments().len()).div_ceil(4) + 1;
        return Generation {
            pieces: Vec::new(),
            finish: Finish::ToolCalls,
            tool: Some(ToolCall { name }),
            prompt_tokens,
            completion_tokens: u32::try_from(completion).unwrap_or(u32::MAX),
        };
    }
    let limit = max_tokens.map_or(u64::from(tokens), |m| m.min(u64::from(tokens)));
    let n = u32::try_from(limit).unwrap_or(tokens);
    let mut state = prompt.seed();
    let pieces = (0..n)
        .map(|_| {
            let w = WORDS[(splitmix64(&mut state) % WORDS.len() as u64) as usize];
            format!("{w} ")
        })
        .collect();
    Generation {
        pieces,
        finish: if n < tokens {
            Finish::Length
        } else {
            Finish::Stop
        },
        tool: None,
        prompt_tokens,
        completion_tokens: n,
    }
}

/// A random id with a provider's prefix, e.g. `chatcmpl-…`, `msg_…`.
pub fn random_id(prefix: &str, len: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let mut s = String::with_capacity(prefix.len() + len);
    s.push_str(prefix);
    for _ in 0..len {
        s.push(char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]));
    }
    s
}

/// Unix seconds, for `created` fields.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// One thing the stream writer does, in order. The plan is built purely so the
/// event sequences can be unit-tested without a socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Write this as one body frame.
    Data(Bytes),
    /// Wait this many milliseconds.
    Sleep(u64),
    /// Abort the connection (no terminating chunk).
    Abort,
    /// Send nothing more but keep the connection open until the client leaves.
    Stall,
}

/// A streamed reply split in the parts faults act on.
#[derive(Debug, Default)]
pub struct StreamParts {
    /// Events before the first content event (role chunk / message_start...).
    pub head: Vec<Bytes>,
    /// One event per token or tool-argument fragment.
    pub content: Vec<Bytes>,
    /// Events after the content (finish, usage, `[DONE]` / message_stop...).
    pub tail: Vec<Bytes>,
    /// The in-band error event for `fault=midstream_error`.
    pub error_event: Bytes,
    /// The event for `fault=garbage`.
    pub garbage_event: Bytes,
}

/// Timing and fault of a stream, resolved from directives and server defaults.
#[derive(Debug, Clone, Copy, Default)]
pub struct StreamShape {
    pub ttft_ms: u64,
    pub gap_ms: u64,
    pub fault: Option<Fault>,
    pub cut_after: Option<u32>,
}

/// Orders the parts into steps: wait `ttft_ms` (headers are already out), the
/// head, the content with `gap_ms` between events, then the tail — or the fault.
pub fn assemble(parts: StreamParts, shape: StreamShape) -> Vec<Step> {
    let mut steps =
        Vec::with_capacity(parts.head.len() + 2 * parts.content.len() + parts.tail.len() + 2);
    if shape.fault == Some(Fault::Stall) {
        steps.push(Step::Stall);
        return steps;
    }
    if shape.ttft_ms > 0 {
        steps.push(Step::Sleep(shape.ttft_ms));
    }
    if shape.fault == Some(Fault::Garbage) {
        steps.push(Step::Data(parts.garbage_event));
        return steps;
    }
    let total = parts.content.len();
    let stop_at = match shape.fault {
        Some(Fault::Cut | Fault::MidstreamError) => shape
            .cut_after
            .map_or(total / 2, |n| (n as usize).min(total)),
        _ => total,
    };
    steps.extend(parts.head.into_iter().map(Step::Data));
    for (i, event) in parts.content.into_iter().take(stop_at).enumerate() {
        if i > 0 && shape.gap_ms > 0 {
            steps.push(Step::Sleep(shape.gap_ms));
        }
        steps.push(Step::Data(event));
    }
    match shape.fault {
        Some(Fault::Cut) => steps.push(Step::Abort),
        Some(Fault::MidstreamError) => steps.push(Step::Data(parts.error_event)),
        _ => steps.extend(parts.tail.into_iter().map(Step::Data)),
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn same_prompt_same_reply_in_both_formats() {
        let oa = json!({"model":"m","messages":[
            {"role":"system","content":"be brief"},
            {"role":"user","content":[{"type":"text","text":"hello there"}]}]});
        let an = json!({"model":"m","max_tokens":100,"system":[{"type":"text","text":"be brief"}],
            "messages":[{"role":"user","content":"hello there"}]});
        let p1 = Prompt::from_openai(&oa);
        let p2 = Prompt::from_anthropic(&an);
        assert_eq!(p1, p2);
        let g1 = generate(&p1, 16, None, None);
        let g2 = generate(&p2, 16, None, None);
        assert_eq!(g1, g2);
        assert_eq!(g1.pieces.len(), 16);
        assert!(g1.pieces.iter().all(|p| p.ends_with(' ') && p.len() > 1));
        // "be brief" = 8 chars -> 2 + 3; "hello there" = 11 chars -> 3 + 3.
        assert_eq!(g1.prompt_tokens, 11);
        assert_eq!(g1.completion_tokens, 16);
        assert_eq!(g1.finish, Finish::Stop);
    }

    #[test]
    fn different_prompts_differ_and_max_tokens_cuts() {
        let a = Prompt {
            texts: vec!["one".into()],
        };
        let b = Prompt {
            texts: vec!["two".into()],
        };
        assert_ne!(
            generate(&a, 16, None, None).text(),
            generate(&b, 16, None, None).text()
        );
        let cut = generate(&a, 16, Some(5), None);
        assert_eq!(cut.pieces.len(), 5);
        assert_eq!(cut.finish, Finish::Length);
        assert_eq!(generate(&a, 16, Some(16), None).finish, Finish::Stop);
        assert!(generate(&a, 16, None, None).text().starts_with(&cut.text()));
    }

    #[test]
    fn tool_call_generation() {
        let g = generate(&Prompt::default(), 16, None, Some("get_weather".into()));
        assert_eq!(g.finish, Finish::ToolCalls);
        assert!(g.pieces.is_empty());
        assert_eq!(ToolCall::arguments(), "{\"x\":1}");
        assert!(g.completion_tokens > 0);
    }

    #[test]
    fn collects_directives_from_blocks_and_tool_results() {
        let an = json!({"messages":[{"role":"user","content":[
            {"type":"tool_result","tool_use_id":"t","content":[{"type":"text","text":"[[mock: status=503]]"}]}]}]});
        assert_eq!(Prompt::from_anthropic(&an).directives().status, Some(503));
    }

    fn parts() -> StreamParts {
        StreamParts {
            head: vec![Bytes::from_static(b"H")],
            content: (0..4).map(|i| Bytes::from(format!("C{i}"))).collect(),
            tail: vec![Bytes::from_static(b"T")],
            error_event: Bytes::from_static(b"E"),
            garbage_event: Bytes::from_static(b"G"),
        }
    }

    fn data(steps: &[Step]) -> Vec<String> {
        steps
            .iter()
            .filter_map(|s| match s {
                Step::Data(b) => Some(String::from_utf8_lossy(b).into_owned()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn assemble_orders_and_injects_faults() {
        let shape = StreamShape {
            ttft_ms: 10,
            gap_ms: 5,
            ..Default::default()
        };
        let normal = assemble(parts(), shape);
        assert_eq!(normal[0], Step::Sleep(10));
        assert_eq!(data(&normal), ["H", "C0", "C1", "C2", "C3", "T"]);
        assert_eq!(normal.iter().filter(|s| **s == Step::Sleep(5)).count(), 3);

        let cut = assemble(
            parts(),
            StreamShape {
                fault: Some(Fault::Cut),
                cut_after: Some(3),
                ..shape
            },
        );
        assert_eq!(data(&cut), ["H", "C0", "C1", "C2"]);
        assert_eq!(cut.last(), Some(&Step::Abort));

        let mid = assemble(
            parts(),
            StreamShape {
                fault: Some(Fault::MidstreamError),
                ..shape
            },
        );
        assert_eq!(data(&mid), ["H", "C0", "C1", "E"]);

        let garbage = assemble(
            parts(),
            StreamShape {
                fault: Some(Fault::Garbage),
                ..shape
            },
        );
        assert_eq!(data(&garbage), ["G"]);
        let stall = assemble(
            parts(),
            StreamShape {
                fault: Some(Fault::Stall),
                ..shape
            },
        );
        assert_eq!(stall, [Step::Stall]);
    }
}
