//! Usage records through Envoy's own access logging, in a real Envoy 1.40 (V8): the release
//! filter.wasm with `examples/envoy/providers.yaml` as shipped (its `tollgate-usage` file access
//! log pointed at a temporary file instead of stdout), the mock provider on loopback for all
//! three provider clusters. A scripted run — passed through, translated, streamed both ways,
//! refused by a guard, blocked by a limit — and then the log: one record per request, whose
//! tokens are what the provider reported (as the client saw them in `usage`), whose decisions
//! and limits are the gate's, and in which neither the canary prompt nor the answer appears.
//!
//! Needs `scripts/build-wasm.sh`, the release mock provider and Envoy (`scripts/test.sh`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tollgate_host_tests::envoy::{self, providers_on_mocks, TempDir};
use tollgate_host_tests::proc::{agent, post_json, start_mock_provider_with};
use tollgate_host_tests::workerd::open_stream;

const CANARY: &str = "CANARY-PROMPT-5d1e0b7a";

/// Waits out the last seconds of a minute, so the minute window cannot reset mid-test.
fn away_from_minute_boundary() {
    let ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
    if ms % 60_000 > 45_000 {
        std::thread::sleep(Duration::from_millis(60_000 - ms % 60_000 + 100));
    }
}

/// The OpenAI `usage` of a non-stream answer, or of a stream's usage chunk.
fn client_usage(body: &str, stream: bool) -> Value {
    if !stream {
        return serde_json::from_str::<Value>(body).unwrap()["usage"].clone();
    }
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find_map(|c| c.get("usage").filter(|u| !u.is_null()).cloned())
        .unwrap_or_else(|| panic!("no usage chunk in {body}"))
}

#[test]
fn the_access_log_holds_one_record_per_request_with_the_providers_usage_and_no_content() {
    let (_mock, mock_url) = start_mock_provider_with(&[]);
    let port: u16 = mock_url.rsplit(':').next().unwrap().parse().unwrap();
    let mut rendered = providers_on_mocks(port, port, port, None);
    let dir = TempDir::new("envoy-usage");
    let log = dir.path().join("usage.jsonl");
    assert_eq!(rendered.yaml.matches("path: /dev/stdout").count(), 1, "the example's usage log moved: update this test");
    rendered.yaml = rendered.yaml.replace("path: /dev/stdout", &format!("path: {}", log.display()));
    let env = [("ANTHROPIC_API_KEY", "sk-ant-x"), ("GEMINI_API_KEY", "AIza-x"), ("OPENAI_API_KEY", "sk-proj-x")];
    let envoy = envoy::start(&rendered, &env);
    let url = format!("{}/v1/chat/completions", envoy.url);
    let http = agent();
    away_from_minute_boundary();

    let chat = |model: &str, stream: bool| {
        let mut body = json!({ "model": model, "max_tokens": 64, "messages": [{ "role": "user", "content": format!("{CANARY} say hi") }] });
        if stream {
            body["stream"] = json!(true);
            body["stream_options"] = json!({ "include_usage": true });
        }
        body.to_string()
    };
    // (model, stream, expected status): the free tier allows 5 requests a minute per user.
    let script = [
        ("gpt-4o-mini", false, 200),
        ("claude-sonnet", false, 200),
        ("gemini-flash", true, 200),
        ("claude-sonnet", true, 200),
        ("gpt-4.1", true, 200),
        ("gpt-4o-mini", false, 429),
    ];
    let mut answers = Vec::new();
    for (model, stream, status) in script {
        let r = post_json(&http, &url, &[("x-tollgate-user", "alice")], &chat(model, stream));
        assert_eq!(r.status, status, "{model} stream={stream}: {}", r.body);
        answers.push(r);
    }
    // A request its provider cannot take (n: 2 for Anthropic): refused after admission, never sent.
    let refused = post_json(&http, &url, &[("x-tollgate-user", "bob")], &json!({ "model": "claude-sonnet", "n": 2, "messages": [{ "role": "user", "content": CANARY }] }).to_string());
    assert_eq!(refused.status, 400, "{}", refused.body);

    // A client that leaves in the middle of a slow stream (the mock waits 100 ms between events;
    // Envoy logs the stream once the provider's side is done too).
    let slow = chat("claude-sonnet", true);
    let (conn, first) = open_stream(&envoy.url, &[("x-tollgate-user", "carol"), ("x-mock-delay-ms", "100")], &slow);
    assert!(first.starts_with("HTTP/1.1 200") && first.contains("data:"), "{first}");
    drop(conn);

    // Access logs are written when the stream is done, and flushed within a second.
    let expected = script.len() + 2;
    let started = Instant::now();
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.lines().count() >= expected || started.elapsed() > Duration::from_secs(30) {
            break text;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let records: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
    assert_eq!(records.len(), expected, "{text}");
    assert!(!text.contains(CANARY), "the prompt reached the usage log");
    for r in &answers[..5] {
        let stream = r.header("content-type").is_some_and(|c| c.starts_with("text/event-stream"));
        if !stream {
            let content = serde_json::from_str::<Value>(&r.body).unwrap()["choices"][0]["message"]["content"].as_str().unwrap_or("").to_owned();
            assert!(content.len() < 8 || !text.contains(&content), "the answer reached the usage log");
        }
    }

    let alice_key = records[0]["identity"].as_str().unwrap().to_owned();
    assert!(alice_key.starts_with("tg1:q:") && !text.contains("alice"), "{text}");
    for (i, (model, stream, _)) in script.iter().enumerate().take(5) {
        let rec = &records[i];
        let usage = client_usage(&answers[i].body, *stream);
        assert_eq!(
            (rec["v"].as_u64(), rec["identity"].as_str(), rec["tier"].as_str(), rec["model"].as_str(), rec["stream"].as_bool()),
            (Some(1), Some(alice_key.as_str()), Some("free"), Some(*model), Some(*stream)),
            "{rec}"
        );
        assert_eq!((rec["decision"].as_str(), rec["ending"].as_str(), rec["status"].as_u64()), (Some("allowed"), Some("served"), Some(200)), "{rec}");
        assert_eq!(rec["input_tokens"], usage["prompt_tokens"], "{model}: {rec} vs the client's {usage}");
        assert_eq!(rec["output_tokens"], usage["completion_tokens"], "{model}: {rec} vs the client's {usage}");
        assert!(rec["cost_micro_usd"].as_u64().is_some_and(|c| c > 0), "{rec}");
        assert!(rec["ttfb_ms"].as_u64().is_some() && rec["total_ms"].as_u64() >= rec["ttfb_ms"].as_u64(), "{rec}");
        assert_eq!(rec["attempts"].as_u64(), Some(1), "{rec}");
    }
    let provider = |i: usize| records[i]["provider"].as_str().map(str::to_owned);
    assert_eq!((provider(0), provider(1), provider(2)), (Some("openai".into()), Some("anthropic".into()), Some("gemini".into())));
    assert_eq!(records[1]["upstream_model"].as_str(), Some("claude-sonnet-4-5"));

    // The usage endpoint counts what the records say: alice's five forwarded requests (the
    // blocked sixth is not counted), and `tollgate usage` sums the log to the same figures.
    let endpoint = tollgate_host_tests::workerd::get_with(&format!("{}/v1/tollgate/usage", envoy.url), &[("x-tollgate-user", "alice")]);
    let endpoint: Value = serde_json::from_str(&endpoint.body).unwrap();
    let used_per_minute = endpoint["limits"].as_array().unwrap().iter().find(|l| l["name"] == "requests/minute").unwrap()["used"].as_u64();
    let (totals, _) = tollgate_cli::usage::summarize(&mut text.as_bytes(), &[tollgate_cli::usage::Dim::Identity], &|_| true, &mut std::io::sink(), 0).unwrap();
    let alice = &totals[&vec![alice_key.clone()]];
    assert_eq!((Some(alice.served), alice.requests, alice.denied), (used_per_minute, 6, 1), "{endpoint}");
    let sum = |field: &str| records[..5].iter().map(|r| r[field].as_u64().unwrap()).sum::<u64>();
    assert_eq!((alice.input_tokens, alice.output_tokens, alice.cost_micro_usd), (sum("input_tokens"), sum("output_tokens"), sum("cost_micro_usd")));

    let blocked = &records[5];
    assert_eq!(
        (blocked["decision"].as_str(), blocked["reason"].as_str(), blocked["limit"].as_str(), blocked["status"].as_u64()),
        (Some("blocked"), Some("limit"), Some("requests/minute"), Some(429)),
        "{blocked}"
    );
    assert!(blocked.get("input_tokens").is_none() && blocked.get("ending").is_none(), "{blocked}");
    let refused = records.iter().find(|r| r["decision"] == "refused").expect("the refused record");
    assert_eq!(
        (refused["decision"].as_str(), refused["reason"].as_str(), refused["ending"].as_str(), refused["status"].as_u64()),
        (Some("refused"), Some("invalid"), Some("not_sent"), Some(400)),
        "{refused}"
    );
    assert_ne!(refused["identity"], records[0]["identity"]);
    // The client gone: the record as of the last usage event before it left (Anthropic's
    // message_start reports the prompt), served, 200, and no later usage.
    let gone = records.iter().find(|r| r["identity"] != records[0]["identity"] && r["identity"] != refused["identity"]).expect("carol's record");
    assert_eq!((gone["ending"].as_str(), gone["status"].as_u64(), gone["stream"].as_bool()), (Some("served"), Some(200), Some(true)), "{gone}");
    assert_eq!(gone["input_tokens"], records[3]["input_tokens"], "{gone}");
    assert!(gone["output_tokens"].as_u64() < records[3]["output_tokens"].as_u64(), "the whole answer's usage: {gone}");

    let samples = the_prometheus_scrape_agrees_with_the_records(&envoy.admin, &records);
    every_dashboard_query_names_what_envoy_exposes(&samples);
}

/// The metric names (an identifier before `{` or `[`) and label names (in `by (…)` and in
/// `{…}` matchers) of a PromQL expression.
fn promql_names(expr: &str) -> (Vec<String>, Vec<String>) {
    let (mut metrics, mut labels) = (Vec::new(), Vec::new());
    let chars: Vec<char> = expr.chars().collect();
    let (mut i, mut in_braces, mut in_by) = (0, false, false);
    while i < chars.len() {
        let c = chars[i];
        if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            continue;
        }
        if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = chars[i..].iter().find(|c| !c.is_whitespace()).copied();
            if in_braces || in_by {
                labels.push(word);
            } else if matches!(next, Some('{') | Some('[')) {
                metrics.push(word);
            } else if word == "by" && next == Some('(') {
                in_by = true;
                while chars[i] != '(' {
                    i += 1;
                }
                i += 1;
            }
            continue;
        }
        match c {
            '{' => in_braces = true,
            '}' => in_braces = false,
            ')' if in_by => in_by = false,
            _ => {}
        }
        i += 1;
    }
    (metrics, labels)
}

/// examples/grafana/tollgate.json: every panel's every query names metrics this Envoy exposes
/// after the run, with labels those metrics carry.
fn every_dashboard_query_names_what_envoy_exposes(samples: &[PromSample]) {
    let path = tollgate_host_tests::proc::workspace_root().join("examples/grafana/tollgate.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 8, "{} panels", panels.len());
    let mut checked = 0;
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or("?");
        let targets = panel["targets"].as_array().filter(|t| !t.is_empty()).unwrap_or_else(|| panic!("{title}: no queries"));
        for target in targets {
            let expr = target["expr"].as_str().unwrap_or_else(|| panic!("{title}: a query without expr"));
            let (metrics, labels) = promql_names(expr);
            assert!(!metrics.is_empty(), "{title}: no metric in {expr}");
            for metric in &metrics {
                let series: Vec<&PromSample> = samples.iter().filter(|(n, _, _)| n == metric).collect();
                assert!(!series.is_empty(), "{title}: {metric} is not exposed by Envoy ({expr})");
                for label in labels.iter().filter(|l| *l != "le" || metric.ends_with("_bucket")) {
                    assert!(series.iter().any(|(_, l, _)| l.contains_key(label)), "{title}: {metric} has no label {label} ({expr})");
                }
                checked += 1;
            }
        }
    }
    assert!(checked >= 20, "{checked} metric references checked");
}

#[test]
fn promql_names_are_read_from_queries() {
    let (m, l) = promql_names(r#"histogram_quantile(0.95, sum by (le, gen_ai_response_model) (rate(x_bucket{a="b{c}", d!~"e"}[$__rate_interval]))) / 1e6"#);
    assert_eq!((m, l), (vec!["x_bucket".to_owned()], vec!["le".to_owned(), "gen_ai_response_model".to_owned(), "a".to_owned(), "d".to_owned()]));
}

/// One sample of Prometheus' text format: name, labels, value.
type PromSample = (String, BTreeMap<String, String>, f64);

/// Envoy's `/stats/prometheus`, parsed (comments skipped).
fn scrape(admin: &str) -> Vec<PromSample> {
    let text = tollgate_host_tests::workerd::get_with(&format!("{admin}/stats/prometheus"), &[]).body;
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("a sample: {line}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("a value: {line}"));
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let labels = labels
            .split("\",")
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once("=\"").unwrap_or_else(|| panic!("a label: {line}"));
                (k.to_owned(), v.trim_end_matches('"').to_owned())
            })
            .collect();
        out.push((name.to_owned(), labels, value));
    }
    out
}

/// The sum of the samples named `name` whose labels include `with`.
fn total(samples: &[PromSample], name: &str, with: &[(&str, &str)]) -> f64 {
    samples.iter().filter(|(n, l, _)| n == name && with.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))).map(|(_, _, v)| v).sum()
}

/// Labelled metrics as Prometheus scrapes them from this Envoy: names without Envoy's prefix,
/// labels extracted by providers.yaml's `stats_tags`, and values that are the records' (the
/// records were checked against what the clients were told).
fn the_prometheus_scrape_agrees_with_the_records(admin: &str, records: &[Value]) -> Vec<PromSample> {
    // Histograms show after a stats flush (every 5 s by default).
    let started = Instant::now();
    let samples = loop {
        let samples = scrape(admin);
        let durations = total(&samples, "gen_ai_client_operation_duration_ms_count", &[]);
        if durations >= 5.0 || started.elapsed() > Duration::from_secs(20) {
            break samples;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let requests = "tollgate_requests_total";
    let labelled: Vec<&PromSample> = samples.iter().filter(|(n, _, _)| n == requests).collect();
    assert!(!labelled.is_empty(), "no {requests} in the scrape");
    for (_, labels, _) in &labelled {
        let names: Vec<&str> = labels.keys().map(String::as_str).collect();
        assert_eq!(names, ["decision", "gen_ai_provider_name", "gen_ai_request_model", "limit", "reason", "status_class", "tier"], "{labels:?}");
    }
    assert_eq!(total(&samples, requests, &[]), records.len() as f64, "one count per record");
    for decision in ["allowed", "blocked", "refused"] {
        let want = records.iter().filter(|r| r["decision"] == decision).count() as f64;
        assert_eq!(total(&samples, requests, &[("decision", decision)]), want, "{decision}");
    }
    assert_eq!(total(&samples, requests, &[("decision", "blocked"), ("limit", "requests/minute"), ("reason", "limit"), ("status_class", "4xx"), ("tier", "free")]), 1.0);
    assert_eq!(total(&samples, requests, &[("decision", "refused"), ("reason", "invalid"), ("gen_ai_request_model", "claude-sonnet"), ("gen_ai_provider_name", "anthropic")]), 1.0);
    // A model name with a dot survives as one label value.
    assert_eq!(total(&samples, requests, &[("gen_ai_request_model", "gpt-4.1"), ("gen_ai_provider_name", "openai"), ("decision", "allowed")]), 1.0);

    // Tokens and cost per served model and provider: the records' sums.
    for model in ["gpt-4o-mini", "claude-sonnet", "gemini-flash", "gpt-4.1"] {
        let of = |field: &str| records.iter().filter(|r| r["served_model"] == model && r["decision"] == "allowed").filter_map(|r| r[field].as_u64()).sum::<u64>() as f64;
        for (kind, field) in [("input", "input_tokens"), ("output", "output_tokens")] {
            let got = total(&samples, "tollgate_tokens_total", &[("gen_ai_response_model", model), ("gen_ai_token_type", kind)]);
            assert_eq!(got, of(field), "{model} {kind} tokens");
        }
        assert_eq!(total(&samples, "tollgate_cost_micro_usd_total", &[("gen_ai_response_model", model)]), of("cost_micro_usd"), "{model} cost");
        let served = records.iter().filter(|r| r["served_model"] == model && r["attempts"].as_u64() > Some(0)).count() as f64;
        assert_eq!(total(&samples, "gen_ai_client_operation_duration_ms_count", &[("gen_ai_response_model", model)]), served, "{model} durations");
    }
    let streams = records.iter().filter(|r| r["stream"] == true && r["ttfb_ms"].is_u64()).count() as f64;
    assert_eq!(total(&samples, "gen_ai_server_time_to_first_token_ms_count", &[]), streams, "one time to first token per stream");
    // The unlabelled counters are still there, without Envoy's prefix too.
    assert!(samples.iter().any(|(n, _, _)| n == "tollgate_requests_allowed"), "tollgate_requests_allowed");
    samples
}

/// examples/envoy/usage-otel.yaml, spliced into providers.yaml in place of its file log, is a
/// configuration Envoy 1.40 accepts (the OpenTelemetry access logger and its collector cluster).
#[test]
fn the_opentelemetry_usage_log_example_is_a_valid_envoy_configuration() {
    let fragment = std::fs::read_to_string(tollgate_host_tests::proc::workspace_root().join("examples/envoy/usage-otel.yaml")).unwrap();
    let body: Vec<&str> = fragment.lines().filter(|l| !l.starts_with('#')).collect();
    let split = body.iter().position(|l| *l == "clusters:").expect("a clusters: part");
    let indent = |lines: &[&str], by: usize| lines.iter().map(|l| format!("{}{l}\n", " ".repeat(by))).collect::<String>();
    let access_log = indent(&body[..split], 10);
    let cluster = indent(&body[split + 1..], 2);

    let mut rendered = providers_on_mocks(1, 1, 1, None);
    let start = rendered.yaml.find("          access_log:\n").expect("providers.yaml's access log");
    let end = start + rendered.yaml[start..].find("%FILTER_STATE(wasm.tollgate.record:PLAIN)%\\n\"\n").expect("its format line") + "%FILTER_STATE(wasm.tollgate.record:PLAIN)%\\n\"\n".len();
    rendered.yaml.replace_range(start..end, &access_log);
    let at = rendered.yaml.find("  clusters:\n").expect("clusters") + "  clusters:\n".len();
    rendered.yaml.insert_str(at, &cluster);
    assert!(rendered.yaml.contains("OpenTelemetryAccessLogConfig") && !rendered.yaml.contains("FileAccessLog"));
    let dir = TempDir::new("envoy-validate-otel");
    let config = dir.path().join("envoy.yaml");
    std::fs::write(&config, &rendered.yaml).unwrap();
    let out = std::process::Command::new(envoy::envoy_bin())
        .args(["--mode", "validate", "--log-level", "warn", "-c"])
        .arg(&config)
        .envs([("ANTHROPIC_API_KEY", "a"), ("GEMINI_API_KEY", "g"), ("OPENAI_API_KEY", "o")])
        .output()
        .expect("run envoy --mode validate");
    let output = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{output}\n{}", rendered.yaml);
}

/// Each shipped Envoy config extracts every label the filter encodes (core's `metrics::LABELS`):
/// a label without its rule would stay in the metric's name, one name per value.
#[test]
fn every_shipped_envoy_config_extracts_every_label() {
    for file in ["envoy.yaml", "examples/envoy/providers.yaml", "examples/envoy/fallback.yaml"] {
        let text = std::fs::read_to_string(tollgate_host_tests::proc::workspace_root().join(file)).unwrap();
        for label in tollgate_core::metrics::LABELS {
            let rule = format!(r#"{{ tag_name: {label}, regex: "({label}=\\.=(.*?);\\.;)" }}"#);
            assert!(text.contains(&rule), "{file}: no rule {rule}");
        }
    }
}
