//! The ledger's store (sled): verified records in arrival order, each a leaf
//! of one Merkle tree, with the signed batch notes that brought them and the
//! ledger's signed checkpoints.
//!
//! Ingestion is serialized (one batch at a time) and durable before it is
//! acknowledged. A batch is accepted only if it is signed by the enrolled key
//! of the sidecar it names, its records continue that sidecar's chain
//! exactly, and nothing already stored under the same (sidecar, chain, seq)
//! differs (that would be equivocation: refused and recorded as an event).

use std::collections::BTreeMap;
use std::sync::Mutex;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};

use super::merkle::Frontier;
use crate::audit::{chain_hash, leaf_hash, rfc3339_nanos, Hash, GENESIS};
use crate::note::{self, KeyPair, PublicKey};

/// The fields of a record the ledger checks and indexes; the rest of the
/// record is skipped, not built (it is stored as the bytes it came as).
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    sidecar: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    chain: std::borrow::Cow<'a, str>,
    seq: u64,
    #[serde(borrow, default)]
    kind: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    decision_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    reason: Option<std::borrow::Cow<'a, str>>,
}

impl<'a> Envelope<'a> {
    /// `Err(true)`: not JSON; `Err(false)`: JSON without the fields.
    fn parse(bytes: &'a [u8]) -> Result<Envelope<'a>, bool> {
        serde_json::from_slice(bytes)
            .map_err(|_| serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_err())
    }
}

/// Why a batch was refused. `code` is stable; `status` the HTTP status.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    /// For a gap: the seq the ledger expects next.
    pub expected: Option<u64>,
}

fn refuse(status: u16, code: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        code,
        message: message.into(),
        expected: None,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The next seq the ledger expects in this chain.
    pub next: u64,
    pub appended: u64,
    pub duplicates: u64,
}

#[derive(Debug, Deserialize)]
pub struct BatchBody {
    pub note: String,
    #[serde(default)]
    pub records: Vec<String>,
}

/// The fields of a batch or heartbeat note.
#[derive(Debug, Default)]
struct Fields(BTreeMap<String, String>);

impl Fields {
    fn parse(text: &str) -> (String, Fields) {
        let mut lines = text.lines();
        let origin = lines.next().unwrap_or("").to_owned();
        let mut f = BTreeMap::new();
        for l in lines {
            if let Some((k, v)) = l.split_once(' ') {
                f.insert(k.to_owned(), v.to_owned());
            }
        }
        (origin, Fields(f))
    }
    fn get(&self, k: &str) -> Result<&str, Refusal> {
        self.0
            .get(k)
            .map(String::as_str)
            .ok_or_else(|| refuse(400, "bad_note", format!("the note has no `{k}` line")))
    }
    fn num(&self, k: &str) -> Result<u64, Refusal> {
        self.get(k)?
            .parse()
            .map_err(|_| refuse(400, "bad_note", format!("`{k}` is not a number")))
    }
    fn hash(&self, k: &str) -> Result<Hash, Refusal> {
        B64.decode(self.get(k)?)
            .ok()
            .and_then(|b| <Hash>::try_from(b.as_slice()).ok())
            .ok_or_else(|| {
                refuse(
                    400,
                    "bad_note",
                    format!("`{k}` is not a base64 SHA-256 hash"),
                )
            })
    }
}

/// The sidecar id a note says it comes from (before its signature is checked).
fn note_sidecar(note: &str) -> Option<String> {
    note.lines()
        .find_map(|l| l.strip_prefix("sidecar "))
        .map(str::to_owned)
}

pub struct Store {
    db: sled::Db,
    records: sled::Tree,
    leaves: sled::Tree,
    by_chain: sled::Tree,
    by_id: sled::Tree,
    heads: sled::Tree,
    current: sled::Tree,
    notes: sled::Tree,
    heartbeats: sled::Tree,
    events: sled::Tree,
    meta: sled::Tree,
    key: KeyPair,
    origin: String,
    ingest: Mutex<()>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

fn be(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

fn read_be(b: &[u8]) -> u64 {
    b.get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

fn chain_key(sidecar: &str, chain: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(sidecar.len() + chain.len() + 1);
    k.extend_from_slice(sidecar.as_bytes());
    k.push(0);
    k.extend_from_slice(chain.as_bytes());
    k
}

fn seq_key(sidecar: &str, chain: &str, seq: u64) -> Vec<u8> {
    let mut k = chain_key(sidecar, chain);
    k.push(0);
    k.extend_from_slice(&be(seq));
    k
}

fn db_err(e: impl std::fmt::Display) -> Refusal {
    refuse(503, "storage", format!("the ledger cannot write: {e}"))
}

/// A stored record, as export and queries see it.
#[derive(Debug, Clone)]
pub struct Stored {
    pub index: u64,
    pub bytes: Vec<u8>,
    pub prev: Hash,
    pub chain: Hash,
}

impl Store {
    pub fn open(dir: &std::path::Path, key: KeyPair, origin: String) -> Result<Store, String> {
        let db = sled::Config::new()
            .path(dir.join("ledger.sled"))
            .cache_capacity(32 << 20)
            .open()
            .map_err(|e| format!("cannot open the ledger store in `{}`: {e}", dir.display()))?;
        let t = |name: &str| db.open_tree(name).map_err(|e| e.to_string());
        Ok(Store {
            records: t("records")?,
            leaves: t("leaves")?,
            by_chain: t("by_chain")?,
            by_id: t("by_id")?,
            heads: t("heads")?,
            current: t("current")?,
            notes: t("notes")?,
            heartbeats: t("heartbeats")?,
            events: t("events")?,
            meta: t("meta")?,
            db,
            key,
            origin,
            ingest: Mutex::new(()),
        })
    }

    pub fn public_key(&self) -> PublicKey {
        self.key.public()
    }

    pub fn size(&self) -> u64 {
        self.leaves.len() as u64
    }

    fn frontier(&self) -> Frontier {
        self.meta
            .get("frontier")
            .ok()
            .flatten()
            .map(|b| Frontier::decode(&b))
            .unwrap_or_default()
    }

    /// The latest signed checkpoint (signing one for the empty tree if needed).
    pub fn checkpoint(&self) -> String {
        if let Ok(Some(c)) = self.meta.get("checkpoint") {
            return String::from_utf8_lossy(&c).into_owned();
        }
        let f = self.frontier();
        self.key
            .sign_note(&note::checkpoint_text(&self.origin, f.size(), &f.root()))
    }

    fn event(&self, kind: &str, detail: Value) {
        let id = self.db.generate_id().unwrap_or(0);
        let ev = json!({"kind": kind, "time": rfc3339_nanos(std::time::SystemTime::now()), "detail": detail});
        tracing::warn!(kind, detail = %ev["detail"], "ledger security event");
        let _ = self.events.insert(be(id), ev.to_string().as_bytes());
    }

    pub fn events(&self) -> Vec<Value> {
        self.events
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
            .collect()
    }

    /// Verifies and stores one batch (or heartbeat). `keys` are the enrolled
    /// sidecar keys by sidecar id.
    pub fn ingest(
        &self,
        body: &BatchBody,
        keys: &dyn Fn(&str) -> Option<PublicKey>,
    ) -> Result<Accepted, Refusal> {
        let sidecar = note_sidecar(&body.note)
            .ok_or_else(|| refuse(400, "bad_note", "the note names no sidecar"))?;
        let key = keys(&sidecar).ok_or_else(|| {
            self.event("unknown_key", json!({"sidecar": sidecar}));
            refuse(
                403,
                "unknown_key",
                format!("sidecar `{sidecar}` is not enrolled"),
            )
        })?;
        let text = key.open(&body.note).map_err(|e| {
            self.event("bad_signature", json!({"sidecar": sidecar}));
            refuse(
                403,
                "bad_signature",
                format!("the note is not signed by the enrolled key of `{sidecar}`: {e}"),
            )
        })?;
        let (origin, f) = Fields::parse(text);
        if f.get("sidecar")? != sidecar {
            return Err(refuse(400, "bad_note", "the note names two sidecars"));
        }
        let chain = f.get("chain")?.to_owned();
        let _guard = self.ingest.lock().unwrap_or_else(|p| p.into_inner());
        let ck = chain_key(&sidecar, &chain);
        let state = self.heads.get(&ck).map_err(db_err)?;
        let (next, head) = match &state {
            Some(v) => (
                read_be(v),
                v.get(8..40)
                    .and_then(|h| h.try_into().ok())
                    .unwrap_or(GENESIS),
            ),
            None => (0, GENESIS),
        };
        match origin.as_str() {
            "vigie-heartbeat/v1" => {
                if state.is_none() && !body.records.is_empty() {
                    return Err(refuse(400, "bad_note", "a heartbeat carries no records"));
                }
                self.heartbeats
                    .insert(sidecar.as_bytes(), body.note.as_bytes())
                    .map_err(db_err)?;
                return Ok(Accepted {
                    next,
                    appended: 0,
                    duplicates: 0,
                });
            }
            "vigie-batch/v1" => {}
            other => {
                return Err(refuse(
                    400,
                    "bad_note",
                    format!("unknown note type `{other}`"),
                ))
            }
        }
        let first = f.num("first")?;
        let last = f.num("last")?;
        let prev = f.hash("prev")?;
        let claimed_head = f.hash("head")?;
        if last < first || (last - first + 1) as usize != body.records.len() {
            return Err(refuse(
                400,
                "bad_batch",
                format!(
                    "the note covers seq {first}..={last} but the batch has {} records",
                    body.records.len()
                ),
            ));
        }
        let records: Vec<Vec<u8>> = body
            .records
            .iter()
            .enumerate()
            .map(|(i, r)| {
                B64.decode(r).map_err(|_| {
                    refuse(
                        400,
                        "bad_batch",
                        format!("record {} is not base64", first + i as u64),
                    )
                })
            })
            .collect::<Result<_, _>>()?;

        if first > next {
            let mut r = refuse(
                409,
                "gap",
                format!("gap in `{sidecar}` chain `{chain}`: expected seq {next}, got {first}"),
            );
            r.expected = Some(next);
            return Err(r);
        }
        // The chain as the batch tells it, checked record by record.
        let mut h = prev;
        let mut parsed = Vec::with_capacity(records.len());
        for (i, bytes) in records.iter().enumerate() {
            let seq = first + i as u64;
            let v = Envelope::parse(bytes).map_err(|not_json| {
                let what = if not_json {
                    "is not JSON"
                } else {
                    "does not carry the sidecar, chain and seq of its batch"
                };
                refuse(400, "bad_record", format!("record {seq} {what}"))
            })?;
            if v.sidecar != sidecar.as_str() || v.chain != chain.as_str() || v.seq != seq {
                return Err(refuse(
                    400,
                    "bad_record",
                    format!("record {seq} does not carry the sidecar, chain and seq of its batch"),
                ));
            }
            if seq == 0 && v.kind.as_deref() != Some("chain_start") {
                return Err(refuse(
                    400,
                    "bad_record",
                    "a chain must begin with a `chain_start` record",
                ));
            }
            let before = h;
            h = chain_hash(&h, &leaf_hash(bytes));
            parsed.push((seq, v, before, h));
        }
        if h != claimed_head {
            return Err(refuse(
                400,
                "chain_mismatch",
                format!("the records do not hash to the note's head (seq {first}..={last})"),
            ));
        }
        // Records already held must be byte for byte the same.
        let mut duplicates = 0;
        for (i, (seq, _, before, _)) in parsed.iter().enumerate() {
            if *seq >= next {
                break;
            }
            let stored = self
                .by_chain
                .get(seq_key(&sidecar, &chain, *seq))
                .map_err(db_err)?;
            let stored_bytes = stored
                .as_ref()
                .and_then(|v| self.records.get(&v[..8]).ok().flatten());
            let same_prev = stored
                .as_ref()
                .and_then(|v| v.get(8..40))
                .is_some_and(|p| p == before);
            if stored_bytes.as_deref() != Some(records[i].as_slice()) || !same_prev {
                self.event(
                    "equivocation",
                    json!({"sidecar": sidecar, "chain": chain, "seq": seq}),
                );
                return Err(refuse(409, "equivocation", format!("seq {seq} of `{sidecar}` chain `{chain}` was already committed with different bytes; recorded as a security event")));
            }
            duplicates += 1;
        }
        if first == next && prev != head {
            return Err(refuse(
                409,
                "chain_mismatch",
                format!("the batch does not continue `{sidecar}` chain `{chain}` at seq {first}"),
            ));
        }
        if state.is_none() {
            if let Ok(Some(old)) = self.current.get(sidecar.as_bytes()) {
                let old = String::from_utf8_lossy(&old).into_owned();
                if old != chain {
                    let old_next = self
                        .heads
                        .get(chain_key(&sidecar, &old))
                        .ok()
                        .flatten()
                        .map(|v| read_be(&v));
                    let reason = parsed
                        .first()
                        .and_then(|p| p.1.reason.as_deref().map(str::to_owned));
                    self.event("chain_reset", json!({"sidecar": sidecar, "old_chain": old, "old_next_seq": old_next, "new_chain": chain, "reason": reason}));
                }
            }
        }
        // Append what is new.
        let mut frontier = self.frontier();
        let mut index = frontier.size();
        let first_index = index;
        let mut appended = 0;
        let mut new_head = head;
        for (i, (seq, v, before, after)) in parsed.iter().enumerate() {
            if *seq < next {
                continue;
            }
            let bytes = &records[i];
            let leaf = leaf_hash(bytes);
            self.records
                .insert(be(index), bytes.as_slice())
                .map_err(db_err)?;
            self.leaves.insert(be(index), &leaf).map_err(db_err)?;
            let mut loc = be(index).to_vec();
            loc.extend_from_slice(before);
            loc.extend_from_slice(after);
            self.by_chain
                .insert(seq_key(&sidecar, &chain, *seq), loc)
                .map_err(db_err)?;
            if let Some(id) = v.decision_id.as_deref() {
                self.by_id
                    .insert(id.as_bytes(), &be(index))
                    .map_err(db_err)?;
            }
            frontier.push(leaf);
            index += 1;
            appended += 1;
            new_head = *after;
        }
        let next = next.max(last + 1);
        if appended > 0 {
            let mut st = be(next).to_vec();
            st.extend_from_slice(&new_head);
            self.heads.insert(&ck, st).map_err(db_err)?;
            self.current
                .insert(sidecar.as_bytes(), chain.as_bytes())
                .map_err(db_err)?;
            let batch = json!({"sidecar": sidecar, "chain": chain, "first": first, "last": last, "first_index": first_index, "note": body.note});
            self.notes
                .insert(be(first_index), batch.to_string().as_bytes())
                .map_err(db_err)?;
            self.meta
                .insert("frontier", frontier.encode())
                .map_err(db_err)?;
            let cp = self.key.sign_note(&note::checkpoint_text(
                &self.origin,
                frontier.size(),
                &frontier.root(),
            ));
            self.meta
                .insert("checkpoint", cp.as_bytes())
                .map_err(db_err)?;
            self.db.flush().map_err(db_err)?;
        }
        Ok(Accepted {
            next,
            appended,
            duplicates,
        })
    }

    pub fn record(&self, index: u64) -> Option<Vec<u8>> {
        self.records
            .get(be(index))
            .ok()
            .flatten()
            .map(|v| v.to_vec())
    }

    pub fn index_of(&self, decision_id: &str) -> Option<u64> {
        self.by_id
            .get(decision_id.as_bytes())
            .ok()
            .flatten()
            .map(|v| read_be(&v))
    }

    /// Records from `from` on, in index order.
    pub fn records_from(&self, from: u64) -> impl Iterator<Item = (u64, Vec<u8>)> + '_ {
        self.records
            .range(be(from)..)
            .filter_map(Result::ok)
            .map(|(k, v)| (read_be(&k), v.to_vec()))
    }

    /// Chain hashes before and after a record, from its (sidecar, chain, seq).
    pub fn chain_of(&self, record: &Value) -> Option<(Hash, Hash)> {
        let key = seq_key(
            record["sidecar"].as_str()?,
            record["chain"].as_str()?,
            record["seq"].as_u64()?,
        );
        let v = self.by_chain.get(key).ok()??;
        Some((
            v.get(8..40)?.try_into().ok()?,
            v.get(40..72)?.try_into().ok()?,
        ))
    }

    pub fn leaves_upto(&self, size: u64) -> Vec<Hash> {
        self.leaves
            .range(..be(size))
            .filter_map(Result::ok)
            .filter_map(|(_, v)| v.as_ref().try_into().ok())
            .collect()
    }

    pub fn leaf(&self, index: u64) -> Option<Hash> {
        self.leaves
            .get(be(index))
            .ok()
            .flatten()
            .and_then(|v| v.as_ref().try_into().ok())
    }

    pub fn batches(&self) -> Vec<Value> {
        self.notes
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
            .collect()
    }

    pub fn heartbeats(&self) -> Vec<(String, String)> {
        self.heartbeats
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| {
                (
                    String::from_utf8_lossy(&k).into_owned(),
                    String::from_utf8_lossy(&v).into_owned(),
                )
            })
            .collect()
    }
}
