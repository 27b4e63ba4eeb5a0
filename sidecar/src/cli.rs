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

/// `vigie check DIR`: returns whether the directory is valid.
pub fn check(dir: &Path, validation: Validation) -> bool {
    match policy::load(dir, validation) {
        Ok(bundle) => {
            for w in &bundle.warnings {
                eprintln!("{w}");
            }
            println!(
                "ok: {} policies, {} templates, {} links, {} entities (hash {})",
                bundle.counts.policies,
                bundle.counts.templates,
                bundle.counts.links,
                bundle.counts.entities,
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
