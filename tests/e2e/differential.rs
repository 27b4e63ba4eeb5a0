//! Differential test against the reference Cedar engine (cedarpy): a
//! generated scenario (fixed seed; hundreds of entities, over a thousand
//! requests covering every policy) is decided by cedarpy, then sent through
//! Vigie's native, batch and AuthZEN endpoints. Decisions and determining
//! policy ids must agree everywhere.
//!
//! Needs `python3` with `cedarpy` (`pip install cedarpy`); `.ci/run` installs it.

use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};

use crate::support::{example_policies, Vigie};

fn generate(out: &Path) -> Vec<Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/differential/oracle.py");
    // `scripts/test` points ORACLE_PYTHON at a Python that has cedarpy.
    let python = std::env::var("ORACLE_PYTHON").unwrap_or_else(|_| "python3".into());
    let result = Command::new(&python)
        .arg(&script)
        .arg(example_policies())
        .arg(out)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run python3 ({e}); the differential test needs python3 with cedarpy")
        });
    assert!(
        result.status.success(),
        "the oracle failed (is cedarpy installed for `{python}`? `./scripts/test` installs it):\n{}",
        String::from_utf8_lossy(&result.stderr)
    );
    eprintln!("{}", String::from_utf8_lossy(&result.stdout));
    let cases: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(out.join("cases.json")).unwrap()).unwrap();
    assert!(cases.len() >= 1000, "only {} cases", cases.len());
    cases
}

/// The AuthZEN form of a native request: qualified types, action name.
fn to_authzen(req: &Value) -> Value {
    let uid = |v: &Value| -> (String, String) {
        match v {
            Value::String(s) => {
                let (ty, id) = s.rsplit_once("::").unwrap();
                (ty.to_owned(), serde_json::from_str::<String>(id).unwrap())
            }
            _ => (
                v["type"].as_str().unwrap().to_owned(),
                v["id"].as_str().unwrap().to_owned(),
            ),
        }
    };
    let (pt, pid) = uid(&req["principal"]);
    let (_, action) = uid(&req["action"]);
    let (rt, rid) = uid(&req["resource"]);
    json!({
        "subject": {"type": pt, "id": pid},
        "action": {"name": action},
        "resource": {"type": rt, "id": rid},
        "context": req["context"],
    })
}

#[test]
fn vigie_agrees_with_the_reference_engine() {
    let dir = tempfile::tempdir().unwrap();
    let cases = generate(dir.path());
    // The engine itself, cache off: every answer is computed.
    let v = Vigie::start(
        &dir.path().join("policies"),
        &[],
        &[("VIGIE_CACHE_ENABLED", "false")],
    );

    let mut mismatches = Vec::new();
    // 1. One by one.
    for (i, case) in cases.iter().enumerate() {
        let r = v.post("/v1/is_authorized", &case["request"]);
        let got = r.json();
        if got["decision"] != case["decision"] || got["diagnostics"]["reason"] != case["reasons"] {
            mismatches.push(format!(
                "is_authorized #{i}: {} -> {got} (cedar: {} {})",
                case["request"], case["decision"], case["reasons"]
            ));
        }
        if !got["diagnostics"]["errors"].as_array().unwrap().is_empty() {
            mismatches.push(format!("#{i}: unexpected evaluation errors {got}"));
        }
    }
    // 2. In batches.
    for (chunk_no, chunk) in cases.chunks(100).enumerate() {
        let requests: Vec<&Value> = chunk.iter().map(|c| &c["request"]).collect();
        let r = v.post("/v1/is_authorized/batch", &json!({ "requests": requests }));
        let responses = r.json()["responses"].as_array().unwrap().clone();
        assert_eq!(responses.len(), chunk.len());
        for (j, (case, got)) in chunk.iter().zip(&responses).enumerate() {
            if got["decision"] != case["decision"]
                || got["diagnostics"]["reason"] != case["reasons"]
            {
                mismatches.push(format!(
                    "batch #{}: {got} (cedar: {} {})",
                    chunk_no * 100 + j,
                    case["decision"],
                    case["reasons"]
                ));
            }
        }
    }
    // 3. AuthZEN (requests without request-scoped entities: AuthZEN cannot
    //    express an entity's parents).
    let plain: Vec<&Value> = cases
        .iter()
        .filter(|c| c["request"].get("entities").is_none())
        .collect();
    assert!(plain.len() >= 1000);
    for chunk in plain.chunks(100) {
        let evaluations: Vec<Value> = chunk.iter().map(|c| to_authzen(&c["request"])).collect();
        let r = v.post(
            "/access/v1/evaluations",
            &json!({ "evaluations": evaluations }),
        );
        let out = r.json()["evaluations"].as_array().unwrap().clone();
        assert_eq!(out.len(), chunk.len(), "{}", r.text);
        for (case, got) in chunk.iter().zip(&out) {
            let want = case["decision"] == "Allow";
            if got != &json!({ "decision": want }) {
                mismatches.push(format!(
                    "authzen: {} -> {got} (cedar: {})",
                    case["request"], case["decision"]
                ));
            }
        }
    }
    // Single AuthZEN evaluations report the determining policies too.
    for case in plain.iter().step_by(7) {
        let got = v
            .post("/access/v1/evaluation", &to_authzen(&case["request"]))
            .json();
        if got["decision"] != (case["decision"] == "Allow")
            || got["context"]["reason"] != case["reasons"]
        {
            mismatches.push(format!(
                "authzen single: {} -> {got} (cedar: {} {})",
                case["request"], case["decision"], case["reasons"]
            ));
        }
    }
    // Cached answers agree too: the second time, every answer is a hit.
    let cached = Vigie::start(&dir.path().join("policies"), &[], &[]);
    for round in 0..2 {
        for (i, case) in cases.iter().enumerate().step_by(3) {
            let got = cached.post("/v1/is_authorized", &case["request"]).json();
            if got["decision"] != case["decision"]
                || got["diagnostics"]["reason"] != case["reasons"]
                || got["cached"] != (round == 1)
            {
                mismatches.push(format!(
                    "cache round {round} #{i}: {got} (cedar: {} {})",
                    case["decision"], case["reasons"]
                ));
            }
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} disagreements with the reference engine, the first ones:\n{}",
        mismatches.len(),
        mismatches
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}
