//! The decision cache: a bounded in-memory tier (L1) in front of a sled tree
//! in the data directory (L2), so repeated questions cost almost nothing and a
//! restart does not start cold.
//!
//! Invariant: a cached answer never outlives what it was computed from. The
//! key is SHA-256 over the active bundle's content hash (schema, policies,
//! links, entities) and the canonical request (principal, action, resource,
//! context with keys sorted, request-scoped entities); a reload changes the
//! hash, so no answer from the old set can be found. Every entry carries its
//! expiry and is never served past it.
//!
//! Beside L1, the bodies already decided, by the SHA-256 of their bytes
//! ([`Cache::seen`]): the same bytes again, on the same bundle, find their
//! answer and their record's request without being parsed.
//!
//! The cache must never fail a decision: a corrupt directory is moved aside and
//! replaced, and a write error (a full disk) turns L2 off, not the sidecar.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::engine::{Input, Outcome};

/// `[cache]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Cache decisions at all. Default true.
    pub enabled: bool,
    /// Lifetime of a cached decision, in milliseconds. Default 60000.
    pub ttl_ms: u64,
    /// Most entries in memory. Default 10000.
    pub l1_max_entries: usize,
    /// Most bytes in memory (approximate). Default 8 MiB.
    pub l1_max_bytes: usize,
    /// Keep a persistent tier in `<data-dir>/cache`. Default true.
    pub l2: bool,
    /// Most entries on disk. Default 100000.
    pub l2_max_entries: usize,
    /// Most bytes on disk, as sled reports them. Default 64 MiB.
    pub l2_max_bytes: u64,
    /// sled's page cache, in bytes. Default 4 MiB (a sidecar runs beside
    /// every service: memory matters).
    pub l2_page_cache_bytes: u64,
    /// How often expired and surplus L2 entries are trimmed, in ms. Default 30000.
    pub l2_trim_interval_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            enabled: true,
            ttl_ms: 60_000,
            l1_max_entries: 10_000,
            l1_max_bytes: 8 << 20,
            l2: true,
            l2_max_entries: 100_000,
            l2_max_bytes: 64 << 20,
            l2_page_cache_bytes: 4 << 20,
            l2_trim_interval_ms: 30_000,
        }
    }
}

pub type Key = [u8; 32];

/// What is cached for one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Milliseconds since the Unix epoch after which the entry is dead.
    pub expires_ms: u64,
    pub allow: bool,
    pub reasons: Vec<String>,
    pub errors: Vec<String>,
}

impl Entry {
    pub fn outcome(&self) -> Outcome {
        Outcome {
            allow: self.allow,
            reasons: self.reasons.clone(),
            errors: self.errors.clone(),
        }
    }

    fn approx_bytes(&self) -> usize {
        64 + self.reasons.iter().map(|r| r.len() + 24).sum::<usize>()
            + self.errors.iter().map(|e| e.len() + 24).sum::<usize>()
    }
}

/// Which tier answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    L1,
    L2,
}

/// Counters for `/v1/status` and `/metrics`.
#[derive(Debug, Default)]
pub struct Stats {
    pub l1_hits: AtomicU64,
    /// L1 hits whose body was not parsed ([`Cache::seen`]).
    pub body_hits: AtomicU64,
    pub l2_hits: AtomicU64,
    pub misses: AtomicU64,
    pub l1_evictions: AtomicU64,
    pub l2_evictions: AtomicU64,
    pub expired: AtomicU64,
}

/// Keys are SHA-256 digests, already uniform: their first 8 bytes are the
/// hash. (Choosing colliding keys means breaking SHA-256.)
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for (i, b) in bytes.iter().take(8).enumerate() {
            self.0 |= u64::from(*b) << (8 * i);
        }
    }
}

/// What an entry of a [`Fifo`] is counted as.
trait Weigh {
    fn approx_bytes(&self) -> usize;
}

impl Weigh for Entry {
    fn approx_bytes(&self) -> usize {
        Entry::approx_bytes(self)
    }
}

/// A map bounded in entries and in approximate bytes, that forgets its
/// oldest entries first.
#[derive(Debug)]
struct Fifo<T> {
    map: HashMap<Key, Arc<T>, BuildHasherDefault<KeyHasher>>,
    /// Insertion order, for eviction (first in, first out).
    order: VecDeque<Key>,
    bytes: usize,
}

impl<T> Default for Fifo<T> {
    fn default() -> Self {
        Fifo {
            map: HashMap::default(),
            order: VecDeque::new(),
            bytes: 0,
        }
    }
}

impl<T: Weigh> Fifo<T> {
    /// Whether `key` was there.
    fn remove(&mut self, key: &Key) -> bool {
        let removed = self.map.remove(key);
        if let Some(e) = &removed {
            self.bytes = self.bytes.saturating_sub(e.approx_bytes());
        }
        removed.is_some()
    }

    /// Inserts, then evicts the oldest entries past the bounds; returns how
    /// many were evicted.
    fn insert(&mut self, key: Key, value: Arc<T>, max_entries: usize, max_bytes: usize) -> u64 {
        let size = value.approx_bytes();
        if let Some(old) = self.map.insert(key, value) {
            self.bytes = self.bytes.saturating_sub(old.approx_bytes());
        } else {
            self.order.push_back(key);
        }
        self.bytes += size;
        let mut evicted = 0;
        while self.map.len() > max_entries || self.bytes > max_bytes {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if self.remove(&oldest) {
                evicted += 1;
            }
        }
        // The order queue may hold keys already removed (expired): keep it
        // from growing past the map by more than its bound.
        if self.order.len() > 2 * max_entries.max(16) {
            let Fifo { map, order, .. } = self;
            order.retain(|k| map.contains_key(k));
        }
        evicted
    }
}

/// A request body decided before: its cached answer, and what its record
/// says of the request. See [`Cache::seen`].
#[derive(Debug)]
pub struct Seen {
    /// The bundle it was parsed on ([`crate::state::Active::epoch`]).
    epoch: u64,
    entry: Arc<Entry>,
    pub asked: Arc<crate::audit::Asked>,
}

impl Seen {
    pub fn entry(&self) -> &Entry {
        &self.entry
    }
}

impl Weigh for Seen {
    fn approx_bytes(&self) -> usize {
        let a = &self.asked;
        // The digest twice (map and queue), the map slot, the request's
        // texts and encoding; the answer, which L1 may have let go.
        192 + a.texts.iter().map(String::len).sum::<usize>()
            + a.encoded().len()
            + self.entry.approx_bytes()
    }
}

/// The key under which a body is remembered: SHA-256 over its bytes.
pub fn body_digest(body: &[u8]) -> Key {
    let mut h = Sha256::new();
    h.update(b"vigie-body/v1\n");
    h.update(body);
    h.finalize().into()
}

pub struct Cache {
    config: Config,
    l1: Mutex<Fifo<Entry>>,
    /// Bodies already decided, by [`body_digest`]: bounded by L1's number
    /// of entries and a quarter of its bytes.
    bodies: Mutex<Fifo<Seen>>,
    l2: Option<sled::Tree>,
    /// Kept so the database is flushed and closed with the cache.
    db: Option<sled::Db>,
    l2_on: AtomicBool,
    pub stats: Stats,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The cache key of a request on a bundle.
pub fn key(bundle_hash: &str, input: &Input) -> Key {
    let mut buf = Vec::with_capacity(512);
    buf.extend_from_slice(b"vigie-cache/v1\n");
    buf.extend_from_slice(bundle_hash.as_bytes());
    for part in &input.texts {
        buf.push(b'\n');
        buf.extend_from_slice(part.as_bytes());
    }
    buf.push(b'\n');
    crate::canon::write(&input.context, &mut buf);
    for (_, entity) in &input.entities {
        buf.push(b'\n');
        crate::canon::write(entity, &mut buf);
    }
    Sha256::digest(&buf).into()
}

impl Cache {
    /// Opens the cache; `data_dir` holds the L2 tier. Never fails: a tier
    /// that cannot be opened is turned off, with a log line saying why.
    pub fn open(config: Config, data_dir: &Path) -> Cache {
        let (db, l2) = if config.enabled && config.l2 {
            match open_l2(&config, &data_dir.join("cache")) {
                Some((db, tree)) => (Some(db), Some(tree)),
                None => (None, None),
            }
        } else {
            (None, None)
        };
        let l2_on = AtomicBool::new(l2.is_some());
        Cache {
            config,
            l1: Mutex::new(Fifo::default()),
            bodies: Mutex::new(Fifo::default()),
            l2,
            db,
            l2_on,
            stats: Stats::default(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.config.enabled
    }

    pub fn ttl(&self) -> Duration {
        Duration::from_millis(self.config.ttl_ms)
    }

    pub fn l2_enabled(&self) -> bool {
        self.l2_on.load(Ordering::Relaxed)
    }

    /// A live entry for `key`, from L1 or else L2 (then promoted to L1).
    pub fn get(&self, key: &Key, now_ms: u64) -> Option<(Arc<Entry>, Tier)> {
        if !self.config.enabled {
            return None;
        }
        {
            let mut l1 = self.l1.lock().unwrap_or_else(|p| p.into_inner());
            match l1.map.get(key) {
                Some(e) if e.expires_ms > now_ms => {
                    let e = Arc::clone(e);
                    drop(l1);
                    self.stats.l1_hits.fetch_add(1, Ordering::Relaxed);
                    return Some((e, Tier::L1));
                }
                Some(_) => {
                    l1.remove(key);
                    self.stats.expired.fetch_add(1, Ordering::Relaxed);
                }
                None => {}
            }
        }
        if let Some(tree) = self.l2.as_ref().filter(|_| self.l2_enabled()) {
            match tree.get(key) {
                Ok(Some(bytes)) => match serde_json::from_slice::<Entry>(&bytes) {
                    Ok(e) if e.expires_ms > now_ms => {
                        self.stats.l2_hits.fetch_add(1, Ordering::Relaxed);
                        let e = Arc::new(e);
                        self.put_l1(*key, Arc::clone(&e));
                        return Some((e, Tier::L2));
                    }
                    _ => {
                        let _ = tree.remove(key);
                        self.stats.expired.fetch_add(1, Ordering::Relaxed);
                    }
                },
                Ok(None) => {}
                Err(e) => self.l2_failed(&e),
            }
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        None
    }

    /// Stores an answer in both tiers.
    pub fn put(&self, key: Key, entry: Entry) {
        if !self.config.enabled {
            return;
        }
        if let Some(tree) = self.l2.as_ref().filter(|_| self.l2_enabled()) {
            match serde_json::to_vec(&entry) {
                Ok(bytes) => {
                    if let Err(e) = tree.insert(key, bytes) {
                        self.l2_failed(&e);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot encode a cache entry"),
            }
        }
        self.put_l1(key, Arc::new(entry));
    }

    fn put_l1(&self, key: Key, entry: Arc<Entry>) {
        let c = &self.config;
        let mut l1 = self.l1.lock().unwrap_or_else(|p| p.into_inner());
        let evicted = l1.insert(key, entry, c.l1_max_entries, c.l1_max_bytes);
        drop(l1);
        self.stats
            .l1_evictions
            .fetch_add(evicted, Ordering::Relaxed);
    }

    /// What a body with this digest was parsed into and answered on bundle
    /// `epoch`, while that answer lives (counted as an L1 hit).
    ///
    /// INVARIANT: only a body whose answer was cached is remembered, with
    /// that answer. A body's parse is a function of its bytes, and the
    /// answer's key a function of the parse and the bundle: the same bytes
    /// on the same bundle would find the same entry, so they need no parse,
    /// and their record gets the fields a parse would give.
    pub fn seen(&self, digest: &Key, epoch: u64, now_ms: u64) -> Option<Arc<Seen>> {
        if !self.config.enabled {
            return None;
        }
        let bodies = self.bodies.lock().unwrap_or_else(|p| p.into_inner());
        let live = |s: &&Arc<Seen>| s.epoch == epoch && s.entry.expires_ms > now_ms;
        let seen = Arc::clone(bodies.map.get(digest).filter(live)?);
        drop(bodies);
        self.stats.l1_hits.fetch_add(1, Ordering::Relaxed);
        self.stats.body_hits.fetch_add(1, Ordering::Relaxed);
        Some(seen)
    }

    /// Remembers a decided body (see [`Cache::seen`]): `key` is its
    /// parse's cache key on bundle `epoch`. Nothing is remembered when the
    /// answer was not cached (a plugin's failure mode decided it).
    pub fn remember(&self, digest: Key, epoch: u64, key: &Key, asked: Arc<crate::audit::Asked>) {
        if !self.config.enabled {
            return;
        }
        let entry = {
            let l1 = self.l1.lock().unwrap_or_else(|p| p.into_inner());
            match l1.map.get(key) {
                Some(e) => Arc::clone(e),
                None => return,
            }
        };
        let seen = Arc::new(Seen {
            epoch,
            entry,
            asked,
        });
        let c = &self.config;
        let mut bodies = self.bodies.lock().unwrap_or_else(|p| p.into_inner());
        bodies.insert(digest, seen, c.l1_max_entries, c.l1_max_bytes / 4);
    }

    fn l2_failed(&self, e: &sled::Error) {
        if self.l2_on.swap(false, Ordering::Relaxed) {
            tracing::error!(error = %e, "the persistent cache failed; it is off until restart (decisions are unaffected)");
        }
    }

    /// Removes expired L2 entries, then the soonest to expire while the tier
    /// is over its bounds. Called periodically from a blocking thread.
    pub fn trim(&self, now_ms: u64) {
        let Some(tree) = self.l2.as_ref().filter(|_| self.l2_enabled()) else {
            return;
        };
        let mut live: Vec<(u64, sled::IVec)> = Vec::new();
        for item in tree.iter() {
            let Ok((k, v)) = item else {
                continue;
            };
            match serde_json::from_slice::<Entry>(&v) {
                Ok(e) if e.expires_ms > now_ms => live.push((e.expires_ms, k)),
                _ => {
                    let _ = tree.remove(&k);
                    self.stats.expired.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let over_bytes = |db: &Option<sled::Db>| {
            db.as_ref()
                .and_then(|d| d.size_on_disk().ok())
                .is_some_and(|s| s > self.config.l2_max_bytes)
        };
        if live.len() > self.config.l2_max_entries || over_bytes(&self.db) {
            live.sort_by_key(|(exp, _)| *exp);
            let target = if over_bytes(&self.db) {
                live.len() / 2
            } else {
                live.len() - self.config.l2_max_entries
            };
            for (_, k) in live.iter().take(target) {
                let _ = tree.remove(k);
                self.stats.l2_evictions.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn trim_interval(&self) -> Duration {
        Duration::from_millis(self.config.l2_trim_interval_ms.max(100))
    }

    /// Bodies remembered and their approximate bytes, for status.
    pub fn bodies(&self) -> (usize, usize) {
        let bodies = self.bodies.lock().unwrap_or_else(|p| p.into_inner());
        (bodies.map.len(), bodies.bytes)
    }

    /// Sizes for status and metrics: (L1 entries, L1 bytes, L2 entries, L2 bytes on disk).
    pub fn sizes(&self) -> (usize, usize, usize, u64) {
        let (n1, b1) = {
            let l1 = self.l1.lock().unwrap_or_else(|p| p.into_inner());
            (l1.map.len(), l1.bytes)
        };
        let n2 = self.l2.as_ref().map_or(0, |t| t.len());
        let b2 = self
            .db
            .as_ref()
            .and_then(|d| d.size_on_disk().ok())
            .unwrap_or(0);
        (n1, b1, n2, b2)
    }

    /// Writes L2 to disk (on shutdown).
    pub fn flush(&self) {
        if let Some(db) = &self.db {
            if let Err(e) = db.flush() {
                tracing::warn!(error = %e, "cannot flush the persistent cache");
            }
        }
    }
}

fn sled_config(config: &Config, dir: &Path) -> sled::Config {
    sled::Config::new()
        .path(dir)
        .cache_capacity(config.l2_page_cache_bytes)
        .flush_every_ms(Some(1000))
        .mode(sled::Mode::LowSpace)
}

/// Opens L2; a directory that does not open is moved aside and replaced.
fn open_l2(config: &Config, dir: &Path) -> Option<(sled::Db, sled::Tree)> {
    let open = |dir: &Path| -> Result<(sled::Db, sled::Tree), String> {
        let db = sled_config(config, dir).open().map_err(|e| e.to_string())?;
        let tree = db.open_tree("decisions").map_err(|e| e.to_string())?;
        Ok((db, tree))
    };
    match open(dir) {
        Ok(t) => Some(t),
        Err(first) => {
            let aside = aside_path(dir);
            tracing::error!(
                dir = %dir.display(),
                moved_to = %aside.display(),
                error = %first,
                "the persistent cache does not open; moving it aside and starting empty"
            );
            if dir.exists() {
                if let Err(e) = std::fs::rename(dir, &aside) {
                    tracing::error!(error = %e, "cannot move the cache aside; the persistent cache is off");
                    return None;
                }
            }
            match open(dir) {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::error!(error = %e, "the persistent cache is off");
                    None
                }
            }
        }
    }
}

fn aside_path(dir: &Path) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "cache".into());
    dir.with_file_name(format!("{name}.corrupt-{}", now_ms()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn entry(expires_ms: u64) -> Entry {
        Entry {
            expires_ms,
            allow: true,
            reasons: vec!["p".into()],
            errors: vec![],
        }
    }

    fn input(context: Value) -> Input {
        crate::engine::Query {
            principal: json!("User::\"a\""),
            action: json!("Action::\"r\""),
            resource: json!("R::\"x\""),
            context: Some(context),
            entities: None,
        }
        .into_input()
        .unwrap()
    }

    #[test]
    fn keys_ignore_key_order_but_not_values_or_bundle() {
        let a = key("h1", &input(json!({"a": 1, "b": {"c": 2, "d": [1, 2]}})));
        let b = key("h1", &input(json!({"b": {"d": [1, 2], "c": 2}, "a": 1})));
        assert_eq!(a, b);
        assert_ne!(
            a,
            key("h1", &input(json!({"a": 2, "b": {"c": 2, "d": [1, 2]}})))
        );
        assert_ne!(
            a,
            key("h1", &input(json!({"a": 1, "b": {"c": 2, "d": [2, 1]}})))
        );
        assert_ne!(
            a,
            key("h2", &input(json!({"a": 1, "b": {"c": 2, "d": [1, 2]}})))
        );
    }

    /// A cache with L1 alone, of three entries.
    fn three_in_memory() -> Cache {
        let config = Config {
            l2: false,
            l1_max_entries: 3,
            ..Config::default()
        };
        Cache::open(config, Path::new("/nonexistent"))
    }

    #[test]
    fn bodies_are_bounded_and_kept_for_their_bundle_only() {
        let c = three_in_memory();
        let asked = |i: u8| {
            let texts = ["P".into(), "A".into(), "R".into()];
            Arc::new(crate::audit::Asked::new(texts, &json!({"i": i}), 0, &[]))
        };
        for i in 0..5u8 {
            c.put([i; 32], entry(1_000));
            c.remember(body_digest(&[i]), 7, &[i; 32], asked(i));
        }
        assert_eq!(c.bodies().0, 3);
        assert!(
            c.seen(&body_digest(&[0]), 7, 10).is_none(),
            "the oldest were evicted"
        );
        let seen = c.seen(&body_digest(&[4]), 7, 10).unwrap();
        assert!(seen
            .asked
            .encoded()
            .starts_with(br#"{"action":"A","context":{"i":4}"#));
        assert!(
            c.seen(&body_digest(&[4]), 8, 10).is_none(),
            "another bundle"
        );
        assert!(c.seen(&body_digest(&[4]), 7, 1_000).is_none(), "expired");
        // A body whose answer is not cached is not remembered.
        c.remember(body_digest(&[9]), 7, &[9; 32], asked(9));
        assert!(c.seen(&body_digest(&[9]), 7, 10).is_none());
        // A quarter of L1's bytes bounds them too.
        let small = Cache::open(
            Config {
                l2: false,
                l1_max_bytes: 4 * 400,
                ..Config::default()
            },
            Path::new("/nonexistent"),
        );
        for i in 0..5u8 {
            small.put([i; 32], entry(1_000));
            small.remember(body_digest(&[i]), 7, &[i; 32], asked(i));
        }
        assert_eq!(small.bodies().0, 1);
        assert!(small.bodies().1 <= 400);
    }

    #[test]
    fn l1_is_bounded_and_expires() {
        let c = three_in_memory();
        for i in 0..5u8 {
            c.put([i; 32], entry(1_000));
        }
        assert_eq!(c.sizes().0, 3);
        assert!(c.get(&[0; 32], 10).is_none(), "the oldest were evicted");
        assert!(c.get(&[4; 32], 10).is_some());
        assert!(
            c.get(&[4; 32], 1_000).is_none(),
            "never served at or past its expiry"
        );
        assert_eq!(c.stats.l1_evictions.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn l2_survives_reopening_and_garbage_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = Cache::open(Config::default(), dir.path());
            c.put([7; 32], entry(u64::MAX));
            c.flush();
        }
        let c = Cache::open(Config::default(), dir.path());
        assert_eq!(c.get(&[7; 32], 0).map(|(_, t)| t), Some(Tier::L2));
        assert_eq!(c.get(&[7; 32], 0).map(|(_, t)| t), Some(Tier::L1));
        drop(c);

        let garbage = tempfile::tempdir().unwrap();
        std::fs::write(garbage.path().join("cache"), b"not a database").unwrap();
        let c = Cache::open(Config::default(), garbage.path());
        assert!(c.l2_enabled());
        c.put([1; 32], entry(u64::MAX));
        assert!(c.get(&[1; 32], 0).is_some());
        let moved = std::fs::read_dir(garbage.path())
            .unwrap()
            .filter_map(Result::ok)
            .any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("cache.corrupt-")
            });
        assert!(moved);
    }

    #[test]
    fn trim_drops_expired_then_soonest_to_expire() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::open(
            Config {
                l2_max_entries: 2,
                ..Config::default()
            },
            dir.path(),
        );
        c.put([1; 32], entry(5));
        c.put([2; 32], entry(100));
        c.put([3; 32], entry(200));
        c.put([4; 32], entry(300));
        c.trim(10);
        let (_, _, n2, _) = c.sizes();
        assert_eq!(n2, 2);
        let tree = c.l2.as_ref().unwrap();
        assert!(tree.get([3; 32]).unwrap().is_some());
        assert!(tree.get([4; 32]).unwrap().is_some());
    }
}
