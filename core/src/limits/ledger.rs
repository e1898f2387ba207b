//! The pure steps on one store key: reserve at admission, settle (or release) when the request
//! ends. Each step takes the stored bytes and returns its result and the bytes to write
//! (`None`: nothing changed), so it runs inside `crate::store::update`'s compare-and-set loop
//! or inside a Durable Object unchanged.
//!
//! Arithmetic rules (tested below):
//! - A reservation is counted in full or not at all; a denied request changes nothing.
//! - Settling replaces the reservation with the actual amount in the window it was reserved in;
//!   if that window has ended, the actual amount is counted in the current window instead —
//!   usage is never lost, counts never go below zero.
//! - An unknown actual amount (`None`) keeps the reservation as the charge.
//! - A calendar counter kept only for tracking (no limit of the plan counts it) reserves the
//!   request but no estimated tokens or cost: it holds what settlement reports, never a
//!   reservation.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::limits::record::{start_minute, Counter, Lease, Member, Rate, Record};
use crate::limits::{percent_of, Action, Limit, Metric, Scope, Span};
use crate::window::{Timestamp, Window, Zone};

/// Amounts per metric, indexed by [`Metric::id`] − 1.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Amounts<T>(pub [T; 6]);

impl<T: Copy> Amounts<T> {
    pub(crate) fn get(&self, m: Metric) -> T {
        self.0[m.id() as usize - 1]
    }
}

/// What a request asks for at admission.
pub(crate) type Demand = Amounts<u64>;

impl Demand {
    /// One request with these token and cost estimates, taking one concurrency slot.
    pub fn request(input_tokens: u64, output_tokens: u64, cost_micros: u64) -> Demand {
        Amounts([1, input_tokens, output_tokens, input_tokens.saturating_add(output_tokens), cost_micros, 1])
    }
}

/// What a request used, as far as known (`None`: unknown, keep the reservation).
pub type Actual = Amounts<Option<u64>>;

impl Actual {
    /// Everything released: the request did not happen (a later limit refused it).
    pub fn nothing() -> Actual {
        Amounts([Some(0); 6])
    }

    /// The request was sent but nothing was served: it still counts as a request, but no tokens
    /// and no cost ([`crate::ending`]).
    pub(crate) fn not_served() -> Actual {
        Amounts([None, Some(0), Some(0), Some(0), Some(0), Some(0)])
    }

    /// The request happened and used this (unknown fields keep their reservation).
    pub fn used(input: Option<u64>, output: Option<u64>, cost_micros: Option<u64>) -> Actual {
        let total = match (input, output) {
            (Some(i), Some(o)) => Some(i.saturating_add(o)),
            _ => None,
        };
        Amounts([None, input, output, total, cost_micros, Some(0)])
    }
}

/// The limits one store key is checked against, and the member they apply to.
#[derive(Debug, Clone)]
pub struct KeyPlan<'a> {
    /// The store key.
    pub key: Cow<'a, str>,
    /// The member's tag in the key's record.
    pub tag: u64,
    /// Whose key it is.
    pub scope: Scope,
    /// The limits the member is checked against.
    pub limits: &'a [Limit],
    /// Calendar counters kept for the member even when its tier does not limit them, so a
    /// tier change mid-window keeps an exact count.
    pub tracked: &'a [(Metric, Window)],
}

/// Store-wide settings a step needs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The time zone calendar windows follow.
    pub zone: Zone,
    /// Most members one key holds before the ones expiring first are evicted.
    pub member_cap: usize,
    /// How long a concurrency lease lives unless released, in milliseconds.
    pub lease_ttl_ms: u64,
}

/// Where one limit stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitStatus {
    /// The limit's name (`total_tokens/day`, or as configured).
    pub name: String,
    /// Whose usage it counts.
    pub scope: Scope,
    /// What it counts.
    pub metric: Metric,
    /// `None` for rate and concurrency limits.
    pub window: Option<Window>,
    /// The most it allows (a rate limit: its burst).
    pub limit: u64,
    /// Counted so far, including this request's reservation when it was admitted.
    pub used: u64,
    /// What is left: `limit` less `used`, at least 0.
    pub remaining: u64,
    /// Milliseconds until the window resets (rate: until one more unit fits; concurrency: 0).
    pub reset_ms: u64,
}

impl LimitStatus {
    /// `used` as a whole percentage of the limit.
    pub fn percent(&self) -> u64 {
        (self.used as u128 * 100 / self.limit.max(1) as u128).min(u64::MAX as u128) as u64
    }
}

/// A soft threshold reached: a warning for the client, or a webhook event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reached {
    /// Where the limit stands.
    pub status: LimitStatus,
    /// The threshold's percentage.
    pub threshold: u32,
    /// Start of the window the threshold was reached in (epoch ms).
    pub window_start: Timestamp,
}

/// Whether a reservation fits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// Every limit has room.
    Allowed,
    /// Over a limit now; `retry_after_ms` is when every refusing limit has room again.
    Denied {
        /// Where a refusing limit stands.
        status: LimitStatus,
        /// Milliseconds until every refusing limit has room again.
        retry_after_ms: u64,
    },
    /// The reservation alone exceeds a limit: it can never fit.
    TooLarge {
        /// Where that limit stands.
        status: LimitStatus,
        /// The amount the request would reserve on it.
        requested: u64,
    },
}

/// What a reservation charged, kept by the adapter until the request ends.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// Calendar counters charged: metric, window, window start (minutes since the epoch), amount.
    pub counters: Vec<(Metric, Window, u32, u64)>,
    /// Rate states advanced: metric, rate id, units, emission interval in nanoseconds.
    pub rates: Vec<(Metric, u32, u64, u64)>,
    /// The concurrency lease taken, by id.
    pub lease: Option<u64>,
}

/// What a reservation on one key decided, and the receipt to settle it with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reserved {
    /// Whether the reservation fits.
    pub verdict: Verdict,
    /// Where each of the key's limits stands (after this request, when it was allowed).
    pub statuses: Vec<LimitStatus>,
    /// The model a downgrade threshold asks for, if any was reached.
    pub downgrade: Option<String>,
    /// The `warn` thresholds reached.
    pub warnings: Vec<Reached>,
    /// The `notify` thresholds reached for the first time in their window.
    pub notify: Vec<Reached>,
    /// What the reservation charged.
    pub receipt: Receipt,
    /// Members with live state evicted from the key's full record.
    pub evicted: u32,
}

const NS_PER_MS: u128 = 1_000_000;

fn ns(ms: Timestamp) -> u64 {
    (ms as u128 * NS_PER_MS).min(u64::MAX as u128) as u64
}

/// GCRA parameters: emission interval and tolerance in ns.
fn gcra(limit: &Limit) -> Option<(u64, u64, u64)> {
    let Span::Rate { period_ms, burst } = limit.span else { return None };
    let t = ((period_ms as u128 * NS_PER_MS) / limit.max.max(1) as u128).max(1) as u64;
    Some((t, burst, t.saturating_mul(burst)))
}

/// A stable id for a rate limit's GCRA state (FNV-1a over its parameters).
pub(crate) fn rate_id(limit: &Limit) -> u32 {
    let Span::Rate { period_ms, burst } = limit.span else { return 0 };
    let mut h: u32 = 0x811c_9dc5;
    for b in period_ms.to_le_bytes().iter().chain(&limit.max.to_le_bytes()).chain(&burst.to_le_bytes()) {
        h ^= *b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

fn status(limit: &Limit, member: &Member, now: Timestamp, s: &Settings) -> LimitStatus {
    // A rate limit is described by its bucket: `limit` = the burst, `used` = units whose
    // emission interval has not passed yet, `reset_ms` = until the next unit frees up.
    let (cap, used, reset_ms) = match limit.span {
        Span::Window(w) => (limit.max, member.used(limit.metric, w, now, &s.zone), w.bounds_in(now, &s.zone).1 - now),
        Span::Rate { .. } => {
            let (t, burst, _) = gcra(limit).unwrap_or((1, 1, 1));
            let backlog = member.rate(limit.metric, rate_id(limit)).map_or(0, |r| r.tat_ns.saturating_sub(ns(now)));
            let in_use = backlog.div_ceil(t).min(burst);
            let next_free = match backlog % t {
                0 if backlog > 0 => t,
                r => r,
            };
            (burst, in_use, (next_free as u128).div_ceil(NS_PER_MS) as u64)
        }
        Span::Now => (limit.max, member.live_leases(now) as u64, 0),
    };
    LimitStatus {
        name: limit.name.clone(),
        scope: limit.scope,
        metric: limit.metric,
        window: limit.window(),
        limit: cap,
        used,
        remaining: cap.saturating_sub(used),
        reset_ms,
    }
}

/// Where every limit of `plan` stands, without changing anything (the usage endpoint).
pub(crate) fn peek(bytes: Option<&[u8]>, plan: &KeyPlan, now: Timestamp, s: &Settings) -> Vec<LimitStatus> {
    let record = bytes.map(Record::decode).unwrap_or_default();
    let member = record.member(plan.tag).cloned().unwrap_or_default();
    plan.limits.iter().map(|l| status(l, &member, now, s)).collect()
}

/// An operator's change to one member's counts (support: refunds, a fresh start). Leases are
/// never touched: requests in flight keep theirs and release them as they end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Adjustment {
    /// The current window's count of every limit to zero (of the named limit only, when one is
    /// named), its notify thresholds free to fire again; rate limits' buckets emptied.
    Reset {
        /// One limit's name (`None`: every limit of the part).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<String>,
    },
    /// `amount` off the named calendar limit's current count (never below zero).
    Credit {
        /// The limit's name.
        limit: String,
        /// In the limit's unit.
        amount: u64,
    },
}

impl Adjustment {
    /// The limit it names, if one.
    pub fn limit(&self) -> Option<&str> {
        match self {
            Adjustment::Reset { limit } => limit.as_deref(),
            Adjustment::Credit { limit, .. } => Some(limit),
        }
    }
}

/// Applies an [`Adjustment`] to one key's member: where its limits stand afterwards, and the
/// bytes to write (`None`: nothing to change).
pub(crate) fn adjust(bytes: Option<&[u8]>, plan: &KeyPlan, adjustment: &Adjustment, now: Timestamp, s: &Settings) -> (Vec<LimitStatus>, Option<Vec<u8>>) {
    let mut record = bytes.map(Record::decode).unwrap_or_default();
    let Some(before) = record.member(plan.tag).cloned() else {
        return (plan.limits.iter().map(|l| status(l, &Member::default(), now, s)).collect(), None);
    };
    let mut member = record.take(plan.tag);
    if let Adjustment::Reset { limit: None } = adjustment {
        // Everything the member counts in the current windows, whatever tier's limits named it
        // (a tier changed mid-window, counters only tracked): a fresh start.
        for c in &mut member.counters {
            if c.start_min == start_minute(c.window.bounds_in(now, &s.zone).0) {
                c.count = 0;
                c.notified = 0;
            }
        }
        member.rates.clear();
    }
    let named = adjustment.limit().map(|n| plan.limits.iter().filter(move |l| l.name == n));
    for l in named.into_iter().flatten() {
        match l.span {
            Span::Window(w) => {
                let start = start_minute(w.bounds_in(now, &s.zone).0);
                let Some(c) = member.counters.iter_mut().find(|c| c.metric == l.metric && c.window == w && c.start_min == start) else { continue };
                match adjustment {
                    Adjustment::Reset { .. } => {
                        c.count = 0;
                        c.notified = 0;
                    }
                    Adjustment::Credit { amount, .. } => c.count = c.count.saturating_sub(*amount),
                }
            }
            Span::Rate { .. } if matches!(adjustment, Adjustment::Reset { .. }) => {
                let id = rate_id(l);
                member.rates.retain(|r| !(r.metric == l.metric && r.id == id));
            }
            Span::Rate { .. } | Span::Now => {}
        }
    }
    let statuses = plan.limits.iter().map(|l| status(l, &member, now, s)).collect();
    if member == before {
        return (statuses, None);
    }
    record.put(member, now, &s.zone, s.member_cap);
    (statuses, Some(record.encode()))
}

/// Reserves `demand` on one key. `demand_for(model)` gives the demand when the request is served
/// by a downgrade `model` (`None`: the requested model); `downgraded` is a downgrade an earlier
/// key already decided.
pub(crate) fn reserve(
    bytes: Option<&[u8]>,
    plan: &KeyPlan,
    demand_for: &dyn Fn(Option<&str>) -> Demand,
    downgraded: Option<&str>,
    lease_id: u64,
    now: Timestamp,
    s: &Settings,
) -> (Reserved, Option<Vec<u8>>) {
    let mut record = bytes.map(Record::decode).unwrap_or_default();
    let mut member = record.take(plan.tag);
    let zone = &s.zone;

    // Downgrade: the highest threshold the usage before this request has reached.
    let mut downgrade = downgraded.map(str::to_owned);
    if downgrade.is_none() {
        let mut best: Option<(u32, &str)> = None;
        for l in plan.limits {
            let Span::Window(w) = l.span else { continue };
            let used = member.used(l.metric, w, now, zone);
            for t in &l.thresholds {
                if let Action::Downgrade(model) = &t.action {
                    if used >= percent_of(l.max, t.percent) && best.is_none_or(|(p, _)| t.percent > p) {
                        best = Some((t.percent, model));
                    }
                }
            }
        }
        downgrade = best.map(|(_, m)| m.to_owned());
    }
    let demand = demand_for(downgrade.as_deref());
    let now_ns = ns(now);

    let mut too_large: Option<(LimitStatus, u64)> = None;
    let mut denied: Option<(LimitStatus, u64)> = None;
    let mut worst_retry = 0u64;
    for l in plan.limits {
        let want = demand.get(l.metric).max(1);
        let refusal = match l.span {
            Span::Window(w) => l.block_at().and_then(|cap| {
                if want > cap {
                    Some(Err(want))
                } else if member.used(l.metric, w, now, zone).saturating_add(want) > cap {
                    Some(Ok(w.bounds_in(now, zone).1 - now))
                } else {
                    None
                }
            }),
            Span::Rate { .. } => {
                let (t, burst, tolerance) = gcra(l).unwrap_or((1, 1, 1));
                let units = if l.metric == Metric::Requests { 1 } else { want };
                if units > burst {
                    Some(Err(want))
                } else {
                    let tat = member.rate(l.metric, rate_id(l)).map_or(0, |r| r.tat_ns).max(now_ns);
                    let new_tat = tat.saturating_add(units.saturating_mul(t));
                    let ahead = new_tat - now_ns;
                    (ahead > tolerance).then(|| Ok(((ahead - tolerance) as u128).div_ceil(NS_PER_MS) as u64))
                }
            }
            Span::Now => (member.live_leases(now) as u64 >= l.max).then_some(Ok(1000)),
        };
        match refusal {
            Some(Err(requested)) if too_large.is_none() => too_large = Some((status(l, &member, now, s), requested)),
            Some(Ok(retry)) => {
                if denied.is_none() || retry > worst_retry {
                    denied = Some((status(l, &member, now, s), retry));
                }
                worst_retry = worst_retry.max(retry);
            }
            _ => {}
        }
    }
    let refused = |verdict| {
        let statuses = plan.limits.iter().map(|l| status(l, &member, now, s)).collect();
        (
            Reserved { verdict, statuses, downgrade: downgrade.clone(), warnings: vec![], notify: vec![], receipt: Receipt::default(), evicted: 0 },
            None,
        )
    };
    if let Some((status, requested)) = too_large {
        return refused(Verdict::TooLarge { status, requested });
    }
    if let Some((status, _)) = denied {
        return refused(Verdict::Denied { status, retry_after_ms: worst_retry });
    }

    // Admitted: charge every calendar counter, advance the rates, take a lease.
    let mut receipt = Receipt::default();
    let mut windows: Vec<(Metric, Window)> = plan.tracked.to_vec();
    windows.extend(plan.limits.iter().filter_map(|l| l.window().map(|w| (l.metric, w))));
    windows.sort();
    windows.dedup();
    for (m, w) in windows {
        let start = start_minute(w.bounds_in(now, zone).0);
        // A counter only tracked here (the member's tier does not limit it) takes the request
        // itself but none of its estimate: it counts what settlement learns, so a tier without
        // a limit on a shared key (an IP's) cannot fill it with reservations.
        let limited = plan.limits.iter().any(|l| l.metric == m && l.window() == Some(w));
        let amount = if limited || m == Metric::Requests { demand.get(m) } else { 0 };
        let c = member.counter_mut(m, w);
        if c.start_min != start {
            *c = Counter { metric: m, window: w, start_min: start, count: 0, notified: 0 };
        }
        c.count = c.count.saturating_add(amount);
        receipt.counters.push((m, w, start, amount));
    }
    for l in plan.limits {
        let Some((t, _, _)) = gcra(l) else { continue };
        let units = if l.metric == Metric::Requests { 1 } else { demand.get(l.metric).max(1) };
        let id = rate_id(l);
        let tat = member.rate(l.metric, id).map_or(0, |r| r.tat_ns).max(now_ns);
        let new_tat = tat.saturating_add(units.saturating_mul(t));
        match member.rates.iter_mut().find(|r| r.metric == l.metric && r.id == id) {
            Some(r) => r.tat_ns = new_tat,
            None => member.rates.push(Rate { metric: l.metric, id, tat_ns: new_tat }),
        }
        receipt.rates.push((l.metric, id, units, t));
    }
    if plan.limits.iter().any(|l| l.span == Span::Now) {
        member.leases.retain(|l| l.expires_ms > now);
        member.leases.push(Lease { id: lease_id, expires_ms: now.saturating_add(s.lease_ttl_ms) });
        receipt.lease = Some(lease_id);
    }

    let mut warnings = Vec::new();
    for l in plan.limits {
        let Span::Window(w) = l.span else { continue };
        let st = status(l, &member, now, s);
        let warn = l.thresholds.iter().filter(|t| t.action == Action::Warn && st.used >= percent_of(l.max, t.percent)).map(|t| t.percent).max();
        if let Some(threshold) = warn {
            warnings.push(Reached { status: st, threshold, window_start: w.bounds_in(now, zone).0 });
        }
    }
    let notify = fire_notifications(plan.limits, &mut member, now, s);
    let statuses = plan.limits.iter().map(|l| status(l, &member, now, s)).collect();
    let evicted = record.put(member, now, zone, s.member_cap);
    (
        Reserved { verdict: Verdict::Allowed, statuses, downgrade, warnings, notify, receipt, evicted },
        Some(record.encode()),
    )
}

/// Marks and returns every notify threshold reached and not yet fired in the current window.
fn fire_notifications(limits: &[Limit], member: &mut Member, now: Timestamp, s: &Settings) -> Vec<Reached> {
    let mut out = Vec::new();
    for l in limits {
        let Span::Window(w) = l.span else { continue };
        let notify: Vec<u32> = l.thresholds.iter().filter(|t| t.action == Action::Notify).map(|t| t.percent).take(8).collect();
        if notify.is_empty() {
            continue;
        }
        let start = w.bounds_in(now, &s.zone).0;
        let Some(c) = member.counters.iter_mut().find(|c| c.metric == l.metric && c.window == w && c.start_min == start_minute(start)) else {
            continue;
        };
        let mut fired = Vec::new();
        for (i, pct) in notify.iter().enumerate() {
            if c.notified & (1 << i) == 0 && c.count >= percent_of(l.max, *pct) {
                c.notified |= 1 << i;
                fired.push(*pct);
            }
        }
        for threshold in fired {
            out.push(Reached { status: status(l, member, now, s), threshold, window_start: start });
        }
    }
    out
}

/// Settles a reservation: replaces what was reserved with `actual`, releases the lease.
/// Returns the notify thresholds this reaches, and the bytes to write.
pub(crate) fn settle(
    bytes: Option<&[u8]>,
    plan: &KeyPlan,
    receipt: &Receipt,
    actual: &Actual,
    now: Timestamp,
    s: &Settings,
) -> (Vec<Reached>, Option<Vec<u8>>) {
    let mut record = bytes.map(Record::decode).unwrap_or_default();
    let original = record.clone();
    let mut member = record.take(plan.tag);
    let zone = &s.zone;
    for &(m, w, start, reserved) in &receipt.counters {
        let Some(a) = actual.get(m) else { continue };
        let current = start_minute(w.bounds_in(now, zone).0);
        let c = member.counter_mut(m, w);
        if c.start_min == start && start == current {
            c.count = c.count.saturating_sub(reserved).saturating_add(a);
        } else if a > 0 {
            // The reservation's window has ended (or its count was evicted): what was used
            // counts now.
            if c.start_min != current {
                *c = Counter { metric: m, window: w, start_min: current, count: 0, notified: 0 };
            }
            c.count = c.count.saturating_add(a);
        }
    }
    let now_ns = ns(now);
    for &(m, id, units, t) in &receipt.rates {
        let Some(a) = actual.get(m) else { continue };
        let a = if m == Metric::Requests { a.min(1) } else { a };
        if let Some(r) = member.rates.iter_mut().find(|r| r.metric == m && r.id == id) {
            if a >= units {
                r.tat_ns = r.tat_ns.max(now_ns).saturating_add((a - units).saturating_mul(t));
            } else {
                r.tat_ns = r.tat_ns.saturating_sub((units - a).saturating_mul(t));
            }
        }
    }
    if let Some(id) = receipt.lease {
        member.leases.retain(|l| l.id != id);
    }
    let notify = fire_notifications(plan.limits, &mut member, now, s);
    record.put(member, now, zone, s.member_cap);
    if record == original {
        return (notify, None);
    }
    (notify, Some(record.encode()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::RawLimit;
    use proptest::prelude::*;

    const T0: Timestamp = 1_709_214_330_250; // 2024-02-29T13:45:30.250Z

    fn limit(json: &str) -> Limit {
        let raw: RawLimit = serde_json::from_str(json).unwrap();
        raw.validate("l", false, &|_| true).unwrap()
    }

    fn settings() -> Settings {
        Settings { zone: Zone::utc(), member_cap: 8, lease_ttl_ms: 60_000 }
    }

    fn plan(limits: &[Limit]) -> KeyPlan<'_> {
        KeyPlan { key: "k".into(), tag: 1, scope: Scope::Identity, limits, tracked: &[] }
    }

    struct Cell(Option<Vec<u8>>, u64);
    impl Cell {
        fn reserve(&mut self, p: &KeyPlan, d: Demand, now: Timestamp) -> Reserved {
            self.1 += 1;
            let (r, w) = reserve(self.0.as_deref(), p, &|_| d, None, self.1, now, &settings());
            if let Some(w) = w {
                self.0 = Some(w);
            }
            r
        }
        fn settle(&mut self, p: &KeyPlan, r: &Receipt, a: Actual, now: Timestamp) -> Vec<Reached> {
            let (n, w) = settle(self.0.as_deref(), p, r, &a, now, &settings());
            if let Some(w) = w {
                self.0 = Some(w);
            }
            n
        }
        fn used(&self, m: Metric, w: Window, now: Timestamp) -> u64 {
            Record::decode(self.0.as_deref().unwrap_or_default()).member(1).map_or(0, |mb| mb.used(m, w, now, &Zone::utc()))
        }
    }

    #[test]
    fn tokens_reserve_then_settle_to_the_reported_usage() {
        let l = limit(r#"{"window":"day","total_tokens":1000}"#);
        let p = plan(std::slice::from_ref(&l));
        let mut c = Cell(None, 0);
        let r = c.reserve(&p, Demand::request(100, 500, 0), T0);
        assert_eq!(r.verdict, Verdict::Allowed);
        assert_eq!(c.used(Metric::TotalTokens, Window::Day, T0), 600);
        // a second 600-token reservation does not fit until the first settles
        assert!(matches!(c.reserve(&p, Demand::request(100, 500, 0), T0).verdict, Verdict::Denied { .. }));
        c.settle(&p, &r.receipt, Actual::used(Some(90), Some(40), None), T0 + 1);
        assert_eq!(c.used(Metric::TotalTokens, Window::Day, T0), 130);
        assert_eq!(c.reserve(&p, Demand::request(100, 500, 0), T0 + 2).verdict, Verdict::Allowed);
    }

    #[test]
    fn a_reservation_that_can_never_fit_is_its_own_verdict() {
        let l = limit(r#"{"window":"day","total_tokens":1000}"#);
        let mut c = Cell(None, 0);
        let r = c.reserve(&plan(std::slice::from_ref(&l)), Demand::request(100, 4096, 0), T0);
        assert!(matches!(r.verdict, Verdict::TooLarge { requested: 4196, .. }), "{:?}", r.verdict);
        assert!(c.0.is_none(), "nothing written");
    }

    #[test]
    fn settling_after_the_window_ended_counts_in_the_new_window() {
        let l = limit(r#"{"window":"minute","total_tokens":1000}"#);
        let p = plan(std::slice::from_ref(&l));
        let mut c = Cell(None, 0);
        let r = c.reserve(&p, Demand::request(10, 100, 0), T0);
        let next_minute = T0 + 60_000;
        c.settle(&p, &r.receipt, Actual::used(Some(10), Some(70), None), next_minute);
        assert_eq!(c.used(Metric::TotalTokens, Window::Minute, next_minute), 80);
    }

    #[test]
    fn unknown_usage_keeps_the_reservation() {
        let l = limit(r#"{"window":"day","output_tokens":1000}"#);
        let p = plan(std::slice::from_ref(&l));
        let mut c = Cell(None, 0);
        let r = c.reserve(&p, Demand::request(10, 300, 0), T0);
        c.settle(&p, &r.receipt, Actual::used(None, None, None), T0 + 5);
        assert_eq!(c.used(Metric::OutputTokens, Window::Day, T0), 300);
    }

    #[test]
    fn leases_are_released_and_expire() {
        let l = limit(r#"{"concurrent":2}"#);
        let p = plan(std::slice::from_ref(&l));
        let mut c = Cell(None, 0);
        let a = c.reserve(&p, Demand::request(1, 1, 0), T0);
        let b = c.reserve(&p, Demand::request(1, 1, 0), T0);
        assert_eq!((a.verdict.clone(), b.verdict.clone()), (Verdict::Allowed, Verdict::Allowed));
        assert!(matches!(c.reserve(&p, Demand::request(1, 1, 0), T0).verdict, Verdict::Denied { .. }));
        c.settle(&p, &a.receipt, Actual::used(Some(1), Some(1), None), T0 + 1);
        assert_eq!(c.reserve(&p, Demand::request(1, 1, 0), T0 + 2).verdict, Verdict::Allowed);
        // a crashed host never settles: the TTL frees the slots
        assert!(matches!(c.reserve(&p, Demand::request(1, 1, 0), T0 + 3).verdict, Verdict::Denied { .. }));
        assert_eq!(c.reserve(&p, Demand::request(1, 1, 0), T0 + 60_003).verdict, Verdict::Allowed);
    }

    #[test]
    fn gcra_allows_the_burst_then_the_rate() {
        let l = limit(r#"{"rate":{"per":"minute","burst":3},"requests":60}"#);
        let p = plan(std::slice::from_ref(&l));
        let mut c = Cell(None, 0);
        for _ in 0..3 {
            assert_eq!(c.reserve(&p, Demand::request(1, 1, 0), T0).verdict, Verdict::Allowed);
        }
        let Verdict::Denied { retry_after_ms, status } = c.reserve(&p, Demand::request(1, 1, 0), T0).verdict else { panic!() };
        assert_eq!(retry_after_ms, 1000);
        // described as its bucket: 3 of a burst of 3 in use, the next frees in 1 s
        assert_eq!((status.limit, status.used, status.remaining, status.reset_ms), (3, 3, 0, 1000));
        assert_eq!(c.reserve(&p, Demand::request(1, 1, 0), T0 + 1000).verdict, Verdict::Allowed);
        assert!(matches!(c.reserve(&p, Demand::request(1, 1, 0), T0 + 1000).verdict, Verdict::Denied { .. }));
    }

    #[test]
    fn soft_thresholds_warn_downgrade_and_grace() {
        let l = limit(
            r#"{"window":"day","requests":10,"soft":[{"at":80,"action":"warn"},{"at":100,"action":"downgrade","model":"small"},{"at":120,"action":"block"}]}"#,
        );
        let p = plan(std::slice::from_ref(&l));
        let mut c = Cell(None, 0);
        let mut seen = vec![];
        for _ in 0..13 {
            let r = c.reserve(&p, Demand::request(1, 1, 0), T0);
            seen.push((matches!(r.verdict, Verdict::Allowed), r.warnings.first().map(|w| w.threshold), r.downgrade.clone()));
        }
        let small = Some("small".to_owned());
        for (i, (allowed, warn, down)) in seen.iter().enumerate() {
            let n = i as u64 + 1; // this request's position
            assert_eq!(*allowed, n <= 12, "request {n}");
            if *allowed {
                assert_eq!(*warn, (n >= 8).then_some(80), "request {n}");
                assert_eq!(*down, if n > 10 { small.clone() } else { None }, "request {n}");
            }
        }
    }

    #[test]
    fn notify_fires_once_per_window_even_when_usage_dips() {
        let l = limit(r#"{"window":"day","total_tokens":100,"soft":[{"at":50,"action":"notify"},{"at":90,"action":"notify"}]}"#);
        let p = plan(std::slice::from_ref(&l));
        let mut c = Cell(None, 0);
        let r1 = c.reserve(&p, Demand::request(30, 30, 0), T0);
        assert_eq!(r1.notify.iter().map(|n| n.threshold).collect::<Vec<_>>(), vec![50]);
        // settling down to 20 and crossing 50 again does not fire again
        assert!(c.settle(&p, &r1.receipt, Actual::used(Some(10), Some(10), None), T0).is_empty());
        let r2 = c.reserve(&p, Demand::request(20, 20, 0), T0);
        assert!(r2.notify.is_empty());
        // settle pushes past 90: fires 90 once
        let n = c.settle(&p, &r2.receipt, Actual::used(Some(35), Some(40), None), T0);
        assert_eq!(n.iter().map(|n| n.threshold).collect::<Vec<_>>(), vec![90]);
        // next day, again
        let r3 = c.reserve(&p, Demand::request(30, 30, 0), T0 + 86_400_000);
        assert_eq!(r3.notify.len(), 1);
    }

    #[test]
    fn tracked_counters_follow_a_member_across_tiers() {
        let free = limit(r#"{"window":"hour","requests":3}"#);
        let mut p = plan(&[]);
        p.tracked = &[(Metric::Requests, Window::Hour)];
        let mut c = Cell(None, 0);
        c.reserve(&p, Demand::request(1, 1, 0), T0);
        c.reserve(&p, Demand::request(1, 1, 0), T0);
        let p2 = plan(std::slice::from_ref(&free));
        let r = c.reserve(&p2, Demand::request(1, 1, 0), T0);
        assert_eq!(r.statuses[0].used, 3);
        assert!(matches!(c.reserve(&p2, Demand::request(1, 1, 0), T0).verdict, Verdict::Denied { .. }));
    }

    #[test]
    fn a_tier_that_does_not_limit_a_counter_never_fills_it_with_reservations() {
        // An IP key's day token counter, limited by another tier: this member's tier only
        // tracks it. A huge reservation (no max_tokens guard) must not land there.
        let mut p = plan(&[]);
        p.tracked = &[(Metric::Requests, Window::Day), (Metric::TotalTokens, Window::Day)];
        let mut c = Cell(None, 0);
        let r = c.reserve(&p, Demand::request(10, u64::MAX / 2, 0), T0);
        assert_eq!(c.used(Metric::TotalTokens, Window::Day, T0), 0, "no reservation on a tracked-only counter");
        assert_eq!(c.used(Metric::Requests, Window::Day, T0), 1, "the request itself counts");
        // Unknown usage keeps the reservation: nothing. Known usage is what counts.
        c.settle(&p, &r.receipt, Actual::used(None, None, None), T0);
        assert_eq!(c.used(Metric::TotalTokens, Window::Day, T0), 0);
        let r = c.reserve(&p, Demand::request(10, u64::MAX / 2, 0), T0);
        c.settle(&p, &r.receipt, Actual::used(Some(7), Some(5), None), T0);
        assert_eq!(c.used(Metric::TotalTokens, Window::Day, T0), 12);
        // The tier that limits it still reserves in full.
        let l = limit(r#"{"window":"day","total_tokens":1000}"#);
        let limiting = plan(std::slice::from_ref(&l));
        c.reserve(&limiting, Demand::request(100, 200, 0), T0);
        assert_eq!(c.used(Metric::TotalTokens, Window::Day, T0), 312);
    }

    #[test]
    fn members_beyond_the_cap_evict_the_one_expiring_first() {
        let day = limit(r#"{"window":"day","requests":5}"#);
        let minute = limit(r#"{"window":"minute","requests":5}"#);
        let s = Settings { member_cap: 2, ..settings() };
        let mut bytes: Option<Vec<u8>> = None;
        let mut run = |tag: u64, l: &Limit| {
            let p = KeyPlan { key: "k".into(), tag, scope: Scope::Identity, limits: std::slice::from_ref(l), tracked: &[] };
            let (r, w) = reserve(bytes.as_deref(), &p, &|_| Demand::request(1, 1, 0), None, 1, T0, &s);
            bytes = w;
            r.evicted
        };
        assert_eq!(run(1, &day), 0);
        assert_eq!(run(2, &minute), 0);
        assert_eq!(run(3, &day), 1);
        let rec = Record::decode(bytes.as_deref().unwrap());
        let mut tags: Vec<u64> = rec.members.iter().map(|m| m.tag).collect();
        tags.sort();
        assert_eq!(tags, vec![1, 3], "the minute-window member expires first");
    }

    proptest! {
        /// Any interleaving of reservations and settlements: counts never go negative, and after
        /// everything settles the count equals the sum of what was actually used.
        #[test]
        fn settled_counts_equal_actual_usage(ops in proptest::collection::vec((0u64..400, 0u64..400, 0u64..500, 0u64..500), 1..40)) {
            let l = limit(r#"{"window":"day","total_tokens":100000000}"#);
            let p = plan(std::slice::from_ref(&l));
            let mut c = Cell(None, 0);
            let mut receipts = vec![];
            let mut expected = 0u64;
            for (i, o, ai, ao) in &ops {
                let r = c.reserve(&p, Demand::request(*i, *o, 0), T0);
                prop_assert_eq!(&r.verdict, &Verdict::Allowed);
                receipts.push((r.receipt, *ai, *ao));
                expected += ai + ao;
            }
            for (r, ai, ao) in receipts.iter().rev() {
                c.settle(&p, r, Actual::used(Some(*ai), Some(*ao), None), T0 + 1);
            }
            prop_assert_eq!(c.used(Metric::TotalTokens, Window::Day, T0), expected);
        }

        /// Requests never overshoot: exactly `limit` of any number of attempts are admitted.
        #[test]
        fn requests_admit_exactly_the_limit(limit_n in 1u64..50, attempts in 1usize..120) {
            let l = limit(&format!(r#"{{"window":"hour","requests":{limit_n}}}"#));
            let p = plan(std::slice::from_ref(&l));
            let mut c = Cell(None, 0);
            let admitted = (0..attempts).filter(|_| c.reserve(&p, Demand::request(1, 1, 0), T0).verdict == Verdict::Allowed).count();
            prop_assert_eq!(admitted as u64, limit_n.min(attempts as u64));
        }
    }
}
