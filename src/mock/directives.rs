//! Per-request latency and fault selection.
//!
//! Tests need to steer one request without restarting the mock, and a request
//! passes through the gateway (which may rewrite bodies and drop unknown headers),
//! so a directive can come from two places:
//! - the request header `x-mock: k=v;k=v` (convenient for curl and k6), and
//! - `[[mock: k=v; k=v]]` anywhere in the prompt text (survives any gateway
//!   rewrite and Anthropic<->OpenAI translation because it is plain prompt text).
//!
//! Prompt directives are applied first and the header overrides them key by key.

use std::collections::HashMap;
use std::sync::Mutex;

/// Opening marker of an in-prompt directive.
const OPEN: &str = "[[mock:";
/// Closing marker of an in-prompt directive.
const CLOSE: &str = "]]";
/// Largest reply length a directive may ask for: keeps a typo from allocating gigabytes.
pub const MAX_TOKENS: u32 = 100_000;
/// Bound on distinct `fail_first` keys remembered, so a long load test cannot grow the map forever.
const MAX_FAIL_KEYS: usize = 10_000;

/// A fault to inject instead of (or in the middle of) a normal reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Close the connection without any response.
    Reset,
    /// Accept and never answer (streams: headers, then nothing).
    Stall,
    /// Stream `cut_after` tokens then abort the connection; non-stream: half a body.
    Cut,
    /// 200 with a body that is not JSON (streams: `data: not-json`).
    Garbage,
    /// Stream `cut_after` tokens then an in-band error event.
    MidstreamError,
}

impl Fault {
    fn parse(v: &str) -> Option<Fault> {
        match v {
            "reset" => Some(Fault::Reset),
            "stall" => Some(Fault::Stall),
            "cut" => Some(Fault::Cut),
            "garbage" => Some(Fault::Garbage),
            "midstream_error" | "midstream-error" => Some(Fault::MidstreamError),
            _ => None,
        }
    }
}

/// Everything a request may override; `None` means "use the server default".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Directives {
    pub ttft_ms: Option<u64>,
    pub gap_ms: Option<u64>,
    pub tokens: Option<u32>,
    pub status: Option<u16>,
    pub fault: Option<Fault>,
    pub cut_after: Option<u32>,
    pub usage_none: bool,
    pub tool: Option<String>,
    pub fail_first: Option<u32>,
    pub key: Option<String>,
    /// The `retry-after` an error answer carries (seconds or an HTTP date, as given);
    /// without it 429/503/529 say `1`.
    pub retry_after: Option<String>,
}

impl Directives {
    /// Parses `k=v;k=v`. Unknown keys and unparsable values are ignored on purpose:
    /// a typo in a test directive should degrade to a normal reply, not a 500.
    pub fn parse_list(s: &str) -> Directives {
        let mut d = Directives::default();
        for pair in s.split(';') {
            let Some((k, v)) = pair.split_once('=') else {
                continue;
            };
            d.set(&k.trim().to_ascii_lowercase(), v.trim());
        }
        d
    }

    fn set(&mut self, k: &str, v: &str) {
        match k {
            "ttft_ms" => self.ttft_ms = v.parse().ok().or(self.ttft_ms),
            "gap_ms" => self.gap_ms = v.parse().ok().or(self.gap_ms),
            "tokens" => {
                self.tokens = v
                    .parse::<u32>()
                    .ok()
                    .map(|n| n.min(MAX_TOKENS))
                    .or(self.tokens)
            }
            "status" => {
                self.status = v
                    .parse::<u16>()
                    .ok()
                    .filter(|s| (100..=599).contains(s))
                    .or(self.status)
            }
            "fault" => self.fault = Fault::parse(&v.to_ascii_lowercase()).or(self.fault),
            "cut_after" => self.cut_after = v.parse().ok().or(self.cut_after),
            "usage" => self.usage_none = v.eq_ignore_ascii_case("none"),
            "tool" if !v.is_empty() => self.tool = Some(v.to_string()),
            "fail_first" => self.fail_first = v.parse().ok().or(self.fail_first),
            "key" => self.key = Some(v.to_string()),
            "retry_after" if !v.is_empty() => self.retry_after = Some(v.to_string()),
            _ => {}
        }
    }

    /// Applies every `[[mock: ...]]` found in `text`, later ones winning.
    pub fn scan_text(&mut self, text: &str) {
        let mut rest = text;
        while let Some(start) = rest.find(OPEN) {
            let after = &rest[start + OPEN.len()..];
            let Some(end) = after.find(CLOSE) else {
                return;
            };
            self.merge(Directives::parse_list(&after[..end]));
            rest = &after[end + CLOSE.len()..];
        }
    }

    /// Overrides `self` with every key `other` sets.
    pub fn merge(&mut self, other: Directives) {
        self.ttft_ms = other.ttft_ms.or(self.ttft_ms);
        self.gap_ms = other.gap_ms.or(self.gap_ms);
        self.tokens = other.tokens.or(self.tokens);
        self.status = other.status.or(self.status);
        self.fault = other.fault.or(self.fault);
        self.cut_after = other.cut_after.or(self.cut_after);
        self.usage_none |= other.usage_none;
        self.tool = other.tool.or(self.tool.take());
        self.fail_first = other.fail_first.or(self.fail_first);
        self.key = other.key.or(self.key.take());
        self.retry_after = other.retry_after.or(self.retry_after.take());
    }

    /// The error status this request must get, if any: `status=` alone always
    /// fails; with `fail_first=N` only the first N requests of `key` fail (with
    /// `status` if given, else 503) so retry and fallback paths can be tested.
    pub fn error_status(&self, counters: &FailCounters) -> Option<u16> {
        let status = self.status.filter(|s| *s >= 400);
        match self.fail_first {
            Some(n) => {
                let key = self.key.as_deref().unwrap_or("");
                counters.hit(key, n).then_some(status.unwrap_or(503))
            }
            None => status,
        }
    }
}

/// Per-key request counters behind `fail_first`.
#[derive(Debug, Default)]
pub struct FailCounters {
    map: Mutex<HashMap<String, u32>>,
}

impl FailCounters {
    /// Counts one request for `key`; true while the count is at most `n`.
    pub fn hit(&self, key: &str, n: u32) -> bool {
        let mut map = match self.map.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        if map.len() >= MAX_FAIL_KEYS && !map.contains_key(key) {
            map.clear();
        }
        let count = map.entry(key.to_string()).or_insert(0);
        *count = count.saturating_add(1);
        *count <= n
    }

    /// Forgets every key (`POST /_mock/reset`).
    pub fn clear(&self) {
        match self.map.lock() {
            Ok(mut m) => m.clear(),
            Err(poisoned) => poisoned.into_inner().clear(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_header_list() {
        let d = Directives::parse_list(
            " ttft_ms=250; gap_ms = 5;tokens=3;status=429;fault=cut;cut_after=2;usage=none;tool=get_weather;fail_first=2;key=abc;bogus=1;noequals",
        );
        assert_eq!(d.ttft_ms, Some(250));
        assert_eq!(d.gap_ms, Some(5));
        assert_eq!(d.tokens, Some(3));
        assert_eq!(d.status, Some(429));
        assert_eq!(d.fault, Some(Fault::Cut));
        assert_eq!(d.cut_after, Some(2));
        assert!(d.usage_none);
        assert_eq!(d.tool.as_deref(), Some("get_weather"));
        assert_eq!(d.fail_first, Some(2));
        assert_eq!(d.key.as_deref(), Some("abc"));
    }

    #[test]
    fn ignores_bad_values_and_caps_tokens() {
        let d = Directives::parse_list("ttft_ms=abc;status=9999;fault=explode;tokens=999999999");
        assert_eq!(d.ttft_ms, None);
        assert_eq!(d.status, None);
        assert_eq!(d.fault, None);
        assert_eq!(d.tokens, Some(MAX_TOKENS));
    }

    #[test]
    fn scans_prompt_directives_later_wins() {
        let mut d = Directives::default();
        d.scan_text(
            "hello [[mock: tokens=4; fault=garbage]] and [[mock:tokens=7]] [[mock: unterminated",
        );
        assert_eq!(d.tokens, Some(7));
        assert_eq!(d.fault, Some(Fault::Garbage));
        let mut none = Directives::default();
        none.scan_text("no directive [[other: x=1]]");
        assert_eq!(none, Directives::default());
    }

    #[test]
    fn header_overrides_prompt() {
        let mut d = Directives::default();
        d.scan_text("[[mock: ttft_ms=100; tokens=5]]");
        d.merge(Directives::parse_list("ttft_ms=7"));
        assert_eq!(d.ttft_ms, Some(7));
        assert_eq!(d.tokens, Some(5));
    }

    #[test]
    fn fail_first_counts_per_key() {
        let counters = FailCounters::default();
        let d = Directives::parse_list("fail_first=2;key=k1");
        assert_eq!(d.error_status(&counters), Some(503));
        assert_eq!(d.error_status(&counters), Some(503));
        assert_eq!(d.error_status(&counters), None);
        let other = Directives::parse_list("fail_first=1;key=k2;status=429");
        assert_eq!(other.error_status(&counters), Some(429));
        assert_eq!(other.error_status(&counters), None);
        counters.clear();
        assert_eq!(d.error_status(&counters), Some(503));
        assert_eq!(
            Directives::parse_list("status=200").error_status(&counters),
            None
        );
        assert_eq!(
            Directives::parse_list("status=500").error_status(&counters),
            Some(500)
        );
    }
}
