//! What the `translate_*` targets share: one [`Exchange`] per input, a fixed valid client
//! request, then the rest of the input as the provider's answer, with invariants that must hold
//! for ANY answer (not a fuzz target itself: each target includes it as a module).
//!
//! # Input
//! Byte 0 is the mode:
//! - bit 0: the client request is a stream;
//! - bit 1: the answer is a stream (`stream()` in chunks, then `finish()`), else a complete
//!   response (`response()`);
//! - bit 2: `stream_options.include_usage` (stream requests only);
//! - bit 3: a variant of the request (see each target: JSON mode for Anthropic, `n: 2` for
//!   Gemini and OpenAI);
//! - bit 4: target-specific (Gemini: the JSON-array stream instead of `alt=sse`).
//!
//! A stream answer: byte 1 seeds the chunking, the rest is the upstream stream.
//! A complete answer: bytes 1..4 are the status (three ASCII digits, else the first two bytes
//! as a big-endian u16, so odd statuses are reachable too), byte 4 is 0 for no `retry-after`
//! or 1 + the length (mod 16) of the `retry-after` text that follows, the rest is the body.
//!
//! # Invariants
//! Complete answers: the body is a JSON object with either `choices` (status 200, an array)
//! or `error` (status 400–599, `message` and `type` strings); a `retry-after` header only on
//! errors, in whole seconds.
//!
//! Streams: everything written decodes with core's `SseDecoder` (no error, nothing truncated);
//! every data payload is `[DONE]` or JSON (for the translating pairs, a `ChatChunk`); exactly
//! one terminator — `[DONE]` or an error event `{"error": {...}}` — and it is the last thing
//! written, even if more bytes are fed and `finish()` is called again; the error event iff
//! `stream_error()`; a chunk with `usage` only if the client asked, as the last before `[DONE]`
//! with `choices: []`; `written()` counts what was written. The output, usage and stream error
//! are the same one-shot, in seeded chunks (including empty ones) and, for inputs under 2 KiB,
//! byte at a time.

use serde_json::{json, Value};
use tollgate_core::openai::{ChatChunk, ChatCompletion, ChatRequest};
use tollgate_core::render::LocalResponse;
use tollgate_core::sse::{SseDecoder, SseEvent};
use tollgate_core::translate::exchange::Exchange;
use tollgate_core::fault::ApiError;
use tollgate_core::translate::{ProviderKind, ResponseMeta, Target};
use tollgate_core::usage::Usage;

/// Inputs shorter than this are also fed byte at a time.
const BYTEWISE_LIMIT: usize = 2048;

#[derive(Debug, Clone, Copy)]
pub struct Mode(pub u8);

impl Mode {
    pub fn stream_request(self) -> bool {
        self.0 & 1 != 0
    }
    pub fn stream_answer(self) -> bool {
        self.0 & 2 != 0
    }
    pub fn include_usage(self) -> bool {
        self.0 & 4 != 0
    }
    pub fn variant(self) -> bool {
        self.0 & 8 != 0
    }
    #[allow(dead_code)] // only translate_gemini reads it
    pub fn extra(self) -> bool {
        self.0 & 16 != 0
    }
}

pub fn meta() -> ResponseMeta {
    ResponseMeta { id: "chatcmpl-fuzz".to_owned(), model: "client-model".to_owned(), created: 1_700_000_000 }
}

/// The fixed client request for `kind` and `mode`, and its target.
pub fn request(kind: ProviderKind, mode: Mode) -> (ChatRequest, Target) {
    let mut req = json!({
        "model": "client-model",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is the weather in Paris?"}
        ],
        "max_tokens": 1000
    });
    let tools = json!([{"type": "function", "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    }}]);
    if mode.stream_request() {
        req["stream"] = json!(true);
        if mode.include_usage() {
            req["stream_options"] = json!({"include_usage": true});
        }
    }
    let upstream_model = match kind {
        ProviderKind::Anthropic => {
            if mode.variant() {
                // the forced JSON tool: tool_use comes back as content
                req["response_format"] = json!({"type": "json_object"});
            } else {
                req["tools"] = tools;
            }
            "claude-sonnet-4-5"
        }
        ProviderKind::Gemini => {
            req["tools"] = tools;
            if mode.variant() {
                req["n"] = json!(2);
            }
            "gemini-2.5-flash"
        }
        ProviderKind::OpenAi => {
            req["tools"] = tools;
            if mode.variant() {
                req["n"] = json!(2);
            }
            "gpt-4o-mini"
        }
    };
    let req = serde_json::from_value(req).expect("the fixed request parses");
    (req, Target { kind, upstream_model: upstream_model.to_owned(), default_max_tokens: None })
}

/// Runs one input against exchanges made by `new_exchange` (which must not call `request`).
pub fn fuzz(kind: ProviderKind, data: &[u8], new_exchange: impl Fn(Mode) -> Exchange) {
    let Some((&m, rest)) = data.split_first() else { return };
    let mode = Mode(m);
    let (req, target) = request(kind, mode);
    let start = || {
        let mut x = new_exchange(mode);
        let up = x.request(&req, &target).expect("the fixed request is valid");
        assert_eq!(up.stream, mode.stream_request());
        x
    };
    if mode.stream_answer() {
        let (&seed, stream) = rest.split_first().unwrap_or((&0, &[]));
        let typed = kind != ProviderKind::OpenAi;
        let whole = run_stream(start(), [stream]);
        check_stream(&whole, mode.stream_request() && mode.include_usage(), typed);
        let chunked = run_stream(start(), seeded_chunks(stream, seed));
        assert_eq!(chunked, whole, "seeded chunks ({seed}) differ from one shot");
        if stream.len() < BYTEWISE_LIMIT {
            // An empty answer is one empty feed in every chunking: on a non-stream request even
            // an empty feed is "a stream arrived", unlike no feed at all.
            let bytewise: Vec<&[u8]> = if stream.is_empty() { vec![stream] } else { stream.chunks(1).collect() };
            let bytewise = run_stream(start(), bytewise);
            assert_eq!(bytewise, whole, "byte at a time differs from one shot");
        }
    } else {
        let (status, retry_after, body) = answer(rest);
        let r = start().response(status, retry_after.as_deref(), body);
        check_response(&r);
    }
}

/// The status, `retry-after` and body of a complete answer (see the module docs).
fn answer(rest: &[u8]) -> (u16, Option<String>, &[u8]) {
    let (digits, rest) = rest.split_at(rest.len().min(3));
    let status = match digits {
        [a, b, c] if digits.iter().all(u8::is_ascii_digit) => {
            u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0')
        }
        _ => u16::from_be_bytes([digits.first().copied().unwrap_or(0), digits.get(1).copied().unwrap_or(0)]),
    };
    match rest.split_first() {
        None | Some((0, _)) => (status, None, rest.get(1..).unwrap_or(&[])),
        Some((&len, rest)) => {
            let n = usize::from((len - 1) % 16).min(rest.len());
            (status, Some(String::from_utf8_lossy(&rest[..n]).into_owned()), &rest[n..])
        }
    }
}

fn check_response(r: &LocalResponse) {
    let text = String::from_utf8_lossy(&r.body);
    let v: Value = serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("response body is not JSON ({e}): {text}"));
    let obj = v.as_object().unwrap_or_else(|| panic!("response body is not an object: {text}"));
    let retry_after = r.headers.iter().find(|(k, _)| *k == "retry-after");
    match (obj.get("choices"), obj.get("error")) {
        (Some(choices), _) if r.status == 200 => {
            assert!(choices.is_array(), "choices is not an array: {text}");
            serde_json::from_value::<ChatCompletion>(v.clone())
                .unwrap_or_else(|e| panic!("a 200 body is not a chat completion ({e}): {text}"));
            assert!(retry_after.is_none(), "retry-after on a success");
        }
        (None, Some(error)) => {
            assert!((400..=599).contains(&r.status), "error body with status {}: {text}", r.status);
            assert!(error["message"].is_string() && error["type"].is_string(), "error without message/type: {text}");
            if let Some((_, s)) = retry_after {
                assert!(!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()), "retry-after {s:?}");
            }
        }
        _ => panic!("status {} with neither choices (200) nor error alone: {text}", r.status),
    }
}

/// What one run of a stream gives.
#[derive(Debug, PartialEq)]
struct Streamed {
    out: Vec<u8>,
    usage: Usage,
    error: Option<ApiError>,
}

fn run_stream<'a>(mut x: Exchange, chunks: impl IntoIterator<Item = &'a [u8]>) -> Streamed {
    let mut out = Vec::new();
    for chunk in chunks {
        x.stream(chunk, &mut out);
        assert_eq!(x.written(), out.len() as u64, "written() is not what was written");
    }
    x.finish(&mut out);
    assert_eq!(x.written(), out.len() as u64, "written() is not what was written");
    // Closed: nothing more, whatever arrives.
    let len = out.len();
    x.stream(b"data: {\"choices\":[]}\n\ndata: [DONE]\n\n", &mut out);
    x.finish(&mut out);
    assert_eq!(out.len(), len, "bytes written after the stream ended: {:?}", String::from_utf8_lossy(&out[len..]));
    Streamed { out, usage: x.usage(), error: x.stream_error().cloned() }
}

fn check_stream(s: &Streamed, wants_usage: bool, typed: bool) {
    let shown = || String::from_utf8_lossy(&s.out).into_owned();
    let mut d = SseDecoder::new();
    d.feed(&s.out);
    let mut items: Vec<_> = d.by_ref().collect();
    assert_eq!(d.finish(), Ok(()), "the output ends mid-event: {}", shown());
    items.extend(d.by_ref());

    let mut payloads: Vec<(String, Option<Value>)> = Vec::new();
    let mut ended = false;
    for item in items {
        assert!(!ended, "something follows the end of the stream: {}", shown());
        match item {
            Err(e) => panic!("the output does not decode ({e}): {}", shown()),
            Ok(SseEvent::Comment(_)) => {}
            Ok(SseEvent::Message(m)) => {
                assert!(m.event.is_none() && m.id.is_none(), "an event type or id on the client stream: {m:?}");
                if m.data == "[DONE]" {
                    ended = true;
                    payloads.push((m.data, None));
                    continue;
                }
                let v: Value = serde_json::from_str(&m.data)
                    .unwrap_or_else(|e| panic!("a data payload is not JSON ({e}): {:?}", m.data));
                if v.get("error").is_some() {
                    ended = true;
                    let e = &v["error"];
                    assert!(e["message"].is_string() && e["type"].is_string(), "error event without message/type: {}", m.data);
                } else if typed {
                    serde_json::from_value::<ChatChunk>(v.clone())
                        .unwrap_or_else(|e| panic!("a data payload is not a chat chunk ({e}): {}", m.data));
                }
                payloads.push((m.data, Some(v)));
            }
        }
    }
    assert!(ended, "the stream ended with neither [DONE] nor an error event: {}", shown());
    let (last, _) = payloads.last().expect("ended, so not empty");
    assert_eq!(s.error.is_some(), last != "[DONE]", "stream_error() disagrees with the last event: {last}");

    let n = payloads.len();
    for (i, (data, v)) in payloads.iter().enumerate() {
        let Some(usage) = v.as_ref().and_then(|v| v.get("usage")) else { continue };
        let is_usage_chunk = wants_usage
            && last == "[DONE]"
            && i + 2 == n
            && v.as_ref().and_then(|v| v["choices"].as_array()).is_some_and(Vec::is_empty)
            && usage.is_object();
        assert!(is_usage_chunk, "usage other than the client's usage chunk (asked: {wants_usage}): {data}");
    }
}

/// Chunks of 0 to 48 bytes (0: an empty feed), sizes from an xorshift seeded by `seed`.
fn seeded_chunks(data: &[u8], seed: u8) -> Vec<&[u8]> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(seed);
    let mut chunks = Vec::new();
    let mut rest = data;
    loop {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let (chunk, tail) = rest.split_at(((state % 49) as usize).min(rest.len()));
        chunks.push(chunk);
        rest = tail;
        if rest.is_empty() {
            return chunks;
        }
    }
}
