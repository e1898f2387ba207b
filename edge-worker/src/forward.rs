//! Sending requests upstream and serving their answers through core's pipeline
//! ([`tollgate_core::answer`]). Bodies are never logged.
//!
//! [`serve`] applies core's [`Answer`] to a fetched response: the headers core removes go, the
//! client's headers are set, and the body is streamed through core chunk by chunk ([`Pump`]),
//! read whole and replaced, or passed untouched. The request's [`Finish`] settles it with the
//! answer's ending once the answer is over — when the body has been read, the stream has ended,
//! or the client went away (the runtime then drops the stream, and with it the pump).
//!
//! The worker owns the client's stream, so a provider stream that breaks mid-way ends with an
//! OpenAI error event (core's [`Answer::broken`]), on every path.

use futures_channel::oneshot;
use futures_util::stream::{self, StreamExt};
use tollgate_core::answer::{Answer, BodyPlan};
use tollgate_core::ending::Ending;
use tollgate_core::fallback::Failure;
use tollgate_core::record::Record;
use tollgate_core::routing::Routes;
use tollgate_core::LocalResponse;
use worker::js_sys::Uint8Array;
use worker::web_sys;
use worker::{ByteStream, Date, Fetch, Headers, Request, Response, ResponseBody, Url};

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

/// Response headers that describe a body the worker re-serves (the runtime frames it again, and
/// `fetch` already decoded any `content-encoding`).
const REFRAMED: [&str; 3] = ["content-length", "content-encoding", "transfer-encoding"];

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

/// Sends the client's request (method, headers minus hop-by-hop ones and those `private`
/// names, with `body`) to `target`, redirects not followed: the
/// client sees what the upstream said.
pub async fn send_client(req: &Request, target: &str, private: &dyn Fn(&str) -> bool, body: &[u8]) -> worker::Result<Response> {
    let headers = Headers::new();
    let mut tokens = connection_tokens(req.headers().get("connection").ok().flatten().as_deref());
    tokens.push("content-length".to_owned());
    for (name, value) in req.headers().entries() {
        if forwarded(&name, &tokens) && !private(&name.to_ascii_lowercase()) {
            headers.append(&name, &value)?;
        }
    }
    let inner = req.inner();
    let init = web_sys::RequestInit::new();
    init.set_method(&inner.method());
    init.set_headers(&headers.0);
    init.set_redirect(web_sys::RequestRedirect::Manual);
    init.set_body(&Uint8Array::from(body).into());
    let outbound = web_sys::Request::new_with_str_and_init(target, &init)?;
    Fetch::Request(Request::from(outbound)).send().await
}

/// A POST of `body` to `url` with `headers`, redirects not followed.
pub fn outbound(url: &str, headers: &Headers, body: &[u8]) -> worker::Result<Request> {
    let init = web_sys::RequestInit::new();
    init.set_method("POST");
    init.set_headers(&headers.0);
    init.set_redirect(web_sys::RequestRedirect::Manual);
    init.set_body(&Uint8Array::from(body).into());
    Ok(Request::from(web_sys::Request::new_with_str_and_init(url, &init)?))
}

/// A response core rendered.
pub fn local(r: &LocalResponse) -> worker::Result<Response> {
    let headers = Headers::new();
    for (name, value) in &r.headers {
        headers.set(name, value)?;
    }
    Ok(Response::builder().with_status(r.status).with_headers(headers).fixed(r.body.clone()))
}

/// The end of a request, however it ends: hands its [`Ending`] and its usage record to the
/// settlement waiting in `ctx.wait_until`. Dropped without one (the runtime dropped the
/// response before anything said how it ended), it settles as [`Ending::Abandoned`].
pub struct Finish {
    tx: Option<oneshot::Sender<(Ending, Record)>>,
    record: Record,
}

impl Finish {
    /// A guard for the request `record` describes, and the receiver the settlement awaits.
    pub fn new(record: Record) -> (Finish, oneshot::Receiver<(Ending, Record)>) {
        let (tx, rx) = oneshot::channel();
        (Finish { tx: Some(tx), record }, rx)
    }

    /// The client's answer has `status` (its head goes out now).
    pub fn answered(&mut self, status: u16) {
        self.record.answered(status, Date::now().as_millis());
    }

    /// An alias request's attempts so far, and the deployment that serves it.
    pub fn alias_attempts(&mut self, routes: &Routes, attempts: u32, served: Option<&str>) {
        self.record.alias_attempts(routes, attempts, served);
    }

    /// The request ended so.
    pub fn done(mut self, ending: Ending) {
        self.send(ending);
    }

    /// Tollgate answered `response` itself: the request ended so.
    pub fn reply(mut self, response: &LocalResponse, ending: Ending) -> worker::Result<Response> {
        self.answered(response.status);
        self.send(ending);
        local(response)
    }

    fn send(&mut self, ending: Ending) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send((ending, std::mem::take(&mut self.record)));
        }
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        self.send(Ending::Abandoned);
    }
}

/// The fetched answer's status, lower-cased header pairs and `retry-after`.
pub struct Fetched {
    /// The provider's status.
    pub status: u16,
    /// Its headers, names lower-cased.
    pub headers: Vec<(String, String)>,
}

impl Fetched {
    /// Reads them off a response.
    pub fn of(resp: &Response) -> Fetched {
        Fetched { status: resp.status_code(), headers: resp.headers().entries().map(|(k, v)| (k.to_ascii_lowercase(), v)).collect() }
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// The client's response headers for a re-served body: the provider's minus what core removes
/// and the framing the runtime redoes, plus `set`, plus `replacing` (a response core rendered).
fn client_headers(fetched: &Fetched, remove: &[String], set: &[(&'static str, String)], replacing: &[(&'static str, String)]) -> worker::Result<Headers> {
    let headers = Headers::new();
    let replaced = |name: &str| replacing.iter().any(|(k, _)| *k == name) || (!replacing.is_empty() && matches!(name, "content-type" | "retry-after"));
    for (name, value) in &fetched.headers {
        if remove.contains(name) || REFRAMED.contains(&name.as_str()) || replaced(name) {
            continue;
        }
        headers.append(name, value)?;
    }
    for (name, value) in set.iter().chain(replacing) {
        headers.set(name, value)?;
    }
    Ok(headers)
}

/// The client's response for a whole answer core rendered (`r`), with the provider's other
/// headers as [`Answer::head`] left them.
pub fn rendered(fetched: &Fetched, head: &tollgate_core::answer::Head, r: &LocalResponse) -> worker::Result<Response> {
    let headers = client_headers(fetched, &head.remove, &head.set, &r.headers)?;
    Ok(Response::builder().with_status(r.status).with_headers(headers).fixed(r.body.clone()))
}

/// A stream the caller already began (a fallback waits for its first client bytes before it
/// commits to a deployment).
pub struct Begun {
    /// What core's [`Answer::head`] said.
    pub head: tollgate_core::answer::Head,
    /// The client bytes already out of the stream.
    pub first: Vec<u8>,
    /// The rest of the provider's stream.
    pub upstream: ByteStream,
    /// Told when the stream breaks after them.
    pub on_cut: Option<Box<dyn FnOnce()>>,
}

/// Serves a fetched answer through core's pipeline (module docs); `begun`: the stream was
/// begun by the caller.
pub async fn serve(mut resp: Response, mut answer: Answer, mut finish: Finish, begun: Option<Begun>) -> worker::Result<Response> {
    let fetched = Fetched::of(&resp);
    let status = fetched.status;
    let null_body = matches!(status, 101 | 204 | 205 | 304) || matches!(resp.body(), ResponseBody::Empty);
    let retry_after = fetched.header("retry-after").map(str::to_owned);
    let (head, first, mut begun_stream, on_cut) = match begun {
        Some(b) => (b.head, Some(b.first), Some(b.upstream), b.on_cut),
        None => (answer.head(status, fetched.headers.iter().map(|(k, _)| k.as_str()), retry_after.as_deref(), null_body), None, None, None),
    };
    match head.body {
        BodyPlan::Replace(r) => {
            let headers = client_headers(&fetched, &head.remove, &head.set, &r.headers)?;
            finish.answered(r.status);
            finish.done(answer.ending());
            Ok(Response::builder().with_status(r.status).with_headers(headers).fixed(r.body))
        }
        BodyPlan::Buffer => {
            let r = match resp.bytes().await {
                Ok(bytes) => answer.whole(status, retry_after.as_deref(), &bytes),
                Err(_) => answer.unreachable(Failure::Reset),
            };
            finish.answered(r.status);
            finish.done(answer.ending());
            rendered(&fetched, &head, &r)
        }
        BodyPlan::Pass if null_body => {
            let headers = client_headers(&fetched, &head.remove, &head.set, &[])?;
            finish.answered(status);
            finish.done(answer.ending());
            Ok(Response::builder().with_status(status).with_headers(headers).empty())
        }
        BodyPlan::Pass | BodyPlan::Stream => {
            let headers = client_headers(&fetched, &head.remove, &head.set, &[])?;
            if head.body == BodyPlan::Stream {
                headers.set("cache-control", "no-cache")?;
            }
            finish.answered(status);
            let upstream = match begun_stream.take().map(Ok).unwrap_or_else(|| resp.stream()) {
                Ok(s) => s,
                Err(_) => {
                    finish.done(answer.ending());
                    return Ok(Response::builder().with_status(status).with_headers(headers).empty());
                }
            };
            let pump = Pump { first, upstream, answer, finish: Some(finish), done: false, on_cut };
            Response::builder().with_status(status).with_headers(headers).from_stream(stream::unfold(pump, Pump::next))
        }
    }
}

/// One answer's body on its way to the client: the first bytes (if the caller already read
/// them), then one upstream read per pull, each through core. Dropped — at the end, or when
/// the runtime cancels the stream because the client went away — it settles the request with
/// the answer's ending.
pub struct Pump {
    first: Option<Vec<u8>>,
    upstream: ByteStream,
    answer: Answer,
    finish: Option<Finish>,
    done: bool,
    /// Told when the provider's stream breaks after its first bytes (a deployment's health).
    on_cut: Option<Box<dyn FnOnce()>>,
}

impl Pump {
    async fn next(mut self) -> Option<(worker::Result<Vec<u8>>, Pump)> {
        if let Some(first) = self.first.take() {
            return Some((Ok(first), self));
        }
        let mut out = Vec::new();
        while !self.done && out.is_empty() {
            match self.upstream.next().await {
                Some(Ok(bytes)) => {
                    self.answer.chunk(&bytes, &mut out);
                    if self.answer.stream_error().is_some() {
                        // An error event ended the client's stream: stop reading.
                        self.cut();
                    }
                }
                Some(Err(_)) => {
                    self.answer.broken(&mut out);
                    self.cut();
                }
                None => {
                    self.answer.end(&mut out);
                    self.done = true;
                    if self.answer.stream_error().is_some() {
                        self.cut();
                    }
                }
            }
        }
        (!out.is_empty()).then_some((Ok(out), self))
    }

    fn cut(&mut self) {
        self.done = true;
        if let Some(tell) = self.on_cut.take() {
            tell();
        }
    }
}

impl Drop for Pump {
    fn drop(&mut self) {
        if let Some(finish) = self.finish.take() {
            finish.done(self.answer.ending());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
