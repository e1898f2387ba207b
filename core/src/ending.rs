//! How an admitted request ended, and the one rule that decides what it costs.
//!
//! Every host settles every admitted request exactly once, by this rule, whatever path it took
//! (a plain model, an alias and its fallbacks, a request passed through untranslated):
//!
//! | how it ended | requests | tokens and cost | concurrency lease |
//! |---|---|---|---|
//! | [`Ending::NotSent`]: Tollgate answered it itself after admission | released | released | released |
//! | [`Ending::NotServed`]: sent, but no provider served it | **counted** | released | released |
//! | [`Ending::Served`]: a provider answered it, in whole or in part | counted | what the provider reported; unknown → the reservation | released |
//! | [`Ending::Abandoned`]: the client left before any answer began | counted | the reservation | released |
//!
//! - What a provider did not serve costs no tokens and no cost: an error status (4xx or 5xx), an
//!   unreachable provider, a timeout or a reset before the answer, an answer that is not the
//!   provider's format, every deployment of an alias failing. Providers do not bill such calls.
//! - Its request still counts: it reached a provider (or was on its way), and request limits
//!   exist to bound how often that happens — a client retrying into an outage, or provoking
//!   provider errors on purpose, is held to its request limits like any other caller. A request
//!   Tollgate never sent (an unsupported parameter found after admission, every deployment
//!   cooling down, the host failing before forwarding) counts for nothing.
//! - Usage is believed up to what the request can have used ([`crate::limits::engine::UsageBound`]:
//!   the model's output ceiling per choice, a prompt within the largest context window): a
//!   provider reporting more (a fault, or 2^64−1 tokens) is charged the bound, and hosts count
//!   the event (`tollgate_usage_implausible`; the worker logs it).
//! - Unknown is not zero: when a provider served but reported no usage, or the client left
//!   before any answer (the provider may still have done — and billed — the work), the
//!   reservation is the charge.

use crate::limits::engine::{LimitSet, Ticket};
use crate::limits::ledger::Actual;
use crate::usage::Usage;

/// How an admitted request ended (see the module docs for what each costs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// Tollgate answered it itself after admission: nothing was sent to a provider.
    NotSent,
    /// It was sent and no provider served it: an error status, unreachable, a timeout or a reset
    /// before the answer, an answer that is not the provider's format, every deployment failed.
    NotServed,
    /// A provider served it (all of it, or a stream cut short).
    Served {
        /// What the provider reported (empty: nothing, the reservation stays the charge).
        usage: Usage,
        /// The deployment that served an alias (its price applies); `None`: the ticket's model.
        model: Option<String>,
    },
    /// The client went away before any answer began.
    Abandoned,
}

impl Ending {
    /// What to settle the ticket with, and the model whose price applies.
    pub fn actual(&self, limits: &LimitSet, ticket: &Ticket) -> Actual {
        match self {
            Ending::NotSent => Actual::nothing(),
            Ending::NotServed => Actual::not_served(),
            Ending::Abandoned => Actual::used(None, None, None),
            Ending::Served { usage, model } => {
                if usage.is_empty() {
                    return Actual::used(None, None, None);
                }
                let (usage, _) = ticket.bound.apply(usage);
                limits.actual(model.as_deref().or(ticket.model.as_deref()), &usage)
            }
        }
    }

    /// Whether the provider reported more than the request can have used ([`Ticket::bound`]):
    /// only the bound is charged; hosts count the event.
    pub fn implausible(&self, ticket: &Ticket) -> bool {
        match self {
            Ending::Served { usage, .. } => ticket.bound.apply(usage).1,
            _ => false,
        }
    }

    /// A metric / log label.
    pub fn label(&self) -> &'static str {
        match self {
            Ending::NotSent => "not_sent",
            Ending::NotServed => "not_served",
            Ending::Served { .. } => "served",
            Ending::Abandoned => "abandoned",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Policy;
    use crate::limits::engine::{Estimate, Who};
    use crate::ops::machine::{Admitting, Peeking, Settling};
    use crate::ops::sync::run;
    use crate::store::MemoryStore;

    const T0: u64 = 1_709_208_000_000;

    fn policy() -> Policy {
        Policy::from_json(
            br#"{"tier":{"default":"d"},"tiers":{"d":{"limits":[
                {"window":"day","requests":10},{"window":"day","total_tokens":1000},{"window":"day","cost_usd":1},{"concurrent":2}]}},
                "providers":{"p":{"kind":"openai"}},
                "models":{"cheap":{"provider":"p","model":"c"},"dear":{"provider":"p","model":"d"}},
                "prices":{"cheap":{"input":1,"output":1},"dear":{"input":10,"output":10}}}"#,
        )
        .unwrap()
    }

    /// Admits a request for `model` (100 + 200 tokens), ends it as `ending`, and returns what
    /// stays counted: [requests, tokens, cost µ$, in flight].
    fn charged(ending: Ending, model: &str) -> [u64; 4] {
        let p = policy();
        let mut store = MemoryStore::new();
        let who = Who { identity_key: "u".into(), ip_key: None, tier: "d".into() };
        let estimate = Estimate { model: Some(model.into()), input_tokens: 100, output_tokens: 200 };
        let a = run(&mut store, (&p).into(), Admitting::new(&p.limits, &who, &estimate, 1, T0)).unwrap();
        assert!(a.is_allowed());
        let actual = ending.actual(&p.limits, &a.ticket);
        let s = run(&mut store, (&p).into(), Settling::new(&a.ticket, actual, T0 + 1));
        assert_eq!(s.failures, 0);
        let used: Vec<u64> = run(&mut store, (&p).into(), Peeking::new(&p.limits, &who, T0 + 2)).unwrap().iter().map(|s| s.used).collect();
        [used[0], used[1], used[2], used[3]]
    }

    #[test]
    fn every_ending_is_charged_by_the_one_rule() {
        // Reserved: 1 request, 300 tokens, 300 × 1 µ$ (cheap), a lease.
        assert_eq!(charged(Ending::NotSent, "cheap"), [0, 0, 0, 0], "never sent: nothing counts");
        assert_eq!(charged(Ending::NotServed, "cheap"), [1, 0, 0, 0], "not served: the request counts, no tokens, no cost");
        assert_eq!(charged(Ending::Abandoned, "cheap"), [1, 300, 300, 0], "unknown: the reservation stays");
        let served = |input, output, model: Option<&str>| Ending::Served {
            usage: Usage { input: Some(input), output: Some(output), ..Usage::default() },
            model: model.map(str::to_owned),
        };
        assert_eq!(charged(served(10, 5, None), "cheap"), [1, 15, 15, 0], "what the provider reported");
        assert_eq!(charged(served(10, 5, Some("dear")), "cheap"), [1, 15, 150, 0], "priced for the deployment that served");
        assert_eq!(
            charged(Ending::Served { usage: Usage::default(), model: None }, "cheap"),
            [1, 300, 300, 0],
            "served with no usage reported: the reservation is the charge"
        );
    }

    #[test]
    fn absurd_usage_is_believed_up_to_the_bound_and_flagged() {
        let absurd = Ending::Served { usage: Usage { input: Some(u64::MAX), output: Some(u64::MAX), cached_read: Some(u64::MAX), ..Usage::default() }, model: None };
        let p = policy();
        let who = Who { identity_key: "u".into(), ip_key: None, tier: "d".into() };
        let mut ticket = Ticket::new(&who, Some("cheap".into()));
        ticket.bound.output = 4096;
        assert!(absurd.implausible(&ticket));
        let a = absurd.actual(&p.limits, &ticket);
        assert_eq!(a.get(crate::limits::Metric::InputTokens), Some(crate::limits::engine::MAX_BELIEVED_INPUT_TOKENS));
        assert_eq!(a.get(crate::limits::Metric::OutputTokens), Some(4096));
        let plain = Ending::Served { usage: Usage { input: Some(10), output: Some(4096), ..Usage::default() }, model: None };
        assert!(!plain.implausible(&ticket));
        assert!(!Ending::Abandoned.implausible(&ticket));
        // Settled: the bound (a prompt of 10 M, the default output bound), not a saturated counter.
        let bound = crate::limits::engine::MAX_BELIEVED_INPUT_TOKENS + crate::guard::MAX_OUTPUT_RESERVATION * crate::guard::MAX_N;
        assert_eq!(charged(absurd, "cheap")[1], bound);
        assert!(bound < u64::MAX / 1_000_000);
    }
}
