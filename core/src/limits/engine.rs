//! Admission and settlement across every store key a request touches.
//!
//! A request is checked, in this order, against its identity's key, its client IP's key, its
//! tier's aggregate key and the global key (only the keys some limit or tracked counter needs).
//! Each key is reserved with its own compare-and-set ([`ledger::reserve`]); if a later key
//! refuses, the earlier reservations are released, so a refused request is never counted. While
//! that happens another request may briefly see the earlier reservation: it errs towards
//! refusing, never towards overshooting.
//!
//! Key space (bounded for Envoy's shared data, which has no delete and no TTL): identities and
//! client IPs are hashed into `store.slots` keys per kind (`tg2:i:<slot>`, `tg2:p:<slot>`); a
//! slot holds one member per identity with live state, at most `store.members_per_slot` of
//! them, evicting the member whose state expires first. Aggregates are `tg2:t:<tier>` and
//! `tg2:g`. With `slots = 0` (the worker: one Durable Object per identity) each identity has
//! its own key.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::limits::ledger::{self, Actual, Demand, KeyPlan, LimitStatus, Reached, Receipt, Reserved, Settings, Verdict};
use crate::limits::{Limit, Metric, Scope};
use crate::store::{update, CasStore, Step, StoreError};
use crate::usage::Usage;
use crate::window::{Timestamp, Window};

/// A model's price, in micro-dollars per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Price {
    pub input: u64,
    pub output: u64,
    /// Prompt tokens served from the provider's cache (defaults to the input price).
    pub cached_input: u64,
}

impl Price {
    /// Micro-dollars for `input` (of which `cached` from cache) and `output` tokens, rounded up.
    pub fn cost(&self, input: u64, cached: u64, output: u64) -> u64 {
        let cached = cached.min(input);
        let nano = (input - cached) as u128 * self.input as u128
            + cached as u128 * self.cached_input as u128
            + output as u128 * self.output as u128;
        nano.div_ceil(1_000_000).min(u64::MAX as u128) as u64
    }
}

/// Every limit of a policy, and how they are stored.
#[derive(Debug, Clone)]
pub struct LimitSet {
    pub settings: Settings,
    /// Keys per identity (and per IP) kind; 0: one key per identity.
    pub slots: u32,
    pub tiers: BTreeMap<String, Vec<Limit>>,
    pub global: Vec<Limit>,
    pub prices: BTreeMap<String, Price>,
    /// Calendar counters every member of a scope keeps (the union over tiers).
    pub tracked: BTreeMap<Scope, Vec<(Metric, Window)>>,
}

/// Who a request is counted for (hashed keys only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Who {
    pub identity_key: String,
    pub ip_key: Option<String>,
    pub tier: String,
}

/// The estimate a request is admitted with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Estimate {
    /// The model the client asked for (the price-table key); `None` when unknown.
    pub model: Option<String>,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// Everything the adapter keeps between admission and the end of the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    pub who: Who,
    /// The model the request is served by (after a downgrade), for the price at settlement.
    pub model: Option<String>,
    parts: Vec<(String, u64, Scope, Receipt)>,
}

impl Ticket {
    /// A ticket that charged nothing (requests that were not admitted).
    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Admission {
    pub verdict: Verdict,
    /// Every limit that applied, after this request when it was admitted.
    pub statuses: Vec<LimitStatus>,
    pub downgrade: Option<String>,
    pub warnings: Vec<Reached>,
    pub notify: Vec<Reached>,
    pub ticket: Ticket,
    /// Members with live state evicted from full slots (a metric for the operator).
    pub evicted: u32,
    /// Releases that failed after a later key refused (their counts wait for the window to end).
    pub release_failures: u32,
}

impl Admission {
    pub fn is_allowed(&self) -> bool {
        self.verdict == Verdict::Allowed
    }

    /// The most restrictive limit of a kind (least remaining; on a tie, the one resetting last).
    pub fn binding(&self, pick: impl Fn(Metric) -> bool) -> Option<&LimitStatus> {
        binding(&self.statuses, pick)
    }
}

pub fn binding(statuses: &[LimitStatus], pick: impl Fn(Metric) -> bool) -> Option<&LimitStatus> {
    statuses
        .iter()
        .filter(|s| pick(s.metric))
        .min_by(|a, b| a.remaining.cmp(&b.remaining).then(b.reset_ms.cmp(&a.reset_ms)))
}

/// 16 bytes identifying a hashed subject key. Subject keys (`tg1:q:` + 32 hex digits) already
/// are SHA-256 digests: their bytes are used as they are; anything else is hashed.
fn digest(id: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    if let Some(hex) = id.strip_prefix("tg1:q:").filter(|h| h.len() == 32) {
        let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        let ok = hex.as_bytes().chunks_exact(2).zip(out.iter_mut()).all(|(pair, o)| match (nibble(pair[0]), nibble(pair[1])) {
            (Some(a), Some(b)) => {
                *o = a << 4 | b;
                true
            }
            _ => false,
        });
        if ok {
            return out;
        }
    }
    let full: [u8; 32] = Sha256::digest(id.as_bytes()).into();
    out.copy_from_slice(&full[..16]);
    out
}

impl LimitSet {
    /// The keys `who` is counted under, in checking order, with their limits.
    pub fn plans(&self, who: &Who) -> Vec<KeyPlan<'_>> {
        let mut plans = Vec::with_capacity(4);
        for (scope, id) in [(Scope::Identity, Some(&who.identity_key)), (Scope::Ip, who.ip_key.as_ref())] {
            let Some(id) = id else { continue };
            let d = digest(id);
            let tag = u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
            let prefix = if scope == Scope::Identity { "i" } else { "p" };
            let key = if self.slots == 0 {
                format!("tg2:{prefix}:{}", hex(&d))
            } else {
                let slot = u32::from_le_bytes([d[8], d[9], d[10], d[11]]) % self.slots;
                format!("tg2:{prefix}:{slot:x}")
            };
            let plan = self.part_plan(&who.tier, key, tag, scope);
            if !plan.limits.is_empty() || !plan.tracked.is_empty() {
                plans.push(plan);
            }
        }
        for (scope, key) in [(Scope::Tier, format!("tg2:t:{}", who.tier)), (Scope::Global, "tg2:g".to_owned())] {
            let plan = self.part_plan(&who.tier, key, 0, scope);
            if !plan.limits.is_empty() {
                plans.push(plan);
            }
        }
        plans
    }

    /// The plan of one of `who`'s keys (`None`: no limit of `who` is stored under `key`).
    pub fn plan_for(&self, who: &Who, key: &str) -> Option<KeyPlan<'_>> {
        self.plans(who).into_iter().find(|p| p.key == key)
    }

    /// The plan of one key whose name and tag are already known (a ticket's part): no hashing.
    fn part_plan(&self, tier: &str, key: String, tag: u64, scope: Scope) -> KeyPlan<'_> {
        let limits: Vec<&Limit> = match scope {
            Scope::Global => self.global.iter().collect(),
            _ => self.tiers.get(tier).map_or(vec![], |ls| ls.iter().filter(|l| l.scope == scope).collect()),
        };
        let tracked = match scope {
            Scope::Identity | Scope::Ip => self.tracked.get(&scope).cloned().unwrap_or_default(),
            _ => vec![],
        };
        KeyPlan { key, tag, scope, limits, tracked }
    }

    pub fn price(&self, model: Option<&str>) -> Option<&Price> {
        self.prices.get(model?)
    }

    /// The demand for serving `estimate` with `model`.
    pub fn demand(&self, estimate: &Estimate, model: Option<&str>) -> Demand {
        let model = model.or(estimate.model.as_deref());
        let cost = self.price(model).map_or(0, |p| p.cost(estimate.input_tokens, 0, estimate.output_tokens));
        Demand::request(estimate.input_tokens, estimate.output_tokens, cost)
    }

    /// What the provider reported, as amounts to settle (unknown stays unknown).
    pub fn actual(&self, model: Option<&str>, usage: &Usage) -> Actual {
        let cost = match (self.price(model), usage.input, usage.output) {
            (Some(p), Some(i), Some(o)) => Some(p.cost(i, usage.cached_read.unwrap_or(0), o)),
            (None, _, _) => Some(0),
            _ => None,
        };
        Actual::used(usage.input, usage.output, cost)
    }

    /// Does any limit of the tier need token estimates (tokens or cost)?
    pub fn counts_tokens(&self, tier: &str) -> bool {
        let uses = |l: &Limit| l.metric.is_tokens() || l.metric == Metric::CostMicros;
        self.tiers.get(tier).is_some_and(|ls| ls.iter().any(uses))
            || self.global.iter().any(uses)
            || self.tracked.values().flatten().any(|(m, _)| m.is_tokens() || *m == Metric::CostMicros)
    }

    /// The largest output reservation that still fits every token limit's remaining budget for
    /// this request (`None`: no token limit applies) — for capping `max_tokens` upstream.
    pub fn output_budget(statuses: &[LimitStatus], reserved_output: u64) -> Option<u64> {
        statuses
            .iter()
            .filter(|s| matches!(s.metric, Metric::OutputTokens | Metric::TotalTokens) && s.window.is_some())
            .map(|s| s.remaining.saturating_add(reserved_output))
            .min()
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// One admission, step by step, for hosts whose store calls are asynchronous (the worker's
/// Durable Objects): for each [`AdmitRun::next_key`], run [`AdmitRun::reserve`] atomically on
/// that key's stored bytes, hand the result to [`AdmitRun::record`]; when it says
/// [`Flow::Release`], settle every part of [`AdmitRun::ticket`] with [`Actual::nothing`] via
/// [`release_step`]. [`admit`] is this loop over a [`CasStore`].
pub struct AdmitRun<'a> {
    set: &'a LimitSet,
    plans: Vec<KeyPlan<'a>>,
    estimate: Estimate,
    lease_id: u64,
    now: Timestamp,
    next: usize,
    admission: Admission,
}

/// What to do after a key's reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Reserve the next key (or finish when there is none).
    Next,
    /// A key refused: release the ticket's parts, then finish.
    Release,
}

impl<'a> AdmitRun<'a> {
    pub fn new(set: &'a LimitSet, who: &Who, estimate: &Estimate, lease_id: u64, now: Timestamp) -> Self {
        AdmitRun {
            set,
            plans: set.plans(who),
            estimate: estimate.clone(),
            lease_id,
            now,
            next: 0,
            admission: Admission {
                verdict: Verdict::Allowed,
                statuses: Vec::new(),
                downgrade: None,
                warnings: Vec::new(),
                notify: Vec::new(),
                ticket: Ticket { who: who.clone(), model: estimate.model.clone(), parts: Vec::new() },
                evicted: 0,
                release_failures: 0,
            },
        }
    }

    /// The next key to reserve on.
    pub fn next_key(&self) -> Option<&KeyPlan<'a>> {
        if self.admission.verdict != Verdict::Allowed {
            return None;
        }
        self.plans.get(self.next)
    }

    /// The pure reservation step for the current key (may run several times under CAS).
    pub fn reserve(&self, bytes: Option<&[u8]>) -> (Reserved, Option<Vec<u8>>) {
        let Some(plan) = self.plans.get(self.next) else {
            return (
                Reserved { verdict: Verdict::Allowed, statuses: vec![], downgrade: None, warnings: vec![], notify: vec![], receipt: Receipt::default(), evicted: 0 },
                None,
            );
        };
        let demand_for = |model: Option<&str>| self.set.demand(&self.estimate, model);
        ledger::reserve(bytes, plan, &demand_for, self.admission.downgrade.as_deref(), self.lease_id, self.now, &self.set.settings)
    }

    /// Takes the current key's result.
    pub fn record(&mut self, reserved: Reserved) -> Flow {
        let Some(plan) = self.plans.get(self.next) else { return Flow::Next };
        self.next += 1;
        let a = &mut self.admission;
        a.statuses.extend(reserved.statuses);
        a.evicted += reserved.evicted;
        if reserved.verdict != Verdict::Allowed {
            a.verdict = reserved.verdict;
            a.warnings.clear();
            a.notify.clear();
            a.downgrade = None;
            return Flow::Release;
        }
        if a.downgrade.is_none() {
            a.downgrade = reserved.downgrade;
        }
        a.warnings.extend(reserved.warnings);
        a.notify.extend(reserved.notify);
        a.ticket.parts.push((plan.key.clone(), plan.tag, plan.scope, reserved.receipt));
        Flow::Next
    }

    /// The downgrade an earlier key decided (hosts that run [`ledger::reserve`] elsewhere,
    /// e.g. in a Durable Object, pass it as `downgraded`).
    pub fn downgraded(&self) -> Option<&str> {
        self.admission.downgrade.as_deref()
    }

    /// The ticket so far (what to release after a refusal).
    pub fn ticket(&self) -> &Ticket {
        &self.admission.ticket
    }

    /// The admission; a refused one carries no ticket parts (`release_failures` says how
    /// many releases failed).
    pub fn finish(mut self, release_failures: u32) -> Admission {
        if self.admission.verdict != Verdict::Allowed {
            self.admission.ticket.parts.clear();
            self.admission.release_failures = release_failures;
        } else if let Some(model) = &self.admission.downgrade {
            self.admission.ticket.model = Some(model.clone());
        }
        self.admission
    }
}

/// The keys of a ticket and their receipts.
impl Ticket {
    pub fn parts(&self) -> impl Iterator<Item = (&str, Scope, &Receipt)> {
        self.parts.iter().map(|(k, _, s, r)| (k.as_str(), *s, r))
    }
}

/// The pure settle step for one part of a ticket (`key`), for hosts that drive it themselves.
pub fn settle_step(set: &LimitSet, ticket: &Ticket, key: &str, actual: &Actual, bytes: Option<&[u8]>, now: Timestamp) -> (Vec<Reached>, Option<Vec<u8>>) {
    match ticket.parts.iter().find(|(k, ..)| k == key) {
        Some((key, tag, scope, receipt)) => {
            let plan = set.part_plan(&ticket.who.tier, key.clone(), *tag, *scope);
            ledger::settle(bytes, &plan, receipt, actual, now, &set.settings)
        }
        None => (vec![], None),
    }
}

/// The pure release step (a refused admission's earlier keys).
pub fn release_step(set: &LimitSet, ticket: &Ticket, key: &str, bytes: Option<&[u8]>, now: Timestamp) -> Option<Vec<u8>> {
    settle_step(set, ticket, key, &Actual::nothing(), bytes, now).1
}

/// Admits (reserving everything) or refuses (changing nothing) a request.
pub fn admit<S: CasStore + ?Sized>(
    store: &mut S,
    set: &LimitSet,
    who: &Who,
    estimate: &Estimate,
    lease_id: u64,
    now: Timestamp,
    max_retries: u32,
) -> Result<Admission, StoreError> {
    let mut run = AdmitRun::new(set, who, estimate, lease_id, now);
    while let Some(plan) = run.next_key() {
        let key = plan.key.clone();
        let step = update(store, &key, max_retries, |bytes| {
            let (reserved, write) = run.reserve(bytes);
            Step { result: reserved, write }
        });
        match step {
            Ok(reserved) => {
                if run.record(reserved) == Flow::Release {
                    let failures = release(store, set, run.ticket(), now, max_retries);
                    return Ok(run.finish(failures));
                }
            }
            Err(e) => {
                release(store, set, run.ticket(), now, max_retries);
                return Err(e);
            }
        }
    }
    Ok(run.finish(0))
}

/// Undoes the reservations of a ticket; returns how many keys could not be updated.
pub fn release<S: CasStore + ?Sized>(store: &mut S, set: &LimitSet, ticket: &Ticket, now: Timestamp, max_retries: u32) -> u32 {
    let mut failures = 0;
    for (key, ..) in &ticket.parts {
        let r = update(store, key, max_retries, |bytes| Step { result: (), write: release_step(set, ticket, key, bytes, now) });
        failures += u32::from(r.is_err());
    }
    failures
}

/// Settles a ticket with the provider-reported `usage` (the served model's price applies) and
/// releases its lease. `None` usage (the request ended before any was reported) keeps the
/// token reservations as the charge. Returns the notify thresholds reached.
pub fn settle<S: CasStore + ?Sized>(
    store: &mut S,
    set: &LimitSet,
    ticket: &Ticket,
    usage: Option<&Usage>,
    now: Timestamp,
    max_retries: u32,
) -> Result<Vec<Reached>, StoreError> {
    let actual = match usage {
        Some(u) => set.actual(ticket.model.as_deref(), u),
        None => Actual::used(None, None, None),
    };
    let mut notify = Vec::new();
    let mut first_error = None;
    for (key, tag, scope, receipt) in &ticket.parts {
        let plan = set.part_plan(&ticket.who.tier, key.clone(), *tag, *scope);
        let r = update(store, key, max_retries, |bytes| {
            let (reached, write) = ledger::settle(bytes, &plan, receipt, &actual, now, &set.settings);
            Step { result: reached, write }
        });
        match r {
            Ok(reached) => notify.extend(reached),
            Err(e) => first_error = first_error.or(Some(e)),
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(notify),
    }
}

/// Where every limit that applies to `who` stands now, changing nothing.
pub fn peek<S: CasStore + ?Sized>(store: &mut S, set: &LimitSet, who: &Who, now: Timestamp) -> Result<Vec<LimitStatus>, StoreError> {
    let mut out = Vec::new();
    for plan in set.plans(who) {
        let current = store.load(&plan.key)?;
        out.extend(ledger::peek(current.as_ref().map(|(b, _)| b.as_slice()), &plan, now, &set.settings));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Policy;
    use crate::store::MemoryStore;

    fn policy() -> Policy {
        Policy::from_json(
            br#"{"tier":{"default":"d"},"store":{"slots":0},
                 "tiers":{"d":{"limits":[{"window":"day","requests":5},{"per":"tier","window":"day","requests":9}]}}}"#,
        )
        .unwrap()
    }

    fn who(id: &str) -> Who {
        Who { identity_key: id.to_owned(), ip_key: None, tier: "d".to_owned() }
    }

    fn status(metric: Metric, remaining: u64, reset_ms: u64) -> LimitStatus {
        LimitStatus { name: format!("{}-{remaining}-{reset_ms}", metric.name()), scope: Scope::Identity, metric, window: None, limit: 100, used: 100 - remaining, remaining, reset_ms }
    }

    /// The most restrictive limit of a kind: least remaining; on a tie, the one resetting last.
    #[test]
    fn binding_picks_least_remaining_then_latest_reset() {
        let statuses = [
            status(Metric::Requests, 5, 1_000),
            status(Metric::Requests, 3, 500),
            status(Metric::Requests, 3, 9_000),
            status(Metric::TotalTokens, 1, 10),
            status(Metric::Requests, 7, 100_000),
        ];
        assert_eq!(binding(&statuses, |m| m == Metric::Requests).unwrap().name, "requests-3-9000");
        assert_eq!(binding(&statuses, Metric::is_tokens).unwrap().name, "total_tokens-1-10");
        assert!(binding(&statuses, |m| m == Metric::CostMicros).is_none());
    }

    #[test]
    fn plan_for_finds_each_of_the_plans_keys_and_nothing_else() {
        let p = policy();
        let plans = p.limits.plans(&who("a"));
        assert_eq!(plans.len(), 2);
        for plan in &plans {
            let found = p.limits.plan_for(&who("a"), &plan.key).unwrap();
            assert_eq!((found.key, found.scope, found.tag), (plan.key.clone(), plan.scope, plan.tag));
        }
        assert!(p.limits.plan_for(&who("a"), "tg2:t:other").is_none());
        assert!(p.limits.plan_for(&who("a"), &p.limits.plans(&who("b"))[0].key).is_none());
    }

    /// A host that runs each key's step elsewhere (the worker's Durable Objects) and hands
    /// the results to `record` gets the same admission as [`admit`].
    #[test]
    fn an_externally_run_admission_matches_admit() {
        let p = policy();
        let estimate = Estimate { model: None, input_tokens: 0, output_tokens: 0 };
        let mut a = MemoryStore::new();
        let mut b = MemoryStore::new();
        for _ in 0..6 {
            let expected = admit(&mut a, &p.limits, &who("a"), &estimate, 7, 1_000, 0).unwrap();
            let mut run = AdmitRun::new(&p.limits, &who("a"), &estimate, 7, 1_000);
            while let Some(plan) = run.next_key() {
                let plan = plan.clone();
                assert_eq!(run.downgraded(), None);
                let bytes = b.get(&plan.key).map(<[u8]>::to_vec);
                let demand = |m: Option<&str>| p.limits.demand(&estimate, m);
                let (reserved, write) = ledger::reserve(bytes.as_deref(), &plan, &demand, run.downgraded(), 7, 1_000, &p.limits.settings);
                if let Some(w) = write {
                    let version = b.load(&plan.key).unwrap().map(|(_, v)| v);
                    b.store(&plan.key, &w, version).unwrap();
                }
                if run.record(reserved) == Flow::Release {
                    let keys: Vec<String> = run.ticket().parts().map(|(k, ..)| k.to_owned()).collect();
                    for key in keys {
                        let bytes = b.get(&key).map(<[u8]>::to_vec);
                        if let Some(w) = release_step(&p.limits, run.ticket(), &key, bytes.as_deref(), 1_000) {
                            let version = b.load(&key).unwrap().map(|(_, v)| v);
                            b.store(&key, &w, version).unwrap();
                        }
                    }
                    break;
                }
            }
            assert_eq!(run.finish(0), expected);
        }
    }
}
