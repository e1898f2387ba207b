//! The answer pipeline: everything that happens to a provider's answer on its way to the client,
//! the same in every host.
//!
//! An [`Answer`] is made when a request is forwarded and sees the provider's answer through:
//! 1. [`Answer::head`] with the status and the response header names: which provider headers go
//!    (`crate::provider::is_provider_only_response_header`, and any `x-tollgate-*` a provider
//!    sent: only Tollgate speaks for Tollgate), which headers the client gets (its own
//!    `x-ratelimit-*`, the warning, a downgrade, the serving deployment), and what to do with
//!    the body ([`BodyPlan`]);
//! 2. a chat stream: [`Answer::chunk`] per upstream chunk, [`Answer::end`] at its end (or
//!    [`Answer::broken`] when the upstream broke it); any other chat answer is read whole and
//!    rendered by [`Answer::whole`]; answers to other API calls pass untouched;
//! 3. [`Answer::ending`] says how the request ended, which [`crate::ending`] charges.
//!
//! Chat answers always go through their provider's pair translator — an OpenAI-compatible
//! answer passed through untranslated too (`openai_openai`), so that every host reads its usage
//! (stream included), normalises its quirks and renders its errors the same way. Every error a
//! client sees is in OpenAI's format, with a message that says what happened: an empty or
//! unreadable provider body included. Usage is never reported as zero when it is unknown.

use crate::ending::Ending;
use crate::fallback::Failure;
use crate::fault::ApiError;
use crate::message::Warning;
use crate::headers::{self, WARNING_HEADER};
use crate::message;
use crate::provider::is_provider_only_response_header;
use crate::render::{openai_error, LocalResponse};
use crate::translate::exchange::Exchange;
use crate::usage::Usage;

/// What the host does with the answer's body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyPlan {
    /// Let status and headers go now; feed each body chunk to [`Answer::chunk`] and write what
    /// it returns instead (a translated or tapped stream), then call [`Answer::end`].
    Stream,
    /// Hold status and headers; read the whole body, then replace status, headers and body with
    /// [`Answer::whole`]'s response.
    Buffer,
    /// Let the body pass untouched (answers to API calls other than chat completions).
    Pass,
    /// No body is coming (the answer ended with its headers), but the client must get one:
    /// answer with this response instead.
    Replace(LocalResponse),
}

/// What [`Answer::head`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Response headers to remove (as the provider named them).
    pub remove: Vec<String>,
    /// Response headers to set, replacing any of the same name.
    pub set: Vec<(&'static str, String)>,
    /// What to do with the body.
    pub body: BodyPlan,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No answer yet.
    Waiting,
    /// A 2xx chat stream is flowing to the client.
    Streaming,
    /// A chat answer is being read whole.
    Buffering { status: u16 },
    /// A non-chat answer is passing through.
    Passing { status: u16 },
    /// A provider served the answer (a stream that ended, a complete answer).
    Served,
    /// No provider served it: an error status, an unreadable answer, unreachable.
    Failed,
}

enum Body {
    /// A chat completion, through its pair translator.
    Chat { exchange: Box<Exchange>, stream: bool },
    /// Any other API call.
    Other,
}

/// One request's answer on its way to the client (see the module docs).
pub struct Answer {
    body: Body,
    warning: Option<Warning>,
    headers: Vec<(&'static str, String)>,
    phase: Phase,
    served_by: Option<String>,
}

impl Answer {
    /// The answer to a chat completion translated (or passed through) by `exchange`; `stream`:
    /// the upstream request asked for a stream. `headers` are the client's from the admission;
    /// the warning's object goes into a completion body or, as an SSE comment, before a
    /// stream's `[DONE]`.
    pub fn chat(mut exchange: Exchange, stream: bool, headers: Vec<(&'static str, String)>, warning: Option<Warning>) -> Answer {
        if let Some(object) = warning.as_ref().and_then(|w| w.object.as_ref()) {
            exchange.set_closing_comment(message::sse_comment(object));
        }
        Answer { body: Body::Chat { exchange: Box::new(exchange), stream }, warning, headers, phase: Phase::Waiting, served_by: None }
    }

    /// The answer to any other API call: its body passes untouched.
    pub fn other(headers: Vec<(&'static str, String)>, warning: Option<Warning>) -> Answer {
        Answer { body: Body::Other, warning, headers, phase: Phase::Waiting, served_by: None }
    }

    /// The deployment of an alias that serves this answer: named to the client
    /// (`x-tollgate-deployment`), and its price applies when the request is settled.
    pub(crate) fn served_by(&mut self, deployment: &str) {
        self.headers.retain(|(k, _)| *k != headers::DEPLOYMENT_HEADER);
        self.headers.push((headers::DEPLOYMENT_HEADER, deployment.to_owned()));
        self.served_by = Some(deployment.to_owned());
    }

    /// The client's headers (its own rate limits, the warning, a downgrade, the deployment):
    /// every answer to this request carries them, local ones included.
    pub fn client_headers(&self) -> Vec<(&'static str, String)> {
        let mut out = self.headers.clone();
        if let Some(w) = &self.warning {
            out.push((WARNING_HEADER, w.header.clone()));
        }
        out
    }

    /// The provider's response head arrived: `names` are its header names (lower-case),
    /// `retry_after` its `retry-after`; `end_of_stream`: no body follows.
    pub fn head<'n>(&mut self, status: u16, names: impl IntoIterator<Item = &'n str>, retry_after: Option<&str>, end_of_stream: bool) -> Head {
        let mut remove: Vec<String> = names
            .into_iter()
            .filter(|n| is_provider_only_response_header(n) || n.starts_with(headers::PREFIX))
            .map(str::to_owned)
            .collect();
        let stream = match &self.body {
            Body::Other => {
                self.phase = Phase::Passing { status };
                return Head { remove, set: self.client_headers(), body: BodyPlan::Pass };
            }
            Body::Chat { stream, .. } => *stream,
        };
        if stream && (200..300).contains(&status) && !end_of_stream {
            self.phase = Phase::Streaming;
            remove.push("content-length".to_owned());
            let mut set = self.client_headers();
            set.push(("content-type", "text/event-stream".to_owned()));
            return Head { remove, set, body: BodyPlan::Stream };
        }
        self.phase = Phase::Buffering { status };
        // The whole answer's response ([`Answer::whole`]) carries the client's headers: a host
        // sets them with it, not here as well (each is a host call in Envoy).
        if end_of_stream {
            let response = self.whole(status, retry_after, b"");
            return Head { remove, set: Vec::new(), body: BodyPlan::Replace(response) };
        }
        Head { remove, set: Vec::new(), body: BodyPlan::Buffer }
    }

    /// The next bytes of a streamed answer; what the client gets instead goes to `out`.
    pub fn chunk(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        match (&mut self.body, self.phase) {
            (Body::Chat { exchange, .. }, Phase::Streaming) => {
                exchange.stream(bytes, out);
                if exchange.stream_error().is_some() {
                    // An error event has ended the client's stream (the provider's error, or its
                    // bytes were not its format): what it sent so far was served.
                    self.phase = Phase::Served;
                }
            }
            (Body::Chat { .. }, _) => {}
            (Body::Other, _) => out.extend_from_slice(bytes),
        }
    }

    /// The streamed answer ended cleanly on the provider's side: the end the client gets
    /// (`[DONE]` with the warning comment before it, or an error event when the provider's
    /// stream was cut short) goes to `out`.
    pub fn end(&mut self, out: &mut Vec<u8>) {
        if let (Body::Chat { exchange, .. }, Phase::Streaming) = (&mut self.body, self.phase) {
            exchange.finish(out);
            self.phase = Phase::Served;
        }
    }

    /// The provider's stream broke mid-way (the connection failed). Hosts that own the client's
    /// stream end it with an OpenAI error event (no `[DONE]`: the answer is incomplete), which
    /// the OpenAI SDKs raise as an `APIError`; it goes to `out`. (Envoy cannot write after an
    /// upstream reset: docs/behaviour.md.)
    pub fn broken(&mut self, out: &mut Vec<u8>) {
        if let (Body::Chat { exchange, .. }, Phase::Streaming) = (&mut self.body, self.phase) {
            exchange.abort(ApiError::bad_upstream("The connection to the provider broke mid-stream."), out);
            self.phase = Phase::Served;
        }
    }

    /// The whole answer: the response the client gets (status, headers, body), in OpenAI's
    /// format.
    pub fn whole(&mut self, status: u16, retry_after: Option<&str>, body: &[u8]) -> LocalResponse {
        let Body::Chat { exchange, .. } = &mut self.body else {
            // Other answers pass untouched: never asked to buffer.
            return LocalResponse { status, headers: self.client_headers(), body: body.to_vec() };
        };
        let mut response = if body.iter().all(u8::is_ascii_whitespace) {
            empty_body(status, retry_after)
        } else {
            exchange.response(status, retry_after, body)
        };
        if response.status == 200 {
            self.phase = Phase::Served;
            if let Some(object) = self.warning.as_ref().and_then(|w| w.object.as_ref()) {
                if let Some(b) = message::inject_into_completion(&response.body, object) {
                    response.body = b;
                }
            }
        } else {
            self.phase = Phase::Failed;
        }
        response.headers.extend(self.client_headers());
        response
    }

    /// The provider could not be reached, or gave no answer in time: the client's response.
    pub fn unreachable(&mut self, failure: Failure) -> LocalResponse {
        self.phase = Phase::Failed;
        let mut r = match failure {
            Failure::Timeout => openai_error(504, "The provider did not answer in time.", "server_error", "upstream_timeout"),
            Failure::Reset => openai_error(502, "The connection to the provider broke before its answer was complete.", "server_error", "upstream_reset"),
            Failure::Connect | Failure::Status(_) => openai_error(502, "The provider could not be reached.", "server_error", "upstream_unavailable"),
        };
        r.headers.extend(self.client_headers());
        r
    }

    /// Usage the provider reported so far (empty for answers that are not chat completions).
    pub fn usage(&self) -> Usage {
        match &self.body {
            Body::Chat { exchange, .. } => exchange.usage(),
            Body::Other => Usage::default(),
        }
    }

    /// The error that ended a stream or replaced an answer, if one did (metrics).
    pub fn stream_error(&self) -> Option<&ApiError> {
        match &self.body {
            Body::Chat { exchange, .. } => exchange.stream_error(),
            Body::Other => None,
        }
    }

    /// Whether the answer's status and headers have gone to the client (nothing can be
    /// replaced any more).
    pub fn started(&self) -> bool {
        matches!(self.phase, Phase::Streaming | Phase::Passing { .. }) || (self.phase == Phase::Served && self.is_stream())
    }

    fn is_stream(&self) -> bool {
        matches!(&self.body, Body::Chat { stream: true, .. })
    }

    /// How the request ended, as far as the answer knows (see [`crate::ending`]): a stream cut
    /// short was still served (with the usage seen so far); an answer never seen (the client
    /// left, or the host knows nothing more) is [`Ending::Abandoned`].
    pub fn ending(&self) -> Ending {
        let served = || Ending::Served { usage: self.usage(), model: self.served_by.clone() };
        match self.phase {
            Phase::Served | Phase::Streaming => served(),
            Phase::Passing { status } if status < 400 => served(),
            Phase::Passing { .. } | Phase::Failed => Ending::NotServed,
            Phase::Waiting | Phase::Buffering { .. } => Ending::Abandoned,
        }
    }
}

/// A provider answer without a body: an error in OpenAI's terms that says so (a success with no
/// body is no answer either).
fn empty_body(status: u16, retry_after: Option<&str>) -> LocalResponse {
    let (status, kind, code) = match status {
        429 => (429, "rate_limit_error", "rate_limit_exceeded"),
        400..=499 => (status, "invalid_request_error", "provider_error"),
        500..=599 => (status, "server_error", "provider_error"),
        _ => (502, "server_error", "bad_upstream_response"),
    };
    let message = format!("The provider answered HTTP {status} with an empty body.");
    let mut r = openai_error(status, &message, kind, code);
    if let Some(secs) = crate::translate::parse_retry_after(retry_after) {
        r.headers.push(("retry-after", secs.to_string()));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::{ProviderKind, Target};
    use crate::translate::ResponseMeta;
    use serde_json::Value;

    fn exchange(kind: ProviderKind, body: &str) -> (Exchange, bool) {
        let request: crate::openai::ChatRequest = serde_json::from_str(body).unwrap();
        let meta = ResponseMeta { id: "chatcmpl-x".into(), model: request.model.clone(), created: 1 };
        let mut e = Exchange::for_kind(kind, meta);
        let target = Target { kind, upstream_model: "up".into(), default_max_tokens: Some(100) };
        let up = e.request(&request, &target).unwrap();
        (e, up.stream)
    }

    fn warning() -> Option<Warning> {
        Some(Warning { header: "w".into(), object: Some(serde_json::json!({"percent": 80})) })
    }

    const CHAT: &str = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
    const STREAM: &str = r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

    #[test]
    fn provider_account_and_tollgate_headers_go_and_the_clients_come() {
        let (e, stream) = exchange(ProviderKind::OpenAi, CHAT);
        let mut a = Answer::chat(e, stream, vec![("x-ratelimit-remaining-requests", "4".into())], warning());
        let names = ["content-type", "openai-organization", "x-ratelimit-remaining-requests", "x-tollgate-deployment", "set-cookie", "x-request-id"];
        let head = a.head(200, names, None, false);
        assert_eq!(head.remove, ["openai-organization", "x-ratelimit-remaining-requests", "x-tollgate-deployment", "set-cookie"]);
        assert_eq!(head.set, [], "a buffered answer's headers come with it");
        assert_eq!(head.body, BodyPlan::Buffer);
        let r = a.whole(200, None, br#"{"id":"c","object":"chat.completion","created":1,"model":"m","choices":[]}"#);
        for h in [("x-ratelimit-remaining-requests", "4".to_owned()), (WARNING_HEADER, "w".to_owned())] {
            assert!(r.headers.contains(&h), "{h:?} in {:?}", r.headers);
        }
        // A stream's headers go with the head.
        let (e, stream) = exchange(ProviderKind::OpenAi, STREAM);
        let mut a = Answer::chat(e, stream, vec![("x-ratelimit-remaining-requests", "4".into())], warning());
        let head = a.head(200, names, None, false);
        assert!(head.set.contains(&("x-ratelimit-remaining-requests", "4".to_owned())), "{:?}", head.set);
    }

    #[test]
    fn a_completion_is_rendered_with_the_warning_object_and_its_usage_is_read() {
        let (e, stream) = exchange(ProviderKind::OpenAi, CHAT);
        let mut a = Answer::chat(e, stream, vec![], warning());
        a.head(200, [], None, false);
        assert_eq!(a.ending(), Ending::Abandoned, "nothing complete yet");
        let body = br#"{"id":"c","object":"chat.completion","created":1,"model":"up","choices":[{"index":0,"message":{"role":"assistant","content":"x"},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":8,"total_tokens":17}}"#;
        let r = a.whole(200, None, body);
        assert_eq!(r.status, 200);
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["tollgate"]["percent"], 80);
        let usage = Usage { input: Some(9), output: Some(8), ..Usage::default() };
        assert_eq!(a.ending(), Ending::Served { usage, model: None });
    }

    #[test]
    fn a_stream_is_tapped_for_usage_and_gets_the_comment_before_done() {
        let (e, stream) = exchange(ProviderKind::OpenAi, STREAM);
        assert!(stream);
        let mut a = Answer::chat(e, stream, vec![], warning());
        let head = a.head(200, ["content-length"], None, false);
        assert_eq!(head.body, BodyPlan::Stream);
        assert!(head.remove.contains(&"content-length".to_owned()));
        let mut out = Vec::new();
        a.chunk(b"data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"up\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x\"}}]}\n\n", &mut out);
        a.chunk(b"data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"up\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2,\"total_tokens\":5}}\n\ndata: [DONE]\n\n", &mut out);
        assert!(a.started());
        a.end(&mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.ends_with(": tollgate {\"percent\":80}\n\ndata: [DONE]\n\n"), "{text}");
        assert!(!text.contains("usage"), "the client did not ask for the usage chunk: {text}");
        assert_eq!(a.ending(), Ending::Served { usage: Usage { input: Some(3), output: Some(2), ..Usage::default() }, model: None });
    }

    #[test]
    fn a_stream_broken_mid_way_ends_with_an_error_event_and_stays_served() {
        let (e, stream) = exchange(ProviderKind::OpenAi, STREAM);
        let mut a = Answer::chat(e, stream, vec![], None);
        a.head(200, [], None, false);
        let mut out = Vec::new();
        a.chunk(b"data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"up\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x\"}}]}\n\n", &mut out);
        a.broken(&mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.ends_with("\"code\":\"bad_upstream_response\"}}\n\n") && !text.contains("[DONE]"), "{text}");
        assert!(matches!(a.ending(), Ending::Served { .. }));
        // Nothing more is written after the error event.
        let mut more = Vec::new();
        a.chunk(b"data: {}\n\n", &mut more);
        a.end(&mut more);
        assert!(more.is_empty());
    }

    #[test]
    fn empty_and_foreign_bodies_are_openai_errors_and_cost_nothing() {
        for (status, body, want_status, want_code) in [
            (502, "", 502, "provider_error"),
            (429, "  ", 429, "rate_limit_exceeded"),
            (500, "", 500, "provider_error"),
            (200, "", 502, "bad_upstream_response"),
            (503, "<html>Bad gateway</html>", 503, ""),
        ] {
            let (e, stream) = exchange(ProviderKind::OpenAi, CHAT);
            let mut a = Answer::chat(e, stream, vec![("x-ratelimit-limit-requests", "5".into())], None);
            let plan = a.head(status, [], Some("7"), body.is_empty());
            let r = match plan.body {
                BodyPlan::Replace(r) => r,
                BodyPlan::Buffer => a.whole(status, Some("7"), body.as_bytes()),
                other => panic!("{other:?}"),
            };
            assert_eq!(r.status, want_status, "{status} {body:?}");
            let v: Value = serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{status}: {e}"));
            assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
            if !want_code.is_empty() {
                assert_eq!(v["error"]["code"], want_code, "{v}");
            }
            assert!(r.headers.contains(&("x-ratelimit-limit-requests", "5".to_owned())));
            if status >= 400 {
                assert!(r.headers.contains(&("retry-after", "7".to_owned())), "{status}: {:?}", r.headers);
            }
            assert_eq!(a.ending(), Ending::NotServed, "{status} {body:?}");
        }
    }

    #[test]
    fn an_answer_that_is_not_the_providers_format_is_a_502_on_every_pair_with_no_usage() {
        for kind in [ProviderKind::OpenAi, ProviderKind::Anthropic, ProviderKind::Gemini] {
            for body in ["{}", "[]", "\"x\"", "{\"foo\":1}", "null", "{\"type\":\"nonsense\"}"] {
                let (e, stream) = exchange(kind, CHAT);
                let mut a = Answer::chat(e, stream, vec![], None);
                assert_eq!(a.head(200, [], None, false).body, BodyPlan::Buffer);
                let r = a.whole(200, None, body.as_bytes());
                assert_eq!(r.status, 502, "{kind:?} {body}: {}", String::from_utf8_lossy(&r.body));
                let v: Value = serde_json::from_slice(&r.body).unwrap();
                assert_eq!(v["error"]["code"], "bad_upstream_response", "{kind:?} {body}: {v}");
                assert_eq!(a.ending(), Ending::NotServed, "{kind:?} {body}");
                assert!(a.usage().is_empty(), "{kind:?} {body}: unknown usage is not zero");
            }
        }
    }

    #[test]
    fn other_answers_pass_and_their_status_decides_the_ending() {
        let mut a = Answer::other(vec![], None);
        assert_eq!(a.head(200, ["openai-project"], None, false), Head { remove: vec!["openai-project".into()], set: vec![], body: BodyPlan::Pass });
        let mut out = Vec::new();
        a.chunk(b"abc", &mut out);
        assert_eq!(out, b"abc");
        assert!(matches!(a.ending(), Ending::Served { .. }));
        let mut a = Answer::other(vec![], None);
        a.head(404, [], None, false);
        assert_eq!(a.ending(), Ending::NotServed);
    }

    #[test]
    fn unreachable_is_a_502_or_504_and_not_served() {
        let (e, stream) = exchange(ProviderKind::Anthropic, CHAT);
        let mut a = Answer::chat(e, stream, vec![], None);
        assert_eq!(a.unreachable(Failure::Timeout).status, 504);
        assert_eq!(a.unreachable(Failure::Connect).status, 502);
        assert_eq!(a.ending(), Ending::NotServed);
    }
}
