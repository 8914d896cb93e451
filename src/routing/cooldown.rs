//! How long a provider asked not to be called again, from its response headers.
//!
//! Read from every answer, not only refusals: OpenAI and Anthropic say on a 200 that a
//! quota is used up (`x-ratelimit-remaining-requests: 0`), and the request after it
//! would be refused. The longest wait any header asks for wins, capped at
//! [`MAX_COOLDOWN`] so a broken or hostile header cannot park a deployment for a day.

use http::HeaderMap;
use std::time::Duration;

/// The longest a deployment is ever parked for by one answer.
pub const MAX_COOLDOWN: Duration = Duration::from_secs(300);

/// The wait the headers of an answer with `status` ask for, if any, at `now_ms`
/// (Unix milliseconds, for the headers that give a date).
pub fn cooldown(status: u16, headers: &HeaderMap, now_ms: u64) -> Option<Duration> {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let mut wait: Option<Duration> = None;
    let mut longer = |d: Option<Duration>| {
        if let Some(d) = d {
            wait = Some(wait.map_or(d, |w| w.max(d)));
        }
    };
    if status == 429 || status == 503 {
        // `retry-after-ms` is the precise form of the same thing: it wins when present.
        match text("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
            Some(ms) if ms.is_finite() && ms >= 0.0 => {
                longer(Some(Duration::from_micros((ms * 1000.0) as u64)))
            }
            _ => longer(text("retry-after").and_then(|v| retry_after(v, now_ms))),
        }
    }
    for which in ["requests", "tokens"] {
        if text(&format!("x-ratelimit-remaining-{which}")) == Some("0") {
            longer(text(&format!("x-ratelimit-reset-{which}")).and_then(go_duration));
        }
    }
    for which in ["requests", "tokens", "input-tokens", "output-tokens"] {
        if text(&format!("anthropic-ratelimit-{which}-remaining")) == Some("0") {
            let until = text(&format!("anthropic-ratelimit-{which}-reset"))
                .and_then(crate::audit::time::parse_rfc3339);
            longer(until.map(|t| until_ms(t as i64, now_ms)));
        }
    }
    wait.filter(|w| !w.is_zero()).map(|w| w.min(MAX_COOLDOWN))
}

/// `retry-after`: delay-seconds or an HTTP date (RFC 9110 §10.2.3).
fn retry_after(v: &str, now_ms: u64) -> Option<Duration> {
    if let Ok(s) = v.parse::<u64>() {
        return Some(Duration::from_secs(s));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    let at_ms = at.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis() as i64;
    Some(until_ms(at_ms, now_ms))
}

fn until_ms(at_ms: i64, now_ms: u64) -> Duration {
    Duration::from_millis(at_ms.saturating_sub(now_ms as i64).max(0) as u64)
}

/// OpenAI's reset durations: Go's `time.Duration` text (`1s`, `6m0s`, `20ms`,
/// `1h2m3.5s`).
fn go_duration(v: &str) -> Option<Duration> {
    let mut total = 0f64;
    let mut rest = v;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let n_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let n: f64 = rest[..n_end].parse().ok()?;
        rest = &rest[n_end..];
        let u_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = match &rest[..u_end] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        rest = &rest[u_end..];
        total += n * unit;
    }
    (total.is_finite() && total >= 0.0).then(|| Duration::from_secs_f64(total.min(1e9)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap_or_else(|e| panic!("{e}")));
        }
        h
    }

    const NOW: u64 = 1_796_287_250_000; // 2026-12-03T08:40:50Z

    #[test]
    fn retry_after_in_seconds_dates_and_milliseconds() {
        let c = |p: &[(&'static str, &str)]| cooldown(429, &headers(p), NOW);
        assert_eq!(c(&[("retry-after", "3")]), Some(Duration::from_secs(3)));
        assert_eq!(
            c(&[("retry-after", "Thu, 03 Dec 2026 08:41:00 GMT")]),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            c(&[("retry-after", "3"), ("retry-after-ms", "1500")]),
            Some(Duration::from_millis(1500)),
            "the precise header wins"
        );
        assert_eq!(c(&[("retry-after", "Thu, 03 Dec 2026 08:00:00 GMT")]), None);
        assert_eq!(c(&[("retry-after", "soon")]), None);
        assert_eq!(c(&[]), None);
        // Not a refusal: retry-after alone does not park a deployment.
        assert_eq!(cooldown(200, &headers(&[("retry-after", "3")]), NOW), None);
        assert_eq!(cooldown(500, &headers(&[("retry-after", "3")]), NOW), None);
        assert_eq!(
            cooldown(503, &headers(&[("retry-after", "2")]), NOW),
            Some(Duration::from_secs(2))
        );
    }

    #[test]
    fn a_hostile_wait_is_capped() {
        let h = headers(&[("retry-after", "86400")]);
        assert_eq!(cooldown(429, &h, NOW), Some(MAX_COOLDOWN));
        let h = headers(&[("retry-after-ms", "1e300")]);
        assert_eq!(cooldown(429, &h, NOW), Some(MAX_COOLDOWN));
    }

    #[test]
    fn openai_quota_headers_on_any_answer() {
        let h = headers(&[
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "1m2.5s"),
            ("x-ratelimit-remaining-tokens", "100"),
            ("x-ratelimit-reset-tokens", "6m0s"),
        ]);
        assert_eq!(cooldown(200, &h, NOW), Some(Duration::from_millis(62_500)));
        let h = headers(&[
            ("x-ratelimit-remaining-tokens", "0"),
            ("x-ratelimit-reset-tokens", "20ms"),
        ]);
        assert_eq!(cooldown(200, &h, NOW), Some(Duration::from_millis(20)));
        let h = headers(&[
            ("x-ratelimit-remaining-requests", "5"),
            ("x-ratelimit-reset-requests", "1s"),
        ]);
        assert_eq!(cooldown(200, &h, NOW), None);
        for bad in ["", "1x", "s", "1.2.3s"] {
            let h = headers(&[
                ("x-ratelimit-remaining-requests", "0"),
                ("x-ratelimit-reset-requests", bad),
            ]);
            assert_eq!(cooldown(200, &h, NOW), None, "{bad}");
        }
    }

    #[test]
    fn anthropic_quota_headers() {
        let h = headers(&[
            ("anthropic-ratelimit-requests-remaining", "0"),
            ("anthropic-ratelimit-requests-reset", "2026-12-03T08:40:54Z"),
            ("anthropic-ratelimit-output-tokens-remaining", "0"),
            (
                "anthropic-ratelimit-output-tokens-reset",
                "2026-12-03T08:40:52.5Z",
            ),
        ]);
        assert_eq!(cooldown(200, &h, NOW), Some(Duration::from_secs(4)));
        let h = headers(&[
            ("anthropic-ratelimit-tokens-remaining", "12"),
            ("anthropic-ratelimit-tokens-reset", "2026-12-03T08:40:54Z"),
        ]);
        assert_eq!(cooldown(200, &h, NOW), None);
    }
}
