//! Model aliases in real workerd (`wrangler dev`, local mode, offline): the edge worker's fetch
//! loop falls back across deployments played by mock providers in their failure modes
//! (`tollgate-mock-provider --fail-status / --retry-after / --hang / --reset-after`, a closed
//! port for a refused connection), translated per deployment, charged once.
//!
//! Needs `scripts/build-worker.sh`, `npm install` and the release mock provider, then
//! `cargo test --release -p tollgate-host-tests --test workerd_fallback` (add `-- --nocapture`
//! to see the latency measured by `latency_added_by_one_failed_attempt`).
//!
//! Every test starts its own stack ([`Stack::start`]): one mock provider per deployment (so
//! each deployment's `/__mock/requests` count is its own), one closed port, and one wrangler.
//! Health: `failures` is 1000, so plain failures never cool a deployment down by count within
//! a test; only a provider's `retry-after` does (30 s, far longer than any test). The mock
//! answers `Hello from the Tollgate mock provider.` with 9 prompt + 8 completion tokens.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tollgate_host_tests::checks::now_ms;
use tollgate_host_tests::proc::{agent, free_port, mock_request_count, post_json, start_mock_provider_with, Reply, Server};
use tollgate_host_tests::workerd::{get_with, start_wrangler, Scratch, Wrangler};

const MOCK_CONTENT: &str = "Hello from the Tollgate mock provider.";
/// The key the healthy OpenAI-kind and Anthropic-kind mocks require (a Worker secret).
const PROVIDER_KEY: &str = "tg-fallback-provider-key-71be0c";
/// Per-attempt timeout of the test policy.
const ATTEMPT_TIMEOUT_MS: u64 = 1000;

/// Deployment name → (provider kind, upstream model, mock arguments; `None`: a closed port).
const DEPLOYMENTS: [(&str, &str, &str, Option<&[&str]>); 13] = [
    ("ok", "openai", "up-ok", Some(&["--require-key", PROVIDER_KEY])),
    ("anth", "anthropic", "claude-mock-1", Some(&["--require-key", PROVIDER_KEY])),
    ("fail500", "openai", "up-500", Some(&["--fail-status", "500"])),
    ("fail429", "openai", "up-429", Some(&["--fail-status", "429", "--retry-after", "30"])),
    ("only429", "openai", "up-only429", Some(&["--fail-status", "429", "--retry-after", "30"])),
    ("closed", "openai", "up-closed", None),
    ("hang", "openai", "up-hang", Some(&["--hang"])),
    ("reset0", "openai", "up-reset0", Some(&["--reset-after", "0"])),
    ("reset2", "openai", "up-reset2", Some(&["--reset-after", "2"])),
    ("cap1", "openai", "up-cap1", Some(&["--fail-status", "503"])),
    ("cap2", "openai", "up-cap2", Some(&["--fail-status", "503"])),
    ("cap3", "openai", "up-cap3", Some(&["--fail-status", "503"])),
    // Answers, saying `x-ratelimit-remaining-requests: 0` (reset in 2 s).
    ("quota0", "openai", "up-quota0", Some(&["--quota-remaining", "0"])),
];

struct Stack {
    // Dropped in this order: the worker, then the mocks, then the scratch directory.
    wrangler: Wrangler,
    mocks: Vec<(String, Option<Server>, String)>,
    _scratch: Scratch,
}

impl Stack {
    fn start(name: &str) -> Stack {
        let scratch = Scratch::new(name);
        let mut mocks = Vec::new();
        for (deployment, _, _, args) in DEPLOYMENTS {
            match args {
                Some(args) => {
                    let (server, url) = start_mock_provider_with(args);
                    mocks.push((deployment.to_owned(), Some(server), url));
                }
                // Bound, read, released: nothing listens there, so connecting is refused.
                None => mocks.push((deployment.to_owned(), None, format!("http://127.0.0.1:{}", free_port()))),
            }
        }
        let mut providers = serde_json::Map::new();
        let mut models = serde_json::Map::new();
        let mut prices = serde_json::Map::new();
        for ((deployment, kind, upstream, args), (_, _, url)) in DEPLOYMENTS.iter().zip(&mocks) {
            let mut provider = json!({ "kind": kind, "base_url": url });
            if args.is_some_and(|a| a.contains(&"--require-key")) {
                provider["api_key"] = json!({ "secret": "TG_PROVIDER_KEY" });
            }
            providers.insert(format!("p-{deployment}"), provider);
            models.insert(deployment.to_string(), json!({ "provider": format!("p-{deployment}"), "model": upstream }));
            // USD per million tokens: "ok" is cheap, every other deployment dear.
            let price = if *deployment == "ok" { json!({ "input": 1, "output": 2 }) } else { json!({ "input": 100, "output": 100 }) };
            prices.insert(deployment.to_string(), price);
        }
        let policy = json!({
            "identity": { "header": "x-tollgate-user" },
            "tier": { "default": "default" },
            "tiers": { "default": { "limits": [
                { "window": "day", "requests": 1000 },
                { "window": "day", "total_tokens": 1_000_000 },
                { "window": "day", "cost_usd": 10_000_000 }
            ] } },
            "prices": prices,
            "providers": providers,
            "models": models,
            "aliases": {
                "after-500": { "deployments": ["fail500", "ok"] },
                "after-429": { "deployments": ["fail429", "ok"] },
                "after-closed": { "deployments": ["closed", "ok"] },
                "after-hang": { "deployments": ["hang", "ok"] },
                "after-reset0": { "deployments": ["reset0", "ok"] },
                "reset-mid-stream": { "deployments": ["reset2", "ok"] },
                "cross-dialect": { "deployments": ["fail500", "anth"] },
                "capped": { "deployments": ["cap1", "cap2", "cap3"], "max_attempts": 2 },
                "only-429": { "deployments": ["only429"] },
                "steer": { "deployments": ["quota0", "ok"] },
                "direct": { "deployments": ["ok"] }
            },
            "fallback": { "attempt_timeout_ms": ATTEMPT_TIMEOUT_MS, "total_timeout_ms": 10_000 },
            "health": { "failures": 1000, "window_seconds": 60, "cooldown_seconds": 30 }
        })
        .to_string();
        let env_file = scratch.0.join("secrets.env");
        std::fs::write(&env_file, format!("TG_PROVIDER_KEY={PROVIDER_KEY}\n")).expect("write secrets");
        let ok_url = mocks[0].2.clone();
        let wrangler = start_wrangler(&scratch.0, &[("UPSTREAM_URL", &ok_url), ("TOLLGATE_POLICY", &policy), ("PROVIDER_PASS_HEADERS", "x-mock-usage")], Some(&env_file));
        away_from_day_end();
        Stack { wrangler, mocks, _scratch: scratch }
    }

    fn mock_url(&self, deployment: &str) -> &str {
        &self.mocks.iter().find(|(d, ..)| d == deployment).expect("a deployment").2
    }

    /// How many API requests `deployment`'s mock has received.
    fn count(&self, deployment: &str) -> u64 {
        mock_request_count(&agent(), self.mock_url(deployment))
    }

    fn counts(&self, deployments: &[&str]) -> Vec<u64> {
        deployments.iter().map(|d| self.count(d)).collect()
    }

    fn chat(&self, user: &str, model: &str, stream: bool) -> Reply {
        self.chat_with(user, model, stream, &[])
    }

    /// With extra request headers (`x-mock-usage` reaches the providers: `PROVIDER_PASS_HEADERS`).
    fn chat_with(&self, user: &str, model: &str, stream: bool, headers: &[(&str, &str)]) -> Reply {
        let body = json!({ "model": model, "stream": stream, "max_tokens": 50,
                           "messages": [{ "role": "user", "content": "Hi" }] });
        let url = format!("{}/v1/chat/completions", self.wrangler.url);
        let mut all = vec![("x-tollgate-user", user)];
        all.extend_from_slice(headers);
        post_json(&agent(), &url, &all, &body.to_string())
    }

    fn usage(&self, user: &str) -> Value {
        let r = get_with(&format!("{}/v1/tollgate/usage", self.wrangler.url), &[("x-tollgate-user", user)]);
        assert_eq!(r.status, 200, "{r:?}");
        r.json()
    }

    /// Waits (settlement runs in `ctx.wait_until`, after the answer) until `user`'s day
    /// counters read `want` = (requests, total tokens, cost in micro-dollars).
    #[track_caller]
    fn settled_to(&self, user: &str, want: (u64, u64, u64)) {
        let started = Instant::now();
        loop {
            let report = self.usage(user);
            let used = |metric: &str| {
                report["limits"].as_array().expect("limits").iter().find(|l| l["metric"] == metric).and_then(|l| l["used"].as_u64())
            };
            let got = (used("requests"), used("total_tokens"), used("cost_usd"));
            if got == (Some(want.0), Some(want.1), Some(want.2)) {
                return;
            }
            assert!(started.elapsed() < Duration::from_secs(10), "{user}'s usage never settled to {want:?}: {report}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.wrangler.log).unwrap_or_default()
    }
}

/// Waits out the last 30 s of a UTC day, so the day's counters cannot reset mid-test.
fn away_from_day_end() {
    let left = 86_400_000 - now_ms() % 86_400_000;
    if left < 30_000 {
        std::thread::sleep(Duration::from_millis(left + 250));
    }
}

/// The `data:` payloads of an SSE body.
fn sse_data(body: &str) -> Vec<String> {
    body.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_owned).collect()
}

/// The text an OpenAI stream's chunks carry, and the models they name.
fn stream_text(body: &str) -> (String, Vec<String>) {
    let mut text = String::new();
    let mut models = Vec::new();
    for data in sse_data(body).iter().filter(|d| *d != "[DONE]") {
        let chunk: Value = serde_json::from_str(data).unwrap_or_else(|e| panic!("{e}: {data}"));
        if let Some(t) = chunk["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
        if let Some(m) = chunk["model"].as_str() {
            models.push(m.to_owned());
        }
    }
    (text, models)
}

/// A completion served by `deployment` (its upstream model in `model`, its name in the header).
#[track_caller]
fn assert_served_by(r: &Reply, deployment: &str, upstream_model: &str) {
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-tollgate-deployment"), Some(deployment), "{r:?}");
    let body = r.json();
    assert_eq!(body["model"], upstream_model, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], MOCK_CONTENT, "{body}");
    assert_eq!((body["usage"]["prompt_tokens"].as_u64(), body["usage"]["completion_tokens"].as_u64()), (Some(9), Some(8)));
}

/// A stream served whole by `deployment`: the mock's text, every chunk naming the upstream
/// model, ending in `[DONE]`.
#[track_caller]
fn assert_streamed_by(r: &Reply, deployment: &str, upstream_model: &str) {
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-tollgate-deployment"), Some(deployment), "{r:?}");
    assert!(r.header("content-type").is_some_and(|c| c.starts_with("text/event-stream")), "{r:?}");
    let (text, models) = stream_text(&r.body);
    assert_eq!(text, MOCK_CONTENT, "{}", r.body);
    assert!(!models.is_empty() && models.iter().all(|m| m == upstream_model), "{models:?}");
    assert_eq!(sse_data(&r.body).last().map(String::as_str), Some("[DONE]"), "{}", r.body);
}

#[test]
fn non_stream_requests_fall_back_past_500_429_refused_and_hanging_deployments() {
    let s = Stack::start("wf-nonstream");

    // 500: the next deployment answers; the failing one was asked once.
    let r = s.chat("u-500", "after-500", false);
    assert_served_by(&r, "ok", "up-ok");
    assert_eq!(s.counts(&["fail500", "ok"]), [1, 1]);
    // Plain failures below `health.failures` do not cool a deployment down: tried again.
    assert_served_by(&s.chat("u-500", "after-500", false), "ok", "up-ok");
    assert_eq!(s.counts(&["fail500", "ok"]), [2, 2]);

    // 429 with retry-after: 30 s: the next deployment answers, and the cooldown holds — for
    // the next request at once (this isolate's copy) and after the copy has expired (the health
    // object): the 429ing provider is not asked again.
    assert_served_by(&s.chat("u-429", "after-429", false), "ok", "up-ok");
    assert_eq!(s.counts(&["fail429", "ok"]), [1, 3]);
    assert_served_by(&s.chat("u-429", "after-429", false), "ok", "up-ok");
    assert_eq!(s.counts(&["fail429", "ok"]), [1, 4]);
    std::thread::sleep(Duration::from_millis(1200));
    assert_served_by(&s.chat("u-429", "after-429", false), "ok", "up-ok");
    assert_eq!(s.counts(&["fail429", "ok"]), [1, 5], "the cooldown is read back from the health object");

    // A refused connection.
    let started = Instant::now();
    assert_served_by(&s.chat("u-closed", "after-closed", false), "ok", "up-ok");
    assert_eq!(s.count("ok"), 6);
    eprintln!("refused connection, then served: {:?}", started.elapsed());

    // A provider that never answers: abandoned after the attempt timeout.
    let started = Instant::now();
    assert_served_by(&s.chat("u-hang", "after-hang", false), "ok", "up-ok");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(ATTEMPT_TIMEOUT_MS - 50), "the hanging attempt was waited for: {took:?}");
    assert!(took < Duration::from_secs(8), "{took:?}");
    assert_eq!(s.counts(&["hang", "ok"]), [1, 7]);

    // No provider key or provider error text reached the client or the log.
    let log = s.log();
    assert!(!log.contains(PROVIDER_KEY), "the provider key is in the log");
    assert!(!log.contains("The mock provider is set to fail"), "a provider's error body is in the log");
    assert!(log.contains("attempt 1 on fail429 failed (429)"), "failed attempts are logged:\n{log}");
}

#[test]
fn streams_fall_back_before_their_first_byte_and_end_cleanly_after_it() {
    let s = Stack::start("wf-stream");

    // A 500 before the stream: the next deployment streams.
    assert_streamed_by(&s.chat("u-s500", "after-500", true), "ok", "up-ok");
    assert_eq!(s.counts(&["fail500", "ok"]), [1, 1]);

    // The provider answers 200, then drops the connection before its first event: nothing was
    // written to the client yet, so the next deployment streams.
    assert_streamed_by(&s.chat("u-reset0", "after-reset0", true), "ok", "up-ok");
    assert_eq!(s.counts(&["reset0", "ok"]), [1, 2]);

    // The provider drops the connection after two events: they reached the client, so there is
    // no fallback; the stream ends with an OpenAI error event, promptly, and no [DONE] (the
    // answer is incomplete) — the worker's one rule for broken streams, on every path.
    let started = Instant::now();
    let r = s.chat("u-reset2", "reset-mid-stream", true);
    assert!(started.elapsed() < Duration::from_secs(5), "the broken stream ended promptly: {:?}", started.elapsed());
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-tollgate-deployment"), Some("reset2"), "{r:?}");
    let data = sse_data(&r.body);
    assert_eq!(data.len(), 3, "two events, the error: {}", r.body);
    let first: Value = serde_json::from_str(&data[0]).expect("chunk");
    assert_eq!((first["model"].as_str(), first["choices"][0]["delta"]["role"].as_str()), (Some("up-reset2"), Some("assistant")));
    let second: Value = serde_json::from_str(&data[1]).expect("chunk");
    assert_eq!(second["choices"][0]["delta"]["content"], "Hello ");
    let error: Value = serde_json::from_str(&data[2]).expect("error event");
    assert!(error["error"]["message"].is_string() && error["error"]["type"].is_string(), "{error}");
    assert!(!r.body.contains("[DONE]"), "{}", r.body);
    assert_eq!(s.counts(&["reset2", "ok"]), [1, 2], "no fallback once the stream had begun");
}

#[test]
fn a_failing_openai_deployment_falls_back_to_an_anthropic_one_translated_both_ways() {
    let s = Stack::start("wf-dialect");
    let r = s.chat("u-x", "cross-dialect", false);
    assert_served_by(&r, "anth", "claude-mock-1");
    assert_eq!(r.json()["object"], "chat.completion");
    assert_eq!(s.counts(&["fail500", "anth"]), [1, 1]);
    let last = tollgate_host_tests::proc::get(&agent(), &format!("{}/__mock/last-path", s.mock_url("anth"))).json();
    assert_eq!(last, json!({ "path": "/v1/messages", "model": "claude-mock-1" }), "translated for Anthropic");

    let r = s.chat("u-x", "cross-dialect", true);
    assert_streamed_by(&r, "anth", "claude-mock-1");
    assert_eq!(s.counts(&["fail500", "anth"]), [2, 2]);
}

#[test]
fn attempts_are_capped_and_an_alias_whose_deployments_all_cool_down_answers_503() {
    let s = Stack::start("wf-caps");

    // Three failing deployments, max_attempts 2: exactly two upstream requests, one 502.
    let r = s.chat("u-cap", "capped", false);
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(r.header("x-tollgate-deployment"), None);
    assert_eq!(
        r.json()["error"],
        json!({ "message": "Every deployment of model \"capped\" that was tried failed: cap1 (503), cap2 (503).",
                "type": "server_error", "param": null, "code": "all_deployments_failed" })
    );
    assert_eq!(s.counts(&["cap1", "cap2", "cap3"]), [1, 1, 0]);

    // The only deployment answers 429 + retry-after: 30: a 502, then — cooling down — a 503
    // without asking it, retry-after the rest of the cooldown.
    let r = s.chat("u-only", "only-429", false);
    assert_eq!((r.status, r.json()["error"]["code"].as_str()), (502, Some("all_deployments_failed")), "{r:?}");
    let r = s.chat("u-only", "only-429", false);
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.json()["error"]["code"], "deployments_unavailable");
    let retry: u64 = r.header("retry-after").expect("retry-after").parse().expect("seconds");
    assert!((28..=30).contains(&retry), "{retry}");
    assert_eq!(s.count("only429"), 1);

    // Nothing was served: no tokens, no cost. A request that reached providers counts as a
    // request; the 503 was never sent and counts for nothing (core's ending rule).
    s.settled_to("u-cap", (1, 0, 0));
    s.settled_to("u-only", (1, 0, 0));
}

#[test]
fn only_the_serving_deployment_is_charged_once_at_its_own_price() {
    let s = Stack::start("wf-charge");
    // fail500 (priced 100/100 USD per million) fails, ok (1/2) serves 9 + 8 tokens:
    // one request, 17 tokens, 9 × 1 + 8 × 2 = 25 micro-dollars.
    assert_served_by(&s.chat("u-charge", "after-500", false), "ok", "up-ok");
    s.settled_to("u-charge", (1, 17, 25));
    // The same for a stream (usage from the provider's stream) and a cross-dialect answer at
    // the Anthropic deployment's price (100/100: 9 × 100 + 8 × 100 = 1700).
    assert_streamed_by(&s.chat_with("u-charge-stream", "after-500", true, &[("x-mock-usage", "9,8")]), "ok", "up-ok");
    s.settled_to("u-charge-stream", (1, 17, 25));
    assert_served_by(&s.chat("u-charge-anth", "cross-dialect", false), "anth", "claude-mock-1");
    s.settled_to("u-charge-anth", (1, 17, 1700));
    assert_eq!(s.counts(&["fail500", "ok", "anth"]), [3, 2, 1]);
}

/// Not an assertion on time (the machine is noisy): prints the median latency a client sees
/// with one failed attempt (a 500 first) and without (the same deployment alone).
#[test]
fn latency_added_by_one_failed_attempt() {
    let s = Stack::start("wf-latency");
    let run = |alias: &str| -> Vec<f64> {
        for _ in 0..3 {
            assert_eq!(s.chat("u-lat", alias, false).status, 200); // warm up
        }
        let mut ms: Vec<f64> = (0..20)
            .map(|_| {
                let t = Instant::now();
                let r = s.chat("u-lat", alias, false);
                assert_served_by(&r, "ok", "up-ok");
                t.elapsed().as_secs_f64() * 1000.0
            })
            .collect();
        ms.sort_by(f64::total_cmp);
        ms
    };
    let direct = run("direct");
    let fallback = run("after-500");
    let median = |v: &[f64]| (v[9] + v[10]) / 2.0;
    eprintln!(
        "LATENCY (20 requests each, ms): direct median {:.2} (min {:.2}, max {:.2}); one failed attempt first: median {:.2} (min {:.2}, max {:.2}); added by the failed attempt: {:.2}",
        median(&direct),
        direct[0],
        direct[19],
        median(&fallback),
        fallback[0],
        fallback[19],
        median(&fallback) - median(&direct)
    );
    assert_eq!(s.count("fail500"), 23);
}

#[test]
fn a_provider_announcing_its_quota_is_exhausted_is_steered_around_until_the_reset() {
    let s = Stack::start("wf-steer");
    // Served, but the provider says no requests remain (reset in 2 s): the next request goes
    // straight to the next deployment — before a 429, not after one.
    let r = s.chat("u-steer", "steer", false);
    assert_served_by(&r, "quota0", "up-quota0");
    // The rate-limit headers are the client's own (1000 requests a day, this is the first),
    // never the provider's.
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("999"), "{r:?}");
    assert_ne!(r.header("x-ratelimit-remaining-tokens"), Some("100000"), "{r:?}");
    assert_served_by(&s.chat("u-steer", "steer", false), "ok", "up-ok");
    assert_eq!(s.counts(&["quota0", "ok"]), [1, 1]);
    // Past the reset the provider is asked again.
    std::thread::sleep(Duration::from_millis(2300));
    assert_served_by(&s.chat("u-steer", "steer", false), "quota0", "up-quota0");
    assert_eq!(s.counts(&["quota0", "ok"]), [2, 1]);
}
