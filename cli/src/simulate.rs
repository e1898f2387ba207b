//! `tollgate simulate`: replays a timed trace through the real gate.
//!
//! A trace is JSON lines, one request each (blank lines and lines starting with `#` are
//! skipped); only `at` is required:
//! ```json
//! {"at": "2026-11-22T10:00:00Z", "identity": "alice", "tier": "free", "ip": "10.0.0.1",
//!  "model": "scalix-free", "input_tokens": 120, "output_tokens": 300, "max_tokens": 512,
//!  "accept_language": "ar", "duration_ms": 2000, "stream": false}
//! ```
//! `at` is RFC 3339 or epoch milliseconds. Requests run in time order (file order on a tie)
//! against one [`MemoryStore`]:
//! - the body is a chat completion for `model` (default: the first model the tier may use)
//!   with one user message sized so that the core's prompt estimate is `input_tokens` (the
//!   estimate's floor is 16), plus `max_tokens` and `stream` when given;
//! - `identity` goes where the policy's first identity source that can carry it reads it (a
//!   plain, API-key or session header, or the body's `user` field; signed headers cannot be
//!   minted here), `tier` into the policy's tier header, `ip` is the peer address,
//!   `accept_language` the `Accept-Language` header;
//! - [`gate::admit_chat`] decides; an admitted request is settled with [`gate::finish`] at
//!   `at + duration_ms` (default 0) with the usage `input_tokens` / `output_tokens` (an absent
//!   one is unknown, and its reservation stays charged). Settlements due at or before a
//!   request's time run first.
//!
//! The request text is filler and is never shown; the output has counts, limits, messages
//! and webhook events (which carry hashed identities only).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tollgate_core::ending::Ending;
use tollgate_core::gate::{self, Facts, Gate, Refused};
use tollgate_core::headers::{DOWNGRADE_HEADER, WARNING_HEADER};
use tollgate_core::identity::RequestFacts;
use tollgate_core::limits::engine::Ticket;
use tollgate_core::usage::Usage;
use tollgate_core::MemoryStore;

use crate::{timestamp, Loaded};

/// A trace line that cannot be replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceError {
    /// 1-based line number in the trace.
    pub line: usize,
    pub message: String,
}

impl fmt::Display for TraceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for TraceError {}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRequest {
    at: Value,
    identity: Option<String>,
    tier: Option<String>,
    ip: Option<String>,
    model: Option<String>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    max_tokens: Option<u64>,
    accept_language: Option<String>,
    duration_ms: Option<u64>,
    stream: Option<bool>,
}

struct Request {
    line: usize,
    at_ms: u64,
    raw: RawRequest,
}

/// What the gate decided about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Forwarded to the provider.
    Allowed,
    /// A limit refused it (429).
    Denied,
    /// Answered locally for another reason: bad body, unknown model, guard, identity token,
    /// store failure.
    Refused,
}

/// One decision.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    /// The trace line.
    pub line: usize,
    pub at: String,
    pub at_ms: u64,
    pub identity: Option<String>,
    /// The tier the gate resolved.
    pub tier: String,
    pub outcome: Outcome,
    /// 200 for a forwarded request, else the local response's status.
    pub status: u16,
    /// The error code of a local response (`rate_limit_exceeded`, `model_not_allowed`, …).
    pub code: Option<String>,
    /// The error message of a local response (localized for a 429).
    pub message: Option<String>,
    /// The model asked for.
    pub model: String,
    /// The model the request is forwarded with (after a downgrade); `None` when not forwarded.
    pub served_model: Option<String>,
    pub downgraded: bool,
    /// Response headers the gate set (rate-limit headers, `retry-after`, downgrade, upgrade URL).
    pub headers: Vec<(String, String)>,
    /// `x-tollgate-warning`.
    pub warning: Option<String>,
    /// The warning's localized text, when the tier puts it in bodies.
    pub warning_message: Option<String>,
    /// Webhook event bodies.
    pub events: Vec<Value>,
}

/// One settlement (an admitted request ending).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Settlement {
    /// The trace line of the request.
    pub line: usize,
    pub at: String,
    pub at_ms: u64,
    pub identity: Option<String>,
    pub tier: String,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub events: Vec<Value>,
    /// The store's error, if settling failed.
    pub error: Option<String>,
}

/// One line of simulator output.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Line {
    Decision(Decision),
    Settlement(Settlement),
}

impl Line {
    pub fn decision(&self) -> Option<&Decision> {
        match self {
            Line::Decision(d) => Some(d),
            Line::Settlement(_) => None,
        }
    }

    pub fn settlement(&self) -> Option<&Settlement> {
        match self {
            Line::Settlement(s) => Some(s),
            Line::Decision(_) => None,
        }
    }

    /// The line as one JSON object.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The line as human-readable text (events on indented lines below it).
    pub fn to_text(&self) -> String {
        match self {
            Line::Decision(d) => {
                let who = d.identity.as_deref().unwrap_or("-");
                let mut s = format!("{}  #{:<4} {who:<10} {:<10} ", d.at, d.line, d.tier);
                match d.outcome {
                    Outcome::Allowed => {
                        s.push_str("ALLOWED     ");
                        let served = d.served_model.as_deref().unwrap_or(&d.model);
                        if d.downgraded {
                            s.push_str(&format!("model {} -> {served} (downgraded)", d.model));
                        } else {
                            s.push_str(&format!("model {served}"));
                        }
                    }
                    Outcome::Denied => s.push_str(&format!(
                        "DENIED {}  {}: {}",
                        d.status,
                        d.code.as_deref().unwrap_or("-"),
                        d.message.as_deref().unwrap_or("")
                    )),
                    Outcome::Refused => s.push_str(&format!(
                        "REFUSED {}  {}: {}",
                        d.status,
                        d.code.as_deref().unwrap_or("-"),
                        d.message.as_deref().unwrap_or("")
                    )),
                }
                let headers: Vec<String> = d
                    .headers
                    .iter()
                    .filter(|(k, _)| k != DOWNGRADE_HEADER)
                    .map(|(k, v)| format!("{}={v}", k.strip_prefix("x-ratelimit-").unwrap_or(k)))
                    .collect();
                if !headers.is_empty() {
                    s.push_str(&format!("\n      headers: {}", headers.join(" ")));
                }
                if let Some(w) = &d.warning {
                    s.push_str(&format!("\n      {WARNING_HEADER}: {w}"));
                }
                if let Some(m) = &d.warning_message {
                    s.push_str(&format!("\n      warning: {m}"));
                }
                for e in &d.events {
                    s.push_str(&format!("\n      webhook: {e}"));
                }
                s
            }
            Line::Settlement(st) => {
                let who = st.identity.as_deref().unwrap_or("-");
                let n = |v: Option<u64>| v.map_or("unknown".to_owned(), |v| v.to_string());
                let mut s = format!(
                    "{}  #{:<4} {who:<10} {:<10} SETTLED     input {} output {}",
                    st.at,
                    st.line,
                    st.tier,
                    n(st.input_tokens),
                    n(st.output_tokens)
                );
                if let Some(e) = &st.error {
                    s.push_str(&format!("  (store error: {e})"));
                }
                for e in &st.events {
                    s.push_str(&format!("\n      webhook: {e}"));
                }
                s
            }
        }
    }
}

/// Which request header or body field carries a trace's identity and tier.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Carriers {
    identity_header: Option<(String, bool)>,
    user_field: bool,
    tier_header: Option<String>,
}

impl Carriers {
    /// From the policy JSON: the first source that can carry an identity wins.
    fn of(raw: &Value) -> Carriers {
        let mut c = Carriers {
            tier_header: raw["tier"]["header"].as_str().map(str::to_ascii_lowercase),
            ..Carriers::default()
        };
        let identity = &raw["identity"];
        if let Some(h) = identity["header"].as_str() {
            c.identity_header = Some((h.to_ascii_lowercase(), false));
            return c;
        }
        for s in identity["sources"].as_array().into_iter().flatten() {
            if let Some(h) = s["header"].as_str().or(s["session_header"].as_str()) {
                c.identity_header = Some((h.to_ascii_lowercase(), false));
                return c;
            }
            if let Some(h) = s["api_key_header"].as_str() {
                c.identity_header = Some((h.to_ascii_lowercase(), true));
                return c;
            }
            if s.get("user_field").is_some() {
                c.user_field = true;
                return c;
            }
        }
        c
    }
}

fn parse_at(at: &Value) -> Result<u64, String> {
    match at {
        Value::Number(n) => n.as_u64().ok_or_else(|| format!("at: {n} is not epoch milliseconds (a whole number from 0)")),
        Value::String(text) => {
            let t: jiff::Timestamp =
                text.parse().map_err(|e| format!("at: {text:?} is not an RFC 3339 time ({e})"))?;
            u64::try_from(t.as_millisecond()).map_err(|_| format!("at: {text:?} is before 1970"))
        }
        other => Err(format!("at: must be an RFC 3339 time or epoch milliseconds, not {other}")),
    }
}

fn parse_trace(trace: &str) -> Result<Vec<Request>, TraceError> {
    let mut out = Vec::new();
    for (i, text) in trace.lines().enumerate() {
        let line = i + 1;
        let t = text.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let raw: RawRequest =
            serde_json::from_str(t).map_err(|e| TraceError { line, message: e.to_string() })?;
        let at_ms = parse_at(&raw.at).map_err(|message| TraceError { line, message })?;
        out.push(Request { line, at_ms, raw });
    }
    out.sort_by_key(|r| (r.at_ms, r.line));
    Ok(out)
}

/// Filler text whose prompt estimate (3 priming + 4 per message + bytes / 4, at least 16) is
/// `tokens`.
fn filler(tokens: u64) -> String {
    "x".repeat((tokens.saturating_sub(7) * 4) as usize)
}

struct Pending {
    due: u64,
    line: usize,
    identity: Option<String>,
    tier: String,
    ticket: Ticket,
    usage: Usage,
}

/// Replays `trace` through the gate under `loaded`'s policy. A bad trace line fails the whole
/// run before anything is replayed.
pub fn simulate(loaded: &Loaded, trace: &str) -> Result<Vec<Line>, TraceError> {
    let requests = parse_trace(trace)?;
    let policy = &loaded.policy;
    let carriers = Carriers::of(&loaded.raw);
    let mut store = MemoryStore::new();
    let mut queue: Queue = BinaryHeap::new();
    let mut pending: Vec<Option<Pending>> = Vec::new();
    let mut out = Vec::new();
    let no_secrets = |_: &str| None;

    for (n, req) in requests.into_iter().enumerate() {
        settle_due(loaded, Some(req.at_ms), &mut store, &mut out, &mut queue, &mut pending);
        let r = &req.raw;
        let model = r.model.clone().unwrap_or_else(|| default_model(loaded, r.tier.as_deref()));

        let mut headers: Vec<(String, String)> = Vec::new();
        let mut user = None;
        if let Some(id) = &r.identity {
            if let Some((h, bearer)) = &carriers.identity_header {
                headers.push((h.clone(), if *bearer { format!("Bearer {id}") } else { id.clone() }));
            } else if carriers.user_field {
                user = Some(id.clone());
            }
        }
        if let (Some(tier), Some(h)) = (&r.tier, &carriers.tier_header) {
            headers.push((h.clone(), tier.clone()));
        }
        if let Some(lang) = &r.accept_language {
            headers.push(("accept-language".to_owned(), lang.clone()));
        }
        let header = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        let peer = r.ip.as_deref();

        let mut body = json!({
            "model": model,
            "messages": [{"role": "user", "content": filler(r.input_tokens.unwrap_or(0))}],
        });
        if let Some(m) = r.max_tokens {
            body["max_tokens"] = json!(m);
        }
        if let Some(s) = r.stream {
            body["stream"] = json!(s);
        }
        if let Some(u) = &user {
            body["user"] = json!(u);
        }
        let body = serde_json::to_vec(&body).unwrap_or_default();

        let facts = Facts { header: &header, peer_address: peer, now_ms: req.at_ms, secrets: &no_secrets, claim: &tollgate_core::identity::no_claims };
        let resolved_tier = policy
            .identity
            .resolve(
                &RequestFacts { header: &header, user_field: user.as_deref(), peer_address: peer, now_ms: req.at_ms, claim: &tollgate_core::identity::no_claims },
                &no_secrets,
            )
            .map(|s| s.tier)
            .unwrap_or_else(|_| "?".to_owned());
        let lease_id = n as u64 + 1;
        let decision = match gate::admit_chat(policy, &facts, &body, &mut store, lease_id) {
            Gate::Forward(a) => {
                let served = Some(a.request.model.clone());
                let downgraded = a.headers.iter().any(|(k, _)| *k == DOWNGRADE_HEADER);
                let decision = Decision {
                    line: req.line,
                    at: timestamp(req.at_ms),
                    at_ms: req.at_ms,
                    identity: r.identity.clone(),
                    tier: a.tier.clone(),
                    outcome: Outcome::Allowed,
                    status: 200,
                    code: None,
                    message: None,
                    model: model.clone(),
                    served_model: served,
                    downgraded,
                    headers: a.headers.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect(),
                    warning: a.warning.as_ref().map(|w| w.header.clone()),
                    warning_message: a
                        .warning
                        .as_ref()
                        .and_then(|w| w.object.as_ref())
                        .and_then(|o| o["message"].as_str())
                        .map(str::to_owned),
                    events: parse_events(&a.events),
                };
                if let Some(ticket) = a.ticket {
                    let seq = pending.len() as u64;
                    let due = req.at_ms.saturating_add(r.duration_ms.unwrap_or(0));
                    pending.push(Some(Pending {
                        due,
                        line: req.line,
                        identity: r.identity.clone(),
                        tier: a.tier.clone(),
                        ticket,
                        usage: Usage { input: r.input_tokens, output: r.output_tokens, ..Usage::default() },
                    }));
                    queue.push(Reverse((due, seq)));
                }
                decision
            }
            Gate::Reply { response, why, .. } => {
                let body: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
                let error = &body["error"];
                Decision {
                    line: req.line,
                    at: timestamp(req.at_ms),
                    at_ms: req.at_ms,
                    identity: r.identity.clone(),
                    tier: resolved_tier,
                    outcome: if why == Refused::Limited { Outcome::Denied } else { Outcome::Refused },
                    status: response.status,
                    code: error["code"].as_str().map(str::to_owned),
                    message: error["message"].as_str().map(str::to_owned),
                    model: model.clone(),
                    served_model: None,
                    downgraded: false,
                    headers: response
                        .headers
                        .iter()
                        .filter(|(k, _)| *k != "content-type")
                        .map(|(k, v)| ((*k).to_owned(), v.clone()))
                        .collect(),
                    warning: None,
                    warning_message: None,
                    events: vec![],
                }
            }
        };
        out.push(Line::Decision(decision));
    }
    settle_due(loaded, None, &mut store, &mut out, &mut queue, &mut pending);
    Ok(out)
}

type Queue = BinaryHeap<Reverse<(u64, u64)>>;

/// Settles every pending request due at or before `limit` (all of them when `None`), in due
/// order (admission order on a tie).
fn settle_due(loaded: &Loaded, limit: Option<u64>, store: &mut MemoryStore, out: &mut Vec<Line>, queue: &mut Queue, pending: &mut [Option<Pending>]) {
    while let Some(Reverse((due, seq))) = queue.peek().copied() {
        if limit.is_some_and(|l| due > l) {
            break;
        }
        queue.pop();
        let Some(p) = pending.get_mut(seq as usize).and_then(Option::take) else { continue };
        let ending = Ending::Served { usage: p.usage, model: None };
        let settled = gate::finish(&loaded.policy, store, &p.ticket, &ending, p.due);
        let (events, error) = (settled.events, settled.error.map(|e| e.to_string()));
        out.push(Line::Settlement(Settlement {
            line: p.line,
            at: timestamp(p.due),
            at_ms: p.due,
            identity: p.identity,
            tier: p.tier,
            input_tokens: p.usage.input,
            output_tokens: p.usage.output,
            events: parse_events(&events),
            error,
        }));
    }
}

fn parse_events(events: &[Vec<u8>]) -> Vec<Value> {
    events.iter().map(|e| serde_json::from_slice(e).unwrap_or(Value::Null)).collect()
}

/// A request without `model`: the first model the tier's (or the default tier's) guards allow, else the first mapped
/// model, else `gpt-4o-mini`.
fn default_model(loaded: &Loaded, tier: Option<&str>) -> String {
    let p = &loaded.policy;
    let tier = tier.filter(|t| p.tier_names().any(|n| n == *t)).or(loaded.raw["tier"]["default"].as_str());
    if let Some(models) = tier.and_then(|t| p.rules(t).guards.models()) {
        if let Some(m) = models.first() {
            return m.clone();
        }
    }
    p.routes.model_names().next().unwrap_or("gpt-4o-mini").to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_core::guard::estimate_prompt_tokens;
    use tollgate_core::openai::ChatRequest;

    #[test]
    fn filler_text_estimates_at_the_requested_prompt_tokens() {
        for tokens in [16u64, 17, 100, 500, 47_500] {
            let body = json!({"model": "m", "messages": [{"role": "user", "content": filler(tokens)}]});
            let req: ChatRequest = serde_json::from_value(body).unwrap();
            assert_eq!(estimate_prompt_tokens(&req), tokens);
        }
        // Below the floor, the estimate is the floor.
        let req: ChatRequest = serde_json::from_value(json!({"model": "m", "messages": [{"role": "user", "content": filler(3)}]})).unwrap();
        assert_eq!(estimate_prompt_tokens(&req), tollgate_core::guard::PROMPT_FLOOR);
    }

    #[test]
    fn bad_lines_name_their_line_number() {
        let err = |trace: &str| parse_trace(trace).err().unwrap().to_string();
        assert_eq!(err("{\"at\": 1}\n\n{\"at\": -5}"), "line 3: at: -5 is not epoch milliseconds (a whole number from 0)");
        assert_eq!(err("# comment\n{\"at\": true}"), "line 2: at: must be an RFC 3339 time or epoch milliseconds, not true");
        assert!(err("{\"at\": \"noon\"}").starts_with("line 1: at: \"noon\" is not an RFC 3339 time ("));
        assert!(err("{\"identity\": \"a\"}").starts_with("line 1: missing field `at`"));
        assert!(err("{\"at\": 1, \"who\": 2}").starts_with("line 1: unknown field `who`"));
        assert!(err("{\"at\": 1").starts_with("line 1: EOF while parsing"));
    }

    #[test]
    fn requests_run_in_time_order_file_order_on_a_tie() {
        let reqs = parse_trace("{\"at\": 2000, \"identity\": \"b\"}\n{\"at\": \"1970-01-01T00:00:01Z\", \"identity\": \"a\"}\n{\"at\": 2000, \"identity\": \"c\"}").unwrap();
        let order: Vec<(usize, u64)> = reqs.iter().map(|r| (r.line, r.at_ms)).collect();
        assert_eq!(order, vec![(2, 1000), (1, 2000), (3, 2000)]);
    }

    #[test]
    fn identity_goes_where_the_first_capable_source_reads_it() {
        let c = |raw: Value| Carriers::of(&raw);
        assert_eq!(c(json!({"tier": {"default": "a"}})), Carriers::default());
        assert_eq!(
            c(json!({"identity": {"header": "X-User"}, "tier": {"header": "X-Tier", "default": "a"}})),
            Carriers { identity_header: Some(("x-user".into(), false)), user_field: false, tier_header: Some("x-tier".into()) }
        );
        assert_eq!(
            c(json!({"identity": {"sources": [{"client_ip": {}}, {"user_field": true}, {"header": "h"}]}, "tier": {"default": "a"}})),
            Carriers { identity_header: None, user_field: true, tier_header: None }
        );
        assert_eq!(
            c(json!({"identity": {"sources": [{"signed_header": "s", "secret": "S"}, {"api_key_header": "Authorization"}]}, "tier": {"default": "a"}})),
            Carriers { identity_header: Some(("authorization".into(), true)), user_field: false, tier_header: None }
        );
    }
}
