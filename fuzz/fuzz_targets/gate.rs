//! Arbitrary chat bodies and header values through the whole gate with the example policy
//! (examples/policies/scalix.json): never a panic, every local answer an OpenAI error with a
//! client or limiter status, settlement never fails on the in-memory store, and no stored byte
//! sequence contains the body (counts only, never content).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_core::ending::Ending;
use tollgate_core::gate::{self, Facts, Gate};
use tollgate_core::usage::Usage;
use tollgate_core::{MemoryStore, Policy};

const POLICY: &str = include_str!("../../examples/policies/scalix.json");

fuzz_target!(|data: &[u8]| {
    let Ok(policy) = Policy::from_json(POLICY.as_bytes()) else { panic!("the example policy must parse") };
    let (head, body) = data.split_at(data.len().min(24));
    let text = String::from_utf8_lossy(head).into_owned();
    let mut parts = text.splitn(3, '|');
    let (user, tier, lang) = (parts.next().unwrap_or("").to_owned(), parts.next().unwrap_or("").to_owned(), parts.next().unwrap_or("").to_owned());
    let header = |name: &str| match name {
        "x-scalix-user" => Some(user.clone()),
        "x-scalix-tier" => Some(tier.clone()),
        "accept-language" => Some(lang.clone()),
        _ => None,
    };
    let no_secrets = |_: &str| None;
    let mut store = MemoryStore::new();
    for round in 0..3u64 {
        let now = 1_709_208_000_000 + round * 1000;
        let facts = Facts { header: &header, peer_address: Some("10.1.2.3:5555"), now_ms: now, secrets: &no_secrets, claim: &tollgate_core::identity::no_claims };
        match gate::admit_chat(&policy, &facts, body, &mut store, round) {
            Gate::Reply { response, .. } => {
                assert!(matches!(response.status, 400 | 401 | 404 | 413 | 429 | 503), "status {}", response.status);
                let v: serde_json::Value = serde_json::from_slice(&response.body).expect("an OpenAI error body");
                assert!(v["error"]["message"].is_string());
            }
            Gate::Forward(admitted) => {
                if let Some(ticket) = &admitted.ticket {
                    let usage = Usage { input: Some(body.len() as u64 / 4), output: Some(round * 7), ..Usage::default() };
                    let settled = gate::finish(&policy, &mut store, ticket, &Ending::Served { usage, model: None }, now + 10);
                    assert_eq!(settled.failures, 0, "settles on the memory store");
                }
            }
        }
    }
    if body.len() >= 16 {
        for (key, value) in store.values() {
            assert!(!key.as_bytes().windows(body.len()).any(|w| w == body), "body bytes in a key");
            assert!(!value.windows(body.len()).any(|w| w == body), "body bytes in a stored value");
        }
    }
});
