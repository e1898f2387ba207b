//! The policy: one JSON schema for every host, parsed and validated once.
//!
//! ```json
//! {
//!   "identity": { "header": "x-tollgate-user" },
//!   "tier": { "header": "x-tollgate-tier", "default": "free" },
//!   "store": { "max_retries": 16, "on_failure": "allow" },
//!   "tiers": {
//!     "free": { "limits": [ { "window": "hour", "requests": 10 }, { "window": "day", "requests": 50 } ] },
//!     "enterprise": { "limits": [] }
//!   }
//! }
//! ```
//! Unknown fields are errors. Every error names the path it is about, e.g.
//! `tiers.free.limits[1].window: unknown window "fortnight" (expected one of: minute, hour, day, month)`.
//!
//! Headers named here must be set by something the operator trusts (the app's backend, an
//! authenticating proxy): a client that can set `identity.header` can pick its own bucket.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

use crate::fallback::{FallbackSettings, HealthSettings, RawAlias, RawFallback, RawHealth};
use crate::guard::{Guards, RawGuards};
use crate::identity::{IdentityConfig, RawIdentity, RawTierSelect};
use crate::limits::engine::{LimitSet, Price};
use crate::limits::ledger::Settings;
use crate::limits::{check_duplicates, usd_to_micros, Limit, Metric, RawLimit, Scope};
use crate::message::{Messages, RawMessages};
use crate::routing::{RawModel, RawProvider, Routes};
use crate::window::{Window, Zone};

pub use crate::error::ConfigError;
use crate::error::invalid;

/// What to do when the counter store cannot be updated (retries exhausted, host failure).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Let the request through uncounted (availability first). The default.
    #[default]
    Allow,
    /// Refuse the request with a 503 the OpenAI SDKs retry.
    Deny,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    time_zone: Option<String>,
    #[serde(default)]
    identity: RawIdentity,
    tier: RawTierSelect,
    #[serde(default)]
    store: RawStore,
    tiers: BTreeMap<String, RawTier>,
    global: Option<RawGlobal>,
    #[serde(default)]
    prices: BTreeMap<String, RawPrice>,
    notify: Option<RawNotify>,
    admin: Option<RawAdmin>,
    #[serde(default)]
    providers: BTreeMap<String, RawProvider>,
    #[serde(default)]
    models: BTreeMap<String, RawModel>,
    #[serde(default)]
    aliases: BTreeMap<String, RawAlias>,
    fallback: Option<RawFallback>,
    health: Option<RawHealth>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    #[serde(default = "default_retries")]
    max_retries: u32,
    #[serde(default)]
    on_failure: FailureMode,
    #[serde(default = "default_slots")]
    slots: u32,
    #[serde(default = "default_members_per_slot")]
    members_per_slot: u32,
    #[serde(default = "default_lease_ttl")]
    lease_ttl_seconds: u64,
    redis: Option<RawRedis>,
}

/// `store.redis`: counters, leases, crossings and health in Redis, reached through the
/// `tollgate store` service (a fleet of Envoys shares them).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRedis {
    /// The Envoy cluster that reaches the store service.
    cluster: String,
    /// The `:authority` sent to it (default: the cluster name).
    authority: Option<String>,
    /// How long an admission waits for the service before `on_failure` decides.
    #[serde(default = "default_store_timeout")]
    timeout_ms: u32,
    /// Names the secret both the Envoys and the service hold: sent with every job, and every
    /// job without it refused.
    key_secret: Option<String>,
}

fn default_store_timeout() -> u32 {
    50
}

/// Where a fleet's state lives (`store.redis`; validated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteStore {
    /// The Envoy cluster of the store service.
    pub cluster: String,
    /// The `:authority` of its requests.
    pub authority: String,
    /// The most an admission waits for it, in milliseconds.
    pub timeout_ms: u32,
    /// The secret (by name) every job carries (`authorization: Bearer`), when set.
    pub key_secret: Option<String>,
}

impl Default for RawStore {
    fn default() -> Self {
        RawStore {
            max_retries: default_retries(),
            on_failure: FailureMode::Allow,
            slots: default_slots(),
            members_per_slot: default_members_per_slot(),
            lease_ttl_seconds: default_lease_ttl(),
            redis: None,
        }
    }
}

fn default_retries() -> u32 {
    16
}
fn default_slots() -> u32 {
    65_536
}
fn default_members_per_slot() -> u32 {
    64
}
fn default_lease_ttl() -> u64 {
    900
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTier {
    #[serde(default)]
    limits: Vec<RawLimit>,
    #[serde(default)]
    guards: RawGuards,
    messages: Option<RawMessages>,
    /// Send `max_tokens` = the output reservation upstream, so a response can never use more
    /// output tokens than were reserved for it.
    #[serde(default)]
    cap_output: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGlobal {
    limits: Vec<RawLimit>,
}

/// US dollars per million tokens.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrice {
    input: f64,
    output: f64,
    cached_input: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNotify {
    /// Envoy: the cluster the webhook is reached through.
    cluster: Option<String>,
    /// The webhook URL (the worker fetches it; Envoy uses its path and host).
    url: String,
    #[serde(default = "default_notify_timeout")]
    timeout_ms: u32,
}

fn default_notify_timeout() -> u32 {
    5000
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    /// Names the host secret holding the admin key (the worker's usage listing).
    key_secret: String,
}

/// What a tier does besides its limits.
#[derive(Debug, Clone, Default)]
pub struct TierRules {
    /// The tier's abuse guards.
    pub guards: Guards,
    /// The tier's refusal and warning messages.
    pub messages: Messages,
    /// Whether a request that names no output limit is sent with `max_tokens` set to its output
    /// reservation, so it cannot use more output tokens than were reserved (`cap_output`).
    pub cap_output: bool,
}

/// Where threshold events are posted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notify {
    /// Envoy: the cluster the webhook is reached through.
    pub cluster: Option<String>,
    /// The webhook URL (the worker fetches it; Envoy uses its path and host).
    pub url: String,
    /// `host[:port]` of `url`.
    pub authority: String,
    /// Path and query of `url`.
    pub path: String,
    /// How long one post may take, in milliseconds.
    pub timeout_ms: u32,
}

/// A validated policy, shared read-only by every request.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Who is asking and which tier applies: the `identity` and `tier` sections.
    pub identity: IdentityConfig,
    /// Every tier's limits, the global ones and the price table.
    pub limits: LimitSet,
    rules: BTreeMap<String, TierRules>,
    /// How many times an update of the counter store is retried after a conflict
    /// (`store.max_retries`).
    pub max_retries: u32,
    /// What happens to a request when the counter store fails (`store.on_failure`).
    pub on_failure: FailureMode,
    /// Providers and the model map (empty: no translation).
    pub routes: Routes,
    /// Where `notify` threshold events are posted (`None`: nowhere).
    pub notify: Option<Notify>,
    /// Secret name of the admin key (worker usage listing).
    pub admin_key_secret: Option<String>,
    /// When a request for an alias moves on to its next deployment.
    pub fallback: FallbackSettings,
    /// When a deployment is cooled down or steered away from.
    pub health: HealthSettings,
    /// `store.redis`: the fleet's shared store (`None`: the host's own, e.g. Envoy's shared data).
    pub remote_store: Option<RemoteStore>,
    /// The policy document's digest (hex, 16 bytes of SHA-256 over its canonical JSON): a
    /// store service refuses jobs from a host running another policy.
    pub digest: String,
}

pub(crate) const MAX_RETRIES_LIMIT: u32 = 1000;
pub(crate) const MAX_SLOTS: u32 = 1 << 24;
pub(crate) const MAX_MEMBERS_PER_SLOT: u32 = 1024;
pub(crate) const MAX_CONCURRENT: u64 = 65_535;

impl Policy {
    /// Parses and validates a policy from its JSON text. Every error names the JSON path it is
    /// about.
    pub fn from_json(bytes: &[u8]) -> Result<Policy, ConfigError> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ConfigError::Empty);
        }
        // Parse to a tree first, so that type errors below carry a path and no line/column.
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        if !value.is_object() {
            return Err(invalid("config", "must be a JSON object"));
        }
        // What a store service checks it runs the same policy by: the document's SHA-256,
        // whatever its formatting (keys sorted, no whitespace).
        let canonical = serde_json::to_vec(&value).unwrap_or_default();
        let digest = crate::identity::subject_key(&String::from_utf8_lossy(&canonical)).replacen("tg1:q:", "", 1);
        let raw: RawConfig = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let message = e.into_inner().to_string();
            if path == "." {
                invalid("config", message)
            } else {
                invalid(path, message)
            }
        })?;
        let mut policy = Self::validate(raw)?;
        policy.digest = digest;
        Ok(policy)
    }

    fn validate(raw: RawConfig) -> Result<Policy, ConfigError> {
        if raw.tiers.is_empty() {
            return Err(invalid("tiers", "at least one tier is required"));
        }
        for name in raw.tiers.keys() {
            if name.is_empty()
                || name.len() > 64
                || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
            {
                return Err(invalid(
                    format!("tiers.{name}"),
                    "tier names are 1-64 characters of letters, digits, '_', '-' and '.'",
                ));
            }
        }
        let tier_names: BTreeSet<String> = raw.tiers.keys().cloned().collect();
        let identity = IdentityConfig::validate(raw.identity, raw.tier, &tier_names)?;
        let zone = match &raw.time_zone {
            None => Zone::utc(),
            Some(name) => Zone::named(name).map_err(|e| invalid("time_zone", e))?,
        };
        let store = raw.store;
        if store.max_retries > MAX_RETRIES_LIMIT {
            return Err(invalid("store.max_retries", format!("must be at most {MAX_RETRIES_LIMIT}")));
        }
        if store.slots > MAX_SLOTS {
            return Err(invalid("store.slots", format!("must be at most {MAX_SLOTS} (0: one key per identity)")));
        }
        if store.members_per_slot == 0 || store.members_per_slot > MAX_MEMBERS_PER_SLOT {
            return Err(invalid("store.members_per_slot", format!("must be from 1 to {MAX_MEMBERS_PER_SLOT}")));
        }
        if store.lease_ttl_seconds == 0 || store.lease_ttl_seconds > 86_400 {
            return Err(invalid("store.lease_ttl_seconds", "must be from 1 to 86400"));
        }
        let remote_store = match store.redis {
            None => None,
            Some(r) => {
                let name_ok = |n: &str| !n.is_empty() && n.len() <= 200 && n.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
                if !name_ok(&r.cluster) {
                    return Err(invalid("store.redis.cluster", "must name the Envoy cluster of the tollgate store service"));
                }
                if let Some(a) = &r.authority {
                    if !name_ok(a) {
                        return Err(invalid("store.redis.authority", "must be a host name (and port)"));
                    }
                }
                if r.timeout_ms == 0 || r.timeout_ms > 10_000 {
                    return Err(invalid("store.redis.timeout_ms", "must be from 1 to 10000"));
                }
                if r.key_secret.as_deref().is_some_and(|n| !crate::routing::is_secret_name(n)) {
                    return Err(invalid("store.redis.key_secret", "must name a secret (letters, digits, '_'), never hold a key"));
                }
                Some(RemoteStore { authority: r.authority.unwrap_or_else(|| r.cluster.clone()), cluster: r.cluster, timeout_ms: r.timeout_ms, key_secret: r.key_secret })
            }
        };
        let fallback = raw.fallback.map(RawFallback::validate).transpose()?.unwrap_or_default();
        let health = raw.health.map(RawHealth::validate).transpose()?.unwrap_or_default();
        let mut routes = Routes::validate(raw.providers, raw.models)?;
        routes.validate_aliases(raw.aliases, &fallback)?;
        let routes = routes;
        // Client-visible names (models and aliases): allowlists and downgrade targets.
        let model_known = |m: &str| routes.knows(m);

        let mut tiers = BTreeMap::new();
        let mut rules = BTreeMap::new();
        let mut tracked: BTreeMap<Scope, Vec<(Metric, Window)>> = BTreeMap::new();
        let mut cost_limit: Option<String> = None;
        for (name, tier) in raw.tiers {
            let path = format!("tiers.{name}.limits");
            let mut limits = Vec::with_capacity(tier.limits.len());
            for (i, raw_limit) in tier.limits.into_iter().enumerate() {
                limits.push(raw_limit.validate(&format!("{path}[{i}]"), false, &model_known)?);
            }
            check_duplicates(&path, &limits)?;
            for (i, l) in limits.iter().enumerate() {
                check_limit_range(&format!("{path}[{i}]"), l)?;
                if let (Some(w), Scope::Identity | Scope::Ip) = (l.window(), l.scope) {
                    tracked.entry(l.scope).or_default().push((l.metric, w));
                }
                if l.metric == Metric::CostMicros && cost_limit.is_none() {
                    cost_limit = Some(format!("{path}[{i}]"));
                }
            }
            let guards = Guards::validate(tier.guards, &format!("tiers.{name}.guards"))?;
            if routes.is_enabled() {
                for (i, m) in guards.models().unwrap_or_default().iter().enumerate() {
                    if !model_known(m) {
                        return Err(invalid(format!("tiers.{name}.guards.models[{i}]"), format!("unknown model \"{m}\" (models are configured in models, aliases in aliases)")));
                    }
                }
            }
            let messages = match tier.messages {
                Some(m) => Messages::validate(m, &format!("tiers.{name}.messages"))?,
                None => Messages::default(),
            };
            rules.insert(name.clone(), TierRules { guards, messages, cap_output: tier.cap_output });
            tiers.insert(name, limits);
        }
        let mut global = Vec::new();
        if let Some(g) = raw.global {
            for (i, raw_limit) in g.limits.into_iter().enumerate() {
                let l = raw_limit.validate(&format!("global.limits[{i}]"), true, &model_known)?;
                check_limit_range(&format!("global.limits[{i}]"), &l)?;
                if l.metric == Metric::CostMicros && cost_limit.is_none() {
                    cost_limit = Some(format!("global.limits[{i}]"));
                }
                global.push(l);
            }
            check_duplicates("global.limits", &global)?;
        }
        for list in tracked.values_mut() {
            list.sort();
            list.dedup();
        }

        let mut prices = BTreeMap::new();
        for (model, p) in raw.prices {
            let path = format!("prices.{model}");
            if routes.alias(&model).is_some() {
                return Err(invalid(path, format!("\"{model}\" is an alias: it is priced at the most expensive of its deployments")));
            }
            if routes.is_enabled() && routes.route(&model).is_none() {
                return Err(invalid(path, format!("unknown model \"{model}\" (prices are per model in models)")));
            }
            let micros = |field: &str, usd: f64| -> Result<u64, ConfigError> {
                if !(usd.is_finite() && (0.0..=1e6).contains(&usd)) {
                    return Err(invalid(format!("{path}.{field}"), "must be US dollars per million tokens, from 0 to 1000000"));
                }
                Ok(usd_to_micros(usd))
            };
            let input = micros("input", p.input)?;
            let output = micros("output", p.output)?;
            let cached_input = match p.cached_input {
                Some(c) => micros("cached_input", c)?,
                None => input,
            };
            prices.insert(model, Price { input, output, cached_input });
        }
        if let Some(at) = &cost_limit {
            if let Some(model) = routes.model_names().find(|m| !prices.contains_key(*m)) {
                return Err(invalid(format!("prices.{model}"), format!("missing: {at} limits cost, so every model needs a price")));
            }
        }

        // An alias reserves at the component-wise maximum of its deployments' prices; settlement
        // uses the serving deployment's own price (hosts set the ticket's model to it).
        for alias in routes.aliases() {
            let mut priced = alias.deployment_names().filter_map(|d| prices.get(d)).peekable();
            if priced.peek().is_none() {
                continue;
            }
            let max = priced.fold(Price::default(), |m, p| Price {
                input: m.input.max(p.input),
                output: m.output.max(p.output),
                cached_input: m.cached_input.max(p.cached_input),
            });
            prices.insert(alias.name.clone(), max);
        }

        let notify = raw.notify.map(validate_notify).transpose()?;
        if notify.is_none() {
            // A notify threshold with nowhere to post its events would silently drop them.
            let tier_limits = tiers.iter().flat_map(|(name, ls)| ls.iter().enumerate().map(move |(i, l)| (format!("tiers.{name}.limits[{i}]"), l)));
            let global_limits = global.iter().enumerate().map(|(i, l)| (format!("global.limits[{i}]"), l));
            for (path, l) in tier_limits.chain(global_limits) {
                if let Some(j) = l.thresholds.iter().position(|t| t.action == crate::limits::Action::Notify) {
                    return Err(invalid(format!("{path}.soft[{j}]"), "a notify threshold needs a top-level \"notify\" target to post its events to (notify.url; in Envoy also notify.cluster)"));
                }
            }
        }
        let admin_key_secret = match raw.admin {
            Some(a) if !crate::routing::is_secret_name(&a.key_secret) => {
                return Err(invalid("admin.key_secret", "must name a secret (letters, digits, '_'), never hold a key"))
            }
            Some(a) => Some(a.key_secret),
            None => None,
        };
        let settings = Settings { zone, member_cap: store.members_per_slot as usize, lease_ttl_ms: store.lease_ttl_seconds * 1000 };
        let limits = LimitSet::new(settings, store.slots, tiers, global, prices, tracked);
        Ok(Policy {
            identity,
            limits,
            rules,
            max_retries: store.max_retries,
            on_failure: store.on_failure,
            routes,
            notify,
            admin_key_secret,
            fallback,
            health,
            remote_store,
            digest: String::new(),
        })
    }

    /// The request headers the policy reads who the user is and what they pay from: Tollgate's
    /// business only, never forwarded (see [`crate::gate::is_private_request_header`]).
    pub(crate) fn private_request_headers(&self) -> impl Iterator<Item = &str> {
        self.identity.private_headers()
    }

    /// A tier's guards, messages and output cap (the defaults for an unknown tier).
    pub fn rules(&self, tier: &str) -> &TierRules {
        static DEFAULT: std::sync::OnceLock<TierRules> = std::sync::OnceLock::new();
        self.rules.get(tier).unwrap_or_else(|| DEFAULT.get_or_init(TierRules::default))
    }

    /// Does any tier limit the request body's size (`guards.max_body_bytes`)?
    pub(crate) fn limits_body_size(&self) -> bool {
        self.rules.values().any(|r| r.guards.max_body_bytes().is_some())
    }

    /// What the policy trusts that the operator must make true (JSON path and why): printed by
    /// `tollgate check`, logged by the hosts when the policy loads.
    pub fn warnings(&self) -> Vec<String> {
        self.identity.warnings()
    }

    /// The limits of `tier` itself, global ones not included (none for an unknown tier).
    pub fn limits_of(&self, tier: &str) -> &[Limit] {
        self.limits.tiers.get(tier).map_or(&[], Vec::as_slice)
    }

    /// Every tier the policy declares, by name, sorted.
    pub fn tier_names(&self) -> impl Iterator<Item = &str> {
        self.limits.tiers.keys().map(String::as_str)
    }
}

fn check_limit_range(path: &str, l: &Limit) -> Result<(), ConfigError> {
    if l.metric == Metric::Concurrent && l.max > MAX_CONCURRENT {
        return Err(invalid(format!("{path}.concurrent"), format!("must be at most {MAX_CONCURRENT}")));
    }
    if l.thresholds.iter().filter(|t| t.action == crate::limits::Action::Notify).count() > 8 {
        return Err(invalid(format!("{path}.soft"), "at most 8 notify thresholds per limit"));
    }
    Ok(())
}

fn validate_notify(n: RawNotify) -> Result<Notify, ConfigError> {
    let rest = n.url.strip_prefix("https://").or_else(|| n.url.strip_prefix("http://"));
    let Some(rest) = rest.filter(|r| !r.is_empty() && !r.contains([' ', '#'])) else {
        return Err(invalid("notify.url", format!("{:?} is not an http(s) URL", n.url)));
    };
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let path = if path.starts_with('?') { format!("/{path}") } else { path.to_owned() };
    if n.timeout_ms == 0 || n.timeout_ms > 60_000 {
        return Err(invalid("notify.timeout_ms", "must be from 1 to 60000"));
    }
    if let Some(c) = &n.cluster {
        if c.is_empty() {
            return Err(invalid("notify.cluster", "must name an Envoy cluster"));
        }
    }
    Ok(Notify { cluster: n.cluster, authority: authority.to_owned(), path, url: n.url, timeout_ms: n.timeout_ms })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{
        "identity": {"header": "X-Tollgate-User"},
        "tier": {"header": "x-tollgate-tier", "default": "free"},
        "tiers": {
            "free": {"limits": [{"window": "hour", "requests": 10}, {"window": "day", "requests": 50}]},
            "pro": {"limits": [{"window": "minute", "requests": 100}]},
            "enterprise": {"limits": []}
        }
    }"#;

    fn err(json: &str) -> String {
        Policy::from_json(json.as_bytes()).unwrap_err().to_string()
    }

    fn with_free_limits(limits: &str) -> String {
        format!(r#"{{"tier": {{"default": "free"}}, "tiers": {{"free": {{"limits": {limits}}}}}}}"#)
    }

    #[test]
    fn a_notify_threshold_without_a_notify_target_is_refused_with_its_path() {
        let limits = r#"[{"window": "day", "requests": 10, "soft": [{"at": 50, "action": "warn"}, {"at": 80, "action": "notify"}]}]"#;
        assert_eq!(
            err(&with_free_limits(limits)),
            "tiers.free.limits[0].soft[1]: a notify threshold needs a top-level \"notify\" target to post its events to (notify.url; in Envoy also notify.cluster)"
        );
        let with_target = with_free_limits(limits).replacen('{', r#"{"notify": {"url": "https://hooks.example/t"}, "#, 1);
        assert!(Policy::from_json(with_target.as_bytes()).is_ok());
    }

    #[test]
    fn parses_the_documented_example() {
        let p = Policy::from_json(GOOD.as_bytes()).unwrap();
        assert_eq!(
            p.private_request_headers().collect::<Vec<_>>(),
            vec!["x-tollgate-user", "x-tollgate-tier"]
        );
        assert_eq!(p.limits_of("free").len(), 2);
        assert_eq!(
            p.limits.tracked[&Scope::Identity],
            vec![(Metric::Requests, Window::Minute), (Metric::Requests, Window::Hour), (Metric::Requests, Window::Day)]
        );
        assert_eq!(p.max_retries, 16);
        assert_eq!(p.on_failure, FailureMode::Allow);
        assert_eq!(p.limits.slots, 65_536);
        assert_eq!(p.limits.settings.member_cap, 64);
        assert_eq!(p.limits.settings.lease_ttl_ms, 900_000);
    }

    #[test]
    fn unknown_window_names_its_path() {
        assert_eq!(
            err(&with_free_limits(r#"[{"window": "hour", "requests": 1}, {"window": "fortnight", "requests": 1}]"#)),
            r#"tiers.free.limits[1].window: unknown window "fortnight" (expected one of: minute, hour, day, week, month)"#
        );
    }

    #[test]
    fn unknown_field_names_its_path() {
        assert_eq!(
            err(&with_free_limits(r#"[{"window": "hour", "requests": 1, "burst": 2}]"#)),
            "tiers.free.limits[0].burst: unknown field `burst`, expected one of `name`, `per`, `window`, `rate`, `requests`, `input_tokens`, `output_tokens`, `total_tokens`, `cost_usd`, `concurrent`, `soft`"
        );
        assert_eq!(
            err(r#"{"tier": {"default": "free"}, "tiers": {"free": {"limits": []}}, "upstream": 1}"#),
            "upstream: unknown field `upstream`, expected one of `time_zone`, `identity`, `tier`, `store`, `tiers`, `global`, `prices`, `notify`, `admin`, `providers`, `models`, `aliases`, `fallback`, `health`"
        );
    }

    #[test]
    fn zero_requests_is_refused() {
        assert_eq!(
            err(&with_free_limits(r#"[{"window": "day", "requests": 0}]"#)),
            "tiers.free.limits[0].requests: must be at least 1 (to block a tier entirely, remove it from the tiers its users can reach)"
        );
    }

    #[test]
    fn negative_requests_is_a_type_error_with_a_path() {
        assert_eq!(
            err(&with_free_limits(r#"[{"window": "day", "requests": -5}]"#)),
            "tiers.free.limits[0].requests: invalid value: integer `-5`, expected u64"
        );
    }

    #[test]
    fn duplicate_window_is_refused() {
        assert_eq!(
            err(&with_free_limits(r#"[{"window": "day", "requests": 5}, {"window": "day", "requests": 9}]"#)),
            r#"tiers.free.limits[1].window: duplicate limit: requests per identity over "day" (already limited at limits[0])"#
        );
    }

    #[test]
    fn default_tier_must_exist() {
        assert_eq!(
            err(r#"{"tier": {"default": "gold"}, "tiers": {"free": {"limits": []}, "pro": {"limits": []}}}"#),
            r#"tier.default: unknown tier "gold" (tiers are: free, pro)"#
        );
    }

    #[test]
    fn missing_tiers_and_empty_tiers() {
        assert_eq!(err(r#"{"tier": {"default": "free"}}"#), "config: missing field `tiers`");
        assert_eq!(err(r#"{"tier": {"default": "free"}, "tiers": {}}"#), "tiers: at least one tier is required");
    }

    #[test]
    fn bad_header_names_and_tier_names() {
        assert_eq!(
            err(r#"{"identity": {"header": "x user"}, "tier": {"default": "a"}, "tiers": {"a": {"limits": []}}}"#),
            r#"identity.header: invalid header name "x user""#
        );
        assert_eq!(
            err(r#"{"tier": {"default": "a b"}, "tiers": {"a b": {"limits": []}}}"#),
            "tiers.a b: tier names are 1-64 characters of letters, digits, '_', '-' and '.'"
        );
    }

    #[test]
    fn store_settings_are_checked() {
        assert_eq!(
            err(r#"{"store": {"on_failure": "retry"}, "tier": {"default": "a"}, "tiers": {"a": {"limits": []}}}"#),
            "store.on_failure: unknown variant `retry`, expected `allow` or `deny`"
        );
        assert_eq!(
            err(r#"{"store": {"max_retries": 5000}, "tier": {"default": "a"}, "tiers": {"a": {"limits": []}}}"#),
            "store.max_retries: must be at most 1000"
        );
    }

    #[test]
    fn empty_and_malformed_documents() {
        assert_eq!(err("  \n"), "configuration is empty: the plugin needs a JSON policy");
        assert_eq!(err("{\"tiers\": "), "configuration is not valid JSON: EOF while parsing a value at line 1 column 10");
        assert_eq!(err("[]"), "config: must be a JSON object");
    }

    fn with_routing(providers: &str, models: &str) -> String {
        format!(r#"{{"tier": {{"default": "a"}}, "tiers": {{"a": {{"limits": []}}}}, "providers": {providers}, "models": {models}}}"#)
    }

    #[test]
    fn models_route_to_their_provider_with_defaults() {
        let p = Policy::from_json(
            with_routing(
                r#"{"claude": {"kind": "anthropic", "base_url": "https://api.anthropic.com/", "api_key": {"secret": "ANTHROPIC_API_KEY"}, "default_max_tokens": 4096},
                    "or": {"kind": "openai", "cluster": "openrouter"}}"#,
                r#"{"sonnet": {"provider": "claude", "model": "claude-sonnet-4-5"},
                    "haiku": {"provider": "claude", "model": "claude-haiku-4-5", "default_max_tokens": 1024},
                    "deepseek": {"provider": "or", "model": "deepseek/deepseek-chat"}}"#,
            )
            .as_bytes(),
        )
        .unwrap();
        assert!(p.routes.is_enabled());
        let r = p.routes.route("sonnet").unwrap();
        assert_eq!(r.target.kind, crate::translate::ProviderKind::Anthropic);
        assert_eq!(r.target.upstream_model, "claude-sonnet-4-5");
        assert_eq!(r.target.default_max_tokens, Some(4096));
        assert_eq!(r.provider.base_url.as_deref(), Some("https://api.anthropic.com"));
        assert_eq!(r.provider.api_key_secret.as_deref(), Some("ANTHROPIC_API_KEY"));
        assert_eq!(r.provider.cluster, "claude");
        assert_eq!(p.routes.route("haiku").unwrap().target.default_max_tokens, Some(1024));
        assert_eq!(p.routes.route("deepseek").unwrap().provider.cluster, "openrouter");
        assert!(p.routes.route("gpt-5").is_none());
        assert!(!Policy::from_json(GOOD.as_bytes()).unwrap().routes.is_enabled());
    }

    #[test]
    fn routing_mistakes_name_their_path() {
        assert_eq!(
            err(&with_routing(r#"{"x": {"kind": "cohere"}}"#, "{}")),
            "providers.x.kind: unknown variant `cohere`, expected one of `openai`, `anthropic`, `gemini`"
        );
        assert_eq!(
            err(&with_routing(r#"{"x": {"kind": "openai"}}"#, r#"{"m": {"provider": "y", "model": "m1"}}"#)),
            r#"models.m.provider: unknown provider "y" (providers are: x)"#
        );
        assert_eq!(
            err(&with_routing(r#"{"x": {"kind": "openai", "api_key": {"secret": "sk-live-123"}}}"#, "{}")),
            "providers.x.api_key.secret: must name a secret (letters, digits, '_'), never hold a key"
        );
        assert_eq!(
            err(&with_routing(r#"{"x": {"kind": "openai", "base_url": "ftp://h"}}"#, "{}")),
            r#"providers.x.base_url: "ftp://h" is not an http(s) URL without query or fragment"#
        );
        assert_eq!(
            err(&with_routing(r#"{"x": {"kind": "openai"}}"#, r#"{"m": {"provider": "x", "model": " "}}"#)),
            "models.m.model: must name the provider's model"
        );
        assert_eq!(
            err(&with_routing(r#"{"x": {"kind": "anthropic", "default_max_tokens": 0}}"#, "{}")),
            "providers.x.default_max_tokens: must be at least 1"
        );
    }

    #[test]
    fn store_redis_is_checked_and_names_its_key_never_holds_it() {
        let base = |redis: &str| format!(r#"{{"tier": {{"default": "a"}}, "tiers": {{"a": {{"limits": []}}}}, "store": {{"redis": {redis}}}}}"#);
        assert_eq!(err(&base(r#"{"cluster": "a b"}"#)), "store.redis.cluster: must name the Envoy cluster of the tollgate store service");
        assert_eq!(err(&base(r#"{"cluster": "s", "timeout_ms": 0}"#)), "store.redis.timeout_ms: must be from 1 to 10000");
        assert_eq!(err(&base(r#"{"cluster": "s", "key_secret": "hunter2!"}"#)), "store.redis.key_secret: must name a secret (letters, digits, '_'), never hold a key");
        assert!(err(&base(r#"{"cluster": "s", "password": "x"}"#)).contains("unknown field"));
        let p = Policy::from_json(base(r#"{"cluster": "tollgate_store", "key_secret": "TOLLGATE_STORE_KEY"}"#).as_bytes()).unwrap();
        let r = p.remote_store.unwrap();
        assert_eq!((r.cluster.as_str(), r.authority.as_str(), r.timeout_ms, r.key_secret.as_deref()), ("tollgate_store", "tollgate_store", 50, Some("TOLLGATE_STORE_KEY")));
    }

    #[test]
    fn store_time_zone_prices_and_notify_are_checked() {
        let base = |extra: &str| format!(r#"{{"tier": {{"default": "a"}}, "tiers": {{"a": {{"limits": []}}}}{extra}}}"#);
        assert_eq!(err(&base(r#", "time_zone": "Mars/Olympus""#)), r#"time_zone: unknown time zone "Mars/Olympus""#);
        assert_eq!(err(&base(r#", "store": {"slots": 99999999}"#)), "store.slots: must be at most 16777216 (0: one key per identity)");
        assert_eq!(err(&base(r#", "store": {"members_per_slot": 0}"#)), "store.members_per_slot: must be from 1 to 1024");
        assert_eq!(err(&base(r#", "store": {"lease_ttl_seconds": 0}"#)), "store.lease_ttl_seconds: must be from 1 to 86400");
        assert_eq!(err(&base(r#", "notify": {"url": "ftp://x"}"#)), r#"notify.url: "ftp://x" is not an http(s) URL"#);
        assert_eq!(err(&base(r#", "admin": {"key_secret": "sk-live"}"#)), "admin.key_secret: must name a secret (letters, digits, '_'), never hold a key");
        let p = Policy::from_json(base(r#", "notify": {"cluster": "hooks", "url": "https://hooks.example.com/t/1?x=y"}, "time_zone": "Asia/Riyadh""#).as_bytes()).unwrap();
        let n = p.notify.unwrap();
        assert_eq!((n.authority.as_str(), n.path.as_str(), n.timeout_ms), ("hooks.example.com", "/t/1?x=y", 5000));
        assert_eq!(p.limits.settings.zone.name(), "Asia/Riyadh");
    }

    #[test]
    fn cost_limits_need_every_model_priced() {
        let with = |prices: &str| {
            with_routing(r#"{"x": {"kind": "openai"}}"#, r#"{"m1": {"provider": "x", "model": "a"}, "m2": {"provider": "x", "model": "b"}}"#)
                .replace(r#""limits": []"#, r#""limits": [{"window": "day", "cost_usd": 1}]"#)
                .replace(r#", "providers""#, &format!(r#", "prices": {prices}, "providers""#))
        };
        assert_eq!(err(&with(r#"{"m1": {"input": 0.15, "output": 0.6}}"#)), "prices.m2: missing: tiers.a.limits[0] limits cost, so every model needs a price");
        assert_eq!(err(&with(r#"{"m1": {"input": -1, "output": 0.6}}"#)), "prices.m1.input: must be US dollars per million tokens, from 0 to 1000000");
        assert_eq!(err(&with(r#"{"zz": {"input": 1, "output": 1}}"#)), r#"prices.zz: unknown model "zz" (prices are per model in models)"#);
        let p = Policy::from_json(with(r#"{"m1": {"input": 0.15, "output": 0.6, "cached_input": 0.075}, "m2": {"input": 3, "output": 15}}"#).as_bytes()).unwrap();
        assert_eq!(p.limits.prices["m1"].cached_input, 75_000);
        assert_eq!(p.limits.prices["m2"].cached_input, 3_000_000, "cached input defaults to the input price");
    }

    #[test]
    fn guard_models_and_downgrades_must_be_routed() {
        let routed = |tier: &str| {
            format!(
                r#"{{"tier": {{"default": "a"}}, "tiers": {{"a": {tier}}}, "providers": {{"x": {{"kind": "openai"}}}}, "models": {{"big": {{"provider": "x", "model": "b"}}, "small": {{"provider": "x", "model": "s"}}}}}}"#
            )
        };
        assert_eq!(
            err(&routed(r#"{"guards": {"models": ["big", "huge"]}}"#)),
            r#"tiers.a.guards.models[1]: unknown model "huge" (models are configured in models, aliases in aliases)"#
        );
        assert_eq!(
            err(&routed(r#"{"limits": [{"window": "day", "requests": 5, "soft": [{"at": 100, "action": "downgrade", "model": "tiny"}]}]}"#)),
            r#"tiers.a.limits[0].soft[0].model: unknown model "tiny" (downgrade targets must be in models)"#
        );
        assert!(Policy::from_json(routed(r#"{"limits": [{"window": "day", "requests": 5, "soft": [{"at": 100, "action": "downgrade", "model": "small"}]}]}"#).as_bytes()).is_ok());
    }

    fn with_aliases(extra: &str) -> String {
        format!(
            r#"{{"tier": {{"default": "a"}}, "tiers": {{"a": {{"limits": [], "guards": {{"models": ["free"]}}}}}},
                "providers": {{"x": {{"kind": "openai"}}}},
                "models": {{"flash": {{"provider": "x", "model": "f"}}, "pro": {{"provider": "x", "model": "p"}}}}{extra}}}"#
        )
    }

    #[test]
    fn aliases_fallback_and_health_are_parsed() {
        let p = Policy::from_json(
            with_aliases(
                r#", "aliases": {"free": {"deployments": ["flash", {"model": "pro", "weight": 3}], "strategy": "weighted"}},
                    "fallback": {"on": ["timeout", "5xx"], "max_attempts": 2, "attempt_timeout_ms": 5000},
                    "health": {"failures": 2, "cooldown_seconds": 10}"#,
            )
            .as_bytes(),
        )
        .unwrap();
        let a = p.routes.alias("free").unwrap();
        assert_eq!(a.deployment_names().collect::<Vec<_>>(), ["flash", "pro"]);
        assert_eq!((a.strategy, a.max_attempts, a.deployments[1].weight), (crate::fallback::Strategy::Weighted, 2, 3));
        assert_eq!(p.routes.aliases().count(), 1);
        assert_eq!(p.routes.client_names().collect::<Vec<_>>(), ["flash", "pro", "free"]);
        assert_eq!(p.routes.model_names().collect::<Vec<_>>(), ["flash", "pro"]);
        assert!(p.routes.route("free").is_none() && p.routes.alias("flash").is_none());
        assert_eq!((p.fallback.max_attempts, p.fallback.attempt_timeout_ms, p.fallback.total_timeout_ms), (2, 5000, 120_000));
        assert!(p.fallback.falls_back(crate::fallback::Failure::Timeout));
        assert!(!p.fallback.falls_back(crate::fallback::Failure::Status(429)));
        assert_eq!((p.health.failures, p.health.cooldown_ms, p.health.window_ms), (2, 10_000, 60_000));
        // without the keys: the defaults, and no aliases
        let d = Policy::from_json(GOOD.as_bytes()).unwrap();
        assert_eq!((d.fallback, d.health), (crate::fallback::FallbackSettings::default(), crate::fallback::HealthSettings::default()));
        assert_eq!(d.routes.aliases().count(), 0);
    }

    #[test]
    fn alias_mistakes_name_their_path() {
        assert_eq!(
            err(&with_aliases(r#", "aliases": {"free": {"deployments": ["flash", "gpt-5"]}}"#)),
            r#"aliases.free.deployments[1]: unknown model "gpt-5" (deployments are names in models)"#
        );
        assert_eq!(
            err(&with_aliases(r#", "aliases": {"free": {"deployments": ["flash"]}, "pro": {"deployments": ["flash"]}}"#)),
            r#"aliases.pro: "pro" is already a model in models (an alias needs a name of its own)"#
        );
        assert_eq!(
            err(&with_aliases(r#", "aliases": {"free": {"deployments": ["flash"], "strategy": "random"}}"#)),
            "aliases.free.strategy: unknown variant `random`, expected one of `priority`, `weighted`, `least_recently_failed`"
        );
        assert_eq!(
            err(&with_aliases(r#", "aliases": {"free": {"deployments": ["flash"], "order": 1}}"#)),
            "aliases.free.order: unknown field `order`, expected one of `deployments`, `strategy`, `max_attempts`"
        );
        assert_eq!(
            err(&with_aliases(r#", "aliases": {"free": {"deployments": ["flash"]}}, "fallback": {"on": ["connect", "timeout", "6xx"]}"#)),
            r#"fallback.on[2]: unknown failure "6xx" (use connect, timeout, reset, 429, 5xx, 4xx or a status 400..=599)"#
        );
        assert_eq!(
            err(&with_aliases(r#", "aliases": {"free": {"deployments": ["flash"]}}, "fallback": {"retries": 2}"#)),
            "fallback.retries: unknown field `retries`, expected one of `on`, `max_attempts`, `attempt_timeout_ms`, `total_timeout_ms`"
        );
        assert_eq!(
            err(&with_aliases(r#", "aliases": {"free": {"deployments": ["flash"]}}, "health": {"failures": 0}"#)),
            "health.failures: must be from 1 to 1000"
        );
        // a tier allowlist naming an alias that does not exist
        assert_eq!(err(&with_aliases("")), r#"tiers.a.guards.models[0]: unknown model "free" (models are configured in models, aliases in aliases)"#);
        // an alias cannot be priced on its own
        assert_eq!(
            err(&with_aliases(r#", "aliases": {"free": {"deployments": ["flash"]}}, "prices": {"free": {"input": 1, "output": 1}}"#)),
            r#"prices.free: "free" is an alias: it is priced at the most expensive of its deployments"#
        );
    }

    #[test]
    fn alias_prices_are_the_maximum_of_their_deployments() {
        let p = Policy::from_json(
            with_aliases(
                r#", "aliases": {"free": {"deployments": ["flash", "pro"]}},
                    "prices": {"flash": {"input": 0.3, "output": 2.5, "cached_input": 0.03}, "pro": {"input": 1.25, "output": 10}}"#,
            )
            .replace(r#""limits": []"#, r#""limits": [{"window": "day", "cost_usd": 5, "soft": [{"at": 80, "action": "downgrade", "model": "free"}]}]"#)
            .as_bytes(),
        )
        .unwrap();
        let price = p.limits.prices["free"];
        assert_eq!((price.input, price.output, price.cached_input), (1_250_000, 10_000_000, 1_250_000));
        // unpriced deployments: no alias price either
        let unpriced = Policy::from_json(with_aliases(r#", "aliases": {"free": {"deployments": ["flash", "pro"]}}"#).as_bytes()).unwrap();
        assert!(!unpriced.limits.prices.contains_key("free"));
    }

    #[test]
    fn global_limits_are_validated_in_place() {
        let g = |limits: &str| format!(r#"{{"tier": {{"default": "a"}}, "tiers": {{"a": {{"limits": []}}}}, "global": {{"limits": {limits}}}}}"#);
        assert_eq!(err(&g(r#"[{"concurrent": 100000}]"#)), "global.limits[0].concurrent: must be at most 65535");
        assert_eq!(err(&g(r#"[{"concurrent": 5}, {"concurrent": 6}]"#)), "global.limits[1]: duplicate limit: concurrent per global (already limited at limits[0])");
        let p = Policy::from_json(g(r#"[{"concurrent": 500}, {"window": "minute", "requests": 6000}]"#).as_bytes()).unwrap();
        assert_eq!(p.limits.global.len(), 2);
        assert!(p.limits.global.iter().all(|l| l.scope == Scope::Global));
    }
}
