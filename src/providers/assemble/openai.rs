//! OpenAI `chat.completion.chunk` events -> one `chat.completion` object.

use super::{Progress, Unfinished};
use crate::providers::openai::parse_usage;
use crate::providers::sse::SseParser;
use crate::providers::{Completion, Usage};
use serde_json::{Map, Value};

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
            if self.progress.settled() {
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
