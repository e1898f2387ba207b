//! The `QuotaCounter` Durable Object — one object per store key — and the worker's client for
//! it. The object is a driver of core's store protocol ([`tollgate_core::ops`]), nothing more:
//! it runs [`apply`] on its stored record, as shared data and every other store does.
//!
//! ## Which object holds what
//! The worker runs with `store.slots = 0` ([`crate::config`] forces it), so core's key plan
//! gives one key per identity (`tg2:i:<32 hex>`) and per client IP (`tg2:p:<32 hex>`): each is
//! its own object, named by the key. Tier (`tg2:t:<tier>`) and global (`tg2:g`) aggregates
//! would make one object the bottleneck of every request, so they are sharded: a request goes to
//! shard `fnv1a(identity key) % S` (S = the var [`SHARDS_VAR`], default [`DEFAULT_SHARDS`]) of
//! each aggregate, the object named `<key>#<shard>`, and the op names the shard ([`Shard`]), so
//! that core enforces `max / S` of each limit there (the first `max % S` shards one more).
//!
//! **The approximation**: a sharded aggregate is enforced per shard. The total over all shards
//! never exceeds the limit, but a tier may be refused while other shards still have room (the
//! identities hashed to one shard share its part). With `S = 1` it is exact. A `concurrent`
//! aggregate is split the same way.
//!
//! Provider health lives in the one object [`crate::health::HEALTH_OBJECT`] of this namespace,
//! one storage key per deployment (`tg2:h:<deployment>`, [`Op::key`]).
//!
//! ## Protocol
//! The worker POSTs a JSON array of core [`Op`]s and gets a JSON array of core [`Reply`]s, in
//! order (HTTP 200); 400 for an unreadable request, 503 when storage or the policy failed. A
//! counter object's record is stored under [`RECORD_KEY`]; a health op's under its key. The
//! object loads the policy itself, exactly as the worker does ([`crate::config::load`]).
//!
//! ## Why load → apply → put is atomic here
//! Durable Object storage has no compare-and-set, and needs none for this:
//! - An object runs single-threaded, and only it writes its storage.
//! - Input gates: while a storage operation (our `get`) is in flight, the runtime delivers no
//!   other event to the object, so no other request's code runs between the `get` resolving and
//!   our continuation.
//! - Between the `get` and the `put` there is no `await`: [`apply`] is synchronous. `put`
//!   updates the object's storage cache synchronously when called, so the next op's `get`
//!   already sees the new record. (The policy is loaded *before* the `get`.)
//! - Output gates hold our response until the `put` is durable, so the worker never sees a
//!   reservation whose count could still be lost.

use tollgate_core::limits::Scope;
use tollgate_core::ops::{apply, Op, Reply, Shard};
use tollgate_core::Policy;
use worker::js_sys::Uint8Array;
// `#[durable_object]` expands to wasm-bindgen code that names the crate `wasm_bindgen`.
use worker::wasm_bindgen;
use worker::wasm_bindgen::JsCast;
use worker::wasm_bindgen_futures::JsFuture;
use worker::{console_error, durable_object, DurableObject, Env, Method, ObjectNamespace, Request, RequestInit, Response, State};

/// The var naming how many shards each tier and global aggregate has.
pub const SHARDS_VAR: &str = "TOLLGATE_AGGREGATE_SHARDS";
/// Shards per aggregate when the var is absent or invalid.
pub const DEFAULT_SHARDS: u32 = 4;
/// Most shards the var may ask for.
pub const MAX_SHARDS: u32 = 1024;
/// The storage key of a counter object's encoded record.
pub const RECORD_KEY: &str = "record";

/// The object name and shard for one of a request's keys: the key itself for identity and IP
/// keys, `<key>#<shard>` for tier and global aggregates.
pub fn object_name(key: &str, scope: Scope, identity_key: &str, shards: u32) -> (String, Option<Shard>) {
    match scope {
        Scope::Identity | Scope::Ip => (key.to_owned(), None),
        Scope::Tier | Scope::Global => {
            let of = shards.clamp(1, MAX_SHARDS);
            let index = fnv1a(identity_key.as_bytes()) % of;
            (format!("{key}#{index}"), Some(Shard { index, of }))
        }
    }
}

/// The shard count from the var's text (absent or invalid: the default).
pub fn parse_shards(text: Option<&str>) -> u32 {
    text.and_then(|t| t.trim().parse::<u32>().ok()).filter(|n| (1..=MAX_SHARDS).contains(n)).unwrap_or(DEFAULT_SHARDS)
}

fn fnv1a(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h ^= *b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// Where an op's record lives inside its object: a counter object holds one record; the
/// health object one per deployment.
pub fn storage_key(op: &Op<'_>) -> String {
    match op {
        Op::HealthRead { .. } | Op::HealthReport { .. } => op.key().into_owned(),
        Op::Reserve { .. } | Op::Settle { .. } | Op::Peek { .. } | Op::Adjust { .. } => RECORD_KEY.to_owned(),
    }
}

/// One store key's record (see the module docs).
#[durable_object]
pub struct QuotaCounter {
    state: State,
    env: Env,
}

impl DurableObject for QuotaCounter {
    fn new(state: State, env: Env) -> Self {
        QuotaCounter { state, env }
    }

    async fn fetch(&self, mut req: Request) -> worker::Result<Response> {
        if req.path() == INDEX_PATH {
            return self.index(req).await;
        }
        // Parsed by serde_json, not the runtime's `JSON.parse` (`Request::json`): record tags
        // and GCRA times are u64s beyond 2^53, which a JS number cannot hold.
        let text = match req.text().await {
            Ok(t) => t,
            Err(e) => return Response::error(format!("unreadable ops: {e}"), 400),
        };
        let ops: Vec<Op> = match serde_json::from_str(&text) {
            Ok(ops) => ops,
            Err(e) => return Response::error(format!("bad ops: {e}"), 400),
        };
        let policy = match crate::config::load(&self.env).await {
            Ok(p) => p,
            Err(e) => {
                console_error!("tollgate: counter object has no policy: {e}");
                return Response::error("no policy", 503);
            }
        };
        let mut replies = Vec::with_capacity(ops.len());
        for op in &ops {
            match self.run(&policy, op).await {
                Ok(reply) => replies.push(reply),
                Err(e) => {
                    console_error!("tollgate: counter object storage failed: {e}");
                    return Response::error(e, 503);
                }
            }
        }
        match serde_json::to_string(&replies) {
            Ok(json) => Response::ok(json),
            Err(e) => Response::error(format!("unencodable replies: {e}"), 503),
        }
    }
}

/// The path of an activity index object's calls ([`IndexCall`]).
const INDEX_PATH: &str = "/index";
/// The storage key prefix of an index object's members.
const MEMBER_PREFIX: &str = "m:";

/// A call to an activity index object (one per period: `tollgate_core::admin::index_keys`):
/// add a member, or list a page of them in order.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IndexCall {
    /// Add `"<identity key> <tier>"`.
    Add(String),
    /// The members after `after` (exclusive), at most `limit`.
    List { after: Option<String>, limit: usize },
}

impl QuotaCounter {
    /// An activity index call: storage keys are the members (the storage lists them in order).
    async fn index(&self, mut req: Request) -> worker::Result<Response> {
        let call: IndexCall = match req.text().await.ok().and_then(|t| serde_json::from_str(&t).ok()) {
            Some(c) => c,
            None => return Response::error("bad index call", 400),
        };
        let storage = self.state.storage();
        match call {
            IndexCall::Add(member) => {
                storage.put(&format!("{MEMBER_PREFIX}{member}"), 1u8).await?;
                Response::ok("[]")
            }
            IndexCall::List { after, limit } => {
                // `start` is inclusive: the smallest key after `after` is `after` + U+0001
                // (members hold no control characters).
                let start = after.map(|a| format!("{MEMBER_PREFIX}{a}\u{1}"));
                let mut options = worker::ListOptions::new().prefix(MEMBER_PREFIX).limit(limit.min(tollgate_core::admin::MAX_PAGE + 1));
                if let Some(start) = &start {
                    options = options.start(start);
                }
                let map = storage.list_with_options(options).await?;
                let members: Vec<String> = map.keys().into_iter().filter_map(|k| k.ok()?.as_string()).filter_map(|k| k.strip_prefix(MEMBER_PREFIX).map(str::to_owned)).collect();
                Response::ok(serde_json::to_string(&members).unwrap_or_else(|_| "[]".to_owned()))
            }
        }
    }

    /// Reads the op's record, runs core's [`apply`], writes what it says — with no await
    /// between the `get` resolving and the `put` (see the module docs).
    async fn run(&self, policy: &Policy, op: &Op<'_>) -> Result<Reply, &'static str> {
        let storage = self.state.storage();
        let raw = storage.as_raw();
        let key = storage_key(op);
        let current = raw.get(&key).map_err(|_| "storage.get threw")?;
        let current = JsFuture::from(current).await.map_err(|_| "storage.get failed")?;
        // A value of another type cannot be ours: read it as absent, as core reads a record it
        // cannot decode.
        let record = if current.is_undefined() { None } else { current.dyn_into::<Uint8Array>().ok().map(|a| a.to_vec()) };
        let (reply, write) = apply(&policy.limits, &policy.health, op, record.as_deref());
        if let Some(bytes) = write {
            let put = raw.put(&key, Uint8Array::from(bytes.as_slice()).into()).map_err(|_| "storage.put threw")?;
            JsFuture::from(put).await.map_err(|_| "storage.put failed")?;
        }
        Ok(reply)
    }
}

/// Why the worker got no answer from a counter object.
#[derive(Debug)]
pub enum CounterError {
    /// The binding, the id, the stub or the request could not be made.
    Setup(String),
    /// The call to the object failed (object crashed, overloaded, network).
    Call(String),
    /// The object answered with an error status.
    Status(u16),
    /// The object's answer was not the one the op expects.
    Decode(String),
}

impl CounterError {
    /// Short label for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            CounterError::Setup(_) => "setup",
            CounterError::Call(_) => "call",
            CounterError::Status(_) => "status",
            CounterError::Decode(_) => "decode",
        }
    }

    /// As core's store error (what `on_failure` decides on).
    pub fn store_error(&self) -> tollgate_core::StoreError {
        tollgate_core::StoreError::Host(match self {
            CounterError::Setup(_) => "counter object unreachable",
            CounterError::Call(_) => "counter object call failed",
            CounterError::Status(_) => "counter object failed",
            CounterError::Decode(_) => "counter object answer unreadable",
        })
    }
}

impl std::fmt::Display for CounterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CounterError::Setup(e) => write!(f, "cannot reach the counter object: {e}"),
            CounterError::Call(e) => write!(f, "counter object call failed: {e}"),
            CounterError::Status(s) => write!(f, "counter object answered HTTP {s}"),
            CounterError::Decode(e) => write!(f, "counter object answer unreadable: {e}"),
        }
    }
}

/// Where ops go: the Durable Objects in the worker, an in-memory map in tests.
#[allow(async_fn_in_trait)]
pub trait Counters {
    /// Runs `ops`, in order, on the object named `name`.
    async fn call(&self, name: &str, ops: &[Op<'_>]) -> Result<Vec<Reply>, CounterError>;
}

/// The `QUOTA_COUNTER` namespace (or why it is missing: then every call fails, and
/// `store.on_failure` decides).
pub struct Objects(pub Result<ObjectNamespace, String>);

impl Counters for Objects {
    async fn call(&self, name: &str, ops: &[Op<'_>]) -> Result<Vec<Reply>, CounterError> {
        let namespace = self.0.as_ref().map_err(|e| CounterError::Setup(e.clone()))?;
        let stub = namespace.id_from_name(name).and_then(|id| id.get_stub()).map_err(|e| CounterError::Setup(e.to_string()))?;
        let body = serde_json::to_string(ops).map_err(|e| CounterError::Setup(e.to_string()))?;
        let mut init = RequestInit::new();
        init.with_method(Method::Post).with_body(Some(body.into()));
        // The URL only has to be valid: a Durable Object's fetch is not routed by host.
        let call = Request::new_with_init("https://quota-counter.tollgate.internal/ops", &init)
            .map_err(|e| CounterError::Setup(e.to_string()))?;
        let mut resp = stub.fetch_with_request(call).await.map_err(|e| CounterError::Call(e.to_string()))?;
        if resp.status_code() != 200 {
            return Err(CounterError::Status(resp.status_code()));
        }
        let text = resp.text().await.map_err(|e| CounterError::Decode(e.to_string()))?;
        let replies: Vec<Reply> = serde_json::from_str(&text).map_err(|e| CounterError::Decode(e.to_string()))?;
        if replies.len() != ops.len() {
            return Err(CounterError::Decode(format!("{} replies to {} ops", replies.len(), ops.len())));
        }
        Ok(replies)
    }
}

impl Objects {
    /// Calls the activity index object `name`.
    pub async fn index(&self, name: &str, call: &IndexCall) -> Result<Vec<String>, CounterError> {
        let namespace = self.0.as_ref().map_err(|e| CounterError::Setup(e.clone()))?;
        let stub = namespace.id_from_name(name).and_then(|id| id.get_stub()).map_err(|e| CounterError::Setup(e.to_string()))?;
        let body = serde_json::to_string(call).map_err(|e| CounterError::Setup(e.to_string()))?;
        let mut init = RequestInit::new();
        init.with_method(Method::Post).with_body(Some(body.into()));
        let request = Request::new_with_init(&format!("https://quota-counter.tollgate.internal{INDEX_PATH}"), &init).map_err(|e| CounterError::Setup(e.to_string()))?;
        let mut resp = stub.fetch_with_request(request).await.map_err(|e| CounterError::Call(e.to_string()))?;
        if resp.status_code() != 200 {
            return Err(CounterError::Status(resp.status_code()));
        }
        let text = resp.text().await.map_err(|e| CounterError::Decode(e.to_string()))?;
        serde_json::from_str(&text).map_err(|e| CounterError::Decode(e.to_string()))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    /// Objects in memory: each object's storage, ops applied with core's [`apply`] exactly as
    /// the Durable Object does (through JSON both ways, as over the wire). `fail` makes calls to
    /// names starting with it fail.
    pub(crate) struct MemoryObjects {
        pub policy: Policy,
        pub records: RefCell<BTreeMap<String, Vec<u8>>>,
        pub fail: RefCell<Option<String>>,
        pub calls: RefCell<Vec<String>>,
    }

    impl MemoryObjects {
        pub fn new(policy: Policy) -> Self {
            MemoryObjects { policy, records: Default::default(), fail: Default::default(), calls: Default::default() }
        }
    }

    impl Counters for MemoryObjects {
        async fn call(&self, name: &str, ops: &[Op<'_>]) -> Result<Vec<Reply>, CounterError> {
            self.calls.borrow_mut().push(name.to_owned());
            if self.fail.borrow().as_deref().is_some_and(|f| name.starts_with(f)) {
                return Err(CounterError::Status(503));
            }
            let ops: Vec<Op> = serde_json::from_str(&serde_json::to_string(ops).unwrap()).unwrap();
            let mut records = self.records.borrow_mut();
            let mut replies = Vec::new();
            for op in &ops {
                let key = format!("{name}/{}", storage_key(op));
                let (reply, write) = apply(&self.policy.limits, &self.policy.health, op, records.get(&key).map(Vec::as_slice));
                if let Some(w) = write {
                    records.insert(key, w);
                }
                replies.push(reply);
            }
            Ok(serde_json::from_str(&serde_json::to_string(&replies).unwrap()).unwrap())
        }
    }

    #[test]
    fn identity_keys_are_their_own_objects_and_aggregates_are_sharded_by_identity() {
        assert_eq!(object_name("tg2:i:ab", Scope::Identity, "k", 4), ("tg2:i:ab".to_owned(), None));
        assert_eq!(object_name("tg2:p:cd", Scope::Ip, "k", 4), ("tg2:p:cd".to_owned(), None));
        let (name, shard) = object_name("tg2:t:free", Scope::Tier, "k", 4);
        let shard = shard.unwrap();
        assert_eq!(name, format!("tg2:t:free#{}", shard.index));
        assert!(shard.index < 4 && shard.of == 4);
        assert_eq!(object_name("tg2:t:free", Scope::Tier, "k", 4).0, name, "stable");
        let (g, _) = object_name("tg2:g", Scope::Global, "k", 4);
        assert_eq!(g, format!("tg2:g#{}", shard.index), "the same shard index for every aggregate");
        let used: std::collections::BTreeSet<u32> =
            (0..64).map(|i| object_name("tg2:g", Scope::Global, &format!("id{i}"), 4).1.unwrap().index).collect();
        assert_eq!(used.len(), 4, "identities spread over every shard");
        assert_eq!(object_name("tg2:g", Scope::Global, "k", 1).0, "tg2:g#0");
    }

    #[test]
    fn the_shard_var_defaults_and_bounds() {
        assert_eq!(parse_shards(None), 4);
        assert_eq!(parse_shards(Some(" 8 ")), 8);
        assert_eq!(parse_shards(Some("0")), 4);
        assert_eq!(parse_shards(Some("x")), 4);
        assert_eq!(parse_shards(Some("100000")), 4);
    }

    #[test]
    fn counter_records_and_health_records_have_their_own_storage_keys() {
        let peek = Op::Peek { key: "tg2:t:free".into(), part: tollgate_core::ops::Part { tier: "free".into(), tag: 0, scope: Scope::Tier, shard: None }, now: 5 };
        assert_eq!(storage_key(&peek), RECORD_KEY);
        assert_eq!(storage_key(&Op::HealthRead { deployment: "flash".into() }), "tg2:h:flash");
    }
}
