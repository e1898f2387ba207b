//! The `tollgate` binary: exit codes and what it prints.

use std::path::PathBuf;
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn tollgate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tollgate")).args(args).current_dir(root()).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

const POLICIES: [&str; 6] = [
    "policies/templates/free.json",
    "policies/templates/free-downgrade.json",
    "policies/templates/pro.json",
    "policies/templates/image-generation.json",
    "policies/templates/enterprise.json",
    "examples/policies/scalix.json",
];

#[test]
fn check_accepts_every_template_and_the_scalix_example() {
    for policy in POLICIES {
        let out = tollgate(&["check", policy]);
        assert_eq!(out.status.code(), Some(0), "{policy}: {}", text(&out.stderr));
        let stdout = text(&out.stdout);
        assert!(stdout.starts_with(&format!("{policy}: valid\n")), "{stdout}");
        for part in ["time zone: ", "store: ", "identity (sources in order", "tiers:", "notify: "] {
            assert!(stdout.contains(part), "{policy}: no {part:?} in\n{stdout}");
        }
    }
}

#[test]
fn check_prints_the_effective_limits_with_their_thresholds() {
    let out = tollgate(&["check", "examples/policies/scalix.json"]);
    let stdout = text(&out.stdout);
    for line in [
        "  1. header x-scalix-user\n  2. user_field (the body's \"user\")\n  3. client_ip (trusted_hops 0)\n",
        "tier: api_keys 0 listed, header x-scalix-tier, default free\n",
        "      - total_tokens/day: per identity, total_tokens per calendar day, max 2000\n          warn at 80% (1600); downgrade to scalix-small at 100% (2000); block at 150% (3000)\n",
        "      - requests/minute: per identity, requests per calendar minute, max 30\n          block at 100% (30, the default)\n",
        "      - concurrent: per identity, concurrent in flight at once, max 4\n",
        "    messages: block in [ar, en], warn in [ar, en], default locale en, upgrade_url https://scalix.example.com/upgrade, body object yes\n",
        "  enterprise:\n    limits: none (unlimited)\n",
        "global limits:\n  - global:concurrent: per global, concurrent in flight at once, max 64\n",
        "  mock: kind openai, cluster mock, base_url http://127.0.0.1:8081, api key secret none\n",
        "  scalix-free -> mock/mock-free\n",
    ] {
        assert!(stdout.contains(line), "no {line:?} in\n{stdout}");
    }
    let pro = text(&tollgate(&["check", "policies/templates/pro.json"]).stdout);
    assert!(pro.contains("max $20\n          notify at 80% ($16); warn at 95% ($19); block at 100% ($20, the default)\n"), "{pro}");
    assert!(pro.contains("  large: input 30, cached input 30, output 120\n  small: input 0.15, cached input 0.075, output 0.6\n"), "{pro}");
}

#[test]
fn check_refuses_a_broken_policy_naming_the_path() {
    let dir = std::env::temp_dir().join(format!("tollgate-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("broken.json");
    let scalix = std::fs::read_to_string(root().join("examples/policies/scalix.json")).unwrap();
    std::fs::write(&bad, scalix.replace(r#""at": 150, "action": "block""#, r#""at": 150, "action": "explode""#)).unwrap();
    let out = tollgate(&["check", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert_eq!(
        text(&out.stderr),
        format!(
            "error: {}: tiers.free.limits[0].soft[2].action: unknown variant `explode`, expected one of `warn`, `downgrade`, `block`, `notify`\n",
            bad.display()
        )
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn simulate_prints_json_lines_and_text() {
    let out = tollgate(&["simulate", "--json", "examples/policies/scalix.json", "cli/tests/traces/scalix.jsonl"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let lines: Vec<serde_json::Value> = text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let decisions: Vec<&serde_json::Value> = lines.iter().filter(|l| l["type"] == "decision").collect();
    assert_eq!(decisions.len(), 14);
    assert_eq!(lines.iter().filter(|l| l["type"] == "settlement").count(), 12);
    let blocked = decisions.iter().find(|d| d["outcome"] == "denied").unwrap();
    assert_eq!(blocked["line"], 13);
    assert!(blocked["message"].as_str().unwrap().starts_with("لقد استخدمت 3000 من أصل 2000"));
    assert!(!text(&out.stdout).contains("xxxx"), "the request text is never printed");

    let out = tollgate(&["simulate", "examples/policies/scalix.json", "cli/tests/traces/scalix.jsonl"]);
    let stdout = text(&out.stdout);
    assert!(stdout.contains("2026-11-22T10:03:30Z  #10   alice      free       ALLOWED     model scalix-free -> scalix-small (downgraded)\n"), "{stdout}");
    assert!(stdout.contains("2026-11-22T10:05:00Z  #13   alice      free       DENIED 429  rate_limit_exceeded: لقد استخدمت"), "{stdout}");
    assert!(stdout.contains("      x-tollgate-warning: metric=\"total_tokens\", window=\"day\", limit=2000, used=1800"), "{stdout}");
}

#[test]
fn simulate_refuses_a_bad_trace_line_by_number() {
    let dir = std::env::temp_dir().join(format!("tollgate-cli-trace-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let trace = dir.join("bad.jsonl");
    std::fs::write(&trace, "{\"at\": \"2026-11-22T10:00:00Z\", \"identity\": \"a\"}\n\n{\"at\": \"2026-11-22T10:00:01Z\", \"input_tokens\": \"many\"}\n").unwrap();
    let out = tollgate(&["simulate", "examples/policies/scalix.json", trace.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "nothing is replayed");
    let stderr = text(&out.stderr);
    assert!(stderr.starts_with(&format!("error: {}: line 3: invalid type: string \"many\", expected u64", trace.display())), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);

    let out = tollgate(&["simulate", "examples/policies/scalix.json"]);
    assert_eq!(out.status.code(), Some(2), "usage error");
}

/// The policy embedded in examples/envoy/fallback.yaml (the lines between `value: |` and
/// `vm_config:`), as JSON.
fn fallback_example_policy() -> serde_json::Value {
    let yaml = std::fs::read_to_string(root().join("examples/envoy/fallback.yaml")).unwrap();
    let start = yaml.find("value: |\n").unwrap() + "value: |\n".len();
    let end = yaml[start..].find("vm_config:").unwrap() + start;
    serde_json::from_str(&yaml[start..end]).unwrap()
}

/// Writes `policy` to a fresh temporary file (removed with its directory by the caller).
fn policy_file(name: &str, policy: &serde_json::Value) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("tollgate-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("policy.json");
    std::fs::write(&file, serde_json::to_string_pretty(policy).unwrap()).unwrap();
    (dir, file)
}

#[test]
fn check_describes_aliases_fallback_and_health() {
    let mut policy = fallback_example_policy();
    policy["aliases"]["capped"] = serde_json::json!({ "deployments": ["m3", { "model": "m1", "weight": 5 }], "strategy": "weighted" });
    policy["aliases"]["own"] = serde_json::json!({ "deployments": ["m2", "m3", "m1"], "strategy": "least_recently_failed", "max_attempts": 2 });
    policy["fallback"]["on"] = serde_json::json!(["connect", "reset", "408", "429", "50x", "4xx"]);
    policy["health"]["min_remaining_tokens"] = serde_json::json!(1000);
    let (dir, file) = policy_file("aliases", &policy);
    let out = tollgate(&["check", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let expected = "aliases:
  capped: strategy weighted, max_attempts 2 (capped at its 2 deployments), deployments in order: m3 (weight 1), m1 (weight 5)
  own: strategy least_recently_failed, max_attempts 2 (its own), deployments in order: m2 (weight 1), m3 (weight 1), m1 (weight 1)
  scalix-free: strategy priority, max_attempts 3 (fallback.max_attempts), deployments in order: m1 (weight 1), m2 (weight 1), m3 (weight 1)
fallback: on connect, reset, 4xx, 50x; max_attempts 3 (an alias's own overrides it, never more than its deployments), attempt_timeout 30000 ms (until response headers), total_timeout 120000 ms (no new attempt after it)
health: cool down for 30 s after 2 failures within 60 s; retry-after and quota resets honoured up to 600 s; steer away at remaining requests <= 0, remaining tokens <= 1000
notify: ";
    assert!(stdout.contains(expected), "no\n{expected}\nin\n{stdout}");
    let _ = std::fs::remove_dir_all(&dir);

    // The defaults, and an alias-free policy.
    let mut policy = fallback_example_policy();
    let map = policy.as_object_mut().unwrap();
    map.remove("fallback");
    map.remove("health");
    let (dir, file) = policy_file("defaults", &policy);
    let stdout = text(&tollgate(&["check", file.to_str().unwrap()]).stdout);
    assert!(stdout.contains("fallback: on connect, timeout, reset, 429, 5xx; max_attempts 3 "), "{stdout}");
    assert!(stdout.contains("health: cool down for 30 s after 3 failures within 60 s; "), "{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = text(&tollgate(&["check", "examples/policies/scalix.json"]).stdout);
    assert!(stdout.contains("\naliases: none (fallback and health apply to aliases only)\nnotify: "), "{stdout}");
}

#[test]
fn envoy_prints_routes_and_clusters_as_json_and_a_note_on_stderr() {
    let (dir, file) = policy_file("envoy", &fallback_example_policy());
    let out = tollgate(&["envoy", "--deployment-cluster-prefix", "llm-", "--wasm=/opt/filter.wasm", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let routes: Vec<&str> = v["routes"].as_array().unwrap().iter().filter_map(|r| r["route"]["cluster"].as_str()).collect();
    assert_eq!(routes, ["scalix-free.m1", "scalix-free.m2", "scalix-free.m3"]);
    assert_eq!(v["clusters"][1]["cluster_type"]["typed_config"]["clusters"], serde_json::json!(["llm-m2", "llm-m1", "llm-m3"]));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("\"filename\": \"/opt/filter.wasm\""), "{stdout}");
    let stderr = text(&out.stderr);
    assert!(stderr.starts_with(&format!("{}: 3 routes and 3 aggregate clusters for 1 alias.\n", file.display())), "{stderr}");
    assert!(stderr.contains("before its catch-all route") && stderr.contains("llm-m1, llm-m2, llm-m3"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);

    let out = tollgate(&["envoy", "examples/policies/scalix.json"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap(), serde_json::json!({"routes": [], "clusters": []}));
    assert!(text(&out.stderr).starts_with("examples/policies/scalix.json: no aliases in this policy"), "{}", text(&out.stderr));

    for args in [&["envoy"][..], &["envoy", "--wasm"], &["envoy", "--prefix", "x", "p.json"], &["envoy", "a.json", "b.json"]] {
        assert_eq!(tollgate(args).status.code(), Some(2), "{args:?}");
    }
}

#[test]
fn envoy_refuses_a_broken_policy_like_check() {
    let mut policy = fallback_example_policy();
    policy["aliases"]["scalix-free"]["deployments"] = serde_json::json!(["m1", "m9"]);
    let (dir, file) = policy_file("envoy-broken", &policy);
    let check = tollgate(&["check", file.to_str().unwrap()]);
    let envoy = tollgate(&["envoy", file.to_str().unwrap()]);
    assert_eq!((check.status.code(), envoy.status.code()), (Some(1), Some(1)));
    assert!(envoy.stdout.is_empty());
    assert_eq!(text(&envoy.stderr), text(&check.stderr));
    assert!(text(&envoy.stderr).contains("aliases.scalix-free.deployments[1]: unknown model \"m9\""), "{}", text(&envoy.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn every_subcommand_has_its_help_and_bad_usage_exits_2() {
    for (sub, mentions) in [("check", "CONFIG"), ("simulate", "TRACE"), ("envoy", "--deployment-cluster-prefix")] {
        let out = tollgate(&[sub, "--help"]);
        assert_eq!(out.status.code(), Some(0), "{sub} --help");
        let help = text(&out.stdout);
        assert!(help.contains("Usage: tollgate") && help.contains(mentions), "{sub}: {help}");
    }
    let out = tollgate(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(["check", "simulate", "envoy"].iter().all(|s| text(&out.stdout).contains(s)));
    for args in [&[][..], &["nope"], &["check"], &["check", "a.json", "b.json"], &["simulate", "--json", "a.json"]] {
        let out = tollgate(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(text(&out.stderr).contains("Usage:"), "{args:?}: {}", text(&out.stderr));
    }
}

#[test]
fn check_says_where_the_state_lives_and_what_every_replica_must_run() {
    let stdout = text(&tollgate(&["check", "examples/policies/scalix.json"]).stdout);
    assert!(stdout.contains("\n  state: the host's own (Envoy: shared data, one process; worker: Durable Objects)\n"), "{stdout}");
    let policy = serde_json::json!({
        "tier": { "default": "free" },
        "store": { "on_failure": "deny", "redis": { "cluster": "tollgate_store", "timeout_ms": 80, "key_secret": "TOLLGATE_STORE_KEY" } },
        "tiers": { "free": { "limits": [{ "window": "day", "requests": 5 }] } }
    });
    let (dir, file) = policy_file("redis", &policy);
    let out = tollgate(&["check", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let digest = tollgate_core::Policy::from_json(policy.to_string().as_bytes()).unwrap().digest;
    let expected = format!(
        "  state: Redis through the tollgate store service (Envoy cluster tollgate_store, :authority tollgate_store, admission waits at most 80 ms, store key from secret TOLLGATE_STORE_KEY); policy digest {digest} (every replica must run this policy)\n"
    );
    assert!(stdout.contains(&expected), "no\n{expected}\nin\n{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Usage records as Envoy's usage access log writes them (from host-tests/tests/envoy_usage.rs's
/// run), a line without a record, and one carried under "record" as a string.
const RECORDS: &str = r#"{"v":1,"time_ms":1796511540102,"identity":"tg1:q:623360321e236c3c3f88dfccd427fbb6","identity_source":"header","tier":"free","model":"gpt-4o-mini","served_model":"gpt-4o-mini","provider":"openai","upstream_model":"gpt-4o-mini","input_tokens":9,"output_tokens":8,"cost_micro_usd":7,"decision":"allowed","ending":"served","status":200,"stream":false,"ttfb_ms":4,"total_ms":4,"attempts":1}
{"v":1,"time_ms":1796511540109,"identity":"tg1:q:623360321e236c3c3f88dfccd427fbb6","identity_source":"header","tier":"free","model":"claude-sonnet","served_model":"claude-sonnet","provider":"anthropic","upstream_model":"claude-sonnet-4-5","input_tokens":9,"output_tokens":8,"cost_micro_usd":147,"decision":"allowed","ending":"served","status":200,"stream":false,"ttfb_ms":7,"total_ms":8,"attempts":1}
-
{"v":1,"time_ms":1796511540125,"identity":"tg1:q:623360321e236c3c3f88dfccd427fbb6","identity_source":"header","tier":"free","model":"gpt-4o-mini","decision":"blocked","reason":"limit","limit":"requests/minute","status":429,"stream":false,"total_ms":0,"attempts":0}
{"record":"{\"v\":1,\"time_ms\":1796600000000,\"identity\":\"tg1:q:a7f30bcc71c8b151c786e1fa3a0f8f8d\",\"identity_source\":\"api_key_header\",\"api_key\":\"sha256:00ff\",\"tier\":\"pro\",\"model\":\"gpt-4.1\",\"served_model\":\"gpt-4.1\",\"input_tokens\":1000,\"output_tokens\":500,\"cost_micro_usd\":6000,\"decision\":\"allowed\",\"ending\":\"served\",\"status\":200,\"stream\":true,\"attempts\":1}"}
"#;

fn records_file(name: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("tollgate-usage-{}-{name}.jsonl", std::process::id()));
    std::fs::write(&path, RECORDS).unwrap();
    path
}

#[test]
fn usage_prints_totals_and_a_monthly_invoice_from_records() {
    let file = records_file("totals");
    let out = tollgate(&["usage", "--by", "identity,model", "--format", "csv", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let csv = text(&out.stdout);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "identity,model,requests,served,denied,unreported,input_tokens,cached_input_tokens,output_tokens,reasoning_tokens,cost_usd");
    assert!(lines.contains(&"tg1:q:623360321e236c3c3f88dfccd427fbb6,gpt-4o-mini,2,1,1,0,9,0,8,0,0.000007"), "{csv}");
    assert!(lines.contains(&"tg1:q:a7f30bcc71c8b151c786e1fa3a0f8f8d,gpt-4.1,1,1,0,0,1000,0,500,0,0.006000"), "{csv}");
    assert!(text(&out.stderr).contains("1 lines without a record skipped"), "{}", text(&out.stderr));

    // 1796511540102 ms is 2026-12-05; 1796600000000 ms is 2026-12-06: one month.
    let out = tollgate(&["usage", "--invoice", "2026-12", "--markup", "pro=1.5", "--per-request-usd", "0.001", "--format", "json", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let invoices: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let pro = invoices.as_array().unwrap().iter().find(|i| i["identity"] == "tg1:q:a7f30bcc71c8b151c786e1fa3a0f8f8d").unwrap();
    // 6000 × 1.5 + 1 × 1000 micro-USD
    assert_eq!(pro["total_usd"], "0.010000", "{pro}");
    let free = invoices.as_array().unwrap().iter().find(|i| i["identity"] == "tg1:q:623360321e236c3c3f88dfccd427fbb6").unwrap();
    // 7 + 147 + 2 served × 1000 (the blocked request is not charged)
    assert_eq!(free["total_usd"], "0.002154", "{free}");

    let bad = tollgate(&["usage", "--invoice", "2026-13", file.to_str().unwrap()]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(text(&bad.stderr).contains("expected YYYY-MM"), "{}", text(&bad.stderr));
    let _ = std::fs::remove_file(file);
}

#[test]
fn usage_events_are_cloudevents_valid_against_the_published_schema() {
    let schema: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(root().join("cli/tests/schemas/cloudevents.json")).unwrap()).unwrap();
    let validator = jsonschema::options().should_validate_formats(true).build(&schema).expect("the schema compiles");
    let file = records_file("events");
    let out = tollgate(&["usage", "--events", "cloudevents", "--source", "https://gateway.example/tollgate", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let events: Vec<serde_json::Value> = text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(events.len(), 4);
    for e in &events {
        if let Err(err) = validator.validate(e) {
            panic!("{err}: {e}");
        }
        assert_eq!((e["specversion"].as_str(), e["type"].as_str()), (Some("1.0"), Some("tollgate.usage")));
        assert!(e["subject"].as_str().unwrap().starts_with("tg1:q:") && e["data"]["identity"].is_null(), "{e}");
    }
    assert_eq!(events[0]["time"], "2026-12-05T22:59:00.102Z");
    assert_eq!(events[0]["data"]["input_tokens"], 9);
    // The same record read again is the same event (consumers deduplicate on source + id).
    let again = tollgate(&["usage", "--events", "cloudevents", "--source", "https://gateway.example/tollgate", file.to_str().unwrap()]);
    assert_eq!(again.stdout, out.stdout);
    let ids: std::collections::BTreeSet<_> = events.iter().map(|e| e["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(ids.len(), 4);
    // The schema does reject a broken event: the test can fail.
    assert!(!validator.is_valid(&serde_json::json!({ "specversion": "1.0", "id": "", "type": "t", "source": "s" })));
    let _ = std::fs::remove_file(file);
}
