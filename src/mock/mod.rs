//! Mock LLM provider: a local stand-in for OpenAI, Anthropic and in-house
//! OpenAI-compatible (vLLM) servers, for the demo, integration tests and load tests.
//!
//! It speaks the providers' exact wire formats (the official SDKs parse its
//! output through the gateway), replies deterministically from the prompt, and
//! injects latency and faults per request, so every gateway path (streaming,
//! translation, retries, fallback, timeouts, garbage upstreams) can be exercised
//! without network access or provider keys.
//!
//! Endpoints (matched on the path suffix, so `/inhouse/v1/chat/completions` works):
//! - `POST …/v1/chat/completions` — OpenAI Chat Completions, streaming or not.
//! - `POST …/v1/messages` — Anthropic Messages, streaming or not.
//! - `POST …/openai/deployments/{name}/chat/completions?api-version=…` — Azure OpenAI:
//!   OpenAI's format, `api-key` header required (401), `api-version` required (404),
//!   Azure-shaped error bodies.
//! - `GET …/v1/models` — OpenAI list format (Anthropic's when `anthropic-version` is sent).
//! - `GET /_mock/requests`, `GET /_mock/stats`, `POST /_mock/reset` — what reached the mock
//!   (each request with its `http_version`: `HTTP/1.1` or `HTTP/2.0`); `POST
//!   /_mock/defaults` with a body `k=v;k=v` sets directives every request gets under
//!   its own (empty body: none), so one mock process plays a deployment that is down
//!   or rate limited for a while.
//!
//! Plain HTTP/1.1 by default; with `--tls-cert FILE --tls-key FILE`, HTTPS with ALPN
//! `h2` and `http/1.1` on the same port (see [`tls`]).
//!
//! Per-request control: header `x-mock: k=v;k=v` or `[[mock: k=v; k=v]]` in the
//! prompt text (see [`directives`]); keys `ttft_ms`, `gap_ms`, `tokens`, `status`,
//! `fault` (`reset|stall|cut|garbage|midstream_error`), `cut_after`, `usage=none`,
//! `tool=NAME|*`, `fail_first=N` with `key=ID`, `retry_after=SECONDS|HTTP-DATE` (the
//! error answer's `retry-after`; 1 by default on 429, none on 503/529). A tool call made under OpenAI
//! `tool_choice: "required"` finishes with `"stop"`, as gpt-4o-mini's do.

mod anthropic;
mod azure;
mod content;
pub mod directives;
mod openai;
mod record;
mod server;
mod tls;

pub use tls::MockTls;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tls_tests;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;

/// Models `GET /v1/models` lists, with their owner for the OpenAI format.
const MODELS: [(&str, &str); 5] = [
    ("gpt-4o-mini", "openai"),
    ("gpt-4o", "openai"),
    ("claude-3-5-haiku-20241022", "anthropic"),
    ("claude-sonnet-4-20250514", "anthropic"),
    ("llama-70b", "inhouse"),
];

/// Server-wide defaults; each can be overridden per request by a directive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MockOptions {
    /// Address to bind; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Delay before the first content (non-stream: before the response headers).
    pub ttft_ms: u64,
    /// Delay between streamed tokens.
    pub gap_ms: u64,
    /// Tokens per reply (capped by the request's max_tokens).
    pub tokens: u32,
    /// Serve HTTPS (HTTP/2 and HTTP/1.1 by ALPN) with this certificate; `None`: plain HTTP/1.1.
    pub tls: Option<MockTls>,
}

impl MockOptions {
    /// Defaults (no latency, 16 tokens) on `listen`.
    pub fn new(listen: SocketAddr) -> MockOptions {
        MockOptions {
            listen,
            ttft_ms: 0,
            gap_ms: 0,
            tokens: 16,
            tls: None,
        }
    }
}

const USAGE: &str = "usage: mock-provider --listen ADDR [--ttft-ms N] [--gap-ms N] [--tokens N] \
                     [--tls-cert FILE --tls-key FILE]";

/// Parses `--listen ADDR` (required), `--ttft-ms N`, `--gap-ms N`, `--tokens N`,
/// `--tls-cert FILE` with `--tls-key FILE` (both or neither) (also as `--flag=value`). Leading words that are not flags (program name,
/// subcommand) are skipped so `std::env::args()` can be passed as is.
pub fn parse_args(args: &[String]) -> Result<MockOptions, String> {
    let mut listen = None;
    let (mut cert, mut key) = (None, None);
    let mut opts = MockOptions::new(SocketAddr::from(([127, 0, 0, 1], 0)));
    let mut it = args
        .iter()
        .skip_while(|a| !a.starts_with('-'))
        .map(String::as_str);
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f, Some(v)),
            None => (arg, None),
        };
        if matches!(flag, "-h" | "--help") {
            return Err(USAGE.to_string());
        }
        if !matches!(
            flag,
            "--listen" | "--ttft-ms" | "--gap-ms" | "--tokens" | "--tls-cert" | "--tls-key"
        ) {
            return Err(format!("unknown argument {arg:?}\n{USAGE}"));
        }
        let value = match inline.or_else(|| it.next()) {
            Some(v) => v,
            None => return Err(format!("{flag} needs a value\n{USAGE}")),
        };
        let bad = |e: &dyn std::fmt::Display| format!("invalid value {value:?} for {flag}: {e}");
        match flag {
            "--listen" => listen = Some(value.parse::<SocketAddr>().map_err(|e| bad(&e))?),
            "--ttft-ms" => opts.ttft_ms = value.parse().map_err(|e| bad(&e))?,
            "--gap-ms" => opts.gap_ms = value.parse().map_err(|e| bad(&e))?,
            "--tls-cert" => cert = Some(value.into()),
            "--tls-key" => key = Some(value.into()),
            _ => {
                opts.tokens = value.parse().map_err(|e| bad(&e))?;
                if opts.tokens > directives::MAX_TOKENS {
                    return Err(format!(
                        "--tokens must be at most {}",
                        directives::MAX_TOKENS
                    ));
                }
            }
        }
    }
    opts.listen = listen.ok_or_else(|| format!("--listen is required\n{USAGE}"))?;
    opts.tls = match (cert, key) {
        (Some(cert), Some(key)) => Some(MockTls { cert, key }),
        (None, None) => None,
        _ => return Err(format!("--tls-cert and --tls-key go together\n{USAGE}")),
    };
    Ok(opts)
}

/// A bound listener, the shared state and, in TLS mode, the acceptor (built here so
/// a bad certificate fails before the ready line).
struct Bound {
    listener: tokio::net::TcpListener,
    state: Arc<server::State>,
    tls: Option<pingora_rustls::TlsAcceptor>,
}

async fn bind(opts: &MockOptions) -> std::io::Result<Bound> {
    let tls = opts.tls.as_ref().map(tls::acceptor).transpose()?;
    let listener = tokio::net::TcpListener::bind(opts.listen).await?;
    let state = Arc::new(server::State {
        ttft_ms: opts.ttft_ms,
        gap_ms: opts.gap_ms,
        tokens: opts.tokens.min(directives::MAX_TOKENS),
        ..Default::default()
    });
    Ok(Bound {
        listener,
        state,
        tls,
    })
}

/// Binds, prints `mock-provider listening on http://IP:PORT` (`https://` in TLS mode;
/// the readiness line tests wait for; the real port when 0 was asked), then serves
/// forever. Returns only if binding (or loading the certificate) fails.
pub async fn run(opts: MockOptions) -> std::io::Result<()> {
    let b = bind(&opts).await?;
    let addr = b.listener.local_addr()?;
    {
        // A closed stdout must not kill the server, so no println!.
        let scheme = if b.tls.is_some() { "https" } else { "http" };
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "mock-provider listening on {scheme}://{addr}");
        let _ = out.flush();
    }
    server::serve(b.listener, b.state, b.tls).await;
    Ok(())
}

/// Binds and serves in a background task on the current runtime; returns the
/// bound address (the real port when 0 was asked) and the serving task. Prints
/// nothing: in-process callers get the address directly.
pub async fn spawn(
    opts: MockOptions,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let b = bind(&opts).await?;
    let addr = b.listener.local_addr()?;
    Ok((
        addr,
        tokio::spawn(server::serve(b.listener, b.state, b.tls)),
    ))
}
