//! The shipper: sends the outbox to the ledger in signed, gzip'd batches,
//! and trims only what the ledger acknowledged.
//!
//! A batch is `POST <ledger>/v1/batches`, body gzip'd JSON
//! `{"note": "<signed note>", "records": ["<base64 of the exact bytes>", ...]}`.
//! The note (C2SP signed-note, signed with the sidecar's key) says:
//!
//! ```text
//! vigie-batch/v1
//! sidecar <id>
//! chain <chain id>
//! first <seq>
//! last <seq>
//! prev <base64 chain hash before first>
//! head <base64 chain hash after last>
//! time <RFC 3339>
//! ```
//!
//! When idle, a `vigie-heartbeat/v1` note (sidecar, chain, `next <seq>`,
//! head, time) and no records, so that a truncated tail is detectable. The
//! ledger answers `{"committed": <highest seq committed in this chain>}`.
//! Failures are retried with exponential backoff and jitter; nothing is
//! trimmed before the ledger said so. Runs on its own thread.

use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};

use super::outbox::{self, Outbox, Reader};
use super::{rfc3339_nanos, Config};
use crate::note::KeyPair;

/// Figures for `/v1/status` and `/metrics`.
#[derive(Debug, Default)]
pub struct Stats {
    pub batches: AtomicU64,
    pub records: AtomicU64,
    pub heartbeats: AtomicU64,
    pub failures: AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

/// Runs until the process ends.
pub fn run(outbox: Outbox, key: Arc<KeyPair>, sidecar: String, config: Config, stats: Arc<Stats>) {
    let Some(base) = config.ledger.clone() else {
        return;
    };
    let url = format!("{}/v1/batches", base.trim_end_matches('/'));
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .build();
    let pos = Arc::clone(&outbox.position);
    let mut reader = Reader::new(&outbox.dir);
    let mut backoff = Duration::from_millis(100);
    let max_backoff = Duration::from_millis(config.max_backoff_ms.max(100));
    let mut last_sent = Instant::now();
    let mut heartbeat_due = true;
    loop {
        let acked = pos.acked.load(Ordering::Acquire);
        let (written, head) = pos.head();
        let (note, records) = if acked < written {
            // Give a burst the time to gather, up to the batch delay.
            if written - acked < config.batch_max_records as u64 {
                std::thread::sleep(Duration::from_millis(config.batch_max_delay_ms.min(1000)));
            }
            let (written, _) = pos.head();
            let (prev, frames) = match reader.read(acked, written, config.batch_max_records) {
                Ok(r) => r,
                Err(e) => {
                    fail(&stats, format!("cannot read the outbox: {e}"));
                    std::thread::sleep(backoff);
                    continue;
                }
            };
            let (Some(first), Some(last)) = (frames.first(), frames.last()) else {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            };
            let text = format!(
                "vigie-batch/v1\nsidecar {sidecar}\nchain {}\nfirst {}\nlast {}\nprev {}\nhead {}\ntime {}\n",
                pos.chain,
                first.seq,
                last.seq,
                B64.encode(prev),
                B64.encode(last.chain),
                rfc3339_nanos(SystemTime::now()),
            );
            let records: Vec<String> = frames.iter().map(|f| B64.encode(&f.payload)).collect();
            (key.sign_note(&text), records)
        } else if heartbeat_due || last_sent.elapsed() >= Duration::from_millis(config.heartbeat_ms)
        {
            let text = format!(
                "vigie-heartbeat/v1\nsidecar {sidecar}\nchain {}\nnext {written}\nhead {}\ntime {}\n",
                pos.chain,
                B64.encode(head),
                rfc3339_nanos(SystemTime::now()),
            );
            (key.sign_note(&text), Vec::new())
        } else {
            let more = || pos.written.load(Ordering::Acquire) > written;
            pos.changed
                .wait_until(more, Duration::from_millis(config.heartbeat_ms.min(1000)));
            continue;
        };

        let count = records.len();
        match send(&agent, &url, &json!({"note": note, "records": records})) {
            Ok(committed) => {
                backoff = Duration::from_millis(100);
                last_sent = Instant::now();
                heartbeat_due = false;
                if count == 0 {
                    stats.heartbeats.fetch_add(1, Ordering::Relaxed);
                } else {
                    stats.batches.fetch_add(1, Ordering::Relaxed);
                    stats.records.fetch_add(count as u64, Ordering::Relaxed);
                }
                if let Ok(mut e) = stats.last_error.lock() {
                    *e = None;
                }
                if let Some(next) = committed {
                    if let Err(e) = outbox::trim(&outbox.dir, &pos, next) {
                        fail(&stats, format!("cannot trim the outbox: {e}"));
                    }
                }
            }
            Err(Failure::Gap(expected)) => {
                // The ledger has everything below `expected`: it is acknowledged.
                if expected > acked {
                    let _ = outbox::trim(&outbox.dir, &pos, expected.min(written));
                } else {
                    fail(
                        &stats,
                        format!(
                            "the ledger expects record {expected}, which was already trimmed here"
                        ),
                    );
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(max_backoff);
                }
            }
            Err(Failure::Other(e)) => {
                fail(&stats, e);
                std::thread::sleep(jitter(backoff));
                backoff = (backoff * 2).min(max_backoff);
            }
        }
    }
}

fn fail(stats: &Stats, message: String) {
    stats.failures.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(error = %message, "decision log shipping failed; will retry");
    if let Ok(mut e) = stats.last_error.lock() {
        *e = Some(message);
    }
}

/// Between half and all of `d`, so that many sidecars do not retry in step.
fn jitter(d: Duration) -> Duration {
    let mut b = [0u8; 8];
    let r = getrandom::fill(&mut b)
        .map(|()| u64::from_le_bytes(b))
        .unwrap_or(0);
    let half = d.as_millis() as u64 / 2;
    Duration::from_millis(half + r % (half + 1))
}

enum Failure {
    Gap(u64),
    Other(String),
}

/// Sends one batch; returns the next seq the ledger expects in this chain.
fn send(agent: &ureq::Agent, url: &str, body: &Value) -> Result<Option<u64>, Failure> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(body.to_string().as_bytes())
        .map_err(|e| Failure::Other(e.to_string()))?;
    let bytes = gz.finish().map_err(|e| Failure::Other(e.to_string()))?;
    let resp = agent
        .post(url)
        .set("content-type", "application/json")
        .set("content-encoding", "gzip")
        .send_bytes(&bytes);
    match resp {
        Ok(r) => {
            let v: Value = r.into_json().map_err(|e| Failure::Other(e.to_string()))?;
            Ok(v.get("next").and_then(Value::as_u64))
        }
        Err(ureq::Error::Status(code, r)) => {
            let v: Value = r.into_json().unwrap_or(Value::Null);
            let err = &v["error"];
            if err["code"] == "gap" {
                if let Some(expected) = err["expected"].as_u64() {
                    return Err(Failure::Gap(expected));
                }
            }
            Err(Failure::Other(format!(
                "the ledger answered {code}: {}",
                err["message"].as_str().unwrap_or("")
            )))
        }
        Err(e) => Err(Failure::Other(e.to_string())),
    }
}
