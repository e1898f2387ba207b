//! The Scalix example policy (examples/policies/scalix.json) end to end in real workerd
//! (`wrangler dev`, local mode, offline) in front of the mock provider: the same core gate as
//! Envoy — token reservations settled to the provider's usage, the warning header and body
//! object past 80 %, the downgrade to scalix-small past 100 %, the 429 in the caller's language
//! past 150 %, pro's 95 % warning, enterprise without limits, and `GET /v1/tollgate/usage`.
//!
//! Needs `scripts/build-worker.sh`, `npm install` and the release mock provider, then
//! `cargo test --release -p tollgate-host-tests --test workerd_limits`. The recorded answers the
//! mock replays (`x-mock-fixture`, passed on by the worker's `PROVIDER_PASS_HEADERS`) are
//! `../shared/fixtures` from the workspace root, or `$TOLLGATE_FIXTURES`.
//!
//! The policy is scalix.json as it is, except the `mock` provider's `base_url`, which points at
//! the mock's real port.
//!
//! Token arithmetic (core/src/guard.rs, core/src/limits/ledger.rs): a request reserves its
//! estimated prompt tokens (4 per message + ceil(UTF-8 bytes / 4) + 3, at least 16) plus its
//! `max_tokens` (else the free tier's `default_max_tokens`, 256). A response says
//! `remaining = limit − (settled before it + reservation)`, never below 0. When the answer is
//! complete the reservation is replaced by the usage the mock reported: 9 + 8 = 17 for its own
//! answer, the recording's `usage` for a replayed one (read from the recording, never written
//! out here). Warnings compare the usage including the reservation with the threshold; the
//! downgrade compares the usage before the request; the block refuses a request whose
//! reservation would take the usage past 150 %.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tollgate_host_tests::checks::{duration_ms, next_midnight_ms, now_ms, rfc3339, sf_dictionary, Item};
use tollgate_host_tests::proc::{
    agent, fixtures_dir, get, mock_request_count, post_json, start_mock_provider_with, workspace_root, Reply, Server,
};
use tollgate_host_tests::workerd::{get_with, seed_policy, start_wrangler, Scratch, Wrangler};

const DAY_LIMIT: u64 = 2000;
const PRO_DAY_LIMIT: u64 = 100_000;
const UPGRADE_URL: &str = "https://scalix.example.com/upgrade";
/// What the mock reports for its own answer: 9 prompt + 8 completion tokens.
const MOCK_TOTAL: u64 = 17;
const MOCK_CONTENT: &str = "Hello from the Tollgate mock provider.";
/// A recorded OpenAI answer with a large usage (1220 + 100 tokens).
const BIG_ANSWER: &str = "openai/chat_nonstream_cached_tokens.json";
/// A recorded OpenAI answer with a middling usage (162 + 219 tokens).
const MIDDLE_ANSWER: &str = "openai/chat_nonstream_parallel_tools.json";

// ---------------------------------------------------------------------------------------------
// Running wrangler + mock

struct Stack {
    // Dropped in this order: the worker, then the mock, then the scratch directory.
    wrangler: Wrangler,
    mock_url: String,
    _mock: Server,
    _scratch: Scratch,
}

fn scalix_policy() -> Value {
    let text = std::fs::read_to_string(workspace_root().join("examples/policies/scalix.json")).expect("read scalix.json");
    serde_json::from_str(&text).expect("scalix.json is JSON")
}

/// wrangler dev with scalix.json (the mock provider's base_url rewritten to the mock's port) in
/// KV, the default 4 aggregate shards, and `x-mock-fixture` passed on to the provider.
fn start_scalix(name: &str) -> Stack {
    start_scalix_with(name, |_, _| {})
}

/// As [`start_scalix`], with the policy copy changed by `adjust(policy, mock_url)` first.
fn start_scalix_with(name: &str, adjust: impl FnOnce(&mut Value, &str)) -> Stack {
    let scratch = Scratch::new(name);
    let fixtures = fixtures_dir();
    let (mock, mock_url) = start_mock_provider_with(&["--fixtures", fixtures.to_str().expect("UTF-8 path")]);
    let mut policy = scalix_policy();
    assert!(policy["providers"]["mock"].is_object(), "scalix.json has a mock provider");
    policy["providers"]["mock"]["base_url"] = json!(mock_url);
    adjust(&mut policy, &mock_url);
    seed_policy(&scratch.0, &policy.to_string());
    let wrangler = start_wrangler(
        &scratch.0,
        &[("UPSTREAM_URL", &mock_url), ("PROVIDER_PASS_HEADERS", "x-mock-fixture")],
        None,
    );
    Stack { wrangler, mock_url, _mock: mock, _scratch: scratch }
}

/// The total tokens a recording reports (`usage.prompt_tokens + usage.completion_tokens`).
fn recorded_total(fixture: &str) -> u64 {
    let path = fixtures_dir().join(fixture);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let v: Value = serde_json::from_str(&text).expect("recording is JSON");
    v["usage"]["prompt_tokens"].as_u64().expect("prompt_tokens") + v["usage"]["completion_tokens"].as_u64().expect("completion_tokens")
}

// ---------------------------------------------------------------------------------------------
// Requests

/// `bytes` bytes of ASCII prose (one byte a character).
fn prose(bytes: usize) -> String {
    "The quick brown fox jumps over the lazy dog. ".chars().cycle().take(bytes).collect()
}

/// A one-message chat body.
fn body(model: &str, content: &str, max_tokens: Option<u64>) -> String {
    let mut b = json!({"model": model, "messages": [{"role": "user", "content": content}]});
    if let Some(m) = max_tokens {
        b["max_tokens"] = json!(m);
    }
    b.to_string()
}

/// The reservation core makes for a one-message request of `bytes` ASCII bytes with
/// `max_tokens` (else `default_max_tokens`).
fn reservation(bytes: u64, output: u64) -> u64 {
    (4 + bytes.div_ceil(4) + 3).max(16) + output
}

fn chat(stack: &Stack, headers: &[(&str, &str)], body: &str) -> Reply {
    post_json(&agent(), &format!("{}/v1/chat/completions", stack.wrangler.url), headers, body)
}

fn usage_of(stack: &Stack, headers: &[(&str, &str)]) -> Value {
    let r = get_with(&format!("{}/v1/tollgate/usage", stack.wrangler.url), headers);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("cache-control"), Some("no-store"), "{r:?}");
    r.json()
}

/// One limit of a usage report, by name.
fn limit<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["limits"]
        .as_array()
        .expect("limits")
        .iter()
        .find(|l| l["name"] == name)
        .unwrap_or_else(|| panic!("no limit {name} in {report}"))
}

/// Waits (settlement runs in `ctx.wait_until`, after the response) until the caller's
/// `total_tokens/day` shows `want`, then checks the rest of that limit's report.
#[track_caller]
fn settled_to(stack: &Stack, headers: &[(&str, &str)], want: u64, day_limit: u64) {
    let started = Instant::now();
    loop {
        let report = usage_of(stack, headers);
        let tokens = limit(&report, "total_tokens/day");
        if tokens["used"].as_u64() == Some(want) {
            assert_eq!(
                (tokens["limit"].as_u64(), tokens["remaining"].as_u64(), &tokens["metric"], &tokens["window"], &tokens["scope"]),
                (Some(day_limit), Some(day_limit.saturating_sub(want)), &json!("total_tokens"), &json!("day"), &json!("identity")),
                "{report}"
            );
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "total_tokens/day never settled to {want}: {report}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------------
// Time


/// Waits out the last 90 s of a UTC day, so the day's token counter cannot reset mid-test.
fn away_from_day_end() {
    let left = 86_400_000 - now_ms() % 86_400_000;
    if left < 90_000 {
        eprintln!("waiting {left} ms for the next day window");
        std::thread::sleep(Duration::from_millis(left + 250));
    }
}


/// The warning header, member by member, in its order.
fn warning(r: &Reply) -> Option<Vec<(String, Item)>> {
    r.header("x-tollgate-warning").map(sf_dictionary)
}

/// The warning header a total_tokens/day limit of `limit` sends at `used` past `threshold`.
fn expected_warning(limit: u64, used: u64, threshold: u64) -> Vec<(String, Item)> {
    let int = |k: &str, v: u64| (k.to_owned(), Item::Int(v as i64));
    vec![
        ("metric".to_owned(), Item::Str("total_tokens".into())),
        ("window".to_owned(), Item::Str("day".into())),
        int("limit", limit),
        int("used", used),
        int("remaining", limit.saturating_sub(used)),
        int("percent", used * 100 / limit),
        int("threshold", threshold),
        int("reset", next_midnight_ms() / 1000),
    ]
}

// ---------------------------------------------------------------------------------------------
// Assertions

/// A served chat: 200, the mock's answer for `upstream_model` (or a replayed recording), the
/// day's token headers with `remaining_tokens`.
#[track_caller]
fn assert_served(r: &Reply, upstream_model: Option<&str>, token_limit: u64, remaining_tokens: u64) {
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-ratelimit-limit-tokens"), Some(token_limit.to_string().as_str()), "{r:?}");
    assert_eq!(r.header("x-ratelimit-remaining-tokens"), Some(remaining_tokens.to_string().as_str()), "{r:?}");
    let reset = duration_ms(r.header("x-ratelimit-reset-tokens").expect("x-ratelimit-reset-tokens"));
    let to_midnight = next_midnight_ms() - now_ms();
    assert!(reset.abs_diff(to_midnight) < 5_000, "reset-tokens {reset} ms, midnight in {to_midnight} ms: {r:?}");
    assert_eq!(r.header("x-ratelimit-limit-requests"), Some(if token_limit == DAY_LIMIT { "30" } else { "120" }), "{r:?}");
    if let Some(model) = upstream_model {
        let b = r.json();
        assert_eq!(b["model"], model, "{}", r.body);
        assert_eq!(b["choices"][0]["message"]["content"], MOCK_CONTENT, "{}", r.body);
    }
}

#[track_caller]
fn assert_no_warning(r: &Reply) {
    assert!(r.header("x-tollgate-warning").is_none(), "unexpected warning: {r:?}");
    assert!(r.json().get("tollgate").is_none(), "unexpected tollgate object: {}", r.body);
}

/// The free tier's warning at `used` (reservation included): the header, and the body object
/// with the English text of scalix.json.
#[track_caller]
fn assert_free_warning(r: &Reply, used: u64) {
    assert_eq!(warning(r), Some(expected_warning(DAY_LIMIT, used, 80)), "{r:?}");
    let percent = used * 100 / DAY_LIMIT;
    assert!(percent >= 80);
    let expected = json!({
        "metric": "total_tokens", "window": "day", "limit": DAY_LIMIT, "used": used,
        "remaining": DAY_LIMIT.saturating_sub(used), "percent": percent, "reset": rfc3339(next_midnight_ms()),
        "message": format!("You have used {percent}% of your total_tokens this day ({used} of {DAY_LIMIT})."),
        "locale": "en", "upgrade_url": UPGRADE_URL,
    });
    assert_eq!(r.json()["tollgate"], expected, "{}", r.body);
}

/// The model the mock was last asked for.
fn mock_saw_model(stack: &Stack) -> Value {
    get(&agent(), &format!("{}/__mock/last-path", stack.mock_url)).json()["model"].clone()
}

/// scalix.json's free-tier block template in `locale`, filled in.
fn block_text(locale: &str, used: u64) -> String {
    let policy = scalix_policy();
    let template = policy["tiers"]["free"]["messages"]["block"][locale].as_str().expect("block template").to_owned();
    template
        .replace("{used}", &used.to_string())
        .replace("{limit}", &DAY_LIMIT.to_string())
        .replace("{metric}", "total_tokens")
        .replace("{window}", "day")
        .replace("{reset}", &rfc3339(next_midnight_ms()))
        .replace("{upgrade_url}", UPGRADE_URL)
}

// ---------------------------------------------------------------------------------------------
// Tests

/// Free tier, one caller, exact arithmetic all the way: no warning at 6 %, a warning from 80 %
/// (reservation included; header + body object), none again once settlement brought the usage
/// down, no downgrade while the usage before the request is under 100 %, scalix-small (the
/// mock's `mock-small`) from 100 %, and past 150 % the 429 in Arabic for `ar`, in English
/// without `Accept-Language` — never reaching the mock, counting nothing.
#[test]
fn free_tier_warns_past_80_downgrades_past_100_and_blocks_past_150_percent_localized() {
    away_from_day_end();
    let stack = start_scalix("workerd-limits-free");
    let user = [("x-scalix-user", "farah")];
    let big = recorded_total(BIG_ANSWER);
    let middle = recorded_total(MIDDLE_ANSWER);
    let small_prompt = reservation(2, 100); // "Hi", max_tokens 100: the 16-token floor + 100
    assert_eq!(small_prompt, 116);
    let large = prose(6000);
    let mut settled = 0u64;

    // Before anything: zero used, the whole day's tokens left.
    settled_to(&stack, &user, 0, DAY_LIMIT);

    // 1. 116 reserved (6 %): served as asked, no warning; settles to the mock's 17.
    let r = chat(&stack, &user, &body("scalix-free", "Hi", Some(100)));
    assert_served(&r, Some("mock-free"), DAY_LIMIT, DAY_LIMIT - small_prompt);
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("29"), "{r:?}");
    assert_no_warning(&r);
    assert!(r.header("x-tollgate-downgraded-to").is_none(), "{r:?}");
    assert_eq!(mock_saw_model(&stack), "mock-free");
    settled += MOCK_TOTAL;
    settled_to(&stack, &user, settled, DAY_LIMIT);

    // 2. A 6000-byte prompt without max_tokens: 1507 estimated + the tier's default 256 = 1763
    // reserved; 17 + 1763 = 1780 (89 %): warned, in the header and the body.
    let reserve = reservation(6000, 256);
    assert_eq!(reserve, 1763);
    let r = chat(&stack, &user, &body("scalix-free", &large, None));
    assert_served(&r, Some("mock-free"), DAY_LIMIT, DAY_LIMIT - settled - reserve);
    assert_eq!(r.header("x-ratelimit-remaining-tokens"), Some("220"), "{r:?}");
    assert_free_warning(&r, settled + reserve);
    assert!(r.header("x-tollgate-downgraded-to").is_none(), "{r:?}");
    settled += MOCK_TOTAL;
    settled_to(&stack, &user, settled, DAY_LIMIT);
    // The response said 220 remaining with the reservation; settled, the reservation became the
    // reported 17: the endpoint now says 2000 − 34.
    assert_eq!(DAY_LIMIT - settled, 220 + reserve - MOCK_TOTAL);

    // 3. 34 + 116 = 150 (7 %): the warning is gone again. The recording reports `big` (1320).
    let r = chat(&stack, &[user[0], ("x-mock-fixture", BIG_ANSWER)], &body("scalix-free", "Hi", Some(100)));
    assert_served(&r, None, DAY_LIMIT, DAY_LIMIT - settled - small_prompt);
    assert_no_warning(&r);
    settled += big;
    settled_to(&stack, &user, settled, DAY_LIMIT);

    // 4. 1354 settled (67 %) + a 6000-byte prompt with max_tokens 100 (1607) = 2961 (148 %):
    // admitted (≤ 150 %), warned, remaining 0, and still the requested model — the downgrade
    // looks at the usage before the request. The recording reports `big` again.
    let reserve = reservation(6000, 100);
    assert_eq!((settled, reserve), (1354, 1607));
    let r = chat(&stack, &[user[0], ("x-mock-fixture", BIG_ANSWER)], &body("scalix-free", &large, Some(100)));
    assert_served(&r, None, DAY_LIMIT, 0);
    assert_free_warning(&r, settled + reserve);
    assert!(r.header("x-tollgate-downgraded-to").is_none(), "{r:?}");
    assert_eq!(mock_saw_model(&stack), "mock-free");
    settled += big;
    settled_to(&stack, &user, settled, DAY_LIMIT);
    assert_eq!(settled, 2674);

    // 5. 2674 settled (≥ 100 %): served by scalix-small — the header, and the mock was asked
    // for (and echoed) mock-small. 2674 + 116 = 2790 (139 %): warned.
    let r = chat(&stack, &user, &body("scalix-free", "Hi", Some(100)));
    assert_served(&r, Some("mock-small"), DAY_LIMIT, 0);
    assert_eq!(r.header("x-tollgate-downgraded-to"), Some("scalix-small"), "{r:?}");
    assert_free_warning(&r, settled + small_prompt);
    assert_eq!(mock_saw_model(&stack), "mock-small");
    settled += MOCK_TOTAL;
    settled_to(&stack, &user, settled, DAY_LIMIT);

    // 6. Downgraded again (2691 + 116 = 2807 ≤ 150 %); the recording reports `middle` (381),
    // which settles the usage past 150 %: 3072.
    let r = chat(&stack, &[user[0], ("x-mock-fixture", MIDDLE_ANSWER)], &body("scalix-free", "Hi", Some(100)));
    assert_served(&r, None, DAY_LIMIT, 0);
    assert_eq!(r.header("x-tollgate-downgraded-to"), Some("scalix-small"), "{r:?}");
    assert_free_warning(&r, settled + small_prompt);
    assert_eq!(mock_saw_model(&stack), "mock-small");
    settled += middle;
    settled_to(&stack, &user, settled, DAY_LIMIT);
    assert_eq!(settled, 3072);

    // 7. Past 150 %: refused — in Arabic for `ar`, English otherwise — with the upgrade link,
    // retry-after at the day's end, and never forwarded or counted.
    let served = mock_request_count(&agent(), &stack.mock_url);
    for (lang, locale) in [(Some("ar"), "ar"), (Some("fr-CA, ar;q=0.5"), "ar"), (None, "en")] {
        let mut headers = vec![user[0]];
        if let Some(l) = lang {
            headers.push(("accept-language", l));
        }
        let r = chat(&stack, &headers, &body("scalix-free", "Hi", Some(100)));
        assert_eq!(r.status, 429, "Accept-Language {lang:?}: {r:?}");
        let text = block_text(locale, settled);
        let b = r.json();
        assert_eq!(b["error"]["message"], text.as_str(), "Accept-Language {lang:?}: {}", r.body);
        if locale == "ar" {
            assert!(text.starts_with("لقد استخدمت 3072 من أصل 2000 من رصيدك اليومي."), "{text}");
        } else {
            assert!(text.starts_with("You have used 3072 of your 2000 total_tokens this day."), "{text}");
        }
        assert_eq!((&b["error"]["type"], &b["error"]["code"]), (&json!("tokens"), &json!("rate_limit_exceeded")), "{}", r.body);
        assert!(b["error"]["param"].is_null(), "{}", r.body);
        let object = &b["tollgate"];
        assert_eq!(object["message"], text.as_str(), "{}", r.body);
        assert_eq!(
            (object["used"].as_u64(), object["limit"].as_u64(), object["remaining"].as_u64(), object["percent"].as_u64()),
            (Some(3072), Some(DAY_LIMIT), Some(0), Some(153)),
            "{}",
            r.body
        );
        assert_eq!((&object["metric"], &object["window"], &object["upgrade_url"]), (&json!("total_tokens"), &json!("day"), &json!(UPGRADE_URL)));
        assert_eq!(object["reset"], rfc3339(next_midnight_ms()).as_str(), "{}", r.body);
        assert_eq!(r.header("x-tollgate-upgrade-url"), Some(UPGRADE_URL), "{r:?}");
        assert_eq!(r.header("x-ratelimit-limit-tokens"), Some("2000"), "{r:?}");
        assert_eq!(r.header("x-ratelimit-remaining-tokens"), Some("0"), "{r:?}");
        let retry: u64 = r.header("retry-after").expect("retry-after").parse().expect("integer retry-after");
        let to_midnight = (next_midnight_ms() - now_ms()).div_ceil(1000);
        assert!(retry.abs_diff(to_midnight) <= 2, "retry-after {retry} s, the day ends in {to_midnight} s");
        assert!(r.header("x-tollgate-warning").is_none() && r.header("x-tollgate-downgraded-to").is_none(), "{r:?}");
    }
    assert_eq!(mock_request_count(&agent(), &stack.mock_url), served, "a refused request reached the mock");
    settled_to(&stack, &user, 3072, DAY_LIMIT);

    // Another free caller is untouched.
    let r = chat(&stack, &[("x-scalix-user", "omar")], &body("scalix-free", "Hi", Some(100)));
    assert_served(&r, Some("mock-free"), DAY_LIMIT, DAY_LIMIT - small_prompt);
    assert_no_warning(&r);
}

/// Pro warns only at 95 % (94 % is quiet, where free would have warned since 80 %), never
/// downgrades; enterprise has no limit but the global concurrency one: no token or request
/// headers, never refused, whatever it asks.
#[test]
fn pro_warns_only_at_95_percent_and_enterprise_is_never_limited() {
    away_from_day_end();
    let stack = start_scalix("workerd-limits-pro");
    let pro = [("x-scalix-user", "paula"), ("x-scalix-tier", "pro")];
    let mut settled = 0u64;
    settled_to(&stack, &pro, 0, PRO_DAY_LIMIT);

    // 16 + 93984 = 94000 reserved (94 %): no warning.
    let r = chat(&stack, &pro, &body("scalix-pro", "Hi", Some(93_984)));
    assert_served(&r, Some("mock-pro"), PRO_DAY_LIMIT, PRO_DAY_LIMIT - 94_000);
    assert_no_warning(&r);
    settled += MOCK_TOTAL;
    settled_to(&stack, &pro, settled, PRO_DAY_LIMIT);

    // 17 + 16 + 94983 = 95016 (95 %): warned (threshold 95), no downgrade, the body object in
    // the built-in English text (pro has no templates and no upgrade link).
    let r = chat(&stack, &pro, &body("scalix-pro", "Hi", Some(94_983)));
    assert_served(&r, Some("mock-pro"), PRO_DAY_LIMIT, 4_984);
    assert_eq!(warning(&r), Some(expected_warning(PRO_DAY_LIMIT, 95_016, 95)), "{r:?}");
    assert!(r.header("x-tollgate-downgraded-to").is_none(), "{r:?}");
    let object = &r.json()["tollgate"];
    assert_eq!(
        (object["used"].as_u64(), object["remaining"].as_u64(), object["percent"].as_u64(), object["limit"].as_u64()),
        (Some(95_016), Some(4_984), Some(95), Some(PRO_DAY_LIMIT)),
        "{object}"
    );
    assert!(object["upgrade_url"].is_null(), "{object}");
    let message = object["message"].as_str().expect("message");
    assert!(
        message.starts_with("You have used 95% of your total_tokens limit (day): Limit 100000, Used 95016, Remaining 4984."),
        "{message}"
    );
    settled += MOCK_TOTAL;
    settled_to(&stack, &pro, settled, PRO_DAY_LIMIT);
    assert_eq!(usage_of(&stack, &pro)["tier"], "pro");

    // Enterprise: reservations far beyond any free or pro limit (a 6000-byte prompt and a
    // million output tokens), recordings with large usage: all served, no rate-limit headers.
    let ent = [("x-scalix-user", "erin"), ("x-scalix-tier", "enterprise")];
    let large = prose(6000);
    for i in 0..4 {
        let mut headers = ent.to_vec();
        if i % 2 == 1 {
            headers.push(("x-mock-fixture", BIG_ANSWER));
        }
        let r = chat(&stack, &headers, &body("scalix-pro", &large, Some(1_000_000)));
        assert_eq!(r.status, 200, "{r:?}");
        for h in [
            "x-ratelimit-limit-tokens",
            "x-ratelimit-remaining-tokens",
            "x-ratelimit-reset-tokens",
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-requests",
            "x-tollgate-warning",
            "x-tollgate-downgraded-to",
        ] {
            assert!(r.header(h).is_none(), "enterprise response has {h}: {r:?}");
        }
        assert!(r.json().get("tollgate").is_none(), "{}", r.body);
        if i % 2 == 0 {
            assert_eq!(r.json()["model"], "mock-pro", "{}", r.body);
        }
    }
    let report = usage_of(&stack, &ent);
    assert_eq!(report["tier"], "enterprise", "{report}");
    let names: Vec<&str> = report["limits"].as_array().expect("limits").iter().map(|l| l["name"].as_str().expect("name")).collect();
    assert_eq!(names, ["global:concurrent"], "{report}");
}

/// A caller never seen: every count zero, `remaining == limit`, and the limits of the caller's
/// tier (free by default, pro and enterprise by `x-scalix-tier`); asking is not counted.
#[test]
fn usage_endpoint_shows_zeros_and_the_tier_limits_for_a_fresh_caller() {
    away_from_day_end();
    let stack = start_scalix("workerd-limits-usage");
    // The global concurrency limit is a sharded aggregate: each of the default 4 shards
    // enforces (and reports) a quarter of scalix.json's 64.
    let global_share = 64 / 4;
    // (request headers, the tier the caller is in, each limit's name and size)
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, Vec<(&'a str, u64)>);
    let cases: [Case<'_>; 3] = [
        (
            &[("x-scalix-user", "new-free")],
            "free",
            vec![("total_tokens/day", DAY_LIMIT), ("requests/minute", 30), ("concurrent", 4), ("global:concurrent", global_share)],
        ),
        (
            &[("x-scalix-user", "new-pro"), ("x-scalix-tier", "pro")],
            "pro",
            vec![("total_tokens/day", PRO_DAY_LIMIT), ("requests/minute", 120), ("concurrent", 16), ("global:concurrent", global_share)],
        ),
        (&[("x-scalix-user", "new-ent"), ("x-scalix-tier", "enterprise")], "enterprise", vec![("global:concurrent", global_share)]),
    ];
    for (headers, tier, expected) in cases {
        for _ in 0..2 {
            let report = usage_of(&stack, headers);
            assert_eq!(report["object"], "tollgate.usage", "{report}");
            assert_eq!(report["tier"], tier, "{report}");
            let got: Vec<(&str, u64)> = report["limits"]
                .as_array()
                .expect("limits")
                .iter()
                .map(|l| (l["name"].as_str().expect("name"), l["limit"].as_u64().expect("limit")))
                .collect();
            assert_eq!(got, expected, "{report}");
            for l in report["limits"].as_array().expect("limits") {
                assert_eq!(l["used"], 0, "{tier}: {l}");
                assert_eq!(l["remaining"], l["limit"], "{tier}: {l}");
            }
            if tier != "enterprise" {
                let tokens = limit(&report, "total_tokens/day");
                assert_eq!((&tokens["scope"], &tokens["metric"], &tokens["window"]), (&json!("identity"), &json!("total_tokens"), &json!("day")));
                assert_eq!(tokens["reset"], rfc3339(next_midnight_ms()).as_str(), "{tokens}");
                let reset_in = tokens["reset_in_ms"].as_u64().expect("reset_in_ms");
                assert!(reset_in.abs_diff(next_midnight_ms() - now_ms()) < 5_000, "{tokens}");
                let requests = limit(&report, "requests/minute");
                assert_eq!(requests["window"], "minute", "{requests}");
                assert!(requests["reset_in_ms"].as_u64().is_some_and(|ms| ms <= 60_000), "{requests}");
                assert!(limit(&report, "concurrent")["window"].is_null());
            }
            assert_eq!(limit(&report, "global:concurrent")["scope"], "global", "{report}");
        }
    }
    // Nothing was forwarded for asking.
    assert_eq!(mock_request_count(&agent(), &stack.mock_url), 0, "a usage request reached the mock");
}

/// The 429's `tollgate` object names the locale its message is in, as the warning's object
/// does (`"locale": "en"` above).
///
/// (Regression: it once said `""`, in Envoy and the worker alike.)
#[test]
fn block_object_names_the_locale_of_its_message() {
    away_from_day_end();
    let stack = start_scalix("workerd-limits-locale");
    let user = [("x-scalix-user", "lina")];
    let mut settled = 0;
    // 1320 + 1320 + 381 = 3021 (> 150 %), each admitted with 116 reserved.
    for fixture in [BIG_ANSWER, BIG_ANSWER, MIDDLE_ANSWER] {
        let r = chat(&stack, &[user[0], ("x-mock-fixture", fixture)], &body("scalix-free", "Hi", Some(100)));
        assert_eq!(r.status, 200, "{r:?}");
        settled += recorded_total(fixture);
        settled_to(&stack, &user, settled, DAY_LIMIT);
    }
    for (lang, locale) in [(Some("ar-SA"), "ar"), (Some("en-GB"), "en"), (None, "en")] {
        let mut headers = vec![user[0]];
        if let Some(l) = lang {
            headers.push(("accept-language", l));
        }
        let r = chat(&stack, &headers, &body("scalix-free", "Hi", Some(100)));
        assert_eq!(r.status, 429, "{r:?}");
        assert_eq!(r.json()["tollgate"]["message"], block_text(locale, settled).as_str(), "{}", r.body);
        assert_eq!(r.json()["tollgate"]["locale"], locale, "Accept-Language {lang:?}: {}", r.body);
    }
}

// ---------------------------------------------------------------------------------------------
// Prompt privacy

/// The marker every piece of request content in the privacy test carries.
const CANARY: &str = "CANARY-5e1d7b";

/// [`start_scalix`] with scalix.json's free tier also sending a webhook (a `notify` threshold
/// at 10 % of its day's total_tokens) to the mock's `/__mock/webhook`.
fn start_scalix_notifying(name: &str) -> Stack {
    start_scalix_with(name, |policy, mock_url| {
        policy["notify"] = json!({"url": format!("{mock_url}/__mock/webhook")});
        let day = &mut policy["tiers"]["free"]["limits"][0];
        assert_eq!(day["total_tokens"], DAY_LIMIT, "the free tier's first limit is total_tokens/day: {day}");
        day["soft"].as_array_mut().expect("soft thresholds").push(json!({"at": 10, "action": "notify"}));
    })
}

/// Every regular file under `dir`, recursively.
fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let path = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => todo.push(path),
                Ok(t) if t.is_file() => out.push(path),
                _ => {}
            }
        }
    }
    out.sort();
    out
}

/// Whether `haystack` contains `needle`, ASCII case-insensitively, as bytes (binary files too).
fn contains_ignoring_case(haystack: &[u8], needle: &str) -> bool {
    let needle = needle.as_bytes();
    haystack.windows(needle.len()).any(|w| w.eq_ignore_ascii_case(needle))
}

/// `tg1:q:` + the first 16 bytes (hex) of SHA-256(`material`) — core's bucket key
/// (core/src/identity.rs), computed here with `sha256sum`.
fn identity_key(material: &str) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run sha256sum");
    child.stdin.take().expect("stdin").write_all(material.as_bytes()).expect("write to sha256sum");
    let out = child.wait_with_output().expect("sha256sum output");
    let hex = String::from_utf8(out.stdout).expect("hex");
    format!("tg1:q:{}", &hex[..32])
}

/// Prompts, system messages and `user` fields carrying a canary — served, streamed, refused by
/// a guard, and unparseable — leave no trace of it in wrangler/workerd's output, in anything
/// persisted under the state directory (Durable Object SQLite storage, KV), or in the webhook
/// events; the webhook names the caller only by its hashed identity.
#[test]
fn canary_prompt_never_reaches_durable_object_storage_logs_or_webhooks() {
    away_from_day_end();
    let mut stack = start_scalix_notifying("workerd-limits-canary");
    let scratch = stack._scratch.0.clone();
    // No x-scalix-user: the identity comes from the body's `user` field (scalix.json's second
    // source), so the caller's name — the canary — is what gets hashed into the bucket key.
    let user = format!("{CANARY}-user");
    let chat_body = |model: &str, stream: bool| {
        json!({
            "model": model,
            "stream": stream,
            "user": user,
            "messages": [
                {"role": "system", "content": format!("You are a helper. Secret system marker {CANARY}.")},
                {"role": "user", "content": format!("Please repeat {CANARY} and {} back to me.", CANARY.to_lowercase())},
            ],
        })
        .to_string()
    };

    // 1. Served, not streamed: default max_tokens 256 + the prompt ≥ 272 reserved (> 10 % of
    // 2000), so the notify threshold fires.
    let r = chat(&stack, &[], &chat_body("scalix-free", false));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["model"], "mock-free", "{}", r.body);

    // 2. Served, streamed.
    let r = chat(&stack, &[], &chat_body("scalix-free", true));
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.contains("data: [DONE]"), "{}", r.body);

    // 3. Refused by a guard: the free tier may not use scalix-pro.
    let served = mock_request_count(&agent(), &stack.mock_url);
    let r = chat(&stack, &[], &chat_body("scalix-pro", false));
    assert!((400..500).contains(&r.status), "a guard refuses scalix-pro for free: {r:?}");
    assert_eq!(r.json()["error"]["code"], "model_not_allowed", "{}", r.body);

    // 4. Not JSON at all, the canary inside.
    let r = chat(&stack, &[], &format!(r#"{{"model": "scalix-free", "user": "{user}", "messages": [{{"role": "user", "content": "{CANARY} unterminated"#));
    assert!((400..500).contains(&r.status), "invalid JSON is refused: {r:?}");
    assert_eq!(mock_request_count(&agent(), &stack.mock_url), served, "a refused request reached the mock");

    // The webhook is sent from `ctx.wait_until`, after the response: wait for it, then give the
    // streamed request's settlement a moment to be written too.
    let started = Instant::now();
    loop {
        let hooks = get(&agent(), &format!("{}/__mock/webhooks", stack.mock_url)).json();
        if hooks["count"].as_u64().unwrap_or(0) >= 1 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(15), "no webhook was recorded: {hooks}");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));

    // The webhook events: at least one, for the 10 % notify threshold, naming the caller by
    // its hashed identity only, and no canary anywhere (body or path).
    let hooks = get(&agent(), &format!("{}/__mock/webhooks", stack.mock_url)).json();
    let list = hooks["hooks"].as_array().expect("hooks");
    assert!(!list.is_empty(), "{hooks}");
    let want_identity = identity_key(&format!("u:{user}"));
    let mut saw_threshold = false;
    for hook in list {
        let raw = hook.to_string();
        assert!(!contains_ignoring_case(raw.as_bytes(), CANARY), "a webhook carries the canary: {raw}");
        let event: Value = serde_json::from_str(hook["body"].as_str().expect("body")).expect("webhook body is JSON");
        assert_eq!(event["type"], "tollgate.threshold_reached", "{event}");
        assert_eq!(event["identity"], want_identity.as_str(), "the hashed identity of u:{user}: {event}");
        if event["limit"] == "total_tokens/day" && event["threshold_percent"] == 10 {
            saw_threshold = true;
        }
    }
    assert!(saw_threshold, "no event for the 10 % notify threshold: {hooks}");

    // Stop wrangler/workerd so every write (SQLite WAL included) and log line is on disk.
    let log = stack.wrangler.log.clone();
    stack.wrangler.server.stop();

    // wrangler/workerd's stdout+stderr (one file, both streams).
    let output = std::fs::read(&log).expect("read the wrangler log");
    assert!(
        String::from_utf8_lossy(&output).matches("POST /v1/chat/completions").count() >= 4,
        "the wrangler log does not show the four requests: {}",
        String::from_utf8_lossy(&output)
    );
    assert!(
        !contains_ignoring_case(&output, CANARY),
        "wrangler/workerd output carries the canary:\n{}",
        String::from_utf8_lossy(&output)
    );

    // Everything persisted: Durable Object storage, KV, caches — and anything else in the
    // scratch directory (wrangler's own config/log dir under xdg/).
    let state = scratch.join("state");
    let do_files: Vec<_> = files_under(&state.join("v3/do"))
        .into_iter()
        .filter(|p| std::fs::metadata(p).map(|m| m.len() > 0).unwrap_or(false))
        .collect();
    assert!(
        do_files.iter().any(|p| p.extension().is_some_and(|e| e == "sqlite")),
        "no non-empty Durable Object SQLite file under {}: {:?}",
        state.join("v3/do").display(),
        files_under(&state)
    );
    // The search reads what the requests wrote: the caller's counters, under its hashed
    // identity, are in there.
    let key_hex = want_identity.trim_start_matches("tg1:q:");
    assert!(
        do_files.iter().any(|p| contains_ignoring_case(&std::fs::read(p).unwrap_or_default(), key_hex)),
        "the caller's hashed identity {want_identity} is in no Durable Object file: {do_files:?}"
    );
    let all = files_under(&scratch);
    for path in &all {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        assert!(!contains_ignoring_case(&bytes, CANARY), "{} carries the canary", path.display());
    }
    eprintln!("checked {} files ({} non-empty Durable Object files): {do_files:?}", all.len(), do_files.len());
}

/// As in Envoy (envoy_limits.rs): the usage endpoint takes a `user` field identity as `?user=`,
/// and without it answers 400 rather than the address's bucket.
#[test]
fn the_usage_endpoint_takes_the_user_field_identity_as_a_query_parameter() {
    let stack = start_scalix("workerd-limits-usage-user");
    let body = json!({"model": "scalix-free", "user": "zed & co", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}).to_string();
    let r = chat(&stack, &[], &body);
    assert_eq!(r.status, 200, "{r:?}");
    let r = get_with(&format!("{}/v1/tollgate/usage", stack.wrangler.url), &[]);
    assert_eq!((r.status, r.json()["error"]["code"].as_str()), (400, Some("user_required")), "{r:?}");
    let r = get_with(&format!("{}/v1/tollgate/usage?user=zed%20%26%20co", stack.wrangler.url), &[]);
    assert_eq!(r.status, 200, "{r:?}");
    let report = r.json();
    let requests = report["limits"].as_array().unwrap().iter().find(|l| l["name"] == "requests/minute").cloned().unwrap_or_default();
    assert_eq!(requests["used"], 1, "{report}");
}

/// An identity header that is not UTF-8 is refused (400), never hashed as the lossy copy that
/// `user-\xff` and `user-\xfe` would share.
#[test]
fn an_identity_header_that_is_not_utf8_is_refused() {
    let stack = start_scalix("workerd-limits-not-utf8");
    for value in [&b"user-\xff"[..], b"user-\xfe"] {
        let (status, body) = tollgate_host_tests::proc::get_with_raw_header(&stack.wrangler.url, "/v1/tollgate/usage", "x-scalix-user", value);
        assert_eq!(status, 400, "{body}");
        assert!(body.contains("invalid_identity") && body.contains("not valid UTF-8"), "{body}");
    }
    let (status, _) = tollgate_host_tests::proc::get_with_raw_header(&stack.wrangler.url, "/v1/tollgate/usage", "x-scalix-user", "usér-1".as_bytes());
    assert_eq!(status, 200, "UTF-8 is text");
}
