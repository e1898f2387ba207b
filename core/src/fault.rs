//! Whose fault an error is, and errors in OpenAI's terms: a leaf every part of core (guards,
//! identity, the gate, the translators) and the adapters share.

use serde::Serialize;
use thiserror::Error;

use crate::render::{openai_error, LocalResponse};

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
pub struct ApiError {
    /// Whose fault it is.
    pub fault: Fault,
    /// The HTTP status.
    pub status: u16,
    /// OpenAI's `error.type`, e.g. `invalid_request_error`, `rate_limit_error`, `server_error`.
    pub kind: &'static str,
    /// OpenAI's `error.code`, e.g. `unsupported_parameter`, `rate_limit_exceeded`.
    pub code: Option<String>,
    /// OpenAI's `error.param`: the request field at fault, if one is.
    pub param: Option<String>,
    /// OpenAI's `error.message`: what the client reads.
    pub message: String,
    /// `retry-after` seconds the provider asked for, kept for the client.
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// A 400 for a request this backend cannot serve as asked.
    pub fn unsupported(param: &str, message: impl Into<String>) -> Self {
        ApiError {
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
        ApiError {
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
        ApiError::invalid(None, format!("We could not parse the JSON body of your request: {e}"))
    }

    /// OpenAI's 404 for a model the policy does not map. Names only what the client sent.
    pub fn model_not_found(model: &str) -> Self {
        ApiError {
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
    pub(crate) fn bad_upstream(message: impl Into<String>) -> Self {
        ApiError {
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

