//! The outbox: an append-only log of segment files in `<data-dir>/outbox`,
//! where each decision record is made durable before its answer leaves.
//!
//! # Design constraints
//!
//! * Nothing acknowledged is lost: in `power` mode a record is fsync'd before
//!   its decision is answered, in `process` mode it is in the kernel's hands
//!   (it survives `kill -9`, not a power loss).
//! * Sequence numbers are gapless: they are assigned by the single writer
//!   thread, in file order; a batch that fails to write is rolled back whole
//!   and its decisions are denied (`audit_unavailable`).
//! * Group commit: the writer takes every record waiting, writes them with one
//!   `write` and one `fdatasync`, then answers them all.
//! * A record leaves the outbox only when the ledger has acknowledged it
//!   (whole segments are deleted once every record in them is acknowledged).
//! * A torn tail (a crash in the middle of a write) is cut off at start.
//! * In `power` mode the segment being written ends in zeros, written and
//!   synced ahead: a group overwrites bytes the file already holds, so its
//!   fdatasync flushes the data alone, not a new file length as well (on the
//!   project's machine 135–153 µs a sync instead of 211–221; PostgreSQL
//!   fills its WAL segments with zeros for the same reason). The next
//!   segment is made ready the same way, as `outbox/spare`, by a background
//!   thread. A segment is cut to its records when it is closed, and at
//!   start; zeros after the last record are not a torn tail.
//!
//! # On-disk format
//!
//! `outbox/chain` holds the chain id. `outbox/acked` holds the highest
//! sequence number the ledger acknowledged. Segments are
//! `outbox/seg-<first seq, 20 digits>.vlog`:
//!
//! ```text
//! segment header: "VGSEG1\0\0" | first seq (u64 LE) | chain hash before it (32 bytes)
//! frame:          payload length (u32 LE) | CRC-32 of the next three fields (u32 LE)
//!                 | seq (u64 LE) | chain hash after this record (32) | payload (the record's bytes)
//! ```

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime};

use super::{
    chain_hash, leaf_hash, rfc3339_nanos, Config, Draft, Durability, Hash, Stamp, WhenFull, GENESIS,
};

const SEGMENT_MAGIC: &[u8; 8] = b"VGSEG1\0\0";
const SEGMENT_HEADER: u64 = 48;
const FRAME_HEADER: usize = 48;
/// A segment is closed once it is larger than this.
const SEGMENT_BYTES: u64 = 16 << 20;
/// The next segment, zeros made ready ahead (`power` mode), and the file it
/// is made in.
const SPARE: &str = "spare";
const SPARE_TMP: &str = "spare.tmp";
/// Largest record accepted (a record is a decision, not a document).
const MAX_RECORD: usize = 1 << 20;

#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    #[error("the outbox cannot be written: {0}")]
    Io(String),
    #[error("the outbox is full ({0} bytes not yet acknowledged by the ledger)")]
    Full(u64),
    #[error("the outbox writer has stopped")]
    Stopped,
}

/// Where the log stands, shared by the writer, the shipper and the status page.
#[derive(Debug)]
pub struct Position {
    pub chain: String,
    /// Next sequence number to write: records `0..written` are durable.
    pub written: AtomicU64,
    /// Chain hash after record `written - 1`.
    head: Mutex<Hash>,
    /// Highest sequence number the ledger acknowledged, plus one (0: none).
    pub acked: AtomicU64,
    /// Bytes in segment files.
    pub bytes: AtomicU64,
    pub write_failures: AtomicU64,
    pub full_refusals: AtomicU64,
    /// Rings when records are written (the shipper waits on it).
    pub changed: Signal,
}

impl Position {
    pub fn head(&self) -> (u64, Hash) {
        let head = self.head.lock().unwrap_or_else(|p| p.into_inner());
        (self.written.load(Ordering::Acquire), *head)
    }
}

/// A wake-up for threads waiting on a condition that others change.
#[derive(Debug, Default)]
pub struct Signal {
    lock: Mutex<()>,
    rung: Condvar,
    /// Threads inside [`Signal::wait_until`]: with none, a notification
    /// costs nothing (no futex call on every write).
    waiting: AtomicU64,
}

impl Signal {
    /// Wakes whoever waits. Call it after the change is visible.
    pub fn notify(&self) {
        // Pairs with the fence in `wait_until`: either the waiter is counted
        // here, or it sees the change before it sleeps.
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) == 0 {
            return;
        }
        let _g = self.lock.lock();
        self.rung.notify_all();
    }

    /// Waits for a notification, at most `timeout`, unless `ready()` already
    /// holds (checked once the waiter is counted, so that a change made
    /// meanwhile is not missed).
    pub fn wait_until(&self, ready: impl Fn() -> bool, timeout: Duration) {
        let g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.waiting.fetch_add(1, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
        if !ready() {
            let _ = self.rung.wait_timeout(g, timeout);
        }
        self.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Records below `upto` are on stable storage; the most recent fdatasync
/// failure spoiled records `bad.0..bad.1`.
#[derive(Debug, Clone, Copy, Default)]
struct Synced {
    upto: u64,
    bad: (u64, u64),
}

struct Inner {
    writer: Mutex<Writer>,
    synced: tokio::sync::watch::Sender<Synced>,
    /// Drafts waiting for the next group write, each with whom to tell.
    pending: Mutex<Vec<Waiting>>,
    /// On a runtime with one worker: a group with nobody else waiting
    /// behind it is synced by the group writer itself, with this handle on
    /// the segment, instead of by the syncer thread. See [`open`].
    sync_inline: Option<Mutex<Option<(u64, File)>>>,
    /// Rings the syncer thread when a group is written that it must sync.
    to_sync: Signal,
    /// Groups the group writer synced itself.
    synced_inline: AtomicU64,
}

/// Drafts appended together, and where their first sequence number goes.
struct Waiting {
    drafts: Vec<Draft>,
    done: tokio::sync::oneshot::Sender<Result<u64, AuditError>>,
}

/// The handle request handlers append through.
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
    config: Arc<Config>,
    pub position: Arc<Position>,
    pub dir: PathBuf,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Outbox {
    /// Appends a decision; resolves to its sequence number once durable.
    pub async fn append(&self, draft: Draft) -> Result<u64, AuditError> {
        self.append_group(vec![draft]).await
    }

    /// Appends decisions together, in order; resolves to their sequence
    /// numbers once they are written (`process`) or on stable storage
    /// (`power`).
    ///
    /// Group commit: the drafts join a queue; the first to join spawns the
    /// writer task, which yields once so that it runs after the requests
    /// already scheduled on this thread: those reach the queue too, and
    /// every draft waiting goes out in one `write` (to the page cache, under
    /// a lock). In `power` mode the answer then also waits for the next
    /// fdatasync, which covers every record written before it: the syncer
    /// thread's, or the group writer's own when nothing else waits on a
    /// one-worker runtime.
    pub async fn append_many(&self, drafts: Vec<Draft>) -> Vec<Result<u64, AuditError>> {
        let n = drafts.len() as u64;
        if n == 0 {
            return Vec::new();
        }
        match self.append_group(drafts).await {
            Ok(first) => (first..first + n).map(Ok).collect(),
            Err(e) => (0..n).map(|_| Err(e.clone())).collect(),
        }
    }

    /// [`Outbox::append_many`] for a group of one or more drafts, which
    /// succeeds or fails as a whole: the first one's sequence number.
    async fn append_group(&self, drafts: Vec<Draft>) -> Result<u64, AuditError> {
        let n = drafts.len() as u64;
        let (done, written) = tokio::sync::oneshot::channel();
        let first_in_queue = {
            let mut pending = self.inner.pending.lock().unwrap_or_else(|p| p.into_inner());
            pending.push(Waiting { drafts, done });
            pending.len() == 1
        };
        if first_in_queue {
            // A task of its own: the queue is written even if this request
            // is dropped (its client gone) while it waits.
            let outbox = self.clone();
            tokio::spawn(async move {
                // A task spawned from a worker runs next (tokio's LIFO
                // slot): step back behind the tasks already scheduled.
                tokio::task::yield_now().await;
                outbox.write_pending().await
            });
        }
        let first = written.await.map_err(|_| AuditError::Stopped)??;
        if self.config.durability == Durability::Power {
            let end = first + n;
            let mut rx = self.inner.synced.subscribe();
            let state = match rx.wait_for(|s| s.upto >= end).await {
                Ok(s) => *s,
                Err(_) => return Err(AuditError::Stopped),
            };
            if state.bad.0 < end && first < state.bad.1 {
                return Err(AuditError::Io("fdatasync failed".into()));
            }
        }
        Ok(first)
    }

    /// Has what was just written synced (`power`): by this task when it is
    /// alone on a one-worker runtime, else by the syncer thread.
    async fn sync(&self) {
        if let Some(segment) = &self.inner.sync_inline {
            // Let the requests already scheduled run up to their append.
            tokio::task::yield_now().await;
            let alone = self
                .inner
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty();
            if alone {
                let mut segment = segment.lock().unwrap_or_else(|p| p.into_inner());
                if sync_written(&self.inner, &self.position, &mut segment) {
                    self.inner.synced_inline.fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
        }
        self.inner.to_sync.notify();
    }

    /// Writes every queued draft with one `write` and tells each appender
    /// where its records start.
    async fn write_pending(&self) {
        let waiting =
            std::mem::take(&mut *self.inner.pending.lock().unwrap_or_else(|p| p.into_inner()));
        let mut drafts = Vec::with_capacity(waiting.iter().map(|w| w.drafts.len()).sum());
        let mut tell = Vec::with_capacity(waiting.len());
        for w in waiting {
            tell.push((w.drafts.len() as u64, w.done));
            drafts.extend(w.drafts);
        }
        let n = drafts.len() as u64;
        let config = &*self.config;
        let deadline = std::time::Instant::now() + Duration::from_millis(config.full_wait_ms);
        let written = loop {
            let attempt = {
                let mut w = self.inner.writer.lock().unwrap_or_else(|p| p.into_inner());
                w.append(&drafts)
            };
            if attempt.is_ok() {
                // After the lock is released: the shipper takes it as soon
                // as it wakes.
                self.position.changed.notify();
                if config.durability == Durability::Power {
                    self.sync().await;
                }
            }
            match attempt {
                Err(AuditError::Full(_))
                    if config.when_full == WhenFull::Backpressure
                        && std::time::Instant::now() < deadline =>
                {
                    // Back-pressure: wait for the shipper to make room.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                other => break other,
            }
        };
        match written {
            Ok(mut first) => {
                for (count, done) in tell {
                    // An appender that is gone needs no answer.
                    let _ = done.send(Ok(first));
                    first += count;
                }
            }
            Err(e) => {
                match &e {
                    AuditError::Full(_) => {
                        self.position.full_refusals.fetch_add(n, Ordering::Relaxed)
                    }
                    _ => self.position.write_failures.fetch_add(1, Ordering::Relaxed),
                };
                tracing::error!(error = %e, records = n, "decision records not written; those decisions are denied");
                for (_, done) in tell {
                    let _ = done.send(Err(e.clone()));
                }
            }
        }
    }
}

/// The syncer (power mode): fdatasync whenever records were written since
/// the last one, then tell the waiters. Runs on its own thread.
fn sync_loop(inner: Arc<Inner>, position: Arc<Position>) {
    let mut segment = None;
    loop {
        if !sync_written(&inner, &position, &mut segment) {
            // Nothing to sync: wait for records written and not yet synced
            // (by this thread or by a group writer that synced its own).
            let unsynced = || position.written.load(Ordering::Acquire) > inner.synced.borrow().upto;
            inner
                .to_sync
                .wait_until(unsynced, Duration::from_millis(50));
        }
    }
}

/// One fdatasync covering every record written so far, then the waiters are
/// told. Returns whether there was anything to sync. `segment`
/// is a handle on the segment being written, kept between calls and taken
/// again only when the writer moves to a new one (it syncs the one it
/// closes itself).
fn sync_written(inner: &Inner, position: &Position, segment: &mut Option<(u64, File)>) -> bool {
    let (written, file) = {
        let w = inner.writer.lock().unwrap_or_else(|p| p.into_inner());
        let file = match segment.take() {
            Some((first, f)) if first == w.segment => Ok((first, f)),
            _ => w.file.try_clone().map(|f| (w.segment, f)),
        };
        (w.next, file)
    };
    if written <= inner.synced.borrow().upto {
        *segment = file.ok();
        return false;
    }
    let synced = file.and_then(|(first, f)| {
        let r = f.sync_data();
        *segment = Some((first, f));
        r
    });
    match synced {
        Ok(()) => {
            inner.synced.send_modify(|s| s.upto = s.upto.max(written));
        }
        Err(e) => {
            position.write_failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, "fdatasync of the outbox failed; the decisions waiting for it are denied");
            inner.synced.send_modify(|s| {
                s.bad = (s.upto, written);
                s.upto = s.upto.max(written);
            });
        }
    }
    true
}

fn seg_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("seg-{first:020}.vlog"))
}

/// Segment first-seqs, sorted.
pub fn segments(dir: &Path) -> std::io::Result<Vec<u64>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if let Some(n) = name
            .strip_prefix("seg-")
            .and_then(|n| n.strip_suffix(".vlog"))
        {
            if let Ok(n) = n.parse() {
                out.push(n);
            }
        }
    }
    out.sort_unstable();
    Ok(out)
}

fn io(e: impl std::fmt::Display) -> AuditError {
    AuditError::Io(e.to_string())
}

fn frame_crc(seq: u64, chain: &Hash, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(chain);
    h.update(payload);
    h.finalize()
}

fn encode_frame(seq: u64, chain: &Hash, payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&frame_crc(seq, chain, payload).to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(chain);
    out.extend_from_slice(payload);
}

/// One record read back from a segment.
#[derive(Debug, Clone)]
pub struct Frame {
    pub seq: u64,
    pub chain: Hash,
    pub payload: Vec<u8>,
}

/// Reads the next frame; `None` at the end or at a torn or corrupt frame.
fn read_frame(r: &mut impl Read) -> Option<Frame> {
    let mut header = [0u8; FRAME_HEADER];
    r.read_exact(&mut header).ok()?;
    let len = u32::from_le_bytes(header[0..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(header[4..8].try_into().ok()?);
    let seq = u64::from_le_bytes(header[8..16].try_into().ok()?);
    let chain: Hash = header[16..48].try_into().ok()?;
    if len > MAX_RECORD {
        return None;
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).ok()?;
    (frame_crc(seq, &chain, &payload) == crc).then_some(Frame {
        seq,
        chain,
        payload,
    })
}

/// Reads a segment header: (first seq, chain hash before it).
fn read_header(r: &mut impl Read) -> Option<(u64, Hash)> {
    let mut h = [0u8; SEGMENT_HEADER as usize];
    r.read_exact(&mut h).ok()?;
    if &h[0..8] != SEGMENT_MAGIC {
        return None;
    }
    Some((
        u64::from_le_bytes(h[8..16].try_into().ok()?),
        h[16..48].try_into().ok()?,
    ))
}

fn segment_header(first: u64, prev: &Hash) -> Vec<u8> {
    let mut header = Vec::with_capacity(SEGMENT_HEADER as usize);
    header.extend_from_slice(SEGMENT_MAGIC);
    header.extend_from_slice(&first.to_le_bytes());
    header.extend_from_slice(prev);
    header
}

/// Writes zeros over `from..to` of `f` (its cursor stays where it is) and
/// syncs them.
fn zero_fill(f: &File, from: u64, to: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let zeros = vec![0u8; 1 << 20];
    let mut at = from;
    while at < to {
        let n = (to - at).min(zeros.len() as u64) as usize;
        f.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    f.sync_data()
}

/// Makes `dir/spare` on a thread of its own, unless it is there or being
/// made: a segment's worth of zeros, synced, for the next segment.
fn prepare_spare(dir: &Path, busy: &Arc<AtomicBool>) {
    if dir.join(SPARE).exists() || busy.swap(true, Ordering::AcqRel) {
        return;
    }
    let (dir, done) = (dir.to_path_buf(), Arc::clone(busy));
    let spawned = std::thread::Builder::new()
        .name("vigie-outbox-spare".into())
        .spawn(move || {
            let tmp = dir.join(SPARE_TMP);
            let made = File::create(&tmp)
                .and_then(|f| zero_fill(&f, 0, SEGMENT_BYTES))
                .and_then(|()| std::fs::rename(&tmp, dir.join(SPARE)));
            if let Err(e) = made {
                let _ = std::fs::remove_file(&tmp);
                tracing::warn!(error = %e, "cannot make the next outbox segment ready; it will be appended to");
            }
            done.store(false, Ordering::Release);
        });
    if spawned.is_err() {
        busy.store(false, Ordering::Release);
    }
}

/// The spare made segment `first`: its header written over its first bytes
/// and synced, then renamed into place. `None` when no spare is ready.
fn take_spare(dir: &Path, first: u64, prev: &Hash) -> std::io::Result<Option<File>> {
    use std::os::unix::fs::FileExt;
    let spare = dir.join(SPARE);
    let mut f = match OpenOptions::new().read(true).write(true).open(&spare) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if f.metadata()?.len() != SEGMENT_BYTES {
        // Not one this version made: start over.
        drop(f);
        std::fs::remove_file(&spare)?;
        return Ok(None);
    }
    f.write_all_at(&segment_header(first, prev), 0)?;
    f.sync_data()?;
    std::fs::rename(&spare, seg_path(dir, first))?;
    sync_dir(dir);
    f.seek(SeekFrom::Start(SEGMENT_HEADER))?;
    Ok(Some(f))
}

/// Bytes from `from` to the last one that is not zero: what a crash tore,
/// as opposed to the zeros written ahead in `power` mode.
fn torn_bytes(f: &mut File, from: u64) -> std::io::Result<u64> {
    f.seek(SeekFrom::Start(from))?;
    let (mut at, mut end) = (from, from);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(end - from);
        }
        if let Some(i) = buf[..n].iter().rposition(|b| *b != 0) {
            end = at + i as u64 + 1;
        }
        at += n as u64;
    }
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

struct Writer {
    dir: PathBuf,
    sidecar: String,
    config: Config,
    position: Arc<Position>,
    file: File,
    /// First sequence number of the segment `file` is.
    segment: u64,
    file_len: u64,
    next: u64,
    head: Hash,
    /// `power` mode: segments end in zeros written ahead (see the module's
    /// doc), and whether `outbox/spare` is being made.
    zero_tail: Option<Arc<AtomicBool>>,
}

/// What `open` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    /// A new chain was started (reason: `new` or `outbox_lost`).
    Started(&'static str),
    /// An existing outbox was recovered; `cut` torn bytes were dropped.
    Recovered { cut: u64 },
}

/// Opens (or creates) the outbox in `dir` and starts its writer thread.
/// `history` lists every chain this sidecar started (kept beside the
/// outbox): an outbox missing while it names a chain was lost.
pub fn open(
    dir: &Path,
    history: &Path,
    sidecar: &str,
    config: &Config,
) -> Result<(Outbox, Opened), AuditError> {
    let chain_file = dir.join("chain");
    let existing = segments(dir).unwrap_or_default();
    let (mut writer, opened) = if chain_file.exists() && !existing.is_empty() {
        recover(dir, sidecar, config, &existing)?
    } else {
        let reason = if history.exists() || dir.exists() {
            "outbox_lost"
        } else {
            "new"
        };
        let w = start_chain(dir, sidecar, config, reason)?;
        let mut h = OpenOptions::new()
            .create(true)
            .append(true)
            .open(history)
            .map_err(io)?;
        writeln!(h, "{} {}", w.position.chain, reason).map_err(io)?;
        h.sync_all().map_err(io)?;
        (w, Opened::Started(reason))
    };
    let power = writer.config.durability == Durability::Power;
    let _ = std::fs::remove_file(dir.join(SPARE_TMP));
    if power {
        writer.write_zeros_ahead();
    } else {
        let _ = std::fs::remove_file(dir.join(SPARE));
    }
    let position = Arc::clone(&writer.position);
    let durable = writer.next;
    let config = Arc::new(writer.config.clone());
    let (synced, _) = tokio::sync::watch::channel(Synced {
        upto: durable,
        bad: (0, 0),
    });
    // With one worker (a sidecar given one core) and no other request
    // waiting to run, the worker has nothing to do while the disk syncs: it
    // syncs itself, which saves the hand-off to the syncer thread and back
    // (1 connection: p50 about 520 -> 450 us with wrk). Otherwise the
    // syncer does it, so that the next group is built while the disk works:
    // syncing every group on the worker cost 22% of the throughput at 32
    // connections, and 15% at 2.
    let one_worker =
        tokio::runtime::Handle::try_current().is_ok_and(|h| h.metrics().num_workers() == 1);
    let inner = Arc::new(Inner {
        writer: Mutex::new(writer),
        synced,
        pending: Mutex::new(Vec::new()),
        sync_inline: one_worker.then(|| Mutex::new(None)),
        to_sync: Signal::default(),
        synced_inline: AtomicU64::new(0),
    });
    if power {
        let (i, p) = (Arc::clone(&inner), Arc::clone(&position));
        std::thread::Builder::new()
            .name("vigie-outbox-sync".into())
            .spawn(move || sync_loop(i, p))
            .map_err(io)?;
    }
    Ok((
        Outbox {
            inner,
            config,
            position,
            dir: dir.to_path_buf(),
        },
        opened,
    ))
}

fn new_position(chain: String, written: u64, head: Hash, acked: u64, bytes: u64) -> Arc<Position> {
    Arc::new(Position {
        chain,
        written: AtomicU64::new(written),
        head: Mutex::new(head),
        acked: AtomicU64::new(acked),
        bytes: AtomicU64::new(bytes),
        write_failures: AtomicU64::new(0),
        full_refusals: AtomicU64::new(0),
        changed: Signal::default(),
    })
}

fn start_chain(
    dir: &Path,
    sidecar: &str,
    config: &Config,
    reason: &'static str,
) -> Result<Writer, AuditError> {
    if dir.exists() {
        // Whatever is left of a lost outbox is kept aside, never reused.
        let aside = dir.with_file_name(format!("outbox.lost-{}", crate::cache::now_ms()));
        std::fs::rename(dir, &aside).map_err(io)?;
        tracing::error!(moved_to = %aside.display(), "the outbox is incomplete; starting a new chain");
    }
    std::fs::create_dir_all(dir).map_err(io)?;
    let chain = uuid::Uuid::now_v7().to_string();
    let mut f = File::create(dir.join("chain")).map_err(io)?;
    f.write_all(chain.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    let file = new_segment(dir, 0, &GENESIS)?;
    sync_dir(dir);
    let position = new_position(chain.clone(), 0, GENESIS, 0, SEGMENT_HEADER);
    let mut w = Writer {
        dir: dir.to_path_buf(),
        sidecar: sidecar.to_owned(),
        config: config.clone(),
        position,
        file,
        segment: 0,
        file_len: SEGMENT_HEADER,
        next: 0,
        head: GENESIS,
        zero_tail: None,
    };
    let ts = rfc3339_nanos(SystemTime::now());
    let bytes = super::chain_start(
        &Stamp {
            sidecar,
            chain: &chain,
            seq: 0,
            ts: &ts,
        },
        reason,
    );
    w.write_batch(&[bytes])?;
    w.file.sync_data().map_err(io)?;
    if reason == "outbox_lost" {
        tracing::warn!(chain = %chain, "new chain started after the outbox was lost; the ledger will flag the reset");
    }
    Ok(w)
}

fn new_segment(dir: &Path, first: u64, prev: &Hash) -> Result<File, AuditError> {
    let path = seg_path(dir, first);
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .read(true)
        .open(&path)
        .map_err(io)?;
    f.write_all(&segment_header(first, prev)).map_err(io)?;
    f.sync_all().map_err(io)?;
    sync_dir(dir);
    Ok(f)
}

fn recover(
    dir: &Path,
    sidecar: &str,
    config: &Config,
    segs: &[u64],
) -> Result<(Writer, Opened), AuditError> {
    let chain = std::fs::read_to_string(dir.join("chain"))
        .map_err(io)?
        .trim()
        .to_owned();
    let acked = std::fs::read_to_string(dir.join("acked"))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let last = *segs.last().ok_or_else(|| io("no segment"))?;
    let path = seg_path(dir, last);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io)?;
    let (first, prev) = read_header(&mut f)
        .ok_or_else(|| io(format!("`{}`: bad segment header", path.display())))?;
    let mut next = first;
    let mut head = prev;
    let mut good = SEGMENT_HEADER;
    let mut reader = std::io::BufReader::new(&mut f);
    while let Some(frame) = read_frame(&mut reader) {
        // A frame must continue the chain, or it is not ours to keep.
        if frame.seq != next || chain_hash(&head, &leaf_hash(&frame.payload)) != frame.chain {
            break;
        }
        next += 1;
        head = frame.chain;
        good += (FRAME_HEADER + frame.payload.len()) as u64;
    }
    drop(reader);
    let len = f.metadata().map_err(io)?.len();
    let mut cut = 0;
    if len > good {
        cut = torn_bytes(&mut f, good).map_err(io)?;
        if cut > 0 {
            tracing::warn!(segment = %path.display(), bytes = cut, "cutting a torn tail off the outbox");
        }
        f.set_len(good).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    f.seek(SeekFrom::Start(good)).map_err(io)?;
    let mut bytes = 0;
    for s in segs {
        bytes += std::fs::metadata(seg_path(dir, *s))
            .map(|m| m.len())
            .unwrap_or(0);
    }
    let position = new_position(chain, next, head, acked, bytes);
    Ok((
        Writer {
            dir: dir.to_path_buf(),
            sidecar: sidecar.to_owned(),
            config: config.clone(),
            position,
            file: f,
            segment: first,
            file_len: good,
            next,
            head,
            zero_tail: None,
        },
        Opened::Recovered { cut },
    ))
}

impl Writer {
    /// `power` mode: the segment being written is given its tail of zeros,
    /// and the next one is made ready. Without them records are appended,
    /// which is slower to sync, not less safe.
    fn write_zeros_ahead(&mut self) {
        if self.file_len < SEGMENT_BYTES {
            if let Err(e) = zero_fill(&self.file, self.file_len, SEGMENT_BYTES) {
                tracing::warn!(error = %e, "cannot write the outbox segment's zeros ahead; records will be appended");
            }
        }
        let busy = Arc::new(AtomicBool::new(false));
        prepare_spare(&self.dir, &busy);
        self.zero_tail = Some(busy);
    }

    /// Encodes and writes drafts as one group; returns the first seq.
    fn append(&mut self, drafts: &[Draft]) -> Result<u64, AuditError> {
        let ts = rfc3339_nanos(SystemTime::now());
        let chain = self.position.chain.clone();
        let payloads: Vec<Vec<u8>> = drafts
            .iter()
            .enumerate()
            .map(|(i, d)| {
                d.encode(&Stamp {
                    sidecar: &self.sidecar,
                    chain: &chain,
                    seq: self.next + i as u64,
                    ts: &ts,
                })
            })
            .collect();
        let size: u64 = payloads
            .iter()
            .map(|p| (p.len() + FRAME_HEADER) as u64)
            .sum();
        if self.unacked_bytes() + size > self.config.max_outbox_bytes {
            return Err(AuditError::Full(self.unacked_bytes()));
        }
        self.write_batch(&payloads)
    }

    /// Bytes held that the ledger has not acknowledged, as far as we know.
    fn unacked_bytes(&self) -> u64 {
        self.position.bytes.load(Ordering::Relaxed)
    }

    /// Writes records as one group; returns the first sequence number. On
    /// failure nothing is kept: the file is cut back and no number is used.
    fn write_batch(&mut self, payloads: &[Vec<u8>]) -> Result<u64, AuditError> {
        if self.file_len > SEGMENT_BYTES {
            // A closed segment is cut to its records and made durable
            // before the next one starts.
            self.file.set_len(self.file_len).map_err(io)?;
            self.file.sync_data().map_err(io)?;
            self.file = match &self.zero_tail {
                Some(busy) => {
                    // A spare that cannot be taken is dropped, not a reason
                    // to refuse records: the segment is then appended to.
                    let spare = take_spare(&self.dir, self.next, &self.head).unwrap_or_else(|e| {
                        tracing::warn!(error = %e, "cannot take the spare outbox segment; appending to a new one");
                        let _ = std::fs::remove_file(self.dir.join(SPARE));
                        None
                    });
                    prepare_spare(&self.dir, busy);
                    match spare {
                        Some(f) => f,
                        None => new_segment(&self.dir, self.next, &self.head)?,
                    }
                }
                None => new_segment(&self.dir, self.next, &self.head)?,
            };
            self.segment = self.next;
            self.file_len = SEGMENT_HEADER;
            self.position
                .bytes
                .fetch_add(SEGMENT_HEADER, Ordering::Relaxed);
        }
        let first = self.next;
        let mut head = self.head;
        let mut buf = Vec::with_capacity(payloads.iter().map(|p| p.len() + FRAME_HEADER).sum());
        for (i, p) in payloads.iter().enumerate() {
            if p.len() > MAX_RECORD {
                return Err(io(format!(
                    "a record of {} bytes is over the limit",
                    p.len()
                )));
            }
            head = chain_hash(&head, &leaf_hash(p));
            encode_frame(first + i as u64, &head, p, &mut buf);
        }
        if let Err(e) = self.file.write_all(&buf) {
            // Cut back whatever part of the group reached the file.
            let _ = self.file.set_len(self.file_len);
            let _ = self.file.seek(SeekFrom::Start(self.file_len));
            return Err(io(e));
        }
        self.file_len += buf.len() as u64;
        self.next = first + payloads.len() as u64;
        self.head = head;
        self.position
            .bytes
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        {
            let mut h = self.position.head.lock().unwrap_or_else(|p| p.into_inner());
            *h = head;
            self.position.written.store(self.next, Ordering::Release);
        }
        Ok(first)
    }
}

/// Records `acked` as acknowledged (every seq below it) and deletes the
/// segments that hold nothing else. Never deletes the segment being written.
pub fn trim(dir: &Path, position: &Position, acked: u64) -> std::io::Result<()> {
    if acked <= position.acked.load(Ordering::Acquire) {
        return Ok(());
    }
    let tmp = dir.join("acked.tmp");
    std::fs::write(&tmp, format!("{acked}\n"))?;
    std::fs::rename(&tmp, dir.join("acked"))?;
    position.acked.store(acked, Ordering::Release);
    let segs = segments(dir)?;
    for pair in segs.windows(2) {
        // Segment pair[0] holds seqs pair[0]..pair[1].
        if pair[1] <= acked {
            let path = seg_path(dir, pair[0]);
            let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            std::fs::remove_file(&path)?;
            position.bytes.fetch_sub(
                len.min(position.bytes.load(Ordering::Relaxed)),
                Ordering::Relaxed,
            );
        }
    }
    position.changed.notify();
    Ok(())
}

/// Sequential reader of durable records, for the shipper.
#[derive(Debug)]
pub struct Reader {
    dir: PathBuf,
    /// (segment first seq, offset of the next frame, its seq, chain before it)
    cursor: Option<(u64, u64, u64, Hash)>,
}

impl Reader {
    pub fn new(dir: &Path) -> Reader {
        Reader {
            dir: dir.to_path_buf(),
            cursor: None,
        }
    }

    /// Up to `max` durable records from `from` (below `written`), and the
    /// chain hash before `from`.
    pub fn read(
        &mut self,
        from: u64,
        written: u64,
        max: usize,
    ) -> std::io::Result<(Hash, Vec<Frame>)> {
        let mut frames = Vec::new();
        if from >= written {
            return Ok((self.cursor.map(|c| c.3).unwrap_or(GENESIS), frames));
        }
        let segs = segments(&self.dir)?;
        let (mut seg, mut offset, mut seq, mut prev) = match self.cursor {
            Some(c) if c.2 == from => c,
            _ => {
                let seg = *segs.iter().rev().find(|s| **s <= from).ok_or_else(|| {
                    std::io::Error::other(format!("record {from} is no longer in the outbox"))
                })?;
                let mut f = File::open(seg_path(&self.dir, seg))?;
                let (first, prev) = read_header(&mut f)
                    .ok_or_else(|| std::io::Error::other("bad segment header"))?;
                (seg, SEGMENT_HEADER, first, prev)
            }
        };
        let mut before = prev;
        'segments: loop {
            let mut f = std::io::BufReader::new(File::open(seg_path(&self.dir, seg))?);
            f.seek(SeekFrom::Start(offset))?;
            while seq < written && frames.len() < max {
                let Some(frame) = read_frame(&mut f) else {
                    break;
                };
                offset += (FRAME_HEADER + frame.payload.len()) as u64;
                seq = frame.seq + 1;
                if frame.seq < from {
                    prev = frame.chain;
                    before = prev;
                    continue;
                }
                prev = frame.chain;
                frames.push(frame);
            }
            if seq >= written || frames.len() >= max {
                break;
            }
            // The end of this segment: go on to the next one, if any.
            match segs.iter().find(|s| **s > seg) {
                Some(next) if *next == seq => {
                    seg = *next;
                    offset = SEGMENT_HEADER;
                    continue 'segments;
                }
                _ => break,
            }
        }
        self.cursor = Some((seg, offset, seq, prev));
        Ok((before, frames))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::Asked;
    use serde_json::json;

    fn asked(context: &serde_json::Value) -> Arc<Asked> {
        let texts = ["P".into(), "A".into(), "R".into()];
        Arc::new(Asked::new(texts, context, 0, &[]))
    }

    fn draft(i: u64) -> Draft {
        Draft {
            decision_id: format!("d{i}"),
            request: asked(&json!({})),
            allow: true,
            reasons: vec![],
            errors: vec![],
            epoch: 1,
            policy_hash: "h".into(),
            cached: false,
            plugins: Vec::new(),
            trace_id: None,
        }
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    fn power() -> Config {
        Config {
            durability: Durability::Power,
            ..Config::default()
        }
    }

    #[test]
    fn records_are_gapless_chained_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("outbox");
        let config = Config::default();
        let (ob, opened) = open(&out, &dir.path().join("chains"), "s1", &config).unwrap();
        assert_eq!(opened, Opened::Started("new"));
        let seqs: Vec<u64> = rt().block_on(async {
            let mut v = Vec::new();
            for i in 0..5 {
                v.push(ob.append(draft(i)).await.unwrap());
            }
            v
        });
        assert_eq!(seqs, vec![1, 2, 3, 4, 5], "seq 0 is the chain start");
        let (written, head) = ob.position.head();
        drop(ob);

        let (ob, opened) = open(&out, &dir.path().join("chains"), "s1", &config).unwrap();
        assert_eq!(opened, Opened::Recovered { cut: 0 });
        assert_eq!(ob.position.head(), (written, head));
        let mut r = Reader::new(&out);
        let (prev, frames) = r.read(0, written, 100).unwrap();
        assert_eq!(prev, GENESIS);
        assert_eq!(frames.len(), 6);
        let mut h = GENESIS;
        for (i, f) in frames.iter().enumerate() {
            assert_eq!(f.seq, i as u64);
            h = chain_hash(&h, &leaf_hash(&f.payload));
            assert_eq!(h, f.chain);
        }
        assert_eq!(h, head);
        // Reading on from the middle gives the chain before it.
        let mut r = Reader::new(&out);
        let (prev, frames) = r.read(3, written, 2).unwrap();
        assert_eq!(frames.iter().map(|f| f.seq).collect::<Vec<_>>(), vec![3, 4]);
        let mut h = GENESIS;
        for f in &Reader::new(&out).read(0, 3, 10).unwrap().1 {
            h = f.chain;
        }
        assert_eq!(prev, h);
    }

    /// `power`: every append resolves only once its record is synced, with
    /// gapless numbers, whether the group writer syncs (one worker) or the
    /// syncer thread does (several, or others waiting).
    #[test]
    fn power_mode_answers_only_synced_records() {
        let one_worker = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let two_workers = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        for (inline, rt) in [(true, one_worker), (false, two_workers)] {
            let dir = tempfile::tempdir().unwrap();
            let config = Config {
                durability: Durability::Power,
                ..Config::default()
            };
            let ob = rt.block_on(async {
                let out = dir.path().join("outbox");
                open(&out, &dir.path().join("chains"), "s1", &config)
                    .unwrap()
                    .0
            });
            assert_eq!(ob.inner.sync_inline.is_some(), inline);
            let mut seqs: Vec<u64> = rt.block_on(async {
                // Five alone (with one worker, the group writer syncs them,
                // unless the syncer's timer beat it to all five), then 64
                // at once (their groups go to the syncer).
                let mut seqs = Vec::new();
                for i in 0..5 {
                    let seq = ob.append(draft(i)).await.unwrap();
                    assert!(ob.inner.synced.borrow().upto > seq);
                    seqs.push(seq);
                }
                let by_writer = ob.inner.synced_inline.load(Ordering::Relaxed);
                assert_eq!(
                    by_writer > 0,
                    inline,
                    "synced by the group writer: {by_writer}"
                );
                let tasks: Vec<_> = (5..69)
                    .map(|i| {
                        let ob = ob.clone();
                        tokio::spawn(async move {
                            let seq = ob.append(draft(i)).await.unwrap();
                            assert!(
                                ob.inner.synced.borrow().upto > seq,
                                "answered before synced"
                            );
                            seq
                        })
                    })
                    .collect();
                for t in tasks {
                    let answered = tokio::time::timeout(Duration::from_secs(10), t);
                    seqs.push(answered.await.expect("an append never resolved").unwrap());
                }
                seqs
            });
            seqs.sort_unstable();
            assert_eq!(seqs, (1..=69).collect::<Vec<u64>>(), "inline: {inline}");
        }
    }

    #[test]
    fn a_torn_tail_is_cut_and_numbering_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("outbox");
        let config = Config {
            durability: Durability::Process,
            ..Config::default()
        };
        let (ob, _) = open(&out, &dir.path().join("chains"), "s1", &config).unwrap();
        rt().block_on(async {
            for i in 0..3 {
                ob.append(draft(i)).await.unwrap();
            }
        });
        drop(ob);
        let seg = seg_path(&out, 0);
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[7, 0, 0, 0, 1, 2, 3]).unwrap();
        drop(f);
        let (ob, opened) = open(&out, &dir.path().join("chains"), "s1", &config).unwrap();
        assert_eq!(opened, Opened::Recovered { cut: 7 });
        let seq = rt().block_on(ob.append(draft(9))).unwrap();
        assert_eq!(seq, 4);
    }

    /// A `power` outbox in `dir`, once its spare is made, and a runtime.
    fn power_outbox(dir: &Path) -> (PathBuf, tokio::runtime::Runtime, Outbox) {
        let out = dir.join("outbox");
        let rt = rt();
        let ob = rt.block_on(async { open(&out, &dir.join("chains"), "s1", &power()).unwrap().0 });
        assert!(spare_made(&out));
        (out, rt, ob)
    }

    /// Records of about 100 kB, 20 to a group, ten groups: past a 16 MiB
    /// segment in the ninth.
    fn fill_past_a_segment(rt: &tokio::runtime::Runtime, ob: &Outbox) {
        let big = |i: u64| Draft {
            request: asked(&json!({ "blob": "x".repeat(100_000) })),
            ..draft(i)
        };
        rt.block_on(async {
            for g in 0..10 {
                let seqs = ob
                    .append_many((0..20).map(|i| big(g * 20 + i)).collect())
                    .await;
                assert!(seqs.iter().all(Result::is_ok));
            }
        });
    }

    /// Waits (bounded) for the spare segment to be made.
    fn spare_made(out: &Path) -> bool {
        (0..500).any(|_| {
            std::thread::sleep(Duration::from_millis(10));
            out.join(SPARE).exists()
        })
    }

    /// `power`: the segment ends in zeros written ahead; a reopening does
    /// not take them for a torn tail, cuts what a crash left among them,
    /// and `process` mode leaves the segment cut to its records.
    #[test]
    fn power_mode_writes_over_zeros_and_recovery_tells_them_from_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("outbox");
        let chains = dir.path().join("chains");
        let (power, rt) = (power(), rt());
        let seg = seg_path(&out, 0);
        let len = || std::fs::metadata(&seg).unwrap().len();
        let ob = rt.block_on(async { open(&out, &chains, "s1", &power).unwrap().0 });
        rt.block_on(async {
            for i in 0..3 {
                ob.append(draft(i)).await.unwrap();
            }
        });
        assert_eq!(len(), SEGMENT_BYTES, "the zeros are written ahead");
        assert!(spare_made(&out), "the next segment is made ready");
        let written = ob.position.head();
        drop(ob);

        let (ob, opened) = rt.block_on(async { open(&out, &chains, "s1", &power).unwrap() });
        assert_eq!(opened, Opened::Recovered { cut: 0 });
        assert_eq!(ob.position.head(), written);
        assert_eq!(len(), SEGMENT_BYTES);
        let data_end = ob.inner.writer.lock().unwrap().file_len;
        drop(ob);

        // A crash left bytes among the zeros: cut, up to the last of them.
        {
            use std::os::unix::fs::FileExt;
            let f = OpenOptions::new().write(true).open(&seg).unwrap();
            f.write_all_at(&[9, 9, 9, 9, 9], data_end + 10).unwrap();
        }
        let (ob, opened) = rt.block_on(async { open(&out, &chains, "s1", &power).unwrap() });
        assert_eq!(opened, Opened::Recovered { cut: 15 });
        assert_eq!(ob.position.head(), written);
        let seq = rt.block_on(ob.append(draft(7))).unwrap();
        assert_eq!(seq, written.0);
        let written = ob.position.head();
        drop(ob);

        let process = Config {
            durability: Durability::Process,
            ..Config::default()
        };
        let (ob, opened) = rt.block_on(async { open(&out, &chains, "s1", &process).unwrap() });
        assert_eq!(opened, Opened::Recovered { cut: 0 });
        assert_eq!(ob.position.head(), written);
        assert!(len() < SEGMENT_BYTES, "cut to its records: {}", len());
        assert!(!out.join(SPARE).exists());
        let (_, frames) = Reader::new(&out).read(0, written.0, 100).unwrap();
        assert_eq!(frames.len() as u64, written.0);
    }

    /// `power`: a full segment is closed cut to its records, and the next
    /// one starts from the spare, which is made again.
    #[test]
    fn power_mode_starts_the_next_segment_from_the_spare() {
        let dir = tempfile::tempdir().unwrap();
        let (out, rt, ob) = power_outbox(dir.path());
        fill_past_a_segment(&rt, &ob);
        let segs = segments(&out).unwrap();
        assert_eq!(segs.len(), 2, "{segs:?}");
        let closed = std::fs::read(seg_path(&out, 0)).unwrap();
        assert!(closed.len() as u64 > SEGMENT_BYTES);
        assert_ne!(closed.last(), Some(&0), "no zeros after the last record");
        let next = seg_path(&out, segs[1]);
        assert_eq!(std::fs::metadata(&next).unwrap().len(), SEGMENT_BYTES);
        assert!(spare_made(&out), "a new spare is made");
        let written = ob.position.head();
        drop(ob);
        let (ob, opened) =
            rt.block_on(async { open(&out, &dir.path().join("chains"), "s1", &power()).unwrap() });
        assert_eq!(opened, Opened::Recovered { cut: 0 });
        assert_eq!(ob.position.head(), written);
        let (prev, frames) = Reader::new(&out).read(0, written.0, 1000).unwrap();
        assert_eq!(prev, GENESIS);
        assert_eq!(frames.len() as u64, written.0);
        let mut h = GENESIS;
        for f in &frames {
            h = chain_hash(&h, &leaf_hash(&f.payload));
            assert_eq!(h, f.chain);
        }
        assert_eq!(h, written.1);
    }

    /// `power`: a spare that cannot be taken (here a directory in its
    /// place) does not stop records: the next segment is appended to.
    #[test]
    fn power_mode_appends_when_the_spare_cannot_be_taken() {
        let dir = tempfile::tempdir().unwrap();
        let (out, rt, ob) = power_outbox(dir.path());
        std::fs::remove_file(out.join(SPARE)).unwrap();
        std::fs::create_dir(out.join(SPARE)).unwrap();
        fill_past_a_segment(&rt, &ob);
        let segs = segments(&out).unwrap();
        assert_eq!(segs.len(), 2, "{segs:?}");
        let next = std::fs::metadata(seg_path(&out, segs[1])).unwrap().len();
        assert!(next < SEGMENT_BYTES, "appended: {next}");
        let written = ob.position.head();
        let (_, frames) = Reader::new(&out).read(0, written.0, 1000).unwrap();
        assert_eq!(frames.len() as u64, written.0);
    }

    #[test]
    fn a_lost_outbox_starts_a_new_chain_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("outbox");
        let (ob, _) = open(&out, &dir.path().join("chains"), "s1", &Config::default()).unwrap();
        let first_chain = ob.position.chain.clone();
        drop(ob);
        std::fs::remove_file(seg_path(&out, 0)).unwrap();
        let (ob, opened) =
            open(&out, &dir.path().join("chains"), "s1", &Config::default()).unwrap();
        assert_eq!(opened, Opened::Started("outbox_lost"));
        assert_ne!(ob.position.chain, first_chain);
        let (_, frames) = Reader::new(&out).read(0, 1, 1).unwrap();
        let text = String::from_utf8(frames[0].payload.clone()).unwrap();
        assert!(
            text.contains("\"kind\":\"chain_start\"")
                && text.contains("\"reason\":\"outbox_lost\""),
            "{text}"
        );
    }

    #[test]
    fn a_full_outbox_fails_closed_when_configured() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("outbox");
        let config = Config {
            max_outbox_bytes: 1000,
            when_full: WhenFull::FailClosed,
            ..Config::default()
        };
        let (ob, _) = open(&out, &dir.path().join("chains"), "s1", &config).unwrap();
        let results: Vec<_> = rt().block_on(async {
            let mut v = Vec::new();
            for i in 0..6 {
                v.push(ob.append(draft(i)).await);
            }
            v
        });
        assert!(results.iter().any(Result::is_ok));
        assert!(matches!(results.last(), Some(Err(AuditError::Full(_)))));
        // Acknowledging makes room (segments roll only past 16 MiB, so trim
        // records the ack; room comes back as segments are deleted).
        assert!(ob.position.full_refusals.load(Ordering::Relaxed) > 0);
    }
}
