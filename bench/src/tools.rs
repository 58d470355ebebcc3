//! The operator's tools used as baselines (`curl`, `openssl`, `sync`, `dd`, and the peers
//! `ctr`/`aria2c`), run as real processes and timed from spawn to exit; what each run cost in CPU
//! and memory ([`Cost`]), measured by a fresh wrapper process ([`measure_main`]); and installing
//! a missing tool from the distribution ([`ensure_package`]).

use std::collections::HashSet;
use std::ffi::OsString;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Output, Stdio};
use std::sync::Mutex;
use std::time::Instant;

use crate::{BenchError, Result, say};

/// The path of `tool` on `PATH`, or a setup error naming the Debian package that provides it.
pub fn need(tool: &str, package: &str) -> Result<PathBuf> {
    find(tool).ok_or_else(|| {
        BenchError::Setup(format!(
            "`{tool}` is not installed; install it with `apt-get install -y {package}`"
        ))
    })
}

/// Makes sure `tool` is installed: if it is not on `PATH`, runs `apt-get update` and `apt-get
/// install -y --no-install-recommends <package>` (as root, on Debian), then looks again.
/// `TMPDIR=/var/tmp` because apt's signature check writes its temporary files as user `_apt`,
/// which a `/tmp` without the sticky world-writable mode refuses.
pub fn ensure_package(tool: &str, package: &str, log: &mut dyn std::io::Write) -> Result<PathBuf> {
    if let Some(path) = find(tool) {
        return Ok(path);
    }
    say(
        log,
        format!("{tool} is missing: installing {package} with apt-get"),
    );
    let install = || -> std::result::Result<(), String> {
        for args in [
            &["update", "-q"][..],
            &["install", "-y", "-q", "--no-install-recommends", package][..],
        ] {
            let out = Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .env("TMPDIR", "/var/tmp")
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("cannot run apt-get ({e})"))?;
            if !out.status.success() {
                let err = String::from_utf8_lossy(&out.stderr);
                return Err(format!(
                    "apt-get {} failed: {}",
                    args.join(" "),
                    err.lines().last().unwrap_or_default().trim()
                ));
            }
        }
        Ok(())
    };
    install().map_err(|e| {
        BenchError::Setup(format!(
            "`{tool}` is not installed and installing {package} failed: {e}"
        ))
    })?;
    find(tool).ok_or_else(|| {
        BenchError::Setup(format!(
            "apt-get installed {package} but no `{tool}` is on PATH"
        ))
    })
}

/// The path of `tool` on `PATH` (or the usual sbin directories, which a non-login root shell
/// may lack).
pub fn find(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// A port of 127.0.0.1 that is free now and was not handed out before by this process. It is
/// taken below the kernel's ephemeral range (32768 and up on Linux), so that no outgoing
/// connection (of the agents, nginx or other programs) takes it between now and its use.
pub fn free_port() -> Result<u16> {
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    let given = given.get_or_insert_with(HashSet::new);
    let mut seed = [0u8; 2];
    getrandom::fill(&mut seed).map_err(|e| BenchError::Setup(format!("no randomness: {e}")))?;
    let start = u16::from_le_bytes(seed) % 12_000;
    for i in 0..12_000u16 {
        let port = 20_000 + (start + i) % 12_000;
        if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return Ok(port);
        }
    }
    Err(BenchError::Setup(
        "no free port between 20000 and 32000 on 127.0.0.1".into(),
    ))
}

/// Runs `cmd` to completion with its output captured; returns the wall time in seconds. A
/// non-zero exit is an error that shows the command's stderr.
pub fn timed(cmd: &mut Command) -> Result<(f64, Output)> {
    let what = format!("{cmd:?}");
    let start = Instant::now();
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(BenchError::io(format!("run {what}")))?;
    let took = start.elapsed().as_secs_f64();
    if !out.status.success() {
        return Err(BenchError::Run(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok((took, out))
}

/// What one run of a tool cost, as the kernel accounts it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Cost {
    /// Seconds from its spawn to its exit.
    pub wall: f64,
    /// CPU seconds (user + system) of the process and of every descendant it waited for.
    pub cpu: f64,
    /// Peak resident set of the largest of them (`ru_maxrss`), bytes.
    pub peak: u64,
}

impl Cost {
    /// `self` followed by `next`: times add up, the peak is the larger one.
    pub fn then(self, next: Cost) -> Cost {
        Cost {
            wall: self.wall + next.wall,
            cpu: self.cpu + next.cpu,
            peak: self.peak.max(next.peak),
        }
    }

    /// The line [`measure_main`] writes.
    fn to_line(self) -> String {
        format!("{} {} {}\n", self.wall, self.cpu, self.peak)
    }

    /// Parses what [`Cost::to_line`] wrote.
    fn parse(line: &str) -> Option<Cost> {
        let mut f = line.split_whitespace();
        Some(Cost {
            wall: f.next()?.parse().ok()?,
            cpu: f.next()?.parse().ok()?,
            peak: f.next()?.parse().ok()?,
        })
    }
}

/// A round of one of P1's peers ([`crate::containerd`], [`crate::aria2`]).
#[derive(Clone, Debug)]
pub struct PeerRun {
    /// Its time, CPU seconds and peak RSS (a daemon's added to its client's).
    pub cost: Cost,
    /// nginx's CPU seconds meanwhile (in no row; the log prints it).
    pub nginx_cpu: f64,
    /// How the cost splits between the processes, for the log.
    pub detail: String,
}

/// The first argument that makes `vibstage-bench` the measuring wrapper of [`measure_main`]
/// instead of the benchmark.
pub const MEASURE_ARG: &str = "__measure";

/// The measuring wrapper: `vibstage-bench __measure REPORT PROGRAM [ARGS…]` runs `PROGRAM` with
/// this process's standard streams, waits for it, and writes its [`Cost`] to `REPORT`. A fresh
/// process is needed because `getrusage(RUSAGE_CHILDREN)` accumulates over every child a
/// process ever waited for, and its `ru_maxrss` can only grow: here it holds exactly one tool
/// (and whatever that tool waited for). Exits with the tool's status (128 + signal if killed).
pub fn measure_main(args: &[OsString]) -> ExitCode {
    use std::os::unix::process::ExitStatusExt as _;
    let [report, program, rest @ ..] = args else {
        eprintln!("usage: vibstage-bench {MEASURE_ARG} REPORT PROGRAM [ARGS...]");
        return ExitCode::from(2);
    };
    let start = Instant::now();
    let status = match Command::new(program).args(rest).status() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("failed to run {}: {e}", program.to_string_lossy());
            return ExitCode::from(127);
        }
    };
    let wall = start.elapsed().as_secs_f64();
    let usage = match nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN) {
        Ok(u) => u,
        Err(e) => {
            eprintln!("getrusage: {e}");
            return ExitCode::from(125);
        }
    };
    let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    let cost = Cost {
        wall,
        cpu: secs(usage.user_time()) + secs(usage.system_time()),
        peak: u64::try_from(usage.max_rss()).unwrap_or(0) * 1024,
    };
    if let Err(e) = std::fs::write(report, cost.to_line()) {
        eprintln!("failed to write {}: {e}", report.to_string_lossy());
        return ExitCode::from(125);
    }
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1);
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// Runs `cmd` to completion like [`timed`], through the measuring wrapper ([`measure_main`],
/// this executable), and returns what it cost. The wall time is the wrapper's, from the tool's
/// spawn to its exit, so the wrapper's own start is not counted. A non-zero exit is an error that
/// shows the command's stderr.
pub fn measured(cmd: &Command) -> Result<(Cost, Output)> {
    let exe = std::env::current_exe().map_err(BenchError::io("find this executable"))?;
    let report = tempfile::NamedTempFile::new()
        .map_err(BenchError::io("create a temporary file for a tool's cost"))?;
    let mut wrapper = Command::new(exe);
    wrapper
        .arg(MEASURE_ARG)
        .arg(report.path())
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => wrapper.env(k, v),
            None => wrapper.env_remove(k),
        };
    }
    if let Some(dir) = cmd.get_current_dir() {
        wrapper.current_dir(dir);
    }
    let what = format!("{cmd:?}");
    let out = wrapper
        .stdin(Stdio::null())
        .output()
        .map_err(BenchError::io(format!("run {what}")))?;
    if !out.status.success() {
        return Err(BenchError::Run(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let text = std::fs::read_to_string(report.path())
        .map_err(BenchError::io(format!("read the cost of {what}")))?;
    let cost = Cost::parse(&text)
        .ok_or_else(|| BenchError::Run(format!("unreadable cost of {what}: {text:?}")))?;
    Ok((cost, out))
}

/// The first line of `program --version`, for the log.
pub fn version(program: &Path) -> String {
    Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "unknown version".into())
}

/// Flushes every dirty page of the system and waits for it (`sync`), so that writes of one
/// measurement do not drain into the next. Not timed.
pub fn settle() {
    let _ = Command::new("sync").status();
}

/// `curl` to fetch `urls` over HTTPS trusting `ca`, each into the matching file of `outputs`
/// (`/dev/null` allowed), on one keep-alive connection.
pub fn curl(ca: &Path, urls: &[String], outputs: &[PathBuf]) -> Command {
    let mut cmd = Command::new("curl");
    cmd.args(["--silent", "--show-error", "--fail", "--cacert"])
        .arg(ca);
    for (url, out) in urls.iter().zip(outputs) {
        cmd.arg("--output").arg(out).arg(url);
    }
    cmd
}

/// The hex digest `openssl dgst -sha256` prints for one file.
pub fn parse_dgst(stdout: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(stdout);
    let hex = text.trim().rsplit(' ').next()?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then(|| hex.to_owned())
}

/// Sends `signal` to `child` (if it still runs) and waits up to `grace` for it to exit, then
/// kills it: how every process the bench started is stopped.
pub fn stop(
    child: &mut Option<std::process::Child>,
    signal: nix::sys::signal::Signal,
    grace: std::time::Duration,
) {
    let Some(mut child) = child.take() else {
        return;
    };
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dgst_output_is_parsed() {
        let line = format!("SHA2-256(/tmp/x)= {}\n", "ab".repeat(32));
        assert_eq!(parse_dgst(line.as_bytes()), Some("ab".repeat(32)));
        assert_eq!(parse_dgst(b"garbage"), None);
    }

    #[test]
    fn costs_add_up_and_round_trip() {
        let a = Cost {
            wall: 1.5,
            cpu: 0.25,
            peak: 4096,
        };
        let b = Cost {
            wall: 0.5,
            cpu: 1.0,
            peak: 1024,
        };
        assert_eq!(
            a.then(b),
            Cost {
                wall: 2.0,
                cpu: 1.25,
                peak: 4096
            }
        );
        assert_eq!(Cost::parse(&a.to_line()), Some(a));
        assert_eq!(Cost::parse("1 2"), None);
    }
}
