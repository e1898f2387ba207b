//! Each policy template, replayed through the real gate with a trace under `tests/traces/`,
//! gives exactly the decisions its documentation promises.

use std::path::PathBuf;

use tollgate_cli::simulate::{simulate, Decision, Line, Outcome};
use tollgate_cli::{load, Loaded};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn template(name: &str) -> Loaded {
    load(&root().join("policies/templates").join(format!("{name}.json"))).unwrap()
}

fn replay(policy: &Loaded, trace: &str) -> Vec<Line> {
    let path = root().join("cli/tests/traces").join(format!("{trace}.jsonl"));
    let text = std::fs::read_to_string(&path).unwrap();
    let lines = simulate(policy, &text).unwrap();
    let times: Vec<u64> = lines.iter().map(|l| l.decision().map_or_else(|| l.settlement().unwrap().at_ms, |d| d.at_ms)).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{trace}: output is in time order");
    lines
}

fn decisions<'a>(lines: &'a [Line], identity: &str) -> Vec<&'a Decision> {
    lines.iter().filter_map(Line::decision).filter(|d| d.identity.as_deref() == Some(identity)).collect()
}

fn header<'a>(d: &'a Decision, name: &str) -> Option<&'a str> {
    d.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

#[test]
fn free_warns_from_80_percent_and_blocks_at_100_with_the_tier_message() {
    let lines = replay(&template("free"), "free");
    let alice = decisions(&lines, "alice");
    assert_eq!(alice.len(), 11);
    let outcomes: Vec<Outcome> = alice.iter().map(|d| d.outcome).collect();
    assert_eq!(outcomes[..10], [Outcome::Allowed; 10]);
    assert_eq!(outcomes[10], Outcome::Denied);
    // 1000 tokens a request against 10000 a day: request 8 takes usage to 80 %.
    let warned: Vec<usize> = alice.iter().enumerate().filter(|(_, d)| d.warning.is_some()).map(|(i, _)| i + 1).collect();
    assert_eq!(warned, vec![8, 9, 10]);
    assert_eq!(
        alice[7].warning.as_deref(),
        Some(r#"metric="total_tokens", window="day", limit=10000, used=8000, remaining=2000, percent=80, threshold=80, reset=1795392000"#)
    );
    assert_eq!(
        alice[7].warning_message.as_deref(),
        Some("You have used 80% of your total_tokens for this day (8000 of 10000). Upgrade: https://example.com/upgrade?plan=pro")
    );
    assert_eq!(header(alice[9], "x-ratelimit-remaining-tokens"), Some("0"));
    // The 80 % notify threshold posts one webhook event, on the request that reached it.
    let with_events: Vec<usize> = alice.iter().enumerate().filter(|(_, d)| !d.events.is_empty()).map(|(i, _)| i + 1).collect();
    assert_eq!(with_events, vec![8]);
    let event = &alice[7].events[0];
    assert_eq!(event["type"], "tollgate.threshold_reached");
    assert_eq!((event["threshold_percent"].as_u64(), event["used"].as_u64()), (Some(80), Some(8000)));
    assert!(event["identity"].as_str().unwrap().starts_with("tg1:q:"), "hashed, never the raw identity");

    let denied = alice[10];
    assert_eq!((denied.status, denied.code.as_deref()), (429, Some("rate_limit_exceeded")));
    assert_eq!(
        denied.message.as_deref(),
        Some("You have used 10000 of your 10000 total_tokens this day. It resets at 2026-11-23T00:00:00Z (in 13h58m20s). Upgrade for more: https://example.com/upgrade?plan=pro")
    );
    assert_eq!(header(denied, "retry-after"), Some("50300"));
    assert_eq!(header(denied, "x-tollgate-upgrade-url"), Some("https://example.com/upgrade?plan=pro"));
    assert!(denied.served_model.is_none());

    // Every admitted request is settled once, two seconds later.
    let settled: Vec<usize> = lines.iter().filter_map(Line::settlement).filter(|s| s.identity.as_deref() == Some("alice")).map(|s| s.line).collect();
    assert_eq!(settled, alice[..10].iter().map(|d| d.line).collect::<Vec<_>>());
}

#[test]
fn free_refuses_a_third_request_in_flight_and_admits_once_two_have_ended() {
    let lines = replay(&template("free"), "free");
    let bob = decisions(&lines, "bob");
    let outcomes: Vec<Outcome> = bob.iter().map(|d| d.outcome).collect();
    assert_eq!(outcomes, vec![Outcome::Allowed, Outcome::Allowed, Outcome::Denied, Outcome::Allowed]);
    assert_eq!(header(bob[2], "retry-after"), Some("1"));
    // The two long requests settle at 11:01:00, before the request made at that instant.
    let last = lines.iter().position(|l| l.decision().is_some_and(|d| d.line == bob[3].line)).unwrap();
    let settled_before = lines[..last].iter().filter_map(Line::settlement).filter(|s| s.identity.as_deref() == Some("bob")).count();
    assert_eq!(settled_before, 2);
}

#[test]
fn free_downgrade_serves_small_past_100_percent_until_midnight_in_the_policy_zone() {
    let lines = replay(&template("free-downgrade"), "free-downgrade");
    let alice = decisions(&lines, "alice");
    assert_eq!(alice.len(), 18);
    let served: Vec<Option<&str>> = alice.iter().map(|d| d.served_model.as_deref()).collect();
    let mut expected = vec![Some("large"); 10];
    expected.extend([Some("small"); 5]);
    expected.extend([None, None, Some("large")]);
    assert_eq!(served, expected);
    assert!(alice[10..15].iter().all(|d| d.downgraded && header(d, "x-tollgate-downgraded-to") == Some("small")));
    assert!(!alice[17].downgraded);
    // 150 %: the 16th request (and one at 20:59Z, 23:59 in Riyadh) is refused.
    for d in &alice[15..17] {
        assert_eq!((d.outcome, d.status), (Outcome::Denied, 429));
        assert!(d.message.as_deref().unwrap().starts_with("Usage limit reached for total_tokens (day): Limit 10000, Used 15000."));
    }
    assert_eq!(header(alice[16], "retry-after"), Some("60"), "the Riyadh day ends at 21:00Z");
    // 21:00:30Z is 00:00:30 in Riyadh: a new day, while the UTC day has not ended.
    assert_eq!(alice[17].at, "2026-11-22T21:00:30Z");
    assert_eq!(header(alice[17], "x-ratelimit-remaining-tokens"), Some("9000"));
}

#[test]
fn pro_warns_at_95_percent_and_refuses_when_the_month_budget_is_spent() {
    let lines = replay(&template("pro"), "pro");
    let alice = decisions(&lines, "alice");
    assert!(alice.iter().all(|d| d.outcome == Outcome::Allowed));
    let warned: Vec<usize> = alice.iter().enumerate().filter(|(_, d)| d.warning.is_some()).map(|(i, _)| i + 1).collect();
    assert_eq!(warned, vec![10], "95000 tokens a request: 950000 of 1000000 is 95 %");
    assert!(alice[9].warning.as_deref().unwrap().contains("used=950000, remaining=50000, percent=95, threshold=95"));

    let bob = decisions(&lines, "bob");
    let outcomes: Vec<Outcome> = bob.iter().map(|d| d.outcome).collect();
    let mut expected = vec![Outcome::Allowed; 13];
    expected.extend([Outcome::Denied, Outcome::Denied, Outcome::Allowed]);
    assert_eq!(outcomes, expected);
    // $1.50 a request against $20 a month: the 13th reaches $19.50 (97 %), the 11th $16.50 (80 % notify).
    let warned: Vec<usize> = bob.iter().enumerate().filter(|(_, d)| d.warning.is_some()).map(|(i, _)| i + 1).collect();
    assert_eq!(warned, vec![13]);
    assert!(bob[12].warning.as_deref().unwrap().starts_with(r#"metric="cost_usd", window="month", limit=20000000, used=19500000"#));
    let notified: Vec<usize> = bob.iter().enumerate().filter(|(_, d)| !d.events.is_empty()).map(|(i, _)| i + 1).collect();
    assert_eq!(notified, vec![11]);
    assert_eq!(bob[10].events[0]["limit"], "cost_usd/month");
    let denied = bob[13];
    assert_eq!(denied.at, "2026-11-14T12:00:00Z");
    assert_eq!(
        denied.message.as_deref(),
        Some("Usage limit reached for cost (micro-USD) (month): Limit 20000000, Used 19500000. Please try again in 396h0m0s.")
    );
    assert_eq!(header(denied, "retry-after"), Some("1425600"));
    assert_eq!(bob[14].at, "2026-11-30T23:59:00Z");
    assert_eq!(bob[15].at, "2026-12-01T00:00:10Z", "a new month, a new budget");
}

#[test]
fn image_generation_refuses_the_sixth_request_in_a_minute_and_allows_the_next_minute() {
    let lines = replay(&template("image-generation"), "image-generation");
    let alice = decisions(&lines, "alice");
    let summary: Vec<(&str, Outcome, u16)> = alice.iter().map(|d| (&d.at[11..19], d.outcome, d.status)).collect();
    assert_eq!(
        summary,
        vec![
            ("10:00:00", Outcome::Allowed, 200),
            ("10:00:05", Outcome::Allowed, 200),
            ("10:00:10", Outcome::Allowed, 200),
            ("10:00:15", Outcome::Allowed, 200),
            ("10:00:20", Outcome::Allowed, 200),
            ("10:00:25", Outcome::Denied, 429),
            ("10:00:40", Outcome::Refused, 404),
            ("10:01:00", Outcome::Allowed, 200),
        ]
    );
    assert_eq!(header(alice[4], "x-ratelimit-remaining-requests"), Some("0"));
    assert_eq!(header(alice[5], "retry-after"), Some("35"));
    assert_eq!(alice[5].message.as_deref(), Some("Usage limit reached for requests (minute): Limit 5, Used 5. Please try again in 35s."));
    assert_eq!(alice[6].code.as_deref(), Some("model_not_found"));
    assert_eq!(header(alice[7], "x-ratelimit-remaining-requests"), Some("4"));
}

#[test]
fn enterprise_allows_a_thousand_requests() {
    let lines = replay(&template("enterprise"), "enterprise");
    let all: Vec<&Decision> = lines.iter().filter_map(Line::decision).collect();
    assert_eq!(all.len(), 1000);
    assert!(all.iter().all(|d| d.outcome == Outcome::Allowed && d.tier == "enterprise" && d.warning.is_none()));
    assert_eq!(lines.iter().filter_map(Line::settlement).count(), 1000);
}

#[test]
fn scalix_free_downgrades_then_blocks_in_the_clients_language() {
    let scalix = load(&root().join("examples/policies/scalix.json")).unwrap();
    let lines = replay(&scalix, "scalix");
    let alice = decisions(&lines, "alice");
    assert_eq!(alice.len(), 12);
    // 300 tokens a request against 2000 a day: 80 % at the 6th, scalix-small from the 8th
    // (usage before it 2100), refused at the 11th (3000 + 300 > 150 %).
    let warned: Vec<usize> = alice.iter().enumerate().filter(|(_, d)| d.warning.is_some()).map(|(i, _)| i + 1).collect();
    assert_eq!(warned, (6..=10).collect::<Vec<_>>());
    assert_eq!(alice[5].warning_message.as_deref(), Some("لقد استخدمت 90% من رصيدك اليومي (1800 من أصل 2000)."));
    let served: Vec<Option<&str>> = alice.iter().map(|d| d.served_model.as_deref()).collect();
    let mut expected = vec![Some("scalix-free"); 7];
    expected.extend([Some("scalix-small"); 3]);
    expected.extend([None, None]);
    assert_eq!(served, expected);

    let ar = alice[10];
    assert_eq!((ar.outcome, ar.status), (Outcome::Denied, 429));
    assert_eq!(
        ar.message.as_deref(),
        Some("لقد استخدمت 3000 من أصل 2000 من رصيدك اليومي. يتجدد الرصيد في 2026-11-23T00:00:00Z. للترقية إلى الباقة الاحترافية: https://scalix.example.com/upgrade")
    );
    let en = alice[11];
    assert_eq!(
        en.message.as_deref(),
        Some("You have used 3000 of your 2000 total_tokens this day. Your quota resets at 2026-11-23T00:00:00Z. Upgrade to Pro: https://scalix.example.com/upgrade")
    );

    let carol = decisions(&lines, "carol");
    assert_eq!((carol[0].tier.as_str(), carol[0].outcome, carol[0].served_model.as_deref()), ("pro", Outcome::Allowed, Some("scalix-pro")));
    let anonymous: Vec<&Decision> = lines.iter().filter_map(Line::decision).filter(|d| d.identity.is_none()).collect();
    assert_eq!(anonymous.len(), 1);
    assert_eq!((anonymous[0].tier.as_str(), anonymous[0].outcome), ("free", Outcome::Allowed));
    assert_eq!(header(anonymous[0], "x-ratelimit-remaining-tokens"), Some("1700"), "its own bucket, by client address");
}
