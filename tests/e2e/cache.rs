//! The decision cache: hits, invalidation by reload, persistence across a
//! restart, a corrupt cache directory, expiry.

use serde_json::{json, Value};

use crate::support::{copy_dir, example_policies, Vigie};

fn read(principal: &str, resource: &str, context: Value) -> Value {
    json!({
        "principal": format!("Agency::User::\"{principal}\""),
        "action": "Agency::Action::\"read\"",
        "resource": format!("Agency::Record::\"{resource}\""),
        "context": context,
    })
}

/// Alice reads a sensitive record with a fresh MFA; `reordered`: the same
/// question with its context's keys in another order.
fn alice_with_mfa(reordered: bool) -> Value {
    let context = if reordered {
        json!({"ip": "10.0.0.1", "mfa": {"hardware": false, "age_seconds": 5, "methods": ["otp"], "present": true}})
    } else {
        json!({"mfa": {"present": true, "methods": ["otp"], "age_seconds": 5, "hardware": false}, "ip": "10.0.0.1"})
    };
    read("alice", "social-002", context)
}

fn ask(v: &Vigie, req: &Value) -> (String, bool) {
    let r = v.post("/v1/is_authorized", req).json();
    (
        r["decision"].as_str().unwrap().to_owned(),
        r["cached"].as_bool().unwrap(),
    )
}

#[test]
fn the_second_identical_request_is_cached() {
    let v = Vigie::example();
    let req = alice_with_mfa(false);
    assert_eq!(ask(&v, &req), ("Allow".into(), false));
    assert_eq!(ask(&v, &req), ("Allow".into(), true));
    // Same request, keys in another order: same entry.
    let reordered = alice_with_mfa(true);
    assert_eq!(ask(&v, &reordered), ("Allow".into(), true));
    // Anything different is a different question.
    let other = read(
        "alice",
        "social-002",
        json!({"mfa": {"present": true, "methods": ["otp"], "age_seconds": 5000, "hardware": false}, "ip": "10.0.0.1"}),
    );
    assert_eq!(ask(&v, &other), ("Deny".into(), false));

    let status = v.get("/v1/status").json();
    assert_eq!(status["cache"]["l1"]["hits"], 2);
    assert_eq!(status["cache"]["misses"], 2);
    let metrics = v.get("/metrics").text;
    assert!(
        metrics.contains("vigie_cache_hits_total{tier=\"l1\"} 2"),
        "{metrics}"
    );
}

/// The records in the outbox, in order.
fn records(data: &std::path::Path) -> Vec<Value> {
    let mut segments: Vec<_> = std::fs::read_dir(data.join("outbox"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "vlog"))
        .collect();
    segments.sort();
    let mut out = Vec::new();
    for path in segments {
        let bytes = std::fs::read(path).unwrap();
        let starts = bytes.windows(10).enumerate();
        for (i, _) in starts.filter(|(_, w)| w == b"{\"cached\":") {
            let mut values = serde_json::Deserializer::from_slice(&bytes[i..]).into_iter::<Value>();
            out.push(values.next().unwrap().unwrap());
        }
    }
    out
}

/// The same bytes again are answered from their remembered parse; the
/// answer and the record are those a parse gives, masks included.
#[test]
fn a_body_seen_before_is_not_parsed_again_and_logged_alike() {
    let data = tempfile::tempdir().unwrap();
    let mask = ("VIGIE_AUDIT_MASK", r#"["context.ip"]"#);
    let v = Vigie::start_in(&example_policies(), data.path(), &[], &[mask]);
    let req = alice_with_mfa(false);
    assert_eq!(ask(&v, &req), ("Allow".into(), false));
    assert_eq!(ask(&v, &req), ("Allow".into(), true));
    // The same question in other bytes: parsed, then found in the cache.
    let reordered = alice_with_mfa(true);
    assert_eq!(ask(&v, &reordered), ("Allow".into(), true));

    let cache = &v.get("/v1/status").json()["cache"];
    assert_eq!(cache["bodies"]["hits"], 1, "{cache}");
    assert_eq!(cache["bodies"]["entries"], 2, "{cache}");
    assert_eq!(cache["l1"]["hits"], 2, "{cache}");
    assert_eq!(cache["misses"], 1, "{cache}");

    let decisions: Vec<Value> = records(data.path())
        .into_iter()
        .filter(|r| r["kind"] == "decision")
        .collect();
    assert_eq!(decisions.len(), 3);
    let cached: Vec<&Value> = decisions.iter().map(|r| &r["cached"]).collect();
    assert_eq!(cached, [false, true, true]);
    for r in &decisions {
        assert_eq!(r["request"], decisions[0]["request"]);
        assert_eq!(r["reasons"], json!(["staff-read-sensitive-mfa"]));
    }
    assert_eq!(decisions[1]["request"]["context"]["ip"], "<masked>");
    assert_ne!(decisions[1]["decision_id"], decisions[0]["decision_id"]);
}

#[test]
fn a_reload_flips_cached_answers_at_once() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&example_policies(), dir.path());
    let v = Vigie::start(dir.path(), &[], &[("VIGIE_POLICIES_WATCH", "false")]);
    let finance = read("alice", "finance-001", json!({}));
    assert_eq!(ask(&v, &finance), ("Deny".into(), false));
    assert_eq!(ask(&v, &finance), ("Deny".into(), true));

    // A policy change.
    std::fs::write(
        dir.path().join("grant.cedar"),
        "@id(\"grant\")\npermit (principal == Agency::User::\"alice\", action, resource in Agency::Department::\"finance\");\n",
    )
    .unwrap();
    assert_eq!(v.post("/v1/reload", &json!({})).json()["reloaded"], true);
    assert_eq!(ask(&v, &finance), ("Allow".into(), false));

    // An entity change.
    let social = read("alice", "social-001", json!({}));
    assert_eq!(ask(&v, &social), ("Allow".into(), false));
    assert_eq!(ask(&v, &social), ("Allow".into(), true));
    let path = dir.path().join("entities.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut entities: Vec<Value> = serde_json::from_str(&text).unwrap();
    for e in &mut entities {
        if e["uid"]["id"] == "alice" {
            e["attrs"]["suspended"] = json!(true);
        }
    }
    std::fs::write(&path, serde_json::to_string(&entities).unwrap()).unwrap();
    assert_eq!(v.post("/v1/reload", &json!({})).json()["reloaded"], true);
    assert_eq!(ask(&v, &social), ("Deny".into(), false));
}

#[test]
fn after_a_restart_the_persistent_tier_answers() {
    let data = tempfile::tempdir().unwrap();
    let req = read("bob", "finance-001", json!({}));
    let v = Vigie::start_in(&example_policies(), data.path(), &[], &[]);
    assert_eq!(ask(&v, &req), ("Allow".into(), false));
    assert!(v.terminate().success());

    let v = Vigie::start_in(&example_policies(), data.path(), &[], &[]);
    assert_eq!(ask(&v, &req), ("Allow".into(), true));
    let status = v.get("/v1/status").json();
    assert_eq!(status["cache"]["l2"]["hits"], 1, "{status}");
}

#[test]
fn a_garbage_cache_is_moved_aside() {
    let data = tempfile::tempdir().unwrap();
    std::fs::write(
        data.path().join("cache"),
        b"\x00garbage, not a sled database",
    )
    .unwrap();
    let v = Vigie::start_in(&example_policies(), data.path(), &[], &[]);
    let req = read("alice", "social-001", json!({}));
    assert_eq!(ask(&v, &req), ("Allow".into(), false));
    assert_eq!(ask(&v, &req), ("Allow".into(), true));
    assert_eq!(v.get("/v1/status").json()["cache"]["l2"]["enabled"], true);
    assert!(v.log().contains("moving it aside"), "{}", v.log());
    let aside = std::fs::read_dir(data.path())
        .unwrap()
        .filter_map(Result::ok)
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("cache.corrupt-")
        });
    assert!(aside);
}

#[test]
fn entries_expire() {
    let v = Vigie::start(&example_policies(), &[], &[("VIGIE_CACHE_TTL_MS", "300")]);
    let req = read("alice", "social-001", json!({}));
    assert_eq!(ask(&v, &req), ("Allow".into(), false));
    assert_eq!(ask(&v, &req), ("Allow".into(), true));
    std::thread::sleep(std::time::Duration::from_millis(400));
    assert_eq!(ask(&v, &req), ("Allow".into(), false));
}

#[test]
fn the_cache_can_be_turned_off() {
    let v = Vigie::start(
        &example_policies(),
        &[],
        &[("VIGIE_CACHE_ENABLED", "false")],
    );
    let req = read("alice", "social-001", json!({}));
    assert_eq!(ask(&v, &req), ("Allow".into(), false));
    assert_eq!(ask(&v, &req), ("Allow".into(), false));
}
