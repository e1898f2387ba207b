//! The store protocol: every operation Tollgate runs on one stored record, as data.
//!
//! A request's counting is a handful of per-key operations — reserve at admission, settle (or
//! release) when it ends, peek for the usage endpoint, read and report a deployment's health.
//! Each one is an [`Op`] value with serde, and [`apply`] is the one pure function that runs it on
//! the record stored under [`Op::key`], returning the [`Reply`] and the bytes to write (`None`:
//! unchanged). Every store backend runs that same function:
//! - a compare-and-set store (proxy-wasm shared data, the in-memory test store) inside
//!   `crate::store::update`'s load → decide → compare-and-set loop ([`sync::run`]);
//! - a Durable Object between its storage `get` and `put` (single-threaded: no CAS needed);
//! - next, a remote store service (Redis), atomically per key.
//!
//! The sequence of operations a request needs is a sans-IO state machine ([`machine`]):
//! [`machine::Admitting`] (reserve key by key in core's order, release the reserved ones when a
//! later key refuses or fails), [`machine::Settling`] and [`machine::Peeking`]. A driver asks
//! the machine for its next [`Op`], runs it against its backend, hands back the [`Reply`], and
//! repeats until the machine is done — synchronously ([`sync::run`]) or with an `await` between
//! steps (the worker). Adding a store backend means writing a driver, never a copy of the loop.
//!
//! Ops carry what identifies one member of one key ([`Part`]: tier, member tag, scope, shard) —
//! never an identity or a request byte — so the store never needs to hash anything.

pub mod machine;
pub mod remote;
pub mod sync;

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::fallback::{health_key, next_health, Health, HealthSettings, Outcome};
use crate::limits::engine::{Estimate, LimitSet};
use crate::limits::ledger::{self, Actual, Adjustment, KeyPlan, LimitStatus, Reached, Receipt, Reserved};
use crate::limits::{Limit, Scope};
use crate::window::Timestamp;

/// Which part of a sharded aggregate a key holds: hosts that split a tier or global aggregate
/// over several records (the worker: one Durable Object per shard) enforce `1/of` of each of its
/// limits in each ([`Limit::shard`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    /// This shard, `0..of`.
    pub index: u32,
    /// How many shards the aggregate has.
    pub of: u32,
}

/// One member of one key: the tier whose limits apply, the member's tag in the record, the
/// key's scope, and the shard when the host splits aggregates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part<'a> {
    /// The tier whose limits apply (tier and global aggregates: its limits of that scope).
    pub tier: Cow<'a, str>,
    /// The member's tag inside the record (0 for aggregates).
    pub tag: u64,
    /// Whose key it is.
    pub scope: Scope,
    /// Set by a driver that shards aggregates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<Shard>,
}

/// One operation on one stored record. It borrows what the machine that made it holds (a
/// driver runs it before asking for the next one); deserialized, it owns its strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Op<'a> {
    /// Reserve a request's estimate on every limit of the part (`ledger::reserve`).
    Reserve {
        /// The store key.
        key: Cow<'a, str>,
        /// Whose limits.
        part: Part<'a>,
        /// What the request is admitted with.
        estimate: Cow<'a, Estimate>,
        /// A downgrade an earlier key decided (the demand is priced for that model).
        downgraded: Option<Cow<'a, str>>,
        /// The concurrency lease's id.
        lease_id: u64,
        /// Epoch milliseconds.
        now: Timestamp,
    },
    /// Replace a reservation with what was used (`ledger::settle`); with
    /// [`Actual::nothing`] it releases it. Always releases the concurrency lease.
    Settle {
        /// The store key.
        key: Cow<'a, str>,
        /// Whose limits.
        part: Part<'a>,
        /// What the reservation charged on this key.
        receipt: Cow<'a, Receipt>,
        /// What to charge instead (`None` fields: keep the reservation).
        actual: Actual,
        /// Epoch milliseconds.
        now: Timestamp,
    },
    /// Where every limit of the part stands, changing nothing.
    Peek {
        /// The store key.
        key: Cow<'a, str>,
        /// Whose limits.
        part: Part<'a>,
        /// Epoch milliseconds.
        now: Timestamp,
    },
    /// An operator's change to the part's counts ([`ledger::adjust`]); answers where its
    /// limits stand afterwards.
    Adjust {
        /// The store key.
        key: Cow<'a, str>,
        /// Whose limits.
        part: Part<'a>,
        /// The change.
        adjustment: Cow<'a, Adjustment>,
        /// Epoch milliseconds.
        now: Timestamp,
    },
    /// A deployment's health record, changing nothing.
    HealthRead {
        /// The deployment (a name in the policy's `models`).
        deployment: Cow<'a, str>,
    },
    /// One attempt's outcome on a deployment ([`next_health`]); writes only when the record
    /// changes.
    HealthReport {
        /// The deployment.
        deployment: Cow<'a, str>,
        /// What happened.
        outcome: Outcome,
        /// Epoch milliseconds.
        now: Timestamp,
    },
}

/// What an [`Op`] answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(clippy::large_enum_variant)]
pub enum Reply {
    /// To [`Op::Reserve`].
    Reserved(Reserved),
    /// To [`Op::Settle`]: the notify thresholds the settlement reached.
    Settled(Vec<Reached>),
    /// To [`Op::Peek`].
    Statuses(Vec<LimitStatus>),
    /// To the health ops: the record after the op (healthy when absent or unreadable).
    Health(Health),
}

impl<'a> Op<'a> {
    /// The store key the op reads and writes.
    pub fn key(&self) -> Cow<'_, str> {
        match self {
            Op::Reserve { key, .. } | Op::Settle { key, .. } | Op::Peek { key, .. } | Op::Adjust { key, .. } => Cow::Borrowed(key),
            Op::HealthRead { deployment } | Op::HealthReport { deployment, .. } => health_key(deployment).into(),
        }
    }

    /// The part the op is about (`None` for health ops).
    pub fn part_mut(&mut self) -> Option<&mut Part<'a>> {
        match self {
            Op::Reserve { part, .. } | Op::Settle { part, .. } | Op::Peek { part, .. } | Op::Adjust { part, .. } => Some(part),
            Op::HealthRead { .. } | Op::HealthReport { .. } => None,
        }
    }

    /// The op with every borrowed field copied, to hand to another thread (a store service
    /// that combines the ops of concurrent jobs on one key into one write).
    pub fn into_owned(self) -> Op<'static> {
        fn own<T: ToOwned + ?Sized>(c: Cow<'_, T>) -> Cow<'static, T> {
            Cow::Owned(c.into_owned())
        }
        fn part(p: Part<'_>) -> Part<'static> {
            Part { tier: own(p.tier), tag: p.tag, scope: p.scope, shard: p.shard }
        }
        match self {
            Op::Reserve { key, part: p, estimate, downgraded, lease_id, now } => {
                Op::Reserve { key: own(key), part: part(p), estimate: own(estimate), downgraded: downgraded.map(own), lease_id, now }
            }
            Op::Settle { key, part: p, receipt, actual, now } => Op::Settle { key: own(key), part: part(p), receipt: own(receipt), actual, now },
            Op::Peek { key, part: p, now } => Op::Peek { key: own(key), part: part(p), now },
            Op::Adjust { key, part: p, adjustment, now } => Op::Adjust { key: own(key), part: part(p), adjustment: own(adjustment), now },
            Op::HealthRead { deployment } => Op::HealthRead { deployment: own(deployment) },
            Op::HealthReport { deployment, outcome, now } => Op::HealthReport { deployment: own(deployment), outcome, now },
        }
    }

    /// Whether the op may change the record (reads can be answered from a replica or a cache).
    pub fn writes(&self) -> bool {
        !matches!(self, Op::Peek { .. } | Op::HealthRead { .. })
    }
}

/// Runs `op` on the bytes stored under [`Op::key`]: the reply, and the bytes to write (`None`:
/// leave the record as it is). Pure: a compare-and-set driver may run it several times.
pub fn apply(limits: &LimitSet, health: &HealthSettings, op: &Op, stored: Option<&[u8]>) -> (Reply, Option<Vec<u8>>) {
    let settings = &limits.settings;
    match op {
        Op::Reserve { key, part, estimate, downgraded, lease_id, now } => with_plan(limits, key, part, |plan| {
            let demand = |model: Option<&str>| limits.demand(estimate, model);
            let (reserved, write) = ledger::reserve(stored, plan, &demand, downgraded.as_deref(), *lease_id, *now, settings);
            (Reply::Reserved(reserved), write)
        }),
        Op::Settle { key, part, receipt, actual, now } => with_plan(limits, key, part, |plan| {
            let (reached, write) = ledger::settle(stored, plan, receipt, actual, *now, settings);
            (Reply::Settled(reached), write)
        }),
        Op::Peek { key, part, now } => {
            with_plan(limits, key, part, |plan| (Reply::Statuses(ledger::peek(stored, plan, *now, settings)), None))
        }
        Op::Adjust { key, part, adjustment, now } => with_plan(limits, key, part, |plan| {
            let (statuses, write) = ledger::adjust(stored, plan, adjustment, *now, settings);
            (Reply::Statuses(statuses), write)
        }),
        Op::HealthRead { .. } => (Reply::Health(stored.and_then(Health::decode).unwrap_or_default()), None),
        Op::HealthReport { outcome, now, .. } => {
            let prev = stored.and_then(Health::decode);
            match next_health(prev.as_ref(), outcome, health, *now) {
                Some(next) => (Reply::Health(next), Some(next.encode())),
                None => (Reply::Health(prev.unwrap_or_default()), None),
            }
        }
    }
}

/// Runs `f` on the plan of `part` under `key`: the tier's limits of the part's scope, each cut
/// to its shard's share when the part is a shard of an aggregate.
fn with_plan<T>(limits: &LimitSet, key: &str, part: &Part<'_>, f: impl FnOnce(&KeyPlan<'_>) -> T) -> T {
    let base = limits.part_limits(&part.tier, part.scope);
    match part.shard {
        None => f(&limits.key_plan(key.into(), part.tag, part.scope, base)),
        Some(s) => {
            let owned: Vec<Limit> = base.iter().map(|l| l.shard(s.index, s.of)).collect();
            f(&limits.key_plan(key.into(), part.tag, part.scope, &owned))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Policy;
    use crate::fallback::{Failure, Quota};

    fn policy() -> Policy {
        Policy::from_json(
            br#"{"tier":{"default":"d"},"store":{"slots":0},
                 "tiers":{"d":{"limits":[{"window":"day","requests":2},{"per":"tier","window":"day","requests":9}]}},
                 "health":{"failures":2,"window_seconds":60,"cooldown_seconds":30}}"#,
        )
        .unwrap()
    }

    fn part(scope: Scope, shard: Option<Shard>) -> Part<'static> {
        Part { tier: "d".into(), tag: 7, scope, shard }
    }

    fn reserve(p: &Policy, stored: Option<&[u8]>, scope: Scope, shard: Option<Shard>) -> (Reserved, Option<Vec<u8>>) {
        let op = Op::Reserve {
            key: "k".into(),
            part: part(scope, shard),
            estimate: Cow::Owned(Estimate { model: None, input_tokens: 0, output_tokens: 0 }),
            downgraded: None,
            lease_id: 1,
            now: 1_000,
        };
        match apply(&p.limits, &p.health, &op, stored) {
            (Reply::Reserved(r), w) => (r, w),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ops_round_trip_as_json_with_u64s_intact() {
        let op = Op::Reserve {
            key: "tg2:i:00".into(),
            part: Part { tier: "free".into(), tag: u64::MAX, scope: Scope::Identity, shard: None },
            estimate: Cow::Owned(Estimate { model: Some("m".into()), input_tokens: 3, output_tokens: 4 }),
            downgraded: None,
            lease_id: u64::MAX - 1,
            now: 5,
        };
        let json = serde_json::to_string(&op).unwrap();
        assert!(json.starts_with(r#"{"op":"reserve","key":"tg2:i:00""#), "{json}");
        assert_eq!(serde_json::from_str::<Op>(&json).unwrap(), op);
        let report = Op::HealthReport { deployment: "m".into(), outcome: Outcome::Failed { failure: Failure::Status(429), retry_after_ms: Some(2) }, now: 1 };
        assert_eq!(serde_json::from_str::<Op>(&serde_json::to_string(&report).unwrap()).unwrap(), report);
        assert_eq!(report.key(), "tg2:h:m");
        assert!(serde_json::from_str::<Op>(r#"{"op":"reserve","key":"k","extra":1}"#).is_err());
    }

    #[test]
    fn a_reserve_counts_and_a_shard_enforces_its_share() {
        let p = policy();
        let (r, w) = reserve(&p, None, Scope::Identity, None);
        assert!(r.verdict == ledger::Verdict::Allowed && w.is_some());
        let (r, w2) = reserve(&p, w.as_deref(), Scope::Identity, None);
        assert!(r.verdict == ledger::Verdict::Allowed);
        let (r, w3) = reserve(&p, w2.as_deref(), Scope::Identity, None);
        assert!(r.verdict != ledger::Verdict::Allowed && w3.is_none(), "the third of 2 is refused and writes nothing");
        // The tier aggregate (9 a day) in 4 shards: shard 3 holds 2 of them.
        let shard = Some(Shard { index: 3, of: 4 });
        let (_, w) = reserve(&p, None, Scope::Tier, shard);
        let (_, w) = reserve(&p, w.as_deref(), Scope::Tier, shard);
        let (r, _) = reserve(&p, w.as_deref(), Scope::Tier, shard);
        assert!(r.verdict != ledger::Verdict::Allowed);
    }

    #[test]
    fn an_adjustment_credits_or_resets_the_current_window_and_keeps_leases() {
        let p = Policy::from_json(
            br#"{"tier":{"default":"d"},"store":{"slots":0},
                 "tiers":{"d":{"limits":[{"window":"day","requests":2},{"window":"day","total_tokens":100},{"concurrent":3}]},
                          "e":{"limits":[{"window":"day","requests":50}]}}}"#,
        )
        .unwrap();
        let estimate = Estimate { model: None, input_tokens: 30, output_tokens: 10 };
        let reserve = |stored: Option<&[u8]>, lease: u64| {
            let op = Op::Reserve { key: "k".into(), part: part(Scope::Identity, None), estimate: Cow::Borrowed(&estimate), downgraded: None, lease_id: lease, now: 1_000 };
            apply(&p.limits, &p.health, &op, stored)
        };
        let (_, w) = reserve(None, 1);
        let (_, w) = reserve(w.as_deref(), 2);
        let adjust = |stored: Option<&[u8]>, adjustment: Adjustment| {
            let op = Op::Adjust { key: "k".into(), part: part(Scope::Identity, None), adjustment: Cow::Owned(adjustment), now: 2_000 };
            match apply(&p.limits, &p.health, &op, stored) {
                (Reply::Statuses(s), w) => (s.iter().map(|s| s.used).collect::<Vec<_>>(), w),
                other => panic!("{other:?}"),
            }
        };
        let (used, credited) = adjust(w.as_deref(), Adjustment::Credit { limit: "total_tokens/day".into(), amount: 50 });
        assert_eq!(used, [2, 30, 2], "80 - 50 tokens; requests and leases untouched");
        let (used, _) = adjust(credited.as_deref(), Adjustment::Credit { limit: "total_tokens/day".into(), amount: 500 });
        assert_eq!(used, [2, 0, 2], "never below zero");
        let (used, reset) = adjust(credited.as_deref(), Adjustment::Reset { limit: None });
        assert_eq!(used, [0, 0, 2], "in-flight leases are kept");
        let (r, _) = reserve(reset.as_deref(), 3);
        assert!(r_allowed(&r), "room again after the reset");
        let (_, none) = adjust(None, Adjustment::Reset { limit: None });
        assert!(none.is_none(), "nothing stored: nothing written");
        // A full reset named under another tier (the operator left `tier` out) still clears
        // what the member counts under this one.
        let other = Op::Adjust { key: "k".into(), part: Part { tier: "e".into(), tag: 7, scope: Scope::Identity, shard: None }, adjustment: Cow::Owned(Adjustment::Reset { limit: None }), now: 2_000 };
        let (_, cleared) = apply(&p.limits, &p.health, &other, w.as_deref());
        let (used, _) = adjust(cleared.as_deref(), Adjustment::Credit { limit: "total_tokens/day".into(), amount: 1 });
        assert_eq!(used, [0, 0, 2]);
    }

    fn r_allowed(reply: &Reply) -> bool {
        matches!(reply, Reply::Reserved(r) if r.verdict == ledger::Verdict::Allowed)
    }

    #[test]
    fn health_ops_read_and_write_the_deployments_record() {
        let p = policy();
        let failed = Op::HealthReport { deployment: "a".into(), outcome: Outcome::Failed { failure: Failure::Status(500), retry_after_ms: None }, now: 1_000 };
        let (Reply::Health(one), w) = apply(&p.limits, &p.health, &failed, None) else { panic!() };
        assert!(one.is_available(1_000) && w.is_some());
        let (Reply::Health(two), w) = apply(&p.limits, &p.health, &failed, w.as_deref()) else { panic!() };
        assert!(!two.is_available(1_000), "two failures: cooling down");
        let read = Op::HealthRead { deployment: "a".into() };
        assert_eq!(apply(&p.limits, &p.health, &read, w.as_deref()), (Reply::Health(two), None));
        let served = Op::HealthReport { deployment: "a".into(), outcome: Outcome::Served { quota: Quota::default() }, now: 2_000 };
        assert_eq!(apply(&p.limits, &p.health, &served, w.as_deref()).1, None, "a plain success writes nothing");
        assert_eq!(apply(&p.limits, &p.health, &read, Some(b"\xff")).0, Reply::Health(Health::default()), "garbled reads healthy");
    }
}
