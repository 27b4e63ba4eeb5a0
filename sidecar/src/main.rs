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
    let filter = EnvFilter::try_from_env("RUST_LOG")
        .or_else(|_| EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check(args) => exit(cli::check(&args.dir, args.validation)),
        Command::Test(args) => exit(cli::test(&args.dir, args.validation)),
        Command::Serve(args) => {
            let config = match Config::load(args.config.as_deref(), &OsEnv, &args.flags()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("vigie: bad configuration: {e}");
                    return ExitCode::from(64);
                }
            };
            init_logs(&config);
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
            match runtime.block_on(vigie::app::serve(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("vigie: {e:#}");
                    ExitCode::FAILURE
                }
            }
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
