//! The Scalix example policy (examples/policies/scalix.json) end to end in a real Envoy 1.40
//! (V8, `--concurrency 2`, examples/envoy/scalix.yaml) in front of the mock provider: token
//! limits with exact arithmetic, warnings (header, body object, SSE comment), the downgrade, the
//! localized 429, the usage endpoint, concurrency leases released by client cancels and upstream
//! resets, webhooks once per crossing, and no request text anywhere Tollgate writes.
//!
//! Needs `scripts/setup.sh envoy`, `scripts/build-wasm.sh` and the release mock provider, then
//! `cargo test --release -p tollgate-host-tests --test envoy_limits`.
//!
//! Token arithmetic (core/src/guard.rs): every chat here sends one short user message, which the
//! estimator puts at the 16-token floor, and `max_tokens: 100`, so each request reserves
//! `R = 116` total tokens. The mock reports the usage the test asks for (`x-mock-usage: P,C`), so
//! after request n the settled usage is the sum of what was reported, and the response to request
//! n says `remaining = limit − settled before it − R` (never below 0).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tollgate_host_tests::checks::{duration_ms, next_midnight_ms, now_ms, rfc3339, sf_dictionary, Item};
use tollgate_host_tests::envoy::{self, render, Envoy};
use tollgate_host_tests::host::{FilterModule, Host, HttpRequest, SharedStore, UpstreamResponse, Vm};
use tollgate_host_tests::proc::{agent, get, mock_request_count, post_json, start_mock_provider, workspace_root, Reply, Server};

/// The reservation of every request below: 16 prompt tokens (the estimator's floor) + max_tokens.
const R: u64 = 116;
const DAY_LIMIT: u64 = 2000;
const UPGRADE_URL: &str = "https://scalix.example.com/upgrade";
const CANARY: &str = "CANARY-7f3a9c";

// ---------------------------------------------------------------------------------------------
// Running Envoy + mock

struct Stack {
    envoy: Envoy,
    mock_url: String,
    mock_port: u16,
    // Dropped last: the mock outlives Envoy.
    _mock: Server,
}

fn scalix_policy() -> Value {
    let text = std::fs::read_to_string(workspace_root().join("examples/policies/scalix.json")).expect("read scalix.json");
    serde_json::from_str(&text).expect("scalix.json is JSON")
}

fn start_mock() -> (Server, String, u16) {
    let (mock, url) = start_mock_provider();
    let port = url.rsplit(':').next().unwrap().parse().unwrap();
    (mock, url, port)
}

/// Envoy from examples/envoy/scalix.yaml with `policy` (rendered as pretty JSON), both clusters
/// pointing at the mock.
fn start_with(mock: (Server, String, u16), policy: &Value) -> Stack {
    let (server, mock_url, mock_port) = mock;
    let text = serde_json::to_string_pretty(policy).unwrap();
    let rendered = render("examples/envoy/scalix.yaml", Some(mock_port), Some(&text));
    let envoy = envoy::start(&rendered, &[]);
    Stack { envoy, mock_url, mock_port, _mock: server }
}

fn start_scalix() -> Stack {
    start_with(start_mock(), &scalix_policy())
}

/// scalix.json plus a webhook (`notify` through the `webhook` cluster, i.e. the mock's recorder)
/// and a notify threshold at `at` % on the free tier's daily token limit.
fn notify_policy(mock_port: u16, at: u32) -> Value {
    let mut policy = scalix_policy();
    policy["notify"] = json!({"cluster": "webhook", "url": format!("http://127.0.0.1:{mock_port}/__mock/webhook/scalix?src=tollgate")});
    let soft = policy["tiers"]["free"]["limits"][0]["soft"].as_array_mut().expect("free tier's first limit has soft thresholds");
    soft.push(json!({"at": at, "action": "notify"}));
    policy
}

// ---------------------------------------------------------------------------------------------
// Requests

fn body(model: &str, stream: bool) -> String {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100, "stream": stream}).to_string()
}

/// A chat for `user` (`x-scalix-user`) whose answer reports `usage` (prompt, completion).
fn chat(stack: &Stack, user: &str, extra: &[(&str, &str)], model: &str, stream: bool, usage: Option<(u64, u64)>) -> Reply {
    let usage_header = usage.map(|(p, c)| format!("{p},{c}"));
    let mut headers: Vec<(&str, &str)> = vec![("x-scalix-user", user)];
    if let Some(u) = &usage_header {
        headers.push(("x-mock-usage", u));
    }
    headers.extend_from_slice(extra);
    post_json(&agent(), &format!("{}/v1/chat/completions", stack.envoy.url), &headers, &body(model, stream))
}

fn usage_of(stack: &Stack, headers: &[(&str, &str)]) -> Value {
    let mut req = agent().get(format!("{}/v1/tollgate/usage", stack.envoy.url));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut resp = req.call().expect("GET usage");
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.headers().get("cache-control").and_then(|v| v.to_str().ok()), Some("no-store"));
    serde_json::from_str(&resp.body_mut().read_to_string().unwrap()).expect("usage is JSON")
}

fn usage(stack: &Stack, user: &str) -> Value {
    usage_of(stack, &[("x-scalix-user", user)])
}

/// One limit of a usage report, by name.
fn limit<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["limits"].as_array().unwrap().iter().find(|l| l["name"] == name).unwrap_or_else(|| panic!("no limit {name} in {report}"))
}

fn used(stack: &Stack, user: &str, name: &str) -> u64 {
    limit(&usage(stack, user), name)["used"].as_u64().unwrap()
}

/// Polls `probe` until it returns `want`, failing after `timeout`; returns how long it took.
#[track_caller]
fn eventually<T: PartialEq + std::fmt::Debug>(timeout: Duration, want: T, mut probe: impl FnMut() -> T) -> Duration {
    let start = Instant::now();
    loop {
        let got = probe();
        if got == want {
            return start.elapsed();
        }
        if start.elapsed() > timeout {
            panic!("still {got:?} after {timeout:?}, expected {want:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// Time


/// Keeps a test away from the end of a UTC minute (and so of the day): the minute's request
/// counter and the day's token counter must not reset in the middle of a test. Waits at most
/// `margin_s` seconds.
fn away_from_minute_end(margin_s: u64) {
    let into = now_ms() % 60_000;
    if into > 60_000 - margin_s * 1000 {
        std::thread::sleep(Duration::from_millis(60_000 - into + 50));
    }
}


/// The warning header's fields as (metric, window, limit, used, remaining, percent, threshold, reset).
#[derive(Debug, PartialEq)]
struct Warning {
    metric: String,
    window: String,
    limit: i64,
    used: i64,
    remaining: i64,
    percent: i64,
    threshold: i64,
    reset: i64,
}

fn warning(r: &Reply) -> Option<Warning> {
    let text = r.header("x-tollgate-warning")?;
    let d = sf_dictionary(text);
    let keys: Vec<&str> = d.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["metric", "window", "limit", "used", "remaining", "percent", "threshold", "reset"], "{text}");
    let s = |k: &str| match &d.iter().find(|(n, _)| n == k).unwrap().1 {
        Item::Str(s) => s.clone(),
        other => panic!("{k} is {other:?}"),
    };
    let n = |k: &str| match &d.iter().find(|(n, _)| n == k).unwrap().1 {
        Item::Int(i) => *i,
        other => panic!("{k} is {other:?}"),
    };
    Some(Warning {
        metric: s("metric"),
        window: s("window"),
        limit: n("limit"),
        used: n("used"),
        remaining: n("remaining"),
        percent: n("percent"),
        threshold: n("threshold"),
        reset: n("reset"),
    })
}

// ---------------------------------------------------------------------------------------------
// Assertions

/// A served chat on the free or pro tier: 200, the model the mock echoed, the token headers.
#[track_caller]
fn assert_served(r: &Reply, upstream_model: &str, token_limit: u64, remaining_tokens: u64) {
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-ratelimit-limit-tokens"), Some(token_limit.to_string().as_str()), "{r:?}");
    assert_eq!(r.header("x-ratelimit-remaining-tokens"), Some(remaining_tokens.to_string().as_str()), "{r:?}");
    let reset = duration_ms(r.header("x-ratelimit-reset-tokens").expect("reset-tokens"));
    let to_midnight = next_midnight_ms() - now_ms();
    assert!(reset.abs_diff(to_midnight) < 5_000, "reset-tokens {reset} ms, midnight in {to_midnight} ms");
    if r.header("content-type") == Some("application/json") {
        assert_eq!(r.json()["model"], upstream_model, "{}", r.body);
        assert_eq!(r.json()["choices"][0]["message"]["content"], "Hello from the Tollgate mock provider.");
    }
}

/// The `tollgate` body object of a free-tier warning, in English.
#[track_caller]
fn assert_free_object(object: &Value, used: u64) {
    let percent = used * 100 / DAY_LIMIT;
    let expected = json!({
        "metric": "total_tokens", "window": "day", "limit": DAY_LIMIT, "used": used,
        "remaining": DAY_LIMIT.saturating_sub(used), "percent": percent, "reset": rfc3339(next_midnight_ms()),
        "message": format!("You have used {percent}% of your total_tokens this day ({used} of {DAY_LIMIT})."),
        "locale": "en", "upgrade_url": UPGRADE_URL,
    });
    assert_eq!(object, &expected);
}

#[track_caller]
fn assert_free_warning(r: &Reply, used: u64) {
    let w = warning(r).unwrap_or_else(|| panic!("no x-tollgate-warning: {r:?}"));
    assert_eq!(
        w,
        Warning {
            metric: "total_tokens".into(),
            window: "day".into(),
            limit: DAY_LIMIT as i64,
            used: used as i64,
            remaining: DAY_LIMIT.saturating_sub(used) as i64,
            percent: (used * 100 / DAY_LIMIT) as i64,
            threshold: 80,
            reset: (next_midnight_ms() / 1000) as i64,
        }
    );
    assert!(w.percent >= 80);
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn scalix_yaml_carries_the_scalix_policy_verbatim() {
    let yaml = std::fs::read_to_string(workspace_root().join("examples/envoy/scalix.yaml")).unwrap();
    let start = yaml.find("value: |\n").unwrap() + "value: |\n".len();
    let end = yaml[start..].find("                vm_config:").unwrap() + start;
    let embedded: Value = serde_json::from_str(&yaml[start..end]).expect("the embedded policy is JSON");
    assert_eq!(embedded, scalix_policy(), "examples/envoy/scalix.yaml's policy drifted from examples/policies/scalix.json");
    assert!(yaml.contains("allow_on_headers_stop_iteration: true"));
    let (ok, out) = envoy::validate(&render("examples/envoy/scalix.yaml", None, None));
    assert!(ok, "envoy --mode validate refused scalix.yaml:\n{out}");
}

/// Free tier: warning from 80 % (header, body object, SSE comment before `[DONE]`), the
/// downgrade to scalix-small from 100 %, the 429 in the client's language past 150 %.
#[test]
fn free_tier_warns_downgrades_and_blocks_with_exact_token_arithmetic() {
    away_from_minute_end(15);
    let stack = start_scalix();
    let u = "alice";
    let remaining_after = |settled: u64| DAY_LIMIT.saturating_sub(settled + R);
    let mut settled = 0;
    let mut requests = 0;

    // 1. 116 of 2000 reserved: no warning. Reports 1500.
    let r = chat(&stack, u, &[], "scalix-free", false, Some((1400, 100)));
    requests += 1;
    assert_served(&r, "mock-free", DAY_LIMIT, remaining_after(settled));
    assert_eq!(r.header("x-ratelimit-limit-requests"), Some("30"));
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("29"));
    assert!(r.header("x-tollgate-warning").is_none() && r.json().get("tollgate").is_none(), "{r:?}");
    assert!(r.header("x-tollgate-downgraded-to").is_none());
    settled += 1500;
    assert_eq!(used(&stack, u, "total_tokens/day"), settled);

    // 2. 1500 + 116 = 1616 = 80 %: warned, in the header and the body. Reports 100.
    let r = chat(&stack, u, &[], "scalix-free", false, Some((90, 10)));
    requests += 1;
    assert_served(&r, "mock-free", DAY_LIMIT, remaining_after(settled));
    assert_eq!(r.header("x-ratelimit-remaining-tokens"), Some("384"));
    assert_free_warning(&r, settled + R);
    assert_free_object(&r.json()["tollgate"], settled + R);
    settled += 100;
    assert_eq!(used(&stack, u, "total_tokens/day"), settled);

    // 3. A stream at 1600 + 116 = 1716 (85 %): the object as an SSE comment right before
    // `data: [DONE]`; the usage the stream reported (300) is settled.
    let r = chat(&stack, u, &[], "scalix-free", true, Some((250, 50)));
    requests += 1;
    assert_served(&r, "mock-free", DAY_LIMIT, remaining_after(settled));
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    assert_free_warning(&r, settled + R);
    let events: Vec<&str> = r.body.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.last(), Some(&"data: [DONE]"), "{}", r.body);
    let comment = events[events.len() - 2].strip_prefix(": tollgate ").unwrap_or_else(|| panic!("no comment before [DONE]: {}", r.body));
    assert_free_object(&serde_json::from_str(comment).unwrap(), settled + R);
    assert_eq!(r.body.matches(": tollgate ").count(), 1);
    assert!(r.body.contains(r#""model":"mock-free""#));
    settled += 300;
    eventually(Duration::from_secs(5), settled, || used(&stack, u, "total_tokens/day"));

    // 4. 1900 settled (< 100 %): still the requested model, though the reservation takes it to
    // 2016 (remaining 0). Reports 200.
    let r = chat(&stack, u, &[], "scalix-free", false, Some((150, 50)));
    requests += 1;
    assert_served(&r, "mock-free", DAY_LIMIT, 0);
    assert!(r.header("x-tollgate-downgraded-to").is_none());
    assert_free_warning(&r, settled + R);
    settled += 200;
    assert_eq!(used(&stack, u, "total_tokens/day"), 2100);

    // 5., 6. Settled at 105 % and 130 %: served by scalix-small (the mock saw mock-small).
    for (p, c) in [(400, 100), (300, 100)] {
        let r = chat(&stack, u, &[], "scalix-free", false, Some((p, c)));
        requests += 1;
        assert_served(&r, "mock-small", DAY_LIMIT, 0);
        assert_eq!(r.header("x-tollgate-downgraded-to"), Some("scalix-small"), "{r:?}");
        assert_free_warning(&r, settled + R);
        assert_free_object(&r.json()["tollgate"], settled + R);
        let last = get(&agent(), &format!("{}/__mock/last-path", stack.mock_url)).json();
        assert_eq!(last["model"], "mock-small");
        settled += p + c;
        assert_eq!(used(&stack, u, "total_tokens/day"), settled);
    }
    assert_eq!(settled, 3000);

    // 7. 3000 + 116 > 150 % of 2000: refused, in Arabic when asked, in English otherwise; the
    // mock never sees it and nothing is counted.
    let served = mock_request_count(&agent(), &stack.mock_url);
    let reset = rfc3339(next_midnight_ms());
    for (lang, text) in [
        (Some("ar"), format!("لقد استخدمت 3000 من أصل 2000 من رصيدك اليومي. يتجدد الرصيد في {reset}. للترقية إلى الباقة الاحترافية: {UPGRADE_URL}")),
        (Some("fr-CA, ar;q=0.5"), format!("لقد استخدمت 3000 من أصل 2000 من رصيدك اليومي. يتجدد الرصيد في {reset}. للترقية إلى الباقة الاحترافية: {UPGRADE_URL}")),
        (None, format!("You have used 3000 of your 2000 total_tokens this day. Your quota resets at {reset}. Upgrade to Pro: {UPGRADE_URL}")),
    ] {
        let extra: Vec<(&str, &str)> = lang.iter().map(|l| ("accept-language", *l)).collect();
        let r = chat(&stack, u, &extra, "scalix-free", false, Some((1, 1)));
        assert_eq!(r.status, 429, "{r:?}");
        let b = r.json();
        assert_eq!(b["error"]["message"], text.as_str(), "Accept-Language {lang:?}");
        assert_eq!(b["error"]["type"], "tokens");
        assert_eq!(b["error"]["code"], "rate_limit_exceeded");
        assert_eq!(b["tollgate"]["message"], text.as_str());
        assert_eq!((b["tollgate"]["used"].as_u64(), b["tollgate"]["limit"].as_u64(), b["tollgate"]["percent"].as_u64()), (Some(3000), Some(2000), Some(150)));
        assert_eq!(r.header("x-tollgate-upgrade-url"), Some(UPGRADE_URL));
        assert_eq!(r.header("x-ratelimit-remaining-tokens"), Some("0"));
        assert_eq!(r.header("x-ratelimit-remaining-requests"), Some((30 - requests).to_string().as_str()), "a 429 is not counted");
        let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
        let to_midnight = (next_midnight_ms() - now_ms()).div_ceil(1000);
        assert!(retry.abs_diff(to_midnight) <= 1, "retry-after {retry} s is the day's end ({to_midnight} s)");
    }
    assert_eq!(mock_request_count(&agent(), &stack.mock_url), served, "a refused request reached the mock");
    assert_eq!(used(&stack, u, "total_tokens/day"), 3000);
    assert_eq!(used(&stack, u, "requests/minute"), requests);

    // Another free user is untouched.
    let r = chat(&stack, "bob", &[], "scalix-free", false, Some((9, 8)));
    assert_served(&r, "mock-free", DAY_LIMIT, DAY_LIMIT - R);

    assert_eq!(stack.envoy.stat("wasmcustom.tollgate_requests_allowed"), Some(requests + 1));
    assert_eq!(stack.envoy.stat("wasmcustom.tollgate_requests_denied"), Some(3));
    assert_eq!(stack.envoy.stat("wasmcustom.tollgate_warnings"), Some(5));
    assert_eq!(stack.envoy.stat("wasmcustom.tollgate_downgrades"), Some(2));
    assert_eq!(stack.envoy.stat("wasmcustom.tollgate_settle_failures"), Some(0));
}

/// The 429's `tollgate` object says which locale its message is in, like the warning's does.
/// (Regression: it once said `""`.)
#[test]
fn block_object_names_the_locale_of_its_message() {
    away_from_minute_end(10);
    let stack = start_scalix();
    for usage in [(1_900, 100), (900, 100)] {
        assert_eq!(chat(&stack, "lina", &[], "scalix-free", false, Some(usage)).status, 200);
    }
    assert_eq!(used(&stack, "lina", "total_tokens/day"), 3000);
    for (lang, locale) in [(Some("ar-SA"), "ar"), (Some("en-GB"), "en"), (None, "en")] {
        let extra: Vec<(&str, &str)> = lang.iter().map(|l| ("accept-language", *l)).collect();
        let r = chat(&stack, "lina", &extra, "scalix-free", false, None);
        assert_eq!(r.status, 429, "{r:?}");
        assert_eq!(r.json()["tollgate"]["locale"], locale, "Accept-Language {lang:?}: {}", r.body);
    }
}

/// Pro warns only at 95 %; enterprise has no token limit at all: no token headers, never refused.
#[test]
fn pro_warns_only_at_95_percent_and_enterprise_is_unlimited() {
    away_from_minute_end(10);
    let stack = start_scalix();
    let pro = [("x-scalix-tier", "pro")];
    let limit = 100_000;

    // 116 reserved, reports 94000.
    let r = chat(&stack, "paula", &pro, "scalix-pro", false, Some((93_000, 1_000)));
    assert_served(&r, "mock-pro", limit, limit - R);
    assert_eq!(r.header("x-ratelimit-limit-requests"), Some("120"));
    assert!(r.header("x-tollgate-warning").is_none());
    // 94116 = 94 % (the free tier would have warned at 80 %): no warning. Reports 900.
    let r = chat(&stack, "paula", &pro, "scalix-pro", false, Some((800, 100)));
    assert_served(&r, "mock-pro", limit, limit - 94_000 - R);
    assert!(r.header("x-tollgate-warning").is_none() && r.json().get("tollgate").is_none(), "{r:?}");
    // 94900 + 116 = 95016 = 95 %: warned (threshold 95), no downgrade, body object in the
    // built-in English text.
    let r = chat(&stack, "paula", &pro, "scalix-pro", false, Some((9, 8)));
    assert_served(&r, "mock-pro", limit, limit - 94_900 - R);
    let w = warning(&r).expect("warning at 95 %");
    assert_eq!((w.used, w.remaining, w.percent, w.threshold, w.limit), (95_016, 4_984, 95, 95, 100_000));
    assert!(r.header("x-tollgate-downgraded-to").is_none());
    let object = &r.json()["tollgate"];
    assert_eq!((object["used"].as_u64(), object["percent"].as_u64(), object["upgrade_url"].is_null()), (Some(95_016), Some(95), true));
    assert!(object["message"].as_str().unwrap().starts_with("You have used 95% of your total_tokens limit (day): Limit 100000, Used 95016, Remaining 4984."), "{object}");
    assert_eq!(used(&stack, "paula", "total_tokens/day"), 94_917);
    assert_eq!(usage_of(&stack, &[("x-scalix-user", "paula"), ("x-scalix-tier", "pro")])["tier"], "pro");

    // Enterprise: far beyond any free or pro limit, every request served, no rate-limit headers
    // for tokens (nor requests: only the global concurrency limit applies).
    let ent = [("x-scalix-tier", "enterprise")];
    for i in 0..4 {
        let stream = i == 3;
        let r = chat(&stack, "erin", &ent, "scalix-pro", stream, Some((400_000, 100_000)));
        assert_eq!(r.status, 200, "{r:?}");
        for h in ["x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens", "x-ratelimit-limit-requests", "x-tollgate-warning", "x-tollgate-downgraded-to"] {
            assert!(r.header(h).is_none(), "enterprise response has {h}: {r:?}");
        }
        if !stream {
            assert_eq!(r.json()["model"], "mock-pro");
            assert!(r.json().get("tollgate").is_none());
        } else {
            assert!(!r.body.contains(": tollgate"));
        }
    }
    let report = usage_of(&stack, &[("x-scalix-user", "erin"), ("x-scalix-tier", "enterprise")]);
    assert_eq!(report["tier"], "enterprise");
    let names: Vec<&str> = report["limits"].as_array().unwrap().iter().map(|l| l["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["global:concurrent"], "{report}");
    assert_eq!(stack.envoy.stat("wasmcustom.tollgate_requests_denied"), Some(0));
    assert_eq!(stack.envoy.stat("wasmcustom.tollgate_warnings"), Some(1));
}

/// `GET /v1/tollgate/usage` says what the responses said: used, limit, remaining and reset for
/// each limit; a caller never seen gets zeros.
#[test]
fn usage_endpoint_matches_the_responses_and_is_zero_for_strangers() {
    away_from_minute_end(10);
    let stack = start_scalix();
    let u = "uma";
    let mut settled = 0;
    for (i, (p, c)) in [(300, 200), (120, 30), (7, 3)].into_iter().enumerate() {
        let r = chat(&stack, u, &[], "scalix-free", false, Some((p, c)));
        let remaining_tokens: u64 = r.header("x-ratelimit-remaining-tokens").unwrap().parse().unwrap();
        let remaining_requests: u64 = r.header("x-ratelimit-remaining-requests").unwrap().parse().unwrap();
        let reset_tokens = duration_ms(r.header("x-ratelimit-reset-tokens").unwrap());
        let reset_requests = duration_ms(r.header("x-ratelimit-reset-requests").unwrap());
        assert_eq!(remaining_tokens, DAY_LIMIT - settled - R);
        assert_eq!(remaining_requests, 30 - (i as u64 + 1));
        settled += p + c;

        let report = usage(&stack, u);
        assert_eq!(report["object"], "tollgate.usage");
        assert_eq!(report["tier"], "free");
        let tokens = limit(&report, "total_tokens/day");
        assert_eq!(
            (&tokens["scope"], &tokens["metric"], &tokens["window"], tokens["limit"].as_u64(), tokens["used"].as_u64(), tokens["remaining"].as_u64()),
            (&json!("identity"), &json!("total_tokens"), &json!("day"), Some(DAY_LIMIT), Some(settled), Some(DAY_LIMIT - settled))
        );
        // The response reported remaining with its reservation; settled, the reservation became
        // the usage: remaining + R − (p + c).
        assert_eq!(tokens["remaining"].as_u64().unwrap(), remaining_tokens + R - (p + c));
        assert_eq!(tokens["reset"], rfc3339(next_midnight_ms()));
        assert!(tokens["reset_in_ms"].as_u64().unwrap().abs_diff(reset_tokens) < 5_000, "{tokens} vs {reset_tokens}");
        let requests = limit(&report, "requests/minute");
        assert_eq!((requests["limit"].as_u64(), requests["used"].as_u64(), requests["remaining"].as_u64()), (Some(30), Some(i as u64 + 1), Some(remaining_requests)));
        assert!(requests["reset_in_ms"].as_u64().unwrap().abs_diff(reset_requests) < 5_000);
        assert_eq!(requests["window"], "minute");
        let conc = limit(&report, "concurrent");
        assert_eq!((conc["limit"].as_u64(), conc["used"].as_u64(), conc["remaining"].as_u64(), conc["window"].is_null()), (Some(4), Some(0), Some(4), true));
        let global = limit(&report, "global:concurrent");
        assert_eq!((global["scope"].as_str(), global["limit"].as_u64(), global["used"].as_u64()), (Some("global"), Some(64), Some(0)));
        assert_eq!(report["limits"].as_array().unwrap().len(), 4);
    }
    assert_eq!(settled, 660);

    // Nobody by that name has asked anything: every count is zero.
    for who in [vec![("x-scalix-user", "stranger")], vec![("x-scalix-user", "stranger-pro"), ("x-scalix-tier", "pro")]] {
        let report = usage_of(&stack, &who);
        let limits = report["limits"].as_array().unwrap();
        assert_eq!(limits.len(), 4);
        for l in limits {
            assert_eq!(l["used"], 0, "{l}");
            assert_eq!(l["remaining"], l["limit"], "{l}");
        }
        let tier_limit = if who.len() == 2 { 100_000 } else { DAY_LIMIT };
        assert_eq!(limit(&report, "total_tokens/day")["limit"], tier_limit);
    }
    // The usage endpoint is not a request the limits count.
    assert_eq!(used(&stack, u, "requests/minute"), 3);
}

/// A raw HTTP/1.1 chat stream that can be dropped mid-answer: returns once the first event has
/// arrived (the request is admitted and holds its lease).
fn open_stream(stack: &Stack, user: &str, extra: &[(&str, &str)]) -> (TcpStream, BufReader<TcpStream>) {
    let port = stack.envoy.url.rsplit(':').next().unwrap();
    let mut conn = TcpStream::connect(format!("127.0.0.1:{port}")).expect("connect to Envoy");
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let body = body("scalix-free", true);
    let mut head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: scalix\r\ncontent-type: application/json\r\ncontent-length: {}\r\nx-scalix-user: {user}\r\n",
        body.len()
    );
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes()).unwrap();
    conn.write_all(body.as_bytes()).unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("HTTP/1.1 200"), "stream refused: {line:?}");
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        if line.starts_with("data: ") {
            return (conn, reader);
        }
        assert!(!line.is_empty(), "the stream ended before its first event");
    }
}

/// Leases are released however a stream ends: the client going away, or the upstream resetting.
#[test]
fn concurrency_leases_are_released_on_client_cancel_and_upstream_reset() {
    away_from_minute_end(15);
    let stack = start_scalix();
    let u = "carol";
    let slow = [("x-mock-delay-ms", "1000")];

    let streams: Vec<_> = (0..4).map(|_| open_stream(&stack, u, &slow)).collect();
    let report = usage(&stack, u);
    assert_eq!(limit(&report, "concurrent")["used"], 4);
    assert_eq!(limit(&report, "global:concurrent")["used"], 4);
    assert_eq!(limit(&report, "total_tokens/day")["used"].as_u64(), Some(4 * R), "four reservations in flight");

    // The fifth while four are open: refused by the concurrency limit, never forwarded.
    let served = mock_request_count(&agent(), &stack.mock_url);
    let r = chat(&stack, u, &[], "scalix-free", false, Some((9, 8)));
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(r.json()["error"]["type"], "requests");
    assert_eq!(r.header("retry-after"), Some("1"));
    let message = r.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(message.starts_with("You have used 4 of your 4 concurrent"), "{message}");
    assert_eq!(r.header("x-tollgate-upgrade-url"), Some(UPGRADE_URL));
    assert_eq!(mock_request_count(&agent(), &stack.mock_url), served);
    // Another user is not affected.
    let r = chat(&stack, "dan", &[], "scalix-free", false, Some((9, 8)));
    assert_eq!(r.status, 200, "{r:?}");

    // Clients drop their connections mid-stream: on_log releases the leases.
    for (conn, reader) in streams {
        conn.shutdown(std::net::Shutdown::Both).unwrap();
        drop((conn, reader));
    }
    let took = eventually(Duration::from_secs(5), 0, || limit(&usage(&stack, u), "concurrent")["used"].as_u64().unwrap());
    assert!(took < Duration::from_secs(2), "leases released after {took:?}");
    assert_eq!(limit(&usage(&stack, u), "global:concurrent")["used"], 0);
    // Nothing was reported for the cancelled streams: their reservations stay charged.
    assert_eq!(used(&stack, u, "total_tokens/day"), 4 * R);
    let r = chat(&stack, u, &[], "scalix-free", false, Some((9, 8)));
    assert_eq!(r.status, 200, "admitted again after the cancels: {r:?}");
    assert_eq!(r.header("x-ratelimit-remaining-tokens"), Some((DAY_LIMIT - 5 * R).to_string().as_str()));
    assert_eq!(used(&stack, u, "total_tokens/day"), 4 * R + 17);

    // The upstream resets mid-stream (the mock closes the connection after two events).
    let url = stack.envoy.url.clone();
    let reset = std::thread::spawn(move || {
        let port = url.rsplit(':').next().unwrap().to_owned();
        let mut conn = TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let b = body("scalix-free", true);
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: scalix\r\ncontent-type: application/json\r\ncontent-length: {}\r\nx-scalix-user: carol\r\nx-mock-delay-ms: 400\r\nx-mock-reset-after: 3\r\n\r\n{b}",
            b.len()
        );
        conn.write_all(head.as_bytes()).unwrap();
        let mut got = Vec::new();
        let _ = conn.read_to_end(&mut got);
        String::from_utf8_lossy(&got).into_owned()
    });
    eventually(Duration::from_secs(5), 1, || limit(&usage(&stack, u), "concurrent")["used"].as_u64().unwrap());
    let answer = reset.join().unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(!answer.contains("[DONE]") && !answer.ends_with("0\r\n\r\n"), "the stream was not cut: {answer}");
    eventually(Duration::from_secs(2), 0, || limit(&usage(&stack, u), "concurrent")["used"].as_u64().unwrap());
    assert_eq!(used(&stack, u, "total_tokens/day"), 5 * R + 17, "the reset stream's reservation stays charged");
    let r = chat(&stack, u, &[], "scalix-free", false, Some((9, 8)));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(stack.envoy.stat("wasmcustom.tollgate_settle_failures"), Some(0));
}

/// The recorded webhooks (path and parsed body).
fn webhooks(stack: &Stack) -> Vec<(String, String)> {
    let v = get(&agent(), &format!("{}/__mock/webhooks", stack.mock_url)).json();
    v["hooks"].as_array().unwrap().iter().map(|h| (h["path"].as_str().unwrap().to_owned(), h["body"].as_str().unwrap().to_owned())).collect()
}

/// RFC 6234 SHA-256 (the identity key is `tg1:q:` + the first 16 bytes of SHA-256 of its
/// source material, core/src/identity.rs; host-tests has no hashing crate).
fn sha256(data: &[u8]) -> [u8; 32] {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be,
        0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa,
        0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85,
        0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3,
        0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f,
        0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
    ];
    let mut h: [u32; 8] = [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19];
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for block in msg.chunks(64) {
        let mut w = [0u32; 64];
        for i in 0..16 {
            w[i] = u32::from_be_bytes([block[4 * i], block[4 * i + 1], block[4 * i + 2], block[4 * i + 3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16].wrapping_add(s0).wrapping_add(w[i - 7]).wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh.wrapping_add(s1).wrapping_add(ch).wrapping_add(K[i]).wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            (hh, g, f, e, d, c, b, a) = (g, f, e, d.wrapping_add(t1), c, b, a, t1.wrapping_add(t2));
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 32];
    for (i, x) in h.iter().enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&x.to_be_bytes());
    }
    out
}

fn identity_key(material: &str) -> String {
    let d = sha256(material.as_bytes());
    format!("tg1:q:{}", d[..16].iter().map(|b| format!("{b:02x}")).collect::<String>())
}

#[test]
fn sha256_matches_the_rfc_6234_vectors() {
    let hex = |d: [u8; 32]| d.iter().map(|b| format!("{b:02x}")).collect::<String>();
    assert_eq!(hex(sha256(b"abc")), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    assert_eq!(
        hex(sha256(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq")),
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
    );
}

/// A notify threshold fires one webhook per identity per window, however many requests go past
/// it; the event carries counts and a hashed identity, never request content.
///
/// Regression: the webhook was once dispatched with a raw `proxy_http_call` the SDK's
/// dispatcher did not know, so the webhook's answer panicked the VM ("invalid token_id") and
/// FAIL_RELOAD rebuilt it mid-traffic (an empty 503, leases never released). All 200 now, and no
/// panic in Envoy's log.
#[test]
fn webhook_fires_exactly_once_per_crossing() {
    away_from_minute_end(10);
    let mock = start_mock();
    let policy = notify_policy(mock.2, 80);
    let stack = start_with(mock, &policy);
    assert_eq!(stack.mock_port, policy["notify"]["url"].as_str().unwrap().split(':').nth(2).unwrap().split('/').next().unwrap().parse::<u16>().unwrap());

    // 116 reserved (below 80 %), settled at 1700 (85 %): the crossing, at settlement.
    let before = now_ms();
    let r = chat(&stack, "dave", &[], "scalix-free", false, Some((1_600, 100)));
    assert_eq!(r.status, 200);
    // Many more past 80 % (and past 100 %): no more events.
    for i in 0..6 {
        let r = chat(&stack, "dave", &[], "scalix-free", i % 2 == 1, Some((20, 10)));
        assert_eq!(r.status, 200, "{r:?}");
    }
    assert_eq!(used(&stack, "dave", "total_tokens/day"), 1_700 + 6 * 30);
    eventually(Duration::from_secs(5), 1, || webhooks(&stack).len());
    eventually(Duration::from_secs(5), Some(1), || stack.envoy.stat("wasmcustom.tollgate_notify_sent"));
    let after = now_ms();

    let hooks = webhooks(&stack);
    let (path, body) = &hooks[0];
    assert_eq!(path, "/__mock/webhook/scalix?src=tollgate");
    let event: Value = serde_json::from_str(body).expect("webhook body is JSON");
    let at = event["at"].as_str().unwrap().to_owned();
    assert!(at >= rfc3339(before) && at <= rfc3339(after + 1000), "at {at}");
    // The documented fields (others may be added; none may carry request content).
    let expected = json!({
        "type": "tollgate.threshold_reached",
        "identity": identity_key("h:dave"),
        "tier": "free",
        "limit": "total_tokens/day",
        "scope": "identity",
        "metric": "total_tokens",
        "window": "day",
        "threshold_percent": 80,
        "limit_value": 2000,
        "used": 1700,
        "window_start": rfc3339(next_midnight_ms() - 86_400_000),
        "at": at,
    });
    for (field, value) in expected.as_object().unwrap() {
        assert_eq!(&event[field], value, "webhook field {field}: {event}");
    }
    assert!(!body.contains("dave") && !body.contains("hi\"") && !body.contains("messages"), "{body}");

    // Another identity crossing (this time by its reservation: 1500 settled + 116 = 1616) gets
    // its own single event, with the usage at that moment.
    let r = chat(&stack, "erin", &[], "scalix-free", false, Some((1_400, 100)));
    assert_eq!(r.status, 200);
    for _ in 0..3 {
        assert_eq!(chat(&stack, "erin", &[], "scalix-free", false, Some((1, 1))).status, 200);
    }
    eventually(Duration::from_secs(5), 2, || webhooks(&stack).len());
    eventually(Duration::from_secs(5), Some(2), || stack.envoy.stat("wasmcustom.tollgate_notify_sent"));
    let event: Value = serde_json::from_str(&webhooks(&stack)[1].1).unwrap();
    assert_eq!((event["identity"].as_str(), event["used"].as_u64()), (Some(identity_key("h:erin").as_str()), Some(1_616)));
    assert_eq!(stack.envoy.stat("wasmcustom.tollgate_notify_failed"), Some(0));
    let log = stack.envoy.log();
    assert!(!log.contains("panicked") && !log.contains("invalid token_id"), "the VM crashed:\n{log}");
}

/// scalix.json identifies callers by the body's `user` field when no `x-scalix-user` is sent.
/// The usage endpoint (a GET, no body) takes that identity as `?user=`, and without it says so
/// (400) instead of showing the caller's address's bucket as if it were theirs.
#[test]
fn the_usage_endpoint_takes_the_user_field_identity_as_a_query_parameter() {
    let stack = start_scalix();
    let body = json!({"model": "scalix-free", "user": "zed & co", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}).to_string();
    let r = post_json(&agent(), &format!("{}/v1/chat/completions", stack.envoy.url), &[], &body);
    assert_eq!(r.status, 200, "{r:?}");
    let r = get(&agent(), &format!("{}/v1/tollgate/usage", stack.envoy.url));
    assert_eq!((r.status, r.json()["error"]["code"].as_str()), (400, Some("user_required")), "{r:?}");
    let r = get(&agent(), &format!("{}/v1/tollgate/usage?user=zed%20%26%20co", stack.envoy.url));
    assert_eq!(r.status, 200, "{r:?}");
    let report = r.json();
    assert_eq!(report["identity"], identity_key("u:zed & co"));
    assert_eq!(limit(&report, "requests/minute")["used"], 1, "{report}");
}

/// With a policy that reads the client address from x-forwarded-for (`trusted_hops: 1`), the
/// shipped config (`use_remote_address: true`: Envoy appends the peer) keeps per-IP limits on
/// the real peer: a client writing its own x-forwarded-for, a new address each time, is still
/// one address.
#[test]
fn a_client_rotating_x_forwarded_for_is_still_one_address() {
    let (server, mock_url, mock_port) = start_mock();
    let policy = json!({
        "identity": {"sources": [{"client_ip": {"trusted_hops": 1}}]},
        "tier": {"default": "free"},
        "tiers": {"free": {"limits": [{"per": "ip", "window": "minute", "requests": 2}]}}
    });
    let text = serde_json::to_string_pretty(&policy).unwrap();
    let rendered = render("envoy.yaml", Some(mock_port), Some(&text));
    let envoy = envoy::start(&rendered, &[]);
    let stack = Stack { envoy, mock_url, mock_port, _mock: server };
    away_from_minute_end(10);
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}).to_string();
    let statuses: Vec<u16> = (0..4)
        .map(|i| {
            let forged = format!("203.0.113.{i}");
            post_json(&agent(), &format!("{}/v1/chat/completions", stack.envoy.url), &[("x-forwarded-for", forged.as_str())], &body).status
        })
        .collect();
    assert_eq!(statuses, [200, 200, 429, 429]);
}

/// A webhook that is not delivered — the webhook answers an error, or never answers — is
/// counted in `tollgate_notify_failed`, never in `tollgate_notify_sent` (events are not retried).
#[test]
fn undelivered_webhooks_are_counted_as_failures() {
    away_from_minute_end(10);
    // A webhook answering 404 (a path the mock does not serve).
    let (server, mock_url, mock_port) = start_mock();
    let mut policy = notify_policy(mock_port, 80);
    policy["notify"]["url"] = json!(format!("http://127.0.0.1:{mock_port}/__mock/no-such-webhook"));
    let stack = start_with((server, mock_url, mock_port), &policy);
    assert_eq!(chat(&stack, "fay", &[], "scalix-free", false, Some((1_600, 100))).status, 200);
    eventually(Duration::from_secs(5), Some(1), || stack.envoy.stat("wasmcustom.tollgate_notify_failed"));
    assert_eq!(stack.envoy.stat("wasmcustom.tollgate_notify_sent"), Some(0));
    assert!(stack.envoy.log().contains("webhook answered 404"), "{}", stack.envoy.log());
    drop(stack);

    // A webhook that accepts the connection and never answers: the call times out.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let (server, mock_url, mock_port) = start_mock();
    let mut policy = notify_policy(mock_port, 80);
    policy["notify"]["timeout_ms"] = json!(300);
    let text = serde_json::to_string_pretty(&policy).unwrap();
    let mut rendered = render("examples/envoy/scalix.yaml", Some(mock_port), Some(&text));
    let at = rendered.yaml.find("cluster_name: webhook").expect("the webhook cluster");
    let tail = rendered.yaml[at..].replacen(&format!("port_value: {mock_port}"), &format!("port_value: {silent_port}"), 1);
    rendered.yaml = format!("{}{tail}", &rendered.yaml[..at]);
    let envoy = envoy::start(&rendered, &[]);
    let stack = Stack { envoy, mock_url, mock_port, _mock: server };
    assert_eq!(chat(&stack, "gus", &[], "scalix-free", false, Some((1_600, 100))).status, 200);
    eventually(Duration::from_secs(5), Some(1), || stack.envoy.stat("wasmcustom.tollgate_notify_failed"));
    assert_eq!(stack.envoy.stat("wasmcustom.tollgate_notify_sent"), Some(0));
    drop(silent);
}

/// Request text never reaches anything Tollgate writes: Envoy's log, its stats, the webhook, the
/// shared data (checked in the wasmtime host, which can list it; Envoy cannot).
#[test]
fn canary_prompt_appears_in_no_log_stat_webhook_or_shared_data() {
    away_from_minute_end(10);
    let mock = start_mock();
    // Notify at 90 %, reached by the last request only, so the one event carries the counts
    // of every request below.
    let policy = notify_policy(mock.2, 90);
    let stack = start_with(mock, &policy);
    let prompt = format!("My secret is {CANARY}. Repeat it back: {CANARY}");
    let user_field = format!("user-{CANARY}");
    let canary_body = |stream: bool, max_tokens: u64| {
        json!({"model": "scalix-free", "user": user_field, "max_tokens": max_tokens, "stream": stream,
               "messages": [{"role": "system", "content": CANARY}, {"role": "user", "content": prompt}]})
        .to_string()
    };
    let url = format!("{}/v1/chat/completions", stack.envoy.url);
    let http = agent();
    // Identity from the `user` field (no header). The prompt estimates at 30 tokens (system 4+4,
    // user 15+4, priming 3), so each reserves 80. Settles at 1550.
    let r = post_json(&http, &url, &[("x-mock-usage", "1550,0")], &canary_body(false, 50));
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.header("x-tollgate-warning").is_none());
    // A guard refusal (max_tokens over 1024), an unparsable body, a model that does not exist.
    assert_eq!(post_json(&http, &url, &[], &canary_body(false, 5000)).status, 400);
    assert_eq!(post_json(&http, &url, &[], &format!("{{\"model\": \"scalix-free\", \"messages\": [{CANARY}")).status, 400);
    let unknown = json!({"model": CANARY, "messages": [{"role": "user", "content": CANARY}]}).to_string();
    assert_eq!(post_json(&http, &url, &[], &unknown).status, 404);
    // Warned (reservation past 80 %) stream and JSON answer; 20 tokens each.
    let r = post_json(&http, &url, &[("x-mock-usage", "10,10")], &canary_body(true, 50));
    assert!(r.status == 200 && r.body.contains(": tollgate "), "{r:?}");
    let r = post_json(&http, &url, &[("x-mock-usage", "10,10")], &canary_body(false, 50));
    assert!(r.status == 200 && r.header("x-tollgate-warning").is_some(), "{r:?}");
    // 1590 + 300 = 1890 ≥ 90 %: the webhook, at settlement.
    let r = post_json(&http, &url, &[("x-mock-usage", "300,0")], &canary_body(false, 50));
    assert_eq!(r.status, 200, "{r:?}");
    eventually(Duration::from_secs(5), 1, || webhooks(&stack).len());
    // The identity was the user field, hashed.
    let hooks = webhooks(&stack);
    let event: Value = serde_json::from_str(&hooks[0].1).unwrap();
    assert_eq!(event["identity"], identity_key(&format!("u:{user_field}")));
    assert_eq!((event["used"].as_u64(), event["threshold_percent"].as_u64()), (Some(1890), Some(90)));

    let stats = get(&http, &format!("{}/stats", stack.envoy.admin)).body;
    assert!(stats.contains("wasmcustom.tollgate_requests_allowed: 4"), "the stats were read");
    let log = stack.envoy.log();
    assert!(log.contains("policy loaded"), "the log was read");
    for (what, text) in [("Envoy's log", log.as_str()), ("Envoy's /stats", stats.as_str())] {
        assert!(!text.contains(CANARY), "{what} contains the canary:\n{text}");
    }
    for (path, body) in &hooks {
        assert!(!body.contains(CANARY) && !path.contains(CANARY), "a webhook contains the canary: {body}");
    }

    // The same traffic through the filter in the wasmtime host, whose shared data can be listed.
    let host = Host::new(SharedStore::envoy());
    let policy_text = serde_json::to_string(&policy).unwrap();
    let mut vm = Vm::load(&host, FilterModule::release_filter(), policy_text.as_bytes()).expect("the filter takes the policy");
    vm.set_upstream(|req| {
        let stream = String::from_utf8_lossy(&req.body).contains("\"stream\":true");
        let usage = r#"{"prompt_tokens":1700,"completion_tokens":0,"total_tokens":1700}"#;
        if stream {
            UpstreamResponse::new(200).header("content-type", "text/event-stream").body(format!(
                "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{CANARY}\"}},\"finish_reason\":\"stop\"}}]}}\n\n\
                 data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[],\"usage\":{usage}}}\n\ndata: [DONE]\n\n"
            ))
        } else {
            UpstreamResponse::new(200).header("content-type", "application/json").body(format!(
                "{{\"id\":\"c\",\"object\":\"chat.completion\",\"created\":1,\"model\":\"m\",\"choices\":[{{\"index\":0,\"message\":{{\"role\":\"assistant\",\"content\":\"{CANARY}\"}},\"finish_reason\":\"stop\"}}],\"usage\":{usage}}}"
            ))
        }
    });
    let send = |vm: &mut Vm, body: String| vm.request(HttpRequest::post("/v1/chat/completions").body(body)).expect("the host ran the request");
    let ex = send(&mut vm, canary_body(false, 50));
    assert_eq!(ex.status, 200, "{}", ex.body_text());
    let ex = send(&mut vm, canary_body(true, 50));
    assert_eq!(ex.status, 200, "{}", ex.body_text());
    assert!(ex.header("x-tollgate-warning").is_some());
    let ex = send(&mut vm, canary_body(false, 5000));
    assert_eq!(ex.status, 400);
    let keys = host.shared().keys(host.vm_id());
    assert!(!keys.is_empty(), "the filter stored its counters");
    let mut bytes = 0;
    for key in &keys {
        let (value, _) = host.shared().peek(host.vm_id(), key).unwrap();
        bytes += value.len();
        for (what, hay) in [("key", key), ("value", &value)] {
            for needle in [CANARY.as_bytes(), b"canary", b"Repeat it back", b"user-"] {
                assert!(!hay.windows(needle.len()).any(|w| w.eq_ignore_ascii_case(needle)), "shared data {what} {:?} contains {:?}", String::from_utf8_lossy(key), String::from_utf8_lossy(needle));
            }
        }
    }
    assert!(bytes > 0);
    let wasm_logs: Vec<String> = host.logs().iter().map(|l| format!("{l:?}")).collect();
    assert!(!wasm_logs.iter().any(|l| l.contains(CANARY)), "{wasm_logs:?}");
}

/// An identity header that is not UTF-8 is refused (400), never hashed as the lossy copy that
/// `user-\xff` and `user-\xfe` would share.
#[test]
fn an_identity_header_that_is_not_utf8_is_refused() {
    let stack = start_scalix();
    for value in [&b"user-\xff"[..], b"user-\xfe"] {
        let (status, body) = tollgate_host_tests::proc::get_with_raw_header(&stack.envoy.url, "/v1/tollgate/usage", "x-scalix-user", value);
        assert_eq!(status, 400, "{body}");
        assert!(body.contains("invalid_identity") && body.contains("not valid UTF-8"), "{body}");
    }
    let (status, _) = tollgate_host_tests::proc::get_with_raw_header(&stack.envoy.url, "/v1/tollgate/usage", "x-scalix-user", "usér-1".as_bytes());
    assert_eq!(status, 200, "UTF-8 is text");
}
