//! Provider health for model aliases: every deployment's [`Health`] record, shared by every
//! isolate through one Durable Object, with a short per-isolate cache in front.
//!
//! ## Where the records live
//! In the `QUOTA_COUNTER` namespace, in the object named [`HEALTH_OBJECT`] (`tg2:h`), which
//! is not a counter: it stores each deployment's record (core's compact binary encoding,
//! [`Health::encode`]) under the storage key `tg2:h:<deployment>` ([`health_key`]). Using the
//! existing namespace keeps the deployment's wrangler configuration (bindings, migrations)
//! unchanged. One object for every deployment means one round trip reads a whole alias.
//!
//! ## Cost per request
//! - Reading: at most one object call per alias request ([`Health::decode`] of each of the
//!   alias's deployments), none while this isolate's cache holds every deployment the alias
//!   names and is younger than [`CACHE_MS`]. So one isolate asks at most about once a second
//!   per alias, and a cooldown another isolate started is seen within [`CACHE_MS`].
//! - Writing: only when core's [`next_health`] says the record changes (every failure; a
//!   success only when the provider's remaining quota starts or stops steering traffic away).
//!   The isolate applies the same step to its cached copy at once (so its very next request
//!   already skips a deployment it just saw fail), and sends the outcome to the object, which
//!   applies [`next_health`] to the stored record — the authority — and answers the result,
//!   which replaces the cached copy. Sent in `ctx.wait_until`: the client never waits for it.
//!
//! ## Why the object's read → step → put is atomic
//! As for the counters ([`crate::counter`]): the object is single-threaded, input gates hold
//! other events while its `get` is in flight, and there is no `await` between the `get`
//! resolving and the `put`.
//!
//! A failing object never fails a request: reads then use the cached records, or treat every
//! deployment as healthy; failed reports are logged.

use std::cell::RefCell;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tollgate_core::fallback::{health_key, next_health, Failure, Health, HealthSettings, Outcome, Quota};

use crate::counter::{Answer, CounterError, Counters, Op};

/// The object holding every deployment's health record.
pub const HEALTH_OBJECT: &str = "tg2:h";
/// How long this isolate trusts its copy of a record before asking the object again.
pub const CACHE_MS: u64 = 1000;
/// Most deployments one read may name (aliases have at most 10).
pub const MAX_READ: usize = 32;

/// [`Failure`] on the wire to the object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum FailureWire {
    Connect,
    Timeout,
    Reset,
    Status(u16),
}

/// [`Outcome`] on the wire to the object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum OutcomeWire {
    Failed { failure: FailureWire, retry_after_ms: Option<u64> },
    Served { remaining_requests: Option<u64>, remaining_tokens: Option<u64>, reset_after_ms: Option<u64> },
}

impl From<Failure> for FailureWire {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Connect => FailureWire::Connect,
            Failure::Timeout => FailureWire::Timeout,
            Failure::Reset => FailureWire::Reset,
            Failure::Status(s) => FailureWire::Status(s),
        }
    }
}

impl From<FailureWire> for Failure {
    fn from(f: FailureWire) -> Self {
        match f {
            FailureWire::Connect => Failure::Connect,
            FailureWire::Timeout => Failure::Timeout,
            FailureWire::Reset => Failure::Reset,
            FailureWire::Status(s) => Failure::Status(s),
        }
    }
}

impl OutcomeWire {
    pub fn failed(failure: Failure, retry_after_ms: Option<u64>) -> Self {
        OutcomeWire::Failed { failure: failure.into(), retry_after_ms }
    }

    pub fn served(quota: Quota) -> Self {
        OutcomeWire::Served {
            remaining_requests: quota.remaining_requests,
            remaining_tokens: quota.remaining_tokens,
            reset_after_ms: quota.reset_after_ms,
        }
    }

    pub fn to_outcome(&self) -> Outcome {
        match *self {
            OutcomeWire::Failed { failure, retry_after_ms } => Outcome::Failed { failure: failure.into(), retry_after_ms },
            OutcomeWire::Served { remaining_requests, remaining_tokens, reset_after_ms } => {
                Outcome::Served { quota: Quota { remaining_requests, remaining_tokens, reset_after_ms } }
            }
        }
    }
}

/// The object's step for one reported outcome (pure): the record after it, and the bytes to
/// store (`None`: unchanged, nothing to write).
pub fn report_step(settings: &HealthSettings, stored: Option<&[u8]>, outcome: &OutcomeWire, now: u64) -> (Health, Option<Vec<u8>>) {
    let prev = stored.and_then(Health::decode);
    match next_health(prev.as_ref(), &outcome.to_outcome(), settings, now) {
        Some(next) => (next, Some(next.encode())),
        None => (prev.unwrap_or_default(), None),
    }
}

thread_local! {
    /// deployment -> (record, when this isolate got it)
    static CACHE: RefCell<BTreeMap<String, (Health, u64)>> = const { RefCell::new(BTreeMap::new()) };
}

fn cached(name: &str, now: u64, fresh_only: bool) -> Option<Health> {
    CACHE.with_borrow(|c| {
        c.get(name).filter(|(_, at)| !fresh_only || now.saturating_sub(*at) < CACHE_MS).map(|(h, _)| *h)
    })
}

fn remember(name: &str, health: Health, now: u64) {
    CACHE.with_borrow_mut(|c| {
        c.insert(name.to_owned(), (health, now));
    });
}

/// The health of each of `names` (same order): from this isolate's cache when every one is
/// fresh, else from the object (one call). A failing object (the error is returned for the
/// caller to log): cached copies, else healthy.
pub async fn read<C: Counters>(counters: &C, names: &[String], now: u64) -> (Vec<Health>, Option<CounterError>) {
    let fresh: Option<Vec<Health>> = names.iter().map(|n| cached(n, now, true)).collect();
    if let Some(all) = fresh {
        return (all, None);
    }
    let asked: Vec<String> = names.iter().take(MAX_READ).cloned().collect();
    let n = asked.len();
    let error = match counters.call(HEALTH_OBJECT, &Op::HealthRead { deployments: asked }).await {
        Ok(Answer::Health(records)) if records.len() == n => {
            for (name, bytes) in names.iter().zip(&records) {
                remember(name, Health::decode(bytes).unwrap_or_default(), now);
            }
            None
        }
        Ok(_) => Some(CounterError::Decode("an answer for another op".to_owned())),
        Err(e) => Some(e),
    };
    (names.iter().map(|n| cached(n, now, false).unwrap_or_default()).collect(), error)
}

/// Applies `outcome` to this isolate's copy of `name`'s record at once. Returns whether the
/// record changed, i.e. whether the object must be told ([`report`]).
pub fn note(name: &str, outcome: &OutcomeWire, settings: &HealthSettings, now: u64) -> bool {
    let prev = cached(name, now, false);
    match next_health(prev.as_ref(), &outcome.to_outcome(), settings, now) {
        Some(next) => {
            remember(name, next, now);
            true
        }
        None => false,
    }
}

/// Tells the object; its answer (the stored record) replaces this isolate's copy.
pub async fn report<C: Counters>(counters: &C, name: &str, outcome: OutcomeWire, now: u64) -> Result<(), CounterError> {
    let op = Op::HealthReport { deployment: name.to_owned(), outcome, now };
    match counters.call(HEALTH_OBJECT, &op).await? {
        Answer::Health(records) => {
            if let Some(h) = records.first().and_then(|b| Health::decode(b)) {
                remember(name, h, now);
            }
            Ok(())
        }
        _ => Err(CounterError::Decode("an answer for another op".to_owned())),
    }
}

/// The storage key of a deployment's record in [`HEALTH_OBJECT`].
pub fn storage_key(deployment: &str) -> String {
    health_key(deployment)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::block_on;
    use crate::counter::tests::MemoryObjects;
    use tollgate_core::Policy;

    fn policy() -> Policy {
        Policy::from_json(
            br#"{"tier":{"default":"d"},"tiers":{"d":{"limits":[]}},"health":{"failures":2,"window_seconds":60,"cooldown_seconds":30}}"#,
        )
        .unwrap()
    }

    #[test]
    fn outcomes_round_trip_as_json() {
        let o = OutcomeWire::failed(Failure::Status(429), Some(2000));
        let json = serde_json::to_string(&o).unwrap();
        assert_eq!(json, r#"{"kind":"failed","failure":{"status":429},"retry_after_ms":2000}"#);
        assert_eq!(serde_json::from_str::<OutcomeWire>(&json).unwrap(), o);
        let s = OutcomeWire::served(Quota { remaining_requests: Some(0), remaining_tokens: None, reset_after_ms: Some(2000) });
        assert_eq!(serde_json::from_str::<OutcomeWire>(&serde_json::to_string(&s).unwrap()).unwrap(), s);
        assert!(matches!(s.to_outcome(), Outcome::Served { quota } if quota.remaining_requests == Some(0)));
    }

    #[test]
    fn the_object_step_writes_failures_and_leaves_plain_successes_alone() {
        let settings = policy().health;
        let served = OutcomeWire::served(Quota::default());
        assert_eq!(report_step(&settings, None, &served, 1000), (Health::default(), None), "success: no write");
        let failed = OutcomeWire::failed(Failure::Status(500), None);
        let (one, write) = report_step(&settings, None, &failed, 1000);
        assert!(write.is_some());
        assert!(one.is_available(1000), "one failure of two: still available");
        let (two, write) = report_step(&settings, write.as_deref(), &failed, 2000);
        assert!(write.is_some());
        assert!(!two.is_available(2000), "two failures: cooling down");
        assert!(two.is_available(2000 + 30_000));
        // Garbled bytes read as healthy.
        assert_eq!(report_step(&settings, Some(b"\xff\xff"), &served, 1).0, Health::default());
    }

    #[test]
    fn reads_go_to_one_object_and_are_cached_briefly() {
        let o = MemoryObjects::new(policy());
        let names = vec!["a".to_owned(), "b".to_owned()];
        let now = 7_000_000;
        let (first, error) = block_on(read(&o, &names, now));
        assert!(error.is_none());
        assert_eq!(first, vec![Health::default(); 2]);
        assert_eq!(*o.calls.borrow(), [HEALTH_OBJECT]);
        block_on(read(&o, &names, now + 10));
        assert_eq!(o.calls.borrow().len(), 1, "served from the isolate's cache");
        // A failure reported to the object is seen by a reader whose cache has expired.
        let failed = OutcomeWire::failed(Failure::Status(429), Some(5000));
        block_on(report(&o, "b", failed, now + 20)).unwrap();
        CACHE.with_borrow_mut(|c| c.clear());
        let (later, _) = block_on(read(&o, &names, now + 30));
        assert!(later[0].is_available(now + 30));
        assert!(!later[1].is_available(now + 30), "b honours its retry-after");
        assert!(later[1].is_available(now + 20 + 5000));
        // The object failing: cached copies are used.
        *o.fail.borrow_mut() = Some(String::new());
        let (failing, error) = block_on(read(&o, &names, now + 5 * CACHE_MS));
        assert_eq!(failing, later);
        assert!(error.is_some());
    }
}
