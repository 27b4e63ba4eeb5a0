//! The in-process decision path on the example policy set:
//! parse → validate against the schema → authorize → serialize.
//!
//!     cargo bench -p vigie --bench decision
//!
//! `engine/*` isolates Cedar's part (a request already parsed into uids).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion};
use serde_json::json;
use vigie::config::Config;
use vigie::engine::Query;
use vigie::server;
use vigie::state::Shared;

fn shared() -> std::sync::Arc<Shared> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    Shared::new(Config::default(), dir).unwrap()
}

fn bench(c: &mut Criterion) {
    let shared = shared();
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
    assert!(
        String::from_utf8(server::is_authorized(&shared, allow.as_bytes()).unwrap())
            .unwrap()
            .contains("Allow")
    );

    let mut g = c.benchmark_group("is_authorized");
    g.bench_function("allow_with_context", |b| {
        b.iter(|| server::is_authorized(&shared, black_box(allow.as_bytes())).unwrap())
    });
    g.bench_function("deny_empty_context", |b| {
        b.iter(|| server::is_authorized(&shared, black_box(deny.as_bytes())).unwrap())
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
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
