//! Identity tokens for the `jwt` source tests, minted with a real JWT library (`jsonwebtoken`)
//! from the test keys in core/fixtures/jwt (see its SOURCES.md), as an identity provider would —
//! and the bad ones an attacker would send.

use base64::Engine as _;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use crate::proc::workspace_root;

/// The issuer and audience the tests' policies expect.
pub const ISSUER: &str = "https://id.tollgate.test/";
pub const AUDIENCE: &str = "tollgate-tests";

fn fixture(name: &str) -> Vec<u8> {
    let path = workspace_root().join("core/fixtures/jwt").join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The JWKS of the test keys (`rsa-1`, `ec-1`, and keys a verifier must skip).
pub fn jwks() -> Value {
    serde_json::from_slice(&fixture("jwks.json")).expect("jwks.json")
}

/// Claims of a good token for `sub` in `tier`, valid for ten minutes from `now_s`.
pub fn claims(sub: &str, tier: &str, now_s: u64) -> Value {
    json!({ "iss": ISSUER, "aud": AUDIENCE, "sub": sub, "iat": now_s, "nbf": now_s - 5, "exp": now_s + 600, "plan": { "tier": tier } })
}

/// `claims` signed with RS256 by `rsa-1` (or, `stranger`, by a key the JWKS does not have).
pub fn rs256(claims: &Value, stranger: bool) -> String {
    let key = EncodingKey::from_rsa_pem(&fixture(if stranger { "rs256-stranger.pem" } else { "rs256.pem" })).expect("RSA key");
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("rsa-1".to_owned());
    encode(&header, claims, &key).expect("sign")
}

/// `claims` signed with ES256 by `ec-1`.
pub fn es256(claims: &Value) -> String {
    let key = EncodingKey::from_ec_pem(&fixture("es256.pem")).expect("EC key");
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("ec-1".to_owned());
    encode(&header, claims, &key).expect("sign")
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// An unsigned token (`alg: none`).
pub fn alg_none(claims: &Value) -> String {
    let header = b64(&serde_json::to_vec(&json!({"alg": "none", "typ": "JWT", "kid": "rsa-1"})).unwrap());
    format!("{header}.{}.", b64(&serde_json::to_vec(claims).unwrap()))
}

/// HS256 with the RSA public key (the JWK's JSON) as the HMAC secret: what a verifier that
/// trusted the header's `alg` would accept (key confusion).
pub fn key_confusion(claims: &Value) -> String {
    let secret = jwks()["keys"][0].to_string();
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("rsa-1".to_owned());
    encode(&header, claims, &EncodingKey::from_secret(secret.as_bytes()).expect("HMAC key")).expect("sign")
}
