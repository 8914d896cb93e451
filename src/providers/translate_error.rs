//! Provider errors in the client's format.
//!
//! A provider's 4xx body, or an error event in the middle of its stream, is in the
//! provider's format; the client's SDK only understands its own endpoint's. Each error
//! is mapped to the gateway's [`ErrorKind`] and re-rendered by [`GatewayError`], so the
//! shapes, `type`s and `code`s are exactly those of the gateway's own errors.

use crate::config::ProviderKind;
use crate::error::{ApiFormat, ErrorKind, GatewayError};
use bytes::Bytes;
use serde_json::Value;

/// The wire format a provider kind speaks.
pub fn provider_format(kind: ProviderKind) -> ApiFormat {
    match kind {
        ProviderKind::Anthropic => ApiFormat::Anthropic,
        ProviderKind::OpenAi | ProviderKind::OpenAiCompatible | ProviderKind::AzureOpenAi => {
            ApiFormat::OpenAi
        }
    }
}

/// Converts a provider's non-200 error body into the client's error format.
///
/// A body already in the client's format is passed through unchanged, so the client
/// sees exactly what the provider said. Anything else (the other format, or a body
/// that is not a JSON error at all, such as an HTML page from a load balancer) is
/// re-rendered in the client's format, keeping the provider's message when there is
/// one. `status` is used only when the body says nothing usable about the kind.
pub fn translate_error_body(
    provider: ProviderKind,
    client: ApiFormat,
    status: u16,
    body: &[u8],
) -> Bytes {
    let from = provider_format(provider);
    let parsed = serde_json::from_slice::<Value>(body).ok();
    let err = match (from, parsed.as_ref()) {
        (ApiFormat::Anthropic, Some(v)) if is_anthropic_error(v) => {
            if client == ApiFormat::Anthropic {
                return Bytes::copy_from_slice(body);
            }
            from_anthropic(v, status)
        }
        (ApiFormat::OpenAi, Some(v)) if is_openai_error(v) => {
            if client == ApiFormat::OpenAi {
                return Bytes::copy_from_slice(body);
            }
            from_openai(v, status)
        }
        _ => GatewayError::new(
            kind_for_status(status),
            format!("the {} provider answered HTTP {status}", provider.as_str()),
        ),
    };
    err.body(client)
}

fn is_anthropic_error(v: &Value) -> bool {
    v.get("type").and_then(Value::as_str) == Some("error")
        && v.pointer("/error/message").is_some_and(Value::is_string)
}

fn is_openai_error(v: &Value) -> bool {
    v.pointer("/error/message").is_some_and(Value::is_string)
}

/// `{"type":"error","error":{"type","message"}}` as a gateway error.
pub fn from_anthropic(v: &Value, status: u16) -> GatewayError {
    let ty = v
        .pointer("/error/type")
        .and_then(Value::as_str)
        .unwrap_or("");
    let kind = match ty {
        "invalid_request_error" => ErrorKind::InvalidRequest,
        "authentication_error" => ErrorKind::InvalidApiKey,
        "permission_error" => ErrorKind::ModelNotAllowed,
        "not_found_error" => ErrorKind::NotFound,
        "request_too_large" => ErrorKind::RequestTooLarge,
        "rate_limit_error" => ErrorKind::RateLimited,
        // The provider's own account or capacity: for the client the service is down.
        "overloaded_error" | "billing_error" => ErrorKind::UpstreamUnavailable,
        "timeout_error" => ErrorKind::UpstreamTimeout,
        "api_error" => ErrorKind::BadUpstreamResponse,
        _ => kind_for_status(status),
    };
    GatewayError::new(kind, message_of(v, ty))
}

/// `{"error":{"message","type","code","param"}}` as a gateway error.
pub fn from_openai(v: &Value, status: u16) -> GatewayError {
    let code = v
        .pointer("/error/code")
        .and_then(Value::as_str)
        .unwrap_or("");
    let ty = v
        .pointer("/error/type")
        .and_then(Value::as_str)
        .unwrap_or("");
    let kind = match (code, ty) {
        ("invalid_api_key", _) | (_, "authentication_error") => ErrorKind::InvalidApiKey,
        ("model_not_found", _) => ErrorKind::ModelNotFound,
        ("rate_limit_exceeded", _) | (_, "rate_limit_error" | "requests" | "tokens") => {
            ErrorKind::RateLimited
        }
        ("insufficient_quota", _) | (_, "insufficient_quota") => ErrorKind::UpstreamUnavailable,
        ("context_length_exceeded", _) => ErrorKind::InvalidRequest,
        (_, "server_error") => ErrorKind::BadUpstreamResponse,
        (_, "invalid_request_error") if status == 0 || status == 400 => ErrorKind::InvalidRequest,
        _ if status == 0 => ErrorKind::BadUpstreamResponse,
        _ => kind_for_status(status),
    };
    GatewayError::new(kind, message_of(v, ty))
}

fn message_of(v: &Value, ty: &str) -> String {
    match v.pointer("/error/message").and_then(Value::as_str) {
        Some(m) if !m.is_empty() => m.to_string(),
        _ if !ty.is_empty() => format!("upstream error: {ty}"),
        _ => "upstream error".to_string(),
    }
}

/// The kind a bare status implies, when the body names none.
pub fn kind_for_status(status: u16) -> ErrorKind {
    match status {
        401 => ErrorKind::InvalidApiKey,
        403 => ErrorKind::ModelNotAllowed,
        404 => ErrorKind::NotFound,
        413 => ErrorKind::RequestTooLarge,
        429 => ErrorKind::RateLimited,
        504 => ErrorKind::UpstreamTimeout,
        500..=599 => ErrorKind::UpstreamUnavailable,
        400..=499 => ErrorKind::InvalidRequest,
        _ => ErrorKind::BadUpstreamResponse,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(b: &Bytes) -> Value {
        serde_json::from_slice(b).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn same_format_passes_through() {
        let a = br#"{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: Field required"}}"#;
        let out = translate_error_body(ProviderKind::Anthropic, ApiFormat::Anthropic, 400, a);
        assert_eq!(&out[..], &a[..]);
        let o = br#"{"error":{"message":"bad","type":"invalid_request_error","param":"messages","code":null}}"#;
        let out = translate_error_body(ProviderKind::OpenAiCompatible, ApiFormat::OpenAi, 400, o);
        assert_eq!(&out[..], &o[..]);
    }

    #[test]
    fn anthropic_to_openai() {
        let a = br#"{"type":"error","error":{"type":"invalid_request_error","message":"messages.0.content: Field required"}}"#;
        let v = parse(&translate_error_body(
            ProviderKind::Anthropic,
            ApiFormat::OpenAi,
            400,
            a,
        ));
        assert_eq!(
            v,
            json!({"error": {"message": "messages.0.content: Field required",
                "type": "invalid_request_error", "code": "invalid_request", "param": null}})
        );
        let a = br#"{"type":"error","error":{"type":"rate_limit_error","message":"slow"}}"#;
        let v = parse(&translate_error_body(
            ProviderKind::Anthropic,
            ApiFormat::OpenAi,
            429,
            a,
        ));
        assert_eq!(v["error"]["code"], "rate_limited");
        assert_eq!(v["error"]["type"], "rate_limit_error");
    }

    #[test]
    fn openai_to_anthropic() {
        let o = br#"{"error":{"message":"This model's maximum context length is 128000 tokens.","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#;
        let v = parse(&translate_error_body(
            ProviderKind::OpenAi,
            ApiFormat::Anthropic,
            400,
            o,
        ));
        assert_eq!(
            v,
            json!({"type": "error", "error": {"type": "invalid_request_error",
                "message": "This model's maximum context length is 128000 tokens."}})
        );
        let o = br#"{"error":{"message":"Incorrect API key provided","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#;
        let v = parse(&translate_error_body(
            ProviderKind::OpenAi,
            ApiFormat::Anthropic,
            401,
            o,
        ));
        assert_eq!(v["error"]["type"], "authentication_error");
        let o = br#"{"error":{"message":"The model `x` does not exist","type":"invalid_request_error","param":null,"code":"model_not_found"}}"#;
        let v = parse(&translate_error_body(
            ProviderKind::OpenAi,
            ApiFormat::Anthropic,
            404,
            o,
        ));
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }

    #[test]
    fn garbage_bodies_are_rendered_in_the_client_format() {
        let html = b"<html>502 Bad Gateway</html>";
        let v = parse(&translate_error_body(
            ProviderKind::Anthropic,
            ApiFormat::Anthropic,
            413,
            html,
        ));
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "request_too_large");
        let v = parse(&translate_error_body(
            ProviderKind::OpenAi,
            ApiFormat::OpenAi,
            422,
            b"",
        ));
        assert_eq!(v["error"]["code"], "invalid_request");
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("422")));
    }

    #[test]
    fn azure_bodies_without_a_type_map_by_status() {
        let a = br#"{"error":{"code":"429","message":"Requests to the ChatCompletions_Create Operation have exceeded the rate limit."}}"#;
        let out = translate_error_body(ProviderKind::AzureOpenAi, ApiFormat::OpenAi, 429, a);
        assert_eq!(&out[..], &a[..]);
        let v = parse(&translate_error_body(
            ProviderKind::AzureOpenAi,
            ApiFormat::Anthropic,
            429,
            a,
        ));
        assert_eq!(v["error"]["type"], "rate_limit_error");
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("exceeded the rate limit")));
        let f = br#"{"error":{"code":"content_filter","message":"filtered","param":"prompt","status":400,"innererror":{"code":"ResponsibleAIPolicyViolation"}}}"#;
        let v = parse(&translate_error_body(
            ProviderKind::AzureOpenAi,
            ApiFormat::Anthropic,
            400,
            f,
        ));
        assert_eq!(
            v,
            json!({"type": "error", "error": {"type": "invalid_request_error", "message": "filtered"}})
        );
    }

    #[test]
    fn midstream_errors() {
        let e = from_anthropic(
            &json!({"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}),
            0,
        );
        assert_eq!(e.kind, ErrorKind::UpstreamUnavailable);
        assert_eq!(e.message, "Overloaded");
        let e = from_openai(
            &json!({"error":{"message":"oops","type":"server_error","param":null,"code":null}}),
            0,
        );
        assert_eq!(e.kind, ErrorKind::BadUpstreamResponse);
        let e = from_openai(&json!({"error":{"message":"oops"}}), 0);
        assert_eq!(e.kind, ErrorKind::BadUpstreamResponse);
    }
}
