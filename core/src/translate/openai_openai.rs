//! OpenAI client → OpenAI or an OpenAI-compatible provider (OpenAI, DeepSeek, Groq, OpenRouter,
//! xAI, Mistral, Together, vLLM …): the request and answer pass through, with each provider's
//! quirks normalised so that clients and usage accounting see plain OpenAI.
//!
//! - Request: the body as sent, with `model` set to the upstream model. On streams,
//!   `stream_options.include_usage` is forced on so usage is always known; whether the client
//!   asked is remembered, and the usage-only chunk is removed from what the client sees (the
//!   framing wrapper emits its own usage chunk when the client asked).
//! - Usage, from wherever the provider put it: `usage` (OpenAI; on the finish chunk for Mistral
//!   and DeepSeek), `x_groq.usage` (Groq); cached prompt tokens from
//!   `prompt_tokens_details.cached_tokens`, else DeepSeek's `prompt_cache_hit_tokens`; reasoning
//!   from `completion_tokens_details.reasoning_tokens`.
//! - Chunks: passed on byte for byte unless a quirk needs rewriting: usage fields removed,
//!   Mistral tool-call deltas without `index` or `type` given OpenAI's (a delta with an `id`
//!   starts the next call, and gets `"type": "function"`;
//!   call, one without continues the last), errors inside chunks (OpenRouter) turned into an
//!   error for the wrapper to end the stream with. DeepSeek's `reasoning_content` is already the
//!   OpenAI-compatible field and passes through.

use serde::Deserialize;
use serde_json::{Map, Value};

use super::{Pair, ResponseMeta, StreamOut, Target, UpstreamRequest};
use crate::fault::{ApiError, Fault};
use crate::openai::{ChatCompletion, ChatRequest, StreamOptions};
use crate::usage::Usage;

/// Per-request state of the pass-through translator.
#[derive(Debug, Clone)]
pub struct OpenAiCompatible {
    meta: ResponseMeta,
    usage: Usage,
    /// Per choice index: how many tool calls began (Mistral index repair).
    tool_calls_seen: Vec<(u64, u32)>,
    /// The provider said `[DONE]`: a stream that ends without it was cut short.
    done: bool,
    /// The provider's chunk `id`, `model` and `created`, from its first chunk.
    identity: Option<ResponseMeta>,
}

impl OpenAiCompatible {
    pub fn new(meta: ResponseMeta) -> Self {
        OpenAiCompatible { meta, usage: Usage::default(), tool_calls_seen: Vec::new(), done: false, identity: None }
    }

    fn record_usage(&mut self, v: &Value) {
        if let Some(u) = usage_of(v) {
            self.usage.merge(u);
        }
    }

    /// Gives Mistral-style tool-call deltas (no `index`, no `type`) the index and type OpenAI
    /// would have sent.
    /// Returns whether anything changed.
    fn repair_tool_indices(&mut self, chunk: &mut Value) -> bool {
        let mut changed = false;
        let Some(choices) = chunk.get_mut("choices").and_then(Value::as_array_mut) else {
            return false;
        };
        for choice in choices {
            let choice_index = choice.get("index").and_then(Value::as_u64).unwrap_or(0);
            let Some(calls) = choice.pointer_mut("/delta/tool_calls").and_then(Value::as_array_mut) else {
                continue;
            };
            let seen = match self.tool_calls_seen.iter().position(|(i, _)| *i == choice_index) {
                Some(p) => p,
                None => {
                    self.tool_calls_seen.push((choice_index, 0));
                    self.tool_calls_seen.len() - 1
                }
            };
            for call in calls.iter_mut().filter_map(Value::as_object_mut) {
                // A delta that starts a call carries `"type": "function"` in OpenAI's streams;
                // Mistral's omit it, and the OpenAI SDK's stream helper then sees no tool call.
                let starts = call.get("id").is_some_and(|id| !id.is_null())
                    || call.get("function").and_then(|f| f.get("name")).and_then(Value::as_str).is_some_and(|n| !n.is_empty());
                if starts && call.get("type").is_none_or(Value::is_null) {
                    call.insert("type".to_owned(), Value::from("function"));
                    changed = true;
                }
                if let Some(index) = call.get("index").and_then(Value::as_u64) {
                    let started = &mut self.tool_calls_seen[seen].1;
                    *started = (*started).max(index as u32 + 1);
                    continue;
                }
                let started = &mut self.tool_calls_seen[seen].1;
                if call.get("id").is_some_and(|id| !id.is_null()) || *started == 0 {
                    *started += 1;
                }
                call.insert("index".to_owned(), Value::from(*started - 1));
                changed = true;
            }
        }
        changed
    }
}

/// Whether a chunk (trimmed `data`) is a JSON object that names none of the fields `event`
/// reads or changes — `usage`, `x_groq`, `error`, `tool_calls` — and has no empty `choices`
/// (a usage-only chunk), so it passes as sent. Conservative: a key written with a `\u` escape,
/// or any of those names anywhere (even inside a string), takes the full parse.
fn plain_chunk(data: &str) -> bool {
    let b = data.as_bytes();
    if b.first() != Some(&b'{') || b.windows(2).any(|w| w == b"\\u") {
        return false;
    }
    let has = |needle: &[u8]| b.windows(needle.len()).any(|w| w == needle);
    if has(b"\"usage\"") || has(b"\"x_groq\"") || has(b"\"error\"") || has(b"\"tool_calls\"") {
        return false;
    }
    // `"choices": []` (any spacing) is a usage-only chunk.
    let mut rest = b;
    while let Some(at) = rest.windows(9).position(|w| w == b"\"choices\"") {
        let after = &rest[at + 9..];
        let mut tail = after.iter().copied().filter(|c| !c.is_ascii_whitespace());
        if tail.next() == Some(b':') && tail.next() == Some(b'[') && tail.next() == Some(b']') {
            return false;
        }
        rest = after;
    }
    true
}

/// Any JSON value, checked as `serde_json::Value` would parse it — numbers in range, strings'
/// escapes and UTF-8 — without building it. (`serde::de::IgnoredAny` skips numbers unread: a
/// chunk with `1E999` would pass.)
struct Checked;

impl<'de> Deserialize<'de> for Checked {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Checked)
    }
}

impl<'de> serde::de::Visitor<'de> for Checked {
    type Value = Checked;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_str<E>(self, _: &str) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_unit<E>(self) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_none<E>(self) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Checked, A::Error> {
        while seq.next_element::<Checked>()?.is_some() {}
        Ok(Checked)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Checked, A::Error> {
        while map.next_entry::<Checked, Checked>()?.is_some() {}
        Ok(Checked)
    }
}

/// A non-stream answer as parsed: [`ChatCompletion`] with `usage` kept as sent.
#[derive(Deserialize)]
struct WireCompletion {
    id: String,
    object: String,
    created: u64,
    model: String,
    choices: Vec<crate::openai::Choice>,
    #[serde(default)]
    usage: Option<Value>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

/// The normalised usage in a response or chunk, if it carries one.
fn usage_of(v: &Value) -> Option<Usage> {
    usage_in(v.get("usage"), v.as_object()?)
}

/// The normalised usage from a response's `usage`, else from Groq's `x_groq.usage` among its
/// other fields.
fn usage_in(usage: Option<&Value>, rest: &Map<String, Value>) -> Option<Usage> {
    let u = usage.filter(|u| u.is_object()).or_else(|| rest.get("x_groq")?.get("usage").filter(|u| u.is_object()))?;
    let n = |p: &str| u.pointer(p).and_then(Value::as_u64);
    Some(Usage {
        input: n("/prompt_tokens"),
        output: n("/completion_tokens"),
        cached_read: n("/prompt_tokens_details/cached_tokens").or_else(|| n("/prompt_cache_hit_tokens")),
        cache_write: None,
        reasoning: n("/completion_tokens_details/reasoning_tokens"),
    })
}

/// An error object (`{"error": {...}}` or OpenRouter's in-chunk `{"error": {"code": 502, ...}}`)
/// in OpenAI's terms. A status outside 400–599 is no error status a client can act on (nor one
/// every HTTP stack will send): it becomes 502, as in the other pairs.
fn provider_error(status: u16, retry_after: Option<u64>, error: Option<&Value>) -> ApiError {
    let status = if (400..=599).contains(&status) { status } else { 502 };
    let text = |k: &str| error.and_then(|e| e.get(k)).and_then(Value::as_str).map(str::to_owned);
    let code = error.and_then(|e| e.get("code")).and_then(|c| match c {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    });
    let kind = match status {
        400 | 404 | 409 | 413 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        429 => "rate_limit_error",
        _ => "server_error",
    };
    ApiError {
        fault: Fault::Provider,
        status,
        kind,
        code,
        param: text("param"),
        message: text("message").unwrap_or_else(|| format!("The provider answered with HTTP {status}.")),
        retry_after,
    }
}

impl Pair for OpenAiCompatible {
    fn request(&mut self, req: &ChatRequest, target: &Target) -> Result<UpstreamRequest, ApiError> {
        let asks_usage = req.stream_options.as_ref().and_then(|o| o.include_usage) == Some(true);
        let encoded = if req.model == target.upstream_model && (!req.is_stream() || asks_usage) {
            // Nothing to change: the request as parsed, without a copy of every message.
            crate::openai::encode_sized(req, req.wire_len)
        } else {
            let mut upstream = req.clone();
            upstream.model = target.upstream_model.clone();
            if upstream.is_stream() {
                let options = upstream
                    .stream_options
                    .get_or_insert_with(|| StreamOptions { include_usage: None, extra: Map::new() });
                options.include_usage = Some(true);
            }
            crate::openai::encode_sized(&upstream, req.wire_len)
        };
        let body = encoded.map_err(|e| ApiError {
            fault: Fault::Gateway,
            status: 500,
            kind: "server_error",
            code: None,
            param: None,
            message: format!("cannot encode the upstream request: {e}"),
            retry_after: None,
        })?;
        Ok(UpstreamRequest {
            path: "/v1/chat/completions".to_owned(),
            headers: vec![("content-type", "application/json".to_owned())],
            body,
            stream: req.is_stream(),
        })
    }

    fn response(&mut self, body: &[u8]) -> Result<ChatCompletion, ApiError> {
        // One typed parse (no `Value` tree first): `usage` stays a `Value` for the providers'
        // variants `usage_of` reads, and is checked as OpenAI's usage afterwards.
        let wire: WireCompletion = serde_json::from_slice(body).map_err(|e| {
            let what = if e.is_data() { "is not a chat completion" } else { "is not JSON" };
            ApiError::bad_upstream(format!("the provider's response {what}: {e}"))
        })?;
        if let Some(usage) = &wire.usage {
            crate::openai::WireUsage::deserialize(usage)
                .map_err(|e| ApiError::bad_upstream(format!("the provider's response is not a chat completion: usage: {e}")))?;
        }
        if let Some(u) = usage_in(wire.usage.as_ref(), &wire.extra) {
            self.usage.merge(u);
        }
        let mut completion = ChatCompletion {
            id: wire.id,
            object: wire.object,
            created: wire.created,
            model: wire.model,
            choices: wire.choices,
            usage: None,
            extra: wire.extra,
        };
        if completion.model.is_empty() {
            completion.model = self.meta.model.clone();
        }
        completion.extra.remove("x_groq");
        completion.usage = crate::openai::WireUsage::known(&self.usage);
        Ok(completion)
    }

    fn error(&mut self, status: u16, retry_after: Option<u64>, body: &[u8]) -> ApiError {
        let value: Option<Value> = serde_json::from_slice(body).ok();
        provider_error(status, retry_after, value.as_ref().and_then(|v| v.get("error")))
    }

    fn event(&mut self, _event: Option<&str>, data: &str, out: &mut Vec<StreamOut>) -> Result<(), ApiError> {
        let data = data.trim();
        if data == "[DONE]" {
            self.done = true;
            return Ok(());
        }
        if data.is_empty() {
            return Ok(());
        }
        if self.identity.is_some() && plain_chunk(data) {
            // Nothing in it to read or change: checked as JSON without building it.
            serde_json::from_str::<Checked>(data)
                .map_err(|e| ApiError::bad_upstream(format!("a stream chunk is not JSON: {e}")))?;
            out.push(StreamOut::Raw(data.to_owned()));
            return Ok(());
        }
        let mut chunk: Value = serde_json::from_str(data)
            .map_err(|e| ApiError::bad_upstream(format!("a stream chunk is not JSON: {e}")))?;
        if !chunk.is_object() {
            return Err(ApiError::bad_upstream("a stream chunk is not a JSON object"));
        }
        if let Some(error) = chunk.get("error") {
            let status = error.get("code").and_then(Value::as_u64).and_then(|c| u16::try_from(c).ok()).filter(|c| *c >= 400);
            return Err(provider_error(status.unwrap_or(502), None, Some(error)));
        }
        self.record_usage(&chunk);
        if self.identity.is_none() {
            let text = |k: &str| chunk.get(k).and_then(Value::as_str).map(str::to_owned);
            if let (Some(id), Some(model)) = (text("id"), text("model")) {
                let created = chunk.get("created").and_then(Value::as_u64).unwrap_or(self.meta.created);
                self.identity = Some(ResponseMeta { id, model, created });
            }
        }
        let usage_only = chunk.get("choices").and_then(Value::as_array).is_some_and(Vec::is_empty);
        if usage_only {
            return Ok(());
        }
        let mut changed = self.repair_tool_indices(&mut chunk);
        if let Some(obj) = chunk.as_object_mut() {
            changed |= obj.remove("usage").is_some();
            changed |= obj.remove("x_groq").is_some();
        }
        out.push(if changed { StreamOut::Raw(chunk.to_string()) } else { StreamOut::Raw(data.to_owned()) });
        Ok(())
    }

    fn end(&mut self, _out: &mut Vec<StreamOut>) -> Result<(), ApiError> {
        if self.done {
            Ok(())
        } else {
            Err(ApiError::bad_upstream("the provider's stream ended before [DONE]"))
        }
    }

    fn usage(&self) -> Usage {
        self.usage
    }

    fn stream_identity(&self) -> Option<ResponseMeta> {
        self.identity.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::fixtures_dir as fixtures;
    use crate::openai::ChatChunk;
    use crate::sse::{SseDecoder, SseEvent};
    use crate::translate::ProviderKind;

    #[test]
    fn plain_chunks_are_only_those_with_nothing_to_read_or_change() {
        let plain = r#"{"id":"c","object":"chat.completion.chunk","model":"m","choices":[{"index":0,"delta":{"content":"hi"}}]}"#;
        assert!(plain_chunk(plain));
        assert!(plain_chunk(r#"{"choices":[{"delta":{"content":"a \"usage\" word"}}]}"#), "a quoted word inside a string is escaped");
        for not in [
            r#"{"choices":[],"usage":{"prompt_tokens":1}}"#,
            r#"{"choices": [ ] }"#,
            r#"{"choices":[{"delta":{}}],"usage":null}"#,
            r#"{"choices":[{"delta":{}}],"x_groq":{"id":"r"}}"#,
            r#"{"error":{"code":502}}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"id":"t"}]}}]}"#,
            r#"{"choices":[{"delta":{"content":"caf\u00e9"}}]}"#,
            r#"{"\u0075sage":{"prompt_tokens":1},"choices":[{"delta":{}}]}"#,
            r#"[1]"#,
        ] {
            assert!(!plain_chunk(not), "{not}");
        }
        // What passes as sent (once the first chunk named the stream) is still checked as JSON.
        let mut pair = OpenAiCompatible::new(meta());
        let mut out = Vec::new();
        pair.event(None, plain, &mut out).unwrap();
        assert!(pair.identity.is_some());
        pair.event(None, plain, &mut out).unwrap();
        assert!(pair.event(None, r#"{"choices":[{"delta":{"content":"x"}}]"#, &mut out).is_err(), "a truncated chunk");
        assert!(pair.event(None, r#"{"choices":[{"delta":{"content":"x"}}]} x"#, &mut out).is_err(), "trailing bytes");
        // As strict as a `Value` (the fuzzer found IgnoredAny was not): numbers out of range,
        // lone surrogates, control characters in strings.
        for bad in [r#"{"created":17E5137933,"choices":[]"#, r#"{"c":1e999,"choices":[{}]}"#, r#"{"s":"\ud800","choices":[{}]}"#, "{\"s\":\"a\u{1}b\",\"choices\":[{}]}"] {
            assert!(serde_json::from_str::<Value>(bad).is_err(), "{bad}");
            assert!(pair.event(None, bad, &mut out).is_err(), "{bad}");
        }
        assert_eq!(out.len(), 2);
    }

    fn meta() -> ResponseMeta {
        ResponseMeta { id: "chatcmpl-test".to_owned(), model: "client-model".to_owned(), created: 1_700_000_000 }
    }

    fn target() -> Target {
        Target { kind: ProviderKind::OpenAi, upstream_model: "upstream-model".to_owned(), default_max_tokens: None }
    }

    /// Every recorded stream in `dir` as a list of `data` payloads.
    fn stream_payloads(path: &std::path::Path) -> Vec<String> {
        let bytes = std::fs::read(path).unwrap();
        if path.to_string_lossy().ends_with(".chunks.txt") {
            // the vercel format keeps the JSON payloads only; the wire had `[DONE]` last
            let mut v: Vec<String> =
                String::from_utf8(bytes).unwrap().lines().filter(|l| !l.trim().is_empty()).map(str::to_owned).collect();
            v.push("[DONE]".to_owned());
            return v;
        }
        let mut d = SseDecoder::new();
        d.feed(&bytes);
        d.finish().unwrap();
        d.filter_map(|e| match e.unwrap() {
            SseEvent::Message(m) => Some(m.data),
            SseEvent::Comment(_) => None,
        })
        .collect()
    }

    /// What a stream says, read straight from the recorded payloads: text, reasoning, tool
    /// arguments per index, and the last usage.
    #[derive(Debug, Default, PartialEq)]
    struct Said {
        text: String,
        reasoning: String,
        tool_args: Vec<(u64, String)>,
    }

    fn said(payloads: impl Iterator<Item = String>) -> Said {
        let mut s = Said::default();
        for p in payloads {
            if p.trim() == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(&p).unwrap();
            for c in v["choices"].as_array().into_iter().flatten() {
                if let Some(t) = c["delta"]["content"].as_str() {
                    s.text.push_str(t);
                }
                if let Some(t) = c["delta"]["reasoning_content"].as_str() {
                    s.reasoning.push_str(t);
                }
                for call in c["delta"]["tool_calls"].as_array().into_iter().flatten() {
                    let i = call["index"].as_u64().unwrap_or(u64::MAX);
                    let a = call["function"]["arguments"].as_str().unwrap_or("");
                    match s.tool_args.iter_mut().find(|(j, _)| *j == i) {
                        Some((_, args)) => args.push_str(a),
                        None => s.tool_args.push((i, a.to_owned())),
                    }
                }
            }
        }
        s
    }

    #[test]
    fn every_openai_compatible_stream_fixture_passes_through_intact() {
        let mut checked = 0;
        for dir in ["openai", "openai-compatible"] {
            for entry in std::fs::read_dir(fixtures().join(dir)).unwrap() {
                let path = entry.unwrap().path();
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                if !(name.ends_with(".sse") || name.ends_with(".chunks.txt")) {
                    continue;
                }
                let payloads = stream_payloads(&path);
                let mut t = OpenAiCompatible::new(meta());
                let mut out = vec![];
                for p in &payloads {
                    t.event(None, p, &mut out).unwrap_or_else(|e| panic!("{name}: {e}"));
                }
                t.end(&mut out).unwrap();
                let forwarded: Vec<String> = out
                    .iter()
                    .map(|o| match o {
                        StreamOut::Raw(s) => s.clone(),
                        other => panic!("{name}: unexpected {other:?}"),
                    })
                    .collect();
                for f in &forwarded {
                    let chunk: ChatChunk = serde_json::from_str(f).unwrap_or_else(|e| panic!("{name}: {e}: {f}"));
                    assert!(chunk.usage.is_none() && !chunk.choices.is_empty(), "{name}: usage leaked: {f}");
                    for c in &chunk.choices {
                        for call in c.delta.tool_calls.iter().flatten() {
                            assert!(call.index < 16, "{name}");
                        }
                    }
                }
                // nothing said was lost or changed
                let recorded = said(payloads.iter().cloned());
                let passed = said(forwarded.into_iter());
                assert_eq!(passed.text, recorded.text, "{name}");
                assert_eq!(passed.reasoning, recorded.reasoning, "{name}");
                assert!(passed.tool_args.iter().all(|(i, _)| *i != u64::MAX), "{name}: a tool delta without index");
                if recorded.tool_args.iter().any(|(i, _)| *i == u64::MAX) {
                    // deltas without index (Mistral): the arguments, in order, are the same
                    let all = |s: &Said| s.tool_args.iter().map(|(_, a)| a.as_str()).collect::<String>();
                    assert_eq!(all(&passed), all(&recorded), "{name}");
                } else {
                    assert_eq!(passed.tool_args, recorded.tool_args, "{name}");
                }
                // usage equals the last one the provider reported
                let last = payloads.iter().rev().filter_map(|p| serde_json::from_str::<Value>(p).ok()).find_map(|v| usage_of(&v));
                assert_eq!(t.usage(), last.unwrap_or_default(), "{name}");
                checked += 1;
            }
        }
        assert!(checked >= 10, "only {checked} stream fixtures");
    }

    #[test]
    fn usage_comes_from_wherever_the_provider_put_it() {
        let deepseek = serde_json::json!({"usage": {"prompt_tokens": 17, "completion_tokens": 47, "prompt_cache_hit_tokens": 5,
            "completion_tokens_details": {"reasoning_tokens": 34}}});
        assert_eq!(
            usage_of(&deepseek),
            Some(Usage { input: Some(17), output: Some(47), cached_read: Some(5), cache_write: None, reasoning: Some(34) })
        );
        let groq = serde_json::json!({"x_groq": {"usage": {"prompt_tokens": 45, "completion_tokens": 662}}});
        assert_eq!(usage_of(&groq).unwrap().total(), Some(707));
        assert_eq!(usage_of(&serde_json::json!({"usage": null})), None);
    }

    #[test]
    fn recorded_groq_and_mistral_usage_is_counted() {
        let check = |file: &str, input, output| {
            let mut t = OpenAiCompatible::new(meta());
            let mut out = vec![];
            for p in stream_payloads(&fixtures().join("openai-compatible").join(file)) {
                t.event(None, &p, &mut out).unwrap();
            }
            assert_eq!((t.usage().input, t.usage().output), (Some(input), Some(output)), "{file}");
        };
        check("groq_text.vercel.chunks.txt", 45, 662);
        check("mistral_text.vercel.chunks.txt", 13, 8);
    }

    #[test]
    fn streams_force_usage_upstream_and_keep_the_clients_other_options() {
        let req: ChatRequest = serde_json::from_str(
            r#"{"model":"client-model","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"continuous_usage_stats":true},"metadata":{"a":1}}"#,
        )
        .unwrap();
        let up = OpenAiCompatible::new(meta()).request(&req, &target()).unwrap();
        let body: Value = serde_json::from_slice(&up.body).unwrap();
        assert_eq!(body["model"], "upstream-model");
        assert_eq!(body["stream_options"], serde_json::json!({"include_usage": true, "continuous_usage_stats": true}));
        assert_eq!(body["metadata"], serde_json::json!({"a": 1}));
        assert!(up.stream);
        assert_eq!(up.path, "/v1/chat/completions");
        let plain: ChatRequest = serde_json::from_str(r#"{"model":"m","messages":[]}"#).unwrap();
        let body: Value = serde_json::from_slice(&OpenAiCompatible::new(meta()).request(&plain, &target()).unwrap().body).unwrap();
        assert!(body.get("stream_options").is_none(), "no stream options on a non-stream request");
    }

    #[test]
    fn the_usage_only_chunk_is_not_forwarded() {
        let mut t = OpenAiCompatible::new(meta());
        let mut out = vec![];
        t.event(None, r#"{"id":"x","object":"chat.completion.chunk","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#, &mut out).unwrap();
        assert!(out.is_empty());
        assert_eq!(t.usage().total(), Some(7));
    }

    #[test]
    fn mistral_tool_deltas_without_index_get_openais_indices() {
        let mut t = OpenAiCompatible::new(meta());
        let mut out = vec![];
        let chunk = |calls: &str| format!(r#"{{"id":"x","object":"chat.completion.chunk","created":1,"model":"m","choices":[{{"index":0,"delta":{{"tool_calls":{calls}}},"finish_reason":null}}]}}"#);
        t.event(None, &chunk(r#"[{"id":"a","type":"function","function":{"name":"f","arguments":"{\"x\":"}}]"#), &mut out).unwrap();
        t.event(None, &chunk(r#"[{"function":{"arguments":"1}"}}]"#), &mut out).unwrap();
        t.event(None, &chunk(r#"[{"id":"b","type":"function","function":{"name":"g","arguments":"{}"}}]"#), &mut out).unwrap();
        let indices: Vec<u32> = out
            .iter()
            .map(|o| match o {
                StreamOut::Raw(s) => serde_json::from_str::<ChatChunk>(s).unwrap().choices[0].delta.tool_calls.as_ref().unwrap()[0].index,
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(indices, [0, 0, 1]);
    }

    /// A recorded Mistral stream (core/fixtures/SOURCES.md): its tool-call delta has neither
    /// `index` nor `type`; the client must see plain OpenAI.
    #[test]
    fn recorded_mistral_tool_call_deltas_get_openais_type_and_index() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/mistral_tool_call.vercel.chunks.txt");
        let mut t = OpenAiCompatible::new(meta());
        let mut out = vec![];
        for data in stream_payloads(&path) {
            t.event(None, &data, &mut out).unwrap();
        }
        t.end(&mut out).unwrap();
        let calls: Vec<Value> = out
            .iter()
            .filter_map(|o| match o {
                StreamOut::Raw(s) => serde_json::from_str::<Value>(s).ok(),
                _ => None,
            })
            .filter_map(|c| c.pointer("/choices/0/delta/tool_calls/0").cloned())
            .collect();
        assert_eq!(calls.len(), 1, "{out:?}");
        assert_eq!((calls[0]["type"].as_str(), calls[0]["index"].as_u64(), calls[0]["id"].as_str()), (Some("function"), Some(0), Some("gSIMJiOkT")));
        assert_eq!(calls[0]["function"]["name"], "weather");
        // A continuation delta (arguments only) gets no type, as in OpenAI's streams.
        let mut t = OpenAiCompatible::new(meta());
        let mut out = vec![];
        let chunk = |calls: &str| format!(r#"{{"id":"x","object":"chat.completion.chunk","created":1,"model":"m","choices":[{{"index":0,"delta":{{"tool_calls":{calls}}},"finish_reason":null}}]}}"#);
        t.event(None, &chunk(r#"[{"id":"a","function":{"name":"f","arguments":""}}]"#), &mut out).unwrap();
        t.event(None, &chunk(r#"[{"function":{"arguments":"{}"}}]"#), &mut out).unwrap();
        let types: Vec<Option<String>> = out
            .iter()
            .map(|o| match o {
                StreamOut::Raw(s) => serde_json::from_str::<Value>(s).unwrap().pointer("/choices/0/delta/tool_calls/0/type").and_then(Value::as_str).map(str::to_owned),
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(types, [Some("function".to_owned()), None]);
    }

    #[test]
    fn a_recorded_mistral_tool_call_without_a_type_is_a_plain_openai_completion() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/mistral_tool_call.vercel.json");
        let mut t = OpenAiCompatible::new(meta());
        let c = t.response(&std::fs::read(path).unwrap()).unwrap();
        let call = &c.choices[0].message.tool_calls.as_ref().unwrap()[0];
        assert_eq!((call.kind.as_str(), call.id.as_str(), call.function.name.as_str()), ("function", "gSIMJiOkT", "weather"));
        assert_eq!(t.usage().total(), Some(146));
    }

    #[test]
    fn a_chunk_that_is_not_an_object_ends_the_stream() {
        let e = OpenAiCompatible::new(meta()).event(None, "123", &mut vec![]).unwrap_err();
        assert_eq!(e.status, 502);
    }

    #[test]
    fn a_stream_cut_before_done_is_an_error() {
        let mut t = OpenAiCompatible::new(meta());
        let mut out = vec![];
        t.event(None, r#"{"id":"x","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"hel"},"finish_reason":null}]}"#, &mut out).unwrap();
        let e = t.end(&mut out).unwrap_err();
        assert_eq!((e.status, e.fault), (502, Fault::Provider));
        t.event(None, "[DONE]", &mut out).unwrap();
        assert!(t.end(&mut out).is_ok());
    }

    #[test]
    fn an_error_inside_a_stream_ends_it_with_the_providers_message() {
        let mut t = OpenAiCompatible::new(meta());
        let e = t
            .event(None, r#"{"error":{"code":502,"message":"Provider returned error"},"choices":[{"index":0,"delta":{"content":""},"finish_reason":"error"}]}"#, &mut vec![])
            .unwrap_err();
        assert_eq!((e.status, e.fault, e.message.as_str()), (502, Fault::Provider, "Provider returned error"));
    }

    #[test]
    fn non_stream_fixtures_keep_content_and_report_usage() {
        let mut checked = 0;
        for dir in ["openai", "openai-compatible"] {
            for entry in std::fs::read_dir(fixtures().join(dir)).unwrap() {
                let path = entry.unwrap().path();
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                let is_response = name.ends_with(".json") && !name.contains("request") && !name.contains("headers") && !name.starts_with("error_");
                if !is_response {
                    continue;
                }
                let bytes = std::fs::read(&path).unwrap();
                let recorded: Value = serde_json::from_slice(&bytes).unwrap();
                let mut t = OpenAiCompatible::new(meta());
                let completion = t.response(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
                let back: Value = serde_json::to_value(&completion).unwrap();
                assert_eq!(back["choices"][0]["message"]["content"], recorded["choices"][0]["message"]["content"], "{name}");
                assert_eq!(back["choices"][0]["message"]["tool_calls"], recorded["choices"][0]["message"]["tool_calls"], "{name}");
                assert_eq!(Some(t.usage()), usage_of(&recorded), "{name}");
                checked += 1;
            }
        }
        assert!(checked >= 6, "only {checked} response fixtures");
    }

    #[test]
    fn error_statuses_outside_400_to_599_become_502() {
        let body = br#"{"error":{"message":"odd","type":"x","param":null,"code":"c"}}"#;
        for status in [600, 999, 64304] {
            let e = OpenAiCompatible::new(meta()).error(status, None, body);
            assert_eq!((e.status, e.kind, e.message.as_str()), (502, "server_error", "odd"), "{status}");
        }
        let mut out = vec![];
        let e = OpenAiCompatible::new(meta()).event(None, r#"{"error":{"code":1000,"message":"odd"}}"#, &mut out).unwrap_err();
        assert_eq!(e.status, 502);
    }

    #[test]
    fn provider_errors_keep_status_message_and_retry_after() {
        for entry in std::fs::read_dir(fixtures().join("openai")).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if !(name.starts_with("error_") && name.ends_with(".json") && !name.contains("headers")) {
                continue;
            }
            let status: u16 = name[6..9].parse().unwrap();
            let recorded: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            let e = OpenAiCompatible::new(meta()).error(status, Some(3), &std::fs::read(&path).unwrap());
            assert_eq!(e.status, status);
            assert_eq!(e.message, recorded["error"]["message"].as_str().unwrap(), "{name}");
            assert_eq!(e.retry_after, Some(3));
            let body: Value = serde_json::from_slice(&e.body()).unwrap();
            assert_eq!(body["error"]["code"], recorded["error"]["code"], "{name}");
        }
    }
}
