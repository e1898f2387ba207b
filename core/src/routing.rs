//! Providers and the model map: which backend serves a client-visible model name.
//!
//! ```json
//! "providers": {
//!   "anthropic": { "kind": "anthropic", "base_url": "https://api.anthropic.com",
//!                  "api_key": { "secret": "ANTHROPIC_API_KEY" }, "default_max_tokens": 4096 },
//!   "gemini":    { "kind": "gemini", "cluster": "gemini" }
//! },
//! "models": {
//!   "claude-sonnet": { "provider": "anthropic", "model": "claude-sonnet-4-5" },
//!   "gemini-flash":  { "provider": "gemini", "model": "gemini-2.5-flash", "default_max_tokens": 2048 }
//! }
//! ```
//! - `kind`: `openai` (OpenAI and OpenAI-compatible APIs), `anthropic` or `gemini`.
//! - `cluster` (Envoy): the Envoy cluster that reaches the provider; defaults to the provider's
//!   name. Envoy's configuration adds the provider key (see examples/envoy), never this policy.
//! - `base_url` (worker): where the worker sends requests, e.g. `https://api.anthropic.com` or
//!   `https://openrouter.ai/api` (the translator's path, e.g. `/v1/chat/completions`, is
//!   appended).
//! - `api_key.secret` (worker): the name of the Worker secret holding the key. The policy only
//!   ever names a secret; a key in the policy itself is refused.
//! - `default_max_tokens`: sent when a client gives no `max_tokens` and the provider requires
//!   one (Anthropic); a model's value wins over its provider's.
//! - `max_output_tokens` (models): the most the model writes in one answer; no request reserves
//!   more per choice (without it: [`crate::guard::MAX_OUTPUT_RESERVATION`]).
//!
//! Without `models`, Tollgate does not translate: requests are limited and forwarded as they
//! are (the walking-skeleton behaviour).

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::error::ConfigError;
use crate::fallback::{self, Alias, FallbackSettings, RawAlias};
use crate::provider::{ProviderKind, Target};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawProvider {
    kind: RawKind,
    cluster: Option<String>,
    base_url: Option<String>,
    api_key: Option<RawKey>,
    default_max_tokens: Option<u64>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum RawKind {
    Openai,
    Anthropic,
    Gemini,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    secret: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawModel {
    provider: String,
    model: String,
    default_max_tokens: Option<u64>,
    max_output_tokens: Option<u64>,
}

/// A provider as validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provider {
    /// Its name in the policy's `providers`.
    pub name: String,
    /// The API it speaks.
    pub kind: ProviderKind,
    /// The Envoy cluster reaching it.
    pub cluster: String,
    /// Base URL for hosts that fetch by URL (the worker).
    pub base_url: Option<String>,
    /// Name of the host secret holding its key (the worker).
    pub api_key_secret: Option<String>,
}

/// Where one client-visible model goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route<'a> {
    /// The provider serving the model.
    pub provider: &'a Provider,
    /// What the request is translated for: the provider's kind and model.
    pub target: Target,
}

/// The policy's providers, model map and aliases: where every client-visible model goes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routes {
    providers: BTreeMap<String, (Provider, Option<u64>)>,
    /// name → (provider, upstream model, default_max_tokens, max_output_tokens).
    models: BTreeMap<String, (String, String, Option<u64>, Option<u64>)>,
    /// Client-visible names served by several deployments (names in `models`).
    aliases: BTreeMap<String, Alias>,
}

fn invalid(path: String, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { path, message: message.into() }
}

/// A host secret's name: letters, digits and '_' — never something that looks like a key.
pub(crate) fn is_secret_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 128 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

impl Routes {
    pub(crate) fn validate(
        providers: BTreeMap<String, RawProvider>,
        models: BTreeMap<String, RawModel>,
    ) -> Result<Routes, ConfigError> {
        let mut routes = Routes::default();
        for (name, p) in providers {
            let path = format!("providers.{name}");
            if let Some(url) = &p.base_url {
                let rest = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://"));
                if rest.is_none_or(|r| r.is_empty() || r.contains(['?', '#', ' '])) {
                    return Err(invalid(
                        format!("{path}.base_url"),
                        format!("{url:?} is not an http(s) URL without query or fragment"),
                    ));
                }
            }
            if let Some(key) = &p.api_key {
                if !is_secret_name(&key.secret) {
                    return Err(invalid(
                        format!("{path}.api_key.secret"),
                        "must name a secret (letters, digits, '_'), never hold a key",
                    ));
                }
            }
            if p.default_max_tokens == Some(0) {
                return Err(invalid(format!("{path}.default_max_tokens"), "must be at least 1"));
            }
            let kind = match p.kind {
                RawKind::Openai => ProviderKind::OpenAi,
                RawKind::Anthropic => ProviderKind::Anthropic,
                RawKind::Gemini => ProviderKind::Gemini,
            };
            let provider = Provider {
                cluster: p.cluster.unwrap_or_else(|| name.clone()),
                name: name.clone(),
                kind,
                base_url: p.base_url.map(|u| u.trim_end_matches('/').to_owned()),
                api_key_secret: p.api_key.map(|k| k.secret),
            };
            routes.providers.insert(name, (provider, p.default_max_tokens));
        }
        for (name, m) in models {
            let path = format!("models.{name}");
            if !routes.providers.contains_key(&m.provider) {
                let known: Vec<&str> = routes.providers.keys().map(String::as_str).collect();
                return Err(invalid(
                    format!("{path}.provider"),
                    format!("unknown provider \"{}\" (providers are: {})", m.provider, known.join(", ")),
                ));
            }
            if m.model.trim().is_empty() {
                return Err(invalid(format!("{path}.model"), "must name the provider's model"));
            }
            if m.default_max_tokens == Some(0) {
                return Err(invalid(format!("{path}.default_max_tokens"), "must be at least 1"));
            }
            if m.max_output_tokens == Some(0) {
                return Err(invalid(format!("{path}.max_output_tokens"), "must be at least 1"));
            }
            if let (Some(d), Some(max)) = (m.default_max_tokens, m.max_output_tokens) {
                if d > max {
                    return Err(invalid(format!("{path}.default_max_tokens"), format!("{d} is above the model's max_output_tokens ({max})")));
                }
            }
            routes.models.insert(name, (m.provider, m.model, m.default_max_tokens, m.max_output_tokens));
        }
        Ok(routes)
    }

    /// Validates `aliases` against the models already validated.
    pub(crate) fn validate_aliases(&mut self, aliases: BTreeMap<String, RawAlias>, fallback: &FallbackSettings) -> Result<(), ConfigError> {
        let models = &self.models;
        self.aliases = fallback::validate_aliases(aliases, &|m| models.contains_key(m), fallback)?;
        Ok(())
    }

    /// Whether the policy maps models (and so translates requests).
    pub fn is_enabled(&self) -> bool {
        !self.models.is_empty()
    }

    /// Where `client_model` goes, or `None` when the policy does not know it.
    pub fn route(&self, client_model: &str) -> Option<Route<'_>> {
        let (provider_name, upstream, model_max, _) = self.models.get(client_model)?;
        let (provider, provider_max) = self.providers.get(provider_name)?;
        Some(Route {
            provider,
            target: Target {
                kind: provider.kind,
                upstream_model: upstream.clone(),
                default_max_tokens: model_max.or(*provider_max),
            },
        })
    }

    /// Model names (not aliases), sorted.
    pub fn model_names(&self) -> impl Iterator<Item = &str> {
        self.models.keys().map(String::as_str)
    }

    /// The alias named `name`, if the policy has one.
    pub fn alias(&self, name: &str) -> Option<&Alias> {
        self.aliases.get(name)
    }

    /// Every alias, sorted by name.
    pub fn aliases(&self) -> impl Iterator<Item = &Alias> {
        self.aliases.values()
    }

    /// Every client-visible name: the models, then the aliases (each sorted).
    #[cfg(test)]
    pub(crate) fn client_names(&self) -> impl Iterator<Item = &str> {
        self.model_names().chain(self.aliases.keys().map(String::as_str))
    }

    /// Whether a client may ask for `name` (a model or an alias).
    pub fn knows(&self, name: &str) -> bool {
        self.models.contains_key(name) || self.aliases.contains_key(name)
    }

    /// The most output tokens one choice of `name` (a model or an alias: its largest deployment)
    /// can be reserved for: its `max_output_tokens`, else [`crate::guard::MAX_OUTPUT_RESERVATION`].
    pub(crate) fn output_ceiling(&self, name: &str) -> u64 {
        let of = |model: &str| self.models.get(model).and_then(|m| m.3).unwrap_or(crate::guard::MAX_OUTPUT_RESERVATION);
        match self.aliases.get(name) {
            Some(alias) => alias.deployment_names().map(of).max().unwrap_or(crate::guard::MAX_OUTPUT_RESERVATION),
            None => of(name),
        }
    }

    /// The output reservation default for an alias: the largest of its deployments'
    /// `default_max_tokens` (`None` when none has one).
    pub(crate) fn alias_default_max_tokens(&self, alias: &Alias) -> Option<u64> {
        alias.deployment_names().filter_map(|d| self.route(d).and_then(|r| r.target.default_max_tokens)).max()
    }

    /// Every provider, sorted by name.
    pub fn providers(&self) -> impl Iterator<Item = &Provider> {
        self.providers.values().map(|(p, _)| p)
    }
}
