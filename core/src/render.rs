//! Decisions rendered for the client, in OpenAI's dialect.
//!
//! Allowed requests get OpenAI's rate-limit headers for the most restrictive request quota.
//! Denied requests get a complete local response: 429, `retry-after` in whole seconds, the same
//! headers, and OpenAI's error body
//! `{"error":{"message":"…","type":"requests","param":null,"code":"rate_limit_exceeded"}}`.

use serde::Serialize;

use crate::duration::openai_duration;

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
    LIMIT_TOKENS,
    REMAINING_TOKENS,
    RESET_TOKENS,
];

pub const LIMIT_TOKENS: &str = "x-ratelimit-limit-tokens";
pub const REMAINING_TOKENS: &str = "x-ratelimit-remaining-tokens";
pub const RESET_TOKENS: &str = "x-ratelimit-reset-tokens";

/// OpenAI's request headers for one limit.
pub fn rate_limit_headers(limit: u64, remaining: u64, reset_ms: u64) -> Vec<(&'static str, String)> {
    vec![
        (LIMIT_REQUESTS, limit.to_string()),
        (REMAINING_REQUESTS, remaining.to_string()),
        (RESET_REQUESTS, openai_duration(reset_ms)),
    ]
}

/// OpenAI's token headers for one limit.
pub fn token_limit_headers(limit: u64, remaining: u64, reset_ms: u64) -> Vec<(&'static str, String)> {
    vec![
        (LIMIT_TOKENS, limit.to_string()),
        (REMAINING_TOKENS, remaining.to_string()),
        (RESET_TOKENS, openai_duration(reset_ms)),
    ]
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

    #[test]
    fn headers_use_openai_names_and_durations() {
        assert_eq!(
            rate_limit_headers(10, 7, 360_000),
            vec![(LIMIT_REQUESTS, "10".to_owned()), (REMAINING_REQUESTS, "7".to_owned()), (RESET_REQUESTS, "6m0s".to_owned())]
        );
        assert_eq!(token_limit_headers(1000, 0, 500)[2], (RESET_TOKENS, "500ms".to_owned()));
    }

    #[test]
    fn store_unavailable_is_a_retryable_503() {
        let r = store_unavailable();
        assert_eq!(r.status, 503);
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["error"]["code"], "rate_limiter_unavailable");
    }
}
