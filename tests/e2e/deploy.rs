//! The deployment files: compose.yaml and the Kubernetes manifests validate
//! against published schemas, and the compose topology runs here as local
//! processes with the exact commands compose.yaml gives each Vigie service
//! (container paths and host names mapped to this machine).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::support::{eventually, free_port, BIN};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn compose_and_kubernetes_files_validate_against_their_schemas() {
    let python = std::env::var("ORACLE_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&python)
        .arg(root().join("tests/deploy/validate.py"))
        .arg(root())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "(./scripts/test installs the schema packages for `{python}`)\n{text}"
    );
    assert!(
        text.contains("0 errors against the Compose spec schema"),
        "{text}"
    );
    assert!(
        text.contains("StatefulSet") && text.contains("Deployment"),
        "{text}"
    );
}

/// Kills every process it holds when dropped.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn get(url: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut req = ureq::get(url).timeout(Duration::from_secs(10));
    for (k, v) in headers {
        req = req.set(k, v);
    }
    match req.call() {
        Ok(r) => (r.status(), r.into_json().unwrap_or(Value::Null)),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap_or(Value::Null)),
        Err(_) => (0, Value::Null),
    }
}

fn ready(url: &str) -> bool {
    eventually(30, || get(url, &[]).0 == 200)
}

#[test]
fn the_compose_topology_runs_as_local_processes() {
    let compose: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(root().join("compose.yaml")).unwrap())
            .unwrap();
    let command = |service: &str| -> Vec<String> {
        compose["services"][service]["command"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_owned())
            .collect()
    };
    let (sidecar_data, ledger_data, etc) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let (sidecar_port, ledger_port, demo_port) = (free_port(), free_port(), free_port());
    // The ledger's config, with the sidecar's volume where compose mounts it.
    let ledger_toml = std::fs::read_to_string(root().join("deploy/ledger.toml"))
        .unwrap()
        .replace(
            "/sidecar/sidecar.pub",
            sidecar_data.path().join("sidecar.pub").to_str().unwrap(),
        );
    std::fs::write(etc.path().join("ledger.toml"), ledger_toml).unwrap();
    let map = |arg: &str| -> String {
        match arg {
            "/etc/vigie/policies" => root().join("policies").to_string_lossy().into_owned(),
            "/var/lib/vigie" => sidecar_data.path().to_string_lossy().into_owned(),
            "/var/lib/vigie-ledger" => ledger_data.path().to_string_lossy().into_owned(),
            "/etc/vigie/ledger.toml" => etc
                .path()
                .join("ledger.toml")
                .to_string_lossy()
                .into_owned(),
            "0.0.0.0:8190" => format!("127.0.0.1:{sidecar_port}"),
            "0.0.0.0:8290" => format!("127.0.0.1:{ledger_port}"),
            "http://ledger:8290" => format!("http://127.0.0.1:{ledger_port}"),
            other => other.to_owned(),
        }
    };
    let (receiver, received) = crate::telemetry::grpc_receiver();
    let mut procs = Procs(Vec::new());
    let spawn = |args: Vec<String>, env: Vec<(String, String)>| -> Child {
        let mut c = Command::new(BIN);
        c.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (k, _) in std::env::vars() {
            if k.starts_with("VIGIE_") || k.starts_with("OTEL_") {
                c.env_remove(k);
            }
        }
        c.envs(env);
        c.spawn().unwrap()
    };

    let ledger_cmd: Vec<String> = command("ledger").iter().map(|a| map(a)).collect();
    assert_eq!(command("ledger")[0], "ledger");
    procs.0.push(spawn(ledger_cmd, vec![]));
    assert!(
        ready(&format!("http://127.0.0.1:{ledger_port}/readyz")),
        "the ledger did not start"
    );

    let env: Vec<(String, String)> = compose["services"]["sidecar"]["environment"]
        .as_mapping()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            let (k, v) = (
                k.as_str().unwrap().to_owned(),
                v.as_str().unwrap().to_owned(),
            );
            let v = if k == "OTEL_EXPORTER_OTLP_ENDPOINT" {
                format!("http://{receiver}")
            } else {
                v
            };
            (k, v)
        })
        .chain([
            ("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "100".to_owned()),
            ("VIGIE_AUDIT_BATCH_MAX_DELAY_MS".to_owned(), "20".to_owned()),
        ])
        .collect();
    assert_eq!(command("sidecar")[0], "serve");
    procs.0.push(spawn(
        command("sidecar").iter().map(|a| map(a)).collect(),
        env,
    ));
    assert!(
        ready(&format!("http://127.0.0.1:{sidecar_port}/readyz")),
        "the sidecar did not start"
    );

    let demo = Command::new("python3")
        .arg(root().join("deploy/demo/app.py"))
        .env("VIGIE_URL", format!("http://127.0.0.1:{sidecar_port}"))
        .env("PORT", demo_port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    procs.0.push(demo);
    assert!(
        ready(&format!("http://127.0.0.1:{demo_port}/healthz")),
        "the demo service did not start"
    );

    let trace = "0af7651916cd43dd8448eb211c80319c";
    let tp = format!("00-{trace}-b7ad6b7169203331-01");
    let (code, body) = get(
        &format!("http://127.0.0.1:{demo_port}/records/social-001"),
        &[("X-User", "alice"), ("traceparent", &tp)],
    );
    assert_eq!(code, 200, "{body}");
    let id = body["decision_id"].as_str().unwrap().to_owned();
    let (code, _) = get(
        &format!("http://127.0.0.1:{demo_port}/records/finance-001"),
        &[("X-User", "alice")],
    );
    assert_eq!(code, 403);

    // The decision is in the ledger (the sidecar's key enrolled from its volume)...
    let url = format!("http://127.0.0.1:{ledger_port}/v1/decisions/{id}");
    assert!(
        eventually(30, || get(&url, &[]).0 == 200),
        "decision {id} never reached the ledger"
    );
    let rec = get(&url, &[]).1;
    assert_eq!(rec["record"]["sidecar"], "demo");
    assert_eq!(rec["record"]["trace_id"], trace);
    // ... and its span at the OTLP receiver, in the caller's trace.
    assert!(eventually(20, || crate::telemetry::spans(&received)
        .iter()
        .any(|(s, a)| s.name == "vigie.decision"
            && a.get("vigie.decision_id") == Some(&id)
            && s.trace_id
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
                == trace)));
}
