//! The load comparison: Vigie against the transport limit (a bare hyper
//! server answering a fixed body), at 1 and 32 connections, for Vigie with
//! the cache off and on and with `power` and `process` durability.
//!
//!     cargo bench -p vigie --bench compare --no-run
//!     taskset -c 1 cargo bench -p vigie --bench compare
//!
//! Each server runs pinned to core 0 (with `taskset` when available), the
//! load comes from this process (run it on core 1). 2,000 distinct request
//! bodies are cycled. Reports req/s, p50, p99, the server's peak RSS, and
//! ratios against the bare server, and writes the table to
//! `target/compare.md`. Only 127.0.0.1 is used; every run stops by itself.
//! (Cerbos, the other peer the performance issue asks for, is not wired in yet.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "load.rs"]
mod load;

use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

const RUN: Duration = Duration::from_secs(4);
const BODIES: usize = 2000;

fn bodies() -> Arc<Vec<Bytes>> {
    let users = [
        "alice",
        "bob",
        "carol",
        "dominique",
        "eve",
        "fatima",
        "gaston",
        "mathis",
    ];
    let records = [
        "social-001",
        "social-002",
        "social-003",
        "health-001",
        "health-002",
        "finance-001",
        "finance-002",
        "finance-003",
        "it-001",
    ];
    Arc::new(
        (0..BODIES)
            .map(|i| {
                Bytes::from(format!(
                    r#"{{"principal":"Agency::User::\"{}\"","action":"Agency::Action::\"read\"","resource":"Agency::Record::\"{}\"","context":{{"ip":"10.{}.{}.1","mfa":{{"present":true,"methods":["otp"],"age_seconds":{},"hardware":false}}}}}}"#,
                    users[i % users.len()],
                    records[(i / users.len()) % records.len()],
                    i % 200,
                    i / 200,
                    i % 1000
                ))
            })
            .collect(),
    )
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse()
                    .unwrap_or(0)
            })
        })
        .unwrap_or(0)
}

/// The transport limit: hyper answering a fixed body, in its own process.
fn bare_server() -> Child {
    let exe = std::env::current_exe().unwrap();
    let mut c = load::pinned(exe.to_str().unwrap());
    c.arg("--bare-server").stderr(Stdio::piped());
    c.spawn().unwrap()
}

fn run_bare_server() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        eprintln!("bare-server addr={}", l.local_addr().unwrap());
        let body = Bytes::from_static(br#"{"decision":"Allow","diagnostics":{"reason":["staff-read-department"],"errors":[]},"decision_id":"01a2215d-75fb-714a-98b9-88c6c6ce77d6","cached":false}"#);
        loop {
            let (s, _) = l.accept().await.unwrap();
            s.set_nodelay(true).unwrap();
            let body = body.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let body = body.clone();
                    async move {
                        req.into_body().collect().await.ok();
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(body)))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(s), svc).await;
            });
        }
    });
}

fn main() {
    if std::env::args().any(|a| a == "--bare-server") {
        return run_bare_server();
    }
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let bodies = bodies();
    let mut table = String::from("| server | conns | req/s | p50 | p99 | peak RSS | req/s vs bare | p50 vs bare |\n|---|---|---|---|---|---|---|---|\n");
    let mut bare: Vec<(usize, f64, Duration)> = Vec::new();
    let configs: Vec<(&str, Option<(&str, bool)>)> = vec![
        ("bare hyper (fixed body)", None),
        ("vigie, cache off, process", Some(("process", false))),
        ("vigie, cache off, power", Some(("power", false))),
        ("vigie, cache on, process", Some(("process", true))),
        ("vigie, cache on, power", Some(("power", true))),
    ];
    for (name, cfg) in configs {
        for conns in [1usize, 32] {
            let data = tempfile::tempdir().unwrap();
            let (mut child, addr) = match cfg {
                None => {
                    let mut c = bare_server();
                    let addr = load::address(&mut c, "bare-server addr=");
                    (c, addr)
                }
                Some((d, cache)) => load::serve(
                    data.path(),
                    &["--durability", d],
                    &[("VIGIE_CACHE_ENABLED", if cache { "true" } else { "false" })],
                ),
            };
            let b = Arc::clone(&bodies);
            let request = move |i: usize| load::post(b[i % b.len()].clone(), None);
            // Warm-up, then the measured run.
            rt.block_on(load::http(
                &addr,
                conns,
                Duration::from_secs(1),
                request.clone(),
            ));
            let r = rt.block_on(load::http(&addr, conns, RUN, request));
            let rss = peak_rss_kib(child.id());
            let _ = child.kill();
            let _ = child.wait();
            if cfg.is_none() {
                bare.push((conns, r.rps, r.p50));
            }
            let (brps, bp50) = bare
                .iter()
                .find(|(c, _, _)| *c == conns)
                .map(|(_, r, p)| (*r, *p))
                .unwrap();
            let line = format!(
                "| {name} | {conns} | {:.0} | {:.0} µs | {:.0} µs | {:.1} MiB | {:.2} | {:.2} |\n",
                r.rps,
                r.p50.as_secs_f64() * 1e6,
                r.p99.as_secs_f64() * 1e6,
                rss as f64 / 1024.0,
                r.rps / brps,
                r.p50.as_secs_f64() / bp50.as_secs_f64()
            );
            print!("{line}");
            table.push_str(&line);
        }
    }
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/compare.md");
    let _ = std::fs::create_dir_all(out.parent().unwrap());
    let _ = std::fs::write(&out, &table);
    println!("\n{table}");
}
