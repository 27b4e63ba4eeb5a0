//! What the load benches share: starting a server pinned to core 0, reading
//! its address from its log, and driving HTTP/1.1 keep-alive connections.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

/// `program` under `taskset -c 0` when taskset exists.
pub fn pinned(program: &str) -> Command {
    if Command::new("taskset").arg("--version").output().is_ok() {
        let mut c = Command::new("taskset");
        c.args(["-c", "0", program]);
        c
    } else {
        Command::new(program)
    }
}

/// Reads the child's stderr until a line holds `marker`; returns the word
/// after it (the address) and keeps draining the rest.
pub fn address(child: &mut Child, marker: &str) -> String {
    let mut lines = BufReader::new(child.stderr.take().expect("stderr piped")).lines();
    let mut seen = String::new();
    let addr = loop {
        let Some(line) = lines.next() else {
            panic!("the server exited before listening; its log:\n{seen}");
        };
        let line = line.expect("readable log");
        seen.push_str(&line);
        seen.push('\n');
        if let Some(rest) = line.split(marker).nth(1) {
            break rest
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    addr
}

/// `vigie serve` on the example policies, pinned to core 0, on a free
/// loopback port, with `args` added and the environment `env` (logs quiet).
/// Plugins are off unless `env` turns them on: the bodies these benches
/// send carry the context attributes plugins would compute.
pub fn serve(data: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> (Child, String) {
    let mut c = pinned(env!("CARGO_BIN_EXE_vigie"));
    c.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .arg("--policies")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../policies"))
        .args(args)
        .env("VIGIE_LOG_LEVEL", "warn,vigie::app=info")
        .env("VIGIE_PLUGINS_ENABLED", "false")
        .envs(env.iter().copied())
        .stderr(std::process::Stdio::piped());
    // The benches' own switches are not sidecar settings (vigie refuses a
    // `VIGIE_` variable it does not know).
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("VIGIE_BENCH_")) {
        c.env_remove(k);
    }
    let mut child = c.spawn().expect("start vigie");
    let addr = address(&mut child, "listening (HTTP) addr=");
    (child, addr)
}

pub struct Stats {
    pub rps: f64,
    pub p50: Duration,
    pub p99: Duration,
}

pub fn stats(mut lat: Vec<Duration>, elapsed: Duration) -> Stats {
    lat.sort();
    let at = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    Stats {
        rps: lat.len() as f64 / elapsed.as_secs_f64(),
        p50: at(0.5),
        p99: at(0.99),
    }
}

/// `connections` keep-alive HTTP/1.1 connections, each sending
/// `request(i)` in turn for `run`; every answer must be 200.
pub async fn http(
    addr: &str,
    connections: usize,
    run: Duration,
    request: impl Fn(usize) -> hyper::Request<Full<Bytes>> + Send + Sync + Clone + 'static,
) -> Stats {
    let start = Instant::now();
    let tasks: Vec<_> = (0..connections)
        .map(|c| {
            let (addr, request) = (addr.to_owned(), request.clone());
            tokio::spawn(async move {
                let stream = tokio::net::TcpStream::connect(&addr)
                    .await
                    .expect("connect");
                stream.set_nodelay(true).expect("nodelay");
                let (mut send, conn) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                        .await
                        .expect("handshake");
                tokio::spawn(conn);
                let mut lat = Vec::new();
                let mut i = c;
                while start.elapsed() < run {
                    let t = Instant::now();
                    let resp = send.send_request(request(i)).await.expect("request");
                    let status = resp.status();
                    resp.into_body().collect().await.expect("body");
                    assert_eq!(status, 200);
                    lat.push(t.elapsed());
                    i += connections;
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("load task"));
    }
    stats(all, start.elapsed())
}

/// A JSON POST to `/v1/is_authorized`.
pub fn post(body: Bytes, traceparent: Option<String>) -> hyper::Request<Full<Bytes>> {
    let mut b = hyper::Request::post("/v1/is_authorized")
        .header("host", "bench")
        .header("content-type", "application/json");
    if let Some(tp) = traceparent {
        b = b.header("traceparent", tp);
    }
    b.body(Full::new(body)).expect("request")
}
