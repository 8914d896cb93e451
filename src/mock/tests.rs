//! End-to-end tests: spawn the server and speak raw HTTP/1.1 to it, so what is
//! checked is exactly the bytes a gateway would see.

use super::{parse_args, spawn, MockOptions};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn start() -> SocketAddr {
    match spawn(MockOptions::new(SocketAddr::from(([127, 0, 0, 1], 0)))).await {
        Ok((addr, _)) => addr,
        Err(e) => panic!("spawn failed: {e}"),
    }
}

fn request(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "{method} {path} HTTP/1.1\r\nhost: mock\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str("\r\n");
    let mut bytes = r.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// Sends one request and reads until the server closes (or errors: a reset counts as the end).
async fn exchange(addr: SocketAddr, req: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(req).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return out,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!("timed out; got {:?}", String::from_utf8_lossy(&out)),
        }
    }
}

struct Resp {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Parses a response; a chunked body is de-chunked, `complete` says whether the
/// terminating zero chunk (or the full content-length) arrived.
fn parse(raw: &[u8]) -> (Resp, bool) {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no head in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let rest = &raw[split + 4..];
    let mut resp = Resp {
        status,
        head,
        body: Vec::new(),
    };
    if resp
        .header("transfer-encoding")
        .is_some_and(|v| v.contains("chunked"))
    {
        let mut pos = 0;
        loop {
            let Some(eol) = rest[pos..].windows(2).position(|w| w == b"\r\n") else {
                return (resp, false);
            };
            let size = usize::from_str_radix(
                std::str::from_utf8(&rest[pos..pos + eol]).unwrap_or("x"),
                16,
            )
            .unwrap_or(0);
            pos += eol + 2;
            if size == 0 {
                return (resp, true);
            }
            if pos + size > rest.len() {
                resp.body.extend_from_slice(&rest[pos..]);
                return (resp, false);
            }
            resp.body.extend_from_slice(&rest[pos..pos + size]);
            pos += size + 2;
        }
    }
    let len: usize = resp
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(rest.len());
    resp.body = rest.to_vec();
    let complete = rest.len() >= len;
    (resp, complete)
}

async fn post(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> (Resp, bool) {
    parse(
        &exchange(
            addr,
            &request("POST", path, headers, body.to_string().as_bytes()),
        )
        .await,
    )
}

fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .filter_map(|e| {
            e.lines()
                .find_map(|l| l.strip_prefix("data: "))
                .map(str::to_string)
        })
        .collect()
}

#[tokio::test]
async fn openai_non_stream_is_deterministic() {
    let addr = start().await;
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]});
    let (r1, complete) = post(addr, "/inhouse/v1/chat/completions", &[], &body).await;
    assert!(complete);
    assert_eq!(r1.status, 200);
    let v = r1.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "gpt-4o-mini");
    assert!(v["id"].as_str().is_some_and(|s| s.starts_with("chatcmpl-")));
    assert_eq!(v["usage"]["completion_tokens"], 16);
    let (r2, _) = post(addr, "/v1/chat/completions", &[], &body).await;
    assert_eq!(
        r2.json()["choices"][0]["message"]["content"],
        v["choices"][0]["message"]["content"]
    );
}

#[tokio::test]
async fn openai_stream_with_usage() {
    let addr = start().await;
    let body = json!({"model": "m", "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "hi [[mock: tokens=4]]"}]});
    let (r, complete) = post(addr, "/v1/chat/completions", &[], &body).await;
    assert!(complete);
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/event-stream")));
    let data = sse_data(&r.text());
    assert_eq!(data.len(), 1 + 4 + 1 + 1 + 1);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let usage: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 4);
}

#[tokio::test]
async fn anthropic_stream_and_validation() {
    let addr = start().await;
    let body = json!({"model": "claude", "max_tokens": 3, "stream": true, "system": [{"type": "text", "text": "s"}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]});
    let (r, complete) = post(
        addr,
        "/v1/messages",
        &[("anthropic-version", "2023-06-01")],
        &body,
    )
    .await;
    assert!(complete);
    let names: Vec<String> = r
        .text()
        .split("\n\n")
        .filter_map(|e| {
            e.strip_prefix("event: ")
                .and_then(|e| e.lines().next())
                .map(str::to_string)
        })
        .collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    assert!(r.text().contains("\"stop_reason\":\"max_tokens\""));

    let (bad, _) = post(
        addr,
        "/v1/messages",
        &[],
        &json!({"model": "c", "messages": []}),
    )
    .await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json()["error"]["type"], "invalid_request_error");
    let raw = exchange(
        addr,
        &request("POST", "/v1/chat/completions", &[], b"{not json"),
    )
    .await;
    let (bad_json, _) = parse(&raw);
    assert_eq!(bad_json.status, 400);
    assert_eq!(bad_json.json()["error"]["type"], "invalid_request_error");
}

#[tokio::test]
async fn large_body_and_request_log() {
    let addr = start().await;
    let big = "a".repeat(2 * 1024 * 1024);
    let body =
        json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": big}]});
    let bytes = body.to_string();
    let raw = exchange(
        addr,
        &request(
            "POST",
            "/v1/chat/completions",
            &[("authorization", "Bearer sk-up")],
            bytes.as_bytes(),
        ),
    )
    .await;
    let (r, _) = parse(&raw);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["usage"]["prompt_tokens"], 2 * 1024 * 1024 / 4 + 3);
    assert_eq!(r.json()["choices"][0]["finish_reason"], "length");

    let (log, _) = parse(&exchange(addr, &request("GET", "/_mock/requests", &[], b"")).await);
    let entry = &log.json()[0];
    assert_eq!(entry["body_len"], bytes.len());
    assert_eq!(entry["headers"]["authorization"], "Bearer sk-up");
    assert_eq!(entry["max_tokens"], 5);
    assert_eq!(entry["messages_count"], 1);
    assert_eq!(entry["stream"], false);
    let (stats, _) = parse(&exchange(addr, &request("GET", "/_mock/stats", &[], b"")).await);
    assert_eq!(stats.json(), json!({"requests": 1}));
    parse(&exchange(addr, &request("POST", "/_mock/reset", &[], b"")).await);
    let (stats, _) = parse(&exchange(addr, &request("GET", "/_mock/stats", &[], b"")).await);
    assert_eq!(stats.json(), json!({"requests": 0}));
}

#[tokio::test]
async fn defaults_apply_under_each_request_until_reset() {
    let addr = start().await;
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
    let set = |d: &'static str| request("POST", "/_mock/defaults", &[], d.as_bytes());
    parse(&exchange(addr, &set("status=429;retry_after=3")).await);
    let (r, _) = post(addr, "/v1/chat/completions", &[], &body).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after").as_deref(), Some("3"));
    // The request's own directives win key by key.
    let (r, _) = post(
        addr,
        "/v1/chat/completions",
        &[("x-mock", "status=200")],
        &body,
    )
    .await;
    assert_eq!(r.status, 200);
    parse(&exchange(addr, &set("")).await);
    let (r, _) = post(addr, "/v1/chat/completions", &[], &body).await;
    assert_eq!(r.status, 200);
    parse(&exchange(addr, &set("status=503")).await);
    parse(&exchange(addr, &request("POST", "/_mock/reset", &[], b"")).await);
    let (r, _) = post(addr, "/v1/chat/completions", &[], &body).await;
    assert_eq!(r.status, 200, "reset forgets the defaults");
}

#[tokio::test]
async fn status_directives_and_fail_first() {
    let addr = start().await;
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
    let (r, _) = post(
        addr,
        "/v1/chat/completions",
        &[("x-mock", "status=429")],
        &body,
    )
    .await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after").as_deref(), Some("1"));
    assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded");

    let an = json!({"model": "c", "max_tokens": 9, "messages": [{"role": "user", "content": "[[mock: status=529]]"}]});
    let (r, _) = post(addr, "/v1/messages", &[], &an).await;
    assert_eq!(r.status, 529);
    assert_eq!(
        r.json(),
        json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    );

    let statuses: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(
                post(
                    addr,
                    "/v1/chat/completions",
                    &[("x-mock", "fail_first=2;key=t1")],
                    &body,
                )
                .await
                .0
                .status,
            );
        }
        v
    };
    assert_eq!(statuses, [503, 503, 200]);
}

#[tokio::test]
async fn faults_cut_reset_garbage_midstream() {
    let addr = start().await;
    let stream =
        json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "x"}]});
    let (r, complete) = post(
        addr,
        "/v1/chat/completions",
        &[("x-mock", "fault=cut;cut_after=3")],
        &stream,
    )
    .await;
    assert!(!complete, "a cut stream must not end cleanly");
    let data = sse_data(&r.text());
    assert_eq!(data.len(), 1 + 3, "role chunk + 3 tokens, got {data:?}");
    assert!(!r.text().contains("[DONE]"));

    let non_stream = json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
    let (r, complete) = post(
        addr,
        "/v1/chat/completions",
        &[("x-mock", "fault=cut")],
        &non_stream,
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(!complete && !r.body.is_empty());

    let raw = exchange(
        addr,
        &request(
            "POST",
            "/v1/chat/completions",
            &[("x-mock", "fault=reset")],
            non_stream.to_string().as_bytes(),
        ),
    )
    .await;
    assert!(raw.is_empty());

    let (r, _) = post(
        addr,
        "/v1/chat/completions",
        &[("x-mock", "fault=garbage")],
        &non_stream,
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(serde_json::from_slice::<Value>(&r.body).is_err());

    let (r, complete) = post(
        addr,
        "/v1/chat/completions",
        &[("x-mock", "fault=midstream_error;cut_after=2")],
        &stream,
    )
    .await;
    assert!(complete);
    let data = sse_data(&r.text());
    let last: Value = serde_json::from_str(data.last().map(String::as_str).unwrap_or("")).unwrap();
    assert_eq!(last["error"]["type"], "server_error");
    assert_eq!(data.len(), 1 + 2 + 1);
}

#[tokio::test]
async fn stall_and_ttft_timing() {
    let addr = start().await;
    let stream =
        json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "x"}]});
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&request(
        "POST",
        "/v1/chat/completions",
        &[("x-mock", "fault=stall")],
        stream.to_string().as_bytes(),
    ))
    .await
    .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let more = tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await;
    assert!(
        more.is_err(),
        "a stalled stream sends nothing after the headers"
    );

    let started = Instant::now();
    let (r, _) = post(
        addr,
        "/v1/chat/completions",
        &[("x-mock", "ttft_ms=150;gap_ms=10;tokens=3")],
        &stream,
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(started.elapsed() >= Duration::from_millis(170));
}

#[tokio::test]
async fn keep_alive_models_and_tools() {
    let addr = start().await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    for _ in 0..2 {
        s.write_all(b"GET /v1/models HTTP/1.1\r\nhost: m\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 8192];
        let n = s.read(&mut buf).await.unwrap();
        let (r, complete) = parse(&buf[..n]);
        assert!(complete);
        assert_eq!(r.json()["object"], "list");
    }
    let body = json!({"model": "c", "max_tokens": 50, "messages": [{"role": "user", "content": "[[mock: tool=lookup]]"}],
        "tools": [{"name": "lookup", "input_schema": {"type": "object"}}]});
    let (r, _) = post(addr, "/v1/messages", &[], &body).await;
    let v = r.json();
    assert_eq!(v["stop_reason"], "tool_use");
    assert_eq!(v["content"][0]["name"], "lookup");
}

#[test]
fn parses_command_line() {
    let args: Vec<String> = [
        "llm-gateway",
        "mock-provider",
        "--listen",
        "127.0.0.1:9999",
        "--ttft-ms=5",
        "--gap-ms",
        "2",
        "--tokens",
        "8",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let o = parse_args(&args).unwrap();
    assert_eq!(o.listen, SocketAddr::from(([127, 0, 0, 1], 9999)));
    assert_eq!((o.ttft_ms, o.gap_ms, o.tokens), (5, 2, 8));
    assert!(parse_args(&["--tokens".into(), "3".into()]).is_err());
    assert!(parse_args(&["--listen".into()]).is_err());
    assert!(parse_args(&["--listen".into(), "nope".into()]).is_err());
    assert!(parse_args(&[
        "--listen".into(),
        "127.0.0.1:1".into(),
        "--bogus".into(),
        "1".into()
    ])
    .is_err());
    let d = parse_args(&["--listen".into(), "[::1]:0".into()]).unwrap();
    assert_eq!((d.ttft_ms, d.gap_ms, d.tokens), (0, 0, 16));
}
