//! Decision throughput with traces exported over OTLP against tracing off,
//! as a ratio in one run.
//!
//!     cargo bench -p vigie --bench tracing --no-run
//!     taskset -c 1 cargo bench -p vigie --bench tracing
//!
//! Runs the real `vigie` twice (pinned to core 0 with `taskset` when
//! available; `process` durability, cache off): once without export, once
//! exporting every span over OTLP/HTTP to a receiver in this process that
//! reads each request whole. Every request carries a sampled `traceparent`.
//! 32 keep-alive connections, 4 s each, loopback only.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "load.rs"]
mod load;

use std::io::{BufRead, BufReader, Read, Write};
use std::time::Duration;

use bytes::Bytes;

const RUN: Duration = Duration::from_secs(4);
const CONNECTIONS: usize = 32;

/// An OTLP/HTTP sink: reads each request and answers 200.
fn sink() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut w = s;
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let mut len = 0;
                    loop {
                        let mut h = String::new();
                        r.read_line(&mut h).unwrap();
                        if h == "\r\n" || h.is_empty() {
                            break;
                        }
                        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap();
                        }
                    }
                    let mut body = vec![0; len];
                    r.read_exact(&mut body).unwrap();
                    let _ = w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
                }
            });
        }
    });
    addr
}

fn start(export_to: Option<&str>, data: &std::path::Path) -> (std::process::Child, String) {
    let endpoint = export_to.map(|a| format!("http://{a}")).unwrap_or_default();
    let mut env = vec![("VIGIE_CACHE_ENABLED", "false")];
    if export_to.is_some() {
        env.extend([
            ("VIGIE_TELEMETRY_ENABLED", "true"),
            ("VIGIE_TELEMETRY_PROTOCOL", "http/protobuf"),
            ("VIGIE_TELEMETRY_ENDPOINT", endpoint.as_str()),
        ]);
    }
    load::serve(data, &["--durability", "process"], &env)
}

fn request(i: usize) -> hyper::Request<http_body_util::Full<Bytes>> {
    let body = format!(
        r#"{{"principal":"Agency::User::\"{}\"","action":"Agency::Action::\"read\"","resource":"Agency::Record::\"social-00{}\""}}"#,
        ["alice", "bob", "dominique"][i % 3],
        1 + i % 3
    );
    load::post(
        Bytes::from(body),
        Some(format!(
            "00-{:032x}-{:016x}-01",
            i as u128 + 1,
            i as u64 + 1
        )),
    )
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let sink = sink();
    let mut results = Vec::new();
    for export in [None, Some(sink.as_str())] {
        let data = tempfile::tempdir().unwrap();
        let (mut child, addr) = start(export, data.path());
        let r = rt.block_on(load::http(&addr, CONNECTIONS, RUN, request));
        let (rps, p50) = (r.rps, r.p50);
        let _ = child.kill();
        let _ = child.wait();
        let name = if export.is_some() {
            "tracing exported (OTLP/HTTP)"
        } else {
            "tracing off"
        };
        println!(
            "{name:<30} {rps:>8.0} req/s   p50 {:>6.0} us   ({CONNECTIONS} connections, {} s)",
            p50.as_secs_f64() * 1e6,
            RUN.as_secs()
        );
        results.push(rps);
    }
    println!(
        "throughput with export / without: {:.3}",
        results[1] / results[0]
    );
}
