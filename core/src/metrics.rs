//! The labelled metrics one request adds, read off its finished usage [`Record`]: what every
//! host exports in its own idiom (Envoy: counters and histograms whose labels its tag
//! extraction reads out of the name, docs/metrics.md), so that the numbers on a dashboard are
//! the records' numbers.
//!
//! Names follow the OpenTelemetry GenAI semantic conventions where one fits
//! (`gen_ai.client.token.usage`, `gen_ai.client.operation.duration`,
//! `gen_ai.server.time_to_first_token` and their attributes `gen_ai.request.model`,
//! `gen_ai.response.model`, `gen_ai.provider.name`, `gen_ai.token.type`), written as
//! Prometheus writes them (dots as underscores). Durations are whole milliseconds (`_ms`):
//! Envoy histograms record integers.
//!
//! Every label value comes from the policy or from a fixed set — never a string the client
//! chose as it is: a model the policy does not name (a passed-through request's model) is
//! `other`. A client could otherwise mint one new time series per request, and each costs the
//! gateway memory for as long as it runs.

use crate::config::Policy;
use crate::record::Record;

/// Requests the gate decided on (`tier`, `decision`, `reason`, `limit`, `gen_ai_request_model`,
/// `gen_ai_provider_name`, `status_class`).
pub const REQUESTS: &str = "tollgate_requests_total";
/// Tokens providers reported (`tier`, `gen_ai_response_model`, `gen_ai_provider_name`,
/// `gen_ai_token_type`: `input` (cached included), `cached_input`, `output` (reasoning
/// included), `reasoning`).
pub const TOKENS: &str = "tollgate_tokens_total";
/// What the reported tokens cost at the policy's prices, in micro-USD (`tier`,
/// `gen_ai_response_model`, `gen_ai_provider_name`).
pub const COST: &str = "tollgate_cost_micro_usd_total";
/// Tokens per served request (`gen_ai_token_type`: `input`, `output`; `gen_ai_response_model`,
/// `gen_ai_provider_name`).
pub const TOKEN_USAGE: &str = "gen_ai_client_token_usage";
/// From admission to the answer's end, per forwarded request (`gen_ai_response_model`,
/// `gen_ai_provider_name`, `status_class`).
pub const DURATION: &str = "gen_ai_client_operation_duration_ms";
/// From admission to the answer's first byte, per forwarded stream (`gen_ai_response_model`,
/// `gen_ai_provider_name`).
pub const TIME_TO_FIRST_TOKEN: &str = "gen_ai_server_time_to_first_token_ms";

/// Every label name a sample may carry (Envoy needs one tag extraction rule per name).
pub const LABELS: [&str; 9] = [
    "tier",
    "decision",
    "reason",
    "limit",
    "gen_ai_request_model",
    "gen_ai_response_model",
    "gen_ai_provider_name",
    "gen_ai_token_type",
    "status_class",
];

/// A label value's longest form (bytes).
const MAX_VALUE: usize = 64;

/// What a sample is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Add the value.
    Counter,
    /// Record the value.
    Histogram,
}

/// One metric update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// The metric's name (one of this module's constants).
    pub name: &'static str,
    /// Counter or histogram.
    pub kind: Kind,
    /// Its labels, in [`LABELS`] order.
    pub labels: Vec<(&'static str, String)>,
    /// What to add or record.
    pub value: u64,
}

/// The samples a finished request adds (see the module docs).
pub fn samples(record: &Record, policy: &Policy) -> Vec<Sample> {
    let tier = bounded(policy.tier_names().any(|t| t == record.tier).then_some(record.tier.as_str()));
    let model = |name: Option<&str>| {
        let known = name.filter(|n| policy.routes.route(n).is_some() || policy.routes.alias(n).is_some());
        bounded(known)
    };
    let requested = model(Some(&record.model));
    let served = model(record.served_model.as_deref());
    let provider = bounded(record.provider.as_deref().filter(|p| *p == "upstream" || policy.routes.providers().any(|x| x.name == *p)));
    let decision = record.decision.name().to_owned();
    let reason = record.reason.map_or("none", |r| r.name()).to_owned();
    let limit = match record.limit.as_deref() {
        Some(l) => sanitize(l),
        None => "none".to_owned(),
    };
    let status_class = match record.status {
        0 => "none".to_owned(),
        s => format!("{}xx", s / 100),
    };
    let mut out = vec![Sample {
        name: REQUESTS,
        kind: Kind::Counter,
        labels: vec![
            ("tier", tier.clone()),
            ("decision", decision),
            ("reason", reason),
            ("limit", limit),
            ("gen_ai_request_model", requested),
            ("gen_ai_provider_name", provider.clone()),
            ("status_class", status_class.clone()),
        ],
        value: 1,
    }];
    if record.provider.is_none() || record.attempts == 0 {
        // Never sent: nothing was served, nothing took time upstream.
        return out;
    }
    let by_model = |extra: Option<(&'static str, &str)>| {
        let mut labels = vec![("gen_ai_response_model", served.clone()), ("gen_ai_provider_name", provider.clone())];
        if let Some((k, v)) = extra {
            labels.push((k, v.to_owned()));
        }
        labels
    };
    let tokens = [
        ("input", record.input_tokens),
        ("cached_input", record.cached_input_tokens),
        ("output", record.output_tokens),
        ("reasoning", record.reasoning_tokens),
    ];
    for (kind, n) in tokens {
        let Some(n) = n else { continue };
        let mut labels = vec![("tier", tier.clone())];
        labels.extend(by_model(Some(("gen_ai_token_type", kind))));
        out.push(Sample { name: TOKENS, kind: Kind::Counter, labels, value: n });
        if matches!(kind, "input" | "output") {
            out.push(Sample { name: TOKEN_USAGE, kind: Kind::Histogram, labels: by_model(Some(("gen_ai_token_type", kind))), value: n });
        }
    }
    if let Some(cost) = record.cost_micro_usd {
        let mut labels = vec![("tier", tier.clone())];
        labels.extend(by_model(None));
        out.push(Sample { name: COST, kind: Kind::Counter, labels, value: cost });
    }
    if let Some(ms) = record.total_ms {
        out.push(Sample { name: DURATION, kind: Kind::Histogram, labels: by_model(Some(("status_class", &status_class))), value: ms });
    }
    if let (true, Some(ms)) = (record.stream, record.ttfb_ms) {
        out.push(Sample { name: TIME_TO_FIRST_TOKEN, kind: Kind::Histogram, labels: by_model(None), value: ms });
    }
    out
}

/// A policy-named value as a label (`other` when there is none).
fn bounded(name: Option<&str>) -> String {
    name.map(sanitize).unwrap_or_else(|| "other".to_owned())
}

/// Letters, digits and `_ - . : / @ +` kept, anything else `_`, at most [`MAX_VALUE`] bytes: no
/// `=` or `;` (Envoy's tag rules delimit values with them), nothing a label value cannot hold.
fn sanitize(value: &str) -> String {
    value
        .chars()
        .take(MAX_VALUE)
        .map(|c| if c.is_ascii_alphanumeric() || "_-.:/@+".contains(c) { c } else { '_' })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ending::Ending;
    use crate::record::{Decision, Reason};
    use crate::usage::Usage;

    fn policy() -> Policy {
        Policy::from_json(
            br#"{"tier": {"default": "free"}, "tiers": {"free": {"limits": []}},
                 "providers": {"openai": {"kind": "openai", "cluster": "c", "base_url": "http://x"}},
                 "models": {"gpt-4.1": {"provider": "openai", "model": "gpt-4.1-2025"}},
                 "prices": {"gpt-4.1": {"input": 2, "output": 8}}}"#,
        )
        .unwrap()
    }

    fn label<'a>(s: &'a Sample, name: &str) -> &'a str {
        s.labels.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str()).unwrap_or_else(|| panic!("{name} in {s:?}"))
    }

    #[test]
    fn a_served_request_counts_once_with_its_tokens_cost_and_times() {
        let p = policy();
        let mut r = Record { tier: "free".into(), model: "gpt-4.1".into(), stream: true, time_ms: 1_000, ..Record::default() };
        r.sent("openai", "gpt-4.1", "gpt-4.1-2025");
        r.answered(200, 1_300);
        let usage = Usage { input: Some(100), output: Some(50), cached_read: Some(40), cache_write: None, reasoning: None };
        r.ended(&Ending::Served { usage, model: None }, &p.limits, 2_000);
        let s = samples(&r, &p);
        let names: Vec<&str> = s.iter().map(|s| s.name).collect();
        assert_eq!(names, [REQUESTS, TOKENS, TOKEN_USAGE, TOKENS, TOKENS, TOKEN_USAGE, COST, DURATION, TIME_TO_FIRST_TOKEN]);
        assert_eq!((label(&s[0], "decision"), label(&s[0], "gen_ai_request_model"), label(&s[0], "status_class"), label(&s[0], "limit")), ("allowed", "gpt-4.1", "2xx", "none"));
        assert_eq!((label(&s[1], "gen_ai_token_type"), s[1].value, label(&s[1], "gen_ai_provider_name")), ("input", 100, "openai"));
        // 60 × 2 + 40 × 2 (no cached price: full price) + 50 × 8 = 600 micro-USD
        assert_eq!(s[6].value, 600);
        assert_eq!((s[7].value, s[8].value), (1_000, 300));
        for sample in &s {
            let names: Vec<&str> = sample.labels.iter().map(|(k, _)| *k).collect();
            let mut ordered = names.clone();
            ordered.sort_by_key(|n| LABELS.iter().position(|l| l == n));
            assert_eq!(names, ordered, "labels in LABELS order");
        }
    }

    #[test]
    fn a_refusal_counts_once_and_names_its_limit() {
        let r = Record { tier: "free".into(), model: "gpt-4.1".into(), decision: Decision::Blocked, reason: Some(Reason::Limit), limit: Some("requests/minute".into()), status: 429, ..Record::default() };
        let s = samples(&r, &policy());
        assert_eq!(s.len(), 1);
        assert_eq!((label(&s[0], "decision"), label(&s[0], "reason"), label(&s[0], "limit"), label(&s[0], "status_class")), ("blocked", "limit", "requests/minute", "4xx"));
        assert_eq!(label(&s[0], "gen_ai_provider_name"), "other");
    }

    #[test]
    fn label_values_never_carry_what_the_client_chose() {
        let p = policy();
        let hostile = "x;.;tier=.=pro;.;".repeat(20);
        let mut r = Record { tier: hostile.clone(), model: hostile.clone(), ..Record::default() };
        r.sent("upstream", &hostile, &hostile);
        r.ended(&Ending::Served { usage: Usage { input: Some(1), ..Usage::default() }, model: Some(hostile.clone()) }, &p.limits, 0);
        r.limit = Some(hostile);
        for s in samples(&r, &p) {
            for (k, v) in &s.labels {
                assert!(v.len() <= MAX_VALUE && !v.contains('=') && !v.contains(';'), "{k}={v}");
                if matches!(*k, "tier" | "gen_ai_request_model" | "gen_ai_response_model") {
                    assert_eq!(v, "other", "{k}");
                }
            }
        }
    }
}
