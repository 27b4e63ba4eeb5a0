//! The native HTTP API: decisions, and every kind of bad input.

use serde_json::json;

use crate::support::{example_policies, Vigie};

fn mfa() -> serde_json::Value {
    json!({"present": true, "methods": ["pwd", "otp"], "age_seconds": 60, "hardware": false})
}

#[test]
fn decisions_carry_their_determining_policies() {
    let v = Vigie::example();
    let r = v.post(
        "/v1/is_authorized",
        &json!({
            "principal": "Agency::User::\"alice\"",
            "action": {"type": "Agency::Action", "id": "read"},
            "resource": {"type": "Agency::Record", "id": "social-002"},
            "context": {"mfa": mfa(), "ip": "10.0.0.1"},
        }),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    let body = r.json();
    assert_eq!(body["decision"], "Allow");
    assert_eq!(
        body["diagnostics"]["reason"],
        json!(["staff-read-sensitive-mfa"])
    );
    assert_eq!(body["diagnostics"]["errors"], json!([]));
    assert_eq!(body["cached"], false);
    let id = body["decision_id"].as_str().unwrap();
    assert_eq!(uuid_version(id), '7', "decision ids are UUIDv7: {id}");

    // A forbid overrides, and says so.
    let r = v.post(
        "/v1/is_authorized",
        &json!({
            "principal": "Agency::User::\"alice\"",
            "action": "Agency::Action::\"read\"",
            "resource": "Agency::Record::\"social-002\"",
            "context": {"mfa": mfa(), "ip": {"__extn": {"fn": "ip", "arg": "2001:db8:bad::9"}}},
        }),
    );
    assert_eq!(r.json()["decision"], "Deny");
    assert_eq!(
        r.json()["diagnostics"]["reason"],
        json!(["forbid-blocked-ranges"])
    );
}

fn uuid_version(id: &str) -> char {
    id.chars().nth(14).unwrap()
}

#[test]
fn extension_values_in_context_as_plain_strings_or_escapes() {
    let v = Vigie::example();
    for (risk, now, want) in [
        (json!("0.95"), json!("2024-01-01T00:00:00Z"), "Deny"),
        (
            json!({"__extn": {"fn": "decimal", "arg": "0.10"}}),
            json!("2024-01-01T00:00:00Z"),
            "Allow",
        ),
        (
            json!("0.10"),
            json!({"__extn": {"fn": "datetime", "arg": "2026-01-01T00:00:00Z"}}),
            "Deny",
        ),
    ] {
        let r = v.post(
            "/v1/is_authorized",
            &json!({
                "principal": "Agency::User::\"dominique\"",
                "action": "Agency::Action::\"read\"",
                "resource": "Agency::Record::\"health-001\"",
                "context": {"mfa": mfa(), "risk": risk, "now": now},
            }),
        );
        assert_eq!(
            r.json()["decision"],
            want,
            "risk {risk}, now {now}: {}",
            r.text
        );
    }
}

#[test]
fn request_scoped_entities_are_merged_over_stored_ones() {
    let v = Vigie::example();
    let zoe = json!({
        "uid": {"type": "Agency::User", "id": "zoe"},
        "attrs": {"department": {"type": "Agency::Department", "id": "social"},
                  "clearance": 0, "suspended": false, "supervises": []},
        "parents": [{"type": "Agency::Role", "id": "staff"}, {"type": "Agency::Department", "id": "social"}],
    });
    let req = |entities: serde_json::Value| {
        json!({
            "principal": "Agency::User::\"zoe\"",
            "action": "Agency::Action::\"read\"",
            "resource": "Agency::Record::\"social-001\"",
            "entities": entities,
        })
    };
    assert_eq!(
        v.post("/v1/is_authorized", &req(json!([]))).json()["decision"],
        "Deny"
    );
    assert_eq!(
        v.post("/v1/is_authorized", &req(json!([zoe]))).json()["decision"],
        "Allow"
    );

    // A stored entity can be replaced for one request: alice suspended.
    let alice = json!({
        "uid": {"type": "Agency::User", "id": "alice"},
        "attrs": {"department": {"type": "Agency::Department", "id": "social"},
                  "clearance": 1, "suspended": true, "supervises": []},
        "parents": [{"type": "Agency::Role", "id": "staff"}, {"type": "Agency::Department", "id": "social"}],
    });
    let r = v.post(
        "/v1/is_authorized",
        &json!({
            "principal": "Agency::User::\"alice\"",
            "action": "Agency::Action::\"read\"",
            "resource": "Agency::Record::\"social-001\"",
            "entities": [alice],
        }),
    );
    assert_eq!(
        r.json()["diagnostics"]["reason"],
        json!(["forbid-suspended"])
    );
    // ... and only for that request.
    let r = v.post(
        "/v1/is_authorized",
        &json!({
            "principal": "Agency::User::\"alice\"",
            "action": "Agency::Action::\"read\"",
            "resource": "Agency::Record::\"social-001\"",
        }),
    );
    assert_eq!(r.json()["decision"], "Allow");

    // A request-scoped entity that does not fit the schema is named.
    let mut bad = zoe.clone();
    bad["attrs"]["clearance"] = json!("high");
    let r = v.post("/v1/is_authorized", &req(json!([bad])));
    let msg = r.assert_error(400, "invalid_entity", "entities[0]");
    assert!(msg.contains("clearance"), "{msg}");
}

#[test]
fn bad_requests_name_the_field() {
    let v = Vigie::example();
    let base = json!({
        "principal": "Agency::User::\"alice\"",
        "action": "Agency::Action::\"read\"",
        "resource": "Agency::Record::\"social-001\"",
    });
    let with = |key: &str, value: serde_json::Value| {
        let mut b = base.clone();
        b[key] = value;
        b
    };

    let r = v.post(
        "/v1/is_authorized",
        &with("principal", json!("Agency::Usr::\"alice\"")),
    );
    let msg = r.assert_error(400, "unknown_entity_type", "principal");
    assert!(msg.contains("Agency::Usr"), "{msg}");

    let r = v.post(
        "/v1/is_authorized",
        &with("action", json!("Agency::Action::\"fly\"")),
    );
    let msg = r.assert_error(400, "unknown_action", "action");
    assert!(msg.contains("fly"), "{msg}");

    let r = v.post(
        "/v1/is_authorized",
        &with("resource", json!("Agency::System::\"payroll\"")),
    );
    r.assert_error(400, "invalid_resource_type", "resource");

    let r = v.post(
        "/v1/is_authorized",
        &with("principal", json!({"type": "Agency::User"})),
    );
    let msg = r.assert_error(400, "invalid_entity_uid", "principal");
    assert!(msg.contains("`id`"), "{msg}");

    let r = v.post(
        "/v1/is_authorized",
        &with(
            "context",
            json!({"mfa": {"present": "yes", "methods": [], "age_seconds": 1, "hardware": false}}),
        ),
    );
    let msg = r.assert_error(400, "invalid_context", "context.mfa.present");
    assert!(msg.contains("present"), "{msg}");

    let r = v.post("/v1/is_authorized", &with("context", json!({"wifi": true})));
    let msg = r.assert_error(400, "invalid_context", "context.wifi");
    assert!(msg.contains("wifi"), "{msg}");

    let r = v.post(
        "/v1/is_authorized",
        &with("context", json!({"ip": "not-an-ip"})),
    );
    r.assert_error(400, "invalid_context", "context.ip");

    let r = v.post("/v1/is_authorized", &with("context", json!([1, 2])));
    r.assert_error(400, "invalid_context", "context");

    let r = v.post("/v1/is_authorized", &with("contxt", json!({})));
    let msg = r.assert_error(400, "invalid_field", "contxt");
    assert!(msg.contains("unknown field `contxt`"), "{msg}");

    let mut missing = base.clone();
    missing.as_object_mut().unwrap().remove("resource");
    let msg = v
        .post("/v1/is_authorized", &missing)
        .assert_error(400, "invalid_field", "");
    assert!(msg.contains("`resource`"), "{msg}");

    let r = v.send(
        "POST",
        "/v1/is_authorized",
        &[("content-type", "application/json")],
        Some(b"{\"principal\":"),
    );
    r.assert_error(400, "malformed_json", "");

    let r = v.send(
        "POST",
        "/v1/is_authorized",
        &[("content-type", "text/plain")],
        Some(base.to_string().as_bytes()),
    );
    r.assert_error(415, "unsupported_media_type", "Content-Type");

    let r = v.get("/v1/is_authorized");
    r.assert_error(405, "method_not_allowed", "");
    assert_eq!(r.header("allow"), Some("POST"));

    let r = v.post("/healthz", &json!({}));
    r.assert_error(405, "method_not_allowed", "");

    let r = v.get("/v2/nothing");
    r.assert_error(404, "not_found", "");
}

#[test]
fn body_limit_is_configurable_and_enforced() {
    let v = Vigie::start(
        &example_policies(),
        &[],
        &[("VIGIE_SERVER_MAX_BODY_BYTES", "512")],
    );
    let big = json!({
        "principal": "Agency::User::\"alice\"",
        "action": "Agency::Action::\"read\"",
        "resource": "Agency::Record::\"social-001\"",
        "context": {"pad": "x".repeat(600)},
    });
    let r = v.post("/v1/is_authorized", &big);
    let msg = r.assert_error(413, "body_too_large", "");
    assert!(msg.contains("512"), "{msg}");

    // Default: 1 MiB. A declared length over the limit is refused before the
    // body is read (raw TCP: a client still sending might see a reset).
    let v = Vigie::example();
    let out = crate::support::raw_http(
        v.addr,
        format!(
            "POST /v1/is_authorized HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            (1 << 20) + 1
        )
        .as_bytes(),
    );
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    assert!(out.contains("\"code\":\"body_too_large\""), "{out}");
    // Just under the limit is read (and then refused as bad JSON, not too large).
    let body = vec![b' '; 1 << 20];
    let r = v.send(
        "POST",
        "/v1/is_authorized",
        &[("content-type", "application/json")],
        Some(&body),
    );
    r.assert_error(400, "malformed_json", "");
}

#[test]
fn batch_answers_in_order_and_locates_bad_items() {
    let v = Vigie::example();
    let r = v.post(
        "/v1/is_authorized/batch",
        &json!({"requests": [
            {"principal": "Agency::User::\"alice\"", "action": "Agency::Action::\"read\"", "resource": "Agency::Record::\"social-001\""},
            {"principal": "Agency::User::\"alice\"", "action": "Agency::Action::\"read\"", "resource": "Agency::Record::\"finance-001\""},
            {"principal": "Agency::User::\"alice\"", "action": "Agency::Action::\"fly\"", "resource": "Agency::Record::\"finance-001\""},
            {"principal": "Agency::User::\"gaston\"", "action": "Agency::Action::\"read\"", "resource": "Agency::Record::\"social-001\""},
        ]}),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    let out = r.json()["responses"].as_array().unwrap().clone();
    assert_eq!(out.len(), 4);
    assert_eq!(out[0]["decision"], "Allow");
    assert_eq!(out[1]["decision"], "Deny");
    assert_eq!(out[2]["error"]["code"], "unknown_action");
    assert_eq!(out[2]["error"]["path"], "requests[2].action");
    assert_eq!(out[3]["diagnostics"]["reason"], json!(["forbid-suspended"]));

    let r = v.post("/v1/is_authorized/batch", &json!({"reqs": []}));
    r.assert_error(400, "invalid_field", "reqs");
}

#[test]
fn request_id_is_echoed() {
    let v = Vigie::example();
    let r = v.send("GET", "/healthz", &[("x-request-id", "trace-42")], None);
    assert_eq!(r.header("x-request-id"), Some("trace-42"));
    let r = v.send(
        "POST",
        "/v1/is_authorized",
        &[
            ("x-request-id", "e-1"),
            ("content-type", "application/json"),
        ],
        Some(b"{}"),
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.header("x-request-id"), Some("e-1"));
}

#[test]
fn health_status_and_metrics() {
    let v = Vigie::example();
    assert_eq!(v.get("/healthz").status, 200);
    assert_eq!(v.get("/readyz").status, 200);
    v.post(
        "/v1/is_authorized",
        &json!({"principal": "Agency::User::\"alice\"", "action": "Agency::Action::\"read\"", "resource": "Agency::Record::\"social-001\""}),
    );
    let s = v.get("/v1/status").json();
    assert_eq!(s["policy"]["epoch"], 1);
    assert_eq!(s["policy"]["policies"], 17);
    assert_eq!(s["policy"]["templates"], 1);
    assert_eq!(s["policy"]["links"], 1);
    assert_eq!(s["policy"]["namespace"], "Agency");
    assert_eq!(s["policy"]["hash"].as_str().unwrap().len(), 64);
    assert_eq!(s["reload"]["last_error"], serde_json::Value::Null);
    assert_eq!(s["decisions"]["allow"], 1);
    let m = v.get("/metrics");
    assert!(
        m.text
            .contains("vigie_decisions_total{decision=\"allow\"} 1"),
        "{}",
        m.text
    );
}

#[cfg(unix)]
#[test]
fn unix_socket_listener_serves_the_same_api() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vigie.sock");
    let _v = Vigie::start(
        &example_policies(),
        &["--unix-socket", sock.to_str().unwrap()],
        &[],
    );
    assert!(crate::support::eventually(10, || sock.exists()));
    let body = json!({"principal": "Agency::User::\"alice\"", "action": "Agency::Action::\"read\"", "resource": "Agency::Record::\"social-001\""}).to_string();
    let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    write!(
        s,
        "POST /v1/is_authorized HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("\"decision\":\"Allow\""), "{out}");
}
