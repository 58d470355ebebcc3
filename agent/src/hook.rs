//! The commands an operator configures around a remediation (`maintenance.enter`, `maintenance.exit`,
//! `install.command`, SPEC §4): run with a time limit, killed when it passes, with stdin closed.
//! A failure is a message naming the setting, the program and what happened.

use std::path::PathBuf;
use std::time::Duration;

/// Runs a hook command with a time limit; the child is killed if the limit passes.
pub async fn run(
    what: &str,
    argv: &[String],
    extra: &[PathBuf],
    timeout: Duration,
) -> Result<(), String> {
    let Some((program, args)) = argv.split_first() else {
        return Ok(());
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .args(extra)
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("{what}: cannot run {program}: {e}"))?;
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(format!("{what}: {program} failed ({status})")),
        Ok(Err(e)) => Err(format!("{what}: waiting for {program}: {e}")),
        Err(_) => {
            let _ = child.kill().await;
            Err(format!(
                "{what}: {program} did not finish within {}s",
                timeout.as_secs()
            ))
        }
    }
}
