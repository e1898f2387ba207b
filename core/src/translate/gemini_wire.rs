//! Gemini API wire types (`generateContent` / `streamGenerateContent`, `v1beta`): the subset
//! Tollgate writes and reads.
//!
//! Gemini's JSON is the proto3 JSON mapping, so the API accepts both the lowerCamelCase field
//! names it documents and the original snake_case proto names (recorded requests from Python
//! clients use `function_call`, `file_uri`, `thinking_budget`, …). These types serialise
//! camelCase and deserialise either spelling.
//!
//! Requests are strict where Tollgate owns every field (the request, `generationConfig`,
//! `thinkingConfig`: an unknown field there fails to parse, so the fixture test notices a field
//! this module does not model). Response types are lenient: Gemini adds fields over time
//! (`avgLogprobs`, `modelVersion`, `serviceTier` …) and a gateway must not break on them.

use serde::{Deserialize, Serialize};
use serde_json::Value;

fn is_false(b: &Option<bool>) -> bool {
    *b != Some(true)
}

// ---- request ----

/// `GenerateContentRequest`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GenerateContentRequest {
    pub contents: Vec<Content>,
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "system_instruction")]
    pub system_instruction: Option<Content>,
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "generation_config")]
    pub generation_config: Option<GenerationConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Tool>>,
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "tool_config")]
    pub tool_config: Option<ToolConfig>,
    /// Passed through as given; Tollgate never writes it.
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "safety_settings")]
    pub safety_settings: Option<Vec<Value>>,
    /// Passed through as given; Tollgate never writes it.
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "cached_content")]
    pub cached_content: Option<String>,
}

/// A turn: `role` is `user` or `model` (absent in `systemInstruction`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Content {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default)]
    pub parts: Vec<Part>,
}

/// One part. Gemini's `Part` is a `oneof data` (text, inlineData, fileData, functionCall,
/// functionResponse, executableCode, codeExecutionResult) plus the `thought` flag and the
/// opaque `thoughtSignature`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Part {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// `true` on thought-summary parts (only sent with `includeThoughts`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub thought: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "thought_signature")]
    pub thought_signature: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "inline_data")]
    pub inline_data: Option<Blob>,
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "file_data")]
    pub file_data: Option<FileData>,
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "function_call")]
    pub function_call: Option<FunctionCall>,
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "function_response")]
    pub function_response: Option<FunctionResponse>,
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "executable_code")]
    pub executable_code: Option<ExecutableCode>,
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "code_execution_result")]
    pub code_execution_result: Option<CodeExecutionResult>,
}

impl Part {
    pub fn text(text: impl Into<String>) -> Part {
        Part { text: Some(text.into()), ..Part::default() }
    }

    /// Whether one of the `data` members is set (a part with none is empty).
    #[cfg(test)]
    pub fn has_data(&self) -> bool {
        self.text.is_some()
            || self.inline_data.is_some()
            || self.file_data.is_some()
            || self.function_call.is_some()
            || self.function_response.is_some()
            || self.executable_code.is_some()
            || self.code_execution_result.is_some()
    }

    pub fn is_thought(&self) -> bool {
        self.thought == Some(true)
    }
}

/// Inline bytes, base64.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Blob {
    #[serde(alias = "mime_type")]
    pub mime_type: String,
    pub data: String,
}

/// Data by URI.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FileData {
    /// Optional in the API: omitted when Tollgate cannot tell it from the URL.
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "mime_type")]
    pub mime_type: Option<String>,
    #[serde(alias = "file_uri")]
    pub file_uri: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionCall {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub name: String,
    /// A JSON object (proto `Struct`); absent when the function takes no arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionResponse {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub name: String,
    /// A JSON object (proto `Struct`).
    pub response: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecutableCode {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    #[serde(default)]
    pub code: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CodeExecutionResult {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
}

/// `GenerationConfig`: every field Tollgate may write, plus `responseModalities`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GenerationConfig {
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "stop_sequences")]
    pub stop_sequences: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "response_mime_type")]
    pub response_mime_type: Option<String>,
    /// Gemini's OpenAPI-subset schema (`Schema`).
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "response_schema")]
    pub response_schema: Option<Value>,
    /// A JSON Schema (the dialect OpenAI's `json_schema` uses).
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "response_json_schema")]
    pub response_json_schema: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "response_modalities")]
    pub response_modalities: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "candidate_count")]
    pub candidate_count: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "max_output_tokens")]
    pub max_output_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "top_p")]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "top_k")]
    pub top_k: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "presence_penalty")]
    pub presence_penalty: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "frequency_penalty")]
    pub frequency_penalty: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "thinking_config")]
    pub thinking_config: Option<ThinkingConfig>,
}

/// `ThinkingConfig`: `thinkingBudget` (Gemini 2.5) or `thinkingLevel` (Gemini 3), never both.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ThinkingConfig {
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "include_thoughts")]
    pub include_thoughts: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "thinking_budget")]
    pub thinking_budget: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "thinking_level")]
    pub thinking_level: Option<String>,
}

/// A tool. Only `functionDeclarations` is written; other tools (`googleSearch`,
/// `codeExecution`, …) are not modelled.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Tool {
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "function_declarations")]
    pub function_declarations: Option<Vec<FunctionDeclaration>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FunctionDeclaration {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Gemini's OpenAPI-subset schema.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    /// A JSON Schema (what OpenAI's `function.parameters` is).
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "parameters_json_schema")]
    pub parameters_json_schema: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ToolConfig {
    #[serde(alias = "function_calling_config")]
    pub function_calling_config: FunctionCallingConfig,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FunctionCallingConfig {
    /// `AUTO`, `ANY`, `NONE` (or `VALIDATED`).
    pub mode: String,
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "allowed_function_names")]
    pub allowed_function_names: Option<Vec<String>>,
}

// ---- response ----

/// `GenerateContentResponse`, also one element of a stream. `error` is set instead when the
/// element is an error (Gemini reports errors inside a stream this way).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GenerateContentResponse {
    #[serde(default)]
    pub candidates: Vec<Candidate>,
    #[serde(default)]
    pub prompt_feedback: Option<PromptFeedback>,
    #[serde(default)]
    pub usage_metadata: Option<UsageMetadata>,
    #[serde(default)]
    pub model_version: Option<String>,
    #[serde(default)]
    pub response_id: Option<String>,
    #[serde(default)]
    pub error: Option<ErrorBody>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Candidate {
    #[serde(default)]
    pub content: Option<Content>,
    #[serde(default)]
    pub finish_reason: Option<String>,
    #[serde(default)]
    pub finish_message: Option<String>,
    #[serde(default)]
    pub index: Option<u32>,
    #[serde(default)]
    pub safety_ratings: Vec<SafetyRating>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PromptFeedback {
    #[serde(default)]
    pub block_reason: Option<String>,
    /// Vertex AI only.
    #[serde(default)]
    pub block_reason_message: Option<String>,
    #[serde(default)]
    pub safety_ratings: Vec<SafetyRating>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SafetyRating {
    #[serde(default)]
    pub category: Option<String>,
    #[serde(default)]
    pub probability: Option<String>,
    #[serde(default)]
    pub blocked: Option<bool>,
}

/// `UsageMetadata`. In a stream every element carries the running totals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageMetadata {
    #[serde(default)]
    pub prompt_token_count: Option<u64>,
    #[serde(default)]
    pub candidates_token_count: Option<u64>,
    #[serde(default)]
    pub total_token_count: Option<u64>,
    #[serde(default)]
    pub cached_content_token_count: Option<u64>,
    #[serde(default)]
    pub thoughts_token_count: Option<u64>,
    #[serde(default)]
    pub tool_use_prompt_token_count: Option<u64>,
}

/// The error body, `{"error": {...}}` (google.rpc.Status in its JSON form).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct ErrorEnvelope {
    pub error: ErrorBody,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct ErrorBody {
    /// The HTTP status.
    #[serde(default)]
    pub code: Option<i64>,
    #[serde(default)]
    pub message: Option<String>,
    /// The canonical code name, e.g. `RESOURCE_EXHAUSTED`.
    #[serde(default)]
    pub status: Option<String>,
    /// `google.rpc` detail messages, each tagged by `@type`.
    #[serde(default)]
    pub details: Vec<Value>,
}

impl ErrorBody {
    /// The detail messages of one `google.rpc` type (e.g. `RetryInfo`, `ErrorInfo`).
    pub fn details_of<'a>(&'a self, rpc_type: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.details.iter().filter(move |d| {
            d.get("@type")
                .and_then(Value::as_str)
                .is_some_and(|t| t.rsplit('/').next() == Some(rpc_type))
        })
    }
}
