//! Device posture: verifies the posture token the device manager (MDM)
//! signed for the caller's device, and says whether the device is managed,
//! encrypted and patched.
//!
//! The token is a compact JWS (`alg: EdDSA`, a `kid` naming one of the
//! configured keys) in `context.<token_field>`, with claims:
//! `sub` (device id), `iat` (when the manager attested), `managed`,
//! `disk_encrypted` (booleans), `os_patch_level` (`YYYY-MM-DD`), and
//! optionally `exp`.
//!
//! Attributes: `{"verified", "managed", "encrypted", "patched"}` and, when
//! something is wrong, `problem`. A missing, forged, stale or malformed
//! token is not a fault of the plugin: it is a device that proves nothing,
//! so every flag is false and policies deny.
//!
//! Configuration:
//! ```json
//! { "keys": {"mdm-2026": "<base64url ed25519 public key>"},
//!   "max_age_seconds": 86400, "max_patch_age_days": 90,
//!   "token_field": "device_token" }
//! ```
#![cfg_attr(target_arch = "wasm32", no_std)]

extern crate alloc;

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;

use ed25519_dalek::{Signature, VerifyingKey};
use serde::Deserialize;
use vigie_plugin::{json, jws, log, Outcome, Request};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Key id → ed25519 public key (32 bytes, base64url).
    keys: BTreeMap<String, String>,
    /// An attestation older than this proves nothing. Default one day.
    #[serde(default = "one_day")]
    max_age_seconds: i64,
    /// `patched` when the OS patch level is at most this old. Default 90.
    #[serde(default = "ninety")]
    max_patch_age_days: i64,
    #[serde(default = "token_field")]
    token_field: String,
    /// Clock skew tolerated on `iat`/`exp`. Default 60 s.
    #[serde(default = "sixty")]
    leeway_seconds: i64,
}

fn one_day() -> i64 {
    86_400
}
fn ninety() -> i64 {
    90
}
fn sixty() -> i64 {
    60
}
fn token_field() -> String {
    "device_token".into()
}

/// The answer for a device that proves nothing.
fn unproven(problem: &str) -> Outcome {
    Outcome::new(json!({
        "verified": false, "managed": false, "encrypted": false, "patched": false,
        "problem": problem,
    }))
}

pub fn check(request: &Request, config: &Config) -> Result<Outcome, String> {
    let Some(token) = request.context_str(&config.token_field) else {
        return Ok(unproven("no posture token"));
    };
    let token = match jws::parse(token) {
        Ok(t) => t,
        Err(e) => return Ok(unproven(&format!("malformed token: {e}"))),
    };
    if token.alg() != "EdDSA" {
        return Ok(unproven(&format!(
            "algorithm `{}` is not EdDSA",
            token.alg()
        )));
    }
    let Some(key_text) = token.kid().and_then(|kid| config.keys.get(kid)) else {
        return Ok(unproven("the token's kid names no configured key"));
    };
    let key = jws::base64url(key_text)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
        .and_then(|b| VerifyingKey::from_bytes(&b).ok())
        .ok_or_else(|| {
            format!(
                "keys.{}: not an ed25519 public key",
                token.kid().unwrap_or("")
            )
        })?;
    let Ok(signature) = Signature::from_slice(&token.signature) else {
        return Ok(unproven("the signature is not 64 bytes"));
    };
    if key.verify_strict(&token.signed, &signature).is_err() {
        log::warn(&format!(
            "forged or corrupted posture token for {} (kid {})",
            request.principal,
            token.kid().unwrap_or("")
        ));
        return Ok(unproven("bad signature"));
    }
    let now = request.now_unix_seconds();
    let Some(iat) = token.number("iat") else {
        return Ok(unproven("no iat claim"));
    };
    if iat > now + config.leeway_seconds {
        return Ok(unproven("issued in the future"));
    }
    let mut fresh_until = iat + config.max_age_seconds;
    if let Some(exp) = token.number("exp") {
        fresh_until = fresh_until.min(exp + config.leeway_seconds);
    }
    if now >= fresh_until {
        return Ok(unproven("the attestation is stale"));
    }
    let flag = |claim: &str| token.claims.get(claim).and_then(|v| v.as_bool()) == Some(true);
    let today = now.div_euclid(86_400);
    let patched = token
        .claims
        .get("os_patch_level")
        .and_then(|v| v.as_str())
        .and_then(vigie_plugin::parse_date)
        .is_some_and(|day| today - day <= config.max_patch_age_days);
    // Patched-ness changes at midnight UTC, freshness at `fresh_until`.
    let next_midnight = (today + 1) * 86_400;
    let ttl_seconds = fresh_until.min(next_midnight) - now;
    Ok(Outcome::new(json!({
        "verified": true,
        "managed": flag("managed"),
        "encrypted": flag("disk_encrypted"),
        "patched": patched,
    }))
    .cache_for_ms(ttl_seconds.max(0) as u64 * 1000))
}

vigie_plugin::plugin!(check);

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};
    use vigie_plugin::{Map, Value};

    fn b64(bytes: &[u8]) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    const NOW: i64 = 1_795_000_000; // 2026-11-18

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[7u8; 32])
    }

    fn token(claims: Value, signer: &SigningKey) -> String {
        let h = b64(br#"{"alg":"EdDSA","kid":"mdm"}"#);
        let p = b64(claims.to_string().as_bytes());
        let sig = signer.sign(format!("{h}.{p}").as_bytes());
        format!("{h}.{p}.{}", b64(&sig.to_bytes()))
    }

    fn config() -> Config {
        vigie_plugin::parse(&json!({
            "keys": {"mdm": b64(key().verifying_key().as_bytes())},
            "max_age_seconds": 3600
        }))
        .unwrap()
    }

    fn run(token: &str) -> (Map<String, Value>, Option<u64>) {
        let req = Request::new("U::\"a\"", "A::\"b\"", "R::\"c\"")
            .with_context(json!({ "device_token": token }))
            .at(NOW * 1000);
        let o = check(&req, &config()).unwrap();
        (o.attributes, o.ttl_ms)
    }

    fn good() -> Value {
        json!({"sub": "laptop-1", "iat": NOW - 60, "managed": true, "disk_encrypted": true,
               "os_patch_level": "2026-11-01"})
    }

    #[test]
    fn a_valid_token_proves_the_posture() {
        let (a, ttl) = run(&token(good(), &key()));
        assert_eq!(
            Value::Object(a),
            json!({"verified": true, "managed": true, "encrypted": true, "patched": true})
        );
        assert_eq!(ttl, Some((3600 - 60) * 1000));
    }

    #[test]
    fn a_forged_token_proves_nothing() {
        let other = SigningKey::from_bytes(&[9u8; 32]);
        let (a, _) = run(&token(good(), &other));
        assert_eq!(a["verified"], false);
        assert_eq!(a["managed"], false);
        assert_eq!(a["problem"], "bad signature");
        // A claim changed after signing.
        let t = token(good(), &key());
        let mut parts: alloc::vec::Vec<&str> = t.split('.').collect();
        let forged = b64(json!({"sub": "laptop-1", "iat": NOW - 60, "managed": true, "disk_encrypted": true, "os_patch_level": "2026-11-27"}).to_string().as_bytes());
        parts[1] = &forged;
        assert_eq!(run(&parts.join(".")).0["verified"], false);
    }

    #[test]
    fn stale_and_unpatched() {
        let mut old = good();
        old["iat"] = json!(NOW - 7200);
        assert_eq!(
            run(&token(old, &key())).0["problem"],
            "the attestation is stale"
        );
        let mut unpatched = good();
        unpatched["os_patch_level"] = json!("2026-01-01");
        let (a, _) = run(&token(unpatched, &key()));
        assert_eq!(
            (a["verified"].clone(), a["patched"].clone()),
            (json!(true), json!(false))
        );
        let mut expired = good();
        expired["exp"] = json!(NOW - 120);
        assert_eq!(run(&token(expired, &key())).0["verified"], false);
    }

    #[test]
    fn missing_or_malformed() {
        let req = Request::new("U::\"a\"", "A::\"b\"", "R::\"c\"");
        assert_eq!(
            check(&req, &config()).unwrap().attributes["problem"],
            "no posture token"
        );
        assert_eq!(run("x.y").0["verified"], false);
    }
}
