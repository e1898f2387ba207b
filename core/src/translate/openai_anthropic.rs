//! OpenAI Chat Completions in front, Anthropic Messages behind.
//!
//! [`OpenAiAnthropic`] is one request's translator ([`Pair`]): it builds the `POST /v1/messages`
//! request, turns Anthropic's answer (a message, an error body, or a stream of events) into
//! OpenAI's, and keeps the usage Anthropic reported. Wire types are in [`wire`].
//!
//! # Request
//! * `system` and `developer` messages, wherever they are, become `system` text blocks in order
//!   (their position among the turns is lost: Anthropic has one system prompt).
//! * `tool` messages become `tool_result` blocks; consecutive ones go into ONE user turn, and a
//!   user message right after them joins that turn (after the results, which Anthropic requires
//!   to come first). Assistant `tool_calls` become `tool_use` blocks, their `arguments` parsed
//!   (empty text means `{}`; anything that is not a JSON object is a 400).
//! * Images: `data:<type>;base64,<data>` URLs become base64 sources (jpeg, png, gif, webp);
//!   `http(s)` URLs become URL sources; `detail` has no Anthropic equivalent and is ignored.
//! * `max_tokens` is required upstream: `max_completion_tokens`, else `max_tokens`, else the
//!   target's `default_max_tokens`, else a 400 naming `max_tokens`.
//! * `temperature` above 1 is a 400 (Anthropic's range is 0–1; not clamped).
//! * `tool_choice`: `auto`/`none`/`required` → `auto`/`none`/`any`, a named function →
//!   `{"type": "tool", "name": …}`; `parallel_tool_calls: false` →
//!   `disable_parallel_tool_use: true`.
//! * `reasoning_effort` → `thinking: {"type": "enabled", "budget_tokens": B}` with B from
//!   [`thinking_budget`] (minimal 1024, low 2048, medium 8192, high 16384; `none` disables).
//!   Anthropic requires `1024 <= B < max_tokens`: B is lowered to `max_tokens - 1`, which keeps
//!   OpenAI's meaning (reasoning tokens count against `max_completion_tokens`), and a
//!   `max_tokens` of 1024 or less is a 400. An explicit `thinking` object is passed through.
//! * `response_format` `json_object` / `json_schema` are served with a forced tool (Anthropic's
//!   documented way to get JSON): one tool whose `input_schema` is the schema, `tool_choice`
//!   naming it; its input comes back as the message `content` and `tool_use` as
//!   `finish_reason: "stop"`. Not combinable with `tools` or thinking (400). `strict` is not
//!   forwarded: the schema guides the tool input but is not enforced by decoding.
//! * `user` → `metadata.user_id`; `stream` → `stream: true`; `top_k` (not OpenAI, but common)
//!   is passed through.
//! * Refused with a 400 naming the parameter, because Anthropic cannot honour them: `n > 1`,
//!   `logprobs`, `top_logprobs`, `logit_bias`, non-zero `presence_penalty` /
//!   `frequency_penalty`, `seed`, audio and file parts, `function`-role messages, and every
//!   unknown field except the harmless ones in [`IGNORED_FIELDS`].
//! * Dropped on purpose: a message's `name`, an assistant message's `reasoning_content` and
//!   `refusal` (Anthropic ignores earlier turns' thinking anyway, and cannot take it back
//!   without its signature), a function's `strict`, `stream_options` (the wrapper's business).
//! * Known limit: with thinking on, Anthropic wants the previous turn's signed thinking blocks
//!   back when a tool loop continues; OpenAI clients cannot send them, so such a request gets
//!   Anthropic's 400 (passed on as a provider error).
//!
//! # Response
//! Text blocks are concatenated into `content`, `tool_use` blocks become `tool_calls` (arguments
//! = the input's JSON text), `thinking` blocks become `reasoning_content`. Finish reasons:
//! `end_turn`, `stop_sequence`, `pause_turn` → `stop`; `max_tokens`,
//! `model_context_window_exceeded` → `length`; `tool_use` → `tool_calls`; `refusal` →
//! `content_filter`. Usage: input = `input_tokens + cache_read_input_tokens +
//! cache_creation_input_tokens`, cached_read and cache_write from the cache fields, output =
//! `output_tokens`; each stays `None` when Anthropic did not send it. Reasoning tokens are not
//! reported by Anthropic (they are part of `output_tokens`), so `reasoning` stays `None`.
//!
//! # Stream
//! The first chunk (on `message_start`) carries `role: "assistant"` and `content: ""`.
//! `text_delta` → `content`, `thinking_delta` → `reasoning_content`, `signature_delta` is
//! dropped. Each `tool_use` block gets the next OpenAI tool-call `index` (0, 1, 2… in order of
//! appearance, not Anthropic's block index, which counts text blocks too); its first delta has
//! `id`, `type`, `name` and `arguments: ""`, later ones only `arguments`; a block that streamed
//! no JSON at all gets `"{}"` when it stops, so clients always receive parseable arguments.
//! `ping` becomes an SSE comment (a keep-alive for the client too). The finish chunk (empty
//! delta, `finish_reason`) is sent on `message_stop`, or by `end` if only `message_delta`
//! arrived; a stream that ends with neither is an error. An `error` event is returned as
//! `Err` (provider's fault) so the wrapper ends the client's stream with it. Unknown events,
//! blocks and deltas are ignored, as Anthropic's versioning policy asks.
//!
//! # Errors
//! Anthropic's error types map to OpenAI's (status, `type`, `code`) — see
//! [`provider_error`]. The OpenAI SDKs pick their exception from the status, so the status is
//! what matters most: 529 `overloaded_error` → 503; 401 `authentication_error`, 403
//! `permission_error` and `billing_error` → 502, because the key Anthropic refused is the
//! operator's, not the client's (a 401 would tell the client its own key is wrong).

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::openai::{
    AssistantMessage, ChatChunk, ChatCompletion, ChatRequest, Choice, ChunkChoice, Content, ContentPart, Delta,
    FinishReason, FunctionCall, FunctionCallDelta, Message, Role, ToolCall, ToolCallDelta, WireUsage as OpenAiUsage,
};
use crate::fault::{ApiError, Fault};
use crate::translate::{Pair, ResponseMeta, StreamOut, Target, UpstreamRequest};
use crate::usage::Usage;

#[path = "anthropic_wire.rs"]
pub(crate) mod wire;

use wire::{
    Block, BlockDelta, ErrorBody, ErrorEnvelope, ImageSource, MessageContent, MessagesRequest, MessagesResponse,
    Metadata, ResponseBlock, StreamEvent, ToolChoice, WireMessage, WireRole, WireTool, WireUsage,
};

/// Path of the Messages API.
pub const MESSAGES_PATH: &str = "/v1/messages";
/// The `anthropic-version` header this translator speaks.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";
/// Anthropic's smallest thinking budget.
pub const MIN_THINKING_BUDGET: u64 = 1024;
/// Unknown request fields that are accepted and not forwarded, because they cannot change the
/// answer: `store` and `metadata` (OpenAI's stored completions), `service_tier` (OpenAI's
/// latency/price tier), `prompt_cache_key` (OpenAI cache routing), `safety_identifier` (OpenAI
/// abuse monitoring). `modalities` is accepted only as `["text"]`.
pub const IGNORED_FIELDS: [&str; 5] = ["store", "metadata", "service_tier", "prompt_cache_key", "safety_identifier"];
/// Image media types Anthropic accepts in base64 sources.
pub const IMAGE_MEDIA_TYPES: [&str; 4] = ["image/jpeg", "image/png", "image/gif", "image/webp"];

/// A `reasoning_effort` OpenAI does not define.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownEffort;

/// The thinking budget for an OpenAI `reasoning_effort` (`Ok(None)` for `none`: no thinking).
/// Anthropic's minimum is [`MIN_THINKING_BUDGET`]; the rest double-ish per level, leaving room
/// for the answer within common `max_tokens` settings.
pub fn thinking_budget(effort: &str) -> Result<Option<u64>, UnknownEffort> {
    match effort {
        "none" => Ok(None),
        "minimal" => Ok(Some(MIN_THINKING_BUDGET)),
        "low" => Ok(Some(2048)),
        "medium" => Ok(Some(8192)),
        "high" => Ok(Some(16384)),
        _ => Err(UnknownEffort),
    }
}

/// OpenAI's finish reason for an Anthropic `stop_reason` (`json_mode`: the forced JSON tool's
/// `tool_use` is an ordinary stop).
pub fn finish_reason(stop_reason: Option<&str>, json_mode: bool) -> FinishReason {
    match stop_reason {
        Some("max_tokens" | "model_context_window_exceeded") => FinishReason::Length,
        Some("tool_use") if !json_mode => FinishReason::ToolCalls,
        Some("refusal") => FinishReason::ContentFilter,
        // end_turn, stop_sequence, pause_turn (server tools only, never requested here), the
        // forced JSON tool, and anything newer.
        _ => FinishReason::Stop,
    }
}

/// Normalised usage from Anthropic's counts. `input` includes cache reads and writes; it is
/// known when `input_tokens` is (absent cache fields mean the response predates caching or
/// used none).
pub fn usage_of(u: &WireUsage) -> Usage {
    Usage {
        input: u.input_tokens.map(|i| {
            i.saturating_add(u.cache_read_input_tokens.unwrap_or(0))
                .saturating_add(u.cache_creation_input_tokens.unwrap_or(0))
        }),
        output: u.output_tokens,
        cached_read: u.cache_read_input_tokens,
        cache_write: u.cache_creation_input_tokens,
        reasoning: None,
    }
}

/// An Anthropic error (`error.type`, `error.message`) in OpenAI's terms. `http` is the response
/// status (`None` for an `error` event inside a stream, whose status is derived from the type).
///
/// | Anthropic type          | status            | OpenAI `type`           | `code`                          |
/// |-------------------------|-------------------|-------------------------|---------------------------------|
/// | `invalid_request_error` | as sent (400)     | `invalid_request_error` | `context_length_exceeded` if the prompt is too long, else none |
/// | `authentication_error`  | 502               | `server_error`          | `upstream_authentication_error` |
/// | `permission_error`      | 502               | `server_error`          | `upstream_permission_error`     |
/// | `billing_error`         | 502               | `server_error`          | `upstream_billing_error`        |
/// | `not_found_error`       | as sent (404)     | `invalid_request_error` | `not_found`                     |
/// | `request_too_large`     | as sent (413)     | `invalid_request_error` | `request_too_large`             |
/// | `rate_limit_error`      | as sent (429)     | `rate_limit_error`      | `rate_limit_exceeded`           |
/// | `api_error`             | as sent (500)     | `server_error`          | `provider_error`                |
/// | `timeout_error`         | as sent (504)     | `server_error`          | `provider_timeout`              |
/// | `overloaded_error`      | 503 (from 529)    | `server_error`          | `provider_overloaded`           |
/// | anything else           | as sent           | by status family        | the Anthropic type              |
///
/// "As sent" means the HTTP status when it is an error status, with 529 → 503 and anything
/// outside 400–599 → 502.
pub fn provider_error(http: Option<u16>, err: &ErrorBody, retry_after: Option<u64>) -> ApiError {
    let (status, kind, code): (u16, &'static str, Option<String>) = match err.kind.as_str() {
        "invalid_request_error" => {
            let too_long = err.message.contains("prompt is too long");
            (400, "invalid_request_error", too_long.then(|| "context_length_exceeded".to_owned()))
        }
        "authentication_error" => (502, "server_error", Some("upstream_authentication_error".to_owned())),
        "permission_error" => (502, "server_error", Some("upstream_permission_error".to_owned())),
        "billing_error" => (502, "server_error", Some("upstream_billing_error".to_owned())),
        "not_found_error" => (404, "invalid_request_error", Some("not_found".to_owned())),
        "request_too_large" => (413, "invalid_request_error", Some("request_too_large".to_owned())),
        "rate_limit_error" => (429, "rate_limit_error", Some("rate_limit_exceeded".to_owned())),
        "api_error" => (500, "server_error", Some("provider_error".to_owned())),
        "timeout_error" => (504, "server_error", Some("provider_timeout".to_owned())),
        "overloaded_error" => (503, "server_error", Some("provider_overloaded".to_owned())),
        other => {
            let status = http.map(client_status).unwrap_or(502);
            (status, kind_for_status(status), (!other.is_empty()).then(|| other.to_owned()))
        }
    };
    let status = match (err.kind.as_str(), http) {
        // The operator's key or account, not the client's request.
        ("authentication_error" | "permission_error" | "billing_error", _) => 502,
        (_, Some(h)) => client_status(h),
        (_, None) => status,
    };
    let message = match err.kind.as_str() {
        "authentication_error" | "permission_error" | "billing_error" => {
            format!("The provider refused the gateway's credentials ({}: {})", err.kind, err.message)
        }
        _ if err.message.is_empty() => format!("Anthropic returned {}", err.kind),
        _ => err.message.clone(),
    };
    ApiError { fault: Fault::Provider, status, kind, code, param: None, message, retry_after }
}

/// The status a client sees for an upstream error status.
fn client_status(http: u16) -> u16 {
    match http {
        401..=403 => 502,
        529 => 503,
        400..=599 => http,
        _ => 502,
    }
}

fn kind_for_status(status: u16) -> &'static str {
    match status {
        429 => "rate_limit_error",
        400..=499 => "invalid_request_error",
        _ => "server_error",
    }
}

/// What a content block of the stream being translated is.
#[derive(Debug, Clone, PartialEq)]
enum BlockState {
    Text,
    Thinking,
    /// A tool call, with its OpenAI `index`, whether any argument text was sent, and the input
    /// from `content_block_start` (sent at the stop if no JSON was streamed).
    Tool {
        index: u32,
        args_sent: bool,
        initial: Value,
    },
    /// The forced JSON tool of `response_format`: its input is the message content.
    JsonContent {
        sent: bool,
        initial: Value,
    },
    /// Redacted thinking, server-tool blocks, newer kinds: not shown to the client.
    Ignored,
}

/// The OpenAI ⇄ Anthropic translator for one request.
#[derive(Debug, Clone)]
pub struct OpenAiAnthropic {
    meta: ResponseMeta,
    /// Name of the forced tool that carries a `response_format` answer.
    json_tool: Option<String>,
    usage: WireUsage,
    role_sent: bool,
    blocks: BTreeMap<u32, BlockState>,
    next_tool_index: u32,
    stop_reason: Option<String>,
    /// The finish chunk was sent, or an error ended the stream: nothing more is emitted.
    done: bool,
}

impl OpenAiAnthropic {
    /// A translator that answers as `meta` (client-visible model name, id, creation time).
    pub fn new(meta: ResponseMeta) -> Self {
        OpenAiAnthropic {
            meta,
            json_tool: None,
            usage: WireUsage::default(),
            role_sent: false,
            blocks: BTreeMap::new(),
            next_tool_index: 0,
            stop_reason: None,
            done: false,
        }
    }

    /// The Anthropic request body for `req` (what [`Pair::request`] sends).
    pub fn messages_request(&mut self, req: &ChatRequest, target: &Target) -> Result<MessagesRequest, ApiError> {
        refuse_unsupported(req)?;
        let max_tokens = req.max_output_tokens().or(target.default_max_tokens).ok_or_else(|| {
            ApiError::invalid(
                Some("max_tokens"),
                "max_tokens is required by this model's provider (Anthropic) and no default is configured: set max_tokens or max_completion_tokens",
            )
        })?;
        if let Some(t) = req.temperature {
            if t > 1.0 {
                return Err(ApiError::unsupported(
                    "temperature",
                    format!("temperature {t} is out of range for this model's provider (Anthropic accepts 0 to 1)"),
                ));
            }
            if t < 0.0 || t.is_nan() {
                return Err(ApiError::invalid(Some("temperature"), format!("temperature {t} is below 0")));
            }
        }
        let (system, messages) = convert_messages(&req.messages)?;
        let mut tools = convert_tools(req)?;
        let mut tool_choice = convert_tool_choice(req, tools.is_some())?;
        let thinking = convert_thinking(req, max_tokens)?;

        self.json_tool = None;
        if let Some((tool, name)) = json_tool(req.response_format.as_ref())? {
            if tools.is_some() {
                return Err(ApiError::unsupported(
                    "response_format",
                    "response_format json_object/json_schema cannot be combined with tools for this model's provider (Anthropic)",
                ));
            }
            if thinking.is_some() {
                return Err(ApiError::unsupported(
                    "response_format",
                    "response_format json_object/json_schema cannot be combined with thinking/reasoning_effort for this model's provider (Anthropic)",
                ));
            }
            tool_choice = Some(ToolChoice::Tool { name: name.clone(), disable_parallel_tool_use: Some(true) });
            tools = Some(vec![tool]);
            self.json_tool = Some(name);
        }

        let top_k = match req.extra.get("top_k") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_u64()
                    .ok_or_else(|| ApiError::invalid(Some("top_k"), "top_k must be a non-negative integer"))?,
            ),
        };
        Ok(MessagesRequest {
            model: target.upstream_model.clone(),
            max_tokens,
            messages,
            system: (!system.is_empty()).then_some(MessageContent::Blocks(system)),
            stop_sequences: req.stop.as_ref().map(|s| s.to_vec()).filter(|v| !v.is_empty()),
            stream: req.is_stream().then_some(true),
            temperature: req.temperature,
            top_p: req.top_p,
            top_k,
            tools,
            tool_choice,
            thinking,
            metadata: req.user.as_ref().map(|u| Metadata { user_id: Some(u.clone()) }),
        })
    }

    /// Turns a Messages response into a chat completion and records its usage.
    fn completion(&mut self, r: MessagesResponse) -> ChatCompletion {
        if let Some(u) = r.usage {
            self.usage.merge(u);
        }
        let json_mode = self.json_tool.is_some();
        let mut text: Option<String> = None;
        let mut reasoning: Option<String> = None;
        let mut calls = Vec::new();
        for block in r.content {
            match block {
                ResponseBlock::Text { text: t } => text.get_or_insert_with(String::new).push_str(&t),
                ResponseBlock::Thinking { thinking } => reasoning.get_or_insert_with(String::new).push_str(&thinking),
                ResponseBlock::ToolUse { input, .. } if json_mode => {
                    text.get_or_insert_with(String::new).push_str(&json_text(&input))
                }
                ResponseBlock::ToolUse { id, name, input } => calls.push(ToolCall {
                    id,
                    kind: "function".to_owned(),
                    function: FunctionCall { name, arguments: json_text(&input) },
                }),
                ResponseBlock::RedactedThinking {} | ResponseBlock::Other => {}
            }
        }
        if text.is_none() && calls.is_empty() {
            text = Some(String::new());
        }
        ChatCompletion {
            id: self.meta.id.clone(),
            object: "chat.completion".to_owned(),
            created: self.meta.created,
            model: self.meta.model.clone(),
            choices: vec![Choice {
                index: 0,
                message: AssistantMessage {
                    role: Role::Assistant,
                    content: text,
                    tool_calls: (!calls.is_empty()).then_some(calls),
                    reasoning_content: reasoning,
                    ..AssistantMessage::default()
                },
                finish_reason: Some(finish_reason(r.stop_reason.as_deref(), json_mode)),
                ..Choice::default()
            }],
            usage: OpenAiUsage::known(&usage_of(&self.usage)),
            ..ChatCompletion::default()
        }
    }

    fn chunk(&mut self, mut delta: Delta, finish: Option<FinishReason>) -> StreamOut {
        if !self.role_sent {
            delta.role = Some(Role::Assistant);
            self.role_sent = true;
        }
        StreamOut::Chunk(ChatChunk {
            id: self.meta.id.clone(),
            object: "chat.completion.chunk".to_owned(),
            created: self.meta.created,
            model: self.meta.model.clone(),
            choices: vec![ChunkChoice { index: 0, delta, finish_reason: finish, ..ChunkChoice::default() }],
            ..ChatChunk::default()
        })
    }

    fn content(&mut self, text: &str, out: &mut Vec<StreamOut>) {
        if !text.is_empty() {
            out.push(self.chunk(Delta { content: Some(text.to_owned()), ..Delta::default() }, None));
        }
    }

    fn arguments(&mut self, index: u32, text: &str, out: &mut Vec<StreamOut>) {
        let call = ToolCallDelta {
            index,
            id: None,
            kind: None,
            function: Some(FunctionCallDelta { name: None, arguments: Some(text.to_owned()) }),
        };
        out.push(self.chunk(Delta { tool_calls: Some(vec![call]), ..Delta::default() }, None));
    }

    /// A block ends: a tool call or JSON answer that streamed no JSON gets its initial input.
    fn close_block(&mut self, index: u32, out: &mut Vec<StreamOut>) {
        match self.blocks.remove(&index) {
            Some(BlockState::Tool { index, args_sent: false, initial }) => {
                self.arguments(index, &json_text(&initial), out)
            }
            Some(BlockState::JsonContent { sent: false, initial }) => self.content(&json_text(&initial), out),
            _ => {}
        }
    }

    fn finish(&mut self, out: &mut Vec<StreamOut>) {
        let open: Vec<u32> = self.blocks.keys().copied().collect();
        for index in open {
            self.close_block(index, out);
        }
        let reason = finish_reason(self.stop_reason.as_deref(), self.json_tool.is_some());
        out.push(self.chunk(Delta::default(), Some(reason)));
        self.done = true;
    }

    fn stream_event(&mut self, ev: StreamEvent, out: &mut Vec<StreamOut>) -> Result<(), ApiError> {
        match ev {
            StreamEvent::MessageStart { message } => {
                if let Some(u) = message.usage {
                    self.usage.merge(u);
                }
                if !self.role_sent {
                    out.push(self.chunk(Delta { content: Some(String::new()), ..Delta::default() }, None));
                }
            }
            StreamEvent::ContentBlockStart { index, content_block } => {
                let state = match content_block {
                    ResponseBlock::Text { text } => {
                        self.content(&text, out);
                        BlockState::Text
                    }
                    ResponseBlock::Thinking { thinking } => {
                        if !thinking.is_empty() {
                            out.push(self.chunk(Delta { reasoning_content: Some(thinking), ..Delta::default() }, None));
                        }
                        BlockState::Thinking
                    }
                    ResponseBlock::ToolUse { input, .. } if self.json_tool.is_some() => {
                        BlockState::JsonContent { sent: false, initial: input }
                    }
                    ResponseBlock::ToolUse { id, name, input } => {
                        let tool_index = self.next_tool_index;
                        self.next_tool_index = self.next_tool_index.saturating_add(1);
                        let call = ToolCallDelta {
                            index: tool_index,
                            id: Some(id),
                            kind: Some("function".to_owned()),
                            function: Some(FunctionCallDelta { name: Some(name), arguments: Some(String::new()) }),
                        };
                        out.push(self.chunk(Delta { tool_calls: Some(vec![call]), ..Delta::default() }, None));
                        BlockState::Tool { index: tool_index, args_sent: false, initial: input }
                    }
                    ResponseBlock::RedactedThinking {} | ResponseBlock::Other => BlockState::Ignored,
                };
                self.blocks.insert(index, state);
            }
            StreamEvent::ContentBlockDelta { index, delta } => match delta {
                BlockDelta::TextDelta { text } => self.content(&text, out),
                BlockDelta::ThinkingDelta { thinking } => {
                    if !thinking.is_empty() {
                        out.push(self.chunk(Delta { reasoning_content: Some(thinking), ..Delta::default() }, None));
                    }
                }
                BlockDelta::InputJsonDelta { partial_json } => match self.blocks.get_mut(&index) {
                    Some(BlockState::Tool { index: tool_index, args_sent, .. }) => {
                        if !partial_json.is_empty() {
                            *args_sent = true;
                            let tool_index = *tool_index;
                            self.arguments(tool_index, &partial_json, out);
                        }
                    }
                    Some(BlockState::JsonContent { sent, .. }) => {
                        if !partial_json.is_empty() {
                            *sent = true;
                            self.content(&partial_json, out);
                        }
                    }
                    Some(BlockState::Ignored) => {}
                    _ => return Err(ApiError::bad_upstream(format!(
                        "Anthropic stream: input_json_delta for content block {index}, which is not a tool_use block"
                    ))),
                },
                BlockDelta::SignatureDelta {} | BlockDelta::Other => {}
            },
            StreamEvent::ContentBlockStop { index } => self.close_block(index, out),
            StreamEvent::MessageDelta { delta, usage } => {
                if let Some(u) = usage {
                    self.usage.merge(u);
                }
                if delta.stop_reason.is_some() {
                    self.stop_reason = delta.stop_reason;
                }
            }
            StreamEvent::MessageStop {} => self.finish(out),
            StreamEvent::Ping {} => out.push(StreamOut::Comment("ping".to_owned())),
            StreamEvent::Error { error } => {
                self.done = true;
                return Err(provider_error(None, &error, None));
            }
            StreamEvent::Unknown => {}
        }
        Ok(())
    }
}

impl Pair for OpenAiAnthropic {
    fn request(&mut self, req: &ChatRequest, target: &Target) -> Result<UpstreamRequest, ApiError> {
        let body = self.messages_request(req, target)?;
        let bytes = crate::openai::encode_sized(&body, req.wire_len.translated()).map_err(|e| ApiError {
            fault: Fault::Gateway,
            status: 500,
            kind: "server_error",
            code: None,
            param: None,
            message: format!("cannot encode the Anthropic request: {e}"),
            retry_after: None,
        })?;
        Ok(UpstreamRequest {
            path: MESSAGES_PATH.to_owned(),
            headers: vec![
                ("content-type", "application/json".to_owned()),
                ("anthropic-version", ANTHROPIC_VERSION.to_owned()),
            ],
            body: bytes,
            stream: req.is_stream(),
        })
    }

    fn response(&mut self, body: &[u8]) -> Result<ChatCompletion, ApiError> {
        let r: MessagesResponse = serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_upstream(format!("Anthropic's response is not a Messages object: {e}")))?;
        match r.kind.as_deref() {
            Some("message") => Ok(self.completion(r)),
            Some("error") => {
                let err = r.error.unwrap_or(ErrorBody { kind: String::new(), message: String::new() });
                Err(provider_error(None, &err, None))
            }
            // `{}` or anything else that is not a Message: no answer to pass off as one.
            _ => Err(ApiError::bad_upstream("Anthropic's response is not a Messages object (no \"type\": \"message\")")),
        }
    }

    fn error(&mut self, status: u16, retry_after: Option<u64>, body: &[u8]) -> ApiError {
        match serde_json::from_slice::<ErrorEnvelope>(body) {
            Ok(env) => provider_error(Some(status), &env.error, retry_after),
            Err(_) => {
                let status_out = client_status(status);
                ApiError {
                    fault: Fault::Provider,
                    status: status_out,
                    kind: kind_for_status(status_out),
                    code: Some("bad_upstream_response".to_owned()),
                    param: None,
                    message: format!("Anthropic answered with HTTP {status} and an error body that could not be read"),
                    retry_after,
                }
            }
        }
    }

    fn event(&mut self, event: Option<&str>, data: &str, out: &mut Vec<StreamOut>) -> Result<(), ApiError> {
        if self.done {
            return Ok(());
        }
        if data.trim().is_empty() {
            // e.g. a bare `event: ping`: nothing to translate.
            return Ok(());
        }
        let ev = match serde_json::from_str::<StreamEvent>(data) {
            Ok(ev) => ev,
            Err(first) => parse_with_event_name(event, data).ok_or_else(|| {
                ApiError::bad_upstream(format!(
                    "Anthropic stream event {} is not readable: {first}",
                    event.unwrap_or("(unnamed)")
                ))
            })?,
        };
        self.stream_event(ev, out)
    }

    fn end(&mut self, out: &mut Vec<StreamOut>) -> Result<(), ApiError> {
        if self.done {
            return Ok(());
        }
        if self.stop_reason.is_some() {
            self.finish(out);
            return Ok(());
        }
        self.done = true;
        Err(ApiError::bad_upstream("Anthropic's stream ended before message_stop"))
    }

    fn usage(&self) -> Usage {
        usage_of(&self.usage)
    }
}

/// A data payload without a `type` field, typed by its SSE `event:` name instead.
fn parse_with_event_name(event: Option<&str>, data: &str) -> Option<StreamEvent> {
    let mut v: Map<String, Value> = serde_json::from_str(data).ok()?;
    if v.contains_key("type") {
        return None;
    }
    v.insert("type".to_owned(), Value::String(event?.to_owned()));
    serde_json::from_value(Value::Object(v)).ok()
}

fn json_text(v: &Value) -> String {
    match v {
        Value::Null => "{}".to_owned(),
        v => serde_json::to_string(v).unwrap_or_else(|_| "{}".to_owned()),
    }
}

fn refuse_unsupported(req: &ChatRequest) -> Result<(), ApiError> {
    const WHO: &str = "this model's provider (Anthropic)";
    if req.n.is_some_and(|n| n > 1) {
        return Err(ApiError::unsupported("n", format!("n > 1 is not supported by {WHO}")));
    }
    if req.logprobs == Some(true) {
        return Err(ApiError::unsupported("logprobs", format!("logprobs is not supported by {WHO}")));
    }
    if req.top_logprobs.is_some_and(|n| n > 0) {
        return Err(ApiError::unsupported("top_logprobs", format!("top_logprobs is not supported by {WHO}")));
    }
    if req.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
        return Err(ApiError::unsupported("logit_bias", format!("logit_bias is not supported by {WHO}")));
    }
    if req.presence_penalty.is_some_and(|p| p != 0.0) {
        return Err(ApiError::unsupported(
            "presence_penalty",
            format!("presence_penalty is not supported by {WHO}"),
        ));
    }
    if req.frequency_penalty.is_some_and(|p| p != 0.0) {
        return Err(ApiError::unsupported(
            "frequency_penalty",
            format!("frequency_penalty is not supported by {WHO}"),
        ));
    }
    if req.seed.is_some() {
        return Err(ApiError::unsupported("seed", format!("seed is not supported by {WHO}")));
    }
    for (key, value) in &req.extra {
        match key.as_str() {
            "thinking" | "top_k" => {}
            k if IGNORED_FIELDS.contains(&k) => {}
            "modalities" if *value == serde_json::json!(["text"]) || value.is_null() => {}
            k => return Err(ApiError::unsupported(k, format!("{k} is not supported by {WHO}"))),
        }
    }
    Ok(())
}

/// `system` blocks and the turns, from OpenAI's messages.
fn convert_messages(messages: &[Message]) -> Result<(Vec<Block>, Vec<WireMessage>), ApiError> {
    let mut system = Vec::new();
    let mut turns: Vec<WireMessage> = Vec::new();
    // Whether the last turn is a user turn that started with tool results (later tool results
    // and a following user message join it).
    let mut open_results = false;
    for (i, m) in messages.iter().enumerate() {
        if let Some(key) = m.extra.keys().next() {
            return Err(ApiError::unsupported(
                &format!("messages[{i}].{key}"),
                format!("messages[{i}].{key} is not supported by this model's provider (Anthropic)"),
            ));
        }
        match m.role {
            Role::System | Role::Developer => {
                let text = match &m.content {
                    None => String::new(),
                    Some(c) => c.text_only().ok_or_else(|| {
                        ApiError::invalid(
                            Some(&format!("messages[{i}].content")),
                            "system and developer messages may only contain text",
                        )
                    })?,
                };
                if !text.is_empty() {
                    system.push(Block::text(text));
                }
            }
            Role::User => {
                let blocks = user_blocks(m.content.as_ref(), &format!("messages[{i}].content"))?;
                if open_results {
                    push_blocks(&mut turns, blocks);
                    open_results = false;
                } else {
                    turns.push(WireMessage { role: WireRole::User, content: MessageContent::Blocks(blocks) });
                }
            }
            Role::Tool => {
                let id = m.tool_call_id.clone().ok_or_else(|| {
                    ApiError::invalid(Some(&format!("messages[{i}].tool_call_id")), "a tool message needs tool_call_id")
                })?;
                let content = match &m.content {
                    None => None,
                    Some(Content::Text(s)) if s.is_empty() => None,
                    Some(Content::Text(s)) => Some(MessageContent::Text(s.clone())),
                    Some(c @ Content::Parts(_)) => {
                        let blocks = user_blocks(Some(c), &format!("messages[{i}].content"))?;
                        (!blocks.is_empty()).then_some(MessageContent::Blocks(blocks))
                    }
                };
                let block = Block::ToolResult { tool_use_id: id, content, is_error: None, cache_control: None };
                if open_results {
                    push_blocks(&mut turns, vec![block]);
                } else {
                    turns.push(WireMessage { role: WireRole::User, content: MessageContent::Blocks(vec![block]) });
                    open_results = true;
                }
            }
            Role::Assistant => {
                open_results = false;
                let mut blocks = Vec::new();
                match &m.content {
                    None => {}
                    Some(c) => {
                        let text = c.text_only().ok_or_else(|| {
                            ApiError::invalid(
                                Some(&format!("messages[{i}].content")),
                                "assistant messages may only contain text",
                            )
                        })?;
                        if !text.is_empty() {
                            blocks.push(Block::text(text));
                        }
                    }
                }
                for (j, call) in m.tool_calls.iter().flatten().enumerate() {
                    let param = format!("messages[{i}].tool_calls[{j}]");
                    if call.kind != "function" {
                        return Err(ApiError::unsupported(
                            &format!("{param}.type"),
                            format!("tool call type {:?} is not supported by this model's provider (Anthropic)", call.kind),
                        ));
                    }
                    let input = super::tool_arguments(&call.function.arguments, &param)?;
                    blocks.push(Block::ToolUse {
                        id: call.id.clone(),
                        name: call.function.name.clone(),
                        input,
                        cache_control: None,
                    });
                }
                turns.push(WireMessage { role: WireRole::Assistant, content: MessageContent::Blocks(blocks) });
            }
            Role::Function => {
                return Err(ApiError::unsupported(
                    &format!("messages[{i}].role"),
                    "the deprecated function role is not supported for this model's provider (Anthropic): use tool messages",
                ))
            }
        }
    }
    Ok((system, turns))
}

fn push_blocks(turns: &mut [WireMessage], blocks: Vec<Block>) {
    if let Some(WireMessage { content: MessageContent::Blocks(existing), .. }) = turns.last_mut() {
        existing.extend(blocks);
    }
}

/// A user (or tool-result) message's content as blocks.
fn user_blocks(content: Option<&Content>, param: &str) -> Result<Vec<Block>, ApiError> {
    let parts = match content {
        None => return Ok(vec![]),
        Some(Content::Text(s)) => return Ok(if s.is_empty() { vec![] } else { vec![Block::text(s.clone())] }),
        Some(Content::Parts(parts)) => parts,
    };
    let mut blocks = Vec::with_capacity(parts.len());
    for (j, part) in parts.iter().enumerate() {
        match part {
            ContentPart::Text { text } => {
                if !text.is_empty() {
                    blocks.push(Block::text(text.clone()));
                }
            }
            ContentPart::ImageUrl { image_url } => blocks.push(Block::Image {
                source: image_source(&image_url.url, &format!("{param}[{j}].image_url.url"))?,
                cache_control: None,
            }),
            ContentPart::InputAudio { .. } => {
                return Err(ApiError::unsupported(
                    &format!("{param}[{j}]"),
                    "audio input is not supported by this model's provider (Anthropic)",
                ))
            }
            ContentPart::File { .. } => {
                return Err(ApiError::unsupported(
                    &format!("{param}[{j}]"),
                    "file input is not supported by this model's provider (Anthropic)",
                ))
            }
        }
    }
    Ok(blocks)
}

/// An image URL as an Anthropic image source: a base64 data URL or an http(s) URL.
pub fn image_source(url: &str, param: &str) -> Result<ImageSource, ApiError> {
    if let Some(rest) = url.strip_prefix("data:") {
        let (header, data) = rest
            .split_once(',')
            .ok_or_else(|| ApiError::invalid(Some(param), "a data URL needs a comma before its data"))?;
        let media_type = header.strip_suffix(";base64").ok_or_else(|| {
            ApiError::unsupported(param, "image data URLs must be base64-encoded (data:<type>;base64,<data>)")
        })?;
        let media_type = media_type.to_ascii_lowercase();
        if !IMAGE_MEDIA_TYPES.contains(&media_type.as_str()) {
            return Err(ApiError::unsupported(
                param,
                format!("image type {media_type:?} is not supported by this model's provider (Anthropic accepts jpeg, png, gif, webp)"),
            ));
        }
        return Ok(ImageSource::Base64 { media_type, data: data.to_owned() });
    }
    let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    if lower.starts_with("https://") || lower.starts_with("http://") {
        return Ok(ImageSource::Url { url: url.to_owned() });
    }
    Err(ApiError::invalid(Some(param), "an image URL must be a base64 data URL or an http(s) URL"))
}

fn convert_tools(req: &ChatRequest) -> Result<Option<Vec<WireTool>>, ApiError> {
    let Some(tools) = req.tools.as_ref().filter(|t| !t.is_empty()) else { return Ok(None) };
    tools
        .iter()
        .enumerate()
        .map(|(i, t)| {
            if t.kind != "function" {
                return Err(ApiError::unsupported(
                    &format!("tools[{i}].type"),
                    format!("tool type {:?} is not supported by this model's provider (Anthropic)", t.kind),
                ));
            }
            Ok(WireTool {
                name: t.function.name.clone(),
                description: t.function.description.clone(),
                input_schema: t
                    .function
                    .parameters
                    .clone()
                    .unwrap_or_else(|| serde_json::json!({"type": "object", "properties": {}})),
                cache_control: None,
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn convert_tool_choice(req: &ChatRequest, has_tools: bool) -> Result<Option<ToolChoice>, ApiError> {
    let disable = (req.parallel_tool_calls == Some(false)).then_some(true);
    let choice = match &req.tool_choice {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => match s.as_str() {
            "auto" => Some(ToolChoice::Auto { disable_parallel_tool_use: None }),
            "none" => Some(ToolChoice::None {}),
            "required" => Some(ToolChoice::Any { disable_parallel_tool_use: None }),
            other => {
                return Err(ApiError::invalid(
                    Some("tool_choice"),
                    format!("tool_choice {other:?} is not one of auto, none, required"),
                ))
            }
        },
        Some(v @ Value::Object(o)) => match o.get("type").and_then(Value::as_str) {
            Some("function") => {
                let name = v.pointer("/function/name").and_then(Value::as_str).ok_or_else(|| {
                    ApiError::invalid(Some("tool_choice"), "tool_choice of type function needs function.name")
                })?;
                Some(ToolChoice::Tool { name: name.to_owned(), disable_parallel_tool_use: None })
            }
            other => {
                return Err(ApiError::unsupported(
                    "tool_choice",
                    format!(
                        "tool_choice of type {} is not supported by this model's provider (Anthropic)",
                        other.unwrap_or("(none)")
                    ),
                ))
            }
        },
        Some(_) => {
            return Err(ApiError::invalid(Some("tool_choice"), "tool_choice must be a string or an object"))
        }
    };
    if !has_tools {
        return match choice {
            None | Some(ToolChoice::None {}) | Some(ToolChoice::Auto { .. }) => Ok(None),
            Some(_) => Err(ApiError::invalid(Some("tool_choice"), "tool_choice requires tools")),
        };
    }
    Ok(match choice {
        None => disable.map(|d| ToolChoice::Auto { disable_parallel_tool_use: Some(d) }),
        Some(ToolChoice::Auto { .. }) => Some(ToolChoice::Auto { disable_parallel_tool_use: disable }),
        Some(ToolChoice::Any { .. }) => Some(ToolChoice::Any { disable_parallel_tool_use: disable }),
        Some(ToolChoice::Tool { name, .. }) => Some(ToolChoice::Tool { name, disable_parallel_tool_use: disable }),
        Some(ToolChoice::None {}) => Some(ToolChoice::None {}),
    })
}

fn convert_thinking(req: &ChatRequest, max_tokens: u64) -> Result<Option<Value>, ApiError> {
    let explicit = req.extra.get("thinking").filter(|v| !v.is_null());
    match (&req.reasoning_effort, explicit) {
        (Some(_), Some(_)) => {
            Err(ApiError::invalid(Some("reasoning_effort"), "set either reasoning_effort or thinking, not both"))
        }
        (None, Some(v)) if v.is_object() => Ok(Some(v.clone())),
        (None, Some(_)) => Err(ApiError::invalid(Some("thinking"), "thinking must be an object")),
        (None, None) => Ok(None),
        (Some(effort), None) => {
            let budget = thinking_budget(effort).map_err(|UnknownEffort| {
                ApiError::invalid(
                    Some("reasoning_effort"),
                    format!("reasoning_effort {effort:?} is not one of none, minimal, low, medium, high"),
                )
            })?;
            let Some(budget) = budget else { return Ok(None) };
            if max_tokens <= MIN_THINKING_BUDGET {
                return Err(ApiError::unsupported(
                    "max_tokens",
                    format!(
                        "reasoning_effort needs max_tokens above {MIN_THINKING_BUDGET} for this model's provider (Anthropic), got {max_tokens}"
                    ),
                ));
            }
            let budget = budget.min(max_tokens - 1);
            Ok(Some(serde_json::json!({"type": "enabled", "budget_tokens": budget})))
        }
    }
}

/// The forced tool for `response_format` json_object / json_schema, and its name.
fn json_tool(format: Option<&Value>) -> Result<Option<(WireTool, String)>, ApiError> {
    let Some(format) = format.filter(|v| !v.is_null()) else { return Ok(None) };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some((
            WireTool {
                name: "json_response".to_owned(),
                description: Some("Respond with a JSON object.".to_owned()),
                input_schema: serde_json::json!({"type": "object"}),
                cache_control: None,
            },
            "json_response".to_owned(),
        ))),
        Some("json_schema") => {
            let spec = format.get("json_schema").ok_or_else(|| {
                ApiError::invalid(Some("response_format"), "response_format json_schema needs json_schema")
            })?;
            let name = spec
                .get("name")
                .and_then(Value::as_str)
                .filter(|n| {
                    !n.is_empty()
                        && n.len() <= 64
                        && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                })
                .unwrap_or("json_response")
                .to_owned();
            let schema = spec.get("schema").cloned().unwrap_or_else(|| serde_json::json!({"type": "object"}));
            let description = spec
                .get("description")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| "Respond with a JSON object that matches this schema.".to_owned());
            Ok(Some((
                WireTool {
                    name: name.clone(),
                    description: Some(description),
                    input_schema: schema,
                    cache_control: None,
                },
                name,
            )))
        }
        other => Err(ApiError::unsupported(
            "response_format",
            format!(
                "response_format type {} is not supported by this model's provider (Anthropic)",
                other.unwrap_or("(none)")
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::ChatChunk;
    use crate::sse::{SseDecoder, SseEvent};
    use proptest::prelude::*;
    use serde_json::json;
    use std::path::PathBuf;

    // ---- helpers ----

    fn meta() -> ResponseMeta {
        ResponseMeta { id: "chatcmpl-tg".to_owned(), model: "claude-alias".to_owned(), created: 1_700_000_000 }
    }

    fn target(default_max_tokens: Option<u64>) -> Target {
        Target {
            kind: crate::translate::ProviderKind::Anthropic,
            upstream_model: "claude-upstream".to_owned(),
            default_max_tokens,
        }
    }

    fn chat(v: Value) -> ChatRequest {
        let mut v = v;
        if v.get("model").is_none() {
            v["model"] = json!("claude-alias");
        }
        serde_json::from_value(v).expect("test request parses as an OpenAI request")
    }

    /// The Anthropic body for an OpenAI request (default max_tokens 1000).
    fn body(v: Value) -> Value {
        let mut p = OpenAiAnthropic::new(meta());
        let up = p.request(&chat(v), &target(Some(1000))).expect("translates");
        serde_json::from_slice(&up.body).unwrap()
    }

    fn refused(v: Value) -> ApiError {
        let mut p = OpenAiAnthropic::new(meta());
        p.request(&chat(v), &target(Some(1000))).expect_err("must be refused")
    }

    fn user(text: &str) -> Value {
        json!({"role": "user", "content": text})
    }

    /// Runs events through a fresh translator (set up by `p`), then `end`.
    fn run(
        p: &mut OpenAiAnthropic,
        events: &[(Option<String>, String)],
    ) -> (Vec<StreamOut>, Result<(), ApiError>) {
        let mut out = Vec::new();
        for (name, data) in events {
            if let Err(e) = p.event(name.as_deref(), data, &mut out) {
                return (out, Err(e));
            }
        }
        let r = p.end(&mut out);
        (out, r)
    }

    fn chunks(out: &[StreamOut]) -> Vec<ChatChunk> {
        out.iter()
            .filter_map(|o| match o {
                StreamOut::Chunk(c) => Some(c.clone()),
                _ => None,
            })
            .collect()
    }

    fn ev(data: Value) -> (Option<String>, String) {
        (data["type"].as_str().map(str::to_owned), data.to_string())
    }

    fn sse_events(bytes: &[u8], splits: &[usize]) -> Vec<(Option<String>, String)> {
        let mut d = SseDecoder::new();
        let mut events = Vec::new();
        let mut start = 0;
        let mut cuts: Vec<usize> = splits.iter().copied().filter(|&c| c > 0 && c < bytes.len()).collect();
        cuts.sort_unstable();
        cuts.push(bytes.len());
        for cut in cuts {
            if cut < start {
                continue;
            }
            d.feed(&bytes[start..cut]);
            start = cut;
            for item in d.by_ref() {
                match item.expect("fixture decodes") {
                    SseEvent::Message(m) => events.push((m.event, m.data)),
                    SseEvent::Comment(_) => {}
                }
            }
        }
        d.finish().expect("fixture is not truncated");
        events
    }

    /// vercel/ai `.chunks.txt`: one data payload per line, the event name taken from `type`.
    fn payload_events(text: &str) -> Vec<(Option<String>, String)> {
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let v: Value = serde_json::from_str(l).expect("payload line is JSON");
                (v["type"].as_str().map(str::to_owned), l.to_owned())
            })
            .collect()
    }

    fn fixtures_dir() -> PathBuf {
        crate::test_support::fixtures_dir().join("anthropic")
    }

    // ---- fixture expectations, computed from the recorded JSON alone ----

    #[derive(Debug, Default)]
    struct Recorded {
        text: String,
        reasoning: String,
        /// (id, name, JSON text) in order of appearance.
        tools: Vec<(String, String, String)>,
        stop_reason: Option<String>,
        usage: Usage,
        error: Option<String>,
    }

    fn recorded_usage(raw: &[&Value]) -> Usage {
        let field = |name: &str| raw.iter().filter_map(|u| u.get(name).and_then(Value::as_u64)).next_back();
        let (input, read, write) =
            (field("input_tokens"), field("cache_read_input_tokens"), field("cache_creation_input_tokens"));
        Usage {
            input: input.map(|i| i + read.unwrap_or(0) + write.unwrap_or(0)),
            output: field("output_tokens"),
            cached_read: read,
            cache_write: write,
            reasoning: None,
        }
    }

    fn recorded_stream(payloads: &[Value]) -> Recorded {
        let mut r = Recorded::default();
        let mut usages = Vec::new();
        let mut tool_blocks: Vec<(u64, usize)> = Vec::new();
        for p in payloads {
            match p["type"].as_str().unwrap_or("") {
                "message_start" => usages.extend(p.pointer("/message/usage")),
                "message_delta" => {
                    usages.extend(p.get("usage"));
                    if let Some(s) = p.pointer("/delta/stop_reason").and_then(Value::as_str) {
                        r.stop_reason = Some(s.to_owned());
                    }
                }
                "content_block_start" if p["content_block"]["type"] == "tool_use" => {
                    let b = &p["content_block"];
                    tool_blocks.push((p["index"].as_u64().unwrap(), r.tools.len()));
                    r.tools.push((
                        b["id"].as_str().unwrap().to_owned(),
                        b["name"].as_str().unwrap().to_owned(),
                        String::new(),
                    ));
                }
                "content_block_delta" => {
                    let d = &p["delta"];
                    match d["type"].as_str().unwrap_or("") {
                        "text_delta" => r.text.push_str(d["text"].as_str().unwrap()),
                        "thinking_delta" => r.reasoning.push_str(d["thinking"].as_str().unwrap()),
                        "input_json_delta" => {
                            let idx = p["index"].as_u64().unwrap();
                            let (_, t) = tool_blocks.iter().find(|(b, _)| *b == idx).expect("delta for a tool block");
                            r.tools[*t].2.push_str(d["partial_json"].as_str().unwrap());
                        }
                        _ => {}
                    }
                }
                "error" => r.error = p.pointer("/error/type").and_then(Value::as_str).map(str::to_owned),
                _ => {}
            }
        }
        r.usage = recorded_usage(&usages);
        r
    }

    fn expected_finish(stop_reason: Option<&str>) -> FinishReason {
        match stop_reason {
            Some("end_turn" | "stop_sequence" | "pause_turn") => FinishReason::Stop,
            Some("max_tokens" | "model_context_window_exceeded") => FinishReason::Length,
            Some("tool_use") => FinishReason::ToolCalls,
            Some("refusal") => FinishReason::ContentFilter,
            other => panic!("fixture has an unexpected stop_reason {other:?}"),
        }
    }

    fn same_json(a: &str, b: &str) -> bool {
        let parse = |s: &str| if s.trim().is_empty() { json!({}) } else { serde_json::from_str::<Value>(s).unwrap() };
        parse(a) == parse(b)
    }

    /// Checks a translated stream against what the fixture recorded. Returns the output's
    /// serialization, to compare runs with different chunkings.
    fn check_stream(name: &str, events: &[(Option<String>, String)]) -> String {
        let payloads: Vec<Value> = events.iter().map(|(_, d)| serde_json::from_str(d).unwrap()).collect();
        let rec = recorded_stream(&payloads);
        let mut p = OpenAiAnthropic::new(meta());
        let (out, result) = run(&mut p, events);
        if let Some(kind) = &rec.error {
            let e = result.expect_err(&format!("{name}: error event must end the stream with an error"));
            assert_eq!(e.fault, Fault::Provider, "{name}");
            assert_eq!(
                provider_error(None, &ErrorBody { kind: kind.clone(), message: String::new() }, None).status,
                e.status
            );
        } else {
            result.unwrap_or_else(|e| panic!("{name}: {e:?}"));
        }
        let cs = chunks(&out);
        assert!(!cs.is_empty(), "{name}: no chunks");
        let mut content = String::new();
        let mut reasoning = String::new();
        let mut tools: Vec<(String, String, String)> = Vec::new();
        for (i, c) in cs.iter().enumerate() {
            let text = serde_json::to_string(c).unwrap();
            let back: ChatChunk =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: chunk {i} reparse: {e}"));
            assert_eq!(&back, c, "{name}: chunk {i} round trip");
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["object"], "chat.completion.chunk");
            assert!(v.get("usage").is_none(), "{name}: the pair never sends usage chunks");
            assert_eq!((c.id.as_str(), c.model.as_str(), c.created), ("chatcmpl-tg", "claude-alias", 1_700_000_000));
            assert_eq!(c.choices.len(), 1, "{name}");
            let d = &c.choices[0].delta;
            assert_eq!(d.role.is_some(), i == 0, "{name}: role exactly on the first chunk (chunk {i})");
            content.push_str(d.content.as_deref().unwrap_or(""));
            reasoning.push_str(d.reasoning_content.as_deref().unwrap_or(""));
            for t in d.tool_calls.iter().flatten() {
                let f = t.function.as_ref().expect("tool delta has a function");
                if t.index as usize == tools.len() {
                    assert_eq!(t.kind.as_deref(), Some("function"), "{name}");
                    assert_eq!(f.arguments.as_deref(), Some(""), "{name}: first tool delta has empty arguments");
                    tools.push((
                        t.id.clone().expect("first delta has id"),
                        f.name.clone().expect("and name"),
                        String::new(),
                    ));
                } else {
                    assert!((t.index as usize) < tools.len(), "{name}: tool index {} out of order", t.index);
                    assert!(
                        t.id.is_none() && t.kind.is_none() && f.name.is_none(),
                        "{name}: later deltas carry only arguments"
                    );
                    tools[t.index as usize].2.push_str(f.arguments.as_deref().unwrap_or(""));
                }
            }
            let last = i + 1 == cs.len();
            assert_eq!(
                c.choices[0].finish_reason.is_some(),
                last && rec.error.is_none(),
                "{name}: finish only on the last chunk"
            );
        }
        if rec.error.is_none() {
            let last = cs.last().unwrap();
            assert_eq!(last.choices[0].finish_reason, Some(expected_finish(rec.stop_reason.as_deref())), "{name}");
            assert_eq!(last.choices[0].delta, Delta::default(), "{name}: finish chunk has an empty delta");
        }
        assert_eq!(content, rec.text, "{name}: content");
        assert_eq!(reasoning, rec.reasoning, "{name}: reasoning");
        assert_eq!(tools.len(), rec.tools.len(), "{name}: tool calls");
        for (got, want) in tools.iter().zip(&rec.tools) {
            assert_eq!((&got.0, &got.1), (&want.0, &want.1), "{name}: tool id/name");
            assert!(!got.2.is_empty(), "{name}: arguments are never left empty");
            assert!(same_json(&got.2, &want.2), "{name}: arguments {} vs recorded {}", got.2, want.2);
        }
        assert_eq!(p.usage(), rec.usage, "{name}: usage");
        out.iter().map(|o| format!("{o:?}\n")).collect()
    }

    fn check_response(name: &str, bytes: &[u8]) {
        let raw: Value = serde_json::from_slice(bytes).unwrap();
        let mut p = OpenAiAnthropic::new(meta());
        let c = p.response(bytes).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        let text = serde_json::to_string(&c).unwrap();
        let back: ChatCompletion = serde_json::from_str(&text).unwrap();
        assert_eq!(back, c, "{name}: round trip");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        let blocks = raw["content"].as_array().unwrap();
        let want_text: String =
            blocks.iter().filter(|b| b["type"] == "text").map(|b| b["text"].as_str().unwrap()).collect();
        let want_tools: Vec<&Value> = blocks.iter().filter(|b| b["type"] == "tool_use").collect();
        let want_reasoning: String =
            blocks.iter().filter(|b| b["type"] == "thinking").map(|b| b["thinking"].as_str().unwrap()).collect();
        let m = &c.choices[0].message;
        assert_eq!(m.content.clone().unwrap_or_default(), want_text, "{name}: content");
        assert_eq!(m.reasoning_content.clone().unwrap_or_default(), want_reasoning, "{name}: reasoning");
        let calls = m.tool_calls.clone().unwrap_or_default();
        assert_eq!(calls.len(), want_tools.len(), "{name}: tool calls");
        for (call, want) in calls.iter().zip(want_tools) {
            assert_eq!(call.id, want["id"].as_str().unwrap());
            assert_eq!(call.function.name, want["name"].as_str().unwrap());
            assert_eq!(serde_json::from_str::<Value>(&call.function.arguments).unwrap(), want["input"], "{name}");
        }
        assert_eq!(c.choices[0].finish_reason, Some(expected_finish(raw["stop_reason"].as_str())), "{name}");
        let usage = recorded_usage(&[&raw["usage"]]);
        assert_eq!(p.usage(), usage, "{name}: usage");
        assert_eq!(c.usage, Some(OpenAiUsage::from_usage(&usage)), "{name}: wire usage");
    }

    fn check_error(name: &str, bytes: &[u8]) {
        let status: u16 = name.split('_').nth(1).and_then(|s| s.parse().ok()).expect("error_<status>_… name");
        let raw: Value = serde_json::from_slice(bytes).unwrap();
        let mut p = OpenAiAnthropic::new(meta());
        let e = p.error(status, Some(7), bytes);
        let want_status = match status {
            401 | 403 => 502,
            529 => 503,
            s => s,
        };
        assert_eq!(e.status, want_status, "{name}");
        assert_eq!(e.fault, Fault::Provider, "{name}");
        assert_eq!(e.retry_after, Some(7), "{name}: retry-after kept");
        assert!(e.message.contains(raw["error"]["message"].as_str().unwrap()), "{name}: message kept");
        let body: Value = serde_json::from_slice(&e.body()).unwrap();
        let obj = body["error"].as_object().expect("OpenAI error envelope");
        let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["code", "message", "param", "type"], "{name}");
        let kind = match want_status {
            429 => "rate_limit_error",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        };
        assert_eq!(body["error"]["type"], kind, "{name}");
    }

    /// Anthropic request fixtures with string contents written as blocks, and the parts an
    /// OpenAI request cannot express (`cache_control`, `stream: false`, `is_error: false`)
    /// removed.
    fn normalize(v: &mut Value) {
        match v {
            Value::Object(o) => {
                o.remove("cache_control");
                if o.get("stream") == Some(&json!(false)) {
                    o.remove("stream");
                }
                if o.get("is_error") == Some(&json!(false)) {
                    o.remove("is_error");
                }
                for key in ["content", "system"] {
                    if let Some(Value::String(s)) = o.get(key) {
                        let s = s.clone();
                        o.insert(key.to_owned(), json!([{"type": "text", "text": s}]));
                    }
                }
                o.values_mut().for_each(normalize);
            }
            Value::Array(a) => a.iter_mut().for_each(normalize),
            _ => {}
        }
    }

    fn get_str(v: &Value, pointer: &str) -> String {
        v.pointer(pointer).and_then(Value::as_str).unwrap_or_else(|| panic!("{pointer}")).to_owned()
    }

    /// The OpenAI request a client would send to get exactly the recorded Anthropic request.
    fn openai_equivalent(name: &str, anthropic: &Value) -> Option<Value> {
        let weather_tool = json!([{"type": "function", "function": {"name": "get_weather", "description": "Get the weather for a specific location",
            "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}}}]);
        Some(match name {
            "messages_nonstream_max_tokens.request.json" => {
                json!({"max_tokens": 15, "messages": [user("What does Nietzsche mean by 'God is dead'?")]})
            }
            "messages_chat_history.request.json" => json!({"max_completion_tokens": 30, "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Hello, Start all responses with your name Claude."},
                                             {"type": "text", "text": "End all responses with [COPY, CLAUDE OVER AND OUT!]"}]},
                {"role": "assistant", "content": "Claude: Sure! [COPY, CLAUDE OVER AND OUT!]"},
                {"role": "user", "content": [{"type": "text", "text": "Add the time and date to the beginning of your response after your name."},
                                             {"type": "text", "text": "Explain string theory succinctly to a complete noob."}]}]}),
            // Two system prompts, one of them a developer message placed after the user turn.
            "messages_multi_system_prompt.request.json" => json!({"max_tokens": 15, "temperature": 0.8, "messages": [
                {"role": "system", "content": "You are an AI assistant tasked with analyzing literary works."},
                {"role": "user", "content": [{"type": "text", "text": "Hello, I am looking for information about some books!"},
                                             {"type": "text", "text": "What is the best selling book?"}]},
                {"role": "developer", "content": [{"type": "text", "text": "only respond in all caps"}]}]}),
            "messages_nonstream_cache_write.request.json" => {
                json!({"max_tokens": 100, "temperature": 0.1, "messages": [
                {"role": "system", "content": get_str(anthropic, "/system/0/text")},
                user("What are the key principles for designing scalable systems?")]})
            }
            "messages_nonstream_tool_use.request.json" => json!({"max_tokens": 200, "tools": weather_tool,
                "messages": [user("What is the weather in San Francisco, CA?")]}),
            "stream_text_tool_use.request.json" => json!({"max_tokens": 200, "tools": weather_tool, "stream": true,
                "stream_options": {"include_usage": true}, "messages": [user("What is the weather in San Francisco, CA?")]}),
            "messages_nonstream_after_tool_result.request.json" => {
                json!({"max_tokens": 500, "tools": weather_tool, "messages": [
                user("What is the weather in San Francisco, CA?"),
                {"role": "assistant", "content": get_str(anthropic, "/messages/1/content/0/text"), "tool_calls": [
                    {"id": "toolu_01DYJo37oETVsCdLTTcCWcdq", "type": "function",
                     "function": {"name": "get_weather", "arguments": "{\"location\": \"San Francisco, CA\"}"}}]},
                {"role": "tool", "tool_call_id": "toolu_01DYJo37oETVsCdLTTcCWcdq", "content": [{"type": "text", "text": "The weather is 73f"}]}]})
            }
            "stream_stop_sequence.request.json" => {
                json!({"max_tokens": 8192, "stop": ["```"], "temperature": 1.0, "stream": true, "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Very short function describing a pelican"}]},
                {"role": "assistant", "content": "```python"}]})
            }
            // reasoning_effort "minimal" is Anthropic's smallest budget, 1024.
            "stream_thinking.request.json" => json!({"max_tokens": 4096, "stream": true, "reasoning_effort": "minimal",
                "messages": [user("How do I cross the street?")]}),
            "stream_tool_use_no_args.request.json" => json!({"max_tokens": 8192, "temperature": 1.0, "stream": true,
                "tools": [{"type": "function", "function": {"name": "pelican_name_generator", "description": "", "parameters": {"properties": {}, "type": "object"}}}],
                "messages": [{"role": "user", "content": [{"type": "text", "text": "Generate one name for a pet pelican"}]}]}),
            "request_image_base64.json" => {
                json!({"max_tokens": 8192, "temperature": 1.0, "stream": true, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{}", get_str(anthropic, "/messages/0/content/0/source/data"))}},
                {"type": "text", "text": "Describe image in three words"}]}]})
            }
            "request_image_url_after_tool.json" => json!({"max_tokens": 4096, "stream": false, "tool_choice": "auto",
                "tools": [{"type": "function", "function": {"name": "get_file", "description": "",
                    "parameters": {"additionalProperties": false, "properties": {}, "type": "object"}}}],
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "Use the get_file tool now to retrieve a image file, then describe what you received."}]},
                    {"role": "assistant", "content": "I'll retrieve the file for you now.", "tool_calls": [
                        {"id": "toolu_01XBL6B2Z996VStAuNCQapHS", "type": "function", "function": {"name": "get_file", "arguments": "{}"}}]},
                    {"role": "tool", "tool_call_id": "toolu_01XBL6B2Z996VStAuNCQapHS",
                     "content": [{"type": "image_url", "image_url": {"url": "https://www.gstatic.com/webp/gallery3/1.png"}}]}]}),
            _ => return None,
        })
    }

    fn check_request(name: &str, bytes: &[u8]) -> bool {
        let raw: Value = serde_json::from_slice(bytes).unwrap();
        let parsed: MessagesRequest = serde_json::from_slice(bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            serde_json::to_value(&parsed).unwrap(),
            raw,
            "{name}: every field is modelled (lossless round trip)"
        );
        let Some(openai) = openai_equivalent(name, &raw) else { return false };
        let mut p = OpenAiAnthropic::new(meta());
        let t = Target { upstream_model: raw["model"].as_str().unwrap().to_owned(), ..target(None) };
        let up = p.request(&chat(openai), &t).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        let mut got: Value = serde_json::from_slice(&up.body).unwrap();
        let mut want = raw;
        normalize(&mut got);
        normalize(&mut want);
        assert_eq!(got, want, "{name}: an OpenAI request translates to the recorded shape");
        assert_eq!(up.stream, want.get("stream") == Some(&json!(true)), "{name}");
        true
    }

    /// File name patterns that are not translator input, skipped on purpose: response headers
    /// (`*.headers.json`) and text pasted into GitHub issues (`*.issue-dump.txt`).
    const SKIPPED: [&str; 2] = [".headers.json", ".issue-dump.txt"];

    #[test]
    fn every_anthropic_fixture_translates() {
        let dir = fixtures_dir();
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("fixtures missing at {} (set TOLLGATE_FIXTURES): {e}", dir.display()));
        let mut names: Vec<String> = entries.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        let (mut requests, mut compared, mut responses, mut streams, mut errors, mut skipped) = (0, 0, 0, 0, 0, 0);
        for name in &names {
            let bytes = std::fs::read(dir.join(name)).unwrap();
            if SKIPPED.iter().any(|s| name.ends_with(s)) {
                skipped += 1;
            } else if name.ends_with(".request.json") || name.starts_with("request_") {
                requests += 1;
                compared += usize::from(check_request(name, &bytes));
            } else if name.starts_with("error_") && name.ends_with(".json") {
                errors += 1;
                check_error(name, &bytes);
            } else if name.ends_with(".sse") {
                streams += 1;
                let whole = check_stream(name, &sse_events(&bytes, &[]));
                let splits: Vec<usize> = (1..bytes.len()).collect();
                assert_eq!(check_stream(name, &sse_events(&bytes, &splits)), whole, "{name}: byte-by-byte feed");
            } else if name.ends_with(".chunks.txt") {
                streams += 1;
                check_stream(name, &payload_events(std::str::from_utf8(&bytes).unwrap()));
            } else if name.ends_with(".json") {
                responses += 1;
                check_response(name, &bytes);
            } else {
                panic!("{name}: fixture of unknown kind; classify it here");
            }
        }
        eprintln!(
            "anthropic fixtures: {requests} requests ({compared} rebuilt from OpenAI), {responses} responses, {streams} streams, {errors} errors, {skipped} skipped"
        );
        // A new request fixture without an entry in openai_equivalent() is still checked for a
        // lossless round trip through MessagesRequest; the ones recorded today all have one.
        assert!(
            requests >= 12 && compared >= 12 && responses >= 8 && streams >= 12 && errors >= 4,
            "fixtures went missing"
        );
    }

    // ---- request rules ----

    #[test]
    fn request_goes_to_messages_with_version_header_and_no_key() {
        let mut p = OpenAiAnthropic::new(meta());
        let up = p.request(&chat(json!({"messages": [user("hi")], "stream": true})), &target(Some(64))).unwrap();
        assert_eq!(up.path, "/v1/messages");
        assert!(up.stream);
        assert_eq!(
            up.headers,
            vec![("content-type", "application/json".to_owned()), ("anthropic-version", "2023-06-01".to_owned())]
        );
        let b: Value = serde_json::from_slice(&up.body).unwrap();
        assert_eq!(b["model"], "claude-upstream");
        assert_eq!(b["stream"], true);
        assert_eq!(b["max_tokens"], 64);
    }

    #[test]
    fn system_and_developer_messages_anywhere_become_system_blocks_in_order() {
        let b = body(json!({"messages": [
            {"role": "system", "content": "one"},
            user("hi"),
            {"role": "developer", "content": [{"type": "text", "text": "two"}, {"type": "text", "text": "+"}]},
            {"role": "assistant", "content": "hello"},
            {"role": "system", "content": "three"},
            user("again")]}));
        assert_eq!(
            b["system"],
            json!([{"type": "text", "text": "one"}, {"type": "text", "text": "two+"}, {"type": "text", "text": "three"}])
        );
        let roles: Vec<&str> = b["messages"].as_array().unwrap().iter().map(|m| m["role"].as_str().unwrap()).collect();
        assert_eq!(roles, ["user", "assistant", "user"]);
        assert!(b.get("system").is_some());
        assert!(body(json!({"messages": [user("x")]})).get("system").is_none(), "no system messages, no system field");
    }

    #[test]
    fn system_message_with_an_image_is_a_400() {
        let e = refused(
            json!({"messages": [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}, user("x")]}),
        );
        assert_eq!((e.status, e.param.as_deref()), (400, Some("messages[0].content")));
    }

    #[test]
    fn consecutive_tool_results_share_one_user_turn_and_a_following_user_message_joins_it() {
        let b = body(json!({"messages": [
            user("weather in Paris and Rome?"),
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "t1", "type": "function", "function": {"name": "w", "arguments": "{\"city\":\"Paris\"}"}},
                {"id": "t2", "type": "function", "function": {"name": "w", "arguments": "{\"city\":\"Rome\"}"}}]},
            {"role": "tool", "tool_call_id": "t1", "content": "20C"},
            {"role": "tool", "tool_call_id": "t2", "content": [{"type": "text", "text": "25C"}]},
            user("and in Oslo?"),
            {"role": "assistant", "content": "10C"},
            user("thanks")]}));
        assert_eq!(
            b["messages"],
            json!([
                {"role": "user", "content": [{"type": "text", "text": "weather in Paris and Rome?"}]},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "t1", "name": "w", "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "t2", "name": "w", "input": {"city": "Rome"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "content": "20C"},
                    {"type": "tool_result", "tool_use_id": "t2", "content": [{"type": "text", "text": "25C"}]},
                    {"type": "text", "text": "and in Oslo?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "10C"}]},
                {"role": "user", "content": [{"type": "text", "text": "thanks"}]}
            ])
        );
    }

    #[test]
    fn tool_results_after_a_new_assistant_turn_start_a_new_user_turn() {
        let b = body(json!({"messages": [
            user("go"),
            {"role": "assistant", "tool_calls": [{"id": "a", "type": "function", "function": {"name": "f", "arguments": ""}}]},
            {"role": "tool", "tool_call_id": "a", "content": ""},
            {"role": "assistant", "tool_calls": [{"id": "b", "type": "function", "function": {"name": "f", "arguments": " {} "}}]},
            {"role": "tool", "tool_call_id": "b", "content": "ok"}]}));
        let m = b["messages"].as_array().unwrap();
        assert_eq!(m.len(), 5);
        assert_eq!(m[1]["content"][0]["input"], json!({}), "empty arguments are {{}}");
        assert_eq!(
            m[2]["content"],
            json!([{"type": "tool_result", "tool_use_id": "a"}]),
            "empty result has no content"
        );
        assert_eq!(m[4]["content"][0]["tool_use_id"], "b");
    }

    #[test]
    fn tool_call_arguments_that_are_not_a_json_object_are_a_400() {
        for args in ["{\"a\":", "[1,2]", "nope"] {
            let e = refused(json!({"messages": [user("x"),
                {"role": "assistant", "tool_calls": [{"id": "a", "type": "function", "function": {"name": "f", "arguments": args}}]}]}));
            assert_eq!(
                (e.status, e.param.as_deref()),
                (400, Some("messages[1].tool_calls[0].function.arguments")),
                "{args}"
            );
            assert_eq!(e.fault, Fault::Client);
        }
    }

    #[test]
    fn tool_message_without_tool_call_id_is_a_400() {
        let e = refused(json!({"messages": [user("x"), {"role": "tool", "content": "r"}]}));
        assert_eq!(e.param.as_deref(), Some("messages[1].tool_call_id"));
    }

    #[test]
    fn max_tokens_comes_from_the_request_then_the_target_default_else_a_400() {
        let mut p = OpenAiAnthropic::new(meta());
        let get = |p: &mut OpenAiAnthropic, v: Value, d: Option<u64>| -> Result<Value, ApiError> {
            p.request(&chat(v), &target(d)).map(|u| serde_json::from_slice(&u.body).unwrap())
        };
        let b = get(&mut p, json!({"messages": [user("x")], "max_tokens": 5, "max_completion_tokens": 7}), Some(9))
            .unwrap();
        assert_eq!(b["max_tokens"], 7, "max_completion_tokens wins");
        let b = get(&mut p, json!({"messages": [user("x")], "max_tokens": 5}), Some(9)).unwrap();
        assert_eq!(b["max_tokens"], 5);
        let b = get(&mut p, json!({"messages": [user("x")]}), Some(9)).unwrap();
        assert_eq!(b["max_tokens"], 9, "the configured default");
        let e = get(&mut p, json!({"messages": [user("x")]}), None).unwrap_err();
        assert_eq!((e.status, e.kind, e.param.as_deref()), (400, "invalid_request_error", Some("max_tokens")));
        assert!(e.message.contains("max_tokens"));
    }

    #[test]
    fn temperature_above_one_is_a_400_not_clamped() {
        let e = refused(json!({"messages": [user("x")], "temperature": 1.5}));
        assert_eq!(
            (e.status, e.param.as_deref(), e.code.as_deref()),
            (400, Some("temperature"), Some("unsupported_parameter"))
        );
        assert_eq!(
            refused(json!({"messages": [user("x")], "temperature": -0.1})).param.as_deref(),
            Some("temperature")
        );
        let b = body(json!({"messages": [user("x")], "temperature": 1.0, "top_p": 0.9}));
        assert_eq!((b["temperature"].as_f64(), b["top_p"].as_f64()), (Some(1.0), Some(0.9)));
    }

    #[test]
    fn stop_user_and_top_k_map_to_anthropic_fields() {
        let b = body(json!({"messages": [user("x")], "stop": "END", "user": "u-42", "top_k": 5}));
        assert_eq!(b["stop_sequences"], json!(["END"]));
        assert_eq!(b["metadata"], json!({"user_id": "u-42"}));
        assert_eq!(b["top_k"], 5);
        let b = body(json!({"messages": [user("x")], "stop": ["a", "b"]}));
        assert_eq!(b["stop_sequences"], json!(["a", "b"]));
        assert!(body(json!({"messages": [user("x")], "stop": []})).get("stop_sequences").is_none());
        assert_eq!(refused(json!({"messages": [user("x")], "top_k": -1})).param.as_deref(), Some("top_k"));
    }

    #[test]
    fn parameters_anthropic_cannot_honour_are_400s_naming_them() {
        let cases = [
            (json!({"n": 2}), "n"),
            (json!({"logprobs": true}), "logprobs"),
            (json!({"top_logprobs": 3}), "top_logprobs"),
            (json!({"logit_bias": {"50256": -100}}), "logit_bias"),
            (json!({"presence_penalty": 0.5}), "presence_penalty"),
            (json!({"frequency_penalty": -1.0}), "frequency_penalty"),
            (json!({"seed": 7}), "seed"),
            (json!({"response_format": {"type": "grammar"}}), "response_format"),
            (json!({"prediction": {"type": "content", "content": "x"}}), "prediction"),
            (json!({"modalities": ["text", "audio"]}), "modalities"),
            (json!({"functions": []}), "functions"),
            (json!({"web_search_options": {}}), "web_search_options"),
        ];
        for (extra, param) in cases {
            let mut v = json!({"messages": [user("x")]});
            v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            let e = refused(v);
            assert_eq!((e.status, e.param.as_deref(), e.fault), (400, Some(param), Fault::Client), "{param}");
            assert!(e.message.contains(param) && e.message.contains("Anthropic"), "{}", e.message);
        }
    }

    #[test]
    fn audio_file_and_function_role_messages_are_400s() {
        let audio = refused(
            json!({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAA", "format": "wav"}}]}]}),
        );
        assert_eq!(audio.param.as_deref(), Some("messages[0].content[0]"));
        let file = refused(
            json!({"messages": [user("x"), {"role": "user", "content": [{"type": "text", "text": "see"}, {"type": "file", "file": {"file_id": "f"}}]}]}),
        );
        assert_eq!(file.param.as_deref(), Some("messages[1].content[1]"));
        let func = refused(json!({"messages": [user("x"), {"role": "function", "name": "f", "content": "r"}]}));
        assert_eq!(func.param.as_deref(), Some("messages[1].role"));
        let extra =
            refused(json!({"messages": [{"role": "user", "content": "x", "cache_control": {"type": "ephemeral"}}]}));
        assert_eq!(extra.param.as_deref(), Some("messages[0].cache_control"));
    }

    #[test]
    fn harmless_or_neutral_parameters_are_accepted_and_not_forwarded() {
        let b = body(
            json!({"messages": [{"role": "user", "content": "x", "name": "ann"}], "store": true, "metadata": {"k": "v"},
            "service_tier": "auto", "prompt_cache_key": "k", "safety_identifier": "s", "modalities": ["text"],
            "n": 1, "logprobs": false, "top_logprobs": 0, "logit_bias": {}, "presence_penalty": 0, "frequency_penalty": 0.0,
            "stream_options": {"include_usage": true}, "response_format": {"type": "text"}, "parallel_tool_calls": false}),
        );
        let keys: Vec<&String> = b.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["max_tokens", "messages", "model"], "nothing else is forwarded");
    }

    #[test]
    fn images_as_base64_data_urls_and_http_urls() {
        let b = body(json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "compare"},
            {"type": "image_url", "image_url": {"url": "data:image/JPEG;base64,/9j/4AAQ", "detail": "high"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
            {"type": "image_url", "image_url": {"url": "HTTP://example.com/b.gif"}}]}]}));
        assert_eq!(
            b["messages"][0]["content"],
            json!([
                {"type": "text", "text": "compare"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQ"}},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
                {"type": "image", "source": {"type": "url", "url": "HTTP://example.com/b.gif"}}
            ])
        );
        for (url, code) in [
            ("data:image/png,rawbytes", Some("unsupported_parameter")),
            ("data:image/tiff;base64,AAAA", Some("unsupported_parameter")),
            ("data:image/png;base64", None),
            ("ftp://example.com/a.png", None),
            ("file:///etc/passwd", None),
        ] {
            let e = refused(
                json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}),
            );
            assert_eq!(
                (e.status, e.param.as_deref(), e.code.as_deref()),
                (400, Some("messages[0].content[0].image_url.url"), code),
                "{url}"
            );
        }
    }

    #[test]
    fn tools_become_anthropic_tools_with_a_default_schema() {
        let b = body(json!({"messages": [user("x")], "tools": [
            {"type": "function", "function": {"name": "a", "description": "d", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}, "strict": true}},
            {"type": "function", "function": {"name": "b"}}]}));
        assert_eq!(
            b["tools"],
            json!([
                {"name": "a", "description": "d", "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}},
                {"name": "b", "input_schema": {"type": "object", "properties": {}}}
            ])
        );
        let e = refused(json!({"messages": [user("x")], "tools": [{"type": "custom", "function": {"name": "a"}}]}));
        assert_eq!(e.param.as_deref(), Some("tools[0].type"));
    }

    #[test]
    fn tool_choice_forms() {
        let tools = json!([{"type": "function", "function": {"name": "get"}}]);
        let tc = |choice: Value, parallel: Option<bool>| -> Value {
            let mut v = json!({"messages": [user("x")], "tools": tools, "tool_choice": choice});
            if let Some(p) = parallel {
                v["parallel_tool_calls"] = json!(p);
            }
            body(v).get("tool_choice").cloned().unwrap_or(Value::Null)
        };
        assert_eq!(tc(json!("auto"), None), json!({"type": "auto"}));
        assert_eq!(tc(json!("none"), None), json!({"type": "none"}));
        assert_eq!(tc(json!("required"), None), json!({"type": "any"}));
        assert_eq!(
            tc(json!({"type": "function", "function": {"name": "get"}}), None),
            json!({"type": "tool", "name": "get"})
        );
        assert_eq!(tc(json!("required"), Some(false)), json!({"type": "any", "disable_parallel_tool_use": true}));
        assert_eq!(tc(Value::Null, Some(false)), json!({"type": "auto", "disable_parallel_tool_use": true}));
        assert_eq!(tc(Value::Null, Some(true)), Value::Null, "parallel by default: nothing to say");
        assert_eq!(tc(json!("none"), Some(false)), json!({"type": "none"}));
        let e = refused(json!({"messages": [user("x")], "tools": tools, "tool_choice": "sometimes"}));
        assert_eq!(e.param.as_deref(), Some("tool_choice"));
        let e = refused(
            json!({"messages": [user("x")], "tools": tools, "tool_choice": {"type": "allowed_tools", "allowed_tools": {}}}),
        );
        assert_eq!(e.param.as_deref(), Some("tool_choice"));
        // Without tools: none/auto mean nothing; forcing a tool is a 400.
        assert!(body(json!({"messages": [user("x")], "tool_choice": "none"})).get("tool_choice").is_none());
        assert_eq!(
            refused(json!({"messages": [user("x")], "tool_choice": "required"})).param.as_deref(),
            Some("tool_choice")
        );
    }

    #[test]
    fn reasoning_effort_sets_a_thinking_budget_below_max_tokens() {
        let thinking = |effort: &str, max: u64| -> Result<Value, ApiError> {
            let mut p = OpenAiAnthropic::new(meta());
            p.request(
                &chat(json!({"messages": [user("x")], "reasoning_effort": effort, "max_tokens": max})),
                &target(None),
            )
            .map(|u| serde_json::from_slice::<Value>(&u.body).unwrap().get("thinking").cloned().unwrap_or(Value::Null))
        };
        for (effort, budget) in [("minimal", 1024), ("low", 2048), ("medium", 8192), ("high", 16384)] {
            assert_eq!(
                thinking(effort, 32000).unwrap(),
                json!({"type": "enabled", "budget_tokens": budget}),
                "{effort}"
            );
        }
        assert_eq!(
            thinking("high", 4000).unwrap(),
            json!({"type": "enabled", "budget_tokens": 3999}),
            "lowered below max_tokens"
        );
        assert_eq!(thinking("none", 4000).unwrap(), Value::Null);
        let e = thinking("low", 1024).unwrap_err();
        assert_eq!((e.status, e.param.as_deref()), (400, Some("max_tokens")));
        assert_eq!(thinking("extreme", 4000).unwrap_err().param.as_deref(), Some("reasoning_effort"));
    }

    #[test]
    fn an_explicit_thinking_object_is_passed_through() {
        let t = json!({"type": "enabled", "budget_tokens": 2000});
        assert_eq!(body(json!({"messages": [user("x")], "thinking": t}))["thinking"], t);
        let e = refused(json!({"messages": [user("x")], "thinking": t, "reasoning_effort": "low"}));
        assert_eq!(e.param.as_deref(), Some("reasoning_effort"));
        assert_eq!(refused(json!({"messages": [user("x")], "thinking": "on"})).param.as_deref(), Some("thinking"));
    }

    #[test]
    fn json_schema_response_format_is_a_forced_tool() {
        let schema = json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]});
        let b = body(
            json!({"messages": [user("x")], "response_format": {"type": "json_schema", "json_schema": {"name": "place", "schema": schema, "strict": true}}}),
        );
        assert_eq!(b["tools"][0]["name"], "place");
        assert_eq!(b["tools"][0]["input_schema"], schema);
        assert_eq!(b["tool_choice"], json!({"type": "tool", "name": "place", "disable_parallel_tool_use": true}));
        let b = body(json!({"messages": [user("x")], "response_format": {"type": "json_object"}}));
        assert_eq!(b["tools"][0]["input_schema"], json!({"type": "object"}));
        let e = refused(
            json!({"messages": [user("x")], "response_format": {"type": "json_object"}, "tools": [{"type": "function", "function": {"name": "f"}}]}),
        );
        assert_eq!(e.param.as_deref(), Some("response_format"));
        let e = refused(
            json!({"messages": [user("x")], "response_format": {"type": "json_object"}, "reasoning_effort": "low", "max_tokens": 5000}),
        );
        assert_eq!(e.param.as_deref(), Some("response_format"));
    }

    #[test]
    fn json_mode_answers_come_back_as_content_with_finish_stop() {
        let req = chat(json!({"messages": [user("x")], "response_format": {"type": "json_object"}}));
        let mut p = OpenAiAnthropic::new(meta());
        p.request(&req, &target(Some(100))).unwrap();
        let c = p
            .response(br#"{"type":"message","content":[{"type":"tool_use","id":"t","name":"json_response","input":{"a":1}}],"stop_reason":"tool_use","usage":{"input_tokens":3,"output_tokens":4}}"#)
            .unwrap();
        assert_eq!(c.choices[0].message.content.as_deref(), Some(r#"{"a":1}"#));
        assert!(c.choices[0].message.tool_calls.is_none());
        assert_eq!(c.choices[0].finish_reason, Some(FinishReason::Stop));

        // The recorded vercel/ai stream is exactly this forced-tool pattern.
        let mut p = OpenAiAnthropic::new(meta());
        p.request(&req, &target(Some(100))).unwrap();
        let text = std::fs::read_to_string(fixtures_dir().join("stream_json_tool.vercel.chunks.txt")).unwrap();
        let (out, r) = run(&mut p, &payload_events(&text));
        r.unwrap();
        let cs = chunks(&out);
        let content: String = cs.iter().filter_map(|c| c.choices[0].delta.content.clone()).collect();
        assert_eq!(
            serde_json::from_str::<Value>(&content).unwrap(),
            json!({"elements": [{"location": "San Francisco", "temperature": 58, "condition": "sunny"}]})
        );
        assert!(cs.iter().all(|c| c.choices[0].delta.tool_calls.is_none()));
        assert_eq!(cs.last().unwrap().choices[0].finish_reason, Some(FinishReason::Stop));
    }

    // ---- responses ----

    #[test]
    fn stop_reasons_map_to_finish_reasons() {
        for (stop, want) in [
            ("end_turn", FinishReason::Stop),
            ("stop_sequence", FinishReason::Stop),
            ("pause_turn", FinishReason::Stop),
            ("max_tokens", FinishReason::Length),
            ("model_context_window_exceeded", FinishReason::Length),
            ("tool_use", FinishReason::ToolCalls),
            ("refusal", FinishReason::ContentFilter),
        ] {
            assert_eq!(finish_reason(Some(stop), false), want, "{stop}");
        }
        assert_eq!(finish_reason(Some("tool_use"), true), FinishReason::Stop);
    }

    #[test]
    fn thinking_blocks_become_reasoning_content_and_unknown_blocks_are_skipped() {
        let mut p = OpenAiAnthropic::new(meta());
        let c = p
            .response(br#"{"type":"message","content":[{"type":"thinking","thinking":"hmm","signature":"s"},{"type":"redacted_thinking","data":"x"},
                {"type":"server_tool_use","id":"s1","name":"web_search","input":{}},{"type":"text","text":"a"},{"type":"text","text":"b"}],
                "stop_reason":"end_turn","usage":{"input_tokens":1,"output_tokens":2}}"#)
            .unwrap();
        let m = &c.choices[0].message;
        assert_eq!((m.content.as_deref(), m.reasoning_content.as_deref()), (Some("ab"), Some("hmm")));
    }

    #[test]
    fn usage_fields_anthropic_did_not_send_stay_unknown() {
        let mut p = OpenAiAnthropic::new(meta());
        let c = p
            .response(br#"{"type":"message","content":[{"type":"text","text":"x"}],"stop_reason":"end_turn"}"#)
            .unwrap();
        assert_eq!(p.usage(), Usage::default());
        assert_eq!(c.usage, None, "unknown usage is not reported as zero");
        let mut p = OpenAiAnthropic::new(meta());
        p.response(br#"{"type":"message","content":[],"stop_reason":"end_turn","usage":{"output_tokens":5}}"#).unwrap();
        assert_eq!(p.usage(), Usage { output: Some(5), ..Usage::default() });
    }

    #[test]
    fn unreadable_success_body_is_a_502() {
        let mut p = OpenAiAnthropic::new(meta());
        let e = p.response(b"<html>oops</html>").unwrap_err();
        assert_eq!((e.status, e.fault), (502, Fault::Provider));
        let e =
            p.response(br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#).unwrap_err();
        assert_eq!(e.status, 503);
    }

    // ---- errors ----

    #[test]
    fn anthropic_error_types_map_to_openai_status_type_and_code() {
        let cases = [
            (400, "invalid_request_error", 400, "invalid_request_error", None),
            (401, "authentication_error", 502, "server_error", Some("upstream_authentication_error")),
            (403, "permission_error", 502, "server_error", Some("upstream_permission_error")),
            (402, "billing_error", 502, "server_error", Some("upstream_billing_error")),
            (404, "not_found_error", 404, "invalid_request_error", Some("not_found")),
            (413, "request_too_large", 413, "invalid_request_error", Some("request_too_large")),
            (429, "rate_limit_error", 429, "rate_limit_error", Some("rate_limit_exceeded")),
            (500, "api_error", 500, "server_error", Some("provider_error")),
            (504, "timeout_error", 504, "server_error", Some("provider_timeout")),
            (529, "overloaded_error", 503, "server_error", Some("provider_overloaded")),
            (418, "teapot_error", 418, "invalid_request_error", Some("teapot_error")),
        ];
        for (http, kind, status, oa_kind, code) in cases {
            let body = json!({"type": "error", "error": {"type": kind, "message": "m"}}).to_string();
            let e = OpenAiAnthropic::new(meta()).error(http, Some(3), body.as_bytes());
            assert_eq!(
                (e.status, e.kind, e.code.as_deref(), e.fault, e.retry_after),
                (status, oa_kind, code, Fault::Provider, Some(3)),
                "{kind}"
            );
            assert_eq!(e.to_response().status, status);
        }
        let body = br#"{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long: 205351 tokens > 200000 maximum"}}"#;
        let e = OpenAiAnthropic::new(meta()).error(400, None, body);
        assert_eq!(e.code.as_deref(), Some("context_length_exceeded"));
    }

    #[test]
    fn unreadable_error_bodies_keep_status_and_retry_after() {
        let mut p = OpenAiAnthropic::new(meta());
        for (http, status, kind) in [
            (429, 429, "rate_limit_error"),
            (529, 503, "server_error"),
            (502, 502, "server_error"),
            (200, 502, "server_error"),
        ] {
            let e = p.error(http, Some(30), b"<html>Bad gateway</html>");
            assert_eq!((e.status, e.kind, e.retry_after, e.fault), (status, kind, Some(30), Fault::Provider), "{http}");
            assert!(e.message.contains(&http.to_string()));
        }
        let r = p.error(429, Some(30), b"").to_response();
        assert!(r.headers.contains(&("retry-after", "30".to_owned())));
    }

    // ---- streams ----

    fn start(input: u64) -> (Option<String>, String) {
        ev(
            json!({"type": "message_start", "message": {"id": "msg_1", "model": "claude", "content": [], "usage": {"input_tokens": input, "output_tokens": 1}}}),
        )
    }

    #[test]
    fn parallel_tool_calls_get_openai_indices_in_order_of_appearance() {
        let events = vec![
            start(10),
            ev(json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})),
            ev(
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Checking."}}),
            ),
            ev(json!({"type": "content_block_stop", "index": 0})),
            ev(
                json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "t1", "name": "w", "input": {}}}),
            ),
            ev(
                json!({"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "t2", "name": "w", "input": {}}}),
            ),
            ev(
                json!({"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": "{\"c\":\"Rome\"}"}}),
            ),
            ev(
                json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"c\":"}}),
            ),
            ev(
                json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "\"Paris\"}"}}),
            ),
            ev(json!({"type": "content_block_stop", "index": 1})),
            ev(json!({"type": "content_block_stop", "index": 2})),
            ev(json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 40}})),
            ev(json!({"type": "message_stop"})),
        ];
        let mut p = OpenAiAnthropic::new(meta());
        let (out, r) = run(&mut p, &events);
        r.unwrap();
        let calls: Vec<(u32, Option<String>, String)> = chunks(&out)
            .iter()
            .flat_map(|c| c.choices[0].delta.tool_calls.clone().unwrap_or_default())
            .map(|t| (t.index, t.id, t.function.unwrap().arguments.unwrap()))
            .collect();
        assert_eq!(
            calls,
            vec![
                (0, Some("t1".to_owned()), String::new()),
                (1, Some("t2".to_owned()), String::new()),
                (1, None, "{\"c\":\"Rome\"}".to_owned()),
                (0, None, "{\"c\":".to_owned()),
                (0, None, "\"Paris\"}".to_owned()),
            ]
        );
        assert_eq!(chunks(&out).last().unwrap().choices[0].finish_reason, Some(FinishReason::ToolCalls));
        assert_eq!(p.usage(), Usage { input: Some(10), output: Some(40), ..Usage::default() });
    }

    #[test]
    fn a_tool_call_that_streamed_no_json_gets_empty_object_arguments() {
        let events = vec![
            start(1),
            ev(
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": "t", "name": "n", "input": {}}}),
            ),
            ev(
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": ""}}),
            ),
            ev(json!({"type": "content_block_stop", "index": 0})),
            ev(json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 2}})),
            ev(json!({"type": "message_stop"})),
        ];
        let (out, r) = run(&mut OpenAiAnthropic::new(meta()), &events);
        r.unwrap();
        let args: String = chunks(&out)
            .iter()
            .flat_map(|c| c.choices[0].delta.tool_calls.clone().unwrap_or_default())
            .map(|t| t.function.unwrap().arguments.unwrap())
            .collect();
        assert_eq!(args, "{}");
    }

    #[test]
    fn an_error_event_ends_the_stream_with_a_provider_error() {
        let events = vec![
            start(5),
            ev(json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})),
            ev(json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "partial"}})),
            ev(json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})),
        ];
        let mut p = OpenAiAnthropic::new(meta());
        let (out, r) = run(&mut p, &events);
        let e = r.unwrap_err();
        assert_eq!(
            (e.status, e.fault, e.kind, e.message.as_str()),
            (503, Fault::Provider, "server_error", "Overloaded")
        );
        assert!(chunks(&out).iter().all(|c| c.choices[0].finish_reason.is_none()), "no finish chunk after an error");
        assert_eq!(p.usage().input, Some(5), "usage so far is kept");
        let mut more = Vec::new();
        p.event(Some("message_stop"), r#"{"type":"message_stop"}"#, &mut more).unwrap();
        assert!(more.is_empty(), "nothing after an error");
    }

    #[test]
    fn a_stream_cut_before_message_stop_is_an_error_unless_the_stop_reason_arrived() {
        let mut p = OpenAiAnthropic::new(meta());
        let (_, r) = run(
            &mut p,
            &[
                start(1),
                ev(json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": "hi"}})),
            ],
        );
        assert_eq!(r.unwrap_err().status, 502);
        let mut p = OpenAiAnthropic::new(meta());
        let (out, r) = run(
            &mut p,
            &[
                start(1),
                ev(
                    json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 3}}),
                ),
            ],
        );
        r.unwrap();
        assert_eq!(chunks(&out).last().unwrap().choices[0].finish_reason, Some(FinishReason::Stop));
    }

    #[test]
    fn ping_is_a_keepalive_comment_and_unknown_events_are_ignored() {
        let mut p = OpenAiAnthropic::new(meta());
        let mut out = Vec::new();
        p.event(Some("ping"), r#"{"type": "ping"}"#, &mut out).unwrap();
        p.event(Some("ping"), "", &mut out).unwrap();
        p.event(Some("future_event"), r#"{"type":"future_event","x":1}"#, &mut out).unwrap();
        p.event(
            Some("content_block_delta"),
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"citations_delta","citation":{}}}"#,
            &mut out,
        )
        .unwrap();
        assert_eq!(out, vec![StreamOut::Comment("ping".to_owned())]);
        assert!(p.event(Some("message_start"), "{not json", &mut out).is_err());
    }

    #[test]
    fn a_payload_without_type_is_typed_by_its_event_name() {
        let mut p = OpenAiAnthropic::new(meta());
        let mut out = Vec::new();
        p.event(Some("message_start"), r#"{"message":{"usage":{"input_tokens":4}}}"#, &mut out).unwrap();
        p.event(
            Some("message_delta"),
            r#"{"delta":{"stop_reason":"max_tokens"},"usage":{"output_tokens":9}}"#,
            &mut out,
        )
        .unwrap();
        p.end(&mut out).unwrap();
        assert_eq!(p.usage(), Usage { input: Some(4), output: Some(9), ..Usage::default() });
        assert_eq!(chunks(&out).last().unwrap().choices[0].finish_reason, Some(FinishReason::Length));
    }

    #[test]
    fn refusal_stream_finishes_with_content_filter() {
        let events = vec![
            start(1),
            ev(json!({"type": "message_delta", "delta": {"stop_reason": "refusal"}, "usage": {"output_tokens": 0}})),
            ev(json!({"type": "message_stop"})),
        ];
        let (out, r) = run(&mut OpenAiAnthropic::new(meta()), &events);
        r.unwrap();
        assert_eq!(chunks(&out).last().unwrap().choices[0].finish_reason, Some(FinishReason::ContentFilter));
    }

    // ---- properties ----

    fn sse_fixtures() -> Vec<(String, Vec<u8>)> {
        let dir = fixtures_dir();
        let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "sse"))
            .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
            .collect();
        v.sort();
        v
    }

    fn translate_all(events: &[(Option<String>, String)]) -> (Vec<StreamOut>, Option<ApiError>) {
        let (out, r) = run(&mut OpenAiAnthropic::new(meta()), events);
        (out, r.err())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn any_chunking_of_a_recorded_stream_gives_the_same_output(cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..40)) {
            for (name, bytes) in sse_fixtures() {
                let splits: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len())).collect();
                prop_assert_eq!(translate_all(&sse_events(&bytes, &splits)), translate_all(&sse_events(&bytes, &[])), "{}", name);
            }
        }

        #[test]
        fn tool_results_are_merged_kept_in_order_and_first_in_their_turn(roles in proptest::collection::vec(0u8..3, 1..16)) {
            // 0: user text, 1: assistant calling one tool, 2: tool result.
            let mut messages = vec![];
            for (i, r) in roles.iter().enumerate() {
                messages.push(match r {
                    0 => json!({"role": "user", "content": format!("u{i}")}),
                    1 => json!({"role": "assistant", "tool_calls": [{"id": format!("c{i}"), "type": "function", "function": {"name": "f", "arguments": "{}"}}]}),
                    _ => json!({"role": "tool", "tool_call_id": format!("r{i}"), "content": "ok"}),
                });
            }
            let b = body(json!({"messages": messages}));
            let turns = b["messages"].as_array().unwrap();
            let results: Vec<String> = turns.iter().flat_map(|t| t["content"].as_array().unwrap().iter())
                .filter(|b| b["type"] == "tool_result").map(|b| b["tool_use_id"].as_str().unwrap().to_owned()).collect();
            let want: Vec<String> = roles.iter().enumerate().filter(|(_, r)| **r == 2).map(|(i, _)| format!("r{i}")).collect();
            prop_assert_eq!(results, want);
            // A tool result, and a user message, right after tool results join their turn: no user
            // turn ever follows a turn that ends with a tool result.
            for pair in turns.windows(2) {
                let ends_with_result = pair[0]["content"].as_array().unwrap().last().is_some_and(|b| b["type"] == "tool_result");
                prop_assert!(!(ends_with_result && pair[1]["role"] == "user"), "not merged: {:?}", turns);
            }
            for t in turns {
                let kinds: Vec<&str> = t["content"].as_array().unwrap().iter().map(|b| b["type"].as_str().unwrap()).collect();
                if let Some(first_other) = kinds.iter().position(|k| *k != "tool_result") {
                    prop_assert!(kinds[first_other..].iter().all(|k| *k != "tool_result"), "tool_result after other blocks: {:?}", kinds);
                }
            }
        }

        #[test]
        fn temperature_in_zero_to_one_passes_and_above_one_is_refused(t in 0.0f64..3.0) {
            let mut p = OpenAiAnthropic::new(meta());
            let r = p.request(&chat(json!({"messages": [user("x")], "temperature": t})), &target(Some(10)));
            prop_assert_eq!(r.is_ok(), t <= 1.0);
        }

        #[test]
        fn arbitrary_event_data_never_panics(name in proptest::option::of("[a-z_]{1,20}"), data in ".{0,200}",
                                             idx in 0u32..4, ty in "(text|thinking|tool_use|other)_?(delta)?") {
            let mut p = OpenAiAnthropic::new(meta());
            let mut out = Vec::new();
            let _ = p.event(name.as_deref(), &data, &mut out);
            let _ = p.event(None, &json!({"type": "content_block_start", "index": idx, "content_block": {"type": ty, "id": "i", "name": "n"}}).to_string(), &mut out);
            let _ = p.event(None, &json!({"type": "content_block_delta", "index": idx, "delta": {"type": format!("{ty}_delta"), "partial_json": data, "text": data}}).to_string(), &mut out);
            let _ = p.event(None, &json!({"type": "message_delta", "delta": {"stop_reason": data}, "usage": {"input_tokens": u64::MAX, "cache_read_input_tokens": u64::MAX}}).to_string(), &mut out);
            let _ = p.end(&mut out);
            let _ = p.usage();
        }
    }
}
