//! Core's admission, settlement and usage report, driven over the counter objects.
//!
//! Core's synchronous versions ([`tollgate_core::gate::admit_chat`], `gate::finish`,
//! `gate::usage_report`) run against a `CasStore`; the worker's store is a set of Durable
//! Objects answering asynchronously, so these drive core's step-by-step [`AdmitRun`] instead:
//! for each key, in core's order, one `reserve` call to the key's object ([`object_name`]);
//! when a key refuses, `release` calls undo the earlier keys; a failed call releases what was
//! reserved and becomes `Err(StoreError::Host(..))`, which `Pending::conclude` turns into
//! `store.on_failure`'s answer.

use serde_json::{json, Value};
use tollgate_core::gate::{self, Facts, Prepared};
use tollgate_core::limits::engine::{Admission, AdmitRun, Estimate, Flow, LimitSet, Ticket, Who};
use tollgate_core::limits::ledger::{LimitStatus, Reached, Reserved};
use tollgate_core::render;
use tollgate_core::usage::Usage;
use tollgate_core::{LocalResponse, Policy, StoreError};

use crate::counter::{object_name, Answer, CounterError, Counters, Op};

fn unexpected() -> CounterError {
    CounterError::Decode("an answer for another op".to_owned())
}

/// Reserves `estimate` for `who` on every key core plans, in order.
pub async fn admit<C: Counters>(
    counters: &C,
    shards: u32,
    set: &LimitSet,
    who: &Who,
    estimate: &Estimate,
    lease_id: u64,
    now: u64,
) -> Result<Admission, StoreError> {
    let mut run = AdmitRun::new(set, who, estimate, lease_id, now);
    while let Some(plan) = run.next_key() {
        let (name, shard) = object_name(&plan.key, plan.scope, &who.identity_key, shards);
        let op = Op::Reserve {
            key: plan.key.clone(),
            shard,
            who: who.clone(),
            estimate: estimate.clone(),
            downgraded: run.downgraded().map(str::to_owned),
            lease_id,
            now,
        };
        let reserved: Result<Reserved, CounterError> = match counters.call(&name, &op).await {
            Ok(Answer::Reserved(r)) => Ok(r),
            Ok(_) => Err(unexpected()),
            Err(e) => Err(e),
        };
        match reserved {
            Ok(r) => {
                if run.record(r) == Flow::Release {
                    let failures = release(counters, shards, run.ticket(), now).await;
                    return Ok(run.finish(failures));
                }
            }
            Err(e) => {
                release(counters, shards, run.ticket(), now).await;
                return Err(e.store_error());
            }
        }
    }
    Ok(run.finish(0))
}

/// Undoes a ticket's reservations (a refused admission's earlier keys, or a request nothing
/// served); returns how many failed.
pub async fn release<C: Counters>(counters: &C, shards: u32, ticket: &Ticket, now: u64) -> u32 {
    let mut failures = 0;
    for (key, scope, _) in ticket.parts() {
        let (name, shard) = object_name(key, scope, &ticket.who.identity_key, shards);
        let op = Op::Release { key: key.to_owned(), shard, ticket: ticket.clone(), now };
        failures += u32::from(!matches!(counters.call(&name, &op).await, Ok(Answer::Released)));
    }
    failures
}

/// `gate::finish` over the objects: settles every part of `ticket` with `usage` (`None`:
/// nothing was reported, the reservations stay the charge) and releases the concurrency
/// lease. Returns the webhook event bodies for thresholds reached; a part that fails is
/// skipped (its lease expires by TTL) and reported as the error after the others settled.
pub async fn settle<C: Counters>(
    counters: &C,
    shards: u32,
    policy: &Policy,
    ticket: &Ticket,
    usage: Option<&Usage>,
    now: u64,
) -> Result<Vec<Vec<u8>>, (StoreError, Vec<Vec<u8>>)> {
    let usage = usage.filter(|u| !u.is_empty()).copied();
    let mut reached: Vec<Reached> = Vec::new();
    let mut first_error = None;
    for (key, scope, _) in ticket.parts() {
        let (name, shard) = object_name(key, scope, &ticket.who.identity_key, shards);
        let op = Op::Settle { key: key.to_owned(), shard, ticket: ticket.clone(), usage, now };
        match counters.call(&name, &op).await {
            Ok(Answer::Settled(r)) => reached.extend(r),
            Ok(_) => first_error = first_error.or(Some(unexpected().store_error())),
            Err(e) => first_error = first_error.or(Some(e.store_error())),
        }
    }
    let events = gate::events(policy, ticket, &reached, now);
    match first_error {
        None => Ok(events),
        Some(e) => Err((e, events)),
    }
}

/// Where every limit of `who` stands (each aggregate: the shard `who` is counted in).
pub async fn peek<C: Counters>(counters: &C, shards: u32, set: &LimitSet, who: &Who, now: u64) -> Result<Vec<LimitStatus>, StoreError> {
    let mut out = Vec::new();
    for plan in set.plans(who) {
        let (name, shard) = object_name(&plan.key, plan.scope, &who.identity_key, shards);
        let op = Op::Peek { key: plan.key.clone(), shard, who: who.clone(), now };
        match counters.call(&name, &op).await {
            Ok(Answer::Statuses(s)) => out.extend(s),
            Ok(_) => return Err(unexpected().store_error()),
            Err(e) => return Err(e.store_error()),
        }
    }
    Ok(out)
}

fn report(tier: &str, identity: Option<&str>, statuses: &[LimitStatus], now: u64) -> LocalResponse {
    let limits: Vec<Value> = statuses.iter().map(|s| gate::status_json(s, now)).collect();
    let mut body = json!({ "object": "tollgate.usage", "tier": tier, "limits": limits });
    if let Some(id) = identity {
        body["identity"] = json!(id);
    }
    LocalResponse {
        status: 200,
        headers: vec![("content-type", "application/json".to_owned()), ("cache-control", "no-store".to_owned())],
        body: serde_json::to_vec(&body).unwrap_or_default(),
    }
}

/// `GET /v1/tollgate/usage`: `gate::usage_report` over the objects — the caller's own limits,
/// plus the caller's identity key (a digest: what webhook events and the admin lookup name).
pub async fn usage_report<C: Counters>(counters: &C, shards: u32, policy: &Policy, facts: &Facts<'_>) -> LocalResponse {
    let who = match gate::prepare_other(policy, facts) {
        Prepared::Admit(p) => p.who.clone(),
        Prepared::Reply(r) => return r,
    };
    match peek(counters, shards, &policy.limits, &who, facts.now_ms).await {
        Ok(statuses) => report(&who.tier, Some(&who.identity_key), &statuses, facts.now_ms),
        Err(_) => render::store_unavailable(),
    }
}

/// The admin lookup: one identity's limits (by its identity key, as webhook events name it)
/// in `tier`.
pub async fn identity_report<C: Counters>(counters: &C, shards: u32, policy: &Policy, identity_key: &str, tier: &str, now: u64) -> LocalResponse {
    let who = Who { identity_key: identity_key.to_owned(), ip_key: None, tier: tier.to_owned() };
    match peek(counters, shards, &policy.limits, &who, now).await {
        Ok(statuses) => report(tier, Some(identity_key), &statuses, now),
        Err(_) => render::store_unavailable(),
    }
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
    use tollgate_core::gate::{Gate, Refused};
    use tollgate_core::limits::ledger::Verdict;

    const NOW: u64 = 1_764_000_000_000;

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

    #[test]
    fn identity_limits_count_in_the_identitys_own_object_and_denials_are_not_counted() {
        let o = MemoryObjects::new(policy(r#"{"tier":{"default":"d"},"tiers":{"d":{"limits":[{"window":"day","requests":2}]}}}"#));
        let verdicts: Vec<bool> = (0..3).map(|_| admit_now(&o, 4, &who("a", "d"), &zero()).unwrap().is_allowed()).collect();
        assert_eq!(verdicts, [true, true, false]);
        assert!(admit_now(&o, 4, &who("b", "d"), &zero()).unwrap().is_allowed(), "b has its own object");
        let names: Vec<String> = o.records.borrow().keys().cloned().collect();
        assert_eq!(names.len(), 2);
        assert!(names.iter().all(|n| n.starts_with("tg2:i:") && n.len() == 6 + 32), "{names:?}");
        let used = block_on(peek(&o, 4, &o.policy.limits, &who("a", "d"), NOW)).unwrap();
        assert_eq!(used[0].used, 2, "the denial was not counted");
    }

    #[test]
    fn a_sharded_tier_aggregate_never_lets_the_tier_exceed_its_limit() {
        let o = MemoryObjects::new(policy(
            r#"{"tier":{"default":"d"},"tiers":{"d":{"limits":[{"per":"tier","window":"day","requests":10}]}}}"#,
        ));
        let mut allowed = 0;
        for i in 0..64 {
            let id = format!("id-{i}");
            allowed += usize::from(admit_now(&o, 4, &who(&id, "d"), &zero()).unwrap().is_allowed());
            allowed += usize::from(admit_now(&o, 4, &who(&id, "d"), &zero()).unwrap().is_allowed());
        }
        assert_eq!(allowed, 10, "every shard filled exactly to its part (3 + 3 + 2 + 2)");
        let names: Vec<String> = o.records.borrow().keys().cloned().collect();
        assert_eq!(names, ["tg2:t:d#0", "tg2:t:d#1", "tg2:t:d#2", "tg2:t:d#3"]);
        // The usage report shows the caller's shard's part.
        let statuses = block_on(peek(&o, 4, &o.policy.limits, &who("id-0", "d"), NOW)).unwrap();
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
        // Shards 1: the tier allows one request in total.
        assert!(admit_now(&o, 1, &who("a", "d"), &zero()).unwrap().is_allowed());
        let refused = admit_now(&o, 1, &who("b", "d"), &zero()).unwrap();
        assert!(matches!(refused.verdict, Verdict::Denied { .. }), "{refused:?}");
        assert!(refused.ticket.is_empty());
        let b = block_on(peek(&o, 1, &o.policy.limits, &who("b", "d"), NOW)).unwrap();
        assert_eq!(b[0].used, 0, "b's identity reservation was released: {b:?}");
    }

    #[test]
    fn settled_usage_replaces_the_token_reservation() {
        let o = MemoryObjects::new(policy(
            r#"{"tier":{"default":"d"},"tiers":{"d":{"limits":[{"window":"day","total_tokens":70}]}}}"#,
        ));
        let estimate = Estimate { model: None, input_tokens: 16, output_tokens: 30 };
        let w = who("a", "d");
        let first = admit_now(&o, 4, &w, &estimate).unwrap();
        assert!(first.is_allowed());
        // Unsettled, a second request (46 + 46 > 70) would be refused.
        let usage = Usage { input: Some(9), output: Some(8), ..Usage::default() };
        block_on(settle(&o, 4, &o.policy, &first.ticket, Some(&usage), NOW)).unwrap();
        assert_eq!(block_on(peek(&o, 4, &o.policy.limits, &w, NOW)).unwrap()[0].used, 17);
        let second = admit_now(&o, 4, &w, &estimate).unwrap();
        assert!(second.is_allowed(), "17 + 46 fits 70");
        block_on(settle(&o, 4, &o.policy, &second.ticket, Some(&usage), NOW)).unwrap();
        assert!(!admit_now(&o, 4, &w, &estimate).unwrap().is_allowed(), "34 + 46 does not");
        // Unknown usage keeps the reservation as the charge.
        let o = MemoryObjects::new(o.policy.clone());
        let first = admit_now(&o, 4, &w, &estimate).unwrap();
        block_on(settle(&o, 4, &o.policy, &first.ticket, None, NOW)).unwrap();
        assert_eq!(block_on(peek(&o, 4, &o.policy.limits, &w, NOW)).unwrap()[0].used, 46);
    }

    #[test]
    fn settling_releases_the_concurrency_lease() {
        let o = MemoryObjects::new(policy(r#"{"tier":{"default":"d"},"tiers":{"d":{"limits":[{"concurrent":1}]}}}"#));
        let w = who("a", "d");
        let first = admit_now(&o, 4, &w, &zero()).unwrap();
        assert!(first.is_allowed());
        assert!(!admit_now(&o, 4, &w, &zero()).unwrap().is_allowed(), "one in flight");
        block_on(settle(&o, 4, &o.policy, &first.ticket, None, NOW)).unwrap();
        assert!(admit_now(&o, 4, &w, &zero()).unwrap().is_allowed(), "released by the settle");
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
        assert_eq!(block_on(peek(&o, 4, &o.policy.limits, &w, NOW)).unwrap()[0].used, 0);

        // conclude applies store.on_failure: deny → 503, allow → forwarded uncounted.
        for (mode, forwarded) in [("deny", false), ("allow", true)] {
            let p = policy(&format!(
                r#"{{"tier":{{"default":"d"}},"store":{{"on_failure":"{mode}"}},"tiers":{{"d":{{"limits":[{{"window":"day","requests":5}}]}}}}}}"#
            ));
            let o = MemoryObjects::new(p.clone());
            *o.fail.borrow_mut() = Some(String::new());
            let header = |_: &str| None;
            let secrets = |_: &str| None;
            let facts = Facts { header: &header, peer_address: Some("192.0.2.1"), now_ms: NOW, secrets: &secrets };
            let Prepared::Admit(pending) = gate::prepare_other(&p, &facts) else { panic!() };
            let result = block_on(admit(&o, 4, &p.limits, &pending.who, &pending.estimate, 1, NOW));
            match (*pending).conclude(&p, &facts, result) {
                Gate::Forward(a) => assert!(forwarded && a.ticket.is_none()),
                Gate::Reply { response, why, .. } => assert!(!forwarded && response.status == 503 && why == Refused::StoreFailed),
            }
        }
    }

    #[test]
    fn the_usage_report_lists_the_callers_limits() {
        let o = MemoryObjects::new(policy(
            r#"{"identity":{"header":"x-user"},"tier":{"default":"d"},"tiers":{"d":{"limits":[{"window":"day","requests":5},{"per":"tier","window":"day","requests":8}]}}}"#,
        ));
        let header = |n: &str| (n == "x-user").then(|| "alice".to_owned());
        let secrets = |_: &str| None;
        let facts = Facts { header: &header, peer_address: None, now_ms: NOW, secrets: &secrets };
        let Prepared::Admit(pending) = gate::prepare_other(&o.policy, &facts) else { panic!() };
        admit_now(&o, 4, &pending.who, &zero()).unwrap();
        let r = block_on(usage_report(&o, 4, &o.policy, &facts));
        assert_eq!(r.status, 200);
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["tier"], "d");
        assert_eq!(body["limits"][0]["name"], "requests/day");
        assert_eq!(body["limits"][0]["used"], 1);
        assert_eq!(body["limits"][1]["name"], "tier:requests/day");
        assert_eq!(body["limits"][1]["used"], 1);
        let admin = block_on(identity_report(&o, 4, &o.policy, &pending.who.identity_key, "d", NOW));
        let body: Value = serde_json::from_slice(&admin.body).unwrap();
        assert_eq!(body["identity"], pending.who.identity_key.as_str());
        assert_eq!(body["limits"][0]["used"], 1);
    }
}
