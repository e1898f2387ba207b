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

use std::collections::BTreeMap;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::quota::Quota;
use crate::routing::{RawModel, RawProvider, Routes};
use crate::window::Window;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    #[error("configuration is empty: the plugin needs a JSON policy")]
    Empty,
    #[error("configuration is not valid JSON: {0}")]
    Syntax(String),
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

pub(crate) fn invalid(path: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { path: path.into(), message: message.into() }
}

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
    #[serde(default)]
    identity: RawIdentity,
    tier: RawTierSelect,
    #[serde(default)]
    store: RawStore,
    tiers: BTreeMap<String, RawTier>,
    #[serde(default)]
    providers: BTreeMap<String, RawProvider>,
    #[serde(default)]
    models: BTreeMap<String, RawModel>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    header: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTierSelect {
    header: Option<String>,
    default: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    #[serde(default = "default_retries")]
    max_retries: u32,
    #[serde(default)]
    on_failure: FailureMode,
}

impl Default for RawStore {
    fn default() -> Self {
        RawStore { max_retries: default_retries(), on_failure: FailureMode::Allow }
    }
}

fn default_retries() -> u32 {
    16
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTier {
    limits: Vec<Quota>,
}

/// A validated policy, shared read-only by every request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    identity_header: Option<String>,
    tier_header: Option<String>,
    default_tier: String,
    tiers: BTreeMap<String, Vec<Quota>>,
    tracked: Vec<Window>,
    pub max_retries: u32,
    pub on_failure: FailureMode,
    /// Providers and the model map (empty: no translation).
    pub routes: Routes,
}

pub use crate::identity::{IdentitySource, Subject};

pub const MAX_RETRIES_LIMIT: u32 = 1000;

impl Policy {
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
        let raw: RawConfig = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let message = e.into_inner().to_string();
            if path == "." {
                invalid("config", message)
            } else {
                invalid(path, message)
            }
        })?;
        Self::validate(raw)
    }

    fn validate(raw: RawConfig) -> Result<Policy, ConfigError> {
        let identity_header = raw.identity.header.map(|h| header_name("identity.header", h)).transpose()?;
        let tier_header = raw.tier.header.map(|h| header_name("tier.header", h)).transpose()?;
        if raw.tiers.is_empty() {
            return Err(invalid("tiers", "at least one tier is required"));
        }
        let mut tracked = vec![];
        for (name, tier) in &raw.tiers {
            if name.is_empty()
                || name.len() > 64
                || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
            {
                return Err(invalid(
                    format!("tiers.{name}"),
                    "tier names are 1-64 characters of letters, digits, '_', '-' and '.'",
                ));
            }
            for (i, quota) in tier.limits.iter().enumerate() {
                let path = format!("tiers.{name}.limits[{i}]");
                if quota.requests == 0 {
                    return Err(invalid(
                        format!("{path}.requests"),
                        "must be at least 1 (to block a tier entirely, remove it from the tiers its users can reach)",
                    ));
                }
                if let Some(j) = tier.limits[..i].iter().position(|q| q.window == quota.window) {
                    return Err(invalid(
                        format!("{path}.window"),
                        format!("duplicate window \"{}\" (already limited at limits[{j}])", quota.window.name()),
                    ));
                }
                tracked.push(quota.window);
            }
        }
        if !raw.tiers.contains_key(&raw.tier.default) {
            let known: Vec<&str> = raw.tiers.keys().map(String::as_str).collect();
            return Err(invalid(
                "tier.default",
                format!("unknown tier \"{}\" (tiers are: {})", raw.tier.default, known.join(", ")),
            ));
        }
        if raw.store.max_retries > MAX_RETRIES_LIMIT {
            return Err(invalid("store.max_retries", format!("must be at most {MAX_RETRIES_LIMIT}")));
        }
        tracked.sort();
        tracked.dedup();
        let routes = Routes::validate(raw.providers, raw.models)?;
        Ok(Policy {
            routes,
            identity_header,
            tier_header,
            default_tier: raw.tier.default,
            tiers: raw.tiers.into_iter().map(|(k, v)| (k, v.limits)).collect(),
            tracked,
            max_retries: raw.store.max_retries,
            on_failure: raw.store.on_failure,
        })
    }

    /// The header that carries the caller's identity, if one is configured.
    pub fn identity_header(&self) -> Option<&str> {
        self.identity_header.as_deref()
    }

    /// The header that carries the caller's tier, if one is configured.
    pub fn tier_header(&self) -> Option<&str> {
        self.tier_header.as_deref()
    }

    /// Request headers that are Tollgate's business only (who the user is, what they pay):
    /// adapters do not forward them to the provider.
    pub fn private_request_headers(&self) -> impl Iterator<Item = &str> {
        [self.identity_header(), self.tier_header()].into_iter().flatten()
    }

    pub fn quotas(&self, tier: &str) -> &[Quota] {
        self.tiers.get(tier).map_or(&[], Vec::as_slice)
    }

    /// Every window limited by some tier: all of them are counted for every subject.
    pub fn tracked_windows(&self) -> &[Window] {
        &self.tracked
    }

    /// Resolves the subject from the identity header's value, the tier header's value and the
    /// client address (`ip`, `ip:port` or `[v6]:port`). Empty values count as absent; an
    /// unknown tier name falls back to the default tier.
    pub fn subject(&self, identity: Option<&str>, tier: Option<&str>, client_address: Option<&str>) -> Subject {
        let address = present(client_address).map(strip_port);
        let (source, material) = match (present(identity), address) {
            (Some(id), _) => (IdentitySource::Header, format!("h:{id}")),
            (None, Some(ip)) => (IdentitySource::ClientIp, format!("ip:{ip}")),
            (None, None) => (IdentitySource::Unidentified, "unidentified".to_owned()),
        };
        let tier = present(tier)
            .filter(|t| self.tiers.contains_key(*t))
            .unwrap_or(&self.default_tier)
            .to_owned();
        let ip_key = address.map(|ip| subject_key(&format!("ip:{ip}")));
        Subject { key: subject_key(&material), ip_key, tier, source }
    }
}

fn present(v: Option<&str>) -> Option<&str> {
    v.map(str::trim).filter(|v| !v.is_empty())
}

fn header_name(path: &str, name: String) -> Result<String, ConfigError> {
    // RFC 9110 §5.1: field-name = token
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || !name.bytes().all(token) {
        return Err(invalid(path, format!("invalid header name {name:?}")));
    }
    Ok(name.to_ascii_lowercase())
}

fn strip_port(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match addr.split_once(':') {
        Some((ip, port)) if !port.contains(':') => ip,
        _ => addr,
    }
}

fn subject_key(material: &str) -> String {
    let digest = Sha256::digest(material.as_bytes());
    let mut key = String::with_capacity(6 + 32);
    key.push_str("tg1:q:");
    for b in &digest[..16] {
        key.push(char::from_digit((b >> 4) as u32, 16).unwrap_or('0'));
        key.push(char::from_digit((b & 15) as u32, 16).unwrap_or('0'));
    }
    key
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
    fn parses_the_documented_example() {
        let p = Policy::from_json(GOOD.as_bytes()).unwrap();
        assert_eq!(p.identity_header(), Some("x-tollgate-user"));
        assert_eq!(p.quotas("free").len(), 2);
        assert_eq!(p.tracked_windows(), &[Window::Minute, Window::Hour, Window::Day]);
        assert_eq!(p.max_retries, 16);
        assert_eq!(p.on_failure, FailureMode::Allow);
    }

    #[test]
    fn unknown_window_names_its_path() {
        assert_eq!(
            err(&with_free_limits(r#"[{"window": "hour", "requests": 1}, {"window": "fortnight", "requests": 1}]"#)),
            r#"tiers.free.limits[1].window: unknown window "fortnight" (expected one of: minute, hour, day, month)"#
        );
    }

    #[test]
    fn unknown_field_names_its_path() {
        assert_eq!(
            err(&with_free_limits(r#"[{"window": "hour", "requests": 1, "burst": 2}]"#)),
            "tiers.free.limits[0].burst: unknown field `burst`, expected `window` or `requests`"
        );
        assert_eq!(
            err(r#"{"tier": {"default": "free"}, "tiers": {"free": {"limits": []}}, "upstream": 1}"#),
            "upstream: unknown field `upstream`, expected one of `identity`, `tier`, `store`, `tiers`, `providers`, `models`"
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
            r#"tiers.free.limits[1].window: duplicate window "day" (already limited at limits[0])"#
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
    fn subject_prefers_the_header_then_the_address() {
        let p = Policy::from_json(GOOD.as_bytes()).unwrap();
        let by_header = p.subject(Some("alice"), None, Some("10.0.0.1:5555"));
        assert_eq!(by_header.source, IdentitySource::Header);
        assert_eq!(by_header.key, p.subject(Some(" alice "), None, Some("10.9.9.9:1")).key);
        let by_ip = p.subject(Some(""), None, Some("10.0.0.1:5555"));
        assert_eq!(by_ip.source, IdentitySource::ClientIp);
        assert_eq!(by_ip.key, p.subject(None, None, Some("10.0.0.1:6666")).key, "the port is not part of the identity");
        assert_ne!(by_ip.key, by_header.key);
        // a user literally named like an address does not share the address's bucket
        assert_ne!(p.subject(Some("10.0.0.1"), None, None).key, by_ip.key);
        assert_eq!(p.subject(None, None, Some("[::1]:443")).key, p.subject(None, None, Some("::1")).key);
        assert_eq!(p.subject(None, None, None).source, IdentitySource::Unidentified);
        assert!(!by_header.key.contains("alice"));
        assert_eq!(by_header.key.len(), 6 + 32);
    }

    #[test]
    fn tier_header_picks_known_tiers_only() {
        let p = Policy::from_json(GOOD.as_bytes()).unwrap();
        assert_eq!(p.subject(Some("a"), Some("pro"), None).tier, "pro");
        assert_eq!(p.subject(Some("a"), Some("platinum"), None).tier, "free");
        assert_eq!(p.subject(Some("a"), None, None).tier, "free");
    }
}
