//! The operator API (docs/operator-api.md): what an operator may ask, behind the admin key —
//! one identity's limits, the identities active in a day or month (paged), and a reset or a
//! credit of an identity's counts (support refunds), each change an event without content.
//!
//! Core parses and authorizes the request ([`route`]), decides the store work ([`Request`]:
//! [`crate::ops::machine::Peeking`] (`new` or `adjusting`), or a page of the
//! activity index), and renders every answer; the hosts run the store work. The activity index
//! is a sorted set of `"<identity key> <tier>"` per period ([`index_keys`]), added to when a
//! request is admitted: a store that can list (Redis, a Durable Object) keeps it; Envoy's
//! shared data cannot (see [`LIST_UNSUPPORTED`]).

use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::config::Policy;
use crate::gate::status_json;
use crate::limits::engine::Who;
use crate::limits::ledger::{Adjustment, LimitStatus};
use crate::render::openai_error;
use crate::store::StoreError;
use crate::window::{Timestamp, Window};
use crate::LocalResponse;

/// Every operator path starts so.
pub const PREFIX: &str = "/v1/tollgate/admin/";
/// Most identities a page lists.
pub const MAX_PAGE: usize = 1000;
/// Why a host without a listing store answers 501 to a listing (Envoy's shared data).
pub const LIST_UNSUPPORTED: &str = "Listing identities needs store.redis: Envoy's shared data can only be read key by key (proxy-wasm has no call that enumerates keys), and counter keys are digests that do not name the identity.";

/// What the operator asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `GET usage?identity=…[&tier=…]`: one identity's limits.
    Usage(Who),
    /// `GET identities?window=day|month[&at=<epoch ms>][&after=…][&limit=…]`.
    List(Listing),
    /// `POST reset` / `POST credit`: a change to one identity's counts.
    Adjust(Who, Adjustment),
}

/// A page of the identities active in one period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// The period's index key.
    pub key: String,
    /// `day` or `month`.
    pub window: Window,
    /// The period, epoch milliseconds.
    pub start_ms: Timestamp,
    /// Its end (exclusive).
    pub end_ms: Timestamp,
    /// List the members after this one (the previous page's `next`).
    pub after: Option<String>,
    /// At most this many.
    pub limit: usize,
}

/// The last instant a listing's `at` may name: 9999-12-31T23:59:59.999Z.
const LAST_AT: Timestamp = 253_402_300_799_999;

/// The largest operator request body read (bytes).
pub const MAX_BODY: usize = 64 * 1024;

/// The answer to an operator body over [`MAX_BODY`].
pub fn too_large() -> LocalResponse {
    openai_error(413, "The body is too large.", "invalid_request_error", "body_too_large")
}

/// The answer to a listing where the store keeps no index (501, [`LIST_UNSUPPORTED`]).
pub fn unsupported_listing() -> LocalResponse {
    openai_error(501, LIST_UNSUPPORTED, "invalid_request_error", "listing_unsupported")
}

/// The index keys an admitted request of `who` adds [`index_member`] to: its day's and its
/// month's (in the policy's time zone), with when each may be dropped (epoch ms: a month after
/// the period's end).
pub fn index_keys(policy: &Policy, now: Timestamp) -> [(String, Timestamp); 2] {
    [Window::Day, Window::Month].map(|w| {
        let (start, end) = w.bounds_in(now, &policy.limits.settings.zone);
        (index_key(w, start), end.saturating_add(31 * 86_400_000))
    })
}

fn index_key(window: Window, start_ms: Timestamp) -> String {
    format!("tg2:x:{}:{}", window.name(), start_ms / 60_000)
}

/// Which index entries a process has already written, so an identity is added to a period's
/// index once per process, not once per request. Bounded: forgets everything at `cap` entries
/// (the next requests write their entries again, which is harmless).
#[derive(Debug)]
pub struct Noted {
    seen: std::collections::HashSet<String>,
    cap: usize,
}

impl Noted {
    /// Remembers at most `cap` entries.
    pub fn new(cap: usize) -> Noted {
        Noted { seen: std::collections::HashSet::new(), cap }
    }

    /// The index keys (each with when it may be dropped) an admitted request of `who` at `now`
    /// still has to be added to, and its member; noted as written from now on.
    pub fn due(&mut self, policy: &Policy, who: &Who, now: Timestamp) -> (Vec<(String, Timestamp)>, String) {
        let member = index_member(who);
        if self.seen.len() >= self.cap {
            self.seen.clear();
        }
        let keys = index_keys(policy, now).into_iter().filter(|(key, _)| self.seen.insert(format!("{key} {member}"))).collect();
        (keys, member)
    }

    /// Writing `member` to `key` failed: the next request tries again.
    pub fn forget(&mut self, key: &str, member: &str) {
        self.seen.remove(&format!("{key} {member}"));
    }
}

/// `who`'s member in the index.
pub fn index_member(who: &Who) -> String {
    format!("{} {}", who.identity_key, who.tier)
}

/// Whether `path` (query included) is an operator path.
pub fn is_admin(path: &str) -> bool {
    path.starts_with(PREFIX)
}

/// The admin key `authorization` carries, checked against the secret the policy names
/// (`secret(name)`): `Ok` when it matches. 404 when the policy has no `admin` (the API does not
/// exist), 401 otherwise — the host counts those. Compared as SHA-256 digests, byte by byte
/// without an early exit: the time taken says nothing about the key.
pub fn authorize(policy: &Policy, authorization: Option<&str>, secret: &dyn Fn(&str) -> Option<Vec<u8>>) -> Result<(), LocalResponse> {
    let Some(name) = policy.admin_key_secret.as_deref() else {
        return Err(openai_error(404, "Not found.", "invalid_request_error", "unknown_url"));
    };
    let expected = secret(name).filter(|k| !k.is_empty());
    let given = bearer(authorization);
    let ok = match (&expected, given) {
        (Some(e), Some(g)) => {
            let (e, g): ([u8; 32], [u8; 32]) = (Sha256::digest(e).into(), Sha256::digest(g.as_bytes()).into());
            e.iter().zip(g.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
        }
        _ => false,
    };
    if ok {
        return Ok(());
    }
    let mut r = openai_error(401, "Invalid admin key.", "invalid_request_error", "invalid_api_key");
    r.headers.push(("www-authenticate", "Bearer".to_owned()));
    Err(r)
}

/// The token of a `Bearer` authorization value.
pub fn bearer(value: Option<&str>) -> Option<&str> {
    let (scheme, token) = value?.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdjustBody {
    identity: String,
    #[serde(default)]
    tier: Option<String>,
    #[serde(default)]
    limit: Option<String>,
    #[serde(default)]
    amount: Option<u64>,
}

fn bad(message: &str, code: &str) -> LocalResponse {
    openai_error(400, message, "invalid_request_error", code)
}

/// Parses an authorized operator request: its method, path (with the query) and body.
pub fn route(policy: &Policy, method: &str, path: &str, body: &[u8], now: Timestamp) -> Result<Request, LocalResponse> {
    let (route, query) = path.split_once('?').unwrap_or((path, ""));
    let params: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes()).into_owned().collect();
    let param = |name: &str| params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let allow = |m: &str| {
        let mut r = openai_error(405, &format!("Use {m} on {route}."), "invalid_request_error", "method_not_allowed");
        r.headers.push(("allow", m.to_owned()));
        r
    };
    match route.strip_prefix(PREFIX).unwrap_or("") {
        "usage" if method == "GET" => {
            let identity = param("identity").ok_or_else(|| bad("The identity query parameter is required.", "missing_identity"))?;
            Ok(Request::Usage(subject(policy, identity, param("tier"), now)?))
        }
        "identities" if method == "GET" => {
            let window = match param("window").unwrap_or("day") {
                "day" => Window::Day,
                "month" => Window::Month,
                _ => return Err(bad("window must be day or month.", "invalid_window")),
            };
            let at = match param("at") {
                None => now,
                // Windows are computed up to the end of year 9999.
                Some(v) => v.parse().ok().filter(|ms| *ms <= LAST_AT).ok_or_else(|| bad("at must be epoch milliseconds before the year 10000.", "invalid_at"))?,
            };
            let limit = match param("limit") {
                None => 100,
                Some(v) => v.parse::<usize>().ok().filter(|n| (1..=MAX_PAGE).contains(n)).ok_or_else(|| bad("limit must be 1 to 1000.", "invalid_limit"))?,
            };
            let (start_ms, end_ms) = window.bounds_in(at, &policy.limits.settings.zone);
            let after = param("after").filter(|a| !a.is_empty()).map(str::to_owned);
            Ok(Request::List(Listing { key: index_key(window, start_ms), window, start_ms, end_ms, after, limit }))
        }
        kind @ ("reset" | "credit") if method == "POST" => {
            let body: AdjustBody = serde_json::from_slice(body).map_err(|e| bad(&format!("The body must be a JSON object with identity, and tier, limit, amount as needed: {e}"), "invalid_body"))?;
            let who = subject(policy, &body.identity, body.tier.as_deref(), now)?;
            if let Some(name) = &body.limit {
                let known = policy.limits.part_limits(&who.tier, crate::limits::Scope::Identity).iter().find(|l| l.name == *name);
                match known {
                    None => return Err(bad(&format!("The tier {} has no per-identity limit named {name}.", who.tier), "unknown_limit")),
                    Some(l) if kind == "credit" && l.window().is_none() => {
                        return Err(bad(&format!("{name} is not a calendar limit: only those can be credited (reset empties a rate limit)."), "not_creditable"))
                    }
                    Some(_) => {}
                }
            }
            let adjustment = match (kind, body.limit, body.amount) {
                ("reset", limit, None) => Adjustment::Reset { limit },
                ("credit", Some(limit), Some(amount)) if amount > 0 => Adjustment::Credit { limit, amount },
                ("credit", _, _) => return Err(bad("A credit names a limit and a positive amount.", "invalid_credit")),
                _ => return Err(bad("A reset takes no amount.", "invalid_reset")),
            };
            Ok(Request::Adjust(who, adjustment))
        }
        "usage" | "identities" => Err(allow("GET")),
        "reset" | "credit" => Err(allow("POST")),
        _ => Err(openai_error(404, "No such operator path (usage, identities, reset, credit).", "invalid_request_error", "unknown_url")),
    }
}

/// Who an operator names: an identity key (`tg1:…`, as records, events and the usage endpoint
/// show it) and a tier of the policy (default: the tier an anonymous request gets).
fn subject(policy: &Policy, identity: &str, tier: Option<&str>, now: Timestamp) -> Result<Who, LocalResponse> {
    let well_formed = identity.len() <= 128 && identity.starts_with("tg1:") && identity.bytes().all(|b| b.is_ascii_alphanumeric() || b == b':');
    if !well_formed {
        return Err(bad("identity must be an identity key (tg1:…), as usage records and the usage endpoint show it.", "invalid_identity"));
    }
    let tier = match tier {
        Some(t) if policy.tier_names().any(|n| n == t) => t.to_owned(),
        Some(_) => return Err(bad("Unknown tier.", "unknown_tier")),
        None => default_tier(policy, now),
    };
    Ok(Who { identity_key: identity.to_owned(), ip_key: None, tier })
}

/// The tier a request with no tier header and no API key gets.
fn default_tier(policy: &Policy, now: Timestamp) -> String {
    let none = |_: &str| None;
    let facts = crate::identity::RequestFacts { header: &none, user_field: None, peer_address: None, now_ms: now, claim: &crate::identity::no_claims };
    policy.identity.resolve(&facts, &|_| None).map(|s| s.tier).unwrap_or_default()
}

fn ok(body: Value) -> LocalResponse {
    LocalResponse {
        status: 200,
        headers: vec![("content-type", "application/json".to_owned()), ("cache-control", "no-store".to_owned())],
        body: serde_json::to_vec(&body).unwrap_or_default(),
    }
}

/// The answer to an adjustment, and its event (one JSON line: who, what, by how much, the
/// limits afterwards — never content) for the host to log and post to `policy.notify`.
pub fn adjusted(who: &Who, adjustment: &Adjustment, statuses: Result<Vec<LimitStatus>, StoreError>, now: Timestamp) -> (LocalResponse, Option<Vec<u8>>) {
    let Ok(statuses) = statuses else { return (crate::render::store_unavailable(), None) };
    let limits: Vec<Value> = statuses.iter().map(|s| status_json(s, now)).collect();
    let (kind, amount) = match adjustment {
        Adjustment::Reset { .. } => ("reset", None),
        Adjustment::Credit { amount, .. } => ("credit", Some(*amount)),
    };
    let event = json!({
        "type": format!("tollgate.admin.{kind}"),
        "time_ms": now,
        "identity": who.identity_key,
        "tier": who.tier,
        "limit": adjustment.limit(),
        "amount": amount,
        "limits": limits,
    });
    let body = json!({ "object": "tollgate.adjustment", "kind": kind, "identity": who.identity_key, "tier": who.tier, "limit": adjustment.limit(), "amount": amount, "limits": limits });
    (ok(body), serde_json::to_vec(&event).ok())
}

/// The event a refused operator call leaves (hosts count and log it): no key, no path beyond the
/// operator prefix.
pub fn unauthorized_event(now: Timestamp) -> Vec<u8> {
    serde_json::to_vec(&json!({ "type": "tollgate.admin.unauthorized", "time_ms": now })).unwrap_or_default()
}

/// A page of the index: `members` (in order, at most `limit + 1`: one more says there is a next
/// page) as the operator sees them.
pub fn listed(listing: &Listing, members: Result<Vec<String>, StoreError>) -> LocalResponse {
    let Ok(mut members) = members else { return crate::render::store_unavailable() };
    let next = (members.len() > listing.limit).then(|| {
        members.truncate(listing.limit);
        members.last().cloned()
    });
    let data: Vec<Value> = members
        .iter()
        .filter_map(|m| m.split_once(' '))
        .map(|(identity, tier)| json!({ "identity": identity, "tier": tier }))
        .collect();
    ok(json!({
        "object": "list",
        "window": listing.window.name(),
        "start_ms": listing.start_ms,
        "end_ms": listing.end_ms,
        "data": data,
        "next": next.flatten(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy::from_json(
            br#"{"identity": {"header": "x-user"}, "tier": {"default": "free", "header": "x-tier"},
                 "admin": {"key_secret": "ADMIN_KEY"},
                 "tiers": {"free": {"limits": [{"window": "day", "total_tokens": 100}, {"rate": {"per": "minute", "burst": 5}, "requests": 5}, {"concurrent": 2}]},
                           "pro": {"limits": []}}}"#,
        )
        .unwrap()
    }

    fn key(name: &str) -> Option<Vec<u8>> {
        (name == "ADMIN_KEY").then(|| b"s3cret".to_vec())
    }

    #[test]
    fn only_the_admin_key_passes() {
        let p = policy();
        assert!(authorize(&p, Some("Bearer s3cret"), &key).is_ok());
        for wrong in [None, Some("Bearer s3cre"), Some("Bearer s3cret2"), Some("Basic s3cret"), Some("Bearer "), Some("s3cret")] {
            let r = authorize(&p, wrong, &key).unwrap_err();
            assert_eq!(r.status, 401, "{wrong:?}");
        }
        // A policy whose secret is unset refuses everyone, even an empty key.
        assert_eq!(authorize(&p, Some("Bearer "), &|_| Some(vec![])).unwrap_err().status, 401);
        let none = Policy::from_json(br#"{"tier": {"default": "free"}, "tiers": {"free": {"limits": []}}}"#).unwrap();
        assert_eq!(authorize(&none, Some("Bearer s3cret"), &key).unwrap_err().status, 404);
    }

    #[test]
    fn requests_parse_and_bad_ones_say_why() {
        let p = policy();
        let id = "tg1:q:00112233445566778899aabbccddeeff";
        let r = route(&p, "GET", &format!("{PREFIX}usage?identity={id}&tier=pro"), b"", 0).unwrap();
        assert_eq!(r, Request::Usage(Who { identity_key: id.into(), ip_key: None, tier: "pro".into() }));
        let Request::List(l) = route(&p, "GET", &format!("{PREFIX}identities?window=month&at=1796515200000&limit=2&after=x"), b"", 0).unwrap() else { panic!() };
        assert_eq!((l.window, l.limit, l.after.as_deref(), l.end_ms > l.start_ms), (Window::Month, 2, Some("x"), true));
        let body = format!(r#"{{"identity":"{id}","limit":"total_tokens/day","amount":40}}"#);
        let r = route(&p, "POST", &format!("{PREFIX}credit"), body.as_bytes(), 0).unwrap();
        assert_eq!(r, Request::Adjust(Who { identity_key: id.into(), ip_key: None, tier: "free".into() }, Adjustment::Credit { limit: "total_tokens/day".into(), amount: 40 }));
        let cases: [(&str, &str, String, &str); 9] = [
            ("GET", "usage", String::new(), "missing_identity"),
            ("GET", "usage?identity=alice", String::new(), "invalid_identity"),
            ("GET", &format!("usage?identity={id}&tier=gold"), String::new(), "unknown_tier"),
            ("GET", "identities?limit=0", String::new(), "invalid_limit"),
            ("GET", "identities?window=month&at=18446744073709551615", String::new(), "invalid_at"),
            ("POST", "credit", format!(r#"{{"identity":"{id}","limit":"requests/minute","amount":1}}"#), "unknown_limit"),
            ("POST", "credit", format!(r#"{{"identity":"{id}","limit":"requests/rate-minute","amount":1}}"#), "not_creditable"),
            ("POST", "credit", format!(r#"{{"identity":"{id}","limit":"total_tokens/day"}}"#), "invalid_credit"),
            ("POST", "reset", format!(r#"{{"identity":"{id}","prompt":"x"}}"#), "invalid_body"),
        ];
        for (method, path, body, code) in cases {
            let r = route(&p, method, &format!("{PREFIX}{path}"), body.as_bytes(), 0).unwrap_err();
            let v: Value = serde_json::from_slice(&r.body).unwrap();
            assert_eq!((r.status, v["error"]["code"].as_str()), (400, Some(code)), "{path} {body}: {v}");
        }
        assert_eq!(route(&p, "POST", &format!("{PREFIX}usage"), b"", 0).unwrap_err().status, 405);
        assert_eq!(route(&p, "GET", &format!("{PREFIX}nope"), b"", 0).unwrap_err().status, 404);
    }

    #[test]
    fn an_identity_is_indexed_once_per_period_until_forgotten() {
        let p = policy();
        let who = Who { identity_key: "tg1:q:aa".into(), ip_key: None, tier: "free".into() };
        let mut noted = Noted::new(10);
        let (keys, member) = noted.due(&p, &who, 1_796_515_200_000);
        assert_eq!((keys.len(), member.as_str()), (2, "tg1:q:aa free"), "its day and its month");
        assert!(noted.due(&p, &who, 1_796_515_200_001).0.is_empty(), "written already");
        noted.forget(&keys[0].0, &member);
        assert_eq!(noted.due(&p, &who, 1_796_515_200_002).0, keys[..1], "a failed write is tried again");
        assert_eq!(noted.due(&p, &who, 1_796_515_200_000 + 86_400_000).0.len(), 1, "the next day: its day's index only");
    }

    #[test]
    fn a_page_says_whether_another_follows() {
        let p = policy();
        let Request::List(l) = route(&p, "GET", &format!("{PREFIX}identities?limit=2"), b"", 0).unwrap() else { panic!() };
        let members = vec!["tg1:q:a free".to_owned(), "tg1:q:b pro".to_owned(), "tg1:q:c free".to_owned()];
        let v: Value = serde_json::from_slice(&listed(&l, Ok(members)).body).unwrap();
        assert_eq!((v["data"][1]["identity"].as_str(), v["data"][1]["tier"].as_str(), v["next"].as_str()), (Some("tg1:q:b"), Some("pro"), Some("tg1:q:b pro")));
        let v: Value = serde_json::from_slice(&listed(&l, Ok(vec!["tg1:q:a free".into()])).body).unwrap();
        assert!(v["next"].is_null() && v["data"].as_array().unwrap().len() == 1);
    }
}
