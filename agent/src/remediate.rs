//! Remediation (SPEC §6 R2, R6, R7, R8, R10; §4 `[maintenance]`, `[install]`): stage whatever is
//! missing (firmware included), and only then enter maintenance mode, install, and leave
//! maintenance mode.
//!
//! Crash safety: maintenance mode is persisted as soon as it is entered and cleared only after the
//! exit command succeeded, so a restarted agent reports it truthfully and leaves it only through
//! the exit command. The built-in installer writes the new image into its own bank under
//! `state_dir/bootbank/` and switches `bootbank/current` (a symlink) with one atomic rename; the
//! installed image is whatever that link names, so a crash leaves the old image or the new one,
//! never a mix.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use vibstage_protocol::api::{ImageRef, Impact, Notification};
use vibstage_protocol::{Envelope, ErrorCode, VerifiedImage, VibTarget};

use crate::agent::{Agent, AgentError, lock};
use crate::fsutil;
use crate::stage::{StageProgress, parts_of};
use crate::state::InstalledImage;

fn failed(code: ErrorCode, message: impl Into<String>) -> AgentError {
    AgentError::new(code, message)
}

/// Runs a hook command with a time limit; the child is killed if the limit passes.
async fn run_command(
    what: &str,
    argv: &[String],
    extra: &[PathBuf],
    timeout: Duration,
    code: ErrorCode,
) -> Result<(), AgentError> {
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
        .map_err(|e| failed(code, format!("{what}: cannot run {program}: {e}")))?;
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(failed(code, format!("{what}: {program} failed ({status})"))),
        Ok(Err(e)) => Err(failed(code, format!("{what}: waiting for {program}: {e}"))),
        Err(_) => {
            let _ = child.kill().await;
            Err(failed(
                code,
                format!(
                    "{what}: {program} did not finish within {}s",
                    timeout.as_secs()
                ),
            ))
        }
    }
}

/// The bank directory of the built-in installer.
pub fn bootbank(state_dir: &Path) -> PathBuf {
    state_dir.join("bootbank")
}

/// Reads the installed image from `bootbank/current`, if the built-in installer installed one.
pub fn read_current_bank(state_dir: &Path) -> io::Result<Option<InstalledImage>> {
    let manifest = bootbank(state_dir).join("current/manifest.json");
    match std::fs::read(&manifest) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(io::Error::other),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes a new bank with `files` (name, source) and the manifest, then switches `current` to
/// it atomically and removes other banks.
fn install_bank(
    state_dir: &Path,
    installed: &InstalledImage,
    files: &[(String, PathBuf)],
) -> io::Result<()> {
    let root = bootbank(state_dir);
    let mut fixed = Vec::new();
    fsutil::ensure_private_dir(&root, &mut fixed).map_err(io::Error::other)?;
    let name = format!("bank-{}", installed.image.digest.hex());
    let bank = root.join(&name);
    let _ = std::fs::remove_dir_all(&bank);
    std::fs::create_dir(&bank)?;
    for (file, source) in files {
        let target = bank.join(file);
        std::fs::copy(source, &target)?;
        std::fs::File::open(&target)?.sync_all()?;
    }
    fsutil::write_json(&bank.join("manifest.json"), installed)?;
    fsutil::fsync_dir(&bank)?;
    let tmp = root.join(".current.tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&name, &tmp)?;
    std::fs::rename(&tmp, root.join("current"))?;
    fsutil::fsync_dir(&root)?;
    for entry in std::fs::read_dir(&root)?.flatten() {
        let n = entry.file_name();
        if n.to_string_lossy().starts_with("bank-") && n != name.as_str() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    Ok(())
}

impl Agent {
    /// The remediation task's body.
    pub(crate) async fn run_remediation(
        self: &Arc<Self>,
        task_id: &str,
        env: &Envelope,
        image: &VerifiedImage,
        depot: &str,
        progress: &StageProgress,
    ) -> Result<Vec<Notification>, AgentError> {
        let step = |s: &str| {
            tracing::info!(task = task_id, step = s, "remediation");
            self.tasks.update(task_id, |t| t.step = Some(s.to_owned()));
        };
        // An earlier remediation installed this image and was cut short (the agent killed)
        // before it left maintenance mode: only its last steps remain.
        let finishing = {
            let state = lock(&self.state);
            state.maintenance_active
                && state
                    .installed
                    .as_ref()
                    .is_some_and(|i| i.image.digest == image.digest)
        };
        if finishing {
            step("exiting maintenance mode");
            self.maintenance(false).await?;
            self.stager.stores().remove(&image.digest)?;
            return Ok(Vec::new());
        }
        let (installed_vibs, impact) = {
            let state = lock(&self.state);
            (state.installed_vibs(), self.evaluate(image, &state).impact)
        };

        // R2, R10: stage whatever is missing; R6: now including firmware of any vendor.
        step("staging");
        let mut policy = self.host_policy();
        policy.firmware_vendors = image
            .vibs
            .iter()
            .map(|v| v.descriptor.vendor.clone())
            .collect();
        self.stager
            .stage(env, image, depot, &installed_vibs, &policy, progress)
            .await?;
        let stores = self.stager.stores();
        let Some((store, _, record)) = stores.find(&image.digest)? else {
            return Err(failed(ErrorCode::Internal, "staged image record vanished"));
        };
        let parts = parts_of(&record, store);
        if !parts.staged {
            let why: Vec<&str> = record
                .notifications
                .iter()
                .map(|n| n.message.as_str())
                .collect();
            return Err(failed(
                ErrorCode::DepotUnreachable,
                format!(
                    "not everything could be staged, so maintenance mode was not entered: {}",
                    why.join("; ")
                ),
            ));
        }

        // R7: maintenance mode only now that staging is complete (and only once: a host left in
        // maintenance mode by an interrupted remediation is already there).
        step("entering maintenance mode");
        if !lock(&self.state).maintenance_active
            && let Err(e) = self.maintenance(true).await
        {
            // Undo whatever part of the entry happened.
            let _ = self.maintenance(false).await;
            return Err(e);
        }

        step("installing");
        let installed = self.install(image, &record, store).await;
        if let Ok(new) = &installed {
            let mut state = lock(&self.state);
            state.installed = Some(new.clone());
            state.reboot_required = impact == Impact::Reboot;
            self.save(&state)?;
        }

        step("exiting maintenance mode");
        let exited = self.maintenance(false).await;
        installed?;
        exited?;

        // After a successful remediation the image's staged content is removed.
        stores.remove(&image.digest)?;
        Ok(record
            .notifications
            .into_iter()
            .filter(|n| !n.code.starts_with("firmware_staging"))
            .collect())
    }

    /// Runs the `maintenance.enter` (or `exit`) command, then records the new mode.
    async fn maintenance(&self, enter: bool) -> Result<(), AgentError> {
        let m = &self.config.maintenance;
        let (what, argv) = if enter {
            ("maintenance.enter", &m.enter)
        } else {
            ("maintenance.exit", &m.exit)
        };
        let timeout = Duration::from_secs(m.timeout_secs);
        run_command(what, argv, &[], timeout, ErrorCode::MaintenanceFailed).await?;
        let mut state = lock(&self.state);
        state.maintenance_active = enter;
        self.save(&state)
    }

    async fn install(
        &self,
        image: &VerifiedImage,
        record: &crate::store::ImageRecord,
        store: &crate::store::Store,
    ) -> Result<InstalledImage, AgentError> {
        let has_dpus = self.host_policy().has_dpus;
        let installed = InstalledImage {
            image: ImageRef {
                name: image.image.name.clone(),
                serial: image.image.serial,
                digest: image.digest,
            },
            base_image: image.image.base_image.clone(),
            components: image
                .image
                .components
                .iter()
                .map(|c| (c.name.clone(), c.version.clone()))
                .collect::<BTreeMap<_, _>>(),
            vibs: image
                .vibs
                .iter()
                .map(|v| &v.descriptor)
                .filter(|d| d.target == VibTarget::Host || has_dpus)
                .map(|d| d.sha256)
                .collect::<BTreeSet<_>>(),
        };
        let files: Vec<(String, PathBuf)> = record
            .vibs
            .iter()
            .map(|v| {
                (
                    format!("{}-{}.vib", v.name, v.sha256),
                    store.blob_path(&v.sha256),
                )
            })
            .collect();
        if !self.config.install.command.is_empty() {
            let paths: Vec<PathBuf> = files.iter().map(|(_, p)| p.clone()).collect();
            run_command(
                "install.command",
                &self.config.install.command,
                &paths,
                Duration::from_secs(self.config.maintenance.timeout_secs),
                ErrorCode::InstallFailed,
            )
            .await?;
            return Ok(installed);
        }
        let state_dir = self.config.agent.state_dir.clone();
        let manifest = installed.clone();
        tokio::task::spawn_blocking(move || install_bank(&state_dir, &manifest, &files))
            .await
            .map_err(|e| failed(ErrorCode::Internal, format!("installer task: {e}")))?
            .map_err(|e| failed(ErrorCode::InstallFailed, format!("built-in installer: {e}")))?;
        Ok(installed)
    }
}
