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
use tollgate_host_tests::workerd::{get_with, open_stream, read_rest, seed_policy, start_wrangler, Scratch, SlowUpstream};

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
            "Usage limit reached for requests (minute): Limit 3, Used 3. Please try again in "
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
    // The startup probe (a path no surface has: Tollgate's 404) counted nothing.
    assert_eq!(remaining, limit - 1, "{r:?}");
    assert_eq!(mock_request_count(&http, &mock_url), 1);
}

/// Polls `check` for up to 10 s (settlement runs in `ctx.wait_until`, after the response).
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < Duration::from_secs(10), "{what}: not within 10 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn usage_of(url: &str, user: &str) -> serde_json::Value {
    let r = get_with(&format!("{url}/v1/tollgate/usage"), &[("x-tollgate-user", user)]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("cache-control"), Some("no-store"), "{r:?}");
    r.json()
}

fn used(report: &serde_json::Value, name: &str) -> u64 {
    let limits = report["limits"].as_array().expect("limits");
    let l = limits.iter().find(|l| l["name"] == name).unwrap_or_else(|| panic!("no limit {name} in {report}"));
    l["used"].as_u64().expect("used")
}

/// 70 total tokens a day. A request asking for 30 output tokens reserves 46 (a 16-token prompt
/// floor + 30); the mock provider reports 9 + 8 = 17. Unsettled, two requests would need 92;
/// settled, the first counts 17, so the second fits (63) and the third does not (34 + 46 > 70).
#[test]
fn token_limits_settle_to_the_providers_reported_usage_and_the_usage_endpoint_shows_it() {
    let scratch = Scratch::new("workerd-tokens");
    let (_mock, mock_url) = start_mock_provider();
    let secrets = scratch.0.join("secrets.env");
    std::fs::write(&secrets, "TG_ADMIN_KEY=tg-admin-test-key\n").expect("write secrets");
    let policy = r#"{
      "identity": { "header": "x-tollgate-user" },
      "tier": { "default": "default" },
      "admin": { "key_secret": "TG_ADMIN_KEY" },
      "tiers": { "default": { "limits": [ { "window": "day", "total_tokens": 70 } ] } }
    }"#;
    seed_policy(&scratch.0, policy);
    let wrangler = start_wrangler(&scratch.0, &[("UPSTREAM_URL", &mock_url)], Some(&secrets));
    let url = &wrangler.url;
    let http = agent();
    let body = r#"{"model":"gpt-4o-mini","max_tokens":30,"messages":[{"role":"user","content":"Hi"}]}"#;
    let send = || post_json(&http, &format!("{url}/v1/chat/completions"), &[("x-tollgate-user", "tok")], body);

    let first = send();
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(first.header("x-ratelimit-limit-tokens"), Some("70"), "{first:?}");
    assert_eq!(first.header("x-ratelimit-remaining-tokens"), Some("24"), "the reservation: 70 - 46: {first:?}");
    eventually("the first request settles to 17", || used(&usage_of(url, "tok"), "total_tokens/day") == 17);

    let second = send();
    assert_eq!(second.status, 200, "17 + 46 fits 70 only because the first settled: {second:?}");
    eventually("the second request settles", || used(&usage_of(url, "tok"), "total_tokens/day") == 34);

    let third = send();
    assert_eq!(third.status, 429, "{third:?}");
    let error = &third.json()["error"];
    assert_eq!(error["type"], "tokens", "{third:?}");
    assert_eq!(error["code"], "rate_limit_exceeded", "{third:?}");
    assert_eq!(third.header("x-ratelimit-remaining-tokens"), Some("36"), "{third:?}");

    // The usage endpoint: the caller's own limits, nothing counted for asking.
    let report = usage_of(url, "tok");
    assert_eq!(report["object"], "tollgate.usage", "{report}");
    assert_eq!(report["tier"], "default", "{report}");
    let limit = &report["limits"][0];
    assert_eq!((limit["limit"].as_u64(), limit["used"].as_u64(), limit["remaining"].as_u64()), (Some(70), Some(34), Some(36)), "{report}");
    assert_eq!(limit["window"], "day", "{report}");
    assert!(limit["reset_in_ms"].as_u64().is_some_and(|ms| ms <= 86_400_000), "{report}");
    assert_eq!(used(&usage_of(url, "someone-else"), "total_tokens/day"), 0);

    // The admin lookup: one identity by its key, behind the admin key.
    let identity = report["identity"].as_str().expect("the caller's identity key").to_owned();
    let admin = format!("{url}/v1/tollgate/admin/usage?identity={identity}");
    let denied = get_with(&admin, &[("authorization", "Bearer wrong")]);
    assert_eq!(denied.status, 401, "{denied:?}");
    assert_eq!(denied.json()["error"]["code"], "invalid_api_key");
    assert_eq!(get_with(&admin, &[]).status, 401);
    let listed = get_with(&admin, &[("authorization", "Bearer tg-admin-test-key")]);
    assert_eq!(listed.status, 200, "{listed:?}");
    let listed = listed.json();
    assert_eq!(listed["identity"], identity.as_str(), "{listed}");
    assert_eq!(listed["limits"][0]["used"], 34, "{listed}");
}

/// A tier aggregate counts every identity of the tier together (one shard: exact).
#[test]
fn a_tier_aggregate_is_shared_by_every_identity_of_the_tier() {
    let scratch = Scratch::new("workerd-tier");
    let (_mock, mock_url) = start_mock_provider();
    let policy = r#"{
      "identity": { "header": "x-tollgate-user" },
      "tier": { "default": "default" },
      "tiers": { "default": { "limits": [ { "window": "day", "requests": 10 }, { "per": "tier", "window": "day", "requests": 4 } ] } }
    }"#;
    seed_policy(&scratch.0, policy);
    let wrangler =
        start_wrangler(&scratch.0, &[("UPSTREAM_URL", &mock_url), ("TOLLGATE_AGGREGATE_SHARDS", "1")], None);
    let url = &wrangler.url;
    // The startup probe (anonymous) may have counted in the tier already.
    let before = used(&usage_of(url, "t0"), "tier:requests/day");
    let mut allowed = 0;
    for i in 0..6 {
        let r = chat(url, Some(&format!("t{i}")));
        match r.status {
            200 => allowed += 1,
            429 => assert_eq!(r.json()["error"]["type"], "requests", "{r:?}"),
            _ => panic!("{r:?}"),
        }
    }
    assert_eq!(allowed, 4 - before, "the tier's 4 requests, whoever sent them");
    for i in [0, 5] {
        let report = usage_of(url, &format!("t{i}"));
        assert_eq!(used(&report, "tier:requests/day"), 4, "every identity sees the same tier count: {report}");
    }
    assert_eq!(used(&usage_of(url, "t5"), "requests/day"), 0, "a refused request is not counted for its identity");
}

/// With the default four shards each shard holds a quarter of the tier's limit: the tier as
/// a whole never exceeds it.
#[test]
fn a_sharded_tier_aggregate_never_exceeds_the_tier_limit() {
    let scratch = Scratch::new("workerd-shards");
    let (_mock, mock_url) = start_mock_provider();
    let policy = r#"{
      "identity": { "header": "x-tollgate-user" },
      "tier": { "default": "default" },
      "tiers": { "default": { "limits": [ { "per": "tier", "window": "day", "requests": 8 } ] } }
    }"#;
    seed_policy(&scratch.0, policy);
    let wrangler = start_wrangler(&scratch.0, &[("UPSTREAM_URL", &mock_url)], None);
    let url = &wrangler.url;
    let allowed = (0..24).filter(|i| chat(url, Some(&format!("s{i}"))).status == 200).count();
    assert!((1..=8).contains(&allowed), "{allowed} allowed");
    let report = usage_of(url, "s0");
    assert_eq!(report["limits"][0]["limit"], 2, "each of 4 shards enforces 8 / 4: {report}");
}

/// One request in flight per identity: a second is refused while the first streams; the
/// first's end releases the slot — and so does a client going away mid-stream.
#[test]
fn concurrency_leases_are_released_when_a_stream_ends_or_the_client_goes_away() {
    let scratch = Scratch::new("workerd-concurrency");
    let upstream = SlowUpstream::start();
    let policy = format!(
        r#"{{
      "identity": {{ "header": "x-tollgate-user" }},
      "tier": {{ "default": "default" }},
      "notify": {{ "url": "{}/hook" }},
      "tiers": {{ "default": {{ "limits": [ {{ "concurrent": 1 }},
                    {{ "window": "day", "total_tokens": 1000, "soft": [ {{ "at": 1, "action": "notify" }} ] }} ] }} }}
    }}"#,
        upstream.url
    );
    seed_policy(&scratch.0, &policy);
    let wrangler = start_wrangler(&scratch.0, &[("UPSTREAM_URL", &upstream.url)], None);
    let url = &wrangler.url;
    let body = r#"{"model":"m","stream":true,"max_tokens":10,"messages":[{"role":"user","content":"Hi"}]}"#;
    let user = [("x-tollgate-user", "c")];

    let (first, head) = open_stream(url, &user, body);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let second = post_json(&agent(), &format!("{url}/v1/chat/completions"), &user, body);
    assert_eq!(second.status, 429, "one in flight: {second:?}");
    assert_eq!(second.json()["error"]["type"], "requests", "{second:?}");
    upstream.release();
    let rest = read_rest(first);
    assert!(rest.contains("data: [DONE]"), "{rest}");
    // Settled with the stream's reported usage, lease released.
    eventually("the stream settles", || used(&usage_of(url, "c"), "total_tokens/day") == 17);
    eventually("the slot is free again", || used(&usage_of(url, "c"), "concurrent") == 0);

    // A client that goes away mid-stream: the runtime cancels the response stream, which
    // drops it and settles the request. Under `wrangler dev` the cancellation is seen once
    // the worker next has something to write (here: when the upstream goes on), not while
    // the upstream is silent.
    let (gone, head) = open_stream(url, &user, body);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(used(&usage_of(url, "c"), "concurrent"), 1);
    drop(gone);
    std::thread::sleep(Duration::from_millis(500));
    upstream.release();
    eventually("a cancelled stream releases its lease", || used(&usage_of(url, "c"), "concurrent") == 0);

    // The notify threshold (1 % of 1000) was crossed by the first request: an event, with
    // hashes and counts only.
    eventually("the webhook event arrives", || !upstream.hooks.lock().unwrap().is_empty());
    let event: serde_json::Value = serde_json::from_str(&upstream.hooks.lock().unwrap()[0]).expect("event JSON");
    assert_eq!(event["type"], "tollgate.threshold_reached", "{event}");
    assert_eq!(event["limit"], "total_tokens/day", "{event}");
    assert_eq!(event["threshold_percent"], 1, "{event}");
    assert!(!event.to_string().contains("Hi\""), "no request content: {event}");
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
