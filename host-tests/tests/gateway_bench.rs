//! The gateway benchmark for BENCHMARKS.md (not a pass/fail test: `scripts/bench-gateway.sh`
//! runs it): bare Envoy vs Envoy + Tollgate, side by side in one run, on one pinned core.
//!
//! Both Envoys run examples/envoy/providers.yaml with `--concurrency 1`, pinned to core 0; the
//! client threads and the mock provider share core 1. The floor is the same config — the same
//! listener, routes, early header mutation and credential injectors — without the tollgate
//! filter: its client names the provider cluster itself (`x-tollgate-cluster`, which the floor's
//! header mutation leaves alone), so bare Envoy proxies the same request to the same cluster.
//! Tollgate runs a policy with six active limits (identity: requests per minute and day, total
//! tokens and cost per day, concurrency; the tier: requests per day) and a price table, every
//! request counted and settled. Cases: gpt (OpenAI-compatible pass-through), claude (translated
//! to Anthropic), and both streamed (recorded provider streams replayed by the mock:
//! openai/chat_stream_no_usage.sse, 51 events; anthropic/stream_text_tool_use.sse, 85 events).
//! CPU per request is Envoy's process CPU time (user + system, all threads) over the measured
//! requests; memory is Envoy's VmRSS after them.

use std::time::Instant;

use tollgate_host_tests::bench::{chat_body, cpu_ticks, GATEWAY_POLICY};
use tollgate_host_tests::envoy::{self, providers_on_mocks, Envoy, Rendered};
use tollgate_host_tests::proc::{agent, fixtures_dir, post_json, start_mock_provider_with};

const CONNECTIONS: usize = 16;

struct Case {
    name: &'static str,
    model: &'static str,
    cluster: &'static str,
    stream: Option<(&'static str, u64)>,
}

const CASES: [Case; 4] = [
    Case { name: "gpt", model: "gpt-4o-mini", cluster: "openai", stream: None },
    Case { name: "gpt-s", model: "gpt-4o-mini", cluster: "openai", stream: Some(("openai/chat_stream_no_usage.sse", 51)) },
    Case { name: "claude", model: "claude-sonnet", cluster: "anthropic", stream: None },
    Case { name: "claude-s", model: "claude-sonnet", cluster: "anthropic", stream: Some(("anthropic/stream_text_tool_use.sse", 85)) },
];

/// Pins `pid` (every thread) to `cpu`.
fn pin(pid: u32, cpu: usize) {
    let ok = std::process::Command::new("taskset").args(["-a", "-p", "-c", &cpu.to_string(), &pid.to_string()]).output().is_ok_and(|o| o.status.success());
    assert!(ok, "taskset -a -p -c {cpu} {pid} failed");
}

fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb: f64 = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).unwrap_or(0.0);
    kb / 1024.0
}

/// `total` requests of `case` from CONNECTIONS keep-alive clients: (seconds, Envoy CPU ticks).
fn load(envoy: &Envoy, case: &Case, floor: bool, total: usize) -> (f64, u64) {
    let url = format!("{}/v1/chat/completions", envoy.url);
    let body = chat_body(case.model, case.stream.is_some());
    let mut headers: Vec<(&str, &str)> = vec![("x-tollgate-user", "bench-user")];
    if let Some((fixture, _)) = case.stream {
        headers.push(("x-mock-fixture", fixture));
    }
    if floor {
        headers.push(("x-tollgate-cluster", case.cluster));
    }
    let before = cpu_ticks(envoy.server.pid());
    let started = Instant::now();
    std::thread::scope(|s| {
        for c in 0..CONNECTIONS {
            let (url, body, headers) = (&url, &body, &headers);
            s.spawn(move || {
                let http = agent();
                for _ in (c..total).step_by(CONNECTIONS) {
                    let r = post_json(&http, url, headers, body);
                    assert_eq!(r.status, 200, "{} ({}): {}", case.name, if floor { "floor" } else { "tollgate" }, r.body);
                }
            });
        }
    });
    (started.elapsed().as_secs_f64(), cpu_ticks(envoy.server.pid()) - before)
}

/// The floor: the same config without the tollgate filter — or, with `wasm`, with that Wasm
/// filter in its place (bench/floor-filter) — the client's cluster header kept.
fn floor_of(with: &Rendered, wasm: Option<&str>) -> Rendered {
    let mut yaml = with.yaml.clone();
    match wasm {
        None => {
            let a = yaml.find("          - name: tollgate\n").expect("the tollgate filter");
            let b = yaml.find("          - name: envoy.filters.http.router").expect("the router");
            yaml.replace_range(a..b, "");
        }
        Some(path) => {
            let filter = tollgate_host_tests::proc::filter_wasm_path().display().to_string();
            assert!(yaml.contains(&filter));
            yaml = yaml.replace(&filter, path);
        }
    }
    assert!(yaml.contains("              - remove: x-tollgate-cluster\n"));
    let yaml = yaml.replace("              - remove: x-tollgate-cluster\n", "              - remove: x-bench-unused\n");
    Rendered { yaml }
}

#[test]
#[ignore = "a measurement: scripts/bench-gateway.sh"]
fn measure() {
    let total: usize = std::env::var("GATEWAY_BENCH_REQUESTS").ok().and_then(|v| v.parse().ok()).unwrap_or(4000);
    let rounds: usize = std::env::var("GATEWAY_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    assert!(std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2, "needs two cores");
    pin(std::process::id(), 1);
    let fixtures = fixtures_dir();
    let (mock, mock_url) = start_mock_provider_with(&["--fixtures", fixtures.to_str().unwrap()]);
    pin(mock.pid(), 1);
    let port: u16 = mock_url.rsplit(':').next().unwrap().parse().unwrap();
    let with = providers_on_mocks(port, port, port, Some(GATEWAY_POLICY));
    let floor = floor_of(&with, None);
    let floor_wasm = tollgate_host_tests::proc::workspace_root().join("target/wasm32-unknown-unknown/wasm/tollgate_floor_filter.wasm");
    assert!(floor_wasm.exists(), "{} is missing: scripts/bench-gateway.sh builds it", floor_wasm.display());
    let wasm_floor = floor_of(&with, Some(&floor_wasm.display().to_string()));
    let env = [("ANTHROPIC_API_KEY", "bench-a"), ("GEMINI_API_KEY", "bench-g"), ("OPENAI_API_KEY", "bench-o")];
    let tick_ms = 1000.0 / 100.0; // USER_HZ

    println!("| case | bare Envoy: CPU ms/request | req/s | Envoy + Tollgate: CPU ms/request | req/s | filter CPU µs/request | kept req/s | filter µs/event | Envoy + a Wasm filter that only reads: CPU ms/request | Tollgate's own µs/request |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut rss = Vec::new();
    for (label, config) in [("bare", &floor), ("wasm floor", &wasm_floor), ("tollgate", &with)] {
        let envoy = envoy::start_with_workers(config, &env, 1);
        pin(envoy.server.pid(), 0);
        for case in &CASES {
            load(&envoy, case, label != "tollgate", 400);
        }
        rss.push((label, rss_mb(envoy.server.pid())));
    }
    let mut results: Vec<(String, [f64; 4])> = Vec::new();
    for case in &CASES {
        // Rounds alternate bare and tollgate so that machine noise hits both alike.
        let (mut bare_cpu, mut bare_s, mut gate_cpu, mut gate_s, mut wasm_cpu) = (0u64, 0f64, 0u64, 0f64, 0u64);
        for _ in 0..rounds {
            for (label, config) in [("bare", &floor), ("wasm floor", &wasm_floor), ("tollgate", &with)] {
                let envoy = envoy::start_with_workers(config, &env, 1);
                pin(envoy.server.pid(), 0);
                load(&envoy, case, label != "tollgate", 300);
                let (secs, ticks) = load(&envoy, case, label != "tollgate", total);
                match label {
                    "bare" => {
                        bare_cpu += ticks;
                        bare_s += secs;
                    }
                    "wasm floor" => wasm_cpu += ticks,
                    _ => {
                        gate_cpu += ticks;
                        gate_s += secs;
                    }
                }
            }
        }
        let n = (total * rounds) as f64;
        let bare_ms = bare_cpu as f64 * tick_ms / n;
        let gate_ms = gate_cpu as f64 * tick_ms / n;
        let (bare_rps, gate_rps) = (n / bare_s, n / gate_s);
        let filter_us = (gate_ms - bare_ms) * 1000.0;
        let per_event = case.stream.map_or("".to_owned(), |(_, events)| format!("{:.1}", filter_us / events as f64));
        let wasm_ms = wasm_cpu as f64 * tick_ms / n;
        println!(
            "| {} | {bare_ms:.3} | {bare_rps:.0} | {gate_ms:.3} | {gate_rps:.0} | {filter_us:.0} | {:.0} % | {per_event} | {wasm_ms:.3} | {:.0} |",
            case.name,
            gate_rps * 100.0 / bare_rps,
            (gate_ms - wasm_ms) * 1000.0
        );
        results.push((case.name.to_owned(), [bare_ms, bare_rps, gate_ms, gate_rps]));
    }
    println!();
    for (label, mb) in &rss {
        println!("Envoy VmRSS after warm-up ({label}, one worker): {mb:.1} MB");
    }
    let wasm = tollgate_host_tests::proc::filter_wasm_path();
    println!(
        "filter.wasm: {} bytes; {CONNECTIONS} keep-alive clients; {total} requests × {rounds} rounds per case and Envoy",
        std::fs::metadata(&wasm).map(|m| m.len()).unwrap_or(0)
    );
    assert_eq!(results.len(), CASES.len());
    drop(mock);
}
