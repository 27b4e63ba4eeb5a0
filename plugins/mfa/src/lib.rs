//! MFA strength: verifies the caller's OIDC ID token and says how, and how
//! long ago, the caller authenticated.
//!
//! The token (compact JWS in `context.<token_field>`) is verified against
//! the configured keys (JWK form: EdDSA on Ed25519, ES256 on P-256, RS256),
//! then `exp`, `nbf`, `iss` and `aud` are checked, with `leeway_seconds` of
//! clock skew.
//!
//! Attributes: `verified`, `present` (a second factor was used: `amr`
//! contains `mfa`, or two methods or more), `methods` (`amr`), `acr`,
//! `age_seconds` (since `auth_time`, else `iat`) and `hardware` (a method of
//! `hardware_methods`, by default `hwk` and `sc`, RFC 8176). A token that
//! does not verify proves nothing: `verified` and `present` are false and
//! `age_seconds` is as large as it can be, plus a `problem`.
//!
//! Configuration:
//! ```json
//! { "issuer": "https://idp.agency.example", "audience": "vigie",
//!   "keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "k1", "x": "..."},
//!            {"kty": "EC", "crv": "P-256", "kid": "k2", "x": "...", "y": "..."},
//!            {"kty": "RSA", "kid": "k3", "n": "...", "e": "AQAB"}] }
//! ```
#![cfg_attr(target_arch = "wasm32", no_std)]

extern crate alloc;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use serde::Deserialize;
use vigie_plugin::{json, jws, log, Outcome, Request, Value};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    issuer: String,
    /// The audience this sidecar's callers' tokens must carry.
    audience: String,
    keys: Vec<Jwk>,
    #[serde(default = "token_field")]
    token_field: String,
    #[serde(default = "sixty")]
    leeway_seconds: i64,
    #[serde(default = "hardware")]
    hardware_methods: Vec<String>,
    /// A decision using these attributes is cached at most this long (the
    /// age grows). Default 30.
    #[serde(default = "thirty")]
    max_ttl_seconds: u64,
}

#[derive(Debug, Deserialize)]
struct Jwk {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
}

fn token_field() -> String {
    "id_token".into()
}
fn sixty() -> i64 {
    60
}
fn thirty() -> u64 {
    30
}
fn hardware() -> Vec<String> {
    alloc::vec!["hwk".into(), "sc".into()]
}

/// Checks `signature` over `signed` with `key`, for the token's `alg`.
/// `Err` means the key itself is unusable (a configuration fault).
fn verify(alg: &str, key: &Jwk, signed: &[u8], signature: &[u8]) -> Result<bool, String> {
    let field = |v: &Option<String>, name: &str| -> Result<Vec<u8>, String> {
        jws::base64url(
            v.as_deref()
                .ok_or_else(|| format!("a {} key has no `{name}`", key.kty))?,
        )
    };
    match (alg, key.kty.as_str(), key.crv.as_deref()) {
        ("EdDSA", "OKP", Some("Ed25519")) => {
            let x: [u8; 32] = field(&key.x, "x")?
                .try_into()
                .map_err(|_| String::from("an Ed25519 `x` is 32 bytes"))?;
            let key = ed25519_dalek::VerifyingKey::from_bytes(&x).map_err(|e| format!("{e}"))?;
            let Ok(sig) = ed25519_dalek::Signature::from_slice(signature) else {
                return Ok(false);
            };
            Ok(key.verify_strict(signed, &sig).is_ok())
        }
        ("ES256", "EC", Some("P-256")) => {
            use p256::ecdsa::signature::Verifier;
            let (x, y) = (field(&key.x, "x")?, field(&key.y, "y")?);
            if x.len() != 32 || y.len() != 32 {
                return Err("P-256 coordinates are 32 bytes".into());
            }
            let point = p256::EncodedPoint::from_affine_coordinates(
                p256::FieldBytes::from_slice(&x),
                p256::FieldBytes::from_slice(&y),
                false,
            );
            let key = p256::ecdsa::VerifyingKey::from_encoded_point(&point)
                .map_err(|_| String::from("not a P-256 point"))?;
            let Ok(sig) = p256::ecdsa::Signature::from_slice(signature) else {
                return Ok(false);
            };
            Ok(key.verify(signed, &sig).is_ok())
        }
        ("RS256", "RSA", _) => {
            use rsa::signature::Verifier;
            let n = rsa::BigUint::from_bytes_be(&field(&key.n, "n")?);
            let e = rsa::BigUint::from_bytes_be(&field(&key.e, "e")?);
            let key = rsa::RsaPublicKey::new(n, e).map_err(|e| format!("bad RSA key: {e}"))?;
            if rsa::traits::PublicKeyParts::size(&key) < 256 {
                return Err("RSA keys under 2048 bits are refused".into());
            }
            let key = rsa::pkcs1v15::VerifyingKey::<sha2::Sha256>::new(key);
            let Ok(sig) = rsa::pkcs1v15::Signature::try_from(signature) else {
                return Ok(false);
            };
            Ok(key.verify(signed, &sig).is_ok())
        }
        _ => Ok(false),
    }
}

fn unproven(problem: &str) -> Outcome {
    Outcome::new(json!({
        "verified": false, "present": false, "methods": [], "acr": "",
        "age_seconds": i64::MAX, "hardware": false, "problem": problem,
    }))
}

fn audience_matches(aud: Option<&Value>, expected: &str) -> bool {
    match aud {
        Some(Value::String(a)) => a == expected,
        Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(expected)),
        _ => false,
    }
}

pub fn check(request: &Request, config: &Config) -> Result<Outcome, String> {
    let Some(text) = request.context_str(&config.token_field) else {
        return Ok(unproven("no token"));
    };
    let token = match jws::parse(text) {
        Ok(t) => t,
        Err(e) => return Ok(unproven(&format!("malformed token: {e}"))),
    };
    let alg = token.alg();
    if !matches!(alg, "EdDSA" | "ES256" | "RS256") {
        return Ok(unproven(&format!("algorithm `{alg}` is not accepted")));
    }
    // The key named by `kid`; without one, any key of the right type.
    let mut verified = false;
    for key in config
        .keys
        .iter()
        .filter(|k| token.kid().is_none() || k.kid.as_deref() == token.kid())
    {
        if verify(alg, key, &token.signed, &token.signature)? {
            verified = true;
            break;
        }
    }
    if !verified {
        log::warn(&format!(
            "ID token for {} does not verify (alg {alg}, kid {})",
            request.principal,
            token.kid().unwrap_or("-")
        ));
        return Ok(unproven("bad signature or unknown key"));
    }
    let now = request.now_unix_seconds();
    let leeway = config.leeway_seconds;
    let Some(exp) = token.number("exp") else {
        return Ok(unproven("no exp claim"));
    };
    if now >= exp + leeway {
        return Ok(unproven("expired"));
    }
    if token.number("nbf").is_some_and(|nbf| now + leeway < nbf) {
        return Ok(unproven("not yet valid"));
    }
    if token.claims.get("iss").and_then(Value::as_str) != Some(config.issuer.as_str()) {
        return Ok(unproven("wrong issuer"));
    }
    if !audience_matches(token.claims.get("aud"), &config.audience) {
        return Ok(unproven("wrong audience"));
    }
    let methods: Vec<String> = token
        .claims
        .get("amr")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    let mut distinct = methods.clone();
    distinct.sort();
    distinct.dedup();
    let present = distinct.iter().any(|m| m == "mfa") || distinct.len() >= 2;
    let hardware = methods
        .iter()
        .any(|m| config.hardware_methods.iter().any(|h| h == m));
    let authenticated = token
        .number("auth_time")
        .or_else(|| token.number("iat"))
        .unwrap_or(now);
    let acr = token
        .claims
        .get("acr")
        .and_then(Value::as_str)
        .unwrap_or("");
    let ttl = ((exp + leeway - now).max(0) as u64).min(config.max_ttl_seconds);
    Ok(Outcome::new(json!({
        "verified": true,
        "present": present,
        "methods": methods,
        "acr": acr,
        "age_seconds": (now - authenticated).max(0),
        "hardware": hardware,
    }))
    .cache_for_ms(ttl * 1000))
}

vigie_plugin::plugin!(check);

#[cfg(test)]
mod tests {
    use super::*;
    use vigie_plugin::Map;

    const NOW: i64 = 1_795_000_000;

    fn b64(bytes: &[u8]) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    fn claims() -> Value {
        json!({"iss": "https://idp", "aud": ["vigie", "other"], "exp": NOW + 300,
               "iat": NOW - 100, "auth_time": NOW - 120, "amr": ["pwd", "hwk"], "acr": "eidas-high"})
    }

    fn token(alg: &str, kid: &str, claims: &Value, sign: impl Fn(&[u8]) -> Vec<u8>) -> String {
        let h = b64(json!({"alg": alg, "kid": kid}).to_string().as_bytes());
        let p = b64(claims.to_string().as_bytes());
        let sig = sign(format!("{h}.{p}").as_bytes());
        format!("{h}.{p}.{}", b64(&sig))
    }

    fn ed_key() -> ed25519_dalek::SigningKey {
        ed25519_dalek::SigningKey::from_bytes(&[3u8; 32])
    }

    fn es_key() -> p256::ecdsa::SigningKey {
        use p256::pkcs8::DecodePrivateKey;
        let pem = include_str!("../../../tests/fixtures/keys/idp-es256.pem");
        p256::ecdsa::SigningKey::from_pkcs8_pem(pem).unwrap()
    }

    fn rs_key() -> rsa::RsaPrivateKey {
        use rsa::pkcs8::DecodePrivateKey;
        let pem = include_str!("../../../tests/fixtures/keys/idp-rs256.pem");
        rsa::RsaPrivateKey::from_pkcs8_pem(pem).unwrap()
    }

    fn config() -> Config {
        use rsa::traits::PublicKeyParts;
        let es = es_key();
        let point = es.verifying_key().to_encoded_point(false);
        let rs = rs_key().to_public_key();
        vigie_plugin::parse(&json!({
            "issuer": "https://idp", "audience": "vigie",
            "keys": [
                {"kty": "OKP", "crv": "Ed25519", "kid": "ed", "x": b64(ed_key().verifying_key().as_bytes())},
                {"kty": "EC", "crv": "P-256", "kid": "es", "x": b64(point.x().unwrap()), "y": b64(point.y().unwrap())},
                {"kty": "RSA", "kid": "rs", "n": b64(&rs.n().to_bytes_be()), "e": b64(&rs.e().to_bytes_be())}
            ]
        }))
        .unwrap()
    }

    fn sign(alg: &str, claims: &Value) -> String {
        match alg {
            "EdDSA" => token(alg, "ed", claims, |m| {
                use ed25519_dalek::Signer;
                ed_key().sign(m).to_bytes().to_vec()
            }),
            "ES256" => token(alg, "es", claims, |m| {
                use p256::ecdsa::signature::Signer;
                let s: p256::ecdsa::Signature = es_key().sign(m);
                s.to_bytes().to_vec()
            }),
            _ => token(alg, "rs", claims, |m| {
                use rsa::signature::{SignatureEncoding, Signer};
                rsa::pkcs1v15::SigningKey::<sha2::Sha256>::new(rs_key())
                    .sign(m)
                    .to_vec()
            }),
        }
    }

    fn run(token: &str) -> Map<String, Value> {
        let req = Request::new("U::\"a\"", "A::\"b\"", "R::\"c\"")
            .with_context(json!({ "id_token": token }))
            .at(NOW * 1000);
        check(&req, &config()).unwrap().attributes
    }

    #[test]
    fn each_algorithm_verifies() {
        for alg in ["EdDSA", "ES256", "RS256"] {
            let a = run(&sign(alg, &claims()));
            assert_eq!(
                Value::Object(a),
                json!({"verified": true, "present": true, "methods": ["pwd", "hwk"],
                       "acr": "eidas-high", "age_seconds": 120, "hardware": true}),
                "{alg}"
            );
        }
    }

    #[test]
    fn forged_tokens_prove_nothing() {
        for alg in ["EdDSA", "ES256", "RS256"] {
            let t = sign(alg, &claims());
            let mut parts: Vec<&str> = t.split('.').collect();
            let mut c = claims();
            c["amr"] = json!(["pwd", "hwk", "sc"]);
            let other = b64(c.to_string().as_bytes());
            parts[1] = &other;
            let a = run(&parts.join("."));
            assert_eq!(
                (a["verified"].clone(), a["present"].clone()),
                (json!(false), json!(false)),
                "{alg}"
            );
        }
        // `alg: none` and an HMAC algorithm are refused outright.
        let none = token("none", "ed", &claims(), |_| Vec::new());
        assert_eq!(run(&none)["problem"], "algorithm `none` is not accepted");
    }

    #[test]
    fn claims_are_checked() {
        let cases = [
            ("exp", json!(NOW - 61), "expired"),
            ("nbf", json!(NOW + 600), "not yet valid"),
            ("iss", json!("https://evil"), "wrong issuer"),
            ("aud", json!("someone-else"), "wrong audience"),
        ];
        for (claim, value, problem) in cases {
            let mut c = claims();
            c[claim] = value;
            assert_eq!(run(&sign("EdDSA", &c))["problem"], problem, "{claim}");
        }
    }

    #[test]
    fn one_factor_is_not_mfa() {
        let mut c = claims();
        c["amr"] = json!(["pwd"]);
        let a = run(&sign("ES256", &c));
        assert_eq!(
            (a["present"].clone(), a["hardware"].clone()),
            (json!(false), json!(false))
        );
        c["amr"] = json!(["mfa"]);
        assert_eq!(run(&sign("ES256", &c))["present"], true);
    }
}
