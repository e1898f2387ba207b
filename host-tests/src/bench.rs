//! What the measurements (ignored tests run by `scripts/bench-*.sh`) share: the gateway
//! benchmark's policy and request, and a process's CPU time.

/// Six active limits (identity: requests per minute and day, total tokens and cost per day,
/// concurrency; the tier: requests per day) and a price table; `claude-sonnet` is translated to
/// Anthropic, `gpt-4o-mini` passed through to an OpenAI-compatible provider.
pub const GATEWAY_POLICY: &str = r#"{
  "identity": { "header": "x-tollgate-user" },
  "tier": { "default": "free" },
  "store": { "on_failure": "allow" },
  "prices": { "claude-sonnet": { "input": 3, "output": 15 }, "gpt-4o-mini": { "input": 0.15, "output": 0.6 } },
  "tiers": { "free": { "limits": [
    { "window": "minute", "requests": 1000000000 },
    { "window": "day", "requests": 1000000000 },
    { "window": "day", "total_tokens": 1000000000000 },
    { "window": "day", "cost_usd": 1000000000000 },
    { "concurrent": 60000 },
    { "per": "tier", "window": "day", "requests": 1000000000 }
  ] } },
  "providers": { "anthropic": { "kind": "anthropic", "default_max_tokens": 4096 }, "openai": { "kind": "openai" } },
  "models": {
    "claude-sonnet": { "provider": "anthropic", "model": "claude-sonnet-4-5" },
    "gpt-4o-mini": { "provider": "openai", "model": "gpt-4o-mini" }
  }
}"#;

/// The gateway benchmark's ~1 KB OpenAI chat body.
pub fn chat_body(model: &str, stream: bool) -> String {
    let words = "Summarise the following notes for a busy reader in three short bullet points. ".repeat(11);
    serde_json::json!({
        "model": model,
        "stream": stream,
        "max_tokens": 256,
        "messages": [
            { "role": "system", "content": "You are a concise assistant." },
            { "role": "user", "content": words }
        ]
    })
    .to_string()
}

/// utime + stime of a process (all its threads), in clock ticks (`/proc/PID/stat` fields 14
/// and 15; USER_HZ, 100 per second on Linux).
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}
