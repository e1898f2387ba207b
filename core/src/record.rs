//! The usage record: one per request that reached the gate with a known subject, the line an
//! operator bills from (schema version [`VERSION`], documented in docs/usage-records.md).
//!
//! A record holds names, hashes and numbers, never a byte of a prompt or an answer: the subject's
//! bucket (`tg1:q:` + a hash, as the counters key it), the API key's SHA-256 when the subject came
//! from a key (the form `tier.api_keys` lists keys in), model and provider names, token counts and
//! times. Unknown is not zero: a count the provider did not report is absent, not `0`.
//!
//! Core builds the record and every host publishes the same bytes ([`Record::to_json`]): the gate
//! starts it ([`crate::gate::Gate`] carries it on both arms), the host reports what it saw as it
//! happens ([`Record::sent`], [`Record::answered`], [`Record::ended`]). A host that can only
//! publish before it learns how a request ended (Envoy runs its access loggers before a Wasm
//! filter's `on_log`) publishes the record as it stands after each step, each time written as
//! if the request ended then — which is what settlement will find unless something happens
//! after the last step.

use serde::{Deserialize, Serialize};

use crate::ending::Ending;
use crate::limits::engine::LimitSet;
use crate::routing::Routes;
use crate::usage::Usage;

/// The schema version, the record's `v`.
pub const VERSION: u32 = 1;

/// What the gate decided.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Forwarded, no soft limit reached.
    #[default]
    Allowed,
    /// Forwarded with a soft-limit warning.
    Warned,
    /// Forwarded to a cheaper model than asked (a soft limit's downgrade).
    Downgraded,
    /// A limit refused it (429).
    Blocked,
    /// Refused for another reason: a guard, a bad identity token, the store failing.
    Refused,
}

impl Decision {
    /// Its name, as serialized.
    pub fn name(self) -> &'static str {
        match self {
            Decision::Allowed => "allowed",
            Decision::Warned => "warned",
            Decision::Downgraded => "downgraded",
            Decision::Blocked => "blocked",
            Decision::Refused => "refused",
        }
    }
}

/// Why a request was refused, or forwarded uncounted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// A limit said no (the decision is [`Decision::Blocked`]).
    Limit,
    /// A guard, a bad identity token, a parameter the provider cannot take.
    Invalid,
    /// The counter store failed: refused under `on_failure: deny`, forwarded uncounted under
    /// `allow`.
    StoreFailed,
}

impl Reason {
    /// Its name, as serialized.
    pub fn name(self) -> &'static str {
        match self {
            Reason::Limit => "limit",
            Reason::Invalid => "invalid",
            Reason::StoreFailed => "store_failed",
        }
    }
}

/// One request's usage record (see the module docs; field by field in docs/usage-records.md).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// [`VERSION`].
    pub v: u32,
    /// When the request was admitted (or refused), epoch milliseconds.
    pub time_ms: u64,
    /// The subject's bucket (`tg1:q:<32 hex>`): the same key as its counters and the usage endpoint.
    pub identity: String,
    /// Which identity source named the subject (`header`, `api_key_header`, `jwt`, …).
    pub identity_source: String,
    /// `sha256:<64 hex>` of the API key, when the subject came from one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    /// The tier whose limits applied.
    pub tier: String,
    /// The model the client asked for (a model or an alias).
    pub model: String,
    /// The model that served it (after a downgrade or an alias's choice), as the policy names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_model: Option<String>,
    /// The provider (as the policy names it) the last attempt went to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// The provider's own model name the last attempt asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_model: Option<String>,
    /// Prompt tokens the provider reported, cached ones included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_tokens: Option<u64>,
    /// Prompt tokens served from the provider's cache (part of `input_tokens`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_input_tokens: Option<u64>,
    /// Generated tokens the provider reported, reasoning included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_tokens: Option<u64>,
    /// Thinking tokens (part of `output_tokens`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_tokens: Option<u64>,
    /// What the reported tokens cost at the policy's price for the serving model, in micro-USD
    /// (absent: usage not reported, or no price for the model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_micro_usd: Option<u64>,
    /// What the gate decided.
    pub decision: Decision,
    /// Why it was refused (`limit`, `invalid`, `store_failed`), or, on an allowed request,
    /// `store_failed`: forwarded uncounted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// The limit that blocked, warned or downgraded it (its name, e.g. `requests/day`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<String>,
    /// How an admitted request ended (`served`, `not_served`, `not_sent`, `abandoned`), as far
    /// as the host knew when it published the record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ending: Option<String>,
    /// The status the client got (0 until an answer began).
    pub status: u16,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// Milliseconds from admission to the answer's head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttfb_ms: Option<u64>,
    /// Milliseconds from admission to the last step the record saw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_ms: Option<u64>,
    /// Provider attempts made (an alias's fallbacks count each).
    pub attempts: u32,
}

/// The most bytes of a model name a record keeps: without a `models` map the name is the
/// client's own string, and a record line must stay a small line whatever a client sends.
pub const MAX_MODEL_BYTES: usize = 256;

fn bounded(name: &str) -> String {
    let mut end = name.len().min(MAX_MODEL_BYTES);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_owned()
}

/// Who a record is about, as the gate resolved it.
pub(crate) struct About<'a> {
    pub identity: &'a str,
    pub source: &'static str,
    pub api_key: Option<&'a str>,
    pub tier: &'a str,
    pub model: &'a str,
    pub stream: bool,
}

impl Record {
    /// A record as the gate starts it.
    pub(crate) fn new(about: &About, now_ms: u64, decision: Decision) -> Record {
        Record {
            v: VERSION,
            time_ms: now_ms,
            identity: about.identity.to_owned(),
            identity_source: about.source.to_owned(),
            api_key: about.api_key.map(|k| format!("sha256:{k}")),
            tier: about.tier.to_owned(),
            model: bounded(about.model),
            served_model: None,
            provider: None,
            upstream_model: None,
            input_tokens: None,
            cached_input_tokens: None,
            output_tokens: None,
            reasoning_tokens: None,
            cost_micro_usd: None,
            decision,
            reason: None,
            limit: None,
            ending: None,
            status: 0,
            stream: about.stream,
            ttfb_ms: None,
            total_ms: None,
            attempts: 0,
        }
    }

    /// A refusal: the status the client gets, why (a limit: blocked, anything else: refused),
    /// and the limit that said no.
    pub(crate) fn refused(mut self, status: u16, reason: Reason, limit: Option<&str>) -> Record {
        self.decision = if reason == Reason::Limit { Decision::Blocked } else { Decision::Refused };
        self.status = status;
        self.reason = Some(reason);
        self.limit = limit.map(str::to_owned);
        self.total_ms = Some(0);
        self
    }

    /// An attempt went to `provider` for the policy's `model` (the provider's `upstream_model`).
    pub fn sent(&mut self, provider: &str, model: &str, upstream_model: &str) {
        self.attempts = self.attempts.saturating_add(1);
        self.provider = Some(provider.to_owned());
        self.served_model = Some(bounded(model));
        self.upstream_model = Some(bounded(upstream_model));
    }

    /// An alias request's attempts so far, and the deployment that served it, if one did (its
    /// provider and the provider's model, from `routes`).
    pub fn alias_attempts(&mut self, routes: &Routes, attempts: u32, served: Option<&str>) {
        self.attempts = attempts;
        if let Some((deployment, route)) = served.and_then(|d| Some((d, routes.route(d)?))) {
            self.provider = Some(route.provider.name.clone());
            self.served_model = Some(deployment.to_owned());
            self.upstream_model = Some(route.target.upstream_model.clone());
        }
    }

    /// The client's answer has `status`; the first call marks the answer's first byte.
    pub fn answered(&mut self, status: u16, now_ms: u64) {
        self.status = status;
        if self.ttfb_ms.is_none() {
            self.ttfb_ms = Some(now_ms.saturating_sub(self.time_ms));
        }
    }

    /// The request as it stands at `now_ms` would end as `ending`: its reported tokens, their
    /// cost at `limits`' price for the serving model, the ending's label, the time so far.
    pub fn ended(&mut self, ending: &Ending, limits: &LimitSet, now_ms: u64) {
        self.ending = Some(ending.label().to_owned());
        self.total_ms = Some(now_ms.saturating_sub(self.time_ms));
        let usage = match ending {
            Ending::Served { usage, model } => {
                if let Some(m) = model {
                    self.served_model = Some(m.clone());
                }
                *usage
            }
            Ending::NotSent | Ending::NotServed | Ending::Abandoned => Usage::default(),
        };
        self.input_tokens = usage.input;
        self.cached_input_tokens = usage.cached_read;
        self.output_tokens = usage.output;
        self.reasoning_tokens = usage.reasoning;
        let model = self.served_model.as_deref().unwrap_or(&self.model);
        self.cost_micro_usd = match (limits.price(Some(model)), usage.input, usage.output) {
            (Some(p), Some(i), Some(o)) => Some(p.cost(i, usage.cached_read.unwrap_or(0), o)),
            _ => None,
        };
    }

    /// The record as one line of JSON (no line break in it).
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Policy;

    fn record() -> Record {
        let about = About { identity: "tg1:q:00", source: "api_key_header", api_key: Some("ab12"), tier: "pro", model: "fast", stream: true };
        Record::new(&about, 1_000, Decision::Allowed)
    }

    fn limits() -> LimitSet {
        let p = Policy::from_json(
            br#"{"tier": {"default": "pro"}, "tiers": {"pro": {"limits": []}},
                 "prices": {"gpt-4o": {"input": 2.5, "cached_input": 1.25, "output": 10}}}"#,
        )
        .unwrap();
        p.limits
    }

    #[test]
    fn a_served_request_carries_what_the_provider_reported_and_its_cost() {
        let mut r = record();
        r.sent("openai", "gpt-4o", "gpt-4o-2024-08-06");
        r.answered(200, 1_250);
        let usage = Usage { input: Some(1000), output: Some(200), cached_read: Some(400), cache_write: None, reasoning: Some(50) };
        r.ended(&Ending::Served { usage, model: None }, &limits(), 3_000);
        assert_eq!((r.input_tokens, r.cached_input_tokens, r.output_tokens, r.reasoning_tokens), (Some(1000), Some(400), Some(200), Some(50)));
        // 600 × 2.5 + 400 × 1.25 + 200 × 10 = 4000 micro-USD
        assert_eq!(r.cost_micro_usd, Some(4000));
        assert_eq!((r.ttfb_ms, r.total_ms, r.attempts, r.ending.as_deref()), (Some(250), Some(2000), 1, Some("served")));
        assert_eq!(r.api_key.as_deref(), Some("sha256:ab12"));
        let back: Record = serde_json::from_slice(&r.to_json()).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn a_clients_model_name_is_kept_to_a_bounded_length() {
        let long = "é".repeat(1000);
        let about = About { identity: "tg1:q:00", source: "header", api_key: None, tier: "t", model: &long, stream: false };
        let mut r = Record::new(&about, 0, Decision::Allowed);
        r.sent("upstream", &long, &long);
        for kept in [&r.model, r.served_model.as_ref().unwrap(), r.upstream_model.as_ref().unwrap()] {
            assert_eq!(kept.len(), MAX_MODEL_BYTES, "two-byte characters, cut on a boundary");
            assert!(long.starts_with(kept.as_str()));
        }
    }

    #[test]
    fn decision_and_reason_names_are_their_json() {
        for d in [Decision::Allowed, Decision::Warned, Decision::Downgraded, Decision::Blocked, Decision::Refused] {
            assert_eq!(serde_json::to_value(d).unwrap(), d.name());
        }
        for r in [Reason::Limit, Reason::Invalid, Reason::StoreFailed] {
            assert_eq!(serde_json::to_value(r).unwrap(), r.name());
        }
    }

    #[test]
    fn unknown_is_absent_not_zero() {
        let mut r = record();
        r.sent("openai", "gpt-4o", "gpt-4o");
        r.ended(&Ending::Served { usage: Usage { input: Some(10), ..Usage::default() }, model: None }, &limits(), 2_000);
        let json: serde_json::Value = serde_json::from_slice(&r.to_json()).unwrap();
        assert_eq!(json["input_tokens"], 10);
        for absent in ["output_tokens", "cached_input_tokens", "reasoning_tokens", "cost_micro_usd"] {
            assert!(json.get(absent).is_none(), "{absent} in {json}");
        }
        // No price for the model: no cost, even with both counts known.
        let mut r = record();
        r.sent("other", "unpriced", "unpriced");
        r.ended(&Ending::Served { usage: Usage { input: Some(1), output: Some(1), ..Usage::default() }, model: None }, &limits(), 2_000);
        assert_eq!(r.cost_micro_usd, None);
    }

    #[test]
    fn a_step_is_written_as_if_the_request_ended_then() {
        let mut r = record();
        r.sent("openai", "gpt-4o", "gpt-4o");
        r.ended(&Ending::Abandoned, &limits(), 1_010);
        assert_eq!((r.ending.as_deref(), r.status, r.input_tokens), (Some("abandoned"), 0, None));
        r.answered(200, 1_100);
        let usage = Usage { input: Some(5), output: Some(7), ..Usage::default() };
        r.ended(&Ending::Served { usage, model: Some("gpt-4o".into()) }, &limits(), 1_200);
        // An alias's deployment named at the end; then the provider fails before usage: the
        // later ending replaces the earlier one's tokens.
        r.ended(&Ending::NotServed, &limits(), 1_300);
        assert_eq!((r.ending.as_deref(), r.input_tokens, r.cost_micro_usd, r.total_ms), (Some("not_served"), None, None, Some(300)));
        let line = String::from_utf8(r.to_json()).unwrap();
        assert!(!line.contains('\n') && line.starts_with("{\"v\":1,"), "{line}");
    }
}
