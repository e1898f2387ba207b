//! Usage records through Envoy's own access logging, in a real Envoy 1.40 (V8): the release
//! filter.wasm with `examples/envoy/providers.yaml` as shipped (its `tollgate-usage` file access
//! log pointed at a temporary file instead of stdout), the mock provider on loopback for all
//! three provider clusters. A scripted run — passed through, translated, streamed both ways,
//! refused by a guard, blocked by a limit — and then the log: one record per request, whose
//! tokens are what the provider reported (as the client saw them in `usage`), whose decisions
//! and limits are the gate's, and in which neither the canary prompt nor the answer appears.
//!
//! Needs `scripts/build-wasm.sh`, the release mock provider and Envoy (`scripts/test.sh`).

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
