//! `vigie verify`: checks a ledger export offline — every record against its
//! chain, every batch note against its sidecar's key, every heartbeat, and
//! the Merkle root against the ledger's signed checkpoint — and names the
//! first record that fails. Also checks one decision's inclusion proof.
//!
//! Trust comes from outside the export: the ledger's public key
//! (`--ledger-key`) and the sidecars' (`--sidecars FILE`, the `[[sidecars]]`
//! format). Without them the keys the export announces are used, and the
//! report says so: that only proves the export is self-consistent.

use std::collections::{BTreeMap, HashMap};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::Value;

use crate::audit::{chain_hash, leaf_hash, Hash, GENESIS};
use crate::ledger::merkle;
use crate::note::{self, PublicKey};

/// Where trust comes from.
#[derive(Debug, Default)]
pub struct Trust {
    pub ledger: Option<PublicKey>,
    pub sidecars: HashMap<String, PublicKey>,
    /// Checkpoints the auditor kept from earlier: the tree must extend each.
    pub earlier: Vec<String>,
}

/// What a successful verification covered.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub records: u64,
    pub tree_size: u64,
    pub sidecars: usize,
    pub batches: usize,
    pub heartbeats: usize,
    pub warnings: Vec<String>,
}

#[derive(Debug)]
struct Rec {
    line: usize,
    index: u64,
    bytes: Vec<u8>,
    prev: Hash,
    chain: Hash,
    sidecar: String,
    chain_id: String,
    seq: u64,
    decision_id: String,
}

impl Rec {
    fn name(&self) -> String {
        let id = if self.decision_id.is_empty() {
            String::new()
        } else {
            format!(", decision {}", self.decision_id)
        };
        format!(
            "record {} (sidecar `{}`, seq {}{id})",
            self.index, self.sidecar, self.seq
        )
    }
}

fn h64(v: &Value) -> Option<Hash> {
    B64.decode(v.as_str()?)
        .ok()
        .and_then(|b| b.as_slice().try_into().ok())
}

fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(' ')))
}

/// Verifies an export (NDJSON text). `Err` names the first failure.
pub fn verify_export(text: &str, trust: &Trust) -> Result<Summary, String> {
    let mut summary = Summary::default();
    let mut records: Vec<Rec> = Vec::new();
    let mut leaves: BTreeMap<u64, Hash> = BTreeMap::new();
    let mut batches = Vec::new();
    let mut heartbeats = Vec::new();
    let mut checkpoint = None;
    let mut ledger_key = trust.ledger.clone();
    let mut announced: HashMap<String, PublicKey> = HashMap::new();
    let mut expected_index = 0u64;

    for (n, line) in text.lines().enumerate() {
        let n = n + 1;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value =
            serde_json::from_str(line).map_err(|e| format!("line {n}: not JSON: {e}"))?;
        match v["type"].as_str() {
            Some("ledger") => {
                if ledger_key.is_none() {
                    let k = v["public_key"]
                        .as_str()
                        .and_then(|k| PublicKey::decode(k).ok());
                    if k.is_some() {
                        summary.warnings.push("the ledger's key was taken from the export itself; pass --ledger-key to pin it".into());
                    }
                    ledger_key = k;
                }
            }
            Some("sidecar") => {
                if let (Some(id), Some(k)) = (
                    v["id"].as_str(),
                    v["public_key"]
                        .as_str()
                        .and_then(|k| PublicKey::decode(k).ok()),
                ) {
                    announced.insert(id.to_owned(), k);
                }
            }
            Some("record") | Some("leaf") => {
                let index = v["index"].as_u64().ok_or(format!("line {n}: no index"))?;
                if index != expected_index {
                    return Err(format!(
                        "line {n}: record {index} is out of place: expected record {expected_index} (records deleted, added or reordered)"
                    ));
                }
                expected_index += 1;
                if v["type"] == "leaf" {
                    leaves.insert(
                        index,
                        h64(&v["leaf"]).ok_or(format!("line {n}: bad leaf hash"))?,
                    );
                    continue;
                }
                let bytes = v["bytes"]
                    .as_str()
                    .and_then(|b| B64.decode(b).ok())
                    .ok_or(format!("line {n}: record {index} has no bytes"))?;
                leaves.insert(index, leaf_hash(&bytes));
                records.push(Rec {
                    line: n,
                    index,
                    prev: h64(&v["prev"]).ok_or(format!("line {n}: bad prev hash"))?,
                    chain: h64(&v["chain"]).ok_or(format!("line {n}: bad chain hash"))?,
                    sidecar: v["sidecar"].as_str().unwrap_or("").to_owned(),
                    chain_id: v["chain_id"].as_str().unwrap_or("").to_owned(),
                    seq: v["seq"].as_u64().unwrap_or(u64::MAX),
                    decision_id: v["decision_id"].as_str().unwrap_or("").to_owned(),
                    bytes,
                });
            }
            Some("batch") => batches.push(v),
            Some("heartbeat") => heartbeats.push(v),
            Some("checkpoint") => checkpoint = v["note"].as_str().map(str::to_owned),
            other => return Err(format!("line {n}: unknown line type {other:?}")),
        }
    }

    let sidecar_key = |id: &str| -> Option<PublicKey> {
        trust
            .sidecars
            .get(id)
            .cloned()
            .or_else(|| announced.get(id).cloned())
    };
    if trust.sidecars.is_empty() && !announced.is_empty() {
        summary.warnings.push(
            "sidecar keys were taken from the export itself; pass --sidecars to pin them".into(),
        );
    }

    // 1. Each record: its own bytes, its place in its chain.
    let mut last: HashMap<(String, String), (u64, Hash)> = HashMap::new();
    for r in &records {
        let rec: Value = serde_json::from_slice(&r.bytes)
            .map_err(|_| format!("{}: its bytes are not JSON", r.name()))?;
        if rec["sidecar"] != r.sidecar.as_str()
            || rec["chain"] != r.chain_id.as_str()
            || rec["seq"] != r.seq
        {
            return Err(format!(
                "{}: its bytes do not match its sidecar, chain and seq (line {})",
                r.name(),
                r.line
            ));
        }
        if chain_hash(&r.prev, &leaf_hash(&r.bytes)) != r.chain {
            return Err(format!(
                "{}: its bytes do not hash to its chain hash: the record was altered (line {})",
                r.name(),
                r.line
            ));
        }
        let key = (r.sidecar.clone(), r.chain_id.clone());
        match last.get(&key) {
            Some((seq, chain)) => {
                if r.seq != seq + 1 {
                    return Err(format!(
                        "{}: follows seq {seq} in its chain: records missing or reordered",
                        r.name()
                    ));
                }
                if r.prev != *chain {
                    return Err(format!(
                        "{}: does not continue the chain of seq {seq}",
                        r.name()
                    ));
                }
            }
            None => {
                if r.seq == 0 && (r.prev != GENESIS || rec["kind"] != "chain_start") {
                    return Err(format!(
                        "{}: a chain must begin with a chain_start record",
                        r.name()
                    ));
                }
            }
        }
        last.insert(key, (r.seq, r.chain));
    }
    summary.records = records.len() as u64;
    summary.sidecars = last
        .keys()
        .map(|(s, _)| s)
        .collect::<std::collections::HashSet<_>>()
        .len();

    // 2. The Merkle tree against the ledger's signed checkpoint.
    let cp = checkpoint.ok_or("the export has no checkpoint")?;
    let ledger_key =
        ledger_key.ok_or("no ledger key to verify the checkpoint (pass --ledger-key)")?;
    let cp_text = ledger_key
        .open(&cp)
        .map_err(|e| format!("checkpoint: {e}"))?;
    let (_, size, root) = note::parse_checkpoint(cp_text).map_err(|e| e.to_string())?;
    if (leaves.len() as u64) < size {
        return Err(format!(
            "record {}: missing; the signed checkpoint covers {size} records but the export has {} (tail truncated)",
            leaves.len(),
            leaves.len()
        ));
    }
    let ordered: Vec<Hash> = leaves.values().take(size as usize).copied().collect();
    if merkle::root(&ordered) != root {
        return Err("the records do not hash to the signed checkpoint's root".into());
    }
    // Consistency: an earlier checkpoint's tree must be a prefix of this one.
    for old in &trust.earlier {
        let old_text = ledger_key
            .open(old)
            .map_err(|e| format!("earlier checkpoint: {e}"))?;
        let (_, old_size, old_root) =
            note::parse_checkpoint(old_text).map_err(|e| e.to_string())?;
        if old_size > size {
            return Err(format!(
                "record {size}: missing; an earlier signed checkpoint covered {old_size} records, this one only {size} (truncated)"
            ));
        }
        if merkle::root(&ordered[..old_size as usize]) != old_root {
            return Err(format!(
                "the first {old_size} records differ from those of the earlier signed checkpoint: the history was rewritten"
            ));
        }
    }
    // 3. Batch notes: signed by the sidecar, and matching the records.
    let by_seq: HashMap<(&str, &str, u64), &Rec> = records
        .iter()
        .map(|r| ((r.sidecar.as_str(), r.chain_id.as_str(), r.seq), r))
        .collect();
    let mut covered: HashMap<(String, String), Vec<(u64, u64)>> = HashMap::new();
    for b in &batches {
        let sidecar = b["sidecar"].as_str().unwrap_or("");
        let note_text = b["note"].as_str().unwrap_or("");
        let key = sidecar_key(sidecar).ok_or(format!(
            "batch of sidecar `{sidecar}`: no key to verify it (pass --sidecars)"
        ))?;
        let text = key.open(note_text).map_err(|e| {
            format!(
                "batch of sidecar `{sidecar}` (seq {}..={}): {e}",
                b["first"], b["last"]
            )
        })?;
        let chain_id = field(text, "chain").unwrap_or("");
        let first: u64 = field(text, "first")
            .and_then(|f| f.parse().ok())
            .unwrap_or(0);
        let last_seq: u64 = field(text, "last")
            .and_then(|f| f.parse().ok())
            .unwrap_or(0);
        let prev = field(text, "prev").and_then(|p| B64.decode(p).ok());
        let head = field(text, "head").and_then(|p| B64.decode(p).ok());
        if let Some(r) = by_seq.get(&(sidecar, chain_id, first)) {
            if prev.as_deref() != Some(&r.prev[..]) {
                return Err(format!(
                    "{}: does not match the signed batch that brought it",
                    r.name()
                ));
            }
        }
        match by_seq.get(&(sidecar, chain_id, last_seq)) {
            Some(r) if head.as_deref() != Some(&r.chain[..]) => {
                return Err(format!(
                    "{}: does not match the signed batch that brought it",
                    r.name()
                ));
            }
            None if trust_full(&leaves, &records) => {
                let missing = (first..=last_seq)
                    .find(|s| !by_seq.contains_key(&(sidecar, chain_id, *s)))
                    .unwrap_or(last_seq);
                return Err(format!(
                    "sidecar `{sidecar}` seq {missing}: signed in a batch but missing from the export (tail truncated?)"
                ));
            }
            _ => {}
        }
        covered
            .entry((sidecar.to_owned(), chain_id.to_owned()))
            .or_default()
            .push((first, last_seq));
        summary.batches += 1;
    }
    for r in &records {
        let spans = covered.get(&(r.sidecar.clone(), r.chain_id.clone()));
        if !spans.is_some_and(|s| s.iter().any(|(a, b)| (*a..=*b).contains(&r.seq))) {
            return Err(format!("{}: no signed batch covers it", r.name()));
        }
    }

    // 4. Heartbeats: what each sidecar last said it had sent.
    for hb in &heartbeats {
        let sidecar = hb["sidecar"].as_str().unwrap_or("");
        let Some(key) = sidecar_key(sidecar) else {
            continue;
        };
        let text = key
            .open(hb["note"].as_str().unwrap_or(""))
            .map_err(|e| format!("heartbeat of sidecar `{sidecar}`: {e}"))?;
        let chain_id = field(text, "chain").unwrap_or("");
        let next: u64 = field(text, "next")
            .and_then(|f| f.parse().ok())
            .unwrap_or(0);
        let head = field(text, "head").and_then(|p| B64.decode(p).ok());
        if next > 0 && trust_full(&leaves, &records) {
            match by_seq.get(&(sidecar, chain_id, next - 1)) {
                Some(r) if head.as_deref() == Some(&r.chain[..]) => {}
                Some(r) => return Err(format!("{}: differs from what sidecar `{sidecar}` signed in its heartbeat", r.name())),
                None => {
                    return Err(format!(
                        "sidecar `{sidecar}` seq {}: its signed heartbeat says it was sent, but it is missing (tail truncated?)",
                        next - 1
                    ))
                }
            }
        }
        summary.heartbeats += 1;
    }

    summary.tree_size = size;
    Ok(summary)
}

/// Whether the export holds every record (no time filter).
fn trust_full(leaves: &BTreeMap<u64, Hash>, records: &[Rec]) -> bool {
    leaves.len() == records.len()
}

/// Checks one decision's inclusion proof (the body of `GET /v1/decisions/{id}`).
pub fn verify_inclusion(answer: &Value, ledger: &PublicKey) -> Result<u64, String> {
    let bytes = answer["bytes"]
        .as_str()
        .and_then(|b| B64.decode(b).ok())
        .ok_or("no record bytes")?;
    let index = answer["index"].as_u64().ok_or("no index")?;
    let proof: Vec<Hash> = answer["inclusion_proof"]
        .as_array()
        .ok_or("no inclusion proof")?
        .iter()
        .map(|h| h64(h).ok_or("bad proof hash"))
        .collect::<Result<_, _>>()?;
    let cp = ledger
        .open(answer["checkpoint"].as_str().unwrap_or(""))
        .map_err(|e| format!("checkpoint: {e}"))?;
    let (_, size, root) = note::parse_checkpoint(cp).map_err(|e| e.to_string())?;
    if merkle::verify_inclusion(index, size, &leaf_hash(&bytes), &proof, &root) {
        Ok(size)
    } else {
        Err(format!(
            "record {index} is not included in the signed tree of size {size}"
        ))
    }
}
