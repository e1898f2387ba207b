//! The store service's protocol (`store.redis`): a host without sockets (a proxy-wasm filter)
//! sends each of a request's store work as one [`Job`] — a whole machine, not an op — to a
//! `tollgate store` service, which runs it against the shared store (Redis) with the same
//! machines and the same [`super::apply`] every other host runs ([`run`]), and answers one
//! [`Done`]. One round trip per admission (the alias's health records ride along), one per
//! settlement.
//!
//! Every job travels in an [`Envelope`] naming the policy's digest: a service loaded with
//! another policy refuses it ([`Done::Failed`]) rather than count with other limits.

use serde::{Deserialize, Serialize};

use crate::fallback::{Health, Outcome};
use crate::limits::engine::{Admission, Estimate, Ticket, Who};
use crate::limits::ledger::{Actual, Adjustment, LimitStatus, Reached};
use crate::store::{CasStore, StoreError};
use crate::window::Timestamp;

use super::machine::{Admitting, Peeking, ReadingHealth, Settling};
use super::sync::{drive, run_op, Rules};
use super::{Op, Reply};

/// One job for the store service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "job", rename_all = "snake_case", deny_unknown_fields)]
pub enum Job {
    /// Admission ([`Admitting`]), and the health of an alias's deployments (same order).
    Admit {
        /// Who is counted.
        who: Who,
        /// What is reserved.
        estimate: Estimate,
        /// The concurrency lease's id.
        lease_id: u64,
        /// Epoch milliseconds.
        now: Timestamp,
        /// Deployments whose health records to read too (an alias's).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        health: Vec<String>,
    },
    /// Settlement ([`Settling`]).
    Settle {
        /// What the admission charged.
        ticket: Ticket,
        /// What to charge instead.
        actual: Actual,
        /// Epoch milliseconds.
        now: Timestamp,
    },
    /// Where `who`'s limits stand ([`Peeking`]).
    Peek {
        /// Whose limits.
        who: Who,
        /// Epoch milliseconds.
        now: Timestamp,
    },
    /// An operator's change to `who`'s own counts ([`Peeking::adjusting`]); answered with
    /// [`Done::Statuses`].
    Adjust {
        /// Whose counts.
        who: Who,
        /// The change.
        adjustment: Adjustment,
        /// Epoch milliseconds.
        now: Timestamp,
    },
    /// A page of the activity index ([`crate::admin`]): the members of `key` after `after`, at
    /// most `limit` + 1 (one more says another page follows). Answered with
    /// [`Done::Members`]; a service without an index answers [`Done::Failed`].
    List {
        /// The period's index key.
        key: String,
        /// The last member of the previous page.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<String>,
        /// Page size.
        limit: u32,
    },
    /// One attempt's outcome on a deployment.
    ReportHealth {
        /// The deployment.
        deployment: String,
        /// What happened.
        outcome: Outcome,
        /// Epoch milliseconds.
        now: Timestamp,
    },
}

/// A job and the policy it was made under.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// [`crate::Policy::digest`] of the sender's policy.
    pub policy: String,
    /// How long the sender waits for the answer, in milliseconds (an admission's
    /// `store.redis.timeout_ms`): the service makes no reservation after half of it, so that
    /// a request its host has already answered is never counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_ms: Option<u32>,
    /// The work.
    pub job: Job,
}

/// What a job came to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
#[allow(clippy::large_enum_variant)]
pub enum Done {
    /// To [`Job::Admit`].
    Admitted {
        /// The admission.
        admission: Admission,
        /// The health records asked for (healthy when unreadable).
        health: Vec<Health>,
        /// How many could not be read.
        unread: u32,
    },
    /// To [`Job::Settle`].
    Settled {
        /// Notify thresholds the settlement reached.
        reached: Vec<Reached>,
        /// Keys that could not be settled.
        failures: u32,
    },
    /// To [`Job::Peek`].
    Statuses {
        /// Every limit of the caller.
        statuses: Vec<LimitStatus>,
    },
    /// To [`Job::List`]: the members, in order.
    Members {
        /// `"<identity key> <tier>"` each.
        members: Vec<String>,
    },
    /// To [`Job::ReportHealth`]: the record after the report.
    Health {
        /// The record.
        health: Health,
    },
    /// The job could not be done (the store failed, or the policy differs); the host applies
    /// `store.on_failure`.
    Failed {
        /// A short reason (logged, never shown to clients).
        error: String,
    },
}

impl Done {
    /// A failure, from a store error.
    pub fn failed(e: &StoreError) -> Done {
        Done::Failed { error: e.to_string() }
    }
}

/// Runs `envelope` against `store` (the service's side): the same machines and ops every host
/// runs. A policy digest other than `digest` (the service's) is refused.
pub fn run<S: CasStore + ?Sized>(store: &mut S, rules: Rules<'_>, digest: &str, envelope: &Envelope, expired: &dyn Fn() -> bool) -> Done {
    run_with(rules, digest, envelope, expired, &mut |op| run_op(store, rules, op))
}

/// [`run`] with `run_op` answering each op: a service that combines concurrent jobs' ops on
/// one key ([`super::sync::run_batch`]) drives the jobs through it.
pub fn run_with(
    rules: Rules<'_>,
    digest: &str,
    envelope: &Envelope,
    expired: &dyn Fn() -> bool,
    run_op: &mut dyn FnMut(&Op<'_>) -> Result<Reply, StoreError>,
) -> Done {
    let never = || false;
    if envelope.policy != digest {
        return Done::Failed { error: format!("the store service runs policy {digest}, this host {}: deploy the same policy to both", envelope.policy) };
    }
    match &envelope.job {
        Job::Admit { who, estimate, lease_id, now, health } => {
            let admitted = drive(Admitting::new(rules.limits, who, estimate, *lease_id, *now), expired, run_op);
            match admitted {
                Ok(admission) => {
                    let (health, unread) = if health.is_empty() {
                        (Vec::new(), 0)
                    } else {
                        drive(ReadingHealth::new(health.iter().map(String::as_str)), &never, run_op)
                    };
                    Done::Admitted { admission, health, unread }
                }
                Err(e) => Done::failed(&e),
            }
        }
        Job::Settle { ticket, actual, now } => {
            let settled = drive(Settling::new(ticket, *actual, *now), &never, run_op);
            // Every key failed: the store is down (some failed: those wait for their windows).
            if let Some(e) = settled.first_error.as_ref().filter(|_| settled.failures as usize == ticket.parts().count()) {
                return Done::failed(e);
            }
            Done::Settled { reached: settled.reached, failures: settled.failures }
        }
        Job::Peek { who, now } => match drive(Peeking::new(rules.limits, who, *now), &never, run_op) {
            Ok(statuses) => Done::Statuses { statuses },
            Err(e) => Done::failed(&e),
        },
        Job::Adjust { who, adjustment, now } => match drive(Peeking::adjusting(rules.limits, who, adjustment.clone(), *now), &never, run_op) {
            Ok(statuses) => Done::Statuses { statuses },
            Err(e) => Done::failed(&e),
        },
        Job::List { .. } => Done::Failed { error: "this store keeps no activity index".to_owned() },
        Job::ReportHealth { deployment, outcome, now } => {
            let op = Op::HealthReport { deployment: deployment.as_str().into(), outcome: *outcome, now: *now };
            match run_op(&op) {
                Ok(Reply::Health(health)) => Done::Health { health },
                Ok(_) => Done::Failed { error: "the store answered another op".to_owned() },
                Err(e) => Done::failed(&e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Policy;
    use crate::fallback::Failure;
    use crate::limits::ledger::Verdict;
    use crate::store::MemoryStore;

    fn policy() -> Policy {
        Policy::from_json(
            br#"{"tier":{"default":"d"},"store":{"slots":0},
                 "tiers":{"d":{"limits":[{"window":"day","requests":2},{"window":"day","total_tokens":1000},{"concurrent":1}]}}}"#,
        )
        .unwrap()
    }

    fn who() -> Who {
        Who { identity_key: "tg1:q:00".into(), ip_key: None, tier: "d".into() }
    }

    fn go(store: &mut MemoryStore, p: &Policy, envelope: &Envelope) -> Done {
        run(store, p.into(), &p.digest, envelope, &|| false)
    }

    fn job(p: &Policy, job: Job) -> Envelope {
        // Over the wire and back, as the service receives it.
        let e = Envelope { policy: p.digest.clone(), wait_ms: Some(50), job };
        serde_json::from_slice(&serde_json::to_vec(&e).unwrap()).unwrap()
    }

    #[test]
    fn a_job_runs_the_same_machines_as_every_host() {
        let p = policy();
        let mut store = MemoryStore::new();
        let estimate = Estimate { model: None, input_tokens: 10, output_tokens: 20 };
        let admit = |store: &mut MemoryStore, lease: u64| {
            let answer = go(store, &p, &job(&p, Job::Admit { who: who(), estimate: estimate.clone(), lease_id: lease, now: 1_000, health: vec!["m".into()] }));
            let wire: Done = serde_json::from_slice(&serde_json::to_vec(&answer).unwrap()).unwrap();
            assert_eq!(wire, answer, "answers survive the wire");
            answer
        };
        let Done::Admitted { admission, health, unread } = admit(&mut store, 1) else { panic!() };
        assert_eq!((admission.verdict.clone(), health.len(), unread), (Verdict::Allowed, 1, 0));
        // The lease is held: a second request is refused (concurrency 1), and nothing of it stays.
        let Done::Admitted { admission: refused, .. } = admit(&mut store, 2) else { panic!() };
        assert!(matches!(refused.verdict, Verdict::Denied { .. }));
        let settled = go(&mut store, &p, &job(&p, Job::Settle { ticket: admission.ticket.clone(), actual: Actual::used(Some(3), Some(4), None), now: 1_001 }));
        assert_eq!(settled, Done::Settled { reached: vec![], failures: 0 });
        let Done::Statuses { statuses } = go(&mut store, &p, &job(&p, Job::Peek { who: who(), now: 1_002 })) else { panic!() };
        assert_eq!(statuses.iter().map(|s| s.used).collect::<Vec<_>>(), [1, 7, 0]);
        let report = Job::ReportHealth { deployment: "m".into(), outcome: Outcome::Failed { failure: Failure::Status(503), retry_after_ms: None }, now: 1_003 };
        assert!(matches!(go(&mut store, &p, &job(&p, report)), Done::Health { .. }));
    }

    #[test]
    fn a_job_its_host_stopped_waiting_for_reserves_nothing() {
        let p = policy();
        let mut store = MemoryStore::new();
        let estimate = Estimate { model: None, input_tokens: 10, output_tokens: 20 };
        let admit = job(&p, Job::Admit { who: who(), estimate, lease_id: 1, now: 1_000, health: vec![] });
        let a = run(&mut store, (&p).into(), &p.digest, &admit, &|| true);
        assert!(matches!(a, Done::Failed { .. }), "{a:?}");
        let Done::Statuses { statuses } = go(&mut store, &p, &job(&p, Job::Peek { who: who(), now: 1_002 })) else { panic!() };
        assert!(statuses.iter().all(|s| s.used == 0), "{statuses:?}");
    }

    #[test]
    fn a_job_made_under_another_policy_is_refused() {
        let p = policy();
        let other = Policy::from_json(br#"{"tier":{"default":"d"},"tiers":{"d":{"limits":[]}}}"#).unwrap();
        assert_ne!(p.digest, other.digest);
        let reformatted = Policy::from_json(
            br#"{ "store" : {"slots":0}, "tier":{"default":"d"},
                 "tiers":{"d":{"limits":[{"window":"day","requests":2},{"window":"day","total_tokens":1000},{"concurrent":1}]}} }"#,
        )
        .unwrap();
        assert_eq!(p.digest, reformatted.digest, "formatting and key order do not matter");
        let mut store = MemoryStore::new();
        let a = go(&mut store, &p, &job(&other, Job::Peek { who: who(), now: 1 }));
        assert!(matches!(a, Done::Failed { ref error } if error.contains("deploy the same policy")), "{a:?}");
        assert!(store.is_empty());
    }
}
