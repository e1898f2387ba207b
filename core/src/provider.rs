//! What Tollgate knows about each kind of provider, in one place: which API it speaks, which
//! header carries its key, which headers never cross between a client and a provider (in either
//! direction), and how its streams are framed. Adapters ask here; they keep no lists of their own.

/// Which native API a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    /// OpenAI Chat Completions, spoken natively (OpenAI, DeepSeek, Groq, OpenRouter, xAI,
    /// Mistral, Together, vLLM …): passed through with quirks normalised.
    OpenAi,
    /// Anthropic Messages (`/v1/messages`).
    Anthropic,
    /// Google Gemini (`generateContent` / `streamGenerateContent`).
    Gemini,
}

/// Where a request goes: the provider's kind and the upstream model, plus per-model defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The API the provider speaks.
    pub kind: ProviderKind,
    /// The provider's model name (the client may have used an alias).
    pub upstream_model: String,
    /// `max_tokens` to send when the client gave none and the provider requires one
    /// (Anthropic).
    pub default_max_tokens: Option<u64>,
}

impl ProviderKind {
    /// The request header that carries a provider key of this kind, with its value: for hosts
    /// that add the key themselves (the worker; Envoy's clusters are configured the same way).
    pub fn key_header(self, key: &str) -> (&'static str, String) {
        match self {
            ProviderKind::Anthropic => ("x-api-key", key.to_owned()),
            ProviderKind::Gemini => ("x-goog-api-key", key.to_owned()),
            ProviderKind::OpenAi => ("authorization", format!("Bearer {key}")),
        }
    }
}

/// Client request headers that never reach a provider Tollgate holds the key for: the client's
/// own credentials and the OpenAI account selectors that would apply to the operator's key
/// (the provider key is added per provider, by the host), and the framing a rewritten body
/// invalidates (`accept-encoding`: the gateway must read the provider's answer uncompressed).
pub const CLIENT_ONLY_REQUEST_HEADERS: [&str; 10] = [
    "authorization",
    "x-api-key",
    "x-goog-api-key",
    "api-key",
    "openai-organization",
    "openai-project",
    "cookie",
    "accept-encoding",
    "transfer-encoding",
    "content-length",
];

/// Request headers some provider kind sets (its key header, its version pins): removed before
/// an attempt writes its own, so a request that falls back to another provider never carries the
/// first one's.
pub const PROVIDER_REQUEST_HEADERS: [&str; 5] = ["authorization", "x-api-key", "x-goog-api-key", "anthropic-version", "anthropic-beta"];

/// Response header prefixes that describe the operator's provider account (its organisation-wide
/// rate limits) — none of the client's business. The client gets its own `x-ratelimit-*` instead.
const PROVIDER_RESPONSE_PREFIXES: [&str; 2] = ["x-ratelimit-", "anthropic-ratelimit-"];

/// Response headers a provider sends that must not reach the client: they identify the
/// operator's account (`openai-organization`, `openai-project`, `anthropic-organization-id`) or
/// speak for the provider's own origin, which the client does not talk to (`set-cookie` for the
/// provider's domain, `alt-svc` advertising the provider's HTTP/3 endpoint, HSTS for its domain).
const PROVIDER_RESPONSE_HEADERS: [&str; 6] =
    ["openai-organization", "openai-project", "anthropic-organization-id", "set-cookie", "alt-svc", "strict-transport-security"];

/// Whether a provider's response header (lower-case name) stays with the gateway: every host
/// removes these from every answer that came from a provider, translated or passed through.
pub(crate) fn is_provider_only_response_header(name: &str) -> bool {
    PROVIDER_RESPONSE_HEADERS.contains(&name) || PROVIDER_RESPONSE_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// How a provider's stream is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// Server-sent events (OpenAI, Anthropic, Gemini with `alt=sse`).
    Sse,
    /// One JSON array streamed element by element (Gemini's `streamGenerateContent` without
    /// `alt=sse`).
    JsonArray,
}

impl ProviderKind {
    /// The framing of this kind's stream answer to a request sent to `path`.
    pub(crate) fn framing(self, path: &str) -> Framing {
        if self == ProviderKind::Gemini && !path.contains("alt=sse") {
            Framing::JsonArray
        } else {
            Framing::Sse
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_account_headers_never_reach_the_client() {
        for name in [
            "x-ratelimit-remaining-tokens",
            "anthropic-ratelimit-requests-remaining",
            "openai-organization",
            "openai-project",
            "anthropic-organization-id",
            "set-cookie",
            "alt-svc",
            "strict-transport-security",
        ] {
            assert!(is_provider_only_response_header(name), "{name}");
        }
        for name in ["content-type", "x-request-id", "request-id", "retry-after", "x-tollgate-warning", "openai-processing-ms"] {
            assert!(!is_provider_only_response_header(name), "{name}");
        }
    }

    #[test]
    fn gemini_streams_are_arrays_unless_asked_for_sse() {
        assert_eq!(ProviderKind::Gemini.framing("/v1beta/models/m:streamGenerateContent"), Framing::JsonArray);
        assert_eq!(ProviderKind::Gemini.framing("/v1beta/models/m:streamGenerateContent?alt=sse"), Framing::Sse);
        assert_eq!(ProviderKind::Anthropic.framing("/v1/messages"), Framing::Sse);
    }

    #[test]
    fn each_kind_gets_its_key_header() {
        assert_eq!(ProviderKind::Anthropic.key_header("k"), ("x-api-key", "k".to_owned()));
        assert_eq!(ProviderKind::Gemini.key_header("k"), ("x-goog-api-key", "k".to_owned()));
        assert_eq!(ProviderKind::OpenAi.key_header("k"), ("authorization", "Bearer k".to_owned()));
    }

}
