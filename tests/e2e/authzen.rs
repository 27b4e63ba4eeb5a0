//! The AuthZEN Authorization API 1.0 endpoints.

use serde_json::json;

use crate::support::{example_policies, Vigie};

fn eval(subject: &str, action: &str, resource: &str) -> serde_json::Value {
    json!({
        "subject": {"type": "User", "id": subject},
        "action": {"name": action},
        "resource": {"type": "Record", "id": resource},
    })
}

#[test]
fn single_evaluation_resolves_types_in_the_schema_namespace() {
    let v = Vigie::example();
    let r = v.post(
        "/access/v1/evaluation",
        &eval("alice", "read", "social-001"),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["decision"], true);
    assert_eq!(
        r.json()["context"]["reason"],
        json!(["staff-read-department"])
    );

    // Qualified types work too; an absent context is {}.
    let r = v.post(
        "/access/v1/evaluation",
        &json!({
            "subject": {"type": "Agency::User", "id": "alice"},
            "action": {"name": "read"},
            "resource": {"type": "Agency::Record", "id": "finance-001"},
        }),
    );
    assert_eq!(r.json()["decision"], false);

    let r = v.post("/access/v1/evaluation", &eval("alice", "fly", "social-001"));
    r.assert_error(400, "unknown_action", "action.name");
    let mut bad = eval("alice", "read", "social-001");
    bad["subject"]["type"] = json!("Usr");
    let r = v.post("/access/v1/evaluation", &bad);
    r.assert_error(400, "unknown_entity_type", "subject");
    let mut bad = eval("alice", "read", "social-001");
    bad["context"] = json!({"mfa": {"present": 3}});
    let r = v.post("/access/v1/evaluation", &bad);
    r.assert_error(400, "invalid_context", "context.mfa.present");
}

#[test]
fn properties_never_override_stored_attributes_by_default() {
    let v = Vigie::example();
    // gaston is suspended; claiming otherwise does not help.
    let mut req = eval("gaston", "read", "social-001");
    req["subject"]["properties"] = json!({"suspended": false});
    let r = v.post("/access/v1/evaluation", &req);
    assert_eq!(r.json()["decision"], false, "{}", r.text);
    assert_eq!(r.json()["context"]["reason"], json!(["forbid-suspended"]));

    // Properties are checked against the schema like any entity: an
    // undeclared attribute is refused and named.
    let mut req = eval("alice", "read", "social-001");
    req["subject"]["properties"] = json!({"favourite_colour": "blue"});
    let r = v.post("/access/v1/evaluation", &req);
    r.assert_error(400, "invalid_entity", "subject.properties");

    // An entity the store does not know, described by its properties.
    let mut req = eval("zoe", "read", "social-001");
    req["subject"]["properties"] = json!({
        "department": {"__entity": {"type": "Agency::Department", "id": "social"}},
        "clearance": 0, "suspended": true, "supervises": []
    });
    let r = v.post("/access/v1/evaluation", &req);
    assert_eq!(
        r.json()["context"]["reason"],
        json!(["forbid-suspended"]),
        "{}",
        r.text
    );
}

#[test]
fn request_properties_win_when_configured_and_aliases_apply() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("vigie.toml");
    std::fs::write(
        &cfg,
        "[authzen]\nproperties = \"request\"\naliases = { user = \"Agency::User\", dossier = \"Agency::Record\" }\n",
    )
    .unwrap();
    let v = Vigie::start(
        &example_policies(),
        &["--config", cfg.to_str().unwrap()],
        &[],
    );
    let req = json!({
        "subject": {"type": "user", "id": "gaston", "properties": {"suspended": false}},
        "action": {"name": "read"},
        "resource": {"type": "dossier", "id": "social-001"},
    });
    let r = v.post("/access/v1/evaluation", &req);
    assert_eq!(r.json()["decision"], true, "{}", r.text);
}

#[test]
fn evaluations_follow_their_semantic() {
    let v = Vigie::example();
    let items = json!([
        {"resource": {"type": "Record", "id": "social-001"}},
        {"resource": {"type": "Record", "id": "finance-001"}},
        {"resource": {"type": "Recrd", "id": "x"}},
        {"resource": {"type": "Record", "id": "social-001"}},
    ]);
    let body = |semantic: Option<&str>| {
        let mut b = json!({
            "subject": {"type": "User", "id": "alice"},
            "action": {"name": "read"},
            "evaluations": items,
        });
        if let Some(s) = semantic {
            b["options"] = json!({"evaluations_semantic": s});
        }
        b
    };
    let r = v.post("/access/v1/evaluations", &body(None)).json();
    let out = r["evaluations"].as_array().unwrap();
    assert_eq!(out.len(), 4);
    assert_eq!(out[0], json!({"decision": true}));
    assert_eq!(out[1], json!({"decision": false}));
    assert_eq!(out[2]["decision"], false);
    assert_eq!(
        out[2]["context"]["error"]["path"],
        "evaluations[2].resource"
    );
    assert_eq!(out[3], json!({"decision": true}));

    let r = v
        .post("/access/v1/evaluations", &body(Some("deny_on_first_deny")))
        .json();
    assert_eq!(
        r["evaluations"],
        json!([{"decision": true}, {"decision": false}])
    );

    let r = v
        .post(
            "/access/v1/evaluations",
            &body(Some("permit_on_first_permit")),
        )
        .json();
    assert_eq!(r["evaluations"], json!([{"decision": true}]));

    let r = v.post("/access/v1/evaluations", &body(Some("all_of_them")));
    r.assert_error(400, "invalid_option", "options.evaluations_semantic");

    // An item's subject replaces the default whole.
    let r = v
        .post(
            "/access/v1/evaluations",
            &json!({
                "subject": {"type": "User", "id": "alice"},
                "action": {"name": "read"},
                "resource": {"type": "Record", "id": "social-001"},
                "evaluations": [{}, {"subject": {"type": "User", "id": "gaston"}}],
            }),
        )
        .json();
    assert_eq!(
        r["evaluations"],
        json!([{"decision": true}, {"decision": false}])
    );

    // Without items it is a single evaluation.
    let r = v
        .post(
            "/access/v1/evaluations",
            &eval("alice", "read", "social-001"),
        )
        .json();
    assert_eq!(r["decision"], true);
}

#[test]
fn well_known_configuration_and_request_id() {
    let v = Vigie::example();
    let r = v.send(
        "GET",
        "/.well-known/authzen-configuration",
        &[("x-request-id", "abc")],
        None,
    );
    assert_eq!(r.header("x-request-id"), Some("abc"));
    let c = r.json();
    let base = format!("http://{}", v.addr);
    assert_eq!(c["policy_decision_point"], base);
    assert_eq!(
        c["access_evaluation_endpoint"],
        format!("{base}/access/v1/evaluation")
    );
    assert_eq!(
        c["access_evaluations_endpoint"],
        format!("{base}/access/v1/evaluations")
    );
    let r = v.send(
        "POST",
        "/access/v1/evaluation",
        &[
            ("x-request-id", "req-7"),
            ("content-type", "application/json"),
        ],
        Some(eval("alice", "read", "social-001").to_string().as_bytes()),
    );
    assert_eq!(r.header("x-request-id"), Some("req-7"));
}
