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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Who {
    pub identity_key: String,
    pub ip_key: Option<String>,
    pub tier: String,
}

/// The estimate a request is admitted with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Estimate {
    /// The model the client asked for (the price-table key); `None` when unknown.
    pub model: Option<String>,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// Everything the adapter keeps between admission and the end of the request.
#[derive(Debug, Clone, PartialEq, Eq)]
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

#[derive(Debug, Clone, PartialEq, Eq)]
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

fn digest(material: &[u8]) -> [u8; 32] {
    Sha256::digest(material).into()
}

impl LimitSet {
    /// The keys `who` is counted under, in checking order, with their limits.
    pub fn plans(&self, who: &Who) -> Vec<KeyPlan<'_>> {
        let tier: &[Limit] = self.tiers.get(&who.tier).map_or(&[], Vec::as_slice);
        fn of(scope: Scope, limits: &[Limit]) -> Vec<&Limit> {
            limits.iter().filter(|l| l.scope == scope).collect()
        }
        let tracked = |scope: Scope| self.tracked.get(&scope).cloned().unwrap_or_default();
        let mut plans = Vec::with_capacity(4);
        let mut member_plan = |scope: Scope, prefix: &str, id: &str| {
            let limits = of(scope, tier);
            let tracked = tracked(scope);
            if limits.is_empty() && tracked.is_empty() {
                return;
            }
            let d = digest(id.as_bytes());
            let tag = u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
            let key = if self.slots == 0 {
                format!("tg2:{prefix}:{}", hex(&d[..16]))
            } else {
                let slot = u32::from_le_bytes([d[8], d[9], d[10], d[11]]) % self.slots;
                format!("tg2:{prefix}:{slot:x}")
            };
            plans.push(KeyPlan { key, tag, scope, limits, tracked });
        };
        member_plan(Scope::Identity, "i", &who.identity_key);
        if let Some(ip) = &who.ip_key {
            member_plan(Scope::Ip, "p", ip);
        }
        let tier_limits = of(Scope::Tier, tier);
        if !tier_limits.is_empty() {
            plans.push(KeyPlan { key: format!("tg2:t:{}", who.tier), tag: 0, scope: Scope::Tier, limits: tier_limits, tracked: vec![] });
        }
        if !self.global.is_empty() {
            plans.push(KeyPlan { key: "tg2:g".to_owned(), tag: 0, scope: Scope::Global, limits: self.global.iter().collect(), tracked: vec![] });
        }
        plans
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
    let plans = set.plans(who);
    let demand_for = |model: Option<&str>| set.demand(estimate, model);
    let mut admission = Admission {
        verdict: Verdict::Allowed,
        statuses: Vec::new(),
        downgrade: None,
        warnings: Vec::new(),
        notify: Vec::new(),
        ticket: Ticket { who: who.clone(), model: estimate.model.clone(), parts: Vec::new() },
        evicted: 0,
        release_failures: 0,
    };
    for plan in &plans {
        let downgraded = admission.downgrade.clone();
        let step = update(store, &plan.key, max_retries, |bytes| {
            let (reserved, write) = ledger::reserve(bytes, plan, &demand_for, downgraded.as_deref(), lease_id, now, &set.settings);
            Step { result: reserved, write }
        });
        let reserved: Reserved = match step {
            Ok(r) => r,
            Err(e) => {
                release(store, set, &plans, &admission.ticket, now, max_retries);
                return Err(e);
            }
        };
        admission.statuses.extend(reserved.statuses);
        admission.evicted += reserved.evicted;
        if reserved.verdict != Verdict::Allowed {
            admission.verdict = reserved.verdict;
            admission.release_failures = release(store, set, &plans, &admission.ticket, now, max_retries);
            admission.ticket.parts.clear();
            admission.warnings.clear();
            admission.notify.clear();
            admission.downgrade = None;
            return Ok(admission);
        }
        if admission.downgrade.is_none() {
            admission.downgrade = reserved.downgrade;
        }
        admission.warnings.extend(reserved.warnings);
        admission.notify.extend(reserved.notify);
        admission.ticket.parts.push((plan.key.clone(), plan.tag, plan.scope, reserved.receipt));
    }
    if let Some(model) = &admission.downgrade {
        admission.ticket.model = Some(model.clone());
    }
    Ok(admission)
}

/// Undoes the reservations of a ticket; returns how many keys could not be updated.
fn release<S: CasStore + ?Sized>(store: &mut S, set: &LimitSet, plans: &[KeyPlan], ticket: &Ticket, now: Timestamp, max_retries: u32) -> u32 {
    let mut failures = 0;
    for (key, _, _, receipt) in &ticket.parts {
        let Some(plan) = plans.iter().find(|p| &p.key == key) else { continue };
        let r = update(store, key, max_retries, |bytes| {
            let (_, write) = ledger::settle(bytes, plan, receipt, &Actual::nothing(), now, &set.settings);
            Step { result: (), write }
        });
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
    let plans = set.plans(&ticket.who);
    let actual = match usage {
        Some(u) => set.actual(ticket.model.as_deref(), u),
        None => Actual::used(None, None, None),
    };
    let mut notify = Vec::new();
    let mut first_error = None;
    for (key, _, _, receipt) in &ticket.parts {
        let Some(plan) = plans.iter().find(|p| &p.key == key) else { continue };
        let r = update(store, key, max_retries, |bytes| {
            let (reached, write) = ledger::settle(bytes, plan, receipt, &actual, now, &set.settings);
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
