//! The behaviour suite (`tollgate_host_tests::behaviour`) on every host: the filter in the
//! wasmtime host with Envoy's semantics and with ngx_wasm_module's, the filter in real Envoy,
//! and the worker in real workerd. Each host runs the same table of scenarios against the
//! built-in mock provider and must answer as the table says; where a host cannot, the one
//! place that says so is `behaviour::difference`.
//!
//! Needs the release filter (`scripts/build-wasm.sh`), the worker (`scripts/build-worker.sh`),
//! the mock provider, Envoy and wrangler (`scripts/setup.sh all`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use tollgate_cli::envoy::{generate, Options};
use tollgate_host_tests::behaviour::{check, check_record, difference, eventually, expected_tokens, policy, raw, scenarios, usage_numbers, Client, Difference, HostKind, Observed, Request, Stack};
use tollgate_host_tests::envoy::{self, Envoy, Rendered, TempDir};
use tollgate_host_tests::fleet::{start_store, Redis, StoreService};
use tollgate_host_tests::host::{Flavour, FilterModule, Host, HttpRequest, SharedStore, UpstreamRequest, UpstreamResponse, Vm};
use tollgate_host_tests::proc::{agent, filter_wasm_path, fixtures_dir, mock_request_count, start_mock_provider_with, Server};
use tollgate_host_tests::workerd::{seed_policy, start_wrangler, Scratch, Wrangler};

/// The mock provider, and one that fails every API request with 503.
struct Mocks {
    _ok: Server,
    ok: String,
    _failing: Server,
    failing: String,
}

fn mocks() -> Mocks {
    let fixtures = fixtures_dir().display().to_string();
    let (ok_server, ok) = start_mock_provider_with(&["--fixtures", &fixtures]);
    let (failing_server, failing) = start_mock_provider_with(&["--fail-status", "503"]);
    Mocks { _ok: ok_server, ok, _failing: failing_server, failing }
}

impl Mocks {
    fn calls(&self) -> u64 {
        mock_request_count(&agent(), &self.ok) + mock_request_count(&agent(), &self.failing)
    }
}

/// One host, able to send the suite's requests to a stack and to read a user's usage.
trait Driver {
    fn kind(&self) -> HostKind;
    fn send(&mut self, stack: Stack, request: &Request, user: &str) -> Observed;
    /// Every usage record the host has written so far, in order.
    fn records(&self) -> Vec<Value>;
}

fn headers_for(request: &Request, user: &str) -> Vec<(String, String)> {
    let mut h = vec![("x-tollgate-user".to_owned(), user.to_owned())];
    if let Some(tier) = request.tier {
        h.push(("x-tollgate-tier".to_owned(), tier.to_owned()));
    }
    h.extend(request.headers.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
    h
}

fn usage_request() -> Request {
    Request { method: "GET", path: "/v1/tollgate/usage", tier: None, headers: vec![], body: None, client: Client::Reads, before: 0 }
}

/// Runs the table on `driver`; every departure from it is reported at once.
fn run_suite(driver: &mut dyn Driver, mocks: &Mocks) {
    let kind = driver.kind();
    let mut failures = Vec::new();
    let mut ran = 0;
    for s in scenarios() {
        if let Some(Difference::Skip(why)) = difference(kind, s.name) {
            eprintln!("{kind:?}: {} skipped: {why}", s.name);
            continue;
        }
        ran += 1;
        let user = format!("{kind:?}-{}", s.name);
        for _ in 0..s.request.before {
            let warm = Request { client: Client::Reads, ..s.request.clone() };
            driver.send(s.stack, &warm, &user);
        }
        let calls_before = mocks.calls();
        let got = driver.send(s.stack, &s.request, &user);
        // Every departure is reported, the usage afterwards too when the answer already departs.
        if let Err(e) = check(kind, &s, &got) {
            failures.push(format!("{}: {e}", s.name));
        }
        if !s.expect.reaches_provider && mocks.calls() != calls_before {
            failures.push(format!("{}: the provider was called", s.name));
        }
        if let Some((requests, tokens)) = s.expect.usage_after {
            match expected_tokens(tokens, &got) {
                Ok(tokens) => {
                    // (The worker settles in `waitUntil`, after the answer: poll.)
                    let want = Some((requests, tokens, 0));
                    let seen = eventually(Duration::from_secs(8), &want, || {
                        let r = driver.send(s.stack, &usage_request(), &user);
                        serde_json::from_slice::<Value>(&r.body).ok().and_then(|v| usage_numbers(&v))
                    });
                    if seen != want {
                        failures.push(format!("{}: usage afterwards (requests, tokens, in flight) {seen:?}, want {want:?}", s.name));
                    }
                }
                Err(e) => failures.push(format!("{}: {e}", s.name)),
            }
        }
        // The user's records: identified by the hashed identity the usage endpoint names.
        let report = driver.send(s.stack, &usage_request(), &user);
        let Some(identity) = serde_json::from_slice::<Value>(&report.body).ok().and_then(|v| v["identity"].as_str().map(str::to_owned)) else {
            failures.push(format!("{}: no identity in the usage report", s.name));
            continue;
        };
        let due = if s.expect.record.is_some() { s.request.before as usize + 1 } else { 0 };
        // (In admission order: a fleet's Envoys each write their own log.)
        let mine = |d: &dyn Driver| {
            let mut mine: Vec<Value> = d.records().into_iter().filter(|r| r["identity"] == identity.as_str()).collect();
            let ended = |r: &Value| r["time_ms"].as_u64().unwrap_or(0).saturating_add(r["total_ms"].as_u64().unwrap_or(0));
            mine.sort_by_key(|r| (ended(r), r["time_ms"].as_u64()));
            mine
        };
        // (Envoy writes access logs when the stream is done and flushes them every 100 ms; the
        // worker logs in `waitUntil`.)
        let counted = eventually(Duration::from_secs(5), &due, || mine(&*driver).len());
        if counted == due && due == 0 {
            // Nothing due: give a late record the time it would take to show.
            std::thread::sleep(Duration::from_millis(300));
        }
        if let Err(e) = check_record(&s, &mine(&*driver), &got) {
            failures.push(format!("{}: {e}", s.name));
        }
    }
    assert!(ran >= 15, "only {ran} scenarios ran on {kind:?}");
    assert!(failures.is_empty(), "{kind:?} departs from the behaviour table:\n  {}", failures.join("\n  "));
}

// ---------------------------------------------------------------------------------------------
// The filter in the wasmtime host

struct Wasmtime {
    flavour: Flavour,
    records: Vec<Value>,
    vms: HashMap<&'static str, (Host, Vm)>,
    ok: String,
    failing: String,
}

fn stack_name(stack: Stack) -> &'static str {
    match stack {
        Stack::Translating => "translating",
        Stack::Passthrough => "passthrough",
    }
}

impl Wasmtime {
    fn new(flavour: Flavour, mocks: &Mocks) -> Wasmtime {
        let mut vms = HashMap::new();
        for stack in [Stack::Translating, Stack::Passthrough] {
            let store = match flavour {
                Flavour::Ngx => SharedStore::ngx(),
                _ => SharedStore::envoy(),
            };
            let host = Host::with_flavour(store, flavour);
            host.clock().use_real_time();
            let config = policy(stack, &mocks.ok, &mocks.failing).to_string();
            let vm = Vm::load(&host, FilterModule::release_filter(), config.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
            vms.insert(stack_name(stack), (host, vm));
        }
        Wasmtime { flavour, records: Vec::new(), vms, ok: mocks.ok.clone(), failing: mocks.failing.clone() }
    }
}

/// What the upstream answered, as the wasmtime host delivers it: the whole body in one go, cut
/// when the connection broke before its end (or, for a client that leaves, after the first
/// event).
fn forward(base: &str, req: &UpstreamRequest, leave_early: bool) -> UpstreamResponse {
    let text = |k: &str| req.header(k).map(|v| String::from_utf8_lossy(v).into_owned());
    let path = text(":path").unwrap_or_default();
    let method = text(":method").unwrap_or_else(|| "GET".into());
    let headers: Vec<(String, String)> = req
        .headers
        .iter()
        .filter(|(k, _)| !k.starts_with(':') && !matches!(k.as_str(), "host" | "content-length" | "connection" | "transfer-encoding"))
        .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
        .collect();
    let body = String::from_utf8_lossy(&req.body).into_owned();
    let got = raw(base, &method, &path, &headers, (method == "POST").then_some(body.as_str()), Client::Reads);
    let mut response = UpstreamResponse::new(got.status);
    for (k, v) in &got.headers {
        if !matches!(k.as_str(), "content-length" | "transfer-encoding" | "connection") {
            response = response.header(k, v);
        }
    }
    let mut bytes = got.body.clone();
    let mut cut = !got.complete;
    if leave_early {
        if let Some(i) = bytes.windows(2).position(|w| w == b"\n\n") {
            bytes.truncate(i + 2);
            cut = true;
        }
    }
    response = response.body(bytes);
    if cut {
        response = response.cut();
    }
    response
}

impl Driver for Wasmtime {
    fn kind(&self) -> HostKind {
        match self.flavour {
            Flavour::Ngx => HostKind::WasmtimeNgx,
            _ => HostKind::WasmtimeEnvoy,
        }
    }

    fn records(&self) -> Vec<Value> {
        self.records.clone()
    }

    fn send(&mut self, stack: Stack, request: &Request, user: &str) -> Observed {
        let (ok, failing) = (self.ok.clone(), self.failing.clone());
        let (_, vm) = self.vms.get_mut(stack_name(stack)).expect("a VM per stack");
        let leave_early = request.client == Client::LeavesAfterFirstBytes;
        vm.set_upstream(move |req| {
            let cluster = req.header("x-tollgate-cluster").map(|v| v.to_vec());
            let base = if cluster.as_deref() == Some(b"failing") { &failing } else { &ok };
            forward(base, req, leave_early)
        });
        let mut http = HttpRequest::new(request.method, request.path);
        for (k, v) in headers_for(request, user) {
            http = http.header(&k, v);
        }
        if let Some(body) = &request.body {
            // (nginx and Envoy see a length; the wasmtime host adds none itself.)
            http = http.header("content-type", "application/json").header("content-length", body.len().to_string()).body(body);
        }
        let ex = vm.request(http).unwrap_or_else(|e| panic!("{user}: {e}"));
        if let Some(record) = ex.properties.get(b"tollgate.record".as_slice()) {
            self.records.push(serde_json::from_slice(record).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(record))));
        }
        Observed {
            status: ex.status,
            headers: ex.headers.iter().map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned())).collect(),
            body: ex.body.clone(),
            complete: !ex.reset,
        }
    }
}

#[test]
fn the_filter_in_the_wasmtime_host_with_envoys_semantics_answers_as_the_table_says() {
    let mocks = mocks();
    run_suite(&mut Wasmtime::new(Flavour::Envoy, &mocks), &mocks);
}

#[test]
fn the_filter_in_the_wasmtime_host_with_ngx_wasm_modules_semantics_answers_as_the_table_says() {
    let mocks = mocks();
    run_suite(&mut Wasmtime::new(Flavour::Ngx, &mocks), &mocks);
}

// ---------------------------------------------------------------------------------------------
// Real Envoy

/// A complete Envoy config (JSON, which Envoy reads as YAML) for the suite's policy: the
/// downstream filter, the routes and aggregate clusters `tollgate envoy` generates for the
/// aliases, and the mock providers' clusters.
fn envoy_config(policy: &Value, mocks: &Mocks, store_ports: &[u16], usage_log: &Path) -> String {
    let port = |url: &str| url.rsplit(':').next().and_then(|p| p.parse::<u16>().ok()).expect("a port");
    let (ok, failing) = (port(&mocks.ok), port(&mocks.failing));
    let wasm = filter_wasm_path().display().to_string();
    let text = policy.to_string();
    let loaded = tollgate_cli::parse(text.as_bytes()).expect("the suite's policy is valid");
    let store_addresses = store_ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let generated = generate(&loaded, &Options { deployment_cluster_prefix: String::new(), wasm: wasm.clone(), store_addresses }).expect("generated");
    let generated: Value = serde_json::from_str(&generated.to_json()).expect("JSON");
    let cluster = |name: &str, port: u16| {
        json!({
            "name": name,
            "connect_timeout": "1s",
            "circuit_breakers": { "thresholds": [ { "max_retries": 100000, "max_requests": 100000, "max_pending_requests": 100000 } ] },
            "load_assignment": { "cluster_name": name, "endpoints": [ { "lb_endpoints": [ { "endpoint": { "address": { "socket_address": { "address": "127.0.0.1", "port_value": port } } } } ] } ] }
        })
    };
    let mut routes = generated["routes"].as_array().cloned().unwrap_or_default();
    routes.push(json!({ "match": { "prefix": "/", "headers": [ { "name": "x-tollgate-cluster", "string_match": { "exact": "failing" } } ] }, "route": { "cluster": "failing", "timeout": "60s" } }));
    routes.push(json!({ "match": { "prefix": "/" }, "route": { "cluster": "mock", "timeout": "60s" } }));
    let mut clusters = generated["clusters"].as_array().cloned().unwrap_or_default();
    clusters.extend([cluster("mock", ok), cluster("failing", failing), cluster("gpt", ok), cluster("broken", failing)]);
    let config = json!({
        "admin": { "address": { "socket_address": { "address": "127.0.0.1", "port_value": 0 } } },
        "static_resources": {
            "listeners": [ {
                "name": "tollgate",
                "address": { "socket_address": { "address": "127.0.0.1", "port_value": 0 } },
                "filter_chains": [ { "filters": [ {
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "tollgate",
                        // The usage records, as examples/envoy/providers.yaml logs them.
                        "access_log": [ {
                            "name": "tollgate-usage",
                            "filter": { "extension_filter": {
                                "name": "envoy.access_loggers.extension_filters.cel",
                                "typed_config": {
                                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter",
                                    "expression": "'wasm.tollgate.record' in filter_state"
                                } } },
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                                "path": usage_log.display().to_string(),
                                "log_format": { "text_format_source": { "inline_string": "%FILTER_STATE(wasm.tollgate.record:PLAIN)%\n" } }
                            }
                        } ],
                        "route_config": { "virtual_hosts": [ { "name": "all", "domains": ["*"], "routes": routes } ] },
                        "http_filters": [
                            { "name": "tollgate", "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                                "config": {
                                    "name": "tollgate", "root_id": "tollgate", "failure_policy": "FAIL_RELOAD",
                                    "allow_on_headers_stop_iteration": true,
                                    "configuration": { "@type": "type.googleapis.com/google.protobuf.StringValue", "value": text },
                                    "vm_config": { "vm_id": "tollgate", "runtime": "envoy.wasm.runtime.v8", "code": { "local": { "filename": wasm } } }
                                } } },
                            { "name": "envoy.filters.http.router", "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" } }
                        ]
                    }
                } ] } ]
            } ],
            "clusters": clusters
        }
    });
    config.to_string()
}

struct RealEnvoy {
    envoys: HashMap<&'static str, Envoy>,
    logs: Vec<PathBuf>,
    _dir: TempDir,
}

/// The records in Envoy usage logs (JSON lines).
fn logged_records(logs: &[PathBuf]) -> Vec<Value> {
    logs.iter()
        .flat_map(|log| std::fs::read_to_string(log).unwrap_or_default().lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect::<Vec<_>>())
        .collect()
}

impl Driver for RealEnvoy {
    fn kind(&self) -> HostKind {
        HostKind::Envoy
    }

    fn records(&self) -> Vec<Value> {
        logged_records(&self.logs)
    }

    fn send(&mut self, stack: Stack, request: &Request, user: &str) -> Observed {
        let envoy = &self.envoys[stack_name(stack)];
        raw(&envoy.url, request.method, request.path, &headers_for(request, user), request.body.as_deref(), request.client)
    }
}

#[test]
fn the_filter_in_real_envoy_answers_as_the_table_says() {
    let mocks = mocks();
    let dir = TempDir::new("behaviour-envoy");
    let mut envoys = HashMap::new();
    let mut logs = Vec::new();
    for stack in [Stack::Translating, Stack::Passthrough] {
        let log = dir.path().join(format!("usage-{}.jsonl", stack_name(stack)));
        let yaml = envoy_config(&policy(stack, &mocks.ok, &mocks.failing), &mocks, &[], &log);
        envoys.insert(stack_name(stack), envoy::start(&Rendered { yaml }, &[]));
        logs.push(log);
    }
    run_suite(&mut RealEnvoy { envoys, logs, _dir: dir }, &mocks);
}

// ---------------------------------------------------------------------------------------------
// A fleet: two real Envoys per stack sharing Redis through a `tollgate store` replica

struct Fleet {
    envoys: HashMap<&'static str, Vec<Envoy>>,
    logs: Vec<PathBuf>,
    sent: usize,
    _stores: Vec<StoreService>,
    _redis: Redis,
    _dir: TempDir,
}

impl Driver for Fleet {
    fn kind(&self) -> HostKind {
        HostKind::EnvoyFleet
    }

    fn records(&self) -> Vec<Value> {
        logged_records(&self.logs)
    }

    /// Alternates between the stack's Envoys: a scenario's warm-up requests, its request and
    /// the usage reads go through different processes.
    fn send(&mut self, stack: Stack, request: &Request, user: &str) -> Observed {
        self.sent += 1;
        let envoys = &self.envoys[stack_name(stack)];
        let envoy = &envoys[self.sent % envoys.len()];
        raw(&envoy.url, request.method, request.path, &headers_for(request, user), request.body.as_deref(), request.client)
    }
}

#[test]
fn the_filter_in_a_fleet_of_envoys_on_redis_answers_as_the_table_says() {
    let mocks = mocks();
    let dir = TempDir::new("behaviour-fleet");
    let redis = Redis::start();
    let mut envoys = HashMap::new();
    let mut logs = Vec::new();
    let mut stores = Vec::new();
    for stack in [Stack::Translating, Stack::Passthrough] {
        let mut p = policy(stack, &mocks.ok, &mocks.failing);
        p["store"]["redis"] = json!({ "cluster": "tollgate_store", "timeout_ms": 500 });
        let store = start_store(&redis.url(), &p.to_string(), &dir, &format!("store-{}", stack_name(stack)));
        let mut fleet = Vec::new();
        for i in 0..2 {
            let log = dir.path().join(format!("usage-{}-{i}.jsonl", stack_name(stack)));
            fleet.push(envoy::start(&Rendered { yaml: envoy_config(&p, &mocks, &[store.port], &log) }, &[]));
            logs.push(log);
        }
        stores.push(store);
        envoys.insert(stack_name(stack), fleet);
    }
    run_suite(&mut Fleet { envoys, logs, sent: 0, _stores: stores, _redis: redis, _dir: dir }, &mocks);
}

// ---------------------------------------------------------------------------------------------
// The worker in real workerd

struct RealWorkerd {
    workers: HashMap<&'static str, (Wrangler, Scratch)>,
}

impl Driver for RealWorkerd {
    fn kind(&self) -> HostKind {
        HostKind::Workerd
    }

    /// The `{"record": …}` lines of the workers' logs (`console.log`, as `wrangler dev` prints
    /// it).
    fn records(&self) -> Vec<Value> {
        let mut out = Vec::new();
        for (wrangler, _) in self.workers.values() {
            let log = std::fs::read_to_string(&wrangler.log).unwrap_or_default();
            for line in log.lines() {
                if let Some(at) = line.find(r#"{"record":"#) {
                    let v: Value = serde_json::from_str(&line[at..]).unwrap_or_else(|e| panic!("{e}: {line}"));
                    out.push(v["record"].clone());
                }
            }
        }
        out
    }

    fn send(&mut self, stack: Stack, request: &Request, user: &str) -> Observed {
        let (wrangler, _) = &self.workers[stack_name(stack)];
        raw(&wrangler.url, request.method, request.path, &headers_for(request, user), request.body.as_deref(), request.client)
    }
}

#[test]
fn the_worker_in_real_workerd_answers_as_the_table_says() {
    let mocks = mocks();
    let mut workers = HashMap::new();
    for stack in [Stack::Translating, Stack::Passthrough] {
        let scratch = Scratch::new(&format!("behaviour-{}", stack_name(stack)));
        seed_policy(&scratch.0, &policy(stack, &mocks.ok, &mocks.failing).to_string());
        let pass = "x-mock-fixture,x-mock-retry-after,x-mock-empty,x-mock-reset-after,x-mock-delay-ms,x-mock-usage";
        let wrangler = start_wrangler(&scratch.0, &[("UPSTREAM_URL", &mocks.ok), ("PROVIDER_PASS_HEADERS", pass), ("TOLLGATE_AGGREGATE_SHARDS", "1")], None);
        workers.insert(stack_name(stack), (wrangler, scratch));
    }
    run_suite(&mut RealWorkerd { workers }, &mocks);
}

/// A provider failure one Envoy of a fleet sees cools the deployment down for every Envoy: the
/// next request for the alias through another Envoy goes straight to the healthy deployment.
#[test]
fn a_cooldown_reported_through_one_envoy_steers_the_others() {
    let mocks = mocks();
    let dir = TempDir::new("fleet-health");
    let redis = Redis::start();
    let mut p = policy(Stack::Translating, &mocks.ok, &mocks.failing);
    p["store"]["redis"] = json!({ "cluster": "tollgate_store", "timeout_ms": 500 });
    p["health"] = json!({ "failures": 1, "window_seconds": 60, "cooldown_seconds": 60 });
    let store = start_store(&redis.url(), &p.to_string(), &dir, "store");
    let yaml = envoy_config(&p, &mocks, &[store.port], &dir.path().join("usage.jsonl"));
    let (a, b) = (envoy::start(&Rendered { yaml: yaml.clone() }, &[]), envoy::start(&Rendered { yaml }, &[]));
    let body = r#"{"model":"auto","messages":[{"role":"user","content":"hi"}],"max_tokens":5}"#;
    let send = |e: &Envoy| raw(&e.url, "POST", "/v1/chat/completions", &[("x-tollgate-user".to_owned(), "steered".to_owned())], Some(body), Client::Reads);
    let failing = || mock_request_count(&agent(), &mocks.failing);
    let before = failing();
    let first = send(&a);
    assert_eq!((first.status, first.header("x-tollgate-deployment")), (200, Some("gpt")), "{first:?}");
    assert_eq!(failing(), before + 1, "the first request tried the broken deployment");
    // The report reaches Redis off the request's path (the root context's next tick).
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..3 {
        let r = send(&b);
        assert_eq!((r.status, r.header("x-tollgate-deployment")), (200, Some("gpt")), "{r:?}");
    }
    assert_eq!(failing(), before + 1, "the other Envoy never tried the cooled-down deployment");
    drop(store);
}
