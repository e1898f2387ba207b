//! The sequences of per-key operations a request needs, as sans-IO state machines.
//!
//! A driver loops: [`Machine::next`] gives the next [`Op`] (or the result), the driver runs it
//! on its backend and hands the outcome to [`Machine::reply`]. The machines never see the
//! backend, so one loop serves every store: [`super::sync::run`] over a compare-and-set store,
//! an `await` per step in the worker (a Durable Object per key), a remote store service next.

use std::borrow::Cow;

use crate::fallback::Health;
use crate::limits::engine::{Admission, Estimate, LimitSet, Ticket, TicketPart, Who};
use crate::limits::ledger::{Actual, Adjustment, KeyPlan, LimitStatus, Reached, Verdict};
use crate::store::StoreError;
use crate::window::Timestamp;

use super::{Op, Part, Reply};

/// What a machine wants next.
// Returned and matched at once, never stored: boxing the op would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Next<'m, T> {
    /// Run this op and hand its outcome to [`Machine::reply`] (the op borrows the machine: run
    /// it, then reply).
    Op(Op<'m>),
    /// The machine is done.
    Done(T),
}

/// A sequence of per-key operations (see the module docs).
pub trait Machine {
    /// What the sequence comes to.
    type Output;
    /// The next op, or the output. After `Done`, the machine is spent: later calls answer `Done`
    /// again with what is left (an empty output).
    fn next(&mut self) -> Next<'_, Self::Output>;
    /// The outcome of the op [`Machine::next`] gave last (`Err`: the backend failed or gave up).
    fn reply(&mut self, reply: Result<Reply, StoreError>);
}

fn unexpected() -> StoreError {
    StoreError::Host("the store answered another op")
}

fn part<'m>(tag: u64, scope: crate::limits::Scope, tier: &'m str) -> Part<'m> {
    Part { tier: Cow::Borrowed(tier), tag, scope, shard: None }
}

/// The op releasing (`Actual::nothing`) or settling one part of a ticket.
fn settle<'m>(ticket: &'m Ticket, p: &'m TicketPart, actual: Actual, now: Timestamp) -> Op<'m> {
    Op::Settle { key: Cow::Borrowed(&p.key), part: part(p.tag, p.scope, &ticket.who.tier), receipt: Cow::Borrowed(&p.receipt), actual, now }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reserving on `plans[next]`.
    Reserving,
    /// Releasing the ticket's part `i` (a later key refused, or a key failed).
    Releasing(usize),
    Done,
}

/// Admission: reserve on every key of the request, in core's order (identity, IP, tier,
/// global). When a key refuses, the keys reserved before it are released, so a refused request
/// is never counted; when a key fails, the same, and the admission is the failure.
pub struct Admitting<'a> {
    plans: Vec<KeyPlan<'a>>,
    estimate: Estimate,
    lease_id: u64,
    now: Timestamp,
    next: usize,
    phase: Phase,
    admission: Admission,
    error: Option<StoreError>,
}

impl<'a> Admitting<'a> {
    /// An admission of `estimate` for `who`; `lease_id` names its concurrency lease.
    pub fn new(set: &'a LimitSet, who: &Who, estimate: &Estimate, lease_id: u64, now: Timestamp) -> Self {
        Admitting {
            plans: set.plans(who),
            estimate: estimate.clone(),
            lease_id,
            now,
            next: 0,
            phase: Phase::Reserving,
            admission: Admission::new(who, estimate.model.clone()),
            error: None,
        }
    }

    fn record(&mut self, reserved: crate::limits::ledger::Reserved) {
        let Some(plan) = self.plans.get_mut(self.next) else { return };
        self.next += 1;
        let a = &mut self.admission;
        a.statuses.extend(reserved.statuses);
        a.evicted += reserved.evicted;
        if reserved.verdict != Verdict::Allowed {
            a.verdict = reserved.verdict;
            a.warnings.clear();
            a.notify.clear();
            a.downgrade = None;
            self.phase = Phase::Releasing(0);
            return;
        }
        if a.downgrade.is_none() {
            a.downgrade = reserved.downgrade;
        }
        a.warnings.extend(reserved.warnings);
        a.notify.extend(reserved.notify);
        a.ticket.push(std::mem::take(&mut plan.key).into_owned(), plan.tag, plan.scope, reserved.receipt);
    }

    fn finish(&mut self) -> Result<Admission, StoreError> {
        self.phase = Phase::Done;
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        let empty = Admission::new(&self.admission.ticket.who, None);
        let mut a = std::mem::replace(&mut self.admission, empty);
        if a.verdict != Verdict::Allowed {
            a.ticket.clear();
        } else if let Some(model) = &a.downgrade {
            a.ticket.model = Some(model.clone());
        }
        Ok(a)
    }
}

impl Machine for Admitting<'_> {
    type Output = Result<Admission, StoreError>;

    fn next(&mut self) -> Next<'_, Self::Output> {
        match self.phase {
            Phase::Reserving if self.next < self.plans.len() => {
                let plan = &self.plans[self.next];
                let ticket = &self.admission.ticket;
                Next::Op(Op::Reserve {
                    key: Cow::Borrowed(&plan.key),
                    part: part(plan.tag, plan.scope, &ticket.who.tier),
                    estimate: Cow::Borrowed(&self.estimate),
                    downgraded: self.admission.downgrade.as_deref().map(Cow::Borrowed),
                    lease_id: self.lease_id,
                    now: self.now,
                })
            }
            Phase::Releasing(i) if i < self.admission.ticket.part_list().len() => {
                let ticket = &self.admission.ticket;
                Next::Op(settle(ticket, &ticket.part_list()[i], Actual::nothing(), self.now))
            }
            Phase::Reserving | Phase::Releasing(_) | Phase::Done => Next::Done(self.finish()),
        }
    }

    fn reply(&mut self, reply: Result<Reply, StoreError>) {
        match self.phase {
            Phase::Reserving => match reply {
                Ok(Reply::Reserved(r)) => self.record(r),
                Ok(_) => {
                    self.error = Some(unexpected());
                    self.phase = Phase::Releasing(0);
                }
                Err(e) => {
                    self.error = Some(e);
                    self.phase = Phase::Releasing(0);
                }
            },
            Phase::Releasing(i) => {
                if !matches!(reply, Ok(Reply::Settled(_))) {
                    // Its count waits for its window to end (and its lease for its TTL).
                    self.admission.release_failures += 1;
                }
                self.phase = Phase::Releasing(i + 1);
            }
            Phase::Done => {}
        }
    }
}

/// What settling a ticket came to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settled {
    /// Notify thresholds the settlement reached (webhook events).
    pub reached: Vec<Reached>,
    /// Keys that could not be settled: their reservations stay counted until their windows end,
    /// their leases until their TTL.
    pub failures: u32,
    /// The first failure, for the log.
    pub first_error: Option<StoreError>,
}

/// Settlement: every part of a ticket settled with the same [`Actual`] (or released with
/// [`Actual::nothing`]). A failing key does not stop the others.
pub struct Settling<'t> {
    ticket: &'t Ticket,
    actual: Actual,
    now: Timestamp,
    next: usize,
    out: Settled,
}

impl<'t> Settling<'t> {
    /// Settles every part of `ticket` with `actual`.
    pub fn new(ticket: &'t Ticket, actual: Actual, now: Timestamp) -> Self {
        Settling { ticket, actual, now, next: 0, out: Settled::default() }
    }
}

impl Machine for Settling<'_> {
    type Output = Settled;

    fn next(&mut self) -> Next<'_, Settled> {
        match self.ticket.part(self.next) {
            Some(p) => {
                self.next += 1;
                Next::Op(settle(self.ticket, p, self.actual, self.now))
            }
            None => Next::Done(std::mem::take(&mut self.out)),
        }
    }

    fn reply(&mut self, reply: Result<Reply, StoreError>) {
        let error = match reply {
            Ok(Reply::Settled(reached)) => {
                self.out.reached.extend(reached);
                return;
            }
            Ok(_) => unexpected(),
            Err(e) => e,
        };
        self.out.failures += 1;
        self.out.first_error.get_or_insert(error);
    }
}

/// Where every limit of `who` stands (the usage endpoint): one peek per key; the first failure
/// ends it. Built by [`Peeking::adjusting`], it applies an operator's [`Adjustment`] instead,
/// to `who`'s own (identity-scope) keys only — never the tier or global aggregates, nor an IP's,
/// which other identities share — and says where those limits stand afterwards.
pub struct Peeking<'a> {
    plans: Vec<KeyPlan<'a>>,
    tier: String,
    adjustment: Option<Adjustment>,
    now: Timestamp,
    next: usize,
    out: Result<Vec<LimitStatus>, StoreError>,
}

impl<'a> Peeking<'a> {
    /// Peeks every key `who` is counted under.
    pub fn new(set: &'a LimitSet, who: &Who, now: Timestamp) -> Self {
        Peeking { plans: set.plans(who), tier: who.tier.clone(), adjustment: None, now, next: 0, out: Ok(Vec::new()) }
    }

    /// Applies `adjustment` to `who`'s identity keys.
    pub fn adjusting(set: &'a LimitSet, who: &Who, adjustment: Adjustment, now: Timestamp) -> Self {
        let plans = set.plans(who).into_iter().filter(|p| p.scope == crate::limits::Scope::Identity).collect();
        Peeking { plans, tier: who.tier.clone(), adjustment: Some(adjustment), now, next: 0, out: Ok(Vec::new()) }
    }
}

impl Machine for Peeking<'_> {
    type Output = Result<Vec<LimitStatus>, StoreError>;

    fn next(&mut self) -> Next<'_, Self::Output> {
        match self.plans.get(self.next) {
            Some(plan) if self.out.is_ok() => {
                self.next += 1;
                let (key, part, now) = (Cow::Borrowed(plan.key.as_ref()), part(plan.tag, plan.scope, &self.tier), self.now);
                Next::Op(match &self.adjustment {
                    None => Op::Peek { key, part, now },
                    Some(a) => Op::Adjust { key, part, adjustment: Cow::Borrowed(a), now },
                })
            }
            _ => Next::Done(std::mem::replace(&mut self.out, Ok(Vec::new()))),
        }
    }

    fn reply(&mut self, reply: Result<Reply, StoreError>) {
        match (reply, &mut self.out) {
            (Ok(Reply::Statuses(s)), Ok(all)) => all.extend(s),
            (Ok(_), out) => *out = Err(unexpected()),
            (Err(e), out) => *out = Err(e),
        }
    }
}

/// The health of each of an alias's deployments (same order). A record that cannot be read is
/// healthy: health only ever steers, it never refuses on its own; `failed` says how many.
pub struct ReadingHealth<'d> {
    deployments: Vec<&'d str>,
    next: usize,
    out: (Vec<Health>, u32),
}

impl<'d> ReadingHealth<'d> {
    /// Reads the records of `deployments`.
    pub fn new(deployments: impl IntoIterator<Item = &'d str>) -> Self {
        ReadingHealth { deployments: deployments.into_iter().collect(), next: 0, out: (Vec::new(), 0) }
    }
}

impl Machine for ReadingHealth<'_> {
    /// The records, and how many could not be read.
    type Output = (Vec<Health>, u32);

    fn next(&mut self) -> Next<'_, Self::Output> {
        match self.deployments.get(self.next) {
            Some(d) => {
                self.next += 1;
                Next::Op(Op::HealthRead { deployment: Cow::Borrowed(d) })
            }
            None => Next::Done(std::mem::take(&mut self.out)),
        }
    }

    fn reply(&mut self, reply: Result<Reply, StoreError>) {
        match reply {
            Ok(Reply::Health(h)) => self.out.0.push(h),
            _ => {
                self.out.0.push(Health::default());
                self.out.1 += 1;
            }
        }
    }
}
