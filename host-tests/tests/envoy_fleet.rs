//! Exact limits across a fleet: three real Envoys (two worker threads each) running
//! examples/envoy/fleet.yaml, two `tollgate store` replicas, one real Redis (Debian's
//! `redis-server`), load from many client threads spread over every Envoy.

use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tollgate_host_tests::checks::now_ms;
use tollgate_host_tests::envoy::{Envoy, TempDir};
use tollgate_host_tests::fleet::{fleet_config, start_cluster_store, start_envoys, start_store, start_store_with_env, with_vm_env, Redis, RedisCluster, StoreService};
use tollgate_host_tests::workerd;
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
    // Nine slow streams at once (each over a second at the provider), three per Envoy: three
    // are admitted.
    let stream = r#"{"model":"mock-model","messages":[{"role":"user","content":"hi"}],"stream":true}"#;
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..9)
            .map(|i| {
                let envoys = envoys.clone();
                s.spawn(move || {
                    let url = format!("{}/v1/chat/completions", envoys[i % 3].url);
                    post_json(&agent(), &url, &[("x-tollgate-user", "lease-user"), ("x-mock-delay-ms", "600")], stream).status
                })
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
                let http = agent();
                let body = r#"{"model":"mock-model","messages":[{"role":"user","content":"hi"}],"max_tokens":20}"#;
                while !stop.load(Ordering::Relaxed) {
                    let user = format!("steady-{t}-{i}");
                    let sent = http.post(format!("{}/v1/chat/completions", envoy.url)).header("x-tollgate-user", &user).header("content-type", "application/json").send(body);
                    if let Err(e) = sent {
                        panic!("background request {i}: {e}; envoy running: {}\n{}", envoy.server.pid(), envoy.server.log_tail());
                    }
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

/// A client sending one request at a time, each the moment the previous one ended, with a
/// concurrency limit of 1: the filter settles before the answer's last bytes leave, so the
/// lease is back before the client can ask again, whichever Envoy it asks.
#[test]
fn one_request_at_a_time_finds_its_lease_back_on_any_envoy() {
    away_from_day_end();
    let f = fleet(&policy(json!([{ "concurrent": 1 }, { "window": "day", "requests": 1000 }]), json!({})), 3, "");
    let stream = r#"{"model":"mock-model","messages":[{"role":"user","content":"hi"}],"stream":true}"#;
    let statuses: Vec<u16> = (0..30)
        .map(|i| {
            let envoy = &f.envoys[i % 3];
            if i % 2 == 0 {
                chat(envoy, "back-to-back", &[]).status
            } else {
                post_json(&agent(), &format!("{}/v1/chat/completions", envoy.url), &[("x-tollgate-user", "back-to-back")], stream).status
            }
        })
        .collect();
    assert_eq!(statuses, vec![200; 30]);
    assert_eq!(stat_sum(&f.envoys, "settle_failures"), 0);
}

/// Opens a stream through `envoy` and reads it up to its first event (the request is admitted
/// and holds its lease).
fn open_stream(envoy: &Envoy, user: &str, extra: &[(&str, &str)]) -> TcpStream {
    let body = r#"{"model":"mock-model","messages":[{"role":"user","content":"hi"}],"stream":true}"#;
    let mut headers = vec![("x-tollgate-user", user)];
    headers.extend_from_slice(extra);
    let (conn, head) = workerd::open_stream(&envoy.url, &headers, body);
    assert!(head.starts_with("HTTP/1.1 200") && head.contains("data:"), "stream refused: {head}");
    conn
}

/// Cost is charged as the provider reported it, whichever Envoy served; leases held through
/// different Envoys come back when clients cancel and when the upstream resets mid-stream.
#[test]
fn cost_is_exact_and_leases_come_back_after_cancels_and_resets() {
    away_from_day_end();
    let limits = json!([{ "concurrent": 2 }, { "window": "day", "cost_usd": 1_000_000 }, { "window": "day", "total_tokens": 1_000_000 }]);
    let f = fleet(&policy(limits, json!({ "prices": { "mock-model": { "input": 1, "output": 2 } } })), 3, "");
    // Twelve answers reporting i prompt and 2i completion tokens: 3i tokens, 5i micro-dollars.
    for i in 1..=12u64 {
        let usage = format!("{i},{}", 2 * i);
        assert_eq!(chat(&f.envoys[i as usize % 3], "payer", &[("x-mock-usage", usage.as_str())]).status, 200);
    }
    let total: u64 = (1..=12).sum();
    for e in &f.envoys {
        eventually(Duration::from_secs(5), (5 * total, 3 * total), || {
            let r = usage(e, "payer");
            (used(&r, "cost_usd/day"), used(&r, "total_tokens/day"))
        });
    }

    // Two slow streams through two Envoys hold both leases; the third Envoy refuses a third.
    let slow = [("x-mock-delay-ms", "1000")];
    let streams = vec![open_stream(&f.envoys[0], "streamer", &slow), open_stream(&f.envoys[1], "streamer", &slow)];
    assert_eq!(used(&usage(&f.envoys[2], "streamer"), "concurrent"), 2);
    let served = mock_request_count(&agent(), &f.mock_url);
    assert_eq!(chat(&f.envoys[2], "streamer", &[]).status, 429);
    assert_eq!(mock_request_count(&agent(), &f.mock_url), served, "the refused request never reached the provider");
    // The clients go away mid-stream: both leases come back.
    for conn in streams {
        conn.shutdown(std::net::Shutdown::Both).unwrap();
    }
    eventually(Duration::from_secs(5), 0, || used(&usage(&f.envoys[2], "streamer"), "concurrent"));
    // The upstream resets a stream mid-way (after three events): its lease comes back too.
    let conn = open_stream(&f.envoys[2], "streamer", &[("x-mock-delay-ms", "300"), ("x-mock-reset-after", "3")]);
    assert_eq!(used(&usage(&f.envoys[0], "streamer"), "concurrent"), 1);
    workerd::read_rest(conn);
    eventually(Duration::from_secs(5), 0, || used(&usage(&f.envoys[1], "streamer"), "concurrent"));
    assert_eq!(chat(&f.envoys[0], "streamer", &[]).status, 200);
    assert_eq!(stat_sum(&f.envoys, "settle_failures"), 0);
    assert_eq!(stat_sum(&f.envoys, "store_failures"), 0);
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

/// On a Redis Cluster (three primaries): the service routes every command by its one key, so
/// identities' keys and the tier aggregate land on different nodes, and every limit is still
/// exact.
#[test]
fn a_redis_cluster_counts_exactly_with_keys_on_every_node() {
    away_from_day_end();
    let _turn = ONE_FLEET_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let cluster = RedisCluster::start();
    let dir = TempDir::new("fleet-cluster");
    let p = policy(json!([{ "window": "day", "requests": 3 }, { "per": "tier", "window": "day", "total_tokens": 1_000_000 }]), json!({ "store": { "on_failure": "deny", "slots": 0, "redis": { "cluster": "tollgate_store", "timeout_ms": 500 } } }));
    let text = serde_json::to_string_pretty(&p).unwrap();
    let stores: Vec<StoreService> = (0..2).map(|i| start_cluster_store(&cluster, &text, &dir, &format!("cluster-store-{i}"))).collect();
    let (_mock, mock_url) = start_mock_provider();
    let mock_port: u16 = mock_url.rsplit(':').next().unwrap().parse().unwrap();
    let rendered = fleet_config(&text, mock_port, &stores.iter().map(|s| s.port).collect::<Vec<_>>());
    let envoys = start_envoys(&rendered, 2);
    // 24 users, 5 requests each, from 4 threads over both Envoys: 3 each admitted.
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let envoys = &envoys;
                s.spawn(move || (0..30).map(|i| chat(&envoys[i % 2], &format!("c-{t}-{}", i % 6), &[]).status).collect::<Vec<_>>())
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 24 * 3, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 24 * 2, "{statuses:?}");
    eventually(Duration::from_secs(5), 24 * 3 * 17, || used(&usage(&envoys[1], "c-0-0"), "tier:total_tokens/day"));
    let keys = cluster.keys_per_node();
    assert!(keys.iter().all(|k| *k > 0), "keys on every node: {keys:?}");
    assert_eq!(keys.iter().sum::<u64>(), 24 + 1, "one key per identity and the tier's: {keys:?}");
    assert_eq!(stat_sum(&envoys, "store_failures"), 0);
    assert_eq!(stat_sum(&envoys, "settle_failures"), 0);
    drop(envoys);
    drop(stores);
}

/// With `store.redis.key_secret`, the service takes jobs only with the fleet's key: an Envoy
/// holding it counts as usual, one with another key is refused (`on_failure`), and anyone else
/// on the network who reaches the service can neither settle nor peek; a replica started
/// without the key refuses to start.
#[test]
fn the_store_takes_jobs_only_with_the_fleets_key() {
    away_from_day_end();
    let _turn = ONE_FLEET_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = TempDir::new("fleet-key");
    let redis = Redis::start();
    let p = policy(json!([{ "window": "day", "requests": 2 }]), json!({ "store": { "on_failure": "deny", "redis": { "cluster": "tollgate_store", "timeout_ms": 500, "key_secret": "TOLLGATE_STORE_KEY" } } }));
    let text = serde_json::to_string_pretty(&p).unwrap();
    let key = [("TOLLGATE_STORE_KEY", "k3y-0f-the-fleet")];
    let stores: Vec<StoreService> = (0..2).map(|i| start_store_with_env(&redis.url(), &text, &dir, &format!("key-store-{i}"), &key)).collect();
    let (_mock, mock_url) = start_mock_provider();
    let mock_port: u16 = mock_url.rsplit(':').next().unwrap().parse().unwrap();
    let rendered = fleet_config(&text, mock_port, &stores.iter().map(|s| s.port).collect::<Vec<_>>());
    let good = start_envoys(&with_vm_env(&rendered, &key), 1);
    let bad = start_envoys(&with_vm_env(&rendered, &[("TOLLGATE_STORE_KEY", "a-guess")]), 1);
    assert_eq!([200, 200, 429].to_vec(), (0..3).map(|_| chat(&good[0], "keyed", &[]).status).collect::<Vec<_>>());
    let r = chat(&bad[0], "other", &[]);
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.json()["error"]["code"], "rate_limiter_unavailable");
    assert_eq!(used(&usage(&good[0], "other"), "requests/day"), 0, "the refused Envoy counted nothing");
    // Straight to the service: no key, a wrong key.
    let peek = r#"{"policy":"x","job":{"job":"peek","who":{"identity_key":"a","ip_key":null,"tier":"free"},"now":1}}"#;
    let url = format!("http://127.0.0.1:{}/v1/store/jobs", stores[0].port);
    for headers in [vec![], vec![("authorization", "Bearer a-guess")]] {
        let r = post_json(&agent(), &url, &headers, peek);
        assert_eq!(r.status, 401, "{r:?}");
        assert!(r.json()["error"].as_str().unwrap().contains("not authorized"), "{r:?}");
    }
    // A replica without the key does not start.
    let policy_path = dir.path().join("keyless-policy.json");
    std::fs::write(&policy_path, &text).unwrap();
    let bin = tollgate_host_tests::proc::target_dir().join("release").join("tollgate");
    let out = std::process::Command::new(bin).args(["store", "--redis", &redis.url(), "--listen", "127.0.0.1:0"]).arg(&policy_path).env_remove("TOLLGATE_STORE_KEY").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("store.redis.key_secret names TOLLGATE_STORE_KEY"), "{}", String::from_utf8_lossy(&out.stderr));
    drop(good);
    drop(bad);
    drop(stores);
}

/// A store replica killed (kill -9) mid-run: the Envoys take it out (a refused connection
/// ejects it at once, the health check within a second) and the other replica takes its jobs;
/// at most the requests already on their way to it fail (`on_failure`), and counts stay exact.
#[test]
fn a_killed_store_replica_costs_at_most_the_jobs_in_flight_to_it() {
    away_from_day_end();
    let f = fleet(&policy(json!([{ "window": "day", "requests": 1000 }]), json!({})), 2, "");
    for i in 0..10 {
        assert_eq!(chat(&f.envoys[i % 2], "steady", &[]).status, 200);
    }
    let mut stores = f.stores;
    let victim = stores.remove(0);
    // SAFETY: kill(2) on the replica's process group (the test started it).
    unsafe { libc::kill(-(victim.server.pid() as i32), libc::SIGKILL) };
    drop(victim);
    let statuses: Vec<u16> = (0..60).map(|i| chat(&f.envoys[i % 2], "steady", &[]).status).collect();
    let failed = statuses.iter().filter(|s| **s == 503).count();
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(failed + admitted, 60, "{statuses:?}");
    // One refused connection per Envoy worker at most (each Envoy ejects the replica on its
    // first local-origin failure).
    let stats = tollgate_host_tests::proc::get(&agent(), &format!("{}/stats?filter=tollgate_store", f.envoys[0].admin)).body;
    assert!(failed <= 4, "{failed} requests failed after the replica died: {statuses:?}\n{stats}");
    assert!(statuses[20..].iter().all(|s| *s == 200), "still failing after 20 requests: {statuses:?}");
    eventually(Duration::from_secs(5), 10 + admitted as u64, || used(&usage(&f.envoys[1], "steady"), "requests/day"));
    drop(stores);
}
