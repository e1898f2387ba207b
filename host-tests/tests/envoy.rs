//! End to end in a real Envoy 1.40 (V8 runtime, `--concurrency 2`) with the release
//! filter.wasm in front of the mock provider. Needs `scripts/setup.sh envoy`,
//! `scripts/build-wasm.sh` and the release mock provider; `scripts/test.sh` does all three.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tollgate_host_tests::envoy::{self, render};
use tollgate_host_tests::proc::{agent, mock_request_count, post_json, start_mock_provider, start_mock_provider_with, Reply};

const CHAT: &str = r#"{"model":"mock-model","messages":[{"role":"user","content":"Hi"}]}"#;

fn policy(hour_limit: u64) -> String {
    format!(
        r#"{{
  "identity": {{ "header": "x-tollgate-user" }},
  "tier": {{ "default": "free" }},
  "tiers": {{ "free": {{ "limits": [ {{ "window": "hour", "requests": {hour_limit} }}, {{ "window": "day", "requests": 100000 }} ] }} }}
}}"#
    )
}

/// Waits out the last minute of an hour (and so of a day), so an hour window cannot reset in
/// the middle of a test and flip an expected 429 into a 200.
fn away_from_hour_boundary() {
    let ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
    let into_hour = ms % 3_600_000;
    if into_hour > 3_540_000 {
        std::thread::sleep(Duration::from_millis(3_600_000 - into_hour + 100));
    }
}

fn is_openai_duration(s: &str) -> bool {
    // `12ms`, `1s`, `17.28s`, `6m0s`, `1h2m3.5s`
    if let Some(ms) = s.strip_suffix("ms") {
        return !ms.is_empty() && ms.bytes().all(|b| b.is_ascii_digit());
    }
    let Some(rest) = s.strip_suffix('s') else { return false };
    let rest = rest.split_once('h').map_or(rest, |(h, r)| if h.bytes().all(|b| b.is_ascii_digit()) { r } else { "x" });
    let rest = rest.split_once('m').map_or(rest, |(m, r)| if m.bytes().all(|b| b.is_ascii_digit()) { r } else { "x" });
    let (int, frac) = rest.split_once('.').unwrap_or((rest, "0"));
    !int.is_empty() && int.bytes().all(|b| b.is_ascii_digit()) && !frac.is_empty() && frac.bytes().all(|b| b.is_ascii_digit())
}

fn chat(url: &str, user: Option<&str>) -> Reply {
    let mut headers = vec![("connection", "close")];
    if let Some(u) = user {
        headers.push(("x-tollgate-user", u));
    }
    post_json(&agent(), &format!("{url}/v1/chat/completions"), &headers, CHAT)
}

fn assert_allowed(r: &Reply, limit: u64, remaining: u64) {
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["choices"][0]["message"]["content"], "Hello from the Tollgate mock provider.");
    assert_eq!(r.header("x-ratelimit-limit-requests"), Some(limit.to_string().as_str()), "{r:?}");
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some(remaining.to_string().as_str()), "{r:?}");
    let reset = r.header("x-ratelimit-reset-requests").expect("reset header");
    assert!(is_openai_duration(reset), "reset {reset:?} is not an OpenAI duration");
}

fn assert_denied(r: &Reply, limit: u64) {
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(r.header("content-type"), Some("application/json"));
    let retry: u64 = r.header("retry-after").expect("retry-after").parse().expect("integer retry-after");
    assert!((1..=3600).contains(&retry), "retry-after {retry}");
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("0"));
    let body = r.json();
    let error = body["error"].as_object().expect("error object");
    assert_eq!(error.len(), 4, "{body}");
    assert_eq!(body["error"]["type"], "requests");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert!(body["error"]["param"].is_null());
    let message = body["error"]["message"].as_str().unwrap();
    let expected = format!("Usage limit reached for requests (hour): Limit {limit}, Used {limit}. Please try again in ");
    assert!(message.starts_with(&expected), "{message}");
    let wait = message.strip_prefix(&expected).unwrap().strip_suffix('.').unwrap();
    assert!(is_openai_duration(wait), "{wait}");
}

#[test]
fn limits_headers_and_429_in_real_envoy() {
    away_from_hour_boundary();
    let (_mock, mock_url) = start_mock_provider();
    let rendered = render("envoy.yaml", Some(mock_url.rsplit(':').next().unwrap().parse().unwrap()), Some(&policy(3)));
    let envoy = envoy::start(&rendered, &[]);
    let http = agent();

    for remaining in [2, 1, 0] {
        assert_allowed(&chat(&envoy.url, Some("alice")), 3, remaining);
    }
    let served = mock_request_count(&http, &mock_url);
    assert_eq!(served, 3);
    assert_denied(&chat(&envoy.url, Some("alice")), 3);
    assert_eq!(mock_request_count(&http, &mock_url), served, "a denied request reached the upstream");

    // the identity header is Tollgate's business, not the provider's
    let names = tollgate_host_tests::proc::get(&http, &format!("{mock_url}/__mock/last-headers")).json();
    let names: Vec<&str> = names["names"].as_array().unwrap().iter().map(|n| n.as_str().unwrap()).collect();
    assert!(names.contains(&"content-type") && !names.contains(&"x-tollgate-user"), "{names:?}");

    // another identity has its own counter
    assert_allowed(&chat(&envoy.url, Some("bob")), 3, 2);

    // without the header the client address is the identity (every request here comes from
    // 127.0.0.1, on a new connection and so a new source port each time)
    for remaining in [2, 1, 0] {
        assert_allowed(&chat(&envoy.url, None), 3, remaining);
    }
    assert_denied(&chat(&envoy.url, None), 3);
    assert_eq!(mock_request_count(&http, &mock_url), 7);

    assert_eq!(envoy.stat("wasmcustom.tollgate_requests_allowed"), Some(7));
    assert_eq!(envoy.stat("wasmcustom.tollgate_requests_denied"), Some(2));
    assert_eq!(envoy.stat("wasmcustom.tollgate_store_failures"), Some(0));
}

#[test]
fn two_worker_vms_share_one_counter() {
    away_from_hour_boundary();
    let (_mock, mock_url) = start_mock_provider();
    let rendered = render("envoy.yaml", Some(mock_url.rsplit(':').next().unwrap().parse().unwrap()), Some(&policy(25)));
    let envoy = envoy::start(&rendered, &[]);

    let url = envoy.url.clone();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || (0..10).map(|_| chat(&url, Some("carol")).status).collect::<Vec<_>>())
        })
        .collect();
    let statuses: Vec<u16> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    let allowed = statuses.iter().filter(|&&s| s == 200).count();
    let denied = statuses.iter().filter(|&&s| s == 429).count();
    let stats = ["allowed", "denied", "store_failures", "host_errors"]
        .map(|n| (n, envoy.stat(&format!("wasmcustom.tollgate_{n}")).or(envoy.stat(&format!("wasmcustom.tollgate_requests_{n}")))));
    assert_eq!((allowed, denied), (25, 55), "{statuses:?} {stats:?}");
    assert_eq!(stats[2].1, Some(0), "store failures: {stats:?}");
    assert_eq!(mock_request_count(&agent(), &mock_url), 25);

    // both worker threads (each with its own VM) took connections
    // (The listener's stats are named after its configured address, port 0 here.)
    for worker in 0..2 {
        let pattern = format!("^listener\\.127\\.0\\.0\\.1_[0-9]+\\.worker_{worker}\\.downstream_cx_total$");
        let n = envoy.stat_sum(&pattern);
        assert!(n > 0, "{pattern} = {n}: the test did not exercise both VMs");
    }
}

/// The official OpenAI Python SDK (from PyPI, in .venv) sees Tollgate's 429 as
/// `openai.RateLimitError` with OpenAI's code and type.
#[test]
fn the_openai_sdk_raises_rate_limit_error() {
    away_from_hour_boundary();
    let python = tollgate_host_tests::proc::workspace_root().join(".venv/bin/python");
    assert!(python.exists(), "{} is missing: run scripts/setup.sh all", python.display());
    let (_mock, mock_url) = start_mock_provider();
    let rendered = render("envoy.yaml", Some(mock_url.rsplit(':').next().unwrap().parse().unwrap()), Some(&policy(2)));
    let envoy = envoy::start(&rendered, &[]);
    let out = std::process::Command::new(python)
        .arg(tollgate_host_tests::proc::workspace_root().join("examples/clients/openai_python.py"))
        .args([format!("{}/v1", envoy.url), "erin".to_owned(), "3".to_owned()])
        .output()
        .expect("run the python client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert_eq!(lines[0], "ok remaining=1 content='Hello from the Tollgate mock provider.'");
    assert_eq!(lines[1], "ok remaining=0 content='Hello from the Tollgate mock provider.'");
    assert!(lines[2].starts_with("rate_limited code=rate_limit_exceeded type=requests retry_after="), "{stdout}");
}

#[test]
fn invalid_policy_is_refused_at_configure_time() {
    let bad = r#"{"tier": {"default": "free"}, "tiers": {"free": {"limits": [{"window": "hour", "requests": 1}, {"window": "fortnight", "requests": 2}]}}}"#;
    let rendered = render("envoy.yaml", None, Some(bad));
    let (ok, output) = envoy::validate(&rendered);
    assert!(!ok, "Envoy accepted an invalid policy:\n{output}");
    let message = r#"tollgate: invalid configuration: tiers.free.limits[1].window: unknown window "fortnight" (expected one of: minute, hour, day, week, month)"#;
    assert!(output.contains(message), "missing {message:?} in:\n{output}");

    // and the valid repository config passes the same check
    let (ok, output) = envoy::validate(&render("envoy.yaml", None, None));
    assert!(ok, "{output}");
}

#[test]
fn provider_key_comes_from_the_environment_and_never_reaches_the_client() {
    const KEY: &str = "sk-tollgate-test-0123456789";
    let (_mock, mock_url) = start_mock_provider_with(&["--require-key", KEY]);
    let mock_port: u16 = mock_url.rsplit(':').next().unwrap().parse().unwrap();
    // examples/envoy/openai.yaml, with api.openai.com:443 (TLS) swapped for the plain-HTTP mock
    let mut rendered = render("examples/envoy/openai.yaml", None, Some(&policy(10)));
    let tls_start = rendered.yaml.find("    transport_socket:").expect("tls block");
    let tls_end = rendered.yaml.find("  secrets:").expect("secrets block");
    rendered.yaml.replace_range(tls_start..tls_end, "");
    rendered.yaml = rendered
        .yaml
        .replace("type: LOGICAL_DNS", "type: STATIC")
        .replace("socket_address: { address: api.openai.com, port_value: 443 }", &format!("socket_address: {{ address: 127.0.0.1, port_value: {mock_port} }}"));
    assert!(!rendered.yaml.contains(KEY));
    let envoy = envoy::start(&rendered, &[("OPENAI_API_KEY", KEY)]);

    // the client's own Authorization header is replaced by the provider key
    let r = post_json(
        &agent(),
        &format!("{}/v1/chat/completions", envoy.url),
        &[("x-tollgate-user", "dave"), ("authorization", "Bearer client-supplied")],
        CHAT,
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("9"));
    let everything = format!("{r:?}");
    assert!(!everything.contains(KEY), "the provider key leaked to the client: {everything}");
    assert!(!envoy.log().contains(KEY), "the provider key reached Envoy's log");
}

/// Without `allow_on_headers_stop_iteration` (what an Istio `WasmPlugin` gives) Envoy never
/// delivers a chat body to the filter holding its headers. The request is not left hanging:
/// the filter's watchdog answers it with a 500 naming the flag after ~5 s; nothing reached the
/// provider, and Envoy's log says what to fix.
#[test]
fn without_allow_on_headers_stop_iteration_a_chat_request_gets_a_clear_500_not_a_hang() {
    let (_mock, mock_url) = start_mock_provider();
    let mut rendered = render("envoy.yaml", Some(mock_url.rsplit(':').next().unwrap().parse().unwrap()), Some(&policy(10)));
    let flag = rendered.yaml.lines().find(|l| l.contains("allow_on_headers_stop_iteration: true")).expect("the flag").to_owned();
    rendered.yaml = rendered.yaml.replace(&format!("{flag}\n"), "");
    let envoy = envoy::start(&rendered, &[]);
    let started = std::time::Instant::now();
    let r = chat(&envoy.url, Some("wanda"));
    let took = started.elapsed();
    assert_eq!(r.status, 500, "{r:?}");
    assert_eq!(r.json()["error"]["code"], "gateway_misconfigured", "{r:?}");
    assert!(took >= Duration::from_secs(4) && took < Duration::from_secs(9), "answered after {took:?}");
    assert_eq!(mock_request_count(&agent(), &mock_url), 0);
    assert!(envoy.log().contains("allow_on_headers_stop_iteration: true"), "{}", envoy.log());
    // Requests without a body are answered from their headers as before.
    let r = tollgate_host_tests::proc::get(&agent(), &format!("{}/v1/tollgate/usage", envoy.url));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(mock_request_count(&agent(), &mock_url), 0);
}

/// A non-stream answer larger than the buffer Envoy lets the filter read it into is not
/// Envoy's plain-text 500: the shipped config's `local_reply_config` turns exactly that reply
/// into an OpenAI error, and leaves Tollgate's own answers (the 429 below) untouched.
#[test]
fn an_answer_larger_than_the_buffer_is_an_openai_error() {
    let fixtures = tollgate_host_tests::proc::fixtures_dir().display().to_string();
    let (_mock, mock_url) = start_mock_provider_with(&["--fixtures", &fixtures]);
    let mut rendered = render("envoy.yaml", Some(mock_url.rsplit(':').next().unwrap().parse().unwrap()), Some(&policy(2)));
    let listener = "      socket_address: { address: 127.0.0.1, port_value: 0 }\n    filter_chains:";
    assert!(rendered.yaml.contains(listener), "the listener block");
    rendered.yaml = rendered.yaml.replacen(listener, "      socket_address: { address: 127.0.0.1, port_value: 0 }\n    per_connection_buffer_limit_bytes: 8192\n    filter_chains:", 1);
    let envoy = envoy::start(&rendered, &[]);
    let big = [("x-tollgate-user", "yuri"), ("x-mock-fixture", "openai/request_image_base64_after_tool.json")];
    let r = post_json(&agent(), &format!("{}/v1/chat/completions", envoy.url), &big, CHAT);
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(r.header("content-type"), Some("application/json"), "{r:?}");
    let body = r.json();
    assert_eq!(body["error"]["code"], "response_too_large", "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("per_connection_buffer_limit_bytes"), "{body}");
    let r = chat(&envoy.url, Some("yuri"));
    assert_eq!(r.status, 200, "{r:?}");
    let r = chat(&envoy.url, Some("yuri"));
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded", "Tollgate's own answer is untouched: {r:?}");
}
