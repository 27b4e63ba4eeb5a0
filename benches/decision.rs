//! The in-process decision path on the example policy set:
//! parse → validate against the schema → authorize → serialize.
//!
//!     cargo bench -p vigie --bench decision
//!
//! `engine/*` isolates Cedar's part (a request already parsed into uids);
//! `cache/*` the decision cache: a hit in memory (L1), a hit in sled (L2),
//! against the same request evaluated (cache off); `log/*` what writing the
//! decision record adds, with each durability mode (one record per group).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion};
use serde_json::json;
use vigie::config::Config;
use vigie::engine::Query;
use vigie::server;
use vigie::state::Shared;

fn start(data: &Path, cache: vigie::cache::Config) -> std::sync::Arc<Shared> {
    start_with(data, cache, vigie::audit::Durability::Process)
}

/// A sidecar state on the example set. Decision benches log with `process`
/// durability (the record is written, not fsync'd): they measure CPU, the
/// `log/*` benches measure what durability costs.
fn start_with(
    data: &Path,
    cache: vigie::cache::Config,
    durability: vigie::audit::Durability,
) -> std::sync::Arc<Shared> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let mut config = Config::default();
    config.data.dir = data.to_path_buf();
    config.cache = cache;
    config.audit.durability = durability;
    config.audit.sidecar_id = Some("bench".into());
    // No ledger drains the outbox here, and a run appends a million records
    // or more: past the 1 GiB default, appends would wait for room.
    config.audit.max_outbox_bytes = u64::MAX;
    // The requests below carry the attributes plugins would compute; the
    // `plugin/*` benches measure the plugins.
    config.plugins.enabled = false;
    Shared::new(config, dir).unwrap()
}

/// The example policy set, with `n` more links of the delegation template
/// (each for a user of its own), loaded from a copy in `dir`.
fn with_links(dir: &Path, n: usize) -> vigie::policy::Bundle {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    std::fs::create_dir_all(dir).unwrap();
    for entry in std::fs::read_dir(&example).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        if name.ends_with(".cedar") || name.ends_with(".cedarschema") || name == "entities.json" {
            std::fs::copy(&path, dir.join(&name)).unwrap();
        }
    }
    let mut links: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(example.join("links.json")).unwrap()).unwrap();
    links.extend((0..n).map(|i| {
        json!({
            "template_id": "delegated-read",
            "link_id": format!("delegation-{i}"),
            "args": {
                "?principal": format!("Agency::User::\"delegate-{i}\""),
                "?resource": "Agency::Department::\"social\""
            }
        })
    }));
    std::fs::write(dir.join("links.json"), serde_json::to_vec(&links).unwrap()).unwrap();
    vigie::policy::load(dir, vigie::policy::Validation::Strict).unwrap()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let data = tempfile::tempdir().unwrap();
    let off = vigie::cache::Config {
        enabled: false,
        ..Default::default()
    };
    let shared = start(&data.path().join("off"), off);
    let allow = json!({
        "principal": "Agency::User::\"alice\"",
        "action": "Agency::Action::\"read\"",
        "resource": "Agency::Record::\"social-002\"",
        "context": {
            "ip": "10.1.2.3",
            "mfa": {"present": true, "methods": ["pwd", "otp"], "age_seconds": 60, "hardware": false},
            "network": {"zone": "on-premises", "country": "FR", "eu": true},
            "hours": {"open": true}
        }
    })
    .to_string();
    let deny = json!({
        "principal": {"type": "Agency::User", "id": "carol"},
        "action": {"type": "Agency::Action", "id": "read"},
        "resource": {"type": "Agency::Record", "id": "social-003"},
    })
    .to_string();
    assert!(String::from_utf8(
        rt.block_on(server::is_authorized(&shared, allow.as_bytes()))
            .unwrap()
    )
    .unwrap()
    .contains("Allow"));

    let mut g = c.benchmark_group("is_authorized");
    g.bench_function("allow_with_context", |b| {
        b.iter(|| {
            rt.block_on(server::is_authorized(&shared, black_box(allow.as_bytes())))
                .unwrap()
        })
    });
    g.bench_function("deny_empty_context", |b| {
        b.iter(|| {
            rt.block_on(server::is_authorized(&shared, black_box(deny.as_bytes())))
                .unwrap()
        })
    });
    g.finish();

    let mut g = c.benchmark_group("engine");
    let active = shared.active();
    let query: Query = serde_json::from_str(&allow).unwrap();
    g.bench_function("authorize_parsed_request", |b| {
        b.iter_batched(
            || query.clone().into_input().unwrap(),
            |input| shared.engine.decide(&active.bundle, input).unwrap(),
            criterion::BatchSize::SmallInput,
        )
    });
    // The example with 500 delegations (template links) more, none of them
    // alice's: a policy whose scope cannot match is skipped unevaluated.
    let links = with_links(&data.path().join("links"), 500);
    g.bench_function("authorize_with_500_links", |b| {
        b.iter_batched(
            || query.clone().into_input().unwrap(),
            |input| shared.engine.decide(&links, input).unwrap(),
            criterion::BatchSize::SmallInput,
        )
    });
    g.finish();

    let mut g = c.benchmark_group("cache");
    let hour = vigie::cache::Config {
        ttl_ms: 3_600_000,
        ..Default::default()
    };
    let l1 = start(&data.path().join("l1"), hour.clone());
    rt.block_on(server::is_authorized(&l1, allow.as_bytes()))
        .unwrap();
    assert!(String::from_utf8(
        rt.block_on(server::is_authorized(&l1, allow.as_bytes()))
            .unwrap()
    )
    .unwrap()
    .contains("\"cached\":true"));
    g.bench_function("l1_hit_is_authorized", |b| {
        b.iter(|| {
            rt.block_on(server::is_authorized(&l1, black_box(allow.as_bytes())))
                .unwrap()
        })
    });
    let active = l1.active();
    let input = query.clone().into_input().unwrap();
    g.bench_function("l1_hit_key_and_lookup", |b| {
        b.iter(|| {
            let key = vigie::cache::key(&active.bundle.hash, black_box(&input));
            l1.cache.get(&key, vigie::cache::now_ms()).unwrap()
        })
    });
    // No room in memory: every hit comes from sled.
    let l2 = start(
        &data.path().join("l2"),
        vigie::cache::Config {
            l1_max_entries: 0,
            ..hour
        },
    );
    rt.block_on(server::is_authorized(&l2, allow.as_bytes()))
        .unwrap();
    let active2 = l2.active();
    g.bench_function("l2_hit_key_and_lookup", |b| {
        b.iter(|| {
            let key = vigie::cache::key(&active2.bundle.hash, black_box(&input));
            l2.cache.get(&key, vigie::cache::now_ms()).unwrap()
        })
    });
    g.bench_function("l2_hit_is_authorized", |b| {
        b.iter(|| {
            rt.block_on(server::is_authorized(&l2, black_box(allow.as_bytes())))
                .unwrap()
        })
    });
    g.finish();
}

fn log(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let data = tempfile::tempdir().unwrap();
    let off = vigie::cache::Config {
        enabled: false,
        ..Default::default()
    };
    let mut g = c.benchmark_group("log");
    // Started inside the runtime, the sidecar sees its one worker: in
    // `power` mode the group writer syncs a lone record itself. Started
    // outside, it hands every sync to the syncer thread.
    for (name, durability, inside) in [
        ("append_process", vigie::audit::Durability::Process, true),
        (
            "append_power_fdatasync",
            vigie::audit::Durability::Power,
            true,
        ),
        (
            "append_power_via_syncer",
            vigie::audit::Durability::Power,
            false,
        ),
    ] {
        let dir = data.path().join(name);
        let shared = if inside {
            rt.block_on(async { start_with(&dir, off.clone(), durability) })
        } else {
            start_with(&dir, off.clone(), durability)
        };
        let active = shared.active();
        let query: Query = serde_json::from_str(
            r#"{"principal":"Agency::User::\"alice\"","action":"Agency::Action::\"read\"","resource":"Agency::Record::\"social-001\"","context":{"ip":"10.1.2.3"}}"#,
        )
        .unwrap();
        let decided = rt
            .block_on(shared.decide_draft(
                &active,
                query.into_input().unwrap(),
                &opentelemetry::Context::new(),
            ))
            .unwrap();
        g.bench_function(name, |b| {
            b.iter(|| rt.block_on(shared.log_all(vec![decided.clone()])))
        });
    }
    // The disk alone: a record-sized append and its fdatasync.
    {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data.path().join("probe"))
            .unwrap();
        let record = [b'x'; 700];
        g.bench_function("write_fdatasync_alone", |b| {
            b.iter(|| {
                f.write_all(&record).unwrap();
                f.sync_data().unwrap()
            })
        });
    }
    // The alternative the outbox was measured against: sled, one insert and
    // a flush (its fsync) per record, the same record bytes.
    let db = sled::Config::new()
        .path(data.path().join("sled-outbox"))
        .cache_capacity(4 << 20)
        .open()
        .unwrap();
    let tree = db.open_tree("outbox").unwrap();
    let record = vec![b'x'; 520];
    let mut seq = 0u64;
    g.bench_function("sled_insert_flush", |b| {
        b.iter(|| {
            seq += 1;
            tree.insert(seq.to_be_bytes(), record.as_slice()).unwrap();
            db.flush().unwrap()
        })
    });
    g.bench_function("sled_insert_no_flush", |b| {
        b.iter(|| {
            seq += 1;
            tree.insert(seq.to_be_bytes(), record.as_slice()).unwrap()
        })
    });
    g.finish();
}

/// Ledger ingestion with signature and chain verification: batches of 1,000
/// decision records (about 500 bytes each), as a sidecar sends them.
fn ledger(c: &mut Criterion) {
    use base64::Engine as _;
    use vigie::audit::{chain_hash, leaf_hash, GENESIS};
    let b64 = base64::engine::general_purpose::STANDARD;
    let data = tempfile::tempdir().unwrap();
    let store = vigie::ledger::store::Store::open(
        data.path(),
        vigie::note::KeyPair::generate("bench-ledger").unwrap(),
        "bench-ledger".into(),
    )
    .unwrap();
    let sidecar = vigie::note::KeyPair::generate("s1").unwrap();
    let public = sidecar.public();
    let keys = move |_: &str| Some(public.clone());
    let mut seq = 0u64;
    let mut head = GENESIS;
    let mut make_batch = |n: u64| {
        let first = seq;
        let prev = head;
        let mut records = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let kind = if seq == 0 { "chain_start" } else { "decision" };
            let bytes = vigie::canon::to_vec(&json!({
                "v": 1, "kind": kind, "sidecar": "s1", "chain": "c", "seq": seq,
                "ts": "2026-11-28T08:00:00.000000000Z", "decision_id": format!("0190-{seq:016}"),
                "request": {"principal": "Agency::User::\"alice\"", "action": "Agency::Action::\"read\"",
                            "resource": "Agency::Record::\"social-001\"", "context": {"ip": "10.1.2.3"}, "entities": 0},
                "decision": "Allow", "reasons": ["staff-read-department"], "errors": [], "plugins": [],
                "policy": {"epoch": 1, "hash": "a0c2e263c59bc4d45aad523a6ae129b49a3a2a499e93b3da3bdd8c8eea4efdbc"},
                "trace_id": null, "cached": false
            }));
            head = chain_hash(&head, &leaf_hash(&bytes));
            records.push(b64.encode(&bytes));
            seq += 1;
        }
        let text = format!(
            "vigie-batch/v1\nsidecar s1\nchain c\nfirst {first}\nlast {}\nprev {}\nhead {}\ntime 2026-11-28T08:00:00Z\n",
            seq - 1,
            b64.encode(prev),
            b64.encode(head)
        );
        vigie::ledger::store::BatchBody {
            note: sidecar.sign_note(&text),
            records,
        }
    };
    let mut g = c.benchmark_group("ledger");
    g.throughput(criterion::Throughput::Elements(1000));
    g.sample_size(20);
    g.bench_function("ingest_1000_records", |b| {
        b.iter_custom(|iters| {
            let batches: Vec<_> = (0..iters).map(|_| make_batch(1000)).collect();
            let start = std::time::Instant::now();
            for batch in &batches {
                store.ingest(batch, &keys).unwrap();
            }
            start.elapsed()
        })
    });
    g.finish();
}

/// A token signed with one of the demonstration keys of `policies/plugins.toml`.
fn signed(header: serde_json::Value, claims: serde_json::Value, seed_file: &str) -> String {
    use base64::Engine as _;
    use ed25519_dalek::Signer;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let seed = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/keys")
            .join(seed_file),
    )
    .unwrap();
    let key = ed25519_dalek::SigningKey::from_bytes(
        &hex::decode(seed.trim()).unwrap().try_into().unwrap(),
    );
    let signed = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let sig = key.sign(signed.as_bytes());
    format!("{signed}.{}", b64(&sig.to_bytes()))
}

/// Plugins: one call of the `network` plugin (a fresh instance from the
/// pool, small JSON in and out), and the example's four plugins on an
/// export request (network, mfa, device and hours all apply).
fn plugins(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.data.dir = data.path().to_path_buf();
    config.audit.sidecar_id = Some("bench".into());
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let shared = Shared::new(config, dir)
        .expect("the example with its plugins (run ./scripts/build-plugins)");
    let active = shared.active();
    let host = shared.plugin_host.clone().unwrap();
    let now = vigie::cache::now_ms() as i64;
    let secs = now / 1000;
    let id_token = signed(
        json!({"alg": "EdDSA", "kid": "idp-ed25519"}),
        json!({"iss": "https://idp.agency.example", "aud": "vigie", "exp": secs + 3600,
               "auth_time": secs - 60, "amr": ["pwd", "otp"], "acr": "eidas-substantial"}),
        "idp-ed25519.seed",
    );
    let device_token = signed(
        json!({"alg": "EdDSA", "kid": "mdm-2026"}),
        json!({"sub": "laptop-42", "iat": secs - 60, "managed": true, "disk_encrypted": true,
               "os_patch_level": "2026-11-01"}),
        "mdm-ed25519.seed",
    );
    let network = active
        .plugins
        .plugins
        .iter()
        .find(|p| p.spec.name == "network")
        .unwrap()
        .clone();
    let small = json!({"ip": "10.1.2.3"}).to_string();
    let call = vigie::plugin::Call {
        principal: "Agency::User::\"alice\"",
        action: "Agency::Action::\"read\"",
        resource: "Agency::Record::\"social-001\"",
        context: &small,
        now_unix_ms: now,
    };
    assert!(rt.block_on(network.call(&host, &call, None)).is_ok());
    let mut g = c.benchmark_group("plugin");
    g.bench_function("network_call", |b| {
        b.iter(|| {
            rt.block_on(network.call(&host, black_box(&call), None))
                .unwrap()
        })
    });
    let context = json!({"ip": "10.1.2.3", "id_token": id_token, "device_token": device_token});
    let text = context.to_string();
    let export = vigie::plugin::Call {
        principal: "Agency::User::\"dominique\"",
        action: "Agency::Action::\"export\"",
        resource: "Agency::Record::\"health-002\"",
        context: &text,
        now_unix_ms: now,
    };
    let shapes = &active.bundle.shapes;
    let fits = |attr: &str, v: &serde_json::Value| shapes.check_attribute(export.action, attr, v);
    let enrich = || {
        let mut map = context.as_object().unwrap().clone();
        let out = rt.block_on(
            active
                .plugins
                .enrich(&export, "Agency::Record", &mut map, &fits),
        );
        assert_eq!(out.reports.len(), 4);
        assert!(
            out.reports.iter().all(|r| r.status == "ok"),
            "{:?}",
            out.reports
        );
        out
    };
    enrich();
    g.bench_function("four_on_export", |b| b.iter(enrich));
    g.finish();
}

// Plugins before the log benches: those write gigabytes, and the writeback
// that follows can stall a plugin call past its 20 ms deadline.
criterion_group!(benches, bench, plugins, log, ledger);
criterion_main!(benches);
