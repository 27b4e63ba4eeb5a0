//! `plugins.toml` (which plugins run, for what, with which limits) and the
//! `[plugins]` section of the sidecar's configuration (the sandbox they all
//! run in).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::policy::{line_col, Problem};

/// The file in a policy directory that configures plugins.
pub const SPECS_FILE: &str = "plugins.toml";

/// `[plugins]` in the sidecar's configuration: the sandbox every plugin
/// runs in. What each plugin does is in the policy directory's
/// `plugins.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Run the plugins of `plugins.toml` (default true). Off, the context
    /// attributes they would set may be given by the caller instead.
    pub enabled: bool,
    /// Instances that can run at once, across all plugins (the pool's
    /// size). A call that finds the pool full fails at once (the plugin's
    /// failure mode applies). Default 64.
    pub instances: u32,
    /// The largest memory any plugin may be given, in MiB (each plugin's
    /// `memory_mib` is at most this). Default 64.
    pub max_memory_mib: u32,
    /// The wasm stack of a call, in KiB (deep recursion traps). Default 256.
    pub stack_kib: u32,
    /// Largest accepted `.wasm` file, in MiB. Default 16.
    pub max_wasm_mib: u32,
    /// How much of each pooled memory is reset with `memset` instead of
    /// being returned to the kernel, in KiB: the pages a call touched, up to
    /// this much, where Linux has `PAGEMAP_SCAN` (6.7); elsewhere the first
    /// this-many bytes, cheaper when a plugin's calls touch about that
    /// much. Default 256.
    pub keep_resident_kib: u32,
    /// Epoch tick, the deadline's granularity, in ms. Default 1.
    pub tick_ms: u64,
    /// Consecutive traps or timeouts after which a plugin is quarantined.
    /// Default 5.
    pub quarantine_after: u32,
    /// How long a quarantined plugin is not called, in seconds; then one
    /// call is let through, and a success ends the quarantine. Default 30.
    pub quarantine_seconds: u64,
    /// Where compiled plugins are cached. Default `<data-dir>/plugin-cache`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_dir: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            enabled: true,
            instances: 64,
            max_memory_mib: 64,
            stack_kib: 256,
            max_wasm_mib: 16,
            keep_resident_kib: 256,
            tick_ms: 1,
            quarantine_after: 5,
            quarantine_seconds: 30,
            cache_dir: None,
        }
    }
}

/// What a plugin's fault does to the decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Deny, with reason `plugin_failed:<name>` (the default).
    #[default]
    Deny,
    /// Allow without evaluating, with reason `plugin_failed_open:<name>`.
    Allow,
    /// Evaluate without the plugin's attributes (policies see
    /// `context has <name>` false).
    Skip,
}

/// One `[[plugin]]` of `plugins.toml`, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    name: String,
    path: PathBuf,
    #[serde(default)]
    actions: Option<Vec<String>>,
    #[serde(default)]
    resource_types: Option<Vec<String>>,
    #[serde(default = "default_timeout_ms")]
    timeout_ms: u64,
    #[serde(default = "default_memory_mib")]
    memory_mib: u32,
    #[serde(default = "default_table_elements")]
    table_elements: u32,
    #[serde(default = "default_max_output_kib")]
    max_output_kib: u32,
    #[serde(default)]
    failure: FailureMode,
    #[serde(default)]
    config: Option<toml::Table>,
}

fn default_timeout_ms() -> u64 {
    20
}
fn default_memory_mib() -> u32 {
    16
}
fn default_table_elements() -> u32 {
    10_000
}
fn default_max_output_kib() -> u32 {
    64
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpecs {
    #[serde(default)]
    plugin: Vec<RawSpec>,
}

/// A configured plugin, checked against the schema.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Its attributes land in `context.<name>`.
    pub name: String,
    /// The `.wasm` file, resolved against the policy directory.
    pub path: PathBuf,
    /// SHA-256 (hex) of the `.wasm` file's bytes.
    pub wasm_hash: String,
    /// Action uids (`Agency::Action::"read"`) it runs for.
    pub actions: Vec<String>,
    /// Resource types it runs for; `None`: all.
    pub resource_types: Option<Vec<String>>,
    pub timeout: Duration,
    pub memory_bytes: usize,
    pub table_elements: usize,
    pub max_output_bytes: usize,
    pub failure: FailureMode,
    /// The plugin's configuration, as JSON.
    pub config: String,
    /// `plugins.toml:<line>` of its `[[plugin]]`, for messages.
    pub origin: String,
    /// The line of its `[[plugin]]` (0 for a plugin run by hand).
    pub line: usize,
}

impl Spec {
    /// A spec for one `.wasm` file run by hand (`vigie plugin run`).
    pub fn standalone(path: &Path, config: String, timeout: Duration, memory_mib: u32) -> Spec {
        use sha2::Digest;
        let wasm_hash = std::fs::read(path)
            .map(|b| hex::encode(sha2::Sha256::digest(&b)))
            .unwrap_or_default();
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "plugin".into());
        Spec {
            name,
            path: path.to_owned(),
            wasm_hash,
            actions: Vec::new(),
            resource_types: None,
            timeout,
            memory_bytes: (memory_mib as usize) << 20,
            table_elements: default_table_elements() as usize,
            max_output_bytes: (default_max_output_kib() as usize) << 10,
            failure: FailureMode::Deny,
            config,
            origin: path.display().to_string(),
            line: 0,
        }
    }

    pub fn applies(&self, action: &str, resource_type: &str) -> bool {
        self.actions.iter().any(|a| a == action)
            && self
                .resource_types
                .as_ref()
                .is_none_or(|types| types.iter().any(|t| t == resource_type))
    }
}

/// What [`specs`] needs to know about the schema.
pub trait SchemaView {
    /// Every action uid of the schema with its resource types.
    fn actions(&self) -> Vec<(String, Vec<String>)>;
    /// Whether `action`'s context type declares attribute `attr`.
    fn declares(&self, action: &str, attr: &str) -> bool;
    /// Qualifies a bare name in the schema's namespace.
    fn qualify(&self, name: &str) -> String;
}

/// Reads `plugins.toml` (absent: no plugins). Every problem is reported with
/// the file and line.
pub fn specs(dir: &Path, schema: &dyn SchemaView) -> Result<Vec<Spec>, Vec<Problem>> {
    let file = dir.join(SPECS_FILE);
    let text = match std::fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(vec![problem_at(0, 0, format!("cannot read: {e}"))]),
    };
    let raw: RawSpecs = match toml::from_str(&text) {
        Ok(r) => r,
        Err(e) => {
            let (line, col) = e.span().map(|s| line_col(&text, s.start)).unwrap_or((0, 0));
            return Err(vec![problem_at(line, col, e.message().to_owned())]);
        }
    };
    // The line of each `[[plugin]]` header, in order.
    let headers: Vec<usize> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.trim_start().starts_with("[[plugin]]"))
        .map(|(i, _)| i + 1)
        .collect();
    let all_actions = schema.actions();
    let mut problems = Vec::new();
    let mut specs = Vec::new();
    let mut seen = HashMap::new();
    for (i, raw) in raw.plugin.into_iter().enumerate() {
        let line = headers.get(i).copied().unwrap_or(0);
        let mut problem = |msg: String| {
            problems.push(problem_at(line, 1, format!("plugin `{}`: {msg}", raw.name)))
        };
        if raw.name.is_empty()
            || !raw
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
            || raw.name.starts_with(|c: char| c.is_ascii_digit())
        {
            problem("`name` must be an identifier (letters, digits, `_`)".into());
            continue;
        }
        if let Some(first) = seen.insert(raw.name.clone(), line) {
            problem(format!("the name is already used at line {first}"));
            continue;
        }
        if raw.timeout_ms == 0 || raw.timeout_ms > 10_000 {
            problem("`timeout_ms` must be in 1..=10000".into());
        }
        if raw.memory_mib == 0 {
            problem("`memory_mib` must be at least 1".into());
        }
        // The actions it runs for: as configured, else every action whose
        // context declares the attribute.
        let actions: Vec<String> = match &raw.actions {
            Some(list) => {
                let mut out = Vec::new();
                for a in list {
                    let uid = if a.contains("::") {
                        a.clone()
                    } else {
                        format!("{}::\"{}\"", schema.qualify("Action"), a)
                    };
                    if !all_actions.iter().any(|(x, _)| *x == uid) {
                        problem(format!("`actions`: `{a}` is not an action of the schema"));
                    } else if !schema.declares(&uid, &raw.name) {
                        problem(format!(
                            "action `{a}`'s context does not declare `{}`: add `{}?: ...` to it in the schema",
                            raw.name, raw.name
                        ));
                    } else {
                        out.push(uid);
                    }
                }
                out
            }
            None => all_actions
                .iter()
                .filter(|(a, _)| schema.declares(a, &raw.name))
                .map(|(a, _)| a.clone())
                .collect(),
        };
        if actions.is_empty() && raw.actions.is_none() {
            problem(format!(
                "no action's context declares `{}`: declare `{}?: ...` in the context of the actions it serves",
                raw.name, raw.name
            ));
        }
        let resource_types = raw.resource_types.as_ref().map(|types| {
            types
                .iter()
                .map(|t| {
                    if t.contains("::") {
                        t.clone()
                    } else {
                        schema.qualify(t)
                    }
                })
                .collect::<Vec<_>>()
        });
        if let Some(types) = &resource_types {
            for t in types {
                if !all_actions.iter().any(|(_, rs)| rs.contains(t)) {
                    problem(format!(
                        "`resource_types`: `{t}` is not a resource type of any action"
                    ));
                }
            }
        }
        let path = if raw.path.is_absolute() {
            raw.path.clone()
        } else {
            dir.join(&raw.path)
        };
        // A missing file is reported when the plugin is loaded (`vigie
        // check`, `vigie serve`), not here: `vigie test` and a sidecar with
        // plugins disabled do not need it.
        let wasm_hash = match std::fs::read(&path) {
            Ok(bytes) => {
                use sha2::Digest;
                hex::encode(sha2::Sha256::digest(&bytes))
            }
            Err(_) => String::new(),
        };
        let config = match &raw.config {
            Some(table) => serde_json::to_string(table).unwrap_or_else(|_| "{}".into()),
            None => "{}".into(),
        };
        specs.push(Spec {
            name: raw.name.clone(),
            path,
            wasm_hash,
            actions,
            resource_types,
            timeout: Duration::from_millis(raw.timeout_ms.max(1)),
            memory_bytes: (raw.memory_mib as usize) << 20,
            table_elements: raw.table_elements as usize,
            max_output_bytes: (raw.max_output_kib as usize) << 10,
            failure: raw.failure,
            config,
            origin: format!("{SPECS_FILE}:{line}"),
            line,
        });
    }
    if problems.is_empty() {
        Ok(specs)
    } else {
        Err(problems)
    }
}

fn problem_at(line: usize, col: usize, message: String) -> Problem {
    Problem {
        file: SPECS_FILE.into(),
        line,
        col,
        message,
    }
}
