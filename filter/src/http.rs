//! Applying core's decisions to Envoy's request and response: the host calls that rewrite a
//! request for its provider, decorate or replace an answer, and name a request uniquely. No
//! decision is made here; every list and rule comes from core.

use tollgate_core::answer::Head;
use tollgate_core::headers::CLUSTER_HEADER;
use tollgate_core::fault::{ApiError, Fault};
use tollgate_core::provider::{CLIENT_ONLY_REQUEST_HEADERS, PROVIDER_REQUEST_HEADERS};
use tollgate_core::render::LocalResponse;
use tollgate_core::translate::UpstreamRequest;

use crate::abi::{self, Status};


/// A header map as text (values decoded lossily: only names and a few known values are read).
pub fn header_pairs(map: u32) -> Result<Vec<(String, String)>, Status> {
    Ok(abi::headers(map)?.into_iter().map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned())).collect())
}

/// The first value of `name` in `pairs`.
pub fn value<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
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

/// Where a rewritten request goes.
pub struct Destination<'a> {
    /// `:path` (the translator's, behind the provider's base-URL prefix).
    pub path: &'a str,
    /// `:authority`, when the provider's base URL names one.
    pub authority: Option<&'a str>,
    /// The provider's key header, when the filter adds it (upstream role).
    pub key: Option<(&'static str, String)>,
    /// The cluster to route to (`x-tollgate-cluster`), when the filter picks one (downstream).
    pub cluster: Option<&'a str>,
}

/// Rewrites the paused request into `up` for a provider: body, `:path`, `content-length`, the
/// translator's headers; removes the client's credentials and framing
/// ([`CLIENT_ONLY_REQUEST_HEADERS`]) and any provider header an earlier attempt set
/// ([`PROVIDER_REQUEST_HEADERS`]). `body_size` is the buffered body's length (replaced whole).
///
/// Changing a request header makes Envoy match the routes again: ABI 0.2.1 has no
/// `proxy_clear_route_cache` (Envoy registers it for 0.1.0 only), and Envoy clears the route
/// cache itself on every request-header change a plugin makes
/// (`source/extensions/common/wasm/context.cc`: add/replace/remove/setHeaderMapPairs →
/// `clearRouteCache()`), so the router matches again with the cluster header.
///
/// `known`: the request's header names as the filter read them when the headers came (saves a
/// host call reading them again; a header removed since is only removed twice); `None` reads them.
pub fn rewrite_request(up: &UpstreamRequest, body_size: usize, to: &Destination, known: Option<&[(String, String)]>) -> Result<(), Status> {
    let map = abi::HTTP_REQUEST_HEADERS;
    abi::set_buffer(abi::HTTP_REQUEST_BODY, 0, body_size, &up.body)?;
    // One read of the header map instead of a removal call per listed name (each a host call
    // into Envoy): only the names the request carries are removed.
    let read;
    let present: Vec<&str> = match known {
        Some(pairs) => pairs.iter().map(|(k, _)| k.as_str()).collect(),
        None => {
            read = abi::headers(map)?;
            read.iter().map(|(k, _)| k.as_str()).collect()
        }
    };
    let carried = |name: &str| present.iter().any(|k| k.eq_ignore_ascii_case(name));
    let mut removed: Vec<&str> = Vec::new();
    for name in CLIENT_ONLY_REQUEST_HEADERS.iter().chain(PROVIDER_REQUEST_HEADERS.iter()) {
        if carried(name) && !removed.contains(name) {
            abi::remove_header(map, name)?;
            removed.push(name);
        }
    }
    abi::set_header(map, ":path", to.path)?;
    if let Some(authority) = to.authority {
        abi::set_header(map, ":authority", authority)?;
    }
    abi::set_header(map, "content-length", &up.body.len().to_string())?;
    for (name, value) in &up.headers {
        abi::set_header(map, name, value)?;
    }
    if let Some((name, value)) = &to.key {
        abi::set_header(map, name, value)?;
    }
    if let Some(cluster) = to.cluster {
        abi::set_header(map, CLUSTER_HEADER, cluster)?;
    }
    Ok(())
}

/// Replaces the buffered request body with `body` (and its `content-length`).
pub fn replace_request_body(body: &[u8], body_size: usize) -> Result<(), Status> {
    abi::set_buffer(abi::HTTP_REQUEST_BODY, 0, body_size, body)?;
    abi::set_header(abi::HTTP_REQUEST_HEADERS, "content-length", &body.len().to_string())
}

/// Applies core's [`Head`] to the response headers. `false` when the host refused a part.
pub fn apply_head(head: &Head) -> bool {
    let map = abi::HTTP_RESPONSE_HEADERS;
    let mut ok = true;
    for name in &head.remove {
        ok &= abi::remove_header(map, name).is_ok();
    }
    for (name, value) in &head.set {
        ok &= abi::set_header(map, name, value).is_ok();
    }
    ok
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
    // The body's own headers go, unless set below (a replace drops every value of the name).
    for name in ["content-type", "content-encoding", "retry-after"] {
        if !response.headers.iter().any(|(k, _)| *k == name) {
            ok &= abi::remove_header(map, name).is_ok();
        }
    }
    for (name, value) in &response.headers {
        ok &= abi::set_header(map, name, value).is_ok();
    }
    // Without a body none can be written: status and headers only.
    let length = if with_body { response.body.len() } else { 0 };
    ok && abi::set_header(map, "content-length", &length.to_string()).is_ok()
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
