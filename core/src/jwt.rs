//! JSON Web Tokens as an identity source: a JWKS parsed once, when the policy loads, and
//! compact-serialised JWS tokens verified against it (RFC 7515, RFC 7519).
//!
//! What is accepted, and nothing else:
//! - `RS256` (RSASSA-PKCS1-v1_5 with SHA-256, keys of at least 2048 bits) and `ES256` (ECDSA
//!   on P-256 with SHA-256, the 64-byte `r‖s` form);
//! - the key decides the algorithm: a token is checked only against keys of its `alg`'s type, so
//!   `none`, the `HS*` family (an RSA public key used as an HMAC secret — key confusion) and any
//!   other algorithm are refused before a signature is looked at; keys of other types (`oct`,
//!   other curves) or for encryption (`use: enc`) are never loaded;
//! - the header's `kid` picks the key when present (an unknown `kid` is refused); without one,
//!   every key of the algorithm's type is tried;
//! - a header with `crit` is refused (no extension is understood);
//! - `exp` is required, `nbf` honoured, both with the source's clock skew; `iss` must equal the
//!   configured issuer and `aud` (a string or a list) must contain one of the configured
//!   audiences.
//!
//! Nothing here reads a clock or a random number: the host gives `now`.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use p256::ecdsa::{Signature as EcSignature, VerifyingKey as EcKey};
use rsa::signature::Verifier as _;
use rsa::{pkcs1v15, BoxedUint};
use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::Sha256;

/// Why a token was refused (see the module docs). The client sees only a generic message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not three base64url parts of JSON, or a `crit` header.
    Malformed,
    /// `alg` is none of the accepted ones, or no key of its type is configured.
    Algorithm,
    /// The header names a `kid` no configured key has.
    UnknownKey,
    /// The signature does not verify.
    Signature,
    /// `exp` (plus the skew) has passed, or is missing.
    Expired,
    /// `nbf` (less the skew) is still ahead.
    NotYetValid,
    /// `iss` is not the configured issuer.
    Issuer,
    /// `aud` names none of the configured audiences.
    Audience,
}

enum Key {
    Rs256(pkcs1v15::VerifyingKey<Sha256>),
    Es256(EcKey),
}

/// The keys of a JWKS that can verify tokens (module docs).
pub struct KeySet {
    keys: Vec<(Option<String>, Key)>,
    /// The JWKS as written, so that two policies compare equal when their keys do.
    source: String,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kids: Vec<&str> = self.keys.iter().map(|(k, _)| k.as_deref().unwrap_or("(no kid)")).collect();
        f.debug_struct("KeySet").field("kids", &kids).finish()
    }
}

impl PartialEq for KeySet {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Eq for KeySet {}

#[derive(Deserialize)]
struct RawJwks {
    keys: Vec<RawJwk>,
}

#[derive(Deserialize)]
struct RawJwk {
    kty: String,
    kid: Option<String>,
    alg: Option<String>,
    #[serde(rename = "use")]
    use_: Option<String>,
    n: Option<String>,
    e: Option<String>,
    crv: Option<String>,
    x: Option<String>,
    y: Option<String>,
}

fn b64(s: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')).ok()
}

impl KeySet {
    /// Loads the signing keys of a JWKS (`{"keys": [...]}`). Keys that cannot verify an
    /// accepted algorithm are skipped; `Err` when the document is not a JWKS or no key is left.
    pub fn parse(jwks: &Value) -> Result<KeySet, String> {
        let raw: RawJwks = serde_json::from_value(jwks.clone()).map_err(|e| format!("not a JWKS ({{\"keys\": [...]}}): {e}"))?;
        let mut keys = Vec::new();
        for k in raw.keys {
            if k.use_.as_deref().is_some_and(|u| u != "sig") {
                continue;
            }
            let key = match (k.kty.as_str(), k.alg.as_deref()) {
                ("RSA", None | Some("RS256")) => {
                    let (Some(n), Some(e)) = (k.n.as_deref().and_then(b64), k.e.as_deref().and_then(b64)) else { continue };
                    let n_bytes = n.iter().skip_while(|b| **b == 0).count();
                    if n_bytes < 256 {
                        continue; // below 2048 bits
                    }
                    let Ok(public) = rsa::PublicKey::new(BoxedUint::from_be_slice_vartime(&n), BoxedUint::from_be_slice_vartime(&e)) else {
                        continue;
                    };
                    Key::Rs256(pkcs1v15::VerifyingKey::new(public))
                }
                ("EC", None | Some("ES256")) if k.crv.as_deref() == Some("P-256") => {
                    let (Some(x), Some(y)) = (k.x.as_deref().and_then(b64), k.y.as_deref().and_then(b64)) else { continue };
                    if x.len() != 32 || y.len() != 32 {
                        continue;
                    }
                    let mut sec1 = [4u8; 65];
                    sec1[1..33].copy_from_slice(&x);
                    sec1[33..].copy_from_slice(&y);
                    // Refuses points off the curve.
                    let Ok(key) = EcKey::from_sec1_bytes(&sec1) else { continue };
                    Key::Es256(key)
                }
                _ => continue,
            };
            keys.push((k.kid, key));
        }
        if keys.is_empty() {
            return Err("no RS256 (RSA, 2048 bits or more) or ES256 (EC P-256) signing key".to_owned());
        }
        Ok(KeySet { keys, source: jwks.to_string() })
    }

    /// The JWKS as written (compact JSON).
    pub fn json(&self) -> &str {
        &self.source
    }

    /// How many keys were loaded.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key was loaded (never, for a parsed set).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// What a token must say besides its signature.
pub struct Expect<'a> {
    /// `iss`.
    pub issuer: &'a str,
    /// `aud` must contain one of these.
    pub audiences: &'a [String],
    /// Seconds `exp` and `nbf` may be off by.
    pub skew_seconds: u64,
    /// Unix seconds.
    pub now: u64,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    kid: Option<String>,
    crit: Option<Value>,
}

/// Verifies `token` and returns its claims.
pub fn verify(keys: &KeySet, token: &str, expect: &Expect<'_>) -> Result<Map<String, Value>, Refusal> {
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(Refusal::Malformed);
    };
    let header: Header = b64(h).and_then(|b| serde_json::from_slice(&b).ok()).ok_or(Refusal::Malformed)?;
    if header.crit.is_some() {
        return Err(Refusal::Malformed);
    }
    let signature = b64(s).ok_or(Refusal::Malformed)?;
    let signed = &token.as_bytes()[..h.len() + 1 + c.len()];
    let candidates: Vec<&Key> = match &header.kid {
        Some(kid) => {
            let found: Vec<&Key> = keys.keys.iter().filter(|(k, _)| k.as_deref() == Some(kid.as_str())).map(|(_, key)| key).collect();
            if found.is_empty() {
                return Err(Refusal::UnknownKey);
            }
            found
        }
        None => keys.keys.iter().map(|(_, key)| key).collect(),
    };
    let mut tried = false;
    let mut valid = false;
    for key in candidates {
        let ok = match (header.alg.as_str(), key) {
            ("RS256", Key::Rs256(k)) => pkcs1v15::Signature::try_from(signature.as_slice()).is_ok_and(|sig| k.verify(signed, &sig).is_ok()),
            ("ES256", Key::Es256(k)) => EcSignature::from_slice(&signature).is_ok_and(|sig| k.verify(signed, &sig).is_ok()),
            _ => continue,
        };
        tried = true;
        if ok {
            valid = true;
            break;
        }
    }
    if !tried {
        return Err(Refusal::Algorithm);
    }
    if !valid {
        return Err(Refusal::Signature);
    }
    let claims: Map<String, Value> = b64(c).and_then(|b| serde_json::from_slice(&b).ok()).ok_or(Refusal::Malformed)?;
    let time = |name: &str| claims.get(name).and_then(Value::as_f64).filter(|t| t.is_finite() && *t >= 0.0).map(|t| t as u64);
    let exp = time("exp").ok_or(Refusal::Expired)?;
    if expect.now > exp.saturating_add(expect.skew_seconds) {
        return Err(Refusal::Expired);
    }
    if claims.contains_key("nbf") {
        let nbf = time("nbf").ok_or(Refusal::NotYetValid)?;
        if nbf > expect.now.saturating_add(expect.skew_seconds) {
            return Err(Refusal::NotYetValid);
        }
    }
    if claims.get("iss").and_then(Value::as_str) != Some(expect.issuer) {
        return Err(Refusal::Issuer);
    }
    let audience_ok = match claims.get("aud") {
        Some(Value::String(a)) => expect.audiences.iter().any(|e| e == a),
        Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).any(|a| expect.audiences.iter().any(|e| e == a)),
        _ => false,
    };
    if !audience_ok {
        return Err(Refusal::Audience);
    }
    Ok(claims)
}

/// A claim by path (`["sub"]`, `["app_metadata", "tier"]`), as text: a string as it is, a whole
/// number in decimal; anything else (objects, lists, booleans, fractions) is no value.
pub fn claim(claims: &Map<String, Value>, path: &[String]) -> Option<String> {
    let (first, rest) = path.split_first()?;
    let mut v = claims.get(first)?;
    for part in rest {
        v = v.get(part)?;
    }
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) if n.is_u64() || n.is_i64() => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header as JwtHeader};
    use serde_json::json;

    const NOW: u64 = 1_767_225_600;

    pub(crate) fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!("{}/fixtures/jwt/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    }

    pub(crate) fn jwks() -> Value {
        serde_json::from_slice(&fixture("jwks.json")).unwrap()
    }

    /// A token signed by a real JWT library with one of the fixture keys.
    pub(crate) fn mint(alg: Algorithm, key_file: &str, kid: Option<&str>, claims: &Value) -> String {
        let pem = fixture(key_file);
        let key = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem).unwrap(),
            Algorithm::ES256 => EncodingKey::from_ec_pem(&pem).unwrap(),
            other => panic!("{other:?}"),
        };
        let mut header = JwtHeader::new(alg);
        header.kid = kid.map(str::to_owned);
        encode(&header, claims, &key).unwrap()
    }

    pub(crate) fn good_claims() -> Value {
        json!({"iss": "https://id.example", "aud": "tollgate", "sub": "user-1", "exp": NOW + 600, "nbf": NOW - 5, "plan": {"tier": "pro"}})
    }

    fn expect(now: u64) -> Expect<'static> {
        static AUD: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
        Expect { issuer: "https://id.example", audiences: AUD.get_or_init(|| vec!["other".to_owned(), "tollgate".to_owned()]), skew_seconds: 60, now }
    }

    fn check(token: &str) -> Result<Map<String, Value>, Refusal> {
        verify(&KeySet::parse(&jwks()).unwrap(), token, &expect(NOW))
    }

    #[test]
    fn only_usable_signing_keys_are_loaded() {
        let set = KeySet::parse(&jwks()).unwrap();
        assert_eq!(set.len(), 2, "{set:?}: rsa-1 and ec-1; not the 1024-bit key, the oct key or the enc key");
        assert!(KeySet::parse(&json!({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]})).is_err());
        assert!(KeySet::parse(&json!({"nope": []})).is_err());
    }

    #[test]
    fn rs256_and_es256_tokens_verify_and_give_their_claims() {
        for (alg, file, kid) in [(Algorithm::RS256, "rs256.pem", Some("rsa-1")), (Algorithm::ES256, "es256.pem", Some("ec-1")), (Algorithm::ES256, "es256.pem", None)] {
            let claims = check(&mint(alg, file, kid, &good_claims())).unwrap_or_else(|e| panic!("{alg:?} {kid:?}: {e:?}"));
            assert_eq!(claim(&claims, &["sub".to_owned()]).as_deref(), Some("user-1"));
            assert_eq!(claim(&claims, &["plan".to_owned(), "tier".to_owned()]).as_deref(), Some("pro"));
            assert_eq!(claim(&claims, &["plan".to_owned()]), None, "an object is no value");
        }
        let listed = json!({"iss": "https://id.example", "aud": ["x", "tollgate"], "sub": 42, "exp": NOW});
        let claims = check(&mint(Algorithm::RS256, "rs256.pem", Some("rsa-1"), &listed)).unwrap();
        assert_eq!(claim(&claims, &["sub".to_owned()]).as_deref(), Some("42"));
    }

    #[test]
    fn bad_tokens_are_refused_for_the_right_reason() {
        let mut c = good_claims();
        let rs = |c: &Value| mint(Algorithm::RS256, "rs256.pem", Some("rsa-1"), c);
        c["exp"] = json!(NOW - 61);
        assert_eq!(check(&rs(&c)), Err(Refusal::Expired));
        c["exp"] = json!(NOW - 59);
        assert!(check(&rs(&c)).is_ok(), "within the skew");
        c = good_claims();
        c.as_object_mut().unwrap().remove("exp");
        assert_eq!(check(&rs(&c)), Err(Refusal::Expired), "exp is required");
        c = good_claims();
        c["nbf"] = json!(NOW + 120);
        assert_eq!(check(&rs(&c)), Err(Refusal::NotYetValid));
        c = good_claims();
        c["iss"] = json!("https://evil.example");
        assert_eq!(check(&rs(&c)), Err(Refusal::Issuer));
        c = good_claims();
        c["aud"] = json!("someone-else");
        assert_eq!(check(&rs(&c)), Err(Refusal::Audience));
        c["aud"] = json!(["a", "b"]);
        assert_eq!(check(&rs(&c)), Err(Refusal::Audience));
        // A key that is not in the JWKS, under a kid that is, or under none.
        assert_eq!(check(&mint(Algorithm::RS256, "rs256-stranger.pem", Some("rsa-1"), &good_claims())), Err(Refusal::Signature));
        assert_eq!(check(&mint(Algorithm::RS256, "rs256-stranger.pem", None, &good_claims())), Err(Refusal::Signature));
        assert_eq!(check(&mint(Algorithm::RS256, "rs256.pem", Some("nope"), &good_claims())), Err(Refusal::UnknownKey));
        assert_eq!(check(&mint(Algorithm::RS256, "rs256.pem", Some("rsa-enc"), &good_claims())), Err(Refusal::UnknownKey));
        // The EC key named for an RSA token, and the other way round.
        assert_eq!(check(&mint(Algorithm::RS256, "rs256.pem", Some("ec-1"), &good_claims())), Err(Refusal::Algorithm));
        assert_eq!(check(&mint(Algorithm::ES256, "es256.pem", Some("rsa-1"), &good_claims())), Err(Refusal::Algorithm));
        // A tampered payload.
        let t = rs(&good_claims());
        let parts: Vec<&str> = t.split('.').collect();
        let forged = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&json!({"iss": "https://id.example", "aud": "tollgate", "sub": "admin", "exp": NOW + 600})).unwrap());
        assert_eq!(check(&format!("{}.{forged}.{}", parts[0], parts[2])), Err(Refusal::Signature));
        for junk in ["", "a.b", "a.b.c.d", "...", "x.y.z", &format!("{}.{}.", parts[0], parts[1])] {
            assert!(check(junk).is_err(), "{junk:?}");
        }
    }

    /// `alg: none`, and HS256 signed with the RSA public key's bytes as the HMAC secret (key
    /// confusion: a verifier trusting the header's alg would accept it).
    #[test]
    fn none_and_key_confusion_are_refused() {
        let header = |alg: &str, kid: &str| URL_SAFE_NO_PAD.encode(serde_json::to_vec(&json!({"alg": alg, "typ": "JWT", "kid": kid})).unwrap());
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&good_claims()).unwrap());
        for token in [format!("{}.{body}.", header("none", "rsa-1")), format!("{}.{body}", header("none", "rsa-1"))] {
            assert!(matches!(check(&token), Err(Refusal::Algorithm | Refusal::Malformed)), "{token}");
        }
        // What an attacker signs with: the public key as PEM and as the JWK's raw modulus.
        use hmac::{Hmac, KeyInit, Mac};
        let jwk = &jwks()["keys"][0];
        let public_pem = {
            let text = String::from_utf8(fixture("rs256.pem")).unwrap();
            text.into_bytes()
        };
        let modulus = b64(jwk["n"].as_str().unwrap()).unwrap();
        for secret in [public_pem, modulus, jwk.to_string().into_bytes()] {
            let signing_input = format!("{}.{body}", header("HS256", "rsa-1"));
            let mut mac = Hmac::<Sha256>::new_from_slice(&secret).unwrap();
            mac.update(signing_input.as_bytes());
            let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
            assert_eq!(check(&format!("{signing_input}.{sig}")), Err(Refusal::Algorithm));
        }
        let crit = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&json!({"alg": "RS256", "kid": "rsa-1", "crit": ["exp"]})).unwrap());
        assert_eq!(check(&format!("{crit}.{body}.AAAA")), Err(Refusal::Malformed));
    }
}
