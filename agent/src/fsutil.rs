//! Small filesystem primitives with the durability rules of SPEC §7: a state file is replaced
//! atomically (write a temporary file, fsync, rename, fsync the directory), and a directory the
//! agent keeps secrets in belongs to it alone.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// fsyncs a directory, making renames and creations inside it durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Atomically replaces `path` with `bytes` (mode `mode`): temporary file in the same directory,
/// fsync, rename over, fsync the directory. A crash leaves the old or the new file, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        fsync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// [`write_atomic`] of a value as pretty JSON, mode 0600.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    write_atomic(path, &bytes, 0o600)
}

/// What reading a JSON state file found.
#[derive(Debug)]
pub enum Loaded<T> {
    /// The file parsed.
    Ok(T),
    /// There is no file.
    Missing,
    /// The file was corrupt and was moved aside to the given path.
    Quarantined(PathBuf, String),
}

/// Reads a JSON state file. A corrupt or truncated file is renamed to `<name>.broken` (never
/// deleted: an operator may want it) so that the caller can rebuild state from what is on disk.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> io::Result<Loaded<T>> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Loaded::Missing),
        Err(e) => return Err(e),
    };
    match serde_json::from_slice(&bytes) {
        Ok(v) => Ok(Loaded::Ok(v)),
        Err(e) => {
            let mut aside = path.as_os_str().to_owned();
            aside.push(".broken");
            let aside = PathBuf::from(aside);
            fs::rename(path, &aside)?;
            Ok(Loaded::Quarantined(aside, e.to_string()))
        }
    }
}

/// Why a private directory could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PrivateDirError {
    /// I/O on the directory failed.
    #[error("failed to prepare {path}: {source}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The path exists but is not a plain directory, or belongs to someone else.
    #[error("refusing to use {path}: {reason}")]
    Insecure {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// Creates `path` (and parents) as a directory owned by the current user with mode 0700, or
/// checks an existing one: a symlink, a non-directory or a foreign owner is refused; looser
/// permissions are tightened (and reported through `fixed`).
pub fn ensure_private_dir(path: &Path, fixed: &mut Vec<String>) -> Result<(), PrivateDirError> {
    let io_err = |source| PrivateDirError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io_err)?;
    }
    match fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err(e)),
    }
    let meta = fs::symlink_metadata(path).map_err(io_err)?;
    let insecure = |reason: String| PrivateDirError::Insecure {
        path: path.to_owned(),
        reason,
    };
    if !meta.file_type().is_dir() {
        return Err(insecure("not a directory (or a symlink)".into()));
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(insecure(format!(
            "owned by uid {}, not by the agent (uid {me})",
            meta.uid()
        )));
    }
    if meta.mode() & 0o7777 != 0o700 {
        fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(io_err)?;
        fixed.push(format!(
            "{}: mode {:o} tightened to 700",
            path.display(),
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_quarantines_corrupt_json() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("state.json");
        write_json(&p, &vec![1, 2, 3]).expect("write");
        assert!(matches!(read_json::<Vec<u8>>(&p), Ok(Loaded::Ok(v)) if v == vec![1, 2, 3]));
        assert_eq!(fs::metadata(&p).expect("meta").mode() & 0o777, 0o600);
        fs::write(&p, b"[1, 2").expect("corrupt");
        assert!(matches!(
            read_json::<Vec<u8>>(&p),
            Ok(Loaded::Quarantined(..))
        ));
        assert!(dir.path().join("state.json.broken").exists());
        assert!(matches!(read_json::<Vec<u8>>(&p), Ok(Loaded::Missing)));
    }

    #[test]
    fn private_dir_is_tightened() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("a/b");
        fs::create_dir_all(&p).expect("mkdir");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).expect("chmod");
        let mut fixed = Vec::new();
        ensure_private_dir(&p, &mut fixed).expect("ok");
        assert_eq!(fixed.len(), 1);
        assert_eq!(fs::metadata(&p).expect("meta").mode() & 0o7777, 0o700);
        let f = dir.path().join("file");
        fs::write(&f, b"").expect("file");
        assert!(ensure_private_dir(&f, &mut fixed).is_err());
    }
}
