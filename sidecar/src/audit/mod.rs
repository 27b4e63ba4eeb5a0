//! The decision log, sidecar side: every decision becomes a record, chained
//! by hash, written durably to the outbox before the answer leaves, then
//! shipped in signed batches to the ledger.
//!
//! # Record
//!
//! A record is canonical JSON (see [`crate::canon`]) and is kept, shipped and
//! stored as those exact bytes; nothing re-encodes it before verifying:
//!
//! ```text
//! {"cached":false,"chain":"<chain id>","decision":"Allow","decision_id":"<UUIDv7>",
//!  "errors":[],"kind":"decision","plugins":[],"policy":{"epoch":1,"hash":"<hex>"},
//!  "reasons":["staff-read-department"],"request":{"action":"...","context":{...},
//!  "entities":0,"principal":"...","resource":"..."},"seq":17,"sidecar":"<id>",
//!  "trace_id":null,"ts":"2026-11-28T08:00:00.123456789Z","v":1}
//! ```
//!
//! The first record of every chain has `"kind":"chain_start"` and a `reason`:
//! `new` (a new sidecar) or `outbox_lost` (the sidecar had a key but no
//! outbox: whatever it held is gone, and the ledger flags the reset).
//!
//! # Hashes (RFC 6962 leaves, SHA-256 throughout)
//!
//! `leaf = SHA-256(0x00 || bytes)`,
//! `chain_n = SHA-256("vigie-chain/v1\n" || chain_(n-1) || leaf_n)`, and
//! `chain_(-1)` (before a chain's first record) is 32 zero bytes.

pub mod outbox;
pub mod shipper;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

pub type Hash = [u8; 32];

/// The chain hash before a chain's first record.
pub const GENESIS: Hash = [0; 32];

pub fn leaf_hash(bytes: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(bytes);
    h.finalize().into()
}

pub fn chain_hash(prev: &Hash, leaf: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update(b"vigie-chain/v1\n");
    h.update(prev);
    h.update(leaf);
    h.finalize().into()
}

/// `[audit]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `power` (default: the outbox is fsync'd, by group commit, before the
    /// answer) or `process` (written to the OS before the answer: survives a
    /// crash of the sidecar, not a power loss).
    pub durability: Durability,
    /// Most bytes the outbox holds before it is full. Default 1 GiB.
    pub max_outbox_bytes: u64,
    /// When the outbox is full: `backpressure` (default: wait for the shipper,
    /// up to `full_wait_ms`, then fail closed) or `fail_closed` (deny at once
    /// with reason `audit_unavailable`).
    pub when_full: WhenFull,
    /// How long a decision waits for room in a full outbox. Default 5000.
    pub full_wait_ms: u64,
    /// Context paths replaced by `"<masked>"` in records. Default
    /// `["context.id_token", "context.device_token"]`: bearer tokens do not
    /// belong in an audit trail (the plugins' verdicts on them are recorded).
    pub mask: Vec<String>,
    /// The ledger's base URL (`--ledger`), e.g. `http://127.0.0.1:8290`.
    /// Default none: records stay in the outbox until one is configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ledger: Option<String>,
    /// This sidecar's id (`--sidecar-id`). Default: the host name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sidecar_id: Option<String>,
    /// The sidecar's private key. Default `<data-dir>/sidecar.key`, created
    /// (mode 0600) on first start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<std::path::PathBuf>,
    /// Most records in one shipped batch. Default 1000.
    pub batch_max_records: usize,
    /// Longest a record waits before its batch is sent, in ms. Default 200.
    pub batch_max_delay_ms: u64,
    /// A signed heartbeat is sent after this long without records, in ms. Default 10000.
    pub heartbeat_ms: u64,
    /// Longest pause between two attempts to reach the ledger, in ms. Default 30000.
    pub max_backoff_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            durability: Durability::Power,
            max_outbox_bytes: 1 << 30,
            when_full: WhenFull::Backpressure,
            full_wait_ms: 5000,
            mask: vec!["context.id_token".into(), "context.device_token".into()],
            ledger: None,
            sidecar_id: None,
            key: None,
            batch_max_records: 1000,
            batch_max_delay_ms: 200,
            heartbeat_ms: 10_000,
            max_backoff_ms: 30_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    Power,
    Process,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    Backpressure,
    FailClosed,
}

/// What a request handler knows about a decision; the outbox adds the
/// sidecar id, chain, sequence number and timestamp.
#[derive(Debug, Clone)]
pub struct Draft {
    pub decision_id: String,
    /// The request, as the record writes it.
    pub request: Arc<Asked>,
    pub allow: bool,
    pub reasons: Vec<String>,
    pub errors: Vec<String>,
    pub epoch: u64,
    pub policy_hash: String,
    pub cached: bool,
    /// The caller's (or this decision's) W3C trace id, hex.
    pub trace_id: Option<String>,
    /// What each plugin did ([`crate::plugin::Report::to_json`]).
    pub plugins: Vec<Value>,
}

/// What a record says of its request, encoded once when the decision is
/// drafted: the outbox copies the bytes, a masked secret never waits in its
/// queue, and a body seen again ([`crate::cache::Cache::seen`]) shares them.
#[derive(Debug, PartialEq, Eq)]
pub struct Asked {
    /// Principal, action and resource as Cedar writes them.
    pub texts: [String; 3],
    /// The record's `request` object, canonical: `{"action", "context",
    /// "entities" (how many request-scoped entities came with it),
    /// "principal", "resource"}`, with the context's masked paths replaced
    /// by `"<masked>"`.
    encoded: Box<[u8]>,
}

impl Asked {
    /// `mask`: context paths to mask (`context.id_token`), as configured.
    pub fn new(texts: [String; 3], context: &Value, entities: usize, mask: &[String]) -> Self {
        use crate::canon::{string, uint, write_masked};
        let masks: Vec<&str> = mask
            .iter()
            .map(|m| m.strip_prefix("context.").unwrap_or(m))
            .collect();
        let [principal, action, resource] = &texts;
        let mut out = Vec::with_capacity(256);
        let o = &mut out;
        o.extend_from_slice(b"{\"action\":");
        string(action, o);
        o.extend_from_slice(b",\"context\":");
        write_masked(context, &masks, o);
        o.extend_from_slice(b",\"entities\":");
        uint(entities as u64, o);
        o.extend_from_slice(b",\"principal\":");
        string(principal, o);
        o.extend_from_slice(b",\"resource\":");
        string(resource, o);
        o.push(b'}');
        Asked {
            texts,
            encoded: out.into(),
        }
    }

    pub fn encoded(&self) -> &[u8] {
        &self.encoded
    }
}

/// The fields every record shares.
pub struct Stamp<'a> {
    pub sidecar: &'a str,
    pub chain: &'a str,
    pub seq: u64,
    pub ts: &'a str,
}

impl Draft {
    /// The record's canonical bytes, written field by field in key order
    /// (what [`crate::canon::to_vec`] gives for the same record as a JSON
    /// value, without building one).
    pub fn encode(&self, stamp: &Stamp<'_>) -> Vec<u8> {
        use crate::canon::{string, strings, uint, write};
        let mut out = Vec::with_capacity(512);
        let o = &mut out;
        o.extend_from_slice(b"{\"cached\":");
        o.extend_from_slice(if self.cached { b"true" } else { b"false" });
        o.extend_from_slice(b",\"chain\":");
        string(stamp.chain, o);
        o.extend_from_slice(b",\"decision\":");
        o.extend_from_slice(if self.allow {
            b"\"Allow\""
        } else {
            b"\"Deny\""
        });
        o.extend_from_slice(b",\"decision_id\":");
        string(&self.decision_id, o);
        o.extend_from_slice(b",\"errors\":");
        strings(&self.errors, o);
        o.extend_from_slice(b",\"kind\":\"decision\",\"plugins\":[");
        for (i, p) in self.plugins.iter().enumerate() {
            if i > 0 {
                o.push(b',');
            }
            write(p, o);
        }
        o.extend_from_slice(b"],\"policy\":{\"epoch\":");
        uint(self.epoch, o);
        o.extend_from_slice(b",\"hash\":");
        string(&self.policy_hash, o);
        o.extend_from_slice(b"},\"reasons\":");
        strings(&self.reasons, o);
        o.extend_from_slice(b",\"request\":");
        o.extend_from_slice(self.request.encoded());
        o.extend_from_slice(b",\"seq\":");
        uint(stamp.seq, o);
        o.extend_from_slice(b",\"sidecar\":");
        string(stamp.sidecar, o);
        o.extend_from_slice(b",\"trace_id\":");
        match &self.trace_id {
            Some(t) => string(t, o),
            None => o.extend_from_slice(b"null"),
        }
        o.extend_from_slice(b",\"ts\":");
        string(stamp.ts, o);
        o.extend_from_slice(b",\"v\":1}");
        out
    }
}

/// The bytes of a chain's first record.
pub fn chain_start(stamp: &Stamp<'_>, reason: &str) -> Vec<u8> {
    crate::canon::to_vec(&json!({
        "v": 1,
        "kind": "chain_start",
        "sidecar": stamp.sidecar,
        "chain": stamp.chain,
        "seq": stamp.seq,
        "ts": stamp.ts,
        "reason": reason,
    }))
}

/// RFC 3339 UTC with nanoseconds: `2026-11-28T08:00:00.123456789Z`.
pub fn rfc3339_nanos(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, day) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        d.subsec_nanos()
    )
}

/// Milliseconds since the Unix epoch of an RFC 3339 time
/// (`2026-07-14T10:00:00+02:00`, `2026-07-14T08:00:00.5Z`).
pub fn parse_rfc3339_ms(text: &str) -> Result<i64, String> {
    let bad = || format!("`{text}` is not an RFC 3339 time (2026-07-14T10:00:00+02:00)");
    let b = text.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| -> Result<i64, String> {
        text.get(r).and_then(|s| s.parse().ok()).ok_or_else(bad)
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, s) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = &text[19..];
    let mut ms = 0;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        let padded = format!("{:0<3}", &frac[..digits.min(3)]);
        ms = padded.parse::<i64>().map_err(|_| bad())?;
        rest = &frac[digits..];
    }
    let offset_min = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 && matches!(&rest[..1], "+" | "-") => {
            let sign = if rest.starts_with('-') { -1 } else { 1 };
            let oh: i64 = rest[1..3].parse().map_err(|_| bad())?;
            let om: i64 = rest[4..6].parse().map_err(|_| bad())?;
            sign * (oh * 60 + om)
        }
        _ => return Err(bad()),
    };
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return Err(bad());
    }
    let days = days_from_civil(y, mo as u32, d as u32);
    Ok(((days * 86_400 + h * 3600 + mi * 60 + s - offset_min * 60) * 1000) + ms)
}

fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (H. Hinnant's algorithm).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rfc3339_parses_offsets() {
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(
            parse_rfc3339_ms("2026-07-14T10:00:00+02:00"),
            parse_rfc3339_ms("2026-07-14T08:00:00Z")
        );
        assert_eq!(
            parse_rfc3339_ms("2026-11-28T00:00:00.25Z"),
            Ok(1_795_824_000_250)
        );
        assert!(parse_rfc3339_ms("2026-11-28").is_err());
        assert!(parse_rfc3339_ms("2026-13-28T00:00:00Z").is_err());
    }

    #[test]
    fn timestamps_are_rfc3339_with_nanoseconds() {
        let t = UNIX_EPOCH + Duration::new(1_795_852_800, 5);
        assert_eq!(rfc3339_nanos(t), "2026-11-28T08:00:00.000000005Z");
        assert_eq!(
            rfc3339_nanos(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000000000Z"
        );
    }

    #[test]
    fn chain_follows_the_documented_formula() {
        let leaf = leaf_hash(b"{}");
        let mut h = Sha256::new();
        h.update([0u8]);
        h.update(b"{}");
        assert_eq!(leaf, <Hash>::from(h.finalize()));
        let c = chain_hash(&GENESIS, &leaf);
        let mut h = Sha256::new();
        h.update(b"vigie-chain/v1\n");
        h.update([0u8; 32]);
        h.update(leaf);
        assert_eq!(c, <Hash>::from(h.finalize()));
    }

    /// Replaces the value at `context.a.b` (the leading `context.` optional).
    fn mask_path(context: &mut Value, path: &str) {
        let path = path.strip_prefix("context.").unwrap_or(path);
        let mut parts = path.split('.').peekable();
        let mut at = context;
        while let Some(part) = parts.next() {
            let Some(obj) = at.as_object_mut() else {
                return;
            };
            if parts.peek().is_none() {
                if let Some(v) = obj.get_mut(part) {
                    *v = Value::String("<masked>".into());
                }
                return;
            }
            match obj.get_mut(part) {
                Some(next) => at = next,
                None => return,
            }
        }
    }

    /// The record as a JSON value, encoded by `canon`: what `encode` must
    /// give, byte for byte.
    fn reference(d: &Draft, plain: &Plain, stamp: &Stamp<'_>, mask: &[String]) -> Vec<u8> {
        let (texts, context, entities) = plain;
        let [principal, action, resource] = texts;
        let mut context = context.clone();
        for path in mask {
            mask_path(&mut context, path);
        }
        crate::canon::to_vec(&json!({
            "v": 1,
            "kind": "decision",
            "sidecar": stamp.sidecar,
            "chain": stamp.chain,
            "seq": stamp.seq,
            "ts": stamp.ts,
            "decision_id": d.decision_id,
            "request": {
                "principal": principal,
                "action": action,
                "resource": resource,
                "context": context,
                "entities": entities,
            },
            "decision": if d.allow { "Allow" } else { "Deny" },
            "reasons": d.reasons,
            "errors": d.errors,
            "plugins": d.plugins,
            "policy": {"epoch": d.epoch, "hash": d.policy_hash},
            "trace_id": d.trace_id,
            "cached": d.cached,
        }))
    }

    /// A request's texts, context and entity count, as plain values.
    type Plain = ([String; 3], Value, usize);

    fn asked(a: &Plain, mask: &[String]) -> Arc<Asked> {
        Arc::new(Asked::new(a.0.clone(), &a.1, a.2, mask))
    }

    #[test]
    fn the_encoder_gives_the_canonical_bytes() {
        let texts = [
            "Agency::User::\"é\\n\u{1}\"".to_owned(),
            "Agency::Action::\"read\"".to_owned(),
            "R".to_owned(),
        ];
        let context = json!({"z": 1, "a": {"y": [true, null, "x"], "b": -3}, "id_token": "t",
                             "mfa": {"present": true, "id_token": "keep"}});
        let request = (texts, context, 2);
        let mut d = Draft {
            decision_id: "0193-\"quoted\"".into(),
            request: asked(&request, &[]),
            allow: false,
            reasons: vec!["b".into(), "a\u{7f}".into()],
            errors: vec!["policy0: \"x\"".into()],
            epoch: 12,
            policy_hash: "ab".into(),
            cached: true,
            plugins: vec![
                json!({"name": "mfa", "us": 3, "status": "ok", "attributes": {"z": 1, "a": 2}}),
            ],
            trace_id: Some("0af7651916cd43dd8448eb211c80319c".into()),
        };
        let stamp = Stamp {
            sidecar: "side\tcar",
            chain: "c",
            seq: u64::MAX,
            ts: "2026-11-28T08:00:00.000000005Z",
        };
        let masks = vec!["context.id_token".to_owned(), "context.a.b".to_owned()];
        for mask in [&masks[..], &[]] {
            d.request = asked(&request, mask);
            assert_eq!(
                String::from_utf8(d.encode(&stamp)).unwrap(),
                String::from_utf8(reference(&d, &request, &stamp, mask)).unwrap()
            );
        }
        d.trace_id = None;
        d.plugins.clear();
        let empty = (request.0.clone(), json!({}), 0);
        d.request = asked(&empty, &masks);
        assert_eq!(d.encode(&stamp), reference(&d, &empty, &stamp, &masks));
    }

    #[test]
    fn masked_fields_never_reach_the_record() {
        let d = Draft {
            decision_id: "d".into(),
            request: asked(
                &(
                    ["P".into(), "A".into(), "R".into()],
                    json!({"device": {"token": "secret-token", "managed": true}, "ip": "10.0.0.1"}),
                    0,
                ),
                &["context.device.token".into()],
            ),
            allow: true,
            reasons: vec!["p".into()],
            errors: vec![],
            epoch: 1,
            policy_hash: "h".into(),
            cached: false,
            plugins: Vec::new(),
            trace_id: None,
        };
        let stamp = Stamp {
            sidecar: "s",
            chain: "c",
            seq: 3,
            ts: "t",
        };
        let bytes = d.encode(&stamp);
        let text = String::from_utf8(bytes).unwrap();
        assert!(!text.contains("secret-token"), "{text}");
        assert!(text.contains("\"token\":\"<masked>\""), "{text}");
        assert!(
            text.starts_with("{\"cached\":false,\"chain\":\"c\""),
            "{text}"
        );
    }
}
