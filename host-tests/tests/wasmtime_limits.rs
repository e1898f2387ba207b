//! Every limit kind under contention, in the release `filter.wasm` on the wasmtime host with
//! Envoy's shared-data semantics: many VMs on their own threads, one store.
//!
//! - tokens and cost: reserved at admission, settled to the provider's usage — no update lost
//!   (the stored counters equal exactly `allowed × usage`), and the overshoot past the limit is
//!   bounded by the reservation error of the requests in flight (0 when the provider never
//!   reports more than was reserved);
//! - concurrency: never more leases than the limit, and every lease comes back — when the
//!   answer completes, when the upstream resets mid-answer, when the client goes away.
//!
//! Needs `bash scripts/build-wasm.sh` first (the tests check the build is not stale).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Condvar, Mutex};

use tollgate_host_tests::host::{CasSemantics, FilterModule, Host, HttpRequest, SharedStore, UpstreamResponse, Vm};

/// 2024-02-29T12:00:00.000Z: far from any day boundary.
const MIDDAY: u64 = 1_709_208_000_000;
const THREADS: usize = 4;

/// The prompt estimate of [`chat`]'s body (core/src/guard.rs: 4 per message + ceil(2 bytes / 4)
/// + 3 priming = 8, raised to the floor of 16) plus its `max_tokens` of 10.
const RESERVED_TOKENS: u64 = 26;
/// Prices: $1 per million input tokens, $2 per million output tokens.
const PRICES: &str = r#""prices": {"m": {"input": 1, "output": 2}}"#;

fn load(host: &Host, config: &str) -> Vm {
    Vm::load(host, FilterModule::release_filter(), config.as_bytes()).unwrap_or_else(|e| panic!("{e}"))
}

fn chat(user: &str) -> HttpRequest {
    HttpRequest::post("/v1/chat/completions")
        .header("x-tollgate-user", user)
        .body(r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":10}"#)
}

/// A policy whose one tier has `limits`, with the model `m` served by an OpenAI-kind provider
/// (so answers are read and settled).
fn policy(limits: &str) -> String {
    format!(
        r#"{{"identity": {{"header": "x-tollgate-user"}}, "tier": {{"default": "t"}},
            "store": {{"max_retries": 1000, "on_failure": "deny"}},
            "tiers": {{"t": {{"limits": {limits}}}}}, {PRICES},
            "providers": {{"p": {{"kind": "openai", "cluster": "p"}}}},
            "models": {{"m": {{"provider": "p", "model": "up"}}}}}}"#
    )
}

fn completion(prompt: u64, completion: u64) -> UpstreamResponse {
    UpstreamResponse::new(200).header("content-type", "application/json").body(format!(
        r#"{{"id":"c","object":"chat.completion","created":1,"model":"up","choices":[{{"index":0,"message":{{"role":"assistant","content":"ok"}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":{prompt},"completion_tokens":{completion},"total_tokens":{}}}}}"#,
        prompt + completion
    ))
}

/// Every calendar counter of every member under `tg2:i:` keys: `(metric id, count)`.
/// (core/src/limits/record.rs, format 2.)
fn stored_counters(host: &Host) -> Vec<(u8, u64)> {
    let mut out = vec![];
    for key in host.shared().keys(host.vm_id()).into_iter().filter(|k| k.starts_with(b"tg2:i:")) {
        let (r, _) = host.shared().peek(host.vm_id(), &key).unwrap();
        assert_eq!(r[0], 2, "record format");
        let members = u16::from_le_bytes([r[1], r[2]]);
        let mut at = 3;
        for _ in 0..members {
            let (nc, nr, nl) = (r[at + 8] as usize, r[at + 9] as usize, u16::from_le_bytes([r[at + 10], r[at + 11]]) as usize);
            at += 12;
            for c in r[at..at + nc * 15].chunks_exact(15) {
                out.push((c[0], u64::from_le_bytes(c[6..14].try_into().unwrap())));
            }
            at += nc * 15 + nr * 13 + nl * 16;
        }
    }
    out.sort();
    out
}

fn live_leases(host: &Host) -> usize {
    let mut n = 0;
    for key in host.shared().keys(host.vm_id()).into_iter().filter(|k| k.starts_with(b"tg2:")) {
        let (r, _) = host.shared().peek(host.vm_id(), &key).unwrap();
        let members = u16::from_le_bytes([r[1], r[2]]);
        let mut at = 3;
        for _ in 0..members {
            let (nc, nr, nl) = (r[at + 8] as usize, r[at + 9] as usize, u16::from_le_bytes([r[at + 10], r[at + 11]]) as usize);
            n += nl;
            at += 12 + nc * 15 + nr * 13 + nl * 16;
        }
    }
    n
}

/// `THREADS` VMs each sending `per_thread` requests for one identity, the upstream reporting
/// `usage`. Returns how many were allowed.
fn hammer(host: &Host, config: &str, per_thread: usize, usage: (u64, u64)) -> u64 {
    let vms: Vec<Vm> = (0..THREADS).map(|_| load(host, config)).collect();
    let start = Barrier::new(THREADS);
    std::thread::scope(|scope| {
        let handles: Vec<_> = vms
            .into_iter()
            .map(|mut vm| {
                let start = &start;
                vm.set_upstream(move |_| completion(usage.0, usage.1));
                scope.spawn(move || {
                    start.wait();
                    let mut allowed = 0;
                    for _ in 0..per_thread {
                        let ex = vm.request(chat("hammer")).unwrap_or_else(|e| panic!("{e}"));
                        match ex.status {
                            200 => allowed += 1,
                            429 => {}
                            other => panic!("unexpected {other}: {}", ex.body_text()),
                        }
                    }
                    allowed
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a VM thread panicked")).sum()
    })
}

#[test]
fn tokens_and_cost_lose_no_update_and_never_overshoot_when_usage_fits_the_reservation() {
    let host = Host::new(SharedStore::new(CasSemantics::Envoy));
    host.clock().set_epoch_ms(MIDDAY);
    // 17 tokens per answer: 1000 answers' worth; the cost limit never binds.
    let limit = 17_000;
    let config = policy(&format!(r#"[{{"window": "day", "total_tokens": {limit}}}, {{"window": "day", "cost_usd": 1}}]"#));

    // The reservation is what the estimator says (checked on one request by itself first).
    let mut vm = load(&host, &config);
    vm.set_upstream(|_| completion(9, 8));
    let ex = vm.request(chat("solo")).unwrap();
    assert_eq!(ex.status, 200, "{}", ex.body_text());
    assert_eq!(ex.header("x-ratelimit-limit-tokens").as_deref(), Some("17000"));
    assert_eq!(ex.header("x-ratelimit-remaining-tokens"), Some((limit - RESERVED_TOKENS).to_string()));

    let allowed = hammer(&host, &config, 400, (9, 8));
    let counters: Vec<(u8, u64)> = stored_counters(&host);
    // metric ids: 4 total tokens, 5 cost; two members (solo, hammer), each settled exactly.
    let tokens: Vec<u64> = counters.iter().filter(|c| c.0 == 4).map(|c| c.1).collect();
    let cost: Vec<u64> = counters.iter().filter(|c| c.0 == 5).map(|c| c.1).collect();
    let mut expected_tokens = vec![17, 17 * allowed];
    expected_tokens.sort();
    let mut expected_cost = vec![25, 25 * allowed];
    expected_cost.sort();
    assert_eq!(tokens, expected_tokens, "every answer's usage settled, none lost");
    assert_eq!(cost, expected_cost, "9 × $1 + 8 × $2 per million = 25 micro-dollars each");
    // No overshoot: a request is admitted only when its 26-token reservation fits, and settles
    // lower. Sequentially 999 fit (17 × 998 + 26 ≤ 17 000); reservations in flight on the other
    // threads may refuse up to THREADS − 1 of the last ones for good.
    assert!(17 * allowed <= limit, "overshoot: {allowed} answers");
    assert!((999 - (THREADS as u64 - 1)..=999).contains(&allowed), "allowed {allowed}");
    assert_eq!(host.metric("tollgate_store_failures"), Some(0));
    assert_eq!(host.metric("tollgate_settle_failures"), Some(0));
}

#[test]
fn token_overshoot_is_bounded_by_the_reservation_error_in_flight() {
    let host = Host::new(SharedStore::new(CasSemantics::Envoy));
    host.clock().set_epoch_ms(MIDDAY);
    // The provider reports 40 + 8 = 48 tokens: 22 more than the 26 reserved.
    let limit = 4_800;
    let config = policy(&format!(r#"[{{"window": "day", "total_tokens": {limit}}}]"#));
    let allowed = hammer(&host, &config, 200, (40, 8));
    let used: u64 = stored_counters(&host).iter().filter(|c| c.0 == 4).map(|c| c.1).sum();
    assert_eq!(used, 48 * allowed, "no update lost");
    let bound = limit + THREADS as u64 * (48 - RESERVED_TOKENS);
    assert!(used <= bound, "used {used} > limit {limit} + {THREADS} in flight × 22");
    assert!(used > limit - 48, "the limit was reached: {used}");
    eprintln!("overshoot {} tokens (bound {})", used.saturating_sub(limit), bound - limit);
}

#[test]
fn concurrency_never_exceeds_the_limit_and_every_lease_comes_back() {
    let host = Host::new(SharedStore::new(CasSemantics::Envoy));
    host.clock().set_epoch_ms(MIDDAY);
    let config = policy(r#"[{"concurrent": 3}]"#);
    const VMS: usize = 8;
    for round in 0..2 {
        // The upstream holds every admitted request until all VMs have had their answer.
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let upstream_now = Arc::new(AtomicUsize::new(0));
        let denied = Arc::new(AtomicUsize::new(0));
        let vms: Vec<Vm> = (0..VMS)
            .map(|_| {
                let mut vm = load(&host, &config);
                let (gate, upstream_now) = (gate.clone(), upstream_now.clone());
                vm.set_upstream(move |_| {
                    upstream_now.fetch_add(1, Ordering::SeqCst);
                    let (lock, cv) = &*gate;
                    let mut open = lock.lock().unwrap();
                    while !*open {
                        open = cv.wait(open).unwrap();
                    }
                    completion(9, 8)
                });
                vm
            })
            .collect();
        let statuses: Vec<u16> = std::thread::scope(|scope| {
            let handles: Vec<_> = vms
                .into_iter()
                .map(|mut vm| {
                    let denied = denied.clone();
                    scope.spawn(move || {
                        let ex = vm.request(chat("crowd")).unwrap_or_else(|e| panic!("{e}"));
                        if ex.status == 429 {
                            denied.fetch_add(1, Ordering::SeqCst);
                        }
                        ex.status
                    })
                })
                .collect();
            // Wait until every VM is either upstream or refused, then look.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while upstream_now.load(Ordering::SeqCst) + denied.load(Ordering::SeqCst) < VMS {
                assert!(std::time::Instant::now() < deadline, "VMs stuck");
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            assert_eq!(upstream_now.load(Ordering::SeqCst), 3, "round {round}: exactly the limit in flight");
            assert_eq!(live_leases(&host), 3);
            let (lock, cv) = &*gate;
            *lock.lock().unwrap() = true;
            cv.notify_all();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 3, "round {round}: {statuses:?}");
        assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 5);
        assert_eq!(live_leases(&host), 0, "round {round}: every lease released on completion");
    }
}

#[test]
fn leases_come_back_when_the_upstream_resets_or_the_client_leaves() {
    let host = Host::new(SharedStore::new(CasSemantics::Envoy));
    host.clock().set_epoch_ms(MIDDAY);
    let config = policy(r#"[{"concurrent": 1}, {"window": "day", "total_tokens": 1000}]"#);
    let mut vm = load(&host, &config);
    // A stream cut after its first event (an upstream reset, or the client closing: either way
    // the filter sees no end of stream, then on_log).
    vm.set_upstream(|_| {
        UpstreamResponse::new(200)
            .header("content-type", "text/event-stream")
            .body("data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"up\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"o\"},\"finish_reason\":null}]}\n\n")
            .cut()
    });
    let stream = HttpRequest::post("/v1/chat/completions")
        .header("x-tollgate-user", "leaver")
        .body(r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":10,"stream":true}"#);
    for attempt in 0..3 {
        let ex = vm.request(stream.clone()).unwrap();
        assert!(ex.reset, "attempt {attempt}: the stream was cut");
        assert!(ex.reached_upstream, "attempt {attempt}: admitted (the previous lease came back)");
        assert_eq!(live_leases(&host), 0, "attempt {attempt}: lease released in on_log");
    }
    // No usage was reported for the cut streams: each keeps its 26-token reservation.
    let used: u64 = stored_counters(&host).iter().filter(|c| c.0 == 4).map(|c| c.1).sum();
    assert_eq!(used, 3 * RESERVED_TOKENS);
    // And a complete answer after them settles normally.
    vm.set_upstream(|_| completion(9, 8));
    assert_eq!(vm.request(chat("leaver")).unwrap().status, 200);
    let used: u64 = stored_counters(&host).iter().filter(|c| c.0 == 4).map(|c| c.1).sum();
    assert_eq!(used, 3 * RESERVED_TOKENS + 17);
    assert_eq!(live_leases(&host), 0);
}

/// Signed identity tokens: the secret comes from the VM's environment (Envoy:
/// `vm_config.environment_variables`), a valid token counts for its id, a forged one is 401.
#[test]
fn signed_identity_tokens_are_verified_with_the_secret_from_the_vm_environment() {
    // Tokens made with Python's hmac: HMAC-SHA256("s3cret-key-bytes", "<id>.1709300000"),
    // base64url without padding; 1709300000 is a day after MIDDAY.
    const ALICE: &str = "alice.1709300000.7vb5bD6bm1CUDG0EfB3TvqsYQfkMKWbARSS3LasCimY";
    // mallory's signature on alice's id: a forgery.
    const FORGED: &str = "alice.1709300000.3NpAYN61T6pTKiYSrX_P0y4kXcaYC098zSoLbu9QOG0";
    let config = r#"{"identity": {"sources": [{"signed_header": "x-user-token", "secret": "TOLLGATE_IDENTITY_SECRET"}, {"client_ip": {}}]},
        "tier": {"default": "t"}, "tiers": {"t": {"limits": [{"window": "day", "requests": 5}]}}}"#;
    let host = Host::new(SharedStore::new(CasSemantics::Envoy));
    host.clock().set_epoch_ms(MIDDAY);
    let send = |vm: &mut Vm, token: &str| {
        let ex = vm
            .request(HttpRequest::post("/v1/chat/completions").header("x-user-token", token).body(r#"{"model":"m","messages":[]}"#))
            .unwrap();
        (ex.status, ex.header("x-ratelimit-remaining-requests"), ex.upstream_request.map(|u| u.header("x-user-token").is_some()))
    };
    let mut vm = Vm::load_with_env(&host, FilterModule::release_filter(), config.as_bytes(), &[("TOLLGATE_IDENTITY_SECRET", "s3cret-key-bytes"), ("OTHER", "x")]).unwrap();
    assert_eq!(send(&mut vm, ALICE), (200, Some("4".to_owned()), Some(false)), "counted for alice; the token is not forwarded");
    assert_eq!(send(&mut vm, ALICE), (200, Some("3".to_owned()), Some(false)));
    let (status, _, upstream) = send(&mut vm, FORGED);
    assert_eq!((status, upstream), (401, None), "a forged token never reaches the provider");
    // Without the secret in the environment every token is refused, and the log says why once.
    let mut bare = Vm::load(&host, FilterModule::release_filter(), config.as_bytes()).unwrap();
    assert_eq!(send(&mut bare, ALICE).0, 401);
    assert_eq!(host.logs_containing("TOLLGATE_IDENTITY_SECRET is not in the VM environment").len(), 1);
    assert!(host.logs().iter().all(|l| !format!("{l:?}").contains("s3cret")), "the secret is never logged");
}

/// A smoothed rate (GCRA) under contention: with the clock still, exactly the burst is admitted
/// however the VMs interleave; one emission interval later, exactly one more.
#[test]
fn rate_limits_admit_exactly_the_burst_across_vms() {
    let host = Host::new(SharedStore::new(CasSemantics::Envoy));
    host.clock().set_epoch_ms(MIDDAY);
    // 600 a minute: one every 100 ms, at most 50 at once.
    let config = policy(r#"[{"rate": {"per": "minute", "burst": 50}, "requests": 600}]"#);
    let allowed = hammer(&host, &config, 100, (9, 8));
    assert_eq!(allowed, 50, "the burst, exactly");
    host.clock().advance_ms(100);
    let allowed = hammer(&host, &config, 10, (9, 8));
    assert_eq!(allowed, 1, "one emission interval later: one more");
    assert_eq!(host.metric("tollgate_store_failures"), Some(0));
}
