//! # tollgate-filter
//!
//! The proxy-wasm adapter: Tollgate as an HTTP filter for Envoy (and Istio and other
//! Proxy-Wasm ABI 0.2.1 hosts). It turns host callbacks into `tollgate-core` calls and applies
//! the returned decision through host calls; all logic is in core.
//!
//! What each hook does:
//! - `on_configure`: reads the plugin configuration (the JSON policy), validates it with
//!   [`Policy::from_json`]; on error logs the path-naming message and returns false, which makes
//!   the host refuse the plugin. Defines the metrics.
//! - `on_http_request_headers`: resolves the subject (identity header, else `source.address`),
//!   removes the identity and tier headers from the upstream request, checks and counts its
//!   request quotas in shared data ([`SharedData`]), then either lets the
//!   request continue or sends the OpenAI-style 429 itself, so a denied request never reaches
//!   the upstream. If the counter store fails, `store.on_failure` decides (default: allow).
//! - `on_http_response_headers`: replaces the upstream's `x-ratelimit-*` headers (a provider's
//!   organisation-wide limits are none of the client's business) with the client's own.
//!
//! When the policy maps models (`policy.routes.is_enabled()`), `POST /v1/chat/completions` is
//! also translated to the model's provider ([`translation`] has the whole story):
//! - `on_http_request_headers`: after admission (a denied request is answered without its body
//!   ever being read), pauses; a client's own `x-tollgate-cluster` is removed from every request.
//! - `on_http_request_body`: buffers until the end, then translates and rewrites the request
//!   (body, `:path`, headers, cluster) or answers 400/404 itself in OpenAI's error format.
//! - `on_http_response_headers` / `on_http_response_body`: a 2xx stream is translated chunk by
//!   chunk as it arrives; any other answer is buffered whole and replaced (status, headers,
//!   body). Token usage goes to the metrics; no body byte is ever logged or stored.
//!
//! Without a `models` map every request passes through as it is (the hooks above only count
//! and replace rate-limit headers).
//!
//! Metrics (Envoy prefixes them with `wasmcustom.`): `tollgate_requests_allowed`,
//! `tollgate_requests_denied`, `tollgate_store_failures`, `tollgate_host_errors`, and for
//! translation `tollgate_requests_translated`, `tollgate_translation_refused` (answered locally:
//! bad body, unknown model, unsupported parameter), `tollgate_upstream_errors` (provider error
//! statuses and streams ended by an error), `tollgate_tokens_input`, `tollgate_tokens_output`
//! (only what providers reported: unknown is not added as zero).

mod abi;
mod shared_data;
pub mod translation;

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use tollgate_core::translate::{Fault, TranslateError};
use tollgate_core::translate::exchange::route_request;
use tollgate_core::{check_and_count, render, Decision, FailureMode, Policy};

use translation::{Answer, Forwarded};

pub use shared_data::SharedData;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

#[derive(Default, Clone, Copy)]
struct Metrics {
    allowed: u32,
    denied: u32,
    store_failures: u32,
    host_errors: u32,
    translated: u32,
    refused: u32,
    upstream_errors: u32,
    tokens_input: u32,
    tokens_output: u32,
}

#[derive(Default)]
struct Root {
    policy: Option<Rc<Policy>>,
    metrics: Metrics,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, plugin_configuration_size: usize) -> bool {
        let bytes = match abi::plugin_configuration(plugin_configuration_size) {
            Ok(b) => b,
            Err(s) => {
                abi::log(abi::LOG_ERROR, &format!("tollgate: cannot read the plugin configuration (status {})", s.0));
                return false;
            }
        };
        match Policy::from_json(&bytes) {
            Ok(policy) => {
                self.policy = Some(Rc::new(policy));
                let counter = |name| abi::define_counter(name).unwrap_or(0);
                self.metrics = Metrics {
                    allowed: counter("tollgate_requests_allowed"),
                    denied: counter("tollgate_requests_denied"),
                    store_failures: counter("tollgate_store_failures"),
                    host_errors: counter("tollgate_host_errors"),
                    translated: counter("tollgate_requests_translated"),
                    refused: counter("tollgate_translation_refused"),
                    upstream_errors: counter("tollgate_upstream_errors"),
                    tokens_input: counter("tollgate_tokens_input"),
                    tokens_output: counter("tollgate_tokens_output"),
                };
                abi::log(abi::LOG_INFO, "tollgate: policy loaded");
                true
            }
            Err(e) => {
                abi::log(abi::LOG_ERROR, &format!("tollgate: invalid configuration: {e}"));
                false
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request {
            policy: self.policy.clone(),
            metrics: self.metrics,
            response_headers: Vec::new(),
            replied_locally: false,
            context_id,
            translation: Translation::None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Request {
    /// `None` only if the host created a stream without a successful `on_configure`; such a
    /// request passes through untouched.
    policy: Option<Rc<Policy>>,
    metrics: Metrics,
    response_headers: Vec<(&'static str, String)>,
    replied_locally: bool,
    context_id: u32,
    translation: Translation,
}

/// Where a request is in translation.
enum Translation {
    /// Not translated: passes through.
    None,
    /// Admitted `POST /v1/chat/completions`: the body is being buffered.
    Reading,
    /// Sent upstream translated; the answer is translated back.
    Forwarded(Box<Forwarded>),
}

impl Context for Request {}

fn header_text(name: Option<&str>) -> Option<String> {
    let name = name?;
    match abi::header(abi::HTTP_REQUEST_HEADERS, name) {
        Ok(v) => v.map(|bytes| String::from_utf8_lossy(&bytes).into_owned()),
        Err(_) => None,
    }
}

impl Request {
    /// Answers a translated request locally with an OpenAI error (the request was admitted and
    /// counted, so the client's rate-limit headers go with it).
    fn refuse(&mut self, error: &TranslateError) -> Action {
        let counter = match error.fault {
            Fault::Client => self.metrics.refused,
            Fault::Provider | Fault::Gateway => self.metrics.host_errors,
        };
        abi::increment(counter);
        self.translation = Translation::None;
        let mut response = error.to_response();
        response.headers.extend(self.response_headers.iter().cloned());
        self.reply(response)
    }

    fn reply(&mut self, response: render::LocalResponse) -> Action {
        let headers: Vec<(&str, &str)> = response.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        match abi::send_local_response(response.status as u32, &headers, &response.body) {
            Ok(()) => {
                self.replied_locally = true;
                Action::Pause
            }
            Err(s) => {
                // The host refused the local reply: let the request go rather than hang it.
                abi::increment(self.metrics.host_errors);
                abi::log(abi::LOG_ERROR, &format!("tollgate: send_local_response failed (status {})", s.0));
                Action::Continue
            }
        }
    }
}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let Some(policy) = self.policy.clone() else {
            return Action::Continue;
        };
        let translate = policy.routes.is_enabled() && self.prepare_routing();
        let action = self.admit(&policy);
        if !translate || action != Action::Continue {
            return action;
        }
        if end_of_stream {
            return self.refuse(&TranslateError::invalid(None, "The request has no body: send a chat completion request as JSON."));
        }
        // Keep the headers (they change once the body is read) while the body flows in; Envoy
        // needs `allow_on_headers_stop_iteration: true` for this pause to stop only the headers.
        self.translation = Translation::Reading;
        Action::Pause
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !matches!(self.translation, Translation::Reading) {
            return Action::Continue;
        }
        if !end_of_stream {
            // Buffered: the next call sees the whole body so far.
            return Action::Pause;
        }
        self.translate_request(body_size)
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        if !matches!(self.translation, Translation::Reading) {
            return Action::Continue;
        }
        // The body ended without end_of_stream: OpenAI clients never send trailers.
        self.refuse(&TranslateError::invalid(None, "Request trailers are not supported."))
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        if self.replied_locally || self.policy.is_none() {
            return Action::Continue;
        }
        for name in render::PROVIDER_RATE_LIMIT_HEADERS {
            let _ = abi::remove_header(abi::HTTP_RESPONSE_HEADERS, name);
        }
        for (name, value) in &self.response_headers {
            if abi::set_header(abi::HTTP_RESPONSE_HEADERS, name, value).is_err() {
                abi::increment(self.metrics.host_errors);
            }
        }
        match &self.translation {
            Translation::Forwarded(_) => self.translate_response_headers(end_of_stream),
            _ => Action::Continue,
        }
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.replied_locally {
            return Action::Continue;
        }
        match &self.translation {
            Translation::Forwarded(_) => self.translate_response_body(body_size, end_of_stream),
            _ => Action::Continue,
        }
    }
}

impl Request {
    /// The request-limit check; Continue when the request may go on.
    fn admit(&mut self, policy: &Policy) -> Action {
        let now = match abi::now_ms() {
            Ok(t) => t,
            Err(_) => {
                abi::increment(self.metrics.host_errors);
                return self.on_store_failure(policy, "clock unavailable");
            }
        };
        let identity = header_text(policy.identity_header());
        let tier = header_text(policy.tier_header());
        // Who the user is and what they pay is between the app and Tollgate: the provider
        // does not get these headers.
        for name in policy.private_request_headers() {
            let _ = abi::remove_header(abi::HTTP_REQUEST_HEADERS, name);
        }
        let address = abi::property(&["source", "address"])
            .ok()
            .flatten()
            .map(|b| String::from_utf8_lossy(&b).into_owned());
        let subject = policy.subject(identity.as_deref(), tier.as_deref(), address.as_deref());
        let quotas = policy.quotas(&subject.tier);
        let outcome = check_and_count(
            &mut SharedData,
            &subject.key,
            quotas,
            policy.tracked_windows(),
            now,
            policy.max_retries,
        );
        match outcome {
            Ok(decision @ Decision::Allowed { .. }) => {
                abi::increment(self.metrics.allowed);
                self.response_headers = render::allowed_headers(&decision);
                Action::Continue
            }
            Ok(decision @ Decision::Denied { .. }) => {
                abi::increment(self.metrics.denied);
                match render::rejection(&decision) {
                    Some(response) => self.reply(response),
                    None => Action::Continue,
                }
            }
            Err(e) => self.on_store_failure(policy, e.kind()),
        }
    }

    fn on_store_failure(&mut self, policy: &Policy, why: &str) -> Action {
        abi::increment(self.metrics.store_failures);
        abi::log(abi::LOG_WARN, &format!("tollgate: counter store failed ({why}); policy says {:?}", policy.on_failure));
        match policy.on_failure {
            FailureMode::Allow => Action::Continue,
            FailureMode::Deny => self.reply(render::store_unavailable()),
        }
    }

    /// Translation only: drops a client's own cluster header (only the filter picks clusters)
    /// and says whether this request is a chat completion to translate.
    fn prepare_routing(&mut self) -> bool {
        let map = abi::HTTP_REQUEST_HEADERS;
        if let Ok(Some(_)) = abi::header(map, translation::CLUSTER_HEADER) {
            // Removing it also clears Envoy's route cache (see `translation::apply_request`).
            if abi::remove_header(map, translation::CLUSTER_HEADER).is_err() {
                abi::increment(self.metrics.host_errors);
            }
        }
        let method = abi::header(map, ":method").ok().flatten();
        let path = abi::header(map, ":path").ok().flatten();
        translation::is_chat_request(method.as_deref(), path.as_deref())
    }

    /// The whole client body is buffered: translate it and rewrite the request, or answer.
    fn translate_request(&mut self, body_size: usize) -> Action {
        let Some(policy) = self.policy.clone() else {
            return Action::Continue;
        };
        let body = match abi::buffer(abi::HTTP_REQUEST_BODY, 0, body_size) {
            Ok(b) => b,
            Err(s) => return self.host_failure("reading the request body", s),
        };
        let now_ns = abi::now_ns().unwrap_or(0);
        let id = translation::response_id(now_ns, translation::connection_id(), self.context_id);
        let started = route_request(&policy.routes, &body)
            .and_then(|routed| Ok((routed.start(id, now_ns / 1_000_000_000)?, routed.provider().cluster.clone())));
        let ((exchange, up), cluster) = match started {
            Ok(t) => t,
            Err(e) => return self.refuse(&e),
        };
        if let Err(s) = translation::apply_request(&up, body_size, &cluster) {
            return self.host_failure("rewriting the request", s);
        }
        abi::increment(self.metrics.translated);
        self.translation = Translation::Forwarded(Box::new(Forwarded { exchange, stream: up.stream, answer: Answer::Waiting }));
        Action::Continue
    }

    fn host_failure(&mut self, what: &str, status: abi::Status) -> Action {
        abi::log(abi::LOG_ERROR, &format!("tollgate: {what} failed (status {})", status.0));
        self.refuse(&translation::gateway_error())
    }

    fn translate_response_headers(&mut self, end_of_stream: bool) -> Action {
        let Translation::Forwarded(f) = &mut self.translation else {
            return Action::Continue;
        };
        let map = abi::HTTP_RESPONSE_HEADERS;
        let text = |name| abi::header(map, name).ok().flatten().map(|v| String::from_utf8_lossy(&v).into_owned());
        // Envoy always has a :status; without one, treat the answer as unreadable.
        let status = text(":status").and_then(|s| s.parse::<u16>().ok()).unwrap_or(502);
        let retry_after = text("retry-after");
        let mut ok = translation::remove_provider_account_headers().is_ok();
        if f.stream && (200..300).contains(&status) && !end_of_stream {
            f.answer = Answer::Streaming;
            ok &= abi::remove_header(map, "content-length").is_ok();
            ok &= abi::set_header(map, "content-type", "text/event-stream").is_ok();
            if !ok {
                abi::increment(self.metrics.host_errors);
            }
            return Action::Continue;
        }
        if !ok {
            abi::increment(self.metrics.host_errors);
        }
        f.answer = Answer::Buffering { status, retry_after };
        if end_of_stream {
            // No body will come, so none can be written: status and headers only.
            self.finish_buffered(0, false);
            return Action::Continue;
        }
        // Held until the body is complete, then status and headers change with it.
        Action::Pause
    }

    fn translate_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Translation::Forwarded(f) = &mut self.translation else {
            return Action::Continue;
        };
        match f.answer {
            Answer::Streaming => {
                let bytes = match abi::buffer(abi::HTTP_RESPONSE_BODY, 0, body_size) {
                    Ok(b) => b,
                    Err(_) => {
                        abi::increment(self.metrics.host_errors);
                        Vec::new()
                    }
                };
                let mut out = Vec::with_capacity(bytes.len() + 64);
                f.exchange.stream(&bytes, &mut out);
                if end_of_stream {
                    f.exchange.finish(&mut out);
                }
                if abi::set_buffer(abi::HTTP_RESPONSE_BODY, 0, body_size, &out).is_err() {
                    abi::increment(self.metrics.host_errors);
                }
                if end_of_stream {
                    f.answer = Answer::Done;
                    let failed = f.exchange.stream_error().is_some();
                    self.record(failed);
                }
                Action::Continue
            }
            Answer::Buffering { .. } => {
                if !end_of_stream {
                    return Action::Pause;
                }
                self.finish_buffered(body_size, true);
                Action::Continue
            }
            Answer::Waiting | Answer::Done => Action::Continue,
        }
    }

    /// Replaces a buffered answer (status, headers and, when `with_body`, the body) with its
    /// translation.
    fn finish_buffered(&mut self, body_size: usize, with_body: bool) {
        let Translation::Forwarded(f) = &mut self.translation else {
            return;
        };
        let Answer::Buffering { status, retry_after } = std::mem::replace(&mut f.answer, Answer::Done) else {
            return;
        };
        let body = if with_body { abi::buffer(abi::HTTP_RESPONSE_BODY, 0, body_size) } else { Ok(Vec::new()) };
        let mut ok = body.is_ok();
        let response = f.exchange.response(status, retry_after.as_deref(), &body.unwrap_or_default());
        let map = abi::HTTP_RESPONSE_HEADERS;
        if with_body {
            ok &= abi::set_buffer(abi::HTTP_RESPONSE_BODY, 0, body_size, &response.body).is_ok();
        }
        ok &= abi::set_header(map, ":status", &response.status.to_string()).is_ok();
        for name in ["content-length", "content-type", "content-encoding", "retry-after"] {
            ok &= abi::remove_header(map, name).is_ok();
        }
        for (name, value) in &response.headers {
            ok &= abi::set_header(map, name, value).is_ok();
        }
        let length = if with_body { response.body.len() } else { 0 };
        ok &= abi::set_header(map, "content-length", &length.to_string()).is_ok();
        if !ok {
            abi::increment(self.metrics.host_errors);
        }
        self.record(status >= 400 || response.status >= 400);
    }

    /// Counts a translated answer's outcome and the tokens its provider reported.
    fn record(&self, upstream_failed: bool) {
        if upstream_failed {
            abi::increment(self.metrics.upstream_errors);
        }
        if let Translation::Forwarded(f) = &self.translation {
            let usage = f.exchange.usage();
            abi::increment_by(self.metrics.tokens_input, usage.input.unwrap_or(0));
            abi::increment_by(self.metrics.tokens_output, usage.output.unwrap_or(0));
        }
    }
}
