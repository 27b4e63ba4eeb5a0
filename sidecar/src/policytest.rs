//! `vigie test DIR`: runs the policy test files of a directory against its
//! policy set and reports each failure with what was expected and what came.
//!
//! A test file is YAML (`*.yaml` or `*.yml`, anywhere under the directory):
//!
//! ```yaml
//! name: staff                      # optional, shown in reports
//! tests:
//!   - name: alice reads an internal record of her department
//!     request:                     # the body of POST /v1/is_authorized
//!       principal: Agency::User::"alice"
//!       action: Agency::Action::"read"
//!       resource: Agency::Record::"fin-001"
//!       context: {}
//!     expect: Allow                # or Deny
//!     reasons: [staff-read-department]   # optional: the determining policy ids
//! ```

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::engine::{Engine, Query};
use crate::policy::{Bundle, Problem};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    name: Option<String>,
    tests: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    request: Query,
    expect: Expect,
    #[serde(default)]
    reasons: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
enum Expect {
    Allow,
    Deny,
}

/// The result of running every test file.
#[derive(Debug, Default)]
pub struct Report {
    pub passed: usize,
    pub failed: usize,
    /// One entry per failing case (and per unreadable file), ready to print.
    pub failures: Vec<String>,
    /// Problems that keep a file from running at all.
    pub broken: Vec<Problem>,
}

fn test_files(dir: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let mut entries: Vec<_> = entries.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            if p.is_dir() {
                walk(&p, out);
            } else if name.ends_with(".yaml") || name.ends_with(".yml") {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, &mut out);
    out
}

/// Runs every test file under `dir` against `bundle`.
pub fn run(dir: &Path, bundle: &Bundle) -> Report {
    let engine = Engine::new();
    let mut report = Report::default();
    for path in test_files(dir) {
        let rel = path
            .strip_prefix(dir)
            .unwrap_or(&path)
            .to_string_lossy()
            .into_owned();
        let file: File = match std::fs::read_to_string(&path)
            .map_err(|e| (1, 1, e.to_string()))
            .and_then(|text| {
                serde_yaml::from_str(&text).map_err(|e| {
                    let (line, col) = e.location().map_or((1, 1), |l| (l.line(), l.column()));
                    (line, col, e.to_string())
                })
            }) {
            Ok(f) => f,
            Err((line, col, message)) => {
                report.broken.push(Problem {
                    file: rel,
                    line,
                    col,
                    message,
                });
                continue;
            }
        };
        let suite = file.name.unwrap_or_else(|| rel.clone());
        for case in file.tests {
            let label = format!("{rel}: {suite} / {}", case.name);
            let result = case
                .request
                .clone()
                .into_input()
                .and_then(|input| engine.decide(bundle, input));
            let outcome = match result {
                Ok(o) => o,
                Err(e) => {
                    report.failed += 1;
                    report.failures.push(format!(
                        "FAIL {label}\n  the request is invalid at `{}`: {}",
                        e.path, e.message
                    ));
                    continue;
                }
            };
            let got = if outcome.allow {
                Expect::Allow
            } else {
                Expect::Deny
            };
            let mut want_reasons = case.reasons.clone();
            if let Some(r) = want_reasons.as_mut() {
                r.sort();
            }
            let reasons_ok = want_reasons.as_ref().is_none_or(|r| *r == outcome.reasons);
            if got == case.expect && reasons_ok {
                report.passed += 1;
                continue;
            }
            report.failed += 1;
            let mut msg = format!("FAIL {label}\n");
            let _ = writeln!(
                msg,
                "  - expected: {:?}{}",
                case.expect,
                fmt_reasons(want_reasons.as_deref())
            );
            let _ = write!(
                msg,
                "  + actual:   {got:?}{}",
                fmt_reasons(Some(&outcome.reasons))
            );
            for e in &outcome.errors {
                let _ = write!(msg, "\n    error: {e}");
            }
            report.failures.push(msg);
        }
    }
    report
}

fn fmt_reasons(r: Option<&[String]>) -> String {
    match r {
        None => String::new(),
        Some(r) => format!(" by [{}]", r.join(", ")),
    }
}
