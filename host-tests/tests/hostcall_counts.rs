//! How many Proxy-Wasm host calls the release filter makes per request, by name (not a
//! pass/fail test: `cargo test --release -p tollgate-host-tests --test hostcall_counts --
//! --ignored --nocapture`; BENCHMARKS.md). In Envoy every host call crosses from V8 into C++
//! and most copy bytes; these counts say where a request's fixed cost can come from.
//!
//! The wasmtime host (our faithful Proxy-Wasm host) with Envoy's semantics; the policy of
//! `scripts/bench-gateway.sh` (six limits, prices); a warm VM (the first requests are not
//! counted). The upstream answer reaches the filter as one body chunk.

use std::collections::BTreeMap;

use tollgate_host_tests::bench::{chat_body, GATEWAY_POLICY};
use tollgate_host_tests::host::{FilterModule, Host, HttpRequest, SharedStore, UpstreamResponse, Vm};

fn request(model: &str) -> HttpRequest {
    HttpRequest::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .header("x-tollgate-user", "bench-user")
        .header("user-agent", "bench/1.0")
        .header("accept", "application/json")
        .body(chat_body(model, false))
}

fn openai_answer() -> UpstreamResponse {
    UpstreamResponse::new(200).header("content-type", "application/json").body(
        r#"{"id":"c","object":"chat.completion","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":190,"completion_tokens":40,"total_tokens":230}}"#,
    )
}

fn anthropic_answer() -> UpstreamResponse {
    UpstreamResponse::new(200).header("content-type", "application/json").body(
        r#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"text","text":"ok"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":190,"output_tokens":40}}"#,
    )
}

fn print(case: &str, calls: &BTreeMap<String, u64>, requests: u64) {
    let total: u64 = calls.values().sum();
    println!("\n{case}: {:.1} host calls per request", total as f64 / requests as f64);
    let mut by_count: Vec<_> = calls.iter().collect();
    by_count.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    for (name, n) in by_count {
        println!("  {:>6.1}  {name}", *n as f64 / requests as f64);
    }
}

#[test]
#[ignore = "a measurement"]
fn count() {
    let host = Host::new(SharedStore::envoy()).counting_host_calls();
    let mut vm = Vm::load(&host, FilterModule::release_filter(), GATEWAY_POLICY.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
    let requests = 50;
    for (case, model, answer) in [("gpt (pass-through)", "gpt-4o-mini", openai_answer as fn() -> UpstreamResponse), ("claude (translated)", "claude-sonnet", anthropic_answer)] {
        vm.set_upstream(move |_| answer());
        for _ in 0..5 {
            assert_eq!(vm.request(request(model)).unwrap().status, 200);
        }
        vm.take_host_calls();
        for _ in 0..requests {
            let ex = vm.request(request(model)).unwrap();
            assert_eq!(ex.status, 200, "{case}");
        }
        print(case, &vm.take_host_calls(), requests);
    }
}
