//! The tenant's own end user, recorded in the audit column `end_user`.
//!
//! Three places may name it, in this order: the gateway header `x-gateway-end-user`
//! (so a tenant can attribute calls without touching request bodies, and override
//! what an SDK puts there), the OpenAI body field `user` (chat completions), and the
//! Anthropic body field `metadata.user_id` (messages). Only the field of the
//! request's own format is read: an Anthropic body's `user` is not an OpenAI field.
//!
//! A value counts only when it is 1 to [`MAX_BYTES`] bytes of printable ASCII
//! (0x20-0x7e). Anything else (too long, control bytes, non-ASCII, not a string) is
//! ignored, and the next place is tried; the request itself is served as usual. Why
//! ignored rather than a 400: the end user is bookkeeping for the tenant, and a
//! request the provider would accept must not fail on it; and why not truncated: a
//! cut id could merge two end users into one, which is worse for attribution than
//! recording none.

use crate::error::ApiFormat;
use serde_json::{Map, Value};

/// The header that names the end user; it wins over the body.
pub const HEADER: &str = "x-gateway-end-user";
/// Longest end-user id recorded, in bytes.
pub const MAX_BYTES: usize = 128;

/// `v` when it is a valid end-user id (see the module doc), else `None`.
pub fn valid(v: &[u8]) -> Option<&str> {
    let ok = !v.is_empty() && v.len() <= MAX_BYTES && v.iter().all(|b| (0x20..=0x7e).contains(b));
    // Printable ASCII is always UTF-8.
    ok.then(|| std::str::from_utf8(v).ok()).flatten()
}

/// The end user the header names, when it carries a valid one (its first value).
pub fn from_headers(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get(HEADER)
        .and_then(|v| valid(v.as_bytes()))
        .map(str::to_string)
}

/// The end user the body of a request in `format` names, when valid.
pub fn from_body(format: ApiFormat, body: &Map<String, Value>) -> Option<String> {
    let field = match format {
        ApiFormat::OpenAi => body.get("user"),
        ApiFormat::Anthropic => body.get("metadata").and_then(|m| m.get("user_id")),
    };
    field
        .and_then(Value::as_str)
        .and_then(|s| valid(s.as_bytes()))
        .map(str::to_string)
}

/// The end user to record once the body is parsed: `header` (what [`from_headers`]
/// gave, empty when nothing valid) when set, else the body's, else empty. The header
/// is read before the body so that a request refused before its body is read
/// (a rate limit's pre-check) still records who it was for.
pub fn resolve(header: &str, body: Option<&str>) -> String {
    if header.is_empty() {
        body.unwrap_or_default().to_string()
    } else {
        header.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::ClientRequest;
    use serde_json::json;

    fn body(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!("tests pass objects"),
        }
    }

    fn headers(value: &[u8]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(HEADER, http::HeaderValue::from_bytes(value).unwrap());
        h
    }

    #[test]
    fn the_validity_rule_is_printable_ascii_up_to_128_bytes() {
        assert_eq!(valid(b"user-42"), Some("user-42"));
        assert_eq!(
            valid(b" ~ spaces and tildes ~ "),
            Some(" ~ spaces and tildes ~ ")
        );
        let longest = "a".repeat(MAX_BYTES);
        assert_eq!(valid(longest.as_bytes()), Some(longest.as_str()));
        // One byte over is ignored, not cut to 128.
        assert_eq!(valid("a".repeat(MAX_BYTES + 1).as_bytes()), None);
        assert_eq!(valid(b""), None);
        assert_eq!(valid(b"tab\there"), None);
        assert_eq!(valid(b"nl\n"), None);
        assert_eq!(valid(b"del\x7f"), None);
        assert_eq!(valid("caf\u{e9}".as_bytes()), None);
    }

    #[test]
    fn the_header_wins_over_either_body_field() {
        let openai = body(json!({"user": "from-body"}));
        let h = from_headers(&headers(b"from-header")).unwrap_or_default();
        let b = from_body(ApiFormat::OpenAi, &openai);
        assert_eq!(resolve(&h, b.as_deref()), "from-header");
        let anthropic = body(json!({"metadata": {"user_id": "from-body"}}));
        let h = from_headers(&headers(b"from-header")).unwrap_or_default();
        let b = from_body(ApiFormat::Anthropic, &anthropic);
        assert_eq!(resolve(&h, b.as_deref()), "from-header");
    }

    #[test]
    fn an_invalid_header_is_ignored_and_the_body_counts() {
        let openai = body(json!({"user": "from-body"}));
        let too_long = "x".repeat(MAX_BYTES + 1);
        for bad in [too_long.as_bytes(), b"", b"caf\xc3\xa9", b"tab\tinside"] {
            let h = from_headers(&headers(bad));
            assert_eq!(h, None, "{bad:?}");
            let b = from_body(ApiFormat::OpenAi, &openai);
            assert_eq!(resolve(&h.unwrap_or_default(), b.as_deref()), "from-body");
        }
        assert_eq!(from_headers(&http::HeaderMap::new()), None);
    }

    #[test]
    fn each_format_reads_its_own_body_field() {
        let openai = body(json!({"user": "u1", "metadata": {"user_id": "u2"}}));
        assert_eq!(from_body(ApiFormat::OpenAi, &openai).as_deref(), Some("u1"));
        assert_eq!(
            from_body(ApiFormat::Anthropic, &openai).as_deref(),
            Some("u2")
        );
        let anthropic_only = body(json!({"metadata": {"user_id": "u2"}}));
        assert_eq!(from_body(ApiFormat::OpenAi, &anthropic_only), None);
        let openai_only = body(json!({"user": "u1"}));
        assert_eq!(from_body(ApiFormat::Anthropic, &openai_only), None);
        assert_eq!(resolve("", None), "");
    }

    #[test]
    fn invalid_body_values_are_ignored() {
        for v in [
            json!({"user": 42}),
            json!({"user": null}),
            json!({"user": ""}),
            json!({"user": "x".repeat(MAX_BYTES + 1)}),
            json!({"user": "line\nbreak"}),
            json!({"user": "\u{1F600}"}),
        ] {
            assert_eq!(from_body(ApiFormat::OpenAi, &body(v.clone())), None, "{v}");
        }
        for v in [
            json!({"metadata": "user"}),
            json!({"metadata": {"user_id": 7}}),
            json!({"metadata": {"user_id": "x".repeat(MAX_BYTES + 1)}}),
            json!({"metadata": {"user_id": "\u{0}"}}),
        ] {
            assert_eq!(
                from_body(ApiFormat::Anthropic, &body(v.clone())),
                None,
                "{v}"
            );
        }
    }

    #[test]
    fn client_request_parse_records_the_body_end_user_and_still_serves_bad_ones() {
        let msgs = json!([{"role": "user", "content": "hi"}]);
        let raw = |v: Value| serde_json::to_vec(&v).unwrap();
        let r = ClientRequest::parse(
            ApiFormat::OpenAi,
            &raw(json!({"model": "m", "messages": msgs, "user": "alice"})),
        )
        .unwrap();
        assert_eq!(r.end_user.as_deref(), Some("alice"));
        let r = ClientRequest::parse(
            ApiFormat::Anthropic,
            &raw(json!({"model": "m", "messages": msgs, "metadata": {"user_id": "bob"}})),
        )
        .unwrap();
        assert_eq!(r.end_user.as_deref(), Some("bob"));
        // An unusable value is not a 400: the request parses, with no end user.
        let r = ClientRequest::parse(
            ApiFormat::OpenAi,
            &raw(json!({"model": "m", "messages": msgs, "user": {"id": 1}})),
        )
        .unwrap();
        assert_eq!(r.end_user, None);
        assert_eq!(r.body["user"], json!({"id": 1}), "the body is left as sent");
    }
}
