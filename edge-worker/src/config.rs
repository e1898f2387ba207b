//! Where the worker's policy comes from: KV first, then a wrangler var.
//!
//! - KV namespace binding `TOLLGATE_CONFIG`, key `policy` (change limits without a deploy);
//! - else the var `TOLLGATE_POLICY` (a JSON string, or a TOML table wrangler passes as an object).
//!
//! The text is parsed by `Policy::from_json`; the last parsed policy is kept per isolate and
//! reused while the text is unchanged. The worker (and its counter objects, which load the
//! policy the same way) always runs with `store.slots = 0` ([`for_worker`]): one store key,
//! hence one Durable Object, per identity.

use std::cell::RefCell;
use std::rc::Rc;

use tollgate_core::{ConfigError, Policy};
use worker::js_sys::{Reflect, JSON};
use worker::wasm_bindgen::JsValue;
use worker::Env;

pub const KV_BINDING: &str = "TOLLGATE_CONFIG";
pub const KV_KEY: &str = "policy";
pub const POLICY_VAR: &str = "TOLLGATE_POLICY";

/// Why there is no usable policy.
#[derive(Debug)]
pub enum PolicyError {
    /// The KV read failed: not the operator's mistake, and possibly transient.
    Unavailable(String),
    /// Neither KV nor the var holds a policy.
    Missing,
    /// The policy text is invalid; the error names the JSON path.
    Invalid(ConfigError),
}

impl std::fmt::Display for PolicyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PolicyError::Unavailable(e) => write!(f, "cannot read KV {KV_BINDING}/{KV_KEY}: {e}"),
            PolicyError::Missing => {
                write!(f, "no policy: set KV {KV_BINDING} key \"{KV_KEY}\" or the var {POLICY_VAR}")
            }
            PolicyError::Invalid(e) => e.fmt(f),
        }
    }
}

thread_local! {
    static LAST: RefCell<Option<(String, Rc<Policy>)>> = const { RefCell::new(None) };
}

/// Reads and parses the policy for this request.
pub async fn load(env: &Env) -> Result<Rc<Policy>, PolicyError> {
    let text = match read_kv(env).await? {
        Some(text) => text,
        None => read_var(env).ok_or(PolicyError::Missing)?,
    };
    parse_cached(text)
}

async fn read_kv(env: &Env) -> Result<Option<String>, PolicyError> {
    // No KV binding configured is a supported setup (var only), not an error.
    let Ok(kv) = env.kv(KV_BINDING) else {
        return Ok(None);
    };
    kv.get(KV_KEY).text().await.map_err(|e| PolicyError::Unavailable(e.to_string()))
}

fn read_var(env: &Env) -> Option<String> {
    let value = Reflect::get(env, &JsValue::from_str(POLICY_VAR)).ok()?;
    if let Some(text) = value.as_string() {
        return Some(text);
    }
    if value.is_object() {
        return JSON::stringify(&value).ok().and_then(|s| s.as_string());
    }
    None
}

fn parse_cached(text: String) -> Result<Rc<Policy>, PolicyError> {
    if let Some(hit) = LAST.with_borrow(|last| last.as_ref().filter(|(t, _)| *t == text).map(|(_, p)| p.clone())) {
        return Ok(hit);
    }
    let policy = Rc::new(for_worker(Policy::from_json(text.as_bytes()).map_err(PolicyError::Invalid)?));
    for w in policy.warnings() {
        worker::console_warn!("tollgate: {w}");
    }
    if policy.identity.jwt_needs_host() {
        worker::console_error!("tollgate: a jwt source has no jwks: the worker verifies tokens itself and will refuse every one (payload_in_metadata is for Envoy's jwt_authn)");
    }
    LAST.set(Some((text, policy.clone())));
    Ok(policy)
}

/// The policy as the worker runs it: `slots = 0`, one key per identity (and per client IP),
/// whatever `store.slots` says (that setting sizes Envoy's shared data).
pub fn for_worker(mut policy: Policy) -> Policy {
    policy.limits.slots = 0;
    policy
}
