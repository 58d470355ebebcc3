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
use vibstage_protocol::{Digest, Envelope, ErrorCode, VerifiedImage, VibTarget};

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

/// The paths `install.command` gets: for a real VIB, a symbolic link named as the VIB names its
/// own file (`vendor_type_name_version.vib`, what `esxcli software vib install -v` expects to
/// see) in a fresh root-only directory under `state_dir`, removed when the returned guard drops;
/// for any other blob, the blob's own path as before.
fn real_names(
    state_dir: &Path,
    blobs: Vec<PathBuf>,
) -> io::Result<(Option<tempfile::TempDir>, Vec<PathBuf>)> {
    let mut dir: Option<tempfile::TempDir> = None;
    let mut out = Vec::with_capacity(blobs.len());
    let limits = crate::vib::Limits::default();
    for blob in blobs {
        let file = fsutil_open_ro(&blob)?;
        let name = crate::vib::read_descriptor(io::BufReader::new(file), &limits)
            .ok()
            .flatten()
            .map(|x| x.file_name())
            .filter(|n| crate::vib::check_member_name(n).is_ok());
        let Some(name) = name else {
            out.push(blob);
            continue;
        };
        if dir.is_none() {
            dir = Some(
                tempfile::Builder::new()
                    .prefix("install-")
                    .tempdir_in(state_dir)?,
            );
        }
        let Some(d) = dir.as_ref() else {
            out.push(blob);
            continue;
        };
        let link = d.path().join(&name);
        if link.symlink_metadata().is_ok() {
            // Two staged VIBs naming themselves alike: keep the blob path for the second.
            out.push(blob);
            continue;
        }
        std::os::unix::fs::symlink(&blob, &link)?;
        out.push(link);
    }
    Ok((dir, out))
}

fn fsutil_open_ro(path: &Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
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

/// One file of a bank: its name in the bank, its digest, and where its bytes come from.
#[derive(Debug, Clone)]
struct BankFile {
    name: String,
    sha256: Digest,
    source: PathBuf,
}

/// The files of the current bank by digest (file names end in `-<hex>.vib`).
fn current_bank_files(state_dir: &Path) -> io::Result<BTreeMap<Digest, PathBuf>> {
    let current = bootbank(state_dir).join("current");
    let mut out = BTreeMap::new();
    let entries = match std::fs::read_dir(&current) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        if let Some(digest) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.strip_suffix(".vib"))
            .and_then(|n| n.rsplit_once('-'))
            .and_then(|(_, hex)| hex.parse::<Digest>().ok())
        {
            out.insert(digest, entry.path());
        }
    }
    Ok(out)
}

/// Checks a bank against its manifest: exactly one file per VIB the manifest lists, each
/// hashing to its digest, and nothing else but the manifest.
pub fn check_bank(bank: &Path, manifest: &InstalledImage) -> io::Result<()> {
    let bad = |what: String| io::Error::other(format!("bank {}: {what}", bank.display()));
    let mut seen = BTreeSet::new();
    for entry in std::fs::read_dir(bank)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            return Err(bad(format!("unexpected file {:?}", entry.file_name())));
        };
        if name == "manifest.json" {
            continue;
        }
        let digest = name
            .strip_suffix(".vib")
            .and_then(|n| n.rsplit_once('-'))
            .and_then(|(_, hex)| hex.parse::<Digest>().ok())
            .ok_or_else(|| bad(format!("unexpected file {name}")))?;
        if !manifest.vibs.contains(&digest) {
            return Err(bad(format!("{name} is not in the manifest")));
        }
        if !entry.file_type()?.is_file() || crate::store::hash_file(&entry.path())? != digest {
            return Err(bad(format!(
                "{name} does not hold the bytes of sha256:{digest}"
            )));
        }
        if !seen.insert(digest) {
            return Err(bad(format!("sha256:{digest} is there twice")));
        }
    }
    if let Some(missing) = manifest.vibs.iter().find(|d| !seen.contains(*d)) {
        return Err(bad(format!("no file for sha256:{missing} of the manifest")));
    }
    Ok(())
}

/// Writes a new bank with `files` and the manifest, checks it against the manifest, then
/// switches `current` to it atomically and removes other banks.
fn install_bank(
    state_dir: &Path,
    installed: &InstalledImage,
    files: &[BankFile],
) -> io::Result<()> {
    let root = bootbank(state_dir);
    let mut fixed = Vec::new();
    fsutil::ensure_private_dir(&root, &mut fixed).map_err(io::Error::other)?;
    let name = format!("bank-{}", installed.image.digest.hex());
    let bank = root.join(&name);
    match std::fs::remove_dir_all(&bank) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    fsutil::create_private_dir(&bank)?;
    for file in files {
        fsutil::copy_new(&file.source, &bank.join(&file.name), 0o400)?;
    }
    fsutil::write_json(&bank.join("manifest.json"), installed)?;
    fsutil::fsync_dir(&bank)?;
    // The old bank is deleted below: the new one must be whole before `current` names it.
    check_bank(&bank, installed)?;
    fsutil::symlink_atomic(Path::new(&name), &root.join("current"))?;
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
        depots: &[reqwest::Url],
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
            .stage(env, image, depots, &installed_vibs, &policy, progress)
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
        // Whatever happens from here on, maintenance mode is left through the exit command:
        // a failure to record the install must not keep the host out of service (issue 11,
        // item 3). The memory state says what the installer did; if the state file cannot be
        // written, the next save writes it, and the built-in installer's bank (what start-up
        // reads) already says the same.
        let recorded = match &installed {
            Ok(new) => {
                let mut state = lock(&self.state);
                state.installed = Some(new.clone());
                state.reboot_required = impact == Impact::Reboot;
                self.save(&state).map_err(|e| {
                    failed(
                        ErrorCode::Internal,
                        format!("image {} was installed, but {}", image.digest, e.0.message),
                    )
                })
            }
            Err(_) => Ok(()),
        };

        step("exiting maintenance mode");
        let exited = self.maintenance(false).await;
        installed?;
        recorded?;
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
        if enter {
            // Recorded before the hook runs: an agent killed while `enter` runs (the hook may
            // finish without it) must come back knowing the host may be in maintenance mode,
            // and leave it only through `exit`. A failed `enter` is undone by the caller, which
            // runs `exit` and records the mode as left.
            self.set_maintenance(true)?;
            return run_command(what, argv, &[], timeout, ErrorCode::MaintenanceFailed).await;
        }
        run_command(what, argv, &[], timeout, ErrorCode::MaintenanceFailed).await?;
        self.set_maintenance(false)
    }

    /// Records maintenance mode. Entering is recorded on disk before the hook runs (if that
    /// fails, the hook does not run and nothing changes); leaving is recorded after the exit
    /// hook ran, in memory whatever the disk does, since the host did leave it.
    fn set_maintenance(&self, active: bool) -> Result<(), AgentError> {
        let mut state = lock(&self.state);
        if active {
            let mut next = state.clone();
            next.maintenance_active = true;
            self.save(&next)?;
            *state = next;
            Ok(())
        } else {
            state.maintenance_active = false;
            self.save(&state)
        }
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
        if !self.config.install.command.is_empty() {
            // An installer command is given what was staged: the VIBs that change, real VIBs
            // under their real file names (issue 14, item 4).
            let blobs: Vec<PathBuf> = record
                .vibs
                .iter()
                .map(|v| store.blob_path(&v.sha256))
                .collect();
            let state_dir = self.config.agent.state_dir.clone();
            let (links, paths) = tokio::task::spawn_blocking(move || real_names(&state_dir, blobs))
                .await
                .map_err(|e| failed(ErrorCode::Internal, format!("installer task: {e}")))?
                .map_err(|e| {
                    failed(
                        ErrorCode::InstallFailed,
                        format!("install.command: cannot name the staged VIBs: {e}"),
                    )
                })?;
            let result = run_command(
                "install.command",
                &self.config.install.command,
                &paths,
                Duration::from_secs(self.config.maintenance.timeout_secs),
                ErrorCode::InstallFailed,
            )
            .await;
            drop(links);
            result?;
            return Ok(installed);
        }
        // The built-in installer's bank holds the whole image: VIBs that were staged come from
        // the store, the ones the image keeps unchanged (never staged, since they are
        // installed) are carried over from the current bank (issue 11, item 2); both are
        // checked against their digests before the switch.
        let state_dir = self.config.agent.state_dir.clone();
        let current = current_bank_files(&state_dir).map_err(|e| {
            failed(
                ErrorCode::InstallFailed,
                format!("built-in installer: cannot read the installed bank: {e}"),
            )
        })?;
        let mut files = Vec::new();
        for d in image
            .vibs
            .iter()
            .map(|v| &v.descriptor)
            .filter(|d| installed.vibs.contains(&d.sha256))
        {
            let source = if store.has_blob(&d.sha256, d.size) {
                store.blob_path(&d.sha256)
            } else if let Some(path) = current.get(&d.sha256) {
                path.clone()
            } else {
                return Err(failed(
                    ErrorCode::InstallFailed,
                    format!(
                        "built-in installer: VIB {} (sha256:{}) is neither staged nor in the installed bank",
                        d.name, d.sha256
                    ),
                ));
            };
            if files.iter().any(|f: &BankFile| f.sha256 == d.sha256) {
                continue;
            }
            files.push(BankFile {
                name: format!("{}-{}.vib", d.name, d.sha256),
                sha256: d.sha256,
                source,
            });
        }
        let manifest = installed.clone();
        tokio::task::spawn_blocking(move || install_bank(&state_dir, &manifest, &files))
            .await
            .map_err(|e| failed(ErrorCode::Internal, format!("installer task: {e}")))?
            .map_err(|e| failed(ErrorCode::InstallFailed, format!("built-in installer: {e}")))?;
        Ok(installed)
    }
}
