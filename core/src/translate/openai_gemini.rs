//! OpenAI Chat Completions in front, Gemini (`generateContent`) behind.
//!
//! [`OpenAiGemini`] is one request's translator: [`Pair::request`] writes the Gemini request,
//! [`Pair::response`] / [`Pair::event`] + [`Pair::end`] read the answer back into OpenAI's
//! shape, [`Pair::error`] maps Gemini's error bodies. Wire types are in `super::gemini_wire`.
//!
//! # Request
//! `POST /v1beta/models/{model}:generateContent`, or `:streamGenerateContent?alt=sse` for a
//! stream; `content-type: application/json` and no key (the host adds `x-goog-api-key`).
//! - `system` / `developer` messages, any number and anywhere, become `systemInstruction` parts in
//!   order (text only). `user` → role `user`, `assistant` → role `model`.
//! - Content parts: text; `image_url` with a base64 `data:` URL → `inlineData`; with an
//!   `http(s)://` or `gs://` URL → `fileData` whose `mimeType` is guessed from the file
//!   extension, and omitted (it is optional in the API) when the extension says nothing
//!   (e.g. Files API URIs); `input_audio` (wav, mp3) → `inlineData`; `file` with a `file_data`
//!   data URL → `inlineData` (a `file_id` is OpenAI's and means nothing to Gemini: 400).
//! - Assistant `tool_calls` → `functionCall {id, name, args}` parts (arguments must be a JSON
//!   object, `""` is `{}`; anything else is a 400). `tool` messages → `functionResponse` parts
//!   in a `user` turn, consecutive results merged into one turn; the name is looked up from the
//!   earlier tool call with that id (else the message's `name`, else 400); content that is a
//!   JSON object is sent as the response object, anything else as `{"output": …}` (Gemini's
//!   documented key for a function's output).
//! - `generationConfig`: `maxOutputTokens` (`max_completion_tokens`, else `max_tokens`),
//!   `temperature`, `topP`, `topK` (extra field `top_k`), `stopSequences`, `seed`,
//!   `presencePenalty`, `frequencyPenalty`, `candidateCount` (`n`, see below).
//! - JSON mode: `json_object` → `responseMimeType: application/json`; `json_schema` → that plus
//!   `responseJsonSchema`, which takes JSON Schema as OpenAI clients write it (the older
//!   `responseSchema` takes an OpenAPI subset without e.g. `additionalProperties` or `$ref`, so
//!   it is not used). For the same reason tools go out as `parametersJsonSchema`.
//! - `tools` → one `functionDeclarations` tool; `strict` is accepted and not enforced (Gemini
//!   has no strict mode; requiring it would lock out most agent frameworks, which send it by
//!   default). `tool_choice`: `auto` → `AUTO`, `none` → `NONE`, `required` → `ANY`, a named
//!   function → `ANY` + `allowedFunctionNames`.
//! - `reasoning_effort` → `thinkingConfig`, see `thinking_config`.
//!
//! Refused with a 400 naming the parameter (a dropped parameter could change the answer):
//! `logit_bias`, `logprobs: true`, `top_logprobs` (Gemini's logprobs are not mapped),
//! `parallel_tool_calls: false` (Gemini cannot be limited to one call), `n` above 8,
//! `modalities` other than text, other tool types, the legacy `function` role, `file_id`
//! parts, and every unknown top-level field except `HARMLESS_EXTRA_FIELDS`. Accepted and not
//! sent: `user`, `stream_options` (the wrapper's), `strict`, a message's `name`, and
//! `reasoning_content` on assistant turns (Gemini takes earlier thinking back only as
//! signatures).
//!
//! # `n`
//! Gemini can answer several candidates: `n` → `candidateCount`, each candidate's `index`
//! becomes its choice's `index`, in non-stream answers and streams alike.
//!
//! # Thought signatures
//! Gemini 2.5+ attaches an opaque `thoughtSignature` to `functionCall` parts and Gemini 3
//! rejects a later request whose function-call parts lack it. OpenAI clients echo a tool call's
//! `id` back verbatim (in the assistant message's `tool_calls` and in the `tool` message's
//! `tool_call_id`), whereas many drop fields they do not know, so the signature rides in the
//! id: `<id>__thought__<signature>` (`THOUGHT_SIGNATURE_SEPARATOR`, the same convention
//! LiteLLM uses). On the way back the suffix is split off into `thoughtSignature`, and the part
//! before it is sent as the `functionCall` / `functionResponse` `id`. Signatures on text parts
//! (optional for Gemini) have no place in OpenAI's format and are dropped.
//!
//! # Response
//! Text parts → `content`, `thought: true` parts → `reasoning_content`, `functionCall` →
//! `tool_calls` (Gemini's `id` if it sent one, else `call_<response id>_<n>`, numbered in order
//! of appearance), `executableCode` / `codeExecutionResult` (code-execution tool) → fenced
//! blocks in `content`. In a stream each element is a whole `GenerateContentResponse`: text
//! and thoughts become deltas in part order, every tool call is one complete delta (id, type,
//! name, full arguments) with its own `index`, the first chunk of a choice carries
//! `role: assistant`, and a choice's `finishReason` becomes a final chunk of its own. Usage
//! chunks are the wrapper's job, never this pair's.
//!
//! `finishReason`: `STOP` → `stop` (`tool_calls` if the choice made tool calls), `MAX_TOKENS`
//! → `length`, `SAFETY` / `RECITATION` / `BLOCKLIST` / `PROHIBITED_CONTENT` / `SPII` /
//! `LANGUAGE` / `IMAGE_*` filters → `content_filter`; `MALFORMED_FUNCTION_CALL`,
//! `UNEXPECTED_TOOL_CALL`, `TOO_MANY_TOOL_CALLS` → a 502 error (`code` = the reason in lower
//! case): OpenAI has no finish reason for "the model tried to call a tool and failed", a
//! `stop` with no content would end an agent loop silently, and the SDKs retry a 502, which
//! is the useful remedy; `OTHER` and anything unknown → `stop`.
//!
//! Blocked prompts (`promptFeedback.blockReason`, no candidates) → every choice gets
//! `finish_reason: "content_filter"`, `content: null` and the reason in `refusal` (OpenAI's
//! field for "the model declined"; content stays `null` as in OpenAI's own filtered answers,
//! so nothing a client displays as model output is invented). A candidate stopped by a filter
//! before it produced anything gets the same treatment.
//!
//! # Usage
//! `input` = `promptTokenCount` (+ `toolUsePromptTokenCount`, prompt tokens of tool use, which
//! Gemini bills as input and counts in `totalTokenCount`); `output` = `candidatesTokenCount` +
//! `thoughtsTokenCount`; when `candidatesTokenCount` is absent (proto3 JSON omits zeros: early
//! stream elements, thought-only elements) but `totalTokenCount` and `promptTokenCount` are
//! present, `output` = total − input; otherwise unknown. `cached_read` =
//! `cachedContentTokenCount`, `reasoning` = `thoughtsTokenCount`. Absent `usageMetadata` leaves
//! everything unknown. Stream elements carry running totals: the last one wins.
//!
//! # Errors
//! Gemini's `{"error": {code, message, status, details}}` (also wrapped in an array, as the
//! array stream sends it) → OpenAI's error with only `message` kept (details may echo request
//! data, e.g. a rejected key): see `map_error` for the table. `retry_after` is the
//! provider's `retry-after` header, else `RetryInfo.retryDelay` rounded up.

use std::collections::HashMap;

use serde_json::{json, Value};

use super::gemini_wire as g;
use super::{Pair, ResponseMeta, StreamOut, Target, UpstreamRequest};
use crate::fault::{ApiError, Fault};
use crate::openai::{
    AssistantMessage, ChatChunk, ChatCompletion, ChatRequest, Choice, ChunkChoice, Content, ContentPart, Delta,
    FinishReason, FunctionCall, FunctionCallDelta, Role, ToolCall, ToolCallDelta, WireUsage,
};
use crate::usage::Usage;

/// Separates a tool call id from the Gemini thought signature it carries.
pub(crate) const THOUGHT_SIGNATURE_SEPARATOR: &str = "__thought__";

/// Unknown top-level request fields that are accepted and not sent: they are bookkeeping for
/// OpenAI (stored completions, cache routing, abuse tracking) and cannot change Gemini's answer.
pub(crate) const HARMLESS_EXTRA_FIELDS: &[&str] = &["metadata", "prompt_cache_key", "safety_identifier", "store"];

/// Gemini's limit on `candidateCount`.
pub(crate) const MAX_CANDIDATES: u64 = 8;

/// The OpenAI ↔ Gemini translator for one request.
#[derive(Debug, Clone)]
pub struct OpenAiGemini {
    meta: ResponseMeta,
    /// Choices asked for (`n`).
    n: u32,
    usage: Usage,
    /// Tool call ids generated so far.
    generated_ids: u32,
    /// Per-choice stream state, by choice index.
    choices: Vec<ChoiceState>,
    /// Stream elements seen.
    elements: u64,
}

#[derive(Debug, Clone, Default)]
struct ChoiceState {
    index: u32,
    /// `role: assistant` has been sent.
    started: bool,
    /// Tool calls sent (the next one's `index`).
    tool_calls: u32,
    /// Text, reasoning or a refusal has been sent.
    said_something: bool,
    finished: bool,
}

impl OpenAiGemini {
    /// A translator for one request; its OpenAI objects carry `meta`'s id, model and creation
    /// time.
    pub fn new(meta: ResponseMeta) -> Self {
        OpenAiGemini { meta, n: 1, usage: Usage::default(), generated_ids: 0, choices: Vec::new(), elements: 0 }
    }
}

// ---------------------------------------------------------------------------------------------
// request

/// The Gemini request body for `req`.
pub(crate) fn build_request(req: &ChatRequest, target: &Target) -> Result<g::GenerateContentRequest, ApiError> {
    refuse_unsupported(req)?;

    let (system, contents) = contents(req)?;
    let mut config = generation_config(req)?;
    if let Some(effort) = req.reasoning_effort.as_deref() {
        config.thinking_config = Some(thinking_config(effort, &target.upstream_model)?);
    }

    let mut declarations = Vec::new();
    for (i, tool) in req.tools.iter().flatten().enumerate() {
        if tool.kind != "function" {
            return Err(ApiError::unsupported(
                &format!("tools[{i}].type"),
                format!("tool type `{}` is not supported by the Gemini backend (only `function`)", tool.kind),
            ));
        }
        declarations.push(g::FunctionDeclaration {
            name: tool.function.name.clone(),
            description: tool.function.description.clone(),
            parameters: None,
            parameters_json_schema: tool.function.parameters.clone(),
        });
    }

    Ok(g::GenerateContentRequest {
        contents,
        system_instruction: (!system.is_empty()).then_some(g::Content { role: None, parts: system }),
        generation_config: (config != g::GenerationConfig::default()).then_some(config),
        tools: (!declarations.is_empty())
            .then(|| vec![g::Tool { function_declarations: Some(declarations) }]),
        tool_config: req.tool_choice.as_ref().map(tool_config).transpose()?,
        safety_settings: None,
        cached_content: None,
    })
}

fn refuse_unsupported(req: &ChatRequest) -> Result<(), ApiError> {
    if req.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
        return Err(ApiError::unsupported("logit_bias", "logit_bias is not supported by the Gemini backend"));
    }
    if req.logprobs == Some(true) {
        return Err(ApiError::unsupported("logprobs", "logprobs are not supported by the Gemini backend"));
    }
    if req.top_logprobs.is_some() {
        return Err(ApiError::unsupported("top_logprobs", "logprobs are not supported by the Gemini backend"));
    }
    if req.parallel_tool_calls == Some(false) {
        return Err(ApiError::unsupported(
            "parallel_tool_calls",
            "parallel_tool_calls: false is not supported by the Gemini backend (it cannot be limited to one tool call per turn)",
        ));
    }
    match req.n {
        Some(0) => return Err(ApiError::invalid(Some("n"), "n must be at least 1")),
        Some(n) if n > MAX_CANDIDATES => {
            return Err(ApiError::unsupported("n", format!("the Gemini backend returns at most {MAX_CANDIDATES} choices")))
        }
        _ => {}
    }
    for (key, value) in &req.extra {
        match key.as_str() {
            "top_k" => {}
            "modalities" => {
                let text_only = value
                    .as_array()
                    .is_some_and(|m| m.iter().all(|x| x.as_str() == Some("text")));
                if !text_only {
                    return Err(ApiError::unsupported("modalities", "the Gemini backend answers with text only"));
                }
            }
            k if HARMLESS_EXTRA_FIELDS.contains(&k) => {}
            k => {
                return Err(ApiError::unsupported(k, format!("`{k}` is not supported by the Gemini backend")));
            }
        }
    }
    Ok(())
}

fn generation_config(req: &ChatRequest) -> Result<g::GenerationConfig, ApiError> {
    let top_k = match req.extra.get("top_k") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .filter(|k| *k >= 1)
                .ok_or_else(|| ApiError::invalid(Some("top_k"), "top_k must be a positive integer"))?,
        ),
    };
    let mut config = g::GenerationConfig {
        stop_sequences: req.stop.as_ref().map(|s| s.to_vec()).filter(|s| !s.is_empty()),
        candidate_count: req.n.filter(|n| *n > 1).map(|n| n as u32),
        max_output_tokens: req.max_output_tokens(),
        temperature: req.temperature,
        top_p: req.top_p,
        top_k,
        seed: req.seed,
        presence_penalty: req.presence_penalty,
        frequency_penalty: req.frequency_penalty,
        ..g::GenerationConfig::default()
    };
    if let Some(format) = &req.response_format {
        match format.get("type").and_then(Value::as_str) {
            Some("text") => {}
            Some("json_object") => config.response_mime_type = Some("application/json".to_owned()),
            Some("json_schema") => {
                let schema = format.pointer("/json_schema/schema").ok_or_else(|| {
                    ApiError::invalid(Some("response_format.json_schema.schema"), "json_schema needs a `schema`")
                })?;
                config.response_mime_type = Some("application/json".to_owned());
                config.response_json_schema = Some(schema.clone());
            }
            _ => {
                return Err(ApiError::unsupported(
                    "response_format",
                    "response_format must be text, json_object or json_schema",
                ))
            }
        }
    }
    Ok(config)
}

/// `reasoning_effort` → `thinkingConfig`, by model generation (a Gemini 1.x/2.x model name
/// gets a budget, anything else — Gemini 3 and later, `*-latest` aliases — a level; the API
/// refuses both together):
///
/// | effort    | `thinkingBudget` (2.x) | `thinkingLevel` (3+) |
/// |-----------|------------------------|----------------------|
/// | `none`    | 0 (thinking off)       | `minimal` (Gemini 3 cannot switch thinking off) |
/// | `minimal` | 512                    | `minimal`            |
/// | `low`     | 1024                   | `low`                |
/// | `medium`  | 8192                   | `medium`             |
/// | `high`    | 24576 (2.5 Flash's max)| `high`               |
///
/// `includeThoughts` is set (thought summaries come back as `reasoning_content`) unless the
/// effort is `none`. Other values (e.g. `xhigh`) are a 400: Gemini has nothing above `high`.
/// A model that does not support the value chosen (e.g. `minimal` on Gemini 3 Pro, a zero
/// budget on 2.5 Pro) answers with its own 400, passed on.
pub(crate) fn thinking_config(effort: &str, upstream_model: &str) -> Result<g::ThinkingConfig, ApiError> {
    let (budget, level) = match effort {
        "none" => (0, "minimal"),
        "minimal" => (512, "minimal"),
        "low" => (1024, "low"),
        "medium" => (8192, "medium"),
        "high" => (24576, "high"),
        other => {
            return Err(ApiError::unsupported(
                "reasoning_effort",
                format!("reasoning_effort `{other}` is not supported by the Gemini backend (none, minimal, low, medium, high)"),
            ))
        }
    };
    let include_thoughts = Some(effort != "none");
    let model = upstream_model.rsplit('/').next().unwrap_or(upstream_model).to_ascii_lowercase();
    Ok(if model.starts_with("gemini-1") || model.starts_with("gemini-2") {
        g::ThinkingConfig { include_thoughts, thinking_budget: Some(budget), thinking_level: None }
    } else {
        g::ThinkingConfig { include_thoughts, thinking_budget: None, thinking_level: Some(level.to_owned()) }
    })
}

fn tool_config(choice: &Value) -> Result<g::ToolConfig, ApiError> {
    let config = |mode: &str, names: Option<Vec<String>>| g::ToolConfig {
        function_calling_config: g::FunctionCallingConfig { mode: mode.to_owned(), allowed_function_names: names },
    };
    match choice {
        Value::String(s) if s == "auto" => Ok(config("AUTO", None)),
        Value::String(s) if s == "none" => Ok(config("NONE", None)),
        Value::String(s) if s == "required" => Ok(config("ANY", None)),
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => {
            match o.get("function").and_then(|f| f.get("name")).and_then(Value::as_str) {
                Some(name) => Ok(config("ANY", Some(vec![name.to_owned()]))),
                None => Err(ApiError::invalid(Some("tool_choice.function.name"), "tool_choice names no function")),
            }
        }
        _ => Err(ApiError::unsupported(
            "tool_choice",
            "tool_choice must be auto, none, required or a named function for the Gemini backend",
        )),
    }
}

/// `systemInstruction` parts and `contents`.
fn contents(req: &ChatRequest) -> Result<(Vec<g::Part>, Vec<g::Content>), ApiError> {
    let mut system = Vec::new();
    let mut contents: Vec<g::Content> = Vec::new();
    // Function names by tool call id (without signature), from the assistant turns so far.
    let mut names: HashMap<String, String> = HashMap::new();
    // The last content is a turn of tool results (the next result joins it).
    let mut in_results = false;

    for (i, m) in req.messages.iter().enumerate() {
        match m.role {
            Role::System | Role::Developer => {
                let text = match &m.content {
                    None => String::new(),
                    Some(c) => c.text_only().ok_or_else(|| {
                        ApiError::unsupported(
                            &format!("messages[{i}].content"),
                            "system and developer messages may only contain text for the Gemini backend",
                        )
                    })?,
                };
                // A system message is not a turn: results around it still form one turn.
                system.push(g::Part::text(text));
            }
            Role::User => {
                let content = m.content.as_ref().ok_or_else(|| {
                    ApiError::invalid(Some(&format!("messages[{i}].content")), "a user message needs content")
                })?;
                contents.push(g::Content { role: Some("user".to_owned()), parts: user_parts(content, i)? });
                in_results = false;
            }
            Role::Assistant => {
                let parts = assistant_parts(m, i, &mut names)?;
                // An empty assistant message is not sent, so it does not end a turn either.
                if !parts.is_empty() {
                    contents.push(g::Content { role: Some("model".to_owned()), parts });
                    in_results = false;
                }
            }
            Role::Tool => {
                let part = tool_result_part(m, i, &names)?;
                match contents.last_mut() {
                    Some(turn) if in_results => turn.parts.push(part),
                    _ => contents.push(g::Content { role: Some("user".to_owned()), parts: vec![part] }),
                }
                in_results = true;
            }
            Role::Function => {
                return Err(ApiError::unsupported(
                    &format!("messages[{i}].role"),
                    "the legacy `function` role is not supported by the Gemini backend; use `tool`",
                ))
            }
        }
    }
    Ok((system, contents))
}

fn user_parts(content: &Content, i: usize) -> Result<Vec<g::Part>, ApiError> {
    let parts = match content {
        Content::Text(s) => return Ok(vec![g::Part::text(s.clone())]),
        Content::Parts(parts) => parts,
    };
    let mut out = Vec::with_capacity(parts.len());
    for (j, part) in parts.iter().enumerate() {
        let param = format!("messages[{i}].content[{j}]");
        out.push(match part {
            ContentPart::Text { text } => g::Part::text(text.clone()),
            ContentPart::ImageUrl { image_url } => media_part(&image_url.url, &format!("{param}.image_url.url"))?,
            ContentPart::InputAudio { input_audio } => {
                let data = input_audio.get("data").and_then(Value::as_str);
                let mime = match input_audio.get("format").and_then(Value::as_str) {
                    Some("wav") => Some("audio/wav"),
                    Some("mp3") => Some("audio/mp3"),
                    _ => None,
                };
                match (data, mime) {
                    (Some(data), Some(mime)) => g::Part {
                        inline_data: Some(g::Blob { mime_type: mime.to_owned(), data: data.to_owned() }),
                        ..g::Part::default()
                    },
                    _ => {
                        return Err(ApiError::invalid(
                            Some(&format!("{param}.input_audio")),
                            "input_audio needs base64 `data` and a `format` of wav or mp3",
                        ))
                    }
                }
            }
            ContentPart::File { file } => match file.get("file_data").and_then(Value::as_str) {
                Some(url) if url.starts_with("data:") => media_part(url, &format!("{param}.file.file_data"))?,
                _ => {
                    return Err(ApiError::unsupported(
                        &format!("{param}.file"),
                        "the Gemini backend takes files as `file_data` data URLs only (OpenAI file ids mean nothing to Gemini)",
                    ))
                }
            },
        });
    }
    Ok(out)
}

/// An image or file by data URL (→ `inlineData`) or by URL (→ `fileData`).
fn media_part(url: &str, param: &str) -> Result<g::Part, ApiError> {
    if let Some(rest) = url.strip_prefix("data:") {
        let (meta, data) = rest
            .split_once(',')
            .ok_or_else(|| ApiError::invalid(Some(param), "malformed data: URL (no comma)"))?;
        let mut fields = meta.split(';');
        let mime = fields.next().unwrap_or("").trim();
        if mime.is_empty() {
            return Err(ApiError::invalid(Some(param), "data: URL without a media type"));
        }
        if !fields.any(|f| f.trim().eq_ignore_ascii_case("base64")) {
            return Err(ApiError::unsupported(param, "only base64 data: URLs are supported by the Gemini backend"));
        }
        return Ok(g::Part {
            inline_data: Some(g::Blob { mime_type: mime.to_ascii_lowercase(), data: data.to_owned() }),
            ..g::Part::default()
        });
    }
    let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    if lower.starts_with("https://") || lower.starts_with("http://") || lower.starts_with("gs://") {
        return Ok(g::Part {
            file_data: Some(g::FileData { mime_type: guess_mime(url).map(str::to_owned), file_uri: url.to_owned() }),
            ..g::Part::default()
        });
    }
    Err(ApiError::invalid(Some(param), "expected a base64 data: URL or an http(s):// or gs:// URL"))
}

/// The media type a URL's file extension names, for the types Gemini reads as images/documents.
fn guess_mime(url: &str) -> Option<&'static str> {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    let name = path.rsplit('/').next().unwrap_or(path);
    let (_, ext) = name.rsplit_once('.')?;
    Some(match ext.to_ascii_lowercase().as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "heic" => "image/heic",
        "heif" => "image/heif",
        "pdf" => "application/pdf",
        _ => return None,
    })
}

/// `(id, thought signature)` of a tool call id written by [`OpenAiGemini`].
pub(crate) fn split_tool_call_id(id: &str) -> (&str, Option<&str>) {
    match id.split_once(THOUGHT_SIGNATURE_SEPARATOR) {
        Some((base, sig)) if !sig.is_empty() => (base, Some(sig)),
        Some((base, _)) => (base, None),
        None => (id, None),
    }
}

fn assistant_parts(
    m: &crate::openai::Message,
    i: usize,
    names: &mut HashMap<String, String>,
) -> Result<Vec<g::Part>, ApiError> {
    let mut parts = Vec::new();
    let text = match &m.content {
        None => None,
        Some(c) => Some(c.text_only().ok_or_else(|| {
            ApiError::unsupported(
                &format!("messages[{i}].content"),
                "assistant messages may only contain text for the Gemini backend",
            )
        })?),
    };
    // A refusal in the history is what the model said.
    if let Some(text) = text.filter(|t| !t.is_empty()).or_else(|| m.refusal.clone().filter(|t| !t.is_empty())) {
        parts.push(g::Part::text(text));
    }
    for (j, call) in m.tool_calls.iter().flatten().enumerate() {
        let param = format!("messages[{i}].tool_calls[{j}]");
        if call.kind != "function" {
            return Err(ApiError::unsupported(
                &format!("{param}.type"),
                format!("tool call type `{}` is not supported by the Gemini backend", call.kind),
            ));
        }
        let args = super::tool_arguments(&call.function.arguments, &param)?;
        let (id, signature) = split_tool_call_id(&call.id);
        names.insert(id.to_owned(), call.function.name.clone());
        parts.push(g::Part {
            function_call: Some(g::FunctionCall {
                id: (!id.is_empty()).then(|| id.to_owned()),
                name: call.function.name.clone(),
                args: Some(args),
            }),
            thought_signature: signature.map(str::to_owned),
            ..g::Part::default()
        });
    }
    Ok(parts)
}

fn tool_result_part(
    m: &crate::openai::Message,
    i: usize,
    names: &HashMap<String, String>,
) -> Result<g::Part, ApiError> {
    let call_id = m.tool_call_id.as_deref().ok_or_else(|| {
        ApiError::invalid(Some(&format!("messages[{i}].tool_call_id")), "a tool message needs tool_call_id")
    })?;
    let (id, _) = split_tool_call_id(call_id);
    let name = names.get(id).cloned().or_else(|| m.name.clone()).ok_or_else(|| {
        ApiError::invalid(
            Some(&format!("messages[{i}].tool_call_id")),
            format!("no earlier assistant tool call has the id `{id}`"),
        )
    })?;
    let text = match &m.content {
        None => String::new(),
        Some(c) => c.text_only().ok_or_else(|| {
            ApiError::unsupported(
                &format!("messages[{i}].content"),
                "tool results may only contain text for the Gemini backend",
            )
        })?,
    };
    let response = match serde_json::from_str::<Value>(&text) {
        Ok(v @ Value::Object(_)) => v,
        Ok(v) => json!({ "output": v }),
        Err(_) => json!({ "output": text }),
    };
    Ok(g::Part {
        function_response: Some(g::FunctionResponse {
            id: (!id.is_empty()).then(|| id.to_owned()),
            name,
            response,
        }),
        ..g::Part::default()
    })
}

/// The request path for `model` (a bare name, `models/…` or `tunedModels/…`).
fn model_path(model: &str, stream: bool) -> Result<String, ApiError> {
    let resource = if model.starts_with("models/") || model.starts_with("tunedModels/") {
        model.to_owned()
    } else {
        format!("models/{model}")
    };
    let name = resource.split_once('/').map(|(_, n)| n).unwrap_or("");
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)) {
        return Err(ApiError {
            fault: Fault::Gateway,
            status: 500,
            kind: "server_error",
            code: Some("invalid_upstream_model".to_owned()),
            param: None,
            message: format!("the configured Gemini model `{model}` is not a valid model name"),
            retry_after: None,
        });
    }
    Ok(if stream {
        format!("/v1beta/{resource}:streamGenerateContent?alt=sse")
    } else {
        format!("/v1beta/{resource}:generateContent")
    })
}

// ---------------------------------------------------------------------------------------------
// response

/// The normalised usage of one `usageMetadata` (see the module docs for the rules).
pub(crate) fn usage_from(u: &g::UsageMetadata) -> Usage {
    let input = u.prompt_token_count.map(|p| p.saturating_add(u.tool_use_prompt_token_count.unwrap_or(0)));
    let output = match (u.candidates_token_count, u.total_token_count, input) {
        (Some(c), _, _) => Some(c.saturating_add(u.thoughts_token_count.unwrap_or(0))),
        (None, Some(total), Some(input)) => Some(total.saturating_sub(input)),
        _ => None,
    };
    Usage { input, output, cached_read: u.cached_content_token_count, cache_write: None, reasoning: u.thoughts_token_count }
}

/// What a candidate's parts say, in order, consecutive text of one kind joined.
enum Segment {
    Reasoning(String),
    Text(String),
    Call(ToolCall),
}

impl OpenAiGemini {
    fn segments(&mut self, candidate: &g::Candidate) -> Vec<Segment> {
        let mut out: Vec<Segment> = Vec::new();
        let parts = candidate.content.as_ref().map(|c| c.parts.as_slice()).unwrap_or(&[]);
        for part in parts {
            if let Some(call) = &part.function_call {
                let call = self.tool_call(call, part.thought_signature.as_deref());
                out.push(Segment::Call(call));
                continue;
            }
            let (text, thought) = if let Some(text) = &part.text {
                (text.clone(), part.is_thought())
            } else if let Some(code) = &part.executable_code {
                let lang = code.language.as_deref().unwrap_or("").to_ascii_lowercase();
                let lang = if lang == "language_unspecified" { "" } else { lang.as_str() };
                (format!("\n```{lang}\n{}\n```\n", code.code), false)
            } else if let Some(result) = &part.code_execution_result {
                match result.output.as_deref().filter(|o| !o.is_empty()) {
                    Some(output) => (format!("\n```\n{}\n```\n", output.trim_end_matches('\n')), false),
                    None => continue,
                }
            } else {
                // inlineData / fileData in an answer: only with response modalities Tollgate
                // never asks for.
                continue;
            };
            if text.is_empty() {
                continue;
            }
            match (out.last_mut(), thought) {
                (Some(Segment::Reasoning(r)), true) => r.push_str(&text),
                (Some(Segment::Text(t)), false) => t.push_str(&text),
                (_, true) => out.push(Segment::Reasoning(text)),
                (_, false) => out.push(Segment::Text(text)),
            }
        }
        out
    }

    fn tool_call(&mut self, call: &g::FunctionCall, signature: Option<&str>) -> ToolCall {
        let mut id = match call.id.as_deref().filter(|id| !id.is_empty()) {
            Some(id) => id.to_owned(),
            None => {
                let tail = self.meta.id.strip_prefix("chatcmpl-").unwrap_or(&self.meta.id);
                let n = self.generated_ids;
                self.generated_ids = self.generated_ids.saturating_add(1);
                if tail.is_empty() {
                    format!("call_{n}")
                } else {
                    format!("call_{tail}_{n}")
                }
            }
        };
        if let Some(sig) = signature.filter(|s| !s.is_empty()) {
            id.push_str(THOUGHT_SIGNATURE_SEPARATOR);
            id.push_str(sig);
        }
        let arguments = match &call.args {
            None | Some(Value::Null) => "{}".to_owned(),
            Some(args) => serde_json::to_string(args).unwrap_or_else(|_| "{}".to_owned()),
        };
        ToolCall { id, kind: "function".to_owned(), function: FunctionCall { name: call.name.clone(), arguments } }
    }
}

/// A candidate's finish reason in OpenAI's terms; `Err` for a failed tool call.
fn finish_reason(candidate: &g::Candidate, made_calls: bool) -> Result<Option<FinishReason>, ApiError> {
    let Some(reason) = candidate.finish_reason.as_deref() else { return Ok(None) };
    let done = if made_calls { FinishReason::ToolCalls } else { FinishReason::Stop };
    Ok(Some(match reason {
        "STOP" => done,
        "MAX_TOKENS" => FinishReason::Length,
        "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" | "LANGUAGE" | "IMAGE_SAFETY"
        | "IMAGE_PROHIBITED_CONTENT" | "IMAGE_RECITATION" => FinishReason::ContentFilter,
        "MALFORMED_FUNCTION_CALL" | "UNEXPECTED_TOOL_CALL" | "TOO_MANY_TOOL_CALLS" => {
            let detail = candidate.finish_message.as_deref().map(|m| format!(": {m}")).unwrap_or_default();
            return Err(ApiError {
                fault: Fault::Provider,
                status: 502,
                kind: "server_error",
                code: Some(reason.to_ascii_lowercase()),
                param: None,
                message: format!("Gemini failed to produce a valid tool call (finishReason {reason}){detail}"),
                retry_after: None,
            });
        }
        _ => done,
    }))
}

/// Ratings that explain a block: those marked blocked, else those rated MEDIUM or HIGH.
fn flagged(ratings: &[g::SafetyRating]) -> String {
    let pick = |r: &&g::SafetyRating| {
        r.blocked == Some(true) || matches!(r.probability.as_deref(), Some("HIGH" | "MEDIUM"))
    };
    let list: Vec<String> = ratings
        .iter()
        .filter(pick)
        .map(|r| {
            format!(
                "{} ({})",
                r.category.as_deref().unwrap_or("unknown category"),
                r.probability.as_deref().unwrap_or("blocked")
            )
        })
        .collect();
    if list.is_empty() {
        String::new()
    } else {
        format!(": {}", list.join(", "))
    }
}

/// The refusal text for a blocked prompt, if the prompt was blocked.
fn prompt_blocked(r: &g::GenerateContentResponse) -> Option<String> {
    let feedback = r.prompt_feedback.as_ref()?;
    let reason = feedback.block_reason.as_deref()?;
    let detail = match feedback.block_reason_message.as_deref() {
        Some(m) if !m.is_empty() => format!(": {m}"),
        _ => flagged(&feedback.safety_ratings),
    };
    Some(format!("Gemini blocked the prompt (blockReason {reason}){detail}"))
}

/// The refusal text for a candidate stopped by a filter before it said anything.
fn candidate_blocked(c: &g::Candidate) -> String {
    let reason = c.finish_reason.as_deref().unwrap_or("unknown");
    let detail = match c.finish_message.as_deref() {
        Some(m) if !m.is_empty() => format!(": {m}"),
        _ => flagged(&c.safety_ratings),
    };
    format!("Gemini stopped the response (finishReason {reason}){detail}")
}

/// Whether `data` is a JSON object (serde would also read a struct from an array).
fn is_object(data: &[u8]) -> bool {
    data.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
}

fn parse_element(data: &[u8]) -> Result<g::GenerateContentResponse, ApiError> {
    if !is_object(data) {
        return Err(ApiError::bad_upstream("Gemini sent a response that is not a JSON object"));
    }
    serde_json::from_slice(data)
        .map_err(|e| ApiError::bad_upstream(format!("Gemini sent a response that cannot be read: {e}")))
}

// ---------------------------------------------------------------------------------------------
// errors

/// A Gemini error in OpenAI's terms. `http_status` is the response status (`None` for an error
/// inside a stream, where the body's `code` is used); `retry_after` the provider's header.
///
/// | Gemini                                              | status | `type`                  | `code`                          |
/// |-----------------------------------------------------|--------|-------------------------|---------------------------------|
/// | `API_KEY_INVALID`, `UNAUTHENTICATED` (401)          | 502    | `server_error`          | `upstream_authentication_failed`|
/// | `INVALID_ARGUMENT`, `FAILED_PRECONDITION`, `OUT_OF_RANGE` (400) | 400 | `invalid_request_error` | the status in lower case |
/// | `PERMISSION_DENIED` (403)                           | 403    | `invalid_request_error` | `permission_denied`             |
/// | `NOT_FOUND` (404)                                   | 404    | `invalid_request_error` | `model_not_found` / `not_found` |
/// | `RESOURCE_EXHAUSTED` (429)                          | 429    | `rate_limit_error`      | `rate_limit_exceeded`           |
/// | `INTERNAL`, `UNKNOWN`, `DATA_LOSS` (500)            | 500    | `server_error`          | the status in lower case        |
/// | `UNAVAILABLE` (503)                                 | 503    | `server_error`          | `service_unavailable`           |
/// | `DEADLINE_EXCEEDED` (504)                           | 504    | `server_error`          | `timeout`                       |
/// | anything else                                       | as sent (502 if not an error status) | by status class | the status in lower case |
///
/// An invalid key is the gateway's key, not the client's: a 401 would tell the client its own
/// credentials were refused, so it is reported as a 502 with a message that says whose.
pub(crate) fn map_error(http_status: Option<u16>, retry_after: Option<u64>, body: Option<&g::ErrorBody>) -> ApiError {
    let http = http_status
        .filter(|s| (400..=599).contains(s))
        .or_else(|| body.and_then(|b| b.code).and_then(|c| u16::try_from(c).ok()).filter(|s| (400..=599).contains(s)))
        .unwrap_or(502);
    let name = body
        .and_then(|b| b.status.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| canonical_name(http).to_owned());
    let reason = body.and_then(|b| {
        b.details_of("google.rpc.ErrorInfo").find_map(|d| d.get("reason").and_then(Value::as_str).map(str::to_owned))
    });
    let message = body
        .and_then(|b| b.message.clone())
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| format!("Gemini answered HTTP {http} ({name})"));
    let retry_after = retry_after.or_else(|| {
        body.and_then(|b| {
            b.details_of("google.rpc.RetryInfo")
                .find_map(|d| d.get("retryDelay").and_then(Value::as_str).and_then(parse_duration))
        })
    });
    let lower = name.to_ascii_lowercase();

    let auth = reason.as_deref().is_some_and(|r| r.starts_with("API_KEY_")) || name == "UNAUTHENTICATED" || http == 401;
    let (status, kind, code, message) = if auth {
        (502, "server_error", "upstream_authentication_failed".to_owned(), format!("Gemini rejected the gateway's credentials: {message}"))
    } else {
        match name.as_str() {
            "RESOURCE_EXHAUSTED" => (429, "rate_limit_error", "rate_limit_exceeded".to_owned(), message),
            "INVALID_ARGUMENT" | "FAILED_PRECONDITION" | "OUT_OF_RANGE" => (400, "invalid_request_error", lower, message),
            "PERMISSION_DENIED" => (403, "invalid_request_error", "permission_denied".to_owned(), message),
            "NOT_FOUND" => {
                let code = if message.contains("models/") { "model_not_found" } else { "not_found" };
                (404, "invalid_request_error", code.to_owned(), message)
            }
            "UNAVAILABLE" => (503, "server_error", "service_unavailable".to_owned(), message),
            "DEADLINE_EXCEEDED" => (504, "server_error", "timeout".to_owned(), message),
            "INTERNAL" | "UNKNOWN" | "DATA_LOSS" => {
                (if http >= 500 { http } else { 500 }, "server_error", lower, message)
            }
            _ if http == 429 => (429, "rate_limit_error", "rate_limit_exceeded".to_owned(), message),
            _ if http >= 500 => (http, "server_error", lower, message),
            _ => (http, "invalid_request_error", lower, message),
        }
    };
    ApiError { fault: Fault::Provider, status, kind, code: Some(code), param: None, message, retry_after }
}

/// google.rpc.Code names by HTTP status (their documented mapping), for bodies without one.
fn canonical_name(http: u16) -> &'static str {
    match http {
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        409 => "ABORTED",
        429 => "RESOURCE_EXHAUSTED",
        499 => "CANCELLED",
        500 => "INTERNAL",
        501 => "UNIMPLEMENTED",
        503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        s if s >= 500 => "UPSTREAM_ERROR",
        _ => "UPSTREAM_ERROR",
    }
}

/// A protobuf `Duration` in its JSON form (`"34.4s"`), rounded up to whole seconds.
fn parse_duration(s: &str) -> Option<u64> {
    let secs: f64 = s.trim().strip_suffix('s')?.parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| secs.ceil() as u64)
}

/// The error object of a Gemini error body: `{"error": …}` or `[{"error": …}]`.
fn error_body(body: &[u8]) -> Option<g::ErrorBody> {
    if is_object(body) {
        return serde_json::from_slice::<g::ErrorEnvelope>(body).ok().map(|e| e.error);
    }
    let first = serde_json::from_slice::<Vec<Value>>(body).ok()?.into_iter().next()?;
    match first {
        Value::Object(_) => serde_json::from_value::<g::ErrorEnvelope>(first).ok().map(|e| e.error),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// the pair

impl OpenAiGemini {
    fn chunk(&self, index: u32, delta: Delta, finish_reason: Option<FinishReason>) -> StreamOut {
        StreamOut::Chunk(ChatChunk {
            id: self.meta.id.clone(),
            object: "chat.completion.chunk".to_owned(),
            created: self.meta.created,
            model: self.meta.model.clone(),
            choices: vec![ChunkChoice { index, delta, finish_reason, ..ChunkChoice::default() }],
            ..ChatChunk::default()
        })
    }

    /// The state slot of choice `index`, added on first sight.
    fn slot(&mut self, index: u32) -> Result<usize, ApiError> {
        if let Some(i) = self.choices.iter().position(|c| c.index == index) {
            return Ok(i);
        }
        if index as u64 >= MAX_CANDIDATES.max(self.n as u64) {
            return Err(ApiError::bad_upstream(format!("Gemini sent candidate index {index}")));
        }
        self.choices.push(ChoiceState { index, ..ChoiceState::default() });
        Ok(self.choices.len() - 1)
    }

    /// Sends `delta` (with `role` if it is the choice's first) and/or a finish reason.
    fn emit(&mut self, slot: usize, mut delta: Delta, finish: Option<FinishReason>, out: &mut Vec<StreamOut>) {
        let state = &mut self.choices[slot];
        if !state.started {
            delta.role = Some(Role::Assistant);
            state.started = true;
        }
        if delta.content.is_some() || delta.reasoning_content.is_some() || delta.refusal.is_some() {
            state.said_something = true;
        }
        if finish.is_some() {
            state.finished = true;
        }
        let index = state.index;
        out.push(self.chunk(index, delta, finish));
    }

    /// A choice ends as filtered, with `message` as its refusal if it said nothing yet.
    fn emit_filtered(&mut self, slot: usize, message: String, out: &mut Vec<StreamOut>) {
        if !self.choices[slot].said_something && self.choices[slot].tool_calls == 0 {
            self.emit(slot, Delta { refusal: Some(message), ..Delta::default() }, None, out);
        }
        self.emit(slot, Delta::default(), Some(FinishReason::ContentFilter), out);
    }
}

impl Pair for OpenAiGemini {
    fn request(&mut self, req: &ChatRequest, target: &Target) -> Result<UpstreamRequest, ApiError> {
        let body = build_request(req, target)?;
        let stream = req.is_stream();
        let path = model_path(&target.upstream_model, stream)?;
        self.n = req.n.unwrap_or(1).clamp(1, MAX_CANDIDATES) as u32;
        let body = crate::openai::encode_sized(&body, req.wire_len.translated()).map_err(|e| ApiError {
            fault: Fault::Gateway,
            status: 500,
            kind: "server_error",
            code: None,
            param: None,
            message: format!("cannot encode the Gemini request: {e}"),
            retry_after: None,
        })?;
        Ok(UpstreamRequest { path, headers: vec![("content-type", "application/json".to_owned())], body, stream })
    }

    fn response(&mut self, body: &[u8]) -> Result<ChatCompletion, ApiError> {
        let r = parse_element(body)?;
        if let Some(error) = &r.error {
            return Err(map_error(None, None, Some(error)));
        }
        if let Some(u) = &r.usage_metadata {
            self.usage = usage_from(u);
        }
        let mut choices = Vec::new();
        if r.candidates.is_empty() {
            let Some(message) = prompt_blocked(&r) else {
                return Err(ApiError::bad_upstream("Gemini answered without candidates"));
            };
            for index in 0..self.n {
                choices.push(Choice {
                    index,
                    message: AssistantMessage { role: Role::Assistant, refusal: Some(message.clone()), ..AssistantMessage::default() },
                    finish_reason: Some(FinishReason::ContentFilter),
                    ..Choice::default()
                });
            }
        }
        for (position, candidate) in r.candidates.iter().enumerate() {
            let mut content: Option<String> = None;
            let mut reasoning: Option<String> = None;
            let mut calls = Vec::new();
            for segment in self.segments(candidate) {
                match segment {
                    Segment::Text(t) => content.get_or_insert_with(String::new).push_str(&t),
                    Segment::Reasoning(t) => reasoning.get_or_insert_with(String::new).push_str(&t),
                    Segment::Call(c) => calls.push(c),
                }
            }
            let finish = finish_reason(candidate, !calls.is_empty())?;
            let refusal = (finish == Some(FinishReason::ContentFilter) && content.is_none() && calls.is_empty())
                .then(|| candidate_blocked(candidate));
            choices.push(Choice {
                index: candidate.index.unwrap_or(position as u32),
                message: AssistantMessage {
                    role: Role::Assistant,
                    content,
                    tool_calls: (!calls.is_empty()).then_some(calls),
                    reasoning_content: reasoning,
                    refusal,
                    ..AssistantMessage::default()
                },
                finish_reason: finish,
                ..Choice::default()
            });
        }
        choices.sort_by_key(|c| c.index);
        Ok(ChatCompletion {
            id: self.meta.id.clone(),
            object: "chat.completion".to_owned(),
            created: self.meta.created,
            model: self.meta.model.clone(),
            choices,
            usage: WireUsage::known(&self.usage),
            ..ChatCompletion::default()
        })
    }

    fn error(&mut self, status: u16, retry_after: Option<u64>, body: &[u8]) -> ApiError {
        match error_body(body) {
            Some(e) => map_error(Some(status), retry_after, Some(&e)),
            None => {
                let mut e = map_error(Some(status), retry_after, None);
                e.message = format!("Gemini answered HTTP {status} with a body that is not a Gemini error");
                e
            }
        }
    }

    fn event(&mut self, _event: Option<&str>, data: &str, out: &mut Vec<StreamOut>) -> Result<(), ApiError> {
        if data.trim().is_empty() {
            return Ok(());
        }
        let r = parse_element(data.as_bytes())?;
        if let Some(error) = &r.error {
            return Err(map_error(None, None, Some(error)));
        }
        self.elements += 1;
        if let Some(u) = &r.usage_metadata {
            self.usage.merge(usage_from(u));
        }
        if r.candidates.is_empty() {
            if let Some(message) = prompt_blocked(&r) {
                for index in 0..self.n {
                    let slot = self.slot(index)?;
                    if !self.choices[slot].finished {
                        self.emit_filtered(slot, message.clone(), out);
                    }
                }
            }
            return Ok(());
        }
        for (position, candidate) in r.candidates.iter().enumerate() {
            let slot = self.slot(candidate.index.unwrap_or(position as u32))?;
            if self.choices[slot].finished {
                continue;
            }
            for segment in self.segments(candidate) {
                let delta = match segment {
                    Segment::Text(t) => Delta { content: Some(t), ..Delta::default() },
                    Segment::Reasoning(t) => Delta { reasoning_content: Some(t), ..Delta::default() },
                    Segment::Call(call) => {
                        let index = self.choices[slot].tool_calls;
                        self.choices[slot].tool_calls = index.saturating_add(1);
                        Delta {
                            tool_calls: Some(vec![ToolCallDelta {
                                index,
                                id: Some(call.id),
                                kind: Some(call.kind),
                                function: Some(FunctionCallDelta {
                                    name: Some(call.function.name),
                                    arguments: Some(call.function.arguments),
                                }),
                            }]),
                            ..Delta::default()
                        }
                    }
                };
                self.emit(slot, delta, None, out);
            }
            match finish_reason(candidate, self.choices[slot].tool_calls > 0)? {
                Some(FinishReason::ContentFilter) => self.emit_filtered(slot, candidate_blocked(candidate), out),
                Some(finish) => self.emit(slot, Delta::default(), Some(finish), out),
                None => {}
            }
        }
        Ok(())
    }

    fn end(&mut self, out: &mut Vec<StreamOut>) -> Result<(), ApiError> {
        if self.elements == 0 {
            return Err(ApiError::bad_upstream("the Gemini stream ended without a response"));
        }
        // Gemini ends every stream with a finishReason; if one is missing the answer is still
        // complete (the stream ended cleanly), so the choice is closed as a normal stop.
        for slot in 0..self.choices.len() {
            let state = &self.choices[slot];
            if state.started && !state.finished {
                let finish = if state.tool_calls > 0 { FinishReason::ToolCalls } else { FinishReason::Stop };
                self.emit(slot, Delta::default(), Some(finish), out);
            }
        }
        Ok(())
    }

    fn usage(&self) -> Usage {
        self.usage
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use proptest::prelude::*;
    use serde_json::json;

    use super::*;
    use crate::json_array::JsonArrayDecoder;
    use crate::openai::ChatRequest;
    use crate::sse::{SseDecoder, SseEvent};
    use crate::translate::ProviderKind;

    fn meta() -> ResponseMeta {
        ResponseMeta { id: "chatcmpl-abc".to_owned(), model: "my-gemini".to_owned(), created: 1_700_000_000 }
    }

    fn target(model: &str) -> Target {
        Target { kind: ProviderKind::Gemini, upstream_model: model.to_owned(), default_max_tokens: None }
    }

    fn chat(v: Value) -> ChatRequest {
        serde_json::from_value(v).expect("test request parses")
    }

    fn user(text: &str) -> Value {
        json!({"role": "user", "content": text})
    }

    /// The Gemini request body as JSON, for `req` sent to `model`.
    fn body_for(req: Value, model: &str) -> Value {
        let up = OpenAiGemini::new(meta()).request(&chat(req), &target(model)).expect("request translates");
        serde_json::from_slice(&up.body).unwrap()
    }

    fn body(req: Value) -> Value {
        body_for(req, "gemini-2.5-flash")
    }

    fn refused(req: Value) -> ApiError {
        OpenAiGemini::new(meta()).request(&chat(req), &target("gemini-2.5-flash")).expect_err("request is refused")
    }

    // ---- request ----

    #[test]
    fn request_goes_to_generate_content_or_the_sse_stream_without_a_key() {
        let mut pair = OpenAiGemini::new(meta());
        let up = pair.request(&chat(json!({"model": "m", "messages": [user("hi")]})), &target("gemini-2.5-flash")).unwrap();
        assert_eq!(up.path, "/v1beta/models/gemini-2.5-flash:generateContent");
        assert!(!up.stream);
        assert_eq!(up.headers, vec![("content-type", "application/json".to_owned())]);
        let up = pair
            .request(&chat(json!({"model": "m", "stream": true, "messages": [user("hi")]})), &target("models/gemini-3-pro-preview"))
            .unwrap();
        assert_eq!(up.path, "/v1beta/models/gemini-3-pro-preview:streamGenerateContent?alt=sse");
        assert!(up.stream);
        assert_eq!(
            serde_json::from_slice::<Value>(&up.body).unwrap(),
            json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]})
        );
    }

    #[test]
    fn an_upstream_model_that_is_not_a_model_name_is_a_gateway_error() {
        for bad in ["", "gemini/../x", "a b", "m?alt=json", "models/"] {
            let e = OpenAiGemini::new(meta())
                .request(&chat(json!({"model": "m", "messages": [user("hi")]})), &target(bad))
                .unwrap_err();
            assert_eq!((e.fault, e.status), (Fault::Gateway, 500), "{bad:?}");
        }
    }

    #[test]
    fn system_and_developer_messages_anywhere_become_the_system_instruction_in_order() {
        let b = body(json!({"model": "m", "messages": [
            {"role": "system", "content": "one"},
            user("hi"),
            {"role": "developer", "content": [{"type": "text", "text": "two"}]},
            {"role": "assistant", "content": "hello"},
            {"role": "system", "content": "three"},
            user("bye"),
        ]}));
        assert_eq!(b["systemInstruction"], json!({"parts": [{"text": "one"}, {"text": "two"}, {"text": "three"}]}));
        assert_eq!(
            b["contents"],
            json!([
                {"role": "user", "parts": [{"text": "hi"}]},
                {"role": "model", "parts": [{"text": "hello"}]},
                {"role": "user", "parts": [{"text": "bye"}]},
            ])
        );
    }

    #[test]
    fn sampling_parameters_map_to_the_generation_config() {
        let b = body(json!({"model": "m", "messages": [user("hi")],
            "max_tokens": 10, "max_completion_tokens": 20, "temperature": 0.5, "top_p": 0.9, "top_k": 40,
            "stop": ["a", "b"], "seed": 7, "presence_penalty": 0.1, "frequency_penalty": -0.2, "n": 3}));
        assert_eq!(
            b["generationConfig"],
            json!({"stopSequences": ["a", "b"], "candidateCount": 3, "maxOutputTokens": 20, "temperature": 0.5,
                   "topP": 0.9, "topK": 40, "seed": 7, "presencePenalty": 0.1, "frequencyPenalty": -0.2})
        );
        let b = body(json!({"model": "m", "messages": [user("hi")], "max_tokens": 10, "stop": "x", "n": 1}));
        assert_eq!(b["generationConfig"], json!({"stopSequences": ["x"], "maxOutputTokens": 10}));
        assert!(body(json!({"model": "m", "messages": [user("hi")]})).get("generationConfig").is_none());
    }

    #[test]
    fn top_k_must_be_a_positive_integer() {
        for bad in [json!(0), json!(-1), json!(1.5), json!("3")] {
            let e = refused(json!({"model": "m", "messages": [user("hi")], "top_k": bad}));
            assert_eq!((e.status, e.param.as_deref()), (400, Some("top_k")));
        }
    }

    #[test]
    fn json_mode_sets_the_response_mime_type_and_json_schema() {
        let b = body(json!({"model": "m", "messages": [user("hi")], "response_format": {"type": "json_object"}}));
        assert_eq!(b["generationConfig"], json!({"responseMimeType": "application/json"}));
        let schema = json!({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"], "additionalProperties": false});
        let b = body(json!({"model": "m", "messages": [user("hi")],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "strict": true, "schema": schema}}}));
        assert_eq!(b["generationConfig"], json!({"responseMimeType": "application/json", "responseJsonSchema": schema}));
        let b = body(json!({"model": "m", "messages": [user("hi")], "response_format": {"type": "text"}}));
        assert!(b.get("generationConfig").is_none());
        let e = refused(json!({"model": "m", "messages": [user("hi")], "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}));
        assert_eq!(e.param.as_deref(), Some("response_format.json_schema.schema"));
        let e = refused(json!({"model": "m", "messages": [user("hi")], "response_format": {"type": "grammar"}}));
        assert_eq!(e.param.as_deref(), Some("response_format"));
    }

    #[test]
    fn images_by_data_url_are_inline_data_and_by_url_file_data() {
        let b = body(json!({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what?"},
            {"type": "image_url", "image_url": {"url": "data:image/PNG;base64,iVBORw0KGgo="}},
            {"type": "image_url", "image_url": {"url": "https://example.com/a/cat.JPG?x=1#y", "detail": "high"}},
            {"type": "image_url", "image_url": {"url": "gs://bucket/dog.webp"}},
            {"type": "image_url", "image_url": {"url": "https://generativelanguage.googleapis.com/v1beta/files/abc"}},
        ]}]}));
        assert_eq!(
            b["contents"][0]["parts"],
            json!([
                {"text": "what?"},
                {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}},
                {"fileData": {"mimeType": "image/jpeg", "fileUri": "https://example.com/a/cat.JPG?x=1#y"}},
                {"fileData": {"mimeType": "image/webp", "fileUri": "gs://bucket/dog.webp"}},
                {"fileData": {"fileUri": "https://generativelanguage.googleapis.com/v1beta/files/abc"}},
            ])
        );
    }

    #[test]
    fn unreadable_image_urls_are_refused() {
        for (url, status) in [("data:image/png,rawbytes", 400), ("data:;base64,AAAA", 400), ("data:image/png;base64", 400), ("ftp://x/y.png", 400), ("cat.png", 400)] {
            let e = refused(json!({"model": "m", "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}]}]}));
            assert_eq!((e.status, e.param.as_deref()), (status, Some("messages[0].content[0].image_url.url")), "{url}");
        }
    }

    #[test]
    fn audio_and_file_data_urls_are_inline_data_but_openai_file_ids_are_refused() {
        let b = body(json!({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
            {"type": "file", "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBERi0="}},
        ]}]}));
        assert_eq!(
            b["contents"][0]["parts"],
            json!([
                {"inlineData": {"mimeType": "audio/wav", "data": "UklGRg=="}},
                {"inlineData": {"mimeType": "application/pdf", "data": "JVBERi0="}},
            ])
        );
        let e = refused(json!({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "file", "file": {"file_id": "file-123"}}]}]}));
        assert_eq!((e.status, e.param.as_deref()), (400, Some("messages[0].content[0].file")));
        let e = refused(json!({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "x", "format": "flac"}}]}]}));
        assert_eq!(e.param.as_deref(), Some("messages[0].content[0].input_audio"));
    }

    #[test]
    fn tools_become_function_declarations_with_json_schema_parameters() {
        let params = json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": false});
        let b = body(json!({"model": "m", "messages": [user("hi")], "tools": [
            {"type": "function", "function": {"name": "weather", "description": "Get weather", "parameters": params, "strict": true}},
            {"type": "function", "function": {"name": "now"}},
        ], "tool_choice": "auto", "parallel_tool_calls": true}));
        assert_eq!(
            b["tools"],
            json!([{"functionDeclarations": [
                {"name": "weather", "description": "Get weather", "parametersJsonSchema": params},
                {"name": "now"},
            ]}])
        );
        assert_eq!(b["toolConfig"], json!({"functionCallingConfig": {"mode": "AUTO"}}));
        let e = refused(json!({"model": "m", "messages": [user("hi")], "tools": [{"type": "custom", "function": {"name": "x"}}]}));
        assert_eq!(e.param.as_deref(), Some("tools[0].type"));
    }

    #[test]
    fn tool_choice_maps_to_the_function_calling_mode() {
        for (choice, expected) in [
            (json!("none"), json!({"mode": "NONE"})),
            (json!("required"), json!({"mode": "ANY"})),
            (json!({"type": "function", "function": {"name": "now"}}), json!({"mode": "ANY", "allowedFunctionNames": ["now"]})),
        ] {
            let b = body(json!({"model": "m", "messages": [user("hi")], "tool_choice": choice}));
            assert_eq!(b["toolConfig"]["functionCallingConfig"], expected);
        }
        for bad in [json!("sometimes"), json!({"type": "allowed_tools", "allowed_tools": {}}), json!({"type": "function"})] {
            assert_eq!(refused(json!({"model": "m", "messages": [user("hi")], "tool_choice": bad})).status, 400);
        }
    }

    fn tool_history() -> Value {
        json!({"model": "m", "messages": [
            user("weather in Paris and Rome, and the time?"),
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1__thought__c2lnbmF0dXJl", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}},
                {"id": "call_2", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Rome\"}"}},
                {"id": "call_3", "type": "function", "function": {"name": "now", "arguments": ""}},
            ]},
            {"role": "tool", "tool_call_id": "call_1__thought__c2lnbmF0dXJl", "content": "{\"temp\": 21}"},
            {"role": "tool", "tool_call_id": "call_2", "content": "sunny"},
            {"role": "system", "content": "be brief"},
            {"role": "tool", "tool_call_id": "call_3", "content": [{"type": "text", "text": "12:00"}]},
            user("thanks"),
        ]})
    }

    #[test]
    fn assistant_tool_calls_become_function_calls_with_their_thought_signature() {
        let b = body(tool_history());
        assert_eq!(
            b["contents"][1],
            json!({"role": "model", "parts": [
                {"functionCall": {"id": "call_1", "name": "weather", "args": {"city": "Paris"}}, "thoughtSignature": "c2lnbmF0dXJl"},
                {"functionCall": {"id": "call_2", "name": "weather", "args": {"city": "Rome"}}},
                {"functionCall": {"id": "call_3", "name": "now", "args": {}}},
            ]})
        );
    }

    #[test]
    fn consecutive_tool_results_are_one_user_turn_named_after_their_calls() {
        let b = body(tool_history());
        assert_eq!(
            b["contents"][2],
            json!({"role": "user", "parts": [
                {"functionResponse": {"id": "call_1", "name": "weather", "response": {"temp": 21}}},
                {"functionResponse": {"id": "call_2", "name": "weather", "response": {"output": "sunny"}}},
                {"functionResponse": {"id": "call_3", "name": "now", "response": {"output": "12:00"}}},
            ]})
        );
        assert_eq!(b["contents"][3], json!({"role": "user", "parts": [{"text": "thanks"}]}));
        assert_eq!(b["contents"].as_array().unwrap().len(), 4);
        assert_eq!(b["systemInstruction"], json!({"parts": [{"text": "be brief"}]}));
    }

    #[test]
    fn a_tool_result_for_an_unknown_call_is_a_400_unless_it_is_named() {
        let e = refused(json!({"model": "m", "messages": [user("hi"), {"role": "tool", "tool_call_id": "nope", "content": "x"}]}));
        assert_eq!((e.status, e.param.as_deref()), (400, Some("messages[1].tool_call_id")));
        let b = body(json!({"model": "m", "messages": [user("hi"), {"role": "tool", "tool_call_id": "nope", "name": "f", "content": "[1,2]"}]}));
        assert_eq!(b["contents"][1]["parts"][0]["functionResponse"], json!({"id": "nope", "name": "f", "response": {"output": [1, 2]}}));
    }

    #[test]
    fn tool_call_arguments_must_be_a_json_object() {
        for args in ["{not json", "[1]", "\"s\""] {
            let e = refused(json!({"model": "m", "messages": [user("hi"), {"role": "assistant", "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": args}}]}]}));
            assert_eq!((e.status, e.param.as_deref()), (400, Some("messages[1].tool_calls[0].function.arguments")), "{args}");
        }
    }

    #[test]
    fn reasoning_effort_is_a_budget_for_gemini_2_and_a_level_for_gemini_3() {
        let req = |effort: &str| json!({"model": "m", "messages": [user("hi")], "reasoning_effort": effort});
        for (effort, budget, level, include) in [
            ("none", 0, "minimal", false),
            ("minimal", 512, "minimal", true),
            ("low", 1024, "low", true),
            ("medium", 8192, "medium", true),
            ("high", 24576, "high", true),
        ] {
            assert_eq!(
                body_for(req(effort), "gemini-2.5-flash")["generationConfig"]["thinkingConfig"],
                json!({"includeThoughts": include, "thinkingBudget": budget}),
                "{effort}"
            );
            for model in ["gemini-3-pro-preview", "models/gemini-flash-latest"] {
                assert_eq!(
                    body_for(req(effort), model)["generationConfig"]["thinkingConfig"],
                    json!({"includeThoughts": include, "thinkingLevel": level}),
                    "{effort} {model}"
                );
            }
        }
        assert_eq!(refused(req("xhigh")).param.as_deref(), Some("reasoning_effort"));
    }

    #[test]
    fn parameters_gemini_cannot_honour_are_refused_by_name() {
        let base = || json!({"model": "m", "messages": [user("hi")]});
        for (field, value, param) in [
            ("logit_bias", json!({"50256": -100}), "logit_bias"),
            ("logprobs", json!(true), "logprobs"),
            ("top_logprobs", json!(2), "top_logprobs"),
            ("parallel_tool_calls", json!(false), "parallel_tool_calls"),
            ("n", json!(9), "n"),
            ("n", json!(0), "n"),
            ("modalities", json!(["text", "audio"]), "modalities"),
            ("audio", json!({"voice": "alloy"}), "audio"),
            ("prediction", json!({"type": "content", "content": "x"}), "prediction"),
            ("functions", json!([{"name": "f"}]), "functions"),
            ("service_tier", json!("flex"), "service_tier"),
        ] {
            let mut req = base();
            req[field] = value;
            let e = refused(req);
            assert_eq!((e.status, e.kind, e.param.as_deref()), (400, "invalid_request_error", Some(param)), "{field}");
        }
        let e = refused(json!({"model": "m", "messages": [{"role": "function", "name": "f", "content": "x"}]}));
        assert_eq!(e.param.as_deref(), Some("messages[0].role"));
    }

    #[test]
    fn harmless_fields_are_accepted() {
        let b = body(json!({"model": "m", "messages": [user("hi")], "user": "u1", "metadata": {"k": "v"}, "store": false,
            "prompt_cache_key": "k", "safety_identifier": "s", "modalities": ["text"], "logprobs": false, "logit_bias": {},
            "stream_options": {"include_usage": true}, "parallel_tool_calls": true}));
        assert_eq!(b, json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}));
    }

    #[test]
    fn the_thought_signature_survives_a_round_trip_through_the_tool_call_id() {
        let mut pair = OpenAiGemini::new(meta());
        let c = pair
            .response(br#"{"candidates":[{"content":{"role":"model","parts":[
                {"functionCall":{"name":"weather","args":{"city":"Paris"}},"thoughtSignature":"EskgCs+/="},
                {"functionCall":{"name":"weather","args":{"city":"Rome"}}}]},"finishReason":"STOP"}]}"#)
            .unwrap();
        let calls = c.choices[0].message.tool_calls.clone().unwrap();
        assert_eq!(calls[0].id, "call_abc_0__thought__EskgCs+/=");
        assert_eq!(calls[1].id, "call_abc_1");
        // The client echoes the assistant message and answers both calls.
        let history = json!({"model": "m", "messages": [
            user("weather?"),
            {"role": "assistant", "content": null, "tool_calls": calls},
            {"role": "tool", "tool_call_id": calls[0].id, "content": "rain"},
            {"role": "tool", "tool_call_id": calls[1].id, "content": "sun"},
        ]});
        let b = body(history);
        assert_eq!(b["contents"][1]["parts"][0]["thoughtSignature"], "EskgCs+/=");
        assert_eq!(b["contents"][1]["parts"][0]["functionCall"]["id"], "call_abc_0");
        assert!(b["contents"][1]["parts"][1].get("thoughtSignature").is_none());
        assert_eq!(b["contents"][2]["parts"][0]["functionResponse"]["id"], "call_abc_0");
        assert_eq!(b["contents"][2]["parts"][1]["functionResponse"]["name"], "weather");
    }

    // ---- non-stream response ----

    fn respond(body: Value) -> Result<ChatCompletion, ApiError> {
        OpenAiGemini::new(meta()).response(&serde_json::to_vec(&body).unwrap())
    }

    #[test]
    fn text_thoughts_and_code_execution_map_to_content_and_reasoning() {
        let c = respond(json!({"candidates": [{"content": {"role": "model", "parts": [
            {"text": "plan", "thought": true}, {"text": " more", "thought": true},
            {"text": "Answer: "},
            {"executableCode": {"language": "PYTHON", "code": "print(1)"}},
            {"codeExecutionResult": {"outcome": "OUTCOME_OK", "output": "1\n"}},
            {"text": "one", "thoughtSignature": "sig"},
        ]}, "finishReason": "STOP", "index": 0}],
        "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 7, "thoughtsTokenCount": 3, "totalTokenCount": 15}}))
        .unwrap();
        assert_eq!((c.id.as_str(), c.object.as_str(), c.model.as_str(), c.created), ("chatcmpl-abc", "chat.completion", "my-gemini", 1_700_000_000));
        let m = &c.choices[0].message;
        assert_eq!(m.reasoning_content.as_deref(), Some("plan more"));
        assert_eq!(m.content.as_deref(), Some("Answer: \n```python\nprint(1)\n```\n\n```\n1\n```\none"));
        assert_eq!(c.choices[0].finish_reason, Some(FinishReason::Stop));
        let u = c.usage.unwrap();
        assert_eq!((u.prompt_tokens, u.completion_tokens, u.total_tokens), (5, 10, 15));
        assert_eq!(u.completion_tokens_details.unwrap().reasoning_tokens, Some(3));
    }

    #[test]
    fn finish_reasons_map_to_openais() {
        let finish = |reason: &str, call: bool| {
            let part = if call { json!({"functionCall": {"name": "f"}}) } else { json!({"text": "x"}) };
            respond(json!({"candidates": [{"content": {"parts": [part]}, "finishReason": reason}]}))
                .map(|c| c.choices[0].finish_reason)
        };
        for (reason, expected) in [
            ("STOP", Some(FinishReason::Stop)),
            ("MAX_TOKENS", Some(FinishReason::Length)),
            ("SAFETY", Some(FinishReason::ContentFilter)),
            ("RECITATION", Some(FinishReason::ContentFilter)),
            ("BLOCKLIST", Some(FinishReason::ContentFilter)),
            ("PROHIBITED_CONTENT", Some(FinishReason::ContentFilter)),
            ("SPII", Some(FinishReason::ContentFilter)),
            ("OTHER", Some(FinishReason::Stop)),
            ("SOMETHING_NEW", Some(FinishReason::Stop)),
        ] {
            assert_eq!(finish(reason, false).unwrap(), expected, "{reason}");
        }
        assert_eq!(finish("STOP", true).unwrap(), Some(FinishReason::ToolCalls));
        assert_eq!(finish("MAX_TOKENS", true).unwrap(), Some(FinishReason::Length));
        let none = respond(json!({"candidates": [{"content": {"parts": [{"text": "x"}]}}]})).unwrap();
        assert_eq!(none.choices[0].finish_reason, None);
    }

    #[test]
    fn a_malformed_function_call_is_a_retryable_502_and_usage_is_kept() {
        let mut pair = OpenAiGemini::new(meta());
        let e = pair
            .response(br#"{"candidates":[{"content":{"parts":[]},"finishReason":"MALFORMED_FUNCTION_CALL","finishMessage":"Malformed function call: print(x"}],
                "usageMetadata":{"promptTokenCount":10,"totalTokenCount":30}}"#)
            .unwrap_err();
        assert_eq!((e.fault, e.status, e.kind, e.code.as_deref()), (Fault::Provider, 502, "server_error", Some("malformed_function_call")));
        assert!(e.message.contains("Malformed function call: print(x"), "{}", e.message);
        assert_eq!(pair.usage(), Usage { input: Some(10), output: Some(20), ..Usage::default() });
    }

    #[test]
    fn a_blocked_prompt_is_a_content_filter_refusal_for_every_choice() {
        let mut pair = OpenAiGemini::new(meta());
        pair.request(&chat(json!({"model": "m", "messages": [user("hi")], "n": 2})), &target("gemini-2.5-flash")).unwrap();
        let c = pair
            .response(br#"{"promptFeedback":{"blockReason":"SAFETY","safetyRatings":[
                {"category":"HARM_CATEGORY_HATE_SPEECH","probability":"HIGH"},{"category":"HARM_CATEGORY_HARASSMENT","probability":"NEGLIGIBLE"}]}}"#)
            .unwrap();
        assert_eq!(c.choices.len(), 2);
        for (i, choice) in c.choices.iter().enumerate() {
            assert_eq!(choice.index, i as u32);
            assert_eq!(choice.finish_reason, Some(FinishReason::ContentFilter));
            assert_eq!(choice.message.content, None);
            assert_eq!(
                choice.message.refusal.as_deref(),
                Some("Gemini blocked the prompt (blockReason SAFETY): HARM_CATEGORY_HATE_SPEECH (HIGH)")
            );
        }
        assert_eq!(c.usage, None, "no usageMetadata: usage unknown, not zero");
        assert!(pair.usage().is_empty());
    }

    #[test]
    fn a_candidate_without_parts_is_handled() {
        let c = respond(json!({"candidates": [
            {"finishReason": "SAFETY", "index": 0, "safetyRatings": [{"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "MEDIUM", "blocked": true}]},
            {"content": {"role": "model"}, "finishReason": "STOP", "index": 1},
        ]}))
        .unwrap();
        assert_eq!(c.choices[0].message.content, None);
        assert_eq!(
            c.choices[0].message.refusal.as_deref(),
            Some("Gemini stopped the response (finishReason SAFETY): HARM_CATEGORY_DANGEROUS_CONTENT (MEDIUM)")
        );
        assert_eq!(c.choices[0].finish_reason, Some(FinishReason::ContentFilter));
        assert_eq!((c.choices[1].message.content.as_deref(), c.choices[1].message.refusal.as_deref()), (None, None));
        assert_eq!(c.choices[1].finish_reason, Some(FinishReason::Stop));
    }

    #[test]
    fn candidates_become_choices_in_index_order() {
        let c = respond(json!({"candidates": [
            {"content": {"parts": [{"text": "b"}]}, "finishReason": "STOP", "index": 1},
            {"content": {"parts": [{"text": "a"}]}, "finishReason": "MAX_TOKENS", "index": 0},
        ]}))
        .unwrap();
        let got: Vec<_> = c.choices.iter().map(|c| (c.index, c.message.content.clone().unwrap(), c.finish_reason)).collect();
        assert_eq!(got, vec![(0, "a".into(), Some(FinishReason::Length)), (1, "b".into(), Some(FinishReason::Stop))]);
    }

    #[test]
    fn a_response_that_is_not_gemini_is_a_502() {
        for body in [&b"not json"[..], b"{\"candidates\":[]}", b"[]", b"{\"candidates\":5}"] {
            let e = OpenAiGemini::new(meta()).response(body).unwrap_err();
            assert_eq!((e.fault, e.status), (Fault::Provider, 502));
        }
    }

    #[test]
    fn usage_keeps_unknown_apart_from_zero() {
        let u = |v: Value| usage_from(&serde_json::from_value(v).unwrap());
        assert_eq!(u(json!({})), Usage::default());
        assert_eq!(
            u(json!({"promptTokenCount": 32, "totalTokenCount": 74, "thoughtsTokenCount": 42})),
            Usage { input: Some(32), output: Some(42), reasoning: Some(42), ..Usage::default() },
            "candidatesTokenCount omitted (zero in proto3 JSON): output from the total"
        );
        assert_eq!(
            u(json!({"promptTokenCount": 32, "candidatesTokenCount": 575, "totalTokenCount": 1425, "toolUsePromptTokenCount": 619, "thoughtsTokenCount": 199})),
            Usage { input: Some(651), output: Some(774), reasoning: Some(199), ..Usage::default() }
        );
        assert_eq!(
            u(json!({"promptTokenCount": 12013, "candidatesTokenCount": 15, "cachedContentTokenCount": 11243})),
            Usage { input: Some(12013), output: Some(15), cached_read: Some(11243), ..Usage::default() }
        );
        assert_eq!(u(json!({"candidatesTokenCount": 4})), Usage { output: Some(4), ..Usage::default() });
        assert_eq!(u(json!({"thoughtsTokenCount": 4})), Usage { reasoning: Some(4), ..Usage::default() });
    }

    // ---- stream ----

    fn run_stream(pair: &mut OpenAiGemini, elements: &[Value]) -> Result<Vec<ChatChunk>, ApiError> {
        let mut out = Vec::new();
        let mut result = Ok(());
        for e in elements {
            result = pair.event(None, &e.to_string(), &mut out);
            if result.is_err() {
                break;
            }
        }
        if result.is_ok() {
            result = pair.end(&mut out);
        }
        let chunks = out
            .into_iter()
            .map(|o| match o {
                StreamOut::Chunk(c) => c,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        result.map(|()| chunks)
    }

    #[test]
    fn a_stream_sends_role_first_whole_tool_calls_and_a_finish_chunk() {
        let mut pair = OpenAiGemini::new(meta());
        let chunks = run_stream(&mut pair, &[
            json!({"candidates": [{"content": {"role": "model", "parts": [{"text": "hmm", "thought": true}]}, "index": 0}],
                   "usageMetadata": {"promptTokenCount": 9, "totalTokenCount": 20, "thoughtsTokenCount": 11}}),
            json!({"candidates": [{"content": {"role": "model", "parts": [
                {"text": "Calling."},
                {"functionCall": {"name": "a", "args": {"x": 1}}, "thoughtSignature": "S1"},
                {"functionCall": {"id": "given", "name": "b"}}]}, "index": 0}]}),
            json!({"candidates": [{"content": {"role": "model", "parts": [{"functionCall": {"name": "c", "args": {}}}, {"text": ""}]},
                   "finishReason": "STOP", "index": 0}],
                   "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 6, "totalTokenCount": 26, "thoughtsTokenCount": 11}}),
        ])
        .unwrap();
        let deltas: Vec<Value> = chunks.iter().map(|c| serde_json::to_value(&c.choices[0].delta).unwrap()).collect();
        assert_eq!(
            deltas,
            vec![
                json!({"role": "assistant", "reasoning_content": "hmm"}),
                json!({"content": "Calling."}),
                json!({"tool_calls": [{"index": 0, "id": "call_abc_0__thought__S1", "type": "function", "function": {"name": "a", "arguments": "{\"x\":1}"}}]}),
                json!({"tool_calls": [{"index": 1, "id": "given", "type": "function", "function": {"name": "b", "arguments": "{}"}}]}),
                json!({"tool_calls": [{"index": 2, "id": "call_abc_1", "type": "function", "function": {"name": "c", "arguments": "{}"}}]}),
                json!({}),
            ]
        );
        let finishes: Vec<_> = chunks.iter().map(|c| c.choices[0].finish_reason).collect();
        assert_eq!(finishes.last(), Some(&Some(FinishReason::ToolCalls)));
        assert!(finishes[..finishes.len() - 1].iter().all(Option::is_none));
        assert!(chunks.iter().all(|c| c.usage.is_none() && c.object == "chat.completion.chunk" && c.id == "chatcmpl-abc"));
        assert_eq!(pair.usage(), Usage { input: Some(9), output: Some(17), reasoning: Some(11), ..Usage::default() });
    }

    #[test]
    fn a_stream_keeps_candidates_apart() {
        let mut pair = OpenAiGemini::new(meta());
        pair.request(&chat(json!({"model": "m", "stream": true, "n": 2, "messages": [user("hi")]})), &target("gemini-2.5-flash")).unwrap();
        let chunks = run_stream(&mut pair, &[
            json!({"candidates": [{"content": {"parts": [{"text": "a"}]}, "index": 0}, {"content": {"parts": [{"text": "b"}]}, "index": 1}]}),
            json!({"candidates": [{"content": {"parts": [{"functionCall": {"name": "f"}}]}, "finishReason": "STOP", "index": 1}]}),
            json!({"candidates": [{"content": {"parts": [{"text": "a2"}]}, "finishReason": "STOP", "index": 0}]}),
        ])
        .unwrap();
        let text = |i: u32| -> String {
            chunks.iter().filter(|c| c.choices[0].index == i).filter_map(|c| c.choices[0].delta.content.clone()).collect()
        };
        assert_eq!((text(0), text(1)), ("aa2".to_owned(), "b".to_owned()));
        let finish = |i: u32| chunks.iter().filter(|c| c.choices[0].index == i).find_map(|c| c.choices[0].finish_reason);
        assert_eq!((finish(0), finish(1)), (Some(FinishReason::Stop), Some(FinishReason::ToolCalls)));
        let roles = chunks.iter().filter(|c| c.choices[0].delta.role.is_some()).count();
        assert_eq!(roles, 2);
        let call = chunks.iter().find_map(|c| c.choices[0].delta.tool_calls.clone()).unwrap();
        assert_eq!(call[0].index, 0, "tool call indices count per choice");
    }

    #[test]
    fn a_blocked_prompt_in_a_stream_ends_as_content_filter() {
        let mut pair = OpenAiGemini::new(meta());
        let chunks = run_stream(&mut pair, &[json!({"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"},
            "usageMetadata": {"promptTokenCount": 4, "totalTokenCount": 4}})])
        .unwrap();
        let deltas: Vec<Value> = chunks.iter().map(|c| serde_json::to_value(&c.choices[0].delta).unwrap()).collect();
        assert_eq!(deltas, vec![json!({"role": "assistant", "refusal": "Gemini blocked the prompt (blockReason PROHIBITED_CONTENT)"}), json!({})]);
        assert_eq!(chunks[1].choices[0].finish_reason, Some(FinishReason::ContentFilter));
        assert_eq!(pair.usage(), Usage { input: Some(4), output: Some(0), ..Usage::default() });
    }

    #[test]
    fn a_filtered_candidate_mid_stream_keeps_its_text_and_ends_as_content_filter() {
        let mut pair = OpenAiGemini::new(meta());
        let chunks = run_stream(&mut pair, &[
            json!({"candidates": [{"content": {"parts": [{"text": "Once upon"}]}}]}),
            json!({"candidates": [{"finishReason": "RECITATION"}]}),
            json!({"candidates": [{"content": {"parts": [{"text": "ignored after finish"}]}}]}),
        ])
        .unwrap();
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[1].choices[0].delta, Delta::default());
        assert_eq!(chunks[1].choices[0].finish_reason, Some(FinishReason::ContentFilter));
    }

    #[test]
    fn an_error_inside_a_stream_is_an_err_with_retry_info() {
        let mut pair = OpenAiGemini::new(meta());
        let e = run_stream(&mut pair, &[
            json!({"candidates": [{"content": {"parts": [{"text": "partial"}]}}]}),
            json!({"error": {"code": 429, "message": "Resource has been exhausted", "status": "RESOURCE_EXHAUSTED",
                "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"}]}}),
        ])
        .unwrap_err();
        assert_eq!((e.fault, e.status, e.kind, e.retry_after), (Fault::Provider, 429, "rate_limit_error", Some(7)));
        let e = run_stream(&mut OpenAiGemini::new(meta()), &[json!({"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}})])
            .unwrap_err();
        assert_eq!((e.status, e.code.as_deref()), (503, Some("service_unavailable")));
        let mut out = Vec::new();
        let e = OpenAiGemini::new(meta()).event(None, "{\"candidates\": [", &mut out).unwrap_err();
        assert_eq!(e.status, 502);
    }

    #[test]
    fn a_stream_without_elements_is_an_error_and_one_without_finish_reason_ends_with_stop() {
        let mut out = Vec::new();
        assert_eq!(OpenAiGemini::new(meta()).end(&mut out).unwrap_err().status, 502);
        let mut pair = OpenAiGemini::new(meta());
        let mut out = Vec::new();
        pair.event(None, "   ", &mut out).unwrap();
        assert!(out.is_empty());
        let chunks = run_stream(&mut pair, &[json!({"candidates": [{"content": {"parts": [{"text": "hi"}]}}]})]).unwrap();
        assert_eq!(chunks.last().unwrap().choices[0].finish_reason, Some(FinishReason::Stop));
    }

    #[test]
    fn a_candidate_index_beyond_what_was_asked_is_a_502() {
        let e = run_stream(&mut OpenAiGemini::new(meta()), &[json!({"candidates": [{"index": 4000000000u32}]})]).unwrap_err();
        assert_eq!(e.status, 502);
    }

    // ---- errors ----

    fn gemini_error(status: u16, body: Value, retry_after: Option<u64>) -> ApiError {
        OpenAiGemini::new(meta()).error(status, retry_after, &serde_json::to_vec(&body).unwrap())
    }

    #[test]
    fn gemini_errors_map_to_openai_statuses_types_and_codes() {
        for (status, name, reason, expected) in [
            (400, "INVALID_ARGUMENT", None, (400, "invalid_request_error", "invalid_argument")),
            (400, "INVALID_ARGUMENT", Some("API_KEY_INVALID"), (502, "server_error", "upstream_authentication_failed")),
            (400, "FAILED_PRECONDITION", None, (400, "invalid_request_error", "failed_precondition")),
            (401, "UNAUTHENTICATED", None, (502, "server_error", "upstream_authentication_failed")),
            (403, "PERMISSION_DENIED", None, (403, "invalid_request_error", "permission_denied")),
            (404, "NOT_FOUND", None, (404, "invalid_request_error", "not_found")),
            (429, "RESOURCE_EXHAUSTED", None, (429, "rate_limit_error", "rate_limit_exceeded")),
            (500, "INTERNAL", None, (500, "server_error", "internal")),
            (503, "UNAVAILABLE", None, (503, "server_error", "service_unavailable")),
            (504, "DEADLINE_EXCEEDED", None, (504, "server_error", "timeout")),
            (409, "ABORTED", None, (409, "invalid_request_error", "aborted")),
        ] {
            let details: Vec<Value> =
                reason.map(|r| json!({"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": r})).into_iter().collect();
            let e = gemini_error(status, json!({"error": {"code": status, "message": "msg", "status": name, "details": details}}), None);
            assert_eq!((e.status, e.kind, e.code.as_deref().unwrap()), expected, "{status} {name}");
            assert_eq!(e.fault, Fault::Provider);
            assert!(e.message.ends_with("msg"));
        }
        let e = gemini_error(404, json!({"error": {"code": 404, "message": "models/x is not found", "status": "NOT_FOUND"}}), None);
        assert_eq!(e.code.as_deref(), Some("model_not_found"));
    }

    #[test]
    fn retry_after_comes_from_the_header_else_retry_info() {
        let body = json!({"error": {"code": 429, "message": "slow down", "status": "RESOURCE_EXHAUSTED", "details": [
            {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": []},
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "34.4s"}]}});
        assert_eq!(gemini_error(429, body.clone(), None).retry_after, Some(35));
        assert_eq!(gemini_error(429, body, Some(3)).retry_after, Some(3));
        assert_eq!(gemini_error(429, json!({"error": {"code": 429, "status": "RESOURCE_EXHAUSTED"}}), None).retry_after, None);
        for (text, secs) in [("0s", Some(0)), ("1.000001s", Some(2)), ("3", None), ("-1s", None), ("NaNs", None)] {
            assert_eq!(parse_duration(text), secs, "{text}");
        }
    }

    #[test]
    fn error_bodies_in_an_array_or_unreadable_are_handled_without_echoing_them() {
        let e = OpenAiGemini::new(meta())
            .error(400, None, br#"[{"error":{"code":400,"message":"Function call is missing a thought_signature","status":"INVALID_ARGUMENT"}}]"#);
        assert_eq!((e.status, e.message.as_str()), (400, "Function call is missing a thought_signature"));
        let e = OpenAiGemini::new(meta()).error(503, None, b"<html>upstream connect error secret-ish</html>");
        assert_eq!((e.status, e.kind), (503, "server_error"));
        assert!(!e.message.contains("html"), "{}", e.message);
        let e = OpenAiGemini::new(meta()).error(429, Some(9), b"");
        assert_eq!((e.status, e.kind, e.retry_after), (429, "rate_limit_error", Some(9)));
        let e = OpenAiGemini::new(meta()).error(418, None, b"{}");
        assert_eq!((e.status, e.kind), (418, "invalid_request_error"));
        // Details are never passed on: the API_KEY_INVALID body's DebugInfo echoes the key.
        let e = gemini_error(400, json!({"error": {"code": 400, "message": "API key not valid.", "status": "INVALID_ARGUMENT", "details": [
            {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"},
            {"@type": "type.googleapis.com/google.rpc.DebugInfo", "detail": "Invalid API key: AIzaSECRET"}]}}), None);
        assert!(!String::from_utf8(e.body()).unwrap().contains("AIzaSECRET"));
    }

    // ---- every recorded fixture ----

    fn fixtures_dir() -> PathBuf {
        crate::test_support::fixtures_dir().join("gemini")
    }

    /// Fixtures deliberately not run, each with its reason. Empty: every file is covered.
    const SKIPPED: &[(&str, &str)] = &[];

    /// What a Gemini answer says, per candidate index, computed from the raw JSON.
    #[derive(Debug, Default, PartialEq)]
    struct Said {
        /// Non-thought text parts, in order.
        texts: Vec<String>,
        thoughts: String,
        /// (name, arguments).
        calls: Vec<(String, Value)>,
        has_code: bool,
    }

    fn said_by(elements: &[Value]) -> std::collections::BTreeMap<u64, Said> {
        let mut said = std::collections::BTreeMap::<u64, Said>::new();
        for element in elements {
            for (position, c) in element["candidates"].as_array().into_iter().flatten().enumerate() {
                let s = said.entry(c["index"].as_u64().unwrap_or(position as u64)).or_default();
                for p in c["content"]["parts"].as_array().into_iter().flatten() {
                    if let Some(t) = p["text"].as_str() {
                        if p["thought"] == json!(true) {
                            s.thoughts.push_str(t);
                        } else if !t.is_empty() {
                            s.texts.push(t.to_owned());
                        }
                    }
                    if let Some(f) = p.get("functionCall") {
                        s.calls.push((f["name"].as_str().unwrap().to_owned(), f.get("args").cloned().unwrap_or(json!({}))));
                    }
                    s.has_code |= p.get("executableCode").is_some() || p.get("codeExecutionResult").is_some();
                }
            }
        }
        said
    }

    /// The usage the recorded `usageMetadata` states, by the documented rule.
    fn recorded_usage(m: &Value) -> Usage {
        let get = |k: &str| m.get(k).and_then(Value::as_u64);
        let input = get("promptTokenCount").map(|p| p + get("toolUsePromptTokenCount").unwrap_or(0));
        let output = match (get("candidatesTokenCount"), get("totalTokenCount"), input) {
            (Some(c), _, _) => Some(c + get("thoughtsTokenCount").unwrap_or(0)),
            (None, Some(t), Some(i)) => Some(t - i),
            _ => None,
        };
        let u = Usage { input, output, cached_read: get("cachedContentTokenCount"), cache_write: None, reasoning: get("thoughtsTokenCount") };
        if let (Some(total), Some(t)) = (get("totalTokenCount"), u.total()) {
            assert_eq!(t, total, "input + output adds up to totalTokenCount in {m}");
        }
        u
    }

    fn assert_text(name: &str, content: &str, said: &Said) {
        if said.has_code {
            // Code-execution parts are rendered between the text parts: each text part must
            // still be there, in order.
            let mut rest = content;
            for t in &said.texts {
                let at = rest.find(t.as_str()).unwrap_or_else(|| panic!("{name}: {t:?} missing from {content:?}"));
                rest = &rest[at + t.len()..];
            }
        } else {
            assert_eq!(content, said.texts.concat(), "{name}");
        }
    }

    fn check_generate(name: &str, bytes: &[u8]) {
        let raw: Value = serde_json::from_slice(bytes).unwrap();
        let mut pair = OpenAiGemini::new(meta());
        let completion = pair.response(bytes).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        let wire = serde_json::to_string(&completion).unwrap();
        let back: ChatCompletion = serde_json::from_str(&wire).unwrap_or_else(|e| panic!("{name}: not OpenAI JSON: {e}"));
        assert_eq!(back.object, "chat.completion");
        let expected_usage = raw.get("usageMetadata").map(recorded_usage).unwrap_or_default();
        assert_eq!(pair.usage(), expected_usage, "{name}");
        assert_eq!(back.usage, WireUsage::known(&expected_usage), "{name}");

        if raw["promptFeedback"]["blockReason"].is_string() {
            assert!(!back.choices.is_empty(), "{name}");
            for c in &back.choices {
                assert_eq!(c.finish_reason, Some(FinishReason::ContentFilter), "{name}");
                assert!(c.message.refusal.as_deref().unwrap().contains("blocked the prompt"), "{name}");
            }
            return;
        }
        let said = said_by(&[raw]);
        assert_eq!(back.choices.len(), said.len(), "{name}");
        for (choice, (index, s)) in back.choices.iter().zip(&said) {
            assert_eq!(choice.index as u64, *index, "{name}");
            let m = &choice.message;
            assert_text(name, m.content.as_deref().unwrap_or(""), s);
            assert_eq!(m.reasoning_content.clone().unwrap_or_default(), s.thoughts, "{name}");
            let calls: Vec<(String, Value)> = m
                .tool_calls
                .iter()
                .flatten()
                .map(|c| (c.function.name.clone(), serde_json::from_str(&c.function.arguments).unwrap()))
                .collect();
            assert_eq!(calls, s.calls, "{name}");
            assert!(choice.finish_reason.is_some(), "{name}");
            if !s.calls.is_empty() {
                assert_eq!(choice.finish_reason, Some(FinishReason::ToolCalls), "{name}");
            }
        }
    }

    /// A stream fixture's events: SSE data, or the JSON array's elements.
    fn stream_events(name: &str, bytes: &[u8]) -> Vec<String> {
        let mut events = Vec::new();
        if name.ends_with(".sse") {
            let mut d = SseDecoder::new();
            d.feed(bytes);
            for item in d.by_ref() {
                match item.unwrap_or_else(|e| panic!("{name}: {e}")) {
                    SseEvent::Message(m) => events.push(m.data),
                    SseEvent::Comment(_) => {}
                }
            }
            d.finish().unwrap_or_else(|e| panic!("{name}: {e}"));
        } else {
            let mut d = JsonArrayDecoder::new();
            d.feed(bytes);
            while let Some(item) = d.next_raw() {
                events.push(String::from_utf8(item.unwrap_or_else(|e| panic!("{name}: {e}"))).unwrap());
            }
            d.finish().unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        assert!(!events.is_empty(), "{name}: no events");
        events
    }

    /// Runs events through a fresh translator; every chunk serialised and read back.
    fn translate_stream(name: &str, events: &[String]) -> (Vec<ChatChunk>, Usage) {
        let mut pair = OpenAiGemini::new(meta());
        let mut out = Vec::new();
        for data in events {
            pair.event(None, data, &mut out).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        }
        pair.end(&mut out).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        let chunks = out
            .into_iter()
            .map(|o| match o {
                StreamOut::Chunk(c) => {
                    let wire = serde_json::to_string(&c).unwrap();
                    let back: ChatChunk = serde_json::from_str(&wire).unwrap_or_else(|e| panic!("{name}: not an OpenAI chunk: {e}"));
                    assert_eq!(back, c, "{name}");
                    back
                }
                other => panic!("{name}: unexpected {other:?}"),
            })
            .collect();
        (chunks, pair.usage())
    }

    fn check_stream(name: &str, bytes: &[u8]) {
        let events = stream_events(name, bytes);
        let raw: Vec<Value> = events.iter().map(|e| serde_json::from_str(e).unwrap()).collect();
        let (chunks, usage) = translate_stream(name, &events);
        let last_usage = raw.iter().rev().find_map(|e| e.get("usageMetadata")).map(recorded_usage).unwrap_or_default();
        assert_eq!(usage, last_usage, "{name}");

        for (index, s) in said_by(&raw) {
            let mine: Vec<&ChunkChoice> = chunks.iter().map(|c| &c.choices[0]).filter(|c| c.index as u64 == index).collect();
            assert!(chunks.iter().all(|c| c.choices.len() == 1 && c.usage.is_none()), "{name}");
            assert_eq!(mine.first().unwrap().delta.role, Some(Role::Assistant), "{name}: role first");
            assert_eq!(mine.iter().filter(|c| c.delta.role.is_some()).count(), 1, "{name}");
            let content: String = mine.iter().filter_map(|c| c.delta.content.clone()).collect();
            assert_text(name, &content, &s);
            let thoughts: String = mine.iter().filter_map(|c| c.delta.reasoning_content.clone()).collect();
            assert_eq!(thoughts, s.thoughts, "{name}");
            let calls: Vec<&ToolCallDelta> = mine.iter().flat_map(|c| c.delta.tool_calls.iter().flatten()).collect();
            let got: Vec<(String, Value)> = calls
                .iter()
                .map(|c| {
                    let f = c.function.as_ref().unwrap();
                    (f.name.clone().unwrap(), serde_json::from_str(f.arguments.as_deref().unwrap()).unwrap())
                })
                .collect();
            assert_eq!(got, s.calls, "{name}");
            for (i, c) in calls.iter().enumerate() {
                assert_eq!((c.index as usize, c.kind.as_deref()), (i, Some("function")), "{name}");
                assert!(c.id.as_deref().is_some_and(|id| !id.is_empty()), "{name}");
            }
            let finishes: Vec<FinishReason> = mine.iter().filter_map(|c| c.finish_reason).collect();
            assert_eq!(finishes.len(), 1, "{name}: one finish");
            assert!(mine.last().unwrap().finish_reason.is_some(), "{name}: finish comes last");
            if !s.calls.is_empty() {
                assert_eq!(finishes[0], FinishReason::ToolCalls, "{name}");
            }
        }
    }

    fn check_request(name: &str, bytes: &[u8]) {
        let r: g::GenerateContentRequest = serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_slice(bytes))
            .unwrap_or_else(|e| panic!("{name}: not a Gemini request: {e}"));
        assert!(!r.contents.is_empty(), "{name}");
        for c in r.contents.iter().chain(&r.system_instruction) {
            assert!(c.role.as_deref().is_none_or(|role| role == "user" || role == "model"), "{name}");
            for p in &c.parts {
                assert!(p.has_data(), "{name}: a part this module does not read: {p:?}");
            }
        }
        // What Tollgate would write reads back the same.
        let again: g::GenerateContentRequest = serde_json::from_slice(&serde_json::to_vec(&r).unwrap()).unwrap();
        assert_eq!(again, r, "{name}");
    }

    fn check_error(name: &str, bytes: &[u8]) {
        let status: u16 = name
            .strip_prefix("error_")
            .and_then(|n| n.get(..3))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{name}: error fixtures are named error_<status>_…"));
        let raw: Value = serde_json::from_slice(bytes).unwrap();
        let e = OpenAiGemini::new(meta()).error(status, None, bytes);
        let key_rejected = raw["error"]["details"].as_array().into_iter().flatten().any(|d| d["reason"] == "API_KEY_INVALID");
        assert_eq!(e.status, if key_rejected { 502 } else { status }, "{name}");
        assert_eq!(e.fault, Fault::Provider, "{name}");
        let delay = raw["error"]["details"].as_array().into_iter().flatten().find_map(|d| d["retryDelay"].as_str());
        assert_eq!(e.retry_after, delay.and_then(parse_duration), "{name}");
        if delay.is_some() {
            assert!(e.retry_after.is_some(), "{name}");
        }
        let body: Value = serde_json::from_slice(&e.body()).unwrap();
        let fields: Vec<&str> = body["error"].as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(fields, ["code", "message", "param", "type"], "{name}");
        assert!(body["error"]["message"].as_str().unwrap().ends_with(raw["error"]["message"].as_str().unwrap()), "{name}");
        let response = e.to_response();
        assert_eq!(response.status, e.status);
        assert_eq!(response.headers.iter().any(|(k, _)| *k == "retry-after"), e.retry_after.is_some(), "{name}");
    }

    #[test]
    fn every_gemini_fixture_translates() {
        let dir = fixtures_dir();
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("fixtures missing at {}: {e}", dir.display()));
        let mut names: Vec<String> = entries.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        let mut seen = std::collections::BTreeMap::<&str, usize>::new();
        for name in &names {
            if let Some((_, why)) = SKIPPED.iter().find(|(n, _)| n == name) {
                eprintln!("skipped {name}: {why}");
                continue;
            }
            let bytes = std::fs::read(dir.join(name)).unwrap();
            let class = if name.ends_with(".request.json") || name.starts_with("request_") {
                check_request(name, &bytes);
                "request"
            } else if name.ends_with(".headers.json") {
                assert!(serde_json::from_slice::<Value>(&bytes).unwrap().is_object(), "{name}");
                "headers"
            } else if name.starts_with("error_") && name.ends_with(".json") {
                check_error(name, &bytes);
                "error"
            } else if name.starts_with("generate_") && name.ends_with(".json") {
                check_generate(name, &bytes);
                "generate"
            } else if (name.starts_with("stream_sse_") && name.ends_with(".sse"))
                || (name.starts_with("stream_array_") && name.ends_with(".json"))
            {
                check_stream(name, &bytes);
                "stream"
            } else {
                panic!("{name}: no rule for this fixture; add one or list it in SKIPPED with a reason");
            };
            *seen.entry(class).or_default() += 1;
        }
        eprintln!("gemini fixtures: {seen:?}");
        for class in ["request", "error", "generate", "stream"] {
            assert!(seen.get(class).copied().unwrap_or(0) > 0, "no {class} fixtures in {}", dir.display());
        }
    }

    fn stream_fixtures() -> Vec<(String, Vec<u8>)> {
        let dir = fixtures_dir();
        let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("fixtures missing at {}: {e}", dir.display()))
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("stream_") && !n.ends_with(".request.json"))
            .map(|n| {
                let bytes = std::fs::read(dir.join(&n)).unwrap();
                (n, bytes)
            })
            .collect();
        out.sort();
        out
    }

    /// Feeds `bytes` to the right decoder in pieces of the given sizes.
    fn events_chunked(name: &str, bytes: &[u8], sizes: &[usize]) -> Vec<String> {
        let mut pieces = Vec::new();
        let mut at = 0;
        for s in sizes.iter().cycle() {
            if at >= bytes.len() {
                break;
            }
            let end = (at + s).min(bytes.len());
            pieces.push(&bytes[at..end]);
            at = end;
        }
        let mut events = Vec::new();
        if name.ends_with(".sse") {
            let mut d = SseDecoder::new();
            for p in pieces {
                d.feed(p);
                for item in d.by_ref() {
                    if let SseEvent::Message(m) = item.unwrap() {
                        events.push(m.data);
                    }
                }
            }
        } else {
            let mut d = JsonArrayDecoder::new();
            for p in pieces {
                d.feed(p);
                while let Some(item) = d.next_raw() {
                    events.push(String::from_utf8(item.unwrap()).unwrap());
                }
            }
        }
        events
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Any chunking of a recorded stream gives the same chunks as the one-shot run.
        #[test]
        fn stream_fixtures_translate_the_same_whatever_the_chunking(sizes in proptest::collection::vec(1usize..64, 1..8)) {
            for (name, bytes) in stream_fixtures() {
                let whole = translate_stream(&name, &stream_events(&name, &bytes));
                let split = translate_stream(&name, &events_chunked(&name, &bytes, &sizes));
                prop_assert_eq!(&whole, &split, "{}", name);
            }
        }
    }

    #[derive(Debug, Clone)]
    enum Step {
        System(String),
        User(String),
        Assistant(String),
        Calls(Vec<String>),
        Result,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            "[a-z]{0,6}".prop_map(Step::System),
            "[a-z]{1,6}".prop_map(Step::User),
            "[a-z]{0,6}".prop_map(Step::Assistant),
            proptest::collection::vec("[a-c]", 1..4).prop_map(Step::Calls),
            Just(Step::Result),
            Just(Step::Result),
        ]
    }

    proptest! {
        /// Whatever the order of system messages, turns, calls and results: system text keeps its
        /// order, every result names its call, and consecutive results share one turn.
        #[test]
        fn conversations_keep_system_order_names_and_merged_results(steps in proptest::collection::vec(step(), 1..24)) {
            let mut messages = Vec::new();
            let mut system = Vec::new();
            let mut pending: std::collections::VecDeque<(String, String)> = Default::default();
            let mut results = Vec::new();
            let mut calls = 0;
            for s in &steps {
                match s {
                    Step::System(t) => { system.push(t.clone()); messages.push(json!({"role": "system", "content": t})); }
                    Step::User(t) => messages.push(user(t)),
                    Step::Assistant(t) => messages.push(json!({"role": "assistant", "content": t})),
                    Step::Calls(names) => {
                        let tool_calls: Vec<Value> = names.iter().map(|n| {
                            calls += 1;
                            let id = if calls % 2 == 0 { format!("id{calls}{THOUGHT_SIGNATURE_SEPARATOR}sig{calls}") } else { format!("id{calls}") };
                            pending.push_back((id.clone(), n.clone()));
                            json!({"id": id, "type": "function", "function": {"name": n, "arguments": "{}"}})
                        }).collect();
                        messages.push(json!({"role": "assistant", "tool_calls": tool_calls}));
                    }
                    Step::Result => match pending.pop_front() {
                        Some((id, n)) => { results.push((split_tool_call_id(&id).0.to_owned(), n)); messages.push(json!({"role": "tool", "tool_call_id": id, "content": "ok"})); }
                        None => messages.push(user("x")),
                    },
                }
            }
            let b = body(json!({"model": "m", "messages": messages}));
            let got_system: Vec<String> = b["systemInstruction"]["parts"].as_array().into_iter().flatten()
                .map(|p| p["text"].as_str().unwrap().to_owned()).collect();
            prop_assert_eq!(got_system, system);
            let contents = b["contents"].as_array().cloned().unwrap_or_default();
            let is_results = |c: &Value| c["parts"].as_array().unwrap().iter().all(|p| p.get("functionResponse").is_some());
            let mut got_results = Vec::new();
            for (i, c) in contents.iter().enumerate() {
                prop_assert!(c["role"] == "user" || c["role"] == "model");
                prop_assert!(!c["parts"].as_array().unwrap().is_empty());
                if i > 0 && is_results(c) {
                    prop_assert!(!is_results(&contents[i - 1]), "two result turns in a row");
                }
                for p in c["parts"].as_array().unwrap() {
                    if let Some(r) = p.get("functionResponse") {
                        got_results.push((r["id"].as_str().unwrap().to_owned(), r["name"].as_str().unwrap().to_owned()));
                    }
                    if p.get("functionCall").is_some() {
                        let id = p["functionCall"]["id"].as_str().unwrap();
                        let even: usize = id[2..].parse().unwrap();
                        prop_assert_eq!(p.get("thoughtSignature").is_some(), even.is_multiple_of(2));
                    }
                }
            }
            prop_assert_eq!(got_results, results);
        }

        /// Nothing a provider sends makes the response side panic.
        #[test]
        fn arbitrary_provider_bytes_never_panic(data in gemini_like_json(), status in 100u16..600) {
            let text = data.to_string();
            let mut pair = OpenAiGemini::new(meta());
            let mut out = Vec::new();
            let _ = pair.event(None, &text, &mut out);
            let _ = pair.end(&mut out);
            let _ = OpenAiGemini::new(meta()).response(text.as_bytes());
            let e = OpenAiGemini::new(meta()).error(status, None, text.as_bytes());
            prop_assert!((400..=599).contains(&e.status));
        }

        #[test]
        fn arbitrary_text_never_panics(text in ".{0,200}") {
            let mut out = Vec::new();
            let _ = OpenAiGemini::new(meta()).event(None, &text, &mut out);
            let _ = OpenAiGemini::new(meta()).response(text.as_bytes());
            let _ = OpenAiGemini::new(meta()).error(400, None, text.as_bytes());
        }
    }

    /// JSON built from Gemini's vocabulary, so the fuzzing reaches past the first field.
    fn gemini_like_json() -> impl Strategy<Value = Value> {
        let key = prop_oneof![
            Just("candidates"), Just("content"), Just("parts"), Just("text"), Just("thought"), Just("functionCall"),
            Just("name"), Just("args"), Just("id"), Just("finishReason"), Just("index"), Just("usageMetadata"),
            Just("promptTokenCount"), Just("candidatesTokenCount"), Just("totalTokenCount"), Just("thoughtsTokenCount"),
            Just("promptFeedback"), Just("blockReason"), Just("error"), Just("code"), Just("status"), Just("details"),
            Just("retryDelay"), Just("@type"), Just("thoughtSignature"), Just("executableCode"), Just("role"),
        ];
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<u32>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            prop_oneof![Just("STOP"), Just("SAFETY"), Just("MALFORMED_FUNCTION_CALL"), Just("RESOURCE_EXHAUSTED"),
                Just("type.googleapis.com/google.rpc.RetryInfo"), Just("1e400s"), Just("x")].prop_map(Value::from),
        ];
        leaf.prop_recursive(5, 64, 6, move |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                proptest::collection::btree_map(key.clone(), inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())),
            ]
        })
    }
}
