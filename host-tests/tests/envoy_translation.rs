//! Provider translation end to end in a real Envoy 1.40 (V8, `--concurrency 2`): the official
//! `openai` Python SDK (`.venv`, `scripts/setup.sh all`) as the client, the release filter.wasm
//! with `examples/envoy/providers.yaml`, and three mock providers replaying recorded Anthropic,
//! Gemini and OpenAI traffic (../shared/fixtures, or `$TOLLGATE_FIXTURES`), one per provider
//! cluster, each requiring its own key.
//!
//! Needs `scripts/build-wasm.sh`, the release mock provider and Envoy (`scripts/test.sh` does
//! all three). The client side runs `examples/clients/openai_translation.py --scenarios`.

use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tollgate_host_tests::envoy::{self, providers_on_mocks, render, Rendered, TempDir};
use tollgate_host_tests::proc::{
    agent, fixtures_dir, get, mock_request_count, post_json, start_mock_provider_with, workspace_root, Server,
};

const TEMPLATE: &str = "examples/envoy/providers.yaml";
const KEYS: [(&str, &str); 3] = [
    ("ANTHROPIC_API_KEY", "sk-ant-test-3f1c9a0e"),
    ("GEMINI_API_KEY", "AIza-test-77d2b41c"),
    ("OPENAI_API_KEY", "sk-proj-test-5be0c6d8"),
];

fn fixture(name: &str) -> String {
    std::fs::read_to_string(fixtures_dir().join(name)).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

/// The `data:` payloads of a recorded SSE stream, as JSON.
fn sse_data(name: &str) -> Vec<Value> {
    fixture(name)
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .filter_map(|d| serde_json::from_str(d.trim()).ok())
        .collect()
}

/// Waits out the last minute of an hour, so the hour window cannot reset mid-test.
fn away_from_hour_boundary() {
    let ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
    let into_hour = ms % 3_600_000;
    if into_hour > 3_540_000 {
        std::thread::sleep(Duration::from_millis(3_600_000 - into_hour + 100));
    }
}

struct Mock {
    _server: Server,
    url: String,
    port: u16,
}

fn mock(key: &str) -> Mock {
    let dir = fixtures_dir();
    let (server, url) = start_mock_provider_with(&["--require-key", key, "--fixtures", dir.to_str().unwrap()]);
    let port = url.rsplit(':').next().unwrap().parse().unwrap();
    Mock { _server: server, url, port }
}

/// providers.yaml with the example policy's free tier set to 3 requests an hour and each
/// provider cluster pointed at its plain-HTTP mock on loopback (TLS and DNS removed).
fn render_with_mocks(anthropic: u16, gemini: u16, openai: u16) -> Rendered {
    let mut r = providers_on_mocks(anthropic, gemini, openai, None);
    let limits = r#"{ "window": "minute", "requests": 5 }, { "window": "day", "requests": 50 }"#;
    assert!(r.yaml.contains(limits), "the example policy's free tier changed: update this test");
    r.yaml = r.yaml.replace(limits, r#"{ "window": "hour", "requests": 3 }"#);
    r
}

/// `envoy --mode validate` with the given environment.
fn validate(rendered: &Rendered, env: &[(&str, &str)]) -> (bool, String) {
    let dir = TempDir::new("envoy-validate-providers");
    let config = dir.path().join("envoy.yaml");
    std::fs::write(&config, &rendered.yaml).unwrap();
    let mut cmd = Command::new(envoy::envoy_bin());
    cmd.args(["--mode", "validate", "--log-level", "warn", "-c"]).arg(&config);
    for (k, _) in KEYS {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run envoy --mode validate");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn providers_yaml_passes_envoy_validation_and_needs_every_key() {
    let rendered = render(TEMPLATE, None, None);
    for (_, key) in KEYS {
        assert!(!rendered.yaml.contains(key));
    }
    let (ok, output) = validate(&rendered, &KEYS);
    assert!(ok, "{output}");
    let (ok, output) = validate(&rendered, &KEYS[1..]);
    assert!(!ok && output.contains("ANTHROPIC_API_KEY"), "{output}");
}

/// Runs the SDK client over `scenarios`; one JSON result per scenario.
fn sdk(base_url: &str, scenarios: &Value) -> Vec<Value> {
    let python = workspace_root().join(".venv/bin/python");
    assert!(python.exists(), "{} is missing: run scripts/setup.sh all", python.display());
    let out = Command::new(python)
        .arg(workspace_root().join("examples/clients/openai_translation.py"))
        .arg(base_url)
        .arg("--scenarios")
        .arg(scenarios.to_string())
        .output()
        .expect("run the python client");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let results: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
    assert_eq!(results.len(), scenarios.as_array().unwrap().len(), "{stdout}");
    for (keys, (_, key)) in [(&stdout, KEYS[0]), (&stdout, KEYS[1]), (&stdout, KEYS[2])] {
        assert!(!keys.contains(key), "a provider key reached the client: {stdout}");
    }
    results
}

fn by_name<'a>(results: &'a [Value], name: &str) -> &'a Value {
    results.iter().find(|r| r["name"] == name).unwrap_or_else(|| panic!("no result {name}"))
}

fn last_request(mock: &Mock) -> (Value, Vec<String>) {
    let http = agent();
    let path = get(&http, &format!("{}/__mock/last-path", mock.url)).json();
    let names = get(&http, &format!("{}/__mock/last-headers", mock.url)).json()["names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_owned())
        .collect();
    (path, names)
}

fn assert_openai_answer(r: &Value, client_model: &str, remaining: &str) {
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["remaining"], remaining, "{r}");
    let ids = r["ids"].as_array().unwrap();
    assert_eq!(ids.len(), 1, "one id per answer: {r}");
    let id = ids[0].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-tg") && id.len() == 35, "{id}");
    assert_eq!(r["models"], json!([client_model]), "the client's model name comes back: {r}");
}

#[test]
fn openai_sdk_reaches_anthropic_gemini_and_openai_through_envoy() {
    away_from_hour_boundary();
    let started = std::time::Instant::now();
    let (anthropic, gemini, openai) = (mock(KEYS[0].1), mock(KEYS[1].1), mock(KEYS[2].1));
    let rendered = render_with_mocks(anthropic.port, gemini.port, openai.port);
    let envoy = envoy::start(&rendered, &KEYS);
    let base = format!("{}/v1", envoy.url);

    let scenarios = json!([
        {"name": "anthropic_text", "model": "claude-sonnet", "user": "u-anthropic", "fixture": "anthropic/messages_nonstream_text.vercel.json"},
        {"name": "anthropic_stream_tool", "model": "claude-sonnet", "user": "u-anthropic", "stream": true, "tools": true, "fixture": "anthropic/stream_text_tool_use.sse"},
        {"name": "gemini_text", "model": "gemini-flash", "user": "u-gemini", "fixture": "gemini/generate_text_safety_ratings.firebase.json"},
        {"name": "gemini_stream", "model": "gemini-flash", "user": "u-gemini", "stream": true, "fixture": "gemini/stream_sse_text.sse"},
        {"name": "openai_stream", "model": "gpt-4o-mini", "user": "u-openai", "stream": true, "fixture": "openai/chat_stream_include_usage_cached.sse"},
        {"name": "unknown_model", "model": "gpt-9-ultra", "user": "u-unknown"},
        {"name": "anthropic_n2", "model": "claude-sonnet", "user": "u-n2", "n": 2},
        {"name": "limit_1", "model": "claude-sonnet", "user": "u-limited", "fixture": "anthropic/messages_nonstream_text.vercel.json"},
        {"name": "limit_2", "model": "claude-sonnet", "user": "u-limited", "fixture": "anthropic/messages_nonstream_text.vercel.json"},
        {"name": "limit_3", "model": "claude-sonnet", "user": "u-limited", "fixture": "anthropic/messages_nonstream_text.vercel.json"},
        {"name": "limit_4", "model": "claude-sonnet", "user": "u-limited", "fixture": "anthropic/messages_nonstream_text.vercel.json"},
        {"name": "anthropic_429", "model": "claude-sonnet", "user": "u-429", "fixture": "anthropic/error_429_rate_limit.json", "retry_after": 17},
        {"name": "anthropic_stream_429", "model": "claude-sonnet", "user": "u-429", "stream": true, "fixture": "anthropic/error_429_rate_limit.json", "retry_after": 5},
        {"name": "gemini_stream_429", "model": "gemini-flash", "user": "u-429", "stream": true, "fixture": "gemini/error_429_resource_exhausted.firebase.json"}
    ]);
    let results = sdk(&base, &scenarios);

    // Anthropic, non-stream: the recorded text and usage, in OpenAI's shape.
    let recorded: Value = serde_json::from_str(&fixture("anthropic/messages_nonstream_text.vercel.json")).unwrap();
    let r = by_name(&results, "anthropic_text");
    assert_openai_answer(r, "claude-sonnet", "2");
    assert_eq!(r["content"], recorded["content"][0]["text"], "{r}");
    assert_eq!(r["finish_reason"], "stop");
    assert_eq!((r["usage"]["prompt_tokens"].as_u64(), r["usage"]["completion_tokens"].as_u64()), (Some(12), Some(29)), "{r}");
    assert_eq!(r["content_type"], "application/json");

    // Anthropic, stream with a tool call: the SDK accumulates the recorded text, tool name and
    // arguments.
    let events = sse_data("anthropic/stream_text_tool_use.sse");
    let text: String = events.iter().filter_map(|e| e["delta"]["text"].as_str()).collect();
    let arguments: String = events.iter().filter_map(|e| e["delta"]["partial_json"].as_str()).collect();
    let tool = events.iter().find(|e| e["content_block"]["type"] == "tool_use").unwrap();
    let r = by_name(&results, "anthropic_stream_tool");
    assert_openai_answer(r, "claude-sonnet", "1");
    assert_eq!(r["content_type"], "text/event-stream");
    assert!(r["chunks"].as_u64().unwrap() > 10, "{r}");
    assert_eq!(r["content"], text.as_str());
    assert_eq!(r["tool_calls"], json!([{"id": tool["content_block"]["id"], "name": "get_weather", "arguments": arguments}]), "{r}");
    assert_eq!(serde_json::from_str::<Value>(&arguments).unwrap(), json!({"location": "San Francisco, CA"}));
    assert_eq!(r["finish_reason"], "tool_calls");
    assert_eq!((r["usage"]["prompt_tokens"].as_u64(), r["usage"]["completion_tokens"].as_u64()), (Some(599), Some(135)), "{r}");

    // Gemini, non-stream and stream (alt=sse).
    let recorded: Value = serde_json::from_str(&fixture("gemini/generate_text_safety_ratings.firebase.json")).unwrap();
    let r = by_name(&results, "gemini_text");
    assert_openai_answer(r, "gemini-flash", "2");
    assert_eq!(r["content"], recorded["candidates"][0]["content"]["parts"][0]["text"]);
    assert_eq!(r["finish_reason"], "stop");
    assert_eq!((r["usage"]["prompt_tokens"].as_u64(), r["usage"]["completion_tokens"].as_u64()), (Some(7), Some(22)), "{r}");
    let text: String = sse_data("gemini/stream_sse_text.sse")
        .iter()
        .filter_map(|e| e["candidates"][0]["content"]["parts"][0]["text"].as_str().map(str::to_owned))
        .collect();
    let r = by_name(&results, "gemini_stream");
    assert_openai_answer(r, "gemini-flash", "1");
    assert_eq!(r["content"], text.as_str());
    assert_eq!(r["finish_reason"], "stop");
    assert_eq!((r["usage"]["prompt_tokens"].as_u64(), r["usage"]["completion_tokens"].as_u64()), (Some(13), Some(8)), "{r}");

    // OpenAI itself (pass-through pair), stream with the usage chunk the client asked for.
    // (The pass-through pair keeps the provider's chunk ids and model names, so ids and models
    // are not checked here.)
    let text: String = sse_data("openai/chat_stream_include_usage_cached.sse")
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str().map(str::to_owned))
        .collect();
    let r = by_name(&results, "openai_stream");
    assert_eq!((&r["ok"], &r["remaining"], &r["content_type"]), (&json!(true), &json!("2"), &json!("text/event-stream")), "{r}");
    assert_eq!(r["content"], text.as_str());
    assert_eq!((r["usage"]["prompt_tokens"].as_u64(), r["usage"]["completion_tokens"].as_u64()), (Some(1420), Some(100)), "{r}");

    // Tollgate's own answers: unknown model 404, a parameter Anthropic cannot honour 400.
    let r = by_name(&results, "unknown_model");
    assert_eq!((r["error"].as_str(), r["status"].as_u64(), r["code"].as_str()), (Some("NotFoundError"), Some(404), Some("model_not_found")), "{r}");
    // Refused before admission: not counted, so no rate-limit headers.
    assert_eq!(r["remaining"], Value::Null, "{r}");
    let r = by_name(&results, "anthropic_n2");
    assert_eq!((r["error"].as_str(), r["status"].as_u64()), (Some("BadRequestError"), Some(400)), "{r}");
    assert_eq!(r["code"], "unsupported_parameter", "{r}");

    // The limit applies to translated requests: the fourth in the hour is Tollgate's 429.
    for (n, remaining) in [(1, "2"), (2, "1"), (3, "0")] {
        assert_openai_answer(by_name(&results, &format!("limit_{n}")), "claude-sonnet", remaining);
    }
    let r = by_name(&results, "limit_4");
    assert_eq!((r["error"].as_str(), r["status"].as_u64()), (Some("RateLimitError"), Some(429)), "{r}");
    assert_eq!((r["code"].as_str(), r["type"].as_str()), (Some("rate_limit_exceeded"), Some("requests")), "{r}");

    // The provider's 429, with its retry-after kept.
    let recorded: Value = serde_json::from_str(&fixture("anthropic/error_429_rate_limit.json")).unwrap();
    let r = by_name(&results, "anthropic_429");
    assert_eq!((r["error"].as_str(), r["status"].as_u64()), (Some("RateLimitError"), Some(429)), "{r}");
    assert_eq!(r["retry_after"], "17", "{r}");
    assert!(r["message"].as_str().unwrap().ends_with(recorded["error"]["message"].as_str().unwrap()), "{r}");

    // An error status on a stream request is answered whole, as an error the SDK raises when the
    // stream is opened.
    let r = by_name(&results, "anthropic_stream_429");
    assert_eq!((r["error"].as_str(), r["status"].as_u64(), r["retry_after"].as_str()), (Some("RateLimitError"), Some(429), Some("5")), "{r}");
    let r = by_name(&results, "gemini_stream_429");
    assert_eq!((r["error"].as_str(), r["status"].as_u64()), (Some("RateLimitError"), Some(429)), "{r}");

    // Each provider got exactly its requests (so each model reached its cluster), on its own
    // path, with its own key header (the mocks answer 401 to anything else) and without the
    // client's authorization.
    let http = agent();
    assert_eq!(mock_request_count(&http, &anthropic.url), 7, "text, stream, 3 within the limit, two 429s");
    assert_eq!(mock_request_count(&http, &gemini.url), 3);
    assert_eq!(mock_request_count(&http, &openai.url), 1);
    let (last, names) = last_request(&anthropic);
    assert_eq!(last, json!({"path": "/v1/messages", "model": "claude-sonnet-4-5"}));
    assert!(names.contains(&"x-api-key".to_owned()) && names.contains(&"anthropic-version".to_owned()), "{names:?}");
    let (last, names) = last_request(&gemini);
    assert_eq!(last["path"], "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse");
    assert!(names.contains(&"x-goog-api-key".to_owned()), "{names:?}");
    let (last, names) = last_request(&openai);
    assert_eq!(last, json!({"path": "/v1/chat/completions", "model": "gpt-4o-mini"}));
    assert!(names.contains(&"authorization".to_owned()), "{names:?}");
    for (mock, own) in [(&anthropic, "x-api-key"), (&gemini, "x-goog-api-key")] {
        let (_, names) = last_request(mock);
        for other in ["authorization", "x-api-key", "x-goog-api-key", "x-tollgate-cluster", "x-tollgate-user", "accept-encoding"] {
            assert!(other == own || !names.contains(&other.to_owned()), "{other} reached the provider: {names:?}");
        }
    }

    // A client cannot pick a cluster: its own x-tollgate-cluster is dropped, so an untranslated
    // path gets the config's 404 and a Gemini model still goes to Gemini.
    let before = mock_request_count(&http, &anthropic.url);
    let r = post_json(&http, &format!("{}/v1/embeddings", envoy.url), &[("x-tollgate-cluster", "anthropic"), ("x-tollgate-user", "u-sneaky")], "{}");
    assert_eq!(r.status, 404, "{r:?}");
    assert_eq!(r.json()["error"]["code"], "unknown_url");
    let body = r#"{"model": "gemini-flash", "messages": [{"role": "user", "content": "Hi"}]}"#;
    let r = post_json(
        &http,
        &format!("{}/v1/chat/completions", envoy.url),
        &[("x-tollgate-cluster", "anthropic"), ("x-tollgate-user", "u-sneaky"), ("x-mock-fixture", "gemini/generate_text_safety_ratings.firebase.json")],
        body,
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(mock_request_count(&http, &anthropic.url), before);
    assert_eq!(mock_request_count(&http, &gemini.url), 4);

    // A provider that cannot be reached: Envoy's own 503 becomes core's 502 for it, in OpenAI's
    // format (the same answer the worker gives).
    let Mock { _server: mut down, .. } = openai;
    down.stop();
    let body = r#"{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}], "stream": true}"#;
    let r = post_json(&http, &format!("{}/v1/chat/completions", envoy.url), &[("x-tollgate-user", "u-down")], body);
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(r.header("content-type"), Some("application/json"), "{r:?}");
    assert_eq!(r.json()["error"]["code"], "upstream_unavailable", "{r:?}");
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("2"), "{r:?}");

    // Metrics: what was translated, refused and what the providers reported, nothing unknown.
    let stat = |n: &str| envoy.stat(&format!("wasmcustom.tollgate_{n}")).unwrap_or(0);
    let reported: Vec<&Value> = results.iter().filter(|r| r["ok"] == true).collect();
    let input: u64 = reported.iter().map(|r| r["usage"]["prompt_tokens"].as_u64().unwrap()).sum::<u64>() + 7;
    let output: u64 = reported.iter().map(|r| r["usage"]["completion_tokens"].as_u64().unwrap()).sum::<u64>() + 22;
    assert_eq!((stat("tokens_input"), stat("tokens_output")), (input, output));
    assert_eq!(stat("requests_translated"), 13, "11 upstream from the SDK + 2 raw");
    assert_eq!(stat("translation_refused"), 1, "n=2 to Anthropic, after admission");
    assert_eq!(stat("requests_invalid"), 2, "the unknown model, before admission, and /v1/embeddings (no such surface)");
    assert_eq!(stat("upstream_errors"), 4);
    assert_eq!(stat("requests_denied"), 1);
    assert_eq!(stat("host_errors"), 0);

    let log = envoy.log();
    for (_, key) in KEYS {
        assert!(!log.contains(key), "a provider key reached Envoy's log");
    }
    assert!(!log.contains("panicked") && !log.contains("Failed to"), "{log}");
    eprintln!("translation e2e: {:?}", started.elapsed());
}
