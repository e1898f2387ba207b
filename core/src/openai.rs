//! OpenAI Chat Completions wire types: the front door's dialect.
//!
//! Requests are parsed into [`ChatRequest`], whose known fields are typed and whose unknown
//! fields are kept in `extra`: a pass-through backend forwards them, a translating backend
//! refuses them (a parameter it would silently drop could change the answer). Responses and
//! stream chunks are built from [`ChatCompletion`] and [`ChatChunk`]; fields that are `None`
//! are omitted, except where OpenAI always sends a `null` (`finish_reason`, `logprobs`,
//! `content`).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::usage::Usage;

/// A Chat Completions request: the body of `POST /v1/chat/completions`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct ChatRequest {
    /// The client-visible model name: a model or an alias of the policy.
    pub model: String,
    /// The conversation so far, oldest first.
    pub messages: Vec<Message>,
    /// Whether the answer is streamed as server-sent events, as OpenAI's `stream`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    /// Stream options, as OpenAI's `stream_options`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    /// The older output token cap, as OpenAI's `max_tokens`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    /// The output token cap, reasoning included, as OpenAI's `max_completion_tokens`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u64>,
    /// Sampling temperature, as OpenAI's `temperature`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Nucleus sampling mass, as OpenAI's `top_p`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// How many choices to generate, as OpenAI's `n`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u64>,
    /// Sequences that end generation, as OpenAI's `stop`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
    /// Functions the model may call, as OpenAI's `tools`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Tool>>,
    /// Whether and which tool the model must call, as OpenAI's `tool_choice` (kept as sent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<Value>,
    /// Whether the model may call several tools in one turn, as OpenAI's `parallel_tool_calls`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel_tool_calls: Option<bool>,
    /// The answer's format (`text`, `json_object`, `json_schema`), as OpenAI's `response_format`
    /// (kept as sent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<Value>,
    /// How much the model should reason (`low`, `medium`, `high` …), as OpenAI's
    /// `reasoning_effort`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_effort: Option<String>,
    /// The end user's id, as OpenAI's `user` (an identity source can read it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Seed for best-effort deterministic sampling, as OpenAI's `seed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    /// Penalty for tokens already present, as OpenAI's `presence_penalty`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f64>,
    /// Penalty by how often a token already appeared, as OpenAI's `frequency_penalty`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f64>,
    /// Whether to return the output tokens' log probabilities, as OpenAI's `logprobs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<bool>,
    /// How many most likely tokens to return per position, as OpenAI's `top_logprobs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<u64>,
    /// Bias added to given token ids' logits, as OpenAI's `logit_bias`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logit_bias: Option<Map<String, Value>>,
    /// Every other field, kept as sent.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
    /// How many bytes the request had on the wire (set by the gate once parsed): the upstream
    /// body is written into a buffer of about that size, so a large request does not grow one
    /// by doubling (a doubling step holds 3× the body at once, and a Wasm VM's linear memory
    /// never shrinks back).
    #[serde(skip)]
    pub wire_len: WireLen,
}

/// A request's size on the wire: a hint, not part of the request's value (always equal).
#[derive(Debug, Clone, Copy, Default)]
pub struct WireLen(pub usize);

impl WireLen {
    /// Room for a translation of the request: its wrapping (content blocks, a system block)
    /// makes it a little longer than the request, and a buffer one byte short doubles.
    pub(crate) fn translated(self) -> WireLen {
        WireLen(self.0.saturating_add(self.0 / 32).saturating_add(1024))
    }
}

impl PartialEq for WireLen {
    fn eq(&self, _: &WireLen) -> bool {
        true
    }
}

/// Encodes `value` as JSON into a buffer sized for a body of about `hint` bytes.
/// The buffer starts at exactly the request's size, so it fits where the request's own bytes
/// were freed (an encoding that comes out longer, which is rare for a large body, doubles it).
/// The writer is `Vec<u8>`, as in `serde_json::to_vec`: one more writer type would repeat every
/// request type's encoder in filter.wasm (+20 KB).
pub(crate) fn encode_sized<T: Serialize + ?Sized>(value: &T, hint: WireLen) -> serde_json::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(hint.0.max(128));
    serde_json::to_writer(&mut out, value)?;
    Ok(out)
}

impl ChatRequest {
    pub(crate) fn is_stream(&self) -> bool {
        self.stream == Some(true)
    }

    /// `max_completion_tokens`, else the older `max_tokens`.
    pub(crate) fn max_output_tokens(&self) -> Option<u64> {
        self.max_completion_tokens.or(self.max_tokens)
    }

    /// Whether the client asked for a usage chunk at the end of a stream.
    pub(crate) fn wants_stream_usage(&self) -> bool {
        self.stream_options.as_ref().and_then(|o| o.include_usage) == Some(true)
    }
}

/// A stream request's `stream_options`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct StreamOptions {
    /// Whether the client wants a final usage chunk (`choices: []`) before `[DONE]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_usage: Option<bool>,
    /// Every other option, kept as sent.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// OpenAI's `stop`: one sequence or a list.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Stop {
    /// A single stop sequence.
    One(String),
    /// Several stop sequences.
    Many(Vec<String>),
}

impl Stop {
    /// The stop sequences as a list.
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s.clone()],
            Stop::Many(v) => v.clone(),
        }
    }
}

/// A tool the model may call, as OpenAI's `tools[]` entry.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Tool {
    /// The tool type (`function`), OpenAI's `type`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The function's definition.
    pub function: FunctionDef,
}

/// A function the model may call.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct FunctionDef {
    /// The function's name, which the model's call names.
    pub name: String,
    /// What the function does, for the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The arguments' JSON Schema.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    /// Whether the arguments must follow the schema exactly, as OpenAI's `strict`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// One chat message. `role` decides which fields matter: `system`/`developer`/`user` have
/// `content`; `assistant` has `content` and/or `tool_calls`; `tool` has `tool_call_id` and
/// `content`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Message {
    /// Who wrote the message.
    pub role: Role,
    /// The message's text or parts (`None`: an assistant turn with only tool calls).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<Content>,
    /// A participant name, as OpenAI's `name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The tool calls an assistant turn made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// The tool call a `tool` message answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// DeepSeek-style reasoning text on assistant turns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    /// An assistant turn's refusal text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
    /// Every other field, kept as sent.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Who wrote a message, as OpenAI's `role`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions from the application.
    System,
    /// Instructions from the developer (OpenAI's newer name for `system`).
    Developer,
    /// The end user.
    User,
    /// The model.
    #[default]
    Assistant,
    /// A tool's result, answering one of the model's tool calls.
    Tool,
    /// A function's result, in OpenAI's legacy function-calling form.
    Function,
}

/// A message's `content`: a plain string or a list of parts.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Typed parts (text, images, audio, files).
    Parts(Vec<ContentPart>),
}

impl Content {
    /// The text of a message: the string, or its text parts joined. `None` if it has non-text
    /// parts.
    pub(crate) fn text_only(&self) -> Option<String> {
        match self {
            Content::Text(s) => Some(s.clone()),
            Content::Parts(parts) => parts
                .iter()
                .map(|p| match p {
                    ContentPart::Text { text } => Some(text.as_str()),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()
                .map(|v| v.concat()),
        }
    }
}

/// One part of a message's `content`, tagged by its `type`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPart {
    /// A text part.
    Text {
        /// The part's text.
        text: String,
    },
    /// An image part.
    ImageUrl {
        /// Where the image is.
        image_url: ImageUrl,
    },
    /// An audio part.
    InputAudio {
        /// The audio data and its format (kept as sent).
        input_audio: Value,
    },
    /// A file part.
    File {
        /// The file's data or id (kept as sent).
        file: Value,
    },
}

/// An image part's `image_url`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct ImageUrl {
    /// The image: an `https` URL or a `data:` URL.
    pub url: String,
    /// The resolution the model sees it at (`low`, `high`, `auto`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// A tool call the model made, as OpenAI's `tool_calls[]` entry.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct ToolCall {
    /// The call's id, which the `tool` message answering it names.
    pub id: String,
    /// Always `function`; some providers (Mistral) omit it, and clients must see plain OpenAI.
    #[serde(rename = "type", default = "function_kind")]
    pub kind: String,
    /// The function called and its arguments.
    pub function: FunctionCall,
}

fn function_kind() -> String {
    "function".to_owned()
}

/// A function call: which function, with what arguments.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct FunctionCall {
    /// The function's name.
    pub name: String,
    /// JSON text, as OpenAI sends it.
    pub arguments: String,
}

// ---- responses ----

/// A non-stream chat completion, as OpenAI answers it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletion {
    /// The completion's id (`chatcmpl-…`).
    pub id: String,
    /// Always `chat.completion`.
    pub object: String,
    /// When the completion was created, in epoch seconds.
    pub created: u64,
    /// The model name the client sees.
    pub model: String,
    /// The generated choices.
    pub choices: Vec<Choice>,
    /// Token usage, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<WireUsage>,
    /// Fields this type does not model (e.g. `system_fingerprint`, `service_tier`), kept so a
    /// pass-through response loses nothing.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One choice of a [`ChatCompletion`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    /// The choice's position in `choices`.
    pub index: u32,
    /// The generated message.
    pub message: AssistantMessage,
    /// Why generation stopped.
    pub finish_reason: Option<FinishReason>,
    /// Log probabilities, when asked for (kept as sent).
    #[serde(default)]
    pub logprobs: Option<Value>,
    /// Fields this type does not model (e.g. `system_fingerprint`, `service_tier`), kept so a
    /// pass-through response loses nothing.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The message a choice carries.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AssistantMessage {
    /// Always `assistant`.
    pub role: Role,
    /// The generated text (`None`: only tool calls, or a refusal).
    pub content: Option<String>,
    /// The tool calls the model made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// Reasoning text, for providers that report it (DeepSeek-style).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    /// The model's refusal text, when it refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
    /// Fields this type does not model (e.g. `system_fingerprint`, `service_tier`), kept so a
    /// pass-through response loses nothing.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Why generation stopped, as OpenAI's `finish_reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A natural end or a stop sequence.
    Stop,
    /// The output token cap was reached.
    Length,
    /// The model called tools.
    ToolCalls,
    /// A content filter stopped the output.
    ContentFilter,
    /// The model called a function (OpenAI's legacy function calling).
    FunctionCall,
}

/// OpenAI's `usage` object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireUsage {
    /// Prompt tokens, cached ones included.
    pub prompt_tokens: u64,
    /// Output tokens, reasoning included.
    pub completion_tokens: u64,
    /// Prompt plus completion tokens.
    pub total_tokens: u64,
    /// A breakdown of the prompt tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
    /// A breakdown of the completion tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_tokens_details: Option<CompletionTokensDetails>,
}

/// OpenAI's `prompt_tokens_details`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens read from the provider's cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_tokens: Option<u64>,
    /// Anthropic cache writes, reported where OpenAI SDKs ignore unknown fields.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write_tokens: Option<u64>,
}

/// OpenAI's `completion_tokens_details`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompletionTokensDetails {
    /// Completion tokens spent on reasoning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_tokens: Option<u64>,
}

impl WireUsage {
    /// The wire form of `u` when the provider reported both the prompt and the completion
    /// tokens; `None` otherwise — unknown is never reported as zero.
    pub fn known(u: &Usage) -> Option<WireUsage> {
        (u.input.is_some() && u.output.is_some()).then(|| WireUsage::from_usage(u))
    }

    /// The wire form of `u`, unknown counts as 0: only for usage known to be complete
    /// ([`WireUsage::known`]).
    pub(crate) fn from_usage(u: &Usage) -> WireUsage {
        let prompt = u.input.unwrap_or(0);
        let completion = u.output.unwrap_or(0);
        WireUsage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt.saturating_add(completion),
            prompt_tokens_details: (u.cached_read.is_some() || u.cache_write.is_some()).then_some(PromptTokensDetails {
                cached_tokens: u.cached_read,
                cache_write_tokens: u.cache_write,
            }),
            completion_tokens_details: u
                .reasoning
                .map(|r| CompletionTokensDetails { reasoning_tokens: Some(r) }),
        }
    }

    /// The normalised record of what an OpenAI-compatible provider reported.
    #[cfg(test)]
    pub(crate) fn to_usage(&self) -> Usage {
        Usage {
            input: Some(self.prompt_tokens),
            output: Some(self.completion_tokens),
            cached_read: self.prompt_tokens_details.as_ref().and_then(|d| d.cached_tokens),
            cache_write: self.prompt_tokens_details.as_ref().and_then(|d| d.cache_write_tokens),
            reasoning: self.completion_tokens_details.as_ref().and_then(|d| d.reasoning_tokens),
        }
    }
}

/// One chunk of a streamed chat completion (`chat.completion.chunk`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatChunk {
    /// The completion's id, the same in every chunk.
    pub id: String,
    /// Always `chat.completion.chunk`.
    pub object: String,
    /// When the completion was created, in epoch seconds.
    pub created: u64,
    /// The model name the client sees.
    pub model: String,
    /// The choices this chunk adds to (empty in the usage chunk).
    pub choices: Vec<ChunkChoice>,
    /// Present only on the usage chunk, and only when the client asked for stream usage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<WireUsage>,
    /// Fields this type does not model (e.g. `system_fingerprint`, `service_tier`), kept so a
    /// pass-through response loses nothing.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// What one chunk adds to one choice.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChunkChoice {
    /// The choice's position.
    pub index: u32,
    /// The text and tool call pieces this chunk adds.
    pub delta: Delta,
    /// Why generation stopped, on the choice's last chunk.
    pub finish_reason: Option<FinishReason>,
    /// Log probabilities, when asked for (kept as sent).
    #[serde(default)]
    pub logprobs: Option<Value>,
}

/// The piece of a message one chunk carries.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Delta {
    /// The role, on a choice's first chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// Text to append.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Reasoning text to append (DeepSeek-style).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    /// Tool call pieces to append.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
    /// Refusal text to append.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
}

/// A piece of one tool call in a stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCallDelta {
    /// Which tool call of the message this piece belongs to.
    pub index: u32,
    /// The call's id, on its first piece.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The call's type (`function`), on its first piece.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The function name and argument text this piece adds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<FunctionCallDelta>,
}

/// A piece of a function call in a stream.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FunctionCallDelta {
    /// The function's name, on the call's first piece.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Argument JSON text to append.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_keeps_unknown_fields_and_reads_both_token_limits() {
        let r: ChatRequest = serde_json::from_str(
            r#"{"model":"m","messages":[{"role":"system","content":"s"},{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}],
                "max_tokens":5,"max_completion_tokens":7,"metadata":{"k":"v"},"stream":true,"stream_options":{"include_usage":true}}"#,
        )
        .unwrap();
        assert_eq!(r.max_output_tokens(), Some(7));
        assert!(r.is_stream() && r.wants_stream_usage());
        assert_eq!(r.extra.get("metadata"), Some(&serde_json::json!({"k":"v"})));
        assert_eq!(r.messages[1].content.as_ref().unwrap().text_only().as_deref(), Some("ab"));
    }

    #[test]
    fn every_openai_request_fixture_parses() {
        let dir = crate::test_support::fixtures_dir().join("openai");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.ends_with(".request.json") || name.starts_with("request_") {
                let bytes = std::fs::read(&path).unwrap();
                let r: ChatRequest = serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
                assert!(!r.messages.is_empty(), "{name}");
                n += 1;
            }
        }
        assert!(n >= 5, "only {n} request fixtures");
    }

    #[test]
    fn usage_round_trips_through_the_wire_form() {
        let u = Usage { input: Some(1220), output: Some(100), cached_read: Some(1152), cache_write: None, reasoning: Some(0) };
        let wire = WireUsage::from_usage(&u);
        assert_eq!(wire.total_tokens, 1320);
        assert_eq!(wire.to_usage(), u);
    }
}
