//! Decisions rendered for the client, in OpenAI's dialect.
//!
//! Allowed requests get OpenAI's rate-limit headers for the most restrictive request quota.
//! Denied requests get a complete local response: 429, `retry-after` in whole seconds, the same
//! headers, and OpenAI's error body
//! `{"error":{"message":"…","type":"requests","param":null,"code":"rate_limit_exceeded"}}`.

use serde::Serialize;

use crate::duration::{openai_duration, retry_after_secs};
use crate::quota::{Decision, QuotaStatus};

/// A response the adapter sends instead of forwarding the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalResponse {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

pub const LIMIT_REQUESTS: &str = "x-ratelimit-limit-requests";
pub const REMAINING_REQUESTS: &str = "x-ratelimit-remaining-requests";
pub const RESET_REQUESTS: &str = "x-ratelimit-reset-requests";

/// OpenAI's rate-limit headers as a provider sends them. They describe the operator's
/// organisation-wide provider limits, which are none of the client's business: adapters remove
/// them from upstream responses and set the client's own (from [`allowed_headers`]) instead.
pub const PROVIDER_RATE_LIMIT_HEADERS: [&str; 6] = [
    LIMIT_REQUESTS,
    REMAINING_REQUESTS,
    RESET_REQUESTS,
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
];

pub fn rate_limit_headers(s: &QuotaStatus) -> Vec<(&'static str, String)> {
    vec![
        (LIMIT_REQUESTS, s.limit.to_string()),
        (REMAINING_REQUESTS, s.remaining.to_string()),
        (RESET_REQUESTS, openai_duration(s.reset_ms)),
    ]
}

/// Headers to add to the upstream's response for an allowed request.
pub fn allowed_headers(decision: &Decision) -> Vec<(&'static str, String)> {
    match decision {
        Decision::Allowed { binding: Some(s) } => rate_limit_headers(s),
        _ => vec![],
    }
}

/// The complete response for a denied request; `None` when the decision allowed it.
pub fn rejection(decision: &Decision) -> Option<LocalResponse> {
    let Decision::Denied { binding, retry_after_ms } = decision else {
        return None;
    };
    let message = format!(
        "Rate limit reached for requests per {}: Limit {}, Used {}, Requested 1. Please try again in {}.",
        binding.window.name(),
        binding.limit,
        binding.used,
        openai_duration(*retry_after_ms),
    );
    let mut response = openai_error(429, &message, "requests", "rate_limit_exceeded");
    response.headers.push(("retry-after", retry_after_secs(*retry_after_ms).to_string()));
    response.headers.extend(rate_limit_headers(binding));
    Some(response)
}

/// The response when the counter store failed and the policy says to deny: a 503 that the
/// OpenAI SDKs retry on their own.
pub fn store_unavailable() -> LocalResponse {
    let mut response = openai_error(
        503,
        "The rate limiter is temporarily unavailable. Please retry shortly.",
        "server_error",
        "rate_limiter_unavailable",
    );
    response.headers.push(("retry-after", "1".to_owned()));
    response
}

/// OpenAI's error envelope, fields in OpenAI's order.
#[derive(Serialize)]
struct ErrorEnvelope<'a> {
    error: ErrorBody<'a>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: &'a str,
}

/// OpenAI's error envelope with a JSON content type.
pub fn openai_error(status: u16, message: &str, kind: &str, code: &str) -> LocalResponse {
    let envelope = ErrorEnvelope { error: ErrorBody { message, kind, param: None, code } };
    LocalResponse {
        status,
        headers: vec![("content-type", "application/json".to_owned())],
        body: serde_json::to_vec(&envelope).unwrap_or_default(),
    }
}

/// [`openai_error`] with `error.param` naming the request field at fault (OpenAI sets it, e.g.
/// `"max_tokens"`, when one parameter is the problem).
pub fn openai_error_with_param(status: u16, message: &str, kind: &str, code: &str, param: Option<&str>) -> LocalResponse {
    let envelope = ErrorEnvelope { error: ErrorBody { message, kind, param, code } };
    LocalResponse {
        status,
        headers: vec![("content-type", "application/json".to_owned())],
        body: serde_json::to_vec(&envelope).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::window::Window;
    use serde_json::json;

    fn status(remaining: u64, reset_ms: u64) -> QuotaStatus {
        QuotaStatus { window: Window::Hour, limit: 10, used: 10 - remaining, remaining, reset_ms }
    }

    #[test]
    fn allowed_headers_use_openai_names_and_durations() {
        let d = Decision::Allowed { binding: Some(status(7, 360_000)) };
        assert_eq!(
            allowed_headers(&d),
            vec![
                (LIMIT_REQUESTS, "10".to_owned()),
                (REMAINING_REQUESTS, "7".to_owned()),
                (RESET_REQUESTS, "6m0s".to_owned())
            ]
        );
        assert!(allowed_headers(&Decision::Allowed { binding: None }).is_empty());
        assert!(rejection(&d).is_none());
    }

    #[test]
    fn rejection_is_openai_shaped() {
        let d = Decision::Denied { binding: status(0, 360_500), retry_after_ms: 360_500 };
        let r = rejection(&d).unwrap();
        assert_eq!(r.status, 429);
        assert_eq!(
            std::str::from_utf8(&r.body).unwrap(),
            r#"{"error":{"message":"Rate limit reached for requests per hour: Limit 10, Used 10, Requested 1. Please try again in 6m0.5s.","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#
        );
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            body,
            json!({"error": {
                "message": "Rate limit reached for requests per hour: Limit 10, Used 10, Requested 1. Please try again in 6m0.5s.",
                "type": "requests", "param": null, "code": "rate_limit_exceeded"}})
        );
        let h = |name: &str| r.headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str());
        assert_eq!(h("retry-after"), Some("361"));
        assert_eq!(h("content-type"), Some("application/json"));
        assert_eq!(h(REMAINING_REQUESTS), Some("0"));
    }

    #[test]
    fn error_with_param_sets_only_param() {
        let r = openai_error_with_param(400, "m", "invalid_request_error", "c", Some("max_tokens"));
        assert_eq!(
            std::str::from_utf8(&r.body).unwrap(),
            r#"{"error":{"message":"m","type":"invalid_request_error","param":"max_tokens","code":"c"}}"#
        );
        assert_eq!(openai_error_with_param(400, "m", "t", "c", None), openai_error(400, "m", "t", "c"));
    }

    #[test]
    fn store_unavailable_is_a_retryable_503() {
        let r = store_unavailable();
        assert_eq!(r.status, 503);
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["error"]["code"], "rate_limiter_unavailable");
    }
}
