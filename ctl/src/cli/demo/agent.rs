//! The demo's agent: its generated `agent.toml` (every path inside the demo folder, mTLS on a
//! free loopback port, maintenance hooks that only log, the built-in installer) and the real
//! `vibstaged` process found next to `vibstagectl`, which is stopped on every path (including a
//! panic) by [`AgentProcess`]'s `Drop`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use vibstage_protocol::api::HostStatus;
use vibstage_protocol::config::Config;
use vibstage_protocol::{ErrorCode, HostId};

use super::{BIOS, Demo, Failure, HOST, at, cli_failure, client_failure, ensure};
use crate::cli::io_message;
use crate::client::{AgentClient, HostAddr};

/// Longest time the agent gets to start, or to stop after SIGTERM (SPEC: 10 s, plus slack).
pub(super) const AGENT_TIMEOUT: Duration = Duration::from_secs(20);
/// Lines of the agent log shown when a step fails.
const LOG_TAIL: usize = 20;

/// The real `vibstaged` process of the demo. Dropping it stops the process.
pub(super) struct AgentProcess {
    /// The binary.
    exe: PathBuf,
    /// Its configuration.
    config: PathBuf,
    /// Where its stderr goes (appended across restarts).
    log: PathBuf,
    /// The running process, if any.
    child: Option<Child>,
}

impl AgentProcess {
    fn spawn(&mut self) -> Result<u32, String> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("cannot open {}: {}", self.log.display(), io_message(&e)))?;
        let child = Command::new(&self.exe)
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot run {}: {}", self.exe.display(), io_message(&e)))?;
        let pid = child.id();
        self.child = Some(child);
        Ok(pid)
    }

    /// Whether the process has ended, with its status.
    fn exited(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => {
                self.child = None;
                Some(status)
            }
            _ => None,
        }
    }

    /// SIGTERM, then waits up to `timeout` (SIGKILL after it). Returns the exit status and
    /// whether it stopped by itself in time.
    pub(super) fn stop(&mut self, timeout: Duration) -> Option<(ExitStatus, bool)> {
        let mut child = self.child.take()?;
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            match child.try_wait() {
                Ok(Some(status)) => return Some((status, true)),
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(_) => break,
            }
        }
        let _ = child.kill();
        child.wait().ok().map(|s| (s, false))
    }

    /// The last lines of its log.
    pub(super) fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL)..].join("\n")
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.stop(AGENT_TIMEOUT);
    }
}

impl Demo<'_> {
    /// Writes agent.toml, starts vibstaged and waits until it answers over mTLS.
    pub(super) async fn start_agent(&mut self, tls: &Path) -> Result<AgentClient, Failure> {
        let step = "agent";
        let exe = std::env::current_exe()
            .map_err(at(step))?
            .with_file_name("vibstaged");
        ensure(step, exe.is_file(), || {
            format!(
                "vibstaged is not next to vibstagectl ({} is missing); build both binaries \
                 (cargo build --release --bins)",
                exe.display()
            )
        })?;
        let home = self.path(&["agent"]);
        crate::cli::ensure_dir(&home, 0o700).map_err(cli_failure(step))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(at(step))?
            .port();
        // A Unix socket path must fit in sockaddr_un (108 bytes); the demo talks mTLS anyway.
        let socket = home.join("vibstaged.sock");
        let socket = if socket.as_os_str().len() < 100 {
            socket
        } else {
            PathBuf::new()
        };
        let hook = |what: &str| {
            vec![
                "sh".to_owned(),
                "-c".to_owned(),
                "echo \"$(date +%H:%M:%S) $1\" >> \"$0\"".to_owned(),
                home.join("maintenance.log").display().to_string(),
                what.to_owned(),
            ]
        };
        let host_id: HostId = HOST.parse().map_err(at(step))?;
        let mut config = Config::local(
            host_id,
            &home,
            &self.path(&["keys", "image.pub"]),
            &self.path(&["keys", "vendor.pub"]),
        );
        config.scratch.reserve_bytes = 16 << 20;
        config.listen.tcp = format!("127.0.0.1:{port}");
        config.listen.socket = socket;
        config.tls.cert = tls.join(format!("{HOST}.pem"));
        config.tls.key = tls.join(format!("{HOST}.key"));
        config.tls.client_ca = tls.join("ca.pem");
        config.depot.ca = tls.join("ca.pem");
        config.depot.timeout_secs = 10;
        config.depot.retries = 2;
        config.host.dpus = vec!["dpu0".to_owned()];
        config.host.firmware_staging_vendors = vec![BIOS.2.to_owned()];
        config.maintenance.enter = hook("entered maintenance mode");
        config.maintenance.exit = hook("left maintenance mode");
        config.maintenance.timeout_secs = 30;
        let config = format!(
            "# Written by `vibstagectl demo`: every path is inside the demo folder; install.command\n\
             # is not set, so the agent uses its built-in installer (state_dir/bootbank).\n{}",
            config.to_toml().map_err(at(step))?
        );
        let config_path = home.join("agent.toml");
        crate::cli::write_file(
            &config_path,
            config.as_bytes(),
            0o600,
            crate::cli::Existing::Replace,
        )
        .map_err(cli_failure(step))?;
        self.agent = Some(AgentProcess {
            exe,
            config: config_path.clone(),
            log: home.join("agent.log"),
            child: None,
        });
        let name = format!("127.0.0.1:{port}");
        let addr: HostAddr = name.parse().map_err(|why: String| Failure {
            step,
            code: ErrorCode::Internal,
            message: why,
        })?;
        let client = AgentClient::remote(&addr, &name, tls).map_err(client_failure(step))?;
        let pid = self.spawn_and_wait(step, &client).await?;
        self.tell(
            step,
            format_args!(
                "vibstaged up (pid {pid}) with {}: host {HOST}, mTLS on 127.0.0.1:{port}, log {}",
                self.rel(&config_path),
                self.rel(&home.join("agent.log"))
            ),
        )?;
        Ok(client)
    }

    /// Starts the agent process and waits until it answers `GET /v1/status`.
    pub(super) async fn spawn_and_wait(
        &mut self,
        step: &'static str,
        client: &AgentClient,
    ) -> Result<u32, Failure> {
        let agent = self.agent.as_mut().ok_or_else(|| Failure {
            step,
            code: ErrorCode::Internal,
            message: "no agent configured".into(),
        })?;
        let pid = agent.spawn().map_err(at(step))?;
        let deadline = Instant::now() + AGENT_TIMEOUT;
        loop {
            if let Some(status) = self.agent.as_mut().and_then(AgentProcess::exited) {
                return Err(Failure {
                    step,
                    code: ErrorCode::Internal,
                    message: format!("vibstaged exited at start ({status})"),
                });
            }
            if client.get::<HostStatus>("/v1/status").await.is_ok() {
                return Ok(pid);
            }
            if Instant::now() > deadline {
                return Err(Failure {
                    step,
                    code: ErrorCode::Internal,
                    message: format!(
                        "vibstaged did not answer within {}s",
                        AGENT_TIMEOUT.as_secs()
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM, wait, start again. Returns the old pid, how it exited and the new pid.
    pub(super) async fn restart_agent(
        &mut self,
        client: &AgentClient,
    ) -> Result<(u32, String, u32), Failure> {
        let step = "restart";
        let agent = self.agent.as_mut().ok_or_else(|| Failure {
            step,
            code: ErrorCode::Internal,
            message: "the agent is not running".into(),
        })?;
        let pid = agent.child.as_ref().map_or(0, Child::id);
        let stopped = tokio::task::block_in_place(|| agent.stop(AGENT_TIMEOUT));
        let Some((status, in_time)) = stopped else {
            return Err(Failure {
                step,
                code: ErrorCode::Internal,
                message: "the agent had already exited".into(),
            });
        };
        ensure(step, in_time && status.success(), || {
            format!(
                "vibstaged did not stop cleanly on SIGTERM within {}s ({status})",
                AGENT_TIMEOUT.as_secs()
            )
        })?;
        let new_pid = self.spawn_and_wait(step, client).await?;
        let how = status
            .code()
            .map_or_else(|| status.to_string(), |c| format!("exit {c}"));
        Ok((pid, how, new_pid))
    }
}
