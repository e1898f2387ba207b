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
//! Metrics (Envoy prefixes them with `wasmcustom.`): `tollgate_requests_allowed`,
//! `tollgate_requests_denied`, `tollgate_store_failures`, `tollgate_host_errors`.

mod abi;
mod shared_data;

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use tollgate_core::{check_and_count, render, Decision, FailureMode, Policy};

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

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request {
            policy: self.policy.clone(),
            metrics: self.metrics,
            response_headers: Vec::new(),
            replied_locally: false,
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
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(policy) = self.policy.clone() else {
            return Action::Continue;
        };
        let now = match abi::now_ms() {
            Ok(t) => t,
            Err(_) => {
                abi::increment(self.metrics.host_errors);
                return self.on_store_failure(&policy, "clock unavailable");
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
            Err(e) => self.on_store_failure(&policy, e.kind()),
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
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
        Action::Continue
    }
}


impl Request {
    fn on_store_failure(&mut self, policy: &Policy, why: &str) -> Action {
        abi::increment(self.metrics.store_failures);
        abi::log(abi::LOG_WARN, &format!("tollgate: counter store failed ({why}); policy says {:?}", policy.on_failure));
        match policy.on_failure {
            FailureMode::Allow => Action::Continue,
            FailureMode::Deny => self.reply(render::store_unavailable()),
        }
    }
}
