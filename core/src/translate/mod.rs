//! Translation between the OpenAI front door and each provider's native API.
//!
//! One translator per (client, backend) pair, with per-request state: `openai_anthropic`,
//! `openai_gemini`, `openai_openai` (OpenAI and OpenAI-compatible providers, quirks
//! normalised). Each implements [`Pair`]; [`Translator`] picks one with a single `match` and
//! owns what is common to all of them (stream framing in and out, the usage chunk, errors in
//! the middle of a stream).
//!
//! Core never sees a provider key: [`UpstreamRequest`] carries no credentials, the adapter (or
//! the host, e.g. Envoy's credential injector) adds them.

pub mod exchange;
pub(crate) mod gemini_wire;
pub(crate) mod openai_anthropic;
pub mod openai_gemini;
pub(crate) mod openai_openai;


use crate::openai::{ChatChunk, ChatCompletion, ChatRequest};
use crate::fault::ApiError;
pub use crate::provider::{ProviderKind, Target};
use crate::usage::Usage;

/// The request to send upstream. No credentials: the host adds them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamRequest {
    /// Path and query, e.g. `/v1/messages` or
    /// `/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse`.
    pub path: String,
    /// Headers the translator sets (`content-type`, a provider's version pin): never credentials.
    pub headers: Vec<(&'static str, String)>,
    /// The body, in the provider's dialect.
    pub body: Vec<u8>,
    /// Whether the response will be a stream.
    pub stream: bool,
}

/// What a pair translator emits while translating a stream.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamOut {
    /// A chunk to send to the client as `data: <json>`.
    Chunk(ChatChunk),
    /// An upstream chunk to send on unchanged (pass-through), as its `data:` text.
    Raw(String),
    /// An SSE comment line for the client (e.g. a provider's keep-alive).
    Comment(String),
}

/// One (OpenAI client, backend) translator, with its per-request state. Implementations sit in
/// their pair file, next to their tests over the recorded fixtures.
pub trait Pair {
    /// The upstream request for `req` (already resolved to `target`).
    fn request(&mut self, req: &ChatRequest, target: &Target) -> Result<UpstreamRequest, ApiError>;

    /// A successful non-stream response body, in OpenAI's format.
    fn response(&mut self, body: &[u8]) -> Result<ChatCompletion, ApiError>;

    /// A provider error response (status ≥ 400), in OpenAI's terms.
    fn error(&mut self, status: u16, retry_after: Option<u64>, body: &[u8]) -> ApiError;

    /// One upstream stream event: an SSE event (`event` name, `data`) or, for Gemini's JSON-array
    /// stream, one array element's JSON text with `event = None`.
    fn event(&mut self, event: Option<&str>, data: &str, out: &mut Vec<StreamOut>) -> Result<(), ApiError>;

    /// The upstream stream ended cleanly; emit whatever is still owed (e.g. a final chunk).
    fn end(&mut self, out: &mut Vec<StreamOut>) -> Result<(), ApiError>;

    /// Usage reported so far (complete after `response` or `end`).
    fn usage(&self) -> Usage;

    /// The `id`, `model` and `created` the client's chunks carry when they are the provider's
    /// own (pass-through), so the usage chunk the framing adds matches them. `None`: the
    /// chunks carry the [`ResponseMeta`] values.
    fn stream_identity(&self) -> Option<ResponseMeta> {
        None
    }
}

/// Values every pair needs to build OpenAI objects: the client-visible model name, an id and
/// the creation time (epoch seconds, from the host: core reads no clock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseMeta {
    /// The completion id the client sees (`chatcmpl-…`).
    pub id: String,
    /// The model name the client asked for.
    pub model: String,
    /// Creation time in epoch seconds, from the host.
    pub created: u64,
}

/// An assistant tool call's `arguments` (JSON text) as the JSON object providers take as input;
/// empty text is `{}`. `param` names the call in the error (`messages[2].tool_calls[0]`).
pub(crate) fn tool_arguments(arguments: &str, param: &str) -> Result<serde_json::Value, ApiError> {
    let args = arguments.trim();
    if args.is_empty() {
        return Ok(serde_json::Value::Object(serde_json::Map::new()));
    }
    match serde_json::from_str::<serde_json::Value>(args) {
        Ok(v @ serde_json::Value::Object(_)) => Ok(v),
        Ok(_) => Err(ApiError::invalid(
            Some(&format!("{param}.function.arguments")),
            "tool call arguments must be a JSON object",
        )),
        Err(e) => Err(ApiError::invalid(
            Some(&format!("{param}.function.arguments")),
            format!("tool call arguments are not valid JSON: {e}"),
        )),
    }
}

/// `retry-after` as whole seconds, when a provider sent one we can read.
pub(crate) fn parse_retry_after(value: Option<&str>) -> Option<u64> {
    let v = value?.trim();
    v.parse::<u64>().ok().or_else(|| v.parse::<f64>().ok().filter(|f| f.is_finite() && *f >= 0.0).map(|f| f.ceil() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_render_in_openais_shape() {
        let e = ApiError::unsupported("n", "n > 1 is not supported by Anthropic");
        assert_eq!(
            String::from_utf8(e.body()).unwrap(),
            r#"{"error":{"message":"n > 1 is not supported by Anthropic","type":"invalid_request_error","param":"n","code":"unsupported_parameter"}}"#
        );
        let r = ApiError { retry_after: Some(7), ..ApiError::bad_upstream("x") }.to_response();
        assert_eq!(r.status, 502);
        assert!(r.headers.contains(&("retry-after", "7".to_owned())));
    }

    #[test]
    fn tool_arguments_must_be_a_json_object() {
        assert_eq!(tool_arguments("  ", "m").unwrap(), serde_json::json!({}));
        assert_eq!(tool_arguments(r#"{"a":1}"#, "m").unwrap(), serde_json::json!({"a": 1}));
        assert_eq!(tool_arguments("[1]", "m").unwrap_err().param.as_deref(), Some("m.function.arguments"));
        assert!(tool_arguments("{", "m").unwrap_err().message.starts_with("tool call arguments are not valid JSON"));
    }

    #[test]
    fn retry_after_accepts_seconds_only() {
        assert_eq!(parse_retry_after(Some("12")), Some(12));
        assert_eq!(parse_retry_after(Some(" 1.2 ")), Some(2));
        assert_eq!(parse_retry_after(Some("Wed, 21 Oct 2015 07:28:00 GMT")), None);
        assert_eq!(parse_retry_after(None), None);
    }
}
