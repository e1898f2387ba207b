//! The `QuotaCounter` Durable Object: one object per subject, holding that subject's counter
//! record, and the worker's client for it.
//!
//! The worker sends a [`CountRequest`] (JSON) and gets back core's [`Decision`] (JSON). All the
//! deciding happens in `tollgate_core::check_and_count`; this module only moves bytes between it
//! and Durable Object storage.
//!
//! ## Why load → decide → put is atomic here
//! Durable Object storage has no compare-and-set, and needs none for this:
//! - One object per subject (`id_from_name(subject.key)`), and an object runs single-threaded, so
//!   this object is the only writer of its record.
//! - Input gates: while a storage operation (our `get`) is in flight, the runtime delivers no
//!   other event to the object, so no other request's code runs between the `get` resolving and
//!   our continuation.
//! - Between the `get` and the `put` there is no `await`: [`check_and_count`] is synchronous and
//!   runs against an in-memory [`RecordCell`]. `put` updates the object's storage cache
//!   synchronously when called, so the next request's `get` already sees the new count.
//! - Output gates hold our response until the `put` is durable, so a client never sees a
//!   decision whose count could still be lost.
//!
//! The cell still implements [`CasStore`] faithfully (a version per value, conflicts on stale
//! writes), so core's retry loop runs unchanged; with a single writer it never conflicts.

use serde::{Deserialize, Serialize};
use tollgate_core::{check_and_count, CasStore, Decision, Quota, StoreError, Version, Window, Written};
use worker::js_sys::Uint8Array;
// `#[durable_object]` expands to wasm-bindgen code that names the crate `wasm_bindgen`.
use worker::wasm_bindgen;
use worker::wasm_bindgen::JsCast;
use worker::wasm_bindgen_futures::JsFuture;
use worker::{
    console_error, durable_object, DurableObject, Env, Method, ObjectNamespace, Request, RequestInit, Response, State,
};

/// What the worker asks the counter object to do: check `quotas` for `key` at `now_ms`, and
/// count the request when it fits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CountRequest {
    pub key: String,
    pub quotas: Vec<Quota>,
    pub tracked: Vec<Window>,
    /// The worker's `Date.now()`: time comes from the request's worker, as for every host.
    pub now_ms: u64,
    pub max_retries: u32,
}

/// The subject's record held in memory for one synchronous `check_and_count` run.
///
/// `load` hands out the value with a version; `store` accepts a write only against the version
/// it handed out (or `None` when there was no value), exactly as [`CasStore`] requires.
#[derive(Debug, Default)]
pub struct RecordCell {
    key: String,
    value: Option<Vec<u8>>,
    version: Version,
    changed: bool,
}

impl RecordCell {
    /// A cell for `key` holding what storage returned for it.
    pub fn new(key: &str, value: Option<Vec<u8>>) -> Self {
        RecordCell { key: key.to_owned(), version: if value.is_some() { 1 } else { 0 }, value, changed: false }
    }

    /// The value to persist, when a run wrote one.
    pub fn written(&self) -> Option<&[u8]> {
        self.value.as_deref().filter(|_| self.changed)
    }
}

impl CasStore for RecordCell {
    fn load(&mut self, key: &str) -> Result<Option<(Vec<u8>, Version)>, StoreError> {
        if key != self.key {
            return Err(StoreError::Host("counter object asked for another subject's key"));
        }
        Ok(self.value.clone().map(|v| (v, self.version)))
    }

    fn store(&mut self, key: &str, value: &[u8], expected: Option<Version>) -> Result<Written, StoreError> {
        if key != self.key {
            return Err(StoreError::Host("counter object asked for another subject's key"));
        }
        let current = self.value.as_ref().map(|_| self.version);
        if current != expected {
            return Ok(Written::Conflict);
        }
        self.value = Some(value.to_vec());
        self.version = self.version.wrapping_add(1).max(1);
        self.changed = true;
        Ok(Written::Stored)
    }
}

/// One subject's counters. Storage holds a single key, the subject key, whose value is core's
/// encoded counter record (bytes, stored as a `Uint8Array`).
#[durable_object]
pub struct QuotaCounter {
    state: State,
}

impl DurableObject for QuotaCounter {
    fn new(state: State, _env: Env) -> Self {
        QuotaCounter { state }
    }

    async fn fetch(&self, mut req: Request) -> worker::Result<Response> {
        let count: CountRequest = match req.json().await {
            Ok(c) => c,
            Err(e) => return Response::error(format!("bad count request: {e}"), 400),
        };
        match self.count(&count).await {
            Ok(decision) => Response::from_json(&decision),
            Err(e) => {
                console_error!("tollgate: counter object failed ({}): {e}", e.kind());
                Response::error(e.to_string(), 503)
            }
        }
    }
}

impl QuotaCounter {
    async fn count(&self, req: &CountRequest) -> Result<Decision, StoreError> {
        let storage = self.state.storage();
        let raw = storage.as_raw();
        let current = raw.get(&req.key).map_err(|_| StoreError::Host("storage.get threw"))?;
        let current = JsFuture::from(current).await.map_err(|_| StoreError::Host("storage.get failed"))?;
        let value = if current.is_undefined() {
            None
        } else {
            // A value of another type cannot be ours: read it as absent, as core reads a
            // record it cannot decode.
            current.dyn_into::<Uint8Array>().ok().map(|a| a.to_vec())
        };

        // No await from here to the put: see the module docs.
        let mut cell = RecordCell::new(&req.key, value);
        let decision = check_and_count(&mut cell, &req.key, &req.quotas, &req.tracked, req.now_ms, req.max_retries)?;

        if let Some(bytes) = cell.written() {
            let put =
                raw.put(&req.key, Uint8Array::from(bytes).into()).map_err(|_| StoreError::Host("storage.put threw"))?;
            JsFuture::from(put).await.map_err(|_| StoreError::Host("storage.put failed"))?;
        }
        Ok(decision)
    }
}

/// Why the worker got no decision from the counter object.
#[derive(Debug)]
pub enum CounterError {
    /// The binding, the id, the stub or the request could not be made.
    Setup(worker::Error),
    /// The call to the object failed (object crashed, overloaded, network).
    Call(worker::Error),
    /// The object answered, but not with a decision.
    Status(u16),
    /// The object's answer was not a decision.
    Decode(worker::Error),
}

impl CounterError {
    /// Short label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            CounterError::Setup(_) => "setup",
            CounterError::Call(_) => "call",
            CounterError::Status(_) => "status",
            CounterError::Decode(_) => "decode",
        }
    }
}

impl std::fmt::Display for CounterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CounterError::Setup(e) => write!(f, "cannot reach the counter object: {e}"),
            CounterError::Call(e) => write!(f, "counter object call failed: {e}"),
            CounterError::Status(s) => write!(f, "counter object answered HTTP {s}"),
            CounterError::Decode(e) => write!(f, "counter object answer is not a decision: {e}"),
        }
    }
}

/// Asks the subject's own counter object (named by the subject key, never one global object)
/// to check and count.
pub async fn check_remote(namespace: &ObjectNamespace, req: &CountRequest) -> Result<Decision, CounterError> {
    let stub = namespace.id_from_name(&req.key).and_then(|id| id.get_stub()).map_err(CounterError::Setup)?;
    let body = serde_json::to_string(req).map_err(|e| CounterError::Setup(worker::Error::RustError(e.to_string())))?;
    let mut init = RequestInit::new();
    init.with_method(Method::Post).with_body(Some(body.into()));
    // The URL only has to be valid: a Durable Object's fetch is not routed by host.
    let call =
        Request::new_with_init("https://quota-counter.tollgate.internal/check", &init).map_err(CounterError::Setup)?;
    let mut resp = stub.fetch_with_request(call).await.map_err(CounterError::Call)?;
    if resp.status_code() != 200 {
        return Err(CounterError::Status(resp.status_code()));
    }
    resp.json::<Decision>().await.map_err(CounterError::Decode)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_core::store::update;
    use tollgate_core::store::Step;

    #[test]
    fn cell_starts_empty_or_at_version_one_and_rejects_stale_writes() {
        let mut c = RecordCell::new("k", None);
        assert_eq!(c.load("k").unwrap(), None);
        assert_eq!(c.store("k", b"a", Some(1)).unwrap(), Written::Conflict);
        assert_eq!(c.store("k", b"a", None).unwrap(), Written::Stored);
        let (_, v) = c.load("k").unwrap().unwrap();
        assert_eq!(c.store("k", b"b", None).unwrap(), Written::Conflict);
        assert_eq!(c.store("k", b"b", Some(v)).unwrap(), Written::Stored);
        assert_eq!(c.store("k", b"c", Some(v)).unwrap(), Written::Conflict);
        assert_eq!(c.written(), Some(&b"b"[..]));

        let c = RecordCell::new("k", Some(b"x".to_vec()));
        assert_eq!(c.written(), None, "an unchanged value is not written back");
    }

    #[test]
    fn cell_refuses_other_keys() {
        let mut c = RecordCell::new("k", None);
        assert!(c.load("other").is_err());
        assert!(c.store("other", b"a", None).is_err());
    }

    #[test]
    fn a_decision_without_a_write_leaves_nothing_to_persist() {
        let mut c = RecordCell::new("k", Some(vec![1]));
        update(&mut c, "k", 0, |_| Step { result: (), write: None }).unwrap();
        assert_eq!(c.written(), None);
    }

    #[test]
    fn counts_through_the_cell_across_runs() {
        let quotas = [Quota { window: Window::Hour, requests: 2 }];
        let tracked = [Window::Hour];
        let now = 1_709_214_330_250;
        let mut stored: Option<Vec<u8>> = None;
        let mut verdicts = vec![];
        for _ in 0..3 {
            let mut cell = RecordCell::new("k", stored.clone());
            let d = check_and_count(&mut cell, "k", &quotas, &tracked, now, 0).unwrap();
            if let Some(w) = cell.written() {
                stored = Some(w.to_vec());
            }
            verdicts.push(d.is_allowed());
        }
        assert_eq!(verdicts, [true, true, false]);
    }

    #[test]
    fn count_request_round_trips_as_json() {
        let req = CountRequest {
            key: "tg1:q:abc".into(),
            quotas: vec![Quota { window: Window::Minute, requests: 3 }],
            tracked: vec![Window::Minute, Window::Day],
            now_ms: 1,
            max_retries: 16,
        };
        let json = serde_json::to_string(&req).unwrap();
        assert_eq!(
            json,
            r#"{"key":"tg1:q:abc","quotas":[{"window":"minute","requests":3}],"tracked":["minute","day"],"now_ms":1,"max_retries":16}"#
        );
        assert_eq!(serde_json::from_str::<CountRequest>(&json).unwrap(), req);
    }
}
