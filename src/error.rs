//! The one error type of the data plane.
//!
//! Every failure a client can see is a [`GatewayError`]. Kinds are grouped by who is at
//! fault (the client, the tenant's policy, the upstream, or us) because that decides
//! whether a provider's health suffers, whether a fallback is worth trying and what
//! on-call should look at. Status, `code`, and the body in each endpoint's format are
//! decided here and nowhere else.

use bytes::Bytes;
use serde_json::json;
use std::fmt;

/// The wire format of the endpoint the client called; errors answer in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiFormat {
    /// `POST /v1/chat/completions` and the other OpenAI-shaped endpoints.
    OpenAi,
    /// `POST /v1/messages`.
    Anthropic,
}

/// Who caused a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The request itself is wrong: never retried, never counted against a provider.
    Client,
    /// The request is fine but the tenant's policy (budget, rate) refuses it.
    Policy,
    /// A provider failed or misbehaved.
    Upstream,
    /// A bug or resource problem in the gateway.
    Internal,
}

/// What went wrong, with one variant per error `code` of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidRequest,
    ModelNotFound,
    InvalidApiKey,
    ModelNotAllowed,
    RegionNotAllowed,
    FallbackOverrideNotAllowed,
    RequestTooLarge,
    /// The client did not send its whole body within the body deadline.
    RequestTimeout,
    NotFound,
    MethodNotAllowed,
    BudgetExceeded,
    RateLimited,
    /// The spend guard throttles the tenant (429 `spend_guard`).
    SpendGuardThrottled,
    /// The spend guard blocks the tenant (402 `spend_guard`).
    SpendGuardBlocked,
    BadUpstreamResponse,
    UpstreamUnavailable,
    UpstreamTimeout,
    Internal,
}

impl ErrorKind {
    pub fn fault(self) -> Fault {
        use ErrorKind::*;
        match self {
            InvalidRequest
            | ModelNotFound
            | InvalidApiKey
            | ModelNotAllowed
            | RegionNotAllowed
            | FallbackOverrideNotAllowed
            | RequestTooLarge
            | RequestTimeout
            | NotFound
            | MethodNotAllowed => Fault::Client,
            BudgetExceeded | RateLimited | SpendGuardThrottled | SpendGuardBlocked => Fault::Policy,
            BadUpstreamResponse | UpstreamUnavailable | UpstreamTimeout => Fault::Upstream,
            Internal => Fault::Internal,
        }
    }

    pub fn status(self) -> u16 {
        use ErrorKind::*;
        match self {
            InvalidRequest | ModelNotFound => 400,
            InvalidApiKey => 401,
            BudgetExceeded | SpendGuardBlocked => 402,
            ModelNotAllowed | RegionNotAllowed | FallbackOverrideNotAllowed => 403,
            NotFound => 404,
            MethodNotAllowed => 405,
            RequestTimeout => 408,
            RequestTooLarge => 413,
            RateLimited | SpendGuardThrottled => 429,
            Internal => 500,
            BadUpstreamResponse => 502,
            UpstreamUnavailable => 503,
            UpstreamTimeout => 504,
        }
    }

    /// The `code` field of the OpenAI-format body, also the audit row's `error_code`.
    pub fn code(self) -> &'static str {
        use ErrorKind::*;
        match self {
            InvalidRequest => "invalid_request",
            ModelNotFound => "model_not_found",
            InvalidApiKey => "invalid_api_key",
            ModelNotAllowed => "model_not_allowed",
            RegionNotAllowed => "region_not_allowed",
            FallbackOverrideNotAllowed => "fallback_override_not_allowed",
            RequestTooLarge => "request_too_large",
            RequestTimeout => "request_timeout",
            NotFound => "not_found",
            MethodNotAllowed => "method_not_allowed",
            BudgetExceeded => "budget_exceeded",
            RateLimited => "rate_limited",
            SpendGuardThrottled | SpendGuardBlocked => "spend_guard",
            BadUpstreamResponse => "bad_upstream_response",
            UpstreamUnavailable => "upstream_unavailable",
            UpstreamTimeout => "upstream_timeout",
            Internal => "internal_error",
        }
    }

    /// The `type` field, chosen so that the official SDKs map each error to the
    /// exception class their users already catch.
    fn type_for(self, format: ApiFormat) -> &'static str {
        use ErrorKind::*;
        match (format, self) {
            (ApiFormat::OpenAi, InvalidApiKey) => "authentication_error",
            (
                ApiFormat::OpenAi,
                ModelNotAllowed | RegionNotAllowed | FallbackOverrideNotAllowed,
            ) => "permission_error",
            (ApiFormat::OpenAi, BudgetExceeded | SpendGuardBlocked) => "insufficient_quota",
            (ApiFormat::OpenAi, RateLimited | SpendGuardThrottled) => "rate_limit_error",
            (ApiFormat::OpenAi, BadUpstreamResponse | UpstreamUnavailable | UpstreamTimeout) => {
                "upstream_error"
            }
            (ApiFormat::OpenAi, Internal) => "server_error",
            (ApiFormat::OpenAi, _) => "invalid_request_error",
            (ApiFormat::Anthropic, InvalidApiKey) => "authentication_error",
            (
                ApiFormat::Anthropic,
                ModelNotAllowed | RegionNotAllowed | FallbackOverrideNotAllowed,
            ) => "permission_error",
            (ApiFormat::Anthropic, NotFound) => "not_found_error",
            (ApiFormat::Anthropic, RequestTooLarge) => "request_too_large",
            (ApiFormat::Anthropic, BudgetExceeded | SpendGuardBlocked) => "billing_error",
            (ApiFormat::Anthropic, RateLimited | SpendGuardThrottled) => "rate_limit_error",
            (ApiFormat::Anthropic, UpstreamUnavailable) => "overloaded_error",
            (ApiFormat::Anthropic, UpstreamTimeout) => "timeout_error",
            (ApiFormat::Anthropic, BadUpstreamResponse | Internal) => "api_error",
            (ApiFormat::Anthropic, _) => "invalid_request_error",
        }
    }
}

/// A failure to report to the client, with the detail the client may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayError {
    pub kind: ErrorKind,
    pub message: String,
    /// Seconds for the `retry-after` header (429 and 503).
    pub retry_after: Option<u64>,
}

impl GatewayError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        GatewayError {
            kind,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    pub fn status(&self) -> u16 {
        self.kind.status()
    }

    /// The error body in the endpoint's own format.
    pub fn body(&self, format: ApiFormat) -> Bytes {
        let v = match format {
            ApiFormat::OpenAi => json!({"error": {
                "message": self.message,
                "type": self.kind.type_for(format),
                "code": self.kind.code(),
                "param": null,
            }}),
            ApiFormat::Anthropic => json!({"type": "error", "error": {
                "type": self.kind.type_for(format),
                "message": self.message,
            }}),
        };
        Bytes::from(v.to_string())
    }

    /// The error as one server-sent event, for failures after the stream has started.
    pub fn sse_event(&self, format: ApiFormat) -> Bytes {
        let body = self.body(format);
        let mut out = Vec::with_capacity(body.len() + 24);
        if format == ApiFormat::Anthropic {
            out.extend_from_slice(b"event: error\n");
        }
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(&body);
        out.extend_from_slice(b"\n\n");
        Bytes::from(out)
    }
}

impl fmt::Display for GatewayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}): {}",
            self.kind.code(),
            self.status(),
            self.message
        )
    }
}

impl std::error::Error for GatewayError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_body_has_contract_shape() {
        let e = GatewayError::new(ErrorKind::ModelNotFound, "no such model: x");
        let v: serde_json::Value = serde_json::from_slice(&e.body(ApiFormat::OpenAi)).unwrap();
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["message"], "no such model: x");
        assert!(v["error"]["param"].is_null());
        assert!(v["error"]["type"].is_string());
        assert_eq!(e.status(), 400);
    }

    #[test]
    fn anthropic_body_has_contract_shape() {
        let e = GatewayError::new(ErrorKind::RateLimited, "slow down");
        let v: serde_json::Value = serde_json::from_slice(&e.body(ApiFormat::Anthropic)).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "rate_limit_error");
        assert_eq!(v["error"]["message"], "slow down");
    }

    #[test]
    fn every_kind_maps_to_a_contract_status() {
        use ErrorKind::*;
        let table = [
            (InvalidRequest, 400),
            (ModelNotFound, 400),
            (InvalidApiKey, 401),
            (BudgetExceeded, 402),
            (ModelNotAllowed, 403),
            (RegionNotAllowed, 403),
            (RequestTimeout, 408),
            (RequestTooLarge, 413),
            (RateLimited, 429),
            (BadUpstreamResponse, 502),
            (UpstreamUnavailable, 503),
            (UpstreamTimeout, 504),
        ];
        for (k, s) in table {
            assert_eq!(k.status(), s, "{k:?}");
        }
    }

    #[test]
    fn sse_error_events() {
        let e = GatewayError::new(ErrorKind::BadUpstreamResponse, "cut");
        let a = e.sse_event(ApiFormat::Anthropic);
        assert!(a.starts_with(b"event: error\ndata: {"));
        assert!(a.ends_with(b"\n\n"));
        let o = e.sse_event(ApiFormat::OpenAi);
        assert!(o.starts_with(b"data: {\"error\""));
    }
}
