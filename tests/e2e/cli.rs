//! `vigie check`, `vigie test` and start-up errors, as a user runs them.

use std::process::Command;

use crate::support::{copy_dir, example_policies, BIN};

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_accepts_the_example() {
    let (code, out, _) = run(&["check", example_policies().to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.starts_with("ok: 17 policies, 1 templates, 1 links, 36 entities, 4 plugins"),
        "{out}"
    );
}

#[test]
fn check_reports_every_problem_with_its_location() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&example_policies(), dir.path());
    std::fs::write(
        dir.path().join("extra.cedar"),
        "@id(\"typo\")\npermit (principal, action == Agency::Action::\"read\", resource is Agency::Record)\nwhen { resource.sensitivty <= 1 };\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("admin/syntax.cedar"),
        "permit (principal, action, resource)\nwhen { 1 + };\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("zz-dup.cedar"),
        "@id(\"forbid-suspended\")\nforbid (principal, action, resource);\n",
    )
    .unwrap();
    let entities = std::fs::read_to_string(dir.path().join("entities.json")).unwrap();
    std::fs::write(
        dir.path().join("entities.json"),
        entities.replacen("\"clearance\": 1", "\"clearance\": \"one\"", 1),
    )
    .unwrap();

    let (code, out, _) = run(&["check", dir.path().to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    let find = |prefix: &str| {
        lines
            .iter()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line starting with `{prefix}` in:\n{out}"))
            .to_string()
    };
    assert!(find("admin/syntax.cedar:2:").contains("unexpected token"));
    assert!(find("extra.cedar:3:8:").contains("sensitivty"));
    assert!(find("zz-dup.cedar:1:").contains("duplicate policy id `forbid-suspended`"));
    let ent = find("entities.json:");
    assert!(ent.contains("clearance"), "{ent}");
}

#[test]
fn policy_ids_default_to_path_and_index() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("sub")).unwrap();
    std::fs::write(
        dir.path().join("sub/p.cedar"),
        "permit (principal == User::\"a\", action, resource);\nforbid (principal == User::\"b\", action, resource);\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("t.yaml"),
        "tests:\n  - name: b\n    request: {principal: 'User::\"b\"', action: 'Action::\"x\"', resource: 'R::\"r\"'}\n    expect: Deny\n    reasons: [sub/p.cedar:1]\n  - name: a\n    request: {principal: 'User::\"a\"', action: 'Action::\"x\"', resource: 'R::\"r\"'}\n    expect: Allow\n    reasons: [sub/p.cedar:0]\n",
    )
    .unwrap();
    let (code, out, err) = run(&["test", dir.path().to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.ends_with("2 passed, 0 failed\n"), "{out}");
    // Without a schema the directory loads, with a warning.
    let (code, _, err) = run(&["check", dir.path().to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(err.contains("no schema"), "{err}");
}

#[test]
fn test_runs_the_example_suite() {
    let (code, out, _) = run(&["test", example_policies().to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(out.trim_end().ends_with(" passed, 0 failed"), "{out}");
}

#[test]
fn test_shows_a_diff_for_each_failure() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&example_policies(), dir.path());
    std::fs::write(
        dir.path().join("tests/wrong.yaml"),
        "tests:\n  - name: alice thinks she can read finance\n    request:\n      principal: Agency::User::\"alice\"\n      action: Agency::Action::\"read\"\n      resource: Agency::Record::\"finance-001\"\n    expect: Allow\n    reasons: [staff-read-department]\n",
    )
    .unwrap();
    let (code, out, _) = run(&["test", dir.path().to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAIL tests/wrong.yaml"), "{out}");
    assert!(
        out.contains("  - expected: Allow by [staff-read-department]"),
        "{out}"
    );
    assert!(out.contains("  + actual:   Deny by []"), "{out}");
    assert!(out.trim_end().ends_with(" passed, 1 failed"), "{out}");
}

#[test]
fn unknown_config_keys_stop_the_start_with_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("vigie.toml");
    std::fs::write(&cfg, "[server]\nlisten = \"127.0.0.1:0\"\nmax_body = 3\n").unwrap();
    let (code, _, err) = run(&["serve", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("max_body"), "{err}");

    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("VIGIE_SERVER_LISTN", "x")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("VIGIE_SERVER_LISTN"));
}

#[test]
fn a_broken_policy_directory_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&example_policies(), dir.path());
    std::fs::write(dir.path().join("bad.cedar"), "permit (").unwrap();
    let (code, _, err) = run(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--policies",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("bad.cedar:1:"), "{err}");
}
