//! # tollgate-filter
//!
//! The proxy-wasm adapter: Tollgate as an HTTP filter for Envoy (and Istio and other
//! Proxy-Wasm ABI 0.2.1 hosts). It turns host callbacks into `tollgate-core` calls and applies
//! the returned decision through host calls; all logic is in core.
//!
//! What each hook does (all decisions are `tollgate_core::gate`'s; this crate moves data):
//! - `on_configure`: reads the plugin configuration (the JSON policy), validates it with
//!   [`Policy::from_json`]; on error logs the path-naming message and returns false, which makes
//!   the host refuse the plugin. Defines the metrics.
//! - `on_http_request_headers`: keeps the request headers for the gate, removes the headers
//!   Tollgate consumes (identity, tier, a client's own `x-tollgate-cluster`), then by kind:
//!   `GET /v1/tollgate/usage` is answered locally with the caller's usage; a
//!   `POST /v1/chat/completions` pauses until its body is complete (a declared body over the
//!   tier's limit is refused at once with 413); anything else is admitted now (requests and
//!   concurrency limits).
//! - `on_http_request_body`: at the end of a chat body, runs the gate — identity, guards,
//!   token estimate, reservation on every limit in shared data ([`SharedData`]) — and either
//!   answers locally (400/401/404/413/429, or 503 when the store fails and
//!   `store.on_failure` is `deny`) or forwards: translated to the model's provider when the
//!   policy maps models, with a downgrade's model and a capped `max_tokens` applied.
//! - `on_http_response_headers` / `on_http_response_body`: the client's own `x-ratelimit-*`
//!   headers (requests and tokens) replace the provider's, plus `x-tollgate-warning` past a
//!   warn threshold; translation back (streams chunk by chunk, other answers whole), the
//!   tier's `tollgate` object in a JSON body or as an SSE comment before `[DONE]`. When the
//!   answer is complete the reservation is settled with the provider's usage.
//! - `on_log` (every stream ends here: completion, client cancel, upstream reset, timeout):
//!   settles what is not settled yet, which releases the concurrency lease.
//!
//! Threshold events (`notify`) are posted with `dispatch_http_call` to the configured cluster.
//!
//! Metrics (Envoy prefixes them with `wasmcustom.`): `tollgate_requests_allowed`,
//! `tollgate_requests_denied`, `tollgate_requests_invalid`, `tollgate_store_failures`,
//! `tollgate_host_errors`, `tollgate_warnings`, `tollgate_downgrades`, `tollgate_evictions`,
//! `tollgate_settle_failures`, `tollgate_notify_sent`, `tollgate_notify_failed`, and for
//! translation `tollgate_requests_translated`, `tollgate_translation_refused` (answered
//! locally after admission: unsupported parameter), `tollgate_upstream_errors` (provider error
//! statuses and streams ended by an error), `tollgate_tokens_input`, `tollgate_tokens_output`
//! (only what providers reported: unknown is not added as zero); for model aliases
//! `tollgate_attempts` (attempts started), `tollgate_attempt_failures` (attempts that failed in
//! a way the policy falls back on), `tollgate_fallbacks` (attempts after the first),
//! `tollgate_attempts_exhausted` (answered `all_deployments_failed`) and
//! `tollgate_deployments_unavailable` (every deployment cooling down: 503).
//!
//! **Two roles.** With root id `tollgate` the filter is the downstream HTTP filter described
//! above; for a model alias it picks the first deployment from the shared health records and
//! routes to the alias's aggregate cluster. With root id [`UPSTREAM_ROOT_ID`] it is the upstream
//! HTTP filter on those aggregate clusters and translates each attempt for its deployment
//! ([`upstream`]); the two meet in the VM they share ([`handoff`]). Design:
//! docs/adr/0001-envoy-fallback.md.

mod abi;
pub mod handoff;
mod shared_data;
pub mod translation;
pub mod upstream;

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use tollgate_core::fallback::{self, Alias, Choice, Health};
use tollgate_core::gate::{self, Facts, Gate, Kind, Refused, Warning};
use tollgate_core::openai::ChatRequest;
use tollgate_core::limits::engine::Ticket;
use tollgate_core::message;
use tollgate_core::translate::exchange::Routed;
use tollgate_core::translate::{Fault, ApiError};
use tollgate_core::{render, Policy};

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
    invalid: u32,
    store_failures: u32,
    host_errors: u32,
    warnings: u32,
    downgrades: u32,
    evictions: u32,
    settle_failures: u32,
    notify_sent: u32,
    notify_failed: u32,
    translated: u32,
    refused: u32,
    upstream_errors: u32,
    tokens_input: u32,
    tokens_output: u32,
    attempts: u32,
    attempt_failures: u32,
    fallbacks: u32,
    unavailable: u32,
    exhausted: u32,
}

#[derive(Default)]
struct Root {
    policy: Option<Rc<Policy>>,
    /// The identity secrets the policy names, read from the VM's environment at configure time.
    secrets: Rc<Vec<(String, Vec<u8>)>>,
    metrics: Metrics,
    /// Runs as an upstream HTTP filter on an alias's aggregate cluster (root id
    /// `tollgate-upstream`): translates each attempt for its deployment ([`upstream`]).
    upstream: bool,
}

/// The plugin root id that selects the upstream role.
pub const UPSTREAM_ROOT_ID: &str = "tollgate-upstream";

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
                self.upstream = abi::property(&["plugin_root_id"]).ok().flatten().is_some_and(|id| id == UPSTREAM_ROOT_ID.as_bytes());
                let mut names: Vec<&str> = policy.identity.secret_names().collect();
                if self.upstream {
                    // Provider keys: an aggregate cluster's attempts go to several providers, so
                    // the key is added per attempt by the upstream filter (never logged).
                    names.extend(policy.routes.providers().filter_map(|p| p.api_key_secret.as_deref()));
                }
                let secrets: Vec<(String, Vec<u8>)> = if names.is_empty() {
                    Vec::new()
                } else {
                    abi::environment().into_iter().filter(|(k, _)| names.contains(&k.as_str())).collect()
                };
                for name in &names {
                    if !secrets.iter().any(|(k, v)| k == name && !v.is_empty()) {
                        // Not fatal (requests without a signed token still work), but every signed
                        // token will be refused: say so once, loudly.
                        abi::log(abi::LOG_ERROR, &format!("tollgate: the identity secret {name} is not in the VM environment (vm_config.environment_variables); signed identity tokens will be refused"));
                    }
                }
                self.secrets = Rc::new(secrets);
                self.policy = Some(Rc::new(policy));
                let counter = |name| abi::define_counter(name).unwrap_or(0);
                self.metrics = Metrics {
                    allowed: counter("tollgate_requests_allowed"),
                    denied: counter("tollgate_requests_denied"),
                    invalid: counter("tollgate_requests_invalid"),
                    store_failures: counter("tollgate_store_failures"),
                    host_errors: counter("tollgate_host_errors"),
                    warnings: counter("tollgate_warnings"),
                    downgrades: counter("tollgate_downgrades"),
                    evictions: counter("tollgate_evictions"),
                    settle_failures: counter("tollgate_settle_failures"),
                    notify_sent: counter("tollgate_notify_sent"),
                    notify_failed: counter("tollgate_notify_failed"),
                    translated: counter("tollgate_requests_translated"),
                    refused: counter("tollgate_translation_refused"),
                    upstream_errors: counter("tollgate_upstream_errors"),
                    tokens_input: counter("tollgate_tokens_input"),
                    tokens_output: counter("tollgate_tokens_output"),
                    attempts: counter("tollgate_attempts"),
                    attempt_failures: counter("tollgate_attempt_failures"),
                    fallbacks: counter("tollgate_fallbacks"),
                    unavailable: counter("tollgate_deployments_unavailable"),
                    exhausted: counter("tollgate_attempts_exhausted"),
                };
                abi::log(abi::LOG_INFO, if self.upstream { "tollgate: policy loaded (upstream role)" } else { "tollgate: policy loaded" });
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
            secrets: self.secrets.clone(),
            metrics: self.metrics,
            context_id,
            headers: Vec::new(),
            peer: None,
            reading_body: false,
            response_headers: Vec::new(),
            warning: None,
            ticket: None,
            replied_locally: false,
            translation: None,
            upstream: self.upstream,
            alias_key: None,
            alias_failed: false,
            attempt: None,
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
    secrets: Rc<Vec<(String, Vec<u8>)>>,
    metrics: Metrics,
    context_id: u32,
    /// The client's request headers as they arrived (the gate reads identity, tier, API key,
    /// session, `x-forwarded-for`, `accept-language` from them).
    headers: Vec<(String, String)>,
    peer: Option<String>,
    /// A chat body is being buffered.
    reading_body: bool,
    response_headers: Vec<(&'static str, String)>,
    warning: Option<Warning>,
    /// What to settle when the request ends; `None` once settled (or never admitted).
    ticket: Option<Ticket>,
    replied_locally: bool,
    /// Sent upstream translated; the answer is translated back.
    translation: Option<Box<Forwarded>>,
    /// The upstream role (see [`Root::upstream`]).
    upstream: bool,
    /// Downstream: an alias request's [`handoff`] key.
    alias_key: Option<String>,
    /// Downstream: every attempt failed; the answer is being replaced.
    alias_failed: bool,
    /// Upstream role: this attempt.
    attempt: Option<upstream::Attempt>,
}

impl Context for Request {
    fn on_done(&mut self) -> bool {
        if self.upstream {
            self.attempt_done();
        }
        true
    }
}

impl Request {
    fn secret(&self, name: &str) -> Option<Vec<u8>> {
        self.secrets.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    /// A request header as Envoy's `get_header_map_value` gives it (the first of repeated
    /// headers), except `x-forwarded-for`, whose repeated lines form one list.
    fn header_value(&self, name: &str) -> Option<String> {
        let mut values = self.headers.iter().filter(|(k, _)| k == name).map(|(_, v)| v.as_str());
        let first = values.next()?;
        if name != "x-forwarded-for" {
            return Some(first.to_owned());
        }
        Some(std::iter::once(first).chain(values).collect::<Vec<_>>().join(", "))
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

    /// Answers locally after admission with an OpenAI error, releasing what was reserved
    /// (nothing was forwarded, so nothing stays counted).
    fn refuse(&mut self, error: &ApiError) -> Action {
        let counter = match error.fault {
            Fault::Client => self.metrics.refused,
            Fault::Provider | Fault::Gateway => self.metrics.host_errors,
        };
        abi::increment(counter);
        self.translation = None;
        if let Some(key) = self.alias_key.take() {
            handoff::take(&key);
        }
        if let (Some(policy), Some(ticket)) = (self.policy.clone(), self.ticket.take()) {
            let now = abi::now_ms().unwrap_or(0);
            let failed = gate::cancel(&policy, &mut SharedData, &ticket, now);
            abi::increment_by(self.metrics.settle_failures, u64::from(failed));
        }
        let mut response = error.to_response();
        response.headers.extend(self.response_headers.iter().cloned());
        self.reply(response)
    }

    /// Runs the gate for this request: `body` for a chat completion, `None` for any other.
    fn admit(&mut self, policy: &Rc<Policy>, body: Option<&[u8]>, body_size: usize) -> Action {
        let now = match abi::now_ms() {
            Ok(t) => t,
            Err(_) => {
                // Without the time nothing can be counted: the store's failure mode decides.
                abi::increment(self.metrics.host_errors);
                abi::increment(self.metrics.store_failures);
                abi::log(abi::LOG_WARN, &format!("tollgate: clock unavailable; policy says {:?}", policy.on_failure));
                return match policy.on_failure {
                    tollgate_core::FailureMode::Allow => Action::Continue,
                    tollgate_core::FailureMode::Deny => self.reply(render::store_unavailable()),
                };
            }
        };
        let now_ns = abi::now_ns().unwrap_or(now.saturating_mul(1_000_000));
        let connection = translation::connection_id();
        let lease_id = translation::request_token(now_ns, connection, self.context_id);
        let lookup = |name: &str| self.header_value(name);
        let secrets = |name: &str| self.secret(name);
        let facts = Facts { header: &lookup, peer_address: self.peer.as_deref(), now_ms: now, secrets: &secrets };
        let outcome = match body {
            Some(b) => gate::admit_chat(policy, &facts, b, &mut SharedData, lease_id),
            None => gate::admit_other(policy, &facts, &mut SharedData, lease_id),
        };
        let admitted = match outcome {
            Gate::Reply { response, why, store_error } => {
                let counter = match why {
                    Refused::Invalid => self.metrics.invalid,
                    Refused::Limited => self.metrics.denied,
                    Refused::StoreFailed => self.metrics.store_failures,
                };
                abi::increment(counter);
                if let Some(e) = store_error {
                    abi::log(abi::LOG_WARN, &format!("tollgate: counter store failed ({}); policy denies", e.kind()));
                }
                return self.reply(response);
            }
            Gate::Forward(a) => a,
        };
        let mut admitted = *admitted;
        if admitted.ticket.is_none() {
            abi::increment(self.metrics.store_failures);
            abi::log(abi::LOG_WARN, "tollgate: counter store failed; policy allows the request uncounted");
        } else {
            abi::increment(self.metrics.allowed);
        }
        abi::increment_by(self.metrics.evictions, u64::from(admitted.evicted));
        if admitted.warning.is_some() {
            abi::increment(self.metrics.warnings);
        }
        if admitted.headers.iter().any(|(k, _)| *k == gate::DOWNGRADE_HEADER) {
            abi::increment(self.metrics.downgrades);
        }
        self.notify(policy, &admitted.events);
        self.response_headers = std::mem::take(&mut admitted.headers);
        self.warning = admitted.warning.take();
        self.ticket = admitted.ticket.take();
        let Some(request) = admitted.request.take() else {
            return Action::Continue;
        };
        if let Some(alias) = admitted.alias.take() {
            return self.forward_alias(policy, alias, &request, admitted.rewritten, body_size, now, lease_id ^ now_ns);
        }
        match admitted.route.take() {
            Some(route) => {
                let id = translation::response_id(now_ns, connection, self.context_id);
                let cluster = route.provider.cluster.clone();
                let routed = Routed { request, route };
                let (mut exchange, up) = match routed.start(id, now_ns / 1_000_000_000) {
                    Ok(t) => t,
                    Err(e) => return self.refuse(&e),
                };
                if let Some(object) = self.warning.as_ref().and_then(|w| w.object.as_ref()) {
                    exchange.set_closing_comment(message::sse_comment(object));
                }
                if let Err(s) = translation::apply_request(&up, body_size, &cluster) {
                    return self.host_failure("rewriting the request", s);
                }
                abi::increment(self.metrics.translated);
                self.translation = Some(Box::new(Forwarded { exchange, stream: up.stream, answer: Answer::Waiting }));
            }
            None if admitted.rewritten => {
                // Not translated, but a downgrade or an output cap changed the request.
                let bytes = serde_json::to_vec(&request).unwrap_or_default();
                let ok = abi::set_buffer(abi::HTTP_REQUEST_BODY, 0, body_size, &bytes).is_ok()
                    && abi::set_header(abi::HTTP_REQUEST_HEADERS, "content-length", &bytes.len().to_string()).is_ok();
                if !ok {
                    return self.host_failure("rewriting the request", abi::Status(0));
                }
            }
            None => {}
        }
        Action::Continue
    }

    /// Forwards an admitted request for a model alias: picks the deployments' order from the
    /// shared health records, routes to the aggregate cluster that tries them in that order
    /// (`x-tollgate-cluster: <alias>/<first>`) and leaves the plan in the [`handoff`] table for
    /// the upstream filter, which translates each attempt. The body stays in OpenAI's format.
    #[allow(clippy::too_many_arguments)]
    fn forward_alias(&mut self, policy: &Policy, alias: &Alias, request: &ChatRequest, rewritten: bool, body_size: usize, now: u64, seed: u64) -> Action {
        let mut read_failed = false;
        let healths: Vec<(&str, Health)> = alias
            .deployments
            .iter()
            .map(|d| {
                let h = fallback::read(&mut SharedData, &d.model).unwrap_or_else(|_| {
                    read_failed = true;
                    Health::default()
                });
                (d.model.as_str(), h)
            })
            .collect();
        if read_failed {
            // Unreadable health counts as healthy: fallback still protects the request.
            abi::increment(self.metrics.host_errors);
        }
        let lookup = |name: &str| healths.iter().find(|(n, _)| *n == name).map(|(_, h)| *h).unwrap_or_default();
        let plan = match fallback::choose(alias, &lookup, now, seed) {
            Choice::Plan(p) => p,
            Choice::Unavailable { retry_after_ms } => {
                abi::increment(self.metrics.unavailable);
                if let Some(ticket) = self.ticket.take() {
                    let failed = gate::cancel(policy, &mut SharedData, &ticket, now);
                    abi::increment_by(self.metrics.settle_failures, u64::from(failed));
                }
                let mut response = render::unavailable_model(&alias.name, retry_after_ms);
                response.headers.extend(self.response_headers.iter().cloned());
                return self.reply(response);
            }
        };
        let map = abi::HTTP_REQUEST_HEADERS;
        let mut ok = true;
        // The key both filters find the plan under: the request id, unless another request on
        // this thread already uses it (a client may send any x-request-id).
        let key = match self.header_value("x-request-id").filter(|k| !k.is_empty() && k.len() <= 128 && !handoff::contains(k)) {
            Some(k) => k,
            None => {
                let k = format!("tg-{seed:016x}");
                ok &= abi::set_header(map, "x-request-id", &k).is_ok();
                k
            }
        };
        if rewritten {
            let bytes = serde_json::to_vec(request).unwrap_or_default();
            ok &= abi::set_buffer(abi::HTTP_REQUEST_BODY, 0, body_size, &bytes).is_ok()
                && abi::set_header(map, "content-length", &bytes.len().to_string()).is_ok();
        }
        for name in translation::CLIENT_ONLY_HEADERS {
            ok &= abi::remove_header(map, name).is_ok();
        }
        // Changing a request header makes Envoy match the routes again (see
        // `translation::apply_request`).
        ok &= abi::set_header(map, translation::CLUSTER_HEADER, &plan.route_value()).is_ok();
        if !ok {
            return self.host_failure("routing the request to its deployments", abi::Status(0));
        }
        handoff::insert(
            key.clone(),
            handoff::Entry {
                alias: plan.alias.clone(),
                max_attempts: plan.max_attempts,
                order: plan.order,
                start_ms: now,
                warning: self.warning.clone(),
                ..handoff::Entry::default()
            },
        );
        self.alias_key = Some(key);
        Action::Continue
    }

    /// The answer to an alias request. A deployment's answer (the upstream filter names it in
    /// `x-tollgate-deployment`) goes to the client as it is; an answer no deployment gave
    /// (Envoy's own reply after the last attempt failed to connect or timed out) or a failure
    /// Envoy did not retry (attempts used up) is replaced by one OpenAI error naming every
    /// failed attempt.
    fn alias_response_headers(&mut self, end_of_stream: bool) -> Action {
        let map = abi::HTTP_RESPONSE_HEADERS;
        let served = abi::header(map, upstream::DEPLOYMENT_HEADER).ok().flatten();
        let retry = abi::header(map, upstream::RETRY_HEADER).ok().flatten().is_some();
        if retry && abi::remove_header(map, upstream::RETRY_HEADER).is_err() {
            abi::increment(self.metrics.host_errors);
        }
        if served.is_some() && !retry {
            if end_of_stream {
                self.settle();
            }
            return Action::Continue;
        }
        abi::increment(self.metrics.exhausted);
        self.alias_failed = true;
        if end_of_stream {
            self.replace_failed_answer(0, false);
            return Action::Continue;
        }
        Action::Pause
    }

    fn alias_failed_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !end_of_stream {
            return Action::Pause;
        }
        self.replace_failed_answer(body_size, true);
        Action::Continue
    }

    fn replace_failed_answer(&mut self, body_size: usize, with_body: bool) {
        self.alias_failed = false;
        let (alias, failed) = self
            .alias_key
            .as_deref()
            .and_then(|k| handoff::with(k, |e| (e.alias.clone(), e.failed.clone())))
            .unwrap_or_default();
        let response = render::attempts_exhausted(&alias, &failed);
        let ok = abi::remove_header(abi::HTTP_RESPONSE_HEADERS, upstream::DEPLOYMENT_HEADER).is_ok()
            && translation::replace_answer(&response, body_size, with_body);
        if !ok {
            abi::increment(self.metrics.host_errors);
        }
        self.settle();
    }

    /// Posts threshold events to the policy's webhook cluster.
    fn notify(&self, policy: &Policy, events: &[Vec<u8>]) {
        let Some(target) = policy.notify.as_ref() else { return };
        let Some(cluster) = target.cluster.as_deref() else { return };
        for body in events {
            let headers = [
                (":method", "POST"),
                (":path", target.path.as_str()),
                (":authority", target.authority.as_str()),
                ("content-type", "application/json"),
            ];
            match abi::http_call(cluster, &headers, body, target.timeout_ms) {
                Ok(_) => abi::increment(self.metrics.notify_sent),
                Err(s) => {
                    abi::increment(self.metrics.notify_failed);
                    abi::log(abi::LOG_WARN, &format!("tollgate: webhook dispatch failed (status {})", s.0));
                }
            }
        }
    }

    /// Settles the reservation with what the provider reported (once; later calls do nothing).
    fn settle(&mut self) {
        if self.upstream {
            // An attempt's usage is the downstream filter's to settle.
            self.attempt_usage();
            return;
        }
        let (Some(policy), Some(mut ticket)) = (self.policy.clone(), self.ticket.take()) else { return };
        let usage = match &self.alias_key {
            Some(key) => {
                // Charged at the price of the deployment that served, never of a failed attempt;
                // when none served (every attempt failed, or the client left first), the
                // reservation is released: the user got nothing.
                let (served, usage) = handoff::with(key, |e| (e.served.clone(), e.usage)).unwrap_or_default();
                let Some(served) = served else {
                    let now = abi::now_ms().unwrap_or(0);
                    let failed = gate::cancel(&policy, &mut SharedData, &ticket, now);
                    abi::increment_by(self.metrics.settle_failures, u64::from(failed));
                    return;
                };
                ticket.model = Some(served);
                usage
            }
            None => self.translation.as_ref().map(|f| f.exchange.usage()),
        };
        let now = abi::now_ms().unwrap_or(0);
        match gate::finish(&policy, &mut SharedData, &ticket, usage.as_ref(), now) {
            Ok(events) => self.notify(&policy, &events),
            Err(e) => {
                abi::increment(self.metrics.settle_failures);
                abi::log(abi::LOG_WARN, &format!("tollgate: settling usage failed ({}); the reservation stays counted", e.kind()));
            }
        }
    }
}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let Some(policy) = self.policy.clone() else {
            return Action::Continue;
        };
        if self.upstream {
            return self.attempt_headers(end_of_stream);
        }
        let map = abi::HTTP_REQUEST_HEADERS;
        self.headers = match abi::headers(map) {
            Ok(pairs) => pairs.into_iter().map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned())).collect(),
            Err(_) => {
                abi::increment(self.metrics.host_errors);
                Vec::new()
            }
        };
        self.peer = abi::property(&["source", "address"]).ok().flatten().map(|b| String::from_utf8_lossy(&b).into_owned());
        // Who the user is and what they pay is between the app and Tollgate: the provider does
        // not get these headers. Only the filter picks clusters: a client's own is dropped
        // (which also clears Envoy's route cache, see `translation::apply_request`).
        for name in policy.private_request_headers().chain([translation::CLUSTER_HEADER]) {
            if self.headers.iter().any(|(k, _)| k == name) && abi::remove_header(map, name).is_err() {
                abi::increment(self.metrics.host_errors);
            }
        }
        let method = self.header_value(":method");
        let path = self.header_value(":path");
        match gate::classify(method.as_deref(), path.as_deref()) {
            Kind::Usage => {
                let now = abi::now_ms().unwrap_or(0);
                let lookup = |name: &str| self.header_value(name);
                let secrets = |name: &str| self.secret(name);
                let facts = Facts { header: &lookup, peer_address: self.peer.as_deref(), now_ms: now, secrets: &secrets };
                let response = gate::usage_report(&policy, &facts, &mut SharedData);
                self.reply(response)
            }
            Kind::Other => self.admit(&policy, None, 0),
            Kind::Chat => {
                let declared = self.header_value("content-length").and_then(|v| v.trim().parse::<u64>().ok());
                let now = abi::now_ms().unwrap_or(0);
                let lookup = |name: &str| self.header_value(name);
                let secrets = |name: &str| self.secret(name);
                let facts = Facts { header: &lookup, peer_address: self.peer.as_deref(), now_ms: now, secrets: &secrets };
                if let Some(response) = gate::check_declared_length(&policy, &facts, declared) {
                    abi::increment(self.metrics.invalid);
                    return self.reply(response);
                }
                if end_of_stream {
                    return self.admit(&policy, Some(b""), 0);
                }
                // Keep the headers (they change once the body is read) while the body flows
                // in; Envoy needs `allow_on_headers_stop_iteration: true` for this pause to stop
                // only the headers.
                self.reading_body = true;
                Action::Pause
            }
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !self.reading_body {
            return Action::Continue;
        }
        if !end_of_stream {
            // Buffered: the next call sees the whole body so far.
            return Action::Pause;
        }
        self.reading_body = false;
        let Some(policy) = self.policy.clone() else {
            return Action::Continue;
        };
        let body = match abi::buffer(abi::HTTP_REQUEST_BODY, 0, body_size) {
            Ok(b) => b,
            Err(s) => return self.host_failure("reading the request body", s),
        };
        if self.upstream {
            return self.attempt_body(&policy, &body, body_size);
        }
        self.admit(&policy, Some(&body), body_size)
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        if !self.reading_body {
            return Action::Continue;
        }
        // The body ended without end_of_stream: OpenAI clients never send trailers.
        self.reading_body = false;
        abi::increment(self.metrics.invalid);
        self.reply(ApiError::invalid(None, "Request trailers are not supported.").to_response())
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        if self.replied_locally || self.policy.is_none() {
            return Action::Continue;
        }
        if self.upstream {
            return self.attempt_response_headers(end_of_stream);
        }
        for name in render::PROVIDER_RATE_LIMIT_HEADERS {
            let _ = abi::remove_header(abi::HTTP_RESPONSE_HEADERS, name);
        }
        let warning = self.warning.as_ref().map(|w| (message::WARNING_HEADER, w.header.clone()));
        for (name, value) in self.response_headers.iter().chain(warning.iter()) {
            if abi::set_header(abi::HTTP_RESPONSE_HEADERS, name, value).is_err() {
                abi::increment(self.metrics.host_errors);
            }
        }
        if self.translation.is_some() {
            return self.translate_response_headers(end_of_stream);
        }
        if self.alias_key.is_some() {
            return self.alias_response_headers(end_of_stream);
        }
        if end_of_stream {
            self.settle();
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.replied_locally {
            return Action::Continue;
        }
        if self.translation.is_some() {
            return self.translate_response_body(body_size, end_of_stream);
        }
        if self.alias_failed {
            return self.alias_failed_body(body_size, end_of_stream);
        }
        if end_of_stream {
            self.settle();
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        if self.upstream {
            self.attempt_done();
            return;
        }
        // However the stream ended (completion, client cancel, upstream reset, timeout): what is
        // not settled yet is settled now, which releases the concurrency lease.
        self.settle();
        if let Some(key) = self.alias_key.take() {
            handoff::take(&key);
        }
    }
}

impl Request {
    fn host_failure(&mut self, what: &str, status: abi::Status) -> Action {
        abi::log(abi::LOG_ERROR, &format!("tollgate: {what} failed (status {})", status.0));
        self.refuse(&translation::gateway_error())
    }

    fn translate_response_headers(&mut self, end_of_stream: bool) -> Action {
        let Some(f) = self.translation.as_deref_mut() else {
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
        let Some(f) = self.translation.as_deref_mut() else {
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
                    self.settle();
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
    /// translation, then settles.
    fn finish_buffered(&mut self, body_size: usize, with_body: bool) {
        let Some(f) = self.translation.as_deref_mut() else {
            return;
        };
        let Answer::Buffering { status, retry_after } = std::mem::replace(&mut f.answer, Answer::Done) else {
            return;
        };
        let body = if with_body { abi::buffer(abi::HTTP_RESPONSE_BODY, 0, body_size) } else { Ok(Vec::new()) };
        let mut ok = body.is_ok();
        let mut response = f.exchange.response(status, retry_after.as_deref(), &body.unwrap_or_default());
        if response.status == 200 {
            if let Some(object) = self.warning.as_ref().and_then(|w| w.object.as_ref()) {
                if let Some(b) = message::inject_into_completion(&response.body, object) {
                    response.body = b;
                }
            }
        }
        ok &= translation::replace_answer(&response, body_size, with_body);
        if !ok {
            abi::increment(self.metrics.host_errors);
        }
        self.record(status >= 400 || response.status >= 400);
        self.settle();
    }

    /// Counts a translated answer's outcome and the tokens its provider reported.
    fn record(&self, upstream_failed: bool) {
        if upstream_failed {
            abi::increment(self.metrics.upstream_errors);
        }
        if let Some(f) = &self.translation {
            let usage = f.exchange.usage();
            abi::increment_by(self.metrics.tokens_input, usage.input.unwrap_or(0));
            abi::increment_by(self.metrics.tokens_output, usage.output.unwrap_or(0));
        }
    }
}
