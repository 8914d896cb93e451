//! Anthropic message events -> one `message` object.

use super::{Progress, Unfinished};
use crate::providers::anthropic::{event_type, AnthropicUsage};
use crate::providers::sse::{SseEvent, SseParser};
use crate::providers::Completion;
use serde_json::{Map, Value};

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
            if self.progress.settled() {
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
