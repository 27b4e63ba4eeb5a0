//! The ledger's store (sled): verified records in arrival order, each a leaf
//! of one Merkle tree, with the signed batch notes that brought them and the
//! ledger's signed checkpoints.
//!
//! Records are stored by block: the new records of one batch are one sled
//! value (and their leaf hashes another), so that a batch costs a few tree
//! inserts instead of four per record; only the decision-id index has an
//! entry per record. Single inserts per record were 80% of ingestion.
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

/// The layout of the trees; a store in another layout is refused at open.
const FORMAT: &[u8] = b"blocks-1";

/// Records appended together, as one value of the `blocks` tree (keyed by
/// the index of its first record):
///
/// ```text
/// n (u32 LE) | chain hash before the first record (32)
/// | n × (chain hash after the record (32) | end of its bytes (u32 LE))
/// | the records' bytes, one after the other
/// ```
struct Block {
    value: sled::IVec,
    n: usize,
}

/// Bytes of a block's header (count, chain hash before) and of each entry
/// (chain hash after, end).
const BLOCK_HEADER: usize = 36;
const BLOCK_ENTRY: usize = 36;

impl Block {
    fn encode(prev: &Hash, records: &[(&[u8], Hash)]) -> Vec<u8> {
        let data: usize = records.iter().map(|(b, _)| b.len()).sum();
        let mut out = Vec::with_capacity(BLOCK_HEADER + records.len() * BLOCK_ENTRY + data);
        out.extend_from_slice(&(records.len() as u32).to_le_bytes());
        out.extend_from_slice(prev);
        let mut end = 0u32;
        for (bytes, after) in records {
            end += bytes.len() as u32;
            out.extend_from_slice(after);
            out.extend_from_slice(&end.to_le_bytes());
        }
        for (bytes, _) in records {
            out.extend_from_slice(bytes);
        }
        out
    }

    fn parse(value: sled::IVec) -> Option<Block> {
        let n = u32::from_le_bytes(value.get(..4)?.try_into().ok()?) as usize;
        let block = Block { value, n };
        // The last end must fall inside the value.
        let last = n.checked_sub(1).map_or(Some(0), |i| block.end(i))?;
        (block.data_start() + last <= block.value.len()).then_some(block)
    }

    fn data_start(&self) -> usize {
        BLOCK_HEADER + self.n * BLOCK_ENTRY
    }

    fn after(&self, i: usize) -> Option<Hash> {
        let at = BLOCK_HEADER + i * BLOCK_ENTRY;
        self.value.get(at..at + 32)?.try_into().ok()
    }

    fn end(&self, i: usize) -> Option<usize> {
        let at = BLOCK_HEADER + i * BLOCK_ENTRY + 32;
        Some(u32::from_le_bytes(self.value.get(at..at + 4)?.try_into().ok()?) as usize)
    }

    /// Record `i`: its bytes and the chain hashes before and after it.
    fn get(&self, i: usize) -> Option<(&[u8], Hash, Hash)> {
        if i >= self.n {
            return None;
        }
        let before = match i {
            0 => self.value.get(4..BLOCK_HEADER)?.try_into().ok()?,
            _ => self.after(i - 1)?,
        };
        let start = match i {
            0 => 0,
            _ => self.end(i - 1)?,
        };
        let d = self.data_start();
        let bytes = self.value.get(d + start..d + self.end(i)?)?;
        Some((bytes, before, self.after(i)?))
    }
}

pub struct Store {
    db: sled::Db,
    /// Index of a block's first record → the [`Block`].
    blocks: sled::Tree,
    /// Index of a block's first record → its records' leaf hashes.
    leaves: sled::Tree,
    /// (sidecar, chain, seq of a block's first record) → index of that
    /// record (u64 BE) | number of records (u64 BE).
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
        let meta = t("meta")?;
        match meta.get("format").map_err(|e| e.to_string())? {
            Some(f) if f == FORMAT => {}
            Some(f) => {
                return Err(format!(
                    "the ledger store in `{}` has the layout `{}`, this ledger reads `{}`",
                    dir.display(),
                    String::from_utf8_lossy(&f),
                    String::from_utf8_lossy(FORMAT)
                ))
            }
            None if db.tree_names().iter().any(|n| n == b"records") => {
                return Err(format!(
                    "the ledger store in `{}` has the record-per-entry layout of earlier \
                     versions; this ledger reads `{}` (export it with the version that wrote it)",
                    dir.display(),
                    String::from_utf8_lossy(FORMAT)
                ))
            }
            None => {
                meta.insert("format", FORMAT).map_err(|e| e.to_string())?;
            }
        }
        Ok(Store {
            blocks: t("blocks")?,
            leaves: t("block_leaves")?,
            by_chain: t("by_chain")?,
            by_id: t("by_id")?,
            heads: t("heads")?,
            current: t("current")?,
            notes: t("notes")?,
            heartbeats: t("heartbeats")?,
            events: t("events")?,
            meta,
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
        self.frontier().size()
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
        // A block addresses its bytes with 32-bit offsets.
        if records.iter().map(|r| r.len() as u64).sum::<u64>() > u64::from(u32::MAX) {
            return Err(refuse(
                413,
                "bad_batch",
                "the batch's records are over 4 GiB; send smaller batches",
            ));
        }

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
            let leaf = leaf_hash(bytes);
            h = chain_hash(&h, &leaf);
            parsed.push((seq, v, before, h, leaf));
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
        for (i, (seq, _, before, _, _)) in parsed.iter().enumerate() {
            if *seq >= next {
                break;
            }
            let same = self
                .held(&sidecar, &chain, *seq)?
                .and_then(|(block, j)| {
                    block
                        .get(j)
                        .map(|(b, prev, _)| b == records[i].as_slice() && prev == *before)
                })
                .unwrap_or(false);
            if !same {
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
        // Append what is new (a tail of the batch), as one block.
        let mut frontier = self.frontier();
        let first_index = frontier.size();
        let fresh = parsed
            .iter()
            .position(|p| p.0 >= next)
            .unwrap_or(parsed.len());
        let appended = (parsed.len() - fresh) as u64;
        let mut new_head = head;
        if let Some((first_seq, _, before, _, _)) = parsed.get(fresh) {
            let mut block = Vec::with_capacity(parsed.len() - fresh);
            let mut leaves = Vec::with_capacity(32 * (parsed.len() - fresh));
            for (i, (_, v, _, after, leaf)) in parsed.iter().enumerate().skip(fresh) {
                let index = first_index + (i - fresh) as u64;
                if let Some(id) = v.decision_id.as_deref() {
                    self.by_id
                        .insert(id.as_bytes(), &be(index))
                        .map_err(db_err)?;
                }
                block.push((records[i].as_slice(), *after));
                leaves.extend_from_slice(leaf);
                frontier.push(*leaf);
                new_head = *after;
            }
            self.blocks
                .insert(be(first_index), Block::encode(before, &block))
                .map_err(db_err)?;
            self.leaves
                .insert(be(first_index), leaves)
                .map_err(db_err)?;
            let mut loc = be(first_index).to_vec();
            loc.extend_from_slice(&be(appended));
            self.by_chain
                .insert(seq_key(&sidecar, &chain, *first_seq), loc)
                .map_err(db_err)?;
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

    /// The block holding record `index`, and the record's place in it.
    fn block_of(&self, index: u64) -> Option<(Block, usize)> {
        let (k, v) = self.blocks.range(..=be(index)).next_back()?.ok()?;
        let block = Block::parse(v)?;
        let i = (index - read_be(&k)) as usize;
        (i < block.n).then_some((block, i))
    }

    /// The block holding `seq` of a sidecar's chain, and its place in it.
    fn held(
        &self,
        sidecar: &str,
        chain: &str,
        seq: u64,
    ) -> Result<Option<(Block, usize)>, Refusal> {
        let range = seq_key(sidecar, chain, 0)..=seq_key(sidecar, chain, seq);
        let Some((k, v)) = self
            .by_chain
            .range(range)
            .next_back()
            .transpose()
            .map_err(db_err)?
        else {
            return Ok(None);
        };
        let first_seq = read_be(&k[k.len() - 8..]);
        let (first_index, n) = (read_be(&v), read_be(v.get(8..).unwrap_or_default()));
        if seq - first_seq >= n {
            return Ok(None);
        }
        Ok(self.block_of(first_index + (seq - first_seq)))
    }

    pub fn record(&self, index: u64) -> Option<Vec<u8>> {
        let (block, i) = self.block_of(index)?;
        block.get(i).map(|(b, _, _)| b.to_vec())
    }

    pub fn index_of(&self, decision_id: &str) -> Option<u64> {
        self.by_id
            .get(decision_id.as_bytes())
            .ok()
            .flatten()
            .map(|v| read_be(&v))
    }

    /// Records from `from` on, in index order, with the chain hashes
    /// around each.
    pub fn records_from(&self, from: u64) -> impl Iterator<Item = Stored> + '_ {
        // From the block holding `from`.
        let start = self
            .blocks
            .range(..=be(from))
            .next_back()
            .and_then(Result::ok)
            .map_or(from, |(k, _)| read_be(&k));
        self.blocks
            .range(be(start)..)
            .filter_map(Result::ok)
            .filter_map(|(k, v)| Some((read_be(&k), Block::parse(v)?)))
            .flat_map(move |(first, block)| {
                let skip = from.saturating_sub(first) as usize;
                (skip..block.n).filter_map(move |i| {
                    let (bytes, prev, chain) = block.get(i)?;
                    Some(Stored {
                        index: first + i as u64,
                        bytes: bytes.to_vec(),
                        prev,
                        chain,
                    })
                })
            })
    }

    /// The leaf hashes of records `0..size`.
    pub fn leaves_upto(&self, size: u64) -> Vec<Hash> {
        let mut out = Vec::with_capacity(size as usize);
        for (_, v) in self.leaves.iter().filter_map(Result::ok) {
            for leaf in v.chunks_exact(32) {
                if out.len() as u64 == size {
                    return out;
                }
                out.extend(<Hash>::try_from(leaf).ok());
            }
        }
        out
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
