//! Arbitrary bytes as a policy: `Policy::from_json` must never panic, and a policy it accepts
//! must be usable (its limit plans and rules are reachable for every tier).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_core::limits::engine::Who;
use tollgate_core::Policy;

fuzz_target!(|data: &[u8]| {
    let Ok(policy) = Policy::from_json(data) else { return };
    for tier in policy.tier_names() {
        let who = Who { identity_key: "tg1:q:00".into(), ip_key: Some("tg1:q:11".into()), tier: tier.to_owned() };
        let _ = policy.limits.plans(&who);
        let _ = policy.rules(tier);
    }
});
