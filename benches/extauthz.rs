//! Envoy ext_authz (gRPC `Check`) against the HTTP API on the same
//! decisions: throughput, p50 and p99 over loopback, with 1 and 32
//! concurrent streams, as ratios measured in one run.
//!
//!     taskset -c 1 cargo bench -p vigie --bench extauthz
//!
//! Starts the real `vigie` (pinned to core 0 with `taskset` when available,
//! `process` durability, cache off, so every request is evaluated and
//! logged), then drives each transport for a fixed time per concurrency.
//! Only 127.0.0.1 is used; every run stops by itself.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "load.rs"]
mod load;

use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};

const RUN: Duration = Duration::from_secs(4);
const USERS: [&str; 4] = ["alice", "bob", "dominique", "gaston"];
const RECORDS: [&str; 4] = ["social-001", "social-002", "finance-001", "health-002"];

fn check_request(i: usize) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    method: "GET".into(),
                    path: format!("/records/{}", RECORDS[i % 4]),
                    headers: [("x-vigie-user".to_owned(), USERS[(i / 4) % 4].to_owned())].into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

fn http_body(i: usize) -> String {
    format!(
        r#"{{"principal":"Agency::User::\"{}\"","action":"Agency::Action::\"read\"","resource":"Agency::Record::\"{}\""}}"#,
        USERS[(i / 4) % 4],
        RECORDS[i % 4]
    )
}

async fn grpc(addr: &str, streams: usize) -> load::Stats {
    let client = AuthorizationClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let start = Instant::now();
    let tasks: Vec<_> = (0..streams)
        .map(|s| {
            let mut c = client.clone();
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut i = s;
                while start.elapsed() < RUN {
                    let t = Instant::now();
                    let r = c.check(check_request(i)).await.unwrap().into_inner();
                    assert!(r.status.is_some());
                    lat.push(t.elapsed());
                    i += streams;
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    load::stats(all, start.elapsed())
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing
    // and should not run a load test.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let grpc_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/envoy/vigie.toml");
    let pinned = Command::new("taskset").arg("--version").output().is_ok();
    let grpc_listen = format!("127.0.0.1:{grpc_port}");
    let (mut server, http_addr) = load::serve(
        data.path(),
        &[
            "--config",
            config,
            "--durability",
            "process",
            "--ext-authz-listen",
            &grpc_listen,
        ],
        &[("VIGIE_CACHE_ENABLED", "false")],
    );
    let grpc_addr = format!("127.0.0.1:{grpc_port}");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "ext_authz vs HTTP, {} s per run, server {}:",
        RUN.as_secs(),
        if pinned {
            "pinned to core 0"
        } else {
            "not pinned"
        }
    );
    println!("{:<22} {:>10} {:>10} {:>10}", "", "req/s", "p50", "p99");
    for streams in [1usize, 32] {
        let g = rt.block_on(grpc(&grpc_addr, streams));
        let h = rt.block_on(load::http(&http_addr, streams, RUN, |i| {
            load::post(Bytes::from(http_body(i)), None)
        }));
        for (name, s) in [
            (format!("grpc Check x{streams}"), &g),
            (format!("http is_authorized x{streams}"), &h),
        ] {
            println!(
                "{name:<22} {:>10.0} {:>8.0}us {:>8.0}us",
                s.rps,
                s.p50.as_secs_f64() * 1e6,
                s.p99.as_secs_f64() * 1e6
            );
        }
        println!(
            "  ratio grpc/http at {streams}: throughput {:.2}, p50 {:.2}, p99 {:.2}",
            g.rps / h.rps,
            g.p50.as_secs_f64() / h.p50.as_secs_f64(),
            g.p99.as_secs_f64() / h.p99.as_secs_f64()
        );
    }
    let _ = server.kill();
    let _ = server.wait();
}
