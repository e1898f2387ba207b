//! Runs one case of the gateway benchmark through the filter in the wasmtime host in a loop,
//! for `perf` to sample (not a pass/fail test: `scripts/profile-filter.sh`, BENCHMARKS.md).
//!
//! The case comes from `FILTER_PROFILE_CASE` (gpt, gpt-s, claude, claude-s), the module from
//! `FILTER_PROFILE_WASM` (default: the release filter), the length from `FILTER_PROFILE_SECS`.
//! The policy and request are the gateway benchmark's (six limits, prices); streamed answers are
//! the same recorded events the mock provider sends in Envoy, one event per body chunk as Envoy
//! delivers them.

use std::time::{Duration, Instant};

use tollgate_host_tests::bench::{chat_body, GATEWAY_POLICY};
use tollgate_host_tests::host::{FilterModule, Host, HttpRequest, SharedStore, UpstreamResponse, Vm};
use tollgate_host_tests::proc::fixtures_dir;

fn answer(case: &str) -> UpstreamResponse {
    let json = |body: &str| UpstreamResponse::new(200).header("content-type", "application/json").body(body);
    let sse = |fixture: &str| {
        let body = std::fs::read(fixtures_dir().join(fixture)).unwrap_or_else(|e| panic!("{fixture}: {e}"));
        // One event per piece, as the mock provider writes them.
        let text = String::from_utf8(body).unwrap();
        let events: Vec<String> = text.split_inclusive("\n\n").map(str::to_owned).collect();
        UpstreamResponse::new(200).header("content-type", "text/event-stream").body_chunks(events)
    };
    match case {
        "gpt" => json(r#"{"id":"c","object":"chat.completion","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":190,"completion_tokens":40,"total_tokens":230}}"#),
        "claude" => json(r#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"text","text":"ok"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":190,"output_tokens":40}}"#),
        "gpt-s" => sse("openai/chat_stream_no_usage.sse"),
        "claude-s" => sse("anthropic/stream_text_tool_use.sse"),
        other => panic!("FILTER_PROFILE_CASE={other}: one of gpt, gpt-s, claude, claude-s"),
    }
}

#[test]
#[ignore = "a measurement: scripts/profile-filter.sh"]
fn profile() {
    let case = std::env::var("FILTER_PROFILE_CASE").unwrap_or_else(|_| "gpt".into());
    let secs: u64 = std::env::var("FILTER_PROFILE_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let module = match std::env::var_os("FILTER_PROFILE_WASM") {
        Some(path) => Box::leak(Box::new(FilterModule::from_file(path.as_ref()).unwrap_or_else(|e| panic!("{e}")))),
        None => FilterModule::release_filter(),
    };
    // FILTER_PROFILE_COUNT=1: count the host calls by name instead (slower; per request).
    let counting = std::env::var("FILTER_PROFILE_COUNT").is_ok_and(|v| v == "1");
    let host = if counting { Host::new(SharedStore::envoy()).counting_host_calls() } else { Host::new(SharedStore::envoy()) };
    let mut vm = Vm::load(&host, module, GATEWAY_POLICY.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
    let model = if case.starts_with("gpt") { "gpt-4o-mini" } else { "claude-sonnet" };
    let stream = case.ends_with("-s");
    let upstream = answer(&case);
    vm.set_upstream(move |_| upstream.clone());
    let request = || {
        HttpRequest::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .header("x-tollgate-user", "bench-user")
            .header("user-agent", "bench/1.0")
            .header("accept", "application/json")
            .body(chat_body(model, stream))
    };
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < Duration::from_secs(secs) {
        let ex = vm.request(request()).unwrap();
        assert_eq!(ex.status, 200, "{case}: {}", ex.body_text());
        n += 1;
    }
    let per = started.elapsed().as_secs_f64() * 1e6 / n as f64;
    println!("{case}: {n} requests, {per:.1} µs per request in the wasmtime host (host included)");
    if counting {
        for (name, calls) in vm.take_host_calls() {
            println!("  {:>8.1}  {name}", calls as f64 / n as f64);
        }
    }
}

/// Writes the case for bench/v8-host/run.mjs (the same filter in Node's V8) into
/// `FILTER_PROFILE_DIR`: filter.wasm (from `FILTER_PROFILE_WASM`), policy.json, request.json,
/// response.json.
#[test]
#[ignore = "a measurement: scripts/profile-filter.sh"]
fn write_v8_case() {
    let case = std::env::var("FILTER_PROFILE_CASE").unwrap_or_else(|_| "gpt".into());
    let dir = std::path::PathBuf::from(std::env::var("FILTER_PROFILE_DIR").expect("FILTER_PROFILE_DIR"));
    std::fs::create_dir_all(&dir).unwrap();
    let wasm = std::env::var_os("FILTER_PROFILE_WASM").map(std::path::PathBuf::from).unwrap_or_else(tollgate_host_tests::proc::filter_wasm_path);
    std::fs::copy(&wasm, dir.join("filter.wasm")).unwrap_or_else(|e| panic!("{}: {e}", wasm.display()));
    std::fs::write(dir.join("policy.json"), GATEWAY_POLICY).unwrap();
    let model = if case.starts_with("gpt") { "gpt-4o-mini" } else { "claude-sonnet" };
    let body = chat_body(model, case.ends_with("-s"));
    let request = serde_json::json!({
        "headers": [
            [":method", "POST"], [":path", "/v1/chat/completions"], [":authority", "gateway"], [":scheme", "http"],
            ["content-type", "application/json"], ["content-length", body.len().to_string()],
            ["x-tollgate-user", "bench-user"], ["user-agent", "bench/1.0"], ["accept", "application/json"]
        ],
        "body": body,
    });
    let answer = answer(&case);
    let mut pieces = Vec::new();
    let mut rest = answer.body.as_slice();
    let lens = if answer.chunk_lens.is_empty() { vec![rest.len()] } else { answer.chunk_lens.clone() };
    for n in lens {
        let (piece, tail) = rest.split_at(n);
        pieces.push(String::from_utf8(piece.to_vec()).unwrap());
        rest = tail;
    }
    let mut headers = vec![[":status".to_owned(), answer.status.to_string()]];
    headers.extend(answer.headers.iter().map(|(k, v)| [k.clone(), String::from_utf8_lossy(v).into_owned()]));
    let response = serde_json::json!({ "headers": headers, "pieces": pieces });
    std::fs::write(dir.join("request.json"), request.to_string()).unwrap();
    std::fs::write(dir.join("response.json"), response.to_string()).unwrap();
}
