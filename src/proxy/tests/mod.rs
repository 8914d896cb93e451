//! The request path's fast tier: the chain, hold-back, failover, retry-after merging,
//! the cache lock and the audit record, over scripted fake upstreams on loopback
//! sockets (real connections through Pingora's connector) and a recording client.

use super::client::Client;
use super::report::{ChainOutcome, Ended};
use super::{front, Plan, Shared};
use crate::audit::AuditRow;
use crate::cache::Lookup;
use crate::config::{Config, Model};
use crate::error::{ApiFormat, ErrorKind};
use crate::metrics::{AttemptResult, Metrics};
use crate::providers::ClientRequest;
use crate::routing::Chain;
use async_trait::async_trait;
use pingora_core::protocols::http::HttpTask;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

mod deployments;

/// What a fake upstream does with one request.
#[derive(Clone, Copy, Debug)]
enum Act {
    /// A valid answer (streamed when asked), after `delay_ms`.
    Ok { delay_ms: u64 },
    /// This status, with `retry-after` when given.
    Status(u16, Option<u64>),
    /// Reads the request and never answers.
    Stall,
    /// A stream's header and first token, then the connection closes.
    Cut,
    /// A 200 whose body is not the provider's format.
    Garbage,
    /// A stream's header, then nothing (the mock's `fault=stall` on a stream).
    HeaderThenStall,
    /// A server that cannot stream: a JSON header at once, the body `delay_ms` later,
    /// whatever the request asked.
    JsonLater { delay_ms: u64 },
}

struct Fake {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    /// The body of the last request.
    last_body: Arc<std::sync::Mutex<String>>,
}

/// A fake provider acting `acts[n]` on its n-th request (the last act repeats).
async fn fake(acts: Vec<Act>) -> Fake {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let requests = Arc::new(AtomicUsize::new(0));
    let last_body = Arc::new(std::sync::Mutex::new(String::new()));
    let seen = requests.clone();
    let last = last_body.clone();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let acts = acts.clone();
            let seen = seen.clone();
            let last = last.clone();
            tokio::spawn(async move {
                serve(sock, &acts, &seen, &last).await;
            });
        }
    });
    Fake {
        addr,
        requests,
        last_body,
    }
}

/// An address nothing listens on: connecting is refused.
async fn refusing() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    drop(l);
    addr
}

async fn serve(
    mut sock: TcpStream,
    acts: &[Act],
    seen: &AtomicUsize,
    last: &std::sync::Mutex<String>,
) {
    let Some(body) = read_request(&mut sock).await else {
        return;
    };
    if let Ok(mut l) = last.lock() {
        l.clone_from(&body);
    }
    let n = seen.fetch_add(1, Ordering::SeqCst);
    let act = acts[n.min(acts.len() - 1)];
    let stream = body.contains("\"stream\":true");
    let chunk = |delta: &str, finish: &str| {
        format!(
            "data: {{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"up\",\"choices\":[{{\"index\":0,\"delta\":{delta},\"finish_reason\":{finish}}}]}}\n\n"
        )
    };
    let sse_head =
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";
    match act {
        Act::Ok { delay_ms } => {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            if stream {
                // One event per write, a little apart: the gateway sees them come in.
                let events = [
                    sse_head.to_string() + &chunk(r#"{"role":"assistant","content":"Hello"}"#, "null"),
                    chunk(r#"{"content":" world"}"#, "null"),
                    chunk("{}", "\"stop\""),
                    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"up\",\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2,\"total_tokens\":9}}\n\n".to_string(),
                    "data: [DONE]\n\n".to_string(),
                ];
                for e in events {
                    if sock.write_all(e.as_bytes()).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            } else {
                let b = r#"{"id":"c1","object":"chat.completion","created":1,"model":"up","choices":[{"index":0,"message":{"role":"assistant","content":"Hello world"},"finish_reason":"stop"}],"usage":{"prompt_tokens":7,"completion_tokens":2,"total_tokens":9}}"#;
                let _ = sock
                    .write_all(response(200, "application/json", &[], b).as_bytes())
                    .await;
            }
        }
        Act::Status(code, retry) => {
            let extra: Vec<(String, String)> = retry
                .map(|s| vec![("retry-after".to_string(), s.to_string())])
                .unwrap_or_default();
            let b = r#"{"error":{"message":"try later","type":"server_error"}}"#;
            let _ = sock
                .write_all(response(code, "application/json", &extra, b).as_bytes())
                .await;
        }
        Act::Stall => {
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        Act::Cut => {
            let mut s = sse_head.to_string();
            s += &chunk(r#"{"role":"assistant","content":"Hel"}"#, "null");
            let _ = sock.write_all(s.as_bytes()).await;
        }
        Act::Garbage => {
            let _ = sock
                .write_all(response(200, "application/json", &[], "<html>oops</html>").as_bytes())
                .await;
        }
        Act::JsonLater { delay_ms } => {
            let b = r#"{"id":"c2","object":"chat.completion","created":1,"model":"up","choices":[{"index":0,"message":{"role":"assistant","content":"Hello later"},"finish_reason":"stop"}],"usage":{"prompt_tokens":7,"completion_tokens":2,"total_tokens":9}}"#;
            let head = response(200, "application/json", &[], b);
            let split = head.len() - b.len();
            let _ = sock.write_all(&head.as_bytes()[..split]).await;
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            let _ = sock.write_all(b.as_bytes()).await;
        }
        Act::HeaderThenStall => {
            let _ = sock.write_all(sse_head.as_bytes()).await;
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
    }
    let _ = sock.shutdown().await;
}

fn response(code: u16, ct: &str, extra: &[(String, String)], body: &str) -> String {
    let mut s = format!(
        "HTTP/1.1 {code} X\r\ncontent-type: {ct}\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for (k, v) in extra {
        s += &format!("{k}: {v}\r\n");
    }
    s + "\r\n" + body
}

/// Reads one request; its body as text.
async fn read_request(sock: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 8192];
    let head_end = loop {
        let n = sock.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = sock.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    }
    Some(String::from_utf8_lossy(&buf[head_end..]).into_owned())
}

/// A client that records what it is sent; `leave_after` writes it goes away.
#[derive(Default)]
struct Recorder {
    tasks: Vec<HttpTask>,
    leave_after: Option<usize>,
    writes: usize,
}

#[async_trait]
impl Client for Recorder {
    async fn send(&mut self, tasks: Vec<HttpTask>) -> bool {
        self.writes += 1;
        if self.leave_after.is_some_and(|n| self.writes > n) {
            return false;
        }
        self.tasks.extend(tasks);
        true
    }

    async fn gone(&mut self) {
        std::future::pending::<()>().await
    }
}

impl Recorder {
    /// The status and body the client got, tail included.
    fn finish(mut self, outcome: &mut ChainOutcome) -> (u16, String) {
        if let Some(t) = outcome.tail.take() {
            if let Some(h) = t.header {
                self.tasks.push(HttpTask::Header(h, false));
            }
            self.tasks.push(HttpTask::Body(Some(t.body), true));
        }
        let mut status = 0;
        let mut body = Vec::new();
        for t in &self.tasks {
            match t {
                HttpTask::Header(h, _) => status = h.status.as_u16(),
                HttpTask::Body(Some(b), _) => body.extend_from_slice(b),
                _ => {}
            }
        }
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    fn header(&self, name: &str) -> Option<String> {
        self.tasks.iter().find_map(|t| match t {
            HttpTask::Header(h, _) => h
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            _ => None,
        })
    }
}

/// A gateway whose models m1..mN are served by `addrs`, tried in that order.
fn gateway(addrs: &[SocketAddr]) -> (Arc<Shared>, Vec<Arc<Model>>, tempdir::Dir) {
    gateway_extra(addrs, "")
}

/// As [`gateway`], with `extra` (`, key: value`) in every provider's mapping.
fn gateway_extra(
    addrs: &[SocketAddr],
    extra: &str,
) -> (Arc<Shared>, Vec<Arc<Model>>, tempdir::Dir) {
    let mut models = String::new();
    for i in 0..addrs.len() {
        models += &format!(
            "  m{i}: {{ provider: p{i}, price: {{ input_per_mtok: 1, output_per_mtok: 2 }} }}\n"
        );
    }
    let names: Vec<String> = (0..addrs.len()).map(|i| format!("m{i}")).collect();
    gateway_with(addrs, &models, &names, extra)
}

/// A gateway with providers p0..pN at `addrs` (`extra`, `, key: value`, in every
/// provider's mapping) and the `models` section given, whose tenant's chain is `names`.
fn gateway_with(
    addrs: &[SocketAddr],
    models: &str,
    names: &[String],
    extra: &str,
) -> (Arc<Shared>, Vec<Arc<Model>>, tempdir::Dir) {
    let mut yaml =
        String::from("node: { region: r1 }\nlisten: { http: 127.0.0.1:18080 }\nproviders:\n");
    for (i, a) in addrs.iter().enumerate() {
        yaml += &format!(
            "  p{i}: {{ kind: openai_compatible, base_url: \"http://{a}\", region: r1, timeouts: {{ connect_ms: 500, first_token_ms: 400, idle_ms: 2000, total_ms: 5000 }}{extra} }}\n"
        );
    }
    yaml += "models:\n";
    yaml += models;
    yaml += &format!(
        "tenants:\n  t1:\n    api_keys: [ {{ id: k1, sha256: \"{}\" }} ]\n    models: [{}]\n",
        crate::config::sha256_hex("sk-t1"),
        names.join(", ")
    );
    let dir = tempdir::Dir::new();
    yaml += &format!("audit: {{ spool_dir: \"{}\" }}\n", dir.path());
    let cfg = Arc::new(Config::from_yaml_str(&yaml).expect("valid config"));
    let models = names
        .iter()
        .map(|n| cfg.model(n).expect("model").clone())
        .collect();
    let metrics = Metrics::new().expect("metrics");
    let (audit, _service) =
        crate::audit::AuditLog::new(&cfg.audit, metrics.audit.clone()).expect("audit log");
    (Arc::new(Shared::new(cfg, audit, metrics)), models, dir)
}

/// Temporary directories without a crate for it.
mod tempdir {
    pub struct Dir(std::path::PathBuf);
    impl Dir {
        pub fn new() -> Dir {
            static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let p =
                std::env::temp_dir().join(format!("llmgw-proxy-test-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&p).expect("temp dir");
            Dir(p)
        }
        pub fn path(&self) -> String {
            self.0.display().to_string()
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn plan(models: &[Arc<Model>], stream: bool, cache: Option<Lookup>) -> (Plan, ClientRequest) {
    let body = serde_json::json!({
        "model": "m0", "stream": stream,
        "messages": [{"role": "user", "content": "hi"}],
    });
    let mut req = ClientRequest::parse(ApiFormat::OpenAi, body.to_string().as_bytes())
        .expect("valid request");
    let b = std::mem::take(&mut req.body);
    let meta = req.clone();
    req.body = b;
    let plan = Plan {
        request_id: "req-1".to_string(),
        req: meta,
        forward: Vec::new(),
        chain: Chain {
            models: models.to_vec(),
            requested: "m0".to_string(),
            region: None,
        },
        prompt_bytes: body.to_string().len(),
        rate_headers: Default::default(),
        cache,
    };
    (plan, req)
}

fn row_of(plan: &Plan, outcome: &ChainOutcome) -> AuditRow {
    let mut row = AuditRow::default();
    front::outcome_into_row(&mut row, plan, outcome, "r1");
    row
}

async fn run(gw: &Shared, models: &[Arc<Model>], stream: bool) -> (ChainOutcome, Recorder, Plan) {
    let (plan, req) = plan(models, stream, None);
    let mut client = Recorder::default();
    let outcome = gw.run_chain(&mut client, &plan, req).await;
    (outcome, client, plan)
}

#[tokio::test]
async fn a_healthy_first_choice_answers_in_one_attempt() {
    for stream in [false, true] {
        let up = fake(vec![Act::Ok { delay_ms: 0 }]).await;
        let (gw, models, _d) = gateway(&[up.addr]);
        let (mut outcome, client, plan) = run(&gw, &models, stream).await;
        assert_eq!(outcome.upstream_attempts(), 1);
        let a = outcome.delivered().expect("delivered").clone();
        assert_eq!(a.result, AttemptResult::Ok);
        assert!(a.completion.complete && a.error.is_none(), "{a:?}");
        let row = row_of(&plan, &outcome);
        assert_eq!(
            (
                row.attempts,
                row.fallback_used,
                row.tokens_in,
                row.tokens_out
            ),
            (1, 0, 7, 2)
        );
        assert_eq!(row.model, "m0");
        assert!(row.error_code.is_empty() && row.cost_nanousd > 0, "{row:?}");
        let (status, body) = client.finish(&mut outcome);
        assert_eq!(status, 200);
        assert!(body.contains("Hello"), "{body}");
        assert_eq!(up.requests.load(Ordering::SeqCst), 1);
    }
}

#[tokio::test]
async fn every_failure_before_the_first_byte_fails_over() {
    let refused = refusing().await;
    let unavailable = fake(vec![Act::Status(503, None)]).await;
    let stalled = fake(vec![Act::Stall]).await;
    let garbage = fake(vec![Act::Garbage]).await;
    let good = fake(vec![Act::Ok { delay_ms: 0 }]).await;
    let addrs = [refused, unavailable.addr, stalled.addr, good.addr];
    let (gw, models, _d) = gateway(&addrs);
    let (mut outcome, client, plan) = run(&gw, &models, true).await;
    let results: Vec<_> = outcome
        .attempts
        .iter()
        .map(|a| (a.ended, a.result))
        .collect();
    assert_eq!(
        results,
        vec![
            (Ended::Failed, AttemptResult::Connect),
            (Ended::Failed, AttemptResult::Status5xx),
            (Ended::Failed, AttemptResult::FirstTokenTimeout),
            (Ended::Delivered, AttemptResult::Ok),
        ]
    );
    assert_eq!(client.header("x-gateway-attempts").as_deref(), Some("4"));
    assert_eq!(client.header("x-gateway-model").as_deref(), Some("m3"));
    assert_eq!(client.header("x-gateway-fallback").as_deref(), Some("true"));
    let row = row_of(&plan, &outcome);
    assert_eq!((row.attempts, row.fallback_used), (4, 1));
    let (status, body) = client.finish(&mut outcome);
    assert_eq!(status, 200);
    // Nothing of the failed attempts reached the client.
    assert_eq!(body.matches("data: [DONE]").count(), 1, "{body}");
    assert!(!body.contains("error"), "{body}");

    // Garbage in a 200 fails over too (non-streaming: the body must parse).
    let (gw, models, _d) = gateway(&[garbage.addr, good.addr]);
    let (outcome, _client, _plan) = run(&gw, &models, false).await;
    assert_eq!(outcome.attempts[0].result, AttemptResult::BadResponse);
    assert_eq!(
        outcome.delivered().map(|a| a.model.name.as_str()),
        Some("m1")
    );
}

#[tokio::test]
async fn a_stall_fails_over_within_the_first_token_deadline() {
    let stalled = fake(vec![Act::Stall]).await;
    let good = fake(vec![Act::Ok { delay_ms: 0 }]).await;
    let (gw, models, _d) = gateway(&[stalled.addr, good.addr]);
    let t = Instant::now();
    let (outcome, _client, _plan) = run(&gw, &models, true).await;
    let took = t.elapsed();
    assert!(outcome.delivered().is_some());
    // first_token_ms is 400 in this config; the stall waits 30 s.
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert!(took >= Duration::from_millis(400), "{took:?}");
}

/// A non-streaming request goes upstream as a stream, so a provider that stalls
/// before its first token (before or after its response header) is left within
/// `first_token_ms`, not `total_ms`.
#[tokio::test]
async fn a_stalled_non_streaming_upstream_fails_over_within_the_first_token_deadline() {
    for stall in [Act::Stall, Act::HeaderThenStall] {
        let stalled = fake(vec![stall]).await;
        let good = fake(vec![Act::Ok { delay_ms: 0 }]).await;
        let (gw, models, _d) = gateway(&[stalled.addr, good.addr]);
        let t = Instant::now();
        let (mut outcome, client, _plan) = run(&gw, &models, false).await;
        let took = t.elapsed();
        assert!(stalled
            .last_body
            .lock()
            .unwrap()
            .contains("\"stream\":true"));
        assert!(stalled
            .last_body
            .lock()
            .unwrap()
            .contains("\"stream_options\":{\"include_usage\":true}"));
        let results: Vec<_> = outcome.attempts.iter().map(|a| a.result).collect();
        assert_eq!(
            results,
            [AttemptResult::FirstTokenTimeout, AttemptResult::Ok],
            "{stall:?}"
        );
        // first_token_ms is 400 in this config, total_ms 5000; the stall waits 30 s.
        assert!(took < Duration::from_millis(1400), "{stall:?}: {took:?}");
        assert!(took >= Duration::from_millis(400), "{stall:?}: {took:?}");
        let tail = outcome.tail.as_ref().expect("an answer");
        let header = tail.header.as_ref().expect("one piece");
        let h = |n: &str| header.headers.get(n).and_then(|v| v.to_str().ok());
        assert_eq!(h("content-type"), Some("application/json"));
        assert_eq!(
            h("content-length"),
            Some(tail.body.len().to_string().as_str())
        );
        let (status, body) = client.finish(&mut outcome);
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_str(&body).expect("one JSON body");
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["message"]["content"], "Hello world");
        assert_eq!(v["usage"]["completion_tokens"], 2);
    }
}

/// An assembled answer cut after its first token has reached no client yet: the
/// chain moves on, and the cut attempt is reported as a reset, not delivered.
#[tokio::test]
async fn a_non_streaming_answer_cut_mid_stream_fails_over() {
    let cut = fake(vec![Act::Cut]).await;
    let good = fake(vec![Act::Ok { delay_ms: 0 }]).await;
    let (gw, models, _d) = gateway(&[cut.addr, good.addr]);
    let (mut outcome, client, plan) = run(&gw, &models, false).await;
    let results: Vec<_> = outcome.attempts.iter().map(|a| a.result).collect();
    assert_eq!(results, [AttemptResult::Reset, AttemptResult::Ok]);
    let row = row_of(&plan, &outcome);
    assert_eq!((row.attempts, row.tokens_out), (2, 2));
    let (_, body) = client.finish(&mut outcome);
    assert!(!body.contains("Hel\""), "nothing of the cut answer: {body}");
}

/// A server that answers `stream: true` with one JSON body is served as the non-stream
/// path serves it: its body passed through, bounded by `total_ms` once its header came
/// (here 800 ms after it, past `first_token_ms`).
#[tokio::test]
async fn a_server_that_ignores_stream_true_is_answered_with_its_own_body() {
    let up = fake(vec![Act::JsonLater { delay_ms: 800 }]).await;
    let (gw, models, _d) = gateway(&[up.addr]);
    let (mut outcome, client, _plan) = run(&gw, &models, false).await;
    assert!(up.last_body.lock().unwrap().contains("\"stream\":true"));
    let a = outcome.delivered().expect("delivered").clone();
    assert_eq!(a.result, AttemptResult::Ok);
    assert_eq!(a.completion.usage.map(|u| u.output), Some(2));
    let (status, body) = client.finish(&mut outcome);
    assert_eq!(status, 200);
    assert!(
        body.starts_with(r#"{"id":"c2","object":"chat.completion""#),
        "{body}"
    );
}

/// `upstream_streaming: as_client`: a non-streaming request goes upstream as the
/// client sent it, and the provider's body comes back byte for byte.
#[tokio::test]
async fn a_provider_that_opted_out_gets_the_request_as_the_client_sent_it() {
    let up = fake(vec![Act::Ok { delay_ms: 0 }]).await;
    let (gw, models, _d) = gateway_extra(&[up.addr], ", upstream_streaming: as_client");
    let (mut outcome, client, _plan) = run(&gw, &models, false).await;
    let sent = up.last_body.lock().unwrap().clone();
    assert!(sent.contains("\"stream\":false"), "{sent}");
    assert!(!sent.contains("stream_options"), "{sent}");
    let (status, body) = client.finish(&mut outcome);
    assert_eq!(status, 200);
    assert!(
        body.starts_with(r#"{"id":"c1","object":"chat.completion","created":1,"#),
        "{body}"
    );
}

#[tokio::test]
async fn a_stream_cut_after_its_first_byte_ends_with_one_error_event_and_no_failover() {
    let cut = fake(vec![Act::Cut]).await;
    let good = fake(vec![Act::Ok { delay_ms: 0 }]).await;
    let (gw, models, _d) = gateway(&[cut.addr, good.addr]);
    let (mut outcome, client, plan) = run(&gw, &models, true).await;
    assert_eq!(
        outcome.upstream_attempts(),
        1,
        "no failover once the client has bytes"
    );
    let a = outcome.delivered().expect("delivered").clone();
    assert!(a.error_event_sent && !a.completion.complete, "{a:?}");
    assert_eq!(good.requests.load(Ordering::SeqCst), 0);
    let row = row_of(&plan, &outcome);
    assert_eq!(row.error_code, "bad_upstream_response");
    assert!(row.tokens_out > 0, "the produced part is billed: {row:?}");
    let (_, body) = client.finish(&mut outcome);
    assert!(body.contains("Hel"), "{body}");
    assert_eq!(
        body.matches("\"error\"").count(),
        1,
        "exactly one error event: {body}"
    );
    assert!(!body.contains("[DONE]"), "never a clean end: {body}");
}

#[tokio::test]
async fn retry_after_of_every_failure_is_merged_to_the_soonest() {
    let a = fake(vec![Act::Status(429, Some(7))]).await;
    let b = fake(vec![Act::Status(503, Some(3))]).await;
    let c = fake(vec![Act::Status(429, Some(5))]).await;
    let (gw, models, _d) = gateway(&[a.addr, b.addr, c.addr]);
    let (outcome, client, plan) = run(&gw, &models, false).await;
    assert!(outcome.delivered().is_none());
    let e = outcome.error.clone().expect("the chain failed");
    assert_eq!(e.kind, ErrorKind::UpstreamUnavailable);
    assert_eq!(
        e.retry_after,
        Some(3),
        "the soonest any deployment is usable"
    );
    assert!(e.message.contains("3 attempts"), "{}", e.message);
    let results: Vec<_> = outcome.attempts.iter().map(|a| a.result).collect();
    assert_eq!(
        results,
        [
            AttemptResult::Status429,
            AttemptResult::Status5xx,
            AttemptResult::Status429
        ]
    );
    assert!(client.tasks.is_empty(), "nothing reached the client");
    let row = row_of(&plan, &outcome);
    assert_eq!(
        (row.attempts, row.error_code.as_str()),
        (3, "upstream_unavailable")
    );
    assert_eq!(row.model, "m2", "the last model tried");
    assert_eq!(row.cost_nanousd, 0);
}

#[tokio::test]
async fn a_client_that_leaves_mid_stream_is_reported_with_what_it_used() {
    let up = fake(vec![Act::Ok { delay_ms: 0 }]).await;
    let (gw, models, _d) = gateway(&[up.addr]);
    let (plan, req) = plan(&models, true, None);
    // The header and first bytes go out; the next write finds the client gone.
    let mut client = Recorder {
        leave_after: Some(1),
        ..Default::default()
    };
    let outcome = gw.run_chain(&mut client, &plan, req).await;
    assert!(outcome.client_gone());
    let a = outcome.last().expect("one attempt");
    assert_eq!(
        (a.ended, a.result),
        (Ended::ClientGone, AttemptResult::Cancelled)
    );
    assert_eq!(a.client_status, 200);
    assert!(a.first_byte.is_some());
    assert!(a.completion.content_bytes > 0);
}

#[tokio::test]
async fn concurrent_identical_misses_make_one_upstream_call() {
    let up = fake(vec![Act::Ok { delay_ms: 200 }]).await;
    let (gw, models, _d) = gateway(&[up.addr]);
    let lookup = Lookup {
        digest: [7u8; 32],
        tenant: "t1".to_string(),
        ttl: Duration::from_secs(60),
        refresh: false,
    };
    for stream in [false, true] {
        let mut lookup = lookup.clone();
        lookup.digest[0] = stream as u8;
        up.requests.store(0, Ordering::SeqCst);
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let gw = gw.clone();
            let (plan, req) = plan(&models, stream, Some(lookup.clone()));
            tasks.push(tokio::spawn(async move {
                let mut client = Recorder::default();
                let mut outcome = gw.run_chain(&mut client, &plan, req).await;
                let hit = outcome.cache_hit();
                let (status, body) = client.finish(&mut outcome);
                (hit, status, body)
            }));
        }
        let mut hits = 0;
        let mut bodies = Vec::new();
        for t in tasks {
            let (hit, status, body) = t.await.expect("task");
            assert_eq!(status, 200);
            hits += hit as usize;
            bodies.push(body);
        }
        assert_eq!(up.requests.load(Ordering::SeqCst), 1, "stream={stream}");
        assert_eq!(hits, 19);
        // Every reader got the filler's bytes exactly.
        assert!(bodies.windows(2).all(|w| w[0] == w[1]), "{bodies:?}");
        // And another tenant with the same digest is a miss, never a hit.
        let mut other = lookup.clone();
        other.tenant = "t2".to_string();
        let (plan, req) = plan(&models, stream, Some(other));
        let mut client = Recorder::default();
        let outcome = gw.run_chain(&mut client, &plan, req).await;
        assert!(!outcome.cache_hit());
        assert_eq!(up.requests.load(Ordering::SeqCst), 2);
    }
}

#[tokio::test]
async fn an_incomplete_answer_is_not_stored() {
    let up = fake(vec![Act::Cut, Act::Ok { delay_ms: 0 }]).await;
    let (gw, models, _d) = gateway(&[up.addr]);
    let lookup = Lookup {
        digest: [9u8; 32],
        tenant: "t1".to_string(),
        ttl: Duration::from_secs(60),
        refresh: false,
    };
    for expect_hit in [false, false, true] {
        let (plan, req) = plan(&models, true, Some(lookup.clone()));
        let mut client = Recorder::default();
        let outcome = gw.run_chain(&mut client, &plan, req).await;
        assert_eq!(outcome.cache_hit(), expect_hit);
    }
    assert_eq!(up.requests.load(Ordering::SeqCst), 2);
}
