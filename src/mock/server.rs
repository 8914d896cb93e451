//! The server: routing, timing, faults and the streaming body. Plain TCP is HTTP/1.1;
//! the TLS mode ([`super::tls`]) adds HTTP/2 by ALPN on the same handler.
//!
//! hyper is used directly (not Pingora) because faults need control below the
//! HTTP layer: returning an error from the service closes the connection with no
//! response (`fault=reset`) and an error frame from the body aborts it
//! mid-response (`fault=cut`).

use super::anthropic::{self, MessagesRequest};
use super::azure;
use super::content::{
    assemble, generate, random_id, unix_now, Generation, Prompt, Step, StreamShape,
};
use super::directives::{Directives, FailCounters, Fault, MAX_TOKENS};
use super::openai::{self, ChatRequest};
use super::record::{self, RequestLog};
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use pingora_rustls::TlsAcceptor;
use serde_json::{json, Value};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// Frames buffered between the stream writer task and hyper.
const CHANNEL_FRAMES: usize = 32;
/// How long a non-streamed `fault=stall` holds the request ("never", in test terms).
const STALL_FOR: Duration = Duration::from_secs(3600);
/// Fixed `created` of the model list, so `GET /v1/models` is byte-stable.
const MODELS_CREATED: u64 = 1_715_367_049;

type FrameResult = Result<Frame<Bytes>, io::Error>;

/// Response body: a whole buffer, or frames fed by a writer task. An `Err` frame
/// makes hyper abort the connection, which is exactly a "cut" upstream.
pub enum MockBody {
    Full(Option<Bytes>),
    Channel(mpsc::Receiver<FrameResult>),
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<FrameResult>> {
        match self.get_mut() {
            MockBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            MockBody::Channel(rx) => rx.poll_recv(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, MockBody::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            MockBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            MockBody::Full(None) => SizeHint::with_exact(0),
            MockBody::Channel(_) => SizeHint::default(),
        }
    }
}

/// Server-wide defaults and shared bookkeeping.
#[derive(Debug, Default)]
pub struct State {
    pub ttft_ms: u64,
    pub gap_ms: u64,
    pub tokens: u32,
    pub log: RequestLog,
    pub fails: FailCounters,
    /// Directives every request gets under its own (`POST /_mock/defaults`), so one
    /// mock can play a deployment that is down or rate limited for a while.
    pub defaults: std::sync::Mutex<Directives>,
}

/// Accepts forever; accept errors (e.g. out of file descriptors) are transient,
/// so they are logged and retried after a short pause instead of ending the server.
/// With `tls`, every connection is HTTPS (HTTP/2 or HTTP/1.1 by ALPN); without, plain
/// HTTP/1.1.
pub async fn serve(listener: TcpListener, state: Arc<State>, tls: Option<TlsAcceptor>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let state = state.clone();
                match &tls {
                    Some(acceptor) => {
                        tokio::spawn(serve_tls(acceptor.clone(), stream, state));
                    }
                    None => {
                        // Small SSE frames must leave immediately, not wait for Nagle.
                        let _ = stream.set_nodelay(true);
                        tokio::spawn(serve_http1(stream, state));
                    }
                }
            }
            Err(e) => {
                log::warn!("mock-provider: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// One TLS connection: HTTP/2 or HTTP/1.1, as its handshake agreed.
async fn serve_tls(acceptor: TlsAcceptor, stream: tokio::net::TcpStream, state: Arc<State>) {
    let Some((tls, h2)) = super::tls::accept(&acceptor, stream).await else {
        return;
    };
    if !h2 {
        serve_http1(tls, state).await;
        return;
    }
    let svc = service_fn(move |req| handle(state.clone(), req));
    let result = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(tls), svc)
        .await;
    if let Err(e) = result {
        log::debug!("mock-provider: h2 connection ended: {e}");
    }
}

/// One HTTP/1.1 connection, over plain TCP or TLS.
async fn serve_http1<IO>(io: IO, state: Arc<State>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| handle(state.clone(), req));
    let result = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), svc)
        .await;
    if let Err(e) = result {
        // Expected for injected faults and clients that leave; not worth more than debug.
        log::debug!("mock-provider: connection ended: {e}");
    }
}

fn full(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<MockBody> {
    let mut resp = Response::new(MockBody::Full(Some(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn json_response(status: StatusCode, body: Bytes) -> Response<MockBody> {
    full(status, "application/json", body)
}

/// Which wire format an endpoint speaks (errors included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    OpenAi,
    Anthropic,
    /// OpenAI's format at Azure's path, with Azure's error bodies.
    Azure,
}

fn error_response(api: Api, status: u16, message: Option<&str>) -> Response<MockBody> {
    error_with_retry(api, status, message, None)
}

fn error_with_retry(
    api: Api,
    status: u16,
    message: Option<&str>,
    retry_after: Option<&str>,
) -> Response<MockBody> {
    let body = match api {
        Api::OpenAi => openai::error_json(status, message),
        Api::Anthropic => anthropic::error_json(status, message),
        Api::Azure => azure::error_json(status, message),
    };
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = json_response(code, Bytes::from(body.to_string()));
    let retry = retry_after.and_then(|v| HeaderValue::from_str(v).ok());
    if let Some(v) = retry {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    } else if status == 429 {
        // As the providers do on a rate limit; an overload (503, 529) says nothing
        // unless asked (`retry_after=`), so it does not park a deployment.
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

/// Routes on the path *suffix* so a base URL with a prefix (`/inhouse/v1/...`) works.
async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<MockBody>, io::Error> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map_err(io::Error::other)?.to_bytes();
    let path = parts.uri.path();
    if let Some(rest) = path.strip_prefix("/_mock/") {
        return Ok(admin(&state, &parts.method, rest, &body));
    }
    let parsed = serde_json::from_slice::<Value>(&body).map_err(|e| e.to_string());
    state
        .log
        .push(record::entry(&parts, &body, parsed.as_ref().ok()));
    let header_directives = parts
        .headers
        .get("x-mock")
        .and_then(|v| v.to_str().ok())
        .map(Directives::parse_list);
    let api = if path.ends_with("/v1/messages") {
        Api::Anthropic
    } else if path.ends_with("/v1/chat/completions") {
        Api::OpenAi
    } else if azure::chat_deployment(path).is_some() {
        if let Some((status, msg)) = azure::refusal(parts.uri.query(), &parts.headers) {
            return Ok(error_response(Api::Azure, status, Some(msg)));
        }
        Api::Azure
    } else if path.ends_with("/v1/models") && parts.method == Method::GET {
        return Ok(if parts.headers.contains_key("anthropic-version") {
            json_response(StatusCode::OK, anthropic::models_list())
        } else {
            json_response(StatusCode::OK, openai::models_list(MODELS_CREATED))
        });
    } else {
        let msg = format!("Invalid URL ({} {})", parts.method, path);
        let body = json!({"error": {"message": msg, "type": "invalid_request_error", "param": null, "code": null}});
        return Ok(json_response(
            StatusCode::NOT_FOUND,
            Bytes::from(body.to_string()),
        ));
    };
    if parts.method != Method::POST {
        let msg = format!("Method {} not allowed for {path}", parts.method);
        let mut resp = error_response(api, 405, Some(&msg));
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return Ok(resp);
    }
    completion(&state, api, parsed, header_directives.unwrap_or_default()).await
}

/// `/_mock/*`: introspection for tests; not recorded in the log itself.
fn admin(state: &State, method: &Method, rest: &str, body: &[u8]) -> Response<MockBody> {
    match (method, rest) {
        (&Method::GET, "requests") => json_response(StatusCode::OK, state.log.requests_json()),
        (&Method::GET, "stats") => json_response(StatusCode::OK, state.log.stats_json()),
        (&Method::POST, "defaults") => {
            let d = Directives::parse_list(&String::from_utf8_lossy(body));
            *lock(&state.defaults) = d;
            json_response(StatusCode::OK, Bytes::from_static(b"{\"ok\":true}"))
        }
        (&Method::POST, "reset") => {
            state.log.clear();
            state.fails.clear();
            *lock(&state.defaults) = Directives::default();
            json_response(StatusCode::OK, Bytes::from_static(b"{\"ok\":true}"))
        }
        _ => json_response(
            StatusCode::NOT_FOUND,
            Bytes::from_static(b"{\"error\":\"unknown /_mock/ endpoint\"}"),
        ),
    }
}

/// A validated request of either format.
enum ApiRequest {
    OpenAi(ChatRequest),
    Anthropic(MessagesRequest),
}

impl ApiRequest {
    fn prompt(&self) -> &Prompt {
        match self {
            ApiRequest::OpenAi(r) => &r.prompt,
            ApiRequest::Anthropic(r) => &r.prompt,
        }
    }

    fn stream(&self) -> bool {
        match self {
            ApiRequest::OpenAi(r) => r.stream,
            ApiRequest::Anthropic(r) => r.stream,
        }
    }

    fn max_tokens(&self) -> Option<u64> {
        match self {
            ApiRequest::OpenAi(r) => r.max_tokens,
            ApiRequest::Anthropic(r) => Some(r.max_tokens),
        }
    }

    fn tool_names(&self) -> &[String] {
        match self {
            ApiRequest::OpenAi(r) => &r.tool_names,
            ApiRequest::Anthropic(r) => &r.tool_names,
        }
    }
}

/// `tool=NAME` only applies when the request offers tools; `tool=*` means the first one.
fn pick_tool(directive: Option<String>, offered: &[String]) -> Option<String> {
    let first = offered.first()?;
    match directive? {
        d if d == "*" => Some(first.clone()),
        d => Some(d),
    }
}

async fn sleep_ms(ms: u64) {
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

/// Chat completions and messages: directives, faults, then the reply.
async fn completion(
    state: &State,
    api: Api,
    parsed: Result<Value, String>,
    header: Directives,
) -> Result<Response<MockBody>, io::Error> {
    let request = parsed
        .map_err(|e| match api {
            Api::OpenAi | Api::Azure => {
                format!("We could not parse the JSON body of your request. ({e})")
            }
            Api::Anthropic => format!("There was an error parsing the body: {e}"),
        })
        .and_then(|body| match api {
            Api::OpenAi | Api::Azure => openai::parse_request(&body).map(ApiRequest::OpenAi),
            Api::Anthropic => anthropic::parse_request(&body).map(ApiRequest::Anthropic),
        });
    let mut d = lock(&state.defaults).clone();
    if let Ok(r) = &request {
        d.merge(r.prompt().directives());
    }
    d.merge(header);
    let ttft = d.ttft_ms.unwrap_or(state.ttft_ms);
    let gap = d.gap_ms.unwrap_or(state.gap_ms);
    let stream = request.as_ref().is_ok_and(ApiRequest::stream);

    if d.fault == Some(Fault::Reset) {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionReset,
            "mock fault=reset",
        ));
    }
    if d.fault == Some(Fault::Stall) && !stream {
        tokio::time::sleep(STALL_FOR).await;
        return Err(io::Error::new(io::ErrorKind::TimedOut, "mock fault=stall"));
    }
    if let Some(status) = d.error_status(&state.fails) {
        sleep_ms(ttft).await;
        return Ok(error_with_retry(
            api,
            status,
            None,
            d.retry_after.as_deref(),
        ));
    }
    let request = match request {
        Ok(r) => r,
        Err(msg) => return Ok(error_response(api, 400, Some(&msg))),
    };
    let tokens = d.tokens.unwrap_or(state.tokens).min(MAX_TOKENS);
    let tool = pick_tool(d.tool.take(), request.tool_names());
    let g = generate(request.prompt(), tokens, request.max_tokens(), tool);
    if stream {
        Ok(stream_response(&request, &g, &d, ttft, gap))
    } else {
        non_stream_response(api, &request, &g, &d, ttft, gap).await
    }
}

/// Non-streamed replies take as long as the stream would have (ttft plus the
/// gaps), so load tests see realistic latency for both modes.
async fn non_stream_response(
    api: Api,
    request: &ApiRequest,
    g: &Generation,
    d: &Directives,
    ttft: u64,
    gap: u64,
) -> Result<Response<MockBody>, io::Error> {
    let gaps = u64::try_from(g.pieces.len().saturating_sub(1)).unwrap_or(u64::MAX);
    sleep_ms(ttft.saturating_add(gap.saturating_mul(gaps))).await;
    let with_usage = !d.usage_none;
    let body = match request {
        ApiRequest::OpenAi(r) => {
            openai::completion(r, g, with_usage, &random_id("chatcmpl-", 29), unix_now())
        }
        ApiRequest::Anthropic(r) => anthropic::message(r, g, with_usage, &random_id("msg_01", 22)),
    };
    match d.fault {
        Some(Fault::Garbage) => Ok(full(
            StatusCode::OK,
            "application/json",
            Bytes::from_static(b"<html><body>mock garbage: this is not JSON</body></html>"),
        )),
        Some(Fault::MidstreamError) => Ok(match api {
            Api::OpenAi | Api::Azure => error_response(api, 500, None),
            Api::Anthropic => error_response(api, 529, None),
        }),
        Some(Fault::Cut) => {
            // Promise the whole body, deliver half, then abort.
            let (tx, rx) = mpsc::channel(CHANNEL_FRAMES);
            let len = body.len();
            let steps = vec![Step::Data(body.slice(..len / 2)), Step::Abort];
            tokio::spawn(run_steps(steps, tx));
            let mut resp = Response::new(MockBody::Channel(rx));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            resp.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
            Ok(resp)
        }
        _ => Ok(json_response(StatusCode::OK, body)),
    }
}

/// Sends the headers at once and lets a task write the events on schedule.
fn stream_response(
    request: &ApiRequest,
    g: &Generation,
    d: &Directives,
    ttft: u64,
    gap: u64,
) -> Response<MockBody> {
    let parts = match request {
        ApiRequest::OpenAi(r) => {
            openai::stream_parts(r, g, d.usage_none, &random_id("chatcmpl-", 29), unix_now())
        }
        ApiRequest::Anthropic(r) => {
            anthropic::stream_parts(r, g, d.usage_none, &random_id("msg_01", 22))
        }
    };
    let shape = StreamShape {
        ttft_ms: ttft,
        gap_ms: gap,
        fault: d.fault,
        cut_after: d.cut_after,
    };
    let (tx, rx) = mpsc::channel(CHANNEL_FRAMES);
    tokio::spawn(run_steps(assemble(parts, shape), tx));
    let mut resp = Response::new(MockBody::Channel(rx));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// Writes a plan into the body channel; stops as soon as the client is gone.
async fn run_steps(steps: Vec<Step>, tx: mpsc::Sender<FrameResult>) {
    for step in steps {
        match step {
            Step::Data(b) => {
                if tx.send(Ok(Frame::data(b))).await.is_err() {
                    return;
                }
            }
            Step::Sleep(ms) => {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(ms)) => {}
                    () = tx.closed() => return,
                }
            }
            Step::Abort => {
                drain(&tx).await;
                let err = io::Error::new(io::ErrorKind::ConnectionAborted, "mock fault=cut");
                let _ = tx.send(Err(err)).await;
                return;
            }
            Step::Stall => {
                tx.closed().await;
                return;
            }
        }
    }
}

/// Waits until hyper has taken every queued frame and had a moment to flush it:
/// hyper drops its write buffer when the body errors, so aborting too early would
/// lose the tokens a `cut` is supposed to deliver.
async fn drain(tx: &mpsc::Sender<FrameResult>) {
    for _ in 0..1000 {
        if tx.capacity() == tx.max_capacity() || tx.is_closed() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_only_when_offered() {
        let offered = vec!["a".to_string(), "b".to_string()];
        assert_eq!(pick_tool(Some("b".into()), &offered), Some("b".into()));
        assert_eq!(pick_tool(Some("*".into()), &offered), Some("a".into()));
        assert_eq!(pick_tool(Some("b".into()), &[]), None);
        assert_eq!(pick_tool(None, &offered), None);
    }
}
