//! Azure OpenAI's shape around the OpenAI wire format: the per-deployment path, the
//! required `api-version` query, the `api-key` credential header and Azure's error
//! bodies (`{"error": {"code", "message"}}`, no `type`). Bodies and streams are
//! OpenAI's, served by [`super::openai`].

use serde_json::{json, Value};

/// The deployment named by `…/openai/deployments/{name}/chat/completions`, if the
/// path is Azure's chat path (matched on the suffix, like every mock route).
pub fn chat_deployment(path: &str) -> Option<&str> {
    let rest = path.strip_suffix("/chat/completions")?;
    let (before, name) = rest.rsplit_once('/')?;
    (before.ends_with("/openai/deployments") && !name.is_empty()).then_some(name)
}

/// What Azure answers before looking at the body: 404 without `api-version`
/// (Azure's own answer to that), 401 without `api-key`. `None`: go on.
pub fn refusal(query: Option<&str>, headers: &http::HeaderMap) -> Option<(u16, &'static str)> {
    let has_version = query.is_some_and(|q| {
        q.split('&').any(|kv| {
            kv.strip_prefix("api-version=")
                .is_some_and(|v| !v.is_empty())
        })
    });
    if !has_version {
        return Some((404, "Resource not found"));
    }
    if !headers.contains_key("api-key") {
        return Some((
            401,
            "Access denied due to missing subscription key. Make sure to include \
             subscription key when making requests to an API. (mock)",
        ));
    }
    None
}

/// An Azure error body: `code` is the status as a string, as Azure sends for its
/// gateway-level errors (429, 401, 404), and there is no `type`.
pub fn error_json(status: u16, message: Option<&str>) -> Value {
    let default = match status {
        429 => {
            "Requests to the ChatCompletions_Create Operation have exceeded the rate \
                limit of your current pricing tier. Please retry after 1 second. (mock)"
        }
        503 => "The service is temporarily unable to process your request. (mock)",
        _ => "The request failed (mock).",
    };
    json!({"error": {"code": status.to_string(), "message": message.unwrap_or(default)}})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deployment_paths() {
        assert_eq!(
            chat_deployment("/openai/deployments/gpt4o-prod/chat/completions"),
            Some("gpt4o-prod")
        );
        assert_eq!(
            chat_deployment("/pre/openai/deployments/d/chat/completions"),
            Some("d")
        );
        assert_eq!(
            chat_deployment("/openai/deployments//chat/completions"),
            None
        );
        assert_eq!(chat_deployment("/v1/chat/completions"), None);
    }

    #[test]
    fn refuses_without_version_or_key() {
        let mut h = http::HeaderMap::new();
        assert_eq!(refusal(None, &h).map(|r| r.0), Some(404));
        assert_eq!(refusal(Some("api-version="), &h).map(|r| r.0), Some(404));
        assert_eq!(
            refusal(Some("api-version=2024-10-21"), &h).map(|r| r.0),
            Some(401)
        );
        h.insert("api-key", http::HeaderValue::from_static("k"));
        assert_eq!(refusal(Some("x=1&api-version=2024-10-21"), &h), None);
        assert!(error_json(429, None)["error"].get("type").is_none());
    }
}
