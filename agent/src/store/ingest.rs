//! Ingest → commit: bytes are hashed as they are written under `ingest/`, fsynced, checked
//! (size and sha256) and only then renamed into `blobs/sha256/`; a partial download stays
//! resumable.

use super::direct::BlobWriter;
use super::*;

/// What [`Store::commit`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// The blob is new in the store.
    New,
    /// The blob was already there; the download was discarded.
    AlreadyPresent,
}

impl Store {
    /// Opens the partial download of a blob, creating it or resuming it. Bytes already in the
    /// partial file are re-hashed so the final check covers every byte.
    pub fn ingest(&self, digest: Digest, size: u64) -> Result<Ingest, StoreError> {
        let path = self.partial_path(&digest);
        let open = || {
            fsutil::open_private_rw(&path)
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
        let len = file
            .metadata()
            .map_err(|e| StoreError::io("stat", &path, e, String::new))?
            .len();
        if len > size {
            file.set_len(0)
                .map_err(|e| StoreError::io("truncate", &path, e, String::new))?;
        }
        let mut hasher = Sha256::new();
        let mut written = 0u64;
        if len <= size {
            let mut buf = vec![0u8; 256 << 10];
            loop {
                let n = file
                    .read(&mut buf)
                    .map_err(|e| StoreError::io("read", &path, e, String::new))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                written += n as u64;
            }
        }
        Ok(Ingest {
            file: BlobWriter::new(file, written),
            path,
            digest,
            size,
            written,
            synced_to: written,
            hasher,
        })
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
        let file = file.into_file().map_err(|e| {
            discard(StoreError::io("write", &path, e, || {
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
}

/// A download in progress into `ingest/<hex>.partial`: hashes while it writes, and refuses to
/// grow past the expected size.
#[derive(Debug)]
pub struct Ingest {
    /// Buffers, writes with `O_DIRECT` where it can, and starts writeback where it cannot.
    file: BlobWriter,
    path: PathBuf,
    digest: Digest,
    size: u64,
    written: u64,
    /// File offset at the last fdatasync, or at opening (see [`PARTIAL_SYNC_CHUNK`]).
    synced_to: u64,
    hasher: Sha256,
}

/// Every this many bytes, an ingest fdatasyncs its partial file, so that a power cut (which,
/// unlike a SIGKILL, loses the page cache) costs at most this much of each download in progress
/// rather than all of it (issue 12: after a power cut half-way through 160 MiB, 100 % was fetched
/// again without it). 32 MiB: staging 1 GiB (P1) measured no slower than without (median ratio
/// to curl + dgst + sync 0.655 in both, 6 runs each); every 8 MiB made it 1.75× slower, the sync
/// then waiting for writeback that `WRITEBACK_CHUNK` had only just started. Since the partial is
/// written with `O_DIRECT` (issue 16, `direct.rs`) its bytes are on the device when written and
/// the fdatasync only makes their allocation and the device's cache durable: P1 measured the
/// same with it as without it.
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
        self.file.write(bytes).map_err(|e| {
            StoreError::io("write", &self.path, e, || format!("sha256:{}", self.digest))
        })?;
        self.hasher.update(bytes);
        self.written += bytes.len() as u64;
        let in_file = self.file.in_file();
        if in_file - self.synced_to >= PARTIAL_SYNC_CHUNK {
            self.file.file().sync_data().map_err(|e| {
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
            .reset()
            .map_err(|e| StoreError::io("truncate", &self.path, e, String::new))?;
        self.written = 0;
        self.synced_to = 0;
        self.hasher = Sha256::new();
        Ok(())
    }
}
