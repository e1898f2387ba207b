//! The downstream role: one client request, from its headers to its settlement. Each hook turns
//! host data into core inputs and applies core's plan; the [`Phase`] says where the request is.
//!
//! - `on_http_request_headers`: keeps the request headers for the gate and removes the ones that
//!   stay with Tollgate ([`gate::is_private_request_header`]). `GET /v1/tollgate/usage` is
//!   answered locally; a `POST /v1/chat/completions` waits for its body (a declared body over
//!   the tier's limit is refused at once with 413); anything else is admitted now.
//! - `on_http_request_body`, at the end of a chat body: the gate (identity, guards, estimate,
//!   reservation on every limit in shared data), then core's [`dispatch`]: the request rewritten
//!   for its provider, or passed through (with a stream asking for its usage), or planned over an
//!   alias's deployments, or answered at once.
//! - `on_http_response_headers` / `on_http_response_body`: core's [`Answer`] — the provider's
//!   account headers removed, the client's own `x-ratelimit-*`, warning and downgrade headers set,
//!   the body streamed through core chunk by chunk, or read whole and replaced.
//! - `on_log` (every stream ends here: completion, client cancel, upstream reset, timeout):
//!   settles by core's one ending rule ([`tollgate_core::ending`]), which also releases the
//!   concurrency lease.

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;
use tollgate_core::admin;
use tollgate_core::answer::{Answer, BodyPlan};
use tollgate_core::attempt::{self, Attempts};
use tollgate_core::ending::Ending;
use tollgate_core::fallback::Failure;
use tollgate_core::headers::{CLUSTER_HEADER, DEPLOYMENT_HEADER, DOWNGRADE_HEADER, RETRY_HEADER, WARNING_HEADER};
use tollgate_core::fault::ApiError;
use tollgate_core::forward::{self, Dispatch};
use tollgate_core::gate::{self, Admitted, Facts, Gate, Kind, Prepared, Refused};
use tollgate_core::fallback::Health;
use tollgate_core::limits::engine::Who;
use tollgate_core::ops::remote::{Done, Job};
use tollgate_core::StoreError;
use tollgate_core::limits::engine::Ticket;
use tollgate_core::limits::ledger::{Adjustment, LimitStatus};
use tollgate_core::ops::machine::{Peeking, ReadingHealth};
use tollgate_core::ops::sync;
use tollgate_core::render::{self, LocalResponse};
use tollgate_core::record::Record;
use tollgate_core::Policy;

use crate::handoff;
use crate::remote;
use crate::outbox::{self, Outgoing};
use crate::http::{self, Destination};
use crate::metrics::Metric;
use crate::{abi, host_error, Flavour, Shared, SharedData, WATCHDOG_MS};

/// What the answer's body is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
enum BodyMode {
    /// No answer yet.
    Waiting,
    /// Each chunk goes through core.
    Stream,
    /// Read whole, then replaced; `envoy`: the answer is Envoy's own (the provider was not
    /// reached), replaced by core's error for that failure.
    Buffer { status: u16, retry_after: Option<String>, envoy: Option<Failure> },
    /// Untouched.
    Pass,
    /// Done with.
    Done,
}

/// Binds `$facts`: core's [`Facts`] about this request (its headers, peer, `$now`, the VM's
/// secrets, the claims Envoy's `jwt_authn` verified).
macro_rules! facts {
    ($self:ident, $shared:ident, $now:expr, $facts:ident) => {
        let lookup = |name: &str| $self.header_value(name);
        let secrets = |name: &str| $shared.secret(name);
        let $facts = Facts { header: &lookup, peer_address: $self.peer.as_deref(), now_ms: $now, secrets: &secrets, claim: &jwt_claim };
    };
}

thread_local! {
    /// When a refused operator call was last logged (epoch ms; 0: never).
    static LAST_REFUSAL_LOG: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Where a request is.
enum Phase {
    /// Nothing (more) to do.
    Idle,
    /// A chat body is being read.
    ReadingBody,
    /// `store.redis`: the admission is at the store service (call `token`); the request waits.
    /// The body is kept to prepare the request again when the answer comes (the same facts
    /// give the same request).
    Admitting { token: u32, body: Vec<u8>, body_size: usize, now: u64, now_ns: u64, lease_id: u64 },
    /// `store.redis`: the usage endpoint's peek is at the store service.
    Peeking { token: u32, who: Who, now: u64 },
    /// An operator's POST: its body is being read (authorized already).
    OperatorBody { path: String },
    /// `store.redis`: an operator's adjustment or listing is at the store service.
    Operating { token: u32, call: admin::Request, now: u64 },
    /// Tollgate answered the request itself.
    Replied,
    /// Forwarded; the answer goes through core's pipeline.
    Forwarded { answer: Box<Answer>, body: BodyMode },
    /// Forwarded to an alias's aggregate cluster; each attempt is the upstream filter's, which
    /// names the deployment that answered. `headers`: the client's (rate limits, warning, a
    /// downgrade); `replacing`: no deployment served, the answer is being replaced.
    Alias { key: String, headers: Vec<(&'static str, String)>, replacing: bool },
}

/// One client request in the downstream role.
pub struct Downstream {
    shared: Shared,
    context_id: u32,
    /// The client's request headers as they arrived.
    headers: Vec<(String, String)>,
    peer: Option<String>,
    /// The stream's connection id, once read (`connection_id`).
    connection: Option<u64>,
    phase: Phase,
    /// What to settle when the request ends; `None` once settled (or never admitted).
    ticket: Option<Ticket>,
    /// `store.redis`: the settlement call in flight while the answer's last bytes wait
    /// ([`Self::settle_before_the_end`]): its token, what it settles, and when.
    settling: Option<(u32, Ticket, u64)>,
    /// The last time the host clock answered: a clock that fails later settles at this time,
    /// never at 0 (which would prune every live count on the key).
    last_now: u64,
    /// The usage record of an admitted request, published as the stream's filter state
    /// ([`RECORD_PROPERTY`]) after each step.
    record: Option<Box<Record>>,
}

/// The property (Envoy: filter state `wasm.tollgate.record`) holding the request's usage record
/// as one line of JSON, for access logs: `%FILTER_STATE(wasm.tollgate.record:PLAIN)%`.
pub const RECORD_PROPERTY: &str = "tollgate.record";

/// Publishes a usage record as the stream's [`RECORD_PROPERTY`]. Envoy runs the connection
/// manager's access loggers before a Wasm filter's `on_log`, so a record is published after
/// every step, written as if the request ended then.
fn publish(metrics: &crate::metrics::Metrics, record: &Record) {
    if let Err(s) = abi::set_property(RECORD_PROPERTY, &record.to_json()) {
        host_error(metrics, "publishing the usage record", s);
    }
}

/// A request's record is final: published, and its labelled metrics added.
fn finished(shared: &Shared, record: &Record) {
    publish(&shared.metrics, record);
    shared.metrics.emit(&tollgate_core::metrics::samples(record, &shared.policy));
}

impl Downstream {
    /// A new stream.
    pub fn new(shared: Shared, context_id: u32) -> Downstream {
        Downstream { shared, context_id, headers: Vec::new(), peer: None, connection: None, phase: Phase::Idle, ticket: None, settling: None, last_now: 0, record: None }
    }

    fn policy(&self) -> &Policy {
        &self.shared.policy
    }

    /// The host's time (epoch ms), or the last time it answered.
    fn now(&mut self) -> Option<u64> {
        match abi::now_ms() {
            Ok(t) => {
                self.last_now = self.last_now.max(t);
                Some(t)
            }
            Err(_) => (self.last_now > 0).then_some(self.last_now),
        }
    }

    /// A request header as Envoy's `get_header_map_value` gives it (the first of repeated
    /// headers), except `x-forwarded-for`, whose repeated lines form one list.
    fn header_value(&self, name: &str) -> Option<String> {
        let mut values = self.headers.iter().filter(|(k, _)| k == name).map(|(_, v)| v.as_str());
        let first = values.next()?;
        if name != "x-forwarded-for" {
            return Some(first.to_owned());
        }
        Some(std::iter::once(first).chain(values).collect::<Vec<_>>().join(", "))
    }

    /// Answers locally. After admission, settle first ([`Self::settle`]).
    fn reply(&mut self, response: &LocalResponse) -> Action {
        let headers: Vec<(&str, &str)> = response.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        match abi::send_local_response(u32::from(response.status), &headers, &response.body) {
            Ok(()) => {
                self.phase = Phase::Replied;
                Action::Pause
            }
            Err(s) => {
                // The host refused the local reply: let the request go rather than hang it.
                host_error(&self.shared.metrics, "send_local_response", s);
                self.phase = Phase::Idle;
                Action::Continue
            }
        }
    }

    /// Answers an admitted request locally: it was not sent, so nothing stays counted.
    fn refuse(&mut self, response: &LocalResponse) -> Action {
        self.settle(&Ending::NotSent);
        self.reply(response)
    }

    /// Settles the ticket (once) by core's ending rule and posts the webhook events.
    fn settle(&mut self, ending: &Ending) {
        let Some((ticket, now)) = self.take_settlement(ending) else { return };
        let shared = self.shared.clone();
        if shared.policy.remote_store.is_some() {
            // Off the request's path: the root context posts it and hears the answer.
            let actual = ending.actual(&shared.policy.limits, &ticket);
            outbox::queue(&shared, Outgoing::Settle { ticket, actual, now });
            return;
        }
        let settled = gate::finish(&shared.policy, &mut SharedData, &ticket, ending, now);
        shared.metrics.add_n(Metric::SettleFailures, u64::from(settled.failures));
        if let Some(e) = settled.error {
            abi::log(abi::LOG_WARN, &format!("tollgate: settling ({}) failed on {} key(s) ({}); those counts stay until their window ends", ending.label(), settled.failures, e.kind()));
        }
        self.notify(&settled.events);
    }

    /// The ticket to settle (taken: a request settles once) and the time, the provider's
    /// implausible usage reported; `None` when nothing is left to settle.
    fn take_settlement(&mut self, ending: &Ending) -> Option<(Ticket, u64)> {
        let ticket = self.ticket.take()?;
        // No time ever read for this request: it was never admitted with one.
        let now = self.now()?;
        if ending.implausible(&ticket) {
            self.shared.metrics.add(Metric::UsageImplausible);
            abi::log(abi::LOG_WARN, "tollgate: the provider reported more usage than the request can have used; charged up to the bound");
        }
        Some((ticket, now))
    }

    /// `store.redis`, a forwarded answer's last bytes in hand: when settling frees room (a
    /// lease, a token or cost reservation), settles before they leave, the request's own call
    /// holding them, so that a client starting its next request the moment this one ends finds
    /// its lease and tokens back (as on one Envoy, where settling is immediate). Otherwise, or
    /// if the call cannot be made, the root context posts the settlement, off the answer's path.
    fn settle_before_the_end(&mut self) -> Action {
        let Phase::Forwarded { answer, .. } = &self.phase else { return Action::Continue };
        let ending = answer.ending();
        if !self.ticket.as_ref().is_some_and(Ticket::frees_room) {
            // Request counts only: nothing a later admission waits for; off the answer's path.
            self.settle(&ending);
            return Action::Continue;
        }
        let Some((ticket, now)) = self.take_settlement(&ending) else { return Action::Continue };
        let shared = self.shared.clone();
        let actual = ending.actual(&shared.policy.limits, &ticket);
        let timeout = shared.policy.remote_store.as_ref().map_or(0, |s| s.timeout_ms).saturating_mul(4).clamp(100, remote::BACKGROUND_TIMEOUT_MS);
        match remote::dispatch(&shared, Job::Settle { ticket: ticket.clone(), actual, now }, timeout) {
            Ok(token) => {
                self.settling = Some((token, ticket, now));
                Action::Pause
            }
            Err(_) => {
                outbox::queue(&shared, Outgoing::Settle { ticket, actual, now });
                Action::Continue
            }
        }
    }

    /// Queues threshold events for the root context to post ([`crate::Shared::outbox`]).
    fn notify(&self, events: &[Vec<u8>]) {
        if self.policy().notify.is_none() {
            return;
        }
        for event in events {
            outbox::queue(&self.shared, Outgoing::Webhook(event.clone()));
        }
    }

    /// Runs the gate for this request (`body` for a chat completion, `None` for any other) and
    /// applies what core decides.
    fn admit(&mut self, body: Vec<u8>, body_size: usize) -> Action {
        let shared = self.shared.clone();
        let policy = &*shared.policy;
        // Without the time nothing can be counted: the gate runs against a store that fails,
        // so `store.on_failure` decides (allow: forwarded uncounted, translated as usual).
        let clock = self.now();
        if clock.is_none() {
            shared.metrics.add(Metric::HostErrors);
            abi::log(abi::LOG_WARN, &format!("tollgate: clock unavailable; policy says {:?}", policy.on_failure));
        }
        let now = clock.unwrap_or(self.last_now);
        let now_ns = abi::now_ns().unwrap_or(now.saturating_mul(1_000_000));
        let connection = self.connection_id();
        let lease_id = http::request_token(now_ns, connection, self.context_id);
        if let (Some(_), Some(store)) = (clock, policy.remote_store.as_ref()) {
            return self.admit_remotely(body, body_size, now, now_ns, lease_id, store.timeout_ms);
        }
        let outcome = {
            facts!(self, shared, now, facts);
            let mut no_clock = NoClock;
            let store: &mut dyn tollgate_core::CasStore = if clock.is_some() { &mut SharedData } else { &mut no_clock };
            gate::admit_chat(policy, &facts, &body, store, lease_id)
        };
        // The request is parsed: its bytes go before the upstream body is written, so a large
        // body does not sit in the VM's memory twice (a Wasm VM never gives memory back).
        drop(body);
        self.admitted(outcome, body_size, now, now_ns, lease_id, None)
    }

    /// `store.redis`: prepares the request and sends its admission (and an alias's health
    /// reads) to the store service; the request waits for [`Self::admission_answered`].
    fn admit_remotely(&mut self, body: Vec<u8>, body_size: usize, now: u64, now_ns: u64, lease_id: u64, timeout_ms: u32) -> Action {
        let shared = self.shared.clone();
        let policy = &*shared.policy;
        facts!(self, shared, now, facts);
        let pending = match gate::prepare_chat(policy, &facts, &body) {
            Prepared::Reply(response, record) => {
                shared.metrics.add(Metric::Invalid);
                if let Some(record) = record {
                    finished(&shared, &record);
                }
                return self.reply(&response);
            }
            Prepared::Admit(p) => p,
        };
        let health = pending.alias.map(|a| a.deployment_names().map(str::to_owned).collect()).unwrap_or_default();
        let job = Job::Admit { who: pending.who.clone(), estimate: pending.estimate.clone(), lease_id, now, health };
        match remote::dispatch(&shared, job, timeout_ms) {
            Ok(token) => {
                self.phase = Phase::Admitting { token, body, body_size, now, now_ns, lease_id };
                Action::Pause
            }
            Err(status) => {
                abi::log(abi::LOG_WARN, &format!("tollgate: the store service cannot be called (status {}); policy says {:?}", status.0, policy.on_failure));
                let outcome = pending.conclude(policy, &facts, Err(StoreError::Host("the store service cannot be called")));
                self.admitted(outcome, body_size, now, now_ns, lease_id, None)
            }
        }
    }

    /// `store.redis`: the store service's answer to the admission: the gate concludes as with
    /// a local store, and the request goes on (or is answered).
    fn admission_answered(&mut self, num_headers: usize, answer_size: usize) {
        let Phase::Admitting { body, body_size, now, now_ns, lease_id, .. } = std::mem::replace(&mut self.phase, Phase::Idle) else { return };
        let shared = self.shared.clone();
        let policy = &*shared.policy;
        let (result, health) = match remote::answer(num_headers, answer_size) {
            Ok(Done::Admitted { admission, health, unread }) => (Ok(admission), Some((health, unread))),
            Ok(Done::Failed { error }) => {
                abi::log(abi::LOG_WARN, &format!("tollgate: the store service failed: {error}"));
                (Err(StoreError::Host("the store service failed")), None)
            }
            Ok(_) => (Err(StoreError::Host("the store service answered another job")), None),
            Err(why) => {
                abi::log(abi::LOG_WARN, &format!("tollgate: {why}"));
                (Err(StoreError::Host("the store service did not answer")), None)
            }
        };
        let outcome = {
            facts!(self, shared, now, facts);
            match gate::prepare_chat(policy, &facts, &body) {
                Prepared::Admit(p) => p.conclude(policy, &facts, result),
                // The same body and facts prepared before: never reached.
                Prepared::Reply(response, record) => Gate::Reply { response, why: Refused::Invalid, store_error: None, record },
            }
        };
        drop(body);
        if self.admitted(outcome, body_size, now, now_ns, lease_id, health) == Action::Continue {
            if let Err(s) = abi::resume_request() {
                host_error(&shared.metrics, "resuming the request", s);
            }
        }
    }

    /// Applies what the gate decided: a local answer, or the request on its way (translated,
    /// to an alias's deployments, or as it is). `health`: an alias's deployment records when
    /// the store service read them with the admission.
    fn admitted(&mut self, outcome: Gate<'_>, body_size: usize, now: u64, now_ns: u64, lease_id: u64, health: Option<(Vec<Health>, u32)>) -> Action {
        let shared = self.shared.clone();
        let connection = self.connection_id();
        let mut admitted = match outcome {
            Gate::Reply { response, why, store_error, record } => {
                if let Some(record) = record {
                    finished(&shared, &record);
                }
                shared.metrics.add(match why {
                    Refused::Invalid => Metric::Invalid,
                    Refused::Limited => Metric::Denied,
                    Refused::StoreFailed => Metric::StoreFailures,
                });
                if let Some(e) = store_error {
                    abi::log(abi::LOG_WARN, &format!("tollgate: counter store failed ({}); policy denies", e.kind()));
                }
                return self.reply(&response);
            }
            Gate::Forward(a) => *a,
        };
        self.count_admission(&admitted);
        self.notify(&std::mem::take(&mut admitted.events));
        self.ticket = admitted.ticket.take();
        let id = http::response_id(now_ns, connection, self.context_id);
        let (dispatch, mut record) = forward::recorded(admitted, id, now_ns / 1_000_000_000);
        if !matches!(dispatch, Dispatch::Reply(_)) {
            // Should the client leave before an answer begins, this is how it ended.
            record.ended(&Ending::Abandoned, &shared.policy.limits, now);
        }
        publish(&shared.metrics, &record);
        self.record = Some(Box::new(record));
        match dispatch {
            Dispatch::Upstream { body, answer } => {
                if let Some(bytes) = body {
                    if let Err(s) = http::replace_request_body(&bytes, body_size) {
                        return self.host_failure("rewriting the request", s);
                    }
                }
                self.forwarded(answer)
            }
            Dispatch::Provider { provider, request, answer } => {
                let to = Destination { path: &request.path, authority: None, key: None, cluster: Some(&provider.cluster) };
                if let Err(s) = http::rewrite_request(&request, body_size, &to, Some(&self.headers)) {
                    return self.host_failure("rewriting the request", s);
                }
                shared.metrics.add(Metric::Translated);
                self.forwarded(answer)
            }
            Dispatch::Alias { alias, request, rewritten, mut headers, warning } => {
                if let Some(w) = &warning {
                    headers.push((WARNING_HEADER, w.header.clone()));
                }
                let alias = AliasRequest { alias, request: &request, rewritten, headers, warning };
                self.forward_alias(alias, body_size, now, lease_id ^ now_ns, health)
            }
            Dispatch::Reply(response) => {
                shared.metrics.add(Metric::Refused);
                self.refuse(&response)
            }
        }
    }

    fn count_admission(&self, admitted: &Admitted) {
        let m = &self.shared.metrics;
        if admitted.ticket.is_none() {
            m.add(Metric::StoreFailures);
            abi::log(abi::LOG_WARN, "tollgate: counter store failed; policy allows the request uncounted");
        } else {
            m.add(Metric::Allowed);
        }
        m.add_n(Metric::Evictions, u64::from(admitted.evicted));
        if admitted.warning.is_some() {
            m.add(Metric::Warnings);
        }
        if admitted.headers.iter().any(|(k, _)| *k == DOWNGRADE_HEADER) {
            m.add(Metric::Downgrades);
        }
    }

    fn forwarded(&mut self, answer: Answer) -> Action {
        self.phase = Phase::Forwarded { answer: Box::new(answer), body: BodyMode::Waiting };
        Action::Continue
    }

    fn host_failure(&mut self, what: &str, status: abi::Status) -> Action {
        host_error(&self.shared.metrics, what, status);
        self.refuse(&http::gateway_error().to_response())
    }

    /// Forwards an admitted request for a model alias: core plans the deployments' order from
    /// their shared health; the request goes to the aggregate cluster that tries them in that
    /// order (`x-tollgate-cluster: <alias>/<first>`), and core's attempts wait in the
    /// [`handoff`] table for the upstream filter, which translates each attempt. The body stays
    /// in OpenAI's format.
    fn forward_alias(&mut self, a: AliasRequest, body_size: usize, now: u64, seed: u64, read: Option<(Vec<Health>, u32)>) -> Action {
        let shared = self.shared.clone();
        let (health, unread) = match read {
            Some(read) => read,
            // The store service failed: every deployment counts as healthy.
            None if shared.policy.remote_store.is_some() => {
                let n = a.alias.deployment_names().count();
                (vec![Health::default(); n], n as u32)
            }
            None => sync::run(&mut SharedData, (&*shared.policy).into(), ReadingHealth::new(a.alias.deployment_names())),
        };
        if unread > 0 {
            // Unreadable health counts as healthy: fallback still protects the request.
            shared.metrics.add(Metric::StoreFailures);
        }
        let plan = match attempt::plan(a.alias, &health, now, seed) {
            Ok(p) => p,
            Err(mut response) => {
                shared.metrics.add(Metric::DeploymentsUnavailable);
                response.headers.extend(a.headers);
                return self.refuse(&response);
            }
        };
        let map = abi::HTTP_REQUEST_HEADERS;
        let mut ok = true;
        // The key both filters find the plan under: the request id, unless another request on
        // this thread already uses it (a client may send any x-request-id).
        let key = match self.header_value("x-request-id").filter(|k| !k.is_empty() && k.len() <= 128 && !handoff::contains(k)) {
            Some(k) => k,
            None => {
                let k = format!("tg-{seed:016x}");
                ok &= abi::set_header(map, "x-request-id", &k).is_ok();
                k
            }
        };
        if a.rewritten {
            let bytes = serde_json::to_vec(a.request).unwrap_or_default();
            ok &= http::replace_request_body(&bytes, body_size).is_ok();
        }
        ok &= abi::set_header(map, CLUSTER_HEADER, &plan.route_value()).is_ok();
        if !ok {
            return self.host_failure("routing the request to its deployments", abi::Status(0));
        }
        handoff::insert(key.clone(), handoff::Entry::new(Attempts::new(&plan, now, false), a.warning));
        self.phase = Phase::Alias { key, headers: a.headers, replacing: false };
        Action::Continue
    }

    /// The answer to an alias request. A deployment's answer (the upstream filter names it in
    /// `x-tollgate-deployment` and has translated and decorated it) goes to the client with the
    /// client's headers; an answer no deployment gave (Envoy's own after the last attempt failed
    /// to connect or timed out) or one marked for a retry Envoy did not make (attempts used up)
    /// is replaced by core's all-failed answer.
    fn alias_response_headers(&mut self, end_of_stream: bool) -> Action {
        let map = abi::HTTP_RESPONSE_HEADERS;
        let status = abi::header(map, ":status").ok().flatten().and_then(|v| std::str::from_utf8(&v).ok()?.parse::<u16>().ok());
        self.step_record(status);
        let Phase::Alias { headers, replacing, .. } = &mut self.phase else { return Action::Continue };
        let served = abi::header(map, DEPLOYMENT_HEADER).ok().flatten().is_some();
        let retry = abi::header(map, RETRY_HEADER).ok().flatten().is_some();
        let mut ok = !retry || abi::remove_header(map, RETRY_HEADER).is_ok();
        for (name, value) in headers.iter() {
            ok &= abi::set_header(map, name, value).is_ok();
        }
        if !ok {
            self.shared.metrics.add(Metric::HostErrors);
        }
        if served && !retry {
            return Action::Continue;
        }
        self.shared.metrics.add(Metric::AttemptsExhausted);
        *replacing = true;
        if end_of_stream {
            self.replace_exhausted(0, false);
            return Action::Continue;
        }
        Action::Pause
    }

    fn replace_exhausted(&mut self, body_size: usize, with_body: bool) {
        let Phase::Alias { key, headers, replacing } = &mut self.phase else { return };
        *replacing = false;
        let mut response = handoff::with(key, |e| e.attempts.exhausted()).unwrap_or_else(|| render::attempts_exhausted("", &[]));
        response.headers.extend(headers.iter().cloned());
        let ok = abi::remove_header(abi::HTTP_RESPONSE_HEADERS, DEPLOYMENT_HEADER).is_ok() && http::replace_answer(&response, body_size, with_body);
        if !ok {
            self.shared.metrics.add(Metric::HostErrors);
        }
        self.step_record(Some(response.status));
    }

    /// How an alias request ended, from what its attempts left in the hand-off table.
    fn alias_ending(key: &str) -> Ending {
        handoff::with(key, |e| match &e.served {
            Some(d) => Ending::Served { usage: e.usage.unwrap_or_default(), model: Some(d.clone()) },
            None if e.started > 0 => e.attempts.unserved(),
            None => Ending::Abandoned,
        })
        .unwrap_or(Ending::Abandoned)
    }

    /// The response head of a forwarded request: core's [`Answer::head`] applied.
    fn answer_headers(&mut self, end_of_stream: bool) -> Action {
        let metrics = std::rc::Rc::clone(&self.shared.metrics);
        let pairs = match http::header_pairs(abi::HTTP_RESPONSE_HEADERS) {
            Ok(p) => p,
            Err(s) => {
                host_error(&metrics, "reading the response headers", s);
                Vec::new()
            }
        };
        // Envoy always has a :status; without one, treat the answer as unreadable.
        let status = http::value(&pairs, ":status").and_then(|s| s.parse::<u16>().ok()).unwrap_or(502);
        let envoy = if status >= 500 { envoy_failure() } else { None };
        let retry_after = http::value(&pairs, "retry-after").map(str::to_owned);
        let Phase::Forwarded { answer, body } = &mut self.phase else { return Action::Continue };
        let head = answer.head(status, pairs.iter().map(|(k, _)| k.as_str()), retry_after.as_deref(), end_of_stream);
        if !http::apply_head(&head) {
            metrics.add(Metric::HostErrors);
        }
        if let Some(failure) = envoy {
            // Envoy's own answer (connect failure, reset, timeout): core's error for it.
            let response = answer.unreachable(failure);
            if end_of_stream {
                return self.replace_now(&response);
            }
            *body = BodyMode::Buffer { status, retry_after, envoy: Some(failure) };
            return Action::Pause;
        }
        match head.body {
            // The head reaches the client now: the record has its first byte (a buffered
            // answer's record is written once, when the answer is whole).
            BodyPlan::Stream => {
                *body = BodyMode::Stream;
                self.step_record(Some(status));
                Action::Continue
            }
            BodyPlan::Pass => {
                *body = BodyMode::Pass;
                self.step_record(Some(status));
                Action::Continue
            }
            BodyPlan::Buffer => {
                *body = BodyMode::Buffer { status, retry_after, envoy: None };
                Action::Pause
            }
            BodyPlan::Replace(response) => {
                *body = BodyMode::Done;
                self.record_answer();
                self.replace_now(&response)
            }
        }
    }

    /// Replaces an answer that has no body with `response` (which has one): as a local reply
    /// while the answer's headers are still the filter's; if the host refuses, status and
    /// headers only.
    fn replace_now(&mut self, response: &LocalResponse) -> Action {
        self.step_record(Some(response.status));
        let headers: Vec<(&str, &str)> = response.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        if abi::send_local_response(u32::from(response.status), &headers, &response.body).is_ok() {
            return Action::Continue;
        }
        if !http::replace_answer(response, 0, false) {
            self.shared.metrics.add(Metric::HostErrors);
        }
        Action::Continue
    }

    fn answer_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let metrics = std::rc::Rc::clone(&self.shared.metrics);
        let Phase::Forwarded { answer, body } = &mut self.phase else { return Action::Continue };
        match body {
            BodyMode::Stream => {
                let bytes = match abi::buffer(abi::HTTP_RESPONSE_BODY, 0, body_size) {
                    Ok(b) => b,
                    Err(s) => {
                        host_error(&metrics, "reading the response body", s);
                        Vec::new()
                    }
                };
                let mut out = Vec::with_capacity(bytes.len() + 64);
                answer.chunk(&bytes, &mut out);
                if end_of_stream {
                    answer.end(&mut out);
                    *body = BodyMode::Done;
                }
                if let Err(s) = abi::set_buffer(abi::HTTP_RESPONSE_BODY, 0, body_size, &out) {
                    host_error(&metrics, "writing the response body", s);
                }
                // An event that reported usage: the record moves with it (a client that leaves
                // before the end leaves the record as of its last usage).
                let usage = answer.usage();
                let moved = self.record.as_deref().is_some_and(|r| (r.input_tokens, r.output_tokens) != (usage.input, usage.output));
                if moved && !end_of_stream {
                    self.step_record(None);
                }
                if end_of_stream {
                    self.record_answer();
                    self.step_record(None);
                    if self.shared.policy.remote_store.is_some() {
                        return self.settle_before_the_end();
                    }
                }
                Action::Continue
            }
            BodyMode::Buffer { status, retry_after, envoy } => {
                if !end_of_stream {
                    return Action::Pause;
                }
                let response = match envoy {
                    Some(failure) => answer.unreachable(*failure),
                    None => {
                        let whole = abi::buffer(abi::HTTP_RESPONSE_BODY, 0, body_size).unwrap_or_else(|s| {
                            host_error(&metrics, "reading the response body", s);
                            Vec::new()
                        });
                        answer.whole(*status, retry_after.as_deref(), &whole)
                    }
                };
                *body = BodyMode::Done;
                if !http::replace_answer(&response, body_size, true) {
                    metrics.add(Metric::HostErrors);
                }
                let status = response.status;
                self.record_answer();
                self.step_record(Some(status));
                if self.shared.policy.remote_store.is_some() {
                    return self.settle_before_the_end();
                }
                Action::Continue
            }
            BodyMode::Pass | BodyMode::Waiting | BodyMode::Done => Action::Continue,
        }
    }

    /// The usage record after a step: the answer's head with `status` (its first byte's time),
    /// and how the request would end now; published.
    fn step_record(&mut self, status: Option<u16>) {
        let ending = match &self.phase {
            Phase::Forwarded { answer, .. } => answer.ending(),
            Phase::Alias { key, .. } => Self::alias_ending(key),
            _ => return,
        };
        let shared = self.shared.clone();
        if let Some(record) = self.update_record(status, &ending) {
            publish(&shared.metrics, record);
        }
    }

    /// The usage record as the request stands: an alias's attempts so far, the answer's head
    /// with `status` (its first byte's time), and how it would end now.
    fn update_record(&mut self, status: Option<u16>, ending: &Ending) -> Option<&Record> {
        let now = self.now().unwrap_or(self.last_now);
        let alias = match &self.phase {
            Phase::Alias { key, .. } => handoff::with(key, |e| (e.started, e.served.clone())),
            _ => None,
        };
        let record = self.record.as_mut()?;
        if let Some((started, served)) = alias {
            record.alias_attempts(&self.shared.policy.routes, started, served.as_deref());
        }
        if let Some(status) = status {
            record.answered(status, now);
        }
        record.ended(ending, &self.shared.policy.limits, now);
        Some(record)
    }

    /// Counts an answer's outcome and the tokens its provider reported (unknown is not added).
    fn record_answer(&self) {
        let Phase::Forwarded { answer, .. } = &self.phase else { return };
        let m = &self.shared.metrics;
        if matches!(answer.ending(), Ending::NotServed) || answer.stream_error().is_some() {
            m.add(Metric::UpstreamErrors);
        }
        let bound = self.ticket.as_ref().map(|t| t.bound).unwrap_or_default();
        let (usage, _) = bound.apply(&answer.usage());
        m.add_n(Metric::TokensInput, usage.input.unwrap_or(0));
        m.add_n(Metric::TokensOutput, usage.output.unwrap_or(0));
    }
}

/// A claim of the token Envoy's `jwt_authn` verified, from the stream's dynamic metadata
/// (`metadata.filter_metadata["envoy.filters.http.jwt_authn"][key]…`): a string claim's bytes
/// (Envoy serializes a string leaf as its UTF-8). Anything else — absent, a number, an object —
/// is no value.
fn jwt_claim(key: &str, path: &[String]) -> Option<String> {
    let mut full: Vec<&str> = vec!["metadata", "filter_metadata", "envoy.filters.http.jwt_authn", key];
    full.extend(path.iter().map(String::as_str));
    let bytes = abi::property(&full).ok().flatten()?;
    String::from_utf8(bytes).ok().filter(|v| !v.contains('\0'))
}

/// The store while the host clock fails: nothing can be counted without the time.
struct NoClock;

impl tollgate_core::CasStore for NoClock {
    fn load(&mut self, _: &str) -> Result<Option<(Vec<u8>, tollgate_core::Version)>, tollgate_core::StoreError> {
        Err(tollgate_core::StoreError::Host("the host clock is unavailable"))
    }
    fn store(&mut self, _: &str, _: &[u8], _: Option<tollgate_core::Version>) -> Result<tollgate_core::Written, tollgate_core::StoreError> {
        Err(tollgate_core::StoreError::Host("the host clock is unavailable"))
    }
}

/// An alias request's parts, as the gate admitted it.
struct AliasRequest<'a> {
    alias: &'a tollgate_core::fallback::Alias,
    request: &'a tollgate_core::openai::ChatRequest,
    rewritten: bool,
    headers: Vec<(&'static str, String)>,
    warning: Option<tollgate_core::message::Warning>,
}

/// Whether the answer in hand is Envoy's own because the provider was not reached, and how it
/// failed (Envoy's `response.code_details`, `source/common/router/router.cc`).
fn envoy_failure() -> Option<Failure> {
    let details = abi::property(&["response", "code_details"]).ok().flatten()?;
    let details = String::from_utf8_lossy(&details);
    if details.starts_with("upstream_response_timeout") || details.starts_with("upstream_per_try_timeout") {
        Some(Failure::Timeout)
    } else if details.starts_with("upstream_reset_before_response_started") {
        Some(if details.contains("connection_failure") { Failure::Connect } else { Failure::Reset })
    } else if details.starts_with("no_healthy_upstream") || details.starts_with("cluster_not_found") || details.starts_with("maintenance_mode") {
        Some(Failure::Connect)
    } else {
        None
    }
}

impl Context for Downstream {
    /// The store service's answer to this request's admission or usage peek (`store.redis`).
    fn on_http_call_response(&mut self, token_id: u32, num_headers: usize, body_size: usize, _num_trailers: usize) {
        if self.settling.as_ref().is_some_and(|(token, ..)| *token == token_id) {
            let Some((_, ticket, now)) = self.settling.take() else { return };
            outbox::settle_answered(&self.shared, &ticket, now, remote::answer(num_headers, body_size));
            if let Err(s) = abi::resume_response() {
                host_error(&self.shared.metrics, "resuming the response", s);
            }
            return;
        }
        match &self.phase {
            Phase::Admitting { token, .. } if *token == token_id => self.admission_answered(num_headers, body_size),
            Phase::Operating { token, .. } if *token == token_id => {
                let Phase::Operating { call, now, .. } = std::mem::replace(&mut self.phase, Phase::Idle) else { return };
                let done = remote::answer(num_headers, body_size);
                let response = match call {
                    admin::Request::List(listing) => {
                        let members = match done {
                            Ok(Done::Members { members }) => Ok(members),
                            _ => Err(StoreError::Host("the store service failed")),
                        };
                        admin::listed(&listing, members)
                    }
                    admin::Request::Adjust(who, adjustment) => {
                        let statuses = match done {
                            Ok(Done::Statuses { statuses }) => Ok(statuses),
                            _ => Err(StoreError::Host("the store service failed")),
                        };
                        self.adjusted(&who, &adjustment, statuses, now)
                    }
                    admin::Request::Usage(_) => render::store_unavailable(),
                };
                self.reply(&response);
            }
            Phase::Peeking { token, .. } if *token == token_id => {
                let Phase::Peeking { who, now, .. } = std::mem::replace(&mut self.phase, Phase::Idle) else { return };
                let statuses = match remote::answer(num_headers, body_size) {
                    Ok(Done::Statuses { statuses }) => Ok(statuses),
                    _ => Err(StoreError::Host("the store service failed")),
                };
                let response = gate::usage_body(&who, statuses, now);
                self.reply(&response);
            }
            _ => {}
        }
    }
}

impl Downstream {
    /// An operator API request's head (`tollgate_core::admin`): refused at once without the
    /// admin key (counted), else run — a POST once its body is read.
    fn operator_headers(&mut self, method: &str, path: &str, end_of_stream: bool) -> Action {
        let shared = self.shared.clone();
        let auth = self.header_value("authorization");
        // The admin key goes nowhere, whatever happens next (a refused local reply lets the
        // request continue).
        if auth.is_some() && abi::remove_header(abi::HTTP_REQUEST_HEADERS, "authorization").is_err() {
            shared.metrics.add(Metric::HostErrors);
        }
        let now = self.now().unwrap_or(self.last_now);
        if let Err(response) = admin::authorize(&shared.policy, auth.as_deref(), &|name| shared.secret(name)) {
            if response.status == 401 {
                shared.metrics.add(Metric::AdminUnauthorized);
                // Counted every time; logged at most once a minute (a client cannot flood the log).
                let due = LAST_REFUSAL_LOG.with(|last| {
                    let due = last.get() == 0 || now.saturating_sub(last.get()) >= 60_000;
                    if due {
                        last.set(now);
                    }
                    due
                });
                if due {
                    abi::log(abi::LOG_WARN, &format!("tollgate: {} (each counted in tollgate_admin_unauthorized; logged at most once a minute)", String::from_utf8_lossy(&admin::unauthorized_event(now))));
                }
            }
            return self.reply(&response);
        }
        let declared = self.header_value("content-length").and_then(|v| v.trim().parse::<u64>().ok());
        if method == "POST" && !self.bodiless(end_of_stream, declared) {
            return self.await_body(Phase::OperatorBody { path: path.to_owned() }, now);
        }
        self.operate(method, path, &[])
    }

    /// Whether the request has no body. nginx says end_of_stream false even without one, and
    /// calls no body hook for an empty one: there, an HTTP/1.1 request without a length or
    /// chunked framing has no body.
    fn bodiless(&self, end_of_stream: bool, declared: Option<u64>) -> bool {
        end_of_stream
            || (self.shared.flavour == Flavour::Ngx && (declared == Some(0) || (declared.is_none() && self.header_value("transfer-encoding").is_none())))
    }

    /// Waits in `phase` for the request's body.
    fn await_body(&mut self, phase: Phase, now: u64) -> Action {
        self.phase = phase;
        match self.shared.flavour {
            // nginx delivers the body before it proxies, headers still modifiable: the request
            // waits there without being held.
            Flavour::Ngx => Action::Continue,
            // Hold the headers (they may change once the body is read) while the body flows in:
            // Envoy needs `allow_on_headers_stop_iteration: true` for that; the watchdog answers
            // the request if the body never comes.
            Flavour::Envoy => {
                let mut w = self.shared.waiting.borrow_mut();
                if !w.proven {
                    w.held.push((self.context_id, now));
                }
                Action::Pause
            }
        }
    }

    /// A body reached the filter: the host delivers bodies to held headers; the watchdog stops
    /// watching this request.
    fn body_arrived(&self) {
        let mut w = self.shared.waiting.borrow_mut();
        w.proven = true;
        w.held.retain(|(c, _)| *c != self.context_id);
    }

    /// Runs an authorized operator request: on shared data here, or as a job of the store
    /// service (`store.redis`), whose answer [`Context::on_http_call_response`] renders.
    fn operate(&mut self, method: &str, path: &str, body: &[u8]) -> Action {
        let shared = self.shared.clone();
        let policy = &*shared.policy;
        let Some(now) = self.now() else { return self.reply(&render::store_unavailable()) };
        let call = match admin::route(policy, method, path, body, now) {
            Ok(call) => call,
            Err(response) => return self.reply(&response),
        };
        let Some(store) = policy.remote_store.as_ref() else {
            let response = match call {
                admin::Request::Usage(who) => gate::usage_body(&who, sync::run(&mut SharedData, policy.into(), Peeking::new(&policy.limits, &who, now)), now),
                admin::Request::Adjust(who, adjustment) => {
                    let statuses = sync::run(&mut SharedData, policy.into(), Peeking::adjusting(&policy.limits, &who, adjustment.clone(), now));
                    self.adjusted(&who, &adjustment, statuses, now)
                }
                admin::Request::List(_) => admin::unsupported_listing(),
            };
            return self.reply(&response);
        };
        let job = match &call {
            admin::Request::Usage(who) => Job::Peek { who: who.clone(), now },
            admin::Request::Adjust(who, adjustment) => Job::Adjust { who: who.clone(), adjustment: adjustment.clone(), now },
            admin::Request::List(l) => Job::List { key: l.key.clone(), after: l.after.clone(), limit: u32::try_from(l.limit + 1).unwrap_or(u32::MAX) },
        };
        match remote::dispatch(&shared, job, store.timeout_ms) {
            Ok(token) => {
                self.phase = match call {
                    admin::Request::Usage(who) => Phase::Peeking { token, who, now },
                    call => Phase::Operating { token, call, now },
                };
                Action::Pause
            }
            Err(_) => self.reply(&render::store_unavailable()),
        }
    }

    /// An adjustment's answer; its event logged and queued for `policy.notify`.
    fn adjusted(&self, who: &Who, adjustment: &Adjustment, statuses: Result<Vec<LimitStatus>, StoreError>, now: u64) -> LocalResponse {
        let (response, event) = admin::adjusted(who, adjustment, statuses, now);
        if let Some(event) = event {
            abi::log(abi::LOG_INFO, &String::from_utf8_lossy(&event));
            self.notify(&[event]);
        }
        response
    }

    /// The stream's connection id, read from the host once.
    fn connection_id(&mut self) -> u64 {
        *self.connection.get_or_insert_with(http::connection_id)
    }
}

impl HttpContext for Downstream {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let shared = self.shared.clone();
        let map = abi::HTTP_REQUEST_HEADERS;
        self.headers = http::header_pairs(map).unwrap_or_else(|s| {
            host_error(&shared.metrics, "reading the request headers", s);
            Vec::new()
        });
        self.peer = abi::property(&["source", "address"]).ok().flatten().map(|b| String::from_utf8_lossy(&b).into_owned());
        // Who the user is and what they pay is between the app and Tollgate, and only Tollgate
        // sets `x-tollgate-*` headers (which cluster, which attempt): none of them goes on.
        for (name, _) in &self.headers {
            if gate::is_private_request_header(&shared.policy, name) && abi::remove_header(map, name).is_err() {
                shared.metrics.add(Metric::HostErrors);
            }
        }
        let method = self.header_value(":method");
        let path = self.header_value(":path");
        if let (Some(method), Some(path)) = (&method, &path) {
            if admin::is_admin(path) {
                return self.operator_headers(method, path, end_of_stream);
            }
        }
        match gate::classify(method.as_deref(), path.as_deref()) {
            Kind::Usage => {
                let Some(now) = self.now() else { return self.reply(&render::store_unavailable()) };
                facts!(self, shared, now, facts);
                let Some(store) = shared.policy.remote_store.as_ref() else {
                    let response = gate::usage_report(&shared.policy, &facts, path.as_deref(), &mut SharedData);
                    return self.reply(&response);
                };
                let who = match gate::usage_subject(&shared.policy, &facts, path.as_deref()) {
                    Ok(who) => who,
                    Err(response) => return self.reply(&response),
                };
                match remote::dispatch(&shared, Job::Peek { who: who.clone(), now }, store.timeout_ms) {
                    Ok(token) => {
                        self.phase = Phase::Peeking { token, who, now };
                        Action::Pause
                    }
                    Err(_) => self.reply(&render::store_unavailable()),
                }
            }
            Kind::Models => {
                let now = self.now().unwrap_or(self.last_now);
                let response = {
                    facts!(self, shared, now, facts);
                    gate::models_list(&shared.policy, &facts)
                };
                self.reply(&response)
            }
            Kind::Unknown => {
                shared.metrics.add(Metric::Invalid);
                self.reply(&gate::unknown_surface(method.as_deref(), path.as_deref()))
            }
            Kind::Chat => {
                let declared = self.header_value("content-length").and_then(|v| v.trim().parse::<u64>().ok());
                let refused = {
                    let now = self.now().unwrap_or(0);
                    facts!(self, shared, now, facts);
                    gate::check_declared_length(&shared.policy, &facts, declared)
                };
                if let Some(response) = refused {
                    shared.metrics.add(Metric::Invalid);
                    return self.reply(&response);
                }
                if self.bodiless(end_of_stream, declared) {
                    // Admit now, which refuses it as the empty body it is.
                    return self.admit(Vec::new(), 0);
                }
                self.await_body(Phase::ReadingBody, self.last_now)
            }
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if let Phase::OperatorBody { .. } = &self.phase {
            self.body_arrived();
            if !end_of_stream {
                return if body_size > admin::MAX_BODY { self.reply(&admin::too_large()) } else { Action::Pause };
            }
            let Phase::OperatorBody { path } = std::mem::replace(&mut self.phase, Phase::Idle) else { return Action::Continue };
            let body = abi::buffer(abi::HTTP_REQUEST_BODY, 0, body_size.min(admin::MAX_BODY + 1)).unwrap_or_default();
            return self.operate("POST", &path, &body);
        }
        if !matches!(self.phase, Phase::ReadingBody) {
            return Action::Continue;
        }
        self.body_arrived();
        if !end_of_stream {
            // Buffered: the next call sees the whole body so far.
            return Action::Pause;
        }
        let body = match abi::buffer(abi::HTTP_REQUEST_BODY, 0, body_size) {
            Ok(b) => b,
            Err(s) => {
                host_error(&self.shared.metrics, "reading the request body", s);
                return self.reply(&http::gateway_error().to_response());
            }
        };
        self.admit(body, body_size)
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        if !matches!(self.phase, Phase::ReadingBody) {
            return Action::Continue;
        }
        // The body ended without end_of_stream: OpenAI clients never send trailers.
        self.shared.metrics.add(Metric::Invalid);
        self.reply(&ApiError::invalid(None, "Request trailers are not supported.").to_response())
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        match self.phase {
            Phase::Forwarded { .. } => self.answer_headers(end_of_stream),
            Phase::Alias { .. } => self.alias_response_headers(end_of_stream),
            Phase::ReadingBody => {
                // nginx proxied a request whose body never reached the filter (an empty chunked
                // body): it went unadmitted.
                self.shared.metrics.add(Metric::HostErrors);
                abi::log(abi::LOG_WARN, "tollgate: a chat request reached the upstream without its body reaching the filter");
                Action::Continue
            }
            Phase::Idle | Phase::Replied | Phase::Admitting { .. } | Phase::Peeking { .. } | Phase::OperatorBody { .. } | Phase::Operating { .. } => Action::Continue,
        }
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        match &self.phase {
            Phase::Forwarded { .. } => self.answer_body(body_size, end_of_stream),
            Phase::Alias { replacing: true, .. } => {
                if !end_of_stream {
                    return Action::Pause;
                }
                self.replace_exhausted(body_size, true);
                Action::Continue
            }
            Phase::Alias { .. } => {
                if end_of_stream {
                    self.step_record(None);
                }
                Action::Continue
            }
            Phase::Idle | Phase::ReadingBody | Phase::Replied | Phase::Admitting { .. } | Phase::Peeking { .. } | Phase::OperatorBody { .. } | Phase::Operating { .. } => Action::Continue,
        }
    }

    fn on_log(&mut self) {
        self.shared.waiting.borrow_mut().held.retain(|(c, _)| *c != self.context_id);
        // However the stream ended (completion, client cancel, upstream reset, timeout): what is
        // not settled yet is settled now, by the one rule.
        let ending = match &self.phase {
            Phase::Forwarded { answer, .. } => answer.ending(),
            Phase::Alias { key, .. } => Self::alias_ending(key),
            Phase::Idle | Phase::ReadingBody | Phase::Replied | Phase::Admitting { .. } | Phase::Peeking { .. } | Phase::OperatorBody { .. } | Phase::Operating { .. } => Ending::Abandoned,
        };
        if let (Phase::Forwarded { body: BodyMode::Stream, .. }, Ending::Served { .. }) = (&self.phase, &ending) {
            // A stream cut short: its tokens so far.
            self.record_answer();
        }
        // Envoy's access loggers have run (they read the record as last published): the metrics
        // read it as the request ended.
        let shared = self.shared.clone();
        if let Some(record) = self.update_record(None, &ending) {
            shared.metrics.emit(&tollgate_core::metrics::samples(record, &shared.policy));
        }
        self.record = None;
        self.settle(&ending);
        if let Phase::Alias { key, .. } = &self.phase {
            handoff::take(key);
        }
        self.phase = Phase::Idle;
    }
}

/// The root's tick: answers the chat requests whose headers have been held for
/// [`WATCHDOG_MS`] without any of their body arriving — the host does not deliver a body to a
/// filter holding the headers (Envoy without `allow_on_headers_stop_iteration: true`, e.g. an
/// Istio `WasmPlugin`). Nothing was admitted or forwarded: a 500 that says what to fix, never a
/// hang.
pub fn watchdog(shared: &Shared) {
    let Ok(now) = abi::now_ms() else { return };
    let expired: Vec<u32> = {
        let mut w = shared.waiting.borrow_mut();
        let (old, young): (Vec<_>, Vec<_>) = w.held.drain(..).partition(|(_, since)| now.saturating_sub(*since) >= WATCHDOG_MS);
        w.held = young;
        old.into_iter().map(|(c, _)| c).collect()
    };
    for context in expired {
        let first = !std::mem::replace(&mut shared.waiting.borrow_mut().reported, true);
        if first {
            abi::log(abi::LOG_ERROR, "tollgate: a chat request's body never reached the filter while its headers were held: set `allow_on_headers_stop_iteration: true` in the wasm filter's config (Istio: an EnvoyFilter, examples/istio/envoyfilter.yaml); such requests are answered with a 500");
        }
        shared.metrics.add(Metric::BodyNeverCame);
        let response = render::openai_error(
            500,
            "The gateway is misconfigured: its Tollgate filter cannot read request bodies (Envoy needs allow_on_headers_stop_iteration: true). The request was not sent.",
            "server_error",
            "gateway_misconfigured",
        );
        let headers: Vec<(&str, &str)> = response.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        if abi::set_effective_context(context).is_ok() {
            let _ = abi::send_local_response(u32::from(response.status), &headers, &response.body);
        }
    }
}
