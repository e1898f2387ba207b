//! # tollgate-edge-worker
//!
//! Tollgate as a Cloudflare Worker (workers-rs). A thin adapter: every decision is made by
//! `tollgate-core`; this crate reads host data, calls core, and applies the result.
//!
//! For each request, `fetch`:
//! 1. loads the policy ([`config`]: KV `TOLLGATE_CONFIG`/`policy`, else the var
//!    `TOLLGATE_POLICY`). Missing or invalid → 503 in OpenAI's error shape with code
//!    `invalid_configuration` (the message names the JSON path), logged with `console_error!`;
//! 2. resolves the subject: the policy's identity header, else `cf-connecting-ip`;
//! 3. asks the subject's own Durable Object (`QUOTA_COUNTER`, `id_from_name(subject key)`, class
//!    [`counter::QuotaCounter`]) to check and count, passing the worker's `Date.now()`;
//! 4. allowed → forwards method, path+query, headers minus hop-by-hop ones and the policy's
//!    identity/tier headers, and the streamed body to the var `UPSTREAM_URL`, and returns the
//!    upstream's response with the provider's `x-ratelimit-*` headers replaced by the client's; denied → core's 429 (the upstream is never called);
//! 5. when the counter object cannot be reached, applies `store.on_failure`: `allow` forwards
//!    uncounted, `deny` answers core's retryable 503. Either way it is logged.
//!
//! When the policy maps models (`providers` + `models`), an admitted `POST /v1/chat/completions`
//! is not forwarded to `UPSTREAM_URL` but translated to the model's provider ([`translation`]:
//! Anthropic, Gemini or OpenAI-compatible, streaming included, provider keys from Worker
//! secrets). Admission comes first: a denied request's body is never read. Other requests are
//! forwarded as above.
//!
//! Never logs request or response bodies, and returns no `Err` for a client request (which
//! workers-rs would turn into a bare 500).

pub mod config;
pub mod counter;
pub mod forward;
pub mod translation;

use tollgate_core::render::{self, openai_error};
use tollgate_core::{Decision, FailureMode, LocalResponse};
use worker::{console_error, console_warn, event, Context, Date, Env, Request, Response};

use crate::config::PolicyError;
use crate::counter::{check_remote, CountRequest};

pub use counter::QuotaCounter;

/// The Durable Object namespace binding of [`QuotaCounter`].
pub const COUNTER_BINDING: &str = "QUOTA_COUNTER";
/// The var holding the upstream base URL.
pub const UPSTREAM_VAR: &str = "UPSTREAM_URL";
/// The header Cloudflare sets to the client's address.
pub const CLIENT_ADDRESS_HEADER: &str = "cf-connecting-ip";

#[event(fetch)]
async fn fetch(req: Request, env: Env, _ctx: Context) -> worker::Result<Response> {
    let policy = match config::load(&env).await {
        Ok(p) => p,
        Err(e) => {
            console_error!("tollgate: {e}");
            return forward::local(&config_error(&e));
        }
    };
    // A translated request goes to its provider's base URL, not to UPSTREAM_URL.
    let translated = translation::applies(&policy, &req.method(), &req.path());
    let upstream = if translated {
        None
    } else {
        let parsed = match env.var(UPSTREAM_VAR).map(|v| v.to_string()) {
            Ok(text) => forward::parse_base(&text),
            Err(_) => Err(format!("the var {UPSTREAM_VAR} is not set")),
        };
        match parsed {
            Ok(url) => Some(url),
            Err(e) => {
                console_error!("tollgate: {e}");
                return forward::local(&invalid_configuration(&e));
            }
        }
    };

    let header = |name: Option<&str>| name.and_then(|n| req.headers().get(n).ok().flatten());
    let identity = header(policy.identity_header());
    let tier = header(policy.tier_header());
    let client_address = header(Some(CLIENT_ADDRESS_HEADER));
    let subject = policy.subject(identity.as_deref(), tier.as_deref(), client_address.as_deref());

    let count = CountRequest {
        key: subject.key,
        quotas: policy.quotas(&subject.tier).to_vec(),
        tracked: policy.tracked_windows().to_vec(),
        now_ms: Date::now().as_millis(),
        max_retries: policy.max_retries,
    };
    let decision = match env.durable_object(COUNTER_BINDING) {
        Ok(ns) => check_remote(&ns, &count).await,
        Err(e) => Err(counter::CounterError::Setup(e)),
    };
    let decision = match decision {
        Ok(d) => d,
        Err(e) => match policy.on_failure {
            FailureMode::Allow => {
                console_warn!("tollgate: counting failed ({}), forwarding uncounted: {e}", e.kind());
                Decision::Allowed { binding: None }
            }
            FailureMode::Deny => {
                console_error!("tollgate: counting failed ({}), refusing: {e}", e.kind());
                return forward::local(&render::store_unavailable());
            }
        },
    };
    if let Some(rejection) = render::rejection(&decision) {
        return forward::local(&rejection);
    }
    let Some(upstream) = upstream else {
        return translation::handle(req, &env, &policy, &render::allowed_headers(&decision)).await;
    };

    let target = match req.url() {
        Ok(url) => forward::upstream_url(&upstream, &url),
        Err(e) => {
            console_error!("tollgate: request URL unreadable: {e}");
            return forward::local(&openai_error(
                400,
                "Malformed request URL.",
                "invalid_request_error",
                "invalid_url",
            ));
        }
    };
    let private: Vec<&str> = policy.private_request_headers().collect();
    match forward::send(&req, &target, &private).await {
        Ok(resp) => forward::with_headers(resp, &render::allowed_headers(&decision)),
        Err(e) => {
            console_error!("tollgate: upstream request failed: {e}");
            forward::local(&openai_error(
                502,
                "The upstream API could not be reached.",
                "server_error",
                "upstream_unavailable",
            ))
        }
    }
}

pub(crate) fn invalid_configuration(message: &str) -> LocalResponse {
    openai_error(503, &format!("Tollgate configuration is invalid: {message}"), "server_error", "invalid_configuration")
}

fn config_error(e: &PolicyError) -> LocalResponse {
    match e {
        PolicyError::Unavailable(_) => {
            let mut r = openai_error(
                503,
                "Tollgate configuration is temporarily unavailable. Please retry shortly.",
                "server_error",
                "configuration_unavailable",
            );
            r.headers.push(("retry-after", "1".to_owned()));
            r
        }
        PolicyError::Missing | PolicyError::Invalid(_) => invalid_configuration(&e.to_string()),
    }
}
