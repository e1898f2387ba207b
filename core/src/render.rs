//! Decisions rendered for the client, in OpenAI's dialect.
//!
//! Allowed requests get OpenAI's rate-limit headers for the most restrictive request quota.
//! Denied requests get a complete local response: 429, `retry-after` in whole seconds, the same
//! headers, and OpenAI's error body
//! `{"error":{"message":"…","type":"requests","param":null,"code":"rate_limit_exceeded"}}`.

use serde::Serialize;

use crate::duration::{openai_duration, retry_after_secs};

/// A response the adapter sends instead of forwarding the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalResponse {
    /// The HTTP status.
    pub status: u16,
    /// Response headers, names in lower case.
    pub headers: Vec<(&'static str, String)>,
    /// The body: OpenAI's error JSON, or the JSON the endpoint answers with.
    pub body: Vec<u8>,
}

pub(crate) const LIMIT_REQUESTS: &str = "x-ratelimit-limit-requests";
pub(crate) const REMAINING_REQUESTS: &str = "x-ratelimit-remaining-requests";
pub(crate) const RESET_REQUESTS: &str = "x-ratelimit-reset-requests";

pub(crate) const LIMIT_TOKENS: &str = "x-ratelimit-limit-tokens";
pub(crate) const REMAINING_TOKENS: &str = "x-ratelimit-remaining-tokens";
pub(crate) const RESET_TOKENS: &str = "x-ratelimit-reset-tokens";

/// OpenAI's request headers for one limit.
pub(crate) fn rate_limit_headers(limit: u64, remaining: u64, reset_ms: u64) -> Vec<(&'static str, String)> {
    vec![
        (LIMIT_REQUESTS, limit.to_string()),
        (REMAINING_REQUESTS, remaining.to_string()),
        (RESET_REQUESTS, openai_duration(reset_ms)),
    ]
}

/// OpenAI's token headers for one limit.
pub(crate) fn token_limit_headers(limit: u64, remaining: u64, reset_ms: u64) -> Vec<(&'static str, String)> {
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

/// Every deployment of an alias is cooling down: a 503 with `retry-after` (whole seconds, the
/// soonest a deployment is available again) that the OpenAI SDKs retry on their own.
pub fn unavailable(retry_after_ms: u64) -> LocalResponse {
    unavailable_message("Every deployment of the requested model is cooling down", retry_after_ms)
}

/// [`unavailable`] naming the model (alias) the client asked for.
pub(crate) fn unavailable_model(alias: &str, retry_after_ms: u64) -> LocalResponse {
    unavailable_message(&format!("Every deployment of model {alias:?} is cooling down"), retry_after_ms)
}

fn unavailable_message(prefix: &str, retry_after_ms: u64) -> LocalResponse {
    let secs = retry_after_secs(retry_after_ms);
    let unit = if secs == 1 { "second" } else { "seconds" };
    let mut response =
        openai_error(503, &format!("{prefix}. Please retry in {secs} {unit}."), "server_error", "deployments_unavailable");
    response.headers.push(("retry-after", secs.to_string()));
    response
}

/// Every attempt of an alias failed: a 502 naming each deployment tried and how it failed
/// (`tried`: deployment, [`crate::fallback::Failure::label`]). Provider bodies are never
/// included.
pub fn attempts_exhausted(alias: &str, tried: &[(String, String)]) -> LocalResponse {
    let list: Vec<String> = tried.iter().map(|(d, label)| format!("{d} ({label})")).collect();
    let message = if list.is_empty() {
        format!("No deployment of model {alias:?} could be tried.")
    } else {
        format!("Every deployment of model {alias:?} that was tried failed: {}.", list.join(", "))
    };
    openai_error(502, &message, "server_error", "all_deployments_failed")
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
pub(crate) fn openai_error_with_param(status: u16, message: &str, kind: &str, code: &str, param: Option<&str>) -> LocalResponse {
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
    fn unavailable_is_a_503_with_the_soonest_retry() {
        let r = unavailable(12_001);
        assert_eq!(r.status, 503);
        assert!(r.headers.contains(&("retry-after", "13".to_owned())));
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["error"]["code"], "deployments_unavailable");
        assert_eq!(body["error"]["type"], "server_error");
        assert_eq!(body["error"]["param"], serde_json::Value::Null);
        let r = unavailable_model("scalix-free", 1000);
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["error"]["message"], "Every deployment of model \"scalix-free\" is cooling down. Please retry in 1 second.");
        assert!(r.headers.contains(&("retry-after", "1".to_owned())));
    }

    #[test]
    fn attempts_exhausted_names_deployments_and_failures_only() {
        let tried = [("flash".to_owned(), "500".to_owned()), ("pro".to_owned(), "timeout".to_owned())];
        let r = attempts_exhausted("scalix-free", &tried);
        assert_eq!(r.status, 502);
        assert_eq!(
            String::from_utf8(r.body).unwrap(),
            r#"{"error":{"message":"Every deployment of model \"scalix-free\" that was tried failed: flash (500), pro (timeout).","type":"server_error","param":null,"code":"all_deployments_failed"}}"#
        );
        assert_eq!(attempts_exhausted("x", &[]).status, 502);
    }

    #[test]
    fn store_unavailable_is_a_retryable_503() {
        let r = store_unavailable();
        assert_eq!(r.status, 503);
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["error"]["code"], "rate_limiter_unavailable");
    }
}
