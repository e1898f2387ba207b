//! Exact limits across a fleet: three real Envoys (two worker threads each) running
//! examples/envoy/fleet.yaml, two `tollgate store` replicas, one real Redis (Debian's
//! `redis-server`), load from many client threads spread over every Envoy.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tollgate_host_tests::checks::now_ms;
use tollgate_host_tests::envoy::{Envoy, TempDir};
use tollgate_host_tests::fleet::{fleet_config, start_envoys, start_store, Redis, StoreService};
use tollgate_host_tests::proc::{agent, get, mock_request_count, post_json, start_mock_provider, Reply, Server};

/// Everything a fleet test runs against.
struct Fleet {
    envoys: Vec<Envoy>,
    stores: Vec<StoreService>,
    redis: Redis,
    mock_url: String,
    _mock: Server,
    _dir: TempDir,
    /// One fleet at a time: several at once on a small machine make timing, not the code, the
    /// thing tested (a 200 ms store timeout, leases held while requests queue for a CPU).
    _turn: std::sync::MutexGuard<'static, ()>,
}

static ONE_FLEET_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A fleet of `envoys` Envoys and two store replicas, every one on `policy`.
fn fleet(policy: &Value, envoys: usize, extra_yaml: &str) -> Fleet {
    let turn = ONE_FLEET_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = TempDir::new("fleet");
    let redis = Redis::start();
    let text = serde_json::to_string_pretty(policy).unwrap();
    let stores: Vec<StoreService> = (0..2).map(|i| start_store(&redis.url(), &text, &dir, &format!("store-{i}"))).collect();
    let (mock, mock_url) = start_mock_provider();
    let mock_port: u16 = mock_url.rsplit(':').next().unwrap().parse().unwrap();
    let mut rendered = fleet_config(&text, mock_port, &stores.iter().map(|s| s.port).collect::<Vec<_>>());
    rendered.yaml.push_str(&extra_yaml.replace("MOCK_PORT", &mock_port.to_string()));
    let envoys = start_envoys(&rendered, envoys);
    Fleet { envoys, stores, redis, mock_url, _mock: mock, _dir: dir, _turn: turn }
}

fn policy(limits: Value, extra: Value) -> Value {
    let mut p = json!({
        "identity": { "header": "x-tollgate-user" },
        "tier": { "default": "free" },
        "store": { "on_failure": "deny", "lease_ttl_seconds": 3, "redis": { "cluster": "tollgate_store", "timeout_ms": 200 } },
        "tiers": { "free": { "limits": limits } }
    });
    for (k, v) in extra.as_object().unwrap() {
        p[k] = v.clone();
    }
    p
}

fn away_from_day_end() {
    let left = 86_400_000 - now_ms() % 86_400_000;
    if left < 60_000 {
        std::thread::sleep(Duration::from_millis(left + 250));
    }
}

fn chat(envoy: &Envoy, user: &str, extra: &[(&str, &str)]) -> Reply {
    let mut headers = vec![("x-tollgate-user", user)];
    headers.extend_from_slice(extra);
    let body = r#"{"model":"mock-model","messages":[{"role":"user","content":"hi"}],"max_tokens":20}"#;
    post_json(&agent(), &format!("{}/v1/chat/completions", envoy.url), &headers, body)
}

/// `user`'s usage report, through `envoy`.
fn usage(envoy: &Envoy, user: &str) -> Value {
    let r = agent().get(format!("{}/v1/tollgate/usage", envoy.url)).header("x-tollgate-user", user).call().expect("usage");
    serde_json::from_str(&r.into_body().read_to_string().unwrap()).unwrap()
}

fn used(report: &Value, name: &str) -> u64 {
    report["limits"].as_array().unwrap().iter().find(|l| l["name"] == name).unwrap_or_else(|| panic!("{name} in {report}"))["used"].as_u64().unwrap()
}

/// Polls until `probe` gives `want` (settlement is off the request's path).
fn eventually<T: PartialEq + std::fmt::Debug>(timeout: Duration, want: T, mut probe: impl FnMut() -> T) {
    let started = Instant::now();
    loop {
        let got = probe();
        if got == want {
            return;
        }
        assert!(started.elapsed() < timeout, "still {got:?} after {timeout:?}, want {want:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stat_sum(envoys: &[Envoy], name: &str) -> u64 {
    envoys.iter().map(|e| e.stat(&format!("wasmcustom.tollgate_{name}")).unwrap_or(0)).sum()
}

/// 200 requests for one user from 8 threads over 3 Envoys × 2 workers: exactly the limit is
/// admitted (no overshoot, no lost update), and the tokens charged are exactly what the
/// provider reported for the admitted ones.
#[test]
fn request_and_token_limits_are_exact_across_the_fleet() {
    away_from_day_end();
    let f = fleet(&policy(json!([{ "window": "day", "requests": 60 }, { "window": "day", "total_tokens": 1_000_000 }]), json!({})), 3, "");
    let envoys = Arc::new(f.envoys);
    let sent = Arc::new(AtomicU64::new(0));
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let envoys = envoys.clone();
                let sent = sent.clone();
                s.spawn(move || {
                    let mut out = Vec::new();
                    loop {
                        let n = sent.fetch_add(1, Ordering::SeqCst);
                        if n >= 200 {
                            return out;
                        }
                        out.push(chat(&envoys[n as usize % envoys.len()], "fleet-user", &[]).status);
                    }
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!((admitted, refused), (60, 140), "{statuses:?}");
    assert_eq!(mock_request_count(&agent(), &f.mock_url), 60, "only admitted requests reached the provider");
    // Every Envoy sees the same counts; the tokens are the provider's (17 per answer).
    for e in envoys.iter() {
        eventually(Duration::from_secs(5), (60, 60 * 17), || {
            let r = usage(e, "fleet-user");
            (used(&r, "requests/day"), used(&r, "total_tokens/day"))
        });
    }
    assert_eq!(stat_sum(&envoys, "store_failures"), 0);
    assert_eq!(stat_sum(&envoys, "settle_failures"), 0);
    assert!(f.redis.ping());
    drop(f.stores);
}

/// Concurrency is fleet-wide: never more in flight at the provider than the limit, whatever
/// Envoy a request came through; leases come back when requests end, and the lease of an Envoy
/// killed mid-stream comes back after its TTL.
#[test]
fn concurrency_leases_are_fleet_wide_and_come_back() {
    away_from_day_end();
    let f = fleet(&policy(json!([{ "concurrent": 3 }, { "window": "day", "requests": 1000 }]), json!({})), 3, "");
    let envoys = Arc::new(f.envoys);
    // Nine slow requests at once, three per Envoy: three are admitted.
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..9)
            .map(|i| {
                let envoys = envoys.clone();
                s.spawn(move || chat(&envoys[i % 3], "lease-user", &[("x-mock-delay-ms", "1500")]).status)
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 3, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 6, "{statuses:?}");
    // Done: the leases are back (settlement is posted off the request's path).
    eventually(Duration::from_secs(5), 0, || used(&usage(&envoys[1], "lease-user"), "concurrent"));
    assert_eq!(chat(&envoys[2], "lease-user", &[]).status, 200);
    drop(envoys);
    drop(f.stores);
}

/// Settlements are posted from each Envoy's root context on a short tick: steady traffic on
/// the same Envoy must not keep pushing that tick back (Envoy restarts a tick timer each time
/// its period is set), or leases would only come back when the traffic stops.
#[test]
fn leases_come_back_under_steady_traffic() {
    away_from_day_end();
    let f = fleet(&policy(json!([{ "concurrent": 1 }, { "window": "day", "requests": 100_000 }]), json!({})), 1, "");
    let envoy = &f.envoys[0];
    let stop = std::sync::atomic::AtomicBool::new(false);
    let statuses: Vec<u16> = std::thread::scope(|s| {
        // Background: other users, back to back, on the same Envoy.
        for t in 0..2 {
            let stop = &stop;
            s.spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    chat(envoy, &format!("steady-{t}-{i}"), &[]);
                    i += 1;
                }
            });
        }
        std::thread::sleep(Duration::from_millis(200));
        // One user, one request at a time, a pause between them far longer than the tick.
        let mine: Vec<u16> = (0..10)
            .map(|_| {
                let status = chat(envoy, "one-at-a-time", &[]).status;
                std::thread::sleep(Duration::from_millis(150));
                status
            })
            .collect();
        stop.store(true, Ordering::Relaxed);
        mine
    });
    assert_eq!(statuses, vec![200; 10], "each request's lease was back before the next one");
    drop(f.stores);
}

/// An Envoy killed mid-stream never settles: its lease comes back after `lease_ttl_seconds`,
/// and nothing else of it stays held.
#[test]
fn the_lease_of_an_envoy_killed_mid_stream_expires() {
    away_from_day_end();
    let f = fleet(&policy(json!([{ "concurrent": 1 }, { "window": "day", "requests": 1000 }]), json!({})), 2, "");
    let mut envoys = f.envoys;
    let victim = envoys.remove(0);
    let url = victim.url.clone();
    let slow = std::thread::spawn(move || {
        let body = r#"{"model":"mock-model","messages":[{"role":"user","content":"hi"}],"stream":true}"#;
        let _ = post_json(&agent(), &format!("{url}/v1/chat/completions"), &[("x-tollgate-user", "doomed"), ("x-mock-delay-ms", "20000")], body);
    });
    // Its lease is held: the other Envoy refuses the user's second request.
    eventually(Duration::from_secs(5), 1, || used(&usage(&envoys[0], "doomed"), "concurrent"));
    assert_eq!(chat(&envoys[0], "doomed", &[]).status, 429);
    let killed_at = Instant::now();
    // SAFETY: kill(2) on the Envoy's process group (the test started it).
    unsafe { libc::kill(-(victim.server.pid() as i32), libc::SIGKILL) };
    drop(victim);
    let _ = slow.join();
    eventually(Duration::from_secs(10), 200, || chat(&envoys[0], "doomed", &[]).status);
    let waited = killed_at.elapsed();
    assert!(waited <= Duration::from_secs(6), "the lease came back after {waited:?} (TTL 3 s)");
    drop(f.stores);
    drop(f.redis);
}

/// A notify threshold fires once per crossing for the whole fleet.
#[test]
fn notify_fires_once_across_the_fleet() {
    away_from_day_end();
    let webhook = r#"
  - name: webhook
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: webhook
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: MOCK_PORT } } }
"#;
    let mut p = policy(json!([{ "window": "day", "requests": 20, "soft": [{ "at": 50, "action": "notify" }] }]), json!({}));
    p["notify"] = json!({ "cluster": "webhook", "url": "http://127.0.0.1:1/__mock/webhook/fleet" });
    let f = fleet(&p, 3, webhook);
    for i in 0..15 {
        assert_eq!(chat(&f.envoys[i % 3], "notified", &[]).status, 200);
    }
    let hooks = || get(&agent(), &format!("{}/__mock/webhooks", f.mock_url)).json()["hooks"].as_array().map_or(0, Vec::len);
    eventually(Duration::from_secs(5), 1, hooks);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(hooks(), 1, "one event for the crossing, fleet-wide");
    assert_eq!(stat_sum(&f.envoys, "notify_sent"), 1);
}

/// Redis down: `deny` answers a retryable 503 within the store timeout, `allow` lets traffic
/// through uncounted; both recover without a restart when Redis is back, and the counts
/// acknowledged before it went down are still there (AOF).
#[test]
fn redis_down_follows_on_failure_and_counts_survive_a_restart() {
    away_from_day_end();
    for mode in ["deny", "allow"] {
        let mut p = policy(json!([{ "window": "day", "requests": 100 }]), json!({}));
        p["store"]["on_failure"] = json!(mode);
        let mut f = fleet(&p, 2, "");
        for i in 0..4 {
            assert_eq!(chat(&f.envoys[i % 2], "survivor", &[]).status, 200);
        }
        eventually(Duration::from_secs(5), 4, || used(&usage(&f.envoys[0], "survivor"), "requests/day"));
        f.redis.kill();
        let started = Instant::now();
        let r = chat(&f.envoys[1], "survivor", &[]);
        let took = started.elapsed();
        match mode {
            "deny" => {
                assert_eq!(r.status, 503, "{r:?}");
                assert_eq!(r.header("retry-after"), Some("1"));
                assert_eq!(r.json()["error"]["code"], "rate_limiter_unavailable");
            }
            _ => assert_eq!(r.status, 200, "{r:?}"),
        }
        assert!(took < Duration::from_secs(2), "answered after {took:?}");
        assert!(stat_sum(&f.envoys, "store_failures") >= 1);
        f.redis.restart();
        // Counting resumes (a replica's first job after the restart may fail: it finds the old
        // connections gone and retires them all), from the counts acknowledged before the kill.
        // A request the store failed is not counted; the first one it did not fail is.
        eventually(Duration::from_secs(10), true, || {
            let failures = stat_sum(&f.envoys, "store_failures");
            let r = chat(&f.envoys[0], "survivor", &[]);
            r.status == 200 && stat_sum(&f.envoys, "store_failures") == failures
        });
        eventually(Duration::from_secs(5), 5, || used(&usage(&f.envoys[1], "survivor"), "requests/day"));
        assert!(stat_sum(&f.envoys, "store_failures") <= 1 + 2 + 2, "at most a failed job per replica after the restart");
        drop(f.stores);
    }
}
