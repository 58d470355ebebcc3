//! The operator's tools used as baselines (`curl`, `openssl`, `sync`, `dd`), run as real
//! processes and timed from spawn to exit.

use std::collections::HashSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::Instant;

use crate::{BenchError, Result};

/// The path of `tool` on `PATH`, or a setup error naming the Debian package that provides it.
pub fn need(tool: &str, package: &str) -> Result<PathBuf> {
    find(tool).ok_or_else(|| {
        BenchError::Setup(format!(
            "`{tool}` is not installed; install it with `apt-get install -y {package}`"
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dgst_output_is_parsed() {
        let line = format!("SHA2-256(/tmp/x)= {}\n", "ab".repeat(32));
        assert_eq!(parse_dgst(line.as_bytes()), Some("ab".repeat(32)));
        assert_eq!(parse_dgst(b"garbage"), None);
    }
}
