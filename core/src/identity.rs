//! Who is asking, and which tier: the policy's `identity` and `tier` sections.
//!
//! ```json
//! "identity": {
//!   "sources": [
//!     {"signed_header": "x-tollgate-user-token", "secret": "TOLLGATE_IDENTITY_SECRET", "max_skew_seconds": 30},
//!     {"header": "x-tollgate-user"},
//!     {"user_field": true},
//!     {"api_key_header": "authorization"},
//!     {"session_header": "x-tollgate-session"},
//!     {"client_ip": {"trusted_hops": 1}}
//!   ]
//! },
//! "tier": { "header": "x-tollgate-tier", "api_keys": {"sha256:<64 hex>": "pro"}, "default": "free" }
//! ```
//!
//! Sources are tried in order and the first that yields a value wins; empty (or all-blank)
//! values count as absent. `"identity": {"header": H}` is short for
//! `[{"header": H}, {"client_ip": {"trusted_hops": 0}}]`, and no `identity` at all for
//! `[{"client_ip": {"trusted_hops": 0}}]`.
//!
//! | source | value | bucket material |
//! |---|---|---|
//! | `signed_header` | `<id>.<expiry>.<signature>` (or `<id>.<tier>.<expiry>.<signature>` with `tier_in_token`), checked with HMAC-SHA256 (see [`IdentityError`]) | `sh:<id>` |
//! | `jwt` | a JWT (RS256/ES256) verified against the source's `jwks` ([`crate::jwt`]), or the payload Envoy's `jwt_authn` verified (`payload_in_metadata`) | `jwt:<issuer>:<identity claim>` |
//! | `header` | a header the operator's backend sets | `h:<value>` |
//! | `user_field` | the OpenAI request body's `user` field | `u:<value>` |
//! | `api_key_header` | the header's value, `Bearer ` stripped | `k:<sha256 hex of the key>` |
//! | `session_header` | an anonymous session or device id | `s:<value>` |
//! | `client_ip` | the client address (see [`IdentityConfig::resolve`]) | `ip:<address>` |
//!
//! Every kind has its own prefix: a plain header naming `alice` never reaches the bucket of a
//! verified `alice` (signed or JWT), and a user called `1.2.3.4` never shares that address's
//! bucket. Sources that name the same users on purpose say so with the same `"bucket": "<name>"`
//! (material `b:<name>:<value>`). A header value that is not valid UTF-8 (or that a host had to
//! decode lossily: it contains U+FFFD) is refused (400), never hashed as a lossy copy that
//! another value shares. The material is hashed (SHA-256, first 16 bytes, `tg1:q:<32 hex>`): a raw identity,
//! API key or address is never kept in a [`Subject`].
//!
//! **Tier**, first match wins: (1) the tier the verified identity carries (a signed token with
//! `tier_in_token`, a JWT's `tier_claim`; an unknown name gives `tier.default`); (2) the
//! `tier.api_keys` entry of the request's API key (the first `api_key_header` source whose
//! header is present and whose key is listed), because a key cannot be spoofed and a header must
//! not lift a key above what it was sold; (3) the `tier.header` value, when it names a known
//! tier; (4) `tier.default`. A policy that verifies identities (`signed_header`, `jwt`) cannot
//! also take the tier from `tier.header`, which any client can set: it is refused at load.
//!
//! Headers named here must be set (or removed) by something the operator trusts: a client that
//! can set `header` or `tier.header` picks its own bucket or tier. `signed_header` tokens can
//! travel through untrusted clients, since only the holder of the secret can mint them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::error::{invalid, ConfigError};
use crate::render::{openai_error, LocalResponse};

/// How late (after its expiry) a signed token is still accepted, unless configured.
pub(crate) const DEFAULT_MAX_SKEW_SECONDS: u64 = 30;
/// The largest `max_skew_seconds` a policy may give.
pub(crate) const MAX_SKEW_LIMIT_SECONDS: u64 = 3600;
/// A signed token whose expiry lies further ahead than this is refused.
pub(crate) const MAX_TOKEN_LIFETIME_SECONDS: u64 = 365 * 24 * 3600;
/// The header `client_ip` sources with `trusted_hops > 0` read.
pub(crate) const FORWARDED_FOR: &str = "x-forwarded-for";

const SOURCE_KINDS: &str = "signed_header, jwt, header, user_field, api_key_header, session_header, client_ip";

/// How late (or early) a JWT's `exp` (`nbf`) is still accepted, unless configured.
pub(crate) const DEFAULT_JWT_SKEW_SECONDS: u64 = 60;

/// The `identity` section as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawIdentity {
    header: Option<String>,
    sources: Option<Vec<RawSource>>,
}

/// The `tier` section as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTierSelect {
    header: Option<String>,
    #[serde(default)]
    api_keys: BTreeMap<String, String>,
    default: String,
}

/// One entry of `identity.sources`: exactly one of the kind fields is set.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    signed_header: Option<String>,
    secret: Option<String>,
    max_skew_seconds: Option<u64>,
    tier_in_token: Option<bool>,
    jwt: Option<RawJwt>,
    bucket: Option<String>,
    header: Option<String>,
    user_field: Option<bool>,
    api_key_header: Option<String>,
    session_header: Option<String>,
    client_ip: Option<RawClientIp>,
}

/// A `jwt` source as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJwt {
    /// Where the token is: `authorization` (the default, `Bearer <token>`) or another header.
    header: Option<String>,
    issuer: String,
    audiences: Vec<String>,
    /// The identity provider's public keys (`{"keys": [...]}`), for hosts that verify the token
    /// themselves (the worker; the filter without `payload_in_metadata`).
    jwks: Option<serde_json::Value>,
    /// Envoy: the `payload_in_metadata` key of the `jwt_authn` provider that verified the token.
    payload_in_metadata: Option<String>,
    /// Envoy: where `jwt_authn` fetches the keys (`tollgate envoy` generates its cluster).
    jwks_uri: Option<String>,
    identity_claim: Option<RawClaim>,
    tier_claim: Option<RawClaim>,
    max_skew_seconds: Option<u64>,
}

/// A claim's name, or its path through nested objects.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawClaim {
    Name(String),
    Path(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClientIp {
    #[serde(default)]
    trusted_hops: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    SignedHeader { header: String, secret: String, max_skew_seconds: u64, tier_in_token: bool },
    Jwt(Box<JwtSource>),
    Header(String),
    UserField,
    ApiKey(String),
    Session(String),
    ClientIp { trusted_hops: u32 },
}

/// A validated `jwt` source.
#[derive(Debug, Clone, PartialEq, Eq)]
struct JwtSource {
    header: String,
    issuer: String,
    audiences: Vec<String>,
    keys: Option<std::sync::Arc<crate::jwt::KeySet>>,
    metadata: Option<String>,
    jwks_uri: Option<String>,
    identity_claim: Vec<String>,
    tier_claim: Option<Vec<String>>,
    max_skew_seconds: u64,
}

/// A `jwt` source as Envoy's `jwt_authn` must be configured for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvoyJwt<'a> {
    /// `payload_in_metadata`: where the verified claims go.
    pub metadata_key: &'a str,
    /// The header the token is in (`authorization`: `Bearer <token>`).
    pub header: &'a str,
    /// `issuer`.
    pub issuer: &'a str,
    /// `audiences`.
    pub audiences: &'a [String],
    /// The JWKS as written (`local_jwks`), if the policy has one.
    pub jwks: Option<&'a str>,
    /// Where to fetch the JWKS (`remote_jwks`), if given.
    pub jwks_uri: Option<&'a str>,
    /// `clock_skew_seconds`.
    pub skew_seconds: u64,
}

/// What identified a request: the source's kind, its material prefix, the value, and the tier a
/// verified identity carries.
type Found = (IdentitySource, &'static str, String, Option<String>);

/// The validated `identity` and `tier` sections, shared read-only by every request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityConfig {
    sources: Vec<Source>,
    /// Each source's `bucket` (same order).
    buckets: Vec<Option<String>>,
    tier_header: Option<String>,
    /// Lowercase hex SHA-256 of an API key → tier name.
    api_key_tiers: BTreeMap<String, String>,
    default_tier: String,
    tier_names: BTreeSet<String>,
}

/// How the subject was identified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentitySource {
    /// A `signed_header` token.
    SignedHeader,
    /// A verified JWT.
    Jwt,
    /// A plain `header`.
    Header,
    /// The request body's `user` field.
    UserField,
    /// An `api_key_header` (its key's digest).
    ApiKey,
    /// A `session_header`.
    Session,
    /// The client's address (`client_ip`).
    ClientIp,
    /// No source yielded a value: all such requests share one bucket.
    Unidentified,
}

impl IdentitySource {
    /// The source's name as the policy spells it (a usage record's `identity_source`).
    pub fn label(self) -> &'static str {
        match self {
            IdentitySource::SignedHeader => "signed_header",
            IdentitySource::Jwt => "jwt",
            IdentitySource::Header => "header",
            IdentitySource::UserField => "user_field",
            IdentitySource::ApiKey => "api_key_header",
            IdentitySource::Session => "session_header",
            IdentitySource::ClientIp => "client_ip",
            IdentitySource::Unidentified => "unidentified",
        }
    }
}

/// Who is asking, as far as limits are concerned. Nothing raw is kept: `key` and `ip_key` are
/// SHA-256 digests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    /// The subject's bucket.
    pub key: String,
    /// The client address's bucket (`ip:` material), for per-address limits that apply even
    /// to identified users; `None` when the address is unknown. Equals `key` when the subject
    /// was identified by its address.
    pub ip_key: Option<String>,
    /// The tier whose limits and rules apply.
    pub tier: String,
    /// Which source identified the subject.
    pub source: IdentitySource,
    /// The lowercase hex SHA-256 of the API key, when an `api_key_header` source named the
    /// subject (for usage records: the form `tier.api_keys` lists keys in).
    pub api_key: Option<String>,
}

/// What the adapter knows about a request. Header names are asked in lowercase.
pub struct RequestFacts<'a> {
    /// A request header's value (several lines joined with `, `), `None` when absent.
    pub header: &'a dyn Fn(&str) -> Option<String>,
    /// The OpenAI request body's `user` field.
    pub user_field: Option<&'a str>,
    /// The immediate peer: Envoy's `source.address` (`1.2.3.4:5678`, `[::1]:443`), the
    /// worker's `cf-connecting-ip`.
    pub peer_address: Option<&'a str>,
    /// Epoch milliseconds.
    pub now_ms: u64,
    /// A claim of a token the host verified itself (Envoy's `jwt_authn`): (the
    /// `payload_in_metadata` key, the claim's path) → its value as text.
    pub claim: &'a dyn Fn(&str, &[String]) -> Option<String>,
}

/// For hosts that verify no token themselves: no claim.
pub fn no_claims(_: &str, _: &[String]) -> Option<String> {
    None
}

/// Why a present `signed_header` token was refused. The request is answered with
/// [`IdentityError::response`]; messages never repeat the token.
///
/// A token is `<id>.<expiry>.<signature>`, split from the right (the id may contain dots):
/// `expiry` is unix seconds, `signature` the HMAC-SHA256 of the bytes `<id>.<expiry>` under the
/// secret, in base64url without padding (standard base64, padded or not, is accepted too).
/// A correctly signed token is accepted until `expiry + max_skew_seconds` (whole seconds of
/// `now_ms`); an expiry more than `MAX_TOKEN_LIFETIME_SECONDS` ahead is refused. The
/// signature is checked (in constant time) before the expiry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum IdentityError {
    /// The token is not `<id>.<expiry>.<signature>` with a numeric expiry and a base64 signature.
    #[error("The identity token is malformed.")]
    Malformed,
    /// The signature does not match: the token was not minted with the secret.
    #[error("The identity token's signature is invalid.")]
    BadSignature,
    /// The expiry, plus the allowed skew, has passed.
    #[error("The identity token has expired.")]
    Expired,
    /// The expiry is further ahead than a token may live.
    #[error("The identity token's expiry is too far in the future.")]
    TooFarAhead,
    /// The adapter supplied no (or empty) bytes for the source's secret, or a JWT source has
    /// neither `jwks` nor a host that verified the token: the operator's fault.
    #[error("The identity token cannot be verified.")]
    MissingSecret,
    /// A JWT was refused ([`crate::jwt`]); the message says only whether it expired.
    #[error("{}", jwt_message(*.0))]
    Jwt(crate::jwt::Refusal),
    /// A header an identity is read from is not valid UTF-8 (or was decoded lossily by the
    /// host): refused rather than hashed as a copy another value shares.
    #[error("An identity header's value is not valid UTF-8.")]
    NotUtf8,
}

fn jwt_message(r: crate::jwt::Refusal) -> &'static str {
    match r {
        crate::jwt::Refusal::Expired => "The identity token has expired.",
        crate::jwt::Refusal::NotYetValid => "The identity token is not valid yet.",
        _ => "The identity token is invalid.",
    }
}

impl IdentityError {
    /// A short label for metrics.
    #[cfg(test)]
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            IdentityError::Malformed => "malformed",
            IdentityError::BadSignature => "bad_signature",
            IdentityError::Expired => "expired",
            IdentityError::TooFarAhead => "too_far_ahead",
            IdentityError::MissingSecret => "missing_secret",
            IdentityError::Jwt(_) => "jwt",
            IdentityError::NotUtf8 => "not_utf8",
        }
    }

    #[cfg(test)]
    pub(crate) fn fault(&self) -> crate::fault::Fault {
        match self {
            IdentityError::MissingSecret => crate::fault::Fault::Gateway,
            _ => crate::fault::Fault::Client,
        }
    }

    /// The answer the client gets, in OpenAI's dialect: 401 for a token, 400 for a header that
    /// is not text.
    pub fn response(&self) -> LocalResponse {
        let status = if *self == IdentityError::NotUtf8 { 400 } else { 401 };
        openai_error(status, &self.to_string(), "invalid_request_error", "invalid_identity")
    }
}

impl IdentityConfig {
    /// Validates the two sections; `tier_names` are the policy's tiers. Errors name their
    /// path (`identity.sources[0].secret: …`).
    pub(crate) fn validate(
        identity: RawIdentity,
        tier: RawTierSelect,
        tier_names: &BTreeSet<String>,
    ) -> Result<IdentityConfig, ConfigError> {
        // (header, path of the setting that reads it), to refuse a header read twice.
        let mut read: Vec<(String, String)> = vec![];
        let sources = match (identity.header, identity.sources) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "identity",
                    "give either header (a trusted header, then the client address) or sources, not both",
                ))
            }
            (Some(header), None) => {
                let header = claim(&mut read, "identity.header".to_owned(), header)?;
                vec![(Source::Header(header), None), (Source::ClientIp { trusted_hops: 0 }, None)]
            }
            (None, None) => vec![(Source::ClientIp { trusted_hops: 0 }, None)],
            (None, Some(raw)) => {
                if raw.is_empty() {
                    return Err(invalid(
                        "identity.sources",
                        "at least one source is required (omit identity to limit by client address)",
                    ));
                }
                let mut sources = Vec::with_capacity(raw.len());
                for (i, source) in raw.into_iter().enumerate() {
                    sources.push(validate_source(format!("identity.sources[{i}]"), source, &mut read, tier_names)?);
                }
                sources
            }
        };
        let (sources, buckets): (Vec<Source>, Vec<Option<String>>) = sources.into_iter().unzip();
        if tier.header.is_some() {
            let verified = sources.iter().position(|s| matches!(s, Source::SignedHeader { .. } | Source::Jwt(_)));
            if let Some(i) = verified {
                return Err(invalid(
                    "tier.header",
                    format!("identity.sources[{i}] verifies who is asking, but any client can set a tier header and pick its own tier: carry the tier in the token instead (signed_header with tier_in_token, jwt with tier_claim) or in tier.api_keys, and remove tier.header"),
                ));
            }
        }
        let tier_header = tier.header.map(|h| claim(&mut read, "tier.header".to_owned(), h)).transpose()?;
        let known = |path: &str, name: &str| {
            if tier_names.contains(name) {
                return Ok(());
            }
            let known: Vec<&str> = tier_names.iter().map(String::as_str).collect();
            Err(invalid(path, format!("unknown tier \"{name}\" (tiers are: {})", known.join(", "))))
        };
        known("tier.default", &tier.default)?;
        if !tier.api_keys.is_empty() && !sources.iter().any(|s| matches!(s, Source::ApiKey(_))) {
            return Err(invalid("tier.api_keys", "no identity source reads an api_key_header"));
        }
        let mut api_key_tiers = BTreeMap::new();
        for (key, name) in tier.api_keys {
            let path = format!("tier.api_keys.{key}");
            let digest = key
                .strip_prefix("sha256:")
                .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
                .ok_or_else(|| {
                    invalid(&path, "keys are \"sha256:\" and the 64 hex digits of the API key's SHA-256, never the key")
                })?;
            known(&path, &name)?;
            if api_key_tiers.insert(digest.to_ascii_lowercase(), name).is_some() {
                return Err(invalid(&path, "the same key is listed twice"));
            }
        }
        Ok(IdentityConfig {
            sources,
            buckets,
            tier_header,
            api_key_tiers,
            default_tier: tier.default,
            tier_names: tier_names.clone(),
        })
    }

    /// What this configuration trusts that an operator must make true (valid, but risky when
    /// it is not): each a JSON path and why. `tollgate check` prints them; hosts log them when
    /// the policy loads.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        let verified = self.sources.iter().any(|s| matches!(s, Source::SignedHeader { .. } | Source::Jwt(_)));
        for (i, source) in self.sources.iter().enumerate() {
            match source {
                Source::ClientIp { trusted_hops } if *trusted_hops > 0 => out.push(format!(
                    "identity.sources[{i}].client_ip.trusted_hops: {trusted_hops} takes the client address from x-forwarded-for, which clients write themselves: only safe when the proxy in front appends the address it saw (Envoy: use_remote_address: true on the http_connection_manager — its entry is then the first from the right — and one more hop per trusted proxy in front of Envoy; Cloudflare appends it) — otherwise a client rotating the header evades every per-IP limit"
                )),
                Source::Header(h) if verified => out.push(format!(
                    "identity.sources[{i}].header: next to a verified source, any client without a token can still name itself by setting {h} (a bucket of its own, per value): make sure something you trust sets or removes it"
                )),
                _ => {}
            }
        }
        out
    }

    /// The `jwt` sources Envoy's `jwt_authn` verifies (those with `payload_in_metadata`), for
    /// generating its configuration.
    pub fn envoy_jwt_sources(&self) -> Vec<EnvoyJwt<'_>> {
        self.sources
            .iter()
            .filter_map(|s| match s {
                Source::Jwt(j) => Some(EnvoyJwt {
                    metadata_key: j.metadata.as_deref()?,
                    header: &j.header,
                    issuer: &j.issuer,
                    audiences: &j.audiences,
                    jwks: j.keys.as_deref().map(crate::jwt::KeySet::json),
                    jwks_uri: j.jwks_uri.as_deref(),
                    skew_seconds: j.max_skew_seconds,
                }),
                _ => None,
            })
            .collect()
    }

    /// Whether a `jwt` source can verify tokens only with a host's help (no `jwks`): the
    /// worker then refuses every such token.
    pub fn jwt_needs_host(&self) -> bool {
        self.sources.iter().any(|s| matches!(s, Source::Jwt(j) if j.keys.is_none()))
    }

    /// Names of the secrets the adapter must supply to [`resolve`](Self::resolve).
    pub fn secret_names(&self) -> impl Iterator<Item = &str> {
        self.sources.iter().filter_map(|s| match s {
            Source::SignedHeader { secret, .. } => Some(secret.as_str()),
            _ => None,
        })
    }

    /// Request headers that are Tollgate's business only (who the user is, what they pay):
    /// the signed and plain identity headers and the tier header. Adapters do not forward
    /// them. The API key and session headers are left alone.
    pub(crate) fn private_headers(&self) -> impl Iterator<Item = &str> {
        self.sources
            .iter()
            .filter_map(|s| match s {
                Source::SignedHeader { header, .. } | Source::Header(header) => Some(header.as_str()),
                Source::Jwt(j) => Some(j.header.as_str()),
                _ => None,
            })
            .chain(self.tier_header.as_deref())
    }

    /// Whether a source reads the body's `user` field (an adapter that resolves at request
    /// headers must then wait for the body).
    pub(crate) fn reads_user_field(&self) -> bool {
        self.sources.contains(&Source::UserField)
    }

    /// Whether a subject identified by `source` was found only because no `user` field was
    /// given: the `user_field` source comes first in the list (a request without a body, the
    /// usage endpoint, could not be told apart from someone else behind the same address).
    pub(crate) fn passed_over_user_field(&self, source: IdentitySource) -> bool {
        let Some(user) = self.sources.iter().position(|s| *s == Source::UserField) else { return false };
        let kind = |s: &Source| match s {
            Source::SignedHeader { .. } => IdentitySource::SignedHeader,
            Source::Jwt(_) => IdentitySource::Jwt,
            Source::Header(_) => IdentitySource::Header,
            Source::UserField => IdentitySource::UserField,
            Source::ApiKey(_) => IdentitySource::ApiKey,
            Source::Session(_) => IdentitySource::Session,
            Source::ClientIp { .. } => IdentitySource::ClientIp,
        };
        self.sources.iter().position(|s| kind(s) == source).is_none_or(|i| i > user)
    }

    /// Resolves who is asking and which tier applies. `secrets` gives a secret's bytes by
    /// name (see [`secret_names`](Self::secret_names)).
    ///
    /// Fails only on a present but invalid `signed_header` token; an absent one falls through
    /// to the next source.
    ///
    /// **Client address.** Port and brackets are removed from the peer address and it is
    /// parsed as an IP (IPv4-mapped IPv6 counts as IPv4); an unparsable peer counts as
    /// absent. With `trusted_hops: N > 0` the address comes from `x-forwarded-for` as Envoy's
    /// `xff_num_trusted_hops` takes it with `use_remote_address: true`, i.e. reading XFF as the
    /// peer sent it (envoyproxy.io, configuration/http/http_conn_man/headers, x-forwarded-for):
    ///
    /// > If *use_remote_address* is true and *xff_num_trusted_hops* is set to a value *N* that
    /// > is greater than zero, the trusted client address is the Nth address from the right end
    /// > of XFF. (If the XFF contains fewer than N addresses, Envoy falls back to using the
    /// > immediate downstream connection's source address as trusted client address.)
    ///
    /// As in Envoy's `getLastAddressFromXFF`, entries are the comma-separated pieces (an empty
    /// piece counts), the chosen one is trimmed, and if it does not parse the peer address is
    /// used. Unlike Envoy, the chosen entry may carry a port or brackets. `N = 0` ignores XFF.
    /// Under Envoy, the filter sees XFF *after* the connection manager: with
    /// `use_remote_address: true` and `skip_xff_append: false` Envoy has already appended the
    /// peer, which then counts as one more hop.
    pub fn resolve(
        &self,
        req: &RequestFacts<'_>,
        secrets: &dyn Fn(&str) -> Option<Vec<u8>>,
    ) -> Result<Subject, IdentityError> {
        let peer = req.peer_address.and_then(parse_address);
        let needs_xff =
            self.sources.iter().any(|s| matches!(s, Source::ClientIp { trusted_hops } if *trusted_hops > 0));
        let xff = if needs_xff { (req.header)(FORWARDED_FOR) } else { None };
        let xff = xff.as_deref();
        let first_hops = self
            .sources
            .iter()
            .find_map(|s| match s {
                Source::ClientIp { trusted_hops } => Some(*trusted_hops),
                _ => None,
            })
            .unwrap_or(0);
        let ip_key = client_ip(first_hops, xff, peer).map(|ip| subject_key(&format!("ip:{ip}")));

        // (kind, prefix, value, the tier a verified identity carries)
        let mut found: Option<Found> = None;
        let mut bucket = None;
        for (source, b) in self.sources.iter().zip(&self.buckets) {
            found = match source {
                Source::SignedHeader { header, secret, max_skew_seconds, tier_in_token } => match text((req.header)(header))? {
                    Some(token) => {
                        let (id, tier) = verify_token(token.trim(), secrets(secret), req.now_ms, *max_skew_seconds, *tier_in_token)?;
                        Some((IdentitySource::SignedHeader, "sh", id.to_owned(), tier.map(str::to_owned)))
                    }
                    None => None,
                },
                Source::Jwt(j) => self.jwt(j, req)?,
                Source::Header(header) => text((req.header)(header))?.map(|v| (IdentitySource::Header, "h", v.trim().to_owned(), None)),
                Source::UserField => req
                    .user_field
                    .map(str::trim)
                    .filter(|v| !v.is_empty())
                    .map(|v| (IdentitySource::UserField, "u", v.to_owned(), None)),
                Source::ApiKey(header) => api_key_digest(text((req.header)(header))?).map(|d| (IdentitySource::ApiKey, "k", d, None)),
                Source::Session(header) => text((req.header)(header))?.map(|v| (IdentitySource::Session, "s", v.trim().to_owned(), None)),
                Source::ClientIp { trusted_hops } => {
                    client_ip(*trusted_hops, xff, peer).map(|ip| (IdentitySource::ClientIp, "ip", ip.to_string(), None))
                }
            };
            if found.is_some() {
                bucket = b.as_deref();
                break;
            }
        }
        let Some((source, prefix, value, carried)) = found else {
            return Ok(Subject { key: subject_key("unidentified"), ip_key, tier: self.tier(req)?, source: IdentitySource::Unidentified, api_key: None });
        };
        let material = match bucket {
            Some(b) => format!("b:{b}:{value}"),
            None => format!("{prefix}:{value}"),
        };
        let tier = match carried {
            Some(t) => self.tier_names.get(t.trim()).cloned().unwrap_or_else(|| self.default_tier.clone()),
            None => self.tier(req)?,
        };
        let api_key = (source == IdentitySource::ApiKey).then(|| value.clone());
        Ok(Subject { key: subject_key(&material), ip_key, tier, source, api_key })
    }

    /// A `jwt` source: the claims of a token Envoy verified (`payload_in_metadata`), else of one
    /// verified here against `jwks`. A value that is not shaped like a JWT at all is no token
    /// (an OpenAI SDK always sends some `Authorization`); a JWT-shaped one must verify.
    fn jwt(&self, j: &JwtSource, req: &RequestFacts<'_>) -> Result<Option<Found>, IdentityError> {
        let identified = |id: String, tier: Option<String>| Some((IdentitySource::Jwt, "jwt", format!("{}:{id}", j.issuer), tier));
        if let Some(key) = &j.metadata {
            if let Some(id) = (req.claim)(key, &j.identity_claim).filter(|v| !v.trim().is_empty()) {
                let tier = j.tier_claim.as_ref().and_then(|c| (req.claim)(key, c));
                return Ok(identified(id, tier));
            }
        }
        let Some(value) = text((req.header)(&j.header))? else { return Ok(None) };
        let token = bearer_token(&value);
        if !looks_like_jwt(token) {
            return Ok(None);
        }
        let Some(keys) = &j.keys else {
            // Envoy's jwt_authn removes a token it verified; one still here was refused there.
            return Err(if j.metadata.is_some() { IdentityError::Jwt(crate::jwt::Refusal::Signature) } else { IdentityError::MissingSecret });
        };
        let expect = crate::jwt::Expect { issuer: &j.issuer, audiences: &j.audiences, skew_seconds: j.max_skew_seconds, now: req.now_ms / 1000 };
        let claims = crate::jwt::verify(keys, token, &expect).map_err(IdentityError::Jwt)?;
        let Some(id) = crate::jwt::claim(&claims, &j.identity_claim).filter(|v| !v.trim().is_empty()) else {
            return Err(IdentityError::Jwt(crate::jwt::Refusal::Malformed));
        };
        let tier = j.tier_claim.as_ref().and_then(|c| crate::jwt::claim(&claims, c));
        Ok(identified(id, tier))
    }

    fn tier(&self, req: &RequestFacts<'_>) -> Result<String, IdentityError> {
        if !self.api_key_tiers.is_empty() {
            for source in &self.sources {
                if let Source::ApiKey(header) = source {
                    let hit = api_key_digest(text((req.header)(header))?).and_then(|d| self.api_key_tiers.get(&d));
                    if let Some(tier) = hit {
                        return Ok(tier.clone());
                    }
                }
            }
        }
        if let Some(header) = &self.tier_header {
            if let Some(value) = (req.header)(header) {
                if let Some(tier) = self.tier_names.get(value.trim()) {
                    return Ok(tier.clone());
                }
            }
        }
        Ok(self.default_tier.clone())
    }
}

fn validate_source(path: String, raw: RawSource, read: &mut Vec<(String, String)>, tier_names: &BTreeSet<String>) -> Result<(Source, Option<String>), ConfigError> {
    let kinds: Vec<&str> = [
        ("signed_header", raw.signed_header.is_some()),
        ("jwt", raw.jwt.is_some()),
        ("header", raw.header.is_some()),
        ("user_field", raw.user_field.is_some()),
        ("api_key_header", raw.api_key_header.is_some()),
        ("session_header", raw.session_header.is_some()),
        ("client_ip", raw.client_ip.is_some()),
    ]
    .into_iter()
    .filter_map(|(name, set)| set.then_some(name))
    .collect();
    if kinds.len() != 1 {
        let found = if kinds.is_empty() { "none".to_owned() } else { kinds.join(", ") };
        return Err(invalid(path, format!("a source names exactly one of {SOURCE_KINDS} (found: {found})")));
    }
    let bucket = match raw.bucket {
        Some(b) if b.is_empty() || b.len() > 64 || !b.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-') => {
            return Err(invalid(format!("{path}.bucket"), "must be a name (letters, digits, '_', '-'; at most 64)"));
        }
        b => b,
    };
    if raw.signed_header.is_none() {
        for (field, what, set) in [
            ("secret", "a secret", raw.secret.is_some()),
            ("max_skew_seconds", "a skew", raw.max_skew_seconds.is_some()),
            ("tier_in_token", "a tier in its token", raw.tier_in_token.is_some()),
        ] {
            if set {
                return Err(invalid(format!("{path}.{field}"), format!("only a signed_header source has {what}")));
            }
        }
    }
    let source = if let Some(header) = raw.signed_header {
        let header = claim(read, format!("{path}.signed_header"), header)?;
        let secret = raw.secret.ok_or_else(|| invalid(format!("{path}.secret"), "a signed_header source names the secret its tokens are signed with"))?;
        // As `providers.*.api_key.secret`: a name, never the secret itself.
        if secret.is_empty() || !secret.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(invalid(format!("{path}.secret"), "must name a secret (letters, digits, '_'), never hold a key"));
        }
        let max_skew_seconds = raw.max_skew_seconds.unwrap_or(DEFAULT_MAX_SKEW_SECONDS);
        if max_skew_seconds > MAX_SKEW_LIMIT_SECONDS {
            return Err(invalid(format!("{path}.max_skew_seconds"), format!("must be at most {MAX_SKEW_LIMIT_SECONDS}")));
        }
        let tier_in_token = raw.tier_in_token.unwrap_or(false);
        if let Some(dotted) = tier_names.iter().find(|t| tier_in_token && t.contains('.')) {
            return Err(invalid(format!("{path}.tier_in_token"), format!("tier \"{dotted}\" has a '.', which a token's fields are separated by")));
        }
        Source::SignedHeader { header, secret, max_skew_seconds, tier_in_token }
    } else if let Some(jwt) = raw.jwt {
        Source::Jwt(Box::new(validate_jwt(&format!("{path}.jwt"), jwt, read)?))
    } else if let Some(h) = raw.header {
        Source::Header(claim(read, format!("{path}.header"), h)?)
    } else if let Some(on) = raw.user_field {
        if !on {
            return Err(invalid(format!("{path}.user_field"), "must be true (remove the source to disable it)"));
        }
        Source::UserField
    } else if let Some(h) = raw.api_key_header {
        Source::ApiKey(claim(read, format!("{path}.api_key_header"), h)?)
    } else if let Some(h) = raw.session_header {
        Source::Session(claim(read, format!("{path}.session_header"), h)?)
    } else {
        Source::ClientIp { trusted_hops: raw.client_ip.map_or(0, |c| c.trusted_hops) }
    };
    Ok((source, bucket))
}

fn validate_jwt(path: &str, raw: RawJwt, read: &mut Vec<(String, String)>) -> Result<JwtSource, ConfigError> {
    let header = claim(read, format!("{path}.header"), raw.header.unwrap_or_else(|| "authorization".to_owned()))?;
    if raw.issuer.trim().is_empty() {
        return Err(invalid(format!("{path}.issuer"), "must name the issuer (the tokens' iss)"));
    }
    if raw.audiences.is_empty() || raw.audiences.iter().any(|a| a.trim().is_empty()) {
        return Err(invalid(format!("{path}.audiences"), "list the audiences a token may name (its aud), none empty"));
    }
    let keys = match raw.jwks {
        Some(jwks) => Some(std::sync::Arc::new(crate::jwt::KeySet::parse(&jwks).map_err(|e| invalid(format!("{path}.jwks"), e))?)),
        None => None,
    };
    let metadata = match raw.payload_in_metadata {
        Some(m) if m.is_empty() || m.contains('\0') => return Err(invalid(format!("{path}.payload_in_metadata"), "must name the jwt_authn provider's payload_in_metadata key")),
        m => m,
    };
    let jwks_uri = match raw.jwks_uri {
        Some(u) if metadata.is_none() => {
            return Err(invalid(format!("{path}.jwks_uri"), format!("{u:?} is for Envoy's jwt_authn, which needs payload_in_metadata: the worker and the filter verify with jwks")));
        }
        Some(u) if !(u.starts_with("https://") || u.starts_with("http://")) || u.contains(char::is_whitespace) => {
            return Err(invalid(format!("{path}.jwks_uri"), "must be an http(s) URL"));
        }
        u => u,
    };
    if keys.is_none() && metadata.is_none() {
        return Err(invalid(
            path,
            "give jwks (the identity provider's public keys: the worker and the filter verify tokens with them) or payload_in_metadata (Envoy: the jwt_authn filter verified the token), or both",
        ));
    }
    let path_of = |field: &str, c: Option<RawClaim>, default: Option<&str>| -> Result<Option<Vec<String>>, ConfigError> {
        let parts = match c {
            None => return Ok(default.map(|d| vec![d.to_owned()])),
            Some(RawClaim::Name(n)) => vec![n],
            Some(RawClaim::Path(p)) => p,
        };
        if parts.is_empty() || parts.iter().any(|p| p.is_empty() || p.contains('\0')) {
            return Err(invalid(format!("{path}.{field}"), "a claim's name, or the list of names leading to it through nested objects"));
        }
        Ok(Some(parts))
    };
    let max_skew_seconds = raw.max_skew_seconds.unwrap_or(DEFAULT_JWT_SKEW_SECONDS);
    if max_skew_seconds > MAX_SKEW_LIMIT_SECONDS {
        return Err(invalid(format!("{path}.max_skew_seconds"), format!("must be at most {MAX_SKEW_LIMIT_SECONDS}")));
    }
    Ok(JwtSource {
        header,
        issuer: raw.issuer,
        audiences: raw.audiences,
        keys,
        metadata,
        jwks_uri,
        identity_claim: path_of("identity_claim", raw.identity_claim, Some("sub"))?.unwrap_or_default(),
        tier_claim: path_of("tier_claim", raw.tier_claim, None)?,
        max_skew_seconds,
    })
}

/// Checks a header name (RFC 9110 §5.1: field-name = token), lowercases it, and refuses a
/// header already read by another setting.
fn claim(read: &mut Vec<(String, String)>, path: String, name: String) -> Result<String, ConfigError> {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || !name.bytes().all(token) {
        return Err(invalid(path, format!("invalid header name {name:?}")));
    }
    let name = name.to_ascii_lowercase();
    if let Some((_, other)) = read.iter().find(|(h, _)| *h == name) {
        return Err(invalid(path, format!("\"{name}\" is already read by {other}")));
    }
    read.push((name.clone(), path));
    Ok(name)
}

/// A header's value when present and not blank; `Err` when it is not text (a host decodes
/// header bytes that are not UTF-8 with U+FFFD in their place, so two such values could not be
/// told apart).
fn text(value: Option<String>) -> Result<Option<String>, IdentityError> {
    match value {
        Some(v) if v.contains('\u{FFFD}') => Err(IdentityError::NotUtf8),
        v => Ok(v.filter(|v| !v.trim().is_empty())),
    }
}

/// The token of `Bearer <token>` (any case), else the whole value, trimmed.
fn bearer_token(value: &str) -> &str {
    let v = value.trim();
    match v.get(..7) {
        Some(p) if p.eq_ignore_ascii_case("bearer ") => v[7..].trim(),
        _ => v,
    }
}

/// Three base64url parts, the first a JSON object with an `alg`: what a JWS compact token is.
fn looks_like_jwt(token: &str) -> bool {
    let mut parts = token.split('.');
    let (Some(h), Some(_), Some(_), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else { return false };
    BASE64URL
        .decode(h)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|v| v.get("alg").is_some())
}

type HmacSha256 = Hmac<Sha256>;

const LENIENT: GeneralPurposeConfig =
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
const BASE64URL: GeneralPurpose = GeneralPurpose::new(&alphabet::URL_SAFE, LENIENT);
const BASE64: GeneralPurpose = GeneralPurpose::new(&alphabet::STANDARD, LENIENT);

/// Checks `<id>.<expiry>.<signature>` (with `tier_in_token`: `<id>.<tier>.<expiry>.<signature>`,
/// the HMAC over `<id>.<tier>.<expiry>`) and returns the id and the tier. See [`IdentityError`].
fn verify_token(token: &str, secret: Option<Vec<u8>>, now_ms: u64, max_skew: u64, tier_in_token: bool) -> Result<(&str, Option<&str>), IdentityError> {
    let (signed, signature) = token.rsplit_once('.').ok_or(IdentityError::Malformed)?;
    let (rest, expiry) = signed.rsplit_once('.').ok_or(IdentityError::Malformed)?;
    let (id, tier) = if tier_in_token {
        let (id, tier) = rest.rsplit_once('.').ok_or(IdentityError::Malformed)?;
        if tier.is_empty() {
            return Err(IdentityError::Malformed);
        }
        (id, Some(tier))
    } else {
        (rest, None)
    };
    if id.is_empty() || expiry.is_empty() || !expiry.bytes().all(|b| b.is_ascii_digit()) {
        return Err(IdentityError::Malformed);
    }
    let expiry: u64 = expiry.parse().map_err(|_| IdentityError::Malformed)?;
    // 32 bytes are 43 or 44 characters; anything much longer is not a signature.
    if signature.is_empty() || signature.len() > 64 {
        return Err(IdentityError::Malformed);
    }
    let engine = if signature.contains(['+', '/']) { &BASE64 } else { &BASE64URL };
    let mut decoded = [0u8; 64];
    let n = engine.decode_slice(signature, &mut decoded).map_err(|_| IdentityError::Malformed)?;
    let secret = secret.filter(|s| !s.is_empty()).ok_or(IdentityError::MissingSecret)?;
    let mut mac = HmacSha256::new_from_slice(&secret).map_err(|_| IdentityError::MissingSecret)?;
    mac.update(signed.as_bytes());
    mac.verify_slice(&decoded[..n]).map_err(|_| IdentityError::BadSignature)?;
    let now = now_ms / 1000;
    if expiry.saturating_add(max_skew) < now {
        return Err(IdentityError::Expired);
    }
    if expiry > now.saturating_add(MAX_TOKEN_LIFETIME_SECONDS) {
        return Err(IdentityError::TooFarAhead);
    }
    Ok((id, tier))
}

/// The lowercase hex SHA-256 of the key in an API key header (`Bearer ` stripped).
fn api_key_digest(value: Option<String>) -> Option<String> {
    let value = value?;
    let value = value.trim();
    let key = match value.get(..7) {
        Some(prefix) if prefix.eq_ignore_ascii_case("bearer ") => value.get(7..).unwrap_or("").trim_start(),
        _ if value.eq_ignore_ascii_case("bearer") => "",
        _ => value,
    };
    (!key.is_empty()).then(|| hex(&Sha256::digest(key.as_bytes())))
}

/// The client address: the Nth XFF entry from the right for `trusted_hops = N > 0` when it
/// exists and parses, else the peer. See [`IdentityConfig::resolve`].
fn client_ip(trusted_hops: u32, xff: Option<&str>, peer: Option<IpAddr>) -> Option<IpAddr> {
    if trusted_hops > 0 {
        let nth = xff.and_then(|x| x.rsplit(',').nth(trusted_hops as usize - 1));
        if let Some(ip) = nth.and_then(parse_address) {
            return Some(ip);
        }
    }
    peer
}

/// `ip`, `ip:port`, `[v6]` or `[v6]:port` → the IP.
fn parse_address(address: &str) -> Option<IpAddr> {
    let address = address.trim();
    let host = match address.strip_prefix('[') {
        Some(rest) => rest.split_once(']')?.0,
        None => match address.split_once(':') {
            Some((ip, port)) if !port.contains(':') => ip,
            _ => address,
        },
    };
    host.parse::<IpAddr>().ok().map(|ip| ip.to_canonical())
}

fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from_digit((b >> 4) as u32, 16).unwrap_or('0'));
        out.push(char::from_digit((b & 15) as u32, 16).unwrap_or('0'));
    }
    out
}

/// `tg1:q:` and the first 16 bytes of the material's SHA-256 in hex: the same keys as
/// [`crate::Policy::subject`], so existing counters keep their keys.
pub(crate) fn subject_key(material: &str) -> String {
    let digest = Sha256::digest(material.as_bytes());
    format!("tg1:q:{}", hex(&digest[..16]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::Fault;
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE_NO_PAD};
    use proptest::prelude::*;

    const SECRET_NAME: &str = "TOLLGATE_IDENTITY_SECRET";
    const SECRET: &[u8] = b"tollgate-test-secret";
    /// 2026-01-01T00:00:00Z.
    const NOW_S: u64 = 1_767_225_600;
    /// `sha256:` + SHA-256 of `sk-tollgate-pro-1`.
    const PRO_KEY: &str = "sk-tollgate-pro-1";
    const PRO_KEY_SHA256: &str = "f84e148c82e6ccebe50c0be59bf7e3329d2aca5ddd8acdaa860cd9f3dc6dbdcf";

    fn full() -> String {
        format!(
            r#"{{
            "identity": {{
              "sources": [
                {{"signed_header": "x-tollgate-user-token", "secret": "TOLLGATE_IDENTITY_SECRET", "max_skew_seconds": 30}},
                {{"header": "X-Tollgate-User"}},
                {{"user_field": true}},
                {{"api_key_header": "authorization"}},
                {{"session_header": "x-tollgate-session"}},
                {{"client_ip": {{"trusted_hops": 1}}}}
              ]
            }},
            "tier": {{ "api_keys": {{"sha256:{PRO_KEY_SHA256}": "pro"}}, "default": "free" }}
        }}"#
        )
    }

    /// [`full`] without the signed header (a policy that verifies no identity), and with a
    /// tier header.
    fn unverified() -> String {
        full()
            .replace(r#"{"signed_header": "x-tollgate-user-token", "secret": "TOLLGATE_IDENTITY_SECRET", "max_skew_seconds": 30},"#, "")
            .replace(r#""tier": { "api_keys""#, r#""tier": { "header": "x-tollgate-tier", "api_keys""#)
    }

    fn tier_names() -> BTreeSet<String> {
        ["free", "pro", "team"].into_iter().map(String::from).collect()
    }

    /// The two sections as the policy document holds them, with config.rs's path handling.
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Doc {
        #[serde(default)]
        identity: RawIdentity,
        tier: RawTierSelect,
    }

    fn parse(json: &str) -> Result<IdentityConfig, ConfigError> {
        let value: serde_json::Value = serde_json::from_str(json).unwrap();
        let doc: Doc = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            invalid(if path == "." { "config".to_owned() } else { path }, e.into_inner().to_string())
        })?;
        IdentityConfig::validate(doc.identity, doc.tier, &tier_names())
    }

    fn err(json: &str) -> String {
        parse(json).unwrap_err().to_string()
    }

    fn with_sources(sources: &str) -> String {
        format!(r#"{{"identity": {{"sources": {sources}}}, "tier": {{"default": "free"}}}}"#)
    }

    fn with_tier(tier: &str) -> String {
        format!(
            r#"{{"identity": {{"sources": [{{"api_key_header": "authorization"}}, {{"header": "x-user"}}]}}, "tier": {tier}}}"#
        )
    }

    #[derive(Clone, Default)]
    struct Req {
        headers: Vec<(&'static str, String)>,
        user: Option<String>,
        peer: Option<String>,
        now_ms: u64,
    }

    fn req() -> Req {
        Req { now_ms: NOW_S * 1000, ..Req::default() }
    }

    impl Req {
        fn header(mut self, name: &'static str, value: impl Into<String>) -> Req {
            self.headers.push((name, value.into()));
            self
        }
        fn user(mut self, user: &str) -> Req {
            self.user = Some(user.to_owned());
            self
        }
        fn peer(mut self, peer: &str) -> Req {
            self.peer = Some(peer.to_owned());
            self
        }
        fn at(mut self, now_s: u64) -> Req {
            self.now_ms = now_s * 1000;
            self
        }
    }

    fn resolve_with(cfg: &IdentityConfig, r: &Req, secret: Option<&[u8]>) -> Result<Subject, IdentityError> {
        let header = |name: &str| r.headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.clone());
        let facts = RequestFacts {
            header: &header,
            user_field: r.user.as_deref(),
            peer_address: r.peer.as_deref(),
            now_ms: r.now_ms,
            claim: &no_claims,
        };
        cfg.resolve(&facts, &|name| if name == SECRET_NAME { secret.map(<[u8]>::to_vec) } else { None })
    }

    fn resolve(cfg: &IdentityConfig, r: &Req) -> Result<Subject, IdentityError> {
        resolve_with(cfg, r, Some(SECRET))
    }

    fn sign(signed: &str) -> Vec<u8> {
        let mut mac = HmacSha256::new_from_slice(SECRET).unwrap();
        mac.update(signed.as_bytes());
        mac.finalize().into_bytes().to_vec()
    }

    fn token(id: &str, expiry: u64) -> String {
        let signed = format!("{id}.{expiry}");
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sign(&signed)))
    }

    fn signed_only() -> IdentityConfig {
        parse(&with_sources(
            r#"[{"signed_header": "x-token", "secret": "TOLLGATE_IDENTITY_SECRET"}, {"header": "x-user"}, {"client_ip": {}}]"#,
        ))
        .unwrap()
    }

    fn by_token(t: &str) -> Result<Subject, IdentityError> {
        resolve(&signed_only(), &req().header("x-token", t).peer("192.0.2.1:1"))
    }

    fn client_ip_config(hops: u32) -> IdentityConfig {
        parse(&with_sources(&format!(r#"[{{"client_ip": {{"trusted_hops": {hops}}}}}]"#))).unwrap()
    }

    fn ip(material: &str) -> String {
        subject_key(&format!("ip:{material}"))
    }

    // ---- configuration -------------------------------------------------------------------

    #[test]
    fn documented_example_parses() {
        let cfg = parse(&full()).unwrap();
        assert_eq!(
            cfg.private_headers().collect::<Vec<_>>(),
            ["x-tollgate-user-token", "x-tollgate-user"]
        );
        assert_eq!(cfg.secret_names().collect::<Vec<_>>(), [SECRET_NAME]);
        assert!(cfg.reads_user_field());
        assert_eq!(cfg.sources.len(), 6);
        assert_eq!(
            cfg.sources[0],
            Source::SignedHeader {
                header: "x-tollgate-user-token".into(),
                secret: SECRET_NAME.into(),
                max_skew_seconds: 30,
                tier_in_token: false
            }
        );
        assert_eq!(cfg.sources[5], Source::ClientIp { trusted_hops: 1 });
    }

    #[test]
    fn legacy_forms_expand_to_sources() {
        let legacy = parse(r#"{"identity": {"header": "X-Tollgate-User"}, "tier": {"default": "free"}}"#).unwrap();
        let explicit =
            parse(&with_sources(r#"[{"header": "x-tollgate-user"}, {"client_ip": {"trusted_hops": 0}}]"#)).unwrap();
        assert_eq!(legacy, explicit);
        let absent = parse(r#"{"tier": {"default": "free"}}"#).unwrap();
        assert_eq!(absent, parse(&with_sources(r#"[{"client_ip": {}}]"#)).unwrap());
        assert_eq!(absent, parse(r#"{"identity": {}, "tier": {"default": "free"}}"#).unwrap());
        assert_eq!(absent.private_headers().count(), 0);
        assert!(!absent.reads_user_field());
    }

    #[test]
    fn header_and_sources_together_are_refused() {
        assert_eq!(
            err(r#"{"identity": {"header": "x-user", "sources": [{"client_ip": {}}]}, "tier": {"default": "free"}}"#),
            "identity: give either header (a trusted header, then the client address) or sources, not both"
        );
    }

    #[test]
    fn source_mistakes_name_their_path() {
        let cases: &[(&str, &str)] = &[
            (
                "[]",
                "identity.sources: at least one source is required (omit identity to limit by client address)",
            ),
            (
                "[{}]",
                "identity.sources[0]: a source names exactly one of signed_header, jwt, header, user_field, api_key_header, session_header, client_ip (found: none)",
            ),
            (
                r#"[{"client_ip": {}}, {"header": "x-user", "client_ip": {}}]"#,
                "identity.sources[1]: a source names exactly one of signed_header, jwt, header, user_field, api_key_header, session_header, client_ip (found: header, client_ip)",
            ),
            (
                r#"[{"signed_header": "x-token"}]"#,
                "identity.sources[0].secret: a signed_header source names the secret its tokens are signed with",
            ),
            (
                r#"[{"signed_header": "x-token", "secret": "c2VjcmV0LWJ5dGVz=="}]"#,
                "identity.sources[0].secret: must name a secret (letters, digits, '_'), never hold a key",
            ),
            (
                r#"[{"signed_header": "x-token", "secret": "sk-live-123"}]"#,
                "identity.sources[0].secret: must name a secret (letters, digits, '_'), never hold a key",
            ),
            (
                r#"[{"signed_header": "x-token", "secret": ""}]"#,
                "identity.sources[0].secret: must name a secret (letters, digits, '_'), never hold a key",
            ),
            (
                r#"[{"signed_header": "x-token", "secret": "S", "max_skew_seconds": 3601}]"#,
                "identity.sources[0].max_skew_seconds: must be at most 3600",
            ),
            (
                r#"[{"signed_header": "x-token", "secret": "S", "max_skew_seconds": -1}]"#,
                "identity.sources[0].max_skew_seconds: invalid value: integer `-1`, expected u64",
            ),
            (r#"[{"header": "x-user", "secret": "S"}]"#, "identity.sources[0].secret: only a signed_header source has a secret"),
            (
                r#"[{"session_header": "x-s", "max_skew_seconds": 5}]"#,
                "identity.sources[0].max_skew_seconds: only a signed_header source has a skew",
            ),
            (
                r#"[{"user_field": false}]"#,
                "identity.sources[0].user_field: must be true (remove the source to disable it)",
            ),
            (r#"[{"header": "x user"}]"#, r#"identity.sources[0].header: invalid header name "x user""#),
            (r#"[{"api_key_header": ""}]"#, r#"identity.sources[0].api_key_header: invalid header name """#),
            (
                r#"[{"signed_header": "x-user", "secret": "S"}, {"header": "X-User"}]"#,
                r#"identity.sources[1].header: "x-user" is already read by identity.sources[0].signed_header"#,
            ),
            (
                r#"[{"header": "x-user"}, {"client_ip": {"trusted_hops": -1}}]"#,
                "identity.sources[1].client_ip.trusted_hops: invalid value: integer `-1`, expected u32",
            ),
            (
                r#"[{"client_ip": {"hops": 1}}]"#,
                "identity.sources[0].client_ip.hops: unknown field `hops`, expected `trusted_hops`",
            ),
            (
                r#"[{"client_ip": true}]"#,
                "identity.sources[0].client_ip: invalid type: boolean `true`, expected struct RawClientIp",
            ),
            (
                r#"[{"signed_heder": "x-token"}]"#,
                "identity.sources[0].signed_heder: unknown field `signed_heder`, expected one of `signed_header`, `secret`, `max_skew_seconds`, `tier_in_token`, `jwt`, `bucket`, `header`, `user_field`, `api_key_header`, `session_header`, `client_ip`",
            ),
        ];
        for (sources, message) in cases {
            assert_eq!(err(&with_sources(sources)), *message, "{sources}");
        }
        assert_eq!(
            err(r#"{"identity": {"header": "x user"}, "tier": {"default": "free"}}"#),
            r#"identity.header: invalid header name "x user""#
        );
        assert_eq!(
            err(r#"{"identity": {"headers": "x-user"}, "tier": {"default": "free"}}"#),
            "identity.headers: unknown field `headers`, expected `header` or `sources`"
        );
    }

    #[test]
    fn tier_mistakes_name_their_path() {
        let cases: &[(&str, &str)] = &[
            (r#"{"default": "gold"}"#, r#"tier.default: unknown tier "gold" (tiers are: free, pro, team)"#),
            (r#"{"header": "x-tier"}"#, "tier: missing field `default`"),
            (r#"{"header": "x tier", "default": "free"}"#, r#"tier.header: invalid header name "x tier""#),
            (
                r#"{"header": "X-User", "default": "free"}"#,
                r#"tier.header: "x-user" is already read by identity.sources[1].header"#,
            ),
            (
                r#"{"default": "free", "api_keys": {"sha256:zz": "pro"}}"#,
                r#"tier.api_keys.sha256:zz: keys are "sha256:" and the 64 hex digits of the API key's SHA-256, never the key"#,
            ),
            (
                r#"{"default": "free", "api_keys": {"sk-tollgate-pro-1": "pro"}}"#,
                r#"tier.api_keys.sk-tollgate-pro-1: keys are "sha256:" and the 64 hex digits of the API key's SHA-256, never the key"#,
            ),
            (
                &format!(r#"{{"default": "free", "api_keys": {{"sha256:{PRO_KEY_SHA256}": "gold"}}}}"#),
                &format!(r#"tier.api_keys.sha256:{PRO_KEY_SHA256}: unknown tier "gold" (tiers are: free, pro, team)"#),
            ),
            (
                &format!(
                    r#"{{"default": "free", "api_keys": {{"sha256:{}": "pro", "sha256:{PRO_KEY_SHA256}": "team"}}}}"#,
                    PRO_KEY_SHA256.to_ascii_uppercase()
                ),
                &format!(r#"tier.api_keys.sha256:{PRO_KEY_SHA256}: the same key is listed twice"#),
            ),
            (
                r#"{"default": "free", "api_keys": {"sha256:ab": 3}}"#,
                "tier.api_keys.sha256:ab: invalid type: integer `3`, expected a string",
            ),
            (
                r#"{"default": "free", "fallback": "pro"}"#,
                "tier.fallback: unknown field `fallback`, expected one of `header`, `api_keys`, `default`",
            ),
        ];
        for (tier, message) in cases {
            assert_eq!(err(&with_tier(tier)), *message, "{tier}");
        }
        assert_eq!(
            err(&format!(
                r#"{{"identity": {{"header": "x-user"}}, "tier": {{"default": "free", "api_keys": {{"sha256:{PRO_KEY_SHA256}": "pro"}}}}}}"#
            )),
            "tier.api_keys: no identity source reads an api_key_header"
        );
        assert_eq!(
            err(r#"{"identity": {"header": "x-user"}, "tier": {"header": "x-user", "default": "free"}}"#),
            r#"tier.header: "x-user" is already read by identity.header"#
        );
    }

    // ---- signed header -------------------------------------------------------------------

    #[test]
    fn a_plain_header_never_reaches_a_signed_identitys_bucket() {
        let cfg = signed_only();
        let s = by_token(&token("alice", NOW_S + 600)).unwrap();
        assert_eq!(s.source, IdentitySource::SignedHeader);
        assert_eq!(s.key, subject_key("sh:alice"));
        // Anyone can send `x-user: alice`: that is another bucket.
        let plain = resolve(&cfg, &req().header("x-user", "alice")).unwrap();
        assert_eq!(plain.source, IdentitySource::Header);
        assert_ne!(plain.key, s.key);
        // Unless the policy says they name the same users.
        let shared = parse(&with_sources(
            r#"[{"signed_header": "x-token", "secret": "TOLLGATE_IDENTITY_SECRET", "bucket": "users"}, {"header": "x-user", "bucket": "users"}]"#,
        ))
        .unwrap();
        let a = resolve(&shared, &req().header("x-token", token("alice", NOW_S + 600))).unwrap();
        let b = resolve(&shared, &req().header("x-user", "alice")).unwrap();
        assert_eq!((a.key.as_str(), b.key.as_str()), (subject_key("b:users:alice").as_str(), subject_key("b:users:alice").as_str()));
        assert_eq!(s.ip_key, Some(ip("192.0.2.1")));
        assert_eq!(s.tier, "free");
    }

    #[test]
    fn known_vector_computed_independently() {
        // Computed outside Rust, with Python's standard library:
        // python3 -c "import hmac,hashlib,base64; d=hmac.new(b'tollgate-test-secret',
        //   b'user-42.1767225600', hashlib.sha256).digest();
        //   print(base64.urlsafe_b64encode(d).rstrip(b'=').decode())"
        let t = "user-42.1767225600.jCPwp3VU5naSU0TI-DVTQ72mLHbsvKH4VA5iWNmp7C0";
        assert_eq!(URL_SAFE_NO_PAD.encode(sign("user-42.1767225600")), "jCPwp3VU5naSU0TI-DVTQ72mLHbsvKH4VA5iWNmp7C0");
        let s = by_token(t).unwrap();
        assert_eq!((s.source, s.key), (IdentitySource::SignedHeader, subject_key("sh:user-42")));
        // Same tool, id with dots: b'alice.example.com.1767225600'.
        let dotted = by_token("alice.example.com.1767225600.3GADijocr785y_dyL7o2j93HYovu3weALmHRW1hDZbc").unwrap();
        assert_eq!(dotted.key, subject_key("sh:alice.example.com"));
    }

    #[test]
    fn standard_base64_signatures_are_accepted() {
        // The same Python vector in standard base64, padded and unpadded.
        let padded = "user-42.1767225600.jCPwp3VU5naSU0TI+DVTQ72mLHbsvKH4VA5iWNmp7C0=";
        let unpadded = "user-42.1767225600.jCPwp3VU5naSU0TI+DVTQ72mLHbsvKH4VA5iWNmp7C0";
        let url = by_token("user-42.1767225600.jCPwp3VU5naSU0TI-DVTQ72mLHbsvKH4VA5iWNmp7C0").unwrap();
        assert_eq!(by_token(padded).unwrap(), url);
        assert_eq!(by_token(unpadded).unwrap(), url);
        let mac = sign("bob.1767229200");
        assert_eq!(by_token(&format!("bob.1767229200.{}", STANDARD.encode(&mac))).unwrap().key, subject_key("sh:bob"));
        assert_eq!(
            by_token(&format!("bob.1767229200.{}", STANDARD_NO_PAD.encode(&mac))).unwrap().key,
            subject_key("sh:bob")
        );
    }

    #[test]
    fn wrong_signature_and_tampered_ids_are_refused() {
        let good = token("alice", NOW_S + 60);
        let (_, sig) = good.rsplit_once('.').unwrap();
        assert_eq!(by_token(&format!("mallory.{}.{sig}", NOW_S + 60)), Err(IdentityError::BadSignature));
        assert_eq!(
            by_token(&format!("alice.{}.{sig}", NOW_S + 61)),
            Err(IdentityError::BadSignature),
            "tampered expiry"
        );
        let mut other = HmacSha256::new_from_slice(b"another secret").unwrap();
        other.update(format!("alice.{}", NOW_S + 60).as_bytes());
        let forged = format!("alice.{}.{}", NOW_S + 60, URL_SAFE_NO_PAD.encode(other.finalize().into_bytes()));
        assert_eq!(by_token(&forged), Err(IdentityError::BadSignature));
        let truncated =
            format!("alice.{}.{}", NOW_S + 60, URL_SAFE_NO_PAD.encode(&sign(&format!("alice.{}", NOW_S + 60))[..31]));
        assert_eq!(by_token(&truncated), Err(IdentityError::BadSignature));
    }

    #[test]
    fn expiry_skew_is_tolerated_then_refused() {
        let cfg = signed_only();
        let t = token("alice", NOW_S);
        for late in [0, 1, 30] {
            assert!(resolve(&cfg, &req().header("x-token", t.clone()).at(NOW_S + late)).is_ok(), "{late}s late");
        }
        let just_within = Req { now_ms: (NOW_S + 30) * 1000 + 999, ..req().header("x-token", t.clone()) };
        assert!(resolve(&cfg, &just_within).is_ok());
        assert_eq!(resolve(&cfg, &req().header("x-token", t.clone()).at(NOW_S + 31)), Err(IdentityError::Expired));
        let strict = parse(&with_sources(
            r#"[{"signed_header": "x-token", "secret": "TOLLGATE_IDENTITY_SECRET", "max_skew_seconds": 0}]"#,
        ))
        .unwrap();
        assert!(resolve(&strict, &req().header("x-token", t.clone()).at(NOW_S)).is_ok());
        assert_eq!(resolve(&strict, &req().header("x-token", t).at(NOW_S + 1)), Err(IdentityError::Expired));
        assert_eq!(by_token(&token("alice", 0)), Err(IdentityError::Expired));
    }

    #[test]
    fn far_future_expiry_is_refused() {
        assert!(by_token(&token("alice", NOW_S + MAX_TOKEN_LIFETIME_SECONDS)).is_ok());
        assert_eq!(by_token(&token("alice", NOW_S + MAX_TOKEN_LIFETIME_SECONDS + 1)), Err(IdentityError::TooFarAhead));
        assert_eq!(by_token(&token("alice", u64::MAX)), Err(IdentityError::TooFarAhead));
        let at_end_of_time = req().header("x-token", token("alice", u64::MAX / 1000));
        let r = Req { now_ms: u64::MAX, ..at_end_of_time };
        assert!(resolve(&signed_only(), &r).is_ok(), "no overflow");
    }

    #[test]
    fn ids_may_contain_dots() {
        let s = by_token(&token("a.b.c", NOW_S + 10)).unwrap();
        assert_eq!(s.key, subject_key("sh:a.b.c"));
        assert_eq!(by_token(&token("...", NOW_S + 10)).unwrap().key, subject_key("sh:..."));
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let sig = URL_SAFE_NO_PAD.encode(sign("alice.1767225660"));
        for bad in [
            "alice".to_owned(),
            "alice.1767225660".to_owned(),
            format!(".1767225660.{sig}"),
            format!("alice..{sig}"),
            format!("alice.+1767225660.{sig}"),
            format!("alice.17672256a0.{sig}"),
            format!("alice.99999999999999999999999.{sig}"),
            "alice.1767225660.".to_owned(),
            "alice.1767225660.not base64!".to_owned(),
            format!("alice.1767225660.{sig}{sig}"),
            format!("alice.1767225660.{}", "A".repeat(65)),
            format!("alice.1767225660.{}", sig.replace('-', "+").replace('_', "-")),
        ] {
            assert_eq!(by_token(&bad), Err(IdentityError::Malformed), "{bad}");
        }
        assert_eq!(by_token("alice.1767225660.AAAA"), Err(IdentityError::BadSignature), "decodes, wrong length");
    }

    #[test]
    fn missing_secret_is_an_error_only_when_a_token_is_present() {
        let cfg = signed_only();
        let with_token = req().header("x-token", token("alice", NOW_S + 60));
        assert_eq!(resolve_with(&cfg, &with_token, None), Err(IdentityError::MissingSecret));
        assert_eq!(resolve_with(&cfg, &with_token, Some(b"")), Err(IdentityError::MissingSecret));
        assert_eq!(IdentityError::MissingSecret.fault(), Fault::Gateway);
        let without = req().header("x-user", "bob");
        assert_eq!(resolve_with(&cfg, &without, None).unwrap().key, subject_key("h:bob"));
        let blank = req().header("x-token", "  ").header("x-user", "bob");
        assert_eq!(resolve_with(&cfg, &blank, None).unwrap().source, IdentitySource::Header, "blank falls through");
    }

    #[test]
    fn identity_errors_render_a_401_without_the_token() {
        let t = format!("alice.{}.{}", NOW_S + 60, "A".repeat(43));
        let e = by_token(&t).unwrap_err();
        assert_eq!((e, e.kind(), e.fault()), (IdentityError::BadSignature, "bad_signature", Fault::Client));
        let r = e.response();
        assert_eq!(r.status, 401);
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"error": {"message": "The identity token's signature is invalid.",
                "type": "invalid_request_error", "param": null, "code": "invalid_identity"}})
        );
        for e in [
            IdentityError::Malformed,
            IdentityError::BadSignature,
            IdentityError::Expired,
            IdentityError::TooFarAhead,
            IdentityError::MissingSecret,
        ] {
            let body = String::from_utf8(e.response().body).unwrap();
            assert!(!body.contains("alice") && !body.contains(SECRET_NAME), "{body}");
        }
    }

    // ---- sources and tiers ---------------------------------------------------------------

    #[test]
    fn sources_fall_through_in_order() {
        let cfg = parse(&full()).unwrap();
        let everything = req()
            .header("x-tollgate-user-token", token("alice", NOW_S + 60))
            .header("x-tollgate-user", "bob")
            .user("carol")
            .header("authorization", "Bearer sk-dave")
            .header("x-tollgate-session", "dev-1")
            .peer("198.51.100.7:443");
        let steps = [
            (IdentitySource::SignedHeader, subject_key("sh:alice")),
            (IdentitySource::Header, subject_key("h:bob")),
            (IdentitySource::UserField, subject_key("u:carol")),
            (IdentitySource::ApiKey, subject_key(&format!("k:{}", hex(&Sha256::digest(b"sk-dave"))))),
            (IdentitySource::Session, subject_key("s:dev-1")),
            (IdentitySource::ClientIp, ip("198.51.100.7")),
        ];
        let mut r = everything;
        for (source, key) in steps {
            let s = resolve(&parse(&full()).unwrap(), &r).unwrap();
            assert_eq!((s.source, &s.key), (source, &key));
            assert_eq!(s.ip_key, Some(ip("198.51.100.7")));
            // Remove the winning input; the next source takes over.
            match source {
                IdentitySource::UserField => r.user = None,
                IdentitySource::ClientIp => r.peer = None,
                _ => {
                    r.headers.remove(0);
                }
            }
        }
        let nobody = resolve(&cfg, &r).unwrap();
        assert_eq!(
            (nobody.source, nobody.key, nobody.ip_key),
            (IdentitySource::Unidentified, subject_key("unidentified"), None)
        );
    }

    #[test]
    fn user_field_identifies_and_blank_falls_through() {
        let cfg = parse(&with_sources(r#"[{"user_field": true}, {"client_ip": {}}]"#)).unwrap();
        let s = resolve(&cfg, &req().user(" user-123 ").peer("10.0.0.1")).unwrap();
        assert_eq!((s.source, s.key), (IdentitySource::UserField, subject_key("u:user-123")));
        assert_eq!(resolve(&cfg, &req().user("  ").peer("10.0.0.1")).unwrap().source, IdentitySource::ClientIp);
    }

    #[test]
    fn bearer_prefix_is_stripped_and_the_api_key_picks_the_tier() {
        let cfg = parse(&full()).unwrap();
        let key = subject_key(&format!("k:{PRO_KEY_SHA256}"));
        for value in [
            format!("Bearer {PRO_KEY}"),
            format!("bearer  {PRO_KEY}"),
            format!("BEARER {PRO_KEY} "),
            PRO_KEY.to_owned(),
        ] {
            let s = resolve(&cfg, &req().header("authorization", value.clone())).unwrap();
            assert_eq!((s.source, &s.key, s.tier.as_str()), (IdentitySource::ApiKey, &key, "pro"), "{value}");
        }
        let unknown = resolve(&cfg, &req().header("authorization", "Bearer sk-other")).unwrap();
        assert_eq!((unknown.source, unknown.tier.as_str()), (IdentitySource::ApiKey, "free"));
        for empty in ["Bearer ", "bearer", "   "] {
            let s = resolve(&cfg, &req().header("authorization", empty).peer("10.0.0.1")).unwrap();
            assert_eq!(s.source, IdentitySource::ClientIp, "{empty:?}");
        }
        // Not a char boundary at 7: no panic, the whole value is the key.
        let odd = resolve(&cfg, &req().header("authorization", "Bearé x")).unwrap();
        assert_eq!(odd.key, subject_key(&format!("k:{}", hex(&Sha256::digest("Bearé x".as_bytes())))));
    }

    #[test]
    fn tier_precedence_is_api_key_then_header_then_default() {
        let cfg = parse(&unverified()).unwrap();
        let keyed = req().header("authorization", format!("Bearer {PRO_KEY}"));
        assert_eq!(
            resolve(&cfg, &keyed.clone().header("x-tollgate-tier", "team")).unwrap().tier,
            "pro",
            "the key wins"
        );
        // The key decides the tier even when another source identified the user.
        let signed_in = keyed.clone().header("x-tollgate-user", "bob");
        let s = resolve(&cfg, &signed_in).unwrap();
        assert_eq!((s.source, s.tier.as_str()), (IdentitySource::Header, "pro"));
        let unlisted = req().header("authorization", "Bearer sk-x").header("x-tollgate-tier", " team ");
        assert_eq!(resolve(&cfg, &unlisted).unwrap().tier, "team");
        assert_eq!(resolve(&cfg, &req().header("x-tollgate-tier", "platinum")).unwrap().tier, "free", "unknown tier");
        assert_eq!(resolve(&cfg, &req()).unwrap().tier, "free");
    }

    #[test]
    fn xff_zero_hops_uses_the_peer() {
        // Envoy's Example 1: use_remote_address = true, xff_num_trusted_hops = 0: XFF is ignored.
        let r = req().header(FORWARDED_FOR, "203.0.113.128, 203.0.113.10, 203.0.113.1").peer("192.0.2.5:40000");
        let s = resolve(&client_ip_config(0), &r).unwrap();
        assert_eq!((s.source, &s.key), (IdentitySource::ClientIp, &ip("192.0.2.5")));
    }

    #[test]
    fn xff_one_and_two_trusted_hops() {
        let r = req().header(FORWARDED_FOR, "203.0.113.128, 203.0.113.10, 203.0.113.1").peer("192.0.2.5:40000");
        assert_eq!(resolve(&client_ip_config(1), &r).unwrap().key, ip("203.0.113.1"));
        // Envoy's Example 3: xff_num_trusted_hops = 2 → 203.0.113.10 (2nd to last address in XFF).
        assert_eq!(resolve(&client_ip_config(2), &r).unwrap().key, ip("203.0.113.10"));
        assert_eq!(resolve(&client_ip_config(3), &r).unwrap().key, ip("203.0.113.128"));
        // Only the chosen entry has to parse.
        let r = req().header(FORWARDED_FOR, "junk,203.0.113.10,\t203.0.113.1 ").peer("192.0.2.5");
        assert_eq!(resolve(&client_ip_config(1), &r).unwrap().key, ip("203.0.113.1"));
    }

    #[test]
    fn xff_with_too_few_entries_falls_back_to_the_peer() {
        let r = req().header(FORWARDED_FOR, "203.0.113.10, 203.0.113.1").peer("192.0.2.5:1");
        assert_eq!(resolve(&client_ip_config(3), &r).unwrap().key, ip("192.0.2.5"));
        assert_eq!(resolve(&client_ip_config(u32::MAX), &r).unwrap().key, ip("192.0.2.5"));
        let no_xff = req().peer("192.0.2.5:1");
        assert_eq!(resolve(&client_ip_config(1), &no_xff).unwrap().key, ip("192.0.2.5"));
        let neither = resolve(&client_ip_config(1), &req()).unwrap();
        assert_eq!((neither.source, neither.ip_key), (IdentitySource::Unidentified, None));
    }

    #[test]
    fn garbage_xff_entries_fall_back_to_the_peer() {
        for xff in [
            "",
            ",",
            "203.0.113.10,",
            "203.0.113.10, unknown",
            "203.0.113.10, 999.1.1.1",
            "1.2.3.4, _hidden",
            "fe80::1%eth0",
        ] {
            let r = req().header(FORWARDED_FOR, xff).peer("192.0.2.5");
            assert_eq!(resolve(&client_ip_config(1), &r).unwrap().key, ip("192.0.2.5"), "{xff:?}");
        }
        // An entry with a port is accepted (Envoy would refuse it).
        let r = req().header(FORWARDED_FOR, "203.0.113.10:5555").peer("192.0.2.5");
        assert_eq!(resolve(&client_ip_config(1), &r).unwrap().key, ip("203.0.113.10"));
    }

    #[test]
    fn xff_and_peers_in_ipv6() {
        let r = req().header(FORWARDED_FOR, "2001:db8::1, [2001:DB8:0:0:0:0:0:2]:443").peer("[2001:db8::ff]:8443");
        assert_eq!(resolve(&client_ip_config(1), &r).unwrap().key, ip("2001:db8::2"));
        assert_eq!(resolve(&client_ip_config(2), &r).unwrap().key, ip("2001:db8::1"));
        assert_eq!(resolve(&client_ip_config(0), &r).unwrap().key, ip("2001:db8::ff"));
        // An IPv4-mapped peer is the IPv4 client it maps.
        let mapped = resolve(&client_ip_config(0), &req().peer("[::ffff:192.0.2.5]:80")).unwrap();
        assert_eq!(mapped.key, ip("192.0.2.5"));
    }

    #[test]
    fn peer_port_and_brackets_are_stripped() {
        let cfg = client_ip_config(0);
        let key = |peer: &str| resolve(&cfg, &req().peer(peer)).unwrap();
        assert_eq!(key("10.0.0.1:5555").key, key("10.0.0.1").key);
        assert_eq!(key(" 10.0.0.1:6666 ").key, ip("10.0.0.1"));
        assert_eq!(key("[::1]:443").key, key("::1").key);
        assert_eq!(key("[::1]").key, ip("::1"));
        for garbage in ["", "unix:/tmp/sock", "[::1", "10.0.0.1:1:2:x", "localhost:80"] {
            let s = key(garbage);
            assert_eq!((s.source, s.ip_key), (IdentitySource::Unidentified, None), "{garbage:?}");
        }
    }

    #[test]
    fn prefixes_keep_buckets_apart() {
        let cfg = parse(&full()).unwrap();
        let same = "1.2.3.4";
        let subjects = [
            resolve(&cfg, &req().header("x-tollgate-user", same)).unwrap(),
            resolve(&cfg, &req().user(same)).unwrap(),
            resolve(&cfg, &req().header("authorization", same)).unwrap(),
            resolve(&cfg, &req().header("x-tollgate-session", same)).unwrap(),
            resolve(&cfg, &req().peer(same)).unwrap(),
        ];
        let keys: BTreeSet<&str> = subjects.iter().map(|s| s.key.as_str()).collect();
        assert_eq!(keys.len(), subjects.len(), "{subjects:?}");
        assert_eq!(subjects[4].key, ip(same));
        assert_eq!(subjects[4].ip_key.as_deref(), Some(subjects[4].key.as_str()));
    }

    #[test]
    fn raw_identity_never_appears_in_the_subject() {
        let cfg = parse(&full()).unwrap();
        let cases = [
            ("alice-signed-id", req().header("x-tollgate-user-token", token("alice-signed-id", NOW_S + 5))),
            ("bob-plain-id", req().header("x-tollgate-user", "bob-plain-id")),
            ("carol-user-field", req().user("carol-user-field")),
            (PRO_KEY, req().header("authorization", format!("Bearer {PRO_KEY}"))),
            ("device-session-9", req().header("x-tollgate-session", "device-session-9")),
            ("203.0.113.77", req().header(FORWARDED_FOR, "203.0.113.77").peer("192.0.2.1:9")),
        ];
        for (raw, r) in cases {
            let s = resolve(&cfg, &r).unwrap();
            let shown = format!("{s:?}");
            assert!(!shown.contains(raw) && !s.key.contains(raw), "{raw} in {shown}");
            assert!(s.key.starts_with("tg1:q:") && s.key.len() == 6 + 32, "{}", s.key);
        }
    }

    #[test]
    fn ip_key_is_kept_for_identified_users() {
        let cfg = parse(&full()).unwrap();
        let r = req()
            .header("x-tollgate-user", "bob")
            .header(FORWARDED_FOR, "198.51.100.9, 203.0.113.77")
            .peer("192.0.2.1:9");
        let s = resolve(&cfg, &r).unwrap();
        assert_eq!(s.source, IdentitySource::Header);
        assert_eq!(s.ip_key, Some(ip("203.0.113.77")), "the first client_ip source's XFF rule");
        let no_client_ip = parse(&with_sources(r#"[{"header": "x-tollgate-user"}]"#)).unwrap();
        assert_eq!(resolve(&no_client_ip, &r).unwrap().ip_key, Some(ip("192.0.2.1")), "the peer");
    }

    #[test]
    fn keys_are_stable_across_versions() {
        // Counters already stored stay with their owners: `tg1:q:` + the first 16 bytes of
        // SHA-256 over the prefixed material (computed independently with Python's hashlib).
        let cfg = parse(r#"{"identity": {"header": "x-tollgate-user"}, "tier": {"default": "free"}}"#).unwrap();
        let by_header = resolve(&cfg, &req().header("x-tollgate-user", " alice ").peer("10.0.0.1:5")).unwrap();
        assert_eq!(by_header.key, "tg1:q:623360321e236c3c3f88dfccd427fbb6");
        let by_ip = resolve(&cfg, &req().peer("[::1]:443")).unwrap();
        assert_eq!(by_ip.key, "tg1:q:227a139b2d0f158050b5542327a01af0");
        assert_eq!(resolve(&cfg, &req()).unwrap().key, "tg1:q:5106c201914f92fab45cf8c5b00f875c");
    }

    // ---- trust -------------------------------------------------------------------------------

    #[test]
    fn a_verified_identity_with_a_tier_header_is_refused_at_load() {
        for source in [
            r#"{"signed_header": "x-token", "secret": "S"}"#,
            r#"{"jwt": {"issuer": "https://id.example", "audiences": ["tollgate"], "payload_in_metadata": "jwt_payload"}}"#,
        ] {
            let json = format!(r#"{{"identity": {{"sources": [{{"header": "x-user"}}, {source}]}}, "tier": {{"header": "x-tier", "default": "free"}}}}"#);
            let e = err(&json);
            assert!(e.starts_with("tier.header: identity.sources[1] verifies who is asking, but any client can set a tier header"), "{e}");
        }
        assert!(parse(&with_tier(r#"{"header": "x-tier", "default": "free"}"#)).is_ok(), "nothing verified: a trusted header is the operator's call");
    }

    #[test]
    fn a_signed_token_can_carry_the_tier() {
        let cfg = parse(&with_sources(r#"[{"signed_header": "x-token", "secret": "TOLLGATE_IDENTITY_SECRET", "tier_in_token": true}, {"header": "x-user"}]"#)).unwrap();
        let tiered = |id: &str, tier: &str| {
            let signed = format!("{id}.{tier}.{}", NOW_S + 60);
            format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sign(&signed)))
        };
        let s = resolve(&cfg, &req().header("x-token", tiered("alice.example", "pro"))).unwrap();
        assert_eq!((s.key, s.tier.as_str()), (subject_key("sh:alice.example"), "pro"));
        let s = resolve(&cfg, &req().header("x-token", tiered("bob", "platinum"))).unwrap();
        assert_eq!(s.tier, "free", "an unknown tier in a genuine token is the default");
        // The tier is signed: changing it breaks the signature.
        let t = tiered("carol", "free").replacen(".free.", ".pro.", 1);
        assert_eq!(resolve(&cfg, &req().header("x-token", t)), Err(IdentityError::BadSignature));
        // A token without a tier is malformed for this source.
        assert!(resolve(&cfg, &req().header("x-token", token("dave", NOW_S + 60))).is_err());
        assert!(err(r#"{"identity": {"sources": [{"header": "x-user", "tier_in_token": true}]}, "tier": {"default": "free"}}"#)
        .contains("only a signed_header source has a tier in its token"));
    }

    #[test]
    fn header_values_a_host_decoded_lossily_are_refused_not_hashed() {
        let cfg = parse(&unverified()).unwrap();
        for (name, value) in [("x-tollgate-user", "user-\u{FFFD}"), ("x-tollgate-session", "\u{FFFD}"), ("authorization", "Bearer sk-\u{FFFD}")] {
            let e = resolve(&cfg, &req().header(name, value)).unwrap_err();
            assert_eq!(e, IdentityError::NotUtf8, "{name}");
            assert_eq!(e.response().status, 400);
        }
        // Text is text, whatever its script.
        assert!(resolve(&cfg, &req().header("x-tollgate-user", "مستخدم")).is_ok());
    }

    #[test]
    fn risky_but_valid_trust_is_named_in_warnings() {
        let cfg = parse(&with_sources(r#"[{"signed_header": "x-token", "secret": "S"}, {"header": "x-user"}, {"client_ip": {"trusted_hops": 1}}]"#)).unwrap();
        let w = cfg.warnings();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].starts_with("identity.sources[1].header: next to a verified source"), "{w:?}");
        assert!(w[1].starts_with("identity.sources[2].client_ip.trusted_hops: 1 takes the client address from x-forwarded-for"), "{w:?}");
        assert!(parse(&with_sources(r#"[{"header": "x-user"}, {"client_ip": {}}]"#)).unwrap().warnings().is_empty());
    }

    #[test]
    fn bucket_names_are_checked() {
        assert!(err(&with_sources(r#"[{"header": "x-user", "bucket": "a b"}]"#)).starts_with("identity.sources[0].bucket: must be a name"));
        assert!(parse(&with_sources(r#"[{"header": "x-user", "bucket": "users-1"}]"#)).is_ok());
    }

    fn jwt_config(extra: &str) -> IdentityConfig {
        let jwks = String::from_utf8(crate::jwt::tests::fixture("jwks.json")).unwrap();
        parse(&with_sources(&format!(
            r#"[{{"jwt": {{"issuer": "https://id.example", "audiences": ["tollgate"], "jwks": {jwks}, "tier_claim": ["plan", "tier"]{extra}}}}}, {{"client_ip": {{}}}}]"#
        )))
        .unwrap()
    }

    #[test]
    fn a_jwt_identifies_and_carries_its_tier() {
        use jsonwebtoken::Algorithm;
        let cfg = jwt_config("");
        let mut claims = crate::jwt::tests::good_claims();
        claims["exp"] = serde_json::json!(NOW_S + 600);
        claims["nbf"] = serde_json::json!(NOW_S - 5);
        let t = crate::jwt::tests::mint(Algorithm::RS256, "rs256.pem", Some("rsa-1"), &claims);
        let s = resolve(&cfg, &req().header("authorization", format!("Bearer {t}")).peer("10.0.0.1")).unwrap();
        assert_eq!((s.source, s.key, s.tier.as_str()), (IdentitySource::Jwt, subject_key("jwt:https://id.example:user-1"), "pro"));
        // Expired, or signed by a stranger: 401, never a fall-through to the address.
        claims["exp"] = serde_json::json!(NOW_S - 3600);
        let old = crate::jwt::tests::mint(Algorithm::ES256, "es256.pem", Some("ec-1"), &claims);
        assert_eq!(resolve(&cfg, &req().header("authorization", format!("Bearer {old}")).peer("10.0.0.1")), Err(IdentityError::Jwt(crate::jwt::Refusal::Expired)));
        claims["exp"] = serde_json::json!(NOW_S + 600);
        let stranger = crate::jwt::tests::mint(Algorithm::RS256, "rs256-stranger.pem", Some("rsa-1"), &claims);
        let e = resolve(&cfg, &req().header("authorization", format!("Bearer {stranger}"))).unwrap_err();
        assert_eq!((e.response().status, e.to_string().as_str()), (401, "The identity token is invalid."));
        // Not a JWT at all (an SDK's placeholder key): no token, the next source decides.
        let anon = resolve(&cfg, &req().header("authorization", "Bearer sk-anonymous").peer("10.0.0.1")).unwrap();
        assert_eq!(anon.source, IdentitySource::ClientIp);
        // The token header never travels on.
        assert_eq!(cfg.private_headers().collect::<Vec<_>>(), ["authorization"]);
    }

    #[test]
    fn a_jwt_envoy_verified_is_read_from_its_metadata() {
        let cfg = parse(&with_sources(
            r#"[{"jwt": {"issuer": "https://id.example", "audiences": ["tollgate"], "payload_in_metadata": "jwt_payload", "tier_claim": "https://app.example/tier"}}, {"client_ip": {}}]"#,
        ))
        .unwrap();
        let claim = |key: &str, path: &[String]| match (key, path.join("/").as_str()) {
            ("jwt_payload", "sub") => Some("user-9".to_owned()),
            ("jwt_payload", "https://app.example/tier") => Some("team".to_owned()),
            _ => None,
        };
        let header = |_: &str| None;
        let facts = RequestFacts { header: &header, user_field: None, peer_address: Some("10.0.0.1"), now_ms: NOW_S * 1000, claim: &claim };
        let s = cfg.resolve(&facts, &|_| None).unwrap();
        assert_eq!((s.source, s.key, s.tier.as_str()), (IdentitySource::Jwt, subject_key("jwt:https://id.example:user-9"), "team"));
        // No payload, but a token still there: jwt_authn refused it (a verified one is removed).
        let t = crate::jwt::tests::mint(jsonwebtoken::Algorithm::RS256, "rs256.pem", Some("rsa-1"), &crate::jwt::tests::good_claims());
        let bearer = format!("Bearer {t}");
        let header = |n: &str| (n == "authorization").then(|| bearer.clone());
        let facts = RequestFacts { header: &header, user_field: None, peer_address: Some("10.0.0.1"), now_ms: NOW_S * 1000, claim: &no_claims };
        assert_eq!(cfg.resolve(&facts, &|_| None).unwrap_err().response().status, 401);
    }

    proptest! {
        #[test]
        fn resolve_never_panics(
            token in prop_oneof![any::<String>(), "[a-z.]{0,8}\\.[0-9+]{0,22}\\.[A-Za-z0-9_+/=-]{0,70}"],
            user in any::<String>(),
            api_key in any::<String>(),
            session in any::<String>(),
            tier in any::<String>(),
            xff in prop_oneof![any::<String>(), "[0-9a-f:., \\[\\]%]{0,40}"],
            peer in prop_oneof![any::<String>(), "[0-9a-f:.\\[\\]]{0,40}"],
            now_ms in any::<u64>(),
            hops in 0u32..5,
        ) {
            let sources = format!(
                r#"[{{"signed_header": "x-tollgate-user-token", "secret": "{SECRET_NAME}"}}, {{"user_field": true}},
                    {{"api_key_header": "authorization"}}, {{"session_header": "x-tollgate-session"}},
                    {{"client_ip": {{"trusted_hops": {hops}}}}}]"#
            );
            let cfg = parse(&format!(
                r#"{{"identity": {{"sources": {sources}}}, "tier": {{"default": "free",
                     "api_keys": {{"sha256:{PRO_KEY_SHA256}": "pro"}}}}}}"#
            )).unwrap();
            let r = Req {
                headers: vec![
                    ("x-tollgate-user-token", token),
                    ("authorization", api_key),
                    ("x-tollgate-session", session),
                    ("x-tollgate-tier", tier),
                    (FORWARDED_FOR, xff),
                ],
                user: Some(user),
                peer: Some(peer),
                now_ms,
            };
            if let Ok(s) = resolve(&cfg, &r) {
                prop_assert!(s.key.starts_with("tg1:q:"));
                prop_assert!(tier_names().contains(&s.tier));
            }
        }
    }
}
