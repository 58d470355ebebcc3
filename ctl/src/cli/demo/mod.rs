//! `vibstagectl demo [--dir DIR]`: the whole flow of SPEC §3 on this machine, told step by step.
//!
//! In a temporary folder (or DIR, which must be empty or absent and is kept), it makes the keys
//! and certificates, builds a depot of generated VIBs (host software, firmware of a vendor the
//! host lists, a DPU VIB), signs an image, serves the depot over HTTPS on 127.0.0.1
//! ([`crate::depot_server`]), and starts the real `vibstaged` found next to this binary with a
//! generated `agent.toml` (everything inside the folder, mTLS on a free loopback port,
//! maintenance hooks that only write to `maintenance.log`, the built-in installer). It then talks
//! to that agent over mutual TLS exactly as a controller would: check, stage (with a progress
//! bar when stdout is a terminal), status, a SIGTERM and restart to show that the staged state
//! survives, remediate, and a last check.
//!
//! Every step prints one plain line with what the agent reported, and checks that the agent did
//! what the SPEC says; the first step that did not fails the demo (exit 1) with its name. The
//! agent is stopped on every path. A temporary folder is removed after a successful run and kept
//! after a failed one so that `agent/agent.log` can be read.

mod agent;
mod content;

use std::fmt::Display;
use std::fs;
use std::io::{IsTerminal as _, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use time::OffsetDateTime;
use vibstage_protocol::api::{
    ComplianceReport, ComplianceStatus, HostStatus, StagedList, Task, TaskResponse, TaskState,
};
use vibstage_protocol::{Envelope, ErrorCode, Name};

use self::agent::{AGENT_TIMEOUT, AgentProcess};
use super::{CliError, Context, emit, emit_json, io_message};
use crate::client::{AgentClient, ClientError};
use crate::depot_server::DepotServer;

/// Arguments of `demo`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Work in DIR (created if missing, must be empty) and keep it afterwards [default: a
    /// temporary folder, removed when the demo passes].
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// The steps, in order; each prints one line.
const STEPS: [&str; 13] = [
    "keys",
    "certs",
    "depot",
    "image",
    "serve",
    "agent",
    "check",
    "stage",
    "status",
    "restart",
    "survive",
    "remediate",
    "result",
];

/// The demo host's name: its `host_id` and the name on its server certificate.
const HOST: &str = "demo-esx";
/// The image the demo builds.
const IMAGE: &str = "esx-8.0u2";
/// The software component and its version (also the base image).
const ESXI: (&str, &str) = ("ESXi", "8.0.2-0.20");
/// The firmware component, its version and hardware vendor.
const BIOS: (&str, &str, &str) = ("BIOS", "2.1", "dell");
/// Longest time a stage or remediate task may take.
const TASK_TIMEOUT: Duration = Duration::from_secs(300);

/// Why a step did not do what it should.
#[derive(Debug)]
struct Failure {
    step: &'static str,
    code: ErrorCode,
    message: String,
}

/// A mapper from any displayable error to a failure of `step`.
fn at<E: Display>(step: &'static str) -> impl FnOnce(E) -> Failure {
    move |e| Failure {
        step,
        code: ErrorCode::Internal,
        message: e.to_string(),
    }
}

/// A failure of `step` keeping the SPEC code of a library error.
fn cli_failure(step: &'static str) -> impl FnOnce(CliError) -> Failure {
    move |e| Failure {
        step,
        code: match &e {
            CliError::Failed { code, .. } => *code,
            _ => ErrorCode::Internal,
        },
        message: e.to_string(),
    }
}

/// A failure of `step` keeping the agent's error code.
fn client_failure(step: &'static str) -> impl FnOnce(ClientError) -> Failure {
    move |e| Failure {
        step,
        code: match &e {
            ClientError::Api { detail, .. } => detail.code,
            _ => ErrorCode::Internal,
        },
        message: e.to_string(),
    }
}

/// Fails `step` unless `ok`.
fn ensure(step: &'static str, ok: bool, message: impl FnOnce() -> String) -> Result<(), Failure> {
    if ok {
        Ok(())
    } else {
        Err(Failure {
            step,
            code: ErrorCode::Internal,
            message: message(),
        })
    }
}

/// A validated name from one of the demo's constants.
fn name(step: &'static str, text: &str) -> Result<Name, Failure> {
    text.parse().map_err(at(step))
}

/// Everything the demo keeps between steps.
struct Demo<'a> {
    /// Where the story goes.
    out: &'a mut dyn Write,
    /// `--json`: collect the steps and print one document at the end.
    json: bool,
    /// Steps told so far (for `--json`).
    told: Vec<Value>,
    /// The demo folder.
    dir: PathBuf,
    /// The depot server, while it runs.
    depot: Option<DepotServer>,
    /// The agent, while it runs.
    agent: Option<AgentProcess>,
}

impl Demo<'_> {
    fn say(&mut self, step: &'static str, text: impl Display) -> Result<(), CliError> {
        let n = STEPS.iter().position(|s| *s == step).map_or(0, |i| i + 1);
        self.told
            .push(json!({"step": step, "result": text.to_string()}));
        if self.json {
            return Ok(());
        }
        emit(
            self.out,
            format_args!("{n:>2}/{} {step:<9} {text}", STEPS.len()),
        )
    }

    fn tell(&mut self, step: &'static str, text: impl Display) -> Result<(), Failure> {
        self.say(step, text).map_err(cli_failure(step))
    }

    fn path(&self, parts: &[&str]) -> PathBuf {
        parts.iter().fold(self.dir.clone(), |p, s| p.join(s))
    }

    /// The folder relative to the demo folder, for shorter lines.
    fn rel(&self, path: &Path) -> String {
        path.strip_prefix(&self.dir)
            .unwrap_or(path)
            .display()
            .to_string()
    }

    async fn run(&mut self) -> Result<(), Failure> {
        // 1. keys
        let image_key =
            super::keygen::generate(&self.path(&["keys", "image"])).map_err(cli_failure("keys"))?;
        let vendor_key = super::keygen::generate(&self.path(&["keys", "vendor"]))
            .map_err(cli_failure("keys"))?;
        let short =
            |k: &vibstage_protocol::KeyId| k.to_string().chars().take(12).collect::<String>();
        self.tell(
            "keys",
            format_args!(
                "image signing key {}… and vendor (VIB) signing key {}… in keys/",
                short(&image_key.key_id),
                short(&vendor_key.key_id)
            ),
        )?;

        // 2. certs
        let tls = self.path(&["tls"]);
        let certs = super::certs::init(
            &tls,
            &[HOST.to_owned(), "depot".to_owned()],
            "controller",
            crate::pki::Validity::standard(OffsetDateTime::now_utc()),
        )
        .map_err(cli_failure("certs"))?;
        self.tell(
            "certs",
            format_args!(
                "development CA with certificates for {HOST}, the depot and the {} in tls/",
                certs.client.name
            ),
        )?;

        // 3. depot
        let depot_dir = self.path(&["depot"]);
        let vibs = self.make_depot(&depot_dir, &vendor_key.private_key)?;
        self.tell("depot", vibs)?;

        // 4. image
        let (created, envelope) =
            self.make_image(&depot_dir, &image_key.private_key, &vendor_key.private_key)?;

        // 5. serve
        let loopback: SocketAddr = ([127, 0, 0, 1], 0).into();
        let server = DepotServer::start(
            &depot_dir,
            &tls.join("depot.pem"),
            &tls.join("depot.key"),
            loopback,
        )
        .await
        .map_err(at("serve"))?;
        let url = server.url();
        self.depot = Some(server);
        self.tell(
            "serve",
            format_args!("depot/ served over HTTPS at {url} with the demo CA's certificate"),
        )?;

        // 6. agent
        let client = self.start_agent(&tls).await?;

        // 7. check
        let (_, report): (u16, ComplianceReport) = client
            .post("/v1/compliance/check", &json!({"image": envelope}))
            .await
            .map_err(client_failure("check"))?;
        ensure(
            "check",
            report.status == ComplianceStatus::NonCompliant,
            || {
                format!(
                    "expected non_compliant, the agent reported {}",
                    report.status.as_str()
                )
            },
        )?;
        let changes: Vec<String> = report
            .components
            .iter()
            .map(|c| format!("{} {}", c.component, c.change.as_str()))
            .collect();
        self.tell(
            "check",
            format_args!(
                "agent reports {}, impact {}: {}",
                report.status.as_str(),
                report.impact.as_str(),
                changes.join(", ")
            ),
        )?;

        // 8. stage
        let task = self
            .lifecycle(&client, "stage", "/v1/stage", &envelope, &url)
            .await?;
        self.tell(
            "stage",
            format_args!(
                "agent reports {}: {} downloaded; sizes, sha256 and signatures verified",
                task.state.as_str(),
                HumanBytes(task.bytes_downloaded)
            ),
        )?;

        // 9. status
        let before: HostStatus = client
            .get("/v1/status")
            .await
            .map_err(client_failure("status"))?;
        let s = &before.staging;
        ensure("status", s.staged, || {
            format!(
                "staged is false (software {}, firmware {}, dpu {})",
                s.software.as_str(),
                s.firmware.as_str(),
                s.dpu.as_str()
            )
        })?;
        ensure("status", s.persistent, || {
            format!(
                "staged into the volatile path {}: the scratch filesystem of {} lacks room",
                s.location,
                self.dir.display()
            )
        })?;
        self.tell(
            "status",
            format_args!(
                "agent reports staged={} (software {}, firmware {}, dpu {}), {} on persistent \
                 scratch {}",
                s.staged,
                s.software.as_str(),
                s.firmware.as_str(),
                s.dpu.as_str(),
                HumanBytes(s.bytes),
                self.rel(Path::new(&s.location))
            ),
        )?;

        // 10. restart
        let (old_pid, stopped, new_pid) = self.restart_agent(&client).await?;
        self.tell(
            "restart",
            format_args!(
                "SIGTERM: vibstaged (pid {old_pid}) stopped cleanly ({stopped}); started again \
                 (pid {new_pid})"
            ),
        )?;

        // 11. survive
        let after: HostStatus = client
            .get("/v1/status")
            .await
            .map_err(client_failure("survive"))?;
        ensure(
            "survive",
            after.staging.staged && after.staging.bytes == before.staging.bytes,
            || {
                format!(
                    "after the restart staged={} with {} bytes (before: {} bytes)",
                    after.staging.staged, after.staging.bytes, before.staging.bytes
                )
            },
        )?;
        self.tell(
            "survive",
            format_args!(
                "agent still reports staged={} with the same {}, compliance {}",
                after.staging.staged,
                HumanBytes(after.staging.bytes),
                after.compliance.status.as_str()
            ),
        )?;

        // 12. remediate
        let task = self
            .lifecycle(&client, "remediate", "/v1/remediate", &envelope, &url)
            .await?;
        let hooks =
            fs::read_to_string(self.path(&["agent", "maintenance.log"])).unwrap_or_default();
        let hooks: Vec<&str> = hooks
            .lines()
            .filter_map(|l| l.split_once(' ').map(|(_, what)| what))
            .collect();
        ensure(
            "remediate",
            hooks == ["entered maintenance mode", "left maintenance mode"],
            || format!("the maintenance hooks logged {hooks:?}"),
        )?;
        self.tell(
            "remediate",
            format_args!(
                "agent reports {}: {} more downloaded, {}, installed, {} (hooks in \
                 agent/maintenance.log)",
                task.state.as_str(),
                HumanBytes(task.bytes_downloaded),
                hooks[0],
                hooks[1]
            ),
        )?;

        // 13. result
        let (_, report): (u16, ComplianceReport) = client
            .post("/v1/compliance/check", &json!({"image": envelope}))
            .await
            .map_err(client_failure("result"))?;
        let status: HostStatus = client
            .get("/v1/status")
            .await
            .map_err(client_failure("result"))?;
        let staged: StagedList = client
            .get("/v1/staged")
            .await
            .map_err(client_failure("result"))?;
        ensure(
            "result",
            report.status == ComplianceStatus::Compliant,
            || {
                format!(
                    "expected compliant, the agent reported {}",
                    report.status.as_str()
                )
            },
        )?;
        let installed = status.installed.image.as_ref();
        ensure(
            "result",
            installed.is_some_and(|i| i.digest == created.digest),
            || format!("installed image is {installed:?}, not {}", created.digest),
        )?;
        ensure("result", staged.staged.is_empty(), || {
            format!(
                "{} staged image(s) left after remediation",
                staged.staged.len()
            )
        })?;
        self.tell(
            "result",
            format_args!(
                "agent reports {} with {IMAGE} #{} installed{}; staged content removed",
                report.status.as_str(),
                installed.map_or(0, |i| i.serial),
                if status.installed.reboot_required {
                    " (reboot required)"
                } else {
                    ""
                }
            ),
        )?;
        Ok(())
    }

    /// Starts a stage or remediate task and follows it to its end, with a progress bar when
    /// stdout is a terminal. Fails unless it succeeded.
    async fn lifecycle(
        &mut self,
        client: &AgentClient,
        step: &'static str,
        path: &str,
        image: &Envelope,
        depot: &str,
    ) -> Result<Task, Failure> {
        let (_, answer): (u16, TaskResponse) = client
            .post(path, &json!({"image": image, "depot": depot}))
            .await
            .map_err(client_failure(step))?;
        let Some(task) = answer.task else {
            return Err(Failure {
                step,
                code: ErrorCode::Internal,
                message: "the agent started no task: it reports the host already compliant".into(),
            });
        };
        let bar = (std::io::stdout().is_terminal() && !self.json).then(|| {
            let bar = ProgressBar::new(task.progress.bytes_total);
            bar.set_style(
                ProgressStyle::with_template("          [{bar:30}] {bytes}/{total_bytes} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar
        });
        let watch = super::fanout::Watch::with_bar(bar.clone());
        let followed =
            tokio::time::timeout(TASK_TIMEOUT, super::hosts::follow(client, task, &watch)).await;
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        let task = followed
            .map_err(|_| Failure {
                step,
                code: ErrorCode::Internal,
                message: format!("the task did not end within {}s", TASK_TIMEOUT.as_secs()),
            })?
            .map_err(client_failure(step))?;
        if task.state != TaskState::Succeeded {
            let (code, why) = task.error.as_ref().map_or_else(
                || (ErrorCode::Internal, "no error reported".to_owned()),
                |e| (e.code, format!("{}: {}", e.code, e.message)),
            );
            return Err(Failure {
                step,
                code,
                message: format!("task {} ended {}: {why}", task.id, task.state.as_str()),
            });
        }
        Ok(task)
    }
}

/// Picks the demo folder: DIR (created, must be empty) or a new temporary folder.
fn prepare(dir: Option<PathBuf>) -> Result<(PathBuf, Option<tempfile::TempDir>), CliError> {
    let Some(dir) = dir else {
        let temp = tempfile::Builder::new()
            .prefix("vibstage-demo-")
            .tempdir()
            .map_err(|e| CliError::io("create a temporary folder in", std::env::temp_dir(), e))?;
        return Ok((temp.path().to_owned(), Some(temp)));
    };
    match fs::read_dir(&dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(CliError::Usage(format!(
                    "--dir {}: the folder is not empty; give a new or empty folder",
                    dir.display()
                )));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            super::ensure_dir(&dir, 0o755)?;
        }
        Err(e) => return Err(CliError::config("demo folder", &dir, io_message(&e))),
    }
    // Absolute, so that the agent's configuration does not depend on its working directory.
    let dir = fs::canonicalize(&dir).map_err(|e| CliError::io("resolve", &dir, e))?;
    Ok((dir, None))
}

/// Runs `demo`.
pub fn run(args: Args, ctx: &Context, out: &mut dyn Write) -> Result<(), CliError> {
    let (dir, temp) = prepare(args.dir)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::io("start", "the async runtime", e))?;
    if !ctx.json {
        let kept = if temp.is_some() {
            "removed at the end unless a step fails; --dir DIR keeps it"
        } else {
            "kept"
        };
        emit(
            out,
            format_args!(
                "vibstage demo in {} ({kept}): one host, one depot, one image",
                dir.display()
            ),
        )?;
    }
    let mut demo = Demo {
        out,
        json: ctx.json,
        told: Vec::new(),
        dir: dir.clone(),
        depot: None,
        agent: None,
    };
    let result = runtime.block_on(demo.run());
    // Clean up on every path: the agent first (it may be downloading from the depot).
    let log_tail = demo
        .agent
        .as_ref()
        .map(AgentProcess::log_tail)
        .unwrap_or_default();
    if let Some(mut agent) = demo.agent.take() {
        agent.stop(AGENT_TIMEOUT);
    }
    if let Some(depot) = demo.depot.take() {
        runtime.block_on(depot.stop());
    }
    let Demo { out, told, .. } = demo;
    let passed = result.is_ok();
    if ctx.json {
        emit_json(out, &json!({"dir": dir, "passed": passed, "steps": told}))?;
    }
    match result {
        Ok(()) => {
            if !ctx.json {
                let whereto = if temp.is_some() {
                    "; the temporary folder is removed".to_owned()
                } else {
                    format!("; everything is in {}", dir.display())
                };
                emit(
                    out,
                    format_args!(
                        "demo passed: every step did what it should and the agent is stopped{whereto}"
                    ),
                )?;
            }
            drop(temp);
            Ok(())
        }
        Err(failure) => {
            // Keep the folder: the agent log is the first thing to read.
            let kept = temp.map(tempfile::TempDir::keep);
            if !ctx.json {
                let _ = emit(
                    out,
                    format_args!("demo FAILED at step {}: {}", failure.step, failure.message),
                );
            }
            if !log_tail.is_empty() {
                eprintln!("last lines of the agent log:\n{log_tail}");
            }
            let folder = kept.unwrap_or(dir);
            Err(CliError::Failed {
                code: failure.code,
                message: format!(
                    "demo step {} failed: {} (folder kept: {})",
                    failure.step,
                    failure.message,
                    folder.display()
                ),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_non_empty_dir_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join("x"), b"").expect("write");
        let err = prepare(Some(dir.path().to_owned())).expect_err("not empty");
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("not empty"), "{err}");
        let fresh = dir.path().join("new");
        let (made, temp) = prepare(Some(fresh.clone())).expect("new dir");
        assert!(temp.is_none());
        assert!(made.is_dir() && made.is_absolute());
    }
}
