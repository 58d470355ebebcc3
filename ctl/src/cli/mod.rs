//! `vibstagectl`: the controller, depot-owner and local-admin tool of SPEC §3, as library code.
//!
//! The binary is `fn main() -> ExitCode { vibstage_ctl::cli::main() }`. Everything else lives here:
//! [`Cli`] is the clap grammar (global target flags plus one [`Command`] variant per subcommand),
//! [`run`] dispatches to one file per subcommand, and [`CliError::exit_code`] is the single place
//! where failures become the SPEC's exit codes (0 ok, 1 operation failed or cut off by
//! `--timeout`, 2 usage or config error, 3 unreachable or refused; 130 interrupted by Ctrl-C, as
//! shells report SIGINT).
//!
//! Adding a subcommand is one variant in [`Command`], one arm in [`run`] and one file exporting an
//! `Args` struct and a `run(args, ctx, out)` function. Subcommands write their results to `out`
//! (stdout in the binary), warnings and errors to stderr, so tests can call them in-process.

pub mod certs;
pub mod demo;
pub mod depot;
pub mod docs;
pub mod escape;
mod fanout;
pub mod hosts;
pub mod image;
pub mod keygen;

use std::ffi::OsString;
use std::io::{self, Write};
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

pub use crate::error::CliError;
pub(crate) use crate::error::io_message;
pub(crate) use crate::files::{
    Existing, ensure_dir, load_signing_key, load_verifying_key, parent_dir, read_config_text,
    with_suffix, write_file,
};

/// Where the local agent listens unless `--socket` says otherwise (SPEC §4 `socket`).
pub const DEFAULT_SOCKET: &str = "/run/vibstage/vibstaged.sock";

/// Help heading of the target flags, which only host subcommands use.
const TARGET_HEADING: &str = "Target options (host commands)";

/// The whole command line of `vibstagectl`.
#[derive(Debug, Parser)]
#[command(
    name = "vibstagectl",
    version,
    about = "vibstage controller and depot tool"
)]
pub struct Cli {
    /// Which agents a host subcommand talks to, when given before the subcommand
    /// (`vibstagectl --host esx-01 status`); the host subcommands accept them after it too.
    #[command(flatten)]
    pub target: TargetArgs,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// The subcommand.
    #[command(subcommand)]
    pub command: Command,
}

/// The target flags of SPEC §3. No flag means the local agent over its Unix socket; `--host` or
/// `--hosts` means remote agents over mutual TLS. Only the host subcommands take them (and show
/// them in `--help`); given before a tool subcommand (keygen, certs, depot, image, demo) they
/// are refused rather than ignored.
#[derive(Debug, Clone, Default, Args)]
pub struct TargetArgs {
    /// Unix socket of the local agent [default: /run/vibstage/vibstaged.sock].
    #[arg(
        long,
        value_name = "PATH",
        conflicts_with_all = ["host", "hosts"],
        help_heading = TARGET_HEADING
    )]
    pub socket: Option<PathBuf>,
    /// A remote agent, HOST or HOST:PORT (port 9443 if absent); repeatable.
    #[arg(long, value_name = "HOST[:PORT]", help_heading = TARGET_HEADING)]
    pub host: Vec<String>,
    /// A file naming remote agents, one HOST or HOST:PORT a line.
    #[arg(long, value_name = "FILE", help_heading = TARGET_HEADING)]
    pub hosts: Option<PathBuf>,
    /// Directory holding ca.pem, client.pem and client.key for mutual TLS.
    #[arg(long, value_name = "DIR", help_heading = TARGET_HEADING)]
    pub tls_dir: Option<PathBuf>,
    /// At most N hosts at a time [default: all at once].
    #[arg(long, value_name = "N", help_heading = TARGET_HEADING)]
    pub parallel: Option<NonZeroUsize>,
    /// Give up on hosts that have not finished after this long (e.g. 90s, 20m, 2h; a bare
    /// number is seconds); they are reported as timed out and the exit code is 1
    /// [default: no limit].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, help_heading = TARGET_HEADING)]
    pub timeout: Option<Duration>,
    /// One line per host even with many hosts.
    #[arg(long, short, help_heading = TARGET_HEADING)]
    pub verbose: bool,
}

impl TargetArgs {
    /// Whether any target flag was given.
    fn any(&self) -> bool {
        self.socket.is_some()
            || !self.host.is_empty()
            || self.hosts.is_some()
            || self.tls_dir.is_some()
            || self.parallel.is_some()
            || self.timeout.is_some()
            || self.verbose
    }

    /// The flags given before the subcommand (`self`) together with those after it: hosts add
    /// up, a value given after the subcommand wins.
    fn merge(self, after: TargetArgs) -> Result<TargetArgs, CliError> {
        let mut host = self.host;
        host.extend(after.host);
        let merged = TargetArgs {
            socket: after.socket.or(self.socket),
            host,
            hosts: after.hosts.or(self.hosts),
            tls_dir: after.tls_dir.or(self.tls_dir),
            parallel: after.parallel.or(self.parallel),
            timeout: after.timeout.or(self.timeout),
            verbose: self.verbose || after.verbose,
        };
        if merged.socket.is_some() && (!merged.host.is_empty() || merged.hosts.is_some()) {
            return Err(CliError::Usage(
                "--socket (the local agent) cannot be combined with --host/--hosts (remote agents)"
                    .into(),
            ));
        }
        Ok(merged)
    }
}

/// The target flags alone, for host subcommands without arguments of their own.
#[derive(Debug, Clone, Default, Args)]
pub struct HostArgs {
    /// Which agents.
    #[command(flatten)]
    pub target: TargetArgs,
}

/// `90`, `90s`, `20m`, `2h`: a positive duration for `--timeout`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("expected a duration such as 90s, 20m or 2h, got {s:?}"))?;
    let secs = match unit {
        "s" => Some(n),
        "m" => n.checked_mul(60),
        "h" => n.checked_mul(3600),
        _ => None,
    }
    .filter(|&secs| secs > 0)
    .ok_or_else(|| format!("expected a positive duration such as 90s, 20m or 2h, got {s:?}"))?;
    Ok(Duration::from_secs(secs))
}

/// The subcommands. Each variant's arguments and behaviour live in `cli/<subcommand>.rs`.
#[derive(Debug, Subcommand)]
#[non_exhaustive]
pub enum Command {
    /// Generate an ed25519 signing key pair: NAME.key and NAME.pub.
    Keygen(keygen::Args),
    /// Development TLS certificates.
    Certs(certs::Args),
    /// Add VIBs to a depot directory.
    Depot(depot::Args),
    /// Create or verify signed images.
    Image(image::Args),
    /// Host summary: compliance, staged mark, scratch, maintenance, running task.
    Status(HostArgs),
    /// Compliance check of the hosts against an image.
    Check(hosts::CheckArgs),
    /// Stage an image on the hosts (all in parallel by default).
    Stage(hosts::StageArgs),
    /// Stage what is missing, enter maintenance mode, install, exit (one host at a time by default).
    Remediate(hosts::RemediateArgs),
    /// List staged content, or `staged rm DIGEST`.
    Staged(hosts::StagedArgs),
    /// List tasks, newest first.
    Tasks(HostArgs),
    /// Show one task (`--wait` until it ends).
    Task(hosts::TaskArgs),
    /// The whole flow on this machine: keys, certs, depot, an agent process, stage, restart,
    /// remediate.
    Demo(demo::Args),
}

impl Command {
    /// The subcommand's name, as typed.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Keygen(_) => "keygen",
            Command::Certs(_) => "certs",
            Command::Depot(_) => "depot",
            Command::Image(_) => "image",
            Command::Status(_) => "status",
            Command::Check(_) => "check",
            Command::Stage(_) => "stage",
            Command::Remediate(_) => "remediate",
            Command::Staged(_) => "staged",
            Command::Tasks(_) => "tasks",
            Command::Task(_) => "task",
            Command::Demo(_) => "demo",
        }
    }
}

/// What every subcommand may consult besides its own arguments.
#[derive(Debug, Clone)]
pub struct Context {
    /// `--json`: print one JSON document instead of text.
    pub json: bool,
    /// The target flags, for subcommands that talk to agents.
    pub target: TargetArgs,
    /// The subcommand's name as typed (`stage`, `status`, …), for messages such as "stage
    /// failed on esx-01".
    pub command: &'static str,
}

/// Parses the process arguments, runs the subcommand and returns the SPEC exit code. Usage errors
/// found by clap exit 2; `--help` and `--version` exit 0.
///
/// `vibstagectl generate-docs --out DIR` (man pages and completions, for packaging) is parsed
/// apart from the grammar, so that neither `--help` nor the shell completions offer it.
pub fn main() -> ExitCode {
    let mut stdout = io::stdout().lock();
    let argv: Vec<OsString> = std::env::args_os().collect();
    let result = if argv.get(1).is_some_and(|a| a == "generate-docs") {
        match docs::Args::try_parse_from(&argv[1..]) {
            Ok(args) => docs::run(args, &mut stdout),
            Err(e) => return clap_exit(e),
        }
    } else {
        match Cli::try_parse_from(&argv) {
            Ok(cli) => run(cli, &mut stdout),
            Err(e) => return clap_exit(e),
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = stdout.flush();
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// clap's own codes: 0 for help/version, 2 for usage errors.
fn clap_exit(e: clap::Error) -> ExitCode {
    let _ = e.print();
    ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2))
}

/// Runs one parsed command line, writing its results to `out`.
pub fn run(cli: Cli, out: &mut dyn Write) -> Result<(), CliError> {
    let command = cli.command.name();
    let after = match &cli.command {
        Command::Status(a) | Command::Tasks(a) => Some(a.target.clone()),
        Command::Check(a) => Some(a.target.clone()),
        Command::Stage(a) => Some(a.target.clone()),
        Command::Remediate(a) => Some(a.stage.target.clone()),
        Command::Staged(a) => Some(match &a.command {
            Some(hosts::StagedCommand::Rm { target, .. }) => {
                a.target.clone().merge(target.clone())?
            }
            None => a.target.clone(),
        }),
        Command::Task(a) => Some(a.target.clone()),
        Command::Keygen(_)
        | Command::Certs(_)
        | Command::Depot(_)
        | Command::Image(_)
        | Command::Demo(_) => None,
    };
    let target = match after {
        Some(after) => cli.target.merge(after)?,
        None if cli.target.any() => {
            return Err(CliError::Usage(format!(
                "`{command}` works on local files and talks to no agent: the target options \
                 (--socket, --host, --hosts, --tls-dir, --parallel, --timeout, --verbose) apply \
                 to status, check, stage, remediate, staged, tasks and task"
            )));
        }
        None => TargetArgs::default(),
    };
    let ctx = Context {
        json: cli.json,
        target,
        command,
    };
    match cli.command {
        Command::Keygen(args) => keygen::run(args, &ctx, out),
        Command::Certs(args) => certs::run(args, &ctx, out),
        Command::Depot(args) => depot::run(args, &ctx, out),
        Command::Image(args) => image::run(args, &ctx, out),
        Command::Status(_) => hosts::status(&ctx, out),
        Command::Check(args) => hosts::check(args, &ctx, out),
        Command::Stage(args) => hosts::lifecycle(false, args, None, &ctx, out),
        Command::Remediate(args) => {
            hosts::lifecycle(true, args.stage, Some(args.max_failures), &ctx, out)
        }
        Command::Staged(args) => hosts::staged(args, &ctx, out),
        Command::Tasks(_) => hosts::tasks(&ctx, out),
        Command::Task(args) => hosts::task(args, &ctx, out),
        Command::Demo(args) => demo::run(args, &ctx, out),
    }
}

/// Writes a result line (or document) to `out`, mapping a closed stdout to an error.
pub(crate) fn emit(out: &mut dyn Write, text: impl std::fmt::Display) -> Result<(), CliError> {
    writeln!(out, "{text}").map_err(|e| CliError::io("write", "standard output", e))
}

/// Writes `value` as pretty JSON to `out`. Strings may hold what hosts sent, so the characters
/// a terminal would act on that serde_json leaves raw are escaped too ([`escape::escape_json_text`]).
pub(crate) fn emit_json(out: &mut dyn Write, value: &serde_json::Value) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| CliError::io("write", "standard output", io::Error::other(e)))?;
    emit(out, escape::escape_json_text(&text))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;
    use std::path::Path;
    use vibstage_protocol::ErrorCode;

    #[test]
    fn grammar_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn exit_codes_follow_the_spec() {
        assert_eq!(CliError::Usage("x".into()).exit_code(), 2);
        assert_eq!(CliError::config("key", "/k", "gone").exit_code(), 2);
        let failed = CliError::Failed {
            code: ErrorCode::SignatureInvalid,
            message: "m".into(),
        };
        assert_eq!(failed.exit_code(), 1);
        assert_eq!(failed.to_string(), "signature_invalid: m");
        let unreachable = CliError::Unreachable {
            target: "h".into(),
            message: "m".into(),
        };
        assert_eq!(unreachable.exit_code(), 3);
    }

    #[test]
    fn io_messages_name_the_file_without_os_error_noise() {
        let e = CliError::config(
            "key",
            "/x/y.key",
            io_message(&io::Error::from_raw_os_error(2)),
        );
        assert_eq!(
            e.to_string(),
            "failed to read key /x/y.key: No such file or directory"
        );
    }

    #[test]
    fn target_flags_go_before_or_after_host_subcommands_only() {
        // Issue 17, item 12: host commands take the target flags on either side.
        let cli = Cli::try_parse_from([
            "vibstagectl",
            "--host",
            "a",
            "status",
            "--host",
            "b:1",
            "--json",
        ])
        .expect("parse");
        assert!(cli.json);
        let mut sink = Vec::new();
        let Command::Status(after) = &cli.command else {
            panic!("status")
        };
        let merged = cli
            .target
            .clone()
            .merge(after.target.clone())
            .expect("merge");
        assert_eq!(merged.host, ["a", "b:1"]);
        // Tool subcommands neither show nor take them.
        assert!(
            Cli::try_parse_from(["vibstagectl", "keygen", "--out", "k", "--host", "a"]).is_err()
        );
        let before = Cli::try_parse_from(["vibstagectl", "--host", "a", "keygen", "--out", "k"])
            .expect("parse");
        let e = run(before, &mut sink).expect_err("refused");
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("talks to no agent"), "{e}");
        let both = Cli::try_parse_from(["vibstagectl", "--socket", "/s", "status", "--host", "a"])
            .expect("parse");
        assert_eq!(run(both, &mut sink).expect_err("conflict").exit_code(), 2);
    }

    #[test]
    fn help_shows_each_option_where_it_applies() {
        let mut cmd = Cli::command();
        cmd.build();
        let mut help = |name: &str| {
            cmd.find_subcommand_mut(name)
                .expect(name)
                .render_long_help()
                .to_string()
        };
        for tool in ["keygen", "certs", "depot", "image", "demo"] {
            assert!(!help(tool).contains("--host"), "{tool}");
        }
        for host in [
            "status",
            "check",
            "stage",
            "remediate",
            "staged",
            "tasks",
            "task",
        ] {
            assert!(help(host).contains("--host"), "{host}");
        }
        assert!(help("remediate").contains("--max-failures"));
        assert!(!help("stage").contains("--max-failures"));
        assert!(cmd.find_subcommand("generate-docs").is_none());
    }

    #[test]
    fn timeouts_parse_with_units() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("20m"), Ok(Duration::from_secs(1200)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        for bad in [
            "",
            "0",
            "0s",
            "s",
            "1d",
            "-1",
            "1.5m",
            "99999999999999999999h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn suffix_keeps_dots_in_the_name() {
        assert_eq!(
            with_suffix(Path::new("keys/vendor.acme"), "key"),
            Path::new("keys/vendor.acme.key")
        );
    }
}
