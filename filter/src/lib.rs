//! # tollgate-filter
//!
//! The proxy-wasm adapter: Tollgate as an HTTP filter for Envoy (and Istio and other
//! Proxy-Wasm ABI 0.2.1 hosts). Every decision is `tollgate-core`'s; this crate turns host
//! callbacks into core inputs and applies core's plans through host calls ("host callback → core
//! input → core plan → host calls").
//!
//! **Two roles** (one `filter.wasm`, one VM):
//! - root id `tollgate`: the downstream HTTP filter ([`downstream`]) — admission, the request
//!   rewritten for its provider, the answer translated and decorated, settlement;
//! - root id [`UPSTREAM_ROOT_ID`]: the upstream HTTP filter on a model alias's aggregate
//!   clusters ([`upstream`]) — each attempt translated for its deployment, provider health.
//!   The two meet in the VM they share ([`handoff`]). Design: docs/adr/0001-envoy-fallback.md.
//!
//! `on_configure` reads the plugin configuration (the JSON policy) and validates it with
//! [`Policy::from_json`]; on error it logs the path-naming message and returns false, which
//! makes the host refuse the plugin. A policy whose webhook events could never be delivered
//! here (`notify` without `notify.cluster`) is refused the same way.
//!
//! **Hosts** (docs/hosts.md). On Envoy the filter holds a chat request's headers while it reads
//! the body (`allow_on_headers_stop_iteration: true`); without that flag Envoy never delivers the
//! body to a filter holding the headers, so a watchdog on the root context answers such a request
//! after [`WATCHDOG_MS`] with a 500 naming the flag rather than let it hang. On Kong's
//! ngx_wasm_module (detected at configure time: it refuses the `ngx.*` properties outside a
//! request, Envoy does not know them) the headers are never held: nginx delivers the body once,
//! whole, before it proxies, with the request headers still modifiable, and the filter admits
//! the request then.
//!
//! Metrics (Envoy prefixes them with `wasmcustom.`): [`metrics::Metric`].

mod abi;
pub mod downstream;
pub mod handoff;
pub mod http;
pub mod metrics;
pub mod outbox;
pub mod remote;
mod shared_data;
pub mod upstream;

use std::cell::RefCell;
use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{ContextType, LogLevel};
use tollgate_core::Policy;

use metrics::{Metric, Metrics};

pub use shared_data::SharedData;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

/// The plugin root id that selects the upstream role.
pub const UPSTREAM_ROOT_ID: &str = "tollgate-upstream";

/// How long a chat request's headers may be held without any of its body arriving before the
/// filter concludes the host will never deliver it (Envoy without
/// `allow_on_headers_stop_iteration`) and answers it.
pub const WATCHDOG_MS: u64 = 5_000;

/// The watchdog's tick.
const WATCHDOG_TICK_MS: u32 = 1_000;

/// What kind of host runs the filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Flavour {
    /// Envoy (and hosts like it): a request's headers can be held while its body is read.
    #[default]
    Envoy,
    /// Kong's ngx_wasm_module: headers cannot be held; the body arrives once, whole, before the
    /// request is proxied.
    Ngx,
}

/// Chat requests whose headers are held, waiting for their body (the watchdog's list).
#[derive(Debug, Default)]
pub struct Waiting {
    /// (context id, when its headers were held).
    pub held: Vec<(u32, u64)>,
    /// A body has reached the filter while headers were held: the host delivers bodies, and the
    /// watchdog has nothing to watch.
    pub proven: bool,
    /// The host never delivered a held request's body (logged once).
    pub reported: bool,
}

/// What every stream of a VM shares with its root context.
#[derive(Clone)]
pub struct Shared {
    /// The validated policy.
    pub policy: Rc<Policy>,
    /// The identity secrets (and, upstream, the provider keys) the policy names, from the VM's
    /// environment.
    pub secrets: Rc<Vec<(String, Vec<u8>)>>,
    /// The counters.
    pub metrics: Rc<Metrics>,
    /// The host's kind.
    pub flavour: Flavour,
    /// The watchdog's list.
    pub waiting: Rc<RefCell<Waiting>>,
    /// Calls waiting for the root context to post them (webhook events, settlements and
    /// health reports for the store service), and those in flight: a call made from a
    /// request's context dies with it, so its answer would never be known.
    pub outbox: Rc<RefCell<outbox::Outbox>>,
}

impl Shared {
    /// A secret's bytes by name.
    pub fn secret(&self, name: &str) -> Option<Vec<u8>> {
        self.secrets.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }
}

#[derive(Default)]
struct Root {
    shared: Option<Shared>,
    upstream: bool,
}

impl Context for Root {
    /// The answer to a call the root context posted ([`Shared::outbox`]).
    fn on_http_call_response(&mut self, token_id: u32, num_headers: usize, body_size: usize, _num_trailers: usize) {
        if let Some(shared) = &self.shared {
            outbox::answered(shared, token_id, num_headers, body_size);
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, plugin_configuration_size: usize) -> bool {
        let bytes = match abi::plugin_configuration(plugin_configuration_size) {
            Ok(b) => b,
            Err(s) => {
                abi::log(abi::LOG_ERROR, &format!("tollgate: cannot read the plugin configuration (status {})", s.0));
                return false;
            }
        };
        let policy = match Policy::from_json(&bytes) {
            Ok(p) => p,
            Err(e) => {
                abi::log(abi::LOG_ERROR, &format!("tollgate: invalid configuration: {e}"));
                return false;
            }
        };
        for w in policy.warnings() {
            abi::log(abi::LOG_WARN, &format!("tollgate: {w}"));
        }
        if let Some(n) = &policy.notify {
            if n.cluster.is_none() {
                abi::log(abi::LOG_ERROR, "tollgate: invalid configuration: notify.cluster: required in Envoy (the cluster that reaches notify.url; `tollgate envoy` generates it): without it no webhook event could be delivered");
                return false;
            }
        }
        self.upstream = abi::property(&["plugin_root_id"]).ok().flatten().is_some_and(|id| id == UPSTREAM_ROOT_ID.as_bytes());
        let mut names: Vec<&str> = policy.identity.secret_names().collect();
        // The store service's key: every job of either role carries it.
        names.extend(policy.remote_store.as_ref().and_then(|r| r.key_secret.as_deref()));
        // The operator API's key (downstream only: the API is answered there).
        if !self.upstream {
            names.extend(policy.admin_key_secret.as_deref());
        }
        if self.upstream {
            // Provider keys: an aggregate cluster's attempts go to several providers, so the key
            // is added per attempt by the upstream filter (never logged).
            names.extend(policy.routes.providers().filter_map(|p| p.api_key_secret.as_deref()));
        }
        let secrets: Vec<(String, Vec<u8>)> =
            if names.is_empty() { Vec::new() } else { abi::environment().into_iter().filter(|(k, _)| names.contains(&k.as_str())).collect() };
        for name in &names {
            if !secrets.iter().any(|(k, v)| k == name && !v.is_empty()) {
                // Not fatal (requests without a signed token still work), but every signed token
                // will be refused: say so once, loudly.
                abi::log(abi::LOG_ERROR, &format!("tollgate: the secret {name} is not in the VM environment (vm_config.environment_variables); what needs it will be refused"));
            }
        }
        // ngx_wasm_module refuses every `ngx.*` property outside a request; Envoy does not know
        // the name (NotFound).
        let flavour = match abi::property(&["ngx", "pid"]) {
            Ok(None) => Flavour::Envoy,
            Ok(Some(_)) | Err(_) => Flavour::Ngx,
        };
        if flavour == Flavour::Envoy && !self.upstream && abi::set_tick_period(WATCHDOG_TICK_MS).is_err() {
            abi::log(abi::LOG_WARN, "tollgate: no tick: a chat request whose body the host never delivers cannot be answered by the watchdog");
        }
        self.shared = Some(Shared {
            policy: Rc::new(policy),
            secrets: Rc::new(secrets),
            metrics: Rc::new(Metrics::define()),
            flavour,
            waiting: Rc::new(RefCell::new(Waiting::default())),
            outbox: Rc::new(RefCell::new(outbox::Outbox::default())),
        });
        let role = if self.upstream { " (upstream role)" } else { "" };
        let host = match flavour {
            Flavour::Envoy => "",
            Flavour::Ngx => " on ngx_wasm_module (the body is admitted without holding the headers)",
        };
        abi::log(abi::LOG_INFO, &format!("tollgate: policy loaded{role}{host}"));
        true
    }

    fn on_tick(&mut self) {
        let Some(shared) = &self.shared else { return };
        downstream::watchdog(shared);
        outbox::post(shared);
        // Tick while the watchdog has something to watch (Envoy, until a body proves the host
        // delivers them); else only when events wait.
        let watching = shared.flavour == Flavour::Envoy && !self.upstream && !shared.waiting.borrow().proven;
        let period = if shared.outbox.borrow().has_waiting() {
            outbox::TICK_MS
        } else if watching {
            WATCHDOG_TICK_MS
        } else {
            0
        };
        let _ = abi::set_tick_period(period);
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let Some(shared) = self.shared.clone() else {
            // The host created a stream without a successful `on_configure`: pass it untouched.
            return Some(Box::new(Passthrough));
        };
        if self.upstream {
            Some(Box::new(upstream::Upstream::new(shared, context_id)))
        } else {
            Some(Box::new(downstream::Downstream::new(shared, context_id)))
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// A stream on a VM whose configuration failed: untouched.
struct Passthrough;

impl Context for Passthrough {}
impl HttpContext for Passthrough {}

/// Logs a failed host call and counts it.
pub(crate) fn host_error(metrics: &Metrics, what: &str, status: abi::Status) {
    metrics.add(Metric::HostErrors);
    abi::log(abi::LOG_ERROR, &format!("tollgate: {what} failed (status {})", status.0));
}
