//! `vibstaged`: the vibstage host agent. See `vibstage::daemon`.

use std::io::IsTerminal as _;
use std::process::ExitCode;

use clap::Parser as _;
use vibstage::daemon_args::{Args, LogFormat, clap_exit};

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => return clap_exit(e),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("VIBSTAGE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: under systemd stderr is the journal, and in files escape
    // codes are noise.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Plain => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    if args.check_config {
        return match vibstage::daemon::check_config(&args.config) {
            Ok(_) => {
                println!("{}: configuration is valid", args.config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        };
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(vibstage::daemon::run(args.config, args.scrub)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ vibstage::daemon::DaemonError::Config(_)) => {
            tracing::error!("{e}");
            ExitCode::from(2)
        }
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
