//! The command line of `vibstaged` (SPEC §3), in the library so that its man page and shell
//! completions are generated from the same definition the binary parses (`vibstagectl
//! generate-docs`).

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

/// Format of the log lines on stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line.
    Json,
}

/// vibstage host agent: stages verified VIBs on scratch and remediates on request.
#[derive(Debug, Parser)]
#[command(
    name = "vibstaged",
    version,
    long_about = "vibstage host agent: stages verified VIBs on scratch and remediates on \
                  request.\n\n\
                  Runs in the foreground and logs to stderr; VIBSTAGE_LOG sets the filter \
                  (default \"info\"). SIGTERM or SIGINT stop it within 10 s with its state \
                  persisted; SIGHUP reloads the trust store, the TLS certificates, the \
                  allow-lists and the [depot] settings, and names changed keys that need a \
                  restart. Speaks sd_notify READY/STOPPING/WATCHDOG under systemd.\n\n\
                  Exit status: 0 stopped by a signal (or a valid --check-config), 2 \
                  configuration error, 1 any other failure to run. Files: \
                  /etc/vibstage/agent.toml, agent.toml(5) for every key."
)]
pub struct Args {
    /// Configuration file.
    #[arg(long, value_name = "PATH", default_value = crate::config::DEFAULT_PATH)]
    pub config: PathBuf,
    /// Validate the configuration (and the files it names) and exit.
    #[arg(long)]
    pub check_config: bool,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value = "plain")]
    pub log_format: LogFormat,
    /// At start, re-hash every staged blob and remove any whose bytes are wrong (sizes are
    /// always checked; a full scrub reads all staged content).
    #[arg(long)]
    pub scrub: bool,
}

/// The exit of a command line clap refused or answered itself, for every vibstage binary
/// (SPEC §3): its message printed, 0 for `--help` and `--version`, 2 for a usage error.
pub fn clap_exit(e: clap::Error) -> std::process::ExitCode {
    let _ = e.print();
    std::process::ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn grammar_is_consistent() {
        Args::command().debug_assert();
    }
}
