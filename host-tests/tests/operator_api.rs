//! The operator API (`tollgate_core::admin`, docs/operator-api.md) on every host that serves it:
//! the worker in real workerd, the filter in one real Envoy (shared data) and in a fleet of two
//! real Envoys on Redis through `tollgate store`. One script: requests from three identities,
//! refused keys (401, counted), one identity looked up, credited and reset (its own usage
//! endpoint agrees; each change a webhook event without content), and the identities active
//! today and this month listed page by page — where the store can list (Redis, Durable
//! Objects); one Envoy's shared data answers 501 and says why.
//!
//! Needs the release filter, the worker, the mock provider, `tollgate`, Envoy, wrangler and
//! redis-server (`scripts/test.sh`).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tollgate_host_tests::envoy::{self, render, Envoy, TempDir};
use tollgate_host_tests::fleet::{fleet_config, start_store_with_env, with_vm_env, Redis};
use tollgate_host_tests::proc::{agent, get, post_json, start_mock_provider, Reply};
use tollgate_host_tests::workerd::{get_with, seed_policy, start_wrangler, Scratch};

const KEY: &str = "tg-operator-key-0123456789";
const STORE_KEY: &str = "tg-store-key-9876543210";

fn policy(mock_url: &str) -> Value {
    json!({
        "identity": { "header": "x-tollgate-user" },
        "tier": { "default": "free", "header": "x-tollgate-tier" },
        "admin": { "key_secret": "TG_ADMIN_KEY" },
        "notify": { "cluster": "provider", "url": format!("{mock_url}/__mock/webhook/operator") },
        "tiers": {
            "free": { "limits": [ { "window": "day", "requests": 10 }, { "window": "day", "total_tokens": 1000 }, { "rate": { "per": "minute", "burst": 5 }, "requests": 5 } ] },
            "pro": { "limits": [ { "window": "day", "requests": 100 } ] }
        }
    })
}

/// A host under test: where it listens, and how many refused operator calls it counted.
trait Gateway {
    fn url(&self) -> String;
    /// Where operator calls go (a fleet: another Envoy than the clients').
    fn admin_url(&self) -> String {
        self.url()
    }
    fn unauthorized(&self) -> u64;
    /// Whether its store keeps the activity index.
    fn lists(&self) -> bool;
}

fn eventually<T: PartialEq + std::fmt::Debug>(what: &str, want: T, mut probe: impl FnMut() -> T) {
    let started = Instant::now();
    loop {
        let got = probe();
        if got == want {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{what}: {got:?}, want {want:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn used(report: &Value, name: &str) -> Option<u64> {
    report["limits"].as_array()?.iter().find(|l| l["name"] == name)?["used"].as_u64()
}

fn admin_get(g: &dyn Gateway, path: &str, key: Option<&str>) -> Reply {
    let auth = key.map(|k| format!("Bearer {k}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
    get_with(&format!("{}/v1/tollgate/admin/{path}", g.admin_url()), &headers)
}

fn admin_post(g: &dyn Gateway, path: &str, key: &str, body: &Value) -> Reply {
    post_json(&agent(), &format!("{}/v1/tollgate/admin/{path}", g.admin_url()), &[("authorization", &format!("Bearer {key}"))], &body.to_string())
}

fn own_usage(g: &dyn Gateway, user: &str, tier: Option<&str>) -> Value {
    let mut headers = vec![("x-tollgate-user", user)];
    if let Some(t) = tier {
        headers.push(("x-tollgate-tier", t));
    }
    get_with(&format!("{}/v1/tollgate/usage", g.url()), &headers).json()
}

/// Waits out the last minute of a UTC day (the policy's windows), so no count resets mid-test.
fn away_from_day_end() {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let left = 86_400_000 - now % 86_400_000;
    if left < 60_000 {
        std::thread::sleep(Duration::from_millis(left + 250));
    }
}

fn run(g: &dyn Gateway, mock_url: &str) {
    away_from_day_end();
    let chat = r#"{"model":"mock-model","max_tokens":20,"messages":[{"role":"user","content":"CANARY-OPERATOR say hi"}]}"#;
    let people = [("alice", None), ("alice", None), ("bob", None), ("carol", Some("pro"))];
    for (user, tier) in people {
        let mut headers = vec![("x-tollgate-user", user)];
        if let Some(t) = tier {
            headers.push(("x-tollgate-tier", t));
        }
        let r = post_json(&agent(), &format!("{}/v1/chat/completions", g.url()), &headers, chat);
        assert_eq!(r.status, 200, "{user}: {r:?}");
    }
    // (The worker settles after the answer.)
    eventually("alice's two requests settled", (Some(2), Some(34)), || {
        let u = own_usage(g, "alice", None);
        (used(&u, "requests/day"), used(&u, "total_tokens/day"))
    });
    let identity = |user: &str, tier: Option<&str>| own_usage(g, user, tier)["identity"].as_str().expect("an identity key").to_owned();
    let (alice, bob, carol) = (identity("alice", None), identity("bob", None), identity("carol", Some("pro")));

    // A missing or wrong key: 401, in OpenAI's shape, counted.
    let before = g.unauthorized();
    let missing = admin_get(g, &format!("usage?identity={alice}"), None);
    let wrong = admin_get(g, &format!("usage?identity={alice}"), Some("tg-operator-key-012345678"));
    let wrong_post = admin_post(g, "reset", "nope", &json!({ "identity": alice }));
    for r in [&missing, &wrong, &wrong_post] {
        assert_eq!((r.status, r.json()["error"]["code"].as_str()), (401, Some("invalid_api_key")), "{r:?}");
    }
    eventually("three refused calls counted", before + 3, || g.unauthorized());

    // One identity's limits.
    let looked = admin_get(g, &format!("usage?identity={alice}"), Some(KEY));
    assert_eq!(looked.status, 200, "{looked:?}");
    let looked = looked.json();
    assert_eq!((looked["identity"].as_str(), looked["tier"].as_str(), used(&looked, "requests/day"), used(&looked, "total_tokens/day")), (Some(alice.as_str()), Some("free"), Some(2), Some(34)), "{looked}");

    // A credit (a refund of 10 tokens) and a reset: the answer, and alice's own view, agree.
    let credit = admin_post(g, "credit", KEY, &json!({ "identity": alice, "limit": "total_tokens/day", "amount": 10 }));
    assert_eq!(credit.status, 200, "{credit:?}");
    let credit = credit.json();
    assert_eq!((credit["object"].as_str(), credit["kind"].as_str(), used(&credit, "total_tokens/day"), used(&credit, "requests/day")), (Some("tollgate.adjustment"), Some("credit"), Some(24), Some(2)), "{credit}");
    assert_eq!(used(&own_usage(g, "alice", None), "total_tokens/day"), Some(24));
    let unknown = admin_post(g, "credit", KEY, &json!({ "identity": alice, "limit": "total_tokens/month", "amount": 10 }));
    assert_eq!((unknown.status, unknown.json()["error"]["code"].as_str()), (400, Some("unknown_limit")), "{unknown:?}");
    let reset = admin_post(g, "reset", KEY, &json!({ "identity": alice }));
    assert_eq!(reset.status, 200, "{reset:?}");
    let mine = own_usage(g, "alice", None);
    assert_eq!((used(&mine, "requests/day"), used(&mine, "total_tokens/day"), used(&mine, "requests/rate-minute")), (Some(0), Some(0), Some(0)), "{mine}");
    assert_eq!(used(&own_usage(g, "bob", None), "requests/day"), Some(1), "bob untouched");

    // Each change is an event, posted to policy.notify: who, what, the limits after; no content.
    let hooks = || -> Vec<Value> {
        let all = get(&agent(), &format!("{mock_url}/__mock/webhooks")).json();
        all["hooks"].as_array().cloned().unwrap_or_default().iter().filter_map(|h| serde_json::from_str::<Value>(h["body"].as_str()?).ok()).filter(|e| e["type"].as_str().is_some_and(|t| t.starts_with("tollgate.admin."))).collect()
    };
    eventually("the credit and reset events", 2, || hooks().len());
    // (Delivered asynchronously — Envoy's outbox posts from the root context — so in any order.)
    let events = hooks();
    let mut kinds: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    kinds.sort_unstable();
    assert_eq!(kinds, ["tollgate.admin.credit", "tollgate.admin.reset"], "{events:?}");
    let credit = events.iter().find(|e| e["type"] == "tollgate.admin.credit").expect("the credit event");
    assert_eq!((credit["identity"].as_str(), credit["amount"].as_u64(), credit["limit"].as_str(), used(credit, "total_tokens/day")), (Some(alice.as_str()), Some(10), Some("total_tokens/day"), Some(24)), "{credit}");
    let reset = events.iter().find(|e| e["type"] == "tollgate.admin.reset").expect("the reset event");
    assert_eq!((reset["identity"].as_str(), used(reset, "requests/day")), (Some(alice.as_str()), Some(0)), "{reset}");
    assert!(!serde_json::to_string(&events).unwrap().contains("CANARY"), "{events:?}");

    // The identities active today and this month, two per page.
    if !g.lists() {
        let r = admin_get(g, "identities", Some(KEY));
        assert_eq!((r.status, r.json()["error"]["code"].as_str()), (501, Some("listing_unsupported")), "{r:?}");
        return;
    }
    let everyone: BTreeSet<(String, String)> = [(alice, "free"), (bob, "free"), (carol, "pro")].into_iter().map(|(i, t)| (i, t.to_owned())).collect();
    for window in ["day", "month"] {
        let list = || {
            let mut seen = BTreeSet::new();
            let mut pages = 0;
            let mut after: Option<String> = None;
            loop {
                let query = match &after {
                    Some(a) => format!("identities?window={window}&limit=2&after={}", a.replace(' ', "%20").replace(':', "%3A")),
                    None => format!("identities?window={window}&limit=2"),
                };
                let page = admin_get(g, &query, Some(KEY));
                assert_eq!(page.status, 200, "{page:?}");
                let page = page.json();
                pages += 1;
                for entry in page["data"].as_array().expect("data") {
                    seen.insert((entry["identity"].as_str().unwrap().to_owned(), entry["tier"].as_str().unwrap().to_owned()));
                }
                match page["next"].as_str() {
                    Some(n) if pages < 10 => after = Some(n.to_owned()),
                    _ => return (seen, pages),
                }
            }
        };
        // (The worker indexes in `waitUntil`.)
        eventually(&format!("the {window}'s identities, on two pages"), (everyone.clone(), 2), list);
    }
}

// ---------------------------------------------------------------------------------------------

struct Worker {
    url: String,
    log: std::path::PathBuf,
}

impl Gateway for Worker {
    fn url(&self) -> String {
        self.url.clone()
    }

    /// The refusal events in the worker's log.
    fn unauthorized(&self) -> u64 {
        std::fs::read_to_string(&self.log).unwrap_or_default().matches("tollgate.admin.unauthorized").count() as u64
    }

    fn lists(&self) -> bool {
        true
    }
}

#[test]
fn the_worker_in_real_workerd_serves_the_operator_api() {
    let (_mock, mock_url) = start_mock_provider();
    let scratch = Scratch::new("workerd-operator");
    let secrets = scratch.0.join("secrets.env");
    std::fs::write(&secrets, format!("TG_ADMIN_KEY={KEY}\n")).unwrap();
    seed_policy(&scratch.0, &policy(&mock_url).to_string());
    let wrangler = start_wrangler(&scratch.0, &[("UPSTREAM_URL", &mock_url)], Some(&secrets));
    run(&Worker { url: wrangler.url.clone(), log: wrangler.log.clone() }, &mock_url);
}

// ---------------------------------------------------------------------------------------------

struct Envoys {
    envoys: Vec<Envoy>,
    lists: bool,
}

impl Gateway for Envoys {
    /// The first Envoy.
    fn url(&self) -> String {
        self.envoys[0].url.clone()
    }

    /// The last Envoy: in a fleet, operator calls and clients go through different processes.
    fn admin_url(&self) -> String {
        self.envoys[self.envoys.len() - 1].url.clone()
    }

    /// `tollgate_admin_unauthorized`, summed over the Envoys.
    fn unauthorized(&self) -> u64 {
        self.envoys
            .iter()
            .map(|e| {
                let text = get_with(&format!("{}/stats/prometheus", e.admin), &[]).body;
                let line = text.lines().find(|l| l.starts_with("tollgate_admin_unauthorized ") || l.starts_with("tollgate_admin_unauthorized{"));
                line.and_then(|l| l.split_whitespace().last()?.parse::<u64>().ok()).unwrap_or(0)
            })
            .sum()
    }

    fn lists(&self) -> bool {
        self.lists
    }
}

fn port_of(url: &str) -> u16 {
    url.rsplit(':').next().and_then(|p| p.parse().ok()).expect("a port")
}

#[test]
fn the_filter_in_one_real_envoy_serves_the_operator_api_without_listing() {
    let (_mock, mock_url) = start_mock_provider();
    let rendered = with_vm_env(&render("envoy.yaml", Some(port_of(&mock_url)), Some(&serde_json::to_string_pretty(&policy(&mock_url)).unwrap())), &[("TG_ADMIN_KEY", KEY)]);
    let envoy = envoy::start(&rendered, &[]);
    run(&Envoys { envoys: vec![envoy], lists: false }, &mock_url);
}

#[test]
fn the_filter_in_a_fleet_on_redis_serves_the_operator_api_and_lists() {
    let (_mock, mock_url) = start_mock_provider();
    let dir = TempDir::new("operator-fleet");
    let redis = Redis::start();
    let mut p = policy(&mock_url);
    // (Operator jobs need the store key: the store service refuses them from any host without it.)
    p["store"] = json!({ "on_failure": "deny", "redis": { "cluster": "tollgate_store", "timeout_ms": 500, "key_secret": "TG_STORE_KEY" } });
    let text = serde_json::to_string_pretty(&p).unwrap();
    let store = start_store_with_env(&redis.url(), &text, &dir, "store", &[("TG_STORE_KEY", STORE_KEY)]);
    let rendered = with_vm_env(&fleet_config(&text, port_of(&mock_url), &[store.port]), &[("TG_ADMIN_KEY", KEY), ("TG_STORE_KEY", STORE_KEY)]);
    let envoys = vec![envoy::start(&rendered, &[]), envoy::start(&rendered, &[])];
    run(&Envoys { envoys, lists: true }, &mock_url);
    drop(store);
}

/// A store service without the store key takes no operator job (they change or list any
/// identity's counts): 403, whatever the job says.
#[test]
fn a_store_service_without_a_key_refuses_operator_jobs() {
    let dir = TempDir::new("operator-keyless-store");
    let redis = Redis::start();
    let mut p = policy("http://127.0.0.1:1");
    p["store"] = json!({ "redis": { "cluster": "tollgate_store", "timeout_ms": 500 } });
    let store = start_store_with_env(&redis.url(), &p.to_string(), &dir, "store", &[]);
    let url = format!("http://127.0.0.1:{}/v1/store/jobs", store.port);
    let jobs = [
        json!({ "job": "list", "key": "tg2:x:day:0", "limit": 2 }),
        json!({ "job": "adjust", "who": { "identity_key": "tg1:q:00", "ip_key": null, "tier": "free" }, "adjustment": { "kind": "reset" }, "now": 1 }),
    ];
    for job in jobs {
        let r = post_json(&agent(), &url, &[], &json!({ "policy": "any", "job": job }).to_string());
        assert_eq!(r.status, 403, "{job}: {r:?}");
        assert!(r.body.contains("store.redis.key_secret"), "{r:?}");
    }
    drop(store);
}
