//! The translating half of the filter: the OpenAI front door to each provider's native API,
//! when the policy has a `models` map. All translation is core's [`Exchange`]; this module
//! only moves bytes and headers between it and the host.
//!
//! One request, start to end (see the crate docs for the hooks):
//! 1. Request headers: after admission, a `POST /v1/chat/completions` pauses (the headers stay
//!    modifiable; Envoy needs `allow_on_headers_stop_iteration: true` for the body to keep
//!    flowing to the filter meanwhile).
//! 2. Request body, at its end: parse, look the model up, translate; replace the body, `:path`,
//!    `content-length` and the provider's headers; drop the client's credentials; set
//!    [`CLUSTER_HEADER`] to the provider's cluster. Changing request headers clears Envoy's
//!    route cache, so the router matches again and picks that cluster's route. Mistakes answer
//!    locally, in OpenAI's error format.
//! 3. Response headers: a 2xx answer to a stream request streams (each chunk translated as it
//!    arrives, never buffered); anything else pauses the headers, buffers the body and
//!    replaces status, headers and body once it is complete.

use tollgate_core::render::LocalResponse;
use tollgate_core::translate::exchange::Exchange;
use tollgate_core::translate::{Fault, ApiError, UpstreamRequest};

use crate::abi::{self, Status};

/// The request header that names the provider's Envoy cluster; Envoy's routes match on it.
/// Only the filter sets it: a client's own is removed before routing.
pub const CLUSTER_HEADER: &str = "x-tollgate-cluster";

/// Client request headers that must not reach a provider: credentials meant for Tollgate's
/// operator (the provider key is added by the host, per cluster), OpenAI account selectors that
/// would apply to the operator's key, and transport headers the new body invalidates
/// (`accept-encoding`: the filter must read the provider's answer uncompressed).
pub const CLIENT_ONLY_HEADERS: [&str; 8] = [
    "authorization",
    "x-api-key",
    "x-goog-api-key",
    "api-key",
    "openai-organization",
    "openai-project",
    "accept-encoding",
    "transfer-encoding",
];

/// Provider response header prefixes that describe the operator's provider account (its
/// organisation-wide limits), none of the client's business; removed from translated answers
/// like the `x-ratelimit-*` ones.
pub const PROVIDER_ACCOUNT_HEADER_PREFIXES: [&str; 1] = ["anthropic-ratelimit-"];

/// What a translated request is waiting for.
pub enum Answer {
    /// The upstream has not answered yet.
    Waiting,
    /// A 2xx answer to a stream request: each body chunk is translated as it arrives.
    Streaming,
    /// Everything else: the whole body is read, then replaced.
    Buffering { status: u16, retry_after: Option<String> },
    /// The answer has been translated; usage recorded.
    Done,
}

/// A request that went upstream translated.
pub struct Forwarded {
    pub exchange: Exchange,
    pub stream: bool,
    pub answer: Answer,
}

/// A 500 when the host would not let the filter rewrite the request: nothing half-translated
/// is ever forwarded.
pub fn gateway_error() -> ApiError {
    ApiError {
        fault: Fault::Gateway,
        status: 500,
        kind: "server_error",
        code: Some("gateway_error".to_owned()),
        param: None,
        message: "Tollgate could not forward the request. Please retry.".to_owned(),
        retry_after: None,
    }
}

/// A response id unique per request: `connection_id` is unique in the Envoy process and a
/// connection lives on one worker VM, whose context ids are unique; the time separates
/// restarts. Mixed so the id does not expose them.
pub fn response_id(now_ns: u64, connection_id: u64, context_id: u32) -> String {
    let a = mix(now_ns ^ connection_id.rotate_left(29));
    let b = mix(a ^ connection_id ^ (u64::from(context_id) << 17));
    format!("chatcmpl-tg{a:016x}{:08x}", b >> 32)
}

/// A number unique per request (the concurrency lease id), from the same parts as
/// [`response_id`].
pub fn request_token(now_ns: u64, connection_id: u64, context_id: u32) -> u64 {
    mix(mix(now_ns ^ connection_id.rotate_left(29)) ^ connection_id ^ (u64::from(context_id) << 17))
}

/// splitmix64's finaliser.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The stream's connection id (Envoy property `connection_id`, a little-endian u64).
pub fn connection_id() -> u64 {
    match abi::property(&["connection_id"]) {
        Ok(Some(bytes)) => <[u8; 8]>::try_from(bytes.as_slice()).map(u64::from_le_bytes).unwrap_or(0),
        _ => 0,
    }
}

/// Rewrites the paused request into the upstream one. `body_size` is the buffered body's
/// length (replaced whole).
pub fn apply_request(up: &UpstreamRequest, body_size: usize, cluster: &str) -> Result<(), Status> {
    let map = abi::HTTP_REQUEST_HEADERS;
    abi::set_buffer(abi::HTTP_REQUEST_BODY, 0, body_size, &up.body)?;
    for name in CLIENT_ONLY_HEADERS {
        abi::remove_header(map, name)?;
    }
    abi::set_header(map, ":path", &up.path)?;
    abi::set_header(map, "content-length", &up.body.len().to_string())?;
    for (name, value) in &up.headers {
        abi::set_header(map, name, value)?;
    }
    // No explicit route-cache clearing: ABI 0.2.1 has no `proxy_clear_route_cache` (Envoy
    // registers it for 0.1.0 only and a module importing it does not load), and Envoy clears
    // the route cache itself on every request-header change a plugin makes
    // (`source/extensions/common/wasm/context.cc`: add/replace/remove/setHeaderMapPairs →
    // `clearRouteCache()`), so the router matches again with this header.
    abi::set_header(map, CLUSTER_HEADER, cluster)
}

/// Replaces the paused answer with `response`: status, the headers that describe the body, and
/// (when `with_body`: the answer has a body of `body_size` bytes buffered) the body. `false` when
/// the host refused a part.
pub fn replace_answer(response: &LocalResponse, body_size: usize, with_body: bool) -> bool {
    let map = abi::HTTP_RESPONSE_HEADERS;
    let mut ok = true;
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
    // Without a body none can be written: status and headers only.
    let length = if with_body { response.body.len() } else { 0 };
    ok && abi::set_header(map, "content-length", &length.to_string()).is_ok()
}

/// Removes the provider-account headers (see [`PROVIDER_ACCOUNT_HEADER_PREFIXES`]) from the
/// response.
pub fn remove_provider_account_headers() -> Result<(), Status> {
    let pairs = abi::headers(abi::HTTP_RESPONSE_HEADERS)?;
    for (name, _) in pairs {
        if PROVIDER_ACCOUNT_HEADER_PREFIXES.iter().any(|p| name.starts_with(p)) {
            abi::remove_header(abi::HTTP_RESPONSE_HEADERS, &name)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_ids_differ_per_request_and_look_like_openais() {
        let a = response_id(1_700_000_000_000_000_000, 7, 3);
        let b = response_id(1_700_000_000_000_000_000, 7, 4);
        let c = response_id(1_700_000_000_000_000_000, 8, 3);
        let d = response_id(1_700_000_000_000_000_001, 7, 3);
        assert!(a.starts_with("chatcmpl-tg") && a.len() == "chatcmpl-tg".len() + 24, "{a}");
        let all = [&a, &b, &c, &d];
        for (i, x) in all.iter().enumerate() {
            for y in &all[i + 1..] {
                assert_ne!(x, y);
            }
        }
    }

    #[test]
    fn a_host_refusal_is_a_500_in_openai_shape() {
        let r = gateway_error().to_response();
        assert_eq!(r.status, 500);
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["error"]["code"], "gateway_error");
    }
}
