//! Starting the real binary and talking to it.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_vigie");

/// The example policy directory of the repository.
pub fn example_policies() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies")
}

/// A fresh copy of a directory, for tests that change it.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), dest).unwrap();
        }
    }
}

/// A running `vigie serve`, killed on drop.
/// `vigie serve` on `policies` and `data` that is expected not to start:
/// its exit status and standard error.
pub fn failed_start(policies: &Path, data: &Path, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--policies"])
        .arg(policies)
        .arg("--data-dir")
        .arg(data)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub struct Vigie {
    child: Child,
    pub addr: SocketAddr,
    log: Arc<Mutex<String>>,
    _data: Option<tempfile::TempDir>,
}

impl Vigie {
    /// `vigie serve` on `policies`, a free loopback port, and a fresh data
    /// directory; `args` and `env` are added.
    pub fn start(policies: &Path, args: &[&str], env: &[(&str, &str)]) -> Vigie {
        let data = tempfile::tempdir().unwrap();
        let mut v = Self::start_in(policies, data.path(), args, env);
        v._data = Some(data);
        v
    }

    /// As [`Vigie::start`], with a data directory that outlives the process.
    ///
    /// Plugins are off unless `env` turns them on (`VIGIE_PLUGINS_ENABLED`):
    /// the tests of everything else give the context attributes plugins
    /// would compute themselves. `plugins.rs` tests the plugins.
    pub fn start_in(policies: &Path, data: &Path, args: &[&str], env: &[(&str, &str)]) -> Vigie {
        let mut env = env.to_vec();
        if !env.iter().any(|(k, _)| *k == "VIGIE_PLUGINS_ENABLED") {
            env.insert(0, ("VIGIE_PLUGINS_ENABLED", "false"));
        }
        let env = env.as_slice();
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            .arg("--policies")
            .arg(policies)
            .arg("--data-dir")
            .arg(data)
            .args(args);
        let (child, addr, log) = spawn_logged(cmd, env, "listening (HTTP)");
        Vigie {
            child,
            addr,
            log,
            _data: None,
        }
    }

    pub fn example() -> Vigie {
        Self::start(&example_policies(), &[], &[])
    }

    /// Stops the sidecar with SIGKILL: no chance to flush anything.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the sidecar with SIGTERM (a graceful stop) and waits for it.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "vigie did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn post(&self, path: &str, body: &Value) -> Reply {
        self.send(
            "POST",
            path,
            &[("content-type", "application/json")],
            Some(body.to_string().as_bytes()),
        )
    }

    pub fn get(&self, path: &str) -> Reply {
        self.send("GET", path, &[], None)
    }

    pub fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Reply {
        let mut req = ureq::request(method, &self.url(path)).timeout(Duration::from_secs(30));
        for (k, v) in headers {
            req = req.set(k, v);
        }
        let result = match body {
            Some(b) => req.send_bytes(b),
            None => req.call(),
        };
        let resp = match result {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {path}: {e}\n{}", self.log()),
        };
        let status = resp.status();
        let headers = resp
            .headers_names()
            .into_iter()
            .map(|n| {
                let v = resp.header(&n).unwrap_or("").to_owned();
                (n, v)
            })
            .collect();
        let text = resp.into_string().unwrap();
        Reply {
            status,
            headers,
            text,
        }
    }
}

/// A running `vigie ledger`, killed on drop.
pub struct Ledger {
    child: Child,
    pub addr: SocketAddr,
    log: Arc<Mutex<String>>,
}

/// A free loopback port (for a process that must come back on the same one).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts a vigie command with a clean `VIGIE_*` environment plus `env`,
/// keeps its log, and waits for the line announcing `listening` (text or
/// JSON logs) to learn its address.
fn spawn_logged(
    mut cmd: Command,
    env: &[(&str, &str)],
    listening: &'static str,
) -> (Child, SocketAddr, Arc<Mutex<String>>) {
    cmd.env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, _) in std::env::vars() {
        if k.starts_with("VIGIE_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("start vigie");
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = mpsc::channel();
    let sink = Arc::clone(&log);
    let text_marker = format!("{listening} addr=");
    let json_marker = format!("\"{listening}\"");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split(&text_marker).nth(1) {
                let _ = tx.send(rest.trim().to_owned());
            } else if line.contains(&json_marker) {
                // JSON logs: {"fields":{"message":"listening (HTTP)","addr":"..."}}
                let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                let _ = tx.send(v["fields"]["addr"].as_str().unwrap().to_owned());
            }
            let mut l = sink.lock().unwrap();
            l.push_str(&line);
            l.push('\n');
        }
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(a) => (child, a.parse().unwrap(), log),
        Err(_) => {
            let _ = child.kill();
            panic!("vigie did not start:\n{}", log.lock().unwrap());
        }
    }
}

impl Ledger {
    pub fn start(data: &Path, listen: &str) -> Ledger {
        let mut cmd = Command::new(BIN);
        cmd.args(["ledger", "--listen", listen, "--data-dir"])
            .arg(data);
        let (child, addr, log) = spawn_logged(cmd, &[], "listening (ledger)");
        Ledger { child, addr, log }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The ledger's public key, as it logs it at start.
    pub fn public_key(&self) -> String {
        let log = self.log.lock().unwrap().clone();
        log.split("public_key=")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned()
    }

    pub fn get(&self, path: &str) -> Reply {
        let resp = match ureq::get(&format!("{}{path}", self.url())).call() {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("GET {path}: {e}"),
        };
        let status = resp.status();
        Reply {
            status,
            headers: vec![],
            text: resp.into_string().unwrap(),
        }
    }

    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends raw bytes on a fresh TCP connection and reads the response until
/// the server closes (or 10 s pass).
pub fn raw_http(addr: SocketAddr, request: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

impl Drop for Vigie {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub text: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Asserts an error reply: its status, code and the field it names.
    #[track_caller]
    pub fn assert_error(&self, status: u16, code: &str, path: &str) -> String {
        assert_eq!(self.status, status, "{}", self.text);
        let v = self.json();
        assert_eq!(v["error"]["code"], code, "{}", self.text);
        assert_eq!(v["error"]["path"], path, "{}", self.text);
        v["error"]["message"].as_str().unwrap().to_owned()
    }
}

/// Polls `f` every 50 ms until it returns true or `secs` pass.
pub fn eventually(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}
