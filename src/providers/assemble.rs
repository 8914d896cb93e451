//! Non-streaming answers assembled from the provider's stream.
//!
//! A non-streaming request is sent upstream as a stream so that the attempt can bound
//! it by `first_token_ms` and `idle_ms` (a provider that stalls is left for the next
//! candidate within seconds, not after `total_ms`). The client still asked for one
//! JSON document, so the events are folded here into the body the provider would have
//! sent non-streamed: same members, same key order, usage copied as the provider
//! counted it. Nothing is invented that the stream did not carry (a member the
//! non-streamed body has but no event mentions stays out), with the exceptions the
//! provider's own format makes mandatory (`refusal: null`, `logprobs: null`).
//!
//! [`Assembled`] wraps the body translator the non-stream path would have used: the
//! assembled body goes through it exactly as a provider's body would, so the client's
//! bytes and the [`Completion`] (usage, content bytes) are those of the non-stream
//! path. A stream that ends without its terminator, carries an error event or cannot
//! be read is never assembled: the attempt fails (and the chain moves on) as it does
//! for a cut or unreadable body today.

use super::anthropic::{event_type, AnthropicUsage};
use super::openai::parse_usage;
use super::sse::{SseEvent, SseParser};
use super::{Completion, ResponseTranslator, Translate, Usage};
use bytes::BytesMut;
use serde_json::{Map, Value};

/// Why an assembled (or any non-streamed) answer cannot be delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unfinished {
    /// Not the provider's format: no event or body could be read.
    Unreadable,
    /// Valid events, then the stream ended before its terminator.
    Cut,
    /// The provider's own error event.
    ProviderError,
}

/// How far a stream got, shared by both assemblers.
#[derive(Debug, Default, Clone, Copy)]
struct Progress {
    /// Events read, of any kind (`ping` included): the first one is when a streaming
    /// client would have had its first byte.
    events: usize,
    /// `[DONE]` / `message_stop`.
    ended: bool,
    upstream_error: bool,
    /// An event that could not be read: the whole answer is unreadable.
    broken: bool,
    content_bytes: usize,
}

impl Progress {
    fn complete(&self) -> bool {
        self.ended && !self.upstream_error && !self.broken
    }

    fn completion(&self, usage: Option<Usage>) -> Completion {
        Completion {
            usage,
            complete: self.complete(),
            upstream_error: self.upstream_error,
            content_bytes: self.content_bytes,
        }
    }

    fn unfinished(&self) -> Unfinished {
        if self.upstream_error {
            Unfinished::ProviderError
        } else if self.broken || self.events == 0 {
            Unfinished::Unreadable
        } else {
            Unfinished::Cut
        }
    }
}

/// Appends `delta` to `target` the way OpenAI's deltas compose: strings are
/// concatenated, objects merged member by member, anything else replaces (a `null`
/// never erases what came before). Used for members the assembler has no rule of its
/// own for (`reasoning_content` of vLLM, `audio`, legacy `function_call`, ...).
fn merge(target: &mut Map<String, Value>, delta: &Map<String, Value>) {
    for (k, v) in delta {
        match (target.get_mut(k), v) {
            (Some(_), Value::Null) => {}
            (Some(Value::String(t)), Value::String(s)) => t.push_str(s),
            (Some(Value::Object(t)), Value::Object(d)) => merge(t, d),
            _ => {
                target.insert(k.clone(), v.clone());
            }
        }
    }
}

/// Whether an object's keys come in sorted order, which is how Azure OpenAI
/// serialises every object (its non-streamed bodies too).
fn keys_sorted(o: &Map<String, Value>) -> bool {
    o.len() >= 3 && o.keys().zip(o.keys().skip(1)).all(|(a, b)| a <= b)
}

fn sort_deep(v: &mut Value) {
    match v {
        Value::Object(o) => {
            o.sort_keys();
            o.values_mut().for_each(sort_deep);
        }
        Value::Array(a) => a.iter_mut().for_each(sort_deep),
        _ => {}
    }
}

/// One tool call of one choice, by its stream `index`.
#[derive(Debug, Default)]
struct ToolCall {
    index: u64,
    id: Option<Value>,
    kind: Option<Value>,
    name: String,
    arguments: String,
    /// Members of `function` other than the two above, and of the call itself.
    extra: Map<String, Value>,
}

/// One choice, by its stream `index`.
#[derive(Debug, Default)]
struct Choice {
    index: u64,
    role: Option<Value>,
    /// `None` until a string arrives: a message of only tool calls or a refusal has
    /// `content: null`, as OpenAI's own non-streamed body does.
    content: Option<String>,
    refusal: Option<String>,
    tool_calls: Vec<ToolCall>,
    annotations: Option<Vec<Value>>,
    /// Other message members, merged by [`merge`].
    extra: Map<String, Value>,
    /// `logprobs.content` / `.refusal` token lists, concatenated.
    logprobs: Option<Map<String, Value>>,
    finish_reason: Value,
    /// Other choice members (Azure's `content_filter_results`): the last non-empty one.
    choice_extra: Map<String, Value>,
}

impl Choice {
    fn apply(&mut self, c: &Map<String, Value>, content_bytes: &mut usize) {
        if let Some(Value::Object(delta)) = c.get("delta") {
            self.delta(delta, content_bytes);
        }
        if let Some(Value::Object(lp)) = c.get("logprobs") {
            let acc = self.logprobs.get_or_insert_with(Map::new);
            for (k, v) in lp {
                match (acc.get_mut(k), v) {
                    (Some(Value::Array(a)), Value::Array(more)) => a.extend(more.iter().cloned()),
                    (Some(_), Value::Null) => {}
                    _ => {
                        acc.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        if let Some(f) = c.get("finish_reason").filter(|f| !f.is_null()) {
            self.finish_reason = f.clone();
        }
        for (k, v) in c {
            if matches!(k.as_str(), "index" | "delta" | "logprobs" | "finish_reason") {
                continue;
            }
            let empty = v.is_null() || v.as_object().is_some_and(Map::is_empty);
            if !empty || !self.choice_extra.contains_key(k) {
                self.choice_extra.insert(k.clone(), v.clone());
            }
        }
    }

    fn delta(&mut self, delta: &Map<String, Value>, content_bytes: &mut usize) {
        for (k, v) in delta {
            match (k.as_str(), v) {
                ("role", Value::String(_)) => self.role = Some(v.clone()),
                ("role", _) => {}
                ("content", Value::String(s)) => {
                    *content_bytes += s.len();
                    self.content.get_or_insert_with(String::new).push_str(s);
                }
                ("refusal", Value::String(s)) => {
                    *content_bytes += s.len();
                    self.refusal.get_or_insert_with(String::new).push_str(s);
                }
                ("content" | "refusal" | "tool_calls" | "annotations", Value::Null) => {}
                ("tool_calls", Value::Array(calls)) => {
                    for call in calls.iter().filter_map(Value::as_object) {
                        self.tool_call(call, content_bytes);
                    }
                }
                ("annotations", Value::Array(a)) => self
                    .annotations
                    .get_or_insert_with(Vec::new)
                    .extend(a.iter().cloned()),
                _ => {
                    if let Value::String(s) = v {
                        *content_bytes += s.len();
                    }
                    let one = Map::from_iter([(k.clone(), v.clone())]);
                    merge(&mut self.extra, &one);
                }
            }
        }
    }

    fn tool_call(&mut self, call: &Map<String, Value>, content_bytes: &mut usize) {
        // Parallel calls are told apart by `index`; a server that omits it sends
        // one call at a time, so a new `id` starts a new call.
        let index = match call.get("index").and_then(Value::as_u64) {
            Some(i) => i,
            None if call.get("id").is_some_and(Value::is_string) => self
                .tool_calls
                .last()
                .map_or(0, |t| t.index + u64::from(t.id.is_some())),
            None => self.tool_calls.last().map_or(0, |t| t.index),
        };
        let pos = match self.tool_calls.iter().position(|t| t.index == index) {
            Some(p) => p,
            None => {
                self.tool_calls.push(ToolCall {
                    index,
                    ..Default::default()
                });
                self.tool_calls.len() - 1
            }
        };
        let t = &mut self.tool_calls[pos];
        for (k, v) in call {
            match (k.as_str(), v) {
                ("index", _) | (_, Value::Null) => {}
                ("id", _) => t.id = Some(v.clone()),
                ("type", _) => t.kind = Some(v.clone()),
                ("function", Value::Object(f)) => {
                    for (fk, fv) in f {
                        match (fk.as_str(), fv) {
                            ("name", Value::String(s)) => t.name.push_str(s),
                            ("arguments", Value::String(s)) => {
                                *content_bytes += s.len();
                                t.arguments.push_str(s);
                            }
                            (_, Value::Null) => {}
                            _ => {
                                let one = Map::from_iter([(fk.clone(), fv.clone())]);
                                merge(&mut t.extra, &one);
                            }
                        }
                    }
                }
                _ => {
                    let one = Map::from_iter([(k.clone(), v.clone())]);
                    merge(&mut t.extra, &one);
                }
            }
        }
    }

    /// The non-streamed choice: `index`, `message` (`role`, `content`, `tool_calls`,
    /// `refusal`, `annotations`, then anything else), `logprobs`, `finish_reason`.
    fn into_json(self) -> Value {
        let mut m = Map::new();
        m.insert(
            "role".into(),
            self.role.unwrap_or_else(|| "assistant".into()),
        );
        m.insert(
            "content".into(),
            self.content.map_or(Value::Null, Value::from),
        );
        if !self.tool_calls.is_empty() {
            let calls = self.tool_calls.into_iter().map(|t| {
                let mut c = Map::new();
                c.insert("id".into(), t.id.unwrap_or_else(|| "".into()));
                c.insert("type".into(), t.kind.unwrap_or_else(|| "function".into()));
                let mut f = Map::new();
                f.insert("name".into(), t.name.into());
                f.insert("arguments".into(), t.arguments.into());
                c.insert("function".into(), Value::Object(f));
                c.extend(t.extra);
                Value::Object(c)
            });
            m.insert("tool_calls".into(), calls.collect());
        }
        m.insert(
            "refusal".into(),
            self.refusal.map_or(Value::Null, Value::from),
        );
        if let Some(a) = self.annotations {
            m.insert("annotations".into(), Value::Array(a));
        }
        m.extend(self.extra);
        let mut c = Map::new();
        c.insert("index".into(), self.index.into());
        c.insert("message".into(), Value::Object(m));
        c.insert(
            "logprobs".into(),
            self.logprobs.map_or(Value::Null, Value::Object),
        );
        c.insert("finish_reason".into(), self.finish_reason);
        c.extend(self.choice_extra);
        Value::Object(c)
    }
}

/// `chat.completion.chunk` events -> one `chat.completion` object.
///
/// Key order is OpenAI's non-streamed one (`id`, `object`, `created`, `model`,
/// `choices`, `usage`, `service_tier`, `system_fingerprint`); a stream whose every
/// chunk has sorted keys (Azure OpenAI) gives a body with sorted keys, as Azure's
/// non-streamed answers have. `usage` is the usage chunk's object, verbatim.
#[derive(Debug, Default)]
pub struct OpenAiAssembler {
    parser: SseParser,
    progress: Progress,
    id: Option<Value>,
    created: Option<Value>,
    model: Option<Value>,
    service_tier: Option<Value>,
    system_fingerprint: Option<Value>,
    choices: Vec<Choice>,
    usage_json: Option<Value>,
    usage: Option<Usage>,
    /// Other top-level members (Azure's `prompt_filter_results`).
    extra: Map<String, Value>,
    /// Every chunk so far had sorted keys.
    sorted: Option<bool>,
}

/// Top-level chunk members the assembler places itself or drops (`obfuscation` is
/// random padding that only streams carry).
const CHUNK_OWN: &[&str] = &[
    "id",
    "object",
    "created",
    "model",
    "service_tier",
    "system_fingerprint",
    "choices",
    "usage",
    "obfuscation",
];

impl OpenAiAssembler {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, chunk: &[u8]) {
        self.parser.push(chunk);
        while let Some(ev) = self.parser.next_event() {
            if self.progress.ended || self.progress.broken || self.progress.upstream_error {
                continue;
            }
            self.progress.events += 1;
            if &ev.data[..] == b"[DONE]" {
                self.progress.ended = true;
                continue;
            }
            match serde_json::from_slice::<Value>(&ev.data) {
                Ok(Value::Object(o)) if o.get("error").is_some_and(|e| !e.is_null()) => {
                    self.progress.upstream_error = true;
                }
                Ok(Value::Object(o)) => self.chunk(&o),
                _ => self.progress.broken = true,
            }
        }
    }

    fn chunk(&mut self, o: &Map<String, Value>) {
        let sorted = keys_sorted(o);
        self.sorted = Some(self.sorted.unwrap_or(true) && sorted);
        // Azure's first chunk has an empty `id` and `model` and `created: 0`: the
        // first real value wins.
        let real = |v: &Value| !(v.is_null() || v == "" || v == 0);
        for (slot, key) in [
            (&mut self.id, "id"),
            (&mut self.created, "created"),
            (&mut self.model, "model"),
        ] {
            if slot.is_none() {
                *slot = o.get(key).filter(|v| real(v)).cloned();
            }
        }
        for (slot, key) in [
            (&mut self.service_tier, "service_tier"),
            (&mut self.system_fingerprint, "system_fingerprint"),
        ] {
            if let Some(v) = o.get(key) {
                if !v.is_null() || slot.is_none() {
                    *slot = Some(v.clone());
                }
            }
        }
        if let Some(u) = o.get("usage").filter(|u| u.is_object()) {
            self.usage = parse_usage(u);
            self.usage_json = Some(u.clone());
        }
        for c in o
            .get("choices")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_object)
        {
            let index = c.get("index").and_then(Value::as_u64).unwrap_or(0);
            let pos = match self.choices.iter().position(|ch| ch.index == index) {
                Some(p) => p,
                None => {
                    self.choices.push(Choice {
                        index,
                        ..Default::default()
                    });
                    self.choices.len() - 1
                }
            };
            self.choices[pos].apply(c, &mut self.progress.content_bytes);
        }
        for (k, v) in o {
            if !CHUNK_OWN.contains(&k.as_str()) {
                self.extra.insert(k.clone(), v.clone());
            }
        }
    }

    /// Whether any event was read: a streaming client would have had a byte.
    pub fn started(&self) -> bool {
        self.progress.events > 0
    }

    pub fn snapshot(&self) -> Completion {
        self.progress.completion(self.usage)
    }

    /// The assembled body, when the stream ended properly with at least one chunk.
    pub fn finish(&mut self) -> Result<Vec<u8>, Unfinished> {
        if !self.progress.complete() || self.id.is_none() && self.choices.is_empty() {
            return Err(self.progress.unfinished());
        }
        let mut choices = std::mem::take(&mut self.choices);
        choices.sort_by_key(|c| c.index);
        let mut body = Map::new();
        body.insert("id".into(), self.id.take().unwrap_or_else(|| "".into()));
        body.insert("object".into(), "chat.completion".into());
        body.insert("created".into(), self.created.take().unwrap_or(0.into()));
        body.insert(
            "model".into(),
            self.model.take().unwrap_or_else(|| "".into()),
        );
        body.insert(
            "choices".into(),
            choices.into_iter().map(Choice::into_json).collect(),
        );
        if let Some(u) = self.usage_json.take() {
            body.insert("usage".into(), u);
        }
        if let Some(t) = self.service_tier.take() {
            body.insert("service_tier".into(), t);
        }
        if let Some(f) = self.system_fingerprint.take() {
            body.insert("system_fingerprint".into(), f);
        }
        body.extend(std::mem::take(&mut self.extra));
        let mut body = Value::Object(body);
        if self.sorted == Some(true) {
            sort_deep(&mut body);
        }
        Ok(body.to_string().into_bytes())
    }
}

/// One content block being assembled.
#[derive(Debug)]
struct Block {
    block: Map<String, Value>,
    /// `input_json_delta` pieces of a tool-use block, parsed when the block stops.
    json: String,
}

/// Anthropic message events -> one `message` object.
///
/// The `message_start` message is the skeleton (its key order is the non-streamed
/// body's); content blocks come from `content_block_start` with their deltas applied
/// (text, thinking, signature, citations, tool input parsed from the concatenated
/// `input_json_delta`s); `message_delta` sets its `delta` members (`stop_reason`,
/// `stop_sequence`, `container`, ...) and updates `usage` member by member, as the
/// official SDK's accumulator does.
#[derive(Debug, Default)]
pub struct AnthropicAssembler {
    parser: SseParser,
    progress: Progress,
    message: Option<Map<String, Value>>,
    blocks: Vec<Option<Block>>,
    usage: Option<AnthropicUsage>,
}

impl AnthropicAssembler {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, chunk: &[u8]) {
        self.parser.push(chunk);
        while let Some(ev) = self.parser.next_event() {
            if self.progress.ended || self.progress.broken || self.progress.upstream_error {
                continue;
            }
            self.progress.events += 1;
            self.event(&ev);
        }
    }

    fn event(&mut self, ev: &SseEvent) {
        let Ok(Value::Object(data)) = serde_json::from_slice::<Value>(&ev.data) else {
            self.progress.broken = true;
            return;
        };
        let kind = event_type(ev, data.get("type"));
        let index = data
            .get("index")
            .and_then(Value::as_u64)
            .and_then(|i| usize::try_from(i).ok());
        match kind.as_str() {
            "message_start" => match data.get("message") {
                Some(Value::Object(m)) => {
                    if let Some(u) = m.get("usage") {
                        self.usage.get_or_insert_with(Default::default).update(u);
                    }
                    self.message = Some(m.clone());
                }
                _ => self.progress.broken = true,
            },
            "content_block_start" => match (index, data.get("content_block")) {
                (Some(i), Some(Value::Object(b))) if self.message.is_some() => {
                    if self.blocks.len() <= i {
                        self.blocks.resize_with(i + 1, || None);
                    }
                    self.blocks[i] = Some(Block {
                        block: b.clone(),
                        json: String::new(),
                    });
                }
                _ => self.progress.broken = true,
            },
            "content_block_delta" => {
                let block = index
                    .and_then(|i| self.blocks.get_mut(i))
                    .and_then(Option::as_mut);
                match (block, data.get("delta")) {
                    (Some(b), Some(Value::Object(d))) => {
                        self.progress.content_bytes += delta(b, d);
                    }
                    _ => self.progress.broken = true,
                }
            }
            "content_block_stop" => {
                match index
                    .and_then(|i| self.blocks.get_mut(i))
                    .and_then(Option::as_mut)
                {
                    Some(b) => {
                        if !close(b) {
                            self.progress.broken = true;
                        }
                    }
                    None => self.progress.broken = true,
                }
            }
            "message_delta" => {
                let Some(m) = self.message.as_mut() else {
                    self.progress.broken = true;
                    return;
                };
                if let Some(Value::Object(d)) = data.get("delta") {
                    for (k, v) in d {
                        m.insert(k.clone(), v.clone());
                    }
                }
                // Members beside `delta` (`context_management`) are the message's too.
                for (k, v) in &data {
                    if !matches!(k.as_str(), "type" | "delta" | "usage") {
                        m.insert(k.clone(), v.clone());
                    }
                }
                if let Some(Value::Object(u)) = data.get("usage") {
                    self.usage
                        .get_or_insert_with(Default::default)
                        .update(&Value::Object(u.clone()));
                    match m.get_mut("usage") {
                        Some(Value::Object(mu)) => {
                            for (k, v) in u {
                                mu.insert(k.clone(), v.clone());
                            }
                        }
                        _ => {
                            m.insert("usage".into(), Value::Object(u.clone()));
                        }
                    }
                }
            }
            "message_stop" => self.progress.ended = self.message.is_some(),
            "error" => self.progress.upstream_error = true,
            // `ping` and event types newer than this code carry nothing of the body.
            _ => {}
        }
    }

    /// Whether any event was read: a streaming client would have had a byte.
    pub fn started(&self) -> bool {
        self.progress.events > 0
    }

    pub fn snapshot(&self) -> Completion {
        self.progress
            .completion(self.usage.map(AnthropicUsage::to_usage))
    }

    /// The assembled message, when the stream reached `message_stop`.
    pub fn finish(&mut self) -> Result<Vec<u8>, Unfinished> {
        if !self.progress.complete() {
            return Err(self.progress.unfinished());
        }
        let mut content = Vec::with_capacity(self.blocks.len());
        for mut b in std::mem::take(&mut self.blocks).into_iter().flatten() {
            if !close(&mut b) {
                return Err(Unfinished::Unreadable);
            }
            content.push(Value::Object(b.block));
        }
        let mut m = self.message.take().ok_or(Unfinished::Unreadable)?;
        m.insert("content".into(), Value::Array(content));
        Ok(Value::Object(m).to_string().into_bytes())
    }
}

/// Applies one `content_block_delta`; returns the bytes of content it added.
fn delta(b: &mut Block, d: &Map<String, Value>) -> usize {
    let s = |k: &str| d.get(k).and_then(Value::as_str).unwrap_or("");
    let append = |b: &mut Block, key: &str, text: &str| match b.block.get_mut(key) {
        Some(Value::String(t)) => t.push_str(text),
        _ => {
            b.block.insert(key.into(), text.into());
        }
    };
    match s("type") {
        "text_delta" => {
            append(b, "text", s("text"));
            s("text").len()
        }
        "thinking_delta" => {
            append(b, "thinking", s("thinking"));
            s("thinking").len()
        }
        "input_json_delta" => {
            b.json.push_str(s("partial_json"));
            s("partial_json").len()
        }
        "signature_delta" => {
            b.block.insert("signature".into(), s("signature").into());
            0
        }
        "citations_delta" => {
            let c = d.get("citation").cloned().unwrap_or(Value::Null);
            match b.block.get_mut("citations") {
                Some(Value::Array(a)) => a.push(c),
                _ => {
                    b.block.insert("citations".into(), Value::Array(vec![c]));
                }
            }
            0
        }
        _ => 0,
    }
}

/// Ends a block: a tool's concatenated input JSON becomes its `input` (an empty one
/// keeps the `{}` of `content_block_start`). False when that JSON does not parse.
fn close(b: &mut Block) -> bool {
    if b.json.is_empty() {
        return true;
    }
    match serde_json::from_str::<Value>(&b.json) {
        Ok(input) => {
            b.block.insert("input".into(), input);
            b.json.clear();
            true
        }
        Err(_) => false,
    }
}

/// The provider's stream assembler. Its variants differ in size, but it only ever
/// lives inside the boxed [`Assembled`] of one attempt, so nothing is gained by boxing
/// the larger one.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Assembler {
    OpenAi(OpenAiAssembler),
    Anthropic(AnthropicAssembler),
}

impl Assembler {
    fn push(&mut self, chunk: &[u8]) {
        match self {
            Assembler::OpenAi(a) => a.push(chunk),
            Assembler::Anthropic(a) => a.push(chunk),
        }
    }
    fn started(&self) -> bool {
        match self {
            Assembler::OpenAi(a) => a.started(),
            Assembler::Anthropic(a) => a.started(),
        }
    }
    fn snapshot(&self) -> Completion {
        match self {
            Assembler::OpenAi(a) => a.snapshot(),
            Assembler::Anthropic(a) => a.snapshot(),
        }
    }
    fn finish(&mut self) -> Result<Vec<u8>, Unfinished> {
        match self {
            Assembler::OpenAi(a) => a.finish(),
            Assembler::Anthropic(a) => a.finish(),
        }
    }
}

/// What the upstream turned out to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Only whitespace so far.
    Undecided,
    Stream,
    /// A JSON body: a server that ignored `stream: true`. Passed to the body
    /// translator unchanged, as the non-stream path would.
    Body,
}

/// A streamed upstream answer for a client that asked for one body: the provider's
/// stream is assembled, then handed to `body`, the translator the non-stream path
/// picks for this pair of formats.
#[derive(Debug)]
pub struct Assembled {
    assembler: Assembler,
    body: ResponseTranslator,
    mode: Mode,
    /// Leading whitespace, replayed into whichever mode follows.
    lead: Vec<u8>,
    unfinished: Option<Unfinished>,
}

impl Assembled {
    pub fn new(assembler: Assembler, body: ResponseTranslator) -> Self {
        Assembled {
            assembler,
            body,
            mode: Mode::Undecided,
            lead: Vec::new(),
            unfinished: None,
        }
    }

    /// Whether the stream has begun: the point at which a streaming client would
    /// have had its first byte, which is what `first_token_ms` bounds.
    pub fn started(&self) -> bool {
        match self.mode {
            Mode::Undecided => false,
            Mode::Stream => self.assembler.started(),
            // A whole body arrives in one piece: only the total bounds it.
            Mode::Body => false,
        }
    }

    /// Why the answer cannot be delivered, once [`Translate::finish`] said incomplete.
    pub fn unfinished(&self) -> Unfinished {
        self.unfinished.unwrap_or(Unfinished::Unreadable)
    }
}

impl Translate for Assembled {
    fn feed(&mut self, chunk: &[u8], out: &mut BytesMut) {
        if self.mode == Mode::Undecided {
            match chunk.iter().find(|b| !b.is_ascii_whitespace()) {
                None => {
                    self.lead.extend_from_slice(chunk);
                    return;
                }
                Some(b'{') => self.mode = Mode::Body,
                Some(_) => self.mode = Mode::Stream,
            }
            let lead = std::mem::take(&mut self.lead);
            match self.mode {
                Mode::Body => self.body.feed(&lead, out),
                _ => self.assembler.push(&lead),
            }
        }
        match self.mode {
            Mode::Body => self.body.feed(chunk, out),
            _ => self.assembler.push(chunk),
        }
    }

    fn finish(&mut self, out: &mut BytesMut) -> Completion {
        match self.mode {
            Mode::Body => self.body.finish(out),
            Mode::Stream => match self.assembler.finish() {
                Ok(body) => {
                    self.body.feed(&body, out);
                    let c = self.body.finish(out);
                    if !c.complete {
                        self.unfinished = Some(Unfinished::Unreadable);
                    }
                    c
                }
                Err(why) => {
                    self.unfinished = Some(why);
                    self.assembler.snapshot()
                }
            },
            Mode::Undecided => {
                self.unfinished = Some(Unfinished::Unreadable);
                self.assembler.snapshot()
            }
        }
    }

    fn snapshot(&self) -> Completion {
        match self.mode {
            Mode::Body => self.body.snapshot(),
            _ => self.assembler.snapshot(),
        }
    }
}

#[cfg(test)]
#[path = "assemble_tests.rs"]
mod tests;
