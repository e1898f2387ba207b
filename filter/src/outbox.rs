//! Calls the root context makes for the whole VM: webhook events and, with `store.redis`,
//! settlements and health reports. A request's context queues them ([`queue`]); the root
//! context posts them on its next tick ([`post`]) and hears their answers
//! ([`answered`]), which a call made from a request's context would not (the call dies with
//! the request).

use std::collections::HashMap;

use tollgate_core::fallback::Outcome;
use tollgate_core::gate;
use tollgate_core::limits::engine::Ticket;
use tollgate_core::limits::ledger::Actual;
use tollgate_core::ops::remote::{Done, Job};

use crate::metrics::Metric;
use crate::{abi, remote, Shared};

/// How soon queued calls are posted (the root context's tick while any wait): a settlement
/// gives its concurrency lease back this long, plus a round trip, after its stream ends. The
/// root ticks only while calls wait, so a short period costs nothing when idle.
pub const TICK_MS: u32 = 5;

/// A call waiting for the root context.
pub enum Outgoing {
    /// A threshold event for the webhook.
    Webhook(Vec<u8>),
    /// A settlement for the store service.
    Settle { ticket: Ticket, actual: Actual, now: u64 },
    /// An attempt's outcome for the store service.
    ReportHealth { deployment: String, outcome: Outcome, now: u64 },
}

/// What a posted call was, by its token.
pub enum Posted {
    Webhook,
    Settle { ticket: Ticket, now: u64 },
    ReportHealth,
}

/// The queue and the calls in flight.
#[derive(Default)]
pub struct Outbox {
    waiting: Vec<Outgoing>,
    in_flight: HashMap<u32, Posted>,
}

impl Outbox {
    /// Whether calls wait to be posted.
    pub fn has_waiting(&self) -> bool {
        !self.waiting.is_empty()
    }
}

/// Queues `call` and makes the root context tick within [`TICK_MS`]; without a tick, posts it
/// at once (its answer then may never be known).
pub fn queue(shared: &Shared, call: Outgoing) {
    let first = {
        let mut outbox = shared.outbox.borrow_mut();
        outbox.waiting.push(call);
        outbox.waiting.len() == 1
    };
    if !first {
        // The first waiting call already set the tick, due within TICK_MS: setting it again
        // would restart Envoy's timer, and steady traffic would keep pushing the tick back.
        return;
    }
    // Stopped first, so that the tick comes TICK_MS from now on every host: Envoy restarts a
    // running timer with the new period, older proxy-wasm hosts kept a running one's (the
    // watchdog's second).
    let _ = abi::set_tick_period(0);
    if abi::set_tick_period(TICK_MS).is_err() {
        post(shared);
    }
}

/// Posts every waiting call (the root context's tick).
pub fn post(shared: &Shared) {
    let waiting = std::mem::take(&mut shared.outbox.borrow_mut().waiting);
    for call in waiting {
        let (posted, token) = match call {
            Outgoing::Webhook(body) => (Posted::Webhook, post_webhook(shared, &body)),
            Outgoing::Settle { ticket, actual, now } => {
                let job = Job::Settle { ticket: ticket.clone(), actual, now };
                (Posted::Settle { ticket, now }, remote::dispatch(shared, job, remote::BACKGROUND_TIMEOUT_MS))
            }
            Outgoing::ReportHealth { deployment, outcome, now } => {
                (Posted::ReportHealth, remote::dispatch(shared, Job::ReportHealth { deployment, outcome, now }, remote::BACKGROUND_TIMEOUT_MS))
            }
        };
        match token {
            Ok(token) => {
                shared.outbox.borrow_mut().in_flight.insert(token, posted);
            }
            Err(s) => failed(shared, &posted, &format!("dispatch failed (status {})", s.0)),
        }
    }
}

fn post_webhook(shared: &Shared, body: &[u8]) -> Result<u32, abi::Status> {
    let Some(target) = shared.policy.notify.as_ref() else { return Err(abi::Status(0)) };
    let Some(cluster) = target.cluster.as_deref() else { return Err(abi::Status(0)) };
    let headers = [(":method", "POST"), (":path", target.path.as_str()), (":authority", target.authority.as_str()), ("content-type", "application/json")];
    abi::http_call(cluster, &headers, body, target.timeout_ms)
}

fn failed(shared: &Shared, posted: &Posted, why: &str) {
    match posted {
        Posted::Webhook => {
            shared.metrics.add(Metric::NotifyFailed);
            abi::log(abi::LOG_WARN, &format!("tollgate: webhook not delivered ({why}); the event is not retried"));
        }
        Posted::Settle { ticket, .. } => settle_failed(shared, ticket, why),
        Posted::ReportHealth => {
            shared.metrics.add(Metric::StoreFailures);
        }
    }
}

fn settle_failed(shared: &Shared, ticket: &Ticket, why: &str) {
    shared.metrics.add_n(Metric::SettleFailures, ticket.parts().count() as u64);
    abi::log(abi::LOG_WARN, &format!("tollgate: settling through the store service failed ({why}); the reservation stays counted until its window ends, the lease until its TTL"));
}

/// The store service's answer to a settlement of `ticket` at `now`, whichever context posted
/// it: failures counted, threshold events queued for the webhook.
pub fn settle_answered(shared: &Shared, ticket: &Ticket, now: u64, answer: Result<Done, String>) {
    match answer {
        Ok(Done::Settled { reached, failures }) => {
            shared.metrics.add_n(Metric::SettleFailures, u64::from(failures));
            let settled = tollgate_core::ops::machine::Settled { reached, failures, first_error: None };
            for event in gate::settlement(&shared.policy, ticket, settled, now).events {
                queue(shared, Outgoing::Webhook(event));
            }
        }
        Ok(Done::Failed { error }) => settle_failed(shared, ticket, &error),
        Ok(_) => settle_failed(shared, ticket, "another answer"),
        Err(why) => settle_failed(shared, ticket, &why),
    }
}

/// A posted call's answer (the root context's `on_http_call_response`).
pub fn answered(shared: &Shared, token: u32, num_headers: usize, body_size: usize) {
    let Some(posted) = shared.outbox.borrow_mut().in_flight.remove(&token) else { return };
    let status = remote::status(num_headers);
    match &posted {
        Posted::Webhook => match status {
            Some(200..=299) => shared.metrics.add(Metric::NotifySent),
            Some(code) => failed(shared, &posted, &format!("the webhook answered {code}")),
            None => failed(shared, &posted, "no answer"),
        },
        Posted::Settle { ticket, now } => settle_answered(shared, ticket, *now, remote::answer(num_headers, body_size)),
        Posted::ReportHealth => {
            if !matches!(remote::answer(num_headers, body_size), Ok(Done::Health { .. })) {
                failed(shared, &posted, "");
            }
        }
    }
}
