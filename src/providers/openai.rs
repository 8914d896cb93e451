//! OpenAI Chat Completions, spoken by `openai`, `openai_compatible` and
//! `azure_openai` providers (Azure: another path and credential header, same body).

use super::sse::SseParser;
use super::{ClientRequest, Completion, UpstreamRequest, Usage};
use crate::config::{Deployment, ProviderKind, Target};
use crate::error::GatewayError;
use bytes::{Bytes, BytesMut};
use serde_json::{Map, Value};
use std::borrow::Cow;

pub const CHAT_PATH: &str = "/v1/chat/completions";

/// Rewrites the model and, for streams, asks for the usage chunk the gateway bills from.
/// `assemble`: the client asked for one body, the upstream gets a stream
/// ([`super::assemble`]).
pub fn prepare_chat(
    req: &ClientRequest,
    to: Target<'_>,
    assemble: bool,
) -> Result<UpstreamRequest, GatewayError> {
    let mut body = req.body.clone();
    body.insert("model".into(), Value::String(to.dep.upstream_model.clone()));
    // The budget reservation assumes this bound: make the provider keep to it.
    match (req.max_tokens, super::max_tokens_for(req, to.model)) {
        (None, Some(cap)) => {
            let key = if to.dep.provider.kind.openai_native() {
                "max_completion_tokens"
            } else {
                "max_tokens"
            };
            body.insert(key.into(), Value::from(cap));
        }
        // A fallback with a smaller bound than the client's: capped in every field
        // the client set.
        (Some(asked), Some(cap)) if cap < asked => {
            for key in ["max_completion_tokens", "max_tokens"] {
                if body.get(key).is_some_and(|v| !v.is_null()) {
                    body.insert(key.into(), Value::from(cap));
                }
            }
        }
        _ => {}
    }
    let strip_usage = req.stream && !req.include_usage;
    if strip_usage || assemble {
        super::stream_upstream(&mut body, true);
    }
    chat_request(to.dep, body, strip_usage)
}

/// The upstream request for a finished chat body: encoding and the provider credential,
/// shared by the passthrough and by the translation from Anthropic requests.
pub fn chat_request(
    dep: &Deployment,
    body: Map<String, Value>,
    strip_usage: bool,
) -> Result<UpstreamRequest, GatewayError> {
    let body = serde_json::to_vec(&body).map_err(|e| {
        GatewayError::new(crate::error::ErrorKind::Internal, format!("encode: {e}"))
    })?;
    let mut headers = Vec::with_capacity(1);
    let p = &dep.provider;
    let path = match (p.kind, &p.api_version) {
        (ProviderKind::AzureOpenAi, Some(version)) => {
            if let Some(key) = &p.api_key {
                headers.push(("api-key", key.clone()));
            }
            Cow::Owned(azure_chat_path(&dep.upstream_model, version))
        }
        _ => {
            if let Some(key) = &p.api_key {
                headers.push(("authorization", format!("Bearer {key}")));
            }
            Cow::Borrowed(CHAT_PATH)
        }
    };
    Ok(UpstreamRequest {
        path,
        body: Bytes::from(body),
        headers,
        strip_usage,
        assembled: false,
    })
}

/// Azure OpenAI's chat path: the model is chosen by the deployment named in the
/// path (the body's `model` is ignored), and the API version is a required query.
/// The deployment name is percent-encoded so that no configured name can change
/// the path's shape; `api_version` was checked at load to need no encoding.
pub fn azure_chat_path(deployment: &str, api_version: &str) -> String {
    let mut path = String::with_capacity(48 + deployment.len() + api_version.len());
    path.push_str("/openai/deployments/");
    for b in deployment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            path.push(char::from(b));
        } else {
            path.push_str(&format!("%{b:02X}"));
        }
    }
    path.push_str("/chat/completions?api-version=");
    path.push_str(api_version);
    path
}

/// Reads an OpenAI `usage` object.
pub fn parse_usage(u: &Value) -> Option<Usage> {
    if !u.is_object() {
        return None;
    }
    let n = |v: Option<&Value>| v.and_then(Value::as_u64).unwrap_or(0).min(u32::MAX as u64) as u32;
    Some(Usage {
        input: n(u.get("prompt_tokens")),
        output: n(u.get("completion_tokens")),
        cached_input: n(u
            .get("prompt_tokens_details")
            .and_then(|d| d.get("cached_tokens"))),
        cache_creation_input: 0,
    })
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Streamed chat completion passed through event by event.
#[derive(Debug)]
pub struct ChatStream {
    parser: SseParser,
    strip_usage: bool,
    usage: Option<Usage>,
    done: bool,
    upstream_error: bool,
    content_bytes: usize,
}

impl ChatStream {
    pub fn new(strip_usage: bool) -> Self {
        ChatStream {
            parser: SseParser::new(),
            strip_usage,
            usage: None,
            done: false,
            upstream_error: false,
            content_bytes: 0,
        }
    }

    pub fn feed(&mut self, chunk: &[u8], out: &mut BytesMut) {
        self.parser.push(chunk);
        while let Some(ev) = self.parser.next_event() {
            let data = &ev.data[..];
            if data == b"[DONE]" {
                self.done = true;
                out.extend_from_slice(&ev.raw);
                continue;
            }
            // Only the rare events that mention usage or an error are parsed in full.
            if contains(data, b"\"usage\"") && !contains(data, b"\"usage\":null") {
                if let Ok(v) = serde_json::from_slice::<Value>(data) {
                    if let Some(u) = v.get("usage").and_then(parse_usage) {
                        self.usage = Some(u);
                        let no_choices = v
                            .get("choices")
                            .and_then(Value::as_array)
                            .is_some_and(|c| c.is_empty());
                        if self.strip_usage && no_choices {
                            continue;
                        }
                    }
                }
            } else if data.starts_with(b"{\"error\"") {
                self.upstream_error = true;
            }
            self.content_bytes += generated_len(data);
            if self.strip_usage {
                if let Some(stripped) = strip_null_usage(data) {
                    out.extend_from_slice(b"data: ");
                    out.extend_from_slice(&stripped);
                    out.extend_from_slice(b"\n\n");
                    continue;
                }
            }
            out.extend_from_slice(&ev.raw);
        }
    }

    pub fn finish(&mut self, _out: &mut BytesMut) -> Completion {
        self.snapshot()
    }

    pub fn snapshot(&self) -> Completion {
        Completion {
            usage: self.usage,
            complete: self.done && !self.upstream_error,
            upstream_error: self.upstream_error,
            content_bytes: self.content_bytes,
        }
    }
}

/// Bytes of generated text in a chunk (`content` and tool-call `arguments` strings),
/// found by a scan rather than a parse: it only feeds the estimate used when the
/// provider never reports usage, and runs on every chunk.
fn generated_len(data: &[u8]) -> usize {
    let mut total = 0;
    for key in [&b"\"content\":\""[..], &b"\"arguments\":\""[..]] {
        let mut rest = data;
        while let Some(p) = rest.windows(key.len()).position(|w| w == key) {
            rest = &rest[p + key.len()..];
            let mut i = 0;
            while i < rest.len() && rest[i] != b'"' {
                i += if rest[i] == b'\\' { 2 } else { 1 };
            }
            total += i.min(rest.len());
            rest = &rest[i.min(rest.len())..];
        }
    }
    total
}

/// Removes the `"usage":null` member OpenAI adds to every chunk once usage is requested,
/// so a client that did not ask sees the chunks it would have seen.
fn strip_null_usage(data: &[u8]) -> Option<Vec<u8>> {
    for pat in [&b",\"usage\":null"[..], &b", \"usage\": null"[..]] {
        if let Some(pos) = data.windows(pat.len()).position(|w| w == pat) {
            let mut v = Vec::with_capacity(data.len());
            v.extend_from_slice(&data[..pos]);
            v.extend_from_slice(&data[pos + pat.len()..]);
            return Some(v);
        }
    }
    None
}

/// The parts of a non-streamed chat completion the gateway reads.
#[derive(serde::Deserialize)]
struct BodyHead {
    #[serde(default)]
    usage: Option<Value>,
    #[serde(default)]
    choices: Present,
}

/// Whether a member was there at all (any value, `null` included), parsed without
/// building it.
#[derive(Default)]
struct Present(bool);

impl<'de> serde::Deserialize<'de> for Present {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(d).map(|_| Present(true))
    }
}

/// Non-streamed chat completion: forwarded as it arrives, parsed at the end for usage.
#[derive(Debug, Default)]
pub struct ChatBody {
    buf: Vec<u8>,
    usage: Option<Usage>,
    complete: bool,
}

impl ChatBody {
    pub fn feed(&mut self, chunk: &[u8], out: &mut BytesMut) {
        self.buf.extend_from_slice(chunk);
        out.extend_from_slice(chunk);
    }

    pub fn finish(&mut self, _out: &mut BytesMut) -> Completion {
        // Only `usage` is kept: the choices (the bulk of the body) are skipped by the
        // parser without building a tree of them, on every non-streamed answer.
        // (A derived struct also accepts a JSON array; a completion is an object.)
        let object = self.buf.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
        if let Some(head) = object
            .then(|| serde_json::from_slice::<BodyHead>(&self.buf).ok())
            .flatten()
        {
            self.usage = head.usage.as_ref().and_then(parse_usage);
            self.complete = head.choices.0;
        }
        self.snapshot()
    }

    pub fn snapshot(&self) -> Completion {
        Completion {
            usage: self.usage,
            complete: self.complete,
            upstream_error: false,
            content_bytes: self.buf.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WITH_USAGE: &[u8] = b"data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}],\"usage\":null}\n\n\
data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":null}],\"usage\":null}\n\n\
data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n\
data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2,\"total_tokens\":11,\"prompt_tokens_details\":{\"cached_tokens\":4}}}\n\n\
data: [DONE]\n\n";

    fn run(strip: bool, chunks: &[&[u8]]) -> (Vec<u8>, Completion) {
        let mut s = ChatStream::new(strip);
        let mut out = BytesMut::new();
        for c in chunks {
            s.feed(c, &mut out);
        }
        let c = s.finish(&mut out);
        (out.to_vec(), c)
    }

    #[test]
    fn usage_chunk_is_counted_and_stripped_at_every_split() {
        let (whole, c) = run(true, &[WITH_USAGE]);
        assert_eq!(
            c.usage,
            Some(Usage {
                input: 9,
                output: 2,
                cached_input: 4,
                cache_creation_input: 0,
            })
        );
        assert!(c.complete);
        let text = String::from_utf8(whole.clone()).unwrap();
        assert!(!text.contains("\"usage\""), "{text}");
        assert!(text.ends_with("data: [DONE]\n\n"));
        assert_eq!(text.matches("data: ").count(), 4);
        for i in 0..=WITH_USAGE.len() {
            let (out, c2) = run(true, &[&WITH_USAGE[..i], &WITH_USAGE[i..]]);
            assert_eq!(out, whole, "split at {i}");
            assert_eq!(c2, c);
        }
    }

    #[test]
    fn client_asked_usage_passes_through_unchanged() {
        let (out, c) = run(false, &[WITH_USAGE]);
        assert_eq!(out, WITH_USAGE);
        assert_eq!(c.usage.unwrap().output, 2);
    }

    #[test]
    fn generated_text_is_measured_not_the_json() {
        let d = br#"{"choices":[{"delta":{"content":"Hi \"you\""}}]}"#;
        assert_eq!(generated_len(d), r#"Hi \"you\""#.len());
        let t = br#"{"delta":{"tool_calls":[{"function":{"arguments":"{\"x\""}}]}}"#;
        assert_eq!(generated_len(t), r#"{\"x\""#.len());
        assert_eq!(generated_len(br#"{"choices":[]}"#), 0);
    }

    #[test]
    fn cut_stream_is_incomplete() {
        let cut = &WITH_USAGE[..200];
        let (_, c) = run(true, &[cut]);
        assert!(!c.complete);
        assert!(c.usage.is_none());
    }

    #[test]
    fn midstream_error_is_seen() {
        let s = b"data: {\"error\":{\"message\":\"overloaded\"}}\n\n";
        let (_, c) = run(false, &[s]);
        assert!(c.upstream_error);
        assert!(!c.complete);
    }

    #[test]
    fn non_stream_usage() {
        let body = br#"{"id":"x","choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":5,"completion_tokens":1}}"#;
        for i in 0..=body.len() {
            let mut b = ChatBody::default();
            let mut out = BytesMut::new();
            b.feed(&body[..i], &mut out);
            b.feed(&body[i..], &mut out);
            let c = b.finish(&mut out);
            assert_eq!(&out[..], &body[..]);
            assert_eq!(c.usage.unwrap().input, 5);
            assert!(c.complete);
        }
    }

    #[test]
    fn non_stream_completeness_and_usage_without_a_tree() {
        let finish = |body: &[u8]| {
            let mut b = ChatBody::default();
            b.feed(body, &mut BytesMut::new());
            b.finish(&mut BytesMut::new())
        };
        // No usage: complete, nothing counted (the proxy estimates).
        let c = finish(
            br#"{"choices":[{"message":{"content":"hi","tool_calls":[{"a":[1,{"b":null}]}]}}]}"#,
        );
        assert!(c.complete && c.usage.is_none());
        // Usage before the choices, unknown members around them.
        let c = finish(
            br#"{"usage":{"prompt_tokens":7,"completion_tokens":3},"x":{"y":[true]},"choices":[]}"#,
        );
        assert!(c.complete);
        assert_eq!((c.usage.unwrap().input, c.usage.unwrap().output), (7, 3));
        // Not a completion: no choices, not JSON, not an object.
        for body in [&br#"{"error":{"message":"x"}}"#[..], b"not json", b"[1,2]"] {
            assert!(!finish(body).complete, "{}", String::from_utf8_lossy(body));
        }
    }
}
