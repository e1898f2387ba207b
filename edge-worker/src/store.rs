//! The asynchronous driver of core's store machines ([`tollgate_core::ops::machine`]) over the
//! counter objects: each op goes to its key's object ([`object_name`]: the key's own object,
//! or the identity's shard of an aggregate), one object call per op, awaited in turn. Core's
//! machine decides everything else (the order of the keys, the releases after a refusal or a
//! failure, what a settlement reached).

use tollgate_core::gate::{self, Facts};
use tollgate_core::limits::engine::{Admission, Estimate, LimitSet, Ticket, Who};
use tollgate_core::limits::ledger::Actual;
use tollgate_core::ops::machine::{Admitting, Machine, Next, Peeking, Settled, Settling};
use tollgate_core::{LocalResponse, Policy, StoreError};

use crate::counter::{object_name, Counters};

/// Runs `machine` to its end over the objects.
pub async fn drive<C: Counters, M: Machine>(counters: &C, shards: u32, identity_key: &str, mut machine: M) -> M::Output {
    loop {
        match machine.next() {
            Next::Done(out) => return out,
            Next::Op(mut op) => {
                let key = op.key().into_owned();
                let name = match op.part_mut() {
                    Some(part) => {
                        let (name, shard) = object_name(&key, part.scope, identity_key, shards);
                        part.shard = shard;
                        name
                    }
                    None => key,
                };
                let reply = counters.call(&name, std::slice::from_ref(&op)).await.map_err(|e| e.store_error());
                drop(op); // it borrows the machine
                machine.reply(reply.and_then(|mut r| r.pop().ok_or(StoreError::Host("the counter object answered nothing"))));
            }
        }
    }
}

/// Admission over the objects.
pub async fn admit<C: Counters>(counters: &C, shards: u32, set: &LimitSet, who: &Who, estimate: &Estimate, lease_id: u64, now: u64) -> Result<Admission, StoreError> {
    drive(counters, shards, &who.identity_key, Admitting::new(set, who, estimate, lease_id, now)).await
}

/// Settles every part of `ticket` with `actual`.
pub async fn settle<C: Counters>(counters: &C, shards: u32, ticket: &Ticket, actual: Actual, now: u64) -> Settled {
    drive(counters, shards, &ticket.who.identity_key, Settling::new(ticket, actual, now)).await
}

/// `GET /v1/tollgate/usage`: core's body for the caller's own limits.
pub async fn usage_report<C: Counters>(counters: &C, shards: u32, policy: &Policy, facts: &Facts<'_>, path: Option<&str>) -> LocalResponse {
    match gate::usage_subject(policy, facts, path) {
        Ok(who) => identity_report(counters, shards, policy, &who, facts.now_ms).await,
        Err(r) => r,
    }
}

/// One identity's limits (the admin lookup names it by its identity key and tier).
pub async fn identity_report<C: Counters>(counters: &C, shards: u32, policy: &Policy, who: &Who, now: u64) -> LocalResponse {
    let statuses = drive(counters, shards, &who.identity_key, Peeking::new(&policy.limits, who, now)).await;
    gate::usage_body(who, statuses, now)
}

/// Drives a future that never waits on anything outside itself (the in-memory objects) to
/// completion.
#[cfg(test)]
pub(crate) fn block_on<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counter::tests::MemoryObjects;
    use serde_json::Value;
    use tollgate_core::gate::{Gate, Prepared, Refused};
    use tollgate_core::limits::ledger::{LimitStatus, Verdict};
    use tollgate_core::usage::Usage;

    const NOW: u64 = 1_764_000_000_000;
    const CHAT: &[u8] = br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;

    fn policy(json: &str) -> Policy {
        crate::config::for_worker(Policy::from_json(json.as_bytes()).unwrap())
    }

    fn who(id: &str, tier: &str) -> Who {
        Who { identity_key: id.to_owned(), ip_key: None, tier: tier.to_owned() }
    }

    fn zero() -> Estimate {
        Estimate { model: None, input_tokens: 0, output_tokens: 0 }
    }

    fn admit_now(o: &MemoryObjects, shards: u32, who: &Who, estimate: &Estimate) -> Result<Admission, StoreError> {
        block_on(admit(o, shards, &o.policy.limits, who, estimate, 1, NOW))
    }

    fn peek(o: &MemoryObjects, shards: u32, who: &Who) -> Vec<LimitStatus> {
        block_on(drive(o, shards, &who.identity_key, Peeking::new(&o.policy.limits, who, NOW))).unwrap()
    }

    #[test]
    fn identity_limits_count_in_the_identitys_own_object_and_denials_are_not_counted() {
        let o = MemoryObjects::new(policy(r#"{"tier":{"default":"d"},"tiers":{"d":{"limits":[{"window":"day","requests":2}]}}}"#));
        let verdicts: Vec<bool> = (0..3).map(|_| admit_now(&o, 4, &who("a", "d"), &zero()).unwrap().is_allowed()).collect();
        assert_eq!(verdicts, [true, true, false]);
        assert!(admit_now(&o, 4, &who("b", "d"), &zero()).unwrap().is_allowed(), "b has its own object");
        let names: Vec<String> = o.records.borrow().keys().cloned().collect();
        assert_eq!(names.len(), 2);
        assert!(names.iter().all(|n| n.starts_with("tg2:i:") && n.ends_with("/record") && n.len() == 6 + 32 + 7), "{names:?}");
        assert_eq!(peek(&o, 4, &who("a", "d"))[0].used, 2, "the denial was not counted");
    }

    #[test]
    fn a_sharded_tier_aggregate_never_lets_the_tier_exceed_its_limit() {
        let o = MemoryObjects::new(policy(r#"{"tier":{"default":"d"},"tiers":{"d":{"limits":[{"per":"tier","window":"day","requests":10}]}}}"#));
        let mut allowed = 0;
        for i in 0..64 {
            let id = format!("id-{i}");
            allowed += usize::from(admit_now(&o, 4, &who(&id, "d"), &zero()).unwrap().is_allowed());
            allowed += usize::from(admit_now(&o, 4, &who(&id, "d"), &zero()).unwrap().is_allowed());
        }
        assert_eq!(allowed, 10, "every shard filled exactly to its part (3 + 3 + 2 + 2)");
        let names: Vec<String> = o.records.borrow().keys().cloned().collect();
        assert_eq!(names, ["tg2:t:d#0/record", "tg2:t:d#1/record", "tg2:t:d#2/record", "tg2:t:d#3/record"]);
        // The usage report shows the caller's shard's part.
        let statuses = peek(&o, 4, &who("id-0", "d"));
        assert!(statuses[0].limit == 2 || statuses[0].limit == 3, "{statuses:?}");
        assert_eq!(statuses[0].used, statuses[0].limit);
        // With one shard the aggregate is exact and shared by everyone.
        let o = MemoryObjects::new(o.policy.clone());
        let allowed = (0..20).filter(|i| admit_now(&o, 1, &who(&format!("x{i}"), "d"), &zero()).unwrap().is_allowed()).count();
        assert_eq!(allowed, 10);
    }

    #[test]
    fn a_later_refusal_releases_the_earlier_keys() {
        let o = MemoryObjects::new(policy(
            r#"{"tier":{"default":"d"},"tiers":{"d":{"limits":[{"window":"day","requests":5},{"per":"tier","window":"day","requests":1}]}}}"#,
        ));
        assert!(admit_now(&o, 1, &who("a", "d"), &zero()).unwrap().is_allowed());
        let refused = admit_now(&o, 1, &who("b", "d"), &zero()).unwrap();
        assert!(matches!(refused.verdict, Verdict::Denied { .. }), "{refused:?}");
        assert!(refused.ticket.is_empty());
        assert_eq!(peek(&o, 1, &who("b", "d"))[0].used, 0, "b's identity reservation was released");
    }

    #[test]
    fn settled_usage_replaces_the_token_reservation_and_releases_the_lease() {
        let o = MemoryObjects::new(policy(r#"{"tier":{"default":"d"},"tiers":{"d":{"limits":[{"window":"day","total_tokens":70},{"concurrent":1}]}}}"#));
        let estimate = Estimate { model: None, input_tokens: 16, output_tokens: 30 };
        let w = who("a", "d");
        let first = admit_now(&o, 4, &w, &estimate).unwrap();
        assert!(first.is_allowed());
        assert!(!admit_now(&o, 4, &w, &zero()).unwrap().is_allowed(), "one in flight");
        let usage = Usage { input: Some(9), output: Some(8), ..Usage::default() };
        let actual = o.policy.limits.actual(None, &usage);
        assert_eq!(block_on(settle(&o, 4, &first.ticket, actual, NOW)).failures, 0);
        assert_eq!(peek(&o, 4, &w)[0].used, 17);
        assert!(admit_now(&o, 4, &w, &estimate).unwrap().is_allowed(), "17 + 46 fits 70, the lease is back");
    }

    #[test]
    fn a_failing_object_is_a_store_error_and_releases_what_was_reserved() {
        let o = MemoryObjects::new(policy(
            r#"{"tier":{"default":"d"},"tiers":{"d":{"limits":[{"window":"day","requests":5},{"per":"tier","window":"day","requests":9}]}}}"#,
        ));
        *o.fail.borrow_mut() = Some("tg2:t:".to_owned());
        let w = who("a", "d");
        assert_eq!(admit_now(&o, 4, &w, &zero()), Err(StoreError::Host("counter object failed")));
        *o.fail.borrow_mut() = None;
        assert_eq!(peek(&o, 4, &w)[0].used, 0);

        // conclude applies store.on_failure: deny → 503, allow → forwarded uncounted.
        for (mode, forwarded) in [("deny", false), ("allow", true)] {
            let p = policy(&format!(
                r#"{{"tier":{{"default":"d"}},"store":{{"on_failure":"{mode}"}},"tiers":{{"d":{{"limits":[{{"window":"day","requests":5}}]}}}}}}"#
            ));
            let o = MemoryObjects::new(p.clone());
            *o.fail.borrow_mut() = Some(String::new());
            let header = |_: &str| None;
            let secrets = |_: &str| None;
            let facts = Facts { header: &header, peer_address: Some("192.0.2.1"), now_ms: NOW, secrets: &secrets, claim: &tollgate_core::identity::no_claims };
            let Prepared::Admit(pending) = gate::prepare_chat(&p, &facts, CHAT) else { panic!() };
            let result = block_on(admit(&o, 4, &p.limits, &pending.who, &pending.estimate, 1, NOW));
            match (*pending).conclude(&p, &facts, result) {
                Gate::Forward(a) => assert!(forwarded && a.ticket.is_none()),
                Gate::Reply { response, why, .. } => assert!(!forwarded && response.status == 503 && why == Refused::StoreFailed),
            }
        }
    }

    #[test]
    fn the_usage_report_is_cores_body_with_the_callers_identity() {
        let o = MemoryObjects::new(policy(
            r#"{"identity":{"header":"x-user"},"tier":{"default":"d"},"tiers":{"d":{"limits":[{"window":"day","requests":5},{"per":"tier","window":"day","requests":8}]}}}"#,
        ));
        let header = |n: &str| (n == "x-user").then(|| "alice".to_owned());
        let secrets = |_: &str| None;
        let facts = Facts { header: &header, peer_address: None, now_ms: NOW, secrets: &secrets, claim: &tollgate_core::identity::no_claims };
        let Prepared::Admit(pending) = gate::prepare_chat(&o.policy, &facts, CHAT) else { panic!() };
        admit_now(&o, 4, &pending.who, &zero()).unwrap();
        let r = block_on(usage_report(&o, 4, &o.policy, &facts, None));
        assert_eq!(r.status, 200);
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["tier"], "d");
        assert_eq!(body["identity"], pending.who.identity_key.as_str());
        assert_eq!(body["limits"][0]["name"], "requests/day");
        assert_eq!(body["limits"][0]["used"], 1);
        assert_eq!(body["limits"][1]["name"], "tier:requests/day");
        assert_eq!(body["limits"][1]["used"], 1);
    }
}
