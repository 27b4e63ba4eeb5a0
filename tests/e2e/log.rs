//! The signed decision log end to end: sidecar → outbox → shipper → ledger
//! → verify, through crashes, an outage and tampering.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};

use crate::support::{eventually, example_policies, failed_start, free_port, Ledger, Vigie, BIN};

/// A sidecar key made and enrolled before the sidecar first starts.
fn enroll(side_data: &Path, ledger_data: &Path, id: &str) {
    let out = Command::new(BIN)
        .args(["keygen", "--name", id, "--out"])
        .arg(side_data.join("sidecar.key"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let public = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let out = Command::new(BIN)
        .args([
            "ledger",
            "enroll",
            "--id",
            id,
            "--public-key",
            &public,
            "--data-dir",
        ])
        .arg(ledger_data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sidecar(data: &Path, ledger: &str, id: &str) -> Vigie {
    Vigie::start_in(
        &example_policies(),
        data,
        &["--ledger", ledger, "--sidecar-id", id],
        &[
            ("VIGIE_AUDIT_BATCH_MAX_DELAY_MS", "20"),
            ("VIGIE_AUDIT_MAX_BACKOFF_MS", "500"),
            ("VIGIE_CACHE_ENABLED", "false"),
        ],
    )
}

fn request(i: usize) -> Value {
    let users = ["alice", "bob", "carol", "gaston"];
    json!({
        "principal": format!("Agency::User::\"{}\"", users[i % users.len()]),
        "action": "Agency::Action::\"read\"",
        "resource": "Agency::Record::\"social-001\"",
        "context": {"risk": format!("0.{:04}", i % 10000)},
    })
}

fn drained(v: &Vigie) -> bool {
    v.get("/v1/status").json()["log"]["outbox"]["pending"] == 0
}

/// Every decision id in the ledger, with how often it appears.
fn ledger_ids(ledger: &Ledger) -> HashMap<String, usize> {
    let mut ids = HashMap::new();
    let mut cursor = String::new();
    loop {
        let page = ledger
            .get(&format!("/v1/decisions?limit=1000{cursor}"))
            .json();
        for d in page["decisions"].as_array().unwrap() {
            *ids.entry(d["decision_id"].as_str().unwrap().to_owned())
                .or_insert(0) += 1;
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => return ids,
        }
    }
}

fn verify(args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN).arg("verify").args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn verify_ledger(ledger: &Ledger, ledger_data: &Path) -> (bool, String) {
    verify(&[
        "--ledger",
        &ledger.url(),
        "--ledger-key",
        &ledger.public_key(),
        "--sidecars",
        ledger_data.join("sidecars.toml").to_str().unwrap(),
    ])
}

#[test]
fn decisions_reach_the_ledger_queryable_and_verifiable() {
    let (side, led) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    enroll(side.path(), led.path(), "s1");
    let ledger = Ledger::start(led.path(), "127.0.0.1:0");
    let v = sidecar(side.path(), &ledger.url(), "s1");
    let mut ids = Vec::new();
    for i in 0..12 {
        let r = v.post("/v1/is_authorized", &request(i)).json();
        ids.push((
            r["decision_id"].as_str().unwrap().to_owned(),
            r["decision"].as_str().unwrap().to_owned(),
        ));
    }
    assert!(eventually(20, || drained(&v)), "{}", v.log());

    // Query by principal and decision, with paging.
    let page = ledger
        .get("/v1/decisions?principal=Agency%3A%3AUser%3A%3A%22gaston%22&limit=2")
        .json();
    assert_eq!(page["decisions"].as_array().unwrap().len(), 2);
    assert!(page["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .all(|d| d["decision"] == "Deny"));
    let next = page["next_cursor"].as_str().unwrap();
    let page2 = ledger
        .get(&format!(
            "/v1/decisions?principal=Agency%3A%3AUser%3A%3A%22gaston%22&limit=2&cursor={next}"
        ))
        .json();
    assert_eq!(page2["decisions"].as_array().unwrap().len(), 1);
    let denies = ledger.get("/v1/decisions?decision=Deny&sidecar=s1").json();
    assert_eq!(
        denies["decisions"].as_array().unwrap().len(),
        ids.iter().filter(|(_, d)| d == "Deny").count()
    );
    let none = ledger.get("/v1/decisions?from=2999-01-01T00:00:00Z").json();
    assert!(none["decisions"].as_array().unwrap().is_empty());

    // One decision, its record and inclusion proof.
    let (id, decision) = &ids[5];
    let one = ledger.get(&format!("/v1/decisions/{id}")).json();
    assert_eq!(one["record"]["decision"], decision.as_str());
    assert_eq!(one["record"]["sidecar"], "s1");
    assert!(one["record"]["ts"].as_str().unwrap().ends_with('Z'));
    let (ok, out) = verify(&[
        "--ledger",
        &ledger.url(),
        "--ledger-key",
        &ledger.public_key(),
        "--decision",
        id,
    ]);
    assert!(ok, "{out}");
    assert!(ok && out.contains("signed tree of size 13"), "{out}");

    let (ok, out) = verify_ledger(&ledger, led.path());
    assert!(ok, "{out}");
    assert!(out.contains("ok: 13 records from 1 sidecars"), "{out}");

    // An auditor keeps this checkpoint; the ledger must only ever extend it.
    let kept = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(kept.path(), ledger.get("/v1/checkpoint").text).unwrap();
    for i in 12..15 {
        v.post("/v1/is_authorized", &request(i));
    }
    assert!(eventually(20, || drained(&v)));
    let sidecars = led.path().join("sidecars.toml");
    let args = |export: &str| {
        vec![
            "--ledger-key".to_owned(),
            ledger.public_key(),
            "--sidecars".into(),
            sidecars.to_str().unwrap().into(),
            "--checkpoint".into(),
            kept.path().to_str().unwrap().into(),
            "--export".into(),
            export.into(),
        ]
    };
    let export = ledger.get("/v1/export?format=ndjson").text;
    let whole = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(whole.path(), &export).unwrap();
    let a = args(whole.path().to_str().unwrap());
    let (ok, out) = verify(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{out}");

    // A ledger that drops its tail and signs a new, smaller checkpoint is
    // caught by the one the auditor kept.
    let ledger_key = vigie::note::KeyPair::decode(
        &std::fs::read_to_string(led.path().join("ledger.key")).unwrap(),
        "k",
    )
    .unwrap();
    let mut leaves = Vec::new();
    let mut lines = Vec::new();
    for l in export.lines() {
        let v: Value = serde_json::from_str(l).unwrap();
        match v["type"].as_str() {
            Some("record") if v["index"].as_u64() < Some(10) => {
                leaves.push(vigie::audit::leaf_hash(
                    &B64.decode(v["bytes"].as_str().unwrap()).unwrap(),
                ));
                lines.push(l.to_owned());
            }
            Some("record") | Some("batch") | Some("heartbeat") | Some("checkpoint") => {}
            _ => lines.push(l.to_owned()),
        }
    }
    let origin = ledger_key.public().name.clone();
    let forged = ledger_key.sign_note(&vigie::note::checkpoint_text(
        &origin,
        10,
        &vigie::ledger::merkle::root(&leaves),
    ));
    lines.push(json!({"type": "checkpoint", "note": forged}).to_string());
    let cut = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(cut.path(), lines.join("\n") + "\n").unwrap();
    let a = args(cut.path().to_str().unwrap());
    let (ok, out) = verify(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!ok, "{out}");
    assert!(
        out.contains("record 10: missing; an earlier signed checkpoint covered 13"),
        "{out}"
    );
}

#[test]
fn an_idle_sidecar_signs_heartbeats() {
    let (side, led) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    enroll(side.path(), led.path(), "s1");
    let ledger = Ledger::start(led.path(), "127.0.0.1:0");
    let v = Vigie::start_in(
        &example_policies(),
        side.path(),
        &["--ledger", &ledger.url(), "--sidecar-id", "s1"],
        &[
            ("VIGIE_AUDIT_HEARTBEAT_MS", "200"),
            ("VIGIE_AUDIT_BATCH_MAX_DELAY_MS", "20"),
        ],
    );
    v.post("/v1/is_authorized", &request(1));
    assert!(eventually(20, || v.get("/v1/status").json()["log"]
        ["shipper"]["heartbeats"]
        .as_u64()
        >= Some(2)));
    let export = ledger.get("/v1/export?format=ndjson").text;
    assert!(
        export.lines().any(|l| l.contains("\"type\":\"heartbeat\"")),
        "{export}"
    );
    let (ok, out) = verify_ledger(&ledger, led.path());
    assert!(ok && out.contains("1 heartbeats"), "{out}");
}

/// Drives requests until told to stop or the sidecar goes away; returns the
/// decision ids it got answers for.
fn drive(
    addr: std::net::SocketAddr,
    offset: usize,
    stop: Arc<AtomicBool>,
    got: Arc<Mutex<Vec<String>>>,
) {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(5))
        .build();
    let url = format!("http://{addr}/v1/is_authorized");
    for i in 0..100_000 {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        match agent
            .post(&url)
            .set("content-type", "application/json")
            .send_string(&request(offset + i).to_string())
        {
            Ok(r) => {
                let v: Value = r.into_json().unwrap();
                assert_ne!(v["diagnostics"]["reason"][0], "audit_unavailable", "{v}");
                got.lock()
                    .unwrap()
                    .push(v["decision_id"].as_str().unwrap().to_owned());
            }
            Err(_) => return,
        }
    }
}

#[test]
fn nothing_answered_is_lost_across_twenty_kill_9() {
    let (side, led) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    enroll(side.path(), led.path(), "s1");
    let ledger = Ledger::start(led.path(), "127.0.0.1:0");
    let answered = Arc::new(Mutex::new(Vec::new()));
    // Fixed-seed pauses: 60..=250 ms of load before each kill.
    let mut seed: u64 = 0x5eed;
    for round in 0..20 {
        let v = sidecar(side.path(), &ledger.url(), "s1");
        let stop = Arc::new(AtomicBool::new(false));
        let clients: Vec<_> = (0..2)
            .map(|c| {
                let (addr, stop, got) = (v.addr, Arc::clone(&stop), Arc::clone(&answered));
                std::thread::spawn(move || drive(addr, round * 100_000 + c * 50_000, stop, got))
            })
            .collect();
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        std::thread::sleep(Duration::from_millis(60 + (seed >> 33) % 190));
        v.kill9();
        stop.store(true, Ordering::Relaxed);
        for c in clients {
            c.join().unwrap();
        }
    }
    let v = sidecar(side.path(), &ledger.url(), "s1");
    assert!(eventually(60, || drained(&v)), "{}", v.log());
    let answered = answered.lock().unwrap().clone();
    assert!(answered.len() > 100, "only {} answers", answered.len());
    let stored = ledger_ids(&ledger);
    for id in &answered {
        assert_eq!(
            stored.get(id),
            Some(&1),
            "answered decision {id} is in the ledger {:?} times",
            stored.get(id)
        );
    }
    let (ok, out) = verify_ledger(&ledger, led.path());
    assert!(ok, "{out}");
}

#[test]
fn a_ledger_outage_loses_nothing() {
    let (side, led) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    enroll(side.path(), led.path(), "s1");
    let listen = format!("127.0.0.1:{}", free_port());
    let ledger = Ledger::start(led.path(), &listen);
    let v = sidecar(side.path(), &ledger.url(), "s1");
    let mut answered = Vec::new();
    let mut ask = |i: usize| {
        let r = v.post("/v1/is_authorized", &request(i)).json();
        assert_ne!(r["diagnostics"]["reason"][0], "audit_unavailable");
        answered.push(r["decision_id"].as_str().unwrap().to_owned());
    };
    for i in 0..20 {
        ask(i);
    }
    ledger.kill();
    // The sidecar keeps answering while the ledger is away.
    for i in 20..220 {
        ask(i);
    }
    assert!(eventually(10, || v.get("/v1/status").json()["log"]
        ["shipper"]["failures"]
        .as_u64()
        > Some(0)));
    assert!(v.get("/v1/status").json()["log"]["outbox"]["pending"].as_u64() > Some(100));
    let ledger = Ledger::start(led.path(), &listen);
    assert!(eventually(60, || drained(&v)), "{}", v.log());
    let stored = ledger_ids(&ledger);
    for id in &answered {
        assert_eq!(stored.get(id), Some(&1), "decision {id}");
    }
    let (ok, out) = verify_ledger(&ledger, led.path());
    assert!(ok, "{out}");
}

/// Rewrites an export line by line.
fn tamper(export: &str, f: impl Fn(Vec<Value>) -> Vec<Value>) -> String {
    let lines: Vec<Value> = export
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    f(lines).iter().map(|v| v.to_string() + "\n").collect()
}

#[test]
fn tampering_with_an_export_is_detected_and_named() {
    let (side, led) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    enroll(side.path(), led.path(), "s1");
    let ledger = Ledger::start(led.path(), "127.0.0.1:0");
    let v = sidecar(side.path(), &ledger.url(), "s1");
    for i in 0..10 {
        v.post("/v1/is_authorized", &request(i));
    }
    assert!(eventually(20, || drained(&v)));
    let export = ledger.get("/v1/export?format=ndjson").text;
    let dir = tempfile::tempdir().unwrap();
    let key = ledger.public_key();
    let sidecars = led.path().join("sidecars.toml");
    let check = |name: &str, text: &str| -> String {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let (ok, out) = verify(&[
            "--export",
            path.to_str().unwrap(),
            "--ledger-key",
            &key,
            "--sidecars",
            sidecars.to_str().unwrap(),
        ]);
        assert!(!ok, "{name}: tampering not detected: {out}");
        out
    };
    let (ok, out) = verify(&[
        "--export",
        &{
            let p = dir.path().join("intact.ndjson");
            std::fs::write(&p, &export).unwrap();
            p.to_str().unwrap().to_owned()
        },
        "--ledger-key",
        &key,
        "--sidecars",
        sidecars.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");

    let is_record = |v: &Value, i: u64| v["type"] == "record" && v["index"] == i;
    // A changed byte: "Allow" becomes "Deny" in record 4's bytes.
    let out = check(
        "byte.ndjson",
        &tamper(&export, |mut lines| {
            for l in &mut lines {
                if is_record(l, 4) {
                    let text = String::from_utf8(B64.decode(l["bytes"].as_str().unwrap()).unwrap())
                        .unwrap();
                    let changed = if text.contains("\"Allow\"") {
                        text.replacen("\"Allow\"", "\"Deny\"", 1)
                    } else {
                        text.replacen("\"Deny\"", "\"Allow\"", 1)
                    };
                    l["bytes"] = json!(B64.encode(changed));
                }
            }
            lines
        }),
    );
    assert!(out.contains("record 4 "), "{out}");

    // A deleted record.
    let out = check(
        "deleted.ndjson",
        &tamper(&export, |lines| {
            lines.into_iter().filter(|l| !is_record(l, 6)).collect()
        }),
    );
    assert!(out.contains("record 7 "), "{out}");

    // Two records swapped.
    let out = check(
        "swapped.ndjson",
        &tamper(&export, |mut lines| {
            let a = lines.iter().position(|l| is_record(l, 2)).unwrap();
            let b = lines.iter().position(|l| is_record(l, 3)).unwrap();
            lines.swap(a, b);
            lines
        }),
    );
    assert!(
        out.contains("record 3 ") || out.contains("record 2 "),
        "{out}"
    );

    // The tail cut off (the checkpoint and the batch notes kept).
    let out = check(
        "truncated.ndjson",
        &tamper(&export, |lines| {
            lines
                .into_iter()
                .filter(|l| !(l["type"] == "record" && l["index"].as_u64() >= Some(9)))
                .collect()
        }),
    );
    assert!(out.contains("seq 9") || out.contains("record 9"), "{out}");
}

/// Builds a signed batch by hand, as a sidecar would.
struct Forger {
    key: vigie::note::KeyPair,
    id: String,
    chain: String,
    records: Vec<Vec<u8>>,
    chains: Vec<[u8; 32]>,
}

impl Forger {
    fn new(id: &str) -> Forger {
        Forger {
            key: vigie::note::KeyPair::generate(id).unwrap(),
            id: id.into(),
            chain: "c-1".into(),
            records: vec![],
            chains: vec![],
        }
    }

    fn record(&mut self, kind: &str, decision: &str) {
        let seq = self.records.len() as u64;
        let bytes = vigie::canon::to_vec(
            &json!({"v": 1, "kind": kind, "sidecar": self.id, "chain": self.chain, "seq": seq,
            "ts": "2026-11-28T08:00:00.000000000Z", "decision": decision, "decision_id": format!("forged-{seq}")}),
        );
        let prev = self.chains.last().copied().unwrap_or(vigie::audit::GENESIS);
        self.chains.push(vigie::audit::chain_hash(
            &prev,
            &vigie::audit::leaf_hash(&bytes),
        ));
        self.records.push(bytes);
    }

    fn batch(&self, first: usize, last: usize) -> Value {
        let prev = if first == 0 {
            vigie::audit::GENESIS
        } else {
            self.chains[first - 1]
        };
        let text = format!(
            "vigie-batch/v1\nsidecar {}\nchain {}\nfirst {first}\nlast {last}\nprev {}\nhead {}\ntime 2026-11-28T08:00:00Z\n",
            self.id, self.chain, B64.encode(prev), B64.encode(self.chains[last])
        );
        json!({"note": self.key.sign_note(&text), "records": self.records[first..=last].iter().map(|r| B64.encode(r)).collect::<Vec<_>>()})
    }
}

fn post(ledger: &Ledger, body: &Value) -> (u16, Value) {
    match ureq::post(&format!("{}/v1/batches", ledger.url())).send_json(body.clone()) {
        Ok(r) => (r.status(), r.into_json().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap()),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn the_ledger_refuses_bad_batches_with_a_reason() {
    let led = tempfile::tempdir().unwrap();
    let mut f = Forger::new("forger");
    let out = Command::new(BIN)
        .args([
            "ledger",
            "enroll",
            "--id",
            "forger",
            "--public-key",
            &f.key.public().encode(),
            "--data-dir",
        ])
        .arg(led.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let ledger = Ledger::start(led.path(), "127.0.0.1:0");
    f.record("chain_start", "");
    for _ in 0..5 {
        f.record("decision", "Allow");
    }

    let (code, body) = post(&ledger, &f.batch(0, 2));
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["next"], 3);

    // Replayed: nothing stored twice.
    let (code, body) = post(&ledger, &f.batch(0, 2));
    assert_eq!(
        (code, body["appended"].clone(), body["duplicates"].clone()),
        (200, json!(0), json!(3)),
        "{body}"
    );

    // A gap: the expected seq is named.
    let (code, body) = post(&ledger, &f.batch(4, 5));
    assert_eq!(code, 409, "{body}");
    assert_eq!(body["error"]["code"], "gap");
    assert_eq!(body["error"]["expected"], 3);

    // Equivocation: seq 2 again, with other bytes.
    let mut liar = Forger {
        key: vigie::note::KeyPair::decode(&f.key.encode(), "k").unwrap(),
        id: f.id.clone(),
        chain: f.chain.clone(),
        records: f.records[..2].to_vec(),
        chains: f.chains[..2].to_vec(),
    };
    liar.record("decision", "Deny");
    let (code, body) = post(&ledger, &liar.batch(2, 2));
    assert_eq!(code, 409, "{body}");
    assert_eq!(body["error"]["code"], "equivocation");
    let events = ledger.get("/v1/events").json();
    assert!(
        events["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "equivocation" && e["detail"]["seq"] == 2),
        "{events}"
    );

    // An unknown key, and a forged signature.
    let stranger = Forger {
        key: vigie::note::KeyPair::generate("stranger").unwrap(),
        id: "stranger".into(),
        ..Forger::new("x")
    };
    let mut s = stranger;
    s.record("chain_start", "");
    let (code, body) = post(&ledger, &s.batch(0, 0));
    assert_eq!(
        (code, body["error"]["code"].clone()),
        (403, json!("unknown_key")),
        "{body}"
    );
    let impostor = vigie::note::KeyPair::generate("forger").unwrap();
    let mut batch = f.batch(3, 5);
    let text = batch["note"]
        .as_str()
        .unwrap()
        .split("\n\n")
        .next()
        .unwrap()
        .to_owned()
        + "\n";
    batch["note"] = json!(impostor.sign_note(&text));
    let (code, body) = post(&ledger, &batch);
    assert_eq!(
        (code, body["error"]["code"].clone()),
        (403, json!("bad_signature")),
        "{body}"
    );

    // The honest continuation is still accepted.
    let (code, body) = post(&ledger, &f.batch(3, 5));
    assert_eq!((code, body["next"].clone()), (200, json!(6)), "{body}");

    // A batch that overlaps two stored ones and brings two more: the held
    // records are checked byte for byte, the new ones appended.
    f.record("decision", "Allow");
    f.record("decision", "Deny");
    let (code, body) = post(&ledger, &f.batch(2, 7));
    assert_eq!(
        (code, body["appended"].clone(), body["duplicates"].clone()),
        (200, json!(2), json!(4)),
        "{body}"
    );
    // Every record reads back as the bytes sent, with the chain around it.
    for (seq, bytes) in f.records.iter().enumerate() {
        let d = ledger.get(&format!("/v1/decisions/forged-{seq}")).json();
        assert_eq!(d["bytes"], json!(B64.encode(bytes)), "seq {seq}: {d}");
        assert_eq!(d["index"], json!(seq), "{d}");
    }
}

#[test]
fn an_outbox_that_cannot_take_the_record_fails_closed() {
    let v = Vigie::start(
        &example_policies(),
        &[],
        &[
            ("VIGIE_AUDIT_MAX_OUTBOX_BYTES", "3000"),
            ("VIGIE_AUDIT_WHEN_FULL", "fail_closed"),
            ("VIGIE_CACHE_ENABLED", "false"),
        ],
    );
    let mut reasons = Vec::new();
    for i in 0..12 {
        let r = v.post("/v1/is_authorized", &request(i * 4)).json();
        reasons.push((
            r["decision"].as_str().unwrap().to_owned(),
            r["diagnostics"]["reason"][0]
                .as_str()
                .unwrap_or("")
                .to_owned(),
        ));
    }
    assert_eq!(reasons[0].0, "Allow", "{reasons:?}");
    let last = reasons.last().unwrap();
    assert_eq!(
        last,
        &("Deny".to_owned(), "audit_unavailable".to_owned()),
        "{reasons:?}"
    );
    let status = v.get("/v1/status").json();
    assert!(
        status["log"]["outbox"]["full_refusals"].as_u64() > Some(0),
        "{status}"
    );
    assert!(v
        .get("/metrics")
        .text
        .contains("vigie_outbox_full_refusals_total"));
}

#[test]
fn a_lost_outbox_starts_a_new_chain_that_the_ledger_flags() {
    let (side, led) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    enroll(side.path(), led.path(), "s1");
    let ledger = Ledger::start(led.path(), "127.0.0.1:0");
    let v = sidecar(side.path(), &ledger.url(), "s1");
    for i in 0..3 {
        v.post("/v1/is_authorized", &request(i));
    }
    assert!(eventually(20, || drained(&v)));
    let first_chain = v.get("/v1/status").json()["log"]["chain"].clone();
    assert!(v.terminate().success());
    std::fs::remove_dir_all(side.path().join("outbox")).unwrap();

    let v = sidecar(side.path(), &ledger.url(), "s1");
    assert_ne!(v.get("/v1/status").json()["log"]["chain"], first_chain);
    v.post("/v1/is_authorized", &request(7));
    assert!(eventually(20, || drained(&v)));
    let events = ledger.get("/v1/events").json();
    let reset = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "chain_reset")
        .cloned();
    let reset = reset.unwrap_or_else(|| panic!("no chain_reset event: {events}"));
    assert_eq!(reset["detail"]["old_chain"], first_chain);
    assert_eq!(reset["detail"]["reason"], "outbox_lost");
    let (ok, out) = verify_ledger(&ledger, led.path());
    assert!(ok, "{out}");
}

#[test]
fn a_second_sidecar_on_the_same_data_directory_is_refused() {
    let data = tempfile::tempdir().unwrap();
    let first = Vigie::start_in(&example_policies(), data.path(), &[], &[]);
    assert_eq!(first.post("/v1/is_authorized", &request(0)).status, 200);

    let (code, err) = failed_start(
        &example_policies(),
        data.path(),
        &[("VIGIE_PLUGINS_ENABLED", "false")],
    );
    assert_ne!(code, Some(0), "{err}");
    assert!(
        err.contains("is in use by another vigie") && err.contains(&first.pid().to_string()),
        "{err}"
    );

    // The first one is untouched: its cache was not taken for a damaged one
    // and its log goes on from where it was.
    let moved: Vec<_> = std::fs::read_dir(data.path())
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("corrupt") || n.contains("lost"))
        .collect();
    assert!(moved.is_empty(), "{moved:?}");
    assert_eq!(first.post("/v1/is_authorized", &request(1)).status, 200);
    let status = first.get("/v1/status").json();
    assert_eq!(status["log"]["outbox"]["next_seq"], json!(3), "{status}");

    // Once it is gone, the directory is free again (the lock dies with it).
    first.kill9();
    let again = Vigie::start_in(&example_policies(), data.path(), &[], &[]);
    assert_eq!(again.post("/v1/is_authorized", &request(2)).status, 200);
}
