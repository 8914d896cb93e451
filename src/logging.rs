//! Process logs: JSON lines for log shippers, or plain text for a terminal.
//!
//! `LLM_GATEWAY_LOG_FORMAT=json|text` picks the format; without it, JSON when stderr
//! goes to the systemd journal (`JOURNAL_STREAM` is set), text otherwise. `RUST_LOG`
//! filters as usual (default `info`).
//!
//! Secrets and prompts: the gateway itself never logs keys or bodies. Pingora's own
//! debug logs print upstream request headers (the provider key) and body chunks, so
//! records below `info` from other crates are dropped unless
//! `LLM_GATEWAY_LOG_DEPENDENCY_DEBUG=1` explicitly asks for them.

use log::{Level, Log, Metadata, Record};
use serde::Serialize;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

static JSON: AtomicBool = AtomicBool::new(false);

/// Target of the one-line-per-request record, whose message is already rendered fields.
const REQUEST_TARGET: &str = "llm_gateway::request";

/// Installs the process logger; call once, first thing in `main`.
pub fn init() {
    let json = match std::env::var("LLM_GATEWAY_LOG_FORMAT").as_deref() {
        Ok("json") => true,
        Ok("text") => false,
        _ => std::env::var_os("JOURNAL_STREAM").is_some(),
    };
    JSON.store(json, Ordering::Relaxed);
    let mut b = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if json {
        b.format(|buf, record| {
            let line = JsonLine {
                ts: &buf.timestamp_millis().to_string(),
                level: record.level().as_str(),
                target: record.target(),
            };
            let Ok(head) = serde_json::to_string(&line) else {
                return Ok(());
            };
            // `head` is `{...}`: reopen it to append the message (and request fields).
            let head = &head[..head.len() - 1];
            if record.target() == REQUEST_TARGET {
                writeln!(buf, "{head},\"msg\":\"request\",{}}}", record.args())
            } else {
                let msg = serde_json::to_string(&record.args().to_string())
                    .unwrap_or_else(|_| "\"\"".into());
                writeln!(buf, "{head},\"msg\":{msg}}}")
            }
        });
    }
    let inner = b.build();
    let max = inner.filter();
    let dependency_debug = std::env::var("LLM_GATEWAY_LOG_DEPENDENCY_DEBUG").as_deref() == Ok("1");
    if log::set_boxed_logger(Box::new(Guarded {
        inner,
        dependency_debug,
    }))
    .is_ok()
    {
        log::set_max_level(max);
    }
}

#[derive(Serialize)]
struct JsonLine<'a> {
    ts: &'a str,
    level: &'a str,
    target: &'a str,
}

/// env_logger behind the secrets guard described in the module docs.
struct Guarded {
    inner: env_logger::Logger,
    dependency_debug: bool,
}

impl Guarded {
    fn allowed(&self, m: &Metadata<'_>) -> bool {
        self.dependency_debug || m.level() <= Level::Info || m.target().starts_with("llm_gateway")
    }
}

impl Log for Guarded {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        self.allowed(m) && self.inner.enabled(m)
    }

    fn log(&self, record: &Record<'_>) {
        if self.allowed(record.metadata()) {
            self.inner.log(record);
        }
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

/// The fields of the per-request log line (never the key, never the prompt).
#[derive(Serialize)]
pub struct RequestLine<'a> {
    pub request_id: &'a str,
    pub tenant: &'a str,
    pub endpoint: &'a str,
    pub model: &'a str,
    pub provider: &'a str,
    pub status: u16,
    pub code: &'a str,
    pub attempts: u8,
    pub tokens_in: u32,
    pub tokens_out: u32,
    pub latency_ms: u32,
}

/// Logs one finished request; rendering is skipped entirely when the level is off.
pub fn request(level: Level, line: &RequestLine<'_>) {
    if !log::log_enabled!(target: REQUEST_TARGET, level) {
        return;
    }
    if JSON.load(Ordering::Relaxed) {
        // The object's fields without its braces: the formatter wraps them.
        let Ok(obj) = serde_json::to_string(line) else {
            return;
        };
        let fields = &obj[1..obj.len() - 1];
        log::log!(target: REQUEST_TARGET, level, "{fields}");
    } else {
        log::log!(
            target: REQUEST_TARGET,
            level,
            "request {} tenant={} endpoint={} model={} provider={} status={} code={} attempts={} tokens={}/{} latency_ms={}",
            line.request_id,
            line.tenant,
            line.endpoint,
            line.model,
            line.provider,
            line.status,
            line.code,
            line.attempts,
            line.tokens_in,
            line.tokens_out,
            line.latency_ms
        );
    }
}
