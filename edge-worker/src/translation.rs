//! Reaching a mapped model's provider: the URL (`providers.<name>.base_url` + the translator's
//! path), the headers (the translator's, the client headers the var [`PASS_HEADERS_VAR`]
//! lists, the provider key from the Worker secret the policy names — set last, so nothing a
//! client sends can replace it). Core decided the request ([`tollgate_core::forward`]); this
//! module only builds the fetch. The key is never logged or returned.

use tollgate_core::render::openai_error;
use tollgate_core::routing::Provider;
use tollgate_core::translate::UpstreamRequest;
use tollgate_core::LocalResponse;
use worker::{console_error, Env, Headers, Request};

use crate::forward;

/// Var: comma-separated names of client request headers passed on to translated providers
/// (e.g. `anthropic-beta`). Default: none. Credentials and hop-by-hop headers are never passed,
/// listed or not.
pub const PASS_HEADERS_VAR: &str = "PROVIDER_PASS_HEADERS";

/// Headers a client can never pass to a provider, whatever the var lists: its credentials and
/// account selectors (core's list), and those the runtime or the translated body decides.
fn never_passed(name: &str) -> bool {
    tollgate_core::provider::CLIENT_ONLY_REQUEST_HEADERS.contains(&name) || matches!(name, "content-type")
}

/// The client header names the var lists, lower-cased, minus the ones never passed and the
/// ones that stay with Tollgate (`private`).
pub fn pass_headers(var: Option<&str>, private: &dyn Fn(&str) -> bool) -> Vec<String> {
    forward::connection_tokens(var).into_iter().filter(|h| !never_passed(h) && forward::forwarded(h, &[]) && !private(h)).collect()
}

/// A response id in OpenAI's form, unique enough to tell responses apart in logs: the time
/// and 52 random bits.
pub fn response_id(now_ms: u64) -> String {
    let random = (worker::js_sys::Math::random() * (1u64 << 52) as f64) as u64;
    format!("chatcmpl-tg{now_ms:x}{random:013x}")
}

/// Why a provider cannot be reached from this worker.
pub enum Unreachable {
    /// `base_url` is not set, or a header value is invalid: the operator's to fix.
    NotConfigured(LocalResponse),
    /// The key's secret is not set.
    KeyMissing(LocalResponse),
}

/// The request to send to `provider` for `up`, with the client headers `passed`.
pub fn provider_request(env: &Env, provider: &Provider, up: &UpstreamRequest, passed: &[(String, String)]) -> Result<Request, Unreachable> {
    let Some(base_url) = provider.base_url.as_deref() else {
        let message = format!("providers.{}.base_url is not set; the worker needs it", provider.name);
        console_error!("tollgate: {message}");
        return Err(Unreachable::NotConfigured(crate::invalid_configuration(&message)));
    };
    let key = match provider.api_key_secret.as_deref() {
        None => None,
        Some(secret) => match env.secret(secret).map(|s| s.to_string()) {
            Ok(k) if !k.trim().is_empty() => Some(provider.kind.key_header(k.trim())),
            _ => {
                console_error!("tollgate: provider {} has no key: the secret {secret} is not set", provider.name);
                return Err(Unreachable::KeyMissing(openai_error(
                    503,
                    &format!("Tollgate has no API key for the provider \"{}\": its Worker secret is not set.", provider.name),
                    "server_error",
                    "provider_key_missing",
                )));
            }
        },
    };
    let build = || -> worker::Result<Request> {
        let headers = Headers::new();
        for (name, value) in &up.headers {
            headers.set(name, value)?;
        }
        for (name, value) in passed {
            headers.set(name, value)?;
        }
        if let Some((name, value)) = &key {
            headers.set(name, value)?;
        }
        forward::outbound(&format!("{base_url}{}", up.path), &headers, &up.body)
    };
    build().map_err(|_| {
        // Only a key or a passed value that is not a valid header value gets here; neither is
        // logged.
        console_error!("tollgate: provider {}: a request header value is invalid", provider.name);
        Unreachable::NotConfigured(crate::invalid_configuration(&format!(
            "a request header for the provider \"{}\" (its key or a passed header) is not a valid header value",
            provider.name
        )))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_hop_by_hop_and_private_headers_are_never_passed() {
        let var = "Anthropic-Beta, authorization, X-API-Key,x-goog-api-key, connection, host, x-tollgate-user, ,x-mock-fixture, cookie";
        let private = |h: &str| h.starts_with("x-tollgate-");
        assert_eq!(pass_headers(Some(var), &private), ["anthropic-beta", "x-mock-fixture"]);
        assert!(pass_headers(None, &private).is_empty());
    }
}
