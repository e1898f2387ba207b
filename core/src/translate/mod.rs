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
pub mod gemini_wire;
pub mod openai_anthropic;
pub mod openai_gemini;
pub mod openai_openai;

use serde::Serialize;
use thiserror::Error;

use crate::openai::{ChatChunk, ChatCompletion, ChatRequest};
use crate::render::{openai_error, LocalResponse};
use crate::usage::Usage;

/// Which native API a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    /// OpenAI Chat Completions, spoken natively (OpenAI, DeepSeek, Groq, OpenRouter, xAI,
    /// Mistral, Together, vLLM …): passed through with quirks normalised.
    OpenAi,
    /// Anthropic Messages (`/v1/messages`).
    Anthropic,
    /// Google Gemini (`generateContent` / `streamGenerateContent`).
    Gemini,
}

/// Where a request goes: the provider's kind and the upstream model, plus per-model defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub kind: ProviderKind,
    /// The provider's model name (the client may have used an alias).
    pub upstream_model: String,
    /// `max_tokens` to send when the client gave none and the provider requires one
    /// (Anthropic).
    pub default_max_tokens: Option<u64>,
}

/// The request to send upstream. No credentials: the host adds them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamRequest {
    /// Path and query, e.g. `/v1/messages` or
    /// `/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse`.
    pub path: String,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
    /// Whether the response will be a stream.
    pub stream: bool,
}

/// Whose fault an error is: decides the status family and what is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// The client's request is invalid or asks for something the backend cannot do (4xx).
    Client,
    /// The provider answered with an error or with something unreadable.
    Provider,
    /// Tollgate itself failed.
    Gateway,
}

/// An error in OpenAI's terms: status, `type`, `code`, `param`, message.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{message}")]
pub struct TranslateError {
    pub fault: Fault,
    pub status: u16,
    /// OpenAI's `error.type`, e.g. `invalid_request_error`, `rate_limit_error`, `server_error`.
    pub kind: &'static str,
    /// OpenAI's `error.code`, e.g. `unsupported_parameter`, `rate_limit_exceeded`.
    pub code: Option<String>,
    pub param: Option<String>,
    pub message: String,
    /// `retry-after` seconds the provider asked for, kept for the client.
    pub retry_after: Option<u64>,
}

impl TranslateError {
    /// A 400 for a request this backend cannot serve as asked.
    pub fn unsupported(param: &str, message: impl Into<String>) -> Self {
        TranslateError {
            fault: Fault::Client,
            status: 400,
            kind: "invalid_request_error",
            code: Some("unsupported_parameter".to_owned()),
            param: Some(param.to_owned()),
            message: message.into(),
            retry_after: None,
        }
    }

    /// A 400 for a malformed request.
    pub fn invalid(param: Option<&str>, message: impl Into<String>) -> Self {
        TranslateError {
            fault: Fault::Client,
            status: 400,
            kind: "invalid_request_error",
            code: None,
            param: param.map(str::to_owned),
            message: message.into(),
            retry_after: None,
        }
    }

    /// A 400 for a body that is not a chat completion request.
    pub fn unreadable_body(e: &serde_json::Error) -> Self {
        TranslateError::invalid(None, format!("We could not parse the JSON body of your request: {e}"))
    }

    /// OpenAI's 404 for a model the policy does not map. Names only what the client sent.
    pub fn model_not_found(model: &str) -> Self {
        TranslateError {
            fault: Fault::Client,
            status: 404,
            kind: "invalid_request_error",
            code: Some("model_not_found".to_owned()),
            param: Some("model".to_owned()),
            message: format!("The model `{model}` does not exist or you do not have access to it."),
            retry_after: None,
        }
    }

    /// A 502 for a provider answer that cannot be read.
    pub fn bad_upstream(message: impl Into<String>) -> Self {
        TranslateError {
            fault: Fault::Provider,
            status: 502,
            kind: "server_error",
            code: Some("bad_upstream_response".to_owned()),
            param: None,
            message: message.into(),
            retry_after: None,
        }
    }

    /// Short label for metrics.
    pub fn label(&self) -> &'static str {
        match self.fault {
            Fault::Client => "client",
            Fault::Provider => "provider",
            Fault::Gateway => "gateway",
        }
    }

    /// The OpenAI error object (`{"error": {...}}`) as JSON.
    pub fn body(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Envelope<'a> {
            error: Body<'a>,
        }
        #[derive(Serialize)]
        struct Body<'a> {
            message: &'a str,
            #[serde(rename = "type")]
            kind: &'a str,
            param: Option<&'a str>,
            code: Option<&'a str>,
        }
        serde_json::to_vec(&Envelope {
            error: Body { message: &self.message, kind: self.kind, param: self.param.as_deref(), code: self.code.as_deref() },
        })
        .unwrap_or_default()
    }

    /// The complete local response in OpenAI's dialect.
    pub fn to_response(&self) -> LocalResponse {
        let mut r = openai_error(self.status, "", "", "");
        r.body = self.body();
        if let Some(s) = self.retry_after {
            r.headers.push(("retry-after", s.to_string()));
        }
        r
    }
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
    fn request(&mut self, req: &ChatRequest, target: &Target) -> Result<UpstreamRequest, TranslateError>;

    /// A successful non-stream response body, in OpenAI's format.
    fn response(&mut self, body: &[u8]) -> Result<ChatCompletion, TranslateError>;

    /// A provider error response (status ≥ 400), in OpenAI's terms.
    fn error(&mut self, status: u16, retry_after: Option<u64>, body: &[u8]) -> TranslateError;

    /// One upstream stream event: an SSE event (`event` name, `data`) or, for Gemini's JSON-array
    /// stream, one array element's JSON text with `event = None`.
    fn event(&mut self, event: Option<&str>, data: &str, out: &mut Vec<StreamOut>) -> Result<(), TranslateError>;

    /// The upstream stream ended cleanly; emit whatever is still owed (e.g. a final chunk).
    fn end(&mut self, out: &mut Vec<StreamOut>) -> Result<(), TranslateError>;

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
    pub id: String,
    pub model: String,
    pub created: u64,
}

impl ProviderKind {
    /// The request header that carries a provider key of this kind, with its value: for hosts
    /// that add the key themselves (the worker; Envoy's clusters are configured the same way).
    pub fn key_header(self, key: &str) -> (&'static str, String) {
        match self {
            ProviderKind::Anthropic => ("x-api-key", key.to_owned()),
            ProviderKind::Gemini => ("x-goog-api-key", key.to_owned()),
            ProviderKind::OpenAi => ("authorization", format!("Bearer {key}")),
        }
    }
}

/// An assistant tool call's `arguments` (JSON text) as the JSON object providers take as input;
/// empty text is `{}`. `param` names the call in the error (`messages[2].tool_calls[0]`).
pub(crate) fn tool_arguments(arguments: &str, param: &str) -> Result<serde_json::Value, TranslateError> {
    let args = arguments.trim();
    if args.is_empty() {
        return Ok(serde_json::Value::Object(serde_json::Map::new()));
    }
    match serde_json::from_str::<serde_json::Value>(args) {
        Ok(v @ serde_json::Value::Object(_)) => Ok(v),
        Ok(_) => Err(TranslateError::invalid(
            Some(&format!("{param}.function.arguments")),
            "tool call arguments must be a JSON object",
        )),
        Err(e) => Err(TranslateError::invalid(
            Some(&format!("{param}.function.arguments")),
            format!("tool call arguments are not valid JSON: {e}"),
        )),
    }
}

/// `retry-after` as whole seconds, when a provider sent one we can read.
pub fn parse_retry_after(value: Option<&str>) -> Option<u64> {
    let v = value?.trim();
    v.parse::<u64>().ok().or_else(|| v.parse::<f64>().ok().filter(|f| f.is_finite() && *f >= 0.0).map(|f| f.ceil() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_render_in_openais_shape() {
        let e = TranslateError::unsupported("n", "n > 1 is not supported by Anthropic");
        assert_eq!(
            String::from_utf8(e.body()).unwrap(),
            r#"{"error":{"message":"n > 1 is not supported by Anthropic","type":"invalid_request_error","param":"n","code":"unsupported_parameter"}}"#
        );
        let r = TranslateError { retry_after: Some(7), ..TranslateError::bad_upstream("x") }.to_response();
        assert_eq!(r.status, 502);
        assert!(r.headers.contains(&("retry-after", "7".to_owned())));
    }

    #[test]
    fn each_kind_gets_its_key_header() {
        assert_eq!(ProviderKind::Anthropic.key_header("k"), ("x-api-key", "k".to_owned()));
        assert_eq!(ProviderKind::Gemini.key_header("k"), ("x-goog-api-key", "k".to_owned()));
        assert_eq!(ProviderKind::OpenAi.key_header("k"), ("authorization", "Bearer k".to_owned()));
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
