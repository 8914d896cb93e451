//! What reached the mock, so tests can assert on what the gateway actually sent
//! upstream (headers it injected or stripped, the body it rewrote, retries).

use bytes::Bytes;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// How many requests `GET /_mock/requests` remembers.
const KEEP: usize = 200;

/// The last `KEEP` requests plus a total count.
#[derive(Debug, Default)]
pub struct RequestLog {
    recent: Mutex<VecDeque<Value>>,
    total: AtomicU64,
}

/// Lower-case header names to values; repeated headers are joined with ", ".
fn headers_json(headers: &http::HeaderMap) -> Value {
    let mut map = Map::new();
    for (name, value) in headers {
        let v = String::from_utf8_lossy(value.as_bytes()).into_owned();
        match map.get_mut(name.as_str()) {
            Some(Value::String(existing)) => {
                existing.push_str(", ");
                existing.push_str(&v);
            }
            _ => {
                map.insert(name.as_str().to_string(), Value::String(v));
            }
        }
    }
    Value::Object(map)
}

/// Spelled out rather than `Debug`-formatted: tests compare these strings, and a
/// `Debug` format is no promise.
fn version_name(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_11 => "HTTP/1.1",
        http::Version::HTTP_2 => "HTTP/2.0",
        http::Version::HTTP_3 => "HTTP/3.0",
        _ => "unknown",
    }
}

/// One log entry; the body is summarised (length, hash, key fields), never kept.
pub fn entry(parts: &http::request::Parts, body: &[u8], parsed: Option<&Value>) -> Value {
    let field = |k: &str| parsed.and_then(|v| v.get(k));
    let max_completion = field("max_completion_tokens").and_then(Value::as_u64);
    json!({
        "ts_ms": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "method": parts.method.as_str(),
        // "HTTP/1.1" or "HTTP/2.0": what the gateway negotiated with this upstream.
        "http_version": version_name(parts.version),
        "headers": headers_json(&parts.headers),
        "body_len": body.len(),
        "body_sha256": hex::encode(Sha256::digest(body)),
        "model": field("model").and_then(Value::as_str),
        "stream": field("stream").and_then(Value::as_bool).unwrap_or(false),
        "include_usage": parsed
            .and_then(|v| v.pointer("/stream_options/include_usage"))
            .and_then(Value::as_bool),
        // The effective output cap: OpenAI's newer field wins over `max_tokens`.
        "max_tokens": max_completion.or_else(|| field("max_tokens").and_then(Value::as_u64)),
        "max_completion_tokens": max_completion,
        "messages_count": field("messages").and_then(Value::as_array).map(Vec::len),
    })
}

impl RequestLog {
    fn recent(&self) -> std::sync::MutexGuard<'_, VecDeque<Value>> {
        match self.recent.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Remembers one request, dropping the oldest beyond `KEEP`.
    pub fn push(&self, e: Value) {
        self.total.fetch_add(1, Ordering::Relaxed);
        let mut recent = self.recent();
        if recent.len() >= KEEP {
            recent.pop_front();
        }
        recent.push_back(e);
    }

    /// `GET /_mock/requests`: oldest first.
    pub fn requests_json(&self) -> Bytes {
        let list: Vec<Value> = self.recent().iter().cloned().collect();
        Bytes::from(Value::Array(list).to_string())
    }

    /// `GET /_mock/stats`.
    pub fn stats_json(&self) -> Bytes {
        Bytes::from(json!({"requests": self.total.load(Ordering::Relaxed)}).to_string())
    }

    /// `POST /_mock/reset`: forget the log and the total.
    pub fn clear(&self) {
        self.recent().clear();
        self.total.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_summarises_request() {
        let req = http::Request::builder()
            .method("POST")
            .uri("/inhouse/v1/chat/completions?x=1")
            .header("Authorization", "Bearer k")
            .header("x-dup", "a")
            .header("x-dup", "b")
            .body(())
            .unwrap_or_default();
        let (parts, ()) = req.into_parts();
        let body = br#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"max_tokens":9,"messages":[{},{}]}"#;
        let parsed: Value = serde_json::from_slice(body).unwrap_or_default();
        let e = entry(&parts, body, Some(&parsed));
        assert_eq!(e["path"], "/inhouse/v1/chat/completions");
        assert_eq!(e["http_version"], "HTTP/1.1");
        assert_eq!(e["headers"]["authorization"], "Bearer k");
        assert_eq!(e["headers"]["x-dup"], "a, b");
        assert_eq!(e["body_len"], body.len());
        assert_eq!(e["body_sha256"].as_str().map(str::len), Some(64));
        assert_eq!(e["model"], "m");
        assert_eq!(e["stream"], true);
        assert_eq!(e["include_usage"], true);
        assert_eq!(e["max_tokens"], 9);
        assert_eq!(e["messages_count"], 2);
        let bare = entry(&parts, b"", None);
        assert_eq!(bare["include_usage"], Value::Null);
        assert_eq!(bare["max_tokens"], Value::Null);

        let log = RequestLog::default();
        for _ in 0..KEEP + 5 {
            log.push(e.clone());
        }
        let all: Value = serde_json::from_slice(&log.requests_json()).unwrap_or_default();
        assert_eq!(all.as_array().map(Vec::len), Some(KEEP));
        assert_eq!(
            &log.stats_json()[..],
            format!("{{\"requests\":{}}}", KEEP + 5).as_bytes()
        );
        log.clear();
        assert_eq!(&log.stats_json()[..], b"{\"requests\":0}");
    }
}
