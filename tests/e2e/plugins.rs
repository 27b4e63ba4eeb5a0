//! Context plugins through the running sidecar: the four example plugins on
//! real tokens and addresses, and hostile plugins against the sandbox.
//!
//! The `.wasm` files come from `./scripts/build-plugins` (run by
//! `./scripts/test`); the hostile ones that cannot be written in Rust (a
//! start function that never returns, a table bomb, forbidden imports) are
//! assembled here from WebAssembly text.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::support::*;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn built(path: PathBuf) -> PathBuf {
    assert!(
        path.exists(),
        "{} is missing: run ./scripts/build-plugins (./scripts/test does)",
        path.display()
    );
    path
}

fn hostile() -> PathBuf {
    built(root().join("tests/fixtures/dist/hostile.wasm"))
}

fn example_plugin(name: &str) -> PathBuf {
    built(root().join(format!("plugins/dist/{name}.wasm")))
}

/// A copy of the example policies with this `plugins.toml`.
fn policies_with(plugins_toml: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&example_policies(), dir.path());
    std::fs::write(dir.path().join("plugins.toml"), plugins_toml).unwrap();
    dir
}

/// The example policies with their real `plugins.toml` (paths made absolute).
fn example_with_plugins() -> tempfile::TempDir {
    let text = std::fs::read_to_string(example_policies().join("plugins.toml")).unwrap();
    let dist = root().join("plugins/dist");
    policies_with(&text.replace("../plugins/dist", &dist.to_string_lossy()))
}

/// A plugin compiled once is shared by the sidecars of these tests.
fn shared_cache() -> &'static Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().unwrap()).path()
}

fn start(dir: &Path, env: &[(&str, &str)]) -> Vigie {
    let cache = shared_cache().to_string_lossy().into_owned();
    let mut all = vec![
        ("VIGIE_PLUGINS_ENABLED", "true"),
        ("VIGIE_PLUGINS_CACHE_DIR", cache.as_str()),
    ];
    all.extend_from_slice(env);
    Vigie::start(dir, &[], &all)
}

/// The hostile plugin as `hours`, for `read` only, in `mode`.
fn hostile_toml(mode: &str, failure: &str, timeout_ms: u64) -> String {
    format!(
        "[[plugin]]\nname = \"hours\"\npath = \"{}\"\nactions = [\"read\"]\n\
         timeout_ms = {timeout_ms}\nmemory_mib = 4\nfailure = \"{failure}\"\n\
         [plugin.config]\nmode = \"{mode}\"\n",
        hostile().display()
    )
}

fn ask(v: &Vigie, principal: &str, action: &str, resource: &str, context: Value) -> Value {
    let r = v.post(
        "/v1/is_authorized",
        &json!({
            "principal": format!("Agency::User::\"{principal}\""),
            "action": format!("Agency::Action::\"{action}\""),
            "resource": resource,
            "context": context,
        }),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    r.json()
}

/// alice reads an internal record of her department: allowed by policy,
/// whatever the hours plugin says, as long as it does not fail.
fn alice_reads(v: &Vigie) -> Value {
    ask(
        v,
        "alice",
        "read",
        "Agency::Record::\"social-001\"",
        json!({"ip": "10.1.2.3"}),
    )
}

/// An action the hostile plugin is not configured for: denied by policy
/// (alice may not update), but answered.
fn alice_updates(v: &Vigie) -> Value {
    ask(
        v,
        "alice",
        "update",
        "Agency::Record::\"social-001\"",
        json!({"ip": "10.1.2.3"}),
    )
}

fn assert_answered_by_policy(answer: &Value) {
    assert_eq!(answer["decision"], "Deny", "{answer}");
    assert_eq!(answer["diagnostics"]["reason"], json!([]), "{answer}");
    assert_eq!(answer["diagnostics"]["errors"], json!([]), "{answer}");
}

fn assert_denied_by_plugin(answer: &Value, says: &str) {
    assert_eq!(answer["decision"], "Deny", "{answer}");
    assert_eq!(
        answer["diagnostics"]["reason"],
        json!(["plugin_failed:hours"]),
        "{answer}"
    );
    let error = answer["diagnostics"]["errors"][0].as_str().unwrap_or("");
    assert!(error.contains(says), "expected `{says}` in {answer}");
}

#[test]
fn each_hostile_plugin_gets_the_failure_mode_and_the_sidecar_carries_on() {
    let cases = [
        ("loop", "timed out"),
        ("memory", "exceeded its memory cap"),
        ("huge", "exceeded its memory cap"),
        ("recursion", "overflowed its stack"),
        ("big-output", "over the 65536 byte cap"),
        ("trap", "trapped"),
        ("panic", "trapped"),
        (
            "error",
            "returned an error: the hostile plugin reports an error",
        ),
        ("bad-json", "not valid JSON"),
        ("wrong-shape", "bad output: context.hours."),
    ];
    std::thread::scope(|s| {
        for (mode, says) in cases {
            s.spawn(move || {
                let dir = policies_with(&hostile_toml(mode, "deny", 100));
                let v = start(dir.path(), &[]);
                for _ in 0..2 {
                    assert_denied_by_plugin(&alice_reads(&v), says);
                    // Requests the plugin does not apply to are answered.
                    assert_answered_by_policy(&alice_updates(&v));
                }
                if mode == "panic" {
                    let log = v.log();
                    assert!(
                        log.lines()
                            .any(|l| l.contains("the hostile plugin panics on")
                                && l.contains("plugin=hours")),
                        "the panic message reaches the log with the plugin's name:\n{log}"
                    );
                }
            });
        }
    });
}

#[test]
fn nothing_a_plugin_writes_survives_its_call() {
    // The plugin marks its static data and 16 pages of memory, and fails
    // when it finds marks on entry. The cache is off: every request calls it.
    let dir = policies_with(&hostile_toml("remember", "deny", 100));
    let v = start(dir.path(), &[("VIGIE_CACHE_ENABLED", "false")]);
    for _ in 0..20 {
        let a = alice_reads(&v);
        assert_eq!(a["decision"], "Allow", "{a}");
        assert_eq!(a["diagnostics"]["errors"], json!([]), "{a}");
    }
}

#[test]
fn failure_modes_allow_and_skip() {
    let dir = policies_with(&hostile_toml("trap", "allow", 100));
    let v = start(dir.path(), &[]);
    let a = alice_reads(&v);
    assert_eq!(a["decision"], "Allow", "{a}");
    assert_eq!(
        a["diagnostics"]["reason"],
        json!(["plugin_failed_open:hours"])
    );

    let dir = policies_with(&hostile_toml("trap", "skip", 100));
    let v = start(dir.path(), &[]);
    let a = alice_reads(&v);
    assert_eq!(a["decision"], "Allow", "{a}");
    assert_eq!(a["diagnostics"]["reason"], json!(["staff-read-department"]));
    assert!(a["diagnostics"]["errors"][0]
        .as_str()
        .unwrap()
        .starts_with("plugin hours trapped"));
    // A contractor needs `context.hours`: skipped, it is missing, and the
    // policy does not apply.
    let c = ask(
        &v,
        "carol",
        "read",
        "Agency::Record::\"it-001\"",
        json!({"ip": "10.1.2.3"}),
    );
    assert_eq!(c["decision"], "Deny", "{c}");
}

#[test]
fn a_plugin_that_keeps_trapping_is_quarantined() {
    let dir = policies_with(&hostile_toml("trap", "deny", 100));
    let v = start(
        dir.path(),
        &[
            ("VIGIE_PLUGINS_QUARANTINE_AFTER", "3"),
            ("VIGIE_PLUGINS_QUARANTINE_SECONDS", "600"),
        ],
    );
    for _ in 0..3 {
        assert_denied_by_plugin(&alice_reads(&v), "trapped");
    }
    for _ in 0..3 {
        assert_denied_by_plugin(&alice_reads(&v), "quarantined");
    }
    let status = v.get("/v1/status").json();
    let hours = &status["plugins"]["loaded"][0];
    assert_eq!(hours["name"], "hours", "{status}");
    assert_eq!(hours["quarantined"], true, "{status}");
    assert_eq!(hours["faults"]["trap"], 3, "{status}");
    assert_eq!(hours["faults"]["quarantined"], 3, "{status}");
    let metrics = v.get("/metrics").text;
    assert!(
        metrics.contains("vigie_plugin_quarantined{plugin=\"hours\"} 1"),
        "{metrics}"
    );
    assert!(v.log().contains("plugin quarantined"));
}

#[test]
fn slow_plugins_exhaust_the_pool_and_other_requests_are_answered() {
    let dir = policies_with(&hostile_toml("loop", "deny", 400));
    let v = start(dir.path(), &[("VIGIE_PLUGINS_INSTANCES", "2")]);
    let answers: Vec<Value> = std::thread::scope(|s| {
        let slow: Vec<_> = (0..8).map(|_| s.spawn(|| alice_reads(&v))).collect();
        // Meanwhile, requests without plugins go through.
        for _ in 0..10 {
            assert_answered_by_policy(&alice_updates(&v));
        }
        slow.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let errors: Vec<&str> = answers
        .iter()
        .map(|a| {
            assert_eq!(a["decision"], "Deny", "{a}");
            a["diagnostics"]["errors"][0].as_str().unwrap()
        })
        .collect();
    assert!(
        errors.iter().any(|e| e.contains("no instance free")),
        "{errors:?}"
    );
    assert!(errors.iter().any(|e| e.contains("timed out")), "{errors:?}");
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn memory_stays_bounded_over_thousands_of_hostile_calls() {
    let dir = policies_with(&hostile_toml("memory", "deny", 200));
    let v = start(dir.path(), &[("VIGIE_PLUGINS_QUARANTINE_AFTER", "1000000")]);
    let batch = json!({"requests": (0..100).map(|_| json!({
        "principal": "Agency::User::\"alice\"",
        "action": "Agency::Action::\"read\"",
        "resource": "Agency::Record::\"social-001\"",
        "context": {"ip": "10.1.2.3"},
    })).collect::<Vec<_>>()});
    let run = |batches: usize| {
        for _ in 0..batches {
            let r = v.post("/v1/is_authorized/batch", &batch).json();
            assert_eq!(r["responses"][99]["decision"], "Deny");
        }
    };
    run(3);
    let before = rss_kib(v.pid());
    run(20);
    let after = rss_kib(v.pid());
    let m = v.get("/metrics").text;
    assert!(
        m.contains("vigie_plugin_calls_total{plugin=\"hours\",result=\"memory\"} 2300"),
        "{m}"
    );
    assert!(
        after < before + 16 * 1024,
        "RSS grew from {before} KiB to {after} KiB over 2,000 calls"
    );
}

#[test]
fn log_floods_are_capped_per_call_and_in_length() {
    let dir = policies_with(&hostile_toml("logflood", "deny", 1000));
    let v = start(dir.path(), &[]);
    let a = alice_reads(&v);
    assert_eq!(a["decision"], "Allow", "{a}");
    let log = v.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("plugin=hours") && l.contains("line "))
        .collect();
    assert_eq!(lines.len(), 8, "{log}");
    assert!(
        lines.iter().all(|l| l.len() < 1300),
        "lines are cut at 1 KiB"
    );
    let m = v.get("/metrics").text;
    assert!(
        m.contains("vigie_plugin_log_lines_dropped_total{plugin=\"hours\"} 9992"),
        "{m}"
    );
}

#[test]
fn a_tampered_compiled_cache_is_recompiled_not_loaded() {
    let dir = example_with_plugins();
    let data = tempfile::tempdir().unwrap();
    let env = [("VIGIE_PLUGINS_ENABLED", "true")];
    let ctx = json!({"ip": "10.1.2.3"});
    let first = Vigie::start_in(dir.path(), data.path(), &[], &env);
    // With an empty cache, each plugin is compiled by a child process (the
    // compiler's memory never becomes the sidecar's).
    let log = first.log();
    assert_eq!(
        log.matches("plugin compiled in a child process").count(),
        4,
        "{log}"
    );
    assert_eq!(
        ask(
            &first,
            "alice",
            "read",
            "Agency::Record::\"social-001\"",
            ctx.clone()
        )["decision"],
        "Allow"
    );
    first.terminate();
    let cache = data.path().join("plugin-cache");
    let mut tampered = 0;
    for entry in std::fs::read_dir(&cache).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|x| x == "cwasm") {
            let mut bytes = std::fs::read(&path).unwrap();
            let middle = bytes.len() / 2;
            bytes[middle] ^= 0x5a;
            std::fs::write(&path, bytes).unwrap();
            tampered += 1;
        }
    }
    assert_eq!(tampered, 4);
    let second = Vigie::start_in(dir.path(), data.path(), &[], &env);
    assert_eq!(
        ask(
            &second,
            "alice",
            "read",
            "Agency::Record::\"social-001\"",
            ctx
        )["decision"],
        "Allow"
    );
    let log = second.log();
    assert_eq!(
        log.matches("fails its integrity check").count(),
        4,
        "each tampered entry is refused:\n{log}"
    );
    assert_eq!(
        log.matches("plugin compiled in a child process").count(),
        4,
        "and compiled again:\n{log}"
    );
}

#[test]
fn a_plugin_that_does_not_compile_stops_the_start_with_its_error() {
    // The child process refuses it; compiled in the sidecar, it gets the
    // same message as `vigie check` gives.
    let fixtures = tempfile::tempdir().unwrap();
    let path = write_fixture(fixtures.path(), "truncated", b"\0asm\x0d\0\x01\0garbage");
    let dir = policies_with(&toml_for(&path));
    let data = tempfile::tempdir().unwrap();
    let (code, stderr) = failed_start(
        dir.path(),
        data.path(),
        &[("VIGIE_PLUGINS_ENABLED", "true")],
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "plugins.toml:1:1: plugin `hours`: not a valid WebAssembly component: failed to parse"
        ),
        "{stderr}"
    );
}

// Hostile components assembled from WebAssembly text.

/// A component of the plugin world (plus `extra_imports`, interfaces with
/// one `func() -> u32`) around a core module in WAT.
fn component(core_wat: &str, extra_imports: &[&str]) -> Vec<u8> {
    let mut resolve = wit_parser::Resolve::default();
    resolve.push_dir(root().join("sdk/wit")).unwrap();
    let mut world = String::from(
        "package vigie:fixture;\nworld hostile {\n  include vigie:plugin/plugin@0.1.0;\n",
    );
    for (i, import) in extra_imports.iter().enumerate() {
        let (package, interface) = import.split_once('/').unwrap();
        resolve
            .push_str(
                format!("fake-{i}.wit"),
                &format!("package {package};\ninterface {interface} {{ f: func() -> u32; }}\n"),
            )
            .unwrap();
        let (namespace, version) = package.split_once('@').unwrap();
        world.push_str(&format!("  import {namespace}/{interface}@{version};\n"));
    }
    world.push_str("}\n");
    let pkg = resolve.push_str("fixture.wit", &world).unwrap();
    let world = resolve.select_world(&[pkg], Some("hostile")).unwrap();
    let mut module = wat::parse_str(core_wat).unwrap();
    wit_component::embed_component_metadata(
        &mut module,
        &resolve,
        world,
        wit_component::StringEncoding::UTF8,
        false,
    )
    .unwrap();
    wit_component::ComponentEncoder::default()
        .module(&module)
        .unwrap()
        .validate(true)
        .encode()
        .unwrap()
}

/// The core module's side of the world: `check` takes the flattened request
/// and config and returns a pointer to the result.
const CHECK: &str =
    "(func (export \"check\") (param i32 i32 i32 i32 i32 i32 i32 i32 i64 i32 i32) (result i32)";
const MEMORY: &str = "(memory (export \"memory\") 1)
  (func (export \"cabi_realloc\") (param i32 i32 i32 i32) (result i32) i32.const 1024)";

fn write_fixture(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(format!("{name}.wasm"));
    std::fs::write(&path, bytes).unwrap();
    path
}

fn toml_for(path: &Path) -> String {
    format!(
        "[[plugin]]\nname = \"hours\"\npath = \"{}\"\nactions = [\"read\"]\ntimeout_ms = 100\nmemory_mib = 4\n",
        path.display()
    )
}

#[test]
fn start_up_code_that_never_returns_times_out() {
    let wasm = component(
        &format!(
            "(module {MEMORY}
               (func $spin (loop $l (br $l)))
               (start $spin)
               {CHECK} unreachable))"
        ),
        &[],
    );
    let fixtures = tempfile::tempdir().unwrap();
    let path = write_fixture(fixtures.path(), "spin-at-start", &wasm);
    let dir = policies_with(&toml_for(&path));
    let v = start(dir.path(), &[]);
    assert_denied_by_plugin(&alice_reads(&v), "timed out");
    assert_answered_by_policy(&alice_updates(&v));
}

#[test]
fn table_growth_is_capped() {
    let wasm = component(
        &format!(
            "(module {MEMORY}
               (table $t 1 funcref)
               {CHECK}
                 (loop $l
                   (if (i32.eq (table.grow $t (ref.null func) (i32.const 1000)) (i32.const -1))
                     (then unreachable))
                   (br $l))
                 unreachable))"
        ),
        &[],
    );
    let fixtures = tempfile::tempdir().unwrap();
    let path = write_fixture(fixtures.path(), "table-bomb", &wasm);
    let dir = policies_with(&toml_for(&path));
    let v = start(dir.path(), &[]);
    assert_denied_by_plugin(&alice_reads(&v), "exceeded its table cap");
}

#[test]
fn forbidden_imports_are_refused_at_load() {
    let fixtures = tempfile::tempdir().unwrap();
    let cases = [
        ("wasi:filesystem@0.2.0/preopens", "(filesystem)"),
        ("wasi:sockets@0.2.0/tcp-create-socket", "(network)"),
        ("wasi:cli@0.2.0/environment", "(environment)"),
    ];
    for (import, kind) in cases {
        let (package, interface) = import.split_once('/').unwrap();
        let module = format!(
            "(module (import \"{}/{interface}@{}\" \"f\" (func (result i32))) {MEMORY} {CHECK} unreachable))",
            package.split('@').next().unwrap(),
            package.split('@').nth(1).unwrap(),
        );
        let wasm = component(&module, &[import]);
        let path = write_fixture(fixtures.path(), interface, &wasm);
        let dir = policies_with(&toml_for(&path));
        let out = std::process::Command::new(BIN)
            .arg("check")
            .arg(dir.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{stdout}");
        let name = format!(
            "{}/{interface}@{}",
            package.split('@').next().unwrap(),
            package.split('@').nth(1).unwrap()
        );
        assert!(
            stdout.contains("plugins.toml:1:1: plugin `hours`: imports what plugins may not")
                && stdout.contains(&format!("`{name}` {kind}")),
            "{stdout}"
        );
    }
}

// The four example plugins, on real tokens and addresses.

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn seed(file: &str) -> [u8; 32] {
    let text = std::fs::read_to_string(root().join("tests/fixtures/keys").join(file)).unwrap();
    hex::decode(text.trim()).unwrap().try_into().unwrap()
}

fn jws(header: Value, claims: &Value, sign: impl Fn(&[u8]) -> Vec<u8>) -> String {
    let h = b64(header.to_string().as_bytes());
    let p = b64(claims.to_string().as_bytes());
    let sig = sign(format!("{h}.{p}").as_bytes());
    format!("{h}.{p}.{}", b64(&sig))
}

/// An ID token from the demonstration identity provider of `plugins.toml`.
pub fn id_token(alg: &str, claims: &Value) -> String {
    match alg {
        "EdDSA" => jws(json!({"alg": alg, "kid": "idp-ed25519"}), claims, |m| {
            use ed25519_dalek::Signer;
            ed25519_dalek::SigningKey::from_bytes(&seed("idp-ed25519.seed"))
                .sign(m)
                .to_bytes()
                .to_vec()
        }),
        "ES256" => jws(json!({"alg": alg, "kid": "idp-es256"}), claims, |m| {
            use p256::ecdsa::signature::Signer;
            use p256::pkcs8::DecodePrivateKey;
            let pem =
                std::fs::read_to_string(root().join("tests/fixtures/keys/idp-es256.pem")).unwrap();
            let key = p256::ecdsa::SigningKey::from_pkcs8_pem(&pem).unwrap();
            let sig: p256::ecdsa::Signature = key.sign(m);
            sig.to_bytes().to_vec()
        }),
        _ => jws(json!({"alg": "RS256", "kid": "idp-rs256"}), claims, |m| {
            use rsa::pkcs8::DecodePrivateKey;
            use rsa::signature::{SignatureEncoding, Signer};
            let pem =
                std::fs::read_to_string(root().join("tests/fixtures/keys/idp-rs256.pem")).unwrap();
            let key = rsa::RsaPrivateKey::from_pkcs8_pem(&pem).unwrap();
            rsa::pkcs1v15::SigningKey::<sha2::Sha256>::new(key)
                .sign(m)
                .to_vec()
        }),
    }
}

pub fn mfa_claims(amr: &[&str], auth_age: i64) -> Value {
    let t = now();
    json!({"iss": "https://idp.agency.example", "aud": "vigie", "sub": "alice",
           "iat": t - 10, "exp": t + 600, "auth_time": t - auth_age,
           "amr": amr, "acr": "eidas-substantial"})
}

fn forge(token: &str) -> String {
    // Same header and signature, other claims.
    let parts: Vec<&str> = token.split('.').collect();
    let mut claims: Value = serde_json::from_slice(&base64_decode(parts[1])).unwrap();
    claims["amr"] = json!(["pwd", "otp", "hwk"]);
    format!(
        "{}.{}.{}",
        parts[0],
        b64(claims.to_string().as_bytes()),
        parts[2]
    )
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .unwrap()
}

#[test]
fn mfa_tokens_of_each_algorithm_forged_and_expired() {
    let dir = example_with_plugins();
    let data = tempfile::tempdir().unwrap();
    let cache = shared_cache().to_string_lossy().into_owned();
    let v = Vigie::start_in(
        dir.path(),
        data.path(),
        &[],
        &[
            ("VIGIE_PLUGINS_ENABLED", "true"),
            ("VIGIE_PLUGINS_CACHE_DIR", &cache),
        ],
    );
    // A sensitive record needs MFA at most 15 minutes old.
    let read = |token: &str| {
        ask(
            &v,
            "alice",
            "read",
            "Agency::Record::\"social-002\"",
            json!({"ip": "10.1.2.3", "id_token": token}),
        )
    };
    for alg in ["EdDSA", "ES256", "RS256"] {
        let token = id_token(alg, &mfa_claims(&["pwd", "otp"], 60));
        let a = read(&token);
        assert_eq!(a["decision"], "Allow", "{alg}: {a}");
        assert_eq!(
            a["diagnostics"]["reason"],
            json!(["staff-read-sensitive-mfa"])
        );
        let forged = read(&forge(&token));
        assert_eq!(forged["decision"], "Deny", "{alg}: {forged}");
    }
    let mut expired = mfa_claims(&["pwd", "otp"], 60);
    expired["exp"] = json!(now() - 3600);
    assert_eq!(read(&id_token("ES256", &expired))["decision"], "Deny");
    let mut wrong_audience = mfa_claims(&["pwd", "otp"], 60);
    wrong_audience["aud"] = json!("another-service");
    assert_eq!(
        read(&id_token("EdDSA", &wrong_audience))["decision"],
        "Deny"
    );
    // Too old an authentication, or a single factor.
    assert_eq!(
        read(&id_token("EdDSA", &mfa_claims(&["pwd", "otp"], 3600)))["decision"],
        "Deny"
    );
    assert_eq!(
        read(&id_token("EdDSA", &mfa_claims(&["pwd"], 60)))["decision"],
        "Deny"
    );
    let m = v.get("/metrics").text;
    assert!(
        m.contains("vigie_plugin_calls_total{plugin=\"mfa\",result=\"ok\"}"),
        "{m}"
    );
    // The records keep the plugins' verdicts, not the bearer tokens.
    let token = id_token("EdDSA", &mfa_claims(&["pwd", "otp"], 60));
    assert_eq!(read(&token)["decision"], "Allow");
    let mut outbox = Vec::new();
    for entry in std::fs::read_dir(data.path().join("outbox")).unwrap() {
        outbox.extend(std::fs::read(entry.unwrap().path()).unwrap());
    }
    let outbox = String::from_utf8_lossy(&outbox);
    assert!(
        !outbox.contains(&token[..40]),
        "a token reached the decision log"
    );
    assert!(outbox.contains(r#""id_token":"<masked>""#));
    assert!(
        outbox.contains(r#""name":"mfa","status":"ok""#)
            && outbox.contains(r#""acr":"eidas-substantial""#),
        "the plugin's outcome is in the record"
    );
}

#[test]
fn network_zones_from_ipv4_and_ipv6_addresses() {
    let dir = example_with_plugins();
    let v = start(dir.path(), &[]);
    let token = id_token("EdDSA", &mfa_claims(&["pwd", "hwk"], 30));
    let administer = |ip: &str| {
        ask(
            &v,
            "eve",
            "administer",
            "Agency::System::\"payroll\"",
            json!({"ip": ip, "id_token": token}),
        )
    };
    // On premises (IPv4 and IPv6) administration is allowed...
    for ip in ["10.1.2.3", "fd00:a9e:1::5"] {
        let a = administer(ip);
        assert_eq!(a["decision"], "Allow", "{ip}: {a}");
    }
    // ...not from the VPN (a more specific block inside on-premises), nor
    // from the SecNumCloud provider's IPv6 range.
    for ip in ["10.200.0.7", "fd00:a9e:f::1", "2001:db8:5c::9"] {
        let a = administer(ip);
        assert_eq!(a["decision"], "Deny", "{ip}: {a}");
        assert_eq!(
            a["diagnostics"]["reason"],
            json!(["forbid-admin-off-premises"]),
            "{ip}"
        );
    }
    // Outside the EU: sensitive records are forbidden.
    let read_token = id_token("EdDSA", &mfa_claims(&["pwd", "otp"], 30));
    let a = ask(
        &v,
        "alice",
        "read",
        "Agency::Record::\"social-002\"",
        json!({"ip": "198.51.100.4", "id_token": read_token}),
    );
    assert_eq!(
        a["diagnostics"]["reason"],
        json!(["forbid-sensitive-outside-eu"]),
        "{a}"
    );
}

fn posture(claims: &Value, key_seed: [u8; 32]) -> String {
    jws(json!({"alg": "EdDSA", "kid": "mdm-2026"}), claims, |m| {
        use ed25519_dalek::Signer;
        ed25519_dalek::SigningKey::from_bytes(&key_seed)
            .sign(m)
            .to_bytes()
            .to_vec()
    })
}

#[test]
fn device_posture_tokens_valid_forged_and_stale() {
    let dir = example_with_plugins();
    let v = start(dir.path(), &[]);
    let id = id_token("ES256", &mfa_claims(&["pwd", "otp"], 30));
    let today = now() / 86_400;
    let (y, m, d) = civil(today - 10);
    let claims = json!({"sub": "laptop-42", "iat": now() - 60, "managed": true,
                        "disk_encrypted": true, "os_patch_level": format!("{y:04}-{m:02}-{d:02}")});
    let export = |device: &str| {
        ask(
            &v,
            "dominique",
            "export",
            "Agency::Record::\"health-002\"",
            json!({"ip": "10.1.2.3", "id_token": id, "device_token": device}),
        )
    };
    let a = export(&posture(&claims, seed("mdm-ed25519.seed")));
    assert_eq!(a["decision"], "Allow", "{a}");
    let forged = export(&posture(&claims, [1u8; 32]));
    assert_eq!(
        forged["diagnostics"]["reason"],
        json!(["forbid-export-unmanaged-device"]),
        "{forged}"
    );
    let mut stale = claims.clone();
    stale["iat"] = json!(now() - 2 * 86_400);
    let s = export(&posture(&stale, seed("mdm-ed25519.seed")));
    assert_eq!(
        s["diagnostics"]["reason"],
        json!(["forbid-export-unmanaged-device"]),
        "{s}"
    );
    let mut unencrypted = claims.clone();
    unencrypted["disk_encrypted"] = json!(false);
    let u = export(&posture(&unencrypted, seed("mdm-ed25519.seed")));
    assert_eq!(u["decision"], "Deny", "{u}");
}

/// (year, month, day) of a day number since the Unix epoch.
fn civil(days: i64) -> (i64, u32, u32) {
    vigie::audit::civil_from_days(days)
}

/// The hours plugin with the example's network plugin, its window open all
/// day every day, in `zone`, with today (UTC) closed.
fn hours_toml(zone: &str) -> String {
    let example = std::fs::read_to_string(example_policies().join("plugins.toml")).unwrap();
    let dist = root().join("plugins/dist").to_string_lossy().into_owned();
    let network = example
        .split("[[plugin]]")
        .find(|p| p.contains("name = \"network\""))
        .unwrap()
        .replace("../plugins/dist", &dist);
    let (y, m, d) = civil(now() / 86_400);
    format!(
        "[[plugin]]{network}\n[[plugin]]\nname = \"hours\"\npath = \"{}\"\n\
         [plugin.config]\nzone = \"{zone}\"\ndays = [\"mon\", \"tue\", \"wed\", \"thu\", \"fri\", \"sat\", \"sun\"]\n\
         open = \"00:00\"\nclose = \"23:59\"\nextra_closed = [\"{y:04}-{m:02}-{d:02}\"]\n",
        example_plugin("hours").display()
    )
}

#[test]
fn working_hours_follow_the_time_zone_and_the_holidays() {
    // Today (UTC) is declared a holiday. In UTC the office is closed; in a
    // zone whose local date is already tomorrow (or still yesterday) it is
    // open: the same instant on both sides of a date line.
    let hour = (now() % 86_400) / 3600;
    if hour == 23 {
        // Too close to 23:59, when the window closes anyway.
        return;
    }
    let other = if hour >= 10 {
        "Pacific/Kiritimati" // UTC+14: tomorrow already
    } else {
        "Pacific/Pago_Pago" // UTC-11: still yesterday
    };
    let contractor_reads = |v: &Vigie| {
        ask(
            v,
            "carol",
            "read",
            "Agency::Record::\"it-001\"",
            json!({"ip": "10.1.2.3"}),
        )["decision"]
            .clone()
    };
    let closed = policies_with(&hours_toml("UTC"));
    let v = start(closed.path(), &[]);
    assert_eq!(contractor_reads(&v), "Deny", "a holiday in UTC");
    let open = policies_with(&hours_toml(other));
    let v = start(open.path(), &[]);
    assert_eq!(contractor_reads(&v), "Allow", "a working day in {other}");
}

#[test]
fn plugin_run_prints_the_attributes_time_and_memory() {
    let dir = tempfile::tempdir().unwrap();
    let request = dir.path().join("request.json");
    std::fs::write(
        &request,
        r#"{"principal": "Agency::User::\"carol\"", "action": "Agency::Action::\"read\"",
            "resource": "Agency::Record::\"it-001\"", "context": {}}"#,
    )
    .unwrap();
    // Bastille Day 2026, 10:00 in Paris: a public holiday.
    let out = std::process::Command::new(BIN)
        .args(["plugin", "run"])
        .arg(example_plugin("hours"))
        .arg("--request")
        .arg(&request)
        .args(["--now", "2026-07-14T10:00:00+02:00"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        printed["attributes"],
        json!({"open": false, "holiday": true})
    );
    // Closed until local midnight: 14 hours.
    assert_eq!(printed["ttl_ms"], 14 * 3_600_000);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("time: ") && stderr.contains("peak memory: "),
        "{stderr}"
    );
    // The next day, 08:59 Paris time.
    let out = std::process::Command::new(BIN)
        .args(["plugin", "run"])
        .arg(example_plugin("hours"))
        .arg("--request")
        .arg(&request)
        .args(["--now", "2026-07-15T06:59:00Z"])
        .output()
        .unwrap();
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        printed["attributes"],
        json!({"open": true, "holiday": false})
    );
}

#[test]
fn check_names_the_plugin_file_and_line() {
    let check = |toml: &str| {
        let dir = policies_with(toml);
        let out = std::process::Command::new(BIN)
            .arg("check")
            .arg(dir.path())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let out = check("# no such file\n[[plugin]]\nname = \"network\"\npath = \"missing.wasm\"\n");
    assert!(
        out.contains("plugins.toml:2:1: plugin `network`: cannot read"),
        "{out}"
    );
    let out = check("[[plugin]]\nname = \"network\"\npath = \"x.wasm\"\n\n[[plugin]]\nname = \"weather\"\npath = \"x.wasm\"\n");
    assert!(
        out.contains("plugins.toml:5:1: plugin `weather`: no action's context declares `weather`"),
        "{out}"
    );
    let out = check("[[plugin]]\nname = \"network\"\npath = \"x.wasm\"\nfailure = \"maybe\"\n");
    assert!(out.starts_with("plugins.toml:4:"), "{out}");
}

#[test]
fn a_reload_picks_up_a_changed_plugin_configuration() {
    let dir = example_with_plugins();
    let v = start(dir.path(), &[("VIGIE_POLICIES_WATCH", "false")]);
    let token = id_token("EdDSA", &mfa_claims(&["pwd", "hwk"], 30));
    let administer = || {
        ask(
            &v,
            "eve",
            "administer",
            "Agency::System::\"payroll\"",
            json!({"ip": "10.1.2.3", "id_token": token}),
        )
    };
    assert_eq!(administer()["decision"], "Allow");
    // 10.1.0.0/16 becomes part of the VPN: no longer on premises.
    let path = dir.path().join("plugins.toml");
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "{ name = \"vpn\", cidrs = [\"10.200.0.0/16\"",
        "{ name = \"vpn\", cidrs = [\"10.1.0.0/16\", \"10.200.0.0/16\"",
    );
    std::fs::write(&path, text).unwrap();
    let r = v.post("/v1/reload", &json!({}));
    assert_eq!(r.status, 200, "{}", r.text);
    let a = administer();
    assert_eq!(
        a["diagnostics"]["reason"],
        json!(["forbid-admin-off-premises"]),
        "{a}"
    );
    // A broken plugin configuration is refused, and the last good set stays.
    std::fs::write(
        &path,
        "[[plugin]]\nname = \"network\"\npath = \"nowhere.wasm\"\n",
    )
    .unwrap();
    let r = v.post("/v1/reload", &json!({}));
    assert_eq!(r.status, 422, "{}", r.text);
    assert!(
        r.text
            .contains("plugins.toml:1:1: plugin `network`: cannot read"),
        "{}",
        r.text
    );
    assert_eq!(
        administer()["diagnostics"]["reason"],
        json!(["forbid-admin-off-premises"])
    );
}
