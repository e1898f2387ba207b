//! `tollgate check`: the effective policy, as the gate will apply it.
//!
//! Limits, prices, store settings, the time zone and routing come from the validated
//! [`tollgate_core::Policy`]; the identity source order and the message locales come from the checked JSON,
//! since the validated form keeps them private.

use std::fmt::Write as _;

use serde_json::Value;
use tollgate_core::limits::{percent_of, Action, Limit, Metric, Span};
use tollgate_core::fallback::{Failure, FallbackSettings};
use tollgate_core::translate::ProviderKind;
use tollgate_core::FailureMode;

use crate::Loaded;

/// The effective policy, one fact a line.
pub fn describe(loaded: &Loaded) -> String {
    let p = &loaded.policy;
    let raw = &loaded.raw;
    let mut out = String::new();
    let o = &mut out;
    let s = &p.limits.settings;
    let _ = writeln!(o, "time zone: {} (calendar windows follow it)", s.zone.name());
    let _ = writeln!(
        o,
        "store: max_retries {}, on_failure {}, slots {}{}, members_per_slot {}, lease_ttl {} s",
        p.max_retries,
        match p.on_failure {
            FailureMode::Allow => "allow (let requests through uncounted)",
            FailureMode::Deny => "deny (503)",
        },
        p.limits.slots,
        if p.limits.slots == 0 { " (one key per identity)" } else { "" },
        s.member_cap,
        s.lease_ttl_ms / 1000
    );
    match &p.remote_store {
        None => {
            let _ = writeln!(o, "  state: the host's own (Envoy: shared data, one process; worker: Durable Objects)");
        }
        Some(r) => {
            let _ = writeln!(
                o,
                "  state: Redis through the tollgate store service (Envoy cluster {}, :authority {}, admission waits at most {} ms{}); policy digest {} (every replica must run this policy)",
                r.cluster,
                r.authority,
                r.timeout_ms,
                r.key_secret.as_deref().map_or_else(|| ", no store key: keep the service private".to_owned(), |k| format!(", store key from secret {k}")),
                p.digest
            );
        }
    }

    let _ = writeln!(o, "identity (sources in order, first match wins):");
    for (i, source) in identity_sources(raw).iter().enumerate() {
        let _ = writeln!(o, "  {}. {source}", i + 1);
    }
    let tier = &raw["tier"];
    let _ = writeln!(
        o,
        "tier: api_keys {} listed, header {}, default {}",
        tier["api_keys"].as_object().map_or(0, |m| m.len()),
        tier["header"].as_str().map_or("none".to_owned(), str::to_ascii_lowercase),
        tier["default"].as_str().unwrap_or("?")
    );

    let _ = writeln!(o, "tiers:");
    for name in p.tier_names() {
        let _ = writeln!(o, "  {name}:");
        let limits = p.limits_of(name);
        if limits.is_empty() {
            let _ = writeln!(o, "    limits: none (unlimited)");
        } else {
            let _ = writeln!(o, "    limits:");
            for l in limits {
                describe_limit(o, l, "      ");
            }
        }
        let rules = p.rules(name);
        let g = &rules.guards;
        let mut guards = Vec::new();
        let mut num = |k: &str, v: Option<u64>| {
            if let Some(v) = v {
                guards.push(format!("{k} {v}"));
            }
        };
        num("max_body_bytes", g.max_body_bytes());
        num("max_prompt_tokens", g.max_prompt_tokens());
        num("max_tokens", g.max_tokens());
        num("default_max_tokens", g.default_max_tokens());
        num("max_messages", g.max_messages());
        if let Some(models) = g.models() {
            guards.push(format!("models [{}]", models.join(", ")));
        }
        let _ = writeln!(o, "    guards: {}", if guards.is_empty() { "none".to_owned() } else { guards.join(", ") });
        let _ = writeln!(o, "    messages: {}", describe_messages(&raw["tiers"][name]["messages"], rules.messages.body_object()));
        let _ = writeln!(o, "    cap_output: {}", if rules.cap_output { "yes (max_tokens = the reservation)" } else { "no" });
    }

    if p.limits.global.is_empty() {
        let _ = writeln!(o, "global limits: none");
    } else {
        let _ = writeln!(o, "global limits:");
        for l in &p.limits.global {
            describe_limit(o, l, "  ");
        }
    }

    if p.limits.prices.is_empty() {
        let _ = writeln!(o, "prices: none");
    } else {
        let _ = writeln!(o, "prices (USD per million tokens):");
        for (model, price) in &p.limits.prices {
            let _ = writeln!(
                o,
                "  {model}: input {}, cached input {}, output {}",
                usd(price.input),
                usd(price.cached_input),
                usd(price.output)
            );
        }
    }

    if p.routes.is_enabled() {
        let _ = writeln!(o, "providers:");
        for pr in p.routes.providers() {
            let _ = writeln!(
                o,
                "  {}: kind {}, cluster {}, base_url {}, api key secret {}",
                pr.name,
                kind(pr.kind),
                pr.cluster,
                pr.base_url.as_deref().unwrap_or("none"),
                pr.api_key_secret.as_deref().unwrap_or("none")
            );
        }
        let _ = writeln!(o, "models:");
        for m in p.routes.model_names() {
            if let Some(r) = p.routes.route(m) {
                let max = r.target.default_max_tokens.map_or(String::new(), |n| format!(", default_max_tokens {n}"));
                let _ = writeln!(o, "  {m} -> {}/{}{max}", r.provider.name, r.target.upstream_model);
            }
        }
    } else {
        let _ = writeln!(o, "models: none mapped (requests are forwarded untranslated)");
    }

    describe_aliases(o, loaded);

    match &p.notify {
        Some(n) => {
            let cluster = n.cluster.as_deref().map_or(String::new(), |c| format!(" via cluster {c}"));
            let _ = writeln!(o, "notify: POST {}{cluster} (timeout {} ms)", n.url, n.timeout_ms);
        }
        None => {
            let _ = writeln!(o, "notify: none (notify thresholds post nothing)");
        }
    }
    let _ = writeln!(o, "admin: {}", p.admin_key_secret.as_deref().map_or("none".to_owned(), |s| format!("key in secret {s}")));
    out
}

/// Aliases (deployments in order, strategy, resolved attempt cap), then the `fallback` and
/// `health` settings they use.
fn describe_aliases(o: &mut String, loaded: &Loaded) {
    let p = &loaded.policy;
    let mut aliases = p.routes.aliases().peekable();
    if aliases.peek().is_none() {
        let _ = writeln!(o, "aliases: none (fallback and health apply to aliases only)");
        return;
    }
    let _ = writeln!(o, "aliases:");
    for a in aliases {
        let own = loaded.raw["aliases"][&a.name]["max_attempts"].as_u64();
        let wanted = own.unwrap_or(u64::from(p.fallback.max_attempts));
        let why = if u64::from(a.max_attempts) < wanted {
            format!("capped at its {} deployments", a.deployments.len())
        } else if own.is_some() {
            "its own".to_owned()
        } else {
            "fallback.max_attempts".to_owned()
        };
        let deployments: Vec<String> = a.deployments.iter().map(|d| format!("{} (weight {})", d.model, d.weight)).collect();
        let _ = writeln!(
            o,
            "  {}: strategy {}, max_attempts {} ({why}), deployments in order: {}",
            a.name,
            a.strategy.name(),
            a.max_attempts,
            deployments.join(", ")
        );
    }
    let f = &p.fallback;
    let _ = writeln!(
        o,
        "fallback: on {}; max_attempts {} (an alias's own overrides it, never more than its deployments), attempt_timeout {} ms (until response headers), total_timeout {} ms (no new attempt after it)",
        fallback_on(f),
        f.max_attempts,
        f.attempt_timeout_ms,
        f.total_timeout_ms
    );
    let h = &p.health;
    let _ = writeln!(
        o,
        "health: cool down for {} s after {} failures within {} s; retry-after and quota resets honoured up to {} s; steer away at remaining requests <= {}, remaining tokens <= {}",
        h.cooldown_ms / 1000,
        h.failures,
        h.window_ms / 1000,
        h.max_cooldown_ms / 1000,
        h.min_remaining_requests,
        h.min_remaining_tokens
    );
}

/// The failures that fall back, in `fallback.on`'s own spelling: `connect, timeout, reset, 429,
/// 5xx` (whole classes as `5xx` / `50x`).
fn fallback_on(f: &FallbackSettings) -> String {
    let mut on: Vec<String> = [(Failure::Connect, "connect"), (Failure::Timeout, "timeout"), (Failure::Reset, "reset")]
        .into_iter()
        .filter(|(failure, _)| f.falls_back(*failure))
        .map(|(_, name)| name.to_owned())
        .collect();
    let all = |from: u16, to: u16| (from..=to).all(|s| f.falls_back(Failure::Status(s)));
    for hundred in [400u16, 500] {
        if all(hundred, hundred + 99) {
            on.push(format!("{}xx", hundred / 100));
            continue;
        }
        for ten in (hundred..hundred + 100).step_by(10) {
            if all(ten, ten + 9) {
                on.push(format!("{}x", ten / 10));
                continue;
            }
            on.extend((ten..ten + 10).filter(|s| f.falls_back(Failure::Status(*s))).map(|s| s.to_string()));
        }
    }
    if on.is_empty() {
        "nothing (no failure falls back)".to_owned()
    } else {
        on.join(", ")
    }
}

fn kind(k: ProviderKind) -> &'static str {
    match k {
        ProviderKind::OpenAi => "openai",
        ProviderKind::Anthropic => "anthropic",
        ProviderKind::Gemini => "gemini",
    }
}

/// Micro-dollars as dollars, without trailing zeros.
fn usd(micros: u64) -> String {
    let whole = micros / 1_000_000;
    let frac = micros % 1_000_000;
    if frac == 0 {
        return whole.to_string();
    }
    let s = format!("{whole}.{frac:06}");
    s.trim_end_matches('0').to_owned()
}

fn amount(metric: Metric, v: u64) -> String {
    if metric == Metric::CostMicros {
        format!("${}", usd(v))
    } else {
        v.to_string()
    }
}

fn period(ms: u64) -> String {
    match ms {
        1000 => "second".into(),
        60_000 => "minute".into(),
        3_600_000 => "hour".into(),
        86_400_000 => "day".into(),
        other => format!("{other} ms"),
    }
}

fn describe_limit(o: &mut String, l: &Limit, indent: &str) {
    let span = match l.span {
        Span::Window(w) => format!("per calendar {}", w.name()),
        Span::Rate { period_ms, burst } => format!("rate {} per {} (burst {burst})", l.max, period(period_ms)),
        Span::Now => "in flight at once".to_owned(),
    };
    let _ = writeln!(
        o,
        "{indent}- {}: per {}, {} {span}, max {}",
        l.name,
        l.scope.name(),
        l.metric.name(),
        amount(l.metric, l.max)
    );
    let mut steps: Vec<(u32, String)> = l
        .thresholds
        .iter()
        .map(|t| {
            let at = amount(l.metric, percent_of(l.max, t.percent));
            let what = match &t.action {
                Action::Warn => format!("warn at {}% ({at})", t.percent),
                Action::Notify => format!("notify at {}% ({at})", t.percent),
                Action::Downgrade(m) => format!("downgrade to {m} at {}% ({at})", t.percent),
                Action::Block => format!("block at {}% ({at})", t.percent),
            };
            (t.percent, what)
        })
        .collect();
    steps.sort_by_key(|(p, _)| *p);
    let mut steps: Vec<String> = steps.into_iter().map(|(_, s)| s).collect();
    let has_block = l.thresholds.iter().any(|t| t.action == Action::Block);
    let has_downgrade = l.thresholds.iter().any(|t| matches!(t.action, Action::Downgrade(_)));
    match (l.span, l.block_at()) {
        (Span::Window(_), _) if has_block => {}
        (Span::Window(_), None) if has_downgrade => steps.push("never blocks (the downgrade is its enforcement)".to_owned()),
        (_, Some(cap)) => steps.push(format!("block at 100% ({}, the default)", amount(l.metric, cap))),
        (_, None) => {}
    }
    let _ = writeln!(o, "{indent}    {}", steps.join("; "));
}

/// The identity sources in order, as the core expands its shorthands.
fn identity_sources(raw: &Value) -> Vec<String> {
    let identity = &raw["identity"];
    if let Some(h) = identity["header"].as_str() {
        return vec![format!("header {}", h.to_ascii_lowercase()), "client_ip (trusted_hops 0)".to_owned()];
    }
    let Some(sources) = identity["sources"].as_array() else {
        return vec!["client_ip (trusted_hops 0)".to_owned()];
    };
    sources
        .iter()
        .map(|s| {
            if let Some(h) = s["signed_header"].as_str() {
                let skew = s["max_skew_seconds"].as_u64().unwrap_or(30);
                format!(
                    "signed_header {} (HMAC secret {}, max skew {skew} s)",
                    h.to_ascii_lowercase(),
                    s["secret"].as_str().unwrap_or("?")
                )
            } else if let Some(h) = s["header"].as_str() {
                format!("header {}", h.to_ascii_lowercase())
            } else if s.get("user_field").is_some() {
                "user_field (the body's \"user\")".to_owned()
            } else if let Some(h) = s["api_key_header"].as_str() {
                format!("api_key_header {} (SHA-256 of the key)", h.to_ascii_lowercase())
            } else if let Some(h) = s["session_header"].as_str() {
                format!("session_header {}", h.to_ascii_lowercase())
            } else {
                format!("client_ip (trusted_hops {})", s["client_ip"]["trusted_hops"].as_u64().unwrap_or(0))
            }
        })
        .collect()
}

fn describe_messages(m: &Value, body_object: bool) -> String {
    let locales = |kind: &str| match m[kind].as_object() {
        Some(map) => {
            let mut tags: Vec<&str> = map.keys().map(String::as_str).collect();
            tags.sort_unstable();
            format!("{kind} in [{}]", tags.join(", "))
        }
        None => format!("{kind} built-in English"),
    };
    format!(
        "{}, {}, default locale {}, upgrade_url {}, body object {}",
        locales("block"),
        locales("warn"),
        m["default_locale"].as_str().unwrap_or("en"),
        m["upgrade_url"].as_str().unwrap_or("none"),
        if body_object { "yes" } else { "no" }
    )
}
