//! The command line: `vigie serve`, `vigie check`, `vigie test`. Parsing here,
//! the work in the modules; `main.rs` only maps results to exit codes.

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::config::Flag;
use crate::policy::{self, Validation};

#[derive(Debug, Parser)]
#[command(
    name = "vigie",
    version,
    about = "Policy-decision sidecar: Cedar decisions over localhost"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the sidecar (default: the example set in `policies/` on 127.0.0.1:8190).
    Serve(ServeArgs),
    /// Validate a policy directory; print each problem as `file:line:col: message`.
    Check(DirArgs),
    /// Run a policy directory's test files; print failures and `N passed, M failed`.
    Test(DirArgs),
    /// The central decision-log store (default 127.0.0.1:8290); `enroll` adds a sidecar key.
    Ledger(LedgerArgs),
    /// Make an ed25519 key pair; prints the public key.
    Keygen(KeygenArgs),
    /// Verify a ledger's (or an export's) signatures, chains and checkpoint offline.
    Verify(VerifyArgs),
    /// Work on context plugins: `vigie plugin run PLUGIN.wasm --request FILE`.
    Plugin {
        #[command(subcommand)]
        action: PluginAction,
    },
    /// Exit 0 if the URL answers 200 (a container health check with no shell).
    Health {
        /// e.g. `http://127.0.0.1:8190/readyz`
        url: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum PluginAction {
    /// Run one plugin on one request; print its attributes, time and peak memory.
    Run(PluginRunArgs),
    /// Compile the plugin on standard input into a plugin cache. The
    /// sidecar runs it as a child process, so that the compiler's memory is
    /// never the sidecar's.
    #[command(hide = true)]
    Compile(PluginCompileArgs),
}

#[derive(Debug, Args)]
pub struct PluginCompileArgs {
    /// The sidecar's plugin cache (its `cache.key` signs the entry).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: PathBuf,
    /// The sidecar's `[plugins]` settings, as JSON (they decide the code).
    #[arg(long, value_name = "JSON")]
    pub sandbox: String,
}

#[derive(Debug, Args)]
pub struct PluginRunArgs {
    /// The plugin (a WebAssembly component).
    pub wasm: PathBuf,
    /// A request as for `POST /v1/is_authorized` (JSON: principal, action,
    /// resource, context).
    #[arg(long, value_name = "FILE")]
    pub request: PathBuf,
    /// The plugin's configuration (JSON). Default `{}`.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Run as if it were this time (RFC 3339), instead of now.
    #[arg(long, value_name = "TIME")]
    pub now: Option<String>,
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    pub timeout_ms: u64,
    #[arg(long, default_value_t = 16, value_name = "MIB")]
    pub memory_mib: u32,
}

#[derive(Debug, Args)]
pub struct LedgerArgs {
    #[command(subcommand)]
    pub action: Option<LedgerAction>,
    /// TOML config file.
    #[arg(long, short = 'c', value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
    /// TCP address to listen on ([server] listen).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Data directory ([data] dir).
    #[arg(long, value_name = "DIR", global = true)]
    pub data_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum LedgerAction {
    /// Enroll a sidecar's public key (written to `<data-dir>/sidecars.toml`).
    Enroll {
        #[arg(long)]
        id: String,
        #[arg(long, value_name = "KEY")]
        public_key: String,
    },
}

impl LedgerArgs {
    pub fn flags(&self) -> Vec<Flag> {
        let mut flags = Vec::new();
        if let Some(l) = &self.listen {
            flags.push(Flag {
                section: "server",
                key: "listen",
                value: toml::Value::String(l.clone()),
            });
        }
        if let Some(d) = &self.data_dir {
            flags.push(Flag {
                section: "data",
                key: "dir",
                value: toml::Value::String(d.to_string_lossy().into_owned()),
            });
        }
        flags
    }
}

#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Where to write the private key (mode 0600; never overwritten).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// The key's name: a sidecar's id, or a ledger's origin. Default: the host name.
    #[arg(long)]
    pub name: Option<String>,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Fetch the export from this ledger.
    #[arg(long, value_name = "URL", conflicts_with = "export")]
    pub ledger: Option<String>,
    /// Verify this export file (`GET /v1/export`).
    #[arg(long, value_name = "FILE")]
    pub export: Option<PathBuf>,
    /// The ledger's public key (`vigie ledger` logs it at start).
    #[arg(long, value_name = "KEY")]
    pub ledger_key: Option<String>,
    /// Trusted sidecar keys: a TOML file of `[[sidecars]] id, public_key`.
    #[arg(long, value_name = "FILE")]
    pub sidecars: Option<PathBuf>,
    /// An earlier checkpoint you kept (`GET /v1/checkpoint`): the ledger must
    /// extend it. Repeatable.
    #[arg(long, value_name = "FILE")]
    pub checkpoint: Vec<PathBuf>,
    /// Check only this decision's inclusion proof (with --ledger).
    #[arg(long, value_name = "ID", requires = "ledger")]
    pub decision: Option<String>,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML config file.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Policy directory ([policies] dir).
    #[arg(long, value_name = "DIR")]
    pub policies: Option<PathBuf>,
    /// TCP address to listen on ([server] listen).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Also listen on this Unix socket ([server] unix_socket).
    #[arg(long, value_name = "PATH")]
    pub unix_socket: Option<PathBuf>,
    /// Data directory ([data] dir).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// The ledger to ship the decision log to ([audit] ledger).
    #[arg(long, value_name = "URL")]
    pub ledger: Option<String>,
    /// This sidecar's id in the ledger ([audit] sidecar_id; default: the host name).
    #[arg(long, value_name = "ID")]
    pub sidecar_id: Option<String>,
    /// `power` or `process` ([audit] durability).
    #[arg(long, value_name = "MODE")]
    pub durability: Option<String>,
    /// Serve Envoy ext_authz (gRPC) on this address ([ext_authz] listen; turns it on).
    #[arg(long, value_name = "ADDR")]
    pub ext_authz_listen: Option<String>,
}

impl ServeArgs {
    /// The flags given, as config overrides.
    pub fn flags(&self) -> Vec<Flag> {
        let mut flags = Vec::new();
        let mut push = |section, key, value: Option<String>| {
            if let Some(v) = value {
                flags.push(Flag {
                    section,
                    key,
                    value: toml::Value::String(v),
                });
            }
        };
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.to_string_lossy().into_owned());
        push("policies", "dir", path(&self.policies));
        push("server", "listen", self.listen.clone());
        push("server", "unix_socket", path(&self.unix_socket));
        push("data", "dir", path(&self.data_dir));
        push("audit", "ledger", self.ledger.clone());
        push("audit", "sidecar_id", self.sidecar_id.clone());
        push("audit", "durability", self.durability.clone());
        if let Some(addr) = &self.ext_authz_listen {
            push("ext_authz", "listen", Some(addr.clone()));
            flags.push(Flag {
                section: "ext_authz",
                key: "enabled",
                value: toml::Value::Boolean(true),
            });
        }
        flags
    }
}

#[derive(Debug, Args)]
pub struct DirArgs {
    /// The policy directory.
    pub dir: PathBuf,
    /// Schema validation: strict, permissive or off.
    #[arg(long, default_value = "strict", value_parser = parse_validation)]
    pub validation: Validation,
}

fn parse_validation(s: &str) -> Result<Validation, String> {
    match s {
        "strict" => Ok(Validation::Strict),
        "permissive" => Ok(Validation::Permissive),
        "off" => Ok(Validation::Off),
        _ => Err(format!("`{s}`: expected strict, permissive or off")),
    }
}

/// `vigie keygen`
pub fn keygen(args: &KeygenArgs) -> anyhow::Result<()> {
    let name = args.name.clone().unwrap_or_else(crate::state::host_name);
    let key = crate::note::KeyPair::generate(&name)?;
    key.write(&args.out)?;
    println!("{}", key.public().encode());
    Ok(())
}

/// `vigie verify`: returns whether everything verified.
pub fn verify(args: &VerifyArgs) -> anyhow::Result<bool> {
    use anyhow::Context as _;
    let mut trust = crate::verify::Trust::default();
    if let Some(k) = &args.ledger_key {
        trust.ledger = Some(crate::note::PublicKey::decode(k)?);
    }
    if let Some(path) = &args.sidecars {
        #[derive(serde::Deserialize)]
        struct File {
            sidecars: Vec<crate::ledger::Enrolled>,
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read `{}`", path.display()))?;
        let f: File = toml::from_str(&text).with_context(|| format!("`{}`", path.display()))?;
        for s in f.sidecars {
            trust
                .sidecars
                .insert(s.id.clone(), crate::note::PublicKey::decode(&s.public_key)?);
        }
    }
    for path in &args.checkpoint {
        trust.earlier.push(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read `{}`", path.display()))?,
        );
    }
    let agent = ureq::AgentBuilder::new()
        .timeout(std::time::Duration::from_secs(300))
        .build();
    if let (Some(base), Some(id)) = (&args.ledger, &args.decision) {
        let url = format!("{}/v1/decisions/{id}", base.trim_end_matches('/'));
        let answer: serde_json::Value = agent
            .get(&url)
            .call()
            .with_context(|| format!("GET {url}"))?
            .into_json()?;
        let key = match trust.ledger.clone() {
            Some(k) => k,
            None => anyhow::bail!("--ledger-key is needed to check an inclusion proof"),
        };
        return match crate::verify::verify_inclusion(&answer, &key) {
            Ok(size) => {
                println!(
                    "ok: decision {id} is record {} of the signed tree of size {size}",
                    answer["index"]
                );
                Ok(true)
            }
            Err(e) => {
                println!("FAIL: decision {id}: {e}");
                Ok(false)
            }
        };
    }
    let text = match (&args.ledger, &args.export) {
        (Some(base), _) => {
            let url = format!("{}/v1/export?format=ndjson", base.trim_end_matches('/'));
            agent
                .get(&url)
                .call()
                .with_context(|| format!("GET {url}"))?
                .into_string()?
        }
        (None, Some(path)) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read `{}`", path.display()))?,
        (None, None) => anyhow::bail!("give --ledger URL or --export FILE"),
    };
    match crate::verify::verify_export(&text, &trust) {
        Ok(s) => {
            for w in &s.warnings {
                eprintln!("warning: {w}");
            }
            println!(
                "ok: {} records from {} sidecars, {} signed batches, {} heartbeats; Merkle tree of {} matches the signed checkpoint",
                s.records, s.sidecars, s.batches, s.heartbeats, s.tree_size
            );
            Ok(true)
        }
        Err(e) => {
            println!("FAIL: {e}");
            Ok(false)
        }
    }
}

/// `vigie check DIR`: returns whether the directory is valid.
pub fn check(dir: &Path, validation: Validation) -> bool {
    match policy::load(dir, validation) {
        Ok(bundle) => {
            for w in &bundle.warnings {
                eprintln!("{w}");
            }
            // Plugins: read, checked against the allow-list and compiled.
            if !bundle.plugins.is_empty() {
                let loaded = crate::plugin::Host::new(&crate::plugin::Config::default(), None)
                    .map_err(|e| vec![e])
                    .and_then(|host| {
                        host.load(&bundle.plugins).map(|_| ()).map_err(|errors| {
                            errors.iter().map(|e| e.problem().to_string()).collect()
                        })
                    });
                if let Err(problems) = loaded {
                    for p in &problems {
                        println!("{p}");
                    }
                    eprintln!("{} problem(s) found", problems.len());
                    return false;
                }
            }
            println!(
                "ok: {} policies, {} templates, {} links, {} entities, {} plugins (hash {})",
                bundle.counts.policies,
                bundle.counts.templates,
                bundle.counts.links,
                bundle.counts.entities,
                bundle.counts.plugins,
                &bundle.hash[..16]
            );
            true
        }
        Err(problems) => {
            for p in &problems.0 {
                println!("{p}");
            }
            eprintln!("{} problem(s) found", problems.0.len());
            false
        }
    }
}

/// `vigie plugin compile`: the wasm on standard input, compiled into the
/// cache with the sidecar's settings.
pub fn plugin_compile(args: &PluginCompileArgs) -> anyhow::Result<()> {
    use std::io::Read as _;
    let sandbox: crate::plugin::Config =
        serde_json::from_str(&args.sandbox).map_err(|e| anyhow::anyhow!("--sandbox: {e}"))?;
    let mut wasm = Vec::new();
    std::io::stdin().read_to_end(&mut wasm)?;
    let host = crate::plugin::Host::new(&sandbox, Some(&args.cache_dir))
        .map_err(|e| anyhow::anyhow!(e))?;
    host.compile_into_cache(&wasm)
        .map_err(|e| anyhow::anyhow!(e))
}

/// `vigie plugin run`: prints the plugin's answer; `Ok(false)` when it
/// failed.
pub fn plugin_run(args: &PluginRunArgs) -> anyhow::Result<bool> {
    use anyhow::Context as _;
    let request: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&args.request)
            .with_context(|| format!("cannot read {}", args.request.display()))?,
    )
    .with_context(|| format!("{}: not JSON", args.request.display()))?;
    let uid = |field: &str| -> anyhow::Result<String> {
        let v = request.get(field).cloned().unwrap_or_default();
        crate::engine::parse_uid(&v)
            .map(|u| u.to_string())
            .map_err(|e| anyhow::anyhow!("{}: `{field}`: {e}", args.request.display()))
    };
    let (principal, action, resource) = (uid("principal")?, uid("action")?, uid("resource")?);
    let context = request
        .get("context")
        .cloned()
        .unwrap_or_else(|| serde_json::json!({}));
    let config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: not JSON", path.display()))?;
            v.to_string()
        }
        None => "{}".into(),
    };
    let now_unix_ms = match &args.now {
        Some(t) => crate::audit::parse_rfc3339_ms(t).map_err(|e| anyhow::anyhow!("--now: {e}"))?,
        None => crate::cache::now_ms() as i64,
    };
    let spec = crate::plugin::Spec::standalone(
        &args.wasm,
        config,
        std::time::Duration::from_millis(args.timeout_ms),
        args.memory_mib,
    );
    let mut sandbox = crate::plugin::Config::default();
    sandbox.max_memory_mib = sandbox.max_memory_mib.max(args.memory_mib);
    let host = crate::plugin::Host::new(&sandbox, None).map_err(|e| anyhow::anyhow!(e))?;
    let loaded = std::time::Instant::now();
    let set = host.load(std::slice::from_ref(&spec)).map_err(|e| {
        anyhow::anyhow!(e
            .iter()
            .map(|e| e.message.clone())
            .collect::<Vec<_>>()
            .join("; "))
    })?;
    let compile = loaded.elapsed();
    let plugin = set.plugins[0].clone();
    let context_text = context.to_string();
    let call = crate::plugin::Call {
        principal: &principal,
        action: &action,
        resource: &resource,
        context: &context_text,
        now_unix_ms,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Once to warm up (first-touch page faults), then the measured call.
    let _ = rt.block_on(plugin.call(&host, &call, None));
    let started = std::time::Instant::now();
    let result = rt.block_on(plugin.call(&host, &call, None));
    let took = started.elapsed();
    match result {
        Ok(called) => {
            let out = serde_json::json!({
                "attributes": called.attributes,
                "ttl_ms": called.ttl_ms,
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
            eprintln!(
                "time: {:.1} µs (compile/load {:.1} ms), peak memory: {} KiB",
                took.as_secs_f64() * 1e6,
                compile.as_secs_f64() * 1e3,
                called.peak_memory_bytes / 1024
            );
            Ok(true)
        }
        Err(fault) => {
            println!(
                "{}",
                serde_json::json!({"error": fault.to_string(), "kind": fault.kind()})
            );
            eprintln!("time: {:.1} µs", took.as_secs_f64() * 1e6);
            Ok(false)
        }
    }
}

/// `vigie test DIR`: returns whether every test passed.
pub fn test(dir: &Path, validation: Validation) -> bool {
    let bundle = match policy::load(dir, validation) {
        Ok(b) => b,
        Err(problems) => {
            for p in &problems.0 {
                println!("{p}");
            }
            println!("0 passed, 0 failed (the policy directory does not load)");
            return false;
        }
    };
    let report = crate::policytest::run(dir, &bundle);
    for p in &report.broken {
        println!("{p}");
    }
    for f in &report.failures {
        println!("{f}");
    }
    println!("{} passed, {} failed", report.passed, report.failed);
    report.failed == 0 && report.broken.is_empty() && report.passed > 0
}
