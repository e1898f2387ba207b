//! The `jwt` identity source, tried as a client and as an attacker would, the same on every
//! host: good tokens (RS256, ES256) identify the user and carry its tier; expired, foreign-key,
//! wrong-audience, `alg: none` and key-confusion tokens are OpenAI 401s that never reach the
//! provider; a request without a token — or with an SDK's placeholder key — falls through to
//! the client address.

use serde_json::{json, Value};

use crate::proc::Reply;
use crate::tokens::{self, AUDIENCE, ISSUER};

/// The policy: a `jwt` source (`envoy`: also read from `jwt_authn`'s metadata) then the client
/// address; free 50 requests a day, pro 500.
pub fn policy(envoy: bool) -> Value {
    let mut jwt = json!({ "issuer": ISSUER, "audiences": [AUDIENCE], "jwks": tokens::jwks(), "tier_claim": ["plan", "tier"] });
    if envoy {
        jwt["payload_in_metadata"] = json!("jwt_payload");
    }
    json!({
        "identity": { "sources": [ { "jwt": jwt }, { "client_ip": {} } ] },
        "tier": { "default": "free" },
        "store": { "on_failure": "deny" },
        "tiers": {
            "free": { "limits": [ { "window": "day", "requests": 50 } ] },
            "pro": { "limits": [ { "window": "day", "requests": 500 } ] }
        }
    })
}

fn now_s() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// Runs every case: `send(authorization)` posts one chat completion and returns the answer;
/// `provider_calls()` counts what reached the provider.
pub fn run(send: &dyn Fn(Option<&str>) -> Reply, provider_calls: &dyn Fn() -> u64) {
    let now = now_s();
    let good = tokens::claims("user-1", "pro", now);
    let mut failures = Vec::new();
    let mut check = |name: &str, auth: Option<String>, status: u16, limit: Option<&str>| {
        let before = provider_calls();
        let r = send(auth.as_deref());
        let reached = provider_calls() > before;
        let mut problems = Vec::new();
        if r.status != status {
            problems.push(format!("status {} (want {status})", r.status));
        }
        if status == 200 {
            if r.header("x-ratelimit-limit-requests") != limit {
                problems.push(format!("limit {:?} (want {limit:?})", r.header("x-ratelimit-limit-requests")));
            }
        } else {
            let v = r.json();
            if v["error"]["code"] != "invalid_identity" || !v["error"]["message"].as_str().is_some_and(|m| m.starts_with("The identity token")) {
                problems.push(format!("not Tollgate's 401: {}", r.body));
            }
            if reached {
                problems.push("it reached the provider".to_owned());
            }
            if auth.as_deref().is_some_and(|a| r.body.contains(a.trim_start_matches("Bearer "))) {
                problems.push("the answer repeats the token".to_owned());
            }
        }
        if !problems.is_empty() {
            failures.push(format!("{name}: {}", problems.join("; ")));
        }
    };
    let bearer = |t: String| Some(format!("Bearer {t}"));
    check("rs256 pro", bearer(tokens::rs256(&good, false)), 200, Some("500"));
    check("es256 free", bearer(tokens::es256(&tokens::claims("user-2", "free", now))), 200, Some("50"));
    check("unknown tier is the default", bearer(tokens::es256(&tokens::claims("user-3", "platinum", now))), 200, Some("50"));
    let mut expired = good.clone();
    expired["exp"] = json!(now - 3600);
    check("expired", bearer(tokens::rs256(&expired, false)), 401, None);
    let mut foreign = good.clone();
    foreign["aud"] = json!("someone-else");
    check("wrong audience", bearer(tokens::rs256(&foreign, false)), 401, None);
    let mut issuer = good.clone();
    issuer["iss"] = json!("https://evil.example/");
    check("wrong issuer", bearer(tokens::rs256(&issuer, false)), 401, None);
    check("signed by a stranger", bearer(tokens::rs256(&good, true)), 401, None);
    check("alg none", bearer(tokens::alg_none(&good)), 401, None);
    check("key confusion (HS256 with the RSA public key)", bearer(tokens::key_confusion(&good)), 401, None);
    check("no token: the client address", None, 200, Some("50"));
    check("an SDK's placeholder key: the client address", Some("Bearer sk-anonymous".to_owned()), 200, Some("50"));
    assert!(failures.is_empty(), "the jwt source departs:\n  {}", failures.join("\n  "));
}

/// A chat completion body.
pub fn body() -> String {
    json!({ "model": "mock-model", "messages": [ { "role": "user", "content": "hi" } ], "max_tokens": 5 }).to_string()
}
