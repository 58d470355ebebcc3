//! Installing an image (SPEC §4 `[install]`): the configured installer command, or the built-in
//! installer, which writes the new image into its own bank under `state_dir/bootbank/` and
//! switches `bootbank/current` (a symlink) with one atomic rename. The installed image is
//! whatever that link names, so a crash leaves the old image or the new one, never a mix; daemon
//! start-up reads it back ([`read_current_bank`]).

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vibstage_protocol::api::ImageRef;
use vibstage_protocol::{Digest, VerifiedImage, VibTarget};

use crate::config::Config;
use crate::fsutil;
use crate::hook;
use crate::state::InstalledImage;

/// Why an installation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InstallError {
    /// The installer command or the built-in installer failed; the message names which and why.
    #[error("{0}")]
    Failed(String),
    /// The blocking installer task panicked or was cancelled.
    #[error("installer task: {0}")]
    Task(#[source] tokio::task::JoinError),
}

/// Installs `image` from what `record` staged in `store`: through `install.command` when one is
/// configured, else with the built-in installer (a new bank under `state_dir/bootbank/`, then
/// the switch of `current`). Returns what is installed now.
pub async fn install(
    config: &Config,
    has_dpus: bool,
    image: &VerifiedImage,
    record: &crate::store::ImageRecord,
    store: &crate::store::Store,
) -> Result<InstalledImage, InstallError> {
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
    if !config.install.command.is_empty() {
        // An installer command is given what was staged: the VIBs that change, real VIBs
        // under their real file names (issue 14, item 4).
        let blobs: Vec<PathBuf> = record
            .vibs
            .iter()
            .map(|v| store.blob_path(&v.sha256))
            .collect();
        let state_dir = config.agent.state_dir.clone();
        let (links, paths) = tokio::task::spawn_blocking(move || real_names(&state_dir, blobs))
            .await
            .map_err(InstallError::Task)?
            .map_err(|e| {
                InstallError::Failed(format!("install.command: cannot name the staged VIBs: {e}"))
            })?;
        let result = hook::run(
            "install.command",
            &config.install.command,
            &paths,
            Duration::from_secs(config.maintenance.timeout_secs),
        )
        .await;
        drop(links);
        result.map_err(InstallError::Failed)?;
        return Ok(installed);
    }
    // The built-in installer's bank holds the whole image: VIBs that were staged come from
    // the store, the ones the image keeps unchanged (never staged, since they are
    // installed) are carried over from the current bank (issue 11, item 2); both are
    // checked against their digests before the switch.
    let state_dir = config.agent.state_dir.clone();
    let current = current_bank_files(&state_dir).map_err(|e| {
        InstallError::Failed(format!(
            "built-in installer: cannot read the installed bank: {e}"
        ))
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
            return Err(InstallError::Failed(format!(
                "built-in installer: VIB {} (sha256:{}) is neither staged nor in the installed bank",
                d.name, d.sha256
            )));
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
        .map_err(InstallError::Task)?
        .map_err(|e| InstallError::Failed(format!("built-in installer: {e}")))?;
    Ok(installed)
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
        let file = open_ro(&blob)?;
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

fn open_ro(path: &Path) -> io::Result<std::fs::File> {
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
