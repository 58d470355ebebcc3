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
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use time::OffsetDateTime;
use vibstage_protocol::api::{DpuState, FirmwareState, ImageRef, Notification};
use vibstage_protocol::{Digest, Envelope, ImageDigest, Name, VibKind, VibTarget};

use crate::fsutil::{self, Loaded, PrivateDirError};

mod direct;
mod gc;
mod ingest;
mod records;
mod recovery;
mod space;
mod stores;

pub use ingest::{Committed, Ingest};
pub use records::{ImageRecord, StagedVib};
pub use recovery::Recovery;
pub use space::{Space, space_of};
pub use stores::Stores;

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
        /// The underlying error: what the OS or library said, kept as `source()`.
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

    pub(super) fn ensure_dirs(&self, fixed: &mut Vec<String>) -> Result<(), StoreError> {
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

    pub(super) fn blob_dir(&self) -> PathBuf {
        self.root.join("blobs/sha256")
    }

    pub(super) fn ingest_dir(&self) -> PathBuf {
        self.root.join("ingest")
    }

    pub(super) fn image_dir(&self) -> PathBuf {
        self.root.join("images")
    }

    /// Where a blob lives (whether or not it is there).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blob_dir().join(digest.to_hex())
    }

    pub(super) fn partial_path(&self, digest: &Digest) -> PathBuf {
        self.ingest_dir()
            .join(format!("{}.partial", digest.to_hex()))
    }

    pub(super) fn record_path(&self, digest: &ImageDigest) -> PathBuf {
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
    let lock = fsutil::open_private_rw(lock_path).map_err(|e| {
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

/// sha256 of a file's contents, read in chunks of up to 1 MiB. The file is opened without
/// following a symbolic link (the daemon's stores and banks hold none).
pub fn hash_file(path: &Path) -> io::Result<Digest> {
    let f = fsutil::open_nofollow(path)?;
    // No bigger than the file: zeroing 1 MiB for every 64 KiB blob cost a scrub a quarter of
    // the time it spent hashing (issue 7, P4).
    let len = f.metadata()?.len();
    hash_reader(f, len.clamp(4 << 10, 1 << 20) as usize).map(|(digest, _)| digest)
}

/// sha256 and length of everything `reader` yields, read `chunk` bytes at a time: the one
/// streaming hash of a file, for the store and for whoever publishes content.
pub fn hash_reader(mut reader: impl Read, chunk: usize) -> io::Result<(Digest, u64)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; chunk.max(1)];
    let mut total = 0u64;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total = total.saturating_add(n as u64);
    }
    Ok((Digest::from_bytes(hasher.finalize().into()), total))
}

#[cfg(test)]
mod tests {
    use super::direct::WRITEBACK_CHUNK;
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
