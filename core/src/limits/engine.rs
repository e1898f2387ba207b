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

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::limits::ledger::{Actual, Demand, KeyPlan, LimitStatus, Reached, Receipt, Settings, Verdict};
use crate::limits::{Limit, Metric, Scope};
use crate::usage::Usage;
use crate::window::Window;

/// A model's price, in micro-dollars per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Price {
    /// Micro-dollars per million prompt tokens.
    pub input: u64,
    /// Micro-dollars per million output tokens.
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
    /// What every step on the store needs: time zone, member cap, lease lifetime.
    pub settings: Settings,
    /// Keys per identity (and per IP) kind; 0: one key per identity.
    pub slots: u32,
    /// Each tier's own limits, by tier name.
    pub tiers: BTreeMap<String, Vec<Limit>>,
    /// The limits over every request (`global.limits`).
    pub global: Vec<Limit>,
    /// The price table, by model name.
    pub prices: BTreeMap<String, Price>,
    /// Calendar counters every member of a scope keeps (the union over tiers).
    pub tracked: BTreeMap<Scope, Vec<(Metric, Window)>>,
    /// Each tier's limits split by scope (identity, IP, tier), so a step borrows its part's
    /// limits instead of collecting them per request.
    scoped: BTreeMap<String, [Vec<Limit>; 3]>,
}

/// Who a request is counted for (hashed keys only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Who {
    /// The subject's bucket.
    pub identity_key: String,
    /// The client address's bucket, for per-address limits (`None`: address unknown).
    pub ip_key: Option<String>,
    /// The tier whose limits apply.
    pub tier: String,
}

/// The estimate a request is admitted with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Estimate {
    /// The model the client asked for (the price-table key); `None` when unknown.
    pub model: Option<String>,
    /// Estimated prompt tokens.
    pub input_tokens: u64,
    /// Output tokens reserved.
    pub output_tokens: u64,
}

/// Everything the adapter keeps between admission and the end of the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    /// Who was counted.
    pub who: Who,
    /// The model the request is served by (after a downgrade), for the price at settlement.
    pub model: Option<String>,
    /// The most usage a provider can believably report for this request.
    #[serde(default)]
    pub bound: UsageBound,
    parts: Vec<TicketPart>,
}

/// The most usage a provider can believably report for one request: more is a provider fault
/// (or a lie), and is believed only up to this ([`crate::ending`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageBound {
    /// Prompt tokens: [`MAX_BELIEVED_INPUT_TOKENS`].
    pub input: u64,
    /// Output tokens: what the request's choices can be written (the model's ceiling per
    /// choice, times the choices).
    pub output: u64,
}

/// The most prompt tokens one request is believed to use: above the largest context window any
/// served model accepts.
pub const MAX_BELIEVED_INPUT_TOKENS: u64 = 10_000_000;

impl Default for UsageBound {
    fn default() -> Self {
        UsageBound { input: MAX_BELIEVED_INPUT_TOKENS, output: crate::guard::MAX_OUTPUT_RESERVATION.saturating_mul(crate::guard::MAX_N) }
    }
}

impl UsageBound {
    /// `usage` believed up to the bound, and whether it had to be cut.
    pub fn apply(&self, usage: &Usage) -> (Usage, bool) {
        let mut cut = false;
        let mut clamp = |v: Option<u64>, max: u64| {
            v.map(|v| {
                cut |= v > max;
                v.min(max)
            })
        };
        let input = clamp(usage.input, self.input);
        let output = clamp(usage.output, self.output);
        let bounded = Usage {
            input,
            output,
            cached_read: usage.cached_read.map(|c| c.min(input.unwrap_or(c))),
            cache_write: usage.cache_write.map(|c| c.min(input.unwrap_or(c))),
            reasoning: usage.reasoning.map(|r| r.min(output.unwrap_or(r))),
        };
        (bounded, cut)
    }
}

/// What one key of a ticket charged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketPart {
    /// The store key.
    pub key: String,
    /// The member's tag in the key's record.
    pub tag: u64,
    /// Whose key it is.
    pub scope: Scope,
    /// What the reservation charged there.
    pub receipt: Receipt,
}

impl Ticket {
    /// An empty ticket for `who`.
    pub fn new(who: &Who, model: Option<String>) -> Ticket {
        Ticket { who: who.clone(), model, bound: UsageBound::default(), parts: Vec::new() }
    }

    /// A ticket that charged nothing (requests that were not admitted).
    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// Whether settling can give back room a later admission may need: a concurrency lease,
    /// or a token or cost reservation (settled to what was used). Requests count in full at
    /// admission, so a ticket of request counts only settles nothing anyone waits for.
    pub fn frees_room(&self) -> bool {
        self.parts.iter().any(|p| {
            let r = &p.receipt;
            r.lease.is_some() || r.counters.iter().any(|c| c.0 != Metric::Requests) || r.rates.iter().any(|c| c.0 != Metric::Requests)
        })
    }

    /// The keys the ticket charged, in admission order.
    pub fn parts(&self) -> impl Iterator<Item = &TicketPart> {
        self.parts.iter()
    }

    /// The `i`-th part.
    pub fn part(&self, i: usize) -> Option<&TicketPart> {
        self.parts.get(i)
    }

    pub(crate) fn part_list(&self) -> &[TicketPart] {
        &self.parts
    }

    pub(crate) fn push(&mut self, key: String, tag: u64, scope: Scope, receipt: Receipt) {
        self.parts.push(TicketPart { key, tag, scope, receipt });
    }

    pub(crate) fn clear(&mut self) {
        self.parts.clear();
    }
}

/// The outcome of admission over every key a request touches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Admission {
    /// Whether every limit had room (the refusal, when one had not).
    pub verdict: Verdict,
    /// Every limit that applied, after this request when it was admitted.
    pub statuses: Vec<LimitStatus>,
    /// The model a downgrade threshold asks for, if one was reached.
    pub downgrade: Option<String>,
    /// The `warn` thresholds reached.
    pub warnings: Vec<Reached>,
    /// The `notify` thresholds reached for the first time in their window.
    pub notify: Vec<Reached>,
    /// What to settle when the request ends.
    pub ticket: Ticket,
    /// Members with live state evicted from full slots (a metric for the operator).
    pub evicted: u32,
    /// Releases that failed after a later key refused (their counts wait for the window to end).
    pub release_failures: u32,
}

impl Admission {
    /// An admission that has reserved nothing yet.
    pub fn new(who: &Who, model: Option<String>) -> Admission {
        Admission {
            verdict: Verdict::Allowed,
            statuses: Vec::new(),
            downgrade: None,
            warnings: Vec::new(),
            notify: Vec::new(),
            ticket: Ticket::new(who, model),
            evicted: 0,
            release_failures: 0,
        }
    }

    /// Whether every limit allowed the request.
    pub fn is_allowed(&self) -> bool {
        self.verdict == Verdict::Allowed
    }

    /// The most restrictive limit of a kind (least remaining; on a tie, the one resetting last).
    pub fn binding(&self, pick: impl Fn(Metric) -> bool) -> Option<&LimitStatus> {
        binding(&self.statuses, pick)
    }
}

pub(crate) fn binding(statuses: &[LimitStatus], pick: impl Fn(Metric) -> bool) -> Option<&LimitStatus> {
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
    /// A limit set; each tier's limits keep their configured order.
    pub fn new(
        settings: Settings,
        slots: u32,
        tiers: BTreeMap<String, Vec<Limit>>,
        global: Vec<Limit>,
        prices: BTreeMap<String, Price>,
        tracked: BTreeMap<Scope, Vec<(Metric, Window)>>,
    ) -> LimitSet {
        let scoped = tiers
            .iter()
            .map(|(name, ls)| {
                let of = |scope: Scope| ls.iter().filter(|l| l.scope == scope).cloned().collect::<Vec<_>>();
                (name.clone(), [of(Scope::Identity), of(Scope::Ip), of(Scope::Tier)])
            })
            .collect();
        LimitSet { settings, slots, tiers, global, prices, tracked, scoped }
    }

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
    #[cfg(test)]
    pub(crate) fn plan_for(&self, who: &Who, key: &str) -> Option<KeyPlan<'_>> {
        self.plans(who).into_iter().find(|p| p.key == key)
    }

    /// The plan of one key whose name and tag are already known (a ticket's part): no hashing.
    fn part_plan(&self, tier: &str, key: String, tag: u64, scope: Scope) -> KeyPlan<'_> {
        self.key_plan(key.into(), tag, scope, self.part_limits(tier, scope))
    }

    /// The limits a tier's member of a `scope` key is checked against (global: the global ones).
    pub(crate) fn part_limits(&self, tier: &str, scope: Scope) -> &[Limit] {
        let i = match scope {
            Scope::Global => return &self.global,
            Scope::Identity => 0,
            Scope::Ip => 1,
            Scope::Tier => 2,
        };
        self.scoped.get(tier).map_or(&[], |by_scope| &by_scope[i])
    }

    /// The plan of one key with the given limits, and the calendar counters its scope tracks.
    pub(crate) fn key_plan<'l>(&'l self, key: Cow<'l, str>, tag: u64, scope: Scope, limits: &'l [Limit]) -> KeyPlan<'l> {
        let tracked = match scope {
            Scope::Identity | Scope::Ip => self.tracked.get(&scope).map_or(&[][..], Vec::as_slice),
            _ => &[],
        };
        KeyPlan { key, tag, scope, limits, tracked }
    }

    pub(crate) fn price(&self, model: Option<&str>) -> Option<&Price> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Policy;

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
    fn only_leases_and_token_or_cost_reservations_free_room_when_settled() {
        let who = who("a");
        let mut t = Ticket::new(&who, None);
        assert!(!t.frees_room());
        let requests = Receipt { counters: vec![(Metric::Requests, crate::window::Window::Day, 1, 1)], rates: vec![(Metric::Requests, 0, 1, 1_000)], lease: None };
        t.push("k".into(), 0, Scope::Identity, requests.clone());
        assert!(!t.frees_room(), "request counts are final at admission");
        let mut tokens = requests.clone();
        tokens.counters.push((Metric::TotalTokens, crate::window::Window::Day, 1, 500));
        let mut with_tokens = t.clone();
        with_tokens.push("k2".into(), 0, Scope::Tier, tokens);
        assert!(with_tokens.frees_room());
        let mut leased = t.clone();
        leased.push("k3".into(), 0, Scope::Identity, Receipt { lease: Some(7), ..requests });
        assert!(leased.frees_room());
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
}
