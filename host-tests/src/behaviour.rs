//! The behaviour suite: one table of scenarios — the request, what the provider does, what the
//! client must see (status, the headers that matter, the body's shape, how a stream ends, the
//! usage afterwards) — that every host runs and must answer the same way: the filter in the
//! wasmtime host (with Envoy's semantics and with ngx_wasm_module's), in real Envoy, and the
//! worker in real workerd (tests/behaviour.rs). A host only drives I/O; core decides; so the
//! answers must not differ.
//!
//! Where a host cannot do something, [`difference`] says so, and why, in one place: that is the
//! only place a host's expectation may depart from the table.
//!
//! The provider is always the built-in mock provider (one process serving OpenAI, Anthropic
//! and Gemini paths, plus one that fails every request for the fallback scenario), steered per
//! request with its `x-mock-*` knobs. Every scenario uses its own user, so the usage
//! afterwards is the scenario's alone.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Which policy (and so which host config) a scenario runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stack {
    /// A model map: `gpt`, `gpt-small` (OpenAI-compatible), `claude` (Anthropic), `broken` (a
    /// provider that fails every request) and the alias `auto` = [`broken`, `gpt`].
    Translating,
    /// No model map: chat completions pass through to the one upstream.
    Passthrough,
}

/// What the client does with the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    /// Reads it whole.
    Reads,
    /// Leaves as soon as the first body bytes arrived.
    LeavesAfterFirstBytes,
}

/// A request of the suite.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: &'static str,
    pub path: &'static str,
    /// `x-tollgate-tier`, when not the default tier.
    pub tier: Option<&'static str>,
    /// Other headers (the mock's knobs).
    pub headers: Vec<(&'static str, String)>,
    pub body: Option<String>,
    pub client: Client,
    /// The same request sent this many times first (answers not checked): usage the
    /// scenario's request finds already counted.
    pub before: u32,
}

/// What a header must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Want {
    Present,
    Absent,
    Is(String),
}

/// How a body must look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// A chat completion whose `model` is this (and, when `warning`, a `tollgate` object).
    Completion { model: &'static str, warning: bool },
    /// An OpenAI error object with this `code`.
    Error { code: &'static str },
    /// An SSE stream: chat chunks, with or without the usage chunk, ending so.
    Stream { usage_chunk: bool, end: End },
    /// The usage report: `tollgate.usage`, the tier, an identity key, every limit with its
    /// fields.
    Usage { tier: &'static str },
    /// OpenAI's model list with these ids, in this order.
    Models { ids: &'static [&'static str] },
}

/// How a stream ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// `data: [DONE]`, then the end of the response.
    Done,
    /// An OpenAI error event (`data: {"error": …}`), no `[DONE]`, then the end of the response.
    ErrorEvent,
    /// The response was cut: no end of the chunked body.
    Cut,
}

/// What the tokens charged afterwards must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tokens {
    Exactly(u64),
    /// The request's reservation (what the admission reserved: the token limit minus the
    /// `x-ratelimit-remaining-tokens` the answer carried, for a fresh user).
    Reserved,
}

/// What the client must see.
#[derive(Debug, Clone)]
pub struct Expect {
    pub status: u16,
    pub headers: Vec<(&'static str, Want)>,
    pub body: Body,
    /// The caller's `requests/day` and `total_tokens/day` used afterwards (`None`: not checked,
    /// e.g. the usage endpoint itself).
    pub usage_after: Option<(u64, Tokens)>,
    /// Whether the provider may be reached (`false`: the request is answered by Tollgate).
    pub reaches_provider: bool,
    /// The request's usage record (`None`: it leaves none — it never reached the gate's
    /// decision: not a chat request, an unreadable body, an unknown model).
    pub record: Option<Rec>,
}

/// What a request's usage record must say (docs/usage-records.md); its `status` is the
/// client's, and it holds neither the prompt nor the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rec {
    /// `allowed`, `warned`, `downgraded`, `blocked` or `refused`.
    pub decision: &'static str,
    /// How it ended (`None`: absent — refused before anything was sent).
    pub ending: Option<&'static str>,
    /// The input + output tokens it carries as the provider reported them (`None`: absent,
    /// the provider reported none; `Some(u64::MAX)`: any count).
    pub tokens: Option<u64>,
    /// Upstream attempts.
    pub attempts: u64,
    /// The model that served (`None`: not checked).
    pub served_model: Option<&'static str>,
}

/// A record of a request served as asked with `tokens` reported, in one attempt.
fn served_rec(tokens: Option<u64>) -> Option<Rec> {
    Some(Rec { decision: "allowed", ending: Some("served"), tokens, attempts: 1, served_model: None })
}

/// A record of a request the provider did not serve.
fn not_served_rec() -> Option<Rec> {
    Some(Rec { decision: "allowed", ending: Some("not_served"), tokens: None, attempts: 1, served_model: None })
}

/// A record of a request a guard refused before admission.
fn refused_rec() -> Option<Rec> {
    Some(Rec { decision: "refused", ending: None, tokens: None, attempts: 0, served_model: None })
}

/// One scenario.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: &'static str,
    pub stack: Stack,
    pub request: Request,
    pub expect: Expect,
}

/// The hosts the suite runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKind {
    /// filter.wasm in the wasmtime host with Envoy's semantics.
    WasmtimeEnvoy,
    /// filter.wasm in the wasmtime host with ngx_wasm_module's semantics.
    WasmtimeNgx,
    /// filter.wasm in real Envoy.
    Envoy,
    /// filter.wasm in two real Envoys sharing Redis through `tollgate store` (`store.redis`).
    EnvoyFleet,
    /// The worker in real workerd.
    Workerd,
}

/// The one place where a host's answer may depart from the table, and why. `None`: the host
/// answers exactly as the table says. A `Skip` names what the host lacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Difference {
    /// The scenario cannot run on this host.
    Skip(&'static str),
    /// The stream ends differently on this host.
    StreamEnds(End, &'static str),
}

/// See [`Difference`].
pub fn difference(host: HostKind, scenario: &str) -> Option<Difference> {
    use HostKind::*;
    match (host, scenario) {
        (WasmtimeEnvoy | WasmtimeNgx, "alias_falls_back_to_the_next_deployment") => Some(Difference::Skip(
            "the wasmtime host runs one filter and one upstream per stream: no router, no retries, no aggregate cluster or upstream filter, which Envoy's fallback is made of (envoy_fallback.rs covers it in real Envoy)",
        )),
        (Envoy | EnvoyFleet | WasmtimeEnvoy | WasmtimeNgx, "a_stream_cut_mid_way_keeps_its_reservation") => Some(Difference::StreamEnds(
            End::Cut,
            "when the upstream resets after the response headers, Envoy resets the client's stream; no filter callback runs in between, so no error event can be written (docs/behaviour.md)",
        )),
        _ => None,
    }
}

/// Core's prompt estimate for every [`chat`] body (its one short user message).
const CHAT_PROMPT_ESTIMATE: u64 = 16;

fn chat(model: &str, extra: &str) -> String {
    format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"Say hello."}}],"max_tokens":20{extra}}}"#)
}

fn knob(name: &'static str, value: &str) -> (&'static str, String) {
    (name, value.to_owned())
}

fn post(body: String) -> Request {
    Request { method: "POST", path: "/v1/chat/completions", tier: None, headers: vec![], body: Some(body), client: Client::Reads, before: 0 }
}

/// The headers every answer from a provider must lose (the mock sends them all, as the real
/// APIs do).
fn no_account_headers() -> Vec<(&'static str, Want)> {
    ["openai-organization", "openai-project", "anthropic-organization-id", "set-cookie"].into_iter().map(|h| (h, Want::Absent)).collect()
}

/// A request no surface takes: Tollgate's OpenAI error, nothing counted, nothing sent.
fn not_a_surface(status: u16, code: &'static str) -> Expect {
    Expect {
        status,
        headers: vec![("content-type", Want::Is("application/json".into()))],
        body: Body::Error { code },
        usage_after: Some((0, Tokens::Exactly(0))),
        reaches_provider: false,
        record: None,
    }
}

fn served(headers: Vec<(&'static str, Want)>, body: Body, tokens: Tokens) -> Expect {
    let mut all = vec![("x-ratelimit-limit-requests", Want::Is("100".into())), ("x-ratelimit-remaining-requests", Want::Is("99".into()))];
    all.extend(no_account_headers());
    all.extend(headers);
    let reported = match tokens {
        Tokens::Exactly(n) => Some(n),
        Tokens::Reserved => None,
    };
    Expect { status: 200, headers: all, body, usage_after: Some((1, tokens)), reaches_provider: true, record: served_rec(reported) }
}

/// The table (module docs).
pub fn scenarios() -> Vec<Scenario> {
    use Stack::*;
    let stream = r#","stream":true"#;
    let stream_usage = r#","stream":true,"stream_options":{"include_usage":true}"#;
    let json = || ("content-type", Want::Is("application/json".into()));
    let sse = || ("content-type", Want::Is("text/event-stream".into()));
    vec![
        Scenario {
            name: "a_passed_through_answer_is_settled_to_its_usage",
            stack: Passthrough,
            request: post(chat("mock-model", "")),
            expect: served(vec![json()], Body::Completion { model: "mock-model", warning: false }, Tokens::Exactly(17)),
        },
        Scenario {
            name: "a_passed_through_stream_with_include_usage_shows_and_settles_it",
            stack: Passthrough,
            request: post(chat("mock-model", stream_usage)),
            expect: served(vec![sse()], Body::Stream { usage_chunk: true, end: End::Done }, Tokens::Exactly(17)),
        },
        Scenario {
            name: "a_passed_through_stream_without_include_usage_is_settled_to_its_usage_unseen",
            stack: Passthrough,
            request: post(chat("mock-model", stream)),
            expect: served(vec![sse()], Body::Stream { usage_chunk: false, end: End::Done }, Tokens::Exactly(17)),
        },
        Scenario {
            name: "a_translated_answer_is_openai_and_settled_to_its_usage",
            stack: Translating,
            request: post(chat("claude", "")),
            expect: served(vec![json()], Body::Completion { model: "claude", warning: false }, Tokens::Exactly(17)),
        },
        Scenario {
            name: "a_translated_stream_without_include_usage_is_settled_to_its_usage",
            stack: Translating,
            request: post(chat("claude", stream)),
            expect: served(vec![sse()], Body::Stream { usage_chunk: false, end: End::Done }, Tokens::Exactly(17)),
        },
        Scenario {
            name: "a_mapped_openai_stream_with_include_usage_shows_it",
            stack: Translating,
            request: post(chat("gpt", stream_usage)),
            expect: served(vec![sse()], Body::Stream { usage_chunk: true, end: End::Done }, Tokens::Exactly(17)),
        },
        Scenario {
            name: "a_tier_past_its_soft_limit_is_warned_and_downgraded",
            stack: Translating,
            // The first request settles 17 of 100 tokens: past the 10 % thresholds.
            request: Request { tier: Some("tight"), before: 1, ..post(chat("gpt", "")) },
            expect: Expect {
                status: 200,
                headers: vec![
                    ("x-tollgate-warning", Want::Present),
                    ("x-tollgate-downgraded-to", Want::Is("gpt-small".into())),
                    ("x-ratelimit-limit-tokens", Want::Is("100".into())),
                ],
                // (An OpenAI-compatible answer names the model that served, as OpenAI does.)
                body: Body::Completion { model: "mock-small", warning: true },
                usage_after: Some((2, Tokens::Exactly(34))),
                reaches_provider: true,
                record: Some(Rec { decision: "downgraded", ending: Some("served"), tokens: Some(17), attempts: 1, served_model: Some("gpt-small") }),
            },
        },
        Scenario {
            name: "a_request_over_the_limit_is_blocked_and_not_counted",
            stack: Translating,
            request: Request { tier: Some("strict"), ..post(chat("gpt", "").replace(r#""max_tokens":20"#, r#""max_tokens":400"#)) },
            expect: Expect {
                status: 429,
                headers: vec![("x-ratelimit-limit-tokens", Want::Is("100".into()))],
                body: Body::Error { code: "rate_limit_exceeded" },
                usage_after: Some((0, Tokens::Exactly(0))),
                reaches_provider: false,
                record: Some(Rec { decision: "blocked", ending: None, tokens: None, attempts: 0, served_model: None }),
            },
        },
        Scenario {
            name: "a_guard_refuses_before_anything_is_counted",
            stack: Translating,
            request: post(chat("gpt", "").replace(r#""max_tokens":20"#, r#""max_tokens":5000"#)),
            expect: Expect { status: 400, headers: vec![json()], body: Body::Error { code: "max_tokens_exceeded" }, usage_after: Some((0, Tokens::Exactly(0))), reaches_provider: false, record: refused_rec() },
        },
        Scenario {
            name: "an_unknown_model_is_a_404",
            stack: Translating,
            request: post(chat("nope", "")),
            expect: Expect { status: 404, headers: vec![json()], body: Body::Error { code: "model_not_found" }, usage_after: Some((0, Tokens::Exactly(0))), reaches_provider: false, record: None },
        },
        Scenario {
            name: "a_provider_429_is_an_openai_429_with_retry_after_and_costs_no_tokens",
            stack: Translating,
            request: Request {
                headers: vec![knob("x-mock-fixture", "anthropic/error_429_rate_limit.json"), knob("x-mock-retry-after", "7")],
                ..post(chat("claude", ""))
            },
            expect: Expect {
                status: 429,
                headers: vec![json(), ("retry-after", Want::Is("7".into())), ("x-ratelimit-remaining-requests", Want::Is("99".into()))],
                body: Body::Error { code: "rate_limit_exceeded" },
                usage_after: Some((1, Tokens::Exactly(0))),
                reaches_provider: true,
                record: not_served_rec(),
            },
        },
        Scenario {
            name: "a_provider_5xx_with_an_empty_body_is_an_openai_error_and_costs_no_tokens",
            stack: Translating,
            request: Request { headers: vec![knob("x-mock-empty", "503")], ..post(chat("gpt", "")) },
            expect: Expect { status: 503, headers: vec![json()], body: Body::Error { code: "provider_error" }, usage_after: Some((1, Tokens::Exactly(0))), reaches_provider: true, record: not_served_rec() },
        },
        Scenario {
            name: "a_passed_through_5xx_with_an_empty_body_is_an_openai_error",
            stack: Passthrough,
            request: Request { headers: vec![knob("x-mock-empty", "502")], ..post(chat("mock-model", "")) },
            expect: Expect { status: 502, headers: vec![json()], body: Body::Error { code: "provider_error" }, usage_after: Some((1, Tokens::Exactly(0))), reaches_provider: true, record: not_served_rec() },
        },
        Scenario {
            name: "alias_falls_back_to_the_next_deployment",
            stack: Translating,
            request: post(chat("auto", "")),
            expect: Expect {
                record: Some(Rec { decision: "allowed", ending: Some("served"), tokens: Some(17), attempts: 2, served_model: Some("gpt") }),
                ..served(vec![json(), ("x-tollgate-deployment", Want::Is("gpt".into()))], Body::Completion { model: "mock-gpt", warning: false }, Tokens::Exactly(17))
            },
        },
        Scenario {
            name: "a_stream_cut_mid_way_keeps_its_reservation",
            stack: Translating,
            request: Request { headers: vec![knob("x-mock-reset-after", "3")], ..post(chat("gpt", stream_usage)) },
            expect: served(vec![sse()], Body::Stream { usage_chunk: false, end: End::ErrorEvent }, Tokens::Reserved),
        },
        Scenario {
            name: "a_client_leaving_mid_stream_is_charged_its_reservation_and_frees_its_lease",
            stack: Translating,
            request: Request { headers: vec![knob("x-mock-delay-ms", "200")], client: Client::LeavesAfterFirstBytes, ..post(chat("gpt", stream)) },
            expect: Expect {
                status: 200,
                headers: vec![sse()],
                body: Body::Stream { usage_chunk: false, end: End::Cut },
                usage_after: Some((1, Tokens::Reserved)),
                reaches_provider: true,
                // Core's one ending rule: a stream begun was served, its usage unknown (absent).
                record: served_rec(None),
            },
        },
        Scenario {
            name: "the_usage_endpoint_reports_the_callers_limits",
            stack: Translating,
            request: Request { method: "GET", path: "/v1/tollgate/usage", tier: None, headers: vec![], body: None, client: Client::Reads, before: 0 },
            expect: Expect {
                status: 200,
                headers: vec![json(), ("cache-control", Want::Is("no-store".into()))],
                body: Body::Usage { tier: "free" },
                usage_after: None,
                reaches_provider: false,
                record: None,
            },
        },
        Scenario {
            name: "an_unmetered_api_surface_is_a_404_and_never_reaches_the_provider",
            stack: Passthrough,
            request: Request { path: "/v1/embeddings", ..post(r#"{"model":"mock-model","input":"hello"}"#.to_owned()) },
            expect: not_a_surface(404, "unknown_url"),
        },
        Scenario {
            name: "a_percent_encoded_chat_path_is_not_chat",
            stack: Passthrough,
            request: Request { path: "/v1/chat/%63ompletions", ..post(chat("mock-model", "")) },
            expect: not_a_surface(404, "unknown_url"),
        },
        Scenario {
            name: "a_chat_path_with_a_trailing_slash_is_not_chat",
            stack: Translating,
            request: Request { path: "/v1/chat/completions/", ..post(chat("gpt", "")) },
            expect: not_a_surface(404, "unknown_url"),
        },
        Scenario {
            name: "another_method_on_the_chat_path_is_a_405",
            stack: Passthrough,
            request: Request { method: "GET", path: "/v1/chat/completions", tier: None, headers: vec![], body: None, client: Client::Reads, before: 0 },
            expect: Expect { headers: vec![json(), ("allow", Want::Is("POST".into()))], ..not_a_surface(405, "method_not_allowed") },
        },
        Scenario {
            name: "the_model_list_is_what_the_tier_may_ask_for",
            stack: Translating,
            request: Request { method: "GET", path: "/v1/models", tier: None, headers: vec![], body: None, client: Client::Reads, before: 0 },
            expect: Expect {
                status: 200,
                headers: vec![json()],
                body: Body::Models { ids: &["broken", "claude", "gpt", "gpt-small", "auto"] },
                usage_after: Some((0, Tokens::Exactly(0))),
                reaches_provider: false,
                record: None,
            },
        },
        Scenario {
            name: "n_of_zero_is_refused_unsent",
            stack: Translating,
            request: post(chat("gpt", r#","n":0"#)),
            expect: Expect { record: refused_rec(), ..not_a_surface(400, "integer_below_min_value") },
        },
        Scenario {
            name: "n_above_128_is_refused_unsent",
            stack: Translating,
            request: post(chat("gpt", r#","n":129"#)),
            expect: Expect { record: refused_rec(), ..not_a_surface(400, "integer_above_max_value") },
        },
        Scenario {
            name: "a_tier_without_a_max_tokens_guard_reserves_at_most_what_a_model_writes",
            stack: Translating,
            // 2^64 - 1 asked: the reservation is the prompt's estimate and 131 072 (the output
            // ceiling of a model with no max_output_tokens), of the open tier's 1 000 000.
            request: Request { tier: Some("open"), ..post(chat("gpt", r#","max_completion_tokens":18446744073709551615"#)) },
            expect: served(
                vec![
                    json(),
                    ("x-ratelimit-limit-tokens", Want::Is("1000000".into())),
                    ("x-ratelimit-remaining-tokens", Want::Is(format!("{}", 1_000_000 - 131_072 - CHAT_PROMPT_ESTIMATE))),
                ],
                Body::Completion { model: "mock-gpt", warning: false },
                Tokens::Exactly(17),
            ),
        },
        Scenario {
            name: "absurd_reported_usage_is_charged_up_to_the_bound",
            stack: Translating,
            request: Request { headers: vec![knob("x-mock-usage", "18446744073709551615,18446744073709551615")], ..post(chat("gpt", "")) },
            // A prompt of at most 10 000 000 tokens, at most 131 072 written for one choice.
            expect: Expect {
                record: served_rec(Some(u64::MAX)),
                ..served(vec![json()], Body::Completion { model: "mock-gpt", warning: false }, Tokens::Exactly(10_000_000 + 131_072))
            },
        },
    ]
}

/// The suite's policy for a stack: `mock` is the mock provider's base URL, `failing` one that
/// fails every request.
pub fn policy(stack: Stack, mock: &str, failing: &str) -> Value {
    let mut p = serde_json::json!({
        "identity": { "header": "x-tollgate-user" },
        "tier": { "header": "x-tollgate-tier", "default": "free" },
        "store": { "on_failure": "deny" },
        "tiers": {
            "free": {
                "limits": [ { "window": "day", "requests": 100 }, { "window": "day", "total_tokens": 100000 }, { "concurrent": 5 } ],
                "guards": { "max_tokens": 500 }
            },
            "tight": {
                "limits": [ { "window": "day", "requests": 100 },
                            { "window": "day", "total_tokens": 100, "soft": [ { "at": 10, "action": "warn" }, { "at": 10, "action": "downgrade", "model": "gpt-small" } ] },
                            { "concurrent": 5 } ],
                "guards": { "max_tokens": 500 },
                "messages": { "body_object": true }
            },
            "strict": {
                "limits": [ { "window": "day", "requests": 100 }, { "window": "day", "total_tokens": 100 }, { "concurrent": 5 } ],
                "guards": { "max_tokens": 500 }
            },
            "open": {
                "limits": [ { "window": "day", "requests": 100 }, { "window": "day", "total_tokens": 1000000 }, { "concurrent": 5 } ]
            }
        }
    });
    if stack == Stack::Translating {
        p["providers"] = serde_json::json!({
            "openai": { "kind": "openai", "cluster": "mock", "base_url": mock },
            "anthropic": { "kind": "anthropic", "cluster": "mock", "base_url": mock, "default_max_tokens": 100 },
            "failing": { "kind": "openai", "cluster": "failing", "base_url": failing }
        });
        p["models"] = serde_json::json!({
            "gpt": { "provider": "openai", "model": "mock-gpt" },
            "gpt-small": { "provider": "openai", "model": "mock-small" },
            "claude": { "provider": "anthropic", "model": "claude-mock" },
            "broken": { "provider": "failing", "model": "mock-broken" }
        });
        // USD per million tokens: a record of reported tokens carries their cost.
        p["prices"] = serde_json::json!({
            "gpt": { "input": 2.5, "cached_input": 1.25, "output": 10 },
            "gpt-small": { "input": 0.15, "output": 0.6 },
            "claude": { "input": 3, "output": 15 }
        });
        p["aliases"] = serde_json::json!({ "auto": { "deployments": ["broken", "gpt"], "strategy": "priority" } });
        p["fallback"] = serde_json::json!({ "on": ["connect", "timeout", "reset", "429", "5xx"], "attempt_timeout_ms": 5000, "total_timeout_ms": 20000 });
    } else {
        // A downgrade names a model of the model map: there is none here.
        p["tiers"]["tight"]["limits"][1]["soft"] = serde_json::json!([ { "at": 10, "action": "warn" } ]);
    }
    p
}

/// What a host answered.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub status: u16,
    /// Names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The response ended properly (a complete chunked body or its whole length).
    pub complete: bool,
}

impl Observed {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 request over a fresh connection, read to its end however it ends — a cut
/// chunked body included, which ordinary clients turn into an error.
pub fn raw(base: &str, method: &str, path: &str, headers: &[(String, String)], body: Option<&str>, client: Client) -> Observed {
    let authority = base.trim_start_matches("http://").trim_end_matches('/');
    let mut conn = TcpStream::connect(authority).unwrap_or_else(|e| panic!("connect {authority}: {e}"));
    conn.set_read_timeout(Some(Duration::from_secs(30))).expect("read timeout");
    let body = body.unwrap_or("");
    let mut head = format!("{method} {path} HTTP/1.1\r\nhost: {authority}\r\nconnection: close\r\n");
    if method == "POST" {
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-type")) {
            head.push_str("content-type: application/json\r\n");
        }
        head.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    for (k, v) in headers.iter().filter(|(k, _)| !k.eq_ignore_ascii_case("content-length")) {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes()).and_then(|_| conn.write_all(body.as_bytes())).expect("send the request");
    let mut got = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
        }
        if client == Client::LeavesAfterFirstBytes {
            if let Some(i) = find(&got, b"\r\n\r\n") {
                if dechunk(&got[i + 4..]).0.windows(2).any(|w| w == b"\n\n") {
                    // The first event is in: the client goes away.
                    break;
                }
            }
        }
    }
    drop(conn);
    parse_response(&got)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A chunked body decoded as far as it goes, and whether its last (empty) chunk came.
fn dechunk(mut data: &[u8]) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    loop {
        let Some(line_end) = find(data, b"\r\n") else { return (out, false) };
        let size = std::str::from_utf8(&data[..line_end]).ok().and_then(|s| usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok());
        let Some(size) = size else { return (out, false) };
        let rest = &data[line_end + 2..];
        if size == 0 {
            return (out, true);
        }
        if rest.len() < size + 2 {
            out.extend_from_slice(&rest[..rest.len().min(size)]);
            return (out, false);
        }
        out.extend_from_slice(&rest[..size]);
        data = &rest[size + 2..];
    }
}

fn parse_response(raw: &[u8]) -> Observed {
    let Some(i) = find(raw, b"\r\n\r\n") else { return Observed::default() };
    let head = String::from_utf8_lossy(&raw[..i]);
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|s| s.parse().ok()).unwrap_or(0);
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned())).collect();
    let rest = &raw[i + 4..];
    let chunked = headers.iter().any(|(k, v)| k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
    let (body, complete) = if chunked {
        dechunk(rest)
    } else {
        let length = headers.iter().find(|(k, _)| k == "content-length").and_then(|(_, v)| v.parse::<usize>().ok());
        (rest.to_vec(), length.is_none_or(|l| l == rest.len()))
    };
    Observed { status, headers, body, complete }
}

/// The `data:` payloads of an SSE body.
pub fn sse_data(body: &str) -> Vec<String> {
    body.lines().filter_map(|l| l.strip_prefix("data:")).map(|d| d.trim().to_owned()).collect()
}

/// The limits a usage report shows: (requests/day used, total_tokens/day used, in flight).
pub fn usage_numbers(report: &Value) -> Option<(u64, u64, u64)> {
    let limits = report["limits"].as_array()?;
    let used = |metric: &str| limits.iter().find(|l| l["metric"] == metric && l["scope"] == "identity").and_then(|l| l["used"].as_u64());
    Some((used("requests")?, used("total_tokens")?, used("concurrent")?))
}

/// Checks one observed answer against the scenario's expectation on `host`; `Err` says what
/// differs.
pub fn check(host: HostKind, s: &Scenario, got: &Observed) -> Result<(), String> {
    let e = &s.expect;
    let mut problems = Vec::new();
    if got.status != e.status {
        problems.push(format!("status {} (want {})", got.status, e.status));
    }
    for (name, want) in &e.headers {
        let have = got.header(name);
        let ok = match want {
            Want::Present => have.is_some(),
            Want::Absent => have.is_none(),
            Want::Is(v) => have.is_some_and(|h| h.split(';').next().unwrap_or("").trim() == v),
        };
        if !ok {
            problems.push(format!("header {name}: {have:?} (want {want:?})"));
        }
    }
    let text = got.text();
    match &e.body {
        Body::Completion { model, warning } => match serde_json::from_str::<Value>(&text) {
            Ok(v) if v["object"] == "chat.completion" && v["choices"].is_array() => {
                if v["model"] != *model {
                    problems.push(format!("model {} (want {model})", v["model"]));
                }
                if v.get("tollgate").is_some() != *warning {
                    problems.push(format!("tollgate object {} (want {warning})", v.get("tollgate").is_some()));
                }
            }
            _ => problems.push(format!("not a chat completion: {text}")),
        },
        Body::Error { code } => match serde_json::from_str::<Value>(&text) {
            Ok(v) if v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()) => {
                if v["error"]["code"] != *code {
                    problems.push(format!("error code {} (want {code}): {text}", v["error"]["code"]));
                }
            }
            _ => problems.push(format!("not an OpenAI error: {text:?}")),
        },
        Body::Usage { tier } => match serde_json::from_str::<Value>(&text) {
            Ok(v) => {
                let fields = ["name", "scope", "metric", "unit", "window", "limit", "used", "remaining", "reset", "reset_in_ms"];
                let limits_ok = v["limits"].as_array().is_some_and(|l| !l.is_empty() && l.iter().all(|x| fields.iter().all(|f| x.get(f).is_some())));
                if v["object"] != "tollgate.usage" || v["tier"] != *tier || !v["identity"].as_str().is_some_and(|i| i.starts_with("tg1:q:")) || !limits_ok {
                    problems.push(format!("not the usage report: {text}"));
                }
                if usage_numbers(&v) != Some((0, 0, 0)) {
                    problems.push(format!("a stranger has used something: {text}"));
                }
            }
            Err(_) => problems.push(format!("not JSON: {text}")),
        },
        Body::Models { ids } => match serde_json::from_str::<Value>(&text) {
            Ok(v) if v["object"] == "list" => {
                let got: Vec<&str> = v["data"].as_array().map(|d| d.iter().filter_map(|m| m["id"].as_str()).collect()).unwrap_or_default();
                if got != *ids {
                    problems.push(format!("models {got:?} (want {ids:?})"));
                }
            }
            _ => problems.push(format!("not a model list: {text}")),
        },
        Body::Stream { usage_chunk, end } => {
            let end = match difference(host, s.name) {
                Some(Difference::StreamEnds(other, _)) => other,
                _ => *end,
            };
            let data = sse_data(&text);
            let chunks: Vec<Value> = data.iter().filter_map(|d| serde_json::from_str::<Value>(d).ok()).collect();
            if !chunks.iter().any(|c| c["object"] == "chat.completion.chunk") {
                problems.push(format!("no chat chunk: {text}"));
            }
            let has_usage = chunks.iter().any(|c| c["choices"].as_array().is_some_and(Vec::is_empty) && c["usage"].is_object());
            if has_usage != *usage_chunk {
                problems.push(format!("usage chunk {has_usage} (want {usage_chunk}): {text}"));
            }
            let done = data.last().map(String::as_str) == Some("[DONE]");
            let error_last = chunks.last().is_some_and(|c| c.get("error").is_some()) && !data.iter().any(|d| d == "[DONE]");
            let ok = match end {
                End::Done => done && got.complete,
                End::ErrorEvent => error_last && got.complete,
                End::Cut => !done && !got.complete,
            };
            if !ok {
                problems.push(format!("stream end (want {end:?}; complete {}): {text}", got.complete));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// Checks the usage records a scenario's user left (`records`, in the order the host wrote
/// them) against the scenario's [`Rec`]: one per request sent (warm-ups too) or none, and the
/// last one says what the table says; no record holds the prompt or the answer.
pub fn check_record(s: &Scenario, records: &[Value], got: &Observed) -> Result<(), String> {
    let sent = s.request.before as usize + 1;
    let Some(want) = &s.expect.record else {
        return if records.is_empty() { Ok(()) } else { Err(format!("records where none is due: {records:?}")) };
    };
    if records.len() != sent {
        return Err(format!("{} record(s), want {sent}: {records:?}", records.len()));
    }
    let r = &records[sent - 1];
    let mut problems = Vec::new();
    let text = r.to_string();
    if text.contains("Say hello") {
        problems.push("the prompt is in the record".to_owned());
    }
    if let Some(answer) = serde_json::from_slice::<Value>(&got.body).ok().and_then(|v| v["choices"][0]["message"]["content"].as_str().map(str::to_owned)) {
        if answer.len() >= 8 && text.contains(&answer) {
            problems.push("the answer is in the record".to_owned());
        }
    }
    let stream = s.request.body.as_deref().is_some_and(|b| b.contains(r#""stream":true"#));
    let tokens = match (r["input_tokens"].as_u64(), r["output_tokens"].as_u64()) {
        (None, None) => None,
        (i, o) => Some(i.unwrap_or(0).saturating_add(o.unwrap_or(0))),
    };
    let tokens_ok = match want.tokens {
        Some(u64::MAX) => tokens.is_some(),
        t => tokens == t,
    };
    let checks = [
        ("v", r["v"].as_u64() == Some(1), "1".to_owned()),
        ("decision", r["decision"].as_str() == Some(want.decision), want.decision.to_owned()),
        ("ending", r["ending"].as_str() == want.ending, format!("{:?}", want.ending)),
        ("status", r["status"].as_u64() == Some(u64::from(got.status)), got.status.to_string()),
        ("stream", r["stream"].as_bool() == Some(stream), stream.to_string()),
        ("tokens", tokens_ok, format!("{:?} in all (input + output)", want.tokens)),
        ("attempts", r["attempts"].as_u64() == Some(want.attempts), want.attempts.to_string()),
        ("served_model", want.served_model.is_none_or(|m| r["served_model"].as_str() == Some(m)), format!("{:?}", want.served_model)),
        ("identity", r["identity"].as_str().is_some_and(|i| i.starts_with("tg1:q:")), "a hashed identity".to_owned()),
        // (Prices are per model of the model map: a passed-through request has none.)
        ("cost", r.get("cost_micro_usd").is_some() == (tokens.is_some() && s.stack == Stack::Translating), "a cost iff tokens were reported and priced".to_owned()),
    ];
    for (field, ok, wanted) in checks {
        if !ok {
            problems.push(format!("{field} (want {wanted})"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("record {text}: {}", problems.join(", ")))
    }
}

/// The tokens a scenario must leave charged, given its answer (see [`Tokens::Reserved`]).
pub fn expected_tokens(tokens: Tokens, got: &Observed) -> Result<u64, String> {
    match tokens {
        Tokens::Exactly(n) => Ok(n),
        Tokens::Reserved => {
            let limit = got.header("x-ratelimit-limit-tokens").and_then(|v| v.parse::<u64>().ok());
            let remaining = got.header("x-ratelimit-remaining-tokens").and_then(|v| v.parse::<u64>().ok());
            match (limit, remaining) {
                (Some(l), Some(r)) if l > r => Ok(l - r),
                _ => Err(format!("no token headers to read the reservation from: {:?}", got.headers)),
            }
        }
    }
}

/// Polls `probe` until it returns `want` or `timeout` passes; the last value otherwise.
pub fn eventually<T: PartialEq + Clone>(timeout: Duration, want: &T, mut probe: impl FnMut() -> T) -> T {
    let started = Instant::now();
    loop {
        let got = probe();
        if got == *want || started.elapsed() > timeout {
            return got;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
