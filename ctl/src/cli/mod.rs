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
pub mod import;
pub mod keygen;

use std::ffi::OsString;
use std::fs::{self, File, Permissions};
use std::io::{self, Write};
use std::num::NonZeroUsize;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use vibstage_protocol::ErrorCode;

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

/// Why `vibstagectl` failed. Each variant maps to one exit code in [`CliError::exit_code`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CliError {
    /// The command line asks for something impossible (exit 2).
    #[error("{0}")]
    Usage(String),
    /// An input the operator named (key, certificate, directory) cannot be used (exit 2).
    #[error("failed to read {what} {}: {detail}", path.display())]
    Config {
        /// What the file is, for the message ("key", "CA certificate", …).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it cannot be used.
        detail: String,
    },
    /// The operator interrupted the command with Ctrl-C (exit 130, as shells report SIGINT).
    #[error("interrupted")]
    Interrupted,
    /// The operation was attempted and refused or failed, with a SPEC error code (exit 1).
    #[error("{code}: {message}")]
    Failed {
        /// The SPEC §5 error code.
        code: ErrorCode,
        /// What failed, naming the document or file.
        message: String,
    },
    /// The operation ran and failed (or timed out) on some hosts; each host's line said why
    /// (exit 1).
    #[error("{0}")]
    OnHosts(String),
    /// Reading or writing a file failed while doing the work (exit 1).
    #[error("failed to {action} {}: {}", path.display(), io_message(source))]
    Io {
        /// What was being done ("write", "create directory", …).
        action: &'static str,
        /// On which file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A host could not be reached or refused us (exit 3).
    #[error("{target}: {message}")]
    Unreachable {
        /// The host or socket.
        target: String,
        /// What happened.
        message: String,
    },
}

impl CliError {
    /// The process exit code for this error (SPEC §3).
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) | CliError::Config { .. } => 2,
            CliError::Failed { .. } | CliError::Io { .. } | CliError::OnHosts(_) => 1,
            CliError::Unreachable { .. } => 3,
            CliError::Interrupted => 130,
        }
    }

    /// An [`CliError::Io`] on `path`.
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        CliError::Io {
            action,
            path: path.into(),
            source,
        }
    }

    /// A [`CliError::Config`] on `path`.
    pub fn config(what: &'static str, path: impl Into<PathBuf>, detail: impl ToString) -> Self {
        CliError::Config {
            what,
            path: path.into(),
            detail: detail.to_string(),
        }
    }
}

/// An I/O error's message without Rust's " (os error N)" suffix, for operator-facing text.
pub(crate) fn io_message(e: &io::Error) -> String {
    let text = e.to_string();
    match text.rfind(" (os error ") {
        Some(i) if text.ends_with(')') => text[..i].to_owned(),
        _ => text,
    }
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

/// `path` with `ext` appended to its file name (`keys/image` + `key` = `keys/image.key`), even
/// when the name already contains dots.
pub(crate) fn with_suffix(path: &Path, ext: &str) -> PathBuf {
    let mut s: OsString = path.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

/// Creates `dir` (and missing parents) if it does not exist, giving the directory itself `mode`
/// regardless of the umask. An existing directory is left as it is.
pub(crate) fn ensure_dir(dir: &Path, mode: u32) -> Result<(), CliError> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::create_dir_all(dir).map_err(|e| CliError::io("create directory", dir, e))?;
    fs::set_permissions(dir, Permissions::from_mode(mode))
        .map_err(|e| CliError::io("set permissions of", dir, e))
}

/// fsyncs a directory so that a rename into it survives a crash.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), CliError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| CliError::io("sync directory", dir, e))
}

/// The directory a file path lives in (`.` for a bare file name).
pub(crate) fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// How [`write_file`] treats an existing file at the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Existing {
    /// Refuse: the destination must not exist (keys, certificates).
    Refuse,
    /// Replace it atomically (depot documents).
    Replace,
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory with `mode`,
/// fsync, then a rename (or a no-clobber link for [`Existing::Refuse`]) and a directory fsync.
/// Readers see the old file or the whole new one, never a part.
pub(crate) fn write_file(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    existing: Existing,
) -> Result<(), CliError> {
    let dir = parent_dir(path);
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .permissions(Permissions::from_mode(mode))
        .tempfile_in(dir)
        .map_err(|e| CliError::io("create a temporary file in", dir, e))?;
    // The builder's mode is filtered by the umask; set it exactly.
    tmp.as_file()
        .set_permissions(Permissions::from_mode(mode))
        .and_then(|()| tmp.write_all(bytes))
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(|e| CliError::io("write", path, e))?;
    match existing {
        Existing::Replace => tmp
            .persist(path)
            .map(drop)
            .map_err(|e| CliError::io("write", path, e.error))?,
        Existing::Refuse => tmp.persist_noclobber(path).map(drop).map_err(|e| {
            if e.error.kind() == io::ErrorKind::AlreadyExists {
                CliError::Usage(format!(
                    "{} already exists; refusing to overwrite it",
                    path.display()
                ))
            } else {
                CliError::io("write", path, e.error)
            }
        })?,
    }
    sync_dir(dir)
}

/// Reads a small text file the operator named (a key or certificate), as a config input.
pub(crate) fn read_config_text(what: &'static str, path: &Path) -> Result<String, CliError> {
    fs::read_to_string(path).map_err(|e| CliError::config(what, path, io_message(&e)))
}

/// Loads an ed25519 private key (PKCS#8 PEM).
pub(crate) fn load_signing_key(path: &Path) -> Result<ed25519_dalek::SigningKey, CliError> {
    let pem = read_config_text("key", path)?;
    vibstage_protocol::dsse::signing_key_from_pem(&pem)
        .map_err(|e| CliError::config("key", path, e))
}

/// Loads an ed25519 public key (SPKI PEM).
pub(crate) fn load_verifying_key(path: &Path) -> Result<ed25519_dalek::VerifyingKey, CliError> {
    let pem = read_config_text("public key", path)?;
    vibstage_protocol::dsse::verifying_key_from_pem(&pem)
        .map_err(|e| CliError::config("public key", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

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
