//! Measurements for BENCHMARKS.md (not a pass/fail test: `scripts/bench-fleet.sh` runs it):
//! what `store.redis` adds per admitted request next to Envoy's shared data, with one Envoy and
//! with three; a fleet's throughput on one hot key and its compare-and-set conflict rate; the
//! store service's CPU per job; Redis memory per live identity.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tollgate_host_tests::bench::cpu_ticks;
use tollgate_host_tests::envoy::{self, render, Envoy, TempDir};
use tollgate_host_tests::fleet::{fleet_config, start_envoys, start_store, Redis, StoreService};
use tollgate_host_tests::proc::{agent, get, post_json, start_mock_provider};

const BODY: &str = r#"{"model":"mock-model","messages":[{"role":"user","content":"hi"}],"max_tokens":5}"#;

fn policy(remote: bool, limits: Value) -> Value {
    let mut p = json!({
        "identity": { "header": "x-tollgate-user" },
        "tier": { "default": "free" },
        "store": { "on_failure": "deny" },
        "tiers": { "free": { "limits": limits } }
    });
    if remote {
        p["store"]["redis"] = json!({ "cluster": "tollgate_store", "timeout_ms": 200 });
    }
    p
}

/// Client-observed latencies (µs) of `per_thread` requests from each of `threads` threads, the
/// requests spread over `envoys`; each thread has its own users (`users` of them, in turn).
fn run(envoys: &[Envoy], threads: usize, per_thread: usize, users: usize, tag: &str) -> (Vec<u64>, Duration, u64) {
    let refused = AtomicU64::new(0);
    let started = Instant::now();
    let mut all: Vec<u64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let refused = &refused;
                s.spawn(move || {
                    let http = agent();
                    let mut out = Vec::with_capacity(per_thread);
                    for i in 0..per_thread {
                        let envoy = &envoys[(t + i) % envoys.len()];
                        let user = format!("{tag}-{t}-{}", i % users);
                        let begun = Instant::now();
                        let r = post_json(&http, &format!("{}/v1/chat/completions", envoy.url), &[("x-tollgate-user", user.as_str())], BODY);
                        out.push(begun.elapsed().as_micros() as u64);
                        if r.status != 200 {
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    out
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let took = started.elapsed();
    all.sort_unstable();
    (all, took, refused.load(Ordering::Relaxed))
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize] as f64 / 1000.0
}

fn stats(store: &StoreService) -> Value {
    get(&agent(), &format!("http://127.0.0.1:{}/stats", store.port)).json()
}

#[test]
#[ignore = "a measurement: scripts/bench-fleet.sh"]
fn measure() {
    let requests: usize = std::env::var("FLEET_BENCH_REQUESTS").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    let threads = 4;
    let per_thread = requests / threads;
    let limits = json!([{ "window": "day", "requests": 1_000_000 }]);
    let (_mock, mock_url) = start_mock_provider();
    let mock_port: u16 = mock_url.rsplit(':').next().unwrap().parse().unwrap();
    println!("| setup | requests | p50 ms | p99 ms | requests/s |");
    println!("|---|---:|---:|---:|---:|");
    let row = |name: &str, (lat, took, refused): (Vec<u64>, Duration, u64)| {
        assert_eq!(refused, 0, "{name}: requests were refused");
        println!("| {name} | {} | {:.2} | {:.2} | {:.0} |", lat.len(), pct(&lat, 0.5), pct(&lat, 0.99), lat.len() as f64 / took.as_secs_f64());
    };

    // One Envoy on its own shared data.
    let text = serde_json::to_string_pretty(&policy(false, limits.clone())).unwrap();
    let local = envoy::start(&render("envoy.yaml", Some(mock_port), Some(&text)), &[]);
    run(std::slice::from_ref(&local), threads, 50, 1, "warm-local");
    row("1 Envoy, shared data", run(std::slice::from_ref(&local), threads, per_thread, 50, "local"));
    drop(local);

    // The fleet store: one Envoy, then three; two store replicas; one Redis.
    let dir = TempDir::new("fleet-bench");
    let redis = Redis::start();
    let text = serde_json::to_string_pretty(&policy(true, limits.clone())).unwrap();
    let stores: Vec<StoreService> = (0..2).map(|i| start_store(&redis.url(), &text, &dir, &format!("store-{i}"))).collect();
    let rendered = fleet_config(&text, mock_port, &stores.iter().map(|s| s.port).collect::<Vec<_>>());
    let envoys = start_envoys(&rendered, 3);
    run(&envoys[..1], threads, 50, 1, "warm-one");
    row("1 Envoy, store.redis", run(&envoys[..1], threads, per_thread, 50, "one"));
    std::thread::sleep(Duration::from_millis(300));
    let cpu_before: u64 = stores.iter().map(|s| cpu_ticks(s.server.pid())).sum();
    let jobs_before: u64 = stores.iter().map(|s| stats(s)["jobs"].as_u64().unwrap_or(0)).sum();
    row("3 Envoys, store.redis", run(&envoys, threads, per_thread, 50, "three"));
    std::thread::sleep(Duration::from_millis(300)); // the last settlements
    let cpu_after: u64 = stores.iter().map(|s| cpu_ticks(s.server.pid())).sum();
    let jobs_after: u64 = stores.iter().map(|s| stats(s)["jobs"].as_u64().unwrap_or(0)).sum();
    let ticks_per_s = 100.0; // USER_HZ on Linux
    let jobs = jobs_after - jobs_before;
    println!();
    println!(
        "store service CPU (both replicas, user + system): {:.1} µs per admitted request, {:.1} µs per job ({} jobs for {} requests: admissions and settlements)",
        (cpu_after - cpu_before) as f64 / ticks_per_s * 1e6 / (threads * per_thread) as f64,
        (cpu_after - cpu_before) as f64 / ticks_per_s * 1e6 / jobs.max(1) as f64,
        jobs,
        threads * per_thread
    );
    drop(envoys);
    drop(stores);

    // A policy whose settlement frees room (tokens, a lease): settled before the answer's last
    // bytes leave, one more store round trip at the end of each answer.
    let freeing = json!([{ "window": "day", "requests": 1_000_000 }, { "window": "day", "total_tokens": 1_000_000_000 }, { "concurrent": 8 }]);
    let text = serde_json::to_string_pretty(&policy(true, freeing)).unwrap();
    let stores: Vec<StoreService> = (0..2).map(|i| start_store(&redis.url(), &text, &dir, &format!("freeing-{i}"))).collect();
    let rendered = fleet_config(&text, mock_port, &stores.iter().map(|s| s.port).collect::<Vec<_>>());
    let envoys = start_envoys(&rendered, 3);
    run(&envoys[..1], threads, 50, 1, "warm-freeing");
    println!();
    println!("| setup (requests/day + total_tokens/day + concurrent) | requests | p50 ms | p99 ms | requests/s |");
    println!("|---|---:|---:|---:|---:|");
    row("1 Envoy, store.redis, settled before the end", run(&envoys[..1], threads, per_thread, 50, "freeing-one"));
    row("3 Envoys, store.redis, settled before the end", run(&envoys, threads, per_thread, 50, "freeing-three"));
    drop(envoys);
    drop(stores);

    // One hot key: a tier aggregate every request touches, 16 client threads over 3 Envoys,
    // next to the same load on per-user keys only (what the machine does without a hot key).
    let hot = json!([{ "per": "tier", "window": "day", "requests": 100_000_000 }, { "window": "day", "requests": 1_000_000 }]);
    let cold = json!([{ "window": "day", "requests": 1_000_000 }]);
    for (name, limits) in [("per-user keys only", cold), ("a hot tier key", hot)] {
        let text = serde_json::to_string_pretty(&policy(true, limits)).unwrap();
        let stores: Vec<StoreService> = (0..2).map(|i| start_store(&redis.url(), &text, &dir, &format!("hot-{i}"))).collect();
        let rendered = fleet_config(&text, mock_port, &stores.iter().map(|s| s.port).collect::<Vec<_>>());
        let envoys = start_envoys(&rendered, 3);
        run(&envoys, 4, 20, 1, "warm-hot");
        let before: Vec<Value> = stores.iter().map(stats).collect();
        let (lat, took, refused) = run(&envoys, 16, requests / 16, 20, &format!("hot-{}", name.len()));
        let after: Vec<Value> = stores.iter().map(stats).collect();
        let delta = |k: &str| after.iter().zip(&before).map(|(a, b)| a[k].as_u64().unwrap_or(0) - b[k].as_u64().unwrap_or(0)).sum::<u64>();
        let n = lat.len() as f64;
        println!();
        println!(
            "3 Envoys, 16 client threads, {name}: {} admissions in {:.1} s = {:.0}/s, p50 {:.2} ms, p99 {:.2} ms; {} refused; per admission: {:.2} Redis reads, {:.2} writes of which {:.2} conflicts ({:.1} % of writes); failed jobs {}",
            lat.len(),
            took.as_secs_f64(),
            n / took.as_secs_f64(),
            pct(&lat, 0.5),
            pct(&lat, 0.99),
            refused,
            delta("reads") as f64 / n,
            delta("writes") as f64 / n,
            delta("conflicts") as f64 / n,
            delta("conflicts") as f64 * 100.0 / delta("writes").max(1) as f64,
            delta("failed")
        );
        drop(envoys);
        drop(stores);
    }

    // Redis memory per live identity: 5000 identities, one request each, in a Redis of their
    // own; what their keys take (MEMORY USAGE of every key, `redis-cli --memkeys`).
    drop(redis);
    let redis = Redis::start();
    let text = serde_json::to_string_pretty(&policy(true, json!([{ "window": "day", "requests": 100 }, { "window": "day", "total_tokens": 100_000 }, { "concurrent": 4 }]))).unwrap();
    let stores: Vec<StoreService> = (0..2).map(|i| start_store(&redis.url(), &text, &dir, &format!("mem-{i}"))).collect();
    let rendered = fleet_config(&text, mock_port, &stores.iter().map(|s| s.port).collect::<Vec<_>>());
    let envoys = start_envoys(&rendered, 1);
    let n = 5000;
    let (_, _, refused) = run(&envoys, 8, n / 8, n / 8, "mem");
    assert_eq!(refused, 0, "memory: requests were refused");
    std::thread::sleep(Duration::from_millis(500));
    let memkeys = redis.cli(&["--memkeys"]).unwrap_or_default();
    let line = memkeys.lines().find(|l| l.contains(" strings with ")).unwrap_or_default().to_owned();
    let mut words = line.split_whitespace();
    let keys: f64 = words.next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let bytes: f64 = words.nth(2).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    assert!(keys > 0.0 && bytes > 0.0, "redis-cli --memkeys said: {memkeys}");
    println!();
    println!(
        "Redis memory per live identity (3 limits: requests/day, total_tokens/day, concurrent): {:.0} bytes ({n} identities in {keys} keys (store.slots), {bytes} bytes of keys and values)",
        bytes / n as f64
    );
}
