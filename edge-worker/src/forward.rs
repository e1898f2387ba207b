//! Forwarding an admitted request to the upstream, and turning core's local responses into
//! worker responses. Bodies are never logged.
//!
//! What is read, and why: a chat completion's request body (admission needs it; it is
//! forwarded as read, or re-serialised when the gate rewrote it — a downgrade or a capped
//! `max_tokens`); a non-stream chat answer (its `usage` settles the reservation, and a warning
//! object may be added to it); a streamed chat answer passes through [`SseTap`] chunk by chunk
//! (usage from its chunks, the warning comment before `data: [DONE]`). Every other body is
//! streamed through untouched, chunk by chunk, so that the request is settled when it ends.

use futures_channel::oneshot;
use futures_util::StreamExt;
use serde::Deserialize;
use tollgate_core::message;
use tollgate_core::openai::WireUsage;
use tollgate_core::render::PROVIDER_RATE_LIMIT_HEADERS;
use tollgate_core::sse::{SseDecoder, SseEvent};
use tollgate_core::usage::Usage;
use tollgate_core::LocalResponse;
use worker::js_sys::Uint8Array;
use worker::web_sys;
use worker::{console_warn, ByteStream, Fetch, Headers, Request, Response, ResponseBody, Url};

/// Hop-by-hop headers (RFC 9110 §7.6.1, plus the legacy ones proxies still drop) and `host`,
/// which the runtime sets from the upstream URL.
const NOT_FORWARDED: [&str; 10] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
];

/// Whether a request header goes upstream. `connection_tokens` are the header names the
/// client's `Connection` header lists (also hop-by-hop).
pub fn forwarded(name: &str, connection_tokens: &[String]) -> bool {
    let name = name.to_ascii_lowercase();
    !NOT_FORWARDED.contains(&name.as_str()) && !connection_tokens.contains(&name)
}

/// The names listed in a `Connection` header value, lower-cased.
pub fn connection_tokens(value: Option<&str>) -> Vec<String> {
    value.unwrap_or("").split(',').map(|t| t.trim().to_ascii_lowercase()).filter(|t| !t.is_empty()).collect()
}

/// The upstream URL for a request: the base URL's origin and path, then the request's path and
/// query (`https://api.example.com/openai` + `/v1/models?x=1`).
pub fn upstream_url(base: &Url, request: &Url) -> String {
    let mut out = base.as_str().trim_end_matches('/').to_owned();
    // A base URL with a query or fragment is a configuration mistake checked by `parse_base`.
    out.push_str(request.path());
    if let Some(q) = request.query() {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// Validates the `UPSTREAM_URL` var.
pub fn parse_base(text: &str) -> Result<Url, String> {
    let url = Url::parse(text.trim()).map_err(|e| format!("UPSTREAM_URL {text:?} is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("UPSTREAM_URL {text:?} must be an http or https URL"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("UPSTREAM_URL {text:?} must not have a query or fragment"));
    }
    Ok(url)
}

/// Sends `req` (method, headers minus hop-by-hop, streamed body) to `target`, redirects not
/// followed: the client sees what the upstream said.
/// `private` names further headers that stay with Tollgate (the policy's identity and tier
/// headers).
/// `body`: `None` streams the client's body through; `Some` sends these bytes instead (a chat
/// body already read, maybe rewritten; the runtime sets its `content-length`).
pub async fn send(req: &Request, target: &str, private: &[&str], body: Option<&[u8]>) -> worker::Result<Response> {
    let headers = Headers::new();
    let mut tokens = connection_tokens(req.headers().get("connection").ok().flatten().as_deref());
    tokens.extend(private.iter().map(|h| h.to_ascii_lowercase()));
    if body.is_some() {
        tokens.push("content-length".to_owned());
    }
    for (name, value) in req.headers().entries() {
        if forwarded(&name, &tokens) {
            headers.append(&name, &value)?;
        }
    }
    let inner = req.inner();
    let init = web_sys::RequestInit::new();
    init.set_method(&inner.method());
    init.set_headers(&headers.0);
    init.set_redirect(web_sys::RequestRedirect::Manual);
    match body {
        Some(bytes) => init.set_body(&Uint8Array::from(bytes).into()),
        None => {
            if let Some(body) = inner.body() {
                init.set_body(&body);
            }
        }
    }
    let outbound = web_sys::Request::new_with_str_and_init(target, &init)?;
    Fetch::Request(Request::from(outbound)).send().await
}

/// The upstream's response minus the provider's own rate-limit headers, with `extra` headers
/// set, body streamed through.
pub fn with_headers(upstream: Response, extra: &[(&'static str, String)]) -> worker::Result<Response> {
    let status = upstream.status_code();
    let headers = Headers::new();
    for (name, value) in upstream.headers().entries() {
        if PROVIDER_RATE_LIMIT_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
            continue;
        }
        headers.append(&name, &value)?;
    }
    for (name, value) in extra {
        headers.set(name, value)?;
    }
    // Null-body statuses must not carry a stream (the Response constructor throws).
    let body = match (status, upstream.body()) {
        (101 | 204 | 205 | 304, _) => ResponseBody::Empty,
        (_, body) => body.clone(),
    };
    Ok(Response::builder().with_status(status).with_headers(headers).body(body))
}

/// The upstream's response headers for a body the worker re-serves (read whole, or pumped
/// chunk by chunk): minus the provider's rate-limit headers and the body framing the runtime
/// redoes (`fetch` already decoded any `content-encoding`), plus `extra`.
pub fn reserved_headers(upstream: &Response, extra: &[(&'static str, String)]) -> worker::Result<Headers> {
    let headers = Headers::new();
    for (name, value) in upstream.headers().entries() {
        let lower = name.to_ascii_lowercase();
        if PROVIDER_RATE_LIMIT_HEADERS.contains(&lower.as_str())
            || matches!(lower.as_str(), "content-length" | "content-encoding" | "transfer-encoding")
        {
            continue;
        }
        headers.append(&name, &value)?;
    }
    for (name, value) in extra {
        headers.set(name, value)?;
    }
    Ok(headers)
}

/// A response core rendered (429, 503).
pub fn local(r: &LocalResponse) -> worker::Result<Response> {
    local_with(r, &[])
}

/// A response core rendered, with `extra` headers set (the client's rate-limit headers).
pub fn local_with(r: &LocalResponse, extra: &[(&'static str, String)]) -> worker::Result<Response> {
    let headers = Headers::new();
    for (name, value) in &r.headers {
        headers.append(name, value)?;
    }
    for (name, value) in extra {
        headers.set(name, value)?;
    }
    Ok(Response::builder().with_status(r.status).with_headers(headers).fixed(r.body.clone()))
}

/// How a request ended, for its settlement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// Settle with the usage reported (`None`: unknown, the reservation stays the charge),
    /// priced for `model` when set (the alias deployment that served), else the ticket's model.
    Settle { usage: Option<Usage>, model: Option<String> },
    /// Nothing was served (every deployment of an alias failed or was cooling down): undo the
    /// reservation; the request does not count.
    Release,
}

/// The end of a request, however it ends: when dropped (the body was read, the stream ended,
/// or the client went away and the runtime dropped the stream), hands the usage seen so far to
/// the settlement waiting in `ctx.wait_until`. Without a ticket it does nothing.
pub struct Finish {
    tx: Option<oneshot::Sender<Ending>>,
    usage: Usage,
    model: Option<String>,
    release: bool,
}

impl Finish {
    /// A guard and the receiver the settlement awaits.
    pub fn new() -> (Finish, oneshot::Receiver<Ending>) {
        let (tx, rx) = oneshot::channel();
        (Finish { tx: Some(tx), usage: Usage::default(), model: None, release: false }, rx)
    }

    /// A guard with nothing to settle (the store failed and the policy forwarded anyway).
    pub fn none() -> Finish {
        Finish { tx: None, usage: Usage::default(), model: None, release: false }
    }

    /// The model (an alias's deployment) that serves the request: settlement prices the usage
    /// for it.
    pub fn served_by(&mut self, model: &str) {
        self.model = Some(model.to_owned());
        self.release = false;
    }

    /// Nothing was served: the settlement releases the reservation instead.
    pub fn release(&mut self) {
        self.release = true;
    }

    /// Usage reported so far (later reports replace earlier ones field by field).
    pub fn report(&mut self, usage: Usage) {
        self.usage.merge(usage);
    }

    /// The request has not reached the provider (yet): no tokens were used (the request still
    /// counts). Undone by [`Finish::reported_by`].
    pub fn unreached(&mut self) {
        self.usage = Usage { input: Some(0), output: Some(0), ..Usage::default() };
    }

    /// The provider has been called: from now on only what it reports is known.
    pub fn reported_by(mut self) -> Finish {
        self.usage = Usage::default();
        self
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let ending = match self.release {
                true => Ending::Release,
                // Unknown is not zero: no report leaves the reservation as the charge.
                false => Ending::Settle { usage: (!self.usage.is_empty()).then_some(self.usage), model: self.model.take() },
            };
            let _ = tx.send(ending);
        }
    }
}

#[derive(Deserialize)]
struct UsageOnly {
    usage: Option<WireUsage>,
}

/// The `usage` of an OpenAI chat completion (or chunk) body, if it has one.
pub fn completion_usage(body: &[u8]) -> Option<Usage> {
    serde_json::from_slice::<UsageOnly>(body).ok()?.usage.map(|u| u.to_usage())
}

/// Watches an OpenAI SSE stream passing through: collects the usage its chunks report, and
/// writes `comment` (the warning's SSE comment) just before the `data: [DONE]` line, at an
/// event boundary. Every other byte passes unchanged; only the current line is held back, and
/// only until the comment is written.
pub struct SseTap {
    decoder: SseDecoder,
    usage: Usage,
    comment: Option<Vec<u8>>,
    line: Vec<u8>,
    after_cr: bool,
    event_start: bool,
}

impl SseTap {
    pub fn new(comment: Option<Vec<u8>>) -> SseTap {
        SseTap { decoder: SseDecoder::new(), usage: Usage::default(), comment, line: Vec::new(), after_cr: false, event_start: true }
    }

    pub fn usage(&self) -> Usage {
        self.usage
    }

    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        self.decoder.feed(bytes);
        self.drain();
        for (i, &b) in bytes.iter().enumerate() {
            let Some(comment) = &self.comment else {
                out.extend_from_slice(&self.line);
                self.line.clear();
                out.extend_from_slice(&bytes[i..]);
                return;
            };
            if std::mem::take(&mut self.after_cr) && b == b'\n' {
                out.push(b);
                continue;
            }
            if b == b'\n' || b == b'\r' {
                let blank = self.line.is_empty();
                if self.event_start && matches!(self.line.as_slice(), b"data: [DONE]" | b"data:[DONE]") {
                    out.extend_from_slice(comment);
                    self.comment = None;
                }
                out.append(&mut self.line);
                out.push(b);
                self.event_start = blank;
                self.after_cr = b == b'\r';
            } else {
                self.line.push(b);
            }
        }
        if self.comment.is_none() {
            out.append(&mut self.line);
        }
    }

    /// The stream ended: whatever was held back goes out.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.line);
        let _ = self.decoder.finish();
        self.drain();
    }

    fn drain(&mut self) {
        for item in self.decoder.by_ref() {
            if let Ok(SseEvent::Message(m)) = item {
                if m.data != "[DONE]" {
                    if let Some(u) = completion_usage(m.data.as_bytes()) {
                        self.usage.merge(u);
                    }
                }
            }
        }
    }
}

/// An upstream body on its way to the client, chunk by chunk (one upstream read per pull),
/// through an [`SseTap`] when it is a chat stream. Dropping it — at the end, or when the
/// runtime cancels the stream because the client went away — drops its [`Finish`], which
/// settles the request.
pub struct Passthrough {
    pub upstream: ByteStream,
    pub tap: Option<SseTap>,
    pub finish: Finish,
    pub done: bool,
}

impl Passthrough {
    pub async fn next(mut self) -> Option<(worker::Result<Vec<u8>>, Passthrough)> {
        let mut out = Vec::new();
        while !self.done && out.is_empty() {
            match self.upstream.next().await {
                Some(Ok(bytes)) => match &mut self.tap {
                    Some(tap) => {
                        tap.feed(&bytes, &mut out);
                        self.finish.report(tap.usage());
                    }
                    None => out = bytes,
                },
                Some(Err(e)) => {
                    // The client sees the body end early, as the upstream ended it.
                    console_warn!("tollgate: upstream body broke: {e}");
                    self.done = true;
                }
                None => {
                    if let Some(tap) = &mut self.tap {
                        tap.finish(&mut out);
                        self.finish.report(tap.usage());
                    }
                    self.done = true;
                }
            }
        }
        (!out.is_empty()).then_some((Ok(out), self))
    }
}

/// `body` with the warning object added, when it is a JSON completion (else unchanged).
pub fn with_warning_object(body: Vec<u8>, object: Option<&serde_json::Value>) -> Vec<u8> {
    match object.and_then(|o| message::inject_into_completion(&body, o)) {
        Some(b) => b,
        None => body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tap_all(chunks: &[&[u8]], comment: Option<&[u8]>) -> (Vec<u8>, Usage) {
        let mut tap = SseTap::new(comment.map(<[u8]>::to_vec));
        let mut out = vec![];
        for c in chunks {
            tap.feed(c, &mut out);
        }
        tap.finish(&mut out);
        (out, tap.usage())
    }

    const STREAM: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":8,\"total_tokens\":17}}\n\ndata: [DONE]\n\n";

    #[test]
    fn the_tap_passes_every_byte_and_reads_the_usage_chunk() {
        let bytes = STREAM.as_bytes();
        for cut in 0..bytes.len() {
            let (out, usage) = tap_all(&[&bytes[..cut], &bytes[cut..]], None);
            assert_eq!(out, bytes);
            assert_eq!(usage, Usage { input: Some(9), output: Some(8), ..Usage::default() });
        }
        let (_, usage) = tap_all(&[b"data: {\"choices\":[]}\n\ndata: [DONE]\n\n"], None);
        assert!(usage.is_empty(), "no usage reported: unknown, not zero");
    }

    #[test]
    fn the_warning_comment_goes_just_before_done_however_the_stream_is_split() {
        let expected = STREAM.replace("data: [DONE]", ": tollgate {}\n\ndata: [DONE]");
        for stream in [STREAM.to_owned(), STREAM.replace('\n', "\r\n"), STREAM.replace('\n', "\r")] {
            let bytes = stream.as_bytes();
            let expected = match stream.contains('\r') {
                false => expected.clone(),
                true => stream.replace("data: [DONE]", ": tollgate {}\n\ndata: [DONE]"),
            };
            for cut in 0..bytes.len() {
                let (out, _) = tap_all(&[&bytes[..cut], &bytes[cut..]], Some(b": tollgate {}\n\n"));
                assert_eq!(String::from_utf8(out).unwrap(), expected, "cut at {cut}");
            }
        }
        // "[DONE]" inside a payload, or as a continuation data line, is not the end.
        let tricky = "data: {\"x\":\"data: [DONE]\"}\ndata: [DONE]\n\n";
        let (out, _) = tap_all(&[tricky.as_bytes()], Some(b"!"));
        assert_eq!(out, tricky.as_bytes());
    }

    #[test]
    fn completion_usage_reads_openai_usage_and_nothing_else() {
        let u = completion_usage(br#"{"id":"x","usage":{"prompt_tokens":9,"completion_tokens":8,"total_tokens":17}}"#).unwrap();
        assert_eq!((u.input, u.output), (Some(9), Some(8)));
        assert_eq!(completion_usage(br#"{"id":"x"}"#), None);
        assert_eq!(completion_usage(b"not json"), None);
    }

    #[test]
    fn the_warning_object_goes_into_json_completions_only() {
        let o = serde_json::json!({"percent": 80});
        assert_eq!(with_warning_object(br#"{"id":"x"}"#.to_vec(), Some(&o)), br#"{"id":"x","tollgate":{"percent":80}}"#);
        assert_eq!(with_warning_object(b"[1]".to_vec(), Some(&o)), b"[1]");
        assert_eq!(with_warning_object(br#"{"id":"x"}"#.to_vec(), None), br#"{"id":"x"}"#);
    }

    #[test]
    fn hop_by_hop_and_connection_listed_headers_are_dropped() {
        let tokens = connection_tokens(Some("keep-alive, X-Trace-Hop"));
        assert_eq!(tokens, ["keep-alive", "x-trace-hop"]);
        for h in ["Connection", "TE", "transfer-encoding", "Upgrade", "host", "x-trace-hop", "Proxy-Authorization"] {
            assert!(!forwarded(h, &tokens), "{h}");
        }
        for h in ["authorization", "content-type", "openai-organization", "x-tollgate-user"] {
            assert!(forwarded(h, &tokens), "{h}");
        }
    }

    #[test]
    fn upstream_url_keeps_base_path_and_request_query() {
        let base = parse_base("http://127.0.0.1:8080").unwrap();
        let req = Url::parse("https://gw.example/v1/chat/completions?a=1&b=%20").unwrap();
        assert_eq!(upstream_url(&base, &req), "http://127.0.0.1:8080/v1/chat/completions?a=1&b=%20");
        let base = parse_base("https://api.example.com/openai/").unwrap();
        let req = Url::parse("https://gw.example/v1/models").unwrap();
        assert_eq!(upstream_url(&base, &req), "https://api.example.com/openai/v1/models");
    }

    #[test]
    fn bad_upstream_urls_are_named() {
        assert!(parse_base("not a url").unwrap_err().contains("is not a URL"));
        assert!(parse_base("ftp://x").unwrap_err().contains("http or https"));
        assert!(parse_base("https://x/?q=1").unwrap_err().contains("query"));
    }
}
