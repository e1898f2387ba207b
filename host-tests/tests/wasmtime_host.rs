//! The release `filter.wasm` in an in-process Proxy-Wasm host with Envoy's semantics
//! (`tollgate_host_tests::host`), plus tests of the host itself with tiny synthetic guests.
//!
//! Needs the filter built first:
//! `cargo build -p tollgate-filter --target wasm32-unknown-unknown --profile wasm`
//! then `cargo test --release -p tollgate-host-tests --test wasmtime_host`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Instant;

use tollgate_host_tests::host::{
    Flavour,
    encode_pairs, CasSemantics, ConfigureError, Exchange, FilterModule, Host, HostError, HttpRequest, SharedStore,
    Status, UpstreamResponse, Vm,
};

/// 2024-02-29T13:45:30.250Z: 29.75 s before the minute ends, 10h14m29.75s before the day does.
const T0: u64 = 1_709_214_330_250;
/// 2024-02-29T12:00:00.000Z: far from any day boundary.
const MIDDAY: u64 = 1_709_208_000_000;

fn filter() -> &'static FilterModule {
    FilterModule::release_filter()
}

fn load(host: &Host, config: &str) -> Vm {
    Vm::load(host, filter(), config.as_bytes()).unwrap_or_else(|e| panic!("the filter refused a valid policy: {e}"))
}

fn send(vm: &mut Vm, request: HttpRequest) -> Exchange {
    vm.request(request).unwrap_or_else(|e| panic!("{e}"))
}

fn chat(user: Option<&str>) -> HttpRequest {
    let request = HttpRequest::post("/v1/chat/completions").body(r#"{"model":"gpt-4o-mini","messages":[]}"#);
    match user {
        // Mixed case on purpose: header names reach the filter lower-cased.
        Some(user) => request.header("X-Tollgate-User", user),
        None => request,
    }
}

/// A policy with one default tier and the given limits.
fn policy(limits: &str, store: &str) -> String {
    format!(
        r#"{{"identity": {{"header": "x-tollgate-user"}}, "tier": {{"default": "default"}}, "store": {store},
            "tiers": {{"default": {{"limits": {limits}}}}}}}"#
    )
}

/// What an OpenAI upstream sends: its own, organisation-wide rate-limit headers.
fn openai_like(calls: Arc<AtomicUsize>) -> impl FnMut(&tollgate_host_tests::host::UpstreamRequest) -> UpstreamResponse {
    move |_| {
        calls.fetch_add(1, Ordering::SeqCst);
        UpstreamResponse::new(200)
            .header("content-type", "application/json")
            .header("x-ratelimit-limit-requests", "10000")
            .header("x-ratelimit-remaining-requests", "9999")
            .header("x-ratelimit-reset-requests", "6ms")
            .header("x-ratelimit-limit-tokens", "30000000")
            .header("x-ratelimit-remaining-tokens", "29999990")
            .header("x-ratelimit-reset-tokens", "0s")
            .header("openai-processing-ms", "100")
            .body(r#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}]}"#)
    }
}

#[track_caller]
fn assert_allowed(ex: &Exchange, limit: &str, remaining: &str, reset: &str) {
    assert_eq!(ex.status, 200, "expected the request to pass, got {} {}", ex.status, ex.body_text());
    assert!(ex.reached_upstream && ex.local_reply.is_none());
    assert_eq!(ex.header_all("x-ratelimit-limit-requests"), [limit], "limit header (exactly one)");
    assert_eq!(ex.header_all("x-ratelimit-remaining-requests"), [remaining], "remaining header");
    assert_eq!(ex.header_all("x-ratelimit-reset-requests"), [reset], "reset header");
}

#[track_caller]
fn assert_rate_limited(ex: &Exchange, message: &str, retry_after: &str) {
    assert_eq!(ex.status, 429, "expected a 429, got {} {}", ex.status, ex.body_text());
    assert!(!ex.reached_upstream, "a denied request must not reach the upstream");
    assert!(ex.local_reply.is_some());
    assert_eq!(ex.header("retry-after").as_deref(), Some(retry_after));
    assert_eq!(ex.header_all("content-type"), ["application/json"]);
    let body =
        format!(r#"{{"error":{{"message":"{message}","type":"requests","param":null,"code":"rate_limit_exceeded"}}}}"#);
    assert_eq!(ex.body_text(), body);
}

// ---------------------------------------------------------------------------------------------
// 1. The policy as a client sees it

#[test]
fn requests_are_counted_per_identity_with_openai_headers_and_a_429_past_the_limit() {
    let host = Host::new(SharedStore::envoy());
    host.clock().set_epoch_ms(T0);
    let mut vm =
        load(&host, &policy(r#"[{"window": "minute", "requests": 3}, {"window": "day", "requests": 5}]"#, "{}"));
    let calls = Arc::new(AtomicUsize::new(0));
    vm.set_upstream(openai_like(calls.clone()));

    // 13:45:30.250 — the minute binds (fewer left than the day), 29.75 s to its end.
    for (i, remaining) in ["2", "1", "0"].into_iter().enumerate() {
        let ex = send(&mut vm, chat(Some("alice")));
        assert_allowed(&ex, "3", remaining, "29.75s");
        assert_eq!(calls.load(Ordering::SeqCst), i + 1);
        // The provider's organisation-wide numbers never reach the client; other headers do.
        for gone in ["x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"] {
            assert_eq!(ex.header(gone), None, "{gone} must be removed");
        }
        assert_eq!(ex.header("openai-processing-ms").as_deref(), Some("100"));
        // Who the user is stays between the app and Tollgate.
        let upstream = ex.upstream_request.as_ref().unwrap();
        assert_eq!(upstream.header("x-tollgate-user"), None);
        assert_eq!(upstream.body, br#"{"model":"gpt-4o-mini","messages":[]}"#);
    }
    let ex = send(&mut vm, chat(Some("alice")));
    assert_rate_limited(
        &ex,
        "Usage limit reached for requests (minute): Limit 3, Used 3. Please try again in 29.75s.",
        "30",
    );
    assert_eq!(ex.header("x-ratelimit-remaining-requests").as_deref(), Some("0"));
    assert_eq!(ex.header("content-length").map(|l| l.parse::<usize>().unwrap()), Some(ex.body.len()));
    assert_eq!(calls.load(Ordering::SeqCst), 3, "the 429 must not call the upstream");

    // Another identity has its own bucket.
    let ex = send(&mut vm, chat(Some("bob")));
    assert_allowed(&ex, "3", "2", "29.75s");

    // 13:46:05.000: a new minute; alice has 2 left of her day, which now binds.
    host.clock().set_epoch_ms(T0 + 34_750);
    assert_allowed(&send(&mut vm, chat(Some("alice"))), "5", "1", "10h13m55s");
    assert_allowed(&send(&mut vm, chat(Some("alice"))), "5", "0", "10h13m55s");
    assert_rate_limited(
        &send(&mut vm, chat(Some("alice"))),
        "Usage limit reached for requests (day): Limit 5, Used 5. Please try again in 10h13m55s.",
        "36835",
    );
    // bob's earlier request was in the previous minute.
    assert_allowed(&send(&mut vm, chat(Some("bob"))), "3", "2", "55s");

    // Without the identity header the client address is the identity, whatever the port.
    for (port, remaining) in [("5555", "2"), ("6666", "1"), ("7777", "0")] {
        assert_allowed(&send(&mut vm, chat(None).from(&format!("10.1.2.3:{port}"))), "3", remaining, "55s");
    }
    assert_rate_limited(
        &send(&mut vm, chat(None).from("10.1.2.3:8888")),
        "Usage limit reached for requests (minute): Limit 3, Used 3. Please try again in 55s.",
        "55",
    );
    assert_allowed(&send(&mut vm, chat(None).from("10.9.9.9:5555")), "3", "2", "55s");
    // An empty identity header counts as absent; a user named like an address is not that address.
    assert_allowed(&send(&mut vm, chat(Some("")).from("10.9.9.9:1")), "3", "1", "55s");
    assert_allowed(&send(&mut vm, chat(Some("10.1.2.3")).from("10.1.2.3:1")), "3", "2", "55s");

    assert_eq!(host.metric("tollgate_requests_allowed"), Some(13));
    assert_eq!(host.metric("tollgate_requests_denied"), Some(3));
    assert_eq!(host.metric("tollgate_store_failures"), Some(0));
    assert_eq!(host.metric("tollgate_host_errors"), Some(0));
}

// ---------------------------------------------------------------------------------------------
// 2. Configuration

#[test]
fn invalid_configurations_are_refused_at_configure_time_with_the_path_naming_message() {
    let cases = [
        (
            r#"{"tier": {"default": "free"},
                "tiers": {"free": {"limits": [{"window": "hour", "requests": 1}, {"window": "fortnight", "requests": 1}]}}}"#
                .to_owned(),
            r#"tiers.free.limits[1].window: unknown window "fortnight" (expected one of: minute, hour, day, week, month)"#,
        ),
        (String::new(), "configuration is empty: the plugin needs a JSON policy"),
        (" \n".to_owned(), "configuration is empty: the plugin needs a JSON policy"),
        ("{\"tiers\": ".to_owned(), "configuration is not valid JSON: EOF while parsing a value at line 1 column 10"),
        ("not json".to_owned(), "configuration is not valid JSON: expected ident at line 1 column 2"),
        ("[]".to_owned(), "config: must be a JSON object"),
        (
            policy(r#"[{"window": "day", "requests": 5, "burst": 2}]"#, "{}"),
            "tiers.default.limits[0].burst: unknown field `burst`, expected one of `name`, `per`, `window`, `rate`, `requests`, `input_tokens`, `output_tokens`, `total_tokens`, `cost_usd`, `concurrent`, `soft`",
        ),
        (policy("[]", r#"{"on_failure": "retry"}"#), "store.on_failure: unknown variant `retry`, expected `allow` or `deny`"),
        (
            r#"{"tier": {"default": "free"},
                "tiers": {"free": {"limits": [{"window": "day", "requests": 10, "soft": [{"at": 80, "action": "notify"}]}]}}}"#
                .to_owned(),
            r#"tiers.free.limits[0].soft[0]: a notify threshold needs a top-level "notify" target to post its events to (notify.url; in Envoy also notify.cluster)"#,
        ),
        (
            r#"{"tier": {"default": "free"}, "notify": {"url": "https://hooks.example/t"},
                "tiers": {"free": {"limits": [{"window": "day", "requests": 10, "soft": [{"at": 80, "action": "notify"}]}]}}}"#
                .to_owned(),
            "notify.cluster: required in Envoy (the cluster that reaches notify.url; `tollgate envoy` generates it): without it no webhook event could be delivered",
        ),
        (
            // A signed identity with the tier from a header any client can set: refused.
            r#"{"identity": {"sources": [{"signed_header": "x-app-token", "secret": "S"}]}, "tier": {"header": "x-app-tier", "default": "free"},
                "tiers": {"free": {"limits": []}, "enterprise": {"limits": []}}}"#
                .to_owned(),
            "tier.header: identity.sources[0] verifies who is asking, but any client can set a tier header and pick its own tier: carry the tier in the token instead (signed_header with tier_in_token, jwt with tier_claim) or in tier.api_keys, and remove tier.header",
        ),
    ];
    let host = Host::new(SharedStore::envoy());
    for (config, expected) in cases {
        match Vm::load(&host, filter(), config.as_bytes()) {
            Err(ConfigureError::Rejected { log }) => {
                let line = format!("[Error] tollgate: invalid configuration: {expected}");
                assert!(log.contains(&line), "config {config:?}: expected the log line\n  {line}\ngot\n  {log:#?}");
            }
            Err(other) => panic!("config {config:?}: expected proxy_on_configure to return false, got {other}"),
            Ok(_) => panic!("config {config:?} was accepted"),
        }
    }
    // A valid policy configures (the control for the cases above).
    load(&host, &policy(r#"[{"window": "day", "requests": 5}]"#, "{}"));
    assert_eq!(host.logs_containing("tollgate: policy loaded").len(), 1);
}

/// The shipped templates and the example policy work as shipped in the filter (their webhook
/// targets name the cluster `tollgate envoy` generates).
#[test]
fn every_shipped_policy_configures_in_the_filter() {
    let root = tollgate_host_tests::proc::workspace_root();
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(root.join("policies/templates")).unwrap().map(|e| e.unwrap().path()).collect();
    files.push(root.join("examples/policies/scalix.json"));
    assert!(files.len() >= 6, "{files:?}");
    for file in files {
        let host = Host::new(SharedStore::envoy());
        let bytes = std::fs::read(&file).unwrap();
        if let Err(e) = Vm::load(&host, filter(), &bytes) {
            panic!("{} is refused: {e}", file.display());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Several VMs, one shared-data store

/// The one counter record in the store, decoded (core/src/limits/record.rs, format 2:
/// `[2][members u16]`, per member `[tag u64][counters u8][rates u8][leases u16]`, counters ×
/// `[metric u8][window u8][start minute u32][count u64][notified u8]`): the request counters as
/// `(window id, start ms, count)`.
fn stored_counts(host: &Host) -> Vec<(u8, u64, u64)> {
    let keys: Vec<Vec<u8>> =
        host.shared().keys(host.vm_id()).into_iter().filter(|k| k.starts_with(b"tg2:i:")).collect();
    assert_eq!(keys.len(), 1, "expected exactly one subject's record");
    let (record, _) = host.shared().peek(host.vm_id(), &keys[0]).unwrap();
    assert_eq!(record[0], 2, "record version");
    assert_eq!(u16::from_le_bytes([record[1], record[2]]), 1, "one member");
    let member = &record[3..];
    let counters = member[8] as usize;
    assert_eq!((member[9], u16::from_le_bytes([member[10], member[11]])), (0, 0), "no rates, no leases");
    member[12..12 + counters * 15]
        .chunks_exact(15)
        .filter(|e| e[0] == 1)
        .map(|e| {
            let start_min = u32::from_le_bytes(e[2..6].try_into().unwrap()) as u64;
            (e[1], start_min * 60_000, u64::from_le_bytes(e[6..14].try_into().unwrap()))
        })
        .collect()
}

const THREADS: usize = 4;
const PER_THREAD: usize = 10_000;

/// `THREADS` VMs on their own threads, one host and store, all hammering one identity.
/// Returns (allowed, denied).
fn hammer(host: &Host, day_limit: u64) -> (u64, u64) {
    let config = policy(
        &format!(r#"[{{"window": "day", "requests": {day_limit}}}]"#),
        r#"{"max_retries": 1000, "on_failure": "deny"}"#,
    );
    let vms: Vec<Vm> = (0..THREADS).map(|_| load(host, &config)).collect();
    let start = Barrier::new(THREADS);
    let started = Instant::now();
    let counts: Vec<(u64, u64)> = std::thread::scope(|scope| {
        let handles: Vec<_> = vms
            .into_iter()
            .map(|mut vm| {
                let start = &start;
                scope.spawn(move || {
                    start.wait();
                    let (mut allowed, mut denied) = (0, 0);
                    for _ in 0..PER_THREAD {
                        let ex = send(&mut vm, chat(Some("hammer")));
                        match ex.status {
                            200 => allowed += 1,
                            429 => denied += 1,
                            other => panic!("unexpected {other}: {}", ex.body_text()),
                        }
                    }
                    (allowed, denied)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a VM thread panicked")).collect()
    });
    eprintln!(
        "{:?} limit {day_limit}: {} requests on {THREADS} threads in {:.2?}, store {:?}",
        host.shared().semantics(),
        THREADS * PER_THREAD,
        started.elapsed(),
        host.shared().stats()
    );
    counts.into_iter().fold((0, 0), |(a, d), (x, y)| (a + x, d + y))
}

fn exactly_the_limit_is_allowed_under_contention(semantics: CasSemantics) {
    let host = Host::new(SharedStore::new(semantics));
    host.clock().set_epoch_ms(MIDDAY);
    let (allowed, denied) = hammer(&host, 25_000);
    assert_eq!(host.metric("tollgate_store_failures"), Some(0), "no request may fail on the store");
    assert_eq!((allowed, denied), (25_000, 15_000));
    assert_eq!(host.metric("tollgate_requests_allowed"), Some(25_000));
    assert_eq!(host.metric("tollgate_requests_denied"), Some(15_000));
    assert_eq!(stored_counts(&host), [(3, MIDDAY - MIDDAY % 86_400_000, 25_000)]);
}

#[test]
fn concurrent_vms_allow_exactly_the_limit_on_envoy_shared_data() {
    exactly_the_limit_is_allowed_under_contention(CasSemantics::Envoy);
}

#[test]
fn concurrent_vms_allow_exactly_the_limit_on_ngx_shared_data() {
    exactly_the_limit_is_allowed_under_contention(CasSemantics::Ngx);
}

#[test]
fn concurrent_vms_lose_no_update() {
    let host = Host::new(SharedStore::envoy());
    host.clock().set_epoch_ms(MIDDAY);
    let (allowed, _) = hammer(&host, 50_000);
    assert_eq!(host.metric("tollgate_store_failures"), Some(0));
    assert_eq!(allowed, 40_000);
    assert_eq!(stored_counts(&host), [(3, MIDDAY - MIDDAY % 86_400_000, 40_000)]);
    let mut vm = load(&host, &policy(r#"[{"window": "day", "requests": 50000}]"#, "{}"));
    assert_allowed(&send(&mut vm, chat(Some("hammer"))), "50000", "9999", "12h0m0s");
}

/// Deterministic interleavings: another VM writes the same subject exactly between this VM's
/// read and its compare-and-set — first when the record does not exist yet (the first insert),
/// then on an existing record. Neither write may be lost.
fn interleaved_writes_are_never_lost(semantics: CasSemantics) {
    let host = Host::new(SharedStore::new(semantics));
    host.clock().set_epoch_ms(MIDDAY);
    let config = policy(r#"[{"window": "day", "requests": 100}]"#, r#"{"on_failure": "deny"}"#);
    let mut a = load(&host, &config);
    let b = Arc::new(std::sync::Mutex::new(load(&host, &config)));
    let interleave = |a: &mut Vm| {
        let b = b.clone();
        let mut fired = false;
        a.on_shared_data_set(move |key, _cas| {
            if key.starts_with(b"tg2:i:") && !fired {
                fired = true;
                let ex = b.lock().unwrap().request(chat(Some("carol"))).unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(ex.status, 200, "{}", ex.body_text());
            }
        });
    };

    interleave(&mut a);
    // b counted first (99 left); a's first insert must notice and count on top of it.
    assert_allowed(&send(&mut a, chat(Some("carol"))), "100", "98", "12h0m0s");
    interleave(&mut a);
    assert_allowed(&send(&mut a, chat(Some("carol"))), "100", "96", "12h0m0s");
    a.clear_shared_data_hook();
    assert_allowed(&send(&mut a, chat(Some("carol"))), "100", "95", "12h0m0s");
    assert_eq!(host.metric("tollgate_store_failures"), Some(0));
    assert_eq!(stored_counts(&host)[0].2, 5);
}

#[test]
fn interleaved_writes_are_never_lost_on_envoy_shared_data() {
    interleaved_writes_are_never_lost(CasSemantics::Envoy);
}

#[test]
fn interleaved_writes_are_never_lost_on_ngx_shared_data() {
    interleaved_writes_are_never_lost(CasSemantics::Ngx);
}

// ---------------------------------------------------------------------------------------------
// 4. Store failures

/// Without the time nothing can be counted: a failing clock follows `store.on_failure` too.
#[test]
fn a_failing_clock_follows_on_failure() {
    let limits = r#"[{"window": "minute", "requests": 3}]"#;
    for (mode, status) in [("allow", 200), ("deny", 503)] {
        let host = Host::new(SharedStore::envoy());
        host.clock().set_epoch_ms(T0);
        let mut vm = load(&host, &policy(limits, &format!(r#"{{"on_failure": "{mode}"}}"#)));
        let calls = Arc::new(AtomicUsize::new(0));
        vm.set_upstream(openai_like(calls.clone()));
        host.clock().break_it();
        let ex = send(&mut vm, chat(Some("alice")));
        assert_eq!(ex.status, status, "{mode}: {}", ex.body_text());
        assert_eq!(calls.load(Ordering::SeqCst), usize::from(status == 200), "{mode}");
        assert_eq!(host.metric("tollgate_store_failures"), Some(1), "{mode}");
        // uncounted: with the clock back, the full limit is there
        host.clock().set_epoch_ms(T0);
        assert_allowed(&send(&mut vm, chat(Some("alice"))), "3", "2", "29.75s");
    }
}

#[test]
fn a_failing_store_follows_on_failure() {
    let limits = r#"[{"window": "minute", "requests": 3}]"#;

    // allow: the request goes through, uncounted, and the failure is counted.
    let host = Host::new(SharedStore::envoy());
    host.clock().set_epoch_ms(T0);
    let mut vm = load(&host, &policy(limits, r#"{"on_failure": "allow"}"#));
    let calls = Arc::new(AtomicUsize::new(0));
    vm.set_upstream(openai_like(calls.clone()));
    host.shared().fail_with(Some(Status::InternalFailure));
    let ex = send(&mut vm, chat(Some("alice")));
    assert_eq!(ex.status, 200);
    assert!(ex.reached_upstream);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(ex.header("x-ratelimit-limit-requests"), None, "no numbers are better than the provider's");
    assert_eq!(host.metric("tollgate_store_failures"), Some(1));
    assert_eq!(host.metric("tollgate_requests_allowed"), Some(0));
    assert_eq!(host.logs_containing("counter store failed").len(), 1);

    // deny: 503 in OpenAI's error format, retryable after 1 s, upstream untouched — whether reads
    // or only writes fail.
    for fail_reads in [true, false] {
        let host = Host::new(SharedStore::envoy());
        host.clock().set_epoch_ms(T0);
        let mut vm = load(&host, &policy(limits, r#"{"on_failure": "deny"}"#));
        let calls = Arc::new(AtomicUsize::new(0));
        vm.set_upstream(openai_like(calls.clone()));
        if fail_reads {
            host.shared().fail_with(Some(Status::InternalFailure));
        } else {
            host.shared().fail_writes_with(Some(Status::InternalFailure));
        }
        let ex = send(&mut vm, chat(Some("alice")));
        assert_eq!(ex.status, 503, "{}", ex.body_text());
        assert!(!ex.reached_upstream);
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        assert_eq!(ex.header("retry-after").as_deref(), Some("1"));
        assert_eq!(ex.header_all("content-type"), ["application/json"]);
        let body: serde_json::Value = serde_json::from_slice(&ex.body).expect("a JSON body");
        assert_eq!(body["error"]["code"], "rate_limiter_unavailable");
        assert_eq!(body["error"]["type"], "server_error");
        assert_eq!(host.metric("tollgate_store_failures"), Some(1));

        // The store recovers, so does the filter.
        host.shared().fail_with(None);
        assert_allowed(&send(&mut vm, chat(Some("alice"))), "3", "2", "29.75s");
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Odd input

#[test]
fn odd_input_neither_traps_nor_escapes_counting() {
    let host = Host::new(SharedStore::envoy());
    host.clock().set_epoch_ms(T0);
    let mut vm = load(&host, &policy(r#"[{"window": "minute", "requests": 1000}]"#, "{}"));
    // Identity bytes that are not UTF-8: refused, never counted as the lossy copy other bytes
    // would share.
    let not_utf8 = [0xff, 0xfe, b'a', 0x80];
    for _ in 0..2 {
        let ex = send(&mut vm, chat(None).header("x-tollgate-user", not_utf8));
        assert_eq!((ex.status, ex.reached_upstream), (400, false), "{}", ex.body_text());
    }
    let mut check = |request: HttpRequest, remaining: &str| {
        let ex = send(&mut vm, request);
        assert_allowed(&ex, "1000", remaining, "29.75s");
    };
    // A 1 MiB identity, and 4 MiB of other headers.
    let huge = vec![b'u'; 1 << 20];
    check(chat(None).header("x-tollgate-user", &huge), "999");
    check(chat(None).header("x-tollgate-user", &huge).header("x-junk", vec![b'j'; 4 << 20]), "998");
    // Thousands of headers, duplicated identity headers (the first one counts, as in Envoy).
    let mut many = chat(Some("dave"));
    for i in 0..5_000 {
        many = many.header(&format!("x-h{i}"), "v");
    }
    check(many.header("x-tollgate-user", "eve"), "999");
    check(chat(Some("dave")), "998");
    // No source.address and no identity: everyone unidentified shares one bucket.
    check(chat(None).without_source_address(), "999");
    check(chat(None).without_source_address(), "998");
    // An address that is no address, and one with only a port: no client IP, so they count
    // with the unidentified.
    check(chat(None).from("not an address"), "997");
    check(chat(None).from(":443"), "996");
    // Control characters and NULs in the identity.
    check(chat(Some("a\0b\r\n")), "999");

    assert!(!vm.is_failed());
    assert_eq!(host.metric("tollgate_store_failures"), Some(0));
    assert_eq!(host.metric("tollgate_host_errors"), Some(0));
}

#[test]
fn the_filter_needs_only_the_env_functions_this_host_defines() {
    let imports = filter().imports();
    // `env` (Proxy-Wasm) and WASI's environment, which proxy-wasm hosts serve from the VM
    // configuration (Envoy: vm_config.environment_variables).
    let wasi_env = |name: &str| name == "environ_get" || name == "environ_sizes_get";
    assert!(
        imports.iter().all(|(module, name)| module == "env" || (module == "wasi_snapshot_preview1" && wasi_env(name))),
        "unexpected imports: {imports:?}"
    );
    assert!(filter().exports().iter().any(|e| e == "_initialize"));
    // Linking and configuring them all is what Vm::load does.
    let host = Host::new(SharedStore::envoy());
    load(&host, &policy("[]", "{}"));
}

// ---------------------------------------------------------------------------------------------
// The host itself

#[test]
fn shared_data_follows_envoy_semantics() {
    let store = SharedStore::envoy();
    // cas is ignored on an absent key; the global counter starts at 1.
    assert_eq!(store.set("vm", b"k", Some(b"1"), 77), Status::Ok);
    assert_eq!(store.get("vm", b"k"), Ok((b"1".to_vec(), 1)));
    assert_eq!(store.set("vm", b"k", Some(b"2"), 5), Status::CasMismatch);
    assert_eq!(store.set("vm", b"k", Some(b"2"), 1), Status::Ok);
    // cas 0 overwrites unconditionally; cas numbers are global, not per key.
    assert_eq!(store.set("vm", b"other", Some(b"x"), 0), Status::Ok);
    assert_eq!(store.set("vm", b"k", Some(b"3"), 0), Status::Ok);
    assert_eq!(store.get("vm", b"k"), Ok((b"3".to_vec(), 4)));
    assert_eq!(store.get("vm", b"other"), Ok((b"x".to_vec(), 3)));
    // Per VM id.
    assert_eq!(store.get("other-vm", b"k"), Err(Status::NotFound));
    // The counter wraps and skips 0.
    let store = SharedStore::envoy().with_next_cas(u32::MAX);
    assert_eq!(store.set("vm", b"a", Some(b""), 0), Status::Ok);
    assert_eq!(store.set("vm", b"b", Some(b""), 0), Status::Ok);
    assert_eq!(store.get("vm", b"a").unwrap().1, u32::MAX);
    assert_eq!(store.get("vm", b"b").unwrap().1, 1);
    // Injected failures.
    store.fail_reads_with(Some(Status::InternalFailure));
    assert_eq!(store.get("vm", b"a"), Err(Status::InternalFailure));
    assert_eq!(store.set("vm", b"a", Some(b""), 0), Status::Ok);
    store.fail_writes_with(Some(Status::InternalFailure));
    assert_eq!(store.set("vm", b"a", Some(b""), 0), Status::InternalFailure);
}

#[test]
fn shared_data_follows_ngx_semantics() {
    let store = SharedStore::ngx();
    // Absent means cas 0: any other cas is a mismatch, cas 0 creates.
    assert_eq!(store.set("vm", b"k", Some(b"1"), 5), Status::CasMismatch);
    assert_eq!(store.set("vm", b"k", Some(b"1"), 0), Status::Ok);
    assert_eq!(store.get("vm", b"k"), Ok((b"1".to_vec(), 1)));
    // cas 0 on an existing key is a mismatch; cas counts per key.
    assert_eq!(store.set("vm", b"k", Some(b"2"), 0), Status::CasMismatch);
    assert_eq!(store.set("vm", b"j", Some(b"x"), 0), Status::Ok);
    assert_eq!(store.set("vm", b"k", Some(b"2"), 1), Status::Ok);
    assert_eq!(store.get("vm", b"k"), Ok((b"2".to_vec(), 2)));
    assert_eq!(store.get("vm", b"j"), Ok((b"x".to_vec(), 1)));
    // A NULL value deletes.
    assert_eq!(store.set("vm", b"k", None, 2), Status::Ok);
    assert_eq!(store.get("vm", b"k"), Err(Status::NotFound));
}

/// Tiny hand-assembled guests for host behaviour `filter.wasm` does not reach.
mod guest {
    use tollgate_host_tests::host::FilterModule;
    use wasm_encoder::{
        CodeSection, ConstExpr, DataSection, EntityType, ExportKind, ExportSection, Function, FunctionSection,
        GlobalSection, GlobalType, ImportSection, Instruction, MemArg, MemorySection, MemoryType, Module, TypeSection,
        ValType,
    };

    pub use wasm_encoder::BlockType;
    pub use wasm_encoder::Instruction as I;

    // Host functions every guest imports; the position is the function index.
    pub const LOG: u32 = 0;
    pub const GET_BUFFER: u32 = 1;
    pub const SET_BUFFER: u32 = 2;
    pub const LOCAL_RESPONSE: u32 = 3;
    pub const DEFINE_METRIC: u32 = 4;
    pub const INCREMENT_METRIC: u32 = 5;
    pub const GET_PAIRS: u32 = 6;
    pub const REPLACE_HEADER: u32 = 7;

    fn imports() -> Vec<(&'static str, Vec<ValType>)> {
        use ValType::{I32, I64};
        vec![
            ("proxy_log", vec![I32; 3]),
            ("proxy_get_buffer_bytes", vec![I32; 5]),
            ("proxy_set_buffer_bytes", vec![I32; 5]),
            ("proxy_send_local_response", vec![I32; 8]),
            ("proxy_define_metric", vec![I32; 4]),
            ("proxy_increment_metric", vec![I32, I64]),
            ("proxy_get_header_map_pairs", vec![I32; 3]),
            ("proxy_replace_header_map_value", vec![I32; 5]),
        ]
    }

    /// An exported function taking `params` i32s and returning an i32 when `result` is set.
    pub struct Func {
        pub export: &'static str,
        pub params: usize,
        pub result: bool,
        pub body: Vec<Instruction<'static>>,
    }

    pub fn func(export: &'static str, params: usize, result: bool, body: Vec<Instruction<'static>>) -> Func {
        Func { export, params, result, body }
    }

    /// `i32.load` from a constant address.
    pub fn load(addr: i32) -> [Instruction<'static>; 2] {
        [I::I32Const(addr), I::I32Load(MemArg { offset: 0, align: 2, memory_index: 0 })]
    }

    /// A module with memory, a bump `malloc`, the ABI marker, default callbacks (overridable),
    /// the given data segments, and one exported mutable i32 global per name (global index
    /// 1 + position): counters (names starting with `calls`) start at 0, results at -1 so that
    /// "never set" shows.
    pub fn build(name: &str, globals: &[&str], data: &[(u32, Vec<u8>)], mut funcs: Vec<Func>) -> FilterModule {
        let defaults = [
            func("malloc", 1, true, vec![I::GlobalGet(0), I::GlobalGet(0), I::LocalGet(0), I::I32Add, I::GlobalSet(0)]),
            func("_initialize", 0, false, vec![]),
            func("proxy_abi_version_0_2_1", 0, false, vec![]),
            func("proxy_on_context_create", 2, false, vec![]),
            func("proxy_on_vm_start", 2, true, vec![I::I32Const(1)]),
            func("proxy_on_configure", 2, true, vec![I::I32Const(1)]),
            func("proxy_on_done", 1, true, vec![I::I32Const(1)]),
        ];
        for d in defaults {
            if !funcs.iter().any(|f| f.export == d.export) {
                funcs.push(d);
            }
        }
        let (mut types, mut import_section, mut functions, mut exports, mut code) = (
            TypeSection::new(),
            ImportSection::new(),
            FunctionSection::new(),
            ExportSection::new(),
            CodeSection::new(),
        );
        let imports = imports();
        for (i, (name, params)) in imports.iter().enumerate() {
            types.ty().function(params.clone(), [ValType::I32]);
            import_section.import("env", name, EntityType::Function(i as u32));
        }
        for (i, f) in funcs.iter().enumerate() {
            let index = (imports.len() + i) as u32;
            let results: &[ValType] = if f.result { &[ValType::I32] } else { &[] };
            types.ty().function(vec![ValType::I32; f.params], results.iter().copied());
            functions.function(index);
            exports.export(f.export, ExportKind::Func, index);
            let mut body = Function::new(Vec::<(u32, ValType)>::new());
            for instruction in &f.body {
                body.instruction(instruction);
            }
            body.instruction(&I::End);
            code.function(&body);
        }
        let mut memory = MemorySection::new();
        memory.memory(MemoryType { minimum: 2, maximum: None, memory64: false, shared: false, page_size_log2: None });
        exports.export("memory", ExportKind::Memory, 0);
        let mut global_section = GlobalSection::new();
        let mutable = GlobalType { val_type: ValType::I32, mutable: true, shared: false };
        global_section.global(mutable, &ConstExpr::i32_const(16 * 1024)); // the heap pointer
        for (i, name) in globals.iter().enumerate() {
            let initial = if name.starts_with("calls") { 0 } else { -1 };
            global_section.global(mutable, &ConstExpr::i32_const(initial));
            exports.export(name, ExportKind::Global, 1 + i as u32);
        }
        let mut data_section = DataSection::new();
        for (offset, bytes) in data {
            data_section.active(0, &ConstExpr::i32_const(*offset as i32), bytes.iter().copied());
        }
        let mut module = Module::new();
        module
            .section(&types)
            .section(&import_section)
            .section(&functions)
            .section(&memory)
            .section(&global_section)
            .section(&exports)
            .section(&code)
            .section(&data_section);
        FilterModule::from_bytes(name, &module.finish()).unwrap_or_else(|e| panic!("{e}"))
    }
}

use guest::{func, BlockType, I};

#[test]
fn paused_request_bodies_are_buffered_and_buffer_edits_follow_envoy() {
    // Globals.
    const CALLS: u32 = 1;
    const LAST_SIZE: u32 = 2;
    const READ_STATUS: u32 = 3;
    const READ_SIZE: u32 = 4;
    const MIDDLE_EDIT: u32 = 5;
    const PREPEND: u32 = 6;
    const APPEND: u32 = 7;
    const REPLACE: u32 = 8;
    let set_buffer = |buffer: i32, start: i32, length: i32, data: i32, status: u32| {
        vec![
            I::I32Const(buffer),
            I::I32Const(start),
            I::I32Const(length),
            I::I32Const(data),
            I::I32Const(1),
            I::Call(guest::SET_BUFFER),
            I::GlobalSet(status),
        ]
    };
    let mut on_request_body = vec![
        I::GlobalGet(CALLS),
        I::I32Const(1),
        I::I32Add,
        I::GlobalSet(CALLS),
        I::LocalGet(1),
        I::GlobalSet(LAST_SIZE),
        // Not the end yet: pause, i.e. buffer.
        I::LocalGet(2),
        I::I32Eqz,
        I::If(BlockType::Empty),
        I::I32Const(1),
        I::Return,
        I::End,
        // Read the whole buffer.
        I::I32Const(0),
        I::I32Const(0),
        I::LocalGet(1),
        I::I32Const(200),
        I::I32Const(204),
        I::Call(guest::GET_BUFFER),
        I::GlobalSet(READ_STATUS),
    ];
    on_request_body.extend(guest::load(204));
    on_request_body.push(I::GlobalSet(READ_SIZE));
    on_request_body.extend(set_buffer(0, 1, 1, 102, MIDDLE_EDIT)); // an edit inside: refused
    on_request_body.extend(set_buffer(0, 0, 0, 100, PREPEND)); // (0, 0): prepend "<"
    on_request_body.extend(set_buffer(0, -1, 0, 101, APPEND)); // start >= len: append ">"
    on_request_body.push(I::I32Const(0));
    let mut on_response_body = vec![];
    on_response_body.extend(set_buffer(1, 0, 1 << 20, 102, REPLACE)); // (0, >= len): replace all
    on_response_body.push(I::I32Const(0));

    let module = guest::build(
        "buffer-guest",
        &["calls", "last_size", "read_status", "read_size", "middle_edit", "prepend", "append", "replace"],
        &[(100, b"<".to_vec()), (101, b">".to_vec()), (102, b"=".to_vec())],
        vec![
            func("proxy_on_request_body", 3, true, on_request_body),
            func("proxy_on_response_body", 3, true, on_response_body),
        ],
    );
    let host = Host::new(SharedStore::envoy());
    let mut vm = Vm::load(&host, &module, b"").unwrap();
    vm.set_upstream(|_| UpstreamResponse::new(200).body("from upstream"));
    let ex = send(&mut vm, HttpRequest::post("/").body_chunks(["hello ", "wide ", "world"]));

    assert_eq!(vm.global_i32("calls"), Some(3));
    assert_eq!(vm.global_i32("last_size"), Some(16), "the last call sees the whole buffered body");
    assert_eq!((vm.global_i32("read_status"), vm.global_i32("read_size")), (Some(0), Some(16)));
    assert_eq!(vm.global_i32("middle_edit"), Some(Status::BadArgument as i32));
    assert_eq!((vm.global_i32("prepend"), vm.global_i32("append")), (Some(0), Some(0)));
    assert_eq!(ex.upstream_request.as_ref().unwrap().body, b"<hello wide world>");
    assert_eq!(vm.global_i32("replace"), Some(0));
    assert_eq!(ex.body, b"=");
}

#[test]
fn a_local_reply_takes_effect_after_the_callback_even_if_it_continues() {
    const LOCAL: u32 = 1;
    const AFTER: u32 = 2;
    const PAIRS_STATUS: u32 = 3;
    const PAIRS_SIZE: u32 = 4;
    const RESPONSE_CALLS: u32 = 5;
    const RESPONSE_COUNT: u32 = 6;
    let reply_headers = encode_pairs(&[("X-Reason", "test")]);
    let mut on_request_headers = vec![
        I::I32Const(403),
        I::I32Const(0),
        I::I32Const(0),
        I::I32Const(300),
        I::I32Const(6),
        I::I32Const(400),
        I::I32Const(reply_headers.len() as i32),
        I::I32Const(-1),
        I::Call(guest::LOCAL_RESPONSE),
        I::GlobalSet(LOCAL),
        // The callback goes on: the request headers are still there to change.
        I::I32Const(0),
        I::I32Const(500),
        I::I32Const(7),
        I::I32Const(510),
        I::I32Const(1),
        I::Call(guest::REPLACE_HEADER),
        I::GlobalSet(AFTER),
        I::I32Const(0),
        I::I32Const(200),
        I::I32Const(204),
        I::Call(guest::GET_PAIRS),
        I::GlobalSet(PAIRS_STATUS),
    ];
    on_request_headers.extend(guest::load(204));
    on_request_headers.extend([I::GlobalSet(PAIRS_SIZE), I::I32Const(0)]); // Continue
    let on_response_headers = vec![
        I::GlobalGet(RESPONSE_CALLS),
        I::I32Const(1),
        I::I32Add,
        I::GlobalSet(RESPONSE_CALLS),
        I::LocalGet(1),
        I::GlobalSet(RESPONSE_COUNT),
        I::I32Const(0),
    ];
    let module = guest::build(
        "local-reply-guest",
        &["local", "after", "pairs_status", "pairs_size", "calls_response", "response_count"],
        &[(300, b"denied".to_vec()), (400, reply_headers), (500, b"x-after".to_vec()), (510, b"1".to_vec())],
        vec![
            func("proxy_on_request_headers", 3, true, on_request_headers),
            func("proxy_on_response_headers", 3, true, on_response_headers),
        ],
    );
    let host = Host::new(SharedStore::envoy());
    let mut vm = Vm::load(&host, &module, b"").unwrap();
    let called = Arc::new(AtomicUsize::new(0));
    let upstream_calls = called.clone();
    vm.set_upstream(move |_| {
        upstream_calls.fetch_add(1, Ordering::SeqCst);
        UpstreamResponse::new(200)
    });
    let request = HttpRequest::get("/x");
    let mut expected_headers = request.headers.clone();
    expected_headers.push(("x-after".into(), b"1".to_vec()));
    let ex = send(&mut vm, request);

    assert_eq!(called.load(Ordering::SeqCst), 0, "the upstream must not be called");
    assert!(!ex.reached_upstream);
    assert_eq!(ex.status, 403);
    assert_eq!(ex.local_reply.as_ref().map(|r| r.status), Some(403));
    assert_eq!(ex.header("x-reason").as_deref(), Some("test"), "header names are lower-cased");
    assert_eq!(ex.header("content-type").as_deref(), Some("text/plain"));
    assert_eq!(ex.header("content-length").as_deref(), Some("6"));
    assert_eq!(ex.body, b"denied");
    assert_eq!((vm.global_i32("local"), vm.global_i32("after")), (Some(0), Some(0)));
    assert_eq!(vm.global_i32("pairs_status"), Some(0));
    assert_eq!(vm.global_i32("pairs_size"), Some(encode_pairs(&expected_headers).len() as i32));
    // Envoy encodes the local reply through the filter chain: the filter sees it.
    assert_eq!(vm.global_i32("calls_response"), Some(1));
    assert_eq!(vm.global_i32("response_count"), Some(4)); // :status, x-reason, content-length, content-type
}

#[test]
fn a_trapping_guest_fails_the_request_and_the_vm_with_a_clear_message() {
    let panic_message = b"panicked at src/lib.rs:1:1:\nboom".to_vec();
    let on_request_headers = vec![
        I::I32Const(5),
        I::I32Const(600),
        I::I32Const(panic_message.len() as i32),
        I::Call(guest::LOG),
        I::Drop,
        I::Unreachable,
    ];
    let module = guest::build(
        "trap-guest",
        &[],
        &[(600, panic_message)],
        vec![func("proxy_on_request_headers", 3, true, on_request_headers)],
    );
    let host = Host::new(SharedStore::envoy());
    let mut vm = Vm::load(&host, &module, b"").unwrap();
    match vm.request(HttpRequest::get("/")) {
        Err(e @ HostError::Trap { callback: "proxy_on_request_headers", .. }) => {
            let text = e.to_string();
            assert!(text.contains("unreachable"), "{text}");
            assert!(text.contains("boom"), "the guest's panic message must be in the error: {text}");
        }
        other => panic!("expected a trap, got {other:?}"),
    }
    assert!(vm.is_failed());
    assert!(matches!(vm.request(HttpRequest::get("/")), Err(HostError::VmFailed { .. })));
}

#[test]
fn counters_only_go_up_and_metrics_are_readable_by_name() {
    const ZERO: u32 = 1;
    const NEGATIVE: u32 = 2;
    const POSITIVE: u32 = 3;
    const GAUGE: u32 = 4;
    const UNKNOWN: u32 = 5;
    const BAD_TYPE: u32 = 6;
    const COUNTER_ID: u32 = 7;
    let define = |kind: i32, name: i32, id_at: i32| {
        [I::I32Const(kind), I::I32Const(name), I::I32Const(1), I::I32Const(id_at), I::Call(guest::DEFINE_METRIC)]
    };
    let increment = |id_at: i32, offset: i64, status: u32| {
        let mut v = guest::load(id_at).to_vec();
        v.extend([I::I64Const(offset), I::Call(guest::INCREMENT_METRIC), I::GlobalSet(status)]);
        v
    };
    let mut on_configure = vec![];
    on_configure.extend(define(0, 700, 208));
    on_configure.push(I::Drop);
    on_configure.extend(define(1, 701, 212));
    on_configure.push(I::Drop);
    on_configure.extend(increment(208, 0, ZERO));
    on_configure.extend(increment(208, -1, NEGATIVE));
    on_configure.extend(increment(208, 5, POSITIVE));
    on_configure.extend(increment(212, -3, GAUGE));
    on_configure.extend([I::I32Const(4000), I::I64Const(1), I::Call(guest::INCREMENT_METRIC), I::GlobalSet(UNKNOWN)]);
    on_configure.extend(define(7, 702, 216));
    on_configure.push(I::GlobalSet(BAD_TYPE));
    on_configure.extend(guest::load(208));
    on_configure.extend([I::GlobalSet(COUNTER_ID), I::I32Const(1)]);
    let module = guest::build(
        "metrics-guest",
        &["zero", "negative", "positive", "gauge", "unknown", "bad_type", "counter_id"],
        &[(700, b"c".to_vec()), (701, b"g".to_vec()), (702, b"x".to_vec())],
        vec![func("proxy_on_configure", 2, true, on_configure)],
    );
    let host = Host::new(SharedStore::envoy());
    let mut vm = Vm::load(&host, &module, b"").unwrap();
    let bad = Some(Status::BadArgument as i32);
    assert_eq!((vm.global_i32("zero"), vm.global_i32("negative")), (bad, bad), "a counter increment needs offset > 0");
    assert_eq!((vm.global_i32("positive"), vm.global_i32("gauge")), (Some(0), Some(0)));
    assert_eq!(vm.global_i32("unknown"), Some(Status::NotFound as i32));
    assert_eq!(vm.global_i32("bad_type"), bad);
    assert_eq!(vm.global_i32("counter_id"), Some(4), "Envoy's first counter id");
    assert_eq!((host.metric("c"), host.metric("g")), (Some(5), Some(-3)));
}


// ---------------------------------------------------------------------------------------------
// Hosts that cannot hold request headers while the body is read

/// ngx_wasm_module never resumes a pause from the request headers: the filter must not pause
/// there. It detects the host at configure time, admits a chat request when nginx delivers its
/// body (once, whole, before proxying) and rewrites the request then; a chat request that can
/// have no body is refused at once instead of going upstream unadmitted.
#[test]
fn on_ngx_wasm_module_no_chat_request_hangs_and_every_one_is_admitted() {
    let host = Host::with_flavour(SharedStore::ngx(), Flavour::Ngx);
    host.clock().set_epoch_ms(T0);
    let mut vm = load(&host, &policy(r#"[{"window": "minute", "requests": 2}]"#, "{}"));
    assert_eq!(host.logs_containing("on ngx_wasm_module").len(), 1, "{:?}", host.logs());
    let calls = Arc::new(AtomicUsize::new(0));
    vm.set_upstream(openai_like(calls.clone()));
    let with_length = |r: HttpRequest| {
        let len = r.body.iter().map(Vec::len).sum::<usize>();
        r.header("content-length", len.to_string())
    };
    for remaining in ["1", "0"] {
        let ex = vm.request(with_length(chat(Some("nina")))).unwrap_or_else(|e| panic!("the request hung or failed: {e}"));
        assert_eq!(ex.status, 200, "{}", ex.body_text());
        assert_eq!(ex.header("x-ratelimit-remaining-requests").as_deref(), Some(remaining));
    }
    let ex = send(&mut vm, with_length(chat(Some("nina"))));
    assert_eq!(ex.status, 429, "counted exactly: {}", ex.body_text());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    // No body at all: nginx calls no body hook; the filter answers rather than let it through.
    let ex = send(&mut vm, HttpRequest::post("/v1/chat/completions").header("x-tollgate-user", "omar").header("content-length", "0"));
    assert_eq!(ex.status, 400, "{}", ex.body_text());
    assert!(!ex.reached_upstream);
    // The same filter on Envoy's semantics pauses at the headers and says nothing of nginx.
    let envoy = Host::new(SharedStore::envoy());
    load(&envoy, &policy("[]", "{}"));
    assert!(envoy.logs_containing("ngx_wasm_module").is_empty());
}

/// Envoy without `allow_on_headers_stop_iteration` (an Istio `WasmPlugin` cannot set it) never
/// delivers the body to a filter holding the headers. The request must not hang: the filter's
/// watchdog answers it with a 500 naming the flag, once `WATCHDOG_MS` has passed with no body;
/// nothing was counted or sent upstream, and the log says what to fix, once.
#[test]
fn without_header_stop_a_chat_request_is_answered_by_the_watchdog_not_hung() {
    let host = Host::with_flavour(SharedStore::envoy(), Flavour::EnvoyWithoutHeaderStop);
    host.clock().set_epoch_ms(T0);
    let mut vm = load(&host, &policy(r#"[{"window": "minute", "requests": 5}]"#, "{}"));
    assert_eq!(vm.tick_period_ms(), 1000, "the watchdog ticks while nothing proved bodies arrive");
    let calls = Arc::new(AtomicUsize::new(0));
    vm.set_upstream(openai_like(calls.clone()));
    for _ in 0..2 {
        let started = host.clock().now_ms();
        let ex = vm.request(chat(Some("ivan"))).unwrap_or_else(|e| panic!("the request hung: {e}"));
        let waited = host.clock().now_ms() - started;
        assert_eq!(ex.status, 500, "{}", ex.body_text());
        let body: serde_json::Value = serde_json::from_slice(&ex.body).unwrap();
        assert_eq!(body["error"]["code"], "gateway_misconfigured");
        assert!(body["error"]["message"].as_str().unwrap().contains("allow_on_headers_stop_iteration"));
        assert!((5_000..=6_000).contains(&waited), "answered after {waited} ms");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 0, "nothing went upstream");
    assert_eq!(host.metric("tollgate_body_never_came"), Some(2));
    assert_eq!(host.metric("tollgate_requests_allowed"), Some(0), "nothing was admitted");
    assert_eq!(host.logs_containing("allow_on_headers_stop_iteration: true").len(), 1, "said once: {:?}", host.logs());
    // Requests without a body are answered from their headers as usual.
    let ex = send(&mut vm, HttpRequest::get("/v1/tollgate/usage").header("x-tollgate-user", "ivan"));
    assert_eq!(ex.status, 200, "{}", ex.body_text());
}

/// A clock that fails between a request's admission and its settlement never loses counts:
/// the settlement runs at the last time the request saw (its admission), never at time 0,
/// which would prune every live count on the key as long expired.
#[test]
fn a_clock_that_fails_after_admission_loses_no_count() {
    let host = Host::new(SharedStore::envoy());
    host.clock().set_epoch_ms(T0);
    let mut vm = load(&host, &policy(r#"[{"window": "day", "requests": 10}, {"window": "day", "total_tokens": 100000}, {"concurrent": 3}]"#, "{}"));
    for remaining in ["9", "8", "7"] {
        assert_allowed(&send(&mut vm, chat(Some("cleo"))), "10", remaining, "10h14m29.75s");
    }
    let clock = host.clock().clone();
    vm.set_upstream(move |_| {
        // The host's clock fails while the provider answers: settlement cannot read it.
        clock.break_it();
        UpstreamResponse::new(200).header("content-type", "application/json").body(
            r#"{"id":"c","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":6,"total_tokens":11}}"#,
        )
    });
    let ex = send(&mut vm, chat(Some("cleo")));
    assert_eq!(ex.status, 200, "{}", ex.body_text());
    host.clock().set_epoch_ms(T0 + 1_000);
    vm.set_upstream(openai_like(Arc::new(AtomicUsize::new(0))));
    let usage = send(&mut vm, HttpRequest::get("/v1/tollgate/usage").header("x-tollgate-user", "cleo"));
    let v: serde_json::Value = serde_json::from_slice(&usage.body).unwrap();
    let used = |metric: &str| v["limits"].as_array().unwrap().iter().find(|l| l["metric"] == metric).unwrap()["used"].as_u64().unwrap();
    assert_eq!(used("requests"), 4, "{v}");
    assert!(used("total_tokens") >= 11, "{v}");
    assert_eq!(used("concurrent"), 0, "the lease is back: {v}");
}

/// Tollgate's own log lines carry no identity: not a JWT (good or refused), a signed token, an
/// API key, a header identity, a `user` field, nor a secret — whatever the request's fate
/// (served, 401, 429). (Envoy's own debug logging prints request headers: docs/hosts.md.)
#[test]
fn log_lines_carry_no_identity_token_or_key() {
    use tollgate_host_tests::tokens;
    let now_s = 1_767_225_600;
    let jwks = tokens::jwks();
    let config = format!(
        r#"{{"identity": {{"sources": [
              {{"jwt": {{"issuer": "{iss}", "audiences": ["{aud}"], "jwks": {jwks}, "tier_claim": ["plan", "tier"]}}}},
              {{"signed_header": "x-user-token", "secret": "TOLLGATE_IDENTITY_SECRET"}},
              {{"api_key_header": "x-api-key"}}, {{"header": "x-user"}}, {{"user_field": true}}, {{"client_ip": {{}}}}]}},
            "tier": {{"default": "free"}},
            "tiers": {{"free": {{"limits": [{{"window": "day", "requests": 3}}]}}, "pro": {{"limits": [{{"window": "day", "requests": 3}}]}}}}}}"#,
        iss = tokens::ISSUER,
        aud = tokens::AUDIENCE,
    );
    let host = Host::new(SharedStore::envoy());
    host.clock().set_epoch_ms(now_s * 1000);
    let mut vm = Vm::load_with_env(&host, filter(), config.as_bytes(), &[("TOLLGATE_IDENTITY_SECRET", "s3cret-canary")]).unwrap();
    vm.set_upstream(openai_like(Arc::new(AtomicUsize::new(0))));
    let good = tokens::rs256(&tokens::claims("canary-sub", "pro", now_s), false);
    let mut expired_claims = tokens::claims("canary-sub-2", "pro", now_s);
    expired_claims["exp"] = serde_json::json!(now_s - 3600);
    let expired = tokens::rs256(&expired_claims, false);
    let forged = "canary-signed.1767229200.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    let body = |user: &str| format!(r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}],"user":"{user}"}}"#);
    let requests = [
        HttpRequest::post("/v1/chat/completions").header("authorization", format!("Bearer {good}")).body(body("x")),
        HttpRequest::post("/v1/chat/completions").header("authorization", format!("Bearer {expired}")).body(body("x")),
        HttpRequest::post("/v1/chat/completions").header("x-user-token", forged).body(body("x")),
        HttpRequest::post("/v1/chat/completions").header("x-api-key", "sk-canary-key").body(body("x")),
        HttpRequest::post("/v1/chat/completions").header("x-user", "canary-user").body(body("x")),
        HttpRequest::post("/v1/chat/completions").body(body("canary-field")),
    ];
    let mut statuses = Vec::new();
    for _ in 0..4 {
        for r in requests.iter() {
            statuses.push(send(&mut vm, r.clone()).status);
        }
    }
    assert!(statuses.contains(&200) && statuses.contains(&401) && statuses.contains(&429), "{statuses:?}");
    let logs = format!("{:?}", host.logs());
    for canary in [good.as_str(), expired.as_str(), forged, "sk-canary-key", "canary-user", "canary-field", "canary-sub", "s3cret-canary"] {
        assert!(!logs.contains(canary), "{canary} in the log: {logs}");
    }
}

/// The filter carries no time zone database (a sixth of its size): it knows the IANA zones by
/// their current rules (core/build.rs), a dozen with a change already scheduled by their TZif
/// data, and takes POSIX TZ strings. Its day windows end at the zone's next local midnight, as
/// the whole database says — on ordinary days and on the 23-hour day clocks go forward.
#[test]
fn time_zones_without_the_database_follow_the_local_calendar() {
    use jiff::{tz::TimeZone, Timestamp};
    // 2026-12-05T12:00Z; 2027-03-28T10:00Z (Europe's clocks went forward that night);
    // 2027-11-07T12:00Z (North America's clocks went back that night).
    let instants = [1_796_472_000_000u64, 1_806_228_000_000, 1_825_502_400_000];
    let zones = [
        ("Europe/Berlin", "Europe/Berlin"),
        ("europe/berlin", "Europe/Berlin"),
        ("Asia/Kolkata", "Asia/Kolkata"),
        ("America/New_York", "America/New_York"),
        ("Australia/Lord_Howe", "Australia/Lord_Howe"),
        // Rules alone do not do for these (a change is scheduled): the TZif data is kept.
        ("America/Vancouver", "America/Vancouver"),
        ("Africa/Casablanca", "Africa/Casablanca"),
        ("CET-1CEST,M3.5.0,M10.5.0/3", "Europe/Berlin"),
        ("UTC", "UTC"),
    ];
    for (name, reference) in zones {
        let tz = TimeZone::get(reference).unwrap();
        for now in instants {
            let host = Host::new(SharedStore::envoy());
            host.clock().set_epoch_ms(now);
            let config = format!(
                r#"{{"time_zone": {name:?}, "identity": {{"header": "x-tollgate-user"}}, "tier": {{"default": "default"}},
                    "tiers": {{"default": {{"limits": [{{"window": "day", "requests": 5}}]}}}}}}"#
            );
            let mut vm = load(&host, &config);
            let ex = send(&mut vm, chat(Some("alice")));
            let local = Timestamp::from_millisecond(now as i64).unwrap().to_zoned(tz.clone());
            let end = local.date().tomorrow().unwrap().to_zoned(tz.clone()).unwrap().timestamp().as_millisecond() as u64;
            let reset = tollgate_host_tests::checks::duration_ms(&ex.header("x-ratelimit-reset-requests").expect("reset header"));
            assert_eq!(reset, end - now, "{name} at {now}: the day ends at {end}");
        }
    }
    // An unknown zone is refused with its name, as in every build.
    let host = Host::new(SharedStore::envoy());
    let bad = r#"{"time_zone": "Mars/Olympus", "identity": {"header": "x-tollgate-user"}, "tier": {"default": "d"}, "tiers": {"d": {"limits": []}}}"#;
    let e = Vm::load(&host, filter(), bad.as_bytes()).err().expect("Mars/Olympus is refused").to_string();
    assert!(e.contains(r#"unknown time zone \"Mars/Olympus\""#) || e.contains(r#"unknown time zone "Mars/Olympus""#), "{e}");
}

/// A request body near the listener's 1 MiB limit leaves the VM's linear memory (which never
/// shrinks) at about twice the body passed through (the body and its parse, then the upstream
/// body written where the request's bytes were freed) and three times translated (the Anthropic
/// request's own copy of the text), not at the 4–5× a doubling output buffer reached.
#[test]
fn a_large_body_raises_linear_memory_by_about_twice_its_size() {
    use tollgate_host_tests::bench::{chat_body, GATEWAY_POLICY};
    let words = "Summarise the following notes for a busy reader in three short bullet points. ";
    for (model, most, answer) in [
        (
            "gpt-4o-mini",
            2.5,
            r#"{"id":"c","object":"chat.completion","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":190,"completion_tokens":4,"total_tokens":194}}"#,
        ),
        (
            "claude-sonnet",
            3.5,
            r#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"text","text":"ok"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":190,"output_tokens":4}}"#,
        ),
    ] {
        let host = Host::new(SharedStore::envoy());
        let mut vm = load(&host, GATEWAY_POLICY);
        vm.set_upstream(move |_| UpstreamResponse::new(200).header("content-type", "application/json").body(answer));
        let request = |body: String| HttpRequest::post("/v1/chat/completions").header("x-tollgate-user", "u").body(body);
        for _ in 0..20 {
            assert_eq!(send(&mut vm, request(chat_body(model, false))).status, 200);
        }
        let big = serde_json::json!({ "model": model, "max_tokens": 256, "messages": [{ "role": "user", "content": words.repeat(12_500) }] }).to_string();
        let before = vm.memory_bytes();
        let ex = send(&mut vm, request(big.clone()));
        assert_eq!(ex.status, 200, "{model}: {}", String::from_utf8_lossy(&ex.body));
        let upstream = ex.upstream_request.as_ref().map_or(0, |r| r.body.len());
        assert!(upstream > big.len() * 9 / 10, "{model}: the provider got {upstream} bytes of a {}-byte request", big.len());
        let grown = vm.memory_bytes() - before;
        assert!(
            grown as f64 <= big.len() as f64 * most,
            "{model}: linear memory grew by {grown} bytes ({:.1}× the {}-byte body)",
            grown as f64 / big.len() as f64,
            big.len()
        );
    }
}
