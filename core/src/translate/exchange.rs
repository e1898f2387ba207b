//! One client request's translation from start to end: what every pair shares.
//!
//! An [`Exchange`] wraps one [`Pair`] and owns the parts that are the same for every backend:
//! - stream framing in: the spec-exact [`SseDecoder`] for SSE streams, the [`JsonArrayDecoder`]
//!   for Gemini's array stream (a `streamGenerateContent` path without `alt=sse`); pairs only
//!   ever see whole events;
//! - stream framing out: `data: <json>` events, provider comments forwarded as SSE comments
//!   (keep-alives), the usage chunk (`choices: []`) when — and only when — the client asked
//!   with `stream_options.include_usage`, and the closing `data: [DONE]`;
//! - errors in the middle of a stream: the stream is ended with an event
//!   `data: {"error": {...}}` (what OpenAI's SDKs raise as an `APIError`) and no `[DONE]`, and
//!   nothing more is sent;
//! - non-stream answers: provider errors (status ≥ 400) through the pair's `error`, successes
//!   through its `response`, both rendered as complete responses in OpenAI's dialect.

use crate::json_array::JsonArrayDecoder;
use crate::openai::{ChatChunk, ChatRequest, WireUsage};
use crate::render::LocalResponse;
use crate::sse::{write_comment, write_event, SseDecoder, SseEvent};
use crate::usage::Usage;

use super::openai_anthropic::OpenAiAnthropic;
use super::openai_gemini::OpenAiGemini;
use super::openai_openai::OpenAiCompatible;
use super::{parse_retry_after, Pair, ProviderKind, ResponseMeta, StreamOut, Target, ApiError, UpstreamRequest};

enum Framing {
    Sse(SseDecoder),
    JsonArray(JsonArrayDecoder),
}

/// The state of one translated request.
pub struct Exchange {
    pair: Box<dyn Pair>,
    meta: ResponseMeta,
    client_wants_usage: bool,
    framing: Option<Framing>,
    /// The stream has been ended (by `[DONE]` or an error event): nothing more is written.
    closed: bool,
    /// A stream error that ended the stream, for the adapter to count.
    stream_error: Option<ApiError>,
    /// Bytes written to the client so far (a fallback is only possible before the first one).
    written: u64,
    /// Written just before `[DONE]` (a soft-limit warning as an SSE comment).
    closing_comment: Option<Vec<u8>>,
}

impl Exchange {
    /// An exchange over any pair translator ([`Exchange::for_kind`] picks the pair of a provider
    /// kind).
    pub fn new(pair: Box<dyn Pair>, meta: ResponseMeta) -> Self {
        Exchange { pair, meta, client_wants_usage: false, framing: None, closed: false, stream_error: None, written: 0, closing_comment: None }
    }

    /// The exchange for a backend kind: the one place that picks a pair translator.
    pub fn for_kind(kind: ProviderKind, meta: ResponseMeta) -> Self {
        let pair: Box<dyn Pair> = match kind {
            ProviderKind::OpenAi => Box::new(OpenAiCompatible::new(meta.clone())),
            ProviderKind::Anthropic => Box::new(OpenAiAnthropic::new(meta.clone())),
            ProviderKind::Gemini => Box::new(OpenAiGemini::new(meta.clone())),
        };
        Exchange::new(pair, meta)
    }

    /// Translates the client's request for `target`. Remembers whether the client asked for
    /// stream usage and how the upstream stream will be framed.
    pub fn request(&mut self, req: &ChatRequest, target: &Target) -> Result<UpstreamRequest, ApiError> {
        let up = self.pair.request(req, target)?;
        self.client_wants_usage = req.is_stream() && req.wants_stream_usage();
        self.framing = up.stream.then(|| match target.kind.framing(&up.path) {
            crate::provider::Framing::JsonArray => Framing::JsonArray(JsonArrayDecoder::new()),
            crate::provider::Framing::Sse => Framing::Sse(SseDecoder::new()),
        });
        Ok(up)
    }

    /// The complete client response for a non-stream upstream answer (or for an error status on
    /// a stream request, which providers answer with a plain JSON error body).
    pub fn response(&mut self, status: u16, retry_after: Option<&str>, body: &[u8]) -> LocalResponse {
        if status >= 400 {
            return self.pair.error(status, parse_retry_after(retry_after), body).to_response();
        }
        match self.pair.response(body).and_then(|c| {
            serde_json::to_vec(&c).map_err(|e| ApiError::bad_upstream(format!("cannot encode the response: {e}")))
        }) {
            Ok(body) => LocalResponse { status: 200, headers: vec![("content-type", "application/json".to_owned())], body },
            Err(e) => e.to_response(),
        }
    }

    /// Translates the next bytes of the upstream stream, appending client SSE bytes to `out`.
    pub fn stream(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        if self.closed {
            return;
        }
        let mut text = String::new();
        let mut items = Vec::new();
        let result = match self.framing.as_mut() {
            None => Err(ApiError::bad_upstream("a stream arrived for a non-stream request")),
            Some(Framing::Sse(d)) => {
                d.feed(bytes);
                drain_sse(d, self.pair.as_mut(), &mut items, &mut text)
            }
            Some(Framing::JsonArray(d)) => {
                d.feed(bytes);
                drain_array(d, self.pair.as_mut(), &mut items)
            }
        };
        self.write(&items, &mut text);
        if let Err(e) = result {
            self.fail(e, &mut text);
        }
        self.written += text.len() as u64;
        out.extend_from_slice(text.as_bytes());
    }

    /// The upstream stream ended: flushes the pair, writes the usage chunk if the client asked,
    /// then `[DONE]` — or an error event if the stream was cut short.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.closed {
            return;
        }
        let mut text = String::new();
        let ended = match self.framing.as_mut() {
            None => Ok(()),
            Some(Framing::Sse(d)) => d
                .finish()
                .map_err(|t| ApiError::bad_upstream(format!("the provider's stream ended early: {t}"))),
            Some(Framing::JsonArray(d)) => {
                let r = d.finish();
                let mut items = Vec::new();
                let drained = drain_array(d, self.pair.as_mut(), &mut items);
                self.write(&items, &mut text);
                drained.and(r.map_err(|e| ApiError::bad_upstream(format!("the provider's stream ended early: {e}"))))
            }
        };
        let mut items = Vec::new();
        match ended.and_then(|()| self.pair.end(&mut items)) {
            Ok(()) => {
                self.write(&items, &mut text);
                // Unknown is not zero: without the provider's counts there is nothing to say.
                let known = WireUsage::known(&self.pair.usage());
                if let (true, Some(usage)) = (self.client_wants_usage, known) {
                    let ids = self.pair.stream_identity().unwrap_or_else(|| self.meta.clone());
                    let chunk = ChatChunk {
                        id: ids.id,
                        object: "chat.completion.chunk".to_owned(),
                        created: ids.created,
                        model: ids.model,
                        choices: vec![],
                        usage: Some(usage),
                        ..ChatChunk::default()
                    };
                    write_event(&mut text, None, &serde_json::to_string(&chunk).unwrap_or_default(), None);
                }
                if let Some(comment) = self.closing_comment.take() {
                    text.push_str(&String::from_utf8_lossy(&comment));
                }
                write_event(&mut text, None, "[DONE]", None);
                self.closed = true;
            }
            Err(e) => {
                self.write(&items, &mut text);
                self.fail(e, &mut text);
            }
        }
        self.written += text.len() as u64;
        out.extend_from_slice(text.as_bytes());
    }

    /// Ends the stream now with `error` as an OpenAI error event (written to `out`; nothing more
    /// is written after it): the host saw the upstream fail mid-stream.
    pub fn abort(&mut self, error: ApiError, out: &mut Vec<u8>) {
        if self.closed {
            return;
        }
        let mut text = String::new();
        self.fail(error, &mut text);
        self.written += text.len() as u64;
        out.extend_from_slice(text.as_bytes());
    }

    /// Bytes (whole SSE lines, e.g. `message::sse_comment`) to write just before a successful
    /// stream's `[DONE]`; nothing is written when the stream ends in an error.
    pub(crate) fn set_closing_comment(&mut self, comment: Vec<u8>) {
        self.closing_comment = Some(comment);
    }

    /// Usage the provider reported so far.
    pub fn usage(&self) -> Usage {
        self.pair.usage()
    }

    /// The error that ended the stream, if one did.
    pub fn stream_error(&self) -> Option<&ApiError> {
        self.stream_error.as_ref()
    }

    /// Client bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    fn write(&self, items: &[StreamOut], text: &mut String) {
        for item in items {
            match item {
                StreamOut::Chunk(c) => {
                    if let Ok(json) = serde_json::to_string(c) {
                        // serde_json writes no line breaks: one `data` line, without a scan
                        // for them (what `write_event` would write).
                        text.reserve(json.len() + 8);
                        text.push_str("data: ");
                        text.push_str(&json);
                        text.push_str("\n\n");
                    }
                }
                StreamOut::Raw(data) => write_event(text, None, data, None),
                StreamOut::Comment(c) => {
                    write_comment(text, c);
                    text.push('\n');
                }
            }
        }
    }

    fn fail(&mut self, e: ApiError, text: &mut String) {
        let body = String::from_utf8(e.body()).unwrap_or_default();
        write_event(text, None, &body, None);
        self.stream_error = Some(e);
        self.closed = true;
    }
}

fn drain_sse(d: &mut SseDecoder, pair: &mut dyn Pair, items: &mut Vec<StreamOut>, _text: &mut String) -> Result<(), ApiError> {
    for item in d.by_ref() {
        match item {
            Ok(SseEvent::Message(m)) => pair.event(m.event.as_deref(), &m.data, items)?,
            Ok(SseEvent::Comment(c)) => items.push(StreamOut::Comment(c)),
            Err(e) => return Err(ApiError::bad_upstream(e.to_string())),
        }
    }
    Ok(())
}

fn drain_array(d: &mut JsonArrayDecoder, pair: &mut dyn Pair, items: &mut Vec<StreamOut>) -> Result<(), ApiError> {
    while let Some(item) = d.next_raw() {
        let bytes = item.map_err(|e| ApiError::bad_upstream(e.to_string()))?;
        let text = std::str::from_utf8(&bytes)
            .map_err(|_| ApiError::bad_upstream("a stream element is not UTF-8"))?;
        pair.event(None, text, items)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::{Provider, Route, Routes};
    use crate::test_support::fixtures_dir as fixtures;
    use std::path::PathBuf;

    /// A client request parsed and routed: what every host does first.
    struct Routed<'a> {
        request: ChatRequest,
        route: Route<'a>,
    }

    /// Parses the client's body as a chat completion request and routes its model. `Err` is the
    /// error to answer with (400 unreadable body, 404 unknown model).
    fn route_request<'a>(routes: &'a Routes, body: &[u8]) -> Result<Routed<'a>, ApiError> {
        let request: ChatRequest = serde_json::from_slice(body).map_err(|e| ApiError::unreadable_body(&e))?;
        let route = routes.route(&request.model).ok_or_else(|| ApiError::model_not_found(&request.model))?;
        Ok(Routed { request, route })
    }

    impl Routed<'_> {
        /// The provider the request goes to.
        fn provider(&self) -> &Provider {
            self.route.provider
        }

        /// Builds the exchange (`id` and `created` from the host) and the upstream request; `Err`
        /// is a request the backend cannot serve, in OpenAI's terms.
        fn start(&self, id: String, created: u64) -> Result<(Exchange, UpstreamRequest), ApiError> {
            let meta = ResponseMeta { id, model: self.request.model.clone(), created };
            let mut exchange = Exchange::for_kind(self.route.target.kind, meta);
            let upstream = exchange.request(&self.request, &self.route.target)?;
            Ok((exchange, upstream))
        }
    }

    fn meta() -> ResponseMeta {
        ResponseMeta { id: "chatcmpl-tg".to_owned(), model: "client-model".to_owned(), created: 1_700_000_000 }
    }

    fn exchange(include_usage: bool) -> Exchange {
        let mut x = Exchange::new(Box::new(OpenAiCompatible::new(meta())), meta());
        let req: ChatRequest = serde_json::from_value(serde_json::json!({
            "model": "client-model", "messages": [{"role": "user", "content": "hi"}], "stream": true,
            "stream_options": {"include_usage": include_usage}
        }))
        .unwrap();
        let target = Target { kind: ProviderKind::OpenAi, upstream_model: "up".to_owned(), default_max_tokens: None };
        x.request(&req, &target).unwrap();
        x
    }

    fn run(bytes: &[u8], cuts: &[usize], include_usage: bool) -> (Vec<u8>, Usage) {
        feed(exchange(include_usage), bytes, cuts)
    }

    /// Feeds `bytes` cut at `cuts`, then finishes: the client bytes and the usage.
    fn feed(mut x: Exchange, bytes: &[u8], cuts: &[usize]) -> (Vec<u8>, Usage) {
        let mut out = vec![];
        let mut start = 0;
        for &c in cuts.iter().chain(std::iter::once(&bytes.len())) {
            x.stream(&bytes[start..c], &mut out);
            start = c;
        }
        x.finish(&mut out);
        (out, x.usage())
    }

    fn raw_sse_fixtures() -> Vec<PathBuf> {
        let mut v = vec![];
        for dir in ["openai", "openai-compatible"] {
            for e in std::fs::read_dir(fixtures().join(dir)).unwrap() {
                let p = e.unwrap().path();
                if p.extension().is_some_and(|x| x == "sse") {
                    v.push(p);
                }
            }
        }
        assert!(!v.is_empty());
        v
    }

    fn events(out: &[u8]) -> Vec<String> {
        let mut d = SseDecoder::new();
        d.feed(out);
        d.finish().unwrap();
        d.filter_map(|e| match e.unwrap() {
            SseEvent::Message(m) => Some(m.data),
            SseEvent::Comment(_) => None,
        })
        .collect()
    }

    /// Feeding a recorded stream one byte at a time (a split at every byte boundary at once,
    /// including inside every UTF-8 sequence and between every CR and LF) and in random
    /// chunkings gives exactly the one-shot output.
    #[test]
    fn any_split_of_a_recorded_stream_gives_the_one_shot_output() {
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: usize| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % n as u64) as usize
        };
        for path in raw_sse_fixtures() {
            let bytes = std::fs::read(&path).unwrap();
            let (whole, usage) = run(&bytes, &[], true);
            let every: Vec<usize> = (1..bytes.len()).collect();
            let (split, u) = run(&bytes, &every, true);
            assert_eq!(split, whole, "{}: byte at a time", path.display());
            assert_eq!(u, usage);
            for _ in 0..16 {
                let mut cuts: Vec<usize> = (0..next(12) + 1).map(|_| next(bytes.len())).collect();
                cuts.sort();
                assert_eq!(run(&bytes, &cuts, true).0, whole, "{}: cuts {cuts:?}", path.display());
            }
        }
    }

    fn stream_exchange(kind: ProviderKind, array: bool) -> Exchange {
        let mut x = Exchange::for_kind(kind, meta());
        let req: ChatRequest = serde_json::from_value(serde_json::json!({
            "model": "client-model", "messages": [{"role": "user", "content": "hi"}], "stream": true,
            "max_tokens": 1000, "stream_options": {"include_usage": true}
        }))
        .unwrap();
        let target = Target { kind, upstream_model: "up".to_owned(), default_max_tokens: None };
        x.request(&req, &target).unwrap();
        if array {
            x.framing = Some(Framing::JsonArray(JsonArrayDecoder::new()));
        }
        x
    }

    /// A soft-limit warning rides as an SSE comment just before `[DONE]`, after the usage chunk.
    #[test]
    fn closing_comment_comes_right_before_done() {
        let path = raw_sse_fixtures().into_iter().find(|p| p.to_string_lossy().contains("include_usage")).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let mut x = stream_exchange(ProviderKind::OpenAi, false);
        x.set_closing_comment(b": tollgate {\"percent\":81}\n\n".to_vec());
        let (out, _) = feed(x, &bytes, &[]);
        let text = String::from_utf8(out).unwrap();
        assert!(text.ends_with(": tollgate {\"percent\":81}\n\ndata: [DONE]\n\n"), "{text}");
        assert_eq!(text.matches(": tollgate").count(), 1);
    }

    fn run_kind(kind: ProviderKind, array: bool, bytes: &[u8], cuts: &[usize]) -> (Vec<u8>, Usage) {
        feed(stream_exchange(kind, array), bytes, cuts)
    }

    /// Every recorded provider stream (Anthropic, Gemini SSE and JSON array, OpenAI and
    /// compatible), through its translator: the client gets valid OpenAI chunks ending in the
    /// usage chunk and `[DONE]`, and any chunking of the input gives the same bytes.
    #[test]
    fn every_recorded_stream_translates_identically_however_it_is_split() {
        let mut n = 0;
        for (dir, kind) in [
            ("anthropic", ProviderKind::Anthropic),
            ("gemini", ProviderKind::Gemini),
            ("openai", ProviderKind::OpenAi),
            ("openai-compatible", ProviderKind::OpenAi),
        ] {
            for e in std::fs::read_dir(fixtures().join(dir)).unwrap() {
                let path = e.unwrap().path();
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                let array = name.starts_with("stream_array_") && !name.contains("request");
                if !(name.ends_with(".sse") || array) {
                    continue;
                }
                let bytes = std::fs::read(&path).unwrap();
                let (whole, usage) = run_kind(kind, array, &bytes, &[]);
                let events = events(&whole);
                assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{name}: {}", String::from_utf8_lossy(&whole));
                for e in &events[..events.len() - 1] {
                    serde_json::from_str::<ChatChunk>(e).unwrap_or_else(|err| panic!("{name}: {err}: {e}"));
                }
                let text = String::from_utf8_lossy(&bytes);
                let recorded_usage = ["\"usage\":{", "\"usage\": {", "\"usageMetadata\""].iter().any(|k| text.contains(k));
                if !recorded_usage {
                    assert!(usage.is_empty(), "{name}: {usage:?}");
                    assert!(!String::from_utf8_lossy(&whole).contains("\"usage\""), "{name}: a usage chunk from nothing");
                } else {
                    assert!(usage.input.is_some() && usage.output.is_some(), "{name}: {usage:?}");
                }
                let every: Vec<usize> = (1..bytes.len()).collect();
                assert_eq!(run_kind(kind, array, &bytes, &every).0, whole, "{name}: byte at a time");
                for k in [2, 3, 7] {
                    let cuts: Vec<usize> = (1..k).map(|i| i * bytes.len() / k).collect();
                    assert_eq!(run_kind(kind, array, &bytes, &cuts).0, whole, "{name}: cuts {cuts:?}");
                }
                n += 1;
            }
        }
        assert!(n >= 25, "only {n} stream fixtures");
    }

    #[test]
    fn start_routes_the_model_and_answers_mistakes_in_openais_terms() {
        let policy = crate::Policy::from_json(
            br#"{"tier": {"default": "a"}, "tiers": {"a": {"limits": []}},
                 "providers": {"claude": {"kind": "anthropic", "cluster": "anthropic-eu", "default_max_tokens": 100}},
                 "models": {"sonnet": {"provider": "claude", "model": "claude-sonnet-4-5"}}}"#,
        )
        .unwrap();
        let body = br#"{"model": "sonnet", "messages": [{"role": "user", "content": "hi"}]}"#;
        let routed = route_request(&policy.routes, body).unwrap_or_else(|e| panic!("{e}"));
        let (_, up) = routed.start("chatcmpl-x".into(), 1).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((up.path.as_str(), routed.provider().cluster.as_str(), up.stream), ("/v1/messages", "anthropic-eu", false));
        let sent: serde_json::Value = serde_json::from_slice(&up.body).unwrap();
        assert_eq!(sent["model"], "claude-sonnet-4-5");

        let Err(e) = route_request(&policy.routes, br#"{"model": "opus", "messages": []}"#) else { panic!() };
        let body: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!((e.status, body["error"]["code"].as_str()), (404, Some("model_not_found")));
        assert_eq!(body["error"]["message"], "The model `opus` does not exist or you do not have access to it.");
        let Err(e) = route_request(&policy.routes, b"not json") else { panic!() };
        assert_eq!((e.status, e.kind), (400, "invalid_request_error"));
    }

    #[test]
    fn usage_chunk_only_when_the_client_asked_then_done() {
        let path = fixtures().join("openai/chat_stream_include_usage_cached.sse");
        let bytes = std::fs::read(path).unwrap();
        let (with, usage) = run(&bytes, &[], true);
        let ev = events(&with);
        assert_eq!(ev.last().map(String::as_str), Some("[DONE]"));
        let usage_chunk: ChatChunk = serde_json::from_str(&ev[ev.len() - 2]).unwrap();
        assert!(usage_chunk.choices.is_empty());
        // pass-through chunks are the provider's: the usage chunk carries the same id and model
        let first: ChatChunk = serde_json::from_str(&ev[0]).unwrap();
        assert_eq!((&usage_chunk.id, &usage_chunk.model, usage_chunk.created), (&first.id, &first.model, first.created));
        assert_eq!(first.id, "chatcmpl-BpJBM4XqgLRpLxmTeun39ESCNhQwb");
        assert_eq!(usage_chunk.usage.unwrap().to_usage(), usage);
        // what the provider reported on its usage chunk
        assert_eq!((usage.input, usage.output, usage.cached_read), (Some(1420), Some(100), Some(1280)));

        let (without, _) = run(&bytes, &[], false);
        let ev = events(&without);
        assert_eq!(ev.last().map(String::as_str), Some("[DONE]"));
        for e in &ev[..ev.len() - 1] {
            let c: ChatChunk = serde_json::from_str(e).unwrap();
            assert!(c.usage.is_none() && !c.choices.is_empty(), "{e}");
        }
    }

    #[test]
    fn a_truncated_stream_ends_with_an_error_event_and_no_done() {
        let bytes = b"data: {\"id\":\"x\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hel\"},\"finish_reason\":null}]}\n\ndata: {\"id\"";
        let mut x = exchange(false);
        let mut out = vec![];
        x.stream(bytes, &mut out);
        x.finish(&mut out);
        let ev = events(&out);
        assert_eq!(ev.len(), 2, "{ev:?}");
        let err: serde_json::Value = serde_json::from_str(&ev[1]).unwrap();
        assert_eq!(err["error"]["code"], "bad_upstream_response");
        assert!(x.stream_error().is_some());
        // nothing more after the error
        x.stream(b"data: [DONE]\n\n", &mut out);
        x.finish(&mut out);
        assert_eq!(events(&out).len(), 2);
    }

    #[test]
    fn provider_comments_are_forwarded_as_keep_alives() {
        let mut x = exchange(false);
        let mut out = vec![];
        x.stream(b": OPENROUTER PROCESSING\n\n", &mut out);
        assert_eq!(out, b": OPENROUTER PROCESSING\n\n");
    }

    #[test]
    fn error_statuses_become_openai_errors_with_retry_after() {
        let mut x = exchange(false);
        let r = x.response(429, Some("20"), br#"{"error":{"message":"slow down","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#);
        assert_eq!(r.status, 429);
        assert!(r.headers.contains(&("retry-after", "20".to_owned())));
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["error"]["message"], "slow down");
        let r = x.response(200, None, b"<html>oops</html>");
        assert_eq!(r.status, 502);
    }
}
