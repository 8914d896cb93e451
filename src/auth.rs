//! Who is calling: the presented API key and the request id.
//!
//! Key comparison itself is constant-time and lives with the key hashes in `config`;
//! this module only extracts what the client sent. Keys are never logged.

use pingora_http::RequestHeader;
use rand::Rng;

/// The API key from `Authorization: Bearer <key>` or, failing that, `x-api-key`.
pub fn presented_key(req: &RequestHeader) -> Option<&str> {
    if let Some(v) = req
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
    {
        let v = v.trim();
        if v.len() > 7 && v[..7].eq_ignore_ascii_case("bearer ") {
            let key = v[7..].trim();
            if !key.is_empty() {
                return Some(key);
            }
        }
    }
    req.headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|k| !k.is_empty())
}

/// The client's `x-request-id` when it is printable and at most 128 bytes, else a new one.
pub fn request_id(req: &RequestHeader) -> String {
    if let Some(v) = req.headers.get("x-request-id") {
        let b = v.as_bytes();
        if !b.is_empty() && b.len() <= 128 && b.iter().all(|c| (0x21..=0x7e).contains(c)) {
            if let Ok(s) = v.to_str() {
                return s.to_string();
            }
        }
    }
    let n: u128 = rand::rng().random();
    format!("req_{n:032x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("POST", b"/v1/chat/completions", None).unwrap();
        for (k, v) in headers {
            r.insert_header(k.to_string(), *v).unwrap();
        }
        r
    }

    #[test]
    fn bearer_and_x_api_key() {
        assert_eq!(
            presented_key(&req(&[("authorization", "Bearer sk-1")])),
            Some("sk-1")
        );
        assert_eq!(
            presented_key(&req(&[("authorization", "bearer  sk-2 ")])),
            Some("sk-2")
        );
        assert_eq!(presented_key(&req(&[("x-api-key", "sk-3")])), Some("sk-3"));
        assert_eq!(presented_key(&req(&[("authorization", "Basic abc")])), None);
        assert_eq!(presented_key(&req(&[])), None);
    }

    #[test]
    fn request_id_kept_or_generated() {
        assert_eq!(request_id(&req(&[("x-request-id", "abc-123")])), "abc-123");
        let long = "x".repeat(129);
        let generated = request_id(&req(&[("x-request-id", long.as_str())]));
        assert!(generated.starts_with("req_") && generated.len() == 36);
        assert!(request_id(&req(&[("x-request-id", "a b")])).starts_with("req_"));
        assert_ne!(request_id(&req(&[])), request_id(&req(&[])));
    }
}
