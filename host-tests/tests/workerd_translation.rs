//! End to end in real workerd (`wrangler dev`, local mode, offline): the official `openai`
//! Python SDK talks OpenAI to the edge worker, which translates to Anthropic, Gemini and an
//! OpenAI-compatible provider — all three played by the mock provider replaying recorded
//! traffic (`x-mock-fixture`, passed on by the worker's `PROVIDER_PASS_HEADERS` var).
//!
//! Needs, once: `scripts/setup.sh all` (npm packages, `.venv` with `openai`),
//! `scripts/build-worker.sh`, and `cargo build --release -p tollgate-mock-provider`. The
//! recordings are `../shared/fixtures` from the workspace root, or `$TOLLGATE_FIXTURES`.
//!
//! Every expected value (text, tool call, usage) is read from the recording the mock replays,
//! never written out here. Provider keys are Worker secrets from an `--env-file` in a scratch
//! directory; the mock runs with `--require-key`, so every 200 proves the worker sent the
//! provider's key, not the client's.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tollgate_host_tests::proc::{
    agent, fixtures_dir, get, mock_request_count, post_json, start_mock_provider_with, workspace_root,
};
use tollgate_host_tests::workerd::{start_wrangler, Scratch};

/// The key every provider secret holds; the mock accepts only this one.
const PROVIDER_KEY: &str = "tg-test-provider-key-3f9c1e";
/// What the SDK sends as its API key (Tollgate's business; must never reach a provider).
const CLIENT_KEY: &str = "tollgate-client-key-not-a-provider-key";
/// The per-identity limit: a day window, so that no window resets during a run.
const DAY_LIMIT: u64 = 3;

fn policy(mock_url: &str) -> String {
    json!({
        "identity": { "header": "x-tollgate-user" },
        "tier": { "default": "default" },
        "tiers": { "default": { "limits": [ { "window": "day", "requests": DAY_LIMIT } ] } },
        "providers": {
            "anthropic": { "kind": "anthropic", "base_url": mock_url,
                           "api_key": { "secret": "TG_ANTHROPIC_KEY" }, "default_max_tokens": 1024 },
            "gemini": { "kind": "gemini", "base_url": mock_url, "api_key": { "secret": "TG_GEMINI_KEY" } },
            "compat": { "kind": "openai", "base_url": mock_url, "api_key": { "secret": "TG_COMPAT_KEY" } },
            "unkeyed": { "kind": "anthropic", "base_url": mock_url, "api_key": { "secret": "TG_UNSET_KEY" }, "default_max_tokens": 1024 }
        },
        "models": {
            "claude-sonnet": { "provider": "anthropic", "model": "claude-sonnet-4-5" },
            "gemini-flash": { "provider": "gemini", "model": "gemini-2.5-flash" },
            "compat-model": { "provider": "compat", "model": "gpt-4o" },
            "claude-unkeyed": { "provider": "unkeyed", "model": "claude-sonnet-4-5" }
        }
    })
    .to_string()
}

fn fixture(name: &str) -> String {
    let path = fixtures_dir().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The JSON payloads of a recorded SSE body's `data:` lines (the recordings used here put each
/// payload on one line).
fn sse_payloads(name: &str) -> Vec<Value> {
    fixture(name)
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(str::trim)
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("{name}: {e}: {d}")))
        .collect()
}

/// The text of a Gemini response (or stream element): its first candidate's text parts.
fn gemini_text(v: &Value) -> String {
    v["candidates"][0]["content"]["parts"]
        .as_array()
        .map(|parts| parts.iter().filter_map(|p| p["text"].as_str()).collect())
        .unwrap_or_default()
}

/// A recording cut short, as a provider connection dropped mid-answer would leave it.
const CUT_STREAM: &str = "cut/anthropic_stream_text_tool_use_before_message_delta.sse";

/// What the mock replays: the recordings as they are (one symlink per provider directory), plus
/// [`CUT_STREAM`], a recorded Anthropic stream truncated before its `message_delta` (derived
/// from the recording, never hand-written).
fn replay_dir(scratch: &Path) -> PathBuf {
    let recorded = fixtures_dir();
    let dir = scratch.join("fixtures");
    std::fs::create_dir_all(dir.join("cut")).expect("create replay dir");
    for entry in std::fs::read_dir(&recorded).expect("read fixtures dir").flatten() {
        if entry.path().is_dir() {
            std::os::unix::fs::symlink(entry.path(), dir.join(entry.file_name())).expect("link fixtures");
        }
    }
    let whole = fixture("anthropic/stream_text_tool_use.sse");
    let cut = whole.find("event: message_delta").expect("a message_delta in the recording");
    std::fs::write(dir.join(CUT_STREAM), &whole[..cut]).expect("write the cut stream");
    dir
}

/// Waits out the last 20 s of a UTC day, so the day window cannot reset mid-test.
fn away_from_day_boundary() {
    let ms = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_millis() as u64;
    let left = 86_400_000 - ms % 86_400_000;
    if left < 20_000 {
        eprintln!("waiting {left} ms for the next day window");
        std::thread::sleep(Duration::from_millis(left + 250));
    }
}

/// Runs `calls` through `examples/clients/openai_sdk_calls.py` (the official SDK)
/// and returns one result per call, by name.
fn sdk(base_url: &str, calls: &[Value]) -> std::collections::HashMap<String, Value> {
    let root = workspace_root();
    let python = root.join(".venv/bin/python");
    assert!(python.exists(), "{} is missing: run scripts/setup.sh all", python.display());
    let mut child = Command::new(python)
        .arg(root.join("examples/clients/openai_sdk_calls.py"))
        .arg(format!("{base_url}/v1"))
        .current_dir(&root)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the openai SDK client");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(Value::from(calls.to_vec()).to_string().as_bytes())
        .expect("write calls");
    let out = child.wait_with_output().expect("run the openai SDK client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "SDK client failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let results: std::collections::HashMap<String, Value> = stdout
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .map(|v| (v["name"].as_str().expect("name").to_owned(), v))
        .collect();
    assert_eq!(results.len(), calls.len(), "{stdout}");
    results
}

fn call(name: &str, model: &str, fixture: &str, stream: bool) -> Value {
    json!({ "name": name, "model": model, "stream": stream,
            "headers": { "x-mock-fixture": fixture, "x-tollgate-user": name } })
}

fn assert_ok(r: &Value) {
    assert!(r.get("error").is_none(), "{r}");
    let id = r["id"].as_str().expect("id");
    assert!(id.starts_with("chatcmpl-") && id.len() > 12, "{r}");
}

/// The mock provider's view of the last request: the header names it received.
fn last_header_names(mock_url: &str) -> Vec<String> {
    let names = get(&agent(), &format!("{mock_url}/__mock/last-headers")).json();
    names["names"].as_array().expect("names").iter().map(|n| n.as_str().expect("name").to_owned()).collect()
}

#[test]
fn the_openai_sdk_reaches_anthropic_gemini_and_openai_compatible_providers_through_the_worker() {
    let scratch = Scratch::new("workerd-translation");
    let fixtures = replay_dir(&scratch.0);
    let fixtures_arg = fixtures.to_string_lossy().into_owned();
    let (_mock, mock_url) = start_mock_provider_with(&["--fixtures", &fixtures_arg, "--require-key", PROVIDER_KEY]);
    let env_file = scratch.0.join("secrets.env");
    std::fs::write(
        &env_file,
        format!("TG_ANTHROPIC_KEY={PROVIDER_KEY}\nTG_GEMINI_KEY={PROVIDER_KEY}\nTG_COMPAT_KEY={PROVIDER_KEY}\n"),
    )
    .expect("write secrets");
    let policy = policy(&mock_url);
    let wrangler = start_wrangler(
        &scratch.0,
        &[
            ("UPSTREAM_URL", &mock_url),
            ("TOLLGATE_POLICY", &policy),
            ("PROVIDER_PASS_HEADERS", "x-mock-fixture,x-mock-retry-after"),
        ],
        Some(&env_file),
    );
    let url = wrangler.url.as_str();
    let http = agent();
    away_from_day_boundary();
    let started = Instant::now();
    let base = mock_request_count(&http, &mock_url);

    // ---- through the official SDK, one process for every call ----
    let weather_tool = json!([{ "type": "function", "function": { "name": "get_weather",
        "description": "The weather at a place",
        "parameters": { "type": "object", "properties": { "location": { "type": "string" } }, "required": ["location"] } } }]);
    let mut calls = vec![
        call("anthropic-text", "claude-sonnet", "anthropic/messages_nonstream_text.vercel.json", false),
        call("anthropic-stream-tool", "claude-sonnet", "anthropic/stream_text_tool_use.sse", true),
        call("gemini-text", "gemini-flash", "gemini/generate_max_tokens.json", false),
        call("gemini-stream", "gemini-flash", "gemini/stream_sse_text.sse", true),
        call("compat-text", "compat-model", "openai/chat_nonstream_text.vercel.json", false),
        call("compat-stream", "compat-model", "openai/chat_stream_include_usage_cached.sse", true),
        call("upstream-429", "claude-sonnet", "anthropic/error_429_rate_limit.json", false),
        call("unknown-model", "no-such-model", "anthropic/messages_nonstream_text.vercel.json", false),
        call("key-missing", "claude-unkeyed", "anthropic/messages_nonstream_text.vercel.json", false),
        call("cut-stream", "claude-sonnet", CUT_STREAM, true),
    ];
    calls[1]["tools"] = weather_tool;
    calls[1]["include_usage"] = json!(true);
    calls[5]["include_usage"] = json!(true);
    calls[6]["headers"]["x-mock-retry-after"] = json!("17");
    for i in 0..=DAY_LIMIT {
        let mut c =
            call(&format!("limited-{i}"), "claude-sonnet", "anthropic/messages_nonstream_text.vercel.json", false);
        c["headers"]["x-tollgate-user"] = json!("limited");
        calls.push(c);
    }
    let sdk_started = Instant::now();
    let r = sdk(url, &calls);
    eprintln!("SDK calls took {:?}", sdk_started.elapsed());

    // Anthropic, non-stream text.
    let recorded: Value = serde_json::from_str(&fixture("anthropic/messages_nonstream_text.vercel.json")).unwrap();
    let a = &r["anthropic-text"];
    assert_ok(a);
    assert_eq!(a["content"], recorded["content"][0]["text"], "{a}");
    assert_eq!(a["finish_reason"], "stop", "{a}");
    assert_eq!(a["model"], "claude-sonnet", "the client's model name, not the provider's: {a}");
    assert_eq!(a["usage"]["prompt_tokens"], recorded["usage"]["input_tokens"], "{a}");
    assert_eq!(a["usage"]["completion_tokens"], recorded["usage"]["output_tokens"], "{a}");

    // Anthropic stream with a tool call: the SDK's accumulator sees the recorded call.
    let events = sse_payloads("anthropic/stream_text_tool_use.sse");
    let tool = events
        .iter()
        .find(|e| e["type"] == "content_block_start" && e["content_block"]["type"] == "tool_use")
        .map(|e| &e["content_block"])
        .expect("a tool_use block in the recording");
    let arguments: String = events
        .iter()
        .filter(|e| e["delta"]["type"] == "input_json_delta")
        .filter_map(|e| e["delta"]["partial_json"].as_str())
        .collect();
    let text: String = events
        .iter()
        .filter(|e| e["delta"]["type"] == "text_delta")
        .filter_map(|e| e["delta"]["text"].as_str())
        .collect();
    let s = &r["anthropic-stream-tool"];
    assert_ok(s);
    let calls_made = s["tool_calls"].as_array().expect("tool_calls");
    assert_eq!(calls_made.len(), 1, "{s}");
    assert_eq!(calls_made[0]["name"], tool["name"], "{s}");
    assert_eq!(calls_made[0]["id"], tool["id"], "{s}");
    assert_eq!(calls_made[0]["arguments"].as_str(), Some(arguments.as_str()), "{s}");
    assert_eq!(s["content"].as_str(), Some(text.as_str()), "{s}");
    assert_eq!(s["finish_reason"], "tool_calls", "{s}");
    let start = events.iter().find(|e| e["type"] == "message_start").expect("message_start");
    let delta = events.iter().find(|e| e["type"] == "message_delta").expect("message_delta");
    assert_eq!(s["usage"]["prompt_tokens"], start["message"]["usage"]["input_tokens"], "{s}");
    assert_eq!(s["usage"]["completion_tokens"], delta["usage"]["output_tokens"], "{s}");
    assert!(s["chunks"].as_u64().expect("chunks") > 10, "streamed as many chunks: {s}");

    // Gemini, non-stream (stopped by max tokens).
    let recorded: Value = serde_json::from_str(&fixture("gemini/generate_max_tokens.json")).unwrap();
    let g = &r["gemini-text"];
    assert_ok(g);
    assert_eq!(g["content"].as_str(), Some(gemini_text(&recorded).as_str()), "{g}");
    assert_eq!(g["finish_reason"], "length", "{g}");
    assert_eq!(g["usage"]["prompt_tokens"], recorded["usageMetadata"]["promptTokenCount"], "{g}");
    assert_eq!(g["usage"]["completion_tokens"], recorded["usageMetadata"]["candidatesTokenCount"], "{g}");

    // Gemini stream (alt=sse).
    let elements = sse_payloads("gemini/stream_sse_text.sse");
    let text: String = elements.iter().map(gemini_text).collect();
    let gs = &r["gemini-stream"];
    assert_ok(gs);
    assert_eq!(gs["content"].as_str(), Some(text.as_str()), "{gs}");
    assert_eq!(gs["finish_reason"], "stop", "{gs}");
    assert!(gs["chunks"].as_u64().expect("chunks") >= elements.len() as u64, "{gs}");

    // OpenAI-compatible, non-stream and stream (usage chunk asked for).
    let recorded: Value = serde_json::from_str(&fixture("openai/chat_nonstream_text.vercel.json")).unwrap();
    let c = &r["compat-text"];
    assert_ok(c);
    assert_eq!(c["content"], recorded["choices"][0]["message"]["content"], "{c}");
    assert_eq!(c["usage"]["total_tokens"], recorded["usage"]["total_tokens"], "{c}");
    let chunks = sse_payloads("openai/chat_stream_include_usage_cached.sse");
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    let usage = chunks.iter().find_map(|c| c["usage"].as_object()).expect("recorded usage");
    let cs = &r["compat-stream"];
    assert_ok(cs);
    assert_eq!(cs["content"].as_str(), Some(text.as_str()), "{cs}");
    assert_eq!(cs["usage"]["prompt_tokens"], usage["prompt_tokens"], "{cs}");
    assert_eq!(cs["usage"]["completion_tokens"], usage["completion_tokens"], "{cs}");

    // The provider's 429 reaches the SDK as openai.RateLimitError, retry-after kept.
    let recorded: Value = serde_json::from_str(&fixture("anthropic/error_429_rate_limit.json")).unwrap();
    let e = &r["upstream-429"];
    assert_eq!(e["error"], "RateLimitError", "{e}");
    assert_eq!(e["status"], 429, "{e}");
    assert_eq!(e["retry_after"], "17", "{e}");
    let message = recorded["error"]["message"].as_str().expect("recorded message");
    assert!(e["message"].as_str().is_some_and(|m| m.ends_with(message)), "the provider's message kept: {e}");

    // A model the policy does not map: openai.NotFoundError, model_not_found.
    let e = &r["unknown-model"];
    assert_eq!(e["error"], "NotFoundError", "{e}");
    assert_eq!(e["code"], "model_not_found", "{e}");

    // A provider whose secret is not set: 503 provider_key_missing, nothing sent upstream.
    let e = &r["key-missing"];
    assert_eq!(e["error"], "InternalServerError", "{e}");
    assert_eq!(e["status"], 503, "{e}");
    assert_eq!(e["code"], "provider_key_missing", "{e}");

    // A stream the provider cut short ends in an error event, which the SDK raises mid-stream
    // (after the text and tool call it had already received).
    let e = &r["cut-stream"];
    assert_eq!(e["error"], "APIError", "{e}");
    assert_eq!(e["code"], "bad_upstream_response", "{e}");
    assert!(e["message"].as_str().is_some_and(|m| m.contains("message_stop")), "{e}");

    // The request limit applies to translated requests: DAY_LIMIT answered, then Tollgate's own
    // 429 (not the provider's), counting down in x-ratelimit-*.
    for i in 0..DAY_LIMIT {
        let l = &r[&format!("limited-{i}")];
        assert_ok(l);
        assert_eq!(l["headers"]["x-ratelimit-limit-requests"], DAY_LIMIT.to_string(), "{l}");
        assert_eq!(l["headers"]["x-ratelimit-remaining-requests"], (DAY_LIMIT - 1 - i).to_string(), "{l}");
    }
    let denied = &r[&format!("limited-{DAY_LIMIT}")];
    assert_eq!(denied["error"], "RateLimitError", "{denied}");
    assert_eq!(denied["code"], "rate_limit_exceeded", "{denied}");
    assert_eq!(denied["type"], "requests", "Tollgate's own limit, not the provider's: {denied}");

    // What reached the mock: every call but the unknown model, the missing key and the denial.
    let upstream_calls = calls.len() as u64 - 3;
    assert_eq!(mock_request_count(&http, &mock_url), base + upstream_calls);

    // ---- raw HTTP: what the SDK cannot show ----

    // The body is read and checked before anything is counted (core's gate: parse, route,
    // identify, guard, then admit): invalid JSON is OpenAI's 400, even for a user at the limit,
    // nothing sent upstream and nothing counted.
    for user in ["limited", "bad-json"] {
        let r = post_json(&http, &format!("{url}/v1/chat/completions"), &[("x-tollgate-user", user)], "{not json");
        assert_eq!(r.status, 400, "{r:?}");
        assert_eq!(r.json()["error"]["type"], "invalid_request_error", "{r:?}");
    }
    assert_eq!(mock_request_count(&http, &mock_url), base + upstream_calls);
    let usage = tollgate_host_tests::workerd::get_with(&format!("{url}/v1/tollgate/usage"), &[("x-tollgate-user", "bad-json")]);
    assert_eq!(usage.json()["limits"][0]["used"], 0, "{usage:?}");

    // Each provider got its own key header, never the client's authorization or identity, at
    // its own API's path with the upstream model name.
    for (model, stream, fixture, key_header, path, upstream_model) in [
        (
            "claude-sonnet",
            false,
            "anthropic/messages_nonstream_text.vercel.json",
            "x-api-key",
            "/v1/messages",
            json!("claude-sonnet-4-5"),
        ),
        (
            "gemini-flash",
            false,
            "gemini/generate_max_tokens.json",
            "x-goog-api-key",
            "/v1beta/models/gemini-2.5-flash:generateContent",
            Value::Null,
        ),
        (
            "gemini-flash",
            true,
            "gemini/stream_sse_text.sse",
            "x-goog-api-key",
            "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
            Value::Null,
        ),
        (
            "compat-model",
            false,
            "openai/chat_nonstream_text.vercel.json",
            "authorization",
            "/v1/chat/completions",
            json!("gpt-4o"),
        ),
    ] {
        let body =
            json!({ "model": model, "stream": stream, "messages": [{ "role": "user", "content": "Hi" }] }).to_string();
        let auth = format!("Bearer {CLIENT_KEY}");
        let user = format!("headers-{model}-{stream}");
        let headers =
            [("authorization", auth.as_str()), ("x-tollgate-user", user.as_str()), ("x-mock-fixture", fixture)];
        let r = post_json(&agent(), &format!("{url}/v1/chat/completions"), &headers, &body);
        assert_eq!(r.status, 200, "{model}: the mock accepted only the provider's key: {r:?}");
        assert!(!r.body.contains(PROVIDER_KEY), "{model}: the key leaked into the response");
        let content_type = if stream { "text/event-stream" } else { "application/json" };
        assert_eq!(r.header("content-type"), Some(content_type), "{model}: {r:?}");
        let names = last_header_names(&mock_url);
        assert!(names.iter().any(|n| n == key_header), "{model}: no {key_header} in {names:?}");
        for absent in ["x-tollgate-user", "x-api-key", "x-goog-api-key", "authorization"] {
            if absent != key_header {
                assert!(!names.iter().any(|n| n == absent), "{model}: {absent} reached the provider: {names:?}");
            }
        }
        let last = get(&http, &format!("{mock_url}/__mock/last-path")).json();
        assert_eq!(last["path"], path, "{model}: {last}");
        assert_eq!(last["model"], upstream_model, "{model}: {last}");
    }
    eprintln!("requests took {:?}", started.elapsed());

    // Nothing the worker or wrangler logged holds the key (worker console output goes to the
    // wrangler log; wrangler also keeps its own debug log under XDG_CONFIG_HOME).
    drop(wrangler);
    let logs = files_under(&scratch.0.join("xdg"));
    for log in logs.iter().chain([&scratch.0.join("wrangler.log")]) {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        assert!(!text.contains(PROVIDER_KEY), "the provider key appears in {}", log.display());
    }
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}
