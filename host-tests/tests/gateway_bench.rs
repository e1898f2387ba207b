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
    load_with(envoy, case, floor, total, &[])
}

/// [`load`] with `extra` request headers.
fn load_with(envoy: &Envoy, case: &Case, floor: bool, total: usize, extra: &[(&str, &str)]) -> (f64, u64) {
    let url = format!("{}/v1/chat/completions", envoy.url);
    let body = chat_body(case.model, case.stream.is_some());
    let mut headers: Vec<(&str, &str)> = vec![("x-tollgate-user", "bench-user")];
    headers.extend_from_slice(extra);
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
                    assert_eq!(r.status, 200, "{} ({}): {}\n{}", case.name, if floor { "floor" } else { "tollgate" }, r.body, envoy.log());
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
    let mut with = providers_on_mocks(port, port, port, Some(GATEWAY_POLICY));
    // GATEWAY_BENCH_USAGE_LOG=0: without the example's usage access log (what writing the
    // records costs Envoy is the difference; the filter still publishes them).
    if std::env::var("GATEWAY_BENCH_USAGE_LOG").is_ok_and(|v| v == "0") {
        with.yaml = without_usage_log(&with.yaml);
        println!("(without the usage access log)");
    }
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

/// What one response-header host call and one parse-and-write of the request body cost a Wasm
/// filter in Envoy (V8) and the same parse in the wasmtime host (bench/floor-filter's probes), gpt
/// case: `cargo test --release -p tollgate-host-tests --test gateway_bench -- --ignored --nocapture probe`
/// after scripts/bench-gateway.sh has built the floor filter.
#[test]
#[ignore = "a measurement"]
fn probe() {
    let total: usize = std::env::var("GATEWAY_BENCH_REQUESTS").ok().and_then(|v| v.parse().ok()).unwrap_or(4000);
    let rounds: usize = std::env::var("GATEWAY_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    pin(std::process::id(), 1);
    let fixtures = fixtures_dir();
    let (mock, mock_url) = start_mock_provider_with(&["--fixtures", fixtures.to_str().unwrap()]);
    pin(mock.pid(), 1);
    let port: u16 = mock_url.rsplit(':').next().unwrap().parse().unwrap();
    let with = providers_on_mocks(port, port, port, Some(GATEWAY_POLICY));
    let floor_wasm = tollgate_host_tests::proc::workspace_root().join("target/wasm32-unknown-unknown/wasm/tollgate_floor_filter.wasm");
    let wasm_floor = floor_of(&with, Some(&floor_wasm.display().to_string()));
    let env = [("ANTHROPIC_API_KEY", "bench-a"), ("GEMINI_API_KEY", "bench-g"), ("OPENAI_API_KEY", "bench-o")];
    let case = &CASES[0];
    const N: usize = 20;
    let kinds = ["none", "headers", "pairs", "property", "shared", "metric", "body", "time", "parses", "hold", "route"];
    let envoy = envoy::start_with_workers(&wasm_floor, &env, 1);
    pin(envoy.server.pid(), 0);
    // hold and route are one-off shapes, not repeated calls.
    let per = |kind: &str| if matches!(kind, "hold" | "route") { 1 } else { N };
    let headers: Vec<(String, String)> = kinds.iter().map(|k| (format!("x-probe-{k}"), per(k).to_string())).collect();
    let extra = |i: usize| -> Vec<(&str, &str)> {
        if i == 0 { vec![] } else { vec![(headers[i].0.as_str(), headers[i].1.as_str())] }
    };
    for i in 0..kinds.len() {
        load_with(&envoy, case, true, 300, &extra(i));
    }
    let mut ms = vec![0f64; kinds.len()];
    for _ in 0..rounds {
        for (i, m) in ms.iter_mut().enumerate() {
            let (_, ticks) = load_with(&envoy, case, true, total, &extra(i));
            *m += ticks as f64 * 10.0 / (total * rounds) as f64;
        }
    }
    drop(envoy);
    drop(mock);
    println!("Envoy + the floor filter, gpt: {:.1} µs CPU per request; each probe {N} calls per request", ms[0] * 1000.0);
    println!("| host call (Envoy 1.40, V8) | µs per call |");
    println!("|---|---:|");
    for (i, kind) in kinds.iter().enumerate().skip(1) {
        let what = match *kind {
            "parses" => "(guest) parse + write the ~1 KB body".to_owned(),
            "hold" => "hold the answer's headers, set its body, status, content-length (per request)".to_owned(),
            "route" => "set :path, the cluster header, content-length after the body (per request)".to_owned(),
            other => other.to_owned(),
        };
        println!("| {what} | {:.2} |", (ms[i] - ms[0]) * 1000.0 / per(kind) as f64);
    }

    // The same parses in the wasmtime host.
    use tollgate_host_tests::host::{FilterModule, Host, HttpRequest, SharedStore, Vm};
    let module = FilterModule::from_file(&floor_wasm).unwrap_or_else(|e| panic!("{e}"));
    let host = Host::new(SharedStore::envoy());
    let mut vm = Vm::load(&host, &module, b"").unwrap_or_else(|e| panic!("{e}"));
    let body = chat_body(case.model, false);
    let mut time = |parses: &str| {
        let n = 20_000;
        let started = Instant::now();
        for _ in 0..n {
            let r = HttpRequest::post("/v1/chat/completions").header("x-probe-parses", parses).body(&body);
            assert_eq!(vm.request(r).unwrap().status, 200);
        }
        started.elapsed().as_secs_f64() * 1e6 / n as f64
    };
    time("20");
    let (none, twenty) = (time("0"), time("20"));
    println!("(guest) parse + write the ~1 KB body in wasmtime: {:.2} µs", (twenty - none) / 20.0);
}

/// Where Envoy's CPU goes with each filter (bare, the reading-only Wasm floor, Tollgate), per
/// request of one case (`GATEWAY_BENCH_CASE`, default gpt): `perf record` on the Envoy process,
/// samples split by where the code lives — V8's generated code (the guest, and V8's wrappers:
/// anonymous memory, "[unknown]"/JIT), the Envoy binary (Envoy, the host functions, V8's
/// runtime), libc, the kernel. `perf` must be installed:
/// `cargo test --release -p tollgate-host-tests --test gateway_bench -- --ignored --nocapture split`.
#[test]
#[ignore = "a measurement"]
fn split() {
    let total: usize = std::env::var("GATEWAY_BENCH_REQUESTS").ok().and_then(|v| v.parse().ok()).unwrap_or(8000);
    let name = std::env::var("GATEWAY_BENCH_CASE").unwrap_or_else(|_| "gpt".into());
    let case = CASES.iter().find(|c| c.name == name).expect("GATEWAY_BENCH_CASE: gpt, gpt-s, claude or claude-s");
    pin(std::process::id(), 1);
    let fixtures = fixtures_dir();
    let (mock, mock_url) = start_mock_provider_with(&["--fixtures", fixtures.to_str().unwrap()]);
    pin(mock.pid(), 1);
    let port: u16 = mock_url.rsplit(':').next().unwrap().parse().unwrap();
    let with = providers_on_mocks(port, port, port, Some(GATEWAY_POLICY));
    let floor = floor_of(&with, None);
    let floor_wasm = tollgate_host_tests::proc::workspace_root().join("target/wasm32-unknown-unknown/wasm/tollgate_floor_filter.wasm");
    let wasm_floor = floor_of(&with, Some(&floor_wasm.display().to_string()));
    let env = [("ANTHROPIC_API_KEY", "bench-a"), ("GEMINI_API_KEY", "bench-g"), ("OPENAI_API_KEY", "bench-o")];
    let data = std::env::temp_dir().join(format!("tollgate-split-{}.perf", std::process::id()));
    println!("| {} | Envoy CPU µs/request | V8 code (JIT) | Envoy binary | libc | kernel | other |", case.name);
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (label, config) in [("bare", &floor), ("wasm floor", &wasm_floor), ("tollgate", &with)] {
        let envoy = envoy::start_with_workers(config, &env, 1);
        pin(envoy.server.pid(), 0);
        load(&envoy, case, label != "tollgate", 500);
        let mut perf = std::process::Command::new("perf")
            .args(["record", "-q", "-F", "2999", "-o", data.to_str().unwrap(), "-p", &envoy.server.pid().to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("perf");
        std::thread::sleep(std::time::Duration::from_millis(300));
        let (_, ticks) = load(&envoy, case, label != "tollgate", total);
        let _ = std::process::Command::new("kill").args(["-INT", &perf.id().to_string()]).status();
        let _ = perf.wait();
        let report = std::process::Command::new("perf")
            .args(["report", "-q", "-i", data.to_str().unwrap(), "--sort", "dso", "-g", "none", "--stdio"])
            .output()
            .expect("perf report");
        let text = String::from_utf8_lossy(&report.stdout);
        let us = ticks as f64 * 10_000.0 / total as f64;
        let (mut jit, mut envoy_bin, mut libc, mut kernel, mut other) = (0.0, 0.0, 0.0, 0.0, 0.0);
        for line in text.lines() {
            let mut parts = line.split_whitespace();
            let Some(pct) = parts.next().and_then(|p| p.trim_end_matches('%').parse::<f64>().ok()) else { continue };
            let dso = parts.collect::<Vec<_>>().join(" ");
            match dso.as_str() {
                d if d.contains("unknown") || d.contains("JIT") || d.starts_with("perf-") || d.contains("anon") => jit += pct,
                "envoy" => envoy_bin += pct,
                d if d.starts_with("libc") || d.starts_with("libm") || d.starts_with("libpthread") => libc += pct,
                d if d.contains("kernel") || d.contains("vdso") => kernel += pct,
                _ => other += pct,
            }
        }
        let part = |pct: f64| format!("{:.0} µs ({pct:.0} %)", us * pct / 100.0);
        println!("| {label} | {us:.0} | {} | {} | {} | {} | {} |", part(jit), part(envoy_bin), part(libc), part(kernel), part(other));
    }
    let _ = std::fs::remove_file(&data);
    drop(mock);
}

/// Envoy's memory with Tollgate (one worker VM) over many requests and after request bodies
/// near Envoy's 1 MiB buffer limit; and the guest's linear memory (its high-water mark, which
/// a Wasm VM never gives back) in the wasmtime host after the same bodies:
/// `GATEWAY_BENCH_REQUESTS=1000000 cargo test --release -p tollgate-host-tests --test gateway_bench -- --ignored --nocapture memory`.
#[test]
#[ignore = "a measurement"]
fn memory() {
    let total: usize = std::env::var("GATEWAY_BENCH_REQUESTS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    pin(std::process::id(), 1);
    let fixtures = fixtures_dir();
    let (mock, mock_url) = start_mock_provider_with(&["--fixtures", fixtures.to_str().unwrap()]);
    pin(mock.pid(), 1);
    let port: u16 = mock_url.rsplit(':').next().unwrap().parse().unwrap();
    let with = providers_on_mocks(port, port, port, Some(GATEWAY_POLICY));
    let env = [("ANTHROPIC_API_KEY", "bench-a"), ("GEMINI_API_KEY", "bench-g"), ("OPENAI_API_KEY", "bench-o")];
    // What each further worker (each with its own VM) adds: Envoy with 1 and with 4 workers,
    // bare and with Tollgate, every worker warmed (16 connections spread over the workers).
    let mut per_worker = Vec::new();
    for (label, config, floor) in [("bare", floor_of(&with, None), true), ("tollgate", with.clone(), false)] {
        let mut mb = [0f64; 2];
        for (i, workers) in [1u32, 4].into_iter().enumerate() {
            let e = envoy::start_with_workers(&config, &env, workers);
            for case in &CASES {
                load(&e, case, floor, 2000);
            }
            mb[i] = rss_mb(e.server.pid());
            let stats = agent().get(&format!("{}/stats?filter=wasm", e.admin)).call().ok().and_then(|mut r| r.body_mut().read_to_string().ok()).unwrap_or_default();
            let vms: Vec<&str> = stats.lines().filter(|l| l.contains("runtime.v8")).collect();
            println!("{label}, {workers} workers: {}", vms.join(", "));
        }
        per_worker.push((label, mb));
    }
    let (b, t) = (per_worker[0].1, per_worker[1].1);
    println!("| Envoy VmRSS after warm-up | 1 worker | 4 workers | each further worker |");
    println!("|---|---:|---:|---:|");
    println!("| bare | {:.1} MB | {:.1} MB | {:.1} MB |", b[0], b[1], (b[1] - b[0]) / 3.0);
    println!("| + Tollgate | {:.1} MB | {:.1} MB | {:.1} MB |", t[0], t[1], (t[1] - t[0]) / 3.0);
    println!("Tollgate's memory per worker VM: {:.1} MB (Envoy + Tollgate minus bare Envoy, per further worker)\n", ((t[1] - t[0]) - (b[1] - b[0])) / 3.0);

    let envoy = envoy::start_with_workers(&with, &env, 1);
    pin(envoy.server.pid(), 0);
    let bare_envoy = envoy::start_with_workers(&floor_of(&with, None), &env, 1);
    for case in &CASES {
        load(&bare_envoy, case, true, 2000);
        load(&envoy, case, false, 2000);
    }
    let bare = rss_mb(bare_envoy.server.pid());
    drop(bare_envoy);
    println!("| after | Envoy + Tollgate VmRSS (one worker) | above bare Envoy ({bare:.1} MB) |");
    println!("|---|---:|---:|");
    let row = |what: &str| {
        let mb = rss_mb(envoy.server.pid());
        println!("| {what} | {mb:.1} MB | {:.1} MB |", mb - bare);
    };
    row("warm-up (2000 requests of each case)");
    let step = total / 4;
    for i in 1..=4 {
        for case in &CASES {
            load(&envoy, case, false, step / CASES.len());
        }
        row(&format!("{} more requests", i * step));
    }
    // Bodies just under the listener's 1 MiB buffer limit.
    let big = big_body(1_000_000);
    let url = format!("{}/v1/chat/completions", envoy.url);
    let http = agent();
    for _ in 0..20 {
        let r = post_json(&http, &url, &[("x-tollgate-user", "bench-user")], &big);
        assert_eq!(r.status, 200, "{}", r.body);
    }
    row(&format!("20 requests of {} KB", big.len() / 1000));
    for case in &CASES {
        load(&envoy, case, false, 2000);
    }
    row("8000 ordinary requests after them");
    drop(envoy);
    drop(mock);

    use tollgate_host_tests::host::{FilterModule, Host, HttpRequest, SharedStore, UpstreamResponse, Vm};
    let host = Host::new(SharedStore::envoy());
    let mut vm = Vm::load(&host, FilterModule::release_filter(), GATEWAY_POLICY.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
    vm.set_upstream(|_| {
        UpstreamResponse::new(200).header("content-type", "application/json").body(
            r#"{"id":"c","object":"chat.completion","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":190,"completion_tokens":40,"total_tokens":230}}"#,
        )
    });
    let request = |body: &str| {
        HttpRequest::post("/v1/chat/completions").header("content-type", "application/json").header("x-tollgate-user", "u").body(body)
    };
    let small = chat_body("gpt-4o-mini", false);
    for _ in 0..100 {
        assert_eq!(vm.request(request(&small)).unwrap().status, 200);
    }
    let before = vm.memory_bytes();
    assert_eq!(vm.request(request(&big)).unwrap().status, 200);
    let after = vm.memory_bytes();
    println!(
        "\nwasmtime host, the guest's linear memory: {:.2} MB after 100 ordinary requests, {:.2} MB after one {} KB body ({:.1} × the body)",
        before as f64 / 1e6,
        after as f64 / 1e6,
        big.len() / 1000,
        (after - before) as f64 / big.len() as f64
    );
}

/// A chat body of about `bytes` bytes (one long user message).
fn big_body(bytes: usize) -> String {
    let words = "Summarise the following notes for a busy reader in three short bullet points. ";
    let text = words.repeat(bytes / words.len());
    serde_json::json!({ "model": "gpt-4o-mini", "max_tokens": 256, "messages": [{ "role": "user", "content": text }] }).to_string()
}

/// The worker in workerd (`wrangler dev`, the built worker) vs the mock provider called
/// directly: latency added per request (P50, P99; one client, one request at a time) and the
/// workerd process's CPU per request, each case of the Envoy benchmark with the same policy
/// (its providers pointed at the mock). `scripts/bench-gateway.sh` runs it after the Envoy
/// measurement when the worker is built.
#[test]
#[ignore = "a measurement: scripts/bench-gateway.sh"]
fn worker() {
    use tollgate_host_tests::workerd::{start_wrangler, Scratch};
    let total: usize = std::env::var("GATEWAY_BENCH_WORKER_REQUESTS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let fixtures = fixtures_dir();
    let (mock, mock_url) = start_mock_provider_with(&["--fixtures", fixtures.to_str().unwrap()]);
    let mut policy: serde_json::Value = serde_json::from_str(GATEWAY_POLICY).unwrap();
    for (name, provider) in policy["providers"].as_object_mut().unwrap() {
        provider["base_url"] = serde_json::Value::from(mock_url.as_str());
        provider["api_key"] = serde_json::json!({ "secret": format!("BENCH_{}_KEY", name.to_uppercase()) });
    }
    let scratch = Scratch::new("worker-bench");
    let env_file = scratch.0.join("secrets.env");
    std::fs::write(&env_file, "BENCH_ANTHROPIC_KEY=bench-a\nBENCH_OPENAI_KEY=bench-o\n").unwrap();
    let policy = policy.to_string();
    let wrangler = start_wrangler(
        &scratch.0,
        &[("UPSTREAM_URL", &mock_url), ("TOLLGATE_POLICY", &policy), ("PROVIDER_PASS_HEADERS", "x-mock-fixture")],
        Some(&env_file),
    );
    let workerd = descendants(wrangler.server.pid()).into_iter().find(|&p| {
        std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "workerd")
    });
    let http = agent();
    // Milliseconds each of `n` calls of `call` took, sorted.
    let sorted_ms = |n: usize, call: &dyn Fn()| -> Vec<f64> {
        let mut ms: Vec<f64> = (0..n)
            .map(|_| {
                let t = Instant::now();
                call();
                t.elapsed().as_secs_f64() * 1000.0
            })
            .collect();
        ms.sort_by(|a, b| a.total_cmp(b));
        ms
    };
    let pct = |v: &[f64], p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)];
    // One row: warm both paths, time `total` calls of each, workerd's CPU over the worker's.
    let row = |label: &str, direct: &dyn Fn(), through: &dyn Fn()| {
        sorted_ms(50, direct);
        sorted_ms(100, through);
        let direct = sorted_ms(total, direct);
        let before = workerd.map(cpu_ticks).unwrap_or(0);
        let through = sorted_ms(total, through);
        let cpu = workerd.map(|p| (cpu_ticks(p) - before) as f64 * 10.0 / total as f64);
        println!(
            "| {label} | {:.2} / {:.2} | {:.2} / {:.2} | {:+.2} ms | {} |",
            pct(&direct, 0.5),
            pct(&direct, 0.99),
            pct(&through, 0.5),
            pct(&through, 0.99),
            pct(&through, 0.5) - pct(&direct, 0.5),
            cpu.map_or("?".to_owned(), |c| format!("{c:.2}"))
        );
    };
    println!("| case | direct to the mock: P50 / P99 ms | through the worker (workerd): P50 / P99 ms | added P50 | workerd CPU ms/request |");
    println!("|---|---:|---:|---:|---:|");
    // What the worker costs with no counter touched: the model list (no Durable Object, no
    // upstream), against the mock's own answer for the same path.
    let models = |base: &str| {
        let url = format!("{base}/v1/models");
        move || {
            tollgate_host_tests::workerd::get_with(&url, &[("x-tollgate-user", "bench-user")]);
        }
    };
    row("GET /v1/models (no counter, no upstream)", &models(&mock_url), &models(&wrangler.url));
    for case in &CASES {
        let body = chat_body(case.model, case.stream.is_some());
        let mut headers: Vec<(&str, &str)> = vec![("x-tollgate-user", "bench-user")];
        if let Some((fixture, _)) = case.stream {
            headers.push(("x-mock-fixture", fixture));
        }
        let chat = |base: &str| {
            let url = format!("{base}/v1/chat/completions");
            let (http, headers, body) = (&http, &headers, &body);
            move || {
                let r = post_json(http, &url, headers, body);
                assert_eq!(r.status, 200, "{} via {url}: {}", case.name, r.body);
            }
        };
        row(case.name, &chat(&mock_url), &chat(&wrangler.url));
    }
    println!("{total} sequential requests per case and path, one keep-alive client; workerd pid {workerd:?}");
    drop(wrangler);
    drop(mock);
}

/// Every process below `pid` (from /proc's parent links).
fn descendants(pid: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let p: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            let ppid = stat.rsplit(')').next()?.split_whitespace().nth(1)?.parse().ok()?;
            Some((p, ppid))
        })
        .collect();
    let mut out = vec![];
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        for &(child, parent) in &parents {
            if parent == p {
                out.push(child);
                frontier.push(child);
            }
        }
    }
    out
}

/// `yaml` without its `access_log:` block (the lines indented under it).
fn without_usage_log(yaml: &str) -> String {
    let mut out = String::new();
    let mut indent = None;
    for line in yaml.lines() {
        let depth = line.len() - line.trim_start().len();
        match indent {
            Some(d) if depth > d || line.trim_start().starts_with("- ") && depth == d => continue,
            _ => indent = None,
        }
        if line.trim() == "access_log:" {
            indent = Some(depth);
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    assert!(!out.contains("tollgate-usage"), "the usage log is still there");
    out
}
