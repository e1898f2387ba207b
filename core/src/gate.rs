//! The gate: everything that happens to a request before it is forwarded, and the accounting
//! when it ends — one sans-IO flow every host (the filter, the worker, the simulator) drives.
//!
//! A chat completion (`POST /v1/chat/completions`), once its body is complete:
//! 1. parse the body (400), route its model (404) when the policy maps models;
//! 2. resolve who is asking ([`crate::identity`]: signed header, header, `user`, API key,
//!    session, client IP) and the tier (401 for a bad signed token);
//! 3. the tier's abuse guards ([`crate::guard`]: 413 body size, 400 model/messages/max_tokens/
//!    prompt length);
//! 4. estimate: prompt tokens from the body, output = the request's max tokens (capped by the
//!    tier) or a default — and reserve them with every applicable limit
//!    ([`crate::limits::engine::admit`]): 429 with the tier's localized message when a limit
//!    refuses;
//! 5. apply soft-limit actions: a downgrade model, `max_tokens` capped to the reservation when
//!    the tier has `cap_output`, the warning header and body object, webhook events.
//!
//! `GET /v1/tollgate/usage` answers the caller's own usage, `GET /v1/models` the models its tier
//! may use; every other method and path is refused unforwarded and uncounted ([`Kind`]).
//! [`finish`] settles a request when it ends, however it ends.

use serde_json::{json, Value};

use crate::config::{FailureMode, Policy, TierRules};
use crate::fallback::Alias;
use crate::guard::{estimate_prompt_tokens, output_reservation};
use crate::identity::{RequestFacts, Subject};
use crate::limits::engine::{binding, Admission, Estimate, Ticket, Who};
use crate::ending::Ending;
use crate::ops::machine::{Admitting, Peeking, Settled, Settling};
use crate::ops::sync;
use crate::limits::ledger::{LimitStatus, Reached, Verdict};
use crate::limits::Metric;
use crate::message::{self, LimitFacts, MessageKind};
use crate::openai::ChatRequest;
use crate::record::{About, Decision, Reason, Record};
use crate::render::{self, LocalResponse};
use crate::routing::Route;
use crate::store::{CasStore, StoreError};
use crate::fault::ApiError;

pub(crate) const CHAT_PATH: &str = "/v1/chat/completions";
pub(crate) const USAGE_PATH: &str = "/v1/tollgate/usage";
pub(crate) const MODELS_PATH: &str = "/v1/models";
use crate::headers::{DOWNGRADE_HEADER, UPGRADE_HEADER};

/// What kind of request this is, from its method and path.
///
/// Only the surfaces Tollgate meters or answers itself exist; every other request is refused
/// before anything is counted or forwarded ([`unknown_surface`]), so no path reaches a provider
/// unmetered. The one normalization: the query string (from the first `?`) and a fragment are
/// ignored; the rest must equal the surface's path byte for byte — a trailing slash, a `;`
/// parameter, percent-encoding, doubled slashes, dot segments or another case make a path no
/// surface has. (The worker's runtime resolves dot segments before Tollgate sees the URL, and
/// forwards what it resolved.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `POST /v1/chat/completions`: admitted once its body is read.
    Chat,
    /// `GET /v1/tollgate/usage`: the caller's usage, answered locally.
    Usage,
    /// `GET /v1/models`: the models the caller's tier may ask for, answered locally.
    Models,
    /// Any other method or path: [`unknown_surface`] answers it; nothing is counted or sent.
    Unknown,
}

/// The path without its query string and fragment.
fn path_only(path: &str) -> &str {
    path.split(['?', '#']).next().unwrap_or(path)
}

/// What kind of request a method and path make (see [`Kind`]).
pub fn classify(method: Option<&str>, path: Option<&str>) -> Kind {
    match (method, path.map(path_only)) {
        (Some("POST"), Some(CHAT_PATH)) => Kind::Chat,
        (Some("GET"), Some(USAGE_PATH)) => Kind::Usage,
        (Some("GET"), Some(MODELS_PATH)) => Kind::Models,
        _ => Kind::Unknown,
    }
}

/// The answer to a [`Kind::Unknown`] request, in OpenAI's format: 405 with `allow` for a
/// surface's path with another method, else 404. The path is quoted (at most 200 bytes of it).
pub fn unknown_surface(method: Option<&str>, path: Option<&str>) -> LocalResponse {
    let method = method.unwrap_or("");
    let path = path.unwrap_or("");
    let allowed = match path_only(path) {
        CHAT_PATH => Some("POST"),
        USAGE_PATH | MODELS_PATH => Some("GET"),
        _ => None,
    };
    let mut end = path.len().min(200);
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    let shown = &path[..end];
    let served = "this gateway serves POST /v1/chat/completions, GET /v1/models and GET /v1/tollgate/usage";
    match allowed {
        Some(allow) => {
            let mut r = render::openai_error(405, &format!("Method {method} is not allowed on {shown} ({served})."), "invalid_request_error", "method_not_allowed");
            r.headers.push(("allow", allow.to_owned()));
            r
        }
        None => render::openai_error(404, &format!("Invalid URL ({method} {shown}): {served}."), "invalid_request_error", "unknown_url"),
    }
}

/// `GET /v1/models`: the models and aliases the caller's tier may ask for, in OpenAI's list
/// format. Counts nothing. A policy without a `models` map does not know which models its
/// upstream serves: 404.
pub fn models_list(policy: &Policy, facts: &Facts) -> LocalResponse {
    if !policy.routes.is_enabled() {
        return render::openai_error(404, "This gateway has no model list: its policy maps no models.", "invalid_request_error", "unknown_url");
    }
    let subject = match resolve(policy, facts, None) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let guards = &policy.rules(&subject.tier).guards;
    let names = policy.routes.model_names().chain(policy.routes.aliases().map(|a| a.name.as_str()));
    let data: Vec<Value> = names
        .filter(|name| guards.models().is_none_or(|allowed| allowed.iter().any(|m| m == name)))
        .map(|name| json!({ "id": name, "object": "model", "created": 0, "owned_by": "tollgate" }))
        .collect();
    LocalResponse {
        status: 200,
        headers: vec![("content-type", "application/json".to_owned()), ("cache-control", "no-store".to_owned())],
        body: serde_json::to_vec(&json!({ "object": "list", "data": data })).unwrap_or_default(),
    }
}

/// What the host knows about a request.
pub struct Facts<'a> {
    /// A request header's value (lower-case name).
    pub header: &'a dyn Fn(&str) -> Option<String>,
    /// Envoy's `source.address`; the worker's `cf-connecting-ip`.
    pub peer_address: Option<&'a str>,
    /// The host's clock, in epoch milliseconds.
    pub now_ms: u64,
    /// A host secret's bytes by name (signed identity tokens).
    pub secrets: &'a dyn Fn(&str) -> Option<Vec<u8>>,
    /// A claim of a token the host verified (Envoy's `jwt_authn`), by its
    /// `payload_in_metadata` key and path; [`crate::identity::no_claims`] elsewhere.
    pub claim: &'a dyn Fn(&str, &[String]) -> Option<String>,
}

use crate::message::Warning;

/// A request that goes on to the provider.
#[derive(Debug)]
pub struct Admitted<'p> {
    /// The chat request as it must be forwarded (model after a downgrade, capped max tokens).
    pub request: ChatRequest,
    /// Whether `request` differs from the client's body (hosts that do not translate must
    /// then replace the body).
    pub rewritten: bool,
    /// Where it goes, when the policy maps models (`None` for an alias).
    pub route: Option<Route<'p>>,
    /// The alias that serves it (its deployments are tried per `crate::fallback::choose`).
    pub alias: Option<&'p Alias>,
    /// What to settle when the request ends (empty when the store failed and the policy
    /// allowed the request anyway).
    pub ticket: Option<Ticket>,
    /// Headers for the client's response.
    pub headers: Vec<(&'static str, String)>,
    /// The warning a soft limit asks the response to carry, if one was reached.
    pub warning: Option<Warning>,
    /// Webhook event bodies to post.
    pub events: Vec<Vec<u8>>,
    /// The requester's tier.
    pub tier: String,
    /// Members evicted from full slots, and releases that failed.
    pub evicted: u32,
    /// The usage record as the gate started it (the host reports the rest: [`Record::sent`],
    /// [`Record::answered`], [`Record::ended`]).
    pub record: Record,
}

/// Why a request was answered locally (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Bad body, unknown model, guards, identity token.
    Invalid,
    /// A limit said no.
    Limited,
    /// The counter store failed and the policy denies.
    StoreFailed,
}

/// What the gate decided for a request: forward it, or answer it locally.
#[derive(Debug)]
pub enum Gate<'p> {
    /// Forward it to the provider.
    Forward(Box<Admitted<'p>>),
    /// Answer it locally.
    Reply {
        /// The answer.
        response: LocalResponse,
        /// Why the request was refused.
        why: Refused,
        /// The counter store's failure, when the refusal is the policy's answer to it.
        store_error: Option<StoreError>,
        /// The usage record, once the subject was known (not for a body that cannot be read).
        record: Option<Box<Record>>,
    },
}

fn reply(response: LocalResponse, why: Refused, record: Option<Box<Record>>) -> Gate<'static> {
    Gate::Reply { response, why, store_error: None, record }
}

fn resolve(policy: &Policy, facts: &Facts, user: Option<&str>) -> Result<Subject, LocalResponse> {
    let req = RequestFacts { header: facts.header, user_field: user, peer_address: facts.peer_address, now_ms: facts.now_ms, claim: facts.claim };
    policy.identity.resolve(&req, facts.secrets).map_err(|e| e.response())
}

fn who(subject: &Subject) -> Who {
    Who { identity_key: subject.key.clone(), ip_key: subject.ip_key.clone(), tier: subject.tier.clone() }
}

/// Before the body is read: a declared body larger than the tier allows is refused at once.
/// (The tier comes from headers only here; the check is repeated on the real body.)
pub fn check_declared_length(policy: &Policy, facts: &Facts, content_length: Option<u64>) -> Option<LocalResponse> {
    let len = content_length?;
    if !policy.limits_body_size() {
        // Nothing to check: spare resolving the identity (hashing, a signature) twice.
        return None;
    }
    let subject = resolve(policy, facts, None).ok()?;
    policy.rules(&subject.tier).guards.check_body_size(len).err().map(|e| e.to_response())
}

/// A request ready for admission: who is counted, and for what.
#[derive(Debug)]
pub struct Pending<'p> {
    /// Who the request is counted for.
    pub who: Who,
    /// What the request is estimated to use.
    pub estimate: Estimate,
    request: ChatRequest,
    route: Option<Route<'p>>,
    /// The alias asked for (`route` is then `None`).
    pub alias: Option<&'p Alias>,
    /// The usage record as the gate started it.
    record: Record,
}

/// The outcome of preparing a request: admit it, or answer it now.
#[derive(Debug)]
pub enum Prepared<'p> {
    /// Run it through the limits.
    Admit(Box<Pending<'p>>),
    /// Bad body, unknown model, a guard, a bad identity token ([`Refused::Invalid`]); the usage
    /// record once the subject was known (a guard's refusal).
    Reply(LocalResponse, Option<Box<Record>>),
}

/// Prepares a complete chat completion body: parse, route, identify, guard, estimate.
pub fn prepare_chat<'p>(policy: &'p Policy, facts: &Facts, body: &[u8]) -> Prepared<'p> {
    let request: ChatRequest = match serde_json::from_slice(body) {
        Ok(r) => ChatRequest { wire_len: crate::openai::WireLen(body.len()), ..r },
        Err(e) => return Prepared::Reply(ApiError::unreadable_body(&e).to_response(), None),
    };
    let mut route = None;
    let mut alias = None;
    if policy.routes.is_enabled() {
        match (policy.routes.route(&request.model), policy.routes.alias(&request.model)) {
            (Some(r), _) => route = Some(r),
            (None, Some(a)) => alias = Some(a),
            (None, None) => return Prepared::Reply(ApiError::model_not_found(&request.model).to_response(), None),
        }
    }
    let subject = match resolve(policy, facts, request.user.as_deref()) {
        Ok(s) => s,
        Err(r) => return Prepared::Reply(r, None),
    };
    let rules = policy.rules(&subject.tier);
    let prompt = estimate_prompt_tokens(&request);
    let checked = crate::guard::check_choices(&request)
        .and_then(|_| rules.guards.check_body_size(body.len() as u64))
        .and_then(|_| rules.guards.check(&request, prompt));
    let about = About {
        identity: &subject.key,
        source: subject.source.label(),
        api_key: subject.api_key.as_deref(),
        tier: &subject.tier,
        model: &request.model,
        stream: request.is_stream(),
    };
    let record = Record::new(&about, facts.now_ms, Decision::Allowed);
    if let Err(e) = checked {
        let response = e.to_response();
        let record = record.refused(response.status, Reason::Invalid, None);
        return Prepared::Reply(response, Some(Box::new(record)));
    }
    let model_default = match (&route, alias) {
        (Some(r), _) => r.target.default_max_tokens,
        (None, Some(a)) => policy.routes.alias_default_max_tokens(a),
        (None, None) => None,
    };
    let ceiling = policy.routes.output_ceiling(&request.model);
    let output = output_reservation(&request, &rules.guards, model_default, ceiling);
    let estimate = Estimate { model: Some(request.model.clone()), input_tokens: prompt, output_tokens: output };
    Prepared::Admit(Box::new(Pending { who: who(&subject), estimate, request, route, alias, record }))
}

impl<'p> Pending<'p> {
    /// Applies the admission's outcome: a 429 (localized), or the request to forward with its
    /// soft-limit actions applied.
    pub fn conclude(self, policy: &'p Policy, facts: &Facts, result: Result<Admission, StoreError>) -> Gate<'p> {
        let Pending { who, estimate, request, mut route, mut alias, mut record } = self;
        let rules = policy.rules(&who.tier);
        let admission = match result {
            Ok(a) => a,
            Err(e) => return store_failed(policy, e, request, route, alias, who.tier, record),
        };
        if let Some(response) = refusal(&admission, rules, facts) {
            let limit = match &admission.verdict {
                Verdict::Denied { status, .. } | Verdict::TooLarge { status, .. } => Some(status.name.as_str()),
                Verdict::Allowed => None,
            };
            let record = record.refused(response.status, Reason::Limit, limit);
            return reply(response, Refused::Limited, Some(Box::new(record)));
        }
        if let Some(w) = admission.warnings.iter().max_by_key(|w| (w.threshold, w.status.percent())) {
            record.decision = Decision::Warned;
            record.limit = Some(w.status.name.clone());
        }
        let downgrade = admission.ticket.model.clone().filter(|m| *m != request.model);
        if let Some(m) = &downgrade {
            record.decision = Decision::Downgraded;
            record.served_model = Some(m.clone());
        }
        let mut admission = admission;
        let ceiling = downgrade.as_deref().map_or(0, |m| policy.routes.output_ceiling(m)).max(policy.routes.output_ceiling(&request.model));
        admission.ticket.bound.output = ceiling.saturating_mul(crate::guard::choices(&request));
        let mut admitted = admitted(policy, admission, rules, facts, who.tier.clone(), request, record);
        let request = &mut admitted.request;
        let mut rewritten = false;
        if let Some(model) = downgrade {
            // A downgrade: the ticket already prices the model that serves the request (an
            // alias at its most expensive deployment).
            if let Some(r) = policy.routes.route(&model) {
                route = Some(r);
                alias = None;
            } else if let Some(a) = policy.routes.alias(&model) {
                alias = Some(a);
                route = None;
            }
            admitted.headers.push((DOWNGRADE_HEADER, model.clone()));
            request.model = model;
            rewritten = true;
        }
        if rules.cap_output && request.max_completion_tokens.is_none() && request.max_tokens.is_none() {
            let per_choice = estimate.output_tokens / crate::guard::choices(request).max(1);
            request.max_tokens = Some(per_choice.max(1));
            rewritten = true;
        }
        admitted.rewritten = rewritten;
        admitted.route = route;
        admitted.alias = alias;
        Gate::Forward(Box::new(admitted))
    }
}

/// Prepare, admit against a [`CasStore`], conclude: the whole gate for a chat body.
pub fn admit_chat<'p, S: CasStore + ?Sized>(policy: &'p Policy, facts: &Facts, body: &[u8], store: &mut S, lease_id: u64) -> Gate<'p> {
    run(policy, facts, prepare_chat(policy, facts, body), store, lease_id)
}

fn run<'p, S: CasStore + ?Sized>(policy: &'p Policy, facts: &Facts, prepared: Prepared<'p>, store: &mut S, lease_id: u64) -> Gate<'p> {
    match prepared {
        Prepared::Reply(r, record) => reply(r, Refused::Invalid, record),
        Prepared::Admit(p) => {
            let result = sync::run(store, policy.into(), Admitting::new(&policy.limits, &p.who, &p.estimate, lease_id, facts.now_ms));
            p.conclude(policy, facts, result)
        }
    }
}

fn store_failed<'p>(policy: &Policy, e: StoreError, request: ChatRequest, route: Option<Route<'p>>, alias: Option<&'p Alias>, tier: String, record: Record) -> Gate<'p> {
    match policy.on_failure {
        FailureMode::Deny => {
            let response = render::store_unavailable();
            let record = record.refused(response.status, Reason::StoreFailed, None);
            Gate::Reply { response, why: Refused::StoreFailed, store_error: Some(e), record: Some(Box::new(record)) }
        }
        FailureMode::Allow => Gate::Forward(Box::new(Admitted {
            request,
            rewritten: false,
            route,
            alias,
            ticket: None,
            headers: vec![],
            warning: None,
            events: vec![],
            tier,
            evicted: 0,
            // Forwarded uncounted: the record says why.
            record: Record { reason: Some(Reason::StoreFailed), ..record },
        })),
    }
}

/// The facts about a limit for headers and JSON objects (machine names).
fn facts_of<'a>(s: &'a LimitStatus, now_ms: u64) -> LimitFacts<'a> {
    LimitFacts {
        metric: s.metric.name(),
        window: match (s.window, s.metric) {
            (Some(w), _) => w.name(),
            (None, Metric::Concurrent) => "at once",
            (None, _) => "rate",
        },
        limit: s.limit,
        used: s.used,
        reset_at_ms: now_ms.saturating_add(s.reset_ms),
        now_ms,
    }
}

fn header(facts: &Facts, name: &str) -> Option<String> {
    (facts.header)(name)
}

/// The same facts for a message a person reads: cost is counted in integer micro-dollars, so
/// the text says so.
fn human_facts<'a>(s: &'a LimitStatus, now_ms: u64) -> LimitFacts<'a> {
    let mut lf = facts_of(s, now_ms);
    if s.metric == Metric::CostMicros {
        lf.metric = "cost (micro-USD)";
    }
    lf
}

/// The 429 for a refused admission (`None` when it was admitted).
fn refusal(admission: &Admission, rules: &TierRules, facts: &Facts) -> Option<LocalResponse> {
    let (status, retry_after_ms, requested) = match &admission.verdict {
        Verdict::Allowed => return None,
        Verdict::Denied { status, retry_after_ms } => (status, Some(*retry_after_ms), None),
        Verdict::TooLarge { status, requested } => (status, None, Some(*requested)),
    };
    let accept_language = header(facts, "accept-language");
    let lf = facts_of(status, facts.now_ms);
    let kind = match status.metric {
        Metric::Requests | Metric::Concurrent => "requests",
        Metric::CostMicros => "cost",
        Metric::InputTokens | Metric::OutputTokens | Metric::TotalTokens => "tokens",
    };
    let rendered = match requested {
        Some(requested) => message::Rendered {
            text: format!(
                "Request too large for your plan's {} limit: Limit {}, Requested {}. Reduce the prompt or max_tokens.",
                status.name, status.limit, requested
            ),
            locale: "en".to_owned(),
        },
        None => rules.messages.render(MessageKind::Block, accept_language.as_deref(), &human_facts(status, facts.now_ms)),
    };
    let text = rendered.text.clone();
    let mut response = render::openai_error(429, &text, kind, "rate_limit_exceeded");
    // The `tollgate` object rides along when the tier opts in or has an upgrade link to give.
    let upgrade_url = rules.messages.upgrade_url();
    if rules.messages.body_object() || upgrade_url.is_some() {
        let object = message::body_object(&lf, &rendered, upgrade_url);
        if let Ok(Value::Object(mut body)) = serde_json::from_slice::<Value>(&response.body) {
            body.insert(message::BODY_MEMBER.to_owned(), object);
            response.body = serde_json::to_vec(&body).unwrap_or(response.body);
        }
    }
    if let Some(url) = upgrade_url {
        response.headers.push((UPGRADE_HEADER, url.to_owned()));
    }
    if let Some(ms) = retry_after_ms {
        response.headers.push(("retry-after", crate::duration::retry_after_secs(ms).to_string()));
    }
    response.headers.extend(limit_headers(&admission.statuses));
    Some(response)
}

/// OpenAI's `x-ratelimit-*` headers for the most restrictive request limit and the most
/// restrictive token limit.
pub(crate) fn limit_headers(statuses: &[LimitStatus]) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if let Some(s) = binding(statuses, |m| m == Metric::Requests) {
        out.extend(render::rate_limit_headers(s.limit, s.remaining, s.reset_ms));
    }
    if let Some(s) = binding(statuses, Metric::is_tokens) {
        out.extend(render::token_limit_headers(s.limit, s.remaining, s.reset_ms));
    }
    out
}

fn admitted<'p>(policy: &Policy, admission: Admission, rules: &TierRules, facts: &Facts, tier: String, request: ChatRequest, record: Record) -> Admitted<'p> {
    let headers = limit_headers(&admission.statuses);
    let warning = admission.warnings.iter().max_by_key(|w| (w.threshold, w.status.percent())).map(|w| {
        let lf = facts_of(&w.status, facts.now_ms);
        let object = rules.messages.body_object().then(|| {
            let accept_language = header(facts, "accept-language");
            let rendered = rules.messages.render(MessageKind::Warn, accept_language.as_deref(), &human_facts(&w.status, facts.now_ms));
            message::body_object(&lf, &rendered, rules.messages.upgrade_url())
        });
        Warning { header: message::warning_header(&lf, w.threshold), object }
    });
    let events = events(policy, &admission.ticket, &admission.notify, facts.now_ms);
    Admitted {
        request,
        rewritten: false,
        route: None,
        alias: None,
        ticket: Some(admission.ticket),
        headers,
        warning,
        events,
        tier,
        evicted: admission.evicted,
        record,
    }
}

/// Webhook bodies for thresholds reached: counts and hashes only, never request content.
pub fn events(policy: &Policy, ticket: &Ticket, reached: &[Reached], now_ms: u64) -> Vec<Vec<u8>> {
    if policy.notify.is_none() {
        return vec![];
    }
    reached
        .iter()
        .map(|r| {
            serde_json::to_vec(&json!({
                "type": "tollgate.threshold_reached",
                "identity": ticket.who.identity_key,
                "tier": ticket.who.tier,
                "limit": r.status.name,
                "scope": r.status.scope.name(),
                "metric": r.status.metric.name(),
                "unit": unit(r.status.metric),
                "window": r.status.window.map(|w| w.name()),
                "threshold_percent": r.threshold,
                "limit_value": r.status.limit,
                "used": r.status.used,
                "window_start": message::rfc3339(r.window_start),
                "at": message::rfc3339(now_ms),
            }))
            .unwrap_or_default()
        })
        .collect()
}

/// What settling a request came to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settlement {
    /// Webhook event bodies for the notify thresholds the settlement reached.
    pub events: Vec<Vec<u8>>,
    /// Keys that could not be updated (their counts wait for their windows to end, their leases
    /// for their TTL).
    pub failures: u32,
    /// The first failure, for the log.
    pub error: Option<StoreError>,
}

/// Settles a request that has ended, however it ended, by the one rule ([`crate::ending`]).
pub fn finish<S: CasStore + ?Sized>(policy: &Policy, store: &mut S, ticket: &Ticket, ending: &Ending, now_ms: u64) -> Settlement {
    let actual = ending.actual(&policy.limits, ticket);
    let settled = sync::run(store, policy.into(), Settling::new(ticket, actual, now_ms));
    settlement(policy, ticket, settled, now_ms)
}

/// A [`Settled`] (from any driver) as the host acts on it: webhook events and failures.
pub fn settlement(policy: &Policy, ticket: &Ticket, settled: Settled, now_ms: u64) -> Settlement {
    Settlement { events: events(policy, ticket, &settled.reached, now_ms), failures: settled.failures, error: settled.first_error }
}

/// `GET /v1/tollgate/usage`: who is asking (`Err`: the answer when the identity is refused).
/// `path` is the request's path with its query: a policy that identifies callers by the body's
/// `user` field takes it as `?user=` here (a GET has no body); without it, such a caller would
/// be shown someone else's bucket (its address's), so it gets a 400 saying so instead.
pub fn usage_subject(policy: &Policy, facts: &Facts, path: Option<&str>) -> Result<Who, LocalResponse> {
    let query = path.and_then(|p| p.split('#').next()).and_then(|p| p.split_once('?')).map(|(_, q)| q).unwrap_or("");
    let user = form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == "user").map(|(_, v)| v.into_owned());
    let reads_user = policy.identity.reads_user_field();
    let subject = resolve(policy, facts, user.as_deref().filter(|_| reads_user))?;
    if reads_user && user.is_none() && policy.identity.passed_over_user_field(subject.source) {
        return Err(render::openai_error(
            400,
            "This gateway identifies callers by the chat request's `user` field, which a GET has none of: ask for /v1/tollgate/usage?user=<the same value>.",
            "invalid_request_error",
            "user_required",
        ));
    }
    Ok(who(&subject))
}

/// `GET /v1/tollgate/usage`: the caller's own limits — used, limit, remaining and reset for each
/// — and its identity key (a digest: what webhook events and the admin lookup name). There is no
/// prompt data to return. `statuses`: `Err` when the store failed (a retryable 503).
pub fn usage_body(who: &Who, statuses: Result<Vec<LimitStatus>, StoreError>, now_ms: u64) -> LocalResponse {
    let Ok(statuses) = statuses else { return render::store_unavailable() };
    let limits: Vec<Value> = statuses.iter().map(|s| status_json(s, now_ms)).collect();
    let body = json!({ "object": "tollgate.usage", "tier": who.tier, "identity": who.identity_key, "limits": limits });
    LocalResponse {
        status: 200,
        headers: vec![("content-type", "application/json".to_owned()), ("cache-control", "no-store".to_owned())],
        body: serde_json::to_vec(&body).unwrap_or_default(),
    }
}

/// `GET /v1/tollgate/usage` against a [`CasStore`].
pub fn usage_report<S: CasStore + ?Sized>(policy: &Policy, facts: &Facts, path: Option<&str>, store: &mut S) -> LocalResponse {
    match usage_subject(policy, facts, path) {
        Ok(who) => {
            let statuses = sync::run(store, policy.into(), Peeking::new(&policy.limits, &who, facts.now_ms));
            usage_body(&who, statuses, facts.now_ms)
        }
        Err(r) => r,
    }
}

/// Whether a client's request header stays with Tollgate (never forwarded): who the user is and
/// what they pay (the policy's identity and tier headers), and every `x-tollgate-*` header —
/// only Tollgate sets those (which cluster, which attempt).
pub fn is_private_request_header(policy: &Policy, name: &str) -> bool {
    name.starts_with(crate::headers::PREFIX) || policy.private_request_headers().any(|h| h == name)
}

/// What a limit's numbers count.
pub fn unit(metric: Metric) -> &'static str {
    match metric {
        Metric::Requests => "requests",
        Metric::Concurrent => "requests in flight",
        Metric::CostMicros => "usd_micros",
        Metric::InputTokens | Metric::OutputTokens | Metric::TotalTokens => "tokens",
    }
}

/// One limit's state as JSON (usage endpoint, simulator).
pub(crate) fn status_json(s: &LimitStatus, now_ms: u64) -> Value {
    json!({
        "name": s.name,
        "scope": s.scope.name(),
        "metric": s.metric.name(),
        "unit": unit(s.metric),
        "window": s.window.map(|w| w.name()),
        "limit": s.limit,
        "used": s.used,
        "remaining": s.remaining,
        "reset": message::rfc3339(now_ms.saturating_add(s.reset_ms)),
        "reset_in_ms": s.reset_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;
    use crate::usage::Usage;

    const T0: u64 = 1_709_208_000_000; // 2024-02-29T12:00:00Z

    fn policy() -> Policy {
        Policy::from_json(
            r#"{
            "identity": {"header": "x-user"}, "tier": {"header": "x-tier", "default": "free"},
            "tiers": {
              "free": {
                "limits": [{"window": "day", "total_tokens": 100, "soft": [
                    {"at": 50, "action": "warn"}, {"at": 50, "action": "notify"},
                    {"at": 80, "action": "downgrade", "model": "small"}, {"at": 120, "action": "block"}]},
                  {"concurrent": 1}],
                "guards": {"max_tokens": 40, "default_max_tokens": 20},
                "messages": {"body_object": true, "upgrade_url": "https://x.example/up",
                  "block": {"en": "Used {used} of {limit}.", "ar": "استخدمت {used} من {limit}."}},
                "cap_output": true
              },
              "pro": {"limits": []}
            },
            "notify": {"url": "https://hooks.example/t"},
            "providers": {"p": {"kind": "openai"}},
            "models": {"big": {"provider": "p", "model": "b"}, "small": {"provider": "p", "model": "s"}}
        }"#
            .as_bytes(),
        )
        .unwrap()
    }

    fn run(p: &Policy, store: &mut MemoryStore, user: &str, lang: Option<&str>, body: &str, lease: u64) -> Gate<'static> {
        let user = user.to_owned();
        let lang = lang.map(str::to_owned);
        let header = move |name: &str| match name {
            "x-user" => Some(user.clone()),
            "accept-language" => lang.clone(),
            _ => None,
        };
        let none = |_: &str| None;
        let facts = Facts { header: &header, peer_address: Some("10.0.0.1:1"), now_ms: T0, secrets: &none, claim: &crate::identity::no_claims };
        // SAFETY of the 'static: the gate borrows the policy; tests leak it to keep signatures simple.
        let p: &'static Policy = Box::leak(Box::new(p.clone()));
        admit_chat(p, &facts, body.as_bytes(), store, lease)
    }

    const BODY: &str = r#"{"model":"big","messages":[{"role":"user","content":"hi"}]}"#;

    fn settle(p: &Policy, store: &mut MemoryStore, g: &Gate, input: u64, output: u64) -> Vec<Vec<u8>> {
        let Gate::Forward(a) = g else { panic!("{g:?}") };
        let usage = Usage { input: Some(input), output: Some(output), ..Usage::default() };
        let s = finish(p, store, a.ticket.as_ref().unwrap(), &Ending::Served { usage, model: None }, T0 + 1);
        assert_eq!(s.failures, 0);
        s.events
    }

    #[test]
    fn a_declared_body_over_the_tiers_limit_is_refused_before_it_is_read() {
        let none = |_: &str| None;
        let header = |_: &str| None;
        let facts = Facts { header: &header, peer_address: Some("10.0.0.1:1"), now_ms: T0, secrets: &none, claim: &crate::identity::no_claims };
        let limited = Policy::from_json(
            br#"{"tier": {"default": "a"}, "tiers": {"a": {"limits": [], "guards": {"max_body_bytes": 1000}}, "b": {"limits": []}}}"#,
        )
        .unwrap();
        let r = check_declared_length(&limited, &facts, Some(1001)).expect("refused");
        assert_eq!(r.status, 413);
        assert!(check_declared_length(&limited, &facts, Some(1000)).is_none());
        assert!(check_declared_length(&limited, &facts, None).is_none());
        // no tier limits the body: nothing to check, whatever the length
        assert!(!policy().limits_body_size());
        assert!(check_declared_length(&policy(), &facts, Some(u64::MAX)).is_none());
    }

    #[test]
    fn classify_by_method_and_path() {
        assert_eq!(classify(Some("POST"), Some("/v1/chat/completions?x=1")), Kind::Chat);
        assert_eq!(classify(Some("POST"), Some("/v1/chat/completions#f")), Kind::Chat);
        assert_eq!(classify(Some("GET"), Some("/v1/tollgate/usage")), Kind::Usage);
        assert_eq!(classify(Some("GET"), Some("/v1/models")), Kind::Models);
        // Only the exact path is a surface: every variant a proxy or provider might read as
        // chat is unknown, so it can be neither forwarded nor metered as something else.
        for path in [
            "/v1/chat/completions/",
            "/v1/chat/completions;x",
            "/v1/chat/%63ompletions",
            "/v1/chat//completions",
            "//v1/chat/completions",
            "/v1/chat/./completions",
            "/v1/x/../chat/completions",
            "/V1/chat/completions",
            "/v1/chat/completions%3F",
            "/v1/completions",
            "/v1/responses",
            "/v1/embeddings",
            "/v1/files",
            "/v1/fine_tuning/jobs",
            "/v1/models/gpt-4o",
            "/",
            "",
        ] {
            assert_eq!(classify(Some("POST"), Some(path)), Kind::Unknown, "{path}");
        }
        assert_eq!(classify(Some("GET"), Some("/v1/chat/completions")), Kind::Unknown);
        assert_eq!(classify(Some("DELETE"), Some("/v1/files/file-1")), Kind::Unknown);
        assert_eq!(classify(None, None), Kind::Unknown);
    }

    #[test]
    fn unknown_surfaces_are_openai_404s_and_wrong_methods_405s() {
        let r = unknown_surface(Some("DELETE"), Some("/v1/files/file-abc?x=1"));
        assert_eq!(r.status, 404);
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["error"]["code"], "unknown_url");
        assert!(v["error"]["message"].as_str().unwrap().contains("DELETE /v1/files/file-abc"), "{v}");
        let r = unknown_surface(Some("GET"), Some("/v1/chat/completions"));
        assert_eq!(r.status, 405);
        assert!(r.headers.contains(&("allow", "POST".to_owned())));
        let long = format!("/{}", "é".repeat(300));
        let r = unknown_surface(Some("GET"), Some(&long));
        assert_eq!(r.status, 404);
        assert!(r.body.len() < 400, "the path is cut: {}", r.body.len());
    }

    /// The record of each decision: allowed, warned, downgraded, blocked (naming the limit),
    /// refused by a guard; the subject's hash, never the prompt.
    #[test]
    fn every_decision_leaves_a_record_with_its_limit_and_no_prompt() {
        use crate::record::Decision;
        let p = policy();
        let mut store = MemoryStore::new();
        let canary = r#"{"model":"big","messages":[{"role":"user","content":"CANARY-7781 hi"}]}"#;
        let expected_identity = crate::identity::subject_key("h:u");
        let decide = |g: &Gate| -> crate::record::Record {
            match g {
                Gate::Forward(a) => a.record.clone(),
                Gate::Reply { record, .. } => *record.clone().expect("a record once the subject is known"),
            }
        };
        let g = run(&p, &mut store, "u", None, canary, 1);
        let r = decide(&g);
        assert_eq!((r.decision, r.identity.as_str(), r.identity_source.as_str(), r.tier.as_str(), r.model.as_str()), (Decision::Allowed, expected_identity.as_str(), "header", "free", "big"));
        assert!(!String::from_utf8(r.to_json()).unwrap().contains("CANARY"));
        settle(&p, &mut store, &g, 30, 25);
        let g = run(&p, &mut store, "u", None, canary, 2);
        let r = decide(&g);
        assert_eq!((r.decision, r.limit.as_deref()), (Decision::Warned, Some("total_tokens/day")));
        // 55 + 25 = 80 %: the next is downgraded (80 + its 36 stays under the 120 % block).
        settle(&p, &mut store, &g, 25, 0);
        let r = decide(&run(&p, &mut store, "u", None, canary, 3));
        assert_eq!((r.decision, r.served_model.as_deref()), (Decision::Downgraded, Some("small")));
        // 80 + 36 in flight + 36 ≥ 120 %: the soft block names its limit.
        let g = run(&p, &mut store, "u", None, canary, 4);
        let r = decide(&g);
        assert_eq!((r.decision, r.reason, r.limit.as_deref(), r.status), (Decision::Blocked, Some(Reason::Limit), Some("total_tokens/day"), 429), "{r:?}");
        // A guard (max_tokens 40): refused before the limits.
        let r = decide(&run(&p, &mut store, "v", None, r#"{"model":"big","max_tokens":41,"messages":[]}"#, 6));
        assert_eq!((r.decision, r.reason, r.status), (Decision::Refused, Some(Reason::Invalid), 400));
    }

    #[test]
    fn reservation_then_settlement_then_warning_downgrade_and_localized_block() {
        let p = policy();
        let mut store = MemoryStore::new();
        // 16 prompt + 20 output reserved; cap_output sends max_tokens 20 upstream.
        let g = run(&p, &mut store, "u", None, BODY, 1);
        let Gate::Forward(a) = &g else { panic!("{g:?}") };
        assert_eq!(a.request.max_tokens, Some(20));
        assert!(a.rewritten && a.warning.is_none());
        assert!(a.headers.contains(&("x-ratelimit-remaining-tokens", "64".to_owned())), "{:?}", a.headers);
        // settle to 30 + 25 = 55: past the 50 % notify, once
        let events = settle(&p, &mut store, &g, 30, 25);
        assert_eq!(events.len(), 1);
        let e: Value = serde_json::from_slice(&events[0]).unwrap();
        assert_eq!((e["threshold_percent"].as_u64(), e["used"].as_u64(), e["tier"].as_str()), (Some(50), Some(55), Some("free")));
        // 55 + 36 = 91 ≥ 50 %: a warning with the body object; 55 < 80 %: no downgrade yet
        let g = run(&p, &mut store, "u", None, BODY, 2);
        let Gate::Forward(a) = &g else { panic!() };
        let w = a.warning.as_ref().unwrap();
        assert!(w.header.contains("percent=91") && w.header.contains("threshold=50"), "{}", w.header);
        assert_eq!(w.object.as_ref().unwrap()["upgrade_url"], "https://x.example/up");
        assert_eq!(a.request.model, "big");
        settle(&p, &mut store, &g, 15, 10); // 80: at 80 %
        let g = run(&p, &mut store, "u", None, BODY, 3);
        let Gate::Forward(a) = &g else { panic!() };
        assert_eq!(a.request.model, "small");
        assert_eq!(a.route.as_ref().unwrap().target.upstream_model, "s");
        assert!(a.headers.contains(&(DOWNGRADE_HEADER, "small".to_owned())));
        settle(&p, &mut store, &g, 10, 10); // 100
        // 100 + 36 > 120: blocked, in Arabic when asked
        let Gate::Reply { response, why, .. } = run(&p, &mut store, "u", Some("ar-SA, en;q=0.5"), BODY, 4) else { panic!() };
        assert_eq!((response.status, why), (429, Refused::Limited));
        let body: Value = serde_json::from_slice(&response.body).unwrap();
        assert_eq!(body["error"]["message"], "استخدمت 100 من 100.");
        assert_eq!(body["error"]["type"], "tokens");
        assert_eq!(body["tollgate"]["upgrade_url"], "https://x.example/up");
        assert_eq!(body["tollgate"]["locale"], "ar");
        assert!(response.headers.contains(&(UPGRADE_HEADER, "https://x.example/up".to_owned())));
        assert!(response.headers.iter().any(|(k, _)| *k == "retry-after"));
        let Gate::Reply { response, .. } = run(&p, &mut store, "u", None, BODY, 5) else { panic!() };
        let body: Value = serde_json::from_slice(&response.body).unwrap();
        assert_eq!(body["error"]["message"], "Used 100 of 100.");
    }

    #[test]
    fn concurrency_lease_is_held_until_finish_and_cancel_releases_everything() {
        let p = policy();
        let mut store = MemoryStore::new();
        let g = run(&p, &mut store, "c", None, BODY, 1);
        let Gate::Reply { response, .. } = run(&p, &mut store, "c", None, BODY, 2) else { panic!("second in flight must wait") };
        assert_eq!(response.status, 429);
        let Gate::Forward(a) = &g else { panic!() };
        assert_eq!(finish(&p, &mut store, a.ticket.as_ref().unwrap(), &Ending::NotSent, T0).failures, 0);
        // nothing stays counted: a fresh request sees the whole budget
        let Gate::Forward(b) = run(&p, &mut store, "c", None, BODY, 3) else { panic!() };
        assert!(b.headers.contains(&("x-ratelimit-remaining-tokens", "64".to_owned())), "{:?}", b.headers);
    }

    #[test]
    fn refusals_before_admission_count_nothing() {
        let p = policy();
        let mut store = MemoryStore::new();
        for (body, status) in [
            ("{not json", 400),
            (r#"{"model":"gpt-9","messages":[]}"#, 404),
            (r#"{"model":"big","messages":[],"max_tokens":41}"#, 400),
        ] {
            let Gate::Reply { response, why, .. } = run(&p, &mut store, "r", None, body, 1) else { panic!("{body}") };
            assert_eq!((response.status, why), (status, Refused::Invalid), "{body}");
        }
        assert!(store.is_empty(), "nothing was written");
    }

    fn alias_policy() -> Policy {
        Policy::from_json(
            r#"{
            "identity": {"header": "x-user"}, "tier": {"header": "x-tier", "default": "free"},
            "tiers": {
              "free": {"limits": [{"window": "day", "cost_usd": 1}], "guards": {"models": ["small"]}},
              "pro": {"limits": [{"window": "day", "cost_usd": 1},
                                 {"window": "day", "requests": 10, "soft": [{"at": 10, "action": "downgrade", "model": "auto"}]}],
                      "guards": {"models": ["big", "auto"]}}
            },
            "providers": {"p": {"kind": "openai"}, "q": {"kind": "anthropic", "default_max_tokens": 300}},
            "models": {"big": {"provider": "p", "model": "b", "default_max_tokens": 100}, "small": {"provider": "q", "model": "s"}},
            "prices": {"big": {"input": 3, "output": 1}, "small": {"input": 1, "output": 2, "cached_input": 0.5}},
            "aliases": {"auto": {"deployments": ["small", "big"], "strategy": "least_recently_failed"}}
        }"#
            .as_bytes(),
        )
        .unwrap()
    }

    fn facts_for<'a>(header: &'a dyn Fn(&str) -> Option<String>, none: &'a dyn Fn(&str) -> Option<Vec<u8>>) -> Facts<'a> {
        Facts { header, peer_address: Some("10.0.0.1:1"), now_ms: T0, secrets: none, claim: &crate::identity::no_claims }
    }

    fn user_in(user: &str, tier: &str) -> impl Fn(&str) -> Option<String> {
        let (user, tier) = (user.to_owned(), tier.to_owned());
        move |name: &str| match name {
            "x-user" => Some(user.clone()),
            "x-tier" => Some(tier.clone()),
            _ => None,
        }
    }

    fn cost_used(p: &Policy, store: &mut MemoryStore, user: &str, tier: &str) -> u64 {
        let header = user_in(user, tier);
        let none = |_: &str| None;
        let r = usage_report(p, &facts_for(&header, &none), None, store);
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        let cost = v["limits"].as_array().unwrap().iter().find(|l| l["metric"] == "cost_usd").unwrap_or_else(|| panic!("{v}"));
        cost["used"].as_u64().unwrap()
    }

    #[test]
    fn an_alias_is_admitted_priced_at_its_most_expensive_deployment() {
        let p = alias_policy();
        let alias_price = p.limits.prices["auto"];
        assert_eq!((alias_price.input, alias_price.output, alias_price.cached_input), (3_000_000, 2_000_000, 3_000_000));
        let mut store = MemoryStore::new();
        let header = user_in("u1", "pro");
        let none = |_: &str| None;
        let facts = facts_for(&header, &none);
        let body = br#"{"model":"auto","messages":[{"role":"user","content":"hi"}]}"#;
        let Prepared::Admit(pending) = prepare_chat(&p, &facts, body) else { panic!("prepared") };
        assert_eq!(pending.alias.map(|a| a.name.as_str()), Some("auto"));
        // output reservation: the largest default_max_tokens of its deployments (small: 300 from its provider)
        assert_eq!(pending.estimate.output_tokens, 300);
        let input = pending.estimate.input_tokens;
        let g = admit_chat(&p, &facts, body, &mut store, 1);
        let Gate::Forward(a) = &g else { panic!("{g:?}") };
        assert!(a.route.is_none());
        let alias = a.alias.expect("alias");
        assert_eq!((alias.name.as_str(), alias.strategy, alias.max_attempts), ("auto", crate::fallback::Strategy::LeastRecentlyFailed, 2));
        assert_eq!(a.request.model, "auto");
        let ticket = a.ticket.clone().unwrap();
        assert_eq!(ticket.model.as_deref(), Some("auto"));
        assert_eq!(cost_used(&p, &mut store, "u1", "pro"), 3 * input + 2 * 300, "reserved at the maximum price");
        // settlement with the serving deployment's price
        let mut served = ticket;
        served.model = Some("big".to_owned());
        let usage = Usage { input: Some(10), output: Some(10), ..Usage::default() };
        assert_eq!(finish(&p, &mut store, &served, &Ending::Served { usage, model: None }, T0 + 1).failures, 0);
        assert_eq!(cost_used(&p, &mut store, "u1", "pro"), 3 * 10 + 10);
    }

    #[test]
    fn aliases_follow_the_tier_allowlist_and_unknown_names_are_404() {
        let p = alias_policy();
        let mut store = MemoryStore::new();
        let none = |_: &str| None;
        let free = user_in("f", "free");
        for (body, status, code) in [
            (r#"{"model":"auto","messages":[]}"#, 400, "model_not_allowed"),
            (r#"{"model":"nope","messages":[]}"#, 404, "model_not_found"),
        ] {
            let Gate::Reply { response, why, .. } = admit_chat(&p, &facts_for(&free, &none), body.as_bytes(), &mut store, 1) else { panic!("{body}") };
            assert_eq!((response.status, why), (status, Refused::Invalid), "{body}");
            let v: Value = serde_json::from_slice(&response.body).unwrap();
            assert_eq!(v["error"]["code"], code);
        }
        assert!(store.is_empty());
        let Gate::Forward(a) = admit_chat(&p, &facts_for(&free, &none), br#"{"model":"small","messages":[]}"#, &mut store, 2) else { panic!() };
        assert!(a.alias.is_none() && a.route.is_some());
    }

    #[test]
    fn the_model_list_is_what_the_callers_tier_may_ask_for() {
        let p = alias_policy();
        let none = |_: &str| None;
        let ids = |tier: &str| {
            let header = user_in("u", tier);
            let r = models_list(&p, &facts_for(&header, &none));
            assert_eq!(r.status, 200);
            let v: Value = serde_json::from_slice(&r.body).unwrap();
            assert_eq!(v["object"], "list");
            v["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_owned()).collect::<Vec<_>>()
        };
        assert_eq!(ids("free"), ["small"]);
        assert_eq!(ids("pro"), ["big", "auto"]);
        // Without a model map the gateway does not know what its upstream serves.
        let unmapped = Policy::from_json(br#"{"tier":{"default":"d"},"tiers":{"d":{"limits":[]}}}"#).unwrap();
        let r = models_list(&unmapped, &facts_for(&none_header, &none));
        assert_eq!(r.status, 404);
    }

    fn none_header(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn the_usage_endpoint_takes_a_user_field_identity_as_a_query_parameter() {
        let p = Policy::from_json(
            br#"{"identity":{"sources":[{"header":"x-user"},{"user_field":true},{"client_ip":{}}]},
                 "tier":{"default":"d"},"tiers":{"d":{"limits":[{"window":"day","requests":5}]}}}"#,
        )
        .unwrap();
        let none = |_: &str| None;
        let nobody = |_: &str| None;
        let bob = |n: &str| (n == "x-user").then(|| "bob".to_owned());
        // A header that comes before the user field: as any request.
        let by_header = usage_subject(&p, &facts_for(&bob, &none), Some("/v1/tollgate/usage")).unwrap();
        assert_eq!(by_header.identity_key, crate::identity::subject_key("h:bob"));
        // Nothing but the address: that would be someone else's bucket.
        let e = usage_subject(&p, &facts_for(&nobody, &none), Some("/v1/tollgate/usage")).unwrap_err();
        assert_eq!(e.status, 400);
        assert!(String::from_utf8_lossy(&e.body).contains("user_required"));
        // The same value the chat requests send in `user`, percent-encoded.
        let carol = usage_subject(&p, &facts_for(&nobody, &none), Some("/v1/tollgate/usage?x=1&user=carol%20c")).unwrap();
        assert_eq!(carol.identity_key, crate::identity::subject_key("u:carol c"));
        // A policy that does not read the user field ignores the parameter.
        let plain = Policy::from_json(br#"{"identity":{"header":"x-user"},"tier":{"default":"d"},"tiers":{"d":{"limits":[]}}}"#).unwrap();
        let w = usage_subject(&plain, &facts_for(&nobody, &none), Some("/v1/tollgate/usage?user=carol")).unwrap();
        assert_eq!(w.identity_key, crate::identity::subject_key("ip:10.0.0.1"), "its address, as for any request");
    }

    #[test]
    fn a_downgrade_may_name_an_alias() {
        let p = alias_policy();
        let mut store = MemoryStore::new();
        let none = |_: &str| None;
        let pro = user_in("d", "pro");
        let body = br#"{"model":"big","messages":[],"max_tokens":5}"#;
        let Gate::Forward(a) = admit_chat(&p, &facts_for(&pro, &none), body, &mut store, 1) else { panic!() };
        assert_eq!((a.route.as_ref().map(|r| r.target.upstream_model.as_str()), a.alias), (Some("b"), None));
        // 1 of 10 requests = the 10 % downgrade
        let Gate::Forward(a) = admit_chat(&p, &facts_for(&pro, &none), body, &mut store, 2) else { panic!() };
        assert!(a.route.is_none());
        assert_eq!(a.alias.map(|x| x.name.as_str()), Some("auto"));
        assert_eq!(a.request.model, "auto");
        assert!(a.rewritten);
        assert!(a.headers.contains(&(DOWNGRADE_HEADER, "auto".to_owned())));
        assert_eq!(a.ticket.as_ref().unwrap().model.as_deref(), Some("auto"));
    }

    #[test]
    fn usage_report_shows_the_callers_limits() {
        let p = policy();
        let mut store = MemoryStore::new();
        let g = run(&p, &mut store, "v", None, BODY, 1);
        settle(&p, &mut store, &g, 5, 5);
        let header = |name: &str| (name == "x-user").then(|| "v".to_owned());
        let none = |_: &str| None;
        let facts = Facts { header: &header, peer_address: None, now_ms: T0 + 2, secrets: &none, claim: &crate::identity::no_claims };
        let r = usage_report(&p, &facts, None, &mut store);
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["tier"], "free");
        let tokens = &v["limits"][0];
        assert_eq!((tokens["metric"].as_str(), tokens["used"].as_u64(), tokens["remaining"].as_u64()), (Some("total_tokens"), Some(10), Some(90)));
        assert_eq!(tokens["reset"], "2024-03-01T00:00:00Z");
        assert_eq!((v["limits"][1]["metric"].as_str(), v["limits"][1]["used"].as_u64()), (Some("concurrent"), Some(0)));
    }
}
