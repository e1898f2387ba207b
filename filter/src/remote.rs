//! The store service (`store.redis`): jobs sent over the policy's store cluster, answers read
//! back (core's [`tollgate_core::ops::remote`] protocol).

use tollgate_core::ops::remote::{Done, Envelope, Job};

use crate::{abi, Shared};

/// The path the store service takes jobs on.
pub const JOBS_PATH: &str = "/v1/store/jobs";

/// How long a settlement or a health report may take (off any request's path).
pub const BACKGROUND_TIMEOUT_MS: u32 = 2_000;

/// Sends `job` to the store service; its answer reaches the calling context's
/// `on_http_call_response` with the returned token. A request's admission says how long the
/// request waits (`timeout_ms`), so the service stops reserving before it gives up.
pub fn dispatch(shared: &Shared, job: Job, timeout_ms: u32) -> Result<u32, abi::Status> {
    let Some(store) = shared.policy.remote_store.as_ref() else { return Err(abi::Status(0)) };
    let wait_ms = matches!(job, Job::Admit { .. }).then_some(timeout_ms);
    let body = serde_json::to_vec(&Envelope { policy: shared.policy.digest.clone(), wait_ms, job }).unwrap_or_default();
    let mut headers = vec![(":method", "POST"), (":path", JOBS_PATH), (":authority", store.authority.as_str()), ("content-type", "application/json")];
    // The service's key (store.redis.key_secret), never logged; without it the service refuses.
    let authorization = store.key_secret.as_deref().and_then(|name| shared.secret(name)).map(|key| format!("Bearer {}", String::from_utf8_lossy(&key)));
    if let Some(a) = authorization.as_deref() {
        headers.push(("authorization", a));
    }
    abi::http_call(&store.cluster, &headers, &body, timeout_ms)
}

/// The `:status` of a call's answer (`None`: no answer — refused, reset, timed out).
pub fn status(num_headers: usize) -> Option<u16> {
    if num_headers == 0 {
        return None;
    }
    let value = abi::header(abi::HTTP_CALL_RESPONSE_HEADERS, ":status").ok().flatten()?;
    String::from_utf8(value).ok()?.parse().ok()
}

/// The store service's answer to a call (`Err`: why there is none).
pub fn answer(num_headers: usize, body_size: usize) -> Result<Done, String> {
    match status(num_headers) {
        None => return Err("the store service did not answer in time".to_owned()),
        Some(200) => {}
        Some(code) => return Err(format!("the store service answered {code}")),
    }
    let body = abi::buffer(abi::HTTP_CALL_RESPONSE_BODY, 0, body_size).map_err(|s| format!("reading the answer failed (status {})", s.0))?;
    serde_json::from_slice(&body).map_err(|e| format!("the store service's answer is unreadable: {e}"))
}
