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

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

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
    let pinned = Command::new("taskset").arg("--version").output().is_ok();
    let mut cmd = if pinned {
        let mut c = Command::new("taskset");
        c.args(["-c", "0", env!("CARGO_BIN_EXE_vigie")]);
        c
    } else {
        Command::new(env!("CARGO_BIN_EXE_vigie"))
    };
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--durability",
        "process",
        "--data-dir",
    ])
    .arg(data)
    .arg("--policies")
    .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../policies"))
    .env("VIGIE_CACHE_ENABLED", "false")
    .env("VIGIE_LOG_LEVEL", "warn,vigie::app=info")
    .stderr(Stdio::piped());
    if let Some(addr) = export_to {
        cmd.env("VIGIE_TELEMETRY_ENABLED", "true")
            .env("VIGIE_TELEMETRY_PROTOCOL", "http/protobuf")
            .env("VIGIE_TELEMETRY_ENDPOINT", format!("http://{addr}"));
    }
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("vigie exited").unwrap();
        if let Some(rest) = line.split("listening (HTTP) addr=").nth(1) {
            break rest.trim().to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (child, addr)
}

async fn drive(addr: &str) -> (f64, Duration) {
    let start = Instant::now();
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|c| {
            let addr = addr.to_owned();
            tokio::spawn(async move {
                let stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
                stream.set_nodelay(true).unwrap();
                let (mut send, conn) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
                tokio::spawn(conn);
                let mut lat = Vec::new();
                let mut i = c;
                while start.elapsed() < RUN {
                    let body = format!(
                        r#"{{"principal":"Agency::User::\"{}\"","action":"Agency::Action::\"read\"","resource":"Agency::Record::\"social-00{}\""}}"#,
                        ["alice", "bob", "dominique"][i % 3],
                        1 + i % 3
                    );
                    let req = hyper::Request::post("/v1/is_authorized")
                        .header("host", "bench")
                        .header("content-type", "application/json")
                        .header("traceparent", format!("00-{:032x}-{:016x}-01", i as u128 + 1, i as u64 + 1))
                        .body(Full::new(Bytes::from(body)))
                        .unwrap();
                    let t = Instant::now();
                    let resp = send.send_request(req).await.unwrap();
                    resp.into_body().collect().await.unwrap();
                    lat.push(t.elapsed());
                    i += CONNECTIONS;
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    (
        all.len() as f64 / start.elapsed().as_secs_f64(),
        all[all.len() / 2],
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
        let (rps, p50) = rt.block_on(drive(&addr));
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
