//! Hot reload: a change is picked up, a broken change keeps the last good set.

use serde_json::json;

use crate::support::{copy_dir, eventually, example_policies, Vigie};

fn alice_reads_finance(v: &Vigie) -> String {
    let r = v.post(
        "/v1/is_authorized",
        &json!({
            "principal": "Agency::User::\"alice\"",
            "action": "Agency::Action::\"read\"",
            "resource": "Agency::Record::\"finance-001\"",
        }),
    );
    r.json()["decision"].as_str().unwrap().to_owned()
}

const GRANT: &str = r#"
@id("temporary-finance-read")
permit (principal == Agency::User::"alice", action == Agency::Action::"read", resource in Agency::Department::"finance");
"#;

#[test]
fn a_change_is_picked_up_and_a_broken_one_keeps_the_last_good_set() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&example_policies(), dir.path());
    let v = Vigie::start(dir.path(), &[], &[]);
    assert_eq!(alice_reads_finance(&v), "Deny");

    // A new policy file: picked up by the watcher, no reload call.
    std::fs::write(dir.path().join("grant.cedar"), GRANT).unwrap();
    assert!(
        eventually(10, || alice_reads_finance(&v) == "Allow"),
        "the new policy was not picked up:\n{}",
        v.log()
    );
    let status = v.get("/v1/status").json();
    assert_eq!(status["policy"]["epoch"], 2);

    // A broken change: the last good set keeps serving, the status says why.
    std::fs::write(
        dir.path().join("grant.cedar"),
        "permit (principal, action, resource) when { 1 + };",
    )
    .unwrap();
    assert!(eventually(10, || !v.get("/v1/status").json()["reload"]
        ["last_error"]
        .is_null()));
    let status = v.get("/v1/status").json();
    let err = status["reload"]["last_error"][0]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(err.starts_with("grant.cedar:1:"), "{err}");
    assert_eq!(status["policy"]["epoch"], 2);
    assert_eq!(alice_reads_finance(&v), "Allow");
    assert!(v.log().contains("policy reload refused"), "{}", v.log());

    // A forced reload says why it is refused.
    let r = v.post("/v1/reload", &json!({}));
    assert_eq!(r.status, 422, "{}", r.text);
    assert_eq!(r.json()["error"]["code"], "reload_refused");
    assert!(r.json()["error"]["path"]
        .as_str()
        .unwrap()
        .starts_with("grant.cedar:1:"));

    // An entity change that breaks the schema is refused too.
    std::fs::remove_file(dir.path().join("grant.cedar")).unwrap();
    assert!(eventually(10, || alice_reads_finance(&v) == "Deny"));
    assert_eq!(
        v.get("/v1/status").json()["reload"]["last_error"],
        serde_json::Value::Null
    );
}

#[test]
fn forced_reload_answers_once_the_new_set_is_active() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&example_policies(), dir.path());
    let v = Vigie::start(dir.path(), &[], &[("VIGIE_POLICIES_WATCH", "false")]);
    let r = v.post("/v1/reload", &json!({})).json();
    assert_eq!(r["reloaded"], false);
    assert_eq!(r["epoch"], 1);

    std::fs::write(dir.path().join("grant.cedar"), GRANT).unwrap();
    let r = v.post("/v1/reload", &json!({}));
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["reloaded"], true);
    assert_eq!(r.json()["epoch"], 2);
    // No waiting: the answer came after the swap.
    assert_eq!(alice_reads_finance(&v), "Allow");
}

#[test]
fn entity_changes_reload_too() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&example_policies(), dir.path());
    let v = Vigie::start(dir.path(), &[], &[]);
    let path = dir.path().join("entities.json");
    let mut entities: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for e in entities.as_array_mut().unwrap() {
        if e["uid"]["id"] == "alice" {
            e["attrs"]["suspended"] = json!(true);
        }
    }
    let read = || {
        v.post(
            "/v1/is_authorized",
            &json!({"principal": "Agency::User::\"alice\"", "action": "Agency::Action::\"read\"", "resource": "Agency::Record::\"social-001\""}),
        )
        .json()["decision"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(read(), "Allow");
    std::fs::write(&path, serde_json::to_string_pretty(&entities).unwrap()).unwrap();
    assert!(eventually(10, || read() == "Deny"), "{}", v.log());
}
