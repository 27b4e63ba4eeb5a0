//! Hot reload: notices a change in the policy directory and asks [`Shared`]
//! to reload it.
//!
//! File-system events (inotify, FSEvents, ...) trigger a reload at once; a
//! poll of the directory's file sizes and modification times runs beside them
//! as a fallback (when watching is unavailable, or misses a change such as a
//! Kubernetes ConfigMap's symlink swap). Runs on its own thread: it must never
//! block the async runtime, and never touch the bundle itself.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use notify::Watcher as _;

use crate::state::Shared;

/// How long the directory must stay quiet after an event before reloading,
/// so that an editor's write-then-rename is seen as one change.
const SETTLE: Duration = Duration::from_millis(50);

/// Sizes and modification times of every file under the directory.
type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

fn fingerprint(dir: &Path) -> Fingerprint {
    fn walk(dir: &Path, out: &mut Fingerprint) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            // `metadata` follows symlinks, as a reload would.
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if meta.is_dir() {
                walk(&path, out);
            } else {
                out.push((path, meta.len(), meta.modified().ok()));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, &mut out);
    out.sort();
    out
}

/// Starts watching the policy directory, and returns the loop that reloads
/// on changes (blocking until the process ends: give it a thread). The
/// watch is in place and the directory's state taken when this returns, so
/// a change made after the sidecar answers its first request is never
/// missed, however late the thread starts.
pub fn watch(shared: Arc<Shared>) -> impl FnOnce() + Send {
    let dir = shared.policy_dir.clone();
    let interval = Duration::from_millis(shared.config.policies.poll_interval_ms.max(10));
    let (tx, rx) = mpsc::channel::<()>();
    let watcher = match notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Reading the directory (as a reload does) raises access events:
        // only changes count, or every reload would trigger the next.
        if let Ok(event) = event {
            if !matches!(event.kind, notify::EventKind::Access(_)) {
                let _ = tx.send(());
            }
        }
    }) {
        Ok(mut w) => match w.watch(&dir, notify::RecursiveMode::Recursive) {
            Ok(()) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the policy directory; polling every {interval:?}");
                None
            }
        },
        Err(e) => {
            tracing::warn!(error = %e, "file watching unavailable; polling every {interval:?}");
            None
        }
    };

    let mut last = fingerprint(&dir);
    move || {
        // The watcher lives as long as the loop.
        let _watcher = watcher;
        loop {
            let changed = match rx.recv_timeout(interval) {
                Ok(()) => {
                    // Let the burst of events settle.
                    while rx.recv_timeout(SETTLE).is_ok() {}
                    true
                }
                Err(mpsc::RecvTimeoutError::Timeout) => fingerprint(&dir) != last,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(interval);
                    fingerprint(&dir) != last
                }
            };
            if changed {
                last = fingerprint(&dir);
                // Errors are logged and kept in the status by `reload` itself.
                let _ = shared.reload();
            }
        }
    }
}
