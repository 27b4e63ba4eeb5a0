//! Context plugins: WebAssembly components that compute context attributes
//! before Cedar evaluates a request (`context.network.zone`).
//!
//! The contract is the WIT world in `sdk/wit/plugin.wit`. This module is the
//! host side:
//!
//! * [`Spec`]: one `[[plugin]]` of the policy directory's `plugins.toml`,
//!   checked against the schema when the directory loads ([`specs`]);
//! * [`Host`]: one wasmtime engine for the sidecar, with a pooling allocator,
//!   an epoch ticker thread, the compiled-code cache ([`cache`]) and the
//!   import allow-list;
//! * [`Set`]: the compiled plugins of one policy bundle, and [`Set::enrich`],
//!   which runs those that apply to a request and says what happened.
//!
//! Invariants:
//! * every call gets a fresh instance from the pool, so nothing a plugin
//!   does survives its call;
//! * every call (instantiation included) runs under a deadline enforced by
//!   epoch interruption; the ticker is its own thread, so a busy async
//!   runtime cannot delay it. A running plugin yields to the runtime at each
//!   tick, so a slow plugin never holds a worker thread for longer than one;
//! * a plugin's fault (trap, timeout, memory, bad output, error) is never an
//!   error of the sidecar: it becomes that plugin's failure mode.

pub mod cache;
pub mod host;
pub mod spec;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::Value;

pub use host::{compile_in_child_processes, Call, Called, Host, LoadError, Plugin};
pub use spec::{specs, Config, FailureMode, SchemaView, Spec, SPECS_FILE};

/// Why a plugin produced no attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// The deadline passed (in start-up code or in `check`).
    Timeout,
    /// It asked for more memory than its cap.
    Memory,
    /// It asked for more table elements than its cap.
    Table,
    /// Its stack overflowed (unbounded recursion).
    Stack,
    /// Any other trap (a panic, `unreachable`, an out-of-bounds access).
    Trap(String),
    /// `check` returned an error.
    Error(String),
    /// The attributes were too large, not a JSON object, or do not fit the
    /// schema.
    BadOutput(String),
    /// Every instance of the pool was in use.
    PoolExhausted,
    /// The plugin trapped too often and is not called for now.
    Quarantined,
}

impl Fault {
    /// A short, stable label: metrics and records.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Timeout => "timeout",
            Fault::Memory => "memory",
            Fault::Table => "table",
            Fault::Stack => "stack",
            Fault::Trap(_) => "trap",
            Fault::Error(_) => "error",
            Fault::BadOutput(_) => "bad_output",
            Fault::PoolExhausted => "pool_exhausted",
            Fault::Quarantined => "quarantined",
        }
    }

    /// Whether it counts towards quarantine: the plugin's code misbehaved.
    fn is_trap(&self) -> bool {
        matches!(
            self,
            Fault::Timeout | Fault::Memory | Fault::Table | Fault::Stack | Fault::Trap(_)
        )
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Timeout => write!(f, "timed out"),
            Fault::Memory => write!(f, "exceeded its memory cap"),
            Fault::Table => write!(f, "exceeded its table cap"),
            Fault::Stack => write!(f, "overflowed its stack"),
            Fault::Trap(m) => write!(f, "trapped: {m}"),
            Fault::Error(m) => write!(f, "returned an error: {m}"),
            Fault::BadOutput(m) => write!(f, "bad output: {m}"),
            Fault::PoolExhausted => write!(f, "no instance free in the pool"),
            Fault::Quarantined => write!(f, "quarantined after repeated traps"),
        }
    }
}

/// Counters of one plugin, kept across reloads (by name).
#[derive(Debug, Default)]
pub struct Stats {
    pub ok: AtomicU64,
    /// By [`Fault::kind`].
    pub faults: Mutex<BTreeMap<&'static str, u64>>,
    /// Total time in calls, ns (with `ok + faults`, the mean).
    pub nanos: AtomicU64,
    pub log_lines: AtomicU64,
    pub log_dropped: AtomicU64,
    pub quarantined: AtomicBool,
    pub quarantines: AtomicU64,
}

impl Stats {
    fn fault(&self, kind: &'static str) {
        if let Ok(mut f) = self.faults.lock() {
            *f.entry(kind).or_default() += 1;
        }
    }
}

/// Quarantine bookkeeping of one plugin.
#[derive(Debug, Default)]
struct Health {
    consecutive_traps: u32,
    until: Option<Instant>,
}

/// What one plugin did for one decision: the decision record's `plugins`.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub name: String,
    /// `ok`, or the fault's kind.
    pub status: &'static str,
    /// The fault, for diagnostics.
    pub error: Option<String>,
    pub micros: u64,
    pub attributes: Option<Value>,
    pub failure: FailureMode,
}

impl Report {
    pub fn to_json(&self) -> Value {
        let mut v = serde_json::json!({
            "name": self.name,
            "status": self.status,
            "us": self.micros,
        });
        if let Some(a) = &self.attributes {
            v["attributes"] = a.clone();
        }
        if let Some(e) = &self.error {
            v["error"] = Value::String(e.clone());
            v["failure"] = serde_json::to_value(self.failure).unwrap_or(Value::Null);
        }
        v
    }
}

/// What running the plugins did to a request.
#[derive(Debug, Clone, Default)]
pub struct Enriched {
    pub reports: Vec<Report>,
    /// The shortest cache lifetime asked for; `Some(0)` after any fault.
    pub ttl_ms: Option<u64>,
    /// A failure mode that decides the request: (allow, reason, error).
    pub verdict: Option<(bool, String, String)>,
    /// Faults of `skip` plugins, for the decision's errors.
    pub skipped: Vec<String>,
}

/// Checks a plugin's attributes against the schema: `Some((path, message))`
/// when they do not fit.
pub type Fits<'a> = dyn Fn(&str, &Value) -> Option<(String, String)> + Sync + 'a;

/// The plugins of one policy bundle.
#[derive(Debug, Default, Clone)]
pub struct Set {
    host: Option<Arc<Host>>,
    pub plugins: Vec<Arc<Plugin>>,
}

impl Set {
    pub fn is_empty(&self) -> bool {
        self.plugins.is_empty()
    }

    /// The names plugins own in the context: a caller may not set them.
    pub fn owns(&self, attr: &str) -> bool {
        self.plugins.iter().any(|p| p.spec.name == attr)
    }

    /// Whether any plugin applies to this action and resource type.
    pub fn any_applies(&self, action: &str, resource_type: &str) -> bool {
        self.plugins
            .iter()
            .any(|p| p.spec.applies(action, resource_type))
    }

    /// Runs the plugins that apply, in configuration order, and puts their
    /// attributes into `context`. `fits` checks an attribute against the
    /// schema (`Err((path, message))`). Stops at the first fault whose
    /// failure mode decides the request.
    pub async fn enrich(
        &self,
        call: &Call<'_>,
        resource_type: &str,
        context: &mut serde_json::Map<String, Value>,
        fits: &Fits<'_>,
    ) -> Enriched {
        let mut out = Enriched::default();
        let Some(host) = &self.host else {
            return out;
        };
        for plugin in &self.plugins {
            if !plugin.spec.applies(call.action, resource_type) {
                continue;
            }
            let started = Instant::now();
            let result = plugin.call(host, call, Some(fits)).await;
            let micros = started.elapsed().as_micros() as u64;
            let name = plugin.spec.name.clone();
            match result {
                Ok(called) => {
                    if let Some(t) = called.ttl_ms {
                        out.ttl_ms = Some(out.ttl_ms.map_or(t, |x| x.min(t)));
                    }
                    let value = Value::Object(called.attributes);
                    context.insert(name.clone(), value.clone());
                    out.reports.push(Report {
                        name,
                        status: "ok",
                        error: None,
                        micros,
                        attributes: Some(value),
                        failure: plugin.spec.failure,
                    });
                }
                Err(fault) => {
                    out.ttl_ms = Some(0);
                    let error = format!("plugin {name} {fault}");
                    out.reports.push(Report {
                        name: name.clone(),
                        status: fault.kind(),
                        error: Some(fault.to_string()),
                        micros,
                        attributes: None,
                        failure: plugin.spec.failure,
                    });
                    match plugin.spec.failure {
                        FailureMode::Deny => {
                            out.verdict = Some((false, format!("plugin_failed:{name}"), error));
                            return out;
                        }
                        FailureMode::Allow => {
                            out.verdict = Some((true, format!("plugin_failed_open:{name}"), error));
                            return out;
                        }
                        FailureMode::Skip => out.skipped.push(error),
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_that_count_towards_quarantine() {
        assert!(Fault::Timeout.is_trap());
        assert!(Fault::Trap("x".into()).is_trap());
        assert!(!Fault::Error("x".into()).is_trap());
        assert!(!Fault::PoolExhausted.is_trap());
        assert!(!Fault::BadOutput("x".into()).is_trap());
    }
}
