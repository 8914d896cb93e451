//! The TLS mode through Pingora's own client connector, the one the gateway drives per
//! upstream attempt: ALPN `h2` must give an HTTP/2 session whose SSE arrives event by
//! event, ALPN `http/1.1` an HTTP/1.1 one, and the request log must say which.

use super::{parse_args, spawn, MockOptions, MockTls};
use bytes::Bytes;
use pingora_core::connectors::http::Connector;
use pingora_core::protocols::http::client::HttpSession;
use pingora_core::protocols::ALPN;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::utils::tls::{parse_x509, WrappedX509};
use pingora_http::RequestHeader;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Test-only certificate for localhost / 127.0.0.1 (tests/fixtures/tls/README.md).
fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tls")
        .join(name)
}

fn tls_options() -> MockOptions {
    MockOptions {
        tls: Some(MockTls {
            cert: fixture("localhost.pem"),
            key: fixture("localhost.key"),
        }),
        ..MockOptions::new(SocketAddr::from(([127, 0, 0, 1], 0)))
    }
}

async fn start_tls() -> SocketAddr {
    match spawn(tls_options()).await {
        Ok((addr, _)) => addr,
        Err(e) => panic!("spawn failed: {e}"),
    }
}

/// A peer that verifies the mock's certificate against the test CA, as the gateway
/// verifies a real provider's.
fn peer(addr: SocketAddr, alpn: ALPN) -> HttpPeer {
    let ca = fixture("ca.pem").to_string_lossy().into_owned();
    let der = pingora_rustls::load_pem_file_ca(&ca).expect("test CA");
    let mut peer = HttpPeer::new(addr, true, "localhost".to_string());
    peer.options.alpn = alpn;
    peer.options.ca = Some(Arc::from(vec![WrappedX509::new(der, parse_x509)]));
    peer
}

/// The response status and each body read with the moment it arrived.
struct Reply {
    status: u16,
    reads: Vec<(Instant, Bytes)>,
}

impl Reply {
    fn text(&self) -> String {
        let all: Vec<u8> = self.reads.iter().flat_map(|(_, b)| b.to_vec()).collect();
        String::from_utf8_lossy(&all).into_owned()
    }
}

/// One request on a session of its own; returns the session's protocol with the reply.
async fn call(
    connector: &Connector,
    peer: &HttpPeer,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> (&'static str, Reply) {
    let (mut session, _reused) = connector
        .get_http_session(peer)
        .await
        .expect("connect to the TLS mock");
    let protocol = match &session {
        HttpSession::H1(_) => "h1",
        HttpSession::H2(_) => "h2",
        HttpSession::Custom(_) => "custom",
    };
    let body = body.map(|b| Bytes::from(b.to_string()));
    let mut req = RequestHeader::build(method, path.as_bytes(), None).expect("request header");
    req.insert_header("host", "localhost").expect("host");
    if let Some(b) = &body {
        req.insert_header("content-type", "application/json")
            .expect("content-type");
        req.insert_header("content-length", b.len().to_string())
            .expect("content-length");
    }
    session
        .write_request_header(Box::new(req))
        .await
        .expect("write request header");
    if let Some(b) = body {
        session
            .write_request_body(b, true)
            .await
            .expect("write request body");
    }
    session
        .finish_request_body()
        .await
        .expect("finish request body");
    session
        .read_response_header()
        .await
        .expect("read response header");
    let status = session.response_header().map_or(0, |h| h.status.as_u16());
    let mut reads = Vec::new();
    while let Some(chunk) = session
        .read_response_body()
        .await
        .expect("read response body")
    {
        reads.push((Instant::now(), chunk));
    }
    (protocol, Reply { status, reads })
}

async fn logged_versions(connector: &Connector, peer: &HttpPeer) -> Vec<String> {
    let (_, reply) = call(connector, peer, "GET", "/_mock/requests", None).await;
    let log: Value = serde_json::from_str(&reply.text()).expect("request log JSON");
    log.as_array()
        .expect("request log array")
        .iter()
        .map(|e| e["http_version"].as_str().unwrap_or("missing").to_string())
        .collect()
}

const GAP_MS: u64 = 120;
const TOKENS: u64 = 5;

fn chat(stream: bool) -> Value {
    json!({
        "model": "gpt-4o-mini",
        "stream": stream,
        "messages": [{"role": "user", "content": format!("count [[mock: gap_ms={GAP_MS}; tokens={TOKENS}]]")}],
    })
}

#[tokio::test]
async fn h2_by_alpn_with_incremental_sse() {
    let addr = start_tls().await;
    let connector = Connector::new(None);
    let peer = peer(addr, ALPN::H2H1);
    let run = async {
        let (protocol, reply) = call(
            &connector,
            &peer,
            "POST",
            "/v1/chat/completions",
            Some(&chat(true)),
        )
        .await;
        assert_eq!(protocol, "h2", "ALPN h2,http/1.1 must negotiate HTTP/2");
        assert_eq!(reply.status, 200);
        let text = reply.text();
        assert!(text.contains("data: [DONE]"), "complete stream: {text}");
        // Incremental: the first content event arrives on its own, the end of the
        // stream only after the mock's gaps, not in one burst with the rest.
        let first = reply
            .reads
            .iter()
            .find(|(_, b)| String::from_utf8_lossy(b).contains("\"content\":\""))
            .expect("a content event");
        let done = reply
            .reads
            .iter()
            .find(|(_, b)| String::from_utf8_lossy(b).contains("[DONE]"))
            .expect("the [DONE] event");
        assert!(
            !String::from_utf8_lossy(&first.1).contains("[DONE]"),
            "first content and [DONE] came in one read: {text}"
        );
        let spread = done.0.duration_since(first.0);
        let gaps = Duration::from_millis(GAP_MS * (TOKENS - 1));
        assert!(
            spread >= gaps.mul_f64(0.8),
            "stream not incremental over h2: {spread:?} from first content to [DONE], gaps {gaps:?}"
        );

        let (protocol, reply) = call(
            &connector,
            &peer,
            "POST",
            "/v1/chat/completions",
            Some(&chat(false)),
        )
        .await;
        assert_eq!(protocol, "h2");
        assert_eq!(reply.status, 200);
        let body: Value = serde_json::from_str(&reply.text()).expect("completion JSON");
        assert_eq!(body["usage"]["completion_tokens"], TOKENS);

        assert_eq!(logged_versions(&connector, &peer).await, ["HTTP/2.0"; 2]);
    };
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("test timed out");
}

#[tokio::test]
async fn h1_when_only_http11_is_offered() {
    let addr = start_tls().await;
    let connector = Connector::new(None);
    let peer = peer(addr, ALPN::H1);
    let run = async {
        let (protocol, reply) = call(
            &connector,
            &peer,
            "POST",
            "/v1/chat/completions",
            Some(&chat(true)),
        )
        .await;
        assert_eq!(protocol, "h1", "ALPN http/1.1 must stay HTTP/1.1");
        assert_eq!(reply.status, 200);
        assert!(reply.text().contains("data: [DONE]"));
        assert_eq!(logged_versions(&connector, &peer).await, ["HTTP/1.1"]);
    };
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("test timed out");
}

#[tokio::test]
async fn bad_certificate_files_fail_at_start() {
    let mut opts = tls_options();
    if let Some(tls) = opts.tls.as_mut() {
        tls.key = fixture("ca.pem"); // a certificate, not a key
    }
    let err = spawn(opts)
        .await
        .expect_err("a pair without a key must fail");
    assert!(err.to_string().contains("no private key"), "{err}");
    let mut opts = tls_options();
    if let Some(tls) = opts.tls.as_mut() {
        tls.cert = fixture("missing.pem");
    }
    assert!(spawn(opts).await.is_err());
}

#[test]
fn tls_flags_go_together() {
    let args = |extra: &[&str]| -> Vec<String> {
        ["--listen", "127.0.0.1:0"]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    };
    let o = parse_args(&args(&["--tls-cert", "c.pem", "--tls-key=k.pem"])).unwrap();
    assert_eq!(
        o.tls,
        Some(MockTls {
            cert: "c.pem".into(),
            key: "k.pem".into()
        })
    );
    assert_eq!(parse_args(&args(&[])).unwrap().tls, None);
    for half in [["--tls-cert", "c.pem"], ["--tls-key", "k.pem"]] {
        let err = parse_args(&args(&half)).unwrap_err();
        assert!(err.contains("go together"), "{err}");
    }
}
