//! Model aliases, fallback across deployments, and the provider health every host shares.
//!
//! ```json
//! "aliases": {
//!   "scalix-free": { "deployments": ["flash", { "model": "pro", "weight": 3 }, "deepseek"],
//!                    "strategy": "priority", "max_attempts": 3 }
//! },
//! "fallback": { "on": ["connect", "timeout", "reset", "429", "5xx"], "max_attempts": 3,
//!               "attempt_timeout_ms": 30000, "total_timeout_ms": 120000 },
//! "health":   { "failures": 3, "window_seconds": 60, "cooldown_seconds": 30,
//!               "max_cooldown_seconds": 600, "min_remaining_requests": 0, "min_remaining_tokens": 0 }
//! ```
//! - An alias is a client-visible model name served by an ordered list of *deployments*: names
//!   in `models` (each with its provider, upstream model, default_max_tokens and price).
//! - `choose` orders the deployments for one request from their [`Health`]: the first is
//!   picked by the alias's [`Strategy`] among the available ones, the rest follow in the
//!   alias's order ([`Plan`]). When every deployment is cooling down, the request is answered
//!   with a 503 ([`crate::render::unavailable`]).
//! - Hosts report every attempt's outcome ([`report`]): failures the policy falls back on count
//!   towards a cooldown (N within a window, or at once for the provider's `retry-after`); a
//!   served answer whose quota headers ([`quota_from_headers`]) say the provider is (nearly)
//!   exhausted steers new requests away until its reset. A healthy answer writes nothing.
//!
//! The health record is one small binary value per deployment (`tg2:h:<deployment>`), updated
//! with compare-and-set like the counters (`crate::store::update`). Garbled or foreign bytes
//! read as healthy: health only ever steers, it never refuses on its own.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{invalid, ConfigError};

pub(crate) const HEALTH_KEY_PREFIX: &str = "tg2:h:";

/// The store key of a deployment's health record.
pub(crate) fn health_key(deployment: &str) -> String {
    format!("{HEALTH_KEY_PREFIX}{deployment}")
}

pub(crate) const MAX_DEPLOYMENTS: usize = 10;
pub(crate) const MAX_ATTEMPTS: u32 = 10;
pub(crate) const MAX_WEIGHT: u32 = 1000;
pub(crate) const MAX_ALIASES: usize = 1000;

/// How an alias picks the deployment tried first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// The first available deployment in the alias's order.
    #[default]
    Priority,
    /// A weighted random pick among the available deployments.
    Weighted,
    /// The available deployment that failed longest ago (never failed first), ties by order.
    LeastRecentlyFailed,
}

impl Strategy {
    /// The strategy's name in the config (`priority`, `weighted`, `least_recently_failed`).
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Priority => "priority",
            Strategy::Weighted => "weighted",
            Strategy::LeastRecentlyFailed => "least_recently_failed",
        }
    }
}

/// One deployment of an alias: a name in `models`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployment {
    /// The deployment's model: a name in the policy's `models`.
    pub model: String,
    /// Its share of the picks under the `weighted` strategy.
    pub weight: u32,
}

/// A validated alias.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alias {
    /// The client-visible name the alias answers to.
    pub name: String,
    /// Its deployments, in the configured order.
    pub deployments: Vec<Deployment>,
    /// How the deployment tried first is picked.
    pub strategy: Strategy,
    /// Resolved: the alias's (or `fallback.max_attempts`), at most the number of deployments.
    pub max_attempts: u32,
}

impl Alias {
    /// The deployment names, in the alias's order.
    pub fn deployment_names(&self) -> impl Iterator<Item = &str> {
        self.deployments.iter().map(|d| d.model.as_str())
    }

    /// The alias's own spelling of a deployment name (`None`: not one of its deployments).
    pub fn deployment(&self, name: &str) -> Option<&str> {
        self.deployment_names().find(|d| *d == name)
    }
}

/// How one attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Failure {
    /// The connection could not be made (refused, DNS, TLS).
    Connect,
    /// No response headers within the attempt's timeout.
    Timeout,
    /// The connection was reset before the answer was complete.
    Reset,
    /// The provider answered with this status.
    Status(u16),
}

impl Failure {
    /// A metric / message label: `connect`, `timeout`, `reset`, `500`.
    pub fn label(&self) -> String {
        match self {
            Failure::Connect => "connect".to_owned(),
            Failure::Timeout => "timeout".to_owned(),
            Failure::Reset => "reset".to_owned(),
            Failure::Status(s) => s.to_string(),
        }
    }
}

/// Statuses 400..=599 as a bit set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct StatusSet([u64; 4]);

impl StatusSet {
    fn insert_range(&mut self, from: u16, to: u16) {
        for s in from..=to {
            if (400..=599).contains(&s) {
                let i = usize::from(s - 400);
                self.0[i / 64] |= 1 << (i % 64);
            }
        }
    }
    fn contains(&self, s: u16) -> bool {
        if !(400..=599).contains(&s) {
            return false;
        }
        let i = usize::from(s - 400);
        self.0[i / 64] & (1 << (i % 64)) != 0
    }
}

/// When and how long to fall back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FallbackSettings {
    /// Attempts per request (the first included), unless an alias says otherwise.
    pub max_attempts: u32,
    /// Per attempt, until response headers.
    pub attempt_timeout_ms: u64,
    /// No new attempt starts after this, counted from the first.
    pub total_timeout_ms: u64,
    connect: bool,
    timeout: bool,
    reset: bool,
    statuses: StatusSet,
}

impl Default for FallbackSettings {
    fn default() -> Self {
        let mut statuses = StatusSet::default();
        statuses.insert_range(429, 429);
        statuses.insert_range(500, 599);
        FallbackSettings {
            max_attempts: 3,
            attempt_timeout_ms: 30_000,
            total_timeout_ms: 120_000,
            connect: true,
            timeout: true,
            reset: true,
            statuses,
        }
    }
}

impl FallbackSettings {
    /// Does this failure move the request to the next deployment?
    pub fn falls_back(&self, f: Failure) -> bool {
        match f {
            Failure::Connect => self.connect,
            Failure::Timeout => self.timeout,
            Failure::Reset => self.reset,
            Failure::Status(s) => self.statuses.contains(s),
        }
    }
}

/// When a deployment is cooled down or steered away from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSettings {
    /// Failures within `window_ms` that start a cooldown.
    pub failures: u32,
    /// How long the failure window lasts, in milliseconds.
    pub window_ms: u64,
    /// How long a deployment cools down once `failures` is reached, in milliseconds.
    pub cooldown_ms: u64,
    /// Cap for a provider's `retry-after` and quota resets.
    pub max_cooldown_ms: u64,
    /// Steer away when the provider says it has at most this many requests left.
    pub min_remaining_requests: u64,
    /// Steer away when the provider says it has at most this many tokens left.
    pub min_remaining_tokens: u64,
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthSettings {
            failures: 3,
            window_ms: 60_000,
            cooldown_ms: 30_000,
            max_cooldown_ms: 600_000,
            min_remaining_requests: 0,
            min_remaining_tokens: 0,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Configuration (raw forms and validation)

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAlias {
    /// Strings or `{"model": …, "weight": …}` objects, checked by hand for clear messages.
    deployments: Vec<serde_json::Value>,
    #[serde(default)]
    strategy: Strategy,
    max_attempts: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFallback {
    on: Option<Vec<String>>,
    #[serde(default = "default_max_attempts")]
    max_attempts: u32,
    #[serde(default = "default_attempt_timeout")]
    attempt_timeout_ms: u64,
    #[serde(default = "default_total_timeout")]
    total_timeout_ms: u64,
}

fn default_max_attempts() -> u32 {
    3
}
fn default_attempt_timeout() -> u64 {
    30_000
}
fn default_total_timeout() -> u64 {
    120_000
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHealth {
    #[serde(default = "default_failures")]
    failures: u32,
    #[serde(default = "default_window")]
    window_seconds: u64,
    #[serde(default = "default_cooldown")]
    cooldown_seconds: u64,
    #[serde(default = "default_max_cooldown")]
    max_cooldown_seconds: u64,
    #[serde(default)]
    min_remaining_requests: u64,
    #[serde(default)]
    min_remaining_tokens: u64,
}

fn default_failures() -> u32 {
    3
}
fn default_window() -> u64 {
    60
}
fn default_cooldown() -> u64 {
    30
}
fn default_max_cooldown() -> u64 {
    600
}

const ON_HELP: &str = "use connect, timeout, reset, 429, 5xx, 4xx or a status 400..=599";

impl RawFallback {
    pub(crate) fn validate(self) -> Result<FallbackSettings, ConfigError> {
        let mut s = FallbackSettings::default();
        if let Some(on) = self.on {
            s.connect = false;
            s.timeout = false;
            s.reset = false;
            s.statuses = StatusSet::default();
            for (i, item) in on.iter().enumerate() {
                let unknown = || invalid(format!("fallback.on[{i}]"), format!("unknown failure {item:?} ({ON_HELP})"));
                match item.as_str() {
                    "connect" => s.connect = true,
                    "timeout" => s.timeout = true,
                    "reset" => s.reset = true,
                    _ => {
                        let (from, to) = status_range(item).ok_or_else(unknown)?;
                        s.statuses.insert_range(from, to);
                    }
                }
            }
        }
        if !(1..=MAX_ATTEMPTS).contains(&self.max_attempts) {
            return Err(invalid("fallback.max_attempts", format!("must be from 1 to {MAX_ATTEMPTS}")));
        }
        if !(1..=3_600_000).contains(&self.attempt_timeout_ms) {
            return Err(invalid("fallback.attempt_timeout_ms", "must be from 1 to 3600000"));
        }
        if !(1..=3_600_000).contains(&self.total_timeout_ms) {
            return Err(invalid("fallback.total_timeout_ms", "must be from 1 to 3600000"));
        }
        s.max_attempts = self.max_attempts;
        s.attempt_timeout_ms = self.attempt_timeout_ms;
        s.total_timeout_ms = self.total_timeout_ms;
        Ok(s)
    }
}

/// `"503"` → 503..=503, `"5xx"` → 500..=599, `"42x"` → 420..=429; only within 400..=599.
fn status_range(item: &str) -> Option<(u16, u16)> {
    let b = item.as_bytes();
    if b.len() != 3 || !matches!(b[0], b'4' | b'5') {
        return None;
    }
    let digit = |c: u8| c.is_ascii_digit().then(|| u16::from(c - b'0'));
    let first = digit(b[0])? * 100;
    match (b[1], b[2]) {
        (b'x' | b'X', b'x' | b'X') => Some((first, first + 99)),
        (t, b'x' | b'X') => {
            let tens = first + digit(t)? * 10;
            Some((tens, tens + 9))
        }
        (t, u) => {
            let s = first + digit(t)? * 10 + digit(u)?;
            Some((s, s))
        }
    }
}

impl RawHealth {
    pub(crate) fn validate(self) -> Result<HealthSettings, ConfigError> {
        let seconds = |field: &str, v: u64| -> Result<u64, ConfigError> {
            if !(1..=86_400).contains(&v) {
                return Err(invalid(format!("health.{field}"), "must be from 1 to 86400"));
            }
            Ok(v * 1000)
        };
        if !(1..=1000).contains(&self.failures) {
            return Err(invalid("health.failures", "must be from 1 to 1000"));
        }
        let window_ms = seconds("window_seconds", self.window_seconds)?;
        let cooldown_ms = seconds("cooldown_seconds", self.cooldown_seconds)?;
        let max_cooldown_ms = seconds("max_cooldown_seconds", self.max_cooldown_seconds)?;
        if max_cooldown_ms < cooldown_ms {
            return Err(invalid("health.max_cooldown_seconds", format!("must be at least cooldown_seconds ({})", self.cooldown_seconds)));
        }
        Ok(HealthSettings {
            failures: self.failures,
            window_ms,
            cooldown_ms,
            max_cooldown_ms,
            min_remaining_requests: self.min_remaining_requests,
            min_remaining_tokens: self.min_remaining_tokens,
        })
    }
}

/// Alias names: 1-64 letters, digits, '_', '-', '.' and ':' (they appear in headers, in
/// `alias/deployment` route values and in comma-separated plans).
fn is_alias_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b))
}

/// A deployment's name travels in headers and comma-separated plans.
fn is_deployment_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 128 && name.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',')
}

/// Validates `aliases` against the model names. `is_model` says whether a name is in `models`.
pub(crate) fn validate_aliases(
    raw: BTreeMap<String, RawAlias>,
    is_model: &dyn Fn(&str) -> bool,
    fallback: &FallbackSettings,
) -> Result<BTreeMap<String, Alias>, ConfigError> {
    if raw.len() > MAX_ALIASES {
        return Err(invalid("aliases", format!("at most {MAX_ALIASES} aliases")));
    }
    let mut out = BTreeMap::new();
    for (name, a) in raw {
        let path = format!("aliases.{name}");
        if !is_alias_name(&name) {
            return Err(invalid(path, "alias names are 1-64 characters of letters, digits, '_', '-', '.' and ':'"));
        }
        if is_model(&name) {
            return Err(invalid(path, format!("\"{name}\" is already a model in models (an alias needs a name of its own)")));
        }
        if a.deployments.is_empty() || a.deployments.len() > MAX_DEPLOYMENTS {
            return Err(invalid(format!("{path}.deployments"), format!("an alias has 1 to {MAX_DEPLOYMENTS} deployments")));
        }
        let mut deployments: Vec<Deployment> = Vec::with_capacity(a.deployments.len());
        for (i, v) in a.deployments.into_iter().enumerate() {
            let dpath = format!("{path}.deployments[{i}]");
            let d = parse_deployment(v, &dpath)?;
            if !is_model(&d.model) {
                return Err(invalid(dpath, format!("unknown model \"{}\" (deployments are names in models)", d.model)));
            }
            if !is_deployment_name(&d.model) {
                return Err(invalid(dpath, format!("model \"{}\" cannot be a deployment: its name must be printable ASCII without ','", d.model)));
            }
            if let Some(j) = deployments.iter().position(|e| e.model == d.model) {
                return Err(invalid(dpath, format!("duplicate deployment \"{}\" (already at deployments[{j}])", d.model)));
            }
            deployments.push(d);
        }
        let wanted = match a.max_attempts {
            Some(m) if !(1..=MAX_ATTEMPTS).contains(&m) => {
                return Err(invalid(format!("{path}.max_attempts"), format!("must be from 1 to {MAX_ATTEMPTS}")))
            }
            Some(m) => m,
            None => fallback.max_attempts,
        };
        let max_attempts = wanted.min(deployments.len() as u32).max(1);
        out.insert(name.clone(), Alias { name, deployments, strategy: a.strategy, max_attempts });
    }
    Ok(out)
}

fn parse_deployment(v: serde_json::Value, path: &str) -> Result<Deployment, ConfigError> {
    use serde_json::Value;
    const SHAPE: &str = "a deployment is a model name or {\"model\": …, \"weight\": …}";
    match v {
        Value::String(model) => Ok(Deployment { model, weight: 1 }),
        Value::Object(map) => {
            let mut model = None;
            let mut weight = 1u32;
            for (k, v) in map {
                match k.as_str() {
                    "model" => match v {
                        Value::String(s) => model = Some(s),
                        _ => return Err(invalid(format!("{path}.model"), "must be a model name (a string)")),
                    },
                    "weight" => {
                        weight = v
                            .as_u64()
                            .filter(|w| (1..=u64::from(MAX_WEIGHT)).contains(w))
                            .and_then(|w| u32::try_from(w).ok())
                            .ok_or_else(|| invalid(format!("{path}.weight"), format!("must be from 1 to {MAX_WEIGHT}")))?;
                    }
                    other => {
                        return Err(invalid(format!("{path}.{other}"), format!("unknown field `{other}`, expected `model` or `weight`")))
                    }
                }
            }
            let model = model.ok_or_else(|| invalid(path.to_owned(), "missing field `model`"))?;
            Ok(Deployment { model, weight })
        }
        _ => Err(invalid(path.to_owned(), SHAPE)),
    }
}

// ---------------------------------------------------------------------------------------------
// Health

/// First byte of an encoded [`Health`] (format and version).
pub(crate) const HEALTH_FORMAT: u8 = 0x48; // 'H', version 1
const HEALTH_LEN: usize = 1 + 8 + 4 + 8 + 8 + 8;

/// One deployment's shared health record (compact binary, version byte first).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// Start of the window `failures` are counted in.
    pub window_start_ms: u64,
    /// Failures counted in the current window.
    pub failures: u32,
    /// Not tried before this (failures, `retry-after`).
    pub cooldown_until_ms: u64,
    /// The latest failure (0: never failed).
    pub last_failure_ms: u64,
    /// Not chosen before this (the provider said its quota is exhausted).
    pub steer_until_ms: u64,
}

impl Health {
    /// `None` for foreign or garbled bytes (treat as healthy).
    pub fn decode(bytes: &[u8]) -> Option<Health> {
        if bytes.len() != HEALTH_LEN || bytes[0] != HEALTH_FORMAT {
            return None;
        }
        let u64_at = |at: usize| -> Option<u64> { Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?)) };
        let failures = u32::from_le_bytes(bytes.get(9..13)?.try_into().ok()?);
        Some(Health {
            window_start_ms: u64_at(1)?,
            failures,
            cooldown_until_ms: u64_at(13)?,
            last_failure_ms: u64_at(21)?,
            steer_until_ms: u64_at(29)?,
        })
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEALTH_LEN);
        out.push(HEALTH_FORMAT);
        out.extend_from_slice(&self.window_start_ms.to_le_bytes());
        out.extend_from_slice(&self.failures.to_le_bytes());
        out.extend_from_slice(&self.cooldown_until_ms.to_le_bytes());
        out.extend_from_slice(&self.last_failure_ms.to_le_bytes());
        out.extend_from_slice(&self.steer_until_ms.to_le_bytes());
        out
    }

    /// When the deployment may be chosen again: `max(cooldown_until, steer_until)`.
    pub(crate) fn available_at(&self) -> u64 {
        self.cooldown_until_ms.max(self.steer_until_ms)
    }

    /// Whether the deployment may be chosen at `now_ms`: neither cooling down nor steered away.
    pub fn is_available(&self, now_ms: u64) -> bool {
        now_ms >= self.available_at()
    }
}

/// What the provider said about its remaining quota (after a successful answer).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quota {
    /// Requests the provider says are left.
    pub remaining_requests: Option<u64>,
    /// Tokens the provider says are left (the least of its token quotas).
    pub remaining_tokens: Option<u64>,
    /// Milliseconds from now until the binding quota resets.
    pub reset_after_ms: Option<u64>,
}

/// Reads a provider's remaining-quota headers (names lowercase):
/// - OpenAI (and compatible): `x-ratelimit-remaining-requests` / `-tokens` with
///   `x-ratelimit-reset-requests` / `-tokens` as Go durations (`1s`, `6m0s`, `20ms`,
///   `1h2m3.5s`);
/// - Anthropic: `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-remaining`
///   with `-reset` as RFC 3339 times.
///
/// Tokens are the minimum across the token variants. The reset is that of the exhausted
/// quotas (the latest of them, since all must reset), or when none is exhausted the later of the
/// lowest request quota's and the lowest token quota's. Unreadable values are ignored.
pub fn quota_from_headers(headers: &[(String, String)], now_ms: u64) -> Quota {
    #[derive(Clone, Copy, PartialEq)]
    enum Kind {
        Requests,
        Tokens,
    }
    // (kind, remaining, reset) per quota the provider described.
    let mut found: Vec<(Kind, Option<u64>, Option<u64>)> = Vec::new();
    let mut slot = |kind: Kind, key: &str, keys: &mut Vec<String>| -> usize {
        match keys.iter().position(|k| k == key) {
            Some(i) => i,
            None => {
                keys.push(key.to_owned());
                found.push((kind, None, None));
                found.len() - 1
            }
        }
    };
    let mut keys: Vec<String> = Vec::new();
    let mut entries: Vec<(usize, bool, Option<u64>)> = Vec::new();
    for (name, value) in headers {
        let name = name.to_ascii_lowercase();
        let value = value.trim();
        if let Some(rest) = name.strip_prefix("x-ratelimit-") {
            let (is_remaining, what) = match (rest.strip_prefix("remaining-"), rest.strip_prefix("reset-")) {
                (Some(w), _) => (true, w),
                (_, Some(w)) => (false, w),
                _ => continue,
            };
            let kind = match what {
                "requests" => Kind::Requests,
                "tokens" => Kind::Tokens,
                _ => continue,
            };
            let i = slot(kind, &format!("openai-{what}"), &mut keys);
            let v = if is_remaining { parse_count(value) } else { parse_go_duration_ms(value) };
            entries.push((i, is_remaining, v));
        } else if let Some(rest) = name.strip_prefix("anthropic-ratelimit-") {
            let (what, is_remaining) = match (rest.strip_suffix("-remaining"), rest.strip_suffix("-reset")) {
                (Some(w), _) => (w, true),
                (_, Some(w)) => (w, false),
                _ => continue,
            };
            let kind = match what {
                "requests" => Kind::Requests,
                "tokens" | "input-tokens" | "output-tokens" => Kind::Tokens,
                _ => continue,
            };
            let i = slot(kind, &format!("anthropic-{what}"), &mut keys);
            let v = if is_remaining { parse_count(value) } else { rfc3339_after_ms(value, now_ms) };
            entries.push((i, is_remaining, v));
        }
    }
    for (i, is_remaining, v) in entries {
        if let Some(f) = found.get_mut(i) {
            if is_remaining {
                f.1 = v.or(f.1);
            } else {
                f.2 = v.or(f.2);
            }
        }
    }
    let min_of = |kind: Kind| found.iter().filter(|f| f.0 == kind).filter_map(|f| f.1).min();
    let remaining_requests = min_of(Kind::Requests);
    let remaining_tokens = min_of(Kind::Tokens);
    let exhausted = found.iter().filter(|f| f.1 == Some(0)).filter_map(|f| f.2).max();
    let reset_after_ms = exhausted.or_else(|| {
        let lowest = |kind: Kind| found.iter().filter(|f| f.0 == kind && f.1.is_some()).min_by_key(|f| f.1).and_then(|f| f.2);
        match (lowest(Kind::Requests), lowest(Kind::Tokens)) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    });
    Quota { remaining_requests, remaining_tokens, reset_after_ms }
}

fn parse_count(v: &str) -> Option<u64> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Digits only: an overflow saturates (it means "plenty").
    Some(v.parse::<u64>().unwrap_or(u64::MAX))
}

/// A Go duration (`6m0s`, `1h2m3.5s`, `20ms`, `1.5µs`) or bare seconds (`2`, `0.5`), in
/// milliseconds rounded up.
pub(crate) fn parse_go_duration_ms(v: &str) -> Option<u64> {
    let v = v.trim();
    if v.is_empty() || v.len() > 64 {
        return None;
    }
    if let Some(secs) = parse_decimal_nanos(v, 1_000_000_000) {
        return Some(nanos_to_ms(secs));
    }
    let b = v.as_bytes();
    let mut i = 0;
    let mut total: u128 = 0;
    while i < b.len() {
        let start = i;
        while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'.') {
            i += 1;
        }
        let number = v.get(start..i)?;
        let unit_start = i;
        while i < b.len() && !(b[i].is_ascii_digit() || b[i] == b'.') {
            i += 1;
        }
        let unit = v.get(unit_start..i)?;
        let scale: u128 = match unit {
            "h" => 3_600_000_000_000,
            "m" => 60_000_000_000,
            "s" => 1_000_000_000,
            "ms" => 1_000_000,
            "us" | "µs" | "μs" => 1_000,
            "ns" => 1,
            _ => return None,
        };
        total = total.checked_add(parse_decimal_nanos(number, scale)?)?;
    }
    Some(nanos_to_ms(total))
}

/// `number * scale` for a non-negative decimal `number` (digits with at most one '.').
fn parse_decimal_nanos(number: &str, scale: u128) -> Option<u128> {
    let (int, frac) = match number.split_once('.') {
        Some((i, f)) => (i, f),
        None => (number, ""),
    };
    if (int.is_empty() && frac.is_empty()) || !int.bytes().chain(frac.bytes()).all(|c| c.is_ascii_digit()) || int.len() > 20 {
        return None;
    }
    let int_value: u128 = if int.is_empty() { 0 } else { int.parse().ok()? };
    let mut value = int_value.checked_mul(scale)?;
    let mut unit = scale;
    for c in frac.bytes().take(18) {
        unit /= 10;
        value = value.checked_add(u128::from(c - b'0') * unit)?;
    }
    Some(value)
}

fn nanos_to_ms(nanos: u128) -> u64 {
    u64::try_from(nanos.div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

/// An RFC 3339 UTC time (`2026-11-22T10:00:00Z`, fractions allowed: what Anthropic sends).
/// humantime/httpdate rather than jiff's parsers: those cost ~150 KB of filter.wasm.
fn rfc3339_after_ms(v: &str, now_ms: u64) -> Option<u64> {
    Some(ms_after(humantime::parse_rfc3339(v.trim()).ok()?, now_ms))
}

fn ms_after(t: std::time::SystemTime, now_ms: u64) -> u64 {
    // Only arithmetic on SystemTime (never `now()`, which wasm32-unknown-unknown lacks).
    let at = t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    u64::try_from(at.saturating_sub(u128::from(now_ms))).unwrap_or(u64::MAX)
}

/// `retry-after`: delta-seconds or an HTTP-date; milliseconds from now (0 for a date in the
/// past). `None` when unreadable.
pub fn retry_after_ms(value: &str, now_ms: u64) -> Option<u64> {
    let v = value.trim();
    if v.is_empty() || v.len() > 64 {
        return None;
    }
    if v.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return parse_decimal_nanos(v, 1_000_000_000).map(nanos_to_ms);
    }
    Some(ms_after(httpdate::parse_http_date(v).ok()?, now_ms))
}

/// What happened to one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Outcome {
    /// The attempt failed in a way the policy falls back on.
    Failed {
        /// How it failed.
        failure: Failure,
        /// The provider's `retry-after`, in milliseconds.
        retry_after_ms: Option<u64>,
    },
    /// The provider served the request.
    Served {
        /// What the provider's headers say is left of its quota.
        quota: Quota,
    },
}

/// The next health record after an attempt's outcome. `None` = nothing to write (the success
/// path of a healthy deployment stays write-free).
///
/// - Failed: the window restarts when it expired; failures += 1; last_failure = now; a
///   `retry-after` cools down for its time (capped by `max_cooldown_ms`); the N-th failure in the
///   window cools down for `cooldown_ms` and starts a new window.
/// - Served: a quota at or under the thresholds steers away until its reset (1 s when unknown,
///   capped by `max_cooldown_ms`); otherwise a steer still in force is cleared.
///
/// Report only failures the policy falls back on ([`FallbackSettings::falls_back`]): a 400
/// about the client's own request says nothing about the provider's health.
pub fn next_health(prev: Option<&Health>, outcome: &Outcome, settings: &HealthSettings, now_ms: u64) -> Option<Health> {
    let mut h = prev.copied().unwrap_or_default();
    match outcome {
        Outcome::Failed { retry_after_ms, .. } => {
            let expired = now_ms < h.window_start_ms || now_ms.saturating_sub(h.window_start_ms) >= settings.window_ms;
            if h.failures == 0 || expired {
                h.window_start_ms = now_ms;
                h.failures = 0;
            }
            h.failures = h.failures.saturating_add(1);
            h.last_failure_ms = now_ms;
            if let Some(ra) = retry_after_ms {
                let until = now_ms.saturating_add((*ra).min(settings.max_cooldown_ms));
                h.cooldown_until_ms = h.cooldown_until_ms.max(until);
            }
            if h.failures >= settings.failures {
                h.cooldown_until_ms = h.cooldown_until_ms.max(now_ms.saturating_add(settings.cooldown_ms));
                h.failures = 0;
                h.window_start_ms = now_ms;
            }
            Some(h)
        }
        Outcome::Served { quota } => {
            let low = quota.remaining_requests.is_some_and(|r| r <= settings.min_remaining_requests)
                || quota.remaining_tokens.is_some_and(|t| t <= settings.min_remaining_tokens);
            if low {
                let wait = quota.reset_after_ms.unwrap_or(1000).min(settings.max_cooldown_ms);
                let until = now_ms.saturating_add(wait);
                if until == h.steer_until_ms {
                    return None;
                }
                h.steer_until_ms = until;
                Some(h)
            } else if h.steer_until_ms > now_ms {
                h.steer_until_ms = 0;
                Some(h)
            } else {
                None
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Plans

/// The attempt order for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The alias's name.
    pub alias: String,
    /// First = chosen by the strategy among the available; then every other deployment in the
    /// alias's order.
    pub order: Vec<String>,
    /// Per `order` entry: available now (not cooling down, not steered away).
    pub available: Vec<bool>,
    /// The most attempts the request may make (resolved from the alias's `max_attempts`).
    pub max_attempts: u32,
}

impl Plan {
    /// `scalix-free/flash` (`x-tollgate-cluster`: the Envoy route match).
    pub fn route_value(&self) -> String {
        format!("{}/{}", self.alias, self.order.first().map_or("", String::as_str))
    }

    /// The attempts a host that can skip deployments (the worker) makes: the first, then the
    /// available rest, at most `max_attempts`.
    pub fn attempts(&self) -> Vec<&str> {
        let max = self.max_attempts.max(1) as usize;
        self.order
            .iter()
            .enumerate()
            .filter(|(i, _)| *i == 0 || self.available.get(*i).copied().unwrap_or(false))
            .map(|(_, d)| d.as_str())
            .take(max)
            .collect()
    }
}

/// The choice for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Choice {
    Plan(Plan),
    /// Every deployment is cooling down: retry after the soonest is available again (at least
    /// 1000 ms).
    Unavailable { retry_after_ms: u64 },
}

/// splitmix64: spreads sequential seeds (time ^ counter) over the whole range.
fn mix(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Orders `alias`'s deployments for one request from their health. `seed`: any u64 the host has
/// (time ^ a request counter); the weighted pick is deterministic in it.
pub(crate) fn choose(alias: &Alias, health: &dyn Fn(&str) -> Health, now_ms: u64, seed: u64) -> Choice {
    let records: Vec<Health> = alias.deployments.iter().map(|d| health(&d.model)).collect();
    let available: Vec<bool> = records.iter().map(|h| h.is_available(now_ms)).collect();
    let candidates = || (0..alias.deployments.len()).filter(|&i| available[i]);
    let first = match alias.strategy {
        Strategy::Priority => candidates().next(),
        Strategy::LeastRecentlyFailed => candidates().min_by_key(|&i| records[i].last_failure_ms),
        Strategy::Weighted => {
            let total: u64 = candidates().map(|i| u64::from(alias.deployments[i].weight.max(1))).sum();
            if total == 0 {
                None
            } else {
                let mut pick = mix(seed) % total;
                candidates().find(|&i| {
                    let w = u64::from(alias.deployments[i].weight.max(1));
                    if pick < w {
                        true
                    } else {
                        pick -= w;
                        false
                    }
                })
            }
        }
    };
    let Some(first) = first else {
        let soonest = records.iter().map(Health::available_at).min().unwrap_or(now_ms);
        return Choice::Unavailable { retry_after_ms: soonest.saturating_sub(now_ms).max(1000) };
    };
    let indexes: Vec<usize> = std::iter::once(first).chain((0..alias.deployments.len()).filter(|&i| i != first)).collect();
    Choice::Plan(Plan {
        alias: alias.name.clone(),
        order: indexes.iter().map(|&i| alias.deployments[i].model.clone()).collect(),
        available: indexes.iter().map(|&i| available[i]).collect(),
        max_attempts: alias.max_attempts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;
    use proptest::prelude::*;
    use super::Strategy;

    const T0: u64 = 1_709_208_000_000; // 2024-02-29T12:00:00Z

    fn alias(strategy: Strategy, deployments: &[(&str, u32)]) -> Alias {
        Alias {
            name: "free".to_owned(),
            deployments: deployments.iter().map(|(m, w)| Deployment { model: (*m).to_owned(), weight: *w }).collect(),
            strategy,
            max_attempts: 3,
        }
    }

    fn abc(strategy: Strategy) -> Alias {
        alias(strategy, &[("a", 1), ("b", 1), ("c", 1)])
    }

    fn healthy(_: &str) -> Health {
        Health::default()
    }

    fn cooling(until: u64) -> Health {
        Health { cooldown_until_ms: until, ..Health::default() }
    }

    fn plan(c: Choice) -> Plan {
        match c {
            Choice::Plan(p) => p,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn health_keys_and_labels() {
        assert_eq!(health_key("flash"), "tg2:h:flash");
        assert_eq!(Failure::Connect.label(), "connect");
        assert_eq!(Failure::Timeout.label(), "timeout");
        assert_eq!(Failure::Reset.label(), "reset");
        assert_eq!(Failure::Status(503).label(), "503");
    }

    #[test]
    fn default_fallback_covers_connect_timeout_reset_429_and_5xx() {
        let s = FallbackSettings::default();
        assert_eq!((s.max_attempts, s.attempt_timeout_ms, s.total_timeout_ms), (3, 30_000, 120_000));
        for f in [Failure::Connect, Failure::Timeout, Failure::Reset, Failure::Status(429), Failure::Status(500), Failure::Status(599)] {
            assert!(s.falls_back(f), "{f:?}");
        }
        for f in [Failure::Status(400), Failure::Status(404), Failure::Status(408), Failure::Status(200), Failure::Status(600), Failure::Status(0)] {
            assert!(!s.falls_back(f), "{f:?}");
        }
    }

    #[test]
    fn fallback_on_lists_kinds_statuses_and_classes() {
        let raw = |on: &[&str]| RawFallback {
            on: Some(on.iter().map(|s| (*s).to_owned()).collect()),
            max_attempts: 3,
            attempt_timeout_ms: 1000,
            total_timeout_ms: 5000,
        };
        let s = raw(&["timeout", "408", "50x", "4xx"]).validate().unwrap();
        assert!(!s.falls_back(Failure::Connect) && !s.falls_back(Failure::Reset));
        assert!(s.falls_back(Failure::Timeout));
        assert!(s.falls_back(Failure::Status(408)) && s.falls_back(Failure::Status(499)) && s.falls_back(Failure::Status(400)));
        assert!(s.falls_back(Failure::Status(500)) && s.falls_back(Failure::Status(509)));
        assert!(!s.falls_back(Failure::Status(510)) && !s.falls_back(Failure::Status(503 + 100)));
        let none = raw(&[]).validate().unwrap();
        assert!(!none.falls_back(Failure::Connect) && !none.falls_back(Failure::Status(500)));
        for (i, bad) in ["6xx", "399", "5x", "abc", "5xxx", "", "x5x", "600"].iter().enumerate() {
            let mut on = vec!["connect"; i];
            on.push(bad);
            assert_eq!(
                raw(&on).validate().unwrap_err().to_string(),
                format!("fallback.on[{i}]: unknown failure {bad:?} (use connect, timeout, reset, 429, 5xx, 4xx or a status 400..=599)")
            );
        }
    }

    #[test]
    fn health_encoding_round_trips_and_refuses_foreign_bytes() {
        let h = Health { window_start_ms: T0, failures: 2, cooldown_until_ms: T0 + 5, last_failure_ms: T0 + 1, steer_until_ms: u64::MAX };
        let bytes = h.encode();
        assert_eq!(bytes.len(), HEALTH_LEN);
        assert_eq!(bytes[0], HEALTH_FORMAT);
        assert_eq!(Health::decode(&bytes), Some(h));
        assert_eq!(Health::decode(&[]), None);
        assert_eq!(Health::decode(&bytes[..HEALTH_LEN - 1]), None);
        let mut foreign = bytes.clone();
        foreign[0] = 0x01;
        assert_eq!(Health::decode(&foreign), None);
        let mut longer = bytes;
        longer.push(0);
        assert_eq!(Health::decode(&longer), None);
    }

    #[test]
    fn availability_is_the_later_of_cooldown_and_steer() {
        let h = Health { cooldown_until_ms: T0 + 10, steer_until_ms: T0 + 20, ..Health::default() };
        assert_eq!(h.available_at(), T0 + 20);
        assert!(!h.is_available(T0 + 19));
        assert!(h.is_available(T0 + 20));
        assert!(Health::default().is_available(0));
    }

    fn failed(code: u16, retry_after_ms: Option<u64>) -> Outcome {
        Outcome::Failed { failure: Failure::Status(code), retry_after_ms }
    }

    #[test]
    fn n_failures_within_the_window_cool_down() {
        let s = HealthSettings::default(); // 3 in 60 s -> 30 s
        let h1 = next_health(None, &failed(500, None), &s, T0).unwrap();
        assert_eq!((h1.failures, h1.window_start_ms, h1.last_failure_ms, h1.cooldown_until_ms), (1, T0, T0, 0));
        assert!(h1.is_available(T0));
        let h2 = next_health(Some(&h1), &Outcome::Failed { failure: Failure::Connect, retry_after_ms: None }, &s, T0 + 1000).unwrap();
        assert_eq!((h2.failures, h2.window_start_ms, h2.last_failure_ms), (2, T0, T0 + 1000));
        let h3 = next_health(Some(&h2), &failed(503, None), &s, T0 + 2000).unwrap();
        assert_eq!(h3.cooldown_until_ms, T0 + 2000 + 30_000);
        assert_eq!((h3.failures, h3.window_start_ms), (0, T0 + 2000), "a cooldown starts a new window");
        assert!(!h3.is_available(T0 + 31_999));
        assert!(h3.is_available(T0 + 32_000));
        // a failure after the cooldown counts from one again
        let h4 = next_health(Some(&h3), &failed(500, None), &s, T0 + 40_000).unwrap();
        assert_eq!((h4.failures, h4.window_start_ms, h4.cooldown_until_ms), (1, T0 + 40_000, T0 + 32_000));
    }

    #[test]
    fn an_expired_window_restarts_the_count() {
        let s = HealthSettings::default();
        let h1 = next_health(None, &failed(500, None), &s, T0).unwrap();
        let h2 = next_health(Some(&h1), &failed(500, None), &s, T0 + 59_999).unwrap();
        assert_eq!(h2.failures, 2);
        let h3 = next_health(Some(&h2), &failed(500, None), &s, T0 + 60_000).unwrap();
        assert_eq!((h3.failures, h3.window_start_ms, h3.cooldown_until_ms), (1, T0 + 60_000, 0), "the window expired: no cooldown");
        // a clock that went backwards restarts the window too
        let h4 = next_health(Some(&h3), &failed(500, None), &s, T0).unwrap();
        assert_eq!((h4.failures, h4.window_start_ms), (1, T0));
    }

    #[test]
    fn retry_after_is_honoured_and_capped() {
        let s = HealthSettings::default();
        let h = next_health(None, &failed(429, Some(7_000)), &s, T0).unwrap();
        assert_eq!((h.failures, h.cooldown_until_ms), (1, T0 + 7_000), "one 429 with retry-after cools down at once");
        let capped = next_health(None, &failed(429, Some(86_400_000)), &s, T0).unwrap();
        assert_eq!(capped.cooldown_until_ms, T0 + 600_000);
        // never shortens a longer cooldown
        let shorter = next_health(Some(&capped), &failed(429, Some(1_000)), &s, T0 + 1).unwrap();
        assert_eq!(shorter.cooldown_until_ms, T0 + 600_000);
        // a retry-after longer than the failure cooldown wins at the N-th failure
        let one = HealthSettings { failures: 1, ..s };
        let h = next_health(None, &failed(429, Some(45_000)), &one, T0).unwrap();
        assert_eq!(h.cooldown_until_ms, T0 + 45_000);
        let h = next_health(None, &failed(429, Some(5_000)), &one, T0).unwrap();
        assert_eq!(h.cooldown_until_ms, T0 + 30_000);
    }

    fn served(requests: Option<u64>, tokens: Option<u64>, reset: Option<u64>) -> Outcome {
        Outcome::Served { quota: Quota { remaining_requests: requests, remaining_tokens: tokens, reset_after_ms: reset } }
    }

    #[test]
    fn a_healthy_success_writes_nothing() {
        let s = HealthSettings::default();
        assert_eq!(next_health(None, &served(None, None, None), &s, T0), None);
        assert_eq!(next_health(None, &served(Some(10), Some(5000), Some(100)), &s, T0), None);
        let failing = Health { failures: 2, window_start_ms: T0, last_failure_ms: T0, ..Health::default() };
        assert_eq!(next_health(Some(&failing), &served(Some(10), None, None), &s, T0 + 1), None, "failures in the window stay counted");
        let expired_steer = Health { steer_until_ms: T0, ..Health::default() };
        assert_eq!(next_health(Some(&expired_steer), &served(Some(1), None, None), &s, T0 + 1), None);
    }

    #[test]
    fn an_exhausted_quota_steers_away_until_its_reset() {
        let s = HealthSettings::default();
        let h = next_health(None, &served(Some(0), Some(900), Some(20_000)), &s, T0).unwrap();
        assert_eq!(h.steer_until_ms, T0 + 20_000);
        assert!(!h.is_available(T0 + 19_999));
        assert_eq!(h.failures, 0);
        // tokens exhausted, unknown reset: one second
        let h = next_health(None, &served(None, Some(0), None), &s, T0).unwrap();
        assert_eq!(h.steer_until_ms, T0 + 1000);
        // capped
        let h = next_health(None, &served(Some(0), None, Some(10_000_000)), &s, T0).unwrap();
        assert_eq!(h.steer_until_ms, T0 + 600_000);
        // the same reading again writes nothing
        assert_eq!(next_health(Some(&h), &served(Some(0), None, Some(10_000_000)), &s, T0), None);
        // thresholds above zero steer before exhaustion
        let early = HealthSettings { min_remaining_requests: 5, min_remaining_tokens: 1000, ..s.clone() };
        assert!(next_health(None, &served(Some(5), None, Some(3000)), &early, T0).is_some());
        assert!(next_health(None, &served(Some(6), Some(1000), Some(3000)), &early, T0).is_some());
        assert_eq!(next_health(None, &served(Some(6), Some(1001), Some(3000)), &early, T0), None);
    }

    #[test]
    fn a_plentiful_answer_clears_a_steer() {
        let s = HealthSettings::default();
        let steered = Health { steer_until_ms: T0 + 5000, failures: 1, window_start_ms: T0, ..Health::default() };
        let h = next_health(Some(&steered), &served(Some(40), None, None), &s, T0 + 10).unwrap();
        assert_eq!(h.steer_until_ms, 0);
        assert_eq!((h.failures, h.window_start_ms), (1, T0), "only the steer is cleared");
        // an answer without quota headers clears it as well: the provider served
        assert_eq!(next_health(Some(&steered), &served(None, None, None), &s, T0 + 10).unwrap().steer_until_ms, 0);
    }

    #[test]
    fn report_and_read_go_through_the_store_protocol() {
        use crate::ops::sync::{run_op, Rules};
        use crate::ops::{Op, Reply};
        let p = crate::config::Policy::from_json(br#"{"tier":{"default":"d"},"tiers":{"d":{"limits":[]}},"health":{"failures":2}}"#).unwrap();
        let rules = Rules::from(&p);
        let mut store = MemoryStore::new();
        let read = |store: &mut MemoryStore, d: &str| match run_op(store, rules, &Op::HealthRead { deployment: d.into() }).unwrap() {
            Reply::Health(h) => h,
            other => panic!("{other:?}"),
        };
        let report = |store: &mut MemoryStore, d: &str, outcome: Outcome, now: u64| match run_op(store, rules, &Op::HealthReport { deployment: d.into(), outcome, now }).unwrap() {
            Reply::Health(h) => h,
            other => panic!("{other:?}"),
        };
        assert_eq!(read(&mut store, "flash"), Health::default());
        assert_eq!(report(&mut store, "flash", served(Some(9), None, None), T0), Health::default());
        assert!(store.is_empty(), "a healthy success never writes");
        let h = report(&mut store, "flash", failed(500, None), T0);
        assert_eq!(h.failures, 1);
        let h = report(&mut store, "flash", failed(502, None), T0 + 1);
        assert_eq!(h.cooldown_until_ms, T0 + 1 + 30_000);
        assert_eq!(read(&mut store, "flash"), h);
        assert_eq!(store.get("tg2:h:flash"), Some(h.encode().as_slice()));
        // garbled bytes read as healthy, and a report overwrites them
        crate::store::CasStore::store(&mut store, "tg2:h:pro", b"garbage", None).unwrap();
        assert_eq!(read(&mut store, "pro"), Health::default());
        let h = report(&mut store, "pro", failed(429, Some(2000)), T0);
        assert_eq!(read(&mut store, "pro"), h);
    }

    fn hdrs(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn go_durations_as_openai_sends_them() {
        for (v, ms) in [
            ("1s", 1000),
            ("6m0s", 360_000),
            ("20ms", 20),
            ("1h2m3.5s", 3_723_500),
            ("17.28s", 17_280),
            ("0s", 0),
            ("1.5µs", 1),
            ("999ns", 1),
            ("2", 2000),
            ("0.25", 250),
            ("744h0m0s", 744 * 3_600_000),
        ] {
            assert_eq!(parse_go_duration_ms(v), Some(ms), "{v}");
        }
        for bad in ["", "s", "1x", "-1s", "1..2s", "1h2", "ms", "1 s", "99999999999999999999999h"] {
            assert_eq!(parse_go_duration_ms(bad), None, "{bad}");
        }
    }

    #[test]
    fn openai_quota_headers() {
        let q = quota_from_headers(
            &hdrs(&[
                ("x-ratelimit-limit-requests", "10000"),
                ("x-ratelimit-limit-tokens", "1000000"),
                ("x-ratelimit-remaining-requests", "9999"),
                ("x-ratelimit-remaining-tokens", "999985"),
                ("x-ratelimit-reset-requests", "6ms"),
                ("x-ratelimit-reset-tokens", "0s"),
                ("content-type", "application/json"),
            ]),
            T0,
        );
        assert_eq!(q, Quota { remaining_requests: Some(9999), remaining_tokens: Some(999_985), reset_after_ms: Some(6) });
        let exhausted = quota_from_headers(
            &hdrs(&[
                ("x-ratelimit-remaining-requests", "0"),
                ("x-ratelimit-reset-requests", "1m30s"),
                ("x-ratelimit-remaining-tokens", "5000"),
                ("x-ratelimit-reset-tokens", "2s"),
            ]),
            T0,
        );
        assert_eq!(exhausted, Quota { remaining_requests: Some(0), remaining_tokens: Some(5000), reset_after_ms: Some(90_000) });
        // mixed-case names and unreadable values
        let q = quota_from_headers(&hdrs(&[("X-RateLimit-Remaining-Requests", "12"), ("x-ratelimit-remaining-tokens", "lots"), ("x-ratelimit-reset-requests", "soon")]), T0);
        assert_eq!(q, Quota { remaining_requests: Some(12), remaining_tokens: None, reset_after_ms: None });
        assert_eq!(quota_from_headers(&[], T0), Quota::default());
    }

    #[test]
    fn anthropic_quota_headers() {
        // T0 = 2024-02-29T12:00:00Z
        let q = quota_from_headers(
            &hdrs(&[
                ("anthropic-ratelimit-requests-limit", "50"),
                ("anthropic-ratelimit-requests-remaining", "49"),
                ("anthropic-ratelimit-requests-reset", "2024-02-29T12:00:01Z"),
                ("anthropic-ratelimit-tokens-limit", "90000"),
                ("anthropic-ratelimit-tokens-remaining", "89000"),
                ("anthropic-ratelimit-tokens-reset", "2024-02-29T12:00:05Z"),
                ("anthropic-ratelimit-input-tokens-limit", "50000"),
                ("anthropic-ratelimit-input-tokens-remaining", "0"),
                ("anthropic-ratelimit-input-tokens-reset", "2024-02-29T12:00:42.500Z"),
                ("anthropic-ratelimit-output-tokens-remaining", "10000"),
                ("anthropic-ratelimit-output-tokens-reset", "2024-02-29T12:00:02+00:00"),
            ]),
            T0,
        );
        assert_eq!(q, Quota { remaining_requests: Some(49), remaining_tokens: Some(0), reset_after_ms: Some(42_500) });
        // nothing exhausted: the later reset of the lowest request and token quotas
        let q = quota_from_headers(
            &hdrs(&[
                ("anthropic-ratelimit-requests-remaining", "3"),
                ("anthropic-ratelimit-requests-reset", "2024-02-29T12:00:10Z"),
                ("anthropic-ratelimit-output-tokens-remaining", "200"),
                ("anthropic-ratelimit-output-tokens-reset", "2024-02-29T12:00:20Z"),
                ("anthropic-ratelimit-input-tokens-remaining", "900"),
                ("anthropic-ratelimit-input-tokens-reset", "2024-02-29T12:01:00Z"),
            ]),
            T0,
        );
        assert_eq!(q, Quota { remaining_requests: Some(3), remaining_tokens: Some(200), reset_after_ms: Some(20_000) });
        // a reset in the past is now
        let q = quota_from_headers(&hdrs(&[("anthropic-ratelimit-requests-remaining", "0"), ("anthropic-ratelimit-requests-reset", "2024-02-29T11:00:00Z")]), T0);
        assert_eq!(q.reset_after_ms, Some(0));
    }

    #[test]
    fn retry_after_in_seconds_or_as_an_http_date() {
        assert_eq!(retry_after_ms("7", T0), Some(7000));
        assert_eq!(retry_after_ms(" 0 ", T0), Some(0));
        assert_eq!(retry_after_ms("1.5", T0), Some(1500));
        assert_eq!(retry_after_ms("Thu, 29 Feb 2024 12:00:30 GMT", T0), Some(30_000));
        assert_eq!(retry_after_ms("Thu, 29 Feb 2024 11:00:00 GMT", T0), Some(0), "a past date: now");
        for bad in ["", "-1", "soon", "Thu, 32 Feb 2024 12:00:30 GMT", "1e3"] {
            assert_eq!(retry_after_ms(bad, T0), None, "{bad}");
        }
        assert_eq!(retry_after_ms("99999999999999999999", T0), Some(u64::MAX));
    }

    #[test]
    fn priority_takes_the_first_available() {
        let a = abc(Strategy::Priority);
        let p = plan(choose(&a, &healthy, T0, 1));
        assert_eq!(p.order, ["a", "b", "c"]);
        assert_eq!(p.available, [true, true, true]);
        assert_eq!((p.route_value(), p.attempts()), ("free/a".to_owned(), vec!["a", "b", "c"]));
        let h = |d: &str| if d == "a" { cooling(T0 + 5000) } else { Health::default() };
        let p = plan(choose(&a, &h, T0, 1));
        assert_eq!(p.order, ["b", "a", "c"]);
        assert_eq!(p.available, [true, false, true]);
        assert_eq!(p.attempts(), ["b", "c"], "a cooling deployment is skipped by hosts that can skip");
        assert_eq!(p.route_value(), "free/b");
        // the cooldown ends
        assert_eq!(plan(choose(&a, &h, T0 + 5000, 1)).order, ["a", "b", "c"]);
    }

    #[test]
    fn attempts_stop_at_max_attempts() {
        let mut a = abc(Strategy::Priority);
        a.max_attempts = 2;
        assert_eq!(plan(choose(&a, &healthy, T0, 0)).attempts(), ["a", "b"]);
        a.max_attempts = 1;
        assert_eq!(plan(choose(&a, &healthy, T0, 0)).attempts(), ["a"]);
    }

    #[test]
    fn every_deployment_cooling_is_unavailable_until_the_soonest() {
        for strategy in [Strategy::Priority, Strategy::Weighted, Strategy::LeastRecentlyFailed] {
            let a = abc(strategy);
            let h = |d: &str| match d {
                "a" => cooling(T0 + 30_000),
                "b" => Health { steer_until_ms: T0 + 12_000, ..Health::default() },
                _ => cooling(T0 + 20_000),
            };
            assert_eq!(choose(&a, &h, T0, 9), Choice::Unavailable { retry_after_ms: 12_000 }, "{strategy:?}");
            // at least a second
            let soon = |_: &str| cooling(T0 + 10);
            assert_eq!(choose(&a, &soon, T0, 9), Choice::Unavailable { retry_after_ms: 1000 }, "{strategy:?}");
        }
    }

    #[test]
    fn least_recently_failed_prefers_the_never_failed_then_the_oldest_failure() {
        let a = abc(Strategy::LeastRecentlyFailed);
        let failed_at = |t: u64| Health { last_failure_ms: t, failures: 1, window_start_ms: t, ..Health::default() };
        let h = |d: &str| match d {
            "a" => failed_at(T0 - 10),
            "b" => failed_at(T0 - 500),
            _ => Health::default(),
        };
        assert_eq!(plan(choose(&a, &h, T0, 0)).order, ["c", "a", "b"]);
        let h = |d: &str| match d {
            "a" => failed_at(T0 - 10),
            "b" => failed_at(T0 - 500),
            _ => failed_at(T0 - 20),
        };
        assert_eq!(plan(choose(&a, &h, T0, 0)).order, ["b", "a", "c"]);
        // ties by alias order
        assert_eq!(plan(choose(&a, &healthy, T0, 0)).order, ["a", "b", "c"]);
        let tie = |d: &str| if d == "a" { failed_at(T0 - 1) } else { failed_at(T0 - 7) };
        assert_eq!(plan(choose(&a, &tie, T0, 0)).order, ["b", "a", "c"]);
        // a cooling deployment is not chosen however long ago it failed
        let h = |d: &str| if d == "b" { Health { cooldown_until_ms: T0 + 1, ..failed_at(T0 - 900) } } else { failed_at(T0 - 5) };
        let p = plan(choose(&a, &h, T0, 0));
        assert_eq!((p.order[0].as_str(), p.available.clone()), ("a", vec![true, false, true]));
    }

    #[test]
    fn weighted_follows_the_weights_over_many_seeds() {
        let a = alias(Strategy::Weighted, &[("a", 1), ("b", 3), ("c", 6)]);
        let mut counts = BTreeMap::new();
        let n = 20_000u64;
        for seed in 0..n {
            let p = plan(choose(&a, &healthy, T0, T0 ^ seed));
            *counts.entry(p.order[0].clone()).or_insert(0u64) += 1;
            assert_eq!(p.order.len(), 3);
        }
        for (d, w) in [("a", 1u64), ("b", 3), ("c", 6)] {
            let expected = n * w / 10;
            let got = counts[d];
            assert!(got.abs_diff(expected) < expected / 10 + 100, "{d}: {got} vs {expected} ({counts:?})");
        }
        // deterministic in the seed
        assert_eq!(choose(&a, &healthy, T0, 42), choose(&a, &healthy, T0, 42));
        // only the available are picked; the rest keep the alias order
        let h = |d: &str| if d == "c" { cooling(T0 + 1) } else { Health::default() };
        let mut seen_b = false;
        for seed in 0..200 {
            let p = plan(choose(&a, &h, T0, seed));
            assert_ne!(p.order[0], "c");
            seen_b |= p.order[0] == "b";
            if p.order[0] == "b" {
                assert_eq!(p.order, ["b", "a", "c"]);
            }
        }
        assert!(seen_b);
        let only_c = |d: &str| if d == "c" { Health::default() } else { cooling(T0 + 1) };
        for seed in 0..50 {
            assert_eq!(plan(choose(&a, &only_c, T0, seed)).order, ["c", "a", "b"]);
        }
    }

    fn aliases_of(json: &str, models: &[&str]) -> Result<BTreeMap<String, Alias>, ConfigError> {
        let raw: BTreeMap<String, RawAlias> = serde_json::from_str(json).unwrap();
        let models: Vec<String> = models.iter().map(|m| (*m).to_owned()).collect();
        validate_aliases(raw, &|m| models.iter().any(|x| x == m), &FallbackSettings::default())
    }

    #[test]
    fn aliases_are_validated_with_paths() {
        let models = ["flash", "pro", "deepseek"];
        let ok = aliases_of(r#"{"free": {"deployments": ["flash", {"model": "pro", "weight": 3}, "deepseek"], "strategy": "weighted"}}"#, &models).unwrap();
        let a = &ok["free"];
        assert_eq!(a.deployments[1], Deployment { model: "pro".to_owned(), weight: 3 });
        assert_eq!((a.deployments[0].weight, a.strategy, a.max_attempts), (1, Strategy::Weighted, 3));
        let two = aliases_of(r#"{"x": {"deployments": ["flash", "pro"], "max_attempts": 9}}"#, &models).unwrap();
        assert_eq!((two["x"].max_attempts, two["x"].strategy), (2, Strategy::Priority), "capped at the number of deployments");
        let one = aliases_of(r#"{"x": {"deployments": ["flash", "pro"], "max_attempts": 1}}"#, &models).unwrap();
        assert_eq!(one["x"].max_attempts, 1);
        for (json, message) in [
            (r#"{"flash": {"deployments": ["pro"]}}"#, r#"aliases.flash: "flash" is already a model in models (an alias needs a name of its own)"#),
            (r#"{"x": {"deployments": []}}"#, "aliases.x.deployments: an alias has 1 to 10 deployments"),
            (r#"{"x": {"deployments": ["flash", "gpt-5"]}}"#, r#"aliases.x.deployments[1]: unknown model "gpt-5" (deployments are names in models)"#),
            (r#"{"x": {"deployments": ["flash", "pro", {"model": "flash"}]}}"#, r#"aliases.x.deployments[2]: duplicate deployment "flash" (already at deployments[0])"#),
            (r#"{"x": {"deployments": [{"model": "pro", "weight": 0}]}}"#, "aliases.x.deployments[0].weight: must be from 1 to 1000"),
            (r#"{"x": {"deployments": [{"model": "pro", "weight": 1001}]}}"#, "aliases.x.deployments[0].weight: must be from 1 to 1000"),
            (r#"{"x": {"deployments": [{"model": "pro", "weight": -1}]}}"#, "aliases.x.deployments[0].weight: must be from 1 to 1000"),
            (r#"{"x": {"deployments": [{"model": "pro", "cost": 1}]}}"#, "aliases.x.deployments[0].cost: unknown field `cost`, expected `model` or `weight`"),
            (r#"{"x": {"deployments": [{"weight": 2}]}}"#, "aliases.x.deployments[0]: missing field `model`"),
            (r#"{"x": {"deployments": [7]}}"#, "aliases.x.deployments[0]: a deployment is a model name or {\"model\": …, \"weight\": …}"),
            (r#"{"x": {"deployments": ["pro"], "max_attempts": 0}}"#, "aliases.x.max_attempts: must be from 1 to 10"),
            (r#"{"x y": {"deployments": ["pro"]}}"#, "aliases.x y: alias names are 1-64 characters of letters, digits, '_', '-', '.' and ':'"),
            (r#"{"a/b": {"deployments": ["pro"]}}"#, "aliases.a/b: alias names are 1-64 characters of letters, digits, '_', '-', '.' and ':'"),
        ] {
            assert_eq!(aliases_of(json, &models).unwrap_err().to_string(), message, "{json}");
        }
        assert_eq!(
            aliases_of(r#"{"x": {"deployments": ["a,b"]}}"#, &["a,b"]).unwrap_err().to_string(),
            r#"aliases.x.deployments[0]: model "a,b" cannot be a deployment: its name must be printable ASCII without ','"#
        );
        let eleven: Vec<String> = (0..11).map(|i| format!("m{i}")).collect();
        let names: Vec<&str> = eleven.iter().map(String::as_str).collect();
        let json = format!(r#"{{"x": {{"deployments": {}}}}}"#, serde_json::to_string(&eleven).unwrap());
        assert_eq!(aliases_of(&json, &names).unwrap_err().to_string(), "aliases.x.deployments: an alias has 1 to 10 deployments");
    }

    #[test]
    fn health_settings_are_checked() {
        let raw = |json: &str| serde_json::from_str::<RawHealth>(json).unwrap().validate();
        assert_eq!(raw("{}").unwrap(), HealthSettings::default());
        let s = raw(r#"{"failures": 5, "window_seconds": 10, "cooldown_seconds": 2, "max_cooldown_seconds": 3, "min_remaining_requests": 1, "min_remaining_tokens": 500}"#).unwrap();
        assert_eq!(s, HealthSettings { failures: 5, window_ms: 10_000, cooldown_ms: 2000, max_cooldown_ms: 3000, min_remaining_requests: 1, min_remaining_tokens: 500 });
        assert_eq!(raw(r#"{"failures": 0}"#).unwrap_err().to_string(), "health.failures: must be from 1 to 1000");
        assert_eq!(raw(r#"{"window_seconds": 0}"#).unwrap_err().to_string(), "health.window_seconds: must be from 1 to 86400");
        assert_eq!(raw(r#"{"cooldown_seconds": 90000}"#).unwrap_err().to_string(), "health.cooldown_seconds: must be from 1 to 86400");
        assert_eq!(raw(r#"{"cooldown_seconds": 60, "max_cooldown_seconds": 30}"#).unwrap_err().to_string(), "health.max_cooldown_seconds: must be at least cooldown_seconds (60)");
    }

    #[test]
    fn fallback_limits_are_checked() {
        let raw = |json: &str| serde_json::from_str::<RawFallback>(json).unwrap().validate();
        assert_eq!(raw("{}").unwrap(), FallbackSettings::default());
        assert_eq!(raw(r#"{"max_attempts": 0}"#).unwrap_err().to_string(), "fallback.max_attempts: must be from 1 to 10");
        assert_eq!(raw(r#"{"max_attempts": 11}"#).unwrap_err().to_string(), "fallback.max_attempts: must be from 1 to 10");
        assert_eq!(raw(r#"{"attempt_timeout_ms": 0}"#).unwrap_err().to_string(), "fallback.attempt_timeout_ms: must be from 1 to 3600000");
        assert_eq!(raw(r#"{"total_timeout_ms": 3600001}"#).unwrap_err().to_string(), "fallback.total_timeout_ms: must be from 1 to 3600000");
        assert_eq!(raw(r#"{"on": ["connect", "timeout", "reset", "429", "5xx"]}"#).unwrap(), FallbackSettings::default());
    }

    proptest! {
        #[test]
        fn health_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Health::decode(&bytes);
        }

        #[test]
        fn health_round_trips(w in any::<u64>(), f in any::<u32>(), c in any::<u64>(), l in any::<u64>(), s in any::<u64>()) {
            let h = Health { window_start_ms: w, failures: f, cooldown_until_ms: c, last_failure_ms: l, steer_until_ms: s };
            prop_assert_eq!(Health::decode(&h.encode()), Some(h));
        }

        #[test]
        fn header_parsers_never_panic(v in "\\PC{0,40}", now in any::<u64>()) {
            let _ = retry_after_ms(&v, now);
            let _ = parse_go_duration_ms(&v);
            let _ = quota_from_headers(&[("x-ratelimit-reset-tokens".to_owned(), v.clone()), ("anthropic-ratelimit-tokens-reset".to_owned(), v.clone())], now);
        }

        #[test]
        fn next_health_never_panics(prev in proptest::option::of((any::<u64>(), any::<u32>(), any::<u64>(), any::<u64>(), any::<u64>())),
                                    now in any::<u64>(), ra in proptest::option::of(any::<u64>()), fail in any::<bool>()) {
            let prev = prev.map(|(w, f, c, l, s)| Health { window_start_ms: w, failures: f, cooldown_until_ms: c, last_failure_ms: l, steer_until_ms: s });
            let outcome = if fail { Outcome::Failed { failure: Failure::Timeout, retry_after_ms: ra } } else { Outcome::Served { quota: Quota { remaining_requests: Some(0), remaining_tokens: None, reset_after_ms: ra } } };
            let _ = next_health(prev.as_ref(), &outcome, &HealthSettings::default(), now);
        }
    }
}
