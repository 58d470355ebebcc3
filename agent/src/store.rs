//! The content store of SPEC §7, used for both `scratch.path` and `volatile_path`.
//!
//! ```text
//! <root>/            0700, an exclusive lock on <root>/lock keeps a second agent out
//!   blobs/sha256/<hex>       verified VIB bytes, 0400, content-addressed
//!   ingest/<hex>.partial     downloads in progress, resumable
//!   images/<digest>.json     staged image records, written after all their blobs are in
//! ```
//!
//! Invariant: a file under `blobs/` never holds wrong bytes. Bytes are written to `ingest/`,
//! fsynced, their size and sha256 checked, and only then renamed into `blobs/` (and the directory
//! fsynced). The lock is taken with std's `File::try_lock` (stable since Rust 1.89), which is
//! what fs2's `try_lock_exclusive` did: an `flock(LOCK_EX | LOCK_NB)` released when the process
//! dies, so a killed agent never leaves a stale lock behind.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use time::OffsetDateTime;
use vibstage_protocol::api::{DpuState, FirmwareState, ImageRef, Notification};
use vibstage_protocol::{Digest, Envelope, ImageDigest, Name, VibKind, VibTarget};

use crate::fsutil::{self, Loaded, PrivateDirError};

/// Errors of the content store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store directory is unusable.
    #[error(transparent)]
    Dir(#[from] PrivateDirError),
    /// Another process holds the lock.
    #[error("{path} is locked by another vibstaged (only one agent may use a scratch directory)")]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
    /// The filesystem is full.
    #[error("no space left on the filesystem of {path} while writing {what}")]
    NoSpace {
        /// The file being written.
        path: PathBuf,
        /// What it is.
        what: String,
    },
    /// Bytes written do not hash to the expected digest.
    #[error("checksum mismatch for sha256:{expected}: received bytes hash to sha256:{actual}")]
    Checksum {
        /// The digest wanted.
        expected: Digest,
        /// The digest of what arrived.
        actual: Digest,
    },
    /// More or fewer bytes than the descriptor's size.
    #[error("size mismatch for sha256:{digest}: expected {expected} bytes, {actual}")]
    Size {
        /// The blob.
        digest: Digest,
        /// The size wanted.
        expected: u64,
        /// What happened, in words ("received 12", "received more than 10").
        actual: String,
    },
    /// Any other I/O failure.
    #[error("failed to {action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl StoreError {
    fn io(
        action: &'static str,
        path: &Path,
        source: io::Error,
        what: impl FnOnce() -> String,
    ) -> Self {
        if source.raw_os_error() == Some(nix::libc::ENOSPC) {
            StoreError::NoSpace {
                path: path.to_owned(),
                what: what(),
            }
        } else {
            StoreError::Io {
                action,
                path: path.to_owned(),
                source,
            }
        }
    }
}

/// One VIB of a staged image record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedVib {
    /// VIB name.
    pub name: Name,
    /// Component it belongs to.
    pub component: Name,
    /// Software or firmware.
    pub kind: VibKind,
    /// Host or dpu.
    pub target: VibTarget,
    /// Blob digest.
    pub sha256: Digest,
    /// Blob size.
    pub size: u64,
}

/// A staged image, as recorded in `images/<digest>.json` once all its blobs are in.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The image.
    pub image: ImageRef,
    /// The signed image, kept so that remediation can work from the store alone.
    pub envelope: Envelope,
    /// The VIBs staged for it (software, staged firmware and dpu VIBs).
    pub vibs: Vec<StagedVib>,
    /// Firmware outcome.
    pub firmware: FirmwareState,
    /// DPU outcome.
    pub dpu: DpuState,
    /// Notifications of the staging (why firmware was not staged, …).
    pub notifications: Vec<Notification>,
    /// When staging finished.
    #[serde(with = "time::serde::rfc3339")]
    pub staged_at: OffsetDateTime,
}

impl ImageRecord {
    /// Total bytes of the record's blobs.
    pub fn bytes(&self) -> u64 {
        self.vibs
            .iter()
            .fold(0u64, |acc, v| acc.saturating_add(v.size))
    }
}

/// What [`Store::commit`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// The blob is new in the store.
    New,
    /// The blob was already there; the download was discarded.
    AlreadyPresent,
}

/// What start-up recovery found.
#[derive(Debug, Default)]
pub struct Recovery {
    /// Partial downloads kept for resumption.
    pub partials_kept: usize,
    /// Stray files removed (temporary files, unknown names).
    pub strays_removed: Vec<PathBuf>,
    /// Blobs removed because their bytes were wrong (scrub) or their size was off.
    pub blobs_removed: Vec<Digest>,
    /// Permission fixes made.
    pub fixed: Vec<String>,
    /// Image records that could not be parsed and were moved aside.
    pub records_quarantined: Vec<PathBuf>,
}

/// Free space of the store's filesystem.
#[derive(Debug, Clone, Copy)]
pub struct Space {
    /// Filesystem size.
    pub total: u64,
    /// Bytes available to the agent.
    pub free: u64,
}

/// A content store rooted at one directory, holding that directory's lock.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    /// Held for the store's lifetime; the flock is what keeps a second agent out. Replaced by
    /// [`Store::ensure_layout`] if the directory was removed and re-created under the agent.
    lock: std::sync::Mutex<File>,
}

impl Store {
    /// Opens (creating if needed) the store at `root`, taking its lock and checking that every
    /// directory is the agent's own (mode 0700, owned by the agent's uid).
    pub fn open(root: &Path) -> Result<(Store, Vec<String>), StoreError> {
        let mut fixed = Vec::new();
        fsutil::ensure_private_dir(root, &mut fixed)?;
        let store = Store {
            root: root.to_owned(),
            lock: std::sync::Mutex::new(take_lock(&root.join("lock"))?),
        };
        store.ensure_dirs(&mut fixed)?;
        Ok((store, fixed))
    }

    fn ensure_dirs(&self, fixed: &mut Vec<String>) -> Result<(), StoreError> {
        for dir in [
            self.root.join("blobs"),
            self.blob_dir(),
            self.ingest_dir(),
            self.image_dir(),
        ] {
            fsutil::ensure_private_dir(&dir, fixed)?;
        }
        Ok(())
    }

    /// Re-creates the store's directories and lock if they were removed under the running agent
    /// (an operator wiping scratch): called before each staging run, so that staging recovers
    /// without a restart. The lock is taken again on the new lock file; if another agent took
    /// it meanwhile, this is [`StoreError::Locked`].
    pub fn ensure_layout(&self) -> Result<(), StoreError> {
        let mut fixed = Vec::new();
        fsutil::ensure_private_dir(&self.root, &mut fixed)?;
        let lock_path = self.root.join("lock");
        let mut held = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let same = match (fs::metadata(&lock_path), held.metadata()) {
            (Ok(on_disk), Ok(ours)) => on_disk.ino() == ours.ino() && on_disk.dev() == ours.dev(),
            _ => false,
        };
        if !same {
            *held = take_lock(&lock_path)?;
            tracing::warn!(store = %self.root.display(), "store directory was re-created; lock taken again");
        }
        drop(held);
        self.ensure_dirs(&mut fixed)
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn blob_dir(&self) -> PathBuf {
        self.root.join("blobs/sha256")
    }
    fn ingest_dir(&self) -> PathBuf {
        self.root.join("ingest")
    }
    fn image_dir(&self) -> PathBuf {
        self.root.join("images")
    }

    /// Where a blob lives (whether or not it is there).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blob_dir().join(digest.to_hex())
    }

    fn partial_path(&self, digest: &Digest) -> PathBuf {
        self.ingest_dir()
            .join(format!("{}.partial", digest.to_hex()))
    }

    fn record_path(&self, digest: &ImageDigest) -> PathBuf {
        self.image_dir().join(format!("{digest}.json"))
    }

    /// Whether a blob of this digest and size is present.
    pub fn has_blob(&self, digest: &Digest, size: u64) -> bool {
        fs::symlink_metadata(self.blob_path(digest))
            .is_ok_and(|m| m.file_type().is_file() && m.len() == size)
    }

    /// Bytes already held for a blob: all of it if committed, else the partial download's length.
    pub fn bytes_held(&self, digest: &Digest, size: u64) -> u64 {
        if self.has_blob(digest, size) {
            return size;
        }
        fs::metadata(self.partial_path(digest)).map_or(0, |m| m.len().min(size))
    }

    /// Opens the partial download of a blob, creating it or resuming it. Bytes already in the
    /// partial file are re-hashed so the final check covers every byte.
    pub fn ingest(&self, digest: Digest, size: u64) -> Result<Ingest, StoreError> {
        let path = self.partial_path(&digest);
        let open = || {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .open(&path)
                .map_err(|e| StoreError::io("open", &path, e, || format!("sha256:{digest}")))
        };
        let mut file = open()?;
        // Only a partial the agent wrote is resumed: a regular file of its own with one link.
        // A hard link planted here would make the download write into (and chmod) a file
        // elsewhere; its name is removed (never the file it links to) and the download starts
        // from nothing.
        let meta = file
            .metadata()
            .map_err(|e| StoreError::io("stat", &path, e, String::new))?;
        if !own_single_file(&meta) {
            tracing::warn!(path = %path.display(), links = meta.nlink(), uid = meta.uid(), "a partial download that is not the agent's own file was removed");
            drop(file);
            fs::remove_file(&path).map_err(|e| StoreError::io("remove", &path, e, String::new))?;
            file = open()?;
        }
        let mut ingest = Ingest {
            file: io::BufWriter::with_capacity(
                256 << 10,
                file.try_clone()
                    .map_err(|e| StoreError::io("open", &path, e, String::new))?,
            ),
            path,
            digest,
            size,
            written: 0,
            writeback_from: 0,
            synced_to: 0,
            hasher: Sha256::new(),
        };
        let len = file
            .metadata()
            .map_err(|e| StoreError::io("stat", &ingest.path, e, String::new))?
            .len();
        if len > size {
            ingest.restart()?;
            return Ok(ingest);
        }
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = file
                .read(&mut buf)
                .map_err(|e| StoreError::io("read", &ingest.path, e, String::new))?;
            if n == 0 {
                break;
            }
            ingest.hasher.update(&buf[..n]);
            ingest.written += n as u64;
        }
        ingest.synced_to = ingest.written;
        Ok(ingest)
    }

    /// Makes an ingested blob part of the store: fsync, check size and sha256, read-only, rename
    /// into `blobs/`, fsync the directory. On a mismatch the partial file is deleted.
    pub fn commit(&self, ingest: Ingest) -> Result<Committed, StoreError> {
        let Ingest {
            file,
            path,
            digest,
            size,
            written,
            hasher,
            ..
        } = ingest;
        let discard = |e: StoreError| {
            let _ = fs::remove_file(&path);
            e
        };
        let file = file.into_inner().map_err(|e| {
            discard(StoreError::io("write", &path, e.into_error(), || {
                format!("sha256:{digest}")
            }))
        })?;
        file.sync_all().map_err(|e| {
            discard(StoreError::io("fsync", &path, e, || {
                format!("sha256:{digest}")
            }))
        })?;
        if written != size {
            return Err(discard(StoreError::Size {
                digest,
                expected: size,
                actual: format!("received {written}"),
            }));
        }
        let actual = Digest::from_bytes(hasher.finalize().into());
        if actual != digest {
            return Err(discard(StoreError::Checksum {
                expected: digest,
                actual,
            }));
        }
        file.set_permissions(fs::Permissions::from_mode(0o400))
            .map_err(|e| discard(StoreError::io("chmod", &path, e, String::new)))?;
        drop(file);
        let target = self.blob_path(&digest);
        if self.has_blob(&digest, size) {
            let _ = fs::remove_file(&path);
            return Ok(Committed::AlreadyPresent);
        }
        fs::rename(&path, &target)
            .map_err(|e| discard(StoreError::io("rename into", &target, e, String::new)))?;
        fsutil::fsync_dir(&self.blob_dir())
            .and_then(|()| fsutil::fsync_dir(&self.ingest_dir()))
            .map_err(|e| StoreError::io("fsync", &self.blob_dir(), e, String::new))?;
        Ok(Committed::New)
    }
    /// The first `max` bytes of a blob's partial download (fewer if it is shorter): what a
    /// resumed download already holds of the blob's header (issue 14's descriptor check).
    pub fn partial_prefix(&self, digest: &Digest, max: u64) -> io::Result<Vec<u8>> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(self.partial_path(digest))?;
        let mut out = Vec::new();
        file.take(max).read_to_end(&mut out)?;
        Ok(out)
    }

    /// Removes a partial download (after a failure that makes its bytes useless).
    pub fn discard_partial(&self, digest: &Digest) {
        let _ = fs::remove_file(self.partial_path(digest));
    }

    /// Writes an image record atomically. Call only once all its blobs are committed.
    pub fn write_record(&self, record: &ImageRecord) -> Result<(), StoreError> {
        let path = self.record_path(&record.image.digest);
        fsutil::write_json(&path, record)
            .map_err(|e| StoreError::io("write", &path, e, || "image record".into()))
    }

    /// All image records, sorted by staging time (oldest first). Unparseable records are moved
    /// aside (`.broken`) and reported through `quarantined`.
    pub fn records(&self, quarantined: &mut Vec<PathBuf>) -> Result<Vec<ImageRecord>, StoreError> {
        let dir = self.image_dir();
        let mut out = Vec::new();
        let entries = match fs::read_dir(&dir) {
            // Scratch removed under the agent: nothing is staged there any more.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            other => other.map_err(|e| StoreError::io("list", &dir, e, String::new))?,
        };
        for entry in entries {
            let entry = entry.map_err(|e| StoreError::io("list", &dir, e, String::new))?;
            let path = entry.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let Some(digest) = name
                .strip_suffix(".json")
                .and_then(|d| d.parse::<ImageDigest>().ok())
            else {
                continue;
            };
            // Something else than a file of the agent's (a symlink, a directory, a hard link)
            // is no record: moved aside, never followed, and the agent still starts.
            if !fs::symlink_metadata(&path).is_ok_and(|m| own_single_file(&m)) {
                let aside = path.with_extension("json.broken");
                let _ = fs::rename(&path, &aside);
                quarantined.push(aside);
                continue;
            }
            match fsutil::read_json::<ImageRecord>(&path) {
                Ok(Loaded::Ok(r)) if r.image.digest == digest => out.push(r),
                Ok(Loaded::Ok(_)) => {
                    let aside = path.with_extension("json.broken");
                    let _ = fs::rename(&path, &aside);
                    quarantined.push(aside);
                }
                Ok(Loaded::Quarantined(aside, _)) => quarantined.push(aside),
                Ok(Loaded::Missing) => {}
                Err(e) => return Err(StoreError::io("read", &path, e, String::new)),
            }
        }
        out.sort_by_key(|r| r.staged_at);
        Ok(out)
    }

    /// The record of one image, if staged here.
    pub fn record(&self, digest: &ImageDigest) -> Result<Option<ImageRecord>, StoreError> {
        let path = self.record_path(digest);
        match fsutil::read_json::<ImageRecord>(&path) {
            Ok(Loaded::Ok(r)) => Ok(Some(r)),
            Ok(_) => Ok(None),
            Err(e) => Err(StoreError::io("read", &path, e, String::new)),
        }
    }

    /// Removes an image record, then every blob no remaining record needs. Returns whether the
    /// record existed.
    pub fn remove_image(&self, digest: &ImageDigest) -> Result<bool, StoreError> {
        let path = self.record_path(digest);
        let existed = match fs::remove_file(&path) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(StoreError::io("remove", &path, e, String::new)),
        };
        if existed {
            fsutil::fsync_dir(&self.image_dir())
                .map_err(|e| StoreError::io("fsync", &self.image_dir(), e, String::new))?;
            // Only a removed record can leave blobs unreferenced: a deletion that removed
            // nothing must not collect anything (issue 11, item 1).
            self.collect_garbage(&BTreeSet::new())?;
        }
        Ok(existed)
    }

    /// Deletes blobs that no record references and that are not in `keep`.
    pub fn collect_garbage(&self, keep: &BTreeSet<Digest>) -> Result<Vec<Digest>, StoreError> {
        let mut referenced: BTreeSet<Digest> = keep.clone();
        for r in self.records(&mut Vec::new())? {
            referenced.extend(r.vibs.iter().map(|v| v.sha256));
        }
        let mut removed = Vec::new();
        for digest in self.blob_digests()? {
            if !referenced.contains(&digest) {
                let p = self.blob_path(&digest);
                fs::remove_file(&p).map_err(|e| StoreError::io("remove", &p, e, String::new))?;
                removed.push(digest);
            }
        }
        if !removed.is_empty() {
            fsutil::fsync_dir(&self.blob_dir())
                .map_err(|e| StoreError::io("fsync", &self.blob_dir(), e, String::new))?;
        }
        Ok(removed)
    }

    fn blob_digests(&self) -> Result<Vec<Digest>, StoreError> {
        let dir = self.blob_dir();
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(|e| StoreError::io("list", &dir, e, String::new))? {
            let entry = entry.map_err(|e| StoreError::io("list", &dir, e, String::new))?;
            if let Some(d) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<Digest>().ok())
            {
                out.push(d);
            }
        }
        Ok(out)
    }

    /// Start-up recovery: removes stray files, tightens modes, and with `scrub` re-hashes every
    /// blob, removing any whose bytes are wrong. Partial downloads are kept for resumption unless
    /// `max_partial_age` has passed since they were last written.
    pub fn recover(
        &self,
        scrub: bool,
        max_partial_age: std::time::Duration,
    ) -> Result<Recovery, StoreError> {
        let mut rec = Recovery::default();
        let ingest = self.ingest_dir();
        for entry in
            fs::read_dir(&ingest).map_err(|e| StoreError::io("list", &ingest, e, String::new))?
        {
            let entry = entry.map_err(|e| StoreError::io("list", &ingest, e, String::new))?;
            let path = entry.path();
            let name = entry.file_name();
            let valid = name
                .to_str()
                .and_then(|n| n.strip_suffix(".partial"))
                .is_some_and(|d| d.parse::<Digest>().is_ok());
            let old = entry
                .metadata()
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > max_partial_age);
            let own = fs::symlink_metadata(&path).is_ok_and(|m| own_single_file(&m));
            if valid && !old && own {
                rec.partials_kept += 1;
            } else {
                remove_entry(&path);
                rec.strays_removed.push(path);
            }
        }
        let blobs = self.blob_dir();
        for entry in
            fs::read_dir(&blobs).map_err(|e| StoreError::io("list", &blobs, e, String::new))?
        {
            let entry = entry.map_err(|e| StoreError::io("list", &blobs, e, String::new))?;
            let path = entry.path();
            let meta = fs::symlink_metadata(&path)
                .map_err(|e| StoreError::io("stat", &path, e, String::new))?;
            let Some(digest) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<Digest>().ok())
            else {
                remove_entry(&path);
                rec.strays_removed.push(path);
                continue;
            };
            // A hard link here would make the chmod below change a file elsewhere.
            if !own_single_file(&meta) {
                remove_entry(&path);
                rec.blobs_removed.push(digest);
                continue;
            }
            if meta.mode() & 0o7777 != 0o400 {
                fs::set_permissions(&path, fs::Permissions::from_mode(0o400))
                    .map_err(|e| StoreError::io("chmod", &path, e, String::new))?;
                rec.fixed.push(format!(
                    "{}: mode {:o} set to 400",
                    path.display(),
                    meta.mode() & 0o7777
                ));
            }
            if scrub
                && hash_file(&path).map_err(|e| StoreError::io("read", &path, e, String::new))?
                    != digest
            {
                fs::remove_file(&path)
                    .map_err(|e| StoreError::io("remove", &path, e, String::new))?;
                rec.blobs_removed.push(digest);
            }
        }
        self.records(&mut rec.records_quarantined)?;
        Ok(rec)
    }

    /// Which of a record's blobs are missing (absent or of the wrong size).
    pub fn missing_blobs(&self, record: &ImageRecord) -> Vec<Digest> {
        record
            .vibs
            .iter()
            .filter(|v| !self.has_blob(&v.sha256, v.size))
            .map(|v| v.sha256)
            .collect()
    }

    /// Size and free space of the store's filesystem (statvfs).
    pub fn space(&self) -> Result<Space, StoreError> {
        space_of(&self.root)
    }
}

/// Whether a file is one the agent may write or chmod: a regular file it owns, with one link.
fn own_single_file(meta: &fs::Metadata) -> bool {
    meta.file_type().is_file() && meta.uid() == nix::unistd::geteuid().as_raw() && meta.nlink() == 1
}

/// Removes a directory entry whatever it is (a directory planted where a file belongs too).
fn remove_entry(path: &Path) {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_dir() => {
            let _ = fs::remove_dir_all(path);
        }
        _ => {
            let _ = fs::remove_file(path);
        }
    }
}

/// Creates (if needed) and exclusively locks a store's lock file.
fn take_lock(lock_path: &Path) -> Result<File, StoreError> {
    // Never through a symlink (issue 11, item 4): a planted `lock -> /etc/...` is an error.
    let lock = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(lock_path)
        .map_err(|e| {
            if e.raw_os_error() == Some(nix::libc::ELOOP) {
                StoreError::Dir(PrivateDirError::Insecure {
                    path: lock_path.to_owned(),
                    reason: "the lock file is a symlink; the agent never follows one it did not make (remove it)".into(),
                })
            } else {
                StoreError::io("open", lock_path, e, || "lock file".into())
            }
        })?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(fs::TryLockError::WouldBlock) => Err(StoreError::Locked {
            path: lock_path.to_owned(),
        }),
        Err(fs::TryLockError::Error(e)) => Err(StoreError::io("lock", lock_path, e, String::new)),
    }
}

/// statvfs of a path: total size and space available to unprivileged writers.
pub fn space_of(path: &Path) -> Result<Space, StoreError> {
    let st = nix::sys::statvfs::statvfs(path)
        .map_err(|e| StoreError::io("statvfs", path, io::Error::from(e), String::new))?;
    let frsize = st.fragment_size() as u64;
    Ok(Space {
        total: st.blocks() as u64 * frsize,
        free: st.blocks_available() as u64 * frsize,
    })
}

/// sha256 of a file's contents, read in chunks of up to 1 MiB.
pub fn hash_file(path: &Path) -> io::Result<Digest> {
    let mut f = fsutil::open_nofollow(path)?;
    let mut hasher = Sha256::new();
    // No bigger than the file: zeroing 1 MiB for every 64 KiB blob cost a scrub a quarter of
    // the time it spent hashing (issue 7, P4).
    let len = f.metadata()?.len();
    let mut buf = vec![0u8; len.clamp(4 << 10, 1 << 20) as usize];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(Digest::from_bytes(hasher.finalize().into()))
}

/// A download in progress into `ingest/<hex>.partial`: hashes while it writes, and refuses to
/// grow past the expected size.
#[derive(Debug)]
pub struct Ingest {
    file: io::BufWriter<File>,
    path: PathBuf,
    digest: Digest,
    size: u64,
    written: u64,
    /// File offset up to which writeback to the disk has been started (see [`WRITEBACK_CHUNK`]).
    writeback_from: u64,
    /// File offset at the last fdatasync, or at opening (see [`PARTIAL_SYNC_CHUNK`]).
    synced_to: u64,
    hasher: Sha256,
}

/// Every this many bytes, an ingest asks the kernel to start writing what it wrote to the disk
/// (`posix_fadvise(DONTNEED)`, which starts asynchronous writeback and then drops the pages once
/// they are clean). Without it, a blob's bytes stay dirty in the page cache until the commit's
/// fsync, so the disk idles while downloads run and then every download waits for the disk at
/// once. Only a hint: any write error still surfaces at the fsync.
const WRITEBACK_CHUNK: u64 = 8 << 20;

/// Every this many bytes, an ingest fdatasyncs its partial file, so that a power cut (which,
/// unlike a SIGKILL, loses the page cache) costs at most this much of each download in progress
/// rather than all of it (issue 12: after a power cut half-way through 160 MiB, 100 % was fetched
/// again without it). 32 MiB: staging 1 GiB (P1) measured no slower than without (median ratio
/// to curl + dgst + sync 0.655 in both, 6 runs each); every 8 MiB made it 1.75× slower, the sync
/// then waiting for writeback that [`WRITEBACK_CHUNK`] had only just started.
const PARTIAL_SYNC_CHUNK: u64 = 32 << 20;

impl Ingest {
    /// Bytes held so far; the offset to resume from.
    pub fn offset(&self) -> u64 {
        self.written
    }

    /// The blob's expected size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The blob's digest.
    pub fn digest(&self) -> Digest {
        self.digest
    }

    /// Appends bytes. More bytes than the expected size is an error, never a truncation.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        if self.written + bytes.len() as u64 > self.size {
            return Err(StoreError::Size {
                digest: self.digest,
                expected: self.size,
                actual: format!("received more than {}", self.size),
            });
        }
        self.file.write_all(bytes).map_err(|e| {
            StoreError::io("write", &self.path, e, || format!("sha256:{}", self.digest))
        })?;
        self.hasher.update(bytes);
        self.written += bytes.len() as u64;
        let in_file = self.written - self.file.buffer().len() as u64;
        if in_file - self.writeback_from >= WRITEBACK_CHUNK {
            let _ = nix::fcntl::posix_fadvise(
                self.file.get_ref(),
                self.writeback_from as i64,
                (in_file - self.writeback_from) as i64,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
            );
            self.writeback_from = in_file;
        }
        if in_file - self.synced_to >= PARTIAL_SYNC_CHUNK {
            self.file.get_ref().sync_data().map_err(|e| {
                StoreError::io("fsync", &self.path, e, || format!("sha256:{}", self.digest))
            })?;
            self.synced_to = in_file;
        }
        Ok(())
    }

    /// Pushes buffered bytes to the file, so a crash or retry keeps them for resumption.
    pub fn flush(&mut self) -> Result<(), StoreError> {
        self.file.flush().map_err(|e| {
            StoreError::io("write", &self.path, e, || format!("sha256:{}", self.digest))
        })
    }

    /// Throws away what was written and starts from zero (a server that ignored Range).
    pub fn restart(&mut self) -> Result<(), StoreError> {
        self.file
            .flush()
            .and_then(|()| self.file.get_mut().set_len(0))
            .and_then(|()| io::Seek::seek(self.file.get_mut(), io::SeekFrom::Start(0)).map(drop))
            .map_err(|e| StoreError::io("truncate", &self.path, e, String::new))?;
        self.written = 0;
        self.writeback_from = 0;
        self.synced_to = 0;
        self.hasher = Sha256::new();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (s, _) = Store::open(&dir.path().join("scratch")).expect("open");
        (dir, s)
    }

    #[test]
    fn ingest_commit_and_resume() {
        let (_d, s) = store();
        let data = vec![7u8; 300_000];
        let digest = Digest::of(&data);
        let mut ing = s.ingest(digest, data.len() as u64).expect("ingest");
        ing.write(&data[..100_000]).expect("write");
        ing.flush().expect("flush");
        drop(ing);
        let mut ing = s.ingest(digest, data.len() as u64).expect("resume");
        assert_eq!(ing.offset(), 100_000);
        ing.write(&data[100_000..]).expect("write");
        assert_eq!(s.commit(ing).expect("commit"), Committed::New);
        let p = s.blob_path(&digest);
        assert_eq!(fs::read(&p).expect("read"), data);
        assert_eq!(fs::metadata(&p).expect("meta").mode() & 0o7777, 0o400);
        assert!(s.has_blob(&digest, data.len() as u64));
    }

    #[test]
    fn wrong_bytes_never_reach_blobs() {
        let (_d, s) = store();
        let digest = Digest::of(b"right");
        let mut ing = s.ingest(digest, 5).expect("ingest");
        ing.write(b"wrong").expect("write");
        assert!(matches!(s.commit(ing), Err(StoreError::Checksum { .. })));
        assert!(!s.blob_path(&digest).exists());
        assert_eq!(s.bytes_held(&digest, 5), 0, "partial removed");

        let mut ing = s.ingest(digest, 5).expect("ingest");
        assert!(matches!(ing.write(b"right!"), Err(StoreError::Size { .. })));
        ing.write(b"righ").expect("write");
        assert!(matches!(s.commit(ing), Err(StoreError::Size { .. })));
    }

    #[test]
    fn ingest_past_writeback_chunks_commits_the_right_bytes() {
        // Writes of several WRITEBACK_CHUNKs (issue 7), interrupted and resumed mid-chunk.
        let (_d, s) = store();
        let data: Vec<u8> = (0..(2 * WRITEBACK_CHUNK + 12_345) as usize)
            .map(|i| (i % 253) as u8)
            .collect();
        let digest = Digest::of(&data);
        let cut = WRITEBACK_CHUNK as usize + 70_000;
        let mut ing = s.ingest(digest, data.len() as u64).expect("ingest");
        for chunk in data[..cut].chunks(65_536) {
            ing.write(chunk).expect("write");
        }
        ing.flush().expect("flush");
        drop(ing);
        let mut ing = s.ingest(digest, data.len() as u64).expect("resume");
        assert_eq!(ing.offset(), cut as u64);
        for chunk in data[cut..].chunks(65_536) {
            ing.write(chunk).expect("write");
        }
        assert_eq!(s.commit(ing).expect("commit"), Committed::New);
        assert_eq!(fs::read(s.blob_path(&digest)).expect("read"), data);
    }

    #[test]
    fn hash_file_of_empty_small_and_multi_chunk_files() {
        // The read buffer is sized from the file (issue 7); every size must still hash right.
        let dir = tempfile::tempdir().expect("tempdir");
        for len in [0usize, 1, 4095, 4096, 70_000, (1 << 20) + 3, (3 << 20) + 17] {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let path = dir.path().join(format!("f{len}"));
            fs::write(&path, &data).expect("write");
            assert_eq!(
                hash_file(&path).expect("hash"),
                Digest::of(&data),
                "{len} bytes"
            );
        }
    }

    #[test]
    fn second_store_on_same_root_is_refused() {
        let (d, _s) = store();
        let err = Store::open(&d.path().join("scratch")).expect_err("locked");
        assert!(matches!(err, StoreError::Locked { .. }), "{err}");
    }

    #[test]
    fn layout_removed_under_the_store_is_recreated_and_locked_again() {
        let (d, s) = store();
        let root = d.path().join("scratch");
        fs::remove_dir_all(&root).expect("rm");
        assert!(s.records(&mut Vec::new()).expect("no records").is_empty());
        s.ensure_layout().expect("re-created");
        assert_eq!(fs::metadata(&root).expect("root").mode() & 0o7777, 0o700);
        let digest = Digest::of(b"abc");
        let mut ing = s.ingest(digest, 3).expect("ingest");
        ing.write(b"abc").expect("write");
        s.commit(ing).expect("commit");
        let err = Store::open(&root).expect_err("locked again");
        assert!(matches!(err, StoreError::Locked { .. }), "{err}");
        s.ensure_layout().expect("idempotent");
    }

    #[test]
    fn scrub_removes_corrupt_blob_and_strays() {
        let (_d, s) = store();
        let digest = Digest::of(b"abc");
        let mut ing = s.ingest(digest, 3).expect("ingest");
        ing.write(b"abc").expect("write");
        s.commit(ing).expect("commit");
        let p = s.blob_path(&digest);
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).expect("chmod");
        fs::write(&p, b"abd").expect("corrupt");
        fs::write(s.ingest_dir().join("junk"), b"").expect("stray");
        let rec = s
            .recover(true, std::time::Duration::from_secs(3600))
            .expect("recover");
        assert_eq!(rec.blobs_removed, vec![digest]);
        assert_eq!(rec.strays_removed.len(), 1);
        assert!(!p.exists());
    }
}
