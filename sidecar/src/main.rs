//! The `vigie` binary: parse the command line, load the config, start
//! logging, run. Exit codes: 0 ok, 1 a check or test failed or the sidecar
//! stopped on an error, 64 bad configuration (EX_USAGE).

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use vigie::cli::{self, Cli, Command};
use vigie::config::{Config, LogFormat, OsEnv};

fn init_logs(config: &Config) {
    init_logs_with(&config.log);
}

fn init_logs_with(log: &vigie::config::Log) {
    let filter = EnvFilter::try_from_env("RUST_LOG")
        .or_else(|_| EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn main() -> ExitCode {
    fixed_mmap_threshold();
    let cli = Cli::parse();
    match cli.command {
        Command::Check(args) => exit(cli::check(&args.dir, args.validation)),
        Command::Test(args) => exit(cli::test(&args.dir, args.validation)),
        Command::Plugin {
            action: cli::PluginAction::Compile(args),
        } => match cli::plugin_compile(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vigie: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Plugin {
            action: cli::PluginAction::Run(args),
        } => match cli::plugin_run(&args) {
            Ok(ok) => exit(ok),
            Err(e) => {
                eprintln!("vigie: {e:#}");
                ExitCode::from(2)
            }
        },
        Command::Health { url } => {
            let agent = ureq::AgentBuilder::new()
                .timeout(std::time::Duration::from_secs(3))
                .build();
            match agent.get(&url).call() {
                Ok(r) if r.status() == 200 => ExitCode::SUCCESS,
                Ok(r) => {
                    eprintln!("vigie: {url} answered {}", r.status());
                    ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("vigie: {url}: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Keygen(args) => match cli::keygen(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vigie: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Verify(args) => match cli::verify(&args) {
            Ok(ok) => exit(ok),
            Err(e) => {
                eprintln!("vigie: {e:#}");
                ExitCode::from(2)
            }
        },
        Command::Ledger(args) => {
            let config =
                match vigie::ledger::Config::load(args.config.as_deref(), &OsEnv, &args.flags()) {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("vigie: bad configuration: {e}");
                        return ExitCode::from(64);
                    }
                };
            if let Some(cli::LedgerAction::Enroll { id, public_key }) = &args.action {
                return match vigie::ledger::enroll(&config.data.dir, id, public_key) {
                    Ok(()) => {
                        println!(
                            "enrolled `{id}` in {}",
                            vigie::ledger::enrollment_file(&config.data.dir).display()
                        );
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("vigie: {e:#}");
                        ExitCode::FAILURE
                    }
                };
            }
            init_logs_with(&config.log);
            run(vigie::ledger::serve(config))
        }
        Command::Serve(args) => {
            let config = match Config::load(args.config.as_deref(), &OsEnv, &args.flags()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("vigie: bad configuration: {e}");
                    return ExitCode::from(64);
                }
            };
            init_logs(&config);
            if let Ok(exe) = std::env::current_exe() {
                vigie::plugin::compile_in_child_processes(exe);
            }
            run(vigie::app::serve(config))
        }
    }
}

/// glibc raises its mmap threshold each time a large block is freed (up to
/// 32 MiB), after which large zeroed allocations come from the heap and are
/// written, so they count in RSS whether used or not: sled's tables at start
/// cost 5.5 MiB that way. A fixed threshold (128 KiB, glibc's initial one)
/// keeps them in lazily mapped pages; peak RSS under load with the example's
/// plugins and the cache went from 41.5 to 33.2 MiB, CPU unchanged (see
/// docs/performance.md). `MALLOC_MMAP_THRESHOLD_` still overrides it.
fn fixed_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; it is called
        // before any other thread exists.
        #[allow(unsafe_code)]
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        }
    }
}

fn run(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vigie: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vigie: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn exit(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
