//! The `QuotaCounter` Durable Object — one object per store key — and the worker's client
//! for it.
//!
//! ## Which object holds what
//! The worker runs with `store.slots = 0` ([`crate::config`] forces it), so core's key plan
//! ([`LimitSet::plans`]) gives one key per identity (`tg2:i:<32 hex>`) and per client IP
//! (`tg2:p:<32 hex>`): each is its own object, named by the key. Tier (`tg2:t:<tier>`) and
//! global (`tg2:g`) aggregates would make one object the bottleneck of every request, so they
//! are sharded: a request goes to shard `fnv1a(identity key) % S` (S = the var
//! [`SHARDS_VAR`], default [`DEFAULT_SHARDS`]) of each aggregate, the object named
//! `<key>#<shard>`, and each shard enforces [`Limit::shard`] of the limit (`max / S`, the
//! first `max % S` shards one more).
//!
//! **The approximation**: a sharded aggregate is enforced per shard. The total over all shards
//! never exceeds the limit, but a tier may be refused while other shards still have room (the
//! identities hashed to one shard share its part). With `S = 1` it is exact. A `concurrent`
//! aggregate is split the same way.
//!
//! ## Protocol
//! The worker POSTs one [`Op`] as JSON (`{"op": "reserve" | "settle" | "release" | "peek",
//! ...}`) and gets an [`Answer`] as JSON (HTTP 200), or HTTP 409 when the object's policy has
//! no plan for the key (the policy changed between the worker's read and the object's: the
//! worker treats it as a store failure), 400 for an unreadable op, 503 when storage or the
//! policy failed. The object loads the policy itself, exactly as the worker does
//! ([`crate::config::load`]), rebuilds the key's plan for `who` ([`LimitSet::plan_for`]),
//! shards its limits when the op names a shard, and runs core's pure step on its stored
//! record ([`apply`]):
//! - `reserve`: [`ledger::reserve`] with the request's demand — the same step
//!   `AdmitRun::reserve` runs — answered with core's `Reserved`;
//! - `settle`: [`ledger::settle`] with the provider's usage priced for the ticket's model
//!   (`usage: null`: nothing was reported, the reservation stays the charge), answered with
//!   the notify thresholds reached; this also releases the request's concurrency lease;
//! - `release`: the same with nothing used (a later key refused the request);
//! - `peek`: where each limit stands, changing nothing;
//! - `health_read` / `health_report`: not counter ops — the one object
//!   [`crate::health::HEALTH_OBJECT`] of this namespace keeps every alias deployment's health
//!   record (see [`crate::health`]); [`apply_health`] is their pure step.
//!
//! ## Why load → decide → put is atomic here
//! Durable Object storage has no compare-and-set, and needs none for this:
//! - An object runs single-threaded, and its storage holds one value (the record, under
//!   [`RECORD_KEY`]) that only this object writes.
//! - Input gates: while a storage operation (our `get`) is in flight, the runtime delivers no
//!   other event to the object, so no other request's code runs between the `get` resolving and
//!   our continuation.
//! - Between the `get` and the `put` there is no `await`: [`apply`] is synchronous. `put`
//!   updates the object's storage cache synchronously when called, so the next op's `get`
//!   already sees the new record. (The policy is loaded *before* the `get`.)
//! - Output gates hold our response until the `put` is durable, so the worker never sees a
//!   reservation whose count could still be lost.

use serde::{Deserialize, Serialize};
use tollgate_core::limits::engine::{Estimate, LimitSet, Ticket, Who};
use tollgate_core::limits::ledger::{self, Actual, KeyPlan, LimitStatus, Reached, Reserved};
use tollgate_core::limits::{Limit, Scope};
use tollgate_core::usage::Usage;
use tollgate_core::fallback::HealthSettings;
use tollgate_core::Policy;
use worker::js_sys::Uint8Array;
// `#[durable_object]` expands to wasm-bindgen code that names the crate `wasm_bindgen`.
use worker::wasm_bindgen;
use worker::wasm_bindgen::JsCast;
use worker::wasm_bindgen_futures::JsFuture;
use crate::health::{self, OutcomeWire, MAX_READ};
use worker::{
    console_error, durable_object, DurableObject, Env, Method, ObjectNamespace, Request, RequestInit, Response, State,
};

/// The var naming how many shards each tier and global aggregate has.
pub const SHARDS_VAR: &str = "TOLLGATE_AGGREGATE_SHARDS";
pub const DEFAULT_SHARDS: u32 = 4;
/// Most shards the var may ask for.
pub const MAX_SHARDS: u32 = 1024;
/// The one storage key of every object: its encoded record.
pub const RECORD_KEY: &str = "record";

/// Which part of a sharded aggregate an object holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub index: u32,
    pub of: u32,
}

/// What the worker asks an object to do. `key` is core's store key (the plan's key, never
/// the object name); `now` is the worker's `Date.now()` (time comes from the request's worker,
/// as for every host).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Op {
    Reserve {
        key: String,
        shard: Option<Shard>,
        who: Who,
        estimate: Estimate,
        /// A downgrade an earlier key decided.
        downgraded: Option<String>,
        lease_id: u64,
        now: u64,
    },
    Settle { key: String, shard: Option<Shard>, ticket: Ticket, usage: Option<Usage>, now: u64 },
    Release { key: String, shard: Option<Shard>, ticket: Ticket, now: u64 },
    Peek { key: String, shard: Option<Shard>, who: Who, now: u64 },
    /// Provider health ([`crate::health`], the object [`crate::health::HEALTH_OBJECT`] only):
    /// the stored record of each deployment, in order.
    HealthRead { deployments: Vec<String> },
    /// Provider health: one attempt's outcome for a deployment; the object applies core's
    /// `next_health` to the stored record and answers the record after it.
    HealthReport { deployment: String, outcome: OutcomeWire, now: u64 },
}

/// An object's answer to an [`Op`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(clippy::large_enum_variant)]
pub enum Answer {
    Reserved(Reserved),
    Settled(Vec<Reached>),
    Released,
    Statuses(Vec<LimitStatus>),
    /// Encoded health records (core's `Health::encode`; empty: none stored).
    Health(Vec<Vec<u8>>),
}

/// The key is not one of `who`'s keys under the object's policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoPlan;

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

/// Runs `f` on `who`'s plan for `key`, its limits sharded when `shard` says so.
fn with_plan<T>(set: &LimitSet, who: &Who, key: &str, shard: Option<Shard>, f: impl FnOnce(&KeyPlan) -> T) -> Option<T> {
    let plan = set.plan_for(who, key)?;
    match shard {
        Some(s) if matches!(plan.scope, Scope::Tier | Scope::Global) => {
            let owned: Vec<Limit> = plan.limits.iter().map(|l| l.shard(s.index, s.of)).collect();
            let sharded = KeyPlan { limits: owned.iter().collect(), ..plan.clone() };
            Some(f(&sharded))
        }
        _ => Some(f(&plan)),
    }
}

/// One op on one object's record: the answer, and the record to store (`None`: unchanged).
/// Pure — the object runs it between its storage `get` and `put`.
pub fn apply(policy: &Policy, op: &Op, record: Option<&[u8]>) -> Result<(Answer, Option<Vec<u8>>), NoPlan> {
    let set = &policy.limits;
    let s = &set.settings;
    match op {
        Op::Reserve { key, shard, who, estimate, downgraded, lease_id, now } => {
            let demand = |model: Option<&str>| set.demand(estimate, model);
            with_plan(set, who, key, *shard, |plan| {
                let (reserved, write) = ledger::reserve(record, plan, &demand, downgraded.as_deref(), *lease_id, *now, s);
                (Answer::Reserved(reserved), write)
            })
            .ok_or(NoPlan)
        }
        Op::Settle { key, shard, ticket, usage, now } => {
            let actual = match usage.filter(|u| !u.is_empty()) {
                Some(u) => set.actual(ticket.model.as_deref(), &u),
                None => Actual::used(None, None, None),
            };
            Ok(settle(set, ticket, key, *shard, &actual, record, *now, Answer::Settled))
        }
        Op::Release { key, shard, ticket, now } => {
            Ok(settle(set, ticket, key, *shard, &Actual::nothing(), record, *now, |_| Answer::Released))
        }
        Op::Peek { key, shard, who, now } => {
            with_plan(set, who, key, *shard, |plan| (Answer::Statuses(ledger::peek(record, plan, *now, s)), None))
                .ok_or(NoPlan)
        }
        // Not counter ops: see [`apply_health`].
        Op::HealthRead { .. } | Op::HealthReport { .. } => Err(NoPlan),
    }
}

/// The storage keys a health op reads (none for counter ops).
pub fn health_keys(op: &Op) -> Vec<String> {
    match op {
        Op::HealthRead { deployments } => deployments.iter().take(MAX_READ).map(|d| health::storage_key(d)).collect(),
        Op::HealthReport { deployment, .. } => vec![health::storage_key(deployment)],
        _ => vec![],
    }
}

/// Storage writes: (key, value).
pub type Writes = Vec<(String, Vec<u8>)>;

/// One health op on the values stored under its [`health_keys`] (same order): the answer and
/// the writes. Pure, like [`apply`]; `None` for counter ops.
pub fn apply_health(settings: &HealthSettings, op: &Op, stored: &[Option<Vec<u8>>]) -> Option<(Answer, Writes)> {
    match op {
        Op::HealthRead { .. } => Some((Answer::Health(stored.iter().map(|v| v.clone().unwrap_or_default()).collect()), vec![])),
        Op::HealthReport { deployment, outcome, now } => {
            let current = stored.first().and_then(|v| v.as_deref());
            let (after, write) = health::report_step(settings, current, outcome, *now);
            let writes = write.map(|w| (health::storage_key(deployment), w)).into_iter().collect();
            Some((Answer::Health(vec![after.encode()]), writes))
        }
        _ => None,
    }
}

/// Settles one ticket part. A key the policy no longer plans, or a ticket without that key,
/// changes nothing (as core's `settle_step`): the counts wait for their window to end.
#[allow(clippy::too_many_arguments)]
fn settle(
    set: &LimitSet,
    ticket: &Ticket,
    key: &str,
    shard: Option<Shard>,
    actual: &Actual,
    record: Option<&[u8]>,
    now: u64,
    answer: impl FnOnce(Vec<Reached>) -> Answer,
) -> (Answer, Option<Vec<u8>>) {
    let Some((_, _, receipt)) = ticket.parts().find(|(k, ..)| *k == key) else {
        return (answer(vec![]), None);
    };
    let settled = with_plan(set, &ticket.who, key, shard, |plan| ledger::settle(record, plan, receipt, actual, now, &set.settings));
    match settled {
        Some((reached, write)) => (answer(reached), write),
        None => (answer(vec![]), None),
    }
}

/// One store key's record. Storage holds a single key, [`RECORD_KEY`], whose value is core's
/// encoded record (bytes, stored as a `Uint8Array`).
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
        // Parsed by serde_json, not the runtime's `JSON.parse` (`Request::json`): record tags
        // and GCRA times are u64s beyond 2^53, which a JS number cannot hold.
        let text = match req.text().await {
            Ok(t) => t,
            Err(e) => return Response::error(format!("unreadable counter op: {e}"), 400),
        };
        let op: Op = match serde_json::from_str(&text) {
            Ok(op) => op,
            Err(e) => return Response::error(format!("bad counter op: {e}"), 400),
        };
        let policy = match crate::config::load(&self.env).await {
            Ok(p) => p,
            Err(e) => {
                console_error!("tollgate: counter object has no policy: {e}");
                return Response::error("no policy", 503);
            }
        };
        if matches!(op, Op::HealthRead { .. } | Op::HealthReport { .. }) {
            return match self.run_health(&policy, &op).await {
                Ok(answer) => match serde_json::to_string(&answer) {
                    Ok(json) => Response::ok(json),
                    Err(e) => Response::error(format!("unencodable answer: {e}"), 503),
                },
                Err(e) => {
                    console_error!("tollgate: health object storage failed: {e}");
                    Response::error(e, 503)
                }
            };
        }
        match self.run(&policy, &op).await {
            // serde_json both ways (see above).
            Ok(Ok(answer)) => match serde_json::to_string(&answer) {
                Ok(json) => Response::ok(json),
                Err(e) => Response::error(format!("unencodable answer: {e}"), 503),
            },
            Ok(Err(NoPlan)) => Response::error("the policy has no such key for this identity", 409),
            Err(e) => {
                console_error!("tollgate: counter object storage failed: {e}");
                Response::error(e, 503)
            }
        }
    }
}

impl QuotaCounter {
    /// A health op: reads the keys it needs, applies [`apply_health`], writes. A report touches
    /// one key, with no await between its `get` resolving and its `put` (see the module docs).
    async fn run_health(&self, policy: &Policy, op: &Op) -> Result<Answer, &'static str> {
        let storage = self.state.storage();
        let raw = storage.as_raw();
        let mut stored = Vec::new();
        for key in health_keys(op) {
            let value = raw.get(&key).map_err(|_| "storage.get threw")?;
            let value = JsFuture::from(value).await.map_err(|_| "storage.get failed")?;
            stored.push(if value.is_undefined() { None } else { value.dyn_into::<Uint8Array>().ok().map(|a| a.to_vec()) });
        }
        let (answer, writes) = apply_health(&policy.health, op, &stored).ok_or("not a health op")?;
        for (key, bytes) in writes {
            let put = raw.put(&key, Uint8Array::from(bytes.as_slice()).into()).map_err(|_| "storage.put threw")?;
            JsFuture::from(put).await.map_err(|_| "storage.put failed")?;
        }
        Ok(answer)
    }

    async fn run(&self, policy: &Policy, op: &Op) -> Result<Result<Answer, NoPlan>, &'static str> {
        let storage = self.state.storage();
        let raw = storage.as_raw();
        let current = raw.get(RECORD_KEY).map_err(|_| "storage.get threw")?;
        let current = JsFuture::from(current).await.map_err(|_| "storage.get failed")?;
        // A value of another type cannot be ours: read it as absent, as core reads a record it
        // cannot decode.
        let record = if current.is_undefined() { None } else { current.dyn_into::<Uint8Array>().ok().map(|a| a.to_vec()) };

        // No await from here to the put: see the module docs.
        let (answer, write) = match apply(policy, op, record.as_deref()) {
            Ok(done) => done,
            Err(e) => return Ok(Err(e)),
        };
        if let Some(bytes) = write {
            let put = raw.put(RECORD_KEY, Uint8Array::from(bytes.as_slice()).into()).map_err(|_| "storage.put threw")?;
            JsFuture::from(put).await.map_err(|_| "storage.put failed")?;
        }
        Ok(Ok(answer))
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
    /// Short label for logs and metrics.
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
            CounterError::Status(409) => "counter object's policy differs",
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
    /// Runs `op` on the object named `name`.
    async fn call(&self, name: &str, op: &Op) -> Result<Answer, CounterError>;
}

/// The `QUOTA_COUNTER` namespace (or why it is missing: then every call fails, and
/// `store.on_failure` decides).
pub struct Objects(pub Result<ObjectNamespace, String>);

impl Counters for Objects {
    async fn call(&self, name: &str, op: &Op) -> Result<Answer, CounterError> {
        let namespace = self.0.as_ref().map_err(|e| CounterError::Setup(e.clone()))?;
        let stub = namespace.id_from_name(name).and_then(|id| id.get_stub()).map_err(|e| CounterError::Setup(e.to_string()))?;
        let body = serde_json::to_string(op).map_err(|e| CounterError::Setup(e.to_string()))?;
        let mut init = RequestInit::new();
        init.with_method(Method::Post).with_body(Some(body.into()));
        // The URL only has to be valid: a Durable Object's fetch is not routed by host.
        let call = Request::new_with_init("https://quota-counter.tollgate.internal/op", &init)
            .map_err(|e| CounterError::Setup(e.to_string()))?;
        let mut resp = stub.fetch_with_request(call).await.map_err(|e| CounterError::Call(e.to_string()))?;
        if resp.status_code() != 200 {
            return Err(CounterError::Status(resp.status_code()));
        }
        let text = resp.text().await.map_err(|e| CounterError::Decode(e.to_string()))?;
        serde_json::from_str::<Answer>(&text).map_err(|e| CounterError::Decode(e.to_string()))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    /// Objects in memory: each name's record, ops applied with [`apply`] exactly as the
    /// Durable Object does. `fail` makes calls to names starting with it fail.
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
        async fn call(&self, name: &str, op: &Op) -> Result<Answer, CounterError> {
            self.calls.borrow_mut().push(name.to_owned());
            if self.fail.borrow().as_deref().is_some_and(|f| name.starts_with(f)) {
                return Err(CounterError::Status(503));
            }
            // Through JSON both ways, as over the wire.
            let op: Op = serde_json::from_str(&serde_json::to_string(op).unwrap()).unwrap();
            let mut records = self.records.borrow_mut();
            let keys = health_keys(&op);
            if !keys.is_empty() {
                // Health objects keep one value per storage key: `<object>/<key>` here.
                let stored: Vec<Option<Vec<u8>>> = keys.iter().map(|k| records.get(&format!("{name}/{k}")).cloned()).collect();
                let (answer, writes) = apply_health(&self.policy.health, &op, &stored).unwrap();
                for (k, v) in writes {
                    records.insert(format!("{name}/{k}"), v);
                }
                return Ok(serde_json::from_str(&serde_json::to_string(&answer).unwrap()).unwrap());
            }
            let (answer, write) = apply(&self.policy, &op, records.get(name).map(Vec::as_slice)).map_err(|_| CounterError::Status(409))?;
            if let Some(w) = write {
                records.insert(name.to_owned(), w);
            }
            Ok(serde_json::from_str(&serde_json::to_string(&answer).unwrap()).unwrap())
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
    fn ops_and_answers_round_trip_as_json() {
        let who = Who { identity_key: "abc".into(), ip_key: None, tier: "free".into() };
        let op = Op::Peek { key: "tg2:t:free".into(), shard: Some(Shard { index: 1, of: 4 }), who, now: 5 };
        let json = serde_json::to_string(&op).unwrap();
        assert_eq!(
            json,
            r#"{"op":"peek","key":"tg2:t:free","shard":{"index":1,"of":4},"who":{"identity_key":"abc","ip_key":null,"tier":"free"},"now":5}"#
        );
        assert_eq!(serde_json::from_str::<Op>(&json).unwrap(), op);
        assert_eq!(serde_json::to_string(&Answer::Released).unwrap(), r#""released""#);
        assert!(serde_json::from_str::<Op>(r#"{"op":"explode","key":"k"}"#).is_err());
    }

    #[test]
    fn a_key_the_policy_does_not_plan_is_refused_for_reserve_and_peek_and_ignored_for_settle() {
        let policy = Policy::from_json(br#"{"tier":{"default":"d"},"tiers":{"d":{"limits":[{"window":"day","requests":1}]}}}"#).unwrap();
        let who = Who { identity_key: "a".into(), ip_key: None, tier: "d".into() };
        let estimate = Estimate { model: None, input_tokens: 0, output_tokens: 0 };
        let reserve = Op::Reserve { key: "tg2:t:d".into(), shard: None, who: who.clone(), estimate, downgraded: None, lease_id: 1, now: 1 };
        assert_eq!(apply(&policy, &reserve, None), Err(NoPlan));
        let peek = Op::Peek { key: "tg2:i:nope".into(), shard: None, who, now: 1 };
        assert_eq!(apply(&policy, &peek, None), Err(NoPlan));
    }
}
