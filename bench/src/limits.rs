//! What admission and settlement cost, per request, with six active limits — natively (the
//! `bench-limits` binary) and compiled to wasm32 under wasmtime (this crate's cdylib, exports
//! [`guest`]'s `limits_*` functions) — and how much shared data a million anonymous identities
//! take ([`keyspace`]).
//!
//! The policy ([`POLICY_6`]): tier `free` with
//! - per identity: `total_tokens/day` (soft: warn at 80 %, notify at 80 %), `cost_usd/month`,
//!   `concurrent` 10;
//! - per client IP: `requests` 120 a minute as a smoothed rate (GCRA, burst 20);
//! - the tier together: `requests/minute`;
//! - global: `concurrent` 500.
//!
//! Six limits on four store keys (`tg2:i:<slot>`, `tg2:p:<slot>`, `tg2:t:free`, `tg2:g`), so
//! every kind of key and state the engine keeps (calendar counters, a GCRA rate, leases) is
//! read, decoded, changed, encoded and written on each request. Limits are sized so that every
//! request is admitted — this measures the path a served request takes; a refusal is an error
//! of the benchmark.
//!
//! A request is [`POLICY_6`]'s identity header `x-tollgate-user: user-<n>` from peer
//! `10.<n>`, the 312-byte chat body `inputs/chat_small.json`, settled with 350 input and 120
//! output tokens. The clock advances by the case's step per request (1 ms: 1 000 requests a
//! second over the pool; 1 s for the hot identity, within its per-IP rate). Before timing, every
//! identity of the pool makes one request (untimed), so records hold what they hold in steady
//! state.

use std::hint::black_box;

use tollgate_core::ending::Ending;
use tollgate_core::gate::{self, Facts, Gate};
use tollgate_core::identity::RequestFacts;
use tollgate_core::limits::engine::{Ticket, Who};
use tollgate_core::usage::Usage;
use tollgate_core::{MemoryStore, Policy};

use crate::timed;

/// The chat body every request sends.
pub const CHAT_SMALL: &[u8] = include_bytes!("../inputs/chat_small.json");

/// 2026-01-15T00:00:00Z: where every case's clock starts.
pub const T0_MS: u64 = 1_768_435_200_000;

/// The six-limit policy; `{slots}` is replaced by the case's `store.slots`.
pub const POLICY_6: &str = r#"{
  "time_zone": "UTC",
  "identity": {"sources": [{"header": "x-tollgate-user"}, {"client_ip": {"trusted_hops": 0}}]},
  "tier": {"header": "x-tollgate-tier", "default": "free"},
  "store": {"max_retries": 16, "on_failure": "allow", "slots": {slots}},
  "tiers": {
    "free": {
      "limits": [
        {"window": "day", "total_tokens": 100000000,
         "soft": [{"at": 80, "action": "warn"}, {"at": 80, "action": "notify"}]},
        {"window": "month", "cost_usd": 10000},
        {"concurrent": 10},
        {"per": "ip", "rate": {"per": "minute", "burst": 20}, "requests": 120},
        {"per": "tier", "window": "minute", "requests": 1000000}
      ],
      "guards": {"max_tokens": 2048, "default_max_tokens": 512, "max_messages": 64},
      "messages": {"upgrade_url": "https://example.com/upgrade", "body_object": true}
    }
  },
  "global": {"limits": [{"concurrent": 500}]},
  "prices": {"small": {"input": 0.15, "output": 0.6, "cached_input": 0.075}},
  "notify": {"url": "https://hooks.example.com/tollgate", "timeout_ms": 5000},
  "providers": {"openai": {"kind": "openai", "base_url": "https://api.openai.com"}},
  "models": {"small": {"provider": "openai", "model": "gpt-4o-mini"}}
}"#;

/// What a case times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitsOp {
    /// `gate::admit_chat` then `gate::finish`, one request at a time.
    AdmitFinish,
    /// `gate::admit_chat` alone (timed), [`BATCH`] requests at a time, settled outside the clock.
    Admit,
    /// `gate::finish` alone (timed), [`BATCH`] requests admitted outside the clock.
    Finish,
    /// `serde_json::from_slice::<Value>` of the body (a bare parse, nothing serialized).
    Baseline,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitsCase {
    pub name: &'static str,
    pub op: LimitsOp,
    /// Identities, round robin.
    pub pool: u32,
    /// `store.slots` (65 536 is the default).
    pub slots: u32,
    /// Clock advance per request.
    pub step_ms: u64,
}

/// Requests admitted (or settled) per clock reading in the split cases; below the identity's
/// concurrency limit so that even one hot identity is never refused.
pub const BATCH: u64 = 8;

/// Every case, in table order. The index is the case's id across the wasm boundary.
pub const LIMITS_CASES: &[LimitsCase] = &[
    LimitsCase {
        name: "admit + settle, 10 000 identities round robin",
        op: LimitsOp::AdmitFinish,
        pool: 10_000,
        slots: 65_536,
        step_ms: 1,
    },
    LimitsCase {
        name: "admit + settle, 16 384 identities on 1 024 slots (16 members a key)",
        op: LimitsOp::AdmitFinish,
        pool: 16_384,
        slots: 1_024,
        step_ms: 1,
    },
    LimitsCase { name: "admit + settle, one hot identity", op: LimitsOp::AdmitFinish, pool: 1, slots: 65_536, step_ms: 1_000 },
    LimitsCase { name: "admit only, 10 000 identities", op: LimitsOp::Admit, pool: 10_000, slots: 65_536, step_ms: 1 },
    LimitsCase { name: "settle only, 10 000 identities", op: LimitsOp::Finish, pool: 10_000, slots: 65_536, step_ms: 1 },
    LimitsCase { name: "baseline: serde_json parse of the body", op: LimitsOp::Baseline, pool: 1, slots: 65_536, step_ms: 1 },
];

fn no_secrets(_: &str) -> Option<Vec<u8>> {
    None
}

/// The usage every request settles with.
pub fn usage() -> Usage {
    Usage { input: Some(350), output: Some(120), ..Usage::default() }
}

/// A case's state: the policy, the store, the pool, the clock.
pub struct LimitsBench {
    op: LimitsOp,
    policy: Policy,
    store: MemoryStore,
    /// `x-tollgate-user` values.
    identities: Vec<String>,
    peers: Vec<String>,
    usage: Usage,
    step_ms: u64,
    now_ms: u64,
    /// Requests made so far (the next lease id is this + 1).
    made: u64,
}

/// The policy of a case.
pub fn policy(slots: u32) -> Result<Policy, String> {
    Policy::from_json(POLICY_6.replace("{slots}", &slots.to_string()).as_bytes()).map_err(|e| format!("policy: {e}"))
}

fn peer(n: u32) -> String {
    let [_, b, c, d] = n.to_be_bytes();
    format!("10.{b}.{c}.{d}")
}

impl LimitsBench {
    /// Builds `case`, warms every identity of its pool up with one request (untimed) and checks
    /// that requests are admitted; says what a request touches.
    pub fn prepare(case: &LimitsCase) -> Result<(LimitsBench, String), String> {
        let policy = policy(case.slots)?;
        let mut b = LimitsBench {
            op: case.op,
            policy,
            store: MemoryStore::new(),
            identities: (0..case.pool).map(|n| format!("user-{n:07}")).collect(),
            peers: (0..case.pool).map(peer).collect(),
            usage: usage(),
            step_ms: case.step_ms,
            now_ms: T0_MS,
            made: 0,
        };
        if case.op == LimitsOp::Baseline {
            let v: serde_json::Value = serde_json::from_slice(CHAT_SMALL).map_err(|e| format!("body: {e}"))?;
            return Ok((b, format!("{} B → {} top-level members", CHAT_SMALL.len(), v.as_object().map_or(0, |o| o.len()))));
        }
        let plans = {
            let id = b.identities[0].clone();
            let header = |name: &str| (name == "x-tollgate-user").then(|| id.clone());
            let facts = RequestFacts { header: &header, user_field: None, peer_address: Some(&b.peers[0]), now_ms: T0_MS, claim: &tollgate_core::identity::no_claims };
            let subject = b.policy.identity.resolve(&facts, &no_secrets).map_err(|e| format!("identity: {e:?}"))?;
            let who = Who { identity_key: subject.key, ip_key: subject.ip_key, tier: subject.tier };
            let plans = b.policy.limits.plans(&who);
            let keys: Vec<String> = plans.iter().map(|p| format!("{} ({} limits)", p.key, p.limits.len())).collect();
            keys.join(", ")
        };
        for _ in 0..case.pool {
            b.admit_settle()?;
        }
        let said = format!("{} identities warmed up, {} keys stored; a request touches {plans}", case.pool, b.store.len());
        Ok((b, said))
    }

    fn request(&mut self) -> (usize, u64, u64) {
        let i = (self.made % self.identities.len() as u64) as usize;
        self.made += 1;
        self.now_ms += self.step_ms;
        (i, self.made, self.now_ms)
    }

    /// One request admitted; `Err` when it was not.
    fn admit(&mut self, i: usize, lease_id: u64, now_ms: u64) -> Result<Ticket, String> {
        let id = &self.identities[i];
        let header = |name: &str| (name == "x-tollgate-user").then(|| id.clone());
        let facts = Facts { header: &header, peer_address: Some(&self.peers[i]), now_ms, secrets: &no_secrets, claim: &tollgate_core::identity::no_claims };
        match gate::admit_chat(&self.policy, &facts, black_box(CHAT_SMALL), &mut self.store, lease_id) {
            Gate::Forward(a) => {
                let a = black_box(a);
                a.ticket.ok_or_else(|| "admitted without a ticket (store failed)".to_owned())
            }
            Gate::Reply { response, why, .. } => Err(format!(
                "request {lease_id} refused ({why:?}, {}): {}",
                response.status,
                String::from_utf8_lossy(&response.body)
            )),
        }
    }

    fn settle(&mut self, ticket: &Ticket, now_ms: u64) -> Result<(), String> {
        let settled = gate::finish(&self.policy, &mut self.store, ticket, &Ending::Served { usage: self.usage, model: None }, now_ms);
        if let Some(e) = settled.error {
            return Err(format!("finish: {e}"));
        }
        black_box(settled.events);
        Ok(())
    }

    fn admit_settle(&mut self) -> Result<(), String> {
        let (i, lease, now) = self.request();
        let ticket = self.admit(i, lease, now)?;
        self.settle(&ticket, now)
    }

    /// Runs `iters` requests; returns the nanoseconds spent in the timed parts, read from
    /// `now` (thread CPU time).
    pub fn run(&mut self, iters: u64, now: &dyn Fn() -> u64) -> Result<u64, String> {
        match self.op {
            LimitsOp::AdmitFinish => {
                let start = now();
                timed(|| {
                    for _ in 0..iters {
                        self.admit_settle()?;
                    }
                    Ok::<_, String>(())
                })?;
                Ok(now() - start)
            }
            LimitsOp::Admit | LimitsOp::Finish => {
                let mut spent = 0;
                let mut done = 0;
                while done < iters {
                    let n = BATCH.min(iters - done);
                    let reqs: Vec<_> = (0..n).map(|_| self.request()).collect();
                    let mut tickets = Vec::with_capacity(n as usize);
                    if self.op == LimitsOp::Admit {
                        let start = now();
                        timed(|| {
                            for &(i, lease, t) in &reqs {
                                tickets.push(self.admit(i, lease, t)?);
                            }
                            Ok::<_, String>(())
                        })?;
                        spent += now() - start;
                        for (ticket, &(_, _, t)) in tickets.iter().zip(&reqs) {
                            self.settle(ticket, t)?;
                        }
                    } else {
                        for &(i, lease, t) in &reqs {
                            tickets.push(self.admit(i, lease, t)?);
                        }
                        let start = now();
                        timed(|| {
                            for (ticket, &(_, _, t)) in tickets.iter().zip(&reqs) {
                                self.settle(ticket, t)?;
                            }
                            Ok::<_, String>(())
                        })?;
                        spent += now() - start;
                    }
                    done += n;
                }
                Ok(spent)
            }
            LimitsOp::Baseline => {
                let start = now();
                timed(|| {
                    for _ in 0..iters {
                        let v: serde_json::Value = serde_json::from_slice(black_box(CHAT_SMALL)).map_err(|e| e.to_string())?;
                        black_box(v);
                    }
                    Ok::<_, String>(())
                })?;
                Ok(now() - start)
            }
        }
    }
}

/// The wasm guest's exports for the limits cases. `limits_prepare` builds a case (and keeps it:
/// its store and clock carry on from run to run, as a filter's do); `limits_run` times it with
/// the host's clock.
#[cfg(target_arch = "wasm32")]
pub mod guest {
    use std::cell::RefCell;

    use super::{LimitsBench, LIMITS_CASES};

    #[link(wasm_import_module = "tollgate_bench")]
    extern "C" {
        fn now_ns() -> u64;
    }

    thread_local! {
        static PREPARED: RefCell<Vec<Option<LimitsBench>>> = const { RefCell::new(Vec::new()) };
    }

    /// Prepares case `case`: 0, or -1 no such case, -2 its preparation failed.
    #[no_mangle]
    pub extern "C" fn limits_prepare(case: u32) -> i64 {
        let Some(c) = LIMITS_CASES.get(case as usize) else { return -1 };
        let Ok((b, _)) = LimitsBench::prepare(c) else { return -2 };
        PREPARED.with(|p| {
            let mut p = p.borrow_mut();
            if p.len() <= case as usize {
                p.resize_with(case as usize + 1, || None);
            }
            p[case as usize] = Some(b);
        });
        0
    }

    /// Nanoseconds for `iters` requests of a prepared case, or -1 not prepared, -3 a request
    /// failed.
    #[no_mangle]
    pub extern "C" fn limits_run(case: u32, iters: u64) -> i64 {
        PREPARED.with(|p| {
            let mut p = p.borrow_mut();
            let Some(Some(b)) = p.get_mut(case as usize) else { return -1 };
            match b.run(iters, &|| unsafe { now_ns() }) {
                Ok(ns) => ns as i64,
                Err(_) => -3,
            }
        })
    }
}

/// Shared data for many anonymous identities: admitted through the real engine into a
/// [`MemoryStore`], then measured. See [`run`](keyspace::run).
pub mod keyspace {
    use tollgate_core::ending::Ending;
    use tollgate_core::gate::{self, Facts, Gate};
    use tollgate_core::limits::record::{COUNTER_LEN, LEASE_LEN, MEMBER_HEADER_LEN, RATE_LEN};
    use tollgate_core::{MemoryStore, Policy};

    use super::{no_secrets, usage, CHAT_SMALL, T0_MS};

    /// The free tier of an anonymous service: identity = client IP, the typical limits. Default
    /// `store` (65 536 slots, 64 members a slot).
    pub const POLICY_ANON: &str = r#"{
      "time_zone": "UTC",
      "identity": {"sources": [{"client_ip": {"trusted_hops": 0}}]},
      "tier": {"default": "free"},
      "tiers": {
        "free": {
          "limits": [
            {"window": "minute", "requests": 10},
            {"window": "day", "requests": 200},
            {"window": "day", "total_tokens": 20000, "soft": [{"at": 80, "action": "warn"}]},
            {"concurrent": 2}
          ]
        }
      }
    }"#;

    /// This policy's counters per member (requests/minute, requests/day, total_tokens/day),
    /// rates (none) and the most leases a member can hold (its concurrency limit).
    pub const COUNTERS: usize = 3;
    pub const RATES: usize = 0;
    pub const MAX_LEASES: usize = 2;
    /// Record header: `[format u8][members u16]`.
    pub const RECORD_HEADER_LEN: usize = 3;

    /// The largest a member of this policy can encode to.
    pub fn max_member_len() -> usize {
        MEMBER_HEADER_LEN + COUNTERS * COUNTER_LEN + RATES * RATE_LEN + MAX_LEASES * LEASE_LEN
    }

    /// A member with no request in flight.
    pub fn idle_member_len() -> usize {
        MEMBER_HEADER_LEN + COUNTERS * COUNTER_LEN + RATES * RATE_LEN
    }

    /// What the store holds after some number of identities.
    #[derive(Debug, Clone)]
    pub struct Snapshot {
        pub identities: u64,
        pub keys: usize,
        pub key_bytes: usize,
        pub value_bytes: usize,
        pub members: u64,
        pub max_members: usize,
        pub largest_value: usize,
        /// Members with live state evicted from full slots (what admissions reported).
        pub evicted: u64,
        /// CPU nanoseconds spent admitting and settling since the previous snapshot, per request.
        pub ns_per_request: f64,
    }

    /// Admits and settles `n` distinct client-IP identities (10.0.0.0/8 and on, one request
    /// each, `step_ms` apart starting at [`T0_MS`]), taking a [`Snapshot`] whenever the count
    /// reaches one of `checkpoints`.
    pub fn run(checkpoints: &[u64], step_ms: u64, clock: &dyn Fn() -> u64, progress: &mut dyn FnMut(&Snapshot)) -> Result<Vec<Snapshot>, String> {
        let policy = Policy::from_json(POLICY_ANON.as_bytes()).map_err(|e| format!("policy: {e}"))?;
        let mut store = MemoryStore::new();
        let usage = usage();
        let last = checkpoints.iter().copied().max().unwrap_or(0);
        let mut evicted = 0u64;
        let mut out = Vec::new();
        let mut since = clock();
        let mut since_n = 0u64;
        for n in 0..last {
            let ip = std::net::Ipv4Addr::from(0x0A00_0000u32.wrapping_add(n as u32));
            let peer = ip.to_string();
            let now_ms = T0_MS + n * step_ms;
            let header = |_: &str| None;
            let facts = Facts { header: &header, peer_address: Some(&peer), now_ms, secrets: &no_secrets, claim: &tollgate_core::identity::no_claims };
            let ticket = match gate::admit_chat(&policy, &facts, CHAT_SMALL, &mut store, n + 1) {
                Gate::Forward(a) => {
                    evicted += u64::from(a.evicted);
                    a.ticket.ok_or("admitted without a ticket")?
                }
                Gate::Reply { response, .. } => {
                    return Err(format!("identity {n} ({peer}) refused: {}", String::from_utf8_lossy(&response.body)))
                }
            };
            if let Some(e) = gate::finish(&policy, &mut store, &ticket, &Ending::Served { usage, model: None }, now_ms).error {
                return Err(format!("finish: {e}"));
            }
            let done = n + 1;
            if checkpoints.contains(&done) {
                let spent = clock() - since;
                let mut s = measure(&store, done, evicted);
                s.ns_per_request = spent as f64 / (done - since_n) as f64;
                progress(&s);
                out.push(s);
                since = clock();
                since_n = done;
            }
        }
        Ok(out)
    }

    fn measure(store: &MemoryStore, identities: u64, evicted: u64) -> Snapshot {
        let mut s = Snapshot {
            identities,
            keys: store.len(),
            key_bytes: 0,
            value_bytes: 0,
            members: 0,
            max_members: 0,
            largest_value: 0,
            evicted,
            ns_per_request: 0.0,
        };
        for (k, v) in store.values() {
            s.key_bytes += k.len();
            s.value_bytes += v.len();
            s.largest_value = s.largest_value.max(v.len());
            // `[format u8][members u16 LE]`
            let members = if v.len() >= 3 { u16::from_le_bytes([v[1], v[2]]) as usize } else { 0 };
            s.members += members as u64;
            s.max_members = s.max_members.max(members);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_case_admits_and_settles_without_refusals() {
        for case in LIMITS_CASES {
            let case = LimitsCase { pool: case.pool.min(200), ..*case };
            let (mut b, said) = LimitsBench::prepare(&case).unwrap_or_else(|e| panic!("{}: {e}", case.name));
            b.run(3 * BATCH, &|| 0).unwrap_or_else(|e| panic!("{}: {e}", case.name));
            if case.op != LimitsOp::Baseline {
                assert!(said.contains("tg2:i:") && said.contains("tg2:p:") && said.contains("tg2:t:free") && said.contains("tg2:g"), "{said}");
            }
        }
    }

    #[test]
    fn the_policy_has_six_limits_on_four_keys() {
        let p = policy(65_536).unwrap();
        let who = Who { identity_key: "a".into(), ip_key: Some("b".into()), tier: "free".into() };
        let plans = p.limits.plans(&who);
        assert_eq!(plans.len(), 4);
        assert_eq!(plans.iter().map(|p| p.limits.len()).sum::<usize>(), 6);
    }

    #[test]
    fn keyspace_counts_every_identity_once_without_evictions() {
        let snaps = keyspace::run(&[2_000, 5_000], 1, &|| 0, &mut |_| {}).unwrap();
        for s in &snaps {
            assert_eq!(s.members, s.identities);
            assert_eq!(s.evicted, 0);
            assert!(s.keys <= 65_536 && s.keys as u64 <= s.identities);
        }
    }

    /// The 1 M measurement of BENCHMARKS.md ("Shared-data memory: bounded key space") as an
    /// assertion: `cargo test --release -p tollgate-bench -- --ignored one_million`.
    #[test]
    #[ignore = "about 15 s in release; run on demand"]
    fn one_million_anonymous_identities_fit_without_evictions() {
        let s = keyspace::run(&[1_000_000], 1, &|| 0, &mut |_| {}).unwrap().remove(0);
        assert_eq!(s.evicted, 0, "evictions at 1 M identities with the default slots");
        assert_eq!(s.members, 1_000_000);
        assert_eq!(s.keys, 65_536);
        assert!(s.value_bytes <= 65_536 * (keyspace::RECORD_HEADER_LEN + 64 * keyspace::max_member_len()));
    }
}
