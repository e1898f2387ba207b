//! The synchronous driver: runs a [`Machine`] against a [`CasStore`] (proxy-wasm shared data,
//! the in-memory store), each op inside `update`'s load → apply → compare-and-set loop.

use crate::fallback::HealthSettings;
use crate::limits::engine::LimitSet;
use crate::store::{update, CasStore, Step, StoreError};

use super::machine::{Machine, Next};
use super::{apply, Op, Reply};

/// What every op needs besides the store: the limits and the health settings of the policy,
/// and how many compare-and-set conflicts to retry per op.
#[derive(Clone, Copy)]
pub struct Rules<'a> {
    /// The policy's limits (and prices, zone, lease TTL).
    pub limits: &'a LimitSet,
    /// The policy's health settings.
    pub health: &'a HealthSettings,
    /// Retries after a compare-and-set conflict, per op.
    pub max_retries: u32,
}

impl<'a> From<&'a crate::config::Policy> for Rules<'a> {
    fn from(p: &'a crate::config::Policy) -> Self {
        Rules { limits: &p.limits, health: &p.health, max_retries: p.max_retries }
    }
}

/// Runs one op: reads go straight to the store, writes through compare-and-set.
pub fn run_op<S: CasStore + ?Sized>(store: &mut S, rules: Rules<'_>, op: &Op) -> Result<Reply, StoreError> {
    let key = op.key();
    if !op.writes() {
        let current = store.load(&key)?;
        return Ok(apply(rules.limits, rules.health, op, current.as_ref().map(|(b, _)| b.as_slice())).0);
    }
    update(store, &key, rules.max_retries, |bytes| {
        let (result, write) = apply(rules.limits, rules.health, op, bytes);
        Step { result, write }
    })
}

/// Runs `ops` — all on one key — one after the other in a single compare-and-set: each sees
/// the record as the ops before it left it, and the record is written once (or not at all). A
/// store service combines concurrent jobs' ops on a hot key this way; the replies are exactly
/// those the ops would get run one by one in this order.
pub fn run_batch<S: CasStore + ?Sized>(store: &mut S, rules: Rules<'_>, ops: &[Op<'_>]) -> Result<Vec<Reply>, StoreError> {
    let Some(first) = ops.first() else { return Ok(Vec::new()) };
    let key = first.key();
    debug_assert!(ops.iter().all(|op| op.key() == key), "a batch is one key's");
    if ops.len() == 1 {
        return run_op(store, rules, first).map(|r| vec![r]);
    }
    update(store, &key, rules.max_retries, |stored| {
        let mut current: Option<Vec<u8>> = None;
        let mut changed = false;
        let mut replies = Vec::with_capacity(ops.len());
        for op in ops {
            let bytes = if changed { current.as_deref() } else { stored };
            let (reply, write) = apply(rules.limits, rules.health, op, bytes);
            if let Some(w) = write {
                current = Some(w);
                changed = true;
            }
            replies.push(reply);
        }
        Step { result: replies, write: current }
    })
}

/// Runs `machine` to its end against `store`.
pub fn run<S: CasStore + ?Sized, M: Machine>(store: &mut S, rules: Rules<'_>, machine: M) -> M::Output {
    run_until(store, rules, machine, &|| false)
}

/// [`run`], but once `expired()` says the caller has stopped waiting, no further reservation
/// is made: the machine hears a failure instead, and releases what it reserved (releases and
/// settlements still run). A store service uses it so that a job its host gave up on does not
/// count a request the host refused.
pub fn run_until<S: CasStore + ?Sized, M: Machine>(store: &mut S, rules: Rules<'_>, machine: M, expired: &dyn Fn() -> bool) -> M::Output {
    drive(machine, expired, &mut |op| run_op(store, rules, op))
}

/// Runs `machine` to its end with `run` answering each op (a driver that does not run ops
/// itself: one that combines them with other jobs' ops); `expired` as in [`run_until`].
pub fn drive<M: Machine>(mut machine: M, expired: &dyn Fn() -> bool, run: &mut dyn FnMut(&Op<'_>) -> Result<Reply, StoreError>) -> M::Output {
    loop {
        match machine.next() {
            Next::Done(out) => return out,
            Next::Op(op) => {
                let reply = if matches!(op, Op::Reserve { .. }) && expired() {
                    Err(StoreError::Host("the host stopped waiting"))
                } else {
                    run(&op)
                };
                machine.reply(reply);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Policy;
    use crate::limits::engine::{Estimate, Who};
    use crate::limits::ledger::{Actual, Verdict};
    use crate::ops::machine::{Admitting, Peeking, Settling};
    use crate::ops::Reply;
    use crate::store::{MemoryStore, Version, Written};

    fn policy() -> Policy {
        Policy::from_json(
            br#"{"tier":{"default":"d"},"store":{"slots":0},
                 "tiers":{"d":{"limits":[{"window":"day","requests":5},{"per":"tier","window":"day","requests":9},{"concurrent":2}]}}}"#,
        )
        .unwrap()
    }

    fn who(id: &str) -> Who {
        Who { identity_key: id.to_owned(), ip_key: None, tier: "d".to_owned() }
    }

    const ZERO: Estimate = Estimate { model: None, input_tokens: 0, output_tokens: 0 };

    fn used(store: &mut MemoryStore, p: &Policy, id: &str) -> Vec<u64> {
        run(store, p.into(), Peeking::new(&p.limits, &who(id), 1_000)).unwrap().iter().map(|s| s.used).collect()
    }

    #[test]
    fn an_admission_reserves_every_key_and_settling_releases_the_lease() {
        let p = policy();
        let mut store = MemoryStore::new();
        let a = run(&mut store, (&p).into(), Admitting::new(&p.limits, &who("a"), &ZERO, 1, 1_000)).unwrap();
        assert!(a.is_allowed());
        assert_eq!(a.ticket.parts().count(), 2, "identity and tier keys");
        assert_eq!(used(&mut store, &p, "a"), [1, 1, 1]);
        let s = run(&mut store, (&p).into(), Settling::new(&a.ticket, Actual::used(None, None, None), 1_000));
        assert_eq!((s.failures, s.first_error), (0, None));
        assert_eq!(used(&mut store, &p, "a"), [1, 0, 1], "the request stays counted, its lease is back");
        let s = run(&mut store, (&p).into(), Settling::new(&a.ticket, Actual::nothing(), 1_000));
        assert_eq!(s.failures, 0);
        assert_eq!(used(&mut store, &p, "a"), [0, 0, 0], "released: nothing counts");
    }

    #[test]
    fn a_refusal_on_a_later_key_releases_the_earlier_ones() {
        let p = policy();
        let mut store = MemoryStore::new();
        for i in 0..9 {
            let a = run(&mut store, (&p).into(), Admitting::new(&p.limits, &who(&format!("u{i}")), &ZERO, i, 1_000)).unwrap();
            run(&mut store, (&p).into(), Settling::new(&a.ticket, Actual::used(None, None, None), 1_000));
        }
        let refused = run(&mut store, (&p).into(), Admitting::new(&p.limits, &who("late"), &ZERO, 99, 1_000)).unwrap();
        assert!(matches!(refused.verdict, Verdict::Denied { .. }), "{:?}", refused.verdict);
        assert!(refused.ticket.is_empty());
        assert_eq!(used(&mut store, &p, "late"), [0, 0, 9], "the identity reservation was released");
    }

    /// Fails every op on keys with a prefix.
    struct Failing(MemoryStore, &'static str);
    impl CasStore for Failing {
        fn load(&mut self, key: &str) -> Result<Option<(Vec<u8>, Version)>, StoreError> {
            if key.starts_with(self.1) {
                return Err(StoreError::Host("down"));
            }
            self.0.load(key)
        }
        fn store(&mut self, key: &str, value: &[u8], expected: Option<Version>) -> Result<Written, StoreError> {
            self.0.store(key, value, expected)
        }
    }

    #[test]
    fn a_failing_key_fails_the_admission_and_releases_what_was_reserved() {
        let p = policy();
        let mut store = Failing(MemoryStore::new(), "tg2:t:");
        let r = run(&mut store, (&p).into(), Admitting::new(&p.limits, &who("a"), &ZERO, 1, 1_000));
        assert_eq!(r.unwrap_err(), StoreError::Host("down"));
        assert_eq!(used(&mut store.0, &p, "a")[0], 0, "the identity's reservation was released");
        // Settling goes on past a failing key and reports it.
        let a = run(&mut store.0, (&p).into(), Admitting::new(&p.limits, &who("b"), &ZERO, 2, 1_000)).unwrap();
        let s = run(&mut store, (&p).into(), Settling::new(&a.ticket, Actual::nothing(), 1_000));
        assert_eq!((s.failures, s.first_error), (1, Some(StoreError::Host("down"))));
        assert_eq!(used(&mut store.0, &p, "b")[0], 0, "the identity key was still released");
    }

    #[test]
    fn a_machine_driven_step_by_step_elsewhere_matches_the_sync_driver() {
        // What the worker does: apply each op itself (a Durable Object) and hand the reply back.
        let p = policy();
        let (mut a, mut b) = (MemoryStore::new(), MemoryStore::new());
        for i in 0..7 {
            let expected = run(&mut a, (&p).into(), Admitting::new(&p.limits, &who("x"), &ZERO, i, 1_000));
            let mut m = Admitting::new(&p.limits, &who("x"), &ZERO, i, 1_000);
            let got = loop {
                match m.next() {
                    Next::Done(out) => break out,
                    Next::Op(op) => {
                        let json = serde_json::to_string(&op).unwrap();
                        let op: Op = serde_json::from_str(&json).unwrap();
                        let stored = b.get(&op.key()).map(<[u8]>::to_vec);
                        let (reply, write) = apply(&p.limits, &p.health, &op, stored.as_deref());
                        if let Some(w) = write {
                            let v = b.load(&op.key()).unwrap().map(|(_, v)| v);
                            assert_eq!(b.store(&op.key(), &w, v).unwrap(), Written::Stored);
                        }
                        let reply: Reply = serde_json::from_str(&serde_json::to_string(&reply).unwrap()).unwrap();
                        m.reply(Ok(reply));
                    }
                }
            };
            assert_eq!(got, expected, "admission {i}");
        }
    }
    #[test]
    fn a_batch_answers_as_its_ops_one_by_one_and_writes_once() {
        let p = policy();
        let first_op = |lease: u64| match Admitting::new(&p.limits, &who("x"), &ZERO, lease, 1_000).next() {
            Next::Op(op) => op.into_owned(),
            Next::Done(_) => panic!("an admission starts with a reservation"),
        };
        let ops: Vec<Op<'static>> = (0..7).map(first_op).collect();
        let mut one_by_one = MemoryStore::new();
        let expected: Vec<Reply> = ops.iter().map(|op| run_op(&mut one_by_one, (&p).into(), op).unwrap()).collect();
        let mut batched = Counting(MemoryStore::new(), 0);
        let got = run_batch(&mut batched, (&p).into(), &ops).unwrap();
        assert_eq!(got, expected);
        assert_eq!(batched.1, 1, "one write for the whole batch");
        let key = ops[0].key().into_owned();
        assert_eq!(batched.0.get(&key), one_by_one.get(&key));
        let granted = got.iter().filter(|r| matches!(r, Reply::Reserved(r) if r.verdict == Verdict::Allowed)).count();
        assert_eq!(granted, 2, "the concurrency limit (2) holds inside a batch");
        // a batch that changes nothing writes nothing
        let peek = Op::Peek { key: key.clone().into(), part: ops[0].clone().part_mut().unwrap().clone(), now: 1_000 };
        let peeks = [peek.clone(), peek];
        run_batch(&mut batched, (&p).into(), &peeks).unwrap();
        assert_eq!(batched.1, 1);
    }

    /// Counts writes.
    struct Counting(MemoryStore, u32);
    impl CasStore for Counting {
        fn load(&mut self, key: &str) -> Result<Option<(Vec<u8>, Version)>, StoreError> {
            self.0.load(key)
        }
        fn store(&mut self, key: &str, value: &[u8], expected: Option<Version>) -> Result<Written, StoreError> {
            self.1 += 1;
            self.0.store(key, value, expected)
        }
    }
}

