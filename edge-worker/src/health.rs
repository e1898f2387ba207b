//! Provider health for model aliases: every deployment's [`Health`] record, shared by every
//! isolate through one Durable Object, with a short per-isolate cache in front.
//!
//! ## Where the records live
//! In the `QUOTA_COUNTER` namespace, in the object named [`HEALTH_OBJECT`] (`tg2:h`), which is
//! not a counter: it stores each deployment's record under its key `tg2:h:<deployment>` and
//! runs core's health ops on it ([`Op::HealthRead`], [`Op::HealthReport`]) like every other
//! store. One object for every deployment means one round trip reads a whole alias.
//!
//! ## Cost per request
//! - Reading: at most one object call per alias request, none while this isolate's cache holds
//!   every deployment the alias names and is younger than [`CACHE_MS`]. So one isolate asks at
//!   most about once a second per alias, and a cooldown another isolate started is seen within
//!   [`CACHE_MS`].
//! - Writing: only when core's [`next_health`] says the record changes (every failure the policy
//!   falls back on; a success only when the provider's remaining quota starts or stops steering
//!   traffic away). The isolate applies the same step to its cached copy at once (so its very
//!   next request already skips a deployment it just saw fail), and sends the outcome to the
//!   object, which applies it to the stored record — the authority — and answers the result,
//!   which replaces the cached copy. Sent in `ctx.wait_until`: the client never waits for it.
//!
//! A failing object never fails a request: reads then use the cached records, or treat every
//! deployment as healthy; failed reports are logged.

use std::cell::RefCell;
use std::collections::BTreeMap;

use tollgate_core::fallback::{next_health, Health, HealthSettings, Outcome};
use tollgate_core::ops::{Op, Reply};

use crate::counter::{CounterError, Counters};

/// The object holding every deployment's health record.
pub const HEALTH_OBJECT: &str = "tg2:h";
/// How long this isolate trusts its copy of a record before asking the object again.
pub const CACHE_MS: u64 = 1000;
/// Most deployments one read may name (aliases have at most 10).
pub const MAX_READ: usize = 32;

thread_local! {
    /// deployment -> (record, when this isolate got it)
    static CACHE: RefCell<BTreeMap<String, (Health, u64)>> = const { RefCell::new(BTreeMap::new()) };
}

fn cached(name: &str, now: u64, fresh_only: bool) -> Option<Health> {
    CACHE.with_borrow(|c| c.get(name).filter(|(_, at)| !fresh_only || now.saturating_sub(*at) < CACHE_MS).map(|(h, _)| *h))
}

fn remember(name: &str, health: Health, now: u64) {
    CACHE.with_borrow_mut(|c| {
        c.insert(name.to_owned(), (health, now));
    });
}

/// The health of each of `names` (same order): from this isolate's cache when every one is
/// fresh, else from the object (one call). A failing object (the error is returned for the
/// caller to log): cached copies, else healthy.
pub async fn read<C: Counters>(counters: &C, names: &[&str], now: u64) -> (Vec<Health>, Option<CounterError>) {
    let fresh: Option<Vec<Health>> = names.iter().map(|n| cached(n, now, true)).collect();
    if let Some(all) = fresh {
        return (all, None);
    }
    let ops: Vec<Op> = names.iter().take(MAX_READ).map(|d| Op::HealthRead { deployment: (*d).into() }).collect();
    let error = match counters.call(HEALTH_OBJECT, &ops).await {
        Ok(replies) => {
            for (name, reply) in names.iter().zip(replies) {
                if let Reply::Health(h) = reply {
                    remember(name, h, now);
                }
            }
            None
        }
        Err(e) => Some(e),
    };
    (names.iter().map(|n| cached(n, now, false).unwrap_or_default()).collect(), error)
}

/// Applies `outcome` to this isolate's copy of `name`'s record at once. Returns whether the
/// record changed, i.e. whether the object must be told ([`report`]).
pub fn note(name: &str, outcome: &Outcome, settings: &HealthSettings, now: u64) -> bool {
    let prev = cached(name, now, false);
    match next_health(prev.as_ref(), outcome, settings, now) {
        Some(next) => {
            remember(name, next, now);
            true
        }
        None => false,
    }
}

/// Tells the object; its answer (the stored record) replaces this isolate's copy.
pub async fn report<C: Counters>(counters: &C, name: &str, outcome: Outcome, now: u64) -> Result<(), CounterError> {
    let op = Op::HealthReport { deployment: name.into(), outcome, now };
    match counters.call(HEALTH_OBJECT, std::slice::from_ref(&op)).await?.pop() {
        Some(Reply::Health(h)) => {
            remember(name, h, now);
            Ok(())
        }
        _ => Err(CounterError::Decode("an answer for another op".to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counter::tests::MemoryObjects;
    use crate::store::block_on;
    use tollgate_core::fallback::Failure;
    use tollgate_core::Policy;

    fn policy() -> Policy {
        Policy::from_json(br#"{"tier":{"default":"d"},"tiers":{"d":{"limits":[]}},"health":{"failures":2,"window_seconds":60,"cooldown_seconds":30}}"#)
            .unwrap()
    }

    #[test]
    fn reads_go_to_one_object_and_are_cached_briefly() {
        let o = MemoryObjects::new(policy());
        let names = ["a", "b"];
        let now = 7_000_000;
        let (first, error) = block_on(read(&o, &names, now));
        assert!(error.is_none());
        assert_eq!(first, vec![Health::default(); 2]);
        assert_eq!(*o.calls.borrow(), [HEALTH_OBJECT]);
        block_on(read(&o, &names, now + 10));
        assert_eq!(o.calls.borrow().len(), 1, "served from the isolate's cache");
        // A failure reported to the object is seen by a reader whose cache has expired.
        let failed = Outcome::Failed { failure: Failure::Status(429), retry_after_ms: Some(5000) };
        block_on(report(&o, "b", failed, now + 20)).unwrap();
        assert!(o.records.borrow().contains_key("tg2:h/tg2:h:b"), "one storage key per deployment");
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
