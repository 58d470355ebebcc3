//! Small filesystem primitives with the durability rules of SPEC §7 and the trust rules of a
//! root daemon.
//!
//! Durability: a state file is replaced atomically (write a temporary file, fsync, rename, fsync
//! the directory). Trust (OpenSSH's StrictModes, systemd's `chase()`): every file the agent
//! creates is created exclusively (`O_EXCL`) under a random temporary name and opened with
//! `O_NOFOLLOW`, so nothing planted in a directory can redirect a write; and a directory the
//! agent keeps its state in must be its own, writable by nobody else, under parents nobody else
//! can write either (a sticky, world-writable parent such as `/tmp` is fine: others cannot move
//! what is in it). Such a directory that is or was writable by others is refused, never
//! "fixed": whatever was planted in it while it was open would still be there. With every
//! directory on the way trusted, the paths the agent uses cannot change under it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// fsyncs a directory, making renames and creations inside it durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECTORY | nix::libc::O_NOFOLLOW)
        .open(dir)?
        .sync_all()
}

/// A name for a temporary file beside `path` that nobody can predict: `.<name>.<random>.tmp`.
fn temporary_beside(path: &Path) -> io::Result<PathBuf> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let mut random = [0u8; 8];
    getrandom::fill(&mut random).map_err(|e| io::Error::other(e.to_string()))?;
    Ok(dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        hex::encode(random)
    )))
}

/// Opens `path` for reading and writing, creating it (mode 0600) if it is missing, never
/// truncating it and never through a symlink: the store's lock file and partial downloads.
pub fn open_private_rw(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
}

/// Creates a new file (never an existing one, never through a symlink) with `mode`.
pub fn create_new(path: &Path, mode: u32) -> io::Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)?;
    // The umask may have taken bits away; never added any.
    file.set_permissions(fs::Permissions::from_mode(mode))?;
    Ok(file)
}

/// Opens a file for reading without following a symlink in its last component.
pub fn open_nofollow(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
}

/// Atomically replaces `path` with `bytes` (mode `mode`): temporary file in the same directory,
/// fsync, rename over, fsync the directory. A crash leaves the old or the new file, never a mix.
/// The rename replaces `path` itself, even if it is a symlink.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = temporary_beside(path)?;
    let result = (|| {
        let mut f = create_new(&tmp, mode)?;
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

/// Copies `source` into a new file `target` (created exclusively, mode `mode`) and fsyncs it.
pub fn copy_new(source: &Path, target: &Path, mode: u32) -> io::Result<()> {
    let mut from = open_nofollow(source)?;
    let mut to = create_new(target, mode)?;
    io::copy(&mut from, &mut to)?;
    to.sync_all()
}

/// Points the symlink `link` at `target` atomically: a new link under a random name, renamed
/// over `link`, the directory fsynced.
pub fn symlink_atomic(target: &Path, link: &Path) -> io::Result<()> {
    let dir = link.parent().unwrap_or(Path::new("."));
    let tmp = temporary_beside(link)?;
    std::os::unix::fs::symlink(target, &tmp)?;
    if let Err(e) = fs::rename(&tmp, link) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fsync_dir(dir)
}

/// Creates a new directory with mode 0700; an existing one is an error.
pub fn create_private_dir(path: &Path) -> io::Result<()> {
    fs::DirBuilder::new().mode(0o700).create(path)
}

/// Most bytes read from a configuration-named file (keys, certificates, CAs, agent.toml): far
/// more than any of them holds, far less than would hurt.
pub const MAX_CONFIG_FILE: u64 = 1 << 20;

/// Reads a small regular file named by the configuration: anything else (`/dev/zero`, a FIFO, a
/// directory) or anything larger than `max` bytes is refused with a message saying which, so
/// that a mistake in agent.toml cannot make the agent read for ever.
pub fn read_config_file(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let file = File::open(path)?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    let mut bytes = Vec::new();
    io::Read::read_to_end(&mut io::Read::take(file, max + 1), &mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {max} bytes"),
        ));
    }
    Ok(bytes)
}

/// [`read_config_file`] as UTF-8 text.
pub fn read_config_text(path: &Path, max: u64) -> io::Result<String> {
    String::from_utf8(read_config_file(path, max)?)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8 text"))
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
    let mut bytes = Vec::new();
    match open_nofollow(path).and_then(|mut f| io::Read::read_to_end(&mut f, &mut bytes)) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Loaded::Missing),
        Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => {
            return Err(io::Error::other(format!(
                "{} is a symlink; the agent never follows one it did not make",
                path.display()
            )));
        }
        Err(e) => return Err(e),
    }
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
        /// The underlying error: what the OS or library said, kept as `source()`.
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

/// Checks that nobody but the agent (or root) can change what `dir` and its parents hold:
/// each is owned by root or the agent, and not writable by group or others unless it is
/// sticky (like `/tmp`: others may add entries but not move or replace the agent's).
pub fn check_ancestors(dir: &Path) -> Result<(), PrivateDirError> {
    let real = fs::canonicalize(dir).map_err(|source| PrivateDirError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let me = nix::unistd::geteuid().as_raw();
    // The directories named on the way (one of them may hold a symlink the path goes through)
    // and those the path really resolves to.
    let named = dir.ancestors().filter(|a| !a.as_os_str().is_empty());
    for ancestor in named.chain(real.ancestors()) {
        let meta = fs::metadata(ancestor).map_err(|source| PrivateDirError::Io {
            path: ancestor.to_owned(),
            source,
        })?;
        let insecure = |reason: String| PrivateDirError::Insecure {
            path: ancestor.to_owned(),
            reason,
        };
        if meta.uid() != 0 && meta.uid() != me {
            return Err(insecure(format!(
                "a parent directory owned by uid {}, who could replace what the agent keeps below it",
                meta.uid()
            )));
        }
        let sticky = meta.mode() & 0o1000 != 0;
        if meta.mode() & 0o022 != 0 && !sticky {
            return Err(insecure(format!(
                "a parent directory writable by group or others (mode {:o}), who could replace what the agent keeps below it",
                meta.mode() & 0o7777
            )));
        }
    }
    Ok(())
}

/// Creates `path` (and parents) as a directory owned by the current user with mode 0700, or
/// checks an existing one. Refused, naming the path and what is wrong: a symlink or
/// non-directory, a foreign owner, group or other write permission (something may have been
/// planted while it was open), a parent others can write ([`check_ancestors`]). Read or search
/// permission for others is taken away (reported through `fixed`, for the log).
pub fn ensure_private_dir(path: &Path, fixed: &mut Vec<String>) -> Result<(), PrivateDirError> {
    let io_err = |source| PrivateDirError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(io_err)?;
        check_ancestors(parent)?;
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
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(insecure(format!(
            "writable by group or others (mode {mode:o}): files may have been planted in it; \
             check its contents, then `chmod 700` it or remove it"
        )));
    }
    if mode != 0o700 {
        fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(io_err)?;
        fixed.push(format!(
            "{}: mode {mode:o} tightened to 700",
            path.display()
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

    // Issue 11, item 4: root must never write through a link someone planted.

    #[test]
    fn planted_temporary_file_symlink_is_not_written_through() {
        let dir = tempfile::tempdir().expect("tempdir");
        let victim = dir.path().join("victim");
        fs::write(&victim, b"precious").expect("victim");
        let state = dir.path().join("state.json");
        // The temporary name the agent used to use, and one planted at the target itself.
        std::os::unix::fs::symlink(&victim, dir.path().join(".state.json.tmp")).expect("plant");
        write_json(&state, &vec![1]).expect("write");
        assert_eq!(fs::read(&victim).expect("victim"), b"precious");
        fs::remove_file(&state).expect("rm");
        std::os::unix::fs::symlink(&victim, &state).expect("plant");
        let err = read_json::<Vec<u8>>(&state).expect_err("a symlink is refused");
        assert!(err.to_string().contains("symlink"), "{err}");
        write_json(&state, &vec![2]).expect("replaces the link itself");
        assert!(
            !fs::symlink_metadata(&state)
                .expect("meta")
                .file_type()
                .is_symlink()
        );
        assert_eq!(fs::read(&victim).expect("victim"), b"precious");
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .expect("ls")
            .flatten()
            .filter(|e| {
                e.file_name().to_string_lossy().ends_with(".tmp")
                    && !e.file_type().is_ok_and(|t| t.is_symlink())
            })
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn directory_writable_by_others_is_refused_not_tightened() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("state");
        fs::create_dir(&p).expect("mkdir");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o777)).expect("chmod");
        let err = ensure_private_dir(&p, &mut Vec::new()).expect_err("refused");
        let text = err.to_string();
        assert!(
            text.contains(&p.display().to_string()) && text.contains("writable"),
            "{text}"
        );
        assert_eq!(
            fs::metadata(&p).expect("meta").mode() & 0o7777,
            0o777,
            "left as found"
        );
    }

    #[test]
    fn directory_under_a_parent_others_can_write_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let parent = dir.path().join("shared");
        fs::create_dir(&parent).expect("mkdir");
        fs::set_permissions(&parent, fs::Permissions::from_mode(0o775)).expect("chmod");
        let err = ensure_private_dir(&parent.join("state"), &mut Vec::new()).expect_err("refused");
        assert!(
            err.to_string().contains("parent directory writable"),
            "{err}"
        );
        // Sticky and world-writable (like /tmp) is fine.
        fs::set_permissions(&parent, fs::Permissions::from_mode(0o1777)).expect("chmod");
        ensure_private_dir(&parent.join("state"), &mut Vec::new()).expect("sticky parent");
        // A parent owned by someone else is not.
        let theirs = dir.path().join("theirs");
        fs::create_dir(&theirs).expect("mkdir");
        nix::unistd::chown(&theirs, Some(nix::unistd::Uid::from_raw(65534)), None).expect("chown");
        let err = ensure_private_dir(&theirs.join("state"), &mut Vec::new()).expect_err("refused");
        assert!(err.to_string().contains("owned by uid 65534"), "{err}");
    }
}
