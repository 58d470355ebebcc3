//! Files the controller writes (keys, certificates, depot documents) and reads (keys): atomic
//! writes with the mode given, directories created with theirs.

use std::ffi::OsString;
use std::fs::{self, File, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use crate::error::{CliError, io_message};

/// `path` with `ext` appended to its file name (`keys/image` + `key` = `keys/image.key`), even
/// when the name already contains dots.
pub fn with_suffix(path: &Path, ext: &str) -> PathBuf {
    let mut s: OsString = path.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

/// Creates `dir` (and missing parents) if it does not exist, giving the directory itself `mode`
/// regardless of the umask. An existing directory is left as it is.
pub fn ensure_dir(dir: &Path, mode: u32) -> Result<(), CliError> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::create_dir_all(dir).map_err(|e| CliError::io("create directory", dir, e))?;
    fs::set_permissions(dir, Permissions::from_mode(mode))
        .map_err(|e| CliError::io("set permissions of", dir, e))
}

/// fsyncs a directory so that a rename into it survives a crash.
pub fn sync_dir(dir: &Path) -> Result<(), CliError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| CliError::io("sync directory", dir, e))
}

/// The directory a file path lives in (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// How [`write_file`] treats an existing file at the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Existing {
    /// Refuse: the destination must not exist (keys, certificates).
    Refuse,
    /// Replace it atomically (depot documents).
    Replace,
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory with `mode`,
/// fsync, then a rename (or a no-clobber link for [`Existing::Refuse`]) and a directory fsync.
/// Readers see the old file or the whole new one, never a part.
pub fn write_file(
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
pub fn read_config_text(what: &'static str, path: &Path) -> Result<String, CliError> {
    fs::read_to_string(path).map_err(|e| CliError::config(what, path, io_message(&e)))
}

/// Loads an ed25519 private key (PKCS#8 PEM).
pub fn load_signing_key(path: &Path) -> Result<ed25519_dalek::SigningKey, CliError> {
    let pem = read_config_text("key", path)?;
    vibstage_protocol::dsse::signing_key_from_pem(&pem)
        .map_err(|e| CliError::config("key", path, e))
}

/// Loads an ed25519 public key (SPKI PEM).
pub fn load_verifying_key(path: &Path) -> Result<ed25519_dalek::VerifyingKey, CliError> {
    let pem = read_config_text("public key", path)?;
    vibstage_protocol::dsse::verifying_key_from_pem(&pem)
        .map_err(|e| CliError::config("public key", path, e))
}
