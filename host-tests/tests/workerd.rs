//! End to end in real workerd (`wrangler dev`, local mode, offline) with the edge worker in
//! front of the mock provider.
//!
//! Needs, once: `npm install`, `scripts/build-worker.sh` (the worker is not rebuilt here:
//! the test sets `TOLLGATE_WORKER_PREBUILT=1` for wrangler's build step) and the mock provider
//! of the same cargo profile as this test (`cargo build [--release] -p tollgate-mock-provider`).
//!
//! Every wrangler gets its own loopback ports, `--persist-to` state dir and `XDG_CONFIG_HOME`,
//! runs under the Node 22 in node_modules, and is stopped with its whole process group
//! (wrangler → workerd) when the test ends, pass or fail.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tollgate_host_tests::proc::{agent, mock_request_count, post_json, start_mock_provider, Reply};
use tollgate_host_tests::workerd::{seed_policy, start_wrangler, Scratch};

const CHAT: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hi"}]}"#;
const MOCK_CONTENT: &str = "Hello from the Tollgate mock provider.";

/// 3 per minute and 5 per day for everyone, identified by `x-tollgate-user`.
const POLICY: &str = r#"{
  "identity": { "header": "x-tollgate-user" },
  "tier": { "default": "default" },
  "tiers": { "default": { "limits": [ { "window": "minute", "requests": 3 }, { "window": "day", "requests": 5 } ] } }
}"#;

/// Waits out the last 20 s of a UTC minute, so a minute (or day) window cannot reset while a
/// test counts up to its limit and flip an expected 429 into a 200.
fn away_from_minute_boundary() {
    let ms = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_millis() as u64;
    let left = 60_000 - ms % 60_000;
    if left < 20_000 {
        eprintln!("waiting {left} ms for the next minute window");
        std::thread::sleep(Duration::from_millis(left + 250));
    }
}

/// OpenAI's duration format: `^(\d+h)?(\d+m)?\d+(\.\d+)?s$` or `^\d+ms$`.
fn is_openai_duration(s: &str) -> bool {
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    if let Some(ms) = s.strip_suffix("ms") {
        return digits(ms);
    }
    let Some(mut rest) = s.strip_suffix('s') else { return false };
    for unit in ['h', 'm'] {
        if let Some((n, r)) = rest.split_once(unit) {
            if !digits(n) {
                return false;
            }
            rest = r;
        }
    }
    match rest.split_once('.') {
        Some((int, frac)) => digits(int) && digits(frac),
        None => digits(rest),
    }
}

fn chat(url: &str, user: Option<&str>) -> Reply {
    let mut headers = vec![];
    if let Some(u) = user {
        headers.push(("x-tollgate-user", u));
    }
    post_json(&agent(), &format!("{url}/v1/chat/completions"), &headers, CHAT)
}

fn assert_allowed(r: &Reply, remaining: u64) {
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["choices"][0]["message"]["content"], MOCK_CONTENT, "{r:?}");
    assert_eq!(r.header("x-ratelimit-limit-requests"), Some("3"), "{r:?}");
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some(remaining.to_string().as_str()), "{r:?}");
    let reset = r.header("x-ratelimit-reset-requests").expect("x-ratelimit-reset-requests");
    assert!(is_openai_duration(reset), "reset {reset:?} is not an OpenAI duration");
}

fn assert_rate_limited(r: &Reply) {
    assert_eq!(r.status, 429, "{r:?}");
    let retry_after: u64 = r.header("retry-after").expect("retry-after").parse().expect("integer retry-after");
    assert!((1..=60).contains(&retry_after), "retry-after {retry_after} for a minute window");
    assert_eq!(r.header("content-type"), Some("application/json"), "{r:?}");
    assert_eq!(r.header("x-ratelimit-limit-requests"), Some("3"), "{r:?}");
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("0"), "{r:?}");
    assert!(is_openai_duration(r.header("x-ratelimit-reset-requests").expect("reset header")), "{r:?}");
    let body = r.json();
    let error = body["error"].as_object().expect("error object");
    let mut keys: Vec<&str> = error.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(keys, ["code", "message", "param", "type"], "{body}");
    assert_eq!(body.as_object().map(|o| o.len()), Some(1), "{body}");
    assert_eq!(error["type"], "requests");
    assert_eq!(error["code"], "rate_limit_exceeded");
    assert!(error["param"].is_null());
    let message = error["message"].as_str().expect("message");
    assert!(
        message.starts_with(
            "Rate limit reached for requests per minute: Limit 3, Used 3, Requested 1. Please try again in "
        ),
        "{message}"
    );
}

#[test]
fn per_identity_limits_are_counted_in_durable_objects_and_denials_never_reach_the_upstream() {
    let scratch = Scratch::new("workerd");
    let (_mock, mock_url) = start_mock_provider();
    seed_policy(&scratch.0, POLICY);
    let wrangler = start_wrangler(&scratch.0, &[("UPSTREAM_URL", &mock_url)], None);
    let http = agent();
    let url = &wrangler.url;
    away_from_minute_boundary();
    let started = Instant::now();

    // A: three allowed, counted down by its own object; the mock answers each.
    let base = mock_request_count(&http, &mock_url);
    for (i, remaining) in [2, 1, 0].into_iter().enumerate() {
        let r = chat(url, Some("user-a"));
        assert_allowed(&r, remaining);
        assert_eq!(mock_request_count(&http, &mock_url), base + i as u64 + 1);
    }

    // The identity header is Tollgate's business, not the provider's.
    let names = tollgate_host_tests::proc::get(&http, &format!("{mock_url}/__mock/last-headers")).json();
    let names: Vec<&str> = names["names"].as_array().unwrap().iter().map(|n| n.as_str().unwrap()).collect();
    assert!(names.contains(&"content-type") && !names.contains(&"x-tollgate-user"), "{names:?}");

    // The 4th is refused locally, in OpenAI's shape; the upstream never sees it.
    assert_rate_limited(&chat(url, Some("user-a")));
    assert_eq!(mock_request_count(&http, &mock_url), base + 3, "a denied request reached the upstream");

    // B has its own object and its own count.
    assert_allowed(&chat(url, Some("user-b")), 2);
    assert_eq!(mock_request_count(&http, &mock_url), base + 4);

    // A's count survived B's request (it lives in A's object, not in the request), and a
    // denial is not counted: A stays at 0 remaining, still refused.
    assert_rate_limited(&chat(url, Some("user-a")));
    assert_allowed(&chat(url, Some("user-b")), 1);
    assert_eq!(mock_request_count(&http, &mock_url), base + 5);

    // Without the identity header the client address (cf-connecting-ip) is the subject.
    let anonymous = chat(url, None);
    assert_eq!(anonymous.status, 200, "{anonymous:?}");
    assert_eq!(anonymous.header("x-ratelimit-limit-requests"), Some("3"));

    eprintln!("requests took {:?}", started.elapsed());
}

#[test]
fn an_invalid_policy_answers_503_in_openai_shape_and_forwards_nothing() {
    let scratch = Scratch::new("workerd-invalid");
    let (_mock, mock_url) = start_mock_provider();
    // No KV entry: the worker falls back to the TOLLGATE_POLICY var, which is invalid here.
    let invalid = POLICY.replace(r#""window": "minute""#, r#""window": "fortnight""#);
    let wrangler = start_wrangler(&scratch.0, &[("UPSTREAM_URL", &mock_url), ("TOLLGATE_POLICY", &invalid)], None);
    let http = agent();

    let r = chat(&wrangler.url, Some("user-a"));
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.header("content-type"), Some("application/json"), "{r:?}");
    let body = r.json();
    assert_eq!(body["error"]["type"], "server_error", "{body}");
    assert_eq!(body["error"]["code"], "invalid_configuration", "{body}");
    assert!(body["error"]["param"].is_null(), "{body}");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(
        message.starts_with(
            "Tollgate configuration is invalid: tiers.default.limits[0].window: unknown window \"fortnight\""
        ),
        "{message}"
    );
    assert_eq!(mock_request_count(&http, &mock_url), 0, "nothing is forwarded without a valid policy");
}

#[test]
fn without_a_kv_policy_the_default_in_wrangler_toml_applies_per_client_address() {
    let scratch = Scratch::new("workerd-default");
    let (_mock, mock_url) = start_mock_provider();
    let wrangler = start_wrangler(&scratch.0, &[("UPSTREAM_URL", &mock_url)], None);
    let http = agent();

    let r = chat(&wrangler.url, Some("user-a"));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["choices"][0]["message"]["content"], MOCK_CONTENT, "{r:?}");
    let limit: u64 = r.header("x-ratelimit-limit-requests").expect("limit header").parse().expect("integer limit");
    let remaining: u64 = r.header("x-ratelimit-remaining-requests").expect("remaining").parse().expect("integer");
    assert!(limit > 3, "the wrangler.toml default ({limit}) applied, not the test policy");
    // The default names no identity header: the startup probe from this address counted too.
    assert_eq!(remaining, limit - 2, "{r:?}");
    assert_eq!(mock_request_count(&http, &mock_url), 1);
}

#[test]
fn openai_duration_check_matches_the_format() {
    for ok in ["12ms", "1s", "17.28s", "6m0s", "1h2m3.5s", "59m59.999s"] {
        assert!(is_openai_duration(ok), "{ok}");
    }
    for bad in ["", "s", "ms", "1.s", "1m", "h1s", "1x2s", "-1s", "1.5ms"] {
        assert!(!is_openai_duration(bad), "{bad}");
    }
}
